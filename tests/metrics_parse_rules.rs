//! The exposition reader (`kvhygiene::metrics::parse`) and the merge of per-process snapshots
//! (`kvhygiene::metrics::merge`): rules of the text format that `kvh gate`, `kvh metrics` and
//! `kvh serve-metrics` rely on.

use kvhygiene::metrics::parse::parse;

/// A family's `# TYPE` must come before its samples, also once another family's samples
/// were read after them.
#[test]
fn a_type_after_its_family_s_samples_is_refused_after_another_family() {
    let e = parse("a 1\nb 1\n# TYPE a gauge\n").unwrap_err();
    assert!(e.message.contains("after its samples"), "{e}");
    assert_eq!(e.line, 3);
}

/// Label names are `[a-zA-Z_][a-zA-Z0-9_]*`: one a scraper would refuse is refused here too.
#[test]
fn malformed_label_names_are_refused() {
    for text in [
        "a{1x=\"1\"} 1\n",
        "a{sig-nal=\"1\"} 1\n",
        "a{x.y=\"1\"} 1\n",
        "a{=\"1\"} 1\n",
    ] {
        let e = parse(text).unwrap_err();
        assert!(e.message.contains("invalid label name"), "{text:?}: {e}");
    }
    assert!(parse("a{_x9=\"1\",Y=\"2\"} 1\n").is_ok());
}

/// A sample value a scraper cannot read as a 64-bit float is refused: Prometheus (and
/// `promtool check metrics`) refuse a decimal beyond the float range ("expected float as
/// value, got \"1e400\""), rather than reading it as an infinity. The infinities the format
/// spells `+Inf` and `-Inf` stay accepted.
#[test]
fn a_value_beyond_the_float_range_is_refused() {
    for text in ["a 1e400\n", "a -1e400\n", "a{x=\"1\"} 2e308\n"] {
        assert!(
            parse(text).is_err(),
            "{text:?} was accepted as {:?}",
            parse(text).map(|e| e.samples[0].value)
        );
    }
    assert_eq!(
        parse("a +Inf\n").unwrap().value("a", &[]),
        Some(f64::INFINITY)
    );
    assert_eq!(parse("a 1e308\n").unwrap().value("a", &[]), Some(1e308));
}

/// A summary's samples are `X{quantile=...}`, `X_sum` and `X_count` only: `_bucket` samples
/// belong to histograms. A family of its own named `X_bucket` beside a summary `X` is a
/// family of its own (as Prometheus's parser reads it), so its samples after another
/// family's do not split the summary.
#[test]
fn a_summary_owns_no_bucket_samples() {
    use kvhygiene::metrics::parse::family_of;
    let text = "# TYPE s summary\ns_sum 1\ns_count 1\n\
                # TYPE t gauge\nt 1\n\
                # TYPE s_bucket gauge\ns_bucket 3\n";
    let parsed = parse(text);
    assert!(parsed.is_ok(), "{parsed:?}");
    let mut types = std::collections::HashMap::new();
    types.insert("s".to_string(), "summary".to_string());
    assert_eq!(family_of("s_bucket", &types), "s_bucket");
    types.insert("h".to_string(), "histogram".to_string());
    assert_eq!(family_of("h_bucket", &types), "h");
}

/// Merging per-process snapshots: a gauge `X_bucket` in one file beside a summary `X` in
/// another is not a sample of that summary (summaries have no buckets), so the two files
/// merge into one exposition.
#[test]
fn a_gauge_named_as_a_summary_s_bucket_merges_beside_the_summary() {
    use kvhygiene::metrics::cli::Snapshot;
    use kvhygiene::metrics::merge::merge;
    let snap = |text: &str| Snapshot {
        text: text.to_string(),
        exposition: parse(text).unwrap(),
        timestamp: 0.0,
    };
    let a = snap(
        "# TYPE kvh_lat_seconds summary\nkvh_lat_seconds{pid=\"1\",quantile=\"0.5\"} 0.1\n\
         kvh_lat_seconds_sum{pid=\"1\"} 1\nkvh_lat_seconds_count{pid=\"1\"} 10\n",
    );
    let b = snap("# TYPE kvh_lat_seconds_bucket gauge\nkvh_lat_seconds_bucket{pid=\"2\"} 3\n");
    let merged = merge(&[("kvh-1.prom", &a), ("kvh-2.prom", &b)]);
    assert!(merged.is_ok(), "{merged:?}");
}

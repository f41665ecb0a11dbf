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

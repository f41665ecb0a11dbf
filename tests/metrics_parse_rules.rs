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

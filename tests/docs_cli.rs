//! What the user documentation (README.md, docs/operations.md) says the built `kvh` does,
//! checked against the binary.

#[path = "cli_common/mod.rs"]
mod cli_common;
mod forensic_common;

use cli_common::{kvh, log_records as records, run};
use serde_json::Value;

/// docs/operations.md, "Residue detected": every scrub `kvh_residue_detected_total` counts
/// left a record that names it: a `verify_failed` record with `samples_nonzero` above 0 (the
/// default policy: one non-zero sample fails the verification), or a `quarantine` record with
/// reason `residue` / `rescrub_residue` (a scrub that still passed the threshold).
#[test]
fn every_scrub_counted_as_residue_has_a_record_that_says_so() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    let (code, out, err) = run(kvh()
        .args(["demo", "--inject-fault", "--requests", "4", "--log-dir"])
        .arg(&dir));
    assert_eq!(code, 0, "{out}{err}");
    let records = records(&dir);
    let summary = records
        .iter()
        .rev()
        .find(|r| r["kind"] == "summary")
        .expect("a summary record");
    let counted = summary["counters"]["residue_detected"].as_u64().unwrap();
    assert!(
        counted > 0,
        "the drill's scrub read non-zero samples: {summary}"
    );
    let nonzero = |r: &Value| {
        r["samples_nonzero"]
            .as_str()
            .map(|s| s.parse::<u64>().unwrap())
            .or_else(|| r["samples_nonzero"].as_u64())
            .unwrap_or(0)
    };
    let named = records
        .iter()
        .filter(|r| {
            (r["kind"] == "verify_failed" && nonzero(r) > 0)
                || (r["kind"] == "quarantine"
                    && (r["reason"] == "residue" || r["reason"] == "rescrub_residue"))
        })
        .count() as u64;
    assert_eq!(
        named, counted,
        "kvh_residue_detected_total counts {counted} scrub(s) as residue, but {named} record(s) \
         say so"
    );
}

/// README.md and docs/operations.md: `kvh evidence` counts every exception and lists the
/// first `--max-exceptions` (200 by default) with their `file:line`; a larger value lists them
/// all.
#[test]
fn the_evidence_report_lists_exceptions_up_to_max_exceptions() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = forensic_common::log_dir(&tmp);
    let n = 201;
    forensic_common::write_log(&forensic_common::cfg(&dir, 1 << 30), n, false);
    let listed = |extra: &[&str]| {
        let (code, out, err) = run(kvh().arg("evidence").arg(&dir).args(extra));
        assert_eq!(code, 0, "{err}");
        out.lines()
            .filter(|l| l.starts_with("| ") && l.contains(".jsonl:"))
            .count() as u64
    };
    assert_eq!(listed(&[]), 200, "the default list");
    assert_eq!(
        listed(&["--max-exceptions", "100000"]),
        n,
        "every exception"
    );
}

/// README.md's table of verbs renders as one table with one row per verb: a Markdown table
/// row is one line, so every line from the header to the blank line after the table starts
/// and ends with a pipe (a row broken over two lines ends the cell mid-sentence and makes its
/// continuation a row of its own).
#[test]
fn every_line_of_the_readme_verb_table_is_a_whole_row() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let start = readme
        .lines()
        .position(|l| l.starts_with("| Verb |"))
        .expect("README.md's table of verbs");
    let broken: Vec<_> = readme
        .lines()
        .enumerate()
        .skip(start)
        .take_while(|(_, l)| !l.trim().is_empty())
        .filter(|(_, l)| !(l.starts_with('|') && l.trim_end().ends_with('|')))
        .map(|(n, l)| format!("README.md:{}: {}", n + 1, &l[..l.len().min(80)]))
        .collect();
    assert!(
        broken.is_empty(),
        "lines of the verb table that are not whole rows:\n{}",
        broken.join("\n")
    );
}

/// README.md: "Every verb has `--help`", and its table gives each verb's exit statuses,
/// which scripts rely on. Each verb's `--help` exits 0 and states its exit statuses too
/// (the word "exit"), as `kvh verify-log --help` does: `kvh keygen --help` is expected to
/// say "0, or 2", `kvh completions --help` "0, or 2 for an unknown shell".
#[test]
fn every_verb_help_states_its_exit_statuses() {
    let mut silent = Vec::new();
    for &verb in cli_common::VERBS {
        let (code, out, err) = run(kvh().args([verb, "--help"]));
        assert_eq!(code, 0, "kvh {verb} --help: {err}");
        if !out.to_lowercase().contains("exit") {
            silent.push(verb);
        }
    }
    assert!(
        silent.is_empty(),
        "`kvh VERB --help` says nothing of the exit status for: {silent:?}"
    );
}

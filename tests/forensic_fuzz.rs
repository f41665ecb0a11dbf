//! The verifier on malformed input: never panics, never hangs, always a verdict with a
//! reason (exit 1) or an error (exit 2).

mod forensic_common;

use std::fs;
use std::path::Path;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use forensic_common::*;
use kvhygiene::forensic::{files, record, scan, verify_all, VerifyOptions};
use proptest::prelude::*;

/// A small valid keyed log, made once.
fn valid_log() -> &'static Vec<u8> {
    static LOG: OnceLock<Vec<u8>> = OnceLock::new();
    LOG.get_or_init(|| {
        let tmp = tempfile::tempdir().unwrap();
        let dir = log_dir(&tmp);
        write_log(&cfg(&dir, 1 << 20), 8, true);
        fs::read(&chain_files(&dir)[0]).unwrap()
    })
}

/// Exit code the CLI would return, and its reason.
fn run(bytes: &[u8], opts: &VerifyOptions) -> (i32, String) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    fs::write(dir.join(files::file_name("p1-t1", 0)), bytes).unwrap();
    let t = Instant::now();
    let out = match verify_all(Path::new(dir), opts) {
        Ok(r) => (
            r.exit_code(),
            r.first_problem().map(|p| p.to_string()).unwrap_or_default(),
        ),
        Err(e) => (2, e.to_string()),
    };
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "verification took {:?}",
        t.elapsed()
    );
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_verify(bytes in proptest::collection::vec(any::<u8>(), 1..2048)) {
        let (code, reason) = run(&bytes, &keyed_opts());
        // A random buffer without a newline is one torn line: nothing to verify, but no panic.
        if bytes.contains(&b'\n') {
            prop_assert!(code == 1 || code == 2, "code {code}");
            prop_assert!(!reason.is_empty());
        }
    }

    #[test]
    fn mutated_logs_are_rejected_with_a_reason(
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
    ) {
        let mut bytes = valid_log().clone();
        let mut changed = false;
        for (at, val) in &edits {
            let i = at.index(bytes.len());
            changed |= bytes[i] != *val;
            bytes[i] = *val;
        }
        prop_assume!(changed);
        let (code, reason) = run(&bytes, &keyed_opts());
        // A change inside the final line may only tear it when it removes the last newline
        // and that is the only change: anything else is detected.
        let torn_only = bytes.last() != Some(&b'\n') && bytes[..bytes.len() - 1] == valid_log()[..bytes.len() - 1];
        if !torn_only {
            prop_assert_eq!(code, 1, "{}", reason);
            prop_assert!(!reason.is_empty());
        }
    }

    #[test]
    fn nested_and_huge_json_is_handled(depth in 1usize..4000) {
        let line = format!("{}{}\n", "[".repeat(depth), "]".repeat(depth));
        let (code, reason) = run(line.as_bytes(), &VerifyOptions::default());
        prop_assert_eq!(code, 1);
        prop_assert!(!reason.is_empty());
    }
}

/// The reference definition: the line equals the canonical serialisation of its parsed
/// body with the seal appended.
fn reference_accepts(line: &[u8]) -> bool {
    let Ok(serde_json::Value::Object(mut m)) = serde_json::from_slice(line) else {
        return false;
    };
    let Some(serde_json::Value::String(hash)) = m.remove("hash") else {
        return false;
    };
    let mac = match m.remove("mac") {
        None => None,
        Some(serde_json::Value::String(s)) => Some(s),
        Some(_) => return false,
    };
    if m.is_empty() {
        return false;
    }
    let mut body = Vec::new();
    if record::write_canonical(&serde_json::Value::Object(m), &mut body).is_err() {
        return false;
    }
    body.pop();
    body.extend_from_slice(format!(",\"hash\":\"{hash}\"").as_bytes());
    if let Some(m) = mac {
        body.extend_from_slice(format!(",\"mac\":\"{m}\"").as_bytes());
    }
    body.push(b'}');
    body == line
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// The verifier's fast scanner accepts exactly what the reference definition accepts.
    #[test]
    fn scanner_matches_the_reference_canonical_form(
        line_no in 0usize..8,
        edits in proptest::collection::vec((any::<prop::sample::Index>(), prop::sample::select(b"{}[]\":,\\0123456789-.aeEnu \n\x01\x7f".to_vec())), 0..3),
    ) {
        let text = valid_log();
        let lines: Vec<&[u8]> = text.split(|&b| b == b'\n').filter(|l| !l.is_empty()).collect();
        let mut l = lines[line_no % lines.len()].to_vec();
        for (at, val) in &edits {
            let i = at.index(l.len());
            l[i] = *val;
        }
        let fast = scan::scan(&l).is_ok();
        let reference = reference_accepts(&l) && !l.contains(&b'\n');
        prop_assert_eq!(fast, reference, "{}", String::from_utf8_lossy(&l));
    }
}

#[test]
fn cli_on_garbage_exits_1_with_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    fs::write(tmp.path().join(files::file_name("p1-t1", 0)), b"\0\xff{\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kvh"))
        .arg("verify-log")
        .arg(tmp.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("-000000.jsonl:1: malformed JSON"), "{text}");
}

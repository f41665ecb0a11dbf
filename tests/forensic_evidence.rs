//! `kvh evidence`: the auditor's report is built from verified records only, counts what the
//! log holds, lists every exception with its file:line, and exits as verify-log does.

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

fn kvh(args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kvh"));
    cmd.args(args);
    // Only the settings a test names: the developer's own KVH_* must not leak in.
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("KVH_")) {
        cmd.env_remove(k);
    }
    cmd.envs(envs.iter().copied());
    cmd.output().expect("run kvh")
}

/// A demo run with the fault drill, logged into `dir`.
fn demo_log(dir: &Path, envs: &[(&str, &str)]) {
    let d = dir.to_str().expect("utf-8 path");
    let out = kvh(
        &[
            "demo",
            "--tenants",
            "2",
            "--requests",
            "3",
            "--inject-fault",
            "--log-dir",
            d,
        ],
        envs,
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

fn evidence_json(dir: &Path, extra: &[&str]) -> (Option<i32>, Value) {
    let mut args = vec!["evidence", dir.to_str().expect("utf-8 path"), "--json"];
    args.extend_from_slice(extra);
    let out = kvh(&args, &[]);
    let v = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (out.status.code(), v)
}

#[test]
fn a_verified_log_reports_activity_and_every_exception() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    demo_log(&dir, &[]);
    let (code, v) = evidence_json(&dir, &[]);
    assert_eq!(code, Some(0), "{v}");
    assert_eq!(v["integrity"]["verified"], true);
    assert_eq!(v["integrity"]["chains"], 1);
    let by_kind = &v["exceptions_by_kind"];
    assert_eq!(by_kind["verify_failed"], 1, "{v}");
    assert_eq!(by_kind["kv_verify_failed"], 1, "{v}");
    assert_eq!(by_kind["quarantine"], 1, "{v}");
    assert_eq!(v["exceptions"].as_array().unwrap().len(), 3);
    let first = &v["exceptions"][0];
    assert_eq!(first["kind"], "verify_failed");
    assert_eq!(first["tenant_id"], "tenant-victim");
    assert!(first["file"].as_str().unwrap().starts_with("kvh-"));
    assert!(first["detail"]
        .as_str()
        .unwrap()
        .contains("samples_nonzero="));
    // The counters come from the process's last summary; the KV figures from kv_scrub records.
    assert_eq!(v["counters"]["verifications_failed"], 1);
    assert!(v["counters"]["verifications_passed"].as_u64().unwrap() > 0);
    assert_eq!(v["kv_scrubs"]["failed_blocks"], 1);
    assert_eq!(
        v["kv_scrubs"]["calls"], v["records_by_kind"]["kv_scrub"],
        "one kv_scrub record per call"
    );
    assert_eq!(v["processes"][0]["clean_stop"], true);
    assert_eq!(v["tenants"], 3, "tenant-0, tenant-1 and the drill's victim");

    // The Markdown form says the same.
    let md = kvh(&["evidence", dir.to_str().unwrap()], &[]);
    let text = String::from_utf8_lossy(&md.stdout);
    assert_eq!(md.status.code(), Some(0));
    assert!(text.contains("- VERIFIED: 1 chains"), "{text}");
    assert!(
        text.contains("3 security records: kv_verify_failed 1, quarantine 1, verify_failed 1."),
        "{text}"
    );
    assert!(text.contains("SOC 2 CC6.5"), "{text}");

    // Listing is bounded; counting is not.
    let (_, few) = evidence_json(&dir, &["--max-exceptions", "1"]);
    assert_eq!(few["exceptions"].as_array().unwrap().len(), 1);
    assert_eq!(few["exceptions_by_kind"]["quarantine"], 1);
}

#[test]
fn a_tampered_chain_fails_and_is_left_out_of_the_figures() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    demo_log(&dir, &[]);
    let file = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .unwrap();
    let text = std::fs::read_to_string(&file).unwrap();
    std::fs::write(&file, text.replacen("tenant-victim", "tenant-hidden", 1)).unwrap();
    let (code, v) = evidence_json(&dir, &[]);
    assert_eq!(code, Some(1), "{v}");
    assert_eq!(v["integrity"]["verified"], false);
    let problem = v["integrity"]["problems"][0].as_str().unwrap();
    assert!(problem.contains(".jsonl:"), "{problem}");
    // Nothing from the unverified chain is reported as fact.
    assert_eq!(v["processes"].as_array().unwrap().len(), 0);
    assert_eq!(v["exceptions"].as_array().unwrap().len(), 0);
    let md = kvh(&["evidence", dir.to_str().unwrap()], &[]);
    assert!(String::from_utf8_lossy(&md.stdout).contains("cannot be relied on"));
}

#[test]
fn never_reuse_retirements_are_the_control_not_exceptions() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    // idle_ttl_ms = 0: every freed block is retired through quarantine (policy never_reuse).
    demo_log(&dir, &[("KVH_IDLE_TTL_MS", "0")]);
    let (code, v) = evidence_json(&dir, &[]);
    assert_eq!(code, Some(0), "{v}");
    assert!(
        v["records_by_kind"]["quarantine"].as_u64().unwrap() > 1,
        "{v}"
    );
    // Only the drill's sabotaged block is an exception.
    assert_eq!(v["exceptions_by_kind"]["quarantine"], 1, "{v}");
}

#[test]
fn no_log_or_no_directory_is_a_usage_error() {
    let tmp = tempfile::tempdir().unwrap();
    let empty = kvh(&["evidence", tmp.path().to_str().unwrap()], &[]);
    assert_eq!(empty.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&empty.stderr).contains("no forensic log records"));
    let missing = kvh(
        &["evidence", tmp.path().join("nope").to_str().unwrap()],
        &[],
    );
    assert_eq!(missing.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("nope"));
}

//! `--json` when a verb cannot make its check (exit 2): stdout holds one JSON object in the
//! report's place, naming the error and setting the report's own verdict field to say so,
//! so that a script reading that field (`kvh gate --json | jq -r .verdict`, as the help
//! shows) reads that nothing was judged instead of an empty string from a successful pipe.

#[path = "cli_common/mod.rs"]
mod cli_common;

use cli_common::kvh;
use serde_json::Value;

/// Runs `kvh ARGS`, asserts exit 2 and one JSON object on stdout naming `missing` in its
/// `error`; returns the object.
fn json_error(args: &[&str], missing: &str) -> Value {
    json_error_in(&[], args, missing)
}

/// [`json_error`] with `env` added to the (otherwise `KVH_*`-free) environment.
fn json_error_in(env: &[(&str, &str)], args: &[&str], missing: &str) -> Value {
    let out = kvh().envs(env.iter().copied()).args(args).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "kvh {args:?}: {stderr}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(stdout.lines().count(), 1, "one object: {stdout:?}");
    let v: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout:?}"));
    let error = v["error"].as_str().unwrap_or_default();
    assert!(error.contains(missing), "{v}");
    // The same message on stderr, for the operator.
    assert!(stderr.contains(error), "{stderr}");
    v
}

#[test]
fn gate_says_its_verdict_is_an_error_and_metrics_that_it_is_not_ok() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("kvh.prom");
    let f = file.to_str().unwrap();
    let v = json_error(&["gate", "--metrics-file", f, "--json"], f);
    assert_eq!(v["verdict"], "error");
    let v = json_error(&["metrics", "--file", f, "--json"], f);
    assert_eq!(v["ok"], false);
}

#[test]
fn verify_log_reports_no_chain_and_the_error() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("log");
    let d = missing.to_str().unwrap();
    let v = json_error(&["verify-log", d, "--json"], d);
    assert_eq!(v["chains"], serde_json::json!([]));
    assert_eq!(v["errors"][0], v["error"]);
    // A directory with nothing to verify is no verdict either.
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let e = empty.to_str().unwrap();
    let v = json_error(&["verify-log", e, "--json"], "no forensic log files");
    assert_eq!(v["chains"], serde_json::json!([]));
}

#[test]
fn evidence_names_the_error() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("log");
    let d = missing.to_str().unwrap();
    json_error(&["evidence", d, "--json"], d);
}

#[test]
fn an_invalid_policy_is_an_error_object_for_config_and_preflight() {
    let bad = [("KVH_OOM", "bogus")];
    let v = json_error_in(&bad, &["config", "--json"], "KVH_OOM");
    assert_eq!(v.as_object().unwrap().len(), 1, "{v}");
    let v = json_error_in(&bad, &["preflight", "--skip-backend", "--json"], "KVH_OOM");
    assert_eq!(v["ready"], false);
}

#[test]
fn prune_log_names_the_error() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("log");
    let d = missing.to_str().unwrap();
    let archive = tmp.path().to_str().unwrap();
    let args = [
        "prune-log",
        d,
        "--archive-dir",
        archive,
        "--older-than",
        "1",
        "--key-file",
        d,
        "--json",
    ];
    json_error(&args, d);
}

#[test]
fn without_json_stdout_stays_empty() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("kvh.prom");
    let out = kvh()
        .args(["gate", "--metrics-file", file.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        out.stdout.is_empty(),
        "{:?}",
        String::from_utf8_lossy(&out.stdout)
    );
}

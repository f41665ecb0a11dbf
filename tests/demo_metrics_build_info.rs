//! `kvh demo --metrics-file` leaves "its last metrics snapshot" (README.md), a process's
//! snapshot as the runtime writes it: `kvh_build_info{version,backend,config_digest}`, whose
//! `config_digest` is the policy digest of the run's `start` record (ARCHITECTURE.md: one value
//! in the `start` record, the `kvh_build_info` label and `kvh config`).

#[path = "cli_common/mod.rs"]
mod cli_common;

use cli_common::{host_demo, run};
use serde_json::Value;

#[test]
fn the_demo_snapshot_carries_the_policy_digest_of_its_start_record() {
    let tmp = tempfile::tempdir().unwrap();
    let log = tmp.path().join("log");
    let file = tmp.path().join("kvh.prom");
    let (code, out, err) = run(host_demo(2, 4)
        .arg("--log-dir")
        .arg(&log)
        .arg("--metrics-file")
        .arg(&file));
    assert_eq!(code, 0, "kvh demo failed:\n{out}\n{err}");

    let starts = start_digests(&log);
    assert_eq!(starts.len(), 1, "one start record: {starts:?}");

    let text = std::fs::read_to_string(&file).unwrap();
    let info = text
        .lines()
        .find(|l| l.starts_with("kvh_build_info{"))
        .expect("the snapshot has a kvh_build_info sample");
    let expected = format!("config_digest=\"{}\"", starts[0]);
    assert!(
        info.contains(&expected),
        "kvh_build_info of the demo's snapshot does not carry the start record's policy \
         digest ({expected}): {info}"
    );
}

/// The policy digests of the `start` records in `log`'s chain files.
fn start_digests(log: &std::path::Path) -> Vec<String> {
    let mut starts = Vec::new();
    for entry in std::fs::read_dir(log).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|x| x == "jsonl") {
            for line in std::fs::read_to_string(&path).unwrap().lines() {
                let record: Value = serde_json::from_str(line).unwrap();
                if record["kind"] == "start" {
                    starts.push(record["config_digest"].as_str().unwrap().to_string());
                }
            }
        }
    }
    starts
}

/// `--log-dir` stands in for `KVH_LOG_DIR`, whose spellings of one path are one policy with
/// one digest (README.md): a run given `DIR/./` by the flag and one given `DIR` by the
/// variable log the same digest, which `kvh evidence --approved-config` compares.
#[test]
fn a_log_dir_given_by_the_flag_is_the_policy_the_same_directory_in_kvh_log_dir_makes() {
    let tmp = tempfile::tempdir().unwrap();
    let log = tmp.path().join("log");
    let mut spelled = log.clone().into_os_string();
    spelled.push("/./");
    let (code, out, err) = run(host_demo(1, 2).arg("--log-dir").arg(&spelled));
    assert_eq!(code, 0, "kvh demo --log-dir failed:\n{out}\n{err}");
    let (code, out, err) = run(host_demo(1, 2).env("KVH_LOG_DIR", &log));
    assert_eq!(code, 0, "kvh demo with KVH_LOG_DIR failed:\n{out}\n{err}");
    let starts = start_digests(&log);
    assert_eq!(starts.len(), 2, "two runs, two start records: {starts:?}");
    assert_eq!(
        starts[0], starts[1],
        "the same log directory, given by --log-dir and by KVH_LOG_DIR, made two policies"
    );
}

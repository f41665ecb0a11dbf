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

    let mut starts = Vec::new();
    for entry in std::fs::read_dir(&log).unwrap() {
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

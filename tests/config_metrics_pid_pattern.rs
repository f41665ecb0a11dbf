//! `{pid}` in `KVH_METRICS_FILE`: `kvh config` and `kvh gate` read the same environment and
//! must agree on what a per-process pattern is. `kvh gate` takes `{pid}` in the file name
//! only (the exporter creates files, not directories, so a directory named after each
//! process's id never exists in advance). A policy `kvh config` calls valid must be one the
//! readiness gate of the same environment can judge.

#[path = "cli_common/mod.rs"]
mod cli_common;

use std::time::SystemTime;

use cli_common::{kvh, run, runtime_stats};
use kvhygiene::metrics::{encode, ExporterStats};
use kvhygiene::stats::PoolCounters;

#[test]
fn a_pid_placeholder_in_a_directory_is_refused_by_config_or_judged_by_the_gate() {
    let dir = tempfile::tempdir().unwrap();
    let pattern = dir.path().join("{pid}").join("kvh.prom");
    // The file this process would write under that pattern, healthy and fresh.
    let own = dir.path().join(std::process::id().to_string());
    std::fs::create_dir(&own).unwrap();
    let text = encode(
        &runtime_stats(PoolCounters::default()),
        &ExporterStats::default(),
        SystemTime::now(),
    );
    std::fs::write(own.join("kvh.prom"), text).unwrap();
    let env = |c: &mut std::process::Command| {
        c.env_remove("FORENSIC_HMAC_SECRET")
            .env("KVH_METRICS_FILE", &pattern);
    };
    let mut config = kvh();
    env(&mut config);
    let (config_code, config_out, config_err) = run(config.arg("config"));
    let mut gate = kvh();
    env(&mut gate);
    let (gate_code, gate_out, gate_err) = run(gate.arg("gate"));
    assert!(
        config_code == 2 || gate_code == 0,
        "kvh config accepts KVH_METRICS_FILE={} (exit {config_code}) but kvh gate in the same \
         environment cannot judge it (exit {gate_code}):\nconfig: {config_err}\ngate: \
         {gate_out}{gate_err}",
        pattern.display()
    );
    if config_code == 2 {
        assert!(
            config_err.contains("KVH_METRICS_FILE"),
            "{config_out}{config_err}"
        );
    }
}

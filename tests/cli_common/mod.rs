//! Running the built `kvh` in the CLI tests (tests/metrics_cli.rs, tests/gate_cli.rs), and the
//! statistics a process's metrics snapshot is encoded from.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output};

use kvhygiene::anomaly::AnomalyStats;
use kvhygiene::forensic::LogStats;
use kvhygiene::stats::{PoolCounters, Stats};

/// `kvh demo` on the host backend with `tenants` tenants of `requests` requests each (more
/// arguments may follow).
pub fn host_demo(tenants: u32, requests: u32) -> Command {
    let mut c = kvh();
    c.args(["demo", "--backend", "host", "--tenants"])
        .arg(tenants.to_string())
        .arg("--requests")
        .arg(requests.to_string());
    c
}

/// Every verb of `kvh`, as its help lists them.
#[allow(dead_code)]
pub const VERBS: &[&str] = &[
    "demo",
    "verify-log",
    "keygen",
    "prune-log",
    "evidence",
    "tail-log",
    "metrics",
    "serve-metrics",
    "gate",
    "config",
    "preflight",
    "completions",
];

/// The built `kvh`, with no `KVH_*` variable of the test's environment: the verbs read
/// `KVH_METRICS_FILE` when no file is named, so each test starts from a clean slate.
pub fn kvh() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kvh"));
    for (k, _) in std::env::vars() {
        if k.starts_with("KVH_") {
            c.env_remove(k);
        }
    }
    c
}

/// A copy of the built `kvh` in `dir` (mode 0755), for a test that runs it as another uid:
/// the build tree may lie under a directory that uid cannot enter, which would decide the
/// test instead of the code under test.
pub fn kvh_copy_in(dir: &Path) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let copy = dir.join("kvh");
    std::fs::copy(env!("CARGO_BIN_EXE_kvh"), &copy).expect("copy kvh");
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).expect("chmod kvh");
    copy
}

/// Exit code (-1 when killed by a signal), stdout and stderr.
pub fn run(cmd: &mut Command) -> (i32, String, String) {
    let Output {
        status,
        stdout,
        stderr,
    } = cmd.output().unwrap();
    (
        status.code().unwrap_or(-1),
        String::from_utf8_lossy(&stdout).into_owned(),
        String::from_utf8_lossy(&stderr).into_owned(),
    )
}

/// Stats as the runtime exports them with `KVH_LOG_DIR` unset and `KVH_ANOMALY=off`: the
/// forensic log's and the anomaly detector's statistics included (both disabled).
/// The series of every security check (`kvh metrics --fail-on-security`, `kvh gate`), named
/// here rather than taken from the library's own list, so that a series dropped from that
/// list fails the tests that use this one.
pub const SECURITY_SERIES: [&str; 6] = [
    "kvh_verifications_total{result=\"failed\"}",
    "kvh_residue_detected_total",
    "kvh_rescrub_failures_total",
    "kvh_kv_failed_blocks_total",
    "kvh_log_records_lost_total",
    "kvh_async_error",
];

pub fn runtime_stats(pool: PoolCounters) -> Stats {
    let mut stats = Stats::merge("host".into(), &[pool], None);
    stats.log = serde_json::to_value(LogStats::disabled()).ok();
    stats.anomaly = serde_json::to_value(AnomalyStats::disabled()).ok();
    stats
}

/// Every record of every chain file (`*.jsonl`) in the log directory `dir`, in file and line
/// order.
pub fn log_records(dir: &Path) -> Vec<serde_json::Value> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
        .collect();
    files.sort();
    files
        .iter()
        .flat_map(|f| {
            std::fs::read_to_string(f)
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect::<Vec<_>>()
        })
        .collect()
}

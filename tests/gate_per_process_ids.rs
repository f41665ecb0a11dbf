//! `kvh gate` with a per-process pattern (`{pid}` in the file name): a file is judged only
//! when the id in its name is a live process of the probe's pid namespace; the file of a
//! process that is gone is listed, not judged.

#[path = "cli_common/mod.rs"]
mod cli_common;

use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, SystemTime};

use cli_common::{kvh, run, runtime_stats};
use kvhygiene::metrics::per_process::ProcessIdentity;
use kvhygiene::metrics::{encode, encode_process, ExporterStats};
use kvhygiene::stats::PoolCounters;

fn snapshot(path: &Path, set: impl FnOnce(&mut PoolCounters)) {
    let mut pool = PoolCounters::default();
    pool.counters.allocations = 5;
    set(&mut pool);
    let text = encode(
        &runtime_stats(pool),
        &ExporterStats::default(),
        SystemTime::now(),
    );
    std::fs::write(path, text).unwrap();
}

/// The id of a thread is not a process id: a worker that ended left its file, and its number
/// now names a thread of another process (Linux draws process and thread ids from one
/// space). That file belongs to a process that is gone: it is listed, not judged, and the
/// live process's healthy snapshot is admitted.
#[test]
fn a_file_named_with_the_id_of_a_thread_is_not_judged_as_a_live_process() {
    let files = ProcessFiles::new();
    let (pattern, file) = (files.pattern(), |pid: u32| files.of(pid));
    let live = std::process::id();
    // A thread of this process, alive while the gate runs.
    let (tid_tx, tid_rx) = mpsc::channel();
    let (stop_tx, stop_rx) = mpsc::channel::<()>();
    let thread = std::thread::spawn(move || {
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() } as u32;
        tid_tx.send(tid).unwrap();
        let _ = stop_rx.recv_timeout(Duration::from_secs(60));
    });
    let tid = tid_rx.recv().unwrap();
    assert_ne!(tid, live);
    snapshot(&file(live), |_| {});
    // The ended worker's last snapshot showed a failure.
    snapshot(&file(tid), |p| p.counters.verifications_failed = 1);
    let (code, out, err) = gate_json(&pattern);
    stop_tx.send(()).unwrap();
    thread.join().unwrap();
    let judged = judged_pids(&out);
    assert!(
        !judged.contains(&u64::from(tid)),
        "{tid}, the id of a thread of process {live}, was judged as a live process: {out}{err}"
    );
    assert_eq!(code, 0, "{out}{err}");
}

/// Process ids are reused: a worker that ended long ago left its file, and its number now
/// names another process, started after that file was last written. The file cannot be that
/// process's snapshot (its writer ended before the process began): it belongs to a process
/// that is gone, and is listed, not judged, as the file of any other ended process is.
#[test]
fn a_file_last_written_before_its_pid_s_process_started_is_not_judged() {
    let files = ProcessFiles::new();
    let (pattern, file) = (files.pattern(), |pid: u32| files.of(pid));
    let live = std::process::id();
    snapshot(&file(live), |_| {});
    // The ended worker's last snapshot, an hour old, showed a failure; its pid is now held
    // by a process started just now.
    let reuser = Sleeper::start();
    let reused = reuser.0.id();
    let hour_ago = SystemTime::now() - Duration::from_secs(3600);
    let text = encode(
        &runtime_stats({
            let mut pool = PoolCounters::default();
            pool.counters.verifications_failed = 1;
            pool
        }),
        &ExporterStats::default(),
        hour_ago,
    );
    std::fs::write(file(reused), text).unwrap();
    std::fs::File::options()
        .write(true)
        .open(file(reused))
        .unwrap()
        .set_modified(hour_ago)
        .unwrap();
    let (code, out, err) = gate_json(&pattern);
    let judged = judged_pids(&out);
    assert!(
        !judged.contains(&u64::from(reused)),
        "process {reused}, started after kvh-{reused}.prom was last written, was judged by \
         that file: {out}{err}"
    );
    assert_eq!(code, 0, "{out}{err}");
}

/// A live worker's file as its writer wrote it (`pid` label, `identity`), showing a failed
/// verification, dated now, last modified `modified`.
fn process_file_failing(path: &Path, pid: u32, identity: &ProcessIdentity, modified: SystemTime) {
    let mut pool = PoolCounters::default();
    pool.counters.allocations = 5;
    pool.counters.verifications_failed = 1;
    let text = encode_process(
        &runtime_stats(pool),
        &ExporterStats::default(),
        SystemTime::now(),
        &pid.to_string(),
        Some(identity),
    );
    std::fs::write(path, text).unwrap();
    std::fs::File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_modified(modified)
        .unwrap();
}

/// The wall clock may be stepped forward after a worker's last write (an NTP correction, a VM
/// resumed): its file then seems written before the worker started. The identity in the file
/// (boot and start in clock ticks, which no clock step moves) says it is the worker's: it is
/// judged (here it fails, so the gate evicts), not skipped as the file of an ended process.
#[test]
fn a_file_whose_writer_identity_matches_is_judged_whatever_its_modification_time() {
    let files = ProcessFiles::new();
    let (pattern, file) = (files.pattern(), |pid: u32| files.of(pid));
    let worker = Sleeper::start();
    let pid = worker.0.id();
    let identity = ProcessIdentity::of(pid).expect("the worker's identity, from /proc");
    let hour_ago = SystemTime::now() - Duration::from_secs(3600);
    process_file_failing(&file(pid), pid, &identity, hour_ago);
    let (code, out, err) = gate_json(&pattern);
    assert!(
        judged_pids(&out).contains(&u64::from(pid)),
        "the worker's own file (its identity) was not judged: {out}{err}"
    );
    assert_eq!(
        code, 1,
        "the worker's failed verification evicts: {out}{err}"
    );
}

/// A file whose writer identity is not that of the process now holding its id was written by
/// an ended process, however recent its modification time: listed, not judged.
#[test]
fn a_file_whose_writer_identity_differs_is_not_judged_however_recent() {
    let files = ProcessFiles::new();
    let (pattern, file) = (files.pattern(), |pid: u32| files.of(pid));
    let live = std::process::id();
    snapshot(&file(live), |_| {});
    let reuser = Sleeper::start();
    let reused = reuser.0.id();
    let now = ProcessIdentity::of(reused).expect("the process's identity, from /proc");
    let earlier = ProcessIdentity {
        start_ticks: now.start_ticks.saturating_sub(1),
        ..now.clone()
    };
    let other_boot = ProcessIdentity {
        boot_id: "00000000-0000-0000-0000-000000000000".into(),
        ..now
    };
    for ended in [earlier, other_boot] {
        process_file_failing(&file(reused), reused, &ended, SystemTime::now());
        let (code, out, err) = gate_json(&pattern);
        assert!(
            !judged_pids(&out).contains(&u64::from(reused)),
            "the file of {ended:?} was judged as process {reused}'s: {out}{err}"
        );
        assert_eq!(code, 0, "{out}{err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
        assert_eq!(v["gone"][0]["pid"], reused, "{out}");
        // Named as an earlier holder's: the process with the id lives.
        assert_eq!(v["gone"][0]["earlier_holder"], true, "{out}");
        let (_, text, _) = run(kvh().args(["gate", "--metrics-file"]).arg(&pattern));
        assert!(
            text.contains(&format!("an earlier holder of process id {reused}"))
                && !text.contains(&format!("process {reused} is gone")),
            "{text}"
        );
    }
}

/// `KVH_METRICS_FILE` takes `{pid}` anywhere in the file name, also before a digit
/// (`kvh-{pid}0.prom`): the writer names its file with its id followed by that digit, and the
/// readers find the file of each live process of that pattern too.
#[test]
fn a_pattern_whose_pid_is_followed_by_a_digit_finds_the_live_process_s_file() {
    let dir = tempfile::tempdir().unwrap();
    let pattern = dir.path().join("kvh-{pid}0.prom");
    let live = std::process::id();
    let config = kvhygiene::config::MetricsConfig {
        file: Some(pattern.clone()),
        ..Default::default()
    };
    let written = config.file_for(live).unwrap();
    assert_eq!(written, dir.path().join(format!("kvh-{live}0.prom")));
    snapshot(&written, |_| {});
    let (code, out, err) = gate_json(&pattern);
    assert_eq!(code, 0, "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
    assert_eq!(v["processes"][0]["pid"], live, "{out}");
}

/// A directory of per-process metrics files, `kvh-{pid}.prom`.
struct ProcessFiles(tempfile::TempDir);

impl ProcessFiles {
    fn new() -> Self {
        ProcessFiles(tempfile::tempdir().unwrap())
    }

    /// The pattern the verbs are given.
    fn pattern(&self) -> std::path::PathBuf {
        self.0.path().join("kvh-{pid}.prom")
    }

    /// The file of process `pid`.
    fn of(&self, pid: u32) -> std::path::PathBuf {
        self.0.path().join(format!("kvh-{pid}.prom"))
    }
}

/// A process holding a pid while a test runs: `sleep`, killed and reaped when dropped.
struct Sleeper(std::process::Child);

impl Sleeper {
    fn start() -> Self {
        Sleeper(
            std::process::Command::new("sleep")
                .arg("60")
                .spawn()
                .unwrap(),
        )
    }
}

impl Drop for Sleeper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `kvh gate --json --metrics-file PATTERN`: exit status, stdout, stderr.
fn gate_json(pattern: &Path) -> (i32, String, String) {
    run(kvh()
        .args(["gate", "--json", "--metrics-file"])
        .arg(pattern))
}

/// The pids `kvh gate --json` judged.
fn judged_pids(out: &str) -> Vec<u64> {
    let v: serde_json::Value = serde_json::from_str(out).unwrap_or_default();
    v["processes"]
        .as_array()
        .map(|a| a.iter().filter_map(|p| p["pid"].as_u64()).collect())
        .unwrap_or_default()
}

//! `kvh gate` with a per-process pattern (`{pid}` in the file name): a worker that has exited
//! but has not been reaped yet (a zombie: its parent has not waited for it, or it was
//! reparented to a PID 1 that never reaps) is a process that is gone. Its file is listed,
//! not judged, like the file of any other process that ended.

#[path = "cli_common/mod.rs"]
mod cli_common;

use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use cli_common::{kvh, run, runtime_stats};
use kvhygiene::metrics::{encode, ExporterStats};
use kvhygiene::stats::PoolCounters;

fn snapshot(path: &Path, age: Duration, set: impl FnOnce(&mut PoolCounters)) {
    let mut pool = PoolCounters::default();
    pool.counters.allocations = 5;
    set(&mut pool);
    let text = encode(
        &runtime_stats(pool),
        &ExporterStats::default(),
        SystemTime::now() - age,
    );
    std::fs::write(path, text).unwrap();
}

/// The state letter of `/proc/PID/status` (`Z` for a zombie).
fn state(pid: u32) -> Option<char> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("State:"))
        .and_then(|s| s.trim().chars().next())
}

#[test]
fn the_file_of_a_worker_that_exited_but_was_not_reaped_is_not_judged() {
    let dir = tempfile::tempdir().unwrap();
    let pattern = dir.path().join("kvh-{pid}.prom");
    let file = |pid: u32| dir.path().join(format!("kvh-{pid}.prom"));
    let live = std::process::id();
    // A worker that ended: exited, not waited for yet.
    let mut worker = std::process::Command::new("true").spawn().unwrap();
    let gone = worker.id();
    let deadline = Instant::now() + Duration::from_secs(30);
    while state(gone) != Some('Z') {
        assert!(Instant::now() < deadline, "the worker did not exit");
        std::thread::sleep(Duration::from_millis(10));
    }
    snapshot(&file(live), Duration::ZERO, |_| {});
    // Its last snapshot, written long ago, showed a failure.
    snapshot(&file(gone), Duration::from_secs(3600), |p| {
        p.counters.verifications_failed = 1
    });
    let (code, out, err) = run(kvh()
        .args(["gate", "--json", "--metrics-file"])
        .arg(&pattern));
    worker.wait().unwrap();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
    let judged: Vec<u64> = v["processes"]
        .as_array()
        .map(|a| a.iter().filter_map(|p| p["pid"].as_u64()).collect())
        .unwrap_or_default();
    assert!(
        !judged.contains(&u64::from(gone)),
        "process {gone} had exited (a zombie) and was judged as a live process: {out}{err}"
    );
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(v["gone"][0]["pid"], gone, "{out}");
}

/// A process whose first thread has returned (`pthread_exit` in `main`) while its other
/// threads keep running shows `State: Z` in `/proc/PID/status` for its thread group leader,
/// yet it is a running process: its threads still allocate and export. Its file is judged
/// like that of any other live process.
#[test]
fn a_running_process_whose_main_thread_exited_is_judged() {
    let dir = tempfile::tempdir().unwrap();
    let pattern = dir.path().join("kvh-{pid}.prom");
    let file = |pid: u32| dir.path().join(format!("kvh-{pid}.prom"));
    let me = std::process::id();
    // The main thread ends; a second thread runs on for a minute.
    let mut worker = std::process::Command::new("python3")
        .args([
            "-c",
            "import ctypes, threading, time\n\
             threading.Thread(target=lambda: time.sleep(60)).start()\n\
             ctypes.CDLL(None).pthread_exit(None)\n",
        ])
        .spawn()
        .unwrap();
    let pid = worker.id();
    let threads =
        |pid: u32| std::fs::read_dir(format!("/proc/{pid}/task")).map_or(0, |d| d.count());
    let deadline = Instant::now() + Duration::from_secs(30);
    while !(state(pid) == Some('Z') && threads(pid) >= 2) {
        assert!(
            Instant::now() < deadline,
            "the worker's main thread did not exit while another ran"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    snapshot(&file(me), Duration::ZERO, |_| {});
    // The running worker's current snapshot shows a failed verification.
    snapshot(&file(pid), Duration::ZERO, |p| {
        p.counters.verifications_failed = 1
    });
    let (code, out, err) = run(kvh()
        .args(["gate", "--json", "--metrics-file"])
        .arg(&pattern));
    let (mcode, mout, merr) = run(kvh()
        .args(["metrics", "--fail-on-security", "--file"])
        .arg(&pattern));
    let still_running = threads(pid) >= 2;
    let _ = worker.kill();
    let _ = worker.wait();
    assert!(still_running, "the worker ended before the checks ran");
    assert_eq!(
        code, 1,
        "process {pid} runs (its main thread exited, another runs) and its snapshot shows a \
         failed verification, yet the gate did not evict: {out}{err}"
    );
    assert_eq!(mcode, 1, "kvh metrics --fail-on-security: {mout}{merr}");
}

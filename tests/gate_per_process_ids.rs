//! `kvh gate` with a per-process pattern (`{pid}` in the file name): a file is judged only
//! when the id in its name is a live process of the probe's pid namespace; the file of a
//! process that is gone is listed, not judged.

#[path = "cli_common/mod.rs"]
mod cli_common;

use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, SystemTime};

use cli_common::{kvh, run, runtime_stats};
use kvhygiene::metrics::{encode, ExporterStats};
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
    let dir = tempfile::tempdir().unwrap();
    let pattern = dir.path().join("kvh-{pid}.prom");
    let file = |pid: u32| dir.path().join(format!("kvh-{pid}.prom"));
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
    let (code, out, err) = run(kvh()
        .args(["gate", "--json", "--metrics-file"])
        .arg(&pattern));
    stop_tx.send(()).unwrap();
    thread.join().unwrap();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
    let judged: Vec<u64> = v["processes"]
        .as_array()
        .map(|a| a.iter().filter_map(|p| p["pid"].as_u64()).collect())
        .unwrap_or_default();
    assert!(
        !judged.contains(&u64::from(tid)),
        "{tid}, the id of a thread of process {live}, was judged as a live process: {out}{err}"
    );
    assert_eq!(code, 0, "{out}{err}");
}

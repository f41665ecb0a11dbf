//! Process exit while `kvh_shutdown` runs on another thread: the metrics file is written
//! "every interval and at exit" (README, `KVH_METRICS_FILE`). The exit handler leaves the last
//! write to a shutdown under way, so that shutdown's snapshot must still reach the file before
//! the process ends: the file then holds the counters as of the shutdown, not those of the
//! last periodic write.
//!
//! Runs in child processes of this test binary, on the host backend.

use std::path::PathBuf;
use std::process::Command;

use kvhygiene::ffi;

const CASE: &str = "FFI_EXIT_DURING_SHUTDOWN_METRICS_CASE";

fn in_child() -> bool {
    std::env::var_os(CASE).is_some()
}

fn child(test: &str, env: &[(&str, &str)]) -> (bool, String, String) {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env(CASE, "1")
        .env("KVH_BACKEND", "host");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "kvh-exit-shutdown-metrics-{name}-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// One refused free (a double free), so that the counters differ from those of the first
/// periodic write, made at start-up.
fn one_double_free() {
    let p = ffi::kvh_malloc(4096, 0, std::ptr::null_mut());
    assert!(!p.is_null());
    ffi::kvh_free(p, 4096, 0, std::ptr::null_mut());
    assert_eq!(ffi::kvh_synchronize(), 0);
    ffi::kvh_free(p, 4096, 0, std::ptr::null_mut());
}

/// The `kvh_invalid_frees_total` line of the metrics file.
fn invalid_frees_line(metrics: &std::path::Path) -> String {
    std::fs::read_to_string(metrics)
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("kvh_invalid_frees_total"))
        .unwrap_or("(none)")
        .to_string()
}

/// `kvh_shutdown` on another thread has written the log's `stop` record; the main thread then
/// calls `exit`. The metrics file must hold the counters as of the shutdown (one invalid
/// free), whichever of the two threads writes it.
#[test]
fn exit_during_kvh_shutdown_on_another_thread_leaves_the_final_metrics_snapshot() {
    let name = "exit_during_kvh_shutdown_on_another_thread_leaves_the_final_metrics_snapshot";
    if in_child() {
        assert_eq!(ffi::kvh_init(), 0);
        one_double_free();
        let logs = PathBuf::from(std::env::var("KVH_LOG_DIR").unwrap());
        std::thread::spawn(|| ffi::kvh_shutdown());
        // The shutdown is under way: its stop record is in the log.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let stopped = std::fs::read_dir(&logs)
                .into_iter()
                .flatten()
                .filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok())
                .any(|t| t.contains("\"kind\":\"stop\""));
            if stopped {
                break;
            }
            if std::time::Instant::now() > deadline {
                println!("SETUP-FAILED: no stop record");
                std::process::exit(3);
            }
            std::hint::spin_loop();
        }
        println!("EXITING");
        std::process::exit(0);
    }
    for run in 0..5 {
        let dir = scratch(&format!("run{run}"));
        let logs = dir.join("logs");
        let metrics = dir.join("kvh.prom");
        let (ok, stdout, stderr) = child(
            name,
            &[
                ("KVH_OOM", "null"),
                ("KVH_LOG_DIR", logs.to_str().unwrap()),
                ("KVH_METRICS_FILE", metrics.to_str().unwrap()),
                // No periodic write after the first: only the final one can show the free.
                ("KVH_METRICS_INTERVAL_MS", "3600000"),
            ],
        );
        let line = invalid_frees_line(&metrics);
        let _ = std::fs::remove_dir_all(&dir);
        assert!(
            ok && stdout.contains("EXITING"),
            "the case did not run:\n{stdout}\n{stderr}"
        );
        assert_eq!(
            line, "kvh_invalid_frees_total 1",
            "run {run}: the process exited while kvh_shutdown ran on another thread, and the \
             metrics file kept the start-up snapshot: neither the shutdown nor the exit wrote \
             the final one"
        );
    }
}

/// The same process, with `kvh_shutdown` finished before `exit`: the final snapshot is there.
#[test]
fn exit_after_kvh_shutdown_leaves_the_final_metrics_snapshot() {
    let name = "exit_after_kvh_shutdown_leaves_the_final_metrics_snapshot";
    if in_child() {
        assert_eq!(ffi::kvh_init(), 0);
        one_double_free();
        std::thread::spawn(|| ffi::kvh_shutdown()).join().unwrap();
        println!("EXITING");
        std::process::exit(0);
    }
    let dir = scratch("after");
    let logs = dir.join("logs");
    let metrics = dir.join("kvh.prom");
    let (ok, stdout, stderr) = child(
        name,
        &[
            ("KVH_OOM", "null"),
            ("KVH_LOG_DIR", logs.to_str().unwrap()),
            ("KVH_METRICS_FILE", metrics.to_str().unwrap()),
            ("KVH_METRICS_INTERVAL_MS", "3600000"),
        ],
    );
    let line = invalid_frees_line(&metrics);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(ok && stdout.contains("EXITING"), "{stdout}\n{stderr}");
    assert_eq!(line, "kvh_invalid_frees_total 1");
}

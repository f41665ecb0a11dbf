//! Process exit while a thread is inside a driver call that the pool makes under its lock (a
//! scrub launch). The exit handler makes no driver call and must not wait on the device
//! (invariant 6), and with a forensic log configured it still writes the log's `stop` record
//! and lets `exit()` end the process:
//! - when `exit()` is called on another thread while the launch hangs (a hung device);
//! - when a signal handler on the launching thread calls `exit()` (a common SIGTERM handler).
//!
//! Runs in child processes of this test binary, on tests/fake_cuda/fake_libcuda.cpp loaded as
//! `libcuda.so.1`, whose `cuLaunchKernel` runs the case's hook.

#[path = "cli_common/mod.rs"]
mod cli_common;
#[path = "fake_cuda/mod.rs"]
mod fake_cuda;
#[path = "skip/mod.rs"]
mod skip;

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Marker telling the child which case to run (not a `KVH_` variable: the configuration
/// refuses unknown ones).
const CASE: &str = "FFI_EXIT_HOLDING_POOL_LOCK_CASE";

static IN_LAUNCH: AtomicBool = AtomicBool::new(false);

/// The device hangs: the launch never returns.
extern "C" fn hung_launch() {
    IN_LAUNCH.store(true, Ordering::SeqCst);
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Allocates one block on the fake driver, then frees it with `hook` armed on the next
/// `cuLaunchKernel`: with `KVH_BATCH_SIZE=1` the free submits its scrub at once, from the
/// freeing thread, under the pool lock.
fn free_one_block_with_launch_hook(hook: extern "C" fn()) {
    use kvhygiene::ffi::{kvh_free, kvh_malloc};
    let p = kvh_malloc(4096, 0, std::ptr::null_mut());
    assert!(!p.is_null(), "kvh_malloc on the fake driver failed");
    // SAFETY: the stand-in driver the runtime already loaded (same soname, same instance).
    let lib = unsafe { libloading::Library::new("libcuda.so.1") }.expect("fake driver");
    // SAFETY: the stand-in's switch: `void(void (*)(void))`.
    unsafe {
        lib.get::<unsafe extern "C" fn(extern "C" fn())>(b"fake_cuda_on_launch\0")
            .expect("hook")(hook);
    }
    kvh_free(p, 4096, 0, std::ptr::null_mut());
}

fn child_exit_while_another_thread_hangs_in_a_launch() {
    std::thread::spawn(|| free_one_block_with_launch_hook(hung_launch));
    let deadline = Instant::now() + Duration::from_secs(20);
    while !IN_LAUNCH.load(Ordering::SeqCst) {
        if Instant::now() > deadline {
            println!("SETUP-FAILED: the free never launched its scrub");
            std::process::exit(3);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    println!("EXITING");
    std::process::exit(0);
}

fn child_exit_from_a_signal_handler_inside_a_launch() {
    // SAFETY: installs a plain C handler for SIGTERM.
    unsafe {
        libc::signal(
            libc::SIGTERM,
            fake_cuda::exit_on_sigterm as extern "C" fn(libc::c_int) as libc::sighandler_t,
        )
    };
    free_one_block_with_launch_hook(fake_cuda::sigterm_arrives);
    println!("SETUP-FAILED: kvh_free returned; the SIGTERM handler did not end the process");
    std::process::exit(3);
}

/// The case `name` on the stand-in, scrubbing each free at once (`KVH_BATCH_SIZE=1`), with a
/// forensic log.
fn check_exited(name: &str, what: &str) {
    let logs = tempfile::tempdir().unwrap();
    let log_dir = logs.path().join("log");
    let env = [
        ("KVH_BATCH_SIZE", std::ffi::OsStr::new("1")),
        ("KVH_LOG_DIR", log_dir.as_os_str()),
    ];
    if fake_cuda::check_case_exited(CASE, name, what, &env) {
        let kinds = record_kinds(&log_dir);
        assert!(
            kinds.iter().any(|k| k == "stop"),
            "the exit wrote no stop record: {kinds:?}"
        );
    }
}

#[test]
fn exit_ends_the_process_while_another_thread_hangs_in_a_scrub_launch() {
    let name = "exit_ends_the_process_while_another_thread_hangs_in_a_scrub_launch";
    if std::env::var(CASE).as_deref() == Ok(name) {
        return child_exit_while_another_thread_hangs_in_a_launch();
    }
    check_exited(
        name,
        "on the main thread, with a forensic log, while another thread's scrub launch hung",
    );
}

#[test]
fn exit_from_a_signal_handler_interrupting_a_scrub_launch_ends_the_process() {
    let name = "exit_from_a_signal_handler_interrupting_a_scrub_launch_ends_the_process";
    if std::env::var(CASE).as_deref() == Ok(name) {
        return child_exit_from_a_signal_handler_inside_a_launch();
    }
    check_exited(
        name,
        "by a SIGTERM handler on the thread launching a scrub, with a forensic log",
    );
}

/// Another thread of the process keeps allocating and freeing (a server's workers still
/// serving as `main` returns): each call holds a pool lock for a moment only (the scrub of
/// a freed block is submitted under it, at once with `KVH_BATCH_SIZE=1`).
fn child_exit_while_another_thread_allocates() {
    use kvhygiene::ffi::{kvh_free, kvh_init, kvh_malloc};
    const BLOCK: isize = 4096;
    assert_eq!(kvh_init(), 0, "kvh_init on the host backend failed");
    let busy = std::sync::Arc::new(AtomicBool::new(false));
    for _ in 0..4 {
        let running = busy.clone();
        std::thread::spawn(move || loop {
            let p = kvh_malloc(BLOCK, 0, std::ptr::null_mut());
            if !p.is_null() {
                kvh_free(p, BLOCK, 0, std::ptr::null_mut());
            }
            running.store(true, Ordering::SeqCst);
        });
    }
    while !busy.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(1));
    }
    std::thread::sleep(Duration::from_millis(50));
    println!("EXITING");
    std::process::exit(0);
}

/// The kinds of the records in the log directory `dir`, in file and line order.
fn record_kinds(dir: &Path) -> Vec<String> {
    cli_common::log_records(dir)
        .iter()
        .map(|v| v["kind"].as_str().unwrap_or("").to_string())
        .collect()
}

/// A lock held for a moment by a thread that is still running (not one stuck in a driver
/// call) is released at once: the exit handler still writes the process's final `summary`
/// before the `stop` record, as a process that exits with its allocator in use always did.
/// The evidence report's activity figures are each process's last summary, and a process
/// that ran for less than one summary interval has no other.
#[test]
fn exit_while_another_thread_allocates_still_writes_the_final_summary() {
    let name = "exit_while_another_thread_allocates_still_writes_the_final_summary";
    if std::env::var(CASE).as_deref() == Ok(name) {
        return child_exit_while_another_thread_allocates();
    }
    let mut without_summary = 0;
    let runs = 20;
    let mut last = Vec::new();
    for _ in 0..runs {
        let logs = tempfile::tempdir().unwrap();
        let log_dir = logs.path().join("log");
        let out = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", name, "--nocapture", "--test-threads=1"])
            .env(CASE, name)
            .env("KVH_BACKEND", "host")
            .env("KVH_OOM", "null")
            .env("KVH_BATCH_SIZE", "1")
            .env("KVH_LOG_DIR", &log_dir)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("EXITING"),
            "the case did not run ({}):\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let kinds = record_kinds(&log_dir);
        let stop = kinds.iter().position(|k| k == "stop");
        assert!(stop.is_some(), "no stop record: {kinds:?}");
        if !kinds[..stop.unwrap()].iter().any(|k| k == "summary") {
            without_summary += 1;
        }
        last = kinds;
    }
    assert_eq!(
        without_summary, 0,
        "{without_summary} of {runs} processes that exited while another thread allocated \
         closed their log without a summary (last: {last:?})"
    );
}

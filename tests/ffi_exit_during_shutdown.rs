//! Process exit while `kvh_shutdown` is under way. The exit handler makes no driver call and
//! must not wait on the device (invariant 6; docs/cuda.md, "Exit": a wait "blocked on a hung
//! device is not waited for"), and `exit()` ends the process:
//! - when it is called on another thread while the shutdown waits for a scrub on a hung
//!   device;
//! - when it is called on the shutting-down thread itself, by a signal handler (a common
//!   SIGTERM handler calls `exit`) that interrupts the shutdown while it waits for a scrub.
//!
//! Runs in child processes of this test binary, on tests/fake_cuda/fake_libcuda.cpp loaded as
//! `libcuda.so.1`, whose `cuEventSynchronize` runs the case's hook.

#[path = "fake_cuda/mod.rs"]
mod fake_cuda;
#[path = "skip/mod.rs"]
mod skip;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Marker telling the child which case to run (not a `KVH_` variable: the configuration
/// refuses unknown ones).
const CASE: &str = "FFI_EXIT_DURING_SHUTDOWN_CASE";

static IN_SYNCHRONIZE: AtomicBool = AtomicBool::new(false);

/// The device hangs: the synchronisation never returns.
extern "C" fn hung_device() {
    IN_SYNCHRONIZE.store(true, Ordering::SeqCst);
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Allocates and frees one block on the fake driver (its scrub stays pending, so a shutdown
/// waits for it), with `hook` armed on the next `cuEventSynchronize`.
fn free_one_block_with_hook(hook: extern "C" fn()) {
    use kvhygiene::ffi::{kvh_free, kvh_malloc};
    let p = kvh_malloc(4096, 0, std::ptr::null_mut());
    assert!(!p.is_null(), "kvh_malloc on the fake driver failed");
    // SAFETY: the stand-in driver the runtime already loaded (same soname, same instance).
    let lib = unsafe { libloading::Library::new("libcuda.so.1") }.expect("fake driver");
    // SAFETY: the stand-in's switches: `void(int)` and `void(void (*)(void))`.
    unsafe {
        // Polls report the scrub as not done yet, so the shutdown's drain waits for it.
        lib.get::<unsafe extern "C" fn(i32)>(b"fake_cuda_set_pending_queries\0")
            .expect("switch")(1_000_000);
        lib.get::<unsafe extern "C" fn(extern "C" fn())>(b"fake_cuda_on_event_synchronize\0")
            .expect("hook")(hook);
    }
    kvh_free(p, 4096, 0, std::ptr::null_mut());
}

fn child_exit_on_another_thread() {
    free_one_block_with_hook(hung_device);
    std::thread::spawn(|| kvhygiene::ffi::kvh_shutdown());
    let deadline = Instant::now() + Duration::from_secs(20);
    while !IN_SYNCHRONIZE.load(Ordering::SeqCst) {
        if Instant::now() > deadline {
            println!("SETUP-FAILED: kvh_shutdown never waited for the scrub");
            std::process::exit(3);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    println!("EXITING");
    std::process::exit(0);
}

fn child_exit_from_a_signal_handler() {
    // SAFETY: installs a plain C handler for SIGTERM.
    unsafe {
        libc::signal(
            libc::SIGTERM,
            fake_cuda::exit_on_sigterm as extern "C" fn(libc::c_int) as libc::sighandler_t,
        )
    };
    free_one_block_with_hook(fake_cuda::sigterm_arrives);
    kvhygiene::ffi::kvh_shutdown();
    println!("SETUP-FAILED: kvh_shutdown returned without waiting for the scrub");
    std::process::exit(3);
}

fn check_exited(name: &str, what: &str) {
    fake_cuda::check_case_exited(CASE, name, what, &[]);
}

#[test]
fn exit_ends_the_process_while_kvh_shutdown_waits_on_a_hung_device() {
    let name = "exit_ends_the_process_while_kvh_shutdown_waits_on_a_hung_device";
    if std::env::var(CASE).as_deref() == Ok(name) {
        return child_exit_on_another_thread();
    }
    check_exited(
        name,
        "on the main thread, while kvh_shutdown on another thread waited for a scrub on a \
         hung device",
    );
}

#[test]
fn exit_from_a_signal_handler_interrupting_kvh_shutdown_ends_the_process() {
    let name = "exit_from_a_signal_handler_interrupting_kvh_shutdown_ends_the_process";
    if std::env::var(CASE).as_deref() == Ok(name) {
        return child_exit_from_a_signal_handler();
    }
    check_exited(
        name,
        "by a SIGTERM handler on the thread running kvh_shutdown, while it waited for a scrub",
    );
}

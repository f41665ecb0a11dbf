//! The C ABI called while a thread exits: C++ `thread_local` objects (and Rust ones) that own
//! device memory free it from their destructors, which run after some of the library's own
//! thread-locals may already be gone. The export still frees the block and returns; nothing
//! panics across the C boundary or aborts the process. Runs in a child process of this test
//! binary, with the host backend.

use std::cell::RefCell;
use std::process::Command;

/// Marker telling the child to run the case (not a `KVH_` variable: the configuration refuses
/// unknown ones).
const CASE: &str = "FFI_THREAD_EXIT_CASE";

/// Runs test `name` of this binary in a child process, as the case (host backend).
fn run_case(name: &str) -> std::process::Output {
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env(CASE, "1")
        .env("KVH_BACKEND", "host")
        .env("KVH_OOM", "null")
        .output()
        .unwrap()
}

/// Frees its pointer when the thread's locals are destroyed.
struct FreesOnExit(RefCell<Option<usize>>);

impl Drop for FreesOnExit {
    fn drop(&mut self) {
        if let Some(p) = self.0.borrow_mut().take() {
            kvhygiene::ffi::kvh_free(p as *mut _, 4096, 0, std::ptr::null_mut());
            println!("FREED-AT-THREAD-EXIT");
        }
    }
}

thread_local! {
    static HOLDER: FreesOnExit = const { FreesOnExit(RefCell::new(None)) };
}

#[test]
fn kvh_free_from_a_thread_local_destructor_returns() {
    let name = "kvh_free_from_a_thread_local_destructor_returns";
    if std::env::var_os(CASE).is_some() {
        std::thread::spawn(|| {
            // The holder is registered for destruction first, so it is destroyed last, after
            // every thread-local the library touches below.
            HOLDER.with(|h| assert!(h.0.borrow().is_none()));
            let p = kvhygiene::ffi::kvh_malloc(4096, 0, std::ptr::null_mut());
            assert!(!p.is_null());
            HOLDER.with(|h| *h.0.borrow_mut() = Some(p as usize));
        })
        .join()
        .unwrap();
        println!("CHILD-DONE");
        return;
    }
    let out = run_case(name);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success()
            && stdout.contains("FREED-AT-THREAD-EXIT")
            && stdout.contains("CHILD-DONE"),
        "the child did not survive a free at thread exit (status {:?}):\n{stdout}\n{stderr}",
        out.status
    );
}

/// Sets a context, then allocates, when the thread's locals are destroyed.
struct SetsContextOnExit;

impl Drop for SetsContextOnExit {
    fn drop(&mut self) {
        let tenant = c"tenant-at-exit";
        let rc =
            kvhygiene::ffi::kvh_set_context(tenant.as_ptr(), std::ptr::null(), std::ptr::null());
        let p = kvhygiene::ffi::kvh_malloc(4096, 0, std::ptr::null_mut());
        let owner = kvhygiene::ffi::process_allocator()
            .ok()
            .and_then(|a| a.block_info(p as u64))
            .and_then(|b| b.tenant_id);
        println!("SET-CONTEXT-AT-EXIT rc={rc} owner={owner:?}");
    }
}

thread_local! {
    static CONTEXT_SETTER: SetsContextOnExit = const { SetsContextOnExit };
}

/// `kvh_set_context` returning `KVH_OK` means the ids are stamped on what the thread
/// allocates next: at thread exit, once the library's thread-locals are gone, either it
/// reports that the context could not be set, or the next allocation carries it.
#[test]
fn kvh_set_context_at_thread_exit_is_applied_or_refused() {
    let name = "kvh_set_context_at_thread_exit_is_applied_or_refused";
    if std::env::var_os(CASE).is_some() {
        std::thread::spawn(|| {
            // Registered for destruction first, so destroyed after the library's own
            // thread-locals touched below.
            CONTEXT_SETTER.with(|_| {});
            let t = c"tenant-before-exit";
            let rc =
                kvhygiene::ffi::kvh_set_context(t.as_ptr(), std::ptr::null(), std::ptr::null());
            assert_eq!(rc, 0);
        })
        .join()
        .unwrap();
        return;
    }
    let out = run_case(name);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find_map(|l| l.find("SET-CONTEXT-AT-EXIT").map(|i| &l[i..]))
        .unwrap_or_else(|| panic!("no result line: {stdout}"));
    let ok = line.contains("rc=0 ");
    let stamped = line.contains("owner=Some(\"tenant-at-exit\")");
    assert!(
        !ok || stamped,
        "kvh_set_context returned KVH_OK at thread exit but the next allocation does not \
         carry its tenant: {line}"
    );
}

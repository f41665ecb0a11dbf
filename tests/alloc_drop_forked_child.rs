//! A child forked from a process that holds an `Allocator`: the child inherits the handle
//! without the threads that serve it (the flusher, the backend's scrub worker). Dropping its
//! copy there must return, as the C ABI's shutdown and exit handler do nothing in a forked
//! child. One test in this binary, so that the fork copies no other test's allocator.

mod common;

use std::time::{Duration, Instant};

use kvhygiene::alloc::Allocator;
use kvhygiene::backend::host::HostBackend;
use kvhygiene::backend::{Backend, StreamHandle};

/// A pre-fork server (or a program whose child returns through the scope that holds the
/// allocator) forks after a free whose scrub is still waiting in an open batch. The child's
/// drop of the handle it inherited returns promptly: nothing there can run a scrub.
#[test]
fn a_forked_child_s_drop_of_its_inherited_allocator_handle_returns() {
    let host = HostBackend::new();
    let config = common::manual_config();
    let alloc = Allocator::new(host.clone(), config, None);
    let ptr = alloc.malloc(4096, 0, StreamHandle(0)).unwrap();
    host.write(0, ptr, &[0x77u8; 4096]).unwrap();
    alloc.free(ptr, 4096, 0, StreamHandle(0)).unwrap();

    // SAFETY: the child drops the handle and `_exit`s; nothing it does returns to the test
    // harness.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        let dropped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(alloc)));
        // SAFETY: ends the child without running the harness's exit path.
        unsafe { libc::_exit(if dropped.is_ok() { 0 } else { 2 }) };
    }

    // A generous deadline: the drop makes no device call worth waiting for in the child.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut status = 0;
    let ended = loop {
        // SAFETY: `pid` is our child.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid {
            break true;
        }
        if Instant::now() >= deadline {
            break false;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    if !ended {
        // SAFETY: `pid` is our child; it is reaped after the kill.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
            libc::waitpid(pid, std::ptr::null_mut(), 0);
        }
    }
    assert!(
        ended,
        "a forked child's drop of the Allocator handle it inherited had not returned after \
         30 s (it waits for a scrub that only the parent's threads could run)"
    );
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "the forked child's drop of its Allocator handle failed: wait status {status:#x}"
    );
    drop(alloc);
}

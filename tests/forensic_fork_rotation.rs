//! A child forked while the log writer rotates keeps none of its chain files: each holds the
//! writer's `flock`, which a child shares with the descriptor, and one a child kept would make
//! the chain read as live after the writer's process died, so that crash recovery never
//! continues it (src/fork_closed.rs).

mod forensic_common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use forensic_common::*;
use kvhygiene::events::EventSink;
use kvhygiene::forensic::ForensicLog;

/// How many of the descriptors open in this (forked) process are chain files (`.jsonl`).
/// Allocation-free: it runs in a child forked from a process with other threads.
fn open_chain_files() -> i32 {
    let mut found = 0;
    for fd in 3..1024 {
        // SAFETY: F_GETFD only reads a descriptor's flags (-1 when it is not open).
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } == -1 {
            continue;
        }
        let mut path = *b"/proc/self/fd/\0\0\0\0\0";
        let digits = [fd / 1000 % 10, fd / 100 % 10, fd / 10 % 10, fd % 10];
        let first = digits.iter().position(|&d| d != 0).unwrap_or(3);
        for (i, d) in digits[first..].iter().enumerate() {
            path[14 + i] = b'0' + *d as u8;
        }
        let mut target = [0u8; 4096];
        // SAFETY: `path` is NUL-terminated; `target` is writable for its length.
        let n = unsafe {
            libc::readlink(
                path.as_ptr().cast(),
                target.as_mut_ptr().cast(),
                target.len(),
            )
        };
        if n > 0 && target[..n as usize].ends_with(b".jsonl") {
            found += 1;
        }
    }
    found
}

#[test]
fn a_child_forked_while_the_writer_rotates_keeps_no_chain_file() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = log_dir(&tmp);
    let log = Arc::new(ForensicLog::open_with_secret(&cfg(&dir, 4096), start(), None).unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (log, stop) = (Arc::clone(&log), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                log.emit(event(i));
                i += 1;
                if i % 8 == 0 {
                    log.flush();
                }
            }
        })
    };
    let mut kept = 0;
    let mut forks = 0;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while std::fs::read_dir(&dir).unwrap().count() < 100 && std::time::Instant::now() < deadline {
        forks += 1;
        // SAFETY: the child only reads its descriptor table (fcntl, readlink into stack
        // buffers), then leaves with `_exit`, never returning into the test harness.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            // SAFETY: ends the child without running the parent's handlers or destructors.
            unsafe { libc::_exit(open_chain_files().min(100)) };
        }
        let mut status = 0;
        // SAFETY: `pid` is this test's child; `status` is a valid out-pointer.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(libc::WIFEXITED(status), "the child did not exit: {status}");
        kept += libc::WEXITSTATUS(status);
    }
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    let files = std::fs::read_dir(&dir).unwrap().count();
    assert!(
        files >= 100,
        "the writer rotated only {files} times: nothing was tested"
    );
    assert_eq!(
        kept, 0,
        "of {forks} children forked during {files} rotations, some kept {kept} chain files"
    );
}

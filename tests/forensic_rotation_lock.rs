//! A lock another process takes for a moment on a writer's next file, right after the writer
//! created it: the crash-recovery probe of a process starting beside it takes one on the
//! newest file of every chain in the directory, and a writer that has just created its next
//! file has not locked it yet. The rotation then fails or waits; the writer goes on rotating
//! once the lock is gone, and its chain still verifies.

mod forensic_common;

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use forensic_common::*;
use kvhygiene::events::EventSink;
use kvhygiene::forensic::files::file_name;
use kvhygiene::forensic::ForensicLog;

#[test]
fn a_next_file_locked_for_a_moment_by_another_process_does_not_stop_rotation_for_good() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = log_dir(&tmp);
    let max = 4096;
    let log = ForensicLog::open_with_secret(&cfg(&dir, max), start(), None).unwrap();
    let chain = log.stats().chain.unwrap();
    // Another process's probe: it opens the chain's next file as soon as it exists and holds
    // an exclusive lock on it for a moment (as `recovery::adopt` does while it reads it).
    let done = Arc::new(AtomicBool::new(false));
    let next = dir.join(file_name(&chain, 1));
    let probe = {
        let done = Arc::clone(&done);
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                if let Ok(f) = std::fs::File::open(&next) {
                    // SAFETY: flock on a descriptor this thread owns.
                    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    return;
                }
            }
        })
    };
    // Records until the first rotation was tried.
    let first = file_name(&chain, 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut i = 0;
    while log.stats().current_file.as_deref() == Some(first.as_str())
        && log.stats().write_errors == 0
        && Instant::now() < deadline
    {
        log.emit(event(i));
        log.flush();
        i += 1;
    }
    done.store(true, Ordering::Relaxed);
    probe.join().unwrap();
    // The probe is gone: many files' worth of records more.
    for j in 0..60 {
        log.emit(event(1000 + j));
    }
    log.flush();
    let stats = log.stats();
    log.stop();
    let sizes: Vec<(String, u64)> = chain_files(&dir)
        .iter()
        .map(|f| (name(f), std::fs::metadata(f).unwrap().len()))
        .collect();
    assert!(
        sizes.iter().all(|(_, len)| *len <= max),
        "the writer stopped rotating (KVH_LOG_MAX_BYTES {max}): {sizes:?}; last error: {:?}",
        stats.last_error
    );
    let r = verify(&dir, &Default::default());
    assert!(r.ok(), "{:?}", r.first_problem());
}

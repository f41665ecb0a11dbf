//! Whole-pool operations (`synchronize`, `empty_cache`, out-of-memory recovery) when process
//! exit begins while they wait for a scrub, and when another device or another thread still
//! has work: the pool's tables stay consistent, and a caller is never told that the scrubs of
//! the blocks freed before its call completed when some did not.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{manual_config, Fixture};
use kvhygiene::alloc::{AllocError, BlockState};
use kvhygiene::backend::{BackendError, StreamHandle};
use kvhygiene::config::Config;

const S: StreamHandle = StreamHandle(0);

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A CLEAN block, verified and on its free list, of `size` bytes on device 0.
fn clean_block(f: &Fixture, size: i64) -> u64 {
    let a = f.malloc_zeroed(size, 0, 0);
    f.alloc.free(a, size, 0, S).unwrap();
    f.alloc.synchronize().unwrap();
    assert_eq!(
        f.alloc.block_info(a).map(|b| b.state),
        Some(BlockState::Clean)
    );
    a
}

/// `empty_cache` waits for a scrub; exit begins meanwhile. Nothing may go back to the backend
/// after that, so the CLEAN blocks stay in the pool: they must stay on their free lists too
/// (the free lists hold exactly the CLEAN blocks, `check_consistency`), where a later
/// allocation served from the pool finds them (`kvh_shutdown`: later allocations are served
/// from clean pooled blocks).
#[test]
fn empty_cache_racing_exit_keeps_clean_blocks_on_their_free_lists() {
    let f = Arc::new(Fixture::new(manual_config()));
    let c = clean_block(&f, 8192);
    let b = f.malloc_zeroed(4096, 0, 0);
    f.alloc.free(b, 4096, 0, S).unwrap();
    let submitted = f.backend.batches.lock().unwrap().len();
    f.backend.set_gate(false);
    let emptier = {
        let f = f.clone();
        std::thread::spawn(move || f.alloc.empty_cache())
    };
    wait_for("empty_cache to submit the open batch", || {
        f.backend.batches.lock().unwrap().len() > submitted
    });
    f.alloc.begin_exit();
    f.backend.set_gate(true);
    emptier.join().unwrap();
    let consistent = f.alloc.check_consistency();
    let c_state = f.alloc.block_info(c).map(|b| b.state);
    let reused = f.alloc.malloc(8192, 0, S);
    assert!(
        consistent.is_ok() && reused == Ok(c),
        "after empty_cache raced exit: check_consistency = {consistent:?}; block {c:#x} is \
         {c_state:?} in the table, and a malloc of its size returned {reused:?}"
    );
}

/// Out-of-memory recovery waits for a scrub; exit begins meanwhile. The recovery then fails
/// (no backend call after exit), but the CLEAN blocks it could not give back must stay on
/// their free lists.
#[test]
fn oom_recovery_racing_exit_keeps_clean_blocks_on_their_free_lists() {
    let f = Arc::new(Fixture::new(manual_config()));
    let c = clean_block(&f, 8192);
    let b = f.malloc_zeroed(4096, 0, 0);
    f.alloc.free(b, 4096, 0, S).unwrap();
    f.backend.set_gate(false);
    f.backend
        .allocate_errors
        .lock()
        .unwrap()
        .push_back(BackendError::OutOfMemory {
            device: 0,
            requested: 16384,
        });
    let mallocer = {
        let f = f.clone();
        std::thread::spawn(move || f.alloc.malloc(16384, 0, S))
    };
    // The fresh allocation failed: the malloc is in its out-of-memory recovery, which waits
    // for the scrub of b (held).
    wait_for("the first fresh allocation to fail", || {
        f.backend.allocate_errors.lock().unwrap().is_empty()
    });
    std::thread::sleep(Duration::from_millis(20));
    f.alloc.begin_exit();
    f.backend.set_gate(true);
    let r = mallocer.join().unwrap();
    assert!(
        matches!(r, Err(AllocError::ShuttingDown)),
        "the malloc returned {r:?}"
    );
    let consistent = f.alloc.check_consistency();
    let reused = f.alloc.malloc(8192, 0, S);
    assert!(
        consistent.is_ok() && reused == Ok(c),
        "after out-of-memory recovery raced exit: check_consistency = {consistent:?}; a \
         malloc of the CLEAN block's size returned {reused:?}"
    );
}

/// `synchronize` waits for the scrub of every block freed before the call, on every device
/// (include/kvhygiene.h, `kvh_synchronize`). When exit begins while it waits on device 0, the
/// block freed on device 1 is never scrubbed: the call must not report success.
#[test]
fn synchronize_does_not_report_success_when_exit_leaves_another_devices_free_unscrubbed() {
    let f = Arc::new(Fixture::new(manual_config()));
    let a0 = f.malloc_zeroed(4096, 0, 0);
    let a1 = f.malloc_zeroed(4096, 1, 0);
    f.alloc.free(a0, 4096, 0, S).unwrap();
    f.alloc.free(a1, 4096, 1, S).unwrap();
    f.backend.set_gate(false);
    let syncer = {
        let f = f.clone();
        std::thread::spawn(move || f.alloc.synchronize())
    };
    wait_for("synchronize to submit device 0's batch", || {
        !f.backend.batches.lock().unwrap().is_empty()
    });
    f.alloc.begin_exit();
    f.backend.set_gate(true);
    let r = syncer.join().unwrap();
    let s1 = f.alloc.block_info(a1).map(|b| b.state);
    assert!(
        r.is_err() || s1 != Some(BlockState::Pending),
        "synchronize returned {r:?} while the block freed on device 1 before the call is \
         {s1:?}, its scrub never submitted (exit began during the call)"
    );
}

/// Out-of-memory recovery "flushes scrubs and releases cached blocks" before it reports
/// `OutOfMemory` (the error's message; `malloc_after_oom`: "wait for every scrub, retry the
/// pool, release cached blocks, retry"). A block another thread freed while the recovery
/// waited is flushed by the recovery itself, yet its scrub is no longer waited for: its
/// memory is neither reused nor released, and the malloc fails although the device would
/// have had room once that scrub (already submitted) was applied.
#[test]
fn oom_recovery_waits_for_the_scrubs_it_submits_before_reporting_out_of_memory() {
    let f = Arc::new(Fixture::with_host(
        manual_config(),
        kvhygiene::backend::host::HostBackend::with_capacity(8192),
    ));
    let x = f.malloc_zeroed(4096, 0, 0);
    let y = f.malloc_zeroed(4096, 0, 0);
    f.alloc.free(x, 4096, 0, S).unwrap();
    f.backend.set_gate(false);
    let mallocer = {
        let f = f.clone();
        std::thread::spawn(move || f.alloc.malloc(8192, 0, S))
    };
    // The malloc submits x's batch, finds no room, and waits for x's scrub (held).
    wait_for("the malloc to submit x's batch", || {
        !f.backend.batches.lock().unwrap().is_empty()
    });
    std::thread::sleep(Duration::from_millis(50));
    // Another thread frees y meanwhile, then the held scrub completes.
    f.alloc.free(y, 4096, 0, S).unwrap();
    f.backend.set_gate(true);
    let r = mallocer.join().unwrap();
    let y_state = f.alloc.block_info(y).map(|b| b.state);
    assert!(
        r.is_ok(),
        "malloc(8192) returned {r:?}: x was released, y (freed while the recovery waited, \
         its scrub submitted by the recovery's own flush) is {y_state:?}, and the backend holds \
         {} of its 8192 bytes",
        f.backend.host.bytes_in_use()
    );
}

/// A whole-pool wait that waits for a batch another thread holds (a checked free's) does not
/// submit again, every few microseconds, a batch the backend refused for now (a stream that
/// is capturing a graph): each refusal counts in `scrubs_deferred`, which would then grow by
/// thousands a second for as long as the wait lasts.
#[test]
fn waiting_for_another_threads_batch_does_not_resubmit_a_refused_one_in_a_loop() {
    const CAPTURING: StreamHandle = StreamHandle(9);
    let f = Arc::new(Fixture::new(Config {
        batch_size: 1,
        ..manual_config()
    }));
    let a = f.malloc_zeroed(4096, 0, 0);
    let b = f.malloc_zeroed(4096, 0, CAPTURING.0);
    *f.backend.refuse.lock().unwrap() = Some(Box::new(|batch| {
        (batch.stream == CAPTURING).then_some(BackendError::StreamCapturing {
            stream: CAPTURING.0,
            what: "the scrub",
        })
    }));
    f.backend.set_gate(false);
    let checker = {
        let f = f.clone();
        std::thread::spawn(move || f.alloc.free_checked(a, 4096, 0, S))
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while f.backend.batches.lock().unwrap().is_empty() {
        assert!(Instant::now() < deadline, "batch never submitted");
        std::thread::sleep(Duration::from_millis(1));
    }
    f.alloc.free(b, 4096, 0, CAPTURING).unwrap();
    let before = f.alloc.stats().counters.scrubs_deferred;
    let syncer = {
        let f = f.clone();
        std::thread::spawn(move || f.alloc.synchronize())
    };
    std::thread::sleep(Duration::from_millis(100));
    let during = f.alloc.stats().counters.scrubs_deferred - before;
    f.backend.set_gate(true);
    checker.join().unwrap().unwrap();
    let r = syncer.join().unwrap();
    assert!(r.is_err(), "b's scrub is refused for now: {r:?}");
    assert!(
        during <= 2,
        "while synchronize waited 100 ms for another thread's batch, the refused batch was \
         submitted (and refused) {during} more times"
    );
}

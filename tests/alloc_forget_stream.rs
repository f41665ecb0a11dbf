//! `Allocator::forget_stream`: once a caller says it destroys a stream, no batch submitted
//! afterwards runs on that stream or waits for it. Batches that name it are submitted at the
//! call (while it still exists); blocks allocated, recorded or freed on it are ordered on the
//! legacy stream from then on, first scrubs, deferred batches and quarantine re-scrubs alike.

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::{manual_config, Fixture};
use kvhygiene::alloc::BlockState;
use kvhygiene::backend::{ScrubBatch, StreamHandle};

const DOOMED: StreamHandle = StreamHandle(7);
const LEGACY: StreamHandle = StreamHandle(0);

fn names(batch: &ScrubBatch, stream: StreamHandle) -> bool {
    batch.stream == stream || batch.wait_streams.contains(&stream)
}

fn holds(batch: &ScrubBatch, addr: u64) -> bool {
    batch.segments.iter().any(|s| s.addr == addr)
}

fn batches(f: &Fixture) -> Vec<ScrubBatch> {
    f.backend.batches.lock().unwrap().clone()
}

#[test]
fn open_batches_naming_the_stream_are_submitted_and_later_ones_never_name_it() {
    let f = Fixture::new(manual_config());
    // Allocated first: a pool miss submits every open batch.
    let on = f.malloc_zeroed(1024, 0, DOOMED.0);
    let waits = f.malloc_zeroed(1024, 0, 3);
    let unrelated = f.malloc_zeroed(1024, 0, 3);
    let live = f.malloc_zeroed(4096, 0, DOOMED.0);
    let recorded = f.malloc_zeroed(4096, 0, 3);
    // Freed on the stream: an open batch on it.
    f.alloc.free(on, 1024, 0, DOOMED).unwrap();
    // Recorded on it, freed elsewhere: an open batch waiting for it.
    assert!(f.alloc.record_stream(waits, DOOMED));
    f.alloc.free(waits, 1024, 0, StreamHandle(9)).unwrap();
    // Unrelated: stays open.
    f.alloc.free(unrelated, 1024, 0, StreamHandle(11)).unwrap();
    // Live blocks stay allocated on it, or recorded on it.
    assert!(f.alloc.record_stream(recorded, DOOMED));
    let before = batches(&f).len();

    f.alloc.forget_stream(DOOMED);

    let submitted = batches(&f)[before..].to_vec();
    assert_eq!(submitted.len(), 2, "{submitted:?}");
    assert!(submitted.iter().any(|b| b.stream == DOOMED && holds(b, on)));
    assert!(submitted
        .iter()
        .any(|b| b.wait_streams.contains(&DOOMED) && holds(b, waits)));
    assert!(!submitted.iter().any(|b| holds(b, unrelated)));
    let at_forget = batches(&f).len();

    f.alloc.free(live, 4096, 0, StreamHandle(13)).unwrap();
    f.alloc.free(recorded, 4096, 0, StreamHandle(13)).unwrap();
    f.alloc.synchronize().unwrap();

    let later = batches(&f)[at_forget..].to_vec();
    assert!(!later.is_empty());
    for b in &later {
        assert!(
            !names(b, DOOMED),
            "a batch after forget_stream names it: {b:?}"
        );
    }
    // The block allocated on the forgotten stream is ordered after the legacy stream.
    let scrub = later.iter().find(|b| holds(b, live)).expect("live's scrub");
    assert!(scrub.wait_streams.contains(&LEGACY), "{scrub:?}");
    for addr in [on, waits, unrelated, live, recorded] {
        assert_eq!(f.alloc.block_info(addr).unwrap().state, BlockState::Clean);
    }
    f.assert_balanced();
}

#[test]
fn forgetting_a_stream_not_waited_for_submits_nothing_on_it_and_orders_after_the_legacy_stream() {
    // The caller's synchronisation of the stream failed and it destroys the stream anyway:
    // nothing may be submitted on it, even at the call. The scrubs still run, verified, on
    // the legacy stream, after it wherever they waited for the forgotten stream.
    let f = Fixture::new(manual_config());
    let on = f.malloc_zeroed(1024, 0, DOOMED.0);
    let waits = f.malloc_zeroed(1024, 0, 3);
    let live = f.malloc_zeroed(4096, 0, 3);
    f.write(0, on, &common::secret(1024, 1));
    f.write(0, waits, &common::secret(1024, 2));
    // Freed on the stream: an open batch on it.
    f.alloc.free(on, 1024, 0, DOOMED).unwrap();
    // Recorded on it, freed elsewhere: an open batch waiting for it.
    assert!(f.alloc.record_stream(waits, DOOMED));
    f.alloc.free(waits, 1024, 0, StreamHandle(9)).unwrap();
    // Live, recorded on it.
    assert!(f.alloc.record_stream(live, DOOMED));
    let before = batches(&f).len();

    f.alloc.forget_unwaited_stream(DOOMED);

    assert_eq!(batches(&f).len(), before, "nothing submitted at the call");
    assert!(!f.alloc.uses_stream(DOOMED));
    for addr in [on, waits] {
        assert_eq!(f.alloc.block_info(addr).unwrap().state, BlockState::Pending);
    }
    f.alloc.free(live, 4096, 0, StreamHandle(13)).unwrap();
    f.alloc.synchronize().unwrap();

    let later = batches(&f)[before..].to_vec();
    for b in &later {
        assert!(
            !names(b, DOOMED),
            "a batch after forget_unwaited_stream names it: {b:?}"
        );
    }
    let scrub = |addr| later.iter().find(|b| holds(b, addr)).expect("its scrub");
    assert_eq!(scrub(on).stream, LEGACY);
    for addr in [waits, live] {
        let b = scrub(addr);
        assert!(
            b.stream != LEGACY && b.wait_streams.contains(&LEGACY),
            "{b:?}"
        );
    }
    for addr in [on, waits, live] {
        assert_eq!(f.alloc.block_info(addr).unwrap().state, BlockState::Clean);
        assert!(f.read(0, addr, 1024).iter().all(|&b| b == 0));
    }
    f.assert_balanced();
}

#[test]
fn a_batch_a_capture_defers_moves_to_the_legacy_stream() {
    let f = Fixture::new(manual_config());
    let a = f.malloc_zeroed(1024, 0, DOOMED.0);
    f.backend.capturing.store(true, Ordering::SeqCst);
    f.alloc.free(a, 1024, 0, DOOMED).unwrap();
    let before = batches(&f).len();
    // The submission is refused by the capture: the batch stays open, on the legacy stream.
    f.alloc.forget_stream(DOOMED);
    assert_eq!(batches(&f).len(), before);
    f.backend.capturing.store(false, Ordering::SeqCst);
    f.alloc.synchronize().unwrap();
    let later = batches(&f)[before..].to_vec();
    let scrub = later.iter().find(|b| holds(b, a)).expect("a's scrub");
    assert_eq!(scrub.stream, LEGACY);
    assert!(!names(scrub, DOOMED), "{scrub:?}");
    assert_eq!(f.alloc.block_info(a).unwrap().state, BlockState::Clean);
    f.assert_balanced();
}

#[test]
fn a_quarantine_rescrub_waiting_for_its_turn_runs_on_the_legacy_stream() {
    let f = Fixture::new(manual_config());
    let a = f.malloc_zeroed(1024, 0, DOOMED.0);
    f.write(0, a, &common::secret(1024, 1));
    f.backend.inject_fault_next();
    f.backend.set_gate(false);
    f.alloc.free(a, 1024, 0, DOOMED).unwrap();
    // Submit the first scrub and wait for it on another thread; while it is held, a capture
    // begins, so that the re-scrub its failure asks for is deferred.
    let alloc = f.alloc.clone();
    let waiter = std::thread::spawn(move || alloc.synchronize());
    let deadline = Instant::now() + Duration::from_secs(60);
    while !batches(&f).iter().any(|b| holds(b, a)) {
        assert!(
            Instant::now() < deadline,
            "the first scrub was never submitted"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    f.backend.capturing.store(true, Ordering::SeqCst);
    f.backend.set_gate(true);
    // The capture refused the re-scrub: synchronize says so rather than succeed.
    let waited = waiter.join().unwrap();
    assert!(
        waited.as_ref().is_err_and(|e| e.contains("capturing")),
        "{waited:?}"
    );
    assert_eq!(
        f.alloc.block_info(a).unwrap().state,
        BlockState::Quarantined
    );
    let before = batches(&f).len();

    f.alloc.forget_stream(DOOMED);
    f.backend.capturing.store(false, Ordering::SeqCst);
    f.alloc.synchronize().unwrap();

    let rescrub = batches(&f)[before..]
        .iter()
        .find(|b| holds(b, a) && b.options.double_pass && b.options.full_verify)
        .cloned()
        .expect("the re-scrub");
    assert_eq!(rescrub.stream, LEGACY);
    assert!(!names(&rescrub, DOOMED), "{rescrub:?}");
    // Cleared and released.
    assert!(f.alloc.block_info(a).is_none());
    f.assert_balanced();
}

#[test]
fn forgetting_the_legacy_stream_changes_nothing() {
    let f = Fixture::new(manual_config());
    let a = f.malloc_zeroed(1024, 0, LEGACY.0);
    f.alloc.free(a, 1024, 0, LEGACY).unwrap();
    let before = batches(&f).len();
    f.alloc.forget_stream(LEGACY);
    assert_eq!(
        batches(&f).len(),
        before,
        "the open batch was left to the flush rules"
    );
    f.alloc.synchronize().unwrap();
    assert_eq!(f.alloc.block_info(a).unwrap().state, BlockState::Clean);
}

#[test]
fn uses_stream_sees_every_reference_and_none_after_forgetting() {
    let f = Fixture::new(manual_config());
    assert!(!f.alloc.uses_stream(DOOMED), "nothing yet");
    let a = f.malloc_zeroed(1024, 0, DOOMED.0);
    assert!(f.alloc.uses_stream(DOOMED), "allocated on it");
    let b = f.malloc_zeroed(1024, 0, 3);
    assert!(f.alloc.record_stream(b, StreamHandle(11)));
    assert!(f.alloc.uses_stream(StreamHandle(11)), "recorded on a block");
    f.alloc.free(b, 1024, 0, StreamHandle(12)).unwrap();
    assert!(
        f.alloc.uses_stream(StreamHandle(12)),
        "an open batch runs on it"
    );
    f.alloc.forget_stream(DOOMED);
    assert!(!f.alloc.uses_stream(DOOMED));
    assert!(
        f.alloc.uses_stream(StreamHandle(12)),
        "other streams are kept"
    );
    f.alloc.free(a, 1024, 0, LEGACY).unwrap();
    f.alloc.synchronize().unwrap();
}

#[test]
fn forgetting_a_stream_after_exit_began_makes_no_backend_call() {
    let f = Fixture::new(manual_config());
    let a = f.malloc_zeroed(1024, 0, DOOMED.0);
    f.alloc.free(a, 1024, 0, DOOMED).unwrap();
    f.alloc.begin_exit();
    f.backend.seal();
    f.alloc.forget_stream(DOOMED);
    assert_eq!(f.backend.calls_after_seal.load(Ordering::SeqCst), 0);
    // The open batch is not submitted but no longer names the stream.
    assert!(!f.alloc.uses_stream(DOOMED));
}

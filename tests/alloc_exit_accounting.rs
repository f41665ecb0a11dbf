//! What the pool's counters and records say about memory once process exit has begun: no
//! backend call is made then (invariant 6), so memory the pool would have returned to the
//! backend is leaked, and the counters and records must not say it was returned.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{manual_config, secret, Fixture};
use kvhygiene::backend::StreamHandle;
use kvhygiene::config::Config;

const S: StreamHandle = StreamHandle(0);

/// A checked free waits for its block's scrub; exit begins meanwhile; the scrub's verdict is
/// then applied with no backend call. The block was due to be retired (`max_reuse`), which
/// after exit leaks it: the pool must still account for the bytes the backend still holds,
/// and neither count the block as released nor record a `release` event for it.
#[test]
fn a_block_retired_after_exit_began_is_not_counted_or_recorded_as_released() {
    let f = Arc::new(Fixture::new(Config {
        max_reuse: 1,
        ..manual_config()
    }));
    let a = f.malloc_zeroed(4096, 0, 0);
    f.write(0, a, &secret(4096, 0x5e));
    f.backend.set_gate(false);
    let checker = {
        let f = f.clone();
        std::thread::spawn(move || f.alloc.free_checked(a, 4096, 0, S))
    };
    // The checked free submits its batch and takes it out of the pool under one lock.
    let deadline = Instant::now() + Duration::from_secs(5);
    while f.backend.batches.lock().unwrap().is_empty() {
        assert!(Instant::now() < deadline, "batch never submitted");
        std::thread::sleep(Duration::from_millis(1));
    }
    f.alloc.begin_exit();
    f.backend.set_gate(true);
    checker.join().unwrap().unwrap();
    let pool_bytes = f.alloc.check_consistency().unwrap().total().bytes;
    let backend_bytes = f.backend.host.bytes_in_use();
    let st = f.alloc.stats();
    assert_eq!(
        (pool_bytes, st.counters.released, f.sink.count("release")),
        (backend_bytes, 0, 0),
        "after exit began the backend still holds {backend_bytes} bytes (nothing may be \
         returned), but the pool accounts for {pool_bytes}, counts {} released blocks and \
         recorded {} `release` events",
        st.counters.released,
        f.sink.count("release")
    );
}

/// Fresh memory whose zeroing a graph capture refused is kept PENDING until the capture ends;
/// it held nobody's data and was never freed. Shutdown during that capture leaves it to the
/// process's end, as it leaves fresh memory whose allocation met the start of exit: it is not
/// one of the "freed blocks" neither verified nor returned, which `synchronize` (and
/// `kvh_synchronize`'s `KVH_ERR_SHUTTING_DOWN`) report as left unscrubbed by shutdown.
#[test]
fn fresh_memory_kept_after_a_refused_zeroing_is_not_reported_as_a_freed_block_left_unscrubbed() {
    use std::sync::atomic::Ordering;
    let f = Fixture::new(manual_config());
    f.malloc_whose_zeroing_a_capture_refuses(4096);
    // The capture goes on: scrub launches are refused while shutdown drains.
    f.backend.capturing.store(true, Ordering::SeqCst);
    f.alloc.shutdown();
    let st = f.alloc.stats();
    assert_eq!(st.counters.frees, 0, "nothing was freed");
    assert_no_freed_block_left_unscrubbed(&f);
}

/// Fresh memory whose zeroing a graph capture refused is kept, and scrubbed once the capture
/// allows it. When that scrub does not verify, the block is quarantined for a re-scrub; here
/// a capture refuses the re-scrub too, and shutdown begins meanwhile. The block is leaked, as
/// kept memory still PENDING at shutdown is, but it was never handed out nor freed: shutdown
/// does not report it as one of the "freed blocks" left neither verified nor returned.
#[test]
fn kept_fresh_memory_quarantined_by_its_scrub_is_not_reported_as_a_freed_block_left_unscrubbed() {
    use kvhygiene::backend::Backend;
    use std::sync::atomic::Ordering;
    let f = Fixture::new(manual_config());
    f.malloc_whose_zeroing_a_capture_refuses(4096);
    // The kept block's scrub does not verify; a capture begins right after its submission,
    // and refuses the re-scrub that follows.
    f.backend.inject_fault(1).unwrap();
    let backend = f.backend.clone();
    *f.backend.after_next_submit.lock().unwrap() = Some(Box::new(move || {
        backend.capturing.store(true, Ordering::SeqCst)
    }));
    let _ = f.alloc.synchronize();
    let st = f.alloc.stats();
    assert_eq!(
        (st.counters.frees, st.accounting.quarantined.blocks),
        (0, 1),
        "the kept block was quarantined, and nothing was freed: {:?}",
        st.accounting
    );
    f.alloc.shutdown();
    assert_no_freed_block_left_unscrubbed(&f);
}

/// After shutdown, in a run that freed nothing: neither the count nor `synchronize` reports a
/// freed block left unscrubbed.
fn assert_no_freed_block_left_unscrubbed(f: &Fixture) {
    let left = f.alloc.unscrubbed_after_shutdown();
    let sync = f.alloc.synchronize();
    assert!(
        left == 0 && sync.is_ok(),
        "no block was freed, yet shutdown reports {left} freed block(s) left unscrubbed: \
         {sync:?}"
    );
}

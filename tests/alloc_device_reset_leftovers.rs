//! `Allocator::reset_device` and what it leaves behind: fresh memory an allocation got from
//! the backend while the reset began, and blocks a reset that unwound partway did not free.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::{manual_config, secret, Fixture, TestBackend};
use kvhygiene::alloc::{AllocError, Allocator, BlockState};
use kvhygiene::backend::host::HostBackend;
use kvhygiene::backend::{Backend, StreamHandle};
use kvhygiene::config::Config;
use kvhygiene::events::{Event, EventSink};

const S: StreamHandle = StreamHandle(0);

/// Fresh memory an allocation got from the backend just before the device's reset began is
/// not handed out, and the allocator keeps no memory of the backend's outside its block
/// table: afterwards the backend holds exactly the bytes the pool accounts for.
#[test]
fn fresh_memory_a_reset_overtakes_is_not_left_with_the_backend_outside_the_table() {
    let f = Fixture::new(manual_config());
    let alloc = f.alloc.clone();
    *f.backend.at_next_zero_fresh.lock().unwrap() = Some(Box::new(move || {
        alloc.reset_device(0);
    }));
    let got = f.alloc.malloc(4096, 0, S);
    assert!(
        matches!(got, Err(AllocError::DeviceReset { device: 0 })),
        "the overtaken allocation got {got:?}"
    );

    let pool = f.alloc.check_consistency().unwrap().total().bytes;
    let held = f.backend.host.bytes_in_use();
    assert_eq!(
        held, pool,
        "the backend holds {held} bytes, the pool accounts for {pool}"
    );
}

/// A sink that panics on the first event it is given once armed (a faulty sink; the C
/// boundary catches the panic and the process goes on).
#[derive(Default)]
struct PanicsOnce {
    armed: AtomicBool,
}

impl EventSink for PanicsOnce {
    fn emit(&self, _event: Event) {
        if self.armed.swap(false, Ordering::SeqCst) {
            panic!("the sink panicked");
        }
    }
}

/// A reset that unwinds after freeing some of the device's blocks (its sink panicked on the
/// first one's record) leaves the others with their holders: the holder's own free of such
/// a block still frees it, so that it is scrubbed, rather than doing nothing and leaving it
/// LIVE with its contents.
#[test]
fn a_block_a_reset_did_not_get_to_is_freed_by_its_holders_free() {
    let backend = TestBackend::new(HostBackend::new());
    let sink = Arc::new(PanicsOnce::default());
    let config = Config {
        batch_size: 1,
        ..manual_config()
    };
    let alloc = Allocator::new(backend.clone(), config, Some(sink.clone()));
    let a = alloc.malloc(4096, 0, S).unwrap();
    let b = alloc.malloc(4096, 0, S).unwrap();
    backend.write(0, a, &secret(4096, 0x11)).unwrap();
    backend.write(0, b, &secret(4096, 0x22)).unwrap();

    // The first block's scrub cannot be submitted: its failure is recorded, and the sink
    // panics on that record.
    backend.submit_budget.store(0, Ordering::SeqCst);
    sink.armed.store(true, Ordering::SeqCst);
    let reset = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| alloc.reset_device(0)));
    assert!(reset.is_err(), "the sink's panic did not reach the reset");
    backend.submit_budget.store(-1, Ordering::SeqCst);

    let still_live: Vec<u64> = [a, b]
        .into_iter()
        .filter(|&p| alloc.block_info(p).map(|i| i.state) == Some(BlockState::Live))
        .collect();
    assert!(!still_live.is_empty(), "the reset freed both blocks");
    for p in &still_live {
        alloc.free(*p, 4096, 0, S).unwrap();
    }
    let after: Vec<_> = still_live
        .iter()
        .map(|&p| (p, alloc.block_info(p).map(|i| i.state)))
        .collect();
    assert!(
        after.iter().all(|(_, s)| *s != Some(BlockState::Live)),
        "blocks still LIVE after their holder's free: {after:x?}"
    );
}

/// Fresh memory whose zeroing a graph capture refuses while the device's reset begins is
/// refused as reset, and, as with any fresh memory a reset overtakes, the allocator keeps
/// none of the backend's memory outside its block table: afterwards the backend holds
/// exactly the bytes the pool accounts for (the memory is in the table until it can go
/// back, or it has gone back).
#[test]
fn fresh_memory_a_capture_kept_while_a_reset_began_is_not_left_outside_the_table() {
    let f = Fixture::new(manual_config());
    let got = f.malloc_while_a_reset_begins_and_a_capture_refuses_the_zeroing(4096, 0);
    assert!(
        matches!(got, Err(AllocError::DeviceReset { device: 0 })),
        "the overtaken allocation got {got:?}"
    );
    f.alloc.synchronize().ok();
    f.alloc.shutdown();

    let pool = f.alloc.check_consistency().unwrap().total().bytes;
    let held = f.backend.host.bytes_in_use();
    assert_eq!(
        held, pool,
        "the backend holds {held} bytes, the pool accounts for {pool}"
    );
}

//! `Allocator::reset_device`: the process is about to reset a device's context
//! (`cudaDeviceReset`), which frees every allocation in it. The blocks still handed out are
//! freed to kvhygiene, so that they are scrubbed before the reset; from then on nothing of
//! the device's memory is handed out, and a free into it does nothing.

mod common;

use common::{manual_config, secret, Fixture};
use kvhygiene::alloc::{AllocError, BlockState, FreeError};
use kvhygiene::backend::StreamHandle;
use kvhygiene::events::InvalidFreeReason;

const S: StreamHandle = StreamHandle(0);

#[test]
fn the_blocks_still_handed_out_are_scrubbed_and_nothing_is_handed_out_after() {
    let f = Fixture::new(manual_config());
    let held = f.malloc_zeroed(4096, 0, 0);
    f.write(0, held, &secret(4096, 0x51));
    let pooled = f.malloc_zeroed(8192, 0, 0);
    f.alloc.free(pooled, 8192, 0, S).unwrap();
    f.alloc.synchronize().unwrap(); // `pooled` is CLEAN in the pool

    assert_eq!(f.alloc.reset_device(0), 1, "one block was still handed out");
    assert!(f.alloc.device_was_reset(0));
    f.alloc.synchronize().unwrap();
    assert!(
        f.read(0, held, 4096).iter().all(|&b| b == 0),
        "the block still handed out at the reset was not scrubbed"
    );
    let state = f.alloc.block_info(held).map(|b| b.state);
    assert_eq!(state, Some(BlockState::Clean));

    // A pool hit would be memory the reset destroyed: refused, as fresh memory is.
    for size in [8192, 4096, 1 << 20] {
        match f.alloc.malloc(size, 0, S) {
            Err(AllocError::DeviceReset { device: 0 }) => {}
            other => panic!("an allocation of {size} bytes after the reset got {other:?}"),
        }
    }
    // Other devices are served as before (the C ABI's front ends shut down after a reset).
    if f.alloc.backend().device_count() > 1 {
        let other = f.malloc_zeroed(4096, 1, 0);
        f.alloc.free(other, 4096, 1, S).unwrap();
    }
    // The holder's own free of the block the reset freed is no double free; a second one
    // is, as is a free of a block freed before the reset.
    f.alloc.free(held, 4096, 0, S).unwrap();
    assert_eq!(f.sink.count("invalid_free"), 0);
    for (addr, size) in [(held, 4096), (pooled, 8192)] {
        match f.alloc.free(addr, size, 0, S) {
            Err(FreeError::Invalid {
                reason: InvalidFreeReason::DoubleFree,
                ..
            }) => {}
            other => panic!("a second free of {addr:#x} got {other:?}"),
        }
    }
    assert_eq!(f.sink.count("invalid_free"), 2);
    f.alloc.check_consistency().unwrap();
}

#[test]
fn a_device_the_backend_lacks_is_not_reset() {
    let f = Fixture::new(manual_config());
    let held = f.malloc_zeroed(4096, 0, 0);
    let lacked = f.alloc.backend().device_count();
    assert_eq!(f.alloc.reset_device(lacked), 0);
    assert!(!f.alloc.device_was_reset(lacked) && !f.alloc.device_was_reset(0));
    let state = f.alloc.block_info(held).map(|b| b.state);
    assert_eq!(state, Some(BlockState::Live));
    f.alloc.free(held, 4096, 0, S).unwrap();
}

/// A front end that checks a free first (`check_free`, as the LD_PRELOAD interposers do for a
/// block that is not LIVE) is told the holder's free of a block the reset freed is valid,
/// once: the free then does nothing, and a second one is a double free.
#[test]
fn a_checked_ahead_free_of_a_block_the_reset_freed_is_valid_once() {
    let f = Fixture::new(manual_config());
    let held = f.malloc_zeroed(4096, 0, 0);
    assert_eq!(f.alloc.reset_device(0), 1);
    assert_eq!(f.alloc.check_free(held, 0), Ok(4096));
    f.alloc.free(held, 4096, 0, S).unwrap();
    match f.alloc.check_free(held, 0) {
        Err(FreeError::Invalid {
            reason: InvalidFreeReason::DoubleFree,
            ..
        }) => {}
        other => panic!("a second free of the block got {other:?}"),
    }
    assert_eq!(f.sink.count("invalid_free"), 1);
}

/// `check_free` answers for a block the reset freed as `free` does, also once the block's
/// memory went back to the device after its scrub (`empty_cache`): `free` accepts the
/// holder's free of it once, so the check says it is valid and counts no invalid free.
#[test]
fn a_checked_ahead_free_of_a_block_the_reset_freed_and_released_is_valid_once() {
    let f = Fixture::new(manual_config());
    let held = f.malloc_zeroed(4096, 0, 0);
    assert_eq!(f.alloc.reset_device(0), 1);
    f.alloc.synchronize().unwrap();
    f.alloc.empty_cache();
    assert_eq!(f.alloc.block_info(held).map(|b| b.state), None);
    let checked = f.alloc.check_free(held, 0);
    let freed = f.alloc.free(held, 4096, 0, S).map(|_| ());
    assert_eq!(
        (checked, freed),
        (Ok(4096), Ok(())),
        "check_free and free disagree on the holder's free of a block the reset freed"
    );
    assert_eq!(f.sink.count("invalid_free"), 0);
}

/// Invariant 7 holds for every free: the caller's size is checked against the block table,
/// and a mismatch is counted and recorded. The holder's free of a block the reset freed on
/// its behalf is accepted once; a wrong size given to it is still a size mismatch (the pool
/// kept the size the holder asked for).
#[test]
fn the_holders_free_of_a_block_the_reset_freed_with_a_wrong_size_is_a_size_mismatch() {
    let f = Fixture::new(manual_config());
    let held = f.malloc_zeroed(4096, 0, 0);
    assert_eq!(f.alloc.reset_device(0), 1);
    let report = f.alloc.free(held, 1 << 20, 0, S).unwrap();
    assert!(
        report.size_mismatch,
        "a free of a 4096-byte block naming 1 MiB was not reported as a size mismatch"
    );
    assert_eq!(f.alloc.stats().counters.size_mismatches, 1);
    assert_eq!(f.sink.count("size_mismatch"), 1);
}

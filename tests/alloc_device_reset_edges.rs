//! `Allocator::reset_device` at its edges: frees that name a reset device but aim at memory
//! of another one, a checked free whose scrub failed, and an allocation the reset overtakes.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use common::{manual_config, secret, Fixture};
use kvhygiene::alloc::{AllocError, BlockState, FreeError};
use kvhygiene::backend::StreamHandle;
use kvhygiene::events::InvalidFreeReason;

const S: StreamHandle = StreamHandle(0);

/// A free of device 1's block that names device 0, which was reset, is a wrong-device free:
/// it is refused and logged as such, and device 1's block stays with its holder.
#[test]
fn a_free_naming_a_reset_device_of_another_devices_block_is_a_wrong_device_free() {
    let f = Fixture::new(manual_config());
    assert!(f.alloc.backend().device_count() > 1);
    let other = f.malloc_zeroed(4096, 1, 0);
    f.alloc.reset_device(0);

    let got = f.alloc.free(other, 4096, 0, S);
    assert_eq!(
        got.map(|_| ()),
        Err(FreeError::Invalid {
            reason: InvalidFreeReason::WrongDevice,
            addr: other,
            device: 0,
        }),
        "a free of device 1's block naming the reset device 0"
    );
    assert_eq!(f.sink.count("invalid_free"), 1);
}

/// A second free of a block the engine freed itself before the reset (the reset did not free
/// it) is a double free: refused and logged, as on any device.
#[test]
fn a_second_free_of_a_block_freed_before_the_reset_is_a_double_free() {
    let f = Fixture::new(manual_config());
    let a = f.malloc_zeroed(4096, 0, 0);
    f.alloc.free(a, 4096, 0, S).unwrap();
    f.alloc.synchronize().unwrap();
    assert_eq!(f.alloc.reset_device(0), 0, "nothing was still handed out");

    let got = f.alloc.free(a, 4096, 0, S);
    assert_eq!(
        got.map(|_| ()),
        Err(FreeError::Invalid {
            reason: InvalidFreeReason::DoubleFree,
            addr: a,
            device: 0,
        }),
        "a second free of a block freed before the reset"
    );
    assert_eq!(f.sink.count("invalid_free"), 1);
}

/// The checked free of a block the reset freed answers with that block's scrub: one that
/// left the block unzeroed is not reported as verified.
#[test]
fn a_checked_free_after_a_reset_does_not_report_a_failed_scrub_as_verified() {
    let f = Fixture::new(manual_config());
    let held = f.malloc_zeroed(8192, 0, 0);
    f.write(0, held, &secret(8192, 0x3c));
    f.backend.inject_fault_next(); // the scrub of `held` leaves half of it
    assert_eq!(f.alloc.reset_device(0), 1);

    let got = f.alloc.free_checked(held, 8192, 0, S);
    let state = f.alloc.block_info(held).map(|b| b.state);
    assert!(
        got.is_err(),
        "the checked free reported success; the block's state is {state:?}"
    );
}

/// An allocation that a reset of its device overtakes (the reset lands while the allocation
/// is in its slow path) asks the backend for no memory on the reset device and leaves no
/// block LIVE there: after the reset, the device holds nothing handed out.
#[test]
fn an_allocation_a_reset_overtakes_leaves_nothing_live_on_the_reset_device() {
    let f = Fixture::new(manual_config());
    let calls = || f.backend.calls.load(Ordering::SeqCst);
    let at_reset = Arc::new(AtomicU64::new(0));
    let (alloc, backend, seen) = (f.alloc.clone(), f.backend.clone(), at_reset.clone());
    *f.backend.at_next_capture_query.lock().unwrap() = Some(Box::new(move || {
        alloc.reset_device(0);
        seen.store(backend.calls.load(Ordering::SeqCst), Ordering::SeqCst);
    }));
    let got = f.alloc.malloc(4096, 0, S);
    assert!(f.alloc.device_was_reset(0));
    assert!(
        matches!(got, Err(AllocError::DeviceReset { device: 0 })),
        "the overtaken allocation got {got:?}"
    );
    let calls_after_reset = calls();
    assert_eq!(
        calls_after_reset,
        at_reset.load(Ordering::SeqCst),
        "the overtaken allocation called the backend after the reset"
    );

    let live: Vec<_> = f
        .alloc
        .blocks()
        .into_iter()
        .filter(|b| b.device == 0 && b.state == BlockState::Live)
        .map(|b| b.addr)
        .collect();
    let accounting = f.alloc.check_consistency().unwrap();
    assert!(
        live.is_empty() && f.backend.host.bytes_in_use() == 0,
        "after the reset: LIVE blocks on device 0 {live:x?} (live accounting {:?}), \
         backend bytes {}",
        accounting.live,
        f.backend.host.bytes_in_use()
    );
    assert_eq!(f.alloc.malloc(4096, 0, S).ok(), None);
    assert_eq!(
        calls(),
        calls_after_reset,
        "a backend call after the refusal"
    );
    f.alloc.shutdown();
}

/// An allocation whose device's reset begins while its fresh memory is being zeroed, and
/// whose zeroing a graph capture then refuses, is refused as every allocation on a reset
/// device is (`DeviceReset`, which the interposers answer with `cudaErrorCudartUnloading`),
/// and nothing on the reset device is handed out (the memory, which the capture keeps from
/// going back, stays in the table to be scrubbed: `alloc_device_reset_leftovers.rs`).
#[test]
fn an_allocation_a_reset_overtakes_during_a_refused_zeroing_is_refused_as_reset() {
    let f = Fixture::new(manual_config());
    let got = f.malloc_while_a_reset_begins_and_a_capture_refuses_the_zeroing(4096, 0);
    let on_device_0: Vec<_> = f
        .alloc
        .blocks()
        .into_iter()
        .filter(|b| b.device == 0)
        .map(|b| (b.addr, b.state))
        .collect();
    assert!(
        matches!(got, Err(AllocError::DeviceReset { device: 0 }))
            && on_device_0
                .iter()
                .all(|&(_, state)| state != BlockState::Live),
        "the overtaken allocation got {got:?}; device 0's pool holds {on_device_0:x?}"
    );
}

/// A reset after kvhygiene shut down (a second device's `cudaDeviceReset`, after the first
/// one's shut it down) scrubs nothing, as nothing is scrubbed after shutdown: the device's
/// blocks still handed out stay so, as exit leaves them, and are not reported as freed blocks
/// left unscrubbed. Nothing is handed out of the device after it, and its holder's own free
/// is accepted as any free after shutdown.
#[test]
fn a_reset_after_shutdown_frees_nothing_and_leaves_no_freed_block_unscrubbed() {
    let f = Fixture::new(manual_config());
    let held = f.malloc_zeroed(4096, 1, 0);
    f.alloc.shutdown();
    assert_eq!(f.alloc.unscrubbed_after_shutdown(), 0);

    assert_eq!(
        f.alloc.reset_device(1),
        0,
        "the reset freed a block after shutdown"
    );
    assert_eq!(
        f.alloc.block_info(held).map(|b| b.state),
        Some(BlockState::Live)
    );
    assert_eq!(f.alloc.unscrubbed_after_shutdown(), 0);
    assert!(matches!(
        f.alloc.malloc(4096, 1, S),
        Err(AllocError::DeviceReset { device: 1 } | AllocError::ShuttingDown)
    ));
    assert!(f.alloc.free(held, 4096, 1, S).is_ok());
    assert_eq!(f.sink.count("invalid_free"), 0);
    f.alloc.check_consistency().unwrap();
}

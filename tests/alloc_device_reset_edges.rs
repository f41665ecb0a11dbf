//! `Allocator::reset_device` at its edges: frees that name a reset device but aim at memory
//! of another one, a checked free whose scrub failed, and an allocation the reset overtakes.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use common::{manual_config, secret, Fixture};
use kvhygiene::alloc::{AllocError, Allocator, BlockState, FreeError};
use kvhygiene::backend::host::HostBackend;
use kvhygiene::backend::{
    Backend, BackendError, BackendKind, DevicePtr, ScrubBatch, ScrubTicket, StreamHandle,
};
use kvhygiene::events::{InvalidFreeReason, MemorySink};

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

/// A host backend whose capture query runs a hook once (the device reset by another thread
/// while an allocation is in its slow path), and which counts allocations after it.
struct ResetDuringQuery {
    host: Arc<HostBackend>,
    alloc: OnceLock<Allocator>,
    armed: AtomicBool,
    reset_done: AtomicBool,
    allocations_after_reset: AtomicU64,
}

impl Backend for ResetDuringQuery {
    fn kind(&self) -> BackendKind {
        BackendKind::Host
    }
    fn device_count(&self) -> u32 {
        self.host.device_count()
    }
    fn allocate(&self, device: u32, len: u64) -> Result<DevicePtr, BackendError> {
        if self.reset_done.load(Ordering::SeqCst) && device == 0 {
            self.allocations_after_reset.fetch_add(1, Ordering::SeqCst);
        }
        self.host.allocate(device, len)
    }
    fn release(&self, device: u32, addr: DevicePtr, len: u64) -> Result<(), BackendError> {
        self.host.release(device, addr, len)
    }
    fn zero_fresh(
        &self,
        d: u32,
        a: DevicePtr,
        l: u64,
        s: StreamHandle,
    ) -> Result<(), BackendError> {
        self.host.zero_fresh(d, a, l, s)
    }
    unsafe fn submit_scrub(&self, batch: ScrubBatch) -> Result<Box<dyn ScrubTicket>, BackendError> {
        // SAFETY: this method's own contract, passed on unchanged.
        unsafe { self.host.submit_scrub(batch) }
    }
    fn is_capturing(&self, d: u32, _s: StreamHandle) -> Result<bool, BackendError> {
        if self.armed.swap(false, Ordering::SeqCst) {
            self.alloc.get().unwrap().reset_device(d);
            self.reset_done.store(true, Ordering::SeqCst);
        }
        Ok(false)
    }
    fn write(&self, d: u32, a: DevicePtr, src: &[u8]) -> Result<(), BackendError> {
        self.host.write(d, a, src)
    }
    fn read(&self, d: u32, a: DevicePtr, dst: &mut [u8]) -> Result<(), BackendError> {
        self.host.read(d, a, dst)
    }
    fn shutdown(&self) {
        self.host.shutdown()
    }
}

/// An allocation that a reset of its device overtakes (the reset lands while the allocation
/// is in its slow path) asks the backend for no memory on the reset device and leaves no
/// block LIVE there: after the reset, the device holds nothing handed out.
#[test]
fn an_allocation_a_reset_overtakes_leaves_nothing_live_on_the_reset_device() {
    let backend = Arc::new(ResetDuringQuery {
        host: HostBackend::new(),
        alloc: OnceLock::new(),
        armed: AtomicBool::new(false),
        reset_done: AtomicBool::new(false),
        allocations_after_reset: AtomicU64::new(0),
    });
    let sink = MemorySink::new();
    let alloc = Allocator::new(backend.clone(), manual_config(), Some(sink.clone()));
    let _ = backend.alloc.set(alloc.clone());

    backend.armed.store(true, Ordering::SeqCst);
    let got = alloc.malloc(4096, 0, S);
    assert!(backend.reset_done.load(Ordering::SeqCst));
    assert!(
        matches!(got, Err(AllocError::DeviceReset { device: 0 })),
        "the overtaken allocation got {got:?}"
    );

    let live: Vec<_> = alloc
        .blocks()
        .into_iter()
        .filter(|b| b.device == 0 && b.state == BlockState::Live)
        .map(|b| b.addr)
        .collect();
    let accounting = alloc.check_consistency().unwrap();
    let after = backend.allocations_after_reset.load(Ordering::SeqCst);
    assert!(
        live.is_empty() && after == 0,
        "after the reset: LIVE blocks on device 0 {live:x?} (live accounting {:?}), \
         backend allocations on device 0 {after}",
        accounting.live
    );
    alloc.shutdown();
}

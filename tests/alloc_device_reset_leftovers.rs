//! `Allocator::reset_device` and what it leaves behind: fresh memory an allocation got from
//! the backend while the reset began, and blocks a reset that unwound partway did not free.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use common::{manual_config, secret, TestBackend};
use kvhygiene::alloc::{AllocError, Allocator, BlockState};
use kvhygiene::backend::host::HostBackend;
use kvhygiene::backend::StreamHandle;
use kvhygiene::backend::{Backend, BackendError, BackendKind, DevicePtr, ScrubBatch, ScrubTicket};
use kvhygiene::config::Config;
use kvhygiene::events::{Event, EventSink};

const S: StreamHandle = StreamHandle(0);

/// A host backend whose zeroing of fresh memory runs a hook once: the device is reset (by
/// another thread) while an allocation is between the backend's allocation and the pool's
/// insertion of the block.
struct ResetDuringZeroing {
    host: Arc<HostBackend>,
    alloc: OnceLock<Allocator>,
    armed: AtomicBool,
}

impl Backend for ResetDuringZeroing {
    fn kind(&self) -> BackendKind {
        BackendKind::Host
    }
    fn device_count(&self) -> u32 {
        self.host.device_count()
    }
    fn allocate(&self, device: u32, len: u64) -> Result<DevicePtr, BackendError> {
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
        if self.armed.swap(false, Ordering::SeqCst) {
            self.alloc.get().unwrap().reset_device(d);
        }
        self.host.zero_fresh(d, a, l, s)
    }
    unsafe fn submit_scrub(&self, batch: ScrubBatch) -> Result<Box<dyn ScrubTicket>, BackendError> {
        // SAFETY: this method's own contract, passed on unchanged.
        unsafe { self.host.submit_scrub(batch) }
    }
    fn is_capturing(&self, _d: u32, _s: StreamHandle) -> Result<bool, BackendError> {
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

/// Fresh memory an allocation got from the backend just before the device's reset began is
/// not handed out, and the allocator keeps no memory of the backend's outside its block
/// table: afterwards the backend holds exactly the bytes the pool accounts for.
#[test]
fn fresh_memory_a_reset_overtakes_is_not_left_with_the_backend_outside_the_table() {
    let backend = Arc::new(ResetDuringZeroing {
        host: HostBackend::new(),
        alloc: OnceLock::new(),
        armed: AtomicBool::new(false),
    });
    let alloc = Allocator::new(backend.clone(), manual_config(), None);
    let _ = backend.alloc.set(alloc.clone());

    backend.armed.store(true, Ordering::SeqCst);
    let got = alloc.malloc(4096, 0, S);
    assert!(
        matches!(got, Err(AllocError::DeviceReset { device: 0 })),
        "the overtaken allocation got {got:?}"
    );

    let pool = alloc.check_consistency().unwrap().total().bytes;
    let held = backend.host.bytes_in_use();
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

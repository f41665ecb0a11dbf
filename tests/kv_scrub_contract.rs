//! `Allocator::scrub_kv_blocks` (`kvh_scrub_blocks`): what its report, records and counters
//! say about a call, and what it writes.

mod common;

use std::sync::atomic::Ordering;

use common::{manual_config, secret, Fixture};
use kvhygiene::alloc::KvLayout;
use kvhygiene::backend::StreamHandle;
use kvhygiene::events::EventKind;

/// `kvh_kv_scrubbed_blocks_total` is documented as "blocks zeroed and read back ...; those
/// that failed are in kvh_kv_failed_blocks_total too": every block counted as failed was also
/// counted as scrubbed, and a `kv_scrub` record's `failed_blocks` are among its
/// `verified_blocks`. A block whose segments span two backend batches, whose first segment
/// failed and whose second batch never ran, must not be counted failed without being counted
/// scrubbed.
#[test]
fn failed_blocks_are_a_subset_of_scrubbed_blocks_when_a_call_stops() {
    let f = Fixture::new(manual_config());
    // Three regions (K, V and a third), 22,000 blocks of 8 bytes each: 66,000 segments, so
    // block 21,845 has its first segment (65,535) in batch 1 and the other two in batch 2.
    let blocks: u64 = 22_000;
    let len = 3 * blocks * 8;
    let a = f.malloc_zeroed(len as i64, 0, 0);
    f.write(0, a, &secret(len as usize, 7));
    let layout = KvLayout {
        regions: vec![a, a + blocks * 8, a + 2 * blocks * 8],
        block_bytes: 8,
        block_stride: 8,
        blocks_per_region: blocks,
    };
    let ids: Vec<u32> = (0..blocks as u32).collect();
    // Every segment of the first batch is left dirty; the second batch cannot be submitted.
    f.backend.host.inject_skip_tail(65_536);
    f.backend.submit_budget.store(1, Ordering::SeqCst);
    let got = f.alloc.scrub_kv_blocks(&layout, &ids, 0, StreamHandle(0));
    f.backend.submit_budget.store(-1, Ordering::SeqCst);
    assert!(got.is_err(), "{got:?}");
    let record = f
        .sink
        .snapshot()
        .into_iter()
        .find_map(|e| match e.kind {
            EventKind::KvScrubbed(r) => Some(*r),
            _ => None,
        })
        .expect("a kv_scrub record");
    let c = f.alloc.stats().counters;
    assert!(
        c.kv_blocks_failed <= c.kv_blocks_scrubbed,
        "kv_blocks_failed ({}) exceeds kv_blocks_scrubbed ({}): a failed block was not counted \
         as scrubbed",
        c.kv_blocks_failed,
        c.kv_blocks_scrubbed
    );
    assert!(
        record.failed_blocks <= record.verified_blocks,
        "kv_scrub record: failed_blocks {} > verified_blocks {}",
        record.failed_blocks,
        record.verified_blocks
    );
}

/// A backend that begins process exit (as `atexit` does from another thread) right after the
/// first scrub batch it is given, then counts what it is asked afterwards.
struct ExitAfterFirstBatch {
    inner: std::sync::Arc<common::TestBackend>,
    alloc: std::sync::OnceLock<kvhygiene::alloc::Allocator>,
    armed: std::sync::atomic::AtomicBool,
}

impl kvhygiene::backend::Backend for ExitAfterFirstBatch {
    fn kind(&self) -> kvhygiene::backend::BackendKind {
        self.inner.kind()
    }
    fn device_count(&self) -> u32 {
        self.inner.device_count()
    }
    fn allocate(&self, d: u32, len: u64) -> Result<u64, kvhygiene::backend::BackendError> {
        self.inner.allocate(d, len)
    }
    fn release(&self, d: u32, a: u64, l: u64) -> Result<(), kvhygiene::backend::BackendError> {
        self.inner.release(d, a, l)
    }
    fn zero_fresh(
        &self,
        d: u32,
        a: u64,
        l: u64,
        s: StreamHandle,
    ) -> Result<(), kvhygiene::backend::BackendError> {
        self.inner.zero_fresh(d, a, l, s)
    }
    unsafe fn submit_scrub(
        &self,
        batch: kvhygiene::backend::ScrubBatch,
    ) -> Result<Box<dyn kvhygiene::backend::ScrubTicket>, kvhygiene::backend::BackendError> {
        // SAFETY: this method's own contract, passed on unchanged.
        let ticket = unsafe { self.inner.submit_scrub(batch) };
        if self.armed.swap(false, Ordering::SeqCst) {
            self.alloc.get().unwrap().begin_exit();
            self.inner.seal();
        }
        ticket
    }
    fn write(&self, d: u32, a: u64, src: &[u8]) -> Result<(), kvhygiene::backend::BackendError> {
        self.inner.write(d, a, src)
    }
    fn read(&self, d: u32, a: u64, dst: &mut [u8]) -> Result<(), kvhygiene::backend::BackendError> {
        self.inner.read(d, a, dst)
    }
    fn shutdown(&self) {
        self.inner.shutdown()
    }
}

/// Invariant 6 (ARCHITECTURE.md): no backend call is made once process exit has begun; every
/// pool checks the exit flag before each submission. A `kvh_scrub_blocks` call larger than
/// one backend batch that is under way when exit begins must not submit its later batches.
#[test]
fn a_kv_scrub_submits_no_batch_after_exit_began() {
    let test_backend = common::TestBackend::new(kvhygiene::backend::host::HostBackend::new());
    let backend = std::sync::Arc::new(ExitAfterFirstBatch {
        inner: test_backend.clone(),
        alloc: std::sync::OnceLock::new(),
        armed: std::sync::atomic::AtomicBool::new(false),
    });
    let alloc = kvhygiene::alloc::Allocator::new(backend.clone(), manual_config(), None);
    assert!(backend.alloc.set(alloc.clone()).is_ok());
    // Two regions of 40,000 blocks: 80,000 segments, two backend batches.
    let blocks: u64 = 40_000;
    let len = 2 * blocks * 8;
    let a = alloc.malloc(len as i64, 0, StreamHandle(0)).unwrap();
    let layout = KvLayout {
        regions: vec![a, a + blocks * 8],
        block_bytes: 8,
        block_stride: 8,
        blocks_per_region: blocks,
    };
    let ids: Vec<u32> = (0..blocks as u32).collect();
    backend.armed.store(true, Ordering::SeqCst);
    let got = alloc.scrub_kv_blocks(&layout, &ids, 0, StreamHandle(0));
    assert_eq!(
        test_backend.calls_after_seal.load(Ordering::SeqCst),
        0,
        "the KV scrub called the backend after exit began ({} batches submitted; result: {:?})",
        test_backend.batches.lock().unwrap().len(),
        got.map(|r| r.segments)
    );
}

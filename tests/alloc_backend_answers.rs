//! How the allocator treats what a backend answers: a batch whose ticket returns fewer results
//! than it had segments, and a scrub submission refused for lack of memory. A segment without
//! a result was never verified, so no path may report its block clean; an error code names
//! the condition that happened.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use common::{manual_config, secret};
use kvhygiene::alloc::{Allocator, FreeError, KvLayout};
use kvhygiene::backend::host::HostBackend;
use kvhygiene::backend::verify::SegmentResult;
use kvhygiene::backend::{
    Backend, BackendError, BackendKind, DevicePtr, ScrubBatch, ScrubTicket, StreamHandle,
};
use kvhygiene::config::{Config, KvGateMode, KvGateScope};
use kvhygiene::context::Context;
use kvhygiene::ffi::kvh_result;

/// A host backend that can leave the last segment of a batch out (neither scrubbed nor
/// answered for) and refuse scrub submissions with `OutOfMemory`.
struct Answers {
    host: Arc<HostBackend>,
    /// While set, every batch loses its last segment.
    drop_last: AtomicBool,
    /// Submissions still to refuse with `OutOfMemory`.
    refuse_oom: AtomicU64,
    /// While set, every full-verify submission (a quarantine re-scrub) is refused with
    /// `OutOfMemory`.
    refuse_full_verify: AtomicBool,
    /// While set, `zero_fresh` and `release` fail with a driver error.
    fail_zero_and_release: AtomicBool,
}

impl Answers {
    fn new() -> Arc<Self> {
        Arc::new(Answers {
            host: HostBackend::new(),
            drop_last: AtomicBool::new(false),
            refuse_oom: AtomicU64::new(0),
            refuse_full_verify: AtomicBool::new(false),
            fail_zero_and_release: AtomicBool::new(false),
        })
    }

    /// A driver error for `what` while `fail_zero_and_release` is set.
    fn injected(&self, what: &str) -> Result<(), BackendError> {
        if self.fail_zero_and_release.load(Ordering::SeqCst) {
            return Err(BackendError::Other(format!("injected {what} failure")));
        }
        Ok(())
    }
}

impl Backend for Answers {
    fn kind(&self) -> BackendKind {
        BackendKind::Host
    }
    fn device_count(&self) -> u32 {
        self.host.device_count()
    }
    fn allocate(&self, d: u32, len: u64) -> Result<DevicePtr, BackendError> {
        self.host.allocate(d, len)
    }
    fn release(&self, d: u32, a: DevicePtr, len: u64) -> Result<(), BackendError> {
        self.injected("release")?;
        self.host.release(d, a, len)
    }
    fn zero_fresh(
        &self,
        d: u32,
        a: DevicePtr,
        len: u64,
        s: StreamHandle,
    ) -> Result<(), BackendError> {
        self.injected("zeroing")?;
        self.host.zero_fresh(d, a, len, s)
    }
    unsafe fn submit_scrub(&self, mut b: ScrubBatch) -> Result<Box<dyn ScrubTicket>, BackendError> {
        if b.options.full_verify && self.refuse_full_verify.load(Ordering::SeqCst) {
            return Err(BackendError::OutOfMemory {
                device: b.device,
                requested: 4096,
            });
        }
        if self
            .refuse_oom
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(BackendError::OutOfMemory {
                device: b.device,
                requested: 4096,
            });
        }
        if self.drop_last.load(Ordering::SeqCst) {
            b.segments.pop();
        }
        // SAFETY: 1-2. this method's own contract, passed on unchanged (fewer segments).
        let inner = unsafe { self.host.submit_scrub(b) }?;
        Ok(Box::new(Passthrough(inner)))
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

struct Passthrough(Box<dyn ScrubTicket>);

impl ScrubTicket for Passthrough {
    fn poll(&mut self) -> Result<Option<Vec<SegmentResult>>, BackendError> {
        self.0.poll()
    }
    fn wait(&mut self) -> Result<Vec<SegmentResult>, BackendError> {
        self.0.wait()
    }
}

const BLOCK: u64 = 256;
const BLOCKS: u64 = 4;

/// A K and a V region of `BLOCKS` blocks in one live allocation, filled with a secret.
fn cache(alloc: &Allocator, backend: &Answers) -> KvLayout {
    let len = 2 * BLOCKS * BLOCK;
    let a = alloc.malloc(len as i64, 0, StreamHandle(1)).unwrap();
    backend.write(0, a, &secret(len as usize, 0x6b)).unwrap();
    KvLayout {
        regions: vec![a, a + BLOCKS * BLOCK],
        block_bytes: BLOCK,
        block_stride: BLOCK,
        blocks_per_region: BLOCKS,
    }
}

fn segment_is_zero(backend: &Answers, addr: u64) -> bool {
    let mut v = vec![1u8; BLOCK as usize];
    backend.read(0, addr, &mut v).unwrap();
    v.iter().all(|&x| x == 0)
}

/// The pool itself fails a batch answered short (its blocks are quarantined, never CLEAN).
#[test]
fn a_freed_block_whose_scrub_was_answered_short_is_not_made_clean() {
    let backend = Answers::new();
    let alloc = Allocator::new(backend.clone(), manual_config(), None);
    let a = alloc.malloc(4096, 0, StreamHandle(0)).unwrap();
    backend.drop_last.store(true, Ordering::SeqCst);
    let err = alloc.free_checked(a, 4096, 0, StreamHandle(0)).unwrap_err();
    assert_eq!(err, FreeError::VerifyFailed { addr: a });
}

/// `kvh_scrub_blocks`: a block one of whose segments the backend never answered for was not
/// verified; the call names it as failed or returns an error, never `Ok` with it clean.
#[test]
fn a_kv_scrub_answered_short_does_not_report_the_unanswered_block_clean() {
    let backend = Answers::new();
    let alloc = Allocator::new(backend.clone(), manual_config(), None);
    let layout = cache(&alloc, &backend);
    backend.drop_last.store(true, Ordering::SeqCst);
    // Segments: block 2 (K, V), block 3 (K, V); block 3's V segment is left out.
    let r = alloc.scrub_kv_blocks(&layout, &[2, 3], 0, StreamHandle(2));
    let v3 = layout.regions[1] + 3 * BLOCK;
    let reported_clean = matches!(&r, Ok(report) if !report.failed.contains(&3));
    assert!(
        !reported_clean,
        "block 3 reported clean though its V segment was never verified (it reads zero: {}): {r:?}",
        segment_is_zero(&backend, v3)
    );
}

/// The eviction gate hands a block to a new request only after its scrub verified it: a gate
/// scrub answered short must not hand over the block it did not verify.
#[test]
fn the_gate_does_not_hand_over_a_block_whose_scrub_was_answered_short() {
    let backend = Answers::new();
    let config = Config {
        kv_gate: KvGateMode::Scrub,
        kv_gate_scope: KvGateScope::Request,
        ..manual_config()
    };
    let alloc = Allocator::new(backend.clone(), config, None);
    let layout = cache(&alloc, &backend);
    let as_request = |request: &str| {
        let ctx = Context::new(Some("t"), Some(request), None).unwrap();
        Context::set_current(ctx)
    };
    // Request w owns block 1 and writes its keys and values into it.
    let previous = as_request("w");
    alloc
        .claim_kv_blocks(&layout, &[1], 0, StreamHandle(2))
        .unwrap();
    for &base in &layout.regions {
        backend
            .write(0, base + BLOCK, &secret(BLOCK as usize, 0x77))
            .unwrap();
    }
    // Request x is given block 1: the gate scrubs it, and the backend leaves V out.
    as_request("x");
    backend.drop_last.store(true, Ordering::SeqCst);
    let r = alloc.claim_kv_blocks(&layout, &[1], 0, StreamHandle(2));
    Context::set_current(previous);
    let handed_over =
        matches!(&r, Ok(report) if !report.refused.contains(&1) && !report.taken.contains(&1));
    let v1 = layout.regions[1] + BLOCK;
    assert!(
        !handed_over || segment_is_zero(&backend, v1),
        "block 1 handed to x still holding w's bytes in its V segment: {r:?}"
    );
}

/// A checked free whose scrub submission was refused for lack of memory does not report a
/// CUDA graph capture (no stream was capturing).
#[test]
fn a_checked_free_deferred_by_out_of_memory_does_not_report_a_capture() {
    let backend = Answers::new();
    let alloc = Allocator::new(backend.clone(), manual_config(), None);
    let a = alloc.malloc(4096, 0, StreamHandle(0)).unwrap();
    backend.refuse_oom.store(1, Ordering::SeqCst);
    let r = alloc.free_checked(a, 4096, 0, StreamHandle(0));
    if let Err(e) = &r {
        assert!(
            !matches!(e, FreeError::Backend(BackendError::StreamCapturing { .. })),
            "out of memory reported as a graph capture: {e}"
        );
        assert_ne!(
            kvh_result::from(e),
            kvh_result::KVH_ERR_CAPTURE_ACTIVE,
            "{e}"
        );
        assert_eq!(
            kvh_result::from(e),
            kvh_result::KVH_ERR_OUT_OF_MEMORY,
            "{e}"
        );
    }
}

/// `synchronize` waits until every freed block's scrub was verified and applied, or says why
/// it could not: a submission refused once for lack of memory does not leave it returning
/// success over a block whose scrub never ran.
#[test]
fn synchronize_does_not_succeed_over_a_scrub_deferred_by_out_of_memory() {
    use kvhygiene::alloc::BlockState;
    let backend = Answers::new();
    let alloc = Allocator::new(backend.clone(), manual_config(), None);
    let a = alloc.malloc(4096, 0, StreamHandle(0)).unwrap();
    backend.write(0, a, &secret(4096, 0x3c)).unwrap();
    alloc.free(a, 4096, 0, StreamHandle(0)).unwrap();
    backend.refuse_oom.store(1, Ordering::SeqCst);
    let r = alloc.synchronize();
    let state = alloc.block_info(a).unwrap().state;
    assert!(
        r.is_err() || state != BlockState::Pending,
        "synchronize returned {r:?} while the freed block is still {state:?} (never scrubbed)"
    );
}

/// `synchronize` waits for every scrub, quarantine re-scrubs included, or says why it could
/// not (include/kvhygiene.h: `KVH_ERR_BACKEND` "when the backend refused some scrubs for
/// now"): a re-scrub refused for lack of memory does not leave it returning success over a
/// quarantined block whose re-scrub never ran.
#[test]
fn synchronize_does_not_succeed_over_a_rescrub_deferred_by_out_of_memory() {
    use kvhygiene::alloc::BlockState;
    let backend = Answers::new();
    let alloc = Allocator::new(backend.clone(), manual_config(), None);
    let a = alloc.malloc(4096, 0, StreamHandle(0)).unwrap();
    backend.write(0, a, &secret(4096, 0x5d)).unwrap();
    // The re-scrub of a quarantined block finds no memory for its batch.
    backend.refuse_full_verify.store(true, Ordering::SeqCst);
    // The scrub leaves half the block: verification fails and the block is quarantined.
    backend.host.inject_skip_tail(1);
    let checked = alloc.free_checked(a, 4096, 0, StreamHandle(0));
    assert_eq!(checked, Err(FreeError::VerifyFailed { addr: a }));
    let r = alloc.synchronize();
    let state = alloc.block_info(a).map(|b| b.state);
    assert!(
        r.is_err() || state != Some(BlockState::Quarantined),
        "synchronize returned {r:?} while the quarantined block's re-scrub never ran ({state:?})"
    );
}

/// Opening a device (its context, its kernels' module) can run out of memory, and the backend
/// answers `OutOfMemory` for it (docs/cuda.md, "Out of memory"). When an allocation meets it in
/// the graph-capture query that opens the device, the allocation fails as out of memory
/// (`KVH_ERR_OUT_OF_MEMORY`, counted in `out_of_memory`), as it does when `allocate` meets it,
/// not as a driver fault (`KVH_ERR_BACKEND`, counted in `backend_errors`).
#[test]
fn out_of_memory_from_the_capture_query_of_an_allocation_is_out_of_memory() {
    use kvhygiene::alloc::AllocError;
    let backend = common::TestBackend::new(HostBackend::new());
    *backend.capture_query_error.lock().unwrap() = Some(BackendError::OutOfMemory {
        device: 0,
        requested: 0,
    });
    let alloc = Allocator::new(backend, manual_config(), None);
    let err = alloc.malloc(4096, 0, StreamHandle(0)).unwrap_err();
    let c = alloc.stats().counters;
    assert_eq!(
        (kvh_result::from(&err), c.out_of_memory, c.backend_errors),
        (kvh_result::KVH_ERR_OUT_OF_MEMORY, 1, 0),
        "an allocation that ran out of memory opening the device failed with {err:?}"
    );
    assert!(matches!(err, AllocError::OutOfMemory { .. }), "{err:?}");
}

/// A stream capturing a CUDA graph must not see a driver allocation, so an allocation asks
/// whether its stream captures before it asks the backend for memory. When that query fails
/// (here for lack of memory, as opening a device can), nothing is known about the capture:
/// the allocation fails as out of memory without asking the backend for memory, whatever its
/// size, including a size whose class is larger than the request rounded to 2 MiB.
#[test]
fn an_allocation_whose_capture_query_ran_out_of_memory_allocates_nothing_at_any_size() {
    use kvhygiene::alloc::AllocError;
    let backend = common::TestBackend::new(HostBackend::new());
    backend.capturing.store(true, Ordering::SeqCst);
    *backend.capture_query_error.lock().unwrap() = Some(BackendError::OutOfMemory {
        device: 0,
        requested: 0,
    });
    let alloc = Allocator::new(backend.clone(), manual_config(), None);
    let size: i64 = (32 << 20) + 1;
    let r = alloc.malloc(size, 0, StreamHandle(7));
    assert!(
        matches!(r, Err(AllocError::OutOfMemory { .. })),
        "an allocation whose stream's capture was never answered returned {r:?}"
    );
    assert_eq!(
        (
            backend.calls.load(Ordering::SeqCst),
            backend.host.bytes_in_use()
        ),
        (0, 0),
        "the backend was asked for memory while the capture query had not answered"
    );
}

/// A release the backend fails leaks the memory and counts a backend error (panic_safe.rs,
/// ARCHITECTURE.md). Fresh memory whose zeroing failed is given back; when that release fails
/// too, both failures are counted: two backend errors, not one.
#[test]
fn a_failed_release_of_fresh_memory_that_could_not_be_zeroed_is_counted() {
    let backend = Answers::new();
    backend.fail_zero_and_release.store(true, Ordering::SeqCst);
    let alloc = Allocator::new(backend.clone(), manual_config(), None);
    assert!(alloc.malloc(4096, 0, StreamHandle(0)).is_err());
    assert!(backend.host.bytes_in_use() > 0, "the memory was leaked");
    assert_eq!(
        alloc.stats().counters.backend_errors,
        2,
        "the zeroing failure and the failed release of the leaked memory"
    );
}

/// Set in the child process of the test below.
const SAID_ONCE_CHILD: &str = "KVHYGIENE_TEST_BACKEND_ERROR_SAID_ONCE_CHILD";

/// A backend error is kept as `last_async_error` (the metrics carry only `kvh_async_error`)
/// and said once on stderr, where an operator reads first: the first error's text, not one
/// line per failure. Run in a child process, whose stderr the test reads.
#[test]
fn a_backend_error_is_said_once_on_stderr() {
    if std::env::var_os(SAID_ONCE_CHILD).is_some() {
        let backend = Answers::new();
        let alloc = Allocator::new(backend.clone(), manual_config(), None);
        let blocks: Vec<u64> = (0..3)
            .map(|_| alloc.malloc(4096, 0, StreamHandle(0)).unwrap())
            .collect();
        // Each clean block's release fails, once the device gives them back.
        backend.fail_zero_and_release.store(true, Ordering::SeqCst);
        for p in blocks {
            alloc.free(p, 4096, 0, StreamHandle(0)).unwrap();
            // Sticky: an error once the first release failed.
            let _ = alloc.synchronize();
            alloc.empty_cache();
        }
        let kept = alloc.stats().last_async_error;
        assert!(kept.is_some_and(|e| e.contains("injected")), "nothing kept");
        return;
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "a_backend_error_is_said_once_on_stderr",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(SAID_ONCE_CHILD, "1")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let said: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("the memory backend reported an error"))
        .collect();
    assert_eq!(said.len(), 1, "{err}");
    assert!(said[0].contains("injected"), "{}", said[0]);
}

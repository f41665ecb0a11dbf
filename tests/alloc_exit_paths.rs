//! Exit and synchronisation paths of the pool: what happens to work that is under way when
//! process exit begins, and what `synchronize` says about blocks whose scrub never ran.

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use common::{manual_config, secret, Fixture};
use kvhygiene::alloc::BlockState;
use kvhygiene::backend::StreamHandle;

const S: StreamHandle = StreamHandle(0);

/// Invariant 6: once exit has begun no backend call is made. A thread that was waiting for a
/// batch when exit began applies its results afterwards; a block that batch quarantines is
/// abandoned there, and its re-scrub is not submitted to the backend.
#[test]
fn a_batch_applied_after_exit_began_submits_no_rescrub() {
    let f = Arc::new(Fixture::new(manual_config()));
    let a = f.malloc_zeroed(4096, 0, 0);
    f.write(0, a, &secret(4096, 0x71));
    f.backend.inject_fault_next(); // the free's scrub leaves half the block: quarantine
    f.alloc.free(a, 4096, 0, S).unwrap();
    f.backend.set_gate(false);
    let syncer = {
        let f = f.clone();
        std::thread::spawn(move || {
            let _ = f.alloc.synchronize();
        })
    };
    // The syncer submitted the batch and now waits for it with the pool lock dropped.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while f.backend.batches.lock().unwrap().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "batch never submitted"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    std::thread::sleep(Duration::from_millis(50));
    f.alloc.begin_exit();
    f.backend.seal();
    f.backend.set_gate(true);
    syncer.join().unwrap();
    std::thread::sleep(Duration::from_millis(30)); // a flusher tick would have run
    assert_eq!(
        f.backend.calls_after_seal.load(Ordering::SeqCst),
        0,
        "backend called after exit began ({} batches submitted in all)",
        f.backend.batches.lock().unwrap().len()
    );
}

/// `synchronize` returns success only when every freed block's scrub was verified and applied
/// (include/kvhygiene.h, `kvh_synchronize`). A free accepted after shutdown leaves its block
/// PENDING for good (no scrub can run): synchronize must not report success over it.
#[test]
fn synchronize_after_shutdown_does_not_succeed_over_an_unscrubbed_free() {
    let f = Fixture::new(manual_config());
    let a = f.malloc_zeroed(4096, 0, 0);
    f.write(0, a, &secret(4096, 0x72));
    f.alloc.shutdown();
    f.alloc.free(a, 4096, 0, S).unwrap();
    assert_eq!(f.alloc.block_info(a).unwrap().state, BlockState::Pending);
    let r = f.alloc.synchronize();
    assert!(
        r.is_err(),
        "synchronize returned {r:?} while a freed block was never scrubbed (still PENDING)"
    );
}

/// `free_checked` reports the outcome of its block's scrub once that outcome is known: a
/// scrub that failed verification (the block is quarantined) is reported as such, also when
/// process exit began while the caller was waiting for it.
#[test]
fn a_checked_free_whose_scrub_failed_reports_it_when_exit_began_meanwhile() {
    use kvhygiene::alloc::FreeError;
    let f = Arc::new(Fixture::new(manual_config()));
    let a = f.malloc_zeroed(4096, 0, 0);
    f.write(0, a, &secret(4096, 0x73));
    f.backend.inject_fault_next(); // this block's scrub leaves half of it: verification fails
    f.backend.set_gate(false);
    let checker = {
        let f = f.clone();
        std::thread::spawn(move || f.alloc.free_checked(a, 4096, 0, S))
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while f.backend.batches.lock().unwrap().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "batch never submitted"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    std::thread::sleep(Duration::from_millis(50)); // the checker waits for its batch
    f.alloc.begin_exit();
    f.backend.set_gate(true);
    let r = checker.join().unwrap();
    let state = f.alloc.block_info(a).map(|b| b.state);
    assert_eq!(
        state,
        Some(BlockState::Quarantined),
        "the scrub's verdict was applied"
    );
    assert_eq!(
        r,
        Err(FreeError::VerifyFailed { addr: a }),
        "the checked free did not report its block's failed verification"
    );
}

/// Invariant 6 (ARCHITECTURE.md): no backend call is made once process exit has begun. An
/// allocation that misses the pool first submits the open batches (malloc needs memory); when
/// exit begins during that submission, the allocation must not go on to ask the backend for
/// fresh memory (nor whether its stream is capturing): it fails with `ShuttingDown`.
#[test]
fn an_allocation_makes_no_backend_call_once_exit_began_during_its_flush() {
    let test_backend = common::TestBackend::new(kvhygiene::backend::host::HostBackend::new());
    let alloc = kvhygiene::alloc::Allocator::new(test_backend.clone(), manual_config(), None);
    let a = alloc.malloc(4096, 0, S).unwrap();
    alloc.free(a, 4096, 0, S).unwrap(); // left in its open batch (long batch delay)
    common::begin_exit_after_next_submit(&test_backend, &alloc);
    // Another size class: a pool miss, so the open batch is submitted, and exit begins there.
    let r = alloc.malloc(1 << 20, 0, S);
    assert_eq!(
        test_backend.calls_after_seal.load(Ordering::SeqCst),
        0,
        "the allocation called the backend after exit began (result: {r:?})"
    );
}

/// A host backend that begins process exit (as an `atexit` handler on another thread would)
/// while its next `allocate` call is under way, then counts every backend call made after.
struct ExitDuringAllocate {
    host: Arc<kvhygiene::backend::host::HostBackend>,
    alloc: std::sync::OnceLock<kvhygiene::alloc::Allocator>,
    armed: std::sync::atomic::AtomicBool,
    /// `allocate` calls let through before the armed one.
    pass_first: std::sync::atomic::AtomicU64,
    sealed: std::sync::atomic::AtomicBool,
    calls_after_exit: std::sync::Mutex<Vec<&'static str>>,
}

impl ExitDuringAllocate {
    /// Over `host`, armed: exit begins during the `allocate` call after `pass_first` others.
    fn new(host: Arc<kvhygiene::backend::host::HostBackend>, pass_first: u64) -> Arc<Self> {
        Arc::new(ExitDuringAllocate {
            host,
            alloc: std::sync::OnceLock::new(),
            armed: std::sync::atomic::AtomicBool::new(true),
            pass_first: std::sync::atomic::AtomicU64::new(pass_first),
            sealed: std::sync::atomic::AtomicBool::new(false),
            calls_after_exit: std::sync::Mutex::new(Vec::new()),
        })
    }

    fn note(&self, what: &'static str) {
        if self.sealed.load(Ordering::SeqCst) {
            self.calls_after_exit.lock().unwrap().push(what);
        }
    }
}

impl kvhygiene::backend::Backend for ExitDuringAllocate {
    fn kind(&self) -> kvhygiene::backend::BackendKind {
        kvhygiene::backend::BackendKind::Host
    }
    fn device_count(&self) -> u32 {
        self.host.device_count()
    }
    fn allocate(
        &self,
        device: u32,
        len: u64,
    ) -> Result<kvhygiene::backend::DevicePtr, kvhygiene::backend::BackendError> {
        self.note("allocate");
        let r = self.host.allocate(device, len);
        let passed = self
            .pass_first
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if !passed && self.armed.swap(false, Ordering::SeqCst) {
            self.alloc.get().unwrap().begin_exit();
            self.sealed.store(true, Ordering::SeqCst);
        }
        r
    }
    fn release(
        &self,
        device: u32,
        addr: kvhygiene::backend::DevicePtr,
        len: u64,
    ) -> Result<(), kvhygiene::backend::BackendError> {
        self.note("release");
        self.host.release(device, addr, len)
    }
    fn zero_fresh(
        &self,
        device: u32,
        addr: kvhygiene::backend::DevicePtr,
        len: u64,
        stream: StreamHandle,
    ) -> Result<(), kvhygiene::backend::BackendError> {
        self.note("zero_fresh");
        self.host.zero_fresh(device, addr, len, stream)
    }
    unsafe fn submit_scrub(
        &self,
        batch: kvhygiene::backend::ScrubBatch,
    ) -> Result<Box<dyn kvhygiene::backend::ScrubTicket>, kvhygiene::backend::BackendError> {
        self.note("submit_scrub");
        // SAFETY: this method's own contract, passed on unchanged.
        unsafe { self.host.submit_scrub(batch) }
    }
    fn is_capturing(
        &self,
        device: u32,
        stream: StreamHandle,
    ) -> Result<bool, kvhygiene::backend::BackendError> {
        self.note("is_capturing");
        self.host.is_capturing(device, stream)
    }
    fn write(
        &self,
        device: u32,
        addr: kvhygiene::backend::DevicePtr,
        src: &[u8],
    ) -> Result<(), kvhygiene::backend::BackendError> {
        self.host.write(device, addr, src)
    }
    fn read(
        &self,
        device: u32,
        addr: kvhygiene::backend::DevicePtr,
        dst: &mut [u8],
    ) -> Result<(), kvhygiene::backend::BackendError> {
        self.host.read(device, addr, dst)
    }
    fn inject_fault(&self, segments: u64) -> Result<(), kvhygiene::backend::BackendError> {
        self.host.inject_fault(segments)
    }
    fn shutdown(&self) {
        self.host.shutdown()
    }
}

/// Invariant 6 (ARCHITECTURE.md): no backend call is made once process exit has begun. When
/// exit begins while an allocation's fresh memory is being obtained from the backend, the
/// allocation fails with `ShuttingDown` without a further backend call: the memory is neither
/// zeroed nor given back once exit has begun. It was never handed out, so it holds no
/// caller's data: `synchronize` after exit, which reports freed blocks left unscrubbed
/// (`unscrubbed_after_shutdown`), finds none.
#[test]
fn an_allocation_makes_no_backend_call_once_exit_began_during_its_fresh_allocation() {
    let backend = ExitDuringAllocate::new(kvhygiene::backend::host::HostBackend::new(), 0);
    let alloc = kvhygiene::alloc::Allocator::new(backend.clone(), manual_config(), None);
    let _ = backend.alloc.set(alloc.clone());
    let r = alloc.malloc(4096, 0, S);
    let calls = backend.calls_after_exit.lock().unwrap().clone();
    assert!(
        calls.is_empty(),
        "backend calls made after exit began: {calls:?} (allocation result: {r:?})"
    );
    assert!(
        matches!(r, Err(kvhygiene::alloc::AllocError::ShuttingDown)),
        "{r:?}"
    );
    // The allocation that failed is not counted as one.
    assert_eq!(alloc.stats().counters.allocations, 0);
    assert_eq!(
        alloc.unscrubbed_after_shutdown(),
        0,
        "no block was ever freed"
    );
    assert_eq!(alloc.synchronize(), Ok(()));
}

/// Invariant 6 (ARCHITECTURE.md): no backend call is made once process exit has begun. An
/// allocation the device cannot hold at its class's capacity goes through out-of-memory
/// recovery; when exit begins while its last attempt at the class's capacity is under way,
/// the allocation fails with `ShuttingDown` and makes no further backend call (no attempt at
/// the request's own size either).
#[test]
fn an_allocation_makes_no_backend_call_once_exit_began_during_its_last_attempt_at_its_class() {
    // Holds 32 MiB + 1 byte rounded to 2 MiB (34 MiB), not its class (36 MiB). The pool
    // miss's attempt passes; exit begins during out-of-memory recovery's.
    let host = kvhygiene::backend::host::HostBackend::with_capacity(35 << 20);
    let backend = ExitDuringAllocate::new(host, 1);
    let alloc = kvhygiene::alloc::Allocator::new(backend.clone(), manual_config(), None);
    let _ = backend.alloc.set(alloc.clone());
    let r = alloc.malloc((32 << 20) + 1, 0, S);
    assert!(
        backend.sealed.load(Ordering::SeqCst),
        "exit began during the second attempt"
    );
    let calls = backend.calls_after_exit.lock().unwrap().clone();
    assert!(
        calls.is_empty(),
        "backend calls made after exit began: {calls:?} (allocation result: {r:?})"
    );
    assert!(
        matches!(r, Err(kvhygiene::alloc::AllocError::ShuttingDown)),
        "{r:?}"
    );
}

/// `kvh_shutdown` (src/ffi/mod.rs): "Later allocations are served only from clean pooled
/// blocks (already verified, no device call), so teardown code that still allocates does not
/// fail". From 256 MiB up a fresh block is sized to its request (`SizeClass::for_fresh`) and,
/// once clean, waits on the free list of such blocks: after shutdown the same request is
/// served from it, as a smaller request is served from its class's clean block.
#[test]
fn a_clean_block_sized_to_its_request_is_served_after_shutdown() {
    let f = Fixture::new(manual_config());
    let size: i64 = (256 << 20) + 1;
    let p = f.alloc.malloc(size, 0, S).unwrap();
    f.alloc.free(p, size, 0, S).unwrap();
    f.alloc.synchronize().unwrap();
    assert_eq!(
        f.alloc.block_info(p).map(|b| b.state),
        Some(BlockState::Clean),
        "precondition: the block is clean and pooled"
    );
    f.alloc.shutdown();
    f.backend.seal();
    let again = f.alloc.malloc(size, 0, S);
    assert_eq!(
        again,
        Ok(p),
        "after shutdown, a request of {size} bytes was not served from the clean pooled block \
         of {size} bytes"
    );
    assert_eq!(f.backend.calls_after_seal.load(Ordering::SeqCst), 0);
}

/// Two allocators over one backend (which `Allocator` allows): the first one's `shutdown`
/// stops the backend, and the second learns of it only from the backend's answer. From that
/// answer on it is shut down too: `synchronize` does not succeed over the free whose scrub
/// the backend refused, and a checked free returns `ShutDown` instead of waiting for a scrub
/// that never comes.
#[test]
fn an_allocator_whose_backend_stopped_under_it_is_shut_down() {
    use kvhygiene::alloc::{Allocator, FreeError};
    use kvhygiene::backend::host::HostBackend;
    use kvhygiene::config::Config;
    let host = HostBackend::new();
    let cfg = Config {
        batch_max_delay_us: 10_000_000, // no flusher round submits meanwhile
        ..Config::default()
    };
    let first = Allocator::new(host.clone(), cfg.clone(), None);
    let second = Allocator::new(host, cfg, None);
    let p = second.malloc(4096, 0, S).unwrap();
    let q = second.malloc(4096, 0, S).unwrap();
    first.shutdown();
    second.free(q, 4096, 0, S).unwrap();
    let r = second.synchronize();
    assert!(
        r.is_err(),
        "synchronize returned {r:?} over a free the stopped backend never scrubbed ({:?})",
        second.block_info(q).map(|b| b.state)
    );
    assert!(second.is_shut_down());
    let (tx, rx) = std::sync::mpsc::channel();
    let waiter = second.clone();
    std::thread::spawn(move || {
        let _ = tx.send(waiter.free_checked(p, 4096, 0, S));
    });
    let checked = rx.recv_timeout(Duration::from_secs(10));
    assert!(
        matches!(checked, Ok(Err(FreeError::ShutDown { .. }))),
        "a checked free after the backend stopped gave {checked:?}"
    );
    second.check_consistency().unwrap();
}

//! Whole-pool waits and checked frees at their edges: a batch another thread took out of the
//! pool whose wait panicked, exit beginning between a release decided
//! under the pool lock and the backend call made after it, and what `synchronize` reports
//! about quarantined blocks once exit began during the call.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::hooked::{checked_free_racing_synchronize, hooked, HookSink, Hooks};
use common::{begin_exit_after_next_submit, manual_config, secret, Fixture};
use kvhygiene::alloc::{Allocator, BlockState};
use kvhygiene::backend::host::HostBackend;
use kvhygiene::backend::verify::SegmentResult;
use kvhygiene::backend::{
    Backend, BackendError, BackendKind, DevicePtr, ScrubBatch, ScrubTicket, StreamHandle,
};
use kvhygiene::config::Config;

const S: StreamHandle = StreamHandle(0);

/// A host backend whose wait on the batch holding one chosen address panics (a faulty
/// backend; the C boundary catches the panic). Polling that batch never completes it, so only
/// an explicit wait reaches it.
struct PanicOne {
    host: Arc<HostBackend>,
    addr: AtomicU64,
}

struct PanicTicket {
    inner: Box<dyn ScrubTicket>,
    panics: bool,
}

impl ScrubTicket for PanicTicket {
    fn poll(&mut self) -> Result<Option<Vec<SegmentResult>>, BackendError> {
        if self.panics {
            return Ok(None);
        }
        self.inner.poll()
    }
    fn wait(&mut self) -> Result<Vec<SegmentResult>, BackendError> {
        assert!(!self.panics, "the backend's wait panicked");
        self.inner.wait()
    }
}

impl Hooks for PanicOne {
    fn host(&self) -> &HostBackend {
        &self.host
    }
    fn ticket(&self, segments: &[DevicePtr], inner: Box<dyn ScrubTicket>) -> Box<dyn ScrubTicket> {
        let chosen = self.addr.load(Ordering::SeqCst);
        let panics = chosen != 0 && segments.contains(&chosen);
        Box::new(PanicTicket { inner, panics })
    }
}

/// Every free is submitted at once; the flusher stays out of the way.
fn one_per_batch() -> Config {
    Config {
        batch_size: 1,
        batch_max_delay_us: 10_000_000,
        ..Config::default()
    }
}

/// A checked free waits for its block's scrub (`kvh_free_checked`). When another thread's
/// whole-pool wait took that block's batch out of the pool and the backend's wait on it
/// panicked, the batch's results are lost: the checked free must then return a failed
/// verification, not wait forever for a verdict no thread will apply.
#[test]
fn a_checked_free_returns_when_the_thread_holding_its_batch_unwound() {
    let backend = Arc::new(PanicOne {
        host: HostBackend::new(),
        addr: AtomicU64::new(0),
    });
    let sink = Arc::new(HookSink::default());
    let alloc = Allocator::new(hooked(&backend), one_per_batch(), Some(sink.clone()));
    let x = alloc.malloc(4096, 0, S).unwrap();
    backend.addr.store(x, Ordering::SeqCst);
    // Between the checked free's submission and its own take of the batch, another thread
    // synchronises: it takes x's batch, and its wait panics.
    let race = checked_free_racing_synchronize(&alloc, &sink, x);
    assert!(
        race.synchronize
            .as_ref()
            .is_some_and(|r| r.as_ref().is_err_and(|e| e.contains("panicked"))),
        "the other thread's synchronize did not report the panicked wait: {:?}",
        race.synchronize
    );
    assert!(
        race.checked_free.is_some(),
        "kvh_free_checked still waits, 5 s on, for the verdict of a batch whose wait panicked \
         in another thread (block {x:#x} is {:?})",
        alloc.block_info(x).map(|b| b.state)
    );
    assert!(
        matches!(
            race.checked_free,
            Some(Err(kvhygiene::alloc::FreeError::VerifyFailed { .. }))
        ),
        "a checked free whose scrub's results were lost: {:?}",
        race.checked_free
    );
}

/// `synchronize` reports success only once the scrub of every block freed before the call
/// was verified and applied (include/kvhygiene.h, `kvh_synchronize`). A block whose batch's
/// wait panicked was never verified: neither that call nor a later one may report success
/// while it stays PENDING.
#[test]
fn synchronize_does_not_report_success_over_a_block_whose_batch_was_abandoned() {
    let backend = Arc::new(PanicOne {
        host: HostBackend::new(),
        addr: AtomicU64::new(0),
    });
    let alloc = Allocator::new(hooked(&backend), one_per_batch(), None);
    let x = alloc.malloc(4096, 0, S).unwrap();
    backend.addr.store(x, Ordering::SeqCst);
    alloc.free(x, 4096, 0, S).unwrap();
    let first = alloc.synchronize();
    assert!(
        first.as_ref().is_err_and(|e| e.contains("panicked")),
        "synchronize over a batch whose wait panicked: {first:?}"
    );
    let r = alloc.synchronize();
    let state = alloc.block_info(x).map(|b| b.state);
    assert!(
        r.is_err() || state != Some(BlockState::Pending),
        "synchronize returned {r:?} while block {x:#x}, freed before the call, is {state:?}: \
         its scrub will never run"
    );
}

/// A block leaves the pool's table and is counted and recorded as released under the pool
/// lock; its memory goes back to the backend just after the lock is dropped, unless exit
/// has begun by then (invariant 6). Exit beginning in that window (here: during the
/// re-scrub submission of another block of the same batch, as an `atexit` handler on another
/// thread would) must not leave a block counted and recorded as released whose memory the
/// backend still holds, and out of the pool's accounting.
#[test]
fn a_release_overtaken_by_exit_is_neither_counted_nor_recorded_while_its_memory_is_kept() {
    let f = Fixture::new(Config {
        max_reuse: 1,
        batch_size: 2,
        ..manual_config()
    });
    // Both fresh: each is due to be retired (max_reuse = 1) once its scrub verifies.
    let b = f.malloc_zeroed(4096, 0, 0);
    let a = f.malloc_zeroed(4096, 0, 0);
    f.write(0, b, &secret(4096, 0x5b));
    // b's scrub leaves part of it unzeroed: quarantined, its re-scrub submitted at once.
    f.backend.inject_fault_next();
    f.alloc.free(b, 4096, 0, S).unwrap();
    f.alloc.free(a, 4096, 0, S).unwrap();
    assert_eq!(f.backend.batches.lock().unwrap().len(), 1);
    // Exit begins right after the next submission: the re-scrub of b, made while a's release
    // is already decided.
    begin_exit_after_next_submit(&f.backend, &f.alloc);
    let _ = f.alloc.synchronize();
    assert!(f.alloc.is_shut_down(), "exit did not begin");
    let pool_bytes = f.alloc.check_consistency().unwrap().total().bytes;
    let backend_bytes = f.backend.host.bytes_in_use();
    let released = f.alloc.stats().counters.released;
    let records = f.sink.count("release");
    assert_eq!(
        (pool_bytes, released, records),
        (backend_bytes, 0, 0),
        "the backend still holds {backend_bytes} bytes (block {a:#x}'s memory was never \
         returned: exit began first), but the pool accounts for {pool_bytes}, counts \
         {released} released blocks and recorded {records} `release` events; block {a:#x} is \
         {:?} in the table",
        f.alloc.block_info(a).map(|b| b.state)
    );
}

/// `kvh_synchronize` waits until the re-scrub of a block quarantined meanwhile has been
/// verified and applied; after a shutdown that began during the call it returns
/// `KVH_ERR_SHUTTING_DOWN` when blocks "were verified but could not be returned to the
/// device" (include/kvhygiene.h). A quarantined block whose re-scrub verifies after exit
/// began is such a block: it stays in the table, leaked, and the call must not succeed.
#[test]
fn synchronize_reports_a_quarantined_block_exit_kept_from_being_returned() {
    let f = Arc::new(Fixture::new(manual_config()));
    let a = f.malloc_zeroed(4096, 0, 0);
    f.write(0, a, &secret(4096, 0x5a));
    // Its first scrub leaves part of it unzeroed: quarantined, and re-scrubbed.
    f.backend.inject_fault_next();
    f.alloc.free(a, 4096, 0, S).unwrap();
    f.backend.set_rescrub_gate(false);
    let syncer = {
        let f = f.clone();
        std::thread::spawn(move || f.alloc.synchronize())
    };
    // The first scrub fails verification; the re-scrub is submitted and held.
    let deadline = Instant::now() + Duration::from_secs(5);
    while f.backend.batches.lock().unwrap().len() < 2 {
        assert!(
            Instant::now() < deadline,
            "the re-scrub was never submitted"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    std::thread::sleep(Duration::from_millis(20));
    f.alloc.begin_exit();
    f.backend.set_rescrub_gate(true);
    let r = syncer.join().unwrap();
    let state = f.alloc.block_info(a).map(|b| b.state);
    let backend_bytes = f.backend.host.bytes_in_use();
    assert!(
        r.is_err(),
        "synchronize returned {r:?} although exit began during the call and block {a:#x}, \
         freed before it, is {state:?}: its memory ({backend_bytes} bytes held by the \
         backend) will never be returned"
    );
}

/// A host backend whose first `release` runs a hook (exit beginning on another thread while
/// the allocator returns memory: `cuMemFree` synchronises the device, so it takes a while),
/// and which counts the calls made once exit has begun.
struct ExitDuringRelease {
    host: Arc<HostBackend>,
    #[allow(clippy::type_complexity)]
    on_first_release: Mutex<Option<Box<dyn FnOnce() + Send>>>,
    exited: std::sync::atomic::AtomicBool,
    calls_after_exit: AtomicU64,
}

impl ExitDuringRelease {
    fn note(&self) {
        if self.exited.load(Ordering::SeqCst) {
            self.calls_after_exit.fetch_add(1, Ordering::SeqCst);
        }
    }
}

impl Backend for ExitDuringRelease {
    fn kind(&self) -> BackendKind {
        BackendKind::Host
    }
    fn device_count(&self) -> u32 {
        self.host.device_count()
    }
    fn allocate(&self, device: u32, len: u64) -> Result<DevicePtr, BackendError> {
        self.note();
        self.host.allocate(device, len)
    }
    fn release(&self, device: u32, addr: DevicePtr, len: u64) -> Result<(), BackendError> {
        self.note();
        let r = self.host.release(device, addr, len);
        let hook = self.on_first_release.lock().unwrap().take();
        if let Some(hook) = hook {
            hook();
        }
        r
    }
    fn zero_fresh(
        &self,
        d: u32,
        a: DevicePtr,
        l: u64,
        s: StreamHandle,
    ) -> Result<(), BackendError> {
        self.note();
        self.host.zero_fresh(d, a, l, s)
    }
    unsafe fn submit_scrub(&self, batch: ScrubBatch) -> Result<Box<dyn ScrubTicket>, BackendError> {
        self.note();
        // SAFETY: this method's own contract, passed on unchanged.
        unsafe { self.host.submit_scrub(batch) }
    }
    fn write(&self, d: u32, a: DevicePtr, src: &[u8]) -> Result<(), BackendError> {
        self.host.write(d, a, src)
    }
    fn read(&self, d: u32, a: DevicePtr, dst: &mut [u8]) -> Result<(), BackendError> {
        self.host.read(d, a, dst)
    }
    fn shutdown(&self) {
        self.exited.store(true, Ordering::SeqCst);
        self.host.shutdown()
    }
}

/// No backend call is made once exit has begun (invariant 6), and exit is not a driver
/// fault (`backend_errors` counts faults of the driver or device). `empty_cache` returns
/// its CLEAN blocks to the backend one by one after dropping the pool lock; when exit
/// begins while it does, the blocks not yet returned must be leaked, not handed to a
/// backend that has shut down (which refuses them, and the refusal then counts as a backend
/// error and becomes the sticky asynchronous error).
#[test]
fn empty_cache_makes_no_release_call_once_exit_began_during_its_releases() {
    let backend = Arc::new(ExitDuringRelease {
        host: HostBackend::new(),
        on_first_release: Mutex::new(None),
        exited: std::sync::atomic::AtomicBool::new(false),
        calls_after_exit: AtomicU64::new(0),
    });
    let alloc = Allocator::new(backend.clone(), manual_config(), None);
    let blocks: Vec<u64> = (0..4).map(|_| alloc.malloc(4096, 0, S).unwrap()).collect();
    for &p in &blocks {
        alloc.free(p, 4096, 0, S).unwrap();
    }
    alloc.synchronize().unwrap();
    {
        let alloc = alloc.clone();
        *backend.on_first_release.lock().unwrap() = Some(Box::new(move || alloc.begin_exit()));
    }
    alloc.empty_cache();
    assert!(alloc.is_shut_down(), "exit did not begin");
    let after = backend.calls_after_exit.load(Ordering::SeqCst);
    let stats = alloc.stats();
    let errors = stats.counters.backend_errors;
    assert_eq!(
        (after, errors),
        (0, 0),
        "{after} backend calls were made after exit began, and {errors} backend errors \
         counted (stats: {:?})",
        stats.counters
    );
}

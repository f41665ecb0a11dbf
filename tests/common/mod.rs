//! Test scaffolding shared by the allocator tests: a host backend wrapped so that tests can
//! hold scrubs in flight (a gate), inspect submitted batches and count backend calls.
#![allow(dead_code)]

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use kvhygiene::alloc::Allocator;
use kvhygiene::backend::host::HostBackend;
use kvhygiene::backend::verify::SegmentResult;
use kvhygiene::backend::{
    Backend, BackendError, BackendKind, DevicePtr, ScrubBatch, ScrubTicket, StreamHandle,
};
use kvhygiene::config::Config;
use kvhygiene::events::MemorySink;

pub mod hooked;

/// A host backend whose scrubs can be held back, and which records what it was asked.
pub struct TestBackend {
    pub host: Arc<HostBackend>,
    gate: Arc<(Mutex<bool>, Condvar)>,
    /// Separate gate for quarantine re-scrubs (double pass + full verification).
    rescrub_gate: Arc<(Mutex<bool>, Condvar)>,
    pub batches: Mutex<Vec<ScrubBatch>>,
    pub calls: AtomicU64,
    pub sealed: AtomicBool,
    /// Simulates a CUDA graph capture on every stream.
    pub capturing: AtomicBool,
    /// Makes `release` fail (a driver error while returning memory).
    pub fail_release: AtomicBool,
    /// Submissions left before `submit_scrub` fails with a driver error; negative: no limit.
    pub submit_budget: AtomicI64,
    pub calls_after_seal: AtomicU64,
    /// Errors the next `allocate` calls return, one each, before the host allocates again.
    pub allocate_errors: Mutex<std::collections::VecDeque<BackendError>>,
    /// Errors the next `zero_fresh` calls return, one each, before the host zeroes again (a
    /// capture begun since the capture query refuses the zeroing of fresh memory).
    pub zero_fresh_errors: Mutex<std::collections::VecDeque<BackendError>>,
    /// What `is_capturing` returns instead of `capturing`'s answer (a failed driver query).
    pub capture_query_error: Mutex<Option<BackendError>>,
    /// Run once, right after the next submission (what another thread does meanwhile, e.g.
    /// an `atexit` handler beginning exit).
    #[allow(clippy::type_complexity)]
    pub after_next_submit: Mutex<Option<Box<dyn FnOnce() + Send>>>,
    /// Asked before each submission: an error refuses it (a capture or a shortage that only
    /// some batches meet, by stream or options).
    #[allow(clippy::type_complexity)]
    pub refuse: Mutex<Option<Box<dyn Fn(&ScrubBatch) -> Option<BackendError> + Send>>>,
    /// Run once, at the start of the next capture query (what another thread does while an
    /// allocation is in its slow path).
    #[allow(clippy::type_complexity)]
    pub at_next_capture_query: Mutex<Option<Box<dyn FnOnce() + Send>>>,
    /// Run once, at the start of the next zeroing of fresh memory (what another thread does
    /// between the backend's allocation and the pool's insertion of the block).
    #[allow(clippy::type_complexity)]
    pub at_next_zero_fresh: Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

impl TestBackend {
    pub fn new(host: Arc<HostBackend>) -> Arc<Self> {
        Arc::new(TestBackend {
            host,
            gate: Arc::new((Mutex::new(true), Condvar::new())),
            rescrub_gate: Arc::new((Mutex::new(true), Condvar::new())),
            batches: Mutex::new(Vec::new()),
            calls: AtomicU64::new(0),
            sealed: AtomicBool::new(false),
            capturing: AtomicBool::new(false),
            fail_release: AtomicBool::new(false),
            submit_budget: AtomicI64::new(-1),
            calls_after_seal: AtomicU64::new(0),
            allocate_errors: Mutex::new(std::collections::VecDeque::new()),
            zero_fresh_errors: Mutex::new(std::collections::VecDeque::new()),
            capture_query_error: Mutex::new(None),
            after_next_submit: Mutex::new(None),
            refuse: Mutex::new(None),
            at_next_capture_query: Mutex::new(None),
            at_next_zero_fresh: Mutex::new(None),
        })
    }

    /// While closed, scrubs stay in flight: poll says "not done", wait blocks.
    pub fn set_gate(&self, open: bool) {
        let (lock, cv) = &*self.gate;
        *lock.lock().unwrap() = open;
        cv.notify_all();
    }

    /// While closed, quarantine re-scrubs stay in flight.
    pub fn set_rescrub_gate(&self, open: bool) {
        let (lock, cv) = &*self.rescrub_gate;
        *lock.lock().unwrap() = open;
        cv.notify_all();
    }

    /// From now on, count every backend call (there should be none after exit begins).
    pub fn seal(&self) {
        self.sealed.store(true, Ordering::SeqCst);
    }

    fn note(&self) {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.sealed.load(Ordering::SeqCst) {
            self.calls_after_seal.fetch_add(1, Ordering::SeqCst);
        }
    }
}

impl TestBackend {
    /// `submit_scrub` without the hook: refusals as set, then the host's scrub, held back
    /// by the gates.
    ///
    /// # Safety
    /// As `Backend::submit_scrub`.
    unsafe fn submit(&self, batch: ScrubBatch) -> Result<Box<dyn ScrubTicket>, BackendError> {
        self.note();
        if self.capturing.load(Ordering::SeqCst) {
            return Err(BackendError::StreamCapturing {
                stream: batch.stream.0,
                what: "scrub launch",
            });
        }
        if let Some(e) = self.refuse.lock().unwrap().as_ref().and_then(|f| f(&batch)) {
            return Err(e);
        }
        if self.submit_budget.fetch_sub(1, Ordering::SeqCst) == 0 {
            self.submit_budget.store(0, Ordering::SeqCst);
            return Err(BackendError::Other("injected submission failure".into()));
        }
        self.batches.lock().unwrap().push(batch.clone());
        let rescrub = batch.options.double_pass && batch.options.full_verify;
        let gate = if rescrub {
            &self.rescrub_gate
        } else {
            &self.gate
        };
        let gate = gate.clone();
        // SAFETY: 1-2. this method's own contract, passed on unchanged.
        let inner = unsafe { self.host.submit_scrub(batch) }?;
        Ok(Box::new(GatedTicket { inner, gate }))
    }
}

struct GatedTicket {
    inner: Box<dyn ScrubTicket>,
    gate: Arc<(Mutex<bool>, Condvar)>,
}

impl ScrubTicket for GatedTicket {
    fn poll(&mut self) -> Result<Option<Vec<SegmentResult>>, BackendError> {
        if !*self.gate.0.lock().unwrap() {
            return Ok(None);
        }
        self.inner.poll()
    }

    fn wait(&mut self) -> Result<Vec<SegmentResult>, BackendError> {
        let (lock, cv) = &*self.gate;
        let mut open = lock.lock().unwrap();
        while !*open {
            open = cv.wait(open).unwrap();
        }
        drop(open);
        self.inner.wait()
    }
}

impl Backend for TestBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Host
    }
    fn device_count(&self) -> u32 {
        self.host.device_count()
    }
    fn devices_share_memory(&self) -> bool {
        self.host.devices_share_memory()
    }
    fn allocate(&self, device: u32, len: u64) -> Result<DevicePtr, BackendError> {
        self.note();
        if let Some(e) = self.allocate_errors.lock().unwrap().pop_front() {
            return Err(e);
        }
        self.host.allocate(device, len)
    }
    fn release(&self, device: u32, addr: DevicePtr, len: u64) -> Result<(), BackendError> {
        self.note();
        if self.fail_release.load(Ordering::SeqCst) {
            return Err(BackendError::Other("injected release failure".into()));
        }
        self.host.release(device, addr, len)
    }
    fn zero_fresh(
        &self,
        d: u32,
        a: DevicePtr,
        l: u64,
        s: StreamHandle,
    ) -> Result<(), BackendError> {
        let hook = self.at_next_zero_fresh.lock().unwrap().take();
        if let Some(hook) = hook {
            hook();
        }
        self.note();
        if let Some(e) = self.zero_fresh_errors.lock().unwrap().pop_front() {
            return Err(e);
        }
        self.host.zero_fresh(d, a, l, s)
    }
    unsafe fn submit_scrub(&self, batch: ScrubBatch) -> Result<Box<dyn ScrubTicket>, BackendError> {
        // SAFETY: this method's own contract, passed on unchanged.
        let submitted = unsafe { self.submit(batch) };
        if let Some(then) = self.after_next_submit.lock().unwrap().take() {
            then();
        }
        submitted
    }
    fn is_capturing(&self, _d: u32, _s: StreamHandle) -> Result<bool, BackendError> {
        let hook = self.at_next_capture_query.lock().unwrap().take();
        if let Some(hook) = hook {
            hook();
        }
        if self.sealed.load(Ordering::SeqCst) {
            self.calls_after_seal.fetch_add(1, Ordering::SeqCst);
        }
        if let Some(e) = self.capture_query_error.lock().unwrap().clone() {
            return Err(e);
        }
        Ok(self.capturing.load(Ordering::SeqCst))
    }
    fn write(&self, d: u32, a: DevicePtr, src: &[u8]) -> Result<(), BackendError> {
        self.host.write(d, a, src)
    }
    fn read(&self, d: u32, a: DevicePtr, dst: &mut [u8]) -> Result<(), BackendError> {
        self.host.read(d, a, dst)
    }
    fn inject_fault(&self, segments: u64) -> Result<(), BackendError> {
        self.host.inject_fault(segments)
    }
    fn shutdown(&self) {
        self.host.shutdown()
    }
}

/// A test fixture: allocator, its backend and an in-memory event sink.
pub struct Fixture {
    pub alloc: Allocator,
    pub backend: Arc<TestBackend>,
    pub sink: Arc<MemorySink>,
}

impl Fixture {
    pub fn new(config: Config) -> Self {
        Self::with_host(config, HostBackend::new())
    }

    pub fn with_host(config: Config, host: Arc<HostBackend>) -> Self {
        let backend = TestBackend::new(host);
        let sink = MemorySink::new();
        let alloc = Allocator::new(backend.clone(), config, Some(sink.clone()));
        Fixture {
            alloc,
            backend,
            sink,
        }
    }

    /// Reads `len` bytes of device memory.
    pub fn read(&self, device: u32, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        self.backend.read(device, addr, &mut buf).unwrap();
        buf
    }

    pub fn write(&self, device: u32, addr: u64, bytes: &[u8]) {
        self.backend.write(device, addr, bytes).unwrap();
    }

    /// A malloc of `size` on stream 0 whose fresh memory's zeroing a graph capture refuses
    /// (one begun since the capture query): asserts that the allocation fails. The memory is
    /// kept by the pool, never handed out unzeroed.
    pub fn malloc_whose_zeroing_a_capture_refuses(&self, size: i64) {
        self.capture_refuses_the_next_zeroing();
        let got = self.alloc.malloc(size, 0, StreamHandle(0));
        assert!(got.is_err(), "the allocation succeeded: {got:?}");
    }

    /// Allocates fresh memory on device 0 while that device's reset begins (inside the
    /// zeroing of the fresh memory), whose zeroing a graph capture begun meanwhile then
    /// refuses.
    pub fn malloc_while_a_reset_begins_and_a_capture_refuses_the_zeroing(
        &self,
        size: i64,
        stream: u64,
    ) -> Result<u64, kvhygiene::alloc::AllocError> {
        let alloc = self.alloc.clone();
        *self.backend.at_next_zero_fresh.lock().unwrap() = Some(Box::new(move || {
            alloc.reset_device(0);
        }));
        self.capture_refuses_the_next_zeroing();
        self.alloc.malloc(size, 0, StreamHandle(stream))
    }

    /// The next zeroing of fresh memory is refused as a graph capture begun since the capture
    /// query refuses it.
    fn capture_refuses_the_next_zeroing(&self) {
        self.backend
            .zero_fresh_errors
            .lock()
            .unwrap()
            .push_back(BackendError::StreamCapturing {
                stream: 0,
                what: "zeroing fresh memory",
            });
    }

    /// Allocates and asserts every byte reads zero (invariant 1).
    pub fn malloc_zeroed(&self, size: i64, device: i32, stream: u64) -> u64 {
        let addr = self
            .alloc
            .malloc(size, device, StreamHandle(stream))
            .unwrap();
        let bytes = self.read(device as u32, addr, size as usize);
        if let Some(i) = bytes.iter().position(|&b| b != 0) {
            panic!("new allocation {addr:#x} of {size} bytes has non-zero byte at {i}");
        }
        addr
    }

    /// Accounting balances: counters equal the block table, and the backend holds exactly
    /// the bytes of the blocks the pool holds. Blocks leave the table under the pool lock and
    /// go back to the backend just after it is dropped (possibly on the flusher thread), so the
    /// two sides are compared until they agree, for at most a few seconds: a real leak never
    /// converges.
    pub fn assert_balanced(&self) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let total = self.alloc.check_consistency().unwrap().total();
            let held = self.backend.host.bytes_in_use();
            if total.bytes == held {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "pool holds {} bytes, backend {held}",
                total.bytes
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
}

/// A config with a long batch delay, so tests decide when batches flush.
pub fn manual_config() -> Config {
    Config {
        batch_max_delay_us: 10_000_000,
        ..Config::default()
    }
}

/// A secret-looking pattern.
pub fn secret(len: usize, tag: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ tag | 1)
        .collect()
}

impl TestBackend {
    /// The next scrubbed segment leaves half its block unzeroed.
    pub fn inject_fault_next(&self) {
        self.host.inject_skip_tail(1);
    }
}

/// Begins process exit (as an `atexit` handler on another thread does) right after the next
/// scrub batch `backend` is given, and seals it: every backend call after that is counted in
/// `calls_after_seal`.
#[allow(dead_code)] // not every test binary uses it
pub fn begin_exit_after_next_submit(backend: &Arc<TestBackend>, alloc: &Allocator) {
    let (backend_then, alloc) = (backend.clone(), alloc.clone());
    *backend.after_next_submit.lock().unwrap() = Some(Box::new(move || {
        alloc.begin_exit();
        backend_then.seal();
    }));
}

/// Runs the test `name` of this test binary again in a child process with `flag` set in its
/// environment (the test then plays the child: a process that may abort) and returns its
/// stdout and stderr; the child's exit status is in `.0`.
pub fn rerun_as_child(name: &str, flag: &str) -> (std::process::ExitStatus, String, String) {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", name, "--nocapture"])
        .env(flag, "1")
        .output()
        .unwrap();
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

//! A host backend a test intercepts: `Hooked<H>` implements `Backend` with the host backend
//! `H::host()` gives, and lets `H` act before a submission, replace a release and wrap the
//! tickets (hold a batch, make a call panic), so that each test writes only what it changes.

use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use kvhygiene::alloc::{Allocator, FreeError, FreeReport};
use kvhygiene::backend::host::HostBackend;
use kvhygiene::backend::verify::SegmentResult;
use kvhygiene::backend::{
    Backend, BackendError, BackendKind, DevicePtr, ScrubBatch, ScrubTicket, StreamHandle,
};
use kvhygiene::events::{Event, EventKind, EventSink};

/// What a test changes of the host backend; every method but `host` defaults to the host's
/// behaviour.
pub trait Hooks: Send + Sync + 'static {
    fn host(&self) -> &HostBackend;

    /// Runs before each submission (it may panic, as a faulty backend would).
    fn before_submit(&self, _batch: &ScrubBatch) {}

    /// Refuses a submission with this error instead of passing it to the host when it
    /// returns `Some` (after `before_submit`).
    fn refuse_submit(&self, _batch: &ScrubBatch) -> Option<BackendError> {
        None
    }

    /// The ticket the pool gets for a batch of `segments` (their addresses), given the
    /// host's.
    fn ticket(
        &self,
        _segments: &[DevicePtr],
        ticket: Box<dyn ScrubTicket>,
    ) -> Box<dyn ScrubTicket> {
        ticket
    }

    /// Answers the release of `addr` instead of the host when it returns `Some` (it may
    /// panic).
    fn release(&self, _addr: DevicePtr) -> Option<Result<(), BackendError>> {
        None
    }
}

/// The backend of `H` ([`Hooks`]).
pub struct Hooked<H>(pub Arc<H>);

/// `hooks` as an allocator's backend.
pub fn hooked<H: Hooks>(hooks: &Arc<H>) -> Arc<dyn Backend> {
    Arc::new(Hooked(hooks.clone()))
}

impl<H: Hooks> Backend for Hooked<H> {
    fn kind(&self) -> BackendKind {
        BackendKind::Host
    }
    fn device_count(&self) -> u32 {
        self.0.host().device_count()
    }
    fn devices_share_memory(&self) -> bool {
        self.0.host().devices_share_memory()
    }
    fn allocate(&self, device: u32, len: u64) -> Result<DevicePtr, BackendError> {
        self.0.host().allocate(device, len)
    }
    fn release(&self, device: u32, addr: DevicePtr, len: u64) -> Result<(), BackendError> {
        match self.0.release(addr) {
            Some(answer) => answer,
            None => self.0.host().release(device, addr, len),
        }
    }
    fn zero_fresh(
        &self,
        device: u32,
        addr: DevicePtr,
        len: u64,
        stream: StreamHandle,
    ) -> Result<(), BackendError> {
        self.0.host().zero_fresh(device, addr, len, stream)
    }
    unsafe fn submit_scrub(&self, batch: ScrubBatch) -> Result<Box<dyn ScrubTicket>, BackendError> {
        self.0.before_submit(&batch);
        if let Some(e) = self.0.refuse_submit(&batch) {
            return Err(e);
        }
        let addrs: Vec<DevicePtr> = batch.segments.iter().map(|s| s.addr).collect();
        // SAFETY: this method's own contract, passed on unchanged.
        let ticket = unsafe { self.0.host().submit_scrub(batch) }?;
        Ok(self.0.ticket(&addrs, ticket))
    }
    fn write(&self, device: u32, addr: DevicePtr, src: &[u8]) -> Result<(), BackendError> {
        self.0.host().write(device, addr, src)
    }
    fn read(&self, device: u32, addr: DevicePtr, dst: &mut [u8]) -> Result<(), BackendError> {
        self.0.host().read(device, addr, dst)
    }
    fn inject_fault(&self, segments: u64) -> Result<(), BackendError> {
        self.0.host().inject_fault(segments)
    }
    fn shutdown(&self) {
        self.0.host().shutdown()
    }
}

/// A ticket whose poll panics (a faulty backend); waiting works.
pub struct PanicsOnPoll(pub Box<dyn ScrubTicket>);

impl ScrubTicket for PanicsOnPoll {
    fn poll(&mut self) -> Result<Option<Vec<SegmentResult>>, BackendError> {
        panic!("the backend panicked while polling a scrub batch");
    }
    fn wait(&mut self) -> Result<Vec<SegmentResult>, BackendError> {
        self.0.wait()
    }
}

/// A sink that runs a hook once, on the first size-mismatch event (emitted by a free after
/// the pool lock is dropped, before the free returns or a checked free starts waiting).
#[derive(Default)]
pub struct HookSink {
    #[allow(clippy::type_complexity)]
    pub on_mismatch: Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

impl EventSink for HookSink {
    fn emit(&self, event: Event) {
        if matches!(event.kind, EventKind::SizeMismatch { .. }) {
            let hook = self.on_mismatch.lock().unwrap().take();
            if let Some(hook) = hook {
                hook();
            }
        }
    }
}

/// What [`checked_free_racing_synchronize`] saw: the checked free's answer (`None`: none
/// within 5 s) and the other thread's `synchronize` result.
pub struct Race {
    pub checked_free: Option<Result<FreeReport, FreeError>>,
    pub synchronize: Option<Result<(), String>>,
}

/// A checked free of `x` (a 4096-byte block of device 0, freed with a size that differs from
/// the table's so that the free emits an event) during which another thread synchronises:
/// `sink`'s hook runs it between the checked free's submission and its own wait.
pub fn checked_free_racing_synchronize(alloc: &Allocator, sink: &HookSink, x: u64) -> Race {
    let other = Arc::new(Mutex::new(None));
    {
        let (alloc, out) = (alloc.clone(), other.clone());
        *sink.on_mismatch.lock().unwrap() = Some(Box::new(move || {
            let r = std::thread::spawn(move || alloc.synchronize())
                .join()
                .unwrap();
            *out.lock().unwrap() = Some(r);
        }));
    }
    let (tx, rx) = mpsc::channel();
    {
        let alloc = alloc.clone();
        std::thread::spawn(move || {
            let _ = tx.send(alloc.free_checked(x, 4000, 0, StreamHandle(0)));
        });
    }
    let checked_free = rx.recv_timeout(Duration::from_secs(5)).ok();
    let synchronize = other.lock().unwrap().take();
    Race {
        checked_free,
        synchronize,
    }
}

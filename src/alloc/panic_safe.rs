//! The backend as the pool sees it: a backend call that panics returns an error instead.
//!
//! A backend that panics has a bug; the C boundary would catch the panic and the process would
//! go on. Unwinding through the pool would leave it half-way through a pass: blocks marked in
//! flight in no batch, blocks taken out for release and never returned, a batch counted as
//! held by a thread that is gone, a flusher pass cut short. So every call the allocator makes
//! to its backend, and to the tickets the backend returns, goes through this wrapper, and a
//! panic becomes `BackendError::Other`: the pool then treats it as it treats any failed call
//! (a failed submission or wait quarantines the batch's blocks, a failed release leaks the
//! memory and counts a backend error); a ticket's destructor that panics is ignored (the
//! batch's results were applied already). `catch_unwind` costs nothing when nothing panics.
//!
//! The same wrapper hears when the backend stopped: an answer of `BackendError::ShuttingDown`
//! marks the allocator shut down, as its own `begin_exit` does. A backend can stop under an
//! allocator that did not stop it: another allocator over the same backend shut down, or
//! the process-exit mark reached the backend first. Without the mark the pool would leave
//! the refused batch's blocks PENDING (invariant 6) while `synchronize` reported success
//! over them and a checked free waited for a scrub that never comes.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::backend::verify::SegmentResult;
use crate::backend::{
    Backend, BackendError, BackendKind, DevicePtr, ScrubBatch, ScrubTicket, StreamHandle,
};

/// A backend whose calls never unwind into the caller, and whose stop the allocator hears
/// (see the module's documentation).
pub(crate) struct PanicSafe {
    backend: Arc<dyn Backend>,
    answers: Answers,
}

impl PanicSafe {
    /// Wraps `backend` for an allocator whose shut-down flag is `allocator_exiting`.
    pub(crate) fn new(backend: Arc<dyn Backend>, allocator_exiting: Arc<AtomicBool>) -> Self {
        PanicSafe {
            backend,
            answers: Answers { allocator_exiting },
        }
    }
}

/// Where the backend's answers are taken in, for the backend's calls and its tickets'.
#[derive(Clone)]
struct Answers {
    /// The allocator's shut-down flag (`Inner::shutting_down`, every pool's `exiting`).
    allocator_exiting: Arc<AtomicBool>,
}

impl Answers {
    /// Runs `call`, named `what` in the error a panic becomes. An answer that the backend
    /// stopped sets the allocator's flag before the caller sees it, so that the caller's
    /// next check of the flag (the pool's waits and submissions make one) stops.
    fn guarded<T>(
        &self,
        what: &'static str,
        call: impl FnOnce() -> Result<T, BackendError>,
    ) -> Result<T, BackendError> {
        let answer = catch_unwind(AssertUnwindSafe(call)).unwrap_or_else(|_| {
            Err(BackendError::Other(format!(
                "the backend panicked in {what}"
            )))
        });
        if let Err(BackendError::ShuttingDown) = answer {
            // A backend does not start again once stopped (`Backend::shutdown`).
            self.allocator_exiting.store(true, Ordering::Release);
        }
        answer
    }
}

impl Backend for PanicSafe {
    fn kind(&self) -> BackendKind {
        self.backend.kind()
    }

    fn device_count(&self) -> u32 {
        self.backend.device_count()
    }

    fn devices_share_memory(&self) -> bool {
        // A panic here is taken as the default answer: releasing only the asking device's
        // cache is what a backend of separate memories gets.
        catch_unwind(AssertUnwindSafe(|| self.backend.devices_share_memory())).unwrap_or(false)
    }

    fn allocate(&self, device: u32, len: u64) -> Result<DevicePtr, BackendError> {
        self.answers
            .guarded("allocate", || self.backend.allocate(device, len))
    }

    fn release(&self, device: u32, addr: DevicePtr, len: u64) -> Result<(), BackendError> {
        self.answers
            .guarded("release", || self.backend.release(device, addr, len))
    }

    fn zero_fresh(
        &self,
        device: u32,
        addr: DevicePtr,
        len: u64,
        stream: StreamHandle,
    ) -> Result<(), BackendError> {
        self.answers.guarded("zero_fresh", || {
            self.backend.zero_fresh(device, addr, len, stream)
        })
    }

    unsafe fn submit_scrub(&self, batch: ScrubBatch) -> Result<Box<dyn ScrubTicket>, BackendError> {
        let ticket = self.answers.guarded("submit_scrub", || {
            // SAFETY: this method's own contract, passed on unchanged.
            unsafe { self.backend.submit_scrub(batch) }
        })?;
        Ok(Box::new(SafeTicket {
            ticket: Some(ticket),
            answers: self.answers.clone(),
        }))
    }

    fn is_capturing(&self, device: u32, stream: StreamHandle) -> Result<bool, BackendError> {
        self.answers
            .guarded("is_capturing", || self.backend.is_capturing(device, stream))
    }

    fn write(&self, device: u32, addr: DevicePtr, src: &[u8]) -> Result<(), BackendError> {
        self.answers
            .guarded("write", || self.backend.write(device, addr, src))
    }

    fn read(&self, device: u32, addr: DevicePtr, dst: &mut [u8]) -> Result<(), BackendError> {
        self.answers
            .guarded("read", || self.backend.read(device, addr, dst))
    }

    fn inject_fault(&self, segments: u64) -> Result<(), BackendError> {
        self.answers
            .guarded("inject_fault", || self.backend.inject_fault(segments))
    }

    fn shutdown(&self) {
        // Exit goes on whatever the backend does.
        let _ = catch_unwind(AssertUnwindSafe(|| self.backend.shutdown()));
    }
}

/// A ticket whose poll, wait and drop never unwind: a panic in poll or wait is a failed wait
/// (results lost); one in the backend's destructor (which returns the batch's slot) is
/// dropped with it. The ticket is always `Some` until dropped.
struct SafeTicket {
    ticket: Option<Box<dyn ScrubTicket>>,
    answers: Answers,
}

impl SafeTicket {
    fn inner(&mut self) -> Result<&mut Box<dyn ScrubTicket>, BackendError> {
        self.ticket
            .as_mut()
            .ok_or_else(|| BackendError::Other("a scrub ticket used after it was dropped".into()))
    }
}

impl ScrubTicket for SafeTicket {
    fn poll(&mut self) -> Result<Option<Vec<SegmentResult>>, BackendError> {
        let answers = self.answers.clone();
        let ticket = self.inner()?;
        answers.guarded("a scrub batch's poll", || ticket.poll())
    }

    fn wait(&mut self) -> Result<Vec<SegmentResult>, BackendError> {
        let answers = self.answers.clone();
        let ticket = self.inner()?;
        answers.guarded("a scrub batch's wait", || ticket.wait())
    }
}

impl Drop for SafeTicket {
    fn drop(&mut self) {
        if let Some(ticket) = self.ticket.take() {
            let _ = catch_unwind(AssertUnwindSafe(move || drop(ticket)));
        }
    }
}

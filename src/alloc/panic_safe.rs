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

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use crate::backend::verify::SegmentResult;
use crate::backend::{
    Backend, BackendError, BackendKind, DevicePtr, ScrubBatch, ScrubTicket, StreamHandle,
};

/// A backend whose calls never unwind into the caller (see the module's documentation).
pub(crate) struct PanicSafe(pub(crate) Arc<dyn Backend>);

/// Runs `call`, named `what` in the error a panic becomes.
fn guarded<T>(
    what: &'static str,
    call: impl FnOnce() -> Result<T, BackendError>,
) -> Result<T, BackendError> {
    catch_unwind(AssertUnwindSafe(call)).unwrap_or_else(|_| {
        Err(BackendError::Other(format!(
            "the backend panicked in {what}"
        )))
    })
}

impl Backend for PanicSafe {
    fn kind(&self) -> BackendKind {
        self.0.kind()
    }

    fn device_count(&self) -> u32 {
        self.0.device_count()
    }

    fn devices_share_memory(&self) -> bool {
        // A panic here is taken as the default answer: releasing only the asking device's
        // cache is what a backend of separate memories gets.
        catch_unwind(AssertUnwindSafe(|| self.0.devices_share_memory())).unwrap_or(false)
    }

    fn allocate(&self, device: u32, len: u64) -> Result<DevicePtr, BackendError> {
        guarded("allocate", || self.0.allocate(device, len))
    }

    fn release(&self, device: u32, addr: DevicePtr, len: u64) -> Result<(), BackendError> {
        guarded("release", || self.0.release(device, addr, len))
    }

    fn zero_fresh(
        &self,
        device: u32,
        addr: DevicePtr,
        len: u64,
        stream: StreamHandle,
    ) -> Result<(), BackendError> {
        guarded("zero_fresh", || {
            self.0.zero_fresh(device, addr, len, stream)
        })
    }

    unsafe fn submit_scrub(&self, batch: ScrubBatch) -> Result<Box<dyn ScrubTicket>, BackendError> {
        let ticket = guarded("submit_scrub", || {
            // SAFETY: this method's own contract, passed on unchanged.
            unsafe { self.0.submit_scrub(batch) }
        })?;
        Ok(Box::new(SafeTicket(Some(ticket))))
    }

    fn is_capturing(&self, device: u32, stream: StreamHandle) -> Result<bool, BackendError> {
        guarded("is_capturing", || self.0.is_capturing(device, stream))
    }

    fn write(&self, device: u32, addr: DevicePtr, src: &[u8]) -> Result<(), BackendError> {
        guarded("write", || self.0.write(device, addr, src))
    }

    fn read(&self, device: u32, addr: DevicePtr, dst: &mut [u8]) -> Result<(), BackendError> {
        guarded("read", || self.0.read(device, addr, dst))
    }

    fn inject_fault(&self, segments: u64) -> Result<(), BackendError> {
        guarded("inject_fault", || self.0.inject_fault(segments))
    }

    fn shutdown(&self) {
        // Exit goes on whatever the backend does.
        let _ = catch_unwind(AssertUnwindSafe(|| self.0.shutdown()));
    }
}

/// A ticket whose poll, wait and drop never unwind: a panic in poll or wait is a failed wait
/// (results lost); one in the backend's destructor (which returns the batch's slot) is
/// dropped with it. Always `Some` until dropped.
struct SafeTicket(Option<Box<dyn ScrubTicket>>);

impl SafeTicket {
    fn inner(&mut self) -> Result<&mut Box<dyn ScrubTicket>, BackendError> {
        self.0
            .as_mut()
            .ok_or_else(|| BackendError::Other("a scrub ticket used after it was dropped".into()))
    }
}

impl ScrubTicket for SafeTicket {
    fn poll(&mut self) -> Result<Option<Vec<SegmentResult>>, BackendError> {
        let ticket = self.inner()?;
        guarded("a scrub batch's poll", || ticket.poll())
    }

    fn wait(&mut self) -> Result<Vec<SegmentResult>, BackendError> {
        let ticket = self.inner()?;
        guarded("a scrub batch's wait", || ticket.wait())
    }
}

impl Drop for SafeTicket {
    fn drop(&mut self) {
        if let Some(ticket) = self.0.take() {
            let _ = catch_unwind(AssertUnwindSafe(move || drop(ticket)));
        }
    }
}

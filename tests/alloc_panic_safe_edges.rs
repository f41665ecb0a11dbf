//! A backend whose ticket panics when it is dropped (a faulty backend: a ticket's destructor
//! is backend code, as `CudaTicket`'s, which returns its slot under a lock). Every backend call
//! and every ticket's poll and wait answer an error instead of unwinding through the pool
//! (ARCHITECTURE.md, `PanicSafe`); the pool also drops each ticket once its batch is applied,
//! under the pool lock, and that must not unwind into the caller either.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::hooked::{hooked, Hooks};
use common::manual_config;
use kvhygiene::alloc::Allocator;
use kvhygiene::backend::host::HostBackend;
use kvhygiene::backend::verify::SegmentResult;
use kvhygiene::backend::{BackendError, DevicePtr, ScrubTicket, StreamHandle};

const S: StreamHandle = StreamHandle(0);

/// A host backend whose tickets panic once, when dropped, while `drop_panics` is set.
struct DropPanics {
    host: Arc<HostBackend>,
    drop_panics: Arc<AtomicBool>,
}

struct PanicOnDrop {
    ticket: Box<dyn ScrubTicket>,
    drop_panics: Arc<AtomicBool>,
}

impl ScrubTicket for PanicOnDrop {
    fn poll(&mut self) -> Result<Option<Vec<SegmentResult>>, BackendError> {
        self.ticket.poll()
    }
    fn wait(&mut self) -> Result<Vec<SegmentResult>, BackendError> {
        self.ticket.wait()
    }
}

impl Drop for PanicOnDrop {
    fn drop(&mut self) {
        if !std::thread::panicking() && self.drop_panics.swap(false, Ordering::SeqCst) {
            panic!("the backend panicked dropping a scrub ticket");
        }
    }
}

impl Hooks for DropPanics {
    fn host(&self) -> &HostBackend {
        &self.host
    }
    fn ticket(
        &self,
        _segments: &[DevicePtr],
        ticket: Box<dyn ScrubTicket>,
    ) -> Box<dyn ScrubTicket> {
        Box::new(PanicOnDrop {
            ticket,
            drop_panics: self.drop_panics.clone(),
        })
    }
}

fn backend() -> Arc<DropPanics> {
    Arc::new(DropPanics {
        host: HostBackend::new(),
        drop_panics: Arc::new(AtomicBool::new(false)),
    })
}

/// `synchronize` waits for the scrub of a freed block and applies it; the applied batch's
/// ticket is then dropped. A ticket whose destructor panics must not make `synchronize`
/// unwind into its caller (at the C boundary: `KVH_ERR_PANIC` instead of an answer).
#[test]
fn synchronize_does_not_unwind_when_a_ticket_panics_as_it_is_dropped() {
    let backend = backend();
    let alloc = Allocator::new(hooked(&backend), manual_config(), None);
    let a = alloc.malloc(4096, 0, S).unwrap();
    alloc.free(a, 4096, 0, S).unwrap();
    backend.drop_panics.store(true, Ordering::SeqCst);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| alloc.synchronize()));
    assert!(
        r.is_ok(),
        "synchronize unwound through the pool: the backend's ticket panicked as the pool \
         dropped it (block {a:#x} is {:?})",
        alloc.block_info(a).map(|b| b.state)
    );
}

/// A checked free waits for its block's scrub and applies it (`kvh_free_checked`); the
/// applied batch's ticket is then dropped. A ticket whose destructor panics must not turn the
/// checked free into a panic: the caller gets the verification's answer.
#[test]
fn a_checked_free_does_not_unwind_when_its_ticket_panics_as_it_is_dropped() {
    let backend = backend();
    let alloc = Allocator::new(hooked(&backend), manual_config(), None);
    let a = alloc.malloc(4096, 0, S).unwrap();
    backend.drop_panics.store(true, Ordering::SeqCst);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        alloc.free_checked(a, 4096, 0, S)
    }));
    assert!(
        matches!(r, Ok(Ok(_))),
        "the checked free of block {a:#x} did not answer (unwound: {}); the backend's ticket \
         panicked as the pool dropped it; the block is {:?}",
        r.is_err(),
        alloc.block_info(a).map(|b| b.state)
    );
}

/// `kvh_scrub_blocks` waits for its launches with no lock held, then drops their tickets; a
/// call that reached the device answers with a report or an error (and leaves a `kv_scrub`
/// record, include/kvhygiene.h). A ticket whose destructor panics must not make the call
/// unwind into its caller instead.
#[test]
fn a_kv_scrub_does_not_unwind_when_its_ticket_panics_as_it_is_dropped() {
    let backend = backend();
    let alloc = Allocator::new(hooked(&backend), manual_config(), None);
    let base = alloc.malloc(4 * 4096, 0, S).unwrap();
    let layout = kvhygiene::alloc::KvLayout {
        regions: vec![base],
        block_bytes: 4096,
        block_stride: 4096,
        blocks_per_region: 4,
    };
    backend.drop_panics.store(true, Ordering::SeqCst);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        alloc.scrub_kv_blocks(&layout, &[0, 2], 0, S)
    }));
    assert!(
        r.is_ok(),
        "kvh_scrub_blocks unwound into its caller: the backend's ticket panicked as the call \
         dropped it after waiting"
    );
}

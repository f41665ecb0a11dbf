//! A backend that panics (a faulty backend; the C boundary would catch the panic and the
//! process go on): in a poll, a release, on one device of several. Each panic is a failed
//! call to the pool, never an unwind through it: no block is stranded, no device starved, no
//! failure under `failure_mode = abort` let through.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::hooked::{hooked, Hooks, PanicsOnPoll};
use common::{manual_config, secret};
use kvhygiene::alloc::{Allocator, BlockState};
use kvhygiene::backend::host::HostBackend;
use kvhygiene::backend::{Backend, BackendError, DevicePtr, ScrubTicket, StreamHandle};
use kvhygiene::config::Config;
use kvhygiene::context::Context;

const S: StreamHandle = StreamHandle(0);

/// A host backend whose `release` panics while `release_panics` is set (once when
/// `release_panics_once`), and whose tickets of batches holding `poll_panics_for` panic when
/// polled (waiting works).
struct Faulty {
    host: Arc<HostBackend>,
    release_panics: AtomicBool,
    release_panics_once: AtomicBool,
    poll_panics_for: AtomicU64,
}

impl Faulty {
    fn new() -> Arc<Self> {
        Arc::new(Faulty {
            host: HostBackend::new(),
            release_panics: AtomicBool::new(false),
            release_panics_once: AtomicBool::new(false),
            poll_panics_for: AtomicU64::new(0),
        })
    }
}

impl Hooks for Faulty {
    fn host(&self) -> &HostBackend {
        &self.host
    }
    fn release(&self, _addr: DevicePtr) -> Option<Result<(), BackendError>> {
        if self.release_panics.load(Ordering::SeqCst)
            || self.release_panics_once.swap(false, Ordering::SeqCst)
        {
            panic!("the backend panicked while releasing a block");
        }
        None
    }
    fn ticket(&self, segments: &[DevicePtr], ticket: Box<dyn ScrubTicket>) -> Box<dyn ScrubTicket> {
        let p = self.poll_panics_for.load(Ordering::SeqCst);
        if p != 0 && segments.contains(&p) {
            Box::new(PanicsOnPoll(ticket))
        } else {
            ticket
        }
    }
}

/// A backend that panics (the C boundary would catch the panic and the process would go on
/// serving; ARCHITECTURE.md) must not turn into a process abort, nor unwind through the pool:
/// here `harvest` applies one batch, which retires its block (`max_reuse = 1`), then the
/// backend panics polling the next one, and the release of the retired block panics as
/// well. Both are failed calls to the pool: the caller gets its memory, the process goes on.
#[test]
fn a_backend_that_panics_polling_and_releasing_does_not_abort_the_process() {
    if std::env::var_os("KVH_TEST_UNWIND_RELEASE_CHILD").is_some() {
        let backend = Faulty::new();
        let alloc = Allocator::new(
            hooked(&backend),
            Config {
                max_reuse: 1,
                batch_size: 1,
                ..manual_config()
            },
            None,
        );
        let a = alloc.malloc(4096, 0, S).unwrap();
        let x = alloc.malloc(4096, 0, S).unwrap();
        backend.poll_panics_for.store(x, Ordering::SeqCst);
        backend.release_panics.store(true, Ordering::SeqCst);
        alloc.free(a, 4096, 0, S).unwrap();
        alloc.free(x, 4096, 0, S).unwrap();
        // A pool miss (or the flusher) harvests: once a's batch (first on the stream) has
        // completed, it is applied (a retires, its release panics: a leaves the pool, leaked,
        // not counted as released) and then x's poll panics.
        let deadline = Instant::now() + Duration::from_secs(5);
        while alloc.block_info(a).is_some() {
            let r =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| alloc.malloc(8192, 0, S)));
            assert!(
                matches!(r, Ok(Ok(_))),
                "a pool miss while the backend panics"
            );
            assert!(Instant::now() < deadline, "a was never released");
            std::thread::sleep(Duration::from_millis(1));
        }
        println!("KVH-CHILD-SURVIVED");
        return;
    }
    let (status, stdout, stderr) = common::rerun_as_child(
        "a_backend_that_panics_polling_and_releasing_does_not_abort_the_process",
        "KVH_TEST_UNWIND_RELEASE_CHILD",
    );
    assert!(
        status.success() && stdout.contains("KVH-CHILD-SURVIVED"),
        "the process did not survive a backend panic the caller catches (status {:?}):\n\
         {stdout}\n{stderr}",
        status
    );
}

/// The pool's figures match what the backend holds (ARCHITECTURE.md): a verified block
/// taken out of the table for release is either handed to the backend or put back. When the
/// backend panics releasing the first of two CLEAN blocks (`empty_cache`), the second one,
/// never handed to the backend, must not vanish: a later `empty_cache` returns it (or it is
/// still in the pool).
#[test]
fn a_panicking_release_does_not_lose_the_other_blocks_of_the_same_pass() {
    let backend = Faulty::new();
    let alloc = Allocator::new(hooked(&backend), manual_config(), None);
    let a = alloc.malloc(4096, 0, S).unwrap();
    let b = alloc.malloc(4096, 0, S).unwrap();
    backend.host.write(0, a, &secret(4096, 1)).unwrap();
    alloc.free(a, 4096, 0, S).unwrap();
    alloc.free(b, 4096, 0, S).unwrap();
    alloc.synchronize().unwrap();
    let capacity = alloc.block_info(a).unwrap().capacity;
    assert_eq!(
        alloc.block_info(b).map(|i| i.state),
        Some(BlockState::Clean)
    );
    backend.release_panics_once.store(true, Ordering::SeqCst);
    // The panic is a failed release (the block's memory is leaked, a backend error counted).
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| alloc.empty_cache()));
    assert!(r.is_ok(), "the release's panic unwound through the pool");
    assert!(alloc.stats().counters.backend_errors >= 1);
    // The backend behaves again: whatever the pool still holds goes back.
    alloc.empty_cache();
    let pool_bytes = alloc.check_consistency().unwrap().total().bytes;
    let backend_bytes = backend.host.bytes_in_use();
    assert!(
        backend_bytes <= pool_bytes + capacity,
        "the backend holds {backend_bytes} bytes, the pool accounts for {pool_bytes}: more than \
         the one block ({capacity} bytes) whose release panicked went missing; blocks \
         {a:#x}: {:?}, {b:#x}: {:?}; released {}",
        alloc.block_info(a).map(|i| i.state),
        alloc.block_info(b).map(|i| i.state),
        alloc.stats().counters.released
    );
}

/// Panics of the flusher thread are not printed (the flusher catches them; they would
/// repeat at each pass).
fn quiet_flusher_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if std::thread::current().name() != Some("kvh-flusher") {
                previous(info);
            }
        }));
    });
}

/// The flusher bounds how long a free waits in an open batch (`batch_max_delay_us`), on
/// every device, and goes on after a pass that panicked. A backend that panics polling one
/// device's batch (every time it is polled) must not stop the flusher from flushing and
/// harvesting another device's frees: a block freed on device 1 becomes CLEAN within the
/// bound without any other call.
#[test]
fn a_flusher_pass_that_panics_on_one_device_does_not_starve_the_others() {
    quiet_flusher_panics();
    let backend = Faulty::new();
    let alloc = Allocator::new(
        hooked(&backend),
        Config {
            batch_max_delay_us: 1_000,
            ..Config::default()
        },
        None,
    );
    let x = alloc.malloc(4096, 0, S).unwrap();
    backend.poll_panics_for.store(x, Ordering::SeqCst);
    alloc.free(x, 4096, 0, S).unwrap();
    // The flusher submits x's batch, then panics polling it at each pass.
    std::thread::sleep(Duration::from_millis(100));
    let y = alloc.malloc(4096, 1, S).unwrap();
    alloc.free(y, 4096, 1, S).unwrap();
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut state = alloc.block_info(y).map(|i| i.state);
    while state != Some(BlockState::Clean) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
        state = alloc.block_info(y).map(|i| i.state);
    }
    assert_eq!(
        state,
        Some(BlockState::Clean),
        "block {y:#x}, freed on device 1, is still {state:?} 2 s on (batch_max_delay_us = \
         1000): the flusher's passes panic on device 0 first ({:?} scrub batches submitted)",
        alloc.stats().counters.scrub_batches
    );
}

/// A backend that panics submitting or waiting for a scrub batch gives a failed submission or
/// wait (ARCHITECTURE.md): the blocks go to quarantine and the error is counted. One that
/// panics polling a batch (each time) must not leave the batch's blocks PENDING for good
/// behind a flusher that catches the panic at every pass with nothing to show for it: within
/// the flusher's bound the block leaves PENDING, or the failure is counted as a backend error.
#[test]
fn a_batch_whose_poll_panics_is_not_left_pending_for_good_without_an_error() {
    quiet_flusher_panics();
    let backend = Faulty::new();
    let alloc = Allocator::new(
        hooked(&backend),
        Config {
            batch_max_delay_us: 1_000,
            ..Config::default()
        },
        None,
    );
    let x = alloc.malloc(4096, 2, S).unwrap();
    backend.poll_panics_for.store(x, Ordering::SeqCst);
    alloc.free(x, 4096, 2, S).unwrap();
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut state = alloc.block_info(x).map(|i| i.state);
    while state == Some(BlockState::Pending) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
        state = alloc.block_info(x).map(|i| i.state);
    }
    let stats = alloc.stats();
    assert!(
        state != Some(BlockState::Pending) || stats.counters.backend_errors > 0,
        "block {x:#x} is still PENDING 2 s after its free (batch_max_delay_us = 1000), its \
         batch's poll panicking at every flusher pass, and nothing counts it: backend_errors \
         {}, scrub_batches {}",
        stats.counters.backend_errors,
        stats.counters.scrub_batches
    );
}

/// Under `failure_mode = abort`, a freed block that fails verification stops the process
/// (README; even when the event sink panics on the failure's record). A backend that panics
/// returning another block of the same batch to the device (verified, retired with
/// `max_reuse = 1`) must not keep the failure from stopping the process: the caller catches
/// the panic (as the C boundary does) and the process would go on serving.
#[test]
fn a_panicking_release_does_not_keep_a_failure_from_aborting_the_process() {
    if std::env::var_os("KVH_TEST_RELEASE_PANIC_ABORT_CHILD").is_some() {
        let backend = Faulty::new();
        let alloc = Allocator::new(
            hooked(&backend),
            Config {
                failure_mode: kvhygiene::config::FailureMode::Abort,
                max_reuse: 1,
                batch_size: 2,
                ..manual_config()
            },
            None,
        );
        let b = alloc.malloc(4096, 0, S).unwrap();
        let a = alloc.malloc(4096, 0, S).unwrap();
        backend.host.write(0, b, &secret(4096, 0x6b)).unwrap();
        // b's scrub leaves half of it unzeroed: it fails verification.
        backend.host.inject_skip_tail(1);
        backend.release_panics.store(true, Ordering::SeqCst);
        alloc.free(b, 4096, 0, S).unwrap();
        alloc.free(a, 4096, 0, S).unwrap();
        for _ in 0..2 {
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| alloc.synchronize()));
        }
        std::thread::sleep(Duration::from_millis(100));
        println!(
            "KVH-CHILD-SURVIVED verifications_failed={} b={:?}",
            alloc.stats().counters.verifications_failed,
            alloc.block_info(b).map(|i| i.state)
        );
        return;
    }
    let (_, stdout, stderr) = common::rerun_as_child(
        "a_panicking_release_does_not_keep_a_failure_from_aborting_the_process",
        "KVH_TEST_RELEASE_PANIC_ABORT_CHILD",
    );
    assert!(
        !stdout.contains("KVH-CHILD-SURVIVED"),
        "the process went on after a failed verification under failure_mode=abort: \
         {stdout}{stderr}"
    );
}

/// Panics once, on the first verification failure it is given (a faulty sink; not under
/// `failure_mode = abort`, so the panic unwinds to the caller, which the C boundary catches).
#[derive(Default)]
struct PanicsOnceOnFailure(AtomicBool);

impl kvhygiene::events::EventSink for PanicsOnceOnFailure {
    fn emit(&self, event: kvhygiene::events::Event) {
        let failure = matches!(
            event.kind,
            kvhygiene::events::EventKind::VerifyFailed { .. }
        );
        if failure && !self.0.swap(true, Ordering::SeqCst) {
            panic!("the sink panicked on a verification failure");
        }
    }
}

/// A whole-pool wait that takes two batches and unwinds after applying the first (the sink
/// panics on its record) puts the second back in the pool: a later `synchronize` waits for it
/// and returns, instead of waiting for ever for a batch counted as held by a thread that is
/// gone, and the pool's figures still add up.
#[test]
fn batches_not_yet_waited_on_when_a_wait_unwinds_go_back_to_the_pool() {
    let host = HostBackend::new();
    let alloc = Allocator::new(
        host.clone(),
        Config {
            batch_size: 1,
            ..manual_config()
        },
        Some(Arc::new(PanicsOnceOnFailure::default())),
    );
    let a = alloc.malloc(4096, 0, S).unwrap();
    let b = alloc.malloc(4096, 0, S).unwrap();
    host.write(0, a, &secret(4096, 0x5a)).unwrap();
    host.inject_skip_tail(1);
    alloc.free(a, 4096, 0, S).unwrap();
    alloc.free(b, 4096, 0, S).unwrap();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| alloc.synchronize()));
    assert!(r.is_err(), "the sink did not panic");
    assert_synchronize_returns(&alloc, "for a batch the unwound wait had taken");
    alloc.check_consistency().unwrap();
    assert_ne!(
        alloc.block_info(b).map(|i| i.state),
        Some(BlockState::Pending),
        "the second batch was applied"
    );
}

/// Panics once, on the first `quarantine` event it is given (a faulty sink).
#[derive(Default)]
struct PanicsOnceOnQuarantine(AtomicBool);

impl kvhygiene::events::EventSink for PanicsOnceOnQuarantine {
    fn emit(&self, event: kvhygiene::events::Event) {
        let quarantine = matches!(event.kind, kvhygiene::events::EventKind::Quarantined { .. });
        if quarantine && !self.0.swap(true, Ordering::SeqCst) {
            panic!("the sink panicked on a quarantine");
        }
    }
}

/// A whole-pool wait whose first pass both takes a batch out of the pool to wait for it and
/// records a quarantine (another batch of the same pass that the backend failed to queue),
/// when the sink panics on that record, still gives the batch it took back: a later
/// `synchronize` applies it and returns, instead of waiting for ever for a batch counted as
/// held by a thread that is gone.
#[test]
fn a_batch_taken_in_a_pass_whose_records_unwind_goes_back_to_the_pool() {
    let backend = common::TestBackend::new(HostBackend::new());
    let alloc = Allocator::new(
        backend.clone(),
        manual_config(),
        Some(Arc::new(PanicsOnceOnQuarantine::default())),
    );
    let (one, two) = (StreamHandle(0x10), StreamHandle(0x20));
    let a = alloc.malloc(4096, 0, one).unwrap();
    let b = alloc.malloc(4096, 0, two).unwrap();
    // The batch on the second stream cannot be queued: its block is quarantined, and recorded.
    *backend.refuse.lock().unwrap() = Some(Box::new(move |batch| {
        (batch.stream == two).then(|| BackendError::Other("injected submission failure".into()))
    }));
    alloc.free(a, 4096, 0, one).unwrap();
    alloc.free(b, 4096, 0, two).unwrap();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| alloc.synchronize()));
    assert!(
        r.is_err(),
        "precondition: the sink panicked on the quarantine"
    );
    *backend.refuse.lock().unwrap() = None;
    assert_synchronize_returns(&alloc, "for the batch the unwound pass had taken");
    assert_ne!(
        alloc.block_info(a).map(|i| i.state),
        Some(BlockState::Pending),
        "the batch of the first stream was applied"
    );
    alloc.check_consistency().unwrap();
}

/// A `FanoutSink` hands each event to every sink before the next event: a sink fanned out
/// beside a faulty one that panics on a later event of the same operation (the block's
/// `quarantine`) has still received the events before it (the failed verification), as a
/// forensic log behind the fan-out must (invariant 5).
#[test]
fn a_sink_beside_one_that_panics_still_gets_the_events_before_the_panic() {
    use kvhygiene::events::{EventSink, FanoutSink, MemorySink};
    let host = HostBackend::new();
    let mem = MemorySink::new();
    let fanout = FanoutSink(vec![
        Arc::new(PanicsOnceOnQuarantine::default()) as Arc<dyn EventSink>,
        mem.clone() as Arc<dyn EventSink>,
    ]);
    let alloc = Allocator::new(host.clone(), manual_config(), Some(Arc::new(fanout)));
    let a = alloc.malloc(4096, 0, S).unwrap();
    host.write(0, a, &secret(4096, 0x5a)).unwrap();
    host.inject_skip_tail(1);
    alloc.free(a, 4096, 0, S).unwrap();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| alloc.synchronize()));
    assert!(r.is_err(), "precondition: the faulty sink panicked");
    let kinds: Vec<&str> = mem.snapshot().iter().map(|e| e.kind.name()).collect();
    assert_eq!(
        mem.count("verify_failed"),
        1,
        "the failed verification before the panic, in the sink beside: {kinds:?}"
    );
}

/// Panics when flushed (a faulty sink).
struct PanicsOnFlush;

impl kvhygiene::events::EventSink for PanicsOnFlush {
    fn emit(&self, _: kvhygiene::events::Event) {}
    fn flush(&self) {
        panic!("the sink panicked on a flush");
    }
}

/// Counts the flushes it receives.
#[derive(Default)]
struct CountsFlushes(std::sync::atomic::AtomicU64);

impl kvhygiene::events::EventSink for CountsFlushes {
    fn emit(&self, _: kvhygiene::events::Event) {}
    fn flush(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// `flush` is what the allocator calls before a fail-closed abort, to make the records
/// queued in a forensic log durable. A `FanoutSink` passes it to every sink it feeds even
/// when one of them panics, as it passes the events (invariant 5): the sink after the faulty
/// one is still flushed, and the panic is raised once all were.
#[test]
fn a_sink_beside_one_that_panics_on_flush_is_still_flushed() {
    use kvhygiene::events::{EventSink, FanoutSink};
    let counted = Arc::new(CountsFlushes::default());
    let fanout = FanoutSink(vec![
        Arc::new(PanicsOnFlush) as Arc<dyn EventSink>,
        counted.clone() as Arc<dyn EventSink>,
    ]);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| fanout.flush()));
    assert!(r.is_err(), "precondition: the faulty sink panicked");
    assert_eq!(
        counted.0.load(Ordering::SeqCst),
        1,
        "the sink after the one that panicked was not flushed"
    );
}

/// Whether the calling thread is the allocator's flusher.
fn on_flusher() -> bool {
    std::thread::current().name() == Some("kvh-flusher")
}

/// Panics once, on the first event named `name` emitted on a thread other than the flusher
/// (a faulty sink; the caller catches the panic, as the C boundary does).
struct PanicsOnceOn {
    name: &'static str,
    done: AtomicBool,
}

impl PanicsOnceOn {
    fn new(name: &'static str) -> Arc<Self> {
        Arc::new(PanicsOnceOn {
            name,
            done: AtomicBool::new(false),
        })
    }
}

impl kvhygiene::events::EventSink for PanicsOnceOn {
    fn emit(&self, event: kvhygiene::events::Event) {
        if event.kind.name() == self.name
            && !on_flusher()
            && !self.done.swap(true, Ordering::SeqCst)
        {
            panic!("the sink panicked on a {} record", self.name);
        }
    }
}

/// A ticket whose completion the flusher thread never sees: another thread's poll or wait
/// applies the batch. Says when the flusher found it complete.
struct HeldFromFlusher {
    inner: Box<dyn ScrubTicket>,
    done: Option<Vec<kvhygiene::backend::verify::SegmentResult>>,
    seen: Arc<AtomicBool>,
}

impl ScrubTicket for HeldFromFlusher {
    fn poll(
        &mut self,
    ) -> Result<Option<Vec<kvhygiene::backend::verify::SegmentResult>>, BackendError> {
        if self.done.is_none() {
            self.done = self.inner.poll()?;
        }
        if self.done.is_some() && on_flusher() {
            self.seen.store(true, Ordering::SeqCst);
            return Ok(None);
        }
        Ok(self.done.take())
    }
    fn wait(&mut self) -> Result<Vec<kvhygiene::backend::verify::SegmentResult>, BackendError> {
        match self.done.take() {
            Some(r) => Ok(r),
            None => self.inner.wait(),
        }
    }
}

/// A host backend whose finished scrubs only callers' threads apply (`HeldFromFlusher`), and
/// which refuses every submission for lack of memory while `out_of_memory` is set, counting
/// the refusals.
struct Held {
    host: Arc<HostBackend>,
    finished_seen: Arc<AtomicBool>,
    out_of_memory: AtomicBool,
    refusals: AtomicU64,
}

impl Hooks for Held {
    fn host(&self) -> &HostBackend {
        &self.host
    }
    fn refuse_submit(&self, batch: &kvhygiene::backend::ScrubBatch) -> Option<BackendError> {
        if !self.out_of_memory.load(Ordering::SeqCst) {
            return None;
        }
        self.refusals.fetch_add(1, Ordering::SeqCst);
        Some(BackendError::OutOfMemory {
            device: batch.device,
            requested: 4096,
        })
    }
    fn ticket(&self, _segments: &[DevicePtr], inner: Box<dyn ScrubTicket>) -> Box<dyn ScrubTicket> {
        Box::new(HeldFromFlusher {
            inner,
            done: None,
            seen: self.finished_seen.clone(),
        })
    }
}

/// A paged KV cache of 8 blocks of 256 bytes (K region then V region) in one fresh
/// allocation of device 0.
fn kv_cache(alloc: &Allocator) -> (u64, kvhygiene::alloc::KvLayout) {
    let a = alloc.malloc(2 * 8 * 256, 0, S).unwrap();
    let layout = kvhygiene::alloc::KvLayout {
        regions: vec![a, a + 8 * 256],
        block_bytes: 256,
        block_stride: 256,
        blocks_per_region: 8,
    };
    (a, layout)
}

/// A KV scrub's batches hold batch slots only until they are waited for. A call whose pass
/// submitted its batch and then unwound (the sink panics on a record of that pass: a freed
/// block's release, applied by the same pass) must not leave its batch counted as in flight
/// for good: a later KV call that finds no memory for a batch, with nothing on the device to
/// give a slot back, fails at once instead of retrying for `KV_SLOT_WAIT` (2 s) every time.
#[test]
fn a_kv_call_whose_launch_records_unwind_leaves_no_batch_counted_in_flight() {
    let backend = Arc::new(Held {
        host: HostBackend::new(),
        finished_seen: Arc::new(AtomicBool::new(false)),
        out_of_memory: AtomicBool::new(false),
        refusals: AtomicU64::new(0),
    });
    let alloc = Allocator::new(
        hooked(&backend),
        Config {
            max_reuse: 1,
            batch_size: 1,
            ..manual_config()
        },
        Some(PanicsOnceOn::new("release")),
    );
    let (_, layout) = kv_cache(&alloc);
    // A block its free retires (max_reuse = 1), its scrub finished and not yet applied.
    let x = alloc.malloc(4096, 0, S).unwrap();
    alloc.free(x, 4096, 0, S).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !backend.finished_seen.load(Ordering::SeqCst) {
        assert!(
            Instant::now() < deadline,
            "the scrub of {x:#x} never finished"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        alloc.scrub_kv_blocks(&layout, &[0], 0, S)
    }));
    assert!(
        r.is_err(),
        "precondition: the sink panicked on the release the KV call's pass applied"
    );
    alloc.synchronize().unwrap();
    backend.out_of_memory.store(true, Ordering::SeqCst);
    let got = alloc.scrub_kv_blocks(&layout, &[1], 0, S);
    let tries = backend.refusals.load(Ordering::SeqCst);
    assert!(
        matches!(
            got,
            Err(kvhygiene::alloc::KvScrubError::Backend {
                error: BackendError::OutOfMemory { .. },
                ..
            })
        ),
        "{got:?}"
    );
    assert!(
        tries <= 3,
        "a KV call out of memory, with no batch on the device, tried its submission {tries} \
         times: it waited for batch slots the unwound call's batch is still counted as holding"
    );
}

/// The gate's ledger records a KV scrub's failed verdict even when the sink panics on the
/// failure's record: a block the ledger had as CLEAN whose next scrub read residue is
/// refused to the next request that claims it, never handed over with the bytes the scrub
/// found.
#[test]
fn a_kv_scrub_whose_failure_record_unwinds_still_records_the_failure_for_the_gate() {
    use kvhygiene::config::{KvGateMode, KvGateScope};
    let host = HostBackend::new();
    let alloc = Allocator::new(
        host.clone(),
        Config {
            kv_gate: KvGateMode::Scrub,
            kv_gate_scope: KvGateScope::Request,
            ..manual_config()
        },
        Some(PanicsOnceOn::new("kv_verify_failed")),
    );
    let (a, layout) = kv_cache(&alloc);
    let report = alloc.scrub_kv_blocks(&layout, &[1], 0, S).unwrap();
    assert!(report.failed.is_empty(), "{report:?}");
    // Block 1 is written again after its scrub (its last owner's use after free), and its
    // next scrub leaves the tail of its K segment unzeroed: that scrub fails.
    let k1 = a + 256;
    host.write(0, k1, &secret(256, 0x3c)).unwrap();
    host.inject_skip_tail(1);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        alloc.scrub_kv_blocks(&layout, &[1], 0, S)
    }));
    assert!(
        r.is_err(),
        "precondition: the sink panicked on the failed verification's record"
    );
    let previous = Context::set_current(Context::new(Some("t1"), Some("b"), None).unwrap());
    let claim = alloc.claim_kv_blocks(&layout, &[1], 0, S);
    Context::set_current(previous);
    let claim = claim.unwrap();
    let mut bytes = vec![0u8; 256];
    host.read(0, k1, &mut bytes).unwrap();
    let nonzero = bytes.iter().filter(|&&b| b != 0).count();
    assert_eq!(
        claim.refused,
        vec![1],
        "block 1, whose last scrub failed, was handed to request b ({claim:?}) with {nonzero} \
         non-zero bytes of 256 in its K segment"
    );
}

/// `forget_stream` promises that the allocator never names the stream to the backend again,
/// on any device. When the sink panics on a record of the first device's pass (a scrub
/// submitted there failed and its block was quarantined), the frees waiting on the stream on
/// the other devices are still submitted or moved off it before the call ends: no batch of
/// device 1 submitted after it names the stream.
#[test]
fn a_forget_stream_whose_first_device_records_unwind_still_forgets_the_stream_elsewhere() {
    let backend = common::TestBackend::new(HostBackend::new());
    let alloc = Allocator::new(
        backend.clone(),
        manual_config(),
        Some(PanicsOnceOn::new("quarantine")),
    );
    let doomed = StreamHandle(0x77);
    let a = alloc.malloc(4096, 0, doomed).unwrap();
    let b = alloc.malloc(4096, 1, doomed).unwrap();
    alloc.free(a, 4096, 0, doomed).unwrap();
    alloc.free(b, 4096, 1, doomed).unwrap();
    // Device 0's batch cannot be queued: its block is quarantined, and recorded.
    *backend.refuse.lock().unwrap() = Some(Box::new(move |batch| {
        (batch.device == 0 && batch.stream == doomed)
            .then(|| BackendError::Other("injected submission failure".into()))
    }));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| alloc.forget_stream(doomed)));
    assert!(
        r.is_err(),
        "precondition: the sink panicked on the quarantine of device 0's pass"
    );
    *backend.refuse.lock().unwrap() = None;
    let mark = backend.batches.lock().unwrap().len();
    // The caller destroys the stream now; later work must not name it.
    let _ = alloc.synchronize();
    let named: Vec<_> = backend.batches.lock().unwrap()[mark..]
        .iter()
        .filter(|b| b.device == 1 && (b.stream == doomed || b.wait_streams.contains(&doomed)))
        .map(|b| (b.stream, b.wait_streams.clone()))
        .collect();
    assert!(
        named.is_empty(),
        "device 1 submitted {} batches naming stream {doomed:?} after forget_stream: {named:?}",
        named.len()
    );
    assert!(
        !alloc.uses_stream(doomed),
        "the allocator still holds references to the forgotten stream"
    );
}

/// Asserts that `alloc.synchronize()`, run on a thread of its own, returns within 10 s: it
/// is not left waiting for good (`what` it would wait for).
fn assert_synchronize_returns(alloc: &Allocator, what: &str) {
    let (tx, rx) = std::sync::mpsc::channel();
    let alloc = alloc.clone();
    std::thread::spawn(move || {
        let _ = tx.send(alloc.synchronize());
    });
    assert!(
        rx.recv_timeout(Duration::from_secs(10)).is_ok(),
        "synchronize still waits, 10 s on, {what}"
    );
}

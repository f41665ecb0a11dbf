//! What a whole-pool wait, a checked free and the release of verified blocks leave behind at
//! their edges: a backend whose scrub submission panics (a faulty backend; the C boundary
//! catches the panic) while a batch's results are applied or while another thread waits for
//! the batch, and a refused scrub whose refusal ended while a whole-pool wait waited for
//! another thread's batch.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::hooked::{checked_free_racing_synchronize, hooked, HookSink, Hooks, PanicsOnPoll};
use common::{manual_config, secret, Fixture};
use kvhygiene::alloc::{Allocator, BlockState};
use kvhygiene::backend::host::HostBackend;
use kvhygiene::backend::{Backend, BackendError, DevicePtr, ScrubBatch, ScrubTicket, StreamHandle};
use kvhygiene::config::Config;

const S: StreamHandle = StreamHandle(0);

/// A host backend whose next submission of a quarantine re-scrub (double pass, full
/// verification), or of a batch holding one chosen address, panics once.
struct PanicSubmit {
    host: Arc<HostBackend>,
    on_rescrub: AtomicBool,
    addr: AtomicU64,
    /// Polling a batch that holds this address panics.
    poll_panics_for: AtomicU64,
}

impl PanicSubmit {
    fn new() -> Arc<Self> {
        Arc::new(PanicSubmit {
            host: HostBackend::new(),
            on_rescrub: AtomicBool::new(false),
            addr: AtomicU64::new(0),
            poll_panics_for: AtomicU64::new(0),
        })
    }
}

impl Hooks for PanicSubmit {
    fn host(&self) -> &HostBackend {
        &self.host
    }
    fn before_submit(&self, batch: &ScrubBatch) {
        let rescrub = batch.options.double_pass && batch.options.full_verify;
        if rescrub && self.on_rescrub.swap(false, Ordering::SeqCst) {
            panic!("the backend panicked while submitting a re-scrub");
        }
        let chosen = self.addr.load(Ordering::SeqCst);
        if chosen != 0 && batch.segments.iter().any(|s| s.addr == chosen) {
            self.addr.store(0, Ordering::SeqCst);
            panic!("the backend panicked while submitting a scrub");
        }
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

/// A batch of two fresh blocks, `b` then `a`, both due to be retired (`max_reuse = 1`) once
/// verified; `b`'s scrub leaves half of it unzeroed, so it is quarantined and its re-scrub
/// is submitted while the batch's results are applied. Returns `(b, a)`.
fn retire_two_one_quarantined(alloc: &Allocator, backend: &PanicSubmit) -> (u64, u64) {
    let b = alloc.malloc(4096, 0, S).unwrap();
    let a = alloc.malloc(4096, 0, S).unwrap();
    backend.host.write(0, b, &secret(4096, 0x6b)).unwrap();
    backend.host.inject_skip_tail(1);
    alloc.free(b, 4096, 0, S).unwrap();
    alloc.free(a, 4096, 0, S).unwrap();
    (b, a)
}

fn retire_config() -> Config {
    Config {
        max_reuse: 1,
        batch_size: 2,
        ..manual_config()
    }
}

/// The pool's figures match what the backend holds (ARCHITECTURE.md, invariants): a block
/// taken out of the table for release is either returned to the backend or put back. A
/// panic in the backend while the same batch's results are applied (here: the re-scrub
/// submission of a block quarantined by it) must not lose a block already taken out for
/// release: neither in the table nor returned, its memory held by the backend for good.
#[test]
fn a_block_taken_out_for_release_is_not_lost_when_the_backend_panics_in_the_same_batch() {
    let backend = PanicSubmit::new();
    let alloc = Allocator::new(hooked(&backend), retire_config(), None);
    let (_b, a) = retire_two_one_quarantined(&alloc, &backend);
    backend.on_rescrub.store(true, Ordering::SeqCst);
    let first = alloc.synchronize();
    assert!(
        first.as_ref().is_err_and(|e| e.contains("panicked")),
        "synchronize over a re-scrub whose submission panicked: {first:?}"
    );
    let _ = alloc.synchronize();
    let pool_bytes = alloc.check_consistency().unwrap().total().bytes;
    let backend_bytes = backend.host.bytes_in_use();
    assert_eq!(
        pool_bytes,
        backend_bytes,
        "the backend holds {backend_bytes} bytes, the pool accounts for {pool_bytes}: block \
         {a:#x} (verified for retirement) is {:?} in the table, {} released",
        alloc.block_info(a).map(|b| b.state),
        alloc.stats().counters.released
    );
}

/// `kvh_synchronize` waits until the re-scrub of a block quarantined meanwhile has been
/// verified and applied (include/kvhygiene.h). A re-scrub whose submission panicked was never
/// queued: a later `synchronize` must submit it again (the block is then cleared) or report
/// that it could not, not succeed while the block stays quarantined with no re-scrub to come.
#[test]
fn a_rescrub_whose_submission_panicked_is_submitted_again_or_reported() {
    let backend = PanicSubmit::new();
    let alloc = Allocator::new(hooked(&backend), retire_config(), None);
    let (b, _a) = retire_two_one_quarantined(&alloc, &backend);
    backend.on_rescrub.store(true, Ordering::SeqCst);
    let first = alloc.synchronize();
    assert!(
        first.as_ref().is_err_and(|e| e.contains("panicked")),
        "synchronize over a re-scrub whose submission panicked: {first:?}"
    );
    let r = alloc.synchronize();
    let again = alloc.synchronize();
    let state = alloc.block_info(b).map(|i| i.state);
    assert!(
        r.is_err() || again.is_err() || state != Some(BlockState::Quarantined),
        "synchronize returned {r:?} then {again:?} while block {b:#x}, freed before both \
         calls, is {state:?} and its re-scrub was never queued"
    );
}

/// A checked free waits for its block's scrub (`kvh_free_checked`). When another thread's
/// whole-pool wait submitted the block's open batch and the backend panicked in that
/// submission, nothing was queued: the checked free must get its block submitted again or a
/// failed verification, not wait forever for a batch that exists nowhere.
#[test]
fn a_checked_free_returns_when_another_threads_submission_of_its_batch_panicked() {
    let backend = PanicSubmit::new();
    let sink = Arc::new(HookSink::default());
    let alloc = Allocator::new(hooked(&backend), manual_config(), Some(sink.clone()));
    let x = alloc.malloc(4096, 0, S).unwrap();
    backend.addr.store(x, Ordering::SeqCst);
    let race = checked_free_racing_synchronize(&alloc, &sink, x);
    assert!(
        race.synchronize
            .as_ref()
            .is_some_and(|r| r.as_ref().is_err_and(|e| e.contains("panicked"))),
        "the other thread's synchronize did not report the panicked submission: {:?}",
        race.synchronize
    );
    assert!(
        race.checked_free.is_some(),
        "kvh_free_checked still waits, 5 s on, for block {x:#x} ({:?}), whose batch's \
         submission panicked in another thread",
        alloc.block_info(x).map(|b| b.state)
    );
}

/// `kvh_synchronize` returns `KVH_ERR_BACKEND` for scrubs the backend refused "for now" (a
/// CUDA graph capture on their stream) and waits for every other scrub of a block freed
/// before the call. When the capture ends while the call still waits for another thread's
/// batch, the refused scrub can be queued: the call must not end by reporting a refusal that
/// no longer holds, its block left unscrubbed, as if the capture were still going on.
#[test]
fn a_refusal_that_ended_while_synchronize_waited_for_another_thread_is_not_reported() {
    let f = Arc::new(Fixture::new(manual_config()));
    let (s1, s2) = (StreamHandle(7), StreamHandle(9));
    let x = f.malloc_zeroed(4096, 0, 7);
    let y = f.malloc_zeroed(4096, 0, 7);
    let z = f.malloc_zeroed(4096, 0, 9);
    f.alloc.free(x, 4096, 0, s1).unwrap();
    // Another thread's checked free submits stream 7's batch (x, y) and waits on it.
    f.backend.set_gate(false);
    let checker = {
        let f = f.clone();
        std::thread::spawn(move || f.alloc.free_checked(y, 4096, 0, s1))
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while f.backend.batches.lock().unwrap().is_empty() {
        assert!(
            Instant::now() < deadline,
            "the checked free submitted nothing"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    // Stream 9 is capturing: z's scrub is refused for now.
    *f.backend.refuse.lock().unwrap() = Some(Box::new(move |b: &ScrubBatch| {
        (b.stream == s2).then_some(BackendError::StreamCapturing {
            stream: 9,
            what: "scrub launch",
        })
    }));
    f.alloc.free(z, 4096, 0, s2).unwrap();
    let syncer = {
        let f = f.clone();
        std::thread::spawn(move || f.alloc.synchronize())
    };
    while f.alloc.stats().counters.scrubs_deferred < 1 {
        assert!(Instant::now() < deadline, "synchronize submitted nothing");
        std::thread::sleep(Duration::from_millis(1));
    }
    // The capture ends while synchronize still waits for the checked free's batch.
    *f.backend.refuse.lock().unwrap() = None;
    std::thread::sleep(Duration::from_millis(20));
    f.backend.set_gate(true);
    checker.join().unwrap().unwrap();
    let r = syncer.join().unwrap();
    let state = f.alloc.block_info(z).map(|b| b.state);
    assert!(
        r.is_ok(),
        "synchronize returned {r:?} although the capture ended while it waited; block {z:#x}, \
         freed before the call, is {state:?}"
    );
}

/// A host backend whose first `release` runs a hook (what other threads do while
/// `cuMemFree` synchronises the device), then refuses the release for exit when exit has
/// begun meanwhile, as a backend that has shut down does.
struct HookRelease {
    host: Arc<HostBackend>,
    #[allow(clippy::type_complexity)]
    on_first_release: Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

impl Hooks for HookRelease {
    fn host(&self) -> &HostBackend {
        &self.host
    }
    /// The hook, then the host's release (which refuses once the host was shut down).
    fn release(&self, _addr: DevicePtr) -> Option<Result<(), BackendError>> {
        let hook = self.on_first_release.lock().unwrap().take();
        if let Some(hook) = hook {
            hook();
        }
        None
    }
}

/// After a shutdown, `kvh_synchronize` fails when blocks "were verified but could not be
/// returned to the device" (include/kvhygiene.h). A block verified for retirement whose
/// release the backend refused because exit began during the call is such a block (it goes
/// back into the pool, leaked). A `synchronize` made once exit has begun, while that release
/// is still under way, must not report success over it.
#[test]
fn synchronize_after_exit_does_not_succeed_over_a_release_exit_overtakes() {
    let backend = Arc::new(HookRelease {
        host: HostBackend::new(),
        on_first_release: Mutex::new(None),
    });
    let alloc = Allocator::new(
        hooked(&backend),
        Config {
            max_reuse: 1,
            ..manual_config()
        },
        None,
    );
    let a = alloc.malloc(4096, 0, S).unwrap();
    alloc.free(a, 4096, 0, S).unwrap();
    let during = Arc::new(Mutex::new(None));
    {
        let (alloc, out) = (alloc.clone(), during.clone());
        *backend.on_first_release.lock().unwrap() = Some(Box::new(move || {
            alloc.begin_exit();
            let inner = alloc.clone();
            let r = std::thread::spawn(move || inner.synchronize())
                .join()
                .unwrap();
            *out.lock().unwrap() = Some(r);
        }));
    }
    // a verifies and is due to be retired: its release runs the hook.
    let _ = alloc.synchronize();
    let during = during.lock().unwrap().take();
    let state = alloc.block_info(a).map(|b| b.state);
    let later = alloc.synchronize();
    assert!(
        matches!(during, Some(Err(_))),
        "synchronize after exit returned {during:?} while block {a:#x}'s release was under \
         way; the backend refused it, the block is now {state:?} in the pool (leaked) and a \
         later synchronize returns {later:?}"
    );
}

/// A backend that panics polling a batch, in the same pass (`harvest`) that applied an earlier
/// batch which retired its block: the panic is a failed wait of that batch (its block goes to
/// quarantine), the pass goes on, and the retired block goes back to the backend, so the
/// pool's figures still match what the backend holds.
#[test]
fn a_panicking_poll_later_in_the_same_pass_does_not_lose_a_block_taken_out_for_release() {
    let backend = PanicSubmit::new();
    let alloc = Allocator::new(
        hooked(&backend),
        Config {
            batch_size: 1,
            ..retire_config()
        },
        None,
    );
    let a = alloc.malloc(4096, 0, S).unwrap();
    let x = alloc.malloc(4096, 0, S).unwrap();
    backend.poll_panics_for.store(x, Ordering::SeqCst);
    alloc.free(a, 4096, 0, S).unwrap();
    alloc.free(x, 4096, 0, S).unwrap();
    // A pool miss harvests: once a's batch (first on the stream) has completed, it is
    // applied (a retires) and x's poll panics. Until then a miss allocates fresh.
    let deadline = Instant::now() + Duration::from_secs(5);
    while alloc.stats().counters.released == 0 {
        assert!(Instant::now() < deadline, "a was never released");
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| alloc.malloc(8192, 0, S)));
        assert!(
            matches!(r, Ok(Ok(_))),
            "a pool miss while the backend panics polling a batch"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let r = alloc.synchronize();
    assert!(r.as_ref().is_err_and(|e| e.contains("panicked")), "{r:?}");
    let pool_bytes = alloc.check_consistency().unwrap().total().bytes;
    let backend_bytes = backend.host.bytes_in_use();
    assert_eq!(
        (pool_bytes, alloc.stats().counters.released),
        (backend_bytes, 1),
        "block {a:#x} (verified for retirement) is {:?} in the table",
        alloc.block_info(a).map(|b| b.state)
    );
    assert_eq!(
        alloc.block_info(x).map(|b| b.state),
        Some(BlockState::Quarantined),
        "the block whose batch's poll panicked never verified"
    );
}

//! Whole-pool operations (`synchronize`, `shutdown`) racing frees, mallocs and checked frees of
//! other threads. The races are made deterministic with a backend that holds the scrub of one
//! chosen block in flight until the test releases it, while every other scrub completes.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

mod common;

use common::hooked::{hooked, Hooks};
use kvhygiene::alloc::{Allocator, BlockState};
use kvhygiene::backend::host::HostBackend;
use kvhygiene::backend::verify::SegmentResult;
use kvhygiene::backend::{BackendError, DevicePtr, ScrubTicket, StreamHandle};
use kvhygiene::config::Config;

const S: StreamHandle = StreamHandle(0);

/// A host backend whose scrub of one chosen address stays in flight until released.
struct HoldOne {
    host: Arc<HostBackend>,
    /// The address whose batch is held (0: none).
    held_addr: AtomicU64,
    /// Whether the held batch has been submitted.
    held_submitted: AtomicBool,
    /// Whether waiting on the held batch panics (a faulty backend) instead of blocking.
    panic_on_wait: AtomicBool,
    release: Arc<(Mutex<bool>, Condvar)>,
}

impl HoldOne {
    fn new() -> Arc<Self> {
        Arc::new(HoldOne {
            host: HostBackend::new(),
            held_addr: AtomicU64::new(0),
            held_submitted: AtomicBool::new(false),
            panic_on_wait: AtomicBool::new(false),
            release: Arc::new((Mutex::new(false), Condvar::new())),
        })
    }

    fn hold(&self, addr: u64) {
        self.held_addr.store(addr, Ordering::SeqCst);
    }

    fn let_go(&self) {
        let (lock, cv) = &*self.release;
        *lock.lock().unwrap() = true;
        cv.notify_all();
    }

    fn wait_until_held_submitted(&self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.held_submitted.load(Ordering::SeqCst) {
            assert!(
                Instant::now() < deadline,
                "the held batch was never submitted"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

struct Held {
    inner: Box<dyn ScrubTicket>,
    release: Option<Arc<(Mutex<bool>, Condvar)>>,
    panics: bool,
}

impl ScrubTicket for Held {
    fn poll(&mut self) -> Result<Option<Vec<SegmentResult>>, BackendError> {
        if let Some(r) = &self.release {
            if !*r.0.lock().unwrap() {
                return Ok(None);
            }
        }
        self.inner.poll()
    }

    fn wait(&mut self) -> Result<Vec<SegmentResult>, BackendError> {
        assert!(!self.panics, "the backend's wait panicked");
        if let Some(r) = &self.release {
            let (lock, cv) = &**r;
            let mut open = lock.lock().unwrap();
            while !*open {
                open = cv.wait(open).unwrap();
            }
        }
        self.inner.wait()
    }
}

impl Hooks for HoldOne {
    fn host(&self) -> &HostBackend {
        &self.host
    }
    fn ticket(&self, segments: &[DevicePtr], inner: Box<dyn ScrubTicket>) -> Box<dyn ScrubTicket> {
        let held = self.held_addr.load(Ordering::SeqCst);
        let holds = held != 0 && segments.contains(&held);
        if holds {
            self.held_submitted.store(true, Ordering::SeqCst);
        }
        Box::new(Held {
            inner,
            release: holds.then(|| self.release.clone()),
            panics: holds && self.panic_on_wait.load(Ordering::SeqCst),
        })
    }
}

/// Every free is submitted at once; the flusher stays out of the way.
fn config() -> Config {
    Config {
        batch_size: 1,
        batch_max_delay_us: 10_000_000,
        ..Config::default()
    }
}

/// Blocks to free on another thread while a whole-pool operation runs.
fn blocks(alloc: &Allocator, n: usize) -> Vec<u64> {
    (0..n)
        .map(|_| alloc.malloc(512, 0, StreamHandle(7)).unwrap())
        .collect()
}

/// Frees `ptrs` on another thread, one at a time, each once the previous one's scrub was
/// applied (by whichever thread applies it), until `done` is set: a steady stream of new
/// scrub batches, as a serving process produces while another thread synchronises.
fn churn(alloc: Allocator, ptrs: Vec<u64>, done: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut frees = 0;
        for p in ptrs {
            if done.load(Ordering::SeqCst) {
                break;
            }
            if alloc.free(p, 512, 0, StreamHandle(7)).is_err() {
                break;
            }
            frees += 1;
            let deadline = Instant::now() + Duration::from_millis(50);
            while alloc.block_info(p).map(|b| b.state) == Some(BlockState::Pending)
                && !done.load(Ordering::SeqCst)
                && Instant::now() < deadline
            {
                std::thread::yield_now();
            }
        }
        frees
    })
}

/// `synchronize` returns success only once every block freed before the call was scrubbed,
/// verified and applied (include/kvhygiene.h, `kvh_synchronize`), also a block whose batch
/// another thread (here a checked free) is waiting on with the pool lock dropped, and also
/// while other threads keep freeing. New frees made during the call may be left for later;
/// a free made before it may not.
#[test]
fn synchronize_does_not_return_over_a_held_batch_while_other_threads_keep_freeing() {
    let backend = HoldOne::new();
    let alloc = Allocator::new(hooked(&backend), config(), None);
    let x = alloc.malloc(4096, 0, S).unwrap();
    let others = blocks(&alloc, 100);
    backend.hold(x);
    // The checked free submits x's batch and waits for it with the lock dropped.
    let checker = {
        let alloc = alloc.clone();
        std::thread::spawn(move || alloc.free_checked(x, 4096, 0, S))
    };
    backend.wait_until_held_submitted();
    // x was freed before synchronize is called.
    let done = Arc::new(AtomicBool::new(false));
    let syncer = {
        let (alloc, done) = (alloc.clone(), done.clone());
        std::thread::spawn(move || {
            let r = alloc.synchronize();
            let state = alloc.block_info(x).map(|b| b.state);
            done.store(true, Ordering::SeqCst);
            (r, state)
        })
    };
    let frees = churn(alloc.clone(), others, done.clone()).join().unwrap();
    let returned_early = done.load(Ordering::SeqCst);
    backend.let_go();
    let (r, state) = syncer.join().unwrap();
    checker.join().unwrap().unwrap();
    assert!(
        !returned_early || state != Some(BlockState::Pending),
        "synchronize returned {r:?} while the block freed before it was still {state:?} (its \
         batch held by another thread); {frees} frees ran on a third thread meanwhile"
    );
    assert_eq!(
        alloc.block_info(x).map(|b| b.state),
        Some(BlockState::Clean)
    );
}

/// `shutdown` scrubs and verifies everything freed before it, then stops all backend calls
/// (`Allocator::shutdown`, `kvh_shutdown`): a block freed before the call must not be left
/// PENDING (abandoned, leaked) because other threads kept freeing while it waited.
#[test]
fn shutdown_does_not_abandon_a_held_batch_while_other_threads_keep_freeing() {
    let backend = HoldOne::new();
    let alloc = Allocator::new(hooked(&backend), config(), None);
    let x = alloc.malloc(4096, 0, S).unwrap();
    let others = blocks(&alloc, 100);
    backend.hold(x);
    let checker = {
        let alloc = alloc.clone();
        std::thread::spawn(move || alloc.free_checked(x, 4096, 0, S))
    };
    backend.wait_until_held_submitted();
    let done = Arc::new(AtomicBool::new(false));
    let stopper = {
        let (alloc, done) = (alloc.clone(), done.clone());
        std::thread::spawn(move || {
            alloc.shutdown();
            let state = alloc.block_info(x).map(|b| b.state);
            done.store(true, Ordering::SeqCst);
            state
        })
    };
    let churner = churn(alloc.clone(), others, done.clone());
    churner.join().unwrap();
    let shut_down_early = done.load(Ordering::SeqCst);
    backend.let_go();
    let state = stopper.join().unwrap();
    checker.join().unwrap().unwrap();
    assert!(
        !shut_down_early || state != Some(BlockState::Pending),
        "shutdown returned (exit begun: no more scrubs) while the block freed before it was \
         still {state:?}, its scrub not yet verified"
    );
}

/// A backend whose wait panics while a whole-pool wait waits on a batch: the batch gets an
/// error, as for a failed wait (its block goes to quarantine, and its re-scrub, whose wait
/// panics too, condemns it), and `synchronize` reports the error. The batch must not stay
/// counted as held by a thread: every later whole-pool wait, the exit's own included, would
/// wait for it forever.
#[test]
fn a_panic_while_waiting_on_a_batch_does_not_hang_later_whole_pool_waits() {
    let backend = HoldOne::new();
    let alloc = Allocator::new(hooked(&backend), config(), None);
    let x = alloc.malloc(4096, 0, S).unwrap();
    backend.hold(x);
    backend.panic_on_wait.store(true, Ordering::SeqCst);
    alloc.free(x, 4096, 0, S).unwrap();
    backend.wait_until_held_submitted();
    let r = alloc.synchronize();
    assert!(
        r.as_ref().is_err_and(|e| e.contains("panicked")),
        "synchronize over a batch whose wait panicked: {r:?}"
    );
    let (tx, rx) = std::sync::mpsc::channel();
    {
        let alloc = alloc.clone();
        std::thread::spawn(move || {
            alloc.shutdown();
            let _ = tx.send(());
        });
    }
    assert!(
        rx.recv_timeout(Duration::from_secs(5)).is_ok(),
        "shutdown still waits, 5 s on, for the batch whose wait panicked"
    );
    assert_eq!(
        alloc.block_info(x).map(|b| b.state),
        Some(BlockState::Quarantined),
        "the block whose scrub never verified is quarantined, never handed out"
    );
    alloc.check_consistency().unwrap();
}

/// A host backend that completes scrub batches one at a time, each `per_batch` after the one
/// before (a device runs its queue in order, at its own pace), so frees can outpace scrubs.
struct SerialDevice {
    host: Arc<HostBackend>,
    per_batch: Duration,
    /// When the last batch submitted completes.
    busy_until: Mutex<Instant>,
}

struct Queued {
    inner: Box<dyn ScrubTicket>,
    ready: Instant,
}

impl ScrubTicket for Queued {
    fn poll(&mut self) -> Result<Option<Vec<SegmentResult>>, BackendError> {
        if Instant::now() < self.ready {
            return Ok(None);
        }
        self.inner.poll()
    }

    fn wait(&mut self) -> Result<Vec<SegmentResult>, BackendError> {
        std::thread::sleep(self.ready.saturating_duration_since(Instant::now()));
        self.inner.wait()
    }
}

impl Hooks for SerialDevice {
    fn host(&self) -> &HostBackend {
        &self.host
    }
    fn ticket(&self, _: &[DevicePtr], inner: Box<dyn ScrubTicket>) -> Box<dyn ScrubTicket> {
        let mut busy = self.busy_until.lock().unwrap();
        let ready = (*busy).max(Instant::now()) + self.per_batch;
        *busy = ready;
        Box::new(Queued { inner, ready })
    }
}

/// `shutdown` waits for the scrubs of the frees made before it, and for a bounded number of
/// later ones: a thread that frees faster than the device scrubs cannot keep it waiting.
/// (When it waited for every batch in the pool for a number of rounds, each round waited for
/// all that was freed during the one before, a wait that grew round after round: the call
/// returned only once the frees stopped.)
#[test]
fn shutdown_is_not_held_up_by_a_thread_that_frees_faster_than_the_device_scrubs() {
    let backend = Arc::new(SerialDevice {
        host: HostBackend::new(),
        per_batch: Duration::from_micros(200),
        busy_until: Mutex::new(Instant::now()),
    });
    let alloc = Allocator::new(hooked(&backend), config(), None);
    // Freed before the call; of a size and stream the other thread never asks for, so none
    // is handed out again meanwhile.
    let before: Vec<u64> = (0..8)
        .map(|_| alloc.malloc(65_536, 0, StreamHandle(9)).unwrap())
        .collect();
    for &p in &before {
        alloc.free(p, 65_536, 0, StreamHandle(9)).unwrap();
    }
    let done = Arc::new(AtomicBool::new(false));
    // About ten frees for each batch the device completes, until the shutdown returns or
    // the churn reaches its end.
    const MOST_FREES: u64 = 20_000;
    let churner = {
        let (alloc, done) = (alloc.clone(), done.clone());
        std::thread::spawn(move || {
            let mut frees = 0;
            while frees < MOST_FREES && !done.load(Ordering::SeqCst) {
                let Ok(p) = alloc.malloc(512, 0, StreamHandle(7)) else {
                    break;
                };
                if alloc.free(p, 512, 0, StreamHandle(7)).is_err() {
                    break;
                }
                frees += 1;
                std::thread::sleep(Duration::from_micros(20));
            }
            frees
        })
    };
    std::thread::sleep(Duration::from_millis(20));
    alloc.shutdown();
    let churning = !churner.is_finished();
    done.store(true, Ordering::SeqCst);
    let frees = churner.join().unwrap();
    assert!(
        churning,
        "shutdown returned only after the other thread stopped freeing ({frees} frees)"
    );
    for p in before {
        assert_eq!(
            alloc.block_info(p).map(|b| b.state),
            Some(BlockState::Clean),
            "a block freed before shutdown was left unscrubbed"
        );
    }
}

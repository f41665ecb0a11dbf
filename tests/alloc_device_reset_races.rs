//! `Allocator::reset_device` while other calls land between its frees: a holder's free or
//! checked free of a block the reset has not reached yet, and a second reset of the same
//! device. Each interleaving is made exact by an event sink that runs a hook on the first
//! record the reset's first free produces (the sink runs with no pool lock held, as another
//! thread would).

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use common::{manual_config, secret, TestBackend};
use kvhygiene::alloc::{Allocator, BlockState};
use kvhygiene::backend::host::HostBackend;
use kvhygiene::backend::{Backend, StreamHandle};
use kvhygiene::config::Config;
use kvhygiene::events::{Event, EventSink, MemorySink};

const S: StreamHandle = StreamHandle(0);

/// Records every event, and runs its hook once on the first event given after it is armed.
#[derive(Default)]
struct Hook {
    armed: AtomicBool,
    #[allow(clippy::type_complexity)]
    hook: Mutex<Option<Box<dyn FnOnce() + Send>>>,
    records: Arc<MemorySink>,
}

impl EventSink for Hook {
    fn emit(&self, event: Event) {
        self.records.emit(event);
        if self.armed.swap(false, Ordering::SeqCst) {
            let hook = self.hook.lock().unwrap().take();
            if let Some(hook) = hook {
                hook();
            }
        }
    }
}

struct Setup {
    alloc: Allocator,
    backend: Arc<TestBackend>,
    sink: Arc<Hook>,
    /// The block the reset frees second (the higher address of the two).
    second: u64,
}

/// Two 4096-byte blocks handed out on device 0, each holding a secret. The reset's free of
/// the first one cannot submit its scrub (an injected driver failure), so that free records
/// an event; the hook given runs on it, after the submission budget is restored.
fn setup(hook: impl FnOnce(&Allocator, u64) + Send + 'static) -> Setup {
    let backend = TestBackend::new(HostBackend::new());
    let sink = Arc::new(Hook {
        records: MemorySink::new(),
        ..Hook::default()
    });
    let config = Config {
        batch_size: 1,
        ..manual_config()
    };
    let alloc = Allocator::new(backend.clone(), config, Some(sink.clone()));
    let x = alloc.malloc(4096, 0, S).unwrap();
    let y = alloc.malloc(4096, 0, S).unwrap();
    let (first, second) = (x.min(y), x.max(y));
    backend.write(0, first, &secret(4096, 0x11)).unwrap();
    backend.write(0, second, &secret(4096, 0x22)).unwrap();
    {
        let (alloc, backend) = (alloc.clone(), backend.clone());
        *sink.hook.lock().unwrap() = Some(Box::new(move || {
            backend.submit_budget.store(-1, Ordering::SeqCst);
            hook(&alloc, second);
        }));
    }
    backend.submit_budget.store(0, Ordering::SeqCst);
    sink.armed.store(true, Ordering::SeqCst);
    Setup {
        alloc,
        backend,
        sink,
        second,
    }
}

fn read(backend: &TestBackend, addr: u64) -> Vec<u8> {
    let mut buf = vec![0u8; 4096];
    backend.read(0, addr, &mut buf).unwrap();
    buf
}

/// A holder's checked free of a block the reset is about to free (it has not reached it
/// yet) answers that block's scrub, which the reset makes: the allocator has not shut down,
/// and the block is scrubbed and verified.
#[test]
fn a_checked_free_of_a_block_the_reset_has_not_reached_yet_answers_its_scrub() {
    let answer = Arc::new(Mutex::new(None));
    let seen = answer.clone();
    let s = setup(move |alloc, second| {
        *seen.lock().unwrap() = Some(alloc.free_checked(second, 4096, 0, S));
    });
    // The holder's free came first and freed the second block: the reset freed the first.
    assert_eq!(s.alloc.reset_device(0), 1);
    s.alloc.synchronize().ok();
    assert!(!s.alloc.is_shut_down());
    let got = answer.lock().unwrap().take().expect("the hook did not run");
    let state = s.alloc.block_info(s.second).map(|b| b.state);
    assert!(
        got.is_ok(),
        "the checked free answered {got:?} while the allocator runs; the block is now \
         {state:?}"
    );
}

/// A second reset of the same device that lands while the first one is freeing the
/// device's blocks (two threads calling `cudaDeviceReset`) frees each block once between
/// them: no free of the reset is recorded as an invalid free, and the holder's own free of
/// a block the resets freed is accepted once.
#[test]
fn a_second_reset_during_the_first_records_no_invalid_free_and_keeps_the_holders_free_valid() {
    let s = setup(|alloc, _| {
        alloc.reset_device(0);
    });
    s.alloc.reset_device(0);
    s.alloc.synchronize().ok();
    let invalid: Vec<_> = s
        .sink
        .records
        .snapshot()
        .into_iter()
        .filter(|e| e.kind.name() == "invalid_free")
        .map(|e| e.addr)
        .collect();
    let holders_free = s.alloc.free(s.second, 4096, 0, S).map(|_| ());
    assert_eq!(
        (invalid, holders_free),
        (vec![], Ok(())),
        "(invalid-free records of the resets' own frees, the holder's free of the second \
         block)"
    );
    s.alloc.check_consistency().unwrap();
}

/// A reset that unwinds (its sink panicked) after the holder of a block it had not reached
/// freed that block (accepted, doing nothing, since the reset was to free it) leaves that
/// block neither LIVE nor unscrubbed: the holder's free was accepted, so the block must be
/// scrubbed.
#[test]
fn a_block_its_holder_freed_while_the_reset_was_unwinding_is_scrubbed() {
    let holders_free = Arc::new(Mutex::new(None));
    let seen = holders_free.clone();
    let s = setup(move |alloc, second| {
        *seen.lock().unwrap() = Some(alloc.free(second, 4096, 0, S).map(|_| ()));
        panic!("the sink panicked");
    });
    let reset = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| s.alloc.reset_device(0)));
    assert!(reset.is_err(), "the sink's panic did not reach the reset");
    assert_eq!(holders_free.lock().unwrap().take(), Some(Ok(())));
    s.alloc.synchronize().ok();
    let state = s.alloc.block_info(s.second).map(|b| b.state);
    let unscrubbed = read(&s.backend, s.second).iter().any(|&b| b != 0);
    assert!(
        state != Some(BlockState::Live) && !unscrubbed,
        "after its holder's accepted free the block is {state:?}, its secret still there: \
         {unscrubbed}"
    );
}

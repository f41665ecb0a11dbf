//! The detector counts an event at the time it happened: two events of one tenant that are
//! several windows apart are not a burst, also when the sink behind the detector held the
//! first one back (the forensic writer's queue was full and its `emit` waited). The events
//! of one pool operation count together.

mod common;

use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use common::{manual_config, secret, TestBackend};
use kvhygiene::alloc::Allocator;
use kvhygiene::anomaly::{AnomalySink, ManualClock, Params};
use kvhygiene::backend::host::HostBackend;
use kvhygiene::backend::{Backend, StreamHandle};
use kvhygiene::config::AnomalyConfig;
use kvhygiene::context::Context;
use kvhygiene::events::{Event, EventKind, EventSink};

const WINDOW: Duration = Duration::from_millis(10_000);

/// A sink whose first `emit` waits until it is released (a forensic log whose queue is full),
/// and which keeps every event it receives.
struct StallsFirst {
    entered: Mutex<Option<mpsc::Sender<()>>>,
    release: Mutex<mpsc::Receiver<()>>,
    events: Mutex<Vec<Event>>,
}

impl EventSink for StallsFirst {
    fn emit(&self, event: Event) {
        let first = self.entered.lock().unwrap().take();
        if let Some(entered) = first {
            entered.send(()).unwrap();
            self.release.lock().unwrap().recv().unwrap();
        }
        self.events.lock().unwrap().push(event);
    }
}

/// A detector (default parameters, a manual clock) in front of a sink that holds the first
/// event it gets until `release` is sent, and says on `entered` when it holds it.
struct Stalled {
    downstream: Arc<StallsFirst>,
    sink: Arc<AnomalySink>,
    clock: Arc<ManualClock>,
    entered: mpsc::Receiver<()>,
    release: mpsc::Sender<()>,
}

fn stalled() -> Stalled {
    let (entered_tx, entered) = mpsc::channel();
    let (release, release_rx) = mpsc::channel();
    let downstream = Arc::new(StallsFirst {
        entered: Mutex::new(Some(entered_tx)),
        release: Mutex::new(release_rx),
        events: Mutex::new(Vec::new()),
    });
    let clock = ManualClock::new();
    let sink = AnomalySink::new(
        Params::from_config(&AnomalyConfig::default()),
        Some(downstream.clone() as Arc<dyn EventSink>),
        clock.clone(),
    );
    Stalled {
        downstream,
        sink,
        clock,
        entered,
        release,
    }
}

fn verify_failed(at: SystemTime) -> Event {
    Event {
        at,
        kind: EventKind::VerifyFailed {
            samples_expected: 64,
            samples_checked: 64,
            samples_nonzero: 0,
            coverage: 0.5,
            threshold: 0.999,
        },
        context: Context::new(Some("tenant-a"), Some("req-1"), None).unwrap(),
        block: None,
        addr: None,
    }
}

/// Two failed verifications of one tenant, five windows apart by their own timestamps and by
/// the detector's clock when each was emitted, are no `verify_failed` burst (threshold 2
/// within `window_ms`), whichever of them the sink behind the detector delivered first.
#[test]
fn events_windows_apart_are_no_burst_when_the_sink_behind_stalls() {
    let Stalled {
        downstream,
        sink,
        clock,
        entered: entered_rx,
        release: release_tx,
    } = stalled();
    let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);

    // The first failure is emitted at the clock's start; the sink behind holds it.
    let first = {
        let sink = sink.clone();
        std::thread::spawn(move || sink.emit(verify_failed(t0)))
    };
    entered_rx.recv().unwrap();
    // Five windows later, a second failure of the same tenant.
    clock.advance(WINDOW * 5);
    sink.emit(verify_failed(t0 + WINDOW * 5));
    // The sink behind catches up.
    release_tx.send(()).unwrap();
    first.join().unwrap();

    let events = downstream.events.lock().unwrap().clone();
    let anomalies: Vec<&Event> = events
        .iter()
        .filter(|e| matches!(e.kind, EventKind::Anomaly { .. }))
        .collect();
    assert!(
        anomalies.is_empty(),
        "two failures {} s apart (window {} s) counted as a burst: {anomalies:#?}",
        (WINDOW * 5).as_secs(),
        WINDOW.as_secs()
    );
}

/// The events of one pool operation happened together: handed over as one batch, they count
/// in one window, so two failed verifications of one tenant are a `verify_failed` burst
/// (threshold 2) even when the sink behind the detector held the first back for five windows
/// before the second reached the detector.
#[test]
fn one_operations_events_count_together_when_the_sink_behind_stalls() {
    let Stalled {
        downstream,
        sink,
        clock,
        entered: entered_rx,
        release: release_tx,
    } = stalled();
    let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);

    let batch = {
        let sink = sink.clone();
        std::thread::spawn(move || sink.emit_all(vec![verify_failed(t0), verify_failed(t0)]))
    };
    // The sink behind holds the first event while the clock moves five windows on.
    entered_rx.recv().unwrap();
    clock.advance(WINDOW * 5);
    release_tx.send(()).unwrap();
    batch.join().unwrap();

    let events = downstream.events.lock().unwrap().clone();
    let kinds: Vec<&str> = events.iter().map(|e| e.kind.name()).collect();
    assert_eq!(
        kinds,
        ["verify_failed", "verify_failed", "anomaly"],
        "one operation's two failures, the first held back, in the log"
    );
}

/// Keeps the record kinds of each call it receives: one entry per `emit_all` batch, and one
/// per single `emit`.
#[derive(Default)]
struct Calls(Mutex<Vec<Vec<&'static str>>>);

impl EventSink for Calls {
    fn emit(&self, event: Event) {
        self.0.lock().unwrap().push(vec![event.kind.name()]);
    }

    fn emit_all(&self, events: Vec<Event>) {
        let kinds = events.iter().map(|e| e.kind.name()).collect();
        self.0.lock().unwrap().push(kinds);
    }
}

/// A free whose scrub fails verification emits its `verify_failed` and `quarantine` events
/// together, in one call to the sink: the detector in front of the log then times them once.
#[test]
fn the_allocator_hands_one_operations_events_over_together() {
    let backend = TestBackend::new(HostBackend::new());
    let calls = Arc::new(Calls::default());
    let alloc = Allocator::new(
        backend.clone(),
        manual_config(),
        Some(calls.clone() as Arc<dyn EventSink>),
    );
    let stream = StreamHandle(0);
    let a = alloc.malloc(4096, 0, stream).unwrap();
    backend.write(0, a, &secret(4096, 3)).unwrap();
    backend.host.inject_skip_tail(1);
    assert!(
        alloc.free_checked(a, 4096, 0, stream).is_err(),
        "quarantined"
    );
    let calls = calls.0.lock().unwrap().clone();
    assert!(
        calls
            .iter()
            .any(|c| c.contains(&"verify_failed") && c.contains(&"quarantine")),
        "the failed scrub's events, per call to the sink: {calls:?}"
    );
}

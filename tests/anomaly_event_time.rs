//! The detector counts an event at the time it happened: two events of one tenant that are
//! several windows apart are not a burst, also when the sink behind the detector held the
//! first one back (the forensic writer's queue was full and its `emit` waited).

use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use kvhygiene::anomaly::{AnomalySink, ManualClock, Params};
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
    let (entered_tx, entered_rx) = mpsc::channel();
    let (release_tx, release_rx) = mpsc::channel();
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

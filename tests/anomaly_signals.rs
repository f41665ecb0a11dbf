//! The anomaly detector's signals as a real allocator produces them: every scrub that read
//! residue counts toward the `residue` signal, and the detector's records name the tenant
//! whose events tripped them.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{manual_config, secret, TestBackend};
use kvhygiene::alloc::Allocator;
use kvhygiene::anomaly::{signals_of, AnomalySink, ManualClock, Params};
use kvhygiene::backend::host::HostBackend;
use kvhygiene::backend::{Backend, StreamHandle};
use kvhygiene::config::{AnomalyConfig, Config};
use kvhygiene::context::Context;
use kvhygiene::events::{AnomalySignal, EventKind, EventSink, MemorySink};

const S: StreamHandle = StreamHandle(0);
const WINDOW: Duration = Duration::from_millis(10_000);

/// A re-scrub of a quarantined block that reads non-zero samples (something wrote to it while
/// it sat in quarantine) is residue: the allocator counts it in `residue_detected`, and the
/// events it emits count toward the detector's `residue` signal as often, so the tenant gets
/// a `residue` anomaly for it.
#[test]
fn residue_read_by_a_rescrub_counts_toward_the_residue_signal() {
    let backend = TestBackend::new(HostBackend::new());
    let mem = MemorySink::new();
    let clock = ManualClock::new();
    let detector = AnomalySink::new(
        Params::from_config(&AnomalyConfig::default()),
        Some(mem.clone() as Arc<dyn EventSink>),
        clock.clone(),
    );
    let config = Config {
        // Half a block left dirty still passes coverage: residue without a failed verification.
        coverage_threshold: 0.4,
        ..manual_config()
    };
    let alloc = Allocator::new(
        backend.clone(),
        config,
        Some(detector.clone() as Arc<dyn EventSink>),
    );
    let previous =
        Context::set_current(Context::new(Some("tenant-a"), Some("req-1"), None).unwrap());
    let a = alloc.malloc(4096, 0, S).unwrap();
    backend.write(0, a, &secret(4096, 7)).unwrap();
    // The first scrub and the re-scrub each leave the second half of the block unzeroed.
    backend.host.inject_skip_tail(2);
    backend.set_rescrub_gate(false);
    assert!(
        alloc.free_checked(a, 4096, 0, S).is_err(),
        "quarantined for residue"
    );
    // A window later the re-scrub completes, and reads residue again.
    clock.advance(WINDOW);
    backend.set_rescrub_gate(true);
    alloc.synchronize().unwrap();
    Context::set_current(previous);

    let events = mem.snapshot();
    let kinds: Vec<String> = events.iter().map(|e| format!("{:?}", e.kind)).collect();
    let residue_detected = alloc.stats().counters.residue_detected;
    assert_eq!(residue_detected, 2, "both scrubs read residue: {kinds:#?}");
    let residue_events = events
        .iter()
        .filter(|e| signals_of(&e.kind).contains(&AnomalySignal::Residue))
        .count() as u64;
    assert_eq!(
        residue_events, residue_detected,
        "events counted toward the residue signal vs scrubs that read residue: {kinds:#?}"
    );
    let residue_anomalies = events
        .iter()
        .filter(|e| {
            matches!(
                e.kind,
                EventKind::Anomaly {
                    signal: AnomalySignal::Residue,
                    ..
                }
            )
        })
        .count();
    assert_eq!(
        residue_anomalies, 2,
        "one residue anomaly per window with residue: {kinds:#?}"
    );
}

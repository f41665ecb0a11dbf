//! The anomaly detector's signals as a real allocator produces them: every scrub that read
//! residue counts toward the `residue` signal, and the detector's records name the tenant
//! whose events tripped them.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{manual_config, secret, TestBackend};
use kvhygiene::alloc::{Allocator, KvLayout};
use kvhygiene::anomaly::{signals_of, AnomalySink, ManualClock, Params};
use kvhygiene::backend::host::HostBackend;
use kvhygiene::backend::{Backend, StreamHandle};
use kvhygiene::config::{AnomalyConfig, Config};
use kvhygiene::context::Context;
use kvhygiene::events::{AnomalySignal, EventKind, EventSink, MemorySink};

const S: StreamHandle = StreamHandle(0);
const WINDOW: Duration = Duration::from_millis(10_000);

/// An allocator on a test backend whose events pass through the detector (default
/// parameters, a manual clock) into a memory sink.
fn detected() -> (Arc<TestBackend>, Arc<MemorySink>, Allocator) {
    detected_with(manual_config())
}

/// As [`detected`], under `config`.
fn detected_with(config: Config) -> (Arc<TestBackend>, Arc<MemorySink>, Allocator) {
    let backend = TestBackend::new(HostBackend::new());
    let mem = MemorySink::new();
    let detector = AnomalySink::new(
        Params::from_config(&AnomalyConfig::default()),
        Some(mem.clone() as Arc<dyn EventSink>),
        ManualClock::new(),
    );
    let alloc = Allocator::new(
        backend.clone(),
        config,
        Some(detector as Arc<dyn EventSink>),
    );
    (backend, mem, alloc)
}

/// The `anomaly` events of `signal` among `events`.
fn anomalies_of(events: &[kvhygiene::events::Event], signal: AnomalySignal) -> usize {
    events
        .iter()
        .filter(|e| matches!(e.kind, EventKind::Anomaly { signal: s, .. } if s == signal))
        .count()
}

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

/// A KV block that fails in every region (every layer's K and V) is one failed block to the
/// detector, as one failed scrub of a freed block is: one `verify_failed` and one `residue`
/// count, whatever the layer count, so a single bad block is no burst. A second failed block
/// is.
#[test]
fn a_kv_block_failing_in_every_region_counts_once() {
    const REGIONS: u64 = 8;
    const BLOCK: u64 = 4096;
    const BLOCKS: u64 = 4;
    let (backend, mem, alloc) = detected();
    let previous =
        Context::set_current(Context::new(Some("tenant-a"), Some("req-1"), None).unwrap());
    let len = (REGIONS * BLOCKS * BLOCK) as i64;
    let a = alloc.malloc(len, 0, S).unwrap();
    backend.write(0, a, &secret(len as usize, 9)).unwrap();
    let layout = KvLayout {
        regions: (0..REGIONS).map(|r| a + r * BLOCKS * BLOCK).collect(),
        block_bytes: BLOCK,
        block_stride: BLOCK,
        blocks_per_region: BLOCKS,
    };
    let verify_failed_anomalies = || anomalies_of(&mem.snapshot(), AnomalySignal::VerifyFailed);
    let counted = |signal| {
        mem.snapshot()
            .iter()
            .filter(|e| signals_of(&e.kind).contains(&signal))
            .count()
    };

    // Every segment of block 2 is left half dirty.
    backend.host.inject_skip_tail(REGIONS);
    let report = alloc.scrub_kv_blocks(&layout, &[2], 0, S).unwrap();
    assert_eq!(report.failed, vec![2]);
    let records = mem
        .snapshot()
        .iter()
        .filter(|e| e.kind.name() == "kv_verify_failed")
        .count();
    assert_eq!(records, REGIONS as usize, "one record per failed segment");
    assert_eq!(counted(AnomalySignal::VerifyFailed), 1);
    assert_eq!(counted(AnomalySignal::Residue), 1);
    assert_eq!(verify_failed_anomalies(), 0, "one bad block is not a burst");

    // A second block failing in the same window is.
    backend.host.inject_skip_tail(REGIONS);
    let report = alloc.scrub_kv_blocks(&layout, &[3], 0, S).unwrap();
    assert_eq!(report.failed, vec![3]);
    assert_eq!(counted(AnomalySignal::VerifyFailed), 2);
    assert_eq!(verify_failed_anomalies(), 1);
    Context::set_current(previous);
    alloc.free(a, len, 0, S).unwrap();
}

/// A freed block whose scrub fails counts once toward `verify_failed`; its re-scrub (double
/// pass, full verification) counts again only when it fails too. A block that clears at its
/// re-scrub (a transient fault) is no burst; memory that twice does not clear is one.
#[test]
fn a_freed_block_is_a_verify_failed_burst_only_when_its_rescrub_fails_too() {
    for (faults, bursts) in [(1, 0), (2, 1)] {
        let (backend, mem, alloc) = detected();
        let previous =
            Context::set_current(Context::new(Some("tenant-a"), Some("req-1"), None).unwrap());
        let a = alloc.malloc(4096, 0, S).unwrap();
        backend.write(0, a, &secret(4096, 3)).unwrap();
        // The first scrub, and with two faults the re-scrub, leave half of the block unzeroed.
        backend.host.inject_skip_tail(faults);
        assert!(alloc.free_checked(a, 4096, 0, S).is_err(), "quarantined");
        alloc.synchronize().unwrap();
        Context::set_current(previous);

        let events = mem.snapshot();
        let kinds: Vec<String> = events.iter().map(|e| format!("{:?}", e.kind)).collect();
        let c = alloc.stats().counters;
        assert_eq!(c.rescrub_failed, faults - 1, "{kinds:#?}");
        let verify_failed_anomalies = anomalies_of(&events, AnomalySignal::VerifyFailed);
        assert_eq!(
            verify_failed_anomalies, bursts,
            "{faults} faults: {kinds:#?}"
        );
    }
}

/// A block counts toward `quarantine` once, when it enters quarantine, as
/// `blocks_quarantined` counts it: its re-scrub failing too keeps it there and is no second
/// quarantine. Two blocks whose scrubs and re-scrubs all fail are two quarantines, below the
/// burst threshold (4); four are a burst.
#[test]
fn a_block_whose_rescrub_fails_too_is_one_quarantine() {
    for (blocks, bursts) in [(2u64, 0usize), (4, 1)] {
        let (backend, mem, alloc) = detected();
        let previous =
            Context::set_current(Context::new(Some("tenant-a"), Some("req-1"), None).unwrap());
        let ptrs: Vec<u64> = (0..blocks)
            .map(|i| {
                let a = alloc.malloc(4096, 0, S).unwrap();
                backend.write(0, a, &secret(4096, i as u8)).unwrap();
                a
            })
            .collect();
        // Every block's scrub, and then its re-scrub, leave half of it unzeroed.
        backend.host.inject_skip_tail(2 * blocks);
        for &a in &ptrs {
            assert!(alloc.free_checked(a, 4096, 0, S).is_err(), "quarantined");
        }
        alloc.synchronize().unwrap();
        Context::set_current(previous);

        let events = mem.snapshot();
        let kinds: Vec<String> = events.iter().map(|e| format!("{:?}", e.kind)).collect();
        let c = alloc.stats().counters;
        assert_eq!(
            (c.quarantined, c.rescrub_failed),
            (blocks, blocks),
            "precondition: {kinds:#?}"
        );
        assert_eq!(
            anomalies_of(&events, AnomalySignal::Quarantine),
            bursts,
            "{blocks} blocks quarantined, their re-scrubs failed: {kinds:#?}"
        );
    }
}

/// A block the never-reuse policy retires (`idle_ttl_ms = 0`) is not counted toward
/// `quarantine` when it enters quarantine: that is the control working. When its re-scrub
/// then fails, it is held in quarantine for a failure for the life of the process (a
/// `rescrub_failed` record, an exception in `kvh evidence`), and that is the one time it
/// counts toward `quarantine`. Four such blocks of one tenant are a burst (threshold 4).
#[test]
fn a_retired_block_whose_rescrub_fails_counts_toward_quarantine_once() {
    const BLOCKS: u64 = 4;
    let (backend, mem, alloc) = detected_with(Config {
        idle_ttl_ms: 0,
        ..manual_config()
    });
    let previous =
        Context::set_current(Context::new(Some("tenant-a"), Some("req-1"), None).unwrap());
    for i in 0..BLOCKS {
        let a = alloc.malloc(4096, 0, S).unwrap();
        backend.write(0, a, &secret(4096, i as u8)).unwrap();
        // The scrub at free verifies; the re-scrub submitted after it leaves half unzeroed.
        let host = backend.host.clone();
        *backend.after_next_submit.lock().unwrap() =
            Some(Box::new(move || host.inject_skip_tail(1)));
        let _ = alloc.free_checked(a, 4096, 0, S);
        alloc.synchronize().unwrap();
    }
    Context::set_current(previous);

    let events = mem.snapshot();
    let kinds: Vec<String> = events.iter().map(|e| format!("{:?}", e.kind)).collect();
    let c = alloc.stats().counters;
    assert_eq!(
        (c.quarantined, c.rescrub_failed),
        (BLOCKS, BLOCKS),
        "precondition: every retired block's re-scrub failed: {kinds:#?}"
    );
    assert_eq!(
        anomalies_of(&events, AnomalySignal::Quarantine),
        1,
        "{BLOCKS} blocks held in quarantine for a failed re-scrub: {kinds:#?}"
    );
}

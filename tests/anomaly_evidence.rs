//! How `kvh evidence` reports the detector's `anomaly` records when the exception list is cut
//! at `--max-exceptions`.

mod forensic_common;

use std::sync::Arc;

use forensic_common::{cfg, start};
use kvhygiene::anomaly::{AnomalySink, ManualClock, Params};
use kvhygiene::config::AnomalyConfig;
use kvhygiene::events::EventSink;
use kvhygiene::forensic::cli::VerifyLogArgs;
use kvhygiene::forensic::evidence::{self, EvidenceArgs};
use kvhygiene::forensic::ForensicLog;

/// The report's line of anomalies says each is listed under Exceptions only when each is:
/// with the list cut short, some anomaly records are counted but not listed, and the report
/// must not say otherwise.
#[test]
fn the_anomalies_line_does_not_claim_every_record_is_listed_when_the_list_is_cut() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    let log = ForensicLog::open_with_secret(&cfg(&dir, 1 << 20), start(), None).unwrap();
    let detector = AnomalySink::new(
        Params::from_config(&AnomalyConfig::default()),
        Some(log.clone() as Arc<dyn EventSink>),
        ManualClock::new(),
    );
    // Five tenants' blocks quarantined for residue: a quarantine record and a residue
    // anomaly each.
    for i in 0..5u64 {
        let mut e = forensic_common::event(i);
        e.kind = kvhygiene::events::EventKind::Quarantined {
            reason: kvhygiene::events::QuarantineReason::Residue,
            retired_before: false,
        };
        e.context = kvhygiene::context::Context::new(Some(&format!("tenant-{i}")), Some("r"), None)
            .unwrap();
        detector.emit(e);
    }
    log.stop();

    let args = EvidenceArgs {
        max_exceptions: 3,
        ..EvidenceArgs::of(VerifyLogArgs::of(dir.clone()))
    };
    let ev = evidence::collect(&args).unwrap();
    let counted = ev.anomalies_by_signal.values().sum::<u64>();
    assert_eq!(counted, 5, "{:?}", ev.anomalies_by_signal);
    let listed = ev.exceptions.iter().filter(|e| e.kind == "anomaly").count() as u64;
    assert!(
        listed < counted,
        "the list is cut: {listed} of {counted} listed"
    );
    let md = evidence::render(&ev);
    let line = md
        .lines()
        .find(|l| l.starts_with("Anomalies ("))
        .expect("the anomalies line");
    assert!(
        !line.contains("each is listed under Exceptions"),
        "{listed} of {counted} anomaly records are listed, but the report says: {line}"
    );
}

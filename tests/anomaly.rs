//! The anomaly detector as a layer between a real allocator and its sinks: a storm of invalid
//! frees from one tenant is one `anomaly` record a window, other tenants are untouched, every
//! event still reaches the sink behind it, and a forensic log holding anomaly records
//! verifies and reports them.

mod forensic_common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use forensic_common::{cfg, chain_files, keyed_opts, secret, start, verify};
use kvhygiene::alloc::{Allocator, FreeError};
use kvhygiene::anomaly::{AnomalySink, ManualClock, Params};
use kvhygiene::backend::host::HostBackend;
use kvhygiene::backend::StreamHandle;
use kvhygiene::config::{AnomalyConfig, Config};
use kvhygiene::context::Context;
use kvhygiene::events::{
    AnomalyRule, AnomalySignal, Event, EventKind, EventSink, InvalidFreeReason, MemorySink,
};
use kvhygiene::forensic::cli::VerifyLogArgs;
use kvhygiene::forensic::evidence::{self, EvidenceArgs};
use kvhygiene::forensic::ForensicLog;
use serde_json::Value;

const WINDOW: Duration = Duration::from_millis(10_000);

/// An allocator whose events go through the detector (on `clock`) into `downstream`.
fn layered(
    downstream: Arc<dyn EventSink>,
    params: Params,
) -> (Allocator, Arc<AnomalySink>, Arc<ManualClock>) {
    let clock = ManualClock::new();
    let detector = AnomalySink::new(params, Some(downstream), clock.clone());
    let sink: Arc<dyn EventSink> = detector.clone();
    let alloc = Allocator::new(HostBackend::new(), Config::default(), Some(sink));
    (alloc, detector, clock)
}

fn default_params() -> Params {
    Params::from_config(&AnomalyConfig::default())
}

/// `n` frees of a pointer the allocator never returned, under `tenant`'s context.
fn invalid_frees(alloc: &Allocator, tenant: &str, n: usize) {
    let ctx = Context::new(Some(tenant), Some("req-1"), Some("llama")).unwrap();
    let previous = Context::set_current(ctx);
    for i in 0..n {
        let ptr = 0xdead_0000 + 16 * i as u64;
        let r = alloc.free(ptr, 64, 0, StreamHandle(0));
        assert!(
            matches!(
                r,
                Err(FreeError::Invalid {
                    reason: InvalidFreeReason::UnknownPointer,
                    ..
                })
            ),
            "{r:?}"
        );
    }
    Context::set_current(previous);
}

/// The anomaly events of `events`, as (signal, rule, tenant, folded, count, threshold).
fn anomalies(
    events: &[Event],
) -> Vec<(AnomalySignal, AnomalyRule, Option<String>, bool, u64, u64)> {
    events
        .iter()
        .filter_map(|e| match e.kind {
            EventKind::Anomaly {
                signal,
                rule,
                folded,
                count,
                threshold,
                window_ms,
                ..
            } => {
                assert_eq!(window_ms, 10_000);
                let tenant = e.context.tenant_id().map(str::to_string);
                Some((signal, rule, tenant, folded, count, threshold))
            }
            _ => None,
        })
        .collect()
}

#[test]
fn an_invalid_free_storm_is_one_anomaly_a_window_for_its_tenant_only() {
    let mem = MemorySink::new();
    let (alloc, detector, clock) = layered(mem.clone(), default_params());
    let windows = 4;
    for w in 0..windows {
        invalid_frees(&alloc, "tenant-a", 100);
        // Another tenant's few refused frees stay below the threshold.
        invalid_frees(&alloc, "tenant-b", 10);
        let found = anomalies(&mem.snapshot());
        assert_eq!(found.len(), w + 1, "window {w}: {found:?}");
        clock.advance(WINDOW);
    }
    let found = anomalies(&mem.snapshot());
    let burst = (
        AnomalySignal::InvalidFree,
        AnomalyRule::Burst,
        Some("tenant-a".to_string()),
        false,
        16,
        16,
    );
    assert_eq!(
        found,
        vec![burst; windows],
        "one burst a window, for tenant-a"
    );
    // Every refused free reached the sink behind the layer, unchanged in number.
    assert_eq!(mem.count("invalid_free"), windows * 110);
    let stats = detector.stats();
    assert_eq!(stats.anomalies, Some(windows as u64));
    assert_eq!(stats.by_signal.unwrap()["invalid_free"], windows as u64);
    assert_eq!(detector.tracked(AnomalySignal::InvalidFree), 2);
    // The allocator's own counters are unaffected by the layer.
    assert_eq!(alloc.stats().counters.invalid_frees, windows as u64 * 110);
    // Each anomaly follows the refused free that tripped it: the sixteenth of its window.
    let events = mem.snapshot();
    let first = events
        .iter()
        .position(|e| e.kind.name() == "anomaly")
        .unwrap();
    assert_eq!(first, 16);
    assert_eq!(events[first].context, events[first - 1].context);
    assert_eq!(events[first].context.request_id(), Some("req-1"));
}

#[test]
fn the_window_is_what_rate_limits_a_storm() {
    let mem = MemorySink::new();
    let (alloc, _, clock) = layered(mem.clone(), default_params());
    invalid_frees(&alloc, "tenant-a", 16);
    // Half a window on, the storm goes on: still the one record.
    clock.advance(WINDOW / 2);
    invalid_frees(&alloc, "tenant-a", 200);
    assert_eq!(mem.count("anomaly"), 1);
    // A full window after the first record the next one may come.
    clock.advance(WINDOW / 2);
    invalid_frees(&alloc, "tenant-a", 1);
    assert_eq!(mem.count("anomaly"), 2);
}

/// Events of the detector's own log records and of a real log: written, sealed, verified by
/// `verify_all` and by `kvh verify-log`, and reported by `kvh evidence`.
#[test]
fn a_log_with_anomaly_records_verifies_and_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    let log = ForensicLog::open_with_secret(&cfg(&dir, 1 << 20), start(), Some(secret())).unwrap();
    // One tracked tenant per signal, so a second tenant folds into `*other*`.
    let params = Params {
        max_tenants: 1,
        ..default_params()
    };
    let (alloc, _, clock) = layered(log.clone(), params);
    invalid_frees(&alloc, "tenant-a", 16);
    invalid_frees(&alloc, "tenant-|b|", 16);
    // A surge: nine quiet windows of one refused free, then a storm (its burst and its surge
    // are rate-limited apart).
    for _ in 0..9 {
        clock.advance(WINDOW);
        invalid_frees(&alloc, "tenant-a", 1);
    }
    invalid_frees(&alloc, "tenant-a", 40);
    drop(alloc);
    log.stop();

    let report = verify(&dir, &keyed_opts());
    assert!(report.ok(), "{report:?}");
    let text = std::fs::read_to_string(&chain_files(&dir)[0]).unwrap();
    let records: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|r: &Value| r["kind"] == "anomaly")
        .collect();
    let summary: Vec<(&str, &str, &str, Value)> = records
        .iter()
        .map(|r| {
            (
                r["signal"].as_str().unwrap(),
                r["rule"].as_str().unwrap(),
                r["key"].as_str().unwrap(),
                r["tenant_id"].clone(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            ("invalid_free", "burst", "tenant", Value::from("tenant-a")),
            ("invalid_free", "burst", "*other*", Value::Null),
            // The first window's burst is in the baseline: the storm bursts first.
            ("invalid_free", "burst", "tenant", Value::from("tenant-a")),
            ("invalid_free", "surge", "tenant", Value::from("tenant-a")),
        ]
    );
    let burst = &records[0];
    assert_eq!(burst["count"], 16);
    assert_eq!(burst["threshold"], 16);
    assert_eq!(burst["window_ms"], 10_000);
    assert_eq!(burst["request_id"], "req-1");
    assert_eq!(burst["model_id"], "llama");
    assert!(burst["z_score"].is_null() && burst["baseline_mean"].is_null());
    assert!(burst["mac"].is_string(), "sealed like every record");
    let surge = &records[3];
    let threshold = surge["threshold"].as_u64().unwrap();
    assert!(
        threshold > 16,
        "above the baseline's mean and spread: {surge}"
    );
    assert_eq!(surge["count"].as_u64(), Some(threshold));
    assert_eq!(surge["z_threshold"], "4.000000");
    for field in ["baseline_mean", "baseline_stddev", "z_score"] {
        let text = surge[field]
            .as_str()
            .unwrap_or_else(|| panic!("{field}: {surge}"));
        assert!(text.parse::<f64>().is_ok(), "{field}: {text}");
    }
    assert!(
        records
            .iter()
            .all(|r| r.get("block_id").is_none() && r.get("addr").is_none()),
        "no block, no payload"
    );

    // `kvh verify-log` accepts it, with the key.
    let key_file = tmp.path().join("hmac.key");
    std::fs::write(&key_file, forensic_common::SECRET).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_kvh"))
        .args(["verify-log", dir.to_str().unwrap(), "--key-file"])
        .arg(&key_file)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // `kvh evidence` counts them by signal, lists each, and escapes what it quotes.
    let ev = evidence::collect(&evidence_args(&dir, &key_file)).unwrap();
    assert!(ev.integrity.verified);
    assert_eq!(ev.anomalies_by_signal.get("invalid_free"), Some(&4));
    assert_eq!(ev.exceptions_by_kind.get("anomaly"), Some(&4));
    let listed: Vec<_> = ev
        .exceptions
        .iter()
        .filter(|e| e.kind == "anomaly")
        .collect();
    assert_eq!(listed.len(), 4);
    assert!(
        listed[1].detail.contains("key=*other*"),
        "{}",
        listed[1].detail
    );
    let md = evidence::render(&ev);
    assert!(
        md.contains("Anomalies (`anomaly` records: a tenant's burst or surge of security events; each is listed under Exceptions): invalid_free 4."),
        "{md}"
    );
    assert!(
        md.contains("key=\\*other\\*"),
        "the star of *other* is escaped: {md}"
    );
}

fn evidence_args(dir: &Path, key_file: &Path) -> EvidenceArgs {
    EvidenceArgs::of(VerifyLogArgs {
        key_file: vec![key_file.to_path_buf()],
        ..VerifyLogArgs::of(dir.to_path_buf())
    })
}

/// The detector adds records but never holds events back: with it off the same calls give
/// the same events minus the anomalies.
#[test]
fn the_layer_only_adds_records() {
    let with = MemorySink::new();
    let (alloc, _, _) = layered(with.clone(), default_params());
    invalid_frees(&alloc, "tenant-a", 40);
    let without = MemorySink::new();
    let plain = Allocator::new(
        HostBackend::new(),
        Config::default(),
        Some(without.clone() as Arc<dyn EventSink>),
    );
    invalid_frees(&plain, "tenant-a", 40);
    let strip = |events: Vec<Event>| -> Vec<(String, Option<u64>)> {
        events
            .into_iter()
            .filter(|e| e.kind.name() != "anomaly")
            .map(|e| (e.kind.name().to_string(), e.addr))
            .collect()
    };
    assert_eq!(strip(with.snapshot()), strip(without.snapshot()));
    assert_eq!(with.count("anomaly"), 1);
}

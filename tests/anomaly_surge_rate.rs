//! The surge rule's rate limit: a rule that fired stays quiet for that key for a window
//! (`src/anomaly.rs`: "a storm is one record a window"; README: "at most one record per signal,
//! tenant and rule a window").

use std::time::{Duration, Instant};

use kvhygiene::anomaly::{Anomaly, Detector, Params};
use kvhygiene::config::AnomalyConfig;
use kvhygiene::context::Context;
use kvhygiene::events::{AnomalyRule, AnomalySignal};

const W: u64 = 10_000;

/// A detector with the default parameters (a window of `W` ms) starting at `origin`, and a
/// tenant's request.
fn detector() -> (Detector, Instant, Context) {
    let params = Params::from_config(&AnomalyConfig::default());
    assert_eq!(params.window_ms, W);
    let origin = Instant::now();
    let a = Context::new(Some("tenant-a"), Some("req-1"), None).unwrap();
    (Detector::new(params, origin), origin, a)
}

/// A few events straddling the boundary of two fixed windows are one storm: after a surge
/// record, the next surge record of the same key comes at least a window later.
#[test]
fn a_storm_across_a_window_boundary_is_one_surge_record() {
    let (mut d, origin, a) = detector();
    let at = |ms: u64| origin + Duration::from_millis(ms);
    let s = AnomalySignal::InvalidFree;
    let mut surges: Vec<(u64, Anomaly)> = Vec::new();
    let mut feed = |d: &mut Detector, ms: u64, n: u64| {
        for _ in 0..n {
            let mut out = Vec::new();
            d.observe(s, &a, at(ms), &mut out);
            surges.extend(
                out.into_iter()
                    .filter(|x| x.rule == AnomalyRule::Surge)
                    .map(|x| (ms, x)),
            );
        }
    };
    // One refused free, then twenty quiet windows: a baseline of (almost) nothing.
    feed(&mut d, 0, 1);
    // Twelve refused frees within two milliseconds, across the boundary of windows 20 and 21
    // (below the invalid_free burst threshold of 16).
    feed(&mut d, 21 * W - 1, 5);
    feed(&mut d, 21 * W + 1, 7);
    let times: Vec<u64> = surges.iter().map(|(ms, _)| *ms).collect();
    assert!(!surges.is_empty(), "the storm is a surge");
    for pair in times.windows(2) {
        assert!(
            pair[1] - pair[0] >= W,
            "two surge records of one key {} ms apart (window {W} ms): {surges:?}",
            pair[1] - pair[0]
        );
    }
}

/// A storm long ago does not hide a surge today: after a thousand quiet windows the baseline
/// (an exponentially weighted mean of every window, empty ones as zeros) is zero to within
/// 0.9^999, so twenty TTL breaches in one window (below the burst threshold of 32) are a
/// surge.
#[test]
fn a_storm_a_thousand_quiet_windows_ago_does_not_hide_a_surge() {
    let (mut d, origin, a) = detector();
    let at = |ms: u64| origin + Duration::from_millis(ms);
    let s = AnomalySignal::TtlExceeded;
    let mut out = Vec::new();
    // A storm in the tenant's first window.
    for _ in 0..10_000 {
        d.observe(s, &a, at(1), &mut out);
    }
    // A thousand windows without an event, then twenty breaches within a second.
    out.clear();
    for i in 0..20 {
        d.observe(s, &a, at(1_000 * W + i), &mut out);
    }
    let surges: Vec<&Anomaly> = out
        .iter()
        .filter(|x| x.rule == AnomalyRule::Surge)
        .collect();
    assert!(
        !surges.is_empty(),
        "20 events after 1000 empty windows are no surge: the baseline still remembers the \
         storm (records: {out:?})"
    );
}

/// The rate limit holds at the end of the detector's time range too: three residue readings
/// at the latest instant it counts are one burst record, not three.
#[test]
fn bursts_at_the_end_of_the_time_range_are_one_record_a_window() {
    let (mut d, origin, a) = detector();
    let late = origin + Duration::from_millis(u64::MAX);
    let mut out = Vec::new();
    for _ in 0..3 {
        d.observe(AnomalySignal::Residue, &a, late, &mut out);
    }
    let bursts = out.iter().filter(|x| x.rule == AnomalyRule::Burst).count();
    assert_eq!(bursts, 1, "{bursts} burst records in one window: {out:?}");
}

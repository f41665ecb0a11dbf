//! The surge rule's rate limit: a rule that fired stays quiet for that key for a window
//! (`src/anomaly.rs`: "a storm is one record a window"; README: "at most one record per signal,
//! tenant and rule a window").

use std::time::{Duration, Instant};

use kvhygiene::anomaly::{Anomaly, Detector, Params};
use kvhygiene::config::AnomalyConfig;
use kvhygiene::context::Context;
use kvhygiene::events::{AnomalyRule, AnomalySignal};

const W: u64 = 10_000;

/// A few events straddling the boundary of two fixed windows are one storm: after a surge
/// record, the next surge record of the same key comes at least a window later.
#[test]
fn a_storm_across_a_window_boundary_is_one_surge_record() {
    let params = Params::from_config(&AnomalyConfig::default());
    assert_eq!(params.window_ms, W);
    let origin = Instant::now();
    let at = |ms: u64| origin + Duration::from_millis(ms);
    let mut d = Detector::new(params, origin);
    let a = Context::new(Some("tenant-a"), Some("req-1"), None).unwrap();
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

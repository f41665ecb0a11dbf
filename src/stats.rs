//! Counters and latency histograms of the pool, and their JSON form (`kvh_stats_json`).
//!
//! Each device pool keeps its own [`PoolCounters`] under its lock (no atomics on the hot
//! path); [`Stats`] is the merged snapshot.

use hdrhistogram::Histogram;
use serde::Serialize;

/// Blocks and bytes in one state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Gauge {
    pub blocks: u64,
    pub bytes: u64,
}

impl Gauge {
    pub fn add(&mut self, bytes: u64) {
        self.blocks += 1;
        self.bytes += bytes;
    }

    pub fn sub(&mut self, bytes: u64) {
        self.blocks = self.blocks.saturating_sub(1);
        self.bytes = self.bytes.saturating_sub(bytes);
    }
}

/// Current blocks per state. `live + pending + clean + quarantined` is every block the pool
/// holds; released blocks belong to the backend again.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Accounting {
    pub live: Gauge,
    pub pending: Gauge,
    pub clean: Gauge,
    pub quarantined: Gauge,
}

impl Accounting {
    pub fn total(&self) -> Gauge {
        Gauge {
            blocks: self.live.blocks
                + self.pending.blocks
                + self.clean.blocks
                + self.quarantined.blocks,
            bytes: self.live.bytes + self.pending.bytes + self.clean.bytes + self.quarantined.bytes,
        }
    }

    fn merge(&mut self, o: &Accounting) {
        for (a, b) in [
            (&mut self.live, &o.live),
            (&mut self.pending, &o.pending),
            (&mut self.clean, &o.clean),
            (&mut self.quarantined, &o.quarantined),
        ] {
            a.blocks += b.blocks;
            a.bytes += b.bytes;
        }
    }
}

/// Declares [`Counters`] and its `merge` from one field list, so a new counter can never be
/// left out of the merge.
macro_rules! counters {
    ($($(#[doc = $doc:literal])* $field:ident,)*) => {
        /// Monotonic event counters.
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
        pub struct Counters {
            $($(#[doc = $doc])* pub $field: u64,)*
        }

        impl Counters {
            fn merge(&mut self, o: &Counters) {
                $(self.$field += o.$field;)*
            }
        }
    };
}

counters! {
    allocations,
    frees,
    pool_hits,
    pool_misses,
    fresh_allocations,
    bytes_allocated_fresh,
    scrub_batches,
    /// Block scrubs postponed (a stream capturing a CUDA graph, no memory for the batch's
    /// buffers), counted at each postponement: a batch postponed again counts again.
    scrubs_deferred,
    /// Block scrubs queued on the device (one the backend refused to queue is not one).
    scrubs,
    /// Bytes of the scrubs whose results came back.
    bytes_scrubbed,
    verifications_passed,
    verifications_failed,
    /// Verified scrubs that found non-zero samples: something wrote to the block after free.
    residue_detected,
    quarantined,
    /// Quarantined blocks whose re-scrub also failed: kept out of use for the process's life.
    rescrub_failed,
    released,
    invalid_frees,
    size_mismatches,
    /// Blocks exported for another process while handed out (`cudaIpcGetMemHandle`), each
    /// counted at its first export: their frees retire them instead of pooling them.
    ipc_exported_blocks,
    ttl_exceeded,
    /// Allocations, and KV scrub calls, that failed for lack of memory after every recovery
    /// step.
    out_of_memory,
    oom_recoveries,
    backend_errors,
    /// `kvh_scrub_blocks` calls accepted: those that reached the device (also those that
    /// stopped part way) and those a graph capture stopped before their launch (their
    /// `kv_scrub` record says why); then the blocks, segments and bytes they and the eviction
    /// gate's scrubs read back.
    kv_scrub_calls,
    kv_blocks_scrubbed,
    kv_segments_scrubbed,
    kv_bytes_scrubbed,
    /// Of `scrub_batches`, those that carried paged KV blocks (`kvh_scrub_blocks` and the
    /// eviction gate's scrubs); the rest carried freed blocks.
    kv_scrub_batches,
    /// KV blocks with a segment that failed verification or read residue.
    kv_blocks_failed,
    /// `kvh_scrub_blocks` calls the allocator refused (bad layout or ids, memory not live);
    /// not those the C boundary refuses before reaching it (a NULL, an over-limit count).
    kv_scrubs_refused,
    /// `kvh_claim_blocks` calls that were judged, and the KV blocks they handed over. A claim
    /// whose gate scrub stopped (the device failed: counted in `backend_errors` or
    /// `out_of_memory`; a graph capture; exit) is neither judged nor refused: its `kv_scrub`
    /// record says why, and its caller gets the error.
    kv_claim_calls,
    kv_blocks_claimed,
    /// KV blocks the eviction gate's scrubs verified clean inside claims, because they were
    /// changing owner, or their owner was unknown, without a verified scrub since. Counted
    /// per scrub, as it verifies: a block scrubbed again after its ledger was forgotten counts
    /// again, and a claim whose scrub stopped part way counts what verified (it handed that
    /// over), as its `kv_scrub` record does.
    kv_gate_scrubbed_blocks,
    /// Of those, blocks that changed owner without a verified scrub since their last owner,
    /// counted by the scrub that hands the block over, as the claim's report says
    /// (`KvClaimReport`). Not the others: blocks whose owner the gate did not know (a new
    /// cache's first claims, or a forgotten ledger's), blocks scrubbed only because a scrub
    /// of them was in flight, and blocks the scrub did not hand over (another claim took
    /// them, another scrub's failure landed first, their ledger was forgotten: a later pass
    /// of the claim counts them if it hands them over by a scrub) or that another claim of the
    /// claimant was handed meanwhile. So two claims racing for a block count it once. When an
    /// engine scrub of the block also lands in the middle of such a race, the count follows
    /// the order the verdicts land in (it may be 0 or 2 for one change of owner). An engine that scrubs on every free path keeps this
    /// at zero. After a forgotten ledger, a block another claim of the claimant was handed
    /// through the ledger there is now counts as that claim found it (unknown).
    kv_gate_owner_changed_blocks,
    /// `kvh_claim_blocks` calls refused: bad input, memory not live, or blocks that would
    /// change owner unscrubbed under `kv_gate = enforce`.
    kv_claims_refused,
}

/// One device pool's statistics.
#[derive(Clone, Debug)]
pub struct PoolCounters {
    pub counters: Counters,
    pub accounting: Accounting,
    /// Free → CLEAN latency, microseconds (scrub queueing + batching + scrub + harvest).
    pub scrub_latency_us: Histogram<u64>,
    /// The same latencies in the exported histogram's buckets: how many fell in each
    /// (`(previous bound, bound]`; beyond the last bound, in none), and their sum.
    pub scrub_latency_buckets: [u64; LATENCY_BUCKETS_US.len()],
    pub scrub_latency_sum_us: u64,
    /// The longest latency recorded, exactly (the HDR histogram's maximum is the top of its
    /// bucket, up to 0.1% above it, which the exported sum and buckets would contradict).
    pub scrub_latency_max_us: u64,
    /// How many latencies were at or beyond the HDR histogram's bound (recorded there as the
    /// bound): the quantiles that fall among them are reported as the maximum.
    pub scrub_latency_at_bound: u64,
}

/// Upper bounds of the free → CLEAN latency histogram's buckets, in microseconds: from half a
/// millisecond (a batch flushed at once) to 30 s (scrubs held back by a graph capture or an
/// out-of-memory retry). Exported as `kvh_free_to_clean_seconds` with these `le` labels
/// ([`LATENCY_BUCKET_LABELS`]), plus `+Inf`. Counted exactly here rather than read from
/// the HDR histogram, whose bucket edges are only exact to its resolution: a Prometheus
/// bucket must count exactly the values at or below its bound.
pub const LATENCY_BUCKETS_US: [u64; 15] = [
    500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000,
    2_500_000, 5_000_000, 10_000_000, 30_000_000,
];

/// [`LATENCY_BUCKETS_US`] in seconds, as the `le` labels spell them.
pub const LATENCY_BUCKET_LABELS: [&str; 15] = [
    "0.0005", "0.001", "0.0025", "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1",
    "2.5", "5", "10", "30",
];

impl PoolCounters {
    /// Records one free → CLEAN latency (of a block that became CLEAN: one quarantined or
    /// released after its scrub never becomes reusable). One beyond the histogram's bound (an
    /// hour: a scrub held back by a long graph capture, say) counts at the bound rather than
    /// not at all, so the count stays the number of blocks made CLEAN; the sum and the
    /// maximum stay exact, so the maximum shows the worst.
    pub fn record_scrub_latency(&mut self, us: u64) {
        let us = us.max(1);
        self.scrub_latency_us.saturating_record(us);
        let bucket = LATENCY_BUCKETS_US.partition_point(|&bound| bound < us);
        if let Some(n) = self.scrub_latency_buckets.get_mut(bucket) {
            *n += 1;
        }
        self.scrub_latency_sum_us = self.scrub_latency_sum_us.saturating_add(us);
        self.scrub_latency_max_us = self.scrub_latency_max_us.max(us);
        if us >= LATENCY_BOUND_US {
            self.scrub_latency_at_bound += 1;
        }
    }
}

/// The latency histogram's upper bound, 1 h: a longer latency is recorded in the histogram
/// as this (the sum and the maximum stay exact).
const LATENCY_BOUND_US: u64 = 3_600_000_000;

/// The quantile `q` of `latency`, no longer than `max_us`, the longest latency recorded, of
/// which `at_bound` were recorded at the histogram's bound (that long or longer). The HDR
/// quantiles are the tops of their buckets, up to 0.1% above any latency recorded: none is
/// reported above the longest one, nor above the bound when the quantile's rank is among
/// the latencies below it. A rank among those at the bound is reported as the longest
/// latency, which stands for them (the bound would understate every one of them).
fn quantile_us(latency: &Histogram<u64>, q: f64, max_us: u64, at_bound: u64) -> u64 {
    let total = latency.len();
    // The rank (1-based) of the quantile, as the histogram counts it.
    let rank = ((q * total as f64).ceil() as u64).max(1);
    if at_bound > 0 && rank > total.saturating_sub(at_bound) {
        return max_us;
    }
    latency
        .value_at_quantile(q)
        .min(LATENCY_BOUND_US)
        .min(max_us)
}

impl Default for PoolCounters {
    fn default() -> Self {
        PoolCounters {
            counters: Counters::default(),
            accounting: Accounting::default(),
            scrub_latency_us: new_histogram(),
            scrub_latency_buckets: [0; LATENCY_BUCKETS_US.len()],
            scrub_latency_sum_us: 0,
            scrub_latency_max_us: 0,
            scrub_latency_at_bound: 0,
        }
    }
}

fn new_histogram() -> Histogram<u64> {
    // 1 µs .. 1 h at 3 significant digits.
    Histogram::new_with_bounds(1, LATENCY_BOUND_US, 3).expect("constant histogram bounds are valid")
}

/// Latency percentiles in microseconds, and the exported histogram.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct LatencySummary {
    pub count: u64,
    pub p50_us: u64,
    pub p95_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
    /// Sum of the latencies counted.
    pub sum_us: u64,
    /// Cumulative counts at each bound of [`LATENCY_BUCKETS_US`]: the latencies at or below
    /// it. In the JSON, an object keyed by the bound in seconds (`"0.0005"` .. `"30"`).
    pub buckets: LatencyBuckets,
}

/// Cumulative bucket counts of a [`LatencySummary`].
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LatencyBuckets(pub [u64; LATENCY_BUCKETS_US.len()]);

impl LatencyBuckets {
    /// Cumulative counts from per-bucket ones.
    fn cumulative(per_bucket: &[u64; LATENCY_BUCKETS_US.len()]) -> Self {
        let mut out = [0; LATENCY_BUCKETS_US.len()];
        let mut total = 0u64;
        for (o, n) in out.iter_mut().zip(per_bucket) {
            total = total.saturating_add(*n);
            *o = total;
        }
        LatencyBuckets(out)
    }
}

impl Serialize for LatencyBuckets {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (label, n) in LATENCY_BUCKET_LABELS.iter().zip(&self.0) {
            map.serialize_entry(label, n)?;
        }
        map.end()
    }
}

/// A merged snapshot of every pool.
#[derive(Clone, Debug, Serialize)]
pub struct Stats {
    /// Whether shutdown (`kvh_shutdown`) or process exit began: no scrub or release runs any
    /// more, and the counters stop moving.
    pub shut_down: bool,
    pub version: &'static str,
    pub backend: String,
    pub counters: Counters,
    pub accounting: Accounting,
    pub scrub_latency: LatencySummary,
    /// Pool hits over allocations (0 when nothing was allocated).
    pub pool_hit_rate: f64,
    /// Human-readable description of the last asynchronous error, if any (sticky).
    pub last_async_error: Option<String>,
    /// Set by the embedding layer (e.g. the forensic log's statistics).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log: Option<serde_json::Value>,
    /// Set by the embedding layer: the anomaly detector's counters (`crate::anomaly`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub anomaly: Option<serde_json::Value>,
    /// Set by the embedding layer: the digest of the policy the process runs with, as its
    /// forensic log's `start` record carries it (`crate::forensic::config_digest`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub config_digest: Option<String>,
    /// Unix seconds at which the allocator started (set by it): a restart shows as a new
    /// value, while the counters start again from 0.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started_at: Option<f64>,
    /// The eviction gate's policy (set by the allocator), for an integration whose coverage
    /// depends on it: the vLLM worker refuses a tenant scope beside a KV connector.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kv_gate: Option<KvGatePolicy>,
}

/// `kv_gate` of the statistics: `{"mode": "off" | "scrub" | "enforce", "scope": "request" |
/// "tenant"}`, the policy's `kv_gate` and `kv_gate_scope`.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct KvGatePolicy {
    pub mode: crate::config::KvGateMode,
    pub scope: crate::config::KvGateScope,
}

impl Stats {
    /// Merges per-pool statistics.
    pub fn merge(
        backend: String,
        pools: &[PoolCounters],
        last_async_error: Option<String>,
    ) -> Stats {
        let mut counters = Counters::default();
        let mut accounting = Accounting::default();
        let mut latency = new_histogram();
        let mut per_bucket = [0u64; LATENCY_BUCKETS_US.len()];
        let mut sum_us = 0u64;
        let mut max_us = 0u64;
        let mut at_bound = 0u64;
        for p in pools {
            counters.merge(&p.counters);
            accounting.merge(&p.accounting);
            // Same bounds on both sides, so adding cannot fail.
            let _ = latency.add(&p.scrub_latency_us);
            for (total, n) in per_bucket.iter_mut().zip(&p.scrub_latency_buckets) {
                *total = total.saturating_add(*n);
            }
            sum_us = sum_us.saturating_add(p.scrub_latency_sum_us);
            max_us = max_us.max(p.scrub_latency_max_us);
            at_bound = at_bound.saturating_add(p.scrub_latency_at_bound);
        }
        let quantile = |q| quantile_us(&latency, q, max_us, at_bound);
        let pool_hit_rate = if counters.allocations == 0 {
            0.0
        } else {
            counters.pool_hits as f64 / counters.allocations as f64
        };
        Stats {
            shut_down: false,
            version: env!("CARGO_PKG_VERSION"),
            backend,
            counters,
            accounting,
            scrub_latency: LatencySummary {
                count: latency.len(),
                p50_us: quantile(0.50),
                p95_us: quantile(0.95),
                p99_us: quantile(0.99),
                max_us,
                sum_us,
                buckets: LatencyBuckets::cumulative(&per_bucket),
            },
            pool_hit_rate,
            last_async_error,
            log: None,
            anomaly: None,
            config_digest: None,
            started_at: None,
            kv_gate: None,
        }
    }

    pub fn to_json(&self) -> String {
        // Plain data with derived impls: serialisation cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// Unix seconds of `t`, to the millisecond (0 before 1970): the statistics' and the metrics'
/// timestamps.
pub fn unix_seconds(t: std::time::SystemTime) -> f64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_millis() as f64 / 1000.0)
}

#[cfg(test)]
mod latency_tests {
    use super::PoolCounters;

    #[test]
    fn a_latency_beyond_the_bound_is_counted_at_the_bound() {
        let mut p = PoolCounters::default();
        p.record_scrub_latency(0);
        p.record_scrub_latency(7_200_000_000);
        assert_eq!(p.scrub_latency_us.len(), 2);
        assert!(
            p.scrub_latency_us.max() >= 3_599_000_000,
            "{}",
            p.scrub_latency_us.max()
        );
        assert_eq!(p.scrub_latency_us.min(), 1);
        assert_eq!(
            p.scrub_latency_max_us, 7_200_000_000,
            "the maximum, exact beyond the histogram's bound"
        );
    }

    /// With every latency beyond the histogram's one-hour bound (two hours each), each
    /// quantile of them is that latency: the exported quantiles must not report one hour
    /// while the exported maximum (exact) reports two.
    #[test]
    fn quantiles_of_latencies_beyond_the_bound_are_not_below_them() {
        use super::Stats;
        let mut p = PoolCounters::default();
        for _ in 0..3 {
            p.record_scrub_latency(7_200_000_000);
        }
        let s = Stats::merge("host".into(), &[p], None);
        let l = s.scrub_latency;
        assert_eq!(l.max_us, 7_200_000_000);
        assert_eq!(
            (l.p50_us, l.p95_us, l.p99_us),
            (l.max_us, l.max_us, l.max_us),
            "every latency is {} us, yet the quantiles say otherwise",
            l.max_us
        );
    }

    /// Latencies just under the histogram's one-hour bound (3,599,000,000 us, a second
    /// short of it) are not latencies at the bound: their quantiles stay about one hour (within
    /// the histogram's 0.1% precision) when a single longer latency (two hours) sets the
    /// maximum. The median of nine latencies of 3,599 s and one of 7,200 s is 3,599 s, not
    /// 7,200 s.
    #[test]
    fn quantiles_of_latencies_under_the_bound_are_not_the_maximum_beyond_it() {
        use super::Stats;
        let mut p = PoolCounters::default();
        for _ in 0..9 {
            p.record_scrub_latency(3_599_000_000);
        }
        p.record_scrub_latency(7_200_000_000);
        let s = Stats::merge("host".into(), &[p], None);
        let l = s.scrub_latency;
        assert_eq!(l.max_us, 7_200_000_000);
        assert!(
            l.p50_us < 3_700_000_000,
            "nine of ten latencies are 3599000000 us, yet p50 = {} us",
            l.p50_us
        );
    }

    /// A bucket counts the latencies at or below its bound (`le`), cumulatively; a latency
    /// beyond the last bound is only in the total (`+Inf`); the sum is exact.
    #[test]
    fn buckets_count_at_or_below_their_bound_cumulatively() {
        use super::{Stats, LATENCY_BUCKETS_US};
        let mut p = PoolCounters::default();
        for us in [500, 501, 1_000, 30_000_000, 30_000_001] {
            p.record_scrub_latency(us);
        }
        let mut q = PoolCounters::default();
        q.record_scrub_latency(0); // counted as 1 µs
        let s = Stats::merge("host".into(), &[p, q], None);
        let b = s.scrub_latency.buckets.0;
        assert_eq!(b[0], 2, "0.0005 s: the 1 µs and the 500 µs latencies");
        assert_eq!(b[1], 4, "0.001 s: also 501 and 1000 µs");
        assert_eq!(b[LATENCY_BUCKETS_US.len() - 2], 4, "10 s");
        assert_eq!(
            b[LATENCY_BUCKETS_US.len() - 1],
            5,
            "30 s: not the one beyond"
        );
        assert_eq!(s.scrub_latency.count, 6);
        assert_eq!(
            s.scrub_latency.sum_us,
            1 + 500 + 501 + 1_000 + 30_000_000 + 30_000_001
        );
        let json: serde_json::Value = serde_json::from_str(&s.to_json()).unwrap();
        assert_eq!(json["scrub_latency"]["buckets"]["0.0005"], 2, "{json}");
        assert_eq!(json["scrub_latency"]["buckets"]["30"], 5, "{json}");
    }
}

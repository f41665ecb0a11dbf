//! The Prometheus text exposition (format 0.0.4) of a statistics snapshot.
//!
//! Written here rather than with the `prometheus-client` crate: that crate encodes OpenMetrics
//! 1.0 only (a counter's `# TYPE` line names the family without `_total` while its sample
//! carries the suffix, `# UNIT` lines, a closing `# EOF`, and an `info` type). Node-exporter's
//! textfile collector and Prometheus, when served `text/plain; version=0.0.4`, parse the
//! 0.0.4 format, in which such counters arrive untyped and `info` is refused outright. The
//! 0.0.4 format is small (`# HELP`, `# TYPE`, one sample a line, three escapes), and
//! [`super::parse`] reads it back in the tests, so this encoder is checked against the
//! grammar it claims.
//!
//! Nor with the `prometheus` crate, although its `TextEncoder` writes 0.0.4: it is built around
//! live instruments (`Counter`, `Gauge`, …) registered in a `Registry` and updated in place,
//! whereas the values here are a snapshot read from [`Stats`] when asked for. Exporting a
//! snapshot through it means either copying every field into instruments before each encode
//! (its counters only increase, so they would be gauges or a second set of counters to keep in
//! step) or a custom `Collector` that builds its `proto::MetricFamily` values by hand, which is
//! more code than this encoder and brings that crate's dependency tree (its metric model is the
//! rust-protobuf generated types) into a library loaded by every inference process.
//!
//! The metrics are derived from the JSON form of [`Stats`] (the `kvh_stats_json` document),
//! through the table [`SERIES`] that maps each numeric field to a metric. A numeric field the
//! table does not map is still exported under a name derived from its path (a counter under
//! `counters` as `kvh_<field>_total`, anything else untyped), so a new counter is never
//! missing from the metrics; the tests fail until the table gives it a proper name and help.

use std::fmt::Write as _;
use std::time::SystemTime;

use serde_json::Value;

use super::per_process::ProcessIdentity;
use crate::stats::Stats;

/// The `Content-Type` of the text this module writes.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Metric name of the snapshot time, Unix seconds: `kvh metrics --max-age` and
/// `kvh serve-metrics --max-age` judge staleness by it.
pub const SNAPSHOT_TIMESTAMP: &str = "kvh_snapshot_timestamp_seconds";

/// Metric name of the build information (`version`, `backend` labels; value 1).
pub const BUILD_INFO: &str = "kvh_build_info";

/// Metric name of a per-process file's writer identity (`boot_id` label; value: the start in
/// clock ticks since that boot), by which the readers tell the file from that of an ended
/// process whose id was reused.
pub const PROCESS_START_TICKS: &str = "kvh_process_start_ticks";

/// A metric family's type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    /// The samples `<family>_bucket{le=...}`, `<family>_sum` and `<family>_count`.
    Histogram,
    /// The samples `<family>{quantile=...}`, `<family>_sum` and `<family>_count`.
    Summary,
    Untyped,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
            Kind::Summary => "summary",
            Kind::Untyped => "untyped",
        }
    }

    /// The family a sample of this kind named `sample` belongs to.
    fn family_of(self, sample: &str) -> &str {
        super::parse::owned_suffixes(self.as_str())
            .iter()
            .find_map(|suffix| sample.strip_suffix(suffix))
            .unwrap_or(sample)
    }
}

/// How a JSON field becomes a sample value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Read {
    /// The number as it is (integers stay exact).
    Number,
    /// A number of microseconds, exported in seconds.
    MicrosToSeconds,
    /// A boolean: 1 or 0.
    Bool,
    /// 1 when the field is present and not null (a sticky error message), else 0.
    Present,
}

/// One sample of the exposition, read from one field of the stats JSON.
#[derive(Debug)]
pub struct Series {
    /// JSON pointer into the `kvh_stats_json` document.
    pub pointer: &'static str,
    pub name: &'static str,
    pub kind: Kind,
    pub help: &'static str,
    pub labels: &'static [(&'static str, &'static str)],
    read: Read,
}

macro_rules! series {
    ($pointer:expr, $name:literal, $kind:ident, $read:ident, $labels:expr, $help:expr) => {
        Series {
            pointer: $pointer,
            name: $name,
            kind: Kind::$kind,
            help: $help,
            labels: $labels,
            read: Read::$read,
        }
    };
}

const NONE: &[(&str, &str)] = &[];

const SCRUB_LATENCY_HELP: &str = "Free-to-clean latency quantiles since start (batching, \
     scrub, verification, harvest), NaN before the first; kvh_free_to_clean_seconds holds the \
     same latencies as a histogram, for recent quantiles.";

const FREE_TO_CLEAN_HELP: &str = "Free-to-clean latency of the freed blocks that became \
     reusable (batching, scrub, verification, harvest), as a histogram: rate() over a window \
     gives recent latencies.";

/// One bucket of the free → clean latency histogram; `$le` is one of
/// `stats::LATENCY_BUCKET_LABELS` (a test checks the table holds each once, in order).
macro_rules! latency_bucket {
    ($le:literal) => {
        series!(
            concat!("/scrub_latency/buckets/", $le),
            "kvh_free_to_clean_seconds_bucket",
            Histogram,
            Number,
            &[("le", $le)],
            FREE_TO_CLEAN_HELP
        )
    };
}

/// Every field of the stats JSON that becomes a metric, in exposition order. Samples of one
/// family share its name, kind and help.
pub const SERIES: &[Series] = &[
    // Counters (`Stats::counters`): monotonic over the life of the process.
    series!(
        "/counters/allocations",
        "kvh_allocations_total",
        Counter,
        Number,
        NONE,
        "Allocations served (pool hits and misses)."
    ),
    series!(
        "/counters/frees",
        "kvh_frees_total",
        Counter,
        Number,
        NONE,
        "Frees accepted (each block freed is scrubbed and verified)."
    ),
    series!(
        "/counters/pool_hits",
        "kvh_pool_hits_total",
        Counter,
        Number,
        NONE,
        "Allocations served from a clean, verified pooled block."
    ),
    series!(
        "/counters/pool_misses",
        "kvh_pool_misses_total",
        Counter,
        Number,
        NONE,
        "Allocations no pooled block could serve."
    ),
    series!(
        "/counters/fresh_allocations",
        "kvh_fresh_allocations_total",
        Counter,
        Number,
        NONE,
        "Blocks allocated from the backend (zeroed once before their first hand-out)."
    ),
    series!(
        "/counters/bytes_allocated_fresh",
        "kvh_fresh_allocated_bytes_total",
        Counter,
        Number,
        NONE,
        "Bytes allocated from the backend."
    ),
    series!(
        "/started_at",
        "kvh_process_start_time_seconds",
        Gauge,
        Number,
        NONE,
        "Unix time at which this process's allocator started: a new value is a restart, whose counters start again from 0 (the alerting rules tell by it a restart hidden in a gap of the scrapes)."
    ),
    series!(
        "/counters/scrub_batches",
        "kvh_scrub_batches_total",
        Counter,
        Number,
        NONE,
        "Scrub batches submitted (one launch each on a GPU), of freed blocks and of paged KV blocks (those in kvh_kv_scrub_batches_total)."
    ),
    series!(
        "/counters/scrubs_deferred",
        "kvh_scrubs_deferred_total",
        Counter,
        Number,
        NONE,
        "Block scrubs postponed (a stream capturing a CUDA graph, or no memory for the batch's buffers), counted at each postponement; retried later."
    ),
    series!(
        "/counters/scrubs",
        "kvh_scrubs_total",
        Counter,
        Number,
        NONE,
        "Block scrubs (zeroing and verification) queued on the device."
    ),
    series!(
        "/counters/bytes_scrubbed",
        "kvh_scrubbed_bytes_total",
        Counter,
        Number,
        NONE,
        "Bytes zeroed by scrubs whose results came back."
    ),
    series!(
        "/counters/verifications_passed",
        "kvh_verifications_total",
        Counter,
        Number,
        &[("result", "passed")],
        "Scrub verifications by result; a failed one quarantines the block."
    ),
    series!(
        "/counters/verifications_failed",
        "kvh_verifications_total",
        Counter,
        Number,
        &[("result", "failed")],
        "Scrub verifications by result; a failed one quarantines the block."
    ),
    series!(
        "/counters/residue_detected",
        "kvh_residue_detected_total",
        Counter,
        Number,
        NONE,
        "Scrubs that read non-zero samples after zeroing, whether their verification passed or not: something wrote to a block after its free, or the zeroing did not reach it."
    ),
    series!(
        "/counters/quarantined",
        "kvh_quarantined_blocks_total",
        Counter,
        Number,
        NONE,
        "Blocks moved to quarantine (failed verification, residue or policy)."
    ),
    series!(
        "/counters/rescrub_failed",
        "kvh_rescrub_failures_total",
        Counter,
        Number,
        NONE,
        "Quarantined blocks whose re-scrub failed too: kept out of use for the process's life."
    ),
    series!(
        "/counters/released",
        "kvh_released_blocks_total",
        Counter,
        Number,
        NONE,
        "Blocks given back to the backend (idle, reuse limit, emptied cache, re-scrubbed quarantine); one the driver failed to take is not (it counts in kvh_backend_errors_total, and its release record says leaked)."
    ),
    series!(
        "/counters/invalid_frees",
        "kvh_invalid_frees_total",
        Counter,
        Number,
        NONE,
        "Frees of unknown, interior or already freed pointers (refused and logged)."
    ),
    series!(
        "/counters/size_mismatches",
        "kvh_size_mismatches_total",
        Counter,
        Number,
        NONE,
        "Frees whose size differed from the block's recorded size."
    ),
    series!(
        "/counters/ipc_exported_blocks",
        "kvh_ipc_exported_blocks_total",
        Counter,
        Number,
        NONE,
        "Blocks exported for another process (cudaIpcGetMemHandle) while handed out; their frees return them to the driver once verified, never to the pool."
    ),
    series!(
        "/counters/ttl_exceeded",
        "kvh_ttl_exceeded_total",
        Counter,
        Number,
        NONE,
        "Blocks found live longer than KVH_LIVE_TTL_MS (while live, or at their free)."
    ),
    series!(
        "/counters/out_of_memory",
        "kvh_out_of_memory_total",
        Counter,
        Number,
        NONE,
        "Allocations, and kvh_scrub_blocks / kvh_claim_blocks calls, that failed for lack of memory after every recovery step."
    ),
    series!(
        "/counters/oom_recoveries",
        "kvh_oom_recoveries_total",
        Counter,
        Number,
        NONE,
        "Out-of-memory situations resolved by flushing scrubs or releasing cached blocks."
    ),
    series!(
        "/counters/backend_errors",
        "kvh_backend_errors_total",
        Counter,
        Number,
        NONE,
        "Errors reported by the memory backend (driver); not a shortage of memory (kvh_out_of_memory_total, kvh_scrubs_deferred_total) or a graph capture's refusal."
    ),
    // Paged KV cache scrubs (`kvh_scrub_blocks`, and the eviction gate's inside claims).
    series!(
        "/counters/kv_scrub_calls",
        "kvh_kv_scrub_calls_total",
        Counter,
        Number,
        NONE,
        "kvh_scrub_blocks calls accepted: those that scrubbed (also part way) and those a CUDA graph capture stopped before their launch (their log record says why); calls refused for their input are counted apart."
    ),
    series!(
        "/counters/kv_scrub_batches",
        "kvh_kv_scrub_batches_total",
        Counter,
        Number,
        NONE,
        "Scrub batches that carried paged KV blocks, for kvh_scrub_blocks and the eviction gate; included in kvh_scrub_batches_total."
    ),
    series!(
        "/counters/kv_blocks_scrubbed",
        "kvh_kv_scrubbed_blocks_total",
        Counter,
        Number,
        NONE,
        "Paged KV cache blocks zeroed and read back, by kvh_scrub_blocks and by the eviction gate; those that failed are in kvh_kv_failed_blocks_total too."
    ),
    series!(
        "/counters/kv_segments_scrubbed",
        "kvh_kv_scrubbed_segments_total",
        Counter,
        Number,
        NONE,
        "Memory segments (one per block and layout region) scrubbed and read back, by kvh_scrub_blocks and by the eviction gate."
    ),
    series!(
        "/counters/kv_bytes_scrubbed",
        "kvh_kv_scrubbed_bytes_total",
        Counter,
        Number,
        NONE,
        "Bytes of the KV segments scrubbed and read back, by kvh_scrub_blocks and by the eviction gate."
    ),
    series!(
        "/counters/kv_blocks_failed",
        "kvh_kv_failed_blocks_total",
        Counter,
        Number,
        NONE,
        "Paged KV cache blocks whose scrub failed verification or read residue."
    ),
    series!(
        "/counters/kv_scrubs_refused",
        "kvh_kv_scrubs_refused_total",
        Counter,
        Number,
        NONE,
        "kvh_scrub_blocks calls the allocator refused (bad layout or block ids, memory not live; not those refused at the C boundary for a NULL or an over-limit count)."
    ),
    // The KV eviction gate (`kvh_claim_blocks`).
    series!(
        "/counters/kv_claim_calls",
        "kvh_kv_claim_calls_total",
        Counter,
        Number,
        NONE,
        "kvh_claim_blocks calls judged by the eviction gate (refused ones are counted apart; one whose gate scrub stopped on a device error, a graph capture or exit is in neither)."
    ),
    series!(
        "/counters/kv_blocks_claimed",
        "kvh_kv_claimed_blocks_total",
        Counter,
        Number,
        NONE,
        "Paged KV cache blocks handed to a request through kvh_claim_blocks by the eviction gate (not counted with KVH_KV_GATE=off, which judges no claim)."
    ),
    series!(
        "/counters/kv_gate_scrubbed_blocks",
        "kvh_kv_gate_scrubbed_blocks_total",
        Counter,
        Number,
        NONE,
        "KV blocks the eviction gate's scrubs verified clean inside claims, because they changed owner unscrubbed or their owner was unknown to it."
    ),
    series!(
        "/counters/kv_gate_owner_changed_blocks",
        "kvh_kv_gate_owner_changed_blocks_total",
        Counter,
        Number,
        NONE,
        "Of the gate's scrubbed KV blocks, those that changed owner without a verified scrub (not a new cache's first claims): the engine skipped kvh_scrub_blocks."
    ),
    series!(
        "/counters/kv_claims_refused",
        "kvh_kv_claims_refused_total",
        Counter,
        Number,
        NONE,
        "kvh_claim_blocks calls refused (bad input, memory not live, or enforce), and refusals the engine recorded (kvh_refuse_blocks)."
    ),
    // Accounting (`Stats::accounting`): what the pool holds now.
    series!(
        "/accounting/live/blocks",
        "kvh_pool_blocks",
        Gauge,
        Number,
        &[("state", "live")],
        "Blocks the pool holds, by state."
    ),
    series!(
        "/accounting/pending/blocks",
        "kvh_pool_blocks",
        Gauge,
        Number,
        &[("state", "pending")],
        "Blocks the pool holds, by state."
    ),
    series!(
        "/accounting/clean/blocks",
        "kvh_pool_blocks",
        Gauge,
        Number,
        &[("state", "clean")],
        "Blocks the pool holds, by state."
    ),
    series!(
        "/accounting/quarantined/blocks",
        "kvh_pool_blocks",
        Gauge,
        Number,
        &[("state", "quarantined")],
        "Blocks the pool holds, by state."
    ),
    series!(
        "/accounting/live/bytes",
        "kvh_pool_bytes",
        Gauge,
        Number,
        &[("state", "live")],
        "Bytes of the blocks the pool holds, by state."
    ),
    series!(
        "/accounting/pending/bytes",
        "kvh_pool_bytes",
        Gauge,
        Number,
        &[("state", "pending")],
        "Bytes of the blocks the pool holds, by state."
    ),
    series!(
        "/accounting/clean/bytes",
        "kvh_pool_bytes",
        Gauge,
        Number,
        &[("state", "clean")],
        "Bytes of the blocks the pool holds, by state."
    ),
    series!(
        "/accounting/quarantined/bytes",
        "kvh_pool_bytes",
        Gauge,
        Number,
        &[("state", "quarantined")],
        "Bytes of the blocks the pool holds, by state."
    ),
    // Free → clean latency (`Stats::scrub_latency`), over the life of the process.
    series!(
        "/scrub_latency/count",
        "kvh_scrub_latency_observations_total",
        Counter,
        Number,
        NONE,
        "Blocks whose free-to-clean latency was measured."
    ),
    series!(
        "/scrub_latency/p50_us",
        "kvh_scrub_latency_seconds",
        Summary,
        MicrosToSeconds,
        &[("quantile", "0.5")],
        SCRUB_LATENCY_HELP
    ),
    series!(
        "/scrub_latency/p95_us",
        "kvh_scrub_latency_seconds",
        Summary,
        MicrosToSeconds,
        &[("quantile", "0.95")],
        SCRUB_LATENCY_HELP
    ),
    series!(
        "/scrub_latency/p99_us",
        "kvh_scrub_latency_seconds",
        Summary,
        MicrosToSeconds,
        &[("quantile", "0.99")],
        SCRUB_LATENCY_HELP
    ),
    series!(
        "/scrub_latency/sum_us",
        "kvh_scrub_latency_seconds_sum",
        Summary,
        MicrosToSeconds,
        NONE,
        SCRUB_LATENCY_HELP
    ),
    series!(
        "/scrub_latency/count",
        "kvh_scrub_latency_seconds_count",
        Summary,
        Number,
        NONE,
        SCRUB_LATENCY_HELP
    ),
    series!(
        "/scrub_latency/max_us",
        "kvh_scrub_latency_max_seconds",
        Gauge,
        MicrosToSeconds,
        NONE,
        "Longest free-to-clean latency since start."
    ),
    // The same latencies as a histogram (`stats::LATENCY_BUCKETS_US`): rates over a window
    // (`histogram_quantile` of `rate(..._bucket[10m])`) and sums across processes, which the
    // quantiles since start above cannot give.
    latency_bucket!("0.0005"),
    latency_bucket!("0.001"),
    latency_bucket!("0.0025"),
    latency_bucket!("0.005"),
    latency_bucket!("0.01"),
    latency_bucket!("0.025"),
    latency_bucket!("0.05"),
    latency_bucket!("0.1"),
    latency_bucket!("0.25"),
    latency_bucket!("0.5"),
    latency_bucket!("1"),
    latency_bucket!("2.5"),
    latency_bucket!("5"),
    latency_bucket!("10"),
    latency_bucket!("30"),
    series!(
        "/scrub_latency/count",
        "kvh_free_to_clean_seconds_bucket",
        Histogram,
        Number,
        &[("le", "+Inf")],
        FREE_TO_CLEAN_HELP
    ),
    series!(
        "/scrub_latency/sum_us",
        "kvh_free_to_clean_seconds_sum",
        Histogram,
        MicrosToSeconds,
        NONE,
        FREE_TO_CLEAN_HELP
    ),
    series!(
        "/scrub_latency/count",
        "kvh_free_to_clean_seconds_count",
        Histogram,
        Number,
        NONE,
        FREE_TO_CLEAN_HELP
    ),
    series!(
        "/pool_hit_rate",
        "kvh_pool_hit_ratio",
        Gauge,
        Number,
        NONE,
        "Pool hits over allocations since start (0 before the first allocation)."
    ),
    series!(
        "/last_async_error",
        "kvh_async_error",
        Gauge,
        Present,
        NONE,
        "1 once an asynchronous backend error occurred (sticky; the message is in the stats JSON)."
    ),
    // The forensic log (`LogStats`, merged into the stats JSON as `log`).
    series!(
        "/shut_down",
        "kvh_shut_down",
        Gauge,
        Bool,
        NONE,
        "1 once shutdown (kvh_shutdown) or process exit began: no scrub or release runs any more."
    ),
    series!(
        "/log/enabled",
        "kvh_log_enabled",
        Gauge,
        Bool,
        NONE,
        "1 when the forensic log is on (KVH_LOG_DIR set)."
    ),
    series!(
        "/log/records_written",
        "kvh_log_records_written_total",
        Counter,
        Number,
        NONE,
        "Forensic log records written to disk."
    ),
    series!(
        "/log/producer_waits",
        "kvh_log_producer_waits_total",
        Counter,
        Number,
        NONE,
        "Times an event waited for room in the full log queue (security events are never dropped)."
    ),
    series!(
        "/log/summaries_coalesced",
        "kvh_log_summaries_coalesced_total",
        Counter,
        Number,
        NONE,
        "Summary records replaced by a newer one before they were written."
    ),
    series!(
        "/log/write_errors",
        "kvh_log_write_errors_total",
        Counter,
        Number,
        NONE,
        "Failed writes to the forensic log."
    ),
    series!(
        "/log/records_lost",
        "kvh_log_records_lost_total",
        Counter,
        Number,
        NONE,
        "Forensic log records that could not be written (disk errors), came after stop, were still queued when the writer ended, or were held by a writer thread that panicked."
    ),
    series!(
        "/log/bytes_lost",
        "kvh_log_lost_bytes_total",
        Counter,
        Number,
        NONE,
        "Bytes of forensic log records that could not be written."
    ),
    series!(
        "/log/free_bytes",
        "kvh_log_free_bytes",
        Gauge,
        Number,
        NONE,
        "Bytes any writer may still write on the forensic log directory's file system (a root process may also fill ext4's reserve for root, not counted), measured by the log writer about every second (absent where the file system states no size)."
    ),
    // The anomaly detector (`AnomalyStats`, merged into the stats JSON as `anomaly`). With
    // the detector off only `kvh_anomaly_enabled 0` is exported: absent series mean "not
    // watched", zero means "watched, nothing found".
    series!(
        "/anomaly/enabled",
        "kvh_anomaly_enabled",
        Gauge,
        Bool,
        NONE,
        "1 when the anomaly detector is on (KVH_ANOMALY)."
    ),
    series!(
        "/anomaly/by_signal/invalid_free",
        "kvh_anomalies_total",
        Counter,
        Number,
        &[("signal", "invalid_free")],
        "Anomaly records by signal: a tenant's burst or surge of that kind of security event."
    ),
    series!(
        "/anomaly/by_signal/size_mismatch",
        "kvh_anomalies_total",
        Counter,
        Number,
        &[("signal", "size_mismatch")],
        "Anomaly records by signal: a tenant's burst or surge of that kind of security event."
    ),
    series!(
        "/anomaly/by_signal/verify_failed",
        "kvh_anomalies_total",
        Counter,
        Number,
        &[("signal", "verify_failed")],
        "Anomaly records by signal: a tenant's burst or surge of that kind of security event."
    ),
    series!(
        "/anomaly/by_signal/residue",
        "kvh_anomalies_total",
        Counter,
        Number,
        &[("signal", "residue")],
        "Anomaly records by signal: a tenant's burst or surge of that kind of security event."
    ),
    series!(
        "/anomaly/by_signal/quarantine",
        "kvh_anomalies_total",
        Counter,
        Number,
        &[("signal", "quarantine")],
        "Anomaly records by signal: a tenant's burst or surge of that kind of security event."
    ),
    series!(
        "/anomaly/by_signal/ttl_exceeded",
        "kvh_anomalies_total",
        Counter,
        Number,
        &[("signal", "ttl_exceeded")],
        "Anomaly records by signal: a tenant's burst or surge of that kind of security event."
    ),
    series!(
        "/anomaly/by_signal/policy_violation",
        "kvh_anomalies_total",
        Counter,
        Number,
        &[("signal", "policy_violation")],
        "Anomaly records by signal: a tenant's burst or surge of that kind of security event."
    ),
    series!(
        "/anomaly/anomalies",
        "kvh_anomaly_records_total",
        Counter,
        Number,
        NONE,
        "Anomaly records emitted, all signals (the sum of kvh_anomalies_total)."
    ),
    series!(
        "/anomaly/folded_events",
        "kvh_anomaly_folded_events_total",
        Counter,
        Number,
        NONE,
        "Counts made under the detector's shared *other* key, one per signal an event counts for (a failed verification that read residue counts for two): the signal already tracked its most tenants."
    ),
];

/// Counters of the exporters themselves.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExporterStats {
    /// Failed writes of the metrics file.
    pub textfile_errors: u64,
    /// HTTP requests refused: too slow (408, or closed when a new connection took the slot of
    /// one without a whole request a second after connecting, or of one whose client read none
    /// of its response for a second), too large (431),
    /// malformed (400), or
    /// over the connection limit (503, or closed unanswered beyond twice the limit).
    pub http_rejected: u64,
}

/// A metric family being assembled.
struct Family {
    name: String,
    kind: Kind,
    help: String,
    samples: Vec<String>,
}

#[derive(Default)]
struct Families {
    list: Vec<Family>,
    /// Labels put first on every sample (the `pid` of a per-process metrics file).
    common: Vec<(String, String)>,
}

impl Families {
    fn family(&mut self, sample: &str, kind: Kind, help: &str) -> &mut Family {
        let name = kind.family_of(sample);
        let i = match self.list.iter().position(|f| f.name == name) {
            Some(i) => i,
            None => {
                self.list.push(Family {
                    name: name.to_string(),
                    kind,
                    help: help.to_string(),
                    samples: Vec::new(),
                });
                self.list.len() - 1
            }
        };
        &mut self.list[i]
    }

    fn add(&mut self, name: &str, kind: Kind, help: &str, labels: &[(&str, &str)], v: String) {
        let mut all: Vec<(&str, &str)> = self
            .common
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        all.extend_from_slice(labels);
        let sample = format!("{name}{} {v}", label_set(&all));
        self.family(name, kind, help).samples.push(sample);
    }

    fn render(&self) -> String {
        let mut out = String::new();
        for f in &self.list {
            // Writing to a String cannot fail.
            let _ = writeln!(out, "# HELP {} {}", f.name, escape_help(&f.help));
            let _ = writeln!(out, "# TYPE {} {}", f.name, f.kind.as_str());
            for s in &f.samples {
                out.push_str(s);
                out.push('\n');
            }
        }
        out
    }
}

/// The exposition of `stats` (whose `log` field the embedding layer has set) taken at `at`.
pub fn encode(stats: &Stats, exporter: &ExporterStats, at: SystemTime) -> String {
    encode_labelled(stats, exporter, at, &[])
}

/// [`encode`] with `common` labels first on every sample: `pid` when each process of an
/// engine writes its own file (`KVH_METRICS_FILE` with `{pid}`), so that a collector reading
/// all the files sees no series twice.
pub fn encode_labelled(
    stats: &Stats,
    exporter: &ExporterStats,
    at: SystemTime,
    common: &[(&str, &str)],
) -> String {
    // Plain data with derived impls: serialisation cannot fail.
    let doc = serde_json::to_value(stats).unwrap_or(Value::Null);
    encode_document_labelled(&doc, exporter, at, common, None).0
}

/// The exposition of a per-process metrics file (`KVH_METRICS_FILE` with `{pid}`): [`encode`]
/// with a `pid` label on every sample and, when known, the writer's `identity`
/// (`kvh_process_start_ticks`).
pub fn encode_process(
    stats: &Stats,
    exporter: &ExporterStats,
    at: SystemTime,
    pid: &str,
    identity: Option<&ProcessIdentity>,
) -> String {
    // Plain data with derived impls: serialisation cannot fail.
    let doc = serde_json::to_value(stats).unwrap_or(Value::Null);
    encode_document_labelled(&doc, exporter, at, &[("pid", pid)], identity).0
}

/// [`encode`] from the stats JSON document; also returns the pointers of the numeric fields
/// that [`SERIES`] does not map (exported under derived names).
pub fn encode_document(
    doc: &Value,
    exporter: &ExporterStats,
    at: SystemTime,
) -> (String, Vec<String>) {
    encode_document_labelled(doc, exporter, at, &[], None)
}

fn encode_document_labelled(
    doc: &Value,
    exporter: &ExporterStats,
    at: SystemTime,
    common: &[(&str, &str)],
    identity: Option<&ProcessIdentity>,
) -> (String, Vec<String>) {
    let mut fams = Families {
        list: Vec::new(),
        common: common
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    };
    let version = doc.get("version").and_then(Value::as_str).unwrap_or("");
    let backend = doc.get("backend").and_then(Value::as_str).unwrap_or("");
    let mut info = vec![("version", version), ("backend", backend)];
    // Processes of one deployment that report different digests run different policies.
    if let Some(digest) = doc.get("config_digest").and_then(Value::as_str) {
        info.push(("config_digest", digest));
    }
    fams.add(
        BUILD_INFO,
        Kind::Gauge,
        "kvhygiene version, memory backend and policy digest (config_digest, as the forensic \
         log's start record carries it) of this process (value 1).",
        &info,
        "1".into(),
    );
    let secs = crate::stats::unix_seconds(at);
    fams.add(
        SNAPSHOT_TIMESTAMP,
        Kind::Gauge,
        "Unix time at which these values were read.",
        NONE,
        format_f64(secs),
    );
    if let Some(id) = identity {
        fams.add(
            PROCESS_START_TICKS,
            Kind::Gauge,
            "Start of the process that writes this file, in clock ticks since the boot named \
             by boot_id (field 22 of /proc/PID/stat): tells its file from that of an ended \
             process whose id was reused.",
            &[("boot_id", &id.boot_id)],
            id.start_ticks.to_string(),
        );
    }
    for s in SERIES {
        let v = doc.pointer(s.pointer);
        let value = match (s.read, v) {
            (Read::Present, v) => u64::from(v.is_some_and(|v| !v.is_null())).to_string(),
            (_, None) => continue,
            (Read::Bool, Some(v)) => u64::from(v.as_bool().unwrap_or(false)).to_string(),
            (Read::Number, Some(v)) => match number(v) {
                Some(n) => n,
                None => continue,
            },
            (Read::MicrosToSeconds, Some(_)) if quantile_without_observations(s, doc) => {
                format_f64(f64::NAN)
            }
            (Read::MicrosToSeconds, Some(v)) => match v.as_f64() {
                Some(us) => format_f64(us / 1e6),
                None => continue,
            },
        };
        fams.add(s.name, s.kind, s.help, s.labels, value);
    }
    let mut unmapped = Vec::new();
    for (pointer, v) in numeric_fields(doc) {
        if SERIES.iter().any(|s| s.pointer == pointer) {
            continue;
        }
        let Some(value) = number(v).or_else(|| v.as_bool().map(|b| u64::from(b).to_string()))
        else {
            continue;
        };
        let parts: Vec<&str> = pointer.trim_start_matches('/').split('/').collect();
        let (name, kind) = match parts.as_slice() {
            ["counters", field] => (format!("kvh_{}_total", sanitize(field)), Kind::Counter),
            _ => (format!("kvh_{}", sanitize(&parts.join("_"))), Kind::Untyped),
        };
        let help = format!("Stats field {pointer} (not yet described).");
        fams.add(&name, kind, &help, NONE, value);
        unmapped.push(pointer);
    }
    fams.add(
        "kvh_metrics_textfile_errors_total",
        Kind::Counter,
        "Failed writes of the metrics file (KVH_METRICS_FILE).",
        NONE,
        exporter.textfile_errors.to_string(),
    );
    fams.add(
        "kvh_metrics_http_rejected_total",
        Kind::Counter,
        "HTTP exporter requests refused: too slow (408, or closed when a new connection took the slot of one without a whole request a second after connecting, or of one whose client read none of its response for a second), too large (431), malformed (400) or over the connection limit (503, or closed unanswered beyond twice the limit).",
        NONE,
        exporter.http_rejected.to_string(),
    );
    (fams.render(), unmapped)
}

/// Whether `s` is a summary's quantile whose summary has observed nothing yet (its sibling
/// `count` is 0). Such a quantile is exported as NaN, as Prometheus clients write it: the 0 the
/// JSON holds would read as a measured latency of zero on a dashboard.
fn quantile_without_observations(s: &Series, doc: &Value) -> bool {
    if s.kind != Kind::Summary || !s.labels.iter().any(|(k, _)| *k == "quantile") {
        return false;
    }
    let Some((parent, _)) = s.pointer.rsplit_once('/') else {
        return false;
    };
    doc.pointer(&format!("{parent}/count"))
        .and_then(Value::as_u64)
        == Some(0)
}

/// Every numeric or boolean leaf of `doc`, as (JSON pointer, value).
pub fn numeric_fields(doc: &Value) -> Vec<(String, &Value)> {
    fn walk<'a>(v: &'a Value, at: String, out: &mut Vec<(String, &'a Value)>) {
        match v {
            Value::Object(m) => {
                for (k, v) in m {
                    walk(v, format!("{at}/{k}"), out);
                }
            }
            Value::Number(_) | Value::Bool(_) => out.push((at, v)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(doc, String::new(), &mut out);
    out
}

/// A JSON number as a sample value; integers stay exact.
fn number(v: &Value) -> Option<String> {
    if let Some(u) = v.as_u64() {
        Some(u.to_string())
    } else if let Some(i) = v.as_i64() {
        Some(i.to_string())
    } else {
        v.as_f64().map(format_f64)
    }
}

/// A float in the format's spelling (`NaN`, `+Inf`, `-Inf`, else decimal).
pub fn format_f64(x: f64) -> String {
    if x.is_nan() {
        "NaN".into()
    } else if x.is_infinite() {
        if x > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        format!("{x}")
    }
}

fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

fn label_set(labels: &[(&str, &str)]) -> String {
    if labels.is_empty() {
        return String::new();
    }
    let inner: Vec<String> = labels
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", escape_label(v)))
        .collect();
    format!("{{{}}}", inner.join(","))
}

/// Label values escape backslash, double quote and newline.
fn escape_label(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// Help text escapes backslash and newline.
fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::anomaly;
    use crate::config::AnomalyConfig;
    use crate::forensic::LogStats;
    use crate::metrics::parse::parse;
    use crate::stats::{PoolCounters, Stats};
    use std::time::{Duration, UNIX_EPOCH};

    /// The `kvh_stats_json` document of a runtime with a forensic log, as the exporters
    /// see it.
    fn stats_document() -> Value {
        let mut stats = Stats::merge("host".into(), &[PoolCounters::default()], None);
        stats.log = serde_json::to_value(LogStats {
            enabled: true,
            // Absent where the file system states no size: present here, as it mostly is.
            free_bytes: Some(1 << 30),
            ..LogStats::default()
        })
        .ok();
        stats.anomaly = anomaly::layer(&AnomalyConfig::default(), None).stats_json();
        // As the allocator sets it.
        stats.started_at = Some(1_699_999_000.5);
        serde_json::to_value(&stats).unwrap()
    }

    fn at() -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(1_700_000_000_250)
    }

    /// Every numeric field of the stats JSON gets its own distinct value; every one must come
    /// out under the metric the table gives it, with that value. A counter added to `Stats`
    /// without a row in `SERIES` fails here, by name.
    #[test]
    fn every_numeric_stats_field_has_a_metric_with_its_value() {
        let mut doc = stats_document();
        let pointers: Vec<String> = numeric_fields(&doc).into_iter().map(|(p, _)| p).collect();
        assert!(pointers.len() > 40, "{pointers:?}");
        let mut expected = Vec::new();
        for (i, p) in pointers.iter().enumerate() {
            let slot = doc.pointer_mut(p).unwrap();
            *slot = match slot {
                Value::Bool(_) => Value::Bool(true),
                Value::Number(n) if n.is_f64() => Value::from(i as f64 + 0.25),
                _ => Value::from(1_000_000 + i as u64),
            };
            expected.push((p.clone(), slot.clone()));
        }
        // The presence-style field is not numeric: set it too.
        doc["last_async_error"] = Value::from("driver reported an error");
        let (text, unmapped) = encode_document(&doc, &ExporterStats::default(), at());
        assert!(
            unmapped.is_empty(),
            "stats fields without a row in metrics::encode::SERIES: {unmapped:?}"
        );
        let e = parse(&text).unwrap();
        // Every row of a field, not only the first: several read the same one (a summary's
        // count is also its histogram's `_count` and `+Inf` bucket).
        for (pointer, v) in expected {
            for s in SERIES.iter().filter(|s| s.pointer == pointer) {
                let want = match (s.read, &v) {
                    (Read::Bool, Value::Bool(b)) => f64::from(u8::from(*b)),
                    (Read::MicrosToSeconds, v) => v.as_f64().unwrap() / 1e6,
                    (_, v) => v.as_f64().unwrap(),
                };
                let got = e.value(s.name, s.labels);
                assert_eq!(got, Some(want), "{pointer} -> {} {:?}", s.name, s.labels);
            }
        }
        assert_eq!(e.value("kvh_async_error", &[]), Some(1.0));
    }

    #[test]
    fn every_row_reads_a_field_that_exists() {
        let doc = stats_document();
        for s in SERIES {
            if s.read != Read::Present {
                assert!(
                    doc.pointer(s.pointer).is_some(),
                    "{} is not in the stats JSON",
                    s.pointer
                );
            }
        }
        let mut seen = std::collections::HashSet::new();
        for s in SERIES {
            assert!(
                seen.insert((s.name, s.labels)),
                "{} {:?} is mapped twice",
                s.name,
                s.labels
            );
        }
    }

    #[test]
    fn build_info_carries_the_policy_digest_when_the_runtime_set_it() {
        let mut stats = Stats::merge("host".into(), &[PoolCounters::default()], None);
        let without = parse(&encode(&stats, &ExporterStats::default(), at())).unwrap();
        assert_eq!(
            without.sample(BUILD_INFO).unwrap().label("config_digest"),
            None
        );
        stats.config_digest = Some("ab".repeat(32));
        let with = parse(&encode(&stats, &ExporterStats::default(), at())).unwrap();
        let info = with.sample(BUILD_INFO).unwrap();
        assert_eq!(info.label("config_digest"), Some("ab".repeat(32).as_str()));
        assert_eq!(info.label("backend"), Some("host"));
    }

    /// The free → clean latency histogram: one bucket per bound of the table in
    /// `stats::LATENCY_BUCKETS_US`, in order, cumulative, `+Inf` equal to `_count`, `_sum`
    /// in seconds; a family a scraper accepts as a histogram.
    #[test]
    fn the_free_to_clean_histogram_is_a_valid_cumulative_histogram() {
        use crate::stats::{LATENCY_BUCKETS_US, LATENCY_BUCKET_LABELS};
        for (label, us) in LATENCY_BUCKET_LABELS.iter().zip(LATENCY_BUCKETS_US) {
            assert_eq!(label.parse::<f64>().unwrap(), us as f64 / 1e6, "{label}");
        }
        let mut p = PoolCounters::default();
        for us in [300, 700, 700, 40_000, 2_000_000, 60_000_000] {
            p.record_scrub_latency(us);
        }
        let text = encode(
            &Stats::merge("host".into(), &[p], None),
            &ExporterStats::default(),
            at(),
        );
        let e = parse(&text).unwrap();
        assert_eq!(
            e.types.get("kvh_free_to_clean_seconds").map(String::as_str),
            Some("histogram")
        );
        let les: Vec<&str> = e
            .samples
            .iter()
            .filter(|s| s.name == "kvh_free_to_clean_seconds_bucket")
            .map(|s| s.label("le").unwrap())
            .collect();
        let mut expected: Vec<&str> = LATENCY_BUCKET_LABELS.to_vec();
        expected.push("+Inf");
        assert_eq!(les, expected, "buckets out of order or missing");
        let bucket = |le| {
            e.value("kvh_free_to_clean_seconds_bucket", &[("le", le)])
                .unwrap()
        };
        assert_eq!(bucket("0.0005"), 1.0);
        assert_eq!(bucket("0.001"), 3.0);
        assert_eq!(bucket("0.05"), 4.0);
        assert_eq!(bucket("2.5"), 5.0);
        assert_eq!(bucket("30"), 5.0);
        assert_eq!(bucket("+Inf"), 6.0);
        assert_eq!(e.value("kvh_free_to_clean_seconds_count", &[]), Some(6.0));
        let sum = e.value("kvh_free_to_clean_seconds_sum", &[]).unwrap();
        assert!((sum - 62.0417).abs() < 1e-9, "{sum}");
        // The summary of the same observations says the same count and sum.
        assert_eq!(e.value("kvh_scrub_latency_seconds_count", &[]), Some(6.0));
        assert_eq!(
            e.value("kvh_scrub_latency_observations_total", &[]),
            Some(6.0)
        );
        let sum = e.value("kvh_scrub_latency_seconds_sum", &[]).unwrap();
        assert!((sum - 62.0417).abs() < 1e-9, "{sum}");
        let text_at = |needle: &str| text.find(needle).unwrap_or(usize::MAX);
        assert!(
            text_at("# TYPE kvh_free_to_clean_seconds histogram\n")
                < text_at("kvh_free_to_clean_seconds_bucket{le=\"0.0005\"}"),
            "{text}"
        );
    }

    #[test]
    fn names_types_and_help_follow_the_conventions() {
        let text = encode(
            &Stats::merge("cuda".into(), &[PoolCounters::default()], None),
            &ExporterStats::default(),
            at(),
        );
        let e = parse(&text).unwrap();
        let families: std::collections::HashSet<&str> =
            e.samples.iter().map(|s| s.name.as_str()).collect();
        assert!(families.len() > 30, "{families:?}");
        for name in &families {
            assert!(name.starts_with("kvh_"), "{name}");
            let family = crate::metrics::parse::family_of(name, &e.types);
            let kind = e.types.get(family).map(String::as_str);
            let help = e.help.get(family).map(String::as_str).unwrap_or("");
            assert!(!help.is_empty(), "{name} has no help");
            match kind {
                Some("counter") => assert!(name.ends_with("_total"), "counter {name}"),
                Some("gauge") => assert!(!name.ends_with("_total"), "gauge {name}"),
                Some("histogram") => assert!(
                    family.ends_with("_seconds") && *name != family,
                    "histogram sample {name} of {family}"
                ),
                Some("summary") => assert!(family.ends_with("_seconds"), "summary {name}"),
                other => panic!("{name}: type {other:?}"),
            }
        }
        // The exact 0.0.4 spelling a node exporter needs: TYPE names the sample itself.
        assert!(text.contains("# TYPE kvh_allocations_total counter\nkvh_allocations_total 0\n"));
        assert!(!text.contains("# EOF") && !text.contains("# UNIT"));
        assert!(text.ends_with('\n'));
        assert_eq!(e.value(SNAPSHOT_TIMESTAMP, &[]), Some(1_700_000_000.25));
        let info = e.sample(BUILD_INFO).unwrap();
        assert_eq!(info.label("version"), Some(env!("CARGO_PKG_VERSION")));
        assert_eq!(info.label("backend"), Some("cuda"));
        assert_eq!(info.value, 1.0);
        for state in ["live", "pending", "clean", "quarantined"] {
            assert_eq!(e.value("kvh_pool_blocks", &[("state", state)]), Some(0.0));
            assert_eq!(e.value("kvh_pool_bytes", &[("state", state)]), Some(0.0));
        }
        for q in ["0.5", "0.95", "0.99"] {
            assert!(e
                .value("kvh_scrub_latency_seconds", &[("quantile", q)])
                .is_some());
        }
        // Without a forensic log in the snapshot, its metrics are simply absent.
        assert!(e.value("kvh_log_records_written_total", &[]).is_none());
    }

    /// Before any latency is observed the quantiles are NaN (no value), not 0 s; from the
    /// first observation on they are numbers again.
    #[test]
    fn latency_quantiles_are_nan_until_the_first_observation() {
        let quantiles = |doc: &Value| {
            let (text, _) = encode_document(doc, &ExporterStats::default(), at());
            let e = parse(&text).unwrap();
            ["0.5", "0.95", "0.99"].map(|q| {
                e.value("kvh_scrub_latency_seconds", &[("quantile", q)])
                    .unwrap()
            })
        };
        let doc = stats_document();
        assert_eq!(doc["scrub_latency"]["count"], 0);
        assert!(
            quantiles(&doc).iter().all(|v| v.is_nan()),
            "{:?}",
            quantiles(&doc)
        );

        let mut pool = PoolCounters::default();
        pool.record_scrub_latency(2_000);
        let observed = serde_json::to_value(Stats::merge("host".into(), &[pool], None)).unwrap();
        assert_eq!(quantiles(&observed).map(|v| (v * 1e3).round()), [2.0; 3]);
    }

    #[test]
    fn a_counter_missing_from_the_table_is_still_exported() {
        let mut doc = stats_document();
        doc["counters"]["blocks_teleported"] = Value::from(7u64);
        doc["extra"] = serde_json::json!({ "depth": 2.5 });
        let (text, unmapped) = encode_document(&doc, &ExporterStats::default(), at());
        assert_eq!(
            unmapped,
            vec!["/counters/blocks_teleported", "/extra/depth"]
        );
        let e = parse(&text).unwrap();
        assert_eq!(e.value("kvh_blocks_teleported_total", &[]), Some(7.0));
        assert_eq!(e.types["kvh_blocks_teleported_total"], "counter");
        assert_eq!(e.value("kvh_extra_depth", &[]), Some(2.5));
        assert_eq!(e.types["kvh_extra_depth"], "untyped");
    }

    #[test]
    fn label_values_and_odd_floats_are_escaped() {
        let mut doc = stats_document();
        doc["backend"] = Value::from("we\"ird\\back\nend");
        doc["pool_hit_rate"] = Value::from(0.125);
        let (text, _) = encode_document(&doc, &ExporterStats::default(), at());
        let e = parse(&text).unwrap();
        assert_eq!(
            e.sample(BUILD_INFO).unwrap().label("backend"),
            Some("we\"ird\\back\nend")
        );
        assert_eq!(e.value("kvh_pool_hit_ratio", &[]), Some(0.125));
        assert_eq!(format_f64(f64::NAN), "NaN");
        assert_eq!(format_f64(f64::INFINITY), "+Inf");
        assert_eq!(format_f64(f64::NEG_INFINITY), "-Inf");
        assert_eq!(format_f64(1e-7), "0.0000001");
    }

    /// Without a detector in the snapshot its series are absent, not zero; with it off only
    /// `kvh_anomaly_enabled 0` is there; with it on every signal has a series from the start.
    #[test]
    fn anomaly_series_tell_missing_from_zero() {
        use crate::events::{Event, EventKind, QuarantineReason};
        let signals = crate::events::AnomalySignal::ALL.map(|s| s.name());
        let exported =
            |stats: &Stats| parse(&encode(stats, &ExporterStats::default(), at())).unwrap();
        let mut stats = Stats::merge("host".into(), &[PoolCounters::default()], None);
        let e = exported(&stats);
        assert!(e.value("kvh_anomaly_enabled", &[]).is_none());
        assert!(e
            .value("kvh_anomalies_total", &[("signal", "residue")])
            .is_none());
        let off = AnomalyConfig {
            enabled: false,
            ..AnomalyConfig::default()
        };
        stats.anomaly = anomaly::layer(&off, None).stats_json();
        let e = exported(&stats);
        assert_eq!(e.value("kvh_anomaly_enabled", &[]), Some(0.0));
        for s in signals {
            assert!(
                e.value("kvh_anomalies_total", &[("signal", s)]).is_none(),
                "{s}"
            );
        }
        assert!(e.value("kvh_anomaly_records_total", &[]).is_none());
        let on = anomaly::layer(&AnomalyConfig::default(), None);
        let sink = on.sink.clone().unwrap();
        let residue = Event {
            at: SystemTime::now(),
            kind: EventKind::Quarantined {
                reason: QuarantineReason::Residue,
                retired_before: false,
            },
            context: crate::context::Context::none(),
            block: None,
            addr: None,
        };
        sink.emit(residue);
        stats.anomaly = on.stats_json();
        let e = exported(&stats);
        assert_eq!(e.value("kvh_anomaly_enabled", &[]), Some(1.0));
        for s in signals {
            let want = if s == "residue" { 1.0 } else { 0.0 };
            assert_eq!(
                e.value("kvh_anomalies_total", &[("signal", s)]),
                Some(want),
                "{s}"
            );
        }
        assert_eq!(e.value("kvh_anomaly_records_total", &[]), Some(1.0));
        assert_eq!(e.value("kvh_anomaly_folded_events_total", &[]), Some(0.0));
        assert_eq!(e.types["kvh_anomalies_total"], "counter");
        let text = encode(&stats, &ExporterStats::default(), at());
        assert!(
            text.contains("kvh_anomalies_total{signal=\"residue\"} 1\n"),
            "{text}"
        );
    }

    #[test]
    fn exporter_counters_are_exported() {
        let stats = Stats::merge("host".into(), &[], None);
        let ex = ExporterStats {
            textfile_errors: 3,
            http_rejected: 4,
        };
        let e = parse(&encode(&stats, &ex, at())).unwrap();
        assert_eq!(e.value("kvh_metrics_textfile_errors_total", &[]), Some(3.0));
        assert_eq!(e.value("kvh_metrics_http_rejected_total", &[]), Some(4.0));
    }

    #[test]
    fn common_labels_go_on_every_sample() {
        let stats = Stats::merge("host".into(), &[PoolCounters::default()], None);
        let text = encode_labelled(&stats, &ExporterStats::default(), at(), &[("pid", "41")]);
        let e = parse(&text).unwrap();
        assert!(e.samples.len() > 10);
        for s in &e.samples {
            assert_eq!(
                s.labels.first(),
                Some(&("pid".into(), "41".into())),
                "{s:?}"
            );
        }
        assert_eq!(
            e.value("kvh_verifications_total", &[("result", "failed")]),
            Some(0.0)
        );
        assert!(
            text.contains("kvh_allocations_total{pid=\"41\"} 0\n"),
            "{text}"
        );
        assert!(text.contains("kvh_verifications_total{pid=\"41\",result=\"passed\"} 0\n"));
    }
}

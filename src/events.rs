//! Structured security and lifecycle events emitted by the pool.
//!
//! Events carry ids, sizes, states and counts, never payload bytes (invariant 5). The pool
//! collects events while it holds its lock and hands them to the [`EventSink`] only after the
//! lock is dropped, so a sink that blocks (the forensic writer's bounded queue is full) never
//! stalls other threads' allocations.

use std::sync::Arc;
use std::time::SystemTime;

use crate::context::Context;

/// Why a block was quarantined.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuarantineReason {
    /// The block's scrub verification failed (coverage below threshold, missing samples).
    VerifyFailed,
    /// A policy retires blocks at free (`idle_ttl_ms <= 0`: never reuse).
    NeverReusePolicy,
    /// The re-scrub of an already quarantined block failed: the block stays quarantined for
    /// the life of the process and is never released to the backend.
    RescrubFailed,
    /// Verification passed the coverage threshold but some samples read non-zero: something
    /// wrote to the block after it was freed. It is never handed out again as clean.
    Residue,
    /// The re-scrub of an already quarantined block passed the coverage threshold but read
    /// non-zero samples: something wrote to it while it was quarantined. Kept quarantined
    /// for the life of the process, as [`QuarantineReason::RescrubFailed`].
    RescrubResidue,
}

/// Why a block went back to the backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReleaseReason {
    /// Quarantined block re-scrubbed (double pass, full verification) and verified.
    QuarantineCleared,
    /// The block reached the configured maximum reuse count.
    MaxReuse,
    /// The block sat idle in the pool longer than the idle TTL.
    IdleTtl,
    /// `kvh_empty_cache` returned cached clean blocks (as does the drop of a Rust
    /// `Allocator`'s last handle).
    EmptyCache,
    /// Out-of-memory recovery returned cached clean blocks, to retry an allocation the
    /// backend refused.
    OutOfMemory,
    /// The block was exported for another process (`cudaIpcGetMemHandle`) while it was
    /// handed out: its memory may still be mapped there, so it is never handed to anyone
    /// else, and goes back to the driver once its scrub verified.
    IpcExported,
}

/// Why a free was refused. The pool is unchanged by every refused free.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InvalidFreeReason {
    /// The pointer was never returned by this allocator (or was already released).
    UnknownPointer,
    /// The block is already freed (PENDING, CLEAN or QUARANTINED).
    DoubleFree,
    /// The pointer lies inside a block but is not its start.
    InteriorPointer,
    /// The pointer belongs to a block of another device than the one named in the call.
    WrongDevice,
    /// The device index is outside the backend's device range.
    InvalidDevice,
}

impl std::fmt::Display for InvalidFreeReason {
    /// What an error message says of the refused free.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            InvalidFreeReason::UnknownPointer => {
                "unknown pointer (not allocated by kvhygiene, or already returned to the device)"
            }
            InvalidFreeReason::DoubleFree => "double free (the block was already freed)",
            InvalidFreeReason::InteriorPointer => {
                "interior pointer (inside a block, not its start)"
            }
            InvalidFreeReason::WrongDevice => "wrong device (the block is on another device)",
            InvalidFreeReason::InvalidDevice => "invalid device index",
        })
    }
}

/// Which time-to-live was exceeded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TtlKind {
    /// A block stayed LIVE longer than `live_ttl_ms` (reported once per hand-out: while it is
    /// still LIVE, or at its free).
    Live,
}

/// The event patterns the anomaly detector ([`crate::anomaly`]) watches, one per kind of
/// security event it counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AnomalySignal {
    /// Refused frees (`invalid_free`).
    InvalidFree,
    /// Frees whose size differed from the block's (`size_mismatch`).
    SizeMismatch,
    /// Scrubs that did not verify (`verify_failed`, `kv_verify_failed`).
    VerifyFailed,
    /// Scrubs that read a non-zero sample: something wrote to memory after it was freed.
    Residue,
    /// Blocks quarantined for a failure (not the never-reuse policy's retirements), each
    /// once: a failed re-scrub keeps a block quarantined, it does not count it again (unless
    /// the block was held only by the never-reuse policy until then).
    Quarantine,
    /// Blocks live longer than the live TTL (`ttl_exceeded`).
    TtlExceeded,
    /// Policy violations (`policy_violation`).
    PolicyViolation,
}

impl AnomalySignal {
    /// Every signal, in the order of the stats and metrics.
    pub const ALL: [AnomalySignal; 7] = [
        AnomalySignal::InvalidFree,
        AnomalySignal::SizeMismatch,
        AnomalySignal::VerifyFailed,
        AnomalySignal::Residue,
        AnomalySignal::Quarantine,
        AnomalySignal::TtlExceeded,
        AnomalySignal::PolicyViolation,
    ];

    /// The signal's name in records, stats and metric labels.
    pub fn name(self) -> &'static str {
        match self {
            AnomalySignal::InvalidFree => "invalid_free",
            AnomalySignal::SizeMismatch => "size_mismatch",
            AnomalySignal::VerifyFailed => "verify_failed",
            AnomalySignal::Residue => "residue",
            AnomalySignal::Quarantine => "quarantine",
            AnomalySignal::TtlExceeded => "ttl_exceeded",
            AnomalySignal::PolicyViolation => "policy_violation",
        }
    }
}

/// Which rule of the anomaly detector fired.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AnomalyRule {
    /// The count within the sliding window reached the signal's threshold.
    Burst,
    /// The window's count exceeded the baseline of earlier windows by `z` standard deviations.
    Surge,
}

impl AnomalyRule {
    pub fn name(self) -> &'static str {
        match self {
            AnomalyRule::Burst => "burst",
            AnomalyRule::Surge => "surge",
        }
    }
}

/// The statistics behind a `surge`: the baseline of earlier windows and how far the window's
/// count is above it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AnomalyBaseline {
    /// Exponentially weighted mean and standard deviation of earlier windows' counts.
    pub mean: f64,
    pub stddev: f64,
    /// `(count - mean) / spread`, the spread being the standard deviation with its floor.
    pub z_score: f64,
    /// The configured `z` the score exceeded.
    pub z_threshold: f64,
}

/// What happened. Each variant maps to one forensic record kind ([`EventKind::name`]).
#[derive(Clone, Debug, PartialEq)]
pub enum EventKind {
    /// A scrub's verification did not pass.
    VerifyFailed {
        samples_expected: u64,
        samples_checked: u64,
        samples_nonzero: u64,
        /// zero samples / samples checked (0.0 when nothing was checked).
        coverage: f64,
        threshold: f64,
    },
    /// A block entered QUARANTINED, or (a failed re-scrub) stays there for good.
    Quarantined {
        reason: QuarantineReason,
        /// For a failed re-scrub: the block was held only by the never-reuse policy until
        /// now, so this is its first quarantine for a failure. Not written to the log; the
        /// anomaly detector counts it.
        retired_before: bool,
    },
    /// A block was returned to the backend, or, `leaked`, left to it: the backend refused its
    /// release (a driver error), and the memory, verified clean, stays allocated on the device
    /// outside kvhygiene's pools.
    Released { reason: ReleaseReason, leaked: bool },
    /// A free was refused. The event's ids are the block owner's when the pointer belongs to
    /// a block, and `caller` is the context of the thread that made the call: a caller bug is
    /// the caller's, whoever's block it aimed at.
    InvalidFree {
        reason: InvalidFreeReason,
        device: i32,
        caller: Context,
    },
    /// The size given to free differs from the size the block was allocated with. The free
    /// proceeds with the block table's size (the caller's size is never trusted). `caller` as
    /// for [`EventKind::InvalidFree`].
    SizeMismatch { claimed: i64, caller: Context },
    /// A handed-out block was exported for another process (`cudaIpcGetMemHandle`, or
    /// `kvh_mark_ipc_exported`): once per hand-out, at its first export. The event's ids are
    /// the block owner's; `caller` as for [`EventKind::InvalidFree`].
    IpcExport { caller: Context },
    /// A time-to-live was exceeded.
    TtlExceeded {
        which: TtlKind,
        age_ms: u64,
        limit_ms: u64,
    },
    /// A policy was violated (the text says which); fail-closed deployments abort after it.
    PolicyViolation {
        policy: &'static str,
        detail: String,
    },
    /// A `kvh_scrub_blocks` call ran: the blocks of a paged KV cache it scrubbed and verified
    /// (or, with `error`, what it did before it stopped). The event's block is absent (one
    /// call covers many); the calling thread's context says whose they were.
    KvScrubbed(Box<KvScrubRecord>),
    /// One segment of a `kvh_scrub_blocks` call did not verify (or read residue). The event's
    /// block is the allocation holding the KV cache.
    KvVerifyFailed {
        kv_block: u32,
        region: u32,
        addr: u64,
        len: u64,
        seed: u64,
        samples_expected: u64,
        samples_checked: u64,
        samples_nonzero: u64,
        coverage: f64,
        threshold: f64,
        /// What the record adds to the anomaly detector's counts (not written to the log).
        tally: KvTally,
    },
    /// The anomaly detector saw a burst or surge of a signal for one tenant (the event's
    /// context is that of the event that tripped the rule; none when `folded`). Counts only,
    /// never payload bytes.
    Anomaly {
        signal: AnomalySignal,
        rule: AnomalyRule,
        /// Counted under the shared `*other*` key: the tenant was beyond the detector's cap
        /// of tracked tenants for the signal.
        folded: bool,
        window_ms: u64,
        /// Events in the window when the rule fired.
        count: u64,
        /// The count the rule needed (the burst threshold, or the smallest surge count).
        threshold: u64,
        /// Present for `surge`.
        baseline: Option<AnomalyBaseline>,
    },
}

/// How one failed segment of a `kvh_scrub_blocks` call counts toward the anomaly detector.
/// A block is one failure per call however many of its regions failed, as one failed scrub of
/// a freed block is: counted per segment, one block of a 32-layer model failing in every
/// layer would be 64 failures, a burst, and would inflate the tenant's baseline
/// sixty-fourfold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvTally {
    /// The block's first failed segment in the call, which stands for the whole block:
    /// one verification failure, and residue when any of its segments read some.
    Block { residue: bool },
    /// Another failed segment of a block already counted.
    Segment,
}

/// The fields of a `kv_scrub` record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvScrubRecord {
    pub device: u32,
    /// Block ids named; of them, those read back (every segment verified, or a segment that
    /// failed: all of them unless the call stopped, `error`, or some were withdrawn), and
    /// those that failed verification (a part of the ones read back).
    pub blocks: u64,
    pub verified_blocks: u64,
    pub failed_blocks: u64,
    /// Segments (block × region), those not verified (the call stopped, or their block was
    /// withdrawn), and the segments' bytes.
    pub segments: u64,
    pub unverified_segments: u64,
    pub bytes: u64,
    /// Seed of the first segment; segment `i` (block-major, in the order given) used
    /// `first_seed + i`.
    pub first_seed: u64,
    pub stream: u64,
    /// The layout: region count, geometry and the SHA-256 of all of it (region bases
    /// included), so the record can be matched to the engine's cache.
    pub regions: u64,
    pub block_bytes: u64,
    pub block_stride: u64,
    pub blocks_per_region: u64,
    pub layout_sha256: [u8; 32],
    /// The ids in the caller's order, when there are at most `KV_LOGGED_IDS` of them.
    pub block_ids: Option<Vec<u32>>,
    /// SHA-256 of the ids (little-endian `u32`s, in order), always.
    pub block_ids_sha256: [u8; 32],
    /// Why the call stopped before every segment was verified.
    pub error: Option<String>,
    /// Who asked for the scrub.
    pub trigger: KvScrubTrigger,
    /// For the gate's scrub: of the blocks named and not withdrawn, those whose owner the gate
    /// did not know yet when the claim began (a new cache's first claims, or a forgotten
    /// ledger's). Zero for the engine's.
    pub unknown_owner_blocks: u64,
    /// For the gate's scrub: of the blocks named, those it verified clean and handed to the
    /// claimant from another owner (not unknown when the claim began, not dirty only because
    /// a scrub of them was in flight, and handed over by this scrub: not taken by another
    /// claim, not refused after another scrub's failure landed first, nor left to a later
    /// pass by a forgotten ledger): what `kv_gate_owner_changed_blocks` counts. Zero for the
    /// engine's.
    pub owner_changed_blocks: u64,
    /// For the gate's scrub: of the blocks named, those withdrawn before the submission,
    /// never written nor verified (another claim was handed them, or their ledger was
    /// forgotten, after this claim sorted them). Zero for the engine's.
    pub withdrawn_blocks: u64,
}

/// Who asked for a KV block scrub.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvScrubTrigger {
    /// The engine, through `kvh_scrub_blocks`, when it freed the blocks.
    Engine,
    /// The eviction gate, inside `kvh_claim_blocks`: the blocks were changing owner (or their
    /// owner was unknown) without a verified scrub since their last owner.
    Gate,
}

impl KvScrubTrigger {
    /// The record's `trigger` field.
    pub fn name(self) -> &'static str {
        match self {
            KvScrubTrigger::Engine => "scrub_blocks",
            KvScrubTrigger::Gate => "claim_gate",
        }
    }
}

impl EventKind {
    /// The forensic record kind for this event.
    pub fn name(&self) -> &'static str {
        match self {
            EventKind::VerifyFailed { .. } => "verify_failed",
            EventKind::Quarantined { .. } => "quarantine",
            EventKind::Released { .. } => "release",
            EventKind::InvalidFree { .. } => "invalid_free",
            EventKind::SizeMismatch { .. } => "size_mismatch",
            EventKind::TtlExceeded { .. } => "ttl_exceeded",
            EventKind::IpcExport { .. } => "ipc_export",
            EventKind::PolicyViolation { .. } => "policy_violation",
            EventKind::KvScrubbed(_) => "kv_scrub",
            EventKind::KvVerifyFailed { .. } => "kv_verify_failed",
            EventKind::Anomaly { .. } => "anomaly",
        }
    }

    /// Security events must never be dropped by a sink (invariant 5); a `kv_scrub` record is
    /// one, as the evidence that a request's KV blocks were cleared. Releases are lifecycle
    /// records: still logged, but a sink under pressure may coalesce them into a summary.
    pub fn is_security(&self) -> bool {
        !matches!(self, EventKind::Released { .. })
    }
}

/// The block an event is about (no payload, only identity and geometry).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockRef {
    /// Process-unique block id (monotonic, never reused).
    pub id: u64,
    pub device: i32,
    /// Device address of the block.
    pub addr: u64,
    /// Size the block was last allocated with (bytes the caller asked for).
    pub requested: u64,
    /// Capacity of the block: its size class's, or the request's rounded to 2 MiB for a block
    /// sized to it (`SizeClass::exact`).
    pub capacity: u64,
    /// Scrub sequence number of the block's last scrub: the verification seed.
    pub scrub_seq: u64,
}

/// One event.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    pub at: SystemTime,
    pub kind: EventKind,
    /// The ids of the block's owner (for frees: the context of the allocation, not of the
    /// thread that freed), or the calling thread's context when there is no block.
    pub context: Context,
    /// The block, when the event concerns one; the raw pointer for refused frees is in `addr`.
    pub block: Option<BlockRef>,
    /// The pointer the caller passed, for refused frees.
    pub addr: Option<u64>,
}

/// Consumer of pool events. Implementations must be cheap to call or queue internally; they
/// are called without any pool lock held, possibly from several threads at once.
pub trait EventSink: Send + Sync {
    fn emit(&self, event: Event);

    /// Emits the events of one pool operation, in order. They happened together, under one
    /// pool lock: a sink that times events on arrival (the anomaly detector) times them once,
    /// so a sink behind it that holds the first one back cannot spread them over later
    /// windows.
    fn emit_all(&self, events: Vec<Event>) {
        for event in events {
            self.emit(event);
        }
    }

    /// Makes every event emitted so far durable (called before a fail-closed abort).
    fn flush(&self) {}
}

/// A sink that keeps events in memory: for tests, the demo and `kvh_stats_json`.
#[derive(Default)]
pub struct MemorySink {
    events: std::sync::Mutex<Vec<Event>>,
}

impl MemorySink {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// A copy of every event received so far.
    pub fn snapshot(&self) -> Vec<Event> {
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// How many events of the given record kind were received.
    pub fn count(&self, name: &str) -> usize {
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|e| e.kind.name() == name)
            .count()
    }
}

impl EventSink for MemorySink {
    fn emit(&self, event: Event) {
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(event);
    }
}

/// Fans one event out to several sinks.
pub struct FanoutSink(pub Vec<Arc<dyn EventSink>>);

impl FanoutSink {
    /// Gives `events` to every sink, each as one batch. A sink that panics does not keep the
    /// events from the sinks after it (a forensic log beside a failing sink still gets every
    /// security event, invariant 5); the first panic is raised again once all had them.
    fn deliver(&self, events: Vec<Event>, one: bool) {
        let Some((last, rest)) = self.0.split_last() else {
            return;
        };
        let give = |sink: &Arc<dyn EventSink>, events: Vec<Event>| {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match (one, events) {
                (true, mut events) if events.len() == 1 => sink.emit(events.remove(0)),
                (_, events) => sink.emit_all(events),
            }))
        };
        let mut panicked = None;
        for sink in rest {
            if let Err(p) = give(sink, events.clone()) {
                panicked.get_or_insert(p);
            }
        }
        if let Err(p) = give(last, events) {
            panicked.get_or_insert(p);
        }
        if let Some(p) = panicked {
            std::panic::resume_unwind(p);
        }
    }
}

impl EventSink for FanoutSink {
    fn emit(&self, event: Event) {
        self.deliver(vec![event], true);
    }

    fn emit_all(&self, events: Vec<Event>) {
        self.deliver(events, false);
    }

    fn flush(&self) {
        // Called before a fail-closed abort: a sink that panics must not keep the others,
        // a forensic log among them, from making their records durable.
        let mut panicked = None;
        for sink in &self.0 {
            let flushed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| sink.flush()));
            if let Err(p) = flushed {
                panicked.get_or_insert(p);
            }
        }
        if let Some(p) = panicked {
            std::panic::resume_unwind(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// Counts the flushes it receives.
    #[derive(Default)]
    struct Flushes(AtomicU64);

    impl EventSink for Flushes {
        fn emit(&self, _: Event) {}
        fn flush(&self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// `flush` is what the allocator calls before a fail-closed abort: a fan-out must pass it
    /// on to every sink it feeds, as the anomaly layer passes it to the sink behind it, or
    /// the records queued in a forensic log behind it are lost at the abort.
    #[test]
    fn a_fanout_flushes_every_sink_it_feeds() {
        let a = Arc::new(Flushes::default());
        let b = Arc::new(Flushes::default());
        let fanout = FanoutSink(vec![a.clone(), b.clone()]);
        fanout.flush();
        assert_eq!(
            (a.0.load(Ordering::SeqCst), b.0.load(Ordering::SeqCst)),
            (1, 1),
            "flush reached (first, second) sink this many times"
        );
    }
}

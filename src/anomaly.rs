//! The anomaly detector ("activation logger"): a layer in front of the event sinks that turns
//! single security events into the patterns an operator acts on, such as "invalid frees from
//! tenant X are bursting" or "verification failures jumped far above their baseline".
//!
//! [`AnomalySink`] implements [`EventSink`]: it forwards every event unchanged to the sink
//! behind it (the forensic log) and counts the event toward its signals
//! ([`signals_of`]). Per (signal, tenant) two rules run:
//!
//! - **burst**: the count within a sliding window of `window_ms` reaches the signal's
//!   threshold ([`default_burst_threshold`] × `KVH_ANOMALY_BURST_SCALE`, rounded up; residue's
//!   stays 1);
//! - **surge**: the count of the current window exceeds the baseline of earlier windows (their
//!   exponentially weighted mean and standard deviation) by `z` standard deviations, once the
//!   baseline has seen [`WARMUP_WINDOWS`] windows and the count is at least
//!   [`SURGE_MIN_COUNT`].
//!
//! A rule that fires emits one extra event, [`EventKind::Anomaly`] (record kind `anomaly`),
//! after the event that tripped it, and then stays quiet for that key for a window: a storm is
//! one record a window, not thousands. Like every security event it is never dropped, and it
//! carries counts and statistics, never payload bytes.
//!
//! The layer is RMM-style: a cross-cutting concern wrapped around the sink, not flags in the
//! allocation path. The pool calls its sink without any pool lock held; the detector takes its
//! own mutex for a few arithmetic operations and releases it before anything is forwarded.
//! Events that count toward no signal (releases, KV scrub records) do not take it at all.
//!
//! Memory is bounded: at most [`Params::max_tenants`] tenants are tracked per signal; events
//! of further tenants are counted together under a shared `*other*` key (`key: "*other*"` in
//! the record), and tenants idle for [`IDLE_WINDOWS`] windows are forgotten to make room.
//!
//! Time is a parameter of the core ([`Detector::observe`] takes an [`Instant`]) and the sink
//! reads it from a [`Clock`], so the tests drive windows with a [`ManualClock`] and never
//! sleep.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::config::AnomalyConfig;
use crate::context::Context;
use crate::events::{
    AnomalyBaseline, AnomalyRule, AnomalySignal, Event, EventKind, EventSink, KvTally,
    QuarantineReason,
};

/// The sliding window is counted in this many slots of `window_ms / SLOTS`: its span is
/// between 9/10 of the window and the whole window, with ten counters per key instead of a
/// timestamp per event.
pub const SLOTS: u64 = 10;

/// Finished windows the baseline needs before the surge rule may fire: a baseline of one or
/// two windows says nothing about what is normal.
pub const WARMUP_WINDOWS: u64 = 8;

/// The smallest window count that can be a surge, so a quiet signal going from 0 to 1 or 2
/// (infinitely many standard deviations of a baseline of zeros) is not one.
pub const SURGE_MIN_COUNT: u64 = 5;

/// Weight of the newest finished window in the baseline: it mostly reflects the last ten or
/// so windows and forgets an old storm within a few tens of them.
pub const EWMA_ALPHA: f64 = 0.1;

/// A tenant with no event for this many windows is dropped when room is needed; nothing is
/// left of it in its sliding window, and its baseline has decayed to noise.
pub const IDLE_WINDOWS: u64 = 32;

/// Tenants tracked per signal by default before further ones fold into `*other*`.
pub const DEFAULT_MAX_TENANTS: usize = 1024;

/// The signals an event counts toward. A scrub that failed and read a non-zero sample is both
/// `verify_failed` and `residue`; a block quarantined for residue is both `residue` and
/// `quarantine`, and a block counts toward `quarantine` once, when it enters quarantine for a
/// failure (not again when its re-scrub fails; a block the never-reuse policy retired counts
/// when its re-scrub fails). A KV block that failed counts once per call, through its first failed
/// segment (`KvTally`), however many of its regions failed. The never-reuse policy's retirements are the control working, not a signal
/// (as in `kvh evidence`), and the detector's own records never count, so it cannot feed
/// itself.
pub fn signals_of(kind: &EventKind) -> &'static [AnomalySignal] {
    use AnomalySignal as S;
    match kind {
        EventKind::InvalidFree { .. } => &[S::InvalidFree],
        EventKind::SizeMismatch { .. } => &[S::SizeMismatch],
        EventKind::VerifyFailed {
            samples_nonzero, ..
        } if *samples_nonzero > 0 => &[S::VerifyFailed, S::Residue],
        EventKind::VerifyFailed { .. } => &[S::VerifyFailed],
        EventKind::KvVerifyFailed { tally, .. } => match tally {
            KvTally::Block { residue: true } => &[S::VerifyFailed, S::Residue],
            KvTally::Block { residue: false } => &[S::VerifyFailed],
            KvTally::Segment => &[],
        },
        EventKind::Quarantined {
            reason,
            retired_before,
        } => match (reason, retired_before) {
            (QuarantineReason::Residue, _) | (QuarantineReason::RescrubResidue, true) => {
                &[S::Residue, S::Quarantine]
            }
            (QuarantineReason::VerifyFailed, _) | (QuarantineReason::RescrubFailed, true) => {
                &[S::Quarantine]
            }
            // A failed re-scrub keeps a block in quarantine that was counted when it entered
            // for a failure: a block is one quarantine. (One the never-reuse policy retired,
            // above, was not counted then.) Residue its re-scrub read is a reading of its
            // own, counted as `residue_detected` counts it.
            (QuarantineReason::RescrubResidue, false) => &[S::Residue],
            (QuarantineReason::RescrubFailed, false) | (QuarantineReason::NeverReusePolicy, _) => {
                &[]
            }
        },
        EventKind::TtlExceeded { .. } => &[S::TtlExceeded],
        EventKind::PolicyViolation { .. } => &[S::PolicyViolation],
        // An export is the engine sharing its own block, which the allocator then keeps
        // from every other owner: a record for the audit, not a failure or a caller error.
        EventKind::Released { .. }
        | EventKind::IpcExport { .. }
        | EventKind::KvScrubbed(_)
        | EventKind::Anomaly { .. } => &[],
    }
}

/// The burst threshold of a signal at `KVH_ANOMALY_BURST_SCALE=1`: one residue reading (a
/// use-after-free) or two failed verifications already matter; refused frees and size
/// mismatches come from caller bugs that repeat, so only a run of them is a burst.
pub fn default_burst_threshold(signal: AnomalySignal) -> u64 {
    match signal {
        AnomalySignal::Residue => 1,
        AnomalySignal::VerifyFailed => 2,
        AnomalySignal::Quarantine => 4,
        AnomalySignal::PolicyViolation => 8,
        AnomalySignal::InvalidFree | AnomalySignal::SizeMismatch => 16,
        AnomalySignal::TtlExceeded => 32,
    }
}

/// Position of a signal in [`AnomalySignal::ALL`] (and in the per-signal arrays here).
fn index(signal: AnomalySignal) -> usize {
    signal as usize
}

/// The detector's parameters: the configuration, plus what tests may tighten.
#[derive(Clone, Debug, PartialEq)]
pub struct Params {
    pub window_ms: u64,
    pub z: f64,
    /// Burst threshold per signal, in [`AnomalySignal::ALL`] order; at least 1.
    pub burst: [u64; 7],
    pub warmup_windows: u64,
    pub surge_min_count: u64,
    /// Tenants tracked per signal before further ones fold into `*other*`.
    pub max_tenants: usize,
}

impl Params {
    pub fn from_config(c: &AnomalyConfig) -> Params {
        // A scale far outside the configured range still yields a threshold of at least 1;
        // `as` saturates a huge product at u64::MAX. Residue is not scaled: one reading is
        // memory written after its free, never noise, and rounding any scale above 1 up
        // would make a single one go unflagged.
        let scaled = |s| match s {
            AnomalySignal::Residue => 1,
            s => ((default_burst_threshold(s) as f64 * c.burst_scale).ceil() as u64).max(1),
        };
        Params {
            window_ms: c.window_ms.max(1),
            z: c.z,
            burst: AnomalySignal::ALL.map(scaled),
            warmup_windows: WARMUP_WINDOWS,
            surge_min_count: SURGE_MIN_COUNT,
            max_tenants: DEFAULT_MAX_TENANTS,
        }
    }
}

/// One rule firing, before it becomes an event.
#[derive(Clone, Debug, PartialEq)]
pub struct Anomaly {
    pub signal: AnomalySignal,
    pub rule: AnomalyRule,
    /// Counted under the shared `*other*` key.
    pub folded: bool,
    /// The tripping event's context; none for a folded key (the count is of many tenants).
    pub context: Context,
    pub count: u64,
    pub threshold: u64,
    pub baseline: Option<AnomalyBaseline>,
    /// How long after the tripping event's own time the rules were judged: 0, unless the
    /// event came late (timed before an event of the key that reached the detector first),
    /// when the rules are judged as of that newer event.
    pub judged_after_ms: u64,
}

impl Anomaly {
    /// The `anomaly` event, dated when its rule was judged: `at` (the tripping event's time)
    /// plus [`Anomaly::judged_after_ms`]. Dated at a late event's own time, a burst's record
    /// could stand less than a window after the key's previous one in the log, where at most
    /// one is written a window.
    pub fn into_event(self, window_ms: u64, at: std::time::SystemTime) -> Event {
        Event {
            at: at
                .checked_add(Duration::from_millis(self.judged_after_ms))
                .unwrap_or(at),
            kind: EventKind::Anomaly {
                signal: self.signal,
                rule: self.rule,
                folded: self.folded,
                window_ms,
                count: self.count,
                threshold: self.threshold,
                baseline: self.baseline,
            },
            context: self.context,
            block: None,
            addr: None,
        }
    }
}

/// Exponentially weighted mean and variance of finished windows' counts, in the incremental
/// form of Finch, "Incremental calculation of weighted mean and variance" (2009), §9. It is
/// five lines of arithmetic on two floats, so no statistics crate is pulled into every
/// inference process for it.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Ewma {
    mean: f64,
    var: f64,
    /// Windows folded in so far (saturating).
    windows: u64,
}

impl Ewma {
    fn push(&mut self, x: f64) {
        if self.windows == 0 {
            // The first window is the best estimate there is; starting from 0 would bias the
            // mean low for the whole warm-up.
            self.mean = x;
            self.var = 0.0;
        } else {
            let diff = x - self.mean;
            let incr = EWMA_ALPHA * diff;
            self.mean += incr;
            self.var = (1.0 - EWMA_ALPHA) * (self.var + diff * incr);
        }
        self.windows = self.windows.saturating_add(1);
    }

    /// `k` windows without an event, in closed form: `k` pushes of 0 take the mean `m` to
    /// `m·βᵏ` and the variance `v` to `βᵏ·(v + m²·(1 − βᵏ))` (β = 1 − α; each push makes
    /// `v ← β·(v + α·m²)` and `m ← β·m`), so a quiet spell of any length costs one step and
    /// forgets an old storm as fully as the windows one by one would. (Folding in only the
    /// first few dozen left a storm of thousands of events in the baseline for ever.)
    fn push_zeros(&mut self, k: u64) {
        if k == 0 {
            return;
        }
        if self.windows == 0 {
            self.push(0.0);
            return self.push_zeros(k - 1);
        }
        // k as f64 loses nothing that matters: βᵏ underflows to 0 long before 2⁵³.
        let decay = (1.0 - EWMA_ALPHA).powf(k as f64);
        let mean = self.mean;
        self.mean = mean * decay;
        self.var = decay * (self.var + mean * mean * (1.0 - decay));
        self.windows = self.windows.saturating_add(k);
    }

    /// The spread a surge is measured in: the standard deviation, but at least one event and
    /// at least that of a Poisson count of this mean (√mean). Independent events vary at least
    /// that much from window to window, so a baseline that happened to be steady (a spread of
    /// zero) does not make every small rise infinitely many deviations away.
    fn spread(&self) -> f64 {
        self.var
            .max(0.0)
            .sqrt()
            .max(self.mean.max(0.0).sqrt())
            .max(1.0)
    }
}

/// A rule firing for one key: which rule, the count, the count it needed and, for a surge,
/// the baseline.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Firing {
    rule: AnomalyRule,
    count: u64,
    threshold: u64,
    baseline: Option<AnomalyBaseline>,
}

/// What the detector keeps per (signal, key).
#[derive(Clone, Debug)]
struct KeyState {
    /// Events per slot of the sliding window; slot `s` lives at `slots[s % SLOTS]`.
    slots: [u64; SLOTS as usize],
    /// The newest slot counted; slots more than `SLOTS - 1` before it are stale.
    slot: u64,
    /// The window (`t / window_ms`) being counted for the surge rule, and its count.
    window: u64,
    window_count: u64,
    baseline: Ewma,
    /// When the last burst fired (ms): none again within a window of it, one burst record per
    /// window (a time, not an end of quiet, which would saturate at the end of the range).
    burst_fired_at: Option<u64>,
    /// The window a surge fired in, and no surge before this time (ms): one surge record per
    /// window, also for a storm that crosses from one window into the next.
    surged_in: Option<u64>,
    surge_quiet_until: u64,
    /// Time of the last event (ms), for forgetting idle tenants.
    last_ms: u64,
}

impl KeyState {
    fn new(t: u64, p: &Params) -> KeyState {
        KeyState {
            slots: [0; SLOTS as usize],
            slot: slot_of(t, p.window_ms),
            window: t / p.window_ms,
            window_count: 0,
            baseline: Ewma::default(),
            burst_fired_at: None,
            surged_in: None,
            surge_quiet_until: 0,
            last_ms: t,
        }
    }

    /// Counts one event at `t` (ms) and returns the rules it makes fire. An event older than
    /// this key's newest (held up on its way, or timed on another thread) counts where it
    /// happened: in the sliding window while its slot is still in it, in the surge window if
    /// that window is the current one; older, in neither. The rules are judged as of now.
    fn record(&mut self, t: u64, p: &Params, burst_threshold: u64) -> [Option<Firing>; 2] {
        let now = t.max(self.last_ms);
        self.roll(now, p.window_ms);
        let s = slot_of(t, p.window_ms);
        let in_sliding = self.slot.saturating_sub(s) < SLOTS;
        if in_sliding {
            let cell = &mut self.slots[(s % SLOTS) as usize];
            *cell = cell.saturating_add(1);
        }
        let in_window = t / p.window_ms == self.window;
        if in_window {
            self.window_count = self.window_count.saturating_add(1);
        }
        self.last_ms = now;
        [
            in_sliding
                .then(|| self.burst(now, p, burst_threshold))
                .flatten(),
            in_window.then(|| self.surge(now, p)).flatten(),
        ]
    }

    /// Moves both windows forward to `t`: slots that left the sliding window are cleared, and
    /// windows that ended are folded into the baseline (empty ones as zeros).
    fn roll(&mut self, t: u64, window_ms: u64) {
        let s = slot_of(t, window_ms);
        if s > self.slot {
            let stale = (s - self.slot).min(SLOTS);
            for i in 0..stale {
                self.slots[((s - i) % SLOTS) as usize] = 0;
            }
            self.slot = s;
        }
        let w = t / window_ms;
        if w > self.window {
            self.baseline.push(self.window_count as f64);
            self.baseline.push_zeros(w - self.window - 1);
            self.window = w;
            self.window_count = 0;
        }
    }

    fn burst(&mut self, t: u64, p: &Params, threshold: u64) -> Option<Firing> {
        let count = self.slots.iter().fold(0u64, |a, &n| a.saturating_add(n));
        let quiet = self
            .burst_fired_at
            .is_some_and(|at| t.saturating_sub(at) < p.window_ms);
        if count < threshold || quiet {
            return None;
        }
        self.burst_fired_at = Some(t);
        Some(Firing {
            rule: AnomalyRule::Burst,
            count,
            threshold,
            baseline: None,
        })
    }

    /// Checked at every event rather than when the window ends: the count only grows within
    /// a window, so the same windows are flagged, as soon as they cross, without waiting for
    /// a later event to notice that one ended.
    fn surge(&mut self, t: u64, p: &Params) -> Option<Firing> {
        if self.baseline.windows < p.warmup_windows
            || self.surged_in == Some(self.window)
            || t < self.surge_quiet_until
        {
            return None;
        }
        let (mean, spread) = (self.baseline.mean, self.baseline.spread());
        // The smallest whole count strictly above mean + z × spread.
        let above = (mean + p.z * spread).floor();
        let needed = if above.is_finite() && above >= 0.0 {
            (above as u64).saturating_add(1)
        } else {
            u64::MAX
        };
        let threshold = needed.max(p.surge_min_count);
        let count = self.window_count;
        if count < threshold {
            return None;
        }
        self.surged_in = Some(self.window);
        self.surge_quiet_until = t.saturating_add(p.window_ms);
        let baseline = AnomalyBaseline {
            mean,
            stddev: self.baseline.var.max(0.0).sqrt(),
            z_score: (count as f64 - mean) / spread,
            z_threshold: p.z,
        };
        Some(Firing {
            rule: AnomalyRule::Surge,
            count,
            threshold,
            baseline: Some(baseline),
        })
    }
}

/// The slot of the sliding window that time `t` (ms) falls in.
fn slot_of(t: u64, window_ms: u64) -> u64 {
    // u128: no overflow for any `t`, and slots stay aligned with windows (slot / SLOTS is
    // exactly t / window_ms) whatever the window's length.
    ((u128::from(t) * u128::from(SLOTS)) / u128::from(window_ms)) as u64
}

/// The keys of one signal.
#[derive(Default)]
struct SignalState {
    /// By tenant id; the empty string is "no tenant" (ids are never empty: `Context` maps an
    /// empty id to none).
    tenants: HashMap<Box<str>, KeyState>,
    /// The shared `*other*` key of tenants beyond the cap.
    other: Option<KeyState>,
    /// The window of the last sweep for idle tenants: at most one sweep a window.
    swept_in: Option<u64>,
    anomalies: u64,
    folded_events: u64,
}

impl SignalState {
    /// The state of `tenant`'s key, made if there is room, else `*other*`'s; and whether it is
    /// `*other*`.
    fn key(&mut self, tenant: &str, t: u64, p: &Params) -> (&mut KeyState, bool) {
        if !self.tenants.contains_key(tenant) {
            if self.tenants.len() >= p.max_tenants {
                self.sweep(t, p);
            }
            if self.tenants.len() >= p.max_tenants {
                self.folded_events = self.folded_events.saturating_add(1);
                return (self.other.get_or_insert_with(|| KeyState::new(t, p)), true);
            }
            // The id is copied once, when its key is made, not at every event.
            self.tenants.insert(Box::from(tenant), KeyState::new(t, p));
        }
        match self.tenants.get_mut(tenant) {
            Some(state) => (state, false),
            // Inserted just above; never reached.
            None => (self.other.get_or_insert_with(|| KeyState::new(t, p)), true),
        }
    }

    /// Forgets tenants idle for [`IDLE_WINDOWS`] windows, at most once a window (a flood of
    /// new tenants at the cap does not make every event scan the map).
    #[cold]
    fn sweep(&mut self, t: u64, p: &Params) {
        let window = t / p.window_ms;
        if self.swept_in == Some(window) {
            return;
        }
        self.swept_in = Some(window);
        let idle = p.window_ms.saturating_mul(IDLE_WINDOWS);
        self.tenants
            .retain(|_, k| t.saturating_sub(k.last_ms) < idle);
    }
}

/// The detector: per-signal keys and the rules. Not synchronised; [`AnomalySink`] holds it
/// behind a mutex.
pub struct Detector {
    params: Params,
    origin: Instant,
    signals: [SignalState; 7],
}

impl Detector {
    /// A detector whose time starts at `origin` (earlier instants count as `origin`).
    pub fn new(mut params: Params, origin: Instant) -> Detector {
        // The arithmetic divides by the window and compares counts with thresholds: hold the
        // bounds `Params::from_config` gives whatever a caller built.
        params.window_ms = params.window_ms.max(1);
        params.max_tenants = params.max_tenants.max(1);
        for t in &mut params.burst {
            *t = (*t).max(1);
        }
        Detector {
            params,
            origin,
            signals: Default::default(),
        }
    }

    pub fn params(&self) -> &Params {
        &self.params
    }

    /// Counts one event of `signal` in `ctx`'s tenant at `now`; anomalies that fire are
    /// appended to `out`.
    pub fn observe(
        &mut self,
        signal: AnomalySignal,
        ctx: &Context,
        now: Instant,
        out: &mut Vec<Anomaly>,
    ) {
        let t = self.millis(now);
        let p = &self.params;
        let threshold = p.burst[index(signal)];
        let state = &mut self.signals[index(signal)];
        let (key, folded) = state.key(ctx.tenant_id().unwrap_or(""), t, p);
        let fired = key.record(t, p, threshold);
        // `record` judged the rules at the key's newest time.
        let judged_after_ms = key.last_ms.saturating_sub(t);
        for f in fired.into_iter().flatten() {
            state.anomalies = state.anomalies.saturating_add(1);
            out.push(Anomaly {
                signal,
                rule: f.rule,
                folded,
                context: if folded { Context::none() } else { ctx.clone() },
                count: f.count,
                threshold: f.threshold,
                baseline: f.baseline,
                judged_after_ms,
            });
        }
    }

    /// Milliseconds after `origin` (an event's own time: it may be older than the latest
    /// seen, and is counted where it happened).
    fn millis(&self, now: Instant) -> u64 {
        let ms = now.saturating_duration_since(self.origin).as_millis();
        u64::try_from(ms).unwrap_or(u64::MAX)
    }

    /// Tenants tracked for `signal` (the `*other*` key not included).
    pub fn tracked(&self, signal: AnomalySignal) -> usize {
        self.signals[index(signal)].tenants.len()
    }

    /// The counters, for the stats JSON and the metrics.
    pub fn stats(&self) -> AnomalyStats {
        let by_signal: BTreeMap<&'static str, u64> = AnomalySignal::ALL
            .iter()
            .map(|&s| (s.name(), self.signals[index(s)].anomalies))
            .collect();
        let sum = |f: fn(&SignalState) -> u64| {
            self.signals
                .iter()
                .fold(0u64, |a, s| a.saturating_add(f(s)))
        };
        AnomalyStats {
            enabled: true,
            anomalies: Some(sum(|s| s.anomalies)),
            by_signal: Some(by_signal),
            folded_events: Some(sum(|s| s.folded_events)),
        }
    }
}

/// The detector's counters in `kvh_stats_json` (its `anomaly` field). With the detector off
/// only `enabled: false` is there, so the metrics of a process without a detector are absent
/// rather than zero.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct AnomalyStats {
    pub enabled: bool,
    /// Anomaly records emitted, all signals.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub anomalies: Option<u64>,
    /// Anomaly records emitted, by signal (every signal present).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub by_signal: Option<BTreeMap<&'static str, u64>>,
    /// Counts made under `*other*` because the signal already tracked the most tenants: one
    /// per signal an event counts for (a failed verification that read residue counts twice).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub folded_events: Option<u64>,
}

impl AnomalyStats {
    /// The stats of a process without the detector (`KVH_ANOMALY=off`).
    pub fn disabled() -> Self {
        AnomalyStats::default()
    }
}

/// Where the detector reads the time.
pub trait Clock: Send + Sync {
    fn now(&self) -> Instant;
}

/// The monotonic clock.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// A clock that moves only when told (tests, simulations).
pub struct ManualClock {
    origin: Instant,
    offset_ms: AtomicU64,
}

impl ManualClock {
    pub fn new() -> Arc<ManualClock> {
        Arc::new(ManualClock {
            origin: Instant::now(),
            offset_ms: AtomicU64::new(0),
        })
    }

    /// The instant the clock started at.
    pub fn origin(&self) -> Instant {
        self.origin
    }

    pub fn advance(&self, by: Duration) {
        let ms = u64::try_from(by.as_millis()).unwrap_or(u64::MAX);
        let _ = self
            .offset_ms
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |o| {
                Some(o.saturating_add(ms).min(MANUAL_CLOCK_MAX_MS))
            });
    }
}

/// The furthest a [`ManualClock`] goes (a century): every `Instant` platform adds that much.
const MANUAL_CLOCK_MAX_MS: u64 = 100 * 365 * 24 * 3600 * 1000;

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        let offset = Duration::from_millis(self.offset_ms.load(Ordering::SeqCst));
        self.origin.checked_add(offset).unwrap_or(self.origin)
    }
}

/// The detector layer: an [`EventSink`] that forwards every event to `downstream` unchanged
/// and follows each one that tripped a rule with an `anomaly` event.
pub struct AnomalySink {
    downstream: Option<Arc<dyn EventSink>>,
    detector: Mutex<Detector>,
    clock: Arc<dyn Clock>,
}

impl AnomalySink {
    /// The layer with `params`, reading time from `clock`.
    pub fn new(
        params: Params,
        downstream: Option<Arc<dyn EventSink>>,
        clock: Arc<dyn Clock>,
    ) -> Arc<AnomalySink> {
        let detector = Mutex::new(Detector::new(params, clock.now()));
        Arc::new(AnomalySink {
            downstream,
            detector,
            clock,
        })
    }

    fn detector(&self) -> MutexGuard<'_, Detector> {
        // Plain counters: a panic elsewhere while it was held leaves nothing half-done that
        // matters more than losing the detector would.
        self.detector.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn stats(&self) -> AnomalyStats {
        self.detector().stats()
    }

    /// Tenants tracked for `signal`.
    pub fn tracked(&self, signal: AnomalySignal) -> usize {
        self.detector().tracked(signal)
    }

    fn forward(&self, event: Event) {
        if let Some(d) = &self.downstream {
            d.emit(event);
        }
    }

    /// Forwards `event`, then counts it toward its signals as having happened at `now`.
    fn emit_at(&self, event: Event, now: Instant) {
        let signals = signals_of(&event.kind);
        if signals.is_empty() {
            return self.forward(event);
        }
        // A caller bug (a refused or mismatched free) counts for the caller's tenant, whoever
        // owned the block it aimed at; every other signal for the event's own ids.
        let context = match &event.kind {
            EventKind::InvalidFree { caller, .. } | EventKind::SizeMismatch { caller, .. } => {
                caller.clone()
            }
            _ => event.context.clone(),
        };
        let at = event.at;
        // The event first, before the detector looks at it: whatever happens in the detector,
        // the security event itself has reached the log (invariant 5), and the anomaly record
        // follows it in this thread's order.
        self.forward(event);
        let mut fired = Vec::new();
        let window_ms = {
            let mut d = self.detector();
            for &s in signals {
                d.observe(s, &context, now, &mut fired);
            }
            d.params().window_ms
        };
        for a in fired {
            self.forward(a.into_event(window_ms, at));
        }
    }
}

impl EventSink for AnomalySink {
    fn emit(&self, event: Event) {
        // Timed before it is passed on: a sink that holds it (a full log queue waits) must not
        // move it in time, next to events that happened later.
        let now = self.clock.now();
        self.emit_at(event, now);
    }

    fn emit_all(&self, events: Vec<Event>) {
        // One pool operation's events happened together: timed once, so a sink behind that
        // holds the first back does not count the rest windows later (a burst split in two).
        let now = self.clock.now();
        for event in events {
            self.emit_at(event, now);
        }
    }

    fn flush(&self) {
        if let Some(d) = &self.downstream {
            d.flush();
        }
    }
}

/// The sink the allocator gets, and the detector in it.
pub struct Layered {
    /// `downstream` itself when the detector is off.
    pub sink: Option<Arc<dyn EventSink>>,
    pub detector: Option<Arc<AnomalySink>>,
}

impl Layered {
    /// The `anomaly` field of the stats JSON.
    pub fn stats_json(&self) -> Option<serde_json::Value> {
        let stats = self
            .detector
            .as_ref()
            .map_or_else(AnomalyStats::disabled, |d| d.stats());
        serde_json::to_value(stats).ok()
    }
}

/// Puts the detector in front of `downstream` when `cfg` enables it, on the monotonic clock.
pub fn layer(cfg: &AnomalyConfig, downstream: Option<Arc<dyn EventSink>>) -> Layered {
    if !cfg.enabled {
        return Layered {
            sink: downstream,
            detector: None,
        };
    }
    let detector = AnomalySink::new(Params::from_config(cfg), downstream, Arc::new(SystemClock));
    Layered {
        sink: Some(detector.clone() as Arc<dyn EventSink>),
        detector: Some(detector),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{
        BlockRef, InvalidFreeReason, KvScrubRecord, MemorySink, ReleaseReason, TtlKind,
    };
    use std::time::SystemTime;

    #[test]
    fn empty_windows_in_closed_form_match_them_one_by_one() {
        for (mean, var, windows) in [(10_000.0, 0.0, 1), (3.5, 2.25, 40), (0.0, 0.0, 7)] {
            for k in [1, 2, 5, 64, 300] {
                let mut one_by_one = Ewma { mean, var, windows };
                for _ in 0..k {
                    one_by_one.push(0.0);
                }
                let mut closed = Ewma { mean, var, windows };
                closed.push_zeros(k);
                let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0);
                assert!(
                    close(closed.mean, one_by_one.mean),
                    "mean after {k}: {closed:?} vs {one_by_one:?}"
                );
                assert!(
                    close(closed.var, one_by_one.var),
                    "var after {k}: {closed:?} vs {one_by_one:?}"
                );
                assert_eq!(closed.windows, one_by_one.windows);
            }
        }
        // A first window of nothing is pushed as one, as `push` starts a baseline.
        let mut fresh = Ewma {
            mean: 0.0,
            var: 0.0,
            windows: 0,
        };
        fresh.push_zeros(3);
        assert_eq!((fresh.mean, fresh.var, fresh.windows), (0.0, 0.0, 3));
    }

    const W: u64 = 10_000;

    fn params() -> Params {
        Params::from_config(&AnomalyConfig::default())
    }

    fn tenant(t: &str) -> Context {
        Context::new(Some(t), Some("req"), Some("model")).unwrap()
    }

    /// A detector at time 0 and a function giving the instant `ms` after it.
    fn detector(p: Params) -> (Detector, impl Fn(u64) -> Instant) {
        let origin = Instant::now();
        (Detector::new(p, origin), move |ms| {
            origin + Duration::from_millis(ms)
        })
    }

    /// Counts `n` events of `signal` for `ctx` at `ms`; returns what fired.
    fn feed(
        d: &mut Detector,
        at: &impl Fn(u64) -> Instant,
        signal: AnomalySignal,
        ctx: &Context,
        ms: u64,
        n: u64,
    ) -> Vec<Anomaly> {
        let mut out = Vec::new();
        for _ in 0..n {
            d.observe(signal, ctx, at(ms), &mut out);
        }
        out
    }

    fn rules(out: &[Anomaly]) -> Vec<AnomalyRule> {
        out.iter().map(|a| a.rule).collect()
    }

    // ----- the mapping, one test per event kind ---------------------------------------

    fn signals(kind: EventKind) -> Vec<AnomalySignal> {
        signals_of(&kind).to_vec()
    }

    fn verify_failed(nonzero: u64) -> EventKind {
        EventKind::VerifyFailed {
            samples_expected: 64,
            samples_checked: 64,
            samples_nonzero: nonzero,
            coverage: 0.5,
            threshold: 0.999,
        }
    }

    fn kv_verify_failed(tally: KvTally) -> EventKind {
        EventKind::KvVerifyFailed {
            kv_block: 1,
            region: 0,
            addr: 0x1000,
            len: 4096,
            seed: 7,
            samples_expected: 64,
            samples_checked: 64,
            samples_nonzero: 0,
            coverage: 1.0,
            threshold: 0.999,
            tally,
        }
    }

    #[test]
    fn invalid_free_is_its_own_signal() {
        let kind = EventKind::InvalidFree {
            reason: InvalidFreeReason::DoubleFree,
            device: 0,
            caller: Context::none(),
        };
        assert_eq!(signals(kind), [AnomalySignal::InvalidFree]);
    }

    #[test]
    fn size_mismatch_is_its_own_signal() {
        let kind = EventKind::SizeMismatch {
            claimed: 3,
            caller: Context::none(),
        };
        assert_eq!(signals(kind), [AnomalySignal::SizeMismatch]);
    }

    #[test]
    fn verify_failed_is_also_residue_when_a_sample_read_non_zero() {
        assert_eq!(signals(verify_failed(0)), [AnomalySignal::VerifyFailed]);
        assert_eq!(
            signals(verify_failed(3)),
            [AnomalySignal::VerifyFailed, AnomalySignal::Residue]
        );
    }

    #[test]
    fn a_failed_kv_block_counts_once_as_verify_failed_and_residue_when_any_segment_saw_it() {
        let block = |residue| kv_verify_failed(KvTally::Block { residue });
        assert_eq!(signals(block(false)), [AnomalySignal::VerifyFailed]);
        assert_eq!(
            signals(block(true)),
            [AnomalySignal::VerifyFailed, AnomalySignal::Residue]
        );
        assert!(signals(kv_verify_failed(KvTally::Segment)).is_empty());
    }

    #[test]
    fn blocks_entering_quarantine_count_except_the_never_reuse_policys() {
        let q = |reason| {
            signals(EventKind::Quarantined {
                reason,
                retired_before: false,
            })
        };
        assert_eq!(
            q(QuarantineReason::Residue),
            [AnomalySignal::Residue, AnomalySignal::Quarantine]
        );
        assert_eq!(
            q(QuarantineReason::VerifyFailed),
            [AnomalySignal::Quarantine]
        );
        assert!(q(QuarantineReason::RescrubFailed).is_empty());
        assert_eq!(
            q(QuarantineReason::RescrubResidue),
            [AnomalySignal::Residue]
        );
        assert!(q(QuarantineReason::NeverReusePolicy).is_empty());
        // A block the never-reuse policy retired, whose re-scrub fails: its first quarantine
        // for a failure.
        let retired = |reason| {
            signals(EventKind::Quarantined {
                reason,
                retired_before: true,
            })
        };
        assert_eq!(
            retired(QuarantineReason::RescrubFailed),
            [AnomalySignal::Quarantine]
        );
        assert_eq!(
            retired(QuarantineReason::RescrubResidue),
            [AnomalySignal::Residue, AnomalySignal::Quarantine]
        );
    }

    #[test]
    fn ttl_exceeded_is_its_own_signal() {
        let kind = EventKind::TtlExceeded {
            which: TtlKind::Live,
            age_ms: 9,
            limit_ms: 1,
        };
        assert_eq!(signals(kind), [AnomalySignal::TtlExceeded]);
    }

    #[test]
    fn policy_violation_is_its_own_signal() {
        let kind = EventKind::PolicyViolation {
            policy: "kv_scrub",
            detail: "refused".into(),
        };
        assert_eq!(signals(kind), [AnomalySignal::PolicyViolation]);
    }

    #[test]
    fn releases_kv_scrub_records_and_anomalies_are_no_signal() {
        let release = EventKind::Released {
            reason: ReleaseReason::MaxReuse,
            leaked: false,
        };
        assert!(signals(release).is_empty());
        let kv = EventKind::KvScrubbed(Box::new(KvScrubRecord {
            device: 0,
            blocks: 1,
            verified_blocks: 0,
            failed_blocks: 1,
            segments: 2,
            unverified_segments: 0,
            bytes: 8192,
            first_seed: 1,
            stream: 0,
            regions: 2,
            block_bytes: 4096,
            block_stride: 4096,
            blocks_per_region: 1,
            layout_sha256: [0; 32],
            block_ids: None,
            block_ids_sha256: [0; 32],
            error: None,
            trigger: crate::events::KvScrubTrigger::Gate,
            unknown_owner_blocks: 0,
            owner_changed_blocks: 0,
            withdrawn_blocks: 0,
        }));
        assert!(
            signals(kv).is_empty(),
            "its failed segments are counted apart"
        );
        let anomaly = Anomaly {
            signal: AnomalySignal::Residue,
            rule: AnomalyRule::Burst,
            folded: false,
            context: Context::none(),
            count: 1,
            threshold: 1,
            baseline: None,
            judged_after_ms: 0,
        };
        let event = anomaly.into_event(W, SystemTime::now());
        assert!(
            signals(event.kind).is_empty(),
            "the detector never feeds itself"
        );
    }

    #[test]
    fn signal_indices_follow_all() {
        for (i, s) in AnomalySignal::ALL.iter().enumerate() {
            assert_eq!(index(*s), i, "{s:?}");
        }
        let p = params();
        assert_eq!(p.burst[index(AnomalySignal::Residue)], 1);
        assert_eq!(p.burst[index(AnomalySignal::InvalidFree)], 16);
        let scaled = Params::from_config(&AnomalyConfig {
            burst_scale: 0.01,
            ..AnomalyConfig::default()
        });
        assert!(scaled.burst.iter().all(|&b| b == 1), "{:?}", scaled.burst);
        let scaled = Params::from_config(&AnomalyConfig {
            burst_scale: 2.5,
            ..AnomalyConfig::default()
        });
        assert_eq!(scaled.burst[index(AnomalySignal::InvalidFree)], 40);
        // Residue stays at one reading, whatever the scale.
        for burst_scale in [1.0001, 2.5, 1000.0] {
            let scaled = Params::from_config(&AnomalyConfig {
                burst_scale,
                ..AnomalyConfig::default()
            });
            assert_eq!(
                scaled.burst[index(AnomalySignal::Residue)],
                1,
                "{burst_scale}"
            );
            let verify_failed = (2.0 * burst_scale).ceil() as u64;
            assert_eq!(
                scaled.burst[index(AnomalySignal::VerifyFailed)],
                verify_failed
            );
        }
    }

    // ----- burst ----------------------------------------------------------------------

    #[test]
    fn burst_fires_when_the_window_reaches_the_threshold() {
        let (mut d, at) = detector(params());
        let a = tenant("a");
        assert!(feed(&mut d, &at, AnomalySignal::InvalidFree, &a, 0, 15).is_empty());
        let out = feed(&mut d, &at, AnomalySignal::InvalidFree, &a, 100, 1);
        assert_eq!(out.len(), 1);
        let x = &out[0];
        assert_eq!(
            (x.signal, x.rule, x.count, x.threshold, x.folded),
            (
                AnomalySignal::InvalidFree,
                AnomalyRule::Burst,
                16,
                16,
                false
            )
        );
        assert_eq!(x.context.tenant_id(), Some("a"));
        assert_eq!(x.baseline, None);
        // One residue reading is already a burst.
        let out = feed(&mut d, &at, AnomalySignal::Residue, &a, 100, 1);
        assert_eq!(rules(&out), [AnomalyRule::Burst]);
    }

    #[test]
    fn a_burst_is_counted_per_tenant() {
        let (mut d, at) = detector(params());
        let (a, b) = (tenant("a"), tenant("b"));
        for i in 0..15 {
            assert!(feed(&mut d, &at, AnomalySignal::InvalidFree, &a, i, 1).is_empty());
            assert!(feed(&mut d, &at, AnomalySignal::InvalidFree, &b, i, 1).is_empty());
        }
        // Thirty events in the window, but fifteen each: no burst.
        let out = feed(&mut d, &at, AnomalySignal::InvalidFree, &b, 20, 1);
        assert_eq!(out[0].context.tenant_id(), Some("b"));
        assert!(feed(&mut d, &at, AnomalySignal::SizeMismatch, &a, 20, 15).is_empty());
    }

    #[test]
    fn the_window_slides_over_window_boundaries_and_forgets_old_events() {
        let (mut d, at) = detector(params());
        let a = tenant("a");
        // Fifteen events at 0.5 W and one at 1.2 W: within one window length of each other,
        // though in two different fixed windows.
        assert!(feed(&mut d, &at, AnomalySignal::InvalidFree, &a, W / 2, 15).is_empty());
        let out = feed(&mut d, &at, AnomalySignal::InvalidFree, &a, W + W / 5, 1);
        assert_eq!(rules(&out), [AnomalyRule::Burst]);
        // Fifteen events, then one more a whole window later: the fifteen have left.
        let (mut d, at) = detector(params());
        assert!(feed(&mut d, &at, AnomalySignal::InvalidFree, &a, 0, 15).is_empty());
        assert!(feed(&mut d, &at, AnomalySignal::InvalidFree, &a, W, 1).is_empty());
        // Fifteen in each of many windows: never sixteen in one.
        let (mut d, at) = detector(params());
        for w in 0..20 {
            assert!(feed(&mut d, &at, AnomalySignal::InvalidFree, &a, w * W, 15).is_empty());
        }
    }

    /// An event that arrives late, a whole window (ten slots) older than the key's newest,
    /// is outside the sliding window: it does not count towards a burst of the newer events.
    #[test]
    fn a_late_event_a_whole_window_old_is_outside_the_sliding_window() {
        let (mut d, at) = detector(params());
        let a = tenant("a");
        assert!(feed(&mut d, &at, AnomalySignal::InvalidFree, &a, W, 15).is_empty());
        let out = feed(&mut d, &at, AnomalySignal::InvalidFree, &a, 0, 1);
        assert!(out.is_empty(), "{out:?}");
        // One slot later it would still be in the window.
        let out = feed(&mut d, &at, AnomalySignal::InvalidFree, &a, W / SLOTS, 1);
        assert_eq!(rules(&out), [AnomalyRule::Burst]);
    }

    // ----- rate limit -------------------------------------------------------------------

    #[test]
    fn a_storm_is_one_burst_record_a_window() {
        let (mut d, at) = detector(params());
        let a = tenant("a");
        let mut bursts = Vec::new();
        // 1000 invalid frees per window, spread over it, for five windows.
        for i in 0..5000 {
            let ms = i * W / 1000;
            for x in feed(&mut d, &at, AnomalySignal::InvalidFree, &a, ms, 1) {
                assert_eq!(x.rule, AnomalyRule::Burst, "no surge during warm-up");
                bursts.push(ms);
            }
        }
        assert_eq!(bursts.len(), 5, "{bursts:?}");
        for pair in bursts.windows(2) {
            assert!(pair[1] - pair[0] >= W, "{bursts:?}");
        }
        assert_eq!(d.stats().anomalies, Some(5));
        assert_eq!(d.stats().by_signal.unwrap()["invalid_free"], 5);
    }

    // ----- surge ------------------------------------------------------------------------

    /// Params with bursts out of the way, so surges are seen alone.
    fn surge_params() -> Params {
        Params {
            burst: [u64::MAX; 7],
            ..params()
        }
    }

    #[test]
    fn surge_fires_far_above_the_baseline_after_the_warm_up() {
        let (mut d, at) = detector(surge_params());
        let a = tenant("a");
        let s = AnomalySignal::PolicyViolation;
        // Eight windows of 10, 12, 10, 12, ...: mean about 11, spread about √11.
        for w in 0..8 {
            let out = feed(&mut d, &at, s, &a, w * W, 10 + 2 * (w % 2));
            assert!(out.is_empty(), "window {w}: {out:?}");
        }
        let mut out = Vec::new();
        let mut fired_at = None;
        for i in 1..=100 {
            out = feed(&mut d, &at, s, &a, 8 * W + i, 1);
            if !out.is_empty() {
                fired_at = Some(i);
                break;
            }
        }
        let x = &out[0];
        assert_eq!(x.rule, AnomalyRule::Surge);
        let b = x.baseline.expect("a surge carries its baseline");
        assert!((10.0..12.0).contains(&b.mean), "{b:?}");
        assert_eq!(b.z_threshold, 4.0);
        // Fired at the first count above mean + 4 × spread, and said which count that was.
        let spread = b.stddev.max(b.mean.sqrt()).max(1.0);
        let needed = (b.mean + 4.0 * spread).floor() as u64 + 1;
        assert_eq!(fired_at, Some(needed));
        assert_eq!((x.count, x.threshold), (needed, needed));
        assert!(b.z_score > 4.0, "{b:?}");
        // Once per window, however far the count climbs.
        assert!(feed(&mut d, &at, s, &a, 8 * W + 500, 200).is_empty());
        // Quiet for a window after it fired, even in the next window (a storm crossing the
        // boundary is one record).
        assert!(feed(&mut d, &at, s, &a, 9 * W, 50).is_empty());
        // The storm widened the baseline's spread: the next window needs far more, once the
        // quiet window is over (it fired at most 100 ms into window 8).
        assert!(feed(&mut d, &at, s, &a, 9 * W + 100, 50).is_empty());
        assert_eq!(
            rules(&feed(&mut d, &at, s, &a, 9 * W + 100, 900)),
            [AnomalyRule::Surge]
        );
    }

    #[test]
    fn no_surge_during_the_warm_up() {
        let a = tenant("a");
        let s = AnomalySignal::InvalidFree;
        // `quiet` windows of one event each, then a window of 1000: what fires in it.
        let storm_after = |quiet: u64| {
            let (mut d, at) = detector(surge_params());
            for w in 0..quiet {
                assert!(feed(&mut d, &at, s, &a, w * W, 1).is_empty());
            }
            rules(&feed(&mut d, &at, s, &a, quiet * W, 1000))
        };
        // Seven finished windows: the warm-up needs eight.
        assert!(storm_after(7).is_empty());
        assert_eq!(storm_after(8), [AnomalyRule::Surge]);
    }

    #[test]
    fn a_quiet_signal_needs_the_minimum_count_to_surge() {
        let (mut d, at) = detector(surge_params());
        let a = tenant("a");
        let s = AnomalySignal::VerifyFailed;
        // One event, then twenty empty windows: a baseline of (almost) zero.
        assert!(feed(&mut d, &at, s, &a, 0, 1).is_empty());
        // Four events are infinitely many deviations of zero, but below the minimum count.
        assert!(feed(&mut d, &at, s, &a, 20 * W, 4).is_empty());
        let out = feed(&mut d, &at, s, &a, 20 * W, 1);
        assert_eq!(rules(&out), [AnomalyRule::Surge]);
        assert_eq!((out[0].count, out[0].threshold), (5, 5));
        // A raised minimum holds it back further.
        let (mut d, at) = detector(Params {
            surge_min_count: 50,
            ..surge_params()
        });
        assert!(feed(&mut d, &at, s, &a, 0, 1).is_empty());
        assert!(feed(&mut d, &at, s, &a, 20 * W, 49).is_empty());
        assert_eq!(
            rules(&feed(&mut d, &at, s, &a, 20 * W, 1)),
            [AnomalyRule::Surge]
        );
    }

    #[test]
    fn a_steady_rate_is_no_surge() {
        let (mut d, at) = detector(surge_params());
        let a = tenant("a");
        for w in 0..50 {
            // 100 a window, give or take 20 (√100 = 10 of Poisson noise, twice over).
            let n = 80 + (w * 37 % 41);
            assert!(feed(&mut d, &at, AnomalySignal::InvalidFree, &a, w * W, n).is_empty());
        }
    }

    // ----- bounded memory -----------------------------------------------------------------

    #[test]
    fn tenants_beyond_the_cap_fold_into_other() {
        let (mut d, at) = detector(Params {
            max_tenants: 2,
            ..params()
        });
        let s = AnomalySignal::Residue;
        for t in ["a", "b"] {
            assert!(!feed(&mut d, &at, s, &tenant(t), 0, 1)[0].folded);
        }
        assert_eq!(d.tracked(s), 2);
        // c and d share the `*other*` key: c's burst quiets d's in the same window.
        let out = feed(&mut d, &at, s, &tenant("c"), 0, 1);
        assert!(out[0].folded);
        assert_eq!(
            out[0].context,
            Context::none(),
            "a count of many tenants names none"
        );
        assert!(feed(&mut d, &at, s, &tenant("d"), 0, 1).is_empty());
        assert_eq!(d.tracked(s), 2);
        assert_eq!(d.stats().folded_events, Some(2));
        // Another signal has its own cap.
        assert!(!feed(&mut d, &at, AnomalySignal::Quarantine, &tenant("c"), 0, 4)[0].folded);
        // Known tenants keep their keys.
        assert!(!feed(&mut d, &at, s, &tenant("a"), W, 1)[0].folded);
    }

    #[test]
    fn idle_tenants_make_room_for_new_ones() {
        let (mut d, at) = detector(Params {
            max_tenants: 2,
            ..params()
        });
        let s = AnomalySignal::Residue;
        feed(&mut d, &at, s, &tenant("a"), 0, 1);
        feed(&mut d, &at, s, &tenant("b"), 0, 1);
        // Still recent: c folds.
        assert!(feed(&mut d, &at, s, &tenant("c"), W, 1)[0].folded);
        // a stays active; b goes idle for IDLE_WINDOWS windows and is forgotten.
        let later = IDLE_WINDOWS * W;
        feed(&mut d, &at, s, &tenant("a"), later - W, 1);
        let out = feed(&mut d, &at, s, &tenant("e"), later, 1);
        assert!(!out[0].folded, "{out:?}");
        assert_eq!(d.tracked(s), 2);
    }

    #[test]
    fn events_without_a_tenant_share_one_key() {
        let (mut d, at) = detector(params());
        let none = Context::none();
        assert!(feed(&mut d, &at, AnomalySignal::InvalidFree, &none, 0, 15).is_empty());
        let out = feed(&mut d, &at, AnomalySignal::InvalidFree, &none, 0, 1);
        assert_eq!(out[0].context.tenant_id(), None);
        assert!(!out[0].folded);
    }

    #[test]
    fn an_older_event_counts_where_it_happened() {
        let (mut d, at) = detector(params());
        let a = tenant("a");
        assert!(feed(&mut d, &at, AnomalySignal::InvalidFree, &a, 5 * W, 15).is_empty());
        // A little older (a thread that read the clock before another took the lock): in
        // the same window, so it counts, and the burst fires as of now.
        assert_eq!(
            feed(&mut d, &at, AnomalySignal::InvalidFree, &a, 5 * W - 1, 1).len(),
            1
        );
        // Windows older (an event held up on its way): outside the sliding window, so it
        // makes no burst with the events of now.
        let (mut d, at) = detector(params());
        assert!(feed(&mut d, &at, AnomalySignal::InvalidFree, &a, 5 * W, 15).is_empty());
        assert!(feed(&mut d, &at, AnomalySignal::InvalidFree, &a, 0, 1).is_empty());
    }

    #[test]
    fn parameters_out_of_bounds_are_clamped_not_a_panic() {
        let p = Params {
            window_ms: 0,
            burst: [0; 7],
            max_tenants: 0,
            ..params()
        };
        let (mut d, at) = detector(p);
        assert_eq!(d.params().window_ms, 1);
        // A threshold of 0 is read as 1: the first event fires.
        let a = tenant("a");
        assert_eq!(feed(&mut d, &at, AnomalySignal::Residue, &a, 0, 1).len(), 1);
        let clock = ManualClock::new();
        clock.advance(Duration::MAX);
        clock.advance(Duration::MAX);
        // Saturated at its bound, not wrapped nor fallen back to its origin.
        assert_eq!(
            clock.now().duration_since(clock.origin()),
            Duration::from_millis(MANUAL_CLOCK_MAX_MS)
        );
    }

    // ----- the sink -----------------------------------------------------------------------

    fn event(kind: EventKind, ctx: Context) -> Event {
        Event {
            at: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            kind,
            context: ctx,
            block: Some(BlockRef {
                id: 1,
                device: 0,
                addr: 0x1000,
                requested: 10,
                capacity: 512,
                scrub_seq: 3,
            }),
            addr: None,
        }
    }

    /// A burst fired by an event that reached the detector after a newer one of its key is
    /// dated when it was judged (the newer event's time), not at the late event's own: the
    /// log's records of one key and rule stand at least a window apart, as the detector
    /// fires them.
    #[test]
    fn a_burst_tripped_by_a_late_event_is_dated_when_it_was_judged() {
        let mem = MemorySink::new();
        let clock = ManualClock::new();
        let p = Params {
            window_ms: 1000,
            burst: [2; 7],
            ..params()
        };
        let sink = AnomalySink::new(p, Some(mem.clone()), clock.clone());
        let residue_at = |ms: u64| {
            let mut e = event(
                EventKind::Quarantined {
                    reason: QuarantineReason::Residue,
                    retired_before: false,
                },
                tenant("a"),
            );
            e.at += Duration::from_millis(ms);
            (e, clock.origin() + Duration::from_millis(ms))
        };
        // 1000 and 1001 fire; 2005 alone does not (the first two left its window); 1950,
        // timed before 2005 but reaching the detector after it, makes two in the window
        // judged at 2005, a window after the first burst.
        for ms in [1000, 1001, 2005, 1950] {
            let (e, now) = residue_at(ms);
            sink.emit_at(e, now);
        }
        let dates: Vec<u64> = mem
            .snapshot()
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
            .map(|e| {
                let base = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
                e.at.duration_since(base).unwrap().as_millis() as u64
            })
            .collect();
        assert_eq!(dates, [1001, 2005]);
    }

    #[test]
    fn the_sink_forwards_every_event_and_follows_a_tripping_one_with_its_anomaly() {
        let mem = MemorySink::new();
        let clock = ManualClock::new();
        let sink = AnomalySink::new(params(), Some(mem.clone()), clock.clone());
        let residue = event(
            EventKind::Quarantined {
                reason: QuarantineReason::Residue,
                retired_before: false,
            },
            tenant("a"),
        );
        let release = event(
            EventKind::Released {
                reason: ReleaseReason::IdleTtl,
                leaked: false,
            },
            tenant("a"),
        );
        sink.emit(release.clone());
        sink.emit(residue.clone());
        sink.emit(residue.clone());
        let got = mem.snapshot();
        assert_eq!(got.len(), 4, "{got:?}");
        assert_eq!(got[0], release);
        assert_eq!(got[1], residue);
        assert_eq!(got[3], residue);
        let EventKind::Anomaly {
            signal,
            rule,
            folded,
            window_ms,
            count,
            threshold,
            baseline,
        } = got[2].kind
        else {
            panic!("{:?}", got[2]);
        };
        assert_eq!(
            (signal, rule, folded, window_ms, count, threshold, baseline),
            (
                AnomalySignal::Residue,
                AnomalyRule::Burst,
                false,
                W,
                1,
                1,
                None
            )
        );
        assert_eq!(got[2].context, residue.context);
        assert_eq!(got[2].at, residue.at);
        assert!(got[2].kind.is_security());
        assert_eq!(
            (got[2].block, got[2].addr),
            (None, None),
            "no payload, no block"
        );
        // A window later the same tenant's residue is an anomaly again.
        clock.advance(Duration::from_millis(W));
        sink.emit(residue.clone());
        assert_eq!(mem.count("anomaly"), 2);
        let stats = sink.stats();
        assert_eq!(stats.anomalies, Some(2));
        assert_eq!(stats.by_signal.as_ref().unwrap()["residue"], 2);
        assert_eq!(stats.by_signal.as_ref().unwrap()["quarantine"], 0);
    }

    #[test]
    fn the_off_switch_leaves_the_downstream_sink_alone() {
        let mem = MemorySink::new();
        let downstream: Arc<dyn EventSink> = mem.clone();
        let off = AnomalyConfig {
            enabled: false,
            ..AnomalyConfig::default()
        };
        let l = layer(&off, Some(downstream.clone()));
        assert!(l.detector.is_none());
        let sink = l.sink.clone().expect("the downstream sink");
        assert!(Arc::ptr_eq(&sink, &downstream));
        for _ in 0..10 {
            sink.emit(event(
                EventKind::Quarantined {
                    reason: QuarantineReason::Residue,
                    retired_before: false,
                },
                tenant("a"),
            ));
        }
        assert_eq!(mem.count("anomaly"), 0);
        assert_eq!(
            l.stats_json(),
            Some(serde_json::json!({ "enabled": false }))
        );
        // Off and nothing downstream: no sink at all, as before the layer existed.
        assert!(layer(&off, None).sink.is_none());
        // On, with nothing downstream: the detector still counts.
        let on = layer(&AnomalyConfig::default(), None);
        let sink = on.sink.clone().expect("the detector");
        sink.emit(event(
            EventKind::Quarantined {
                reason: QuarantineReason::Residue,
                retired_before: false,
            },
            tenant("a"),
        ));
        let json = on.stats_json().unwrap();
        assert_eq!(json["enabled"], true);
        assert_eq!(json["anomalies"], 1);
        assert_eq!(json["by_signal"]["residue"], 1);
        assert_eq!(json["by_signal"].as_object().unwrap().len(), 7);
        assert_eq!(json["folded_events"], 0);
    }

    #[test]
    fn flush_reaches_the_downstream_sink() {
        struct Flushes(AtomicU64);
        impl EventSink for Flushes {
            fn emit(&self, _: Event) {}
            fn flush(&self) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let f = Arc::new(Flushes(AtomicU64::new(0)));
        let sink = AnomalySink::new(params(), Some(f.clone()), Arc::new(SystemClock));
        sink.flush();
        assert_eq!(f.0.load(Ordering::SeqCst), 1);
    }

    // ----- property -------------------------------------------------------------------------

    mod property {
        use super::*;
        use proptest::prelude::*;
        use std::collections::HashSet;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(64))]

            /// Whatever the event sequence, no (signal, key, rule) gets two records in one
            /// window, and two bursts of a key are at least a window apart.
            #[test]
            fn at_most_one_record_per_key_rule_and_window(
                steps in prop::collection::vec((0u64..2_000, 0usize..4, 0usize..7, 1u64..40), 1..200),
                max_tenants in 1usize..4,
            ) {
                let (mut d, at) = detector(Params {
                    max_tenants,
                    warmup_windows: 2,
                    surge_min_count: 1,
                    z: 1.0,
                    window_ms: 1_000,
                    ..params()
                });
                let tenants = ["a", "b", "c", "d"].map(tenant);
                let mut t = 0;
                let mut seen = HashSet::new();
                let mut last_burst: HashMap<(AnomalySignal, Option<String>, bool), u64> = HashMap::new();
                for (dt, who, signal, n) in steps {
                    t += dt;
                    let signal = AnomalySignal::ALL[signal];
                    for a in feed(&mut d, &at, signal, &tenants[who], t, n) {
                        let key = (a.signal, a.context.tenant_id().map(str::to_string), a.folded);
                        let window = t / 1_000;
                        prop_assert!(
                            seen.insert((key.clone(), a.rule, window)),
                            "two {:?} records for {key:?} in window {window}", a.rule
                        );
                        if a.rule == AnomalyRule::Burst {
                            if let Some(prev) = last_burst.insert(key, t) {
                                prop_assert!(t - prev >= 1_000);
                            }
                        }
                        prop_assert!(a.count >= a.threshold);
                    }
                }
            }
        }
    }
}

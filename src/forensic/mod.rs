//! The forensic log: a hash-chained, HMAC-sealed, forward-secure, rotated and verifiable
//! record of every security event, written off the allocation path.
//!
//! - [`record`]: schema and canonical form; [`keys`]: HMAC key ratchet and Ed25519 keys;
//! - [`files`]: naming, modes, ownership, locks; [`lines`]: chain files read a line at a
//!   time; [`recovery`]: torn tails and crashed chains;
//! - `writer`: the writer thread behind a bounded queue; [`checkpoint`]: signed heads;
//! - [`verify`]: `verify_all`, the code behind `kvh verify-log`; [`cli`]: the CLI verbs.
//!
//! `docs/forensic-log.md` describes the format precisely enough to verify it independently.

pub mod checkpoint;
pub mod cli;
pub mod evidence;
pub mod files;
mod key_memory;
pub mod keys;
pub mod lines;
pub mod period;
pub mod prune;
pub mod record;
pub mod recovery;
pub mod scan;
pub mod tail;
pub mod verify;
mod writer;

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use std::borrow::Cow;

use serde_json::Value;
use zeroize::Zeroizing;

use crate::config::LogConfig;
use crate::events::{
    AnomalyBaseline, Event, EventKind, EventSink, InvalidFreeReason, KvScrubTrigger,
    QuarantineReason, ReleaseReason, TtlKind,
};

use record::{Field, Fields};
pub use verify::{verify_all, Report, SealKey, VerifyOptions};
pub use writer::MIN_FILE_SIZE_LIMIT;

/// Errors of opening or running the log.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ForensicError {
    #[error("forensic log: {0}")]
    Io(String),
    #[error("forensic log: {0}")]
    Permission(String),
    #[error("forensic log key: {0}")]
    Key(String),
}

/// What the `start` record says about the process.
#[derive(Clone, Debug)]
pub struct StartInfo {
    /// `Config::canonical_json()`; the record carries its SHA-256, not the text.
    pub config_json: String,
    pub version: String,
    pub pid: u32,
    pub host: String,
}

impl StartInfo {
    /// This process's pid and host name, with the given config JSON and crate version.
    pub fn current(config_json: String) -> Self {
        StartInfo {
            config_json,
            version: env!("CARGO_PKG_VERSION").to_string(),
            pid: std::process::id(),
            host: host_name(),
        }
    }

    /// The `config_digest` of the `start` record: SHA-256 of the configuration JSON, in hex.
    pub fn config_digest(&self) -> String {
        config_digest(&self.config_json)
    }
}

/// SHA-256 of a policy's `Config::canonical_json()`, in lower-case hex: what `start` records
/// carry as `config_digest` (and `kvh config` prints, to match a reviewed policy to a run).
pub fn config_digest(config_json: &str) -> String {
    use sha2::{Digest, Sha256};
    record::hex(&Sha256::digest(config_json.as_bytes()))
}

fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for `len` bytes; gethostname writes at most that many.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return String::new();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// Counters of the log, for the allocator's stats JSON.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct LogStats {
    pub enabled: bool,
    /// Why logging is off, when it is.
    pub disabled_reason: Option<String>,
    pub chain: Option<String>,
    pub current_file: Option<String>,
    pub records_written: u64,
    /// Times a producer found the queue full and waited (security events are never dropped).
    pub producer_waits: u64,
    /// Summaries replaced by a newer one before they were written.
    pub summaries_coalesced: u64,
    pub write_errors: u64,
    /// Records that could not be written (disk errors), arrived after `stop`, were still
    /// queued when the writer ended, or were in the hands of a writer thread that panicked.
    pub records_lost: u64,
    pub bytes_lost: u64,
    /// The most recent write error, kept after the disk recovers.
    pub last_error: Option<String>,
    /// Bytes any writer may still write on the log directory's file system, as the writer
    /// measured it last (at start, then about every second): absent where the file system
    /// states no size, or before a measurement succeeded. A root process may also fill
    /// ext4's reserve for root, which this leaves out (`files::free_space`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub free_bytes: Option<u64>,
}

impl LogStats {
    /// The stats of a process that logs nothing (`KVH_LOG_DIR` unset).
    pub fn disabled() -> Self {
        LogStats {
            disabled_reason: Some("KVH_LOG_DIR is not set".into()),
            ..Default::default()
        }
    }
}

/// The summary waiting to be written: the latest counters (a newer one replaces them), and
/// whether the writer has taken its last one (`closed`: a summary put after that would never
/// be written). One lock, so that a summary is either taken by the writer's last drain or
/// seen to be too late, never lost between the two.
#[derive(Default)]
pub(crate) struct SummarySlot {
    pub(crate) counters: Option<Value>,
    pub(crate) closed: bool,
    /// The last summary before `stop` was put ([`ForensicLog::record_final_summary`]): a
    /// periodic one put after it holds counters read before it, and does not replace it.
    pub(crate) final_put: bool,
}

/// Who puts a summary, which decides what happens to it late or beside another.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Summary {
    /// A caller's: counted lost when the log no longer takes it.
    Owed,
    /// The library's periodic one: none is due once the log stops.
    Periodic,
    /// The library's last one before `stop`.
    Final,
}

/// State shared by producers and the writer thread.
#[derive(Default)]
pub(crate) struct Shared {
    records_written: AtomicU64,
    producer_waits: AtomicU64,
    summaries_coalesced: AtomicU64,
    write_errors: AtomicU64,
    records_lost: AtomicU64,
    bytes_lost: AtomicU64,
    last_error: Mutex<Option<String>>,
    /// The writer's last measure of the room on the log's file system.
    pub(crate) free_bytes: Room,
    current_file: Mutex<Option<String>>,
    chain: Mutex<Option<String>>,
    summary: Mutex<SummarySlot>,
    /// Test hook: the next this-many writes fail after writing half their bytes.
    injected_faults: AtomicU32,
    /// Test hook: the next this-many fsyncs of the log file fail with `EIO`.
    injected_fsync_faults: AtomicU32,
    /// Test hook: the next this-many fsyncs of the log directory fail with `EIO`.
    injected_dir_fsync_faults: AtomicU32,
    /// Test hook: the next write of the log file panics, as a bug in the writer would.
    injected_panic: AtomicBool,
    /// Records producers began to queue (`Event`, `Anomaly`), counted before their send: a
    /// flush waits until the writer has handled this many.
    records_queued: AtomicU64,
    /// Rounds the writer began (each takes what is queued, then the waiting summary, then
    /// writes): a flush also waits for a round begun after it, for a summary put before it.
    rounds_begun: AtomicU64,
    /// A `stop` asked the writer to end (with the start-up's error when it failed). A flag
    /// rather than a message: a queue kept full by producers has no slot to spare for it.
    stop_request: Mutex<Option<StopRequest>>,
    /// How far the writer has come, for `flush` and `stop` to wait on.
    progress: Mutex<Progress>,
    progress_cv: std::sync::Condvar,
}

/// Bytes left on a file system, as last measured; none before a measurement, or for a file
/// system that states no size. One atomic, so that a stats call never waits on the writer.
pub(crate) struct Room(AtomicU64);

impl Room {
    /// The value that stands for no measure: no file system states that many bytes free.
    const NONE: u64 = u64::MAX;

    pub(crate) fn set(&self, bytes: Option<u64>) {
        let v = bytes.map_or(Self::NONE, |b| b.min(Self::NONE - 1));
        self.0.store(v, Ordering::Relaxed);
    }

    pub(crate) fn get(&self) -> Option<u64> {
        Some(self.0.load(Ordering::Relaxed)).filter(|&b| b != Self::NONE)
    }
}

impl Default for Room {
    fn default() -> Self {
        Room(AtomicU64::new(Self::NONE))
    }
}

/// What `stop` asks of the writer.
pub(crate) struct StopRequest {
    /// The start-up's error, for the `stop` record's `start_failed`.
    pub(crate) start_failed: Option<String>,
}

#[derive(Default)]
struct Progress {
    /// Records (`Event`, `Anomaly`) the writer has taken from the queue, and tried to write.
    records_handled: u64,
    /// The last round the writer ended (numbered as `rounds_begun` counts them).
    rounds_done: u64,
    /// The writer thread has ended (after its `stop` record, or a panic).
    writer_ended: bool,
    /// The first `stop` has returned (the writer ended, or its wait ran out).
    first_returned: bool,
}

impl Shared {
    fn update_progress(&self, f: impl FnOnce(&mut Progress)) {
        f(&mut lock(&self.progress));
        self.progress_cv.notify_all();
    }

    /// Waits up to `limit` until `done` holds of the writer's progress, or the writer ended.
    fn wait_for_writer(&self, limit: Duration, done: impl Fn(&Progress) -> bool) {
        let state = lock(&self.progress);
        let _ = self
            .progress_cv
            .wait_timeout_while(state, limit, |p| !p.writer_ended && !done(p));
    }

    /// The writer's side of `flush`: a round begins; returns its number.
    pub(crate) fn begin_round(&self) -> u64 {
        self.rounds_begun.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// The writer's side of `flush`: round `round` ended, and every record counted in
    /// `handled` was taken from the queue and its write tried.
    pub(crate) fn round_done(&self, round: u64, handled: u64) {
        self.update_progress(|p| {
            p.records_handled = handled;
            p.rounds_done = round;
        });
    }

    /// The writer's side of `stop`: the request, once.
    pub(crate) fn take_stop_request(&self) -> Option<StopRequest> {
        lock(&self.stop_request).take()
    }
}

/// Marks the writer thread ended when dropped: at the end of its run, or when it unwinds.
struct WriterDone(Arc<Shared>);

impl Drop for WriterDone {
    fn drop(&mut self) {
        self.0.update_progress(|p| p.writer_ended = true);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What producers send to the writer thread.
pub(crate) enum Msg {
    Event(Queued<Event>),
    Anomaly(Queued<(Value, crate::context::Context, u64)>),
    /// Look at the summary slot, the flush tickets and the stop request now, rather than at
    /// the next tick.
    Wake,
}

/// A record on its way to the writer, counted in `records_lost` if it is dropped unwritten:
/// refused by a stopped log or a forked child, or still in the queue when the writer ended
/// (a producer that raced with `stop` queued it after the writer's last drain, and the queue
/// dropped it). Invariant 5: no record vanishes without being counted.
pub(crate) struct Queued<T> {
    item: Option<T>,
    shared: Arc<Shared>,
}

impl<T> Queued<T> {
    fn new(item: T, shared: &Arc<Shared>) -> Self {
        Queued {
            item: Some(item),
            shared: shared.clone(),
        }
    }

    /// The record, to be written: it is no longer counted as lost.
    pub(crate) fn take(mut self) -> Option<T> {
        self.item.take()
    }
}

impl<T> Drop for Queued<T> {
    fn drop(&mut self) {
        if self.item.is_some() {
            self.shared.records_lost.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The forensic log. One per process; cheap to share behind an `Arc`.
pub struct ForensicLog {
    tx: SyncSender<Box<Msg>>,
    shared: Arc<Shared>,
    stopped: AtomicBool,
    thread: Mutex<Option<JoinHandle<()>>>,
    /// The process that opened the log. A forked child inherits the queue but not the writer
    /// thread: nothing would ever drain it, so the child must never wait on it.
    pid: u32,
}

/// Largest value of one field a record carries whole, as written (a string escaped, in its
/// quotes; JSON in canonical form): the JSON an engine hands the log (an anomaly's `detail`, a summary's
/// `counters`), a text an `Event` carries. A larger JSON value is recorded as
/// `{"omitted": .., "bytes": N, "sha256": ..}`, a larger text as a text saying the same, so
/// that every record stays far shorter than the longest line a reader holds
/// ([`lines::MAX_LINE_BYTES`]): readers need memory for a record, not for a file.
pub const MAX_FIELD_BYTES: usize = 1 << 20;

/// How long the first `stop` waits for the writer's last write and its end.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest [`ForensicLog::flush`] waits for the writer.
pub const FLUSH_TIMEOUT: Duration = Duration::from_secs(30);

/// Nanoseconds since the Unix epoch (0 before it).
pub fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

impl ForensicLog {
    /// Opens the log described by `cfg`: `Ok(None)` when `cfg.dir` is unset (logging is off;
    /// the caller says so once on stderr and reports [`LogStats::disabled`]). The HMAC secret
    /// comes from `FORENSIC_HMAC_SECRET` (removed from the environment) or `cfg.hmac_key_file`.
    pub fn open(cfg: &LogConfig, start: StartInfo) -> Result<Option<Arc<Self>>, ForensicError> {
        if cfg.dir.is_none() {
            keys::discard_env_secret();
            return Ok(None);
        }
        // Reading the secret parses it (a seed's hex, refused as the secret) on this thread.
        let key =
            key_memory::with_stack_cleared(|| keys::load_secret(cfg.hmac_key_file.as_deref()))?;
        Self::open_with_key(cfg, start, key).map(Some)
    }

    /// Like [`ForensicLog::open`] with the HMAC secret given directly (the environment and
    /// the key file are not consulted). `cfg.dir` must be set.
    pub fn open_with_secret(
        cfg: &LogConfig,
        start: StartInfo,
        secret: Option<Zeroizing<Vec<u8>>>,
    ) -> Result<Arc<Self>, ForensicError> {
        let key = secret.map(keys::EpochKey::from_secret).transpose()?;
        Self::open_with_key(cfg, start, key)
    }

    fn open_with_key(
        cfg: &LogConfig,
        start: StartInfo,
        key: Option<keys::EpochKey>,
    ) -> Result<Arc<Self>, ForensicError> {
        // Checked before anything is created: the policy's parser bounds it, a `LogConfig`
        // built directly is not, and a queue too large to allocate would abort the process.
        if !(1..=crate::config::LOG_QUEUE_MAX).contains(&cfg.queue_capacity) {
            return Err(ForensicError::Io(format!(
                "queue capacity {} is outside 1..={} records",
                cfg.queue_capacity,
                crate::config::LOG_QUEUE_MAX
            )));
        }
        let shared = Arc::new(Shared::default());
        // The opening computes with both keys (a crashed chain's MAC, the key id, the first
        // checkpoint), on the caller's thread, which goes on to serve.
        let chain = key_memory::with_stack_cleared(|| {
            writer::ChainWriter::open(cfg, &start, key, shared.clone())
        })?;
        // Boxed: a bounded channel allocates and touches all its slots when it is made, so a
        // slot is a pointer, not a whole message (a queue of 2^22 takes 64 MiB, not 800).
        let (tx, rx) = mpsc::sync_channel(cfg.queue_capacity);
        let done = WriterDone(shared.clone());
        let thread = std::thread::Builder::new()
            .name("kvh-forensic".into())
            .spawn(move || {
                let _done = done;
                chain.run(rx)
            })
            .map_err(|e| ForensicError::Io(format!("cannot start the writer thread: {e}")))?;
        Ok(Arc::new(ForensicLog {
            tx,
            shared,
            stopped: AtomicBool::new(false),
            thread: Mutex::new(Some(thread)),
            pid: std::process::id(),
        }))
    }

    /// Whether this is a forked child of the process that opened the log (which has no
    /// writer thread: the fork copied only the calling thread).
    fn forked(&self) -> bool {
        std::process::id() != self.pid
    }

    /// Queues a record; waits (counted) rather than drop it when the queue is full. A
    /// record that cannot be queued is dropped here, and counted lost by its [`Queued`].
    fn send(&self, msg: Msg) {
        if self.stopped.load(Ordering::Acquire) || self.forked() {
            return;
        }
        // Counted before the send, so that a flush on this thread, later, waits for it.
        self.shared.records_queued.fetch_add(1, Ordering::SeqCst);
        match self.tx.try_send(Box::new(msg)) {
            Ok(()) => {}
            Err(TrySendError::Full(msg)) => {
                self.shared.producer_waits.fetch_add(1, Ordering::Relaxed);
                let _ = self.tx.send(msg);
            }
            Err(TrySendError::Disconnected(_)) => {}
        }
    }

    /// Wakes the writer now rather than at its next tick; a full queue needs no wake.
    fn wake(&self) {
        let _ = self.tx.try_send(Box::new(Msg::Wake));
    }

    /// Records periodic counters (up to [`MAX_FIELD_BYTES`] in canonical form, as
    /// [`ForensicLog::record_anomaly`]'s detail). Summaries waiting to be written are
    /// replaced by newer ones (counted as coalesced); at most one is written per
    /// `summary_interval_ms`.
    pub fn record_summary(&self, counters: Value) {
        self.summary(counters, Summary::Owed);
    }

    /// [`ForensicLog::record_summary`] for the library's own summaries (its periodic thread,
    /// the last one before `stop`): once the log stopped none is due, so none is lost.
    /// Returns whether the log still takes summaries.
    pub fn record_own_summary(&self, counters: Value) -> bool {
        self.summary(counters, Summary::Periodic)
    }

    /// The library's last summary before `stop`, of counters read after every periodic one
    /// it replaces: a periodic summary put after it (its counters read before, on a thread
    /// that raced the stop) is dropped rather than replace it.
    pub fn record_final_summary(&self, counters: Value) -> bool {
        self.summary(counters, Summary::Final)
    }

    /// Puts `counters` in the summary slot; after `stop` began (one check, so that a stop
    /// racing the call is judged once), counts it lost when `owed`. Returns whether the log
    /// took it.
    fn summary(&self, counters: Value, kind: Summary) -> bool {
        let owed = kind == Summary::Owed;
        if self.forked() {
            self.shared.records_lost.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        // After `stop` began (or the writer took its last summary), as any record then, an
        // owed summary is lost and counted.
        let replaced = {
            let mut slot = lock(&self.shared.summary);
            if slot.closed || self.stopped.load(Ordering::Acquire) {
                drop(slot);
                if owed {
                    self.shared.records_lost.fetch_add(1, Ordering::Relaxed);
                }
                return false;
            }
            match kind {
                Summary::Periodic if slot.final_put => return false,
                Summary::Final => slot.final_put = true,
                _ => {}
            }
            slot.counters.replace(counters).is_some()
        };
        if replaced {
            self.shared
                .summaries_coalesced
                .fetch_add(1, Ordering::Relaxed);
        } else {
            // A full queue will be drained soon anyway: the writer checks the slot each round.
            self.wake();
        }
        true
    }

    /// Whether `stop` has begun.
    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::Acquire)
    }

    /// Records an anomaly (kind `anomaly`) with the calling thread's context; `detail` is
    /// any JSON (non-integer numbers are stored as strings) of up to
    /// [`MAX_FIELD_BYTES`] in canonical form: a larger one is recorded by its size
    /// and SHA-256. Never dropped.
    pub fn record_anomaly(&self, detail: Value) {
        let at = unix_nanos(SystemTime::now());
        let record = (detail, crate::context::Context::current(), at);
        self.send(Msg::Anomaly(Queued::new(record, &self.shared)));
    }

    /// Waits until everything queued before the call is written (not necessarily fsynced;
    /// a summary when it is due), for at most [`FLUSH_TIMEOUT`]. Never waits for room in the
    /// queue: it waits for the writer to have handled as many records as were queued before
    /// it, which, the queue being first in, first out, includes every record this thread
    /// queued, and to have ended a round begun after the call (which looked at the summary
    /// slot). Its wake-up for the writer is sent only when the queue has room (a full queue
    /// keeps the writer busy anyway). While another thread stops the log, it waits for the
    /// writer to write what was queued before the call (the stop drains the queue), or to end.
    pub fn flush(&self) {
        if self.forked() {
            return;
        }
        let ticket = self.shared.records_queued.load(Ordering::SeqCst);
        if self.stopped.load(Ordering::Acquire) {
            // A fail-closed stop flushes its record and aborts: while `kvh_shutdown` or an
            // exit handler stops the log, that record is still written, and waited for.
            // A stop that already returned, having given up on a stuck writer, is not
            // waited for again.
            self.shared.wait_for_writer(FLUSH_TIMEOUT, |p| {
                p.records_handled >= ticket || p.first_returned
            });
            return;
        }
        let round = self.shared.rounds_begun.load(Ordering::SeqCst) + 1;
        self.wake();
        // Bounded: a writer held by a hung disk never gets there, and a fail-closed stop
        // flushes before it aborts.
        self.shared.wait_for_writer(FLUSH_TIMEOUT, |p| {
            p.records_handled >= ticket && p.rounds_done >= round
        });
    }

    /// Writes the `stop` record and the final checkpoint, flushes and joins the writer.
    /// Idempotent; never panics; safe from an exit handler; returns within about 10 s even
    /// when the disk hangs. A no-op in a forked child: the chain belongs to the parent.
    pub fn stop(&self) {
        self.stop_within(STOP_TIMEOUT, None);
    }

    /// [`ForensicLog::stop`] for a process whose start-up failed after the log opened (no
    /// usable backend): its `stop` record carries the error as `start_failed`, so that the
    /// chain says why a process that served no memory ended, and is not read as a clean run.
    pub fn stop_after_failed_start(&self, error: &str) {
        self.stop_within(STOP_TIMEOUT, Some(error.to_owned()));
    }

    fn stop_within(&self, limit: Duration, start_failed: Option<String>) {
        if self.forked() {
            return;
        }
        if self.stopped.swap(true, Ordering::AcqRel) {
            // Another thread is stopping the log (`kvh_shutdown` while `exit` runs): wait,
            // bounded as that stop is, for its writer to write the `stop` record and end, so
            // that this caller, about to end the process, does not end it first. A stop that
            // already returned (or gave up on a stuck writer) is not waited for again.
            self.shared.wait_for_writer(limit, |p| p.first_returned);
            return;
        }
        self.stop_first(limit, start_failed);
        self.shared.update_progress(|p| p.first_returned = true);
    }

    /// The first `stop`: asks the writer to end and waits, bounded, for its last write.
    fn stop_first(&self, limit: Duration, start_failed: Option<String>) {
        *lock(&self.shared.stop_request) = Some(StopRequest { start_failed });
        self.wake();
        // A writer stuck in the kernel (hung NFS) must not hang process exit forever.
        self.shared.wait_for_writer(limit, |_| false);
        if lock(&self.shared.progress).writer_ended {
            if let Some(t) = lock(&self.thread).take() {
                let _ = t.join();
            }
        }
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> LogStats {
        let s = &self.shared;
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        // In a forked child a lock the parent's writer thread held at the fork is never let
        // go (the thread was not copied): the texts are read only when free there, and are
        // the parent's anyway.
        let forked = self.forked();
        let text = |m: &Mutex<Option<String>>| -> Option<String> {
            if !forked {
                return lock(m).clone();
            }
            match m.try_lock() {
                Ok(guard) => guard.clone(),
                Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner().clone(),
                Err(std::sync::TryLockError::WouldBlock) => None,
            }
        };
        LogStats {
            enabled: true,
            disabled_reason: None,
            chain: text(&s.chain),
            current_file: text(&s.current_file),
            records_written: n(&s.records_written),
            producer_waits: n(&s.producer_waits),
            summaries_coalesced: n(&s.summaries_coalesced),
            write_errors: n(&s.write_errors),
            records_lost: n(&s.records_lost),
            bytes_lost: n(&s.bytes_lost),
            last_error: text(&s.last_error),
            free_bytes: s.free_bytes.get(),
        }
    }

    /// Fault injection for tests: the next `n` writes to the log file write half their bytes
    /// and then fail with `ENOSPC`, as a full disk would.
    #[doc(hidden)]
    pub fn inject_write_faults(&self, n: u32) {
        self.shared.injected_faults.store(n, Ordering::SeqCst);
    }

    /// Fault injection for tests: the writer thread panics at its next write of the log file,
    /// as a bug in it would.
    #[doc(hidden)]
    pub fn inject_writer_panic(&self) {
        self.shared.injected_panic.store(true, Ordering::SeqCst);
    }

    /// Fault injection for tests: the next `n` fsyncs of the log file fail with `EIO`.
    #[doc(hidden)]
    pub fn inject_fsync_faults(&self, n: u32) {
        self.shared.injected_fsync_faults.store(n, Ordering::SeqCst);
    }
}

impl EventSink for ForensicLog {
    fn emit(&self, event: Event) {
        self.send(Msg::Event(Queued::new(event, &self.shared)));
    }

    fn flush(&self) {
        ForensicLog::flush(self);
    }
}

impl Drop for ForensicLog {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The record kind and fields of a pool event (borrowing the event's strings).
pub(crate) fn event_fields(e: &Event) -> (&'static str, Fields<'_>) {
    let mut m: Fields<'_> = Vec::with_capacity(20);
    context_fields(&e.context, &mut m);
    if let Some(blk) = &e.block {
        m.push((b("block_id"), Field::U(blk.id)));
        m.push((b("device"), Field::I(i64::from(blk.device))));
        m.push((b("addr"), Field::S(Cow::Owned(format!("0x{:x}", blk.addr)))));
        m.push((b("requested"), Field::U(blk.requested)));
        m.push((b("capacity"), Field::U(blk.capacity)));
        m.push((b("scrub_seq"), Field::U(blk.scrub_seq)));
    }
    if let Some(a) = e.addr {
        m.push((b("ptr"), Field::S(Cow::Owned(format!("0x{a:x}")))));
    }
    kind_fields(&e.kind, &mut m);
    (e.kind.name(), m)
}

fn b(s: &'static str) -> Cow<'static, str> {
    Cow::Borrowed(s)
}

fn st(s: &'static str) -> Field<'static> {
    Field::S(Cow::Borrowed(s))
}

pub(crate) fn context_fields<'a>(c: &'a crate::context::Context, m: &mut Fields<'a>) {
    let opt = |s: Option<&'a str>| s.map_or(Field::Null, |s| Field::S(Cow::Borrowed(s)));
    m.push((b("tenant_id"), opt(c.tenant_id())));
    m.push((b("request_id"), opt(c.request_id())));
    m.push((b("model_id"), opt(c.model_id())));
}

/// The ids of the thread that made a refused or mismatched free, or an export
/// (`caller_tenant_id`, `caller_request_id`, `caller_model_id`): the record's own ids are the
/// block owner's.
fn put_caller<'a>(
    put: &mut impl FnMut(&'static str, Field<'a>),
    caller: &'a crate::context::Context,
) {
    let opt = |s: Option<&'a str>| s.map_or(Field::Null, |s| Field::S(Cow::Borrowed(s)));
    put("caller_tenant_id", opt(caller.tenant_id()));
    put("caller_request_id", opt(caller.request_id()));
    put("caller_model_id", opt(caller.model_id()));
}

fn kind_fields<'a>(k: &'a EventKind, m: &mut Fields<'a>) {
    let mut put = |k: &'static str, v: Field<'a>| m.push((b(k), v));
    match k {
        EventKind::VerifyFailed {
            samples_expected,
            samples_checked,
            samples_nonzero,
            coverage,
            threshold,
        } => verification_fields(
            m,
            [*samples_expected, *samples_checked, *samples_nonzero],
            *coverage,
            *threshold,
        ),
        EventKind::Quarantined { reason, .. } => put(
            "reason",
            st(match reason {
                QuarantineReason::VerifyFailed => "verify_failed",
                QuarantineReason::NeverReusePolicy => "never_reuse_policy",
                QuarantineReason::RescrubFailed => "rescrub_failed",
                QuarantineReason::Residue => "residue",
                QuarantineReason::RescrubResidue => "rescrub_residue",
            }),
        ),
        EventKind::Released { reason, leaked } => {
            put(
                "reason",
                st(match reason {
                    ReleaseReason::QuarantineCleared => "quarantine_cleared",
                    ReleaseReason::MaxReuse => "max_reuse",
                    ReleaseReason::IdleTtl => "idle_ttl",
                    ReleaseReason::EmptyCache => "empty_cache",
                    ReleaseReason::OutOfMemory => "out_of_memory",
                    ReleaseReason::IpcExported => "ipc_exported",
                }),
            );
            // Only when the backend refused the release: a record of a block returned
            // carries no such field (as before the field existed).
            if *leaked {
                put("leaked", Field::Json(serde_json::Value::Bool(true)));
            }
        }
        EventKind::InvalidFree {
            reason,
            device,
            caller,
        } => {
            put_caller(&mut put, caller);
            put(
                "reason",
                st(match reason {
                    InvalidFreeReason::UnknownPointer => "unknown_pointer",
                    InvalidFreeReason::DoubleFree => "double_free",
                    InvalidFreeReason::InteriorPointer => "interior_pointer",
                    InvalidFreeReason::WrongDevice => "wrong_device",
                    InvalidFreeReason::InvalidDevice => "invalid_device",
                }),
            );
            put("call_device", Field::I(i64::from(*device)));
        }
        EventKind::SizeMismatch { claimed, caller } => {
            put_caller(&mut put, caller);
            put("claimed", Field::I(*claimed));
        }
        EventKind::IpcExport { caller } => put_caller(&mut put, caller),
        EventKind::TtlExceeded {
            which,
            age_ms,
            limit_ms,
        } => {
            put(
                "which",
                st(match which {
                    TtlKind::Live => "live",
                }),
            );
            put("age_ms", Field::U(*age_ms));
            put("limit_ms", Field::U(*limit_ms));
        }
        EventKind::PolicyViolation { policy, detail } => {
            put("policy", st(policy));
            put("detail", Field::S(Cow::Borrowed(detail)));
        }
        EventKind::KvScrubbed(r) => {
            put("device", Field::I(i64::from(r.device)));
            put("blocks", Field::U(r.blocks));
            put("verified_blocks", Field::U(r.verified_blocks));
            put("failed_blocks", Field::U(r.failed_blocks));
            put("segments", Field::U(r.segments));
            put("unverified_segments", Field::U(r.unverified_segments));
            put("bytes", Field::U(r.bytes));
            put("first_seed", Field::U(r.first_seed));
            put("stream", Field::S(Cow::Owned(format!("0x{:x}", r.stream))));
            put("regions", Field::U(r.regions));
            put("block_bytes", Field::U(r.block_bytes));
            put("block_stride", Field::U(r.block_stride));
            put("blocks_per_region", Field::U(r.blocks_per_region));
            put(
                "layout_sha256",
                Field::S(Cow::Owned(record::hex(&r.layout_sha256))),
            );
            if let Some(ids) = &r.block_ids {
                put("block_ids", Field::Json(serde_json::json!(ids)));
            }
            put(
                "block_ids_sha256",
                Field::S(Cow::Owned(record::hex(&r.block_ids_sha256))),
            );
            put(
                "error",
                r.error
                    .as_deref()
                    .map_or(Field::Null, |e| Field::S(Cow::Borrowed(e))),
            );
            put("trigger", st(r.trigger.name()));
            if r.trigger == KvScrubTrigger::Gate {
                put("unknown_owner_blocks", Field::U(r.unknown_owner_blocks));
                put("owner_changed_blocks", Field::U(r.owner_changed_blocks));
                put("withdrawn_blocks", Field::U(r.withdrawn_blocks));
            }
        }
        EventKind::KvVerifyFailed {
            kv_block,
            region,
            addr,
            len,
            seed,
            samples_expected,
            samples_checked,
            samples_nonzero,
            coverage,
            threshold,
            // How the detector counts the record, not evidence: the log keeps every segment.
            tally: _,
        } => {
            put("kv_block", Field::U(u64::from(*kv_block)));
            put("region", Field::U(u64::from(*region)));
            put("segment_addr", Field::S(Cow::Owned(format!("0x{addr:x}"))));
            put("segment_len", Field::U(*len));
            put("seed", Field::U(*seed));
            verification_fields(
                m,
                [*samples_expected, *samples_checked, *samples_nonzero],
                *coverage,
                *threshold,
            );
        }
        EventKind::Anomaly {
            signal,
            rule,
            folded,
            window_ms,
            count,
            threshold,
            baseline,
        } => {
            put("signal", st(signal.name()));
            put("rule", st(rule.name()));
            put("key", st(if *folded { "*other*" } else { "tenant" }));
            put("window_ms", Field::U(*window_ms));
            put("count", Field::U(*count));
            put("threshold", Field::U(*threshold));
            anomaly_baseline_fields(m, baseline.as_ref());
        }
    }
}

/// A surge's statistics, with fixed decimals (float text is not canonical); `null` for a
/// burst, so every detector record has the same fields.
fn anomaly_baseline_fields(m: &mut Fields<'_>, baseline: Option<&AnomalyBaseline>) {
    let fixed = |x: f64| Field::S(Cow::Owned(format!("{x:.6}")));
    let values = baseline.map(|b| [b.mean, b.stddev, b.z_score, b.z_threshold]);
    for (i, name) in ["baseline_mean", "baseline_stddev", "z_score", "z_threshold"]
        .into_iter()
        .enumerate()
    {
        m.push((b(name), values.map_or(Field::Null, |v| fixed(v[i]))));
    }
}

/// The fields of a failed verification: samples expected, checked and non-zero, coverage
/// and threshold (these two with fixed decimals: float text is not canonical).
fn verification_fields(
    m: &mut Fields<'_>,
    [expected, checked, nonzero]: [u64; 3],
    coverage: f64,
    threshold: f64,
) {
    m.push((b("samples_expected"), Field::U(expected)));
    m.push((b("samples_checked"), Field::U(checked)));
    m.push((b("samples_nonzero"), Field::U(nonzero)));
    m.push((
        b("coverage"),
        Field::S(Cow::Owned(format!("{coverage:.6}"))),
    ));
    m.push((
        b("threshold"),
        Field::S(Cow::Owned(format!("{threshold:.6}"))),
    ));
}

/// A log configuration for unit tests: the log in `dir`, no fsync, no periodic summaries and
/// no checkpoints (each test adds what it needs).
#[cfg(test)]
pub(crate) fn quiet_test_config(dir: &std::path::Path) -> crate::config::LogConfig {
    crate::config::LogConfig {
        dir: Some(dir.to_path_buf()),
        fsync: crate::config::FsyncPolicy::Never,
        summary_interval_ms: 0,
        checkpoint_every_records: 0,
        checkpoint_interval_ms: 0,
        ..crate::config::Config::default().log
    }
}

/// A log in `dir` keyed with `secret`, in files of at most `max_bytes`, holding `records`
/// anomalies of some 300 bytes each, all written: for the unit tests that need a chain of
/// several files.
#[cfg(test)]
pub(crate) fn keyed_test_log(
    dir: &std::path::Path,
    max_bytes: u64,
    secret: &[u8],
    records: usize,
) -> Arc<ForensicLog> {
    let cfg = crate::config::LogConfig {
        max_bytes,
        ..quiet_test_config(dir)
    };
    let start = StartInfo::current(crate::config::Config::default().canonical_json());
    let log =
        ForensicLog::open_with_secret(&cfg, start, Some(Zeroizing::new(secret.to_vec()))).unwrap();
    for i in 0..records {
        log.record_anomaly(serde_json::json!({"n": i, "pad": "x".repeat(200)}));
    }
    log.flush();
    log
}

/// A log of this process with no writer thread, over the queue `tx`, for the tests of what
/// producers, `stop` and `stats` do on their own.
#[cfg(test)]
fn writerless_log(tx: SyncSender<Box<Msg>>, stopped: bool) -> ForensicLog {
    ForensicLog {
        tx,
        shared: Arc::new(Shared::default()),
        stopped: AtomicBool::new(stopped),
        thread: Mutex::new(None),
        pid: std::process::id(),
    }
}

#[cfg(test)]
mod stop_tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn stop_returns_when_the_queue_stays_full() {
        let (tx, rx) = mpsc::sync_channel(1);
        tx.send(Box::new(Msg::Wake)).ok();
        let log = writerless_log(tx, false);
        let t = Instant::now();
        log.stop_within(Duration::from_millis(200), None);
        assert!(t.elapsed() < Duration::from_secs(5));
        drop(rx);
    }

    /// A log another thread is stopping, whose writer has one record queued before the
    /// flush still to handle.
    fn stopping_with_one_record_queued() -> (ForensicLog, mpsc::Receiver<Box<Msg>>) {
        let (tx, rx) = mpsc::sync_channel(4);
        let log = writerless_log(tx, true);
        log.shared.records_queued.store(1, Ordering::SeqCst);
        (log, rx)
    }

    /// A flush made while another thread stops the log (a fail-closed stop's, during
    /// `kvh_shutdown`) returns once the writer handled what was queued before it, or ended.
    #[test]
    fn flush_while_the_log_stops_waits_for_what_was_queued_before_it() {
        for ends in [false, true] {
            let (log, _rx) = stopping_with_one_record_queued();
            let published = AtomicBool::new(false);
            std::thread::scope(|s| {
                let flush = s.spawn(|| {
                    log.flush();
                    published.load(Ordering::SeqCst)
                });
                for _ in 0..1000 {
                    std::thread::yield_now();
                }
                published.store(true, Ordering::SeqCst);
                if ends {
                    log.shared.update_progress(|p| p.writer_ended = true);
                } else {
                    log.shared.round_done(1, 1);
                }
                assert!(
                    flush.join().unwrap(),
                    "flush returned before the writer handled the record or ended"
                );
            });
            // The stop the test stands in for returned: dropping the log waits for nothing.
            log.shared.update_progress(|p| p.first_returned = true);
        }
    }

    /// A flush after a stop that gave up on a stuck writer (it returned, the writer never
    /// ended) does not wait for that writer again.
    #[test]
    fn flush_after_a_stop_that_gave_up_returns_at_once() {
        let (log, _rx) = stopping_with_one_record_queued();
        log.shared.update_progress(|p| p.first_returned = true);
        let (tx, rx) = mpsc::channel();
        std::thread::scope(|s| {
            s.spawn(|| {
                log.flush();
                let _ = tx.send(());
            });
            // A bound far above a flush that waits for nothing, far below FLUSH_TIMEOUT.
            assert!(
                rx.recv_timeout(Duration::from_secs(10)).is_ok(),
                "flush waited for the writer a stop had given up on"
            );
        });
    }
}

#[cfg(test)]
mod fork_tests {
    use super::*;
    use std::time::Instant;

    /// A lock another thread of the parent held when the process forked stays taken in the
    /// child for good (that thread was not copied): the child's stats still return, with
    /// the texts that were free and without the one that was not.
    #[test]
    fn stats_in_a_forked_child_return_while_a_lock_held_at_the_fork_stays_taken() {
        let (tx, _rx) = mpsc::sync_channel(1);
        let log = writerless_log(tx, false);
        *lock(&log.shared.chain) = Some("p1-t1".into());
        *lock(&log.shared.last_error) = Some("disk full".into());
        // Held here, as the writer thread would hold it: in the child nothing lets it go.
        let held = lock(&log.shared.last_error);
        // SAFETY: the child only reads the log's atomics and, without waiting, its locks,
        // then leaves with `_exit`, never returning into the test harness.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            let s = log.stats();
            let right = s.chain.as_deref() == Some("p1-t1") && s.last_error.is_none();
            // SAFETY: ends the child without running the parent's handlers or destructors.
            unsafe { libc::_exit(i32::from(!right)) };
        }
        drop(held);
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut status = 0;
        let done = loop {
            // SAFETY: `pid` is this test's child; `status` is a valid out-pointer.
            if unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } == pid {
                break true;
            }
            if Instant::now() > deadline {
                // SAFETY: kills and reaps only the child this test forked.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                    libc::waitpid(pid, &mut status, 0);
                }
                break false;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        assert!(
            done,
            "the forked child's stats waited on a lock held at the fork"
        );
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "the child's stats were not the texts that were free: {status}"
        );
        // The parent reads every text as before.
        assert_eq!(log.stats().last_error.as_deref(), Some("disk full"));
    }
}

#[cfg(test)]
mod release_record_tests {
    use super::*;

    /// A release the backend refused says so (`leaked: true`); a release that returned the
    /// block carries no such field.
    #[test]
    fn a_release_record_says_leaked_only_when_the_backend_refused_it() {
        let record = |leaked: bool| {
            let e = Event {
                at: SystemTime::UNIX_EPOCH,
                kind: EventKind::Released {
                    reason: ReleaseReason::MaxReuse,
                    leaked,
                },
                context: crate::context::Context::default(),
                block: None,
                addr: None,
            };
            let (kind, fields) = event_fields(&e);
            assert_eq!(kind, "release");
            fields
                .into_iter()
                .find(|(name, _)| name == "leaked")
                .map(|(_, value)| matches!(value, Field::Json(serde_json::Value::Bool(true))))
        };
        assert_eq!(record(true), Some(true));
        assert_eq!(record(false), None);
    }
}

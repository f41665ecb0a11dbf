//! The process-wide allocator behind the C ABI, started on first use.
//!
//! Start-up reads the configuration once, picks the backend and opens the event sinks. A
//! start-up failure is remembered: every later call fails with the same error (an allocator
//! that half-started must not serve memory), and the reason is printed once on stderr.
//!
//! A child forked after start-up began never uses the runtime it inherited: its pool locks
//! may have been held at the fork by threads the child does not have, and its worker threads
//! do not exist there. A `pthread_atfork` child handler, registered when the library is
//! loaded, marks a child whose parent had begun start-up (its copy of [`STARTING`] says so),
//! so the check on every call is one atomic load. Registering at load, not at start-up, leaves
//! no window: a fork racing a start-up either copied `STARTING` set (the child is marked) or
//! not (the child's runtime is untouched and it starts its own). A child forked before
//! start-up (a launcher or pre-fork server that loaded the library but never allocated) is
//! not marked and starts its own runtime; its own children are marked once it has. A
//! `kvh_shutdown` before start-up counts as a start-up here: children forked after it are
//! marked. A marked child whose parent's start-up had ended in an error (or in that early
//! shutdown) gets that error, which says what to fix; one whose parent had started, or was
//! still starting, gets `KVH_ERR_FORKED_CHILD`.
//!
//! Process exit before start-up is watched too: an `atexit` handler registered when the
//! library is loaded marks it, and a first allocation after that gets
//! `KVH_ERR_SHUTTING_DOWN` rather than a start-up, whose driver calls invariant 6 forbids
//! once exit has begun. Exit handlers run in the reverse order of their registration, so one
//! registered after the library was loaded runs before the mark, and its first allocation
//! still starts the allocator (and its own exit handler then runs next). glibc registers the
//! loader's finaliser as an exit handler once the shared objects are initialised, before the
//! main program is; the finaliser runs, object by object, the destructor functions and the
//! exit handlers each registered while it was initialised (the destructors of its static
//! objects among them), in load order (the main program, the LD_PRELOAD libraries, the
//! libraries the program links, `DT_NEEDED`, then those loaded with `dlopen`), each object
//! before the libraries it depends on. Loaded by `LD_PRELOAD`, the library registers the mark
//! while it is initialised, after the linked libraries and before the main program. So the
//! mark runs after the exit handlers registered from the main program's initialisation on
//! (its static destructors, and those of objects constructed later: function-local statics,
//! libraries loaded with `dlopen`) and after the main program's destructor functions; it runs
//! before the static destructors of the objects the linked libraries construct at load, their
//! destructor functions, and the destructor functions of libraries loaded with `dlopen`,
//! where a first allocation is refused (`cudaErrorCudartUnloading` from the interposers).
//!
//! Metrics (`KVH_METRICS_FILE`, `KVH_METRICS_ADDR`) start last and never stop start-up: a
//! metrics file that cannot be written or an address in use is said on stderr, and the
//! allocator runs without that export.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use std::time::{Duration, Instant};

use crate::alloc::Allocator;
use crate::anomaly::{self, AnomalySink, AnomalyStats};
use crate::backend;
use crate::config::{Config, OomMode};
use crate::events::EventSink;
use crate::forensic::{ForensicLog, LogStats, StartInfo};
use crate::metrics::{Exporter, FINAL_WRITE_LIMIT};
use crate::say;
use crate::stats::Stats;

use super::error::kvh_result;

/// The started allocator and what hangs off it.
pub(crate) struct Runtime {
    pub allocator: Allocator,
    /// The forensic log; `None` when `KVH_LOG_DIR` is unset.
    pub log: Option<Arc<ForensicLog>>,
    /// The anomaly detector in front of the log; `None` with `KVH_ANOMALY=off`.
    pub anomaly: Option<Arc<AnomalySink>>,
    /// The metrics exports; `None` when neither a file nor an address is configured.
    pub metrics: Option<Exporter>,
    /// The process that started the allocator. A forked child inherits the runtime with
    /// this pid; the exit paths compare it with their own to leave the inherited pools alone.
    pub pid: u32,
    /// The policy's digest, as the log's `start` record carries it.
    pub config_digest: Arc<str>,
}

impl Runtime {
    /// `kvh_stats_json`'s answer once started: the statistics, with `"started": true` first,
    /// to tell them from the answer before start-up (`{"started": false, ...}`).
    pub(crate) fn stats_json(&self) -> String {
        /// Serialised straight from the struct, in field order (a `serde_json::Value` would
        /// sort the keys, the latency buckets' bounds among them).
        #[derive(serde::Serialize)]
        struct Started<'a> {
            started: bool,
            #[serde(flatten)]
            stats: &'a Stats,
        }
        let stats = snapshot(
            &self.allocator,
            self.log.as_deref(),
            self.anomaly.as_deref(),
            &self.config_digest,
        );
        let doc = Started {
            started: true,
            stats: &stats,
        };
        // Plain data with derived impls: serialisation cannot fail.
        serde_json::to_string(&doc).unwrap_or_else(|_| stats.to_json())
    }
}

/// The allocator's statistics with the forensic log's and the anomaly detector's merged in,
/// and the policy's digest (`kvh_stats_json`).
fn snapshot(
    allocator: &Allocator,
    log: Option<&ForensicLog>,
    anomaly: Option<&AnomalySink>,
    config_digest: &str,
) -> Stats {
    let mut stats = allocator.stats();
    let log = log.map_or_else(LogStats::disabled, |l| l.stats());
    stats.log = serde_json::to_value(log).ok();
    let anomaly = anomaly.map_or_else(AnomalyStats::disabled, |a| a.stats());
    stats.anomaly = serde_json::to_value(anomaly).ok();
    stats.config_digest = Some(config_digest.to_string());
    stats
}

/// Why the allocator did not start.
#[derive(Clone, Debug, thiserror::Error)]
pub(crate) enum StartError {
    #[error("kvhygiene configuration: {0}")]
    Config(String),
    #[error("kvhygiene backend: {0}")]
    Backend(String),
    #[error("kvhygiene: {0}")]
    Log(String),
    #[error(
        "kvhygiene: this process is a child forked after kvhygiene started (or was shut down) in \
         its parent; the allocator it inherited is the parent's and is not used here"
    )]
    ForkedChild,
    #[error(
        "kvhygiene: kvh_shutdown was called before the allocator started (in this process, or \
         in the parent it was forked from afterwards); it serves no memory here"
    )]
    ShutDown,
    #[error("kvhygiene: the start-up panicked (an internal error); the allocator did not start")]
    Panicked,
    #[error(
        "kvhygiene: process exit had begun before the allocator started; it serves no memory \
         from then on"
    )]
    Exiting,
}

impl StartError {
    pub(crate) fn code(&self) -> kvh_result {
        match self {
            StartError::Config(_) => kvh_result::KVH_ERR_CONFIG,
            StartError::Backend(_) => kvh_result::KVH_ERR_BACKEND,
            StartError::Log(_) => kvh_result::KVH_ERR_LOG,
            StartError::ForkedChild => kvh_result::KVH_ERR_FORKED_CHILD,
            StartError::ShutDown | StartError::Exiting => kvh_result::KVH_ERR_SHUTTING_DOWN,
            StartError::Panicked => kvh_result::KVH_ERR_PANIC,
        }
    }

    /// Whether the allocator was kept from starting rather than failing to: a `kvh_shutdown`
    /// or process exit came first. It served nothing, so nothing is left to scrub.
    pub(crate) fn stopped_before_start(&self) -> bool {
        matches!(self, StartError::ShutDown | StartError::Exiting)
    }
}

static RUNTIME: OnceLock<Result<Runtime, StartError>> = OnceLock::new();

/// Set in a child forked after start-up began (see the module documentation).
static FORKED_CHILD: AtomicBool = AtomicBool::new(false);

/// Set when this process begins starting the runtime, before anything of it exists.
static STARTING: AtomicBool = AtomicBool::new(false);

/// Set by the `atexit` handler registered at load (see the module documentation).
static EXITING: AtomicBool = AtomicBool::new(false);

static FORKED_CHILD_ERROR: StartError = StartError::ForkedChild;

/// The `oom` mode of the configuration start-up read, kept also when a later step of the
/// start-up failed: a `kvh_malloc` that fails because the runtime did not start still does
/// what the configuration asked (throw, or return NULL to a caller that cannot take C++
/// exceptions).
static CONFIGURED_OOM: OnceLock<OomMode> = OnceLock::new();

/// The `oom` mode of the configuration start-up read; `None` when none was read (start-up
/// not begun, or the configuration invalid).
pub(crate) fn configured_oom() -> Option<OomMode> {
    CONFIGURED_OOM.get().copied()
}

/// The runtime, started on first call. In a child forked after start-up began, the
/// [`StartError::ForkedChild`] error, without touching the inherited runtime (whose start-up
/// may even have been under way in a thread the child does not have).
pub(crate) fn get() -> Result<&'static Runtime, &'static StartError> {
    if is_forked_child() {
        // A start-up that had failed in the parent (or a shutdown before any start) left
        // nothing to inherit: its own error says what to fix. `get` reads a finished value
        // only, never one still being written in the parent.
        return match RUNTIME.get() {
            Some(Err(e)) => Err(e),
            _ => Err(&FORKED_CHILD_ERROR),
        };
    }
    let outcome = match RUNTIME.get() {
        Some(started) => started.as_ref(),
        None => start_once(),
    };
    if let Ok(rt) = &outcome {
        stop_if_exiting(rt);
    }
    outcome
}

/// A runtime a start-up published after process exit began (the exit watch ran between the
/// start-up's last look and its publication): exit begins for it here, on first use, as the
/// exit handler would have begun it. One atomic load otherwise: every entry calls it.
#[inline]
fn stop_if_exiting(rt: &Runtime) {
    if exit_begun() {
        stop_at_exit(rt);
    }
}

/// [`stop_if_exiting`]'s exit. A no-op for a runtime whose exit already began.
#[cold]
fn stop_at_exit(rt: &Runtime) {
    if !rt.allocator.is_shut_down() {
        rt.allocator.begin_exit();
    }
}

#[cold]
fn start_once() -> Result<&'static Runtime, &'static StartError> {
    // Before the start-up begins, so that a child forked during it is marked. Registering
    // again is a no-op (when the loader ran no constructor, as in a static link).
    watch_process();
    STARTING.store(true, Ordering::SeqCst);
    RUNTIME.get_or_init(start).as_ref()
}

/// The runtime, or its start-up's error, once a start-up began in this process (or this is
/// a child forked after one began); `None` before, without starting it: for the calls that
/// have nothing to do before the first allocation, and must not start the allocator (in a
/// launcher, that would leave every worker it forks without one).
pub(crate) fn get_if_begun() -> Option<Result<&'static Runtime, &'static StartError>> {
    if is_forked_child() {
        return Some(get());
    }
    let outcome = match RUNTIME.get() {
        Some(outcome) => outcome.as_ref(),
        // A start-up, or a `kvh_shutdown` that came first, is under way on another thread:
        // its outcome, waited for, never a start-up of this call's own.
        None if STARTING.load(Ordering::SeqCst) => RUNTIME.wait().as_ref(),
        None => return None,
    };
    if let Ok(rt) = &outcome {
        stop_if_exiting(rt);
    }
    Some(outcome)
}

/// The runtime if it has already started successfully in this process; never starts it.
pub(crate) fn started() -> Option<&'static Runtime> {
    match RUNTIME.get() {
        Some(Ok(rt)) if !is_forked_child() => {
            stop_if_exiting(rt);
            Some(rt)
        }
        _ => None,
    }
}

/// Whether process exit has begun (the exit watch ran): no start-up is made from then on.
pub(crate) fn exit_begun() -> bool {
    EXITING.load(Ordering::SeqCst)
}

/// Whether this process is a child forked after kvhygiene's start-up began in its parent.
pub(crate) fn is_forked_child() -> bool {
    FORKED_CHILD.load(Ordering::Relaxed)
}

/// The fork and exit handlers, registered when the library is loaded: one `.init_array`
/// entry (all a constructor crate would add), which the loader runs before any code of the
/// process can call into the library, so before any start-up.
#[used]
#[link_section = ".init_array"]
static WATCH_PROCESS_AT_LOAD: extern "C" fn() = watch_process_at_load;

extern "C" fn watch_process_at_load() {
    watch_process();
}

/// Registers, once per process, the child handler that marks a child forked after start-up
/// began and the exit handler that marks exit begun. Front ends linking this crate (the
/// preload library) call it from their own constructor, since a linker may leave out an
/// unreferenced constructor of a library.
pub(crate) fn watch_process() {
    extern "C" fn mark_child() {
        // Runs in the child, on the copy of the parent's memory: async-signal-safe loads and
        // stores only.
        if STARTING.load(Ordering::Relaxed) {
            FORKED_CHILD.store(true, Ordering::Relaxed);
        }
    }
    static REGISTERED: AtomicBool = AtomicBool::new(false);
    if REGISTERED.swap(true, Ordering::AcqRel) {
        return;
    }
    // SAFETY: registers a child handler that only loads and stores atomics (async-signal-safe,
    // as a handler running in the child of a multi-threaded process must be); no prepare or
    // parent handler. glibc's `pthread_atfork` names this library's DSO, and its handlers are
    // removed if the library is unloaded, so the handler never outlives its code.
    let rc = unsafe { libc::pthread_atfork(None, None, Some(mark_child)) };
    if rc != 0 {
        say(format_args!(
            "kvhygiene: cannot register the fork handler (error {rc}); a forked child would \
             use the allocator it inherited"
        ));
    }
    extern "C" fn mark_exit() {
        EXITING.store(true, Ordering::SeqCst);
        crate::backend::mark_process_exit();
    }
    // SAFETY: `mark_exit` is an `extern "C" fn()` that stores two atomics and cannot unwind.
    // In a shared library glibc registers it for this library's DSO, so a `dlclose` runs it
    // (marking a library about to be unmapped) and it never outlives its code.
    if unsafe { libc::atexit(mark_exit) } != 0 {
        say(format_args!(
            "kvhygiene: cannot register the exit watch; a first allocation during exit would \
             start the allocator"
        ));
    }
}

fn start() -> Result<Runtime, StartError> {
    // A start-up that panicked fails as any other: the runtime cell is always set, so that
    // a call waiting for its outcome (`get_if_begun`) never waits for ever.
    let result = std::panic::catch_unwind(try_start).unwrap_or_else(|_| Err(StartError::Panicked));
    match &result {
        Ok(_) => register_exit_handler(),
        Err(e) => {
            // A failed start is final, and its log never reads the secret (a configuration
            // error comes first) or has read and removed it already: it must not stay in
            // `/proc/<pid>/environ` or pass to child processes.
            crate::forensic::keys::discard_env_secret();
            say(format_args!("{e}"))
        }
    }
    result
}

fn try_start() -> Result<Runtime, StartError> {
    if EXITING.load(Ordering::SeqCst) {
        return Err(StartError::Exiting);
    }
    let config = Config::from_env().map_err(|e| StartError::Config(e.to_string()))?;
    let _ = CONFIGURED_OOM.set(config.oom);
    // The log opens first: a process configured to keep evidence must not serve memory
    // without it.
    let start = StartInfo::current(config.canonical_json());
    let config_digest: Arc<str> = start.config_digest().into();
    let log = ForensicLog::open(&config.log, start).map_err(|e| StartError::Log(e.to_string()))?;
    if log.is_none() {
        // Once per process: an operator who meant to keep evidence learns at start that none
        // is being kept (the stats say so too: `log.enabled` is false).
        say(format_args!(
            "kvhygiene: forensic log off (KVH_LOG_DIR is not set): security events are counted \
             but not recorded"
        ));
    }
    // From here on a failure (or a panic) ends the log's chain with a `stop` record that
    // carries the error: the chain says why this process served no memory, rather than read
    // as a clean run.
    let digest = config_digest.clone();
    let log_kept = log.clone();
    let started = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
        start_on_log(config, log_kept, digest)
    }))
    .unwrap_or(Err(StartError::Panicked));
    if let (Err(e), Some(log)) = (&started, &log) {
        log.stop_after_failed_start(&e.to_string());
    }
    started
}

/// The start-up after the forensic log opened: the backend, the anomaly detector, the
/// allocator, the summaries and the metrics exports.
fn start_on_log(
    config: Config,
    log: Option<Arc<ForensicLog>>,
    config_digest: Arc<str>,
) -> Result<Runtime, StartError> {
    // Exit may begin while the device opens (seconds): the backend then stops before its
    // next driver call, and the start-up says why.
    let backend = backend::select(config.backend).map_err(|e| match e {
        backend::BackendError::ShuttingDown if exit_begun() => StartError::Exiting,
        e => StartError::Backend(e.to_string()),
    })?;
    // The detector sits between the allocator and the log: it sees every event, forwards it
    // unchanged and adds `anomaly` records after the events that trip its rules.
    let layered = anomaly::layer(
        &config.anomaly,
        log.clone().map(|l| l as Arc<dyn EventSink>),
    );
    let anomaly = layered.detector;
    let summary_every = Duration::from_millis(config.log.summary_interval_ms);
    let metrics_config = config.metrics.clone();
    let allocator = Allocator::new(backend, config, layered.sink);
    // Exit began after the device opened: the allocator is made as exit leaves every one,
    // serving no fresh memory and making no backend call (`get` covers a later start).
    if exit_begun() {
        allocator.begin_exit();
    }
    if let Some(log) = &log {
        spawn_summaries(allocator.clone(), log.clone(), summary_every);
    }
    let (a, l, d, c) = (
        allocator.clone(),
        log.clone(),
        anomaly.clone(),
        config_digest.clone(),
    );
    let metrics = Exporter::start(
        &metrics_config,
        Arc::new(move || snapshot(&a, l.as_deref(), d.as_deref(), &c)),
    );
    // Under failure_mode=abort the process stops without its exit handler: the snapshot that
    // counts the failure is written first, for the alerts and `kvh gate` to see it.
    allocator.on_fail_closed(|| {
        if let Some(rt) = own_runtime() {
            write_metrics(rt);
        }
    });
    Ok(Runtime {
        allocator,
        log,
        anomaly,
        metrics,
        pid: std::process::id(),
        config_digest,
    })
}

/// Writes the pool's counters to the log periodically (the log may coalesce them).
fn spawn_summaries(allocator: Allocator, log: Arc<ForensicLog>, every: Duration) {
    let spawned = std::thread::Builder::new()
        .name("kvh-summary".into())
        .spawn(move || loop {
            std::thread::sleep(every);
            // Ends with the log (`kvh_shutdown`): a process may run on without it.
            if log.is_stopped() {
                return;
            }
            if let Ok(counters) = serde_json::to_value(allocator.stats().counters) {
                if !log.record_own_summary(counters) {
                    return;
                }
            }
        });
    if let Err(e) = spawned {
        say(format_args!(
            "kvhygiene: cannot start the summary thread ({e}); no periodic summaries"
        ));
    }
}

/// Set once `kvh_shutdown` has written its last metrics snapshot: from then on the file is left
/// to go stale. An exit while a shutdown is still under way writes that snapshot itself (the
/// process may end before the shutdown's thread gets to it).
static FINAL_SNAPSHOT_WRITTEN: AtomicBool = AtomicBool::new(false);

/// Held by `kvh_shutdown` while it runs. Not by the exit handler, which must never wait for
/// a shutdown blocked on the device (it raises the flag that stops that wait) nor deadlock on
/// a shutdown of its own thread (`exit` from a signal handler): it waits for the log's stop
/// record instead (`ForensicLog::stop` waits, bounded, for a stop under way).
static SHUTTING_DOWN: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Orderly shutdown (`kvh_shutdown`). Once only: a second call (two teardown paths) changes
/// nothing, and above all does not write a fresh metrics snapshot, which would keep a process
/// that no longer scrubs looking alive. Before start-up, it keeps the allocator from ever
/// starting: a later allocation fails as any after shutdown does (also in a child forked
/// afterwards, with `KVH_ERR_SHUTTING_DOWN`).
pub(crate) fn shutdown() {
    // A child forked after start-up or shutdown began in its parent shuts nothing down: the
    // runtime and the lock below are the parent's copies, maybe held by a thread it lacks.
    if is_forked_child() {
        return;
    }
    // As a start-up: a child forked from here on is marked (and returns above), never left
    // with the lock below held or the runtime cell half set.
    watch_process();
    STARTING.store(true, Ordering::SeqCst);
    // One shutdown at a time: a second call, from another thread, returns only once the first
    // has written the log's stop record and the last snapshot (its caller may exit then).
    let _one = SHUTTING_DOWN.lock().unwrap_or_else(|p| p.into_inner());
    if RUNTIME.get().is_none() && RUNTIME.set(Err(StartError::ShutDown)).is_ok() {
        // (Loses only to a start-up racing it, whose runtime is then shut down below.) The
        // allocator will never start, so no log will read the HMAC secret: as after a failed
        // start-up, it must not stay in `/proc/<pid>/environ` or pass to child processes.
        crate::forensic::keys::discard_env_secret();
    }
    if let Some(rt) = own_runtime() {
        // A runtime published after the exit watch ran drains nothing: exit begins for it
        // here, and its exit handler writes the stop record and the last snapshot.
        stop_if_exiting(rt);
        if rt.allocator.is_shut_down() {
            return;
        }
        // A drain that unwinds (an event sink's panic) still ends in exit begun: the log's
        // stop record and the last snapshot follow all the same, before the panic goes on,
        // since a second call finds the allocator shut down and returns above.
        let drained =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| rt.allocator.shutdown()));
        stop_log(rt, false);
        // The last snapshot: from here on it ages, and `kvh gate` takes the process out of
        // rotation once it is stale, since no free is scrubbed any more.
        if let Some(m) = &rt.metrics {
            m.stop_periodic();
        }
        write_metrics(rt);
        FINAL_SNAPSHOT_WRITTEN.store(true, Ordering::SeqCst);
        if let Err(payload) = drained {
            std::panic::resume_unwind(payload);
        }
    }
}

/// The last metrics file, after the log's stop record: file I/O only, on a helper thread
/// waited for at most `FINAL_WRITE_LIMIT` (a hung filesystem does not hang the caller), and
/// nothing in a forked child (the file is the parent's). Errors are counted and said by the
/// exporter.
fn write_metrics(rt: &Runtime) {
    if let Some(m) = &rt.metrics {
        let _ = m.write_file_bounded(FINAL_WRITE_LIMIT);
    }
}

/// How long the exit handler waits for the pool locks to read the final summary: far longer
/// than any pool operation holds one (a free, a flush, a scrub submission), far shorter than
/// a hang.
const EXIT_SUMMARY_WAIT: Duration = Duration::from_millis(250);

/// A final summary, then the log's `stop` record and last checkpoint. At exit the summary is
/// left out when a pool's lock stays held for [`EXIT_SUMMARY_WAIT`] (a thread stuck in a
/// driver call under it, or an `exit()` from a signal handler that interrupted its holder):
/// waiting on would hang the process for ever, and the `stop` record still carries the log's
/// own totals.
fn stop_log(rt: &Runtime, at_exit: bool) {
    if let Some(log) = &rt.log {
        // After a shutdown's stop (the exit that follows it), no summary is due.
        let stats = if log.is_stopped() {
            None
        } else if at_exit {
            stats_within(rt, EXIT_SUMMARY_WAIT)
        } else {
            Some(rt.allocator.stats())
        };
        if let Some(counters) = stats.and_then(|s| serde_json::to_value(s.counters).ok()) {
            log.record_final_summary(counters);
        }
        log.stop();
    }
}

/// The allocator's counters, read without waiting on a lock for more than `limit` in all.
fn stats_within(rt: &Runtime, limit: Duration) -> Option<crate::stats::Stats> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(stats) = rt.allocator.try_stats() {
            return Some(stats);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The started runtime, unless this is a forked child: a child inherits the runtime with its
/// parent's pid and pool locks (one may have been held at the fork, by a thread the child
/// does not have), so it must not touch them, even to shut down or to exit.
fn own_runtime() -> Option<&'static Runtime> {
    match RUNTIME.get() {
        Some(Ok(rt)) if rt.pid == std::process::id() => Some(rt),
        _ => None,
    }
}

fn register_exit_handler() {
    extern "C" fn on_exit() {
        // Invariant 6: once exit begins, no driver calls. Nothing here may unwind.
        let _ = std::panic::catch_unwind(|| {
            if let Some(rt) = own_runtime() {
                // After `kvh_shutdown`, whose last snapshot must go stale (`kvh gate` evicts a
                // process that no longer scrubs), the metrics file is not written again.
                let shut_down_before = rt.allocator.is_shut_down();
                rt.allocator.begin_exit();
                // File I/O only: the log's stop record is written, no driver call is made.
                stop_log(rt, true);
                // No periodic write starts after this one (none is left half-done at exit).
                if let Some(m) = &rt.metrics {
                    m.stop_periodic();
                }
                // After a shutdown that wrote its last snapshot, the file is left to go stale;
                // one still under way on another thread may not get to it before the process
                // ends, so its snapshot is written here.
                if !shut_down_before || !FINAL_SNAPSHOT_WRITTEN.load(Ordering::SeqCst) {
                    write_metrics(rt);
                }
            }
        });
    }
    // SAFETY: `on_exit` is an `extern "C" fn()` that never unwinds (catch_unwind above).
    let rc = unsafe { libc::atexit(on_exit) };
    if rc != 0 {
        say(format_args!(
            "kvhygiene: cannot register the exit handler; driver calls may run during exit"
        ));
    }
}

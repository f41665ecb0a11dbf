//! Metrics: the Prometheus exposition of the statistics, and its two exports.
//!
//! - [`mod@encode`]: the Prometheus text format (0.0.4) of a [`Stats`] snapshot (with the
//!   forensic log's statistics merged in), one metric per numeric field;
//! - [`parse`]: a reader of that format (`kvh metrics`, `kvh serve-metrics`, the tests);
//! - [`textfile`]: atomic replacement of the metrics file (node-exporter textfile collector);
//! - [`http`]: a one-thread HTTP/1.1 responder with request size and time limits;
//! - [`Exporter`]: what the process-wide runtime starts from `KVH_METRICS_FILE` and
//!   `KVH_METRICS_ADDR`: a thread rewriting the file every `KVH_METRICS_INTERVAL_MS`, and the
//!   HTTP exporter (`/metrics`, `/stats`, `/healthz`);
//! - [`per_process`]: the files of a `{pid}` pattern that belong to live processes;
//! - [`merge`]: several processes' snapshots as one exposition (`serve-metrics`);
//! - [`cli`]: the `metrics` and `serve-metrics` verbs.
//!
//! Metrics are read from [`Stats`] snapshots (`Allocator::stats`, the same as
//! `kvh_stats_json`) on the exporters' own threads. A snapshot briefly takes each pool's lock
//! (the one allocations and frees take) to copy its counters: the file thread takes one per
//! interval, and the HTTP exporter at most one per [`Options::snapshot_every`] (1 s unless
//! set), whatever the request rate, serving the cached text and JSON in between.
//!
//! One exporter belongs to one process: a forked child inherits the parent's exporter
//! without its threads, and neither writes the file nor waits on its locks (the parent's
//! file stays the parent's); its copy of the HTTP exporter's listening socket is closed at
//! the fork, so the address never outlives the parent's exporter. A multi-process engine whose workers inherit the environment
//! names one file per process with `{pid}` in `KVH_METRICS_FILE`; every sample then carries
//! a `pid` label, so a collector reading all the files sees each series once.

pub mod cli;
pub mod encode;
pub mod http;
pub mod merge;
pub mod parse;
pub mod per_process;
pub mod textfile;

use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, OnceLock, TryLockError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use crate::config::MetricsConfig;
use crate::stats::Stats;
use per_process::ProcessIdentity;

pub use encode::{encode, encode_labelled, encode_process, ExporterStats, CONTENT_TYPE};

/// Where the exporters get their snapshot: the allocator's [`Stats`] with the embedding
/// layer's `log` field set, exactly as `kvh_stats_json` reports them.
pub type Source = Arc<dyn Fn() -> Stats + Send + Sync>;

/// How long the runtime's last write of the metrics file (at `kvh_shutdown` and at exit) may
/// hold up its caller: past it, exit goes on and the write finishes or not on its own thread.
pub const FINAL_WRITE_LIMIT: Duration = Duration::from_secs(2);

/// Settings of an [`Exporter`] beyond its configuration.
#[derive(Clone, Copy, Debug, Default)]
pub struct Options {
    /// Limits of the HTTP exporter.
    pub limits: http::Limits,
    /// How long the HTTP exporter serves one snapshot (`/metrics` and `/stats` alike) before
    /// taking another; `None`: 1 s, so that scrapes take a snapshot (each pool's lock, briefly)
    /// at most once a second however often they come.
    pub snapshot_every: Option<Duration>,
}

/// The running exports of one process. Dropping it stops the file thread and the HTTP server
/// (the process-wide one lives until exit).
pub struct Exporter {
    inner: Arc<Inner>,
    http: Option<http::Server>,
    file_thread: Option<JoinHandle<()>>,
}

impl Drop for Exporter {
    fn drop(&mut self) {
        if self.inner.forked() {
            // A forked child has neither the file thread nor the server thread: joining them
            // would wait forever, and the server's wake-up would reach the parent's listener.
            if let Some(thread) = self.file_thread.take() {
                std::mem::forget(thread);
            }
            if let Some(server) = self.http.take() {
                std::mem::forget(server);
            }
            return;
        }
        self.inner.stop_file_thread();
        if let Some(thread) = self.file_thread.take() {
            // The thread ends after at most the write in progress.
            let _ = thread.join();
        }
    }
}

/// The HTTP exporter's snapshot, served until it is `snapshot_every` old.
struct Cached {
    taken: Instant,
    /// Taken after the periodic writes stopped: the last one, served for good.
    last: bool,
    metrics: String,
    json: String,
}

/// Whether a write waits for the lock held by another writer.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Wait {
    Block,
    /// Skip the write when another one is in progress.
    Try,
}

struct Inner {
    source: Source,
    /// The process that started the exporter; in any other (a forked child) it does nothing.
    pid: u32,
    /// The metrics file, `{pid}` already replaced.
    file: Option<PathBuf>,
    /// `pid` label on every sample (when the file name holds `{pid}`).
    pid_label: Option<String>,
    textfile_errors: AtomicU64,
    /// Set while the file cannot be written: an outage is reported on stderr once.
    failing: AtomicBool,
    /// Set once a snapshot has panicked in the file thread (said once on stderr).
    panicked: AtomicBool,
    /// Held across snapshot, write and rename, so a later snapshot is never overwritten by
    /// an earlier one (the exit writer and the periodic thread).
    write_lock: Mutex<()>,
    /// Set when the periodic writes must stop (drop, exit); read under `write_lock`.
    stopping: AtomicBool,
    /// When they were first told to stop: the date of the HTTP exporter's last snapshot.
    stopped_at: OnceLock<SystemTime>,
    /// Dropping the sender wakes the file thread from its wait.
    wake_file_thread: Mutex<Option<Sender<()>>>,
    http_rejected: Mutex<Option<Arc<AtomicU64>>>,
    cache: Mutex<Option<Cached>>,
    snapshot_every: Duration,
}

impl Inner {
    /// Whether this is a forked child of the process that started the exporter.
    fn forked(&self) -> bool {
        std::process::id() != self.pid
    }

    fn exporter_stats(&self) -> ExporterStats {
        let http_rejected = self
            .http_rejected
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map_or(0, |c| c.load(Ordering::Relaxed));
        ExporterStats {
            textfile_errors: self.textfile_errors.load(Ordering::Relaxed),
            http_rejected,
        }
    }

    fn encode(&self, stats: &Stats) -> String {
        self.encode_at(stats, SystemTime::now())
    }

    fn encode_at(&self, stats: &Stats, at: SystemTime) -> String {
        let exporter = self.exporter_stats();
        match &self.pid_label {
            // Read at each snapshot, not once: a process checkpointed and restored (CRIU)
            // keeps its id under another start, or boot, which its file must then name.
            Some(pid) => {
                let identity = ProcessIdentity::of_this_process();
                encode_process(stats, &exporter, at, pid, identity.as_ref())
            }
            None => encode(stats, &exporter, at),
        }
    }

    fn render(&self) -> String {
        self.encode(&(self.source)())
    }

    /// The HTTP exporter's `/metrics` text or `/stats` JSON, from a snapshot at most
    /// `snapshot_every` old. Once the periodic writes stopped (shutdown, exit), the first
    /// snapshot taken since is served for good, dated when they stopped: like the file's last
    /// one, it then ages, so that a process that scrubs no more goes stale rather than look
    /// alive. (Taken at the first request rather than at the stop, which may run at exit,
    /// where a snapshot could wait on a pool lock a stuck thread holds.)
    ///
    /// The cache's lock is never held while a snapshot is taken (which takes the pool locks):
    /// the stop, which may run at exit, takes it, and must not wait behind a pool lock.
    fn served(&self, json: bool) -> String {
        let pick = |c: &Cached| {
            if json {
                c.json.clone()
            } else {
                c.metrics.clone()
            }
        };
        let stopped_at = self.stopped_at.get().copied();
        {
            let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            let fresh = cache.as_ref().filter(|c| match stopped_at {
                Some(_) => c.last,
                None => c.taken.elapsed() < self.snapshot_every,
            });
            if let Some(c) = fresh {
                return pick(c);
            }
        }
        let stats = (self.source)();
        let taken = Cached {
            taken: Instant::now(),
            last: stopped_at.is_some(),
            metrics: self.encode_at(&stats, stopped_at.unwrap_or_else(SystemTime::now)),
            json: stats.to_json(),
        };
        let served = pick(&taken);
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        // A last snapshot already stored stays (requests are served by one thread, but the
        // stop may come between the check above and here).
        if !cache.as_ref().is_some_and(|c| c.last) {
            *cache = Some(taken);
        }
        served
    }

    /// Stops the periodic writes: no new one starts, and the thread wakes from its wait.
    fn stop_file_thread(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        // The first stop: the HTTP exporter's next snapshot, taken after this, is its last
        // (`served` no longer serves one taken before). A later stop (exit after a shutdown)
        // leaves that one be.
        let _ = self.stopped_at.set(SystemTime::now());
        let sender = match self.wake_file_thread.try_lock() {
            Ok(mut s) => s.take(),
            Err(TryLockError::Poisoned(p)) => p.into_inner().take(),
            // Held only for a `take`: nothing to wait for.
            Err(TryLockError::WouldBlock) => None,
        };
        drop(sender);
    }

    /// Writes the file; `periodic` writes stop once `stopping` is set. `Ok` without writing in
    /// a forked child, without a file, or when `Wait::Try` finds another write in progress.
    fn write_file(&self, wait: Wait, periodic: bool) -> std::io::Result<()> {
        if self.forked() {
            return Ok(());
        }
        let Some(path) = &self.file else {
            return Ok(());
        };
        let _guard = match self.write_lock.try_lock() {
            Ok(g) => g,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) if wait == Wait::Try => return Ok(()),
            Err(TryLockError::WouldBlock) => {
                self.write_lock.lock().unwrap_or_else(|p| p.into_inner())
            }
        };
        if periodic && self.stopping.load(Ordering::SeqCst) {
            return Ok(());
        }
        let result = textfile::replace_snapshot(path, self.render().as_bytes());
        match &result {
            Ok(()) => {
                if self.failing.swap(false, Ordering::Relaxed) {
                    note(&format!("metrics file {} written again", path.display()));
                }
            }
            Err(e) => {
                self.textfile_errors.fetch_add(1, Ordering::Relaxed);
                if !self.failing.swap(true, Ordering::Relaxed) {
                    note(&format!(
                        "cannot write the metrics file {}: {e} (retried every interval, \
                         counted in kvh_metrics_textfile_errors_total; said again only after \
                         it recovers)",
                        path.display()
                    ));
                }
            }
        }
        result
    }

    /// One pass of the file thread: a panic in it (a snapshot or the encoding) is counted as
    /// a failed write and said once; the thread goes on.
    fn periodic_write(&self) {
        let run = std::panic::catch_unwind(AssertUnwindSafe(|| {
            // Errors are counted and reported inside.
            let _ = self.write_file(Wait::Block, true);
        }));
        if run.is_err() {
            self.textfile_errors.fetch_add(1, Ordering::Relaxed);
            if !self.panicked.swap(true, Ordering::Relaxed) {
                note(
                    "a metrics snapshot panicked in the metrics file thread (counted in \
                     kvh_metrics_textfile_errors_total; the thread goes on; said once)",
                );
            }
        }
    }
}

/// One line on stderr; a closed stderr is ignored (it must not panic the caller).
fn note(msg: &str) {
    crate::say(format_args!("kvhygiene: {msg}"));
}

impl Exporter {
    /// Starts what `cfg` asks for; `None` when both exports are off. A failure to start one
    /// (an address in use, a thread that cannot be spawned) is said once on stderr and
    /// leaves the other running: metrics never stop the allocator.
    pub fn start(cfg: &MetricsConfig, source: Source) -> Option<Exporter> {
        Self::start_opts(cfg, source, Options::default())
    }

    /// [`Exporter::start`] with explicit HTTP limits (tests).
    pub fn start_with(cfg: &MetricsConfig, source: Source, limits: http::Limits) -> Option<Self> {
        let opts = Options {
            limits,
            ..Options::default()
        };
        Self::start_opts(cfg, source, opts)
    }

    /// [`Exporter::start`] with explicit [`Options`].
    pub fn start_opts(cfg: &MetricsConfig, source: Source, opts: Options) -> Option<Self> {
        if cfg.file.is_none() && cfg.addr.is_none() {
            return None;
        }
        let pid = std::process::id();
        let interval = Duration::from_millis(cfg.interval_ms);
        let inner = Arc::new(Inner {
            source,
            pid,
            // A relative name is the working directory's at start-up, where `kvh preflight`
            // checked it: an engine that changes directory later still writes it there.
            file: cfg
                .file_for(pid)
                .map(|f| std::path::absolute(&f).unwrap_or(f)),
            pid_label: cfg.per_process().then(|| pid.to_string()),
            textfile_errors: AtomicU64::new(0),
            failing: AtomicBool::new(false),
            panicked: AtomicBool::new(false),
            write_lock: Mutex::new(()),
            stopping: AtomicBool::new(false),
            stopped_at: OnceLock::new(),
            wake_file_thread: Mutex::new(None),
            http_rejected: Mutex::new(None),
            cache: Mutex::new(None),
            snapshot_every: opts.snapshot_every.unwrap_or(Duration::from_secs(1)),
        });
        let http = cfg
            .addr
            .and_then(|addr| start_http(addr, &inner, opts.limits));
        let file_thread = inner
            .file
            .as_ref()
            .and_then(|_| spawn_file_thread(inner.clone(), interval));
        Some(Exporter {
            inner,
            http,
            file_thread,
        })
    }

    /// Writes the metrics file now (no-op without one, or in a forked child), waiting for a
    /// write in progress; errors are counted and reported like the periodic ones.
    pub fn write_file_now(&self) -> std::io::Result<()> {
        self.inner.write_file(Wait::Block, false)
    }

    /// The runtime's last write (at `kvh_shutdown` and at exit): [`Exporter::write_file_now`]
    /// on a helper thread, waited for at most `limit`, so that a hung filesystem cannot hang
    /// the caller. A periodic write in progress is waited for (within `limit`), so a normal
    /// exit leaves no temporary file. Nothing at all in a forked child: the file, and any lock
    /// a thread of the parent held at the fork, are the parent's. `Err(TimedOut)` when the
    /// write did not finish in time (it goes on, or not, on its own).
    pub fn write_file_bounded(&self, limit: Duration) -> std::io::Result<()> {
        if self.inner.forked() || self.inner.file.is_none() {
            return Ok(());
        }
        let (tx, rx) = mpsc::sync_channel(1);
        let inner = self.inner.clone();
        let spawned = std::thread::Builder::new()
            .name("kvh-metrics-last".into())
            .spawn(move || {
                let _ = tx.send(inner.write_file(Wait::Block, false));
            });
        if spawned.is_err() {
            // No thread to bound it: write only if no other write is in progress.
            return self.inner.write_file(Wait::Try, false);
        }
        match rx.recv_timeout(limit) {
            Ok(result) => result,
            Err(RecvTimeoutError::Timeout) => {
                note(&format!(
                    "the last metrics file write did not finish within {limit:?}; going on \
                     without it"
                ));
                Err(std::io::ErrorKind::TimedOut.into())
            }
            Err(RecvTimeoutError::Disconnected) => {
                self.inner.textfile_errors.fetch_add(1, Ordering::Relaxed);
                Err(std::io::Error::other("the metrics snapshot panicked"))
            }
        }
    }

    /// Stops the periodic writes for good (at exit): the write in progress, if any, finishes;
    /// no other starts. The HTTP exporter keeps serving its next snapshot, for good.
    pub fn stop_periodic(&self) {
        if !self.inner.forked() {
            self.inner.stop_file_thread();
        }
    }

    /// The exposition as it would be written now.
    pub fn render(&self) -> String {
        self.inner.render()
    }

    /// The HTTP exporter's bound address, when it runs.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http.as_ref().map(http::Server::local_addr)
    }

    /// The metrics file (`{pid}` replaced), when one is configured.
    pub fn file(&self) -> Option<&Path> {
        self.inner.file.as_deref()
    }
}

fn start_http(addr: SocketAddr, inner: &Arc<Inner>, limits: http::Limits) -> Option<http::Server> {
    let routes = Arc::new(InProcessRoutes {
        inner: inner.clone(),
    });
    match http::Server::start(addr, routes, limits, "kvh-metrics-http") {
        Ok(server) => {
            *inner
                .http_rejected
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = Some(server.rejected_counter());
            if addr.port() == 0 {
                note(&format!(
                    "metrics HTTP exporter listening on {} (KVH_METRICS_ADDR port 0)",
                    server.local_addr()
                ));
            }
            Some(server)
        }
        Err(e) => {
            note(&format!(
                "metrics HTTP exporter off: {} (KVH_METRICS_ADDR); the allocator runs \
                 without it",
                e.describe(addr)
            ));
            None
        }
    }
}

fn spawn_file_thread(inner: Arc<Inner>, every: Duration) -> Option<JoinHandle<()>> {
    let (tx, rx) = mpsc::channel::<()>();
    *inner
        .wake_file_thread
        .lock()
        .unwrap_or_else(|p| p.into_inner()) = Some(tx);
    let thread_inner = inner.clone();
    let spawned = std::thread::Builder::new()
        .name("kvh-metrics-file".into())
        .spawn(move || loop {
            if thread_inner.stopping.load(Ordering::SeqCst) {
                return;
            }
            thread_inner.periodic_write();
            match rx.recv_timeout(every) {
                Err(RecvTimeoutError::Timeout) => {}
                _ => return,
            }
        });
    match spawned {
        Ok(thread) => Some(thread),
        Err(e) => {
            note(&format!(
                "cannot start the metrics file thread ({e}); the file is written at exit only"
            ));
            None
        }
    }
}

/// The in-process exporter's endpoints.
struct InProcessRoutes {
    inner: Arc<Inner>,
}

impl http::Routes for InProcessRoutes {
    fn paths(&self) -> &[&'static str] {
        &["/metrics", "/stats", "/healthz"]
    }

    fn get(&self, path: &str) -> http::Response {
        match path {
            "/metrics" => http::Response::new(200, CONTENT_TYPE, self.inner.served(false)),
            "/stats" => http::Response::new(200, "application/json", self.inner.served(true)),
            _ => http::Response::text(200, "ok\n"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::PoolCounters;

    fn counting(n: Arc<AtomicU64>) -> Source {
        Arc::new(move || {
            let mut pool = PoolCounters::default();
            pool.counters.allocations = n.load(Ordering::SeqCst);
            Stats::merge("host".into(), &[pool], None)
        })
    }

    fn allocations(path: &Path) -> Option<f64> {
        let text = std::fs::read_to_string(path).ok()?;
        parse::parse(&text)
            .ok()?
            .value("kvh_allocations_total", &[])
    }

    /// Waits for child `pid` at most `limit`; past it, kills it and returns `None`.
    fn wait_child(pid: libc::pid_t, limit: Duration) -> Option<libc::c_int> {
        let start = Instant::now();
        let mut status: libc::c_int = 0;
        loop {
            // SAFETY: `pid` is our child; `status` is a valid out pointer.
            if unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } == pid {
                return Some(status);
            }
            if start.elapsed() > limit {
                // SAFETY: as above; the child is reaped after the kill.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                    libc::waitpid(pid, &mut status, 0);
                }
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn a_forked_child_neither_writes_the_file_nor_waits_on_the_parent_s_lock() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kvh.prom");
        let n = Arc::new(AtomicU64::new(5));
        let cfg = MetricsConfig {
            file: Some(path.clone()),
            interval_ms: 3_600_000,
            addr: None,
        };
        let exporter = Exporter::start(&cfg, counting(n.clone())).unwrap();
        // The file thread's first write; after it the thread sleeps for its hour-long interval,
        // so nothing but this test writes the file from here on.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while allocations(&path) != Some(5.0) {
            assert!(std::time::Instant::now() < deadline, "no first write");
            std::thread::sleep(Duration::from_millis(5));
        }
        // A write in progress in the parent at the fork: the child inherits the lock held by a
        // thread it does not have.
        let held = exporter.inner.write_lock.lock().unwrap();
        n.store(99, Ordering::SeqCst);
        // SAFETY: the child runs only the exporter's exit path, which returns at its pid
        // check (no lock, no allocation), and `_exit`s.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            exporter.stop_periodic();
            let bounded = exporter.write_file_bounded(Duration::from_secs(1)).is_ok();
            let now = exporter.write_file_now().is_ok();
            // SAFETY: ends the child at once, running no destructor or exit handler.
            unsafe { libc::_exit(if bounded && now { 0 } else { 3 }) };
        }
        // A hung child would wait forever: 30 s is far from both outcomes.
        let status = wait_child(pid, Duration::from_secs(30)).expect("the child hung");
        drop(held);
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "child status {status:#x}"
        );
        // The child's snapshot (99) did not replace the parent's.
        assert_eq!(allocations(&path), Some(5.0));
        // The parent's exporter is untouched: it still writes.
        exporter
            .write_file_bounded(Duration::from_secs(30))
            .unwrap();
        assert_eq!(allocations(&path), Some(99.0));
    }

    #[test]
    fn the_last_write_at_exit_stops_the_periodic_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kvh.prom");
        let n = Arc::new(AtomicU64::new(1));
        let cfg = MetricsConfig {
            file: Some(path.clone()),
            interval_ms: 100,
            addr: None,
        };
        let exporter = Exporter::start(&cfg, counting(n.clone())).unwrap();
        exporter.stop_periodic();
        n.store(2, Ordering::SeqCst);
        exporter
            .write_file_bounded(Duration::from_secs(30))
            .unwrap();
        assert_eq!(allocations(&path), Some(2.0));
        // The stopped thread never writes again: a later value stays out of the file.
        n.store(3, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(allocations(&path), Some(2.0));
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("kvh.prom")]);
    }

    /// A file there that is not a snapshot (a key file named by mistake) is never replaced:
    /// every write is refused and counted, and the file stays as it was.
    #[test]
    fn a_file_that_is_not_a_snapshot_is_not_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hmac.key");
        std::fs::write(&path, "00112233\n").unwrap();
        let cfg = MetricsConfig {
            file: Some(path.clone()),
            interval_ms: 3_600_000,
            addr: None,
        };
        let exporter = Exporter::start(&cfg, counting(Arc::new(AtomicU64::new(1)))).unwrap();
        let err = exporter.write_file_now().unwrap_err();
        assert!(
            err.to_string().contains("not a kvhygiene metrics snapshot"),
            "{err}"
        );
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "00112233\n");
        assert!(exporter.inner.textfile_errors.load(Ordering::Relaxed) >= 1);
    }

    #[test]
    fn the_last_write_gives_up_on_a_write_that_does_not_finish() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = MetricsConfig {
            file: Some(dir.path().join("kvh.prom")),
            interval_ms: 3_600_000,
            addr: None,
        };
        let exporter = Exporter::start(&cfg, counting(Arc::new(AtomicU64::new(1)))).unwrap();
        // A writer stuck inside the lock (as on a hung filesystem).
        let held = exporter.inner.write_lock.lock().unwrap();
        let err = exporter
            .write_file_bounded(Duration::from_millis(200))
            .unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
        drop(held);
    }

    #[test]
    fn a_panicking_snapshot_is_counted_and_the_file_thread_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kvh.prom");
        let calls = Arc::new(AtomicU64::new(0));
        let c = calls.clone();
        // The first two snapshots panic.
        let source: Source = Arc::new(move || {
            if c.fetch_add(1, Ordering::SeqCst) < 2 {
                panic!("snapshot failure (test)");
            }
            Stats::merge("host".into(), &[PoolCounters::default()], None)
        });
        let cfg = MetricsConfig {
            file: Some(path.clone()),
            interval_ms: 100,
            addr: None,
        };
        let exporter = Exporter::start(&cfg, source).unwrap();
        let start = Instant::now();
        while !path.exists() {
            assert!(start.elapsed() < Duration::from_secs(30), "no file written");
            std::thread::sleep(Duration::from_millis(20));
        }
        drop(exporter);
        let text = std::fs::read_to_string(&path).unwrap();
        let e = parse::parse(&text).unwrap();
        assert!(e.value("kvh_metrics_textfile_errors_total", &[]) >= Some(2.0));
    }

    #[test]
    fn the_http_snapshot_is_cached_for_snapshot_every() {
        let calls = Arc::new(AtomicU64::new(0));
        let c = calls.clone();
        let source: Source = Arc::new(move || {
            c.fetch_add(1, Ordering::SeqCst);
            Stats::merge("host".into(), &[PoolCounters::default()], None)
        });
        let cfg = MetricsConfig {
            file: None,
            interval_ms: 10_000,
            addr: Some("127.0.0.1:0".parse().unwrap()),
        };
        let routes = |every| {
            let opts = Options {
                snapshot_every: Some(every),
                ..Options::default()
            };
            let exporter = Exporter::start_opts(&cfg, source.clone(), opts).unwrap();
            let routes = InProcessRoutes {
                inner: exporter.inner.clone(),
            };
            (exporter, routes)
        };
        use http::Routes as _;
        let (_running, cached) = routes(Duration::from_secs(3600));
        calls.store(0, Ordering::SeqCst);
        let m = cached.get("/metrics");
        let j = cached.get("/stats");
        cached.get("/metrics");
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "one snapshot for three requests"
        );
        assert!(String::from_utf8(m.body)
            .unwrap()
            .contains("kvh_allocations_total 0"));
        let j: serde_json::Value = serde_json::from_slice(&j.body).unwrap();
        assert_eq!(j["counters"]["allocations"], 0);
        let (_running, uncached) = routes(Duration::ZERO);
        calls.store(0, Ordering::SeqCst);
        uncached.get("/metrics");
        uncached.get("/stats");
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        // Once the periodic writes stopped, one more snapshot, served for good.
        uncached.inner.stop_file_thread();
        calls.store(0, Ordering::SeqCst);
        let last = uncached.get("/metrics");
        uncached.get("/stats");
        assert_eq!(uncached.get("/metrics"), last);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_relative_file_name_is_the_working_directory_s_at_start() {
        let cfg = MetricsConfig {
            file: Some(PathBuf::from("no-such-directory/kvh.prom")),
            interval_ms: 3_600_000,
            addr: None,
        };
        let exporter = Exporter::start(&cfg, counting(Arc::new(AtomicU64::new(4)))).unwrap();
        let want = std::env::current_dir()
            .unwrap()
            .join("no-such-directory/kvh.prom");
        assert_eq!(exporter.file(), Some(want.as_path()));
    }

    #[test]
    fn a_pid_file_name_gives_each_process_its_file_and_a_pid_label() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = MetricsConfig {
            file: Some(dir.path().join("kvh-{pid}.prom")),
            interval_ms: 3_600_000,
            addr: None,
        };
        let exporter = Exporter::start(&cfg, counting(Arc::new(AtomicU64::new(4)))).unwrap();
        let pid = std::process::id().to_string();
        let want = dir.path().join(format!("kvh-{pid}.prom"));
        assert_eq!(exporter.file(), Some(want.as_path()));
        exporter.write_file_now().unwrap();
        let e = parse::parse(&std::fs::read_to_string(&want).unwrap()).unwrap();
        assert!(e
            .samples
            .iter()
            .all(|s| s.label("pid") == Some(pid.as_str())));
        assert_eq!(e.value("kvh_allocations_total", &[]), Some(4.0));
        // The writer's identity, by which readers tell its file from an ended process's.
        let me = ProcessIdentity::of_this_process().unwrap();
        let boot = [("boot_id", me.boot_id.as_str()), ("pid", pid.as_str())];
        assert_eq!(
            e.value(encode::PROCESS_START_TICKS, &boot),
            Some(me.start_ticks as f64)
        );
        // Without `{pid}`, no label.
        let plain = MetricsConfig {
            file: Some(dir.path().join("kvh.prom")),
            ..cfg
        };
        let exporter = Exporter::start(&plain, counting(Arc::new(AtomicU64::new(4)))).unwrap();
        let e = parse::parse(&exporter.render()).unwrap();
        assert!(e.samples.iter().all(|s| s.label("pid").is_none()));
        assert!(
            e.sample(encode::PROCESS_START_TICKS).is_none(),
            "one file, one writer: no identity"
        );
    }
}

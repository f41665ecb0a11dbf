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
//! - [`cli`]: the `metrics` and `serve-metrics` verbs.
//!
//! Metrics are read from [`Stats`] snapshots (`Allocator::stats`, the same as
//! `kvh_stats_json`) on the exporters' own threads, never on the allocation path.

pub mod cli;
pub mod encode;
pub mod http;
pub mod parse;
pub mod textfile;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use crate::config::MetricsConfig;
use crate::stats::Stats;

pub use encode::{encode, ExporterStats, CONTENT_TYPE};

/// Where the exporters get their snapshot: the allocator's [`Stats`] with the embedding
/// layer's `log` field set, exactly as `kvh_stats_json` reports them.
pub type Source = Arc<dyn Fn() -> Stats + Send + Sync>;

/// The running exports of one process. Dropping it stops the file thread and the HTTP server
/// (the process-wide one lives until exit).
pub struct Exporter {
    inner: Arc<Inner>,
    http: Option<http::Server>,
    /// The file thread and the sender whose drop stops it.
    file_thread: Option<(Sender<()>, JoinHandle<()>)>,
}

impl Drop for Exporter {
    fn drop(&mut self) {
        if let Some((stop, thread)) = self.file_thread.take() {
            drop(stop);
            // The thread ends after at most the write in progress.
            let _ = thread.join();
        }
    }
}

struct Inner {
    source: Source,
    file: Option<PathBuf>,
    textfile_errors: AtomicU64,
    /// Set while the file cannot be written: an outage is reported on stderr once.
    failing: AtomicBool,
    /// Held across snapshot, write and rename, so a later snapshot is never overwritten by
    /// an earlier one (the exit writer and the periodic thread).
    write_lock: Mutex<()>,
    http_rejected: Mutex<Option<Arc<AtomicU64>>>,
}

impl Inner {
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

    fn render(&self) -> String {
        let stats = (self.source)();
        encode(&stats, &self.exporter_stats(), SystemTime::now())
    }

    fn write_file(&self) -> std::io::Result<()> {
        let Some(path) = &self.file else {
            return Ok(());
        };
        let _guard = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        let result = textfile::write_atomic(path, self.render().as_bytes());
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
}

/// One line on stderr; a closed stderr is ignored (it must not panic the caller).
fn note(msg: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "kvhygiene: {msg}");
}

impl Exporter {
    /// Starts what `cfg` asks for; `None` when both exports are off. A failure to start one
    /// (an address in use, a thread that cannot be spawned) is said once on stderr and
    /// leaves the other running: metrics never stop the allocator.
    pub fn start(cfg: &MetricsConfig, source: Source) -> Option<Exporter> {
        Self::start_with(cfg, source, http::Limits::default())
    }

    /// [`Exporter::start`] with explicit HTTP limits (tests).
    pub fn start_with(cfg: &MetricsConfig, source: Source, limits: http::Limits) -> Option<Self> {
        if cfg.file.is_none() && cfg.addr.is_none() {
            return None;
        }
        let inner = Arc::new(Inner {
            source,
            file: cfg.file.clone(),
            textfile_errors: AtomicU64::new(0),
            failing: AtomicBool::new(false),
            write_lock: Mutex::new(()),
            http_rejected: Mutex::new(None),
        });
        let http = cfg.addr.and_then(|addr| start_http(addr, &inner, limits));
        let file_thread = cfg
            .file
            .as_ref()
            .and_then(|_| spawn_file_thread(inner.clone(), Duration::from_millis(cfg.interval_ms)));
        Some(Exporter {
            inner,
            http,
            file_thread,
        })
    }

    /// Writes the metrics file now (no-op without one). Used at shutdown and exit; errors
    /// are counted and reported like the periodic ones.
    pub fn write_file_now(&self) -> std::io::Result<()> {
        self.inner.write_file()
    }

    /// The exposition as it would be written now.
    pub fn render(&self) -> String {
        self.inner.render()
    }

    /// The HTTP exporter's bound address, when it runs.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http.as_ref().map(http::Server::local_addr)
    }

    /// The metrics file, when one is configured.
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
            Some(server)
        }
        Err(e) => {
            note(&format!(
                "metrics HTTP exporter off: cannot listen on {addr} (KVH_METRICS_ADDR): {e}; \
                 the allocator runs without it"
            ));
            None
        }
    }
}

fn spawn_file_thread(inner: Arc<Inner>, every: Duration) -> Option<(Sender<()>, JoinHandle<()>)> {
    let (tx, rx) = mpsc::channel::<()>();
    let spawned = std::thread::Builder::new()
        .name("kvh-metrics-file".into())
        .spawn(move || loop {
            // Errors are counted and reported inside.
            let _ = inner.write_file();
            match rx.recv_timeout(every) {
                Err(RecvTimeoutError::Timeout) => {}
                _ => return,
            }
        });
    match spawned {
        Ok(thread) => Some((tx, thread)),
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
            "/metrics" => http::Response::new(200, CONTENT_TYPE, self.inner.render()),
            "/stats" => {
                http::Response::new(200, "application/json", (self.inner.source)().to_json())
            }
            _ => http::Response::text(200, "ok\n"),
        }
    }
}

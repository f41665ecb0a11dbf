//! The metrics exports: the periodic metrics file and the in-process HTTP exporter, driven
//! through `metrics::Exporter` with a real host-backend allocator or a hand-made source. Only
//! loopback networking.

#[path = "http_common/mod.rs"]
mod http_common;
#[path = "skip/mod.rs"]
mod skip;

use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_common::{read_reply, Reply};
use kvhygiene::alloc::Allocator;
use kvhygiene::backend::{self, StreamHandle};
use kvhygiene::config::{BackendChoice, Config, MetricsConfig};
use kvhygiene::forensic::LogStats;
use kvhygiene::metrics::http::{Limits, Response, Routes, Server};
use kvhygiene::metrics::parse::{parse, Exposition};
use kvhygiene::metrics::{Exporter, Source};
use kvhygiene::stats::{PoolCounters, Stats};

/// Stats whose `allocations` counter is whatever `n` holds.
fn counting_source(n: Arc<AtomicU64>) -> Source {
    Arc::new(move || {
        let mut pool = PoolCounters::default();
        pool.counters.allocations = n.load(Ordering::SeqCst);
        let mut stats = Stats::merge("host".into(), &[pool], None);
        stats.log = serde_json::to_value(LogStats::disabled()).ok();
        stats
    })
}

fn read_metrics(path: &std::path::Path) -> Option<Exposition> {
    let text = std::fs::read_to_string(path).ok()?;
    Some(parse(&text).expect("the metrics file parses"))
}

fn wait_for(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ok() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn the_metrics_file_is_rewritten_every_interval_and_on_demand() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kvh.prom");
    let n = Arc::new(AtomicU64::new(5));
    let cfg = MetricsConfig {
        file: Some(path.clone()),
        interval_ms: 100,
        addr: None,
    };
    let exporter = Exporter::start(&cfg, counting_source(n.clone())).unwrap();
    assert_eq!(exporter.file(), Some(path.as_path()));
    assert!(exporter.http_addr().is_none());
    // Written at start, then periodically: a new value shows up without any call.
    wait_for("the first snapshot", Duration::from_secs(30), || {
        read_metrics(&path).and_then(|e| e.value("kvh_allocations_total", &[])) == Some(5.0)
    });
    n.store(9, Ordering::SeqCst);
    wait_for("a periodic snapshot", Duration::from_secs(30), || {
        read_metrics(&path).and_then(|e| e.value("kvh_allocations_total", &[])) == Some(9.0)
    });
    let e = read_metrics(&path).unwrap();
    assert_eq!(e.value("kvh_log_enabled", &[]), Some(0.0));
    assert_eq!(e.value("kvh_metrics_textfile_errors_total", &[]), Some(0.0));
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&path).unwrap().permissions());
    assert_eq!(
        mode & 0o133,
        0,
        "not executable, not writable by others: {mode:o}"
    );
    // Only the snapshot is left in the directory once the file thread has stopped (dropping
    // the exporter joins it): temporary files are renamed away.
    drop(exporter);
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, vec!["kvh.prom".to_string()]);
    // The exit path: an explicit write reflects the latest value at once.
    n.store(11, Ordering::SeqCst);
    let cfg = MetricsConfig {
        interval_ms: 3_600_000,
        ..cfg
    };
    let exporter = Exporter::start(&cfg, counting_source(n.clone())).unwrap();
    n.store(12, Ordering::SeqCst);
    exporter.write_file_now().unwrap();
    let e = read_metrics(&path).unwrap();
    assert_eq!(e.value("kvh_allocations_total", &[]), Some(12.0));
}

#[test]
fn a_metrics_file_that_cannot_be_written_is_counted_and_retried() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("later/kvh.prom");
    let cfg = MetricsConfig {
        file: Some(path.clone()),
        interval_ms: 100,
        addr: None,
    };
    let exporter = Exporter::start(&cfg, counting_source(Arc::new(AtomicU64::new(1)))).unwrap();
    assert!(exporter.write_file_now().is_err());
    let errors = |text: &str| {
        parse(text)
            .unwrap()
            .value("kvh_metrics_textfile_errors_total", &[])
            .unwrap()
    };
    assert!(errors(&exporter.render()) >= 1.0);
    // The directory appears (a volume mounted late): the next period writes the file.
    std::fs::create_dir(dir.path().join("later")).unwrap();
    wait_for("the file after recovery", Duration::from_secs(30), || {
        path.exists()
    });
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(errors(&text) >= 1.0, "the failures stay counted");
}

#[test]
fn metrics_come_from_the_allocator_s_own_counters() {
    let backend = backend::select(BackendChoice::Host).unwrap();
    let alloc = Allocator::new(backend, Config::default(), None);
    for _ in 0..3 {
        let p = alloc.malloc(4096, 0, StreamHandle(0)).unwrap();
        alloc.free(p, 4096, 0, StreamHandle(0)).unwrap();
    }
    alloc.synchronize().unwrap();
    let a = alloc.clone();
    let source: Source = Arc::new(move || a.stats());
    let cfg = MetricsConfig {
        file: None,
        interval_ms: 10_000,
        addr: Some("127.0.0.1:0".parse().unwrap()),
    };
    let exporter = Exporter::start(&cfg, source).unwrap();
    let stats = alloc.stats();
    let e = parse(&exporter.render()).unwrap();
    let c = &stats.counters;
    for (name, labels, want) in [
        ("kvh_allocations_total", &[][..], c.allocations),
        ("kvh_frees_total", &[], c.frees),
        ("kvh_scrubs_total", &[], c.scrubs),
        ("kvh_scrubbed_bytes_total", &[], c.bytes_scrubbed),
        (
            "kvh_verifications_total",
            &[("result", "passed")],
            c.verifications_passed,
        ),
        (
            "kvh_pool_blocks",
            &[("state", "clean")],
            stats.accounting.clean.blocks,
        ),
    ] {
        assert_eq!(e.value(name, labels), Some(want as f64), "{name}");
    }
    assert_eq!(c.allocations, 3);
    assert!(c.verifications_passed >= 3);
    let info = e.sample("kvh_build_info").unwrap();
    assert_eq!(info.label("backend"), Some("host"));
    // Over HTTP too.
    let addr = exporter.http_addr().unwrap();
    let r = get(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    let e = parse(&r.body).unwrap();
    assert_eq!(e.value("kvh_allocations_total", &[]), Some(3.0));
}

fn request(addr: SocketAddr, raw: &[u8]) -> Reply {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(raw).unwrap();
    read_reply(&mut s)
}

fn get(addr: SocketAddr, raw: &str) -> Reply {
    request(addr, raw.as_bytes())
}

fn http_exporter(limits: Limits) -> (Exporter, SocketAddr) {
    let cfg = MetricsConfig {
        file: None,
        interval_ms: 10_000,
        addr: Some("127.0.0.1:0".parse().unwrap()),
    };
    let exporter =
        Exporter::start_with(&cfg, counting_source(Arc::new(AtomicU64::new(42))), limits).unwrap();
    let addr = exporter.http_addr().unwrap();
    (exporter, addr)
}

#[test]
fn http_exporter_serves_metrics_stats_and_health() {
    let (_exporter, addr) = http_exporter(Limits::default());
    let r = get(addr, "GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n");
    assert_eq!(r.status, 200, "{}", r.head);
    assert!(
        r.head
            .contains("Content-Type: text/plain; version=0.0.4; charset=utf-8"),
        "{}",
        r.head
    );
    assert!(r
        .head
        .contains(&format!("Content-Length: {}", r.body.len())));
    let e = parse(&r.body).unwrap();
    assert_eq!(e.value("kvh_allocations_total", &[]), Some(42.0));
    // A query string does not change the path.
    assert_eq!(get(addr, "GET /metrics?x=1 HTTP/1.0\r\n\r\n").status, 200);

    let r = get(addr, "GET /stats HTTP/1.1\r\n\r\n");
    assert_eq!(r.status, 200);
    assert!(r.head.contains("Content-Type: application/json"));
    let json: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(json["counters"]["allocations"], 42);
    assert_eq!(json["log"]["enabled"], false);

    let r = get(addr, "GET /healthz HTTP/1.1\r\n\r\n");
    assert_eq!((r.status, r.body.as_str()), (200, "ok\n"));

    let r = get(addr, "HEAD /metrics HTTP/1.1\r\n\r\n");
    assert_eq!(r.status, 200);
    assert!(r.body.is_empty(), "HEAD has no body");

    assert_eq!(get(addr, "GET /nope HTTP/1.1\r\n\r\n").status, 404);
    assert_eq!(get(addr, "GET / HTTP/1.1\r\n\r\n").status, 404);
    for method in ["POST", "PUT", "DELETE"] {
        let r = get(
            addr,
            &format!("{method} /metrics HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc"),
        );
        assert_eq!(r.status, 405, "{method}");
        assert!(r.head.contains("Allow: GET, HEAD"), "{}", r.head);
    }
    assert_eq!(get(addr, "BREW\r\n\r\n").status, 400);
    assert_eq!(get(addr, "GET /metrics SPDY/3\r\n\r\n").status, 400);
}

#[test]
fn an_oversized_request_is_refused_and_counted() {
    let (exporter, addr) = http_exporter(Limits::default());
    let mut raw = b"GET /metrics HTTP/1.1\r\n".to_vec();
    while raw.len() < 64 * 1024 {
        raw.extend_from_slice(b"X-Filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
    }
    raw.extend_from_slice(b"\r\n");
    let r = request(addr, &raw);
    assert_eq!(r.status, 431, "{}", r.head);
    // The server is still serving, and says what it refused.
    let r = get(addr, "GET /metrics HTTP/1.1\r\n\r\n");
    assert_eq!(r.status, 200);
    let e = parse(&r.body).unwrap();
    assert_eq!(e.value("kvh_metrics_http_rejected_total", &[]), Some(1.0));
    drop(exporter);
}

#[test]
fn the_request_size_limit_is_exact_even_in_one_read() {
    let limits = Limits {
        max_request_bytes: 1024,
        ..Limits::default()
    };
    let (_exporter, addr) = http_exporter(limits);
    let head = |len: usize| {
        let mut h = "GET /healthz HTTP/1.1\r\nX-Pad: ".to_string();
        h.push_str(&"p".repeat(len - h.len() - 4));
        h.push_str("\r\n\r\n");
        assert_eq!(h.len(), len);
        h
    };
    assert_eq!(get(addr, &head(1024)).status, 200);
    assert_eq!(get(addr, &head(1025)).status, 431);
}

#[test]
fn a_slow_client_neither_hangs_the_server_nor_delays_others() {
    // Stalled clients hold their slot for 10 s; the next client must be served long before.
    let limits = Limits {
        request_timeout: Duration::from_secs(10),
        ..Limits::default()
    };
    let (_exporter, addr) = http_exporter(limits);
    // A client that sends half a request line and stalls, and one that sends nothing.
    let mut slow = TcpStream::connect(addr).unwrap();
    slow.write_all(b"GET /met").unwrap();
    let _silent = TcpStream::connect(addr).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let start = Instant::now();
    let r = get(addr, "GET /metrics HTTP/1.1\r\n\r\n");
    assert_eq!(r.status, 200);
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "the next client waited {:?}",
        start.elapsed()
    );
}

#[test]
fn a_stalled_request_is_cut_off_at_its_deadline_with_408() {
    let limits = Limits {
        request_timeout: Duration::from_millis(300),
        ..Limits::default()
    };
    let (exporter, addr) = http_exporter(limits);
    let mut slow = TcpStream::connect(addr).unwrap();
    slow.write_all(b"GET /met").unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let r = read_reply(&mut slow);
    assert_eq!(r.status, 408, "{}", r.head);
    drop(exporter);
}

#[test]
fn connections_beyond_the_limit_are_refused_at_once() {
    // The two held connections would time out after 30 s; the refusal must come long before.
    let limits = Limits {
        max_connections: 2,
        request_timeout: Duration::from_secs(30),
        ..Limits::default()
    };
    let (_exporter, addr) = http_exporter(limits);
    let _a = TcpStream::connect(addr).unwrap();
    let _b = TcpStream::connect(addr).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let start = Instant::now();
    let r = get(addr, "GET /metrics HTTP/1.1\r\n\r\n");
    assert_eq!(r.status, 503, "{}", r.head);
    assert!(start.elapsed() < Duration::from_secs(10));
}

/// Connections that sent nothing for a second do not keep a new one out: with every slot held
/// by idle connections (whose own deadline is far off), a liveness probe is served, and the
/// oldest idle connection is the one closed for it; the younger one keeps its slot.
#[test]
fn a_new_connection_takes_the_slot_of_the_oldest_that_sent_nothing_for_a_second() {
    let limits = Limits {
        max_connections: 2,
        request_timeout: Duration::from_secs(30),
        ..Limits::default()
    };
    let (exporter, addr) = http_exporter(limits);
    let mut oldest = TcpStream::connect(addr).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let mut younger = TcpStream::connect(addr).unwrap();
    std::thread::sleep(Duration::from_millis(1100));
    let r = get(addr, "GET /healthz HTTP/1.1\r\n\r\n");
    assert_eq!(
        r.status, 200,
        "the probe was kept out by idle connections: {}",
        r.head
    );
    oldest
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut byte = [0u8; 1];
    let closed = matches!(std::io::Read::read(&mut oldest, &mut byte), Ok(0) | Err(_));
    assert!(closed, "the oldest idle connection still holds its slot");
    // The younger one was not closed: it is served when it sends its request.
    younger.write_all(b"GET /healthz HTTP/1.1\r\n\r\n").unwrap();
    younger
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let r = read_reply(&mut younger);
    assert_eq!(r.status, 200, "{}", r.head);
    let rejected = parse(&exporter.render())
        .unwrap()
        .value("kvh_metrics_http_rejected_total", &[])
        .unwrap();
    assert_eq!(
        rejected, 1.0,
        "the closed idle connection is counted as refused"
    );
}

/// Routes whose `/big` answers 32 MiB: more than loopback's socket buffers hold, so that a
/// client that asks for it and reads nothing keeps the server's write waiting.
struct Big;

impl Routes for Big {
    fn paths(&self) -> &[&'static str] {
        &["/big", "/healthz"]
    }

    fn get(&self, path: &str) -> Response {
        let body = if path == "/big" {
            vec![b'#'; 32 << 20]
        } else {
            b"ok\n".to_vec()
        };
        Response::text(200, body)
    }
}

/// Clients that ask for a response and stop reading it stall as surely as clients that send
/// nothing: a newcomer finding every slot taken by them takes the slot of the one stalled
/// longest, rather than every probe being refused until the write timeout (here a minute).
#[test]
fn a_new_connection_takes_the_slot_of_a_client_that_read_none_of_its_response_for_a_second() {
    let limits = Limits {
        max_connections: 2,
        write_timeout: Duration::from_secs(60),
        ..Limits::default()
    };
    let server = Server::start(
        "127.0.0.1:0".parse().unwrap(),
        Arc::new(Big),
        limits,
        "test-http",
    )
    .unwrap();
    let addr = server.local_addr();
    let asking: Vec<TcpStream> = (0..2)
        .map(|_| {
            let mut s = TcpStream::connect(addr).unwrap();
            s.write_all(b"GET /big HTTP/1.1\r\n\r\n").unwrap();
            s
        })
        .collect();
    // The writes stall once the socket buffers are full, a second after which the slot is
    // free; probes until then are refused (503).
    let start = Instant::now();
    loop {
        let r = get(addr, "GET /healthz HTTP/1.1\r\n\r\n");
        if r.status == 200 {
            break;
        }
        assert_eq!(r.status, 503, "{}", r.head);
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the probe was kept out by clients that stopped reading: {}",
            r.head
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(asking);
}

/// Routes whose `/boom` panics.
struct Panicking;

impl Routes for Panicking {
    fn paths(&self) -> &[&'static str] {
        &["/boom", "/healthz"]
    }

    fn get(&self, path: &str) -> Response {
        if path == "/boom" {
            panic!("route failure (test)");
        }
        Response::text(200, "ok\n")
    }
}

#[test]
fn a_panicking_route_is_answered_500_and_the_server_goes_on() {
    let server = Server::start(
        "127.0.0.1:0".parse().unwrap(),
        Arc::new(Panicking),
        Limits::default(),
        "test-http",
    )
    .unwrap();
    let addr = server.local_addr();
    let r = get(addr, "GET /boom HTTP/1.1\r\n\r\n");
    assert_eq!(r.status, 500, "{}", r.head);
    assert_eq!(get(addr, "GET /healthz HTTP/1.1\r\n\r\n").status, 200);
    assert_eq!(get(addr, "GET /boom HTTP/1.1\r\n\r\n").status, 500);
}

#[test]
fn an_ipv6_wildcard_server_stops_on_drop() {
    // Where IPv6 is unavailable there is nothing to bind, hence nothing to test.
    let Ok(server) = Server::start(
        "[::]:0".parse().unwrap(),
        Arc::new(Panicking),
        Limits::default(),
        "test-http6",
    ) else {
        return;
    };
    let port = server.local_addr().port();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        drop(server);
        let _ = tx.send(());
    });
    // A hang would never end; the drop takes well under a second.
    rx.recv_timeout(Duration::from_secs(30))
        .expect("dropping the server hung");
    // The thread was joined and the listener closed, not left parked: the port is free again.
    TcpListener::bind(("::", port)).expect("the listener is closed after the drop");
}

#[test]
fn an_address_in_use_leaves_the_file_export_running() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kvh.prom");
    let cfg = MetricsConfig {
        file: Some(path.clone()),
        interval_ms: 100,
        addr: Some(taken.local_addr().unwrap()),
    };
    let exporter = Exporter::start(&cfg, counting_source(Arc::new(AtomicU64::new(1)))).unwrap();
    assert!(exporter.http_addr().is_none());
    wait_for("the file", Duration::from_secs(30), || path.exists());
}

#[test]
fn nothing_starts_when_both_exports_are_off() {
    let source = counting_source(Arc::new(AtomicU64::new(0)));
    assert!(Exporter::start(&MetricsConfig::default(), source).is_none());
}

/// A bare LF ends a line (the server already reads `GET ... HTTP/1.1\n\n`); a request line
/// ended by LF and followed by an empty CRLF line is a complete request too, answered at once
/// rather than held to the request deadline and refused with 408.
#[test]
fn a_request_line_ended_by_lf_then_an_empty_crlf_line_is_served() {
    let limits = Limits {
        request_timeout: Duration::from_secs(2),
        ..Limits::default()
    };
    let (_exporter, addr) = http_exporter(limits);
    let start = Instant::now();
    let r = get(addr, "GET /healthz HTTP/1.1\n\r\n");
    assert_eq!(r.status, 200, "after {:?}: {}", start.elapsed(), r.head);
    // An empty line before the request line is ignored (RFC 9112, 2.2).
    let r = get(addr, "\r\nGET /healthz HTTP/1.1\r\n\r\n");
    assert_eq!(r.status, 200, "{}", r.head);
}

/// A request head that grows past the size limit without ending is refused (431) as soon as
/// it passes the limit, not read on until its deadline.
#[test]
fn a_request_head_that_never_ends_is_refused_once_past_the_size_limit() {
    let limits = Limits {
        max_request_bytes: 1024,
        request_timeout: Duration::from_secs(60),
        ..Limits::default()
    };
    let (_exporter, addr) = http_exporter(limits);
    let mut raw = b"GET /metrics HTTP/1.1\r\n".to_vec();
    while raw.len() < 4096 {
        raw.extend_from_slice(b"X-Filler: aaaaaaaaaaaaaaaa\r\n");
    }
    let start = Instant::now();
    let r = request(addr, &raw);
    assert_eq!(r.status, 431, "{}", r.head);
    assert!(start.elapsed() < Duration::from_secs(10));
}

/// Refusals take at most as many slots again as the limit: beyond twice the limit a
/// connection is closed at once, unanswered.
#[test]
fn connections_beyond_twice_the_limit_are_closed_unanswered() {
    let limits = Limits {
        max_connections: 1,
        request_timeout: Duration::from_secs(30),
        ..Limits::default()
    };
    let (_exporter, addr) = http_exporter(limits);
    // Served (holds the one slot); refused with 503 (drained for a while, holding a slot).
    let _held = TcpStream::connect(addr).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let _refused = TcpStream::connect(addr).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let r = get(addr, "GET /metrics HTTP/1.1\r\n\r\n");
    assert_eq!(r.status, 0, "answered: {}", r.head);
    assert!(r.head.is_empty(), "{}", r.head);
}

/// After the periodic writes stop (`kvh_shutdown`), the HTTP exporter serves one last snapshot
/// for good, which "ages as the file's last one does" (README): its
/// `kvh_snapshot_timestamp_seconds` is the moment the process stopped scrubbing, as the
/// file's, not the moment a scraper first asked after it.
#[test]
fn the_http_exporter_s_last_snapshot_is_dated_when_the_periodic_writes_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kvh.prom");
    let cfg = MetricsConfig {
        file: Some(path.clone()),
        interval_ms: 10_000,
        addr: Some("127.0.0.1:0".parse().unwrap()),
    };
    let exporter = Exporter::start(&cfg, counting_source(Arc::new(AtomicU64::new(1)))).unwrap();
    let addr = exporter.http_addr().unwrap();
    // As kvh_shutdown does: the periodic writes stop, then the file's last snapshot.
    exporter.stop_periodic();
    exporter.write_file_bounded(Duration::from_secs(5)).unwrap();
    let file_ts = read_metrics(&path)
        .unwrap()
        .value("kvh_snapshot_timestamp_seconds", &[])
        .unwrap();
    std::thread::sleep(Duration::from_millis(2500));
    let r = get(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    let http_ts = parse(&r.body)
        .unwrap()
        .value("kvh_snapshot_timestamp_seconds", &[])
        .unwrap();
    assert!(
        http_ts - file_ts < 1.0,
        "the HTTP exporter's last snapshot is dated {http_ts}, {:.1} s after the file's last \
         one ({file_ts}): it looks fresh to a scraper although the process stopped scrubbing",
        http_ts - file_ts
    );
}

/// The exit handler stops the periodic writes (`Exporter::stop_periodic`) and must never wait
/// on a pool lock for long (ARCHITECTURE.md, invariant 6). A scrape that arrived just before
/// exit may be taking a snapshot that waits on a pool lock a stuck thread holds; stopping the
/// periodic writes must still return promptly rather than wait for that snapshot.
#[test]
fn stopping_the_periodic_writes_does_not_wait_for_a_snapshot_stuck_on_a_lock() {
    use std::sync::atomic::AtomicBool;
    use std::sync::Mutex;

    let pool_lock = Arc::new(Mutex::new(()));
    let entered = Arc::new(AtomicBool::new(false));
    let block = Arc::new(AtomicBool::new(false));
    let inner = counting_source(Arc::new(AtomicU64::new(1)));
    let source: Source = {
        let (pool_lock, entered, block) = (pool_lock.clone(), entered.clone(), block.clone());
        Arc::new(move || {
            if block.load(Ordering::SeqCst) {
                entered.store(true, Ordering::SeqCst);
                // As `Allocator::stats` does: each pool's lock, briefly.
                drop(pool_lock.lock().unwrap_or_else(|p| p.into_inner()));
            }
            inner()
        })
    };
    let cfg = MetricsConfig {
        file: None,
        interval_ms: 10_000,
        addr: Some("127.0.0.1:0".parse().unwrap()),
    };
    let exporter = Exporter::start(&cfg, source).unwrap();
    let addr = exporter.http_addr().unwrap();
    // A thread stuck under a pool lock.
    let held = pool_lock.lock().unwrap();
    block.store(true, Ordering::SeqCst);
    let scrape = std::thread::spawn(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        read_reply(&mut s)
    });
    wait_for("the scrape's snapshot", Duration::from_secs(10), || {
        entered.load(Ordering::SeqCst)
    });
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::scope(|s| {
        s.spawn(|| {
            exporter.stop_periodic();
            let _ = done_tx.send(());
        });
        let returned = done_rx.recv_timeout(Duration::from_secs(3)).is_ok();
        // Let the stuck thread go, so that everything ends either way.
        drop(held);
        assert!(
            returned,
            "stop_periodic (the exit handler's) was still waiting 3 s later for a scrape's \
             snapshot blocked on a pool lock: the process's exit would hang with it"
        );
    });
    let _ = scrape.join();
}

/// Takes the append-only mark (`chattr -a`) off a directory when dropped.
struct AppendOnlyMark(std::path::PathBuf);

impl Drop for AppendOnlyMark {
    fn drop(&mut self) {
        let _ = std::process::Command::new("chattr")
            .arg("-a")
            .arg(&self.0)
            .status();
    }
}

/// A metrics file whose directory is marked append-only (`chattr +a`): each snapshot's
/// temporary file can be created there but neither renamed over the metrics file nor removed.
/// `write_atomic` says that on failure its temporary file is removed and the directory left as
/// it was: a running exporter that fails every interval must not leave one more temporary
/// file (a whole snapshot) behind each time.
#[test]
fn failed_snapshots_in_an_append_only_directory_leave_no_temporary_files() {
    let dir = tempfile::tempdir().unwrap();
    let marked = std::process::Command::new("chattr")
        .arg("+a")
        .arg(dir.path())
        .status()
        .is_ok_and(|s| s.success());
    if !marked {
        skip::skipped("chattr +a is not available here (needs root and ext4 or alike)");
        return;
    }
    let _unmark = AppendOnlyMark(dir.path().to_path_buf());
    let path = dir.path().join("kvh.prom");
    let cfg = MetricsConfig {
        file: Some(path.clone()),
        interval_ms: 50,
        addr: None,
    };
    let exporter = Exporter::start(&cfg, counting_source(Arc::new(AtomicU64::new(1)))).unwrap();
    let errors = |text: &str| {
        parse(text)
            .unwrap()
            .value("kvh_metrics_textfile_errors_total", &[])
            .unwrap()
    };
    wait_for("three failed snapshots", Duration::from_secs(30), || {
        errors(&exporter.render()) >= 3.0
    });
    drop(exporter);
    let left: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(
        left.is_empty(),
        "failed snapshots left {} temporary file(s) in the append-only directory: {left:?}",
        left.len()
    );
}

/// Routes whose `/slow` takes a while to answer (as a snapshot waiting on a busy pool lock
/// does), and whose `/healthz` answers at once.
struct SlowRoute(Duration);

impl Routes for SlowRoute {
    fn paths(&self) -> &[&'static str] {
        &["/slow", "/healthz"]
    }

    fn get(&self, path: &str) -> Response {
        if path == "/slow" {
            std::thread::sleep(self.0);
        }
        Response::text(200, "ok\n")
    }
}

/// Reads a response to its end; a connection reset or closed unanswered reads as status 0.
fn read_reply_or_closed(s: &mut TcpStream) -> (u16, String) {
    let mut bytes = Vec::new();
    let err = std::io::Read::read_to_end(s, &mut bytes).err();
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, format!("{text:?} (read error: {err:?})"))
}

/// A server of two slots whose `/slow` takes 1.6 s, with a request deadline far off.
fn two_slot_server_with_a_slow_route() -> Server {
    let limits = Limits {
        max_connections: 2,
        request_timeout: Duration::from_secs(30),
        ..Limits::default()
    };
    Server::start(
        "127.0.0.1:0".parse().unwrap(),
        Arc::new(SlowRoute(Duration::from_millis(1600))),
        limits,
        "test-http",
    )
    .unwrap()
}

/// Keeps the server's thread in its slow route (1.6 s) from a connection of its own, whose
/// answer the returned thread gives.
fn keep_in_the_slow_route(addr: SocketAddr) -> std::thread::JoinHandle<(u16, String)> {
    std::thread::spawn(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(b"GET /slow HTTP/1.1\r\n\r\n").unwrap();
        read_reply_or_closed(&mut s)
    })
}

/// What a probe that connected, then sent `head` 0.3 s later, is answered, when the server was
/// busy meanwhile with a slow route (1.6 s, on the other of its two slots) and a newcomer
/// arrives, finding both slots taken, after the probe's head and before the server is free.
fn probe_answer_while_the_server_was_busy(head: &[u8]) -> (u16, String) {
    let server = two_slot_server_with_a_slow_route();
    let addr = server.local_addr();
    let mut probe = TcpStream::connect(addr).unwrap();
    probe
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let slow = keep_in_the_slow_route(addr);
    std::thread::sleep(Duration::from_millis(200));
    probe.write_all(head).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let _newcomer = TcpStream::connect(addr).unwrap();
    let answer = read_reply_or_closed(&mut probe);
    assert_eq!(slow.join().unwrap().0, 200);
    answer
}

/// Only a connection that has sent no whole request for a second gives its slot to a new
/// one. A client that connected and sent its whole request 0.3 s later has sent it in time,
/// even when the server, busy with a slow route, has not read it yet: when a new connection
/// then finds every slot taken, that client is answered, not closed unanswered in its stead.
#[test]
fn a_connection_whose_whole_request_arrived_in_time_keeps_its_slot_while_the_server_was_busy() {
    let (status, text) = probe_answer_while_the_server_was_busy(b"GET /healthz HTTP/1.1\r\n\r\n");
    assert_eq!(
        status, 200,
        "a probe that sent its whole request 0.3 s after connecting was closed unanswered \
         to give its slot to a newer connection: {text}"
    );
}

/// As above, with a request head of 6 KiB (within the 8 KiB limit): read whole before a
/// newcomer finding every slot taken picks a stalled connection, not only its first part.
#[test]
fn a_large_request_head_that_arrived_in_time_is_answered_while_the_server_was_busy() {
    let mut head = b"GET /healthz HTTP/1.1\r\n".to_vec();
    while head.len() < 6 * 1024 {
        head.extend_from_slice(b"X-Filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
    }
    head.extend_from_slice(b"\r\n");
    let (status, text) = probe_answer_while_the_server_was_busy(&head);
    assert_eq!(
        status, 200,
        "a 6 KiB request head that arrived in time was taken for a stalled one: {text}"
    );
}

/// The second a connection has for its whole request, before a newcomer finding every slot
/// taken may take its slot, counts from the connection, not from its last bytes: a client
/// that trickles its request head a few bytes at a time (holding a slot as one that sends
/// nothing would) is closed for the newcomer once it is a second old, and the newcomer is
/// served.
#[test]
fn a_client_trickling_its_request_head_for_over_a_second_gives_its_slot_to_a_newcomer() {
    let limits = Limits {
        max_connections: 1,
        request_timeout: Duration::from_secs(30),
        ..Limits::default()
    };
    let (_exporter, addr) = http_exporter(limits);
    let mut client = TcpStream::connect(addr).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    for part in [
        "GET /healthz HTTP/1.1\r\n",
        "Host: x\r\n",
        "Accept: */*\r\n",
    ] {
        client.write_all(part.as_bytes()).unwrap();
        std::thread::sleep(Duration::from_millis(400));
    }
    // 1.2 s after the client connected, 0.4 s after its last bytes.
    let r = get(addr, "GET /healthz HTTP/1.1\r\n\r\n");
    assert_eq!(r.status, 200, "the newcomer was kept out: {}", r.head);
    let _ = client.write_all(b"\r\n");
    let (status, text) = read_reply_or_closed(&mut client);
    assert_eq!(status, 0, "the trickling client kept its slot: {text}");
}

/// `kvh_metrics_http_rejected_total` counts requests refused. A client that connected, sent
/// nothing and then closed its connection itself was refused nothing: when a new connection
/// comes while the server is busy with a slow route, the slot the client left is free, and the
/// client is not counted as a connection closed unanswered for the newcomer.
#[test]
fn a_client_that_left_on_its_own_is_not_counted_as_refused_for_a_newcomer() {
    let server = two_slot_server_with_a_slow_route();
    let addr = server.local_addr();
    let left = TcpStream::connect(addr).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let slow = keep_in_the_slow_route(addr);
    std::thread::sleep(Duration::from_millis(1100));
    // 1.2 s after connecting, while the server is in its slow route: the client leaves.
    drop(left);
    std::thread::sleep(Duration::from_millis(100));
    let mut newcomer = TcpStream::connect(addr).unwrap();
    newcomer
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    newcomer
        .write_all(b"GET /healthz HTTP/1.1\r\n\r\n")
        .unwrap();
    let (status, text) = read_reply_or_closed(&mut newcomer);
    assert_eq!(status, 200, "{text}");
    assert_eq!(slow.join().unwrap().0, 200);
    assert_eq!(
        server.rejected(),
        0,
        "a client that closed its own connection was counted as refused"
    );
}

/// Routes whose `/block` says when it is entered and then waits until it is released (as a
/// snapshot waiting on a pool lock a stuck thread holds does), and whose `/healthz` answers
/// at once.
struct BlockingRoute {
    entered: std::sync::Mutex<std::sync::mpsc::Sender<()>>,
    release: std::sync::Mutex<std::sync::mpsc::Receiver<()>>,
}

impl Routes for BlockingRoute {
    fn paths(&self) -> &[&'static str] {
        &["/block", "/healthz"]
    }

    fn get(&self, path: &str) -> Response {
        if path == "/block" {
            let _ = self.entered.lock().unwrap().send(());
            let _ = self.release.lock().unwrap().recv();
        }
        Response::text(200, "ok\n")
    }
}

/// Sends `request` on a probe connection while the server's one thread is busy in another
/// connection's route, and keeps it busy until the probe's deadline (2 s) has passed: the
/// probe's reply (status, text) and the server's count of refused requests.
fn probe_sent_while_busy(request: &[u8]) -> (u16, String, u64) {
    let (entered_tx, entered_rx) = std::sync::mpsc::channel();
    let (release_tx, release_rx) = std::sync::mpsc::channel();
    let routes = BlockingRoute {
        entered: std::sync::Mutex::new(entered_tx),
        release: std::sync::Mutex::new(release_rx),
    };
    let timeout = Duration::from_secs(2);
    let limits = Limits {
        request_timeout: timeout,
        ..Limits::default()
    };
    let server = Server::start(
        "127.0.0.1:0".parse().unwrap(),
        Arc::new(routes),
        limits,
        "test-http",
    )
    .unwrap();
    let addr = server.local_addr();
    // The probe connects first, so it is accepted no later than the blocking connection.
    let mut probe = TcpStream::connect(addr).unwrap();
    probe
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let blocker = std::thread::spawn(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.write_all(b"GET /block HTTP/1.1\r\n\r\n").unwrap();
        read_reply_or_closed(&mut s)
    });
    entered_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the server entered the blocking route");
    // The probe's whole request, sent as soon as the server is busy: well within its deadline.
    probe.write_all(request).unwrap();
    // The server stays busy until the probe's deadline has passed.
    std::thread::sleep(timeout + Duration::from_millis(500));
    release_tx.send(()).unwrap();
    let (status, text) = read_reply_or_closed(&mut probe);
    assert_eq!(blocker.join().unwrap().0, 200);
    (status, text, server.rejected())
}

/// The request deadline bounds how long a client takes to send its request, not how long the
/// server takes to read it. A probe that connected, and sent its whole request while the
/// server's one thread was busy in another connection's route, sent it in time: when the
/// server gets to it after the deadline has passed, the request is already there and is
/// answered, not refused with 408 ("request not received in time").
#[test]
fn a_request_that_arrived_in_time_while_the_server_was_busy_is_not_refused_with_408() {
    let (status, text, rejected) = probe_sent_while_busy(b"GET /healthz HTTP/1.1\r\n\r\n");
    assert_eq!(
        status, 200,
        "a request sent in time, while the server was busy, was refused: {text}"
    );
    assert_eq!(rejected, 0, "the probe was counted as refused");
}

/// The same for a request whose head is larger than one read of the server (4 KiB) but well
/// within `max_request_bytes` (8 KiB): sent whole, in time, while the server was busy, it is
/// already there when the server gets to it after the deadline, and is answered (200), not
/// refused with 408 because its first read did not hold the whole head.
#[test]
fn a_request_larger_than_one_read_that_arrived_in_time_while_the_server_was_busy_is_answered() {
    assert!(Limits::default().max_request_bytes >= 8192);
    // A 6 KiB head (a long header, as a proxy's forwarding headers make), sent whole.
    let mut request = b"GET /healthz HTTP/1.1\r\nX-Pad: ".to_vec();
    request.extend(std::iter::repeat_n(b'a', 6000));
    request.extend_from_slice(b"\r\n\r\n");
    assert!(request.len() > 4096 && request.len() < Limits::default().max_request_bytes);
    let (status, text, rejected) = probe_sent_while_busy(&request);
    assert_eq!(
        status,
        200,
        "a {}-byte request sent whole and in time, while the server was busy, was refused: \
         {text}",
        request.len()
    );
    assert_eq!(rejected, 0, "the probe was counted as refused");
}

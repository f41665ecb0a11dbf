//! Request targets and methods the in-process HTTP exporter is sent by scrapers and probes.
//! Only loopback networking.

#[path = "http_common/mod.rs"]
mod http_common;

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use http_common::{read_reply, Reply};
use kvhygiene::config::MetricsConfig;
use kvhygiene::metrics::http::Limits;
use kvhygiene::metrics::{Exporter, Source};
use kvhygiene::stats::{PoolCounters, Stats};

fn source() -> Source {
    Arc::new(|| Stats::merge("host".into(), &[PoolCounters::default()], None))
}

fn exporter() -> (Exporter, SocketAddr) {
    let cfg = MetricsConfig {
        file: None,
        interval_ms: 10_000,
        addr: Some("127.0.0.1:0".parse().unwrap()),
    };
    let e = Exporter::start_with(&cfg, source(), Limits::default()).unwrap();
    let addr = e.http_addr().unwrap();
    (e, addr)
}

fn get(addr: SocketAddr, raw: &str) -> Reply {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(raw.as_bytes()).unwrap();
    read_reply(&mut s)
}

/// The path of an origin-form target ends at `?`: a query string is not part of it, whatever
/// it holds. Prometheus sends its scrape `params` as a query string, and a parameter value may
/// well be a URL (`?target=http://host/x`, as blackbox-style scrape configs use).
#[test]
fn a_url_in_the_query_string_does_not_change_the_path() {
    let (_e, addr) = exporter();
    assert_eq!(get(addr, "GET /metrics?x=1 HTTP/1.1\r\n\r\n").status, 200);
    let r = get(
        addr,
        "GET /metrics?target=http://inference:8000/v1 HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    assert_eq!(r.status, 200, "{}\n{}", r.head, r.body);
    let r = get(addr, "GET /healthz?from=https://probe/x HTTP/1.1\r\n\r\n");
    assert_eq!(r.status, 200, "{}\n{}", r.head, r.body);
}

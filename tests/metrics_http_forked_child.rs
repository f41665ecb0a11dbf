//! The in-process HTTP exporter and a child forked from its process: the child inherits the
//! exporter without its thread, and must not keep its listening socket either. Only loopback
//! networking; one test in this binary, so that the fork copies no other test's sockets.

use std::net::TcpListener;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvhygiene::config::MetricsConfig;
use kvhygiene::metrics::Exporter;
use kvhygiene::stats::{PoolCounters, Stats};

/// A pre-fork server (or an engine that forks workers after the allocator started) starts the
/// HTTP exporter, forks a child that lives on, and then its exporter stops (the process shuts
/// it down, or exits and is restarted). The child serves no metrics (it has no server
/// thread), so it must not keep the address either: once the exporter that bound it is gone,
/// the address is free for the next process's exporter, rather than held by a socket whose
/// connections the kernel accepts and nobody answers.
#[test]
fn a_forked_child_does_not_keep_the_exporter_s_address() {
    let cfg = MetricsConfig {
        file: None,
        interval_ms: 10_000,
        addr: Some("127.0.0.1:0".parse().unwrap()),
    };
    let source = Arc::new(|| Stats::merge("host".into(), &[PoolCounters::default()], None));
    let exporter = Exporter::start(&cfg, source).unwrap();
    let addr = exporter.http_addr().unwrap();
    // SAFETY: the child only sleeps and `_exit`s (async-signal-safe calls).
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        // SAFETY: as above.
        unsafe {
            libc::sleep(30);
            libc::_exit(0);
        }
    }
    drop(exporter);
    // The parent's listener is closed by the drop; give the child no say in the address.
    let deadline = Instant::now() + Duration::from_secs(5);
    let bound = loop {
        match TcpListener::bind(addr) {
            Ok(l) => break Ok(l),
            Err(e) if Instant::now() >= deadline => break Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    // SAFETY: `pid` is our child; it is reaped after the kill.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
        libc::waitpid(pid, std::ptr::null_mut(), 0);
    }
    assert!(
        bound.is_ok(),
        "the exporter's address {addr} is still bound after the exporter stopped, by the \
         forked child that inherited its listening socket: {:?}",
        bound.err()
    );
}

//! An HTTP exporter whose process forks a child that lives on, then stops the exporter: what
//! the tests of a forked child's descriptors share (each in a binary of its own, so that the
//! fork copies no other test's sockets).

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvhygiene::config::MetricsConfig;
use kvhygiene::metrics::Exporter;
use kvhygiene::stats::{PoolCounters, Stats};

/// Starts an exporter on a loopback port, forks a child that only sleeps, stops the exporter,
/// and binds the exporter's address again (for up to 5 s) while the child still lives. The
/// address, and the listener or the error of the last try.
pub fn rebind_after_a_forked_child() -> (SocketAddr, std::io::Result<TcpListener>) {
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
    (addr, bound)
}

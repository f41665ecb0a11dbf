//! The crate's Rust API as an embedding engine uses it directly: values a caller may pass
//! through the public types are answered with a result or an error, never a panic, and what
//! a handle promises still holds when it is dropped.

mod common;
mod forensic_common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

use kvhygiene::alloc::size_class::SizeClass;
use kvhygiene::alloc::{Allocator, BlockState};
use kvhygiene::backend::host::HostBackend;
use kvhygiene::backend::{Backend, StreamHandle};
use kvhygiene::config::{Config, MetricsConfig};
use kvhygiene::events::{Event, EventKind, EventSink, ReleaseReason};
use kvhygiene::forensic::ForensicLog;
use kvhygiene::metrics::http::Limits;
use kvhygiene::metrics::{Exporter, Source};
use kvhygiene::stats::{PoolCounters, Stats};

/// Sends one request and reads the whole answer, lossily; an empty answer when the server
/// closed or reset the connection without one.
fn ask(addr: std::net::SocketAddr, request: &str) -> String {
    let Ok(mut s) = TcpStream::connect(addr) else {
        return String::new();
    };
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.write_all(request.as_bytes());
    let mut bytes = Vec::new();
    let _ = s.read_to_end(&mut bytes);
    String::from_utf8_lossy(&bytes).into_owned()
}

/// `Limits` takes any `Duration`: a caller that means "no deadline" passes `Duration::MAX`.
/// The exporter still answers its requests, and goes on answering later ones.
#[test]
fn an_exporter_whose_limits_have_no_deadline_still_answers() {
    let source: Source = Arc::new(|| Stats::merge("host".into(), &[PoolCounters::default()], None));
    let cfg = MetricsConfig {
        file: None,
        interval_ms: 10_000,
        addr: Some("127.0.0.1:0".parse().unwrap()),
    };
    let limits = Limits {
        request_timeout: Duration::MAX,
        write_timeout: Duration::MAX,
        ..Limits::default()
    };
    let exporter = Exporter::start_with(&cfg, source, limits).expect("exporter started");
    let addr = exporter.http_addr().expect("bound");
    let first = ask(addr, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(
        first.starts_with("HTTP/1.1 200"),
        "GET /healthz was answered {first:?}"
    );
    let second = ask(addr, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(
        second.starts_with("HTTP/1.1 200"),
        "a second GET /healthz was answered {second:?}"
    );
}

/// Every block freed through the allocator is zeroed before its memory can be read again:
/// a free never waits, but the last handle's drop does not abandon the frees still waiting
/// in an open batch. The block goes back to the backend only after its scrub verified (a
/// `release` for `empty_cache`, which releases CLEAN blocks only), and no memory is left held.
#[test]
fn dropping_the_last_allocator_handle_leaves_no_freed_bytes_unscrubbed() {
    #[derive(Default)]
    struct Releases(std::sync::Mutex<Vec<(u64, ReleaseReason)>>);
    impl EventSink for Releases {
        fn emit(&self, event: Event) {
            if let (EventKind::Released { reason, .. }, Some(block)) = (&event.kind, &event.block) {
                self.0.lock().unwrap().push((block.addr, *reason));
            }
        }
    }
    let host = HostBackend::new();
    let config = common::manual_config();
    let releases = Arc::new(Releases::default());
    let alloc = Allocator::new(host.clone(), config, Some(releases.clone()));
    let len = 4096usize;
    let ptr = alloc.malloc(len as i64, 0, StreamHandle(0)).unwrap();
    host.write(0, ptr, &vec![0xA5u8; len]).unwrap();
    alloc.free(ptr, len as i64, 0, StreamHandle(0)).unwrap();
    drop(alloc);

    assert_eq!(
        *releases.0.lock().unwrap(),
        vec![(ptr, ReleaseReason::EmptyCache)],
        "the freed block did not go back to the backend as a verified clean block"
    );
    assert_eq!(
        host.bytes_in_use(),
        0,
        "the drop left memory with the backend"
    );
}

/// The drop of the last handle also gives the backend back the blocks the pool cached (as
/// `empty_cache`), so that an engine that rebuilds its allocator over the same backend does
/// not leak them; dropping any other clone changes nothing.
#[test]
fn only_the_last_handle_s_drop_empties_the_cache() {
    let host = HostBackend::new();
    let alloc = Allocator::new(host.clone(), Config::default(), None);
    let other = alloc.clone();
    let ptr = alloc.malloc(4096, 0, StreamHandle(0)).unwrap();
    alloc.free(ptr, 4096, 0, StreamHandle(0)).unwrap();
    drop(alloc);
    assert!(
        !other.is_shut_down(),
        "a clone's drop shut the allocator down"
    );
    let again = other.malloc(4096, 0, StreamHandle(0)).unwrap();
    other.free(again, 4096, 0, StreamHandle(0)).unwrap();
    other.synchronize().unwrap();
    assert!(host.bytes_in_use() > 0, "the pool caches the freed block");
    drop(other);
    assert_eq!(
        host.bytes_in_use(),
        0,
        "the last handle's drop left cached blocks with the backend"
    );
}

/// `SizeClass::waste` of a size the class does not hold answers (as a fraction, 0 for no
/// waste) rather than panicking on the subtraction.
#[test]
fn the_waste_of_a_size_larger_than_its_class_is_answered_without_a_panic() {
    let class = SizeClass::of(100).unwrap();
    let size = class.capacity + 1;
    let waste = std::panic::catch_unwind(|| class.waste(size));
    assert!(
        waste.is_ok(),
        "SizeClass::waste({size}) of the class of capacity {} panicked",
        class.capacity
    );
}

/// A queue capacity the log cannot allocate is refused with an error, not a panic in
/// `ForensicLog::open` (the policy key accepts 16 .. 4194304, but `LogConfig` is built
/// directly by an embedding engine).
#[test]
fn a_log_queue_too_large_to_allocate_is_an_error_not_a_panic() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = forensic_common::log_dir(&tmp);
    let cfg = kvhygiene::config::LogConfig {
        queue_capacity: usize::MAX,
        ..forensic_common::cfg(&dir, 1 << 20)
    };
    let opened = std::panic::catch_unwind(|| {
        ForensicLog::open_with_secret(&cfg, forensic_common::start(), None).map(|log| log.stop())
    });
    assert!(
        opened.is_ok(),
        "ForensicLog::open_with_secret with queue_capacity = usize::MAX panicked"
    );
    assert!(
        opened.unwrap().is_err(),
        "a queue of usize::MAX records was accepted"
    );
}

/// Dropping an allocator ends that allocator, not the backend it was given: an engine that
/// rebuilds its allocator over the same backend (a reload, a new policy) is served by the new
/// one.
#[test]
fn an_allocator_rebuilt_over_the_same_backend_is_served_after_the_old_one_is_dropped() {
    let host = HostBackend::new();
    let first = Allocator::new(host.clone(), Config::default(), None);
    let ptr = first.malloc(4096, 0, StreamHandle(0)).unwrap();
    first.free(ptr, 4096, 0, StreamHandle(0)).unwrap();
    drop(first);

    let second = Allocator::new(host.clone(), Config::default(), None);
    let got = second.malloc(4096, 0, StreamHandle(0));
    assert!(
        got.is_ok(),
        "an allocator made over a backend whose previous allocator was dropped cannot \
         allocate: {got:?}"
    );
}

/// Two allocators over one backend (one per model, say) are independent: dropping the last
/// handle of one leaves the other scrubbing what is freed to it.
#[test]
fn dropping_one_of_two_allocators_over_one_backend_leaves_the_other_scrubbing() {
    let host = HostBackend::new();
    let config = common::manual_config();
    let kept = Allocator::new(host.clone(), config.clone(), None);
    let dropped = Allocator::new(host.clone(), config, None);
    let len = 4096usize;
    let ptr = kept.malloc(len as i64, 0, StreamHandle(0)).unwrap();
    host.write(0, ptr, &vec![0x5Au8; len]).unwrap();
    kept.free(ptr, len as i64, 0, StreamHandle(0)).unwrap();
    drop(dropped);

    let synced = kept.synchronize();
    let state = kept.block_info(ptr).map(|b| b.state);
    assert!(
        synced.is_ok() && state == Some(BlockState::Clean),
        "after another allocator over the same backend was dropped, the allocator still in \
         use does not scrub what is freed to it: synchronize answered {synced:?}, and the \
         freed block is {state:?}"
    );
}

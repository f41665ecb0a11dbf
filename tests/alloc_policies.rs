//! Policies: never-reuse TTL, idle TTL, live TTL, max reuse, tenant isolation, out of memory.

mod common;

use std::time::Duration;

use common::{manual_config, secret, Fixture};
use kvhygiene::alloc::BlockState;
use kvhygiene::backend::host::HostBackend;
use kvhygiene::backend::StreamHandle;
use kvhygiene::config::{Config, TenantIsolation};
use kvhygiene::context::Context;
use kvhygiene::events::{EventKind, QuarantineReason, ReleaseReason};

const S: StreamHandle = StreamHandle(0);

fn as_tenant<R>(tenant: &str, f: impl FnOnce() -> R) -> R {
    let prev = Context::set_current(Context::new(Some(tenant), None, None).unwrap());
    let r = f();
    Context::set_current(prev);
    r
}

#[test]
fn non_positive_idle_ttl_never_reuses() {
    for ttl in [0, -5] {
        let f = Fixture::new(Config {
            idle_ttl_ms: ttl,
            ..manual_config()
        });
        let a = f.malloc_zeroed(2048, 0, 0);
        let id = f.alloc.block_info(a).unwrap().id;
        f.write(0, a, &secret(2048, 1));
        f.alloc.free(a, 2048, 0, S).unwrap();
        f.alloc.synchronize().unwrap();
        assert!(f.sink.snapshot().iter().any(|e| e.kind
            == EventKind::Quarantined {
                reason: QuarantineReason::NeverReusePolicy,
                retired_before: false,
            }));
        assert_eq!(
            f.sink.count("release"),
            1,
            "quarantined, re-scrubbed, released"
        );
        let b = f.malloc_zeroed(2048, 0, 0);
        assert_ne!(f.alloc.block_info(b).unwrap().id, id);
        assert_eq!(f.alloc.stats().counters.pool_hits, 0);
        f.assert_balanced();
    }
}

#[test]
fn idle_blocks_are_released_after_the_idle_ttl() {
    let f = Fixture::new(Config {
        idle_ttl_ms: 1,
        batch_max_delay_us: 500,
        ..Config::default()
    });
    let a = f.malloc_zeroed(4096, 0, 0);
    f.alloc.free(a, 4096, 0, S).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while f.alloc.block_info(a).is_some() {
        assert!(
            std::time::Instant::now() < deadline,
            "idle block never trimmed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(f.sink.snapshot().iter().any(|e| e.kind
        == EventKind::Released {
            reason: ReleaseReason::IdleTtl,
            leaked: false,
        }));
    f.assert_balanced();
}

#[test]
fn live_ttl_exceeded_is_an_event() {
    let f = Fixture::new(Config {
        live_ttl_ms: 100,
        ..manual_config()
    });
    let a = f.malloc_zeroed(64, 0, 0);
    let quick = f.malloc_zeroed(64, 0, 0);
    f.alloc.free(quick, 64, 0, S).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    f.alloc.free(a, 64, 0, S).unwrap();
    assert_eq!(f.sink.count("ttl_exceeded"), 1);
    assert_eq!(f.alloc.stats().counters.ttl_exceeded, 1);
}

/// A tensor held for ever is never freed, so its free cannot report it: the flusher reports a
/// block once it is LIVE past the live TTL, while it is still LIVE, and its free later does
/// not report it a second time.
#[test]
fn a_block_live_past_the_ttl_is_reported_while_live_and_once() {
    let f = Fixture::new(Config {
        live_ttl_ms: 50,
        ..manual_config()
    });
    let held = f.malloc_zeroed(64, 0, 0);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while f.sink.count("ttl_exceeded") == 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        f.sink.count("ttl_exceeded"),
        1,
        "a block LIVE past the TTL was not reported while LIVE"
    );
    assert_eq!(f.alloc.block_info(held).unwrap().state, BlockState::Live);
    std::thread::sleep(Duration::from_millis(150));
    f.alloc.free(held, 64, 0, S).unwrap();
    assert_eq!(f.sink.count("ttl_exceeded"), 1, "reported twice");
    assert_eq!(f.alloc.stats().counters.ttl_exceeded, 1);
}

#[test]
fn max_reuse_retires_the_block() {
    let f = Fixture::new(Config {
        max_reuse: 3,
        ..manual_config()
    });
    let first = f.malloc_zeroed(1024, 0, 0);
    let id = f.alloc.block_info(first).unwrap().id;
    let mut addr = first;
    for _ in 0..3 {
        let info = f.alloc.block_info(addr).unwrap();
        assert_eq!(info.id, id);
        f.alloc.free(addr, 1024, 0, S).unwrap();
        f.alloc.synchronize().unwrap();
        addr = f.malloc_zeroed(1024, 0, 0);
    }
    // Three hand-outs, then scrubbed and released instead of reused.
    assert_ne!(f.alloc.block_info(addr).unwrap().id, id);
    assert!(f.sink.snapshot().iter().any(|e| e.kind
        == EventKind::Released {
            reason: ReleaseReason::MaxReuse,
            leaked: false,
        }));
    f.assert_balanced();
}

#[test]
fn strict_isolation_never_crosses_tenants() {
    let f = Fixture::new(manual_config());
    let a = as_tenant("alice", || f.malloc_zeroed(4096, 0, 0));
    f.write(0, a, &secret(4096, 0xA1));
    f.alloc.free(a, 4096, 0, S).unwrap();
    f.alloc.synchronize().unwrap();
    let b = as_tenant("bob", || f.malloc_zeroed(4096, 0, 0));
    assert_ne!(a, b, "alice's block went to bob");
    let a2 = as_tenant("alice", || f.malloc_zeroed(4096, 0, 0));
    assert_eq!(a, a2, "alice gets her own clean block back");
    let info = f.alloc.block_info(a2).unwrap();
    assert_eq!(info.tenant_id.as_deref(), Some("alice"));
    assert_eq!(info.state, BlockState::Live);
}

#[test]
fn isolation_off_shares_scrubbed_blocks() {
    let f = Fixture::new(Config {
        tenant_isolation: TenantIsolation::Off,
        ..manual_config()
    });
    let a = as_tenant("alice", || f.malloc_zeroed(4096, 0, 0));
    f.write(0, a, &secret(4096, 0xA1));
    f.alloc.free(a, 4096, 0, S).unwrap();
    f.alloc.synchronize().unwrap();
    let b = as_tenant("bob", || f.malloc_zeroed(4096, 0, 0));
    assert_eq!(a, b, "scrubbed block shared (and it read zero)");
}

#[test]
fn out_of_memory_flushes_scrubs_and_releases_cache_then_retries() {
    // Room for four 1 MiB blocks.
    let f = Fixture::with_host(manual_config(), HostBackend::with_capacity(4 << 20));
    let blocks: Vec<u64> = (0..4).map(|_| f.malloc_zeroed(1 << 20, 0, 0)).collect();
    // Free them under tenant-less context; their scrubs wait in an open batch.
    for &b in &blocks {
        f.alloc.free(b, 1 << 20, 0, S).unwrap();
    }
    // A different size class cannot reuse them: malloc must flush, wait, release, retry.
    let big = f.malloc_zeroed(3 << 20, 0, 0);
    assert!(big != 0);
    let st = f.alloc.stats();
    assert_eq!(st.counters.oom_recoveries, 1);
    assert!(st.counters.released >= 3);
    // The release records say why: the recovery, not a kvh_empty_cache call.
    let reasons: Vec<EventKind> = release_kinds(&f);
    assert!(reasons.len() >= 3, "{reasons:?}");
    assert!(
        reasons.iter().all(|k| *k
            == EventKind::Released {
                reason: ReleaseReason::OutOfMemory,
                leaked: false,
            }),
        "{reasons:?}"
    );
    // Truly out of memory: an error, counted, not a crash.
    assert!(f.alloc.malloc(2 << 20, 0, S).is_err());
    assert_eq!(f.alloc.stats().counters.out_of_memory, 1);
    f.assert_balanced();
}

/// The host backend's devices share one capacity: a refusal on one device that its own cache
/// cannot cure releases the clean blocks another device caches, and the retry is served.
#[test]
fn out_of_memory_on_shared_memory_releases_other_devices_clean_blocks() {
    let f = Fixture::with_host(manual_config(), HostBackend::with_capacity(4 << 20));
    let on_one = f.malloc_zeroed(3 << 20, 1, 0);
    f.alloc.free(on_one, 3 << 20, 1, S).unwrap();
    f.alloc.synchronize().unwrap();
    let one = f.alloc.block_info(on_one).unwrap();
    assert_eq!(one.state, BlockState::Clean);
    // Device 0 caches nothing, and device 1's clean block holds most of the room.
    let on_zero = f.malloc_zeroed(3 << 20, 0, 0);
    assert!(on_zero != 0);
    // By its id: the memory released may come back at the same address for device 0.
    assert!(
        f.alloc.block_info(on_one).is_none_or(|b| b.id != one.id),
        "device 1's block was not released"
    );
    let st = f.alloc.stats();
    assert_eq!(st.counters.oom_recoveries, 1);
    assert_eq!(st.counters.out_of_memory, 0);
    let released: Vec<(EventKind, i32)> = f
        .sink
        .snapshot()
        .into_iter()
        .filter(|e| matches!(e.kind, EventKind::Released { .. }))
        .map(|e| (e.kind, e.block.map_or(-1, |b| b.device)))
        .collect();
    assert_eq!(
        released,
        vec![(
            EventKind::Released {
                reason: ReleaseReason::OutOfMemory,
                leaked: false,
            },
            1
        )]
    );
    // Nothing left to release anywhere: an error, counted once.
    assert!(f.alloc.malloc(2 << 20, 2, S).is_err());
    assert_eq!(f.alloc.stats().counters.out_of_memory, 1);
    f.alloc.free(on_zero, 3 << 20, 0, S).unwrap();
    f.assert_balanced();
}

#[test]
fn empty_cache_returns_clean_blocks() {
    let f = Fixture::new(manual_config());
    let a = f.malloc_zeroed(8192, 0, 0);
    let b = f.malloc_zeroed(8192, 0, 0);
    f.alloc.free(a, 8192, 0, S).unwrap();
    f.alloc.empty_cache();
    assert!(f.alloc.block_info(a).is_none());
    assert!(f.sink.snapshot().iter().any(|e| e.kind
        == EventKind::Released {
            reason: ReleaseReason::EmptyCache,
            leaked: false,
        }));
    assert_eq!(f.alloc.block_info(b).unwrap().state, BlockState::Live);
    f.assert_balanced();
}

/// During a CUDA graph capture nothing is launched and the driver allocator is not called:
/// scrubs are deferred (blocks stay PENDING, never handed out), malloc is served from clean
/// blocks or fails with a clear error, and everything catches up once the capture ends.
#[test]
fn graph_capture_defers_scrubs_and_fresh_allocations() {
    use kvhygiene::alloc::AllocError;
    let f = Fixture::new(Config {
        batch_size: 1,
        ..manual_config()
    });
    let spare = f.malloc_zeroed(1024, 0, 0);
    f.alloc.free(spare, 1024, 0, S).unwrap();
    f.alloc.synchronize().unwrap(); // one clean 1 KiB block in the pool
    let a = f.malloc_zeroed(4096, 0, 0);
    f.write(0, a, &secret(4096, 4));

    f.backend
        .capturing
        .store(true, std::sync::atomic::Ordering::SeqCst);
    f.alloc.free(a, 4096, 0, S).unwrap();
    assert_eq!(f.alloc.block_info(a).unwrap().state, BlockState::Pending);
    assert!(f.alloc.stats().counters.scrubs_deferred >= 1);
    // Served from the pool: fine. Needing the driver: a clear error, not a crash.
    assert_eq!(f.alloc.malloc(1024, 0, S).unwrap(), spare);
    let err = f.alloc.malloc(4096, 0, S).unwrap_err();
    assert!(matches!(err, AllocError::CaptureActive { .. }), "{err}");
    assert!(err.to_string().contains("pre-allocate"));
    f.alloc.check_consistency().unwrap();

    f.backend
        .capturing
        .store(false, std::sync::atomic::Ordering::SeqCst);
    f.alloc.synchronize().unwrap();
    assert_eq!(f.alloc.block_info(a).unwrap().state, BlockState::Clean);
    assert_eq!(f.malloc_zeroed(4096, 0, 0), a);
    f.assert_balanced();
}

/// A checked free during a capture returns at once with the capture error (waiting could
/// deadlock the capturing thread); the scrub still happens after the capture.
#[test]
fn free_checked_during_capture_returns_instead_of_waiting() {
    use kvhygiene::alloc::FreeError;
    use kvhygiene::backend::BackendError;
    let f = Fixture::new(manual_config());
    let a = f.malloc_zeroed(2048, 0, 0);
    f.backend
        .capturing
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let err = f.alloc.free_checked(a, 2048, 0, S).unwrap_err();
    assert!(
        matches!(
            err,
            FreeError::Backend(BackendError::StreamCapturing { .. })
        ),
        "{err}"
    );
    f.backend
        .capturing
        .store(false, std::sync::atomic::Ordering::SeqCst);
    f.alloc.synchronize().unwrap();
    assert_eq!(f.alloc.block_info(a).unwrap().state, BlockState::Clean);
}

/// A backend error while returning verified memory leaks that memory (it is clean) and
/// becomes the sticky asynchronous error that `synchronize` reports. The block is not counted
/// as released, and its record says it was left to the backend (`leaked`), not returned.
#[test]
fn a_failed_release_is_counted_and_sticky() {
    let f = Fixture::new(Config {
        max_reuse: 1,
        ..manual_config()
    });
    let a = f.malloc_zeroed(4096, 0, 0);
    f.backend
        .fail_release
        .store(true, std::sync::atomic::Ordering::SeqCst);
    f.alloc.free(a, 4096, 0, S).unwrap();
    let err = f.alloc.synchronize().unwrap_err();
    assert!(err.contains("injected release failure"), "{err}");
    let st = f.alloc.stats();
    assert_eq!(st.counters.backend_errors, 1);
    assert_eq!(
        st.counters.released, 0,
        "the backend still holds the memory"
    );
    assert!(f.alloc.block_info(a).is_none());
    let releases: Vec<EventKind> = release_kinds(&f);
    assert_eq!(
        releases,
        vec![EventKind::Released {
            reason: ReleaseReason::MaxReuse,
            leaked: true,
        }]
    );
}

/// `KVH_IDLE_TTL_MS`: the flusher trims every half TTL (not once a second), so a block idle
/// ten times its TTL is back with the backend, not handed out again.
#[test]
fn a_block_idle_well_past_its_ttl_is_not_handed_out_again() {
    let f = Fixture::new(Config {
        idle_ttl_ms: 20,
        batch_max_delay_us: 500,
        ..Config::default()
    });
    let a = f.malloc_zeroed(4096, 0, 0);
    let id = f.alloc.block_info(a).unwrap().id;
    f.alloc.free(a, 4096, 0, S).unwrap();
    f.alloc.synchronize().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let b = f.malloc_zeroed(4096, 0, 0);
    assert_ne!(
        f.alloc.block_info(b).unwrap().id,
        id,
        "a block idle for 200 ms was handed out under idle_ttl_ms = 20"
    );
    assert!(f.alloc.stats().counters.released >= 1);
}

/// `kvh_synchronize` that leaves scrubs refused for now says "which and how many blocks"
/// (include/kvhygiene.h): with blocks waiting on two devices, the count is all of them, not
/// only the first device's.
#[test]
fn synchronize_counts_the_blocks_left_unscrubbed_on_every_device() {
    let f = Fixture::new(manual_config());
    let a = f.malloc_zeroed(4096, 0, 0);
    let b = f.malloc_zeroed(4096, 1, 0);
    f.backend
        .capturing
        .store(true, std::sync::atomic::Ordering::SeqCst);
    f.alloc.free(a, 4096, 0, S).unwrap();
    f.alloc.free(b, 4096, 1, S).unwrap();
    let err = f.alloc.synchronize().unwrap_err();
    assert_eq!(f.alloc.block_info(a).unwrap().state, BlockState::Pending);
    assert_eq!(f.alloc.block_info(b).unwrap().state, BlockState::Pending);
    assert!(
        err.contains("2 blocks") || err.contains("device 1"),
        "two blocks (devices 0 and 1) wait for their scrub, but synchronize said: {err}"
    );
}

/// The kinds of the release events `f`'s sink got, in order.
fn release_kinds(f: &Fixture) -> Vec<EventKind> {
    f.sink
        .snapshot()
        .into_iter()
        .map(|e| e.kind)
        .filter(|k| matches!(k, EventKind::Released { .. }))
        .collect()
}

//! The seven invariants of the block state machine (ARCHITECTURE.md), one test each or more,
//! plus the quarantine path that `kvh_free_checked` exposes.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{manual_config, secret, Fixture};
use kvhygiene::alloc::{BlockState, FreeError};
use kvhygiene::backend::host::HostBackend;
use kvhygiene::backend::StreamHandle;
use kvhygiene::config::{Config, FailureMode};
use kvhygiene::context::Context;
use kvhygiene::events::{EventKind, QuarantineReason, ReleaseReason};

const S: StreamHandle = StreamHandle(0);

/// Invariant 1: every byte of every allocation reads zero, fresh or reused.
#[test]
fn inv1_allocations_read_zero_fresh_and_reused() {
    let f = Fixture::new(manual_config());
    for round in 0..20u8 {
        let sizes = [1i64, 7, 512, 4096, 65_536 + 3];
        let addrs: Vec<u64> = sizes.iter().map(|&s| f.malloc_zeroed(s, 0, 0)).collect();
        for (&a, &s) in addrs.iter().zip(&sizes) {
            f.write(0, a, &secret(s as usize, round));
        }
        for (&a, &s) in addrs.iter().zip(&sizes) {
            f.alloc.free(a, s, 0, S).unwrap();
        }
        f.alloc.synchronize().unwrap();
    }
    let st = f.alloc.stats();
    assert!(st.counters.pool_hits > 0, "reuse must have happened");
    assert_eq!(st.counters.verifications_failed, 0);
    f.assert_balanced();
}

/// Invariant 1: a block whose scrub has not been observed complete is never handed out.
#[test]
fn inv1_pending_block_is_never_handed_out() {
    let f = Fixture::new(manual_config());
    let a = f.malloc_zeroed(4096, 0, 0);
    f.write(0, a, &secret(4096, 1));
    f.backend.set_gate(false); // scrubs stay in flight
    f.alloc.free(a, 4096, 0, S).unwrap();
    for _ in 0..5 {
        let b = f.malloc_zeroed(4096, 0, 0);
        assert_ne!(a, b, "PENDING block handed out");
        f.alloc.free(b, 4096, 0, S).unwrap();
    }
    assert_eq!(f.alloc.block_info(a).unwrap().state, BlockState::Pending);
    f.backend.set_gate(true);
    f.alloc.synchronize().unwrap();
    assert_eq!(f.alloc.block_info(a).unwrap().state, BlockState::Clean);
    // Now it may be reused, and reads zero.
    let c = f.malloc_zeroed(4096, 0, 0);
    assert!(f.alloc.block_info(c).unwrap().reuse_count >= 2);
    f.assert_balanced();
}

/// Invariant 2: the scrub runs on the freeing stream, after the allocation stream and every
/// recorded stream.
#[test]
fn inv2_scrub_ordered_after_allocation_and_recorded_streams() {
    let f = Fixture::new(manual_config());
    let a = f.alloc.malloc(1024, 0, StreamHandle(1)).unwrap();
    assert!(f.alloc.record_stream(a, StreamHandle(7)));
    assert!(f.alloc.record_stream(a, StreamHandle(9)));
    assert!(
        !f.alloc.record_stream(0xdead_0000, StreamHandle(9)),
        "unknown pointer"
    );
    f.alloc.free(a, 1024, 0, StreamHandle(5)).unwrap();
    let waits = scrub_waits(&f, a);
    for w in [1, 7, 9] {
        assert!(
            waits.contains(&StreamHandle(w)),
            "missing wait on stream {w}"
        );
    }
    assert!(!waits.contains(&StreamHandle(5)));
}

/// The streams the scrub of the block at `a` waited for, once every scrub ran; it ran on
/// stream 5, the stream its free named.
fn scrub_waits(f: &Fixture, a: u64) -> Vec<StreamHandle> {
    f.alloc.synchronize().unwrap();
    let batches = f.backend.batches.lock().unwrap().clone();
    let batch = batches
        .iter()
        .find(|b| b.segments.iter().any(|s| s.addr == a))
        .unwrap();
    assert_eq!(batch.stream, StreamHandle(5));
    batch.wait_streams.clone()
}

/// Invariant 2 with a view's pointer: a stream recorded through a pointer into the block
/// (a layer's slice of one allocation) orders the block's scrub too; a pointer past the
/// block's bytes, or into a block no longer live, records nothing.
#[test]
fn inv2_a_stream_recorded_through_an_interior_pointer_orders_the_scrub() {
    let f = Fixture::new(manual_config());
    let a = f.alloc.malloc(4096, 0, StreamHandle(1)).unwrap();
    assert!(f.alloc.record_stream(a + 1000, StreamHandle(7)));
    assert!(f.alloc.record_stream(a + 4095, StreamHandle(8)));
    let cap = f.alloc.block_info(a).unwrap().capacity;
    assert!(!f.alloc.record_stream(a + cap + (1 << 20), StreamHandle(9)));
    f.alloc.free(a, 4096, 0, StreamHandle(5)).unwrap();
    assert!(
        !f.alloc.record_stream(a + 1000, StreamHandle(9)),
        "a freed block took a record"
    );
    let waits = scrub_waits(&f, a);
    for w in [1, 7, 8] {
        assert!(
            waits.contains(&StreamHandle(w)),
            "missing wait on stream {w}"
        );
    }
    assert!(!waits.contains(&StreamHandle(9)));
}

/// Invariant 3: frees never wait for the device, and coalesce into batches bounded by count.
#[test]
fn inv3_free_never_waits_and_batches_by_count() {
    let f = Fixture::new(Config {
        batch_size: 4,
        ..manual_config()
    });
    let addrs: Vec<u64> = (0..10).map(|_| f.malloc_zeroed(256, 0, 0)).collect();
    f.backend.set_gate(false); // the device never finishes while frees run
    let (tx, rx) = std::sync::mpsc::channel();
    let alloc = f.alloc.clone();
    std::thread::spawn(move || {
        for a in addrs {
            alloc.free(a, 256, 0, S).unwrap();
        }
        tx.send(()).unwrap();
    });
    rx.recv_timeout(Duration::from_secs(10))
        .expect("free blocked on an incomplete scrub");
    let sizes: Vec<usize> = f
        .backend
        .batches
        .lock()
        .unwrap()
        .iter()
        .map(|b| b.segments.len())
        .collect();
    assert_eq!(
        sizes,
        vec![4, 4],
        "two full batches submitted, two frees still open"
    );
    f.backend.set_gate(true);
    f.alloc.synchronize().unwrap();
    assert_eq!(f.alloc.stats().accounting.clean.blocks, 10);
}

/// Batches of 1000 frees, or 1 ms old: a few frees are submitted by the flusher, by time.
fn flushed_by_time_only() -> Config {
    Config {
        batch_size: 1000,
        batch_max_delay_us: 1000,
        ..Config::default()
    }
}

/// Invariant 3: batches are also bounded by time (the flusher submits old batches).
#[test]
fn inv3_batches_flush_by_time() {
    let f = Fixture::new(flushed_by_time_only());
    let a = f.malloc_zeroed(256, 0, 0);
    f.alloc.free(a, 256, 0, S).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while f.alloc.block_info(a).map(|b| b.state) != Some(BlockState::Clean) {
        assert!(
            std::time::Instant::now() < deadline,
            "batch never flushed by time"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Invariant 3 after a quiet spell: an idle flusher parks for up to a second, and the free
/// that opens a batch wakes it, so the batch still flushes within its delay, not when the
/// flusher would next have woken on its own.
#[test]
fn inv3_a_free_wakes_the_flusher_parked_idle() {
    let f = Fixture::new(flushed_by_time_only());
    let a = f.malloc_zeroed(256, 0, 0);
    // Nothing pending: the flusher parks (a second with the default idle TTL's trim).
    std::thread::sleep(Duration::from_millis(100));
    let freed = std::time::Instant::now();
    f.alloc.free(a, 256, 0, S).unwrap();
    while f.alloc.block_info(a).map(|b| b.state) != Some(BlockState::Clean) {
        std::thread::sleep(Duration::from_millis(1));
    }
    // The flusher would have woken on its own about 0.9 s after the free; a wake takes
    // about a delay (1 ms). Half a second tells the two apart on a loaded machine.
    let took = freed.elapsed();
    assert!(
        took < Duration::from_millis(500),
        "the batch flushed {took:?} after the free: the free did not wake the flusher"
    );
}

/// Invariant 4: a quarantined block is never handed out again; the quarantine path of
/// `kvh_free_checked` (a scrub forced to miss part of the block) raises the coverage error.
#[test]
fn free_without_sanitize_quarantines_and_raises() {
    let f = Fixture::new(manual_config());
    let a = f.malloc_zeroed(8192, 0, 0);
    f.write(0, a, &secret(8192, 0x5a));
    let id = f.alloc.block_info(a).unwrap().id;
    f.backend.inject_fault_next();
    let err = f.alloc.free_checked(a, 8192, 0, S).unwrap_err();
    assert_eq!(err, FreeError::VerifyFailed { addr: a });
    // The event trail: verification failed, then quarantine.
    let events = f.sink.snapshot();
    let failed = events
        .iter()
        .find(|e| matches!(e.kind, EventKind::VerifyFailed { .. }))
        .expect("verify_failed event");
    assert_eq!(failed.block.unwrap().id, id);
    if let EventKind::VerifyFailed {
        samples_nonzero,
        coverage,
        ..
    } = failed.kind
    {
        assert!(samples_nonzero > 0 && coverage < 0.999);
    }
    assert!(events.iter().any(|e| e.kind
        == EventKind::Quarantined {
            reason: QuarantineReason::VerifyFailed,
            retired_before: false,
        }));
    // After re-scrub (double pass, full verification) it is released, never reused.
    f.alloc.synchronize().unwrap();
    assert_eq!(f.sink.count("release"), 1);
    for _ in 0..50 {
        let b = f.malloc_zeroed(8192, 0, 0);
        let info = f.alloc.block_info(b).unwrap();
        assert_ne!(info.id, id, "quarantined block handed out again");
        f.alloc.free(b, 8192, 0, S).unwrap();
        f.alloc.synchronize().unwrap();
    }
    let st = f.alloc.stats();
    assert_eq!(st.counters.verifications_failed, 1);
    assert_eq!(st.counters.quarantined, 1);
    f.assert_balanced();
}

/// Invariant 4 with the gate: while the re-scrub is in flight, the block is QUARANTINED and
/// never on a free list.
#[test]
fn inv4_quarantined_block_stays_out_of_free_lists() {
    let f = Fixture::new(manual_config());
    let a = f.malloc_zeroed(1024, 0, 0);
    f.write(0, a, &secret(1024, 3));
    let id = f.alloc.block_info(a).unwrap().id;
    f.backend.inject_fault_next();
    f.backend.set_rescrub_gate(false);
    assert!(f.alloc.free_checked(a, 1024, 0, S).is_err());
    assert_eq!(
        f.alloc.block_info(a).unwrap().state,
        BlockState::Quarantined
    );
    for _ in 0..10 {
        let b = f.malloc_zeroed(1024, 0, 0);
        assert_ne!(b, a);
    }
    f.alloc.check_consistency().unwrap();
    f.backend.set_rescrub_gate(true);
    f.alloc.synchronize().unwrap();
    assert!(
        f.alloc.blocks().iter().all(|b| b.id != id),
        "after a verified re-scrub the block goes back to the backend"
    );
}

/// Invariant 5: every security event reaches the sink, under concurrency, in full.
#[test]
fn inv5_security_events_are_never_dropped() {
    let f = Fixture::new(manual_config());
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let alloc = f.alloc.clone();
            std::thread::spawn(move || {
                for i in 0..50u64 {
                    // Unknown pointers: each is an invalid_free event.
                    let _ = alloc.free(0x1000_0000 + t * 0x10000 + i * 16, 8, 0, S);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(f.sink.count("invalid_free"), 400);
    assert_eq!(f.alloc.stats().counters.invalid_frees, 400);
    // Events carry no payload: only ids, sizes, states and counts (the type has no byte
    // buffer field at all; the Debug form shows what is carried).
    let e = &f.sink.snapshot()[0];
    assert!(e.addr.is_some() && e.block.is_none());
}

/// Invariant 6: once exit has begun, no backend call is made.
#[test]
fn inv6_no_backend_call_after_exit_begins() {
    let f = Fixture::new(Config {
        batch_size: 1,
        ..manual_config()
    });
    let live = f.malloc_zeroed(4096, 0, 0);
    let freed = f.malloc_zeroed(4096, 0, 0);
    f.alloc.free(freed, 4096, 0, S).unwrap();
    f.alloc.synchronize().unwrap();
    f.alloc.begin_exit();
    f.backend.seal();
    // A clean block may still be served from the pool (no driver call)...
    let from_pool = f.alloc.malloc(4096, 0, S);
    assert!(from_pool.is_ok());
    // ...but nothing that needs the backend.
    assert!(f.alloc.malloc(1 << 20, 0, S).is_err());
    f.alloc.free(live, 4096, 0, S).unwrap();
    f.alloc.empty_cache();
    let _ = f.alloc.synchronize();
    std::thread::sleep(Duration::from_millis(20)); // a flusher tick would have run
    assert_eq!(f.backend.calls_after_seal.load(Ordering::SeqCst), 0);
}

/// Invariant 7: the caller's size is not trusted; a mismatch is an event and the table wins.
#[test]
fn inv7_size_mismatch_is_reported_and_table_wins() {
    let f = Fixture::new(manual_config());
    let a = f.malloc_zeroed(10_000, 0, 0);
    f.write(0, a, &secret(10_000, 9));
    let report = f.alloc.free(a, 16, 0, S).unwrap();
    assert!(report.size_mismatch);
    assert_eq!(f.sink.count("size_mismatch"), 1);
    f.alloc.synchronize().unwrap();
    // The whole block (not 16 bytes) was scrubbed.
    let info = f.alloc.block_info(a).unwrap();
    assert_eq!(info.state, BlockState::Clean);
    let bytes = f.read(0, a, info.capacity as usize);
    assert!(bytes.iter().all(|&b| b == 0));
    // A negative size on free is a mismatch too, never a crash.
    let b = f.malloc_zeroed(64, 0, 0);
    assert!(f.alloc.free(b, -1, 0, S).unwrap().size_mismatch);
    f.assert_balanced();
}

/// A sink that says on stdout, when flushed (before a fail-closed abort), the kinds of the
/// events emitted so far.
struct SayOnFlush(std::sync::Arc<kvhygiene::events::MemorySink>);

impl kvhygiene::events::EventSink for SayOnFlush {
    fn emit(&self, event: kvhygiene::events::Event) {
        self.0.emit(event);
    }

    fn flush(&self) {
        use std::io::Write;
        let kinds: Vec<String> = self
            .0
            .snapshot()
            .iter()
            .map(|e| match &e.kind {
                EventKind::PolicyViolation { policy, .. } => format!("policy_violation:{policy}"),
                kind => kind.name().to_string(),
            })
            .collect();
        println!("KVH-FLUSHED {}", kinds.join(","));
        let _ = std::io::stdout().flush();
    }
}

/// Fail-closed mode: a verification failure aborts the process (run in a child process),
/// once its records, the `failure_mode` violation last, were flushed.
#[test]
fn failure_mode_abort_aborts_after_logging() {
    if std::env::var_os("KVH_TEST_ABORT_CHILD").is_some() {
        let config = Config {
            failure_mode: FailureMode::Abort,
            ..manual_config()
        };
        let backend = common::TestBackend::new(HostBackend::new());
        let said = kvhygiene::events::MemorySink::new();
        let sink = std::sync::Arc::new(SayOnFlush(said.clone()));
        let f = Fixture {
            alloc: kvhygiene::alloc::Allocator::new(backend.clone(), config, Some(sink)),
            backend,
            sink: said,
        };
        let a = f.malloc_zeroed(4096, 0, 0);
        f.write(0, a, &secret(4096, 1));
        f.backend.inject_fault_next();
        let _ = f.alloc.free_checked(a, 4096, 0, S);
        println!("KVH-CHILD-SURVIVED");
        return;
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "failure_mode_abort_aborts_after_logging",
            "--nocapture",
        ])
        .env("KVH_TEST_ABORT_CHILD", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "child must abort");
    assert!(!stdout.contains("KVH-CHILD-SURVIVED"), "{stdout}");
    assert!(stderr.contains("failure_mode=abort"), "{stderr}");
    // Flushed before the abort: the failed verification, the quarantine, then the violation.
    let flushed = stdout
        .lines()
        .find_map(|l| l.strip_prefix("KVH-FLUSHED "))
        .unwrap_or_else(|| panic!("nothing was flushed before the abort: {stdout}"));
    let kinds: Vec<&str> = flushed.split(',').collect();
    assert_eq!(
        kinds.last(),
        Some(&"policy_violation:failure_mode"),
        "{flushed}"
    );
    assert!(kinds.contains(&"verify_failed"), "{flushed}");
}

/// Quarantined blocks are accounted for and the tenant of the owner is on every event.
#[test]
fn events_carry_the_owner_context() {
    let f = Fixture::new(manual_config());
    Context::set_current(Context::new(Some("tenant-a"), Some("req-1"), Some("llama")).unwrap());
    let a = f.malloc_zeroed(512, 0, 0);
    Context::set_current(Context::none());
    f.write(0, a, &secret(512, 2));
    f.backend.inject_fault_next();
    let _ = f.alloc.free_checked(a, 512, 0, S);
    let q = f
        .sink
        .snapshot()
        .into_iter()
        .find(|e| e.kind.name() == "quarantine")
        .unwrap();
    assert_eq!(q.context.tenant_id(), Some("tenant-a"));
    assert_eq!(q.context.request_id(), Some("req-1"));
    assert_eq!(q.context.model_id(), Some("llama"));
    f.alloc.synchronize().unwrap();
    assert!(f.sink.snapshot().iter().any(|e| e.kind
        == EventKind::Released {
            reason: ReleaseReason::QuarantineCleared,
            leaked: false,
        }));
}

/// Invariant 1 with a permissive threshold: a scrub that passes coverage but read non-zero
/// samples (residue) never yields a CLEAN block; the block is quarantined.
#[test]
fn residue_is_never_handed_out_even_when_coverage_passes() {
    let f = Fixture::new(Config {
        coverage_threshold: 0.4,
        ..manual_config()
    });
    let a = f.malloc_zeroed(4096, 0, 0);
    let id = f.alloc.block_info(a).unwrap().id;
    f.write(0, a, &secret(4096, 0x11));
    f.backend.inject_fault_next(); // half the block stays dirty: coverage ~0.5 >= 0.4
    assert_eq!(
        f.alloc.free_checked(a, 4096, 0, S),
        Err(FreeError::VerifyFailed { addr: a }),
        "coverage passed, but the block was quarantined for residue"
    );
    assert!(f.sink.snapshot().iter().any(|e| e.kind
        == EventKind::Quarantined {
            reason: QuarantineReason::Residue,
            retired_before: false,
        }));
    f.alloc.synchronize().unwrap();
    for _ in 0..10 {
        let b = f.malloc_zeroed(4096, 0, 0);
        assert_ne!(f.alloc.block_info(b).unwrap().id, id);
    }
    assert_eq!(f.alloc.stats().counters.residue_detected, 1);
}

/// Invariant 6 and 5 together: once exit has begun, pending scrubs are abandoned, not
/// reported as failed verifications, and nothing aborts.
#[test]
fn exit_abandons_pending_scrubs_without_false_failures() {
    let f = Fixture::new(Config {
        failure_mode: FailureMode::Abort,
        ..manual_config()
    });
    let a = f.malloc_zeroed(4096, 0, 0);
    f.alloc.free(a, 4096, 0, S).unwrap();
    f.alloc.begin_exit();
    let _ = f.alloc.synchronize();
    f.alloc.empty_cache();
    assert_eq!(f.alloc.block_info(a).unwrap().state, BlockState::Pending);
    assert_eq!(f.sink.count("verify_failed"), 0);
    assert_eq!(f.sink.count("quarantine"), 0);
}

/// `synchronize` also waits for batches another thread is waiting on with the lock dropped.
#[test]
fn synchronize_waits_for_batches_held_by_other_threads() {
    let f = std::sync::Arc::new(Fixture::new(manual_config()));
    let a = f.malloc_zeroed(4096, 0, 0);
    f.backend.set_gate(false);
    let checker = {
        let f = f.clone();
        std::thread::spawn(move || f.alloc.free_checked(a, 4096, 0, S))
    };
    std::thread::sleep(Duration::from_millis(50)); // the checker now holds the batch
    let (tx, rx) = std::sync::mpsc::channel();
    let syncer = {
        let f = f.clone();
        std::thread::spawn(move || {
            f.alloc.synchronize().unwrap();
            tx.send(()).unwrap();
        })
    };
    assert!(
        rx.recv_timeout(Duration::from_millis(200)).is_err(),
        "synchronize returned while a scrub was still running"
    );
    f.backend.set_gate(true);
    rx.recv_timeout(Duration::from_secs(10)).unwrap();
    syncer.join().unwrap();
    checker.join().unwrap().unwrap();
    assert_eq!(f.alloc.block_info(a).unwrap().state, BlockState::Clean);
}

/// `malloc_with_origin` says whether the memory is fresh (its zeroing queued on the stream by
/// this call: what the synchronous `cudaMalloc` interposer waits for) or a pool hit.
#[test]
fn malloc_with_origin_tells_fresh_memory_from_pool_hits() {
    let f = Fixture::new(manual_config());
    let first = f.alloc.malloc_with_origin(4096, 0, S).unwrap();
    assert!(first.fresh);
    f.alloc.free(first.addr, 4096, 0, S).unwrap();
    f.alloc.synchronize().unwrap();
    let again = f.alloc.malloc_with_origin(4096, 0, S).unwrap();
    assert_eq!(again.addr, first.addr);
    assert!(!again.fresh, "a pool hit");
    let other = f.alloc.malloc_with_origin(100_000, 0, S).unwrap();
    assert!(other.fresh);
    assert_eq!(f.alloc.malloc(8, 0, S).map(|_| ()), Ok(()));
}

/// The out-of-memory path's pool hit is a hit too: the backend holds one block, which is
/// freed and still being scrubbed when the next malloc asks; waiting for the scrub gives that
/// block back, not fresh memory.
#[test]
fn malloc_with_origin_counts_an_out_of_memory_recovery_as_a_pool_hit() {
    let f = Fixture::with_host(manual_config(), HostBackend::with_capacity(4096));
    let first = f.alloc.malloc_with_origin(4096, 0, S).unwrap();
    f.alloc.free(first.addr, 4096, 0, S).unwrap();
    let again = f.alloc.malloc_with_origin(4096, 0, S).unwrap();
    assert_eq!(again.addr, first.addr);
    assert!(!again.fresh);
    assert_eq!(f.alloc.stats().counters.oom_recoveries, 1);
}

/// `kvh_free_checked` returns `KVH_OK` when the block verified and `KVH_ERR_VERIFY_FAILED`
/// when it was quarantined instead (include/kvhygiene.h). A scrub whose coverage meets a
/// threshold below 1 but that read non-zero samples quarantines the block (reason residue,
/// invariant 1): the checked free must say so, not report a block it will never hand out
/// again as verified.
#[test]
fn free_checked_reports_a_block_quarantined_for_residue() {
    let f = Fixture::new(Config {
        coverage_threshold: 0.4,
        ..manual_config()
    });
    let a = f.malloc_zeroed(8192, 0, 0);
    f.write(0, a, &secret(8192, 0x33));
    // Half the block is left unzeroed: coverage about 0.5, above the threshold.
    f.backend.inject_fault_next();
    let r = f.alloc.free_checked(a, 8192, 0, S);
    let st = f.alloc.stats();
    assert_eq!(st.counters.residue_detected, 1);
    assert_eq!(
        st.counters.quarantined, 1,
        "the block is quarantined for residue"
    );
    assert!(f.sink.snapshot().iter().any(|e| e.kind
        == EventKind::Quarantined {
            reason: QuarantineReason::Residue,
            retired_before: false,
        }));
    assert_eq!(
        r,
        Err(FreeError::VerifyFailed { addr: a }),
        "a checked free of a block quarantined for residue reported success"
    );
}

/// A `verify_failed` record states how many samples the failed scrub had to check
/// (docs/forensic-log.md). A quarantined block's re-scrub reads every word (full
/// verification), so when that re-scrub cannot be submitted (a driver error) and the block
/// fails closed, its record expects one sample per word of the block, as a re-scrub that ran
/// and failed would.
#[test]
fn a_rescrub_that_could_not_be_submitted_records_the_samples_it_expected() {
    use kvhygiene::backend::BackendError;
    let f = Fixture::new(manual_config());
    let a = f.malloc_zeroed(8192, 0, 0);
    f.write(0, a, &secret(8192, 0x44));
    *f.backend.refuse.lock().unwrap() = Some(Box::new(|b| {
        (b.options.full_verify && b.options.double_pass)
            .then(|| BackendError::Other("injected re-scrub submission failure".into()))
    }));
    f.backend.inject_fault_next();
    assert!(f.alloc.free_checked(a, 8192, 0, S).is_err());
    let _ = f.alloc.synchronize();
    let expected: Vec<u64> = f
        .sink
        .snapshot()
        .iter()
        .filter_map(|e| match e.kind {
            EventKind::VerifyFailed {
                samples_expected, ..
            } => Some(samples_expected),
            _ => None,
        })
        .collect();
    assert_eq!(
        expected.len(),
        2,
        "the first scrub and the re-scrub both failed: {expected:?}"
    );
    assert_eq!(
        expected[1],
        8192 / 8,
        "the re-scrub's verify_failed record: a full verification of 8192 bytes expects 1024 samples"
    );
}

/// The same for a first scrub under `full_verify`: when its batch cannot be submitted, the
/// record expects one sample per word, not `verify_samples`.
#[test]
fn a_full_verify_scrub_that_could_not_be_submitted_records_the_samples_it_expected() {
    let f = Fixture::new(Config {
        full_verify: true,
        ..manual_config()
    });
    let a = f.malloc_zeroed(4096, 0, 0);
    f.backend.submit_budget.store(0, Ordering::SeqCst);
    assert!(f.alloc.free_checked(a, 4096, 0, S).is_err());
    let first = f
        .sink
        .snapshot()
        .iter()
        .find_map(|e| match e.kind {
            EventKind::VerifyFailed {
                samples_expected, ..
            } => Some(samples_expected),
            _ => None,
        })
        .expect("a verify_failed record");
    assert_eq!(
        first,
        4096 / 8,
        "full_verify = true: a 4096-byte block's scrub expects 512 samples"
    );
}

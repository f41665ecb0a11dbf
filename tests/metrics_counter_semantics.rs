//! The allocator's counters as the metrics describe them (`kvh_*_total`, src/metrics/encode.rs
//! SERIES help texts): each counts exactly the events its help names.

mod common;

use std::sync::atomic::Ordering;

use common::{manual_config, secret, Fixture};
use kvhygiene::alloc::KvLayout;
use kvhygiene::backend::StreamHandle;
use kvhygiene::config::{Config, KvGateMode, KvGateScope};
use kvhygiene::context::Context;

const S: StreamHandle = StreamHandle(0);

/// `kvh_scrubbed_bytes_total` counts "Bytes zeroed by scrubs whose results came back" and
/// `kvh_scrubs_total` "Block scrubs (zeroing and verification) queued on the device". A scrub
/// the backend refused to queue zeroed nothing and was not queued: the block is quarantined (fail closed), but
/// neither counter may claim a scrub of it.
#[test]
fn a_scrub_the_backend_never_queued_zeroes_no_bytes() {
    let f = Fixture::new(manual_config());
    let a = f.malloc_zeroed(4096, 0, 0);
    // Every submission from now on fails with a driver error.
    f.backend.submit_budget.store(0, Ordering::SeqCst);
    f.alloc.free(a, 4096, 0, S).unwrap();
    let _ = f.alloc.synchronize();
    let c = f.alloc.stats().counters;
    assert_eq!(c.scrub_batches, 0, "no batch was queued");
    assert!(c.backend_errors >= 1);
    assert_eq!(
        (c.scrubs, c.bytes_scrubbed),
        (0, 0),
        "scrubs and bytes zeroed counted for a scrub that never ran"
    );
}

/// The same refused scrub through the block's state: it fails closed. The block was not
/// zeroed, so it is QUARANTINED (never handed out again) rather than left PENDING or made
/// CLEAN, and counted as a failed verification.
#[test]
fn a_block_whose_scrub_the_backend_refused_is_quarantined() {
    use kvhygiene::alloc::BlockState;
    let f = Fixture::new(manual_config());
    let a = f.malloc_zeroed(4096, 0, 0);
    f.backend.submit_budget.store(0, Ordering::SeqCst);
    f.alloc.free(a, 4096, 0, S).unwrap();
    let _ = f.alloc.synchronize();
    let state = f.alloc.block_info(a).map(|b| b.state);
    let c = f.alloc.stats().counters;
    assert_eq!(state, Some(BlockState::Quarantined), "{c:?}");
    assert!(c.verifications_failed >= 1, "{c:?}");
}

/// `kvh_kv_scrub_calls_total` counts the `kvh_scrub_blocks` calls accepted. A `kvh_claim_blocks`
/// call whose eviction gate scrubbed blocks is a claim (`kvh_kv_claim_calls_total`, with the
/// blocks in `kvh_kv_gate_scrubbed_blocks_total`), not a `kvh_scrub_blocks` call the engine
/// made: an engine that never scrubs must not look as if it did.
#[test]
fn a_gate_scrub_is_not_counted_as_a_kvh_scrub_blocks_call() {
    let f = Fixture::new(Config {
        kv_gate: KvGateMode::Scrub,
        kv_gate_scope: KvGateScope::Request,
        ..manual_config()
    });
    let len = 2 * 8 * 256;
    let a = f.malloc_zeroed(len as i64, 0, 1);
    f.write(0, a, &secret(len as usize, 0x6b));
    let layout = KvLayout {
        regions: vec![a, a + 8 * 256],
        block_bytes: 256,
        block_stride: 256,
        blocks_per_region: 8,
    };
    for request in ["a", "b"] {
        let ctx = Context::new(Some("t1"), Some(request), None).unwrap();
        let previous = Context::set_current(ctx);
        let r = f
            .alloc
            .claim_kv_blocks(&layout, &[1, 2], 0, StreamHandle(2))
            .unwrap();
        Context::set_current(previous);
        assert_eq!(r.gate_scrubbed.len(), 2, "request {request}");
    }
    let c = f.alloc.stats().counters;
    assert_eq!((c.kv_claim_calls, c.kv_gate_scrubbed_blocks), (2, 4));
    assert_eq!(
        c.kv_scrub_calls, 0,
        "the engine made no kvh_scrub_blocks call, yet {} are counted",
        c.kv_scrub_calls
    );
}

/// `kvh_out_of_memory_total` counts "Allocations that failed for lack of memory after every
/// recovery step" (the KvhOutOfMemory alert's runbook is about capacity). An allocation whose
/// retry after an out-of-memory failed with a driver error failed because of the driver, and
/// the caller is told so; counting it as out of memory sends the operator after capacity.
#[test]
fn a_driver_error_on_the_retry_is_not_counted_as_out_of_memory() {
    use kvhygiene::alloc::{AllocError, Allocator};
    use kvhygiene::backend::BackendError;
    // The next allocations fail as scripted: first out of memory, then with a driver error
    // (a fault that has nothing to do with memory running out).
    let backend = common::TestBackend::new(kvhygiene::backend::host::HostBackend::new());
    backend.allocate_errors.lock().unwrap().extend([
        BackendError::OutOfMemory {
            device: 0,
            requested: 4096,
        },
        BackendError::Driver {
            call: "cuMemAlloc_v2",
            code: 999,
            name: "CUDA_ERROR_UNKNOWN".into(),
        },
    ]);
    let alloc = Allocator::new(backend, manual_config(), None);
    let err = alloc.malloc(4096, 0, S).unwrap_err();
    assert!(matches!(err, AllocError::Backend(_)), "{err:?}");
    let c = alloc.stats().counters;
    assert_eq!(
        c.out_of_memory, 0,
        "a driver error was counted in kvh_out_of_memory_total ({err})"
    );
}

/// `kvh_backend_errors_total` counts "Errors reported by the memory backend (driver)". A
/// driver error from the allocation call itself is one: the allocation fails with it, and
/// the metric must show it.
#[test]
fn a_driver_error_from_an_allocation_is_counted_as_a_backend_error() {
    use kvhygiene::alloc::{AllocError, Allocator};
    use kvhygiene::backend::BackendError;
    let backend = common::TestBackend::new(kvhygiene::backend::host::HostBackend::new());
    backend
        .allocate_errors
        .lock()
        .unwrap()
        .push_back(BackendError::Driver {
            call: "cuMemAlloc_v2",
            code: 999,
            name: "CUDA_ERROR_UNKNOWN".into(),
        });
    let alloc = Allocator::new(backend, manual_config(), None);
    let err = alloc.malloc(4096, 0, S).unwrap_err();
    assert!(matches!(err, AllocError::Backend(_)), "{err:?}");
    let c = alloc.stats().counters;
    assert_eq!(
        c.backend_errors, 1,
        "the driver's error ({err}) is missing from kvh_backend_errors_total"
    );
}

/// `kvh_backend_errors_total` counts "Errors reported by the memory backend (driver)". An
/// allocation that fails because the driver's graph-capture query failed fails with that
/// driver error, as one whose `cuMemAlloc` failed does: the metric must show it too.
#[test]
fn a_driver_error_from_the_capture_query_of_an_allocation_is_counted_as_a_backend_error() {
    use kvhygiene::alloc::{AllocError, Allocator};
    // The driver's graph-capture query (`cuStreamIsCapturing`) fails.
    let backend = common::TestBackend::new(kvhygiene::backend::host::HostBackend::new());
    *backend.capture_query_error.lock().unwrap() = Some(kvhygiene::backend::BackendError::Driver {
        call: "cuStreamIsCapturing",
        code: 999,
        name: "CUDA_ERROR_UNKNOWN".into(),
    });
    let alloc = Allocator::new(backend, manual_config(), None);
    let err = alloc.malloc(4096, 0, S).unwrap_err();
    assert!(matches!(err, AllocError::Backend(_)), "{err:?}");
    let c = alloc.stats().counters;
    assert_eq!(
        c.backend_errors, 1,
        "the driver's error ({err}) is missing from kvh_backend_errors_total"
    );
}

/// `kvh_free_to_clean_seconds` holds the "Free-to-clean latency of blocks" (the stats'
/// `scrub_latency`: "Free → CLEAN latency"). A block whose scrub failed verification never
/// became clean (it is quarantined, never handed out again): it has no free-to-clean latency,
/// and the histogram, which the "scrub latency high" alert reads as how long freed memory
/// takes to become reusable, does not count it.
#[test]
fn a_block_that_failed_verification_has_no_free_to_clean_latency() {
    let f = Fixture::new(manual_config());
    let a = f.malloc_zeroed(4096, 0, 0);
    f.write(0, a, &secret(4096, 0x5a));
    f.backend.inject_fault_next();
    f.alloc.free(a, 4096, 0, S).unwrap();
    f.alloc.synchronize().unwrap();
    let st = f.alloc.stats();
    assert_eq!(st.counters.verifications_failed, 1, "the fault was caught");
    assert_eq!(st.accounting.clean.blocks, 0, "no block became clean");
    assert_eq!(
        st.scrub_latency.count, 0,
        "a free-to-clean latency was recorded for a block that failed verification and was \
         quarantined: {:?}",
        st.scrub_latency
    );
}

/// `kvh_scrub_latency_max_seconds` is "Longest free-to-clean latency since start". With one
/// block made clean after exactly 30 s, the longest latency is 30 s: the exported maximum is
/// that latency, no more than the sum of all latencies (here the same one), and the
/// histogram's `le="30"` bucket, which counts it, agrees that it was at most 30 s.
#[test]
fn the_exported_maximum_latency_is_the_longest_one_observed() {
    use kvhygiene::metrics::{encode, parse::parse, ExporterStats};
    use kvhygiene::stats::{PoolCounters, Stats};
    let mut pool = PoolCounters::default();
    pool.record_scrub_latency(30_000_000);
    let stats = Stats::merge("host".into(), &[pool], None);
    let text = encode(
        &stats,
        &ExporterStats::default(),
        std::time::SystemTime::now(),
    );
    let e = parse(&text).unwrap();
    let max = e.value("kvh_scrub_latency_max_seconds", &[]).unwrap();
    let sum = e.value("kvh_free_to_clean_seconds_sum", &[]).unwrap();
    let le_30 = e
        .value("kvh_free_to_clean_seconds_bucket", &[("le", "30")])
        .unwrap();
    assert_eq!((sum, le_30), (30.0, 1.0));
    assert_eq!(
        max, 30.0,
        "the one latency observed was 30 s (sum {sum}, le=\"30\" bucket {le_30}), yet the \
         longest is exported as {max} s"
    );
}

/// The quantiles of `kvh_scrub_latency_seconds` and `kvh_scrub_latency_max_seconds` describe
/// the same latencies: no quantile is above the longest latency observed. With one block made
/// clean after 30.000001 s, every quantile is at most that maximum (in the JSON statistics
/// and in the exported snapshot).
#[test]
fn no_latency_quantile_exceeds_the_exported_maximum() {
    use kvhygiene::metrics::{encode, parse::parse, ExporterStats};
    use kvhygiene::stats::{PoolCounters, Stats};
    let mut pool = PoolCounters::default();
    pool.record_scrub_latency(30_000_001);
    let stats = Stats::merge("host".into(), &[pool], None);
    let l = &stats.scrub_latency;
    assert!(
        l.p50_us <= l.max_us && l.p95_us <= l.max_us && l.p99_us <= l.max_us,
        "one latency of 30000001 us: p50 {} / p95 {} / p99 {} us, yet max {} us",
        l.p50_us,
        l.p95_us,
        l.p99_us,
        l.max_us
    );
    let text = encode(
        &stats,
        &ExporterStats::default(),
        std::time::SystemTime::now(),
    );
    let e = parse(&text).unwrap();
    let max = e.value("kvh_scrub_latency_max_seconds", &[]).unwrap();
    let p99 = e
        .value("kvh_scrub_latency_seconds", &[("quantile", "0.99")])
        .unwrap();
    assert!(
        p99 <= max,
        "quantile 0.99 is {p99} s, above the maximum {max} s"
    );
}

/// `kvh_scrub_latency_max_seconds` is "Longest free-to-clean latency since start". A block
/// made clean two hours after its free (a scrub held back by a long graph capture) is the
/// longest latency observed: with it the only one, the exported maximum is that latency, the
/// same as the histogram's `_sum` of all latencies, never less than it.
#[test]
fn a_latency_beyond_an_hour_is_exported_as_the_longest_one() {
    use kvhygiene::metrics::{encode, parse::parse, ExporterStats};
    use kvhygiene::stats::{PoolCounters, Stats};
    let mut pool = PoolCounters::default();
    pool.record_scrub_latency(7_200_000_000);
    let stats = Stats::merge("host".into(), &[pool], None);
    let text = encode(
        &stats,
        &ExporterStats::default(),
        std::time::SystemTime::now(),
    );
    let e = parse(&text).unwrap();
    let max = e.value("kvh_scrub_latency_max_seconds", &[]).unwrap();
    let sum = e.value("kvh_free_to_clean_seconds_sum", &[]).unwrap();
    let count = e.value("kvh_free_to_clean_seconds_count", &[]).unwrap();
    assert_eq!(count, 1.0);
    assert_eq!(
        max, sum,
        "one latency was observed (sum {sum} s, count {count}), yet the longest is exported \
         as {max} s (JSON max_us {}, sum_us {})",
        stats.scrub_latency.max_us, stats.scrub_latency.sum_us
    );
}

/// The `KvhBackendErrors` alert (deploy/prometheus/kvhygiene-rules.yaml) reads
/// `kvh_backend_errors_total` as "driver calls failed ... not a lack of memory", and the
/// runbook (docs/operations.md#backend-errors) says a lack of memory is counted apart. A
/// scrub batch the backend cannot queue for now for lack of memory for its own buffers is
/// deferred and retried (the block stays PENDING, nothing failed): it is not a driver fault,
/// and a healthy process under memory pressure must not count one.
#[test]
fn a_scrub_deferred_for_lack_of_memory_is_not_counted_as_a_backend_error() {
    use kvhygiene::backend::BackendError;
    let f = Fixture::new(manual_config());
    let a = f.malloc_zeroed(4096, 0, 0);
    *f.backend.refuse.lock().unwrap() = Some(Box::new(|b| {
        Some(BackendError::OutOfMemory {
            device: b.device,
            requested: 4096,
        })
    }));
    f.alloc.free(a, 4096, 0, S).unwrap();
    let deferred = f.alloc.synchronize();
    assert!(deferred.is_err(), "the scrub was deferred, not run");
    let c = f.alloc.stats().counters;
    assert!(c.scrubs_deferred >= 1, "{c:?}");
    *f.backend.refuse.lock().unwrap() = None;
    f.alloc.synchronize().unwrap();
    let c = f.alloc.stats().counters;
    assert_eq!(
        c.backend_errors, 0,
        "a scrub deferred for lack of memory (then run and verified) was counted in \
         kvh_backend_errors_total, which KvhBackendErrors reads as failed driver calls"
    );
}

/// The same for a `kvh_scrub_blocks` whose batch finds no memory for its buffers: the call
/// fails with out of memory (the caller retries), which is not a failed driver call. It is
/// still a failure an operator must see (its blocks were left unscrubbed, the engine told
/// `KVH_ERR_OUT_OF_MEMORY`): it counts as out of memory, as an allocation that found none.
#[test]
fn a_kv_scrub_refused_for_lack_of_memory_counts_as_out_of_memory_not_a_backend_error() {
    use kvhygiene::backend::BackendError;
    let f = Fixture::new(manual_config());
    let a = f.malloc_zeroed(4 * 4096, 0, 0);
    let layout = KvLayout {
        regions: vec![a],
        block_bytes: 4096,
        block_stride: 4096,
        blocks_per_region: 4,
    };
    f.alloc.synchronize().unwrap();
    let before = f.alloc.stats().counters;
    *f.backend.refuse.lock().unwrap() = Some(Box::new(|b| {
        Some(BackendError::OutOfMemory {
            device: b.device,
            requested: 4096,
        })
    }));
    let got = f.alloc.scrub_kv_blocks(&layout, &[1], 0, S);
    assert!(got.is_err(), "{got:?}");
    let after = f.alloc.stats().counters;
    assert_eq!(
        after.backend_errors, before.backend_errors,
        "a KV scrub refused for lack of memory ({got:?}) was counted in \
         kvh_backend_errors_total, which KvhBackendErrors reads as failed driver calls"
    );
    assert_eq!(
        after.out_of_memory,
        before.out_of_memory + 1,
        "a kvh_scrub_blocks call that failed for lack of memory ({got:?}) is not counted in \
         kvh_out_of_memory_total"
    );
}

/// `kvh_free_to_clean_seconds` holds the "Free-to-clean latency of the freed blocks that
/// became reusable". Fresh memory whose zeroing a graph capture refused (one begun since the
/// capture query) is kept and scrubbed once the capture allows it: it becomes clean, but it
/// was never handed out nor freed, so it has no free-to-clean latency and the histogram does
/// not count it (no free was made here at all).
#[test]
fn fresh_memory_kept_after_a_refused_zeroing_has_no_free_to_clean_latency() {
    let f = Fixture::new(manual_config());
    f.malloc_whose_zeroing_a_capture_refuses(4096);
    f.alloc.synchronize().unwrap();
    let st = f.alloc.stats();
    assert_eq!(
        st.accounting.clean.blocks, 1,
        "the kept memory became clean"
    );
    assert_eq!(
        (st.counters.frees, st.scrub_latency.count),
        (0, 0),
        "no block was freed, yet a free-to-clean latency was recorded: {:?}",
        st.scrub_latency
    );
}

//! `Allocator::scrub_kv_blocks` (`kvh_scrub_blocks`): blocks of a paged KV cache held in a
//! live allocation are zeroed and verified, and nothing else is written.

mod common;

use std::sync::atomic::Ordering;

use common::{manual_config, secret, Fixture};
use kvhygiene::alloc::{BlockState, KvLayout, KvScrubError, KvScrubReport};
use kvhygiene::backend::{BackendError, StreamHandle};
use kvhygiene::config::{Config, KvGateMode, KvGateScope};
use kvhygiene::context::Context;
use kvhygiene::events::{Event, EventKind, KvScrubRecord};

const BLOCK: u64 = 256;
const BLOCKS: u64 = 8;

/// A vLLM-style cache: K region then V region, `blocks` blocks of `block` bytes each, in one
/// allocation made on `stream` and filled with a secret. Returns the allocation, its length
/// and its layout.
fn kv_cache(f: &Fixture, tag: u8, block: u64, blocks: u64, stream: u64) -> (u64, u64, KvLayout) {
    let len = 2 * blocks * block;
    let a = f.malloc_zeroed(len as i64, 0, stream);
    f.write(0, a, &secret(len as usize, tag));
    let layout = KvLayout {
        regions: vec![a, a + blocks * block],
        block_bytes: block,
        block_stride: block,
        blocks_per_region: blocks,
    };
    (a, len, layout)
}

/// A layer of `BLOCKS` blocks of `BLOCK` bytes, allocated on stream 1.
fn layer(f: &Fixture, tag: u8) -> (u64, KvLayout) {
    let (a, _, layout) = kv_cache(f, tag, BLOCK, BLOCKS, 1);
    (a, layout)
}

/// Bytes of `[addr, addr + len)` that are zero, as ranges of the allocation at `base`.
fn zero_blocks(f: &Fixture, base: u64, len: u64) -> Vec<u64> {
    let bytes = f.read(0, base, len as usize);
    bytes
        .chunks(BLOCK as usize)
        .enumerate()
        .filter(|(_, c)| c.iter().all(|&b| b == 0))
        .map(|(i, _)| i as u64)
        .collect()
}

/// The `n`-th `kv_scrub` record.
fn kv_record(f: &Fixture, n: usize) -> KvScrubRecord {
    match &kv_events(f, "kv_scrub")[n].kind {
        EventKind::KvScrubbed(r) => (**r).clone(),
        other => panic!("{other:?}"),
    }
}

fn kv_events(f: &Fixture, name: &str) -> Vec<Event> {
    f.sink
        .snapshot()
        .into_iter()
        .filter(|e| e.kind.name() == name)
        .collect()
}

#[test]
fn named_blocks_read_zero_and_every_other_byte_is_kept() {
    let f = Fixture::new(manual_config());
    let (a, layout) = layer(&f, 0x5a);
    let before = f.read(0, a, (2 * BLOCKS * BLOCK) as usize);
    let report = f
        .alloc
        .scrub_kv_blocks(&layout, &[5, 1], 0, StreamHandle(3))
        .unwrap();
    assert!(report.failed.is_empty());
    assert_eq!((report.segments, report.bytes), (4, 4 * BLOCK));
    // Blocks 1 and 5 of K (chunks 1, 5) and of V (chunks 9, 13); nothing else.
    assert_eq!(zero_blocks(&f, a, 2 * BLOCKS * BLOCK), vec![1, 5, 9, 13]);
    let after = f.read(0, a, before.len());
    for (i, (x, y)) in before.iter().zip(&after).enumerate() {
        let chunk = i as u64 / BLOCK;
        if ![1, 5, 9, 13].contains(&chunk) {
            assert_eq!(x, y, "byte {i} outside the named blocks changed");
        }
    }
    let r = kv_record(&f, 0);
    assert_eq!(
        (r.device, r.blocks, r.verified_blocks, r.failed_blocks),
        (0, 2, 2, 0)
    );
    assert_eq!(
        (r.segments, r.unverified_segments, r.bytes),
        (4, 0, 4 * BLOCK)
    );
    assert_eq!(
        (r.first_seed, r.stream, r.regions),
        (report.first_seed, 3, 2)
    );
    assert_eq!(
        (r.block_bytes, r.block_stride, r.blocks_per_region),
        (BLOCK, BLOCK, BLOCKS)
    );
    assert_eq!(r.block_ids.as_deref(), Some(&[5, 1][..]));
    assert_ne!(r.block_ids_sha256, [0; 32]);
    assert!(r.error.is_none());
    let c = f.alloc.stats().counters;
    assert_eq!((c.kv_scrub_calls, c.kv_blocks_scrubbed), (1, 2));
    assert_eq!(
        (c.kv_segments_scrubbed, c.kv_bytes_scrubbed),
        (4, 4 * BLOCK)
    );
    assert_eq!(c.kv_blocks_failed, 0);
    // The cache stays live and usable: the allocator's own accounting is untouched.
    assert_eq!(f.alloc.block_info(a).unwrap().state, BlockState::Live);
    f.assert_balanced();
}

#[test]
fn interleaved_k_and_v_and_several_layers_are_scrubbed() {
    let f = Fixture::new(manual_config());
    // FlashInfer-style [blocks, 2, ...]: K and V of a block side by side, two layers.
    let len = 2 * BLOCKS * BLOCK;
    let l0 = f.malloc_zeroed(len as i64, 0, 1);
    let l1 = f.malloc_zeroed(len as i64, 0, 1);
    f.write(0, l0, &secret(len as usize, 1));
    f.write(0, l1, &secret(len as usize, 2));
    let layout = KvLayout {
        regions: vec![l0, l0 + BLOCK, l1, l1 + BLOCK],
        block_bytes: BLOCK,
        block_stride: 2 * BLOCK,
        blocks_per_region: BLOCKS,
    };
    let report = f
        .alloc
        .scrub_kv_blocks(&layout, &[2, 7], 0, StreamHandle(0))
        .unwrap();
    assert!(report.failed.is_empty());
    assert_eq!(report.segments, 8);
    for base in [l0, l1] {
        assert_eq!(zero_blocks(&f, base, len), vec![4, 5, 14, 15]);
    }
}

#[test]
fn a_failed_segment_names_its_block_and_is_logged() {
    let f = Fixture::new(manual_config());
    let (a, layout) = layer(&f, 0x33);
    // The first segment scrubbed (block 6, region K) leaves half of itself unzeroed.
    f.backend.inject_fault_next();
    let report = f
        .alloc
        .scrub_kv_blocks(&layout, &[6, 2], 0, StreamHandle(0))
        .unwrap();
    assert_eq!(report.failed, vec![6]);
    let failed = kv_events(&f, "kv_verify_failed");
    assert_eq!(failed.len(), 1);
    let e = &failed[0];
    assert_eq!(
        e.block.unwrap().addr,
        a,
        "the event names the cache's allocation"
    );
    match e.kind {
        EventKind::KvVerifyFailed {
            kv_block,
            region,
            addr,
            len,
            seed,
            samples_nonzero,
            ..
        } => {
            assert_eq!((kv_block, region, addr, len), (6, 0, a + 6 * BLOCK, BLOCK));
            assert_eq!(seed, report.first_seed);
            assert!(samples_nonzero > 0);
        }
        ref other => panic!("{other:?}"),
    }
    assert!(e.kind.is_security());
    let c = f.alloc.stats().counters;
    assert_eq!((c.kv_blocks_scrubbed, c.kv_blocks_failed), (2, 1));
    assert_eq!(kv_record(&f, 0).failed_blocks, 1);
}

/// Runs `call`, which must be refused: it writes nothing, submits nothing, records no stream,
/// and is logged as a policy violation naming `want`. Returns the error.
fn assert_refused(
    f: &Fixture,
    a: u64,
    before: &[u8],
    call: impl FnOnce() -> Result<KvScrubReport, KvScrubError>,
    want: &str,
) -> KvScrubError {
    let batches = f.backend.batches.lock().unwrap().len();
    let e = call().expect_err("the call must be refused");
    assert!(e.to_string().contains(want), "{e} does not say {want:?}");
    assert_eq!(
        f.read(0, a, before.len()),
        before,
        "a refused call wrote memory"
    );
    assert_eq!(
        f.backend.batches.lock().unwrap().len(),
        batches,
        "a refused call submitted a batch"
    );
    let violations: Vec<_> = kv_events(f, "policy_violation");
    let last = violations.last().expect("a policy_violation record");
    match &last.kind {
        EventKind::PolicyViolation { policy, detail } => {
            assert_eq!(*policy, "kv_scrub");
            assert!(detail.contains(want), "{detail}");
        }
        other => panic!("{other:?}"),
    }
    e
}

#[test]
fn memory_that_is_not_a_live_allocation_is_refused() {
    let f = Fixture::new(manual_config());
    let (a, layout) = layer(&f, 0x77);
    let before = f.read(0, a, (2 * BLOCKS * BLOCK) as usize);
    let s = StreamHandle(0);
    // The V region with one block more than the allocation's requested bytes.
    let long = KvLayout {
        regions: vec![layout.regions[1]],
        blocks_per_region: BLOCKS + 1,
        ..layout.clone()
    };
    let scrub = |l: &KvLayout, device: i32| f.alloc.scrub_kv_blocks(l, &[0], device, s);
    let e = assert_refused(
        &f,
        a,
        &before,
        || scrub(&long, 0),
        "not inside the requested bytes",
    );
    assert!(
        matches!(e, KvScrubError::NotLive { region: 0, .. }),
        "{e:?}"
    );
    // Inside the block's capacity but past the bytes the caller asked for.
    let short = f.malloc_zeroed(3000, 0, 1);
    assert!(f.alloc.block_info(short).unwrap().capacity >= 12 * BLOCK);
    let past = KvLayout {
        regions: vec![short],
        blocks_per_region: 12,
        ..layout.clone()
    };
    assert_refused(&f, a, &before, || scrub(&past, 0), "requested bytes");
    // An address the allocator never handed out.
    let stray = KvLayout {
        regions: vec![0x1000],
        ..layout.clone()
    };
    assert_refused(&f, a, &before, || scrub(&stray, 0), "0x1000");
    // The right memory named on another device.
    assert_refused(&f, a, &before, || scrub(&layout, 1), "device 1");
    // A freed cache is not live any more.
    let other = f.malloc_zeroed(4096, 0, 1);
    f.alloc.free(other, 4096, 0, s).unwrap();
    let freed = KvLayout {
        regions: vec![other],
        ..layout.clone()
    };
    assert_refused(&f, a, &before, || scrub(&freed, 0), "live");
    assert_eq!(f.alloc.stats().counters.kv_scrubs_refused, 5);
    assert_eq!(f.alloc.stats().counters.kv_scrub_calls, 0);
}

#[test]
fn bad_layouts_and_ids_are_refused_before_any_write() {
    let f = Fixture::new(manual_config());
    let (a, layout) = layer(&f, 0x19);
    let before = f.read(0, a, (2 * BLOCKS * BLOCK) as usize);
    let s = StreamHandle(0);
    let overlapping = KvLayout {
        regions: vec![a, a + BLOCK / 2],
        ..layout.clone()
    };
    let cases: Vec<(KvLayout, Vec<u32>, &str)> = vec![
        (overlapping, vec![0], "overlap"),
        (layout.clone(), vec![8], "block id 8 is out of range"),
        (
            layout.clone(),
            vec![3, 4, 3],
            "block id 3 is named more than once",
        ),
        (
            KvLayout {
                block_stride: BLOCK - 1,
                ..layout.clone()
            },
            vec![0],
            "smaller than block_bytes",
        ),
    ];
    for (l, ids, want) in cases {
        assert_refused(
            &f,
            a,
            &before,
            || f.alloc.scrub_kv_blocks(&l, &ids, 0, s),
            want,
        );
    }
    assert_eq!(f.alloc.stats().counters.kv_scrubs_refused, 4);
    // A device that does not exist: refused, counted and logged (on device 0's pool, as an
    // invalid free is), so an engine that mis-indexes its devices leaves a trace.
    assert!(matches!(
        f.alloc.scrub_kv_blocks(&layout, &[0], 99, s),
        Err(KvScrubError::InvalidDevice { device: 99, .. })
    ));
    assert_eq!(f.alloc.stats().counters.kv_scrubs_refused, 5);
    let last = f.sink.snapshot().pop().unwrap();
    assert!(
        matches!(&last.kind, EventKind::PolicyViolation { policy: "kv_scrub", detail } if detail.contains("99")),
        "{last:?}"
    );
    assert!(f.alloc.claim_kv_blocks(&layout, &[0], -1, s).is_err());
    assert_eq!(f.alloc.stats().counters.kv_claims_refused, 1);
    let last = f.sink.snapshot().pop().unwrap();
    assert!(
        matches!(&last.kind, EventKind::PolicyViolation { policy: "kv_gate", detail } if detail.contains("-1")),
        "{last:?}"
    );
    // No ids: nothing to do once the layout is checked.
    let r = f.alloc.scrub_kv_blocks(&layout, &[], 0, s).unwrap();
    assert_eq!(r.segments, 0);
    assert_eq!(f.read(0, a, before.len()), before);
}

/// Invariant 2 for KV scrubs: ordered after the allocation's streams, and before the scrub of
/// a later free of the allocation.
#[test]
fn kv_scrubs_are_ordered_after_the_cache_streams_and_before_its_free() {
    let f = Fixture::new(manual_config());
    let (a, layout) = layer(&f, 0x42);
    assert!(f.alloc.record_stream(a, StreamHandle(7)));
    f.alloc
        .scrub_kv_blocks(&layout, &[0], 0, StreamHandle(5))
        .unwrap();
    let kv = f.backend.batches.lock().unwrap().last().unwrap().clone();
    assert_eq!(kv.stream, StreamHandle(5));
    for w in [1, 7] {
        assert!(
            kv.wait_streams.contains(&StreamHandle(w)),
            "missing wait on {w}"
        );
    }
    assert!(!kv.wait_streams.contains(&StreamHandle(5)));
    let len = (2 * BLOCKS * BLOCK) as i64;
    f.alloc.free(a, len, 0, StreamHandle(9)).unwrap();
    f.alloc.synchronize().unwrap();
    let batches = f.backend.batches.lock().unwrap().clone();
    let free = batches
        .iter()
        .rev()
        .find(|b| b.segments.iter().any(|s| s.addr == a && s.len > BLOCK))
        .expect("the free's scrub");
    assert_eq!(free.stream, StreamHandle(9));
    assert!(
        free.wait_streams.contains(&StreamHandle(5)),
        "the free's scrub must wait for the KV scrub's stream"
    );
}

/// Blocks per region of [`big_cache`]: two regions of them make 80,000 segments, more than
/// one backend batch.
const BIG_BLOCKS: u64 = 40_000;

/// A cache of two regions of `BIG_BLOCKS` 8-byte blocks.
fn big_cache(f: &Fixture, tag: u8) -> (u64, u64, KvLayout) {
    kv_cache(f, tag, 8, BIG_BLOCKS, 0)
}

#[test]
fn calls_larger_than_a_batch_are_split_and_fully_scrubbed() {
    let f = Fixture::new(manual_config());
    let (a, len, layout) = big_cache(&f, 9);
    let ids: Vec<u32> = (0..BIG_BLOCKS as u32).rev().collect();
    let before = f.backend.batches.lock().unwrap().len();
    let r = f
        .alloc
        .scrub_kv_blocks(&layout, &ids, 0, StreamHandle(0))
        .unwrap();
    assert_eq!(r.segments, 80_000);
    assert!(r.failed.is_empty());
    assert_eq!(f.backend.batches.lock().unwrap().len() - before, 2);
    assert!(f.read(0, a, len as usize).iter().all(|&b| b == 0));
}

/// The streams the scrub of the allocation at `a` waits for, once it is freed on stream 9.
fn free_waits(f: &Fixture, a: u64) -> Vec<StreamHandle> {
    let len = f.alloc.block_info(a).unwrap().requested as i64;
    f.alloc.free(a, len, 0, StreamHandle(9)).unwrap();
    f.alloc.synchronize().unwrap();
    let batches = f.backend.batches.lock().unwrap().clone();
    batches
        .iter()
        .rev()
        .find(|b| b.segments.iter().any(|s| s.addr == a && s.len > BLOCK))
        .expect("the free's scrub")
        .wait_streams
        .clone()
}

#[test]
fn capture_and_exit_stop_the_call_without_a_false_verdict() {
    let f = Fixture::new(manual_config());
    let (a, layout) = layer(&f, 0x11);
    let before = f.read(0, a, (2 * BLOCKS * BLOCK) as usize);
    f.backend.capturing.store(true, Ordering::SeqCst);
    let got = f.alloc.scrub_kv_blocks(&layout, &[1], 0, StreamHandle(4));
    assert!(matches!(
        got,
        Err(KvScrubError::Backend {
            error: BackendError::StreamCapturing { .. },
            ..
        })
    ));
    f.backend.capturing.store(false, Ordering::SeqCst);
    assert_eq!(f.read(0, a, before.len()), before);
    let c = f.alloc.stats().counters;
    assert_eq!(
        (c.backend_errors, c.kv_blocks_scrubbed, c.kv_blocks_failed),
        (0, 0, 0)
    );
    // Accepted, as its metric's help says, and not a refusal of its input.
    assert_eq!((c.kv_scrub_calls, c.kv_scrubs_refused), (1, 0));
    assert!(kv_events(&f, "kv_verify_failed").is_empty());
    // The attempt is on record: nothing verified, and why.
    let r = kv_record(&f, 0);
    assert_eq!(
        (
            r.segments,
            r.unverified_segments,
            r.failed_blocks + r.verified_blocks
        ),
        (2, 2, 0)
    );
    assert!(r.error.as_deref().unwrap().contains("capturing"), "{r:?}");
    assert!(f.alloc.stats().last_async_error.is_none());
    // Nothing was launched, so the cache's later free does not wait for that stream.
    let (b, _) = layer(&f, 0x12);
    assert!(!free_waits(&f, a).contains(&StreamHandle(4)));
    // After exit begins, no backend call at all.
    f.alloc.begin_exit();
    f.backend.seal();
    let live = KvLayout {
        regions: vec![b],
        ..layout
    };
    assert_eq!(
        f.alloc.scrub_kv_blocks(&live, &[1], 0, StreamHandle(0)),
        Err(KvScrubError::ShuttingDown)
    );
    assert_eq!(f.backend.calls_after_seal.load(Ordering::SeqCst), 0);
}

#[test]
fn a_refused_call_records_no_stream_on_the_cache() {
    let f = Fixture::new(manual_config());
    let (a, layout) = layer(&f, 0x21);
    // Region 0 is live, region 1 is not: refused after region 0 was looked up.
    let half = KvLayout {
        regions: vec![a, 0x1000],
        ..layout
    };
    let got = f.alloc.scrub_kv_blocks(&half, &[0], 0, StreamHandle(6));
    assert!(
        matches!(got, Err(KvScrubError::NotLive { region: 1, .. })),
        "{got:?}"
    );
    assert!(!free_waits(&f, a).contains(&StreamHandle(6)));
}

#[test]
fn a_later_batch_failing_keeps_the_evidence_of_the_earlier_ones() {
    let f = Fixture::new(manual_config());
    let (_, _, layout) = big_cache(&f, 3);
    let ids: Vec<u32> = (0..BIG_BLOCKS as u32).collect();
    // The first batch (65,536 segments) runs with its first segment sabotaged; the second
    // cannot be submitted.
    f.backend.inject_fault_next();
    f.backend.submit_budget.store(1, Ordering::SeqCst);
    let got = f.alloc.scrub_kv_blocks(&layout, &ids, 0, StreamHandle(0));
    f.backend.submit_budget.store(-1, Ordering::SeqCst);
    assert!(
        matches!(&got, Err(KvScrubError::Backend { error: BackendError::Other(m), .. }) if m.contains("injected")),
        "{got:?}"
    );
    // The sabotaged segment of the first batch is still reported, to the caller too (the
    // block must be retired whatever is done about the error); nothing else is judged.
    let Err(KvScrubError::Backend { failed, .. }) = &got else {
        unreachable!()
    };
    assert_eq!(failed, &[0], "the error names the failed block");
    let failed = kv_events(&f, "kv_verify_failed");
    assert_eq!(failed.len(), 1);
    let r = kv_record(&f, 0);
    assert_eq!(
        (r.segments, r.unverified_segments),
        (80_000, 80_000 - 65_536)
    );
    assert_eq!((r.verified_blocks, r.failed_blocks), (32_768, 1));
    assert!(r.error.as_deref().unwrap().contains("injected"));
    assert!(
        r.block_ids.is_none(),
        "40,000 ids are logged as a digest only"
    );
    let c = f.alloc.stats().counters;
    // 32,768 blocks had both segments in the first batch; the sabotaged one failed.
    assert_eq!((c.kv_blocks_scrubbed, c.kv_blocks_failed), (32_768, 1));
    assert_eq!(c.backend_errors, 1);
    assert!(f.alloc.stats().last_async_error.is_none(), "not sticky");
}

#[test]
fn failures_are_named_once_per_block_in_the_callers_order() {
    let f = Fixture::new(manual_config());
    let (_, layout) = layer(&f, 0x31);
    // The first three segments: block 4 (K and V) and block 2 (K).
    f.backend.host.inject_skip_tail(3);
    let r = f
        .alloc
        .scrub_kv_blocks(&layout, &[4, 2, 7], 0, StreamHandle(0))
        .unwrap();
    assert_eq!(r.failed, vec![4, 2]);
    let regions: Vec<(u32, u32)> = kv_events(&f, "kv_verify_failed")
        .iter()
        .map(|e| match e.kind {
            EventKind::KvVerifyFailed {
                kv_block, region, ..
            } => (kv_block, region),
            ref other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(regions, vec![(4, 0), (4, 1), (2, 0)]);
}

#[test]
fn residue_fails_a_block_even_above_the_coverage_threshold() {
    let f = Fixture::new(Config {
        coverage_threshold: 0.4,
        ..manual_config()
    });
    let (_, layout) = layer(&f, 0x41);
    // Half the block is left dirty: coverage 0.5 passes 0.4, the residue does not.
    f.backend.inject_fault_next();
    let r = f
        .alloc
        .scrub_kv_blocks(&layout, &[3], 0, StreamHandle(0))
        .unwrap();
    assert_eq!(r.failed, vec![3]);
}

/// A first submission that failed with a driver error (not a capture or exit) may have
/// launched part of its work: the cache's later free still waits for the call's stream.
#[test]
fn a_failed_first_submission_still_orders_the_cache_free_after_its_stream() {
    let f = Fixture::new(manual_config());
    let (a, layout) = layer(&f, 0x23);
    f.backend.submit_budget.store(0, Ordering::SeqCst);
    let got = f.alloc.scrub_kv_blocks(&layout, &[2], 0, StreamHandle(6));
    f.backend.submit_budget.store(-1, Ordering::SeqCst);
    assert!(
        matches!(&got, Err(KvScrubError::Backend { error: BackendError::Other(m), .. }) if m.contains("injected")),
        "{got:?}"
    );
    assert!(
        free_waits(&f, a).contains(&StreamHandle(6)),
        "the free's scrub must wait for the stream of the failed KV submission"
    );
}

/// With the eviction gate on, a block of an engine scrub that did not finish (its segments
/// were in a batch that was never submitted) is not taken as verified clean: another
/// request's claim of it is still scrubbed by the gate; a block the call did verify is not.
#[test]
fn a_block_an_unfinished_scrub_never_verified_is_scrubbed_at_its_next_claim() {
    let f = Fixture::new(Config {
        kv_gate: KvGateMode::Scrub,
        kv_gate_scope: KvGateScope::Request,
        ..manual_config()
    });
    let (a, _, layout) = big_cache(&f, 0x55);
    let last = BIG_BLOCKS as u32 - 1;
    let claim = |request: &str| {
        let ctx = Context::new(Some("t1"), Some(request), None).unwrap();
        let previous = Context::set_current(ctx);
        let r = f
            .alloc
            .claim_kv_blocks(&layout, &[0, last], 0, StreamHandle(2))
            .unwrap();
        Context::set_current(previous);
        r
    };
    claim("a");
    // Request a fills the K segment of its last block.
    let k_last = a + u64::from(last) * 8;
    f.write(0, k_last, &secret(8, 0x66));
    // The engine frees every block; the second batch (the last blocks) is never submitted.
    let ids: Vec<u32> = (0..BIG_BLOCKS as u32).collect();
    f.backend.submit_budget.store(1, Ordering::SeqCst);
    let got = f.alloc.scrub_kv_blocks(&layout, &ids, 0, StreamHandle(0));
    f.backend.submit_budget.store(-1, Ordering::SeqCst);
    assert!(got.is_err(), "{got:?}");
    let r = claim("b");
    assert_eq!(r.gate_scrubbed, vec![last], "{r:?}");
    assert!(
        f.read(0, k_last, 8).iter().all(|&b| b == 0),
        "request b was handed request a's bytes"
    );
}

/// A call naming no blocks still has its geometry checked: a layout whose blocks overlap is
/// refused and counted even then.
#[test]
fn a_bad_layout_is_refused_even_without_block_ids() {
    let f = Fixture::new(manual_config());
    let (a, layout) = layer(&f, 0x29);
    let overlapping = KvLayout {
        regions: vec![a, a + BLOCK / 2],
        ..layout
    };
    let got = f
        .alloc
        .scrub_kv_blocks(&overlapping, &[], 0, StreamHandle(0));
    assert!(
        matches!(&got, Err(KvScrubError::InvalidLayout(m)) if m.contains("overlap")),
        "{got:?}"
    );
    assert_eq!(f.alloc.stats().counters.kv_scrubs_refused, 1);
}

/// A call that stopped part way counts as scrubbed only the segments and bytes that were read
/// back, not those of the batch that never ran.
#[test]
fn an_unfinished_call_counts_only_the_segments_read_back() {
    let f = Fixture::new(manual_config());
    let (_, _, layout) = big_cache(&f, 0x13);
    let ids: Vec<u32> = (0..BIG_BLOCKS as u32).collect();
    f.backend.submit_budget.store(1, Ordering::SeqCst);
    let got = f.alloc.scrub_kv_blocks(&layout, &ids, 0, StreamHandle(0));
    f.backend.submit_budget.store(-1, Ordering::SeqCst);
    assert!(got.is_err(), "{got:?}");
    let c = f.alloc.stats().counters;
    assert_eq!(
        (c.kv_segments_scrubbed, c.kv_bytes_scrubbed),
        (65_536, 65_536 * 8)
    );
    assert_eq!(c.kv_blocks_scrubbed, 32_768);
}

/// A cache whose layers are separate allocations, each used on its own streams: the scrub
/// waits for the streams of every layer's allocation, and each layer's later free waits for
/// the scrub's stream.
#[test]
fn a_scrub_across_allocations_is_ordered_with_every_one_of_them() {
    let f = Fixture::new(manual_config());
    let (l0, _, k0) = kv_cache(&f, 0x61, BLOCK, BLOCKS, 1);
    let (l1, _, k1) = kv_cache(&f, 0x62, BLOCK, BLOCKS, 3);
    assert!(f.alloc.record_stream(l0, StreamHandle(7)));
    assert!(f.alloc.record_stream(l1, StreamHandle(8)));
    let layout = KvLayout {
        regions: [k0.regions, k1.regions].concat(),
        ..k0
    };
    f.alloc
        .scrub_kv_blocks(&layout, &[4], 0, StreamHandle(5))
        .unwrap();
    let kv = f.backend.batches.lock().unwrap().last().unwrap().clone();
    assert_eq!(kv.segments.len(), 4);
    for w in [1, 7, 3, 8] {
        assert!(
            kv.wait_streams.contains(&StreamHandle(w)),
            "missing wait on {w}: {:?}",
            kv.wait_streams
        );
    }
    for base in [l0, l1] {
        assert!(
            free_waits(&f, base).contains(&StreamHandle(5)),
            "the free of {base:#x} must wait for the KV scrub's stream"
        );
    }
}

/// The requested bytes bound a KV region to the byte: a last block that ends exactly at the
/// allocation's end is scrubbed, one that ends a byte past it is refused (a smaller stride
/// moves it by a byte; the block's capacity beyond the request does not count).
#[test]
fn a_region_may_end_exactly_at_the_requested_bytes_and_not_a_byte_past() {
    let f = Fixture::new(manual_config());
    let len = 3001u64;
    let a = f.malloc_zeroed(len as i64, 0, 1);
    assert!(f.alloc.block_info(a).unwrap().capacity > len);
    // 3 blocks of 1000 bytes at a stride of 1000, from byte 1: the last ends at 3001.
    let exact = KvLayout {
        regions: vec![a + 1],
        block_bytes: 1000,
        block_stride: 1000,
        blocks_per_region: 3,
    };
    let r = f
        .alloc
        .scrub_kv_blocks(&exact, &[2], 0, StreamHandle(0))
        .unwrap();
    assert!(r.failed.is_empty(), "{r:?}");
    // The same from byte 2: the last block ends at 3002, one byte past the request.
    let past = KvLayout {
        regions: vec![a + 2],
        ..exact.clone()
    };
    let e = f
        .alloc
        .scrub_kv_blocks(&past, &[0], 0, StreamHandle(0))
        .unwrap_err();
    assert!(matches!(e, KvScrubError::NotLive { .. }), "{e:?}");
}

/// A KV scrub whose first submission finds no memory for a batch waits for the batches in
/// flight and is tried once more. The first attempt pinned the call to the allocation holding
/// the cache (its stream is recorded on it, so the cache's free is ordered after the call):
/// while the call waits, that allocation may be freed and its memory handed to another
/// caller. The call must then not scrub the new allocation, which it was never called for
/// (a KV scrub writes only inside a live allocation the call named, and memory is not handed
/// to another caller while the KV scrub may still write it): the new owner's bytes are kept
/// (the call fails: the cache it named is gone).
#[test]
fn a_kv_scrub_tried_again_does_not_write_an_allocation_made_while_it_waited() {
    use std::sync::atomic::AtomicBool;
    use std::sync::mpsc::channel;
    use std::sync::Mutex;
    let f = Fixture::new(Config {
        batch_size: 1,
        ..manual_config()
    });
    let (a, len, layout) = kv_cache(&f, 0x31, BLOCK, BLOCKS, 1);
    // A freed block whose scrub fails: quarantined, its re-scrub held in flight.
    let victim = f.malloc_zeroed(4096, 0, 1);
    f.backend.set_rescrub_gate(false);
    f.backend.inject_fault_next();
    let _ = f.alloc.free_checked(victim, 4096, 0, StreamHandle(1));
    // The KV call's first submission finds no memory for its batch.
    let (tx, rx) = channel();
    let tx = Mutex::new(tx);
    let once = AtomicBool::new(false);
    *f.backend.refuse.lock().unwrap() = Some(Box::new(move |b| {
        (b.stream == StreamHandle(6) && !once.swap(true, Ordering::SeqCst)).then(|| {
            tx.lock().unwrap().send(()).unwrap();
            BackendError::OutOfMemory {
                device: 0,
                requested: 0,
            }
        })
    }));
    let (got, new, kept) = std::thread::scope(|s| {
        let call = s.spawn(|| f.alloc.scrub_kv_blocks(&layout, &[0], 0, StreamHandle(6)));
        rx.recv().unwrap();
        // The call is waiting for the held re-scrub (lock released).
        std::thread::sleep(std::time::Duration::from_millis(300));
        f.alloc
            .free_checked(a, len as i64, 0, StreamHandle(1))
            .expect("the cache's free");
        let new = f.alloc.malloc(len as i64, 0, StreamHandle(1)).unwrap();
        let kept = secret(len as usize, 0x5c);
        f.write(0, new, &kept);
        f.backend.set_rescrub_gate(true);
        (call.join().unwrap(), new, kept)
    });
    assert_eq!(
        new, a,
        "precondition: the cache's memory was handed out again"
    );
    let now = f.read(0, new, len as usize);
    assert!(
        now == kept && got.is_err(),
        "a KV scrub called for a cache that was freed while it waited for a batch slot \
         scrubbed the allocation made at its address since ({} of {} bytes of the new \
         owner's changed); it returned {got:?}",
        now.iter().zip(&kept).filter(|(x, y)| x != y).count(),
        len
    );
}

/// The retry of a KV scrub after a full device (no memory for a batch slot) is for a
/// submission that ran out of memory. When it is the capture query that failed for lack of
/// memory (nothing is known about a capture), the call is refused at once, as an
/// allocation whose capture query ran out of memory is: it does not first wait for every
/// batch in flight on the device.
#[test]
fn a_kv_scrub_whose_capture_query_ran_out_of_memory_does_not_wait_for_the_pool() {
    use std::sync::mpsc::channel;
    use std::time::Duration;
    let f = Fixture::new(Config {
        batch_size: 1,
        ..manual_config()
    });
    let (_, layout) = layer(&f, 0x41);
    // A freed block's batch in flight, held.
    let other = f.malloc_zeroed(4096, 0, 1);
    f.backend.set_gate(false);
    f.alloc.free(other, 4096, 0, StreamHandle(1)).unwrap();
    *f.backend.capture_query_error.lock().unwrap() = Some(BackendError::OutOfMemory {
        device: 0,
        requested: 0,
    });
    let (tx, rx) = channel();
    let answered_at_once = std::thread::scope(|s| {
        s.spawn(|| {
            let r = f.alloc.scrub_kv_blocks(&layout, &[0], 0, StreamHandle(6));
            tx.send(r).unwrap();
        });
        let r = rx.recv_timeout(Duration::from_secs(3));
        f.backend.set_gate(true);
        r.ok().or_else(|| {
            let _ = rx.recv().unwrap();
            None
        })
    });
    *f.backend.capture_query_error.lock().unwrap() = None;
    assert!(
        answered_at_once.is_some(),
        "a KV scrub whose capture query ran out of memory waited for a batch in flight \
         (more than 3 s) before answering"
    );
}

/// A KV scrub whose batch finds no memory for a slot is tried again while batches in flight
/// may give one back. On a device that is out of memory with no batch in flight anywhere
/// (no freed block's scrub, no re-scrub, no other KV call), nothing can give a slot back:
/// the call fails with the out-of-memory error at once, rather than holding its caller (an
/// engine's scheduler thread, a claim in `kvh_claim_blocks`) for seconds.
#[test]
fn a_kv_scrub_on_a_device_out_of_memory_with_nothing_in_flight_fails_at_once() {
    use std::time::{Duration, Instant};
    let f = Fixture::new(manual_config());
    let (_, layout) = layer(&f, 0x42);
    *f.backend.refuse.lock().unwrap() = Some(Box::new(|b| {
        (b.stream == StreamHandle(6)).then_some(BackendError::OutOfMemory {
            device: 0,
            requested: 0,
        })
    }));
    let started = Instant::now();
    let got = f.alloc.scrub_kv_blocks(&layout, &[0], 0, StreamHandle(6));
    let took = started.elapsed();
    *f.backend.refuse.lock().unwrap() = None;
    assert!(
        matches!(
            got,
            Err(KvScrubError::Backend {
                error: BackendError::OutOfMemory { .. },
                ..
            })
        ),
        "precondition: {got:?}"
    );
    assert!(
        took < Duration::from_millis(500),
        "a KV scrub on a device out of memory, with no batch in flight that could give a \
         slot back, took {took:?} to fail"
    );
}

/// A KV scrub that finds no batch slot is tried again while a batch in flight may give one
/// back. When the batch that held the slot (here another KV call's) completes right after a
/// try was refused, its slot is free again: the call is expected to take it on its next try,
/// not to conclude that nothing can give a slot back and fail out of memory.
#[test]
fn a_kv_scrub_tried_again_takes_a_slot_given_back_just_after_a_refused_try() {
    use std::sync::atomic::AtomicUsize;
    use std::sync::mpsc::channel;
    use std::sync::Mutex;
    use std::time::Duration;
    let f = Fixture::new(manual_config());
    let (_, layout) = layer(&f, 0x43);
    // Another KV call (stream 7) holds the device's only slot: its batch stays in flight.
    f.backend.set_gate(false);
    let (tx, rx) = channel();
    let tx = Mutex::new(tx);
    let backend = f.backend.clone();
    let tries = AtomicUsize::new(0);
    let oom = || BackendError::OutOfMemory {
        device: 0,
        requested: 0,
    };
    *f.backend.refuse.lock().unwrap() = Some(Box::new(move |b| {
        if b.stream == StreamHandle(7) {
            tx.lock().unwrap().send(()).unwrap();
            return None;
        }
        if b.stream != StreamHandle(6) {
            return None;
        }
        match tries.fetch_add(1, Ordering::SeqCst) {
            // The first try finds no slot.
            0 => Some(oom()),
            // So does the second; as it is refused, the other call's batch completes and its
            // slot is given back.
            1 => {
                backend.set_gate(true);
                std::thread::sleep(Duration::from_millis(300));
                Some(oom())
            }
            _ => None,
        }
    }));
    let (other, got) = std::thread::scope(|s| {
        let other = s.spawn(|| f.alloc.scrub_kv_blocks(&layout, &[1], 0, StreamHandle(7)));
        rx.recv().unwrap();
        let got = f.alloc.scrub_kv_blocks(&layout, &[0], 0, StreamHandle(6));
        f.backend.set_gate(true);
        (other.join().unwrap(), got)
    });
    *f.backend.refuse.lock().unwrap() = None;
    assert!(other.is_ok(), "precondition: the other KV call: {other:?}");
    assert!(
        got.is_ok(),
        "a KV scrub whose try was refused for want of a slot failed out of memory, although \
         the batch holding the slot completed right after that try and a slot was free: \
         {got:?}"
    );
}

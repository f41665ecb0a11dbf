//! `Allocator::scrub_kv_blocks` (`kvh_scrub_blocks`): blocks of a paged KV cache held in a
//! live allocation are zeroed and verified, and nothing else is written.

mod common;

use std::sync::atomic::Ordering;

use common::{manual_config, secret, Fixture};
use kvhygiene::alloc::{BlockState, KvLayout, KvScrubError};
use kvhygiene::backend::{BackendError, StreamHandle};
use kvhygiene::events::{Event, EventKind};

const BLOCK: u64 = 256;
const BLOCKS: u64 = 8;

/// A vLLM-style layer: K region then V region, `BLOCKS` blocks of `BLOCK` bytes each, in one
/// allocation filled with a secret. Returns the allocation and its layout.
fn layer(f: &Fixture, tag: u8) -> (u64, KvLayout) {
    let len = 2 * BLOCKS * BLOCK;
    let a = f.malloc_zeroed(len as i64, 0, 1);
    f.write(0, a, &secret(len as usize, tag));
    let layout = KvLayout {
        regions: vec![a, a + BLOCKS * BLOCK],
        block_bytes: BLOCK,
        block_stride: BLOCK,
        blocks_per_region: BLOCKS,
    };
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
    let scrubbed = kv_events(&f, "kv_scrub");
    assert_eq!(scrubbed.len(), 1);
    match scrubbed[0].kind {
        EventKind::KvScrubbed {
            device,
            blocks,
            failed_blocks,
            segments,
            bytes,
            first_seed,
            stream,
        } => {
            assert_eq!((device, blocks, failed_blocks), (0, 2, 0));
            assert_eq!((segments, bytes, stream), (4, 4 * BLOCK, 3));
            assert_eq!(first_seed, report.first_seed);
        }
        ref other => panic!("{other:?}"),
    }
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
    match kv_events(&f, "kv_scrub")[0].kind {
        EventKind::KvScrubbed { failed_blocks, .. } => assert_eq!(failed_blocks, 1),
        ref other => panic!("{other:?}"),
    }
}

/// Refused calls write nothing, submit nothing, and are logged as policy violations.
fn assert_refused(
    f: &Fixture,
    a: u64,
    before: &[u8],
    got: Result<impl std::fmt::Debug, KvScrubError>,
    want: &str,
) {
    let batches = f.backend.batches.lock().unwrap().len();
    let e = got.expect_err("the call must be refused");
    assert!(e.to_string().contains(want), "{e} does not say {want:?}");
    assert_eq!(
        f.read(0, a, before.len()),
        before,
        "a refused call wrote memory"
    );
    assert_eq!(f.backend.batches.lock().unwrap().len(), batches);
    let violations: Vec<_> = kv_events(f, "policy_violation");
    let last = violations.last().expect("a policy_violation record");
    match &last.kind {
        EventKind::PolicyViolation { policy, detail } => {
            assert_eq!(*policy, "kv_scrub");
            assert!(detail.contains(want), "{detail}");
        }
        other => panic!("{other:?}"),
    }
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
    let got = f.alloc.scrub_kv_blocks(&long, &[0], 0, s);
    assert!(
        matches!(got, Err(KvScrubError::NotLive { region: 0, .. })),
        "{got:?}"
    );
    assert_refused(&f, a, &before, got, "not inside the requested bytes");
    // Inside the block's capacity but past the bytes the caller asked for.
    let short = f.malloc_zeroed(3000, 0, 1);
    assert!(f.alloc.block_info(short).unwrap().capacity >= 12 * BLOCK);
    let past = KvLayout {
        regions: vec![short],
        blocks_per_region: 12,
        ..layout.clone()
    };
    assert_refused(
        &f,
        a,
        &before,
        f.alloc.scrub_kv_blocks(&past, &[0], 0, s),
        "requested bytes",
    );
    // An address the allocator never handed out.
    let stray = KvLayout {
        regions: vec![0x1000],
        ..layout.clone()
    };
    assert_refused(
        &f,
        a,
        &before,
        f.alloc.scrub_kv_blocks(&stray, &[0], 0, s),
        "0x1000",
    );
    // The right memory named on another device.
    let got = f.alloc.scrub_kv_blocks(&layout, &[0], 1, s);
    assert_refused(&f, a, &before, got, "device 1");
    // A freed cache is not live any more.
    let other = f.malloc_zeroed(4096, 0, 1);
    f.alloc.free(other, 4096, 0, s).unwrap();
    let freed = KvLayout {
        regions: vec![other],
        ..layout.clone()
    };
    assert_refused(
        &f,
        a,
        &before,
        f.alloc.scrub_kv_blocks(&freed, &[0], 0, s),
        "live",
    );
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
        let got = f.alloc.scrub_kv_blocks(&l, &ids, 0, s);
        assert_refused(&f, a, &before, got, want);
    }
    assert_eq!(f.alloc.stats().counters.kv_scrubs_refused, 4);
    // An invalid device is an argument error of the call itself.
    assert!(matches!(
        f.alloc.scrub_kv_blocks(&layout, &[0], 99, s),
        Err(KvScrubError::InvalidDevice { device: 99, .. })
    ));
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

#[test]
fn calls_larger_than_a_batch_are_split_and_fully_scrubbed() {
    let f = Fixture::new(manual_config());
    let (block, blocks) = (8u64, 40_000u64);
    let len = 2 * blocks * block;
    let a = f.malloc_zeroed(len as i64, 0, 0);
    f.write(0, a, &secret(len as usize, 9));
    let layout = KvLayout {
        regions: vec![a, a + blocks * block],
        block_bytes: block,
        block_stride: block,
        blocks_per_region: blocks,
    };
    let ids: Vec<u32> = (0..blocks as u32).rev().collect();
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

#[test]
fn capture_and_exit_stop_the_call_without_a_false_verdict() {
    let f = Fixture::new(manual_config());
    let (a, layout) = layer(&f, 0x11);
    let before = f.read(0, a, (2 * BLOCKS * BLOCK) as usize);
    f.backend.capturing.store(true, Ordering::SeqCst);
    let got = f.alloc.scrub_kv_blocks(&layout, &[1], 0, StreamHandle(4));
    assert!(matches!(
        got,
        Err(KvScrubError::Backend(BackendError::StreamCapturing { .. }))
    ));
    f.backend.capturing.store(false, Ordering::SeqCst);
    assert_eq!(f.read(0, a, before.len()), before);
    let c = f.alloc.stats().counters;
    assert_eq!(
        (c.backend_errors, c.kv_scrub_calls, c.kv_blocks_failed),
        (0, 0, 0)
    );
    assert!(kv_events(&f, "kv_scrub").is_empty());
    assert!(f.alloc.stats().last_async_error.is_none());
    // After exit begins, no backend call at all.
    f.alloc.begin_exit();
    f.backend.seal();
    assert_eq!(
        f.alloc.scrub_kv_blocks(&layout, &[1], 0, StreamHandle(0)),
        Err(KvScrubError::ShuttingDown)
    );
    assert_eq!(f.backend.calls_after_seal.load(Ordering::SeqCst), 0);
}

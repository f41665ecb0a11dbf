//! `Allocator::scrub_kv_blocks` (`kvh_scrub_blocks`): what its report, records and counters
//! say about a call, and what it writes.

mod common;

use std::sync::atomic::Ordering;

use common::{manual_config, secret, Fixture};
use kvhygiene::alloc::KvLayout;
use kvhygiene::backend::StreamHandle;
use kvhygiene::events::EventKind;

/// `kvh_kv_scrubbed_blocks_total` is documented as "blocks zeroed and read back ...; those
/// that failed are in kvh_kv_failed_blocks_total too": every block counted as failed was also
/// counted as scrubbed, and a `kv_scrub` record's `failed_blocks` are among its
/// `verified_blocks`. A block whose segments span two backend batches, whose first segment
/// failed and whose second batch never ran, must not be counted failed without being counted
/// scrubbed.
#[test]
fn failed_blocks_are_a_subset_of_scrubbed_blocks_when_a_call_stops() {
    let f = Fixture::new(manual_config());
    // Three regions (K, V and a third), 22,000 blocks of 8 bytes each: 66,000 segments, so
    // block 21,845 has its first segment (65,535) in batch 1 and the other two in batch 2.
    let blocks: u64 = 22_000;
    let len = 3 * blocks * 8;
    let a = f.malloc_zeroed(len as i64, 0, 0);
    f.write(0, a, &secret(len as usize, 7));
    let layout = KvLayout {
        regions: vec![a, a + blocks * 8, a + 2 * blocks * 8],
        block_bytes: 8,
        block_stride: 8,
        blocks_per_region: blocks,
    };
    let ids: Vec<u32> = (0..blocks as u32).collect();
    // Every segment of the first batch is left dirty; the second batch cannot be submitted.
    f.backend.host.inject_skip_tail(65_536);
    f.backend.submit_budget.store(1, Ordering::SeqCst);
    let got = f.alloc.scrub_kv_blocks(&layout, &ids, 0, StreamHandle(0));
    f.backend.submit_budget.store(-1, Ordering::SeqCst);
    assert!(got.is_err(), "{got:?}");
    let record = f
        .sink
        .snapshot()
        .into_iter()
        .find_map(|e| match e.kind {
            EventKind::KvScrubbed(r) => Some(*r),
            _ => None,
        })
        .expect("a kv_scrub record");
    let c = f.alloc.stats().counters;
    assert!(
        c.kv_blocks_failed <= c.kv_blocks_scrubbed,
        "kv_blocks_failed ({}) exceeds kv_blocks_scrubbed ({}): a failed block was not counted \
         as scrubbed",
        c.kv_blocks_failed,
        c.kv_blocks_scrubbed
    );
    assert!(
        record.failed_blocks <= record.verified_blocks,
        "kv_scrub record: failed_blocks {} > verified_blocks {}",
        record.failed_blocks,
        record.verified_blocks
    );
}

/// Invariant 6 (ARCHITECTURE.md): no backend call is made once process exit has begun; every
/// pool checks the exit flag before each submission. A `kvh_scrub_blocks` call larger than
/// one backend batch that is under way when exit begins must not submit its later batches.
#[test]
fn a_kv_scrub_submits_no_batch_after_exit_began() {
    let test_backend = common::TestBackend::new(kvhygiene::backend::host::HostBackend::new());
    let alloc = kvhygiene::alloc::Allocator::new(test_backend.clone(), manual_config(), None);
    // Two regions of 40,000 blocks: 80,000 segments, two backend batches.
    let blocks: u64 = 40_000;
    let len = 2 * blocks * 8;
    let a = alloc.malloc(len as i64, 0, StreamHandle(0)).unwrap();
    let layout = KvLayout {
        regions: vec![a, a + blocks * 8],
        block_bytes: 8,
        block_stride: 8,
        blocks_per_region: blocks,
    };
    let ids: Vec<u32> = (0..blocks as u32).collect();
    common::begin_exit_after_next_submit(&test_backend, &alloc);
    let got = alloc.scrub_kv_blocks(&layout, &ids, 0, StreamHandle(0));
    assert_eq!(
        test_backend.calls_after_seal.load(Ordering::SeqCst),
        0,
        "the KV scrub called the backend after exit began ({} batches submitted; result: {:?})",
        test_backend.batches.lock().unwrap().len(),
        got.map(|r| r.segments)
    );
}

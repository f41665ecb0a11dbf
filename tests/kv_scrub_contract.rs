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
    // Blocks 0..21,845 lie wholly in the first batch, every segment of which was left dirty:
    // each is a failed block (a bound of zero would let the checks below hold vacuously).
    const WHOLLY_IN_BATCH_1: u64 = 21_845;
    assert!(
        c.kv_blocks_failed >= WHOLLY_IN_BATCH_1,
        "kv_blocks_failed {} (the first batch failed {WHOLLY_IN_BATCH_1} whole blocks)",
        c.kv_blocks_failed
    );
    assert!(
        record.failed_blocks >= WHOLLY_IN_BATCH_1,
        "kv_scrub record: failed_blocks {} (the first batch failed {WHOLLY_IN_BATCH_1} whole \
         blocks)",
        record.failed_blocks
    );
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
    // The exit began inside the call, after its first batch: otherwise the check below would
    // hold for a call that never reached a second submission.
    assert!(
        test_backend.sealed.load(Ordering::SeqCst),
        "exit did not begin during the call"
    );
    assert_eq!(
        test_backend.batches.lock().unwrap().len(),
        1,
        "the call submitted more than its first batch"
    );
    assert!(
        got.is_err(),
        "a call cut short by exit reported success: {got:?}"
    );
    assert_eq!(
        test_backend.calls_after_seal.load(Ordering::SeqCst),
        0,
        "the KV scrub called the backend after exit began ({} batches submitted; result: {:?})",
        test_backend.batches.lock().unwrap().len(),
        got.map(|r| r.segments)
    );
}

/// Invariant 6 for the first launch of a call: exit may begin after the call passed its
/// start-up check but before its first batch is submitted (the layout and ids of a large call
/// take a while to check and cut into batches). Then nothing is submitted at all, and the call
/// ends with its `kv_scrub` record saying why. The exit is begun from another thread after a
/// delay, adjusted until it lands in that interval.
#[test]
fn exit_begun_before_the_first_launch_of_a_call_submits_nothing() {
    const BLOCKS: u64 = 1 << 19; // two regions: 2^20 segments, sixteen backend batches
    let mut delay = std::time::Duration::from_millis(5);
    for attempt in 0..30 {
        let f = std::sync::Arc::new(Fixture::new(manual_config()));
        let len = 2 * BLOCKS * 8;
        let a = f.alloc.malloc(len as i64, 0, StreamHandle(0)).unwrap();
        let layout = KvLayout {
            regions: vec![a, a + BLOCKS * 8],
            block_bytes: 8,
            block_stride: 8,
            blocks_per_region: BLOCKS,
        };
        let ids: Vec<u32> = (0..BLOCKS as u32).rev().collect();
        let before = f.backend.batches.lock().unwrap().len();
        let exiter = {
            let f = f.clone();
            std::thread::spawn(move || {
                std::thread::sleep(delay);
                f.alloc.begin_exit();
                f.backend.seal();
            })
        };
        let got = f.alloc.scrub_kv_blocks(&layout, &ids, 0, StreamHandle(0));
        exiter.join().unwrap();
        let submitted = f.backend.batches.lock().unwrap().len() - before;
        let after_seal = f.backend.calls_after_seal.load(Ordering::SeqCst);
        assert_eq!(
            after_seal, 0,
            "attempt {attempt}: a batch was submitted after exit began ({submitted} submitted; {got:?})"
        );
        let reached_launch = f
            .sink
            .snapshot()
            .iter()
            .any(|e| matches!(&e.kind, EventKind::KvScrubbed(_)));
        match (reached_launch, submitted) {
            // Exit began between the start-up check and the first launch: nothing submitted.
            (true, 0) => {
                assert!(got.is_err(), "{got:?}");
                return;
            }
            // Refused at the start: exit began too early.
            (false, _) => delay *= 2,
            // Exit began after the first launch: too late.
            (true, _) => delay /= 2,
        }
    }
    panic!("exit never began between a call's start-up check and its first launch");
}

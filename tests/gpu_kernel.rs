//! Kernel correctness on a real GPU, through the `Backend` trait. Every test is `#[ignore]`:
//! CI has no GPU. scripts/gpu-check.sh runs the prebuilt binary with
//! `--ignored --test-threads=1` on the GPU machine.
//!
//! Each check fills device memory with random bytes, scrubs segments at odd offsets, reads the
//! whole allocation back and asserts: every byte inside a segment is zero, every byte outside
//! is unchanged (no overrun), and each result slot equals what `verify::verify_bytes` computes
//! on the read-back bytes. Read-back zeros agree with any positions, so a segment left
//! unzeroed on purpose holds marked words where the host rule samples and where it does not:
//! the kernel must count exactly the sampled ones (its positions are the host rule's). The same
//! checks run in CI against a host stand-in for the driver (tests/cuda_fake_driver.rs).

#[path = "backend_common/mod.rs"]
mod common;

use common::{batch, random_bytes, random_layout, run, scrub_and_check, submit, MIB, SAMPLED};
use kvhygiene::backend::cuda::{probe, CudaBackend, ItemGrid, Probe};
use kvhygiene::backend::verify;
use kvhygiene::backend::{Backend, BackendError, ScrubOptions, ScrubSegment, StreamHandle};

fn backend() -> CudaBackend {
    match probe() {
        Probe::Available(b) => b,
        Probe::NoDriver(why) => panic!("these tests need a GPU: {why}"),
        Probe::Broken(e) => panic!("the CUDA backend cannot start: {e}"),
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn reports_the_kernel_image_in_use() {
    let b = backend();
    let image = b.image_in_use(0).expect("device 0");
    let version = b.driver_version().expect("driver version");
    eprintln!("device 0 runs {image}; driver API {version}");
    assert!(version >= 12000);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn every_size_and_alignment_is_zeroed_exactly() {
    let b = backend();
    let sizes = [
        1u64,
        2,
        7,
        8,
        9,
        15,
        16,
        17,
        31,
        255,
        4096 + 3,
        // Around one inline chunk (32 KiB): written whole by one block, or published.
        32_767,
        32_768,
        32_769,
        65_535,
        65_536,
        65_537,
        3 * 65_536 + 11,
        MIB + 5,
        64 * MIB + 1,
    ];
    for &len in &sizes {
        for off in [0u64, 1, 3, 8, 13, 256] {
            scrub_and_check(&b, len + off + 64, &[(off, len)], SAMPLED);
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn one_gib_segment_at_an_odd_offset() {
    let b = backend();
    scrub_and_check(&b, 1024 * MIB + 32, &[(5, 1024 * MIB + 3)], SAMPLED);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn batches_of_1_to_10000_segments() {
    let b = backend();
    for count in [1usize, 2, 17, 1000, 10_000] {
        let (segments, total) = random_layout(count, 20_000, count as u64);
        scrub_and_check(&b, total, &segments, SAMPLED);
    }
    // More segments than travel in the kernel parameter, some spanning several chunks: work
    // items, sums and the publish launch on the real kernels.
    for (count, max_len) in [(121usize, 300_000u64), (500, 1_000_000)] {
        let (segments, total) = random_layout(count, max_len, count as u64 + 7);
        scrub_and_check(&b, total, &segments, SAMPLED);
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn full_verification_and_double_pass() {
    let b = backend();
    let segments = [
        (3u64, 1u64),
        (16, 4096),
        (5000, 3 * 65_536 + 7),
        (300_000, 8 * MIB),
    ];
    for (full, double) in [(true, false), (false, true), (true, true)] {
        let opts = ScrubOptions {
            samples: 64,
            full_verify: full,
            double_pass: double,
        };
        let results = scrub_and_check(&b, 300_000 + 8 * MIB + 64, &segments, opts);
        if full {
            assert_eq!(
                results[3].checked,
                8 * MIB / 8,
                "full mode reads every word"
            );
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn batches_with_work_items_under_both_launch_shapes() {
    let b = backend();
    let strided = b.strided_blocks(0).expect("device 0");
    eprintln!("kvh_scrub_strided: {strided} resident blocks");
    assert!(
        strided > 0,
        "the driver reports the strided kernel's occupancy"
    );
    for shape in [ItemGrid::PerChunk, ItemGrid::Resident] {
        b.set_item_grid(shape);
        eprintln!("work-item batches under {shape:?}");
        common::item_batches_are_scrubbed(&b);
        common::skipped_segment_is_caught(&b, &|i| b.inject_skip_zero(i));
        common::sampled_words_are_the_host_rules(&b, &|i| b.inject_skip_zero(i));
    }
    b.set_item_grid(ItemGrid::default());
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn kv_cache_blocks_are_scrubbed_through_the_allocator() {
    common::kv_blocks_are_scrubbed(std::sync::Arc::new(backend()));
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn a_skipped_segment_is_caught_by_the_verification() {
    let b = backend();
    common::skipped_segment_is_caught(&b, &|i| b.inject_skip_zero(i));
    common::sampled_words_are_the_host_rules(&b, &|i| b.inject_skip_zero(i));
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn wait_streams_poll_and_capture_status() {
    let b = backend();
    let len = 16 * MIB;
    let base = b.allocate(0, len).expect("allocate");
    b.write(0, base, &random_bytes(len as usize, 3))
        .expect("write");
    assert!(!b.is_capturing(0, StreamHandle(0)).expect("capture status"));
    let mut batch = batch(
        vec![ScrubSegment {
            addr: base,
            len,
            seed: 9,
        }],
        SAMPLED,
    );
    // Legacy (1) and per-thread (2) default streams as "recorded" streams.
    batch.wait_streams = vec![StreamHandle(1), StreamHandle(2), StreamHandle(0)];
    let mut ticket = submit(&b, batch).expect("submit");
    let results = loop {
        if let Some(r) = ticket.poll().expect("poll") {
            break r;
        }
        std::thread::yield_now();
    };
    assert!(verify::passes(results[0], 64, 0.999), "{results:?}");
    assert_eq!(ticket.poll().expect("poll again"), Some(results));
    b.release(0, base, len).expect("release");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn zero_fresh_and_errors() {
    let b = backend();
    let len = 4 * MIB + 3;
    let base = b.allocate(0, len).expect("allocate");
    b.write(0, base, &random_bytes(len as usize, 11))
        .expect("write");
    b.zero_fresh(0, base, len, StreamHandle(0)).expect("zero");
    let mut back = vec![1u8; len as usize];
    b.read(0, base, &mut back).expect("read");
    assert!(back.iter().all(|&x| x == 0));
    b.release(0, base, len).expect("release");
    let count = b.device_count();
    assert!(matches!(
        b.allocate(count, 1),
        Err(BackendError::InvalidDevice { .. })
    ));
    assert!(matches!(
        b.allocate(0, 1 << 40),
        Err(BackendError::OutOfMemory { .. })
    ));
    assert!(run(&b, batch(Vec::new(), SAMPLED)).is_empty());
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn no_driver_call_after_shutdown() {
    let b = backend();
    b.shutdown();
    assert_eq!(b.allocate(0, 1), Err(BackendError::ShuttingDown));
    assert!(matches!(
        submit(&b, batch(Vec::new(), SAMPLED)),
        Err(BackendError::ShuttingDown)
    ));
}

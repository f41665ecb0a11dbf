//! Kernel correctness on a real GPU, through the `Backend` trait. Every test is `#[ignore]`:
//! CI has no GPU. scripts/gpu-check.sh runs the prebuilt binary with
//! `--ignored --test-threads=1` on the GPU machine.
//!
//! Each check fills device memory with random bytes, scrubs segments at odd offsets, reads the
//! whole allocation back and asserts: every byte inside a segment is zero, every byte outside
//! is unchanged (no overrun), and each result slot equals what `verify::verify_bytes` computes
//! on the read-back bytes (so the kernel's sample positions are the host rule's).

use kvhygiene::backend::cuda::{probe, CudaBackend, Probe};
use kvhygiene::backend::verify::{self, SegmentResult};
use kvhygiene::backend::{
    Backend, BackendError, ScrubBatch, ScrubOptions, ScrubSegment, StreamHandle,
};

const MIB: u64 = 1 << 20;
const SAMPLED: ScrubOptions = ScrubOptions {
    samples: 64,
    full_verify: false,
    double_pass: false,
};

fn backend() -> CudaBackend {
    match probe() {
        Probe::Available(b) => b,
        Probe::NoDriver(why) => panic!("these tests need a GPU: {why}"),
        Probe::Broken(e) => panic!("the CUDA backend cannot start: {e}"),
    }
}

/// Deterministic pseudo-random bytes with no zero byte (so "untouched" is recognisable).
fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    let mut i = 0u64;
    while out.len() < len {
        let w = verify::splitmix64(seed.wrapping_add(i));
        out.extend(w.to_le_bytes().iter().map(|b| b | 1));
        i += 1;
    }
    out.truncate(len);
    out
}

fn batch(segments: Vec<ScrubSegment>, options: ScrubOptions) -> ScrubBatch {
    ScrubBatch {
        device: 0,
        stream: StreamHandle(0),
        wait_streams: Vec::new(),
        segments,
        options,
    }
}

fn run(b: &CudaBackend, batch: ScrubBatch) -> Vec<SegmentResult> {
    let mut ticket = b.submit_scrub(batch).expect("submit");
    ticket.wait().expect("wait")
}

/// Random-fills `total` bytes, scrubs `segments` (offsets relative to the allocation), and
/// checks bytes, guards and result slots. Returns the results.
fn scrub_and_check(
    b: &CudaBackend,
    total: u64,
    segments: &[(u64, u64)],
    options: ScrubOptions,
) -> Vec<SegmentResult> {
    let base = b.allocate(0, total).expect("allocate");
    let before = random_bytes(total as usize, total ^ segments.len() as u64);
    b.write(0, base, &before).expect("write");
    let segs: Vec<ScrubSegment> = segments
        .iter()
        .enumerate()
        .map(|(i, &(off, len))| ScrubSegment {
            addr: base + off,
            len,
            seed: 0x5eed + i as u64,
        })
        .collect();
    let results = run(b, batch(segs.clone(), options));
    let mut after = vec![0u8; total as usize];
    b.read(0, base, &mut after).expect("read");
    let mut expected = before.clone();
    for &(off, len) in segments {
        expected[off as usize..(off + len) as usize].fill(0);
    }
    if let Some(pos) = after.iter().zip(&expected).position(|(a, e)| a != e) {
        panic!(
            "byte {pos} of {total}: got {:#x}, expected {:#x}",
            after[pos], expected[pos]
        );
    }
    for (i, (seg, got)) in segs.iter().zip(&results).enumerate() {
        let off = (seg.addr - base) as usize;
        let bytes = &after[off..off + seg.len as usize];
        let want = verify::verify_bytes(bytes, seg.seed, options.samples, options.full_verify);
        assert_eq!(*got, want, "segment {i} (offset {off}, len {})", seg.len);
        let n = verify::expected_samples(seg.len, options.samples, options.full_verify);
        assert!(verify::passes(*got, n, 0.999), "segment {i} fails: {got:?}");
    }
    b.release(0, base, total).expect("release");
    results
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
        let mut segments = Vec::with_capacity(count);
        let mut off = 0u64;
        for i in 0..count as u64 {
            let r = verify::splitmix64(i ^ count as u64);
            off += r % 61; // a random gap of untouched bytes
            let len = 1 + (r >> 8) % 20_000;
            segments.push((off, len));
            off += len;
        }
        scrub_and_check(&b, off + 64, &segments, SAMPLED);
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
fn a_skipped_segment_is_caught_by_the_verification() {
    let b = backend();
    let total = 3 * MIB;
    let base = b.allocate(0, total).expect("allocate");
    b.write(0, base, &random_bytes(total as usize, 7))
        .expect("write");
    let segs: Vec<ScrubSegment> = (0..3)
        .map(|i| ScrubSegment {
            addr: base + i * MIB + 1,
            len: MIB - 1,
            seed: 100 + i,
        })
        .collect();
    b.inject_skip_zero(Some(1));
    let results = run(&b, batch(segs.clone(), SAMPLED));
    b.inject_skip_zero(None);
    let mut dirty = vec![0u8; (MIB - 1) as usize];
    b.read(0, segs[1].addr, &mut dirty).expect("read");
    let want = verify::verify_bytes(&dirty, segs[1].seed, 64, false);
    assert_eq!(
        results[1], want,
        "the kernel sampled the host rule's positions"
    );
    assert_eq!(
        results[1].nonzero, 64,
        "every sample of the skipped segment is dirty"
    );
    assert!(!verify::passes(results[1], 64, 0.999));
    for i in [0, 2] {
        assert!(verify::passes(results[i], 64, 0.999), "segment {i}");
    }
    b.release(0, base, total).expect("release");
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
    let mut ticket = b.submit_scrub(batch).expect("submit");
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
        b.allocate(0, 1 << 60),
        Err(BackendError::OutOfMemory { .. })
    ));
    let empty = run(&b, batch(Vec::new(), SAMPLED));
    assert!(empty.is_empty());
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn no_driver_call_after_shutdown() {
    let b = backend();
    b.shutdown();
    assert_eq!(b.allocate(0, 1), Err(BackendError::ShuttingDown));
    assert!(matches!(
        b.submit_scrub(batch(Vec::new(), SAMPLED)),
        Err(BackendError::ShuttingDown)
    ));
}

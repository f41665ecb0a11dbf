//! Checks shared by the real-GPU tests (tests/gpu_kernel.rs) and the fake-driver tests
//! (tests/cuda_fake_driver.rs): both drive a backend only through the `Backend` trait.

#![allow(dead_code)]

use kvhygiene::backend::verify::{self, SegmentResult};
use kvhygiene::backend::{Backend, ScrubBatch, ScrubOptions, ScrubSegment, StreamHandle};

pub const MIB: u64 = 1 << 20;
pub const SAMPLED: ScrubOptions = ScrubOptions {
    samples: 64,
    full_verify: false,
    double_pass: false,
};

/// Deterministic pseudo-random bytes with no zero byte (so "untouched" is recognisable).
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
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

pub fn batch(segments: Vec<ScrubSegment>, options: ScrubOptions) -> ScrubBatch {
    ScrubBatch {
        device: 0,
        stream: StreamHandle(0),
        wait_streams: Vec::new(),
        segments,
        options,
    }
}

pub fn run(b: &dyn Backend, batch: ScrubBatch) -> Vec<SegmentResult> {
    let mut ticket = submit(b, batch).expect("submit");
    ticket.wait().expect("wait")
}

/// [`Backend::submit_scrub`] for the tests, whose segments lie in allocations they made on
/// device 0 and release only after the ticket was waited for or dropped, or are addresses
/// the host backend refuses itself.
pub fn submit<B: Backend + ?Sized>(
    b: &B,
    batch: ScrubBatch,
) -> Result<Box<dyn kvhygiene::backend::ScrubTicket>, kvhygiene::backend::BackendError> {
    // SAFETY: 1-2. as above: nothing else uses the tests' allocations.
    unsafe { b.submit_scrub(batch) }
}

/// `count` segments with random lengths in 1..=max_len and random untouched gaps between
/// them, as (offset, len); returns them and the bytes they span plus a guard.
pub fn random_layout(count: usize, max_len: u64, seed: u64) -> (Vec<(u64, u64)>, u64) {
    let mut segments = Vec::with_capacity(count);
    let mut off = 0u64;
    for i in 0..count as u64 {
        let r = verify::splitmix64(i ^ seed);
        off += r % 61;
        let len = 1 + (r >> 8) % max_len;
        segments.push((off, len));
        off += len;
    }
    (segments, off + 64)
}

/// The segments `(offset, len)` of an allocation at `base`, with seeds 0x5eed, 0x5eef, ...
pub fn place(base: u64, segments: &[(u64, u64)]) -> Vec<ScrubSegment> {
    segments
        .iter()
        .enumerate()
        .map(|(i, &(off, len))| ScrubSegment {
            addr: base + off,
            len,
            seed: 0x5eed + i as u64,
        })
        .collect()
}

/// Random-fills `total` bytes on device 0, scrubs `segments` (offsets into the allocation),
/// reads everything back and checks: every byte inside a segment is zero, every byte outside
/// is unchanged, and each result slot equals `verify::verify_bytes` of the read-back bytes and
/// passes. Returns the results.
pub fn scrub_and_check(
    b: &dyn Backend,
    total: u64,
    segments: &[(u64, u64)],
    options: ScrubOptions,
) -> Vec<SegmentResult> {
    let base = b.allocate(0, total).expect("allocate");
    let before = random_bytes(total as usize, total ^ segments.len() as u64);
    b.write(0, base, &before).expect("write");
    let segs = place(base, segments);
    let results = run(b, batch(segs.clone(), options));
    let mut after = vec![0u8; total as usize];
    b.read(0, base, &mut after).expect("read");
    let mut expected = before;
    for &(off, len) in segments {
        expected[off as usize..(off + len) as usize].fill(0);
    }
    if let Some(pos) = after.iter().zip(&expected).position(|(a, e)| a != e) {
        panic!(
            "byte {pos} of {total}: got {:#x}, expected {:#x}",
            after[pos], expected[pos]
        );
    }
    assert_eq!(results.len(), segs.len());
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

/// Batches with work items (more segments than travel in the kernel parameter), checked as
/// `scrub_and_check` does, under whatever launch shape the backend is set to: one-chunk and
/// multi-chunk segments (so the publish launch too), thousands of segments (20,000 chunks:
/// more than eight per resident block on any current GPU, so the strided kernel's blocks go
/// through several groups of work items), and the double pass and full verification options.
pub fn item_batches_are_scrubbed(b: &dyn Backend) {
    for (count, max_len) in [
        (121usize, 70_000u64),
        (200, 200_000),
        (1000, 5000),
        (20_000, 4000),
        (4096, 20_000),
    ] {
        let (segments, total) = random_layout(count, max_len, count as u64 + 3);
        scrub_and_check(b, total, &segments, SAMPLED);
    }
    let (segments, total) = random_layout(130, 100_000, 11);
    for (full, double) in [(true, false), (false, true)] {
        let opts = ScrubOptions {
            samples: 16,
            full_verify: full,
            double_pass: double,
        };
        scrub_and_check(b, total, &segments, opts);
    }
}

/// Scrubs batches with the zero kernel told to skip segment 1 (`inject` switches that on and
/// off) and checks the verification reports it exactly as the host rule does on the dirty
/// bytes, while the others pass. The shapes cover every way a result reaches the host on the
/// CUDA backend: segments spanning chunks (sums, then the publish launch) and segments of one
/// chunk (written by their block), each in a batch that travels in the kernel parameter (3
/// segments) and in one with work items (130 segments).
pub fn skipped_segment_is_caught(b: &dyn Backend, inject: &dyn Fn(Option<u32>)) {
    for (count, len) in [(3u64, MIB - 1), (3, 4095), (130, 4095), (130, 300_001)] {
        skipped_segment_is_caught_in(b, inject, count, len);
    }
}

fn skipped_segment_is_caught_in(
    b: &dyn Backend,
    inject: &dyn Fn(Option<u32>),
    count: u64,
    len: u64,
) {
    let stride = len + 1;
    let total = count * stride + 64;
    let base = b.allocate(0, total).expect("allocate");
    b.write(0, base, &random_bytes(total as usize, 7))
        .expect("write");
    let segs: Vec<ScrubSegment> = (0..count)
        .map(|i| ScrubSegment {
            addr: base + i * stride + 1,
            len,
            seed: 100 + i,
        })
        .collect();
    inject(Some(1));
    let results = run(b, batch(segs.clone(), SAMPLED));
    inject(None);
    let shape = format!("{count} segments of {len} bytes");
    let mut dirty = vec![0u8; len as usize];
    b.read(0, segs[1].addr, &mut dirty).expect("read");
    let want = verify::verify_bytes(&dirty, segs[1].seed, 64, false);
    assert_eq!(
        results[1], want,
        "{shape}: the kernel sampled the host rule's positions"
    );
    assert_eq!(
        results[1].nonzero, 64,
        "{shape}: every sample of the skipped segment is dirty"
    );
    assert!(!verify::passes(results[1], 64, 0.999));
    for (i, r) in results.iter().enumerate().filter(|(i, _)| *i != 1) {
        assert!(verify::passes(*r, 64, 0.999), "{shape}: segment {i}: {r:?}");
    }
    b.release(0, base, total).expect("release");
}

/// The kernel reads exactly the words the host rule names. A segment left unzeroed (`inject`)
/// holds zeros but for a marked byte in every other word the host rule samples for its seed
/// (the first and the last among them), and, where it does not read every word, in as many
/// words it does not sample, spread over the segment: the count of non-zero samples must be the number
/// of sampled words marked, no more (an unsampled word read) and no fewer (a sampled word
/// missed). Random contents cannot tell this: every word of them reads non-zero.
pub fn sampled_words_are_the_host_rules(b: &dyn Backend, inject: &dyn Fn(Option<u32>)) {
    for (len, offset, options) in [
        (4095u64, 3u64, SAMPLED),
        (MIB + 17, 5, SAMPLED),
        (16 * MIB + 3, 1, SAMPLED),
        (
            300_001,
            7,
            ScrubOptions {
                full_verify: true,
                ..SAMPLED
            },
        ),
    ] {
        sampled_words_in(b, inject, len, offset, options);
    }
}

fn sampled_words_in(
    b: &dyn Backend,
    inject: &dyn Fn(Option<u32>),
    len: u64,
    offset: u64,
    options: ScrubOptions,
) {
    let shape = format!(
        "{len} bytes at offset {offset}, full {}",
        options.full_verify
    );
    let total = 3 * (len + offset) + 64;
    let base = b.allocate(0, total).expect("allocate");
    let segs: Vec<ScrubSegment> = (0..3u64)
        .map(|i| ScrubSegment {
            addr: base + i * (len + offset) + offset,
            len,
            seed: 0x5eed + i,
        })
        .collect();
    let planted = &segs[1];
    let rule = verify::Rule::new(len, options.samples, options.full_verify);
    let sampled: std::collections::BTreeSet<u64> = (0..rule.samples())
        .map(|i| rule.word(planted.seed, i))
        .collect();
    let mut bytes = vec![0u8; len as usize];
    let mut mark = |word: u64| bytes[(word * verify::WORD_BYTES) as usize] = 0xA5;
    // Every other sampled word, the first and the last always among them.
    let mut marked_sampled: Vec<u64> = sampled.iter().copied().step_by(2).collect();
    if let Some(&last) = sampled.last() {
        if marked_sampled.last() != Some(&last) {
            marked_sampled.push(last);
        }
    }
    marked_sampled.iter().for_each(|&w| mark(w));
    // As many unsampled words, spread over the segment; not the neighbours of the first and
    // last words, which a kernel off by one at an edge would read in their place.
    let words = verify::word_count(len);
    let unsampled: Vec<u64> = (0..words)
        .filter(|&w| !sampled.contains(&w) && w != 1 && w + 2 != words)
        .collect();
    let spread = (unsampled.len() / marked_sampled.len()).max(1);
    let marked_unsampled = unsampled.iter().step_by(spread).take(marked_sampled.len());
    marked_unsampled.for_each(|&w| mark(w));
    b.write(0, base, &random_bytes(total as usize, 11))
        .expect("write");
    b.write(0, planted.addr, &bytes).expect("write");
    inject(Some(1));
    let results = run(b, batch(segs.clone(), options));
    inject(None);
    assert_eq!(results[1].checked, rule.samples(), "{shape}: samples read");
    assert_eq!(
        results[1].nonzero,
        marked_sampled.len() as u64,
        "{shape}: the non-zero samples are the marked words the host rule samples"
    );
    for i in [0, 2] {
        assert!(
            verify::passes(results[i], rule.samples(), 0.999),
            "{shape}: segment {i}: {:?}",
            results[i]
        );
    }
    b.release(0, base, total).expect("release");
}

/// `kvh_scrub_blocks` end to end on `backend`: a cache of three regions (two layers' K and V
/// in one allocation, blocks with untouched gaps between them) is random-filled through an
/// allocator on the backend; the named blocks, and only they, must read zero afterwards. Then
/// a call of 150,000 segments (three backend batches) must zero every named byte.
pub fn kv_blocks_are_scrubbed(backend: std::sync::Arc<dyn Backend>) {
    use kvhygiene::alloc::{Allocator, KvLayout};
    let alloc = Allocator::new(backend.clone(), kvhygiene::config::Config::default(), None);
    let s = StreamHandle(0);
    let (bytes, stride, blocks) = (1000u64, 1024u64, 64u64);
    let region = stride * blocks;
    let total = 3 * region;
    let base = alloc.malloc(total as i64, 0, s).expect("malloc");
    let before = random_bytes(total as usize, 0x4b56);
    backend.write(0, base, &before).expect("write");
    let layout = KvLayout {
        regions: vec![base, base + region, base + 2 * region],
        block_bytes: bytes,
        block_stride: stride,
        blocks_per_region: blocks,
    };
    let ids = [63u32, 0, 17, 18, 40];
    let report = alloc.scrub_kv_blocks(&layout, &ids, 0, s).expect("scrub");
    assert!(report.failed.is_empty(), "failed: {:?}", report.failed);
    let mut after = vec![0u8; total as usize];
    backend.read(0, base, &mut after).expect("read");
    let mut expected = before;
    for r in 0..3 {
        for &id in &ids {
            let off = (r * region + u64::from(id) * stride) as usize;
            expected[off..off + bytes as usize].fill(0);
        }
    }
    if let Some(pos) = after.iter().zip(&expected).position(|(a, e)| a != e) {
        panic!(
            "byte {pos}: got {:#x}, expected {:#x}",
            after[pos], expected[pos]
        );
    }
    alloc.free(base, total as i64, 0, s).expect("free");

    let (bytes, blocks) = (64u64, 50_000u64);
    let total = 3 * bytes * blocks;
    let base = alloc.malloc(total as i64, 0, s).expect("malloc");
    backend
        .write(0, base, &random_bytes(total as usize, 7))
        .expect("write");
    let layout = KvLayout {
        regions: (0..3).map(|r| base + r * bytes * blocks).collect(),
        block_bytes: bytes,
        block_stride: bytes,
        blocks_per_region: blocks,
    };
    let ids: Vec<u32> = (0..blocks as u32).collect();
    let report = alloc.scrub_kv_blocks(&layout, &ids, 0, s).expect("scrub");
    assert_eq!((report.segments, report.failed.len()), (150_000, 0));
    let mut after = vec![0u8; total as usize];
    backend.read(0, base, &mut after).expect("read");
    assert!(after.iter().all(|&b| b == 0), "a named byte was not zeroed");
    alloc.free(base, total as i64, 0, s).expect("free");
    alloc.shutdown();
}

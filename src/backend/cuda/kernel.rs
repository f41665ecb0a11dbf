//! The host side of kernels/scrub.cu: the embedded device images, the batch layout the kernels
//! read, and the launch plan of a batch.
//!
//! Constants here mirror `#define`s in scrub.cu and the structs mirror its structs; the tests
//! below parse the source and compare the layouts the C++ compiler gives the same structs.

use crate::backend::{ScrubOptions, ScrubSegment};

mod images {
    include!(concat!(env!("OUT_DIR"), "/kernel_images.rs"));
}

pub use images::KERNEL_ORIGIN;

/// Threads per block (`KVH_BLOCK_THREADS`, also the kernels' `__launch_bounds__`).
pub const BLOCK_THREADS: u32 = 256;
/// Segments a batch may carry inside the kernel parameter (`KVH_INLINE_SEGMENTS`).
pub const INLINE_SEGMENTS: usize = 120;
/// `KVH_FLAG_DOUBLE_PASS`.
pub const FLAG_DOUBLE_PASS: u32 = 1;
/// `KVH_FLAG_FULL_VERIFY`.
pub const FLAG_FULL_VERIFY: u32 = 2;
/// `KVH_NO_SKIP`: the scrub kernel's "skip no segment" value.
pub const NO_SKIP: u32 = u32::MAX;
/// log2 of the chunk size of an inline batch (32 KiB): a block finds its segment in parameter
/// space at almost no cost, so chunks are small and the stores in flight stay compact, but
/// each block also computes its share of the sampling rule (64-bit divisions), a fixed cost
/// that 16 KiB chunks paid twice as often: on an H200, one 256 MiB segment scrubbed at 0.82
/// of `cuMemsetD8Async`'s speed with 16 KiB chunks and 0.92 to 0.93 with 32 KiB
/// (docs/gpu-results.md, 2026-12-04).
pub const INLINE_CHUNK_SHIFT: u32 = 15;
/// log2 of the chunk size of a batch with work items (64 KiB): each block's first access is
/// a read of page-locked host memory, which a larger chunk amortises.
pub const ITEM_CHUNK_SHIFT: u32 = 16;
/// Most blocks of one launch (the grid's x dimension).
pub const MAX_GRID: u64 = (1 << 31) - 1;
/// Work items of a batch beyond one per segment before chunks grow: bounds the page-locked
/// memory a batch of a few huge segments needs.
pub const MAX_EXTRA_ITEMS: u64 = 65_536;
/// Kernel entry points.
pub const SCRUB_KERNEL: &std::ffi::CStr = c"kvh_scrub";
pub const SCRUB_STRIDED_KERNEL: &std::ffi::CStr = c"kvh_scrub_strided";
/// Most blocks of a `kvh_scrub_strided` launch: its chunk numbers stay within 32 bits. The
/// grid is the device's resident blocks, far below this.
pub const MAX_STRIDED_GRID: u64 = 1 << 28;
pub const PUBLISH_KERNEL: &std::ffi::CStr = c"kvh_scrub_publish";

/// One segment of an inline batch (`struct KvhSegment`, 32 bytes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct DeviceSegment {
    pub addr: u64,
    pub len: u64,
    pub seed: u64,
    pub first_chunk: u64,
}

/// One chunk of a batch with work items (`struct KvhChunk`, 32 bytes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct DeviceChunk {
    pub addr: u64,
    pub len: u64,
    pub seed: u64,
    pub segment: u32,
    pub index: u32,
}

/// The kernels' one parameter (`struct KvhBatch`), passed by value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct BatchParams {
    /// Device address of the work items, or 0: `inline_segs`.
    pub chunks: u64,
    /// Device address of `count` per-segment sums, zero between batches.
    pub sums: u64,
    /// Device address of the host's `count` result slots (page-locked, mapped).
    pub results: u64,
    pub count: u32,
    pub flags: u32,
    pub samples: u32,
    pub skip_segment: u32,
    pub chunk_shift: u32,
    /// Chunks in the batch (`total_chunks` of the plan, below 2^31).
    pub chunk_count: u32,
    pub inline_segs: [DeviceSegment; INLINE_SEGMENTS],
}

/// Kernel parameters may take at most this many bytes on every supported driver (12.1 and
/// later allow more on Volta and newer GPUs; the inline capacity does not rely on that).
pub const MAX_PARAM_BYTES: usize = 4096;
const _: () = assert!(std::mem::size_of::<BatchParams>() <= MAX_PARAM_BYTES);

/// How one batch is launched.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// The parameter, addresses still 0 (the backend fills `chunks`, `sums`, `results`).
    pub params: BatchParams,
    /// Work items the batch needs, one per chunk, for a batch of more than
    /// [`INLINE_SEGMENTS`]; 0 for an inline batch. [`Plan::write_items`] writes them.
    pub item_count: usize,
    /// Chunks (the grid of a `kvh_scrub` launch, one block per chunk).
    pub total_chunks: u64,
    /// Whether a segment spans chunks, so that its sums need the publish launch.
    pub needs_publish: bool,
}

/// A batch the kernels cannot take.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlanError(pub String);

/// Lays out a batch: inline when it has at most [`INLINE_SEGMENTS`] segments, else one work
/// item per chunk; chunks as small as the mode prefers and as large as the grid limit (and,
/// with work items, the item budget) requires.
pub fn plan(segments: &[ScrubSegment], options: ScrubOptions) -> Result<Plan, PlanError> {
    let count = u32::try_from(segments.len())
        .ok()
        .filter(|&c| c != NO_SKIP && u64::from(c) <= MAX_GRID)
        .ok_or_else(|| PlanError(format!("{} segments in one batch", segments.len())))?;
    let inline = segments.len() <= INLINE_SEGMENTS;
    let (mut shift, limit) = if inline {
        (INLINE_CHUNK_SHIFT, MAX_GRID)
    } else {
        (
            ITEM_CHUNK_SHIFT,
            MAX_GRID.min(u64::from(count) + MAX_EXTRA_ITEMS),
        )
    };
    // Each step doubles the chunk size; at shift 63 a segment is at most two chunks, which
    // can still exceed the item budget only for lengths beyond 2^63 bytes.
    let mut total_chunks = chunks_at(segments, shift);
    while total_chunks > limit {
        if shift == 63 {
            return Err(PlanError(format!(
                "{} segments too long to cut into {limit} chunks",
                segments.len()
            )));
        }
        shift += 1;
        total_chunks = chunks_at(segments, shift);
    }
    let chunk = 1u64 << shift;
    let mut params = BatchParams {
        chunks: 0,
        sums: 0,
        results: 0,
        count,
        flags: flags(options),
        samples: options.samples,
        skip_segment: NO_SKIP,
        chunk_shift: shift,
        // total_chunks <= limit <= MAX_GRID < 2^31: fits.
        chunk_count: total_chunks as u32,
        inline_segs: [DeviceSegment::default(); INLINE_SEGMENTS],
    };
    if inline {
        let mut first_chunk = 0;
        for (slot, s) in params.inline_segs.iter_mut().zip(segments) {
            *slot = DeviceSegment {
                addr: s.addr,
                len: s.len,
                seed: s.seed,
                first_chunk,
            };
            first_chunk += s.len.div_ceil(chunk);
        }
    }
    Ok(Plan {
        params,
        // total_chunks <= limit <= MAX_GRID < 2^31: fits.
        item_count: if inline { 0 } else { total_chunks as usize },
        total_chunks,
        needs_publish: segments.iter().any(|s| s.len > chunk),
    })
}

impl Plan {
    /// Writes the work items of the batch `segments` (the ones this plan was made from), one
    /// per chunk in chunk order, into `out`, which holds [`Plan::item_count`] of them. The
    /// backend passes the slot's page-locked item area itself: the items are written once,
    /// where the kernel reads them, with no staging copy on the way to the launch.
    ///
    /// Returns how many items it wrote, which is `item_count` exactly when `segments` are the
    /// plan's and `out` has room; the caller must not launch otherwise (the kernel would read
    /// items left from an earlier batch). Segments that are not the plan's (another count,
    /// or another number of chunks) get nothing written: 0.
    #[must_use]
    pub fn write_items(&self, segments: &[ScrubSegment], out: &mut [DeviceChunk]) -> usize {
        let shift = self.params.chunk_shift;
        let planned = segments.len() == self.params.count as usize
            && chunks_at(segments, shift) == self.item_count as u64;
        if !planned {
            return 0;
        }
        let chunk = 1u64 << shift;
        let mut slots = out.iter_mut();
        let mut written = 0;
        for (i, s) in segments.iter().enumerate() {
            // Chunk indices are < total_chunks <= MAX_GRID < 2^32 and i < count: both fit.
            for k in 0..s.len.div_ceil(chunk) {
                let Some(slot) = slots.next() else {
                    return written;
                };
                *slot = DeviceChunk {
                    addr: s.addr,
                    len: s.len,
                    seed: s.seed,
                    segment: i as u32,
                    index: k as u32,
                };
                written += 1;
            }
        }
        written
    }
}

fn flags(options: ScrubOptions) -> u32 {
    let mut flags = 0;
    if options.double_pass {
        flags |= FLAG_DOUBLE_PASS;
    }
    if options.full_verify {
        flags |= FLAG_FULL_VERIFY;
    }
    flags
}

/// Chunks of 2^shift bytes in the batch, saturating.
fn chunks_at(segments: &[ScrubSegment], shift: u32) -> u64 {
    segments
        .iter()
        .fold(0u64, |n, s| n.saturating_add(s.len.div_ceil(1u64 << shift)))
}

/// Blocks of a `kvh_scrub_strided` launch of `total_chunks` chunks on a device that holds
/// `resident` blocks at once (>= 1): as few rounds of chunks per block as the resident blocks
/// allow, and then as few blocks as those rounds need, so that every block takes the same
/// number of chunks or one fewer (with `min(total, resident)` blocks, a last round taken by
/// a few blocks would leave most of the GPU idle). At most [`MAX_STRIDED_GRID`].
pub fn strided_grid(total_chunks: u64, resident: u64) -> u64 {
    let resident = resident.clamp(1, MAX_STRIDED_GRID);
    let rounds = total_chunks.div_ceil(resident).max(1);
    total_chunks.div_ceil(rounds)
}

/// Grid of the publish launch: one thread per segment.
pub fn publish_grid(count: u32) -> u32 {
    count.div_ceil(BLOCK_THREADS).max(1)
}

/// The device image to load, by preference for a GPU of compute capability `major.minor`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Image {
    Fatbin(&'static [u8]),
    Cubin { arch: u32, bytes: &'static [u8] },
    Ptx(&'static [u8]),
}

/// The embedded PTX (NUL-terminated), for the freshness test.
pub fn embedded_ptx() -> &'static [u8] {
    images::PTX
}

/// Candidate images in the order to try: the fatbin (the driver picks inside it), else the
/// cubin of the same major version with the highest minor not above the GPU's (SASS is
/// compatible upwards within a major version), then the PTX (JIT) as the last resort.
pub fn images_for(major: u32, minor: u32) -> Vec<Image> {
    select(images::FATBIN, images::CUBINS, images::PTX, major, minor)
}

fn select(
    fatbin: Option<&'static [u8]>,
    cubins: &'static [(u32, &'static [u8])],
    ptx: &'static [u8],
    major: u32,
    minor: u32,
) -> Vec<Image> {
    let mut out = Vec::new();
    if let Some(f) = fatbin {
        out.push(Image::Fatbin(f));
    }
    let want = major * 10 + minor;
    if let Some(&(arch, bytes)) = cubins
        .iter()
        .filter(|(a, _)| a / 10 == major && *a <= want)
        .max_by_key(|(a, _)| *a)
    {
        out.push(Image::Cubin { arch, bytes });
    }
    out.push(Image::Ptx(ptx));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::verify::{self, splitmix64, Rule};

    const SOURCE: &str = include_str!("../../../kernels/scrub.cu");

    extern "C" {
        fn kvh_host_rule_sample_word(seed: u64, i: u64, len: u64, samples: u32, flags: u32) -> u64;
        fn kvh_host_rule_expected_samples(len: u64, samples: u32, flags: u32) -> u64;
        fn kvh_host_rule_candidates(
            len: u64,
            samples: u32,
            flags: u32,
            w0: u64,
            w1: u64,
            first: *mut u64,
            end: *mut u64,
        );
        fn kvh_host_rule_find_chunk(segs: *const DeviceSegment, count: u32, c: u64) -> u32;
        fn kvh_host_rule_layout(out: *mut u64);
    }

    fn options(samples: u32, full_verify: bool, double_pass: bool) -> ScrubOptions {
        ScrubOptions {
            samples,
            full_verify,
            double_pass,
        }
    }

    /// Segments with lengths `lens` at 4 KiB-spaced (plus `skew`) addresses.
    fn segments(lens: &[u64], skew: u64) -> Vec<ScrubSegment> {
        lens.iter()
            .enumerate()
            .map(|(i, &len)| ScrubSegment {
                addr: 0x1_0000_0000 + (i as u64) * 0x1000 + skew,
                len,
                seed: i as u64,
            })
            .collect()
    }

    fn layouts() -> Vec<Vec<u64>> {
        vec![
            vec![1],
            // One inline chunk whole (its result written by its block), and one byte more
            // (two chunks, the second of one byte, their counts published).
            vec![(1 << INLINE_CHUNK_SHIFT) - 1],
            vec![1 << INLINE_CHUNK_SHIFT],
            vec![(1 << INLINE_CHUNK_SHIFT) + 1],
            vec![1 << 30],
            vec![65_537, 1, 7, 3 * 65_536 - 5, 8, 9, 512],
            vec![64 * 1024; 4096],
            (0..300u64).map(|i| 1 + i * 997 % (5 * 65_536)).collect(),
            vec![1; 121],
            vec![1; 120],
        ]
    }

    /// The plan's work items, written into a fresh area the way the backend writes the slot's.
    fn items_of(p: &Plan, segs: &[ScrubSegment]) -> Vec<DeviceChunk> {
        let mut items = vec![DeviceChunk::default(); p.item_count];
        assert_eq!(p.write_items(segs, &mut items), p.item_count);
        items
    }

    /// Every chunk of a plan as (segment, byte offset, bytes), the way the kernel derives it:
    /// by the segment search for an inline batch, from the work item otherwise.
    fn chunks_of(p: &Plan, segs: &[ScrubSegment]) -> Vec<(usize, u64, u64)> {
        let chunk = 1u64 << p.params.chunk_shift;
        let items = items_of(p, segs);
        (0..p.total_chunks)
            .map(|c| {
                let (s, index) = if items.is_empty() {
                    // SAFETY: the pointer and count describe the inline segments.
                    let s = unsafe {
                        kvh_host_rule_find_chunk(p.params.inline_segs.as_ptr(), p.params.count, c)
                    } as usize;
                    (s, c - p.params.inline_segs[s].first_chunk)
                } else {
                    let item = items[c as usize];
                    assert_eq!(
                        (item.addr, item.len, item.seed),
                        (
                            segs[item.segment as usize].addr,
                            segs[item.segment as usize].len,
                            segs[item.segment as usize].seed
                        )
                    );
                    (item.segment as usize, u64::from(item.index))
                };
                let off = index * chunk;
                (s, off, (segs[s].len - off).min(chunk))
            })
            .collect()
    }

    /// The chunks of every plan tile every segment: each byte is zeroed by exactly one block.
    #[test]
    fn chunks_tile_every_segment() {
        for lens in layouts() {
            let segs = segments(&lens, 3);
            let p = plan(&segs, options(64, false, false)).unwrap();
            assert_eq!(p.item_count == 0, segs.len() <= INLINE_SEGMENTS);
            let mut pieces: Vec<Vec<(u64, u64)>> = vec![Vec::new(); segs.len()];
            for (s, off, n) in chunks_of(&p, &segs) {
                assert!(n > 0);
                pieces[s].push((off, n));
            }
            for (s, ps) in pieces.into_iter().enumerate() {
                let mut at = 0;
                for (off, n) in ps {
                    assert_eq!(off, at, "segment {s}: gap or overlap");
                    at += n;
                }
                assert_eq!(at, lens[s], "segment {s}: not covered");
            }
        }
    }

    /// The blocks' read-backs, each over the samples of its own chunk (the kernel's candidate
    /// range, filtered by the Rust rule), together read every sample exactly once.
    #[test]
    fn chunk_read_backs_read_every_sample_once() {
        for lens in layouts() {
            for (samples, full) in [
                (64u32, false),
                (0, false),
                (1, false),
                (2, false),
                (3, false),
                (64, true),
                (1000, false),
            ] {
                let segs = segments(&lens, 0);
                let opts = options(samples, full, false);
                let p = plan(&segs, opts).unwrap();
                let expected: u64 = segs
                    .iter()
                    .map(|s| verify::expected_samples(s.len, samples, full))
                    .sum();
                if expected > 1 << 22 {
                    continue;
                }
                let mut counts = vec![0u64; segs.len()];
                for (s, off, n) in chunks_of(&p, &segs) {
                    let rule = Rule::new(segs[s].len, samples, full);
                    let (w0, w1) = (off / 8, verify::word_count(off + n));
                    let (mut first, mut end) = (0, 0);
                    // SAFETY: pure function; valid out-pointers.
                    unsafe {
                        kvh_host_rule_candidates(
                            segs[s].len,
                            samples,
                            p.params.flags,
                            w0,
                            w1,
                            &mut first,
                            &mut end,
                        )
                    };
                    assert_eq!(first..end, rule.candidates(w0, w1));
                    counts[s] += (first..end)
                        .filter(|&i| (w0..w1).contains(&rule.word(segs[s].seed, i)))
                        .count() as u64;
                }
                for (s, seg) in segs.iter().enumerate() {
                    assert_eq!(
                        counts[s],
                        verify::expected_samples(seg.len, samples, full),
                        "segment {s} samples {samples} full {full}"
                    );
                }
            }
        }
    }

    #[test]
    fn plan_inline_numbers_chunks_consecutively() {
        let segs = [
            ScrubSegment {
                addr: 0x1000,
                len: 1,
                seed: 1,
            },
            ScrubSegment {
                addr: 0x2001,
                len: (2 << INLINE_CHUNK_SHIFT) + 3,
                seed: 2,
            },
            ScrubSegment {
                addr: 0x9000,
                len: 24,
                seed: 3,
            },
        ];
        let p = plan(&segs, options(64, false, true)).unwrap();
        assert_eq!(p.params.flags, FLAG_DOUBLE_PASS);
        assert_eq!(p.params.count, 3);
        assert_eq!(p.params.chunk_shift, INLINE_CHUNK_SHIFT);
        assert_eq!(p.total_chunks, 1 + 3 + 1);
        assert!(p.needs_publish, "segment 1 spans chunks");
        assert_eq!(p.item_count, 0);
        let firsts: Vec<_> = p.params.inline_segs[..3]
            .iter()
            .map(|s| s.first_chunk)
            .collect();
        assert_eq!(firsts, [0, 1, 4]);
        let owner = |c: u64| {
            // SAFETY: the pointer and count describe the inline segments.
            unsafe { kvh_host_rule_find_chunk(p.params.inline_segs.as_ptr(), 3, c) }
        };
        assert_eq!((0..5).map(owner).collect::<Vec<_>>(), [0, 1, 1, 1, 2]);
    }

    #[test]
    fn plan_with_items_has_one_item_per_chunk() {
        let segs = segments(&vec![65_536; 4096], 0);
        let p = plan(&segs, options(64, false, false)).unwrap();
        assert_eq!(p.params.chunk_shift, ITEM_CHUNK_SHIFT);
        assert_eq!(p.item_count, 4096);
        assert_eq!(p.total_chunks, 4096);
        assert!(!p.needs_publish, "every segment is one chunk");
        let items = items_of(&p, &segs);
        assert_eq!(items[7].segment, 7);
        assert_eq!(items[7].index, 0);
        assert_eq!(p.params.count, 4096);
    }

    #[test]
    fn chunks_grow_to_respect_the_limits() {
        // 121 segments of 64 GiB: at 64 KiB chunks that is 126 M items; the item budget
        // (count + 65,536) forces 256 MiB chunks... whatever the plan picks, it must fit.
        let segs = segments(&vec![64 << 30; 121], 0);
        let p = plan(&segs, options(64, false, false)).unwrap();
        assert!(p.total_chunks <= 121 + MAX_EXTRA_ITEMS);
        assert_eq!(p.item_count as u64, p.total_chunks);
        assert!(p.params.chunk_shift > ITEM_CHUNK_SHIFT);
        // An inline segment of 2^60 bytes: the grid limit.
        let huge = segments(&[1 << 60], 0);
        let p = plan(&huge, options(64, false, false)).unwrap();
        assert!(p.total_chunks <= MAX_GRID);
        assert_eq!(p.total_chunks, (1u64 << 60) >> p.params.chunk_shift);
    }

    #[test]
    fn absurd_lengths_are_refused_not_a_panic() {
        let segs: Vec<ScrubSegment> = (0..70_000u64)
            .map(|i| ScrubSegment {
                addr: i << 12,
                len: u64::MAX - 1,
                seed: i,
            })
            .collect();
        let err = plan(&segs, options(64, false, false)).unwrap_err();
        assert!(err.0.contains("70000 segments"), "{}", err.0);
        // A few such segments still plan, with chunks as large as the item budget needs.
        let p = plan(&segs[..200], options(64, false, false)).unwrap();
        assert!(p.total_chunks <= 200 + MAX_EXTRA_ITEMS);
        assert_eq!(p.item_count as u64, p.total_chunks);
    }

    #[test]
    fn write_items_reports_a_short_area_or_other_segments() {
        let segs = segments(&vec![65_536; 200], 0);
        let p = plan(&segs, options(64, false, false)).unwrap();
        let mut area = vec![DeviceChunk::default(); p.item_count];
        assert_eq!(p.write_items(&segs, &mut area), 200);
        assert_eq!(
            p.write_items(&segs, &mut area[..150]),
            150,
            "area too small"
        );
        assert_eq!(
            p.write_items(&segs[..199], &mut area),
            0,
            "not the plan's segments"
        );
    }

    /// Segments with more chunks than the plan's fill the area exactly but are not the plan's
    /// segments: the count returned must differ from `item_count`, so the caller does not
    /// launch with work items that cover only part of the batch.
    #[test]
    fn write_items_reports_segments_with_more_chunks_than_the_plan() {
        let segs = segments(&vec![65_536; 200], 0);
        let p = plan(&segs, options(64, false, false)).unwrap();
        assert_eq!(p.item_count, 200);
        let longer = segments(&vec![2 * 65_536; 200], 0);
        let mut area = vec![DeviceChunk::default(); p.item_count];
        assert_ne!(
            p.write_items(&longer, &mut area),
            p.item_count,
            "segments of 400 chunks written into a plan of 200"
        );
    }

    #[test]
    fn strided_grids_give_every_block_an_equal_share() {
        // 4096 chunks on 132 SMs x 5 blocks: 7 rounds, so 586 blocks of 7 (or 6) chunks
        // rather than 660 blocks with a seventh round for 136 of them.
        assert_eq!(strided_grid(4096, 660), 586);
        assert_eq!(strided_grid(100, 660), 100);
        assert_eq!(strided_grid(660, 660), 660);
        assert_eq!(strided_grid(661, 660), 331);
        assert_eq!(strided_grid(7, 1), 1);
        assert_eq!(strided_grid(5, 0), 1, "an unknown residency still launches");
        assert!(strided_grid(MAX_GRID, u64::MAX) <= MAX_STRIDED_GRID);
        for total in 1..2000u64 {
            for resident in [1u64, 7, 64, 660, 5000] {
                let g = strided_grid(total, resident);
                assert!(
                    g >= 1 && g <= resident.max(1) && g <= total,
                    "{total} {resident}"
                );
                let rounds = total.div_ceil(g);
                assert_eq!(
                    rounds,
                    total.div_ceil(resident),
                    "{total} {resident}: no extra round"
                );
                // Fewer than `rounds` blocks sit out the last round.
                assert!(g * rounds - total < rounds, "{total} {resident}: balanced");
            }
        }
    }

    #[test]
    fn an_empty_batch_has_no_chunks() {
        let p = plan(&[], options(64, false, false)).unwrap();
        assert_eq!(p.total_chunks, 0);
        assert!(!p.needs_publish);
        assert_eq!(publish_grid(0), 1);
        assert_eq!(publish_grid(257), 2);
    }

    /// The value of `#define NAME value` in scrub.cu, without C suffixes.
    fn define(name: &str) -> u64 {
        let line = SOURCE
            .lines()
            .find(|l| l.starts_with("#define") && l.split_whitespace().nth(1) == Some(name))
            .unwrap_or_else(|| panic!("scrub.cu lacks #define {name}"));
        let raw = line.split_whitespace().nth(2).expect("value");
        let raw = raw.trim_end_matches(['U', 'L', 'u', 'l']);
        match raw.strip_prefix("0x").or_else(|| raw.strip_prefix("0X")) {
            Some(hex) => u64::from_str_radix(hex, 16).expect("hex"),
            None => raw.parse().expect("decimal"),
        }
    }

    #[test]
    fn kernel_constants_match_the_host() {
        assert_eq!(define("KVH_WORD_BYTES"), verify::WORD_BYTES);
        assert_eq!(define("KVH_BLOCK_THREADS"), u64::from(BLOCK_THREADS));
        assert_eq!(define("KVH_INLINE_SEGMENTS"), INLINE_SEGMENTS as u64);
        assert_eq!(define("KVH_FLAG_DOUBLE_PASS"), u64::from(FLAG_DOUBLE_PASS));
        assert_eq!(define("KVH_FLAG_FULL_VERIFY"), u64::from(FLAG_FULL_VERIFY));
        assert_eq!(define("KVH_NO_SKIP"), u64::from(NO_SKIP));
        // splitmix64 is determined by its three constants; check them against the Rust
        // function through values only they produce.
        let (g, m1, m2) = (
            define("KVH_SPLITMIX_GAMMA"),
            define("KVH_SPLITMIX_MUL1"),
            define("KVH_SPLITMIX_MUL2"),
        );
        let reimpl = |x: u64| {
            let mut z = x.wrapping_add(g);
            z = (z ^ (z >> 30)).wrapping_mul(m1);
            z = (z ^ (z >> 27)).wrapping_mul(m2);
            z ^ (z >> 31)
        };
        for x in [0, 1, 42, u64::MAX, 0xDEAD_BEEF] {
            assert_eq!(reimpl(x), splitmix64(x));
        }
    }

    /// The structs as the C++ compiler lays them out equal the Rust ones.
    #[test]
    fn struct_layouts_match_the_kernel() {
        let mut got = [0u64; 11];
        // SAFETY: the function writes 11 values.
        unsafe { kvh_host_rule_layout(got.as_mut_ptr()) };
        let want = [
            std::mem::size_of::<DeviceSegment>(),
            std::mem::size_of::<DeviceChunk>(),
            std::mem::size_of::<BatchParams>(),
            std::mem::offset_of!(BatchParams, count),
            std::mem::offset_of!(BatchParams, chunk_shift),
            std::mem::offset_of!(BatchParams, inline_segs),
            std::mem::size_of::<verify::SegmentResult>(),
            std::mem::align_of::<BatchParams>(),
            std::mem::offset_of!(BatchParams, chunk_count),
            // kvh_scrub_strided unpacks the fourth word of an item as segment | index << 32.
            std::mem::offset_of!(DeviceChunk, segment),
            std::mem::offset_of!(DeviceChunk, index),
        ]
        .map(|v| v as u64);
        assert_eq!(got, want);
        assert_eq!(want[0], 32);
        assert_eq!(want[1], 32);
        assert_eq!((want[9], want[10]), (24, 28));
        assert!(want[2] as usize <= MAX_PARAM_BYTES);
    }

    #[test]
    fn kernel_sample_positions_equal_the_host_rule() {
        let lens = [
            1u64,
            7,
            8,
            9,
            63,
            64,
            65,
            511,
            512,
            513,
            4096,
            65_537,
            1 << 30,
            3 << 33,
        ];
        for &len in &lens {
            for (samples, full) in [
                (64u32, false),
                (1, false),
                (2, false),
                (3, false),
                (1000, false),
                (64, true),
            ] {
                let flags = if full { FLAG_FULL_VERIFY } else { 0 };
                let rule = Rule::new(len, samples, full);
                let n = verify::expected_samples(len, samples, full);
                assert_eq!(rule.samples(), n);
                // SAFETY: pure functions of their integer arguments.
                let kn = unsafe { kvh_host_rule_expected_samples(len, samples, flags) };
                assert_eq!(
                    kn, n,
                    "expected samples, len {len} samples {samples} full {full}"
                );
                for i in (0..n).take(300).chain(n.saturating_sub(3)..n) {
                    for seed in [0u64, 1, 0x1234_5678_9ABC_DEF0] {
                        // SAFETY: as above.
                        let k = unsafe { kvh_host_rule_sample_word(seed, i, len, samples, flags) };
                        assert_eq!(k, rule.word(seed, i), "len {len} i {i}");
                    }
                }
            }
        }
    }

    #[test]
    fn image_selection_prefers_matching_sass_then_ptx() {
        static CUBINS: [(u32, &[u8]); 4] = [(80, b"a"), (86, b"b"), (89, b"c"), (90, b"d")];
        let pick = |maj, min| select(None, &CUBINS, b"p\0", maj, min);
        assert_eq!(
            pick(8, 0)[0],
            Image::Cubin {
                arch: 80,
                bytes: b"a"
            }
        );
        assert_eq!(
            pick(8, 7)[0],
            Image::Cubin {
                arch: 86,
                bytes: b"b"
            }
        );
        assert_eq!(
            pick(9, 0)[0],
            Image::Cubin {
                arch: 90,
                bytes: b"d"
            }
        );
        assert_eq!(
            pick(12, 0),
            vec![Image::Ptx(b"p\0")],
            "Blackwell JITs the PTX"
        );
        assert_eq!(pick(7, 5), vec![Image::Ptx(b"p\0")]);
        let with_fatbin = select(Some(b"f"), &CUBINS, b"p\0", 9, 0);
        assert_eq!(with_fatbin[0], Image::Fatbin(b"f"));
    }

    #[test]
    fn embedded_ptx_is_nul_terminated_and_has_every_kernel() {
        let ptx = images::PTX;
        assert_eq!(ptx.last(), Some(&0));
        let text = String::from_utf8_lossy(ptx);
        for name in [SCRUB_KERNEL, SCRUB_STRIDED_KERNEL, PUBLISH_KERNEL] {
            let entry = format!(".entry {}(", name.to_str().expect("ASCII"));
            assert!(text.contains(&entry), "{entry} in {}", KERNEL_ORIGIN);
        }
    }
}

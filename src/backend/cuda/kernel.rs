//! The host side of kernels/scrub.cu: the embedded device images, the segment descriptor
//! layout the kernels read, and the launch plan of a batch.
//!
//! Constants here mirror `#define`s in scrub.cu; the tests below parse the source and compare.

use crate::backend::verify;
use crate::backend::{ScrubOptions, ScrubSegment};

mod images {
    include!(concat!(env!("OUT_DIR"), "/kernel_images.rs"));
}

pub use images::KERNEL_ORIGIN;

/// Bytes per unit of zeroing work (`KVH_CHUNK_BYTES`).
pub const CHUNK_BYTES: u64 = 65_536;
/// Threads per block (`KVH_BLOCK_THREADS`, also the kernels' `__launch_bounds__`).
pub const BLOCK_THREADS: u32 = 256;
/// `KVH_FLAG_DOUBLE_PASS`.
pub const FLAG_DOUBLE_PASS: u32 = 1;
/// `KVH_FLAG_FULL_VERIFY`.
pub const FLAG_FULL_VERIFY: u32 = 2;
/// `KVH_NO_SKIP`: the zero kernel's "skip no segment" value.
pub const NO_SKIP: u32 = u32::MAX;
/// Resident blocks per SM we aim for (`KVH_ZERO_MIN_BLOCKS`, the zero kernel's
/// `__launch_bounds__` minimum): grids are at most `sms * BLOCKS_PER_SM` blocks, each block
/// taking one contiguous share of the work, so the whole grid is resident at once.
pub const BLOCKS_PER_SM: u32 = 8;
/// Samples one verify thread reads per group of independent loads (`KVH_VERIFY_UNROLL`); the
/// verify grid gives each thread at least that many when the batch has enough samples.
pub const VERIFY_SAMPLES_PER_THREAD: u64 = 8;
/// Kernel entry points.
pub const ZERO_KERNEL: &std::ffi::CStr = c"kvh_scrub_zero";
pub const VERIFY_KERNEL: &std::ffi::CStr = c"kvh_scrub_verify";

/// One segment as the kernels read it (`struct KvhSegment`, 40 bytes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct DeviceSegment {
    pub addr: u64,
    pub len: u64,
    pub seed: u64,
    pub first_chunk: u64,
    pub first_sample: u64,
}

/// The descriptors and totals of one batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    pub segments: Vec<DeviceSegment>,
    pub total_chunks: u64,
    pub total_samples: u64,
    pub flags: u32,
}

/// Lays out a batch: consecutive chunk and sample numbers per segment, using the host rule
/// (`verify::expected_samples`) for the sample counts, so a kernel that disagrees with the
/// rule leaves `checked != expected` and the segment fails.
pub fn plan(segments: &[ScrubSegment], options: ScrubOptions) -> Plan {
    let mut flags = 0;
    if options.double_pass {
        flags |= FLAG_DOUBLE_PASS;
    }
    if options.full_verify {
        flags |= FLAG_FULL_VERIFY;
    }
    let mut out = Vec::with_capacity(segments.len());
    let (mut chunk, mut sample) = (0u64, 0u64);
    for s in segments {
        out.push(DeviceSegment {
            addr: s.addr,
            len: s.len,
            seed: s.seed,
            first_chunk: chunk,
            first_sample: sample,
        });
        chunk += s.len.div_ceil(CHUNK_BYTES);
        sample += verify::expected_samples(s.len, options.samples, options.full_verify);
    }
    Plan {
        segments: out,
        total_chunks: chunk,
        total_samples: sample,
        flags,
    }
}

/// Blocks for `work` units (chunks, or samples / BLOCK_THREADS) on a GPU with `sms` SMs.
pub fn grid_for(work: u64, sms: u32) -> u32 {
    let cap = u64::from(sms.max(1)) * u64::from(BLOCKS_PER_SM);
    u32::try_from(work.clamp(1, cap)).unwrap_or(u32::MAX)
}

/// Grid of the zero kernel: at most `sms * BLOCKS_PER_SM` blocks, each taking
/// `ceil(total_chunks / grid)` consecutive chunks, and no block without a chunk.
pub fn zero_grid(total_chunks: u64, sms: u32) -> u32 {
    let cap = u64::from(grid_for(total_chunks, sms));
    let per = total_chunks.max(1).div_ceil(cap);
    u32::try_from(total_chunks.max(1).div_ceil(per)).unwrap_or(u32::MAX)
}

/// Grid of the verify kernel: enough blocks that each thread reads about
/// `VERIFY_SAMPLES_PER_THREAD` samples (a few for a small batch: one block), at most
/// `sms * BLOCKS_PER_SM`.
pub fn verify_grid(total_samples: u64, sms: u32) -> u32 {
    let per_block = u64::from(BLOCK_THREADS) * VERIFY_SAMPLES_PER_THREAD;
    grid_for(total_samples.div_ceil(per_block), sms)
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
    use crate::backend::verify::{sample_word, splitmix64};

    const SOURCE: &str = include_str!("../../../kernels/scrub.cu");

    extern "C" {
        fn kvh_host_rule_sample_word(seed: u64, i: u64, len: u64, samples: u32, flags: u32) -> u64;
        fn kvh_host_rule_expected_samples(len: u64, samples: u32, flags: u32) -> u64;
        fn kvh_host_rule_find_chunk(segs: *const DeviceSegment, count: u32, pos: u64) -> u32;
        fn kvh_host_rule_zero_walk(
            segs: *const DeviceSegment,
            count: u32,
            total_chunks: u64,
            grid: u64,
            block: u64,
            out: *mut u64,
            cap: u64,
        ) -> u64;
        #[allow(clippy::too_many_arguments)]
        fn kvh_host_rule_verify_walk(
            segs: *const DeviceSegment,
            count: u32,
            total_samples: u64,
            samples: u32,
            flags: u32,
            threads: u64,
            t: u64,
            out: *mut u64,
            cap: u64,
        ) -> u64;
    }

    /// Batches of segments with lengths `lens` at 4 KiB-spaced (plus `skew`) addresses.
    fn layout(lens: &[u64], skew: u64, options: ScrubOptions) -> Plan {
        let segs: Vec<ScrubSegment> = lens
            .iter()
            .enumerate()
            .map(|(i, &len)| ScrubSegment {
                addr: 0x1_0000_0000 + (i as u64) * 0x1000 + skew,
                len,
                seed: i as u64,
            })
            .collect();
        plan(&segs, options)
    }

    fn layouts() -> Vec<Vec<u64>> {
        vec![
            vec![1],
            vec![CHUNK_BYTES],
            vec![1 << 30],
            vec![CHUNK_BYTES + 1, 1, 7, 3 * CHUNK_BYTES - 5, 8, 9, 512],
            vec![64 * 1024; 4096],
            (0..300u64)
                .map(|i| 1 + i * 997 % (5 * CHUNK_BYTES))
                .collect(),
            vec![1; 100],
        ]
    }

    /// Every pass of the zero kernel, for any grid, writes each byte of each segment exactly
    /// once: the blocks' pieces tile every segment.
    #[test]
    fn zero_walk_tiles_every_segment_for_any_grid() {
        for lens in layouts() {
            let options = ScrubOptions {
                samples: 64,
                full_verify: false,
                double_pass: false,
            };
            let p = layout(&lens, 3, options);
            let n = p.segments.len();
            let count = u32::try_from(n).unwrap();
            let grids = [
                1,
                2,
                3,
                7,
                u64::from(zero_grid(p.total_chunks, 132)),
                u64::from(grid_for(p.total_chunks, 132)),
                u64::from(zero_grid(p.total_chunks, 7)),
                p.total_chunks + 5,
            ];
            for grid in grids {
                let mut pieces: Vec<Vec<(u64, u64)>> = vec![Vec::new(); n];
                let mut buf = vec![0u64; 3 * (n + 4)];
                for block in 0..grid {
                    // SAFETY: segment table of `count` entries; `buf` holds `n + 4` triples.
                    let got = unsafe {
                        kvh_host_rule_zero_walk(
                            p.segments.as_ptr(),
                            count,
                            p.total_chunks,
                            grid,
                            block,
                            buf.as_mut_ptr(),
                            (n + 4) as u64,
                        )
                    };
                    assert!(got as usize <= n, "{got} pieces in one block");
                    let per = p.total_chunks.div_ceil(grid);
                    for t in buf[..3 * got as usize].chunks(3) {
                        let (seg, off, len) = (t[0] as usize, t[1], t[2]);
                        assert!(len > 0);
                        // The piece lies inside the block's chunk range.
                        let c = p.segments[seg].first_chunk + off / CHUNK_BYTES;
                        assert!(c >= block * per && c < (block + 1) * per, "grid {grid}");
                        pieces[seg].push((off, len));
                    }
                }
                for (seg, mut ps) in pieces.into_iter().enumerate() {
                    ps.sort_unstable();
                    let mut at = 0;
                    for (off, len) in ps {
                        assert_eq!(off, at, "segment {seg} grid {grid}: gap or overlap");
                        at += len;
                    }
                    assert_eq!(at, lens[seg], "segment {seg} grid {grid}: not covered");
                }
            }
        }
    }

    /// Whatever the thread count, the verify kernel's threads read every sample of every
    /// segment exactly once, each thread's runs move forward through the segment table (one
    /// flush per segment), and full mode hands a warp's lanes consecutive samples.
    #[test]
    fn verify_walk_reads_every_sample_once_for_any_thread_count() {
        for lens in layouts() {
            for (samples, full) in [(64u32, false), (2, false), (64, true)] {
                let options = ScrubOptions {
                    samples,
                    full_verify: full,
                    double_pass: false,
                };
                let p = layout(&lens, 0, options);
                if p.total_samples > 1 << 22 {
                    continue;
                }
                let n = p.segments.len();
                let count = u32::try_from(n).unwrap();
                let threads_options = [
                    1,
                    31,
                    32,
                    33,
                    256,
                    768,
                    u64::from(verify_grid(p.total_samples, 132)) * u64::from(BLOCK_THREADS),
                    u64::from(grid_for(p.total_samples.div_ceil(256), 132)) * 256,
                ];
                for threads in threads_options {
                    let mut seen = vec![0u8; p.total_samples as usize];
                    let cap = n + 4;
                    let mut buf = vec![0u64; 4 * cap];
                    for t in 0..threads {
                        // SAFETY: segment table of `count` entries; `buf` holds `cap` runs.
                        let got = unsafe {
                            kvh_host_rule_verify_walk(
                                p.segments.as_ptr(),
                                count,
                                p.total_samples,
                                samples,
                                p.flags,
                                threads,
                                t,
                                buf.as_mut_ptr(),
                                cap as u64,
                            )
                        };
                        assert!(got as usize <= n);
                        let mut last: Option<(usize, u64)> = None;
                        for r in buf[..4 * got as usize].chunks(4) {
                            let (seg, i, step, m) = (r[0] as usize, r[1], r[2], r[3]);
                            assert!(m > 0);
                            let lanes = full && threads % 32 == 0;
                            assert_eq!(step, if lanes { 32 } else { 1 });
                            let s = p.segments[seg];
                            let expected = verify::expected_samples(s.len, samples, full);
                            for k in 0..m {
                                let idx = i + k * step;
                                assert!(idx < expected, "seg {seg} sample {idx} of {expected}");
                                let g = s.first_sample + idx;
                                if let Some((ls, lg)) = last {
                                    assert!(ls < seg || (ls == seg && lg < g));
                                    assert!(ls == seg || k == 0);
                                }
                                last = Some((seg, g));
                                seen[g as usize] += 1;
                            }
                        }
                    }
                    assert!(
                        seen.iter().all(|&v| v == 1),
                        "threads {threads} samples {samples} full {full}: coverage"
                    );
                }
            }
        }
    }

    #[test]
    fn grids_are_balanced_and_bounded() {
        assert_eq!(zero_grid(0, 132), 1);
        assert_eq!(zero_grid(5, 132), 5);
        assert_eq!(zero_grid(4096, 132), 1024, "4 chunks per block");
        assert_eq!(zero_grid(16_384, 132), 1024, "16 chunks per block");
        assert!(zero_grid(1 << 40, 132) <= 132 * BLOCKS_PER_SM);
        assert_eq!(verify_grid(64, 132), 1);
        assert_eq!(verify_grid(4096 * 64, 132), 128);
        assert_eq!(verify_grid(1 << 30, 132), 132 * BLOCKS_PER_SM);
    }

    /// The value of `#define NAME value` in scrub.cu, without C suffixes.
    fn define(name: &str) -> u64 {
        let line = SOURCE
            .lines()
            .find(|l| l.split_whitespace().nth(1) == Some(name))
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
        assert_eq!(define("KVH_CHUNK_BYTES"), CHUNK_BYTES);
        assert_eq!(define("KVH_BLOCK_THREADS"), u64::from(BLOCK_THREADS));
        assert_eq!(define("KVH_FLAG_DOUBLE_PASS"), u64::from(FLAG_DOUBLE_PASS));
        assert_eq!(define("KVH_FLAG_FULL_VERIFY"), u64::from(FLAG_FULL_VERIFY));
        assert_eq!(define("KVH_NO_SKIP"), u64::from(NO_SKIP));
        assert_eq!(define("KVH_ZERO_MIN_BLOCKS"), u64::from(BLOCKS_PER_SM));
        assert_eq!(define("KVH_VERIFY_UNROLL"), VERIFY_SAMPLES_PER_THREAD);
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

    #[test]
    fn descriptor_layout_is_five_u64() {
        assert_eq!(std::mem::size_of::<DeviceSegment>(), 40);
        assert_eq!(std::mem::align_of::<DeviceSegment>(), 8);
        assert_eq!(std::mem::size_of::<verify::SegmentResult>(), 16);
        assert!(SOURCE.contains("kvh_u64 first_sample;"));
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
            for (samples, full) in [(64u32, false), (2, false), (1000, false), (64, true)] {
                let flags = if full { FLAG_FULL_VERIFY } else { 0 };
                let n = verify::expected_samples(len, samples, full);
                // SAFETY: pure functions of their integer arguments.
                let kn = unsafe { kvh_host_rule_expected_samples(len, samples, flags) };
                assert_eq!(
                    kn, n,
                    "expected samples, len {len} samples {samples} full {full}"
                );
                let words = verify::word_count(len);
                let is_full = verify::is_full(len, samples, full);
                for i in (0..n).take(300) {
                    for seed in [0u64, 1, 0x1234_5678_9ABC_DEF0] {
                        // SAFETY: as above.
                        let k = unsafe { kvh_host_rule_sample_word(seed, i, len, samples, flags) };
                        assert_eq!(k, sample_word(seed, i, words, is_full), "len {len} i {i}");
                    }
                }
            }
        }
    }

    #[test]
    fn plan_numbers_chunks_and_samples_consecutively() {
        let segs = [
            ScrubSegment {
                addr: 0x1000,
                len: 1,
                seed: 1,
            },
            ScrubSegment {
                addr: 0x2001,
                len: CHUNK_BYTES * 2 + 3,
                seed: 2,
            },
            ScrubSegment {
                addr: 0x9000,
                len: 24,
                seed: 3,
            },
        ];
        let opts = ScrubOptions {
            samples: 64,
            full_verify: false,
            double_pass: true,
        };
        let p = plan(&segs, opts);
        assert_eq!(p.flags, FLAG_DOUBLE_PASS);
        assert_eq!(p.total_chunks, 1 + 3 + 1);
        assert_eq!(p.total_samples, 1 + 64 + 3);
        let firsts: Vec<_> = p
            .segments
            .iter()
            .map(|s| (s.first_chunk, s.first_sample))
            .collect();
        assert_eq!(firsts, [(0, 0), (1, 1), (4, 65)]);
        // The kernel's segment search maps every chunk to its segment.
        let owner = |c: u64| {
            // SAFETY: the pointer and count describe `p.segments`.
            unsafe { kvh_host_rule_find_chunk(p.segments.as_ptr(), 3, c) }
        };
        assert_eq!((0..5).map(owner).collect::<Vec<_>>(), [0, 1, 1, 1, 2]);
    }

    #[test]
    fn grid_is_bounded_by_work_and_by_the_gpu() {
        assert_eq!(grid_for(0, 132), 1);
        assert_eq!(grid_for(5, 132), 5);
        assert_eq!(grid_for(1 << 20, 132), 132 * BLOCKS_PER_SM);
        assert_eq!(grid_for(10, 0), 8);
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
    fn embedded_ptx_is_nul_terminated_and_has_both_kernels() {
        let ptx = images::PTX;
        assert_eq!(ptx.last(), Some(&0));
        let text = String::from_utf8_lossy(ptx);
        assert!(text.contains(".entry kvh_scrub_zero"), "{}", KERNEL_ORIGIN);
        assert!(text.contains(".entry kvh_scrub_verify"));
    }
}

//! The sampled-verification rule shared by every backend and by auditors.
//!
//! A segment of `len` bytes is read as `words = ceil(len / 8)` words of [`WORD_BYTES`] bytes;
//! the last word may be partial and then covers only the bytes inside the segment.
//!
//! - Full verification reads every word: sample `i` is word `i`, for `i < words`.
//! - Sampled verification reads `n = min(samples, words)` words (when `samples >= words` it is
//!   full verification). Sample 0 is word 0, sample 1 is word `words - 1` (first and last word are
//!   always read), and sample `i >= 2` is word `splitmix64(seed + i * 0x9E3779B97F4A7C15) % words`.
//!   Samples may repeat a word; each still counts as a sample.
//!
//! A sample is non-zero when any of its bytes is non-zero. A segment passes when
//! `checked == expected` and `(checked - nonzero) / checked >= threshold`. A result slot that a
//! scrub never wrote reads `checked == 0` and therefore fails.
//!
//! The CUDA kernel (`kernels/scrub.cu`) implements exactly these functions; keep them in step.

/// Bytes in one verification word.
pub const WORD_BYTES: u64 = 8;

/// What one segment's verification found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct SegmentResult {
    /// Samples read back.
    pub checked: u64,
    /// Samples with at least one non-zero byte.
    pub nonzero: u64,
}

/// The standard splitmix64 finaliser (Steele, Lea, Flood 2014).
#[inline]
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Number of words in a segment of `len` bytes.
#[inline]
pub fn word_count(len: u64) -> u64 {
    len.div_ceil(WORD_BYTES)
}

/// Number of samples a scrub of a `len`-byte segment must check.
#[inline]
pub fn expected_samples(len: u64, samples: u32, full_verify: bool) -> u64 {
    let words = word_count(len);
    if full_verify {
        words
    } else {
        words.min(u64::from(samples))
    }
}

/// Whether the verification reads every word in order (full, or samples >= words).
#[inline]
pub fn is_full(len: u64, samples: u32, full_verify: bool) -> bool {
    full_verify || u64::from(samples) >= word_count(len)
}

/// The word index read by sample `i` of a segment (see the module docs).
#[inline]
pub fn sample_word(seed: u64, i: u64, words: u64, full: bool) -> u64 {
    debug_assert!(words > 0 && i < words.max(2));
    if full {
        return i;
    }
    match i {
        0 => 0,
        1 => words - 1,
        _ => splitmix64(seed.wrapping_add(i.wrapping_mul(0x9E37_79B9_7F4A_7C15))) % words,
    }
}

/// Coverage of a result: zero samples / samples checked (0.0 when nothing was checked).
pub fn coverage(r: SegmentResult) -> f64 {
    if r.checked == 0 {
        return 0.0;
    }
    (r.checked - r.nonzero.min(r.checked)) as f64 / r.checked as f64
}

/// Whether a segment's result passes (see the module docs).
pub fn passes(r: SegmentResult, expected: u64, threshold: f64) -> bool {
    r.checked == expected && r.checked > 0 && coverage(r) >= threshold
}

/// Verifies a segment held in host memory by the rule above. Used by tests that check other
/// backends' results.
pub fn verify_bytes(bytes: &[u8], seed: u64, samples: u32, full_verify: bool) -> SegmentResult {
    // SAFETY: a slice is valid for reads of its whole length.
    unsafe { verify_raw(bytes.as_ptr(), bytes.len(), seed, samples, full_verify) }
}

/// [`verify_bytes`] over raw memory, read with volatile loads: the check must observe memory,
/// not a value the compiler assumes from the zeroing writes before it, and it must not assert
/// (as a `&[u8]` would) that nobody else writes the memory — a use-after-free writer might.
///
/// # Safety
/// 1. `ptr..ptr + len` is valid for reads for the duration of the call.
pub unsafe fn verify_raw(
    ptr: *const u8,
    len: usize,
    seed: u64,
    samples: u32,
    full_verify: bool,
) -> SegmentResult {
    let words = word_count(len as u64);
    if words == 0 {
        return SegmentResult::default();
    }
    let n = expected_samples(len as u64, samples, full_verify);
    let full = is_full(len as u64, samples, full_verify);
    let mut nonzero = 0;
    for i in 0..n {
        let w = sample_word(seed, i, words, full);
        let start = (w * WORD_BYTES) as usize;
        let end = (start + WORD_BYTES as usize).min(len);
        let dirty = (start..end).any(|k| {
            // SAFETY: `k < len`, inside the range the caller guarantees readable (1).
            unsafe { std::ptr::read_volatile(ptr.add(k)) != 0 }
        });
        nonzero += u64::from(dirty);
    }
    SegmentResult {
        checked: n,
        nonzero,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_and_last_word_always_sampled() {
        for words in 1..50u64 {
            assert_eq!(sample_word(7, 0, words, false), 0);
            assert_eq!(sample_word(7, 1, words.max(2), false), words.max(2) - 1);
        }
    }

    #[test]
    fn samples_stay_in_range_and_spread() {
        let words = 1 << 20;
        let mut max = 0;
        for i in 0..64 {
            let w = sample_word(42, i, words, false);
            assert!(w < words);
            max = max.max(w);
        }
        assert!(max > words / 2, "samples cluster at the start");
    }

    #[test]
    fn fixed_vectors_for_outside_verifiers() {
        // An auditor reimplementing the rule must reproduce these positions.
        assert_eq!(splitmix64(0), 0xE220_A839_7B1D_CDAF);
        let got: Vec<u64> = (0..6).map(|i| sample_word(1, i, 1000, false)).collect();
        let again: Vec<u64> = (0..6).map(|i| sample_word(1, i, 1000, false)).collect();
        assert_eq!(got, again);
        assert_eq!(&got[..2], &[0, 999]);
    }

    #[test]
    fn partial_last_word_and_counts() {
        assert_eq!(word_count(1), 1);
        assert_eq!(word_count(9), 2);
        assert_eq!(expected_samples(9, 64, false), 2);
        assert_eq!(expected_samples(1 << 20, 64, false), 64);
        assert_eq!(expected_samples(1 << 20, 64, true), 1 << 17);
        let mut b = vec![0u8; 9];
        assert_eq!(
            verify_bytes(&b, 3, 64, false),
            SegmentResult {
                checked: 2,
                nonzero: 0
            }
        );
        b[8] = 1;
        assert_eq!(verify_bytes(&b, 3, 64, false).nonzero, 1);
    }

    #[test]
    fn pass_rule() {
        let ok = SegmentResult {
            checked: 64,
            nonzero: 0,
        };
        assert!(passes(ok, 64, 0.999));
        assert!(!passes(ok, 65, 0.999), "missing samples must fail");
        assert!(
            !passes(SegmentResult::default(), 64, 0.999),
            "unwritten slot"
        );
        let one_bad = SegmentResult {
            checked: 64,
            nonzero: 1,
        };
        assert!(!passes(one_bad, 64, 0.999));
        assert!(passes(one_bad, 64, 0.9));
    }
}

//! The sampled-verification rule shared by every backend and by auditors.
//!
//! A segment of `len` bytes is read as `words = ceil(len / 8)` words of [`WORD_BYTES`] bytes;
//! the last word may be partial and then covers only the bytes inside the segment.
//!
//! - Full verification reads every word: sample `i` is word `i`, for `i < words`.
//! - Sampled verification reads `m = min(max(samples, 2), words)` words (when that is
//!   `words` it is full verification). Sample 0 is word 0 and sample `m - 1` is word
//!   `words - 1`: the first and last word are always read. The `n = words - 2` words between
//!   them are split into `k = m - 2` strata: consecutive runs of `q = n / k` words, the first
//!   `r = n % k` of them one word longer, so interior stratum `j` starts at word
//!   `1 + j * q + min(j, r)`. Sample `i` in between (`1 <= i <= m - 2`) is word
//!   `start(i - 1) + floor(splitmix64(seed + i * 0x9E3779B97F4A7C15) * len(i - 1) / 2^64)` of
//!   interior stratum `i - 1` (a 64 x 64 -> 128-bit product, high half). Every sample lies in
//!   its own stratum, so samples spread over the whole segment (each word can be read, by
//!   some seed), never repeat a word, and the samples of any range of words can be found
//!   without generating the others (the CUDA kernel reads back, per chunk, the samples of
//!   that chunk).
//!
//! A sample is non-zero when any of its bytes is non-zero. A segment passes when
//! `checked == expected` and `(checked - nonzero) / checked >= threshold`. A result slot that a
//! scrub never wrote reads `checked == 0` and therefore fails.
//!
//! The CUDA kernel (`kernels/scrub.cu`) implements exactly this rule; a test compares the two.

/// Bytes in one verification word.
pub const WORD_BYTES: u64 = 8;

/// The version of the sampling rule above, which a chain's `start` and `recovery` records
/// name (`sample_rule`), so that an auditor reproducing a segment's samples from its seed
/// knows which positions were read:
///
/// 1. Every word split into `m` strata, sample `i` drawn in stratum `i`, then samples 0 and
///    `m - 1` moved to the first and last word (so stratum 0's and the last stratum's other
///    words were never read).
/// 2. The rule above: the first and last word, and `m - 2` interior strata between them.
///
/// Versions before the field was recorded name no rule: those before 2026-11-30 used rule 1,
/// later ones rule 2.
///
/// Any change to which words a seed reads (caught by `fixed_vectors_for_outside_verifiers`)
/// takes the next number.
pub const SAMPLE_RULE: u64 = 2;

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
        // Two at least: the first and the last word are always read.
        words.min(u64::from(samples.max(2)))
    }
}

/// The sampling rule of one segment (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rule {
    words: u64,
    samples: u64,
    q: u64,
    r: u64,
}

impl Rule {
    /// The rule for a segment of `len` bytes scrubbed with these options.
    pub fn new(len: u64, samples: u32, full_verify: bool) -> Rule {
        let words = word_count(len);
        let m = expected_samples(len, samples, full_verify);
        // The interior strata, between the first and the last word, of a sampled rule. With
        // m == 2 (no interior stratum) those of k = 1, which no sample uses and which keep
        // `stratum_of` free of a branch, as in the kernel.
        let (n, k) = (words.saturating_sub(2), m.saturating_sub(2).max(1));
        let (q, r) = if m < words { (n / k, n % k) } else { (0, 0) };
        Rule {
            words,
            samples: m,
            q,
            r,
        }
    }

    /// Samples to read (`expected_samples`).
    pub fn samples(&self) -> u64 {
        self.samples
    }

    /// Whether every word is read.
    pub fn is_full(&self) -> bool {
        self.samples >= self.words
    }

    /// First word of the stratum of sample `i` (`i <= samples`): word 0 for sample 0, the last
    /// word for sample `m - 1`, `words` past the end (word `i` itself when every word is read).
    fn stratum_start(&self, i: u64) -> u64 {
        match i {
            _ if self.is_full() => i.min(self.words),
            0 => 0,
            _ if i + 1 == self.samples => self.words - 1,
            _ if i >= self.samples => self.words,
            _ => 1 + (i - 1) * self.q + (i - 1).min(self.r),
        }
    }

    /// The sample whose stratum holds word `w < words`, for a sampled rule (`m < words`, so
    /// `q >= 1`): the last word, one past the interior strata, and with `m == 2` every interior
    /// word, are given sample `m - 1` (whose word lies at or after them: `candidates` then
    /// still covers every sample of a range).
    fn stratum_of(&self, w: u64) -> u64 {
        if w == 0 {
            return 0;
        }
        let v = w - 1;
        let long_words = self.r * (self.q + 1);
        let j = if v < long_words {
            v / (self.q + 1)
        } else {
            self.r + (v - long_words) / self.q
        };
        (j + 1).min(self.samples - 1)
    }

    /// The word read by sample `i < samples()`.
    pub fn word(&self, seed: u64, i: u64) -> u64 {
        debug_assert!(i < self.samples);
        if self.is_full() {
            return i;
        }
        if i == 0 {
            return 0;
        }
        if i + 1 == self.samples {
            return self.words - 1;
        }
        let len = self.q + u64::from(i - 1 < self.r);
        let x = splitmix64(seed.wrapping_add(i.wrapping_mul(0x9E37_79B9_7F4A_7C15)));
        self.stratum_start(i) + ((u128::from(x) * u128::from(len)) >> 64) as u64
    }

    /// The samples that may read a word of `w0..w1` (`w0 < w1 <= words`): every sample in the
    /// range is among them, and a caller keeps those whose [`Rule::word`] falls inside.
    pub fn candidates(&self, w0: u64, w1: u64) -> std::ops::Range<u64> {
        debug_assert!(w0 < w1 && w1 <= self.words);
        if self.samples == 0 {
            0..0
        } else if self.is_full() {
            w0..w1
        } else {
            self.stratum_of(w0)..self.stratum_of(w1 - 1) + 1
        }
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
    let rule = Rule::new(len as u64, samples, full_verify);
    let n = rule.samples();
    let mut nonzero = 0;
    for i in 0..n {
        let w = rule.word(seed, i);
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

    /// A sampled word is dirty when any of its bytes is, whichever: every byte position of a
    /// word (and of a short last word) read back alone as non-zero.
    #[test]
    fn any_single_non_zero_byte_of_a_sampled_word_is_seen() {
        for len in [8usize, 13, 64] {
            for k in 0..len {
                let mut buf = vec![0u8; len];
                buf[k] = 0x80;
                // SAFETY: 1. `buf` is `len` readable bytes for the call.
                let r = unsafe { verify_raw(buf.as_ptr(), len, 5, 0, true) };
                assert_eq!(r.checked, word_count(len as u64));
                assert_eq!(r.nonzero, 1, "byte {k} of {len}");
            }
        }
    }

    #[test]
    fn first_and_last_word_always_sampled() {
        for words in 2..200u64 {
            for samples in 2..70u32 {
                let rule = Rule::new(words * 8, samples, false);
                let m = rule.samples();
                assert_eq!(rule.word(7, 0), 0);
                assert_eq!(
                    rule.word(7, m - 1),
                    words - 1,
                    "words {words} samples {samples}"
                );
            }
        }
    }

    #[test]
    fn each_sample_lies_in_its_stratum_and_words_do_not_repeat() {
        for (words, samples) in [
            (1000u64, 64u32),
            (64, 64),
            (65, 64),
            (127, 64),
            (1 << 20, 7),
        ] {
            let rule = Rule::new(words * 8, samples, false);
            let m = rule.samples();
            let picked: Vec<u64> = (0..m).map(|i| rule.word(99, i)).collect();
            for (i, &w) in picked.iter().enumerate() {
                assert!(w < words);
                let i = i as u64;
                assert!(
                    rule.stratum_start(i) <= w && w < rule.stratum_start(i + 1),
                    "i {i}"
                );
            }
            assert!(
                picked.windows(2).all(|p| p[0] < p[1]),
                "increasing, no repeats"
            );
        }
    }

    #[test]
    fn samples_spread_over_the_segment() {
        let rule = Rule::new(8 << 20, 64, false);
        let words = 1 << 20;
        let picked: Vec<u64> = (0..64).map(|i| rule.word(42, i)).collect();
        // The first word, the last, and one sample per 1/62nd of the words between them.
        assert_eq!((picked[0], picked[63]), (0, words - 1));
        for (i, w) in picked.iter().enumerate().take(63).skip(1) {
            assert_eq!((w - 1) * 62 / (words - 2), i as u64 - 1);
        }
    }

    #[test]
    fn candidates_cover_exactly_the_samples_of_a_range() {
        for (len, samples, full) in [
            (8u64 << 16, 64u32, false),
            (1_000_003, 64, false),
            (4096, 64, true),
            (80, 64, false),
            (1 << 24, 4096, false),
        ] {
            let rule = Rule::new(len, samples, full);
            let words = word_count(len);
            let m = rule.samples();
            let step = (words / 37).max(1);
            let mut w0 = 0;
            let mut seen = 0;
            while w0 < words {
                let w1 = (w0 + step).min(words);
                let range = rule.candidates(w0, w1);
                let inside = (0..m)
                    .filter(|&i| (w0..w1).contains(&rule.word(5, i)))
                    .count() as u64;
                let found = range
                    .clone()
                    .filter(|&i| (w0..w1).contains(&rule.word(5, i)))
                    .count() as u64;
                assert_eq!(found, inside, "len {len} range {w0}..{w1}");
                assert!(
                    range.end - range.start <= inside + 2,
                    "at most the two edge strata extra"
                );
                seen += found;
                w0 = w1;
            }
            assert_eq!(seen, m);
        }
    }

    /// Sample positions of an 8000-byte segment, seed 1, 6 samples (see the test below).
    const FIXED_POSITIONS: [u64; 6] = [0, 187, 493, 611, 860, 999];

    #[test]
    fn fixed_vectors_for_outside_verifiers() {
        // An auditor reimplementing the rule must reproduce these positions. They are rule
        // 2's: positions that change need a new `SAMPLE_RULE`, and these vectors with it.
        assert_eq!(SAMPLE_RULE, 2);
        assert_eq!(splitmix64(0), 0xE220_A839_7B1D_CDAF);
        let rule = Rule::new(8000, 6, false);
        let got: Vec<u64> = (0..6).map(|i| rule.word(1, i)).collect();
        assert_eq!(got, FIXED_POSITIONS);
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

    /// The pseudo-random samples spread over the whole segment: every word of a sampled
    /// segment is read by some seed, including the words of the first and last strata
    /// (not only the first and last word themselves).
    #[test]
    fn every_word_is_read_by_some_seed() {
        let words = 1024u64;
        let rule = Rule::new(words * 8, 8, false);
        let mut hit = vec![false; words as usize];
        for seed in 0..20_000u64 {
            for i in 0..rule.samples() {
                hit[rule.word(seed, i) as usize] = true;
            }
        }
        let never: Vec<u64> = (0..words).filter(|&w| !hit[w as usize]).collect();
        assert!(
            never.is_empty(),
            "{} of {words} words are read by no seed (first {:?}, last {:?})",
            never.len(),
            never.first(),
            never.last()
        );
    }

    /// A non-zero word near the start of a sampled segment (here word 1, 8 bytes in) is
    /// caught by a share of the seeds like a word anywhere else.
    #[test]
    fn a_dirty_word_near_the_start_is_caught_by_some_seeds() {
        let len = 1usize << 16; // 8192 words, 64 samples: strata of 128 words
        let mut buf = vec![0u8; len];
        buf[8] = 0xA5;
        let caught = (0..2_000u64)
            .filter(|&seed| verify_bytes(&buf, seed, 64, false).nonzero > 0)
            .count();
        assert!(caught > 0, "word 1 was read by none of 2000 seeds");
    }

    /// First and last word are always read, whatever the sample count: a segment whose only
    /// non-zero byte is its last one is seen as dirty with a single sample too.
    #[test]
    fn the_last_word_is_read_with_one_sample() {
        let mut buf = vec![0u8; 64];
        buf[63] = 1;
        let r = verify_bytes(&buf, 3, 1, false);
        assert_eq!(r.nonzero, 1, "{r:?}: the last word was not read");
    }
}

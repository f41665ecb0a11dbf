//! Size classes: eight per power of two.
//!
//! A request of `s` bytes with `2^k <= s < 2^(k+1)` is rounded up to a multiple of
//! `step = 2^(k-3)` (`step = 1` below 16 bytes). The rounding adds at most `step - 1` bytes to a
//! class of at least `2^k + step` bytes, so internal fragmentation — wasted bytes over class
//! size — is below `step / 2^k = 1/8 = 12.5%` for every size. (Each block is its own backend
//! allocation; the backend's own alignment padding is not part of this bound.)

/// Classes per power of two.
pub const CLASSES_PER_OCTAVE: u32 = 8;

/// Granule of a block sized to its request ([`SizeClass::exact`]): the driver's own page size
/// for large allocations.
pub const EXACT_GRANULE: u64 = 2 << 20;

/// Smallest request whose fresh block is sized to it ([`SizeClass::for_fresh`]) rather than
/// to its class. Buffers this large are few and long-lived (weights, an engine's whole KV
/// cache, which vLLM allocates as one buffer of the memory it budgeted): the class's rounding
/// of up to 12.5% would take up to 1 GiB more of an 8 GiB one, past the engine's budget.
pub const EXACT_FIRST_BYTES: u64 = 256 << 20;

/// The index of every block sized to its request: no class has it (the largest class index
/// is 63 × 8 + 8), so such blocks have free lists of their own.
pub const EXACT_INDEX: u16 = u16::MAX;

/// A size class: its index and the capacity of its blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SizeClass {
    pub index: u16,
    pub capacity: u64,
}

impl SizeClass {
    /// The class serving requests of `size` bytes (`size >= 1`). `None` when the rounded size
    /// would not fit in a `u64` (no backend could serve it anyway).
    pub fn of(size: u64) -> Option<SizeClass> {
        if size == 0 {
            return None;
        }
        let k = 63 - size.leading_zeros(); // 2^k <= size < 2^(k+1)
        let shift = k.saturating_sub(3);
        let step = 1u64 << shift;
        let capacity = size.checked_add(step - 1)? & !(step - 1);
        // Index: octave k contributes 8 classes; position inside it is (capacity - 2^k) / step,
        // which is 8 when rounding reached the next power of two (the next octave's first class).
        let index = if k < 3 {
            capacity as u32 // sizes 1..=7 are exact classes 1..=7 (8 is the next octave's first)
        } else {
            k * CLASSES_PER_OCTAVE + ((capacity - (1u64 << k)) >> shift) as u32
        };
        Some(SizeClass {
            index: index as u16,
            capacity,
        })
    }

    /// A block of `size` bytes rounded up to [`EXACT_GRANULE`] rather than to its class, when
    /// that is smaller: what an allocation falls back to when the device cannot hold its
    /// class's capacity (an engine that sizes one buffer to nearly all the free memory, where
    /// the class's rounding of up to 12.5% would not fit). `None` when the class is no larger.
    pub fn exact(size: u64) -> Option<SizeClass> {
        let class = Self::of(size)?;
        let capacity = size.checked_add(EXACT_GRANULE - 1)? & !(EXACT_GRANULE - 1);
        (capacity < class.capacity).then_some(SizeClass {
            index: EXACT_INDEX,
            capacity,
        })
    }

    /// The block a fresh allocation of `size` bytes (of class `class`) takes from the backend:
    /// its class's capacity, or, from [`EXACT_FIRST_BYTES`] up, its own size rounded to
    /// [`EXACT_GRANULE`] ([`SizeClass::exact`]). A block sized so serves later requests of
    /// its class up to its capacity, as the pool's exact blocks do.
    pub fn for_fresh(size: u64, class: SizeClass) -> SizeClass {
        if size < EXACT_FIRST_BYTES {
            return class;
        }
        Self::exact(size).unwrap_or(class)
    }

    /// Internal fragmentation of serving `size` from this class, as a fraction of capacity:
    /// 0 for a size the class does not hold (larger than its capacity), which wastes nothing
    /// of it.
    pub fn waste(&self, size: u64) -> f64 {
        if self.capacity == 0 {
            return 0.0;
        }
        self.capacity.saturating_sub(size) as f64 / self.capacity as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_fresh_block_is_sized_to_its_request_from_256_mib_up() {
        let small = (EXACT_FIRST_BYTES - 1) | 1;
        let class = SizeClass::of(small).unwrap();
        assert_eq!(SizeClass::for_fresh(small, class), class);
        let huge = 8 * (1 << 30) + 1;
        let class = SizeClass::of(huge).unwrap();
        let fresh = SizeClass::for_fresh(huge, class);
        assert_eq!(
            (fresh.index, fresh.capacity),
            (EXACT_INDEX, 8 * (1 << 30) + EXACT_GRANULE)
        );
        // A size its class holds exactly keeps the class: nothing to save.
        let even = SizeClass::of(1 << 30).unwrap();
        assert_eq!(SizeClass::for_fresh(1 << 30, even), even);
    }

    #[test]
    fn an_exact_block_is_granule_rounded_and_only_when_smaller_than_its_class() {
        let size = (256 << 20) + 1;
        let exact = SizeClass::exact(size).expect("smaller than the class");
        assert_eq!(exact.capacity, (256 << 20) + EXACT_GRANULE);
        assert_eq!(exact.index, EXACT_INDEX);
        assert!(exact.capacity < SizeClass::of(size).unwrap().capacity);
        // Small sizes and class boundaries: the class is no larger.
        assert_eq!(SizeClass::exact(4096), None);
        assert_eq!(SizeClass::exact(256 << 20), None);
        assert_eq!(SizeClass::exact(u64::MAX), None);
        // No class has the exact index.
        assert!(SizeClass::of(u64::MAX >> 4).unwrap().index < EXACT_INDEX);
    }

    #[test]
    fn small_and_boundary_sizes() {
        assert_eq!(SizeClass::of(0), None);
        assert_eq!(SizeClass::of(1).unwrap().capacity, 1);
        assert_eq!(SizeClass::of(8).unwrap().capacity, 8);
        assert_eq!(SizeClass::of(17).unwrap().capacity, 18);
        assert_eq!(SizeClass::of(1000).unwrap().capacity, 1024);
        assert_eq!(SizeClass::of(1025).unwrap().capacity, 1152);
        assert_eq!(SizeClass::of(u64::MAX), None);
    }

    #[test]
    fn indices_are_monotonic_and_distinct_per_capacity() {
        let mut last = SizeClass::of(1).unwrap();
        for s in 2..100_000u64 {
            let c = SizeClass::of(s).unwrap();
            assert!(c.capacity >= s);
            if c.capacity == last.capacity {
                assert_eq!(c.index, last.index);
            } else {
                assert!(c.index > last.index, "size {s}: {c:?} after {last:?}");
            }
            last = c;
        }
    }

    proptest! {
        #[test]
        fn fragmentation_bound_holds(size in 1u64..(1u64 << 62)) {
            let c = SizeClass::of(size).unwrap();
            prop_assert!(c.capacity >= size);
            prop_assert!(c.waste(size) < 0.125, "size {} class {:?}", size, c);
            // The class of the capacity is the class itself.
            prop_assert_eq!(SizeClass::of(c.capacity), Some(c));
        }
    }
}

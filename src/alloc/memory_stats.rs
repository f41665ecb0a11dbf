//! PyTorch's memory statistics, kept by the pool: what `torch.cuda.memory_stats` reports for
//! its own caching allocator, for the allocator kvhygiene is in its place.
//!
//! PyTorch's `CUDAPluggableAllocator` keeps no statistics (`torch.cuda.memory_stats`,
//! `memory_allocated`, `max_memory_allocated`, `memory_reserved`, `reset_peak_memory_stats`
//! all raise under it), and engines read them: vLLM sizes its KV cache from the peak of
//! allocated bytes during a profiling run and from the bytes reserved. The Python package
//! routes those calls here (`kvh_memory_stats_json`).
//!
//! The pool's block states map onto PyTorch's categories:
//!
//! | PyTorch          | kvhygiene                                                  |
//! |------------------|------------------------------------------------------------|
//! | `allocated`      | LIVE blocks (their capacity; `requested`: the sizes asked)       |
//! | `active`         | LIVE blocks and freed PENDING ones (their scrub not yet verified) |
//! | `reserved`       | every block the pool holds from the backend (`segment`: a block each) |
//! | `inactive_split` | none: kvhygiene never splits a block                       |
//!
//! Each statistic keeps `current`, `peak` (since the last reset of peaks), and the
//! cumulative `allocated` and `freed` (since the last reset of accumulated statistics), for
//! all blocks and separately for the small (capacity up to 1 MiB, PyTorch's small-pool bound)
//! and large ones. Invariant: every change of a block's state goes through
//! `MemoryStats::moved` (from the pool's one accounting step, `DevicePool::moved`; a block
//! leaves only once its return to the backend ended, `DevicePool::released`), so `current`
//! always equals a recount of the block table and of the releases under way
//! (`DevicePool::recount_memory`, checked with the accounting by `check_consistency`), and
//! no cumulative figure ever goes down but by a reset.

use serde::Serialize;

use super::block::BlockState;

/// Largest capacity PyTorch counts in its small pool.
pub const SMALL_POOL_MAX: u64 = 1 << 20;

/// One statistic: its value now, its peak and what was added to and taken from it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Stat {
    pub current: u64,
    pub peak: u64,
    pub allocated: u64,
    pub freed: u64,
}

impl Stat {
    #[inline]
    fn increase(&mut self, n: u64) {
        self.current = self.current.saturating_add(n);
        self.peak = self.peak.max(self.current);
        self.allocated = self.allocated.saturating_add(n);
    }

    #[inline]
    fn decrease(&mut self, n: u64) {
        self.current = self.current.saturating_sub(n);
        self.freed = self.freed.saturating_add(n);
    }
}

/// A statistic over all blocks and over each pool, as PyTorch splits them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct StatSet {
    pub all: Stat,
    pub small_pool: Stat,
    pub large_pool: Stat,
}

impl StatSet {
    /// `n` more (`up`) or fewer, over all blocks and in the block's pool.
    #[inline]
    fn change(&mut self, up: bool, small: bool, n: u64) {
        let pool = self.pool(small);
        if up {
            pool.increase(n);
            self.all.increase(n);
        } else {
            pool.decrease(n);
            self.all.decrease(n);
        }
    }

    #[inline]
    fn pool(&mut self, small: bool) -> &mut Stat {
        if small {
            &mut self.small_pool
        } else {
            &mut self.large_pool
        }
    }

    fn stats_mut(&mut self) -> [&mut Stat; 3] {
        [&mut self.all, &mut self.small_pool, &mut self.large_pool]
    }
}

/// One device's statistics, serialised as PyTorch's `torch.cuda.memory_stats_as_nested_dict`
/// lays them out (the field names are its keys).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct MemoryStats {
    /// Bytes of LIVE blocks.
    pub allocated_bytes: StatSet,
    /// Bytes LIVE blocks were asked for.
    pub requested_bytes: StatSet,
    /// Bytes of LIVE and PENDING blocks.
    pub active_bytes: StatSet,
    /// Bytes of every block held from the backend.
    pub reserved_bytes: StatSet,
    /// Always zero: no block is ever split.
    pub inactive_split_bytes: StatSet,
    /// LIVE blocks.
    pub allocation: StatSet,
    /// LIVE and PENDING blocks.
    pub active: StatSet,
    /// Blocks held from the backend.
    pub segment: StatSet,
    /// Always zero.
    pub inactive_split: StatSet,
    /// Always zero: no allocation is oversize (PyTorch's `max_split_size`).
    pub oversize_allocations: Stat,
    /// Always zero.
    pub oversize_segments: Stat,
    /// Allocations the backend refused that led to a flush of the cache and a retry,
    /// whatever the retry gave (kept by the pool, zeroed with the accumulated statistics).
    pub num_alloc_retries: u64,
    /// Allocations that failed out of memory after their retry (a KV scrub that found no
    /// memory for its batch is no allocation).
    pub num_ooms: u64,
    /// Blocks obtained from the backend, those given back at once included (their zeroing
    /// failed).
    pub num_device_alloc: u64,
    /// Blocks returned to the backend.
    pub num_device_free: u64,
    /// Always zero: kvhygiene never synchronises every stream to free memory.
    pub num_sync_all_streams: u64,
    /// PyTorch's "no limit" (-1): blocks are never split.
    pub max_split_size: i64,
}

/// What a block in a state counts in: allocated (LIVE), active (LIVE, or PENDING once
/// `handed_out`: freed, its scrub not yet verified); every block counts as reserved. A block
/// becomes active only by being allocated, as in PyTorch: fresh memory kept PENDING after a
/// capture refused its zeroing was handed to nobody, and is only reserved.
#[inline]
fn counts(state: BlockState, handed_out: bool) -> (bool, bool) {
    match state {
        BlockState::Live => (true, true),
        BlockState::Pending => (false, handed_out),
        BlockState::Clean | BlockState::Quarantined => (false, false),
    }
}

impl MemoryStats {
    /// The statistics of a device before the allocator started: every one zero.
    pub fn unstarted() -> Self {
        MemoryStats {
            max_split_size: -1,
            ..MemoryStats::default()
        }
    }

    /// A block of `capacity` bytes, asked for `requested`, went from state `from` to `to`
    /// (`None`: not in the pool: before it was obtained from the backend, after it went
    /// back); `handed_out`: whether anybody was ever given it ([`Block::never_handed_out`]
    /// is its opposite). The one place the statistics change with the block table; on the
    /// hot path (a pool hit moves a block from CLEAN to LIVE), so straight-line code.
    ///
    /// [`Block::never_handed_out`]: super::block::Block::never_handed_out
    #[inline]
    pub(crate) fn moved(
        &mut self,
        from: Option<BlockState>,
        to: Option<BlockState>,
        capacity: u64,
        requested: u64,
        handed_out: bool,
    ) {
        let small = capacity <= SMALL_POOL_MAX;
        let counted =
            |state: Option<BlockState>| state.map_or((false, false), |s| counts(s, handed_out));
        let (was_allocated, was_active) = counted(from);
        let (is_allocated, is_active) = counted(to);
        if was_allocated != is_allocated {
            self.allocated_bytes.change(is_allocated, small, capacity);
            self.requested_bytes.change(is_allocated, small, requested);
            self.allocation.change(is_allocated, small, 1);
        }
        if was_active != is_active {
            self.active_bytes.change(is_active, small, capacity);
            self.active.change(is_active, small, 1);
        }
        if from.is_some() != to.is_some() {
            let held = to.is_some();
            self.reserved_bytes.change(held, small, capacity);
            self.segment.change(held, small, 1);
        }
    }

    fn sets_mut(&mut self) -> [&mut StatSet; 9] {
        [
            &mut self.allocated_bytes,
            &mut self.requested_bytes,
            &mut self.active_bytes,
            &mut self.reserved_bytes,
            &mut self.inactive_split_bytes,
            &mut self.allocation,
            &mut self.active,
            &mut self.segment,
            &mut self.inactive_split,
        ]
    }

    /// Every peak set back to its current value (`torch.cuda.reset_peak_memory_stats`).
    pub(crate) fn reset_peaks(&mut self) {
        for set in self.sets_mut() {
            for stat in set.stats_mut() {
                stat.peak = stat.current;
            }
        }
    }

    /// Every cumulative `allocated` and `freed`, and every counter, set to zero
    /// (`torch.cuda.reset_accumulated_memory_stats`).
    pub(crate) fn reset_accumulated(&mut self) {
        self.num_alloc_retries = 0;
        self.num_ooms = 0;
        self.num_device_alloc = 0;
        self.num_device_free = 0;
        for set in self.sets_mut() {
            for stat in set.stats_mut() {
                stat.allocated = 0;
                stat.freed = 0;
            }
        }
    }

    /// Whether every statistic's `current` (over all blocks and in each pool) is the same in
    /// `other`: a recount of the block table must give the kept ones.
    pub(crate) fn same_currents(&self, other: &MemoryStats) -> bool {
        let currents = |m: &MemoryStats| -> Vec<u64> {
            let mut m = *m;
            let mut out = Vec::new();
            for set in m.sets_mut() {
                out.extend(set.stats_mut().map(|stat| stat.current));
            }
            out
        };
        currents(self) == currents(other)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_block_s_life_leaves_every_current_at_zero_and_the_peaks_it_reached() {
        let mut m = MemoryStats::default();
        m.moved(None, Some(BlockState::Live), 4096, 4000, true);
        m.moved(
            Some(BlockState::Live),
            Some(BlockState::Pending),
            4096,
            4000,
            true,
        );
        m.moved(
            Some(BlockState::Pending),
            Some(BlockState::Clean),
            4096,
            4000,
            true,
        );
        assert_eq!(m.allocated_bytes.all.current, 0);
        assert_eq!(m.allocated_bytes.all.peak, 4096);
        assert_eq!(m.requested_bytes.small_pool.peak, 4000);
        assert_eq!(m.active_bytes.all.current, 0);
        assert_eq!(m.reserved_bytes.all.current, 4096);
        assert_eq!(m.segment.small_pool.current, 1);
        m.moved(Some(BlockState::Clean), None, 4096, 4000, true);
        assert_eq!(m.reserved_bytes.all.current, 0);
        assert_eq!(m.reserved_bytes.all.allocated, 4096);
        assert_eq!(m.reserved_bytes.all.freed, 4096);
        assert_eq!(m.reserved_bytes.large_pool, Stat::default());
    }

    #[test]
    fn a_reset_of_peaks_brings_them_to_the_current_values() {
        let mut m = MemoryStats::default();
        m.moved(None, Some(BlockState::Live), 8 << 20, 8 << 20, true);
        m.moved(
            Some(BlockState::Live),
            Some(BlockState::Pending),
            8 << 20,
            8 << 20,
            true,
        );
        m.reset_peaks();
        assert_eq!(m.allocated_bytes.large_pool.peak, 0);
        assert_eq!(m.active_bytes.large_pool.peak, 8 << 20);
        m.reset_accumulated();
        assert_eq!(m.reserved_bytes.all.allocated, 0);
        assert_eq!(m.reserved_bytes.all.current, 8 << 20);
    }
}

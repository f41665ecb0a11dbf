//! One device's pool: the block table, the free lists, open and in-flight scrub batches.
//!
//! Everything here runs under the device's pool lock, held by [`super::Allocator`]. Methods
//! never emit events themselves: they push them onto the caller's buffer, which is emitted
//! after the lock is dropped. Backend calls made here never wait on the device (submission,
//! polling); waiting on a ticket happens with the lock released.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use crate::backend::verify::{self, SegmentResult};
use crate::backend::{
    Backend, BackendError, ScrubBatch, ScrubOptions, ScrubSegment, ScrubTicket, StreamHandle,
};
use crate::config::{Config, TenantIsolation};
use crate::context::Context;
use crate::events::{
    BlockRef, Event, EventKind, InvalidFreeReason, QuarantineReason, ReleaseReason, TtlKind,
};
use crate::stats::PoolCounters;

use super::block::{Block, BlockSpan, BlockState, Disposition};
use super::memory_stats::MemoryStats;
use super::size_class::{SizeClass, EXACT_INDEX};

/// Free lists are keyed by size class and, under strict isolation, by tenant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct FreeKey {
    class: u16,
    tenant: u64,
}

impl FreeKey {
    pub(crate) fn new(class: SizeClass, ctx: &Context, isolation: TenantIsolation) -> Self {
        let tenant = match isolation {
            TenantIsolation::Strict => ctx.tenant_key(),
            TenantIsolation::Off => 0,
        };
        FreeKey {
            class: class.index,
            tenant,
        }
    }
}

/// Frees collected for one stream, not yet submitted.
struct OpenBatch {
    stream: StreamHandle,
    opened_at: Instant,
    blocks: Vec<u64>,
    waits: Vec<StreamHandle>,
    /// Why its last submission was refused; `None` for a batch never submitted.
    deferred: Option<Deferral>,
}

/// Why the backend refused to queue a batch for now (the batch waits, open, for a later
/// flush): what a caller waiting for one of its blocks is told. It names what the backend
/// named: the stream that is capturing (the batch's own, or a stream recorded on one of its
/// blocks) and the device whose memory ran out (the block's, or a recorded stream's).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Deferral {
    /// A stream it must run on or after is capturing a CUDA graph.
    Capture { stream: u64 },
    /// No memory for the batch's own buffers, or for ordering it after a recorded stream.
    OutOfMemory { device: u32, requested: u64 },
}

impl Deferral {
    fn error(self, what: &'static str) -> BackendError {
        match self {
            Deferral::Capture { stream } => BackendError::StreamCapturing { stream, what },
            Deferral::OutOfMemory { device, requested } => {
                BackendError::OutOfMemory { device, requested }
            }
        }
    }
}

/// What became of a batch whose results are applied: what the scrub counters may count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    /// The device ran it and its results came back.
    Ran,
    /// It was queued, but its results were lost (the wait failed): not known to have run.
    Unknown,
    /// The backend refused to queue it: nothing ran.
    NotQueued,
}

/// A submitted batch.
pub(crate) struct InFlight {
    ticket: Box<dyn ScrubTicket>,
    /// `(address, scrub sequence)` of each segment, in segment order.
    blocks: Vec<(u64, u64)>,
    options: ScrubOptions,
    /// A quarantine re-scrub (double pass, full verification) rather than a free's scrub.
    rescrub: bool,
    /// The stream the batch runs on (batches of one stream complete in submission order).
    stream: StreamHandle,
}

/// A batch whose results are missing (its submission failed, or its wait), to be applied as
/// unverified: its blocks and the options it was submitted with.
struct Unverified<'a> {
    blocks: &'a [(u64, u64)],
    options: ScrubOptions,
    rescrub: bool,
}

impl InFlight {
    fn unverified(&self) -> Unverified<'_> {
        Unverified {
            blocks: &self.blocks,
            options: self.options,
            rescrub: self.rescrub,
        }
    }

    /// Blocks until the batch completes (called with the pool lock released).
    pub(crate) fn wait(&mut self) -> Result<Vec<SegmentResult>, BackendError> {
        self.ticket.wait()
    }

    pub(crate) fn contains_seq(&self, seq: u64) -> bool {
        self.blocks.iter().any(|&(_, s)| s == seq)
    }

    /// The scrub sequence of the batch's oldest block (the smallest): the batch holds a free
    /// made before sequence `h` exactly when this is below `h`.
    pub(crate) fn oldest_seq(&self) -> u64 {
        self.blocks
            .iter()
            .map(|&(_, s)| s)
            .min()
            .unwrap_or(u64::MAX)
    }
}

/// A refused free, with the block table untouched. The allocator turns it into an event
/// once it has checked the other devices' pools (an unknown pointer here may be a
/// wrong-device free), which it may do only after dropping this pool's lock.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Refused {
    pub reason: InvalidFreeReason,
    pub block: Option<crate::events::BlockRef>,
    pub owner: Option<Context>,
}

/// Flags the allocator acts on after the lock is dropped.
#[derive(Default)]
pub(crate) struct Aftermath {
    pub events: Vec<Event>,
    /// A verification failed under `failure_mode = abort`: the ids of the request whose
    /// block failed (the first one), which the record of the abort carries.
    pub abort: Option<Context>,
    /// An asynchronous backend error to make sticky.
    pub backend_error: Option<BackendError>,
    /// Verified blocks taken out of the pool, to return to the backend once the lock is
    /// dropped: `cuMemFree` synchronises the device, so it never runs under the pool lock
    /// (invariant 3).
    pub releases: Vec<Release>,
}

/// A verified block taken out of the pool for the backend ([`Aftermath::releases`]). It is
/// counted and recorded as released only once it was handed to the backend
/// ([`DevicePool::released`]; a release the backend failed leaks the memory and counts a
/// backend error too); when exit began first it goes back into the pool as it was
/// ([`DevicePool::keep_unreleased`]), so the pool still accounts for what the backend holds.
pub(crate) struct Release {
    pub block: Block,
    pub reason: ReleaseReason,
}

impl Aftermath {
    fn event(&mut self, kind: EventKind, block: &Block) {
        self.event_of(kind, block.to_ref(), block.owner.clone());
    }

    /// An event of a block known by its identity and owner: one the pool may no longer hold.
    fn event_of(&mut self, kind: EventKind, block: BlockRef, owner: Context) {
        self.events.push(Event {
            at: SystemTime::now(),
            kind,
            context: owner,
            block: Some(block),
            addr: None,
        });
    }
}

/// A block a device reset listed to free on its holder's behalf ([`DevicePool::mark_reset`]).
struct ResetFreed {
    /// The block as it was when the reset listed it (its size asked for among the rest), and
    /// its owner: what a size mismatch of the holder's later free reports.
    block: BlockRef,
    owner: Context,
    /// The scrub sequence its verdict is watched under, once the reset's free of it is made.
    seq: Option<u64>,
}

pub(crate) struct DevicePool {
    device: u32,
    /// Every block the pool holds (not RELEASED), by address: the truth for every pointer.
    blocks: BTreeMap<u64, Block>,
    /// CLEAN blocks, most recently cleaned last (LIFO reuse keeps caches warm).
    free_lists: HashMap<FreeKey, Vec<u64>>,
    open: Vec<OpenBatch>,
    in_flight: VecDeque<InFlight>,
    /// Outcomes of first scrubs that a `kvh_free_checked` caller waits for, by scrub seq.
    watched: HashMap<u64, Option<bool>>,
    /// Quarantined blocks waiting for their re-scrub (kept so that finding them never scans
    /// the whole block table).
    rescrub_waiting: Vec<u64>,
    /// Why the first re-scrub submission refused since they were last submitted was refused:
    /// what `synchronize` says of the re-scrubs still waiting after it submitted them again.
    rescrub_deferred: Option<Deferral>,
    /// Batches taken out of `in_flight` and being waited on with the lock dropped, each as its
    /// oldest scrub sequence ([`InFlight::oldest_seq`]): a caller that waits for the frees
    /// made before some point knows whether another thread holds one of them. Work is
    /// finished only when this is empty too.
    out_of_pool: Vec<u64>,
    /// Blocks other than CLEAN ones taken out for release whose backend call has not ended:
    /// in no state meanwhile, but not settled either (`unsettled_blocks` counts them). A
    /// CLEAN one is reusable whatever becomes of its release, so it is not counted.
    releasing: usize,
    /// The memory statistics' share of the blocks taken out for release whose backend call
    /// has not ended: PyTorch's figures count them until it has (the backend still holds
    /// them, and a release that exit overtakes never happens), so `memory` is the block
    /// table's recount plus this (`recount_memory`).
    in_release: MemoryStats,
    pub(crate) stats: PoolCounters,
    /// PyTorch's memory statistics of the device (`memory_stats.rs`), changed with every
    /// block state, as `stats.accounting` is.
    pub(crate) memory: MemoryStats,
    /// The allocator's "exit has begun" flag: nothing is submitted to the backend once it is
    /// set (invariant 6), whichever path gets to a submission.
    exiting: Arc<AtomicBool>,
    /// The process is resetting, or reset, this device's context (`Allocator::reset_device`):
    /// nothing is handed out any more, neither from the free lists nor fresh.
    reset: bool,
    /// The blocks the reset frees on their holders' behalf, each as it was listed (the size
    /// its holder asked for, its owner) and, once the reset's free of it is made, the scrub
    /// sequence its verdict is watched under: the holder's own free of one afterwards is
    /// accepted once and does nothing (a checked one answers that verdict), also after the
    /// block went back to the device.
    /// Invariant: an entry without a sequence is a LIVE block. Entries are made and taken
    /// under the pool lock, with the reset mark and with the frees that change the block's
    /// state (`free_for_reset`, and the holder's free through `claim_freed_by_reset`).
    freed_by_reset: HashMap<u64, ResetFreed>,
}

impl DevicePool {
    pub(crate) fn new(device: u32, exiting: Arc<AtomicBool>) -> Self {
        DevicePool {
            device,
            exiting,
            blocks: BTreeMap::new(),
            free_lists: HashMap::new(),
            open: Vec::new(),
            in_flight: VecDeque::new(),
            watched: HashMap::new(),
            rescrub_waiting: Vec::new(),
            rescrub_deferred: None,
            out_of_pool: Vec::new(),
            releasing: 0,
            in_release: MemoryStats::default(),
            stats: PoolCounters::default(),
            memory: MemoryStats::unstarted(),
            reset: false,
            freed_by_reset: HashMap::new(),
        }
    }

    // ----- device reset ---------------------------------------------------------------------

    /// Marks the device reset (nothing is handed out from now on) and returns the LIVE blocks
    /// the reset is to free on their holders' behalf ([`Self::free_for_reset`]). The first
    /// call lists every LIVE block. A later one (a second reset of the device, maybe while
    /// the first is still freeing) returns only those still listed: a block whose holder
    /// took it back ([`Self::claim_freed_by_reset`]) is its holder's to free. Without `list`
    /// (exit has begun: nothing is scrubbed any more), the device is marked and nothing is
    /// listed: its blocks still handed out stay so, as exit leaves them.
    pub(crate) fn mark_reset(&mut self, list: bool) -> Vec<u64> {
        let first = !self.reset;
        self.reset = true;
        if !list {
            return Vec::new();
        }
        if first {
            let live = self.blocks.values().filter(|b| b.state == BlockState::Live);
            let listed: Vec<_> = live
                .map(|b| {
                    let entry = ResetFreed {
                        block: b.to_ref(),
                        owner: b.owner.clone(),
                        seq: None,
                    };
                    (b.addr, entry)
                })
                .collect();
            self.freed_by_reset.extend(listed);
        }
        let mut listed: Vec<u64> = self
            .freed_by_reset
            .iter()
            .filter(|(_, entry)| entry.seq.is_none())
            .map(|(&addr, _)| addr)
            .collect();
        // In address order, as the block table lists them: the frees' order does not hang
        // on the map's.
        listed.sort_unstable();
        listed
    }

    /// The reset's free of `addr` on its holder's behalf (scrub sequence `seq`, watched for a
    /// checked free of the holder's), or `false` when the block is no longer the reset's to
    /// free: its holder freed or claimed it first, or another reset of the device freed it.
    /// Nothing is refused or recorded then. Entry and free change together, under the pool
    /// lock: a block is freed once, by the reset or by its holder.
    pub(crate) fn free_for_reset(
        &mut self,
        addr: u64,
        seq: u64,
        config: &Config,
        after: &mut Aftermath,
    ) -> bool {
        let Some(requested) = self
            .freed_by_reset
            .get(&addr)
            .filter(|entry| entry.seq.is_none())
            .map(|entry| entry.block.requested)
        else {
            return false;
        };
        let live = self
            .blocks
            .get(&addr)
            .is_some_and(|b| b.state == BlockState::Live);
        // Not LIVE would break the invariant of `freed_by_reset`: nothing is freed then.
        let freed = live
            && self
                .begin_free(addr, requested as i64, StreamHandle(0), seq, config, after)
                .is_ok();
        if !freed {
            self.freed_by_reset.remove(&addr);
            return false;
        }
        if let Some(entry) = self.freed_by_reset.get_mut(&addr) {
            entry.seq = Some(seq);
        }
        self.watch(seq);
        true
    }

    /// The holder's free of `ptr` (naming `claimed_size` bytes), when the reset listed it:
    /// forgets it (a second free of it is judged as any other). `Some((seq, size_mismatch))`
    /// when the reset freed it, its verdict watched under `seq`: the holder's free is then
    /// done, its size checked against the one the block was asked with (invariant 7: counted
    /// and recorded when it differs). `None` when the reset had not freed it yet: the reset
    /// now leaves it to the holder's free, which frees it as any LIVE block under the same
    /// lock. `None`, at the cost of one load, on a device never reset.
    #[inline]
    pub(crate) fn claim_freed_by_reset(
        &mut self,
        ptr: u64,
        claimed_size: i64,
        after: &mut Aftermath,
    ) -> Option<(u64, bool)> {
        if !self.reset {
            return None;
        }
        let entry = self.freed_by_reset.remove(&ptr)?;
        let seq = entry.seq?;
        let size_mismatch = claimed_size != entry.block.requested as i64;
        if size_mismatch {
            self.stats.counters.size_mismatches += 1;
            let kind = EventKind::SizeMismatch {
                claimed: claimed_size,
                caller: Context::current(),
            };
            after.event_of(kind, entry.block, entry.owner);
        }
        Some((seq, size_mismatch))
    }

    /// Whether the device is reset, or being reset ([`Self::mark_reset`]).
    pub(crate) fn is_reset(&self) -> bool {
        self.reset
    }

    /// The size its holder asked for, when `ptr` is a block the reset listed whose holder had
    /// not freed it yet (held by the pool or not).
    pub(crate) fn freed_by_reset_requested(&self, ptr: u64) -> Option<u64> {
        self.freed_by_reset
            .get(&ptr)
            .map(|entry| entry.block.requested)
    }

    /// Blocks freed that are neither reusable nor returned and could still become one or the
    /// other: PENDING (scrub not applied, or verified for retirement), or QUARANTINED and not
    /// condemned (re-scrub to come, or verified). Once exit has begun, none will be handed
    /// out or returned, and they are leaked. Fresh memory nobody was handed, kept PENDING
    /// (`insert_unzeroed`), held no data: not a freed block left unscrubbed.
    pub(crate) fn unsettled_blocks(&self) -> usize {
        self.blocks
            .values()
            .filter(|b| !b.never_handed_out())
            .filter(|b| match b.state {
                BlockState::Pending => true,
                BlockState::Quarantined => {
                    !matches!(b.disposition, Disposition::Quarantine(r) if condemned(r))
                }
                BlockState::Live | BlockState::Clean => false,
            })
            .count()
            // Not known to be returned until the backend answered.
            + self.releasing
    }

    // ----- malloc ---------------------------------------------------------------------------

    /// Hot path: hands out a CLEAN block of `key`'s class owned by `ctx`'s tenant, if any.
    #[inline]
    pub(crate) fn pop_clean(
        &mut self,
        key: FreeKey,
        size: u64,
        ctx: &Context,
        stream: StreamHandle,
        isolation: TenantIsolation,
    ) -> Option<u64> {
        if self.reset {
            return None;
        }
        let addr = self.free_lists.get_mut(&key)?.pop()?;
        let block = self.blocks.get_mut(&addr)?;
        // Invariant 1 and 4: only CLEAN blocks are ever on a free list. Strict isolation also
        // compares the tenant ids themselves, so a tenant-hash collision is a miss, not a leak.
        // A class's blocks all hold its capacity, which holds `size`; checked all the same,
        // since a block too small would be written past its end.
        if block.state != BlockState::Clean
            || (isolation == TenantIsolation::Strict && block.owner.tenant_id() != ctx.tenant_id())
            || block.capacity() < size
        {
            return self.pop_clean_mismatch(key, addr);
        }
        self.hand_out(addr, size, ctx, stream)
    }

    /// A CLEAN block sized to its request ([`SizeClass::exact`]) of `key`'s tenant that holds
    /// `size` bytes and at most `most` (the capacity of `size`'s class: no more is wasted than
    /// the class would), taken off its free list and handed out as [`Self::pop_clean`] does.
    /// Only the slow path looks: such blocks come from allocations the device could not hold
    /// at their class's capacity.
    pub(crate) fn pop_exact(
        &mut self,
        key: FreeKey,
        size: u64,
        most: u64,
        ctx: &Context,
        stream: StreamHandle,
        isolation: TenantIsolation,
    ) -> Option<u64> {
        if self.reset {
            return None;
        }
        let key = FreeKey {
            class: EXACT_INDEX,
            ..key
        };
        let blocks = &self.blocks;
        let list = self.free_lists.get_mut(&key)?;
        let i = list.iter().position(|addr| {
            blocks.get(addr).is_some_and(|b| {
                b.state == BlockState::Clean
                    && (size..=most).contains(&b.capacity())
                    && (isolation == TenantIsolation::Off || b.owner.tenant_id() == ctx.tenant_id())
            })
        })?;
        let addr = list.remove(i);
        self.hand_out(addr, size, ctx, stream)
    }

    /// Makes CLEAN block `addr`, just taken off its free list, LIVE for `ctx`.
    fn hand_out(
        &mut self,
        addr: u64,
        size: u64,
        ctx: &Context,
        stream: StreamHandle,
    ) -> Option<u64> {
        let block = self.blocks.get_mut(&addr)?;
        let capacity = block.capacity();
        block.state = BlockState::Live;
        block.requested = size;
        block.owner = ctx.clone();
        block.alloc_stream = stream;
        block.recorded_streams.clear();
        block.reuse_count = block.reuse_count.saturating_add(1);
        block.live_ttl_reported = false;
        let now = Instant::now();
        block.allocated_at = now;
        block.state_since = now;
        self.stats.counters.allocations += 1;
        self.stats.counters.pool_hits += 1;
        let (from, to) = (Some(BlockState::Clean), Some(BlockState::Live));
        self.moved(from, to, capacity, size, true);
        Some(addr)
    }

    #[cold]
    fn pop_clean_mismatch(&mut self, key: FreeKey, addr: u64) -> Option<u64> {
        // Put the block back where it belongs and report a miss; the caller allocates fresh.
        if self
            .blocks
            .get(&addr)
            .is_some_and(|b| b.state == BlockState::Clean)
        {
            self.free_lists.entry(key).or_default().insert(0, addr);
        }
        None
    }

    /// Adds a fresh, zeroed block as LIVE. Once the device is reset it is not added (its
    /// memory goes with the reset): `false`.
    #[must_use]
    pub(crate) fn insert_fresh(&mut self, block: Block) -> bool {
        if self.reset {
            return false;
        }
        let capacity = block.capacity();
        self.stats.counters.allocations += 1;
        self.stats.counters.pool_misses += 1;
        self.obtained(capacity);
        self.moved(
            None,
            Some(BlockState::Live),
            capacity,
            block.requested,
            true,
        );
        self.blocks.insert(block.addr, block);
        true
    }

    /// A block of `capacity` bytes obtained from the backend enters the pool: counted as
    /// fresh memory, and as a device allocation in PyTorch's statistics.
    fn obtained(&mut self, capacity: u64) {
        self.stats.counters.fresh_allocations += 1;
        self.stats.counters.bytes_allocated_fresh += capacity;
        self.memory.num_device_alloc += 1;
    }

    /// Fresh memory whose zeroing a CUDA graph capture refused (one begun since the capture
    /// query): giving it back now would call `cuMemFree`, a device synchronisation that the
    /// capture forbids. Kept instead as a PENDING block that nobody was handed, its scrub
    /// queued on `stream` (deferred, as every scrub is, until the capture ends); once that
    /// scrub verifies it joins the free lists CLEAN. Counted as fresh memory from the backend,
    /// not as an allocation or a free.
    #[cold]
    pub(crate) fn insert_unzeroed(
        &mut self,
        mut block: Block,
        seq: u64,
        backend: &dyn Backend,
        config: &Config,
        after: &mut Aftermath,
    ) {
        let capacity = block.capacity();
        let (addr, stream) = (block.addr, block.free_stream);
        block.state = BlockState::Pending;
        block.scrub_seq = seq;
        // Nobody's data was ever in it: it may be handed out (once) under any reuse policy,
        // as any fresh memory is.
        block.disposition = Disposition::Reuse;
        // Handed out never: what tells it from a freed block (no free-to-clean latency, not
        // left unscrubbed at exit). Its first hand-out, from the free list, counts it once.
        block.reuse_count = 0;
        self.obtained(capacity);
        self.moved(
            None,
            Some(BlockState::Pending),
            capacity,
            block.requested,
            false,
        );
        self.blocks.insert(addr, block);
        self.enqueue(addr, stream, backend, config, after);
    }

    /// Whether batches of this pool are on the device (in flight here, or being waited on by
    /// another thread): each holds a batch slot, given back when it completes.
    pub(crate) fn holds_batch_slots(&self) -> bool {
        !self.in_flight.is_empty() || !self.out_of_pool.is_empty()
    }

    /// Whether the pool has work that could produce CLEAN blocks (open or in-flight scrubs).
    pub(crate) fn has_pending_work(&self) -> bool {
        !self.open.is_empty() || !self.in_flight.is_empty() || !self.rescrub_waiting.is_empty()
    }

    // ----- free -----------------------------------------------------------------------------

    /// Looks up `addr` for a free on this device and moves it LIVE → PENDING (its scrub
    /// sequence number becomes `seq`). Returns whether the caller's size differed from the
    /// block table's.
    pub(crate) fn begin_free(
        &mut self,
        addr: u64,
        claimed_size: i64,
        stream: StreamHandle,
        seq: u64,
        config: &Config,
        after: &mut Aftermath,
    ) -> Result<bool, Refused> {
        let Some(block) = self.blocks.get_mut(&addr) else {
            return Err(self.refuse(addr));
        };
        if block.state != BlockState::Live {
            return Err(self.refuse(addr));
        }
        let now = Instant::now();
        let capacity = block.capacity();
        // Invariant 7: the caller's size is not trusted; a mismatch is reported, the table wins.
        let size_mismatch = claimed_size != block.requested as i64;
        if size_mismatch {
            self.stats.counters.size_mismatches += 1;
            after.event(
                EventKind::SizeMismatch {
                    claimed: claimed_size,
                    caller: Context::current(),
                },
                block,
            );
        }
        let age_ms = now.duration_since(block.allocated_at).as_millis() as u64;
        if config.live_ttl_ms > 0 && age_ms > config.live_ttl_ms && !block.live_ttl_reported {
            self.stats.counters.ttl_exceeded += 1;
            let kind = EventKind::TtlExceeded {
                which: TtlKind::Live,
                age_ms,
                limit_ms: config.live_ttl_ms,
            };
            after.event(kind, block);
        }
        block.disposition = if !config.reuse_enabled() {
            Disposition::Quarantine(QuarantineReason::NeverReusePolicy)
        } else if block.ipc_exported {
            // Another process may still map it: scrubbed and verified, then back to the
            // driver, whose next allocation there gets a new export handle.
            Disposition::Retire(ReleaseReason::IpcExported)
        } else if config.max_reuse > 0 && block.reuse_count >= config.max_reuse {
            Disposition::Retire(ReleaseReason::MaxReuse)
        } else {
            Disposition::Reuse
        };
        // Invariant 2: the scrub runs on the freeing stream after the allocation stream and
        // every recorded stream.
        let mut waits = std::mem::take(&mut block.recorded_streams);
        waits.push(block.alloc_stream);
        waits.retain(|&w| w != stream);
        block.state = BlockState::Pending;
        block.state_since = now;
        block.scrub_seq = seq;
        block.free_stream = stream;
        block.recorded_streams = waits;
        let requested = block.requested;
        self.stats.counters.frees += 1;
        let (from, to) = (Some(BlockState::Live), Some(BlockState::Pending));
        self.moved(from, to, capacity, requested, true);
        Ok(size_mismatch)
    }

    /// Refuses (counts, and names why) a free of `addr` unless it is the start of a LIVE
    /// block, which a free would accept: then the size its caller asked for.
    pub(crate) fn refuse_unless_live(&mut self, addr: u64) -> Result<u64, Refused> {
        match self.blocks.get(&addr) {
            Some(b) if b.state == BlockState::Live => Ok(b.requested),
            // Freed by a device reset on its holder's behalf, held or since returned to the
            // device: the holder's free of it is accepted (once, by `Allocator::free`).
            _ => match self.freed_by_reset_requested(addr) {
                Some(requested) => Ok(requested),
                None => Err(self.refuse(addr)),
            },
        }
    }

    #[cold]
    fn refuse(&mut self, addr: u64) -> Refused {
        self.stats.counters.invalid_frees += 1;
        if let Some(b) = self.blocks.get(&addr) {
            // Exact match that is not LIVE: already freed.
            return Refused {
                reason: InvalidFreeReason::DoubleFree,
                block: Some(b.to_ref()),
                owner: Some(b.owner.clone()),
            };
        }
        match self.blocks.range(..addr).next_back() {
            Some((&base, b)) if addr < base + b.capacity() => Refused {
                reason: InvalidFreeReason::InteriorPointer,
                block: Some(b.to_ref()),
                owner: Some(b.owner.clone()),
            },
            _ => Refused {
                reason: InvalidFreeReason::UnknownPointer,
                block: None,
                owner: None,
            },
        }
    }

    /// The block of this pool `addr` lies in (its start or inside it; any state), with its
    /// owner's ids.
    pub(crate) fn holding(&self, addr: u64) -> Option<(crate::events::BlockRef, Context)> {
        self.blocks
            .range(..=addr)
            .next_back()
            .filter(|(&base, b)| addr < base.saturating_add(b.capacity()))
            .map(|(_, b)| (b.to_ref(), b.owner.clone()))
    }

    /// Adds a PENDING block to its stream's open batch; submits the batch when full.
    pub(crate) fn enqueue(
        &mut self,
        addr: u64,
        stream: StreamHandle,
        backend: &dyn Backend,
        config: &Config,
        after: &mut Aftermath,
    ) {
        let waits = self
            .blocks
            .get(&addr)
            .map(|b| b.recorded_streams.clone())
            .unwrap_or_default();
        // A batch that was deferred (a graph capture, no memory for its slot) and reopened
        // is joined only up to the batch size: one that grew past it while it waited might
        // need a larger slot than the device can still make.
        let has_room = |o: &OpenBatch| o.stream == stream && o.blocks.len() < config.batch_size;
        let i = match self.open.iter().position(has_room) {
            Some(i) => i,
            None => {
                self.open.push(OpenBatch {
                    stream,
                    opened_at: Instant::now(),
                    blocks: Vec::with_capacity(config.batch_size),
                    waits: Vec::new(),
                    deferred: None,
                });
                self.open.len() - 1
            }
        };
        let batch = &mut self.open[i];
        batch.blocks.push(addr);
        for w in waits {
            if !batch.waits.contains(&w) {
                batch.waits.push(w);
            }
        }
        if batch.blocks.len() >= config.batch_size || config.batch_max_delay_us == 0 {
            let batch = self.open.swap_remove(i);
            self.submit_open(batch, backend, config, after);
        }
    }

    /// Submits open batches: all of them, or only those older than the configured delay.
    pub(crate) fn flush_open(
        &mut self,
        only_stale: bool,
        backend: &dyn Backend,
        config: &Config,
        after: &mut Aftermath,
    ) {
        let now = Instant::now();
        let max_age = std::time::Duration::from_micros(config.batch_max_delay_us);
        // Take the list first: a submission deferred by a graph capture reopens its batch,
        // which must wait for a later flush rather than be retried in this loop.
        let (due, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut self.open)
            .into_iter()
            .partition(|b| !only_stale || now.duration_since(b.opened_at) >= max_age);
        self.open = keep;
        for batch in due {
            self.submit_open(batch, backend, config, after);
        }
    }

    /// Whether anything on this device names `stream`: an open batch (running on it or
    /// waiting for it) or a block (allocated, freed or recorded on it).
    pub(crate) fn uses_stream(&self, stream: StreamHandle) -> bool {
        self.open
            .iter()
            .any(|b| b.stream == stream || b.waits.contains(&stream))
            || self.blocks.values().any(|b| {
                b.alloc_stream == stream
                    || b.free_stream == stream
                    || b.recorded_streams.contains(&stream)
            })
    }

    /// [`super::Allocator::forget_stream`] and [`super::Allocator::forget_unwaited_stream`]
    /// on this device: submits (under [`Forget::Submitted`]) the open batches on `stream` or
    /// waiting for it, then replaces every reference to it.
    pub(crate) fn forget_stream(
        &mut self,
        stream: StreamHandle,
        how: Forget,
        backend: &dyn Backend,
        config: &Config,
        after: &mut Aftermath,
    ) {
        const LEGACY: StreamHandle = StreamHandle(0);
        if how == Forget::Submitted {
            let (due, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut self.open)
                .into_iter()
                .partition(|b| b.stream == stream || b.waits.contains(&stream));
            self.open = keep;
            for batch in due {
                self.submit_open(batch, backend, config, after);
            }
        }
        // A wait for the stream is dropped when its work is done; otherwise the legacy
        // stream stands in for it (which orders after a blocking stream's work).
        let stand_in = (how == Forget::Unwaited).then_some(LEGACY);
        // Left open: deferred by a capture, or not submitted (exit has begun, or the
        // stream's work was not waited for).
        for batch in &mut self.open {
            if batch.stream == stream {
                batch.stream = LEGACY;
            }
            let own = batch.stream;
            replace_wait(&mut batch.waits, stream, stand_in);
            batch.waits.retain(|&w| w != own);
        }
        for block in self.blocks.values_mut() {
            if block.alloc_stream == stream {
                block.alloc_stream = LEGACY;
            }
            if block.free_stream == stream {
                block.free_stream = LEGACY;
            }
            // A freed block's recorded streams are the waits of its scrub on its freeing
            // stream, which need not wait for itself.
            let own = (block.state != BlockState::Live).then_some(block.free_stream);
            let stand_in = stand_in.filter(|&s| Some(s) != own);
            replace_wait(&mut block.recorded_streams, stream, stand_in);
        }
    }

    fn submit_open(
        &mut self,
        batch: OpenBatch,
        backend: &dyn Backend,
        config: &Config,
        after: &mut Aftermath,
    ) {
        let options = ScrubOptions {
            samples: config.verify_samples,
            full_verify: config.full_verify,
            double_pass: config.double_pass,
        };
        self.submit(
            batch.stream,
            batch.waits,
            batch.blocks,
            options,
            false,
            backend,
            config,
            after,
        );
    }

    /// Submits a scrub of `addrs` (all PENDING or QUARANTINED) on `stream`.
    #[allow(clippy::too_many_arguments)]
    fn submit(
        &mut self,
        stream: StreamHandle,
        waits: Vec<StreamHandle>,
        addrs: Vec<u64>,
        options: ScrubOptions,
        rescrub: bool,
        backend: &dyn Backend,
        config: &Config,
        after: &mut Aftermath,
    ) {
        // Invariant 6. A thread that waited for a batch while exit began applies its results
        // afterwards (no backend call), and a flush may race `begin_exit`: what they would
        // submit (a re-scrub of a block quarantined there, an open batch) is abandoned, its
        // blocks left PENDING or QUARANTINED, never handed out.
        if self.exiting.load(Ordering::Acquire) {
            return;
        }
        let mut segments = Vec::with_capacity(addrs.len());
        let mut blocks = Vec::with_capacity(addrs.len());
        for addr in addrs {
            if let Some(b) = self.blocks.get_mut(&addr).filter(|b| !b.scrub_in_flight) {
                b.scrub_in_flight = true;
                segments.push(ScrubSegment {
                    addr,
                    len: b.capacity(),
                    seed: b.scrub_seq,
                });
                blocks.push((addr, b.scrub_seq));
            }
        }
        if segments.is_empty() {
            return;
        }
        let batch = ScrubBatch {
            device: self.device,
            stream,
            wait_streams: waits,
            segments,
            options,
        };
        let waits = batch.wait_streams.clone();
        // SAFETY: 1. the segments are blocks of this pool on this device, each a whole
        // allocation of the backend's (PENDING, or QUARANTINED for a re-scrub), released only
        // after their ticket completed; 2. a freed block is written by nothing until it is
        // handed out again, which needs this scrub verified first; 3. the streams are the
        // blocks' (caller's contract: valid until this submission, or forgotten before it,
        // `forget_stream`, which submits their batches first, or `forget_unwaited_stream`,
        // which moves them to the legacy stream). A backend that panics
        // answers an error here (`PanicSafe`): the blocks are never left marked in flight
        // in no batch.
        match unsafe { backend.submit_scrub(batch) } {
            Ok(ticket) => {
                self.stats.counters.scrub_batches += 1;
                self.in_flight.push_back(InFlight {
                    ticket,
                    blocks,
                    options,
                    rescrub,
                    stream,
                });
            }
            Err(BackendError::StreamCapturing {
                stream: capturing, ..
            }) => {
                let why = Deferral::Capture { stream: capturing };
                self.defer(stream, waits, &blocks, rescrub, why)
            }
            // No memory for the batch's own buffers (its slot): nothing was queued, so the
            // blocks were not scrubbed and not read back either. They stay PENDING, out of every
            // free list, and are submitted again later, as under a graph capture; a failed
            // verification would quarantine them, and their re-scrub would meet the same
            // shortage and condemn them for good.
            // (A shortage, not a fault: `scrubs_deferred` counts it, not `backend_errors`.)
            Err(BackendError::OutOfMemory { device, requested }) => {
                let why = Deferral::OutOfMemory { device, requested };
                self.defer(stream, waits, &blocks, rescrub, why)
            }
            // Exit has begun: leave the blocks PENDING (still marked in flight, so nothing
            // releases or reuses them); no event, no failure.
            Err(BackendError::ShuttingDown) => {}
            Err(e) => {
                let batch = Unverified {
                    blocks: &blocks,
                    options,
                    rescrub,
                };
                self.fail_batch(batch, Outcome::NotQueued, e, config, after)
            }
        }
    }

    /// The batch cannot be queued now (its stream is capturing a CUDA graph, or there is no
    /// memory for its buffers). The blocks stay PENDING (or QUARANTINED) and out of every
    /// free list; the batch is reopened and retried by the flusher once its delay has passed
    /// again, i.e. after the capture ends or memory is freed.
    #[cold]
    fn defer(
        &mut self,
        stream: StreamHandle,
        waits: Vec<StreamHandle>,
        blocks: &[(u64, u64)],
        rescrub: bool,
        why: Deferral,
    ) {
        self.stats.counters.scrubs_deferred += blocks.len() as u64;
        for (addr, _) in blocks {
            if let Some(b) = self.blocks.get_mut(addr) {
                b.scrub_in_flight = false;
            }
        }
        if rescrub {
            // `submit_rescrubs` picks them up again on the next tick.
            self.rescrub_waiting
                .extend(blocks.iter().map(|&(addr, _)| addr));
            // The first refusal since the re-scrubs were last submitted is the one a waiting
            // caller is told of (as for open batches, the first one's).
            self.rescrub_deferred.get_or_insert(why);
            return;
        }
        self.open.push(OpenBatch {
            stream,
            opened_at: Instant::now(),
            blocks: blocks.iter().map(|&(addr, _)| addr).collect(),
            waits,
            deferred: Some(why),
        });
    }

    /// A batch that could not be submitted or completed fails closed: every block in it is
    /// treated as unverified (no sample read back) and quarantined.
    #[cold]
    fn fail_batch(
        &mut self,
        batch: Unverified<'_>,
        outcome: Outcome,
        error: BackendError,
        config: &Config,
        after: &mut Aftermath,
    ) {
        self.stats.counters.backend_errors += 1;
        let Unverified {
            blocks,
            options,
            rescrub,
        } = batch;
        let results = vec![SegmentResult::default(); blocks.len()];
        // The batch's own options: its `verify_failed` records say what it had to check.
        self.apply_results(blocks, &results, options, rescrub, outcome, config, after);
        after.backend_error = Some(error);
    }

    // ----- harvest --------------------------------------------------------------------------

    /// Applies every in-flight batch that has completed (non-blocking). Batches on one stream
    /// complete in order, so only the oldest incomplete batch of each stream is polled: a
    /// device running behind the host costs one driver query per stream, not one per batch.
    pub(crate) fn harvest(
        &mut self,
        backend: &dyn Backend,
        config: &Config,
        after: &mut Aftermath,
    ) {
        let mut blocked: Vec<StreamHandle> = Vec::new();
        let mut i = 0;
        while i < self.in_flight.len() {
            let stream = self.in_flight[i].stream;
            if blocked.contains(&stream) {
                i += 1;
                continue;
            }
            let polled = self.in_flight[i].ticket.poll();
            let results = match polled {
                Ok(None) => {
                    blocked.push(stream);
                    i += 1;
                    continue;
                }
                Ok(Some(results)) => Ok(results),
                Err(e) => Err(e),
            };
            if let Some(done) = self.in_flight.remove(i) {
                self.complete(done, results, backend, config, after);
            }
        }
    }

    /// Takes the in-flight batch holding scrub `seq` out (if it is still here), to be waited
    /// on with the lock released.
    pub(crate) fn take_batch_holding(&mut self, seq: u64) -> Option<InFlight> {
        let i = self.in_flight.iter().position(|f| f.contains_seq(seq))?;
        let batch = self.in_flight.remove(i)?;
        self.out_of_pool.push(batch.oldest_seq());
        Some(batch)
    }

    /// Takes out every in-flight batch that holds a block freed before scrub sequence
    /// `horizon`, and the first `newer` (oldest first) of those of later frees, to be waited
    /// on with the lock released; also returns how many of the later ones it took. The other
    /// batches of later frees stay for the flusher.
    pub(crate) fn take_batches_before(
        &mut self,
        horizon: u64,
        newer: usize,
    ) -> (Vec<InFlight>, usize) {
        let mut newer_taken = 0;
        let (taken, kept): (VecDeque<InFlight>, VecDeque<InFlight>) =
            std::mem::take(&mut self.in_flight)
                .into_iter()
                .partition(|f| {
                    if f.oldest_seq() < horizon {
                        return true;
                    }
                    let take = newer_taken < newer;
                    newer_taken += usize::from(take);
                    take
                });
        self.in_flight = kept;
        self.out_of_pool
            .extend(taken.iter().map(InFlight::oldest_seq));
        (taken.into(), newer_taken)
    }

    /// `batch`, taken by one of the `take_*` calls above, comes back to be applied.
    pub(crate) fn returned(&mut self, batch: &InFlight) {
        let oldest = batch.oldest_seq();
        if let Some(i) = self.out_of_pool.iter().position(|&s| s == oldest) {
            self.out_of_pool.swap_remove(i);
        }
    }

    /// `batch`, taken out but not waited on (the thread that took it unwound first), goes
    /// back to the in-flight queue, where another thread or the flusher applies it.
    pub(crate) fn put_back(&mut self, batch: InFlight) {
        self.returned(&batch);
        self.in_flight.push_front(batch);
    }

    /// Whether another thread is waiting, with the lock dropped, on a batch that holds a
    /// block freed before scrub sequence `horizon`.
    pub(crate) fn held_elsewhere_before(&self, horizon: u64) -> bool {
        self.out_of_pool.iter().any(|&s| s < horizon)
    }

    /// Why the scrub of the block at `addr` was refused for now, as the error a caller waiting
    /// for it is given: `None` unless the block is in an open batch the backend refused.
    pub(crate) fn deferral_of(&self, addr: u64, what: &'static str) -> Option<BackendError> {
        self.open
            .iter()
            .find(|o| o.blocks.contains(&addr))
            .and_then(|o| Some(o.deferred?.error(what)))
    }

    /// The freed blocks whose scrub, and the quarantined blocks whose re-scrub, the backend
    /// refused for now, and why the first of them waits: what `synchronize` could not wait
    /// for (it submits both again first, so what is left was refused again).
    /// (Fresh memory nobody was handed, kept by `insert_unzeroed`, is not a freed block.)
    pub(crate) fn deferred(&self, what: &'static str) -> Option<(usize, BackendError)> {
        let freed = |addrs: &[u64]| {
            addrs
                .iter()
                .filter(|a| self.blocks.get(a).is_some_and(|b| !b.never_handed_out()))
                .count()
        };
        let refused: Vec<(&OpenBatch, usize)> = self
            .open
            .iter()
            .filter(|o| o.deferred.is_some())
            .map(|o| (o, freed(&o.blocks)))
            .filter(|&(_, n)| n > 0)
            .collect();
        let rescrubs = match self.rescrub_deferred {
            Some(_) => freed(&self.rescrub_waiting),
            None => 0,
        };
        let blocks = refused.iter().map(|(_, n)| n).sum::<usize>() + rescrubs;
        let why = match (refused.first(), self.rescrub_deferred) {
            (Some((o, _)), _) => o.deferred.map(|d| d.error(what)),
            (None, Some(d)) if rescrubs > 0 => Some(d.error("a quarantined block's re-scrub")),
            _ => None,
        }?;
        Some((blocks, why))
    }

    /// Asks for the outcome of scrub `seq` to be kept for [`DevicePool::take_outcome`].
    pub(crate) fn watch(&mut self, seq: u64) {
        self.watched.insert(seq, None);
    }

    pub(crate) fn unwatch(&mut self, seq: u64) {
        self.watched.remove(&seq);
    }

    /// The outcome of watched scrub `seq` once applied (`Some(passed)`), forgetting it; `None`
    /// while it is still pending.
    pub(crate) fn take_outcome(&mut self, seq: u64) -> Option<bool> {
        let outcome = *self.watched.get(&seq)?;
        if outcome.is_some() {
            self.watched.remove(&seq);
        }
        outcome
    }

    /// Submits the open batch holding `addr` now (for `kvh_free_checked`).
    pub(crate) fn flush_block(
        &mut self,
        addr: u64,
        backend: &dyn Backend,
        config: &Config,
        after: &mut Aftermath,
    ) {
        if let Some(i) = self.open.iter().position(|o| o.blocks.contains(&addr)) {
            let batch = self.open.swap_remove(i);
            self.submit_open(batch, backend, config, after);
        }
    }

    /// Applies a batch waited on elsewhere.
    pub(crate) fn complete(
        &mut self,
        done: InFlight,
        results: Result<Vec<SegmentResult>, BackendError>,
        backend: &dyn Backend,
        config: &Config,
        after: &mut Aftermath,
    ) {
        match results {
            // Exit has begun: the batch is abandoned, its blocks stay out of use (leaked), and
            // nothing is reported as a verification failure.
            Err(BackendError::ShuttingDown) => return,
            Ok(r) if r.len() == done.blocks.len() => {
                let (blocks, options) = (&done.blocks, done.options);
                self.apply_results(
                    blocks,
                    &r,
                    options,
                    done.rescrub,
                    Outcome::Ran,
                    config,
                    after,
                )
            }
            Ok(r) => {
                let e = BackendError::Other(format!(
                    "scrub returned {} results for {} segments",
                    r.len(),
                    done.blocks.len()
                ));
                let lost = Outcome::Unknown;
                self.fail_batch(done.unverified(), lost, e, config, after)
            }
            Err(e) => {
                let lost = Outcome::Unknown;
                self.fail_batch(done.unverified(), lost, e, config, after)
            }
        }
        // Re-scrubs of blocks quarantined above go out at once: quarantine is rare and the
        // sooner a block is cleared, the sooner its memory returns.
        self.submit_rescrubs(backend, config, after);
    }

    /// Moves each block of a completed batch to its next state.
    #[allow(clippy::too_many_arguments)] // one call site per outcome; a struct would only rename them
    fn apply_results(
        &mut self,
        blocks: &[(u64, u64)],
        results: &[SegmentResult],
        options: ScrubOptions,
        rescrub: bool,
        outcome: Outcome,
        config: &Config,
        after: &mut Aftermath,
    ) {
        let now = Instant::now();
        for (&(addr, seq), &result) in blocks.iter().zip(results) {
            let Some(block) = self.blocks.get_mut(&addr) else {
                continue;
            };
            if block.scrub_seq != seq || !block.scrub_in_flight {
                continue; // Not the scrub this block is waiting for (defensive).
            }
            block.scrub_in_flight = false;
            let block = &self.blocks[&addr];
            let capacity = block.capacity();
            let expected = verify::expected_samples(capacity, options.samples, options.full_verify);
            let passed = verify::passes(result, expected, config.coverage_threshold);
            if !rescrub {
                if let Some(slot) = self.watched.get_mut(&seq) {
                    // A checked free succeeds only for a scrub that verified with no residue:
                    // a block quarantined for residue (below) did not come back clean.
                    *slot = Some(passed && result.nonzero == 0);
                }
            }
            let c = &mut self.stats.counters;
            // The scrub counters count work the device was given, and zeroed.
            if outcome != Outcome::NotQueued {
                c.scrubs += 1;
            }
            if outcome == Outcome::Ran {
                c.bytes_scrubbed += capacity;
            }
            if result.nonzero > 0 {
                c.residue_detected += 1;
            }
            if passed {
                c.verifications_passed += 1;
            } else {
                c.verifications_failed += 1;
                after.event(
                    EventKind::VerifyFailed {
                        samples_expected: expected,
                        samples_checked: result.checked,
                        samples_nonzero: result.nonzero,
                        coverage: verify::coverage(result),
                        threshold: config.coverage_threshold,
                    },
                    block,
                );
                if config.failure_mode == crate::config::FailureMode::Abort {
                    after.abort.get_or_insert_with(|| block.owner.clone());
                }
            }
            // Free → CLEAN: recorded below for the blocks that become CLEAN only, and only
            // for freed ones (not fresh memory nobody was handed, `insert_unzeroed`).
            let freed = !block.never_handed_out();
            let latency = (!rescrub && outcome == Outcome::Ran && freed)
                .then(|| now.duration_since(block.state_since).as_micros() as u64);
            // A sample that read non-zero means something wrote to the block after it was
            // freed. Even when coverage passes the threshold, such a block is never handed out
            // again or released as clean (invariant 1): it goes to quarantine.
            let residue = result.nonzero > 0;
            if residue && passed && config.failure_mode == crate::config::FailureMode::Abort {
                // Residue fails the control as a failed verification does (a checked free
                // reports it as one, and a KV scrub aborts on it): fail closed here too.
                after.abort.get_or_insert_with(|| block.owner.clone());
            }
            match (rescrub, passed, block.disposition) {
                (false, true, _) if residue => {
                    self.quarantine(addr, QuarantineReason::Residue, after)
                }
                (true, true, _) if residue => {
                    self.condemn(addr, QuarantineReason::RescrubResidue, after)
                }
                (false, true, Disposition::Reuse) => {
                    self.make_clean(addr, now, config.tenant_isolation);
                    if let Some(latency) = latency {
                        self.stats.record_scrub_latency(latency);
                    }
                }
                (false, true, Disposition::Retire(reason)) => {
                    self.release(addr, reason, after);
                }
                (false, true, Disposition::Quarantine(reason)) => {
                    self.quarantine(addr, reason, after)
                }
                (false, false, _) => self.quarantine(addr, QuarantineReason::VerifyFailed, after),
                (true, true, _) => {
                    self.release(addr, ReleaseReason::QuarantineCleared, after);
                }
                (true, false, _) => self.condemn(addr, QuarantineReason::RescrubFailed, after),
            }
        }
    }

    fn make_clean(&mut self, addr: u64, now: Instant, isolation: TenantIsolation) {
        let Some(block) = self.blocks.get_mut(&addr) else {
            return;
        };
        block.state = BlockState::Clean;
        block.state_since = now;
        let key = FreeKey::new(block.class, &block.owner, isolation);
        let (capacity, requested) = (block.capacity(), block.requested);
        let handed_out = !block.never_handed_out();
        let (from, to) = (Some(BlockState::Pending), Some(BlockState::Clean));
        self.moved(from, to, capacity, requested, handed_out);
        self.free_lists.entry(key).or_default().push(addr);
    }

    fn quarantine(&mut self, addr: u64, reason: QuarantineReason, after: &mut Aftermath) {
        let Some(block) = self.blocks.get_mut(&addr) else {
            return;
        };
        let capacity = block.capacity();
        block.state = BlockState::Quarantined;
        block.state_since = Instant::now();
        block.disposition = Disposition::Quarantine(reason);
        let (requested, handed_out) = (block.requested, !block.never_handed_out());
        self.stats.counters.quarantined += 1;
        let (from, to) = (Some(BlockState::Pending), Some(BlockState::Quarantined));
        self.moved(from, to, capacity, requested, handed_out);
        self.rescrub_waiting.push(addr);
        let block = &self.blocks[&addr];
        let event = EventKind::Quarantined {
            reason,
            retired_before: false,
        };
        after.event(event, block);
    }

    /// A quarantined block whose re-scrub failed (`RescrubFailed`, or `RescrubResidue` when it
    /// read residue) stays quarantined for the life of the process.
    #[cold]
    fn condemn(&mut self, addr: u64, reason: QuarantineReason, after: &mut Aftermath) {
        let Some(block) = self.blocks.get_mut(&addr) else {
            return;
        };
        let retired_before = matches!(
            block.disposition,
            Disposition::Quarantine(QuarantineReason::NeverReusePolicy)
        );
        block.disposition = Disposition::Quarantine(reason);
        self.stats.counters.rescrub_failed += 1;
        let block = &self.blocks[&addr];
        let event = EventKind::Quarantined {
            reason,
            retired_before,
        };
        after.event(event, block);
    }

    /// Queues a double-pass, fully verified re-scrub for every quarantined block awaiting one
    /// (a condemned one never is).
    pub(crate) fn submit_rescrubs(
        &mut self,
        backend: &dyn Backend,
        config: &Config,
        after: &mut Aftermath,
    ) {
        if self.rescrub_waiting.is_empty() {
            return;
        }
        // Submitted again below: a refusal now says why again.
        self.rescrub_deferred = None;
        let blocks = &self.blocks;
        let waiting: Vec<u64> = std::mem::take(&mut self.rescrub_waiting)
            .into_iter()
            .filter(|a| {
                blocks.get(a).is_some_and(|b| {
                    b.state == BlockState::Quarantined
                        && !b.scrub_in_flight
                        && matches!(b.disposition, Disposition::Quarantine(r) if !condemned(r))
                })
            })
            .collect();
        if waiting.is_empty() {
            return;
        }
        let options = ScrubOptions {
            samples: config.verify_samples,
            full_verify: true,
            double_pass: true,
        };
        // Batches per freeing stream, ordered after the same streams as the first scrub
        // (which may never have run, if its submission failed).
        let mut groups: Vec<(StreamHandle, Vec<StreamHandle>, Vec<u64>)> = Vec::new();
        for addr in waiting {
            let b = &self.blocks[&addr];
            let i = match groups.iter().position(|g| g.0 == b.free_stream) {
                Some(i) => i,
                None => {
                    groups.push((b.free_stream, Vec::new(), Vec::new()));
                    groups.len() - 1
                }
            };
            for w in &b.recorded_streams {
                if !groups[i].1.contains(w) {
                    groups[i].1.push(*w);
                }
            }
            groups[i].2.push(addr);
        }
        // At most the batch size each, as open batches: a larger one might need a larger
        // batch slot than a full device can still make.
        for (stream, waits, addrs) in groups {
            for chunk in addrs.chunks(config.batch_size.max(1)) {
                let (waits, chunk) = (waits.clone(), chunk.to_vec());
                self.submit(stream, waits, chunk, options, true, backend, config, after);
            }
        }
    }

    /// Removes a verified block from the pool; the allocator hands its memory back to the
    /// backend after dropping the lock.
    ///
    /// Once exit has begun nothing goes back to the backend (invariant 6): the block stays
    /// in the table, in its state, so that the pool still accounts for the bytes the backend
    /// holds, and nothing counts or records it as released. A block verified for retirement
    /// stays PENDING, out of every free list: leaked with the blocks whose scrub never ran.
    /// Exit may also begin after this and before the backend call: the allocator then puts
    /// the block back. Returns whether the block left the pool.
    fn release(&mut self, addr: u64, reason: ReleaseReason, after: &mut Aftermath) -> bool {
        // Never release memory a scrub may still be writing.
        if self.blocks.get(&addr).is_none_or(|b| b.scrub_in_flight) {
            return false;
        }
        if self.exiting.load(Ordering::Acquire) {
            return false;
        }
        let Some(block) = self.blocks.remove(&addr) else {
            return false;
        };
        gauge(&mut self.stats.accounting, block.state).sub(block.capacity());
        // PyTorch's figures count it until the backend call ends (`released`).
        count_block(&mut self.in_release, &block, true);
        if block.state != BlockState::Clean {
            self.releasing += 1;
        }
        after.releases.push(Release { block, reason });
        true
    }

    /// `release`, taken out by [`DevicePool::release`], ended: returned, or about to be kept.
    pub(crate) fn release_ended(&mut self, release: &Release) {
        let block = &release.block;
        if block.state != BlockState::Clean {
            self.releasing = self.releasing.saturating_sub(1);
        }
        count_block(&mut self.in_release, block, false);
    }

    /// `release`, taken out by [`DevicePool::release`], went back to the backend (counted), or
    /// the backend refused it (`leaked`: not counted as released); recorded either way. It
    /// leaves PyTorch's figures now, once the backend call ended: a reader never sees the
    /// bytes gone while the backend holds them, nor, when exit overtakes the release
    /// (`keep_unreleased`), a cumulative `freed` taken back.
    pub(crate) fn released(&mut self, release: &Release, leaked: bool, after: &mut Aftermath) {
        count_block(&mut self.memory, &release.block, false);
        if !leaked {
            self.stats.counters.released += 1;
        }
        let kind = EventKind::Released {
            reason: release.reason,
            leaked,
        };
        after.event(kind, &release.block);
    }

    /// `release` could not go back to the backend (exit began after it was taken out): the
    /// block returns to the pool in the state it left it, a CLEAN one to its free list (it
    /// is leaked with the rest at exit, never released).
    pub(crate) fn keep_unreleased(&mut self, release: Release, isolation: TenantIsolation) {
        let block = release.block;
        let capacity = block.capacity();
        if block.state == BlockState::Clean {
            let key = FreeKey::new(block.class, &block.owner, isolation);
            self.free_lists.entry(key).or_default().push(block.addr);
        }
        gauge(&mut self.stats.accounting, block.state).add(capacity);
        // PyTorch's figures never saw it leave (`released`): no segment was returned, nor
        // one obtained again.
        self.blocks.insert(block.addr, block);
    }

    /// Releases `addr`, taken off `key`'s free list, if it is CLEAN; one that stays (exit
    /// began: `release`) goes back on the list, where every CLEAN block must be.
    fn release_listed(
        &mut self,
        key: FreeKey,
        addr: u64,
        reason: ReleaseReason,
        after: &mut Aftermath,
    ) {
        let clean = self
            .blocks
            .get(&addr)
            .is_some_and(|b| b.state == BlockState::Clean);
        if clean && !self.release(addr, reason, after) {
            self.free_lists.entry(key).or_default().push(addr);
        }
    }

    /// Returns every CLEAN block to the backend (`kvh_empty_cache`, out-of-memory recovery).
    pub(crate) fn release_clean(&mut self, why: ReleaseReason, after: &mut Aftermath) {
        let lists: Vec<(FreeKey, Vec<u64>)> = self.free_lists.drain().collect();
        for (key, addrs) in lists {
            for addr in addrs {
                self.release_listed(key, addr, why, after);
            }
        }
    }

    /// Reports each LIVE block whose time since its hand-out exceeds the live TTL, once per
    /// hand-out (the allocator cannot free a live tensor: a block that is never freed would
    /// otherwise never be reported). Its free then does not report it again.
    pub(crate) fn report_live_ttl(&mut self, config: &Config, after: &mut Aftermath) {
        let now = Instant::now();
        for block in self.blocks.values_mut() {
            if block.state != BlockState::Live || block.live_ttl_reported {
                continue;
            }
            let age_ms = now.duration_since(block.allocated_at).as_millis() as u64;
            if age_ms > config.live_ttl_ms {
                block.live_ttl_reported = true;
                self.stats.counters.ttl_exceeded += 1;
                let kind = EventKind::TtlExceeded {
                    which: TtlKind::Live,
                    age_ms,
                    limit_ms: config.live_ttl_ms,
                };
                after.event(kind, block);
            }
        }
    }

    /// Releases CLEAN blocks idle for longer than `ttl`.
    pub(crate) fn trim_idle(&mut self, ttl: std::time::Duration, after: &mut Aftermath) {
        let now = Instant::now();
        let blocks = &self.blocks;
        let mut stale = Vec::new();
        for (&key, list) in self.free_lists.iter_mut() {
            list.retain(|a| {
                let old = blocks
                    .get(a)
                    .is_some_and(|b| now.duration_since(b.state_since) > ttl);
                if old {
                    stale.push((key, *a));
                }
                !old
            });
        }
        for (key, addr) in stale {
            self.release_listed(key, addr, ReleaseReason::IdleTtl, after);
        }
        self.drop_empty_free_lists();
    }

    /// Under strict isolation every tenant id gets free lists of its own: emptied ones are
    /// dropped here, in the flusher's periodic trim, or a server would keep one per id it
    /// ever saw. (Not on the hot path, where a list a hand-out emptied is often filled again
    /// by the next free.)
    pub(crate) fn drop_empty_free_lists(&mut self) {
        self.free_lists.retain(|_, list| !list.is_empty());
    }

    /// Records a stream on a LIVE block. Unknown or non-LIVE pointers are ignored (PyTorch
    /// calls this for blocks of other allocators too); returns whether it was recorded.
    pub(crate) fn record_stream(&mut self, addr: u64, stream: StreamHandle) -> bool {
        // The block containing `addr`, not only one starting there: an engine records the
        // data pointer of a view (a layer's slice of one allocation), and a record that
        // missed would let the block's scrub run while that stream still uses it.
        match containing_mut(&mut self.blocks, addr) {
            Some(b) if b.state == BlockState::Live => {
                if b.alloc_stream != stream && !b.recorded_streams.contains(&stream) {
                    b.recorded_streams.push(stream);
                }
                true
            }
            _ => false,
        }
    }

    /// Marks the block containing `addr` as exported for another process, if it is LIVE:
    /// its next free retires it ([`ReleaseReason::IpcExported`]). The first mark of a
    /// hand-out is counted and recorded (`ipc_export`, with `caller`'s ids); later ones
    /// change nothing. Any address inside the block marks it, as the driver exports the
    /// whole allocation of an interior pointer.
    pub(crate) fn mark_ipc_exported(
        &mut self,
        addr: u64,
        caller: &Context,
        after: &mut Aftermath,
    ) -> Option<Result<BlockSpan, BlockState>> {
        let block = containing_mut(&mut self.blocks, addr)?;
        if block.state != BlockState::Live {
            return Some(Err(block.state));
        }
        if !block.ipc_exported {
            block.ipc_exported = true;
            self.stats.counters.ipc_exported_blocks += 1;
            let kind = EventKind::IpcExport {
                caller: caller.clone(),
            };
            after.event(kind, block);
        }
        Some(Ok(BlockSpan::of(block)))
    }

    /// The LIVE block whose requested bytes contain `[addr, addr + len)`, for a scrub of part
    /// of it (`kvh_scrub_blocks`), with the streams that scrub must wait for: the block's
    /// allocation and recorded streams other than `stream`. Changes nothing.
    pub(crate) fn live_range(
        &self,
        addr: u64,
        len: u64,
        stream: StreamHandle,
    ) -> Option<(crate::events::BlockRef, Vec<StreamHandle>)> {
        let end = addr.checked_add(len)?;
        let (_, b) = self.blocks.range(..=addr).next_back()?;
        let inside = b.state == BlockState::Live && end <= b.addr.saturating_add(b.requested);
        if !inside {
            return None;
        }
        let waits = std::iter::once(b.alloc_stream)
            .chain(b.recorded_streams.iter().copied())
            .filter(|&s| s != stream)
            .collect();
        Some((b.to_ref(), waits))
    }

    // ----- inspection -----------------------------------------------------------------------

    pub(crate) fn block(&self, addr: u64) -> Option<&Block> {
        self.blocks.get(&addr)
    }

    /// The block whose bytes include `addr` (its start or an interior address), any state.
    pub(crate) fn block_containing(&self, addr: u64) -> Option<&Block> {
        self.blocks
            .range(..=addr)
            .next_back()
            .map(|(_, b)| b)
            .filter(|b| addr < b.addr + b.capacity())
    }

    pub(crate) fn blocks(&self) -> impl Iterator<Item = &Block> {
        self.blocks.values()
    }

    /// A block of `capacity` bytes, asked for `requested`, went from state `from` to `to`
    /// (`None`: not in the pool). The one place the per-state accounting and PyTorch's
    /// statistics change with the block table; `keep_unreleased` undoes a release's.
    #[inline]
    fn moved(
        &mut self,
        from: Option<BlockState>,
        to: Option<BlockState>,
        capacity: u64,
        requested: u64,
        handed_out: bool,
    ) {
        if let Some(state) = from {
            gauge(&mut self.stats.accounting, state).sub(capacity);
        }
        if let Some(state) = to {
            gauge(&mut self.stats.accounting, state).add(capacity);
        }
        self.memory.moved(from, to, capacity, requested, handed_out);
    }

    /// Accounting recomputed from the block table (tests compare it with the counters).
    pub(crate) fn recount(&self) -> crate::stats::Accounting {
        let mut a = crate::stats::Accounting::default();
        for b in self.blocks.values() {
            gauge(&mut a, b.state).add(b.capacity());
        }
        a
    }

    /// PyTorch's memory statistics of this device, counters included (`memory_stats.rs`).
    pub(crate) fn memory_stats(&self) -> MemoryStats {
        self.memory
    }

    /// Zeroes the cumulative statistics (`allocated`, `freed`, and the counters).
    pub(crate) fn reset_accumulated_memory(&mut self) {
        self.memory.reset_accumulated();
    }

    /// The memory statistics' current values recomputed from the block table (compared with
    /// the kept ones by `check_consistency`).
    pub(crate) fn recount_memory(&self) -> MemoryStats {
        // The blocks whose release has not ended are still counted (`in_release`).
        let mut m = self.in_release;
        for b in self.blocks.values() {
            count_block(&mut m, b, true);
        }
        m
    }

    /// Blocks on free lists must be exactly the CLEAN blocks (checked by tests).
    pub(crate) fn free_list_is_consistent(&self) -> bool {
        let listed: usize = self.free_lists.values().map(Vec::len).sum();
        let clean = self
            .blocks
            .values()
            .filter(|b| b.state == BlockState::Clean)
            .count();
        listed == clean
            && self.free_lists.values().flatten().all(|a| {
                self.blocks
                    .get(a)
                    .is_some_and(|b| b.state == BlockState::Clean)
            })
    }
}

/// How [`DevicePool::forget_stream`] forgets a stream the caller is destroying.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Forget {
    /// The stream's work was waited for: the open batches naming it are submitted while it
    /// exists, and waits for it are dropped.
    Submitted,
    /// As `Submitted`, but nothing is submitted (exit has begun): the batches stay open.
    Unsubmitted,
    /// The stream's work was not waited for: nothing is submitted, and the legacy stream
    /// stands in for every wait for it.
    Unwaited,
}

/// Removes `stream` from `waits`; when it was there, adds `stand_in` (unless already there).
fn replace_wait(
    waits: &mut Vec<StreamHandle>,
    stream: StreamHandle,
    stand_in: Option<StreamHandle>,
) {
    let before = waits.len();
    waits.retain(|&w| w != stream);
    if let Some(s) = stand_in.filter(|_| waits.len() != before) {
        if !waits.contains(&s) {
            waits.push(s);
        }
    }
}

/// Whether a quarantine reason condemns the block for the life of the process (its re-scrub
/// failed): it is never re-scrubbed again.
fn condemned(reason: QuarantineReason) -> bool {
    matches!(
        reason,
        QuarantineReason::RescrubFailed | QuarantineReason::RescrubResidue
    )
}

/// `block` comes into `stats`' figures (`held`: the pool holds it) or leaves them, in its
/// state.
fn count_block(stats: &mut MemoryStats, block: &Block, held: bool) {
    let state = Some(block.state);
    let (from, to) = if held { (None, state) } else { (state, None) };
    let handed_out = !block.never_handed_out();
    stats.moved(from, to, block.capacity(), block.requested, handed_out);
}

/// The gauge of `accounting` that counts blocks in `state`.
#[inline]
fn gauge(accounting: &mut crate::stats::Accounting, state: BlockState) -> &mut crate::stats::Gauge {
    match state {
        BlockState::Live => &mut accounting.live,
        BlockState::Pending => &mut accounting.pending,
        BlockState::Clean => &mut accounting.clean,
        BlockState::Quarantined => &mut accounting.quarantined,
    }
}

/// The block of `blocks` whose memory holds `addr` (its start or any byte inside), to change
/// it; a free function over the table alone, so that the pool's other fields (its counters)
/// stay usable while the block is borrowed. [`DevicePool::block_containing`] reads it.
fn containing_mut(blocks: &mut BTreeMap<u64, Block>, addr: u64) -> Option<&mut Block> {
    blocks
        .range_mut(..=addr)
        .next_back()
        .map(|(_, b)| b)
        .filter(|b| addr < b.addr + b.capacity())
}

#[cfg(test)]
mod tenant_state_tests {
    use std::time::Duration;

    use crate::alloc::Allocator;
    use crate::backend::host::HostBackend;
    use crate::backend::StreamHandle;
    use crate::config::Config;
    use crate::context::Context;

    /// Under strict isolation each tenant gets free lists of its own. Once a tenant's blocks
    /// have left the pool (here released as idle), nothing of that tenant should stay behind:
    /// a server that sees many tenant ids over its life must not keep one list per id it ever
    /// saw, or its memory and the hot path's map grow without bound.
    #[test]
    fn free_lists_of_tenants_whose_blocks_left_the_pool_are_not_kept() {
        let alloc = Allocator::new(HostBackend::new(), Config::default(), None);
        let s = StreamHandle(0);
        let tenants = 500;
        for i in 0..tenants {
            let ctx = Context::new(Some(&format!("tenant-{i}")), None, None).unwrap();
            Context::set_current(ctx);
            let p = alloc.malloc(4096, 0, s).unwrap();
            alloc.free(p, 4096, 0, s).unwrap();
            alloc.synchronize().unwrap();
        }
        Context::set_current(Context::none());
        let (lists, listed) = alloc.with_pool(0, |pool, _, _, after| {
            pool.trim_idle(Duration::ZERO, after);
            (
                pool.free_lists.len(),
                pool.free_lists.values().map(Vec::len).sum::<usize>(),
            )
        });
        assert_eq!(listed, 0, "every clean block was released as idle");
        assert!(
            lists < tenants / 10,
            "{lists} free lists kept for {tenants} tenants that hold no block any more"
        );
    }
}

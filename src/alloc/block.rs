//! One block of the pool and its state.

use std::time::Instant;

use crate::backend::StreamHandle;
use crate::context::Context;
use crate::events::{BlockRef, QuarantineReason, ReleaseReason};

use super::size_class::SizeClass;

/// Where a block is in its life (see the state machine in ARCHITECTURE.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BlockState {
    /// Handed to a caller.
    Live,
    /// Freed; its scrub is batched or in flight. Not available to malloc.
    Pending,
    /// Scrubbed and verified: the only state malloc hands out from.
    Clean,
    /// Verification failed or a policy retired it: never handed out again.
    Quarantined,
}

impl BlockState {
    /// The state's name, as the stats JSON writes it.
    pub fn name(self) -> &'static str {
        match self {
            BlockState::Live => "live",
            BlockState::Pending => "pending",
            BlockState::Clean => "clean",
            BlockState::Quarantined => "quarantined",
        }
    }
}

/// What happens to a block once its scrub completes and verifies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Disposition {
    /// Back to the free list (CLEAN).
    Reuse,
    /// Back to the backend (max reuse reached).
    Retire(ReleaseReason),
    /// To quarantine, then re-scrub and release (never-reuse policy).
    Quarantine(QuarantineReason),
}

/// A block: the truth for its pointer's size, owner, streams, state, reuse count and times.
#[derive(Clone, Debug)]
pub struct Block {
    pub id: u64,
    pub device: u32,
    pub addr: u64,
    pub class: SizeClass,
    /// Size of the current (or last) allocation, as the caller asked for it.
    pub requested: u64,
    pub state: BlockState,
    /// Context of the current (or last) owner.
    pub owner: Context,
    /// Stream the block was allocated on.
    pub alloc_stream: StreamHandle,
    /// Stream of its latest free: its scrubs, re-scrubs included, run there.
    pub free_stream: StreamHandle,
    /// Streams given to `kvh_record_stream` while LIVE.
    pub recorded_streams: Vec<StreamHandle>,
    /// Times handed out (0: fresh memory kept after a refused zeroing, never handed out).
    pub reuse_count: u32,
    pub allocated_at: Instant,
    /// When the block entered its current state.
    pub state_since: Instant,
    /// Sequence number of the latest scrub: the verification seed.
    pub scrub_seq: u64,
    pub disposition: Disposition,
    /// A scrub of this block is submitted and not yet applied. While set, the block's memory
    /// is being written by the device: it must not be released or submitted again, even
    /// while the batch is out of the pool being waited on with the lock dropped.
    pub scrub_in_flight: bool,
    /// The block's LIVE time exceeded the live TTL and was reported (by the flusher, while it
    /// was still LIVE): its free does not report it again. Cleared at every hand-out.
    pub live_ttl_reported: bool,
    /// The block was exported for another process while LIVE (`cudaIpcGetMemHandle`): the
    /// importer may keep its mapping past the free, so the block's next free retires it (its
    /// memory goes back to the driver once verified clean) instead of pooling it. Never
    /// cleared: a block marked once is never handed out again after that free.
    pub ipc_exported: bool,
}

impl Block {
    pub fn capacity(&self) -> u64 {
        self.class.capacity
    }

    /// Fresh memory kept after a graph capture refused its zeroing, not yet handed out: it
    /// held nobody's data and was never freed, so it is no freed block in any count of them.
    pub fn never_handed_out(&self) -> bool {
        self.reuse_count == 0
    }

    /// The identity of this block as events report it.
    pub fn to_ref(&self) -> BlockRef {
        BlockRef {
            id: self.id,
            device: self.device as i32,
            addr: self.addr,
            requested: self.requested,
            capacity: self.capacity(),
            scrub_seq: self.scrub_seq,
        }
    }
}

/// A snapshot of a block for tests and diagnostics.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct BlockInfo {
    pub id: u64,
    pub device: u32,
    pub addr: u64,
    pub requested: u64,
    pub capacity: u64,
    pub state: BlockState,
    pub reuse_count: u32,
    pub scrub_seq: u64,
    pub tenant_id: Option<String>,
}

impl From<&Block> for BlockInfo {
    fn from(b: &Block) -> Self {
        BlockInfo {
            id: b.id,
            device: b.device,
            addr: b.addr,
            requested: b.requested,
            capacity: b.capacity(),
            state: b.state,
            reuse_count: b.reuse_count,
            scrub_seq: b.scrub_seq,
            tenant_id: b.owner.tenant_id().map(str::to_owned),
        }
    }
}

/// Where a block lies, for ownership queries ([`crate::alloc::Allocator::block_containing`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockSpan {
    pub device: u32,
    /// The block's start: the pointer its allocation returned.
    pub addr: u64,
    /// Size of the current (or last) allocation, as the caller asked for it.
    pub requested: u64,
    pub capacity: u64,
    /// Whether the block is LIVE: a free of it at `addr` would be valid when asked.
    pub live: bool,
}

impl BlockSpan {
    pub(crate) fn of(b: &Block) -> Self {
        BlockSpan {
            device: b.device,
            addr: b.addr,
            requested: b.requested,
            capacity: b.capacity(),
            live: b.state == BlockState::Live,
        }
    }
}

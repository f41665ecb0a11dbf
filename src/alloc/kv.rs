//! Scrubs of blocks inside a live allocation: the paged KV caches of vLLM- and SGLang-style
//! engines (`kvh_scrub_blocks`).
//!
//! Such engines allocate their KV cache once (one large tensor per layer) and hand its
//! fixed-size blocks from request to request themselves, so the pool never sees those blocks
//! freed. When the engine frees a block (its last reference: with prefix caching a block may
//! be shared), it names the block here; each (block, region) pair becomes one scrub segment,
//! zeroed and verified by the same rule and backend kernel as a freed block. The call waits
//! for the verdict, so when it returns the blocks are verified zero (or named as failed, and
//! must not be reused).
//!
//! Invariants:
//! - **Only memory kvhygiene handed out is written.** Every region of the layout, all of its
//!   blocks, must lie inside the requested bytes of one LIVE block of the named device.
//! - **Blocks of a layout never overlap**, within a region (`block_stride >= block_bytes`
//!   when it holds more than one) or across regions, so scrubbing one block can never zero
//!   part of another block that another request still uses.
//! - **A scrub is ordered after the work on its memory, and before a later free's scrub.** It
//!   waits for the allocation's streams, and once its first batch is submitted its stream is
//!   recorded on the allocation, so the allocation cannot be freed, scrubbed, and handed to
//!   someone else while this scrub may still be writing it. A refused call records nothing.
//! - **Every call that reaches the device is evidence**: one `kv_scrub` record (with the
//!   error, when the call did not finish), a `kv_verify_failed` record per verified segment
//!   that failed, also when a later batch failed; a refused call leaves a `policy_violation`
//!   record (policy `kv_scrub`). The anomaly detector counts a failed block once, through
//!   its first failed segment's record (`KvTally`).

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use sha2::{Digest, Sha256};

use crate::backend::verify::{self, SegmentResult};
use crate::backend::{
    BackendError, ScrubBatch, ScrubOptions, ScrubSegment, ScrubTicket, StreamHandle,
};
use crate::context::Context;
use crate::events::{BlockRef, Event, EventKind, KvScrubRecord, KvScrubTrigger, KvTally};

use super::kv_gate::{Generations, LedgerKey, OwnerKey, ScrubFor, Unapplied, Withdrawn};
use super::Allocator;

/// Most regions a layout may have (e.g. layers × {K, V}).
pub const MAX_KV_REGIONS: usize = 65_536;

/// Most segments (blocks × regions) one call may scrub.
pub const MAX_KV_SEGMENTS: u64 = 1 << 20;

/// Segments per backend batch: the pool's own batch bound, which every backend accepts.
const KV_BATCH_SEGMENTS: usize = 65_536;

/// How long a KV scrub that finds no batch slot (a full device, every slot in flight) tries
/// again before it fails with the backend's out-of-memory error.
const KV_SLOT_WAIT: Duration = Duration::from_secs(2);

/// The pause between those tries, once the pool's own batches were waited for.
const KV_SLOT_POLL: Duration = Duration::from_millis(5);

/// A `kv_scrub` record lists the block ids inline up to this many (always their digest).
pub const KV_LOGGED_IDS: usize = 1024;

/// Pairs of regions whose extents overlap that the overlap check compares, in all: a few
/// milliseconds of work. Real layouts stay far below it (160 regions that all interleave
/// within one block stride are 12,720 pairs); a layout that needs more is refused rather
/// than checked in quadratic time.
const MAX_OVERLAP_CHECKS: usize = 1 << 22;

/// Where the blocks of a paged KV cache are: `regions` (e.g. one per layer and K/V) each hold
/// `blocks_per_region` blocks; block `i` of a region starts `i * block_stride` bytes after the
/// region's base and is `block_bytes` long.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvLayout {
    pub regions: Vec<u64>,
    pub block_bytes: u64,
    pub block_stride: u64,
    pub blocks_per_region: u64,
}

/// What a `kvh_scrub_blocks` call did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KvScrubReport {
    pub segments: u64,
    pub bytes: u64,
    /// Seed of the first segment (segment `i`, block-major in the order given, used
    /// `first_seed + i`).
    pub first_seed: u64,
    /// Block ids with a segment that failed verification or read residue, in the order given.
    /// They are not verified clean and must not be handed to another request.
    pub failed: Vec<u32>,
}

/// Why a KV block scrub did not run, or did not finish.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KvScrubError {
    #[error("invalid KV layout: {0}")]
    InvalidLayout(String),
    #[error("invalid block ids: {0}")]
    InvalidBlocks(String),
    #[error("invalid device {device}: the backend has {count} devices")]
    InvalidDevice { device: i32, count: u32 },
    #[error("region {region} ({base:#x}, {extent} bytes for its {blocks} blocks) is not inside the requested bytes of a live kvhygiene allocation on device {device}")]
    NotLive {
        region: usize,
        base: u64,
        extent: u64,
        blocks: u64,
        device: u32,
    },
    #[error("the allocator is shutting down")]
    ShuttingDown,
    /// A submission or a wait failed (for example a CUDA graph capture on the stream). What
    /// completed was judged and logged; none of the call's blocks may be taken as clean.
    /// `failed`: the blocks that batches completed before the failure found not zero, in the
    /// order the call named them: as for a call that finished, the engine must retire them
    /// (something wrote them after they were freed), whatever a call made again reports.
    #[error("backend error: {error}")]
    Backend {
        error: BackendError,
        failed: Vec<u32>,
    },
}

/// Result of the overlap check.
#[derive(Debug, PartialEq, Eq)]
enum Overlap {
    None,
    Regions(usize, usize),
    /// More pairs of regions interleave than the check examines ([`MAX_OVERLAP_CHECKS`]).
    TooInterleaved,
}

impl KvLayout {
    /// Bytes from a region's base to the end of its last block.
    pub(super) fn extent(&self) -> Option<u64> {
        (self.blocks_per_region - 1)
            .checked_mul(self.block_stride)?
            .checked_add(self.block_bytes)
    }

    /// Checks the geometry: non-empty, no arithmetic overflow, no two blocks overlapping.
    pub fn validate(&self) -> Result<(), KvScrubError> {
        let bad = |m: String| Err(KvScrubError::InvalidLayout(m));
        if self.regions.is_empty() || self.regions.len() > MAX_KV_REGIONS {
            return bad(format!(
                "{} regions; between 1 and {MAX_KV_REGIONS} are accepted",
                self.regions.len()
            ));
        }
        if self.block_bytes == 0 || self.blocks_per_region == 0 {
            return bad(format!(
                "block_bytes ({}) and blocks_per_region ({}) must be positive",
                self.block_bytes, self.blocks_per_region
            ));
        }
        // One block per region: the stride places nothing (a one-block tensor's stride may be
        // anything), so it cannot make blocks overlap.
        if self.blocks_per_region > 1 && self.block_stride < self.block_bytes {
            return bad(format!(
                "block_stride ({}) is smaller than block_bytes ({}): blocks would overlap",
                self.block_stride, self.block_bytes
            ));
        }
        let Some(extent) = self.extent() else {
            return bad("blocks_per_region × block_stride overflows 64 bits".into());
        };
        if let Some((r, base)) = self
            .regions
            .iter()
            .enumerate()
            .find(|(_, &b)| b.checked_add(extent).is_none())
        {
            return bad(format!(
                "region {r} at {base:#x} runs past the address space"
            ));
        }
        match self.overlapping_regions(extent) {
            Overlap::None => Ok(()),
            Overlap::Regions(a, b) => bad(format!("blocks of regions {a} and {b} overlap")),
            Overlap::TooInterleaved => bad(format!(
                "more than {MAX_OVERLAP_CHECKS} pairs of regions interleave; describe the \
                 cache with fewer, wider regions"
            )),
        }
    }

    /// The first pair of regions with overlapping blocks. Regions are swept in address order;
    /// only pairs whose extents overlap are compared, so separate per-layer tensors cost
    /// O(R log R), interleaved K and V a few comparisons more, and the total is bounded.
    fn overlapping_regions(&self, extent: u64) -> Overlap {
        let mut order: Vec<usize> = (0..self.regions.len()).collect();
        order.sort_by_key(|&i| self.regions[i]);
        let mut budget = MAX_OVERLAP_CHECKS;
        for (n, &i) in order.iter().enumerate() {
            let end = self.regions[i] + extent; // checked by `validate`
            for &j in &order[n + 1..] {
                if self.regions[j] >= end {
                    break;
                }
                if budget == 0 {
                    return Overlap::TooInterleaved;
                }
                budget -= 1;
                if self.grids_collide(self.regions[j] - self.regions[i]) {
                    return Overlap::Regions(i.min(j), i.max(j));
                }
            }
        }
        Overlap::None
    }

    /// Whether the blocks of a region based `d` bytes after another's overlap any of its
    /// blocks. With `S` the stride, `B` the block size and `n` the blocks per region, write
    /// `d = q·S + off` (`0 <= off < S`). Block `m` of the later region starts at
    /// `(q + m)·S + off`; it can only meet block `k = q + m` (when `off < B`) or block
    /// `k = q + m + 1` (when `off + B > S`) of the earlier one, and such a `k < n` exists for
    /// some `m >= 0` iff `q < n`, respectively `q + 1 < n`.
    fn grids_collide(&self, d: u64) -> bool {
        let (stride, bytes, n) = (self.block_stride, self.block_bytes, self.blocks_per_region);
        if n == 1 {
            return d < bytes; // One block each: the stride (maybe 0) places nothing.
        }
        let (q, off) = (d / stride, d % stride);
        (off < bytes && q < n) || (off > stride - bytes && q.saturating_add(1) < n)
    }

    /// SHA-256 of the layout: region count, region bases, block bytes, stride and blocks per
    /// region, each as a little-endian `u64`. Logged so an auditor can match a `kv_scrub`
    /// record to the engine's cache.
    pub(super) fn digest(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update((self.regions.len() as u64).to_le_bytes());
        for base in &self.regions {
            h.update(base.to_le_bytes());
        }
        for v in [self.block_bytes, self.block_stride, self.blocks_per_region] {
            h.update(v.to_le_bytes());
        }
        h.finalize().into()
    }
}

/// Checks the block ids against the layout: each below `blocks_per_region`, none twice (a
/// block named twice is the KV cache's double free), and not more segments than a call takes.
pub(super) fn check_ids(layout: &KvLayout, ids: &[u32]) -> Result<(), KvScrubError> {
    let bad = |m: String| Err(KvScrubError::InvalidBlocks(m));
    let segments = (ids.len() as u64).saturating_mul(layout.regions.len() as u64);
    if segments > MAX_KV_SEGMENTS {
        return bad(format!(
            "{} blocks × {} regions = {segments} segments; at most {MAX_KV_SEGMENTS} per call",
            ids.len(),
            layout.regions.len()
        ));
    }
    if let Some(&id) = ids
        .iter()
        .find(|&&id| u64::from(id) >= layout.blocks_per_region)
    {
        return bad(format!(
            "block id {id} is out of range: the layout has {} blocks per region",
            layout.blocks_per_region
        ));
    }
    let mut sorted = ids.to_vec();
    sorted.sort_unstable();
    if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
        return bad(format!("block id {} is named more than once", w[0]));
    }
    Ok(())
}

/// SHA-256 of block ids, each as a little-endian `u32`, in the caller's order.
fn ids_digest(ids: &[u32]) -> [u8; 32] {
    let mut h = Sha256::new();
    for id in ids {
        h.update(id.to_le_bytes());
    }
    h.finalize().into()
}

/// One checked call: where it runs and which segments it covers. Segment `n` is region
/// `n % R` of block `ids[n / R]` (block-major) with seed `first_seed + n`; segments are
/// derived when needed rather than kept, since a call may have a million.
struct KvCall<'a> {
    dev: u32,
    layout: &'a KvLayout,
    ids: &'a [u32],
    stream: StreamHandle,
    first_seed: u64,
    trigger: KvScrubTrigger,
    /// For the gate's scrub: of `ids`, those whose owner the gate did not know when the claim
    /// began (its first pass's finding). `None` exactly for the engine's.
    unknown: Option<&'a HashSet<u32>>,
    /// For the gate's scrub: of `ids`, those dirty only because a scrub of them was in flight
    /// when the claim began (no change of owner).
    busy: Option<&'a HashSet<u32>>,
    /// For the gate's scrub: the claimant it runs for. `None` exactly for the engine's.
    claimant: Option<&'a Option<Arc<OwnerKey>>>,
}

impl KvCall<'_> {
    fn segment_count(&self) -> usize {
        self.ids.len() * self.layout.regions.len() // bounded by check_ids
    }

    fn segment(&self, n: usize) -> ScrubSegment {
        let regions = self.layout.regions.len();
        let id = u64::from(self.ids[n / regions]);
        ScrubSegment {
            // id < blocks_per_region and the extent fits (validated): no overflow.
            addr: self.layout.regions[n % regions] + id * self.layout.block_stride,
            len: self.layout.block_bytes,
            seed: self.first_seed + n as u64,
        }
    }

    /// The backend batches of the call, at most [`KV_BATCH_SEGMENTS`] segments each.
    fn batches(&self) -> Vec<Cut> {
        let total = self.segment_count();
        (0..total)
            .step_by(KV_BATCH_SEGMENTS)
            .map(|start| {
                let run = start..(start + KV_BATCH_SEGMENTS).min(total);
                Cut {
                    segments: run.clone().map(|n| self.segment(n)).collect(),
                    places: Places::Run(start),
                }
            })
            .collect()
    }

    /// The batches of the call without the segments of blocks `left_out`.
    fn batches_without(&self, left_out: &HashSet<u32>) -> Vec<Cut> {
        let regions = self.layout.regions.len();
        let kept: Vec<usize> = (0..self.segment_count())
            .filter(|n| !left_out.contains(&self.ids[n / regions]))
            .collect();
        kept.chunks(KV_BATCH_SEGMENTS)
            .map(|chunk| Cut {
                segments: chunk.iter().map(|&n| self.segment(n)).collect(),
                places: Places::Listed(chunk.to_vec()),
            })
            .collect()
    }
}

/// A batch of a call's segments, and which of the call's segments they are.
struct Cut {
    segments: Vec<ScrubSegment>,
    places: Places,
}

/// Which of a call's segments a batch holds, in its order.
enum Places {
    /// Consecutive ones, from this index on: every batch of a call that left out no block.
    Run(usize),
    /// These.
    Listed(Vec<usize>),
}

/// A submitted batch: which of the call's segments it holds, its segment count, its ticket.
type Submitted = (Places, usize, Box<dyn ScrubTicket>);

/// A judged KV call's counts and records, for [`Allocator::record_kv`].
struct KvRecords {
    dev: u32,
    /// The `kv_verify_failed` records.
    events: Vec<Event>,
    /// The `kv_scrub` record, emitted after them.
    scrubbed: Option<Event>,
    /// Under `failure_mode = abort`, a failed block: the request whose record the abort names.
    abort: Option<Context>,
    /// Blocks the gate's scrub verified clean (`None`: an engine's call).
    gate_scrubbed: Option<u64>,
    /// Of those, the blocks another owner held before (not unknown, not dirty only because a
    /// scrub was in flight): changes of owner the engine's own scrubs missed.
    gate_owner_changed: Vec<u32>,
    verified_blocks: u64,
    verified_segments: u64,
    verified_bytes: u64,
    failed_blocks: u64,
}

impl KvRecords {
    /// Completes the gate scrub's counts and `kv_scrub` record once its verdict was applied
    /// (`changed`: see [`Unapplied`]), with the blocks `withdrawn` before its submission
    /// (`unknown`: the call's blocks whose owner the gate did not know).
    /// A change of owner is counted where the block is handed over: not for a block another
    /// claim took (that claim counts it), nor for one whose verdict landed in a forgotten
    /// ledger or after another scrub's failure (a later pass of the claim that hands it over
    /// counts it, or nobody), nor for one another claim of the claimant was handed meanwhile
    /// (the change went through it). A withdrawn block was not scrubbed, so it is not counted
    /// as unknown here either.
    fn settled(
        &mut self,
        changed: &Unapplied,
        withdrawn: &Withdrawn,
        unknown: Option<&HashSet<u32>>,
    ) {
        let not_this_scrubs: HashSet<u32> = [
            &changed.taken,
            &changed.failed,
            &changed.forgotten,
            &changed.changed_meanwhile,
        ]
        .into_iter()
        .flatten()
        .copied()
        .collect();
        self.gate_owner_changed
            .retain(|id| !not_this_scrubs.contains(id));
        let left_out = withdrawn.all();
        let Some(EventKind::KvScrubbed(r)) = self.scrubbed.as_mut().map(|e| &mut e.kind) else {
            return;
        };
        r.owner_changed_blocks = self.gate_owner_changed.len() as u64;
        r.withdrawn_blocks = left_out.len() as u64;
        let unknown_left_out = unknown.map_or(0, |u| left_out.intersection(u).count());
        r.unknown_owner_blocks = r
            .unknown_owner_blocks
            .saturating_sub(unknown_left_out as u64);
    }
}

/// What was checked and submitted under the pool lock.
struct Launched {
    /// The allocation holding each region, by region index.
    owners: Vec<BlockRef>,
    tickets: Vec<Submitted>,
    /// The submission error that stopped the call, after `tickets` were submitted.
    error: Option<BackendError>,
    /// `error` is the backend's answer to the question asked before anything was submitted
    /// (`refused_before_launch`), not a submission's.
    refused_early: bool,
    /// The gate ledger's generations of the call's blocks before anything was submitted,
    /// which its verdicts are checked against (none when the gate is off). Without the
    /// withdrawn blocks.
    seen: Option<Generations>,
    /// The gate's scrub: blocks withdrawn before the submission, left out of its batches.
    withdrawn: Withdrawn,
    /// How the batches were scrubbed and verified: the verdicts are judged by the samples
    /// these options take (a FAILED block's scrub reads back every word).
    options: ScrubOptions,
}

impl Allocator {
    /// Zeroes and verifies blocks `ids` of the paged KV cache `layout` on `device`, in stream
    /// order on `stream`, and waits for the verdict. `Ok` reports which blocks failed (they
    /// must not be reused); an error means the call was refused or did not finish, and none of
    /// its blocks may be taken as clean. No ids is a no-op once the geometry is checked.
    pub fn scrub_kv_blocks(
        &self,
        layout: &KvLayout,
        ids: &[u32],
        device: i32,
        stream: StreamHandle,
    ) -> Result<KvScrubReport, KvScrubError> {
        self.scrub_kv(layout, ids, device, stream, ScrubFor::Engine)
            .map(|(report, _, _)| report)
    }

    /// [`Allocator::scrub_kv_blocks`], for the engine or the eviction gate. Also returns what
    /// became of the verified blocks whose verdict the gate's ledger could not apply as seen
    /// (they changed hands while the scrub ran: see [`Unapplied`]), and the blocks the gate's
    /// scrub withdrew before it was submitted because they changed hands since its claim
    /// sorted them (never scrubbed).
    pub(super) fn scrub_kv(
        &self,
        layout: &KvLayout,
        ids: &[u32],
        device: i32,
        stream: StreamHandle,
        by: ScrubFor<'_>,
    ) -> Result<(KvScrubReport, Unapplied, Withdrawn), KvScrubError> {
        let stream = stream.shared();
        let dev = match self.kv_device(device) {
            Ok(dev) => dev,
            Err(e @ KvScrubError::InvalidDevice { .. }) if !self.inner.pools.is_empty() => {
                // Counted and logged on device 0's pool, as an invalid free is.
                return Err(self.refuse_kv_scrub(0, e));
            }
            Err(e) => return Err(e),
        };
        let checked = layout.validate().and_then(|()| check_ids(layout, ids));
        if let Err(e) = checked {
            return Err(self.refuse_kv_scrub(dev, e));
        }
        if ids.is_empty() {
            return Ok((
                KvScrubReport::default(),
                Unapplied::default(),
                Withdrawn::default(),
            ));
        }
        let (trigger, claimant, seen, unknown, busy, sorted_in) = match by {
            ScrubFor::Engine => (KvScrubTrigger::Engine, None, None, None, None, None),
            ScrubFor::Gate {
                claimant,
                seen,
                unknown,
                busy,
                owners,
            } => (
                KvScrubTrigger::Gate,
                Some(claimant),
                Some(seen),
                Some(unknown),
                Some(busy),
                Some(owners),
            ),
        };
        let count = ids.len() as u64 * layout.regions.len() as u64; // bounded by check_ids
        let call = KvCall {
            dev,
            layout,
            ids,
            stream,
            first_seed: self.inner.next_seq.fetch_add(count, Ordering::Relaxed),
            trigger,
            unknown,
            busy,
            claimant,
        };
        // Batches are cut before the pool lock is taken; under it only checks and submissions run.
        let launch = |seen, owners| match self.launch_kv(&call, call.batches(), seen, owners) {
            Ok(l) => Ok(l),
            // The gate's claim reports its own refusal (a `kv_gate` record), not one of a
            // `kvh_scrub_blocks` call the engine never made.
            Err(e) if trigger == KvScrubTrigger::Gate => Err(e),
            Err(e) => Err(self.refuse_kv_scrub(dev, e)),
        };
        let mut launched = launch(seen, sorted_in)?;
        let mut withdrawn = std::mem::take(&mut launched.withdrawn);
        let owners: Vec<(u64, u64)> = launched
            .owners
            .iter()
            .map(|o| (o.id, o.scrub_seq))
            .collect();
        // No memory for a batch slot when the first batch was submitted: a full device whose
        // slots are all held by batches in flight (freed blocks' scrubs, re-scrubs, other KV
        // calls). The pool's are waited for, the lock released, and the call is tried again
        // while batches held slots when its last try began, for at most `KV_SLOT_WAIT`, on
        // the same allocations only. Every try keeps the gate generations read before the
        // first: nothing of the call ran since, and a claim made while it waited must not look
        // older than its scrub.
        let deadline = Instant::now() + KV_SLOT_WAIT;
        let mut drained = false;
        let mut held = true;
        while launched.tickets.is_empty()
            && !launched.refused_early
            && matches!(launched.error, Some(BackendError::OutOfMemory { .. }))
            && Instant::now() < deadline
        {
            if !drained {
                self.drain_pool(dev, self.scrub_horizon());
                drained = true;
            } else if held {
                std::thread::sleep(KV_SLOT_POLL);
            } else {
                // Nothing on the device held a slot to give back: out of memory for good.
                break;
            }
            held = self.batch_slots_held(dev);
            launched = launch(launched.seen.take(), Some(&owners))?;
            withdrawn.extend(std::mem::take(&mut launched.withdrawn));
        }
        let submitted = launched.tickets.len() as u64;
        let (results, error) = wait_all(launched.tickets, call.segment_count(), launched.error);
        self.inner
            .kv_batches_in_flight
            .fetch_sub(submitted, Ordering::Relaxed);
        let (report, clean, mut records) = self.judge_kv(
            &call,
            &results,
            &launched.owners,
            &launched.options,
            error.as_ref(),
        );
        let changed = match &launched.seen {
            Some(seen) => {
                let scrubbed = LedgerKey::new(dev, layout, &launched.owners);
                self.settle_kv(seen, &scrubbed, &clean, &report.failed, claimant)
            }
            None => Unapplied::default(),
        };
        records.settled(&changed, &withdrawn, unknown);
        if withdrawn.count() == ids.len() && error.is_none() {
            // Every block was withdrawn before anything was submitted: no scrub reached the
            // device, so no `kv_scrub` record (the claim's own records say what became of
            // the blocks).
            records.scrubbed = None;
        }
        self.record_kv(records);
        match error {
            None => Ok((report, changed, withdrawn)),
            Some(e) => {
                let failed: std::collections::HashSet<u32> = report
                    .failed
                    .iter()
                    .chain(&changed.failed)
                    .copied()
                    .collect();
                let failed: Vec<u32> = ids
                    .iter()
                    .copied()
                    .filter(|id| failed.contains(id))
                    .collect();
                if trigger == KvScrubTrigger::Gate {
                    // The claim fails as a whole; it names these blocks to its caller
                    // (`kvh_claim_blocks`'s refused list), and they are recorded here.
                    self.report_failed_now(dev, &failed);
                }
                Err(self.kv_backend_error(dev, e, failed))
            }
        }
    }

    /// Under the pool lock: checks every region against the block table without changing
    /// anything, submits the batches (submission never waits on the device) and, once the
    /// first is submitted, records the call's stream on the owning allocations.
    fn launch_kv(
        &self,
        call: &KvCall<'_>,
        mut batches: Vec<Cut>,
        seen: Option<Generations>,
        same_owners: Option<&[(u64, u64)]>,
    ) -> Result<Launched, KvScrubError> {
        let layout = call.layout;
        let extent = layout.extent().unwrap_or(u64::MAX); // validated
        let config = &self.inner.config;
        let options = ScrubOptions {
            samples: config.verify_samples,
            full_verify: config.full_verify,
            double_pass: config.double_pass,
        };
        // Completed batches give their slots back first: on a full device the one the device
        // made as it opened may be all there is, held by a ticket until harvested. In a pass
        // of its own: the launch's pass settles nothing, so no sink that unwinds out of the
        // harvest's records can drop the tickets it submitted (and keep them counted in
        // flight for good).
        self.with_pool(call.dev, |pool, backend, config, after| {
            pool.harvest(backend, config, after);
        });
        self.with_pool(call.dev, |pool, backend, _, _| {
            let mut owners = Vec::with_capacity(layout.regions.len());
            let mut waits: Vec<StreamHandle> = Vec::new();
            for (region, &base) in layout.regions.iter().enumerate() {
                // A call tried again must find the allocations it was first made on: one
                // freed meanwhile (a free gives its block a new scrub sequence) and handed out
                // again at its address is another caller's.
                let found = pool
                    .live_range(base, extent, call.stream)
                    .filter(|(owner, _)| {
                        same_owners
                            .is_none_or(|o| o.get(region) == Some(&(owner.id, owner.scrub_seq)))
                    });
                let Some((owner, w)) = found else {
                    return Err(KvScrubError::NotLive {
                        region,
                        base,
                        extent,
                        blocks: layout.blocks_per_region,
                        device: call.dev,
                    });
                };
                owners.push(owner);
                for s in w {
                    if !waits.contains(&s) {
                        waits.push(s);
                    }
                }
            }
            // An engine scrub the backend would refuse before launching anything is refused
            // here, before it uses (or creates, dropping the other views') its cache's ledger:
            // a refused call records nothing. (A gate scrub's claim used its ledger already.)
            if call.trigger == KvScrubTrigger::Engine {
                if let Some(e) = self.refused_before_launch(call.dev, call.stream) {
                    return Ok(Launched {
                        owners,
                        tickets: Vec::new(),
                        error: Some(e),
                        refused_early: true,
                        seen: None,
                        withdrawn: Withdrawn::default(),
                        options,
                    });
                }
            }
            // Before anything is submitted: a claim after this point shows in the generations.
            // (The ledger lock is taken inside the pool lock here and never the other way.)
            let seen = seen.or_else(|| self.kv_generations(call.dev, layout, &owners, call.ids));
            let mut launched = Launched {
                owners,
                tickets: Vec::new(),
                error: None,
                refused_early: false,
                seen,
                withdrawn: Withdrawn::default(),
                options,
            };
            // Before the first submission, under the lock that orders it: a verdict landing
            // from here on knows that this scrub may still write the blocks, and the gate's
            // scrub leaves out the blocks another claim was handed since its claim sorted them.
            // Left out are the blocks `seen` no longer names: withdrawn now, or by an earlier
            // try of the call.
            if let Some(seen) = launched.seen.as_mut() {
                launched.withdrawn = self.ledgers().mark_in_flight(seen, call.claimant);
                // Ids are distinct (checked): fewer named means some left out.
                if seen.len() < call.ids.len() {
                    let left_out: HashSet<u32> = call
                        .ids
                        .iter()
                        .copied()
                        .filter(|&id| !seen.names(id))
                        .collect();
                    batches = call.batches_without(&left_out);
                }
            }
            if launched
                .seen
                .as_ref()
                .is_some_and(|seen| self.ledgers().any_failed(seen))
            {
                launched.options.full_verify = true;
                launched.options.double_pass = true;
            }
            let options = launched.options;
            let mut any_launched = false;
            for (n, Cut { segments, places }) in batches.into_iter().enumerate() {
                // Invariant 6, checked before each launch: a call larger than one launch may
                // be under way when exit begins.
                if self.inner.shutting_down.load(Ordering::Acquire) {
                    launched.error = Some(BackendError::ShuttingDown);
                    break;
                }
                let len = segments.len();
                let batch = ScrubBatch {
                    device: call.dev,
                    stream: call.stream,
                    wait_streams: waits.clone(),
                    segments,
                    options,
                };
                // SAFETY: 1. each segment is a block of a layout region that `live_range`
                // checked lies inside the requested bytes of a LIVE allocation of this pool on
                // this device, which the engine cannot free while the call holds the pool's
                // lock, and whose stream the later free's scrub waits for; 2. the engine hands
                // the blocks over (their caller's contract: nothing writes them until the scrub
                // completes); 3. the call's stream, valid for the call, and the allocations'
                // recorded streams (valid until their scrubs were submitted: the caller's
                // contract).
                let submitted = unsafe { backend.submit_scrub(batch) };
                // Once a submission was tried, something may write the cache on this stream
                // (a failed submission may have launched part of its work): a later free's
                // scrub must wait for it. Only a refusal before any launch records nothing.
                let nothing_launched = matches!(
                    &submitted,
                    Err(BackendError::StreamCapturing { .. }
                        | BackendError::ShuttingDown
                        | BackendError::OutOfMemory { .. })
                );
                if n == 0 && !nothing_launched {
                    any_launched = true;
                    for owner in &launched.owners {
                        pool.record_stream(owner.addr, call.stream);
                    }
                }
                match submitted {
                    Ok(ticket) => {
                        pool.stats.counters.scrub_batches += 1;
                        pool.stats.counters.kv_scrub_batches += 1;
                        self.inner
                            .kv_batches_in_flight
                            .fetch_add(1, Ordering::Relaxed);
                        launched.tickets.push((places, len, ticket));
                    }
                    Err(e) => {
                        launched.error = Some(e);
                        break;
                    }
                }
            }
            if !any_launched {
                // Nothing will write the blocks: the marks go (a call tried again marks anew).
                if let Some(seen) = launched.seen.as_mut() {
                    self.ledgers().unmark_in_flight(seen);
                }
            }
            Ok(launched)
        })
    }

    /// Whether batches on device `dev` hold batch slots that completing gives back: the pool's
    /// own, or KV calls' (counted for every device: a KV call is rare enough that waiting on
    /// another device's costs little).
    fn batch_slots_held(&self, dev: u32) -> bool {
        self.inner.kv_batches_in_flight.load(Ordering::Relaxed) > 0
            || self.with_pool(dev, |pool, _, _, _| pool.holds_batch_slots())
    }

    /// Why the backend would refuse a scrub on `stream` before launching anything, asked
    /// before the call changes anything: exit has begun, the stream is capturing a CUDA graph,
    /// or the capture query itself failed (a submission asks it first, and would fail the
    /// same way). A capture that begins after the question is refused at submission, as
    /// before (its cache's ledger was used by then).
    fn refused_before_launch(&self, dev: u32, stream: StreamHandle) -> Option<BackendError> {
        if self.inner.shutting_down.load(Ordering::Acquire) {
            return Some(BackendError::ShuttingDown);
        }
        match self.inner.backend.is_capturing(dev, stream) {
            Ok(false) => None,
            Ok(true) => Some(BackendError::StreamCapturing {
                stream: stream.0,
                what: "scrub launch",
            }),
            Err(e) => Some(e),
        }
    }

    /// Turns verification results into the report, and the counters and events for
    /// [`Self::record_kv`]: every verified segment that failed is an event, also when `error`
    /// stopped the call before the rest was verified; under `failure_mode = abort` the
    /// process aborts once they are logged, as after a failed free's scrub. Also returns the
    /// blocks whose every segment verified clean.
    fn judge_kv(
        &self,
        call: &KvCall<'_>,
        results: &[Option<SegmentResult>],
        owners: &[BlockRef],
        options: &ScrubOptions,
        error: Option<&BackendError>,
    ) -> (KvScrubReport, Vec<u32>, KvRecords) {
        let config = &self.inner.config;
        let layout = call.layout;
        let expected =
            verify::expected_samples(layout.block_bytes, options.samples, options.full_verify);
        let ctx = Context::current();
        let regions = layout.regions.len();
        let mut events = Vec::new();
        let mut failed = Vec::new();
        let mut clean = Vec::new();
        let (mut verified_blocks, mut verified_segments) = (0u64, 0u64);
        for (i, &id) in call.ids.iter().enumerate() {
            let (mut block_failed, mut block_verified) = (false, true);
            let (first_failure, mut block_residue) = (events.len(), false);
            for (r, owner) in owners.iter().enumerate() {
                let n = i * regions + r;
                let Some(result) = results[n] else {
                    block_verified = false;
                    continue;
                };
                verified_segments += 1;
                // Residue fails a KV block even above the threshold: something wrote to it
                // after it was handed in for scrubbing.
                if verify::passes(result, expected, config.coverage_threshold)
                    && result.nonzero == 0
                {
                    continue;
                }
                block_failed = true;
                block_residue |= result.nonzero > 0;
                let segment = call.segment(n);
                events.push(Event {
                    at: SystemTime::now(),
                    kind: EventKind::KvVerifyFailed {
                        kv_block: id,
                        region: r as u32,
                        addr: segment.addr,
                        len: segment.len,
                        seed: segment.seed,
                        samples_expected: expected,
                        samples_checked: result.checked,
                        samples_nonzero: result.nonzero,
                        coverage: verify::coverage(result),
                        threshold: config.coverage_threshold,
                        tally: KvTally::Segment,
                    },
                    context: ctx.clone(),
                    block: Some(*owner),
                    addr: None,
                });
            }
            if let Some(EventKind::KvVerifyFailed { tally, .. }) =
                events.get_mut(first_failure).map(|e| &mut e.kind)
            {
                *tally = KvTally::Block {
                    residue: block_residue,
                };
            }
            // Read back whole, or failed on a segment that was: a failed block is always
            // one of the blocks read back (the counters and the record say so).
            verified_blocks += u64::from(block_verified || block_failed);
            if block_failed {
                failed.push(id);
            } else if block_verified {
                clean.push(id);
            }
        }
        let segments = call.segment_count() as u64;
        let report = KvScrubReport {
            segments,
            bytes: segments.saturating_mul(layout.block_bytes),
            first_seed: call.first_seed,
            failed,
        };
        let record = KvScrubRecord {
            device: call.dev,
            blocks: call.ids.len() as u64,
            verified_blocks,
            failed_blocks: report.failed.len() as u64,
            segments,
            unverified_segments: segments - verified_segments,
            bytes: report.bytes,
            first_seed: call.first_seed,
            stream: call.stream.0,
            regions: regions as u64,
            block_bytes: layout.block_bytes,
            block_stride: layout.block_stride,
            blocks_per_region: layout.blocks_per_region,
            layout_sha256: layout.digest(),
            block_ids: (call.ids.len() <= KV_LOGGED_IDS).then(|| call.ids.to_vec()),
            block_ids_sha256: ids_digest(call.ids),
            error: error.map(ToString::to_string),
            trigger: call.trigger,
            unknown_owner_blocks: call.unknown.map_or(0, |u| {
                call.ids.iter().filter(|id| u.contains(id)).count() as u64
            }),
            // Known once the verdict is applied (`KvRecords::settled`).
            owner_changed_blocks: 0,
            withdrawn_blocks: 0,
        };
        // The caller's request, whose KV blocks these are, is the one the abort's record names.
        let abort = (!report.failed.is_empty()
            && config.failure_mode == crate::config::FailureMode::Abort)
            .then(|| ctx.clone());
        let scrubbed = Event {
            at: SystemTime::now(),
            kind: EventKind::KvScrubbed(Box::new(record)),
            context: ctx,
            block: None,
            addr: None,
        };
        let (gate_scrubbed, gate_owner_changed) = match call.unknown {
            None => (None, Vec::new()),
            Some(unknown) => {
                let busy = |id: &u32| call.busy.is_some_and(|b| b.contains(id));
                let had_owner = clean
                    .iter()
                    .copied()
                    .filter(|id| !unknown.contains(id) && !busy(id))
                    .collect();
                (Some(clean.len() as u64), had_owner)
            }
        };
        let records = KvRecords {
            dev: call.dev,
            events,
            scrubbed: Some(scrubbed),
            abort,
            gate_scrubbed,
            gate_owner_changed,
            verified_blocks,
            verified_segments,
            verified_bytes: verified_segments.saturating_mul(layout.block_bytes),
            failed_blocks: report.failed.len() as u64,
        };
        (report, clean, records)
    }

    /// Counts a judged KV call and emits its records. Done after the gate's ledger took the
    /// verdict: a sink that unwinds out of the records must not leave a block whose scrub
    /// failed CLEAN in the ledger, for a claim to hand over unscrubbed.
    fn record_kv(&self, records: KvRecords) {
        self.with_pool(records.dev, |pool, _, _, after| {
            let c = &mut pool.stats.counters;
            // The gate's scrubs are counted here, as they verify, whatever becomes of the claim
            // (one whose scrub stops part way has handed over what verified); its calls are
            // counted as claims.
            match records.gate_scrubbed {
                None => c.kv_scrub_calls += 1,
                Some(scrubbed) => {
                    c.kv_gate_scrubbed_blocks += scrubbed;
                    c.kv_gate_owner_changed_blocks += records.gate_owner_changed.len() as u64;
                }
            }
            c.kv_blocks_scrubbed += records.verified_blocks;
            c.kv_segments_scrubbed += records.verified_segments;
            c.kv_bytes_scrubbed += records.verified_bytes;
            c.kv_blocks_failed += records.failed_blocks;
            after.events = records.events;
            after.events.extend(records.scrubbed);
            after.abort = records.abort;
        });
    }

    /// The pool index of `device` for a KV call, unless the allocator is shutting down or the
    /// device does not exist (refusals that name no pool: the callers count and log a device
    /// that does not exist on device 0's pool).
    pub(super) fn kv_device(&self, device: i32) -> Result<u32, KvScrubError> {
        if self.inner.shutting_down.load(Ordering::Acquire) {
            return Err(KvScrubError::ShuttingDown);
        }
        self.device_index(device)
            .map_err(|_| KvScrubError::InvalidDevice {
                device,
                count: self.inner.pools.len() as u32,
            })
    }

    /// Counts and logs a refused call (policy `kv_scrub`), then returns its error.
    #[cold]
    fn refuse_kv_scrub(&self, dev: u32, e: KvScrubError) -> KvScrubError {
        self.with_pool(dev, |pool, _, _, after| {
            pool.stats.counters.kv_scrubs_refused += 1;
            after.events.push(Event {
                at: SystemTime::now(),
                kind: EventKind::PolicyViolation {
                    policy: "kv_scrub",
                    detail: format!("kvh_scrub_blocks refused: {e}"),
                },
                context: Context::current(),
                block: None,
                addr: None,
            });
        });
        e
    }

    /// A submission or wait failed. The caller gets the error at once, so it is not made the
    /// allocator's sticky error (a caller's bad stream must not poison later calls); a driver
    /// fault is still counted. A graph capture or process exit is the caller's situation.
    #[cold]
    fn kv_backend_error(&self, dev: u32, e: BackendError, failed: Vec<u32>) -> KvScrubError {
        match e {
            // The caller's situation, no failure of the driver's.
            BackendError::StreamCapturing { .. } | BackendError::ShuttingDown => {}
            // The call failed, its blocks unscrubbed, for lack of memory after the waits for
            // the batches in flight: counted as an allocation that found none is.
            BackendError::OutOfMemory { .. } => {
                self.with_pool(dev, |pool, _, _, _| pool.stats.counters.out_of_memory += 1)
            }
            _ => self.with_pool(dev, |pool, _, _, _| pool.stats.counters.backend_errors += 1),
        }
        KvScrubError::Backend { error: e, failed }
    }
}

/// Waits for every submitted batch (with no lock held) and gathers results in segment order:
/// `None` for segments never submitted or whose batch failed. A batch answered with another
/// number of results than it had segments failed: which result belongs to which segment is
/// unknown, so none of them is taken (a block one of whose segments has no result is never
/// reported clean).
fn wait_all(
    tickets: Vec<Submitted>,
    segments: usize,
    submit_error: Option<BackendError>,
) -> (Vec<Option<SegmentResult>>, Option<BackendError>) {
    let mut results = vec![None; segments];
    let mut error = submit_error;
    for (places, len, mut ticket) in tickets {
        match ticket.wait() {
            Ok(r) if r.len() == len => match places {
                Places::Run(start) => {
                    for (slot, v) in results[start..start + len].iter_mut().zip(r) {
                        *slot = Some(v);
                    }
                }
                Places::Listed(at) => {
                    for (n, v) in at.into_iter().zip(r) {
                        results[n] = Some(v);
                    }
                }
            },
            Ok(r) => {
                error.get_or_insert(BackendError::Other(format!(
                    "scrub returned {} results for {len} segments",
                    r.len()
                )));
            }
            Err(e) => {
                error.get_or_insert(e);
            }
        }
    }
    (results, error)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(regions: Vec<u64>, bytes: u64, stride: u64, n: u64) -> KvLayout {
        KvLayout {
            regions,
            block_bytes: bytes,
            block_stride: stride,
            blocks_per_region: n,
        }
    }

    /// Brute force: do any two blocks of different regions share a byte?
    fn brute_overlap(l: &KvLayout) -> bool {
        let blocks: Vec<(u64, u64)> = l
            .regions
            .iter()
            .flat_map(|&b| {
                (0..l.blocks_per_region).map(move |i| (b + i * l.block_stride, l.block_bytes))
            })
            .collect();
        blocks.iter().enumerate().any(|(i, a)| {
            blocks[i + 1..]
                .iter()
                .any(|b| a.0 < b.0 + b.1 && b.0 < a.0 + a.1)
        })
    }

    #[test]
    fn the_overlap_check_agrees_with_brute_force() {
        // Every placement of a second and third region near the first, for small geometries.
        for (bytes, stride, n) in [
            (4, 4, 3),
            (3, 8, 4),
            (5, 8, 2),
            (8, 8, 1),
            (2, 7, 5),
            (8, 0, 1),
            (8, 3, 1),
            (3, 8, 1),
        ] {
            for d1 in 0..40 {
                for d2 in 0..40 {
                    let l = layout(vec![1000, 1000 + d1, 1000 + d2], bytes, stride, n);
                    let want = brute_overlap(&l);
                    let got = l.overlapping_regions(l.extent().unwrap()) != Overlap::None;
                    assert_eq!(got, want, "bytes {bytes} stride {stride} n {n} d {d1},{d2}");
                }
            }
        }
    }

    #[test]
    fn interleaved_k_and_v_are_accepted_and_shifted_ones_refused() {
        // FlashInfer-style [blocks, 2, ...]: K and V of a block side by side.
        assert!(layout(vec![0x1000, 0x1100], 0x100, 0x200, 64)
            .validate()
            .is_ok());
        // V shifted by half a block collides with K.
        let e = layout(vec![0x1000, 0x1080], 0x100, 0x200, 64).validate();
        assert!(matches!(e, Err(KvScrubError::InvalidLayout(m)) if m.contains("regions 0 and 1")));
        // The same base twice.
        assert!(layout(vec![0x1000, 0x1000], 0x100, 0x100, 1)
            .validate()
            .is_err());
    }

    #[test]
    fn a_single_block_region_takes_any_stride() {
        for stride in [0, 1, 0x100, u64::MAX] {
            assert!(layout(vec![0x1000, 0x1100], 0x100, stride, 1)
                .validate()
                .is_ok());
            let e = layout(vec![0x1000, 0x10ff], 0x100, stride, 1).validate();
            assert!(
                matches!(e, Err(KvScrubError::InvalidLayout(m)) if m.contains("regions 0 and 1"))
            );
        }
    }

    #[test]
    fn geometry_errors_name_the_value() {
        let cases = [
            (layout(vec![], 8, 8, 1), "0 regions"),
            (layout(vec![0], 0, 8, 1), "block_bytes (0)"),
            (layout(vec![0], 8, 8, 0), "blocks_per_region (0)"),
            (layout(vec![0], 16, 8, 4), "block_stride (8)"),
            (layout(vec![0], 8, u64::MAX, 3), "overflows"),
            (
                layout(vec![u64::MAX - 4], 8, 8, 1),
                "past the address space",
            ),
        ];
        for (l, want) in cases {
            match l.validate() {
                Err(KvScrubError::InvalidLayout(m)) => assert!(m.contains(want), "{m}"),
                other => panic!("{l:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn ids_are_bounded_and_unique() {
        let l = layout(vec![0, 4096], 64, 64, 10);
        assert!(check_ids(&l, &[0, 9, 3]).is_ok());
        let e = check_ids(&l, &[2, 10]).unwrap_err().to_string();
        assert!(e.contains("block id 10 is out of range"), "{e}");
        let e = check_ids(&l, &[4, 1, 4]).unwrap_err().to_string();
        assert!(e.contains("block id 4 is named more than once"), "{e}");
        let many: Vec<u32> = (0..(MAX_KV_SEGMENTS / 2 + 1) as u32).collect();
        let big = layout(vec![0, 1 << 40], 1, 1, 1 << 30);
        let e = check_ids(&big, &many).unwrap_err().to_string();
        assert!(e.contains("at most"), "{e}");
    }

    #[test]
    fn many_interleaved_regions_are_refused_not_checked_pairwise() {
        // 4000 one-byte blocks side by side in a 1 MiB stride: valid, but every pair of the
        // 4000 regions (about 8 million) overlaps in extent; the check stops at its budget.
        let l = layout((0..4000).map(|k| 0x1000 + k).collect(), 1, 1 << 20, 4);
        let e = l.validate().unwrap_err().to_string();
        assert!(e.contains("interleave"), "{e}");
        // 160 regions (80 layers, K and V) all interleaved within one stride are checked.
        let per_layer = layout(
            (0..160).map(|k| 0x1000 + 64 * k).collect(),
            64,
            160 * 64,
            100,
        );
        assert!(per_layer.validate().is_ok());
    }

    /// A call on device 0 of blocks `ids` of `l`, its first segment's seed 77.
    fn call_of<'a>(l: &'a KvLayout, ids: &'a [u32]) -> KvCall<'a> {
        KvCall {
            dev: 0,
            layout: l,
            ids,
            stream: StreamHandle(0),
            first_seed: 77,
            trigger: KvScrubTrigger::Engine,
            unknown: None,
            busy: None,
            claimant: None,
        }
    }

    #[test]
    fn segments_are_block_major_with_consecutive_seeds() {
        let l = layout(vec![0x10_000, 0x20_000], 0x40, 0x100, 8);
        let ids = [3, 0];
        let call = call_of(&l, &ids);
        let s: Vec<ScrubSegment> = call
            .batches()
            .into_iter()
            .flat_map(|c| c.segments)
            .collect();
        let got: Vec<(u64, u64, u64)> = s.iter().map(|s| (s.addr, s.len, s.seed)).collect();
        assert_eq!(
            got,
            vec![
                (0x10_300, 0x40, 77),
                (0x20_300, 0x40, 78),
                (0x10_000, 0x40, 79),
                (0x20_000, 0x40, 80),
            ]
        );
    }

    /// A block left out of a call's batches takes its segments with it; the others keep the
    /// seeds and the result places they have in the whole call.
    #[test]
    fn a_block_left_out_keeps_the_others_seeds_and_places() {
        let l = layout(vec![0x10_000, 0x20_000], 0x40, 0x100, 8);
        let ids = [3, 0, 5];
        let call = call_of(&l, &ids);
        let cuts = call.batches_without(&HashSet::from([0]));
        assert_eq!(cuts.len(), 1);
        let got: Vec<(u64, u64)> = cuts[0].segments.iter().map(|s| (s.addr, s.seed)).collect();
        assert_eq!(
            got,
            vec![
                (0x10_300, 77),
                (0x20_300, 78),
                (0x10_500, 81),
                (0x20_500, 82)
            ]
        );
        assert!(matches!(&cuts[0].places, Places::Listed(at) if at == &[0, 1, 4, 5]));
        assert!(call.batches_without(&HashSet::from([0, 3, 5])).is_empty());
    }
}

//! The eviction gate of paged KV caches (`kvh_claim_blocks`): a KV block changes owner only
//! through a verified scrub.
//!
//! `kvh_scrub_blocks` makes the engine responsible for scrubbing every block it frees, on
//! every path (finish, abort, preemption, prefix-cache eviction). One forgotten path hands a
//! request's keys and values to the next request unseen. The gate closes that gap at the one
//! place every path goes through: when the engine gives a block to a request, it claims it
//! here. A ledger per cache remembers each block's owner:
//!
//! ```text
//!   unknown ──claim (gate scrubs, verified)──▶ OWNED(a) ──claim by a──▶ OWNED(a)
//!                                               │  claim by b: the gate scrubs and verifies
//!                                               │  (kv_gate = scrub) or refuses (enforce)
//!   CLEAN ◀──kvh_scrub_blocks verified──────────┘
//!     │ claim by anyone ──▶ OWNED(claimant)
//!   FAILED (a scrub failed verification): never handed over until a scrub verifies it;
//!          that scrub zeroes twice and reads back every word (as a quarantined block's)
//! ```
//!
//! The owner is the claiming thread's request (`kv_gate_scope = request`: tenant and request
//! ids) or its tenant (`tenant`: a tenant's requests share its prefix cache). A thread without
//! those ids is anonymous: it owns what it claims, but matches nobody, itself included, so
//! its blocks are always scrubbed before they move. Claims without a change of owner cost a
//! lock and a hash lookup per block, no device work.
//!
//! Invariants:
//! - **A claimed block was, since its last different owner, verified zero**: by the engine's
//!   `kvh_scrub_blocks`, or by the gate's own scrub inside the claim. Blocks whose owner the
//!   ledger does not know (a new cache, a forgotten ledger) count as another owner's.
//! - **A block whose last scrub failed is never handed over** until a scrub verifies it, and
//!   a scrub of a FAILED block is a full one (double pass, every word read back): one sampled
//!   verification would clear a block with one stuck word most of the times it ran. The mark
//!   lives in the ledger: a ledger forgotten (the least recently used of the 64 kept when
//!   all hold FAILED blocks, one cleared past 2^24 blocks, or one dropped for
//!   another layout of the same memory) forgets it, and the block is unknown again (scrubbed,
//!   sampled, at its next claim). The engine's own list of failed blocks (every scrub call
//!   returns them) is what retires a block for good.
//! - **Under `enforce` a refused claim changes nothing**; each refusal is a `policy_violation`
//!   record (policy `kv_gate`), as is a claim of a failed block.
//! - **A ledger belongs to one cache**: the device, the layout's digest and the allocations
//!   holding its regions. A cache freed and allocated again starts an empty ledger, since a
//!   free's scrub zeroed it but nothing says who wrote it since.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::SystemTime;

use crate::backend::StreamHandle;
use crate::config::{KvGateMode, KvGateScope};
use crate::context::Context;
use crate::events::{BlockRef, Event, EventKind};

use super::kv::{check_ids, KvLayout, KvScrubError};
use super::pool::DevicePool;
use super::Allocator;

/// Caches whose ledgers are kept; the least recently used one is forgotten beyond this (its
/// blocks become unknown again: scrubbed at their next claim, refused under `enforce`).
const MAX_LEDGERS: usize = 64;

/// Blocks one ledger remembers. A cache with more distinct claimed blocks than this (far
/// beyond any real one) has its ledger cleared, which is safe in the same way as forgetting.
const MAX_LEDGER_SLOTS: usize = 1 << 24;

/// Ids listed in a `policy_violation` record's detail.
const DETAIL_IDS: usize = 16;

/// Who owns a block: the ids the scope compares.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct OwnerKey {
    tenant: Option<String>,
    request: Option<String>,
}

/// The owner a thread claims as: `None` when it lacks the ids its scope compares.
pub(crate) fn owner_of(ctx: &Context, scope: KvGateScope) -> Option<Arc<OwnerKey>> {
    let tenant = ctx.tenant_id().map(str::to_owned);
    let key = match scope {
        KvGateScope::Request => OwnerKey {
            tenant,
            request: Some(ctx.request_id()?.to_owned()),
        },
        KvGateScope::Tenant => OwnerKey {
            tenant: Some(tenant?),
            request: None,
        },
    };
    Some(Arc::new(key))
}

/// One block's state. A block without an entry is unknown.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Slot {
    /// Verified zero by a scrub, owned by nobody since.
    Clean,
    /// Claimed; `None` is an anonymous owner, whom no claimant matches.
    Owned(Option<Arc<OwnerKey>>),
    /// Its last scrub failed verification.
    Failed,
}

/// A block's entry: its state, and the generation at which the state was set. Every change
/// takes a new generation, so a scrub's verdict can tell whether the block changed hands
/// while the scrub ran (an absent entry is generation 0).
#[derive(Clone, Debug)]
struct Entry {
    slot: Slot,
    generation: u64,
    /// The submission token of the scrub whose verdict set `slot`; 0 when a claim set it.
    by: u64,
}

/// Which cache a ledger belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct LedgerKey {
    pub device: u32,
    pub layout: [u8; 32],
    /// The allocation holding each region, by region index: its block id and the sequence
    /// number of the block's last scrub, which changes with every free, so that the same
    /// memory handed out again is another allocation.
    pub allocations: Vec<(u64, u64)>,
    /// The bytes the regions span, `[start, end)` from each base to the end of its last
    /// block, sorted and merged.
    pub spans: Vec<(u64, u64)>,
}

impl LedgerKey {
    pub(crate) fn new(device: u32, layout: &KvLayout, owners: &[BlockRef]) -> Self {
        LedgerKey {
            device,
            layout: layout.digest(),
            allocations: owners.iter().map(|o| (o.id, o.scrub_seq)).collect(),
            spans: spans_of(layout),
        }
    }

    /// Whether `other` may describe some of the same bytes: the same device, and the same
    /// layout (this cache before its memory was handed out again) or spans that meet
    /// (another view of the same memory, or memory handed out again under another layout).
    /// Two caches carved from one allocation's disjoint parts do not overlap.
    /// Linear in the regions of both (a layout may have 65,536 of them, and this runs under
    /// the ledger lock, itself taken inside a pool lock).
    fn overlaps(&self, other: &LedgerKey) -> bool {
        if self.device != other.device {
            return false;
        }
        self.layout == other.layout || spans_meet(&self.spans, &other.spans)
    }
}

/// The bytes a (validated) layout's regions span, sorted and merged.
fn spans_of(layout: &KvLayout) -> Vec<(u64, u64)> {
    // `validate` checked that no region's end overflows; saturating keeps this total.
    let extent = layout.extent().unwrap_or(u64::MAX);
    let mut spans: Vec<(u64, u64)> = layout
        .regions
        .iter()
        .map(|&base| (base, base.saturating_add(extent)))
        .collect();
    spans.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(spans.len());
    for (start, end) in spans {
        match merged.last_mut() {
            Some(last) if start <= last.1 => last.1 = last.1.max(end),
            _ => merged.push((start, end)),
        }
    }
    merged
}

/// Whether two sorted, merged lists of `[start, end)` spans share a byte: one sweep.
fn spans_meet(a: &[(u64, u64)], b: &[(u64, u64)]) -> bool {
    let (mut i, mut j) = (0, 0);
    while let (Some(&(a0, a1)), Some(&(b0, b1))) = (a.get(i), b.get(j)) {
        if a0 < b1 && b0 < a1 {
            return true;
        }
        // The span that ends first meets nothing further on the other side.
        if a1 <= b1 {
            i += 1;
        } else {
            j += 1;
        }
    }
    false
}

struct Book {
    key: LedgerKey,
    slots: HashMap<u32, Entry>,
    /// Scrubs submitted and not yet settled, per block: while one may still write a block, a
    /// claim must not hand the block over without device work ordered after it.
    in_flight: HashMap<u32, Vec<InFlight>>,
    /// Blocks of `slots` that are FAILED: a ledger holding any is forgotten last.
    failed: usize,
    /// Set when the book is created or cleared: generations of an earlier epoch mean nothing.
    epoch: u64,
    last_used: u64,
}

/// A scrub of a block submitted and not yet settled ([`Ledgers::mark_in_flight`]).
#[derive(Clone, Debug)]
struct InFlight {
    /// When it was submitted, on the ledgers' clock: scrubs of one block submitted later are
    /// ordered after it on the device (they wait on the streams it was recorded on).
    token: u64,
    /// The gate's scrub for this claimant; `None`: the engine's.
    claimant: Option<Option<Arc<OwnerKey>>>,
}

/// The generations of some blocks of one ledger at one moment: when a claim sorted them, or
/// just before a scrub of them was submitted. A scrub's verdict is applied to a block only if
/// its generation is still the one seen then.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Generations {
    pub key: LedgerKey,
    epoch: u64,
    of: HashMap<u32, u64>,
    /// The token of the scrub's [`InFlight`] marks once it was submitted; 0 before.
    in_flight: u64,
}

/// The epoch of a refused claim's [`Generations`], read where no ledger was kept. Never a
/// ledger's: the clock that gives epochs starts at 1.
const NO_LEDGER: u64 = 0;

impl Generations {
    /// Whether block `id` is one of these (not withdrawn, [`Ledgers::mark_in_flight`]).
    pub(crate) fn names(&self, id: u32) -> bool {
        self.of.contains_key(&id)
    }

    /// How many blocks these are.
    pub(crate) fn len(&self) -> usize {
        self.of.len()
    }

    /// `ids` as a cache without a ledger has them: generation 0 of [`NO_LEDGER`].
    fn unknown(key: &LedgerKey, ids: &[u32]) -> Self {
        Generations {
            key: key.clone(),
            epoch: NO_LEDGER,
            of: ids.iter().map(|&id| (id, 0)).collect(),
            in_flight: 0,
        }
    }
}

/// What a claim found, before any scrub.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Sorted {
    /// Blocks that would change owner without a verified scrub (or whose owner is unknown).
    pub dirty: Vec<u32>,
    /// Of the dirty blocks, those whose owner the ledger does not know (no entry: a new
    /// cache's blocks, or a forgotten ledger's), in the order given.
    pub unknown: Vec<u32>,
    /// Of the dirty blocks, those that are dirty only because a scrub of them is in flight
    /// (CLEAN, or the claimant's own): no change of owner.
    pub busy: Vec<u32>,
    /// Blocks whose last scrub failed.
    pub failed: Vec<u32>,
    /// In a pass after the first: blocks another owner claimed during the claim.
    pub taken: Vec<u32>,
    /// The generations of the dirty blocks when they were sorted.
    pub dirty_generations: Generations,
}

impl Sorted {
    /// A claim of `ids` where no ledger is kept: every block dirty and unknown.
    fn all_unknown(key: &LedgerKey, ids: &[u32]) -> Self {
        Sorted {
            dirty: ids.to_vec(),
            unknown: ids.to_vec(),
            busy: Vec::new(),
            failed: Vec::new(),
            taken: Vec::new(),
            dirty_generations: Generations::unknown(key, ids),
        }
    }
}

/// Every cache's ledger. One clock gives recency, epochs and generations: all only grow.
#[derive(Default)]
pub(crate) struct Ledgers {
    books: Vec<Book>,
    clock: u64,
}

impl Ledgers {
    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    /// The index of `key`'s ledger, if one is kept. Reads only: recency is a use's
    /// ([`Ledgers::touch`]), and a call refused before it used the ledger changes nothing.
    fn find(&self, key: &LedgerKey) -> Option<usize> {
        self.books.iter().position(|b| b.key == *key)
    }

    /// Marks ledger `i` as used now (the least recently used one is forgotten first), and
    /// clears it when it outgrew [`MAX_LEDGER_SLOTS`].
    fn touch(&mut self, i: usize) {
        let now = self.tick();
        let book = &mut self.books[i];
        if book.slots.len() > MAX_LEDGER_SLOTS {
            book.slots.clear();
            book.failed = 0;
            // Their verdicts land in no ledger now (another epoch's): no mark would be lifted.
            book.in_flight.clear();
            book.epoch = now;
        }
        book.last_used = now;
    }

    /// The index of `key`'s ledger, used now, and created (empty) when none is kept. Ledgers
    /// of other views of the same memory are dropped first: what they say was written through
    /// another layout, or into memory since handed out again, and says nothing about this one.
    fn book(&mut self, key: &LedgerKey) -> usize {
        if let Some(i) = self.find(key) {
            self.touch(i);
            return i;
        }
        self.create(key)
    }

    /// Creates `key`'s (empty) ledger, which has none: drops the ledgers of other views of its
    /// memory and, at [`MAX_LEDGERS`], forgets the least recently used one.
    fn create(&mut self, key: &LedgerKey) -> usize {
        let now = self.tick();
        self.books.retain(|b| !b.key.overlaps(key));
        if self.books.len() >= MAX_LEDGERS {
            // A forgotten FAILED block is unknown again, which one sampled scrub clears: the
            // ledgers that hold none go first, the least recently used of them.
            let oldest = (0..self.books.len())
                .min_by_key(|&i| (self.books[i].failed > 0, self.books[i].last_used))
                .unwrap_or(0);
            self.books.swap_remove(oldest);
        }
        self.books.push(Book {
            key: key.clone(),
            slots: HashMap::new(),
            in_flight: HashMap::new(),
            failed: 0,
            epoch: now,
            last_used: now,
        });
        self.books.len() - 1
    }

    fn generations_in(&self, i: usize, ids: &[u32]) -> Generations {
        let book = &self.books[i];
        Generations {
            key: book.key.clone(),
            epoch: book.epoch,
            of: ids
                .iter()
                .map(|&id| (id, book.slots.get(&id).map_or(0, |e| e.generation)))
                .collect(),
            in_flight: 0,
        }
    }

    /// The ledger `seen` was read from, if it is still kept in that epoch.
    fn book_of(&self, seen: &Generations) -> Option<usize> {
        self.find(&seen.key)
            .filter(|&i| self.books[i].epoch == seen.epoch)
    }

    /// Whether one of the blocks `seen` names is FAILED now: its scrub is then the re-scrub of
    /// a block that failed verification, which, as the pool's re-scrub of a quarantined block,
    /// zeroes twice and reads back every word before the block may be verified again (a
    /// sampled read would miss one stuck word most of the times it is made).
    pub(crate) fn any_failed(&self, seen: &Generations) -> bool {
        let Some(i) = self.book_of(seen) else {
            return false;
        };
        let slots = &self.books[i].slots;
        seen.of
            .keys()
            .any(|id| slots.get(id).is_some_and(|e| e.slot == Slot::Failed))
    }

    /// A scrub of `seen`'s blocks is about to be submitted (for `claimant`, the gate's; `None`,
    /// the engine's): until it settles, a claim does not hand them over without a scrub of its
    /// own (ordered after this one on the device), and a gate verdict for another claimant
    /// that was submitted before it is not applied (this one may still write the block after
    /// the hand-over). Called under the pool lock that orders the submission.
    ///
    /// A gate scrub's generations were read when its claim sorted the blocks, without the
    /// pool lock: since then another claim may have been handed a block (by its own verdict,
    /// or at once as CLEAN) and written it, or the ledger may have been forgotten. Zeroing
    /// such a block would wipe the other owner's keys and values, so it is withdrawn here,
    /// under the same lock as the marks: removed from `seen`, returned, never scrubbed. From
    /// the marks on, the other claims see this scrub in flight.
    pub(crate) fn mark_in_flight(
        &mut self,
        seen: &mut Generations,
        claimant: Option<&Option<Arc<OwnerKey>>>,
    ) -> Withdrawn {
        let Some(i) = self.book_of(seen) else {
            // The engine's generations were read just now, under this lock (a call tried
            // again keeps its first ones, and its verdict then lands nowhere); a gate
            // scrub's were its claim's, whose blocks the ledger there is now may give anyone.
            return match claimant {
                None => Withdrawn::default(),
                Some(_) => Withdrawn {
                    forgotten: take_all(seen),
                    ..Withdrawn::default()
                },
            };
        };
        let mut withdrawn = Withdrawn::default();
        if let Some(claimant) = claimant {
            for (id, theirs) in self.handed_since(i, seen, claimant) {
                seen.of.remove(&id);
                if theirs {
                    // Handed over to this claim now, as a claim hands over a block it finds
                    // the claimant's: a new generation, so that a claim of another owner
                    // that sorted the block before withdraws it in turn.
                    self.set(i, id, Slot::Owned(claimant.clone()));
                    withdrawn.theirs.push(id);
                } else {
                    withdrawn.taken.push(id);
                }
            }
            withdrawn.taken.sort_unstable();
            withdrawn.theirs.sort_unstable();
        }
        let token = self.tick();
        seen.in_flight = token;
        let book = &mut self.books[i];
        for &id in seen.of.keys() {
            book.in_flight.entry(id).or_default().push(InFlight {
                token,
                claimant: claimant.cloned(),
            });
        }
        withdrawn
    }

    /// Of `seen`'s blocks in ledger `i`, those a claim made meanwhile was handed (a claim
    /// holds them, and may have written them), each with whether that claim's owner is
    /// `claimant` (an anonymous one is nobody's). The claimant's own are left to the scrub
    /// while another scrub of them is in flight: as for a claim that finds them so, they are
    /// handed over only through device work ordered after that scrub.
    fn handed_since(
        &self,
        i: usize,
        seen: &Generations,
        claimant: &Option<Arc<OwnerKey>>,
    ) -> Vec<(u32, bool)> {
        let slots = &self.books[i].slots;
        seen.of
            .iter()
            .filter_map(|(&id, &then)| {
                let e = slots.get(&id).filter(|e| e.generation != then)?;
                match &e.slot {
                    Slot::Owned(Some(owner)) if claimant.as_ref() == Some(owner) => {
                        (!self.scrubbing(i, id)).then_some((id, true))
                    }
                    Slot::Owned(_) => Some((id, false)),
                    Slot::Clean | Slot::Failed => None,
                }
            })
            .collect()
    }

    /// Lifts `seen`'s [`InFlight`] marks, which it no longer names: its scrub launched
    /// nothing (a call tried again marks anew).
    pub(crate) fn unmark_in_flight(&mut self, seen: &mut Generations) {
        self.lift_marks(seen);
        seen.in_flight = 0;
    }

    /// Lifts `seen`'s [`InFlight`] marks: its scrub settled, or launched nothing.
    pub(crate) fn lift_marks(&mut self, seen: &Generations) {
        let token = seen.in_flight;
        if token == 0 {
            return;
        }
        let Some(i) = self.book_of(seen) else {
            return;
        };
        let book = &mut self.books[i];
        for id in seen.of.keys() {
            if let Some(marks) = book.in_flight.get_mut(id) {
                marks.retain(|m| m.token != token);
                if marks.is_empty() {
                    book.in_flight.remove(id);
                }
            }
        }
    }

    /// Whether a scrub of block `id` of ledger `i` is in flight.
    fn scrubbing(&self, i: usize, id: u32) -> bool {
        self.books[i].in_flight.contains_key(&id)
    }

    /// Whether the gate's scrub of block `id` for another claimant than `claimant` (an
    /// anonymous one is always another), submitted after the one with token `after`, is in
    /// flight: the block goes to that claim, whose scrub may still write it. (An engine scrub
    /// submitted later is the engine freeing the block while it is claimed: the engine's
    /// doing, as the claimant's own later claim is the claimant's.)
    fn scrubbed_later(
        &self,
        i: usize,
        id: u32,
        after: u64,
        claimant: &Option<Arc<OwnerKey>>,
    ) -> bool {
        let another = |m: &InFlight| match &m.claimant {
            None => false,
            Some(Some(owner)) => claimant.as_ref() != Some(owner),
            Some(None) => true,
        };
        self.books[i]
            .in_flight
            .get(&id)
            .is_some_and(|marks| marks.iter().any(|m| m.token > after && another(m)))
    }

    fn set(&mut self, i: usize, id: u32, slot: Slot) {
        self.set_by(i, id, slot, 0);
    }

    /// [`Ledgers::set`], by the verdict of the scrub submitted with token `by`.
    fn set_by(&mut self, i: usize, id: u32, slot: Slot, by: u64) {
        let generation = self.tick();
        let book = &mut self.books[i];
        let now_failed = slot == Slot::Failed;
        let entry = Entry {
            slot,
            generation,
            by,
        };
        let was_failed = book
            .slots
            .insert(id, entry)
            .is_some_and(|e| e.slot == Slot::Failed);
        match (was_failed, now_failed) {
            (false, true) => book.failed += 1,
            (true, false) => book.failed -= 1,
            _ => {}
        }
    }

    /// Sorts a claim's blocks and, unless `all_or_nothing` and some block is dirty or failed,
    /// hands the others (clean, or already the claimant's) to `claimant` at once, under the
    /// same lock that read them.
    #[cfg(test)]
    pub(crate) fn claim(
        &mut self,
        key: &LedgerKey,
        ids: &[u32],
        claimant: &Option<Arc<OwnerKey>>,
        all_or_nothing: bool,
    ) -> Sorted {
        self.claim_pass(key, ids, claimant, all_or_nothing, false)
    }

    /// [`Ledgers::claim`], for a claim's pass after the first (its ledger was forgotten while
    /// it scrubbed, when `again`): a block another owner holds now was claimed during this
    /// claim, so it is `taken`, not scrubbed away from that owner.
    pub(crate) fn claim_pass(
        &mut self,
        key: &LedgerKey,
        ids: &[u32],
        claimant: &Option<Arc<OwnerKey>>,
        all_or_nothing: bool,
        again: bool,
    ) -> Sorted {
        // A claim that may be refused reads the ledger first and uses it (recency, creation,
        // the size cap) only once it is not refused: a refused claim changes nothing.
        let i = if all_or_nothing {
            match self.find(key) {
                Some(i) if self.books[i].slots.len() <= MAX_LEDGER_SLOTS => i,
                // No ledger (or one the cap is to clear): every block is unknown, so the
                // claim is refused, and it must change nothing, not even the ledgers of other
                // views of the memory a new one would replace.
                _ if !ids.is_empty() => return Sorted::all_unknown(key, ids),
                _ => self.book(key),
            }
        } else {
            self.book(key)
        };
        let (mut dirty, mut failed, mut free) = (Vec::new(), Vec::new(), Vec::new());
        let (mut taken, mut unknown, mut busy) = (Vec::new(), Vec::new(), Vec::new());
        for &id in ids {
            // A block a scrub may still write is handed over only after device work of this
            // claim's own, ordered after that scrub: it is dirty until the scrub settles.
            let scrubbing = self.scrubbing(i, id);
            let mut hand = |id| {
                if scrubbing {
                    dirty.push(id);
                    busy.push(id);
                } else {
                    free.push(id);
                }
            };
            match self.books[i].slots.get(&id).map(|e| &e.slot) {
                Some(Slot::Clean) => hand(id),
                Some(Slot::Owned(Some(owner))) if claimant.as_ref() == Some(owner) => hand(id),
                Some(Slot::Failed) => failed.push(id),
                // Anyone else's now, an anonymous claimant's too: claimed during this claim.
                Some(Slot::Owned(_)) if again => taken.push(id),
                Some(Slot::Owned(_)) => dirty.push(id),
                None => {
                    dirty.push(id);
                    unknown.push(id);
                }
            }
        }
        let dirty_generations = self.generations_in(i, &dirty);
        let refuse = all_or_nothing && (!dirty.is_empty() || !failed.is_empty());
        if !refuse {
            if all_or_nothing {
                self.touch(i);
            }
            for id in free {
                self.set(i, id, Slot::Owned(claimant.clone()));
            }
        }
        Sorted {
            dirty,
            unknown,
            busy,
            failed,
            taken,
            dirty_generations,
        }
    }

    /// The generations of `ids` in `key`'s ledger now, before a scrub of them is submitted.
    /// The ledger is used (and created when none is kept) now, not when the verdict lands:
    /// from here on a claim through another view of the memory must not hand out what this
    /// scrub is zeroing (creating the ledger drops theirs), and the verdict must land in the
    /// ledger read here. A scrub the backend would refuse before launching anything (a graph
    /// capture, exit) is refused before this is read (`launch_kv`), so that it changes none.
    pub(crate) fn generations(&mut self, key: &LedgerKey, ids: &[u32]) -> Generations {
        let i = self.book(key);
        self.generations_in(i, ids)
    }

    /// Applies a scrub's verdicts to the blocks unchanged since `seen`: failed blocks become
    /// FAILED; verified ones CLEAN, or, for the gate's scrub, the claimant's. A verified block
    /// that changed but is CLEAN now (another scrub's verdict landed meanwhile, and nobody
    /// took it since) may still go to the gate's claimant, unless the gate's scrub of it for
    /// another claimant, submitted later, may still write it (it goes to that claimant, as
    /// `taken`). Lifts the scrub's [`InFlight`] marks. Returns the verified blocks whose
    /// verdict could not be applied, by why (nobody may take them as verified by this scrub),
    /// and those it was applied to although another claim of the claimant was handed them
    /// since `seen` ([`Unapplied::changed_meanwhile`]).
    pub(crate) fn settle(
        &mut self,
        seen: &Generations,
        verified: &[u32],
        failed: &[u32],
        claimant: Option<&Option<Arc<OwnerKey>>>,
    ) -> Unapplied {
        self.lift_marks(seen);
        let Some(i) = self.book_of(seen) else {
            return Unapplied::forgotten(verified);
        };
        let unchanged = |books: &[Book], id: u32| {
            let now = books[i].slots.get(&id).map_or(0, |e| e.generation);
            seen.of.get(&id) == Some(&now)
        };
        let slot_of = |books: &[Book], id: u32| books[i].slots.get(&id).map(|e| e.slot.clone());
        for &id in failed {
            // A CLEAN block has no owner a failure could hurt, and another verdict may have
            // made it CLEAN meanwhile: this scrub read residue, so it must not stay CLEAN.
            // Nor may the claimant's own (another claim of it was handed the block while this
            // scrub was in flight) unless a scrub submitted after this one verified it: an
            // earlier scrub's verdict would make it CLEAN next.
            let now = slot_of(&self.books, id);
            let own =
                matches!((&now, claimant), (Some(Slot::Owned(Some(o))), Some(Some(c))) if o == c);
            let by = self.books[i].slots.get(&id).map_or(0, |e| e.by);
            let overtaken_by_later = by > seen.in_flight;
            if unchanged(&self.books, id)
                || now == Some(Slot::Clean)
                || (own && !overtaken_by_later)
            {
                self.set(i, id, Slot::Failed);
            }
        }
        let mut unapplied = Unapplied::default();
        for &id in verified {
            // Changed, but CLEAN (another verdict landed, nobody took it since) or already the
            // claimant's own (the same request claimed it twice at once): still the claimant's.
            let now = slot_of(&self.books, id);
            let free_for_claimant = claimant.is_some_and(|c| match &now {
                Some(Slot::Clean) => true,
                Some(Slot::Owned(Some(owner))) => c.as_ref() == Some(owner),
                _ => false,
            });
            let overtaken = claimant.is_some_and(|c| self.scrubbed_later(i, id, seen.in_flight, c));
            let still_seen = unchanged(&self.books, id);
            let applies = (still_seen || free_for_claimant) && !overtaken;
            if !applies {
                // Its last verdict is another scrub's failure, or another claim owns it.
                match now {
                    Some(Slot::Failed) => unapplied.failed.push(id),
                    _ => unapplied.taken.push(id),
                }
                continue;
            }
            if !still_seen && now != Some(Slot::Clean) {
                unapplied.changed_meanwhile.push(id);
            }
            let slot = match claimant {
                Some(owner) => Slot::Owned(owner.clone()),
                None => Slot::Clean,
            };
            self.set_by(i, id, slot, seen.in_flight);
        }
        unapplied
    }
}

/// The verified blocks of a scrub whose verdict the ledger could not apply, by why, and those
/// it applied although another claim of the claimant had been handed them meanwhile.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Unapplied {
    /// Another claim owns them now.
    pub taken: Vec<u32>,
    /// Another scrub's failed verdict landed on them meanwhile: their last verdict fails.
    pub failed: Vec<u32>,
    /// The ledger the verdicts were for was forgotten (evicted, cleared, replaced by another
    /// description of the memory) or describes other allocations now: nothing is known of
    /// them, which a claim settles by claiming them again.
    pub forgotten: Vec<u32>,
    /// Not one of the above: the verdict was applied, but another claim of the claimant had
    /// been handed the block since this scrub was submitted (its scrub's verdict landed
    /// first). That claim counted the change of owner as it classed the block: claimed, as
    /// if found so, and not counted again.
    pub changed_meanwhile: Vec<u32>,
}

impl Unapplied {
    /// Every block whose verdict was not applied, whatever the reason.
    #[cfg(test)]
    fn all(&self) -> Vec<u32> {
        let mut all: Vec<u32> = [&self.taken, &self.failed, &self.forgotten]
            .into_iter()
            .flatten()
            .copied()
            .collect();
        all.sort_unstable();
        all
    }

    fn forgotten(verified: &[u32]) -> Self {
        Unapplied {
            forgotten: verified.to_vec(),
            ..Unapplied::default()
        }
    }
}

/// The blocks of a gate scrub withdrawn just before its submission
/// ([`Ledgers::mark_in_flight`]): nothing zeroes or verifies them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Withdrawn {
    /// Another claim was handed them after this claim sorted them: theirs now.
    pub taken: Vec<u32>,
    /// Another claim of the claimant was handed them after this claim sorted them: the
    /// claimant's already (claimed, as if found so).
    pub theirs: Vec<u32>,
    /// Their ledger was forgotten after this claim sorted them: to claim again.
    pub forgotten: Vec<u32>,
}

impl Withdrawn {
    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.count() == 0
    }

    /// How many blocks were withdrawn.
    pub(crate) fn count(&self) -> usize {
        self.taken.len() + self.theirs.len() + self.forgotten.len()
    }

    /// Every withdrawn block.
    pub(crate) fn all(&self) -> HashSet<u32> {
        [&self.taken, &self.theirs, &self.forgotten]
            .into_iter()
            .flatten()
            .copied()
            .collect()
    }

    pub(crate) fn extend(&mut self, more: Withdrawn) {
        self.taken.extend(more.taken);
        self.theirs.extend(more.theirs);
        self.forgotten.extend(more.forgotten);
    }
}

/// Empties `seen`, returning its blocks (sorted).
fn take_all(seen: &mut Generations) -> Vec<u32> {
    let mut ids: Vec<u32> = seen.of.drain().map(|(id, _)| id).collect();
    ids.sort_unstable();
    ids
}

/// Passes a claim makes over blocks whose ledger was forgotten while it scrubbed them.
const MAX_CLAIM_PASSES: usize = 4;

/// What one pass of a claim did with its ids ([`Allocator::claim_round`]).
#[derive(Default)]
struct Round {
    /// Not handed over: their last verdict failed.
    refused: HashSet<u32>,
    /// Not handed over: another claim took them.
    taken: HashSet<u32>,
    /// Scrubbed, verified and handed over by this pass.
    gate_scrubbed: Vec<u32>,
    /// Of the blocks this pass scrubbed, those whose owner the ledger did not know.
    unknown: HashSet<u32>,
    /// Of the blocks this pass scrubbed, those dirty only because a scrub was in flight.
    busy: HashSet<u32>,
    /// Named while FAILED (a record says so).
    failed_before: Vec<u32>,
    /// Refused because the gate's own scrub of them in this claim failed verification, or
    /// another scrub's failure overtook it (a record says so).
    failed_now: Vec<u32>,
    /// Their ledger was forgotten: to claim again (verified by this pass's scrub, or withdrawn
    /// from it).
    forgotten: Vec<u32>,
    /// The allocation of each region (id, scrub sequence) this pass found: a later pass of
    /// the claim must find the same ones.
    owners: Vec<(u64, u64)>,
}

/// What a claim's first pass found, for a pass after it ([`Allocator::claim_round`]).
#[derive(Clone, Copy)]
struct EarlierPass<'a> {
    /// The allocation of each region (id, scrub sequence): the cache must still be those.
    owners: &'a [(u64, u64)],
    /// Of the blocks it scrubbed, those whose owner the ledger did not know, and those dirty
    /// only because a scrub of them was in flight.
    unknown: &'a HashSet<u32>,
    busy: &'a HashSet<u32>,
}

/// What a `kvh_claim_blocks` call did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KvClaimReport {
    /// Blocks handed to the caller.
    pub claimed: u64,
    /// Blocks the gate scrubbed, verified and handed over, in the order given. Not those
    /// another claim of the caller's owner was handed meanwhile: they are claimed, as blocks
    /// found the owner's are.
    pub gate_scrubbed: Vec<u32>,
    /// Of `gate_scrubbed`, those whose owner the gate did not know yet (a new cache's first
    /// claims, or a forgotten ledger's), in the order given. The others changed owner
    /// without a verified scrub: a free path of the engine that skips `kvh_scrub_blocks`, or
    /// a claim outside a request's context.
    pub unknown_owner: Vec<u32>,
    /// Of `gate_scrubbed`, those the gate scrubbed only because another scrub of them was
    /// still in flight when the claim found them CLEAN (or already the claimant's), in the
    /// order given: no change of owner. The blocks of `gate_scrubbed` in neither this list
    /// nor `unknown_owner` changed owner without a verified scrub, what
    /// `kv_gate_owner_changed_blocks` counts.
    pub in_flight: Vec<u32>,
    /// Blocks not handed over because their scrub failed verification (now or earlier), in
    /// the order given. They must not be used, by anyone, until a scrub verifies them.
    pub refused: Vec<u32>,
    /// Blocks not handed over because another claim took them while this claim ran (after it
    /// sorted them, or while the gate scrubbed them)
    /// for this one (two requests were given the same blocks), in the order given. They are
    /// the other claimant's: this caller must not use them.
    pub taken: Vec<u32>,
}

/// Why a claim did not run, or did not finish.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KvClaimError {
    /// Refused before any change (bad layout or ids, memory not live, device), refused as
    /// not live after the claim sorted or scrubbed its blocks (its cache was freed meanwhile:
    /// nothing is handed over), or the gate's scrub did not finish; see [`KvScrubError`]. In the second case blocks may have been
    /// handed over already (those that needed no scrub, those the stopped scrub verified
    /// before it stopped, and, when the claim was made again after its ledger was forgotten,
    /// those its first scrub verified): the call failed as a whole, but the ledger names the
    /// claimant as their owner, which is safe (a later claim by another owner scrubs them
    /// again).
    #[error(transparent)]
    Scrub(#[from] KvScrubError),
    /// `kv_gate = enforce` and blocks would change owner without a verified scrub (or failed
    /// their last one). Nothing was handed over.
    #[error("{} of the KV blocks would change owner without a verified scrub (first: {}); \
             kv_gate = enforce: scrub them with kvh_scrub_blocks before claiming them",
             .blocks.len(), .blocks.first().copied().unwrap_or_default())]
    Unscrubbed { blocks: Vec<u32> },
}

/// Who a KV scrub runs for: the engine (`kvh_scrub_blocks`), or the gate inside a claim, with
/// the claimant and the generations its claim saw.
pub(super) enum ScrubFor<'a> {
    Engine,
    Gate {
        claimant: &'a Option<Arc<OwnerKey>>,
        seen: Generations,
        /// Of the blocks to scrub, those whose owner the ledger does not know (the record
        /// says how many; the counters split the verified ones by it).
        unknown: &'a HashSet<u32>,
        /// Of the blocks to scrub, those dirty only because a scrub of them was in flight:
        /// not counted as changes of owner.
        busy: &'a HashSet<u32>,
        /// The allocation of each region (id, scrub sequence) the claim sorted the blocks in:
        /// the scrub launches only into those (memory freed and handed out again since is
        /// another caller's).
        owners: &'a [(u64, u64)],
    },
}

impl Allocator {
    /// Gives blocks `ids` of the paged KV cache `layout` on `device` to the calling thread's
    /// request (or tenant, by `kv_gate_scope`). Blocks that would change owner without a
    /// verified scrub since their last owner are scrubbed on `stream` and verified first
    /// (`kv_gate = scrub`), or make the whole claim fail (`enforce`). `Ok` lists the blocks
    /// that were not handed over ([`KvClaimReport::refused`], [`KvClaimReport::taken`]);
    /// they must not be used.
    pub fn claim_kv_blocks(
        &self,
        layout: &KvLayout,
        ids: &[u32],
        device: i32,
        stream: StreamHandle,
    ) -> Result<KvClaimReport, KvClaimError> {
        let stream = stream.shared();
        let dev = match self.kv_device(device) {
            Ok(dev) => dev,
            Err(e @ KvScrubError::InvalidDevice { .. }) if !self.inner.pools.is_empty() => {
                // Counted and logged on device 0's pool, as an invalid free is.
                return Err(self.refuse_claim(0, e.to_string(), e.into()));
            }
            Err(e) => return Err(e.into()),
        };
        let checked = layout.validate().and_then(|()| check_ids(layout, ids));
        if let Err(e) = checked {
            return Err(self.refuse_claim(dev, e.to_string(), e.into()));
        }
        let mode = self.inner.config.kv_gate;
        if mode == KvGateMode::Off || ids.is_empty() {
            return Ok(KvClaimReport {
                claimed: ids.len() as u64,
                ..KvClaimReport::default()
            });
        }
        let mut round = self.claim_round(dev, layout, ids, device, stream, mode, None)?;
        let first_owners = std::mem::take(&mut round.owners);
        let mut passes = 1;
        let mut lost_every_pass = Vec::new();
        while !round.forgotten.is_empty() {
            // Verified, but the ledger that would have recorded it was forgotten meanwhile:
            // claimed once more through the ledger there is now, so that it names the
            // claimant, or says that another claim took them since. Lost every time (ledgers
            // thrashing: claims through another layout of the same memory replacing this
            // one's ledger, or more caches claiming than the gate keeps ledgers for), they
            // are not handed over: reported with the taken ones, which the record says.
            if passes == MAX_CLAIM_PASSES {
                let lost = std::mem::take(&mut round.forgotten);
                self.report_gate_violation(
                    dev,
                    format!(
                        "the ledger of this KV cache was forgotten {MAX_CLAIM_PASSES} times while \
                         kvh_claim_blocks scrubbed {} blocks (ids {}): they were not handed over \
                         (reported as taken); claims through another layout of the same memory \
                         replace this one's ledger (claim through one layout), or more KV caches \
                         claim than the gate keeps ledgers for ({MAX_LEDGERS})",
                        lost.len(),
                        id_list(&in_order(ids, &lost.iter().copied().collect()))
                    ),
                );
                lost_every_pass = lost;
                break;
            }
            passes += 1;
            let forgotten = std::mem::take(&mut round.forgotten);
            let earlier = EarlierPass {
                owners: &first_owners,
                unknown: &round.unknown,
                busy: &round.busy,
            };
            let pass =
                self.claim_round(dev, layout, &forgotten, device, stream, mode, Some(earlier));
            let again = match pass {
                Ok(again) => again,
                Err(e) => {
                    self.report_failed(dev, &round);
                    self.report_taken(dev, ids, &round.taken);
                    return Err(e);
                }
            };
            // Handed over through this pass's scrub. (One this pass found CLEAN or the
            // claimant's was handed over without it: another scrub, or another claim of the
            // claimant, made it so, and that one answers for it, as it found the block.)
            round.gate_scrubbed.extend(again.gate_scrubbed);
            round.refused.extend(again.refused);
            round.taken.extend(again.taken);
            round.failed_before.extend(again.failed_before);
            round.failed_now.extend(again.failed_now);
            round.forgotten = again.forgotten;
        }
        self.report_failed(dev, &round);
        let Round {
            refused,
            mut taken,
            gate_scrubbed,
            unknown,
            busy,
            ..
        } = round;
        let gate_scrubbed: HashSet<u32> = gate_scrubbed.into_iter().collect();
        // The first pass says whose blocks they were; a later pass only re-files them.
        let unknown_owner: HashSet<u32> = unknown.intersection(&gate_scrubbed).copied().collect();
        let in_flight: HashSet<u32> = busy.intersection(&gate_scrubbed).copied().collect();
        let gate_scrubbed = in_order(ids, &gate_scrubbed);
        self.report_taken(dev, ids, &taken);
        // Recorded above as lost; reported to the caller with the taken ones.
        taken.extend(lost_every_pass);
        let claimed = (ids.len() - refused.len() - taken.len()) as u64;
        self.with_pool(dev, |pool, _, _, _| {
            let c = &mut pool.stats.counters;
            c.kv_claim_calls += 1;
            c.kv_blocks_claimed += claimed;
        });
        Ok(KvClaimReport {
            claimed,
            gate_scrubbed,
            unknown_owner: in_order(ids, &unknown_owner),
            in_flight: in_order(ids, &in_flight),
            refused: in_order(ids, &refused),
            taken: in_order(ids, &taken),
        })
    }

    /// Records a refusal the engine made itself (`kvh_refuse_blocks`): blocks `ids` of the
    /// paged KV cache `layout` on `device` are not given to the calling thread's request, for
    /// `reason` (one block given to two requests in one step, which no scrub can separate).
    /// Counted as a refused claim and logged as one (`policy_violation`, policy `kv_gate`);
    /// nothing is scrubbed, handed over or changed in the ledger. The layout and ids are
    /// checked as a claim's are (geometry and distinct ids; the cache need not be live). No
    /// ids refuse nothing: checked, then neither counted nor logged.
    pub fn refuse_kv_blocks(
        &self,
        layout: &KvLayout,
        ids: &[u32],
        device: i32,
        reason: &str,
    ) -> Result<(), KvScrubError> {
        let dev = self.kv_device(device)?;
        layout.validate().and_then(|()| check_ids(layout, ids))?;
        if ids.is_empty() {
            // Refuses nothing: as a claim or a scrub of no block, it changes nothing.
            return Ok(());
        }
        self.with_pool(dev, |pool, _, _, _| {
            pool.stats.counters.kv_claims_refused += 1
        });
        self.report_gate_violation(
            dev,
            format!(
                "the engine refused {} KV blocks to this request (ids {}): {reason}",
                ids.len(),
                id_list(ids)
            ),
        );
        Ok(())
    }

    /// Records the blocks of `ids` a claim did not hand over because another claim took them
    /// while the gate scrubbed them.
    fn report_taken(&self, dev: u32, ids: &[u32], taken: &HashSet<u32>) {
        if taken.is_empty() {
            return;
        }
        self.report_gate_violation(
            dev,
            format!(
                "{} KV blocks changed hands while this claim ran (after it sorted them, or while \
                 the gate scrubbed them) \
                 (ids {}): another claim took them; they were not handed over",
                taken.len(),
                id_list(&in_order(ids, taken))
            ),
        );
    }

    /// Records the blocks a claim did not hand over because a scrub of them failed
    /// verification: before the claim, or the gate's own scrub in it.
    fn report_failed(&self, dev: u32, round: &Round) {
        self.report_failed_before(dev, &round.failed_before);
        self.report_failed_now(dev, &round.failed_now);
    }

    /// Records blocks a claim did not hand over because a scrub of them failed verification
    /// while the gate scrubbed them: its own scrub, or another's of the same blocks whose
    /// verdict overtook it. Also called by a gate scrub that then failed as a whole
    /// ([`Allocator::scrub_kv`]), whose claim hands nothing over.
    pub(super) fn report_failed_now(&self, dev: u32, failed: &[u32]) {
        if failed.is_empty() {
            return;
        }
        self.report_gate_violation(
            dev,
            format!(
                "{} KV blocks failed verification while the gate scrubbed them for \
                 kvh_claim_blocks (its scrub, or another scrub of them) (ids {}); they were \
                 not handed over",
                failed.len(),
                id_list(failed)
            ),
        );
    }

    /// Records that a claim named blocks whose last scrub failed: they are never handed over.
    fn report_failed_before(&self, dev: u32, failed_before: &[u32]) {
        if failed_before.is_empty() {
            return;
        }
        self.report_gate_violation(
            dev,
            format!(
                "kvh_claim_blocks named {} KV blocks whose last scrub failed verification \
                 (ids {}); they were not handed over",
                failed_before.len(),
                id_list(failed_before)
            ),
        );
    }

    /// One pass of a claim over `ids`: sorts them against the ledger, refuses (enforce) or
    /// scrubs (scrub) those that would change owner, and says what became of each. `earlier`:
    /// in a pass after the first, over blocks whose ledger was forgotten meanwhile
    /// ([`Ledgers::claim_pass`]), what the first pass found: the allocations the cache must
    /// still be (one freed and handed out again at its addresses is another caller's), and
    /// whose each block was when the claim began (the ledger there is now knows nothing of
    /// them): what the claim's report says of them, and what this pass's scrub counts.
    #[allow(clippy::too_many_arguments)] // the claim's own arguments, and which pass
    fn claim_round(
        &self,
        dev: u32,
        layout: &KvLayout,
        ids: &[u32],
        device: i32,
        stream: StreamHandle,
        mode: KvGateMode,
        earlier: Option<EarlierPass<'_>>,
    ) -> Result<Round, KvClaimError> {
        let again = earlier.is_some();
        let first = earlier.map(|e| e.owners);
        let claimant = owner_of(&Context::current(), self.inner.config.kv_gate_scope);
        let enforce = mode == KvGateMode::Enforce;
        let owners =
            match self.with_pool(dev, |pool, _, _, _| region_owners(pool, dev, layout, first)) {
                Ok(owners) => owners,
                Err(e) => return Err(self.refuse_claim(dev, e.to_string(), e.into())),
            };
        // Sorted under the ledger lock alone (a large claim must not hold the device's frees):
        // what it hands over is checked below to be the live allocation it was sorted in.
        let key = LedgerKey::new(dev, layout, &owners);
        let sorted = self
            .ledgers()
            .claim_pass(&key, ids, &claimant, enforce, again);
        if enforce && (!sorted.dirty.is_empty() || !sorted.failed.is_empty()) {
            let named: HashSet<u32> = sorted.dirty.iter().chain(&sorted.failed).copied().collect();
            let blocks = in_order(ids, &named);
            let detail = format!(
                "kvh_claim_blocks refused: {} blocks would change owner without a verified \
                 scrub, {} failed their last scrub (ids {})",
                sorted.dirty.len(),
                sorted.failed.len(),
                id_list(&blocks)
            );
            return Err(self.refuse_claim(dev, detail, KvClaimError::Unscrubbed { blocks }));
        }
        let mut round = Round {
            refused: sorted.failed.iter().copied().collect(),
            taken: sorted.taken.iter().copied().collect(),
            failed_before: sorted.failed.clone(),
            owners: owners.iter().map(|o| (o.id, o.scrub_seq)).collect(),
            ..Round::default()
        };
        if sorted.dirty.is_empty() {
            return self.still_live(dev, layout, round);
        }
        round.unknown = sorted.unknown.iter().copied().collect();
        round.busy = sorted.busy.iter().copied().collect();
        if let Some(e) = earlier {
            for &id in &sorted.dirty {
                classify(&mut round.unknown, id, e.unknown.contains(&id));
                classify(&mut round.busy, id, e.busy.contains(&id));
            }
        }
        let gate = ScrubFor::Gate {
            claimant: &claimant,
            seen: sorted.dirty_generations,
            unknown: &round.unknown,
            busy: &round.busy,
            owners: &round.owners,
        };
        let scrubbed = self.scrub_kv(layout, &sorted.dirty, device, stream, gate);
        let (report, unapplied, withdrawn) = match scrubbed {
            Ok(done) => done,
            // The cache was freed since its regions were checked: a refused claim (its record
            // says so, with the blocks that failed before).
            Err(e @ KvScrubError::NotLive { .. }) => {
                self.report_failed_before(dev, &round.failed_before);
                return Err(self.refuse_claim(dev, e.to_string(), e.into()));
            }
            Err(e) => {
                self.report_failed_before(dev, &round.failed_before);
                return Err(e.into());
            }
        };
        round.failed_now = in_order(
            &sorted.dirty,
            &report
                .failed
                .iter()
                .chain(&unapplied.failed)
                .copied()
                .collect(),
        );
        round.refused.extend(round.failed_now.iter().copied());
        round
            .taken
            .extend(unapplied.taken.iter().chain(&withdrawn.taken).copied());
        round.forgotten = unapplied.forgotten;
        round.forgotten.extend(withdrawn.forgotten);
        let meanwhile: HashSet<u32> = unapplied
            .changed_meanwhile
            .iter()
            .chain(&withdrawn.theirs)
            .copied()
            .collect();
        round.gate_scrubbed = sorted
            .dirty
            .iter()
            .copied()
            .filter(|id| {
                !round.refused.contains(id)
                    && !round.taken.contains(id)
                    && !round.forgotten.contains(id)
                    && !meanwhile.contains(id)
            })
            .collect();
        self.still_live(dev, layout, round)
    }

    /// `round`, once its regions are found, under the pool lock, to be the live allocations
    /// it sorted and scrubbed its blocks in. What it handed over (clean blocks, the
    /// claimant's, verified ones) was handed over in the ledger of those allocations, whose
    /// key names their scrub sequence, which every free changes: after a free, that ledger is
    /// a freed memory's (maybe another caller's now, at the same addresses), no later claim
    /// reads it, and the claim is refused (`NotLive`) with nothing taken as handed over.
    fn still_live(&self, dev: u32, layout: &KvLayout, round: Round) -> Result<Round, KvClaimError> {
        let changed = self.with_pool(dev, |pool, _, _, _| {
            region_owners(pool, dev, layout, Some(&round.owners)).err()
        });
        match changed {
            None => Ok(round),
            Some(e) => {
                self.report_failed(dev, &round);
                Err(self.refuse_claim(dev, e.to_string(), e.into()))
            }
        }
    }

    /// Before a KV scrub is submitted (under the pool lock, with its regions resolved): the
    /// generations its verdict will be checked against, when the gate keeps ledgers.
    pub(super) fn kv_generations(
        &self,
        dev: u32,
        layout: &KvLayout,
        owners: &[BlockRef],
        ids: &[u32],
    ) -> Option<Generations> {
        if self.inner.config.kv_gate == KvGateMode::Off {
            return None;
        }
        let key = LedgerKey::new(dev, layout, owners);
        Some(self.ledgers().generations(&key, ids))
    }

    /// After a KV scrub: applies its verdicts to the blocks unchanged since `seen` and returns
    /// what became of the verified blocks it could not apply as seen (see
    /// [`Ledgers::settle`]). A gate scrub whose regions turned out to be other allocations
    /// than its claim saw applies nothing.
    ///
    /// Under the device's pool lock, which a scrub holds from its in-flight marks to its
    /// submission: a verdict never meets the marks of a scrub whose submission then fails
    /// with nothing launched (out of memory), which would make it give way, as `taken`, to
    /// a scrub that never ran.
    pub(super) fn settle_kv(
        &self,
        seen: &Generations,
        scrubbed: &LedgerKey,
        verified: &[u32],
        failed: &[u32],
        claimant: Option<&Option<Arc<OwnerKey>>>,
    ) -> Unapplied {
        self.with_pool(seen.key.device, |_, _, _, _| {
            if seen.key != *scrubbed {
                self.ledgers().lift_marks(seen);
                return Unapplied::forgotten(verified);
            }
            self.ledgers().settle(seen, verified, failed, claimant)
        })
    }

    pub(super) fn ledgers(&self) -> std::sync::MutexGuard<'_, Ledgers> {
        // The ledger holds no invariant a panicking holder could break half way that matters
        // more than availability: every entry is a complete value.
        self.inner
            .kv_ledgers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Counts and logs a refused claim (policy `kv_gate`), then returns its error.
    #[cold]
    fn refuse_claim(&self, dev: u32, detail: String, e: KvClaimError) -> KvClaimError {
        self.with_pool(dev, |pool, _, _, _| {
            pool.stats.counters.kv_claims_refused += 1
        });
        let detail = if detail.starts_with("kvh_claim_blocks") {
            detail
        } else {
            format!("kvh_claim_blocks refused: {detail}")
        };
        self.report_gate_violation(dev, detail);
        e
    }

    #[cold]
    fn report_gate_violation(&self, dev: u32, detail: String) {
        self.with_pool(dev, |_, _, _, after| {
            after.events.push(Event {
                at: SystemTime::now(),
                kind: EventKind::PolicyViolation {
                    policy: "kv_gate",
                    detail,
                },
                context: Context::current(),
                block: None,
                addr: None,
            });
        });
    }
}

/// The ids of `ids` that are in `set`, in the order of `ids`.
/// The allocation holding each region of `layout` in `pool` (device `dev`), checked LIVE and
/// covering the region's blocks, and the one `first` names for it (id, scrub sequence) when
/// given.
fn region_owners(
    pool: &DevicePool,
    dev: u32,
    layout: &KvLayout,
    first: Option<&[(u64, u64)]>,
) -> Result<Vec<BlockRef>, KvScrubError> {
    let extent = layout.extent().unwrap_or(u64::MAX); // validated
    layout
        .regions
        .iter()
        .enumerate()
        .map(|(region, &base)| {
            pool.live_range(base, extent, StreamHandle(0))
                .map(|(owner, _)| owner)
                .filter(|owner| {
                    first.is_none_or(|f| f.get(region) == Some(&(owner.id, owner.scrub_seq)))
                })
                .ok_or(KvScrubError::NotLive {
                    region,
                    base,
                    extent,
                    blocks: layout.blocks_per_region,
                    device: dev,
                })
        })
        .collect()
}

/// Puts `id` in `set` when `member`, else takes it out.
fn classify(set: &mut HashSet<u32>, id: u32, member: bool) {
    if member {
        set.insert(id);
    } else {
        set.remove(&id);
    }
}

fn in_order(ids: &[u32], set: &HashSet<u32>) -> Vec<u32> {
    ids.iter().copied().filter(|id| set.contains(id)).collect()
}

/// The first ids of a list, for a record's detail.
fn id_list(ids: &[u32]) -> String {
    let shown: Vec<String> = ids.iter().take(DETAIL_IDS).map(u32::to_string).collect();
    let more = ids.len().saturating_sub(DETAIL_IDS);
    if more > 0 {
        format!("{} and {more} more", shown.join(", "))
    } else {
        shown.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A key whose regions lie in `allocations`, each spanning its own 64 KiB.
    fn key(allocations: Vec<u64>) -> LedgerKey {
        LedgerKey {
            device: 0,
            layout: [7; 32],
            spans: allocations.iter().map(|&a| span_of_allocation(a)).collect(),
            allocations: allocations.into_iter().map(|a| (a, 1)).collect(),
        }
    }

    fn span_of_allocation(a: u64) -> (u64, u64) {
        (a << 16, (a + 1) << 16)
    }

    fn who(tenant: &str, request: &str) -> Option<Arc<OwnerKey>> {
        let ctx = Context::new(Some(tenant), Some(request), None).unwrap();
        owner_of(&ctx, KvGateScope::Request)
    }

    /// An engine scrub of `clean` and `failed` that nothing overlapped.
    fn scrub(l: &mut Ledgers, k: &LedgerKey, clean: &[u32], failed: &[u32]) {
        let ids: Vec<u32> = clean.iter().chain(failed).copied().collect();
        let seen = l.generations(k, &ids);
        assert_eq!(l.settle(&seen, clean, failed, None), Unapplied::default());
    }

    /// (dirty, failed) of a claim.
    fn sort(
        l: &mut Ledgers,
        k: &LedgerKey,
        ids: &[u32],
        who: &Option<Arc<OwnerKey>>,
    ) -> (Vec<u32>, Vec<u32>) {
        let s = l.claim(k, ids, who, false);
        (s.dirty, s.failed)
    }

    const NONE: (Vec<u32>, Vec<u32>) = (Vec::new(), Vec::new());

    #[test]
    fn unknown_blocks_are_dirty_and_own_blocks_are_free() {
        let mut l = Ledgers::default();
        let (k, a) = (key(vec![1]), who("t", "a"));
        assert_eq!(sort(&mut l, &k, &[1, 2], &a).0, vec![1, 2]);
        scrub(&mut l, &k, &[1, 2], &[]);
        assert_eq!(sort(&mut l, &k, &[1, 2], &a), NONE);
        // The same request claims again: no scrub.
        assert_eq!(sort(&mut l, &k, &[2], &a), NONE);
        // Another request of the same tenant: dirty under the request scope.
        assert_eq!(sort(&mut l, &k, &[2], &who("t", "b")).0, vec![2]);
    }

    #[test]
    fn anonymous_owners_match_nobody_not_even_themselves() {
        let mut l = Ledgers::default();
        let k = key(vec![1]);
        scrub(&mut l, &k, &[5], &[]);
        assert_eq!(sort(&mut l, &k, &[5], &None), NONE);
        assert_eq!(sort(&mut l, &k, &[5], &None).0, vec![5]);
        assert_eq!(sort(&mut l, &k, &[5], &who("t", "a")).0, vec![5]);
    }

    #[test]
    fn the_tenant_scope_lets_a_tenants_requests_share() {
        let mut l = Ledgers::default();
        let k = key(vec![1]);
        let t = |tenant, request| {
            owner_of(
                &Context::new(Some(tenant), Some(request), None).unwrap(),
                KvGateScope::Tenant,
            )
        };
        scrub(&mut l, &k, &[0], &[]);
        assert_eq!(sort(&mut l, &k, &[0], &t("x", "r1")), NONE);
        assert_eq!(sort(&mut l, &k, &[0], &t("x", "r2")), NONE);
        assert_eq!(sort(&mut l, &k, &[0], &t("y", "r3")).0, vec![0]);
        // No tenant id: anonymous under this scope.
        let ctx = Context::new(None, Some("r"), None).unwrap();
        assert_eq!(owner_of(&ctx, KvGateScope::Tenant), None);
        assert!(owner_of(&ctx, KvGateScope::Request).is_some());
    }

    #[test]
    fn failed_blocks_stay_refused_until_a_scrub_verifies_them() {
        let mut l = Ledgers::default();
        let (k, a) = (key(vec![1]), who("t", "a"));
        scrub(&mut l, &k, &[1], &[2]);
        assert_eq!(sort(&mut l, &k, &[1, 2], &a), (vec![], vec![2]));
        scrub(&mut l, &k, &[2], &[]);
        assert_eq!(sort(&mut l, &k, &[2], &a), NONE);
    }

    /// A CLEAN block (or the claimant's own) that a scrub may still write is dirty for a
    /// claim until that scrub settles: handing it over at once would let the scrub write over
    /// what the new owner writes.
    #[test]
    fn a_block_a_scrub_may_still_write_is_handed_over_only_through_a_scrub() {
        let mut l = Ledgers::default();
        let (k, a) = (key(vec![1]), who("t", "a"));
        scrub(&mut l, &k, &[1, 2], &[]);
        assert_eq!(sort(&mut l, &k, &[2], &a), NONE);
        let mut engine = l.generations(&k, &[1, 2]);
        l.mark_in_flight(&mut engine, None);
        assert_eq!(sort(&mut l, &k, &[1, 2], &a).0, vec![1, 2]);
        assert_eq!(l.settle(&engine, &[1, 2], &[], None), Unapplied::default());
        assert_eq!(sort(&mut l, &k, &[1], &a), NONE);
    }

    /// A gate verdict is not applied while the gate's scrub of the block for another
    /// claimant, submitted after it, may still write it: the block goes to the later one. A
    /// later scrub for the same claimant, or the engine's, does not hold it back.
    #[test]
    fn a_gate_verdict_overtaken_by_a_later_scrub_of_another_is_not_applied() {
        let mut l = Ledgers::default();
        let (k, w, b, c) = (key(vec![1]), who("t", "w"), who("t", "b"), who("t", "c"));
        assert_eq!(sort(&mut l, &k, &[5, 6], &w).0, vec![5, 6]);
        let mut for_c = l.claim(&k, &[5, 6], &c, false).dirty_generations;
        let mut for_b = l.claim(&k, &[5], &b, false).dirty_generations;
        let mut again_c = l.claim(&k, &[6], &c, false).dirty_generations;
        l.mark_in_flight(&mut for_c, Some(&c));
        l.mark_in_flight(&mut for_b, Some(&b));
        l.mark_in_flight(&mut again_c, Some(&c));
        let mut engine = l.generations(&k, &[6]);
        l.mark_in_flight(&mut engine, None);
        let u = l.settle(&for_c, &[5, 6], &[], Some(&c));
        assert_eq!((u.taken, u.failed), (vec![5], vec![]));
        l.lift_marks(&engine);
        assert!(l.settle(&for_b, &[5], &[], Some(&b)).all().is_empty());
        assert!(l.settle(&again_c, &[6], &[], Some(&c)).all().is_empty());
        assert_eq!(sort(&mut l, &k, &[5], &b), NONE);
        assert_eq!(sort(&mut l, &k, &[6], &c), NONE);
        assert!(l.books[0].in_flight.is_empty(), "marks left");
    }

    /// Of a gate scrub's blocks, those handed to another claim between its claim's sort and
    /// its submission (by that claim's verdict, or at once as CLEAN) are withdrawn from it:
    /// zeroing them would wipe the new holder's data. Another owner's are taken; those of
    /// another claim of the claimant are the claimant's already. A block scrubbed CLEAN
    /// meanwhile and not taken is scrubbed.
    #[test]
    fn blocks_handed_to_another_after_the_sort_are_withdrawn_before_the_submission() {
        let mut l = Ledgers::default();
        let (k, w, b, c) = (key(vec![1]), who("t", "w"), who("t", "b"), who("t", "c"));
        scrub(&mut l, &k, &[4, 5, 6, 7], &[]);
        assert_eq!(sort(&mut l, &k, &[4, 5, 6, 7], &w), NONE);
        let mut for_c = l.claim(&k, &[4, 5, 6, 7], &c, false).dirty_generations;
        let mut for_b = l.claim(&k, &[4], &b, false).dirty_generations;
        assert!(l.mark_in_flight(&mut for_b, Some(&b)).is_empty());
        assert_eq!(l.settle(&for_b, &[4], &[], Some(&b)), Unapplied::default());
        scrub(&mut l, &k, &[5, 6], &[]);
        assert_eq!(sort(&mut l, &k, &[6], &b), NONE);
        let mut own = l.claim(&k, &[7], &c, false).dirty_generations;
        l.mark_in_flight(&mut own, Some(&c));
        assert_eq!(l.settle(&own, &[7], &[], Some(&c)), Unapplied::default());
        let withdrawn = l.mark_in_flight(&mut for_c, Some(&c));
        assert_eq!(
            withdrawn,
            Withdrawn {
                taken: vec![4, 6],
                theirs: vec![7],
                forgotten: vec![]
            }
        );
        assert_eq!(l.settle(&for_c, &[5], &[], Some(&c)), Unapplied::default());
        assert_eq!(sort(&mut l, &k, &[5, 7], &c), NONE);
        assert_eq!(sort(&mut l, &k, &[4, 6], &b), NONE);
        assert!(l.books[0].in_flight.is_empty(), "marks left");
    }

    /// A gate scrub whose ledger was forgotten after its claim sorted the blocks withdraws
    /// them all (to be claimed again through the ledger there is now); an engine scrub
    /// proceeds (its verdict lands nowhere).
    #[test]
    fn a_gate_scrub_whose_ledger_was_forgotten_since_the_sort_is_withdrawn() {
        let mut l = Ledgers::default();
        let (k, c) = (key(vec![1]), who("t", "c"));
        let mut for_c = l.claim(&k, &[2, 3], &c, false).dirty_generations;
        let mut engine = l.generations(&k, &[2]);
        let mut other = key(vec![1]);
        other.layout = [8; 32];
        l.claim(&other, &[0], &c, false);
        let withdrawn = l.mark_in_flight(&mut for_c, Some(&c));
        assert_eq!(withdrawn.forgotten, vec![2, 3]);
        assert!(for_c.of.is_empty());
        assert!(l.mark_in_flight(&mut engine, None).is_empty());
        assert_eq!(engine.of.len(), 1);
    }

    #[test]
    fn all_or_nothing_changes_nothing_when_a_block_is_dirty() {
        let mut l = Ledgers::default();
        let (k, a, b) = (key(vec![1]), who("t", "a"), who("t", "b"));
        scrub(&mut l, &k, &[1], &[]);
        assert_eq!(l.claim(&k, &[1, 2], &a, true).dirty, vec![2]);
        // Block 1 was not handed to `a`: `b` may still take it without a scrub.
        let s = l.claim(&k, &[1], &b, true);
        assert!(s.dirty.is_empty() && s.failed.is_empty());
    }

    #[test]
    fn all_or_nothing_changes_nothing_when_a_block_failed() {
        let mut l = Ledgers::default();
        let (k, a, b) = (key(vec![1]), who("t", "a"), who("t", "b"));
        scrub(&mut l, &k, &[1], &[2]);
        let s = l.claim(&k, &[1, 2], &a, true);
        assert_eq!((s.dirty, s.failed), (vec![], vec![2]));
        // Block 1 was not handed to `a`: `b` may still take it without a scrub.
        let s = l.claim(&k, &[1], &b, true);
        assert!(s.dirty.is_empty() && s.failed.is_empty(), "{s:?}");
    }

    #[test]
    fn a_verdict_is_not_applied_to_a_block_that_changed_hands_meanwhile() {
        let mut l = Ledgers::default();
        let (k, w, x, y) = (key(vec![1]), who("t", "w"), who("t", "x"), who("t", "y"));
        assert_eq!(sort(&mut l, &k, &[5], &w).0, vec![5]);
        scrub(&mut l, &k, &[5], &[]);
        sort(&mut l, &k, &[5], &w);
        // The engine starts scrubbing w's block; meanwhile x's claim scrubs and takes it.
        let engine = l.generations(&k, &[5]);
        let sorted = l.claim(&k, &[5], &x, false);
        assert_eq!(sorted.dirty, vec![5]);
        assert!(l
            .settle(&sorted.dirty_generations, &[5], &[], Some(&x))
            .all()
            .is_empty());
        // The engine's older verdict must not make x's block clean.
        assert_eq!(l.settle(&engine, &[5], &[], None).taken, vec![5]);
        assert_eq!(sort(&mut l, &k, &[5], &y).0, vec![5]);
    }

    #[test]
    fn of_two_claims_scrubbing_one_block_only_the_first_verdict_hands_it_over() {
        let mut l = Ledgers::default();
        let (k, x, y) = (key(vec![1]), who("t", "x"), who("t", "y"));
        let for_x = l.claim(&k, &[5], &x, false);
        let for_y = l.claim(&k, &[5], &y, false);
        assert_eq!((&for_x.dirty, &for_y.dirty), (&vec![5], &vec![5]));
        assert!(l
            .settle(&for_y.dirty_generations, &[5], &[], Some(&y))
            .all()
            .is_empty());
        assert_eq!(
            l.settle(&for_x.dirty_generations, &[5], &[], Some(&x)),
            Unapplied {
                taken: vec![5],
                ..Unapplied::default()
            }
        );
        // The block is y's.
        assert_eq!(sort(&mut l, &k, &[5], &y), NONE);
        assert_eq!(sort(&mut l, &k, &[5], &x).0, vec![5]);
    }

    #[test]
    fn a_failed_verdict_is_kept_even_when_another_verdict_made_the_block_clean() {
        let mut l = Ledgers::default();
        let (k, a, c, d) = (key(vec![1]), who("t", "a"), who("t", "c"), who("t", "d"));
        sort(&mut l, &k, &[5], &a);
        scrub(&mut l, &k, &[5], &[]);
        sort(&mut l, &k, &[5], &a);
        // The engine scrubs a's block while c's claim scrubs it too.
        let engine = l.generations(&k, &[5]);
        let for_c = l.claim(&k, &[5], &c, false);
        assert!(l.settle(&engine, &[5], &[], None).all().is_empty());
        // c's scrub read residue: the block must not stay CLEAN for d.
        assert!(l
            .settle(&for_c.dirty_generations, &[], &[5], Some(&c))
            .all()
            .is_empty());
        assert_eq!(sort(&mut l, &k, &[5], &d), (vec![], vec![5]));
    }

    #[test]
    fn a_request_claiming_its_block_twice_at_once_keeps_it() {
        let mut l = Ledgers::default();
        let (k, a) = (key(vec![1]), who("t", "a"));
        let first = l.claim(&k, &[2], &a, false);
        let second = l.claim(&k, &[2], &a, false);
        assert!(l
            .settle(&first.dirty_generations, &[2], &[], Some(&a))
            .all()
            .is_empty());
        assert!(l
            .settle(&second.dirty_generations, &[2], &[], Some(&a))
            .all()
            .is_empty());
        assert_eq!(sort(&mut l, &k, &[2], &a), NONE);
    }

    #[test]
    fn a_cache_allocated_again_starts_an_empty_ledger() {
        let mut l = Ledgers::default();
        let a = who("t", "a");
        scrub(&mut l, &key(vec![1]), &[0], &[]);
        assert_eq!(sort(&mut l, &key(vec![2]), &[0], &a).0, vec![0]);
        // And the old cache's ledger is gone: a verdict for it applies to nothing.
        let old = Generations {
            key: key(vec![1]),
            epoch: 1,
            of: HashMap::from([(0, 0)]),
            in_flight: 0,
        };
        assert_eq!(l.settle(&old, &[0], &[], None).forgotten, vec![0]);
    }

    #[test]
    fn another_layout_over_the_same_allocation_replaces_the_ledger() {
        let mut l = Ledgers::default();
        let a = who("t", "a");
        let (first, mut second) = (key(vec![1, 2]), key(vec![2, 3]));
        second.layout = [8; 32];
        scrub(&mut l, &first, &[0], &[]);
        sort(&mut l, &second, &[0], &a);
        // What `first` said about block 0 was written through another view: forgotten.
        assert_eq!(sort(&mut l, &first, &[0], &a).0, vec![0]);
    }

    #[test]
    fn another_cache_in_other_bytes_of_the_same_allocation_keeps_the_ledger() {
        let mut l = Ledgers::default();
        let a = who("t", "a");
        let (mut first, mut second) = (key(vec![1]), key(vec![1]));
        first.spans = vec![(0x1_0000, 0x1_8000)];
        second.spans = vec![(0x1_8000, 0x2_0000)];
        second.layout = [8; 32];
        scrub(&mut l, &first, &[0], &[]);
        sort(&mut l, &second, &[0], &a);
        assert_eq!(sort(&mut l, &first, &[0], &a), NONE);
        // A third view meeting the first's last byte replaces it.
        let mut third = second.clone();
        third.spans = vec![(0x1_7fff, 0x1_8001)];
        third.layout = [9; 32];
        sort(&mut l, &third, &[0], &a);
        assert_eq!(sort(&mut l, &first, &[1], &a).0, vec![1]);
    }

    #[test]
    fn spans_are_merged_and_compared_in_one_sweep() {
        let layout = KvLayout {
            regions: vec![0x300, 0x100, 0x140, 0x1000],
            block_bytes: 0x10,
            block_stride: 0x20,
            blocks_per_region: 4,
        };
        // Each region spans 3 strides and a block: 0x70 bytes.
        assert_eq!(
            spans_of(&layout),
            vec![(0x100, 0x1b0), (0x300, 0x370), (0x1000, 0x1070)]
        );
        let a = [(0x100, 0x1b0), (0x300, 0x370)];
        assert!(!spans_meet(&a, &[(0x1b0, 0x300), (0x370, 0x400)]));
        assert!(spans_meet(&a, &[(0x0, 0x10), (0x36f, 0x371)]));
        assert!(spans_meet(&[(0, u64::MAX)], &a));
        assert!(!spans_meet(&[], &a));
    }

    #[test]
    fn a_later_pass_finds_a_block_an_anonymous_claim_took_meanwhile_taken() {
        let mut l = Ledgers::default();
        let (k, x) = (key(vec![1]), who("t", "x"));
        scrub(&mut l, &k, &[3], &[]);
        assert!(l.claim(&k, &[3], &None, false).dirty.is_empty());
        let s = l.claim(&k, &[3], &None, false);
        assert_eq!(
            s.dirty,
            vec![3],
            "an anonymous holder matches nobody, itself included"
        );
        let again = l.claim_pass(&k, &[3], &x, false, true);
        assert_eq!((again.dirty, again.taken), (vec![], vec![3]));
    }

    /// A claim by `w` is handed block 5 of `k` through its scrub; then two claims by `x` sort
    /// it (dirty): their generations, neither submitted.
    fn ws_block_sorted_twice_for(
        l: &mut Ledgers,
        k: &LedgerKey,
        w: &Option<Arc<OwnerKey>>,
        x: &Option<Arc<OwnerKey>>,
    ) -> (Generations, Generations) {
        let mut first = l.claim(k, &[5], w, false).dirty_generations;
        assert!(l.mark_in_flight(&mut first, Some(w)).is_empty());
        assert_eq!(l.settle(&first, &[5], &[], Some(w)), Unapplied::default());
        let x1 = l.claim(k, &[5], x, false).dirty_generations;
        let x2 = l.claim(k, &[5], x, false).dirty_generations;
        (x1, x2)
    }

    /// Block 5 is w's. Claims x1 and x2 of request x sort it; x2's scrub hands it to x. Then
    /// request y sorts it (x's now), and x1's submission withdraws it as x's own (x1 is handed
    /// it, no scrub). y's scrub, submitted after that hand-over, must leave it out: x1 holds it.
    #[test]
    fn a_block_withdrawn_as_the_claimants_own_is_left_out_of_a_scrub_another_owner_sorted_it_for() {
        let mut l = Ledgers::default();
        let (k, w, x, y) = (key(vec![1]), who("t", "w"), who("t", "x"), who("t", "y"));
        let (mut x1, mut x2) = ws_block_sorted_twice_for(&mut l, &k, &w, &x);
        assert!(l.mark_in_flight(&mut x2, Some(&x)).is_empty());
        assert_eq!(l.settle(&x2, &[5], &[], Some(&x)), Unapplied::default());
        let ys = l.claim(&k, &[5], &y, false);
        assert_eq!(ys.dirty, vec![5]);
        let mut y_seen = ys.dirty_generations;
        let x1_withdrawn = l.mark_in_flight(&mut x1, Some(&x));
        assert_eq!(
            x1_withdrawn.theirs,
            vec![5],
            "precondition: {x1_withdrawn:?}"
        );
        let y_withdrawn = l.mark_in_flight(&mut y_seen, Some(&y));
        let y_verdict = if y_seen.names(5) {
            l.settle(&y_seen, &[5], &[], Some(&y))
        } else {
            Unapplied::default()
        };
        assert!(
            !y_seen.names(5),
            "x1 was handed block 5 (withdrawn as x's own) before y's scrub was submitted, yet y's scrub kept block 5 (it zeroes what x1 holds) and its verdict handed it to y too (y withdrawn {y_withdrawn:?}, y's verdict not applied to {y_verdict:?})"
        );
    }

    /// Block 5 is w's. Claim x1 of request x sorts it; x2 (request x) is handed it through its
    /// own scrub. The engine then scrubs block 5, and x1's scrub of it is submitted after the
    /// engine's (kept, since the engine's is in flight). x1's scrub fails verification and its
    /// verdict lands first; the engine's (earlier) scrub verified. Block 5's last scrub
    /// failed: it must not be handed over until a scrub verifies it.
    #[test]
    fn a_failed_gate_scrub_submitted_after_an_engine_scrub_keeps_the_block_from_the_engines_verdict(
    ) {
        let mut l = Ledgers::default();
        let (k, w, x, y) = (key(vec![1]), who("t", "w"), who("t", "x"), who("t", "y"));
        let (mut x1, mut x2) = ws_block_sorted_twice_for(&mut l, &k, &w, &x);
        assert!(l.mark_in_flight(&mut x2, Some(&x)).is_empty());
        assert_eq!(l.settle(&x2, &[5], &[], Some(&x)), Unapplied::default());
        let mut engine = l.generations(&k, &[5]);
        assert!(l.mark_in_flight(&mut engine, None).is_empty());
        let x1_withdrawn = l.mark_in_flight(&mut x1, Some(&x));
        assert!(
            x1_withdrawn.is_empty() && x1.names(5),
            "precondition: {x1_withdrawn:?}"
        );
        l.settle(&x1, &[], &[5], Some(&x));
        l.settle(&engine, &[5], &[], None);
        let s = l.claim(&k, &[5], &y, false);
        assert_eq!(
            (s.failed.clone(), s.dirty.clone()),
            (vec![5], vec![]),
            "block 5's last scrub (x1's, submitted after the engine's) failed, yet the engine's earlier verdict made it CLEAN and y's claim was handed it at once: {s:?}"
        );
    }

    /// Block 5 is w's. Claims x1 and x2 of request x sort it; x1's scrub is submitted, then
    /// x2's (ordered after x1's on the device). x2's scrub verifies and its verdict lands first:
    /// x2 is handed block 5. x1's scrub failed verification and its verdict lands after. The
    /// block's last scrub on the device (x2's) verified and x2 holds it, so x's next claim of
    /// it is expected to find it x's, not FAILED.
    #[test]
    fn a_failed_verdict_of_an_earlier_scrub_leaves_the_block_a_later_verified_scrub_of_the_claimant_handed_over(
    ) {
        let mut l = Ledgers::default();
        let (k, w, x) = (key(vec![1]), who("t", "w"), who("t", "x"));
        let (mut x1, mut x2) = ws_block_sorted_twice_for(&mut l, &k, &w, &x);
        assert!(l.mark_in_flight(&mut x1, Some(&x)).is_empty());
        let x2_withdrawn = l.mark_in_flight(&mut x2, Some(&x));
        assert!(
            x2_withdrawn.is_empty() && x2.names(5),
            "precondition: {x2_withdrawn:?}"
        );
        assert_eq!(
            l.settle(&x2, &[5], &[], Some(&x)),
            Unapplied::default(),
            "precondition: x2 is handed block 5"
        );
        l.settle(&x1, &[], &[5], Some(&x));
        let again = l.claim(&k, &[5], &x, false);
        assert_eq!(
            (again.failed.clone(), again.dirty.clone()),
            (vec![], vec![]),
            "x2's scrub (submitted after x1's) verified block 5 and x2 was handed it, yet x1's earlier scrub's failed verdict, landing later, made it FAILED: x's next claim of its own block is refused: {again:?}"
        );
    }

    #[test]
    fn a_refused_claim_without_a_ledger_creates_none_and_drops_none() {
        let mut l = Ledgers::default();
        let a = who("t", "a");
        let (first, mut second) = (key(vec![1]), key(vec![1]));
        second.layout = [8; 32];
        scrub(&mut l, &first, &[0], &[]);
        let s = l.claim(&second, &[0], &a, true);
        assert_eq!((s.dirty, s.unknown), (vec![0], vec![0]));
        assert_eq!(l.books.len(), 1);
        assert_eq!(sort(&mut l, &first, &[0], &a), NONE);
    }

    /// The ledger key of cache `n` of many, each its own layout and allocation.
    fn numbered_cache(n: u8) -> LedgerKey {
        LedgerKey {
            device: 0,
            layout: [n; 32],
            allocations: vec![(u64::from(n) + 100, 1)],
            spans: vec![span_of_allocation(u64::from(n) + 100)],
        }
    }

    #[test]
    fn the_least_recently_used_ledger_is_forgotten() {
        let mut l = Ledgers::default();
        let a = who("t", "a");
        let k = numbered_cache;
        for n in 0..=MAX_LEDGERS as u8 {
            scrub(&mut l, &k(n), &[0], &[]);
        }
        assert_eq!(l.books.len(), MAX_LEDGERS);
        // The first cache's ledger was forgotten: its block is unknown again.
        assert_eq!(sort(&mut l, &k(0), &[0], &a).0, vec![0]);
        assert_eq!(sort(&mut l, &k(MAX_LEDGERS as u8), &[0], &a), NONE);
    }

    /// A ledger holding a FAILED block is forgotten only after every one holding none: the
    /// block would be unknown again, which one sampled scrub clears. Its mark goes once a
    /// scrub verifies the block, and the ledger is then forgotten in its turn.
    #[test]
    fn a_ledger_with_a_failed_block_is_forgotten_last() {
        let mut l = Ledgers::default();
        let a = who("t", "a");
        let k = numbered_cache;
        scrub(&mut l, &k(0), &[1], &[0]);
        for n in 1..=MAX_LEDGERS as u8 {
            scrub(&mut l, &k(n), &[0], &[]);
        }
        assert_eq!(l.books.len(), MAX_LEDGERS);
        assert_eq!(
            sort(&mut l, &k(0), &[0], &a),
            (vec![], vec![0]),
            "still FAILED"
        );
        // The oldest without a FAILED block went instead.
        assert_eq!(sort(&mut l, &k(1), &[0], &a).0, vec![0]);
        scrub(&mut l, &k(0), &[0], &[]);
        assert_eq!(l.books[l.find(&k(0)).unwrap()].failed, 0);
        for n in MAX_LEDGERS as u8 + 1..=2 * MAX_LEDGERS as u8 {
            scrub(&mut l, &k(n), &[0], &[]);
        }
        assert!(l.find(&k(0)).is_none(), "verified since, forgotten in turn");
    }

    /// A model of the memory the ledgers describe: who wrote each cell since it was last
    /// zeroed, and who holds it, under two layouts over the same memory (a permutation of its
    /// cells) that may be freed and allocated again. A claim's sort, its scrub's submission,
    /// the scrub's run on the device and the verdict are separate steps, interleaved with
    /// engine scrubs and writes. Scrubs run in the order they were submitted (a later scrub of
    /// a block waits for the streams of earlier ones), and a verdict lands only after its
    /// scrub ran. The engine's contract is encoded in what the operations do: a block's holder
    /// stops writing it when the engine hands it in for a scrub or gives it to another
    /// request; only holders write.
    mod model {
        use super::*;
        use proptest::prelude::*;

        const N: u32 = 4;

        #[derive(Clone, Copy, Debug, PartialEq)]
        enum Writer {
            Nobody,
            Named(usize),
            Anonymous,
        }

        #[derive(Clone, Debug)]
        enum Op {
            Sort {
                o: usize,
                layout: usize,
                ids: Vec<u32>,
                fail: Vec<u32>,
            },
            Submit(usize),
            /// The oldest submitted scrub that has not run yet runs.
            Run,
            Engine {
                layout: usize,
                ids: Vec<u32>,
                fail: Vec<u32>,
            },
            Finish(usize),
            Write,
            Realloc,
            /// An engine scrub whose generations were read (its ledger used or created) and
            /// that then launched nothing: no verdict follows.
            Refused {
                layout: usize,
                ids: Vec<u32>,
            },
        }

        fn ids() -> impl Strategy<Value = Vec<u32>> {
            proptest::sample::subsequence((0..N).collect::<Vec<_>>(), 1..=N as usize)
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                3 => (0..4usize, 0..2usize, ids(), ids()).prop_map(|(o, layout, ids, fail)| Op::Sort { o, layout, ids, fail }),
                3 => (0..4usize).prop_map(Op::Submit),
                2 => Just(Op::Run),
                3 => (0..2usize, ids(), ids()).prop_map(|(layout, ids, fail)| Op::Engine { layout, ids, fail }),
                3 => (0..4usize).prop_map(Op::Finish),
                2 => Just(Op::Write),
                1 => Just(Op::Realloc),
                1 => (0..2usize, ids()).prop_map(|(layout, ids)| Op::Refused { layout, ids }),
            ]
        }

        struct Gate {
            o: usize,
            owner: Option<Arc<OwnerKey>>,
            layout: usize,
            seen: Generations,
            ids: Vec<u32>,
            fail: Vec<u32>,
        }
        struct Verdict {
            claimant: Option<(usize, Option<Arc<OwnerKey>>)>,
            layout: usize,
            seen: Generations,
            scrubbed: LedgerKey,
            verified: Vec<u32>,
            failed: Vec<u32>,
            ran: bool,
        }

        struct World {
            ledger: Ledgers,
            seq: u64,
            owners: Vec<Option<Arc<OwnerKey>>>,
            written: Vec<Writer>,
            held: Vec<Option<usize>>,
            sorted: Vec<Gate>,
            pending: Vec<Verdict>,
        }

        fn cell(layout: usize, id: u32) -> usize {
            ((id + layout as u32) % N) as usize
        }

        impl World {
            fn key(&self, layout: usize) -> LedgerKey {
                LedgerKey {
                    device: 0,
                    layout: [layout as u8; 32],
                    allocations: vec![(1, self.seq)],
                    spans: vec![(0x1000, 0x1000 + u64::from(N))],
                }
            }
            fn hand_over(&mut self, layout: usize, id: u32, o: usize) -> Result<(), TestCaseError> {
                let c = cell(layout, id);
                let w = self.written[c];
                prop_assert!(
                    w == Writer::Nobody || (o < 3 && w == Writer::Named(o)),
                    "cell {} (layout {} block {}) handed to owner {} holding {:?}'s bytes",
                    c,
                    layout,
                    id,
                    o,
                    w
                );
                self.held[c] = Some(o);
                Ok(())
            }
            /// Pending scrub `k` runs: it writes every block it names (zeroing those that
            /// verify). A gate scrub must not write a block another owner holds (an engine
            /// scrub writes what the engine handed in: its own contract).
            fn run(&mut self, k: usize) -> Result<(), TestCaseError> {
                let p = &mut self.pending[k];
                if std::mem::replace(&mut p.ran, true) {
                    return Ok(());
                }
                for &id in p.verified.iter().chain(&p.failed) {
                    let c = cell(p.layout, id);
                    if let Some((o, _)) = p.claimant {
                        prop_assert!(
                            self.held[c].is_none_or(|h| h == o),
                            "owner {}'s scrub wrote cell {} (layout {} block {}) held by {:?}",
                            o,
                            c,
                            p.layout,
                            id,
                            self.held[c]
                        );
                    }
                }
                for &id in &p.verified {
                    self.written[cell(p.layout, id)] = Writer::Nobody;
                }
                Ok(())
            }
            /// Every pending scrub, in submission order up to `k`, runs.
            fn run_to(&mut self, k: usize) -> Result<(), TestCaseError> {
                for i in 0..k.saturating_add(1).min(self.pending.len()) {
                    self.run(i)?;
                }
                Ok(())
            }
            fn apply(&mut self, op: Op) -> Result<(), TestCaseError> {
                match op {
                    Op::Sort {
                        o,
                        layout,
                        ids,
                        fail,
                    } => {
                        let owner = self.owners[o].clone();
                        let key = self.key(layout);
                        let s = self.ledger.claim(&key, &ids, &owner, false);
                        for &id in &ids {
                            if !s.dirty.contains(&id) && !s.failed.contains(&id) {
                                self.hand_over(layout, id, o)?;
                            }
                        }
                        // The engine gave the dirty blocks to `o`: their last holder let go.
                        for &id in &s.dirty {
                            self.held[cell(layout, id)] = None;
                        }
                        self.sorted.push(Gate {
                            o,
                            owner,
                            layout,
                            seen: s.dirty_generations,
                            ids: s.dirty,
                            fail,
                        });
                    }
                    Op::Submit(k) => {
                        if self.sorted.is_empty() {
                            return Ok(());
                        }
                        let mut g = self.sorted.remove(k % self.sorted.len());
                        let scrubbed = self.key(g.layout);
                        if g.seen.key != scrubbed {
                            // Freed and allocated again since the sort: refused as not live.
                            return Ok(());
                        }
                        let withdrawn = self.ledger.mark_in_flight(&mut g.seen, Some(&g.owner));
                        // Withdrawn as the claimant's own: handed to the claim at once.
                        for &id in &withdrawn.theirs {
                            self.hand_over(g.layout, id, g.o)?;
                        }
                        let withdrawn = withdrawn.all();
                        let (failed, verified): (Vec<u32>, Vec<u32>) = g
                            .ids
                            .iter()
                            .filter(|id| !withdrawn.contains(id))
                            .partition(|id| g.fail.contains(id));
                        self.pending.push(Verdict {
                            claimant: Some((g.o, g.owner)),
                            layout: g.layout,
                            seen: g.seen,
                            scrubbed,
                            verified,
                            failed,
                            ran: false,
                        });
                    }
                    Op::Run => {
                        if let Some(k) = self.pending.iter().position(|p| !p.ran) {
                            self.run(k)?;
                        }
                    }
                    Op::Engine { layout, ids, fail } => {
                        let key = self.key(layout);
                        let mut seen = self.ledger.generations(&key, &ids);
                        self.ledger.mark_in_flight(&mut seen, None);
                        for &id in &ids {
                            self.held[cell(layout, id)] = None;
                        }
                        let (failed, verified): (Vec<u32>, Vec<u32>) =
                            ids.iter().partition(|id| fail.contains(id));
                        self.pending.push(Verdict {
                            claimant: None,
                            layout,
                            seen,
                            scrubbed: key,
                            verified,
                            failed,
                            ran: false,
                        });
                    }
                    Op::Finish(k) => {
                        if self.pending.is_empty() {
                            return Ok(());
                        }
                        let k = k % self.pending.len();
                        self.run_to(k)?;
                        let p = self.pending.remove(k);
                        let claimant = p.claimant.as_ref().map(|(_, o)| o);
                        let changed = if p.seen.key != p.scrubbed {
                            self.ledger.lift_marks(&p.seen);
                            p.verified.clone()
                        } else {
                            self.ledger
                                .settle(&p.seen, &p.verified, &p.failed, claimant)
                                .all()
                        };
                        if let Some((o, _)) = p.claimant {
                            for &id in p.verified.iter().filter(|id| !changed.contains(id)) {
                                self.hand_over(p.layout, id, o)?;
                            }
                        }
                    }
                    Op::Write => {
                        for c in 0..N as usize {
                            if let Some(o) = self.held[c] {
                                self.written[c] = if o < 3 {
                                    Writer::Named(o)
                                } else {
                                    Writer::Anonymous
                                };
                            }
                        }
                    }
                    Op::Refused { layout, ids } => {
                        let key = self.key(layout);
                        let _ = self.ledger.generations(&key, &ids);
                    }
                    Op::Realloc => {
                        // Freed (its scrub zeroes it, ordered after every scrub of it) and allocated again.
                        self.run_to(usize::MAX)?;
                        self.seq += 1;
                        for c in 0..N as usize {
                            self.held[c] = None;
                            self.written[c] = Writer::Nobody;
                        }
                    }
                }
                Ok(())
            }
        }

        /// Block 1 is c's (written). a's claims a1 and a2 sort it; a2's scrub hands it to a,
        /// who writes it. b sorts it (a's now); a1's submission withdraws it as a's own (a1 is
        /// handed it); then b's scrub is submitted and runs.
        #[test]
        fn a_block_withdrawn_as_the_claimants_own_is_not_written_by_a_scrub_sorted_before() {
            let owners = ["a", "b", "c"]
                .iter()
                .map(|r| who("t", r))
                .chain([None])
                .collect();
            let mut w = World {
                ledger: Ledgers::default(),
                seq: 1,
                owners,
                written: vec![Writer::Nobody; N as usize],
                held: vec![None; N as usize],
                sorted: Vec::new(),
                pending: Vec::new(),
            };
            let sort = |o| Op::Sort {
                o,
                layout: 0,
                ids: vec![1],
                fail: Vec::new(),
            };
            let ops = [
                sort(2),
                Op::Submit(0),
                Op::Finish(0),
                Op::Write,
                sort(0),
                sort(0),
                Op::Submit(1),
                Op::Finish(0),
                Op::Write,
                sort(1),
                Op::Submit(0),
                Op::Submit(0),
                Op::Run,
                Op::Run,
            ];
            for op in ops {
                if let Err(e) = w.apply(op.clone()) {
                    panic!("{op:?}: {e}");
                }
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(1024))]

            /// Whatever claims, engine scrubs, failing scrubs, verdicts (in any order), writes
            /// and reallocations happen, no block is handed to an owner while it holds another
            /// owner's bytes.
            #[test]
            fn no_block_reaches_a_new_owner_with_another_owners_bytes(ops in proptest::collection::vec(op(), 1..60)) {
                let owners = ["a", "b", "c"].iter().map(|r| who("t", r)).chain([None]).collect();
                let mut w = World { ledger: Ledgers::default(), seq: 1, owners, written: vec![Writer::Nobody; N as usize], held: vec![None; N as usize], sorted: Vec::new(), pending: Vec::new() };
                for op in ops { w.apply(op)?; }
            }
        }
    }

    #[test]
    fn detail_lists_are_bounded() {
        assert_eq!(id_list(&[1, 2]), "1, 2");
        let many: Vec<u32> = (0..20).collect();
        assert!(id_list(&many).ends_with("15 and 4 more"));
    }
}

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
//!   FAILED (a scrub failed verification): never handed over until a scrub verifies it
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
//! - **A block whose last scrub failed is never handed over** until a scrub verifies it.
//! - **Under `enforce` a refused claim changes nothing**; each refusal is a `policy_violation`
//!   record (policy `kv_gate`), as is a claim of a failed block.
//! - **A ledger belongs to one cache**: the device, the layout's digest and the allocations
//!   holding its regions. A cache freed and allocated again starts an empty ledger, since a
//!   free's scrub zeroed it but nothing says who wrote it since.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::SystemTime;

use crate::backend::StreamHandle;
use crate::config::{KvGateMode, KvGateScope};
use crate::context::Context;
use crate::events::{BlockRef, Event, EventKind, KvScrubTrigger};

use super::kv::{check_ids, KvLayout, KvScrubError};
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

/// One block's entry. A block without one is unknown.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Slot {
    /// Verified zero by a scrub, owned by nobody since.
    Clean,
    /// Claimed; `None` is an anonymous owner, whom no claimant matches.
    Owned(Option<Arc<OwnerKey>>),
    /// Its last scrub failed verification.
    Failed,
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
}

impl LedgerKey {
    pub(crate) fn new(device: u32, layout: &KvLayout, owners: &[BlockRef]) -> Self {
        LedgerKey {
            device,
            layout: layout.digest(),
            allocations: owners.iter().map(|o| (o.id, o.scrub_seq)).collect(),
        }
    }
}

struct Book {
    key: LedgerKey,
    slots: HashMap<u32, Slot>,
    last_used: u64,
}

/// What a claim found, before any scrub.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Sorted {
    /// Blocks that would change owner without a verified scrub (or whose owner is unknown).
    pub dirty: Vec<u32>,
    /// Blocks whose last scrub failed.
    pub failed: Vec<u32>,
}

/// Every cache's ledger.
#[derive(Default)]
pub(crate) struct Ledgers {
    books: Vec<Book>,
    clock: u64,
}

impl Ledgers {
    /// The ledger of `key`'s cache, new (empty) when none is kept or its allocations changed.
    fn book(&mut self, key: &LedgerKey) -> &mut Book {
        self.clock += 1;
        let now = self.clock;
        let found = self
            .books
            .iter()
            .position(|b| b.key.device == key.device && b.key.layout == key.layout);
        let i = match found {
            Some(i) => i,
            None => {
                if self.books.len() >= MAX_LEDGERS {
                    let oldest = (0..self.books.len())
                        .min_by_key(|&i| self.books[i].last_used)
                        .unwrap_or(0);
                    self.books.swap_remove(oldest);
                }
                self.books.push(Book {
                    key: key.clone(),
                    slots: HashMap::new(),
                    last_used: now,
                });
                self.books.len() - 1
            }
        };
        let book = &mut self.books[i];
        if book.key.allocations != key.allocations || book.slots.len() > MAX_LEDGER_SLOTS {
            book.key = key.clone();
            book.slots.clear();
        }
        book.last_used = now;
        book
    }

    /// Sorts a claim's blocks and, unless `all_or_nothing` and some block is dirty or failed,
    /// hands the others (clean, or already the claimant's) to `claimant` at once, under the
    /// same lock that read them.
    pub(crate) fn claim(
        &mut self,
        key: &LedgerKey,
        ids: &[u32],
        claimant: &Option<Arc<OwnerKey>>,
        all_or_nothing: bool,
    ) -> Sorted {
        let book = self.book(key);
        let mut sorted = Sorted::default();
        let mut free = Vec::with_capacity(ids.len());
        for &id in ids {
            match book.slots.get(&id) {
                Some(Slot::Clean) => free.push(id),
                Some(Slot::Owned(Some(owner))) if claimant.as_ref() == Some(owner) => free.push(id),
                Some(Slot::Failed) => sorted.failed.push(id),
                Some(Slot::Owned(_)) | None => sorted.dirty.push(id),
            }
        }
        if all_or_nothing && (!sorted.dirty.is_empty() || !sorted.failed.is_empty()) {
            return sorted;
        }
        for id in free {
            book.slots.insert(id, Slot::Owned(claimant.clone()));
        }
        sorted
    }

    /// Hands blocks the gate just scrubbed to `claimant`; returns those another claim took
    /// first (they are not handed over).
    pub(crate) fn hand_over_scrubbed(
        &mut self,
        key: &LedgerKey,
        ids: &[u32],
        claimant: &Option<Arc<OwnerKey>>,
    ) -> Vec<u32> {
        let book = self.book(key);
        let mut taken = Vec::new();
        for &id in ids {
            match book.slots.get(&id) {
                Some(Slot::Clean) => {
                    book.slots.insert(id, Slot::Owned(claimant.clone()));
                }
                _ => taken.push(id),
            }
        }
        taken
    }

    /// Applies a scrub's verdicts: verified blocks become CLEAN, failed ones FAILED; blocks the
    /// scrub did not finish keep their entry.
    pub(crate) fn record_scrub(&mut self, key: &LedgerKey, clean: &[u32], failed: &[u32]) {
        let book = self.book(key);
        for &id in clean {
            book.slots.insert(id, Slot::Clean);
        }
        for &id in failed {
            book.slots.insert(id, Slot::Failed);
        }
    }
}

/// What a `kvh_claim_blocks` call did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KvClaimReport {
    /// Blocks handed to the caller.
    pub claimed: u64,
    /// Blocks the gate scrubbed and verified before handing them over, in the order given.
    pub gate_scrubbed: Vec<u32>,
    /// Blocks not handed over, in the order given: their scrub failed verification (now or
    /// earlier), or another claim took them during the gate's scrub. They must not be used.
    pub refused: Vec<u32>,
}

/// Why a claim did not run, or did not finish.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KvClaimError {
    /// Refused before any change (bad layout or ids, memory not live, device), or the gate's
    /// scrub did not finish; see [`KvScrubError`].
    #[error(transparent)]
    Scrub(#[from] KvScrubError),
    /// `kv_gate = enforce` and blocks would change owner without a verified scrub (or failed
    /// their last one). Nothing was handed over.
    #[error("{} of the KV blocks would change owner without a verified scrub (first: {}); \
             kv_gate = enforce: scrub them with kvh_scrub_blocks before claiming them",
             .blocks.len(), .blocks.first().copied().unwrap_or_default())]
    Unscrubbed { blocks: Vec<u32> },
}

impl Allocator {
    /// Gives blocks `ids` of the paged KV cache `layout` on `device` to the calling thread's
    /// request (or tenant, by `kv_gate_scope`). Blocks that would change owner without a
    /// verified scrub since their last owner are scrubbed on `stream` and verified first
    /// (`kv_gate = scrub`), or make the whole claim fail (`enforce`). `Ok` lists the blocks
    /// that were not handed over ([`KvClaimReport::refused`]); they must not be used.
    pub fn claim_kv_blocks(
        &self,
        layout: &KvLayout,
        ids: &[u32],
        device: i32,
        stream: StreamHandle,
    ) -> Result<KvClaimReport, KvClaimError> {
        if self.inner.shutting_down.load(Ordering::Acquire) {
            return Err(KvScrubError::ShuttingDown.into());
        }
        let dev = self
            .device_index(device)
            .map_err(|_| KvScrubError::InvalidDevice {
                device,
                count: self.inner.pools.len() as u32,
            })?;
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
        let owners = match self.kv_region_owners(dev, layout) {
            Ok(owners) => owners,
            Err(e) => return Err(self.refuse_claim(dev, e.to_string(), e.into())),
        };
        let key = LedgerKey::new(dev, layout, &owners);
        let claimant = owner_of(&Context::current(), self.inner.config.kv_gate_scope);
        let enforce = mode == KvGateMode::Enforce;
        let sorted = self.ledgers().claim(&key, ids, &claimant, enforce);
        if enforce && (!sorted.dirty.is_empty() || !sorted.failed.is_empty()) {
            let blocks: Vec<u32> = ids
                .iter()
                .copied()
                .filter(|id| sorted.dirty.contains(id) || sorted.failed.contains(id))
                .collect();
            let detail = format!(
                "kvh_claim_blocks refused: {} blocks would change owner without a verified \
                 scrub, {} failed their last scrub (ids {})",
                sorted.dirty.len(),
                sorted.failed.len(),
                id_list(&blocks)
            );
            return Err(self.refuse_claim(dev, detail, KvClaimError::Unscrubbed { blocks }));
        }
        let mut refused = sorted.failed.clone();
        let mut gate_scrubbed = Vec::new();
        if !sorted.dirty.is_empty() {
            let report =
                self.scrub_kv(layout, &sorted.dirty, device, stream, KvScrubTrigger::Gate)?;
            let verified: Vec<u32> = sorted
                .dirty
                .iter()
                .copied()
                .filter(|id| !report.failed.contains(id))
                .collect();
            let taken = self
                .ledgers()
                .hand_over_scrubbed(&key, &verified, &claimant);
            gate_scrubbed = verified;
            refused.extend(report.failed.iter().copied());
            refused.extend(taken.iter().copied());
            if !taken.is_empty() {
                self.report_gate_violation(
                    dev,
                    format!(
                        "{} KV blocks were claimed by another owner while the gate scrubbed \
                         them for this claim (ids {}): two requests claimed the same blocks",
                        taken.len(),
                        id_list(&taken)
                    ),
                );
            }
        }
        if !sorted.failed.is_empty() {
            self.report_gate_violation(
                dev,
                format!(
                    "kvh_claim_blocks named {} KV blocks whose last scrub failed verification \
                     (ids {}); they were not handed over",
                    sorted.failed.len(),
                    id_list(&sorted.failed)
                ),
            );
        }
        refused.sort_unstable_by_key(|id| ids.iter().position(|x| x == id));
        let claimed = (ids.len() - refused.len()) as u64;
        let scrubbed = gate_scrubbed.len() as u64;
        self.with_pool(dev, |pool, _, _, _| {
            let c = &mut pool.stats.counters;
            c.kv_claim_calls += 1;
            c.kv_blocks_claimed += claimed;
            c.kv_gate_scrubbed_blocks += scrubbed;
        });
        Ok(KvClaimReport {
            claimed,
            gate_scrubbed,
            refused,
        })
    }

    /// After a KV scrub: records its verdicts in the cache's ledger (when the gate is on).
    pub(super) fn note_kv_verdicts(
        &self,
        dev: u32,
        layout: &KvLayout,
        owners: &[BlockRef],
        clean: &[u32],
        failed: &[u32],
    ) {
        if self.inner.config.kv_gate == KvGateMode::Off || (clean.is_empty() && failed.is_empty()) {
            return;
        }
        let key = LedgerKey::new(dev, layout, owners);
        self.ledgers().record_scrub(&key, clean, failed);
    }

    fn ledgers(&self) -> std::sync::MutexGuard<'_, Ledgers> {
        // The ledger holds no invariant a panicking holder could break half way that matters
        // more than availability: every entry is a complete value.
        self.inner
            .kv_ledgers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// The allocation holding each region, checked LIVE and covering the region's blocks.
    fn kv_region_owners(&self, dev: u32, layout: &KvLayout) -> Result<Vec<BlockRef>, KvScrubError> {
        let extent = layout.extent().unwrap_or(u64::MAX); // validated
        self.with_pool(dev, |pool, _, _, _| {
            layout
                .regions
                .iter()
                .enumerate()
                .map(|(region, &base)| {
                    pool.live_range(base, extent, StreamHandle(0))
                        .map(|(owner, _)| owner)
                        .ok_or(KvScrubError::NotLive {
                            region,
                            base,
                            extent,
                            blocks: layout.blocks_per_region,
                            device: dev,
                        })
                })
                .collect()
        })
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

    fn key(allocations: Vec<u64>) -> LedgerKey {
        LedgerKey {
            device: 0,
            layout: [7; 32],
            allocations: allocations.into_iter().map(|a| (a, 1)).collect(),
        }
    }

    fn who(tenant: &str, request: &str) -> Option<Arc<OwnerKey>> {
        let ctx = Context::new(Some(tenant), Some(request), None).unwrap();
        owner_of(&ctx, KvGateScope::Request)
    }

    #[test]
    fn unknown_blocks_are_dirty_and_own_blocks_are_free() {
        let mut l = Ledgers::default();
        let (k, a) = (key(vec![1]), who("t", "a"));
        assert_eq!(l.claim(&k, &[1, 2], &a, false).dirty, vec![1, 2]);
        l.record_scrub(&k, &[1, 2], &[]);
        assert_eq!(l.claim(&k, &[1, 2], &a, false), Sorted::default());
        // The same request claims again: no scrub.
        assert_eq!(l.claim(&k, &[2], &a, false), Sorted::default());
        // Another request of the same tenant: dirty under the request scope.
        assert_eq!(l.claim(&k, &[2], &who("t", "b"), false).dirty, vec![2]);
    }

    #[test]
    fn anonymous_owners_match_nobody_not_even_themselves() {
        let mut l = Ledgers::default();
        let k = key(vec![1]);
        l.record_scrub(&k, &[5], &[]);
        assert_eq!(l.claim(&k, &[5], &None, false), Sorted::default());
        assert_eq!(l.claim(&k, &[5], &None, false).dirty, vec![5]);
        assert_eq!(l.claim(&k, &[5], &who("t", "a"), false).dirty, vec![5]);
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
        l.record_scrub(&k, &[0], &[]);
        assert_eq!(l.claim(&k, &[0], &t("x", "r1"), false), Sorted::default());
        assert_eq!(l.claim(&k, &[0], &t("x", "r2"), false), Sorted::default());
        assert_eq!(l.claim(&k, &[0], &t("y", "r3"), false).dirty, vec![0]);
        // No tenant id: anonymous under this scope.
        let ctx = Context::new(None, Some("r"), None).unwrap();
        assert_eq!(owner_of(&ctx, KvGateScope::Tenant), None);
        assert!(owner_of(&ctx, KvGateScope::Request).is_some());
    }

    #[test]
    fn failed_blocks_stay_refused_until_a_scrub_verifies_them() {
        let mut l = Ledgers::default();
        let (k, a) = (key(vec![1]), who("t", "a"));
        l.record_scrub(&k, &[1], &[2]);
        let s = l.claim(&k, &[1, 2], &a, false);
        assert_eq!((s.dirty, s.failed), (vec![], vec![2]));
        l.record_scrub(&k, &[2], &[]);
        assert_eq!(l.claim(&k, &[2], &a, false), Sorted::default());
    }

    #[test]
    fn all_or_nothing_changes_nothing_when_a_block_is_dirty() {
        let mut l = Ledgers::default();
        let (k, a, b) = (key(vec![1]), who("t", "a"), who("t", "b"));
        l.record_scrub(&k, &[1], &[]);
        assert_eq!(l.claim(&k, &[1, 2], &a, true).dirty, vec![2]);
        // Block 1 was not handed to `a`: `b` may still take it without a scrub.
        assert_eq!(l.claim(&k, &[1], &b, true), Sorted::default());
    }

    #[test]
    fn a_scrubbed_block_another_claim_took_is_reported() {
        let mut l = Ledgers::default();
        let (k, a, b) = (key(vec![1]), who("t", "a"), who("t", "b"));
        l.record_scrub(&k, &[3, 4], &[]);
        assert_eq!(l.claim(&k, &[4], &b, false), Sorted::default());
        assert_eq!(l.hand_over_scrubbed(&k, &[3, 4], &a), vec![4]);
        assert_eq!(l.claim(&k, &[3], &a, false), Sorted::default());
    }

    #[test]
    fn a_cache_allocated_again_starts_an_empty_ledger() {
        let mut l = Ledgers::default();
        let a = who("t", "a");
        l.record_scrub(&key(vec![1]), &[0], &[]);
        assert_eq!(l.claim(&key(vec![2]), &[0], &a, false).dirty, vec![0]);
    }

    #[test]
    fn the_least_recently_used_ledger_is_forgotten() {
        let mut l = Ledgers::default();
        let a = who("t", "a");
        let k = |n: u8| LedgerKey {
            device: 0,
            layout: [n; 32],
            allocations: vec![(1, 1)],
        };
        for n in 0..=MAX_LEDGERS as u8 {
            l.record_scrub(&k(n), &[0], &[]);
        }
        assert_eq!(l.books.len(), MAX_LEDGERS);
        // The first cache's ledger was forgotten: its block is unknown again.
        assert_eq!(l.claim(&k(0), &[0], &a, false).dirty, vec![0]);
        assert_eq!(
            l.claim(&k(MAX_LEDGERS as u8), &[0], &a, false),
            Sorted::default()
        );
    }

    #[test]
    fn detail_lists_are_bounded() {
        assert_eq!(id_list(&[1, 2]), "1, 2");
        let many: Vec<u32> = (0..20).collect();
        assert!(id_list(&many).ends_with("15 and 4 more"));
    }
}

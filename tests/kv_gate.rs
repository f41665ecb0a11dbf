//! The eviction gate (`Allocator::claim_kv_blocks`, `kvh_claim_blocks`): a paged KV cache
//! block changes owner only through a verified scrub.

mod common;

use common::{manual_config, secret, Fixture};
use kvhygiene::alloc::{KvClaimError, KvClaimReport, KvLayout, KvScrubError};
use kvhygiene::backend::host::HostBackend;
use kvhygiene::backend::StreamHandle;
use kvhygiene::config::{Config, KvGateMode, KvGateScope};
use kvhygiene::context::Context;
use kvhygiene::events::{EventKind, KvScrubTrigger};

const BLOCK: u64 = 256;
const BLOCKS: u64 = 8;

/// A K and a V region of `BLOCKS` blocks in one live allocation, filled with a secret.
fn cache(f: &Fixture) -> (u64, KvLayout) {
    cache_of(f, BLOCK)
}

/// [`cache`] with blocks of `block` bytes.
fn cache_of(f: &Fixture, block: u64) -> (u64, KvLayout) {
    let len = 2 * BLOCKS * block;
    let a = f.malloc_zeroed(len as i64, 0, 1);
    f.write(0, a, &secret(len as usize, 0x6b));
    let layout = KvLayout {
        regions: vec![a, a + BLOCKS * block],
        block_bytes: block,
        block_stride: block,
        blocks_per_region: BLOCKS,
    };
    (a, layout)
}

fn config(mode: KvGateMode, scope: KvGateScope) -> Config {
    Config {
        kv_gate: mode,
        kv_gate_scope: scope,
        ..manual_config()
    }
}

/// Runs `f` as request `request` of tenant `tenant` (this thread's context).
fn as_request<R>(tenant: &str, request: &str, f: impl FnOnce() -> R) -> R {
    let ctx = Context::new(Some(tenant), Some(request), None).unwrap();
    let previous = Context::set_current(ctx);
    let r = f();
    Context::set_current(previous);
    r
}

fn claim(f: &Fixture, layout: &KvLayout, ids: &[u32]) -> Result<KvClaimReport, KvClaimError> {
    f.alloc.claim_kv_blocks(layout, ids, 0, StreamHandle(2))
}

fn batches(f: &Fixture) -> usize {
    f.backend.batches.lock().unwrap().len()
}

/// Whether both segments (K and V) of block `id` read zero.
fn block_is_zero(f: &Fixture, layout: &KvLayout, id: u64) -> bool {
    layout.regions.iter().all(|&base| {
        f.read(0, base + id * BLOCK, BLOCK as usize)
            .iter()
            .all(|&b| b == 0)
    })
}

fn fill_block(f: &Fixture, layout: &KvLayout, id: u64, tag: u8) {
    for &base in &layout.regions {
        f.write(0, base + id * BLOCK, &secret(BLOCK as usize, tag));
    }
}

fn gate_violations(f: &Fixture) -> Vec<String> {
    kv_gate_records(&f.sink)
}

/// The details of the `kv_gate` policy violations `sink` received, in order.
fn kv_gate_records(sink: &kvhygiene::events::MemorySink) -> Vec<String> {
    sink.snapshot()
        .into_iter()
        .filter_map(|e| match e.kind {
            EventKind::PolicyViolation {
                policy: "kv_gate",
                detail,
            } => Some(detail),
            _ => None,
        })
        .collect()
}

#[test]
fn a_block_moving_to_another_request_is_scrubbed_by_the_gate() {
    let f = Fixture::new(config(KvGateMode::Scrub, KvGateScope::Request));
    let (_, layout) = cache(&f);
    // Unknown owner: the first claim scrubs.
    let r = as_request("t1", "a", || claim(&f, &layout, &[1, 2])).unwrap();
    assert_eq!(
        (r.claimed, r.gate_scrubbed, r.refused, r.unknown_owner),
        (2, vec![1, 2], vec![], vec![1, 2])
    );
    assert!(block_is_zero(&f, &layout, 1) && block_is_zero(&f, &layout, 2));
    let c = f.alloc.stats().counters;
    assert_eq!(
        (c.kv_gate_scrubbed_blocks, c.kv_gate_owner_changed_blocks),
        (2, 0),
        "a new cache's first claims are not blocks the engine failed to scrub"
    );
    // Request a writes its keys and values; claiming its own blocks again costs no scrub.
    fill_block(&f, &layout, 1, 0xa1);
    fill_block(&f, &layout, 2, 0xa2);
    let before = batches(&f);
    let r = as_request("t1", "a", || claim(&f, &layout, &[2])).unwrap();
    assert_eq!((r.claimed, r.gate_scrubbed.len()), (1, 0));
    assert_eq!(
        batches(&f),
        before,
        "a claim without a change of owner ran a scrub"
    );
    assert!(!block_is_zero(&f, &layout, 2));
    // The engine forgot to scrub them: request b of the same tenant gets them zeroed.
    let r = as_request("t1", "b", || claim(&f, &layout, &[2, 1])).unwrap();
    assert_eq!((r.claimed, r.gate_scrubbed), (2, vec![2, 1]));
    assert!(r.unknown_owner.is_empty(), "{:?}", r.unknown_owner);
    assert!(block_is_zero(&f, &layout, 1) && block_is_zero(&f, &layout, 2));
    // The gate's scrub is evidence, for the new owner, marked as the gate's.
    let records: Vec<_> = f
        .sink
        .snapshot()
        .into_iter()
        .filter(|e| e.kind.name() == "kv_scrub")
        .collect();
    let last = records.last().unwrap();
    assert_eq!(last.context.request_id(), Some("b"));
    match &last.kind {
        EventKind::KvScrubbed(r) => {
            assert_eq!(r.trigger, KvScrubTrigger::Gate);
            assert_eq!(r.block_ids.as_deref(), Some(&[2, 1][..]));
            assert_eq!(r.verified_blocks, 2);
            assert_eq!(r.unknown_owner_blocks, 0);
        }
        other => panic!("{other:?}"),
    }
    match &records[0].kind {
        EventKind::KvScrubbed(r) => assert_eq!(r.unknown_owner_blocks, 2),
        other => panic!("{other:?}"),
    }
    let c = f.alloc.stats().counters;
    assert_eq!((c.kv_claim_calls, c.kv_blocks_claimed), (3, 5));
    assert_eq!((c.kv_gate_scrubbed_blocks, c.kv_claims_refused), (4, 0));
    assert_eq!(c.kv_gate_owner_changed_blocks, 2);
    assert!(gate_violations(&f).is_empty());
    f.assert_balanced();
}

#[test]
fn blocks_the_engine_scrubbed_change_owner_without_device_work() {
    let f = Fixture::new(config(KvGateMode::Scrub, KvGateScope::Request));
    let (_, layout) = cache(&f);
    as_request("t1", "a", || claim(&f, &layout, &[3])).unwrap();
    fill_block(&f, &layout, 3, 0x33);
    let engine = f
        .alloc
        .scrub_kv_blocks(&layout, &[3], 0, StreamHandle(2))
        .unwrap();
    assert!(engine.failed.is_empty());
    let before = batches(&f);
    let r = as_request("t2", "b", || claim(&f, &layout, &[3])).unwrap();
    assert_eq!((r.claimed, r.gate_scrubbed.len()), (1, 0));
    assert_eq!(batches(&f), before);
    assert!(block_is_zero(&f, &layout, 3));
    // Claimed by b, it is b's: a third request must not get it without a scrub.
    let r = as_request("t2", "c", || claim(&f, &layout, &[3])).unwrap();
    assert_eq!(r.gate_scrubbed, vec![3]);
}

#[test]
fn enforce_refuses_a_change_of_owner_and_hands_over_nothing() {
    let f = Fixture::new(config(KvGateMode::Enforce, KvGateScope::Request));
    let (_, layout) = cache(&f);
    // Unknown blocks are refused: the engine scrubs the whole cache once at start.
    let e = as_request("t1", "a", || claim(&f, &layout, &[0])).unwrap_err();
    assert_eq!(e, KvClaimError::Unscrubbed { blocks: vec![0] });
    let all: Vec<u32> = (0..BLOCKS as u32).collect();
    f.alloc
        .scrub_kv_blocks(&layout, &all, 0, StreamHandle(2))
        .unwrap();
    let before = batches(&f);
    let r = as_request("t1", "a", || claim(&f, &layout, &[0, 1])).unwrap();
    assert_eq!((r.claimed, r.gate_scrubbed.len()), (2, 0));
    fill_block(&f, &layout, 1, 0x11);
    // b asks for a's block 1 and the clean block 2: refused as a whole.
    let e = as_request("t1", "b", || claim(&f, &layout, &[2, 1])).unwrap_err();
    assert_eq!(e, KvClaimError::Unscrubbed { blocks: vec![1] });
    assert!(e.to_string().contains("kv_gate = enforce"), "{e}");
    assert_eq!(batches(&f), before, "enforce never scrubs");
    assert!(
        !block_is_zero(&f, &layout, 1),
        "a refused claim wrote memory"
    );
    // Block 2 was not handed to b: c may take it without a scrub.
    let r = as_request("t1", "c", || claim(&f, &layout, &[2])).unwrap();
    assert_eq!(r.claimed, 1);
    let v = gate_violations(&f);
    assert_eq!(v.len(), 2, "{v:?}");
    assert!(
        v[1].contains("would change owner") && v[1].contains("ids 1"),
        "{v:?}"
    );
    let c = f.alloc.stats().counters;
    assert_eq!((c.kv_claims_refused, c.kv_claim_calls), (2, 2));
}

#[test]
fn a_block_that_failed_its_scrub_is_not_handed_over_until_one_verifies() {
    let f = Fixture::new(config(KvGateMode::Scrub, KvGateScope::Request));
    let (_, layout) = cache(&f);
    f.backend.inject_fault_next();
    let engine = f
        .alloc
        .scrub_kv_blocks(&layout, &[6, 2], 0, StreamHandle(2))
        .unwrap();
    assert_eq!(engine.failed, vec![6]);
    let r = as_request("t1", "a", || claim(&f, &layout, &[2, 6])).unwrap();
    assert_eq!(
        (r.claimed, r.refused, r.gate_scrubbed.len()),
        (1, vec![6], 0)
    );
    let v = gate_violations(&f);
    assert!(
        v.len() == 1 && v[0].contains("failed verification"),
        "{v:?}"
    );
    // Enforce refuses it too; once a scrub verifies it, it can be claimed. That scrub reads
    // back every word after two passes, as the pool's re-scrub of a quarantined block does.
    f.alloc
        .scrub_kv_blocks(&layout, &[6], 0, StreamHandle(2))
        .unwrap();
    let options = f.backend.batches.lock().unwrap().last().unwrap().options;
    assert!(options.full_verify && options.double_pass, "{options:?}");
    f.alloc
        .scrub_kv_blocks(&layout, &[2], 0, StreamHandle(2))
        .unwrap();
    let options = f.backend.batches.lock().unwrap().last().unwrap().options;
    assert!(
        !options.full_verify,
        "a block that did not fail is sampled: {options:?}"
    );
    let r = as_request("t1", "a", || claim(&f, &layout, &[6])).unwrap();
    assert_eq!((r.claimed, r.refused.len()), (1, 0));
}

/// The full re-scrub of a FAILED block is judged by what it reads (every word), not by the
/// samples a sampled scrub takes: with blocks larger than those samples (4 KiB, 512 words
/// against 64), the FAILED block and a clean one scrubbed with it both verify.
#[test]
fn a_full_re_scrub_of_a_failed_block_larger_than_the_samples_verifies_it() {
    let f = Fixture::new(config(KvGateMode::Scrub, KvGateScope::Request));
    let (_, layout) = cache_of(&f, 4096);
    f.backend.inject_fault_next();
    let first = f
        .alloc
        .scrub_kv_blocks(&layout, &[6, 2], 0, StreamHandle(2));
    assert_eq!(first.unwrap().failed, vec![6]);
    let again = f
        .alloc
        .scrub_kv_blocks(&layout, &[6, 3], 0, StreamHandle(2));
    let options = f.backend.batches.lock().unwrap().last().unwrap().options;
    assert!(options.full_verify && options.double_pass, "{options:?}");
    assert_eq!(again.unwrap().failed, Vec::<u32>::new());
    let r = as_request("t1", "a", || claim(&f, &layout, &[6, 3])).unwrap();
    assert_eq!((r.claimed, r.refused.len()), (2, 0));
}

#[test]
fn a_gate_scrub_that_fails_verification_refuses_the_block() {
    let f = Fixture::new(config(KvGateMode::Scrub, KvGateScope::Request));
    let (_, layout) = cache(&f);
    f.backend.inject_fault_next();
    let r = as_request("t1", "a", || claim(&f, &layout, &[4, 5])).unwrap();
    assert_eq!(
        (r.claimed, r.refused, r.gate_scrubbed),
        (1, vec![4], vec![5])
    );
    // Still refused to its next claimant, whoever it is.
    let r = as_request("t1", "a", || claim(&f, &layout, &[4])).unwrap();
    assert_eq!((r.claimed, r.refused), (0, vec![4]));
}

#[test]
fn the_tenant_scope_lets_a_tenants_requests_share_blocks() {
    let f = Fixture::new(config(KvGateMode::Scrub, KvGateScope::Tenant));
    let (_, layout) = cache(&f);
    as_request("t1", "a", || claim(&f, &layout, &[0])).unwrap();
    fill_block(&f, &layout, 0, 0x10);
    let r = as_request("t1", "b", || claim(&f, &layout, &[0])).unwrap();
    assert_eq!(r.gate_scrubbed.len(), 0);
    assert!(
        !block_is_zero(&f, &layout, 0),
        "the tenant's prefix cache was kept"
    );
    let r = as_request("t2", "c", || claim(&f, &layout, &[0])).unwrap();
    assert_eq!(r.gate_scrubbed, vec![0]);
    assert!(block_is_zero(&f, &layout, 0));
}

#[test]
fn a_thread_without_ids_never_matches_an_owner() {
    let f = Fixture::new(config(KvGateMode::Scrub, KvGateScope::Request));
    let (_, layout) = cache(&f);
    let r = claim(&f, &layout, &[7]).unwrap();
    assert_eq!((r.gate_scrubbed, r.unknown_owner), (vec![7], vec![7]));
    let r = claim(&f, &layout, &[7]).unwrap();
    assert_eq!(
        r.gate_scrubbed,
        vec![7],
        "anonymous claims must not share blocks"
    );
    // The block had an owner (an anonymous one): it changed owner without a scrub, which is
    // what the engine must hear of (it claims outside a request's context).
    assert!(r.unknown_owner.is_empty(), "{:?}", r.unknown_owner);
    assert_eq!(f.alloc.stats().counters.kv_gate_owner_changed_blocks, 1);
}

#[test]
fn with_the_gate_off_claims_are_accepted_as_they_are() {
    let f = Fixture::new(config(KvGateMode::Off, KvGateScope::Request));
    let (_, layout) = cache(&f);
    let before = batches(&f);
    as_request("t1", "a", || claim(&f, &layout, &[1])).unwrap();
    let r = as_request("t2", "b", || claim(&f, &layout, &[1])).unwrap();
    assert_eq!((r.claimed, r.gate_scrubbed.len()), (1, 0));
    assert_eq!(batches(&f), before);
    // Input is still checked.
    let e = claim(&f, &layout, &[BLOCKS as u32]).unwrap_err();
    assert!(matches!(
        e,
        KvClaimError::Scrub(KvScrubError::InvalidBlocks(_))
    ));
}

#[test]
fn bad_claims_are_refused_and_logged() {
    let f = Fixture::new(config(KvGateMode::Scrub, KvGateScope::Request));
    let (a, layout) = cache(&f);
    let e = claim(&f, &layout, &[1, 1]).unwrap_err();
    assert!(e.to_string().contains("named more than once"), "{e}");
    // A cache the engine freed is no longer live.
    f.alloc
        .free(a, (2 * BLOCKS * BLOCK) as i64, 0, StreamHandle(1))
        .unwrap();
    let e = claim(&f, &layout, &[1]).unwrap_err();
    assert!(
        matches!(e, KvClaimError::Scrub(KvScrubError::NotLive { .. })),
        "{e}"
    );
    let e = f
        .alloc
        .claim_kv_blocks(&layout, &[1], 9, StreamHandle(0))
        .unwrap_err();
    assert!(matches!(
        e,
        KvClaimError::Scrub(KvScrubError::InvalidDevice { .. })
    ));
    // Each refusal is logged, the device that does not exist too.
    let v = gate_violations(&f);
    assert_eq!(v.len(), 3, "{v:?}");
    assert!(
        v.iter().all(|d| d.starts_with("kvh_claim_blocks refused")),
        "{v:?}"
    );
    assert!(v[2].contains("invalid device 9"), "{v:?}");
    assert_eq!(f.alloc.stats().counters.kv_claims_refused, 3);
}

#[test]
fn a_cache_allocated_again_forgets_its_owners() {
    let f = Fixture::new(config(KvGateMode::Scrub, KvGateScope::Request));
    let (a, layout) = cache(&f);
    f.alloc
        .scrub_kv_blocks(&layout, &[0], 0, StreamHandle(2))
        .unwrap();
    f.alloc
        .free(a, (2 * BLOCKS * BLOCK) as i64, 0, StreamHandle(1))
        .unwrap();
    f.alloc.synchronize().unwrap();
    // The same bytes come back as a new allocation: the same block, the same layout digest,
    // but a new scrub sequence number (its free was scrubbed).
    let b = f.malloc_zeroed((2 * BLOCKS * BLOCK) as i64, 0, 1);
    assert_eq!(b, a, "the pool hands the cached block back");
    let r = as_request("t1", "a", || claim(&f, &layout, &[0])).unwrap();
    assert_eq!(r.gate_scrubbed, vec![0], "a new cache's owners are unknown");
}

#[test]
fn another_layout_over_the_same_memory_forgets_what_the_first_one_said() {
    let f = Fixture::new(config(KvGateMode::Scrub, KvGateScope::Request));
    let (a, fine) = cache(&f);
    // The same regions seen with blocks twice as large.
    let coarse = coarse_view(&fine);
    let all: Vec<u32> = (0..BLOCKS as u32).collect();
    f.alloc
        .scrub_kv_blocks(&fine, &all, 0, StreamHandle(2))
        .unwrap();
    as_request("t1", "x", || claim(&f, &coarse, &[0])).unwrap();
    f.write(0, a, &secret(2 * BLOCK as usize, 0x5a)); // x's bytes: fine blocks 0 and 1
    let r = as_request("t1", "y", || claim(&f, &fine, &[0])).unwrap();
    assert_eq!(r.gate_scrubbed, vec![0], "y got x's bytes without a scrub");
    assert!(block_is_zero(&f, &fine, 0));
}

/// The `Backend` methods a test backend with a `host: HostBackend` field takes from it as
/// they are; it writes `submit_scrub` (and anything else it changes) itself.
macro_rules! host_methods {
    () => {
        fn kind(&self) -> BackendKind {
            BackendKind::Host
        }
        fn device_count(&self) -> u32 {
            self.host.device_count()
        }
        fn allocate(&self, d: u32, len: u64) -> Result<DevicePtr, BackendError> {
            self.host.allocate(d, len)
        }
        fn release(&self, d: u32, a: DevicePtr, len: u64) -> Result<(), BackendError> {
            self.host.release(d, a, len)
        }
        fn zero_fresh(
            &self,
            d: u32,
            a: DevicePtr,
            len: u64,
            s: StreamHandle,
        ) -> Result<(), BackendError> {
            self.host.zero_fresh(d, a, len, s)
        }
        fn write(&self, d: u32, a: DevicePtr, src: &[u8]) -> Result<(), BackendError> {
            self.host.write(d, a, src)
        }
        fn read(&self, d: u32, a: DevicePtr, dst: &mut [u8]) -> Result<(), BackendError> {
            self.host.read(d, a, dst)
        }
        fn shutdown(&self) {
            self.host.shutdown()
        }
    };
}

/// What the [`held`] and [`lazy`] test backends share: the streams a test holds, and how many
/// scrubs were submitted on each, kept in a backend's state under its lock and condition
/// variable.
mod gates {
    use std::collections::{HashMap, HashSet};
    use std::sync::{Condvar, Mutex};

    #[derive(Default)]
    pub struct Gates {
        pub held: HashSet<u64>,
        pub submitted: HashMap<u64, usize>,
    }

    /// A backend state that holds [`Gates`].
    pub trait WithGates {
        fn gates(&mut self) -> &mut Gates;
    }

    /// Holds (`true`) or releases (`false`) `stream`.
    pub fn hold<S: WithGates>(state: &(Mutex<S>, Condvar), stream: u64, held: bool) {
        let mut s = state.0.lock().unwrap();
        let g = s.gates();
        if held {
            g.held.insert(stream);
        } else {
            g.held.remove(&stream);
        }
        state.1.notify_all();
    }

    /// Counts a submission on `stream`; returns its place among the stream's, from 1.
    pub fn submitted<S: WithGates>(s: &mut S, state: &(Mutex<S>, Condvar), stream: u64) -> usize {
        let n = s.gates().submitted.entry(stream).or_default();
        *n += 1;
        state.1.notify_all();
        *n
    }

    /// How many scrubs were submitted on `stream`.
    pub fn count<S: WithGates>(state: &(Mutex<S>, Condvar), stream: u64) -> usize {
        let mut s = state.0.lock().unwrap();
        s.gates().submitted.get(&stream).copied().unwrap_or(0)
    }

    /// Waits until `n` scrubs were submitted on `stream`.
    pub fn wait_submitted<S: WithGates>(state: &(Mutex<S>, Condvar), stream: u64, n: usize) {
        let mut s = state.0.lock().unwrap();
        while s.gates().submitted.get(&stream).copied().unwrap_or(0) < n {
            s = state.1.wait(s).unwrap();
        }
    }
}

/// A host backend whose scrubs on chosen streams complete only when released, or are refused
/// for lack of memory until allowed, and which says when a scrub was submitted: for
/// interleavings of claims and scrubs, without sleeping.
mod held {
    use crate::gates::{self, Gates, WithGates};
    use std::collections::{HashMap, HashSet};
    use std::sync::{Arc, Condvar, Mutex};

    use kvhygiene::backend::host::HostBackend;
    use kvhygiene::backend::verify::SegmentResult;
    use kvhygiene::backend::{
        Backend, BackendError, BackendKind, DevicePtr, ScrubBatch, ScrubTicket, StreamHandle,
    };

    #[derive(Default)]
    struct State {
        gates: Gates,
        /// The first this-many scrubs of a stream complete even while it is held.
        passed: HashMap<u64, usize>,
        /// Streams whose submissions fail for lack of memory.
        no_memory: HashSet<u64>,
        /// How many submissions on each stream failed so.
        refused: HashMap<u64, usize>,
    }

    impl WithGates for State {
        fn gates(&mut self) -> &mut Gates {
            &mut self.gates
        }
    }

    impl State {
        fn waits(&self, stream: u64, index: usize) -> bool {
            self.gates.held.contains(&stream)
                && self.passed.get(&stream).copied().unwrap_or(0) < index
        }
    }

    pub struct Held {
        pub host: Arc<HostBackend>,
        state: Arc<(Mutex<State>, Condvar)>,
    }

    impl Held {
        pub fn new() -> Arc<Self> {
            Arc::new(Held {
                host: HostBackend::new(),
                state: Arc::default(),
            })
        }

        /// Scrubs on `stream` wait (`true`) or complete (`false`).
        pub fn hold(&self, stream: u64, held: bool) {
            gates::hold(&self.state, stream, held);
        }

        /// Lets the first `n` scrubs submitted on `stream` complete, held or not.
        pub fn let_through(&self, stream: u64, n: usize) {
            self.state.0.lock().unwrap().passed.insert(stream, n);
            self.state.1.notify_all();
        }

        /// Waits until `n` scrubs were submitted on `stream`.
        pub fn wait_submitted(&self, stream: u64, n: usize) {
            gates::wait_submitted(&self.state, stream, n);
        }

        /// Submissions on `stream` fail for lack of memory (`true`) or go through (`false`).
        pub fn out_of_memory(&self, stream: u64, refuse: bool) {
            let mut s = self.state.0.lock().unwrap();
            if refuse {
                s.no_memory.insert(stream);
            } else {
                s.no_memory.remove(&stream);
            }
        }

        /// Waits until a submission on `stream` failed for lack of memory.
        pub fn wait_refused(&self, stream: u64) {
            let mut s = self.state.0.lock().unwrap();
            while !s.refused.contains_key(&stream) {
                s = self.state.1.wait(s).unwrap();
            }
        }

        /// How many submissions on `stream` failed for lack of memory so far.
        pub fn refusals(&self, stream: u64) -> usize {
            let s = self.state.0.lock().unwrap();
            s.refused.get(&stream).copied().unwrap_or(0)
        }

        /// Waits until `n` submissions on `stream` failed for lack of memory.
        pub fn wait_refusals(&self, stream: u64, n: usize) {
            let mut s = self.state.0.lock().unwrap();
            while s.refused.get(&stream).copied().unwrap_or(0) < n {
                s = self.state.1.wait(s).unwrap();
            }
        }
    }

    struct Ticket {
        inner: Box<dyn ScrubTicket>,
        stream: u64,
        /// This scrub's place among the stream's submissions, from 1.
        index: usize,
        state: Arc<(Mutex<State>, Condvar)>,
    }

    impl Ticket {
        fn released(&self) -> bool {
            !self.state.0.lock().unwrap().waits(self.stream, self.index)
        }
    }

    impl ScrubTicket for Ticket {
        fn poll(&mut self) -> Result<Option<Vec<SegmentResult>>, BackendError> {
            if !self.released() {
                return Ok(None);
            }
            self.inner.poll()
        }

        fn wait(&mut self) -> Result<Vec<SegmentResult>, BackendError> {
            let mut s = self.state.0.lock().unwrap();
            while s.waits(self.stream, self.index) {
                s = self.state.1.wait(s).unwrap();
            }
            drop(s);
            self.inner.wait()
        }
    }

    impl Backend for Held {
        host_methods!();
        unsafe fn submit_scrub(&self, b: ScrubBatch) -> Result<Box<dyn ScrubTicket>, BackendError> {
            let stream = b.stream.0;
            {
                let mut s = self.state.0.lock().unwrap();
                if s.no_memory.contains(&stream) {
                    *s.refused.entry(stream).or_default() += 1;
                    self.state.1.notify_all();
                    return Err(BackendError::OutOfMemory {
                        device: b.device,
                        requested: 0,
                    });
                }
            }
            // SAFETY: 1-2. this method's own contract, passed on unchanged.
            let inner = unsafe { self.host.submit_scrub(b) }?;
            let mut s = self.state.0.lock().unwrap();
            let index = gates::submitted(&mut *s, &self.state, stream);
            Ok(Box::new(Ticket {
                inner,
                stream,
                index,
                state: self.state.clone(),
            }))
        }
    }
}

/// `n` caches of one block each, in allocations of their own (as many as the gate keeps
/// ledgers for, to make it forget another's).
fn single_block_caches(alloc: &kvhygiene::alloc::Allocator, n: usize) -> Vec<KvLayout> {
    (0..n)
        .map(|_| {
            let a = alloc.malloc(BLOCK as i64, 0, StreamHandle(1)).unwrap();
            KvLayout {
                regions: vec![a],
                block_bytes: BLOCK,
                block_stride: BLOCK,
                blocks_per_region: 1,
            }
        })
        .collect()
}

/// An allocator over a [`held::Held`] backend, with a cache of `BLOCKS` blocks.
fn held_cache() -> (
    kvhygiene::alloc::Allocator,
    std::sync::Arc<held::Held>,
    KvLayout,
) {
    held_cache_into(None)
}

/// As [`held_cache`], the allocator's events going to `sink`.
fn held_cache_into(
    sink: Option<std::sync::Arc<dyn kvhygiene::events::EventSink>>,
) -> (
    kvhygiene::alloc::Allocator,
    std::sync::Arc<held::Held>,
    KvLayout,
) {
    cache_over(held::Held::new(), sink)
}

/// An allocator over `backend` (gate `scrub`, request scope), its events going to `sink`, with
/// a cache of `BLOCKS` blocks in two regions of one allocation.
fn cache_over<B: kvhygiene::backend::Backend + 'static>(
    backend: std::sync::Arc<B>,
    sink: Option<std::sync::Arc<dyn kvhygiene::events::EventSink>>,
) -> (kvhygiene::alloc::Allocator, std::sync::Arc<B>, KvLayout) {
    cache_over_scoped(backend, sink, KvGateScope::Request)
}

/// [`cache_over`], the gate's owner being the claimant's `scope`.
fn cache_over_scoped<B: kvhygiene::backend::Backend + 'static>(
    backend: std::sync::Arc<B>,
    sink: Option<std::sync::Arc<dyn kvhygiene::events::EventSink>>,
    scope: KvGateScope,
) -> (kvhygiene::alloc::Allocator, std::sync::Arc<B>, KvLayout) {
    let alloc =
        kvhygiene::alloc::Allocator::new(backend.clone(), config(KvGateMode::Scrub, scope), sink);
    let len = 2 * BLOCKS * BLOCK;
    let a = alloc.malloc(len as i64, 0, StreamHandle(1)).unwrap();
    let layout = KvLayout {
        regions: vec![a, a + BLOCKS * BLOCK],
        block_bytes: BLOCK,
        block_stride: BLOCK,
        blocks_per_region: BLOCKS,
    };
    (alloc, backend, layout)
}

/// Block 5 is claimed by request w and written; request x then claims it, and while the gate's
/// scrub for x is held on stream 3, `during` runs. Returns x's claim and what `during` gave.
fn x_claims_ws_block_while<R>(
    alloc: &kvhygiene::alloc::Allocator,
    backend: &held::Held,
    layout: &KvLayout,
    during: impl FnOnce() -> R,
) -> (Result<KvClaimReport, KvClaimError>, R) {
    block_5_written_by(alloc, backend, layout, "t");
    backend.hold(3, true);
    std::thread::scope(|s| {
        let x = s.spawn(|| {
            as_request("t", "x", || {
                alloc.claim_kv_blocks(layout, &[5], 0, StreamHandle(3))
            })
        });
        backend.wait_submitted(3, 1);
        let got = during();
        backend.hold(3, false);
        (x.join().unwrap(), got)
    })
}

/// Block 5 is claimed by request w and written, and the gate scrubs on stream 3 (request x's
/// claims) are held from now on. Returns as many other single-block caches as the gate keeps
/// ledgers for: [`push_out_ledger`] scrubs them, which pushes the cache's ledger out.
fn ws_block_held_for_x(
    alloc: &kvhygiene::alloc::Allocator,
    backend: &held::Held,
    layout: &KvLayout,
) -> Vec<KvLayout> {
    let others = single_block_caches(alloc, 64);
    block_5_written_by(alloc, backend, layout, "t");
    backend.hold(3, true);
    others
}

/// The engine scrubs every cache of `others`: the gate then keeps none of the ledgers it kept
/// before.
fn push_out_ledger(alloc: &kvhygiene::alloc::Allocator, others: &[KvLayout]) {
    for other in others {
        alloc
            .scrub_kv_blocks(other, &[0], 0, StreamHandle(9))
            .unwrap();
    }
}

/// Block 5 is claimed by request w and written; request x then claims it, and while each of
/// the gate's first `passes` scrubs for x is held, the engine scrubs as many other caches as
/// the gate keeps ledgers for, which pushes the cache's ledger out. Returns x's claim.
fn x_claims_ws_block_losing_its_ledger(
    alloc: &kvhygiene::alloc::Allocator,
    backend: &held::Held,
    layout: &KvLayout,
    passes: usize,
) -> KvClaimReport {
    let others = ws_block_held_for_x(alloc, backend, layout);
    std::thread::scope(|s| {
        let x = s.spawn(|| {
            as_request("t", "x", || {
                alloc.claim_kv_blocks(layout, &[5], 0, StreamHandle(3))
            })
        });
        for pass in 1..=passes {
            backend.wait_submitted(3, pass);
            push_out_ledger(alloc, &others);
            backend.let_through(3, pass);
        }
        backend.hold(3, false);
        x.join().unwrap().unwrap()
    })
}

/// The blocks the last gate scrub's `kv_scrub` record says failed.
fn last_gate_scrub_failed_blocks(f: &Fixture) -> u64 {
    f.sink
        .snapshot()
        .into_iter()
        .filter_map(|e| match e.kind {
            EventKind::KvScrubbed(r) if r.trigger == KvScrubTrigger::Gate => Some(r.failed_blocks),
            _ => None,
        })
        .last()
        .unwrap()
}

/// Request w of `tenant` claims block 5 (its gate scrub on stream 2) and writes it.
fn block_5_written_by(
    alloc: &kvhygiene::alloc::Allocator,
    backend: &dyn kvhygiene::backend::Backend,
    layout: &KvLayout,
    tenant: &str,
) {
    as_request(tenant, "w", || {
        alloc.claim_kv_blocks(layout, &[5], 0, StreamHandle(2))
    })
    .unwrap();
    held_fill(backend, layout, 5, 0x77);
}

/// Writes `tag`'s bytes into block `id` of every region, as its holder would.
fn held_fill(b: &dyn kvhygiene::backend::Backend, layout: &KvLayout, id: u64, tag: u8) {
    for &base in &layout.regions {
        b.write(0, base + id * BLOCK, &secret(BLOCK as usize, tag))
            .unwrap();
    }
}

fn held_zero(b: &held::Held, layout: &KvLayout, id: u64) -> bool {
    use kvhygiene::backend::Backend;
    layout.regions.iter().all(|&base| {
        let mut v = vec![1u8; BLOCK as usize];
        b.read(0, base + id * BLOCK, &mut v).unwrap();
        v.iter().all(|&x| x == 0)
    })
}

#[test]
fn an_engine_verdict_that_lands_after_a_new_owner_took_the_block_is_not_applied() {
    let (alloc, backend, layout) = held_cache();
    let claim_as = |req: &str| {
        as_request("t", req, || {
            alloc.claim_kv_blocks(&layout, &[5], 0, StreamHandle(2))
        })
        .unwrap()
    };
    claim_as("w");
    held_fill(&*backend, &layout, 5, 0x77);
    // The engine scrubs w's block on stream 7; its verdict is held back.
    backend.hold(7, true);
    let engine = std::thread::scope(|s| {
        let scrub = s.spawn(|| alloc.scrub_kv_blocks(&layout, &[5], 0, StreamHandle(7)));
        backend.wait_submitted(7, 1);
        // Meanwhile x is given the block: the gate scrubs it (stream 2) and hands it over.
        let r = claim_as("x");
        assert_eq!((r.claimed, r.gate_scrubbed.clone()), (1, vec![5]));
        held_fill(&*backend, &layout, 5, 0xab); // x's keys and values
        backend.hold(7, false);
        scrub.join().unwrap().unwrap()
    });
    assert!(engine.failed.is_empty());
    // The engine's verdict described w's block, not x's: y must get it scrubbed.
    let r = claim_as("y");
    assert_eq!((r.claimed, r.gate_scrubbed), (1, vec![5]));
    assert!(held_zero(&backend, &layout, 5), "y got x's bytes");
}

#[test]
fn of_two_claims_racing_for_one_dirty_block_only_one_gets_it() {
    let (alloc, backend, layout) = held_cache();
    let (x, y) = x_claims_ws_block_while(&alloc, &backend, &layout, || {
        let y = as_request("t", "y", || {
            alloc.claim_kv_blocks(&layout, &[5], 0, StreamHandle(4))
        })
        .unwrap();
        held_fill(&*backend, &layout, 5, 0xcd); // y's keys and values
        y
    });
    let x = x.unwrap();
    assert_eq!((y.claimed, y.gate_scrubbed.clone()), (1, vec![5]));
    assert_eq!(
        (x.claimed, x.taken.clone(), x.refused.len()),
        (0, vec![5], 0)
    );
    // The block is y's: x's claim left nothing behind that lets a third request skip a scrub.
    let z = as_request("t", "z", || {
        alloc.claim_kv_blocks(&layout, &[5], 0, StreamHandle(2))
    })
    .unwrap();
    assert_eq!(z.gate_scrubbed, vec![5]);
}

/// Blocks 5 and 6 are w's and written. x claims them while its gate scrub finds no memory for
/// its batch (stream 3), so it tries again while an engine scrub (stream 7, held) holds a
/// slot; meanwhile y claims block 5 and writes it (tag 0xcd), then `after_y` runs, and x's
/// submissions go through. Returns x's and y's claims.
fn x_claims_ws_blocks_while_out_of_memory(
    alloc: &kvhygiene::alloc::Allocator,
    backend: &held::Held,
    layout: &KvLayout,
    after_y: impl FnOnce(&held::Held),
) -> (KvClaimReport, KvClaimReport) {
    as_request("t", "w", || {
        alloc.claim_kv_blocks(layout, &[5, 6], 0, StreamHandle(2))
    })
    .unwrap();
    held_fill(backend, layout, 5, 0x77);
    held_fill(backend, layout, 6, 0x77);
    backend.hold(7, true);
    backend.out_of_memory(3, true);
    std::thread::scope(|s| {
        // A scrub holding a batch slot: x's claim waits for slots instead of failing.
        let engine = s.spawn(|| alloc.scrub_kv_blocks(layout, &[1], 0, StreamHandle(7)));
        backend.wait_submitted(7, 1);
        let x = s.spawn(|| {
            as_request("t", "x", || {
                alloc.claim_kv_blocks(layout, &[5, 6], 0, StreamHandle(3))
            })
        });
        backend.wait_refused(3);
        let y = as_request("t", "y", || {
            alloc.claim_kv_blocks(layout, &[5], 0, StreamHandle(4))
        })
        .unwrap();
        held_fill(backend, layout, 5, 0xcd); // y's keys and values
        after_y(backend);
        backend.out_of_memory(3, false);
        let x = x.join().unwrap().unwrap();
        backend.hold(7, false);
        engine.join().unwrap().unwrap();
        (x, y)
    })
}

/// Blocks 5 and 6 are w's and written. x claims them, and its gate scrub finds no memory for
/// its batch: it tries again while another scrub holds one. Meanwhile y is given block 5
/// (through a scrub of its own) and writes it. x's scrub, when it goes through, must leave y's
/// keys and values alone: block 5 is y's (taken), and x is handed block 6 alone.
#[test]
fn a_claims_scrub_leaves_out_a_block_another_claim_was_handed_before_its_submission() {
    let sink = kvhygiene::events::MemorySink::new();
    let (alloc, backend, layout) = held_cache_into(Some(sink.clone()));
    let (x, y) = x_claims_ws_blocks_while_out_of_memory(&alloc, &backend, &layout, |_| {});
    assert_eq!((y.claimed, y.gate_scrubbed), (1, vec![5]));
    assert_eq!((x.claimed, x.gate_scrubbed, x.taken), (1, vec![6], vec![5]));
    assert!(
        held_holds(&backend, &layout, 5, 0xcd),
        "x's scrub wrote y's block"
    );
    assert!(held_zero(&backend, &layout, 6));
    let records = kv_gate_records(&sink);
    assert!(
        records
            .iter()
            .any(|r| r.contains("another claim took them") && r.contains("ids 5)")),
        "{records:?}"
    );
    // w's blocks changed owner twice, once each: to y (5) and to x (6).
    assert_eq!(alloc.stats().counters.kv_gate_owner_changed_blocks, 2);
    // x's scrub record names both blocks, says block 5 was left out, and that one block
    // (6) changed owner through it.
    let x_record = sink
        .snapshot()
        .into_iter()
        .filter_map(|e| match e.kind {
            EventKind::KvScrubbed(r) if r.stream == 3 => Some(r),
            _ => None,
        })
        .last()
        .unwrap();
    assert_eq!(
        (
            x_record.blocks,
            x_record.verified_blocks,
            x_record.unverified_segments,
            x_record.withdrawn_blocks,
            x_record.owner_changed_blocks
        ),
        (2, 1, 2, 1, 1)
    );
}

/// As above, but x's scrub still finds no memory on the try that leaves block 5 out, and
/// goes through on a later try: block 5 stays left out of every later try, so y's keys and
/// values are kept.
#[test]
fn a_block_left_out_of_a_claims_scrub_stays_out_when_the_scrub_is_tried_again() {
    let (alloc, backend, layout) = held_cache();
    let (x, y) = x_claims_ws_blocks_while_out_of_memory(&alloc, &backend, &layout, |b| {
        // Two more tries refused: the second began after y was handed block 5, so block 5
        // was left out of it (or of the one before).
        let n = b.refusals(3);
        b.wait_refusals(3, n + 2);
    });
    assert_eq!((y.claimed, y.gate_scrubbed), (1, vec![5]));
    assert!(
        held_holds(&backend, &layout, 5, 0xcd),
        "x's scrub, tried again, wrote y's block"
    );
    assert_eq!((x.claimed, x.gate_scrubbed, x.taken), (1, vec![6], vec![5]));
    let c = alloc.stats().counters;
    assert_eq!(
        (c.kv_gate_scrubbed_blocks, c.kv_gate_owner_changed_blocks),
        (4, 2),
        "w's two blocks, each scrubbed once for the claim that took it, after the first claim's two"
    );
}

/// Block 5 is w's and written. x claims it, and its gate scrub finds no memory for its batch:
/// it tries again while another scrub holds one. Meanwhile the engine's scrubs of other caches
/// push the cache's ledger out, so x's next try withdraws block 5 (never scrubbed) and the
/// claim makes a second pass, whose scrub (the only one of block 5) finds it unknown. What
/// the report says of block 5 (`unknown_owner`) and what the counters say agree.
#[test]
fn a_block_withdrawn_because_its_ledger_was_forgotten_is_reported_as_the_counters_count_it() {
    let sink = kvhygiene::events::MemorySink::new();
    let (alloc, backend, layout) = held_cache_into(Some(sink.clone()));
    let others = single_block_caches(&alloc, 64);
    block_5_written_by(&alloc, &*backend, &layout, "t");
    let gate_records = |sink: &kvhygiene::events::MemorySink| {
        sink.snapshot()
            .into_iter()
            .filter_map(|e| match e.kind {
                EventKind::KvScrubbed(r) if r.trigger == KvScrubTrigger::Gate => Some(r),
                _ => None,
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(gate_records(&sink).len(), 1);
    let before = alloc.stats().counters;
    backend.hold(7, true);
    backend.out_of_memory(3, true);
    let x = std::thread::scope(|s| {
        // A scrub holding a batch slot: x's claim waits for slots instead of failing.
        let engine = s.spawn(|| alloc.scrub_kv_blocks(&layout, &[1], 0, StreamHandle(7)));
        backend.wait_submitted(7, 1);
        let x = s.spawn(|| {
            as_request("t", "x", || {
                alloc.claim_kv_blocks(&layout, &[5], 0, StreamHandle(3))
            })
        });
        backend.wait_refused(3);
        push_out_ledger(&alloc, &others);
        // The next try of x's first pass withdraws block 5 (its ledger is gone) and submits
        // nothing: the next refusal is the second pass's scrub.
        let n = backend.refusals(3);
        backend.wait_refusals(3, n + 1);
        backend.out_of_memory(3, false);
        let x = x.join().unwrap().unwrap();
        backend.hold(7, false);
        engine.join().unwrap().unwrap();
        x
    });
    assert_eq!((x.claimed, x.gate_scrubbed.clone()), (1, vec![5]), "{x:?}");
    // The first pass's scrub, which withdrew its one block, reached no device: one record,
    // the second pass's, which verified block 5 and counts it as a change of owner.
    let records = gate_records(&sink);
    assert_eq!(records.len(), 2, "{records:?}");
    let second_pass = &records[1];
    assert_eq!(
        (
            second_pass.verified_blocks,
            second_pass.withdrawn_blocks,
            second_pass.unknown_owner_blocks,
            second_pass.owner_changed_blocks
        ),
        (1, 0, 0, 1),
        "{second_pass:?}"
    );
    let c = alloc.stats().counters;
    let changed = c.kv_gate_owner_changed_blocks - before.kv_gate_owner_changed_blocks;
    let scrubbed = c.kv_gate_scrubbed_blocks - before.kv_gate_scrubbed_blocks;
    assert_eq!(scrubbed, 1, "block 5 was scrubbed once");
    assert_eq!(
        (x.gate_scrubbed.len() - x.unknown_owner.len() - x.in_flight.len()) as u64,
        changed,
        "the report says block 5 changed owner ({:?} unknown) but kv_gate_owner_changed_blocks \
         grew by {changed}",
        x.unknown_owner
    );
}

/// An engine scrub that launched nothing (no memory for its batch, and none to wait for)
/// leaves nothing in flight: a claim of the block it named, CLEAN from an earlier scrub, is
/// handed it without device work.
#[test]
fn a_kv_scrub_that_launched_nothing_leaves_no_block_in_flight() {
    let (alloc, backend, layout) = held_cache();
    alloc
        .scrub_kv_blocks(&layout, &[5], 0, StreamHandle(2))
        .unwrap();
    backend.out_of_memory(3, true);
    let refused = alloc.scrub_kv_blocks(&layout, &[5], 0, StreamHandle(3));
    assert!(
        matches!(
            refused,
            Err(KvScrubError::Backend {
                error: kvhygiene::backend::BackendError::OutOfMemory { .. },
                ..
            })
        ),
        "{refused:?}"
    );
    let x = as_request("t", "x", || {
        alloc.claim_kv_blocks(&layout, &[5], 0, StreamHandle(4))
    })
    .unwrap();
    assert_eq!((x.claimed, x.gate_scrubbed), (1, vec![]));
}

#[test]
fn a_claim_whose_ledger_is_forgotten_while_it_scrubs_is_not_reported_as_taken() {
    let (alloc, backend, layout) = held_cache();
    // As many other caches as ledgers are kept, each a single-block layout of its own.
    let others = single_block_caches(&alloc, 64);
    let (x, ()) = x_claims_ws_block_while(&alloc, &backend, &layout, || {
        // While x's gate scrub runs, the engine scrubs the other caches: the least recently
        // used ledger (the first cache's) is forgotten. No claim names block 5 meanwhile.
        for other in &others {
            alloc
                .scrub_kv_blocks(other, &[0], 0, StreamHandle(9))
                .unwrap();
        }
    });
    let x = x.unwrap();
    // Nobody else claimed block 5: the claim must not say another claim took it
    // (KVH_ERR_KV_TAKEN, "two requests were given the same blocks"). The block was verified
    // by x's scrub and is handed to x.
    assert_eq!(
        (x.claimed, x.taken.clone(), x.refused.clone()),
        (1, vec![], vec![]),
        "{x:?}"
    );
    assert!(held_zero(&backend, &layout, 5));
    // Block 5 was w's when x claimed it: it changed owner unscrubbed, though the pass after
    // the forgotten ledger found it unknown.
    assert_eq!(
        (&x.gate_scrubbed, &x.unknown_owner),
        (&vec![5], &vec![]),
        "{x:?}"
    );
    let c = alloc.stats().counters;
    // Each gate scrub counts as it verifies: w's first claim of the new cache, x's, and x's
    // again through the ledger that replaced the forgotten one (which knew nobody's).
    assert_eq!(
        (c.kv_gate_scrubbed_blocks, c.kv_gate_owner_changed_blocks),
        (3, 1),
        "{c:?}"
    );
}

#[test]
fn a_verified_claim_losing_to_a_failed_one_is_not_reported_as_taken() {
    let (alloc, backend, layout) = held_cache();
    block_5_written_by(&alloc, &*backend, &layout, "t");
    backend.hold(3, true);
    backend.hold(4, true);
    let (x, y) = std::thread::scope(|s| {
        // x's gate scrub leaves half of a segment unzeroed: it fails verification.
        backend.host.inject_skip_tail(1);
        let x = s.spawn(|| {
            as_request("t", "x", || {
                alloc.claim_kv_blocks(&layout, &[5], 0, StreamHandle(3))
            })
        });
        backend.wait_submitted(3, 1);
        let y = s.spawn(|| {
            as_request("t", "y", || {
                alloc.claim_kv_blocks(&layout, &[5], 0, StreamHandle(4))
            })
        });
        backend.wait_submitted(4, 1);
        backend.hold(3, false);
        let x = x.join().unwrap().unwrap();
        backend.hold(4, false);
        (x, y.join().unwrap().unwrap())
    });
    assert_eq!((x.claimed, x.refused.clone()), (0, vec![5]), "{x:?}");
    // No claim took block 5: x's scrub failed and nobody holds it. y must not be told that
    // another claim took it (KVH_ERR_KV_TAKEN); a block whose last applied verdict failed is
    // reported as refused (KVH_ERR_VERIFY_FAILED).
    assert!(y.taken.is_empty(), "{y:?}");
    assert_eq!(y.claimed as usize + y.refused.len(), 1, "{y:?}");
}

#[test]
fn a_claim_refused_because_its_cache_was_freed_meanwhile_is_logged_as_a_refused_claim() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let f = Fixture::new(config(KvGateMode::Scrub, KvGateScope::Request));
    let (a, layout) = cache(&f);
    let len = (2 * BLOCKS * BLOCK) as i64;
    let done = AtomicBool::new(false);
    // One thread claims block 0 anonymously (always a change of owner: the gate scrubs it);
    // another frees the cache and allocates it again (the pool hands the same bytes back).
    let (mut claims, mut refused) = (0u64, 0u64);
    std::thread::scope(|s| {
        s.spawn(|| {
            while !done.load(Ordering::SeqCst) {
                f.alloc.free(a, len, 0, StreamHandle(1)).unwrap();
                f.alloc.synchronize().unwrap();
                assert_eq!(f.alloc.malloc(len, 0, StreamHandle(1)).unwrap(), a);
            }
        });
        for _ in 0..200_000 {
            claims += 1;
            if claim(&f, &layout, &[0]).is_err() {
                refused += 1;
            }
            // A few refusals that raced the free are enough; a refused scrub is the defect.
            if refused >= 3 || f.alloc.stats().counters.kv_scrubs_refused > 0 {
                break;
            }
        }
        done.store(true, Ordering::SeqCst);
    });
    // Only kvh_claim_blocks was called: every refusal is a refused claim (policy kv_gate,
    // kv_claims_refused), none a refused kvh_scrub_blocks call (policy kv_scrub).
    let scrub_refusals: Vec<String> = f
        .sink
        .snapshot()
        .into_iter()
        .filter_map(|e| match e.kind {
            EventKind::PolicyViolation {
                policy: "kv_scrub",
                detail,
            } => Some(detail),
            _ => None,
        })
        .collect();
    assert!(
        scrub_refusals.is_empty(),
        "{} claims: refused claims logged as refused kvh_scrub_blocks calls: {:?}",
        claims,
        scrub_refusals.first()
    );
    let c = f.alloc.stats().counters;
    assert_eq!((c.kv_scrubs_refused, c.kv_claims_refused), (0, refused));
}

/// A claim whose cache ledger is forgotten while the gate scrubs (as in the test above), and
/// forgotten once more while the gate scrubs the blocks again: no other claim ever named the
/// block. `KvClaimReport::taken` and `KVH_ERR_KV_TAKEN` say another claim took the blocks
/// (two requests were given the same blocks); that must not be what this caller is told.
#[test]
fn a_claim_whose_ledger_is_forgotten_twice_is_not_reported_as_taken() {
    let (alloc, backend, layout) = held_cache();
    // The gate's first scrub, then its second (the claim made again): while each runs, the
    // engine's scrubs of the other caches push the first cache's ledger out.
    let x = x_claims_ws_block_losing_its_ledger(&alloc, &backend, &layout, 2);
    assert!(
        x.taken.is_empty(),
        "no other claim named block 5, yet the claim reports it taken by another claim \
         (KVH_ERR_KV_TAKEN): {x:?}"
    );
}

/// A claim whose cache ledger is forgotten while each of the gate's four scrubs runs (more
/// caches claim than the gate keeps ledgers for) does not hand the block over: the caller is
/// told it was not handed over (with the taken ones), and the one `kv_gate` record says why,
/// the ledger lost at every pass, not that another claim took it.
#[test]
fn a_claim_whose_ledger_is_forgotten_at_every_pass_records_why_once() {
    let sink = kvhygiene::events::MemorySink::new();
    let (alloc, backend, layout) = held_cache_into(Some(sink.clone()));
    let x = x_claims_ws_block_losing_its_ledger(&alloc, &backend, &layout, 4);
    assert_eq!((x.claimed, x.taken.clone()), (0, vec![5]), "{x:?}");
    let records: Vec<String> = kv_gate_records(&sink)
        .into_iter()
        .filter(|d| d.contains("ids 5"))
        .collect();
    assert!(
        records.len() == 1 && records[0].contains("forgotten 4 times"),
        "the kv_gate records naming block 5: {records:#?}"
    );
}

/// A claim that names a block whose last scrub failed verification leaves a `kv_gate`
/// record naming it (include/kvhygiene.h: "Refusals and failed blocks leave a
/// `policy_violation` record"), as it does when the claim succeeds and when its cache was
/// freed meanwhile, also when the gate's scrub of its other blocks fails on the device.
#[test]
fn a_failed_block_named_by_a_claim_whose_gate_scrub_errs_is_recorded() {
    use std::sync::atomic::Ordering;
    let f = Fixture::new(config(KvGateMode::Scrub, KvGateScope::Request));
    let (_, layout) = cache(&f);
    f.backend.inject_fault_next();
    let engine = f
        .alloc
        .scrub_kv_blocks(&layout, &[6], 0, StreamHandle(2))
        .unwrap();
    assert_eq!(engine.failed, vec![6]);
    // Block 2's owner is unknown: the gate scrubs it, and the submission fails.
    f.backend.submit_budget.store(0, Ordering::SeqCst);
    let r = as_request("t1", "a", || claim(&f, &layout, &[2, 6]));
    assert!(
        matches!(r, Err(KvClaimError::Scrub(KvScrubError::Backend { .. }))),
        "{r:?}"
    );
    let v = gate_violations(&f);
    assert!(
        v.iter()
            .any(|d| d.contains("last scrub failed verification") && d.contains("ids 6")),
        "the claim named block 6, which failed its last scrub, and no kv_gate record says so: \
         {v:?}"
    );
}

/// A claim whose gate scrub stops after a batch found blocks not zero names those blocks in
/// its error, as `kvh_scrub_blocks` names them (`KvScrubError::Backend::failed`: "the engine
/// must retire them"), and `kvh_claim_blocks` writes them to its refused list. Two regions of
/// 40,000 blocks are 80,000 segments: two batches, the first of which leaves its last segment
/// unzeroed, the second of which cannot be submitted.
#[test]
fn a_claim_whose_gate_scrub_stops_names_the_blocks_its_first_batch_failed() {
    use std::sync::atomic::Ordering;
    let f = Fixture::new(config(KvGateMode::Scrub, KvGateScope::Request));
    let blocks: u64 = 40_000;
    let len = 2 * blocks * 8;
    let a = f.malloc_zeroed(len as i64, 0, 1);
    f.write(0, a, &secret(len as usize, 0x3c));
    let layout = KvLayout {
        regions: vec![a, a + blocks * 8],
        block_bytes: 8,
        block_stride: 8,
        blocks_per_region: blocks,
    };
    let ids: Vec<u32> = (0..blocks as u32).collect();
    f.backend.inject_fault_next();
    f.backend.submit_budget.store(1, Ordering::SeqCst);
    let r = as_request("t1", "a", || claim(&f, &layout, &ids));
    f.backend.submit_budget.store(-1, Ordering::SeqCst);
    let failed = match r {
        Err(KvClaimError::Scrub(KvScrubError::Backend { failed, .. })) => failed,
        other => panic!("expected the stopped scrub's error, got {other:?}"),
    };
    assert!(
        !failed.is_empty(),
        "the first batch left a segment unzeroed and no block is named"
    );
    for &id in &failed {
        let dirty = layout.regions.iter().any(|&base| {
            f.read(0, base + u64::from(id) * 8, 8)
                .iter()
                .any(|&b| b != 0)
        });
        assert!(dirty, "block {id} is named as failed but reads zero");
    }
    let in_order = failed.windows(2).all(|w| w[0] < w[1]);
    assert!(in_order, "not in the order given: {failed:?}");
}

/// As above, but another request does claim the block while the first claim's second scrub
/// runs, through the ledger kept for the cache after the second loss: the gate hands it to
/// that request. `KvClaimReport::taken` names "blocks not handed over because another claim
/// took them while the gate scrubbed them for this one (two requests were given the same
/// blocks)": the first claim must not also be handed the block, or two requests use it.
#[test]
fn a_claim_whose_ledger_is_forgotten_twice_does_not_get_a_block_another_claim_took_meanwhile() {
    let (alloc, backend, layout) = held_cache();
    let others = ws_block_held_for_x(&alloc, &backend, &layout);
    let (x, y) = std::thread::scope(|s| {
        let x = s.spawn(|| {
            as_request("t", "x", || {
                alloc.claim_kv_blocks(&layout, &[5], 0, StreamHandle(3))
            })
        });
        backend.wait_submitted(3, 1);
        push_out_ledger(&alloc, &others);
        backend.let_through(3, 1);
        backend.wait_submitted(3, 2);
        push_out_ledger(&alloc, &others);
        // While x's second scrub runs: request y claims block 5 through the cache's ledger
        // now (its gate scrub on stream 4 is not held), and is handed it.
        let y = as_request("t", "y", || {
            alloc.claim_kv_blocks(&layout, &[5], 0, StreamHandle(4))
        })
        .unwrap();
        backend.hold(3, false);
        (x.join().unwrap().unwrap(), y)
    });
    assert_eq!(y.claimed, 1, "{y:?}");
    assert!(
        x.claimed == 0 && x.taken == vec![5],
        "block 5 was handed to request y and to request x, both as claimed: x {x:?}, y {y:?}"
    );
}

/// Blocks of a two-batch cache: more segments than one backend batch takes (65,536).
const N2: u64 = 70_000;

/// Under the scrub gate (request scope), a cache of [`N2`] blocks of 64 bytes in one region,
/// and all their ids: a gate scrub of them takes two backend batches.
fn two_batch_cache() -> (Fixture, KvLayout, Vec<u32>) {
    const B: u64 = 64;
    let f = Fixture::new(config(KvGateMode::Scrub, KvGateScope::Request));
    let a = f.malloc_zeroed((N2 * B) as i64, 0, 1);
    let layout = KvLayout {
        regions: vec![a],
        block_bytes: B,
        block_stride: B,
        blocks_per_region: N2,
    };
    let ids: Vec<u32> = (0..N2 as u32).collect();
    (f, layout, ids)
}

/// A claim whose gate scrub stops part way (the driver refuses its second batch) still hands
/// the blocks its first batch verified to the claimant: the ledger names it their owner, and
/// its next claim takes them without a scrub. Each of those blocks changed owner (request w's
/// to request x's) through the gate's scrub, and its `kv_scrub` record says so
/// (`unknown_owner_blocks` 0): `kv_gate_scrubbed_blocks` and `kv_gate_owner_changed_blocks`
/// count every one of them once, so that the owner changes are not lost to the alert.
#[test]
fn blocks_handed_over_by_a_claim_whose_gate_scrub_errs_part_way_are_counted() {
    use std::sync::atomic::Ordering;
    let (f, layout, ids) = two_batch_cache();
    // A new cache: request w's first claim scrubs blocks whose owner was unknown.
    let r = as_request("t", "w", || claim(&f, &layout, &ids)).unwrap();
    assert_eq!((r.claimed, r.unknown_owner.len() as u64), (N2, N2));
    // Request x is given w's blocks unscrubbed; the gate's scrub stops after its first batch.
    f.backend.submit_budget.store(1, Ordering::SeqCst);
    let r = as_request("t", "x", || claim(&f, &layout, &ids));
    assert!(
        matches!(r, Err(KvClaimError::Scrub(KvScrubError::Backend { .. }))),
        "{r:?}"
    );
    f.backend.submit_budget.store(-1, Ordering::SeqCst);
    let gate: Vec<(u64, u64, u64)> = f
        .sink
        .snapshot()
        .into_iter()
        .filter_map(|e| match e.kind {
            EventKind::KvScrubbed(r) if r.trigger == KvScrubTrigger::Gate => {
                Some((r.blocks, r.verified_blocks, r.unknown_owner_blocks))
            }
            _ => None,
        })
        .collect();
    assert_eq!(gate.last(), Some(&(N2, 65_536, 0)), "{gate:?}");
    // x claims again: the blocks the stopped scrub verified are x's already.
    let r = as_request("t", "x", || claim(&f, &layout, &ids)).unwrap();
    assert_eq!(r.claimed, N2);
    let c = f.alloc.stats().counters;
    assert_eq!(
        (c.kv_gate_scrubbed_blocks, c.kv_gate_owner_changed_blocks),
        (2 * N2, N2),
        "every block went from w to x through one gate scrub of a block that changed owner"
    );
}

/// A claim whose cache ledger is forgotten while the gate scrubs, and whose block an
/// anonymous claim (a thread without ids) takes meanwhile through the ledger kept for the cache
/// after the loss: the block is that claim's, and the first claim must report it taken, as it
/// does when a named request took it, rather than scrub it again under the other claim and be
/// handed it too.
#[test]
fn a_claim_whose_ledger_is_forgotten_does_not_get_a_block_an_anonymous_claim_took_meanwhile() {
    let (alloc, backend, layout) = held_cache();
    let others = single_block_caches(&alloc, 64);
    let (x, z) = x_claims_ws_block_while(&alloc, &backend, &layout, || {
        for other in &others {
            alloc
                .scrub_kv_blocks(other, &[0], 0, StreamHandle(9))
                .unwrap();
        }
        // While x's scrub runs, a thread without ids is given block 5 (its gate scrub on
        // stream 4 is not held) and writes its keys and values.
        let z = alloc
            .claim_kv_blocks(&layout, &[5], 0, StreamHandle(4))
            .unwrap();
        held_fill(&*backend, &layout, 5, 0xcd);
        z
    });
    let x = x.unwrap();
    assert_eq!(z.claimed, 1, "{z:?}");
    assert!(
        x.claimed == 0 && x.taken == vec![5],
        "block 5 was handed to the anonymous claim and to request x, both as claimed: \
         x {x:?}, z {z:?}"
    );
}

/// Under `enforce` a refused claim changes nothing: a claim refused through another
/// description of the cache's memory leaves the blocks the engine scrubbed claimable through
/// the cache's own layout without another scrub.
#[test]
fn a_claim_refused_under_enforce_leaves_the_ledger_as_it_was() {
    let f = Fixture::new(config(KvGateMode::Enforce, KvGateScope::Request));
    let (_, fine) = cache(&f);
    let coarse = coarse_view(&fine);
    let all: Vec<u32> = (0..BLOCKS as u32).collect();
    f.alloc
        .scrub_kv_blocks(&fine, &all, 0, StreamHandle(2))
        .unwrap();
    let e = as_request("t1", "x", || claim(&f, &coarse, &[0])).unwrap_err();
    assert!(matches!(e, KvClaimError::Unscrubbed { .. }), "{e:?}");
    // The refused claim handed nothing over and wrote nothing: block 3, verified by the
    // engine's scrub, is still clean for the next request.
    let r = as_request("t1", "y", || claim(&f, &fine, &[3]));
    assert!(
        matches!(&r, Ok(r) if r.claimed == 1),
        "a refused claim changed what the gate knows of the cache: {r:?}"
    );
}

/// Two claims whose calls overlap name the same block, here a block the engine scrubbed,
/// which the first claim is handed at once while its call waits for another block's scrub.
/// The second claim takes it from the first only through a scrub of its own, counted as a
/// change of owner (two requests were given one block): never with the first's bytes.
#[test]
fn a_clean_block_an_overlapping_claim_was_handed_goes_to_another_only_through_a_scrub() {
    let (alloc, backend, layout) = held_cache();
    // Block 6 is request w's; block 5 the engine scrubbed.
    as_request("t", "w", || {
        alloc.claim_kv_blocks(&layout, &[6], 0, StreamHandle(2))
    })
    .unwrap();
    alloc
        .scrub_kv_blocks(&layout, &[5], 0, StreamHandle(2))
        .unwrap();
    let changed_before = alloc.stats().counters.kv_gate_owner_changed_blocks;
    backend.hold(3, true);
    let (x, y) = std::thread::scope(|s| {
        // x is given blocks 5 and 6; its call waits for the gate's scrub of w's block 6.
        let x = s.spawn(|| {
            as_request("t", "x", || {
                alloc.claim_kv_blocks(&layout, &[5, 6], 0, StreamHandle(3))
            })
        });
        backend.wait_submitted(3, 1);
        // Before x's call returns, y is given block 5 too.
        let y = as_request("t", "y", || {
            alloc.claim_kv_blocks(&layout, &[5], 0, StreamHandle(4))
        })
        .unwrap();
        backend.hold(3, false);
        (x.join().unwrap().unwrap(), y)
    });
    assert_eq!((x.claimed, x.gate_scrubbed.clone()), (2, vec![6]), "{x:?}");
    assert_eq!((y.claimed, y.gate_scrubbed.clone()), (1, vec![5]), "{y:?}");
    assert!(y.unknown_owner.is_empty(), "{y:?}");
    assert_eq!(
        alloc.stats().counters.kv_gate_owner_changed_blocks - changed_before,
        2,
        "w's block 6 went to x, x's block 5 to y: two changes of owner"
    );
}

/// Two caches carved from one allocation (a target model's and a draft model's, say) describe
/// disjoint bytes. A block of the first that changes request without the engine's scrub is an
/// owner change (`kv_gate_owner_changed_blocks`, the counter the alert watches), also when
/// the engine claimed blocks of the second cache in between.
#[test]
fn an_owner_change_is_counted_when_another_cache_in_the_same_allocation_is_claimed_between() {
    let f = Fixture::new(config(KvGateMode::Scrub, KvGateScope::Request));
    let half = 2 * BLOCKS * BLOCK;
    let a = f.malloc_zeroed((2 * half) as i64, 0, 1);
    let target = KvLayout {
        regions: vec![a, a + BLOCKS * BLOCK],
        block_bytes: BLOCK,
        block_stride: BLOCK,
        blocks_per_region: BLOCKS,
    };
    let draft = KvLayout {
        regions: vec![a + half, a + half + BLOCKS * BLOCK],
        ..target.clone()
    };
    as_request("t1", "a", || claim(&f, &target, &[1])).unwrap();
    fill_block(&f, &target, 1, 0xa1);
    as_request("t1", "a", || claim(&f, &draft, &[1])).unwrap();
    // The engine gives target block 1 to request b without scrubbing it.
    let r = as_request("t1", "b", || claim(&f, &target, &[1])).unwrap();
    assert_eq!(r.gate_scrubbed, vec![1]);
    assert!(block_is_zero(&f, &target, 1));
    assert_eq!(
        (
            r.unknown_owner.clone(),
            f.alloc.stats().counters.kv_gate_owner_changed_blocks
        ),
        (vec![], 1),
        "block 1 went from request a to request b unscrubbed, yet it is not counted as an \
         owner change: {r:?}"
    );
}

/// Under `enforce` a refused claim changes nothing, the ledgers' order of use included: the
/// ledger the gate forgets next (the least recently used) is the one it would have forgotten
/// had the refused claim not been made, so a cache the engine scrubbed since keeps its
/// verified blocks claimable.
#[test]
fn a_claim_refused_under_enforce_does_not_change_which_ledger_is_forgotten_next() {
    let f = Fixture::new(config(KvGateMode::Enforce, KvGateScope::Request));
    let (_, first) = cache(&f);
    let all: Vec<u32> = (0..BLOCKS as u32).collect();
    f.alloc
        .scrub_kv_blocks(&first, &all, 0, StreamHandle(2))
        .unwrap();
    as_request("t", "x", || claim(&f, &first, &[0])).unwrap();
    // 63 more caches, each scrubbed by the engine: 64 ledgers, the first cache's the least
    // recently used.
    let others = single_block_caches(&f.alloc, 64);
    for other in &others[..63] {
        f.alloc
            .scrub_kv_blocks(other, &[0], 0, StreamHandle(2))
            .unwrap();
    }
    // Refused: block 0 is x's.
    let e = as_request("t", "y", || claim(&f, &first, &[0])).unwrap_err();
    assert!(matches!(e, KvClaimError::Unscrubbed { .. }), "{e:?}");
    // A 65th cache: the least recently used ledger is forgotten, which is the first cache's
    // unless the refused claim counted as a use of it.
    f.alloc
        .scrub_kv_blocks(&others[63], &[0], 0, StreamHandle(2))
        .unwrap();
    let r = as_request("t", "z", || claim(&f, &others[0], &[0]));
    assert!(
        matches!(&r, Ok(r) if r.claimed == 1),
        "the refused claim kept its cache's ledger and the gate forgot the next one instead: {r:?}"
    );
}

/// A `kvh_scrub_blocks` call refused by the backend before it launched anything (a CUDA graph
/// capture on its stream) scrubbed nothing and verified nothing: what the gate knows of the
/// cache stays as it was, so under `enforce` the blocks the engine verified before remain
/// claimable through the cache's own layout.
#[test]
fn a_scrub_that_launched_nothing_leaves_the_gate_ledger_as_it_was() {
    let f = Fixture::new(config(KvGateMode::Enforce, KvGateScope::Request));
    let (_, fine) = cache(&f);
    let coarse = coarse_view(&fine);
    let all: Vec<u32> = (0..BLOCKS as u32).collect();
    f.alloc
        .scrub_kv_blocks(&fine, &all, 0, StreamHandle(2))
        .unwrap();
    f.backend
        .capturing
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let e = f
        .alloc
        .scrub_kv_blocks(&coarse, &[0], 0, StreamHandle(4))
        .unwrap_err();
    f.backend
        .capturing
        .store(false, std::sync::atomic::Ordering::SeqCst);
    assert!(matches!(e, KvScrubError::Backend { .. }), "{e:?}");
    let r = as_request("t1", "y", || claim(&f, &fine, &[3]));
    assert!(
        matches!(&r, Ok(r) if r.claimed == 1),
        "a scrub that launched nothing changed what the gate knows of the cache: {r:?}"
    );
}

/// A backend that answers submissions on one stream as a CUDA graph capture does (refused
/// before anything launched), after a test let them through, and a sink that holds a thread
/// that emits an engine scrub's failed `kv_scrub` record (after the pool lock is dropped,
/// before the verdict reaches the gate's ledger) until the test lets it go.
mod capture_race {
    use std::sync::mpsc::{Receiver, Sender};
    use std::sync::{Arc, Mutex};

    use kvhygiene::backend::host::HostBackend;
    use kvhygiene::backend::{
        Backend, BackendError, BackendKind, DevicePtr, ScrubBatch, ScrubTicket, StreamHandle,
    };
    use kvhygiene::events::{Event, EventKind, EventSink};

    /// Submissions on this stream are refused as a capture refuses them.
    pub const CAPTURING: u64 = 9;

    pub struct Capture {
        pub host: Arc<HostBackend>,
        /// Told when a submission on [`CAPTURING`] has begun (under the pool lock).
        pub entered: Mutex<Option<Sender<()>>>,
        /// Waited on before that submission is refused.
        pub proceed: Mutex<Option<Receiver<()>>>,
    }

    impl Backend for Capture {
        host_methods!();
        unsafe fn submit_scrub(&self, b: ScrubBatch) -> Result<Box<dyn ScrubTicket>, BackendError> {
            if b.stream.0 == CAPTURING {
                if let Some(tx) = self.entered.lock().unwrap().take() {
                    tx.send(()).unwrap();
                }
                if let Some(rx) = self.proceed.lock().unwrap().take() {
                    rx.recv().unwrap();
                }
                return Err(BackendError::StreamCapturing {
                    stream: CAPTURING,
                    what: "a KV scrub",
                });
            }
            // SAFETY: 1-2. this method's own contract, passed on unchanged.
            unsafe { self.host.submit_scrub(b) }
        }
        fn inject_fault(&self, segments: u64) -> Result<(), BackendError> {
            self.host.inject_fault(segments)
        }
    }

    /// Holds the thread that emits the first failed engine `kv_scrub` record.
    #[derive(Default)]
    pub struct HoldFailedScrub {
        pub judged: Mutex<Option<Sender<()>>>,
        pub release: Mutex<Option<Receiver<()>>>,
    }

    impl EventSink for HoldFailedScrub {
        fn emit(&self, event: Event) {
            let EventKind::KvScrubbed(record) = &event.kind else {
                return;
            };
            if record.failed_blocks == 0 {
                return;
            }
            if let Some(tx) = self.judged.lock().unwrap().take() {
                tx.send(()).unwrap();
                if let Some(rx) = self.release.lock().unwrap().take() {
                    rx.recv().unwrap();
                }
            }
        }
    }
}

/// "A block whose last scrub failed is never handed over until a scrub verifies it." An
/// engine scrub that fails verification (residue: the block was written after an earlier
/// scrub verified it) makes the block FAILED, also when the block was CLEAN. When that verdict
/// reaches the gate while a `kvh_scrub_blocks` through another view of the memory holds the
/// cache's ledger displaced (its ledger created, its submission not yet refused by a graph
/// capture), taking the refused scrub's ledger back must not bring back the cache's ledger as
/// it was before the failed verdict: the block must still be refused to the next claimant.
#[test]
fn a_failed_verdict_landing_while_a_refused_scrub_displaced_the_ledger_still_refuses_the_block() {
    use kvhygiene::backend::Backend;
    use std::sync::mpsc::channel;
    use std::sync::Arc;

    let host = HostBackend::new();
    let (entered_tx, entered_rx) = channel();
    let (proceed_tx, proceed_rx) = channel();
    let backend = Arc::new(capture_race::Capture {
        host: host.clone(),
        entered: std::sync::Mutex::new(Some(entered_tx)),
        proceed: std::sync::Mutex::new(Some(proceed_rx)),
    });
    let (judged_tx, judged_rx) = channel();
    let (release_tx, release_rx) = channel();
    let sink = Arc::new(capture_race::HoldFailedScrub {
        judged: std::sync::Mutex::new(Some(judged_tx)),
        release: std::sync::Mutex::new(Some(release_rx)),
    });
    let (alloc, _, fine) = cache_over(backend, Some(sink.clone()));
    let coarse = coarse_view(&fine);
    // Block 5 is request a's, then handed in and verified by the engine: CLEAN.
    as_request("t", "a", || {
        alloc.claim_kv_blocks(&fine, &[5], 0, StreamHandle(2))
    })
    .unwrap();
    alloc
        .scrub_kv_blocks(&fine, &[5], 0, StreamHandle(2))
        .unwrap();
    // Something writes a's keys into it afterwards; the engine's next scrub of it fails.
    for &base in &fine.regions {
        host.write(0, base + 5 * BLOCK, &secret(BLOCK as usize, 0x5a))
            .unwrap();
    }
    host.inject_fault(2).unwrap();
    let engine = std::thread::scope(|s| {
        let failing = s.spawn(|| alloc.scrub_kv_blocks(&fine, &[5], 0, StreamHandle(2)));
        // The failed scrub is judged (pool lock dropped); its verdict is not applied yet.
        judged_rx.recv().unwrap();
        // Another view's scrub creates its ledger (displacing the cache's) and is being
        // submitted on a capturing stream.
        let refused = s.spawn(|| {
            alloc.scrub_kv_blocks(&coarse, &[0], 0, StreamHandle(capture_race::CAPTURING))
        });
        entered_rx.recv().unwrap();
        release_tx.send(()).unwrap();
        let engine = failing.join().unwrap();
        proceed_tx.send(()).unwrap();
        let refused = refused.join().unwrap();
        assert!(
            matches!(refused, Err(KvScrubError::Backend { .. })),
            "{refused:?}"
        );
        engine
    });
    let engine = engine.unwrap();
    assert_eq!(
        engine.failed,
        vec![5],
        "the engine's scrub of block 5 failed"
    );
    let r = as_request("t", "b", || {
        alloc.claim_kv_blocks(&fine, &[5], 0, StreamHandle(2))
    });
    let r = r.unwrap();
    let zero = fine.regions.iter().all(|&base| {
        let mut v = vec![1u8; BLOCK as usize];
        host.read(0, base + 5 * BLOCK, &mut v).unwrap();
        v.iter().all(|&x| x == 0)
    });
    // Refused, or handed over only once a gate scrub verified it.
    assert!(
        r.refused == vec![5] || (r.gate_scrubbed == vec![5] && zero),
        "block 5, whose last scrub failed verification, was handed to request b without a \
         scrub (zero: {zero}, still holding a's bytes): {r:?}"
    );
}

/// ARCHITECTURE.md: an engine scrub "the backend would refuse before launching anything (exit
/// has begun, its stream is capturing a graph) is refused before that, so that it changes no
/// ledger"; only "a capture that begins between that question and the submission still costs
/// the ledger". When the capture query itself fails (a driver error) and the submission is then
/// refused for the capture before anything launched, the call launched nothing and has no
/// verdict: the cache's ledger (another view of the same memory) is kept as it was, and a
/// claim of a block verified through it is still handed over under `enforce`.
#[test]
fn a_scrub_refused_after_a_failed_capture_query_leaves_the_gate_ledger_as_it_was() {
    let f = Fixture::new(config(KvGateMode::Enforce, KvGateScope::Request));
    let (_, fine) = cache(&f);
    let coarse = coarse_view(&fine);
    let all: Vec<u32> = (0..BLOCKS as u32).collect();
    f.alloc
        .scrub_kv_blocks(&fine, &all, 0, StreamHandle(2))
        .unwrap();
    *f.backend.capture_query_error.lock().unwrap() = Some(kvhygiene::backend::BackendError::Other(
        "cuStreamIsCapturing failed".into(),
    ));
    f.backend
        .capturing
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let e = f
        .alloc
        .scrub_kv_blocks(&coarse, &[0], 0, StreamHandle(4))
        .unwrap_err();
    f.backend
        .capturing
        .store(false, std::sync::atomic::Ordering::SeqCst);
    *f.backend.capture_query_error.lock().unwrap() = None;
    assert!(matches!(e, KvScrubError::Backend { .. }), "{e:?}");
    let r = as_request("t1", "y", || claim(&f, &fine, &[3]));
    assert!(
        matches!(&r, Ok(r) if r.claimed == 1),
        "a scrub refused before anything launched (after a failed capture query) changed \
         what the gate knows of the cache: {r:?}"
    );
}

/// The regions of `fine` seen with blocks twice as large: another view of the same memory.
fn coarse_view(fine: &KvLayout) -> KvLayout {
    KvLayout {
        block_bytes: 2 * BLOCK,
        block_stride: 2 * BLOCK,
        blocks_per_region: BLOCKS / 2,
        ..fine.clone()
    }
}

/// `kvh_refuse_blocks`: a refusal the engine decides itself (one block given to two requests
/// in one step) is a `kv_gate` policy violation under the refused request's context, counted
/// with the refused claims; nothing is scrubbed and the ledger is unchanged (the block's owner
/// still reclaims it without a scrub). Bad ids or a bad device record nothing.
#[test]
fn a_refusal_the_engine_makes_is_logged_and_counted_and_changes_nothing() {
    let f = Fixture::new(config(KvGateMode::Scrub, KvGateScope::Request));
    let (_, layout) = cache(&f);
    as_request("t1", "a", || claim(&f, &layout, &[3])).unwrap();
    fill_block(&f, &layout, 3, 0x3a);
    let before = batches(&f);
    as_request("t2", "b", || {
        f.alloc
            .refuse_kv_blocks(&layout, &[3], 0, "given to two requests in one step")
    })
    .unwrap();
    assert_eq!(batches(&f), before, "a refusal scrubbed");
    assert_eq!(f.alloc.stats().counters.kv_claims_refused, 1);
    let violations = gate_violations(&f);
    assert_eq!(violations.len(), 1, "{violations:?}");
    assert!(
        violations[0].contains("refused 1 KV blocks") && violations[0].contains("(ids 3)"),
        "{violations:?}"
    );
    assert!(violations[0].ends_with("given to two requests in one step"));
    let event = f.sink.snapshot().pop().unwrap();
    assert_eq!(event.context.request_id(), Some("b"));
    // The ledger still names a: its claim hands the block back without a scrub.
    let r = as_request("t1", "a", || claim(&f, &layout, &[3])).unwrap();
    assert!(r.gate_scrubbed.is_empty(), "{r:?}");
    assert!(!block_is_zero(&f, &layout, 3));

    assert!(matches!(
        f.alloc.refuse_kv_blocks(&layout, &[3, 3], 0, "x"),
        Err(KvScrubError::InvalidBlocks(_))
    ));
    assert!(matches!(
        f.alloc.refuse_kv_blocks(&layout, &[3], 99, "x"),
        Err(KvScrubError::InvalidDevice { device: 99, .. })
    ));
    assert_eq!(f.alloc.stats().counters.kv_claims_refused, 1);
    assert_eq!(gate_violations(&f).len(), 1);
}

/// An engine scrub that found no memory for its batch slot is tried again while it waits for
/// one. A claim made while it waits (the block handed to another request, which writes it)
/// changes the block's owner after the engine's call began: the engine scrub's verdict is for
/// the block as it was when the call was made, so, as for any verdict that lands after its
/// block changed hands, it does not make the new owner's block CLEAN. A later claim by a
/// third request then scrubs what the second one wrote before handing the block over.
#[test]
fn an_engine_scrub_tried_again_after_a_full_device_does_not_clean_a_block_claimed_meanwhile() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::mpsc::channel;
    use std::sync::{Arc, Mutex};
    let f = Fixture::new(config(KvGateMode::Scrub, KvGateScope::Request));
    let (_, layout) = cache(&f);
    // Request a holds block 3 and writes it.
    as_request("t", "a", || claim(&f, &layout, &[3])).unwrap();
    fill_block(&f, &layout, 3, 0xa1);
    // A batch of the pool holds the device's slot: a freed block's re-scrub, held in flight.
    let victim = f.malloc_zeroed(4096, 0, 1);
    f.backend.set_rescrub_gate(false);
    f.backend.inject_fault_next();
    let _ = f.alloc.free_checked(victim, 4096, 0, StreamHandle(1));
    // The engine's scrub of block 3 (a finished) finds no memory for a batch slot at its
    // first try, and waits for the pool's batches.
    let once = Arc::new(AtomicBool::new(false));
    let (tx, rx) = channel();
    let tx = Mutex::new(tx);
    *f.backend.refuse.lock().unwrap() = Some(Box::new(move |b| {
        (b.stream == StreamHandle(6) && !once.swap(true, Ordering::SeqCst)).then(|| {
            let _ = tx.lock().unwrap().send(());
            kvhygiene::backend::BackendError::OutOfMemory {
                device: 0,
                requested: 0,
            }
        })
    }));
    let engine = std::thread::scope(|s| {
        let engine = s.spawn(|| f.alloc.scrub_kv_blocks(&layout, &[3], 0, StreamHandle(6)));
        rx.recv().unwrap();
        // Meanwhile block 3 goes to request b, whose claim scrubs it (a was its owner).
        let r = as_request("t", "b", || claim(&f, &layout, &[3])).unwrap();
        assert_eq!(r.gate_scrubbed, vec![3], "precondition: b's claim scrubbed");
        f.backend.set_rescrub_gate(true);
        engine.join().unwrap()
    });
    *f.backend.refuse.lock().unwrap() = None;
    assert!(
        engine.is_ok(),
        "precondition: the engine scrub ran: {engine:?}"
    );
    // Request b writes its keys and values into block 3.
    fill_block(&f, &layout, 3, 0xb2);
    // Block 3 goes to request c.
    let r = as_request("t", "c", || claim(&f, &layout, &[3])).unwrap();
    assert!(
        r.gate_scrubbed == vec![3] && block_is_zero(&f, &layout, 3),
        "block 3, claimed by request b while the engine's scrub of it waited for a batch \
         slot, was handed to request c without a scrub (gate_scrubbed {:?}, block reads \
         zero: {}): the engine scrub's verdict, applied after b's claim, made b's block CLEAN",
        r.gate_scrubbed,
        block_is_zero(&f, &layout, 3)
    );
}

/// An engine scrub whose first submission found no batch slot is tried again, each try asking
/// first (as its first attempt did) whether the backend would refuse it before launching
/// anything. When the capture query stops answering meanwhile (here for lack of memory; a
/// CUDA submission asks it first and fails with its error), the call is refused at once, as
/// it is with the gate off: it does not keep trying for seconds.
#[test]
fn an_engine_scrub_tried_again_is_refused_at_once_when_its_capture_query_stops_answering() {
    use kvhygiene::backend::BackendError;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc::channel;
    use std::sync::Mutex;
    use std::time::{Duration, Instant};
    let oom = || BackendError::OutOfMemory {
        device: 0,
        requested: 0,
    };
    let mut took = Vec::new();
    for mode in [KvGateMode::Off, KvGateMode::Scrub] {
        let f = Fixture::new(config(mode, KvGateScope::Request));
        let (_, layout) = cache(&f);
        // Another KV call (stream 7) holds a slot: its batch stays in flight.
        f.backend.set_gate(false);
        let (tx, rx) = channel();
        let tx = Mutex::new(tx);
        let backend = f.backend.clone();
        let tries = AtomicUsize::new(0);
        *f.backend.refuse.lock().unwrap() = Some(Box::new(move |b| {
            if b.stream == StreamHandle(7) {
                tx.lock().unwrap().send(()).unwrap();
                return None;
            }
            if b.stream != StreamHandle(6) {
                return None;
            }
            if tries.fetch_add(1, Ordering::SeqCst) == 0 {
                // No slot; from now on the capture query runs out of memory.
                *backend.capture_query_error.lock().unwrap() = Some(oom());
                return Some(oom());
            }
            // A submission asks the capture query first.
            backend.capture_query_error.lock().unwrap().clone()
        }));
        let (got, elapsed) = std::thread::scope(|s| {
            let other = s.spawn(|| f.alloc.scrub_kv_blocks(&layout, &[1], 0, StreamHandle(7)));
            rx.recv().unwrap();
            let started = Instant::now();
            let got = f.alloc.scrub_kv_blocks(&layout, &[0], 0, StreamHandle(6));
            let elapsed = started.elapsed();
            f.backend.set_gate(true);
            let _ = other.join().unwrap();
            (got, elapsed)
        });
        *f.backend.refuse.lock().unwrap() = None;
        *f.backend.capture_query_error.lock().unwrap() = None;
        assert!(
            matches!(
                got,
                Err(KvScrubError::Backend {
                    error: BackendError::OutOfMemory { .. },
                    ..
                })
            ),
            "precondition ({mode:?}): {got:?}"
        );
        took.push((mode, elapsed));
    }
    assert!(
        took.iter().all(|(_, t)| *t < Duration::from_millis(1000)),
        "an engine scrub tried again after its capture query stopped answering kept trying \
         instead of being refused at once: {took:?}"
    );
}

/// `kvh_claim_blocks` (include/kvhygiene.h): "Refusals and failed blocks leave a
/// `policy_violation` record (policy `kv_gate`)", and `KVH_ERR_VERIFY_FAILED` covers a block
/// whose scrub failed "now, before, or another scrub's". A block whose gate scrub fails
/// verification inside the claim is such a failed block: the claim is expected to leave a
/// `kv_gate` policy violation naming it, as it does for a block that failed before the claim.
#[test]
fn a_block_whose_gate_scrub_fails_inside_the_claim_leaves_a_kv_gate_record() {
    let f = Fixture::new(config(KvGateMode::Scrub, KvGateScope::Request));
    let (_, layout) = cache(&f);
    f.backend.inject_fault_next();
    let r = as_request("t1", "a", || claim(&f, &layout, &[4, 5])).unwrap();
    assert_eq!(
        (r.refused.clone(), r.gate_scrubbed.clone()),
        (vec![4], vec![5]),
        "precondition: {r:?}"
    );
    let v = gate_violations(&f);
    assert!(
        v.iter().any(|d| d.contains("ids 4")),
        "a claim that did not hand over block 4 (its gate scrub failed verification) left no \
         kv_gate policy_violation naming it: {v:?}"
    );
}

/// `kvh_refuse_blocks` records "that the engine refused to give blocks ... to the calling
/// thread's request" and counts "a refused claim". A call that names no block refuses nothing:
/// as `kvh_claim_blocks` and `kvh_scrub_blocks` with no ids, it is expected to change no
/// counter and leave no `policy_violation` record (which `kvh gate` and the claims-refused
/// alert read as a refusal the engine made).
#[test]
fn a_refusal_that_names_no_block_is_not_counted_as_a_refused_claim() {
    let f = Fixture::new(config(KvGateMode::Scrub, KvGateScope::Request));
    let (_, layout) = cache(&f);
    as_request("t1", "a", || {
        f.alloc
            .refuse_kv_blocks(&layout, &[], 0, "given to two requests in one step")
    })
    .unwrap();
    let refused = f.alloc.stats().counters.kv_claims_refused;
    let v = gate_violations(&f);
    assert!(
        refused == 0 && v.is_empty(),
        "a refusal of zero blocks was counted as a refused claim (kv_claims_refused = \
         {refused}) and logged: {v:?}"
    );
}

/// `kvh_claim_blocks` (include/kvhygiene.h): "Refusals and failed blocks leave a
/// `policy_violation` record (policy `kv_gate`)". A claim whose gate scrub stops part way (the
/// driver refuses its second batch) after its first batch found a block that failed
/// verification did not hand that block over: the claim is expected to leave a `kv_gate`
/// record naming the gate's failed scrub, as a claim whose scrub finished does.
#[test]
fn a_block_whose_gate_scrub_fails_in_a_claim_that_errs_part_way_leaves_a_kv_gate_record() {
    use std::sync::atomic::Ordering;
    let (f, layout, ids) = two_batch_cache();
    as_request("t", "w", || claim(&f, &layout, &ids)).unwrap();
    // Request x is given w's blocks: the first batch of the gate's scrub fails verification
    // of one block, the second batch is refused by the driver.
    f.backend.inject_fault_next();
    f.backend.submit_budget.store(1, Ordering::SeqCst);
    let r = as_request("t", "x", || claim(&f, &layout, &ids));
    f.backend.submit_budget.store(-1, Ordering::SeqCst);
    assert!(
        matches!(r, Err(KvClaimError::Scrub(KvScrubError::Backend { .. }))),
        "{r:?}"
    );
    let failed = last_gate_scrub_failed_blocks(&f);
    assert!(
        failed > 0,
        "precondition: the gate's scrub failed verification of a block"
    );
    let v = gate_violations(&f);
    assert!(
        v.iter()
            .any(|d| d.contains("failed verification while the gate scrubbed them")),
        "a block whose gate scrub failed verification inside the claim (the claim then erred) \
         left no kv_gate policy_violation naming it: {v:?}"
    );
}

/// include/kvhygiene.h, `kvh_claim_blocks`: "`KVH_ERR_NOT_LIVE` also when the cache was freed
/// while the claim ran: nothing may be taken as handed over". The cache is freed while the
/// gate's scrub for request x runs, and its memory is handed out again (same address) to
/// another caller, who writes its own bytes there. The claim must not report block 5 as
/// handed to x: the bytes at that address are now the new allocation's.
#[test]
fn a_claim_whose_cache_is_freed_and_handed_out_again_while_the_gate_scrubs_is_not_live() {
    let (alloc, backend, layout) = held_cache();
    let a = layout.regions[0];
    let len = (2 * BLOCKS * BLOCK) as i64;
    let (x, ()) = x_claims_ws_block_while(&alloc, &backend, &layout, || {
        // While the gate's scrub runs, the engine frees the cache; the pool scrubs it and
        // hands the same bytes to another caller, who writes its secret.
        alloc.free(a, len, 0, StreamHandle(1)).unwrap();
        alloc.synchronize().unwrap();
        let b = alloc.malloc(len, 0, StreamHandle(1)).unwrap();
        assert_eq!(
            b, a,
            "precondition: the pool handed the same bytes out again"
        );
        held_fill(&*backend, &layout, 5, 0xee);
    });
    assert!(
        matches!(x, Err(KvClaimError::Scrub(KvScrubError::NotLive { .. }))),
        "the cache was freed (and its memory handed to another caller) while the claim ran, \
         yet the claim reports block 5 handed to request x: {x:?}"
    );
}

/// `kvh_claim_blocks` (include/kvhygiene.h): "Refusals and failed blocks leave a
/// `policy_violation` record (policy `kv_gate`)"; `report_failed_now` is "also called by a
/// gate scrub that then failed as a whole, whose claim hands nothing over". A claim whose gate
/// scrub finds a block that fails verification, and whose cache is freed while that scrub
/// runs, fails `KVH_ERR_NOT_LIVE`: the block the gate's scrub failed is expected to be named
/// by a `kv_gate` record, as it is when the claim's scrub errs on the device instead.
#[test]
fn a_block_whose_gate_scrub_fails_in_a_claim_refused_as_not_live_leaves_a_kv_gate_record() {
    use std::sync::mpsc::channel;
    let f = Fixture::new(config(KvGateMode::Scrub, KvGateScope::Request));
    let (a, layout) = cache(&f);
    let len = (2 * BLOCKS * BLOCK) as i64;
    // Block 4's owner is unknown: the gate scrubs it, and its scrub fails verification.
    f.backend.inject_fault_next();
    f.backend.set_gate(false);
    let (submitted_tx, submitted_rx) = channel();
    *f.backend.after_next_submit.lock().unwrap() = Some(Box::new(move || {
        submitted_tx.send(()).unwrap();
    }));
    let r = std::thread::scope(|s| {
        let x = s.spawn(|| as_request("t1", "x", || claim(&f, &layout, &[4])));
        submitted_rx.recv().unwrap();
        // While the gate's scrub runs, the engine frees the cache.
        f.alloc.free(a, len, 0, StreamHandle(1)).unwrap();
        f.backend.set_gate(true);
        x.join().unwrap()
    });
    assert!(
        matches!(r, Err(KvClaimError::Scrub(KvScrubError::NotLive { .. }))),
        "precondition: {r:?}"
    );
    let failed = last_gate_scrub_failed_blocks(&f);
    assert_eq!(failed, 1, "precondition: the gate's scrub failed block 4");
    let v = gate_violations(&f);
    assert!(
        v.iter().any(
            |d| d.contains("failed verification while the gate scrubbed them")
                && d.contains("ids 4")
        ),
        "block 4 failed verification in the gate's scrub (the claim then failed NOT_LIVE), \
         and no kv_gate policy_violation names it: {v:?}"
    );
}

/// A host backend that runs scrubs the way a device runs them: in stream order, and no
/// sooner than something needs them. A batch runs when its ticket is polled or waited for,
/// after every earlier batch of its stream and of the streams it was told to wait for (run
/// first, in submission order); a batch on a held stream does not run until the stream is
/// released. Nothing orders a batch after host writes or after other streams, as on a GPU:
/// a scrub submitted before a write may zero it when it runs after it.
mod lazy {
    use crate::gates::{self, Gates, WithGates};
    use std::sync::{Arc, Condvar, Mutex, MutexGuard};

    use kvhygiene::backend::host::HostBackend;
    use kvhygiene::backend::verify::SegmentResult;
    use kvhygiene::backend::{
        Backend, BackendError, BackendKind, DevicePtr, ScrubBatch, ScrubTicket, StreamHandle,
    };

    struct Pending {
        stream: u64,
        waits: Vec<u64>,
        batch: Option<ScrubBatch>,
        result: Option<Result<Vec<SegmentResult>, BackendError>>,
    }

    #[derive(Default)]
    struct State {
        batches: Vec<Pending>,
        gates: Gates,
    }

    impl WithGates for State {
        fn gates(&mut self) -> &mut Gates {
            &mut self.gates
        }
    }

    impl State {
        /// The batches `i` runs after that have not run yet, `i` included, in submission order.
        fn closure(&self, i: usize) -> Vec<usize> {
            let mut need = vec![false; i + 1];
            need[i] = true;
            for k in (0..=i).rev() {
                if !need[k] {
                    continue;
                }
                let (stream, waits) = (self.batches[k].stream, &self.batches[k].waits);
                for (j, p) in self.batches[..k].iter().enumerate() {
                    if p.result.is_none() && (p.stream == stream || waits.contains(&p.stream)) {
                        need[j] = true;
                    }
                }
            }
            (0..=i)
                .filter(|&k| need[k] && self.batches[k].result.is_none())
                .collect()
        }
    }

    pub struct Lazy {
        pub host: Arc<HostBackend>,
        state: Arc<(Mutex<State>, Condvar)>,
    }

    impl Lazy {
        pub fn new() -> Arc<Self> {
            Arc::new(Lazy {
                host: HostBackend::new(),
                state: Arc::default(),
            })
        }

        /// Batches on `stream` do not run (`true`) or may run (`false`).
        pub fn hold(&self, stream: u64, held: bool) {
            gates::hold(&self.state, stream, held);
        }

        /// Waits until `n` batches were submitted on `stream`.
        pub fn wait_submitted(&self, stream: u64, n: usize) {
            gates::wait_submitted(&self.state, stream, n);
        }

        /// How many batches were submitted on `stream`.
        pub fn submitted(&self, stream: u64) -> usize {
            gates::count(&self.state, stream)
        }

        /// Whether every batch submitted on `stream` has run.
        pub fn ran_all(&self, stream: u64) -> bool {
            let s = self.state.0.lock().unwrap();
            s.batches
                .iter()
                .all(|p| p.stream != stream || p.result.is_some())
        }
    }

    struct Ticket {
        host: Arc<HostBackend>,
        state: Arc<(Mutex<State>, Condvar)>,
        index: usize,
    }

    impl Ticket {
        /// Runs batch `k` (its stream is not held) on the host and keeps its result.
        fn run_one(&self, s: &mut MutexGuard<'_, State>, k: usize) {
            let batch = s.batches[k].batch.take().expect("a batch runs once");
            // SAFETY: the contract `submit_scrub` was called under, which holds until the
            // ticket completes: the ticket has not completed.
            let result = unsafe { self.host.submit_scrub(batch) }.and_then(|mut t| t.wait());
            s.batches[k].result = Some(result);
            self.state.1.notify_all();
        }

        /// Runs this batch and what it is ordered after; `None` when `block` is false and a
        /// batch it needs is held.
        fn run(&self, block: bool) -> Option<Result<Vec<SegmentResult>, BackendError>> {
            let mut s = self.state.0.lock().unwrap();
            loop {
                let todo = s.closure(self.index);
                let Some(&k) = todo.first() else {
                    return s.batches[self.index].result.clone();
                };
                if s.gates.held.contains(&s.batches[k].stream) {
                    if !block {
                        return None;
                    }
                    s = self.state.1.wait(s).unwrap();
                    continue;
                }
                self.run_one(&mut s, k);
            }
        }
    }

    impl ScrubTicket for Ticket {
        fn poll(&mut self) -> Result<Option<Vec<SegmentResult>>, BackendError> {
            self.run(false).transpose()
        }

        fn wait(&mut self) -> Result<Vec<SegmentResult>, BackendError> {
            self.run(true).expect("a waited batch runs")
        }
    }

    impl Backend for Lazy {
        host_methods!();
        unsafe fn submit_scrub(&self, b: ScrubBatch) -> Result<Box<dyn ScrubTicket>, BackendError> {
            let mut s = self.state.0.lock().unwrap();
            let stream = b.stream.0;
            s.batches.push(Pending {
                stream,
                waits: b.wait_streams.iter().map(|w| w.0).collect(),
                batch: Some(b),
                result: None,
            });
            let index = s.batches.len() - 1;
            gates::submitted(&mut *s, &self.state, stream);
            Ok(Box::new(Ticket {
                host: self.host.clone(),
                state: self.state.clone(),
                index,
            }))
        }
    }
}

/// An allocator over a [`lazy::Lazy`] backend, with a cache of `BLOCKS` blocks.
fn lazy_cache() -> (
    kvhygiene::alloc::Allocator,
    std::sync::Arc<lazy::Lazy>,
    KvLayout,
) {
    cache_over(lazy::Lazy::new(), None)
}

fn lazy_holds(b: &lazy::Lazy, layout: &KvLayout, id: u64, tag: u8) -> bool {
    use kvhygiene::backend::Backend;
    layout.regions.iter().all(|&base| {
        let mut v = vec![0u8; BLOCK as usize];
        b.read(0, base + id * BLOCK, &mut v).unwrap();
        v == secret(BLOCK as usize, tag)
    })
}

/// What request c's claim of block 5 did, made while a scrub of the block on `held_stream`
/// (held) has not run: its report, and whether that scrub had run when the claim returned.
/// c writes its keys and values once the claim hands the block over; the held stream is
/// released on return. A claim that waits for the held scrub's device work (directly, or
/// through work of its own ordered after it) gets it: the stream is released once the claim
/// submitted work of its own, or when it has not returned within 10 s (a hang guard, not what
/// the test decides on).
fn c_claims_block_5_while_held(
    alloc: &kvhygiene::alloc::Allocator,
    backend: &lazy::Lazy,
    layout: &KvLayout,
    held_stream: u64,
) -> (KvClaimReport, bool) {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::scope(|s| {
        s.spawn(move || {
            let r = as_request("t", "c", || {
                alloc.claim_kv_blocks(layout, &[5], 0, StreamHandle(4))
            })
            .unwrap();
            let ran = backend.ran_all(held_stream);
            if r.claimed == 1 {
                held_fill(backend, layout, 5, 0xc5); // c's keys and values
            }
            let _ = tx.send((r, ran));
        });
        // Released once the claim submitted device work of its own (which waits for the held
        // scrub's), or by the hang guard.
        let guard = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let got = loop {
            match rx.recv_timeout(std::time::Duration::from_millis(10)) {
                Ok(got) => break got,
                Err(_) if backend.submitted(4) > 0 || std::time::Instant::now() >= guard => {
                    backend.hold(held_stream, false);
                    break rx.recv().unwrap();
                }
                Err(_) => {}
            }
        };
        backend.hold(held_stream, false);
        got
    })
}

/// Request w owns block 5 and wrote it. The engine scrubs it (w finished) on stream 7, and
/// while that scrub is in flight request b claims the block: the ledger still names w, so the
/// gate scrubs it for b on stream 3, ordered after the engine's scrub. The engine's verdict
/// lands first (the block's generation did not change), b's scrub has not run yet. Expected: a
/// claim of block 5 by request c does not take it while b's scrub may still write it (it waits
/// for that scrub, or reports the block taken), so c's keys and values are never zeroed by b's
/// late scrub.
#[test]
fn a_claim_does_not_get_a_block_a_gate_scrub_begun_for_another_claim_may_still_write() {
    let (alloc, backend, layout) = lazy_cache();
    block_5_written_by(&alloc, &*backend, &layout, "t");
    backend.hold(7, true);
    backend.hold(3, true);
    let (r, ran, survived, b) = std::thread::scope(|s| {
        let engine = s.spawn(|| alloc.scrub_kv_blocks(&layout, &[5], 0, StreamHandle(7)));
        backend.wait_submitted(7, 1);
        let b = s.spawn(|| {
            as_request("t", "b", || {
                alloc.claim_kv_blocks(&layout, &[5], 0, StreamHandle(3))
            })
        });
        backend.wait_submitted(3, 1);
        backend.hold(7, false);
        let engine = engine.join().unwrap().unwrap();
        assert!(engine.failed.is_empty(), "precondition: {engine:?}");
        assert!(
            !backend.ran_all(3),
            "precondition: b's gate scrub has not run"
        );
        let (r, ran) = c_claims_block_5_while_held(&alloc, &backend, &layout, 3);
        // b's claim returns once its scrub ran.
        let b = b.join().unwrap();
        let survived = r.claimed == 0 || lazy_holds(&backend, &layout, 5, 0xc5);
        (r, ran, survived, b)
    });
    assert!(
        survived,
        "request c's keys and values in block 5 were zeroed by the gate scrub begun for \
         request b's claim, which ran after c's claim handed the block over (c: {r:?}, b: {b:?})"
    );
    assert!(
        r.claimed == 0 || ran,
        "request c's claim handed over block 5 while the gate scrub begun for request b's \
         claim could still write it (the engine's verdict had made it CLEAN): {r:?}"
    );
}

/// c and b were given block 5 (w's, not scrubbed) at once: c's claim submits its gate scrub
/// (stream 4) before b's (stream 3, ordered after c's), and c's scrub verifies first. Each
/// claims as `who` names it (`None`: a thread without ids, an anonymous claimant). Returns
/// both reports, and whether the keys and values c wrote once its claim returned with the
/// block survived b's scrub (true when c did not get it).
fn two_claims_race(
    who: fn(&str) -> Option<(&'static str, &'static str)>,
) -> (KvClaimReport, KvClaimReport, bool) {
    let (alloc, backend, layout) = lazy_cache();
    block_5_written_by(&alloc, &*backend, &layout, "t");
    backend.hold(4, true);
    backend.hold(3, true);
    let claim = |name: &str, stream: u64| {
        let run = || alloc.claim_kv_blocks(&layout, &[5], 0, StreamHandle(stream));
        match who(name) {
            Some((tenant, request)) => as_request(tenant, request, run),
            // Spawned threads run with no context.
            None => run(),
        }
    };
    std::thread::scope(|s| {
        let c = s.spawn(|| claim("c", 4).unwrap());
        backend.wait_submitted(4, 1);
        let b = s.spawn(|| claim("b", 3));
        backend.wait_submitted(3, 1);
        backend.hold(4, false);
        let c = c.join().unwrap();
        if c.claimed == 1 {
            held_fill(&*backend, &layout, 5, 0xc5); // c's keys and values
        }
        backend.hold(3, false);
        let b = b.join().unwrap().unwrap();
        let survived = c.claimed == 0 || lazy_holds(&backend, &layout, 5, 0xc5);
        (c, b, survived)
    })
}

/// Two requests were given block 5 at once ([`two_claims_race`]). Expected: exactly one of
/// them gets the block, and the keys and values the winner writes once its claim returned are
/// not zeroed by the other's scrub (here c's are never written over by b's, which may still
/// run when c's verdict lands: the block goes to b).
#[test]
fn a_gate_scrub_for_a_claim_that_lost_the_block_does_not_zero_the_winners_data() {
    let (c, b, survived) = two_claims_race(|name| match name {
        "c" => Some(("t", "c")),
        _ => Some(("t", "b")),
    });
    assert_eq!(
        c.claimed + b.claimed,
        1,
        "not exactly one claim got block 5 (c: {c:?}, b: {b:?})"
    );
    assert!(
        survived,
        "request c's keys and values in block 5 were zeroed by the gate scrub of b's claim, \
         which lost the block to c (c: {c:?}, b: {b:?})"
    );
}

/// As [`a_gate_scrub_for_a_claim_that_lost_the_block_does_not_zero_the_winners_data`], for
/// two threads without request ids (anonymous claimants, who match nobody, each other
/// included).
#[test]
fn a_gate_scrub_for_an_anonymous_claim_that_lost_the_block_does_not_zero_the_winners_data() {
    let (c, b, survived) = two_claims_race(|_| None);
    assert!(
        survived,
        "anonymous claimant c's keys and values in block 5 were zeroed by the gate scrub of \
         anonymous claimant b's claim, submitted after c's (c: {c:?}, b: {b:?})"
    );
}

/// Request x claims w's block 5 (gate scrub on stream 3); while it is in flight the engine
/// scrubs block 5 (stream 7, ordered after x's). No other claim is made. Expected: x's claim
/// does not report the block as taken by another claim, and no `kv_gate` record says another
/// claim took it.
#[test]
fn a_claim_overtaken_by_an_engine_scrub_is_not_reported_as_taken_by_another_claim() {
    let sink = kvhygiene::events::MemorySink::new();
    let (alloc, backend, layout) = cache_over(lazy::Lazy::new(), Some(sink.clone()));
    block_5_written_by(&alloc, &*backend, &layout, "t");
    backend.hold(3, true);
    backend.hold(7, true);
    let x = std::thread::scope(|s| {
        let x = s.spawn(|| {
            as_request("t", "x", || {
                alloc.claim_kv_blocks(&layout, &[5], 0, StreamHandle(3))
            })
            .unwrap()
        });
        backend.wait_submitted(3, 1);
        let engine = s.spawn(|| alloc.scrub_kv_blocks(&layout, &[5], 0, StreamHandle(7)));
        backend.wait_submitted(7, 1);
        backend.hold(3, false);
        let x = x.join().unwrap();
        backend.hold(7, false);
        let engine = engine.join().unwrap().unwrap();
        assert!(engine.failed.is_empty(), "precondition: {engine:?}");
        x
    });
    let said_taken: Vec<String> = kv_gate_records(&sink)
        .into_iter()
        .filter(|d| d.contains("another claim took them"))
        .collect();
    assert!(
        x.taken.is_empty() && said_taken.is_empty(),
        "x's claim was the only claim of block 5, yet block 5 was reported taken by another \
         claim (x: {x:?}, records: {said_taken:?})"
    );
}

/// Request w's block 5 was scrubbed by the engine and verified (CLEAN); the engine scrubs it
/// once more (stream 7, held) and, while that scrub is in flight, request c claims it. The
/// block's last owner's bytes were scrubbed and verified. Expected: the claim is not counted
/// as a change of owner without a verified scrub (`kv_gate_owner_changed_blocks`).
#[test]
fn a_clean_block_claimed_while_an_engine_scrub_is_in_flight_is_not_counted_as_an_owner_change() {
    let (alloc, backend, layout) = lazy_cache();
    block_5_written_by(&alloc, &*backend, &layout, "t");
    let first = alloc
        .scrub_kv_blocks(&layout, &[5], 0, StreamHandle(2))
        .unwrap();
    assert!(first.failed.is_empty(), "precondition: {first:?}");
    let before = alloc.stats().counters.kv_gate_owner_changed_blocks;
    backend.hold(7, true);
    let (r, _) = std::thread::scope(|s| {
        let engine = s.spawn(|| alloc.scrub_kv_blocks(&layout, &[5], 0, StreamHandle(7)));
        backend.wait_submitted(7, 1);
        let got = c_claims_block_5_while_held(&alloc, &backend, &layout, 7);
        assert!(engine.join().unwrap().unwrap().failed.is_empty());
        got
    });
    let changed = alloc.stats().counters.kv_gate_owner_changed_blocks - before;
    assert_eq!(
        changed, 0,
        "claiming block 5, CLEAN after the engine's verified scrub, counted {changed} owner \
         change(s) without a verified scrub (c: {r:?})"
    );
    // The report says the same: block 5 was scrubbed because a scrub was in flight.
    assert_eq!(
        (
            r.gate_scrubbed.clone(),
            r.in_flight.clone(),
            r.unknown_owner.len()
        ),
        (vec![5], vec![5], 0),
        "{r:?}"
    );
}

/// The gate `kv_scrub` records `sink` received, in order.
fn gate_scrub_records(
    sink: &kvhygiene::events::MemorySink,
) -> Vec<kvhygiene::events::KvScrubRecord> {
    sink.snapshot()
        .into_iter()
        .filter_map(|e| match e.kind {
            EventKind::KvScrubbed(r) if r.trigger == KvScrubTrigger::Gate => Some(*r),
            _ => None,
        })
        .collect()
}

/// The blocks a claim report says changed owner without a verified scrub.
fn reported_owner_changes(r: &KvClaimReport) -> u64 {
    r.gate_scrubbed
        .iter()
        .filter(|id| !r.unknown_owner.contains(id) && !r.in_flight.contains(id))
        .count() as u64
}

/// Block 5 is w's and written. x claims it; while x's gate scrub runs, the cache's ledger is
/// forgotten and request y is handed block 5 through the ledger that replaces it (unknown
/// there: y's scrub counts no change of owner). x's next pass finds block 5 y's: taken, not
/// handed to x. Block 5 changed owner once (w to y); the claim that took it is y's, and no
/// report says a change of owner happened. `kv_gate_owner_changed_blocks` ("a block two
/// racing claims scrubbed counts once, for the claim that took it") and x's `kv_scrub`
/// record (`owner_changed_blocks`: "nor those another claim took") agree with the reports.
#[test]
fn a_block_another_claim_took_after_the_ledger_was_forgotten_is_not_counted_for_the_loser() {
    let sink = kvhygiene::events::MemorySink::new();
    let (alloc, backend, layout) = held_cache_into(Some(sink.clone()));
    let others = ws_block_held_for_x(&alloc, &backend, &layout);
    let before = alloc.stats().counters.kv_gate_owner_changed_blocks;
    let (x, y) = std::thread::scope(|s| {
        let x = s.spawn(|| {
            as_request("t", "x", || {
                alloc.claim_kv_blocks(&layout, &[5], 0, StreamHandle(3))
            })
        });
        backend.wait_submitted(3, 1);
        push_out_ledger(&alloc, &others);
        let y = as_request("t", "y", || {
            alloc.claim_kv_blocks(&layout, &[5], 0, StreamHandle(4))
        })
        .unwrap();
        held_fill(&*backend, &layout, 5, 0xcd);
        backend.hold(3, false);
        (x.join().unwrap().unwrap(), y)
    });
    assert_eq!((y.claimed, x.claimed, x.taken.clone()), (1, 0, vec![5]));
    let reported = reported_owner_changes(&x) + reported_owner_changes(&y);
    let changed = alloc.stats().counters.kv_gate_owner_changed_blocks - before;
    let x_records: u64 = gate_scrub_records(&sink)
        .iter()
        .filter(|r| r.stream == 3)
        .map(|r| r.owner_changed_blocks)
        .sum();
    assert_eq!(
        (changed, x_records),
        (reported, 0),
        "kv_gate_owner_changed_blocks grew by {changed} and x's kv_scrub records say {x_records} \
         of its blocks changed owner, but x was not handed block 5 (x {x:?}, y {y:?})"
    );
}

/// As in `a_claim_whose_ledger_is_forgotten_at_every_pass_records_why_once`: x's claim of
/// w's block 5 loses its ledger at every pass and hands nothing over. No block changed owner
/// through x's claim, so `kv_gate_owner_changed_blocks` (what the report's `gate_scrubbed`
/// less `unknown_owner` and `in_flight` counts) does not grow.
#[test]
fn a_claim_that_hands_nothing_over_counts_no_change_of_owner() {
    let sink = kvhygiene::events::MemorySink::new();
    let (alloc, backend, layout) = held_cache_into(Some(sink.clone()));
    let before = alloc.stats().counters.kv_gate_owner_changed_blocks;
    let x = x_claims_ws_block_losing_its_ledger(&alloc, &backend, &layout, 4);
    assert_eq!((x.claimed, x.taken.clone()), (0, vec![5]), "{x:?}");
    let changed = alloc.stats().counters.kv_gate_owner_changed_blocks - before;
    let recorded: u64 = gate_scrub_records(&sink)
        .iter()
        .filter(|r| r.stream == 3)
        .map(|r| r.owner_changed_blocks)
        .sum();
    assert_eq!(
        (changed, recorded),
        (reported_owner_changes(&x), 0),
        "block 5 was handed to nobody, yet kv_gate_owner_changed_blocks grew by {changed} and \
         x's kv_scrub records say {recorded} blocks changed owner: {x:?}"
    );
}

/// x's claim of w's block 5 loses its ledger while the gate scrubs it, and the claim's second
/// pass scrubs block 5 again. Block 5's owner (w) was known when the claim began, as the
/// report says (`unknown_owner` is empty); the second scrub's record (`unknown_owner_blocks`:
/// "those whose owner the gate did not know yet when the claim began") says the same.
#[test]
fn a_second_pass_record_counts_unknown_owners_as_of_the_claims_beginning() {
    let sink = kvhygiene::events::MemorySink::new();
    let (alloc, backend, layout) = held_cache_into(Some(sink.clone()));
    let x = x_claims_ws_block_losing_its_ledger(&alloc, &backend, &layout, 1);
    assert_eq!(
        (x.gate_scrubbed.clone(), x.unknown_owner.len()),
        (vec![5], 0)
    );
    let records: Vec<_> = gate_scrub_records(&sink)
        .into_iter()
        .filter(|r| r.stream == 3)
        .collect();
    assert_eq!(records.len(), 2, "{records:?}");
    assert_eq!(
        records[1].unknown_owner_blocks, 0,
        "the second pass's record counts block 5 as of an unknown owner, the report does not: \
         {x:?} {:?}",
        records[1]
    );
}

/// An allocator over a [`held::Held`] backend (gate `scrub`, tenant scope), with a cache of
/// `BLOCKS` blocks in two regions of one allocation.
fn held_tenant_cache() -> (
    kvhygiene::alloc::Allocator,
    std::sync::Arc<held::Held>,
    KvLayout,
) {
    cache_over_scoped(held::Held::new(), None, KvGateScope::Tenant)
}

/// Tenant scope: block 5 is tenant u's and written. Requests r1 and r2 of tenant t (a shared
/// prefix block) claim it at once; both gate scrubs run, and both hand it to t. Block 5
/// changed owner once without a verified scrub (u to t), as it does when the two claims come
/// one after the other (the second finds it t's and hands it over at once).
/// `kv_gate_owner_changed_blocks`: "blocks that changed owner without a verified scrub",
/// "counted by the scrub that hands the block over: once".
#[test]
fn a_block_two_requests_of_one_tenant_claim_at_once_counts_one_change_of_owner() {
    let (alloc, backend, layout) = held_tenant_cache();
    block_5_written_by(&alloc, &*backend, &layout, "u");
    let before = alloc.stats().counters.kv_gate_owner_changed_blocks;
    backend.hold(3, true);
    backend.hold(4, true);
    let (r1, r2) = std::thread::scope(|s| {
        let r1 = s.spawn(|| {
            as_request("t", "r1", || {
                alloc.claim_kv_blocks(&layout, &[5], 0, StreamHandle(3))
            })
        });
        backend.wait_submitted(3, 1);
        let r2 = s.spawn(|| {
            as_request("t", "r2", || {
                alloc.claim_kv_blocks(&layout, &[5], 0, StreamHandle(4))
            })
        });
        backend.wait_submitted(4, 1);
        backend.hold(3, false);
        backend.hold(4, false);
        (r1.join().unwrap().unwrap(), r2.join().unwrap().unwrap())
    });
    assert_eq!((r1.claimed, r2.claimed), (1, 1), "{r1:?} {r2:?}");
    let changed = alloc.stats().counters.kv_gate_owner_changed_blocks - before;
    assert_eq!(
        changed, 1,
        "block 5 changed owner once (tenant u to tenant t), yet kv_gate_owner_changed_blocks \
         grew by {changed} (r1 {r1:?}, r2 {r2:?})"
    );
}

/// Whether both segments of block `id` hold `tag`'s bytes.
fn held_holds(b: &held::Held, layout: &KvLayout, id: u64, tag: u8) -> bool {
    use kvhygiene::backend::Backend;
    layout.regions.iter().all(|&base| {
        let mut v = vec![0u8; BLOCK as usize];
        b.read(0, base + id * BLOCK, &mut v).unwrap();
        v == secret(BLOCK as usize, tag)
    })
}

/// Tenant scope. Block 5 is tenant u's and written. Request x of tenant t claims it, and its
/// gate scrub finds no memory for its batch: it tries again while another scrub holds one.
/// Meanwhile request y of tenant t is given block 5 (through a scrub of its own) and writes
/// it. ARCHITECTURE.md: "no claim's scrub outlives the hand-over of its block to another
/// claim. Nor does a claim's scrub begin after such a hand-over". Expected: x's scrub, when it
/// goes through, does not write block 5, which y's claim holds (x still gets it: it is
/// tenant t's, as y's claim made it).
#[test]
fn a_claims_scrub_leaves_out_a_block_a_claim_of_the_same_tenant_was_handed_before_its_submission() {
    let (alloc, backend, layout) = held_tenant_cache();
    block_5_written_by(&alloc, &*backend, &layout, "u");
    backend.hold(7, true);
    backend.out_of_memory(3, true);
    let (x, y) = std::thread::scope(|s| {
        // A scrub holding a batch slot: x's claim waits for slots instead of failing.
        let engine = s.spawn(|| alloc.scrub_kv_blocks(&layout, &[1], 0, StreamHandle(7)));
        backend.wait_submitted(7, 1);
        let x = s.spawn(|| {
            as_request("t", "x", || {
                alloc.claim_kv_blocks(&layout, &[5], 0, StreamHandle(3))
            })
        });
        backend.wait_refused(3);
        let y = as_request("t", "y", || {
            alloc.claim_kv_blocks(&layout, &[5], 0, StreamHandle(4))
        })
        .unwrap();
        held_fill(&*backend, &layout, 5, 0xcd); // y's keys and values
        backend.out_of_memory(3, false);
        let x = x.join().unwrap().unwrap();
        backend.hold(7, false);
        engine.join().unwrap().unwrap();
        (x, y)
    });
    assert_eq!((y.claimed, y.gate_scrubbed.clone()), (1, vec![5]), "{y:?}");
    assert!(
        held_holds(&backend, &layout, 5, 0xcd),
        "x's gate scrub, submitted after y's claim (same tenant) was handed block 5 and wrote \
         it, zeroed y's keys and values; x's report says block 5 was not scrubbed for it \
         (x {x:?}, y {y:?})"
    );
}

/// Request w's block 5 was scrubbed by the engine and verified (CLEAN). The engine scrubs it
/// once more (stream 7, held), and while that scrub is in flight request c claims it: the gate
/// scrubs it for c (stream 4) only because a scrub of it is in flight. Here the engine's
/// verdict lands before c's. `KvClaimReport::in_flight`: "those the gate scrubbed only
/// because another scrub of them was still in flight when the claim found them CLEAN".
/// Expected: c's report is the one it gives when c's verdict lands first (as in
/// `a_clean_block_claimed_while_an_engine_scrub_is_in_flight_is_not_counted_as_an_owner_change`):
/// block 5 in `gate_scrubbed` and `in_flight`.
#[test]
fn a_clean_block_scrubbed_because_an_engine_scrub_was_in_flight_is_reported_so_whichever_verdict_lands_first(
) {
    let (alloc, backend, layout) = held_cache();
    block_5_written_by(&alloc, &*backend, &layout, "t");
    let first = alloc
        .scrub_kv_blocks(&layout, &[5], 0, StreamHandle(2))
        .unwrap();
    assert!(first.failed.is_empty(), "precondition: {first:?}");
    backend.hold(7, true);
    backend.hold(4, true);
    let c = std::thread::scope(|s| {
        let engine = s.spawn(|| alloc.scrub_kv_blocks(&layout, &[5], 0, StreamHandle(7)));
        backend.wait_submitted(7, 1);
        let c = s.spawn(|| {
            as_request("t", "c", || {
                alloc.claim_kv_blocks(&layout, &[5], 0, StreamHandle(4))
            })
        });
        backend.wait_submitted(4, 1);
        backend.hold(7, false);
        assert!(engine.join().unwrap().unwrap().failed.is_empty());
        backend.hold(4, false);
        c.join().unwrap().unwrap()
    });
    assert_eq!(c.claimed, 1, "{c:?}");
    assert_eq!(
        (c.gate_scrubbed.clone(), c.in_flight.clone()),
        (vec![5], vec![5]),
        "c's gate scrub of block 5 (found CLEAN with the engine's scrub in flight) is left out \
         of the report when the engine's verdict lands first: {c:?}"
    );
}

/// Request w's block 5 is written; the engine scrubs it (stream 7, held: w finished) and,
/// while that scrub is in flight, request x claims the block (stream 3): the ledger still
/// names w, so the gate scrubs it for x. The same events, with the two verdicts landing in
/// either order. Returns x's report and how much `kv_gate_owner_changed_blocks` grew.
fn x_claims_while_the_engine_scrubs(engine_lands_first: bool) -> (KvClaimReport, u64) {
    let (alloc, backend, layout) = held_cache();
    block_5_written_by(&alloc, &*backend, &layout, "t");
    let before = alloc.stats().counters.kv_gate_owner_changed_blocks;
    backend.hold(7, true);
    backend.hold(3, true);
    let x = std::thread::scope(|s| {
        let engine = s.spawn(|| alloc.scrub_kv_blocks(&layout, &[5], 0, StreamHandle(7)));
        backend.wait_submitted(7, 1);
        let x = s.spawn(|| {
            as_request("t", "x", || {
                alloc.claim_kv_blocks(&layout, &[5], 0, StreamHandle(3))
            })
        });
        backend.wait_submitted(3, 1);
        if engine_lands_first {
            backend.hold(7, false);
            assert!(engine.join().unwrap().unwrap().failed.is_empty());
            backend.hold(3, false);
            x.join().unwrap().unwrap()
        } else {
            backend.hold(3, false);
            let x = x.join().unwrap().unwrap();
            backend.hold(7, false);
            assert!(engine.join().unwrap().unwrap().failed.is_empty());
            x
        }
    });
    let changed = alloc.stats().counters.kv_gate_owner_changed_blocks - before;
    (x, changed)
}

/// [`x_claims_while_the_engine_scrubs`]: block 5 changed owner once (w to x), through the
/// same scrubs whichever verdict lands first. Expected: `kv_gate_owner_changed_blocks` and
/// x's report say the same in both orders.
#[test]
fn an_owner_change_is_counted_the_same_whichever_of_an_engine_and_a_gate_verdict_lands_first() {
    let (engine_first, changed_engine_first) = x_claims_while_the_engine_scrubs(true);
    let (gate_first, changed_gate_first) = x_claims_while_the_engine_scrubs(false);
    assert_eq!(
        (engine_first.claimed, gate_first.claimed),
        (1, 1),
        "{engine_first:?} {gate_first:?}"
    );
    assert_eq!(
        (changed_engine_first, engine_first.gate_scrubbed.clone()),
        (changed_gate_first, gate_first.gate_scrubbed.clone()),
        "the same claim of block 5 counts {changed_engine_first} change(s) of owner when the \
         engine's verdict lands first and {changed_gate_first} when the gate's does \
         (engine first: {engine_first:?}, gate first: {gate_first:?})"
    );
}

/// Block 5 is request w's and written, and a scrub freeing another allocation is queued on
/// stream 8, held. Spawns request x's claim of block 5 on stream 3, whose submissions find no
/// memory: once the claim sorted block 5 (w's) and its first try was refused, it waits for the
/// pool's scrubs (the one on stream 8) before its next try, until [`release_x`].
fn spawn_x_paused_before_its_submission<'scope>(
    s: &'scope std::thread::Scope<'scope, '_>,
    alloc: &'scope kvhygiene::alloc::Allocator,
    backend: &'scope held::Held,
    layout: &'scope KvLayout,
) -> std::thread::ScopedJoinHandle<'scope, Result<KvClaimReport, KvClaimError>> {
    block_5_written_by(alloc, backend, layout, "t");
    let other = alloc.malloc(BLOCK as i64, 0, StreamHandle(1)).unwrap();
    backend.hold(8, true);
    alloc.free(other, BLOCK as i64, 0, StreamHandle(8)).unwrap();
    backend.out_of_memory(3, true);
    let x = s.spawn(|| {
        as_request("t", "x", || {
            alloc.claim_kv_blocks(layout, &[5], 0, StreamHandle(3))
        })
    });
    backend.wait_refused(3);
    backend.wait_submitted(8, 1);
    x
}

/// Lets the claim [`spawn_x_paused_before_its_submission`] spawned try again, and go through.
fn release_x(backend: &held::Held) {
    backend.out_of_memory(3, false);
    backend.hold(8, false);
}

/// Request scope. x's claim of w's block 5 waits before its submission
/// ([`spawn_x_paused_before_its_submission`]). Meanwhile another claim of request x is handed
/// block 5 (through its own scrub) and x writes it; then request y claims block 5, and y's
/// gate scrub (stream 5) is submitted and has not settled when x's first claim goes on. x's
/// claim returns, and x writes block 5 if it got it; then y's verdict lands. Expected: block
/// 5 is handed to one of x and y, not both (a block another owner's scrub may still write is
/// not handed to x without device work of its own ordered after that scrub).
#[test]
fn a_block_another_claim_of_the_claimant_was_handed_is_not_handed_over_while_another_owners_scrub_of_it_is_in_flight(
) {
    let (alloc, backend, layout) = held_cache();
    backend.hold(5, true);
    let (x, y) = std::thread::scope(|s| {
        let x = spawn_x_paused_before_its_submission(s, &alloc, &backend, &layout);
        let x2 = as_request("t", "x", || {
            alloc.claim_kv_blocks(&layout, &[5], 0, StreamHandle(4))
        })
        .unwrap();
        assert_eq!(x2.claimed, 1, "precondition: {x2:?}");
        held_fill(&*backend, &layout, 5, 0xaa); // x's keys and values
        let y = s.spawn(|| {
            as_request("t", "y", || {
                alloc.claim_kv_blocks(&layout, &[5], 0, StreamHandle(5))
            })
        });
        backend.wait_submitted(5, 1);
        release_x(&backend);
        let x = x.join().unwrap().unwrap();
        if x.claimed == 1 {
            held_fill(&*backend, &layout, 5, 0xee); // x's keys and values
        }
        backend.hold(5, false);
        (x, y.join().unwrap().unwrap())
    });
    assert!(
        x.claimed == 0 || y.claimed == 0,
        "block 5 was handed to both request x and request y: x's claim took it as x's own \
         (withdrawn from its scrub) while y's gate scrub of it was in flight, and y's verdict \
         then handed it to y (x {x:?}, y {y:?})"
    );
}

/// Request scope. x's claim of w's block 5 waits before its submission
/// ([`spawn_x_paused_before_its_submission`]). Meanwhile another claim of request x is handed
/// block 5 (through its own scrub) and x writes it; then the engine scrubs block 5 (stream 7,
/// held). x's first claim goes on and returns; x writes block 5 if it got it; the engine's
/// verdict lands; request y claims block 5. Expected: if x's claim handed block 5 over, the
/// block is x's, so y gets it only through a scrub of its own (not at once as CLEAN, with
/// the bytes x wrote after its claim returned).
#[test]
fn a_block_another_claim_of_the_claimant_was_handed_is_not_handed_over_while_an_engine_scrub_of_it_is_in_flight(
) {
    let (alloc, backend, layout) = held_cache();
    backend.hold(7, true);
    let x = std::thread::scope(|s| {
        let x = spawn_x_paused_before_its_submission(s, &alloc, &backend, &layout);
        let x2 = as_request("t", "x", || {
            alloc.claim_kv_blocks(&layout, &[5], 0, StreamHandle(4))
        })
        .unwrap();
        assert_eq!(x2.claimed, 1, "precondition: {x2:?}");
        held_fill(&*backend, &layout, 5, 0xaa); // x's keys and values
        let engine = s.spawn(|| alloc.scrub_kv_blocks(&layout, &[5], 0, StreamHandle(7)));
        backend.wait_submitted(7, 1);
        release_x(&backend);
        let x = x.join().unwrap().unwrap();
        if x.claimed == 1 {
            held_fill(&*backend, &layout, 5, 0xee); // x's keys and values
        }
        backend.hold(7, false);
        assert!(engine.join().unwrap().unwrap().failed.is_empty());
        x
    });
    let y = as_request("t", "y", || {
        alloc.claim_kv_blocks(&layout, &[5], 0, StreamHandle(2))
    })
    .unwrap();
    assert!(
        x.claimed == 0 || (y.gate_scrubbed == vec![5] && held_zero(&backend, &layout, 5)),
        "x's claim handed block 5 over (as x's own, withdrawn from its scrub) while the \
         engine's scrub of it was in flight; that scrub's verdict then made it CLEAN, and y \
         was handed it without a scrub (x {x:?}, y {y:?})"
    );
}

/// The statistics carry the gate's policy: integrations whose coverage depends on the scope
/// read it there (the vLLM worker refuses a tenant scope beside a KV connector that loads).
#[test]
fn the_statistics_name_the_gates_mode_and_scope() {
    for (mode, scope, json) in [
        (
            KvGateMode::Enforce,
            KvGateScope::Tenant,
            r#""kv_gate":{"mode":"enforce","scope":"tenant"}"#,
        ),
        (
            KvGateMode::Scrub,
            KvGateScope::Request,
            r#""kv_gate":{"mode":"scrub","scope":"request"}"#,
        ),
    ] {
        let f = Fixture::new(config(mode, scope));
        let stats = f.alloc.stats().to_json();
        assert!(stats.contains(json), "{stats}");
    }
}

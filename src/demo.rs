//! `kvh demo`: several tenants run inference requests whose KV caches grow during decode and
//! are freed at request end, on a real [`Allocator`]. Every new allocation is read back and
//! must be all zero, while every request fills its blocks with its own secret bytes: a single
//! leak between requests would show up as a non-zero byte.
//!
//! Each request also takes blocks from a shared paged KV cache, as vLLM-style engines keep
//! one, claims them through the eviction gate ([`Allocator::claim_kv_blocks`]) and hands them
//! back through [`Allocator::scrub_kv_blocks`]; every block a request takes is read back the
//! same way. With the gate on, some requests are "preempted" down a path that forgets the
//! scrub: the gate must scrub those blocks before their next request gets them.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::alloc::{Allocator, FreeError, KvClaimError, KvClaimReport, KvLayout, KvScrubError};
use crate::backend::{Backend, BackendKind, StreamHandle};
use crate::config::{Config, KvGateMode, KvGateScope};
use crate::context::Context;
use crate::events::EventSink;
use crate::stats::Stats;

/// Every simulated request runs on the default stream: stream handles are real `CUstream`
/// values on the CUDA backend, and the demo owns no streams of its own.
const DEFAULT_STREAM: StreamHandle = StreamHandle(0);

/// Shape of the simulated workload.
#[derive(Clone, Debug)]
pub struct DemoOptions {
    pub tenants: u32,
    pub requests_per_tenant: u32,
    /// Tokens generated per request (a new KV block every `tokens_per_block`).
    pub decode_tokens: u32,
    pub tokens_per_block: u32,
    /// Bytes of one KV block (both K and V, all layers, for `tokens_per_block` tokens).
    pub kv_block_bytes: u64,
    pub inject_fault: bool,
    pub seed: u64,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            tenants: 4,
            requests_per_tenant: 24,
            decode_tokens: 256,
            tokens_per_block: 16,
            // 16 tokens x (K + V) x 8 layers x 8 heads x 64 dims x 2 bytes (fp16).
            kv_block_bytes: 16 * 2 * 8 * 8 * 64 * 2,
            inject_fault: false,
            seed: 0x6b76_6879,
        }
    }
}

/// What the fault drill showed.
#[derive(Clone, Debug, Serialize)]
pub struct FaultDrill {
    /// `kvh_free_checked` reported the verification failure.
    pub caught: bool,
    /// The block went to quarantine and was never handed out again.
    pub quarantined: bool,
    pub detail: String,
    /// The drill's own allocations, each read back like the workload's (included in the
    /// report's totals).
    pub checked: u64,
    /// Of those, allocations with any non-zero byte. Must be 0.
    pub with_residue: u64,
    /// A sabotaged paged-cache block was named by `scrub_kv_blocks` and kept out of the
    /// cache's free list, while its neighbour, scrubbed in the same call, went back.
    pub kv_caught: bool,
    /// How much the sabotaged free moved the run's `verifications_failed` and
    /// `residue_detected`: the failures the drill accounts for, and no others.
    pub verifications_failed: u64,
    pub residue_detected: u64,
}

/// The demo's findings.
#[derive(Clone, Debug, Serialize)]
pub struct DemoReport {
    pub backend: String,
    pub tenants: u32,
    pub requests: u64,
    pub elapsed_ms: u64,
    /// New allocations read back in full.
    pub allocations_checked: u64,
    /// Of those, allocations with any non-zero byte: leaks. Must be 0.
    pub allocations_with_residue: u64,
    /// Paged-cache blocks taken by requests, each read back (K and V) before use.
    pub kv_blocks_checked: u64,
    /// Of those, blocks with any non-zero byte: leaks. Must be 0.
    pub kv_blocks_with_residue: u64,
    /// Blocks `scrub_kv_blocks` named as failed, kept out of the cache's free list.
    pub kv_blocks_retired: u64,
    /// The eviction gate: blocks preempted requests released without a scrub, and of those
    /// taken again, how many the gate caught (scrubbed inside the claim, or refused under
    /// `enforce` and then scrubbed by the engine). All of them must be caught.
    pub kv_gate: KvGateMode,
    /// Whose blocks the gate keeps apart (`KVH_KV_GATE_SCOPE`).
    pub kv_gate_scope: KvGateScope,
    /// Whether requests were preempted without a scrub: the gate on, per request, and a
    /// tenant's fourth request (one in four is) made.
    pub preemption_simulated: bool,
    pub kv_blocks_released_unscrubbed: u64,
    pub kv_blocks_reclaimed_unscrubbed: u64,
    pub kv_blocks_caught_by_gate: u64,
    pub fault_drill: Option<FaultDrill>,
    pub stats: Stats,
    /// Records the run's forensic log could not write (a full disk, say), as its writer
    /// counted them once stopped; set by whoever stopped the log. Must be 0: the security
    /// records of the run are its evidence.
    pub log_records_lost: u64,
    /// Writes of the run's forensic log that failed (a record, an fsync, a checkpoint), as
    /// its writer counted them once stopped; must be 0 too: a checkpoint that could not be
    /// written leaves a log that does not verify with the signer's public key.
    pub log_write_errors: u64,
    /// The last of those errors.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_last_error: Option<String>,
}

impl DemoReport {
    /// Whether the run showed what it must: no residue, a caught fault when one was set, no
    /// verification failure other than the drill's (a failed block is quarantined or
    /// retired, so it never reads back dirty: the failure itself must fail the run), and a
    /// forensic log that lost nothing. The drill's scrub fails its verification, or, under a
    /// coverage threshold that tolerates its dirty samples, is quarantined for residue (or
    /// both): the run's counters must hold what the drill's free moved them by, and nothing
    /// else.
    pub fn passed(&self) -> bool {
        let drilled = u64::from(self.fault_drill.is_some());
        let (drill_failed, drill_residue) = self
            .fault_drill
            .as_ref()
            .map_or((0, 0), |d| (d.verifications_failed, d.residue_detected));
        let c = &self.stats.counters;
        self.allocations_with_residue == 0
            && self.kv_blocks_with_residue == 0
            && self.log_records_lost == 0
            && self.log_write_errors == 0
            && c.verifications_failed == drill_failed
            && c.residue_detected == drill_residue
            && drill_failed <= drilled
            && drill_residue <= drilled
            && drill_failed.max(drill_residue) == drilled
            && c.kv_blocks_failed == drilled
            && self.kv_blocks_retired == drilled
            && self.kv_blocks_caught_by_gate == self.kv_blocks_reclaimed_unscrubbed
            && self
                .fault_drill
                .as_ref()
                .is_none_or(|d| d.caught && d.quarantined && d.kv_caught)
    }
}

/// Why the demo could not run.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("allocation failed: {0}")]
    Alloc(#[from] crate::alloc::AllocError),
    #[error("KV block claim failed: {0}")]
    KvClaim(#[from] KvClaimError),
    #[error("backend error: {0}")]
    Backend(#[from] crate::backend::BackendError),
    #[error("--inject-fault needs the host backend (it sabotages a scrub on purpose); this run uses {0}")]
    FaultNeedsHost(BackendKind),
    #[error("free failed: {0}")]
    Free(#[from] FreeError),
    #[error("KV block scrub failed: {0}")]
    KvScrub(#[from] KvScrubError),
    #[error(
        "out of host memory for a {0}-byte buffer (fewer --tenants or --decode-tokens need less)"
    )]
    HostMemory(u64),
    #[error(
        "cannot start the thread of tenant {tenant}: {source} (a limit on this process's \
         threads is reached, as a container's pids limit or ulimit -u; fewer --tenants need \
         fewer)"
    )]
    Thread { tenant: u32, source: std::io::Error },
    /// `stop` was set (SIGINT or SIGTERM): the requests under way finished, no more began.
    #[error("interrupted after {done} of {total} requests")]
    Interrupted { done: u64, total: u64 },
}

/// Runs the simulation on `backend` with `config`. `progress` is called after each request;
/// once `stop` is set no request begins, and the run ends with [`DemoError::Interrupted`].
pub fn run(
    backend: Arc<dyn Backend>,
    config: Config,
    sink: Option<Arc<dyn EventSink>>,
    opts: &DemoOptions,
    progress: &(dyn Fn(u64, u64) + Sync),
    stop: &AtomicBool,
) -> Result<DemoReport, DemoError> {
    if opts.inject_fault && backend.kind() != BackendKind::Host {
        return Err(DemoError::FaultNeedsHost(backend.kind()));
    }
    // The anomaly detector in front of the caller's sink, as the runtime puts it.
    let layered = crate::anomaly::layer(&config.anomaly, sink);
    let alloc = Allocator::new(backend, config, layered.sink.clone());
    let (paged, paged_dirty) = PagedCache::new(&alloc, opts)?;
    // The paged cache's allocation, read back by `new`, counts as a new allocation.
    let checked = AtomicU64::new(1);
    let residue = AtomicU64::new(u64::from(paged_dirty));
    let done = AtomicU64::new(0);
    let total = u64::from(opts.tenants) * u64::from(opts.requests_per_tenant);
    let started = Instant::now();
    // Set when a tenant's thread could not start: those already running stop before their
    // next request, and the run ends with that error.
    let abandon = AtomicBool::new(false);
    std::thread::scope(|scope| -> Result<(), DemoError> {
        let mut workers = Vec::new();
        for tenant in 0..opts.tenants {
            let (alloc, paged) = (&alloc, &paged);
            let (checked, residue, done, abandon) = (&checked, &residue, &done, &abandon);
            let spawned = std::thread::Builder::new()
                .name(format!("kvh-demo-t{tenant}"))
                .spawn_scoped(scope, move || -> Result<(), DemoError> {
                    let mut rng = Rng(
                        opts.seed ^ (u64::from(tenant) + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
                    );
                    for request in 0..opts.requests_per_tenant {
                        if stop.load(Ordering::Relaxed) || abandon.load(Ordering::Relaxed) {
                            let done = done.load(Ordering::Relaxed);
                            return Err(DemoError::Interrupted { done, total });
                        }
                        let ctx = Context::new(
                            Some(&format!("tenant-{tenant}")),
                            Some(&format!("req-{tenant}-{request}")),
                            Some("llama-demo"),
                        )
                        .unwrap_or_default();
                        Context::set_current(ctx);
                        let found = run_request(alloc, opts, tenant, &mut rng)?;
                        // With the gate on, one request in four is preempted down a path that
                        // forgets to scrub its paged blocks.
                        let preempted = simulates_preemption(alloc.config()) && request % 4 == 3;
                        paged.serve(alloc, &mut rng, tenant_secret(tenant), preempted)?;
                        checked.fetch_add(found.0, Ordering::Relaxed);
                        residue.fetch_add(found.1, Ordering::Relaxed);
                        progress(done.fetch_add(1, Ordering::Relaxed) + 1, total);
                    }
                    Context::set_current(Context::none());
                    Ok(())
                });
            match spawned {
                Ok(w) => workers.push(w),
                Err(e) => {
                    abandon.store(true, Ordering::Relaxed);
                    for w in workers {
                        // Their outcome is moot (interrupted, or an error of their own that
                        // this one outranks): the run could not be what was asked.
                        let _ = w.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
                    }
                    return Err(DemoError::Thread { tenant, source: e });
                }
            }
        }
        for w in workers {
            w.join().unwrap_or_else(|p| std::panic::resume_unwind(p))?;
        }
        Ok(())
    })?;
    let fault_drill = if opts.inject_fault {
        let drill = fault_drill(&alloc, &paged, opts)?;
        checked.fetch_add(drill.checked, Ordering::Relaxed);
        residue.fetch_add(drill.with_residue, Ordering::Relaxed);
        Some(drill)
    } else {
        None
    };
    alloc.free(paged.addr, paged.size as i64, 0, DEFAULT_STREAM)?;
    // Shutdown drains every scrub so the figures are final.
    alloc.shutdown();
    let mut stats = alloc.stats();
    stats.anomaly = layered.stats_json();
    let released_unscrubbed = paged.released_unscrubbed.into_inner();
    Ok(DemoReport {
        backend: stats.backend.clone(),
        tenants: opts.tenants,
        requests: total,
        elapsed_ms: started.elapsed().as_millis() as u64,
        allocations_checked: checked.into_inner(),
        allocations_with_residue: residue.into_inner(),
        kv_blocks_checked: paged.checked.into_inner(),
        kv_blocks_with_residue: paged.with_residue.into_inner(),
        kv_blocks_retired: paged.retired.into_inner(),
        kv_gate: alloc.config().kv_gate,
        kv_gate_scope: alloc.config().kv_gate_scope,
        preemption_simulated: released_unscrubbed > 0,
        kv_blocks_released_unscrubbed: released_unscrubbed,
        kv_blocks_reclaimed_unscrubbed: paged.reclaimed_unscrubbed.into_inner(),
        kv_blocks_caught_by_gate: paged.caught_by_gate.into_inner(),
        fault_drill,
        stats,
        log_records_lost: 0,
        log_write_errors: 0,
        log_last_error: None,
    })
}

/// One request: prefill allocates the prompt's KV blocks, decode grows the cache block by
/// block (plus a short-lived activation buffer per step batch), and the end frees it all.
/// Returns `(allocations checked, allocations with residue)`.
fn run_request(
    alloc: &Allocator,
    opts: &DemoOptions,
    tenant: u32,
    rng: &mut Rng,
) -> Result<(u64, u64), DemoError> {
    let stream = DEFAULT_STREAM;
    let secret = tenant_secret(tenant);
    let prompt_blocks = 1 + rng.below(4);
    let decode_blocks = u64::from(opts.decode_tokens / opts.tokens_per_block.max(1)).max(1);
    let mut kv = Vec::new();
    let (mut checked, mut dirty) = (0, 0);
    let mut take = |size: u64, kv: &mut Vec<(u64, u64)>| -> Result<(), DemoError> {
        let addr = malloc(alloc, size, stream)?;
        checked += 1;
        dirty += u64::from(!reads_zero(alloc.backend().as_ref(), addr, size)?);
        // The request's own data: this is what must never reach another request.
        fill(alloc.backend().as_ref(), addr, size, secret)?;
        kv.push((addr, size));
        Ok(())
    };
    for _ in 0..prompt_blocks + decode_blocks {
        take(opts.kv_block_bytes, &mut kv)?;
        // An activation buffer of varying size, freed right away.
        let act = 4096 + 512 * rng.below(64);
        let mut scratch = Vec::new();
        take(act, &mut scratch)?;
        for (a, s) in scratch {
            alloc.free(a, s as i64, 0, stream)?;
        }
    }
    for (addr, size) in kv {
        alloc.free(addr, size as i64, 0, stream)?;
    }
    Ok((checked, dirty))
}

/// `size` bytes from `alloc` on device 0. On the host backend, out of memory is the host's
/// memory running out (its capacity is what the process may still commit): said as such, with
/// the options that need less.
fn malloc(alloc: &Allocator, size: u64, stream: StreamHandle) -> Result<u64, DemoError> {
    match alloc.malloc(size as i64, 0, stream) {
        Err(crate::alloc::AllocError::OutOfMemory { size, .. })
            if alloc.backend().kind() == BackendKind::Host =>
        {
            Err(DemoError::HostMemory(size))
        }
        other => Ok(other?),
    }
}

/// Whether the run preempts requests without a scrub: only when the gate keeps requests apart.
/// Under `kv_gate_scope = tenant` a tenant's next request may legitimately get its blocks
/// unscrubbed, which the read-back would count as residue.
fn simulates_preemption(config: &Config) -> bool {
    config.kv_gate != KvGateMode::Off && config.kv_gate_scope == KvGateScope::Request
}

/// The bytes a tenant's requests write into their memory (never zero).
fn tenant_secret(tenant: u32) -> u8 {
    tenant as u8 ^ 0xA5 | 1
}

/// Blocks of the paged cache per tenant; a request takes at most half of them.
const PAGED_BLOCKS_PER_TENANT: u64 = 16;

/// A paged KV cache shared by every tenant, as a vLLM-style engine keeps one: K and V regions
/// in one allocation, whose blocks requests take from a free list and hand back through
/// `scrub_kv_blocks`. A block the scrub names as failed is retired, never handed out again.
struct PagedCache {
    addr: u64,
    size: u64,
    layout: KvLayout,
    free: Mutex<Vec<u32>>,
    checked: AtomicU64,
    with_residue: AtomicU64,
    retired: AtomicU64,
    /// Blocks in the free list that went back without a scrub (a preempted request's).
    unscrubbed: Mutex<HashSet<u32>>,
    released_unscrubbed: AtomicU64,
    reclaimed_unscrubbed: AtomicU64,
    caught_by_gate: AtomicU64,
}

impl PagedCache {
    /// The cache, and whether its allocation read back dirty (a residue of a new allocation).
    fn new(alloc: &Allocator, opts: &DemoOptions) -> Result<(PagedCache, bool), DemoError> {
        let blocks = PAGED_BLOCKS_PER_TENANT * u64::from(opts.tenants.max(1));
        // One block of the cache is a KV block's K half, or its V half.
        let block_bytes = (opts.kv_block_bytes / 2).max(1);
        let size = 2 * blocks * block_bytes;
        let addr = malloc(alloc, size, DEFAULT_STREAM)?;
        let cache = PagedCache {
            addr,
            size,
            layout: KvLayout {
                regions: vec![addr, addr + blocks * block_bytes],
                block_bytes,
                block_stride: block_bytes,
                blocks_per_region: blocks,
            },
            // Filled by the scrub below.
            free: Mutex::new(Vec::new()),
            checked: AtomicU64::new(0),
            with_residue: AtomicU64::new(0),
            retired: AtomicU64::new(0),
            unscrubbed: Mutex::new(HashSet::new()),
            released_unscrubbed: AtomicU64::new(0),
            reclaimed_unscrubbed: AtomicU64::new(0),
            caught_by_gate: AtomicU64::new(0),
        };
        // A new allocation like any other: it must read zero.
        let dirty = !reads_zero(alloc.backend().as_ref(), addr, size)?;
        // The engine scrubs its whole cache once at start: the gate then knows every block
        // is clean and owned by nobody (under `enforce`, claims of unknown blocks fail).
        let all: Vec<u32> = (0..blocks as u32).rev().collect();
        cache.give_back(alloc, &all)?;
        Ok((cache, dirty))
    }

    /// One request's use of the cache: take blocks, claim them through the eviction gate,
    /// check they read zero, fill them with the tenant's secret, hand them back (scrubbed, or
    /// unscrubbed when `preempted`).
    fn serve(
        &self,
        alloc: &Allocator,
        rng: &mut Rng,
        secret: u8,
        preempted: bool,
    ) -> Result<(), DemoError> {
        let ids = self.take(1 + rng.below(PAGED_BLOCKS_PER_TENANT / 2) as usize);
        let ids = self.claim(alloc, ids)?;
        self.read_back_and_fill(alloc, &ids, secret)?;
        if preempted {
            self.release_unscrubbed(&ids);
        } else {
            self.give_back(alloc, &ids)?;
        }
        Ok(())
    }

    /// Reads each of the claimed blocks `ids` back (K and V; counted, and counted again when
    /// one is not all zero), then fills it with `secret`, as a request writes its keys and
    /// values.
    fn read_back_and_fill(
        &self,
        alloc: &Allocator,
        ids: &[u32],
        secret: u8,
    ) -> Result<(), DemoError> {
        let backend = alloc.backend().as_ref();
        for &id in ids {
            self.checked.fetch_add(1, Ordering::Relaxed);
            let mut dirty = false;
            for (addr, len) in self.block(id) {
                dirty |= !reads_zero(backend, addr, len)?;
                fill(backend, addr, len, secret)?;
            }
            if dirty {
                self.with_residue.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    /// Claims `ids` for the calling thread's request. Under `enforce` a refused claim is
    /// answered as an engine would: scrub the blocks named, then claim again. Blocks the
    /// gate will not hand over are retired. Returns the blocks the request may use.
    fn claim(&self, alloc: &Allocator, ids: Vec<u32>) -> Result<Vec<u32>, DemoError> {
        let kept = self.claim_or_scrub(alloc, ids.clone());
        // Whatever happened, these blocks no longer count as released unscrubbed.
        let mut unscrubbed = self.unscrubbed.lock().unwrap_or_else(|p| p.into_inner());
        for id in &ids {
            unscrubbed.remove(id);
        }
        kept
    }

    fn claim_or_scrub(&self, alloc: &Allocator, ids: Vec<u32>) -> Result<Vec<u32>, DemoError> {
        let report = match alloc.claim_kv_blocks(&self.layout, &ids, 0, DEFAULT_STREAM) {
            Err(KvClaimError::Unscrubbed { blocks }) => {
                self.caught_by_gate
                    .fetch_add(self.count_unscrubbed(&blocks), Ordering::Relaxed);
                let failed = alloc
                    .scrub_kv_blocks(&self.layout, &blocks, 0, DEFAULT_STREAM)?
                    .failed;
                self.retired
                    .fetch_add(failed.len() as u64, Ordering::Relaxed);
                let ids: Vec<u32> = ids.into_iter().filter(|id| !failed.contains(id)).collect();
                let report = alloc.claim_kv_blocks(&self.layout, &ids, 0, DEFAULT_STREAM)?;
                return Ok(self.keep_handed_over(ids, &report));
            }
            other => other?,
        };
        self.caught_by_gate.fetch_add(
            self.count_unscrubbed(&report.gate_scrubbed),
            Ordering::Relaxed,
        );
        Ok(self.keep_handed_over(ids, &report))
    }

    /// Of `blocks`, how many went back to the free list unscrubbed.
    fn count_unscrubbed(&self, blocks: &[u32]) -> u64 {
        let unscrubbed = self.unscrubbed.lock().unwrap_or_else(|p| p.into_inner());
        blocks.iter().filter(|id| unscrubbed.contains(id)).count() as u64
    }

    /// `ids` without `refused`, which are retired.
    /// `ids` without those the claim did not hand over. Refused ones (failed verification)
    /// are retired; taken ones belong to another request (never the case here, where every
    /// block is taken off the free list by one request).
    fn keep_handed_over(&self, ids: Vec<u32>, report: &KvClaimReport) -> Vec<u32> {
        self.retired
            .fetch_add(report.refused.len() as u64, Ordering::Relaxed);
        ids.into_iter()
            .filter(|id| !report.refused.contains(id) && !report.taken.contains(id))
            .collect()
    }

    /// A preempted request's blocks go back to the free list without a scrub.
    fn release_unscrubbed(&self, ids: &[u32]) {
        self.unscrubbed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(ids);
        self.released_unscrubbed
            .fetch_add(ids.len() as u64, Ordering::Relaxed);
        self.free
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(ids);
    }

    /// Takes up to `n` blocks off the free list, counting those that went back unscrubbed.
    fn take(&self, n: usize) -> Vec<u32> {
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        let keep = free.len().saturating_sub(n);
        let ids = free.split_off(keep);
        drop(free);
        self.reclaimed_unscrubbed
            .fetch_add(self.count_unscrubbed(&ids), Ordering::Relaxed);
        ids
    }

    /// Scrubs `ids` and returns the verified ones to the free list. Returns the failed ones.
    fn give_back(&self, alloc: &Allocator, ids: &[u32]) -> Result<Vec<u32>, DemoError> {
        let report = alloc.scrub_kv_blocks(&self.layout, ids, 0, DEFAULT_STREAM)?;
        self.retired
            .fetch_add(report.failed.len() as u64, Ordering::Relaxed);
        let mut unscrubbed = self.unscrubbed.lock().unwrap_or_else(|p| p.into_inner());
        for id in ids {
            unscrubbed.remove(id);
        }
        drop(unscrubbed);
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        free.extend(ids.iter().filter(|id| !report.failed.contains(id)));
        Ok(report.failed)
    }

    /// The K and V parts of block `id`, as `(address, length)`.
    fn block(&self, id: u32) -> impl Iterator<Item = (u64, u64)> + '_ {
        let offset = u64::from(id) * self.layout.block_stride;
        let len = self.layout.block_bytes;
        self.layout
            .regions
            .iter()
            .map(move |&base| (base + offset, len))
    }
}

/// Bytes the demo moves between host and device in one call: its buffers stay this small
/// whatever the size of an allocation, and are reserved fallibly, so that a large run that
/// exhausts host memory ends with an error instead of an abort (Rust aborts the process when
/// an allocation fails).
const IO_CHUNK: u64 = 1 << 20;

/// A buffer of `len` (at most [`IO_CHUNK`]) bytes of `byte`, or an error when host memory
/// has run out.
fn buffer(len: u64, byte: u8) -> Result<Vec<u8>, DemoError> {
    let n = len.min(IO_CHUNK) as usize;
    let mut buf = Vec::new();
    buf.try_reserve_exact(n)
        .map_err(|_| DemoError::HostMemory(n as u64))?;
    buf.resize(n, byte);
    Ok(buf)
}

/// Writes `len` bytes of `byte` at `addr`, a chunk at a time.
fn fill(backend: &dyn Backend, addr: u64, len: u64, byte: u8) -> Result<(), DemoError> {
    let buf = buffer(len, byte)?;
    let mut done = 0;
    while done < len {
        let n = (len - done).min(IO_CHUNK);
        backend.write(0, addr + done, &buf[..n as usize])?;
        done += n;
    }
    Ok(())
}

/// Reads a whole allocation back, a chunk at a time, and checks it is zero.
fn reads_zero(backend: &dyn Backend, addr: u64, size: u64) -> Result<bool, DemoError> {
    let mut buf = buffer(size, 0xFF)?;
    let mut done = 0;
    while done < size {
        let n = (size - done).min(IO_CHUNK) as usize;
        // Not zero before the read: a read that left the buffer as it was must not pass.
        buf[..n].fill(0xFF);
        backend.read(0, addr + done, &mut buf[..n])?;
        if buf[..n].iter().any(|&b| b != 0) {
            return Ok(false);
        }
        done += n as u64;
    }
    Ok(true)
}

/// Sabotages one scrub and shows verification catching it, then one paged-cache block scrub.
fn fault_drill(
    alloc: &Allocator,
    paged: &PagedCache,
    opts: &DemoOptions,
) -> Result<FaultDrill, DemoError> {
    let victim = Context::new(
        Some("tenant-victim"),
        Some("req-victim"),
        Some("llama-demo"),
    )
    .unwrap_or_default();
    Context::set_current(victim);
    let size = opts.kv_block_bytes;
    let (mut checked, mut with_residue) = (0, 0);
    let mut read_back = |addr: u64| -> Result<(), DemoError> {
        checked += 1;
        with_residue += u64::from(!reads_zero(alloc.backend().as_ref(), addr, size)?);
        Ok(())
    };
    let addr = malloc(alloc, size, DEFAULT_STREAM)?;
    read_back(addr)?;
    fill(alloc.backend().as_ref(), addr, size, 0x5E)?;
    let id = alloc.block_info(addr).map(|b| b.id);
    // Frees still batched from the workload must not take the sabotage meant for this one.
    let _ = alloc.synchronize();
    let before = alloc.stats().counters;
    alloc.backend().inject_fault(1)?;
    let result = alloc.free_checked(addr, size as i64, 0, DEFAULT_STREAM);
    let after = alloc.stats().counters;
    let caught = matches!(result, Err(FreeError::VerifyFailed { .. }));
    // Try hard to get the block back: it must never come.
    let mut handed_out_again = false;
    for _ in 0..64 {
        let again = malloc(alloc, size, DEFAULT_STREAM)?;
        read_back(again)?;
        handed_out_again |= alloc.block_info(again).map(|b| b.id) == id;
        alloc.free(again, size as i64, 0, DEFAULT_STREAM)?;
        let _ = alloc.synchronize();
    }
    let kv_caught = kv_fault_drill(alloc, paged)?;
    Context::set_current(Context::none());
    // The drill's own free quarantined it (counted between the two readings around it, when
    // no other free ran), and it never came back.
    let quarantined = after.quarantined > before.quarantined && !handed_out_again;
    let detail = match result {
        Err(e) => e.to_string(),
        Ok(_) => "the sabotaged scrub was NOT caught".to_string(),
    };
    Ok(FaultDrill {
        caught,
        quarantined,
        detail,
        checked,
        with_residue,
        kv_caught,
        verifications_failed: after.verifications_failed - before.verifications_failed,
        residue_detected: after.residue_detected - before.residue_detected,
    })
}

/// Two paged-cache blocks filled with a secret are scrubbed with the first one sabotaged:
/// `scrub_kv_blocks` must name exactly that one, which stays out of the free list, while the
/// other goes back, reading zero, like every block of the free list that was scrubbed.
fn kv_fault_drill(alloc: &Allocator, paged: &PagedCache) -> Result<bool, DemoError> {
    let taken = paged.take(2);
    let ids = paged.claim(alloc, taken)?;
    // Read back like every block a request takes (the report's count includes them).
    paged.read_back_and_fill(alloc, &ids, 0x5E)?;
    let backend = alloc.backend().as_ref();
    let _ = alloc.synchronize();
    backend.inject_fault(1)?;
    let failed = paged.give_back(alloc, &ids)?;
    let free = paged.free.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let unscrubbed = paged
        .unscrubbed
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let mut clean = true;
    // Blocks preempted requests put back unscrubbed are the gate's to scrub at their claim.
    for &id in free.iter().filter(|id| !unscrubbed.contains(id)) {
        for (addr, len) in paged.block(id) {
            clean &= reads_zero(backend, addr, len)?;
        }
    }
    // The block named is the one sabotaged: it still holds residue (half of it left unzeroed;
    // it is retired, so nobody reads it again).
    let (k_addr, k_len) = paged.block(ids[0]).next().unwrap_or((0, 0));
    let named_dirty = k_len > 0 && !reads_zero(backend, k_addr, k_len)?;
    Ok(ids.len() == 2 && failed == ids[..1] && named_dirty && clean)
}

/// xorshift64*: a small deterministic generator for the workload shape.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n.max(1)
    }
}

/// Human-readable summary.
pub fn render(report: &DemoReport) -> String {
    let s = &report.stats;
    let c = &s.counters;
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    let mut out = String::new();
    let mut line = |k: &str, v: String| out.push_str(&format!("  {k:<28}{v}\n"));
    line("backend", report.backend.clone());
    line(
        "tenants x requests",
        format!(
            "{} x {} = {} requests in {} ms",
            report.tenants,
            report.requests / u64::from(report.tenants.max(1)),
            report.requests,
            report.elapsed_ms
        ),
    );
    line(
        "allocations",
        format!(
            "{} (pool hits {}, hit rate {:.1}%)",
            c.allocations,
            c.pool_hits,
            s.pool_hit_rate * 100.0
        ),
    );
    line("frees", c.frees.to_string());
    line(
        "bytes scrubbed",
        format!(
            "{:.1} MiB in {} scrubs, {} batches",
            mib(c.bytes_scrubbed),
            c.scrubs,
            // The KV scrubs' batches are counted on the KV row's calls.
            c.scrub_batches.saturating_sub(c.kv_scrub_batches)
        ),
    );
    line(
        "verifications",
        format!(
            "passed {}, failed {}, residue read in {}",
            c.verifications_passed, c.verifications_failed, c.residue_detected
        ),
    );
    line(
        "quarantined",
        format!(
            "{} (blocks returned to the backend: {})",
            c.quarantined, c.released
        ),
    );
    line("invalid frees", c.invalid_frees.to_string());
    let latency = if s.scrub_latency.count == 0 {
        // Only blocks that went back to the pool are timed (a policy may release every one).
        "none measured (no freed block went back to the pool)".to_string()
    } else {
        format!(
            "p50 {} µs, p95 {} µs, max {} µs",
            s.scrub_latency.p50_us, s.scrub_latency.p95_us, s.scrub_latency.max_us
        )
    };
    line("scrub latency (free→clean)", latency);
    line(
        "new allocations read back",
        format!(
            "{}, with residue: {}",
            report.allocations_checked, report.allocations_with_residue
        ),
    );
    line(
        "paged KV blocks read back",
        format!(
            "{}, with residue: {} ({} scrub_blocks calls; blocks retired: {})",
            report.kv_blocks_checked,
            report.kv_blocks_with_residue,
            c.kv_scrub_calls,
            report.kv_blocks_retired
        ),
    );
    line(
        "eviction gate",
        if report.kv_gate == KvGateMode::Off {
            "off (KVH_KV_GATE=off): claims are not checked; no request was preempted".to_string()
        } else if report.kv_gate_scope == KvGateScope::Tenant {
            "on, per tenant (KVH_KV_GATE_SCOPE=tenant): no request was preempted".to_string()
        } else {
            let mode = if report.kv_gate == KvGateMode::Enforce {
                "enforce (refused, then scrubbed by the engine)"
            } else {
                "scrub (scrubbed inside the claim)"
            };
            if report.preemption_simulated {
                format!(
                    "{mode}: {} blocks released unscrubbed by preempted requests; {} taken \
                     again, {} caught by the gate before their next request",
                    report.kv_blocks_released_unscrubbed,
                    report.kv_blocks_reclaimed_unscrubbed,
                    report.kv_blocks_caught_by_gate
                )
            } else {
                format!(
                    "{mode}: no request was preempted (a tenant's fourth request is: run \
                     --requests 4 or more to see the gate catch its blocks)"
                )
            }
        },
    );
    line("anomalies", anomalies_line(s));
    if let Some(d) = &report.fault_drill {
        line(
            "fault drill",
            format!(
                "caught: {}, quarantined and never reused: {}, KV block named and retired: {}",
                yes(d.caught),
                yes(d.quarantined),
                yes(d.kv_caught)
            ),
        );
        line("", d.detail.clone());
    }
    if report.log_write_errors > 0 {
        line(
            "forensic log",
            format!(
                "{} write errors (last: {}): the log may not verify",
                report.log_write_errors,
                report.log_last_error.as_deref().unwrap_or("not kept")
            ),
        );
    }
    if report.log_records_lost > 0 {
        line(
            "forensic log",
            format!(
                "{} records LOST (could not be written): the log is missing part of the run",
                report.log_records_lost
            ),
        );
    }
    let verdict = if report.passed() {
        "PASS: every allocation read zero; no request saw another's bytes"
    } else {
        "FAIL: see the figures above"
    };
    out.push_str(&format!("{verdict}\n"));
    out
}

/// The anomaly detector's records by signal, from the stats' `anomaly` field.
fn anomalies_line(s: &Stats) -> String {
    let Some(a) = &s.anomaly else {
        return "detector not running".into();
    };
    if a.get("enabled").and_then(serde_json::Value::as_bool) != Some(true) {
        return "detector off (KVH_ANOMALY=off)".into();
    }
    let total = a
        .get("anomalies")
        .and_then(serde_json::Value::as_u64)
        .unwrap_or(0);
    let fired: Vec<String> = a
        .get("by_signal")
        .and_then(serde_json::Value::as_object)
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| v.as_u64().filter(|&n| n > 0).map(|n| format!("{k} {n}")))
        .collect();
    if fired.is_empty() {
        "none".into()
    } else {
        format!("{total} ({})", fired.join(", "))
    }
}

fn yes(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "NO"
    }
}

/// Whether [`stderr_progress`] left its line open (no newline yet): a run that ends early
/// ends that line first ([`end_progress_line`]), so that what is said next starts a line of
/// its own.
static PROGRESS_LINE_OPEN: AtomicBool = AtomicBool::new(false);

/// Ends the progress line [`stderr_progress`] left open, if any.
pub fn end_progress_line() {
    if PROGRESS_LINE_OPEN.swap(false, Ordering::Relaxed) {
        crate::say(format_args!(""));
    }
}

/// A progress callback that prints a bar on stderr when it is a terminal, and nothing
/// otherwise (logs stay clean).
pub fn stderr_progress() -> impl Fn(u64, u64) + Sync {
    use std::io::IsTerminal;
    let tty = std::io::stderr().is_terminal();
    let last = std::sync::Mutex::new(Instant::now() - Duration::from_secs(1));
    move |done, total| {
        if !tty {
            return;
        }
        let mut last = last.lock().unwrap_or_else(|p| p.into_inner());
        if done == total || last.elapsed() > Duration::from_millis(100) {
            *last = Instant::now();
            crate::say_text(format_args!("\r  requests {done}/{total}"));
            PROGRESS_LINE_OPEN.store(true, Ordering::Relaxed);
            if done == total {
                end_progress_line();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::host::HostBackend;

    fn small(inject_fault: bool) -> DemoReport {
        small_with(inject_fault, Config::default())
    }

    fn small_with(inject_fault: bool, config: Config) -> DemoReport {
        let opts = DemoOptions {
            tenants: 2,
            // Every fourth request of a tenant is preempted without a scrub.
            requests_per_tenant: 8,
            decode_tokens: 64,
            inject_fault,
            ..DemoOptions::default()
        };
        let backend: Arc<dyn Backend> = HostBackend::new();
        run(
            backend,
            config,
            None,
            &opts,
            &|_, _| {},
            &AtomicBool::new(false),
        )
        .expect("demo runs")
    }

    /// Every gate setting passes: under `enforce` the engine scrubs what the gate refuses;
    /// per tenant, or with the gate off, no request is preempted without a scrub.
    #[test]
    fn the_demo_passes_under_every_gate_setting() {
        for (mode, scope, preempts) in [
            (KvGateMode::Enforce, KvGateScope::Request, true),
            (KvGateMode::Scrub, KvGateScope::Tenant, false),
            (KvGateMode::Off, KvGateScope::Request, false),
        ] {
            let config = Config {
                kv_gate: mode,
                kv_gate_scope: scope,
                ..Config::default()
            };
            let r = small_with(false, config);
            assert!(r.passed(), "{mode:?} {scope:?}: {}", render(&r));
            assert_eq!(r.preemption_simulated, preempts);
            assert_eq!(r.kv_blocks_released_unscrubbed > 0, preempts);
            if mode == KvGateMode::Enforce {
                assert_eq!(r.stats.counters.kv_gate_scrubbed_blocks, 0);
                assert!(r.stats.counters.kv_claims_refused > 0);
            }
        }
    }

    /// A failed block is quarantined or retired and never reads back dirty, so a failure
    /// the drill did not cause must fail the run by itself.
    #[test]
    fn a_verification_failure_outside_the_drill_fails_the_run() {
        let clean = small(false);
        assert!(clean.passed());
        let mut r = clean.clone();
        r.stats.counters.verifications_failed = 1;
        assert!(!r.passed());
        let mut r = clean.clone();
        r.stats.counters.kv_blocks_failed = 1;
        r.kv_blocks_retired = 1;
        assert!(!r.passed());
        // A block released unscrubbed that reached its next request without the gate's scrub.
        let mut r = clean.clone();
        r.kv_blocks_caught_by_gate = r.kv_blocks_reclaimed_unscrubbed.saturating_sub(1);
        assert!(r.kv_blocks_reclaimed_unscrubbed > 0 && !r.passed());
        let drilled = small(true);
        assert!(drilled.passed());
        let mut r = drilled;
        r.stats.counters.verifications_failed = 2;
        assert!(!r.passed());
    }

    /// Every allocation the demo makes is read back, the fault drill's included, so the
    /// "read back" line accounts for all of them.
    #[test]
    fn every_allocation_is_read_back_and_the_drill_is_caught() {
        for inject_fault in [false, true] {
            let r = small(inject_fault);
            assert!(r.passed(), "{}", render(&r));
            assert_eq!(r.allocations_checked, r.stats.counters.allocations);
            assert_eq!(r.allocations_with_residue, 0);
            // Every request took at least one paged block; each was read back.
            assert!(r.kv_blocks_checked >= 6, "{}", r.kv_blocks_checked);
            assert_eq!(r.kv_blocks_with_residue, 0);
            // The cache's first scrub, the engine's scrubs of blocks not preempted (the
            // drill's two among them: read back as a request's are), and the gate's.
            let c = &r.stats.counters;
            assert_eq!(
                c.kv_blocks_scrubbed,
                2 * PAGED_BLOCKS_PER_TENANT + r.kv_blocks_checked - r.kv_blocks_released_unscrubbed
                    + c.kv_gate_scrubbed_blocks
            );
            assert!(r.kv_blocks_released_unscrubbed > 0);
            assert_eq!(r.kv_blocks_caught_by_gate, r.kv_blocks_reclaimed_unscrubbed);
            // The cache was scrubbed whole at start: every block the gate scrubbed had an
            // owner, and changed it.
            assert_eq!(c.kv_gate_owner_changed_blocks, c.kv_gate_scrubbed_blocks);
            assert!(c.kv_gate_owner_changed_blocks >= r.kv_blocks_caught_by_gate);
            assert_eq!(r.kv_blocks_retired, u64::from(inject_fault));
            if let Some(d) = &r.fault_drill {
                assert!(d.caught && d.quarantined && d.kv_caught, "{d:?}");
                assert_eq!((d.checked, d.with_residue), (65, 0));
            }
        }
    }

    /// The drill's failures trip the anomaly detector (and the output says so); a clean run
    /// trips nothing. Neither changes the verdict.
    #[test]
    fn the_drill_shows_anomalies_and_a_clean_run_none() {
        let clean = small(false);
        let a = clean.stats.anomaly.as_ref().expect("anomaly stats");
        assert_eq!(a["enabled"], true);
        assert_eq!(a["anomalies"], 0, "{a}");
        assert!(render(&clean).contains("anomalies                   none\n"));
        let drilled = small(true);
        assert!(drilled.passed());
        let a = drilled.stats.anomaly.as_ref().expect("anomaly stats");
        // The sabotaged free read residue and failed; the sabotaged KV block failed too.
        assert_eq!(a["by_signal"]["residue"], 1, "{a}");
        assert_eq!(a["by_signal"]["verify_failed"], 1, "{a}");
        let text = render(&drilled);
        assert!(
            text.contains("residue 1") && text.contains("verify_failed 1"),
            "{text}"
        );
        // Off: said, and nothing counted.
        let opts = DemoOptions {
            tenants: 1,
            requests_per_tenant: 1,
            decode_tokens: 16,
            inject_fault: true,
            ..DemoOptions::default()
        };
        let mut config = Config::default();
        config.anomaly.enabled = false;
        let r = run(
            HostBackend::new(),
            config,
            None,
            &opts,
            &|_, _| {},
            &AtomicBool::new(false),
        )
        .expect("demo runs");
        assert!(r.passed());
        assert!(render(&r).contains("detector off"), "{}", render(&r));
    }
}

//! The caching pool: the block state machine of DESIGN.md, over a [`Backend`].
//!
//! ```text
//!   CLEAN ──malloc──▶ LIVE ──free──▶ PENDING ──scrub verified──▶ CLEAN
//!                                       │ verification failed / policy retires
//!                                       ▼
//!                                  QUARANTINED ──re-scrub (double pass, full) verified──▶ RELEASED
//! ```
//!
//! Layout: [`Allocator`] owns one `pool::DevicePool` per device behind its own mutex. The
//! pool-hit path of [`Allocator::malloc`] takes that mutex once and pops a free list; all rare
//! work (fresh memory, out-of-memory recovery, harvesting scrubs) lives in `#[cold]`
//! functions. Frees never wait: they move the block to PENDING and append it to its stream's
//! open batch. A flusher thread submits batches that reached their age limit and harvests
//! completed scrubs. Events are collected under the lock and emitted after it is dropped.

pub mod block;
pub mod kv;
pub mod kv_gate;
pub mod memory_stats;
mod panic_safe;
mod pool;
pub mod size_class;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, TryLockError, Weak};
use std::time::{Duration, Instant, SystemTime};

use crate::backend::{Backend, BackendError, StreamHandle};
use crate::config::Config;
use crate::context::Context;
use crate::events::{Event, EventKind, EventSink, InvalidFreeReason, ReleaseReason};
use crate::stats::{Accounting, Stats};

use block::{Block, Disposition};
pub use block::{BlockInfo, BlockSpan, BlockState};
pub use kv::{KvLayout, KvScrubError, KvScrubReport};
pub use kv_gate::{KvClaimError, KvClaimReport};
pub use memory_stats::MemoryStats;
use pool::{Aftermath, DevicePool, Forget, FreeKey, InFlight, Refused, Release};
use size_class::SizeClass;

/// Why an allocation failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AllocError {
    #[error("invalid allocation size {0}: sizes must be positive")]
    InvalidSize(i64),
    #[error("invalid device {device}: the backend has {count} devices")]
    InvalidDevice { device: i32, count: u32 },
    #[error("out of memory: {size} bytes on device {device}, after flushing scrubs and releasing cached blocks")]
    OutOfMemory { size: u64, device: u32 },
    #[error("stream {stream:#x} is capturing a CUDA graph and the pool has no clean block of {size} bytes; pre-allocate before capture")]
    CaptureActive { stream: u64, size: u64 },
    #[error("the allocator is shutting down")]
    ShuttingDown,
    #[error(
        "device {device} was reset (cudaDeviceReset or cudaThreadExit): the memory kvhygiene held there is \
         gone, and it serves no allocation on that device in this process any more"
    )]
    DeviceReset { device: u32 },
    #[error("backend error: {0}")]
    Backend(BackendError),
}

/// An allocation and where its memory came from ([`Allocator::malloc_with_origin`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Allocation {
    pub addr: u64,
    /// Fresh backend memory, whose zeroing was queued on the allocation's stream by this
    /// call. `false` for a pool hit: a CLEAN block, whose scrub has been observed complete,
    /// so nothing of kvhygiene's is queued for it on any stream.
    pub fresh: bool,
}

/// Why a free was refused or did not verify.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FreeError {
    #[error("invalid free of {addr:#x} on device {device}: {reason}")]
    Invalid {
        reason: InvalidFreeReason,
        addr: u64,
        device: i32,
    },
    /// The block's scrub did not verify; it is quarantined (kvh_free_checked only).
    #[error(
        "scrub of the block at {addr:#x} did not verify (a sample read non-zero, coverage \
         below the threshold, or a driver failure): the block is quarantined"
    )]
    VerifyFailed { addr: u64 },
    /// Shutdown (`kvh_shutdown`, or process exit) began before the block's scrub verified:
    /// no scrub runs any more, so the block is left unscrubbed and never reused (leaked).
    #[error(
        "block at {addr:#x} freed, but its scrub cannot be waited for: the allocator was shut \
         down (kvh_shutdown, or process exit began), so no scrub runs any more; the block is \
         never reused"
    )]
    ShutDown { addr: u64 },
    #[error("backend error while waiting for the scrub: {0}")]
    Backend(BackendError),
}

/// Why [`Allocator::mark_ipc_exported`] refused a pointer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IpcExportError {
    /// Not inside any block the allocator holds: memory of the runtime or of another
    /// allocator, whose export is none of kvhygiene's business.
    #[error("{addr:#x} is not inside memory kvhygiene holds")]
    UnknownPointer { addr: u64 },
    /// Inside a block that is not handed out (freed, pooled or quarantined): its memory is
    /// the pool's, and would be the next owner's, so it must not be exported.
    #[error(
        "{addr:#x} is inside a kvhygiene block that is not allocated (it is {state}): its \
         memory is the pool's, not the caller's, and must not be exported"
    )]
    NotLive { addr: u64, state: &'static str },
}

/// A free that was accepted, with what it noticed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FreeReport {
    /// The caller's size differed from the block table's (the block was freed regardless).
    pub size_mismatch: bool,
}

struct Inner {
    backend: Arc<dyn Backend>,
    config: Config,
    sink: Option<Arc<dyn EventSink>>,
    pools: Box<[Mutex<DevicePool>]>,
    next_block_id: AtomicU64,
    next_seq: AtomicU64,
    /// First asynchronous backend error seen (sticky), for stats and `kvh_last_error`.
    async_error: Mutex<Option<String>>,
    /// Exit (or `shutdown`) has begun; shared with each pool, which submits nothing after.
    shutting_down: Arc<AtomicBool>,
    /// Per device: the process reset its context (`Allocator::reset_device`), and every
    /// allocation in it is gone. Set under the device's pool lock.
    reset: Box<[AtomicBool]>,
    /// The eviction gate's ledgers of paged KV caches (`kv_gate.rs`).
    kv_ledgers: Mutex<kv_gate::Ledgers>,
    /// KV scrub batches submitted and not yet waited for, on every device: each holds a batch
    /// slot, which a KV call on a full device may wait for (`kv.rs`).
    kv_batches_in_flight: AtomicU64,
    /// Unix seconds (to the millisecond) at which this allocator started: its statistics'
    /// `started_at`, which tells a restart from a total that did not move.
    started_at: f64,
    /// The callers' handles (`Allocator` clones, the flusher's view not counted): the drop of
    /// the last one scrubs what is still waiting (`Allocator`'s `Drop`).
    handles: AtomicUsize,
    /// The process that made the allocator: a forked child's drop of its copy does nothing.
    pid: u32,
    /// The flusher thread, once started: unparked when work arrives while it sleeps idle.
    flusher: OnceLock<std::thread::Thread>,
    /// Set by the flusher before it looks for work on every device and parks, idle, until
    /// its next housekeeping (`spawn_flusher`); a pool lock released with work pending while
    /// it is set wakes the flusher ([`PoolGuard`]). Shared, so the parked flusher clears it
    /// without holding the allocator.
    flusher_idle: Arc<AtomicBool>,
    /// Run after the record of a fail-closed stop, just before the abort
    /// ([`Allocator::on_fail_closed`]).
    fail_closed_hook: OnceLock<Box<dyn Fn() + Send + Sync>>,
}

impl Inner {
    /// Wakes the flusher if it is parked (or makes its next park return at once).
    fn wake_flusher(&self) {
        if let Some(flusher) = self.flusher.get() {
            flusher.unpark();
        }
    }

    /// Whether any device has a batch open or in flight, or a re-scrub waiting: work the
    /// flusher must not park on. Takes each pool lock in turn, as plain locks: a
    /// [`PoolGuard`] would wake the flusher that asks.
    fn has_pending_work(&self) -> bool {
        self.pools.iter().any(|pool| {
            pool.lock()
                .unwrap_or_else(|p| p.into_inner())
                .has_pending_work()
        })
    }
}

/// A device's pool, locked. Every change to a pool is made under one, so its release is
/// where work for the flusher appears (a batch opened, a scrub submitted, a re-scrub
/// queued): when the flusher is parked idle, that release wakes it, which keeps the time
/// bound of a batch (`batch_max_delay_us`) while an idle allocator's flusher sleeps.
struct PoolGuard<'a> {
    pool: MutexGuard<'a, DevicePool>,
    inner: &'a Inner,
}

impl std::ops::Deref for PoolGuard<'_> {
    type Target = DevicePool;
    fn deref(&self) -> &DevicePool {
        &self.pool
    }
}

impl std::ops::DerefMut for PoolGuard<'_> {
    fn deref_mut(&mut self) -> &mut DevicePool {
        &mut self.pool
    }
}

impl Drop for PoolGuard<'_> {
    fn drop(&mut self) {
        // Still under the lock. The flusher sets `flusher_idle` (SeqCst) before it locks each
        // pool to look for work: either it saw this pool's work, or it looked first, and then
        // this load, ordered after its look by the lock, sees the flag set.
        if self.inner.flusher_idle.load(Ordering::SeqCst) && self.pool.has_pending_work() {
            self.inner.wake_flusher();
        }
    }
}

/// How many batches of frees made after it began a whole-pool wait (`Allocator::drain_pool`)
/// also waits for, beside the older work: enough for the memory that threads free meanwhile to
/// reach out-of-memory recovery and `empty_cache`, and a bound on the wait however fast they
/// free. (A bound in rounds is none: each round would wait for all that was freed during the
/// one before, which grows without end once frees outpace scrubs.)
const NEWER_BATCHES: usize = 256;

/// The batches a `wait_and_apply` has taken and not yet waited on: put back in the pool
/// (`DevicePool::put_back`) if the thread unwinds first, for another thread or the flusher to
/// apply. Only pool state is touched here: no backend call, no event.
struct NotWaited<'a> {
    alloc: &'a Allocator,
    dev: u32,
    batches: std::collections::VecDeque<InFlight>,
}

impl<'a> NotWaited<'a> {
    /// Guards `batches` from the moment they leave the pool: made under the pool lock, as the
    /// last step of the pass that takes them (its drop takes the lock), so that the events
    /// that pass settles, which a sink may unwind out of, cannot lose them.
    fn new(alloc: &'a Allocator, dev: u32, batches: impl IntoIterator<Item = InFlight>) -> Self {
        NotWaited {
            alloc,
            dev,
            batches: batches.into_iter().collect(),
        }
    }
}

impl Drop for NotWaited<'_> {
    fn drop(&mut self) {
        if self.batches.is_empty() {
            return;
        }
        let mut pool = self.alloc.pool(self.dev);
        for batch in self.batches.drain(..).rev() {
            pool.put_back(batch);
        }
    }
}

/// The aftermath of a pass under the pool lock, settled if the pass unwinds: blocks taken out
/// for release would otherwise leave the pool's figures without going back to the backend or
/// into the pool. No cost on the normal path, where `with_pool` takes the aftermath out and
/// settles it itself.
struct SettleOnUnwind<'a> {
    alloc: &'a Allocator,
    dev: u32,
    after: Aftermath,
}

impl Drop for SettleOnUnwind<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let after = std::mem::take(&mut self.after);
            // A second panic out of a destructor while unwinding would abort the process (an
            // event sink's: the backend's calls do not panic): caught, the first goes on.
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.alloc.settle(self.dev, after)
            }));
        }
    }
}

/// The allocator. Cheap to clone (shares one pool set); `Send + Sync`.
///
/// Dropping the last clone is an [`Allocator::empty_cache`] and a stop: it waits for the
/// scrub of every block freed (a free never waits, and its block may still be in an open
/// batch), returns the clean blocks to the backend, and stops this allocator, not the backend
/// (which may serve another: [`Allocator::shutdown`] stops both, and an allocator whose
/// backend another one stopped is shut down at the backend's first answer). Blocks still LIVE are
/// leaked, as at shutdown. In a forked child, the drop of a copy inherited from the parent
/// does nothing.
pub struct Allocator {
    inner: Arc<Inner>,
    /// A caller's handle, counted in `Inner::handles`; the flusher's view of the allocator
    /// during one of its passes is not, so that it never runs the last handle's drop.
    counted: bool,
}

impl Clone for Allocator {
    fn clone(&self) -> Self {
        // Relaxed suffices for an increment made through a live handle (as `Arc::clone`).
        self.inner.handles.fetch_add(1, Ordering::Relaxed);
        Allocator {
            inner: self.inner.clone(),
            counted: true,
        }
    }
}

impl Drop for Allocator {
    fn drop(&mut self) {
        // AcqRel: the last handle's drop sees every other handle's frees (as `Arc`'s drop).
        if !self.counted || self.inner.handles.fetch_sub(1, Ordering::AcqRel) != 1 {
            return;
        }
        // A forked child's copy: the threads that would run its scrubs are the parent's, and
        // a pool lock may have been held at the fork. The child leaves it alone, as it
        // leaves the runtime it inherited.
        if std::process::id() != self.inner.pid {
            return;
        }
        // No caller can free or allocate any more. The frees still waiting for their scrub
        // would otherwise be abandoned with the flusher, their bytes unzeroed in memory the
        // backend still holds. A destructor may run while a panic unwinds, where a second one
        // (an event sink's) would abort the process: caught, and said.
        let settled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.empty_cache();
            self.drain_everything();
        }));
        // This allocator stops; the backend does not: the caller's `Arc` may serve another
        // allocator (`shutdown`, for process exit, stops both). The flusher, parked, ends now.
        self.inner.shutting_down.store(true, Ordering::Release);
        self.inner.wake_flusher();
        if settled.is_err() {
            crate::say(format_args!(
                "kvhygiene: the allocator's drop panicked while it scrubbed what was freed; \
                 no backend call follows"
            ));
        }
    }
}

impl Allocator {
    /// An allocator over `backend` with `config`, emitting events to `sink`. Starts the flusher
    /// thread, which stops when the last clone of the allocator is dropped (after that drop
    /// scrubbed what was freed: see [`Allocator`]).
    pub fn new(
        backend: Arc<dyn Backend>,
        config: Config,
        sink: Option<Arc<dyn EventSink>>,
    ) -> Self {
        // Every call the pool makes to the backend returns, a panic included, and an answer
        // that the backend stopped shuts this allocator down (`panic_safe`).
        let shutting_down = Arc::new(AtomicBool::new(false));
        let backend: Arc<dyn Backend> =
            Arc::new(panic_safe::PanicSafe::new(backend, shutting_down.clone()));
        let pools: Box<[_]> = (0..backend.device_count())
            .map(|d| Mutex::new(DevicePool::new(d, shutting_down.clone())))
            .collect();
        let reset = pools.iter().map(|_| AtomicBool::new(false)).collect();
        let inner = Arc::new(Inner {
            backend,
            config,
            sink,
            pools,
            next_block_id: AtomicU64::new(1),
            next_seq: AtomicU64::new(1),
            async_error: Mutex::new(None),
            shutting_down,
            reset,
            kv_ledgers: Mutex::new(kv_gate::Ledgers::default()),
            kv_batches_in_flight: AtomicU64::new(0),
            started_at: crate::stats::unix_seconds(std::time::SystemTime::now()),
            handles: AtomicUsize::new(1),
            pid: std::process::id(),
            flusher: OnceLock::new(),
            flusher_idle: Arc::new(AtomicBool::new(false)),
            fail_closed_hook: OnceLock::new(),
        });
        if let Some(flusher) = spawn_flusher(Arc::downgrade(&inner)) {
            // Set once, here, before any caller can reach the pools.
            let _ = inner.flusher.set(flusher);
        }
        Allocator {
            inner,
            counted: true,
        }
    }

    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.inner.backend
    }

    // ----- malloc ---------------------------------------------------------------------------

    /// Allocates `size` bytes on `device` for use on `stream`. Every byte of the result reads
    /// zero (invariant 1).
    pub fn malloc(&self, size: i64, device: i32, stream: StreamHandle) -> Result<u64, AllocError> {
        self.malloc_with_origin(size, device, stream)
            .map(|a| a.addr)
    }

    /// As [`Allocator::malloc`], also saying whether the memory is fresh (its zeroing queued
    /// on `stream` by this call) or a pool hit (nothing queued). A front end whose callers
    /// expect memory ready on every stream (the runtime's synchronous `cudaMalloc`) waits
    /// for `stream` only after a fresh allocation.
    #[inline]
    pub fn malloc_with_origin(
        &self,
        size: i64,
        device: i32,
        stream: StreamHandle,
    ) -> Result<Allocation, AllocError> {
        let stream = stream.shared();
        let size = u64::try_from(size)
            .ok()
            .filter(|&s| s > 0)
            .ok_or(AllocError::InvalidSize(size))?;
        let dev = self.device_index(device)?;
        let class = SizeClass::of(size).ok_or(AllocError::OutOfMemory { size, device: dev })?;
        let ctx = Context::current();
        let isolation = self.inner.config.tenant_isolation;
        let key = FreeKey::new(class, &ctx, isolation);
        // Hot path: one lock, one free-list pop (two for a request whose fresh block is sized
        // to it: those wait on the exact lists).
        if let Some(addr) = self.pop_pooled(dev, size, class, key, &ctx, stream) {
            return Ok(Allocation { addr, fresh: false });
        }
        self.malloc_slow(size, dev, class, key, ctx, stream)
    }

    /// A CLEAN pooled block for the request, under one lock and with no backend call: from its
    /// class's free list, or, from [`size_class::EXACT_FIRST_BYTES`] up, from the blocks
    /// sized to their request.
    #[inline]
    fn pop_pooled(
        &self,
        dev: u32,
        size: u64,
        class: SizeClass,
        key: FreeKey,
        ctx: &Context,
        stream: StreamHandle,
    ) -> Option<u64> {
        let isolation = self.inner.config.tenant_isolation;
        let mut pool = self.pool(dev);
        pool.pop_clean(key, size, ctx, stream, isolation)
            .or_else(|| {
                (size >= size_class::EXACT_FIRST_BYTES)
                    .then(|| pop_exact(&mut pool, key, size, class, ctx, stream, isolation))
                    .flatten()
            })
    }

    /// [`AllocError::DeviceReset`] once `reset_device(dev)` has begun. The pool's own mark,
    /// set under its lock with this flag, keeps every hand-out exact (`pop_clean`,
    /// `pop_exact`, `insert_fresh`), the hot path's pop included; this check, on the slow
    /// path, spares the backend calls a refused allocation would make before it.
    fn refuse_if_reset(&self, dev: u32) -> Result<(), AllocError> {
        if self.device_was_reset(dev) {
            return Err(AllocError::DeviceReset { device: dev });
        }
        Ok(())
    }

    #[cold]
    #[inline(never)]
    fn malloc_slow(
        &self,
        size: u64,
        dev: u32,
        class: SizeClass,
        key: FreeKey,
        ctx: Context,
        stream: StreamHandle,
    ) -> Result<Allocation, AllocError> {
        if self.inner.shutting_down.load(Ordering::Acquire) {
            // Teardown that still allocates is served from verified pooled blocks (no device
            // call), the exact ones the out-of-memory path made included.
            let mut pool = self.pool(dev);
            let isolation = self.inner.config.tenant_isolation;
            return pop_exact(&mut pool, key, size, class, &ctx, stream, isolation)
                .map(|addr| Allocation { addr, fresh: false })
                .ok_or(AllocError::ShuttingDown);
        }
        self.refuse_if_reset(dev)?;
        let isolation = self.inner.config.tenant_isolation;
        // Completed scrubs may have produced a clean block; frees waiting in open batches are
        // submitted now, since malloc needs memory.
        self.with_pool(dev, |pool, backend, config, after| {
            pool.harvest(backend, config, after);
            pool.flush_open(false, backend, config, after);
        });
        // The hand-out has a pass of its own, with nothing to settle after it: a block handed
        // out in a pass whose events then unwound (a sink's panic) would stay LIVE with no
        // holder.
        let hit = {
            let mut pool = self.pool(dev);
            pool.pop_clean(key, size, &ctx, stream, isolation)
                .or_else(|| pop_exact(&mut pool, key, size, class, &ctx, stream, isolation))
        };
        if let Some(addr) = hit {
            return Ok(Allocation { addr, fresh: false });
        }
        // Exit may have begun during the flush above: no backend call after it (invariant 6).
        if self.inner.shutting_down.load(Ordering::Acquire) {
            return Err(AllocError::ShuttingDown);
        }
        // As may a reset of the device, which made the pops above miss.
        self.refuse_if_reset(dev)?;
        let fresh_class = SizeClass::for_fresh(size, class);
        let fresh = self
            .refuse_capture(size, dev, stream)
            .and_then(|()| self.allocate_fresh(size, dev, fresh_class, &ctx, stream));
        match fresh {
            Err(AllocError::OutOfMemory { .. }) => {
                self.malloc_after_oom(size, dev, class, key, ctx, stream)
            }
            other => other.map(|addr| Allocation { addr, fresh: true }),
        }
    }

    /// A stream capturing a CUDA graph must not see driver allocations: refused. The query
    /// is the first call that opens a device, which may run out of memory: that is an
    /// allocation out of memory, which the caller recovers from.
    fn refuse_capture(&self, size: u64, dev: u32, stream: StreamHandle) -> Result<(), AllocError> {
        match self.inner.backend.is_capturing(dev, stream) {
            Ok(false) => Ok(()),
            Ok(true) => Err(AllocError::CaptureActive {
                stream: stream.0,
                size,
            }),
            Err(e) => Err(self.allocation_failed(size, dev, e)),
        }
    }

    /// Out of memory: wait for every scrub, retry the pool, release cached blocks, retry.
    #[cold]
    fn malloc_after_oom(
        &self,
        size: u64,
        dev: u32,
        class: SizeClass,
        key: FreeKey,
        ctx: Context,
        stream: StreamHandle,
    ) -> Result<Allocation, AllocError> {
        self.refuse_if_reset(dev)?;
        // PyTorch's `num_alloc_retries`: a refused allocation that leads to a flush of the
        // cache and a retry, whatever the retry gives.
        self.with_pool(dev, |pool, _, _, _| pool.memory.num_alloc_retries += 1);
        self.drain_pool(dev, self.scrub_horizon());
        let isolation = self.inner.config.tenant_isolation;
        let hit = self.with_pool(dev, |pool, _, _, after| {
            pool.pop_clean(key, size, &ctx, stream, isolation)
                .or_else(|| pop_exact(pool, key, size, class, &ctx, stream, isolation))
                .or_else(|| {
                    pool.release_clean(ReleaseReason::OutOfMemory, after);
                    None
                })
        });
        if let Some(addr) = hit {
            self.with_pool(dev, |pool, _, _, _| pool.stats.counters.oom_recoveries += 1);
            return Ok(Allocation { addr, fresh: false });
        }
        // Exit may have begun while the pool drained: no backend call after it.
        if self.inner.shutting_down.load(Ordering::Acquire) {
            return Err(AllocError::ShuttingDown);
        }
        self.refuse_if_reset(dev)?;
        // The capture query again: the first may have failed before it could answer.
        let result = self
            .refuse_capture(size, dev, stream)
            .and_then(|()| self.allocate_fresh_or_exact(size, dev, class, &ctx, stream));
        let result = match result {
            Err(AllocError::OutOfMemory { .. }) if self.inner.backend.devices_share_memory() => {
                self.retry_after_releasing_other_devices(size, dev, class, &ctx, stream)
            }
            other => other,
        };
        // Another error on the retry (a driver fault, exit begun) is not a lack of memory:
        // `allocate_fresh` counted a fault as a backend error.
        self.with_pool(dev, |pool, _, _, _| match result {
            Ok(_) => pool.stats.counters.oom_recoveries += 1,
            Err(AllocError::OutOfMemory { .. }) => {
                pool.stats.counters.out_of_memory += 1;
                pool.memory.num_ooms += 1;
            }
            Err(_) => {}
        });
        result.map(|addr| Allocation { addr, fresh: true })
    }

    /// On a backend whose devices share one memory, the clean blocks the other devices cache
    /// hold room this allocation could have: after a refusal that releasing this device's own
    /// cache did not cure, every other device's scrubs are waited for and its clean blocks
    /// released (as `kvh_empty_cache` does, recorded with reason `out_of_memory`), and the
    /// allocation is tried once more. One device's pool lock at a time, none held on entry.
    #[cold]
    fn retry_after_releasing_other_devices(
        &self,
        size: u64,
        dev: u32,
        class: SizeClass,
        ctx: &Context,
        stream: StreamHandle,
    ) -> Result<u64, AllocError> {
        let horizon = self.scrub_horizon();
        self.on_every_device(|other| {
            if other == dev || self.inner.shutting_down.load(Ordering::Acquire) {
                return;
            }
            self.drain_pool(other, horizon);
            self.with_pool(other, |pool, _, _, after| {
                pool.release_clean(ReleaseReason::OutOfMemory, after)
            });
        });
        // Exit may have begun while the other pools drained: no backend call after it.
        if self.inner.shutting_down.load(Ordering::Acquire) {
            return Err(AllocError::ShuttingDown);
        }
        self.refuse_if_reset(dev)?;
        // The capture query again, as before every backend allocation: the one before may
        // have been the call that ran out of memory, never answered.
        self.refuse_capture(size, dev, stream)
            .and_then(|()| self.allocate_fresh_or_exact(size, dev, class, ctx, stream))
    }

    /// [`Self::allocate_fresh`] at the capacity a fresh block of `class` takes
    /// ([`SizeClass::for_fresh`]), then, when the backend is out of memory for it and that is
    /// the class's, at the request's own size rounded to the driver's granule
    /// ([`SizeClass::exact`]): the device may hold the request but not its class's capacity,
    /// up to 12.5% more. Only after the capture query answered, and never once exit began.
    fn allocate_fresh_or_exact(
        &self,
        size: u64,
        dev: u32,
        class: SizeClass,
        ctx: &Context,
        stream: StreamHandle,
    ) -> Result<u64, AllocError> {
        let first = SizeClass::for_fresh(size, class);
        let fresh = self.allocate_fresh(size, dev, first, ctx, stream);
        let smaller = SizeClass::exact(size).filter(|e| e.capacity < first.capacity);
        let (Err(AllocError::OutOfMemory { .. }), Some(exact)) = (&fresh, smaller) else {
            return fresh;
        };
        if self.inner.shutting_down.load(Ordering::Acquire) {
            return Err(AllocError::ShuttingDown);
        }
        self.allocate_fresh(size, dev, exact, ctx, stream)
    }

    /// Fresh memory from the backend, zeroed once before first hand-out (invariant 1).
    fn allocate_fresh(
        &self,
        size: u64,
        dev: u32,
        class: SizeClass,
        ctx: &Context,
        stream: StreamHandle,
    ) -> Result<u64, AllocError> {
        // A reset of the device may have begun in the calls before this one.
        self.refuse_if_reset(dev)?;
        let backend = &self.inner.backend;
        let addr = backend
            .allocate(dev, class.capacity)
            .map_err(|e| self.allocation_failed(size, dev, e))?;
        let now = Instant::now();
        let block = Block {
            id: self.inner.next_block_id.fetch_add(1, Ordering::Relaxed),
            device: dev,
            addr,
            class,
            requested: size,
            state: BlockState::Live,
            owner: ctx.clone(),
            alloc_stream: stream,
            free_stream: stream,
            recorded_streams: Vec::new(),
            reuse_count: 1,
            allocated_at: now,
            state_since: now,
            scrub_seq: 0,
            disposition: Disposition::Reuse,
            scrub_in_flight: false,
            live_ttl_reported: false,
            ipc_exported: false,
        };
        // Exit may have begun while the backend allocated: no backend call after it
        // (invariant 6). The memory, never zeroed and never handed out, is left to the
        // process's end, outside the pool's table (it holds nobody's data, and nothing of it
        // is left to scrub).
        if self.inner.shutting_down.load(Ordering::Acquire) {
            return Err(AllocError::ShuttingDown);
        }
        if let Err(e) = backend.zero_fresh(dev, addr, class.capacity, stream) {
            // Never hand out memory that was not zeroed: give it back, unless exit began (the
            // zeroing said so, or the flag does), which leaves it as above.
            let exiting = matches!(e, BackendError::ShuttingDown)
                || self.inner.shutting_down.load(Ordering::Acquire);
            if exiting {
                return Err(AllocError::ShuttingDown);
            }
            if matches!(e, BackendError::StreamCapturing { .. }) {
                // A capture began since the capture query: no `cuMemFree` while it lasts.
                let seq = self.inner.next_seq.fetch_add(1, Ordering::Relaxed);
                let reset = self.with_pool(dev, |pool, backend, config, after| {
                    pool.insert_unzeroed(block, seq, backend, config, after);
                    pool.is_reset()
                });
                if reset {
                    // The device's reset began meanwhile. The memory stays in the table
                    // all the same (nothing is handed out of it), to be scrubbed as the
                    // device's freed blocks are; it goes with the reset.
                    return Err(AllocError::DeviceReset { device: dev });
                }
                return Err(self.allocation_failed(size, dev, e));
            }
            let returned = backend.release(dev, addr, class.capacity);
            self.count_unkept_device_alloc(dev, returned.is_ok());
            if let Err(release) = returned {
                // A failed release leaks the memory and counts a backend error.
                let _ = self.backend_fault(dev, release);
            }
            return Err(self.allocation_failed(size, dev, e));
        }
        if !self.pool(dev).insert_fresh(block) {
            // The device's reset began meanwhile: the memory, zeroed and never handed out,
            // goes back to the device while its context still lives (the reset comes after
            // the shutdown, and no backend call is made once exit began).
            if !self.inner.shutting_down.load(Ordering::Acquire) {
                let returned = backend.release(dev, addr, class.capacity);
                self.count_unkept_device_alloc(dev, returned.is_ok());
                if let Err(release) = returned {
                    let _ = self.backend_fault(dev, release);
                }
            }
            return Err(AllocError::DeviceReset { device: dev });
        }
        Ok(addr)
    }

    /// PyTorch's device allocation counts for memory obtained from the backend that never
    /// entered the pool: one allocation, and one free when it went back (`returned`).
    #[cold]
    fn count_unkept_device_alloc(&self, dev: u32, returned: bool) {
        self.with_pool(dev, |pool, _, _, _| {
            pool.memory.num_device_alloc += 1;
            pool.memory.num_device_free += u64::from(returned);
        });
    }

    // ----- free -----------------------------------------------------------------------------

    /// Frees `ptr`. Never waits: the scrub is batched. `size` is checked against the block
    /// table, never trusted. `ptr == 0` is a no-op, as is the first free of a block that
    /// [`Allocator::reset_device`] freed on its holder's behalf.
    pub fn free(
        &self,
        ptr: u64,
        size: i64,
        device: i32,
        stream: StreamHandle,
    ) -> Result<FreeReport, FreeError> {
        self.free_inner(ptr, size, device, stream, false)
            .map(|(report, _)| report)
    }

    /// Frees `ptr` and waits for its scrub's verification (the synchronous-verification mode).
    /// Returns [`FreeError::VerifyFailed`] when the scrub did not verify (the block is then
    /// quarantined); a block whose scrub verified is `Ok`, also when a policy then keeps it
    /// from reuse (`idle_ttl_ms <= 0`).
    pub fn free_checked(
        &self,
        ptr: u64,
        size: i64,
        device: i32,
        stream: StreamHandle,
    ) -> Result<FreeReport, FreeError> {
        let (report, freed) = self.free_inner(ptr, size, device, stream, true)?;
        let Some((dev, seq)) = freed else {
            return Ok(report);
        };
        self.verdict(ptr, dev, seq).map(|()| report)
    }

    /// Waits for the verdict of the watched scrub `seq` of the block at `ptr` on `dev`
    /// (flushing its batch), as `free_checked` answers it.
    fn verdict(&self, ptr: u64, dev: u32, seq: u64) -> Result<(), FreeError> {
        loop {
            // A verdict applied is reported, also when exit began since.
            if let Some(passed) = self.pool(dev).take_outcome(seq) {
                return if passed {
                    Ok(())
                } else {
                    Err(FreeError::VerifyFailed { addr: ptr })
                };
            }
            if self.inner.shutting_down.load(Ordering::Acquire) {
                // No backend calls once exit has begun: the block stays PENDING (leaked).
                self.pool(dev).unwatch(seq);
                return Err(FreeError::ShutDown { addr: ptr });
            }
            let (taken, deferred) = self.with_pool(dev, |pool, backend, config, after| {
                pool.flush_block(ptr, backend, config, after);
                let deferred = pool.deferral_of(ptr, "a checked free's scrub");
                (
                    NotWaited::new(self, dev, pool.take_batch_holding(seq)),
                    deferred,
                )
            });
            if let Some(why) = deferred {
                // The backend refused the launch for now (a CUDA graph capture, where waiting
                // could deadlock the capturing thread, or no memory for the batch): the block
                // stays PENDING and its scrub runs at a later flush.
                self.pool(dev).unwatch(seq);
                return Err(FreeError::Backend(why));
            }
            if taken.batches.is_empty() {
                // Another thread is waiting on this batch with the lock dropped; it records
                // the outcome when it applies the results.
                std::thread::sleep(Duration::from_micros(50));
            } else {
                self.wait_and_apply(taken);
            }
        }
    }

    /// Returns `(report, Some((device, scrub seq)))` for an accepted free of a real block.
    /// With `watch`, the pool records the outcome of the block's scrub for the caller.
    fn free_inner(
        &self,
        ptr: u64,
        size: i64,
        device: i32,
        stream: StreamHandle,
        watch: bool,
    ) -> Result<(FreeReport, Option<(u32, u64)>), FreeError> {
        let stream = stream.shared();
        if ptr == 0 {
            return Ok((FreeReport::default(), None));
        }
        let dev = self.free_device(ptr, device)?;
        let seq = self.inner.next_seq.fetch_add(1, Ordering::Relaxed);
        let exiting = self.inner.shutting_down.load(Ordering::Acquire);
        let result = self.with_pool(dev, |pool, backend, config, after| {
            // A block a device reset freed on its holder's behalf: this, the holder's free,
            // is then done (a checked one answers the reset's scrub). One the reset has not
            // freed yet is this free's to make, here, under the same lock that takes it off
            // the reset's list.
            if let Some((by_reset, size_mismatch)) = pool.claim_freed_by_reset(ptr, size, after) {
                if !watch {
                    pool.unwatch(by_reset);
                }
                return Ok((FreeReport { size_mismatch }, by_reset));
            }
            let size_mismatch = pool.begin_free(ptr, size, stream, seq, config, after)?;
            if watch {
                pool.watch(seq);
            }
            // Once exit has begun the block stays PENDING (leaked): no backend calls.
            if !exiting {
                pool.enqueue(ptr, stream, backend, config, after);
            }
            Ok::<_, Refused>((FreeReport { size_mismatch }, seq))
        });
        match result {
            Ok((report, seq)) => Ok((report, Some((dev, seq)))),
            Err(refused) => Err(self.refused_free(refused, ptr, device, Some(dev))),
        }
    }

    /// For front ends that must not begin a free's side effects (a device synchronisation, a
    /// graph capture's refusal) before they know the free is valid: the size the block's
    /// caller asked for when `ptr` is now the start of a LIVE block of `device`, or of a block
    /// a device reset freed on its holder's behalf, which a free would accept; otherwise the
    /// free is refused and logged as [`Allocator::free`] refuses it, and its error returned.
    /// Checked under the pool lock: a block handed out again meanwhile is left alone, to be
    /// freed as any other (with the size returned).
    pub fn check_free(&self, ptr: u64, device: i32) -> Result<u64, FreeError> {
        let dev = self.free_device(ptr, device)?;
        let checked = self.with_pool(dev, |pool, _, _, _| pool.refuse_unless_live(ptr));
        checked.map_err(|refused| self.refused_free(refused, ptr, device, Some(dev)))
    }

    /// The pool index of a free's `device`, or the free refused (and logged) for naming no
    /// device of the backend.
    fn free_device(&self, ptr: u64, device: i32) -> Result<u32, FreeError> {
        self.device_index(device).map_err(|_| {
            let refused = Refused {
                reason: InvalidFreeReason::InvalidDevice,
                block: None,
                owner: None,
            };
            self.refused_free(refused, ptr, device, None)
        })
    }

    /// Turns a refused free into its event. `dev` is the pool that refused it (and counted
    /// it), or `None` when the call named no valid device.
    #[cold]
    fn refused_free(&self, refused: Refused, ptr: u64, device: i32, dev: Option<u32>) -> FreeError {
        let mut refused = refused;
        match dev {
            // Lock order: the refusing pool's lock was dropped before others are taken.
            Some(dev) if refused.reason == InvalidFreeReason::UnknownPointer => {
                let elsewhere = (0..self.inner.pools.len() as u32)
                    .filter(|&d| d != dev)
                    .find_map(|d| self.pool(d).holding(ptr));
                // The block of the other device, and its owner's ids, as a double or interior
                // free names its block: the record says whose memory the call aimed at.
                if let Some((block, owner)) = elsewhere {
                    refused = Refused {
                        reason: InvalidFreeReason::WrongDevice,
                        block: Some(block),
                        owner: Some(owner),
                    };
                }
            }
            Some(_) => {}
            // No valid device to count it on: count it on device 0's pool.
            None if !self.inner.pools.is_empty() => self.pool(0).stats.counters.invalid_frees += 1,
            None => {}
        }
        let reason = refused.reason;
        let ctx = refused.owner.unwrap_or_else(Context::current);
        self.emit(vec![Event {
            at: SystemTime::now(),
            kind: EventKind::InvalidFree {
                reason,
                device,
                caller: Context::current(),
            },
            context: ctx,
            block: refused.block,
            addr: Some(ptr),
        }]);
        FreeError::Invalid {
            reason,
            addr: ptr,
            device,
        }
    }

    /// Records that `ptr` is used on `stream` (PyTorch's record_stream): its scrub will wait
    /// for the work queued there. `ptr` may point anywhere into the block (a view's data
    /// pointer). Returns whether `ptr` is in a LIVE block of this allocator.
    pub fn record_stream(&self, ptr: u64, stream: StreamHandle) -> bool {
        let stream = stream.shared();
        (0..self.inner.pools.len() as u32).any(|d| self.pool(d).record_stream(ptr, stream))
    }

    /// Whether the allocator holds any reference to `stream` (an open batch, or a block
    /// allocated, freed or recorded on it): a front end about to destroy a stream needs to
    /// synchronise it and call [`Allocator::forget_stream`] only then. One pass over each
    /// device's block table, under its lock: for stream destruction, not a hot path.
    pub fn uses_stream(&self, stream: StreamHandle) -> bool {
        // The per-thread default stream is kept as the legacy one (`StreamHandle::shared`).
        if stream == StreamHandle::PER_THREAD {
            return false;
        }
        (0..self.inner.pools.len() as u32).any(|d| self.pool(d).uses_stream(stream))
    }

    /// The caller is about to destroy `stream`: from now on the allocator never names it to
    /// the backend. On every device, the open batches that run on `stream` or wait for it
    /// are submitted now, while it still exists; every reference a block keeps (allocation
    /// stream, freeing stream, recorded streams) is dropped, the allocation and freeing
    /// streams becoming the legacy default stream `StreamHandle(0)`, on which later scrubs
    /// and re-scrubs of those blocks then run. A batch a CUDA graph capture defers here is
    /// kept open on the legacy stream. Batches already submitted keep `stream` only as a
    /// label (their completion is polled through the ticket, never through the stream).
    ///
    /// The caller must have waited for the work it queued on `stream` before (the
    /// LD_PRELOAD interposer of `cudaStreamDestroy` synchronises it): what is moved to the
    /// legacy stream is ordered after the work of blocking streams only. One pass over each
    /// device's block table, under its lock: meant for stream destruction, not a hot path.
    /// The legacy stream itself is never forgotten (a no-op), nor the per-thread default
    /// stream, which the allocator keeps as the legacy one (`StreamHandle::shared`).
    pub fn forget_stream(&self, stream: StreamHandle) {
        self.forget(stream, true);
    }

    /// As [`Allocator::forget_stream`], for a stream whose queued work the caller could not
    /// wait for (its synchronisation failed, as after an earlier asynchronous error) and
    /// which it is destroying anyway: nothing is submitted on `stream` or after it, not even
    /// now. The open batches that run on it move to the legacy default stream, unsubmitted,
    /// as those a capture defers do in [`Allocator::forget_stream`]; their blocks stay
    /// PENDING until a later flush scrubs and verifies them (a failed scrub quarantines them,
    /// as ever). Every wait for `stream` (of an open batch, or recorded on a block) becomes a
    /// wait for the legacy stream, and the allocation and freeing streams become the legacy
    /// stream, as there: the legacy stream orders those scrubs after the work queued before
    /// on every blocking stream (`cudaStreamCreate`'s default), `stream` included, but not
    /// after a non-blocking stream's, whose work the failed synchronisation may have left
    /// running. The legacy stream itself and the per-thread default stream are never
    /// forgotten (a no-op).
    pub fn forget_unwaited_stream(&self, stream: StreamHandle) {
        self.forget(stream, false);
    }

    /// [`Allocator::forget_stream`] (`waited`) or [`Allocator::forget_unwaited_stream`].
    fn forget(&self, stream: StreamHandle, waited: bool) {
        if stream == StreamHandle::LEGACY || stream == StreamHandle::PER_THREAD {
            return;
        }
        let exiting = self.inner.shutting_down.load(Ordering::Acquire);
        let how = if !waited {
            Forget::Unwaited
        } else if exiting {
            Forget::Unsubmitted
        } else {
            Forget::Submitted
        };
        self.on_every_device(|dev| {
            self.with_pool(dev, |pool, backend, config, after| {
                pool.forget_stream(stream, how, backend, config, after)
            });
        });
    }

    /// Runs `pass` for every device in turn, each even when an earlier one unwound (an event
    /// sink's panic; the C boundary catches it): a device left out would keep what the call
    /// was to end (a forgotten stream's references, the scrubs an exit waits for). The first
    /// panic goes on once every device had its pass.
    fn on_every_device(&self, mut pass: impl FnMut(u32)) {
        let mut first = None;
        for dev in 0..self.inner.pools.len() as u32 {
            let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| pass(dev)));
            if let Err(payload) = ran {
                first.get_or_insert(payload);
            }
        }
        if let Some(payload) = first {
            std::panic::resume_unwind(payload);
        }
    }

    // ----- device reset ----------------------------------------------------------------------

    /// The process is about to reset `device`'s context (`cudaDeviceReset`), which frees
    /// every allocation in it. From now on no allocation on `device` is served, not even a
    /// clean pooled block (its memory goes with the reset). Every block still LIVE on
    /// `device` is freed now, on its holder's behalf, so that its scrub runs before the reset
    /// (at the next flush, or at the `shutdown` the caller makes next); the holder's own
    /// free of it afterwards is accepted once and does nothing. A holder's free that comes
    /// before the reset's frees it as any free does. Returns how many the reset freed: a
    /// second call (a second thread's reset) frees those the first has not reached yet.
    ///
    /// The caller synchronises the device first, as the free of each block would, and
    /// shuts the allocator down before the reset: the backend's module and buffers are in
    /// the context the reset destroys, so no backend call may follow it. An invalid device
    /// frees nothing, nor does a reset once the allocator has shut down (nothing is scrubbed
    /// any more: the blocks still handed out stay so, as at exit).
    pub fn reset_device(&self, device: u32) -> usize {
        let Some(flag) = self.inner.reset.get(device as usize) else {
            return 0;
        };
        // Once exit has begun (a shutdown, another device's reset), nothing is scrubbed any
        // more: the blocks still handed out are left as exit leaves them, LIVE, not made
        // freed blocks that no scrub will ever reach.
        let exiting = || self.inner.shutting_down.load(Ordering::Acquire);
        // Both marks under the pool lock: a hand-out after it is refused, and a holder's free
        // after it finds its block among those the reset frees.
        let listed = {
            let mut pool = self.pool(device);
            flag.store(true, Ordering::SeqCst);
            pool.mark_reset(!exiting())
        };
        // One lock per block, as a free takes: the holders' frees and the device's other
        // work go on between them. A block its holder frees first is left to that free, so
        // that one unwinding here (an event sink's panic) leaves the rest to their holders.
        let mut freed = 0;
        for addr in listed {
            if exiting() {
                break;
            }
            let seq = self.inner.next_seq.fetch_add(1, Ordering::Relaxed);
            let made = self.with_pool(device, |pool, backend, config, after| {
                let made = pool.free_for_reset(addr, seq, config, after);
                if made {
                    // Exit may have begun since the check: the pool then submits nothing
                    // (invariant 6), and the block stays PENDING, leaked.
                    pool.enqueue(addr, StreamHandle(0), backend, config, after);
                }
                made
            });
            freed += usize::from(made);
        }
        freed
    }

    /// Whether [`Allocator::reset_device`] was called for `device`.
    #[inline]
    pub fn device_was_reset(&self, device: u32) -> bool {
        self.inner
            .reset
            .get(device as usize)
            .is_some_and(|f| f.load(Ordering::SeqCst))
    }

    // ----- whole-pool operations ------------------------------------------------------------

    /// Submits every open batch and waits for the scrub of every block freed before the call
    /// (including the re-scrubs of those quarantined) to complete and be applied; frees other
    /// threads make meanwhile are submitted, not waited for. Returns the sticky asynchronous
    /// error, if any, or why the backend refused some scrubs for now.
    pub fn synchronize(&self) -> Result<(), String> {
        self.left_by_shutdown()?;
        let horizon = self.scrub_horizon();
        let mut waiting: Vec<(u32, usize)> = Vec::new();
        let mut first_why = None;
        self.on_every_device(|dev| {
            self.drain_pool(dev, horizon);
            if let Some((blocks, why)) = self.pool(dev).deferred("the scrub") {
                waiting.push((dev, blocks));
                first_why.get_or_insert(why);
            }
        });
        // Exit may have begun while this waited: what it left is never scrubbed.
        self.left_by_shutdown()?;
        if let Some(why) = first_why {
            // Their scrubs were refused for now and run at a later flush: not waited for.
            return Err(format!(
                "{} not scrubbed yet: {why}",
                blocks_waiting(&waiting)
            ));
        }
        match self
            .inner
            .async_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Nothing is scrubbed or released after shutdown: the blocks freed since, or left pending
    /// then, never are. An error saying how many, once exit has begun.
    fn left_by_shutdown(&self) -> Result<(), String> {
        match self.unscrubbed_after_shutdown() {
            0 => Ok(()),
            left => Err(format!(
                "{left} freed blocks are neither verified for reuse nor returned to the \
                 device, and never will be: shutdown (or process exit) began, and no scrub \
                 or release runs after it (the blocks are leaked, never handed out)"
            )),
        }
    }

    /// Flushes and waits for every scrub of a block freed before the call, then returns every
    /// CLEAN block to the backend.
    pub fn empty_cache(&self) {
        let horizon = self.scrub_horizon();
        self.on_every_device(|dev| {
            if self.inner.shutting_down.load(Ordering::Acquire) {
                return;
            }
            self.drain_pool(dev, horizon);
            self.with_pool(dev, |pool, _, _, after| {
                pool.release_clean(ReleaseReason::EmptyCache, after)
            });
        });
    }

    /// Orderly shutdown, before process exit: scrub and verify everything freed, then stop all
    /// backend calls. Blocks still LIVE are leaked, never released under a caller.
    pub fn shutdown(&self) {
        if self.inner.shutting_down.load(Ordering::Acquire) {
            return;
        }
        // Exit begins even after a drain unwound: a caller of shutdown is promised that no
        // backend call follows it.
        let drained =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.drain_everything()));
        self.begin_exit();
        if let Err(payload) = drained {
            std::panic::resume_unwind(payload);
        }
    }

    /// Waits for the scrub of every block freed so far, on every device (`drain_pool`).
    fn drain_everything(&self) {
        let horizon = self.scrub_horizon();
        self.on_every_device(|dev| self.drain_pool(dev, horizon));
    }

    /// Whether `shutdown` or process exit has begun: no scrub runs any more.
    pub fn is_shut_down(&self) -> bool {
        self.inner.shutting_down.load(Ordering::Acquire)
    }

    /// Freed blocks shutdown left neither reusable nor returned (none will be either): PENDING
    /// ones (unscrubbed, or verified for retirement) and QUARANTINED ones not condemned (their
    /// re-scrub not run, or verified). What makes `synchronize` fail after a shutdown.
    pub fn unscrubbed_after_shutdown(&self) -> usize {
        if !self.is_shut_down() {
            return 0;
        }
        (0..self.inner.pools.len() as u32)
            .map(|dev| self.pool(dev).unsettled_blocks())
            .sum()
    }

    /// Process exit has begun (an `atexit` handler): make no further backend calls at all
    /// (invariant 6). Pending scrubs are abandoned and their memory leaked.
    pub fn begin_exit(&self) {
        if !self.inner.shutting_down.swap(true, Ordering::AcqRel) {
            self.inner.backend.shutdown();
            self.inner.wake_flusher();
        }
    }

    /// The scrub sequence the next free gets: every free that returned before this is read
    /// has a smaller one (one atomic, so its order is the order of the frees' increments).
    fn scrub_horizon(&self) -> u64 {
        self.inner.next_seq.load(Ordering::Acquire)
    }

    /// Submits open batches of `dev` and waits, with the lock released, for the scrub of
    /// every block freed before scrub sequence `horizon` (its re-scrub too, if it is
    /// quarantined), applying results as they complete. A batch another thread waits on is
    /// waited for (that thread applies it) when it holds such a block. Blocks whose scrub
    /// the backend refused for now stay in open batches (the caller asks
    /// `DevicePool::deferred`). Returns early once exit has begun.
    ///
    /// It also waits for up to `NEWER_BATCHES` batches, oldest first, of frees made after
    /// `horizon`: the memory they free is what out-of-memory recovery and `empty_cache` are
    /// after, and what `shutdown` would otherwise abandon. Beyond them only the older work is
    /// waited for, so other threads that keep freeing, however fast, can neither keep the
    /// caller waiting nor make it stop before that work is done.
    fn drain_pool(&self, dev: u32, horizon: u64) {
        let mut newer_left = NEWER_BATCHES;
        // Submitting is done again only after a round that applied something: a batch the
        // backend refused for now is not submitted every 50 µs while this waits for another
        // thread (each refusal is counted).
        let mut submit = true;
        while !self.inner.shutting_down.load(Ordering::Acquire) {
            let (taken, newer, elsewhere) = self.with_pool(dev, |pool, backend, config, after| {
                if submit {
                    pool.flush_open(false, backend, config, after);
                    pool.submit_rescrubs(backend, config, after);
                }
                // Only the older work is waited for in other threads' hands: a stream of
                // checked frees could keep a newer batch out at every moment. (Asked before
                // taking; it matters only when nothing is taken.)
                let elsewhere = pool.held_elsewhere_before(horizon);
                let (taken, newer) = pool.take_batches_before(horizon, newer_left);
                (NotWaited::new(self, dev, taken), newer, elsewhere)
            });
            if taken.batches.is_empty() {
                if !elsewhere {
                    if !submit {
                        // The wait is over: one more submitting round, for a batch refused
                        // while it lasted whose refusal may have ended (a capture).
                        submit = true;
                        continue;
                    }
                    break;
                }
                submit = false;
                std::thread::sleep(Duration::from_micros(50));
                continue;
            }
            submit = true;
            newer_left -= newer;
            self.wait_and_apply(taken);
        }
    }

    /// Waits for batches taken out of the pool (lock released), then applies each.
    ///
    /// A taken batch must come back to the pool whatever happens, or every later whole-pool
    /// wait (an exit's included) and every checked free of its blocks would wait for it
    /// forever. A backend whose wait panics gives the batch an error, as a failed wait does
    /// (its blocks go to quarantine and a re-scrub); a panic after that (an event sink; the C
    /// boundary catches it) puts the batches not yet waited on back in the pool (`NotWaited`).
    fn wait_and_apply(&self, mut not_waited: NotWaited<'_>) {
        let dev = not_waited.dev;
        while let Some(mut batch) = not_waited.batches.pop_front() {
            // A backend whose wait panics answers an error (`PanicSafe`): a failed wait.
            let results = batch.wait();
            self.with_pool(dev, |pool, backend, config, after| {
                pool.returned(&batch);
                pool.complete(batch, results, backend, config, after)
            });
        }
    }

    /// One flusher tick: submit stale batches, harvest, re-scrub; with `trim`, also release
    /// blocks idle past the idle TTL (a scan of the free lists, so done less often); with
    /// `watch_live`, also report blocks LIVE past the live TTL (a scan of the block table).
    ///
    /// Returns whether a device's pass panicked (a pool or sink bug: the backend's calls do
    /// not panic; the other devices' passes run all the same), and whether work may be left
    /// for the next tick: a device with work after its pass, a pass that panicked, or a tick
    /// cut short by shutdown. (The flusher parks only when there is none, after looking again
    /// with its idle flag set.)
    fn tick(&self, trim: bool, watch_live: bool) -> (bool, bool) {
        let idle_ttl = u64::try_from(self.inner.config.idle_ttl_ms)
            .ok()
            .filter(|_| trim)
            .map(Duration::from_millis);
        let watch_live = watch_live && self.inner.config.live_ttl_ms > 0;
        let (mut panicked, mut work_left) = (false, false);
        for dev in 0..self.inner.pools.len() as u32 {
            if self.inner.shutting_down.load(Ordering::Acquire) {
                return (panicked, true);
            }
            let pass = || {
                self.with_pool(dev, |pool, backend, config, after| {
                    if watch_live {
                        pool.report_live_ttl(config, after);
                    }
                    if trim && idle_ttl.is_none() {
                        pool.drop_empty_free_lists();
                    }
                    if !pool.has_pending_work() && idle_ttl.is_none() {
                        return false;
                    }
                    pool.flush_open(true, backend, config, after);
                    pool.harvest(backend, config, after);
                    pool.submit_rescrubs(backend, config, after);
                    if let Some(ttl) = idle_ttl {
                        pool.trim_idle(ttl, after);
                    }
                    pool.has_pending_work()
                })
            };
            match std::panic::catch_unwind(std::panic::AssertUnwindSafe(pass)) {
                Ok(left) => work_left |= left,
                Err(_) => (panicked, work_left) = (true, true),
            }
        }
        (panicked, work_left)
    }

    // ----- inspection -----------------------------------------------------------------------

    /// Merged statistics of every pool.
    pub fn stats(&self) -> Stats {
        let pools: Vec<_> = (0..self.inner.pools.len() as u32)
            .map(|d| self.pool(d).stats.clone())
            .collect();
        let err = self
            .inner
            .async_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut stats = Stats::merge(self.inner.backend.kind().to_string(), &pools, err);
        stats.started_at = Some(self.inner.started_at);
        stats.kv_gate = Some(self.kv_gate_policy());
        stats.shut_down = self.is_shut_down();
        stats
    }

    /// The eviction gate's policy, as the statistics carry it.
    fn kv_gate_policy(&self) -> crate::stats::KvGatePolicy {
        crate::stats::KvGatePolicy {
            mode: self.inner.config.kv_gate,
            scope: self.inner.config.kv_gate_scope,
        }
    }

    /// As [`Allocator::stats`], without waiting for a lock: `None` while one is held (a
    /// thread in a driver call under a pool lock, or this very thread interrupted by a signal
    /// handler while it held one). For the exit path, which may wait on a lock only for a
    /// bounded time (it retries).
    pub fn try_stats(&self) -> Option<Stats> {
        fn taken<T>(m: &Mutex<T>) -> Option<MutexGuard<'_, T>> {
            match m.try_lock() {
                Ok(guard) => Some(guard),
                // As `pool` does: a poisoned lock is still consistent enough to read.
                Err(TryLockError::Poisoned(p)) => Some(p.into_inner()),
                Err(TryLockError::WouldBlock) => None,
            }
        }
        let pools = self
            .inner
            .pools
            .iter()
            .map(|p| taken(p).map(|pool| pool.stats.clone()))
            .collect::<Option<Vec<_>>>()?;
        let err = taken(&self.inner.async_error)?.clone();
        let mut stats = Stats::merge(self.inner.backend.kind().to_string(), &pools, err);
        stats.started_at = Some(self.inner.started_at);
        stats.kv_gate = Some(self.kv_gate_policy());
        stats.shut_down = self.is_shut_down();
        Some(stats)
    }

    /// The block at `ptr` (exact start), on any device.
    pub fn block_info(&self, ptr: u64) -> Option<BlockInfo> {
        (0..self.inner.pools.len() as u32)
            .find_map(|d| self.pool(d).block(ptr).map(BlockInfo::from))
    }

    /// The block holding `ptr` (its start or an interior address) in any state, on any
    /// device; `None` when no block of this allocator holds it (never allocated here, or
    /// already released to the backend). One lock and one ordered-map lookup per device, no
    /// allocation: cheap enough for a front end to ask on every free whether a pointer is
    /// kvhygiene's before handing it over (the LD_PRELOAD interposers do).
    pub fn block_containing(&self, ptr: u64) -> Option<BlockSpan> {
        (0..self.inner.pools.len() as u32)
            .find_map(|d| self.pool(d).block_containing(ptr).map(BlockSpan::of))
    }

    /// Sets what runs when this allocator fails closed (`failure_mode = abort`), after the
    /// failure and its `policy_violation` record reached the event sink and just before the
    /// process aborts: the C ABI writes its last metrics snapshot there, so the failure shows
    /// in the metrics as well as in the log. The hook may not rely on the process going on;
    /// a panic in it is caught, and one that hangs is cut short by the abort, at most 40 s
    /// after the failure. Set once: returns false (and keeps the first) when one was set.
    pub fn on_fail_closed(&self, hook: impl Fn() + Send + Sync + 'static) -> bool {
        self.inner.fail_closed_hook.set(Box::new(hook)).is_ok()
    }

    /// The caller is about to export the LIVE block containing `ptr` for another process
    /// (`cudaIpcGetMemHandle`: the LD_PRELOAD interposer calls this first, and so should an
    /// engine that exports memory from `kvh_malloc` itself). The importer may keep its
    /// mapping after the block is freed, and a pooled block's next owner would share it
    /// through that mapping: so the block's free retires it instead, scrubbed and verified,
    /// then returned to the driver ([`ReleaseReason::IpcExported`]), whose next allocation at
    /// that address gets a new handle. The first mark of a hand-out counts in
    /// `ipc_exported_blocks` and is recorded (`ipc_export`); marking again changes nothing.
    /// A block not handed out is refused: exporting pooled memory would hand the next
    /// owner's bytes to the importer.
    pub fn mark_ipc_exported(&self, ptr: u64) -> Result<BlockSpan, IpcExportError> {
        let caller = Context::current();
        for dev in 0..self.inner.pools.len() as u32 {
            let found = self.with_pool(dev, |pool, _, _, after| {
                pool.mark_ipc_exported(ptr, &caller, after)
            });
            match found {
                Some(Ok(span)) => return Ok(span),
                Some(Err(state)) => {
                    return Err(IpcExportError::NotLive {
                        addr: ptr,
                        state: state.name(),
                    })
                }
                None => {}
            }
        }
        Err(IpcExportError::UnknownPointer { addr: ptr })
    }

    /// A block [`Allocator::reset_device`] freed on its holder's behalf whose holder has not
    /// freed it yet, as a front end that asks [`Allocator::block_containing`] first must still
    /// offer that free to the allocator: also one that went back to the device since (its
    /// scrub retired it, or the cache was emptied), which `block_containing` no longer finds.
    /// `capacity` is the size asked for; `live` is false. One atomic load per device for a
    /// process that reset none.
    pub fn block_freed_by_reset(&self, ptr: u64) -> Option<BlockSpan> {
        (0..self.inner.pools.len() as u32)
            .filter(|&d| self.device_was_reset(d))
            .find_map(|d| {
                let requested = self.pool(d).freed_by_reset_requested(ptr)?;
                Some(BlockSpan {
                    device: d,
                    addr: ptr,
                    requested,
                    capacity: requested,
                    live: false,
                })
            })
    }

    /// Every block the pool holds, on every device.
    pub fn blocks(&self) -> Vec<BlockInfo> {
        (0..self.inner.pools.len() as u32)
            .flat_map(|d| {
                self.pool(d)
                    .blocks()
                    .map(BlockInfo::from)
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// PyTorch's memory statistics of `device` (`torch.cuda.memory_stats`): see
    /// [`memory_stats`] for what each counts.
    pub fn memory_stats(&self, device: i32) -> Result<MemoryStats, AllocError> {
        let dev = self.device_index(device)?;
        Ok(self.pool(dev).memory_stats())
    }

    /// Sets every peak of `device`'s memory statistics to its current value
    /// (`torch.cuda.reset_peak_memory_stats`).
    pub fn reset_peak_memory_stats(&self, device: i32) -> Result<(), AllocError> {
        let dev = self.device_index(device)?;
        self.pool(dev).memory.reset_peaks();
        Ok(())
    }

    /// Zeroes the cumulative memory statistics of `device`: each statistic's `allocated` and
    /// `freed`, and the counters (`torch.cuda.reset_accumulated_memory_stats`).
    pub fn reset_accumulated_memory_stats(&self, device: i32) -> Result<(), AllocError> {
        let dev = self.device_index(device)?;
        self.pool(dev).reset_accumulated_memory();
        Ok(())
    }

    /// Checks the pool's internal consistency: per-state counters equal a recount of the
    /// block table, and the free lists hold exactly the CLEAN blocks.
    pub fn check_consistency(&self) -> Result<Accounting, String> {
        let mut total = Accounting::default();
        for d in 0..self.inner.pools.len() as u32 {
            let pool = self.pool(d);
            let recount = pool.recount();
            if recount != pool.stats.accounting {
                return Err(format!(
                    "device {d}: counters {:?} != table {recount:?}",
                    pool.stats.accounting
                ));
            }
            if !pool.memory.same_currents(&pool.recount_memory()) {
                return Err(format!(
                    "device {d}: memory statistics {:?} != table {:?}",
                    pool.memory,
                    pool.recount_memory()
                ));
            }
            if !pool.free_list_is_consistent() {
                return Err(format!(
                    "device {d}: free lists do not match the CLEAN blocks"
                ));
            }
            for (a, b) in [
                (&mut total.live, recount.live),
                (&mut total.pending, recount.pending),
                (&mut total.clean, recount.clean),
                (&mut total.quarantined, recount.quarantined),
            ] {
                a.blocks += b.blocks;
                a.bytes += b.bytes;
            }
        }
        Ok(total)
    }

    // ----- plumbing -------------------------------------------------------------------------

    fn device_index(&self, device: i32) -> Result<u32, AllocError> {
        let count = self.inner.pools.len() as u32;
        u32::try_from(device)
            .ok()
            .filter(|&d| d < count)
            .ok_or(AllocError::InvalidDevice { device, count })
    }

    #[inline]
    fn pool(&self, dev: u32) -> PoolGuard<'_> {
        // A panic while holding the lock cannot leave a block half-moved between states in a
        // way that hands out dirty memory (states change last), so a poisoned lock is usable.
        let pool = self.inner.pools[dev as usize]
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        PoolGuard {
            pool,
            inner: &self.inner,
        }
    }

    /// Runs `f` under the pool lock, then emits its events and acts on its aftermath.
    fn with_pool<R>(
        &self,
        dev: u32,
        f: impl FnOnce(&mut DevicePool, &dyn Backend, &Config, &mut Aftermath) -> R,
    ) -> R {
        // Declared before the lock, so dropped after it: a panic under the lock (the C
        // boundary catches it) settles the aftermath with the lock released.
        let mut settling = SettleOnUnwind {
            alloc: self,
            dev,
            after: Aftermath::default(),
        };
        let r = {
            let mut pool = self.pool(dev);
            f(
                &mut pool,
                self.inner.backend.as_ref(),
                &self.inner.config,
                &mut settling.after,
            )
        };
        let after = std::mem::take(&mut settling.after);
        self.settle(dev, after);
        r
    }

    /// A backend error returned to the caller of an allocation: counted in `backend_errors`
    /// when it is a fault of the driver or device (not a graph capture or exit, which are
    /// the caller's situation).
    #[cold]
    /// What an allocation of `size` that met backend error `e` fails with: out of memory
    /// (recovered from by the caller, counted as such), exit begun, or a driver fault.
    fn allocation_failed(&self, size: u64, dev: u32, e: BackendError) -> AllocError {
        match e {
            BackendError::OutOfMemory { .. } => AllocError::OutOfMemory { size, device: dev },
            BackendError::ShuttingDown => AllocError::ShuttingDown,
            other => self.backend_fault(dev, other),
        }
    }

    fn backend_fault(&self, dev: u32, e: BackendError) -> AllocError {
        let fault = !matches!(
            e,
            BackendError::StreamCapturing { .. } | BackendError::ShuttingDown
        );
        if fault {
            self.pool(dev).stats.counters.backend_errors += 1;
        }
        AllocError::Backend(e)
    }

    fn settle(&self, dev: u32, mut after: Aftermath) {
        let mut error = after.backend_error.take();
        let releases = std::mem::take(&mut after.releases);
        if !releases.is_empty() {
            self.return_to_backend(dev, releases, &mut after, &mut error);
        }
        if let Some(e) = error {
            let first = {
                let mut sticky = self
                    .inner
                    .async_error
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                sticky
                    .is_none()
                    .then(|| sticky.insert(e.to_string()).clone())
            };
            // Once, where an operator reads first (the pod's log), with the lock let go (a
            // stderr write may block): the metrics carry only that it happened
            // (`kvh_async_error`), the stats JSON its text.
            if let Some(text) = first {
                crate::say(format_args!(
                    "kvhygiene: the memory backend reported an error: {} (kept as \
                     last_async_error in the stats; said once)",
                    crate::printable(&text)
                ));
            }
        }
        match after.abort.take() {
            None => self.emit(after.events),
            Some(owner) => {
                // Neither a sink that panics (the C boundary catches it) nor one that waits
                // for ever (a hung disk under a full log queue) keeps a failure under
                // failure_mode = abort from stopping the process.
                abort_after(FAIL_CLOSED_RECORD_WAIT);
                let events = after.events;
                let _ =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.emit(events)));
                self.fail_closed(owner);
            }
        }
    }

    /// Returns verified blocks to the backend, with the pool lock dropped, then counts and
    /// records each one handed to it (a release the backend failed leaks the memory and
    /// counts a backend error too). Once exit has begun nothing goes back (invariant
    /// 6): the flag is checked before each call (each `cuMemFree` synchronises the device, so
    /// exit may begin during the loop), and a block the backend refuses for exit is put back
    /// into the pool as it was, so the figures match what the backend still holds.
    fn return_to_backend(
        &self,
        dev: u32,
        releases: Vec<Release>,
        after: &mut Aftermath,
        error: &mut Option<BackendError>,
    ) {
        let mut returned = Vec::with_capacity(releases.len());
        let mut kept = Vec::new();
        let (mut failed, mut given_back) = (0, 0);
        for r in releases {
            if self.inner.shutting_down.load(Ordering::Acquire) {
                kept.push(r);
                continue;
            }
            match self
                .inner
                .backend
                .release(dev, r.block.addr, r.block.capacity())
            {
                Ok(()) => {
                    given_back += 1;
                    returned.push((r, false));
                }
                Err(BackendError::ShuttingDown) => kept.push(r),
                Err(e) => {
                    // The memory is verified clean; failing to return it only leaks it, and
                    // the record says so.
                    failed += 1;
                    error.get_or_insert(e);
                    returned.push((r, true));
                }
            }
        }
        let isolation = self.inner.config.tenant_isolation;
        let mut pool = self.pool(dev);
        for r in returned.iter().map(|(r, _)| r).chain(&kept) {
            pool.release_ended(r);
        }
        pool.stats.counters.backend_errors += failed;
        // PyTorch's count of blocks returned to the driver: not those whose release failed
        // (leaked, the backend still holds them).
        pool.memory.num_device_free += given_back;
        for (r, leaked) in &returned {
            pool.released(r, *leaked, after);
        }
        for r in kept {
            pool.keep_unreleased(r, isolation);
        }
    }

    /// `failure_mode = abort`: the failure (verification or residue, of a freed block or of
    /// KV blocks) is logged, then the process stops.
    #[cold]
    fn fail_closed(&self, owner: Context) -> ! {
        // Whatever the sink or the hook does (a panic included), the process stops below;
        // one that hangs is cut short by the abort timer its caller set.
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.fail_closed_record(owner)
        }));
        if let Some(hook) = self.inner.fail_closed_hook.get() {
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(hook));
        }
        crate::say(format_args!(
            "kvhygiene: a scrub failed verification or read residue and failure_mode=abort: \
             aborting the process"
        ));
        std::process::abort()
    }

    /// The record of a fail-closed stop, flushed to the sink.
    fn fail_closed_record(&self, owner: Context) {
        self.emit(vec![Event {
            at: SystemTime::now(),
            kind: EventKind::PolicyViolation {
                policy: "failure_mode",
                detail: "a scrub failed verification or read residue under \
                         failure_mode=abort (the records before this one name the blocks); \
                         aborting"
                    .into(),
            },
            // The ids of the request whose block failed, not of whichever call happened to
            // collect the result.
            context: owner,
            block: None,
            addr: None,
        }]);
        if let Some(sink) = &self.inner.sink {
            sink.flush();
        }
    }

    fn emit(&self, events: Vec<Event>) {
        if let Some(sink) = &self.inner.sink {
            if !events.is_empty() {
                sink.emit_all(events);
            }
        }
    }
}

/// Longest a fail-closed stop waits for its records to reach the event sink before the
/// process aborts all the same: a log whose disk hangs holds its queue, and an emit into a
/// full queue waits.
/// Longer than the log's own bound on a flush (`FLUSH_TIMEOUT`), which a healthy log
/// meets.
const FAIL_CLOSED_RECORD_WAIT: Duration = Duration::from_secs(40);

/// Aborts the process `limit` from now, from a thread of its own, whatever the calling
/// thread is then doing. A thread that cannot be started leaves the caller's wait unbounded
/// (said on stderr): its records are still worth the try.
#[cold]
fn abort_after(limit: Duration) {
    let watchdog = std::thread::Builder::new()
        .name("kvh-fail-closed".into())
        .spawn(move || {
            std::thread::sleep(limit);
            crate::say(format_args!(
                "kvhygiene: the records of a failure under failure_mode=abort did not reach \
                 the forensic log within {} s: aborting the process without them",
                limit.as_secs()
            ));
            std::process::abort()
        });
    if let Err(e) = watchdog {
        crate::say(format_args!(
            "kvhygiene: cannot start the thread that bounds a fail-closed stop ({e}); \
             the process aborts once its records are written"
        ));
    }
}

/// A CLEAN block sized to its request ([`SizeClass::exact`]) for a request of `class` that
/// missed the class's free list: one no larger than the class's capacity.
fn pop_exact(
    pool: &mut DevicePool,
    key: FreeKey,
    size: u64,
    class: SizeClass,
    ctx: &Context,
    stream: StreamHandle,
    isolation: crate::config::TenantIsolation,
) -> Option<u64> {
    SizeClass::exact(size)?;
    pool.pop_exact(key, size, class.capacity, ctx, stream, isolation)
}

/// How often the flusher trims blocks idle past `idle_ttl_ms`: every half TTL, so a block goes
/// back to the backend at most half a TTL late, but no more often than the flusher wakes
/// (`tick`) and no less often than once a second (the trim scans the free lists: a
/// TTL in minutes does not need it more often).
fn trim_period(ttl_ms: i64, tick: Duration) -> Duration {
    let half_ttl = Duration::from_millis(u64::try_from(ttl_ms).unwrap_or(0) / 2);
    half_ttl.clamp(tick, Duration::from_secs(1))
}

/// The longest an idle flusher sleeps: how late it may notice an allocator dropped meanwhile
/// (a thread left parked that long), never how late a batch is submitted (a free wakes it).
const IDLE_PARK_MAX: Duration = Duration::from_secs(1);

/// The flusher: bounds how long a free waits in an open batch and how long a completed
/// scrub waits to be harvested. Holds only a weak reference, so dropping the allocator ends it.
///
/// It wakes every `batch_max_delay_us` (100 µs .. 10 ms) while any device has work (a batch
/// open or in flight, a re-scrub waiting). Idle, it parks instead until its next
/// housekeeping is due (the idle TTL's trim, the live TTL's watch; at most
/// `IDLE_PARK_MAX`), and the pool lock release that leaves work behind wakes it
/// ([`PoolGuard`]): an idle process costs about one wake a second, not a thousand. Returns
/// the thread, which the allocator unparks; `None` when it could not be started.
fn spawn_flusher(inner: Weak<Inner>) -> Option<std::thread::Thread> {
    let (period, trim_every, watch_every, trims, watches, idle) = match inner.upgrade() {
        Some(i) => {
            let period = Duration::from_micros(i.config.batch_max_delay_us.clamp(100, 10_000));
            let live_ttl = i64::try_from(i.config.live_ttl_ms).unwrap_or(i64::MAX);
            (
                period,
                trim_period(i.config.idle_ttl_ms, period),
                trim_period(live_ttl, period),
                // Housekeeping an idle pool still needs: idle blocks to return, live blocks
                // to report. (Without an idle TTL the trim only tidies empty free lists.)
                i.config.idle_ttl_ms > 0,
                i.config.live_ttl_ms > 0,
                i.flusher_idle.clone(),
            )
        }
        None => return None,
    };
    let spawned = std::thread::Builder::new()
        .name("kvh-flusher".into())
        .spawn(move || {
            let (mut last_trim, mut last_watch) = (Instant::now(), Instant::now());
            let mut said_panic = false;
            loop {
                std::thread::sleep(period);
                let Some(inner) = inner.upgrade() else { return };
                if inner.shutting_down.load(Ordering::Acquire) {
                    return;
                }
                let trim = last_trim.elapsed() >= trim_every;
                if trim {
                    last_trim = Instant::now();
                }
                let watch = last_watch.elapsed() >= watch_every;
                if watch {
                    last_watch = Instant::now();
                }
                // A pass that panics (an event sink's, or a bug of the pool's) must not end
                // the flusher, nor keep the other devices from their passes: batches would
                // lose their time bound. Said once.
                let view = Allocator {
                    inner,
                    counted: false,
                };
                let (panicked, work_left) = view.tick(trim, watch);
                if panicked && !said_panic {
                    said_panic = true;
                    crate::say(format_args!(
                        "kvhygiene: a flusher pass panicked; the flusher goes on (said once)"
                    ));
                }
                if work_left {
                    continue;
                }
                // Set before the look at every pool (see `PoolGuard`'s drop): work that
                // appears after the look wakes the park below.
                idle.store(true, Ordering::SeqCst);
                if view.inner.has_pending_work() {
                    idle.store(false, Ordering::SeqCst);
                    continue;
                }
                // The allocator is not held while parked: its last handle's drop proceeds.
                drop(view);
                let mut park = IDLE_PARK_MAX;
                if trims {
                    park = park.min(trim_every.saturating_sub(last_trim.elapsed()));
                }
                if watches {
                    park = park.min(watch_every.saturating_sub(last_watch.elapsed()));
                }
                // Returns early when unparked (a token left by an earlier unpark included),
                // or spuriously: either way one more pass, which is harmless.
                std::thread::park_timeout(park);
                idle.store(false, Ordering::SeqCst);
            }
        });
    match spawned {
        Ok(handle) => Some(handle.thread().clone()),
        Err(e) => {
            // Without the flusher, batches still flush when full, when malloc needs memory
            // and on synchronize; only the time bound is lost. Say so once.
            crate::say(format_args!(
                "kvhygiene: cannot start the flusher thread ({e}); batches flush by count only"
            ));
            None
        }
    }
}

/// "1 block of device 0 is", "3 blocks of device 1 are", "5 blocks (device 0: 2, device 1: 3)
/// are": the blocks of each device whose scrub `synchronize` left waiting.
fn blocks_waiting(per_device: &[(u32, usize)]) -> String {
    let total: usize = per_device.iter().map(|&(_, n)| n).sum();
    let noun = |n: usize| if n == 1 { "block" } else { "blocks" };
    let verb = if total == 1 { "is" } else { "are" };
    match per_device {
        [(dev, n)] => format!("{n} {} of device {dev} {verb}", noun(*n)),
        _ => {
            let each: Vec<String> = per_device
                .iter()
                .map(|(dev, n)| format!("device {dev}: {n}"))
                .collect();
            format!("{total} {} ({}) {verb}", noun(total), each.join(", "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::host::HostBackend;

    const S: StreamHandle = StreamHandle(0);

    const ABORT_AFTER_CHILD: &str = "KVH_TEST_ABORT_AFTER_CHILD";

    /// A fail-closed stop is bounded: `abort_after` ends the process from its own thread
    /// while the calling thread is stuck (here asleep for good, as in an emit into a hung
    /// log's full queue). Run in a child copy of the test binary, which must die of SIGABRT.
    #[test]
    fn abort_after_ends_the_process_while_its_caller_is_stuck() {
        use std::os::unix::process::ExitStatusExt;
        if std::env::var_os(ABORT_AFTER_CHILD).is_some() {
            abort_after(Duration::from_millis(50));
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
        let status = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "alloc::tests::abort_after_ends_the_process_while_its_caller_is_stuck",
                "--exact",
                "--test-threads=1",
            ])
            .env(ABORT_AFTER_CHILD, "1")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .output()
            .unwrap();
        assert_eq!(
            status.status.signal(),
            Some(libc::SIGABRT),
            "{:?}: {}",
            status.status,
            String::from_utf8_lossy(&status.stderr)
        );
        let said = String::from_utf8_lossy(&status.stderr);
        assert!(said.contains("failure_mode=abort"), "{said}");
    }

    /// A CLEAN block on `device`, its scrub applied.
    fn clean_block(alloc: &Allocator, device: i32) -> u64 {
        let p = alloc.malloc(4096, device, S).unwrap();
        alloc.free(p, 4096, device, S).unwrap();
        alloc.synchronize().unwrap();
        p
    }

    fn manual() -> Config {
        Config {
            batch_max_delay_us: 10_000_000,
            ..Config::default()
        }
    }

    /// A device that holds a request but not its class's capacity (32 MiB + 1 byte, a class
    /// of 36 MiB, on a device of 35 MiB) serves it with a block sized to it (34 MiB), which its
    /// free makes reusable for the same request, and never for a larger one of that class.
    #[test]
    fn an_allocation_the_device_holds_only_at_its_own_size_is_served() {
        use super::size_class::EXACT_GRANULE;
        let size: u64 = (32 << 20) + 1;
        let exact = (32 << 20) + EXACT_GRANULE;
        let host = HostBackend::with_capacity(35 << 20);
        let alloc = Allocator::new(host.clone(), manual(), None);
        let p = alloc
            .malloc(size as i64, 0, S)
            .expect("the device holds the request");
        assert_eq!(host.bytes_in_use(), exact);
        alloc.free(p, size as i64, 0, S).unwrap();
        alloc.synchronize().unwrap();
        let q = alloc
            .malloc(size as i64, 0, S)
            .expect("the same request again");
        assert_eq!(
            (q, host.bytes_in_use()),
            (p, exact),
            "reused, not allocated again"
        );
        alloc.free(q, size as i64, 0, S).unwrap();
        alloc.synchronize().unwrap();
        // 35 MiB is in the class of 36 MiB and does not fit the 34 MiB block: the block is
        // released for it, and the device cannot hold it either.
        let larger = alloc.malloc(35 << 20, 0, S);
        assert!(larger.is_err(), "{larger:?}");
        assert_eq!(
            alloc.check_consistency().unwrap().total().bytes,
            host.bytes_in_use()
        );
    }

    /// A pass that panics under the pool lock (a bug of the pool's own: the backend's calls
    /// do not panic) after it took a block out for release: the drop guard settles it, so
    /// the block goes back to the backend and the pool's figures match what it holds.
    #[test]
    fn a_pass_that_panics_after_taking_a_block_out_for_release_still_settles_it() {
        let host = HostBackend::new();
        let alloc = Allocator::new(host.clone(), manual(), None);
        clean_block(&alloc, 0);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            alloc.with_pool(0, |pool, _, _, after| {
                pool.release_clean(ReleaseReason::EmptyCache, after);
                panic!("a bug of the pool's, after the release was decided");
            })
        }));
        assert!(r.is_err());
        let pool_bytes = alloc.check_consistency().unwrap().total().bytes;
        assert_eq!(
            (
                pool_bytes,
                host.bytes_in_use(),
                alloc.stats().counters.released
            ),
            (0, 0, 1)
        );
    }
}

//! [`CudaBackend`]: the [`Backend`] trait on the CUDA driver.
//!
//! - Contexts: each device's primary context (the CUDA runtime's, so PyTorch's) is retained on
//!   first use and made current at the top of every entry point, because PyTorch calls the
//!   allocator's free without setting the device; the caller's context is restored on return.
//! - Stream order: a scrub batch runs on its stream after an event recorded on every wait
//!   stream (`cuStreamWaitEvent`), as the scrub kernel, the publish kernel when a segment spans
//!   chunks, and a completion event. Nothing is copied: a batch of up to
//!   [`kernel::INLINE_SEGMENTS`] segments travels in the kernel parameter, a larger one as work
//!   items in page-locked host memory the kernel reads directly, and the kernels write results
//!   into page-locked host memory. Nothing on the host waits for the device except `read` /
//!   `write`, [`ScrubTicket::wait`] and `release` (`cuMemFree` synchronises the device; the
//!   pool calls it with its lock dropped). [`Backend::zero_fresh`] queues an asynchronous
//!   memset on the caller's stream, and a batch slot that cannot be completed (out of memory
//!   part way) keeps what it allocated for the next one rather than free it inside
//!   `submit_scrub`, which the free path calls (`Spare`).
//! - Graph capture: nothing is enqueued on a capturing stream (it would become part of the
//!   graph, and the scrub would run at replay instead of now): such calls fail with
//!   [`BackendError::StreamCapturing`] and the pool defers the work.
//! - Exit: after [`Backend::shutdown`] no driver call is made; memory and handles are leaked.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use super::kernel::{self, DeviceChunk, Image};
use super::loader::Driver;
use super::result::{self as r, CUcontext, CUdeviceptr, CUevent, CUfunction, CUstream};
use super::sys::{self, CUdevice_attribute};
use crate::backend::verify::SegmentResult;
use crate::backend::{
    Backend, BackendError, BackendKind, DevicePtr, ScrubBatch, ScrubTicket, StreamHandle,
};

const ITEM_BYTES: usize = std::mem::size_of::<DeviceChunk>();
const RESULT_BYTES: usize = std::mem::size_of::<SegmentResult>();
/// Smallest batch slot, in segments: covers the default batch size without regrowth.
const MIN_SLOT_SEGMENTS: usize = 256;

/// A raw driver handle that may cross threads.
#[derive(Clone, Copy, Debug)]
struct Handle<T>(T);
// SAFETY: driver handles (contexts, functions, events, page-locked host pointers) are plain
// identifiers the driver accepts from any thread once the owning context is current, which
// every entry point ensures; all mutation of shared handles goes through a Mutex.
unsafe impl<T> Send for Handle<T> {}
// SAFETY: as above.
unsafe impl<T> Sync for Handle<T> {}

/// Per-device state, created on first use of the device.
struct Device {
    ordinal: u32,
    ctx: Handle<CUcontext>,
    scrub_fn: Handle<CUfunction>,
    strided_fn: Handle<CUfunction>,
    publish_fn: Handle<CUfunction>,
    /// `kvh_scrub_strided` blocks the GPU holds at once (SMs x blocks per SM); 0 when the
    /// driver could not say, and then every batch is launched with `kvh_scrub`.
    resident_blocks: u64,
    /// Which embedded image was loaded (for diagnostics).
    image: String,
    /// The allocations `allocate` made and `release` has not freed: start -> length. The
    /// safe entry points that take an address (`release`, `zero_fresh`, `write`, `read`) work
    /// only inside one: under unified addressing any page-locked host buffer is a valid
    /// device address too.
    live: Mutex<BTreeMap<DevicePtr, u64>>,
    /// Recorded on each wait stream, then waited on by the scrub stream. Reusable at once:
    /// `cuStreamWaitEvent` captures the record that precedes it.
    order_event: Mutex<Handle<CUevent>>,
    /// Idle batch slots (sums, result and work item buffers, and a completion event).
    slots: Mutex<Vec<Slot>>,
    /// Buffers of slots that could not be completed, for the next one.
    spare: Mutex<Spare>,
}

/// What slots that could not be completed (a later step ran out of memory) had allocated:
/// kept for the next slot of the device, not freed, because freeing synchronises the device
/// (`cuMemFree`, `cuMemFreeHost`) and a slot is made inside `submit_scrub`, which the pool
/// calls under its lock on the free path (invariant 3: the free path never waits on the
/// device). One buffer of each kind is kept, the larger; one it displaces, and page-locked
/// memory whose mapping failed, are parked and freed by the device's next `release`, which the
/// pool calls with its lock dropped. Sizes are powers of two up to the largest batch, so few
/// are ever parked.
#[derive(Default)]
struct Spare {
    sums: Option<(CUdeviceptr, usize)>,
    results: Option<(Mapped, usize)>,
    items: Option<(Mapped, usize)>,
    parked: Vec<Parked>,
}

/// A displaced spare buffer, to free outside the free path.
enum Parked {
    Device(CUdeviceptr),
    Host(Handle<*mut u8>),
}

impl Spare {
    /// The kept buffer of a kind, when it holds at least `bytes`.
    fn take<T>(kept: &mut Option<(T, usize)>, bytes: usize) -> Option<(T, usize)> {
        match kept {
            Some((_, size)) if *size >= bytes => kept.take(),
            _ => None,
        }
    }

    /// Keeps `offered` unless a larger buffer of its kind is kept already; the smaller of the
    /// two is parked.
    fn keep<T>(
        kept: &mut Option<(T, usize)>,
        offered: (T, usize),
        parked: &mut Vec<Parked>,
        park: fn(T) -> Parked,
    ) {
        let smaller = match kept.take() {
            Some(old) if old.1 >= offered.1 => {
                *kept = Some(old);
                offered
            }
            Some(old) => {
                *kept = Some(offered);
                old
            }
            None => {
                *kept = Some(offered);
                return;
            }
        };
        parked.push(park(smaller.0));
    }
}

/// Page-locked host memory mapped into the device: `host` and `dev` address the same bytes.
struct Mapped {
    host: Handle<*mut u8>,
    dev: CUdeviceptr,
}

/// The buffers of one in-flight batch: per-segment sums on the device, result slots and work
/// items in mapped page-locked host memory, and a completion event.
struct Slot {
    /// Segments the sums and results hold.
    segments: usize,
    /// `segments` SegmentResults, zero between batches (the publish kernel clears what the
    /// scrub kernel added).
    sums: CUdeviceptr,
    /// Whether `sums` must be cleared before the next batch: a new slot, or one whose last
    /// batch failed part way.
    sums_dirty: bool,
    /// `segments` SegmentResults the kernels write and the ticket reads.
    results: Mapped,
    /// Work items (`item_capacity` DeviceChunks), allocated with the slot when the batch that
    /// made it had items (a power of two at least its count). A slot without room for a later
    /// batch's items is passed over for a new one, and given a larger area only when the
    /// device has no memory for a new slot ([`with_more_items`]).
    items: Option<Mapped>,
    item_capacity: usize,
    done: Handle<CUevent>,
}

pub(crate) struct Inner {
    driver: Driver,
    /// Each device's state once it opened. A failed open is not kept: the next call tries
    /// again (a module load can fail for lack of memory on a full device). The failed attempt
    /// unloads the module it loaded ([`LoadedModule`]) and keeps its reference to the device's
    /// primary context in `contexts`, which the next attempt takes up.
    devices: Vec<OnceLock<Device>>,
    /// Each device's primary context, retained once (by its first open attempt) and never
    /// released (exit releases it): every retain would need a release of its own, so a device
    /// whose open fails on every call must not retain again on each.
    contexts: Vec<OnceLock<Handle<CUcontext>>>,
    /// Held while a device opens, so that two threads do not open the same one twice.
    opening: Mutex<()>,
    shutting_down: AtomicBool,
    /// Entry points past their shutdown check and not yet returned ([`InCall`]).
    calls: AtomicU64,
    /// Fault injection for tests: index of a segment the zero kernel skips (NO_SKIP: none).
    skip_segment: AtomicU32,
    /// The [`ItemGrid`] of batches with work items, as its `u8` value.
    item_grid: AtomicU8,
}

/// How many blocks the scrub launch of a batch with work items (more than
/// [`kernel::INLINE_SEGMENTS`] segments) has. Inline batches always get one block per chunk.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(u8)]
pub enum ItemGrid {
    /// One block per chunk, the shape of the driver's memset; each block reads its chunk's
    /// work item from host memory before its first store. The default.
    #[default]
    PerChunk = 0,
    /// `kvh_scrub_strided`: at most as many blocks as the GPU holds at once (SMs times the
    /// kernel's occupancy), block b taking chunks b, b + grid, ...: a block reads the work
    /// items of up to eight of its chunks in one round trip to host memory, and no block waits
    /// to be scheduled.
    Resident = 1,
}

impl ItemGrid {
    fn from_u8(v: u8) -> Self {
        if v == ItemGrid::Resident as u8 {
            ItemGrid::Resident
        } else {
            ItemGrid::PerChunk
        }
    }
}

/// Device memory and scrubs through the CUDA driver. Cheap to clone; clones share state.
#[derive(Clone)]
pub struct CudaBackend {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaBackend")
            .field("devices", &self.inner.devices.len())
            .finish()
    }
}

impl CudaBackend {
    /// Initialises the driver and one device (its context and kernel image: the device of the
    /// calling thread's current context, else device 0), so that a driver
    /// that is present but unusable is reported here rather than at the first allocation.
    ///
    /// From `cuInit` on, the driver keeps state of its own in this process (its threads, and
    /// the primary context a device's opening retains): libcuda stays loaded for the life of
    /// the process from then on (`Driver::keep_loaded`), whether this start-up fails or the
    /// backend is dropped later, rather than being unloaded under them.
    pub fn new(driver: Driver) -> Result<Self, BackendError> {
        r::init(&driver)?;
        driver.keep_loaded();
        let count = r::device_count(&driver)?;
        if count == 0 {
            return Err(BackendError::Other(
                "the CUDA driver reports no device".to_string(),
            ));
        }
        let inner = Inner {
            driver,
            devices: (0..count).map(|_| OnceLock::new()).collect(),
            contexts: (0..count).map(|_| OnceLock::new()).collect(),
            opening: Mutex::new(()),
            shutting_down: AtomicBool::new(false),
            calls: AtomicU64::new(0),
            skip_segment: AtomicU32::new(kernel::NO_SKIP),
            item_grid: AtomicU8::new(ItemGrid::default() as u8),
        };
        let first = first_device(&inner.driver, count);
        let backend = CudaBackend {
            inner: Arc::new(inner),
        };
        backend.inner.device(first)?;
        Ok(backend)
    }

    /// The driver version as `cuDriverGetVersion` reports it (12040 = 12.4).
    pub fn driver_version(&self) -> Result<i32, BackendError> {
        let _call = self.inner.enter()?;
        r::driver_version(&self.inner.driver)
    }

    /// Waits until all work queued on `device` has completed (benchmarks and checks).
    pub fn synchronize(&self, device: u32) -> Result<(), BackendError> {
        let (_dev, _ctx) = self.inner.device(device)?;
        r::ctx_synchronize(&self.inner.driver)
    }

    /// Which embedded image device `device` runs (e.g. "sm_90 cubin").
    pub fn image_in_use(&self, device: u32) -> Result<String, BackendError> {
        let (dev, _ctx) = self.inner.device(device)?;
        Ok(dev.image.clone())
    }

    /// The launch shape of later batches with work items (benchmarks compare the two; the
    /// default is [`ItemGrid::PerChunk`]). Either shape zeroes and verifies the same bytes.
    pub fn set_item_grid(&self, grid: ItemGrid) {
        self.inner.item_grid.store(grid as u8, Ordering::Relaxed);
    }

    /// Blocks of `kvh_scrub_strided` that device `device` holds at once, the most an
    /// [`ItemGrid::Resident`] launch gets; 0 when the driver could not say, and then batches
    /// with work items run on `kvh_scrub` whatever the item grid.
    pub fn strided_blocks(&self, device: u32) -> Result<u64, BackendError> {
        let (dev, _ctx) = self.inner.device(device)?;
        Ok(dev.resident_blocks)
    }

    /// Fault injection for the GPU tests only: the zero kernel leaves segment `index` of every
    /// later batch untouched, which the verification must then report. `None` restores normal
    /// operation. Never set outside tests.
    #[doc(hidden)]
    pub fn inject_skip_zero(&self, index: Option<u32>) {
        let v = index.unwrap_or(kernel::NO_SKIP);
        self.inner.skip_segment.store(v, Ordering::SeqCst);
    }
}

/// How long [`Backend::shutdown`] waits for entry points already past their check to return:
/// a submission takes microseconds; a wait blocked on a hung device is not waited for.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(1);

thread_local! {
    /// [`InCall`]s this thread holds: a shutdown begun inside an entry point (an exit handler
    /// run from it) does not wait for its own caller.
    static CALLS_HERE: Cell<u64> = const { Cell::new(0) };
}

/// An entry point in progress, counted from before it checks the shutdown flag until it
/// returns. The count and the flag are both sequentially consistent: either the entry point
/// sees the flag and makes no driver call, or the shutdown sees the count and waits for it.
struct InCall<'a>(&'a Inner);

impl Drop for InCall<'_> {
    fn drop(&mut self) {
        CALLS_HERE.with(|c| c.set(c.get().saturating_sub(1)));
        self.0.calls.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Inner {
    /// Begins an entry point: refused once shutdown has begun.
    fn enter(&self) -> Result<InCall<'_>, BackendError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        CALLS_HERE.with(|c| c.set(c.get() + 1));
        let call = InCall(self);
        self.live()?;
        Ok(call)
    }

    /// Refuses further driver calls once shutdown has begun; an entry point checks again
    /// between its driver calls, so one that began just before stops at the next step.
    fn live(&self) -> Result<(), BackendError> {
        if self.stopped() {
            return Err(BackendError::ShuttingDown);
        }
        Ok(())
    }

    /// Whether this backend shut down, or process exit began (a backend a start-up is still
    /// making, which no shutdown reaches yet, stops too).
    fn stopped(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst) || crate::backend::process_exiting()
    }

    /// The device's state, created on first use, with its context current until the returned
    /// guard drops.
    fn device(&self, device: u32) -> Result<(&Device, CurrentCtx<'_>), BackendError> {
        let call = self.enter()?;
        let cell = self
            .devices
            .get(device as usize)
            .ok_or(BackendError::InvalidDevice {
                device,
                count: self.devices.len() as u32,
            })?;
        // The guard comes first: opening a device makes its context current too.
        let guard = CurrentCtx::enter(self, call)?;
        let dev = match cell.get() {
            Some(dev) => dev,
            None => self.open(cell, device)?,
        };
        // Opening may have outlasted the start of a shutdown.
        self.live()?;
        // SAFETY: 1. `dev.ctx` was retained by `open_device` and is never released.
        unsafe { r::ctx_set_current(&self.driver, dev.ctx.0) }?;
        // A shutdown that began during that call: the entry point's own driver call, next,
        // must not be made.
        self.live()?;
        Ok((dev, guard))
    }

    #[cold]
    fn open<'a>(
        &'a self,
        cell: &'a OnceLock<Device>,
        device: u32,
    ) -> Result<&'a Device, BackendError> {
        let _one = lock(&self.opening);
        if let Some(dev) = cell.get() {
            return Ok(dev);
        }
        // Waiting for another thread's open may have outlasted a shutdown.
        self.live()?;
        let opened = open_device(self, device)?;
        let dev = cell.get_or_init(|| opened);
        reserve_slot(self, dev);
        Ok(dev)
    }
}

/// Restores the calling thread's current context when an entry point returns. The CUDA runtime
/// (so PyTorch) derives its current device from the thread's current context: an allocator
/// call for device 1 from a thread working on device 0 must not leave it on device 1.
///
/// It also puts the thread in RELAXED stream-capture mode for the call and restores the
/// previous mode after: kvhygiene's own driver calls (event queries, allocations) must not
/// invalidate a global-mode capture running elsewhere.
struct CurrentCtx<'a> {
    inner: &'a Inner,
    previous: CUcontext,
    previous_mode: sys::CUstreamCaptureMode,
    /// Dropped after the context is restored: the call ends with its last driver call.
    _call: InCall<'a>,
}

impl<'a> CurrentCtx<'a> {
    fn enter(inner: &'a Inner, call: InCall<'a>) -> Result<Self, BackendError> {
        let previous_mode = r::thread_exchange_capture_mode(
            &inner.driver,
            sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED,
        )?;
        // Exit may have begun inside that call, on this thread too: no further driver call,
        // not even the one that would put the capture mode back.
        inner.live()?;
        let previous = match r::ctx_get_current(&inner.driver) {
            Ok(c) => c,
            Err(e) => {
                if inner.live().is_ok() {
                    let _ = r::thread_exchange_capture_mode(&inner.driver, previous_mode);
                }
                return Err(e);
            }
        };
        Ok(CurrentCtx {
            inner,
            previous,
            previous_mode,
            _call: call,
        })
    }
}

impl Drop for CurrentCtx<'_> {
    fn drop(&mut self) {
        // No driver call once exit has begun.
        if self.inner.stopped() {
            return;
        }
        // SAFETY: 1. `previous` was current on this thread when the entry point began, so it is
        // null or a context its owner keeps alive across this call.
        let _ = unsafe { r::ctx_set_current(&self.inner.driver, self.previous) };
        // Asked again between the two: exit may have begun inside the first.
        if self.inner.stopped() {
            return;
        }
        let _ = r::thread_exchange_capture_mode(&self.inner.driver, self.previous_mode);
    }
}

impl Device {
    /// `[addr, addr + len)` lies inside one allocation of this device that is not released.
    fn check_live(&self, device: u32, addr: DevicePtr, len: u64) -> Result<(), BackendError> {
        let live = lock(&self.live);
        let inside = live
            .range(..=addr)
            .next_back()
            .is_some_and(|(&start, &size)| {
                addr.checked_add(len)
                    .zip(start.checked_add(size))
                    .is_some_and(|(end, alloc_end)| end <= alloc_end)
            });
        if inside {
            Ok(())
        } else {
            Err(not_allocated(device, addr, len))
        }
    }
}

#[cold]
fn not_allocated(device: u32, addr: DevicePtr, len: u64) -> BackendError {
    BackendError::Other(format!(
        "{len} bytes at {addr:#x} are not inside memory this backend allocated on device \
         {device}"
    ))
}

/// Retains the primary context (once: [`primary_context`]), loads the kernels and creates the
/// ordering event. Checks for a shutdown between its steps: loading a PTX image (JIT
/// compilation) can outlast the wait of [`Backend::shutdown`]. A context retained before a
/// shutdown stops it is left retained (exit releases it).
#[cold]
fn open_device(inner: &Inner, ordinal: u32) -> Result<Device, BackendError> {
    let d = &inner.driver;
    let cu_dev = r::device_get(d, ordinal)?;
    inner.live()?;
    let ctx = primary_context(inner, ordinal, cu_dev)?;
    inner.live()?;
    // SAFETY: 1. just retained.
    unsafe { r::ctx_set_current(d, ctx) }?;
    // Every step from here is checked for a shutdown first: exit may begin inside the call
    // before it, on this thread too, where the shutdown does not wait for it.
    let attr = |a| {
        inner
            .live()
            .and_then(|()| r::device_attribute(d, cu_dev, a))
    };
    let major = attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?;
    let minor = attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?;
    inner.live()?;
    let (module, image) =
        load_kernels(inner, major as u32, minor as u32).map_err(out_of_memory_on(ordinal))?;
    let module = LoadedModule {
        inner,
        module: Some(module),
    };
    let function = |name| {
        inner.live()?;
        // SAFETY: 1. `module` was loaded into the current context just now.
        unsafe { r::module_get_function(d, module.get(), name) }
    };
    let scrub_fn = function(kernel::SCRUB_KERNEL)?;
    let strided_fn = function(kernel::SCRUB_STRIDED_KERNEL)?;
    let publish_fn = function(kernel::PUBLISH_KERNEL)?;
    inner.live()?;
    let order_event = r::event_create(d, ordinal)?;
    inner.live()?;
    // SAFETY: 1. `strided_fn` is a function of the module loaded just now.
    let resident_blocks = unsafe { resident_blocks(inner, cu_dev, strided_fn) }.unwrap_or(0);
    inner.live()?;
    module.keep();
    Ok(Device {
        ordinal,
        ctx: Handle(ctx),
        scrub_fn: Handle(scrub_fn),
        strided_fn: Handle(strided_fn),
        publish_fn: Handle(publish_fn),
        resident_blocks,
        image,
        order_event: Mutex::new(Handle(order_event)),
        slots: Mutex::new(Vec::new()),
        spare: Mutex::new(Spare::default()),
        live: Mutex::new(BTreeMap::new()),
    })
}

/// The primary context of device `ordinal` (`cu_dev`): retained by the first open attempt,
/// taken up as it is by the next ones ([`Inner::contexts`]). Called under `Inner::opening`.
fn primary_context(
    inner: &Inner,
    ordinal: u32,
    cu_dev: r::CUdevice,
) -> Result<CUcontext, BackendError> {
    let cell = inner
        .contexts
        .get(ordinal as usize)
        .ok_or_else(|| BackendError::Other(format!("no device {ordinal}")))?;
    if let Some(ctx) = cell.get() {
        return Ok(ctx.0);
    }
    let ctx = r::primary_ctx_retain(&inner.driver, cu_dev).map_err(out_of_memory_on(ordinal))?;
    Ok(cell.get_or_init(|| Handle(ctx)).0)
}

/// Scrub blocks the device holds at once: its SMs times the kernel's blocks per SM.
///
/// # Safety
/// 1. `f` must be a live function of a module of the current context, of device `dev`.
unsafe fn resident_blocks(
    inner: &Inner,
    dev: r::CUdevice,
    f: CUfunction,
) -> Result<u64, BackendError> {
    let d = &inner.driver;
    inner.live()?;
    let sms = r::device_attribute(
        d,
        dev,
        CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
    )?;
    inner.live()?;
    // SAFETY: contract 1.
    let per_sm = unsafe { r::occupancy_blocks_per_sm(d, f, kernel::BLOCK_THREADS) }?;
    Ok(u64::try_from(sms).unwrap_or(0) * u64::from(per_sm))
}

/// The scrub launch of a plan, as (kernel, blocks): `kvh_scrub` with one block per chunk, or
/// under [`ItemGrid::Resident`] for a batch with work items, `kvh_scrub_strided` with at most
/// the blocks the device holds at once ([`kernel::strided_grid`]; when the driver could not
/// say how many, `kvh_scrub`).
fn scrub_launch(dev: &Device, plan: &kernel::Plan, shape: ItemGrid) -> (CUfunction, u64) {
    if plan.item_count > 0 && shape == ItemGrid::Resident && dev.resident_blocks > 0 {
        let blocks = kernel::strided_grid(plan.total_chunks, dev.resident_blocks);
        (dev.strided_fn.0, blocks)
    } else {
        (dev.scrub_fn.0, plan.total_chunks)
    }
}

/// A driver's out-of-memory answer while device `ordinal` opens (retaining its context,
/// loading its kernels) is [`BackendError::OutOfMemory`], as for an allocation: the
/// allocator's recovery (flush, release cached blocks, retry) applies to it too.
fn out_of_memory_on(ordinal: u32) -> impl Fn(BackendError) -> BackendError {
    move |e| match e {
        BackendError::Driver { code, .. }
            if code == sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY.0 as i32 =>
        {
            BackendError::OutOfMemory {
                device: ordinal,
                requested: 0,
            }
        }
        other => other,
    }
}

/// The kernel module of a device being opened. Unless the open succeeds ([`Self::keep`]) it is
/// unloaded when dropped: a failed open (a kernel missing from the image, no memory for the
/// ordering event) is retried by the next call for the device, which loads the module again,
/// and each try would otherwise leave a module's code and constants on the device.
struct LoadedModule<'a> {
    inner: &'a Inner,
    /// `None` once kept.
    module: Option<r::CUmodule>,
}

impl LoadedModule<'_> {
    fn get(&self) -> r::CUmodule {
        self.module.unwrap_or(std::ptr::null_mut())
    }

    /// The device opened: its functions are used for the rest of the process, whose exit
    /// unloads the module with the context.
    fn keep(mut self) {
        self.module = None;
    }
}

impl Drop for LoadedModule<'_> {
    fn drop(&mut self) {
        let Some(module) = self.module.take() else {
            return;
        };
        // No driver call once a shutdown has begun: the module is left loaded, as the
        // retained context is.
        if self.inner.live().is_err() {
            return;
        }
        // SAFETY: 1. `open_device` loaded `module` into the context it made current on this
        // thread, which nothing in between changed, and unloads it only here, once (`take`);
        // 2. the open failed, so no `Device` holds the module's functions and none was
        // launched.
        let _ = unsafe { r::module_unload(&self.inner.driver, module) };
    }
}

/// Tries the embedded images in order of preference. A shutdown that begins meanwhile stops
/// the search (a PTX image is JIT-compiled). When none loads, see [`no_image_loads`].
fn load_kernels(
    inner: &Inner,
    major: u32,
    minor: u32,
) -> Result<(r::CUmodule, String), BackendError> {
    let d = &inner.driver;
    let mut tried = Vec::new();
    for image in kernel::images_for(major, minor) {
        inner.live()?;
        let (bytes, name) = match image {
            Image::Fatbin(b) => (b, "fatbin".to_string()),
            Image::Cubin { arch, bytes } => (bytes, format!("sm_{arch} cubin")),
            Image::Ptx(b) => (b, "compute_80 PTX (JIT)".to_string()),
        };
        // SAFETY: 1. the images build.rs embedded: whole files, and the PTX with the NUL
        // kernel.rs appends to it.
        match unsafe { r::module_load_data(d, bytes) } {
            Ok(m) => return Ok((m, format!("{name}, {}", kernel::KERNEL_ORIGIN))),
            Err(e) => tried.push((name, e)),
        }
    }
    inner.live()?;
    Err(no_image_loads(
        tried,
        r::driver_version(d).ok(),
        major,
        minor,
    ))
}

/// The error of a device on which no embedded kernel image loads. Out of memory on any image
/// is that (the allocator frees cached memory and tries again), not a later image's error.
/// Otherwise the error names each image's error, the driver's version and the GPU's compute
/// capability, and, for the errors of an image the driver cannot use, the likely cause: a
/// driver older than the kernels' toolkit or a GPU older than the kernels support.
#[cold]
fn no_image_loads(
    tried: Vec<(String, BackendError)>,
    driver: Option<i32>,
    major: u32,
    minor: u32,
) -> BackendError {
    let oom = sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY.0 as i32;
    let mut tried = tried;
    if let Some(i) = tried
        .iter()
        .position(|(_, e)| matches!(e, BackendError::Driver { code, .. } if *code == oom))
    {
        return tried.swap_remove(i).1;
    }
    let hints: Vec<&str> = tried
        .iter()
        .filter_map(|(_, e)| match e {
            BackendError::Driver { code, .. } => unusable_image_hint(*code),
            _ => None,
        })
        .collect();
    let images: Vec<String> = tried
        .iter()
        .map(|(name, e)| format!("{name}: {e}"))
        .collect();
    let driver = match driver {
        Some(v) => format!("driver CUDA {}.{}", v / 1000, v % 1000 / 10),
        None => "driver version unknown".to_string(),
    };
    let mut msg = format!(
        "no embedded kernel image loads on this GPU (compute capability {major}.{minor}, \
         {driver}): {}",
        if images.is_empty() {
            "none embedded".to_string()
        } else {
            images.join("; ")
        }
    );
    let mut hints = hints;
    hints.sort_unstable();
    hints.dedup();
    for hint in hints {
        msg.push_str("; ");
        msg.push_str(hint);
    }
    BackendError::Other(msg)
}

/// The likely cause of a driver error that says it cannot use an image, for an operator.
fn unusable_image_hint(code: i32) -> Option<&'static str> {
    use sys::CUresult as E;
    let is = |e: E| code == e.0 as i32;
    if is(E::CUDA_ERROR_UNSUPPORTED_PTX_VERSION) || is(E::CUDA_ERROR_INVALID_PTX) {
        Some("the kernels' PTX needs a driver for CUDA 12.4 or later (R550 or newer)")
    } else if is(E::CUDA_ERROR_NO_BINARY_FOR_GPU) {
        Some("the kernels run on GPUs of compute capability 8.0 or higher")
    } else if is(E::CUDA_ERROR_JIT_COMPILER_NOT_FOUND) {
        Some(
            "the driver's PTX compiler (libnvidia-ptxjitcompiler) is missing: in a container, \
             mount the driver's utility libraries as well (NVIDIA_DRIVER_CAPABILITIES=compute,utility)",
        )
    } else {
        None
    }
}

fn stream_of(s: StreamHandle) -> CUstream {
    s.0 as usize as CUstream
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding these locks leaves only handles behind, which stay valid.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Backend for CudaBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Cuda
    }

    fn device_count(&self) -> u32 {
        self.inner.devices.len() as u32
    }

    fn allocate(&self, device: u32, len: u64) -> Result<DevicePtr, BackendError> {
        let (dev, _ctx) = self.inner.device(device)?;
        self.inner.live()?;
        let ptr = r::mem_alloc(&self.inner.driver, device, len)?;
        lock(&dev.live).insert(ptr, len);
        Ok(ptr)
    }

    fn release(&self, device: u32, addr: DevicePtr, _len: u64) -> Result<(), BackendError> {
        let (dev, _ctx) = self.inner.device(device)?;
        if lock(&dev.live).remove(&addr).is_none() {
            return Err(not_allocated(device, addr, 0));
        }
        free_parked(&self.inner, dev);
        // A shutdown that began while parked pages were freed: no driver call after it (the
        // block is leaked, as every block still held then).
        self.inner.live()?;
        // SAFETY: 1. an address `allocate` returned, removed from the live table just now, so
        // freed once; 2. the pool releases a block only after its last scrub was observed
        // complete.
        unsafe { r::mem_free(&self.inner.driver, addr) }
    }

    fn zero_fresh(
        &self,
        device: u32,
        addr: DevicePtr,
        len: u64,
        stream: StreamHandle,
    ) -> Result<(), BackendError> {
        let (dev, _ctx) = self.inner.device(device)?;
        dev.check_live(device, addr, len)?;
        let d = &self.inner.driver;
        let s = stream_of(stream);
        // SAFETY: 1. the caller passes a stream handle of this device (PyTorch's current stream).
        if unsafe { r::stream_is_capturing(d, s) }? {
            return Err(BackendError::StreamCapturing {
                stream: stream.0,
                what: "zeroing fresh memory",
            });
        }
        self.inner.live()?;
        let bytes =
            usize::try_from(len).map_err(|_| BackendError::Other(format!("{len} bytes")))?;
        // Stream-ordered, like the allocation itself: every later use on `stream`, and every
        // use on another stream that is ordered after it (the caller's stream semantics, as
        // PyTorch's), sees the zeros. No host synchronisation: a pool miss must not stall the
        // caller's queued work.
        // SAFETY: 1. `[addr, addr + len)` lies in an allocation of this device (checked above);
        // 2. stream as above.
        // A capture that refuses the memset (one begun since the query on a blocking stream,
        // while `s` is the legacy stream) is a capture, not a driver fault. One begun on `s`
        // itself in between takes the memset into its graph (docs/cuda.md, "CUDA graph
        // capture").
        unsafe { r::memset_d8_async(d, addr, bytes, s) }
            .map_err(|e| refused_by_capture(e, stream.0, "zeroing fresh memory"))
    }

    unsafe fn submit_scrub(
        &self,
        mut batch: ScrubBatch,
    ) -> Result<Box<dyn ScrubTicket>, BackendError> {
        let (dev, _ctx) = self.inner.device(batch.device)?;
        if batch.segments.is_empty() {
            return Ok(Box::new(CudaTicket::finished(self.inner.clone())));
        }
        let d = &self.inner.driver;
        self.inner.live()?;
        run_foreign_free_on_legacy(d, dev, &mut batch)?;
        let s = stream_of(batch.stream);
        // SAFETY: 1. the pool passes the stream the block was freed on, or the stream a
        // `kvh_scrub_blocks` caller named, a stream of this device (one of another device
        // was made a wait stream above), or a special handle.
        if unsafe { r::stream_is_capturing(d, s) }? {
            return Err(BackendError::StreamCapturing {
                stream: batch.stream.0,
                what: "scrub launch",
            });
        }
        self.inner.live()?;
        let mut plan = kernel::plan(&batch.segments, batch.options)
            .map_err(|e| BackendError::Other(format!("cannot scrub the batch: {}", e.0)))?;
        plan.params.skip_segment = self.inner.skip_segment.load(Ordering::Relaxed);
        // Ordered after the recorded streams before a slot is taken: a capture found or
        // refusing a call there defers the batch with no slot to give back (the flusher
        // retries a deferred batch every pass, and a slot is page-locked host memory, device
        // memory and events). A refused call came before anything of the batch's own on `s`.
        // The wait enqueued on `s` orders after work that was queued when it ran, which holds
        // every use of the freed block.
        order_after_wait_streams(&self.inner, dev, s, &batch.wait_streams, batch.stream)
            .map_err(|e| capture_refusal(e, batch.stream.0))?;
        let mut slot = acquire_slot(
            &self.inner,
            dev,
            plan.params.count as usize,
            plan.item_count,
        )?;
        // Asked again: making a slot (page-locked host memory, device memory, an event) may
        // take milliseconds, in which a capture may begin. Nothing is enqueued yet: the idle
        // slot goes back as it is. No driver call once exit began meanwhile (on this thread
        // too: a handler that exits inside a driver call is not waited for).
        if let Err(e) = self.inner.live() {
            lock(&dev.slots).push(slot);
            return Err(e);
        }
        // SAFETY: 1. as above.
        match unsafe { r::stream_is_capturing(d, s) } {
            Ok(false) => {}
            Ok(true) => {
                lock(&dev.slots).push(slot);
                return Err(BackendError::StreamCapturing {
                    stream: batch.stream.0,
                    what: "scrub launch",
                });
            }
            Err(e) => {
                lock(&dev.slots).push(slot);
                return Err(e);
            }
        }
        let shape = ItemGrid::from_u8(self.inner.item_grid.load(Ordering::Relaxed));
        let mut queued = false;
        match enqueue(
            &self.inner,
            dev,
            &mut slot,
            &mut plan,
            &batch,
            shape,
            &mut queued,
        ) {
            Ok(()) => Ok(Box::new(CudaTicket {
                inner: self.inner.clone(),
                device: batch.device,
                slot: Some(slot),
                count: batch.segments.len(),
                done: None,
            })),
            // Shutdown began part way: no further driver call, the slot is leaked.
            Err(BackendError::ShuttingDown) => Err(BackendError::ShuttingDown),
            // A capture refused the batch's first call on the stream: nothing of the slot's was
            // queued, and its last use had completed (`acquire_slot`), so it is as idle as it
            // was. Back for reuse; the batch is deferred as any capture's.
            Err(e @ BackendError::StreamCapturing { .. }) if !queued => {
                lock(&dev.slots).push(slot);
                Err(e)
            }
            // A capture refused the batch after the sums' clearing was queued, before its scrub
            // kernel was launched (`enqueue`): an event recorded on the stream now could be
            // captured too, and the slot never read as idle again, while the queued clearing
            // could run under another batch's use of it. Leaked (a rare race), the batch
            // deferred as any capture's.
            Err(e @ BackendError::StreamCapturing { .. }) => Err(e),
            Err(e) => {
                give_back_after_error(&self.inner, dev, slot, s);
                Err(e)
            }
        }
    }

    fn is_capturing(&self, device: u32, stream: StreamHandle) -> Result<bool, BackendError> {
        let (_dev, _ctx) = self.inner.device(device)?;
        // SAFETY: 1. a stream handle of this device, as given by the caller.
        unsafe { r::stream_is_capturing(&self.inner.driver, stream_of(stream)) }
    }

    fn write(&self, device: u32, addr: DevicePtr, src: &[u8]) -> Result<(), BackendError> {
        let (dev, _ctx) = self.inner.device(device)?;
        dev.check_live(device, addr, src.len() as u64)?;
        let d = &self.inner.driver;
        // Device work on non-blocking streams is not ordered with this copy: wait for it.
        r::ctx_synchronize(d)?;
        self.inner.live()?;
        // SAFETY: 1. `[addr, addr + src.len())` lies in an allocation of this device (checked
        // above).
        unsafe { r::memcpy_htod(d, addr, src) }?;
        self.inner.live()?;
        r::ctx_synchronize(d)
    }

    fn read(&self, device: u32, addr: DevicePtr, dst: &mut [u8]) -> Result<(), BackendError> {
        let (dev, _ctx) = self.inner.device(device)?;
        dev.check_live(device, addr, dst.len() as u64)?;
        let d = &self.inner.driver;
        r::ctx_synchronize(d)?;
        self.inner.live()?;
        // SAFETY: 1. `[addr, addr + dst.len())` lies in an allocation of this device (checked
        // above).
        unsafe { r::memcpy_dtoh(d, dst, addr) }
    }

    /// No driver call is made once this returns (invariant 6): entry points begun before it
    /// stop at their next step, and it waits for them, up to `SHUTDOWN_WAIT` (one blocked
    /// in the driver on a hung device is left there).
    fn shutdown(&self) {
        self.inner.shutting_down.store(true, Ordering::SeqCst);
        let own = CALLS_HERE.with(Cell::get);
        let deadline = Instant::now() + SHUTDOWN_WAIT;
        while self.inner.calls.load(Ordering::SeqCst) > own && Instant::now() < deadline {
            std::thread::sleep(Duration::from_micros(50));
        }
    }
}

/// Makes the device's first batch slot as it opens, for a batch of the default size (inline,
/// no work items). A slot's sums are device memory, and a server often fills its device (a KV
/// cache sized to what the model left) before its first free: a slot made then could never
/// be had, every freed block would stay pending, and an allocation out of memory could
/// release nothing. Without memory for it now, slots are made as batches come, as before
/// (what was allocated goes to the device's spare buffers).
#[cold]
fn reserve_slot(inner: &Inner, dev: &Device) {
    // The opening's last driver call may have outlasted the start of a shutdown.
    if inner.live().is_err() {
        return;
    }
    if let Ok(slot) = new_slot(inner, dev, MIN_SLOT_SEGMENTS, 0) {
        lock(&dev.slots).push(slot);
    }
}

/// An idle slot for `segments` segments and `items` work items whose last use has completed,
/// or a new one.
fn acquire_slot(
    inner: &Inner,
    dev: &Device,
    segments: usize,
    items: usize,
) -> Result<Slot, BackendError> {
    let d = &inner.driver;
    {
        let mut idle = lock(&dev.slots);
        let mut i = 0;
        while i < idle.len() {
            if idle[i].segments >= segments && idle[i].item_capacity >= items {
                inner.live()?;
                // SAFETY: 1. the slot's event is live (never destroyed).
                match unsafe { r::event_query(d, idle[i].done.0) } {
                    Ok(true) => return Ok(idle.swap_remove(i)),
                    Ok(false) => {}
                    // A slot whose event errs may still be in use: never reuse it (drop it
                    // from the list; its buffers are leaked, not freed), and keep looking
                    // rather than failing every later batch.
                    Err(_) => {
                        idle.swap_remove(i);
                        continue;
                    }
                }
            }
            i += 1;
        }
    }
    inner.live()?;
    match new_slot(
        inner,
        dev,
        segments.max(MIN_SLOT_SEGMENTS).next_power_of_two(),
        items,
    ) {
        Err(e @ BackendError::OutOfMemory { .. }) if items > 0 => {
            with_more_items(inner, dev, segments, items)?.ok_or(e)
        }
        other => other,
    }
}

/// An idle slot with room for `segments` results, whose last use has completed, given a new
/// work item area for `items`: page-locked host memory only. A full device has no memory for
/// a new slot's sums, and a batch too large for the inline parameter (a KV scrub, a batch that
/// grew while it waited) would otherwise wait for good beside the slot the device made as it
/// opened, which has no work item area. The area it had is parked, freed at the next release.
/// `Ok(None)` when there is no such slot or no host memory for the area either; an error only
/// when shutdown began meanwhile.
#[cold]
fn with_more_items(
    inner: &Inner,
    dev: &Device,
    segments: usize,
    items: usize,
) -> Result<Option<Slot>, BackendError> {
    let d = &inner.driver;
    let mut slot = {
        let mut idle = lock(&dev.slots);
        // A completed slot with room for the items (its batch completed since `acquire_slot`
        // looked) is taken as it is; else the first completed one with room for the results.
        let mut found = None;
        for (i, slot) in idle.iter().enumerate() {
            if slot.segments < segments {
                continue;
            }
            inner.live()?;
            // SAFETY: 1. the slot's event is live (never destroyed).
            if let Ok(true) = unsafe { r::event_query(d, slot.done.0) } {
                if slot.item_capacity >= items {
                    return Ok(Some(idle.swap_remove(i)));
                }
                found.get_or_insert(i);
            }
        }
        let Some(i) = found else {
            return Ok(None);
        };
        idle.swap_remove(i)
    };
    let len = items.next_power_of_two() * ITEM_BYTES;
    let mut spare = lock(&dev.spare);
    let area = inner
        .live()
        .and_then(|()| mapped(inner, dev.ordinal, len, &mut spare.parked));
    match area {
        Ok((area, len)) => {
            if let Some(old) = slot.items.replace(area) {
                spare.parked.push(Parked::Host(old.host));
            }
            slot.item_capacity = len / ITEM_BYTES;
            Ok(Some(slot))
        }
        Err(e) => {
            drop(spare);
            lock(&dev.slots).push(slot);
            match e {
                BackendError::ShuttingDown => Err(e),
                _ => Ok(None),
            }
        }
    }
}

/// A new batch slot, built from the device's spare buffers where they are large enough. When a
/// step fails, what the steps before it allocated goes to the spare buffers ([`Spare`]), not
/// back to the driver; once shutdown has begun (checked between the driver calls) nothing
/// more is called: what was allocated is leaked, as everything is at exit.
#[cold]
fn new_slot(
    inner: &Inner,
    dev: &Device,
    segments: usize,
    items: usize,
) -> Result<Slot, BackendError> {
    let mut spare = lock(&dev.spare);
    let mut parts = SlotParts::default();
    match build_slot(inner, dev.ordinal, segments, items, &mut spare, &mut parts) {
        Ok(done) => parts.into_slot(done),
        Err(e) => {
            parts.give_to(&mut spare);
            Err(e)
        }
    }
}

/// The buffers a slot being built has so far, each with its size in bytes.
#[derive(Default)]
struct SlotParts {
    sums: Option<(CUdeviceptr, usize)>,
    results: Option<(Mapped, usize)>,
    items: Option<(Mapped, usize)>,
}

impl SlotParts {
    /// The slot, sized by what its buffers hold: spare ones may be larger than its batch
    /// asked for, and a later, larger batch can then use the slot.
    fn into_slot(self, done: CUevent) -> Result<Slot, BackendError> {
        let (Some((sums, sums_bytes)), Some((results, results_bytes))) = (self.sums, self.results)
        else {
            // build_slot sets both before it returns Ok.
            return Err(BackendError::Other(
                "a batch slot without its buffers".into(),
            ));
        };
        let (items, item_bytes) = self.items.map_or((None, 0), |(m, len)| (Some(m), len));
        Ok(Slot {
            segments: sums_bytes.min(results_bytes) / RESULT_BYTES,
            sums,
            sums_dirty: true,
            results,
            items,
            item_capacity: item_bytes / ITEM_BYTES,
            done: Handle(done),
        })
    }

    fn give_to(self, spare: &mut Spare) {
        if let Some(sums) = self.sums {
            Spare::keep(&mut spare.sums, sums, &mut spare.parked, Parked::Device);
        }
        let host = |m: Mapped| Parked::Host(m.host);
        if let Some(results) = self.results {
            Spare::keep(&mut spare.results, results, &mut spare.parked, host);
        }
        if let Some(items) = self.items {
            Spare::keep(&mut spare.items, items, &mut spare.parked, host);
        }
    }
}

/// Gets a slot's buffers into `parts` (from `spare` where one is large enough) and creates its
/// completion event.
fn build_slot(
    inner: &Inner,
    device: u32,
    segments: usize,
    items: usize,
    spare: &mut Spare,
    parts: &mut SlotParts,
) -> Result<CUevent, BackendError> {
    let d = &inner.driver;
    let bytes = segments * RESULT_BYTES;
    parts.sums = Some(match Spare::take(&mut spare.sums, bytes) {
        Some(kept) => kept,
        None => (r::mem_alloc(d, device, bytes as u64)?, bytes),
    });
    inner.live()?;
    parts.results = Some(match Spare::take(&mut spare.results, bytes) {
        Some(kept) => kept,
        None => mapped(inner, device, bytes, &mut spare.parked)?,
    });
    if items > 0 {
        inner.live()?;
        let capacity = items.next_power_of_two();
        let len = capacity * ITEM_BYTES;
        parts.items = Some(match Spare::take(&mut spare.items, len) {
            Some(kept) => kept,
            None => mapped(inner, device, len, &mut spare.parked)?,
        });
    }
    inner.live()?;
    r::event_create(d, device)
}

/// `len` bytes of page-locked host memory mapped into the device. Pages whose mapping fails are
/// parked, not freed here (`cuMemFreeHost` synchronises the device too).
fn mapped(
    inner: &Inner,
    device: u32,
    len: usize,
    parked: &mut Vec<Parked>,
) -> Result<(Mapped, usize), BackendError> {
    let d = &inner.driver;
    let host = Handle(r::mem_host_alloc(d, device, len)?);
    // SAFETY: 1. allocated just above with DEVICEMAP.
    let dev = inner
        .live()
        .and_then(|()| unsafe { r::host_device_pointer(d, host.0) });
    match dev {
        Ok(dev) => Ok((Mapped { host, dev }, len)),
        Err(e) => {
            parked.push(Parked::Host(host));
            Err(e)
        }
    }
}

/// Frees the spare buffers that were displaced (`Spare::parked`), with `dev`'s context current
/// and outside the free path.
fn free_parked(inner: &Inner, dev: &Device) {
    let parked = std::mem::take(&mut lock(&dev.spare).parked);
    let d = &inner.driver;
    for p in parked {
        if inner.live().is_err() {
            return; // exit has begun: leaked, as everything is
        }
        match p {
            // SAFETY: 1-2. a slot's sums that no slot holds (a slot's build failed before any
            // work used it), parked once.
            Parked::Device(ptr) => drop(unsafe { r::mem_free(d, ptr) }),
            // SAFETY: 1. a slot's page-locked buffer that no slot holds, parked once.
            Parked::Host(host) => drop(unsafe { r::mem_free_host(d, host.0) }),
        }
    }
}

/// The device `probe()` opens, so that a kernel image that does not load is reported before
/// the first allocation: that of the calling thread's current context when there is one (the
/// device the process works on: each worker of a multi-GPU job has made its own current
/// before allocating), else device 0. Device 0 in every worker would create a context there
/// in each (hundreds of MiB of its memory), and fail the workers of the other devices where
/// device 0 is in exclusive-process or prohibited compute mode.
fn first_device(d: &Driver, count: u32) -> u32 {
    match r::ctx_get_current(d) {
        Ok(ctx) if !ctx.is_null() => r::ctx_get_device(d)
            .ok()
            .and_then(|dev| u32::try_from(dev).ok())
            .filter(|&dev| dev < count)
            .unwrap_or(0),
        _ => 0,
    }
}

/// A driver error that says a capture refused the call (`CUDA_ERROR_STREAM_CAPTURE_*` and
/// `CUDA_ERROR_CAPTURED_EVENT`, codes 900 to 908: the legacy stream used while a blocking
/// stream of its context captures, say) before the scrub kernel was launched is the capture
/// found after the check: the work is deferred as for a capture found before it, not failed
/// (a failed scrub quarantines blocks that were never read back, and logs a verification
/// failure that did not happen). `enqueue` maps only the calls before the launch.
fn capture_refusal(e: BackendError, stream: u64) -> BackendError {
    refused_by_capture(e, stream, "scrub launch")
}

/// [`capture_refusal`] for a call whose refusal says that `stream` is capturing.
fn refused_by_capture(e: BackendError, stream: u64, what: &'static str) -> BackendError {
    match e {
        BackendError::Driver {
            code: 900..=908, ..
        } => BackendError::StreamCapturing { stream, what },
        other => other,
    }
}

/// What a capture of a recorded stream defers.
const ORDERING_AFTER: &str = "scrub ordering after a recorded stream";

/// The ordering of the scrub stream after recorded stream `w`, refused by a capture: a
/// refused record of the event on `w` (any capture code) names `w`, as does a wait for it
/// that the driver refuses because the record was captured ([`wait_refusal`]); other
/// refusals of the wait concern the scrub stream and are left to [`capture_refusal`].
fn record_refusal(e: BackendError, w: StreamHandle) -> BackendError {
    refused_by_capture(e, w.0, ORDERING_AFTER)
}

/// See [`record_refusal`].
fn wait_refusal(e: BackendError, w: StreamHandle) -> BackendError {
    match e {
        BackendError::Driver { code, .. }
            if code == sys::CUresult::CUDA_ERROR_CAPTURED_EVENT.0 as i32 =>
        {
            BackendError::StreamCapturing {
                stream: w.0,
                what: ORDERING_AFTER,
            }
        }
        other => other,
    }
}

/// After a failed enqueue, some work may be queued: mark the slot's completion point so that
/// `acquire_slot` reuses it only after that work (with its sums cleared first), or leak it when
/// even that fails.
#[cold]
fn give_back_after_error(inner: &Inner, dev: &Device, mut slot: Slot, s: CUstream) {
    let d = &inner.driver;
    slot.sums_dirty = true;
    if inner.live().is_err() {
        return; // no driver call once shutdown has begun: the slot is leaked
    }
    // SAFETY: 1. live event and the batch's stream, context current.
    if unsafe { r::event_record(d, slot.done.0, s) }.is_ok() {
        lock(&dev.slots).push(slot);
    }
}

/// Enqueues one batch on its stream, which `submit_scrub` has ordered after the batch's wait
/// streams (see the module docs for the order). `queued` is set once a call has queued work
/// of the slot's on the stream: until then a failure leaves the slot as idle as it was.
fn enqueue(
    inner: &Inner,
    dev: &Device,
    slot: &mut Slot,
    plan: &mut kernel::Plan,
    batch: &ScrubBatch,
    shape: ItemGrid,
    queued: &mut bool,
) -> Result<(), BackendError> {
    let d = &inner.driver;
    let s = stream_of(batch.stream);
    inner.live()?;
    let n = plan.params.count as usize;
    // Until the scrub kernel is launched, a capture's refusal of a call is a capture found
    // late: nothing was launched on the caller's memory, and the batch is deferred. Once it
    // is launched, a refusal is a failure: the kernel may run, and its blocks must be handled
    // as a failed scrub's (the KV path orders later frees after it), never as untouched.
    let refused = |e| capture_refusal(e, batch.stream.0);
    if slot.sums_dirty {
        // SAFETY: 1. the slot's sums hold `segments >= n` results, device memory of this
        // context that only this slot's batches use; 2. the batch's stream.
        unsafe { r::memset_d8_async(d, slot.sums, slot.segments * RESULT_BYTES, s) }
            .map_err(refused)?;
        *queued = true;
        slot.sums_dirty = false;
    }
    // Clear the host's result slots: a segment the kernel never reaches reads "0 checked",
    // which fails, rather than a previous batch's result.
    // SAFETY: the result area holds `segments >= n` slots, and the slot is idle (its previous
    // batch completed), so the device does not write it now.
    unsafe { std::ptr::write_bytes(slot.results.host.0, 0, n * RESULT_BYTES) };
    if plan.item_count > 0 {
        let area = match &slot.items {
            Some(items) if slot.item_capacity >= plan.item_count => items,
            _ => {
                return Err(BackendError::Other(
                    "batch slot has no room for the work items".to_string(),
                ))
            }
        };
        // SAFETY: the area is page-locked host memory of `item_capacity >= item_count`
        // DeviceChunks (page-aligned, so aligned for them; plain data, any bytes valid),
        // allocated for this slot alone; the slot is idle (its last batch completed), so the
        // device does not read it while the host writes.
        let out = unsafe {
            std::slice::from_raw_parts_mut(area.host.0.cast::<DeviceChunk>(), plan.item_count)
        };
        if plan.write_items(&batch.segments, out) != plan.item_count {
            return Err(BackendError::Other(
                "the batch's work items do not match its plan".to_string(),
            ));
        }
        plan.params.chunks = area.dev;
    }
    plan.params.sums = slot.sums;
    plan.params.results = slot.results.dev;
    inner.live()?;
    if plan.total_chunks > 0 {
        let (f, blocks) = scrub_launch(dev, plan, shape);
        let grid = u32::try_from(blocks)
            .map_err(|_| BackendError::Other(format!("{blocks} blocks in one launch")))?;
        launch(d, f, grid, s, &mut plan.params).map_err(refused)?;
        *queued = true;
        // A launch may block (a full launch queue) while shutdown begins.
        inner.live()?;
    }
    if plan.needs_publish {
        // The scrub kernel has added to the sums; from here a failure leaves them dirty.
        slot.sums_dirty = true;
        launch(
            d,
            dev.publish_fn.0,
            kernel::publish_grid(plan.params.count),
            s,
            &mut plan.params,
        )?;
        slot.sums_dirty = false;
        inner.live()?;
    }
    // SAFETY: 1. live event, the batch's stream.
    unsafe { r::event_record(d, slot.done.0, s) }
}

/// Launches one of the kernels (all take the batch's parameter block by value).
fn launch(
    d: &Driver,
    f: CUfunction,
    grid: u32,
    s: CUstream,
    params: &mut kernel::BatchParams,
) -> Result<(), BackendError> {
    let mut args: [*mut c_void; 1] = [(params as *mut kernel::BatchParams).cast()];
    let shape = r::LaunchShape {
        grid,
        block: kernel::BLOCK_THREADS,
    };
    // SAFETY: 1. a function of the device's module, its context current; 2. one parameter of
    // the kernels' type `KvhBatch` (BatchParams is its repr(C) twin, checked by a layout test),
    // alive until the call returns; 3. the batch's stream; 4. the parameter names segments
    // inside allocations of this device that nothing else writes until the batch completes
    // (contracts 1 and 2 of `submit_scrub`, whose only caller is `enqueue`), sums of `count`
    // slots in device memory, and result slots and work items in mapped page-locked memory of
    // the slot, which stays allocated and unused by others until the slot's completion
    // event; 5. the grid is the
    // kernel's (`scrub_launch`, `publish_grid`): `kvh_scrub` gets `chunk_count` blocks and block
    // c reads item c of a batch with items; `kvh_scrub_strided` runs only for a batch with items
    // and reads items below `chunk_count`; all `chunk_count` items were written for this batch
    // (`enqueue` checks the count `write_items` returns).
    unsafe { r::launch_kernel(d, f, shape, s, &mut args) }
}

/// Makes `s` wait for all work queued so far on every other stream in `waits`. A wait stream
/// that is capturing a graph is refused like a capturing scrub stream: recording the event
/// there would add it to the graph instead of marking the work queued now. An event can be
/// recorded only on a stream of its own context, so a wait stream of another device (a
/// block recorded with a stream of another GPU, as around a peer copy) is ordered through
/// an event of that stream's context ([`order_after_foreign_stream`]). Checks for a shutdown
/// before each driver call.
fn order_after_wait_streams(
    inner: &Inner,
    dev: &Device,
    s: CUstream,
    waits: &[StreamHandle],
    own: StreamHandle,
) -> Result<(), BackendError> {
    let d = &inner.driver;
    let mut others = Vec::new();
    for &w in waits.iter().filter(|w| **w != own) {
        inner.live()?;
        let foreign = foreign_context(d, dev, w)?;
        inner.live()?;
        // SAFETY: 1. a stream recorded for the block through kvh_record_stream, live until
        // the block's scrub is submitted (`submit_scrub`'s contract 3), whose context is
        // current when this runs.
        let query = || unsafe { r::stream_is_capturing(d, stream_of(w)) };
        let capturing = match foreign {
            None => query()?,
            // SAFETY: 1. `ctx` is the context of `w`, a live stream; `dev.ctx` was retained by
            // `open_device` and is never released.
            Some(ctx) => unsafe { in_context(inner, ctx, dev.ctx.0, query) }?,
        };
        if capturing {
            return Err(BackendError::StreamCapturing {
                stream: w.0,
                what: ORDERING_AFTER,
            });
        }
        others.push((w, foreign));
    }
    let ev = lock(&dev.order_event);
    for (w, foreign) in others {
        inner.live()?;
        if let Some(ctx) = foreign {
            order_after_foreign_stream(inner, dev, s, w, ctx)?;
            continue;
        }
        // SAFETY: 1. live event of this device's context; `w` is a stream recorded for the
        // block through kvh_record_stream (PyTorch's), of this device.
        unsafe { r::event_record(d, ev.0, stream_of(w)) }.map_err(|e| record_refusal(e, w))?;
        inner.live()?;
        // SAFETY: as for the query above.
        refuse_captured_record(unsafe { r::stream_is_capturing(d, stream_of(w)) }?, w)?;
        inner.live()?;
        // SAFETY: 1. `s` is the batch's stream, of this device, whose context is current;
        // 2. live event.
        unsafe { r::stream_wait_event(d, s, ev.0) }.map_err(|e| wait_refusal(e, w))?;
    }
    Ok(())
}

/// Refuses the wait for an event just recorded on wait stream `w` when `w` is capturing now
/// (`capturing`, asked after the record): a capture begun on `w` after its first query may have
/// captured the record, and a stream that waits for a captured event is not refused by the
/// driver but joins the capture, so that the application's capture would end unjoined
/// (`CUDA_ERROR_STREAM_CAPTURE_UNJOINED`) and the scrub stream's work would go into its
/// graph. Not capturing after the record, the record was not captured. The batch is deferred,
/// as for a capture found by the first query.
fn refuse_captured_record(capturing: bool, w: StreamHandle) -> Result<(), BackendError> {
    if capturing {
        return Err(BackendError::StreamCapturing {
            stream: w.0,
            what: ORDERING_AFTER,
        });
    }
    Ok(())
}

/// The context of wait stream `w` when it is not `dev`'s own, else `None`. The special
/// handles (NULL, `CU_STREAM_LEGACY`, `CU_STREAM_PER_THREAD`) name a stream of the current
/// context, which is `dev`'s here.
fn foreign_context(
    d: &Driver,
    dev: &Device,
    w: StreamHandle,
) -> Result<Option<CUcontext>, BackendError> {
    if w.0 <= 2 {
        return Ok(None);
    }
    // SAFETY: 1. a stream recorded for the block through kvh_record_stream, or the stream it
    // was freed on: live until its scrub is submitted (`submit_scrub`'s contract 3).
    let ctx = unsafe { r::stream_get_ctx(d, stream_of(w)) }?;
    Ok((ctx != dev.ctx.0).then_some(ctx))
}

/// A batch whose own stream is of another context than its device's (a block freed by
/// `cudaFreeAsync` on a stream of another GPU, which the runtime accepts) cannot be launched
/// there: the driver refuses a launch into a stream of another context. Such a batch runs on
/// its device's legacy stream instead, ordered after the caller's stream as after a stream
/// recorded for the block (`order_after_foreign_stream`): the scrub still follows every use
/// queued on it.
fn run_foreign_free_on_legacy(
    d: &Driver,
    dev: &Device,
    batch: &mut ScrubBatch,
) -> Result<(), BackendError> {
    if foreign_context(d, dev, batch.stream)?.is_some() {
        batch.wait_streams.push(batch.stream);
        batch.stream = StreamHandle::LEGACY;
    }
    Ok(())
}

/// Makes `s`, a stream of `dev`, wait for the work queued so far on `w`, a stream of another
/// context `ctx`: through an event created in `ctx` for this wait, recorded on `w`, waited
/// for by `s` (a stream may wait for an event of another device) and destroyed (the driver
/// releases it once its work completed). One event per such wait, not one kept per pair of
/// devices, because the case is rare: PyTorch records a block with streams of its own device
/// except around peer copies.
fn order_after_foreign_stream(
    inner: &Inner,
    dev: &Device,
    s: CUstream,
    w: StreamHandle,
    ctx: CUcontext,
) -> Result<(), BackendError> {
    let d = &inner.driver;
    let home = dev.ctx.0;
    // Runs with `ctx` current. A shutdown that begins meanwhile leaks the event: no driver
    // call after it.
    let create_and_record = || {
        let ev = r::event_create(d, dev.ordinal).map_err(|e| match e {
            // Out of memory on the wait stream's device, not the block's: named so.
            BackendError::OutOfMemory { requested, .. } if inner.live().is_ok() => {
                match r::ctx_get_device(d) {
                    Ok(other) => BackendError::OutOfMemory {
                        device: u32::try_from(other).unwrap_or(dev.ordinal),
                        requested,
                    },
                    Err(_) => e,
                }
            }
            other => other,
        })?;
        inner.live()?;
        // SAFETY: 1. `ev` was created in `ctx` just now and `w` is a stream of `ctx`.
        let recorded = unsafe { r::event_record(d, ev, stream_of(w)) }
            .map_err(|e| record_refusal(e, w))
            .and_then(|()| {
                inner.live()?;
                // SAFETY: 1. `w` is a live stream of `ctx`, current here.
                refuse_captured_record(unsafe { r::stream_is_capturing(d, stream_of(w)) }?, w)
            });
        match recorded {
            Ok(()) => Ok(ev),
            Err(e) => {
                inner.live()?;
                // SAFETY: 1. created above; waited for by nothing (a record taken in a
                // capture, or none).
                let _ = unsafe { r::event_destroy(d, ev) };
                Err(e)
            }
        }
    };
    // SAFETY (both `in_context` calls): 1. `ctx` is the context of `w`, a live stream; `home`
    // was retained by `open_device` and is never released.
    let ev = unsafe { in_context(inner, ctx, home, create_and_record) }?;
    inner.live()?;
    // SAFETY: 1. `s` is the batch's stream, of `dev`, whose context is current; 2. `ev` is
    // live (destroyed below).
    let waited = unsafe { r::stream_wait_event(d, s, ev) };
    inner.live()?;
    // SAFETY: 1. `ev` is live, and nothing but the wait queued above (which took its state
    // when queued) uses it.
    let destroy = || unsafe { r::event_destroy(d, ev) };
    // SAFETY: as above.
    unsafe { in_context(inner, ctx, home, destroy) }?;
    waited.map_err(|e| wait_refusal(e, w))
}

/// Runs `f` with `ctx` current on this thread, then makes `home` current again. Checks for a
/// shutdown before each of its driver calls and before `f`: after one began, `home` is not
/// restored (no driver call then), and the entry point returns `ShuttingDown`.
///
/// # Safety
/// 1. `ctx` and `home` must be live contexts.
unsafe fn in_context<T>(
    inner: &Inner,
    ctx: CUcontext,
    home: CUcontext,
    f: impl FnOnce() -> Result<T, BackendError>,
) -> Result<T, BackendError> {
    let d = &inner.driver;
    inner.live()?;
    // SAFETY: contract 1.
    unsafe { r::ctx_set_current(d, ctx) }?;
    // No driver call after a shutdown began: `home` is left unrestored then.
    inner.live()?;
    let out = f();
    inner.live()?;
    // SAFETY: contract 1.
    unsafe { r::ctx_set_current(d, home) }?;
    out
}

/// An in-flight batch: completion is its slot's event; results are in the slot's page-locked
/// result area once that event has completed.
struct CudaTicket {
    inner: Arc<Inner>,
    device: u32,
    slot: Option<Slot>,
    count: usize,
    done: Option<Vec<SegmentResult>>,
}

impl CudaTicket {
    fn finished(inner: Arc<Inner>) -> Self {
        CudaTicket {
            inner,
            device: 0,
            slot: None,
            count: 0,
            done: Some(Vec::new()),
        }
    }

    /// Copies the results out of a completed slot and returns the slot to the idle list.
    fn harvest(&mut self, dev: &Device) -> Vec<SegmentResult> {
        let Some(slot) = self.slot.take() else {
            return Vec::new();
        };
        let base = slot.results.host.0.cast::<SegmentResult>();
        let results = (0..self.count)
            // SAFETY: the completion event has been observed, so every kernel write into the
            // slot's result area (`count` SegmentResults, repr(C) pairs of u64) has completed;
            // volatile because the device wrote it behind the compiler's back.
            .map(|i| unsafe { std::ptr::read_volatile(base.add(i)) })
            .collect();
        lock(&dev.slots).push(slot);
        results
    }

    fn finish(
        &mut self,
        complete: impl FnOnce(&Driver, CUevent) -> Result<bool, BackendError>,
    ) -> Result<Option<Vec<SegmentResult>>, BackendError> {
        if let Some(done) = &self.done {
            return Ok(Some(done.clone()));
        }
        let inner = self.inner.clone();
        let (dev, _ctx) = inner.device(self.device)?;
        let Some(slot) = &self.slot else {
            return Err(BackendError::Other(
                "scrub ticket lost its slot".to_string(),
            ));
        };
        if !complete(&inner.driver, slot.done.0)? {
            return Ok(None);
        }
        let results = self.harvest(dev);
        self.done = Some(results.clone());
        Ok(Some(results))
    }
}

impl ScrubTicket for CudaTicket {
    fn poll(&mut self) -> Result<Option<Vec<SegmentResult>>, BackendError> {
        // SAFETY: 1. the slot's event is live while the ticket holds the slot.
        self.finish(|d, ev| unsafe { r::event_query(d, ev) })
    }

    fn wait(&mut self) -> Result<Vec<SegmentResult>, BackendError> {
        let got = self.finish(|d, ev| {
            // SAFETY: 1. as above.
            unsafe { r::event_synchronize(d, ev) }?;
            Ok(true)
        })?;
        got.ok_or_else(|| BackendError::Other("event synchronised but not complete".to_string()))
    }
}

impl Drop for CudaTicket {
    fn drop(&mut self) {
        // An abandoned batch's slot goes back to the idle list; `acquire_slot` reuses it only
        // once its event reports completion. After shutdown it is leaked with everything else.
        // Its sums are cleared before its next batch: a ticket dropped unharvested (abandoned,
        // or after its event's query or synchronisation failed) cannot tell whether the
        // publish kernel that clears them ran, and sums left over would be added to the next
        // batch's and could publish a pass for a segment never read back.
        if let Some(mut slot) = self.slot.take() {
            slot.sums_dirty = true;
            if let Some(dev) = self
                .inner
                .devices
                .get(self.device as usize)
                .and_then(|c| c.get())
            {
                lock(&dev.slots).push(slot);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parked_sizes(parked: &[Parked]) -> Vec<CUdeviceptr> {
        parked
            .iter()
            .map(|p| match p {
                Parked::Device(ptr) => *ptr,
                Parked::Host(_) => panic!("a device buffer parked as a host one"),
            })
            .collect()
    }

    #[test]
    fn the_larger_spare_is_kept_and_the_smaller_parked() {
        // Buffers named by their size, to tell them apart.
        let (mut kept, mut parked) = (None, Vec::new());
        Spare::keep(&mut kept, (512, 512), &mut parked, Parked::Device);
        assert_eq!((kept, parked.len()), (Some((512, 512)), 0));
        Spare::keep(&mut kept, (256, 256), &mut parked, Parked::Device);
        assert_eq!(kept, Some((512, 512)));
        Spare::keep(&mut kept, (1024, 1024), &mut parked, Parked::Device);
        assert_eq!(kept, Some((1024, 1024)));
        assert_eq!(parked_sizes(&parked), vec![256, 512]);
        // Taken only when large enough, and then gone.
        assert_eq!(Spare::take(&mut kept, 2048), None);
        assert_eq!(Spare::take(&mut kept, 1000), Some((1024, 1024)));
        assert_eq!(Spare::take(&mut kept, 1), None);
    }

    /// A capture's refusal of a launch, a memset or an event record (codes 900 to 908) is a
    /// capture found late, deferred; any other driver error stays one.
    #[test]
    fn a_capture_error_from_the_enqueue_defers_and_others_fail() {
        let driver = |code| BackendError::Driver {
            call: "cuLaunchKernel",
            code,
            name: "x".into(),
        };
        for code in [900, 906, 908] {
            assert_eq!(
                capture_refusal(driver(code), 7),
                BackendError::StreamCapturing {
                    stream: 7,
                    what: "scrub launch"
                }
            );
        }
        for code in [2, 700, 899, 909] {
            assert_eq!(capture_refusal(driver(code), 7), driver(code));
        }
    }
}

//! Thin wrappers over the driver entry points: each returns `Result<_, BackendError>` whose
//! error keeps the call's name, the CUDA error code and the driver's name for it
//! (`cuGetErrorName`). No policy lives here; `safe` decides what to call when.
//!
//! Functions taking raw handles or addresses are `unsafe`: the driver cannot check that a
//! device address belongs to the caller, and a stale handle is undefined behaviour in the
//! driver.

use std::ffi::{c_uint, c_void, CStr};

use super::loader::Driver;
use super::sys;
use crate::backend::BackendError;

pub use sys::{CUcontext, CUdevice, CUdeviceptr, CUevent, CUfunction, CUmodule, CUstream};

/// Turns a `CUresult` into a `Result`, naming the call.
pub fn check(driver: &Driver, call: &'static str, code: sys::CUresult) -> Result<(), BackendError> {
    if code == sys::CUresult::CUDA_SUCCESS {
        return Ok(());
    }
    Err(BackendError::Driver {
        call,
        code: code.0 as i32,
        name: error_name(driver, code),
    })
}

/// The driver's symbolic name of `code` (`CUDA_ERROR_OUT_OF_MEMORY`), or "unknown".
pub fn error_name(driver: &Driver, code: sys::CUresult) -> String {
    let mut ptr: *const std::ffi::c_char = std::ptr::null();
    // SAFETY: cuGetErrorName writes a pointer to a static string or leaves it NULL and returns
    // CUDA_ERROR_INVALID_VALUE for unknown codes; `ptr` is a valid out-pointer.
    let rc = unsafe { driver.api().cuGetErrorName(code, &mut ptr) };
    if rc != sys::CUresult::CUDA_SUCCESS || ptr.is_null() {
        return "unknown".to_string();
    }
    // SAFETY: the driver returned a NUL-terminated string with static lifetime.
    unsafe { CStr::from_ptr(ptr) }
        .to_string_lossy()
        .into_owned()
}

pub fn init(d: &Driver) -> Result<(), BackendError> {
    // SAFETY: cuInit takes no pointers; flags must be 0.
    check(d, "cuInit", unsafe { d.api().cuInit(0) })
}

pub fn driver_version(d: &Driver) -> Result<i32, BackendError> {
    let mut v = 0;
    // SAFETY: `v` is a valid out-pointer.
    check(d, "cuDriverGetVersion", unsafe {
        d.api().cuDriverGetVersion(&mut v)
    })?;
    Ok(v)
}

pub fn device_count(d: &Driver) -> Result<u32, BackendError> {
    let mut n = 0;
    // SAFETY: `n` is a valid out-pointer.
    check(d, "cuDeviceGetCount", unsafe {
        d.api().cuDeviceGetCount(&mut n)
    })?;
    Ok(u32::try_from(n).unwrap_or(0))
}

pub fn device_get(d: &Driver, ordinal: u32) -> Result<CUdevice, BackendError> {
    let mut dev = 0;
    let ordinal = i32::try_from(ordinal).map_err(|_| BackendError::InvalidDevice {
        device: ordinal,
        count: 0,
    })?;
    // SAFETY: `dev` is a valid out-pointer; the driver validates the ordinal.
    check(d, "cuDeviceGet", unsafe {
        d.api().cuDeviceGet(&mut dev, ordinal)
    })?;
    Ok(dev)
}

pub fn device_attribute(
    d: &Driver,
    dev: CUdevice,
    attr: sys::CUdevice_attribute,
) -> Result<i32, BackendError> {
    let mut v = 0;
    // SAFETY: `v` is a valid out-pointer; the driver validates `dev` and `attr`.
    check(d, "cuDeviceGetAttribute", unsafe {
        d.api().cuDeviceGetAttribute(&mut v, attr, dev)
    })?;
    Ok(v)
}

/// Retains the device's primary context (the one the CUDA runtime, and so PyTorch, uses).
pub fn primary_ctx_retain(d: &Driver, dev: CUdevice) -> Result<CUcontext, BackendError> {
    let mut ctx = std::ptr::null_mut();
    // SAFETY: `ctx` is a valid out-pointer; the driver validates `dev`.
    check(d, "cuDevicePrimaryCtxRetain", unsafe {
        d.api().cuDevicePrimaryCtxRetain(&mut ctx, dev)
    })?;
    Ok(ctx)
}

/// The calling thread's current context (null when none).
pub fn ctx_get_current(d: &Driver) -> Result<CUcontext, BackendError> {
    let mut ctx = std::ptr::null_mut();
    // SAFETY: `ctx` is a valid out-pointer.
    check(d, "cuCtxGetCurrent", unsafe {
        d.api().cuCtxGetCurrent(&mut ctx)
    })?;
    Ok(ctx)
}

/// The device of the calling thread's current context.
pub fn ctx_get_device(d: &Driver) -> Result<CUdevice, BackendError> {
    let mut dev = 0;
    // SAFETY: `dev` is a valid out-pointer; fails cleanly without a current context.
    check(d, "cuCtxGetDevice", unsafe {
        d.api().cuCtxGetDevice(&mut dev)
    })?;
    Ok(dev)
}

/// # Safety
/// 1. `ctx` must be null, or a live context (for kvhygiene's own calls: one retained with
///    [`primary_ctx_retain`] and never released).
pub unsafe fn ctx_set_current(d: &Driver, ctx: CUcontext) -> Result<(), BackendError> {
    // SAFETY: contract 1.
    check(d, "cuCtxSetCurrent", unsafe {
        d.api().cuCtxSetCurrent(ctx)
    })
}

/// Waits for all work of the current context.
pub fn ctx_synchronize(d: &Driver) -> Result<(), BackendError> {
    // SAFETY: no arguments; fails cleanly without a current context.
    check(d, "cuCtxSynchronize", unsafe { d.api().cuCtxSynchronize() })
}

/// Loads a cubin, fatbin or NUL-terminated PTX image into the current context.
///
/// # Safety
/// 1. `image` must be a whole cubin or fatbin (the driver reads as many bytes as their
///    headers say), or PTX text ending in a NUL byte (the driver reads up to it): the call
///    takes no length.
pub unsafe fn module_load_data(d: &Driver, image: &[u8]) -> Result<CUmodule, BackendError> {
    let mut module = std::ptr::null_mut();
    // SAFETY: contract 1: every byte the driver reads lies in `image`, which outlives the
    // call; the driver copies what it needs.
    check(d, "cuModuleLoadData", unsafe {
        d.api().cuModuleLoadData(&mut module, image.as_ptr().cast())
    })?;
    Ok(module)
}

/// Unloads a module, and with it its functions.
///
/// # Safety
/// 1. `module` must be a live module of the current context, not unloaded before;
/// 2. none of its functions may be used afterwards (no launch of them queued or to come).
pub unsafe fn module_unload(d: &Driver, module: CUmodule) -> Result<(), BackendError> {
    // SAFETY: contracts 1 and 2.
    check(d, "cuModuleUnload", unsafe {
        d.api().cuModuleUnload(module)
    })
}

/// # Safety
/// 1. `module` must be a live module of the current context.
pub unsafe fn module_get_function(
    d: &Driver,
    module: CUmodule,
    name: &CStr,
) -> Result<CUfunction, BackendError> {
    let mut f = std::ptr::null_mut();
    // SAFETY: contract 1; `name` is NUL-terminated.
    check(d, "cuModuleGetFunction", unsafe {
        d.api().cuModuleGetFunction(&mut f, module, name.as_ptr())
    })?;
    Ok(f)
}

/// Blocks of `block_threads` threads of `f` that one SM holds at once (registers, shared
/// memory and thread limits of the device of the current context).
///
/// # Safety
/// 1. `f` must be a live function of a module of the current context.
pub unsafe fn occupancy_blocks_per_sm(
    d: &Driver,
    f: CUfunction,
    block_threads: u32,
) -> Result<u32, BackendError> {
    let mut n = 0;
    let threads = i32::try_from(block_threads)
        .map_err(|_| BackendError::Other(format!("{block_threads} threads per block")))?;
    // SAFETY: contract 1; `n` is a valid out-pointer; no dynamic shared memory.
    check(d, "cuOccupancyMaxActiveBlocksPerMultiprocessor", unsafe {
        d.api()
            .cuOccupancyMaxActiveBlocksPerMultiprocessor(&mut n, f, threads, 0)
    })?;
    Ok(u32::try_from(n).unwrap_or(0))
}

/// Allocates device memory in the current context; out of memory maps to
/// [`BackendError::OutOfMemory`].
pub fn mem_alloc(d: &Driver, device: u32, len: u64) -> Result<CUdeviceptr, BackendError> {
    let mut ptr = 0;
    let bytes = usize::try_from(len).map_err(|_| BackendError::OutOfMemory {
        device,
        requested: len,
    })?;
    // SAFETY: `ptr` is a valid out-pointer.
    let rc = unsafe { d.api().cuMemAlloc_v2(&mut ptr, bytes) };
    if rc == sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
        return Err(BackendError::OutOfMemory {
            device,
            requested: len,
        });
    }
    check(d, "cuMemAlloc", rc)?;
    Ok(ptr)
}

/// # Safety
/// 1. `ptr` must come from [`mem_alloc`] and not have been freed; 2. no queued or running
///    work may still use it.
pub unsafe fn mem_free(d: &Driver, ptr: CUdeviceptr) -> Result<(), BackendError> {
    // SAFETY: contracts 1 and 2.
    check(d, "cuMemFree", unsafe { d.api().cuMemFree_v2(ptr) })
}

/// Page-locked host memory that can be mapped into the device address space of every context
/// ([`host_device_pointer`]): the host writes a batch's work items and reads its results
/// there, and the kernels access it directly (no copy is queued). Out of memory maps to
/// [`BackendError::OutOfMemory`] (of `device`, whose batches need it).
pub fn mem_host_alloc(d: &Driver, device: u32, len: usize) -> Result<*mut u8, BackendError> {
    let mut p: *mut c_void = std::ptr::null_mut();
    let flags = sys::CU_MEMHOSTALLOC_PORTABLE | sys::CU_MEMHOSTALLOC_DEVICEMAP;
    // SAFETY: `p` is a valid out-pointer. PORTABLE: usable from every context; DEVICEMAP:
    // mapped into the device address space.
    let rc = unsafe { d.api().cuMemHostAlloc(&mut p, len, flags as c_uint) };
    if rc == sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
        return Err(BackendError::OutOfMemory {
            device,
            requested: len as u64,
        });
    }
    check(d, "cuMemHostAlloc", rc)?;
    Ok(p.cast())
}

/// The device address of page-locked host memory.
///
/// # Safety
/// 1. `p` must come from [`mem_host_alloc`] and not be freed.
pub unsafe fn host_device_pointer(d: &Driver, p: *mut u8) -> Result<CUdeviceptr, BackendError> {
    let mut dev: CUdeviceptr = 0;
    // SAFETY: `dev` is a valid out-pointer; contract 1 (allocated with DEVICEMAP).
    check(d, "cuMemHostGetDevicePointer", unsafe {
        d.api().cuMemHostGetDevicePointer_v2(&mut dev, p.cast(), 0)
    })?;
    Ok(dev)
}

/// # Safety
/// 1. `p` must come from [`mem_host_alloc`], not be freed, and not be used by queued work.
pub unsafe fn mem_free_host(d: &Driver, p: *mut u8) -> Result<(), BackendError> {
    // SAFETY: contract 1.
    check(d, "cuMemFreeHost", unsafe {
        d.api().cuMemFreeHost(p.cast())
    })
}

/// # Safety
/// 1. `[dst, dst + len)` must be device memory of the current context owned by the caller.
pub unsafe fn memset_d8(d: &Driver, dst: CUdeviceptr, len: usize) -> Result<(), BackendError> {
    // SAFETY: contract 1.
    check(d, "cuMemsetD8", unsafe {
        d.api().cuMemsetD8_v2(dst, 0, len)
    })
}

/// # Safety
/// 1. `[dst, dst + len)` must be device memory of the current context owned by the caller;
/// 2. `stream` must be a live stream of the current context (or a special handle 0/1/2).
pub unsafe fn memset_d8_async(
    d: &Driver,
    dst: CUdeviceptr,
    len: usize,
    stream: CUstream,
) -> Result<(), BackendError> {
    // SAFETY: contracts 1 and 2.
    check(d, "cuMemsetD8Async", unsafe {
        d.api().cuMemsetD8Async(dst, 0, len, stream)
    })
}

/// # Safety
/// 1. `[dst, dst + src.len())` must be device memory of the current context owned by the caller.
pub unsafe fn memcpy_htod(d: &Driver, dst: CUdeviceptr, src: &[u8]) -> Result<(), BackendError> {
    // SAFETY: contract 1; `src` is readable for its length during the (synchronous) call.
    check(d, "cuMemcpyHtoD", unsafe {
        d.api().cuMemcpyHtoD_v2(dst, src.as_ptr().cast(), src.len())
    })
}

/// # Safety
/// 1. `[src, src + dst.len())` must be device memory of the current context.
pub unsafe fn memcpy_dtoh(
    d: &Driver,
    dst: &mut [u8],
    src: CUdeviceptr,
) -> Result<(), BackendError> {
    // SAFETY: contract 1; `dst` is writable for its length during the (synchronous) call.
    check(d, "cuMemcpyDtoH", unsafe {
        d.api()
            .cuMemcpyDtoH_v2(dst.as_mut_ptr().cast(), src, dst.len())
    })
}

/// An event without timing (cheaper to record and query). Out of memory maps to
/// [`BackendError::OutOfMemory`] (of `device`, whose batches need it), as for the other
/// buffers of a batch slot.
pub fn event_create(d: &Driver, device: u32) -> Result<CUevent, BackendError> {
    let mut ev = std::ptr::null_mut();
    // SAFETY: `ev` is a valid out-pointer.
    let rc = unsafe {
        d.api().cuEventCreate(
            &mut ev,
            sys::CUevent_flags::CU_EVENT_DISABLE_TIMING.0 as c_uint,
        )
    };
    if rc == sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
        return Err(BackendError::OutOfMemory {
            device,
            requested: 0,
        });
    }
    check(d, "cuEventCreate", rc)?;
    Ok(ev)
}

/// # Safety
/// 1. `ev` must be a live event and `stream` a live stream (or special handle) of the current
///    context.
pub unsafe fn event_record(d: &Driver, ev: CUevent, stream: CUstream) -> Result<(), BackendError> {
    // SAFETY: contract 1.
    check(d, "cuEventRecord", unsafe {
        d.api().cuEventRecord(ev, stream)
    })
}

/// Whether the work before the event's last record has completed.
///
/// # Safety
/// 1. `ev` must be a live event.
pub unsafe fn event_query(d: &Driver, ev: CUevent) -> Result<bool, BackendError> {
    // SAFETY: contract 1.
    let rc = unsafe { d.api().cuEventQuery(ev) };
    if rc == sys::CUresult::CUDA_ERROR_NOT_READY {
        return Ok(false);
    }
    check(d, "cuEventQuery", rc)?;
    Ok(true)
}

/// # Safety
/// 1. `ev` must be a live event.
pub unsafe fn event_synchronize(d: &Driver, ev: CUevent) -> Result<(), BackendError> {
    // SAFETY: contract 1.
    check(d, "cuEventSynchronize", unsafe {
        d.api().cuEventSynchronize(ev)
    })
}

/// Destroys an event; one whose recorded work has not completed yet is released by the
/// driver once it has (cuda.h).
///
/// # Safety
/// 1. `ev` must be a live event that no later call uses (a wait queued on it before, with
///    `cuStreamWaitEvent`, took its state when queued).
pub unsafe fn event_destroy(d: &Driver, ev: CUevent) -> Result<(), BackendError> {
    // SAFETY: contract 1.
    check(d, "cuEventDestroy", unsafe {
        d.api().cuEventDestroy_v2(ev)
    })
}

/// Makes `stream` wait for the work captured by the last record of `ev`. The event may be of
/// another context or device than the stream (cuda.h: "hEvent may be from a different
/// context or device than hStream").
///
/// # Safety
/// 1. `stream` must be live and of the current context;
/// 2. `ev` must be live (of any context).
pub unsafe fn stream_wait_event(
    d: &Driver,
    stream: CUstream,
    ev: CUevent,
) -> Result<(), BackendError> {
    // SAFETY: contracts 1 and 2.
    check(d, "cuStreamWaitEvent", unsafe {
        d.api().cuStreamWaitEvent(stream, ev, 0)
    })
}

/// The context `stream` belongs to: the one current when it was created, or for a special
/// handle (NULL, `CU_STREAM_LEGACY`, `CU_STREAM_PER_THREAD`) the calling thread's current one.
///
/// # Safety
/// 1. `stream` must be a live stream or a special handle (the driver's behaviour for any
///    other handle is undefined).
pub unsafe fn stream_get_ctx(d: &Driver, stream: CUstream) -> Result<CUcontext, BackendError> {
    let mut ctx = std::ptr::null_mut();
    // SAFETY: contract 1; `ctx` is a valid out-pointer.
    check(d, "cuStreamGetCtx", unsafe {
        d.api().cuStreamGetCtx(stream, &mut ctx)
    })?;
    Ok(ctx)
}

/// # Safety
/// 1. `stream` must be a live stream (or special handle) of the current context.
pub unsafe fn stream_synchronize(d: &Driver, stream: CUstream) -> Result<(), BackendError> {
    // SAFETY: contract 1.
    check(d, "cuStreamSynchronize", unsafe {
        d.api().cuStreamSynchronize(stream)
    })
}

/// Whether `stream` is capturing a graph (an invalidated capture still counts: the stream is
/// in capture mode until the capture ends). The legacy default stream cannot be used at all
/// while a blocking stream of its context captures (`CUDA_ERROR_STREAM_CAPTURE_IMPLICIT`):
/// that also reads as capturing, so the caller defers its work.
///
/// # Safety
/// 1. `stream` must be a live stream (or special handle) of the current context.
pub unsafe fn stream_is_capturing(d: &Driver, stream: CUstream) -> Result<bool, BackendError> {
    let mut status = sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE;
    // SAFETY: contract 1; `status` is a valid out-pointer.
    let rc = unsafe { d.api().cuStreamIsCapturing(stream, &mut status) };
    if rc == sys::CUresult::CUDA_ERROR_STREAM_CAPTURE_IMPLICIT {
        return Ok(true);
    }
    check(d, "cuStreamIsCapturing", rc)?;
    Ok(status != sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE)
}

/// Sets the calling thread's stream-capture interaction mode and returns the previous one.
/// kvhygiene switches to RELAXED for the length of each entry point: under a global-mode
/// capture on another thread (PyTorch's default for `torch.cuda.graph`), its event queries,
/// allocations and launches on non-capturing streams would otherwise invalidate that capture.
pub fn thread_exchange_capture_mode(
    d: &Driver,
    mode: sys::CUstreamCaptureMode,
) -> Result<sys::CUstreamCaptureMode, BackendError> {
    let mut m = mode;
    // SAFETY: `m` is a valid in/out pointer for the duration of the call.
    let rc = unsafe { d.api().cuThreadExchangeStreamCaptureMode(&mut m) };
    check(d, "cuThreadExchangeStreamCaptureMode", rc)?;
    Ok(m)
}

/// Grid and block shape of a 1-D launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchShape {
    pub grid: u32,
    pub block: u32,
}

/// # Safety
/// 1. `f` must be a live function of the current context; 2. `params` must point to one value
///    per kernel parameter, each of the exact type the kernel declares, valid until the call
///    returns (the driver copies them); 3. `stream` as in [`memset_d8_async`]; 4. every device
///    address among the parameters must be valid for what the kernel does with it.
pub unsafe fn launch_kernel(
    d: &Driver,
    f: CUfunction,
    shape: LaunchShape,
    stream: CUstream,
    params: &mut [*mut c_void],
) -> Result<(), BackendError> {
    // SAFETY: contracts 1 to 4.
    check(d, "cuLaunchKernel", unsafe {
        d.api().cuLaunchKernel(
            f,
            shape.grid,
            1,
            1,
            shape.block,
            1,
            1,
            0,
            stream,
            params.as_mut_ptr(),
            std::ptr::null_mut(),
        )
    })
}

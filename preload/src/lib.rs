//! libkvhygiene_preload.so: LD_PRELOAD interposers for the CUDA runtime's allocation entry
//! points, so that a C++ inference engine gets kvhygiene's memory — zeroed before first use,
//! zeroed and verified after every free before reuse — without changing a line of it:
//!
//! ```sh
//! LD_PRELOAD=/path/to/libkvhygiene_preload.so ./engine ...
//! ```
//!
//! Interposers only: allocation, ownership, scrubbing and the forensic log are the core's
//! ([`kvhygiene::alloc::Allocator`]), reached through the process-wide allocator of the C ABI
//! ([`kvhygiene::ffi::process_allocator`]), so the `kvh_*` C API exported by this library too
//! (`kvh_set_context`, `kvh_stats_json`, …) acts on the same pools.
//!
//! | Entry point | Served by kvhygiene | Forwarded to the real runtime |
//! | --- | --- | --- |
//! | `cudaMalloc`, `cudaMallocPitch` | size > 0 | size 0, `KVH_PRELOAD=off` |
//! | `cudaMallocAsync` (+ `_ptsz`) | size > 0, on a stream not capturing a graph | size 0, a capturing stream, `KVH_PRELOAD=off` |
//! | `cudaFree`, `cudaFreeAsync` (+ `_ptsz`) | pointers kvhygiene holds | NULL, every other pointer |
//! | `cudaStreamDestroy` | forgets a stream it uses (after synchronising it) | always, after that, unless a capture refused the synchronisation |
//! | `cudaIpcGetMemHandle`, `cuIpcGetMemHandle` (driver) | marks a block it hands out as exported (its free then retires it); refuses a block it does not hand out | always, after that, unless refused |
//! | `cuGetProcAddress` (+ `_v2`), `cudaGetDriverEntryPoint` (+ `_ptsz`, `ByVersion`, `ByVersion_ptsz`) | hands out its `cuIpcGetMemHandle` (and its `cuGetProcAddress`) in place of the driver's (`entry_point.rs`) | always, before that |
//! | `cudaDeviceReset`, `cudaThreadExit` | scrubs the device's blocks and shuts kvhygiene down (unless it already was) | always, after that, unless a capture refused the synchronisation or `cudaGetDevice` failed |
//!
//! In a forked child of the process that started kvhygiene, every call is forwarded, but
//! under an invalid `KVH_PRELOAD`, whose allocations are refused there as in the parent.
//! Everything else (`cudaMallocManaged`, `cudaMallocHost`, `cudaMalloc3D`, memory pools, …)
//! is not interposed and reaches the runtime directly; ARCHITECTURE.md says why.
//!
//! Rules every export keeps:
//! - One panic boundary each: a panic returns `cudaErrorUnknown` (an allocation's output
//!   pointer NULL, as for every failed allocation), never unwinds into C.
//! - A pointer kvhygiene does not hold is never handed to it, and one it holds is never
//!   handed to the real runtime (but to `cudaIpcGetMemHandle`, for a block handed out, once
//!   marked: only the runtime can make its handle; and to the driver's `cuIpcGetMemHandle`
//!   likewise): the block table decides
//!   ([`kvhygiene::alloc::Allocator::block_containing`]), so double and interior frees of
//!   kvhygiene memory are reported by the core (and logged) and not forwarded. A block
//!   kvhygiene returned to the device (an empty-cache, the idle TTL, the reuse limit) is no
//!   longer held: a free of its address goes to the runtime, which answers for it (an error
//!   when nothing is allocated there), and is not in kvhygiene's log. kvhygiene cannot tell
//!   such a double free from the free of an allocation made since at the same address
//!   outside it (through the driver API, say), which must reach the runtime. Likewise, once
//!   `cudaDeviceReset` (or `cudaThreadExit`) of a device is made, nothing of that device's
//!   memory is held any more: every free into it goes to the runtime (the reset freed it
//!   all).
//! - The synchronous entry points keep their synchronous contract, which engines rely on when
//!   they use a buffer on several streams: `cudaFree` synchronises the block's device before
//!   the block is freed (the real `cudaFree` does too), and `cudaMalloc` /
//!   `cudaMallocPitch` of fresh memory synchronise the legacy default stream, where its
//!   zeroing is queued, before returning (a pool hit queues nothing and does not wait). The
//!   asynchronous ones are stream-ordered on their stream, like the runtime's stream-ordered
//!   allocator; kvhygiene's free never waits, except on the per-thread default stream
//!   (below).
//! - A stream capturing a CUDA graph gets the runtime's own stream-ordered allocator: a
//!   captured `cudaMallocAsync` becomes a graph memory node re-run at every replay, which a
//!   pooled block handed out once cannot be. Graph memory is the runtime's and is not
//!   scrubbed. A kvhygiene block freed in stream order on a capturing stream is refused
//!   (`cudaErrorStreamCaptureUnsupported`) and stays live, and so is a `cudaFree` whose
//!   device synchronisation a capture refuses.
//! - The per-thread default stream (`cudaStreamPerThread`, or stream 0 of a `_ptsz` call)
//!   means the calling thread's stream, and kvhygiene's batches are submitted later from
//!   other threads: such requests are never given to the core by that handle. A free
//!   synchronises the caller's per-thread stream and is scrubbed on the legacy default
//!   stream; an allocation is made on the legacy stream, as `cudaMalloc`'s is.
//! - A stream handle is never used by kvhygiene after the engine destroys it with
//!   `cudaStreamDestroy` ([`kvhygiene::alloc::Allocator::forget_stream`], or
//!   [`kvhygiene::alloc::Allocator::forget_unwaited_stream`] when its synchronisation
//!   failed).

// Exports take raw pointers by the nature of a C ABI; each documents its contract, and each
// dereference carries a SAFETY comment.
#![allow(clippy::not_unsafe_ptr_arg_deref)]
#![allow(non_snake_case)] // the exports carry the CUDA runtime's names

mod cuda;
mod entry_point;
mod mode;
mod real;

use std::ffi::{c_int, c_void};
use std::panic::{catch_unwind, AssertUnwindSafe};

use kvhygiene::alloc::{AllocError, Allocation, Allocator, BlockSpan, FreeError, IpcExportError};
use kvhygiene::backend::{BackendError, StreamHandle};
use kvhygiene::ffi::{
    is_forked_child, kvh_result, process_allocator, started_process_allocator, watch_process,
};

use cuda::*;
use mode::{mode, mode_read, notice_once, Mode};

/// The legacy default stream (stream 0 of the synchronous entry points).
const LEGACY_STREAM: StreamHandle = StreamHandle(0);

/// Pitch granularity of `cudaMallocPitch`: a multiple of every GPU's texture pitch alignment
/// (`cudaDevAttrTexturePitchAlignment`, 32 bytes on current GPUs), so that rows suit 2D
/// copies, textures and coalesced access. Any pitch of at least `width` meets the API: callers
/// must use the pitch returned.
const PITCH_ALIGN: usize = 512;

/// Runs one export as a panic boundary.
fn boundary(f: impl FnOnce() -> cudaError_t) -> cudaError_t {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or(UNKNOWN)
}

/// Runs one allocation export as a panic boundary: a panic fails the allocation as every
/// other failure does, with NULL in `dev_ptr` (an engine that checks the pointer rather than
/// the code must not use what it held before).
///
/// Contract (the export's): `dev_ptr` is NULL or valid for one pointer write.
fn allocation_boundary(dev_ptr: *mut *mut c_void, f: impl FnOnce() -> cudaError_t) -> cudaError_t {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(rc) => rc,
        Err(_) if dev_ptr.is_null() => UNKNOWN,
        // SAFETY: `dev_ptr` is non-null and valid for one pointer write (the contract).
        Err(_) => unsafe { store(dev_ptr, Err(UNKNOWN)) },
    }
}

// ----- allocation -------------------------------------------------------------------------

/// `cudaMalloc`: `size` bytes of device memory on the current device, every byte zero.
/// Size 0 and `KVH_PRELOAD=off` are forwarded to the real `cudaMalloc`. During a graph
/// capture it is served like at any other time (the memory of a synchronous allocation is
/// not part of a graph); fresh memory then needs a legacy-stream synchronisation the
/// runtime may refuse, whose capture error is returned.
///
/// Contract (the runtime's): `dev_ptr` is NULL or valid for one pointer write.
#[no_mangle]
pub extern "C" fn cudaMalloc(dev_ptr: *mut *mut c_void, size: usize) -> cudaError_t {
    allocation_boundary(dev_ptr, || match route() {
        Mode::Refuse => refused(dev_ptr),
        // SAFETY: the caller's arguments, passed on unchanged under the same contract.
        Mode::Forward => forwarded(dev_ptr, unsafe { real::cudaMalloc(dev_ptr, size) }),
        // SAFETY: as above. Zero bytes need no scrubbing: the real runtime answers exactly.
        Mode::Serve if size == 0 => forwarded(dev_ptr, unsafe { real::cudaMalloc(dev_ptr, size) }),
        Mode::Serve if dev_ptr.is_null() => INVALID_VALUE,
        Mode::Serve => {
            let result = allocate_ready(size, Wait::AsTheRuntime);
            // SAFETY: `dev_ptr` is non-null and valid for one pointer write (the contract).
            unsafe { store(dev_ptr, result) }
        }
    })
}

/// `cudaMallocPitch`: `height` rows of `width` bytes, each row starting at a multiple of the
/// returned `*pitch` (a multiple of 512 bytes), on the current device, every byte zero. A zero
/// width or height and `KVH_PRELOAD=off` are forwarded to the real `cudaMallocPitch`.
///
/// Contract (the runtime's): `dev_ptr` and `pitch` are NULL or valid for one write each.
#[no_mangle]
pub extern "C" fn cudaMallocPitch(
    dev_ptr: *mut *mut c_void,
    pitch: *mut usize,
    width: usize,
    height: usize,
) -> cudaError_t {
    allocation_boundary(dev_ptr, || match route() {
        Mode::Refuse => refused(dev_ptr),
        // SAFETY: the caller's arguments, passed on unchanged under the same contract.
        Mode::Forward => forwarded(dev_ptr, unsafe {
            real::cudaMallocPitch(dev_ptr, pitch, width, height)
        }),
        // SAFETY: as above.
        Mode::Serve if width == 0 || height == 0 => forwarded(dev_ptr, unsafe {
            real::cudaMallocPitch(dev_ptr, pitch, width, height)
        }),
        Mode::Serve => {
            if dev_ptr.is_null() {
                return INVALID_VALUE;
            }
            if pitch.is_null() {
                // As every other failed allocation: the output pointer is NULL.
                // SAFETY: `dev_ptr` is non-null and valid for one pointer write (the contract).
                return unsafe { store(dev_ptr, Err(INVALID_VALUE)) };
            }
            let row = width.checked_next_multiple_of(PITCH_ALIGN);
            let Some((row, bytes)) = row.and_then(|r| Some((r, r.checked_mul(height)?))) else {
                // As every other failed allocation: the output pointer is NULL.
                // SAFETY: `dev_ptr` is non-null and valid for one pointer write (the contract).
                return unsafe { store(dev_ptr, Err(MEMORY_ALLOCATION)) };
            };
            let result = allocate_ready(bytes, Wait::AsTheRuntime);
            // SAFETY: `dev_ptr` is non-null and valid for one pointer write (the contract).
            let rc = unsafe { store(dev_ptr, result) };
            if rc == SUCCESS {
                // SAFETY: `pitch` is non-null (checked) and valid for one write (contract).
                unsafe { *pitch = row };
            }
            rc
        }
    })
}

/// `cudaMallocAsync`: `size` bytes on the current device, usable in stream order on
/// `stream` (the zeroing of fresh memory is queued there), every byte zero. The memory is
/// the current device's even when `stream` belongs to another device (the runtime would
/// use the stream's). Size 0, a stream capturing a CUDA graph (the allocation becomes the
/// graph's, re-run at every replay) and `KVH_PRELOAD=off` are forwarded to the real
/// `cudaMallocAsync`. `cudaStreamPerThread` is served like `cudaMalloc` (legacy stream,
/// waited for when fresh).
///
/// Contract (the runtime's): `dev_ptr` is NULL or valid for one pointer write; `stream` is
/// a stream of the current device, or 0, `cudaStreamLegacy` or `cudaStreamPerThread`.
#[no_mangle]
pub extern "C" fn cudaMallocAsync(
    dev_ptr: *mut *mut c_void,
    size: usize,
    stream: cudaStream_t,
) -> cudaError_t {
    allocation_boundary(dev_ptr, || {
        malloc_async(dev_ptr, size, stream, false, real::cudaMallocAsync)
    })
}

/// `cudaMallocAsync` as compiled with `--default-stream per-thread`: stream 0 is the
/// calling thread's default stream.
#[no_mangle]
pub extern "C" fn cudaMallocAsync_ptsz(
    dev_ptr: *mut *mut c_void,
    size: usize,
    stream: cudaStream_t,
) -> cudaError_t {
    allocation_boundary(dev_ptr, || {
        malloc_async(dev_ptr, size, stream, true, real::cudaMallocAsync_ptsz)
    })
}

/// The real `cudaMallocAsync` or its `_ptsz` form.
type RealMallocAsync = unsafe fn(*mut *mut c_void, usize, cudaStream_t) -> cudaError_t;

/// The body of `cudaMallocAsync` and `cudaMallocAsync_ptsz` (`per_thread`: stream 0 is the
/// calling thread's default stream): served by kvhygiene, or forwarded to `real`.
fn malloc_async(
    dev_ptr: *mut *mut c_void,
    size: usize,
    stream: cudaStream_t,
    per_thread: bool,
    real: RealMallocAsync,
) -> cudaError_t {
    // SAFETY: the caller's arguments, passed on unchanged to the real function of the same
    // signature, under the runtime's contract.
    let forward = || forwarded(dev_ptr, unsafe { real(dev_ptr, size, stream) });
    match route() {
        Mode::Refuse => refused(dev_ptr),
        Mode::Forward => forward(),
        Mode::Serve if size == 0 => forward(),
        Mode::Serve if dev_ptr.is_null() => INVALID_VALUE,
        Mode::Serve => serve_async(dev_ptr, size, ordering(stream, per_thread), forward),
    }
}

// ----- free -------------------------------------------------------------------------------

/// `cudaFree`. A block kvhygiene holds is freed to it after its device is synchronised (the
/// runtime's `cudaFree` contract), then scrubbed and verified before any reuse; NULL (which
/// engines call to create the CUDA context) and every other pointer go to the real
/// `cudaFree`. An invalid free of kvhygiene memory (double, interior) returns
/// `cudaErrorInvalidValue` and is logged by the core, also during a graph capture. When a
/// graph capture refuses the synchronisation of a valid free, its error is returned and the
/// block stays live.
#[no_mangle]
pub extern "C" fn cudaFree(dev_ptr: *mut c_void) -> cudaError_t {
    boundary(|| match held(dev_ptr) {
        Some((alloc, span)) => free_held(alloc, dev_ptr, span, None),
        // SAFETY: the caller's argument, passed on unchanged under the runtime's contract.
        None => unsafe { real::cudaFree(dev_ptr) },
    })
}

/// `cudaFreeAsync`. A block kvhygiene holds is freed to it in stream order on `stream`
/// (never waits, except on `cudaStreamPerThread`: see the module notes); on a stream
/// capturing a CUDA graph it is refused with `cudaErrorStreamCaptureUnsupported` and stays
/// live. NULL and every other pointer go to the real `cudaFreeAsync`.
#[no_mangle]
pub extern "C" fn cudaFreeAsync(dev_ptr: *mut c_void, stream: cudaStream_t) -> cudaError_t {
    boundary(|| match held(dev_ptr) {
        Some((alloc, span)) => free_held(alloc, dev_ptr, span, Some(ordering(stream, false))),
        // SAFETY: the caller's arguments, passed on unchanged under the runtime's contract.
        None => unsafe { real::cudaFreeAsync(dev_ptr, stream) },
    })
}

/// `cudaFreeAsync` as compiled with `--default-stream per-thread`.
#[no_mangle]
pub extern "C" fn cudaFreeAsync_ptsz(dev_ptr: *mut c_void, stream: cudaStream_t) -> cudaError_t {
    boundary(|| match held(dev_ptr) {
        Some((alloc, span)) => free_held(alloc, dev_ptr, span, Some(ordering(stream, true))),
        // SAFETY: the caller's arguments, passed on unchanged under the runtime's contract.
        None => unsafe { real::cudaFreeAsync_ptsz(dev_ptr, stream) },
    })
}

// ----- streams ----------------------------------------------------------------------------

/// `cudaStreamDestroy`. When kvhygiene (started in this process) holds a reference to
/// `stream`, an engine's own stream (not 0, `cudaStreamLegacy` or `cudaStreamPerThread`),
/// the stream is synchronised first, so that nothing queued there before is left for
/// kvhygiene to order against, and kvhygiene forgets it (open scrub batches naming it are
/// submitted now; blocks allocated or freed on it are ordered on the legacy stream from then
/// on); then the real `cudaStreamDestroy` is called. A synchronisation refused by a graph
/// capture is returned and the stream is not destroyed. After any other failed
/// synchronisation (an earlier asynchronous error) kvhygiene forgets the stream without
/// submitting anything on it (`Allocator::forget_unwaited_stream`: open batches on it move,
/// unsubmitted, to the legacy stream, and waits for it become waits for the legacy stream,
/// which orders after a blocking stream's work, not a non-blocking one's), then the real
/// destroy is called and answers; the blocks of those batches are scrubbed and verified at a
/// later flush (quarantined if that fails), never made clean without it. Streams kvhygiene
/// never saw are destroyed as the runtime does, without waiting. Cost: for a stream
/// kvhygiene used, the host waits for its queued work, where the runtime's destroy returns
/// at once.
#[no_mangle]
pub extern "C" fn cudaStreamDestroy(stream: cudaStream_t) -> cudaError_t {
    boundary(|| {
        let handle = StreamHandle(stream as u64);
        let alloc = (handle.0 > STREAM_PER_THREAD && !forked())
            .then(started_process_allocator)
            .flatten()
            .filter(|alloc| alloc.uses_stream(handle));
        if let Some(alloc) = alloc {
            // SAFETY: the caller's stream, which it is about to destroy, so still valid.
            let synced = relaxed_capture(|| unsafe { real::cudaStreamSynchronize(stream) });
            if is_capture_error(synced) {
                return synced;
            }
            if synced == SUCCESS {
                alloc.forget_stream(handle);
            } else {
                // Forgotten before the real destroy, which may succeed: a flush on another
                // thread must not find the handle after it. Nothing is submitted on it.
                alloc.forget_unwaited_stream(handle);
            }
        }
        // SAFETY: the caller's argument, passed on unchanged under the runtime's contract.
        unsafe { real::cudaStreamDestroy(stream) }
    })
}

// ----- IPC ------------------------------------------------------------------------------

/// `cudaIpcGetMemHandle`. The handle of a block kvhygiene hands out lets another process map
/// it, and an importer may keep that mapping after the block is freed: so before the real
/// call the block is marked exported (`Allocator::mark_ipc_exported`: recorded as an
/// `ipc_export`, once per allocation), and its free then scrubs and verifies it and returns
/// it to the driver instead of pooling it for the next request, whose own allocation gets a
/// new handle. A pointer inside a kvhygiene block that is not handed out (freed, pooled,
/// quarantined) is refused with `cudaErrorInvalidValue` and not forwarded: that memory is the
/// pool's, and would be the next owner's. Every other pointer, a NULL `handle` (which the
/// runtime refuses), and every call in a forked child or after a device reset of the
/// block's device, go to the real `cudaIpcGetMemHandle` unchanged. The mark comes before the
/// real call, so that no free can pool the block in between; a block stays marked when the
/// real call then fails: its free retires it all the same, which costs a new allocation,
/// never a leak.
#[no_mangle]
pub extern "C" fn cudaIpcGetMemHandle(handle: *mut c_void, dev_ptr: *mut c_void) -> cudaError_t {
    boundary(|| {
        if let Err(e) = mark_before_export(handle, dev_ptr) {
            refused_export("cudaIpcGetMemHandle refused (cudaErrorInvalidValue)", &e);
            return INVALID_VALUE;
        }
        // SAFETY: the caller's arguments, passed on unchanged under the runtime's contract.
        unsafe { real::cudaIpcGetMemHandle(handle, dev_ptr) }
    })
}

/// `cuIpcGetMemHandle`, the driver API's export, for an engine that calls the driver
/// directly: the same mark and refusal as `cudaIpcGetMemHandle`, then the real driver
/// function. The driver's error codes used here have the runtime's numbers
/// (`CUDA_ERROR_INVALID_VALUE` 1, `CUDA_ERROR_UNKNOWN` 999 for a panic,
/// `CUDA_ERROR_SHARED_OBJECT_SYMBOL_NOT_FOUND` 302). Reached through the dynamic linker, or
/// through a pointer from `cuGetProcAddress` or `cudaGetDriverEntryPoint`, which hand this
/// function out in place of the driver's (`entry_point.rs`); a pointer found with `dlsym` on a
/// handle of `libcuda.so.1` is the driver's own (docs/cuda.md, "IPC").
#[no_mangle]
pub extern "C" fn cuIpcGetMemHandle(handle: *mut c_void, dptr: u64) -> cudaError_t {
    boundary(|| {
        if let Err(e) = mark_before_export(handle, dptr as *mut c_void) {
            refused_export("cuIpcGetMemHandle refused (CUDA_ERROR_INVALID_VALUE)", &e);
            return INVALID_VALUE;
        }
        // SAFETY: the caller's arguments, passed on unchanged under the driver's contract.
        unsafe { real::cuIpcGetMemHandle(handle, dptr) }
    })
}

/// Marks the block an export names before the export is made; `Err` when the pointer is
/// inside a kvhygiene block that is not handed out, whose export must be refused. A NULL
/// `handle` (refused by CUDA, so nothing is exported) and a pointer kvhygiene does not hold
/// mark nothing.
fn mark_before_export(handle: *mut c_void, ptr: *mut c_void) -> Result<(), IpcExportError> {
    let held = (!handle.is_null()).then(|| held(ptr)).flatten();
    let Some((alloc, _)) = held else {
        return Ok(());
    };
    match alloc.mark_ipc_exported(ptr as u64) {
        Err(e @ IpcExportError::NotLive { .. }) => Err(e),
        // Unknown: released between the look-up and the mark (or freed by a device reset
        // and since returned), no longer kvhygiene's: CUDA answers.
        Ok(_) | Err(IpcExportError::UnknownPointer { .. }) => Ok(()),
    }
}

/// Says on stderr why an export was refused, for the first few refusals of the process: an
/// engine that exports freed memory has a bug that the error code alone does not explain.
#[cold]
fn refused_export(what: &str, e: &IpcExportError) {
    static SAID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    kvhygiene::say_first(
        &SAID,
        16,
        format_args!("kvhygiene-preload: {what}: {e}"),
        "further refusals are not said",
    );
}

// ----- device reset -----------------------------------------------------------------------

/// `cudaDeviceReset`. The reset destroys the current device's primary context, where
/// kvhygiene's memory, kernels and result buffers live, with every allocation in it. So when
/// kvhygiene started in this process, the device is first synchronised (as `cudaFree` does),
/// then `Allocator::reset_device` marks it (no allocation on it is served from then on, not
/// even a clean pooled block, whose memory goes with the reset) and frees to kvhygiene every
/// block still handed out on it (the reset frees it: its bytes are scrubbed like any freed
/// block's), and kvhygiene is shut down as by `kvh_shutdown`: every freed block is scrubbed
/// and verified, the forensic log gets its `stop` record, the metrics file its last
/// snapshot. Then the real `cudaDeviceReset` is called.
///
/// Nothing is scrubbed when kvhygiene had already shut down (an earlier `kvh_shutdown`, or
/// the reset of another device): the blocks still handed out on the device are then destroyed
/// unscrubbed, as at exit. After a sticky error the context runs no kernel: the scrubs fail,
/// and their blocks are quarantined and logged as such (under `failure_mode=abort` the first
/// such failure aborts the process, as that policy says).
///
/// kvhygiene does not start again in this process (its pools and kernels were in the
/// destroyed context). Allocations on the reset device are refused from then on with
/// `cudaErrorCudartUnloading` (`KVH_ERR_SHUTTING_DOWN` through `kvh_malloc`), a captured
/// `cudaMallocAsync` included; on other devices, as after `kvh_shutdown`, only clean pooled
/// blocks are served, and freed blocks are no longer scrubbed. The first refusal says why on
/// stderr. Once the real reset is made, pointers into the device's memory are no longer
/// kvhygiene's: a later `cudaFree` of one goes to the real runtime, which answers for it (the
/// address may hold the runtime's memory by then), and a `kvh_free` of a block the reset
/// freed is accepted once and does nothing (other invalid frees are refused as ever; the
/// forensic log has stopped by then, so they are not in it). When the real reset fails, the
/// memory is still there and stays kvhygiene's: its frees are kvhygiene's, never forwarded.
/// The common use, a reset at the end of `main`, thus leaves nothing unscrubbed on that
/// device. The shutdown is process-wide: a later reset of another device finds kvhygiene down, and
/// its blocks still handed out are not scrubbed (as at exit).
///
/// A graph capture that refuses the synchronisation, or a failed `cudaGetDevice`, is returned,
/// and nothing is reset. A process where kvhygiene never started, or a forked child, is
/// reset as by the runtime.
#[no_mangle]
pub extern "C" fn cudaDeviceReset() -> cudaError_t {
    boundary(|| reset_current_device(real::cudaDeviceReset))
}

/// `cudaThreadExit`, the deprecated form of `cudaDeviceReset` (the CUDA 12 runtime still
/// exports it): it resets the current device as `cudaDeviceReset` does, and is handled
/// exactly as [`cudaDeviceReset`] is, the real `cudaThreadExit` taking the real reset's
/// place.
#[no_mangle]
pub extern "C" fn cudaThreadExit() -> cudaError_t {
    boundary(|| reset_current_device(real::cudaThreadExit))
}

/// The real function that resets the current device: `cudaDeviceReset` or `cudaThreadExit`.
type RealReset = unsafe fn() -> cudaError_t;

/// The body of [`cudaDeviceReset`] and [`cudaThreadExit`], `real_reset` the real function.
fn reset_current_device(real_reset: RealReset) -> cudaError_t {
    let alloc = (!forked()).then(started_process_allocator).flatten();
    if let Some(alloc) = alloc {
        let device = match current_device() {
            Ok(d) => d,
            Err(rc) => return rc,
        };
        // SAFETY: no arguments; valid at any time (a capture makes it return an error).
        let synced = unsafe { real::cudaDeviceSynchronize() };
        if is_capture_error(synced) {
            return synced;
        }
        // Noted first, so that an allocation refused from here on says why.
        reset::begun();
        // From here on nothing of the device's memory is handed out, not even a clean
        // pooled block; the blocks still handed out are freed (an earlier asynchronous
        // error does not keep them from their scrub, as in `free_held`; the reset, which
        // clears such an error, follows) and scrubbed by the shutdown.
        if let Ok(device) = u32::try_from(device) {
            alloc.reset_device(device);
        }
        kvhygiene::ffi::kvh_shutdown();
        // SAFETY: the real `cudaDeviceReset` or `cudaThreadExit`: no arguments, the runtime's
        // contract.
        let rc = unsafe { real_reset() };
        if rc == SUCCESS {
            // The device's memory is the runtime's from now on: a pointer into it is
            // no longer kvhygiene's (until now, a free of one was still the core's).
            reset::done(device);
        }
        return rc;
    }
    // SAFETY: as above.
    unsafe { real_reset() }
}

/// The resets this process made while kvhygiene ran: whether one began (for the one line that
/// explains the refusals that follow; `Allocator::device_was_reset` says which device), and
/// the devices whose real reset was made, whose memory is the runtime's from then on.
mod reset {
    use std::collections::BTreeSet;
    use std::ffi::c_int;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Mutex;

    static BEGUN: AtomicBool = AtomicBool::new(false);
    static SAID: AtomicBool = AtomicBool::new(false);
    /// Set with the first device below: until then no free pays for the set's lock.
    static ANY_DONE: AtomicBool = AtomicBool::new(false);
    static DONE: Mutex<BTreeSet<c_int>> = Mutex::new(BTreeSet::new());

    pub(crate) fn begun() {
        BEGUN.store(true, Ordering::Release);
    }

    /// The real reset of `device` was made.
    pub(crate) fn done(device: c_int) {
        DONE.lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(device);
        ANY_DONE.store(true, Ordering::Release);
    }

    /// Whether the real reset of `device` was made.
    pub(crate) fn was_done(device: u32) -> bool {
        ANY_DONE.load(Ordering::Acquire)
            && c_int::try_from(device)
                .is_ok_and(|d| DONE.lock().unwrap_or_else(|p| p.into_inner()).contains(&d))
    }

    /// Says once on stderr why allocations are refused after a reset.
    pub(crate) fn explain_refusal() {
        if BEGUN.load(Ordering::Acquire) && !SAID.swap(true, Ordering::Relaxed) {
            kvhygiene::stderr_line(
                "kvhygiene-preload: allocation refused (cudaErrorCudartUnloading): \
                 cudaDeviceReset (or cudaThreadExit) destroyed the CUDA context kvhygiene's \
                 pools and kernels \
                 were in, so kvhygiene shut down (scrubbing what it could first); it does \
                 not start again in this process (restart the process to have it)",
            );
        }
    }
}

/// Runs `f`, a synchronisation the runtime's own call would not make, in the relaxed capture
/// mode on this thread: under global mode (PyTorch's default) another thread's graph capture
/// would count it as unsafe and be invalidated. A stream that is itself capturing still
/// refuses it.
fn relaxed_capture(f: impl FnOnce() -> cudaError_t) -> cudaError_t {
    let mut mode = CAPTURE_MODE_RELAXED;
    // SAFETY: `mode` is a writable int; the call swaps it with the thread's capture mode.
    let swapped = unsafe { real::cudaThreadExchangeStreamCaptureMode(&mut mode) } == SUCCESS;
    let rc = f();
    if swapped {
        // SAFETY: as above; `mode` now holds the thread's previous mode, restored here.
        unsafe { real::cudaThreadExchangeStreamCaptureMode(&mut mode) };
    }
    rc
}

// ----- the work ---------------------------------------------------------------------------

/// What a stream argument orders kvhygiene's work on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StreamOrder {
    /// The calling thread's default stream: its handle means another stream on the threads
    /// kvhygiene submits from, so it is never given to the core.
    PerThread,
    /// A stream every thread names alike (the legacy stream 0 or 0x1 included).
    Stream(StreamHandle),
}

impl StreamOrder {
    /// The handle to ask the runtime about on the calling thread.
    fn handle(self) -> cudaStream_t {
        match self {
            StreamOrder::PerThread => STREAM_PER_THREAD as cudaStream_t,
            StreamOrder::Stream(s) => s.0 as cudaStream_t,
        }
    }
}

/// A stream argument: `cudaStreamPerThread`, or 0 in a `_ptsz` call, is the calling
/// thread's default stream.
fn ordering(stream: cudaStream_t, ptsz: bool) -> StreamOrder {
    match stream as u64 {
        0 if ptsz => StreamOrder::PerThread,
        STREAM_PER_THREAD => StreamOrder::PerThread,
        s => StreamOrder::Stream(StreamHandle(s)),
    }
}

/// What the interposers do now: `KVH_PRELOAD`'s mode, except in a forked child of the
/// process that started kvhygiene, which forwards everything: the pools it inherited may
/// have been locked at the fork, their threads do not exist there, and the parent's CUDA
/// context cannot be used in a child anyway. A child of a parent whose start-up failed
/// inherited no allocator, and is served as its parent is: its allocations refused with the
/// start-up's error (forwarded, they would take unscrubbed memory the parent was refused).
/// Likewise under an invalid `KVH_PRELOAD` the parent had read, which refuses allocations
/// in the child as in its parent (fail closed), whatever started kvhygiene there (the C API
/// the library also exports). A child that forwards never reads the environment (a lock a
/// parent thread held at the fork stays held) nor prints the notice, which would say that
/// kvhygiene serves what it forwards; one that refuses prints the notice (unless its parent
/// did), quoting the value its parent read.
fn route() -> Mode {
    if forked() && !parent_start_failed() {
        return match mode_read() {
            Some(Mode::Refuse) => {
                notice_once(Mode::Refuse);
                Mode::Refuse
            }
            _ => Mode::Forward,
        };
    }
    mode()
}

/// Whether this forked child's parent had a start-up that failed (the core gives the child
/// that start-up's error, and `KVH_ERR_FORKED_CHILD` only after one that succeeded or was
/// under way). Reads the finished start-up's outcome; never starts anything.
fn parent_start_failed() -> bool {
    matches!(process_allocator(), Err(code) if code != kvh_result::KVH_ERR_FORKED_CHILD)
}

/// Whether this process is a child forked after kvhygiene's start-up began in its parent
/// ([`kvhygiene::ffi::is_forked_child`]: a fork handler the core registers before it starts,
/// so the check is one load, not a `getpid` per call, and it holds even for a fork made while
/// another thread was starting kvhygiene). A child forked before start-up (a launcher that
/// loaded this library but never allocated) is served as any process is.
fn forked() -> bool {
    is_forked_child()
}

/// Registers the core's fork and exit handlers when this library is loaded, before the
/// process can fork with kvhygiene started or begin its exit. One `.init_array` entry, which
/// is all a constructor crate would add.
#[used]
#[link_section = ".init_array"]
static WATCH_PROCESS: extern "C" fn() = watch_process_at_load;

extern "C" fn watch_process_at_load() {
    watch_process();
    mode::read_at_load();
}

/// Whether `stream` is capturing a CUDA graph, asked of the real runtime on the calling
/// thread. A capture error from the query itself (the legacy stream while another stream
/// captures in global mode) counts as capturing; other errors are returned.
fn capturing(stream: cudaStream_t) -> Result<bool, cudaError_t> {
    let mut status: c_int = CAPTURE_STATUS_NONE;
    // SAFETY: `stream` is the caller's stream argument (or cudaStreamPerThread), valid for
    // a query by the caller's contract; `status` is a writable int for the call.
    match unsafe { real::cudaStreamIsCapturing(stream, &mut status) } {
        SUCCESS => Ok(status != CAPTURE_STATUS_NONE),
        rc if is_capture_error(rc) => Ok(true),
        rc => Err(rc),
    }
}

/// A stream-ordered allocation: forwarded (`forward`) on a capturing stream, otherwise
/// kvhygiene's, on the stream or, for the per-thread stream, as [`allocate_ready`].
fn serve_async(
    dev_ptr: *mut *mut c_void,
    size: usize,
    order: StreamOrder,
    forward: impl FnOnce() -> cudaError_t,
) -> cudaError_t {
    match capturing(order.handle()) {
        // A failed allocation leaves NULL, never the caller's old value. SAFETY: the callers
        // checked `dev_ptr` is non-null; it is valid for one pointer write by the runtime's
        // contract.
        Err(rc) => return unsafe { store(dev_ptr, Err(rc)) },
        Ok(true) => {
            // Forwarded only by a kvhygiene that runs: one that did not start, or cannot,
            // refuses it as every other allocation, and says why, rather than hand out
            // runtime memory unprotected; so is one on a device the process reset, whose
            // allocations are all refused. SAFETY: as above.
            let allowed = started_beside_a_capture()
                .map_err(start_error)
                .and_then(|()| on_a_device_not_reset());
            return match allowed {
                Ok(()) => forward(),
                Err(rc) => unsafe { store(dev_ptr, Err(rc)) },
            };
        }
        Ok(false) => {}
    }
    let result = match order {
        // The runtime's stream-ordered allocation makes no synchronisation: kvhygiene's wait
        // must not break another thread's capture either.
        StreamOrder::PerThread => allocate_ready(size, Wait::Relaxed),
        StreamOrder::Stream(s) => allocate(size, s).map(|a| a.addr),
    };
    // SAFETY: the callers checked `dev_ptr` is non-null; it is valid for one pointer write
    // by the runtime's contract.
    unsafe { store(dev_ptr, result) }
}

/// kvhygiene's allocation of `size` bytes on the runtime's current device, on `stream`.
fn allocate(size: usize, stream: StreamHandle) -> Result<Allocation, cudaError_t> {
    // More than i64::MAX bytes: no device has them (the runtime says the same).
    let size = i64::try_from(size).map_err(|_| MEMORY_ALLOCATION)?;
    let device = current_device()?;
    let alloc = process_allocator().map_err(start_error)?;
    alloc
        .malloc_with_origin(size, device, stream)
        .map_err(|e| alloc_error(&e))
}

/// Starts kvhygiene if no start-up was made yet, or says how the one made ended; a first
/// start-up is made in the relaxed capture mode, so that the driver calls it makes do not
/// invalidate the graph being captured.
fn started_beside_a_capture() -> Result<(), kvh_result> {
    let mut started = Ok(());
    relaxed_capture(|| {
        started = process_allocator().map(|_| ());
        SUCCESS
    });
    started
}

/// `Err(cudaErrorCudartUnloading)` when the current device is one the process reset while
/// kvhygiene ran (said once on stderr); the runtime's error when there is no current device.
fn on_a_device_not_reset() -> Result<(), cudaError_t> {
    let device = current_device()?;
    let reset = started_process_allocator()
        .zip(u32::try_from(device).ok())
        .is_some_and(|(alloc, d)| alloc.device_was_reset(d));
    if reset {
        reset::explain_refusal();
        return Err(CUDART_UNLOADING);
    }
    Ok(())
}

/// What an allocation gets when kvhygiene did not start (code `kvh_init` returns): after a
/// `kvh_shutdown` that came first, what it gets after the shutdown of a started kvhygiene.
fn start_error(code: kvh_result) -> cudaError_t {
    match code {
        kvh_result::KVH_ERR_SHUTTING_DOWN => CUDART_UNLOADING,
        _ => INITIALIZATION_ERROR,
    }
}

/// As [`allocate`] on the legacy default stream; fresh memory (whose zeroing is queued
/// there) is then waited for (in `wait`'s capture mode), so the synchronous entry points
/// return memory every stream can use at once. A pool hit has nothing of kvhygiene's queued and does not wait. If the
/// wait fails (an earlier asynchronous error, or a capture that refuses it), the block goes
/// back to kvhygiene and the runtime's error is returned.
fn allocate_ready(size: usize, wait: Wait) -> Result<u64, cudaError_t> {
    let allocation = allocate(size, LEGACY_STREAM)?;
    if !allocation.fresh {
        return Ok(allocation.addr);
    }
    let addr = allocation.addr;
    // SAFETY: a NULL stream (the legacy default stream) is valid for cudaStreamSynchronize.
    let sync = || unsafe { real::cudaStreamSynchronize(std::ptr::null_mut()) };
    let rc = match wait {
        Wait::AsTheRuntime => sync(),
        Wait::Relaxed => relaxed_capture(sync),
    };
    if rc == SUCCESS {
        return Ok(addr);
    }
    if let Some((alloc, span)) = held(addr as *mut c_void) {
        // Never handed out: its free cannot be refused; it is scrubbed like any other.
        let _ = alloc.free(addr, requested(&span), span.device as i32, LEGACY_STREAM);
    }
    Err(rc)
}

/// The capture mode [`allocate_ready`] waits for fresh memory in.
#[derive(Clone, Copy)]
enum Wait {
    /// The thread's own: the synchronous entry points, whose runtime call is itself one a
    /// global-mode capture on another thread refuses (`cudaMalloc`, `cudaMallocPitch`).
    AsTheRuntime,
    /// Relaxed ([`relaxed_capture`]): a stream-ordered allocation, which the runtime makes
    /// without synchronising.
    Relaxed,
}

/// An allocation under an invalid `KVH_PRELOAD`: refused, with the output pointer NULL as for
/// every failed allocation (an engine that checks the pointer rather than the code must not
/// use what it held before).
fn refused(dev_ptr: *mut *mut c_void) -> cudaError_t {
    if dev_ptr.is_null() {
        return INITIALIZATION_ERROR;
    }
    // SAFETY: `dev_ptr` is non-null and, by the runtime's contract every allocation export
    // states, valid for one pointer write.
    unsafe { store(dev_ptr, Err(INITIALIZATION_ERROR)) }
}

/// The answer of a forwarded allocation. When the real function is missing, the interposer's
/// own error, the real function wrote nothing: NULL is written then, as by every other failed
/// allocation, never leaving the caller's old value.
fn forwarded(dev_ptr: *mut *mut c_void, rc: cudaError_t) -> cudaError_t {
    if rc != SHARED_OBJECT_SYMBOL_NOT_FOUND || dev_ptr.is_null() {
        return rc;
    }
    // SAFETY: `dev_ptr` is non-null and, by the runtime's contract every allocation export
    // states, valid for one pointer write.
    unsafe { store(dev_ptr, Err(rc)) }
}

/// Writes an allocation's result to the caller's pointer (NULL on failure).
///
/// # Safety
/// 1. `dev_ptr` is valid for one pointer write.
unsafe fn store(dev_ptr: *mut *mut c_void, result: Result<u64, cudaError_t>) -> cudaError_t {
    let (ptr, rc) = match result {
        Ok(addr) => (addr as *mut c_void, SUCCESS),
        Err(rc) => (std::ptr::null_mut(), rc),
    };
    // SAFETY: valid for one pointer write by (1).
    unsafe { *dev_ptr = ptr };
    rc
}

/// The block holding `ptr`, when kvhygiene has started in this process and holds it (any
/// state: a second free of a freed block is kvhygiene's to refuse, not the runtime's).
fn held(ptr: *mut c_void) -> Option<(&'static Allocator, BlockSpan)> {
    if ptr.is_null() || forked() {
        return None;
    }
    let alloc = started_process_allocator()?;
    alloc
        .block_containing(ptr as u64)
        // A block a device reset freed on its holder's behalf, and since returned to the
        // device: its holder's free is still the allocator's (accepted once).
        .or_else(|| alloc.block_freed_by_reset(ptr as u64))
        // The reset was made: what is at that address now is the runtime's.
        .filter(|span| !reset::was_done(span.device))
        .map(|span| (alloc, span))
}

/// Frees a block kvhygiene holds: in stream order (`order`), or, for the synchronous
/// `cudaFree` (`order == None`), after synchronising the block's device. The block is freed
/// even when that synchronisation reports an earlier asynchronous error (which is then
/// returned, as the runtime's `cudaFree` does): its contents must be scrubbed regardless.
/// It is not freed, and stays live, when a graph capture refuses the synchronisation or the
/// stream-ordered free (the capture error is returned): a capture has not run the work
/// queued before it, and a captured free would be re-run at every replay.
fn free_held(
    alloc: &Allocator,
    ptr: *mut c_void,
    span: BlockSpan,
    order: Option<StreamOrder>,
) -> cudaError_t {
    // A free that would free nothing (a second free, an interior pointer) is refused and
    // logged at once: neither the device's synchronisation nor a graph capture on its stream
    // (which refuses a valid free, leaving the block live) may keep it from the forensic log.
    // The core checks again under its lock: a block handed out again meanwhile is freed
    // below as any valid free, with its new size.
    let mut span = span;
    if !span.live || span.addr != ptr as u64 {
        match alloc.check_free(ptr as u64, span.device as i32) {
            Ok(requested) => span.requested = requested,
            Err(FreeError::Invalid { .. }) => return INVALID_VALUE,
            Err(_) => return UNKNOWN,
        }
    }
    let (synced, stream) = match order {
        None => (synchronize_device(span.device as c_int), LEGACY_STREAM),
        Some(order) => {
            match capturing(order.handle()) {
                Err(rc) => return rc,
                Ok(true) => return STREAM_CAPTURE_UNSUPPORTED,
                Ok(false) => {}
            }
            match order {
                StreamOrder::Stream(s) => (SUCCESS, s),
                // The caller's per-thread stream is waited for here, on its own thread; the
                // scrub then runs on the legacy stream, which every thread names alike.
                StreamOrder::PerThread => {
                    // SAFETY: cudaStreamPerThread is valid for cudaStreamSynchronize.
                    let rc =
                        relaxed_capture(|| unsafe { real::cudaStreamSynchronize(order.handle()) });
                    (rc, LEGACY_STREAM)
                }
            }
        }
    };
    if is_capture_error(synced) {
        return synced;
    }
    // The block table's size, so that a correct free is not reported as a size mismatch
    // (the runtime's free takes no size). An interior pointer is refused whatever the size.
    match alloc.free(ptr as u64, requested(&span), span.device as i32, stream) {
        Ok(_) => synced,
        Err(FreeError::Invalid { .. }) => INVALID_VALUE,
        Err(_) => UNKNOWN,
    }
}

fn requested(span: &BlockSpan) -> i64 {
    i64::try_from(span.requested).unwrap_or(i64::MAX)
}

/// The runtime's current device.
fn current_device() -> Result<c_int, cudaError_t> {
    let mut device: c_int = 0;
    // SAFETY: `device` is a valid, writable `int` for the duration of the call.
    match unsafe { real::cudaGetDevice(&mut device) } {
        SUCCESS => Ok(device),
        rc => Err(rc),
    }
}

/// `cudaDeviceSynchronize` on `device`, restoring the thread's current device after.
fn synchronize_device(device: c_int) -> cudaError_t {
    let current = match current_device() {
        Ok(d) => d,
        Err(rc) => return rc,
    };
    if current == device {
        // SAFETY: no arguments; valid at any time (a capture makes it return an error).
        return unsafe { real::cudaDeviceSynchronize() };
    }
    // SAFETY: `device` holds a live kvhygiene block, so it is a valid device ordinal.
    let rc = unsafe { real::cudaSetDevice(device) };
    if rc != SUCCESS {
        return rc;
    }
    // SAFETY: as above.
    let rc = unsafe { real::cudaDeviceSynchronize() };
    // SAFETY: `current` was the thread's device a moment ago.
    let restored = unsafe { real::cudaSetDevice(current) };
    if rc != SUCCESS {
        rc
    } else {
        restored
    }
}

fn alloc_error(e: &AllocError) -> cudaError_t {
    match e {
        AllocError::InvalidSize(_) => INVALID_VALUE,
        AllocError::InvalidDevice { .. } => INVALID_DEVICE,
        AllocError::OutOfMemory { .. } | AllocError::Backend(BackendError::OutOfMemory { .. }) => {
            MEMORY_ALLOCATION
        }
        AllocError::CaptureActive { .. }
        | AllocError::Backend(BackendError::StreamCapturing { .. }) => STREAM_CAPTURE_UNSUPPORTED,
        AllocError::ShuttingDown
        | AllocError::DeviceReset { .. }
        | AllocError::Backend(BackendError::ShuttingDown) => {
            reset::explain_refusal();
            CUDART_UNLOADING
        }
        AllocError::Backend(BackendError::Driver { code, .. }) if is_sticky_device_error(*code) => {
            *code
        }
        AllocError::Backend(_) => UNKNOWN,
    }
}

/// Whether a driver error is one of the device faults that leave the context unusable until
/// the process ends (an illegal address, a device-side assert, a failed launch, an
/// uncorrectable ECC error). The driver and the runtime number these alike, so the runtime's
/// own code is passed on: an engine that checks for them (to report the fault, or to restart)
/// must see them, not `cudaErrorUnknown`.
fn is_sticky_device_error(code: i32) -> bool {
    matches!(code, 214 | 700 | 710 | 714..=719)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocation_errors_map_to_the_runtimes_codes() {
        let capturing = BackendError::StreamCapturing {
            stream: 5,
            what: "fresh memory's zeroing",
        };
        assert_eq!(
            alloc_error(&AllocError::Backend(capturing)),
            STREAM_CAPTURE_UNSUPPORTED
        );
        let active = AllocError::CaptureActive { stream: 5, size: 1 };
        assert_eq!(alloc_error(&active), STREAM_CAPTURE_UNSUPPORTED);
        let oom = AllocError::OutOfMemory { size: 1, device: 0 };
        assert_eq!(alloc_error(&oom), MEMORY_ALLOCATION);
        assert_eq!(alloc_error(&AllocError::ShuttingDown), CUDART_UNLOADING);
        let other = AllocError::Backend(BackendError::Other("driver".into()));
        assert_eq!(alloc_error(&other), UNKNOWN);
        let driver = |code| {
            AllocError::Backend(BackendError::Driver {
                call: "cuMemAlloc_v2",
                code,
                name: String::new(),
            })
        };
        // A sticky device fault keeps its number; another driver error has no runtime twin.
        for code in [214, 700, 710, 714, 715, 716, 717, 718, 719] {
            assert_eq!(alloc_error(&driver(code)), code, "{code}");
        }
        for code in [1, 201, 701, 709, 720, 999] {
            assert_eq!(alloc_error(&driver(code)), UNKNOWN, "{code}");
        }
    }

    #[test]
    fn a_panic_in_an_allocation_export_leaves_null() {
        let mut out = 0x1234usize as *mut c_void;
        let rc = allocation_boundary(&mut out, || panic!("a bug"));
        assert_eq!((rc, out), (UNKNOWN, std::ptr::null_mut()));
        assert_eq!(
            allocation_boundary(std::ptr::null_mut(), || panic!("a bug")),
            UNKNOWN
        );
    }

    #[test]
    fn capture_errors() {
        for rc in [900, 901, 904, 905, 906, 907, 908] {
            assert!(is_capture_error(rc), "{rc}");
        }
        for rc in [0, 1, 700, 902, 903, 909, 999] {
            assert!(!is_capture_error(rc), "{rc}");
        }
    }

    #[test]
    fn per_thread_stream_arguments() {
        let null = std::ptr::null_mut();
        let two = STREAM_PER_THREAD as cudaStream_t;
        assert_eq!(ordering(null, true), StreamOrder::PerThread);
        assert_eq!(ordering(two, true), StreamOrder::PerThread);
        assert_eq!(ordering(two, false), StreamOrder::PerThread);
        assert_eq!(ordering(null, false), StreamOrder::Stream(StreamHandle(0)));
        let legacy = 1usize as cudaStream_t;
        assert_eq!(ordering(legacy, true), StreamOrder::Stream(StreamHandle(1)));
    }
}

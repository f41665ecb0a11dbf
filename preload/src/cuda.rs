//! The few CUDA runtime types and error codes the interposers speak, with the values of
//! `driver_types.h` (stable across CUDA releases: NVIDIA never renumbers an error).

use std::ffi::{c_int, c_void};

/// `cudaError_t`: a C enum, passed as an `int`.
#[allow(non_camel_case_types)]
pub type cudaError_t = c_int;

/// `cudaStream_t`: an opaque pointer, the same object as the driver's `CUstream`.
#[allow(non_camel_case_types)]
pub type cudaStream_t = *mut c_void;

pub const SUCCESS: cudaError_t = 0;
/// `cudaErrorInvalidValue`: a NULL output pointer; an invalid free (double, interior).
pub const INVALID_VALUE: cudaError_t = 1;
/// `cudaErrorMemoryAllocation`: out of memory, or a size no allocation can have.
pub const MEMORY_ALLOCATION: cudaError_t = 2;
/// `cudaErrorInitializationError`: kvhygiene did not start (invalid configuration, no
/// backend, a log that does not open) or `KVH_PRELOAD` is invalid; the reason is on stderr.
pub const INITIALIZATION_ERROR: cudaError_t = 3;
/// `cudaErrorCudartUnloading`: called after process exit or `kvh_shutdown` began (also one
/// that came before kvhygiene started).
pub const CUDART_UNLOADING: cudaError_t = 4;
/// `cudaErrorInvalidDevice`: the current device is not one kvhygiene's backend has.
pub const INVALID_DEVICE: cudaError_t = 101;
/// `cudaErrorSharedObjectSymbolNotFound`: the real runtime function to forward to, or
/// `cudaGetDevice`, is not loaded in the process.
pub const SHARED_OBJECT_SYMBOL_NOT_FOUND: cudaError_t = 302;
/// `cudaErrorStreamCaptureUnsupported`: a graph capture is under way: kvhygiene's pool has
/// no clean block to serve a synchronous allocation, or a kvhygiene block is freed in stream
/// order on a capturing stream.
pub const STREAM_CAPTURE_UNSUPPORTED: cudaError_t = 900;
/// `cudaErrorUnknown`: a backend error, or a panic caught at the boundary.
pub const UNKNOWN: cudaError_t = 999;

/// Whether `rc` is one of the runtime's stream-capture errors: refused because a capture is
/// under way (`cudaErrorStreamCaptureUnsupported` 900, `...Invalidated` 901, `...Unjoined`
/// 904, `...Isolation` 905, `...Implicit` 906, `cudaErrorCapturedEvent` 907,
/// `...WrongThread` 908). 902 and 903 (merge, unmatched) concern capture API misuse and
/// are not returned by the calls the interposers make.
pub fn is_capture_error(rc: cudaError_t) -> bool {
    rc == 900 || rc == 901 || (904..=908).contains(&rc)
}

/// `cudaStreamCaptureStatusNone`: the stream is not capturing (any other status, active or
/// invalidated, means a capture sequence is open on it).
pub const CAPTURE_STATUS_NONE: c_int = 0;
/// `cudaStreamCaptureModeRelaxed`: this thread's calls do not count as unsafe during another
/// thread's capture.
pub const CAPTURE_MODE_RELAXED: c_int = 2;

/// `cudaStreamPerThread`: what stream 0 means to the `_ptsz` entry points (the driver's
/// `CU_STREAM_PER_THREAD` has the same value).
pub const STREAM_PER_THREAD: u64 = 0x2;

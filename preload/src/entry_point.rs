//! Driver functions handed out by address: the driver's `cuGetProcAddress` and the runtime's
//! `cudaGetDriverEntryPoint` (and their per-thread and by-version forms).
//!
//! An engine that takes `cuIpcGetMemHandle` from one of these lookups calls it through a
//! pointer, never through the dynamic linker, so the interposer of that name would not see
//! its exports: an exported block would be pooled at its free and handed to the next
//! request with the handle still open. These interposers forward the lookup unchanged and,
//! when it succeeded, hand out an interposer instead of the driver function found:
//!
//! - `cuIpcGetMemHandle`, recognised by the name looked up: it has had one signature since
//!   CUDA 4.0, so every version and flag of the lookup finds a function of that type. Only
//!   when the interposer's own forward can reach the driver's function: otherwise the engine
//!   keeps the working pointer it was given;
//! - the lookup `cuGetProcAddress` itself (an engine may take it from
//!   `cudaGetDriverEntryPoint`, then every other driver function from it): looked up by that
//!   name, and recognised by address, since the version found (four arguments, or `_v2`'s
//!   five) is told only by which of the driver's two exported functions it is. An address
//!   that is neither is handed out unchanged: an interposer of the wrong arity would pass a
//!   stray pointer on as `symbolStatus`.
//!
//! Every other lookup and a failed one pass unchanged, at the cost of one string comparison.
//! Not covered: a driver function found with `dlsym` on a handle of `libcuda.so.1`, which
//! starts at that library, past this one (`dlsym` itself is not interposed); a lookup made
//! inside a library that links the runtime statically, which never reaches these exports
//! (docs/cuda.md, "IPC").
//!
//! A CUDA 11 caller passes `cudaGetDriverEntryPoint` three arguments, and the fourth passed
//! on is whatever its register held, which a CUDA 11 runtime ignores. In a process that
//! also loaded a newer runtime, the forward goes to the first runtime found ([`real`]'s
//! order, newest first), which would write through it; such a mix of runtimes is not
//! supported (nor tested) by any interposer here.

use std::ffi::{c_char, c_int, c_uint, c_void, CStr};

use crate::cuda::{cudaError_t, SUCCESS};
use crate::real::{self, DriverLookup};

/// What the caller gets in place of `found`, the function a successful lookup of `symbol`
/// wrote: this library's interposer of it, or `found` itself.
///
/// # Safety
/// 1. `symbol` is NULL or a NUL-terminated string (the lookup's contract, which the caller
///    keeps).
unsafe fn handed_out(symbol: *const c_char, found: *mut c_void) -> *mut c_void {
    if found.is_null() || symbol.is_null() {
        return found;
    }
    // SAFETY: non-null and NUL-terminated, by (1); only read for the comparison.
    let name = unsafe { CStr::from_ptr(symbol) };
    if name == c"cuIpcGetMemHandle" && real::driver_ipc_export_found() {
        return crate::cuIpcGetMemHandle as *const () as *mut c_void;
    }
    if name != c"cuGetProcAddress" {
        return found;
    }
    match real::driver_lookup_at(found) {
        Some(DriverLookup::V1) => cuGetProcAddress as *const () as *mut c_void,
        Some(DriverLookup::V2) => cuGetProcAddress_v2 as *const () as *mut c_void,
        None => found,
    }
}

/// Replaces what a lookup that returned `rc` wrote in `*out` by [`handed_out`]'s choice.
///
/// # Safety
/// 1. `out` is NULL or valid for reading and writing one pointer (the lookup's contract,
///    which wrote it when it returned `SUCCESS`).
/// 2. `symbol` is as in [`handed_out`].
unsafe fn substitute(rc: cudaError_t, symbol: *const c_char, out: *mut *mut c_void) -> cudaError_t {
    if rc == SUCCESS && !out.is_null() {
        // SAFETY: `out` is non-null and valid for one pointer read and write, by (1); the
        // successful lookup wrote it. `symbol` as (2) requires.
        unsafe { *out = handed_out(symbol, *out) };
    }
    rc
}

/// Declares the lookup interposers: each calls the real function of its name with its
/// arguments unchanged (`symbol` and `out` first, as every lookup has them), then
/// [`substitute`]s what it wrote. A panic returns `cudaErrorUnknown` (999, the driver's
/// `CUDA_ERROR_UNKNOWN` too); a real function that is not loaded, 302 (both APIs' number for
/// a missing shared-object symbol).
macro_rules! lookup_interposers {
    ($( $(#[doc = $doc:literal])* fn $name:ident(symbol, out $(, $arg:ident: $ty:ty)*); )*) => {$(
        $(#[doc = $doc])*
        #[no_mangle]
        pub extern "C" fn $name(
            symbol: *const c_char,
            out: *mut *mut c_void
            $(, $arg: $ty)*
        ) -> cudaError_t {
            crate::boundary(|| {
                // SAFETY: the caller's arguments, passed on unchanged under the contract of
                // the real function of this name.
                let rc = unsafe { real::$name(symbol, out $(, $arg)*) };
                // SAFETY: `out` and `symbol` are the caller's, as that contract has them.
                unsafe { substitute(rc, symbol, out) }
            })
        }
    )*};
}

lookup_interposers! {
    /// `cuGetProcAddress`, the driver's lookup of CUDA 11.3 to 11.8 (four arguments).
    fn cuGetProcAddress(symbol, out, cuda_version: c_int, flags: u64);
    /// `cuGetProcAddress_v2`, what CUDA 12's cuda.h calls `cuGetProcAddress` (the driver's
    /// `symbolStatus` fifth).
    fn cuGetProcAddress_v2(symbol, out, cuda_version: c_int, flags: u64, symbol_status: *mut c_int);
    /// `cudaGetDriverEntryPoint`, the runtime's lookup. Declared with CUDA 12's four
    /// arguments; a CUDA 11 caller passes three, and its runtime ignores the fourth, passed
    /// on as it came.
    fn cudaGetDriverEntryPoint(symbol, out, flags: u64, driver_status: *mut c_int);
    /// `cudaGetDriverEntryPoint` of translation units built with `--default-stream
    /// per-thread`.
    fn cudaGetDriverEntryPoint_ptsz(symbol, out, flags: u64, driver_status: *mut c_int);
    /// `cudaGetDriverEntryPointByVersion` (CUDA 12.5).
    fn cudaGetDriverEntryPointByVersion(
        symbol,
        out,
        cuda_version: c_uint,
        flags: u64,
        driver_status: *mut c_int
    );
    /// `cudaGetDriverEntryPointByVersion` of translation units built with `--default-stream
    /// per-thread`.
    fn cudaGetDriverEntryPointByVersion_ptsz(
        symbol,
        out,
        cuda_version: c_uint,
        flags: u64,
        driver_status: *mut c_int
    );
}

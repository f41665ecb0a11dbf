//! The C ABI: every `extern "C"` export of kvhygiene, and nothing else.
//!
//! Conventions (after rustls-ffi):
//! - Each export is one panic boundary ([`boundary`]): a Rust panic never unwinds into C; the
//!   call returns its documented failure value and the thread's last error is
//!   `KVH_ERR_PANIC`.
//! - Pointer arguments are checked for NULL before use.
//! - Results are [`kvh_result`] codes; void functions leave theirs in [`kvh_last_error`]
//!   (per thread, like errno), with a message in [`kvh_last_error_message`].
//! - Ownership is stated on each export. No export takes ownership of caller memory.
//!
//! The one deliberate exception to "nothing unwinds": `kvh_malloc` in `oom = throw` mode
//! throws `std::bad_alloc` from the C++ shim, because PyTorch's pluggable-allocator caller
//! does not check for NULL. It is declared `extern "C-unwind"` so that unwinding is defined.

// Exports take raw pointers by the nature of a C ABI; each export documents the contract its
// pointers must meet, and each dereference carries a SAFETY comment.
#![allow(clippy::not_unsafe_ptr_arg_deref)]

pub mod error;
mod runtime;

use std::cell::{Cell, RefCell};
use std::ffi::{c_char, c_int, c_void};
use std::panic::{catch_unwind, AssertUnwindSafe};

pub use error::kvh_result;
use error::kvh_result::*;

use crate::backend::StreamHandle;
use crate::config::OomMode;
use crate::context::{Context, MAX_ID_LEN};

thread_local! {
    static LAST_ERROR: Cell<u32> = const { Cell::new(0) };
    static LAST_MESSAGE: RefCell<String> = const { RefCell::new(String::new()) };
}

fn set_last_error(code: kvh_result, message: impl Into<String>) {
    LAST_ERROR.with(|c| c.set(code as u32));
    LAST_MESSAGE.with(|m| *m.borrow_mut() = message.into());
}

fn clear_last_error() {
    LAST_ERROR.with(|c| c.set(KVH_OK as u32));
    LAST_MESSAGE.with(|m| m.borrow_mut().clear());
}

/// Runs `f` as one panic boundary; on panic records `KVH_ERR_PANIC` and returns `on_panic`.
fn boundary<R>(on_panic: R, f: impl FnOnce() -> R) -> R {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(_) => {
            set_last_error(KVH_ERR_PANIC, "a panic was caught at the C boundary");
            on_panic
        }
    }
}

/// Records `code` (with `message`) as the thread's last error and returns it as an `int`.
fn fail(code: kvh_result, message: impl Into<String>) -> c_int {
    set_last_error(code, message);
    code as c_int
}

fn ok() -> c_int {
    clear_last_error();
    KVH_OK as c_int
}

extern "C-unwind" {
    /// Defined in csrc/oom_shim.cpp: throws `std::bad_alloc`.
    fn kvh_shim_throw_bad_alloc() -> !;
}

/// Allocates `size` bytes on `device` for use on `stream` (a `cudaStream_t`, or NULL for the
/// default stream). PyTorch's `CUDAPluggableAllocator` allocation signature.
///
/// Every byte of the returned memory reads zero. `size == 0` returns NULL without error.
/// On failure: with `KVH_OOM=throw` (the default) throws `std::bad_alloc`; with
/// `KVH_OOM=null` returns NULL and sets the last error.
///
/// Ownership: the caller owns the block until it passes it to `kvh_free`.
#[no_mangle]
pub extern "C-unwind" fn kvh_malloc(
    size: libc::ssize_t,
    device: c_int,
    stream: *mut c_void,
) -> *mut c_void {
    let (ptr, throw) = boundary((std::ptr::null_mut(), oom_throws()), || {
        malloc_inner(size, device, stream)
    });
    if ptr.is_null() && throw {
        // SAFETY: the shim only throws; the unwind passes through this "C-unwind" frame, which
        // holds no state needing cleanup, outside of any catch_unwind.
        unsafe { kvh_shim_throw_bad_alloc() }
    }
    ptr
}

/// Returns `(pointer, throw on failure)`.
fn malloc_inner(size: libc::ssize_t, device: c_int, stream: *mut c_void) -> (*mut c_void, bool) {
    if size == 0 {
        clear_last_error();
        return (std::ptr::null_mut(), false);
    }
    let rt = match runtime::get() {
        Ok(rt) => rt,
        Err(e) => {
            set_last_error(e.code(), e.to_string());
            return (std::ptr::null_mut(), oom_throws());
        }
    };
    let throw = rt.allocator.config().oom == OomMode::Throw;
    match rt
        .allocator
        .malloc(size as i64, device, stream_handle(stream))
    {
        Ok(addr) => {
            clear_last_error();
            (addr as *mut c_void, false)
        }
        Err(e) => {
            set_last_error(kvh_result::from(&e), e.to_string());
            (std::ptr::null_mut(), throw)
        }
    }
}

/// Whether a failed `kvh_malloc` throws: the configured `oom` mode, or, when the
/// configuration did not load, the raw `KVH_OOM` variable (throwing unless it says `null`,
/// since PyTorch would otherwise use a NULL pointer).
fn oom_throws() -> bool {
    match runtime::get() {
        Ok(rt) => rt.allocator.config().oom == OomMode::Throw,
        Err(_) => std::env::var("KVH_OOM").map_or(true, |v| v.trim() != "null"),
    }
}

/// Frees `ptr` (allocated by `kvh_malloc` on `device`). PyTorch's `CUDAPluggableAllocator`
/// free signature. Never waits: the block is scrubbed and verified asynchronously before any
/// reuse. `size` is checked against the allocation and never trusted. `ptr == NULL` is a no-op.
///
/// Invalid frees (unknown, double, interior, wrong device) change nothing, are logged as
/// events and leave their code in `kvh_last_error`.
///
/// Ownership: the block returns to kvhygiene; the caller must not use it again.
#[no_mangle]
pub extern "C" fn kvh_free(
    ptr: *mut c_void,
    size: libc::ssize_t,
    device: c_int,
    stream: *mut c_void,
) {
    boundary((), || {
        free_common(ptr, size, device, stream, false);
    })
}

/// As `kvh_free`, then waits for the block's scrub and returns `KVH_OK` when it verified, or
/// `KVH_ERR_VERIFY_FAILED` when the block was quarantined instead (or an invalid-free code).
#[no_mangle]
pub extern "C" fn kvh_free_checked(
    ptr: *mut c_void,
    size: libc::ssize_t,
    device: c_int,
    stream: *mut c_void,
) -> c_int {
    boundary(KVH_ERR_PANIC as c_int, || {
        free_common(ptr, size, device, stream, true)
    })
}

fn free_common(
    ptr: *mut c_void,
    size: libc::ssize_t,
    device: c_int,
    stream: *mut c_void,
    checked: bool,
) -> c_int {
    let rt = match runtime::get() {
        Ok(rt) => rt,
        Err(e) => return fail(KVH_ERR_CONFIG, e.to_string()),
    };
    let (addr, stream) = (ptr as u64, stream_handle(stream));
    let result = if checked {
        rt.allocator.free_checked(addr, size as i64, device, stream)
    } else {
        rt.allocator.free(addr, size as i64, device, stream)
    };
    match result {
        Ok(report) if report.size_mismatch => fail(
            KVH_ERR_SIZE_MISMATCH,
            format!("free of {addr:#x} with size {size}, which differs from the allocation; freed with the recorded size"),
        ),
        Ok(_) => ok(),
        Err(e) => fail(kvh_result::from(&e), e.to_string()),
    }
}

/// Records that the block at `ptr` is in use on `stream` (PyTorch's record-stream hook): its
/// scrub will be ordered after the work queued there. Unknown pointers are ignored.
#[no_mangle]
pub extern "C" fn kvh_record_stream(ptr: *mut c_void, stream: *mut c_void) {
    boundary((), || match runtime::get() {
        Ok(rt) => {
            rt.allocator
                .record_stream(ptr as u64, stream_handle(stream));
            clear_last_error();
        }
        Err(e) => set_last_error(e.code(), e.to_string()),
    })
}

/// Submits every pending scrub, waits for them, and returns every clean cached block to the
/// backend (PyTorch's empty-cache hook).
#[no_mangle]
pub extern "C" fn kvh_empty_cache() {
    boundary((), || match runtime::get() {
        Ok(rt) => {
            rt.allocator.empty_cache();
            clear_last_error();
        }
        Err(e) => set_last_error(e.code(), e.to_string()),
    })
}

/// Submits every pending scrub and waits until each has been verified and applied. Returns
/// `KVH_OK`, or `KVH_ERR_BACKEND` when an asynchronous backend error has occurred (sticky).
#[no_mangle]
pub extern "C" fn kvh_synchronize() -> c_int {
    boundary(KVH_ERR_PANIC as c_int, || {
        let rt = match runtime::get() {
            Ok(rt) => rt,
            Err(e) => return fail(KVH_ERR_CONFIG, e.to_string()),
        };
        match rt.allocator.synchronize() {
            Ok(()) => ok(),
            Err(e) => fail(KVH_ERR_BACKEND, e),
        }
    })
}

/// Starts the allocator now (reading the configuration) instead of at the first call, so a
/// bad configuration is reported where it can be handled. Returns `KVH_OK` or
/// `KVH_ERR_CONFIG` / `KVH_ERR_BACKEND` with the reason in `kvh_last_error_message`.
#[no_mangle]
pub extern "C" fn kvh_init() -> c_int {
    boundary(KVH_ERR_PANIC as c_int, || match runtime::get() {
        Ok(_) => ok(),
        Err(e) => fail(e.code(), e.to_string()),
    })
}

/// Orderly shutdown before process exit: scrubs and verifies everything freed, writes the
/// forensic log's stop record, then makes no further device calls. Later allocations fail.
#[no_mangle]
pub extern "C" fn kvh_shutdown() {
    boundary((), runtime::shutdown)
}

/// Sets the calling thread's tenant, request and model ids, stamped on every block it
/// allocates and on their events. Each may be NULL (absent). Ids longer than 128 bytes, with
/// control characters, or not UTF-8 are refused with `KVH_ERR_INVALID_CONTEXT`, and the
/// previous context stays. Ownership: the strings are copied; the caller keeps them.
#[no_mangle]
pub extern "C" fn kvh_set_context(
    tenant_id: *const c_char,
    request_id: *const c_char,
    model_id: *const c_char,
) -> c_int {
    boundary(KVH_ERR_PANIC as c_int, || {
        let read = |p| {
            // SAFETY: the caller passes NULL or a pointer to a string; `bounded_c_str` reads at
            // most MAX_ID_LEN + 1 bytes, stopping at the first NUL.
            unsafe { bounded_c_str(p) }
        };
        let (t, r, m) = (read(tenant_id), read(request_id), read(model_id));
        match Context::from_bytes(t.as_deref(), r.as_deref(), m.as_deref()) {
            Ok(ctx) => {
                Context::set_current(ctx);
                ok()
            }
            Err(e) => fail(KVH_ERR_INVALID_CONTEXT, e.to_string()),
        }
    })
}

/// Clears the calling thread's context.
#[no_mangle]
pub extern "C" fn kvh_clear_context() {
    boundary((), || {
        Context::set_current(Context::none());
    })
}

/// Writes the allocator's statistics as JSON (NUL-terminated) into `buf` of `len` bytes.
/// Like the other query exports, it leaves the thread's last error unchanged.
/// `*out_len` receives the JSON's length without the NUL; `buf` must hold `*out_len + 1`
/// bytes, else `KVH_ERR_BUFFER_TOO_SMALL` is returned and nothing is written (call with
/// `buf = NULL, len = 0` to ask for the size). Ownership: `buf` stays the caller's.
#[no_mangle]
pub extern "C" fn kvh_stats_json(buf: *mut c_char, len: usize, out_len: *mut usize) -> c_int {
    boundary(KVH_ERR_PANIC as c_int, || {
        let rt = match runtime::get() {
            Ok(rt) => rt,
            Err(e) => return fail(KVH_ERR_CONFIG, e.to_string()),
        };
        // SAFETY: `buf` is NULL or valid for `len` bytes; `out_len` is NULL or valid for a
        // write of one `usize` (the caller's contract above).
        preserving_last_error(|| unsafe { write_c_string(&rt.stats_json(), buf, len, out_len) })
    })
}

/// The calling thread's last result code (`KVH_OK` after a successful call).
#[no_mangle]
pub extern "C" fn kvh_last_error() -> u32 {
    boundary(KVH_ERR_PANIC as u32, || LAST_ERROR.with(Cell::get))
}

/// Writes the calling thread's last error message (NUL-terminated) into `buf`, with the same
/// length protocol as `kvh_stats_json`. Leaves the last error and its message unchanged.
#[no_mangle]
pub extern "C" fn kvh_last_error_message(
    buf: *mut c_char,
    len: usize,
    out_len: *mut usize,
) -> c_int {
    boundary(KVH_ERR_PANIC as c_int, || {
        let message = LAST_MESSAGE.with(|m| m.borrow().clone());
        // SAFETY: as for `kvh_stats_json`.
        preserving_last_error(|| unsafe { write_c_string(&message, buf, len, out_len) })
    })
}

/// Writes the description of `code` (NUL-terminated) into `buf`, with the same length
/// protocol as `kvh_stats_json`. Unknown codes return `KVH_ERR_UNKNOWN_CODE`.
#[no_mangle]
pub extern "C" fn kvh_strerror(
    code: u32,
    buf: *mut c_char,
    len: usize,
    out_len: *mut usize,
) -> c_int {
    boundary(KVH_ERR_PANIC as c_int, || {
        let Some(result) = kvh_result::from_u32(code) else {
            return KVH_ERR_UNKNOWN_CODE as c_int;
        };
        // SAFETY: as for `kvh_stats_json`.
        preserving_last_error(|| unsafe { write_c_string(result.message(), buf, len, out_len) })
    })
}

/// The library version, as a static NUL-terminated string. Ownership: static; never free it.
#[no_mangle]
pub extern "C" fn kvh_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

/// Runs a query export without touching the thread's last error, so that
/// `kvh_strerror(kvh_last_error(), ...)` and size queries never clobber what they describe.
fn preserving_last_error(f: impl FnOnce() -> c_int) -> c_int {
    let code = LAST_ERROR.with(Cell::get);
    let message = LAST_MESSAGE.with(|m| m.borrow().clone());
    let rc = f();
    LAST_ERROR.with(|c| c.set(code));
    LAST_MESSAGE.with(|m| *m.borrow_mut() = message);
    rc
}

fn stream_handle(stream: *mut c_void) -> StreamHandle {
    StreamHandle(stream as u64)
}

/// Copies `text` plus a NUL into `buf` if it fits; always reports the text length.
///
/// # Safety
/// 1. `buf` is NULL or valid for writes of `len` bytes.
/// 2. `out_len` is NULL or valid for a write of one `usize`.
unsafe fn write_c_string(text: &str, buf: *mut c_char, len: usize, out_len: *mut usize) -> c_int {
    if out_len.is_null() {
        return fail(KVH_ERR_NULL_PARAMETER, "out_len is NULL");
    }
    // SAFETY: non-null, valid by (2).
    unsafe { *out_len = text.len() };
    if buf.is_null() || len <= text.len() {
        return fail(
            KVH_ERR_BUFFER_TOO_SMALL,
            format!("buffer of {len} bytes; {} needed", text.len() + 1),
        );
    }
    // SAFETY: `buf` is valid for `len > text.len()` bytes by (1); the source is a distinct
    // Rust string, so the regions do not overlap.
    unsafe {
        std::ptr::copy_nonoverlapping(text.as_ptr(), buf.cast::<u8>(), text.len());
        *buf.add(text.len()) = 0;
    }
    ok()
}

/// Reads a NUL-terminated string of at most `MAX_ID_LEN + 1` bytes (one more than accepted,
/// so an over-long id is still detected) without scanning further into caller memory.
///
/// # Safety
/// 1. `p` is NULL, or points to readable bytes up to its NUL or at least `MAX_ID_LEN + 1`.
unsafe fn bounded_c_str(p: *const c_char) -> Option<Vec<u8>> {
    if p.is_null() {
        return None;
    }
    let mut bytes = Vec::new();
    for i in 0..=MAX_ID_LEN {
        // SAFETY: by (1), every byte up to the NUL or the bound is readable.
        let b = unsafe { *p.add(i) } as u8;
        if b == 0 {
            break;
        }
        bytes.push(b);
    }
    Some(bytes)
}

/// Fire drill for the detection path (host backend only): the next `segments` scrubs leave
/// half of their block unzeroed, so verification must fail and quarantine them. Returns
/// `KVH_OK`, or `KVH_ERR_BACKEND` on backends that refuse (CUDA).
#[no_mangle]
pub extern "C" fn kvh_inject_fault(segments: u32) -> c_int {
    boundary(KVH_ERR_PANIC as c_int, || {
        let rt = match runtime::get() {
            Ok(rt) => rt,
            Err(e) => return fail(e.code(), e.to_string()),
        };
        match rt.allocator.backend().inject_fault(u64::from(segments)) {
            Ok(()) => ok(),
            Err(e) => fail(KVH_ERR_BACKEND, e.to_string()),
        }
    })
}

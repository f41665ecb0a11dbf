//! The C ABI: every `extern "C"` export of kvhygiene, and nothing else.
//!
//! Conventions (after rustls-ffi):
//! - Each export is one panic boundary (`boundary`): a Rust panic never unwinds into C; the
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

use crate::alloc::Allocator;
use crate::backend::StreamHandle;
use crate::config::OomMode;
use crate::context::{Context, MAX_ID_LEN};

thread_local! {
    static LAST_ERROR: Cell<u32> = const { Cell::new(0) };
    static LAST_MESSAGE: RefCell<String> = const { RefCell::new(String::new()) };
}

// The last error is reached through `try_with` only: an export called from a destructor that
// runs at thread exit (a C++ `thread_local` freeing device memory), after the message's
// thread-local was destroyed, keeps no message instead of panicking, and the panic boundary's
// own handler cannot panic again.

fn set_last_error(code: kvh_result, message: impl Into<String>) {
    let _ = LAST_ERROR.try_with(|c| c.set(code as u32));
    let _ = LAST_MESSAGE.try_with(|m| *m.borrow_mut() = message.into());
}

fn clear_last_error() {
    let _ = LAST_ERROR.try_with(|c| c.set(KVH_OK as u32));
    let _ = LAST_MESSAGE.try_with(|m| m.borrow_mut().clear());
}

fn last_error_code() -> u32 {
    LAST_ERROR.try_with(Cell::get).unwrap_or(KVH_OK as u32)
}

fn last_error_message() -> String {
    LAST_MESSAGE
        .try_with(|m| m.borrow().clone())
        .unwrap_or_default()
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
    /// Defined in csrc/oom_shim.cpp: throws a `std::bad_alloc` whose `what()` is `what` (a
    /// NUL-terminated text it copies before the throw; NULL: "std::bad_alloc").
    fn kvh_shim_throw_bad_alloc(what: *const libc::c_char) -> !;
}

/// Allocates `size` bytes on `device` for use on `stream` (a `cudaStream_t`, or NULL for the
/// default stream). PyTorch's `CUDAPluggableAllocator` allocation signature.
///
/// Every byte of the returned memory reads zero. `size == 0` returns NULL without error.
/// On failure (also when the runtime could not start): with the policy's `oom = "throw"`
/// (`KVH_OOM` or the `KVH_CONFIG` file; the default) throws `std::bad_alloc`, having said why
/// on stderr (the first 16 failures of a process); its `what()` says why too, which PyTorch
/// raises as a `RuntimeError` of that text, starting "CUDA out of memory." for an
/// out-of-memory as PyTorch's own message does (not `torch.OutOfMemoryError`, which only
/// c10's own error type becomes). With `oom = "null"` returns NULL. The last error is set in
/// both modes.
///
/// `stream` is recorded on the block: the block's scrub after its free waits for it, so it must
/// stay valid until then, or until `kvh_forget_stream` was called for it.
///
/// Ownership: the caller owns the block until it passes it to `kvh_free`.
#[no_mangle]
pub extern "C-unwind" fn kvh_malloc(
    size: libc::ssize_t,
    device: c_int,
    stream: *mut c_void,
) -> *mut c_void {
    let (ptr, throw) = boundary((std::ptr::null_mut(), None), || {
        let (ptr, throw) = malloc_inner(size, device, stream);
        (ptr, Some(throw))
    });
    // A panic caught inside left no answer; the environment alone decides then (starting the
    // runtime out here, outside the boundary, could panic again). Its reading is caught too,
    // for this frame unwinds into C++: a panic there throws, as the default policy does.
    let throw =
        throw.unwrap_or_else(|| std::panic::catch_unwind(oom_throws_by_env).unwrap_or(true));
    if ptr.is_null() && throw {
        let what = std::panic::catch_unwind(|| thrown_text(size, device))
            .ok()
            .flatten();
        let what_ptr = what.as_ref().map_or(std::ptr::null(), |w| w.as_ptr());
        // SAFETY: the shim copies `what_ptr`'s text (NUL-terminated, alive in `what` until
        // this frame ends) before it throws; the unwind passes through this "C-unwind" frame
        // outside of any catch_unwind, dropping `what` as it goes.
        unsafe { kvh_shim_throw_bad_alloc(what_ptr) }
    }
    ptr
}

/// The `what()` of the exception a failed `kvh_malloc` throws, from the thread's last error:
/// PyTorch makes it the text of the `RuntimeError` it raises. An out-of-memory starts as
/// PyTorch's own does ("CUDA out of memory."), which handlers that retry with less memory
/// look for; no other failure does, so that they do not retry what would fail again. Cut to
/// the 511 bytes the shim keeps, at a character's end (PyTorch decodes it as UTF-8). `None`
/// (a plain `std::bad_alloc`) when the text cannot be a C string.
fn thrown_text(size: libc::ssize_t, device: c_int) -> Option<std::ffi::CString> {
    const KEPT: usize = 511;
    let message = last_error_message();
    let reason = message.strip_prefix("kvhygiene: ").unwrap_or(&message);
    let mut text = if last_error_code() == KVH_ERR_OUT_OF_MEMORY as u32 {
        format!(
            "CUDA out of memory. Tried to allocate {size} bytes on device {device} \
             (kvhygiene: {reason})"
        )
    } else {
        format!("kvhygiene cannot allocate {size} bytes on device {device}: {reason}")
    };
    if text.len() > KEPT {
        let end = (0..=KEPT)
            .rev()
            .find(|&i| text.is_char_boundary(i))
            .unwrap_or(0);
        text.truncate(end);
    }
    std::ffi::CString::new(text).ok()
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
            let throw =
                runtime::configured_oom().map_or_else(oom_throws_by_env, |m| m == OomMode::Throw);
            // A start-up that failed said why once, as it failed; a shutdown before any
            // start-up, or a forked child, said nothing: each throw says it.
            if throw {
                say_thrown(e, false);
            }
            return (std::ptr::null_mut(), throw);
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
            if throw {
                let capture = matches!(e, crate::alloc::AllocError::CaptureActive { .. });
                say_thrown(&e, capture);
            }
            set_last_error(kvh_result::from(&e), e.to_string());
            (std::ptr::null_mut(), throw)
        }
    }
}

/// Says on stderr why `kvh_malloc` is about to throw: in the server's log, where a caller that
/// catches the exception and goes on (or a C++ caller that prints no `what()`) leaves no
/// trace, and the thread's last error is out of a Python caller's reach. The first few failures
/// only, so that a caller that retries in a loop does not flood stderr. `capture`: the
/// failure is a CUDA graph capture's refusal, which the message explains.
#[cold]
fn say_thrown(e: &dyn std::fmt::Display, capture: bool) {
    static SAID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let capture = if capture {
        " (PyTorch keeps no graph memory pool for a pluggable allocator: run without CUDA \
         graphs, docs/cuda.md)"
    } else {
        ""
    };
    crate::say_first(
        &SAID,
        16,
        format_args!("kvhygiene: kvh_malloc throws std::bad_alloc: {e}{capture}"),
        "further failures are not said",
    );
}

/// Whether a failed `kvh_malloc` throws when no configuration was read (it was invalid, or a
/// panic left no answer): the raw `KVH_OOM` variable, throwing unless it says `null` (in any
/// case, as the policy reads it), since PyTorch would otherwise use a NULL pointer.
fn oom_throws_by_env() -> bool {
    match std::env::var("KVH_OOM") {
        Ok(v) => !v.trim().eq_ignore_ascii_case("null"),
        // Not in the environment: the `KVH_CONFIG` file's `oom`, when that file reads (the
        // environment failed on another key), else throw.
        Err(_) => std::env::var_os("KVH_CONFIG")
            .and_then(|f| crate::config::Config::oom_of_file(std::path::Path::new(&f)))
            .is_none_or(|oom| oom != crate::config::OomMode::Null),
    }
}

/// Frees `ptr` (allocated by `kvh_malloc` on `device`). PyTorch's `CUDAPluggableAllocator`
/// free signature. Never waits: the block is scrubbed and verified asynchronously before any
/// reuse. `size` is checked against the allocation and never trusted. `ptr == NULL` is a no-op.
///
/// The scrub runs on `stream` (on a stream of another device than `device`: on `device`'s
/// legacy default stream, after the work queued on `stream`), in a batch submitted after the
/// free returns: `stream`, and the streams recorded on the block (`kvh_record_stream`), must
/// stay valid until then (`kvh_synchronize` returned), or until `kvh_forget_stream` was called
/// for them. (PyTorch never destroys the streams of its pool.)
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
/// `KVH_ERR_VERIFY_FAILED` when the block was quarantined instead: coverage below the
/// threshold, a sample read non-zero (residue) whatever the coverage, or a scrub the driver
/// failed (its launch or its wait: nothing verified) (or an invalid-free code).
/// `KVH_ERR_SIZE_MISMATCH` means the scrub verified but `size` differed from the allocation's
/// (the block was freed by its recorded size).
/// When the backend refused the scrub for now it does not wait: `KVH_ERR_CAPTURE_ACTIVE` (the
/// stream is capturing a CUDA graph) or `KVH_ERR_OUT_OF_MEMORY` (no memory for the batch); the
/// block stays out of use and is scrubbed at a later flush. After `kvh_shutdown` (also one
/// that began during the wait), `KVH_ERR_SHUTTING_DOWN`: the block is not scrubbed, and is
/// leaked, never handed out.
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
    // Before the runtime: a NULL free neither starts the allocator nor reports its errors.
    if ptr.is_null() {
        return ok();
    }
    let rt = match runtime::get() {
        Ok(rt) => rt,
        Err(e) => return fail(e.code(), e.to_string()),
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
/// scrub will be ordered after the work queued there. `ptr` may point anywhere into a live
/// allocation (the data pointer of a view of it). Other pointers are ignored. `stream` must
/// stay valid until the block's scrub was submitted (`kvh_synchronize` returned after the
/// free), or until `kvh_forget_stream` was called for it.
#[no_mangle]
pub extern "C" fn kvh_record_stream(ptr: *mut c_void, stream: *mut c_void) {
    boundary((), || match runtime::get_if_begun() {
        // Before start-up every pointer is unknown: nothing to do, and nothing is started.
        None => clear_last_error(),
        Some(Ok(rt)) => {
            rt.allocator
                .record_stream(ptr as u64, stream_handle(stream));
            clear_last_error();
        }
        Some(Err(e)) => set_last_error(e.code(), e.to_string()),
    })
}

/// Says that the caller is about to destroy `stream`, which it named to `kvh_malloc`,
/// `kvh_free`, `kvh_free_checked`, `kvh_record_stream`, `kvh_scrub_blocks` or
/// `kvh_claim_blocks`: kvhygiene
/// submits now the scrubs still waiting to run on it or after it, and never names it to the
/// driver again (the later scrubs of blocks allocated or freed on it run on the legacy default
/// stream). Call it after the work queued on `stream` has finished
/// (`cudaStreamSynchronize`), and before destroying it. Until then a stream named to those
/// calls must stay valid: scrubs are batched, and run after the free returned (or later, when
/// a capture or a shortage of memory deferred them). NULL (the
/// legacy stream) and `cudaStreamPerThread` are never forgotten. Does nothing before
/// kvhygiene started. Leaves `KVH_ERR_SHUTTING_DOWN` in `kvh_last_error` after
/// `kvh_shutdown` (nothing is submitted any more), or the start-up's error.
#[no_mangle]
pub extern "C" fn kvh_forget_stream(stream: *mut c_void) {
    boundary((), || match runtime::get_if_begun() {
        // Before start-up no stream was named to the allocator.
        None => clear_last_error(),
        // Nothing is submitted once shut down: the scrubs that wait on the stream never run.
        Some(Ok(rt)) if rt.allocator.is_shut_down() => set_last_error(
            KVH_ERR_SHUTTING_DOWN,
            "kvhygiene was shut down: the scrubs that wait on the stream are not submitted",
        ),
        Some(Ok(rt)) => {
            rt.allocator.forget_stream(stream_handle(stream));
            clear_last_error();
        }
        Some(Err(e)) => set_last_error(e.code(), e.to_string()),
    })
}

/// Says that the caller is about to export the allocation containing `ptr` for another
/// process (`cudaIpcGetMemHandle`). Call it before taking the handle, for memory from
/// `kvh_malloc` (the LD_PRELOAD library calls it inside its `cudaIpcGetMemHandle`). The
/// importer may keep its mapping after the block is freed, so kvhygiene never pools that
/// block again: its free scrubs and verifies it as always, then returns it to the driver
/// (`release` record, reason `ipc_exported`; a block whose verification fails is
/// quarantined, as any), whose next allocation at that address gets a new handle. The first mark of an allocation is recorded (`ipc_export`, with the caller's
/// context) and counted (`ipc_exported_blocks`); marking it again changes nothing. `ptr` may
/// point anywhere into the allocation, as the driver exports the whole allocation.
///
/// Returns `KVH_OK` when `ptr` lies in a live allocation of kvhygiene, now marked;
/// `KVH_ERR_UNKNOWN_POINTER` when it lies in no memory kvhygiene holds (also before
/// kvhygiene started, which this call does not do): nothing to mark, the export is the
/// runtime's affair; `KVH_ERR_NOT_LIVE` when it lies in a block that is not handed out
/// (freed, pooled or quarantined), whose memory would be the next owner's: do not export
/// it; `KVH_ERR_NULL_PARAMETER` for NULL; or the start-up's error.
#[no_mangle]
pub extern "C" fn kvh_mark_ipc_exported(ptr: *const c_void) -> c_int {
    boundary(KVH_ERR_PANIC as c_int, || {
        if ptr.is_null() {
            return fail(KVH_ERR_NULL_PARAMETER, "kvh_mark_ipc_exported: ptr is NULL");
        }
        match runtime::get_if_begun() {
            // Before start-up kvhygiene holds no memory.
            None => fail(
                KVH_ERR_UNKNOWN_POINTER,
                format!(
                    "{:#x} is not inside memory kvhygiene holds (it has not started)",
                    ptr as u64
                ),
            ),
            Some(Ok(rt)) => match rt.allocator.mark_ipc_exported(ptr as u64) {
                Ok(_) => ok(),
                Err(e) => fail(kvh_result::from(&e), e.to_string()),
            },
            Some(Err(e)) => fail(e.code(), e.to_string()),
        }
    })
}

/// Where the blocks of a paged KV cache are, for `kvh_scrub_blocks`: `region_count` regions
/// (for example one per layer and per K/V) whose bases are in `region_bases`, each holding
/// `blocks_per_region` blocks; block `i` of a region starts `i * block_stride` bytes after
/// the region's base and is `block_bytes` long. vLLM's `[2, num_blocks, ...]` layer tensor is
/// two regions (K, V) with `block_stride == block_bytes`; a `[num_blocks, 2, ...]` tensor is
/// two regions `block_bytes` apart with `block_stride == 2 * block_bytes`. With one block
/// per region the stride places nothing and is not checked.
#[repr(C)]
pub struct kvh_kv_layout {
    /// `region_count` device addresses (aligned `uint64_t`s).
    pub region_bases: *const u64,
    pub region_count: usize,
    pub block_bytes: u64,
    pub block_stride: u64,
    pub blocks_per_region: u64,
}

/// Zeroes and verifies blocks `block_ids[0..block_count]` of the paged KV cache `layout` on
/// `device`, in stream order on `stream` (after the work queued there and on the streams of
/// the allocations holding the cache), and waits for the verdict. For engines that hand KV
/// blocks between requests themselves: call it when the engine frees blocks (their last
/// reference: with prefix caching a block may be shared), before they can be reassigned.
///
/// Every region, all of its blocks, must lie inside the requested bytes of one live
/// allocation from `kvh_malloc` on `device`, and no two blocks of the layout may overlap:
/// kvhygiene never writes memory it did not hand out, nor a block the call did not name.
/// `stream` is NULL or a stream of `device`; it is recorded on the allocations, so it must
/// stay valid until they are freed and scrubbed (as with `kvh_record_stream`), or until
/// `kvh_forget_stream` was called for it.
///
/// Returns `KVH_OK` when every block verified zero. `KVH_ERR_VERIFY_FAILED` when some did
/// not: `*failed_count` says how many, and the first `failed_capacity` of their ids are
/// written to `failed_ids`, in the order given; those blocks must not be handed to another
/// request. Any other code means no block of the call may be taken as clean: refusals
/// (`KVH_ERR_INVALID_LAYOUT`, `KVH_ERR_NOT_LIVE`, `KVH_ERR_INVALID_DEVICE`,
/// `KVH_ERR_NULL_PARAMETER`, and start-up errors such as `KVH_ERR_CONFIG`) scrub nothing;
/// `KVH_ERR_BACKEND`, `KVH_ERR_CAPTURE_ACTIVE`, `KVH_ERR_SHUTTING_DOWN` and
/// `KVH_ERR_OUT_OF_MEMORY` (no device memory for a scrub batch: when none of the call's
/// batches could start, after waiting up to 2 s for the batches in flight to give theirs back;
/// a later batch of a call over 65,536 segments fails at once; the call may be made again once
/// memory was freed) mean the call did not finish; blocks that the batches completed before
/// the failure found not zero are still written to `failed_ids` (`*failed_count` says how
/// many, 0 when none): as with `KVH_ERR_VERIFY_FAILED`, they must not be handed to another
/// request (something wrote them after they were freed), and a retry's verdict on the
/// others does not change that. Calls that reach the device leave a `kv_scrub` record (with the error when they
/// did not finish); calls the allocator refuses (layout, ids, memory not live) leave a policy
/// violation; NULLs and over-limit lengths are refused before either.
///
/// `block_ids` may be NULL when `block_count` is 0 (a no-op once the layout's geometry is
/// checked; the allocator is started all the same, as by every KV call, so a launcher calls
/// none before it forks its workers); `failed_ids` may be NULL when `failed_capacity` is 0;
/// `layout` and `failed_count` are required. Waits for its scrub launches (one per 65,536 segments), not
/// for the whole device: call it once per freed set of blocks, not per block. One call
/// takes at most 1,048,576 segments (blocks × regions; more is `KVH_ERR_INVALID_LAYOUT`):
/// split a larger set into several calls.
///
/// Ownership: the arrays stay the caller's and are used only during the call.
#[no_mangle]
// A C signature: each array travels as a pointer and a length.
#[allow(clippy::too_many_arguments)]
pub extern "C" fn kvh_scrub_blocks(
    layout: *const kvh_kv_layout,
    block_ids: *const u32,
    block_count: usize,
    device: c_int,
    stream: *mut c_void,
    failed_ids: *mut u32,
    failed_capacity: usize,
    failed_count: *mut usize,
) -> c_int {
    boundary(KVH_ERR_PANIC as c_int, || {
        if failed_count.is_null() {
            return fail(KVH_ERR_NULL_PARAMETER, "failed_count is NULL");
        }
        // SAFETY: non-null; the caller passes a pointer valid for one `usize` write.
        unsafe { *failed_count = 0 };
        // SAFETY: `layout`, `block_ids` and their lengths are the caller's contract above;
        // `read_kv_call` checks NULLs and bounds the lengths before reading.
        let (layout, ids) = match unsafe { read_kv_call(layout, block_ids, block_count) } {
            Ok(call) => call,
            Err(rc) => return rc,
        };
        if failed_ids.is_null() && failed_capacity > 0 {
            return fail(
                KVH_ERR_NULL_PARAMETER,
                "failed_ids is NULL but failed_capacity is not 0",
            );
        }
        let rt = match runtime::get() {
            Ok(rt) => rt,
            Err(e) => return fail(e.code(), e.to_string()),
        };
        let report =
            match rt
                .allocator
                .scrub_kv_blocks(&layout, &ids, device, stream_handle(stream))
            {
                Ok(report) => report,
                Err(e) => {
                    if let crate::alloc::KvScrubError::Backend { failed, .. } = &e {
                        // SAFETY: as below: `failed_ids` is non-null when `failed_capacity > 0`
                        // and valid for that many writes; `failed_count` is non-null.
                        unsafe { write_ids(failed, failed_ids, failed_capacity, failed_count) };
                    }
                    return fail(kvh_result::from(&e), e.to_string());
                }
            };
        if report.failed.is_empty() {
            return ok();
        }
        // SAFETY: `failed_ids` is non-null when `failed_capacity > 0` (checked above) and valid
        // for `failed_capacity` writes; `failed_count` was checked non-null.
        unsafe { write_ids(&report.failed, failed_ids, failed_capacity, failed_count) };
        fail(
            KVH_ERR_VERIFY_FAILED,
            format!(
                "{} of {} KV blocks failed verification (first: {}); they must not be reused",
                report.failed.len(),
                ids.len(),
                report.failed[0]
            ),
        )
    })
}

/// Gives blocks `block_ids[0..block_count]` of the paged KV cache `layout` on `device` to the
/// calling thread's request (its `kvh_set_context` ids): the eviction gate. Call it when the
/// engine hands blocks to a request (blocks taken from its free pool, including evicted
/// prefix-cache blocks; not prefix-cache hits the request shares). A block that would change
/// owner without a verified scrub since its last owner (`kvh_scrub_blocks`, or an earlier
/// claim's scrub), or whose owner kvhygiene does not know, is scrubbed and verified on
/// `stream` first (`KVH_KV_GATE=scrub`, the default) or makes the claim fail
/// (`KVH_KV_GATE=enforce`). `KVH_KV_GATE_SCOPE=tenant` makes a tenant, not a request, the
/// owner (a tenant's requests share blocks). A thread with no request id (tenant id, under
/// the tenant scope) matches no owner, itself included. An owner is its ids alone: a request
/// that carries the ids of one that finished is that owner again and is handed its blocks
/// unscrubbed, so give each request a request id of its own (or scrub a finished request's
/// blocks before its id can come back). `KVH_KV_GATE=off` accepts every claim
/// once the layout and ids are checked.
///
/// The layout and stream rules are those of `kvh_scrub_blocks`.
///
/// Returns `KVH_OK` when every block was handed over. When some were not, the others were,
/// `*refused_count` says how many were not, and the first `refused_capacity` of their ids are
/// written to `refused_ids` in the order given; those blocks must not be used:
/// `KVH_ERR_VERIFY_FAILED` when a scrub of some of them failed verification (now, before,
/// or another scrub's while the gate scrubbed them; the list also holds any taken ones),
/// `KVH_ERR_KV_TAKEN` when another claim took them while this claim ran (two
/// requests were given the same blocks), or when the gate lost track of them: their ledger
/// was pushed out at every try (claims through another layout of the same memory, or more
/// KV caches claiming than the gate keeps ledgers for, 64; the `policy_violation` record says
/// which). Claim them again. `KVH_ERR_KV_GATE` (enforce): blocks would change
/// owner unscrubbed (or failed their last scrub); they are listed the same way and nothing
/// was handed over. Any other code is one of `kvh_scrub_blocks`'s (`KVH_ERR_NOT_LIVE` also
/// when the cache was freed while the claim ran): nothing may be taken as handed over; with
/// `KVH_ERR_BACKEND` (the gate's scrub stopped) the blocks it found not zero before it stopped
/// are listed the same way, to be retired, as `kvh_scrub_blocks` lists them. Refusals
/// and failed blocks leave a `policy_violation` record (policy `kv_gate`); the gate's scrubs
/// leave `kv_scrub` records with `trigger` `claim_gate`.
///
/// `block_ids` may be NULL when `block_count` is 0 (the allocator is started all the same, as
/// by every KV call); `refused_ids` may be NULL when `refused_capacity` is 0; `layout` and
/// `refused_count` are required.
///
/// Ownership: the arrays stay the caller's and are used only during the call.
#[no_mangle]
// A C signature: each array travels as a pointer and a length.
#[allow(clippy::too_many_arguments)]
pub extern "C" fn kvh_claim_blocks(
    layout: *const kvh_kv_layout,
    block_ids: *const u32,
    block_count: usize,
    device: c_int,
    stream: *mut c_void,
    refused_ids: *mut u32,
    refused_capacity: usize,
    refused_count: *mut usize,
) -> c_int {
    boundary(KVH_ERR_PANIC as c_int, || {
        if refused_count.is_null() {
            return fail(KVH_ERR_NULL_PARAMETER, "refused_count is NULL");
        }
        // SAFETY: non-null; the caller passes a pointer valid for one `usize` write.
        unsafe { *refused_count = 0 };
        // SAFETY: `layout`, `block_ids` and their lengths are the caller's contract above;
        // `read_kv_call` checks NULLs and bounds the lengths before reading.
        let (layout, ids) = match unsafe { read_kv_call(layout, block_ids, block_count) } {
            Ok(call) => call,
            Err(rc) => return rc,
        };
        if refused_ids.is_null() && refused_capacity > 0 {
            return fail(
                KVH_ERR_NULL_PARAMETER,
                "refused_ids is NULL but refused_capacity is not 0",
            );
        }
        let rt = match runtime::get() {
            Ok(rt) => rt,
            Err(e) => return fail(e.code(), e.to_string()),
        };
        let claimed = rt
            .allocator
            .claim_kv_blocks(&layout, &ids, device, stream_handle(stream));
        let (refused, code, message) = match claimed {
            Ok(report) if report.refused.is_empty() && report.taken.is_empty() => return ok(),
            Ok(report) => not_handed_over(&ids, report),
            Err(e) => claim_failed(e),
        };
        // SAFETY: `refused_ids` is non-null when `refused_capacity > 0` (checked above) and
        // valid for `refused_capacity` writes; `refused_count` was checked non-null.
        unsafe { write_ids(&refused, refused_ids, refused_capacity, refused_count) };
        fail(code, message)
    })
}

/// Longest `reason` of `kvh_refuse_blocks` kept, in bytes; a longer one is cut.
const MAX_REFUSAL_REASON: usize = 512;

/// Records that the engine refused to give blocks `block_ids[0..block_count]` of the paged KV
/// cache `layout` on `device` to the calling thread's request, for `reason` (NUL-terminated
/// text, NULL for none; cut at 512 bytes, bytes that are not UTF-8 replaced): a refusal the
/// engine decides itself, such as one block given to two requests in the same step (each
/// would read what the other writes, which no scrub can separate). It is logged and counted
/// as a refused claim (`policy_violation` record, policy `kv_gate`; `kv_claims_refused`).
/// Nothing is scrubbed or handed over, and the gate's ledger is unchanged. The blocks must not
/// be used by the request.
///
/// The layout and ids are checked as `kvh_claim_blocks` checks them (the cache need not be a
/// live allocation). Returns `KVH_OK` when the refusal was recorded (with `block_count` 0,
/// once the layout passed: nothing is refused, counted or logged, though the allocator is
/// started, as by every KV call), else nothing was
/// recorded: `KVH_ERR_NULL_PARAMETER` or `KVH_ERR_INVALID_LAYOUT` from that check,
/// `KVH_ERR_INVALID_DEVICE`, `KVH_ERR_SHUTTING_DOWN` after `kvh_shutdown`, or the start-up's
/// error.
///
/// `block_ids` may be NULL when `block_count` is 0; `layout` is required.
///
/// Ownership: the arrays and `reason` stay the caller's and are used only during the call.
#[no_mangle]
pub extern "C" fn kvh_refuse_blocks(
    layout: *const kvh_kv_layout,
    block_ids: *const u32,
    block_count: usize,
    device: c_int,
    reason: *const c_char,
) -> c_int {
    boundary(KVH_ERR_PANIC as c_int, || {
        // SAFETY: `layout`, `block_ids` and their lengths are the caller's contract above;
        // `read_kv_call` checks NULLs and bounds the lengths before reading.
        let (layout, ids) = match unsafe { read_kv_call(layout, block_ids, block_count) } {
            Ok(call) => call,
            Err(rc) => return rc,
        };
        // SAFETY: the caller passes NULL or a NUL-terminated string; at most
        // MAX_REFUSAL_REASON + 1 bytes are read, stopping at the first NUL.
        let reason = unsafe { bounded_c_bytes(reason, MAX_REFUSAL_REASON) };
        let reason = refusal_reason(reason.as_deref());
        let rt = match runtime::get() {
            Ok(rt) => rt,
            Err(e) => return fail(e.code(), e.to_string()),
        };
        match rt
            .allocator
            .refuse_kv_blocks(&layout, &ids, device, &reason)
        {
            Ok(()) => ok(),
            Err(e) => fail(kvh_result::from(&e), e.to_string()),
        }
    })
}

/// The text of a `kvh_refuse_blocks` reason: lossy UTF-8, marked when cut.
fn refusal_reason(bytes: Option<&[u8]>) -> String {
    let Some(bytes) = bytes else {
        return "no reason given".into();
    };
    if bytes.len() <= MAX_REFUSAL_REASON {
        return String::from_utf8_lossy(bytes).into_owned();
    }
    let mut text = String::from_utf8_lossy(cut_on_char(bytes, MAX_REFUSAL_REASON)).into_owned();
    text.push_str(" [cut]");
    text
}

/// The first `max` bytes of `bytes` (longer than `max`), less the start of a UTF-8 sequence
/// the cut split, which would read as U+FFFD: a cut never mangles a character of valid text.
fn cut_on_char(bytes: &[u8], max: usize) -> &[u8] {
    let kept = &bytes[..max];
    // The last byte that is not a continuation byte (10xxxxxx), within a sequence's reach.
    let lead = (max.saturating_sub(3)..max)
        .rev()
        .find(|&i| kept[i] & 0xC0 != 0x80);
    let Some(at) = lead else {
        return kept;
    };
    let width = match kept[at] {
        0xC2..=0xDF => 2,
        0xE0..=0xEF => 3,
        0xF0..=0xF4 => 4,
        _ => 1,
    };
    if at + width > max {
        &kept[..at]
    } else {
        kept
    }
}

/// The list, code and message of a claim that did not hand every block over.
fn not_handed_over(
    ids: &[u32],
    report: crate::alloc::KvClaimReport,
) -> (Vec<u32>, kvh_result, String) {
    let failed = report.refused.len();
    let taken = report.taken.len();
    let code = if failed > 0 {
        KVH_ERR_VERIFY_FAILED
    } else {
        KVH_ERR_KV_TAKEN
    };
    // Both lists are in the caller's order; merged back into it.
    let position: std::collections::HashMap<u32, usize> =
        ids.iter().enumerate().map(|(i, &id)| (id, i)).collect();
    let mut named = report.refused;
    named.extend(report.taken);
    named.sort_unstable_by_key(|id| position.get(id).copied());
    let message = format!(
        "{} of {} KV blocks were not handed over (first: {}): {failed} failed verification, \
         {taken} were taken by another claim meanwhile; they must not be used",
        named.len(),
        ids.len(),
        named.first().copied().unwrap_or_default()
    );
    (named, code, message)
}

/// The list, code and message of a claim that failed as a whole. The list names the blocks
/// enforce would not hand over unscrubbed, or those the gate's scrub found not zero before it
/// stopped (named, as `kvh_scrub_blocks` names them, for the engine to retire); it is empty
/// for a claim refused before it scrubbed anything.
fn claim_failed(e: crate::alloc::KvClaimError) -> (Vec<u32>, kvh_result, String) {
    use crate::alloc::{KvClaimError, KvScrubError};
    let (code, message) = (kvh_result::from(&e), e.to_string());
    let named = match e {
        KvClaimError::Unscrubbed { blocks } => blocks,
        KvClaimError::Scrub(KvScrubError::Backend { failed, .. }) => failed,
        KvClaimError::Scrub(_) => Vec::new(),
    };
    (named, code, message)
}

/// Writes the first `capacity` of `ids` to `out` and their full count to `count`.
///
/// # Safety
/// 1. `out` is non-null and valid for `capacity` aligned `u32` writes when `capacity > 0`.
/// 2. `count` is non-null and valid for one aligned `usize` write.
unsafe fn write_ids(ids: &[u32], out: *mut u32, capacity: usize, count: *mut usize) {
    let shown = ids.len().min(capacity);
    // SAFETY: `shown <= capacity`, and `out` is valid for that many writes by (1); the
    // source is a live slice that cannot overlap the caller's buffer.
    unsafe {
        if shown > 0 {
            std::ptr::copy_nonoverlapping(ids.as_ptr(), out, shown);
        }
        // SAFETY: by (2).
        *count = ids.len();
    }
}

/// Copies a `kvh_scrub_blocks` layout and id list into Rust values, after checking NULLs and
/// bounding the lengths (so that no slice is formed over an absurd length).
///
/// # Safety
/// 1. `layout` is NULL or points to a readable `kvh_kv_layout`.
/// 2. Its `region_bases` is NULL or points to `region_count` readable, aligned `u64`s.
/// 3. `block_ids` is NULL or points to `block_count` readable, aligned `u32`s.
unsafe fn read_kv_call(
    layout: *const kvh_kv_layout,
    block_ids: *const u32,
    block_count: usize,
) -> Result<(crate::alloc::KvLayout, Vec<u32>), c_int> {
    use crate::alloc::kv::{MAX_KV_REGIONS, MAX_KV_SEGMENTS};
    if layout.is_null() {
        return Err(fail(KVH_ERR_NULL_PARAMETER, "layout is NULL"));
    }
    // SAFETY: non-null, readable by (1).
    let l = unsafe { &*layout };
    if l.region_count > MAX_KV_REGIONS {
        return Err(fail(
            KVH_ERR_INVALID_LAYOUT,
            format!(
                "invalid KV layout: {} regions; at most {MAX_KV_REGIONS} are accepted",
                l.region_count
            ),
        ));
    }
    if block_count as u64 > MAX_KV_SEGMENTS {
        return Err(fail(
            KVH_ERR_INVALID_LAYOUT,
            format!("invalid block ids: {block_count} blocks; at most {MAX_KV_SEGMENTS} segments per call"),
        ));
    }
    let regions = if l.region_count == 0 {
        Vec::new()
    } else if l.region_bases.is_null() {
        return Err(fail(KVH_ERR_NULL_PARAMETER, "layout.region_bases is NULL"));
    } else {
        // SAFETY: non-null, `region_count` (bounded above) aligned u64s readable by (2).
        unsafe { std::slice::from_raw_parts(l.region_bases, l.region_count) }.to_vec()
    };
    let ids = if block_count == 0 {
        Vec::new()
    } else if block_ids.is_null() {
        return Err(fail(
            KVH_ERR_NULL_PARAMETER,
            "block_ids is NULL but block_count is not 0",
        ));
    } else {
        // SAFETY: non-null, `block_count` (bounded above) aligned u32s readable by (3).
        unsafe { std::slice::from_raw_parts(block_ids, block_count) }.to_vec()
    };
    let layout = crate::alloc::KvLayout {
        regions,
        block_bytes: l.block_bytes,
        block_stride: l.block_stride,
        blocks_per_region: l.blocks_per_region,
    };
    Ok((layout, ids))
}

/// Submits every pending scrub, waits for them, and returns every clean cached block to the
/// backend (PyTorch's empty-cache hook). Returns nothing: `kvh_last_error` is `KVH_OK` when it
/// ran (or had nothing to do: before the allocator started, which it does not start), the
/// start-up's error when the allocator could not start, `KVH_ERR_FORKED_CHILD` in a child
/// forked after start-up, and `KVH_ERR_SHUTTING_DOWN` after `kvh_shutdown` (nothing is
/// returned to the device then).
#[no_mangle]
pub extern "C" fn kvh_empty_cache() {
    boundary((), || match runtime::get_if_begun() {
        None => clear_last_error(),
        Some(Ok(rt)) if rt.allocator.is_shut_down() => set_last_error(
            KVH_ERR_SHUTTING_DOWN,
            "kvhygiene was shut down: no cached block is returned to the device any more",
        ),
        Some(Ok(rt)) => {
            rt.allocator.empty_cache();
            clear_last_error();
        }
        Some(Err(e)) => set_last_error(e.code(), e.to_string()),
    })
}

/// Submits every pending scrub and waits until the scrub of each block freed before the call
/// (and the re-scrub of one quarantined meanwhile) has been verified and applied; frees other
/// threads make during the call are submitted but not waited for. Returns
/// `KVH_OK`, or `KVH_ERR_BACKEND` when an asynchronous backend error has occurred (sticky) or
/// when the backend refused some scrubs for now (a CUDA graph capture on their stream, no
/// memory for a batch; the message says which and how many blocks): those blocks stay out of
/// use and are scrubbed at a later flush, so call again once the capture ended or memory was
/// freed. After `kvh_shutdown` (also one that began during the call),
/// `KVH_ERR_SHUTTING_DOWN` when blocks freed since (or left pending then) were not scrubbed,
/// or were verified but could not be returned to the device: none will be, and they are
/// leaked, never handed out. Before the allocator started (also after a `kvh_shutdown`, or
/// the start of process exit, that came first), `KVH_OK`: nothing was freed, and it is not
/// started. After a failed start-up, that start-up's code, as `kvh_init` returns it
/// (`KVH_ERR_CONFIG`, `KVH_ERR_BACKEND`, `KVH_ERR_LOG`, `KVH_ERR_PANIC`); in a child forked
/// after its parent's start-up, `KVH_ERR_FORKED_CHILD`.
#[no_mangle]
pub extern "C" fn kvh_synchronize() -> c_int {
    boundary(KVH_ERR_PANIC as c_int, || {
        let rt = match runtime::get_if_begun() {
            // Nothing was ever freed: before start-up, or after a shutdown (or the start of
            // process exit) that preceded it.
            None => return ok(),
            Some(Err(e)) if e.stopped_before_start() => return ok(),
            Some(Ok(rt)) => rt,
            Some(Err(e)) => return fail(e.code(), e.to_string()),
        };
        match rt.allocator.synchronize() {
            Ok(()) => ok(),
            Err(e) if rt.allocator.unscrubbed_after_shutdown() > 0 => {
                fail(KVH_ERR_SHUTTING_DOWN, e)
            }
            Err(e) => fail(KVH_ERR_BACKEND, e),
        }
    })
}

/// Checks the configuration this process would start with (`KVH_CONFIG`'s file, then the
/// `KVH_*` variables, and the length of `FORENSIC_HMAC_SECRET` when it is set and the log is
/// on) without starting anything: no thread, device, log or metrics export; the files the
/// policy names are not opened (`kvh preflight` checks them).
/// Returns `KVH_OK`, or `KVH_ERR_CONFIG` with the message naming the key in
/// `kvh_last_error_message`. For a launcher that forks its workers afterwards (each starts its
/// own allocator; a child forked after `kvh_init` could not): it checks the policy first.
#[no_mangle]
pub extern "C" fn kvh_check_config() -> c_int {
    boundary(KVH_ERR_PANIC as c_int, || match policy_error() {
        None => ok(),
        Some(message) => fail(KVH_ERR_CONFIG, message),
    })
}

/// Sets `*throws` to 1 when a failed `kvh_malloc` throws (`oom = "throw"`, the default) under
/// the policy this process runs with, or would start with before it started, and to 0 when
/// it returns NULL (`oom = "null"`). Nothing is started. For a caller that must not get NULL
/// (PyTorch, which does not check `kvh_malloc`'s result: `kvhygiene.install()` refuses
/// `null`).
///
/// Returns `KVH_OK`; `KVH_ERR_NULL_PARAMETER` when `throws` is NULL; `KVH_ERR_CONFIG`, with the
/// message naming the key, when the policy is invalid (`*throws` is left as it was).
///
/// Ownership: `throws` is NULL or valid for writing one `int`, the caller's.
#[no_mangle]
pub extern "C" fn kvh_oom_throws(throws: *mut c_int) -> c_int {
    boundary(KVH_ERR_PANIC as c_int, || {
        if throws.is_null() {
            return fail(KVH_ERR_NULL_PARAMETER, "throws is NULL");
        }
        let mode = match runtime::configured_oom() {
            Some(mode) => mode,
            None => match crate::config::Config::from_env() {
                Ok(config) => config.oom,
                Err(e) => return fail(KVH_ERR_CONFIG, format!("kvhygiene configuration: {e}")),
            },
        };
        // SAFETY: `throws` is non-NULL and, by the caller's contract, valid for one write.
        unsafe { *throws = c_int::from(mode == OomMode::Throw) };
        ok()
    })
}

/// Why the policy this process would start with is invalid (the message naming the key), if
/// it is; nothing is started.
fn policy_error() -> Option<String> {
    match crate::config::Config::from_env() {
        Err(e) => Some(format!("kvhygiene configuration: {e}")),
        // A secret of a length the start-up refuses: the policy it would start with is not
        // valid either.
        Ok(config) => crate::config::cli::env_secret_error(&config)
            .map(|e| format!("kvhygiene configuration: {e}")),
    }
}

/// `kvh_stats_json`'s answer when the allocator has not started in this process (and, with
/// `shut_down`, never will: a `kvh_shutdown` came first).
///
/// Written in the header's order, `started` first (a JSON map would sort the keys): a reader
/// that looks at the start tells it from a started allocator's answer.
fn unstarted_json(shut_down: bool) -> String {
    let version = serde_json::Value::from(env!("CARGO_PKG_VERSION"));
    if shut_down {
        format!(r#"{{"started":false,"shut_down":true,"version":{version}}}"#)
    } else {
        format!(r#"{{"started":false,"version":{version}}}"#)
    }
}

/// Starts the allocator now (reading the configuration) instead of at the first call, so a
/// bad configuration is reported where it can be handled. Returns `KVH_OK`, or with the
/// reason in `kvh_last_error_message`: `KVH_ERR_CONFIG`, `KVH_ERR_BACKEND`, `KVH_ERR_LOG` (the
/// forensic log did not open), `KVH_ERR_FORKED_CHILD` (a child forked after start-up in its
/// parent; after a start-up of the parent's that failed, that start-up's error) or
/// `KVH_ERR_SHUTTING_DOWN` (after `kvh_shutdown`, whether the allocator had started
/// before it or not, or once process exit has begun, also during the start-up: no fresh
/// memory is served and no free is scrubbed any more), or
/// `KVH_ERR_PANIC` (the start-up panicked: an internal error). A failed start-up is final:
/// every later `kvh_init`, allocation and call that needs the allocator gets its code.
#[no_mangle]
pub extern "C" fn kvh_init() -> c_int {
    boundary(KVH_ERR_PANIC as c_int, || match runtime::get() {
        Ok(rt) if rt.allocator.is_shut_down() => fail(
            KVH_ERR_SHUTTING_DOWN,
            "kvhygiene: the allocator was shut down (kvh_shutdown, or process exit began); it \
             serves no fresh memory and scrubs no free any more",
        ),
        Ok(_) => ok(),
        Err(e) => fail(e.code(), e.to_string()),
    })
}

/// Orderly shutdown before process exit: scrubs and verifies everything freed before the call
/// (frees other threads make meanwhile are scrubbed if they can be, else leaked), writes the
/// forensic log's stop record, then makes no further device calls. Later allocations are
/// served only from clean pooled blocks (already verified, no device call), so teardown code
/// that still allocates does not fail; any other fails with `KVH_ERR_SHUTTING_DOWN`. Later
/// frees are accepted and leak their block (no scrub can run). The metrics file is written
/// once more and then no longer (its `kvh_shut_down` is 1, on which `kvh gate` evicts at
/// once; it then goes stale); a second call
/// changes nothing. Called before the allocator started, it keeps it from starting: every
/// allocation then fails with `KVH_ERR_SHUTTING_DOWN`.
#[no_mangle]
pub extern "C" fn kvh_shutdown() {
    boundary((), || {
        runtime::shutdown();
        clear_last_error();
    })
}

/// Sets the calling thread's tenant, request and model ids, stamped on every block it
/// allocates and on their events. Each may be NULL (absent); an empty id is absent too. Ids
/// longer than 128 bytes, with control characters or invisible formatting characters
/// (bidirectional overrides,
/// zero-width characters, line separators, variation selectors, fillers: Unicode's
/// default-ignorable code points, an id that displays as another), or not UTF-8 are
/// refused with `KVH_ERR_INVALID_CONTEXT`, and the
/// previous context stays. So is a call from a thread-local destructor that runs after the
/// library's own at thread exit: the thread's context is gone then, and what the thread
/// allocates carries none. Ownership: the strings are copied; the caller keeps them.
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
            Ok(ctx) => match Context::try_set_current(ctx) {
                Some(_) => ok(),
                None => fail(
                    KVH_ERR_INVALID_CONTEXT,
                    "the calling thread is exiting and its context is gone: none can be set \
                     (what it allocates from now on carries no context)",
                ),
            },
            Err(e) => fail(KVH_ERR_INVALID_CONTEXT, e.to_string()),
        }
    })
}

/// Clears the calling thread's context.
#[no_mangle]
pub extern "C" fn kvh_clear_context() {
    boundary((), || {
        Context::set_current(Context::none());
        clear_last_error();
    })
}

/// Writes the allocator's statistics as JSON (NUL-terminated) into `buf` of `len` bytes.
/// Before the allocator started in this process (no allocation or other call that starts it
/// yet) it does not start it, and writes `{"started":false,"version":"..."}` (or returns
/// `KVH_ERR_CONFIG`, as `kvh_check_config` does, for an invalid policy): reading the counters
/// in a launcher must not leave the workers it forks without an allocator. After a
/// `kvh_shutdown` (or the start of process exit) that came before start-up,
/// `{"started":false,"shut_down":true,...}`. A started allocator's statistics carry
/// `"started":true` and `"shut_down"` (true once `kvh_shutdown` or process exit began).
/// Like the other query exports, it leaves the thread's last error unchanged when it answers
/// (a buffer too small included); when the allocator could not start, that start-up error,
/// with its reason, is the last error.
/// `*out_len` receives the JSON's length without the NUL; `buf` must hold `*out_len + 1`
/// bytes, else `KVH_ERR_BUFFER_TOO_SMALL` is returned and nothing is written (call with
/// `buf = NULL, len = 0` to ask for the size). The counters go on changing between that call
/// and the next, so the JSON may have grown by then: give room to spare (a few KiB), and on
/// `KVH_ERR_BUFFER_TOO_SMALL` ask again with the new `*out_len`. Ownership: `buf` stays the
/// caller's.
#[no_mangle]
pub extern "C" fn kvh_stats_json(buf: *mut c_char, len: usize, out_len: *mut usize) -> c_int {
    boundary(KVH_ERR_PANIC as c_int, || {
        let json = match runtime::get_if_begun() {
            // Exit began before any start-up: none will be made (an allocation is refused).
            None if runtime::exit_begun() => unstarted_json(true),
            // The policy is still checked, as `kvh_check_config` does: a health endpoint that
            // reads the counters first learns of a bad configuration at once.
            None => match policy_error() {
                None => unstarted_json(false),
                Some(message) => return fail(KVH_ERR_CONFIG, message),
            },
            Some(Ok(rt)) => rt.stats_json(),
            Some(Err(e)) if e.stopped_before_start() => unstarted_json(true),
            // This call's failure: its reason is the last error, as for every other export.
            Some(Err(e)) => return fail(e.code(), e.to_string()),
        };
        // SAFETY: `buf` is NULL or valid for `len` bytes; `out_len` is NULL or valid for a
        // write of one `usize` (the caller's contract above).
        preserving_last_error(|| unsafe { write_c_string(&json, buf, len, out_len) })
    })
}

/// Writes PyTorch's memory statistics of `device` as JSON (NUL-terminated) into `buf` of
/// `len` bytes, in the layout of `torch.cuda.memory_stats_as_nested_dict`
/// (`{"allocated_bytes": {"all": {"current": .., "peak": .., "allocated": .., "freed": ..},
/// "small_pool": .., "large_pool": ..}, .., "num_ooms": .., ..}`): what PyTorch's pluggable
/// allocator interface cannot give (`torch.cuda.memory_stats` raises under it), and engines
/// read (vLLM sizes its KV cache from them). LIVE blocks are allocated, LIVE and PENDING ones
/// active, every block held from the backend reserved; see the crate's
/// `alloc::memory_stats`. Before the allocator started it does not start it: every statistic
/// of any device is zero. Returns `KVH_OK`, `KVH_ERR_INVALID_DEVICE` for a device the backend
/// does not have once the allocator started (a negative one always), the start-up's code when the allocator could not start,
/// `KVH_ERR_FORKED_CHILD` in a child forked after start-up. As `kvh_stats_json`, it leaves
/// the thread's last error unchanged when it answers, and its buffer contract is the same
/// (`*out_len` without the NUL; `KVH_ERR_BUFFER_TOO_SMALL` writes nothing; ask with
/// `buf = NULL, len = 0`).
#[no_mangle]
pub extern "C" fn kvh_memory_stats_json(
    device: i32,
    buf: *mut c_char,
    len: usize,
    out_len: *mut usize,
) -> c_int {
    boundary(KVH_ERR_PANIC as c_int, || {
        let stats = match memory_stats_of(device) {
            Ok(stats) => stats,
            Err((code, message)) => return fail(code, message),
        };
        let json = match serde_json::to_string(&stats) {
            Ok(json) => json,
            Err(e) => return fail(KVH_ERR_PANIC, format!("memory statistics: {e}")),
        };
        // SAFETY: `buf` is NULL or valid for `len` bytes; `out_len` is NULL or valid for a
        // write of one `usize` (the caller's contract above).
        preserving_last_error(|| unsafe { write_c_string(&json, buf, len, out_len) })
    })
}

/// The allocator whose statistics of `device` the memory-statistics exports read or reset:
/// `None` before it started (or after a shutdown that came first), every statistic zero and
/// nothing to reset; or the code and message they fail with.
fn memory_stats_allocator(device: i32) -> Result<Option<&'static Allocator>, (kvh_result, String)> {
    if device < 0 {
        // Before start-up the backend's device count is not known: no count is named.
        let message = format!("invalid device {device}: a device index is not negative");
        return Err((KVH_ERR_INVALID_DEVICE, message));
    }
    match runtime::get_if_begun() {
        None => Ok(None),
        Some(Err(e)) if e.stopped_before_start() => Ok(None),
        Some(Ok(rt)) => Ok(Some(&rt.allocator)),
        Some(Err(e)) => Err((e.code(), e.to_string())),
    }
}

/// The statistics `kvh_memory_stats_json` writes, or the code and message it fails with.
fn memory_stats_of(device: i32) -> Result<crate::alloc::MemoryStats, (kvh_result, String)> {
    match memory_stats_allocator(device)? {
        None => Ok(crate::alloc::MemoryStats::unstarted()),
        Some(allocator) => allocator
            .memory_stats(device)
            .map_err(|e| (kvh_result::from(&e), e.to_string())),
    }
}

/// Sets every peak of `device`'s memory statistics to its current value
/// (`torch.cuda.reset_peak_memory_stats`). Returns `KVH_OK` (also before the allocator
/// started, which it does not start: there is nothing to reset), or the codes of
/// `kvh_memory_stats_json`.
#[no_mangle]
pub extern "C" fn kvh_reset_peak_memory_stats(device: i32) -> c_int {
    boundary(KVH_ERR_PANIC as c_int, || {
        reset_memory_stats(device, Allocator::reset_peak_memory_stats)
    })
}

/// Zeroes the cumulative memory statistics of `device`: each statistic's `allocated` and
/// `freed`, and the counters (`torch.cuda.reset_accumulated_memory_stats`). Returns as
/// `kvh_reset_peak_memory_stats`.
#[no_mangle]
pub extern "C" fn kvh_reset_accumulated_memory_stats(device: i32) -> c_int {
    boundary(KVH_ERR_PANIC as c_int, || {
        reset_memory_stats(device, Allocator::reset_accumulated_memory_stats)
    })
}

/// The two resets: `device` checked as `kvh_memory_stats_json` checks it, then `reset`.
fn reset_memory_stats(
    device: i32,
    reset: fn(&Allocator, i32) -> Result<(), crate::alloc::AllocError>,
) -> c_int {
    match memory_stats_allocator(device) {
        Err((code, message)) => fail(code, message),
        Ok(None) => ok(),
        Ok(Some(allocator)) => match reset(allocator, device) {
            Ok(()) => ok(),
            Err(e) => fail(kvh_result::from(&e), e.to_string()),
        },
    }
}

/// The calling thread's last result code (`KVH_OK` after a successful call).
#[no_mangle]
pub extern "C" fn kvh_last_error() -> u32 {
    boundary(KVH_ERR_PANIC as u32, last_error_code)
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
        let message = last_error_message();
        // SAFETY: as for `kvh_stats_json`.
        preserving_last_error(|| unsafe { write_c_string(&message, buf, len, out_len) })
    })
}

/// Writes the description of `code` (NUL-terminated) into `buf`, with the same length
/// protocol as `kvh_stats_json`. Unknown codes return `KVH_ERR_UNKNOWN_CODE` and write
/// nothing (neither `buf` nor `*out_len`).
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

/// The process-wide allocator behind this C ABI, started on first use (the configuration is
/// read then, as by `kvh_init`). For Rust front ends linked into the same library, such as
/// the LD_PRELOAD interposers of `preload/`: they share its pools, forensic log and exit
/// handling with the C API. On failure, the code `kvh_init` returns; the reason has been
/// printed on stderr once.
pub fn process_allocator() -> Result<&'static Allocator, kvh_result> {
    runtime::get().map(|rt| &rt.allocator).map_err(|e| e.code())
}

/// Whether this process is a child forked after kvhygiene's start-up began in its parent:
/// such a child must not use the allocator it inherited, and every export refuses to, with
/// `KVH_ERR_FORKED_CHILD`. A child forked before start-up is not one: it starts its own.
/// One atomic load (a fork handler sets it).
pub fn is_forked_child() -> bool {
    runtime::is_forked_child()
}

/// Registers the fork handler behind [`is_forked_child`], and the exit handler that keeps a
/// first allocation during process exit from starting the allocator (once; later calls do
/// nothing). The library registers them when it is loaded; a front end that links this crate
/// into its own shared library (the preload library) calls this from its constructor too,
/// since a linker may leave the library's own constructor out.
pub fn watch_process() {
    runtime::watch_process()
}

/// The process-wide allocator if it has already started; never starts it. An allocator
/// that has not started owns no memory, so a front end can answer "is this pointer
/// kvhygiene's?" without starting one.
pub fn started_process_allocator() -> Option<&'static Allocator> {
    runtime::started().map(|rt| &rt.allocator)
}

/// Runs a query export without touching the thread's last error, so that
/// `kvh_strerror(kvh_last_error(), ...)` and size queries never clobber what they describe.
fn preserving_last_error(f: impl FnOnce() -> c_int) -> c_int {
    let (code, message) = (last_error_code(), last_error_message());
    let rc = f();
    let _ = LAST_ERROR.try_with(|c| c.set(code));
    let _ = LAST_MESSAGE.try_with(|m| *m.borrow_mut() = message);
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
    // SAFETY: the caller's contract, with the bound MAX_ID_LEN.
    unsafe { bounded_c_bytes(p, MAX_ID_LEN) }
}

/// Reads a NUL-terminated string of at most `max + 1` bytes (one more than kept, so that a
/// longer string is seen to be longer), `None` for NULL.
///
/// # Safety
///
/// 1. `p` is NULL, or every byte from `p` up to its first NUL or `max + 1` bytes, whichever
///    comes first, is readable.
unsafe fn bounded_c_bytes(p: *const c_char, max: usize) -> Option<Vec<u8>> {
    if p.is_null() {
        return None;
    }
    let mut bytes = Vec::new();
    for i in 0..=max {
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
/// half of their block unzeroed, written with a non-zero pattern whatever it held, so
/// verification must fail and quarantine them. Returns
/// `KVH_OK`, `KVH_ERR_BACKEND` on backends that refuse (CUDA), or `KVH_ERR_SHUTTING_DOWN`
/// after `kvh_shutdown` (no scrub runs any more, so none would be sabotaged).
#[no_mangle]
pub extern "C" fn kvh_inject_fault(segments: u32) -> c_int {
    boundary(KVH_ERR_PANIC as c_int, || {
        let rt = match runtime::get() {
            Ok(rt) => rt,
            Err(e) => return fail(e.code(), e.to_string()),
        };
        if rt.allocator.is_shut_down() {
            return fail(
                KVH_ERR_SHUTTING_DOWN,
                "kvhygiene: the allocator was shut down (kvh_shutdown, or process exit began); \
                 no scrub runs any more, so no fault can be injected into one",
            );
        }
        match rt.allocator.backend().inject_fault(u64::from(segments)) {
            Ok(()) => ok(),
            Err(e) => fail(KVH_ERR_BACKEND, e.to_string()),
        }
    })
}

#[cfg(test)]
mod tests {

    /// A refusal's reason: none given is said, a long one is cut and marked, bytes that are
    /// not UTF-8 are replaced rather than refused (the refusal is recorded either way).
    #[test]
    fn a_refusal_reason_is_bounded_and_always_text() {
        assert_eq!(refusal_reason(None), "no reason given");
        assert_eq!(refusal_reason(Some(b"shared")), "shared");
        assert_eq!(refusal_reason(Some(b"a\xffb")), "a\u{fffd}b");
        let long = vec![b'x'; MAX_REFUSAL_REASON + 1];
        let text = refusal_reason(Some(&long));
        assert!(text.ends_with(" [cut]"));
        assert_eq!(text.len(), MAX_REFUSAL_REASON + " [cut]".len());
        // SAFETY: a NUL-terminated string longer than the bound: only bound + 1 bytes are read.
        let read = unsafe { bounded_c_bytes(c"abcdef".as_ptr(), 3) }.unwrap();
        assert_eq!(read, b"abcd");
    }

    /// A cut through a multi-byte character drops that character whole: valid text is never
    /// given a replacement character by the cut. Every width, at every offset of the cut.
    #[test]
    fn a_long_reason_is_cut_between_characters() {
        for ch in ["é", "€", "𝄞"] {
            for pad in 0..4 {
                let mut reason = "x".repeat(MAX_REFUSAL_REASON - pad);
                while reason.len() <= MAX_REFUSAL_REASON + 4 {
                    reason.push_str(ch);
                }
                let text = refusal_reason(Some(reason.as_bytes()));
                assert!(!text.contains('\u{fffd}'), "{ch} at {pad}: {text}");
                let kept = text.strip_suffix(" [cut]").expect("marked as cut");
                assert!(reason.starts_with(kept), "{ch} at {pad}");
                assert!(kept.len() > MAX_REFUSAL_REASON - ch.len(), "{ch} at {pad}");
            }
        }
        // Bytes that were never text are still replaced, as before the bound.
        let mut junk = vec![b'x'; MAX_REFUSAL_REASON - 1];
        junk.extend_from_slice(b"\xff\xff\xff");
        assert!(refusal_reason(Some(&junk)).contains('\u{fffd}'));
    }

    use super::*;
    use crate::alloc::KvClaimReport;

    #[test]
    fn blocks_not_handed_over_are_named_in_the_callers_order_with_the_right_code() {
        let ids = [9, 4, 7, 1];
        let report = |refused: Vec<u32>, taken: Vec<u32>| KvClaimReport {
            claimed: 0,
            gate_scrubbed: Vec::new(),
            unknown_owner: Vec::new(),
            in_flight: Vec::new(),
            refused,
            taken,
        };
        // Only taken blocks: KVH_ERR_KV_TAKEN.
        let (named, code, message) = not_handed_over(&ids, report(vec![], vec![7, 4]));
        assert_eq!((named, code), (vec![4, 7], KVH_ERR_KV_TAKEN));
        assert!(message.contains("2 were taken"), "{message}");
        // Any failed verification makes it KVH_ERR_VERIFY_FAILED; both lists merge in order.
        let (named, code, message) = not_handed_over(&ids, report(vec![1], vec![9]));
        assert_eq!((named, code), (vec![9, 1], KVH_ERR_VERIFY_FAILED));
        assert!(message.contains("(first: 9)"), "{message}");
    }

    /// An id over the length limit is refused as too long, whatever characters it is made
    /// of: cutting a long id of multi-byte characters where the reading stops must not turn
    /// the refusal into "not valid UTF-8", which sends the caller looking for an encoding
    /// problem that the id does not have.
    #[test]
    fn an_over_long_id_of_multibyte_characters_is_refused_as_too_long() {
        // 100 two-byte characters: valid UTF-8, 200 bytes.
        let id = std::ffi::CString::new("\u{e9}".repeat(100)).unwrap();
        let rc = kvh_set_context(id.as_ptr(), std::ptr::null(), std::ptr::null());
        assert_eq!(rc, KVH_ERR_INVALID_CONTEXT as c_int);
        let message = last_error_message();
        assert!(
            message.contains("bytes long") && !message.contains("UTF-8"),
            "a 200-byte UTF-8 tenant id was refused with: {message}"
        );
        assert_eq!(Context::current(), Context::none());
    }

    /// The refusal of an over-long id does not state a length the id does not have: a
    /// 1000-byte id is not "129 bytes long".
    #[test]
    fn an_over_long_id_is_not_said_to_be_129_bytes_long() {
        let id = std::ffi::CString::new("x".repeat(1000)).unwrap();
        let rc = kvh_set_context(std::ptr::null(), id.as_ptr(), std::ptr::null());
        assert_eq!(rc, KVH_ERR_INVALID_CONTEXT as c_int);
        let message = last_error_message();
        assert!(
            message.contains("request_id") && !message.contains("is 129 bytes long"),
            "a 1000-byte request id was refused with: {message}"
        );
    }

    /// A claim whose gate scrub stopped names the blocks that scrub found not zero, as
    /// `kvh_scrub_blocks` names them on the same error: the engine retires them. A claim
    /// refused before any scrub names none; one enforce refused names the blocks it would not
    /// hand over.
    #[test]
    fn a_claim_that_failed_names_the_blocks_to_retire() {
        use crate::alloc::{KvClaimError, KvScrubError};
        use crate::backend::BackendError;
        let stopped = KvClaimError::Scrub(KvScrubError::Backend {
            error: BackendError::Other("injected".into()),
            failed: vec![7, 3],
        });
        let (named, code, _) = claim_failed(stopped);
        assert_eq!((named, code), (vec![7, 3], KVH_ERR_BACKEND));
        let refused = KvClaimError::Scrub(KvScrubError::InvalidBlocks("id 9".into()));
        let (named, code, _) = claim_failed(refused);
        assert_eq!((named, code), (vec![], KVH_ERR_INVALID_LAYOUT));
        let enforce = KvClaimError::Unscrubbed { blocks: vec![2] };
        let (named, code, _) = claim_failed(enforce);
        assert_eq!((named, code), (vec![2], KVH_ERR_KV_GATE));
    }
}

//! A global allocator for tests that look for secrets left in freed memory: while a test
//! arms it, it looks at every block freed (and every block a `realloc` moves away from) for a
//! needle, and counts the blocks that held it. A test binary installs it with
//! `#[global_allocator] static GLOBAL: freed_needle::Watch = freed_needle::Watch;`.

#![allow(dead_code)] // each test binary uses its part

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::Mutex;

const MAX_NEEDLE: usize = 64;

static ARMED: AtomicBool = AtomicBool::new(false);
static NEEDLE: [AtomicU8; MAX_NEEDLE] = [const { AtomicU8::new(0) }; MAX_NEEDLE];
static NEEDLE_LEN: AtomicUsize = AtomicUsize::new(0);
static HITS: AtomicUsize = AtomicUsize::new(0);
/// One armed test at a time (the needle is global).
pub static SERIAL: Mutex<()> = Mutex::new(());

pub struct Watch;

/// Whether `len` bytes at `p` contain the needle. Allocation-free.
///
/// # Safety
/// `p` is valid for reads of `len` bytes.
unsafe fn holds_needle(p: *const u8, len: usize) -> bool {
    let n = NEEDLE_LEN.load(Ordering::Acquire);
    if n == 0 || len < n {
        return false;
    }
    // SAFETY: the caller guarantees `len` readable bytes at `p`.
    let hay = unsafe { std::slice::from_raw_parts(p, len) };
    let first = NEEDLE[0].load(Ordering::Relaxed);
    'outer: for start in 0..=len - n {
        if hay[start] != first {
            continue;
        }
        for j in 1..n {
            if hay[start + j] != NEEDLE[j].load(Ordering::Relaxed) {
                continue 'outer;
            }
        }
        return true;
    }
    false
}

// SAFETY: every call is forwarded to `System`; the extra reads are of blocks still allocated.
unsafe impl GlobalAlloc for Watch {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the block is still allocated and `layout.size()` bytes long.
        if ARMED.load(Ordering::Acquire) && unsafe { holds_needle(ptr, layout.size()) } {
            HITS.fetch_add(1, Ordering::AcqRel);
        }
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the block is still allocated and `layout.size()` bytes long.
        let held = ARMED.load(Ordering::Acquire) && unsafe { holds_needle(ptr, layout.size()) };
        // SAFETY: forwarded with the caller's guarantees.
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        // Moved: the old block, with its bytes, went back to the allocator.
        if held && !new.is_null() && new != ptr {
            HITS.fetch_add(1, Ordering::AcqRel);
        }
        new
    }
}

/// Runs `f` with the allocator watching for `needle`; returns how many freed (or moved
/// away from) blocks held it.
pub fn freed_copies(needle: &[u8], f: impl FnOnce()) -> usize {
    assert!(!needle.is_empty() && needle.len() <= MAX_NEEDLE);
    for (i, b) in needle.iter().enumerate() {
        NEEDLE[i].store(*b, Ordering::Relaxed);
    }
    NEEDLE_LEN.store(needle.len(), Ordering::Release);
    HITS.store(0, Ordering::Release);
    ARMED.store(true, Ordering::Release);
    f();
    ARMED.store(false, Ordering::Release);
    NEEDLE_LEN.store(0, Ordering::Release);
    HITS.load(Ordering::Acquire)
}

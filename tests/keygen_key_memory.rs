//! `kvh keygen`'s private key in memory: the Ed25519 seed it writes to `PREFIX.key` leaves
//! no copy behind in memory the process frees, as the keys the log writer reads leave none
//! (tests/forensic_key_memory.rs; `keys::generate_signing_key` keeps the seed in zeroized
//! memory).
//!
//! The seed is random, so the test binary's global allocator cannot look for it by value
//! while keygen runs: it records instead every run of 64 lower-case hex digits that a freed
//! block (or a block a `realloc` moves away from) holds, and the test compares them with
//! the key file afterwards.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};

const RUN: usize = 64;
const SLOTS: usize = 256;

static ARMED: AtomicBool = AtomicBool::new(false);
static FOUND: AtomicUsize = AtomicUsize::new(0);
static RUNS: [[AtomicU8; RUN]; SLOTS] = [const { [const { AtomicU8::new(0) }; RUN] }; SLOTS];

fn is_hex(b: u8) -> bool {
    b.is_ascii_digit() || (b'a'..=b'f').contains(&b)
}

/// Records the first 64 digits of every run of at least 64 lower-case hex digits in the
/// `len` bytes at `p`. Allocation-free.
///
/// # Safety
/// `p` is valid for reads of `len` bytes.
unsafe fn record_hex_runs(p: *const u8, len: usize) {
    // SAFETY: the caller guarantees `len` readable bytes at `p`.
    let hay = unsafe { std::slice::from_raw_parts(p, len) };
    let mut start = 0;
    while start + RUN <= hay.len() {
        let run = hay[start..].iter().take_while(|&&b| is_hex(b)).count();
        if run >= RUN {
            let slot = FOUND.fetch_add(1, Ordering::AcqRel);
            if slot < SLOTS {
                for (i, b) in hay[start..start + RUN].iter().enumerate() {
                    RUNS[slot][i].store(*b, Ordering::Relaxed);
                }
            }
            start += run;
        } else {
            start += run + 1;
        }
    }
}

struct Watch;

// SAFETY: every call is forwarded to `System`; the extra reads are of blocks still allocated.
unsafe impl GlobalAlloc for Watch {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if ARMED.load(Ordering::Acquire) {
            // SAFETY: the block is still allocated and `layout.size()` bytes long.
            unsafe { record_hex_runs(ptr, layout.size()) };
        }
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if ARMED.load(Ordering::Acquire) {
            // The old block may go back to the allocator with its bytes: recorded as freed.
            // SAFETY: the block is still allocated and `layout.size()` bytes long.
            unsafe { record_hex_runs(ptr, layout.size()) };
        }
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Watch = Watch;

#[test]
fn keygen_frees_no_copy_of_the_private_key() {
    let tmp = tempfile::tempdir().unwrap();
    let prefix = tmp.path().join("checkpoint");
    FOUND.store(0, Ordering::Release);
    ARMED.store(true, Ordering::Release);
    let made = kvhygiene::forensic::cli::keygen(&prefix);
    ARMED.store(false, Ordering::Release);
    let (private, public) = made.unwrap();
    let seed = std::fs::read_to_string(&private).unwrap();
    let seed = seed.trim_end().as_bytes();
    assert_eq!(seed.len(), RUN, "PREFIX.key holds 64 hex digits");
    let pubkey = std::fs::read_to_string(&public).unwrap();
    let found = FOUND.load(Ordering::Acquire).min(SLOTS);
    let copies = (0..found)
        .filter(|&s| (0..RUN).all(|i| RUNS[s][i].load(Ordering::Relaxed) == seed[i]))
        .count();
    // The public key may be freed as it likes; only the seed is secret.
    assert_ne!(seed, pubkey.trim_end().as_bytes());
    assert_eq!(
        copies, 0,
        "{copies} freed heap block(s) still held the private key kvh keygen wrote"
    );
}

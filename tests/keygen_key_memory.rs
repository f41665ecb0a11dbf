//! `kvh keygen`'s private key in memory: the Ed25519 seed it writes to `PREFIX.key` leaves
//! no copy behind in memory the process frees, whole or in part, as the keys the log writer
//! reads leave none (tests/forensic_key_memory.rs; `keys::generate_signing_key` keeps the
//! seed in zeroized memory).
//!
//! The seed is random, so the test binary's global allocator cannot look for it by value
//! while keygen runs: it copies instead every block freed (or moved away from by a
//! `realloc`) into an arena, and the test looks there afterwards for any part of the key
//! file's seed: [`HEX_PART`] of its hex digits (a string grown step by step leaves its
//! earlier, shorter buffers behind), or [`RAW_PART`] of its bytes.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};

/// Bytes of freed blocks the arena holds; a run that frees more fails the test rather than
/// pass unchecked.
const ARENA: usize = 1 << 22;
/// The shortest part of the seed's hex digits looked for: 16 digits of a random seed occur
/// elsewhere by chance with odds below 2^-64.
const HEX_PART: usize = 16;
/// The shortest part of the seed's bytes looked for.
const RAW_PART: usize = 8;

static ARMED: AtomicBool = AtomicBool::new(false);
static USED: AtomicUsize = AtomicUsize::new(0);
static OVERFLOW: AtomicBool = AtomicBool::new(false);
static FREED: [AtomicU8; ARENA] = [const { AtomicU8::new(0) }; ARENA];

/// Copies the `len` bytes at `p` into the arena, followed by a separator that no hex part
/// spans. Allocation-free.
///
/// # Safety
/// `p` is valid for reads of `len` bytes.
unsafe fn record_freed(p: *const u8, len: usize) {
    // SAFETY: the caller guarantees `len` readable bytes at `p`.
    let bytes = unsafe { std::slice::from_raw_parts(p, len) };
    let at = USED.fetch_add(len + 1, Ordering::AcqRel);
    let Some(slots) = FREED.get(at..at + len + 1) else {
        OVERFLOW.store(true, Ordering::Release);
        return;
    };
    for (slot, b) in slots.iter().zip(bytes.iter().chain([&b'\n'])) {
        slot.store(*b, Ordering::Relaxed);
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
            unsafe { record_freed(ptr, layout.size()) };
        }
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if ARMED.load(Ordering::Acquire) {
            // The old block may go back to the allocator with its bytes: recorded as freed.
            // SAFETY: the block is still allocated and `layout.size()` bytes long.
            unsafe { record_freed(ptr, layout.size()) };
        }
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Watch = Watch;

/// The arena's bytes (read once nothing is armed).
fn freed() -> Vec<u8> {
    assert!(
        !OVERFLOW.load(Ordering::Acquire),
        "more than {ARENA} bytes freed: the arena missed some"
    );
    let used = USED.load(Ordering::Acquire).min(ARENA);
    FREED[..used]
        .iter()
        .map(|b| b.load(Ordering::Relaxed))
        .collect()
}

/// Where in `secret` the first part of it (a window of `part` bytes) that `freed` holds
/// starts, if any: an offset, so that a failure names no byte of the secret.
fn a_part_in(freed: &[u8], secret: &[u8], part: usize) -> Option<usize> {
    secret
        .windows(part)
        .position(|w| freed.windows(part).any(|f| f == w))
}

fn decode_hex(hex: &[u8]) -> Vec<u8> {
    hex.chunks_exact(2)
        .map(|pair| u8::from_str_radix(std::str::from_utf8(pair).unwrap(), 16).unwrap())
        .collect()
}

#[test]
fn keygen_frees_no_part_of_the_private_key() {
    let tmp = tempfile::tempdir().unwrap();
    let prefix = tmp.path().join("checkpoint");
    // The watch itself: a copy of a known secret, freed while armed, is found.
    let marker = "0123456789abcdeffedcba9876543210".to_string();
    USED.store(0, Ordering::Release);
    ARMED.store(true, Ordering::Release);
    drop(std::hint::black_box(marker.clone()));
    let made = kvhygiene::forensic::cli::keygen(&prefix);
    ARMED.store(false, Ordering::Release);
    let freed = freed();
    assert!(
        a_part_in(&freed, marker.as_bytes(), HEX_PART).is_some(),
        "the watch missed a freed copy of a known string"
    );
    let (private, public) = made.unwrap();
    let seed = std::fs::read_to_string(&private).unwrap();
    let seed = seed.trim_end().as_bytes();
    assert_eq!(seed.len(), 64, "PREFIX.key holds 64 hex digits");
    // The public key may be freed as it likes; only the seed is secret.
    let pubkey = std::fs::read_to_string(&public).unwrap();
    assert_ne!(seed, pubkey.trim_end().as_bytes());
    let upper = seed.to_ascii_uppercase();
    for (form, secret, part) in [
        ("hex digits", seed, HEX_PART),
        ("upper-case hex digits", &upper[..], HEX_PART),
        ("bytes", &decode_hex(seed)[..], RAW_PART),
    ] {
        if let Some(at) = a_part_in(&freed, secret, part) {
            panic!(
                "a freed heap block held {part} {form} of the private key kvh keygen wrote \
                 (from its {at}th)"
            );
        }
    }
}

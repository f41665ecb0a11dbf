//! Memory for key bytes that core dumps leave out.
//!
//! A server's core dump (a crashed engine that loaded the library, written by the kernel or
//! piped to `systemd-coredump` or a crash reporter) holds its heap: a key kept there is in
//! every dump, and whoever reads the dump can seal records of the current epoch and every
//! later one. So the HMAC epoch key and the Ed25519 seed live in a mapping of their own,
//! marked `MADV_DONTDUMP` (the kernel's core writer skips it; a forked child's copy keeps the
//! mark) and locked where `RLIMIT_MEMLOCK` allows (never written to swap). The bytes are
//! zeroized before the mapping is returned.
//!
//! Computing with a key leaves copies where the computation ran: `hmac` keeps the key XORed
//! with its pads in its frame, SHA-512 the seed's words in its message schedule, and neither
//! zeroizes them. Those frames are dead once the computation returns, but their bytes stay
//! until the stack is used that deep again, and a core dump takes the stack whole. So the
//! code that computes with keys clears the stack below it afterwards ([`clear_stack`],
//! [`with_stack_cleared`]): the log's opening after it, the writer thread after each round of
//! records (before it waits for the next) and after its `stop` record, each checkpoint's
//! signature after it. A dump taken while a round is being written holds the residue of its
//! latest MAC, of the current epoch's key.
//!
//! A child forked from the process (a pre-fork server's workers, an engine's subprocesses,
//! Python's `multiprocessing` under the fork start method) inherits every page of it, keys
//! included, though it never uses them: a forked child writes no record and signs no
//! checkpoint (the log refuses it, and the C ABI does not start there). So the mapping is
//! also marked `MADV_WIPEONFORK`: the child's copy reads as zeros, and a child that is
//! compromised later, or dumps its memory by other means than a core (a debugger, a
//! `/proc/PID/mem` reader of the same user), has no key to give away.
//!
//! The dump mark is required: a kernel that refuses it fails the key's loading, so that a
//! key is never held where the documentation says it is not. The wipe mark is best-effort
//! (Linux 4.14 and later; a seccomp profile may refuse it), as no code path of the child
//! would read the key. The lock is best-effort too: a container's
//! default limit (64 KiB) is reached by 16 keys, and swap is off on most inference nodes.
//! Copies held for a moment (crash recovery's probes of the ratchet, up to 4096 at a start-up
//! that meets planted far epochs) are not locked ([`KeyBytes::scratch_copy_of`]), so that
//! they cannot take a server's whole lock allowance.
//!
//! Hand-written on `libc`: three system calls and one owner. The crates that do this (memsec,
//! secrets) bring guard-page allocators or libsodium, for a page per key.

use std::ptr::NonNull;

use zeroize::Zeroize;

use super::ForensicError;

/// Bytes of a key in a private anonymous mapping excluded from core dumps and wiped in forked
/// children, zeroized on drop.
///
/// Invariants: `map` is the start of a mapping of `capacity` bytes (a whole number of pages,
/// at least one) that this value alone owns, readable and writable until `drop`; `len <=
/// capacity`, and the key is its first `len` bytes.
pub(crate) struct KeyBytes {
    map: NonNull<u8>,
    capacity: usize,
    len: usize,
}

// SAFETY: a `KeyBytes` owns its mapping as a `Box<[u8]>` owns its allocation: no other pointer
// to it exists, `&self` methods only read it and writes take `&mut self`, so moving it to
// another thread or sharing `&KeyBytes` between threads cannot race.
unsafe impl Send for KeyBytes {}
// SAFETY: as above; shared references give read-only access.
unsafe impl Sync for KeyBytes {}

/// The size of a SHA-256 digest: every ratcheted key. One page holds it.
const DIGEST_LEN: usize = 32;

impl KeyBytes {
    /// A copy of `bytes` in a new mapping, locked if the limit allows: a key held for long.
    pub(crate) fn copy_of(bytes: &[u8]) -> Result<Self, ForensicError> {
        let key = Self::scratch_copy_of(bytes)?;
        key.lock();
        Ok(key)
    }

    /// A copy of `bytes` in a new mapping, not locked: a copy held for a moment.
    pub(crate) fn scratch_copy_of(bytes: &[u8]) -> Result<Self, ForensicError> {
        let mut key = Self::mapped(bytes.len())?;
        // `capacity >= bytes.len()` (`mapped`).
        key.capacity_mut()[..bytes.len()].copy_from_slice(bytes);
        key.len = bytes.len();
        Ok(key)
    }

    /// The key's bytes.
    pub(crate) fn as_bytes(&self) -> &[u8] {
        // SAFETY: `map` is valid for reads of `capacity >= len` bytes while `self` lives
        // (invariant), and nothing writes it while `&self` is borrowed.
        unsafe { std::slice::from_raw_parts(self.map.as_ptr(), self.len) }
    }

    /// Replaces the key with `digest` in the same mapping (a ratchet step makes no system
    /// call), zeroizing whatever of the previous key it does not overwrite.
    pub(crate) fn replace_with_digest(&mut self, digest: &[u8; DIGEST_LEN]) {
        let old_len = self.len;
        let all = self.capacity_mut();
        // `capacity` is at least one page, which is more than a digest.
        all[..DIGEST_LEN].copy_from_slice(digest);
        if old_len > DIGEST_LEN {
            all[DIGEST_LEN..old_len].zeroize();
        }
        self.len = DIGEST_LEN;
    }

    /// A mapping of at least `len` bytes (one page for none), left out of core dumps, and
    /// wiped in forked children where the kernel allows.
    fn mapped(len: usize) -> Result<Self, ForensicError> {
        let page = page_size();
        let capacity = len
            .max(1)
            .checked_next_multiple_of(page)
            .ok_or_else(|| no_memory(len, "the size overflows"))?;
        // SAFETY: an anonymous private mapping at an address the kernel picks: no existing
        // memory is touched. The result is checked against MAP_FAILED before use.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                capacity,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(no_memory(len, &std::io::Error::last_os_error().to_string()));
        }
        let map = NonNull::new(addr.cast::<u8>()).ok_or_else(|| no_memory(len, "mmap gave 0"))?;
        // From here on `Drop` returns the mapping, on the error path too.
        let key = KeyBytes {
            map,
            capacity,
            len: 0,
        };
        // SAFETY: `[map, map + capacity)` is the mapping just made, owned by `key`.
        if unsafe { libc::madvise(addr, capacity, libc::MADV_DONTDUMP) } != 0 {
            let e = std::io::Error::last_os_error();
            return Err(ForensicError::Key(format!(
                "cannot keep a key out of core dumps: the kernel refused madvise \
                 MADV_DONTDUMP ({e}), which a seccomp profile must allow; a key is held only \
                 where dumps leave it out"
            )));
        }
        // SAFETY: as above. Best-effort (see the module's comment): the result is not needed.
        let _ = unsafe { libc::madvise(addr, capacity, libc::MADV_WIPEONFORK) };
        Ok(key)
    }

    /// Locks the mapping in memory (never swapped out), if `RLIMIT_MEMLOCK` allows: best-effort,
    /// see the module's comment.
    fn lock(&self) {
        // SAFETY: `[map, map + capacity)` is the mapping `self` owns (invariant); `mlock`
        // changes no byte of it.
        let _ = unsafe { libc::mlock(self.map.as_ptr().cast(), self.capacity) };
    }

    /// The whole mapping, written only through `&mut self`.
    fn capacity_mut(&mut self) -> &mut [u8] {
        // SAFETY: `map` is valid for reads and writes of `capacity` bytes while `self` lives
        // (invariant), and `&mut self` makes this the only access.
        unsafe { std::slice::from_raw_parts_mut(self.map.as_ptr(), self.capacity) }
    }
}

impl Drop for KeyBytes {
    fn drop(&mut self) {
        let len = self.len;
        self.capacity_mut()[..len].zeroize();
        // SAFETY: the mapping is owned by `self` and no reference into it outlives this
        // call (`as_bytes` borrows `self`). A failure leaves the zeroized pages mapped.
        let _ = unsafe { libc::munmap(self.map.as_ptr().cast(), self.capacity) };
    }
}

/// Bytes of stack [`clear_stack`] overwrites below the frame that calls it: more than the
/// computations with a key beneath its callers use (a log's opening, which checks a crashed
/// chain's MAC and reads the signing key, is the deepest). `tests/forensic_key_core_dump.rs`
/// searches the dump of a release build for what they would leave. A memset of 32 KiB is
/// about a microsecond, once per round of the writer (up to 4096 records).
const CLEARED_STACK_BYTES: usize = 32 * 1024;

/// Overwrites with zeros the [`CLEARED_STACK_BYTES`] of stack below the caller's frame, where
/// the frames of what it called before lay.
#[inline(never)]
pub(crate) fn clear_stack() {
    let mut area = [0u8; CLEARED_STACK_BYTES];
    // The zeros must be stored: an array nobody reads would be left out. `black_box` is
    // opaque to the optimizer, which must assume it reads the array (best-effort by its
    // documentation: the core dump test checks that the stores are made). A `zeroize` of
    // the array would be guaranteed, at one volatile store per byte, per writer round.
    std::hint::black_box(&mut area);
}

/// Runs `f` in a frame of its own, then clears the stack `f` used ([`clear_stack`]).
pub(crate) fn with_stack_cleared<R>(f: impl FnOnce() -> R) -> R {
    let result = run_in_own_frame(f);
    clear_stack();
    result
}

/// `f()`, never inlined: its frames then lie below the caller's, where [`clear_stack`]
/// reaches, and not in the caller's own frame, which it does not.
#[inline(never)]
fn run_in_own_frame<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// The system's page size; 4096 if it cannot be asked.
fn page_size() -> usize {
    // SAFETY: `sysconf` reads a constant of the system; no memory is passed.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(n).ok().filter(|&n| n > 0).unwrap_or(4096)
}

fn no_memory(len: usize, why: &str) -> ForensicError {
    ForensicError::Key(format!(
        "cannot map {len} bytes for a key kept out of core dumps: {why}"
    ))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The `VmFlags` of the mapping of this process holding `addr`, from `/proc/self/smaps`
    /// (`dd`: left out of core dumps; `lo`: locked).
    pub(crate) fn vm_flags_at(addr: *const u8) -> Option<Vec<String>> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
        let addr = addr as usize;
        let mut inside = false;
        for line in smaps.lines() {
            let range = line
                .split_whitespace()
                .next()
                .and_then(|r| r.split_once('-'));
            let bounds = range.and_then(|(lo, hi)| {
                let lo = usize::from_str_radix(lo, 16).ok()?;
                let hi = usize::from_str_radix(hi, 16).ok()?;
                Some((lo, hi))
            });
            if let Some((lo, hi)) = bounds {
                inside = lo <= addr && addr < hi;
            } else if let Some(flags) = line.strip_prefix("VmFlags:") {
                if inside {
                    return Some(flags.split_whitespace().map(String::from).collect());
                }
            }
        }
        None
    }

    #[test]
    fn key_bytes_are_kept_out_of_core_dumps() {
        let key = KeyBytes::copy_of(b"0123456789abcdef").unwrap();
        assert_eq!(key.as_bytes(), b"0123456789abcdef");
        let flags = vm_flags_at(key.as_bytes().as_ptr()).expect("the key's mapping in smaps");
        assert!(flags.iter().any(|f| f == "dd"), "VmFlags: {flags:?}");
    }

    /// A forked child's copy of a key's mapping reads as zeros; the parent's keeps the key.
    #[test]
    fn a_forked_child_reads_zeros_where_the_key_was() {
        let secret = [0x5au8; 48];
        let key = KeyBytes::copy_of(&secret).unwrap();
        let flags = vm_flags_at(key.as_bytes().as_ptr()).expect("the key's mapping in smaps");
        // `wf`: MADV_WIPEONFORK, which every kernel this is tested on (4.14 and later) takes.
        assert!(flags.iter().any(|f| f == "wf"), "VmFlags: {flags:?}");
        let (ptr, len) = (key.as_bytes().as_ptr(), key.as_bytes().len());
        // SAFETY: the child only reads memory and calls `_exit`, both async-signal-safe, as a
        // child of a multi-threaded process must.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
        if pid == 0 {
            // SAFETY: `[ptr, ptr + len)` is the key's mapping, still mapped in the child
            // (wiped, not unmapped); volatile reads so that what is read is the child's page.
            let zeros = (0..len).all(|i| unsafe { ptr.add(i).read_volatile() } == 0);
            // SAFETY: ends the child at once, without running the parent's exit handlers.
            unsafe { libc::_exit(if zeros { 0 } else { 1 }) };
        }
        let mut status = 0;
        // SAFETY: `pid` is this process's child; `status` is writable.
        let waited = unsafe { libc::waitpid(pid, &mut status, 0) };
        assert_eq!(waited, pid, "waitpid: {}", std::io::Error::last_os_error());
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "the child read the key's bytes (wait status {status:#x})"
        );
        assert_eq!(key.as_bytes(), &secret);
    }

    #[test]
    fn heap_bytes_are_not_marked_so_the_check_can_fail() {
        let on_heap: Box<[u8]> = vec![7u8; 64].into_boxed_slice();
        let flags = vm_flags_at(on_heap.as_ptr()).expect("the heap's mapping in smaps");
        assert!(!flags.iter().any(|f| f == "dd"), "VmFlags: {flags:?}");
    }

    #[test]
    fn held_keys_are_locked_and_scratch_copies_are_not() {
        let held = KeyBytes::copy_of(b"held key bytes").unwrap();
        let scratch = KeyBytes::scratch_copy_of(b"scratch bytes").unwrap();
        let locked = |k: &KeyBytes| {
            let flags = vm_flags_at(k.as_bytes().as_ptr()).expect("the key's mapping");
            assert!(flags.iter().any(|f| f == "dd"), "VmFlags: {flags:?}");
            flags.iter().any(|f| f == "lo")
        };
        assert!(!locked(&scratch));
        // With CAP_IPC_LOCK locks are not limited, so the best effort succeeds; without it
        // the limit may be taken by the keys other tests hold meanwhile.
        if can_lock_without_limit() {
            assert!(locked(&held));
        }
    }

    /// Whether this process holds CAP_IPC_LOCK (bit 14 of `CapEff` in /proc/self/status).
    fn can_lock_without_limit() -> bool {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("CapEff:"))
            .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
            .is_some_and(|caps| caps & (1 << 14) != 0)
    }

    #[test]
    fn a_mapping_the_kernel_refuses_is_an_error_naming_why() {
        // More than any address space: `mmap` fails (ENOMEM), and nothing is held.
        let e = KeyBytes::mapped(1 << 60).err().expect("a mapping of 1 EiB");
        let text = e.to_string();
        assert!(text.starts_with("forensic log key: cannot map"), "{text}");
        assert!(text.contains("out of core dumps"), "{text}");
        let e = KeyBytes::mapped(usize::MAX)
            .err()
            .expect("a size that overflows");
        assert!(e.to_string().contains("the size overflows"), "{e}");
    }

    #[test]
    fn a_digest_replaces_a_longer_key_in_place() {
        let secret = [0xa5u8; 100];
        let mut key = KeyBytes::copy_of(&secret).unwrap();
        let before = key.as_bytes().as_ptr();
        key.replace_with_digest(&[1u8; DIGEST_LEN]);
        assert_eq!(key.as_bytes(), &[1u8; DIGEST_LEN]);
        assert_eq!(key.as_bytes().as_ptr(), before);
        // The old key's tail is zeroized, not only cut off.
        key.len = secret.len();
        assert!(key.as_bytes()[DIGEST_LEN..].iter().all(|&b| b == 0));
    }

    #[test]
    fn keys_of_many_pages_and_of_none_are_held() {
        let big = vec![3u8; 3 * page_size() + 1];
        let key = KeyBytes::copy_of(&big).unwrap();
        assert_eq!(key.as_bytes(), &big[..]);
        assert_eq!(key.capacity, 4 * page_size());
        let last = key.as_bytes().last().unwrap() as *const u8;
        assert!(vm_flags_at(last).unwrap().iter().any(|f| f == "dd"));
        let empty = KeyBytes::copy_of(&[]).unwrap();
        assert!(empty.as_bytes().is_empty());
        assert_eq!(empty.capacity, page_size());
    }
}

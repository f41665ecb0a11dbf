//! `FORENSIC_HMAC_SECRET` in the memory of `kvh config` and `kvh preflight`: the verbs that
//! only ask whether the secret is set, and how long it is, leave no copy of it behind in
//! memory the process frees (keys.rs reads it without copying it for the same reason: "Not
//! `var_os`, which would copy the secret into a buffer freed unzeroized"; `kvh config --help`:
//! "Of FORENSIC_HMAC_SECRET only the presence and the length are checked").
//!
//! The test binary's global allocator looks, while a test arms it, at every block freed (and
//! every block a `realloc` moves away from) for bytes of the secret.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::Mutex;

const MAX_NEEDLE: usize = 64;

static ARMED: AtomicBool = AtomicBool::new(false);
static NEEDLE: [AtomicU8; MAX_NEEDLE] = [const { AtomicU8::new(0) }; MAX_NEEDLE];
static NEEDLE_LEN: AtomicUsize = AtomicUsize::new(0);
static HITS: AtomicUsize = AtomicUsize::new(0);
/// One test at a time: the needle and the environment are global.
static SERIAL: Mutex<()> = Mutex::new(());

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
    (0..=len - n).any(|s| (0..n).all(|j| hay[s + j] == NEEDLE[j].load(Ordering::Relaxed)))
}

struct Watch;

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
        if held && !new.is_null() && new != ptr {
            HITS.fetch_add(1, Ordering::AcqRel);
        }
        new
    }
}

#[global_allocator]
static GLOBAL: Watch = Watch;

/// Runs `f` with the allocator watching for `needle`; how many freed blocks held it.
fn freed_copies(needle: &[u8], f: impl FnOnce()) -> usize {
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

fn clear_kvh_vars() {
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("KVH_") {
            std::env::remove_var(k);
        }
    }
}

#[test]
fn kvh_config_frees_no_copy_of_the_environment_secret() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    clear_kvh_vars();
    let secret = "Kc7-unique-env-secret-for-the-kvh-config-test-0123";
    std::env::set_var("FORENSIC_HMAC_SECRET", secret);
    // With a log, so that the secret's length is checked too.
    std::env::set_var("KVH_LOG_DIR", "/var/log/kvh");
    let args = kvhygiene::config::cli::ConfigArgs {
        file: None,
        strict: false,
        json: true,
    };
    let mut report = None;
    let copies = freed_copies(&secret.as_bytes()[..16], || {
        report = Some(kvhygiene::config::cli::report(&args));
    });
    std::env::remove_var("FORENSIC_HMAC_SECRET");
    std::env::remove_var("KVH_LOG_DIR");
    let report = report.unwrap().unwrap();
    assert!(report.hmac_secret_in_environment);
    assert_eq!(
        copies, 0,
        "{copies} freed heap block(s) held FORENSIC_HMAC_SECRET after kvh config asked \
         whether it is set"
    );
}

#[test]
fn kvh_preflight_frees_no_copy_of_the_environment_secret() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    clear_kvh_vars();
    let tmp = tempfile::tempdir().unwrap();
    let secret = "Pf3-unique-env-secret-for-the-kvh-preflight-test-42";
    std::env::set_var("FORENSIC_HMAC_SECRET", secret);
    let mut config = kvhygiene::config::Config::default();
    config.log.dir = Some(tmp.path().join("log"));
    let mut report = None;
    let copies = freed_copies(&secret.as_bytes()[..16], || {
        report = Some(kvhygiene::preflight::preflight(&config, false));
    });
    std::env::remove_var("FORENSIC_HMAC_SECRET");
    let report = report.unwrap();
    let hmac = report
        .checks
        .iter()
        .find(|c| c.check == "hmac key")
        .expect("an hmac key check");
    assert_eq!(
        hmac.status,
        kvhygiene::preflight::Status::Ok,
        "{}",
        hmac.detail
    );
    assert_eq!(
        copies, 0,
        "{copies} freed heap block(s) held FORENSIC_HMAC_SECRET after kvh preflight read it"
    );
}

/// The library's start-up reads its policy (`Config::from_env`, from the `KVH_*` variables)
/// before the forensic log takes the secret out of the environment, zeroized: reading the
/// policy must not leave a copy of `FORENSIC_HMAC_SECRET`, which is no policy variable, in
/// memory the inference server frees (docs/forensic-log.md: the secret is "held in memory
/// that is zeroized on drop").
#[test]
fn reading_the_policy_frees_no_copy_of_the_environment_secret() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    clear_kvh_vars();
    let secret = "Rp9-unique-env-secret-for-the-policy-read-test-7777";
    std::env::set_var("FORENSIC_HMAC_SECRET", secret);
    std::env::set_var("KVH_BATCH_SIZE", "32");
    let mut config = None;
    let copies = freed_copies(&secret.as_bytes()[..16], || {
        config = Some(kvhygiene::config::Config::from_env());
    });
    std::env::remove_var("FORENSIC_HMAC_SECRET");
    std::env::remove_var("KVH_BATCH_SIZE");
    assert_eq!(config.unwrap().unwrap().batch_size, 32);
    assert_eq!(
        copies, 0,
        "{copies} freed heap block(s) held FORENSIC_HMAC_SECRET after the policy was read"
    );
}

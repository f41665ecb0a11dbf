//! `KVH_PRELOAD`: whether the interposers serve allocations from kvhygiene, and the one-line
//! notice that says so on stderr.

use std::ffi::OsStr;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::OnceLock;

use kvhygiene::config::{PreloadSwitch, PRELOAD_ENV};

/// What the interposers do with allocations, fixed for the life of the process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    /// `KVH_PRELOAD` unset or `on`: kvhygiene serves device allocations.
    Serve,
    /// `KVH_PRELOAD=off`: every call goes to the real runtime unchanged.
    Forward,
    /// `KVH_PRELOAD` has another value: allocations fail (fail closed, like the core's
    /// configuration errors), frees of memory kvhygiene does not hold are still forwarded.
    Refuse,
}

pub(crate) const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The mode, read from the environment when the library is loaded ([`read_at_load`]) or at
/// first use; the first use prints the notice.
///
/// No lock is held while the notice is written: a process may fork while one thread writes
/// it (to a slow or full stderr pipe), and a lock that thread held would stay held in the
/// child, where no thread can release it. So the mode is an atomic that threads racing to
/// read the environment all set to the same value, and each line of the notice is one
/// `write(2)` made after the mode is published, by the one thread that won the flag.
pub(crate) fn mode() -> Mode {
    let mode = mode_read().unwrap_or_else(read_mode);
    notice_once(mode);
    mode
}

/// Prints the notice of `mode` unless this process (or its parent, before a fork) printed
/// it: a `write(2)` per line, quoting the value read with the mode, never the environment now.
pub(crate) fn notice_once(mode: Mode) {
    static NOTICED: AtomicBool = AtomicBool::new(false);
    if !NOTICED.load(Ordering::Acquire) && !NOTICED.swap(true, Ordering::AcqRel) {
        notice(mode, RAW.get().cloned().flatten());
    }
}

/// `KVH_PRELOAD` as it was read with the mode (for the notice of an invalid value): set once,
/// at load, before the process can fork.
static RAW: OnceLock<Option<String>> = OnceLock::new();

/// Reads `KVH_PRELOAD` into the mode, without the notice: at load, so that a child forked
/// before the first interposed call (kvhygiene started through the C API) knows its
/// parent's mode without reading the environment after the fork.
pub(crate) fn read_at_load() {
    if mode_read().is_none() {
        read_mode();
    }
}

fn read_mode() -> Mode {
    let value = std::env::var_os(PRELOAD_ENV);
    let mode = parse(value.as_deref());
    let _ = RAW.set(value.map(|v| v.to_string_lossy().into_owned()));
    MODE.store(mode as u8, Ordering::Release);
    mode
}

/// The mode if [`mode`] has read it already (in this process, or in the parent before the
/// fork); never reads the environment or prints the notice.
pub(crate) fn mode_read() -> Option<Mode> {
    Mode::from_u8(MODE.load(Ordering::Acquire))
}

/// [`mode`]'s value, [`UNREAD`] before the environment was read.
static MODE: AtomicU8 = AtomicU8::new(UNREAD);

/// [`mode`]'s value before the environment was read.
const UNREAD: u8 = u8::MAX;

impl Mode {
    fn from_u8(v: u8) -> Option<Mode> {
        [Mode::Serve, Mode::Forward, Mode::Refuse]
            .into_iter()
            .find(|m| *m as u8 == v)
    }
}

/// The core's rule ([`PreloadSwitch::parse`]), so that `kvh config` judges the variable as
/// the interposers read it.
fn parse(value: Option<&OsStr>) -> Mode {
    match PreloadSwitch::parse(value) {
        PreloadSwitch::Serve => Mode::Serve,
        PreloadSwitch::Forward => Mode::Forward,
        PreloadSwitch::Refuse => Mode::Refuse,
    }
}

fn notice(mode: Mode, raw: Option<String>) {
    let line = match mode {
        Mode::Serve => format!(
            "kvhygiene-preload {VERSION}: cudaMalloc, cudaMallocAsync and cudaMallocPitch are \
             served by kvhygiene (freed memory is zeroed and verified before reuse); \
             KVH_PRELOAD=off forwards them unchanged"
        ),
        Mode::Forward => format!(
            "kvhygiene-preload {VERSION}: KVH_PRELOAD=off: CUDA allocations are forwarded \
             unchanged and freed memory is not scrubbed"
        ),
        Mode::Refuse => format!(
            "kvhygiene-preload {VERSION}: KVH_PRELOAD={:?} is invalid (accepted: on, off, or \
             another switch spelling: true/false, yes/no, 1/0); CUDA allocations fail with cudaErrorInitializationError",
            raw.unwrap_or_default()
        ),
    };
    // Not `eprintln!` nor `std::io::stderr()`: a closed stderr must not become a panic (as in
    // the core's notice), and the standard library's stderr lock would be held for as long
    // as the write blocks (see `mode`).
    kvhygiene::stderr_line(&line);
    if mode == Mode::Serve && pytorch_loaded() {
        kvhygiene::stderr_line(&format!(
            "kvhygiene-preload {VERSION}: PyTorch is loaded in this process: its caching \
             allocator hands freed tensors out again without cudaFree, so only the memory it \
             gives back is scrubbed, unless kvhygiene.install() made kvhygiene its allocator \
             (the package's vLLM and SGLang plugins do)"
        ));
    }
}

/// Whether PyTorch's CUDA library is loaded in this process: then the interposers may serve
/// only what PyTorch's own caching allocator takes from the runtime and gives back, which is
/// not every free of a tensor (the notice must not read as a promise it cannot keep).
/// Known by the file name of the object (`libc10_cuda.so`, or a copy a wheel renamed with a
/// suffix), not by its soname, which a build may not set.
fn pytorch_loaded() -> bool {
    crate::real::loaded_object_names().iter().any(|path| {
        let path = path.to_bytes();
        let file = path.rsplit(|&b| b == b'/').next().unwrap_or(path);
        file.starts_with(b"libc10_cuda")
    })
}

#[cfg(test)]
mod tests {
    use super::{parse, Mode, OsStr};
    use std::os::unix::ffi::OsStrExt;

    #[test]
    fn values() {
        let parse_str = |v: &str| parse(Some(OsStr::new(v)));
        assert_eq!(parse(None), Mode::Serve);
        assert_eq!(parse_str("on"), Mode::Serve);
        assert_eq!(parse_str(" ON "), Mode::Serve);
        assert_eq!(parse_str("off"), Mode::Forward);
        assert_eq!(parse_str("Off"), Mode::Forward);
        assert_eq!(parse_str(""), Mode::Refuse);
        assert_eq!(parse_str("of"), Mode::Refuse);
        assert_eq!(parse_str("/usr/lib/libkvhygiene_preload.so"), Mode::Refuse);
        // The other spellings of a switch, as every other switch reads them.
        for on in ["1", "true", "Yes"] {
            assert_eq!(parse_str(on), Mode::Serve, "{on}");
        }
        for off in ["0", "FALSE", " no "] {
            assert_eq!(parse_str(off), Mode::Forward, "{off}");
        }
        // Set but not UTF-8.
        assert_eq!(parse(Some(OsStr::from_bytes(b"o\xffn"))), Mode::Refuse);
    }

    #[test]
    fn a_mode_stored_as_a_byte_reads_back_and_the_unread_marker_is_none() {
        for mode in [Mode::Serve, Mode::Forward, Mode::Refuse] {
            assert_eq!(Mode::from_u8(mode as u8), Some(mode));
        }
        assert_eq!(Mode::from_u8(super::UNREAD), None);
    }
}

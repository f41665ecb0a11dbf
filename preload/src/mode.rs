//! `KVH_PRELOAD`: whether the interposers serve allocations from kvhygiene, and the one-line
//! notice that says so on stderr.

use std::ffi::OsStr;
use std::io::Write;
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

/// The mode, read from the environment on first use; the first use also prints the notice.
pub(crate) fn mode() -> Mode {
    static MODE: OnceLock<Mode> = OnceLock::new();
    *MODE.get_or_init(|| {
        let value = std::env::var_os(PRELOAD_ENV);
        let mode = parse(value.as_deref());
        notice(
            mode,
            value.as_deref().map(|v| v.to_string_lossy().into_owned()),
        );
        mode
    })
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
            "kvhygiene-preload {VERSION}: KVH_PRELOAD={:?} is invalid (accepted: on, off); CUDA \
             allocations fail with cudaErrorInitializationError",
            raw.unwrap_or_default()
        ),
    };
    // Not `eprintln!`: a closed stderr must not become a panic (as in the core's notice).
    let _ = writeln!(std::io::stderr(), "{line}");
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
        assert_eq!(parse_str("0"), Mode::Refuse);
        // Set but not UTF-8.
        assert_eq!(parse(Some(OsStr::from_bytes(b"o\xffn"))), Mode::Refuse);
    }
}

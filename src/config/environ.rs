//! Reading the process environment without copying all of it.
//!
//! `std::env::vars_os` copies every variable, and frees the copies unzeroized: among them the
//! HMAC secret (`FORENSIC_HMAC_SECRET`), which the library keeps only in memory zeroized on
//! drop. These readers walk the C library's `environ` array and copy only what they return.
//! Written by hand because no crate offers a filtered, non-copying walk of `environ`.
//!
//! Precondition of every function here, as of C's `getenv`: no other thread changes the
//! environment meanwhile (`setenv`, `putenv`, `std::env::set_var`). The library reads its
//! policy at start-up and the `kvh` verbs at their start, before any such change.

use std::ffi::{CStr, OsString};
use std::os::unix::ffi::OsStrExt;

extern "C" {
    /// The C library's environment array (POSIX). `mut`: `setenv` may replace it.
    static mut environ: *const *const libc::c_char;
}

/// Calls `f` with each `name=value` entry of the environment, as bytes, until it returns
/// `false`.
fn each_entry(mut f: impl FnMut(&[u8]) -> bool) {
    // SAFETY: `environ` is either null or a null-terminated array of pointers to
    // NUL-terminated strings (POSIX), which nothing changes during the walk (the module's
    // precondition). Each entry is only read, and only during the call to `f`.
    unsafe {
        let mut p = std::ptr::addr_of!(environ).read();
        if p.is_null() {
            return;
        }
        while !(*p).is_null() {
            if !f(CStr::from_ptr(*p).to_bytes()) {
                return;
            }
            p = p.add(1);
        }
    }
}

/// Splits an entry at its first `=`. An entry without one is no variable: `getenv` (and so
/// the library's readers) never finds it.
fn split(entry: &[u8]) -> Option<(&[u8], &[u8])> {
    let i = entry.iter().position(|&b| b == b'=')?;
    Some((&entry[..i], &entry[i + 1..]))
}

/// The variables whose name starts with `prefix`, names and values copied; no other entry is
/// copied.
pub fn vars_with_prefix(prefix: &[u8]) -> Vec<(OsString, OsString)> {
    let mut out = Vec::new();
    each_entry(|entry| {
        let Some((name, value)) = split(entry) else {
            return true;
        };
        if name.starts_with(prefix) {
            out.push((
                std::ffi::OsStr::from_bytes(name).to_os_string(),
                std::ffi::OsStr::from_bytes(value).to_os_string(),
            ));
        }
        true
    });
    out
}

/// The length in bytes of the value of `name`, when it is set; the value is not copied.
pub fn value_len(name: &str) -> Option<usize> {
    measure_value(name, <[u8]>::len)
}

/// `measure` of the value of `name`, when it is set, given the value in place: not copied.
pub fn measure_value<T>(name: &str, measure: impl FnOnce(&[u8]) -> T) -> Option<T> {
    let mut measure = Some(measure);
    let mut out = None;
    each_entry(|entry| {
        let Some((n, value)) = split(entry) else {
            return true;
        };
        if n == name.as_bytes() {
            out = measure.take().map(|m| m(value));
            return false;
        }
        true
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_split_at_the_first_equals_sign() {
        assert_eq!(split(b"A=b=c"), Some((&b"A"[..], &b"b=c"[..])));
        assert_eq!(split(b"A="), Some((&b"A"[..], &b""[..])));
        assert_eq!(split(b"A"), None);
    }

    #[test]
    fn the_environment_is_read_as_std_reads_it() {
        // PATH is set in every test environment; KVH_ variables may be too.
        let path = std::env::var_os("PATH").expect("PATH");
        assert_eq!(value_len("PATH"), Some(path.len()));
        assert_eq!(value_len("KVH_NO_SUCH_VARIABLE_EVER"), None);
        let mut ours = vars_with_prefix(b"PAT");
        ours.retain(|(n, _)| n == "PATH");
        assert_eq!(ours, vec![("PATH".into(), path)]);
        let std_kvh: Vec<_> = std::env::vars_os()
            .filter(|(n, _)| n.as_bytes().starts_with(b"KVH_"))
            .collect();
        assert_eq!(vars_with_prefix(b"KVH_"), std_kvh);
    }
}

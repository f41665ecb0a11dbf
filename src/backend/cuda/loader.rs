//! Loads the CUDA driver (`libcuda.so.1`) at run time.
//!
//! There is no link-time dependency on libcuda or libcudart: a machine without a GPU loads
//! kvhygiene normally and [`load`] reports [`LoadError::NotInstalled`]. Every symbol is resolved
//! once, up front (`sys::CudaDriver::from_library`), so a driver too old to export one of them
//! fails here with the symbol's name instead of at first use.

use std::fmt;
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;

use super::sys;

/// The file name the NVIDIA driver installs (the unversioned `libcuda.so` is a development
/// link that production images often lack).
pub const LIBCUDA: &str = "libcuda.so.1";

/// Why the driver could not be loaded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LoadError {
    /// The library does not exist: no CUDA driver is installed.
    NotInstalled(String),
    /// The library exists but cannot be loaded (corrupt or truncated, another architecture,
    /// a dependency missing, unreadable): a driver is installed but unusable.
    Unloadable(String),
    /// The library opened but lacks a symbol kvhygiene needs: a driver is present but unusable.
    MissingSymbol(String),
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LoadError::NotInstalled(why) => write!(f, "cannot load the CUDA driver: {why}"),
            LoadError::Unloadable(why) => {
                write!(f, "a CUDA driver is installed but cannot be loaded: {why}")
            }
            LoadError::MissingSymbol(why) => {
                write!(f, "the CUDA driver lacks a required entry point: {why}")
            }
        }
    }
}

/// The resolved driver entry points. Cheap to share; the library stays loaded while any
/// clone lives (in practice: for the life of the process).
#[derive(Clone)]
pub struct Driver {
    api: Arc<sys::CudaDriver>,
}

impl fmt::Debug for Driver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Driver(libcuda)")
    }
}

impl Driver {
    /// The raw entry points, for [`super::result`].
    pub(crate) fn api(&self) -> &sys::CudaDriver {
        &self.api
    }

    /// Keeps libcuda loaded for the life of the process, however this handle and its clones
    /// are dropped: one reference to the entry points (which own the library) is leaked.
    /// Called once `cuInit` succeeded, from when the driver keeps state of its own in the
    /// process (its threads, retained primary contexts) that unloading the library would pull
    /// from under them.
    pub(crate) fn keep_loaded(&self) {
        std::mem::forget(Arc::clone(&self.api));
    }
}

/// Loads [`LIBCUDA`] from the dynamic loader's search path.
pub fn load() -> Result<Driver, LoadError> {
    // SAFETY: 1. `libcuda.so.1` is the CUDA driver.
    unsafe { load_from(LIBCUDA) }
}

/// Loads the driver from `path` (a file name searched by the dynamic loader, or a path).
///
/// # Safety
/// 1. `path` must name the CUDA driver, a library whose exported `cu*` symbols have the
///    driver API's types and behaviour (the test suite's stand-in), a library that lacks one
///    of the symbols [`Driver`] needs (refused before any call), or no library at all: the
///    symbols found are called as the driver's, and a library's initialisers run when it is
///    opened.
pub unsafe fn load_from(path: &str) -> Result<Driver, LoadError> {
    // SAFETY: 1. contract 1: the library's initialisers are the driver's (sound to run in any
    // process, as the CUDA runtime does), or those of a library the caller vouches for.
    let lib = unsafe { libloading::Library::new(path) }.map_err(|e| {
        // dlerror's message usually names the file already.
        let msg = e.to_string();
        let msg = if msg.contains(path) {
            msg
        } else {
            format!("{path}: {msg}")
        };
        if is_absent(path, &msg) {
            LoadError::NotInstalled(msg)
        } else {
            LoadError::Unloadable(msg)
        }
    })?;
    // SAFETY: 1. every field of `CudaDriver` is typed by bindgen from cuda.h of the pinned
    // CUDA 12.4, and the symbol names are the versioned ones that header maps to (cuMemAlloc ->
    // cuMemAlloc_v2), whose signatures NVIDIA keeps stable across drivers.
    let api = unsafe { sys::CudaDriver::from_library(lib) }
        .map_err(|e| LoadError::MissingSymbol(format!("{path}: {e}")))?;
    Ok(Driver { api: Arc::new(api) })
}

/// Whether a failed `dlopen` of `path` means the library is not there at all, rather than
/// there but unloadable: only then may `auto` take the host backend. A path is absent when no
/// file is at it; a bare name when the loader says that name itself (not a dependency of
/// it) was not found on its search path. The loader's messages are English unless the
/// process set `LC_MESSAGES` (neither Rust nor Python does); a translated one reads as
/// unloadable, which fails closed.
fn is_absent(path: &str, dlerror: &str) -> bool {
    if path.contains('/') {
        return !anything_at(std::path::Path::new(path));
    }
    let not_found = dlerror.starts_with(&format!(
        "{path}: cannot open shared object file: No such file or directory"
    ));
    // The loader skips, without a word, a file of the name built for another machine
    // architecture, and then says the name was not found: a driver file that is there is a
    // broken driver, whatever the loader's message.
    not_found && !on_search_path(path)
}

/// Whether a file named `name` is in a directory the dynamic loader searches for it:
/// `LD_LIBRARY_PATH`'s, the paths `/etc/ld.so.cache` lists under that name (a file the cache
/// builder skipped is not there), and the default directories, the multiarch ones of Debian
/// and Ubuntu included. Written by hand: no crate reads the loader's cache, and only the
/// paths it holds are needed (each a NUL-terminated string in the cache's string table).
fn on_search_path(name: &str) -> bool {
    let suffix = format!("/{name}");
    // glibc splits the variable on ':' and ';', and reads an empty entry as the working
    // directory; an empty variable it ignores.
    let from_env = std::env::var_os("LD_LIBRARY_PATH")
        .filter(|v| !v.is_empty())
        .map(|v| {
            v.as_bytes()
                .split(|&b| b == b':' || b == b';')
                .map(|d| match d {
                    b"" => std::path::PathBuf::from("."),
                    d => std::path::PathBuf::from(std::ffi::OsStr::from_bytes(d)),
                })
                .map(|d| d.join(name))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    let from_cache = std::fs::read("/etc/ld.so.cache")
        .map(|cache| {
            cache
                .split(|&b| b == 0)
                .filter(|s| s.ends_with(suffix.as_bytes()) && s.starts_with(b"/"))
                .map(|s| std::path::PathBuf::from(std::ffi::OsStr::from_bytes(s)))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    let defaults = default_dirs().into_iter().map(|d| d.join(name));
    from_env
        .into_iter()
        .chain(from_cache)
        .chain(defaults)
        .any(|p| anything_at(&p))
}

/// Whether a directory entry is at `p`, a link to nothing included: a `libcuda.so.1` left
/// pointing at the versioned library a driver upgrade or a failed container mount removed is
/// a driver that is there but broken, not an absent one (`Path::exists` follows the link).
fn anything_at(p: &std::path::Path) -> bool {
    std::fs::symlink_metadata(p).is_ok()
}

/// The directories the loader searches after the cache: the system's (`/lib64`, `/usr/lib64`,
/// `/lib`, `/usr/lib`), this architecture's multiarch ones (`/usr/lib/x86_64-linux-gnu`), and
/// the one this process's C library came from, wherever the distribution keeps it.
fn default_dirs() -> Vec<std::path::PathBuf> {
    let mut dirs: Vec<std::path::PathBuf> = ["/lib64", "/usr/lib64", "/lib", "/usr/lib"]
        .iter()
        .map(std::path::PathBuf::from)
        .collect();
    let triplet = format!("{}-linux-gnu", std::env::consts::ARCH);
    dirs.push(std::path::Path::new("/lib").join(&triplet));
    dirs.push(std::path::Path::new("/usr/lib").join(&triplet));
    let libc_dir = std::fs::read_to_string("/proc/self/maps")
        .ok()
        .and_then(|maps| {
            maps.lines()
                .filter_map(|l| l.split_whitespace().nth(5))
                .find(|p| p.contains("/libc.so") || p.contains("/libc-"))
                .and_then(|p| std::path::Path::new(p).parent().map(|d| d.to_path_buf()))
        });
    dirs.extend(libc_dir);
    dirs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_library_is_not_installed_with_the_name_in_the_message() {
        // SAFETY: 1. no such library.
        let err = unsafe { load_from("libkvh-no-such-driver.so.1") }.unwrap_err();
        match &err {
            LoadError::NotInstalled(msg) => assert!(msg.contains("libkvh-no-such-driver.so.1")),
            other => panic!("expected NotInstalled, got {other:?}"),
        }
        assert!(err.to_string().starts_with("cannot load the CUDA driver"));
    }

    #[test]
    fn only_the_library_itself_missing_counts_as_absent() {
        // A name no directory holds (libcuda.so.1 itself may be installed where this runs).
        let missing =
            "libkvh-no-such.so.1: cannot open shared object file: No such file or directory";
        assert!(is_absent("libkvh-no-such.so.1", missing));
        // The loader's "not found" for a name a searched directory holds (a file it skipped):
        // there, not absent.
        let skipped = "libc.so.6: cannot open shared object file: No such file or directory";
        assert!(!is_absent("libc.so.6", skipped));
        // A dependency of the driver missing: the driver is there.
        let dependency =
            "libnvidia-ptxjitcompiler.so.1: cannot open shared object file: No such file or \
             directory";
        assert!(!is_absent("libcuda.so.1", dependency));
        assert!(!is_absent("libcuda.so.1", "libcuda.so.1: file too short"));
        assert!(!is_absent(
            "libcuda.so.1",
            "libcuda.so.1: wrong ELF class: ELFCLASS32"
        ));
        assert!(is_absent("/nonexistent/libcuda.so.1", "whatever"));
        assert!(!is_absent("/proc/self/exe", "whatever"));
    }

    #[test]
    fn a_library_without_the_driver_symbols_is_reported_as_such() {
        // libc is always present and exports none of the cu* entry points.
        // SAFETY: 1. libc lacks the driver's symbols: refused before any call.
        let err = unsafe { load_from("libc.so.6") }.unwrap_err();
        match err {
            LoadError::MissingSymbol(msg) => assert!(msg.contains("libc.so.6"), "{msg}"),
            other => panic!("expected MissingSymbol, got {other:?}"),
        }
    }
}

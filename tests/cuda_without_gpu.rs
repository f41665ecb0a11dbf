//! The CUDA backend on a machine without a GPU or driver (CI): loading fails cleanly and
//! `auto` may fall back to host memory; on a GPU machine the same tests check the converse.

#[path = "skip/mod.rs"]
mod skip;

use kvhygiene::backend::cuda::{loader, probe, probe_library, Probe};
use kvhygiene::backend::{Backend, BackendKind};

fn driver_installed() -> bool {
    loader::load().is_ok()
}

#[test]
fn probe_agrees_with_the_loader() {
    match probe() {
        Probe::NoDriver(why) => {
            assert!(!driver_installed());
            assert!(
                why.contains(loader::LIBCUDA),
                "the message names the library: {why}"
            );
        }
        Probe::Available(b) => {
            assert!(driver_installed());
            assert_eq!(b.kind(), BackendKind::Cuda);
            assert!(b.device_count() > 0);
        }
        Probe::Broken(e) => {
            assert!(driver_installed(), "Broken needs a driver: {e}");
        }
    }
}

#[test]
fn loader_error_is_clear_when_no_driver_is_installed() {
    if driver_installed() {
        eprintln!("a CUDA driver is installed here; nothing to check");
        return;
    }
    let err = loader::load().unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("cannot load the CUDA driver"), "{msg}");
    assert!(msg.contains("libcuda.so.1"), "{msg}");
}

#[test]
fn a_present_but_unusable_driver_fails_closed() {
    // A library that opens but is not the driver stands for a broken installation: this must
    // never be reported as "no driver", which would let `auto` hand out host memory.
    // SAFETY: 1. libm lacks the driver's symbols: refused before any call.
    assert!(matches!(
        unsafe { probe_library("libm.so.6") },
        Probe::Broken(_)
    ));
}

/// A driver file that exists but cannot be loaded (truncated or corrupt, the wrong
/// architecture, a missing dependency, no read permission) is a broken installation, not the
/// absence of a driver: `auto` must fail closed rather than hand out host memory.
#[test]
fn a_driver_file_that_exists_but_cannot_be_loaded_is_broken_not_absent() {
    let dir = std::env::temp_dir().join(format!("kvh-corrupt-driver-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("libcuda.so.1");
    // Not an ELF object: what a truncated or corrupted driver install leaves behind.
    std::fs::write(&path, b"this is not a shared object").unwrap();
    // SAFETY: 1. not a shared object: the loader refuses it.
    let probed = unsafe { probe_library(path.to_str().unwrap()) };
    let _ = std::fs::remove_dir_all(&dir);
    match probed {
        Probe::Broken(_) => {}
        Probe::NoDriver(why) => panic!(
            "a present but unloadable driver probed as NoDriver, so `auto` would fall back \
             to host memory: {why}"
        ),
        Probe::Available(_) => panic!("a corrupt file cannot be a working driver"),
    }
}

/// Run in a child process by the test below, with `LD_LIBRARY_PATH` set: prints what `probe()`
/// finds for the driver's bare name, as the library looks it up.
#[test]
#[ignore = "run by a_driver_built_for_another_architecture_is_broken_not_absent"]
fn probe_child_report() {
    if std::env::var_os("CUDA_PROBE_CHILD").is_none() {
        return;
    }
    let seen = match probe() {
        Probe::NoDriver(why) => format!("NoDriver: {why}"),
        Probe::Available(_) => "Available".to_string(),
        Probe::Broken(e) => format!("Broken: {e}"),
    };
    println!("probe-result<{seen}>");
}

/// The C library this process runs on (always mapped).
fn mapped_libc() -> std::path::PathBuf {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    maps.lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| p.contains("/libc.so") || p.contains("/libc-"))
        .map(std::path::PathBuf::from)
        .expect("libc is mapped")
}

/// A `libcuda.so.1` on the loader's search path built for another machine architecture (an
/// image of another platform, a driver install for the wrong architecture) is a driver file
/// that exists but cannot be loaded: docs/cuda.md counts "wrong architecture" among the files
/// that are a broken driver, so `auto` must fail closed. The dynamic loader skips such a file
/// on its search path and reports the name as not found, which must not read as "no driver
/// installed".
#[test]
fn a_driver_built_for_another_architecture_is_broken_not_absent() {
    let Some(dir) = driver_of_another_architecture() else {
        return;
    };
    let mut cmd = probe_child();
    cmd.env("LD_LIBRARY_PATH", dir.path());
    let seen = probe_reported_by(cmd);
    assert!(
        seen.starts_with("Broken"),
        "a libcuda.so.1 of another architecture probed as {seen}, so `auto` would fall \
         back to host memory"
    );
}

/// A directory holding a `libcuda.so.1` built for another machine architecture; `None` (said
/// on stderr) where a driver is installed, which the loader would load instead.
fn driver_of_another_architecture() -> Option<tempfile::TempDir> {
    if driver_installed() {
        eprintln!("a CUDA driver is installed here; nothing to check");
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    write_driver_of_another_architecture(dir.path());
    Some(dir)
}

/// A `libcuda.so.1` built for another machine architecture, written into `dir`.
fn write_driver_of_another_architecture(dir: &std::path::Path) {
    let mut image = std::fs::read(mapped_libc()).unwrap();
    // e_machine (offset 18): another architecture than this one.
    let other: u16 = if cfg!(target_arch = "x86_64") {
        0xB7
    } else {
        0x3E
    };
    image[18..20].copy_from_slice(&other.to_le_bytes());
    std::fs::write(dir.join("libcuda.so.1"), &image).unwrap();
}

/// Runs `probe_child_report` through `cmd` (this test binary, or a wrapper that runs it) and
/// returns what it printed.
fn probe_reported_by(mut cmd: std::process::Command) -> String {
    let out = cmd.env("CUDA_PROBE_CHILD", "1").output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout
        .split("probe-result<")
        .nth(1)
        .and_then(|s| s.split('>').next())
        .unwrap_or_else(|| {
            panic!(
                "no report from the child: {stdout}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
        .to_string()
}

fn probe_child() -> std::process::Command {
    let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", "probe_child_report", "--ignored", "--nocapture"]);
    cmd
}

/// The dynamic loader reads an empty entry of `LD_LIBRARY_PATH` (`/opt/x:`, a leading or
/// doubled colon, as shell scripts that append to an unset variable leave) as the current
/// directory, and searches it for `libcuda.so.1`. A driver file there built for another
/// architecture is skipped by the loader: it exists, so the probe must say Broken.
#[test]
fn a_driver_of_another_architecture_in_the_directory_of_an_empty_ld_library_path_entry_is_broken() {
    let Some(dir) = driver_of_another_architecture() else {
        return;
    };
    let mut cmd = probe_child();
    cmd.current_dir(dir.path())
        .env("LD_LIBRARY_PATH", "/nonexistent-kvh-dir:");
    let seen = probe_reported_by(cmd);
    assert!(
        seen.starts_with("Broken"),
        "a libcuda.so.1 of another architecture in the current directory, which \
         LD_LIBRARY_PATH=/nonexistent-kvh-dir: makes the loader search, probed as {seen}, so \
         `auto` would fall back to host memory"
    );
}

/// The dynamic loader splits `LD_LIBRARY_PATH` at `;` as well as at `:` (ld.so(8)). A driver
/// file built for another architecture in the directory after a `;` is one it searched and
/// skipped: the probe must say Broken.
#[test]
fn a_driver_of_another_architecture_after_a_semicolon_in_ld_library_path_is_broken() {
    let Some(dir) = driver_of_another_architecture() else {
        return;
    };
    let mut search = std::ffi::OsString::from("/nonexistent-kvh-dir;");
    search.push(dir.path());
    let mut cmd = probe_child();
    cmd.env("LD_LIBRARY_PATH", search);
    let seen = probe_reported_by(cmd);
    assert!(
        seen.starts_with("Broken"),
        "a libcuda.so.1 of another architecture in a directory of \
         LD_LIBRARY_PATH=/nonexistent-kvh-dir;DIR probed as {seen}, so `auto` would fall back \
         to host memory"
    );
}

/// The system library directory the C library itself was loaded from (on Debian and Ubuntu
/// `/usr/lib/x86_64-linux-gnu` or `/lib/x86_64-linux-gnu`, a default directory of their
/// dynamic loader, where a driver package installs `libcuda.so.1`). A driver file there built
/// for another architecture is skipped by the loader, and `ldconfig` leaves it out of
/// `/etc/ld.so.cache`: it exists, so the probe must say Broken. Run in a private mount
/// namespace (`unshare`) where the file is laid over that directory; skipped where one
/// cannot be made.
#[test]
fn a_driver_of_another_architecture_in_the_system_library_directory_is_broken() {
    let Some(extra) = driver_of_another_architecture() else {
        return;
    };
    let system = mapped_libc()
        .canonicalize()
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf();
    let mount = format!(
        "mount -t overlay overlay -o lowerdir={}:{} {}",
        extra.path().display(),
        system.display(),
        system.display()
    );
    let usable = std::process::Command::new("unshare")
        .args(["-rm", "sh", "-c", &mount])
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !usable {
        skip::skipped("no overlay mount in a private namespace (unshare -rm) here");
        return;
    }
    let mut cmd = std::process::Command::new("unshare");
    cmd.args(["-rm", "sh", "-c", &format!("{mount} && exec \"$0\" \"$@\"")])
        .arg(probe_child().get_program())
        .args(probe_child().get_args())
        .env_remove("LD_LIBRARY_PATH");
    let seen = probe_reported_by(cmd);
    assert!(
        seen.starts_with("Broken"),
        "a libcuda.so.1 of another architecture in {}, a directory the dynamic loader searches \
         by default, probed as {seen}, so `auto` would fall back to host memory",
        system.display()
    );
}

/// The dynamic loader ignores an `LD_LIBRARY_PATH` that is set but empty (`LD_LIBRARY_PATH=`,
/// as `env LD_LIBRARY_PATH= cmd` leaves to clear it): it searches no directory for it, the
/// current one included (only an empty entry of a non-empty value, `/opt/x:`, is the current
/// directory). A `libcuda.so.1` in the current directory is then not on the search path: the
/// loader never looked at it, so no driver is installed and the probe must say NoDriver.
#[test]
fn a_driver_file_in_the_current_directory_under_an_empty_ld_library_path_is_not_searched() {
    let Some(dir) = driver_of_another_architecture() else {
        return;
    };
    let mut cmd = probe_child();
    cmd.current_dir(dir.path()).env("LD_LIBRARY_PATH", "");
    let seen = probe_reported_by(cmd);
    assert!(
        seen.starts_with("NoDriver"),
        "with LD_LIBRARY_PATH set to the empty string the loader does not search the current \
         directory, yet a libcuda.so.1 there made the probe say {seen}"
    );
}

/// A `libcuda.so.1` on the loader's search path that is a link to a driver library no longer
/// there (what a driver upgrade or a failed container mount of the versioned
/// `libcuda.so.<version>` leaves behind) is a driver installation that is present but broken:
/// `auto` must fail closed rather than take host memory, however the loader words its error.
#[test]
fn a_dangling_libcuda_link_on_the_search_path_is_broken_not_absent() {
    if driver_installed() {
        eprintln!("a CUDA driver is installed here; nothing to check");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(
        dir.path().join("libcuda.so.550.54.15"),
        dir.path().join("libcuda.so.1"),
    )
    .unwrap();
    let mut cmd = probe_child();
    cmd.env("LD_LIBRARY_PATH", dir.path());
    let seen = probe_reported_by(cmd);
    assert!(
        seen.starts_with("Broken"),
        "a libcuda.so.1 link to a missing driver library probed as {seen}, so `auto` would \
         fall back to host memory"
    );
}

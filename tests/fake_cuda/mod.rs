//! The tests' stand-in for libcuda.so.1 (fake_libcuda.cpp beside this file), compiled here with
//! the system C++ compiler (`CXX`, else `c++`). Tests that need it skip, saying so, when there
//! is none (see `skip`); a compiler that fails on the stand-in fails them. Included by the
//! test binaries that use it (`#[path = "fake_cuda/mod.rs"]`).
#![allow(dead_code)]

// The including binary declares `mod skip` (tests/skip) beside this module.
use crate::skip;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// Compiles the stand-in to `out`; `false` (see `skip`) where there is no compiler. A compiler
/// that fails panics: a stand-in that no longer compiles must not turn its tests into skips.
pub fn compile(out: &Path) -> bool {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fake_cuda/fake_libcuda.cpp");
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".to_string());
    let status = Command::new(&cxx)
        .args(["-shared", "-fPIC", "-std=c++17", "-O1", "-o"])
        .arg(out)
        .arg(&src)
        .status();
    match status {
        Ok(s) if s.success() => true,
        Ok(s) => panic!("{cxx} failed to compile {}: {s}", src.display()),
        Err(e) => {
            skip::skipped(&format!("no fake driver ({cxx}: {e})"));
            false
        }
    }
}

/// The stand-in compiled as `libcuda.so.1` into a directory of its own, for `LD_LIBRARY_PATH`
/// of a child process; `None` without a compiler.
pub fn as_libcuda_dir() -> Option<tempfile::TempDir> {
    let dir = tempfile::tempdir().unwrap();
    compile(&dir.path().join("libcuda.so.1")).then_some(dir)
}

/// The stand-in built once per test binary, as `lib<stem>.so` in the target's temporary
/// directory (`stem` differs between binaries, which build at the same time).
pub fn built(stem: &str) -> Option<&'static Path> {
    static BUILT: OnceLock<Option<PathBuf>> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("lib{stem}.so"));
            compile(&out).then_some(out)
        })
        .as_deref()
}

/// A private copy of the stand-in (its own dlopen instance, so its switches are its own),
/// opened: its path and the library.
pub fn instance(stem: &str, name: &str) -> Option<(String, libloading::Library)> {
    let built = built(stem)?;
    let path = built.with_file_name(format!("lib{stem}-{name}.so"));
    std::fs::copy(built, &path).expect("copy fake driver");
    let path = path.to_string_lossy().into_owned();
    // SAFETY: our own stand-in library; its initialisers only set up C++ statics.
    let lib = unsafe { libloading::Library::new(&path) }.expect("open fake driver");
    Some((path, lib))
}

/// Calls `fake_cuda_<name>(arg)` in an instance.
pub fn switch(lib: &libloading::Library, name: &str, arg: i32) {
    let symbol = format!("fake_cuda_{name}\0");
    // SAFETY: every fake_cuda_* switch is `void(int)`.
    unsafe {
        let f = lib
            .get::<unsafe extern "C" fn(i32)>(symbol.as_bytes())
            .expect("switch");
        f(arg);
    }
}

/// Calls `int fake_cuda_<name>(arg)` in an instance: one of its counters or queries.
pub fn query(lib: &libloading::Library, name: &str, arg: i32) -> i32 {
    let symbol = format!("fake_cuda_{name}\0");
    // SAFETY: every fake_cuda_* query is `int(int)`.
    unsafe {
        let f = lib
            .get::<unsafe extern "C" fn(i32) -> i32>(symbol.as_bytes())
            .expect("query");
        f(arg)
    }
}

/// The CUDA backend on the stand-in at `path`.
pub fn start(path: &str) -> kvhygiene::backend::cuda::CudaBackend {
    use kvhygiene::backend::cuda::{probe_library, Probe};
    // SAFETY: 1. the test suite's stand-in of the driver (this module's library).
    match unsafe { probe_library(path) } {
        Probe::Available(b) => b,
        other => panic!("the fake driver should start: {other:?}"),
    }
}

/// [`start`] on a device whose memory is short as it opens, so that it makes no batch slot
/// then (the one for a full device's first frees): the first batch submitted makes a slot of
/// its own, as the tests of slot creation need. `lib` is the instance at `path`.
pub fn start_without_first_slot(
    path: &str,
    lib: &libloading::Library,
) -> kvhygiene::backend::cuda::CudaBackend {
    switch(lib, "set_device_memory", 1);
    let b = start(path);
    switch(lib, "set_device_memory", 0);
    b
}

/// A hook for the stand-in's switches: a SIGTERM arrives on the calling thread (inside the
/// driver call the hook runs in), after "EXITING" on stdout.
pub extern "C" fn sigterm_arrives() {
    println!("EXITING");
    // SAFETY: raises a signal on this thread; the case installed `exit_on_sigterm` for it.
    unsafe { libc::raise(libc::SIGTERM) };
}

/// A SIGTERM handler that ends the process with `exit(0)`, as servers' handlers commonly do.
pub extern "C" fn exit_on_sigterm(_: libc::c_int) {
    // SAFETY: what such handlers do (not async-signal-safe, but common practice).
    unsafe { libc::exit(0) };
}

/// Runs the test `name` of the calling test binary in a child on the stand-in (`driver`, its
/// `LD_LIBRARY_PATH`), with `case` set to the name (the child runs the case) and the CUDA
/// backend, `KVH_OOM=null` and `env`; returns its status (`None`: still running after
/// `limit`, then killed), stdout and stderr.
pub fn run_case(
    case: &str,
    name: &str,
    driver: &Path,
    env: &[(&str, &std::ffi::OsStr)],
    limit: std::time::Duration,
) -> (Option<std::process::ExitStatus>, String, String) {
    use std::time::{Duration, Instant};
    let mut proc = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env(case, name)
        .env("KVH_BACKEND", "cuda")
        .env("KVH_OOM", "null")
        .envs(env.iter().copied())
        .env("LD_LIBRARY_PATH", driver)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(s) = proc.try_wait().unwrap() {
            break Some(s);
        }
        if started.elapsed() > limit {
            let _ = proc.kill();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = proc.wait_with_output().unwrap();
    (
        status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs the case `name` (as [`run_case`]) and checks that it set up (printed "EXITING") and
/// that its `exit()`, called `what`, ended the process with status 0 within 15 s. Nothing is
/// checked without a C++ compiler for the stand-in: then `false`.
pub fn check_case_exited(
    case: &str,
    name: &str,
    what: &str,
    env: &[(&str, &std::ffi::OsStr)],
) -> bool {
    let Some(driver) = as_libcuda_dir() else {
        return false;
    };
    let limit = std::time::Duration::from_secs(15);
    let (status, stdout, stderr) = run_case(case, name, driver.path(), env, limit);
    assert!(
        !stdout.contains("SETUP-FAILED") && stdout.contains("EXITING"),
        "the case did not set up (status {status:?}):\n{stdout}\n{stderr}"
    );
    assert!(
        status.is_some(),
        "exit() had not ended the process {limit:?} after it was called {what}:\n{stdout}\n\
         {stderr}"
    );
    assert!(
        status.unwrap().success(),
        "status {status:?}:\n{stdout}\n{stderr}"
    );
    true
}

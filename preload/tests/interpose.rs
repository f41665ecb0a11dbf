//! The interposers end to end, without a GPU. A stand-in CUDA runtime
//! (`fake_cudart/fake_cudart.cpp`, soname `libcudart.so.12`, backed by malloc and caching freed
//! blocks unchanged, as every caching allocator does inside one process) and a small "engine"
//! linked against it (`fake_cudart/probe.cpp`) are compiled here with the system C++ compiler
//! (the tests skip with a message when there is none). The engine runs once as it is, which
//! shows the threat — the next allocation hands back the previous request's secret — and once
//! with `LD_PRELOAD=libkvhygiene_preload.so` on kvhygiene's host backend, which must remove it
//! while forwarding everything kvhygiene does not own.
//!
//! The interposer library is the cdylib of this package: Cargo builds a package's library
//! before its integration tests, into the same `deps/` directory as the test executable, so
//! the test finds it next to itself (`current_exe`), fresh from the same build.

#[path = "../../tests/skip/mod.rs"]
mod skip;

use std::collections::HashMap;
use std::ffi::OsString;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// How long one probe run may take. A run takes well under a second; the limit is there so
/// that a deadlock fails the test (with what the probe printed) instead of hanging CI, and is
/// generous enough never to be reached by a slow, loaded machine.
const PROBE_LIMIT: Duration = Duration::from_secs(120);

struct Built {
    probe: PathBuf,
    /// plugin_host.cpp, and plugin.cpp's library, which it loads with RTLD_LOCAL.
    plugin_host: PathBuf,
    plugin: PathBuf,
    /// plugin.cpp linked against a copy of the runtime under a vendored name
    /// (`libcudart-0a1b2c3d.so.12`, as wheels rename bundled libraries), so that neither
    /// `RTLD_NEXT` nor a soname finds it.
    vendored_plugin: PathBuf,
    /// A stand-in for PyTorch's `libc10_cuda.so` (c10_cuda.cpp): loaded, it is PyTorch.
    pytorch_stand_in: PathBuf,
}

/// Runs the C++ compiler with `args`. `None` when there is no compiler at all; a compiler
/// that runs and fails fails the test, with its output.
fn compile(cxx: &str, args: &[OsString]) -> Option<()> {
    match Command::new(cxx).args(args).output() {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => panic!("cannot run the C++ compiler {cxx}: {e}"),
        Ok(out) if out.status.success() => Some(()),
        Ok(out) => panic!(
            "{cxx} {args:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// The C++ compiler (`CXX`, else `c++`) building the stand-ins of `tests/fake_cudart` into
/// `dir`, with the flags every one of them takes.
struct Cxx {
    cxx: String,
    dir: PathBuf,
    src: PathBuf,
}

impl Cxx {
    fn in_dir(dir: PathBuf) -> Cxx {
        std::fs::create_dir_all(&dir).expect("create the build directory");
        Cxx {
            cxx: std::env::var("CXX").unwrap_or_else(|_| "c++".to_string()),
            dir,
            src: Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fake_cudart"),
        }
    }

    /// `-Wl,-rpath,DIR`: the programs and libraries built here find each other.
    fn rpath(&self) -> OsString {
        OsString::from(format!("-Wl,-rpath,{}", self.dir.display()))
    }

    /// Builds `dir/name` from `sources` (a shared library when `shared`), with `link` (the
    /// libraries, rpath and flags) after them. `None` without a compiler.
    fn build(
        &self,
        name: &str,
        shared: bool,
        sources: &[&str],
        link: &[OsString],
    ) -> Option<PathBuf> {
        let out = self.dir.join(name);
        let mut args: Vec<OsString> = Vec::new();
        if shared {
            args.extend(["-shared", "-fPIC"].map(OsString::from));
        }
        args.extend(["-std=c++17", "-O1", "-Wall", "-o"].map(OsString::from));
        args.push(out.clone().into_os_string());
        args.extend(sources.iter().map(|s| self.src.join(s).into_os_string()));
        args.extend(link.iter().cloned());
        compile(&self.cxx, &args).map(|()| out)
    }
}

/// `s` as a compiler argument.
fn arg(s: &str) -> OsString {
    OsString::from(s)
}

/// `p` as a compiler argument.
fn path_arg(p: &Path) -> OsString {
    p.as_os_str().to_owned()
}

/// The fake runtime and the engine, compiled once per test process; `None` without a C++
/// compiler (the compiler is not installed). A compiler that fails fails the tests.
fn built() -> Option<&'static Built> {
    static BUILT: OnceLock<Option<Built>> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let cxx =
                Cxx::in_dir(PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("preload-fake-cudart"));
            let rpath = cxx.rpath();
            let runtime_named = |name: &str| {
                let soname = arg(&format!("-Wl,-soname,{name}"));
                cxx.build(name, true, &["fake_cudart.cpp"], &[soname, arg("-pthread")])
            };
            let Some(runtime) = runtime_named("libcudart.so.12") else {
                skip::skipped(&format!("no C++ compiler ({} not found)", cxx.cxx));
                return None;
            };
            let probe_links = [
                path_arg(&runtime),
                rpath.clone(),
                arg("-ldl"),
                arg("-pthread"),
            ];
            let probe = cxx.build("probe", false, &["probe.cpp"], &probe_links)?;
            let plugin_linked_to = |name: &str, runtime: &Path| {
                cxx.build(
                    name,
                    true,
                    &["plugin.cpp"],
                    &[path_arg(runtime), rpath.clone()],
                )
            };
            let plugin = plugin_linked_to("libengine.so", &runtime)?;
            let vendored = runtime_named("libcudart-0a1b2c3d.so.12")?;
            let vendored_plugin = plugin_linked_to("libengine_vendored.so", &vendored)?;
            let plugin_host =
                cxx.build("plugin_host", false, &["plugin_host.cpp"], &[arg("-ldl")])?;
            let pytorch_stand_in = cxx.build("libc10_cuda.so", true, &["c10_cuda.cpp"], &[])?;
            Some(Built {
                probe,
                plugin_host,
                plugin,
                vendored_plugin,
                pytorch_stand_in,
            })
        })
        .as_ref()
}

/// libkvhygiene_preload.so of this build (see the module comment).
fn preload_library() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let deps = exe.parent().expect("test executable directory");
    let candidates = [
        deps.join("libkvhygiene_preload.so"),
        deps.join("../libkvhygiene_preload.so"),
    ];
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .unwrap_or_else(|| panic!("libkvhygiene_preload.so not found at {candidates:?}"))
}

/// What one run of the probe printed.
struct Run {
    values: HashMap<String, i64>,
    stderr: String,
}

impl Run {
    fn get(&self, key: &str) -> i64 {
        match self.values.get(key) {
            Some(v) => *v,
            None => panic!("the probe printed no {key}; stderr:\n{}", self.stderr),
        }
    }

    /// Asserts each `(key, value)`, naming every mismatch at once.
    fn expect(&self, expected: &[(&str, i64)]) {
        let wrong: Vec<String> = expected
            .iter()
            .filter(|(k, v)| self.values.get(*k) != Some(v))
            .map(|(k, v)| format!("{k}: expected {v}, got {:?}", self.values.get(*k)))
            .collect();
        assert!(
            wrong.is_empty(),
            "{}\nstderr:\n{}",
            wrong.join("\n"),
            self.stderr
        );
    }
}

/// An empty directory for the forensic log of one probe run of `scenario` (it does not
/// exist yet: the log creates it).
fn fresh_log_dir(scenario: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("preload-{scenario}-log-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// The log in `dir` records one block exported and that block returned to the device for
/// it; the directory is then removed.
fn one_export_and_its_release_are_logged(dir: &Path) {
    let text = log_text(dir);
    let exports = text.matches(r#""kind":"ipc_export""#).count();
    let releases = text.matches(r#""reason":"ipc_exported""#).count();
    assert_eq!((exports, releases), (1, 1), "{text}");
    let _ = std::fs::remove_dir_all(dir);
}

/// Every file of the log in `dir`, one after the other.
fn log_text(dir: &Path) -> String {
    std::fs::read_dir(dir)
        .expect("the log directory")
        .map(|e| std::fs::read_to_string(e.expect("entry").path()).expect("a log file"))
        .collect()
}

/// Runs the probe's `scenario`, with the interposer preloaded when `preload`, on the host
/// backend, with `env` added. The test's own `KVH_*` and `LD_PRELOAD` variables are removed.
fn run(built: &Built, scenario: &str, preload: bool, env: &[(&str, &str)]) -> Run {
    let mut cmd = Command::new(&built.probe);
    cmd.arg(scenario);
    run_command(cmd, preload, env)
}

fn run_command(mut cmd: Command, preload: bool, env: &[(&str, &str)]) -> Run {
    cmd.env_remove("LD_PRELOAD");
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("KVH_") {
            cmd.env_remove(key);
        }
    }
    cmd.env("KVH_BACKEND", "host");
    if preload {
        cmd.env("LD_PRELOAD", preload_library());
    }
    cmd.envs(env.iter().copied());
    let output = output_within(cmd, PROBE_LIMIT);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(
        output.status.success(),
        "the probe failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    let values = stdout
        .lines()
        .filter_map(|line| {
            let (k, v) = line.split_once(' ')?;
            Some((k.to_string(), v.trim().parse().ok()?))
        })
        .collect();
    let run = Run { values, stderr };
    assert_eq!(run.get("done"), 1, "the probe did not finish");
    run
}

/// Runs `cmd` to completion, with its output collected; kills it and fails the test, showing
/// the output so far, when it runs longer than `limit`.
fn output_within(mut cmd: Command, limit: Duration) -> Output {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("start the probe");
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut buf);
            }
            buf
        })
    };
    let out = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let err = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let deadline = Instant::now() + limit;
    let status = loop {
        match child.try_wait().expect("wait for the probe") {
            Some(status) => break status,
            None if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                // The pipes close with the child (a grandchild holding them would keep the
                // readers going; the probes start none that outlive them).
                let stdout = out.join().unwrap_or_default();
                let stderr = err.join().unwrap_or_default();
                panic!(
                    "the probe ran longer than {limit:?} and was killed; its output so far:\n{}\n{}",
                    String::from_utf8_lossy(&stdout),
                    String::from_utf8_lossy(&stderr)
                );
            }
            None => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    Output {
        status,
        stdout: out.join().expect("the stdout reader"),
        stderr: err.join().expect("the stderr reader"),
    }
}

#[test]
fn a_probe_that_hangs_is_killed_and_fails_with_its_output() {
    let mut cmd = Command::new("sh");
    cmd.args(["-c", "echo started; exec sleep 600"]);
    let failed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        output_within(cmd, Duration::from_millis(300))
    }));
    let message = match failed {
        Ok(_) => panic!("a hung probe was not stopped"),
        Err(e) => e.downcast_ref::<String>().cloned().unwrap_or_default(),
    };
    assert!(message.contains("was killed"), "{message}");
    assert!(
        message.contains("started"),
        "the output so far is shown: {message}"
    );
}

#[test]
fn without_the_interposer_the_next_allocation_returns_the_secret() {
    let Some(b) = built() else { return };
    let r = run(b, "main", false, &[]);
    r.expect(&[
        ("kvh_loaded", 0),
        ("rc_malloc", 0),
        ("rc_free", 0),
        ("rc_malloc_again", 0),
        ("same_block", 1),
        ("reuse_zero", 0),
        ("secret_seen", 1),
        ("async_same_block", 1),
        ("async_reuse_zero", 0),
    ]);
    assert!(
        r.get("real_cudaMalloc") > 1,
        "the runtime served cudaMalloc"
    );
}

#[test]
fn the_interposer_serves_allocations_scrubbed_and_forwards_the_rest() {
    let Some(b) = built() else { return };
    let r = run(b, "main", true, &[]);
    r.expect(&[
        ("kvh_loaded", 1),
        // cudaFree(NULL) creates the context: forwarded.
        ("rc_free_null", 0),
        ("real_free_null", 1),
        // The freed secret is gone from the block, and the block handed out again reads zero.
        ("rc_malloc", 0),
        ("fresh_zero", 1),
        ("rc_free", 0),
        ("old_block_zero", 1),
        ("rc_malloc_again", 0),
        ("reuse_zero", 1),
        ("secret_seen", 0),
        // Double and interior frees of kvhygiene memory: refused, logged, never forwarded.
        ("rc_free_q", 0),
        ("rc_double_free", 1),
        ("real_frees_for_q", 0),
        ("rc_interior_free", 1),
        ("real_frees_for_interior", 0),
        ("rc_free_r", 0),
        ("kvh_invalid_frees", 2),
        // Correct frees are not reported as size mismatches (the runtime's free has no size).
        ("kvh_size_mismatches", 0),
        // Memory kvhygiene does not hold goes to the runtime, synchronous and async.
        ("rc_managed", 0),
        ("rc_foreign_free", 0),
        ("real_frees_for_foreign", 1),
        ("rc_foreign_free_async", 0),
        ("real_async_frees_for_foreign", 1),
        // A pool hit queues nothing and does not wait; fresh memory waits for its zeroing.
        ("syncs_for_pool_hit", 0),
        ("syncs_for_fresh", 1),
        // Size 0 is the runtime's answer; a NULL output and impossible sizes are errors.
        ("rc_malloc_zero", 0),
        ("zero_is_null", 1),
        ("real_mallocs_for_zero", 1),
        ("rc_malloc_null_out", 1),
        ("rc_malloc_huge", 2),
        ("huge_is_null", 1),
        ("rc_malloc_max", 2),
        // Stream-ordered allocation.
        ("rc_malloc_async", 0),
        ("async_fresh_zero", 1),
        ("rc_free_async", 0),
        ("rc_malloc_async_again", 0),
        ("async_reuse_zero", 1),
        ("rc_free_async_b", 0),
        // Pitched rows: 512-byte pitch, zeroed, scrubbed after cudaFree.
        ("rc_malloc_pitch", 0),
        ("pitch", 512),
        ("pitch_zero", 1),
        ("rc_free_pitch", 0),
        ("pitch_block_scrubbed", 1),
        ("rc_malloc_pitch_overflow", 2),
        ("pitch_overflow_is_null", 1),
        ("rc_malloc_pitch_no_pitch", 1),
        ("pitch_no_pitch_is_null", 1),
        // The per-thread variants: served; a foreign pointer needs the runtime's own
        // cudaFreeAsync_ptsz, which this runtime lacks: an error code, not a crash, and the
        // memory is still there to free.
        ("rc_malloc_ptsz", 0),
        ("ptsz_zero", 1),
        ("rc_free_ptsz", 0),
        ("rc_foreign_free_ptsz", 302),
        ("rc_foreign_free_after", 0),
        // The current device is used; cudaFree synchronises the block's device and restores
        // the thread's; a device the backend lacks is cudaErrorInvalidDevice.
        ("rc_malloc_device3", 0),
        ("rc_free_device3", 0),
        ("device_syncs_for_free", 1),
        ("synced_device", 3),
        ("device_after_free", 0),
        ("rc_malloc_device9", 101),
        // Only the zero-size cudaMalloc reached the runtime's allocator.
        ("real_cudaMalloc", 1),
        ("real_cudaMallocAsync", 0),
        ("real_cudaMallocPitch", 0),
    ]);
    assert!(r.get("kvh_verifications_passed") > 0);
    let notices: Vec<&str> = r
        .stderr
        .lines()
        .filter(|l| l.starts_with("kvhygiene-preload "))
        .collect();
    assert_eq!(notices.len(), 1, "one start-up notice: {}", r.stderr);
    assert!(
        notices[0].starts_with(&format!(
            "kvhygiene-preload {}: ",
            env!("CARGO_PKG_VERSION")
        )),
        "{}",
        notices[0]
    );
    assert!(
        r.stderr.contains("cudaFreeAsync_ptsz is not loaded"),
        "the missing symbol is named: {}",
        r.stderr
    );
}

/// With PyTorch loaded (its `libc10_cuda.so` among the loaded objects), the notice that
/// kvhygiene serves allocations is followed by a caution: PyTorch's caching allocator hands
/// freed tensors out again without `cudaFree`, so only `kvhygiene.install()` makes every
/// free a scrubbed one. Without PyTorch there is no caution.
#[test]
fn the_notice_cautions_about_pytorch_s_caching_allocator_when_pytorch_is_loaded() {
    let Some(b) = built() else { return };
    let caution = "PyTorch is loaded in this process";
    let plain = run(b, "main", true, &[]);
    assert!(
        plain.stderr.contains("served by kvhygiene") && !plain.stderr.contains(caution),
        "{}",
        plain.stderr
    );
    let both = format!(
        "{}:{}",
        preload_library().display(),
        b.pytorch_stand_in.display()
    );
    let with = run(b, "main", true, &[("LD_PRELOAD", &both)]);
    assert!(with.stderr.contains(caution), "{}", with.stderr);
}

#[test]
fn a_failed_synchronisation_is_returned_and_loses_nothing() {
    let Some(b) = built() else { return };
    let r = run(b, "sync-failure", true, &[]);
    r.expect(&[
        ("rc_malloc", 0),
        // cudaErrorIllegalAddress from the stream synchronisation: no memory handed out.
        ("rc_malloc_failing_sync", 700),
        ("failed_is_null", 1),
        // cudaFree returns the error, as the runtime's would, and the block is freed anyway:
        // scrubbed, and a second free is a double free.
        ("rc_free_failing_sync", 700),
        ("rc_free_again", 1),
        ("old_block_zero", 1),
        ("kvh_invalid_frees", 1),
    ]);
}

#[test]
fn kvh_preload_off_forwards_everything() {
    let Some(b) = built() else { return };
    let r = run(b, "main", true, &[("KVH_PRELOAD", "off")]);
    r.expect(&[
        ("rc_malloc", 0),
        ("same_block", 1),
        ("reuse_zero", 0),
        ("secret_seen", 1),
        ("real_cudaMallocAsync", 2),
        // The pitched allocation, the overflowing one and the one without a pitch.
        ("real_cudaMallocPitch", 3),
        ("real_cudaStreamSynchronize", 0),
    ]);
    assert!(r.get("real_cudaMalloc") > 1);
    assert!(
        r.stderr.contains("KVH_PRELOAD=off"),
        "the notice says so: {}",
        r.stderr
    );
}

#[test]
fn an_invalid_switch_fails_allocations_and_still_forwards_frees() {
    let Some(b) = built() else { return };
    let r = run(b, "main", true, &[("KVH_PRELOAD", "of")]);
    r.expect(&[
        ("rc_free_null", 0),
        ("rc_malloc", 3),
        ("rc_malloc_async", 3),
        ("rc_malloc_pitch", 3),
        ("huge_is_null", 1),
        ("rc_foreign_free", 0),
        ("real_frees_for_foreign", 1),
        ("real_cudaMalloc", 0),
    ]);
    assert!(
        r.stderr.contains("KVH_PRELOAD=\"of\" is invalid"),
        "{}",
        r.stderr
    );
}

#[test]
fn a_core_configuration_error_fails_allocations_and_still_forwards_frees() {
    let Some(b) = built() else { return };
    let r = run(b, "main", true, &[("KVH_BATCH_SIZE", "0")]);
    r.expect(&[
        ("rc_malloc", 3),
        ("rc_malloc_async", 3),
        ("rc_foreign_free", 0),
        ("real_frees_for_foreign", 1),
        ("real_cudaMalloc", 1),
    ]);
    assert!(r.stderr.contains("KVH_BATCH_SIZE"), "{}", r.stderr);
}

/// A child forked after the parent's start-up failed (here an invalid policy) inherited no
/// allocator, and the parent refuses every allocation: the child must refuse them too, with
/// the same error, rather than take unscrubbed memory from the runtime.
#[test]
fn a_child_forked_after_a_failed_start_up_refuses_allocations_as_its_parent() {
    let Some(b) = built() else { return };
    let r = run(b, "fork", true, &[("KVH_BATCH_SIZE", "0")]);
    r.expect(&[
        ("rc_malloc", 3),
        ("child_rc_malloc", 3),
        ("child_malloc_forwarded", 0),
        ("child_exited_cleanly", 1),
    ]);
}

#[test]
fn a_runtime_loaded_with_rtld_local_is_found_by_its_soname() {
    // The engine's library and its CUDA runtime are outside the global scope, so
    // dlsym(RTLD_NEXT) finds nothing there (without the soname look-up every call below
    // returns 302); the interposers still serve and forward.
    let Some(b) = built() else { return };
    let mut cmd = Command::new(&b.plugin_host);
    cmd.arg(&b.plugin);
    let without = run_command(cmd, false, &[]);
    without.expect(&[("rc_malloc", 0), ("reuse_zero", 0)]);
    let mut cmd = Command::new(&b.plugin_host);
    cmd.arg(&b.plugin);
    let r = run_command(cmd, true, &[]);
    r.expect(&[
        ("rc_malloc", 0),
        ("rc_free", 0),
        ("rc_malloc_again", 0),
        ("reuse_zero", 1),
        ("rc_free_q", 0),
        ("rc_foreign_free", 0),
        ("real_frees_for_foreign", 1),
        ("real_cudaMalloc", 0),
    ]);
    assert!(!r.stderr.contains("is not loaded"), "{}", r.stderr);
}

/// `driver_engine.cpp`'s library for a stand-in driver (`fake_driver.cpp`, soname
/// `libcuda.so.1`) with the IPC export (`with_ipc`) or without it, beside a runtime that has
/// no driver functions of its own and has the `_ptsz` lookups; each variant in a directory
/// of its own, found through the library's rpath. `None` without a C++ compiler.
fn built_driver_engine(with_ipc: bool) -> Option<&'static PathBuf> {
    static WITH: OnceLock<Option<PathBuf>> = OnceLock::new();
    static WITHOUT: OnceLock<Option<PathBuf>> = OnceLock::new();
    let (cell, dir) = if with_ipc {
        (&WITH, "preload-driver-by-soname")
    } else {
        (&WITHOUT, "preload-driver-without-ipc")
    };
    cell.get_or_init(|| {
        let cxx = Cxx::in_dir(PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(dir));
        let runtime_flags = [
            arg("-DFAKE_CUDART_WITHOUT_DRIVER"),
            arg("-DFAKE_CUDART_PTSZ_LOOKUPS"),
            arg("-Wl,-soname,libcudart.so.12"),
            arg("-ldl"),
            arg("-pthread"),
        ];
        let runtime = cxx.build(
            "libcudart.so.12",
            true,
            &["fake_cudart.cpp"],
            &runtime_flags,
        )?;
        let mut driver_flags = vec![arg("-Wl,-soname,libcuda.so.1")];
        if !with_ipc {
            driver_flags.push(arg("-DFAKE_DRIVER_WITHOUT_IPC"));
        }
        let driver = cxx.build("libcuda.so.1", true, &["fake_driver.cpp"], &driver_flags)?;
        // The driver first: without the interposer, its `cuIpcGetMemHandle` is the one bound.
        let links = [
            path_arg(&driver),
            path_arg(&runtime),
            cxx.rpath(),
            arg("-ldl"),
        ];
        cxx.build("libdriver_engine.so", true, &["driver_engine.cpp"], &links)
    })
    .as_ref()
}

/// Runs `driver_engine.cpp`'s library (see [`built_driver_engine`]) in `plugin_host`.
fn run_driver_engine(with_ipc: bool, preload: bool, env: &[(&str, &str)]) -> Option<Run> {
    let b = built()?;
    let engine = built_driver_engine(with_ipc)?;
    let mut cmd = Command::new(&b.plugin_host);
    cmd.arg(engine);
    Some(run_command(cmd, preload, env))
}

/// A driver loaded with an engine's library outside the global scope (a Python extension
/// that links libcuda) is found by its soname: the export the engine makes through the driver
/// API reaches the driver, and the block is marked exported and returned to the device at its
/// free. A pointer from the runtime's `_ptsz` lookup is the interposer too, and exports
/// through it reach the driver as well. Without the soname look-up the exports answer 302
/// (`CUDA_ERROR_SHARED_OBJECT_SYMBOL_NOT_FOUND`) and the lookup hands out the driver's own
/// function, past kvhygiene.
#[test]
fn a_driver_loaded_with_rtld_local_is_found_by_its_soname() {
    let Some(without) = run_driver_engine(true, false, &[]) else {
        return;
    };
    let common = [
        ("rc_malloc", 0),
        ("rc_export", 0),
        ("handle_names_block", 1),
        ("driver_exports", 1),
        ("rc_ptsz", 0),
        ("ptsz_status", 0),
        ("ptsz_as_linked", 1),
        ("rc_export_ptsz", 0),
        ("driver_exports_after_ptsz", 2),
        ("rc_free", 0),
    ];
    without.expect(&common);
    without.expect(&[("rc_kvh_synchronize", -1)]);
    let dir = fresh_log_dir("driver-by-soname");
    let log_dir = dir.to_string_lossy().into_owned();
    let r = run_driver_engine(true, true, &[("KVH_LOG_DIR", &log_dir)]).expect("built above");
    r.expect(&common);
    r.expect(&[("rc_kvh_synchronize", 0)]);
    assert!(!r.stderr.contains("is not loaded"), "{}", r.stderr);
    one_export_and_its_release_are_logged(&dir);
}

/// A driver without `cuIpcGetMemHandle` (without the interposer, the engine's library does
/// not even load: the name is unresolved). The interposer answers the export with 302
/// (`CUDA_ERROR_SHARED_OBJECT_SYMBOL_NOT_FOUND`), as the runtime answers a missing driver
/// function. The block was marked before the forward, so its free still returns it to the
/// device rather than to the pool: a failed export costs one block's reuse, never a pooled
/// block with a handle open. The runtime's lookup finds no such function, and its answer
/// (status "not found", a NULL output) passes unchanged.
#[test]
fn a_driver_without_the_ipc_export_answers_302_and_the_block_still_leaves_the_pool() {
    let dir = fresh_log_dir("driver-without-ipc");
    let log_dir = dir.to_string_lossy().into_owned();
    let Some(r) = run_driver_engine(false, true, &[("KVH_LOG_DIR", &log_dir)]) else {
        return;
    };
    r.expect(&[
        ("rc_malloc", 0),
        ("rc_export", 302),
        ("handle_names_block", 0),
        ("driver_exports", 0),
        ("rc_ptsz", 0),
        ("ptsz_status", 1),
        ("ptsz_as_linked", 0),
        ("rc_free", 0),
        ("rc_kvh_synchronize", 0),
    ]);
    assert!(!r.values.contains_key("rc_export_ptsz"), "{}", r.stderr);
    one_export_and_its_release_are_logged(&dir);
}

#[test]
fn invalid_frees_through_the_runtime_api_reach_the_forensic_log() {
    let Some(b) = built() else { return };
    let dir = fresh_log_dir("main");
    let r = run(b, "main", true, &[("KVH_LOG_DIR", &dir.to_string_lossy())]);
    r.expect(&[("rc_double_free", 1), ("rc_interior_free", 1)]);
    let mut reasons = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("the log directory") {
        let text = std::fs::read_to_string(entry.expect("entry").path()).expect("a log file");
        for line in text
            .lines()
            .filter(|l| l.contains(r#""kind":"invalid_free""#))
        {
            for reason in ["double_free", "interior_pointer", "unknown_pointer"] {
                if line.contains(&format!(r#""reason":"{reason}""#)) {
                    reasons.push(reason);
                }
            }
        }
    }
    reasons.sort_unstable();
    // The two invalid frees of kvhygiene memory, and nothing about the foreign pointers,
    // which went to the runtime without being offered to the core.
    assert_eq!(reasons, ["double_free", "interior_pointer"], "{}", r.stderr);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn without_the_interposer_an_exported_buffer_goes_to_the_next_allocation_unchanged() {
    let Some(b) = built() else { return };
    for scenario in ["ipc", "ipc-driver", "ipc-entry-point", "ipc-proc-address"] {
        let r = run(b, scenario, false, &[]);
        r.expect(&[
            ("rc_export", 0),
            ("real_exports", 2),
            ("secret_seen", 1),
            ("exported_blocks", -1),
        ]);
    }
}

/// An exported block is never pooled: its free scrubs it and returns it to the device, the
/// next allocation of its size is new memory, and the forensic log says who exported what
/// and why the block went back. A freed block's export is refused (its memory is the next
/// owner's) and never reaches the runtime; the runtime's own memory is its affair.
#[test]
fn an_exported_block_is_returned_to_the_device_at_its_free_never_reused() {
    an_exported_block_is_retired("ipc", "cudaIpcGetMemHandle refused (cudaErrorInvalidValue)");
}

/// The same for an engine that exports through the driver API (`cuIpcGetMemHandle`).
#[test]
fn a_block_exported_through_the_driver_api_is_returned_to_the_device_at_its_free() {
    an_exported_block_is_retired(
        "ipc-driver",
        "cuIpcGetMemHandle refused (CUDA_ERROR_INVALID_VALUE)",
    );
}

/// The same for an engine that calls the driver's export through a pointer it got from
/// `cudaGetDriverEntryPoint`: the lookup hands out the interposer.
#[test]
fn a_block_exported_through_a_driver_entry_point_is_returned_to_the_device_at_its_free() {
    an_exported_block_is_retired(
        "ipc-entry-point",
        "cuIpcGetMemHandle refused (CUDA_ERROR_INVALID_VALUE)",
    );
}

/// The same for an engine that takes the driver's lookup `cuGetProcAddress` from the runtime
/// and the export from that lookup, as NCCL does: the lookup handed out is the interposer's,
/// which hands out the export's interposer in turn.
#[test]
fn a_block_exported_through_the_drivers_lookup_is_returned_to_the_device_at_its_free() {
    an_exported_block_is_retired(
        "ipc-proc-address",
        "cuIpcGetMemHandle refused (CUDA_ERROR_INVALID_VALUE)",
    );
}

/// Every lookup of a driver function hands out what the dynamic linker binds its name to:
/// kvhygiene's interposers of `cuIpcGetMemHandle` and of the lookups under LD_PRELOAD (the
/// real functions without it), the driver's own function for every other name; a failed
/// lookup, a missing output and a missing real lookup are answered as the lookup answers them.
#[test]
fn driver_lookups_hand_out_the_interposers_and_pass_everything_else_unchanged() {
    let Some(b) = built() else { return };
    let common = [
        ("ipc_as_linked", 4),
        ("lookups_as_linked", 4),
        ("unexported_lookup_unchanged", 1),
        ("others_as_linked", 2),
        ("rc_unknown_driver", 500),
        ("unknown_driver_null", 1),
        ("rc_unknown_runtime", 0),
        ("unknown_runtime_status", 1),
        ("unknown_runtime_null", 1),
        ("rc_no_output", 1),
        ("ptsz_output_untouched", 1),
        ("done", 1),
    ];
    let without = run(b, "entry-points", false, &[]);
    without.expect(&common);
    without.expect(&[("rc_ptsz", -1)]);
    let r = run(b, "entry-points", true, &[]);
    r.expect(&common);
    // cudaErrorSharedObjectSymbolNotFound: the fake runtime has no _ptsz entry points.
    r.expect(&[("rc_ptsz", 302)]);
}

fn an_exported_block_is_retired(scenario: &str, refusal: &str) {
    let Some(b) = built() else { return };
    let dir = fresh_log_dir(scenario);
    let r = run(
        b,
        scenario,
        true,
        &[("KVH_LOG_DIR", &dir.to_string_lossy())],
    );
    r.expect(&[
        ("rc_malloc", 0),
        ("rc_export", 0),
        ("rc_export_again", 0),
        ("real_exports", 2),
        ("rc_free", 0),
        ("rc_malloc_again", 0),
        ("secret_seen", 0),
        ("exported_blocks", 1),
        ("released", 1),
        ("pool_hits", 0),
        ("rc_export_no_handle", 1),
        ("rc_free_again", 0),
        ("exported_blocks_after", 1),
        ("released_after", 1),
        ("rc_export_freed", 1),
        ("freed_export_forwarded", 0),
        ("rc_managed", 0),
        ("rc_export_runtime", 0),
        ("runtime_export_forwarded", 1),
    ]);
    assert!(r.stderr.contains(refusal), "{}", r.stderr);
    one_export_and_its_release_are_logged(&dir);
}

#[test]
fn concurrent_engine_threads_only_ever_get_zeroed_memory() {
    let Some(b) = built() else { return };
    let without = run(b, "threads", false, &[]);
    without.expect(&[("threads_errors", 0), ("threads_allocations", 1600)]);
    assert!(
        without.get("threads_nonzero") > 0,
        "the fake runtime hands back freed secrets"
    );
    let r = run(b, "threads", true, &[]);
    r.expect(&[
        ("threads_allocations", 1600),
        ("threads_nonzero", 0),
        ("threads_errors", 0),
        ("kvh_invalid_frees", 0),
        ("real_cudaMalloc", 0),
    ]);
}

#[test]
fn a_capturing_stream_gets_the_runtimes_allocator_and_keeps_kvhygiene_blocks_live() {
    let Some(b) = built() else { return };
    let r = run(b, "capture", true, &[]);
    r.expect(&[
        ("rc_stream_create", 0),
        ("rc_malloc_before", 0),
        ("rc_malloc_sync_before", 0),
        // Captured: the runtime's cudaMallocAsync (a graph memory node), not a pooled block;
        // its free goes back to the runtime too.
        ("rc_malloc_captured", 0),
        ("captured_malloc_forwarded", 1),
        ("rc_free_captured", 0),
        ("captured_free_forwarded", 1),
        // A kvhygiene block is not freed into a capture, in stream order or synchronously
        // (the capture refuses cudaFree's device synchronisation): both stay live.
        ("rc_free_kvh_in_capture", 900),
        ("rc_cudafree_in_capture", 900),
        // Frees that would free nothing (a second free, interior pointers) are refused and
        // reach the core's log and counters during the capture too.
        ("rc_double_free_in_capture", 1),
        ("rc_interior_free_in_capture", 1),
        ("rc_interior_cudafree_in_capture", 1),
        // Another stream is still served by kvhygiene.
        ("rc_malloc_other_stream", 0),
        ("other_stream_forwarded", 0),
        // After the capture the blocks are freed once, without double frees.
        ("rc_free_kvh_after", 0),
        ("rc_cudafree_after", 0),
        ("rc_free_other", 0),
        // The per-thread stream capturing, asked about on the calling thread: forwarded to
        // the runtime's cudaMallocAsync_ptsz, which this runtime lacks.
        ("rc_malloc_ptsz_captured", 302),
        ("kvh_invalid_frees", 3),
    ]);
}

#[test]
fn per_thread_stream_frees_synchronise_the_calling_threads_stream() {
    let Some(b) = built() else { return };
    let r = run(b, "per-thread", true, &[]);
    r.expect(&[
        ("rc_malloc_ptsz", 0),
        ("ptsz_zero", 1),
        ("rc_free_ptsz", 0),
        // The free waited for cudaStreamPerThread, on the freeing thread itself.
        ("per_thread_syncs", 1),
        ("per_thread_synced_by_caller", 1),
        ("rc_malloc_per_thread", 0),
        ("rc_free_per_thread", 0),
        ("per_thread_syncs_plain", 1),
        ("per_thread_synced_by_caller_plain", 1),
        ("kvh_invalid_frees", 0),
    ]);
}

#[test]
fn a_destroyed_stream_is_synchronised_first_and_never_used_after() {
    let Some(b) = built() else { return };
    // A long batch delay keeps a's scrub open until the destroy submits it.
    let r = run(
        b,
        "streams",
        true,
        &[("KVH_BATCH_MAX_DELAY_US", "10000000")],
    );
    r.expect(&[
        ("rc_stream_create", 0),
        ("rc_malloc_a", 0),
        ("rc_malloc_b", 0),
        ("rc_free_a", 0),
        ("rc_destroy", 0),
        ("batches_submitted_at_destroy", 1),
        // Synchronised before the real destroy, which is called once.
        ("syncs_at_destroy", 1),
        ("real_destroys", 1),
        // The capture query refuses the destroyed stream: its error, and a NULL pointer.
        ("rc_malloc_on_destroyed", 400),
        ("malloc_on_destroyed_null", 1),
        // A block allocated on the destroyed stream is freed normally, and the block freed
        // just before the destroy is scrubbed.
        ("rc_free_b", 0),
        ("a_zero", 1),
        // A capture refusing the synchronisation: its error, nothing destroyed.
        ("rc_destroy_capturing", 900),
        ("real_destroys_capturing", 0),
        ("rc_destroy_after_capture", 0),
        ("rc_destroy_unknown", 0),
        ("syncs_for_unknown_destroy", 0),
        ("capture_mode_swaps", 1),
        // The per-thread handle is not the engine's stream: no synchronisation (the runtime
        // answers the destroy).
        ("rc_destroy_per_thread", 400),
        ("syncs_for_special_destroy", 0),
        ("dead_stream_uses", 0),
        ("kvh_invalid_frees", 0),
        // A synchronisation failing with another error than a capture's: the stream is
        // forgotten without submitting anything on it (the open batch is not submitted at
        // the destroy); the runtime's destroy is made.
        ("rc_malloc_y", 0),
        ("rc_free_y", 0),
        ("batches_submitted_at_failed_destroy", 0),
        ("real_destroys_failed_sync", 1),
        ("rc_destroy_failed_sync", 0),
        // The destroyed handle, handed to a new stream by the runtime, names nothing of
        // kvhygiene's: its destroy is the runtime's alone.
        ("rc_stream_create_reused", 0),
        ("handle_reused", 1),
        ("rc_destroy_reused", 0),
        ("syncs_for_reused_destroy", 0),
        ("batches_submitted_at_reused_destroy", 0),
        // The destroyed stream's open batch is scrubbed all the same, on the legacy stream.
        ("y_zero", 1),
    ]);
}

#[test]
fn a_forked_child_forwards_to_the_real_runtime() {
    let Some(b) = built() else { return };
    let r = run(b, "fork", true, &[]);
    r.expect(&[
        ("rc_malloc", 0),
        ("child_rc_malloc", 0),
        ("child_malloc_forwarded", 1),
        ("child_rc_free", 0),
        ("child_free_forwarded", 1),
        ("child_parent_free_forwarded", 1),
        ("child_exited_cleanly", 1),
        ("rc_free", 0),
        ("kvh_invalid_frees", 0),
    ]);
}

#[test]
fn a_child_forked_before_kvhygiene_started_is_still_served_and_scrubbed() {
    // A pre-fork launcher or server loads the library but never allocates; its workers run
    // the engine. Only a child forked after kvhygiene started forwards: these workers are
    // served and scrubbed, or the next request would read the previous one's secret.
    let Some(b) = built() else { return };
    let r = run(b, "fork-before-start", true, &[]);
    r.expect(&[
        ("child_exited_cleanly", 1),
        ("child_rc_malloc", 0),
        ("child_malloc_forwarded", 0),
        ("child_rc_free", 0),
        ("child_rc_malloc_again", 0),
        ("child_secret_seen", 0),
    ]);
}

#[test]
fn a_runtime_under_a_vendored_name_is_found_among_the_loaded_objects() {
    // As in the RTLD_LOCAL test, but the runtime is `libcudart-0a1b2c3d.so.12` (wheels
    // rename the libraries they bundle): no soname look-up finds it; the scan of loaded
    // objects does (without it, every forward below returns 302).
    let Some(b) = built() else { return };
    let mut cmd = Command::new(&b.plugin_host);
    cmd.arg(&b.vendored_plugin);
    let r = run_command(cmd, true, &[]);
    r.expect(&[
        ("rc_malloc", 0),
        ("rc_free", 0),
        ("rc_malloc_again", 0),
        ("reuse_zero", 1),
        ("rc_free_q", 0),
        ("rc_foreign_free", 0),
        ("real_frees_for_foreign", 1),
        ("real_cudaMalloc", 0),
    ]);
    assert!(!r.stderr.contains("is not loaded"), "{}", r.stderr);
}

#[test]
fn a_child_forked_while_the_first_allocation_prints_its_notice_can_still_allocate() {
    // The first allocation call of a process prints the start-up notice; another thread forks
    // meanwhile, before kvhygiene has started. Such a child is forked before start-up and must
    // be able to allocate (served, or forwarded), not wait for the parent's notice, which is
    // being written by a thread the child does not have.
    let Some(b) = built() else { return };
    let r = run(b, "fork-during-notice", true, &[]);
    r.expect(&[
        ("rc_first", 0),
        ("starter_blocked_in_notice", 1),
        ("child_hung", 0),
        ("child_exited_cleanly", 1),
        ("child_rc_malloc", 0),
    ]);
}

/// The unloadable runtime (`minimal_cudart.cpp`, soname `libcudart.so.12`) and
/// `unload_host.cpp`; `None` without a C++ compiler.
fn built_unload() -> Option<&'static (PathBuf, PathBuf)> {
    static BUILT: OnceLock<Option<(PathBuf, PathBuf)>> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let cxx =
                Cxx::in_dir(PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("preload-unload"));
            let soname = arg("-Wl,-soname,libcudart.so.12");
            let runtime = cxx.build("libcudart.so.12", true, &["minimal_cudart.cpp"], &[soname])?;
            let host = cxx.build("unload_host", false, &["unload_host.cpp"], &[arg("-ldl")])?;
            Some((runtime, host))
        })
        .as_ref()
}

#[test]
fn a_runtime_found_in_the_global_scope_stays_usable_after_its_loader_closes_it() {
    // A host dlopens the runtime with RTLD_GLOBAL, calls cudaFree(NULL), dlcloses it, and
    // calls cudaFree(NULL) again. Without the interposer the loader keeps the runtime loaded
    // (the host's look-up made it a dependency) and the second call succeeds. With it, the
    // function the interposer found must stay usable too: the runtime is kept loaded for the
    // life of the process, as real.rs says of every runtime it finds.
    let Some((runtime, host)) = built_unload() else {
        skip::skipped("no C++ compiler for the unloadable runtime");
        return;
    };
    let mut cmd = Command::new(host);
    cmd.arg(runtime);
    let without = run_command(cmd, false, &[]);
    without.expect(&[
        ("kvh_loaded", 0),
        ("rc_free_null", 0),
        ("rc_free_null_after_dlclose", 0),
    ]);
    let mut cmd = Command::new(host);
    cmd.arg(runtime);
    let r = run_command(cmd, true, &[]);
    r.expect(&[
        ("kvh_loaded", 1),
        ("rc_free_null", 0),
        ("rc_free_null_after_dlclose", 0),
    ]);
}

/// `exit_host.cpp`, linked against the stand-in runtime of [`built`] and
/// `libexit_engine.so` (`exit_engine.cpp`); `None` without a C++ compiler.
fn built_exit_host() -> Option<&'static PathBuf> {
    static BUILT: OnceLock<Option<PathBuf>> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let b = built()?;
            let cxx = Cxx::in_dir(b.probe.parent().expect("the build directory").to_path_buf());
            let runtime = path_arg(&cxx.dir.join("libcudart.so.12"));
            let rpath = cxx.rpath();
            let engine_links = [runtime.clone(), rpath.clone()];
            let engine = cxx.build(
                "libexit_engine.so",
                true,
                &["exit_engine.cpp"],
                &engine_links,
            )?;
            let host_links = [path_arg(&engine), runtime, rpath, arg("-ldl")];
            let host = cxx.build("exit_host", false, &["exit_host.cpp"], &host_links)?;
            Some(host)
        })
        .as_ref()
}

#[test]
fn a_first_allocation_in_a_linked_librarys_static_destructor_is_refused_at_exit() {
    // docs/cuda.md: the exit watch the interposer library registers when it is loaded runs
    // after the main program's static destructors but before those of the shared libraries
    // the program links, which the loader initialises before an LD_PRELOAD library. A first
    // allocation in the program's destructor still starts kvhygiene; one in a linked
    // library's is refused (fails closed) with cudaErrorCudartUnloading and a NULL pointer.
    let Some(host) = built_exit_host() else {
        skip::skipped("no C++ compiler for the exit host");
        return;
    };
    for (which, key) in [("main", "main_dtor"), ("library", "library_dtor")] {
        let rc = format!("{key}_rc");
        let null = format!("{key}_null");
        let mut cmd = Command::new(host);
        cmd.arg(which);
        let without = run_command(cmd, false, &[]);
        without.expect(&[("kvh_loaded", 0), (&rc, 0), (&null, 0)]);
        let mut cmd = Command::new(host);
        cmd.arg(which);
        let r = run_command(cmd, true, &[]);
        let refused = which == "library";
        r.expect(&[
            ("kvh_loaded", 1),
            (&rc, if refused { 4 } else { 0 }),
            (&null, i64::from(refused)),
        ]);
    }
}

#[test]
fn a_free_of_a_block_returned_to_the_device_is_the_runtimes_to_answer() {
    // The engine frees a kvhygiene block, an empty-cache returns it to the device, and the
    // engine frees it again (synchronously, then the same in stream order). kvhygiene no
    // longer holds the address, which may hold an allocation made since outside it: the free
    // goes to the runtime, whose answer (here: nothing allocated there) the caller gets, and
    // kvhygiene records no invalid free of memory it does not hold.
    let Some(b) = built() else { return };
    let r = run(b, "released-double-free", true, &[]);
    r.expect(&[
        ("rc_malloc", 0),
        ("rc_free", 0),
        ("rc_double_free", 1),
        ("real_frees_for_double", 1),
        ("rc_malloc_async", 0),
        ("rc_free_async", 0),
        ("rc_double_free_async", 1),
        ("real_async_frees_for_double", 1),
        ("kvh_invalid_frees", 0),
    ]);
}

#[test]
fn a_child_forked_while_a_missing_runtime_function_is_reported_can_still_allocate() {
    // Before kvhygiene starts, one thread's call reaches a runtime function that is not
    // loaded, and the interposer's report of it is being written to stderr (a full pipe) when
    // another thread forks. The child is forked before start-up: it must be served as any
    // process is, not wait for a lock held by the reporting thread, which it does not have.
    let Some(b) = built() else { return };
    let r = run(b, "fork-during-symbol-report", true, &[]);
    r.expect(&[
        ("reporter_blocked_in_write", 1),
        ("child_hung", 0),
        ("child_exited_cleanly", 1),
        ("child_rc_malloc", 0),
        ("rc_reporter", 302),
    ]);
}

#[test]
fn an_allocation_after_kvh_shutdown_before_start_up_says_why_it_is_refused() {
    // The engine calls kvh_shutdown (exported by the interposer library) before its first
    // allocation; kvhygiene never starts and the allocation is refused with a NULL pointer.
    // The engine learns why: either the code an allocation gets after a shutdown of a started
    // kvhygiene (cudaErrorCudartUnloading, 4), or, with cudaErrorInitializationError (3),
    // the reason on stderr, as that code promises ("the reason is on stderr").
    let Some(b) = built() else { return };
    let r = run(b, "shutdown-before-start", true, &[]);
    r.expect(&[("early_shutdown_is_null", 1), ("real_cudaMalloc", 0)]);
    let rc = r.get("rc_malloc_after_early_shutdown");
    assert!(
        rc == 4 || (rc == 3 && r.stderr.contains("kvh_shutdown")),
        "the allocation after an early kvh_shutdown returned {rc} and stderr does not say \
         why:\n{}",
        r.stderr
    );
}

#[test]
fn a_child_forked_after_a_c_api_start_up_refuses_allocations_under_an_invalid_switch() {
    // An invalid KVH_PRELOAD fails allocations closed. The process started kvhygiene through
    // the C API the library also exports (kvh_init), then forks: the child must refuse its
    // allocations as the parent does (NULL pointer, cudaErrorInitializationError), not
    // forward them to the runtime, whose memory is not scrubbed.
    let Some(b) = built() else { return };
    let r = run(b, "fork-after-c-api-start", true, &[("KVH_PRELOAD", "of")]);
    r.expect(&[
        ("rc_kvh_init", 0),
        ("rc_malloc", 3),
        ("child_exited_cleanly", 1),
        ("child_rc_malloc", 3),
        ("child_malloc_forwarded", 0),
        ("child_malloc_is_null", 1),
    ]);
}

#[test]
fn a_child_forked_after_a_c_api_start_up_does_not_announce_that_kvhygiene_serves_it() {
    // README: "a notice on stderr names the library and what it does". In a child forked
    // after kvhygiene started in its parent, every call is forwarded (module docs): its
    // allocations are the runtime's, not scrubbed. Here the parent started kvhygiene through
    // the C API (kvh_init) and made no interposed call; the child's cudaMalloc is forwarded,
    // and nothing on stderr may say that its allocations are served by kvhygiene and
    // scrubbed.
    let Some(b) = built() else { return };
    let r = run(b, "fork-after-c-api-start-only", true, &[]);
    r.expect(&[
        ("rc_kvh_init", 0),
        ("child_exited_cleanly", 1),
        ("child_rc_malloc", 0),
        ("child_malloc_forwarded", 1),
    ]);
    assert!(
        !r.stderr.contains("served by kvhygiene"),
        "a child that forwards its allocations announced that kvhygiene serves them:\n{}",
        r.stderr
    );
}

#[test]
fn a_child_forked_after_a_c_api_start_up_only_refuses_allocations_under_an_invalid_switch() {
    // Module docs: "In a forked child of the process that started kvhygiene, every call is
    // forwarded, but under an invalid `KVH_PRELOAD`, whose allocations are refused there as
    // in the parent." Here the parent started kvhygiene through the C API (kvh_init) and
    // made no interposed call before forking, under KVH_PRELOAD=of. The child's cudaMalloc
    // must be refused (cudaErrorInitializationError, nothing forwarded), as the parent's
    // would be, not handed the runtime's unscrubbed memory.
    let Some(b) = built() else { return };
    let r = run(
        b,
        "fork-after-c-api-start-only",
        true,
        &[("KVH_PRELOAD", "of")],
    );
    r.expect(&[
        ("rc_kvh_init", 0),
        ("child_exited_cleanly", 1),
        ("child_rc_malloc", 3),
        ("child_malloc_forwarded", 0),
    ]);
}

#[test]
fn the_notice_of_an_invalid_switch_quotes_the_value_that_decided_the_mode() {
    // The notice says what the interposers do and why: under an invalid KVH_PRELOAD it
    // quotes the value it judged invalid. The mode is read when the library is loaded; a
    // program that then sets KVH_PRELOAD=off before its first cudaMalloc still has its
    // allocations refused (the value read at load, "of"), so the notice must quote "of", and
    // never call "off" (an accepted value) invalid.
    let Some(b) = built() else { return };
    let r = run(
        b,
        "setenv-before-first-malloc",
        true,
        &[("KVH_PRELOAD", "of"), ("PROBE_NEW_PRELOAD", "off")],
    );
    let notices: Vec<&str> = r
        .stderr
        .lines()
        .filter(|l| l.starts_with("kvhygiene-preload "))
        .collect();
    assert_eq!(notices.len(), 1, "one notice: {}", r.stderr);
    // Read at load: the later KVH_PRELOAD=off changes nothing.
    r.expect(&[("rc_malloc", 3)]);
    assert!(
        notices[0].contains("KVH_PRELOAD=\"of\" is invalid"),
        "the allocation was refused for KVH_PRELOAD=\"of\", but the notice says: {}",
        notices[0]
    );
    assert!(!notices[0].contains("\"off\""), "{}", notices[0]);
}

#[test]
fn allocations_refused_for_an_invalid_switch_in_a_forked_child_are_explained_by_the_notice() {
    // README: "a notice on stderr names the library and what it does"; under an invalid
    // KVH_PRELOAD it says the value is invalid and that CUDA allocations fail. Here the parent
    // started kvhygiene through the C API (kvh_init) and made no interposed call, so it printed
    // no notice; its forked child's cudaMalloc is refused (cudaErrorInitializationError). That
    // refusal is the first interposed call of the process tree: the notice naming the invalid
    // value must appear on stderr, or nothing says why the allocation failed.
    let Some(b) = built() else { return };
    let r = run(
        b,
        "fork-after-c-api-start-only",
        true,
        &[("KVH_PRELOAD", "of")],
    );
    r.expect(&[("child_exited_cleanly", 1), ("child_rc_malloc", 3)]);
    assert!(
        r.stderr.contains("KVH_PRELOAD=\"of\" is invalid"),
        "the child's allocation was refused for KVH_PRELOAD=\"of\", and no notice says so:\n{}",
        r.stderr
    );
}

#[test]
fn a_per_thread_stream_ordered_allocation_leaves_another_threads_capture_alone() {
    // lib.rs: a synchronisation the runtime's own call would not make runs in the relaxed
    // capture mode, since under the global mode (the runtime's default) another thread's
    // graph capture counts it as unsafe and is invalidated. The runtime's cudaMallocAsync on
    // the per-thread default stream makes no synchronisation at all, so an engine thread that
    // allocates that way while another thread captures a graph must not make one outside
    // the relaxed mode (the real runtime would refuse it and invalidate the capture).
    let Some(b) = built() else { return };
    let without = run(b, "per-thread-alloc-during-capture", false, &[]);
    without.expect(&[("rc_malloc_per_thread", 0), ("unsafe_syncs_per_thread", 0)]);
    let r = run(b, "per-thread-alloc-during-capture", true, &[]);
    r.expect(&[
        ("rc_stream_create", 0),
        ("rc_malloc_per_thread", 0),
        ("unsafe_syncs_per_thread", 0),
        ("rc_malloc_ptsz", 0),
        ("unsafe_syncs_ptsz", 0),
    ]);
}

#[test]
fn a_large_allocation_the_device_has_room_for_is_served() {
    // cudaMalloc returns cudaErrorMemoryAllocation when the device cannot hold the request.
    // Engines size one large buffer (a KV cache pool) from the free memory, close to all of
    // it; the interposed cudaMalloc must serve a request the runtime would serve. Here the
    // "device" is the probe's address space, limited to the request plus 16 MiB.
    // One malloc arena: a thread's own arena reserves 64 MiB of address space when it first
    // allocates, which would count against the limit at a moment of its choosing.
    let one_arena = [("MALLOC_ARENA_MAX", "1")];
    let Some(b) = built() else { return };
    let without = run(b, "large-allocation-that-fits", false, &one_arena);
    without.expect(&[
        ("rc_limit", 0),
        ("rc_malloc_large", 0),
        ("large_is_null", 0),
    ]);
    let r = run(b, "large-allocation-that-fits", true, &one_arena);
    r.expect(&[
        ("rc_warm", 0),
        ("rc_limit", 0),
        ("rc_malloc_large", 0),
        ("large_is_null", 0),
        ("rc_free_large", 0),
    ]);
}

#[test]
fn a_forwarded_allocation_whose_real_function_is_missing_leaves_the_output_null() {
    // An allocation the interposer forwards (size 0; a stream capturing a graph) to a real
    // function the loaded runtime lacks (this runtime has no cudaMallocAsync_ptsz) fails
    // with cudaErrorSharedObjectSymbolNotFound. As every other failed allocation, it leaves
    // the output pointer NULL, never the caller's previous value.
    let Some(b) = built() else { return };
    let r = run(b, "forwarded-allocation-without-real-function", true, &[]);
    r.expect(&[
        ("rc_malloc_ptsz_zero", 302),
        ("zero_is_null", 1),
        ("rc_stream_create", 0),
        ("rc_malloc_ptsz_capturing", 302),
        ("capturing_is_null", 1),
        ("done", 1),
    ]);
}

#[test]
fn a_stream_ordered_allocation_on_a_capturing_stream_is_refused_when_kvhygiene_did_not_start() {
    // docs/cuda.md, Errors: an allocation under a kvhygiene that did not start (configuration,
    // backend, log) gets cudaErrorInitializationError, and a child forked after such a start-up
    // refuses allocations rather than take the runtime's memory. Under an invalid KVH_PRELOAD
    // (the other fail-closed state) a cudaMallocAsync on a capturing stream is refused too.
    // With an invalid policy (KVH_BATCH_SIZE=0) the same call must fail the same way: NULL
    // pointer, cudaErrorInitializationError, nothing handed to the runtime's allocator.
    let Some(b) = built() else { return };
    let refused_switch = run(b, "captured-allocation", true, &[("KVH_PRELOAD", "of")]);
    refused_switch.expect(&[
        ("rc_malloc_captured", 3),
        ("captured_malloc_forwarded", 0),
        ("captured_is_null", 1),
    ]);
    let r = run(b, "captured-allocation", true, &[("KVH_BATCH_SIZE", "0")]);
    r.expect(&[
        ("rc_stream_create", 0),
        ("rc_malloc_captured", 3),
        ("captured_malloc_forwarded", 0),
        ("captured_is_null", 1),
    ]);
}

#[test]
fn without_the_interposer_a_device_reset_destroys_unscrubbed_secrets() {
    let Some(b) = built() else { return };
    for scenario in ["device-reset", "thread-exit"] {
        let r = run(b, scenario, false, &[]);
        r.expect(&[
            ("rc_reset", 0),
            ("real_resets", 1),
            ("held_zero", 0),
            ("freed_zero", 0),
        ]);
    }
}

/// The probe's `scenario` (`device-reset` or `thread-exit`) with the interposer: the reset
/// destroys the context kvhygiene's pools live in. Before it: the device is synchronised, the
/// block still handed out and the one freed just before are scrubbed, and the forensic log
/// is closed with its stop record; then the real function of the same name is called, and
/// only it. After it, the engine's free of a pointer into the reset memory goes to the
/// runtime, and allocations are refused (NULL), with the reason on stderr: kvhygiene does not
/// serve out of a destroyed context (nor its pooled block of the reset device).
fn check_reset_scrubs_the_devices_blocks_and_shuts_kvhygiene_down_first(scenario: &str) {
    let Some(b) = built() else { return };
    let dir = fresh_log_dir(scenario);
    let r = run(
        b,
        scenario,
        true,
        &[("KVH_LOG_DIR", &dir.to_string_lossy())],
    );
    r.expect(&[
        ("rc_malloc_held", 0),
        ("rc_malloc_freed", 0),
        ("rc_free_freed", 0),
        ("rc_reset", 0),
        ("real_resets", 1),
        ("other_real_resets", 0),
        ("synced_for_reset", 1),
        ("held_zero", 1),
        ("freed_zero", 1),
        ("real_frees_after_reset", 1),
        ("rc_malloc_after_reset", 4),
        ("after_reset_is_null", 1),
        ("real_mallocs_after_reset", 0),
    ]);
    assert!(r.stderr.contains("cudaDeviceReset"), "{}", r.stderr);
    let log = log_text(&dir);
    let kinds: Vec<&str> = log
        .lines()
        .filter_map(|l| l.split(r#""kind":""#).nth(1)?.split('"').next())
        .collect();
    assert_eq!(kinds.last(), Some(&"stop"), "{log}");
    assert!(
        !kinds
            .iter()
            .any(|k| *k == "invalid_free" || *k == "verify_failed"),
        "the reset's frees are neither invalid nor failed: {log}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_device_reset_scrubs_the_devices_blocks_and_shuts_kvhygiene_down_first() {
    check_reset_scrubs_the_devices_blocks_and_shuts_kvhygiene_down_first("device-reset");
}

#[test]
fn a_thread_exit_resets_as_a_device_reset_does() {
    // cudaThreadExit is the deprecated form of cudaDeviceReset, still in the CUDA 12
    // runtime: the same reset, handled the same way.
    check_reset_scrubs_the_devices_blocks_and_shuts_kvhygiene_down_first("thread-exit");
}

#[test]
fn a_device_reset_refused_by_a_capture_changes_nothing() {
    let Some(b) = built() else { return };
    for scenario in ["device-reset-during-capture", "thread-exit-during-capture"] {
        let r = run(b, scenario, true, &[]);
        r.expect(&[
            ("rc_reset", 900),
            ("real_resets", 0),
            ("held_kept", 1),
            ("rc_malloc_after_refused_reset", 0),
            ("rc_free_held", 0),
            ("rc_free_again", 0),
        ]);
    }
}

#[test]
fn after_a_device_reset_the_c_api_hands_out_nothing_of_the_reset_device() {
    // kvh_malloc, exported by the same library, allocates from the same pools: a clean pooled
    // block of the reset device is memory the reset destroyed, and is not handed out.
    let Some(b) = built() else { return };
    let r = run(b, "device-reset-c-api-malloc", true, &[("KVH_OOM", "null")]);
    r.expect(&[
        ("rc_malloc_pooled", 0),
        ("rc_free_pooled", 0),
        ("rc_reset", 0),
        ("c_api_after_reset_is_reset_block", 0),
        ("c_api_after_reset_is_null", 1),
    ]);
}

#[test]
fn after_a_device_reset_a_captured_allocation_on_that_device_is_refused() {
    // docs/cuda.md: allocations on the reset device are refused with cudaErrorCudartUnloading
    // and a NULL pointer; nothing reaches the runtime.
    let Some(b) = built() else { return };
    let r = run(b, "device-reset-then-captured-allocation", true, &[]);
    r.expect(&[
        ("rc_reset", 0),
        ("rc_malloc_captured_after_reset", 4),
        ("captured_after_reset_forwarded", 0),
        ("captured_after_reset_is_null", 1),
    ]);
}

#[test]
fn after_a_device_reset_the_c_api_free_of_a_block_the_reset_freed_is_no_invalid_free() {
    // The reset freed the block to kvhygiene itself; the engine's own free of it afterwards is
    // not a double free of the engine's (as a cudaFree of it, which goes to the runtime).
    let Some(b) = built() else { return };
    let r = run(b, "device-reset-c-api-free", true, &[("KVH_OOM", "null")]);
    r.expect(&[
        ("c_api_malloc_ok", 1),
        ("rc_reset", 0),
        ("kvh_invalid_frees", 0),
    ]);
}

#[test]
fn a_device_reset_that_fails_leaves_the_devices_blocks_kvhygienes() {
    // The runtime's reset failed after kvhygiene scrubbed the device's blocks and shut down:
    // the memory is still there and still kvhygiene's, so no free of it reaches the runtime.
    // The engine's free of the block the reset freed is accepted once; a second is refused.
    let Some(b) = built() else { return };
    let r = run(b, "device-reset-that-fails", true, &[]);
    r.expect(&[
        ("rc_malloc_held", 0),
        ("rc_reset", 999),
        ("real_resets", 1),
        ("held_zero", 1),
        ("rc_free_held", 0),
        ("rc_free_held_again", 1),
        ("real_frees_of_held", 0),
        ("rc_malloc_after_failed_reset", 4),
    ]);
}

#[test]
fn a_device_reset_that_fails_keeps_the_free_of_a_retired_block_kvhygienes() {
    // The reset's free of the engine's block retires it (KVH_MAX_REUSE=1), so its scrub
    // returns its memory to the device before the runtime's reset, which then fails. The engine's free of the block the reset freed is kvhygiene's,
    // accepted once, and does not reach the runtime.
    let Some(b) = built() else { return };
    let r = run(
        b,
        "device-reset-that-fails-retired",
        true,
        &[("KVH_MAX_REUSE", "1")],
    );
    r.expect(&[
        ("rc_malloc_held", 0),
        ("rc_reset", 999),
        ("rc_free_held", 0),
        ("real_frees_of_held", 0),
    ]);
}

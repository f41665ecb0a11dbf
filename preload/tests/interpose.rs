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

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

struct Built {
    probe: PathBuf,
    /// plugin_host.cpp, and plugin.cpp's library, which it loads with RTLD_LOCAL.
    plugin_host: PathBuf,
    plugin: PathBuf,
}

/// The fake runtime and the engine, compiled once per test process; `None` without a C++
/// compiler.
fn built() -> Option<&'static Built> {
    static BUILT: OnceLock<Option<Built>> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("preload-fake-cudart");
            std::fs::create_dir_all(&dir).expect("create the build directory");
            let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fake_cudart");
            let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".to_string());
            let runtime = dir.join("libcudart.so.12");
            let probe = dir.join("probe");
            let compiled = Command::new(&cxx)
                .args(["-shared", "-fPIC", "-std=c++17", "-O1", "-Wall"])
                .arg("-Wl,-soname,libcudart.so.12")
                .arg("-o")
                .arg(&runtime)
                .arg(src.join("fake_cudart.cpp"))
                .status();
            match compiled {
                Ok(s) if s.success() => {}
                other => {
                    eprintln!("no C++ compiler ({cxx}: {other:?}); skipping");
                    return None;
                }
            }
            let linked = Command::new(&cxx)
                .args(["-std=c++17", "-O1", "-Wall", "-o"])
                .arg(&probe)
                .arg(src.join("probe.cpp"))
                .arg(&runtime)
                .arg(format!("-Wl,-rpath,{}", dir.display()))
                .args(["-ldl", "-pthread"])
                .status()
                .expect("run the C++ compiler");
            assert!(linked.success(), "the probe did not compile");
            let plugin = dir.join("libengine.so");
            let plugin_built = Command::new(&cxx)
                .args(["-shared", "-fPIC", "-std=c++17", "-O1", "-Wall", "-o"])
                .arg(&plugin)
                .arg(src.join("plugin.cpp"))
                .arg(&runtime)
                .arg(format!("-Wl,-rpath,{}", dir.display()))
                .status()
                .expect("run the C++ compiler");
            assert!(plugin_built.success(), "the plugin did not compile");
            let plugin_host = dir.join("plugin_host");
            let host_built = Command::new(&cxx)
                .args(["-std=c++17", "-O1", "-Wall", "-o"])
                .arg(&plugin_host)
                .arg(src.join("plugin_host.cpp"))
                .arg("-ldl")
                .status()
                .expect("run the C++ compiler");
            assert!(host_built.success(), "the plugin host did not compile");
            Some(Built {
                probe,
                plugin_host,
                plugin,
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
    let output = cmd.output().expect("run the probe");
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
    // Every synchronous allocation waited for the legacy stream (fresh memory's zeroing).
    assert!(r.get("real_cudaStreamSynchronize") >= 4);
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
        ("real_cudaMallocPitch", 1),
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

#[test]
fn invalid_frees_through_the_runtime_api_reach_the_forensic_log() {
    let Some(b) = built() else { return };
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("preload-log-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let log_dir = dir.to_string_lossy().into_owned();
    let r = run(b, "main", true, &[("KVH_LOG_DIR", &log_dir)]);
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

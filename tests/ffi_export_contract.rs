//! Promises of include/kvhygiene.h about the exports' last error, their behaviour before the
//! process-wide allocator started and after `kvh_shutdown`, and the `oom` mode a failed
//! start-up keeps. Each case that needs the runtime runs in a child process of this test
//! binary, since the runtime is started once per process from its environment.

use std::path::PathBuf;
use std::process::Command;

use kvhygiene::ffi;

#[path = "fake_cuda/mod.rs"]
mod fake_cuda;
#[path = "skip/mod.rs"]
mod skip;

/// Marker telling a child which case to run (not a `KVH_` variable: the configuration refuses
/// unknown ones).
const CASE: &str = "FFI_EXPORT_CONTRACT_CASE";

fn in_child() -> bool {
    std::env::var_os(CASE).is_some()
}

/// Runs `test` of this binary in a child with the host backend and `env`.
fn child(test: &str, env: &[(&str, &str)]) -> (bool, String, String) {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env(CASE, "1")
        .env("KVH_BACKEND", "host");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kvh-ffi-contract-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `kvh_last_error`: "The calling thread's last result code (`KVH_OK` after a successful
/// call)". `kvh_clear_context` cannot fail, so after it the last error is `KVH_OK`, not the
/// code of whatever failed before it on the thread.
#[test]
fn kvh_clear_context_leaves_kvh_ok_as_the_last_error() {
    let long = std::ffi::CString::new("x".repeat(200)).unwrap();
    let rc = ffi::kvh_set_context(long.as_ptr(), std::ptr::null(), std::ptr::null());
    assert_eq!(rc, ffi::kvh_result::KVH_ERR_INVALID_CONTEXT as i32);
    ffi::kvh_clear_context();
    assert_eq!(
        ffi::kvh_last_error(),
        ffi::kvh_result::KVH_OK as u32,
        "after a successful kvh_clear_context, kvh_last_error still reports the earlier failure"
    );
}

/// `kvh_shutdown` succeeds (it has no failure to report), so the thread's last error is
/// `KVH_OK` afterwards, as after every successful call.
#[test]
fn kvh_shutdown_leaves_kvh_ok_as_the_last_error() {
    let name = "kvh_shutdown_leaves_kvh_ok_as_the_last_error";
    if in_child() {
        assert_eq!(ffi::kvh_init(), 0);
        ffi::kvh_free(0xdead_0000 as *mut _, 8, 0, std::ptr::null_mut());
        println!("BEFORE {}", ffi::kvh_last_error());
        ffi::kvh_shutdown();
        println!("AFTER {}", ffi::kvh_last_error());
        return;
    }
    let (ok, stdout, stderr) = child(name, &[("KVH_OOM", "null")]);
    assert!(ok && stdout.contains("BEFORE 7004"), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("AFTER 0"),
        "kvh_shutdown left the earlier free's error as the last error:\n{stdout}"
    );
}

/// `kvh_free`: "`ptr == NULL` is a no-op". A no-op does not start the allocator (backend,
/// forensic log `start` record, threads, metrics export) in a process that never allocated.
#[test]
fn kvh_free_of_null_does_not_start_the_allocator() {
    let name = "kvh_free_of_null_does_not_start_the_allocator";
    if in_child() {
        ffi::kvh_free(std::ptr::null_mut(), 0, 0, std::ptr::null_mut());
        let rc = ffi::kvh_free_checked(std::ptr::null_mut(), 0, 0, std::ptr::null_mut());
        println!(
            "RC {rc} STARTED {}",
            ffi::started_process_allocator().is_some()
        );
        return;
    }
    let dir = scratch("free-null");
    let logs = dir.join("logs");
    let (ok, stdout, stderr) = child(
        name,
        &[("KVH_OOM", "null"), ("KVH_LOG_DIR", logs.to_str().unwrap())],
    );
    let log_files = std::fs::read_dir(&logs).map(|d| d.count()).unwrap_or(0);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(ok && stdout.contains("RC 0"), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("STARTED false") && log_files == 0,
        "a free of NULL started the allocator ({log_files} files in the log directory):\n{stdout}"
    );
}

/// The same no-op when the configuration is invalid: a free of NULL has nothing to refuse, so
/// it succeeds rather than report the start-up error of an allocator it does not need.
#[test]
fn kvh_free_of_null_succeeds_when_the_configuration_is_invalid() {
    let name = "kvh_free_of_null_succeeds_when_the_configuration_is_invalid";
    if in_child() {
        let rc = ffi::kvh_free_checked(std::ptr::null_mut(), 0, 0, std::ptr::null_mut());
        ffi::kvh_free(std::ptr::null_mut(), 0, 0, std::ptr::null_mut());
        println!("CHECKED {rc} FREE {}", ffi::kvh_last_error());
        return;
    }
    let (ok, stdout, stderr) = child(name, &[("KVH_OOM", "null"), ("KVH_BATCH_SIZE", "0")]);
    assert!(ok, "{stdout}\n{stderr}");
    assert!(
        stdout.contains("CHECKED 0 FREE 0"),
        "a free of NULL reported an error:\n{stdout}"
    );
}

/// `kvh_shutdown`: "Later allocations are served only from clean pooled blocks (already
/// verified, no device call) ...; any other fails with `KVH_ERR_SHUTTING_DOWN`." Also when
/// the allocator had not started yet at the shutdown: a later allocation must not start it
/// and take fresh device memory that no scrub will ever verify after its free.
#[test]
fn an_allocation_after_kvh_shutdown_before_start_up_is_refused() {
    let name = "an_allocation_after_kvh_shutdown_before_start_up_is_refused";
    if in_child() {
        ffi::kvh_shutdown();
        let p = ffi::kvh_malloc(4096, 0, std::ptr::null_mut());
        println!("NULL {} CODE {}", p.is_null(), ffi::kvh_last_error());
        return;
    }
    let (ok, stdout, stderr) = child(name, &[("KVH_OOM", "null")]);
    assert!(ok, "{stdout}\n{stderr}");
    assert!(
        stdout.contains("NULL true CODE 7016"),
        "kvh_malloc after kvh_shutdown served fresh memory:\n{stdout}"
    );
}

/// `kvh_shutdown`: "The metrics file is written once more and then no longer (it goes stale,
/// which `kvh gate` evicts on)." A second `kvh_shutdown` (a language binding's exit hook and
/// an engine's destructor both calling it) must not write a fresh snapshot, which would keep
/// a process that no longer scrubs in rotation for another `--max-age`.
#[test]
fn a_second_kvh_shutdown_does_not_refresh_the_metrics_file() {
    let name = "a_second_kvh_shutdown_does_not_refresh_the_metrics_file";
    if in_child() {
        assert_eq!(ffi::kvh_init(), 0);
        ffi::kvh_shutdown();
        let path = std::env::var("KVH_METRICS_FILE").unwrap();
        let stamp = || {
            std::fs::read_to_string(&path)
                .unwrap()
                .lines()
                .find(|l| l.starts_with("kvh_snapshot_timestamp_seconds"))
                .map(str::to_string)
                .unwrap_or_default()
        };
        let first = stamp();
        std::thread::sleep(std::time::Duration::from_millis(1500));
        ffi::kvh_shutdown();
        let second = stamp();
        println!("FIRST [{first}]");
        println!("SECOND [{second}]");
        println!("SAME {}", first == second);
        return;
    }
    let dir = scratch("metrics");
    let file = dir.join("kvh.prom");
    let (ok, stdout, stderr) = child(
        name,
        &[
            ("KVH_OOM", "null"),
            ("KVH_METRICS_FILE", file.to_str().unwrap()),
            ("KVH_METRICS_INTERVAL_MS", "3600000"),
        ],
    );
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        ok && stdout.contains("FIRST [kvh_snapshot"),
        "{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains("SAME true"),
        "the second kvh_shutdown wrote a fresh metrics snapshot:\n{stdout}"
    );
}

/// In a child: one `kvh_malloc` of 4 KiB, its result printed as `RETURNED null=B code=N`.
fn print_malloc_result() {
    let p = ffi::kvh_malloc(4096, 0, std::ptr::null_mut());
    println!(
        "RETURNED null={} code={}",
        p.is_null(),
        ffi::kvh_last_error()
    );
}

/// `KVH_OOM` is read whatever its case, as the policy reads it: `NULL` asks for NULL also when
/// another variable is invalid and no policy was read. A C caller that cannot take a C++
/// exception must get NULL and `KVH_ERR_CONFIG`, not an exception unwinding through it.
#[test]
fn null_mode_in_upper_case_holds_when_another_variable_is_invalid() {
    let name = "null_mode_in_upper_case_holds_when_another_variable_is_invalid";
    if in_child() {
        return print_malloc_result();
    }
    let (ok, stdout, stderr) = child(name, &[("KVH_OOM", "NULL"), ("KVH_BATCH_SIZE", "0")]);
    assert!(
        ok && stdout.contains("RETURNED null=true code=7011"),
        "kvh_malloc did not return NULL with KVH_ERR_CONFIG under KVH_OOM=NULL:\n{stdout}\n{stderr}"
    );
}

/// `kvh_malloc`: "On failure (also when the runtime could not start): with the policy's
/// `oom = "throw"` (`KVH_OOM` or the `KVH_CONFIG` file ...) throws `std::bad_alloc`; with
/// `oom = "null"` returns NULL and sets the last error." A file that asks for `null` (a
/// caller that cannot take a C++ exception) is obeyed also when start-up fails because a
/// `KVH_*` variable is invalid: the child must get NULL and `KVH_ERR_CONFIG`, not an
/// exception unwinding through its C frames.
#[test]
fn null_mode_from_the_config_file_holds_when_an_environment_variable_is_invalid() {
    let name = "null_mode_from_the_config_file_holds_when_an_environment_variable_is_invalid";
    if in_child() {
        return print_malloc_result();
    }
    let dir = scratch("oom-file");
    let config = dir.join("kvh.toml");
    std::fs::write(&config, "oom = \"null\"\nbackend = \"host\"\n").unwrap();
    let (ok, stdout, stderr) = child(
        name,
        &[
            ("KVH_CONFIG", config.to_str().unwrap()),
            ("KVH_BATCH_SIZE", "0"),
        ],
    );
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        ok && stdout.contains("RETURNED null=true code=7011"),
        "kvh_malloc did not return NULL with KVH_ERR_CONFIG under the file's oom = \"null\":\n\
         {stdout}\n{stderr}"
    );
}

/// `kvh_stats_json` leaves the thread's last error unchanged when it answers; when it fails
/// because the allocator could not start, that failure is its result, and the start-up error,
/// with its reason, becomes the last error (language bindings build their exception from it).
#[test]
fn kvh_stats_json_reports_a_start_up_failure_as_its_last_error() {
    let name = "kvh_stats_json_reports_a_start_up_failure_as_its_last_error";
    if in_child() {
        let long = std::ffi::CString::new("x".repeat(200)).unwrap();
        let rc = ffi::kvh_set_context(long.as_ptr(), std::ptr::null(), std::ptr::null());
        let mut n = 0usize;
        let stats = ffi::kvh_stats_json(std::ptr::null_mut(), 0, &mut n);
        println!("SET {rc} STATS {stats} LAST {}", ffi::kvh_last_error());
        return;
    }
    let (ok, stdout, stderr) = child(name, &[("KVH_OOM", "null"), ("KVH_BATCH_SIZE", "0")]);
    assert!(
        ok && stdout.contains("SET 7010 STATS 7011"),
        "{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains("LAST 7011"),
        "kvh_stats_json failed without its start-up error as the last error:\n{stdout}"
    );
}

/// The same promise when the file alone is not a complete policy: it names the log and its
/// checkpoint directory, and the environment adds the signing key (a mounted Secret's path),
/// which together the library accepts. When another `KVH_*` variable is invalid, the file's
/// `oom = "null"` still holds: the caller gets NULL and `KVH_ERR_CONFIG`, not a C++ exception.
#[test]
fn null_mode_from_a_config_file_completed_by_the_environment_holds_when_a_variable_is_invalid() {
    let name = "null_mode_from_a_config_file_completed_by_the_environment_holds_when_a_variable_is_invalid";
    if in_child() {
        return print_malloc_result();
    }
    let dir = scratch("oom-file-split");
    let config = dir.join("kvh.toml");
    std::fs::write(
        &config,
        format!(
            "oom = \"null\"\nbackend = \"host\"\nlog_dir = \"{}\"\ncheckpoint_dir = \"{}\"\n",
            dir.join("log").display(),
            dir.join("ckpt").display()
        ),
    )
    .unwrap();
    // The policy without the invalid variable is accepted: the file and the environment
    // together are complete.
    let complete = kvhygiene::config::Config::from_vars(&[
        (
            "KVH_CONFIG".to_string(),
            config.to_str().unwrap().to_string(),
        ),
        (
            "KVH_SIGNING_KEY_FILE".to_string(),
            dir.join("signing.key").to_str().unwrap().to_string(),
        ),
    ]);
    assert!(complete.is_ok(), "{complete:?}");
    let (ok, stdout, stderr) = child(
        name,
        &[
            ("KVH_CONFIG", config.to_str().unwrap()),
            (
                "KVH_SIGNING_KEY_FILE",
                dir.join("signing.key").to_str().unwrap(),
            ),
            ("KVH_BATCH_SIZE", "0"),
        ],
    );
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        ok && stdout.contains("RETURNED null=true code=7011"),
        "kvh_malloc did not return NULL with KVH_ERR_CONFIG under the file's oom = \"null\":\n\
         {stdout}\n{stderr}"
    );
}

/// `kvh_shutdown`: "Orderly shutdown before process exit: scrubs and verifies everything
/// freed, writes the forensic log's stop record, ...". Two teardown paths on two threads
/// (an engine's destructor and a language binding's exit hook) may both call it; the one that
/// returns second must also find the stop record written, or a process that exits right
/// after its own call can end without it.
#[test]
fn a_concurrent_second_kvh_shutdown_returns_after_the_stop_record_is_written() {
    let name = "a_concurrent_second_kvh_shutdown_returns_after_the_stop_record_is_written";
    if in_child() {
        assert_eq!(ffi::kvh_init(), 0);
        let logs = PathBuf::from(std::env::var("KVH_LOG_DIR").unwrap());
        let alloc = ffi::started_process_allocator().unwrap();
        let first = std::thread::spawn(|| ffi::kvh_shutdown());
        while !alloc.is_shut_down() {
            std::hint::spin_loop();
        }
        ffi::kvh_shutdown();
        let stopped = std::fs::read_dir(&logs)
            .unwrap()
            .filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok())
            .any(|t| t.contains("\"kind\":\"stop\""));
        println!("STOPPED {stopped}");
        first.join().unwrap();
        return;
    }
    let dir = scratch("concurrent-shutdown");
    let logs = dir.join("logs");
    let (ok, stdout, stderr) = child(
        name,
        &[("KVH_OOM", "null"), ("KVH_LOG_DIR", logs.to_str().unwrap())],
    );
    let _ = std::fs::remove_dir_all(&dir);
    assert!(ok && stdout.contains("STOPPED"), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("STOPPED true"),
        "kvh_shutdown returned before the forensic log's stop record was written:\n{stdout}"
    );
}

/// A child forked while a `kvh_shutdown` is under way on another thread of its parent (an
/// engine's destructor in one thread, a worker forked from another) inherits nothing it may
/// wait on: the thread doing the shutdown does not exist in the child, so any lock it held at
/// the fork stays held there for ever. The child's own `kvh_shutdown` (a language binding's
/// exit hook, inherited with the process image) returns at once, as it does in any child
/// forked after start-up.
#[test]
fn kvh_shutdown_returns_in_a_child_forked_while_the_parent_shuts_down() {
    let name = "kvh_shutdown_returns_in_a_child_forked_while_the_parent_shuts_down";
    if in_child() {
        assert_eq!(ffi::kvh_init(), 0);
        let alloc = ffi::started_process_allocator().unwrap();
        let first = std::thread::spawn(|| ffi::kvh_shutdown());
        while !alloc.is_shut_down() {
            std::hint::spin_loop();
        }
        // Forks while the first call goes on (its stop record, its last metrics snapshot).
        let mut pids = Vec::new();
        loop {
            // SAFETY: the child calls one export and `_exit`s; it returns to no Rust frame.
            let pid = unsafe { libc::fork() };
            if pid == 0 {
                ffi::kvh_shutdown();
                unsafe { libc::_exit(0) };
            }
            assert!(pid > 0, "fork failed");
            pids.push(pid);
            if first.is_finished() || pids.len() >= 20 {
                break;
            }
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut hung = 0;
        for pid in &pids {
            let mut status = 0;
            loop {
                // SAFETY: waits for a child of this process.
                let r = unsafe { libc::waitpid(*pid, &mut status, libc::WNOHANG) };
                if r == *pid {
                    break;
                }
                if std::time::Instant::now() > deadline {
                    hung += 1;
                    // SAFETY: ends a child of this process that is still running.
                    unsafe {
                        libc::kill(*pid, libc::SIGKILL);
                        libc::waitpid(*pid, &mut status, 0);
                    }
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
        first.join().unwrap();
        println!("FORKED {} HUNG {hung}", pids.len());
        return;
    }
    let dir = scratch("fork-during-shutdown");
    let (ok, stdout, stderr) = child(
        name,
        &[
            ("KVH_OOM", "null"),
            ("KVH_LOG_DIR", dir.join("logs").to_str().unwrap()),
            ("KVH_METRICS_FILE", dir.join("kvh.prom").to_str().unwrap()),
        ],
    );
    let _ = std::fs::remove_dir_all(&dir);
    assert!(ok && stdout.contains("FORKED"), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("HUNG 0"),
        "kvh_shutdown never returned in a child forked during the parent's kvh_shutdown:\n{stdout}"
    );
}

/// `oom = "null"` in the `KVH_CONFIG` file holds also when another key of that same file is
/// invalid (the policy as a whole is refused, and the allocator does not start): the file's
/// `oom` key is read on its own, so the caller, which asked for NULL because it cannot take a
/// C++ exception, gets NULL and `KVH_ERR_CONFIG`, not `std::bad_alloc`.
#[test]
fn null_mode_from_a_config_file_holds_when_another_key_of_the_file_is_invalid() {
    let name = "null_mode_from_a_config_file_holds_when_another_key_of_the_file_is_invalid";
    if in_child() {
        return print_malloc_result();
    }
    let dir = scratch("oom-file-invalid-key");
    let config = dir.join("kvh.toml");
    std::fs::write(
        &config,
        "oom = \"null\"\nbackend = \"host\"\nbatch_size = 0\n",
    )
    .unwrap();
    assert!(kvhygiene::config::Config::from_file(&config).is_err());
    let (ok, stdout, stderr) = child(name, &[("KVH_CONFIG", config.to_str().unwrap())]);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        ok && stdout.contains("RETURNED null=true code=7011"),
        "kvh_malloc did not return NULL with KVH_ERR_CONFIG under the file's oom = \"null\" \
         (exit ok: {ok}):\n{stdout}\n{stderr}"
    );
}

/// `kvh_init`: "Returns `KVH_OK`, or ...: `KVH_ERR_SHUTTING_DOWN` (after `kvh_shutdown`)". A
/// caller that checks `kvh_init` before serving (a worker restarted in-process, a binding's
/// lazy start) must not be told the allocator is ready once it has been shut down, also when
/// it had started before the shutdown: from then on no fresh memory is served and no free is
/// scrubbed.
#[test]
fn kvh_init_after_kvh_shutdown_of_a_started_allocator_reports_shutting_down() {
    let name = "kvh_init_after_kvh_shutdown_of_a_started_allocator_reports_shutting_down";
    if in_child() {
        println!("FIRST {}", ffi::kvh_init());
        ffi::kvh_shutdown();
        println!("AFTER {} LAST {}", ffi::kvh_init(), ffi::kvh_last_error());
        return;
    }
    let (ok, stdout, stderr) = child(name, &[("KVH_OOM", "null")]);
    assert!(ok && stdout.contains("FIRST 0"), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("AFTER 7016 LAST 7016"),
        "kvh_init after kvh_shutdown did not report KVH_ERR_SHUTTING_DOWN:\n{stdout}"
    );
}

/// After `kvh_shutdown`, a checked free cannot wait for a scrub (none runs any more) and fails
/// with `KVH_ERR_SHUTTING_DOWN`. Its message says why: the allocator was shut down. The
/// process is not exiting (it called `kvh_shutdown` and goes on running), and the backend
/// reported no error, so a message blaming either sends the operator the wrong way.
#[test]
fn a_checked_free_after_kvh_shutdown_names_the_shutdown_in_its_message() {
    let name = "a_checked_free_after_kvh_shutdown_names_the_shutdown_in_its_message";
    if in_child() {
        let p = ffi::kvh_malloc(4096, 0, std::ptr::null_mut());
        ffi::kvh_shutdown();
        let rc = ffi::kvh_free_checked(p, 4096, 0, std::ptr::null_mut());
        let mut buf = vec![0u8; 1024];
        let mut len = 0usize;
        ffi::kvh_last_error_message(buf.as_mut_ptr().cast(), buf.len(), &mut len);
        println!(
            "RC {rc} MESSAGE {}",
            String::from_utf8_lossy(&buf[..len.min(buf.len())])
        );
        return;
    }
    let (ok, stdout, stderr) = child(name, &[("KVH_OOM", "null")]);
    assert!(ok && stdout.contains("RC 7016"), "{stdout}\n{stderr}");
    let message = stdout
        .lines()
        .find_map(|l| l.split_once("MESSAGE "))
        .map(|(_, m)| m.to_string())
        .unwrap_or_default();
    assert!(
        message.contains("shut")
            && !message.contains("exiting")
            && !message.contains("backend error"),
        "the message of a checked free after kvh_shutdown: {message}"
    );
}

/// `KVH_ERR_FORKED_CHILD` is "a child forked after kvhygiene started in its parent: the
/// allocator it inherited is the parent's". When the parent's start-up failed (an invalid
/// policy), there is no allocator to inherit: a worker forked afterwards reports the start-up
/// error it inherited, with its reason (the key to fix), not a forked-child refusal that
/// blames an allocator that never existed.
#[test]
fn a_child_forked_after_a_failed_start_up_reports_the_start_up_error() {
    let name = "a_child_forked_after_a_failed_start_up_reports_the_start_up_error";
    if in_child() {
        println!("PARENT {}", ffi::kvh_init());
        // SAFETY: the child calls two exports, prints and `_exit`s; it returns to no Rust frame.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            let rc = ffi::kvh_init();
            let mut buf = vec![0u8; 1024];
            let mut len = 0usize;
            ffi::kvh_last_error_message(buf.as_mut_ptr().cast(), buf.len(), &mut len);
            println!(
                "CHILD {rc} MESSAGE {}",
                String::from_utf8_lossy(&buf[..len.min(buf.len())])
            );
            // SAFETY: ends the forked child without running the parent's exit handlers.
            unsafe { libc::_exit(0) };
        }
        assert!(pid > 0, "fork failed");
        let mut status = 0;
        // SAFETY: waits for the child forked above.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        return;
    }
    let (ok, stdout, stderr) = child(name, &[("KVH_OOM", "null"), ("KVH_BATCH_SIZE", "0")]);
    assert!(ok && stdout.contains("PARENT 7011"), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("CHILD 7011") && stdout.contains("KVH_BATCH_SIZE"),
        "a child forked after a failed start-up did not report the start-up error:\n{stdout}"
    );
}

/// `kvh_empty_cache` returns nothing; its `kvh_last_error` says whether it ran: `KVH_OK`
/// before `kvh_shutdown`, `KVH_ERR_SHUTTING_DOWN` after it (no block is returned to the
/// device any more), so that a caller that reads it is not told the cache was emptied.
#[test]
fn kvh_empty_cache_after_kvh_shutdown_says_so() {
    let name = "kvh_empty_cache_after_kvh_shutdown_says_so";
    if in_child() {
        assert_eq!(ffi::kvh_init(), 0);
        ffi::kvh_empty_cache();
        println!("BEFORE {}", ffi::kvh_last_error());
        ffi::kvh_shutdown();
        ffi::kvh_empty_cache();
        println!("AFTER {}", ffi::kvh_last_error());
        return;
    }
    let (ok, stdout, stderr) = child(name, &[("KVH_OOM", "null")]);
    assert!(ok && stdout.contains("BEFORE 0"), "{stdout}\n{stderr}");
    assert!(stdout.contains("AFTER 7016"), "{stdout}\n{stderr}");
}

/// `kvh_synchronize`: "Before the allocator started, `KVH_OK`: nothing was freed", and after
/// `kvh_shutdown` `KVH_ERR_SHUTTING_DOWN` only "when blocks freed since (or left pending then)
/// were not scrubbed". A process that called `kvh_shutdown` before its allocator ever started
/// (a launcher's exit hook) freed nothing: it gets `KVH_OK`, as a process whose started
/// allocator was shut down with nothing pending does.
#[test]
fn kvh_synchronize_after_kvh_shutdown_before_start_up_has_nothing_left_unscrubbed() {
    let name = "kvh_synchronize_after_kvh_shutdown_before_start_up_has_nothing_left_unscrubbed";
    if in_child() {
        ffi::kvh_shutdown();
        println!(
            "SYNC {} LAST {}",
            ffi::kvh_synchronize(),
            ffi::kvh_last_error()
        );
        return;
    }
    let (ok, stdout, stderr) = child(name, &[("KVH_OOM", "null")]);
    assert!(ok && stdout.contains("SYNC "), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("SYNC 0 LAST 0"),
        "kvh_synchronize after a kvh_shutdown that came before start-up (nothing freed) \
         failed:\n{stdout}"
    );
}

/// `kvh_record_stream`: "Unknown pointers are ignored." Before the allocator started every
/// pointer is unknown, so the call has nothing to do: it does not start the allocator
/// (backend, forensic log `start` record, threads) in a process that never allocated, as
/// `kvh_free` of NULL and the query exports do not (a launcher that forks its workers
/// afterwards would leave each of them without an allocator).
#[test]
fn kvh_record_stream_of_an_unknown_pointer_does_not_start_the_allocator() {
    let name = "kvh_record_stream_of_an_unknown_pointer_does_not_start_the_allocator";
    if in_child() {
        ffi::kvh_record_stream(0xdead_0000 as *mut _, 0x5 as *mut _);
        println!(
            "LAST {} STARTED {}",
            ffi::kvh_last_error(),
            ffi::started_process_allocator().is_some()
        );
        return;
    }
    let dir = scratch("record-stream-unknown");
    let logs = dir.join("logs");
    let (ok, stdout, stderr) = child(
        name,
        &[("KVH_OOM", "null"), ("KVH_LOG_DIR", logs.to_str().unwrap())],
    );
    let log_files = std::fs::read_dir(&logs).map(|d| d.count()).unwrap_or(0);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(ok && stdout.contains("LAST 0"), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("STARTED false") && log_files == 0,
        "kvh_record_stream of a pointer kvhygiene never handed out started the allocator \
         ({log_files} files in the log directory):\n{stdout}\n{stderr}"
    );
}

/// `kvh_shutdown` before start-up keeps the allocator from ever starting, so no forensic log
/// will ever read `FORENSIC_HMAC_SECRET`. As after a start-up that failed (and as when the log
/// is off), the secret is then removed from the environment: it must not stay in
/// `/proc/<pid>/environ` or pass to the processes this one starts.
#[test]
fn kvh_shutdown_before_start_up_removes_the_hmac_secret_from_the_environment() {
    let name = "kvh_shutdown_before_start_up_removes_the_hmac_secret_from_the_environment";
    if in_child() {
        println!(
            "BEFORE {}",
            std::env::var_os("FORENSIC_HMAC_SECRET").is_some()
        );
        ffi::kvh_shutdown();
        println!(
            "AFTER {} INIT {}",
            std::env::var_os("FORENSIC_HMAC_SECRET").is_some(),
            ffi::kvh_init()
        );
        return;
    }
    let dir = scratch("shutdown-secret");
    let logs = dir.join("logs");
    let (ok, stdout, stderr) = child(
        name,
        &[
            ("KVH_OOM", "null"),
            ("KVH_LOG_DIR", logs.to_str().unwrap()),
            ("FORENSIC_HMAC_SECRET", "0123456789abcdef0123456789abcdef"),
        ],
    );
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        ok && stdout.contains("BEFORE true") && stdout.contains("INIT 7016"),
        "{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains("AFTER false"),
        "FORENSIC_HMAC_SECRET stayed in the environment of a process whose allocator can no \
         longer start:\n{stdout}"
    );
}

/// Invariant 6 (ARCHITECTURE.md): no backend call once process exit has begun; docs/cuda.md:
/// an allocation "after exit or `kvh_shutdown` began (also one that came before kvhygiene
/// started) that needs fresh memory" is refused (`KVH_ERR_SHUTTING_DOWN`). A first allocation
/// made by an exit handler that runs after the library's own exit watch (one registered
/// before the library was loaded, as a static destructor of a library loaded earlier is)
/// therefore does not start the allocator. The library is loaded with `dlopen` after the
/// handler is registered, as PyTorch loads a pluggable allocator.
///
/// `kvh_synchronize` after it: "Before the allocator started (also after a `kvh_shutdown`
/// that came first), `KVH_OK`: nothing was freed"; its `KVH_ERR_SHUTTING_DOWN` would mean
/// blocks were left unscrubbed, and none were.
#[test]
fn a_first_allocation_during_process_exit_does_not_start_the_allocator() {
    type Malloc = extern "C" fn(libc::ssize_t, libc::c_int, *mut libc::c_void) -> *mut libc::c_void;
    type LastError = extern "C" fn() -> u32;
    type Sync = extern "C" fn() -> libc::c_int;
    static EXPORTS: std::sync::OnceLock<(Malloc, LastError, Sync)> = std::sync::OnceLock::new();
    let name = "a_first_allocation_during_process_exit_does_not_start_the_allocator";
    if in_child() {
        extern "C" fn during_exit() {
            let Some((malloc, last_error, synchronize)) = EXPORTS.get() else {
                return;
            };
            let p = malloc(4096, 0, std::ptr::null_mut());
            let code = last_error();
            let line = format!(
                "EXIT-MALLOC null={} code={code} SYNC {}\n",
                p.is_null(),
                synchronize()
            );
            // SAFETY: writes a local buffer to stdout; no Rust stdout state is used this late.
            unsafe { libc::write(1, line.as_ptr().cast(), line.len()) };
        }
        // SAFETY: registers an `extern "C"` function that does not unwind.
        assert_eq!(unsafe { libc::atexit(during_exit) }, 0);
        let path = library_dir().join("libkvhygiene.so");
        // SAFETY: this build's libkvhygiene.so, whose constructor only registers handlers.
        let lib = unsafe { libloading::Library::new(&path) }.unwrap();
        // SAFETY: the exports' signatures, as include/kvhygiene.h declares them.
        let exports = unsafe {
            (
                *lib.get::<Malloc>(b"kvh_malloc").unwrap(),
                *lib.get::<LastError>(b"kvh_last_error").unwrap(),
                *lib.get::<Sync>(b"kvh_synchronize").unwrap(),
            )
        };
        EXPORTS.set(exports).unwrap();
        // Loaded for the life of the process, as a pluggable allocator is.
        std::mem::forget(lib);
        return;
    }
    let dir = scratch("first-alloc-at-exit");
    let logs = dir.join("logs");
    let (_, stdout, stderr) = child(
        name,
        &[("KVH_OOM", "null"), ("KVH_LOG_DIR", logs.to_str().unwrap())],
    );
    let log_files = std::fs::read_dir(&logs).map(|d| d.count()).unwrap_or(0);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(stdout.contains("EXIT-MALLOC"), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("EXIT-MALLOC null=true code=7016") && log_files == 0,
        "an allocation made after process exit began started the allocator and was served \
         fresh memory ({log_files} files in the log directory):\n{stdout}\n{stderr}"
    );
    assert!(
        stderr.contains("process exit had begun before the allocator started"),
        "{stderr}"
    );
    assert!(
        stdout.contains("SYNC 0"),
        "kvh_synchronize in a process whose allocator never started (its first allocation was \
         refused during exit, nothing was freed) reported blocks left unscrubbed:\n{stdout}"
    );
}

/// The directory holding this build's libkvhygiene.so (next to the test binary, or above).
fn library_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let deps = exe.parent().expect("test executable directory");
    [deps.to_path_buf(), deps.join("..")]
        .into_iter()
        .find(|d| d.join("libkvhygiene.so").is_file())
        .unwrap_or_else(|| panic!("libkvhygiene.so not found beside {}", deps.display()))
}

/// `kvh_inject_fault`: "the next `segments` scrubs leave half of their block unzeroed, so
/// verification must fail and quarantine them." The drill is for the detection path: it
/// fails whatever the block held, also a block whose caller never wrote to it (its bytes
/// read zero before the scrub), so a checked free of it reports `KVH_ERR_VERIFY_FAILED` and
/// the block is quarantined.
#[test]
fn kvh_inject_fault_fails_the_next_scrub_even_of_a_block_that_reads_zero() {
    let name = "kvh_inject_fault_fails_the_next_scrub_even_of_a_block_that_reads_zero";
    if in_child() {
        assert_eq!(ffi::kvh_init(), 0);
        let p = ffi::kvh_malloc(4096, 0, std::ptr::null_mut());
        assert!(!p.is_null());
        assert_eq!(ffi::kvh_inject_fault(1), 0);
        let rc = ffi::kvh_free_checked(p, 4096, 0, std::ptr::null_mut());
        let mut len = 0usize;
        ffi::kvh_stats_json(std::ptr::null_mut(), 0, &mut len);
        let mut buf = vec![0u8; len + 1];
        ffi::kvh_stats_json(buf.as_mut_ptr().cast(), buf.len(), &mut len);
        let stats: serde_json::Value = serde_json::from_slice(&buf[..len]).unwrap();
        println!(
            "RC {rc} FAILED {} QUARANTINED {}",
            stats["counters"]["verifications_failed"], stats["counters"]["quarantined"]
        );
        return;
    }
    let (ok, stdout, stderr) = child(name, &[("KVH_OOM", "null")]);
    assert!(ok && stdout.contains("RC "), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("RC 7009 FAILED 1 QUARANTINED 1"),
        "the scrub kvh_inject_fault(1) sabotaged verified (a block that read zero):\n{stdout}"
    );
}

/// `kvh_stats_json`: "After a `kvh_shutdown` (or the start of process exit) that came before
/// start-up, `{"started":false,"shut_down":true,...}`." A health check or exit hook that reads
/// the counters once process exit has begun, in a process whose allocator never started, is
/// told that it will not start: it is shut down, as a first allocation then finds (it is
/// refused with `KVH_ERR_SHUTTING_DOWN`). The reading comes before any allocation. The
/// library is loaded with `dlopen` after the exit handler is registered, so that the handler
/// runs after the library's exit watch.
#[test]
fn kvh_stats_json_during_process_exit_before_start_up_says_shut_down() {
    type Stats = extern "C" fn(*mut libc::c_char, usize, *mut usize) -> libc::c_int;
    static STATS: std::sync::OnceLock<Stats> = std::sync::OnceLock::new();
    let name = "kvh_stats_json_during_process_exit_before_start_up_says_shut_down";
    if in_child() {
        extern "C" fn during_exit() {
            let Some(stats) = STATS.get() else {
                return;
            };
            let mut buf = [0u8; 4096];
            let mut len = 0usize;
            let rc = stats(buf.as_mut_ptr().cast(), buf.len(), &mut len);
            let json = String::from_utf8_lossy(&buf[..len.min(buf.len())]).into_owned();
            let line = format!("EXIT-STATS rc={rc} {json}\n");
            // SAFETY: writes a local buffer to stdout; no Rust stdout state is used this late.
            unsafe { libc::write(1, line.as_ptr().cast(), line.len()) };
        }
        // SAFETY: registers an `extern "C"` function that does not unwind.
        assert_eq!(unsafe { libc::atexit(during_exit) }, 0);
        let path = library_dir().join("libkvhygiene.so");
        // SAFETY: this build's libkvhygiene.so, whose constructor only registers handlers.
        let lib = unsafe { libloading::Library::new(&path) }.unwrap();
        // SAFETY: the export's signature, as include/kvhygiene.h declares it.
        let stats = unsafe { *lib.get::<Stats>(b"kvh_stats_json").unwrap() };
        STATS.set(stats).unwrap();
        std::mem::forget(lib);
        return;
    }
    let (_, stdout, stderr) = child(name, &[("KVH_OOM", "null")]);
    let line = stdout
        .lines()
        .find(|l| l.starts_with("EXIT-STATS"))
        .unwrap_or_else(|| panic!("no reading at exit:\n{stdout}\n{stderr}"));
    assert!(line.contains("rc=0"), "{line}");
    assert!(
        line.contains("\"started\":false") && line.contains("\"shut_down\":true"),
        "kvh_stats_json once process exit had begun, before start-up, did not say the \
         allocator is shut down: {line}"
    );
}

/// Invariant 6 (ARCHITECTURE.md): "no backend call is made once process exit has begun";
/// docs/cuda.md: an allocation after exit began that needs fresh memory is refused
/// (`KVH_ERR_SHUTTING_DOWN`). That holds also when exit begins while another thread's
/// start-up is still under way (a SIGTERM handler calling `exit()` while a worker thread
/// opens the device): a start-up that finishes after the exit watch ran serves no fresh
/// memory, and makes no driver call, to an exit handler that runs after the watch. Here the
/// start-up is held inside the driver's occupancy query (the stand-in driver's hook) until
/// the exit handler runs; the library is loaded with `dlopen` after that handler is
/// registered, so that the handler runs after the library's exit watch.
#[test]
fn a_start_up_under_way_when_exit_begins_serves_no_fresh_memory_during_exit() {
    use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
    use std::time::{Duration, Instant};
    type Init = extern "C" fn() -> libc::c_int;
    type Malloc = extern "C" fn(libc::ssize_t, libc::c_int, *mut libc::c_void) -> *mut libc::c_void;
    type LastError = extern "C" fn() -> u32;
    type Query = unsafe extern "C" fn(i32) -> i32;
    static EXPORTS: std::sync::OnceLock<(Malloc, LastError, Query)> = std::sync::OnceLock::new();
    static IN_START: AtomicBool = AtomicBool::new(false);
    static EXIT_BEGUN: AtomicBool = AtomicBool::new(false);
    static INIT_DONE: AtomicBool = AtomicBool::new(false);
    static INIT_RC: AtomicI32 = AtomicI32::new(-1);
    fn wait_for(flag: &AtomicBool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !flag.load(Ordering::SeqCst) {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }
    let name = "a_start_up_under_way_when_exit_begins_serves_no_fresh_memory_during_exit";
    if in_child() {
        /// Inside the start-up's occupancy query: holds it until process exit has begun.
        extern "C" fn held_start_up() {
            IN_START.store(true, Ordering::SeqCst);
            wait_for(&EXIT_BEGUN);
        }
        extern "C" fn during_exit() {
            let Some((malloc, last_error, calls)) = EXPORTS.get() else {
                return;
            };
            // SAFETY: the stand-in's call counter, `int(int)`.
            let before = unsafe { calls(0) };
            EXIT_BEGUN.store(true, Ordering::SeqCst);
            let finished = wait_for(&INIT_DONE);
            let p = malloc(4096, 0, std::ptr::null_mut());
            let code = last_error();
            // SAFETY: as above.
            let after = unsafe { calls(0) };
            let line = format!(
                "EXIT-MALLOC init_finished={finished} init={} null={} code={code} \
                 driver_calls_during_exit={}\n",
                INIT_RC.load(Ordering::SeqCst),
                p.is_null(),
                after - before
            );
            // SAFETY: writes a local buffer to stdout; no Rust stdout state is used this late.
            unsafe { libc::write(1, line.as_ptr().cast(), line.len()) };
        }
        // SAFETY: registers an `extern "C"` function that does not unwind.
        assert_eq!(unsafe { libc::atexit(during_exit) }, 0);
        // SAFETY: the stand-in driver (LD_LIBRARY_PATH), which kvhygiene then loads by the same
        // name: one instance, whose switches hold for the library's calls.
        let driver = unsafe { libloading::Library::new("libcuda.so.1") }.expect("fake driver");
        // SAFETY: the stand-in's switches: `void(void (*)(void))` and `int(int)`.
        let calls = unsafe {
            driver
                .get::<unsafe extern "C" fn(extern "C" fn())>(b"fake_cuda_on_occupancy\0")
                .expect("hook")(held_start_up);
            *driver.get::<Query>(b"fake_cuda_calls\0").expect("calls")
        };
        let path = library_dir().join("libkvhygiene.so");
        // SAFETY: this build's libkvhygiene.so, whose constructor only registers handlers.
        let lib = unsafe { libloading::Library::new(&path) }.unwrap();
        // SAFETY: the exports' signatures, as include/kvhygiene.h declares them.
        let (init, exports) = unsafe {
            (
                *lib.get::<Init>(b"kvh_init").unwrap(),
                (
                    *lib.get::<Malloc>(b"kvh_malloc").unwrap(),
                    *lib.get::<LastError>(b"kvh_last_error").unwrap(),
                    calls,
                ),
            )
        };
        EXPORTS.set(exports).unwrap();
        std::mem::forget(lib);
        std::mem::forget(driver);
        std::thread::spawn(move || {
            INIT_RC.store(init(), Ordering::SeqCst);
            INIT_DONE.store(true, Ordering::SeqCst);
        });
        if !wait_for(&IN_START) {
            println!("SETUP-FAILED: the start-up never reached the occupancy query");
        }
        std::process::exit(0);
    }
    let Some(driver) = fake_cuda::as_libcuda_dir() else {
        return;
    };
    let (_, stdout, stderr) = child(
        name,
        &[
            ("KVH_BACKEND", "cuda"),
            ("KVH_OOM", "null"),
            ("LD_LIBRARY_PATH", driver.path().to_str().unwrap()),
        ],
    );
    assert!(
        !stdout.contains("SETUP-FAILED") && stdout.contains("EXIT-MALLOC init_finished=true"),
        "{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains("null=true code=7016") && stdout.contains("driver_calls_during_exit=0"),
        "a start-up that finished after process exit began served fresh memory (or made \
         driver calls) to an exit handler:\n{stdout}\n{stderr}"
    );
}

/// The memory statistics as `kvh_memory_stats_json` writes them, read in the child.
fn memory_stats_json(device: i32) -> Result<serde_json::Value, i32> {
    let mut n = 0usize;
    let rc = ffi::kvh_memory_stats_json(device, std::ptr::null_mut(), 0, &mut n);
    if rc != ffi::kvh_result::KVH_ERR_BUFFER_TOO_SMALL as i32 {
        return Err(rc);
    }
    let mut buf = vec![0u8; n + 1];
    let rc = ffi::kvh_memory_stats_json(device, buf.as_mut_ptr().cast(), buf.len(), &mut n);
    if rc != 0 {
        return Err(rc);
    }
    Ok(serde_json::from_slice(&buf[..n]).unwrap())
}

/// `kvh_memory_stats_json` and the resets: before start-up every statistic is zero and the
/// allocator is not started by them; afterwards they follow the pool; a negative device is
/// refused by name, and the query leaves the thread's last error as it was.
#[test]
fn kvh_memory_stats_json_answers_before_start_up_without_starting_the_allocator() {
    let name = "kvh_memory_stats_json_answers_before_start_up_without_starting_the_allocator";
    if in_child() {
        let before = memory_stats_json(0).unwrap();
        let reset = ffi::kvh_reset_peak_memory_stats(0);
        let mut n = 0usize;
        ffi::kvh_stats_json(std::ptr::null_mut(), 0, &mut n);
        let mut buf = vec![0u8; n + 1];
        ffi::kvh_stats_json(buf.as_mut_ptr().cast(), buf.len(), &mut n);
        let unstarted = String::from_utf8_lossy(&buf[..n]).contains("\"started\":false");
        println!(
            "BEFORE {} RESET {reset} UNSTARTED {unstarted}",
            before["allocated_bytes"]["all"]["current"]
        );
        let ptr = ffi::kvh_malloc(3 << 20, 0, std::ptr::null_mut());
        let held = memory_stats_json(0).unwrap();
        println!(
            "HELD {} PEAK {}",
            held["allocated_bytes"]["all"]["current"], held["allocated_bytes"]["all"]["peak"]
        );
        ffi::kvh_free(ptr, 3 << 20, 0, std::ptr::null_mut());
        ffi::kvh_synchronize();
        let reset = ffi::kvh_reset_peak_memory_stats(0);
        let after = memory_stats_json(0).unwrap();
        println!(
            "RESET {reset} PEAK {}",
            after["allocated_bytes"]["all"]["peak"]
        );
        let negative = memory_stats_json(-1).unwrap_err();
        println!("NEGATIVE {negative} LAST {}", ffi::kvh_last_error());
        println!(
            "RESETS {} {} {}",
            ffi::kvh_reset_peak_memory_stats(-1),
            ffi::kvh_reset_accumulated_memory_stats(i32::MAX),
            ffi::kvh_reset_accumulated_memory_stats(0)
        );
        let long = std::ffi::CString::new("x".repeat(200)).unwrap();
        ffi::kvh_set_context(long.as_ptr(), std::ptr::null(), std::ptr::null());
        let _ = memory_stats_json(0).unwrap();
        println!("KEPT {}", ffi::kvh_last_error());
        return;
    }
    let (ok, stdout, stderr) = child(name, &[]);
    assert!(ok, "{stdout}\n{stderr}");
    assert!(
        stdout.contains("BEFORE 0 RESET 0 UNSTARTED true"),
        "before start-up: {stdout}"
    );
    assert!(stdout.contains("HELD 3145728 PEAK 3145728"), "{stdout}");
    assert!(stdout.contains("RESET 0 PEAK 0"), "{stdout}");
    assert!(stdout.contains("NEGATIVE 7014 LAST 7014"), "{stdout}");
    assert!(
        stdout.contains("RESETS 7014 7014 0"),
        "a reset of a device the backend lacks is refused, of device 0 done: {stdout}"
    );
    assert!(
        stdout.contains("KEPT 7010"),
        "kvh_memory_stats_json changed the thread's last error: {stdout}"
    );
}

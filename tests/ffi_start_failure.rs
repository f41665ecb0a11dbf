//! The C ABI when the process-wide allocator cannot start. Each case runs in a child process
//! of this test binary, since the runtime is started once per process from its environment.

use std::path::Path;
use std::process::Command;

/// Marker telling a child which case to run (not a `KVH_` variable: the configuration refuses
/// unknown ones).
const CASE: &str = "FFI_START_FAILURE_CASE";

/// Runs `test` of this binary in a child with `KVH_CONFIG` naming `config`.
fn child(test: &str, config: &Path) -> std::process::Output {
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env(CASE, "1")
        .env("KVH_CONFIG", config)
        .output()
        .unwrap()
}

/// A configuration file that chooses `oom = "null"` (the caller cannot take a C++
/// exception) and a log directory that cannot be created, so start-up fails after the
/// configuration was read: `kvh_malloc` returns NULL with the start-up error, as the file
/// asked, and throws nothing.
#[test]
fn null_mode_from_the_config_file_never_throws_when_start_up_fails() {
    let name = "null_mode_from_the_config_file_never_throws_when_start_up_fails";
    if std::env::var_os(CASE).is_some() {
        let checked = kvhygiene::ffi::kvh_check_config();
        println!("CHECK-CONFIG {checked}");
        let p = kvhygiene::ffi::kvh_malloc(4096, 0, std::ptr::null_mut());
        println!(
            "RETURNED null={} code={}",
            p.is_null(),
            kvhygiene::ffi::kvh_last_error()
        );
        return;
    }
    let dir = std::env::temp_dir().join(format!("kvh-ffi-start-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let blocker = dir.join("not-a-directory");
    std::fs::write(&blocker, b"x").unwrap();
    let config = dir.join("kvh.toml");
    std::fs::write(
        &config,
        format!(
            "oom = \"null\"\nbackend = \"host\"\nlog_dir = \"{}\"\n",
            blocker.join("logs").display()
        ),
    )
    .unwrap();
    let out = child(name, &config);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        stdout.contains("CHECK-CONFIG 0"),
        "the file is a valid configuration: {stdout}\n{stderr}"
    );
    assert!(
        out.status.success() && stdout.contains("RETURNED null=true code=7018"),
        "kvh_malloc did not return NULL with KVH_ERR_LOG (status {:?}):\n{stdout}\n{stderr}",
        out.status
    );
}

/// `kvh_check_config` answers as the start-up would: a `FORENSIC_HMAC_SECRET` shorter than the
/// library accepts, with the log on, is an invalid configuration (7011) there too, not "valid"
/// followed by a refusal at the first allocation (a launcher that checks before it forks its
/// workers would have every worker fail).
#[test]
fn a_short_hmac_secret_in_the_environment_fails_kvh_check_config() {
    let name = "a_short_hmac_secret_in_the_environment_fails_kvh_check_config";
    if std::env::var_os(CASE).is_some() {
        let checked = kvhygiene::ffi::kvh_check_config();
        println!("CHECK-CONFIG {checked}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("kvh.toml");
    let log = dir.path().join("log");
    std::fs::write(
        &config,
        format!("backend = \"host\"\nlog_dir = \"{}\"\n", log.display()),
    )
    .unwrap();
    let run = |secret: &str| {
        let out = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", name, "--nocapture", "--test-threads=1"])
            .env(CASE, "1")
            .env("KVH_CONFIG", &config)
            .env("FORENSIC_HMAC_SECRET", secret)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let short = run("short");
    assert!(short.contains("CHECK-CONFIG 7011"), "{short}");
    let good = run("a-secret-of-enough-length");
    assert!(good.contains("CHECK-CONFIG 0"), "{good}");
    assert!(!log.exists(), "kvh_check_config started something");
}

/// A start-up that fails after the forensic log opened (here: `backend = "cuda"` and a
/// `libcuda.so.1` that opens but is not a driver) ends the chain with a `stop` record that
/// carries the error as `start_failed`: the chain says why the process served no memory
/// rather than reading as a clean run of a process that had nothing to do.
#[test]
fn a_start_up_that_fails_after_the_log_opened_says_why_in_the_stop_record() {
    let name = "a_start_up_that_fails_after_the_log_opened_says_why_in_the_stop_record";
    if std::env::var_os(CASE).is_some() {
        let p = kvhygiene::ffi::kvh_malloc(4096, 0, std::ptr::null_mut());
        println!(
            "RETURNED null={} code={}",
            p.is_null(),
            kvhygiene::ffi::kvh_last_error()
        );
        return;
    }
    let dir = std::env::temp_dir().join(format!("kvh-ffi-start-log-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (driver, logs) = (dir.join("driver"), dir.join("logs"));
    std::fs::create_dir_all(&driver).unwrap();
    // Opens, but lacks the driver's symbols: a broken driver, refused on every machine (the
    // loader searches LD_LIBRARY_PATH before any installed driver).
    std::fs::copy(mapped_libc(), driver.join("libcuda.so.1")).unwrap();
    let config = dir.join("kvh.toml");
    std::fs::write(
        &config,
        format!(
            "oom = \"null\"\nbackend = \"cuda\"\nlog_dir = \"{}\"\n",
            logs.display()
        ),
    )
    .unwrap();
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env(CASE, "1")
        .env("KVH_CONFIG", &config)
        .env("LD_LIBRARY_PATH", &driver)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let records: Vec<serde_json::Value> = std::fs::read_dir(&logs)
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().ends_with(".jsonl"))
                .flat_map(|e| {
                    let text = std::fs::read_to_string(e.path()).unwrap_or_default();
                    text.lines()
                        .filter_map(|l| serde_json::from_str(l).ok())
                        .collect::<Vec<_>>()
                })
                .collect()
        })
        .unwrap_or_default();
    let report = kvhygiene::forensic::verify::verify_all(&logs, &Default::default());
    let evidence = Command::new(env!("CARGO_BIN_EXE_kvh"))
        .arg("evidence")
        .arg(&logs)
        .arg("--json")
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        stdout.contains("RETURNED null=true code=7012"),
        "{stdout}\n{stderr}"
    );
    let kinds: Vec<&str> = records.iter().filter_map(|r| r["kind"].as_str()).collect();
    assert_eq!(kinds, ["start", "stop"], "{records:?}\n{stderr}");
    let why = records[1]["start_failed"].as_str().unwrap_or_default();
    assert!(
        why.contains("kvhygiene backend") && why.contains("libcuda.so.1"),
        "the stop record does not say why start-up failed: {:?}",
        records[1]
    );
    assert!(report.is_ok_and(|r| r.ok()), "the chain does not verify");
    let evidence: serde_json::Value = serde_json::from_slice(&evidence.stdout).unwrap();
    let process = &evidence["processes"][0];
    assert!(
        process["start_failed"]
            .as_str()
            .is_some_and(|e| e.contains("kvhygiene backend")),
        "kvh evidence does not say the process's start-up failed: {process}"
    );
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

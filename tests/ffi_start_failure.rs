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

//! `kvh config` reads the environment as the library and the C library's `getenv` do: an
//! `environ` entry without `=` (which `execve` accepts) names no variable.

use std::ffi::CString;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::process::Command;

extern "C" {
    static mut environ: *const *const libc::c_char;
}

/// Runs the built `kvh` with exactly `entries` as its environment (each entry as given, with
/// or without `=`); returns the exit code, stdout and stderr.
fn kvh_with_environ(args: &[&str], entries: &[&str]) -> (i32, String, String) {
    let owned: Vec<CString> = entries.iter().map(|e| CString::new(*e).unwrap()).collect();
    let mut ptrs: Vec<*const libc::c_char> = owned.iter().map(|c| c.as_ptr()).collect();
    ptrs.push(std::ptr::null());
    // Leaked: the child reads them after the fork; the parent never frees them meanwhile.
    let ptrs: &'static [*const libc::c_char] = Box::leak(ptrs.into_boxed_slice());
    std::mem::forget(owned);
    let table = ptrs.as_ptr() as usize;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kvh"));
    cmd.args(args);
    // SAFETY: between fork and exec, only a pointer store: the exec that follows (std
    // execs with `environ` when the command sets no variable) passes this table.
    unsafe {
        cmd.pre_exec(move || {
            environ = table as *const *const libc::c_char;
            Ok(())
        });
    }
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `FORENSIC_HMAC_SECRET` without `=`: `getenv("FORENSIC_HMAC_SECRET")` (and so the
/// library's `std::env::var_os`) finds no variable, and the library seals its log with the
/// key file. `kvh config` judges the same environment: no secret in the environment, and the
/// policy passes.
#[test]
fn an_environ_entry_without_an_equals_sign_is_not_a_variable() {
    let tmp = tempfile::tempdir().unwrap();
    let key = tmp.path().join("hmac.key");
    std::fs::write(&key, "k".repeat(32)).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let log = format!("KVH_LOG_DIR={}", tmp.path().join("log").display());
    let key_file = format!("KVH_HMAC_KEY_FILE={}", key.display());
    let path = format!("PATH={}", std::env::var("PATH").unwrap_or_default());
    // The same environment without the bare entry: the policy passes.
    let (code, out, err) = kvh_with_environ(&["config", "--json"], &[&path, &log, &key_file]);
    assert_eq!(code, 0, "{out}{err}");
    let base: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(base["hmac_secret_in_environment"], false, "{out}");
    let (code, out, err) = kvh_with_environ(
        &["config", "--json"],
        &[&path, &log, &key_file, "FORENSIC_HMAC_SECRET"],
    );
    assert_eq!(
        code, 0,
        "an entry that getenv does not find was judged as a secret: {out}{err}"
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["hmac_secret_in_environment"], false, "{out}");
}

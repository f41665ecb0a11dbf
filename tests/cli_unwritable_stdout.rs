//! The verbs whose standard output cannot be written (a full disk) end with a status of their
//! table in the README, saying why on stderr; none panics. (A closed pipe is a reader that
//! took what it wanted: tests/cli_closed_pipe.rs.)

mod cli_common;
mod forensic_common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use cli_common::{kvh, run};
use forensic_common::{cfg, secret, write_log};

/// `/dev/full`, where every write fails with ENOSPC.
fn full() -> fs::File {
    fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap()
}

/// Runs `cmd` with its stdout on a full device: exit code and stderr.
fn run_full(cmd: &mut Command) -> (i32, String) {
    let (code, _, err) = run(cmd.stdout(full()));
    assert!(!err.contains("panicked"), "a panic: {err}");
    (code, err)
}

#[test]
fn demo_ends_with_a_status_of_its_table() {
    let (code, err) = run_full(kvh().args(["demo", "--tenants", "1", "--requests", "1"]));
    // The run passed; its report was lost, which is not a pass.
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("cannot be written"), "{err}");
}

#[test]
fn keygen_ends_with_0_or_2() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = dir.path().join("ckpt");
    let (code, err) = run_full(kvh().args(["keygen", "--out", prefix.to_str().unwrap()]));
    // The key pair was written: that is what the status says; the lost line is said.
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("cannot write to stdout"), "{err}");
    assert!(prefix.with_extension("key").is_file() && prefix.with_extension("pub").is_file());
}

#[test]
fn prune_log_ends_with_a_status_of_its_table() {
    let tmp = tempfile::tempdir().unwrap();
    let log = tmp.path().join("log");
    // Two stopped chains, sealed: both may move.
    write_log(&cfg(&log, 1 << 20), 3, true);
    write_log(&cfg(&log, 1 << 20), 3, true);
    let (code, err) = run_full(&mut prune_everything(tmp.path(), &log));
    // Both chains moved (the first one's report line failed first), and the lost report
    // makes the status 2.
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("cannot write the report"), "{err}");
    let left: Vec<_> = fs::read_dir(&log)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".jsonl"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// `kvh prune-log LOG` moving every chain (`--older-than 0`) into `DIR/archive` (made 0700
/// once) with the key of the test logs (written to `DIR/hmac.key` once).
fn prune_everything(dir: &std::path::Path, log: &std::path::Path) -> std::process::Command {
    let archive = dir.join("archive");
    if !archive.exists() {
        fs::create_dir(&archive).unwrap();
        fs::set_permissions(&archive, fs::Permissions::from_mode(0o700)).unwrap();
    }
    let key = dir.join("hmac.key");
    fs::write(&key, &*secret()).unwrap();
    let mut c = kvh();
    c.arg("prune-log")
        .arg(log)
        .arg("--archive-dir")
        .arg(&archive)
        .args(["--older-than", "0", "--key-file"])
        .arg(&key);
    c
}

/// `--help` and `--version` print to stdout and exit 0; when the text cannot be written, a
/// script that reads it must not take an empty answer for the text: 2, said on stderr.
#[test]
fn help_and_version_that_cannot_be_written_end_with_2() {
    for args in [&["--help"][..], &["--version"], &["verify-log", "--help"]] {
        let (code, err) = run_full(kvh().args(args));
        assert_eq!(code, 2, "{args:?}: {err}");
        let (code, out, _) = run(kvh().args(args));
        assert_eq!(code, 0, "{args:?}");
        assert!(out.contains("kvh"), "{args:?}: {out}");
    }
}

/// README: `prune-log` exits 1 when the log does not verify (nothing moved), 2 for a usage
/// or I/O error. The verification's findings are said on stderr; when stderr cannot be
/// written (a full device, a closed pipe) the finding is lost, not the verdict: the status
/// is expected to stay 1, as it does for `verify-log` and `evidence`.
#[test]
fn prune_log_of_a_log_that_does_not_verify_ends_with_1_when_stderr_cannot_be_written() {
    let tmp = tempfile::tempdir().unwrap();
    let log = tmp.path().join("log");
    write_log(&cfg(&log, 1 << 20), 3, true);
    // One record's sequence number changed: the chain no longer verifies.
    let file = forensic_common::chain_files(&log).remove(0);
    let mut lines = forensic_common::read_lines(&file);
    lines[2] = lines[2].replacen("\"seq\":2", "\"seq\":7", 1);
    forensic_common::write_lines(&file, &lines);
    let prune = || prune_everything(tmp.path(), &log);
    let (code, out, err) = run(&mut prune());
    assert_eq!(code, 1, "stderr writable: {out}{err}");
    let (code, out, _) = run(prune().stderr(full()));
    assert_eq!(
        code, 1,
        "the same log with stderr on a full device: {out} (2 says usage or I/O error)"
    );
}

/// README: `verify-log` exits 1 for tampering or corruption. When its report cannot be
/// written (stdout on a full device), the finding is lost, not the verdict: a log that does
/// not verify still ends with 1, as `kvh demo` keeps 1 for a failed run whose report is lost
/// and `prune-log` keeps 1 for a log that does not verify.
#[test]
fn verify_log_of_a_log_that_does_not_verify_ends_with_1_when_stdout_cannot_be_written() {
    let tmp = tempfile::tempdir().unwrap();
    let log = tmp.path().join("log");
    write_log(&cfg(&log, 1 << 20), 3, false);
    // One record's sequence number changed: the chain no longer verifies.
    let file = forensic_common::chain_files(&log).remove(0);
    let mut lines = forensic_common::read_lines(&file);
    lines[2] = lines[2].replacen("\"seq\":2", "\"seq\":7", 1);
    forensic_common::write_lines(&file, &lines);
    let verify = || {
        let mut c = kvh();
        c.arg("verify-log").arg(&log);
        c
    };
    let (code, out, err) = run(&mut verify());
    assert_eq!(code, 1, "stdout writable: {out}{err}");
    let (code, err) = run_full(&mut verify());
    assert_eq!(
        code, 1,
        "the same log with stdout on a full device: {err} (2 says usage or I/O error)"
    );
}

//! A reader that closes stdout early (`kvh verify-log DIR | head`) took what it wanted: the
//! verbs that print a report say nothing of it and exit with the status of their findings.
//! A stdout that cannot be written for another reason (a full disk) is still an error:
//! tests/cli_unwritable_stdout.rs.

mod cli_common;

use std::os::fd::{FromRawFd, OwnedFd};
use std::process::{Command, Stdio};

use cli_common::{host_demo, kvh, run};

/// The write end of a pipe whose read end is already closed: every write to it fails with
/// EPIPE (the binary ignores SIGPIPE, as every Rust program does).
fn closed_pipe() -> Stdio {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both descriptors were just made by pipe2 and are owned by nothing else.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    drop(read);
    Stdio::from(write)
}

fn status_and_stderr(cmd: &mut Command, stdout: Stdio) -> (i32, String) {
    let out = cmd.stdout(stdout).stderr(Stdio::piped()).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn report_verbs_are_quiet_when_the_reader_left_and_keep_their_status() {
    let tmp = tempfile::tempdir().unwrap();
    let log = tmp.path().join("log");
    let metrics = tmp.path().join("kvh.prom");
    let (code, _, err) = run(host_demo(1, 2)
        .arg("--log-dir")
        .arg(&log)
        .arg("--metrics-file")
        .arg(&metrics));
    assert_eq!(code, 0, "demo: {err}");
    let (log, metrics) = (log.as_os_str(), metrics.as_os_str());
    let cases: [&[&std::ffi::OsStr]; 9] = [
        &["evidence".as_ref(), log],
        &[
            "demo".as_ref(),
            "--backend".as_ref(),
            "host".as_ref(),
            "--tenants".as_ref(),
            "1".as_ref(),
            "--requests".as_ref(),
            "1".as_ref(),
        ],
        &["verify-log".as_ref(), "--help".as_ref()],
        &["verify-log".as_ref(), log],
        &["verify-log".as_ref(), "--json".as_ref(), log],
        &[
            "metrics".as_ref(),
            "--max-age".as_ref(),
            "100000".as_ref(),
            "--file".as_ref(),
            metrics,
        ],
        &[
            "gate".as_ref(),
            "--max-age".as_ref(),
            "100000".as_ref(),
            "--metrics-file".as_ref(),
            metrics,
        ],
        &["config".as_ref()],
        &["completions".as_ref(), "bash".as_ref()],
    ];
    for args in cases {
        let name = format!("{args:?}");
        let cmd = || {
            let mut c = kvh();
            c.args(args);
            c
        };
        let (expected, err) = status_and_stderr(&mut cmd(), Stdio::null());
        assert!(
            expected == 0 || expected == 1,
            "kvh {name} with stdout to /dev/null: {expected}: {err}"
        );
        let (code, err) = status_and_stderr(&mut cmd(), closed_pipe());
        assert_eq!(code, expected, "kvh {name} into a closed pipe: {err}");
        assert!(
            !err.contains("cannot write"),
            "kvh {name} complains of a reader that left: {err}"
        );
    }
}

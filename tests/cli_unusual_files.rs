//! Files named on the command line that are not what they should be (a FIFO where a key or a
//! state file should be): every verb answers with a usage error naming the file, at once,
//! as the library and the verifiers do for key, policy, checkpoint and chain files (opened
//! without waiting for a writer, regular files of a bounded size only). A readiness probe or
//! a nightly job must never hang on one.

#[path = "cli_common/mod.rs"]
mod cli_common;
#[path = "forensic_common/mod.rs"]
mod forensic_common;

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cli_common::kvh;
use forensic_common::{cfg, log_dir, write_log};

/// How long a verb may take to refuse a file it cannot use.
const DEADLINE: Duration = Duration::from_secs(20);

fn fifo(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    let c = CString::new(p.as_os_str().as_bytes()).unwrap();
    // SAFETY: `c` is a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    p
}

/// Runs `cmd`; its exit code and stderr, or `None` when it was still running at the deadline
/// (it is then killed).
fn run_with_deadline(cmd: &mut Command) -> Option<(i32, String)> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let out = child.wait_with_output().unwrap();
            return Some((
                status.code().unwrap_or(-1),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            ));
        }
        if start.elapsed() > DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A log directory with one sealed chain, and a FIFO in a sibling directory.
fn setup() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = log_dir(&tmp);
    write_log(&cfg(&dir, 1 << 20), 3, true);
    let f = fifo(tmp.path(), "key-fifo");
    (tmp, dir, f)
}

fn assert_refused(what: &str, result: Option<(i32, String)>, fifo: &Path) {
    let Some((code, err)) = result else {
        panic!(
            "{what} with a FIFO at {} still waits after {DEADLINE:?}",
            fifo.display()
        );
    };
    assert_eq!(code, 2, "{what}: {err}");
    assert!(err.contains(&fifo.display().to_string()), "{what}: {err}");
}

#[test]
fn verify_log_refuses_a_fifo_as_key_file() {
    let (_tmp, dir, f) = setup();
    let r = run_with_deadline(kvh().arg("verify-log").arg(&dir).arg("--key-file").arg(&f));
    assert_refused("verify-log --key-file", r, &f);
}

#[test]
fn verify_log_refuses_a_fifo_as_public_key() {
    let (_tmp, dir, f) = setup();
    let r = run_with_deadline(
        kvh()
            .arg("verify-log")
            .arg(&dir)
            .arg("--public-key")
            .arg(&f),
    );
    assert_refused("verify-log --public-key", r, &f);
}

/// The readiness probe: a hung `kvh gate` is a probe timeout, not a verdict.
#[test]
fn gate_refuses_a_fifo_as_key_file() {
    let (tmp, dir, f) = setup();
    let snap = tmp.path().join("kvh.prom");
    let stats = cli_common::runtime_stats(Default::default());
    std::fs::write(
        &snap,
        kvhygiene::metrics::encode(
            &stats,
            &kvhygiene::metrics::ExporterStats::default(),
            std::time::SystemTime::now(),
        ),
    )
    .unwrap();
    let r = run_with_deadline(
        kvh()
            .arg("gate")
            .arg("--metrics-file")
            .arg(&snap)
            .arg("--log-dir")
            .arg(&dir)
            .arg("--key-file")
            .arg(&f),
    );
    assert_refused("gate --key-file", r, &f);
}

#[test]
fn tail_log_once_refuses_a_fifo_as_state_file() {
    let (_tmp, dir, f) = setup();
    let r = run_with_deadline(
        kvh()
            .arg("tail-log")
            .arg(&dir)
            .arg("--once")
            .arg("--state")
            .arg(&f),
    );
    assert_refused("tail-log --state", r, &f);
}

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

/// `--checkpoint` names where the operator keeps the checkpoints: a FIFO there is a wrong
/// argument (exit 2, naming it), as for the key options, not a finding about the log.
#[test]
fn verify_log_refuses_a_fifo_as_checkpoint() {
    let (tmp, dir, f) = setup();
    let (_, public) = kvhygiene::forensic::cli::keygen(&tmp.path().join("ckpt")).unwrap();
    let r = run_with_deadline(
        kvh()
            .arg("verify-log")
            .arg(&dir)
            .arg("--public-key")
            .arg(&public)
            .arg("--checkpoint")
            .arg(&f),
    );
    assert_refused("verify-log --checkpoint", r, &f);
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

/// A chain file the verifying user cannot read (a copy of the log made by another user, an
/// auditor's account that is not the writer's) is an I/O error, exit 2, as `verify-log`,
/// `evidence` and `tail-log` document it ("2 usage or I/O error"), and as `kvh gate` already
/// answers it. It is not tampering (exit 1): operations.md has exit 1 of verify-log escalated
/// as a security incident, and tail-log would hand a `"tampering"` line to the SIEM.
#[test]
fn an_unreadable_chain_file_is_an_io_error_not_tampering() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let tmp = tempfile::tempdir().unwrap();
    let open = |p: &Path, mode: u32| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap()
    };
    open(tmp.path(), 0o755);
    let dir = log_dir(&tmp);
    write_log(&cfg(&dir, 1 << 20), 3, false);
    open(&dir, 0o755);
    let chain = forensic_common::chain_files(&dir);
    assert_eq!(chain.len(), 1);
    open(&chain[0], 0o000);
    for args in [
        &["verify-log"][..],
        &["evidence"][..],
        &["tail-log", "--once", "--from-start"][..],
    ] {
        let mut cmd = kvh();
        cmd.args(args).arg(&dir);
        // SAFETY: only async-signal-safe calls (setgroups, setgid, setuid) between fork and
        // exec. Root reads any file: the verifier runs as nobody.
        unsafe {
            cmd.pre_exec(|| {
                if libc::geteuid() == 0
                    && (libc::setgroups(0, std::ptr::null()) != 0
                        || libc::setgid(65534) != 0
                        || libc::setuid(65534) != 0)
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let out = cmd.stdin(Stdio::null()).output().unwrap();
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert!(
            format!("{stdout}{stderr}").contains("Permission denied"),
            "{args:?}: the chain file must be unreadable to the verifier: {stdout}{stderr}"
        );
        assert!(
            !stdout.contains("tampering"),
            "{args:?}: an unreadable file is reported as tampering: {stdout}{stderr}"
        );
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?}: a log this user cannot read is an I/O error, not a log that failed \
             verification: {stdout}{stderr}"
        );
    }
}

/// A directory holding only files named like log files but not chain files (a copy renamed
/// by hand, another tool's output) has nothing to verify (exit 2), and the message names
/// them and the name a chain file has, rather than saying there are no kvh-*.jsonl files.
#[test]
fn files_named_like_log_files_but_not_chain_files_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("kvh-foreign.jsonl"), "{}\n").unwrap();
    let out = kvh()
        .arg("verify-log")
        .arg(tmp.path())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("kvh-foreign.jsonl") && err.contains("not chain files"),
        "{err}"
    );
}

/// The commands the verbs suggest name a path that is not UTF-8 as a word that expands, in a
/// POSIX shell, to that path and no other: byte for byte, a trailing newline and a leading
/// `-` included.
#[test]
fn a_suggested_shell_word_for_a_path_that_is_not_utf8_expands_to_that_path() {
    use std::os::unix::ffi::OsStrExt;
    let paths: [&[u8]; 4] = [
        b"log-\xff/kvh\n",
        b"-log-\xff",
        b"/var/log/kvh-\xff%d\\n",
        b"/var/log/kvh-\xff\n\n",
    ];
    for shell in ["dash", "bash", "sh"] {
        if Command::new(shell).arg("-c").arg("true").status().is_err() {
            continue;
        }
        for bytes in paths {
            let path = Path::new(std::ffi::OsStr::from_bytes(bytes));
            let word = kvhygiene::forensic::cli::shell_word(path);
            let out = Command::new(shell)
                .arg("-c")
                .arg(format!("printf '%s' {word}"))
                .output()
                .unwrap();
            assert_eq!(
                out.stdout,
                bytes,
                "{shell}: {word} expands to {:?}, not to {:?}; stderr: {}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(bytes),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

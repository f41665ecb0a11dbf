//! Log files the verifying user cannot read: a following `kvh tail-log` does not go on for
//! ever passing nothing on, a checkpoint that cannot be read is answered as a chain file
//! that cannot be read is, and a chain file the verifying user's own log holds without read
//! permission for it (the writer creates its files 0600) is tampering evidence.
//!
//! As root, the verbs run as `nobody` (uid 65534): root reads any file.

#[path = "cli_common/mod.rs"]
mod cli_common;
#[path = "forensic_common/mod.rs"]
mod forensic_common;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cli_common::kvh;
use forensic_common::{cfg, chain_files, log_dir, write_log};

const NOBODY: u32 = 65534;

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Gives `p` to the user the verbs run as (as root: nobody; else it is the test's own).
fn give_to_runner(p: &Path) {
    if is_root() {
        std::os::unix::fs::chown(p, Some(NOBODY), Some(NOBODY)).unwrap();
    }
}

/// `cmd` run as nobody when the test runs as root.
fn as_runner(cmd: &mut Command) -> &mut Command {
    // SAFETY: only async-signal-safe calls (setgroups, setgid, setuid) between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::geteuid() == 0
                && (libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(NOBODY) != 0
                    || libc::setuid(NOBODY) != 0)
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

/// A log of one unsealed chain in a temporary directory, every part of it readable by
/// the user the verbs run as.
fn readable_log() -> (tempfile::TempDir, std::path::PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    chmod(tmp.path(), 0o755);
    let dir = log_dir(&tmp);
    write_log(&cfg(&dir, 1 << 20), 3, false);
    chmod(&dir, 0o755);
    give_to_runner(&dir);
    for f in chain_files(&dir) {
        chmod(&f, 0o644);
        give_to_runner(&f);
    }
    (tmp, dir)
}

/// operations.md: the tail sidecar writes a `"tampering"` line and exits 1 when a chain
/// stops verifying, goes back or vanishes; a log directory removed under it stops it rather
/// than leaving it retrying for ever without a word on stdout. A chain file that was passed
/// on and can no longer be read stops every chain from being passed on: the tail must not
/// keep running, silent on stdout, while nothing of the log reaches the SIEM.
#[test]
fn a_chain_file_made_unreadable_under_a_following_tail_stops_it() {
    let (_tmp, dir) = readable_log();
    let child = follow_whole_log(&dir);
    chmod(&chain_files(&dir)[0], 0o000);
    let (code, stderr) = exit_within(child, Duration::from_secs(20));
    let code = code.unwrap_or_else(|| {
        panic!(
            "a following tail whose passed-on chain file became unreadable was still running \
             20 s later, passing nothing on; stderr: {stderr}"
        )
    });
    assert_ne!(code, 0, "{stderr}");
}

/// A checkpoint file the verifying user may not read says nothing of the log, as a chain
/// file it may not read says nothing (exit 2, "2 usage or I/O error"): it is not a
/// checkpoint that failed to verify (exit 1, tampering, escalated as a security incident).
#[test]
fn an_unreadable_checkpoint_file_is_an_io_error_as_an_unreadable_chain_file_is() {
    let tmp = tempfile::tempdir().unwrap();
    chmod(tmp.path(), 0o755);
    let keys = tmp.path().join("keys");
    std::fs::create_dir(&keys).unwrap();
    let (signer, public) = kvhygiene::forensic::cli::keygen(&keys.join("signer")).unwrap();
    chmod(&keys, 0o755);
    chmod(&public, 0o644);
    let ckpts = tmp.path().join("ckpt");
    let dir = log_dir(&tmp);
    let mut c = cfg(&dir, 1 << 20);
    c.signing_key_file = Some(signer);
    c.checkpoint_dir = Some(ckpts.clone());
    write_log(&c, 4, false);
    chmod(&dir, 0o755);
    for f in chain_files(&dir) {
        chmod(&f, 0o644);
    }
    chmod(&ckpts, 0o755);
    let ckpt_files: Vec<_> = std::fs::read_dir(&ckpts)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(ckpt_files.len(), 1, "{ckpt_files:?}");
    // Readable: the log verifies with its checkpoint.
    chmod(&ckpt_files[0], 0o644);
    let verify = || {
        as_runner(
            kvh()
                .arg("verify-log")
                .arg(&dir)
                .arg("--public-key")
                .arg(&public)
                .arg("--checkpoint")
                .arg(&ckpts)
                .stdin(Stdio::null()),
        )
        .output()
        .unwrap()
    };
    let out = verify();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Unreadable to this user.
    chmod(&ckpt_files[0], 0o000);
    let out = verify();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("Permission denied"), "{text}");
    assert_eq!(
        out.status.code(),
        Some(2),
        "a checkpoint this user cannot read is an I/O error, not a log that failed \
         verification: {text}"
    );
}

/// The writer creates its chain files 0600, readable by their owner. A chain file of the
/// verifying user's own log that this user cannot read had its permissions taken away on
/// purpose: nothing was copied under another account. Tampered and then made unreadable, it
/// is still a log that fails verification (exit 1, escalated as a security incident by
/// operations.md), not an I/O error (exit 2) that the runbook does not escalate.
#[test]
fn a_tampered_chain_file_its_owner_made_unreadable_fails_verification() {
    let (_tmp, dir) = readable_log();
    let file = &chain_files(&dir)[0];
    let mut lines = forensic_common::read_lines(file);
    lines[1] = lines[1].replace("tenant-a", "tenant-b");
    forensic_common::write_lines(file, &lines);
    let verify = || {
        as_runner(kvh().arg("verify-log").arg(&dir).stdin(Stdio::null()))
            .output()
            .unwrap()
    };
    assert_eq!(verify().status.code(), Some(1), "the edit is caught");
    chmod(file, 0o000);
    let out = verify();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "a chain file of the verifier's own log made unreadable is answered as an I/O \
         error: {text}"
    );
}

/// `kvh tail-log DIR --from-start --interval 1`, as the runner, once it has passed on every
/// record now in `dir`: a following tail whose log is then changed under it.
fn follow_whole_log(dir: &Path) -> std::process::Child {
    let written: usize = chain_files(dir)
        .iter()
        .map(|f| forensic_common::read_lines(f).len())
        .sum();
    let mut child = as_runner(
        kvh()
            .arg("tail-log")
            .arg(dir)
            .args(["--from-start", "--interval", "1"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    )
    .spawn()
    .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if tx.send(line.unwrap()).is_err() {
                return;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut got = 0;
    while got < written && Instant::now() < deadline {
        if lines.recv_timeout(Duration::from_millis(200)).is_ok() {
            got += 1;
        }
    }
    assert_eq!(got, written, "the log was passed on before it was changed");
    child
}

/// Runs `cmd` and returns its exit status, killing it when it is still running after
/// `limit` (then `None`); with its stderr.
fn exit_within(child: std::process::Child, limit: Duration) -> (Option<i32>, String) {
    let mut child = child;
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() >= deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    if status.is_none() {
        // SAFETY: kill(2) with the pid of a child this test spawned and has not waited for.
        unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    }
    let out = child.wait_with_output().unwrap();
    (
        status.map(|s| s.code().unwrap_or(-1)),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A following tail that passed on a chain file of another user (readable to it through
/// its mode) and can no longer read it passes nothing of the log on from then on. As for
/// the verifying user's own file made unreadable, the tail stops (a non-zero status) instead
/// of running on, silent on stdout, while nothing reaches the SIEM.
#[test]
fn another_users_chain_file_made_unreadable_under_a_following_tail_stops_it() {
    if !is_root() {
        return; // needs a file of another user than the one the tail runs as
    }
    let tmp = tempfile::tempdir().unwrap();
    chmod(tmp.path(), 0o755);
    let dir = log_dir(&tmp);
    write_log(&cfg(&dir, 1 << 20), 3, false);
    chmod(&dir, 0o755);
    // The files stay root's, readable by others: the tail (nobody) reads them.
    for f in chain_files(&dir) {
        chmod(&f, 0o644);
    }
    let child = follow_whole_log(&dir);
    chmod(&chain_files(&dir)[0], 0o600);
    let (code, stderr) = exit_within(child, Duration::from_secs(20));
    let code = code.unwrap_or_else(|| {
        panic!(
            "a following tail whose passed-on chain file (another user's) became unreadable \
             was still running 20 s later, passing nothing on; stderr: {stderr}"
        )
    });
    assert_ne!(code, 0, "{stderr}");
}

/// `kvh gate --log-dir` answers the verifying user's own chain file made unreadable as
/// `verify-log` does: a log that fails verification (evict, exit 1), not an input it could
/// not read that asks to be run "as the writer's user" (exit 2) when it is that user.
#[test]
fn the_gate_answers_its_own_users_unreadable_tampered_chain_file_as_verify_log_does() {
    let (tmp, dir) = readable_log();
    let file = &chain_files(&dir)[0];
    let mut lines = forensic_common::read_lines(file);
    lines[1] = lines[1].replace("tenant-a", "tenant-b");
    forensic_common::write_lines(file, &lines);
    chmod(file, 0o000);
    let verify = as_runner(kvh().arg("verify-log").arg(&dir).stdin(Stdio::null()))
        .output()
        .unwrap();
    assert_eq!(verify.status.code(), Some(1), "verify-log: a failed chain");
    // A fresh snapshot of a healthy process, readable by the probe.
    let snap = tmp.path().join("kvh.prom");
    let text = kvhygiene::metrics::encode(
        &cli_common::runtime_stats({
            let mut pool = kvhygiene::stats::PoolCounters::default();
            pool.counters.allocations = 5;
            pool
        }),
        &kvhygiene::metrics::ExporterStats::default(),
        std::time::SystemTime::now(),
    );
    std::fs::write(&snap, text).unwrap();
    chmod(&snap, 0o644);
    let out = as_runner(
        kvh()
            .args(["gate", "--metrics-file"])
            .arg(&snap)
            .arg("--log-dir")
            .arg(&dir)
            .stdin(Stdio::null()),
    )
    .output()
    .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "the gate's answer to the verifying user's own unreadable chain file differs from \
         verify-log's: {text}"
    );
}

/// The verifying user's own checkpoint directory made unreadable (the writer creates it
/// 0700, its own) is not another user's file: a tampered log read with it is still a log
/// that fails verification (exit 1), not an I/O error (exit 2) that the runbook does not
/// escalate.
#[test]
fn a_tampered_log_whose_own_checkpoint_directory_was_made_unreadable_fails_verification() {
    let tmp = tempfile::tempdir().unwrap();
    chmod(tmp.path(), 0o755);
    let keys = tmp.path().join("keys");
    std::fs::create_dir(&keys).unwrap();
    let (signer, public) = kvhygiene::forensic::cli::keygen(&keys.join("signer")).unwrap();
    chmod(&keys, 0o755);
    chmod(&public, 0o644);
    let ckpts = tmp.path().join("ckpt");
    let dir = log_dir(&tmp);
    let mut c = cfg(&dir, 1 << 20);
    c.signing_key_file = Some(signer);
    c.checkpoint_dir = Some(ckpts.clone());
    write_log(&c, 4, false);
    for d in [&dir, &ckpts] {
        chmod(d, 0o700);
        give_to_runner(d);
    }
    for f in chain_files(&dir) {
        chmod(&f, 0o600);
        give_to_runner(&f);
    }
    for e in std::fs::read_dir(&ckpts).unwrap() {
        let p = e.unwrap().path();
        chmod(&p, 0o600);
        give_to_runner(&p);
    }
    let verify = || {
        let out = as_runner(
            kvh()
                .arg("verify-log")
                .arg(&dir)
                .arg("--public-key")
                .arg(&public)
                .arg("--checkpoint")
                .arg(&ckpts)
                .stdin(Stdio::null()),
        )
        .output()
        .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code(), text)
    };
    let (code, text) = verify();
    assert_eq!(code, Some(0), "{text}");
    let file = &chain_files(&dir)[0];
    let mut lines = forensic_common::read_lines(file);
    let at = lines.iter().position(|l| l.contains("tenant-a")).unwrap();
    lines[at] = lines[at].replace("tenant-a", "tenant-b");
    forensic_common::write_lines(file, &lines);
    let (code, text) = verify();
    assert_eq!(code, Some(1), "the edit is caught: {text}");
    chmod(&ckpts, 0o000);
    let (code, text) = verify();
    assert_eq!(
        code,
        Some(1),
        "a tampered log whose own checkpoint directory was made unreadable is answered as \
         an I/O error: {text}"
    );
}

/// The verifying user's own log directory (the writer creates it 0700) made unreadable under
/// a following tail that passed its chains on: nothing of the log reaches the SIEM any more,
/// as when the directory is removed. The tail stops (a non-zero status) instead of trying
/// again for ever, silent on stdout.
#[test]
fn its_own_log_directory_made_unreadable_under_a_following_tail_stops_it() {
    let (_tmp, dir) = readable_log();
    chmod(&dir, 0o700);
    let child = follow_whole_log(&dir);
    chmod(&dir, 0o000);
    let (code, stderr) = exit_within(child, Duration::from_secs(20));
    chmod(&dir, 0o700);
    let code = code.unwrap_or_else(|| {
        panic!(
            "a following tail whose own log directory became unreadable was still running \
             20 s later, passing nothing on; stderr: {stderr}"
        )
    });
    assert_ne!(code, 0, "{stderr}");
}

/// A following tail with `--state` that gives up on a log it can no longer read (another
/// user's chain file made unreadable to it) leaves positions a restarted tail goes on from:
/// once the file is readable again and the log has grown, the restarted tail passes on the
/// new records, and none that the first run passed on.
#[test]
fn a_tail_that_gave_up_goes_on_from_its_state_when_restarted() {
    if !is_root() {
        return; // needs a file of another user than the one the tail runs as
    }
    let tmp = tempfile::tempdir().unwrap();
    chmod(tmp.path(), 0o755);
    let dir = log_dir(&tmp);
    write_log(&cfg(&dir, 1 << 20), 3, false);
    chmod(&dir, 0o755);
    let readable_to_runner = |dir: &Path| {
        for f in chain_files(dir) {
            chmod(&f, 0o644);
        }
    };
    readable_to_runner(&dir);
    let state_dir = tmp.path().join("state");
    std::fs::create_dir(&state_dir).unwrap();
    give_to_runner(&state_dir);
    let state = state_dir.join("tail.json");
    let passed_before: usize = chain_files(&dir)
        .iter()
        .map(|f| forensic_common::read_lines(f).len())
        .sum();

    let mut first = as_runner(
        kvh()
            .arg("tail-log")
            .arg(&dir)
            .args(["--from-start", "--interval", "1", "--state"])
            .arg(&state)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    )
    .spawn()
    .unwrap();
    // The state exists once the first pass passed the log on.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !state.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(state.exists(), "the first pass saved no state");
    let stdout = first.stdout.take().unwrap();
    chmod(&chain_files(&dir)[0], 0o600);
    let (code, stderr) = exit_within(first, Duration::from_secs(30));
    assert_eq!(code, Some(2), "the tail did not give up: {stderr}");
    assert!(stderr.contains("giving up"), "{stderr}");
    let first_lines = BufReader::new(stdout).lines().count();
    assert_eq!(
        first_lines, passed_before,
        "the first run passed the log on whole"
    );

    // Readable again, and a second chain written meanwhile (the writer wants its directory
    // private).
    chmod(&dir, 0o700);
    write_log(&cfg(&dir, 1 << 20), 2, false);
    chmod(&dir, 0o755);
    readable_to_runner(&dir);
    let out = as_runner(
        kvh()
            .arg("tail-log")
            .arg(&dir)
            .args(["--once", "--state"])
            .arg(&state)
            .stdin(Stdio::null()),
    )
    .output()
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let total: usize = chain_files(&dir)
        .iter()
        .map(|f| forensic_common::read_lines(f).len())
        .sum();
    let again = String::from_utf8_lossy(&out.stdout).lines().count();
    assert_eq!(
        again,
        total - passed_before,
        "the restarted tail passed on the records written since, and nothing twice: {stderr}"
    );
}

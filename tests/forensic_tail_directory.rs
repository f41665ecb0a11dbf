//! `kvh tail-log`: the log directory gone (removed or renamed) after chains were passed on
//! from it is tampering, whatever is left at its path: nothing, a dangling symlink, or a
//! file that is not a directory.

mod forensic_common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use forensic_common::{cfg, write_log};
use serde_json::Value;

fn kvh() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kvh"));
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("KVH_")) {
        cmd.env_remove(k);
    }
    cmd
}

fn tail_once(dir: &Path, state: &Path) -> Output {
    kvh()
        .arg("tail-log")
        .arg(dir)
        .args(["--once", "--state", state.to_str().unwrap()])
        .output()
        .unwrap()
}

/// The last stdout line, parsed.
fn last_line(stdout: &[u8]) -> Option<Value> {
    String::from_utf8_lossy(stdout)
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
}

/// A scheduled `--once --state` run after the directory its chains were passed on from was
/// renamed away and a file put at its name: the directory is gone (exit 1, the alert line),
/// not an unreadable directory (exit 2) to try again at the next run.
#[test]
fn a_log_directory_renamed_and_replaced_by_a_file_is_tampering_for_a_once_run() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    let state = tmp.path().join("tail.json");
    write_log(&cfg(&dir, 1 << 20), 2, false);
    assert_eq!(tail_once(&dir, &state).status.code(), Some(0));
    std::fs::rename(&dir, tmp.path().join("elsewhere")).unwrap();
    std::fs::write(&dir, b"").unwrap();
    let out = tail_once(&dir, &state);
    let alert = last_line(&out.stdout);
    assert!(
        out.status.code() == Some(1)
            && alert
                .as_ref()
                .is_some_and(|v| v["kvh_tail_log"] == "tampering"),
        "exit {:?}, stdout {:?}, stderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A running tail whose log directory is renamed away, a dangling symlink left at its name:
/// it stops as tampering within a few passes (as when the directory is removed), rather
/// than say once that it cannot list the directory and try again for ever.
#[test]
fn a_log_directory_renamed_under_a_running_tail_with_a_dangling_link_left_is_tampering() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    let state = tmp.path().join("tail.json");
    write_log(&cfg(&dir, 1 << 20), 2, false);
    let mut child = kvh()
        .arg("tail-log")
        .arg(&dir)
        .args(["--interval", "1", "--state", state.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The first pass placed the tail at the chain's head (the state file says so).
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&state).is_ok_and(|s| s.contains("\"seq\"")) {
        assert!(
            Instant::now() < deadline,
            "the first pass never saved its state"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::fs::rename(&dir, tmp.path().join("elsewhere")).unwrap();
    std::os::unix::fs::symlink(tmp.path().join("nowhere"), &dir).unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut status = None;
    while Instant::now() < deadline {
        if let Some(s) = child.try_wait().unwrap() {
            status = Some(s);
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if status.is_none() {
        let _ = child.kill();
    }
    let out = child.wait_with_output().unwrap();
    let alert = last_line(&out.stdout);
    assert!(
        status.is_some_and(|s| s.code() == Some(1))
            && alert
                .as_ref()
                .is_some_and(|v| v["kvh_tail_log"] == "tampering"),
        "the tail did not stop as on tampering within 15 s (status {status:?}); stdout {:?}, \
         stderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A log directory from which nothing was passed on yet, missing for a while under a
/// following tail (a volume remounting, the directory recreated before the writers start):
/// as when it is missing at the start, the tail waits for it instead of giving up, and
/// passes on the chains written in it once it is back.
#[test]
fn a_log_directory_missing_for_a_while_before_any_chain_is_waited_for() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let mut child = kvh()
        .arg("tail-log")
        .arg(&dir)
        .args(["--interval", "1"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let away = tmp.path().join("away");
    std::fs::rename(&dir, &away).unwrap();
    // Longer than 10 intervals.
    std::thread::sleep(Duration::from_secs(13));
    std::fs::rename(&away, &dir).unwrap();
    write_log(&cfg(&dir, 1 << 20), 2, false);
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut status = None;
    while Instant::now() < deadline {
        if let Some(s) = child.try_wait().unwrap() {
            status = Some(s);
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // SAFETY: kill(2) with the pid of a child this test spawned and has not waited for.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        status.is_none() && stdout.lines().count() >= 2,
        "the tail ended ({status:?}) while its log directory was missing, before any chain \
         was passed on; stdout {stdout:?}, stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A log directory named through a symlink (a volume's mount point linked into place, the
/// writers given the real path) whose target does not exist yet: the directory does not
/// exist, as when nothing is at its path. A scheduled `--once --state` run before the
/// writers created it saves its state and exits 0 (as the run before a directory that is
/// missing does), and the next run passes the chains written there on whole.
#[test]
fn a_linked_log_directory_whose_target_is_not_created_yet_is_a_directory_not_there_yet() {
    let tmp = tempfile::tempdir().unwrap();
    let real = tmp.path().join("volume");
    let link = tmp.path().join("log");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let state = tmp.path().join("tail.json");
    let out = tail_once(&link, &state);
    assert!(
        out.status.code() == Some(0) && state.exists(),
        "a run before the linked log directory exists: exit {:?} (state saved: {}), \
         stderr: {}",
        out.status.code(),
        state.exists(),
        String::from_utf8_lossy(&out.stderr)
    );
    write_log(&cfg(&real, 1 << 20), 2, false);
    let out = tail_once(&link, &state);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).lines().count(),
        4,
        "start, two events and stop, passed on whole"
    );
}

/// With `--state`, a stdout that is /dev/null (or a closed descriptor, which the runtime puts
/// there) would have every record marked as passed on and none delivered: the run is refused
/// (exit 2) and the state file is left as it was.
#[test]
fn a_state_run_with_stdout_to_dev_null_is_refused_and_moves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    write_log(&cfg(&dir, 1 << 20), 3, false);
    let state = tmp.path().join("tail.state");
    let out = kvh()
        .arg("tail-log")
        .arg(&dir)
        .args(["--once", "--from-start", "--state"])
        .arg(&state)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("stdout is /dev/null"), "{err}");
    assert!(!state.exists(), "the state file was written");
    // With a real destination the same run passes the records on.
    let out = kvh()
        .arg("tail-log")
        .arg(&dir)
        .args(["--once", "--from-start", "--state"])
        .arg(&state)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(last_line(&out.stdout).is_some());
}

/// A log directory path that runs through a regular file (`FILE/log`: a mistyped path, or a
/// file where the volume's mount point should be) is not a directory that does not exist yet:
/// nothing can ever be created there while the file is in the way. A scheduled `--once
/// --state` run refuses it (exit 2, as for a log directory that is a file) and saves no state
/// claiming the tail started, rather than reporting success on every run.
#[test]
fn a_log_directory_path_through_a_regular_file_is_refused_not_waited_for() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("volume");
    std::fs::write(&file, b"not a directory").unwrap();
    let state = tmp.path().join("tail.json");
    let out = tail_once(&file.join("log"), &state);
    assert_eq!(
        out.status.code(),
        Some(2),
        "a log directory under a regular file: exit {:?} (state saved: {}), stderr: {}",
        out.status.code(),
        state.exists(),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!state.exists(), "the state file was written");
}

/// A `--state` file named as the log's own files are (a chain file, a checkpoint, a prune
/// manifest) is refused before anything is written: in the log directory it would be read as
/// part of the log, which would then fail verification.
#[test]
fn a_state_file_named_as_the_logs_own_files_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    write_log(&cfg(&dir, 1 << 20), 2, false);
    for name in [
        "kvh-p1-t2-000000.jsonl",
        "kvh-p1-t2.ckpt",
        "kvh-p1-t2.pruned.json",
    ] {
        let state = dir.join(name);
        let out = tail_once(&dir, &state);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{name}: {err}");
        assert!(
            err.contains("a name the forensic log's own files take"),
            "{err}"
        );
        assert!(!state.exists(), "{name} was written");
    }
    let verify = kvh().arg("verify-log").arg(&dir).output().unwrap();
    assert_eq!(verify.status.code(), Some(0));
}

//! `kvh tail-log --state FILE`: one tail per state file. A second tail given the same state
//! file (under any spelling of its path) while one runs, `--once` runs included, is refused at
//! once (exit 2) instead of passing every record on a second time and rewriting the file;
//! a tail with another state file on the same log is not.

mod forensic_common;

use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use forensic_common::{cfg, write_log};

fn kvh() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kvh"));
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("KVH_")) {
        cmd.env_remove(k);
    }
    cmd
}

/// `kvh tail-log DIR --once --state STATE`, run in `cwd`.
fn tail_once_in(cwd: &Path, dir: &Path, state: &Path) -> Output {
    kvh()
        .current_dir(cwd)
        .arg("tail-log")
        .arg(dir)
        .arg("--once")
        .arg("--state")
        .arg(state)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn tail_once(dir: &Path, state: &Path) -> Output {
    tail_once_in(Path::new("/"), dir, state)
}

/// A following tail of `dir` with `state`, once its first pass saved the state file.
fn running_tail(dir: &Path, state: &Path) -> Child {
    let mut child = kvh()
        .arg("tail-log")
        .arg(dir)
        .args(["--interval", "1", "--state"])
        .arg(state)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(state).is_ok_and(|s| s.contains("\"seq\"")) {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            let _ = child.stderr.take().unwrap().read_to_string(&mut err);
            panic!("the first tail ended ({status}) before its first pass: {err}");
        }
        assert!(
            Instant::now() < deadline,
            "the first pass never saved its state"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    child
}

/// SIGTERM to `child`, then its exit code and stderr.
fn stop(child: Child) -> (Option<i32>, String) {
    let pid = i32::try_from(child.id()).unwrap();
    // SAFETY: kill(2) with the pid of a child this test spawned and has not waited for.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The run was refused as a second tail of `state` (as the command named it): exit 2, the
/// state file and the other tail named, nothing passed on.
fn assert_refused(out: &Output, state: &Path, spelling: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.code() == Some(2)
            && err.contains(&state.display().to_string())
            && err.contains("another kvh tail-log")
            && err.contains("one tail per state file"),
        "a second tail with the state file {spelling}: exit {:?}, stdout {:?}, stderr: {err}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(out.stdout.is_empty(), "the refused tail passed records on");
}

fn assert_ok(out: &Output, what: &str) {
    assert_eq!(
        out.status.code(),
        Some(0),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The descriptor of `pid` open on `path`, with its `fdinfo` flags (octal).
fn open_flags(pid: u32, path: &Path) -> Option<u32> {
    let want = std::fs::canonicalize(path).ok()?;
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.flatten() {
        if std::fs::read_link(fd.path()).is_ok_and(|p| p == want) {
            let info =
                std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{}", fd.file_name().to_str()?))
                    .ok()?;
            let flags = info.lines().find_map(|l| l.strip_prefix("flags:"))?;
            return u32::from_str_radix(flags.trim(), 8).ok();
        }
    }
    None
}

struct Setup {
    tmp: tempfile::TempDir,
    dir: PathBuf,
    states: PathBuf,
    state: PathBuf,
}

/// A log of one chain, and a directory for state files.
fn setup() -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    write_log(&cfg(&dir, 1 << 20), 3, false);
    let states = tmp.path().join("states");
    std::fs::create_dir(&states).unwrap();
    let state = states.join("tail.json");
    Setup {
        dir,
        state,
        states,
        tmp,
    }
}

/// While a tail runs with a state file, a second tail given that file is refused at once,
/// whether it is named by the same path, through a linked directory, by a relative path, or
/// by a link to the file; the lock is held on a descriptor no program it could start would
/// inherit. Once the first tail ended, the same run goes ahead.
#[test]
fn a_second_tail_with_the_same_state_file_is_refused_while_the_first_runs() {
    let s = setup();
    let first = running_tail(&s.dir, &s.state);

    let alias = s.tmp.path().join("alias");
    std::os::unix::fs::symlink(&s.states, &alias).unwrap();
    let linked_file = s.states.join("linked.json");
    std::os::unix::fs::symlink("tail.json", &linked_file).unwrap();
    let spellings: [(&str, PathBuf, &Path); 5] = [
        ("as given", s.state.clone(), Path::new("/")),
        (
            "through a linked directory",
            alias.join("tail.json"),
            Path::new("/"),
        ),
        ("relative", PathBuf::from("tail.json"), &s.states),
        (
            "relative, with ..",
            PathBuf::from("../states/./tail.json"),
            &s.dir,
        ),
        (
            "through a link to the file",
            linked_file.clone(),
            Path::new("/"),
        ),
    ];
    let started = Instant::now();
    let mut refused = Vec::new();
    for (what, path, cwd) in &spellings {
        refused.push((what, path, tail_once_in(cwd, &s.dir, path)));
    }
    let took = started.elapsed();
    let lock = s.states.join("tail.json.lock");
    let flags = open_flags(first.id(), &lock);
    let (code, err) = stop(first);
    assert_eq!(code, Some(0), "the first tail: {err}");
    for (what, path, out) in &refused {
        assert_refused(out, path, what);
    }
    assert!(
        took < Duration::from_secs(10),
        "the refusals took {took:?}: a second tail must not wait for the first"
    );
    let flags = flags.expect("the running tail holds its state file's lock file open");
    assert_ne!(
        flags & libc::O_CLOEXEC as u32,
        0,
        "the lock's descriptor is not close-on-exec (flags {flags:o})"
    );
    assert!(
        std::fs::symlink_metadata(&linked_file).is_ok_and(|m| m.file_type().is_symlink()),
        "the refused tail replaced the link to the state file"
    );

    // The first tail ended: the lock went with it.
    assert_ok(&tail_once(&s.dir, &s.state), "a tail after the first ended");
    assert_ok(
        &tail_once_in(&s.states, &s.dir, Path::new("tail.json")),
        "a tail by a relative path after the first ended",
    );
}

/// A tail whose state file is named through a link reads the file the link names and saves
/// its state at the link's name (the save replaces the link): while it runs, a tail given
/// either name is refused.
#[test]
fn a_tail_through_a_link_to_its_state_file_locks_both_names() {
    let s = setup();
    // A state file of an earlier run, and a link to it.
    assert_ok(&tail_once(&s.dir, &s.state), "the earlier run");
    let linked = s.states.join("linked.json");
    std::os::unix::fs::symlink("tail.json", &linked).unwrap();
    let first = running_tail(&s.dir, &linked);
    // Its first pass saved the state at the link's name.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::symlink_metadata(&linked).is_ok_and(|m| m.is_file()) {
        assert!(
            Instant::now() < deadline,
            "the first pass never saved its state"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let by_target = tail_once(&s.dir, &s.state);
    let by_link = tail_once(&s.dir, &linked);
    let (code, err) = stop(first);
    assert_eq!(code, Some(0), "the first tail: {err}");
    assert_refused(&by_target, &s.state, "the link names");
    assert_refused(&by_link, &linked, "at the link's name");
}

/// `--once` runs take the lock too: a scheduled run that overlaps another on the same state
/// file (a slow reader of its output) is refused, and the records are passed on once, by the
/// run that held it. The next run goes ahead, and has nothing left to pass on.
#[test]
fn once_runs_with_one_state_file_are_serialised() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    // More than a pipe holds: the first run waits for its reader, the lock held.
    write_log(&cfg(&dir, 1 << 20), 2000, false);
    let state = tmp.path().join("tail.json");
    let mut first = kvh()
        .arg("tail-log")
        .arg(&dir)
        .args(["--once", "--from-start", "--state"])
        .arg(&state)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = first.stdout.take().unwrap();
    // Records waiting in the pipe: the first run is past its start, writing them.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut pending: libc::c_int = 0;
        // SAFETY: FIONREAD writes one int through the pointer, which is valid.
        let rc = unsafe { libc::ioctl(stdout.as_raw_fd(), libc::FIONREAD, &mut pending) };
        assert_eq!(rc, 0);
        if pending > 0 {
            break;
        }
        assert!(
            first.try_wait().unwrap().is_none(),
            "the first run ended before it wrote anything"
        );
        assert!(Instant::now() < deadline, "the first run wrote nothing");
        std::thread::sleep(Duration::from_millis(20));
    }
    let second = tail_once(&dir, &state);
    let mut passed = Vec::new();
    stdout.read_to_end(&mut passed).unwrap();
    let out = first.wait_with_output().unwrap();
    assert_ok(&out, "the first run");
    assert_refused(&second, &state, "while a --once run holds it");
    let lines = String::from_utf8_lossy(&passed).lines().count();
    assert_eq!(lines, 2002, "start, 2000 events and stop, once");
    let third = tail_once(&dir, &state);
    assert_ok(&third, "the run after the first");
    assert!(third.stdout.is_empty(), "records passed on twice");
}

/// The lock is the state file's own: a tail of the same log with another state file (in the
/// same directory, even one whose name differs only by its extension) runs beside it.
#[test]
fn a_tail_with_another_state_file_on_the_same_log_is_not_refused() {
    let s = setup();
    let first = running_tail(&s.dir, &s.state);
    let other = s.states.join("tail.state");
    let beside = tail_once(&s.dir, &other);
    let same = tail_once(&s.dir, &s.state);
    let (code, err) = stop(first);
    assert_eq!(code, Some(0), "the first tail: {err}");
    assert_ok(&beside, "a tail with another state file");
    assert!(other.exists(), "the other tail saved no state");
    assert_refused(&same, &s.state, "as given");
}

/// A lock file that cannot be opened as one (a directory, or a link, at its name) is an error
/// naming it, exit 2, before any record is passed on; the link is not followed.
#[test]
fn a_lock_file_that_cannot_be_made_is_an_error_naming_it() {
    let s = setup();
    let lock = s.states.join("tail.json.lock");
    // A run refused with exit 2 naming the lock file, before any record is passed on.
    let refused = |what: &str| {
        let out = tail_once(&s.dir, &s.state);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.code() == Some(2) && err.contains(&lock.display().to_string()),
            "{what} at the lock file's name: exit {:?}, stderr: {err}",
            out.status.code()
        );
        assert!(
            out.stdout.is_empty() && !s.state.exists(),
            "{what}: records passed on"
        );
    };
    std::fs::create_dir(&lock).unwrap();
    refused("a directory");
    std::fs::remove_dir(&lock).unwrap();

    let target = s.tmp.path().join("elsewhere");
    std::os::unix::fs::symlink(&target, &lock).unwrap();
    refused("a link");
    assert!(!target.exists(), "the link was followed");
    std::fs::remove_file(&lock).unwrap();

    // Not empty: not a lock file the tail made (another tail's state file, say, named as
    // this one's lock), which a tail must not take as its lock.
    std::fs::write(&lock, b"{\"chains\": {}}\n").unwrap();
    refused("a file with content");
    std::fs::remove_file(&lock).unwrap();
    assert_ok(&tail_once(&s.dir, &s.state), "with the name free again");
}

/// The lock file is private (0600), empty, and kept after the run (removing it would let a
/// tail that opened it before lock a file no longer named). A state file in the log
/// directory puts it there too, where no verb takes it for part of the log: `verify-log`
/// passes, and `prune-log` (which removes its own leftovers from the directory) moves the
/// chain and leaves the lock file alone.
#[test]
fn the_lock_file_is_private_and_kept_and_no_verb_reads_it_as_part_of_the_log() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    write_log(&cfg(&dir, 1 << 20), 3, true);
    let key = forensic_common::secret_key_file(tmp.path());
    let state = dir.join("tail.json");
    assert_ok(&tail_once(&dir, &state), "a tail with its state in the log");
    let lock = dir.join("tail.json.lock");
    let meta = std::fs::symlink_metadata(&lock).expect("the lock file is kept");
    assert!(meta.is_file() && meta.len() == 0, "{meta:?}");
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let verify = kvh()
        .arg("verify-log")
        .arg(&dir)
        .arg("--key-file")
        .arg(&key)
        .output()
        .unwrap();
    assert_ok(&verify, "verify-log of the log holding the lock file");
    let archive = tmp.path().join("archive");
    std::fs::create_dir(&archive).unwrap();
    std::fs::set_permissions(&archive, std::fs::Permissions::from_mode(0o700)).unwrap();
    let prune = kvh()
        .arg("prune-log")
        .arg(&dir)
        .arg("--archive-dir")
        .arg(&archive)
        .args(["--older-than", "0", "--key-file"])
        .arg(&key)
        .output()
        .unwrap();
    assert_ok(&prune, "prune-log of the log holding the lock file");
    assert!(
        forensic_common::chain_files(&dir).is_empty(),
        "prune-log moved nothing"
    );
    assert!(lock.exists(), "prune-log removed the lock file");
    let verify = kvh()
        .arg("verify-log")
        .arg(&dir)
        .arg("--archive-dir")
        .arg(&archive)
        .arg("--key-file")
        .arg(&key)
        .output()
        .unwrap();
    assert_ok(&verify, "verify-log --archive-dir after the prune");
}

/// The temporary files of saves that never ended (a tail killed between writing one and
/// renaming it into place) are removed by the next tail once it holds the state's lock, so
/// they do not pile up one per kill. Only files named as a save names them go: not a link
/// so named (nor what it links to), not a file that merely starts alike, not another state
/// file's.
#[test]
fn the_next_tail_removes_what_saves_cut_short_left_and_nothing_else() {
    let s = setup();
    let stale = [
        "tail.json.tmp-4242-1796521580399168015",
        "tail.json.tmp-7-1",
    ];
    for name in stale {
        std::fs::write(s.states.join(format!(".{name}")), "{}").unwrap();
    }
    let target = s.tmp.path().join("target");
    std::fs::write(&target, "keep").unwrap();
    let kept = [
        ".tail.json.tmp-notes",
        ".tail.json.tmp-1-2-3",
        ".other.json.tmp-4242-1",
        "tail.json.tmp-4242-1",
    ];
    for name in kept {
        std::fs::write(s.states.join(name), "keep").unwrap();
    }
    let link = s.states.join(".tail.json.tmp-9-9");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    assert_ok(&tail_once(&s.dir, &s.state), "a tail run");
    for name in stale {
        assert!(
            !s.states.join(format!(".{name}")).exists(),
            ".{name} was left"
        );
    }
    for name in kept {
        assert_eq!(
            std::fs::read_to_string(s.states.join(name)).unwrap(),
            "keep",
            "{name} was touched"
        );
    }
    assert!(
        std::fs::symlink_metadata(&link).is_ok(),
        "the link was removed"
    );
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep");
    assert!(s.state.exists());
}

/// State file names that are not UTF-8 are matched byte for byte: the temporary file of a
/// state file whose name reads the same once made UTF-8 (another file, with a replacement
/// character where this one has an invalid byte) is another tail's, and stays.
#[test]
fn unfinished_saves_are_told_apart_by_the_bytes_of_the_state_file_s_name() {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    let s = setup();
    let state = s.states.join(OsStr::from_bytes(b"s\xff.json"));
    let ours = s.states.join(OsStr::from_bytes(b".s\xff.json.tmp-3-4"));
    let theirs = s
        .states
        .join(OsStr::from_bytes(b".s\xef\xbf\xbd.json.tmp-1-2"));
    std::fs::write(&ours, "{}").unwrap();
    std::fs::write(&theirs, "keep").unwrap();
    assert_ok(&tail_once(&s.dir, &state), "a tail run");
    assert!(!ours.exists(), "this state file's unfinished save was left");
    assert_eq!(
        std::fs::read_to_string(&theirs).unwrap(),
        "keep",
        "another state file's save was removed"
    );
    assert!(state.exists());
    let names: Vec<_> = std::fs::read_dir(&s.states)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        !names
            .iter()
            .any(|n| n.as_bytes().starts_with(b".s\xff.json.tmp-")),
        "{names:?}"
    );
}

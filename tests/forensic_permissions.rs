//! File and directory modes, planted symlinks, wrong owner or mode on existing files.

mod forensic_common;
#[path = "skip/mod.rs"]
mod skip;

use std::fs;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};

use forensic_common::*;
use kvhygiene::events::EventSink;
use kvhygiene::forensic::{files, ForensicError, ForensicLog};

fn mode(p: &std::path::Path) -> u32 {
    fs::symlink_metadata(p).unwrap().mode() & 0o7777
}

#[test]
fn directory_is_0700_and_files_0600() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("a/b/log");
    let (key, public) = kvhygiene::forensic::cli::keygen(&tmp.path().join("k")).unwrap();
    let mut c = cfg(&dir, 1 << 20);
    c.signing_key_file = Some(key.clone());
    write_log(&c, 3, false);
    assert_eq!(mode(&dir), 0o700);
    for f in fs::read_dir(&dir).unwrap() {
        assert_eq!(mode(&f.unwrap().path()), 0o600);
    }
    assert_eq!(mode(&key), 0o600);
    assert!(fs::read_to_string(&public).unwrap().trim().len() == 64);
}

#[test]
fn open_directory_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = log_dir(&tmp);
    fs::create_dir(&dir).unwrap();
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
    let err = ForensicLog::open_with_secret(&cfg(&dir, 1 << 20), start(), None)
        .err()
        .unwrap();
    assert!(matches!(err, ForensicError::Permission(_)), "{err}");
    assert!(err.to_string().contains("mode 0755"), "{err}");
}

#[test]
fn symlinked_directory_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let real = tmp.path().join("real");
    fs::create_dir(&real).unwrap();
    fs::set_permissions(&real, fs::Permissions::from_mode(0o700)).unwrap();
    let link = tmp.path().join("log");
    symlink(&real, &link).unwrap();
    let err = ForensicLog::open_with_secret(&cfg(&link, 1 << 20), start(), None)
        .err()
        .unwrap();
    assert!(err.to_string().contains("symlink"), "{err}");
}

#[test]
fn symlink_planted_at_a_log_path_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = log_dir(&tmp);
    files::prepare_dir(&dir, "log directory").unwrap();
    let victim = tmp.path().join("victim");
    fs::write(&victim, "precious\n").unwrap();
    fs::set_permissions(&victim, fs::Permissions::from_mode(0o600)).unwrap();
    let planted = dir.join(files::file_name("p1-t1", 0));
    symlink(&victim, &planted).unwrap();
    // Creating through it fails (O_EXCL + O_NOFOLLOW)...
    assert!(files::create_file(&planted).is_err());
    // ...and so does opening it as an existing chain to continue.
    let err = ForensicLog::open_with_secret(&cfg(&dir, 1 << 20), start(), None)
        .err()
        .unwrap();
    assert!(err.to_string().contains("symlink"), "{err}");
    assert_eq!(fs::read_to_string(&victim).unwrap(), "precious\n");
}

#[test]
fn existing_file_with_wrong_mode_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = log_dir(&tmp);
    files::prepare_dir(&dir, "log directory").unwrap();
    let f = dir.join(files::file_name("p1-t1", 0));
    fs::write(&f, "").unwrap();
    fs::set_permissions(&f, fs::Permissions::from_mode(0o644)).unwrap();
    let err = ForensicLog::open_with_secret(&cfg(&dir, 1 << 20), start(), None)
        .err()
        .unwrap();
    assert!(err.to_string().contains("mode 0644"), "{err}");
}

#[test]
fn existing_file_with_wrong_owner_is_refused() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        skip::skipped("changing a file's owner needs root");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = log_dir(&tmp);
    files::prepare_dir(&dir, "log directory").unwrap();
    let f = dir.join(files::file_name("p1-t1", 0));
    fs::write(&f, "").unwrap();
    fs::set_permissions(&f, fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::chown(&f, Some(4242), None).unwrap();
    let err = ForensicLog::open_with_secret(&cfg(&dir, 1 << 20), start(), None)
        .err()
        .unwrap();
    assert!(err.to_string().contains("owned by uid 4242"), "{err}");
}

#[test]
fn keygen_never_overwrites() {
    let tmp = tempfile::tempdir().unwrap();
    let prefix = tmp.path().join("k");
    let (key, public) = kvhygiene::forensic::cli::keygen(&prefix).unwrap();
    assert_eq!(mode(&key), 0o600);
    assert_eq!(mode(&public), 0o644, "the public half is for auditors");
    let err = kvhygiene::forensic::cli::keygen(&prefix).unwrap_err();
    assert!(err.contains("k.key: already exists"), "{err}");
}

/// A prefix naming a directory (`DIR/` or `DIR`) is refused: it would write `DIR/.key`, a
/// hidden file, or `DIR.key` beside the directory, not the keys the user asked for in it.
#[test]
fn keygen_refuses_a_directory_for_a_prefix() {
    let tmp = tempfile::tempdir().unwrap();
    let slash = format!("{}/", tmp.path().display());
    for prefix in [std::path::PathBuf::from(slash), tmp.path().to_path_buf()] {
        let err = kvhygiene::forensic::cli::keygen(&prefix).unwrap_err();
        assert!(
            err.contains("names a directory, not a file prefix"),
            "{err}"
        );
    }
    assert_eq!(
        std::fs::read_dir(tmp.path()).unwrap().count(),
        0,
        "wrote something"
    );
}

/// A prefix ending in `.key` or `.pub` would write `x.key.key` and `x.key.pub`, and a policy
/// naming `x.key` would then name nothing: refused, the prefix meant said, nothing written.
#[test]
fn keygen_refuses_a_prefix_that_already_ends_in_an_extension() {
    let tmp = tempfile::tempdir().unwrap();
    for name in ["signing.key", "signing.pub"] {
        let err = kvhygiene::forensic::cli::keygen(&tmp.path().join(name)).unwrap_err();
        let meant = tmp.path().join("signing");
        assert!(
            err.contains(&format!("give --out {}", meant.display())),
            "{err}"
        );
    }
    assert_eq!(
        std::fs::read_dir(tmp.path()).unwrap().count(),
        0,
        "wrote something"
    );
    // A name that only contains the extension is a prefix like any other.
    let (private, _) = kvhygiene::forensic::cli::keygen(&tmp.path().join("a.keyring")).unwrap();
    assert!(private.ends_with("a.keyring.key"));
}

/// The prefix a refused `--out` names is one keygen takes: following the message writes the
/// pair, including for a name that ends in both extensions (`a.pub.key`).
#[test]
fn keygen_accepts_the_prefix_its_refusal_names() {
    let tmp = tempfile::tempdir().unwrap();
    for name in ["a.pub.key", "b.key.key", "c.key.pub"] {
        let err = kvhygiene::forensic::cli::keygen(&tmp.path().join(name)).unwrap_err();
        let meant = err
            .split("give --out ")
            .nth(1)
            .and_then(|rest| rest.split(" for ").next())
            .unwrap_or_else(|| panic!("{name}: no prefix named: {err}"));
        if let Err(again) = kvhygiene::forensic::cli::keygen(std::path::Path::new(meant)) {
            panic!("--out {name} was refused with \"{err}\"; --out {meant} then: \"{again}\"");
        }
    }
}

/// An existing PREFIX.pub stops keygen before it writes anything: no private key is left
/// behind without its public half.
#[test]
fn keygen_leaves_no_half_pair() {
    let tmp = tempfile::tempdir().unwrap();
    let prefix = tmp.path().join("k2");
    fs::write(tmp.path().join("k2.pub"), "someone else's\n").unwrap();
    let err = kvhygiene::forensic::cli::keygen(&prefix).unwrap_err();
    assert!(err.contains("k2.pub: already exists"), "{err}");
    assert!(!tmp.path().join("k2.key").exists());
    // A directory that cannot be written: a clear error naming the file, nothing left.
    let err = kvhygiene::forensic::cli::keygen(&tmp.path().join("missing/k3")).unwrap_err();
    assert!(err.contains("k3.key: cannot create the key file"), "{err}");
}

#[test]
fn key_files_readable_by_others_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = log_dir(&tmp);
    let (key, _) = kvhygiene::forensic::cli::keygen(&tmp.path().join("k")).unwrap();
    fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
    let mut c = cfg(&dir, 1 << 20);
    c.signing_key_file = Some(key);
    let err = ForensicLog::open_with_secret(&c, start(), None)
        .err()
        .unwrap();
    assert!(err.to_string().contains("mode 0644"), "{err}");
    assert!(
        err.to_string().contains("KVH_SIGNING_KEY_FILE: "),
        "names the setting: {err}"
    );

    let hmac = tmp.path().join("hmac.key");
    fs::write(&hmac, "a-secret-of-enough-length\n").unwrap();
    fs::set_permissions(&hmac, fs::Permissions::from_mode(0o640)).unwrap();
    let err = kvhygiene::forensic::keys::read_key_file(&hmac)
        .err()
        .unwrap();
    assert!(err.to_string().contains("mode 0640"), "{err}");
    let err = kvhygiene::forensic::keys::load_secret(Some(&hmac))
        .err()
        .unwrap();
    assert!(err.to_string().contains("KVH_HMAC_KEY_FILE: "), "{err}");
    fs::set_permissions(&hmac, fs::Permissions::from_mode(0o600)).unwrap();
    assert!(kvhygiene::forensic::keys::read_key_file(&hmac).is_ok());
    // A short key: the reason once, under the setting and the path.
    fs::write(&hmac, "short\n").unwrap();
    let err = kvhygiene::forensic::keys::load_secret(Some(&hmac))
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("KVH_HMAC_KEY_FILE: ") && err.contains("is 5 bytes"),
        "{err}"
    );
    assert_eq!(err.matches("forensic log key").count(), 1, "{err}");
}

/// Runs `verify_all` on another thread so that a hang fails the test instead of the run.
fn verify_bounded(
    dir: &std::path::Path,
    opts: kvhygiene::forensic::VerifyOptions,
) -> Result<kvhygiene::forensic::Report, kvhygiene::forensic::verify::VerifyError> {
    let (tx, rx) = std::sync::mpsc::channel();
    let d = dir.to_path_buf();
    std::thread::spawn(move || {
        let _ = tx.send(kvhygiene::forensic::verify_all(&d, &opts));
    });
    rx.recv_timeout(std::time::Duration::from_secs(20))
        .expect("verify-log hung on a planted file")
}

fn mkfifo(p: &std::path::Path) {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
    // SAFETY: `c` is a valid NUL-terminated path for the duration of the call.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
}

#[test]
fn planted_fifo_symlink_and_directory_are_problems_of_their_chain() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = log_dir(&tmp);
    write_log(&cfg(&dir, 1 << 20), 3, true);
    mkfifo(&dir.join("kvh-p7-t7-000000.jsonl"));
    symlink("/dev/zero", dir.join("kvh-p8-t8-000000.jsonl")).unwrap();
    fs::create_dir(dir.join("kvh-p9-t9-000000.jsonl")).unwrap();
    let r = verify_bounded(&dir, keyed_opts()).expect("a planted file is not a usage error");
    assert_eq!(r.exit_code(), 1);
    assert_eq!(r.chains.len(), 4);
    let bad: Vec<_> = r.chains.iter().filter(|c| !c.ok()).collect();
    assert_eq!(bad.len(), 3, "{r:?}");
    for c in bad {
        let p = c.problem.as_ref().unwrap();
        assert_eq!(p.file, format!("kvh-{}-000000.jsonl", c.chain), "{p}");
        assert!(p.reason.contains("cannot read"), "{p}");
    }
}

#[test]
fn planted_fifo_checkpoint_does_not_hang_verify() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = log_dir(&tmp);
    let (key, public) = kvhygiene::forensic::cli::keygen(&tmp.path().join("k")).unwrap();
    let mut c = cfg(&dir, 1 << 20);
    c.signing_key_file = Some(key);
    write_log(&c, 3, true);
    mkfifo(&dir.join("kvh-p7-t7.ckpt"));
    let opts = kvhygiene::forensic::VerifyOptions {
        hmac_keys: vec![kvhygiene::forensic::SealKey::new("hmac.key", secret())],
        public_keys: vec![kvhygiene::forensic::keys::read_public_key(&public).unwrap()],
        checkpoints: vec![dir.clone()],
        ..Default::default()
    };
    let r = verify_bounded(&dir, opts).expect("a planted checkpoint is not a usage error");
    assert_eq!(r.exit_code(), 1);
    assert!(
        r.errors.iter().any(|e| e.contains("kvh-p7-t7.ckpt")),
        "{r:?}"
    );
}

#[test]
fn key_files_must_not_be_symlinks_and_must_be_ours() {
    let tmp = tempfile::tempdir().unwrap();
    let real = tmp.path().join("real.key");
    fs::write(&real, SECRET).unwrap();
    fs::set_permissions(&real, fs::Permissions::from_mode(0o600)).unwrap();
    let link = tmp.path().join("link.key");
    symlink(&real, &link).unwrap();
    let err = kvhygiene::forensic::keys::read_key_file(&link)
        .err()
        .unwrap();
    assert!(err.to_string().contains("symlink"), "{err}");
    assert!(kvhygiene::forensic::keys::read_key_file(&real).is_ok());
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        skip::skipped("changing a file's owner needs root");
        return;
    }
    std::os::unix::fs::chown(&real, Some(4242), None).unwrap();
    let err = kvhygiene::forensic::keys::read_key_file(&real)
        .err()
        .unwrap();
    assert!(err.to_string().contains("owned by uid 4242"), "{err}");
}

const ENV_CHILD: &str = "KVH_FORENSIC_ENV_SECRET_CHILD";
const ENV_SECRET: &str = "env-secret-in-proc-0123456789";

/// In the child (re-executed test binary): loads the secret inherited at exec, then exits 0
/// only if /proc/self/environ no longer shows it. In a normal test run it returns at once.
#[test]
fn env_secret_child_entry() {
    if std::env::var_os(ENV_CHILD).is_none() {
        return;
    }
    let key = kvhygiene::forensic::keys::load_secret(None).unwrap();
    assert!(key.is_some());
    let environ = fs::read("/proc/self/environ").unwrap();
    let needle = ENV_SECRET.as_bytes();
    let shown = environ.windows(needle.len()).any(|w| w == needle);
    std::process::exit(if shown { 3 } else { 0 });
}

#[test]
fn env_secret_is_wiped_from_proc_self_environ() {
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["env_secret_child_entry", "--exact", "--test-threads=1"])
        .env(ENV_CHILD, "1")
        .env(kvhygiene::forensic::keys::SECRET_ENV, ENV_SECRET)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert_eq!(
        status.code(),
        Some(0),
        "the secret is still in /proc/self/environ"
    );
}

/// The log directory is checked when the log opens (a real directory, ours, 0700). A writer
/// that rotates later creates its next file in that same directory: when the directory's
/// path has since been replaced by a symlink to a directory someone else owns and may
/// write, the writer neither follows the link nor writes its chain there.
#[test]
fn rotation_never_follows_a_symlink_put_at_the_log_directory_path() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = log_dir(&tmp);
    let log = ForensicLog::open_with_secret(&cfg(&dir, 4096), start(), None).unwrap();
    log.emit(event(0));
    log.flush();
    // The directory is moved away and its path now names another user's open directory.
    let moved = tmp.path().join("log.moved");
    fs::rename(&dir, &moved).unwrap();
    let other = tmp.path().join("someone-else");
    fs::create_dir(&other).unwrap();
    std::os::unix::fs::chown(&other, Some(4242), Some(4242)).unwrap();
    fs::set_permissions(&other, fs::Permissions::from_mode(0o777)).unwrap();
    symlink(&other, &dir).unwrap();
    // Enough records for several rotations at 4 KiB a file.
    for i in 1..100 {
        log.emit(event(i));
    }
    log.stop();
    let planted: Vec<String> = fs::read_dir(&other)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        planted.is_empty(),
        "the writer followed the symlink and wrote into a directory owned by uid 4242: {planted:?}"
    );
}

const ENV_OFF_CHILD: &str = "KVH_FORENSIC_ENV_SECRET_LOG_OFF_CHILD";

/// In the child (re-executed test binary): opens the log with no log directory (logging
/// off), then exits 0 only if the secret inherited at exec is neither in the environment
/// (inherited by every child process) nor in /proc/self/environ. In a normal test run it
/// returns at once.
#[test]
fn env_secret_log_off_child_entry() {
    if std::env::var_os(ENV_OFF_CHILD).is_none() {
        return;
    }
    let c = kvhygiene::config::LogConfig {
        dir: None,
        ..kvhygiene::config::Config::default().log
    };
    assert!(ForensicLog::open(&c, start()).unwrap().is_none());
    let environ = fs::read("/proc/self/environ").unwrap();
    let needle = ENV_SECRET.as_bytes();
    let shown = environ.windows(needle.len()).any(|w| w == needle);
    let inherited = std::env::var_os(kvhygiene::forensic::keys::SECRET_ENV).is_some();
    std::process::exit(if shown || inherited { 3 } else { 0 });
}

/// `FORENSIC_HMAC_SECRET` is taken out of the environment (and wiped from
/// /proc/self/environ) when the library opens its log, also when logging is off
/// (`KVH_LOG_DIR` unset): the secret of the deployment's chains is not left for every child
/// process and every reader of /proc/<pid>/environ.
#[test]
fn env_secret_is_removed_even_when_logging_is_off() {
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "env_secret_log_off_child_entry",
            "--exact",
            "--test-threads=1",
        ])
        .env(ENV_OFF_CHILD, "1")
        .env(kvhygiene::forensic::keys::SECRET_ENV, ENV_SECRET)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert_eq!(
        status.code(),
        Some(0),
        "with logging off the secret stays in the environment"
    );
}

/// With checkpoints in the log directory (`KVH_CHECKPOINT_DIR` unset), the writer's signed
/// checkpoints are files of that directory as its chain files are: when the directory's path
/// has been replaced by a symlink to a directory someone else owns and may write, the final
/// checkpoint at `stop` is neither written through the link nor missing from the directory
/// the writer checked.
#[test]
fn checkpoints_never_follow_a_symlink_put_at_the_log_directory_path() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = log_dir(&tmp);
    let (key, _) = kvhygiene::forensic::cli::keygen(&tmp.path().join("k")).unwrap();
    let mut c = cfg(&dir, 1 << 20);
    c.signing_key_file = Some(key);
    let log = ForensicLog::open_with_secret(&c, start(), None).unwrap();
    log.emit(event(0));
    log.flush();
    let chain = log.stats().chain.unwrap();
    let moved = tmp.path().join("log.moved");
    fs::rename(&dir, &moved).unwrap();
    let other = tmp.path().join("someone-else");
    fs::create_dir(&other).unwrap();
    std::os::unix::fs::chown(&other, Some(4242), Some(4242)).unwrap();
    fs::set_permissions(&other, fs::Permissions::from_mode(0o777)).unwrap();
    symlink(&other, &dir).unwrap();
    for i in 1..10 {
        log.emit(event(i));
    }
    log.stop();
    let planted: Vec<String> = fs::read_dir(&other)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        planted.is_empty(),
        "the writer followed the symlink and wrote into a directory owned by uid 4242: {planted:?}"
    );
    use kvhygiene::forensic::checkpoint;
    let ckpt = checkpoint::peek(&checkpoint::path_for(&moved, &chain))
        .unwrap()
        .expect("a checkpoint in the log directory");
    assert!(
        ckpt.seq >= 10,
        "the checkpoint of the stop was not written there: {ckpt:?}"
    );
}

/// A checkpoint directory (`KVH_CHECKPOINT_DIR`) that fails the directory checks is refused
/// with a message that calls it the checkpoint directory: the log directory is fine, and an
/// operator sent to it finds nothing wrong there.
#[test]
fn a_refused_checkpoint_directory_is_named_as_the_checkpoint_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = log_dir(&tmp);
    let (key, _) = kvhygiene::forensic::cli::keygen(&tmp.path().join("k")).unwrap();
    let ckpt = tmp.path().join("checkpoints");
    fs::create_dir(&ckpt).unwrap();
    fs::set_permissions(&ckpt, fs::Permissions::from_mode(0o755)).unwrap();
    let mut c = cfg(&dir, 1 << 20);
    c.signing_key_file = Some(key);
    c.checkpoint_dir = Some(ckpt.clone());
    let err = ForensicLog::open_with_secret(&c, start(), None)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("mode 0755"), "{err}");
    assert!(
        !err.contains("log directory") && err.contains("checkpoint"),
        "the message does not name the checkpoint directory: {err}"
    );
}

/// Runs the test `name` of this binary again in a child process as nobody (uid 65534) under
/// umask 0277, with `flag` set to `value` (the test then plays the child), and checks that it
/// ran and passed. For the directory-creation tests: root would not be stopped by a parent
/// without owner write.
fn rerun_as_nobody_under_umask_0277(name: &str, flag: &str, value: &std::path::Path) {
    let mut child = std::process::Command::new(std::env::current_exe().unwrap());
    child
        .args(["--exact", name, "--nocapture"])
        .env(flag, value);
    // SAFETY: only async-signal-safe calls (umask, setgroups, setgid, setuid) between fork and
    // exec.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut child, || {
            libc::umask(0o277);
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(65534) != 0
                || libc::setuid(65534) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = child.output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("1 passed"), "the child ran no test: {text}");
}

/// Set in the child process of the test below.
const UMASK_CHILD: &str = "KVHYGIENE_TEST_PREPARE_DIR_UMASK_CHILD";

/// Under a umask that takes away the owner's write permission (0277), a log directory whose
/// parents are missing too is still created: each level 0700, its mode set exactly (a parent
/// left 0500 would refuse the next level to anyone but root, so the child runs as nobody).
#[test]
fn a_log_directory_with_missing_parents_is_created_under_a_umask_without_owner_write() {
    if let Some(dir) = std::env::var_os(UMASK_CHILD) {
        let dir = std::path::PathBuf::from(dir);
        files::prepare_dir(&dir, "log directory").unwrap();
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(dir.parent().unwrap()), 0o700);
        return;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return; // the owner's missing write permission stops only an unprivileged uid
    }
    let tmp = tempfile::tempdir().unwrap();
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o777)).unwrap();
    let dir = tmp.path().join("a/b/log");
    rerun_as_nobody_under_umask_0277(
        "a_log_directory_with_missing_parents_is_created_under_a_umask_without_owner_write",
        UMASK_CHILD,
        &dir,
    );
    assert_eq!(mode(&dir), 0o700);
}

/// Set in the child process of the test below.
const RACE_CHILD: &str = "KVHYGIENE_TEST_PREPARE_DIR_RACE_CHILD";

/// Two processes starting at once under a umask without owner write (0277), both creating
/// the same log directory whose parents are missing: each start-up succeeds, whichever
/// creates a level first (a level another creates meanwhile is taken as it is). Shown with
/// two threads of an unprivileged child, over many fresh directories.
#[test]
fn two_start_ups_creating_the_same_missing_parents_under_a_narrow_umask_both_succeed() {
    if let Some(root) = std::env::var_os(RACE_CHILD) {
        let root = std::path::PathBuf::from(root);
        for i in 0..300 {
            let dir = root.join(format!("r{i}/a/b/log"));
            let barrier = std::sync::Barrier::new(2);
            let results: Vec<Result<(), String>> = std::thread::scope(|s| {
                let hs: Vec<_> = (0..2)
                    .map(|_| {
                        s.spawn(|| {
                            barrier.wait();
                            files::prepare_dir(&dir, "log directory").map_err(|e| e.to_string())
                        })
                    })
                    .collect();
                hs.into_iter().map(|h| h.join().unwrap()).collect()
            });
            for r in results {
                if let Err(e) = r {
                    panic!("round {i}: a start-up failed: {e}");
                }
            }
        }
        return;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return; // the owner's missing write permission stops only an unprivileged uid
    }
    let tmp = tempfile::tempdir().unwrap();
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o777)).unwrap();
    rerun_as_nobody_under_umask_0277(
        "two_start_ups_creating_the_same_missing_parents_under_a_narrow_umask_both_succeed",
        RACE_CHILD,
        tmp.path(),
    );
}

/// A chain file name at which a FIFO was planted as the newest file of its chain: the
/// start-up refuses it (not a regular file) at once, as it refuses any other file that is
/// not a regular file; it does not wait for a reader to open the FIFO.
#[test]
fn a_fifo_planted_as_the_newest_chain_file_is_refused_without_waiting() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = log_dir(&tmp);
    write_log(&cfg(&dir, 1 << 20), 3, true);
    let fifo = dir.join("kvh-p7-t7-000000.jsonl");
    mkfifo(&fifo);
    let (tx, rx) = std::sync::mpsc::channel();
    let c = cfg(&dir, 1 << 20);
    std::thread::spawn(move || {
        let r = ForensicLog::open_with_secret(&c, start(), Some(secret())).map(|log| log.stop());
        let _ = tx.send(r.map_err(|e| e.to_string()));
    });
    let outcome = rx.recv_timeout(std::time::Duration::from_secs(10));
    if outcome.is_err() {
        // Let the start-up go: a reader of the FIFO ends its wait.
        use std::os::unix::fs::OpenOptionsExt;
        let _reader = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&fifo);
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let result = outcome.expect("the start-up waited on a FIFO planted at a chain file name");
    let err = result.expect_err("a FIFO at a chain file name was accepted");
    assert!(err.contains("not a regular file"), "{err}");
}

/// Set in the child process of the test below.
const OWN_PARENT_CHILD: &str = "KVHYGIENE_TEST_PREPARE_DIR_OWN_PARENT_CHILD";

/// A log directory to be created in a directory of the user's that the user made read-only
/// (0500, existing before the start-up): the creation fails, naming the level, and the
/// user's directory keeps its mode. Only the levels the start-up creates itself are given
/// mode 0700.
#[test]
fn an_existing_read_only_directory_of_the_user_keeps_its_mode() {
    if let Some(home) = std::env::var_os(OWN_PARENT_CHILD) {
        let home = std::path::PathBuf::from(home);
        let result = files::prepare_dir(&home.join("logs/log"), "log directory");
        assert_eq!(
            mode(&home),
            0o500,
            "the mode of an existing directory was changed (prepare_dir gave {result:?})"
        );
        assert!(result.is_err(), "created in a read-only directory");
        return;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return; // the read-only directory stops only an unprivileged uid
    }
    let tmp = tempfile::tempdir().unwrap();
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o777)).unwrap();
    let home = tmp.path().join("home");
    fs::create_dir(&home).unwrap();
    std::os::unix::fs::chown(&home, Some(65534), Some(65534)).unwrap();
    fs::set_permissions(&home, fs::Permissions::from_mode(0o500)).unwrap();
    rerun_as_nobody_under_umask_0277(
        "an_existing_read_only_directory_of_the_user_keeps_its_mode",
        OWN_PARENT_CHILD,
        &home,
    );
}

/// A directory at the name of a chain's newest file (mode 0755, as `mkdir` leaves it): the
/// start-up and `kvh preflight`'s check refuse it as what it is, not a regular file, rather
/// than naming a mode that no change would make acceptable (a directory made 0600 is still
/// refused).
#[test]
fn a_directory_at_the_newest_chain_file_name_is_refused_as_not_a_regular_file() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = log_dir(&tmp);
    write_log(&cfg(&dir, 1 << 20), 3, true);
    let planted = dir.join("kvh-p7-t7-000000.jsonl");
    fs::create_dir(&planted).unwrap();
    fs::set_permissions(&planted, fs::Permissions::from_mode(0o755)).unwrap();
    let found = kvhygiene::forensic::recovery::check_chain_files(&dir)
        .expect_err("a directory at a chain file name was accepted")
        .to_string();
    let started = ForensicLog::open_with_secret(&cfg(&dir, 1 << 20), start(), Some(secret()))
        .map(|log| log.stop());
    let err = started
        .expect_err("a directory at a chain file name was accepted")
        .to_string();
    for msg in [&found, &err] {
        assert!(
            msg.contains("not a regular file") || msg.contains("directory"),
            "{msg}"
        );
        assert!(!msg.contains("mode 0755"), "{msg}");
    }
}

/// A log directory named through `..` (`home/x/../log`, `x` not there yet): the directory the
/// name passes through that existed before the start-up (`home`, the user's own, 0300 on
/// purpose: no listing) keeps its mode; only the levels the start-up creates are given 0700.
#[test]
fn an_existing_directory_named_through_dot_dot_keeps_its_mode() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    fs::create_dir(&home).unwrap();
    fs::set_permissions(&home, fs::Permissions::from_mode(0o300)).unwrap();
    let result = files::prepare_dir(&home.join("x/../log"), "log directory");
    let after = mode(&home);
    fs::set_permissions(&home, fs::Permissions::from_mode(0o700)).unwrap();
    assert_eq!(
        after, 0o300,
        "the mode of an existing directory was changed (prepare_dir gave {result:?})"
    );
}

/// Set in the child process of the test below.
const FINISHING_CHILD: &str = "KVHYGIENE_TEST_PREPARE_DIR_FINISHING_CHILD";

/// A start-up that begins just after another one (a worker per GPU, umask 0277) created a
/// parent level and before that one set its mode (0500 for a moment, 0700 a few system calls
/// later): the log directory is still created, as the doc comment of `prepare_dir` says of a
/// level another process starting too created meanwhile. The level's creator sets its mode
/// here 100 ms later.
#[test]
fn a_start_up_beginning_while_another_finishes_a_parent_level_succeeds() {
    if let Some(root) = std::env::var_os(FINISHING_CHILD) {
        let level = std::path::PathBuf::from(root).join("a/b");
        let other = {
            let level = level.clone();
            std::thread::spawn(move || {
                std::thread::sleep(std::time::Duration::from_millis(100));
                fs::set_permissions(&level, fs::Permissions::from_mode(0o700)).unwrap();
            })
        };
        let result = files::prepare_dir(&level.join("log"), "log directory");
        other.join().unwrap();
        assert!(result.is_ok(), "{result:?}");
        return;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return; // the mode of the level stops only an unprivileged uid
    }
    let tmp = tempfile::tempdir().unwrap();
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o777)).unwrap();
    let a = tmp.path().join("a");
    let b = a.join("b");
    fs::create_dir_all(&b).unwrap();
    for (level, m) in [(&a, 0o700), (&b, 0o500)] {
        std::os::unix::fs::chown(level, Some(65534), Some(65534)).unwrap();
        fs::set_permissions(level, fs::Permissions::from_mode(m)).unwrap();
    }
    rerun_as_nobody_under_umask_0277(
        "a_start_up_beginning_while_another_finishes_a_parent_level_succeeds",
        FINISHING_CHILD,
        tmp.path(),
    );
}

/// Set in the child process of the test below.
const FINISHING_LAST_CHILD: &str = "KVHYGIENE_TEST_PREPARE_DIR_FINISHING_LAST_CHILD";

/// As above, for the log directory itself: a start-up that begins just after another one
/// (a worker per GPU, umask 0277) created the log directory and before that one set its mode
/// (0500 for a moment, 0700 a few system calls later) succeeds, as it does when the level
/// created meanwhile is a parent, and as it did before the start-up checked writability. The
/// directory's creator sets its mode here 100 ms later.
#[test]
fn a_start_up_beginning_while_another_finishes_the_log_directory_succeeds() {
    if let Some(root) = std::env::var_os(FINISHING_LAST_CHILD) {
        let dir = std::path::PathBuf::from(root).join("a/log");
        let other = {
            let dir = dir.clone();
            std::thread::spawn(move || {
                std::thread::sleep(std::time::Duration::from_millis(100));
                fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();
            })
        };
        let result = files::prepare_dir(&dir, "log directory");
        other.join().unwrap();
        assert!(
            result.is_ok(),
            "a log directory another start-up was finishing was refused: {result:?}"
        );
        return;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return; // the mode of the level stops only an unprivileged uid
    }
    let tmp = tempfile::tempdir().unwrap();
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o777)).unwrap();
    let a = tmp.path().join("a");
    let log = a.join("log");
    fs::create_dir_all(&log).unwrap();
    for (level, m) in [(&a, 0o700), (&log, 0o500)] {
        std::os::unix::fs::chown(level, Some(65534), Some(65534)).unwrap();
        fs::set_permissions(level, fs::Permissions::from_mode(m)).unwrap();
    }
    rerun_as_nobody_under_umask_0277(
        "a_start_up_beginning_while_another_finishes_the_log_directory_succeeds",
        FINISHING_LAST_CHILD,
        tmp.path(),
    );
}

/// A key file is never read through a symlink (`read_private`: "a link planted at the
/// configured path could point at a file an attacker controls"). That holds for a path ending
/// in `.pub` too: a link named `hmac.pub` to `kvh keygen`'s public key is expected to be
/// refused as a symlink, without the target being opened and judged by its contents.
#[test]
fn a_pub_key_file_that_is_a_symlink_is_refused_as_a_link_before_anything_is_read() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, public) = kvhygiene::forensic::cli::keygen(&tmp.path().join("ckpt")).unwrap();
    fs::set_permissions(&public, fs::Permissions::from_mode(0o600)).unwrap();
    let link = tmp.path().join("hmac.pub");
    symlink(&public, &link).unwrap();
    let err = kvhygiene::forensic::keys::read_key_file(&link)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("symlink"),
        "a KVH_HMAC_KEY_FILE that is a symlink was read through the link: {err}"
    );
}

/// A key file that group or others can read, or that another user owns, is refused for that,
/// whatever else is wrong with it (docs/forensic-log.md, `KVH_HMAC_KEY_FILE`: "refused unless
/// it is a regular file (≤ 64 KiB) owned by the effective uid that group and others have no
/// access to"): the access check is made on the opened file before its bytes are read, so a
/// file larger than a key that others can read is named for its mode (or owner), for the HMAC
/// key file and the signing key file alike.
#[test]
fn a_key_file_too_large_and_readable_by_others_is_refused_for_its_mode() {
    let tmp = tempfile::tempdir().unwrap();
    let hmac = tmp.path().join("hmac.key");
    let signer = tmp.path().join("signer.key");
    for p in [&hmac, &signer] {
        fs::write(p, vec![b'k'; 70 * 1024]).unwrap();
        fs::set_permissions(p, fs::Permissions::from_mode(0o644)).unwrap();
    }
    let err = hmac_key_refusal(&hmac);
    assert!(
        err.contains("KVH_HMAC_KEY_FILE: ") && err.contains("mode 0644"),
        "a 70 KiB KVH_HMAC_KEY_FILE of mode 0644: {err}"
    );
    let err = kvhygiene::forensic::keys::read_signing_key(&signer)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("mode 0644"),
        "a 70 KiB signing key file of mode 0644: {err}"
    );
    refused_for_its_owner_as_root(&hmac);
}

/// Why `p`, as `KVH_HMAC_KEY_FILE`, is refused (it must be).
fn hmac_key_refusal(p: &std::path::Path) -> String {
    kvhygiene::forensic::keys::load_secret(Some(p))
        .err()
        .unwrap()
        .to_string()
}

/// As root: `p`, made 0600 and given to uid 4242, is refused as the writer's key file for its
/// owner (whatever else is wrong with it).
fn refused_for_its_owner_as_root(p: &std::path::Path) {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        skip::skipped("changing a file's owner needs root");
        return;
    }
    fs::set_permissions(p, fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::chown(p, Some(4242), None).unwrap();
    let err = kvhygiene::forensic::keys::read_key_file(p)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("owned by uid 4242"),
        "a 70 KiB key file {} of uid 4242: {err}",
        p.display()
    );
}

/// The exception that reads a key file before judging its owner and mode is for `kvh keygen`'s
/// public key only (64 hex digits and a newline). A file whose name ends in `.pub` but that
/// cannot be such a key (here 70 KiB) is judged as any other key file: it is refused for its
/// mode when group and others can read it, and for its owner when another uid owns it, as
/// `hmac.key` is above.
#[test]
fn a_pub_key_file_too_large_and_readable_by_others_is_refused_for_its_mode() {
    let tmp = tempfile::tempdir().unwrap();
    let hmac = tmp.path().join("hmac.pub");
    fs::write(&hmac, vec![b'k'; 70 * 1024]).unwrap();
    fs::set_permissions(&hmac, fs::Permissions::from_mode(0o644)).unwrap();
    let err = hmac_key_refusal(&hmac);
    assert!(
        err.contains("KVH_HMAC_KEY_FILE: ") && err.contains("mode 0644"),
        "a 70 KiB KVH_HMAC_KEY_FILE named hmac.pub of mode 0644: {err}"
    );
    refused_for_its_owner_as_root(&hmac);
}

/// `kvh keygen`'s public key given as the writer's HMAC key file is refused as the public key
/// it is, as the verifiers refuse it (`is_keygen_public_key`: 64 lower-case hex digits, after
/// the trailing whitespace): a copy of `PREFIX.pub` whose line ends in CRLF (66 bytes, as a
/// Windows editor or a Secret built from a CRLF file writes it), or that ends in a blank line,
/// is expected to be named as kvh keygen's public key at mode 0644 (not for its mode) and at
/// mode 0600 (not accepted as an HMAC secret).
#[test]
fn a_keygen_public_key_with_crlf_or_a_blank_line_is_refused_as_a_public_key_by_the_writer() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, public) = kvhygiene::forensic::cli::keygen(&tmp.path().join("ckpt")).unwrap();
    let hex = fs::read_to_string(&public).unwrap().trim_end().to_string();
    assert_eq!(hex.len(), 64);
    for (name, ending) in [("crlf.pub", "\r\n"), ("blank.pub", "\n\n")] {
        let p = tmp.path().join(name);
        fs::write(&p, format!("{hex}{ending}")).unwrap();
        for m in [0o600, 0o644] {
            fs::set_permissions(&p, fs::Permissions::from_mode(m)).unwrap();
            let got = kvhygiene::forensic::keys::load_secret(Some(&p)).map(|k| k.is_some());
            let err = match got {
                Ok(loaded) => panic!(
                    "{name} (kvh keygen's public key ending in {ending:?}) of mode {m:04o} was \
                     accepted as the HMAC secret (loaded: {loaded})"
                ),
                Err(e) => e.to_string(),
            };
            assert!(
                err.contains("KVH_HMAC_KEY_FILE: ") && err.contains("kvh keygen's public key"),
                "{name} (kvh keygen's public key ending in {ending:?}) of mode {m:04o} is not \
                 named as a public key: {err}"
            );
        }
    }
}

/// Whether a `.pub` file of 64 hex digits is taken for `kvh keygen`'s public key does not
/// depend on the digits: an HMAC secret written as hex into such a file is refused by the
/// writer for every key, also the keys whose digits are no Ed25519 point (about half of
/// them), so a secret that loaded once does not fail on the next rotation.
#[test]
fn a_hex_secret_in_a_pub_file_is_refused_whatever_its_digits() {
    use sha2::{Digest, Sha256};
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("hmac.pub");
    let mut points = [0usize; 2];
    for i in 0u32..16 {
        let digits: [u8; 32] = Sha256::digest(i.to_le_bytes()).into();
        let is_point = ed25519_dalek::VerifyingKey::from_bytes(&digits).is_ok();
        points[usize::from(is_point)] += 1;
        let hex: String = digits.iter().map(|b| format!("{b:02x}")).collect();
        fs::write(&p, format!("{hex}\n")).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
        let err = match kvhygiene::forensic::keys::load_secret(Some(&p)) {
            Ok(_) => panic!("hex secret {i} (an Ed25519 point: {is_point}) in hmac.pub loaded"),
            Err(e) => e.to_string(),
        };
        assert!(
            err.contains("kvh keygen's public key") && err.contains("must be named otherwise"),
            "hex secret {i} (an Ed25519 point: {is_point}) in hmac.pub: {err}"
        );
    }
    assert!(
        points[0] > 0 && points[1] > 0,
        "the digits tried cover both points and non-points: {points:?}"
    );
}

/// Set in the child process of the test below.
const READ_ONLY_CLOSED_CHILD: &str = "KVHYGIENE_TEST_READ_ONLY_CLOSED_CHAIN_CHILD";

/// A chain that ended with its `stop` record is never written again, so its files may be
/// made read-only (0400: still ours, no group or other access). A later start-up by the same
/// (unprivileged) user is not stopped by them: it starts a chain of its own, and the closed
/// chain still verifies. The child runs as nobody, since root may open a 0400 file to write.
#[test]
fn a_closed_chain_made_read_only_does_not_stop_a_later_start_up() {
    let body = |dir: &std::path::Path| {
        let c = cfg(dir, 1 << 20);
        let log = ForensicLog::open_with_secret(&c, start(), None).unwrap();
        log.emit(event(0));
        log.stop();
        for f in chain_files(dir) {
            fs::set_permissions(&f, fs::Permissions::from_mode(0o400)).unwrap();
        }
        let log = ForensicLog::open_with_secret(&c, start(), None)
            .map_err(|e| e.to_string())
            .expect("a start-up after a closed chain made read-only");
        log.stop();
        let r = verify(dir, &Default::default());
        assert!(r.ok(), "{:?}", r.first_problem());
        assert_eq!(r.chains.len(), 2, "{r:?}");
    };
    if let Some(dir) = std::env::var_os(READ_ONLY_CLOSED_CHILD) {
        body(std::path::Path::new(&dir));
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        body(&log_dir(&tmp));
        return;
    }
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o777)).unwrap();
    rerun_as_nobody_under_umask_0277(
        "a_closed_chain_made_read_only_does_not_stop_a_later_start_up",
        READ_ONLY_CLOSED_CHILD,
        &tmp.path().join("log"),
    );
}

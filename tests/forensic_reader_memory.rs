//! `kvh verify-log`, `kvh evidence` and `kvh prune-log` read a chain file a line at a time
//! (and copy it through a buffer): a chain file larger than their memory limit (one rotated
//! at up to `KVH_LOG_MAX_BYTES`, 1 GiB, or one planted larger) is verified, reported on and
//! moved, where holding it whole would fail on allocation.

mod forensic_common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use forensic_common::{
    cfg, chain_files, event, least_address_space, secret, secret_key_file, start, status_limited,
};
use kvhygiene::events::EventSink;
use kvhygiene::forensic::ForensicLog;

/// Records a chain file of the test holds before its size is looked at again.
const BATCH: u64 = 2_000;

/// The chain file's size: larger than the memory the readers are given beyond a small
/// log's needs ([`HEADROOM`]), which holding it whole would take.
const FILE: u64 = 64 << 20;

/// Address space a reader may use beyond what it takes for a log of a few records.
const HEADROOM: u64 = 32 << 20;

/// A stopped log of one chain in `dir`, in one file of at least `bytes` (and `BATCH`
/// records): records of the usual size (a few hundred bytes), of the kinds the auditor's
/// report counts rather than lists.
fn write_one_file(dir: &Path, bytes: u64) {
    let log = ForensicLog::open_with_secret(&cfg(dir, 1 << 30), start(), Some(secret())).unwrap();
    let mut n = 0;
    loop {
        for _ in 0..BATCH {
            log.emit(event(n));
            n += 1;
        }
        log.flush();
        if chain_files(dir)
            .iter()
            .map(|f| f.metadata().unwrap().len())
            .sum::<u64>()
            >= bytes
        {
            break;
        }
    }
    log.stop();
}

/// `kvh VERB DIR`, with no `KVH_*` setting of the test's environment, its output dropped.
fn kvh(verb: &str, dir: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kvh"));
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("KVH_")) {
        cmd.env_remove(k);
    }
    cmd.arg(verb)
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    cmd
}

#[test]
fn a_chain_file_larger_than_the_memory_limit_is_verified_and_reported_on() {
    let tmp = tempfile::tempdir().unwrap();
    let small = tmp.path().join("small");
    write_one_file(&small, 0);
    let dir = tmp.path().join("log");
    write_one_file(&dir, FILE);
    let files = chain_files(&dir);
    assert_eq!(files.len(), 1, "one chain file");
    let len = std::fs::metadata(&files[0]).unwrap().len();
    assert!(len >= FILE, "the chain file is {len} bytes");
    for verb in ["verify-log", "evidence"] {
        let limit = least_address_space(|l| status_limited(&mut kvh(verb, &small), l) == Some(0))
            + HEADROOM;
        assert_eq!(
            status_limited(&mut kvh(verb, &dir), limit),
            Some(0),
            "kvh {verb} failed on a {} MiB chain file in {} MiB of address space",
            len >> 20,
            limit >> 20
        );
    }
}

/// A private copy of the log directory `src` at `dst` (the writer's modes), and an empty
/// private archive directory next to it: what one run of `kvh prune-log` takes.
fn fresh_copy(src: &Path, dst: &Path) -> (PathBuf, PathBuf) {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let _ = std::fs::remove_dir_all(dst);
    let (log, archive) = (dst.join("log"), dst.join("archive"));
    for d in [&log, &archive] {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(d)
            .unwrap();
    }
    for f in chain_files(src) {
        let to = log.join(f.file_name().unwrap());
        std::fs::copy(&f, &to).unwrap();
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    (log, archive)
}

/// `kvh prune-log` moving every file of the log in `src` (copied to `scratch` first) to an
/// archive, in `limit` bytes of address space: its exit code.
fn prune_limited(src: &Path, scratch: &Path, key: &Path, limit: u64) -> Option<i32> {
    let (log, archive) = fresh_copy(src, scratch);
    let mut cmd = kvh("prune-log", &log);
    cmd.arg("--archive-dir")
        .arg(&archive)
        .args(["--older-than", "0", "--key-file"])
        .arg(key);
    let code = status_limited(&mut cmd, limit);
    if code == Some(0) {
        assert!(chain_files(&log).is_empty(), "prune-log left chain files");
        assert_eq!(chain_files(&archive).len(), chain_files(src).len());
    }
    code
}

#[test]
fn a_chain_file_larger_than_the_memory_limit_is_moved() {
    let tmp = tempfile::tempdir().unwrap();
    let key = secret_key_file(tmp.path());
    let small = tmp.path().join("small");
    write_one_file(&small, 0);
    let scratch = tmp.path().join("scratch");
    let limit =
        least_address_space(|l| prune_limited(&small, &scratch, &key, l) == Some(0)) + HEADROOM;
    let dir = tmp.path().join("log");
    write_one_file(&dir, FILE);
    let len = std::fs::metadata(&chain_files(&dir)[0]).unwrap().len();
    assert_eq!(
        prune_limited(&dir, &scratch, &key, limit),
        Some(0),
        "kvh prune-log failed on a {} MiB chain file in {} MiB of address space",
        len >> 20,
        limit >> 20
    );
}

/// A chain file found under its name in both the log directory and an archive directory
/// (the state an interrupted `prune-log` leaves, which `verify-log --archive-dir` reads
/// once) is verified in the same bounded memory as one found in one place: comparing the two
/// copies reads them a buffer at a time, not whole.
#[test]
fn a_chain_file_in_both_the_log_and_an_archive_is_verified_in_bounded_memory() {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let tmp = tempfile::tempdir().unwrap();
    let private = |d: &Path| {
        std::fs::DirBuilder::new().mode(0o700).create(d).unwrap();
    };
    let twice = |dir: &Path| -> Command {
        let archive = dir.with_extension("archive");
        let mut cmd = kvh("verify-log", dir);
        cmd.arg("--archive-dir").arg(archive);
        cmd
    };
    let copy_to_archive = |dir: &Path| {
        let archive = dir.with_extension("archive");
        private(&archive);
        for f in chain_files(dir) {
            let to = archive.join(f.file_name().unwrap());
            std::fs::copy(&f, &to).unwrap();
            std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
    };
    let small = tmp.path().join("small");
    write_one_file(&small, 0);
    copy_to_archive(&small);
    let dir = tmp.path().join("log");
    write_one_file(&dir, FILE);
    copy_to_archive(&dir);
    let len = std::fs::metadata(&chain_files(&dir)[0]).unwrap().len();
    assert_eq!(
        twice(&dir).status().unwrap().code(),
        Some(0),
        "verify-log --archive-dir"
    );
    let limit =
        least_address_space(|l| status_limited(&mut twice(&small), l) == Some(0)) + HEADROOM;
    assert_eq!(
        status_limited(&mut twice(&dir), limit),
        Some(0),
        "kvh verify-log --archive-dir failed on a {} MiB chain file found in both directories, \
         in {} MiB of address space",
        len >> 20,
        limit >> 20
    );
}

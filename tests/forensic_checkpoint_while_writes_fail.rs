//! A signed log whose writes fail (a full disk) while a checkpoint falls due: the checkpoint
//! signed then covers the records already in the file (docs/forensic-log.md, "Signed
//! checkpoints"). The chain, its checkpoint and the record of the loss then verify with the
//! pinned public key, both as the files stand during the failure (a process that dies then)
//! and after the disk has room again, and a process that recovers the chain continues it.

#[path = "forensic_common/mod.rs"]
mod forensic_common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use forensic_common::{cfg, chain_files, event, keyed_opts, log_dir, read_lines, secret, start};
use kvhygiene::config::LogConfig;
use kvhygiene::events::EventSink;
use kvhygiene::forensic::checkpoint;
use kvhygiene::forensic::keys::read_public_key;
use kvhygiene::forensic::verify::{verify_all, VerifyOptions};
use kvhygiene::forensic::ForensicLog;
use serde_json::Value;

fn signed_cfg(tmp: &tempfile::TempDir, every: u64, interval_ms: u64) -> (LogConfig, PathBuf) {
    let (key, public) = kvhygiene::forensic::cli::keygen(&tmp.path().join("signer")).unwrap();
    let mut c = cfg(&log_dir(tmp), 1 << 20);
    c.signing_key_file = Some(key);
    c.checkpoint_dir = Some(tmp.path().join("ckpt"));
    c.checkpoint_every_records = every;
    c.checkpoint_interval_ms = interval_ms;
    (c, public)
}

fn pinned(public: &Path, ckpt: &Path) -> VerifyOptions {
    VerifyOptions {
        public_keys: vec![read_public_key(public).unwrap()],
        checkpoints: vec![ckpt.to_path_buf()],
        ..keyed_opts()
    }
}

fn copy_dir(from: &Path, to: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(to).unwrap();
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o700)).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

fn last_seq_on_disk(dir: &Path) -> u64 {
    chain_files(dir)
        .iter()
        .flat_map(|f| read_lines(f))
        .filter_map(|l| serde_json::from_str::<Value>(&l).ok())
        .filter_map(|v| v["seq"].as_u64())
        .max()
        .unwrap()
}

fn ckpt_seq(ckpt: &Path) -> Option<u64> {
    let f = checkpoint::find(ckpt).unwrap().into_iter().next()?;
    checkpoint::peek(&f).unwrap().map(|c| c.seq)
}

/// Events written, then a batch lost to a full disk; the log stays idle with its disk full
/// past the checkpoint interval. The log directory and the checkpoints are copied then (what
/// a process that dies during the failure leaves), then the disk has room again and the log
/// stops. Returns the copy's log and checkpoint directories.
fn full_disk_episode(c: &LogConfig, tmp: &tempfile::TempDir) -> (PathBuf, PathBuf) {
    let log = ForensicLog::open_with_secret(c, start(), Some(secret())).unwrap();
    for i in 0..5 {
        log.emit(event(i));
    }
    log.flush();
    log.inject_write_faults(1_000_000);
    for i in 5..12 {
        log.emit(event(i));
    }
    log.flush();
    std::thread::sleep(Duration::from_millis(600));
    let (cdir, cckpt) = (tmp.path().join("copy-log"), tmp.path().join("copy-ckpt"));
    copy_dir(&log_dir(tmp), &cdir);
    copy_dir(c.checkpoint_dir.as_ref().unwrap(), &cckpt);
    log.inject_write_faults(0);
    std::thread::sleep(Duration::from_millis(300));
    log.emit(event(99));
    log.stop();
    (cdir, cckpt)
}

#[test]
fn a_checkpoint_signed_while_writes_fail_verifies_after_the_disk_has_room() {
    let tmp = tempfile::tempdir().unwrap();
    let (c, public) = signed_cfg(&tmp, 0, 100);
    let _ = full_disk_episode(&c, &tmp);
    let r = verify_all(
        &log_dir(&tmp),
        &pinned(&public, c.checkpoint_dir.as_ref().unwrap()),
    )
    .unwrap();
    assert!(
        r.ok(),
        "{:?}",
        r.chains.iter().map(|c| &c.problem).collect::<Vec<_>>()
    );
}

#[test]
fn a_checkpoint_signed_while_writes_fail_covers_the_records_in_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let (c, public) = signed_cfg(&tmp, 0, 100);
    let (cdir, cckpt) = full_disk_episode(&c, &tmp);
    let on_disk = last_seq_on_disk(&cdir);
    assert_eq!(
        ckpt_seq(&cckpt),
        Some(on_disk),
        "during the failure the checkpoint signs the last record in the file"
    );
    let r = verify_all(&cdir, &pinned(&public, &cckpt)).unwrap();
    assert!(
        r.ok(),
        "{:?}",
        r.chains.iter().map(|c| &c.problem).collect::<Vec<_>>()
    );
}

/// A process that died while its disk was full: the next one continues its chain (the
/// checkpoint agrees with what the file holds), and the whole verifies.
#[test]
fn a_chain_whose_writer_died_while_writes_failed_is_recovered() {
    let tmp = tempfile::tempdir().unwrap();
    let (c, public) = signed_cfg(&tmp, 0, 100);
    let (cdir, cckpt) = full_disk_episode(&c, &tmp);
    let mut c2 = c.clone();
    c2.dir = Some(cdir.clone());
    c2.checkpoint_dir = Some(cckpt.clone());
    let log = ForensicLog::open_with_secret(&c2, start(), Some(secret())).unwrap();
    log.emit(event(200));
    log.stop();
    let kinds: Vec<String> = chain_files(&cdir)
        .iter()
        .flat_map(|f| read_lines(f))
        .filter_map(|l| serde_json::from_str::<Value>(&l).ok())
        .map(|v| v["kind"].as_str().unwrap_or("").to_string())
        .collect();
    assert!(kinds.iter().any(|k| k == "recovery"), "{kinds:?}");
    let r = verify_all(&cdir, &pinned(&public, &cckpt)).unwrap();
    assert!(
        r.ok(),
        "{:?}",
        r.chains.iter().map(|c| &c.problem).collect::<Vec<_>>()
    );
}

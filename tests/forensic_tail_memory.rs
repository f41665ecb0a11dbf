//! `kvh tail-log` passes on a chain's backlog in memory bounded by a batch, not by the
//! backlog: a sidecar restarted after an outage, with far more unsent records than its memory
//! limit, catches up in one run instead of failing on allocation at every restart.

mod forensic_common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::Command;

use forensic_common::{cfg, chain_files, least_address_space, start, status_limited};
use kvhygiene::config::LogConfig;
use kvhygiene::forensic::ForensicLog;
use sha2::{Digest, Sha256};

/// Bytes of each record's padding: large records, so that the backlog is built quickly.
const PAD: usize = 256 << 10;

/// The chain's backlog, in 4 MiB files: larger than the memory the tail is given beyond a
/// small log's needs ([`HEADROOM`]), which holding it whole would take.
const BACKLOG: u64 = 128 << 20;

/// Address space the tail may use beyond what it takes for a log of a few records.
const HEADROOM: u64 = 64 << 20;

/// A stopped log of one chain in `dir`, about `bytes` long, in 4 MiB files.
fn write_backlog(dir: &Path, bytes: u64) {
    let cfg = LogConfig {
        // A few records queued at most: the test's own memory stays small too.
        queue_capacity: 16,
        ..cfg(dir, 4 << 20)
    };
    let log = ForensicLog::open_with_secret(&cfg, start(), None).unwrap();
    let pad = "x".repeat(PAD);
    for n in 0..bytes / PAD as u64 {
        log.record_anomaly(serde_json::json!({ "n": n, "pad": pad }));
    }
    log.stop();
}

/// `kvh tail-log DIR --key-file KEY --state STATE`, to which a test adds its options.
fn keyed_tail(dir: &Path, key: &Path, state: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kvh"));
    cmd.arg("tail-log")
        .arg(dir)
        .arg("--key-file")
        .arg(key)
        .arg("--state")
        .arg(state);
    cmd
}

/// `kvh tail-log DIR --once --from-start --state STATE`, its address space limited to
/// `limit` bytes: its exit status and the number of lines it wrote (to `out`, kept).
fn tail_limited(dir: &Path, state: &Path, out: &Path, limit: u64) -> (Option<i32>, usize) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kvh"));
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("KVH_")) {
        cmd.env_remove(k);
    }
    let file = std::fs::File::create(out).unwrap();
    cmd.arg("tail-log")
        .arg(dir)
        .args(["--once", "--from-start", "--state"])
        .arg(state)
        .stdout(file);
    let code = status_limited(&mut cmd, limit);
    let written = BufReader::new(std::fs::File::open(out).unwrap());
    (code, written.split(b'\n').count())
}

/// SHA-256 of the chain files one after the other (each ends with a complete line: the
/// log was stopped), a file at a time.
fn log_digest(dir: &Path) -> Vec<u8> {
    let mut all = Sha256::new();
    for f in chain_files(dir) {
        all.update(std::fs::read(f).unwrap());
    }
    all.finalize().to_vec()
}

/// SHA-256 of the file `path`.
fn digest(path: &Path) -> Vec<u8> {
    let mut file = std::fs::File::open(path).unwrap();
    let mut h = Sha256::new();
    std::io::copy(&mut file, &mut h).unwrap();
    h.finalize().to_vec()
}

/// The address space a tail needs for a log of a few records.
fn small_log_needs(tmp: &Path) -> u64 {
    let dir = tmp.join("small");
    write_backlog(&dir, PAD as u64 * 2);
    least_address_space(|limit| {
        let state = tmp.join("small.state");
        let _ = std::fs::remove_file(&state);
        tail_limited(&dir, &state, &tmp.join("small.out"), limit).0 == Some(0)
    })
}

#[test]
fn a_backlog_larger_than_the_memory_limit_is_passed_on_whole() {
    let tmp = tempfile::tempdir().unwrap();
    let limit = small_log_needs(tmp.path()) + HEADROOM;
    let dir = tmp.path().join("log");
    write_backlog(&dir, BACKLOG);
    assert!(chain_files(&dir).len() > 30, "the backlog spans many files");
    let state = tmp.path().join("tail.state");
    let out = tmp.path().join("tail.out");
    let (code, _) = tail_limited(&dir, &state, &out, limit);
    assert_eq!(
        code,
        Some(0),
        "kvh tail-log failed on a {} MiB backlog in {} MiB of address space",
        BACKLOG >> 20,
        limit >> 20
    );
    assert!(
        digest(&out) == log_digest(&dir),
        "every record passed on, once, in order, exactly as written"
    );
    // The state says it: a run after it has nothing more to pass on.
    let (code, lines) = tail_limited(&dir, &state, &out, limit);
    assert_eq!((code, lines), (Some(0), 0));
}

/// A following tail whose passes between whole verifications meet a backlog larger than a
/// batch (the writer went on while the tail's output was stalled, say): the last pass, made
/// on SIGTERM and only over what was appended, passes it on whole, read again a batch at a
/// time, and the state it saves leaves nothing for the next run.
#[test]
fn a_pass_between_verifications_passes_on_a_backlog_larger_than_a_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    let key = forensic_common::secret_key_file(tmp.path());
    let state = tmp.path().join("tail.state");
    let out = tmp.path().join("tail.out");
    let cfg = LogConfig {
        queue_capacity: 16,
        ..cfg(&dir, 4 << 20)
    };
    let log =
        ForensicLog::open_with_secret(&cfg, start(), Some(forensic_common::secret())).unwrap();
    log.flush();
    let mut tail = keyed_tail(&dir, &key, &state)
        // Only the signal makes it pass again, and that pass is not a whole one.
        .args([
            "--from-start",
            "--interval",
            "3600",
            "--verify-every",
            "3600",
        ])
        .stdout(std::fs::File::create(&out).unwrap())
        .spawn()
        .unwrap();
    // The first pass saves the state: the records written after it are the next pass's.
    while !state.exists() {
        assert!(tail.try_wait().unwrap().is_none(), "the tail ended");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let pad = "x".repeat(PAD);
    for n in 0..96 {
        log.record_anomaly(serde_json::json!({ "n": n, "pad": pad }));
    }
    log.flush();
    let pid = i32::try_from(tail.id()).unwrap();
    // SAFETY: kill(2) with the pid of a child this test spawned and has not waited for.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    assert_eq!(tail.wait().unwrap().code(), Some(0));
    assert!(
        digest(&out) == log_digest(&dir),
        "every record passed on, once, in order, exactly as written"
    );
    let again = keyed_tail(&dir, &key, &state)
        .arg("--once")
        .output()
        .unwrap();
    assert_eq!(again.status.code(), Some(0));
    assert!(again.stdout.is_empty(), "nothing left to pass on");
    log.stop();
}

//! Helpers shared by the forensic-log integration tests.
#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use kvhygiene::config::{Config, FsyncPolicy, LogConfig};
use kvhygiene::context::Context;
use kvhygiene::events::{BlockRef, Event, EventKind, EventSink, QuarantineReason};
use kvhygiene::forensic::keys::EpochKey;
use kvhygiene::forensic::prune::{Manifest, PrunedFile};
use kvhygiene::forensic::record::{self, Header};
use kvhygiene::forensic::{verify_all, ForensicLog, Report, SealKey, StartInfo, VerifyOptions};
use serde_json::{Map, Value};
use zeroize::Zeroizing;

pub const SECRET: &[u8] = b"test-secret-0123456789abcdef";

pub fn secret() -> Zeroizing<Vec<u8>> {
    Zeroizing::new(SECRET.to_vec())
}

/// The HMAC secret of the logs `write_log` seals, in a key file (0600) in `dir`.
pub fn secret_key_file(dir: &Path) -> PathBuf {
    let key = dir.join("hmac.key");
    write_key_file(&key, SECRET);
    key
}

/// A new key file at `p` holding `bytes`, private to this user (0600), as a writer requires.
pub fn write_key_file(p: &Path, bytes: &[u8]) {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(p)
        .unwrap();
    std::io::Write::write_all(&mut f, bytes).unwrap();
}

/// A private log directory inside a temporary directory.
pub fn log_dir(tmp: &tempfile::TempDir) -> PathBuf {
    tmp.path().join("log")
}

pub fn cfg(dir: &Path, max_bytes: u64) -> LogConfig {
    LogConfig {
        dir: Some(dir.to_path_buf()),
        max_bytes,
        fsync: FsyncPolicy::Never,
        queue_capacity: 1024,
        summary_interval_ms: 0,
        checkpoint_every_records: 0,
        checkpoint_interval_ms: 0,
        ..Config::default().log
    }
}

pub fn start() -> StartInfo {
    StartInfo::current(Config::default().canonical_json())
}

pub fn event(i: u64) -> Event {
    Event {
        at: SystemTime::now(),
        kind: EventKind::Quarantined {
            reason: QuarantineReason::VerifyFailed,
            retired_before: false,
        },
        context: Context::new(Some("tenant-a"), Some(&format!("req-{i}")), Some("llama")).unwrap(),
        block: Some(BlockRef {
            id: i,
            device: 0,
            addr: 0x7f00_0000_0000 + i * 4096,
            requested: 4000,
            capacity: 4096,
            scrub_seq: i,
        }),
        addr: None,
    }
}

/// Opens a log, writes `n` events, stops it.
pub fn write_log(cfg: &LogConfig, n: u64, keyed: bool) {
    let log = ForensicLog::open_with_secret(cfg, start(), keyed.then(secret)).unwrap();
    for i in 0..n {
        log.emit(event(i));
    }
    log.stop();
}

pub fn keyed_opts() -> VerifyOptions {
    VerifyOptions {
        hmac_keys: vec![SealKey::new("hmac.key", secret())],
        ..Default::default()
    }
}

pub fn verify(dir: &Path, opts: &VerifyOptions) -> Report {
    verify_all(dir, opts).unwrap()
}

/// Chain files of `dir` in order (one chain expected).
pub fn chain_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .collect();
    v.sort();
    v
}

pub fn name(p: &Path) -> String {
    p.file_name().unwrap().to_str().unwrap().to_string()
}

pub fn read_lines(p: &Path) -> Vec<String> {
    fs::read_to_string(p)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

pub fn write_lines(p: &Path, lines: &[String]) {
    let mut s = lines.join("\n");
    s.push('\n');
    fs::write(p, s).unwrap();
}

/// Asserts that the report's first problem is at `file:line` and mentions `needle`.
pub fn assert_problem(r: &Report, file: &str, line: u64, needle: &str) {
    let p = r
        .first_problem()
        .unwrap_or_else(|| panic!("no problem reported: {r:?}"));
    assert_eq!((p.file.as_str(), p.line), (file, line), "{p}");
    assert!(p.reason.contains(needle), "{p}");
    assert_eq!(r.exit_code(), 1);
}

/// Re-seals every record from `files[from_file]` line `from_line` (1-based) to the end of
/// the chain, after applying `mutate` to that first record: what an attacker holding the
/// key of `from_file`'s epoch (and ratcheting it forward) can do.
pub fn forge_from(
    files: &[PathBuf],
    from_file: usize,
    from_line: usize,
    key: Option<EpochKey>,
    mutate: impl Fn(&mut Map<String, Value>),
) {
    let mut key = key;
    let mut prev: Option<[u8; 32]> = None;
    for (fi, path) in files.iter().enumerate().skip(from_file) {
        if let (Some(k), true) = (key.as_mut(), fi > from_file) {
            k.ratchet();
        }
        let mut lines = read_lines(path);
        for (li, line) in lines.iter_mut().enumerate() {
            if fi == from_file && li + 1 < from_line {
                continue;
            }
            let Value::Object(mut m) = serde_json::from_str::<Value>(line).unwrap() else {
                panic!()
            };
            let old_prev = record::parse_hash(m["prev"].as_str().unwrap()).unwrap();
            if fi == from_file && li + 1 == from_line {
                mutate(&mut m);
            }
            let (hash, sealed) = seal_again(m, &prev.unwrap_or(old_prev), key.as_ref());
            prev = Some(hash);
            *line = sealed;
        }
        write_lines(path, &lines);
    }
}

/// Re-seals every record of a whole chain (`files`, from file 0) with the key of `secret`,
/// after applying `each` to it: what the holder of that secret can make of the chain.
pub fn reseal_all(files: &[PathBuf], secret: &[u8], each: impl Fn(&mut Map<String, Value>)) {
    let mut key = EpochKey::from_secret(Zeroizing::new(secret.to_vec())).unwrap();
    let mut prev = record::GENESIS_PREV;
    for (fi, path) in files.iter().enumerate() {
        if fi > 0 {
            key.ratchet();
        }
        let mut lines = read_lines(path);
        for line in lines.iter_mut() {
            let Value::Object(mut m) = serde_json::from_str::<Value>(line).unwrap() else {
                panic!()
            };
            each(&mut m);
            let (hash, sealed) = seal_again(m, &prev, Some(&key));
            prev = hash;
            *line = sealed;
        }
        write_lines(path, &lines);
    }
}

/// Seals record `m` after `prev` with `key`: its hash and its line (without the newline).
fn seal_again(
    m: Map<String, Value>,
    prev: &[u8; 32],
    key: Option<&EpochKey>,
) -> ([u8; 32], String) {
    let kind = m["kind"].as_str().unwrap().to_string();
    let chain = m["chain"].as_str().unwrap().to_string();
    let h = Header {
        seq: m["seq"].as_u64().unwrap(),
        ts: m["ts"].as_u64().unwrap(),
        kind: &kind,
        chain: &chain,
        epoch: m["epoch"].as_u64().unwrap(),
        prev,
    };
    let sealed = record::seal(&h, m.clone(), key);
    let line = String::from_utf8(sealed.line)
        .unwrap()
        .trim_end()
        .to_string();
    (sealed.hash, line)
}

/// An unsealed prune manifest saying chain `chain` was moved whole, as one file ending at
/// `last_seq` with `last_hash` (hex): the manifest a forger would write.
pub fn manifest_of_whole_chain(chain: &str, last_seq: u64, last_hash: &str) -> Manifest {
    Manifest {
        v: 1,
        chain: chain.to_string(),
        files: vec![PrunedFile {
            name: kvhygiene::forensic::files::file_name(chain, 0),
            sha256: "00".repeat(32),
            first_seq: 0,
            last_seq,
            last_hash: last_hash.to_string(),
            oldest_ts: 0,
            newest_ts: 0,
        }],
        complete: true,
        archive: "/nowhere".into(),
        updated_at: 0,
        mac: None,
    }
}

/// Runs `cmd` with its address space limited to `limit` bytes (`RLIMIT_AS`): its exit code,
/// or `None` when it was killed by a signal or a limit that small kept it from starting.
pub fn status_limited(cmd: &mut std::process::Command, limit: u64) -> Option<i32> {
    use std::os::unix::process::CommandExt;
    let rlim = libc::rlimit {
        rlim_cur: limit,
        rlim_max: limit,
    };
    // SAFETY: between fork and exec the closure only calls setrlimit, which is
    // async-signal-safe, with a valid `rlimit` it reads and copies.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setrlimit(libc::RLIMIT_AS, &rlim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.status().ok()?.code()
}

/// The least address space (within 4 MiB) that `fits` succeeds in, found by halving down
/// from 4 GiB and back up (each try a run of a few milliseconds on a small input): what a
/// program itself maps (a debug build, its libraries) differs from one build to another.
pub fn least_address_space(fits: impl Fn(u64) -> bool) -> u64 {
    let (mut low, mut high) = (16u64 << 20, 4u64 << 30);
    assert!(fits(high), "fails on a small input in 4 GiB");
    while high - low > 4 << 20 {
        let mid = low + (high - low) / 2;
        if fits(mid) {
            high = mid;
        } else {
            low = mid;
        }
    }
    high
}

//! `kvh evidence`: a `rotate` record belongs to the run that wrote it. A process that rotated
//! its file and died right after writing the new file's `rotate` record leaves that record
//! just before the `recovery` record of the process that continues the chain; it is still
//! the crashed process's record.

mod forensic_common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use forensic_common::{cfg, chain_files, event, read_lines, start, write_lines};
use kvhygiene::events::EventSink;
use kvhygiene::forensic::verify::rfc3339;
use kvhygiene::forensic::ForensicLog;
use serde_json::Value;

fn kvh(args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kvh"));
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("KVH_")) {
        cmd.env_remove(k);
    }
    cmd.args(args).output().expect("run kvh")
}

fn evidence_json(dir: &Path, extra: &[&str]) -> Value {
    let mut args = vec!["evidence", dir.to_str().unwrap(), "--json"];
    args.extend_from_slice(extra);
    let out = kvh(&args);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn field(line: &str, k: &str) -> Value {
    let v: Value = serde_json::from_str(line).unwrap();
    v[k].clone()
}

/// A first process that rotated into its second file and died right after writing that
/// file's `rotate` record; a second process continues the chain with its `recovery` record.
/// Returns the log directory, the time of the first process's last record before the
/// rotation, the time of its `rotate` record, and that of the recovery.
fn crashed_after_its_rotate_record(tmp: &tempfile::TempDir) -> (PathBuf, u64, u64, u64) {
    let dir = tmp.path().join("log");
    let c = cfg(&dir, 4096);
    let first = ForensicLog::open_with_secret(&c, start(), None).unwrap();
    for i in 0..40 {
        first.emit(event(i));
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    first.stop();
    let files = chain_files(&dir);
    assert!(files.len() >= 2, "the first process rotated: {files:?}");
    for later in &files[2..] {
        std::fs::remove_file(later).unwrap();
    }
    let before = read_lines(&files[0]);
    let last_before = field(before.last().unwrap(), "ts").as_u64().unwrap();
    let second_file = read_lines(&files[1]);
    assert_eq!(field(&second_file[0], "kind"), "rotate");
    let rotated_at = field(&second_file[0], "ts").as_u64().unwrap();
    assert!(rotated_at > last_before);
    // The first process died right after its `rotate` record reached the new file.
    write_lines(&files[1], &second_file[..1]);
    std::thread::sleep(std::time::Duration::from_millis(200));

    let second = ForensicLog::open_with_secret(&c, start(), None).unwrap();
    second.emit(event(100));
    second.stop();
    let files = chain_files(&dir);
    assert_eq!(
        files.len(),
        2,
        "the second process continued the second file"
    );
    let continued = read_lines(&files[1]);
    let kinds: Vec<Value> = continued.iter().map(|l| field(l, "kind")).collect();
    assert_eq!(kinds[..2], ["rotate", "recovery"], "{kinds:?}");
    let recovered_at = field(&continued[1], "ts").as_u64().unwrap();
    assert!(recovered_at > rotated_at);
    (dir, last_before, rotated_at, recovered_at)
}

/// The crashed process's row ends at its own `rotate` record, the last record it wrote.
#[test]
fn a_rotate_record_written_before_a_crash_stays_with_the_crashed_run() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, _, rotated_at, recovered_at) = crashed_after_its_rotate_record(&tmp);
    let v = evidence_json(&dir, &[]);
    let procs = v["processes"].as_array().unwrap();
    assert_eq!(procs.len(), 2, "{v}");
    assert_eq!(
        procs[0]["last_record"],
        rfc3339(rotated_at).as_str(),
        "the crashed process's last record is its rotate record: {}",
        procs[0]
    );
    assert_eq!(
        procs[1]["started"],
        rfc3339(recovered_at).as_str(),
        "{}",
        procs[1]
    );
}

/// An audit period that begins between the crashed process's last event and its `rotate`
/// record holds a record of that process: its row is listed.
#[test]
fn a_crashed_run_whose_rotate_record_is_in_the_period_is_listed() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, last_before, rotated_at, _) = crashed_after_its_rotate_record(&tmp);
    let since = rfc3339(last_before + (rotated_at - last_before) / 2);
    let v = evidence_json(&dir, &["--since", &since]);
    let procs = v["processes"].as_array().unwrap();
    assert_eq!(
        procs.len(),
        2,
        "the first process wrote its rotate record after {since}: {}",
        v["processes"]
    );
}

/// The `rotate` record just before this `recovery` record is the crashed process's own (of
/// its own time, not the recovery's): the recovering process did not write it, so the
/// record before that `rotate` is not the crashed chain's last whole record. A `recovery`
/// record resealed to name it (with its true hash) fails verification.
#[test]
fn a_recovery_record_naming_the_record_before_the_crashed_runs_rotate_fails_verification() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, _, _, _) = crashed_after_its_rotate_record(&tmp);
    let r = forensic_common::verify(&dir, &Default::default());
    assert!(r.ok(), "{:?}", r.first_problem());
    let files = chain_files(&dir);
    let before = read_lines(&files[0]);
    let last = before.last().unwrap();
    let (seq, hash) = (field(last, "seq"), field(last, "hash"));
    let (s, h) = (seq.clone(), hash);
    forensic_common::forge_from(&files, 1, 2, None, move |m| {
        assert_eq!(m["kind"], "recovery");
        m.insert("last_good_seq".into(), s.clone());
        m.insert("last_good_hash".into(), h.clone());
    });
    let r = forensic_common::verify(&dir, &Default::default());
    assert!(
        !r.ok(),
        "a recovery record names {seq}, the record before the crashed run's own rotate \
         record, and verifies"
    );
}

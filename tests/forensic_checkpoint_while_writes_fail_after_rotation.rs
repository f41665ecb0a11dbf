//! A signed log whose writes start failing (a full disk) at the first write of a new file:
//! the file's `rotate` record is kept for the next write, and the log stays idle with its
//! disk full past the checkpoint interval. As for a failure inside a file
//! (tests/forensic_checkpoint_while_writes_fail.rs), the checkpoint due meanwhile signs the
//! records already written, here those at the end of the previous file (docs/forensic-log.md,
//! "Signed checkpoints": one "signed while the log's writes fail (a full disk: the records
//! already written are signed ...)"), so that a process that dies during the failure leaves
//! them protected against truncation.

#[path = "forensic_common/mod.rs"]
mod forensic_common;

use std::path::Path;
use std::time::Duration;

use forensic_common::{cfg, chain_files, event, log_dir, read_lines, secret, start};
use kvhygiene::events::EventSink;
use kvhygiene::forensic::checkpoint;
use kvhygiene::forensic::ForensicLog;
use serde_json::Value;

fn ckpt_seq(ckpt: &Path) -> Option<u64> {
    let f = checkpoint::find(ckpt).unwrap().into_iter().next()?;
    checkpoint::peek(&f).unwrap().map(|c| c.seq)
}

fn last_seq(file: &Path) -> u64 {
    read_lines(file)
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| v["seq"].as_u64())
        .max()
        .unwrap()
}

/// One run of the scenario: the checkpoint's seq after 800 ms of failure, and the last seq of
/// the previous file. `None` when the events meant to fill the first file rotated it: a
/// checkpoint due by time (100 ms) between the measuring event and them appended its record,
/// taking the room of one (on a loaded machine).
fn fill_then_fail() -> Option<(Option<u64>, u64)> {
    let tmp = tempfile::tempdir().unwrap();
    let (key, _public) = kvhygiene::forensic::cli::keygen(&tmp.path().join("signer")).unwrap();
    let dir = log_dir(&tmp);
    let ckpt = tmp.path().join("ckpt");
    let max_bytes = 4096u64;
    let mut c = cfg(&dir, max_bytes);
    c.signing_key_file = Some(key);
    c.checkpoint_dir = Some(ckpt.clone());
    c.checkpoint_interval_ms = 100;
    let log = ForensicLog::open_with_secret(&c, start(), Some(secret())).unwrap();
    // One event, to learn an event's length on disk (ids of three digits: equal lengths).
    log.emit(event(100));
    log.flush();
    let first = chain_files(&dir).last().unwrap().clone();
    let event_len = read_lines(&first).last().unwrap().len() as u64 + 1;
    let len = std::fs::metadata(&first).unwrap().len();
    // As many events as still fit in the file, in one go: written, not yet checkpointed.
    let fit = (max_bytes - len) / event_len;
    for i in 0..fit {
        log.emit(event(101 + i));
    }
    log.flush();
    if chain_files(&dir).len() != 1 {
        log.stop();
        return None;
    }
    // The next event opens a new file, whose first write fails; the disk stays full.
    log.inject_write_faults(1_000_000);
    log.emit(event(200));
    log.flush();
    let files = chain_files(&dir);
    assert_eq!(files.len(), 2, "the event did not open a new file");
    assert_eq!(files[0], first);
    let written = last_seq(&first);
    std::thread::sleep(Duration::from_millis(800));
    let signed = ckpt_seq(&ckpt);
    log.inject_write_faults(0);
    log.stop();
    Some((signed, written))
}

#[test]
fn a_checkpoint_due_while_a_new_file_s_first_write_fails_signs_the_records_written() {
    let (signed, written) = (0..5)
        .find_map(|_| fill_then_fail())
        .expect("in five runs, a timed checkpoint record always took the first file's room");
    assert_eq!(
        signed,
        Some(written),
        "800 ms into the failure (checkpoint interval 100 ms), the records written before it \
         (up to seq {written}, the end of the previous file) are not covered by a checkpoint"
    );
}

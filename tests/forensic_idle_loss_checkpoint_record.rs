//! A signed log whose writes fail (a full disk) while nothing is emitted signs no checkpoint
//! whose `checkpoint` record is then lost too: docs/forensic-log.md ("Signed checkpoints":
//! each checkpoint "is also noted in the chain by a `checkpoint` record"), and the writer's
//! rule for an idle log with a pending loss (its `lost` record is written alone; a checkpoint
//! appended with it would only be lost too while writes fail). The `lost` record written once
//! the disk has room again then counts the events that were lost, and nothing the writer made
//! of its own while the disk was full.

#[path = "forensic_common/mod.rs"]
mod forensic_common;

use std::time::Duration;

use forensic_common::{cfg, chain_files, event, log_dir, read_lines, secret, start};
use kvhygiene::config::LogConfig;
use kvhygiene::events::EventSink;
use kvhygiene::forensic::ForensicLog;
use serde_json::Value;

fn signed_cfg(tmp: &tempfile::TempDir, each: impl FnOnce(&mut LogConfig)) -> LogConfig {
    let (key, _public) = kvhygiene::forensic::cli::keygen(&tmp.path().join("signer")).unwrap();
    let mut c = cfg(&log_dir(tmp), 1 << 20);
    c.signing_key_file = Some(key);
    c.checkpoint_dir = Some(tmp.path().join("ckpt"));
    each(&mut c);
    c
}

fn lost_records(tmp: &tempfile::TempDir) -> Vec<Value> {
    chain_files(&log_dir(tmp))
        .iter()
        .flat_map(|f| read_lines(f))
        .filter_map(|l| serde_json::from_str::<Value>(&l).ok())
        .filter(|v| v["kind"] == "lost")
        .collect()
}

/// One event lost to a full disk, the log then idle for half a second with the disk still
/// full, then idle again with room: returns `records_lost` at the end.
fn lose_one_event_while_idle(c: &LogConfig) -> u64 {
    let log = ForensicLog::open_with_secret(c, start(), Some(secret())).unwrap();
    log.emit(event(1));
    log.flush();
    log.inject_write_faults(1_000_000);
    log.emit(event(2));
    log.flush();
    std::thread::sleep(Duration::from_millis(500));
    log.inject_write_faults(0);
    std::thread::sleep(Duration::from_millis(300));
    let lost = log.stats().records_lost;
    log.stop();
    lost
}

fn assert_only_the_event_was_lost(tmp: &tempfile::TempDir, records_lost: u64) {
    let lost = lost_records(tmp);
    let kinds: Vec<&Value> = lost.iter().map(|l| &l["lost_kinds"]).collect();
    assert!(
        records_lost == 1 && kinds == [&serde_json::json!({"quarantine": 1})],
        "one event was lost while the log was idle with its disk full: records_lost \
         {records_lost}, lost_kinds of the `lost` records {kinds:?} (a checkpoint was signed \
         while writes failed, and its `checkpoint` record lost)"
    );
}

/// `KVH_CHECKPOINT_INTERVAL_MS=100`: a checkpoint falls due while the disk is full.
#[test]
fn an_idle_signed_log_with_a_full_disk_loses_no_checkpoint_record() {
    let tmp = tempfile::tempdir().unwrap();
    let c = signed_cfg(&tmp, |c| c.checkpoint_interval_ms = 100);
    let n = lose_one_event_while_idle(&c);
    assert_only_the_event_was_lost(&tmp, n);
}

//! A signed log whose writes fail (a full disk) while nothing is emitted: the records the
//! process lost are counted once. The writer does not keep producing records of its own
//! (`checkpoint` records, each lost in turn) while the disk stays full, which would make
//! `records_lost` (and the `lost` record written when space returns) grow with the time the
//! disk was full instead of with the events that were lost (docs/forensic-log.md, "Write
//! errors": records "that a failed write lost").

#[path = "forensic_common/mod.rs"]
mod forensic_common;

use std::time::Duration;

use forensic_common::{cfg, chain_files, event, log_dir, read_lines, secret, start};
use kvhygiene::config::LogConfig;
use kvhygiene::events::EventSink;
use kvhygiene::forensic::ForensicLog;

fn signed_cfg(tmp: &tempfile::TempDir, each: impl FnOnce(&mut LogConfig)) -> LogConfig {
    let (key, _public) = kvhygiene::forensic::cli::keygen(&tmp.path().join("signer")).unwrap();
    let dir = log_dir(tmp);
    let mut c = cfg(&dir, 1 << 20);
    c.signing_key_file = Some(key);
    c.checkpoint_dir = Some(tmp.path().join("ckpt"));
    each(&mut c);
    c
}

/// The `lost` records of the chain, as JSON.
fn lost_records(tmp: &tempfile::TempDir) -> Vec<serde_json::Value> {
    chain_files(&log_dir(tmp))
        .iter()
        .flat_map(|f| read_lines(f))
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(&l).ok())
        .filter(|v| v["kind"] == "lost")
        .collect()
}

/// Loses one event to a disk that stays full for `full`, then frees the disk and returns the
/// loss counts seen shortly after the failure and at the end of the full period.
fn lose_one_event_then_idle(c: &LogConfig, full: Duration) -> (u64, u64) {
    let log = ForensicLog::open_with_secret(c, start(), Some(secret())).unwrap();
    log.emit(event(1));
    log.flush();
    std::thread::sleep(Duration::from_millis(300));
    log.inject_write_faults(1_000_000);
    log.emit(event(2));
    log.flush();
    std::thread::sleep(Duration::from_millis(120));
    let soon = log.stats().records_lost;
    std::thread::sleep(full);
    let later = log.stats().records_lost;
    log.inject_write_faults(0);
    log.emit(event(3));
    log.flush();
    log.stop();
    (soon, later)
}

/// `KVH_CHECKPOINT_EVERY=1`: one event lost, then one second with the disk full and no
/// event emitted.
#[test]
fn a_full_disk_with_checkpoint_every_record_counts_only_the_lost_event() {
    let tmp = tempfile::tempdir().unwrap();
    let c = signed_cfg(&tmp, |c| c.checkpoint_every_records = 1);
    let (soon, later) = lose_one_event_then_idle(&c, Duration::from_millis(1000));
    let lost = lost_records(&tmp);
    assert!(
        soon <= 2 && later == soon,
        "one event was lost, then the log stayed idle with its disk full: records_lost was \
         {soon} 120 ms after the failure and {later} one second later; `lost` records: {lost:?}"
    );
}

/// `KVH_CHECKPOINT_INTERVAL_MS=100`: as above, with periodic checkpoints.
#[test]
fn a_full_disk_with_a_checkpoint_interval_counts_only_the_lost_event() {
    let tmp = tempfile::tempdir().unwrap();
    let c = signed_cfg(&tmp, |c| c.checkpoint_interval_ms = 100);
    let (soon, later) = lose_one_event_then_idle(&c, Duration::from_millis(1000));
    let lost = lost_records(&tmp);
    assert!(
        soon <= 2 && later == soon,
        "one event was lost, then the log stayed idle with its disk full: records_lost was \
         {soon} 120 ms after the failure and {later} one second later; `lost` records: {lost:?}"
    );
}

/// While the disk stays full, an idle signed log tries to write its `lost` record less and
/// less often (waits doubling up to 2 s), so `write_errors` grows with the time the disk is
/// full only logarithmically at first and by at most one every 2 s after: not once per
/// writer tick. Once the disk has room again, the `lost` record reaches the file without any
/// new event, within the longest wait.
#[test]
fn an_idle_log_on_a_full_disk_backs_off_its_retries_and_recovers_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let c = signed_cfg(&tmp, |c| c.checkpoint_interval_ms = 100);
    let log = ForensicLog::open_with_secret(&c, start(), Some(secret())).unwrap();
    log.emit(event(1));
    log.flush();
    log.inject_write_faults(1_000_000);
    log.emit(event(2));
    log.flush();
    let first = log.stats().write_errors;
    assert!(first >= 1, "the injected fault was not hit");
    std::thread::sleep(Duration::from_millis(1600));
    let retries = log.stats().write_errors - first;
    // Tries at about 0, 100, 300, 700 and 1500 ms after the first failure (plus a tick each).
    assert!(
        retries <= 6,
        "{retries} failed writes in 1.6 s of an idle log on a full disk"
    );
    assert!(
        retries >= 2,
        "the idle log stopped trying to record its loss ({retries} tries in 1.6 s)"
    );
    log.inject_write_faults(0);
    std::thread::sleep(Duration::from_millis(2600));
    let lost = lost_records(&tmp);
    assert_eq!(
        lost.len(),
        1,
        "the `lost` record was not written once the disk had room: {lost:?}"
    );
    assert_eq!(lost[0]["records_lost"], 1, "{lost:?}");
    log.stop();
}

/// The same backoff when the failed write was the first of a new file: the file's `rotate`
/// record is kept for the next write (so that the file still starts with it), and the log is
/// otherwise idle. While the disk stays full, `write_errors` still grows by at most one every
/// 2 s after the first waits (docs/forensic-log.md, "Write errors"), not once per writer tick.
#[test]
fn an_idle_log_whose_failed_write_opened_a_new_file_backs_off_its_retries() {
    let tmp = tempfile::tempdir().unwrap();
    let max_bytes = 4096u64;
    let c = signed_cfg(&tmp, |c| c.max_bytes = max_bytes);
    let dir = log_dir(&tmp);
    let log = ForensicLog::open_with_secret(&c, start(), Some(secret())).unwrap();
    let newest_len = || {
        let files = chain_files(&dir);
        std::fs::metadata(files.last().unwrap()).unwrap().len()
    };
    log.emit(event(1));
    log.flush();
    let files = chain_files(&dir);
    let event_len = read_lines(files.last().unwrap()).last().unwrap().len() as u64 + 1;
    // Fill the current file until the next event surely does not fit in it.
    let mut i = 2;
    while newest_len() + event_len - 32 <= max_bytes {
        log.emit(event(i));
        log.flush();
        i += 1;
    }
    let files_before = chain_files(&dir).len();
    log.inject_write_faults(1_000_000);
    log.emit(event(i));
    log.flush();
    assert_eq!(
        chain_files(&dir).len(),
        files_before + 1,
        "the event did not open a new file"
    );
    let first = log.stats().write_errors;
    assert!(first >= 1, "the injected fault was not hit");
    std::thread::sleep(Duration::from_millis(1600));
    let retries = log.stats().write_errors - first;
    log.inject_write_faults(0);
    log.stop();
    // Tries at about 0, 100, 300, 700 and 1500 ms after the first failure (plus a tick each).
    assert!(
        retries <= 6,
        "{retries} failed writes in 1.6 s of an idle log on a full disk whose failed write \
         opened a new file"
    );
}

/// A failing disk often fails an fsync before it fails writes (EIO). After a failed fsync the
/// writer signs no further checkpoint, but the log is still one with signed checkpoints
/// configured, and docs/forensic-log.md ("Write errors") says such a log writes its `lost`
/// record on its own while no other record comes, trying again for as long as writes fail:
/// once the disk takes writes again, the loss is in the file without waiting for an event.
#[test]
fn an_idle_signed_log_records_its_loss_alone_also_after_a_failed_fsync() {
    let tmp = tempfile::tempdir().unwrap();
    let c = signed_cfg(&tmp, |c| {
        c.checkpoint_interval_ms = 100;
        c.fsync = kvhygiene::config::FsyncPolicy::Always;
    });
    let log = ForensicLog::open_with_secret(&c, start(), Some(secret())).unwrap();
    log.inject_fsync_faults(1);
    log.emit(event(1));
    log.flush();
    assert!(
        log.stats().last_error.unwrap_or_default().contains("fsync"),
        "the fsync fault was not hit"
    );
    log.inject_write_faults(1_000_000);
    log.emit(event(2));
    log.flush();
    assert_eq!(log.stats().records_lost, 1, "{:?}", log.stats());
    std::thread::sleep(Duration::from_millis(300));
    log.inject_write_faults(0);
    // Longer than the longest wait between tries (2 s).
    std::thread::sleep(Duration::from_millis(2600));
    let lost = lost_records(&tmp);
    log.stop();
    assert_eq!(
        lost.len(),
        1,
        "an idle signed log whose fsync had failed did not write its `lost` record once the \
         disk had room: {lost:?}"
    );
}

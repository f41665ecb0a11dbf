//! The forensic log's policy keys (`KVH_CHECKPOINT_EVERY`, `KVH_CHECKPOINT_INTERVAL_MS`,
//! `KVH_LOG_QUEUE`) at the values the configuration accepts, against what the README and
//! docs/forensic-log.md say they do.

#[path = "forensic_common/mod.rs"]
mod forensic_common;

use std::path::Path;
use std::time::Duration;

use forensic_common::{cfg, chain_files, event, log_dir, read_lines, secret, start};
use kvhygiene::config::Config;
use kvhygiene::events::EventSink;
use kvhygiene::forensic::ForensicLog;

/// `checkpoint` records in every chain file of `dir`.
fn checkpoint_records(dir: &Path) -> usize {
    chain_files(dir)
        .iter()
        .map(|p| {
            read_lines(p)
                .iter()
                .filter(|l| l.contains("\"kind\":\"checkpoint\""))
                .count()
        })
        .sum()
}

/// A signed, sealed log in `tmp` with the checkpoint keys as the configuration gives them.
fn signed_log(
    tmp: &tempfile::TempDir,
    vars: &[(&str, &str)],
) -> (std::sync::Arc<ForensicLog>, std::path::PathBuf) {
    let vars: Vec<(String, String)> = vars
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let policy = Config::from_vars(&vars).unwrap();
    let dir = log_dir(tmp);
    let (key, _public) = kvhygiene::forensic::cli::keygen(&tmp.path().join("signer")).unwrap();
    let mut c = cfg(&dir, 1 << 20);
    c.signing_key_file = Some(key);
    c.checkpoint_every_records = policy.log.checkpoint_every_records;
    c.checkpoint_interval_ms = policy.log.checkpoint_interval_ms;
    let log = ForensicLog::open_with_secret(&c, start(), Some(secret())).unwrap();
    (log, dir)
}

/// `KVH_CHECKPOINT_EVERY=1` (the smallest value accepted): a checkpoint after every record.
/// Once the log is idle there is no new record, so no new checkpoint: the `checkpoint` record
/// a checkpoint leaves in the chain must not count as a record that makes the next one due,
/// or an idle process writes (and fsyncs, and signs) checkpoints in a loop for ever.
#[test]
fn checkpoint_every_one_does_not_checkpoint_an_idle_log_in_a_loop() {
    let tmp = tempfile::tempdir().unwrap();
    let (log, dir) = signed_log(&tmp, &[("KVH_CHECKPOINT_EVERY", "1")]);
    log.emit(event(1));
    log.flush();
    std::thread::sleep(Duration::from_millis(300));
    let settled = checkpoint_records(&dir);
    std::thread::sleep(Duration::from_millis(1000));
    let idle = checkpoint_records(&dir) - settled;
    log.stop();
    assert_eq!(
        idle, 0,
        "{idle} checkpoint records were written in one second with no new record \
         (checkpoint_every = 1)"
    );
}

/// docs/forensic-log.md: `KVH_CHECKPOINT_INTERVAL_MS` is "Checkpoint after this much time
/// with new records". A log that receives nothing writes no further checkpoint.
#[test]
fn checkpoint_interval_does_not_checkpoint_an_idle_log() {
    let tmp = tempfile::tempdir().unwrap();
    let (log, dir) = signed_log(&tmp, &[("KVH_CHECKPOINT_INTERVAL_MS", "100")]);
    log.emit(event(1));
    log.flush();
    // The first interval checkpoints the event.
    std::thread::sleep(Duration::from_millis(400));
    let settled = checkpoint_records(&dir);
    std::thread::sleep(Duration::from_millis(1000));
    let idle = checkpoint_records(&dir) - settled;
    log.stop();
    assert_eq!(
        idle, 0,
        "{idle} checkpoint records were written in one idle second (checkpoint_interval_ms = \
         100): each checkpoint's own record made the next one due"
    );
}

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap();
    kb * 1024
}

/// `KVH_LOG_QUEUE` is the number of records the writer's queue holds. The largest value the
/// configuration accepts (4194304) must not make every process commit gigabytes of host
/// memory when its log opens, before a single record is queued.
#[test]
fn the_largest_accepted_log_queue_does_not_commit_gigabytes_at_open() {
    let policy = Config::from_vars(&[("KVH_LOG_QUEUE".into(), "4194304".into())]).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let mut c = cfg(&log_dir(&tmp), 1 << 20);
    c.queue_capacity = policy.log.queue_capacity;
    let before = rss_bytes();
    let log = ForensicLog::open_with_secret(&c, start(), Some(secret())).unwrap();
    let grown = rss_bytes().saturating_sub(before);
    log.stop();
    assert!(
        grown < 128 << 20,
        "opening a log with log_queue = 4194304 committed {} MiB with nothing queued",
        grown >> 20
    );
}

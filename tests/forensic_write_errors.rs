//! A failing disk: the error is sticky and counted, the chain stays intact, and when writing
//! resumes a `lost` record says what was lost.

mod forensic_common;
#[path = "skip/mod.rs"]
mod skip;

use std::os::unix::fs::MetadataExt;
use std::time::{Duration, Instant};

use forensic_common::*;
use kvhygiene::events::EventSink;
use kvhygiene::forensic::ForensicLog;

#[test]
fn write_errors_are_sticky_counted_and_recorded_when_writing_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = log_dir(&tmp);
    let log = keyed_log_with_events(&dir, 10);
    // The disk is full until further notice: every write fails after writing half its bytes.
    log.inject_write_faults(u32::MAX);
    for i in 0..5 {
        log.emit(event(100 + i));
    }
    log.flush();
    for i in 0..3 {
        log.emit(event(200 + i));
    }
    log.flush();
    let s = log.stats();
    assert!(s.write_errors >= 2, "{s:?}");
    // Each failed write put half its bytes on disk: the whole records among them are kept
    // (a reader may have verified them), the rest are counted lost.
    let lost = s.records_lost;
    assert!(lost >= 1, "{s:?}");
    assert!(s.bytes_lost > 0);
    assert!(
        s.last_error.as_deref().unwrap().contains("No space left"),
        "{s:?}"
    );

    // The disk recovers.
    log.inject_write_faults(0);
    for i in 0..4 {
        log.emit(event(300 + i));
    }
    log.stop();
    let s = log.stats();
    // Sticky: the error stays visible after the disk recovered.
    assert!(s.last_error.is_some());
    let r = verify(&dir, &keyed_opts());
    assert!(r.ok(), "half-written batches must be cut back: {r:?}");
    let lines = read_lines(&chain_files(&dir)[0]);
    let records: Vec<serde_json::Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // Every one of the 8 events of the failed writes is in the file or described as lost.
    let failed_phase = |r: &serde_json::Value| {
        r["kind"] == "quarantine"
            && ["req-10", "req-20"]
                .iter()
                .any(|p| r["request_id"].as_str().is_some_and(|id| id.starts_with(p)))
    };
    let kept = records.iter().filter(|r| failed_phase(r)).count() as u64;
    let described: Vec<&serde_json::Value> =
        records.iter().filter(|r| r["kind"] == "lost").collect();
    let described_lost: u64 = described
        .iter()
        .map(|r| r["records_lost"].as_u64().unwrap())
        .sum();
    assert_eq!(described_lost, s.records_lost, "{described:?}");
    assert_eq!(kept + described_lost, 8, "{described:?}");
    assert!(described.iter().all(
        |r| r["error"].as_str().unwrap_or("").contains("No space left")
            && r["lost_kinds"]["quarantine"] == r["records_lost"]
    ));
    // The records after the disk recovered follow the last description of a loss.
    let last = records.iter().rposition(|r| r["kind"] == "lost").unwrap();
    assert_eq!(records[last + 1]["request_id"], "req-300");
    assert_eq!(
        s.records_written,
        1 + 10 + kept + described.len() as u64 + 4 + 1,
        "{s:?}"
    );
}

#[test]
fn a_write_error_right_after_rotation_keeps_the_rotate_link() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = log_dir(&tmp);
    let max = 4096;
    let log = ForensicLog::open_with_secret(&cfg(&dir, max), start(), Some(secret())).unwrap();
    let size = |d: &std::path::Path| std::fs::metadata(&chain_files(d)[0]).unwrap().len();
    // Fill the first file until the next record (never shorter than the last) cannot fit.
    let mut i = 0;
    loop {
        let before = size(&dir);
        log.emit(event(i));
        log.flush();
        i += 1;
        let after = size(&dir);
        assert_eq!(chain_files(&dir).len(), 1);
        if after + (after - before) > max {
            break;
        }
    }
    // The batch holding the new file's `rotate` record fails.
    log.inject_write_faults(1);
    log.emit(event(i));
    log.flush();
    assert_eq!(chain_files(&dir).len(), 2);
    let s = log.stats();
    assert_eq!(s.write_errors, 1, "{s:?}");
    assert_eq!(
        s.records_lost, 1,
        "the rotate record is re-queued, not lost: {s:?}"
    );
    log.emit(event(i + 1));
    log.stop();
    let r = verify(&dir, &keyed_opts());
    assert!(r.ok(), "{r:?}");
    let lines = read_lines(&chain_files(&dir)[1]);
    assert!(lines[0].contains("\"kind\":\"rotate\""), "{}", lines[0]);
    assert!(lines[1].contains("\"kind\":\"lost\""), "{}", lines[1]);
}

#[test]
fn a_failed_fsync_is_a_write_error_and_no_checkpoint_covers_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = log_dir(&tmp);
    let ck = tmp.path().join("ckpt");
    let (key, _) = kvhygiene::forensic::cli::keygen(&tmp.path().join("signer")).unwrap();
    let mut c = cfg(&dir, 1 << 20);
    c.fsync = kvhygiene::config::FsyncPolicy::Always;
    c.signing_key_file = Some(key);
    c.checkpoint_dir = Some(ck.clone());
    let log = ForensicLog::open_with_secret(&c, start(), Some(secret())).unwrap();
    log.inject_fsync_faults(1);
    for i in 0..5 {
        log.emit(event(i));
    }
    log.flush();
    let s = log.stats();
    assert_eq!(s.write_errors, 1, "{s:?}");
    assert!(s.last_error.as_deref().unwrap().contains("fsync"), "{s:?}");
    log.stop();
    // The only checkpoint is the one signed at open, over the start record (seq 0), which was
    // synced before the fault: none covers a record whose fsync failed.
    let files: Vec<_> = std::fs::read_dir(&ck)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    let ckpt: serde_json::Value =
        serde_json::from_str(std::fs::read_to_string(&files[0]).unwrap().trim()).unwrap();
    assert_eq!(
        ckpt["seq"], 0,
        "a checkpoint was signed over records whose fsync failed: {ckpt}"
    );
    assert!(verify(&dir, &keyed_opts()).ok());
}

/// A server that cannot write its first record (the disk is full when it starts: here, a
/// file size limit of 0 makes every write fail once its chain file exists) fails its start-up
/// and leaves nothing that later reads as tampering: once the disk has room again and a
/// server ran, the log verifies with the pinned checkpoint key (the nightly verification,
/// `prune-log` and the log shipper all verify it so).
#[test]
fn a_start_up_that_cannot_write_its_first_record_leaves_a_log_that_verifies() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let tmp = tempfile::tempdir().unwrap();
    let dir = log_dir(&tmp);
    let hmac = tmp.path().join("hmac.key");
    std::fs::write(&hmac, SECRET).unwrap();
    std::fs::set_permissions(&hmac, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (signing, public) = kvhygiene::forensic::cli::keygen(&tmp.path().join("signer")).unwrap();

    let mut full_disk = std::process::Command::new(env!("CARGO_BIN_EXE_kvh"));
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("KVH_")) {
        full_disk.env_remove(k);
    }
    full_disk
        .args(["demo", "--requests", "1", "--tenants", "1", "--log-dir"])
        .arg(&dir)
        .env("KVH_HMAC_KEY_FILE", &hmac)
        .env("KVH_SIGNING_KEY_FILE", &signing);
    // SAFETY: only async-signal-safe calls (signal, setrlimit) between fork and exec.
    unsafe {
        full_disk.pre_exec(|| {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            let none = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &none) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = full_disk.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("cannot write the start record"), "{err}");

    // The disk has room again; a server starts, runs and stops.
    let mut c = cfg(&dir, 1 << 20);
    c.signing_key_file = Some(signing);
    let log = ForensicLog::open_with_secret(&c, start(), Some(secret())).unwrap();
    log.emit(event(1));
    log.stop();

    let opts = kvhygiene::forensic::VerifyOptions {
        public_keys: vec![kvhygiene::forensic::keys::read_public_key(&public).unwrap()],
        checkpoints: vec![dir.clone()],
        ..keyed_opts()
    };
    let r = verify(&dir, &opts);
    assert!(
        r.ok(),
        "a start-up that failed for a full disk makes the log fail verification: {:?}",
        r.first_problem()
    );
}

/// The checkpoint directory with the one checkpoint file of the log's chain, parsed.
fn only_checkpoint(ck: &std::path::Path) -> serde_json::Value {
    let files: Vec<_> = std::fs::read_dir(ck)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    serde_json::from_str(std::fs::read_to_string(&files[0]).unwrap().trim()).unwrap()
}

/// Under the `interval` policy a checkpoint is still signed only over records fsynced first:
/// a failed fsync at a due checkpoint is a write error, and that checkpoint is not signed.
#[test]
fn under_the_interval_policy_a_checkpoint_is_signed_only_after_an_fsync() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = log_dir(&tmp);
    let ck = tmp.path().join("ckpt");
    let (key, _) = kvhygiene::forensic::cli::keygen(&tmp.path().join("signer")).unwrap();
    let mut c = cfg(&dir, 1 << 20);
    c.fsync = kvhygiene::config::FsyncPolicy::Interval;
    c.fsync_interval_ms = 600_000;
    c.signing_key_file = Some(key);
    c.checkpoint_dir = Some(ck.clone());
    c.checkpoint_every_records = 5;
    let log = ForensicLog::open_with_secret(&c, start(), Some(secret())).unwrap();
    log.inject_fsync_faults(1);
    for i in 0..10 {
        log.emit(event(i));
    }
    log.flush();
    let s = log.stats();
    assert_eq!(s.write_errors, 1, "{s:?}");
    assert!(s.last_error.as_deref().unwrap().contains("fsync"), "{s:?}");
    log.stop();
    let ckpt = only_checkpoint(&ck);
    assert_eq!(
        ckpt["seq"], 0,
        "a checkpoint was signed over records whose fsync failed: {ckpt}"
    );
}

/// Under the `interval` policy written records are fsynced within the interval while the
/// process runs, not only at stop: a failed fsync shows in the stats soon after the write.
#[test]
fn the_interval_policy_fsyncs_written_records_while_the_log_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = log_dir(&tmp);
    let mut c = cfg(&dir, 1 << 20);
    c.fsync = kvhygiene::config::FsyncPolicy::Interval;
    c.fsync_interval_ms = 50;
    let log = ForensicLog::open_with_secret(&c, start(), Some(secret())).unwrap();
    log.inject_fsync_faults(1);
    log.emit(event(1));
    log.flush();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while log.stats().write_errors == 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let s = log.stats();
    assert_eq!(s.write_errors, 1, "no fsync within the interval: {s:?}");
    assert!(
        s.last_error.as_deref().unwrap().contains("fsync failed"),
        "{s:?}"
    );
    log.stop();
}

/// A rotation fsyncs the file it leaves (unless the policy is `never`) before the next file
/// is started: a failed fsync there is a write error that names the file left.
#[test]
fn a_rotation_fsyncs_the_file_it_leaves() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = log_dir(&tmp);
    let mut c = cfg(&dir, 4096);
    c.fsync = kvhygiene::config::FsyncPolicy::Interval;
    c.fsync_interval_ms = 600_000;
    let log = ForensicLog::open_with_secret(&c, start(), Some(secret())).unwrap();
    let first = log.stats().current_file.unwrap();
    log.inject_fsync_faults(1);
    let mut i = 0;
    while chain_files(&dir).len() < 2 {
        assert!(i < 1000, "the log never rotated");
        log.emit(event(i));
        log.flush();
        i += 1;
    }
    let s = log.stats();
    assert_eq!(s.write_errors, 1, "{s:?}");
    let error = s.last_error.unwrap_or_default();
    assert!(
        error.contains("fsync failed") && error.contains(&first),
        "{error}"
    );
    log.stop();
}

/// A rotation whose next file cannot be created (here a file of that name is already there)
/// is a write error: counted, and named as the last error.
#[test]
fn a_next_file_that_cannot_be_created_at_a_rotation_is_a_counted_write_error() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = log_dir(&tmp);
    let log = ForensicLog::open_with_secret(&cfg(&dir, 4096), start(), Some(secret())).unwrap();
    let chain = log.stats().chain.unwrap();
    let next = kvhygiene::forensic::files::file_name(&chain, 1);
    std::fs::write(dir.join(&next), b"").unwrap();
    for i in 0..40 {
        log.emit(event(i));
    }
    log.flush();
    let s = log.stats();
    assert!(s.write_errors >= 1, "{s:?}");
    assert!(
        s.last_error.as_deref().unwrap_or("").contains(&next),
        "{s:?}"
    );
    log.stop();
}

/// A write error at `stop` (one failed write: the next would succeed) does not leave the
/// chain without its `stop` record. As after any failed write, the writer keeps trying (here
/// well within the 10 s that `stop` may take): the chain then ends with the `stop` record,
/// whose `records_lost` is the process's total. The failed write missed only the `stop`
/// record, which was written again, so nothing was lost and no `lost` record is written.
/// Otherwise the run reads as a crash.
#[test]
fn a_write_error_at_stop_still_closes_the_chain_with_its_loss_recorded() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = log_dir(&tmp);
    let log = keyed_log_with_events(&dir, 3);
    // The write of the `stop` record fails once.
    log.inject_write_faults(1);
    log.stop();
    let s = log.stats();
    assert_eq!(s.write_errors, 1, "{s:?}");
    let r = verify(&dir, &keyed_opts());
    assert!(r.ok(), "{r:?}");
    // The complete lines (a torn tail is not a record).
    let text = std::fs::read_to_string(&chain_files(&dir)[0]).unwrap();
    let records: Vec<serde_json::Value> = text
        .split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let kinds: Vec<&str> = records
        .iter()
        .map(|r| r["kind"].as_str().unwrap())
        .collect();
    assert!(
        r.chains[0].closed,
        "the chain was left without a stop record after one failed write (torn tail {} \
         bytes, records_lost {}): {kinds:?}",
        r.chains[0].torn_bytes, s.records_lost
    );
    let stop = records.last().unwrap();
    assert_eq!(
        stop["records_lost"].as_u64(),
        Some(s.records_lost),
        "{stop}"
    );
    assert_eq!(s.records_lost, 0, "{s:?}");
    assert!(!kinds.contains(&"lost"), "{kinds:?}");
}

/// The complete records of the chain's files, in order (a torn tail is not a record).
fn whole_records(dir: &std::path::Path) -> Vec<serde_json::Value> {
    chain_files(dir)
        .iter()
        .flat_map(|f| {
            std::fs::read_to_string(f)
                .unwrap()
                .split_inclusive('\n')
                .filter(|l| l.ends_with('\n'))
                .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// A disk that was full for a while (five failed writes in a row, no write succeeding since)
/// and whose write of the last records fails once more at `stop`: the `lost` and `stop`
/// records are still tried again, well inside the 10 s `stop` may take. The losses of the
/// full period are then in the chain (its `lost` record and the `stop` record's total);
/// otherwise they are recorded nowhere in the log and the run reads as a crash.
#[test]
fn a_write_error_at_stop_after_earlier_failed_writes_is_still_tried_again() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = log_dir(&tmp);
    let log = keyed_log_with_events(&dir, 3);
    // Five writes fail while the disk is full, then the write at `stop` fails once; the
    // write after it would succeed.
    log.inject_write_faults(6);
    for i in 0..5 {
        log.emit(event(100 + i));
        log.flush();
    }
    assert_eq!(log.stats().write_errors, 5, "{:?}", log.stats());
    let lost_before_stop = log.stats().records_lost;
    assert!(lost_before_stop >= 1, "{:?}", log.stats());
    let t = std::time::Instant::now();
    log.stop();
    let s = log.stats();
    assert!(t.elapsed() < std::time::Duration::from_secs(10));
    assert_eq!(s.write_errors, 6, "{s:?}");
    let r = verify(&dir, &keyed_opts());
    assert!(r.ok(), "{r:?}");
    let records = whole_records(&dir);
    let kinds: Vec<&str> = records
        .iter()
        .map(|r| r["kind"].as_str().unwrap())
        .collect();
    assert!(
        r.chains[0].closed,
        "one failed write at stop, after five earlier ones, left the chain without its stop \
         record and its {lost_before_stop} lost records described nowhere (records_lost {}, \
         the stop record not tried again): {kinds:?}",
        s.records_lost
    );
    let stop = records.last().unwrap();
    assert_eq!(
        stop["records_lost"].as_u64(),
        Some(s.records_lost),
        "{stop}"
    );
}

/// A `stop` record that every try fails to write is counted lost, with its bytes, as every
/// other record a failed write loses (`records_lost` and `bytes_lost` together): a loss of one
/// record and zero bytes is not what was lost.
#[test]
fn a_stop_record_that_cannot_be_written_counts_its_bytes_lost() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = log_dir(&tmp);
    let log = keyed_log_with_events(&dir, 3);
    assert_eq!(log.stats().records_lost, 0);
    // The disk is full from here on.
    log.inject_write_faults(u32::MAX);
    log.stop();
    let s = log.stats();
    assert!(s.write_errors >= 1, "{s:?}");
    assert_eq!(
        s.records_lost, 1,
        "the stop record is the one record lost: {s:?}"
    );
    assert!(
        s.bytes_lost > 0,
        "the lost stop record is counted in records_lost but not in bytes_lost: {s:?}"
    );
}

/// A process whose start-up failed after the log opened (its `stop` record carries the error,
/// up to 1024 characters) and whose last writes fail a few times at `stop`: the writer tries
/// again until one succeeds, and the chain then describes that one loss episode with one
/// `lost` record before the `stop` record, not with one more `lost` record (each saying no
/// record was lost) for every failed try.
#[test]
fn failed_tries_at_stop_add_no_lost_record_per_try() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = log_dir(&tmp);
    let log = ForensicLog::open_with_secret(&cfg(&dir, 1 << 20), start(), Some(secret())).unwrap();
    log.emit(event(1));
    log.flush();
    // The writes of the last records fail three times, then succeed.
    log.inject_write_faults(3);
    log.stop_after_failed_start(&"no usable backend: ".repeat(60));
    let r = verify(&dir, &keyed_opts());
    assert!(r.ok(), "{r:?}");
    assert!(r.chains[0].closed, "{r:?}");
    let records = whole_records(&dir);
    let kinds: Vec<String> = records
        .iter()
        .map(|r| match r["kind"].as_str().unwrap() {
            "lost" => format!("lost({})", r["records_lost"]),
            k => k.to_string(),
        })
        .collect();
    let after_last_event = records
        .iter()
        .rev()
        .take_while(|r| r["kind"] != "quarantine")
        .filter(|r| r["kind"] == "lost")
        .count();
    assert!(
        after_last_event <= 1,
        "each failed try at stop left a `lost` record of its own in the chain: {kinds:?}"
    );
}

/// A keyed log in `dir` with `n` events written (flushed).
fn keyed_log_with_events(dir: &std::path::Path, n: u64) -> std::sync::Arc<ForensicLog> {
    let log = ForensicLog::open_with_secret(&cfg(dir, 1 << 20), start(), Some(secret())).unwrap();
    for i in 0..n {
        log.emit(event(i));
    }
    log.flush();
    log
}

/// The active chain file removed from the directory while the log runs (a mistaken cleanup,
/// or someone erasing evidence): the records written to it are gone with it, and so would
/// every later one be, into a file no reader can open. Within a few seconds the writer sees
/// it, counts a write error naming the file, and goes on in the chain's next file, which
/// links to the missing one: the later records are in the directory, and verification
/// reports the removed file.
#[test]
fn an_active_file_removed_from_the_directory_is_seen_and_the_chain_goes_on_in_a_new_file() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = log_dir(&tmp);
    let log = keyed_log_with_events(&dir, 3);
    let first = chain_files(&dir)[0].clone();
    std::fs::remove_file(&first).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while log.stats().write_errors == 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let s = log.stats();
    assert_eq!(s.write_errors, 1, "{s:?}");
    let error = s.last_error.clone().unwrap_or_default();
    assert!(
        error.contains(&name(&first)) && error.contains("removed"),
        "{error}"
    );
    for i in 0..2 {
        log.emit(event(100 + i));
    }
    log.stop();
    let files = chain_files(&dir);
    assert_eq!(files.len(), 1, "{files:?}");
    let lines = read_lines(&files[0]);
    let records: Vec<serde_json::Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records[0]["kind"], "rotate");
    assert_eq!(records[0]["prev_file"], name(&first));
    assert!(
        records.iter().any(|r| r["request_id"] == "req-101"),
        "the records after the removal are not in the directory: {lines:?}"
    );
    assert_eq!(records.last().unwrap()["kind"], "stop");
    let r = verify(&dir, &keyed_opts());
    assert!(!r.ok(), "a removed chain file must not verify: {r:?}");
}

/// A file another process renames over the active one (same name, another file) is seen
/// the same way: the chain's records do not go on into a file the directory no longer names.
#[test]
fn an_active_file_replaced_by_another_is_seen_and_the_chain_goes_on_in_a_new_file() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = log_dir(&tmp);
    let log = keyed_log_with_events(&dir, 3);
    let first = chain_files(&dir)[0].clone();
    let copy = dir.join("copy.tmp");
    std::fs::copy(&first, &copy).unwrap();
    std::fs::rename(&copy, &first).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while log.stats().write_errors == 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(log.stats().write_errors, 1, "{:?}", log.stats());
    log.emit(event(100));
    log.stop();
    let files = chain_files(&dir);
    assert_eq!(files.len(), 2, "{files:?}");
    let copied = read_lines(&files[0]);
    assert!(
        !copied.iter().any(|l| l.contains("req-100")),
        "a record was written into the replaced file's orphan and is in neither file"
    );
    assert!(read_lines(&files[1]).iter().any(|l| l.contains("req-100")));
}

/// The whole log directory removed while the log runs (a mistaken cleanup of the node): the
/// writer finds its active file gone and there is no directory left to go on in, so every
/// record it writes from then on goes into a file no reader can open. Those records are lost,
/// and counted as lost (`records_lost`, and the `stop` record's total), not as written.
#[test]
fn records_written_after_the_active_file_is_gone_and_no_next_file_can_be_made_are_counted_lost() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = log_dir(&tmp);
    let log = keyed_log_with_events(&dir, 3);
    std::fs::remove_dir_all(&dir).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while log.stats().write_errors == 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(log.stats().write_errors >= 1, "{:?}", log.stats());
    let lost_before = log.stats().records_lost;
    for i in 0..3 {
        log.emit(event(100 + i));
    }
    log.flush();
    let s = log.stats();
    assert!(
        s.records_lost >= lost_before + 3,
        "three records went into a file the writer had found removed (no next file could be \
         made) and were counted as written, not lost: {s:?}"
    );
    log.stop();
}

/// The active file removed and the chain's next name already taken (planted): the writer
/// cannot go on in a new file, so the records of that time are counted lost, not written into
/// the removed file; once the name is free the chain goes on there, starting with its link and
/// a `lost` record that counts them.
#[test]
fn records_are_counted_lost_until_the_chain_can_go_on_after_its_active_file_is_gone() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = log_dir(&tmp);
    let log = keyed_log_with_events(&dir, 3);
    let first = chain_files(&dir)[0].clone();
    let planted = dir.join(name(&first).replace("-000000.", "-000001."));
    std::fs::write(&planted, b"").unwrap();
    std::fs::remove_file(&first).unwrap();
    let wait_for = |what: &dyn Fn() -> bool| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !what() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    };
    wait_for(&|| log.stats().write_errors > 0);
    let written = log.stats().records_written;
    for i in 0..2 {
        log.emit(event(100 + i));
    }
    log.flush();
    let s = log.stats();
    assert_eq!(s.records_written, written, "{s:?}");
    assert!(s.records_lost >= 2, "{s:?}");
    std::fs::remove_file(&planted).unwrap();
    wait_for(&|| planted.exists());
    log.emit(event(200));
    log.stop();
    let records: Vec<serde_json::Value> = read_lines(&planted)
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records[0]["kind"], "rotate", "{records:?}");
    let lost = records
        .iter()
        .find(|r| r["kind"] == "lost")
        .expect("no lost record");
    assert!(lost["records_lost"].as_u64().unwrap() >= 2, "{lost}");
    assert!(records.iter().any(|r| r["request_id"] == "req-200"));
    assert!(!records.iter().any(|r| r["request_id"] == "req-100"));
}

/// The active file removed while nearly full and the chain's next name taken: the writer
/// cannot go on in a new file yet. Once the name is free, the next record that does not fit
/// in the removed file starts the chain's next file: the chain goes on there, and that record
/// is written into it, not counted lost (the new file is in the directory, and every later
/// record goes there).
#[test]
fn a_record_that_starts_the_next_file_after_the_active_file_is_gone_is_written_there() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = log_dir(&tmp);
    let log = ForensicLog::open_with_secret(&cfg(&dir, 4096), start(), Some(secret())).unwrap();
    log.flush();
    let first = chain_files(&dir)[0].clone();
    // Fill the first file until one more record of the same size would not fit.
    let mut i = 0;
    loop {
        let size = std::fs::metadata(&first).unwrap().len();
        let last = read_lines(&first).last().map_or(0, |l| l.len() as u64 + 1);
        if size + last + 8 > 4096 {
            break;
        }
        log.emit(event(i));
        log.flush();
        i += 1;
    }
    assert_eq!(
        chain_files(&dir).len(),
        1,
        "the first file rotated while filling"
    );
    let planted = dir.join(name(&first).replace("-000000.", "-000001."));
    std::fs::write(&planted, b"").unwrap();
    std::fs::remove_file(&first).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    // The removal is seen, and the next file cannot be made (both counted).
    while log.stats().write_errors < 2 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(log.stats().write_errors >= 2, "{:?}", log.stats());
    let lost_before = log.stats().records_lost;
    std::fs::remove_file(&planted).unwrap();
    // Longer than any record written so far: it does not fit in the removed file.
    log.emit(event(1_000_000_000_000));
    log.flush();
    let s = log.stats();
    log.stop();
    let files = chain_files(&dir);
    let in_next = planted.exists()
        && read_lines(&planted)
            .iter()
            .any(|l| l.contains("req-1000000000000"));
    assert!(
        s.records_lost == lost_before && in_next,
        "the record that started the chain's next file was counted lost instead of written \
         there: {s:?}, files {files:?}, next file {:?}",
        planted.exists().then(|| read_lines(&planted))
    );
}

/// A process that stops right after its active file was removed (well within the writer's
/// once-a-second check) still sees it: its last records, `stop` included, go into the chain's
/// next file rather than into the removed one, and the removal is counted.
#[test]
fn a_stop_right_after_the_active_file_is_removed_is_written_in_the_next_file() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = log_dir(&tmp);
    let log = keyed_log_with_events(&dir, 3);
    let first = chain_files(&dir)[0].clone();
    std::fs::remove_file(&first).unwrap();
    log.stop();
    assert_eq!(log.stats().write_errors, 1, "{:?}", log.stats());
    let files = chain_files(&dir);
    assert_eq!(files.len(), 1, "{files:?}");
    let lines = read_lines(&files[0]);
    assert!(lines[0].contains("\"kind\":\"rotate\""), "{lines:?}");
    assert!(
        lines.last().unwrap().contains("\"kind\":\"stop\""),
        "{lines:?}"
    );
}

/// A process that stops right after its active file was removed writes its last summary (the
/// final counters `kvh_shutdown` hands the log just before `stop`) where a reader finds it:
/// in the chain's next file with the `stop` record, or, if it cannot be written, counted
/// lost. It must not go into the removed file, uncounted.
#[test]
fn the_last_summary_at_a_stop_right_after_the_active_file_is_removed_is_not_lost_unseen() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = log_dir(&tmp);
    let c = kvhygiene::config::LogConfig {
        // One summary an hour: the one put before `stop` is written by `stop`.
        summary_interval_ms: 3_600_000,
        ..cfg(&dir, 1 << 20)
    };
    let log = ForensicLog::open_with_secret(&c, start(), Some(secret())).unwrap();
    log.record_summary(serde_json::json!({"allocs": 1}));
    log.emit(event(1));
    log.flush();
    let first = chain_files(&dir)[0].clone();
    assert!(
        read_lines(&first).iter().any(|l| l.contains("\"summary\"")),
        "the first summary was not written at once"
    );
    std::fs::remove_file(&first).unwrap();
    assert!(log.record_final_summary(serde_json::json!({"allocs": 4242})));
    log.stop();
    let s = log.stats();
    let files = chain_files(&dir);
    let in_dir = files
        .iter()
        .flat_map(|f| read_lines(f))
        .any(|l| l.contains("\"summary\"") && l.contains("4242"));
    assert!(
        in_dir || s.records_lost > 0,
        "the last summary went into the removed file: in no file of the directory and not \
         counted lost ({s:?}); files {:?}",
        files.iter().map(|f| read_lines(f)).collect::<Vec<_>>()
    );
}

/// A signed log whose active file was removed and whose chain cannot go on in a new file yet
/// (the next name taken): its writes are known to fail, so, as while a disk is full, a
/// checkpoint that falls due meanwhile is signed without a `checkpoint` record appended to
/// the chain, which would only be lost. No record emitted after the removal was seen: none
/// is counted lost.
#[test]
fn a_checkpoint_due_while_the_active_file_is_gone_loses_no_record() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = log_dir(&tmp);
    let (key, _public) = kvhygiene::forensic::cli::keygen(&tmp.path().join("signer")).unwrap();
    let mut c = cfg(&dir, 1 << 20);
    c.signing_key_file = Some(key);
    c.checkpoint_dir = Some(tmp.path().join("ckpt"));
    c.checkpoint_interval_ms = 1500;
    let log = ForensicLog::open_with_secret(&c, start(), Some(secret())).unwrap();
    for i in 0..3 {
        log.emit(event(i));
    }
    log.flush();
    let first = chain_files(&dir)[0].clone();
    let planted = dir.join(name(&first).replace("-000000.", "-000001."));
    std::fs::write(&planted, b"").unwrap();
    std::fs::remove_file(&first).unwrap();
    // Written before the writer looks: it goes with the removed file.
    log.emit(event(10));
    log.flush();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while log.stats().write_errors < 2 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(log.stats().write_errors >= 2, "{:?}", log.stats());
    // A checkpoint falls due meanwhile.
    std::thread::sleep(std::time::Duration::from_millis(2500));
    let s = log.stats();
    log.stop();
    assert_eq!(
        s.records_lost, 0,
        "no record was emitted after the removal was seen, yet records were counted lost: \
         {s:?}"
    );
}

/// Whether some process holds a `flock` on the file with inode `ino` (from /proc/locks,
/// which is read without taking or disturbing any lock).
fn flocked(ino: u64) -> bool {
    let text = std::fs::read_to_string("/proc/locks").unwrap_or_default();
    let ino = ino.to_string();
    text.lines().any(|l| {
        l.contains("FLOCK")
            && l.split_whitespace()
                .nth(5)
                .and_then(|f| f.rsplit(':').next())
                .is_some_and(|i| i == ino)
    })
}

/// A crashed chain (its `stop` record removed, 8 MiB of records making recovery read and hash
/// for a while) taken over at open by crash recovery, whose file `change(file, scratch dir)`
/// alters once recovery holds its lock; the run then writes records, waits longer than the
/// writer's once-a-second check of its active file, writes `req-200` and stops. Returns the
/// log's statistics and whether `req-200` is in a file of the directory (tried again, up to
/// ten times, when the change came before recovery chose the chain).
fn run_on_a_file_changed_while_recovery_takes_it_over(
    change: impl Fn(&std::path::Path, &std::path::Path) + Clone + Send + 'static,
) -> (kvhygiene::forensic::LogStats, bool) {
    for _ in 0..10 {
        let tmp = tempfile::tempdir().unwrap();
        let dir = log_dir(&tmp);
        let c = cfg(&dir, 1 << 30);
        let log = ForensicLog::open_with_secret(&c, start(), Some(secret())).unwrap();
        let pad = "x".repeat(256 << 10);
        for _ in 0..32 {
            log.record_anomaly(serde_json::json!({ "pad": pad }));
        }
        log.emit(event(1));
        log.flush();
        let chain = log.stats().chain.unwrap();
        log.stop();
        let file = chain_files(&dir)[0].clone();
        let mut lines = read_lines(&file);
        assert!(lines.pop().unwrap().contains("\"kind\":\"stop\""));
        write_lines(&file, &lines);
        let ino = std::fs::metadata(&file).unwrap().ino();
        let changer = {
            let (file, scratch, change) = (file.clone(), tmp.path().to_path_buf(), change.clone());
            std::thread::spawn(move || {
                let deadline = Instant::now() + Duration::from_secs(20);
                while !flocked(ino) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(1));
                }
                std::thread::sleep(Duration::from_millis(5));
                change(&file, &scratch);
            })
        };
        let log = ForensicLog::open_with_secret(&c, start(), Some(secret())).unwrap();
        changer.join().unwrap();
        if log.stats().chain.as_deref() != Some(chain.as_str()) {
            // The change came before recovery chose the chain: a new chain, nothing to see.
            log.stop();
            continue;
        }
        for i in 0..3 {
            log.emit(event(100 + i));
        }
        log.flush();
        std::thread::sleep(Duration::from_millis(1500));
        log.emit(event(200));
        log.stop();
        let in_dir = chain_files(&dir)
            .iter()
            .flat_map(|f| read_lines(f))
            .any(|l| l.contains("req-200"));
        return (log.stats(), in_dir);
    }
    panic!("recovery never took the chain over");
}

/// The file recovery took over is removed from the directory while recovery reads it (a
/// cleanup, someone erasing evidence): the records of the new run would go into a file no
/// reader can open. As for a file removed while the log runs (docs/forensic-log.md, "Write
/// errors"), the writer sees within about a second that the directory no longer names its
/// active file: the records of the new run are in the directory, or counted lost; none is
/// counted written into the removed file unseen.
#[test]
fn a_chain_file_removed_while_recovery_takes_it_over_is_seen_as_gone() {
    let (s, in_dir) = run_on_a_file_changed_while_recovery_takes_it_over(|file, _| {
        std::fs::remove_file(file).unwrap()
    });
    assert!(
        in_dir || s.records_lost > 0,
        "the active file was removed while recovery took it over; records counted written \
         are in no file of the directory, none is counted lost and no write error was seen: \
         {s:?}"
    );
}

/// As above, but the file is moved out of the directory (still linked there, e.g. into a
/// quarantine directory) and a copy of it renamed into its name ("replaced by another file
/// renamed over it", docs/forensic-log.md, "Write errors"): a write error is counted and the
/// records of the new run are in the directory or counted lost, not written into the moved
/// file unseen.
#[test]
fn a_chain_file_moved_away_and_replaced_while_recovery_takes_it_over_is_seen_as_gone() {
    let (s, in_dir) = run_on_a_file_changed_while_recovery_takes_it_over(|file, scratch| {
        let copy = scratch.join("copy");
        std::fs::copy(file, &copy).unwrap();
        std::fs::rename(file, scratch.join("quarantined")).unwrap();
        std::fs::rename(&copy, file).unwrap();
    });
    assert!(
        s.write_errors >= 1 && (in_dir || s.records_lost > 0),
        "the active file was moved out of the directory and replaced by a copy while recovery \
         took it over; no write error was counted, and records counted written are in no file \
         of the directory: {s:?}"
    );
}

#[path = "mounted/mod.rs"]
mod mounted;

/// A small tmpfs mounted on `root` (a directory in a temporary directory) for one test, with
/// the log directory `dir` inside it. Fields drop in order: the file system is unmounted
/// before the temporary directory under it is removed.
struct SmallFs {
    root: std::path::PathBuf,
    dir: std::path::PathBuf,
    _mount: mounted::Mounted,
    tmp: tempfile::TempDir,
}

impl SmallFs {
    /// A tmpfs of `size` with mount `options` (`,nr_inodes=64`, ...); `None`, said on
    /// stderr, where this process may not mount one (the test then skips).
    fn mount(size: &str, options: &str) -> Option<SmallFs> {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("fs");
        std::fs::create_dir(&root).unwrap();
        let mount = mounted::Mounted::tmpfs(&root, size, options)?;
        Some(SmallFs {
            dir: root.join("log"),
            root,
            _mount: mount,
            tmp,
        })
    }
}

/// After `log` stopped: the chain in `dir` verifies and is closed, every one of the
/// `emitted` events (`quarantine` records) is in it or counted in a `lost` record's
/// `lost_kinds`, and the `stop` record's `records_lost` is the log's. With `described`, the
/// `lost` records' totals are the log's `records_lost` too (every loss was followed by a
/// write that described it).
fn every_event_accounted_for(
    log: &ForensicLog,
    dir: &std::path::Path,
    opts: &kvhygiene::forensic::VerifyOptions,
    emitted: u64,
    described: bool,
) {
    let s = log.stats();
    let r = verify(dir, opts);
    assert!(r.ok(), "{s:?}: {r:?}");
    assert!(r.chains[0].closed, "{s:?}: {r:?}");
    let records = whole_records(dir);
    let written = records.iter().filter(|r| r["kind"] == "quarantine").count() as u64;
    let lost: Vec<&serde_json::Value> = records.iter().filter(|r| r["kind"] == "lost").collect();
    let lost_events: u64 = lost
        .iter()
        .map(|r| r["lost_kinds"]["quarantine"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(
        written + lost_events,
        emitted,
        "{s:?}; lost records {lost:?}"
    );
    if described {
        let total: u64 = lost
            .iter()
            .map(|r| r["records_lost"].as_u64().unwrap())
            .sum();
        assert_eq!(total, s.records_lost, "{s:?}; lost records {lost:?}");
    }
    assert_eq!(
        records.last().unwrap()["records_lost"].as_u64(),
        Some(s.records_lost),
        "{s:?}"
    );
}

/// A keyed log in `dir` with 4 KiB files, and the options that verify it; `signed`: with a
/// signing key (made in `tmp`) and a checkpoint every 3 records, in the log directory.
fn small_files_cfg(
    tmp: &tempfile::TempDir,
    dir: &std::path::Path,
    signed: bool,
) -> (
    kvhygiene::config::LogConfig,
    kvhygiene::forensic::VerifyOptions,
) {
    let mut c = cfg(dir, 4096);
    let mut opts = keyed_opts();
    if signed {
        let (key, public) = kvhygiene::forensic::cli::keygen(&tmp.path().join("signer")).unwrap();
        c.signing_key_file = Some(key);
        c.checkpoint_every_records = 3;
        opts.public_keys = vec![kvhygiene::forensic::keys::read_public_key(&public).unwrap()];
        opts.checkpoints = vec![dir.to_path_buf()];
    }
    (c, opts)
}

/// A real full file system (a small tmpfs), rotating files: while it is full, records are
/// kept or counted lost; once room is made, the log goes on, the chain verifies (against
/// its signed checkpoints, when it signs them), and every event emitted is either in the
/// chain or counted in a `lost` record's `lost_kinds`, whose totals, as the `stop` record's,
/// are the log's `records_lost`.
fn run_on_a_real_full_disk(signed: bool) {
    let Some(fs) = SmallFs::mount("256k", "") else {
        return;
    };
    let (root, dir) = (&fs.root, &fs.dir);
    let (mut c, opts) = small_files_cfg(&fs.tmp, dir, signed);
    if signed {
        c.fsync = kvhygiene::config::FsyncPolicy::Always;
    }
    let log = ForensicLog::open_with_secret(&c, start(), Some(secret())).unwrap();
    // Fill what is left of the file system.
    let filler = root.join("filler");
    {
        let mut f = std::fs::File::create(&filler).unwrap();
        let block = vec![0u8; 512];
        while std::io::Write::write_all(&mut f, &block).is_ok() {}
    }
    let mut emitted = 0u64;
    for _ in 0..40 {
        log.emit(event(emitted));
        emitted += 1;
        log.flush();
    }
    let full = log.stats();
    assert!(
        full.write_errors > 0,
        "the file system never filled: {full:?}"
    );
    // Room again.
    std::fs::remove_file(&filler).unwrap();
    for _ in 0..40 {
        log.emit(event(emitted));
        emitted += 1;
        log.flush();
    }
    log.stop();
    every_event_accounted_for(&log, dir, &opts, emitted, true);
}

#[test]
fn a_real_full_disk_loses_no_record_uncounted_and_the_chain_verifies() {
    run_on_a_real_full_disk(false);
}

#[test]
fn a_real_full_disk_under_signed_checkpoints_loses_no_record_uncounted_and_verifies() {
    run_on_a_real_full_disk(true);
}

/// A file system out of inodes (a tmpfs mounted with few): the next file of a rotation
/// cannot be created, while the active file still takes writes. Records are kept or counted
/// lost, and once inodes are free again the chain goes on; it verifies, and every event is
/// in it or counted in a `lost` record.
fn run_with_rotations_refused(signed: bool) {
    let Some(fs) = SmallFs::mount("8m", ",nr_inodes=64") else {
        return;
    };
    let (root, dir) = (&fs.root, &fs.dir);
    let (c, opts) = small_files_cfg(&fs.tmp, dir, signed);
    let log = ForensicLog::open_with_secret(&c, start(), Some(secret())).unwrap();
    // Use up every inode left.
    let mut fillers = Vec::new();
    for i in 0.. {
        let p = root.join(format!("filler-{i}"));
        if std::fs::File::create(&p).is_err() {
            break;
        }
        fillers.push(p);
    }
    let mut emitted = 0u64;
    for _ in 0..60 {
        log.emit(event(emitted));
        emitted += 1;
        log.flush();
    }
    let refused = log.stats();
    assert!(
        refused.write_errors > 0,
        "no rotation was refused: {refused:?}"
    );
    for p in &fillers {
        std::fs::remove_file(p).unwrap();
    }
    for _ in 0..30 {
        log.emit(event(emitted));
        emitted += 1;
        log.flush();
    }
    log.stop();
    every_event_accounted_for(&log, dir, &opts, emitted, false);
}

#[test]
fn rotations_refused_for_want_of_inodes_lose_no_record_uncounted_and_the_chain_verifies() {
    run_with_rotations_refused(false);
}

#[test]
fn rotations_refused_for_want_of_inodes_under_signed_checkpoints_verify() {
    run_with_rotations_refused(true);
}

/// A log that fills its own file system (a small tmpfs, rotating often) and has a backlog
/// queued when it stops: the active file is at its size limit and no next file fits, so
/// every record would rotate. Its records are counted lost without a write tried for each
/// (the tries back off), so the backlog is drained well inside the stop's wait, and the
/// chain still ends with its `lost` and `stop` records, which account for every event.
/// (A write tried per record drained about 2,000 records a second: the stop gave up after
/// its 10 s with the chain open and thousands of records neither written nor counted.)
#[test]
fn a_backlog_at_stop_on_a_disk_the_log_filled_is_counted_and_the_chain_closed() {
    let Some(fs) = SmallFs::mount("256k", "") else {
        return;
    };
    let dir = &fs.dir;
    let mut c = cfg(dir, 8192);
    c.queue_capacity = 65_536;
    let log = ForensicLog::open_with_secret(&c, start(), Some(secret())).unwrap();
    let emitted = 40_000u64;
    for i in 0..emitted {
        log.emit(event(i));
    }
    log.stop();
    let s = log.stats();
    assert!(s.write_errors > 0, "the file system never filled: {s:?}");
    every_event_accounted_for(&log, dir, &keyed_opts(), emitted, true);
}

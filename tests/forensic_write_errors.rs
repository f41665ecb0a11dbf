//! A failing disk: the error is sticky and counted, the chain stays intact, and when writing
//! resumes a `lost` record says what was lost.

mod forensic_common;

use forensic_common::*;
use kvhygiene::events::EventSink;
use kvhygiene::forensic::ForensicLog;

#[test]
fn write_errors_are_sticky_counted_and_recorded_when_writing_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = log_dir(&tmp);
    let log = ForensicLog::open_with_secret(&cfg(&dir, 1 << 20), start(), Some(secret())).unwrap();
    for i in 0..10 {
        log.emit(event(i));
    }
    log.flush();
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
    assert_eq!(s.records_lost, 8, "{s:?}");
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
    assert_eq!(s.records_written, 1 + 10 + 1 + 4 + 1);
    let r = verify(&dir, &keyed_opts());
    assert!(r.ok(), "half-written batches must be cut back: {r:?}");
    let lines = read_lines(&chain_files(&dir)[0]);
    let lost = &lines[11];
    assert!(lost.contains("\"kind\":\"lost\""), "{lost}");
    assert!(lost.contains("\"records_lost\":8"), "{lost}");
    assert!(lost.contains("\"lost_kinds\":{\"quarantine\":8}"), "{lost}");
    assert!(lost.contains("No space left"), "{lost}");
    assert!(lines[12].contains("\"request_id\":\"req-300\""));
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

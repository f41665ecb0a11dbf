//! What the periodic signed checkpoints cover: every record the writer puts in the chain,
//! also those it writes in the same batch as a `checkpoint` record, is covered by a later
//! checkpoint within `KVH_CHECKPOINT_INTERVAL_MS` (docs/forensic-log.md, "Signed
//! checkpoints": "only what a checkpoint covers is protected against truncation").

#[path = "forensic_common/mod.rs"]
mod forensic_common;

use std::time::Duration;

use forensic_common::{cfg, chain_files, event, keyed_opts, log_dir, read_lines, secret, start};
use forensic_common::{verify, write_lines};
use kvhygiene::events::EventSink;
use kvhygiene::forensic::ForensicLog;

/// A log directory in `tmp` with its writer's configuration (files of `max_bytes`), signing
/// checkpoints into `tmp/ckpt`, and the signer's public key.
struct Signed {
    c: kvhygiene::config::LogConfig,
    dir: std::path::PathBuf,
    ckpt_dir: std::path::PathBuf,
    public: std::path::PathBuf,
}

fn signed(tmp: &tempfile::TempDir, max_bytes: u64) -> Signed {
    let (key, public) = kvhygiene::forensic::cli::keygen(&tmp.path().join("signer")).unwrap();
    let dir = log_dir(tmp);
    let ckpt_dir = tmp.path().join("ckpt");
    let mut c = cfg(&dir, max_bytes);
    c.signing_key_file = Some(key);
    c.checkpoint_dir = Some(ckpt_dir.clone());
    Signed {
        c,
        dir,
        ckpt_dir,
        public,
    }
}

/// The seq of the first record of `kind` in `lines`.
fn seq_of(lines: &[String], kind: &str) -> Option<u64> {
    lines.iter().find_map(|l| {
        let v: serde_json::Value = serde_json::from_str(l).ok()?;
        (v["kind"] == kind).then(|| v["seq"].as_u64()).flatten()
    })
}

/// A write fails (disk full) and loses one event; the next periodic checkpoint signs the
/// head before the loss, and the `lost` record that accounts for the event is written right
/// after it, with the `checkpoint` record. That `lost` record is a new record of the chain:
/// a later checkpoint (one interval on) covers it, so that cutting the chain back to the
/// first checkpoint (removing the evidence of the loss) fails verification with the pinned
/// public key.
#[test]
fn a_lost_record_written_with_a_checkpoint_is_covered_by_a_later_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let Signed {
        mut c,
        dir,
        ckpt_dir,
        public,
    } = signed(&tmp, 1 << 20);
    c.checkpoint_interval_ms = 500;
    let log = ForensicLog::open_with_secret(&c, start(), Some(secret())).unwrap();
    log.emit(event(1));
    log.flush();
    log.inject_write_faults(1);
    log.emit(event(2));
    log.flush();
    // Several intervals: the first checkpoints event 1 and writes `lost`, the next ones have
    // that `lost` record (and the `checkpoint` record) to cover.
    std::thread::sleep(Duration::from_millis(2500));
    // The process dies here (no `stop`, no final checkpoint).
    std::mem::forget(log);

    let files = chain_files(&dir);
    assert_eq!(files.len(), 1, "{files:?}");
    let lines = read_lines(&files[0]);
    let lost = seq_of(&lines, "lost").unwrap_or_else(|| {
        panic!(
            "no `lost` record for the event the failed write lost:\n{}",
            lines.join("\n")
        )
    });
    let opts = kvhygiene::forensic::VerifyOptions {
        public_keys: vec![kvhygiene::forensic::keys::read_public_key(&public).unwrap()],
        checkpoints: vec![ckpt_dir.clone()],
        ..keyed_opts()
    };
    let r = verify(&dir, &opts);
    assert!(r.ok(), "{r:?}");
    let covered = r.chains[0].checkpoint_seq;

    // Cut the chain back to just before the `lost` record, as whoever wants the loss unseen
    // would.
    let cut: Vec<String> = lines
        .iter()
        .take_while(|l| seq_of(std::slice::from_ref(*l), "lost").is_none())
        .cloned()
        .collect();
    write_lines(&files[0], &cut);
    let after_cut = verify(&dir, &opts);
    assert!(
        !after_cut.ok(),
        "the chain cut before its `lost` record (seq {lost}) still verifies with the pinned \
         public key: the newest signed checkpoint is at seq {covered:?}, {} idle intervals \
         after the record was written",
        2500 / 500 - 1
    );
}

/// `KVH_CHECKPOINT_EVERY=1` and small files: when a `checkpoint` record is the record that
/// fills a file, the writer rotates first and the new file starts with its `rotate` record,
/// then the `checkpoint` record. The `rotate` record is a new record of the chain (the link
/// from the previous file): a checkpoint covers it, so that removing the chain's newest file
/// is detected by verification with the pinned public key.
#[test]
fn a_rotation_made_by_a_checkpoint_record_is_covered_by_a_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let Signed {
        mut c,
        dir,
        ckpt_dir,
        public,
    } = signed(&tmp, 4096);
    c.checkpoint_every_records = 1;
    let log = ForensicLog::open_with_secret(&c, start(), Some(secret())).unwrap();
    let kinds = |p: &std::path::Path| -> Vec<String> {
        read_lines(p)
            .iter()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                v["kind"].as_str().unwrap().to_string()
            })
            .collect()
    };
    let mut found = false;
    for i in 0..2000 {
        log.emit(event(i));
        log.flush();
        std::thread::sleep(Duration::from_millis(20));
        let files = chain_files(&dir);
        if files.len() > 1
            && kinds(files.last().unwrap()).starts_with(&["rotate".into(), "checkpoint".into()])
        {
            found = true;
            break;
        }
    }
    assert!(found, "no file was started by a checkpoint record");
    std::thread::sleep(Duration::from_millis(1000));
    // The process dies here (no `stop`, no final checkpoint).
    std::mem::forget(log);

    let files = chain_files(&dir);
    let newest = files.last().unwrap().clone();
    let opts = kvhygiene::forensic::VerifyOptions {
        public_keys: vec![kvhygiene::forensic::keys::read_public_key(&public).unwrap()],
        checkpoints: vec![ckpt_dir.clone()],
        ..keyed_opts()
    };
    let r = verify(&dir, &opts);
    assert!(r.ok(), "{r:?}");
    let covered = r.chains[0].checkpoint_seq;
    let kinds_before = kinds(&newest);
    std::fs::remove_file(&newest).unwrap();
    let after = verify(&dir, &opts);
    assert!(
        !after.ok(),
        "the chain still verifies with the pinned public key after its newest file {} \
         ({:?}) was removed: the newest signed checkpoint is at seq {covered:?}, in the file \
         before",
        newest.display(),
        kinds_before
    );
}

/// A signed log, idle right after a periodic checkpoint, loses one event to a failed write
/// (disk full, then space again). docs/forensic-log.md, "Write errors": the writer "keeps
/// trying; the first successful batch starts with a `lost` record". With checkpoints every
/// `KVH_CHECKPOINT_INTERVAL_MS`, the chain records the loss (and a checkpoint covers it)
/// within a few intervals, without waiting for the process's next event, which may never
/// come before it is killed.
#[test]
fn a_write_failure_after_a_checkpoint_is_recorded_in_the_chain_while_the_log_is_idle() {
    let tmp = tempfile::tempdir().unwrap();
    let Signed {
        mut c,
        dir,
        ckpt_dir,
        public,
    } = signed(&tmp, 1 << 20);
    c.checkpoint_interval_ms = 200;
    let log = ForensicLog::open_with_secret(&c, start(), Some(secret())).unwrap();
    log.emit(event(1));
    log.flush();
    // The interval's checkpoint covers event 1.
    std::thread::sleep(Duration::from_millis(600));
    log.inject_write_faults(1);
    log.emit(event(2));
    log.flush();
    assert_eq!(log.stats().records_lost, 1, "{:?}", log.stats());
    std::thread::sleep(Duration::from_millis(1500));
    // The process dies here (no `stop`).
    std::mem::forget(log);

    let lines = read_lines(&chain_files(&dir)[0]);
    let lost = seq_of(&lines, "lost");
    let opts = kvhygiene::forensic::VerifyOptions {
        public_keys: vec![kvhygiene::forensic::keys::read_public_key(&public).unwrap()],
        checkpoints: vec![ckpt_dir.clone()],
        ..keyed_opts()
    };
    let r = verify(&dir, &opts);
    assert!(r.ok(), "{r:?}");
    assert!(
        lost.is_some_and(|s| r.chains[0].checkpoint_seq >= Some(s)),
        "1.5 s (7 checkpoint intervals) after a write lost an event, the chain holds no \
         checkpointed `lost` record (lost at seq {lost:?}, checkpoint at {:?}):\n{}",
        r.chains[0].checkpoint_seq,
        lines.join("\n")
    );
}

/// A `checkpoint` record is not itself a new record to checkpoint: a log left idle after its
/// records are checkpointed signs no further checkpoint at each interval.
#[test]
fn an_idle_log_signs_no_further_checkpoints() {
    let tmp = tempfile::tempdir().unwrap();
    let (key, _) = kvhygiene::forensic::cli::keygen(&tmp.path().join("signer")).unwrap();
    let dir = log_dir(&tmp);
    let mut c = cfg(&dir, 1 << 20);
    c.signing_key_file = Some(key);
    c.checkpoint_dir = Some(tmp.path().join("ckpt"));
    c.checkpoint_interval_ms = 100;
    let log = ForensicLog::open_with_secret(&c, start(), Some(secret())).unwrap();
    for i in 0..3 {
        log.emit(event(i));
    }
    log.flush();
    // Ten intervals and more of an idle log.
    std::thread::sleep(Duration::from_millis(1500));
    log.stop();
    let lines = read_lines(&chain_files(&dir)[0]);
    let checkpoints = lines
        .iter()
        .filter(|l| l.contains("\"kind\":\"checkpoint\""))
        .count();
    // The one signed at open and the one over the three events.
    assert!(
        checkpoints <= 2,
        "{checkpoints} checkpoint records:\n{}",
        lines.join("\n")
    );
}

/// An earlier genuine checkpoint put back over the newer one still verifies (both are signed,
/// and checkpoints copied off the node earlier look the same), but the chain's own
/// MAC-checked `checkpoint` records say a later one was signed: `verify-log` and `kvh
/// evidence` call attention to it, since what follows the earlier checkpoint could have been
/// cut.
#[test]
fn a_checkpoint_older_than_the_chain_records_is_called_out() {
    let tmp = tempfile::tempdir().unwrap();
    let Signed {
        mut c,
        dir,
        ckpt_dir,
        public,
    } = signed(&tmp, 1 << 20);
    c.checkpoint_every_records = 4;
    let log = ForensicLog::open_with_secret(&c, start(), Some(secret())).unwrap();
    for i in 0..6 {
        log.emit(event(i));
    }
    log.flush();
    let ckpt = std::fs::read_dir(&ckpt_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "ckpt"))
        .unwrap();
    let earlier = std::fs::read(&ckpt).unwrap();
    for i in 6..20 {
        log.emit(event(i));
    }
    log.flush();
    // The writer dies (no final checkpoint); the earlier checkpoint is put back.
    std::mem::forget(log);
    std::fs::write(&ckpt, &earlier).unwrap();

    let key_file = tmp.path().join("hmac.key");
    std::fs::write(&key_file, &*secret()).unwrap();
    let args = kvhygiene::forensic::cli::VerifyLogArgs {
        key_file: vec![key_file],
        public_key: vec![public],
        checkpoint: Some(ckpt_dir.clone()),
        ..kvhygiene::forensic::cli::VerifyLogArgs::of(dir.clone())
    };
    let verify_log = |extra: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_kvh"))
            .arg("verify-log")
            .arg(&dir)
            .arg("--key-file")
            .arg(&args.key_file[0])
            .arg("--public-key")
            .arg(&args.public_key[0])
            .arg("--checkpoint")
            .arg(&ckpt_dir)
            .args(extra)
            .env_remove("KVH_LOG_DIR")
            .output()
            .unwrap()
    };
    let out = verify_log(&[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(
        text.contains("ATTENTION: its records say a checkpoint at seq"),
        "{text}"
    );
    // The same finding for a script reading --json.
    let out = verify_log(&["--json"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let chain = &json["chains"][0];
    assert!(
        chain["checkpoint_behind"].as_u64() > chain["checkpoint_seq"].as_u64(),
        "{chain}"
    );
    let ev = kvhygiene::forensic::evidence::collect(
        &kvhygiene::forensic::evidence::EvidenceArgs::of(args),
    )
    .unwrap();
    let behind = &ev.integrity.checkpoint_behind;
    assert!(
        behind.len() == 1 && behind[0].recorded_seq > behind[0].matched_seq,
        "{behind:?}"
    );
    assert!(
        kvhygiene::forensic::evidence::render(&ev).contains("an earlier checkpoint was put back")
    );
}

//! Many records across several rotations verify clean, with and without a key; several
//! writers share a directory; summaries, anomalies and the CLI.

mod forensic_common;

use std::process::Command;

use forensic_common::*;
use kvhygiene::events::EventSink;
use kvhygiene::forensic::ForensicLog;
use serde_json::json;

fn rotation_and_chain(keyed: bool) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = log_dir(&tmp);
    write_log(&cfg(&dir, 32 * 1024), 2000, keyed);
    let files = chain_files(&dir);
    assert!(files.len() >= 5, "only {} files", files.len());
    for f in &files {
        assert!(std::fs::metadata(f).unwrap().len() <= 32 * 1024);
    }
    let opts = if keyed {
        keyed_opts()
    } else {
        Default::default()
    };
    let r = verify(&dir, &opts);
    assert!(r.ok(), "{r:?}");
    assert_eq!(r.chains.len(), 1);
    let c = &r.chains[0];
    // start + 2000 events + one rotate per later file + stop
    assert_eq!(c.records, 2000 + 2 + (files.len() as u64 - 1));
    assert!(c.closed);
    assert_eq!(c.macs_checked, keyed);
    assert_eq!(c.first_seq, Some(0));
    // Every file after the first begins with a rotate record linking to its predecessor.
    let second = read_lines(&files[1]);
    assert!(second[0].contains("\"kind\":\"rotate\""));
    assert!(second[0].contains(&format!("\"prev_file\":\"{}\"", name(&files[0]))));
    if keyed {
        assert!(second[0].contains("\"mac\":\""));
    }
}

#[test]
fn forensic_rotation_and_chain_without_key() {
    rotation_and_chain(false);
}

#[test]
fn forensic_rotation_and_chain_with_key() {
    rotation_and_chain(true);
}

#[test]
fn records_carry_ids_and_block_fields() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = log_dir(&tmp);
    write_log(&cfg(&dir, 1 << 20), 1, false);
    let lines = read_lines(&chain_files(&dir)[0]);
    assert!(lines[0].contains("\"kind\":\"start\""));
    assert!(lines[0].contains("\"config_digest\":\""));
    let q = &lines[1];
    for f in [
        "\"kind\":\"quarantine\"",
        "\"tenant_id\":\"tenant-a\"",
        "\"request_id\":\"req-0\"",
        "\"model_id\":\"llama\"",
        "\"addr\":\"0x7f0000000000\"",
        "\"capacity\":4096",
        "\"reason\":\"verify_failed\"",
    ] {
        assert!(q.contains(f), "{f} missing in {q}");
    }
    assert!(lines.last().unwrap().contains("\"kind\":\"stop\""));
}

#[test]
fn shared_directory_holds_one_chain_per_writer() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = log_dir(&tmp);
    let c = cfg(&dir, 16 * 1024);
    let a = ForensicLog::open_with_secret(&c, start(), Some(secret())).unwrap();
    let b = ForensicLog::open_with_secret(&c, start(), Some(secret())).unwrap();
    for i in 0..500 {
        a.emit(event(i));
        b.emit(event(i));
    }
    a.stop();
    b.stop();
    let r = verify(&dir, &keyed_opts());
    assert!(r.ok(), "{r:?}");
    assert_eq!(r.chains.len(), 2);
}

#[test]
fn summaries_coalesce_and_anomalies_are_logged() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = log_dir(&tmp);
    let mut c = cfg(&dir, 1 << 20);
    c.summary_interval_ms = 60_000;
    let log = ForensicLog::open_with_secret(&c, start(), None).unwrap();
    log.record_summary(json!({"allocs": 1}));
    log.flush();
    for i in 0..10 {
        log.record_summary(json!({"allocs": i, "ratio": 0.5}));
    }
    log.record_anomaly(json!({"score": 3.25, "what": "burst"}));
    log.stop();
    let s = log.stats();
    assert!(s.summaries_coalesced >= 9, "{s:?}");
    let r = verify(&dir, &Default::default());
    assert!(r.ok(), "{r:?}");
    let text = std::fs::read_to_string(&chain_files(&dir)[0]).unwrap();
    assert_eq!(text.matches("\"kind\":\"summary\"").count(), 2, "{text}");
    assert!(text.contains("\"ratio\":\"0.5\""));
    assert!(text.contains("\"kind\":\"anomaly\""));
    assert!(text.contains("\"score\":\"3.25\""));
    // stop is idempotent and emits after stop are counted, not written.
    log.stop();
    log.emit(event(1));
    assert_eq!(log.stats().records_lost, 1);
}

#[test]
fn checkpoints_are_written_periodically_and_at_stop() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = log_dir(&tmp);
    let ck = tmp.path().join("ckpt");
    let (key, public) = kvhygiene::forensic::cli::keygen(&tmp.path().join("signer")).unwrap();
    let mut c = cfg(&dir, 32 * 1024);
    c.signing_key_file = Some(key);
    c.checkpoint_dir = Some(ck.clone());
    c.checkpoint_every_records = 100;
    write_log(&c, 1000, true);
    let text: String = chain_files(&dir)
        .iter()
        .map(|f| std::fs::read_to_string(f).unwrap())
        .collect();
    assert!(text.matches("\"kind\":\"checkpoint\"").count() >= 5);
    let out = Command::new(env!("CARGO_BIN_EXE_kvh"))
        .arg("verify-log")
        .arg(&dir)
        .arg("--public-key")
        .arg(&public)
        .arg("--checkpoint")
        .arg(&ck)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("checkpoint at seq"), "{stdout}");
    assert!(stdout.contains(": OK"), "{stdout}");
}

#[test]
fn cli_exit_codes_and_json() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = log_dir(&tmp);
    write_log(&cfg(&dir, 1 << 20), 10, true);
    let key_file = tmp.path().join("hmac.key");
    std::fs::write(&key_file, SECRET).unwrap();
    let kvh = env!("CARGO_BIN_EXE_kvh");
    let run = |args: &[&std::ffi::OsStr]| Command::new(kvh).args(args).output().unwrap();
    let ok = run(&[
        "verify-log".as_ref(),
        dir.as_os_str(),
        "--key-file".as_ref(),
        key_file.as_os_str(),
        "--json".as_ref(),
    ]);
    assert_eq!(ok.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&ok.stdout).unwrap();
    assert_eq!(v["chains"][0]["records"], 12);
    let missing = run(&["verify-log".as_ref(), tmp.path().join("nope").as_os_str()]);
    assert_eq!(missing.status.code(), Some(2));
    let wrong = tmp.path().join("wrong.key");
    std::fs::write(&wrong, "another-secret-0123456789").unwrap();
    let bad = run(&[
        "verify-log".as_ref(),
        dir.as_os_str(),
        "--key-file".as_ref(),
        wrong.as_os_str(),
    ]);
    assert_eq!(bad.status.code(), Some(1));
    let text = String::from_utf8_lossy(&bad.stdout);
    assert!(text.contains("-000000.jsonl:1: MAC mismatch"), "{text}");
    let usage = run(&["verify-log".as_ref()]);
    assert_eq!(usage.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("No such file or directory"));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("log directory "));
    // A key file that cannot be read is named with the option that gave it.
    let absent = tmp.path().join("absent.key");
    for option in ["--key-file", "--public-key"] {
        let out = run(&[
            "verify-log".as_ref(),
            dir.as_os_str(),
            option.as_ref(),
            absent.as_os_str(),
        ]);
        assert_eq!(out.status.code(), Some(2));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&format!("{option} {}: No such file", absent.display())),
            "{err}"
        );
    }
    // A directory without a log is not "verified": a mistyped path must not read as OK.
    let empty = tempfile::tempdir().unwrap();
    for json in [false, true] {
        let mut args = vec!["verify-log".as_ref(), empty.path().as_os_str()];
        if json {
            args.push("--json".as_ref());
        }
        let out = run(&args);
        assert_eq!(out.status.code(), Some(2));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("no forensic log files (kvh-*.jsonl)"), "{err}");
        assert!(!String::from_utf8_lossy(&out.stdout).contains("OK"));
    }
    // Nor is a chain file without a single record.
    let first = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().ends_with("-000000.jsonl"))
        .expect("first chain file");
    std::fs::copy(&first, empty.path().join(first.file_name().unwrap())).unwrap();
    std::fs::File::create(empty.path().join(first.file_name().unwrap()))
        .unwrap()
        .set_len(0)
        .unwrap();
    let out = run(&["verify-log".as_ref(), empty.path().as_os_str()]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no records in its forensic log files"),
        "{err}"
    );
}

#[test]
fn text_report_says_when_no_checkpoint_was_checked() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = log_dir(&tmp);
    write_log(&cfg(&dir, 1 << 20), 3, false);
    let out = Command::new(env!("CARGO_BIN_EXE_kvh"))
        .arg("verify-log")
        .arg(&dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("no checkpoint"), "{stdout}");
}

const BIG_RECORD_CHILD: &str = "KVH_FORENSIC_BIG_RECORD_CHILD_DIR";

/// In the child (re-executed test binary): with the smallest rotation size, writes a record
/// larger than a whole file, then stops the log and exits 0. In a normal test run it returns
/// at once.
#[test]
fn big_record_child_entry() {
    let Some(dir) = std::env::var_os(BIG_RECORD_CHILD) else {
        return;
    };
    let log = ForensicLog::open_with_secret(
        &cfg(std::path::Path::new(&dir), 4096),
        start(),
        Some(secret()),
    )
    .unwrap();
    log.emit(event(0));
    log.record_anomaly(json!({"note": "x".repeat(6000)}));
    log.emit(event(1));
    log.stop();
    std::process::exit(0);
}

/// A record larger than `KVH_LOG_MAX_BYTES` (a caller's anomaly detail, a `kv_scrub` record
/// naming many blocks) is written once, in a file of its own after one rotation; the writer
/// goes on, and the chain verifies.
#[test]
fn a_record_larger_than_the_rotation_size_is_written_in_a_file_of_its_own() {
    use std::time::{Duration, Instant};
    let tmp = tempfile::tempdir().unwrap();
    let dir = log_dir(&tmp);
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "big_record_child_entry",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(BIG_RECORD_CHILD, &dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let files = chain_files(&dir);
    assert!(
        status.is_some_and(|s| s.success()),
        "the writer did not survive a record larger than a file: {status:?}, {} files",
        files.len()
    );
    assert!(files.len() <= 3, "{} files", files.len());
    let r = verify(&dir, &keyed_opts());
    assert!(r.ok(), "{r:?}");
    let text: String = files
        .iter()
        .map(|f| std::fs::read_to_string(f).unwrap())
        .collect();
    assert!(text.contains(&"x".repeat(6000)));
    assert!(text.contains("\"request_id\":\"req-1\""));
    assert!(text.contains("\"kind\":\"stop\""));
}

/// A verification of the log of a running writer (the nightly job, `kvh gate --log-dir`)
/// finds it intact: a writer that rotates and writes a checkpoint while the directory is
/// being listed has only added records, which is not records cut off or files deleted. The
/// directory holds many entries, as the log of a long-lived deployment does, so that listing
/// it takes a while.
#[test]
fn a_writer_rotating_and_checkpointing_during_a_verification_is_not_truncation() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    let tmp = tempfile::tempdir().unwrap();
    let dir = log_dir(&tmp);
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    for j in 0..20_000 {
        std::fs::write(dir.join(format!("notes-{j}.txt")), b"").unwrap();
    }
    let (key, public) = kvhygiene::forensic::cli::keygen(&tmp.path().join("signer")).unwrap();
    let mut c = cfg(&dir, 4096);
    c.signing_key_file = Some(key);
    c.checkpoint_every_records = 8;
    let log = Arc::new(ForensicLog::open_with_secret(&c, start(), Some(secret())).unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (log, stop) = (Arc::clone(&log), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                log.emit(event(i));
                i += 1;
            }
        })
    };
    let opts = kvhygiene::forensic::VerifyOptions {
        public_keys: vec![kvhygiene::forensic::keys::read_public_key(&public).unwrap()],
        checkpoints: vec![dir.clone()],
        ..keyed_opts()
    };
    let began = Instant::now();
    let mut failed = None;
    while failed.is_none() && began.elapsed() < Duration::from_secs(5) {
        let r = verify(&dir, &opts);
        if !r.ok() {
            failed = Some(format!("{:?} {:?}", r.first_problem(), r.errors));
        }
    }
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    log.stop();
    assert_eq!(failed, None, "a growing log reported as tampered");
}

/// Verifies `dir` with `opts` again and again for 5 s while another thread runs `work` in a
/// loop; returns the first failed verification's problem and errors, if any.
fn verify_while(
    dir: &std::path::Path,
    opts: &kvhygiene::forensic::VerifyOptions,
    work: impl Fn() + Send + 'static,
) -> Option<String> {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    let stop = Arc::new(AtomicBool::new(false));
    let worker = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                work();
            }
        })
    };
    let began = Instant::now();
    let mut failed = None;
    while failed.is_none() && began.elapsed() < Duration::from_secs(5) {
        let r = verify(dir, opts);
        if !r.ok() {
            failed = Some(format!("{:?} {:?}", r.first_problem(), r.errors));
        }
    }
    stop.store(true, Ordering::Relaxed);
    worker.join().unwrap();
    failed
}

/// A log directory in `tmp` whose writers sign checkpoints into a directory of their own,
/// files of `max_bytes`: its configuration, and verification options pinning the signer.
fn signed_apart(
    tmp: &tempfile::TempDir,
    max_bytes: u64,
) -> (
    std::path::PathBuf,
    kvhygiene::config::LogConfig,
    kvhygiene::forensic::VerifyOptions,
) {
    let dir = log_dir(tmp);
    let ckpt_dir = tmp.path().join("ckpt");
    let (key, public) = kvhygiene::forensic::cli::keygen(&tmp.path().join("signer")).unwrap();
    let mut c = cfg(&dir, max_bytes);
    c.signing_key_file = Some(key);
    c.checkpoint_dir = Some(ckpt_dir.clone());
    let opts = kvhygiene::forensic::VerifyOptions {
        public_keys: vec![kvhygiene::forensic::keys::read_public_key(&public).unwrap()],
        checkpoints: vec![ckpt_dir],
        ..keyed_opts()
    };
    (dir, c, opts)
}

/// A process that starts while a verification runs (a restarted pod, another rank) creates
/// its chain, checkpoints it, rotates and checkpoints again while the verifier still works
/// through the chains listed before it. Its files and checkpoint, as the verifier finds them,
/// only ever grow: with the signer pinned and checkpoints kept apart, that is not records
/// cut off or newest files deleted.
#[test]
fn a_writer_started_during_a_verification_is_not_truncation() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, mut c, opts) = signed_apart(&tmp, 4096);
    c.checkpoint_every_records = 3;
    // Earlier processes' closed chains, which the verifier reads before a new one.
    for _ in 0..20 {
        write_log(&c, 1, true);
    }
    let failed = verify_while(&dir, &opts, move || {
        let log = ForensicLog::open_with_secret(&c, start(), Some(secret())).unwrap();
        for i in 0..60 {
            log.emit(event(i));
            if i % 4 == 0 {
                log.flush();
            }
        }
        log.stop();
    });
    assert_eq!(failed, None, "a log with a new writer reported as tampered");
}

/// A process starting while the log is verified writes its `start` record, syncs it, and then
/// signs its first checkpoint: a verification that lists the new chain in between finds a
/// chain of one `start` record whose checkpoint is not written yet. That is a writer starting,
/// not a checkpoint deleted: with the signer pinned and checkpoints kept apart, the log still
/// verifies.
#[test]
fn a_chain_listed_before_its_first_checkpoint_is_written_is_not_tampering() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, mut c, opts) = signed_apart(&tmp, 1 << 20);
    c.fsync = kvhygiene::config::FsyncPolicy::Always;
    write_log(&c, 1, true);
    let failed = verify_while(&dir, &opts, move || {
        ForensicLog::open_with_secret(&c, start(), Some(secret()))
            .unwrap()
            .stop();
    });
    assert_eq!(
        failed, None,
        "a log with a process starting reported as tampered"
    );
}

/// With a signing key, every file after the first opens with a `rotate` record that names
/// the signer (the public key the chain's checkpoints are signed with), as `start` does for
/// the first file.
#[test]
fn every_rotate_record_names_the_signer() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = log_dir(&tmp);
    let (key, public) = kvhygiene::forensic::cli::keygen(&tmp.path().join("signer")).unwrap();
    let public = kvhygiene::forensic::keys::read_public_key(&public).unwrap();
    let public_hex = kvhygiene::forensic::record::hex(public.as_bytes());
    let mut c = cfg(&dir, 4096);
    c.signing_key_file = Some(key);
    write_log(&c, 60, true);
    let files = chain_files(&dir);
    assert!(files.len() >= 3, "{files:?}");
    for (i, f) in files.iter().enumerate() {
        let first: serde_json::Value = serde_json::from_str(&read_lines(f)[0]).unwrap();
        let kind = if i == 0 { "start" } else { "rotate" };
        assert_eq!(first["kind"], kind, "{first}");
        assert_eq!(
            first["signer"].as_str(),
            Some(public_hex.as_str()),
            "{first}"
        );
    }
}

/// Summaries waiting to be written are replaced by newer ones: the summary written holds the
/// newest counters, not the first of those it replaced.
#[test]
fn a_coalesced_summary_holds_the_newest_counters() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = log_dir(&tmp);
    let mut c = cfg(&dir, 1 << 20);
    c.summary_interval_ms = 60_000;
    let log = ForensicLog::open_with_secret(&c, start(), None).unwrap();
    log.record_summary(json!({"allocs": 1}));
    log.flush();
    for i in 10..20 {
        log.record_summary(json!({ "allocs": i }));
    }
    log.stop();
    let summaries: Vec<serde_json::Value> = read_lines(&chain_files(&dir)[0])
        .iter()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r["kind"] == "summary")
        .collect();
    assert_eq!(summaries.len(), 2, "{summaries:?}");
    assert_eq!(summaries[1]["counters"]["allocs"], 19, "{summaries:?}");
}

/// The one checkpoint file of a [`signed_apart`] log in `tmp`.
fn the_checkpoint(tmp: &tempfile::TempDir) -> std::path::PathBuf {
    std::fs::read_dir(tmp.path().join("ckpt"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "ckpt"))
        .unwrap()
}

/// A checkpoint's text with the last hex digit of its signature changed.
fn with_a_bad_signature(text: &str) -> String {
    let at = text.rfind("\"}").unwrap() - 1;
    let flipped = if &text[at..=at] == "0" { "1" } else { "0" };
    format!("{}{flipped}{}", &text[..at], &text[at + 1..])
}

/// A chain's checkpoint file forged (its signature does not verify) just after the chain was
/// written: the report names the forged checkpoint once, as it names every problem once,
/// however long the verification looks for the chain's checkpoint.
#[test]
fn a_forged_checkpoint_of_a_fresh_chain_is_reported_once() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, c, opts) = signed_apart(&tmp, 1 << 20);
    write_log(&c, 3, true);
    let ckpt = the_checkpoint(&tmp);
    let forged = with_a_bad_signature(&std::fs::read_to_string(&ckpt).unwrap());
    std::fs::write(&ckpt, forged).unwrap();
    let r = verify(&dir, &opts);
    assert!(!r.ok(), "{r:?}");
    let mut distinct = r.errors.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(
        r.errors.len(),
        distinct.len(),
        "the same problem is reported {} times: {:?}",
        r.errors.len(),
        distinct
    );
}

/// A forged checkpoint of a fresh chain that appears while the verification reads the other
/// checkpoints (after their directory was listed, before the chain's turn): it is read once,
/// found forged, and reported once; the verification does not read it again while it looks
/// for the chain's first checkpoint.
#[test]
fn a_forged_checkpoint_that_appears_during_the_verification_is_reported_once() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, c, opts) = signed_apart(&tmp, 1 << 20);
    let ckpt_dir = tmp.path().join("ckpt");
    write_log(&c, 3, true);
    let ckpt = the_checkpoint(&tmp);
    let forged = with_a_bad_signature(&std::fs::read_to_string(&ckpt).unwrap());
    std::fs::remove_file(&ckpt).unwrap();
    // Other checkpoint files the verification reads first (each one forged too).
    for i in 0..60 {
        std::fs::write(ckpt_dir.join(format!("kvh-other{i:05}.ckpt")), &forged).unwrap();
    }
    // The chain's newest file written just now: its first checkpoint may still come.
    let file = chain_files(&dir).pop().unwrap();
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, bytes).unwrap();
    let (place, tmp_name) = (ckpt.clone(), ckpt_dir.join("forged.tmp"));
    let writer = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(100));
        std::fs::write(&tmp_name, forged).unwrap();
        std::fs::rename(&tmp_name, &place).unwrap();
    });
    let r = verify(&dir, &opts);
    writer.join().unwrap();
    assert!(!r.ok(), "{r:?}");
    let named = ckpt.display().to_string();
    let about_it: Vec<&String> = r.errors.iter().filter(|e| e.contains(&named)).collect();
    assert!(
        about_it.len() <= 1,
        "the forged checkpoint is reported {} times: {about_it:?}",
        about_it.len()
    );
}

/// docs/forensic-log.md, key files: a verifier given `PREFIX.key` as `--public-key` exits
/// with the usage status "once it meets a checkpoint that key's public half signed". A
/// checkpoint whose `public_key` field alone was changed (its signature is the original one,
/// which no key named in it made) was signed by nobody it names: given the right public key,
/// the verification reports the checkpoint as a problem of the log, not a usage error. Here
/// the field is changed to the public key derived from the pinned public key's bytes taken as
/// a seed, which anyone who holds the public key can compute.
#[test]
fn a_checkpoint_naming_the_key_derived_from_the_public_key_is_a_finding_not_a_usage_error() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, c, opts) = signed_apart(&tmp, 1 << 20);
    write_log(&c, 3, true);
    let ckpt = the_checkpoint(&tmp);
    let pinned = opts.public_keys[0];
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    let derived = ed25519_dalek::SigningKey::from_bytes(pinned.as_bytes()).verifying_key();
    let text = std::fs::read_to_string(&ckpt).unwrap();
    let real = hex(pinned.as_bytes());
    assert!(text.contains(&real), "{text}");
    std::fs::write(&ckpt, text.replace(&real, &hex(derived.as_bytes()))).unwrap();
    match kvhygiene::forensic::verify_all(&dir, &opts) {
        Ok(r) => assert!(!r.ok(), "the altered checkpoint went unreported: {r:?}"),
        Err(e) => panic!("an altered checkpoint is reported as a usage error: {e}"),
    }
}

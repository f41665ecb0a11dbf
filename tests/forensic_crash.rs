//! Crash safety: a writer killed with SIGKILL at full speed leaves a log that verifies up to
//! its last complete record, and the next process continues the chain with a `recovery`
//! record that states how many torn bytes were cut.

mod forensic_common;
#[path = "skip/mod.rs"]
mod skip;

use std::fs::OpenOptions;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use forensic_common::*;
use kvhygiene::events::EventSink;
use kvhygiene::forensic::ForensicLog;

const CHILD_ENV: &str = "KVH_FORENSIC_CRASH_CHILD_DIR";

/// In the child (re-executed test binary), logs as fast as it can until it is killed. In a
/// normal test run it returns at once.
#[test]
fn crash_child_entry() {
    let Some(dir) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let c = cfg(std::path::Path::new(&dir), 256 * 1024);
    let log = ForensicLog::open_with_secret(&c, start(), Some(secret())).unwrap();
    let mut i = 0;
    loop {
        log.emit(event(i));
        i += 1;
    }
}

fn dir_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok()?.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

#[test]
fn sigkill_mid_write_then_recovery_continues_the_chain() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = log_dir(&tmp);
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "crash_child_entry",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, &dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(4);
    while dir_bytes(&dir) < 600 * 1024 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(dir_bytes(&dir) > 0, "the child wrote nothing");

    let files = chain_files(&dir);
    let last = files.last().unwrap().clone();
    let mut r = verify(&dir, &keyed_opts());
    assert!(r.ok(), "{r:?}");
    assert!(!r.chains[0].closed);
    if r.chains[0].torn_bytes == 0 {
        // The kill landed between two writes: tear the tail by hand, as a kill mid-write does.
        let mut f = OpenOptions::new().append(true).open(&last).unwrap();
        f.write_all(b"{\"chain\":\"p1-t1\",\"epoch\":0,\"ki")
            .unwrap();
        r = verify(&dir, &keyed_opts());
        assert!(r.ok(), "{r:?}");
    }
    let torn = r.chains[0].torn_bytes;
    let records_before = r.chains[0].records;
    assert!(torn > 0);

    // The next process adopts the dead writer's chain.
    let log =
        ForensicLog::open_with_secret(&cfg(&dir, 256 * 1024), start(), Some(secret())).unwrap();
    log.emit(event(0));
    log.stop();
    let r = verify(&dir, &keyed_opts());
    assert!(r.ok(), "{r:?}");
    assert_eq!(
        r.chains.len(),
        1,
        "recovery must continue the chain, not start another"
    );
    let c = &r.chains[0];
    assert!(c.closed);
    assert_eq!(c.torn_bytes, 0);
    // recovery, the event, stop; plus a rotate record when the kill came right after the
    // newest file was created.
    let added = c.records - records_before;
    assert!(added == 3 || added == 4, "{added} records added");
    // In the torn file, or in the next one when recovery's record came after a rotation
    // (the torn file was full).
    let text: String = chain_files(&dir)
        .iter()
        .skip_while(|f| **f != last)
        .map(|f| std::fs::read_to_string(f).unwrap())
        .collect();
    let rec = text
        .lines()
        .find(|l| l.contains("\"kind\":\"recovery\""))
        .expect("recovery record");
    assert!(rec.contains(&format!("\"torn_bytes\":{torn},")), "{rec}");
    assert!(rec.contains("\"last_good_hash\":\""));
    // The continuing process's own sampling rule, as in a `start` record.
    let rule = kvhygiene::backend::verify::SAMPLE_RULE;
    assert!(rec.contains(&format!("\"sample_rule\":{rule},")), "{rec}");
}

#[test]
fn a_live_writers_chain_is_never_adopted() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = log_dir(&tmp);
    let c = cfg(&dir, 1 << 20);
    let a = ForensicLog::open_with_secret(&c, start(), None).unwrap();
    let b = ForensicLog::open_with_secret(&c, start(), None).unwrap();
    assert_ne!(a.stats().chain, b.stats().chain);
    a.stop();
    // A closed chain is not adopted either.
    let d = ForensicLog::open_with_secret(&c, start(), None).unwrap();
    assert_ne!(a.stats().chain, d.stats().chain);
    b.stop();
    d.stop();
    assert!(verify(&dir, &Default::default()).ok());
}

/// A signed, keyed log of several files; returns its config.
fn signed_cfg(tmp: &tempfile::TempDir) -> kvhygiene::config::LogConfig {
    let (key, _) = kvhygiene::forensic::cli::keygen(&tmp.path().join("signer")).unwrap();
    let mut c = cfg(&log_dir(tmp), 16 * 1024);
    c.signing_key_file = Some(key);
    c.checkpoint_dir = Some(tmp.path().join("ckpt"));
    c
}

#[test]
fn a_junk_line_makes_recovery_leave_the_chain_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = log_dir(&tmp);
    let c = cfg(&dir, 16 * 1024);
    write_log(&c, 300, true);
    let files = chain_files(&dir);
    assert!(files.len() >= 2);
    let last = files.last().unwrap().clone();
    let mut f = OpenOptions::new().append(true).open(&last).unwrap();
    f.write_all(b"x\n").unwrap();
    let before = std::fs::read(&last).unwrap();

    let log = ForensicLog::open_with_secret(&c, start(), Some(secret())).unwrap();
    log.stop();
    assert_eq!(
        std::fs::read(&last).unwrap(),
        before,
        "recovery cut real records"
    );
    let r = verify(&dir, &keyed_opts());
    assert_eq!(r.chains.len(), 2, "a new chain must have been started");
    assert!(!r.ok());
    let p = r.first_problem().unwrap();
    assert_eq!(p.file, name(&last));
}

#[test]
fn a_chain_behind_its_checkpoint_is_not_adopted_and_the_checkpoint_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = log_dir(&tmp);
    let c = signed_cfg(&tmp);
    write_log(&c, 300, true);
    let ck = kvhygiene::forensic::checkpoint::path_for(&tmp.path().join("ckpt"), "x");
    let ck_dir = ck.parent().unwrap().to_path_buf();
    let ckpt_before: Vec<_> = std::fs::read_dir(&ck_dir)
        .unwrap()
        .map(|e| std::fs::read(e.unwrap().path()).unwrap())
        .collect();
    // Drop the last records (the `stop` included): it now looks like a crashed chain, but
    // its checkpoint covers records that are gone.
    let last = chain_files(&dir).last().unwrap().clone();
    let mut lines = read_lines(&last);
    lines.truncate(lines.len() - 2);
    write_lines(&last, &lines);
    let before = std::fs::read(&last).unwrap();

    let log = ForensicLog::open_with_secret(&c, start(), Some(secret())).unwrap();
    log.stop();
    assert_eq!(std::fs::read(&last).unwrap(), before);
    let ckpt_after: Vec<_> = std::fs::read_dir(&ck_dir)
        .unwrap()
        .map(|e| std::fs::read(e.unwrap().path()).unwrap())
        .collect();
    assert_eq!(ckpt_after.len(), 2, "a new chain with its own checkpoint");
    assert!(ckpt_before.iter().all(|b| ckpt_after.contains(b)));
}

#[test]
fn a_forked_child_never_blocks_on_the_parents_queue() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = log_dir(&tmp);
    let c = cfg(&dir, 1 << 20); // a queue of 1024 records
    let log = ForensicLog::open_with_secret(&c, start(), None).unwrap();
    // Built before the fork so that the child only queues them.
    let events: Vec<_> = (0..3000).map(event).collect();
    // SAFETY: the child only calls the log (atomics, try_send, no locks held across the
    // fork by this thread) and leaves with `_exit`, never returning into the test harness.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        for e in events {
            log.emit(e);
        }
        log.flush();
        log.stop();
        let code = i32::from(log.stats().records_lost < 3000);
        // SAFETY: ends the child without running the parent's atexit handlers or destructors.
        unsafe { libc::_exit(code) };
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut status = 0;
    let done = loop {
        // SAFETY: `pid` is our child; `status` is a valid out-pointer.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid {
            break true;
        }
        if Instant::now() > deadline {
            // SAFETY: kills only the child this test forked.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            // SAFETY: as above.
            unsafe { libc::waitpid(pid, &mut status, 0) };
            break false;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(done, "the forked child hung in the log");
    assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
    log.emit(event(1));
    log.stop();
    let r = verify(&dir, &Default::default());
    assert!(r.ok(), "{r:?}");
    assert_eq!(r.chains[0].records, 3, "start, the parent's event, stop");
}

/// A process that dies before its first periodic checkpoint (here: none are configured)
/// leaves a chain that verifies against a pinned public key: the chain's first checkpoint is
/// signed when it opens.
#[test]
fn a_chain_that_ends_before_any_periodic_checkpoint_still_verifies_with_a_pinned_key() {
    let tmp = tempfile::tempdir().unwrap();
    let (key, public) = kvhygiene::forensic::cli::keygen(&tmp.path().join("signer")).unwrap();
    let mut c = cfg(&log_dir(&tmp), 1 << 20);
    c.signing_key_file = Some(key);
    c.checkpoint_dir = Some(tmp.path().join("ckpt"));
    assert_eq!(
        (c.checkpoint_every_records, c.checkpoint_interval_ms),
        (0, 0)
    );
    let log = ForensicLog::open_with_secret(&c, start(), Some(secret())).unwrap();
    for i in 0..3 {
        log.emit(event(i));
    }
    log.flush();
    // The process dies here: no stop record, no final checkpoint.
    std::mem::forget(log);
    let opts = kvhygiene::forensic::VerifyOptions {
        public_keys: vec![kvhygiene::forensic::keys::read_public_key(&public).unwrap()],
        checkpoints: vec![tmp.path().join("ckpt")],
        ..keyed_opts()
    };
    let r = verify(&log_dir(&tmp), &opts);
    assert!(r.ok(), "{r:?}");
    assert_eq!(r.chains[0].checkpoint_seq, Some(0));
}

/// Producers that emit security events while another thread stops the log: every event
/// whose `emit` returned is either in the chain or counted in `records_lost` (invariant 5:
/// security events are never dropped silently). A small queue keeps producers waiting for
/// room when the `stop` message is taken.
#[test]
fn events_racing_with_stop_are_written_or_counted_lost() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    for round in 0..30 {
        let tmp = tempfile::tempdir().unwrap();
        let dir = log_dir(&tmp);
        let mut c = cfg(&dir, 64 << 20);
        c.queue_capacity = 1;
        let log = ForensicLog::open_with_secret(&c, start(), None).unwrap();
        let emitted = Arc::new(AtomicU64::new(0));
        let done = Arc::new(AtomicBool::new(false));
        let producers: Vec<_> = (0..6)
            .map(|t| {
                let (log, emitted, done) = (log.clone(), emitted.clone(), done.clone());
                std::thread::spawn(move || {
                    let mut i = 0u64;
                    while !done.load(Ordering::Acquire) {
                        log.emit(event(t * 1_000_000 + i));
                        emitted.fetch_add(1, Ordering::AcqRel);
                        i += 1;
                    }
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(20));
        log.stop();
        done.store(true, Ordering::Release);
        for p in producers {
            p.join().unwrap();
        }
        let emitted = emitted.load(Ordering::Acquire);
        let lost = log.stats().records_lost;
        let written: u64 = chain_files(&dir)
            .iter()
            .flat_map(|f| read_lines(f))
            .filter(|l| l.contains("\"kind\":\"quarantine\""))
            .count() as u64;
        assert_eq!(
            written + lost,
            emitted,
            "round {round}: {emitted} events emitted, {written} written, {lost} counted lost"
        );
    }
}

/// A process killed after it created its chain's first file and before its `start` record
/// reached the file (or in the middle of writing it) leaves file 0 of a chain with no
/// complete record. The next process starts (it cannot continue such a chain), and the log
/// still verifies against the pinned checkpoint key: a crash at start-up is not tampering.
#[test]
fn a_crash_before_the_start_record_is_complete_does_not_read_as_tampering() {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let c = signed_cfg(&tmp);
    let dir = log_dir(&tmp);
    // An earlier, cleanly stopped run: the directory exists with its modes.
    write_log(&c, 3, true);
    // What the killed process left: its file 0, created 0600, holding part of its first line.
    let torn = dir.join("kvh-p4242-t1700000000000000000-000000.jsonl");
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&torn)
        .unwrap();
    f.write_all(b"{\"chain\":\"p4242-t1700000000000000000\",\"config_dig")
        .unwrap();
    // Killed a minute ago (a file that recent may still be between its creation and its lock).
    f.set_modified(std::time::SystemTime::now() - Duration::from_secs(60))
        .unwrap();
    drop(f);
    let log = ForensicLog::open_with_secret(&c, start(), Some(secret())).unwrap();
    log.emit(event(1));
    log.stop();
    let public = tmp.path().join("signer.pub");
    let opts = kvhygiene::forensic::VerifyOptions {
        public_keys: vec![kvhygiene::forensic::keys::read_public_key(&public).unwrap()],
        checkpoints: vec![tmp.path().join("ckpt")],
        ..keyed_opts()
    };
    let r = verify(&dir, &opts);
    assert!(r.ok(), "{r:?}");
}

/// A chain file a writer left without a complete record (it died before its first): the log
/// verifies, and verify-log's line for that chain says that no MAC was there to check, not
/// "MACs verified".
#[test]
fn a_chain_without_a_complete_record_is_not_said_to_have_its_macs_verified() {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let dir = log_dir(&tmp);
    write_log(&cfg(&dir, 1 << 20), 3, true);
    let empty = dir.join("kvh-p4243-t1700000000000000000-000000.jsonl");
    let f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&empty)
        .unwrap();
    f.set_modified(std::time::SystemTime::now() - Duration::from_secs(60))
        .unwrap();
    drop(f);
    let out = Command::new(env!("CARGO_BIN_EXE_kvh"))
        .arg("verify-log")
        .arg(&dir)
        .arg("--key-file")
        .arg(secret_key_file(tmp.path()))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    let line = text
        .lines()
        .find(|l| l.contains("p4243"))
        .unwrap_or_default();
    assert!(
        line.contains("0 records") && line.contains("no record to check a MAC of"),
        "{text}"
    );
    assert!(text.contains("MACs verified"), "the other chain's: {text}");
}

/// A chain's first file with no complete record that was modified just now may belong to a
/// writer between creating it and locking it: it is left alone.
#[test]
fn a_first_file_just_created_is_not_removed() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = log_dir(&tmp);
    let c = cfg(&dir, 1 << 20);
    write_log(&c, 1, true);
    let fresh = unlocked_first_file(&dir, 4243, b"", Duration::ZERO);
    let log = ForensicLog::open_with_secret(&c, start(), None).unwrap();
    log.stop();
    assert!(
        fresh.exists(),
        "a file its creator may not have locked yet was removed"
    );
}

/// A live writer rotating creates its next file (`O_CREAT|O_EXCL`) and locks it a few
/// system calls later, holding the lock of its current file all along. A process starting
/// in between finds the new file empty and unlocked: it must not take the chain for a
/// crashed one (its writer still holds the previous file), or two processes write one chain.
#[test]
fn a_live_writer_between_creating_and_locking_its_next_file_is_not_adopted() {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let dir = log_dir(&tmp);
    let c = cfg(&dir, 1 << 20);
    let a = ForensicLog::open_with_secret(&c, start(), None).unwrap();
    a.emit(event(0));
    a.flush();
    let chain = a.stats().chain.unwrap();
    // A's next file as it is right after its creation, before A locks it.
    let next = dir.join(kvhygiene::forensic::files::file_name(&chain, 1));
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&next)
        .unwrap();
    let b = ForensicLog::open_with_secret(&c, start(), None).unwrap();
    let b_chain = b.stats().chain;
    b.stop();
    a.stop();
    assert_ne!(
        b_chain.as_deref(),
        Some(chain.as_str()),
        "a second process continued the chain of a live writer"
    );
}

/// A process killed while it wrote its `start` record leaves file 0 of a chain with no
/// complete record and, having signed nothing yet, no checkpoint. When the next process
/// starts at once (a supervisor restarting it), that file is too recent to be removed, and
/// it stays. Nothing of evidence is in it (no record for a checkpoint to cover), so the log
/// still verifies against the pinned checkpoint key: a crash at start-up is not tampering.
#[test]
fn a_crash_at_start_up_followed_by_an_immediate_restart_does_not_read_as_tampering() {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let c = signed_cfg(&tmp);
    let dir = log_dir(&tmp);
    // An earlier, cleanly stopped run: the directory exists with its modes.
    write_log(&c, 3, true);
    // What the killed process left: its file 0, holding part of its first line.
    let torn = dir.join("kvh-p4244-t1700000000000000000-000000.jsonl");
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&torn)
        .unwrap();
    f.write_all(b"{\"chain\":\"p4244-t1700000000000000000\",\"config_dig")
        .unwrap();
    drop(f);
    // Restarted at once; it runs and stops cleanly.
    let log = ForensicLog::open_with_secret(&c, start(), Some(secret())).unwrap();
    log.emit(event(1));
    log.stop();
    let public = tmp.path().join("signer.pub");
    let opts = kvhygiene::forensic::VerifyOptions {
        public_keys: vec![kvhygiene::forensic::keys::read_public_key(&public).unwrap()],
        checkpoints: vec![tmp.path().join("ckpt")],
        ..keyed_opts()
    };
    let r = verify(&dir, &opts);
    assert!(
        r.ok(),
        "a chain left without a single record by a crash at start-up fails: {:?}",
        r.first_problem()
    );
}

/// A stopped log of one file whose `stop` record is then removed: a chain whose writer
/// died, ready to be continued. Returns the chain file.
fn crashed_chain(c: &kvhygiene::config::LogConfig, keyed: bool) -> std::path::PathBuf {
    crashed_chain_of(c, keyed, 20)
}

/// [`crashed_chain`] of `events` events.
fn crashed_chain_of(
    c: &kvhygiene::config::LogConfig,
    keyed: bool,
    events: u64,
) -> std::path::PathBuf {
    write_log(c, events, keyed);
    let files = chain_files(c.dir.as_ref().unwrap());
    assert_eq!(files.len(), 1);
    let file = files[0].clone();
    let mut lines = read_lines(&file);
    assert!(lines.pop().unwrap().contains("\"kind\":\"stop\""));
    write_lines(&file, &lines);
    file
}

/// What a `recovery` record says of the chain it continues is held to the chain: a record
/// (sealed with the chain's key, as only its writer or a holder of the key could seal it)
/// that names another last record, another hash for it, or the digest of torn bytes where it
/// names none, fails verification, and the problem names the field.
#[test]
fn a_recovery_record_is_held_to_the_chain_it_continues() {
    type Forge = fn(&mut serde_json::Map<String, serde_json::Value>);
    let cases: [(Forge, &str); 3] = [
        (
            |m| {
                let seq = m["last_good_seq"].as_u64().unwrap();
                m.insert("last_good_seq".into(), (seq - 1).into());
            },
            "last_good_seq",
        ),
        (
            |m| {
                m.insert("last_good_hash".into(), "00".repeat(32).into());
            },
            "last_good_hash",
        ),
        (
            |m| {
                m.insert("torn_sha256".into(), "ab".repeat(32).into());
            },
            "torn_sha256",
        ),
    ];
    for (forge, named) in cases {
        let r = recovered_and_forged(forge);
        let problem = format!("{:?}", r.first_problem());
        assert!(!r.ok() && problem.contains(named), "{named}: {problem}");
    }
}

/// The verification of a keyed crashed chain (`crashed_chain`) continued by a new process,
/// once its `recovery` record was rewritten by `forge` and sealed again with the key.
fn recovered_and_forged(
    forge: impl Fn(&mut serde_json::Map<String, serde_json::Value>),
) -> kvhygiene::forensic::Report {
    let tmp = tempfile::tempdir().unwrap();
    let dir = log_dir(&tmp);
    let c = cfg(&dir, 1 << 20);
    let file = crashed_chain(&c, true);
    let log = ForensicLog::open_with_secret(&c, start(), Some(secret())).unwrap();
    log.stop();
    let r = verify(&dir, &keyed_opts());
    assert!(r.ok(), "{:?}", r.first_problem());
    let at = read_lines(&file)
        .iter()
        .position(|l| l.contains("\"kind\":\"recovery\""))
        .expect("recovery record");
    let key = kvhygiene::forensic::keys::EpochKey::from_secret(secret()).unwrap();
    forge_from(std::slice::from_ref(&file), 0, at + 1, Some(key), forge);
    verify(&dir, &keyed_opts())
}

/// A `torn_sha256` that is there but is not a string of 64 hex digits (here `null`, or a
/// number) is not the SHA-256 the record must carry where it names one: verification fails.
#[test]
fn a_recovery_record_whose_torn_sha256_is_not_a_string_fails_verification() {
    let forged: [serde_json::Value; 2] = [serde_json::Value::Null, 0.into()];
    for value in forged {
        let v = value.clone();
        let r = recovered_and_forged(move |m| {
            m.insert("torn_sha256".into(), v.clone());
        });
        assert!(
            !r.ok(),
            "a recovery record with torn_sha256 {value} verifies: {:?}",
            r.chains
        );
    }
}

/// A crash right after a new file was created (the file empty), continued by a process whose
/// start fields (a long `version`, which `StartInfo` takes from its caller) make its
/// `recovery` record too large to follow the `rotate` link in a file of at most `max_bytes`.
/// The log is the writer's own and verifies.
#[test]
fn a_recovery_record_too_large_for_the_file_it_links_verifies() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = log_dir(&tmp);
    let file = crashed_chain(&cfg(&dir, 1 << 20), true);
    let name = name(&file);
    let next = file.with_file_name(name.replace("-000000.jsonl", "-000001.jsonl"));
    std::os::unix::fs::OpenOptionsExt::mode(OpenOptions::new().write(true).create_new(true), 0o600)
        .open(&next)
        .unwrap();
    let mut info = start();
    info.version = "9".repeat(4000);
    let c = cfg(&dir, 4096);
    let log = ForensicLog::open_with_secret(&c, info, Some(secret())).unwrap();
    log.stop();
    let files = chain_files(&dir);
    assert!(files.len() >= 2, "{files:?}");
    assert_eq!(recovery_records(&files).len(), 1, "the chain was continued");
    let r = verify(&dir, &keyed_opts());
    assert!(r.ok(), "{:?}", r.first_problem());
}

/// A process with another HMAC secret does not continue a chain sealed with the first: it
/// starts its own, and each chain verifies with its secret.
#[test]
fn a_crashed_chain_is_not_continued_under_another_secret() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = log_dir(&tmp);
    let c = cfg(&dir, 1 << 20);
    let file = crashed_chain(&c, true);
    let before = std::fs::read(&file).unwrap();
    let other = zeroize::Zeroizing::new(b"another-secret-0123456789abcdef".to_vec());
    let log = ForensicLog::open_with_secret(&c, start(), Some(other.clone())).unwrap();
    log.stop();
    assert_eq!(
        std::fs::read(&file).unwrap(),
        before,
        "the chain was continued"
    );
    let opts = kvhygiene::forensic::VerifyOptions {
        hmac_keys: vec![
            kvhygiene::forensic::SealKey::new("first", secret()),
            kvhygiene::forensic::SealKey::new("other", other),
        ],
        ..Default::default()
    };
    let r = verify(&dir, &opts);
    assert_eq!(r.chains.len(), 2, "{r:?}");
    assert!(r.ok(), "{:?}", r.first_problem());
}

/// A last record whose body no longer hashes to its `hash` (its MAC still matches that
/// hash) is not continued: the chain is left as evidence and a new one started.
#[test]
fn a_crashed_chain_whose_last_record_does_not_hash_is_left_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = log_dir(&tmp);
    let c = cfg(&dir, 1 << 20);
    let file = crashed_chain(&c, true);
    let mut lines = read_lines(&file);
    let last = lines.pop().unwrap();
    let changed = last.replacen("\"capacity\":4096", "\"capacity\":4097", 1);
    assert_ne!(changed, last);
    lines.push(changed);
    write_lines(&file, &lines);
    let before = std::fs::read(&file).unwrap();
    let log = ForensicLog::open_with_secret(&c, start(), Some(secret())).unwrap();
    log.stop();
    assert_eq!(
        std::fs::read(&file).unwrap(),
        before,
        "the chain was continued"
    );
    let r = verify(&dir, &keyed_opts());
    assert_eq!(r.chains.len(), 2, "a new chain must have been started");
    assert_eq!(r.first_problem().map(|p| p.file.clone()), Some(name(&file)));
}

/// A crashed chain whose checkpoint names its last record with another hash (the record was
/// rewritten after it was signed) is not continued, and its checkpoint is kept.
#[test]
fn a_crashed_chain_whose_last_record_differs_from_its_checkpoint_is_not_adopted() {
    use kvhygiene::forensic::checkpoint::{self, Checkpoint};
    let tmp = tempfile::tempdir().unwrap();
    let c = signed_cfg(&tmp);
    let mut c = c;
    c.max_bytes = 1 << 20;
    let file = crashed_chain(&c, true);
    let ck_dir = tmp.path().join("ckpt");
    let ck = std::fs::read_dir(&ck_dir)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let old = checkpoint::peek(&ck).unwrap().unwrap();
    let last: serde_json::Value = serde_json::from_str(read_lines(&file).last().unwrap()).unwrap();
    std::fs::remove_file(&ck).unwrap();
    let signer =
        kvhygiene::forensic::keys::read_signing_key(c.signing_key_file.as_ref().unwrap()).unwrap();
    let forged = Checkpoint {
        seq: last["seq"].as_u64().unwrap(),
        hash: [7u8; 32],
        ..old
    };
    checkpoint::write(&ck_dir, &signer, &forged).unwrap();
    let ck_before = std::fs::read(&ck).unwrap();
    let before = std::fs::read(&file).unwrap();
    let log = ForensicLog::open_with_secret(&c, start(), Some(secret())).unwrap();
    log.stop();
    assert_eq!(
        std::fs::read(&file).unwrap(),
        before,
        "the chain was continued"
    );
    assert_eq!(
        std::fs::read(&ck).unwrap(),
        ck_before,
        "its checkpoint was replaced"
    );
}

/// A checkpoint that covers a record left without its newline (the crash cut only the end
/// of the line) makes recovery leave the chain alone: cutting the torn bytes would delete a
/// record the checkpoint signed.
#[test]
fn a_checkpointed_record_without_its_newline_is_never_cut() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = signed_cfg(&tmp);
    c.max_bytes = 1 << 20;
    write_log(&c, 20, true);
    let file = chain_files(&log_dir(&tmp)).remove(0);
    let mut bytes = std::fs::read(&file).unwrap();
    // The checkpoint written at stop covers the stop record; only its newline is lost.
    assert_eq!(bytes.pop(), Some(b'\n'));
    std::fs::write(&file, &bytes).unwrap();
    let log = ForensicLog::open_with_secret(&c, start(), Some(secret())).unwrap();
    log.stop();
    assert_eq!(
        std::fs::read(&file).unwrap(),
        bytes,
        "a checkpointed record was cut"
    );
    assert_eq!(chain_files(&log_dir(&tmp)).len(), 2, "a new chain started");
}

/// A file attribute (`chattr +FLAG`) set on a file for a test, taken off again when dropped,
/// so that the temporary directory can be removed.
struct Attribute {
    path: std::path::PathBuf,
    flag: &'static str,
}

impl Attribute {
    /// Sets attribute `flag` (`a`: append-only, `i`: immutable) on `path`; `None`, the test
    /// then skipped, where `chattr` cannot (not root, or a file system without attributes).
    fn set(path: &std::path::Path, flag: &'static str) -> Option<Attribute> {
        let set = Command::new("chattr")
            .arg(format!("+{flag}"))
            .arg(path)
            .status()
            .is_ok_and(|s| s.success());
        if !set {
            skip::skipped(&format!("chattr +{flag} is not available here"));
            return None;
        }
        Some(Attribute {
            path: path.to_path_buf(),
            flag,
        })
    }
}

impl Drop for Attribute {
    fn drop(&mut self) {
        let _ = Command::new("chattr")
            .arg(format!("-{}", self.flag))
            .arg(&self.path)
            .status();
    }
}

/// A signed, keyed chain whose writer died in the middle of a record, its checkpoint at the
/// last whole record, its file append-only (`chattr +a`): the next process cannot cut the
/// torn bytes, leaves the chain as it ended and starts its own. Both chains verify with the
/// pinned public key, and `kvh evidence` and `kvh tail-log` read the log.
#[test]
fn an_append_only_chain_with_a_torn_tail_left_by_recovery_verifies_signed() {
    use kvhygiene::forensic::checkpoint::{self, Checkpoint};
    let tmp = tempfile::tempdir().unwrap();
    let mut c = signed_cfg(&tmp);
    c.max_bytes = 1 << 20;
    let dir = log_dir(&tmp);
    let file = crashed_chain(&c, true);
    let ck_dir = tmp.path().join("ckpt");
    let ck = std::fs::read_dir(&ck_dir)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let old = checkpoint::peek(&ck).unwrap().unwrap();
    let last: serde_json::Value = serde_json::from_str(read_lines(&file).last().unwrap()).unwrap();
    let h = last["hash"].as_str().unwrap();
    let hash: Vec<u8> = (0..h.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&h[i..i + 2], 16).unwrap())
        .collect();
    let signer =
        kvhygiene::forensic::keys::read_signing_key(c.signing_key_file.as_ref().unwrap()).unwrap();
    std::fs::remove_file(&ck).unwrap();
    let at_last = Checkpoint {
        seq: last["seq"].as_u64().unwrap(),
        hash: hash.try_into().unwrap(),
        ..old
    };
    checkpoint::write(&ck_dir, &signer, &at_last).unwrap();
    let mut f = OpenOptions::new().append(true).open(&file).unwrap();
    f.write_all(b"{\"v\":1,\"seq\":19").unwrap();
    drop(f);
    let Some(_unmark) = Attribute::set(&file, "a") else {
        return;
    };
    let log = ForensicLog::open_with_secret(&c, start(), Some(secret())).unwrap();
    log.emit(event(99));
    log.stop();
    assert_eq!(chain_files(&dir).len(), 2, "a new chain started");
    let public = tmp.path().join("signer.pub");
    let opts = kvhygiene::forensic::VerifyOptions {
        public_keys: vec![kvhygiene::forensic::keys::read_public_key(&public).unwrap()],
        checkpoints: vec![ck_dir.clone()],
        ..keyed_opts()
    };
    let r = verify(&dir, &opts);
    assert!(r.ok(), "{:?}", r.first_problem());
    let key = tmp.path().join("hmac.key");
    std::fs::write(&key, SECRET).unwrap();
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    for verb in [
        &["verify-log"][..],
        &["evidence"][..],
        &["tail-log", "--once", "--from-start"][..],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_kvh"))
            .args(verb)
            .arg(&dir)
            .arg("--key-file")
            .arg(&key)
            .arg("--public-key")
            .arg(&public)
            .arg("--checkpoint")
            .arg(&ck_dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{verb:?} exited {:?}: {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// A crashed chain whose newest file ends with torn bytes and is immutable (`chattr +i`):
/// the torn bytes cannot be cut, so, as docs/forensic-log.md says of an append-only or
/// immutable file, the chain is left as it ended and the next process starts a chain of its
/// own (its start-up does not fail).
#[test]
fn an_immutable_chain_file_with_a_torn_tail_is_left_and_a_new_chain_started() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = log_dir(&tmp);
    let c = cfg(&dir, 1 << 20);
    let file = crashed_chain(&c, true);
    let mut f = OpenOptions::new().append(true).open(&file).unwrap();
    f.write_all(b"{\"v\":1,\"seq\":19").unwrap();
    drop(f);
    let Some(_unmark) = Attribute::set(&file, "i") else {
        return;
    };
    let before = std::fs::read(&file).unwrap();
    let log = ForensicLog::open_with_secret(&c, start(), Some(secret()))
        .expect("the start-up failed on an immutable crashed chain file");
    log.stop();
    assert_eq!(std::fs::read(&file).unwrap(), before);
    assert_eq!(chain_files(&dir).len(), 2, "a new chain started");
    let r = verify(&dir, &keyed_opts());
    assert!(r.ok(), "{:?}", r.first_problem());
}

/// A crashed chain whose newest file has a wrong mode (0644, readable by others) and is
/// immutable: as docs/forensic-log.md says, a file with a wrong owner or mode makes `open`
/// fail; being immutable as well does not make it acceptable, and `kvh preflight` fails the
/// log directory the same way.
#[test]
fn an_immutable_chain_file_with_a_wrong_mode_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let dir = log_dir(&tmp);
    let c = cfg(&dir, 1 << 20);
    let file = crashed_chain(&c, true);
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let Some(_unmark) = Attribute::set(&file, "i") else {
        return;
    };
    let found = kvhygiene::forensic::recovery::check_chain_files(&dir);
    let started = ForensicLog::open_with_secret(&c, start(), Some(secret()));
    let started = started.map(|log| log.stop());
    assert!(
        found.is_err(),
        "the preflight check accepted a chain file of mode 0644: {found:?}"
    );
    let err = started.expect_err("the start-up accepted a chain file of mode 0644");
    assert!(err.to_string().contains("mode"), "{err}");
}

/// Makes a crashed chain in `dir`, appends `extra` lines to its file, starts a process in
/// `dir` and checks that it left the chain as it was and started a chain of its own (`what`
/// names the appended lines in the failure message).
fn assert_crashed_chain_left_alone(
    dir: &std::path::Path,
    extra: impl FnOnce(&[String]) -> Vec<String>,
    what: &str,
) {
    let c = cfg(dir, 1 << 20);
    let file = crashed_chain(&c, true);
    let mut lines = read_lines(&file);
    let appended = extra(&lines);
    lines.extend(appended);
    write_lines(&file, &lines);
    let before = std::fs::read(&file).unwrap();

    let log = ForensicLog::open_with_secret(&c, start(), Some(secret())).unwrap();
    log.emit(event(100));
    log.stop();
    let after = std::fs::read(&file).unwrap();
    assert!(
        after == before,
        "the chain ending with {what} was continued: {} bytes appended after it",
        after.len() - before.len()
    );
    let r = verify(dir, &keyed_opts());
    assert_eq!(r.chains.len(), 2, "a new chain must have been started");
}

/// A crashed chain whose last line is a whole, sealed record of another chain (appended to
/// the file: its `chain` is not the file's, and its `prev` is not the hash of the line
/// before it) is not continued: like a junk line, it is evidence for `verify-log`. The new
/// process starts a chain of its own, so that its records verify; continuing the spliced
/// chain would put every record of the new run after a line that fails verification.
#[test]
fn a_crashed_chain_ending_with_a_record_of_another_chain_is_left_alone() {
    let tmp = tempfile::tempdir().unwrap();
    // Another chain sealed with the same secret, in another directory.
    let other_dir = tmp.path().join("other");
    write_log(&cfg(&other_dir, 1 << 20), 5, true);
    let other_lines = read_lines(&chain_files(&other_dir)[0]);
    let foreign = other_lines
        .iter()
        .rev()
        .find(|l| l.contains("\"kind\":\"quarantine\""))
        .unwrap()
        .clone();
    assert_crashed_chain_left_alone(&log_dir(&tmp), |_| vec![foreign], "a spliced record");
}

/// A crashed chain whose last line repeats one of its earlier records (sealed, of this
/// chain and epoch, but its `seq` and `prev` do not follow the line before it) is not
/// continued either: the last record does not link to the chain, and the new process's
/// records, continued from it, would reuse seqs already in the file.
#[test]
fn a_crashed_chain_ending_with_a_repeated_record_is_left_alone() {
    let tmp = tempfile::tempdir().unwrap();
    assert_crashed_chain_left_alone(&log_dir(&tmp), |l| vec![l[3].clone()], "a repeated record");
}

/// A crashed chain whose last two lines repeat two consecutive records of its own (sealed,
/// of this chain and epoch, the last one following the line before it) is not continued:
/// the repeated pair does not follow the chain (its seqs are already in the file), and a run
/// continued after it would put every new record after a line that fails verification.
#[test]
fn a_crashed_chain_ending_with_two_repeated_records_is_left_alone() {
    let tmp = tempfile::tempdir().unwrap();
    assert_crashed_chain_left_alone(&log_dir(&tmp), |l| l[3..5].to_vec(), "two repeated records");
}

/// A record torn by a crash, as a kill part way through a write leaves it.
const TORN: &[u8] = b"{\"chain\":\"p1-t1\",\"epoch\":0,\"kind\":\"quarantine\",\"model_id\":\"ll";

/// A crashed keyed chain (`crashed_chain`) whose file ends with `torn`; returns the file and
/// its length up to its last whole record.
fn crashed_chain_torn(c: &kvhygiene::config::LogConfig, torn: &[u8]) -> (std::path::PathBuf, u64) {
    let file = crashed_chain(c, true);
    let whole = std::fs::metadata(&file).unwrap().len();
    OpenOptions::new()
        .append(true)
        .open(&file)
        .unwrap()
        .write_all(torn)
        .unwrap();
    (file, whole)
}

/// The `recovery` records in `files`.
fn recovery_records(files: &[std::path::PathBuf]) -> Vec<String> {
    files
        .iter()
        .flat_map(|f| read_lines(f))
        .filter(|l| l.contains("\"kind\":\"recovery\""))
        .collect()
}

/// Asserts that a `recovery` record in `files` reports `torn` bytes left by the crash.
fn assert_torn_bytes_recorded(files: &[std::path::PathBuf], torn: usize) {
    let recoveries = recovery_records(files);
    let reported = format!("\"torn_bytes\":{torn},");
    assert!(
        recoveries.iter().any(|l| l.contains(&reported)),
        "no recovery record reports the {torn} torn bytes the crash left: {recoveries:?}"
    );
}

/// A crashed chain's torn bytes are evidence of the record the crash interrupted. When the
/// next process cannot write its `recovery` record (no room on the disk) its start-up fails;
/// the process that later continues the chain must still say how many torn bytes the crash
/// left, in its `recovery` record's `torn_bytes`, rather than report a clean end.
#[test]
fn torn_bytes_cut_by_a_start_up_that_failed_on_a_full_disk_are_still_recorded() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = log_dir(&tmp);
    let c = cfg(&dir, 1 << 20);
    let (file, whole) = crashed_chain_torn(&c, TORN);
    // A start-up while the file cannot grow past its last whole record.
    let (failed, err) = start_up_without_room(&dir, whole, 1 << 20);
    assert!(failed, "the start-up without room did not fail: {err}");
    // Room again: the next process continues the chain.
    let log = ForensicLog::open_with_secret(&c, start(), Some(secret())).unwrap();
    log.stop();
    assert!(verify(&dir, &keyed_opts()).ok());
    assert_torn_bytes_recorded(&[file], TORN.len());
}

/// A torn tail longer than the records that continue the chain: the records take its place
/// and the file ends with them, nothing of the torn bytes left after them.
#[test]
fn a_torn_tail_longer_than_the_recovery_records_is_replaced_whole() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = log_dir(&tmp);
    let c = cfg(&dir, 1 << 20);
    let torn = [1u8; 5000];
    let (file, whole) = crashed_chain_torn(&c, &torn);
    let log = ForensicLog::open_with_secret(&c, start(), Some(secret())).unwrap();
    log.stop();
    let r = verify(&dir, &keyed_opts());
    assert!(r.ok(), "{:?}", r.first_problem());
    assert_eq!(r.chains.len(), 1, "the crashed chain was continued");
    assert_eq!(r.chains[0].torn_bytes, 0);
    let text = std::fs::read(&file).unwrap();
    assert!(!text.contains(&1u8), "torn bytes left in the file");
    let recoveries = recovery_records(&[file]);
    let recovery = recoveries.first().expect("recovery record");
    assert!(recovery.contains("\"torn_bytes\":5000,"), "{recovery}");
    // The bytes replaced are named by their digest.
    use sha2::Digest;
    let digest: String = sha2::Sha256::digest(torn)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert!(
        recovery.contains(&format!("\"torn_sha256\":\"{digest}\"")),
        "{recovery}"
    );
    // The recovery record starts where the last whole record ended.
    let at = text
        .windows(8)
        .position(|w| w == b"recovery")
        .map(|p| text[..p].iter().rposition(|&b| b == b'\n').unwrap() + 1)
        .unwrap();
    assert_eq!(at as u64, whole);
}

const NO_ROOM_SMALL_FILES_CHILD_ENV: &str = "KVH_FORENSIC_CRASH_NO_ROOM_SMALL_FILES_DIR";

/// In the child (re-executed test binary): opens the log in `dir`, with files of at most
/// `max_bytes`, while no file may grow beyond `limit` bytes (`RLIMIT_FSIZE`, standing in for
/// a full disk), and exits 0 when the open fails, its error on stderr. In a normal test run
/// it returns at once.
#[test]
fn no_room_small_files_child_entry() {
    let Some(spec) = std::env::var_os(NO_ROOM_SMALL_FILES_CHILD_ENV) else {
        return;
    };
    let spec = spec.into_string().unwrap();
    let mut parts = spec.rsplitn(3, '|');
    let max_bytes: u64 = parts.next().unwrap().parse().unwrap();
    let limit: u64 = parts.next().unwrap().parse().unwrap();
    let dir = parts.next().unwrap();
    // SAFETY: plain libc calls with valid arguments, in a child process of its own.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
        let r = libc::rlimit {
            rlim_cur: limit,
            rlim_max: limit,
        };
        assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &r), 0);
    }
    let c = cfg(std::path::Path::new(dir), max_bytes);
    let opened = ForensicLog::open_with_secret(&c, start(), Some(secret()));
    if let Err(e) = &opened {
        eprintln!("start-up error: {e}");
    }
    // SAFETY: ends the child without running the log's drop (nothing to stop after a failure).
    unsafe { libc::_exit(if opened.is_err() { 0 } else { 3 }) };
}

/// A crashed chain whose torn file is full (its `recovery` record still goes over the torn
/// bytes, in that file): when the next process cannot write its first records (no room on
/// the disk) its start-up fails, and the process that later continues the chain still says
/// how many torn bytes the crash left, in its `recovery` record's `torn_bytes`.
#[test]
fn torn_bytes_of_a_full_file_are_still_recorded_after_a_start_up_that_failed_on_a_full_disk() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = log_dir(&tmp);
    let c = cfg(&dir, 1 << 20);
    let max_bytes = 4096;
    let (_, whole) = crashed_chain_torn(&c, TORN);
    assert!(whole > max_bytes, "the crashed file is not full");
    // A start-up, with files of 4 KiB, while no file can grow.
    let (failed, err) = start_up_without_room(&dir, 0, max_bytes);
    assert!(failed, "the start-up without room did not fail: {err}");
    // Room again: the next process continues the chain.
    let log =
        ForensicLog::open_with_secret(&cfg(&dir, max_bytes), start(), Some(secret())).unwrap();
    log.stop();
    let r = verify(&dir, &keyed_opts());
    assert!(r.ok(), "{:?}", r.first_problem());
    assert_eq!(r.chains.len(), 1, "the crashed chain was continued");
    assert_torn_bytes_recorded(&chain_files(&dir), TORN.len());
}

/// Runs `no_room_small_files_child_entry` on `dir`; returns whether the start-up failed and
/// what it said on stderr.
fn start_up_without_room(dir: &std::path::Path, limit: u64, max_bytes: u64) -> (bool, String) {
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "no_room_small_files_child_entry",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(
            NO_ROOM_SMALL_FILES_CHILD_ENV,
            format!("{}|{limit}|{max_bytes}", dir.display()),
        )
        .stdout(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A start-up that cannot write its first records over a crashed chain's torn tail, and
/// wrote none of their bytes (the file cannot grow at all past its last whole record),
/// leaves the file as it found it and says so: its error does not claim the torn bytes were
/// written over and could not be put back.
#[test]
fn a_start_up_that_wrote_nothing_over_the_torn_tail_does_not_report_it_damaged() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = log_dir(&tmp);
    let c = cfg(&dir, 1 << 20);
    let (file, whole) = crashed_chain_torn(&c, TORN);
    let before = std::fs::read(&file).unwrap();
    let (failed, err) = start_up_without_room(&dir, whole, 1 << 20);
    assert!(failed, "the start-up without room did not fail: {err}");
    assert_eq!(std::fs::read(&file).unwrap(), before, "the file changed");
    assert!(
        !err.contains("could not be put back"),
        "the start-up reports torn bytes it never wrote over as damaged: {err}"
    );
}

/// A crashed chain that ended at a record's end (nothing torn): a start-up that fails part way
/// through its first records (no room on the disk) leaves none of their bytes behind, so the
/// process that later continues the chain reports no torn bytes, as the crash left none.
#[test]
fn a_start_up_that_failed_part_way_on_a_full_disk_leaves_no_torn_bytes_to_a_clean_end() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = log_dir(&tmp);
    let c = cfg(&dir, 1 << 20);
    let file = small_crashed_chain(&c);
    let whole = std::fs::metadata(&file).unwrap().len();
    let (failed, err) = start_up_without_room(&dir, whole + 10, 1 << 20);
    assert!(failed, "the start-up without room did not fail: {err}");
    let log = ForensicLog::open_with_secret(&c, start(), Some(secret())).unwrap();
    log.stop();
    let r = verify(&dir, &keyed_opts());
    assert!(r.ok(), "{:?}", r.first_problem());
    let recoveries = recovery_records(&[file]);
    let recovery = recoveries.first().expect("recovery record");
    assert!(
        recovery.contains("\"torn_bytes\":0,"),
        "the crash left no torn bytes: {recovery}"
    );
}

/// A keyed crashed chain ([`crashed_chain`]) whose file, with 10 bytes more, is smaller than
/// the room a new file is given at a rotation: under a file size limit 10 bytes over the
/// file (standing in for a disk with that much room left), the next start-up can neither
/// write its `recovery` record there nor go on in a new file.
fn small_crashed_chain(c: &kvhygiene::config::LogConfig) -> std::path::PathBuf {
    // The writer's ROTATE_ROOM + FINAL_ROOM.
    const NEW_FILE_ROOM: u64 = 1024 + 4096;
    let file = crashed_chain_of(c, true, 4);
    let whole = std::fs::metadata(&file).unwrap().len();
    assert!(whole + 10 < NEW_FILE_ROOM, "{whole} bytes");
    file
}

/// A crashed chain that ended at a record's end, its file append-only (`chattr +a`, which
/// allows appending): a start-up that fails part way through its first records (no room on
/// the disk) leaves none of their bytes after the chain's end, so the next process still
/// continues the chain by appending, reporting no torn bytes, rather than finding bytes it
/// cannot write over and leaving the chain.
#[test]
fn a_failed_start_up_after_a_clean_end_of_an_append_only_file_leaves_it_continuable() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = log_dir(&tmp);
    let c = cfg(&dir, 1 << 20);
    let file = small_crashed_chain(&c);
    let before = std::fs::read(&file).unwrap();
    let Some(_unmark) = Attribute::set(&file, "a") else {
        return;
    };
    let (failed, err) = start_up_without_room(&dir, before.len() as u64 + 10, 1 << 20);
    assert!(failed, "the start-up without room did not fail: {err}");
    let after = std::fs::read(&file).unwrap();
    assert_eq!(
        after.len(),
        before.len(),
        "bytes of the failed start-up's records were left after the chain's end: {:?}",
        String::from_utf8_lossy(&after[before.len().min(after.len())..])
    );
    let log = ForensicLog::open_with_secret(&c, start(), Some(secret())).unwrap();
    log.stop();
    assert_eq!(
        chain_files(&dir).len(),
        1,
        "the crashed chain was not continued"
    );
}

/// A chain of 300 keyed records in one file (well over 64 KiB), its newlines stripped and its
/// modification time an hour back, as if abandoned; returns the file and its bytes.
fn stripped_first_file(c: &kvhygiene::config::LogConfig) -> (std::path::PathBuf, Vec<u8>) {
    write_log(c, 300, true);
    let file = chain_files(c.dir.as_ref().unwrap()).remove(0);
    let mut bytes = std::fs::read(&file).unwrap();
    assert!(bytes.len() > 64 * 1024, "{} bytes", bytes.len());
    for b in bytes.iter_mut().filter(|b| **b == b'\n') {
        *b = b' ';
    }
    std::fs::write(&file, &bytes).unwrap();
    let old = std::time::SystemTime::now() - Duration::from_secs(3600);
    OpenOptions::new()
        .write(true)
        .open(&file)
        .unwrap()
        .set_modified(old)
        .unwrap();
    (file, bytes)
}

/// A first file without a newline is removed at start-up only as what a writer that died in
/// its `start` record leaves: a few hundred bytes. A large one (here a whole chain's records
/// with their newlines stripped, and old enough to pass for abandoned) is evidence: it is
/// left in place for verification to report, not deleted.
#[test]
fn a_large_first_file_without_a_newline_is_not_removed_as_an_unstarted_chain() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = log_dir(&tmp);
    let c = cfg(&dir, 1 << 20);
    let (file, bytes) = stripped_first_file(&c);
    let log = ForensicLog::open_with_secret(&c, start(), Some(secret())).unwrap();
    log.stop();
    assert_eq!(
        std::fs::read(&file).ok().as_deref(),
        Some(&bytes[..]),
        "the stripped first file was removed or changed"
    );
}

/// A first file without a newline larger than a `start` record could be is not what a writer
/// that died in its `start` record leaves: start-up keeps it as evidence, and verification
/// against a pinned public key holds it to the rule for every other chain (it needs a
/// checkpoint), rather than passing it as a chain that never started.
#[test]
fn a_large_first_file_without_a_newline_and_without_a_checkpoint_fails_against_a_pinned_key() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = signed_cfg(&tmp);
    c.max_bytes = 1 << 20;
    let dir = log_dir(&tmp);
    let (file, bytes) = stripped_first_file(&c);
    let chain = name(&file)
        .strip_prefix("kvh-")
        .and_then(|n| n.strip_suffix("-000000.jsonl"))
        .unwrap()
        .to_string();
    std::fs::remove_file(tmp.path().join("ckpt").join(format!("kvh-{chain}.ckpt"))).unwrap();
    // A later start-up leaves it in place.
    let log = ForensicLog::open_with_secret(&c, start(), Some(secret())).unwrap();
    log.stop();
    assert!(file.exists(), "the large first file was removed");
    let public = tmp.path().join("signer.pub");
    let opts = kvhygiene::forensic::VerifyOptions {
        public_keys: vec![kvhygiene::forensic::keys::read_public_key(&public).unwrap()],
        checkpoints: vec![tmp.path().join("ckpt")],
        ..keyed_opts()
    };
    let r = verify(&dir, &opts);
    assert!(
        !r.ok(),
        "a {}-byte first file without a record or a checkpoint verified as a chain that never \
         started",
        bytes.len()
    );
}

const OPEN_AND_STOP_CHILD_ENV: &str = "KVH_FORENSIC_CRASH_OPEN_AND_STOP_DIR";

/// In the child (re-executed test binary): opens the log in the directory named by
/// [`OPEN_AND_STOP_CHILD_ENV`] and stops it; what the start-up said is on stderr. In a normal
/// test run it returns at once.
#[test]
fn open_and_stop_child_entry() {
    let Some(dir) = std::env::var_os(OPEN_AND_STOP_CHILD_ENV) else {
        return;
    };
    let c = cfg(std::path::Path::new(&dir), 1 << 20);
    let log = ForensicLog::open_with_secret(&c, start(), Some(secret())).unwrap();
    log.stop();
}

/// What a start-up on `dir` ([`open_and_stop_child_entry`]) said on stderr.
fn start_up_says(dir: &std::path::Path) -> String {
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "open_and_stop_child_entry",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(OPEN_AND_STOP_CHILD_ENV, dir)
        .stdout(Stdio::null())
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "the start-up failed: {said}");
    said
}

/// A chain whose newest file cannot be continued (immutable) is said to be left as it ended
/// only when a process could have meant to continue it: a crashed chain is named at start-up,
/// a chain that ended with its `stop` record, which no process continues anyway, is not.
#[test]
fn only_a_crashed_chain_left_unwritable_is_named_at_start_up() {
    const SAID: &str = "left as it ended";
    let tmp = tempfile::tempdir().unwrap();
    let dir = log_dir(&tmp);
    let c = cfg(&dir, 1 << 20);
    write_log(&c, 3, true);
    let stopped = chain_files(&dir)[0].clone();
    let Some(_unmark_stopped) = Attribute::set(&stopped, "i") else {
        return;
    };
    let said = start_up_says(&dir);
    assert!(
        !said.contains(SAID),
        "a chain that ended with `stop` was named: {said}"
    );

    let crashed = tempfile::tempdir().unwrap();
    let crashed_dir = log_dir(&crashed);
    let file = crashed_chain(&cfg(&crashed_dir, 1 << 20), true);
    let Some(_unmark_crashed) = Attribute::set(&file, "i") else {
        return;
    };
    let said = start_up_says(&crashed_dir);
    assert!(said.contains(SAID), "a crashed chain was not named: {said}");
}

/// A crash may end the newest file of a chain at any byte of what its writer wrote there.
/// Whatever that byte, the log verifies as the crash left it, and again after the next
/// process started (continuing the chain, or starting its own), logged and stopped.
#[test]
fn a_crash_at_any_byte_of_the_newest_file_verifies_before_and_after_the_restart() {
    for keyed in [false, true] {
        let tmp = tempfile::tempdir().unwrap();
        let dir = log_dir(&tmp);
        let c = cfg(&dir, 4096);
        write_log(&c, 12, keyed);
        let opts = if keyed {
            keyed_opts()
        } else {
            Default::default()
        };
        let files = chain_files(&dir);
        assert!(files.len() > 1, "the log did not rotate");
        let len = std::fs::metadata(files.last().unwrap()).unwrap().len();
        for cut in 0..=len {
            let run = tmp.path().join(format!("cut-{keyed}-{cut}"));
            copy_cut(&dir, &run, cut);
            let r = verify(&run, &opts);
            assert!(
                r.ok(),
                "keyed {keyed}, newest file cut at {cut} of {len}: {r:?}"
            );
            let log = ForensicLog::open_with_secret(&cfg(&run, 4096), start(), keyed.then(secret))
                .unwrap_or_else(|e| panic!("cut at {cut} of {len}: {e}"));
            log.emit(event(99));
            log.stop();
            let r = verify(&run, &opts);
            assert!(
                r.ok(),
                "keyed {keyed}, newest file cut at {cut} of {len}, after a restart: {r:?}"
            );
            std::fs::remove_dir_all(&run).unwrap();
        }
    }
}

const SIGNED_CRASH_ENV: &str = "KVH_FORENSIC_SIGNED_CRASH_CHILD";

/// In the child (re-executed test binary): a keyed log with signed checkpoints (in the log
/// directory) and `always` fsync, small files; writes events and ends without `stop`.
#[test]
fn signed_crash_child_entry() {
    let Some(arg) = std::env::var_os(SIGNED_CRASH_ENV) else {
        return;
    };
    let arg = arg.into_string().unwrap();
    let (dir, key) = arg.split_once('\n').unwrap();
    let c = signed_crash_cfg(std::path::Path::new(dir), std::path::Path::new(key));
    let log = ForensicLog::open_with_secret(&c, start(), Some(secret())).unwrap();
    for i in 0..14 {
        log.emit(event(i));
        log.flush();
    }
    // SAFETY: ends the child at once, as a crash does, without stopping the log.
    unsafe { libc::_exit(0) };
}

fn signed_crash_cfg(dir: &std::path::Path, key: &std::path::Path) -> kvhygiene::config::LogConfig {
    let mut c = cfg(dir, 4096);
    c.signing_key_file = Some(key.to_path_buf());
    c.checkpoint_every_records = 4;
    c.fsync = kvhygiene::config::FsyncPolicy::Always;
    c
}

/// A copy of the log directory `from` at `to` (0700, its files 0600: chain files and
/// checkpoints), with the newest chain file cut to `len` bytes, as a crash leaves it when its
/// writes reached the file only so far.
fn copy_cut(from: &std::path::Path, to: &std::path::Path, len: u64) {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    std::fs::DirBuilder::new().mode(0o700).create(to).unwrap();
    let newest = chain_files(from).last().cloned();
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        let mut bytes = std::fs::read(&p).unwrap();
        if Some(&p) == newest.as_ref() {
            bytes.truncate(len as usize);
        }
        let mut out = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(to.join(p.file_name().unwrap()))
            .unwrap();
        out.write_all(&bytes).unwrap();
    }
}

/// A writer with signed checkpoints and `always` fsync that crashes: what it fsynced (all
/// its checkpoints cover) survives, and the newest file may end at any byte after that.
/// Whatever the byte, the log verifies against the pinned key as the crash left it, and
/// again after the next process (same keys) continued the chain, logged and stopped.
#[test]
fn a_signed_chain_crashed_at_any_byte_after_its_checkpoint_verifies_after_the_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = log_dir(&tmp);
    let (key, public) = kvhygiene::forensic::cli::keygen(&tmp.path().join("signer")).unwrap();
    let status = Command::new(std::env::current_exe().unwrap())
        .args([
            "signed_crash_child_entry",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(
            SIGNED_CRASH_ENV,
            format!("{}\n{}", dir.display(), key.display()),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let opts = |d: &std::path::Path| kvhygiene::forensic::VerifyOptions {
        public_keys: vec![kvhygiene::forensic::keys::read_public_key(&public).unwrap()],
        checkpoints: vec![d.to_path_buf()],
        ..keyed_opts()
    };
    let r = verify(&dir, &opts(&dir));
    assert!(r.ok(), "{r:?}");
    let ckpt: serde_json::Value = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "ckpt"))
        .map(|p| serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap())
        .unwrap();
    let newest = chain_files(&dir).last().unwrap().clone();
    let text = std::fs::read(&newest).unwrap();
    // The first byte a crash may cut: after the checkpointed record when it is in this file.
    let mut from = 0u64;
    if ckpt["file"].as_str() == Some(name(&newest).as_str()) {
        let mut at = 0u64;
        for line in text.split_inclusive(|&b| b == b'\n') {
            at += line.len() as u64;
            let v: serde_json::Value = serde_json::from_slice(line).unwrap();
            if v["seq"] == ckpt["seq"] {
                from = at;
            }
        }
    }
    for cut in cuts_of(&text, from) {
        let run = tmp.path().join(format!("cut-{cut}"));
        copy_cut(&dir, &run, cut);
        let r = verify(&run, &opts(&run));
        assert!(r.ok(), "cut at {cut} ({from}..{}): {r:?}", text.len());
        let log =
            ForensicLog::open_with_secret(&signed_crash_cfg(&run, &key), start(), Some(secret()))
                .unwrap_or_else(|e| panic!("cut at {cut}: {e}"));
        log.emit(event(99));
        log.stop();
        let r = verify(&run, &opts(&run));
        assert!(
            r.ok(),
            "cut at {cut} ({from}..{}), after a restart: {r:?}",
            text.len()
        );
        assert_eq!(
            r.chains.len(),
            1,
            "cut at {cut}: the chain was not continued: {r:?}"
        );
        std::fs::remove_dir_all(&run).unwrap();
    }
}

/// Where a crash may cut `text` from byte `from` on: every byte within 3 of a record's end
/// (the line feed, and a record cut just before or after it), and every 11th byte between.
fn cuts_of(text: &[u8], from: u64) -> Vec<u64> {
    let len = text.len() as u64;
    let mut cuts: std::collections::BTreeSet<u64> = (from..=len).step_by(11).collect();
    cuts.insert(len);
    let ends = text
        .iter()
        .enumerate()
        .filter(|(_, &b)| b == b'\n')
        .map(|(i, _)| i as u64 + 1);
    for end in ends {
        cuts.extend((end.saturating_sub(3)..=end + 3).filter(|c| (from..=len).contains(c)));
    }
    cuts.into_iter().collect()
}

/// A record larger than a whole file (written in a file of its own) torn by a crash at any
/// point: the log verifies after the next process continued the chain and stopped.
#[test]
fn a_record_larger_than_a_file_torn_by_a_crash_verifies_after_the_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = log_dir(&tmp);
    let log = ForensicLog::open_with_secret(&cfg(&dir, 4096), start(), Some(secret())).unwrap();
    log.emit(event(1));
    log.record_anomaly(serde_json::json!({ "pad": "\u{1}é\"".repeat(5000) }));
    log.flush();
    // The writer still runs: the copies are what a crash at this point leaves.
    let newest = chain_files(&dir).last().unwrap().clone();
    let len = std::fs::metadata(&newest).unwrap().len();
    assert!(len > 4096, "{len}");
    let cuts: Vec<u64> = (0..=len).step_by(97).chain([len - 1, len]).collect();
    for cut in cuts {
        let run = tmp.path().join(format!("cut-{cut}"));
        copy_cut(&dir, &run, cut);
        let r = verify(&run, &keyed_opts());
        assert!(r.ok(), "cut at {cut} of {len}: {r:?}");
        let restarted = ForensicLog::open_with_secret(&cfg(&run, 4096), start(), Some(secret()))
            .unwrap_or_else(|e| panic!("cut at {cut} of {len}: {e}"));
        restarted.emit(event(99));
        restarted.stop();
        let r = verify(&run, &keyed_opts());
        assert!(r.ok(), "cut at {cut} of {len}, after a restart: {r:?}");
        assert_eq!(r.chains.len(), 1, "cut at {cut} of {len}: {r:?}");
        std::fs::remove_dir_all(&run).unwrap();
    }
    log.stop();
}

/// A writer that died in its `start` record left file 0 of its chain; the wall clock was then
/// stepped back an hour (NTP), so the file's modification time lies an hour after now. It has
/// been idle all that time: the next start removes it, as it does one an hour old.
#[test]
fn an_unstarted_first_file_dated_after_a_backward_clock_step_is_removed() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = log_dir(&tmp);
    let c = cfg(&dir, 1 << 20);
    write_log(&c, 1, true);
    let torn = unlocked_first_file(
        &dir,
        4244,
        b"{\"chain\":\"p4244-t1700000000000000000\",\"config_dig",
        Duration::from_secs(3600),
    );
    let log = ForensicLog::open_with_secret(&c, start(), Some(secret())).unwrap();
    log.stop();
    assert!(
        !torn.exists(),
        "the unstarted first file, dated after the clock step, was left in place"
    );
}

/// A writer has just created file 0 of its chain and not yet locked it (the few calls between
/// creating and locking). The log directory is on a file server whose clock runs 2 s ahead of
/// this host's (NFS), so the file's modification time lies 2 s after now. A process starting
/// in that moment finds the file unlocked and without a record; a time 2 s ahead is what a
/// file created a moment ago shows on that server, so the file is left to its creator.
#[test]
fn a_first_file_dated_a_little_after_now_is_left_to_its_creator() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = log_dir(&tmp);
    let c = cfg(&dir, 1 << 20);
    write_log(&c, 1, true);
    let fresh = unlocked_first_file(&dir, 4245, b"", Duration::from_secs(2));
    let log = ForensicLog::open_with_secret(&c, start(), Some(secret())).unwrap();
    log.stop();
    assert!(
        fresh.exists(),
        "the first file created a moment ago (dated 2 s ahead by the file server's clock), not \
         yet locked by its creator, was removed"
    );
}

/// File 0 of chain `p<pid>-t1700000000000000000` in `dir`, holding `bytes`, unlocked, dated
/// `ahead` after now (a file just made, or one a writer left before the clock stepped back).
fn unlocked_first_file(
    dir: &std::path::Path,
    pid: u32,
    bytes: &[u8],
    ahead: Duration,
) -> std::path::PathBuf {
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(format!("kvh-p{pid}-t1700000000000000000-000000.jsonl"));
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .unwrap();
    f.write_all(bytes).unwrap();
    if !ahead.is_zero() {
        f.set_modified(std::time::SystemTime::now() + ahead)
            .unwrap();
    }
    path
}

const FORKED_WORKER_ENV: &str = "KVH_FORENSIC_FORKED_WORKER_DIR";

/// In the child (re-executed test binary): opens the log, writes a record, forks a worker
/// that lives on without logging (a pre-fork server's worker, a DataLoader's), prints the
/// worker's pid, and dies without stopping the log, as a killed process does. In a normal
/// test run it returns at once.
#[test]
fn forked_worker_then_crash_entry() {
    let Some(dir) = std::env::var_os(FORKED_WORKER_ENV) else {
        return;
    };
    let c = cfg(std::path::Path::new(&dir), 1 << 20);
    let log = ForensicLog::open_with_secret(&c, start(), None).unwrap();
    log.emit(event(0));
    log.flush();
    // SAFETY: the worker only sleeps and `_exit`s (async-signal-safe calls).
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        // SAFETY: as above; the worker lets go of the output the test reads.
        unsafe {
            libc::close(1);
            libc::close(2);
            libc::sleep(60);
            libc::_exit(0);
        }
    }
    println!("worker {pid}");
    std::io::stdout().flush().unwrap();
    // SAFETY: ends the process at once, without the log's stop record: a crash.
    unsafe { libc::_exit(0) };
}

/// A process whose writer started forks a worker, then crashes; the worker lives on. The
/// worker has no writer and writes nothing to the chain (the log detects the changed pid),
/// so the chain's writer is dead: the next process to open the log continues the crashed
/// chain with a `recovery` record, as it does when no worker outlives the crash.
#[test]
fn a_worker_forked_by_a_crashed_writer_does_not_keep_its_chain_from_recovery() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = log_dir(&tmp);
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "forked_worker_then_crash_entry",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(FORKED_WORKER_ENV, &dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let worker: libc::pid_t = stdout
        .lines()
        .find_map(|l| l.split("worker ").nth(1))
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "the crashing process said no worker pid: {stdout}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    let c = cfg(&dir, 1 << 20);
    let next = ForensicLog::open_with_secret(&c, start(), None).unwrap();
    next.emit(event(1));
    next.stop();
    // SAFETY: the worker is the grandchild the helper forked; only it is signalled.
    unsafe { libc::kill(worker, libc::SIGKILL) };
    let r = verify(&dir, &Default::default());
    assert!(r.ok(), "{r:?}");
    assert_eq!(
        r.chains.len(),
        1,
        "the crashed chain was not continued while the forked worker lived (it keeps the \
         lock of the chain's file it inherited): the next process started a chain of its \
         own, and the crashed one stays open without a recovery record: {:?}",
        r.chains.iter().map(|c| &c.chain).collect::<Vec<_>>()
    );
}

/// A crashed chain whose file ends, after its last record, with more bytes than any record
/// (no crash tears that much: bytes appended by someone else) is not continued: its end is
/// not a torn record to write over, and recovery does not hold it. The file is left as it
/// was, for verification to count, and the new process starts a chain of its own.
#[test]
fn a_crashed_chain_ending_with_more_than_a_record_of_torn_bytes_is_left_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = log_dir(&tmp);
    let c = cfg(&dir, 1 << 20);
    let torn = vec![b'y'; kvhygiene::forensic::recovery::MAX_CONTINUED_BYTES + 1];
    let (file, _) = crashed_chain_torn(&c, &torn);
    let before = std::fs::read(&file).unwrap();
    let log = ForensicLog::open_with_secret(&c, start(), Some(secret())).unwrap();
    log.emit(event(100));
    log.stop();
    assert!(
        std::fs::read(&file).unwrap() == before,
        "the chain was continued"
    );
    let r = verify(&dir, &keyed_opts());
    assert_eq!(r.chains.len(), 2, "a new chain must have been started");
    assert!(r.ok(), "{:?}", r.first_problem());
}

/// A crashed chain whose last line is longer than any record is not continued either.
#[test]
fn a_crashed_chain_ending_with_a_line_longer_than_any_record_is_left_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let long = "x".repeat(kvhygiene::forensic::recovery::MAX_CONTINUED_BYTES + 1);
    assert_crashed_chain_left_alone(&log_dir(&tmp), |_| vec![long], "an overlong line");
}

/// A keyed log (`c`, in `dir`) whose writer died after creating its next file and before
/// writing the `rotate` record into it: the chain's last record is at the end of the file
/// before (returned first), and the next file (returned second) is empty.
fn crashed_after_creating_the_next_file(
    dir: &std::path::Path,
    c: &kvhygiene::config::LogConfig,
) -> (std::path::PathBuf, std::path::PathBuf) {
    use kvhygiene::forensic::files;
    use std::os::unix::fs::OpenOptionsExt;
    write_log(c, 100, true);
    let list = chain_files(dir);
    assert!(list.len() >= 2, "the log did not rotate");
    let newest = list.last().unwrap().clone();
    let mut lines = read_lines(&newest);
    assert!(lines.pop().unwrap().contains("\"kind\":\"stop\""));
    write_lines(&newest, &lines);
    let at = files::parse_file_name(&name(&newest)).unwrap();
    let next = dir.join(files::file_name(&at.chain, at.index + 1));
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&next)
        .unwrap();
    (newest, next)
}

/// The next process continues the chain [`crashed_after_creating_the_next_file`] left: one
/// chain that verifies, its empty file now starting with `rotate` and `recovery`.
fn assert_continued_into(
    dir: &std::path::Path,
    c: &kvhygiene::config::LogConfig,
    next: &std::path::Path,
) {
    let log = ForensicLog::open_with_secret(c, start(), Some(secret())).unwrap();
    log.emit(event(100));
    log.stop();
    let r = verify(dir, &keyed_opts());
    assert!(r.ok(), "{:?}", r.first_problem());
    assert_eq!(r.chains.len(), 1, "the chain was not continued");
    let continued = read_lines(next);
    assert!(
        continued
            .first()
            .is_some_and(|l| l.contains("\"kind\":\"rotate\"")),
        "{continued:?}"
    );
    assert!(
        continued
            .get(1)
            .is_some_and(|l| l.contains("\"kind\":\"recovery\"")),
        "{continued:?}"
    );
}

/// A writer that died after creating its next file and before writing the `rotate` record
/// into it left that file empty: the chain's last record is at the end of the file before,
/// which recovery reads (a line at a time) to continue the chain from it, linking the empty
/// file to it.
#[test]
fn a_crash_between_creating_the_next_file_and_its_rotate_record_is_continued() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = log_dir(&tmp);
    let c = cfg(&dir, 16 * 1024);
    let (_, next) = crashed_after_creating_the_next_file(&dir, &c);
    assert_continued_into(&dir, &c, &next);
}

/// The same crash, with the file before the empty one made read-only since (mode 0400, or
/// `chattr +i` where the test runs as root): recovery only reads that file and takes its
/// lock, so the chain is continued all the same, not left for a new one to replace.
#[test]
fn a_crash_after_creating_the_next_file_is_continued_when_the_file_before_is_read_only() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let dir = log_dir(&tmp);
    let c = cfg(&dir, 16 * 1024);
    let (newest, next) = crashed_after_creating_the_next_file(&dir, &c);
    std::fs::set_permissions(&newest, std::fs::Permissions::from_mode(0o400)).unwrap();
    // Root writes a file of mode 0400: the attribute makes it read-only for root too.
    let writable = || OpenOptions::new().append(true).open(&newest).is_ok();
    let _immutable = if writable() {
        let Some(attribute) = Attribute::set(&newest, "i") else {
            return;
        };
        Some(attribute)
    } else {
        None
    };
    assert_continued_into(&dir, &c, &next);
}

/// A crashed chain whose file ends within the room the writer keeps under a file size limit
/// (`RLIMIT_FSIZE`: files rotate [`FINAL_ROOM`] bytes under it) is continued by the next
/// process under the same limit: its `recovery` record goes into a new file when the old one
/// cannot hold it and still keep that room, rather than failing every start-up with `EFBIG`.
#[test]
fn a_chain_that_crashed_near_the_file_size_limit_is_continued_under_it() {
    const FINAL_ROOM: u64 = 4096;
    let tmp = tempfile::tempdir().unwrap();
    let dir = log_dir(&tmp);
    let c = cfg(&dir, 1 << 20);
    let file = crashed_chain(&c, true);
    let whole = std::fs::metadata(&file).unwrap().len();
    // A file the writer could have left under this limit, with less room after it than a
    // `recovery` record and the kept room take.
    let limit = whole + FINAL_ROOM + 100;
    let (failed, err) = start_up_without_room(&dir, limit, 1 << 20);
    assert!(!failed, "the start-up under the limit failed: {err}");
    let files = chain_files(&dir);
    assert_eq!(files.len(), 2, "the chain did not go on in a new file");
    for f in &files {
        let len = std::fs::metadata(f).unwrap().len();
        assert!(len <= limit, "{} is {len} bytes", f.display());
    }
    assert_eq!(recovery_records(&files[1..]).len(), 1, "{files:?}");
    let r = verify(&dir, &keyed_opts());
    assert!(r.ok(), "{:?}", r.first_problem());
    assert_eq!(r.chains.len(), 1, "the crashed chain was not continued");
}

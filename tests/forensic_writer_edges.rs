//! Edge cases of the forensic log's writing side.

mod forensic_common;
#[path = "mounted/mod.rs"]
mod mounted;
#[path = "skip/mod.rs"]
mod skip;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use forensic_common::*;
use kvhygiene::events::EventSink;
use kvhygiene::forensic::ForensicLog;
use mounted::Mounted;

/// A summary recorded after the log stopped is never written: like any other record that
/// arrives after `stop`, it is counted in `records_lost`.
#[test]
fn a_summary_recorded_after_stop_is_counted_lost() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = log_dir(&tmp);
    let log = ForensicLog::open_with_secret(&cfg(&dir, 1 << 20), start(), None).unwrap();
    log.stop();
    let before = log.stats().records_lost;
    log.record_summary(serde_json::json!({"frees": 1}));
    assert_eq!(
        log.stats().records_lost,
        before + 1,
        "a summary after stop vanished uncounted: {:?}",
        log.stats()
    );
}

/// A checkpoint directory given as a regular file is refused with a message that calls it the
/// checkpoint directory.
#[test]
fn a_checkpoint_directory_that_is_a_file_is_named_as_the_checkpoint_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = log_dir(&tmp);
    let (key, _) = kvhygiene::forensic::cli::keygen(&tmp.path().join("k")).unwrap();
    let ckpt = tmp.path().join("ck");
    fs::write(&ckpt, b"").unwrap();
    let mut c = cfg(&dir, 1 << 20);
    c.signing_key_file = Some(key);
    c.checkpoint_dir = Some(ckpt);
    let err = ForensicLog::open_with_secret(&c, start(), None)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("checkpoint directory"),
        "the message does not name the checkpoint directory: {err}"
    );
}

/// A checkpoint directory where no checkpoint can be written (immutable here) fails the
/// start-up, as a `start` record that cannot be synced does: the chain would never get its
/// first checkpoint, and with the pinned public key it could never verify.
#[test]
fn a_checkpoint_directory_that_refuses_the_first_checkpoint_fails_the_open() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = log_dir(&tmp);
    let (key, _) = kvhygiene::forensic::cli::keygen(&tmp.path().join("k")).unwrap();
    let ckpt = tmp.path().join("ck");
    fs::create_dir(&ckpt).unwrap();
    fs::set_permissions(&ckpt, fs::Permissions::from_mode(0o700)).unwrap();
    let set = Command::new("chattr").arg("+i").arg(&ckpt).output();
    if !set.is_ok_and(|o| o.status.success()) {
        skip::skipped("chattr +i is not available here");
        return;
    }
    let mut c = cfg(&dir, 1 << 20);
    c.signing_key_file = Some(key);
    c.checkpoint_dir = Some(ckpt.clone());
    let opened = ForensicLog::open_with_secret(&c, start(), None);
    let stats = opened.as_ref().ok().map(|l| l.stats());
    if let Ok(l) = &opened {
        l.stop();
    }
    let _ = Command::new("chattr").arg("-i").arg(&ckpt).status();
    assert!(
        opened.is_err(),
        "the log opened with no checkpoint written: {stats:?}"
    );
}

/// Runs test `entry` of this binary alone in a child process, with `marker` set (the child
/// part runs only then), the host backend, a log directory in `tmp` and `env`.
fn child(
    entry: &str,
    marker: &str,
    tmp: &tempfile::TempDir,
    env: &[(&str, &str)],
) -> std::process::Output {
    Command::new(std::env::current_exe().unwrap())
        .args([entry, "--exact", "--test-threads=1", "--nocapture"])
        .env(marker, "1")
        .env("KVH_BACKEND", "host")
        .env("KVH_LOG_DIR", log_dir(tmp))
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

/// Marker telling a child which case to run (not a `KVH_` variable: the configuration refuses
/// unknown ones).
const SECRET_CHILD: &str = "FORENSIC_WRITER_EDGES_SECRET_CHILD";
const CHILD_SECRET: &str = "child-secret-that-must-not-linger-0123456789";

/// In the child: starts the process-wide allocator through the C ABI (the start-up fails on
/// the configuration), then exits 0 only if the secret inherited at exec is neither in the
/// environment nor in /proc/self/environ. In a normal test run it returns at once.
#[test]
fn env_secret_config_error_child_entry() {
    if std::env::var_os(SECRET_CHILD).is_none() {
        return;
    }
    let rc = kvhygiene::ffi::kvh_init();
    assert_ne!(
        rc, 0,
        "the allocator started despite the configuration error"
    );
    let environ = fs::read("/proc/self/environ").unwrap();
    let needle = CHILD_SECRET.as_bytes();
    let shown = environ.windows(needle.len()).any(|w| w == needle);
    let inherited = std::env::var_os(kvhygiene::forensic::keys::SECRET_ENV).is_some();
    std::process::exit(if shown || inherited { 3 } else { 0 });
}

/// `FORENSIC_HMAC_SECRET` is taken out of the environment (and wiped from
/// /proc/self/environ) once the library has started, whether or not the start-up succeeds:
/// a start-up refused for a mistyped `KVH_*` value leaves a process running (its allocations
/// fail) that must not keep the deployment's secret for its children and every reader of
/// /proc/<pid>/environ.
#[test]
fn env_secret_is_removed_when_the_configuration_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let out = child(
        "env_secret_config_error_child_entry",
        SECRET_CHILD,
        &tmp,
        &[
            (kvhygiene::forensic::keys::SECRET_ENV, CHILD_SECRET),
            ("KVH_LOG_FSYNC", "sometimes"),
        ],
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "after a refused configuration the secret stays in the environment: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

const SHUTDOWN_CHILD: &str = "FORENSIC_WRITER_EDGES_SHUTDOWN_CHILD";

/// In the child: starts the process-wide allocator through the C ABI with a forensic log and
/// summaries every 100 ms, shuts it down, lets a few summary intervals pass, and prints the
/// log's `records_lost` from `kvh_stats_json`. In a normal test run it returns at once.
#[test]
fn summaries_after_shutdown_child_entry() {
    if std::env::var_os(SHUTDOWN_CHILD).is_none() {
        return;
    }
    assert_eq!(kvhygiene::ffi::kvh_init(), 0, "the allocator did not start");
    kvhygiene::ffi::kvh_shutdown();
    std::thread::sleep(std::time::Duration::from_millis(600));
    let mut buf = vec![0u8; 1 << 20];
    let mut len = 0usize;
    let rc = kvhygiene::ffi::kvh_stats_json(buf.as_mut_ptr().cast(), buf.len(), &mut len);
    assert_eq!(rc, 0);
    let text = std::str::from_utf8(&buf[..len])
        .unwrap()
        .trim_end_matches('\0');
    let stats: serde_json::Value = serde_json::from_str(text).unwrap();
    println!("records_lost={}", stats["log"]["records_lost"]);
    std::process::exit(0);
}

/// `kvh_shutdown` writes the log's last summary and its `stop` record: no record is lost. The
/// library's own periodic summaries that fall due afterwards are not records a caller tried to
/// log; `records_lost` (a security failure for `kvh metrics --fail-on-security` and
/// `kvh gate`) stays 0 however long the process runs on.
#[test]
fn periodic_summaries_after_shutdown_are_not_counted_as_lost_records() {
    let tmp = tempfile::tempdir().unwrap();
    let out = child(
        "summaries_after_shutdown_child_entry",
        SHUTDOWN_CHILD,
        &tmp,
        &[("KVH_SUMMARY_INTERVAL_MS", "100")],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("records_lost=0"),
        "after kvh_shutdown the log's records_lost grew with every summary interval: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The last summary before `stop` is not replaced by a periodic one put after it (whose
/// counters a thread read before, racing the stop): the chain's last summary holds the final
/// counters, which `kvh evidence` takes as the process's.
#[test]
fn a_periodic_summary_put_after_the_final_one_does_not_replace_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = log_dir(&tmp);
    let log = ForensicLog::open_with_secret(&cfg(&dir, 1 << 20), start(), None).unwrap();
    assert!(log.record_final_summary(serde_json::json!({"frees": 2})));
    assert!(!log.record_own_summary(serde_json::json!({"frees": 1})));
    log.stop();
    assert_eq!(log.stats().records_lost, 0, "{:?}", log.stats());
    let summaries: Vec<serde_json::Value> = chain_files(&dir)
        .iter()
        .flat_map(|f| read_lines(f))
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(&l).ok())
        .filter(|r| r["kind"] == "summary")
        .collect();
    assert_eq!(
        summaries.last().map(|r| r["counters"]["frees"].clone()),
        Some(serde_json::json!(2)),
        "{summaries:?}"
    );
}

/// A writer thread that panics (a bug) loses what it held and everything queued after: each
/// such record is counted in `records_lost`, none is counted written, a summary put later is
/// refused and counted, `flush` and `stop` return, and the log says why it stopped writing.
#[test]
fn a_writer_that_panics_counts_every_record_it_did_not_write() {
    use kvhygiene::events::EventSink;
    let tmp = tempfile::tempdir().unwrap();
    let dir = log_dir(&tmp);
    let log = ForensicLog::open_with_secret(&cfg(&dir, 1 << 20), start(), None).unwrap();
    for i in 0..3 {
        log.emit(event(i));
    }
    log.flush();
    let before = log.stats();
    assert_eq!(before.records_lost, 0, "{before:?}");

    log.inject_writer_panic();
    for i in 3..8 {
        log.emit(event(i));
    }
    log.flush();
    for i in 8..10 {
        log.emit(event(i));
    }
    log.record_summary(serde_json::json!({"frees": 1}));
    log.stop();

    let after = log.stats();
    assert_eq!(after.records_written, before.records_written, "{after:?}");
    assert_eq!(after.records_lost, 5 + 2 + 1, "{after:?}");
    let error = after.last_error.unwrap_or_default();
    assert!(error.contains("panicked"), "{error}");
}

/// While other producers keep the queue full, `flush` still returns once this thread's
/// records are written, and `stop` still ends the chain with its `stop` record: neither needs
/// a slot in the queue that the blocked producers race for.
#[test]
fn flush_and_stop_get_through_a_queue_other_producers_keep_full() {
    use kvhygiene::events::EventSink;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let tmp = tempfile::tempdir().unwrap();
    let dir = log_dir(&tmp);
    let mut c = cfg(&dir, 1 << 40);
    c.queue_capacity = 1;
    let log = ForensicLog::open_with_secret(&c, start(), None).unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let producers: Vec<_> = (0..4)
        .map(|t| {
            let (log, done) = (log.clone(), done.clone());
            std::thread::spawn(move || {
                let mut i = 0;
                while !done.load(Ordering::Relaxed) && !log.is_stopped() {
                    log.emit(event(1_000_000 * (t + 1) + i));
                    i += 1;
                }
            })
        })
        .collect();
    for round in 0..20u64 {
        let marker = 999_000 + round;
        log.emit(event(marker));
        log.flush();
        let text: String = chain_files(&dir)
            .iter()
            .map(|f| fs::read_to_string(f).unwrap())
            .collect();
        assert!(
            text.contains(&format!("\"req-{marker}\"")),
            "round {round}: flush returned before this thread's record was written"
        );
    }
    log.stop();
    done.store(true, Ordering::Relaxed);
    for p in producers {
        p.join().unwrap();
    }
    let files = chain_files(&dir);
    let last = read_lines(files.last().unwrap()).pop().unwrap();
    assert!(
        last.contains("\"kind\":\"stop\""),
        "the chain ends with {last}"
    );
}

/// A record that does not fit in the active file first has the records buffered ahead of it
/// written, then the file rotated. A writer thread that panics (a bug) in that write loses the
/// record it was sealing as well as the buffered ones: it too is counted in `records_lost`
/// (invariant 5). Here the buffer ahead of it holds the `lost` record of a failed write; each
/// run fills the first file to another level, so that in one of them the `lost` record fits
/// in the file and the event after it does not.
#[test]
fn a_writer_that_panics_while_making_room_for_a_record_counts_that_record() {
    use kvhygiene::events::EventSink;
    for k in 0..16u64 {
        let tmp = tempfile::tempdir().unwrap();
        let dir = log_dir(&tmp);
        let log = ForensicLog::open_with_secret(&cfg(&dir, 4096), start(), None).unwrap();
        for i in 0..k {
            log.emit(event(100 + i));
        }
        log.flush();
        log.inject_write_faults(1);
        log.emit(event(200));
        log.flush();
        assert_eq!(log.stats().records_lost, 1, "k = {k}: {:?}", log.stats());
        // Past the wait before a failed write is tried again (100 ms after the first
        // failure): the next write is tried.
        std::thread::sleep(std::time::Duration::from_millis(300));
        log.inject_writer_panic();
        log.emit(event(300));
        log.flush();
        log.stop();
        let after = log.stats();
        assert_eq!(
            after.records_lost, 2,
            "k = {k}: the event the panicking writer was sealing vanished uncounted: {after:?}"
        );
    }
}

/// The stats carry the room left on the log's file system from the start on (the writer
/// measures it once its first records are written): on a 1 MiB tmpfs, a figure under 1 MiB
/// that matches the file system's own; on a tmpfs that states no size, none.
#[test]
fn the_stats_carry_the_room_left_on_the_log_file_system() {
    let tmp = tempfile::tempdir().unwrap();
    let mount = tmp.path().join("fs");
    fs::create_dir(&mount).unwrap();
    let Some(_small) = Mounted::tmpfs(&mount, "1m", "") else {
        return;
    };
    let dir = mount.join("log");
    let log = ForensicLog::open_with_secret(&cfg(&dir, 1 << 20), start(), None).unwrap();
    let measured = log.stats().free_bytes.expect("no room measured at start");
    let room = kvhygiene::forensic::files::free_space(&dir)
        .unwrap()
        .bytes
        .unwrap();
    assert!(measured <= 1 << 20, "{measured}");
    assert!(
        measured.abs_diff(room) <= 64 << 10,
        "measured {measured}, the file system says {room}"
    );
    let json = serde_json::to_value(log.stats()).unwrap();
    assert_eq!(json["free_bytes"], measured);
    log.stop();
    drop(_small);

    let Some(_unsized) = Mounted::tmpfs(&mount, "0", "") else {
        return;
    };
    let log = ForensicLog::open_with_secret(&cfg(&dir, 1 << 20), start(), None).unwrap();
    assert_eq!(log.stats().free_bytes, None);
    let json = serde_json::to_value(log.stats()).unwrap();
    assert!(json.get("free_bytes").is_none(), "{json}");
    log.stop();
}

/// `free_bytes` is what this process may still write on the log's file system. On ext4 the
/// blocks statvfs counts free (`f_bfree`) include a pool the kernel keeps back from every
/// writer, root included (2% of the volume, up to 4096 blocks): with 512 KiB left that this
/// process can write, the figure is no more than that (give or take the log's own records).
#[test]
fn the_stats_room_on_ext4_is_what_this_process_can_still_write() {
    use std::io::Write;
    let tmp = tempfile::tempdir().unwrap();
    let mount = tmp.path().join("fs");
    fs::create_dir(&mount).unwrap();
    let Some(_volume) = Mounted::ext4(&mount, 128) else {
        return;
    };
    // Filled until a write fails, then 512 KiB given back.
    let filler = mount.join("filler");
    let mut f = fs::File::create(&filler).unwrap();
    let page = [0u8; 4096];
    while f.write_all(&page).is_ok() {}
    let len = f.metadata().unwrap().len();
    f.set_len(len - (512 << 10)).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let dir = mount.join("log");
    let log = ForensicLog::open_with_secret(&cfg(&dir, 1 << 20), start(), None).unwrap();
    let measured = log.stats().free_bytes.expect("no room measured at start");
    log.stop();
    // What this process can still write there, found by writing it.
    let mut probe = fs::File::create(mount.join("probe")).unwrap();
    let mut written = 0u64;
    while probe.write_all(&page).is_ok() {
        written += page.len() as u64;
    }
    assert!(
        measured <= written + (256 << 10),
        "measured {measured} bytes free; this process could write {written}"
    );
}

/// An engine's anomaly detail (or summary counters) larger than the limit is recorded by
/// its size and SHA-256, so that every record stays far shorter than the longest line a
/// reader holds; one of exactly the limit is recorded whole. The log verifies.
#[test]
fn caller_json_larger_than_the_limit_is_recorded_by_its_size_and_sha256() {
    use kvhygiene::forensic::MAX_FIELD_BYTES;
    use sha2::{Digest, Sha256};
    let tmp = tempfile::tempdir().unwrap();
    let dir = log_dir(&tmp);
    let log = ForensicLog::open_with_secret(&cfg(&dir, 16 << 20), start(), Some(secret())).unwrap();
    // `{"pad":"` and `"}` are 10 bytes of the canonical form.
    let large = "x".repeat(MAX_FIELD_BYTES);
    let fits = serde_json::json!({ "pad": "x".repeat(MAX_FIELD_BYTES - 10) });
    log.record_anomaly(serde_json::json!({ "pad": large }));
    log.record_anomaly(fits.clone());
    log.record_summary(serde_json::json!({ "pad": large }));
    log.stop();
    let records: Vec<serde_json::Value> = chain_files(&dir)
        .iter()
        .flat_map(|f| read_lines(f))
        .map(|l| serde_json::from_str::<serde_json::Value>(&l).unwrap())
        .collect();
    let of_kind = |kind: &str| -> Vec<&serde_json::Value> {
        records.iter().filter(|r| r["kind"] == kind).collect()
    };
    let anomalies = of_kind("anomaly");
    assert_eq!(anomalies.len(), 2);
    let canonical = format!("{{\"pad\":\"{large}\"}}");
    let detail = &anomalies[0]["detail"];
    assert_eq!(detail["bytes"], canonical.len());
    assert_eq!(
        detail["sha256"],
        kvhygiene::forensic::record::hex(&Sha256::digest(canonical.as_bytes()))
    );
    assert!(
        detail["omitted"].as_str().unwrap().contains("limit"),
        "{detail}"
    );
    assert_eq!(anomalies[1]["detail"], fits);
    let summaries = of_kind("summary");
    assert!(
        summaries
            .iter()
            .any(|r| r["counters"]["bytes"] == canonical.len()),
        "{summaries:?}"
    );
    let r = verify(&dir, &keyed_opts());
    assert!(r.ok(), "{:?}", r.first_problem());
}

/// A text is held to the limit as it is written, escaped: one of control characters (six
/// bytes each on the line) that is within the limit unescaped is recorded by its size and
/// SHA-256, one of plain characters within the limit whole. No record nears the line a crash
/// recovery continues from, and a crash after such a record is continued as one chain.
#[test]
fn a_text_is_held_to_the_limit_as_written_and_its_chain_is_continued_after_a_crash() {
    use kvhygiene::forensic::MAX_FIELD_BYTES;
    let tmp = tempfile::tempdir().unwrap();
    let dir = log_dir(&tmp);
    let c = cfg(&dir, 64 << 20);
    let log = ForensicLog::open_with_secret(&c, start(), Some(secret())).unwrap();
    let controls = "\u{1}".repeat(MAX_FIELD_BYTES / 2);
    // Its quotes make up the limit.
    let plain = "x".repeat(MAX_FIELD_BYTES - 2);
    log.record_anomaly(serde_json::Value::String(controls));
    log.record_anomaly(serde_json::Value::String(plain.clone()));
    log.stop();
    let files = chain_files(&dir);
    assert_eq!(files.len(), 1);
    let mut lines = read_lines(&files[0]);
    let details: Vec<serde_json::Value> = lines
        .iter()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r["kind"] == "anomaly")
        .map(|r| r["detail"].clone())
        .collect();
    assert_eq!(details.len(), 2);
    let omitted = details[0].as_str().unwrap();
    assert!(
        omitted.starts_with("omitted:") && omitted.contains(&(3 * MAX_FIELD_BYTES + 2).to_string()),
        "{}",
        &omitted[..omitted.len().min(200)]
    );
    assert_eq!(details[1].as_str(), Some(plain.as_str()));
    let longest = lines.iter().map(String::len).max().unwrap();
    assert!(
        longest < MAX_FIELD_BYTES + (64 << 10),
        "a line of {longest} bytes"
    );
    // The writer dies before its stop record: the next start-up continues the chain.
    assert!(lines.pop().unwrap().contains("\"kind\":\"stop\""));
    write_lines(&files[0], &lines);
    let log = ForensicLog::open_with_secret(&c, start(), Some(secret())).unwrap();
    log.stop();
    let r = verify(&dir, &keyed_opts());
    assert!(r.ok(), "{:?}", r.first_problem());
    assert_eq!(r.chains.len(), 1, "the crashed chain was not continued");
}

/// A `policy_violation` event handed to the log with a long detail text (the `Event` API
/// takes any `String`) is written as a record the verifier accepts: the writer keeps every
/// record within the longest line a reader holds, as it does for caller JSON.
#[test]
fn a_policy_violation_with_a_long_detail_verifies() {
    use kvhygiene::events::{EventKind, EventSink};
    let tmp = tempfile::tempdir().unwrap();
    let dir = log_dir(&tmp);
    let log = ForensicLog::open_with_secret(&cfg(&dir, 64 << 20), start(), Some(secret())).unwrap();
    let mut e = event(1);
    e.kind = EventKind::PolicyViolation {
        policy: "kv_gate",
        detail: "x".repeat(kvhygiene::forensic::lines::MAX_LINE_BYTES + 1),
    };
    log.emit(e);
    log.stop();
    let r = verify(&dir, &keyed_opts());
    assert!(r.ok(), "{:?}", r.first_problem());
}

/// A log written before caller JSON was bounded (a summary's counters of 8 MiB, as the
/// writer then recorded them whole, sealed with the log's key) still verifies: records the
/// writer sealed are not reported as tampering.
#[test]
fn a_log_with_a_large_summary_written_before_the_bound_still_verifies() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = log_dir(&tmp);
    let log = ForensicLog::open_with_secret(&cfg(&dir, 64 << 20), start(), Some(secret())).unwrap();
    log.record_summary(serde_json::json!({"frees": 1}));
    log.stop();
    let files = chain_files(&dir);
    let pad = "x".repeat(8 << 20);
    reseal_all(&files, SECRET, |m| {
        if m["kind"] == "summary" {
            m.insert("counters".into(), serde_json::json!({ "pad": pad }));
        }
    });
    assert!(fs::metadata(&files[0]).unwrap().len() > 8 << 20);
    let r = verify(&dir, &keyed_opts());
    assert!(r.ok(), "{:?}", r.first_problem());
}

/// A disk that fills and stays full until the log stops: the records it refuses are counted
/// lost, and the `lost` and `stop` records that say so still land, in the room the writer
/// keeps for them. Before, a run that ended on a full disk left its losses recorded nowhere
/// in the log: no `lost` record, no `stop` record, a chain that read as a crash.
#[test]
fn a_disk_full_until_stop_still_gets_the_records_that_describe_the_loss() {
    let tmp = tempfile::tempdir().unwrap();
    let Some((_small, dir)) = small_disk(&tmp) else {
        return;
    };
    let log = ForensicLog::open_with_secret(&cfg(&dir, 1 << 30), start(), Some(secret())).unwrap();
    let i = fill_the_disk(&log);
    // More while it stays full, then the end of the run.
    for j in 0..64 {
        log.emit(event(i + j));
    }
    log.flush();
    log.stop();
    assert_every_loss_recorded(&dir, &keyed_opts(), log.stats().records_lost);
}

/// The same with checkpoints signed, where an idle log writes its `lost` record without
/// waiting for the next record: written while the disk stays full, each took part of the room
/// kept for the last records, until the run's last `lost` and `stop` records no longer fit.
/// Such a record is written while the room left after it still holds those two, and the
/// rest wait for the end of the run.
#[test]
fn an_idle_signed_log_on_a_full_disk_keeps_the_room_for_its_last_records() {
    let tmp = tempfile::tempdir().unwrap();
    let Some((_small, dir)) = small_disk(&tmp) else {
        return;
    };
    let (key, public) = kvhygiene::forensic::cli::keygen(&tmp.path().join("k")).unwrap();
    let mut c = cfg(&dir, 1 << 30);
    c.signing_key_file = Some(key);
    let log = ForensicLog::open_with_secret(&c, start(), Some(secret())).unwrap();
    let i = fill_the_disk(&log);
    // Records refused one at a time, each followed by idle rounds long enough for the writer
    // to try its `lost` record alone (after the first wait of its backoff, 100 ms).
    for j in 0..16 {
        log.emit(event(i + j));
        log.flush();
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
    log.stop();
    let opts = kvhygiene::forensic::VerifyOptions {
        public_keys: vec![kvhygiene::forensic::keys::read_public_key(&public).unwrap()],
        checkpoints: vec![dir.clone()],
        ..keyed_opts()
    };
    assert_every_loss_recorded(&dir, &opts, log.stats().records_lost);
}

/// A log directory on a file system of 256 KiB mounted in `tmp` (a tmpfs, unmounted when the
/// guard is dropped); `None` where this process may not mount one.
fn small_disk(tmp: &tempfile::TempDir) -> Option<(Mounted, std::path::PathBuf)> {
    let mount = tmp.path().join("fs");
    fs::create_dir(&mount).unwrap();
    let small = Mounted::tmpfs(&mount, "256k", "")?;
    Some((small, mount.join("log")))
}

/// Emits events until the log counts one lost (its disk full); returns how many it emitted.
fn fill_the_disk(log: &ForensicLog) -> u64 {
    let mut i = 0;
    while log.stats().records_lost == 0 && i < 100_000 {
        log.emit(event(i));
        i += 1;
        if i % 32 == 0 {
            log.flush();
        }
    }
    assert!(log.stats().records_lost > 0, "the disk never filled");
    i
}

/// Asserts that the stopped log in `dir` verifies, ends with a `lost` and a `stop` record, and
/// counts `records_lost` (the run's losses) both in its `lost` records and in its `stop`
/// record.
fn assert_every_loss_recorded(
    dir: &std::path::Path,
    opts: &kvhygiene::forensic::VerifyOptions,
    records_lost: u64,
) {
    let r = verify(dir, opts);
    assert!(r.ok(), "{r:?}");
    assert!(r.chains[0].closed, "no stop record: {r:?}");
    let records: Vec<serde_json::Value> = chain_files(dir)
        .iter()
        .flat_map(|f| read_lines(f))
        .map(|l| serde_json::from_str(&l).unwrap())
        .collect();
    let n = records.len();
    let (last_lost, stop) = (&records[n - 2], &records[n - 1]);
    assert_eq!(
        (last_lost["kind"].as_str(), stop["kind"].as_str()),
        (Some("lost"), Some("stop")),
        "{last_lost}\n{stop}"
    );
    // A write that fitted between two losses put a `lost` record of its own before it.
    let in_lost_records: u64 = records
        .iter()
        .filter(|r| r["kind"] == "lost")
        .map(|r| r["records_lost"].as_u64().unwrap())
        .sum();
    assert_eq!(in_lost_records, records_lost, "{last_lost}");
    assert_eq!(stop["records_lost"].as_u64(), Some(records_lost), "{stop}");
}

/// The disk space the writer allocates ahead of its records (64 KiB at a time, past the
/// file's end) is given back when the chain leaves a file, at each rotation and at stop:
/// kept, it stayed taken for as long as the files were kept, up to 68 KiB a file.
#[test]
fn the_room_allocated_ahead_is_given_back_when_the_chain_leaves_a_file() {
    use std::os::unix::fs::MetadataExt;
    let tmp = tempfile::tempdir().unwrap();
    let dir = log_dir(&tmp);
    write_log(&cfg(&dir, 16 << 10), 200, true);
    let files = chain_files(&dir);
    assert!(files.len() > 2, "the log did not rotate: {files:?}");
    for f in &files {
        let m = fs::metadata(f).unwrap();
        let allocated = m.blocks() * 512;
        // The file's blocks, and one more for a file system's own bookkeeping.
        let bound = m.len().div_ceil(4096) * 4096 + 4096;
        assert!(
            allocated <= bound,
            "{}: {allocated} bytes allocated for {} bytes",
            f.display(),
            m.len()
        );
    }
}

/// A disk full while the active file is at its size: every record would start the next
/// file, which the disk refuses, and goes into the file it is in while there is room. The
/// rotation is tried again after a wait (100 ms, doubled at each failure up to 2 s), not for
/// each record: before, a full disk cost a file made and removed, and an error counted, for
/// every record.
#[test]
fn a_full_disk_is_not_asked_for_a_new_file_at_every_record() {
    let tmp = tempfile::tempdir().unwrap();
    let Some((_small, dir)) = small_disk(&tmp) else {
        return;
    };
    let log = ForensicLog::open_with_secret(&cfg(&dir, 16 << 10), start(), Some(secret())).unwrap();
    let i = fill_the_disk(&log);
    for j in 0..40 {
        log.emit(event(i + j));
        log.flush();
    }
    let s = log.stats();
    log.stop();
    // A failed write counts one error for the records it loses; the rotations add a few.
    assert!(
        s.write_errors <= s.records_lost + 10,
        "{} write errors for {} records lost: {:?}",
        s.write_errors,
        s.records_lost,
        s.last_error
    );
    let r = verify(&dir, &keyed_opts());
    assert!(r.ok() && r.chains[0].closed, "{r:?}");
}

/// The room given back when the chain leaves a file is given back only from a file of the
/// length its records make: one cut short from outside while in use (`copytruncate`, or
/// tampering) is not padded with zeros up to where the writer's records ended.
#[test]
fn a_file_cut_short_from_outside_is_not_padded_when_the_chain_leaves_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = log_dir(&tmp);
    let log = ForensicLog::open_with_secret(&cfg(&dir, 1 << 20), start(), Some(secret())).unwrap();
    for i in 0..10 {
        log.emit(event(i));
    }
    log.flush();
    let file = chain_files(&dir)[0].clone();
    fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .unwrap()
        .set_len(0)
        .unwrap();
    log.emit(event(10));
    log.stop();
    let bytes = fs::read(&file).unwrap();
    assert!(
        !bytes.contains(&0),
        "{} of its {} bytes are zeros",
        bytes.iter().filter(|&&b| b == 0).count(),
        bytes.len()
    );
}

//! `kvh evidence` against logs written by the real writer: each figure of the report is
//! compared with what was written (runs of a chain, lost records, counters of an audit
//! period).

mod forensic_common;

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use forensic_common::{cfg, chain_files, event, read_lines, start, write_lines};
use kvhygiene::events::EventSink;
use kvhygiene::forensic::verify::rfc3339;
use kvhygiene::forensic::ForensicLog;
use serde_json::Value;

fn kvh(args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kvh"));
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("KVH_")) {
        cmd.env_remove(k);
    }
    cmd.args(args).output().expect("run kvh")
}

fn evidence_json(dir: &Path, extra: &[&str]) -> Value {
    let mut args = vec!["evidence", dir.to_str().unwrap(), "--json"];
    args.extend_from_slice(extra);
    let out = kvh(&args);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn ts_of(line: &str) -> u64 {
    let v: Value = serde_json::from_str(line).unwrap();
    v["ts"].as_u64().unwrap()
}

fn kind_of(line: &str) -> String {
    let v: Value = serde_json::from_str(line).unwrap();
    v["kind"].as_str().unwrap().to_string()
}

/// A chain whose writer died right after creating its next file (before that file's
/// `rotate` record was whole), continued by a second process: the second process writes the
/// missing `rotate` record, then its `recovery` record. Returns the log directory, the time
/// of the first process's last record and the time of the continuation.
fn crashed_at_rotation_then_recovered(tmp: &tempfile::TempDir) -> (PathBuf, u64, u64) {
    let dir = tmp.path().join("log");
    let c = cfg(&dir, 1 << 20);
    let first = ForensicLog::open_with_secret(&c, start(), None).unwrap();
    first.emit(event(0));
    first.emit(event(1));
    first.stop();
    // The first process died before its stop record: the chain ends at its last event.
    let files = chain_files(&dir);
    assert_eq!(files.len(), 1);
    let mut lines = read_lines(&files[0]);
    assert_eq!(kind_of(lines.last().unwrap()), "stop");
    lines.pop();
    write_lines(&files[0], &lines);
    let last_of_first = ts_of(lines.last().unwrap());
    // ... just after it created its next file, of which a torn fragment is all there is.
    let name = files[0].file_name().unwrap().to_str().unwrap();
    let next = files[0].with_file_name(name.replace("-000000.jsonl", "-000001.jsonl"));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&next)
        .unwrap();
    std::io::Write::write_all(&mut f, b"{\"chain\":\"p1").unwrap();
    drop(f);
    std::thread::sleep(std::time::Duration::from_millis(200));

    let second = ForensicLog::open_with_secret(&c, start(), None).unwrap();
    second.emit(event(2));
    second.stop();
    let files = chain_files(&dir);
    assert_eq!(files.len(), 2, "the second process continued the chain");
    let continued = read_lines(&files[1]);
    let kinds: Vec<String> = continued.iter().map(|l| kind_of(l)).collect();
    assert_eq!(
        &kinds[..2],
        ["rotate", "recovery"],
        "the continuation links the file first: {kinds:?}"
    );
    let recovered_at = ts_of(&continued[1]);
    assert!(recovered_at > last_of_first);
    // Its `recovery` record names the crashed process's last record, the one before the
    // `rotate` record: the verification holds it to that.
    let r = forensic_common::verify(&dir, &Default::default());
    assert!(r.ok(), "{:?}", r.first_problem());
    (dir, last_of_first, recovered_at)
}

/// The `rotate` record a recovering process writes before its `recovery` record is its own
/// record, written at its start: the crashed process's row ends at its own last record.
#[test]
fn a_crashed_run_ends_at_its_own_last_record_when_recovery_links_its_next_file() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, last_of_first, recovered_at) = crashed_at_rotation_then_recovered(&tmp);
    let v = evidence_json(&dir, &[]);
    let procs = v["processes"].as_array().unwrap();
    assert_eq!(procs.len(), 2, "{v}");
    assert_eq!(procs[1]["recovered"], true, "{v}");
    assert_eq!(
        procs[0]["last_record"],
        rfc3339(last_of_first).as_str(),
        "the crashed process's last record is its own, not the recovering process's rotate \
         record at {}: {}",
        rfc3339(recovered_at),
        procs[0]
    );
}

/// An audit period that begins after the crashed process's last record and before the
/// recovery holds only the recovering process.
#[test]
fn a_run_that_crashed_before_the_period_is_not_listed_in_it() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, last_of_first, recovered_at) = crashed_at_rotation_then_recovered(&tmp);
    let since = rfc3339(last_of_first + (recovered_at - last_of_first) / 2);
    let v = evidence_json(&dir, &["--since", &since]);
    let procs = v["processes"].as_array().unwrap();
    assert_eq!(
        procs.len(),
        1,
        "the first process's records all lie before {since}; only the recovering process ran \
         in the period: {}",
        v["processes"]
    );
    assert_eq!(procs[0]["recovered"], true, "{v}");
    assert_eq!(
        v["processes_without_summary"], 1,
        "only the recovering process, which wrote no summary: {v}"
    );
    // The report says it of the period.
    let md = kvh(&["evidence", dir.to_str().unwrap(), "--since", &since]);
    let text = String::from_utf8_lossy(&md.stdout);
    assert!(
        text.contains("1 process wrote no periodic counters in the audit period;"),
        "{text}"
    );
}

/// Records lost before an audit period, told by a `lost` record that `prune-log` moved away,
/// are not the period's: the stop total less the losses before the period is what the period
/// lost. Read with `--allow-pruned`, the `lost` record is gone while a summary before the
/// period is still there, so the stop total cannot be split and must not be reported whole.
#[test]
fn losses_told_in_moved_records_are_not_counted_in_a_later_period() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    let archive = tmp.path().join("archive");
    std::fs::create_dir(&archive).unwrap();
    std::fs::set_permissions(&archive, std::fs::Permissions::from_mode(0o700)).unwrap();
    let key = tmp.path().join("hmac.key");
    std::fs::write(&key, &*forensic_common::secret()).unwrap();

    let log =
        ForensicLog::open_with_secret(&cfg(&dir, 4096), start(), Some(forensic_common::secret()))
            .unwrap();
    for i in 0..40 {
        log.emit(event(i));
    }
    log.stop();
    let files = chain_files(&dir);
    assert!(files.len() >= 4, "{} files", files.len());
    let kept_from = files.len() - 2;
    let first_kept_seq = {
        let first: Value = serde_json::from_str(&read_lines(&files[kept_from])[0]).unwrap();
        first["seq"].as_u64().unwrap()
    };
    // The moved files: a hundred days old; the process lost 3 records then (seq 1). The files
    // left: two hours old, a summary right after the first one's rotate record, then events
    // a minute apart, and the stop, whose total counts the 3 lost records.
    let now = kvhygiene::forensic::unix_nanos(std::time::SystemTime::now());
    let day = 86_400 * 1_000_000_000u64;
    let minute = 60_000_000_000u64;
    let ts = |seq: u64| {
        if seq < first_kept_seq {
            now - 100 * day + seq * minute
        } else {
            now - 120 * minute + (seq - first_kept_seq) * minute
        }
    };
    forensic_common::reseal_all(&files, &forensic_common::secret(), |m| {
        let seq = m["seq"].as_u64().unwrap();
        m.insert("ts".into(), ts(seq).into());
        if seq == 1 {
            m.insert("kind".into(), "lost".into());
            m.insert("records_lost".into(), 3.into());
        }
        if seq == first_kept_seq + 1 {
            m.insert("kind".into(), "summary".into());
            m.insert("counters".into(), serde_json::json!({"frees": 10}));
        }
        if m["kind"] == "stop" {
            m.insert("records_lost".into(), 3.into());
        }
    });
    let out = kvh(&[
        "prune-log",
        dir.to_str().unwrap(),
        "--archive-dir",
        archive.to_str().unwrap(),
        "--older-than",
        "30",
        "--key-file",
        key.to_str().unwrap(),
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(chain_files(&dir).len(), 2, "the two recent files stay");

    let since = rfc3339(ts(first_kept_seq + 2));
    let common = [
        "--key-file",
        key.to_str().unwrap(),
        "--since",
        since.as_str(),
    ];
    let whole = evidence_json(
        &dir,
        &[&common[..], &["--archive-dir", archive.to_str().unwrap()]].concat(),
    );
    assert_eq!(whole["records_lost"], 0, "read whole: {whole}");
    let pruned = evidence_json(&dir, &[&common[..], &["--allow-pruned"]].concat());
    assert_eq!(
        pruned["records_lost"],
        0,
        "the 3 records were lost a hundred days before the period: {}",
        serde_json::json!({
            "records_lost": pruned["records_lost"],
            "audit_period": pruned["audit_period"],
            "processes": pruned["processes"],
        })
    );
}

/// A process that started inside the audit period, whose oldest files `prune-log` moved:
/// nothing it did lies before the period (the manifest dates the moved records inside it),
/// so its last summary is all the period's, as it is for the whole log.
#[test]
fn a_run_that_began_inside_the_period_keeps_its_counters_when_its_start_was_moved() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    let archive = tmp.path().join("archive");
    std::fs::create_dir(&archive).unwrap();
    std::fs::set_permissions(&archive, std::fs::Permissions::from_mode(0o700)).unwrap();
    let key = tmp.path().join("hmac.key");
    std::fs::write(&key, &*forensic_common::secret()).unwrap();

    // An open chain (its writer still runs) of several 4 KiB files.
    let log =
        ForensicLog::open_with_secret(&cfg(&dir, 4096), start(), Some(forensic_common::secret()))
            .unwrap();
    for i in 0..80 {
        log.emit(event(i));
    }
    log.flush();
    std::mem::forget(log);
    let files = chain_files(&dir);
    assert!(files.len() >= 4, "{} files", files.len());
    let last_seq = {
        let last: Value =
            serde_json::from_str(read_lines(files.last().unwrap()).last().unwrap()).unwrap();
        last["seq"].as_u64().unwrap()
    };
    // From ten days ago, a record a minute; the last record is a summary (frees 25).
    let day = 86_400 * 1_000_000_000u64;
    let began = kvhygiene::forensic::unix_nanos(std::time::SystemTime::now()) - 10 * day;
    let minute = |seq: u64| began + seq * 60_000_000_000;
    forensic_common::reseal_all(&files, &forensic_common::secret(), |m| {
        let seq = m["seq"].as_u64().unwrap();
        m.insert("ts".into(), minute(seq).into());
        if seq == last_seq {
            m.insert("kind".into(), "summary".into());
            m.insert("counters".into(), serde_json::json!({"frees": 25}));
        }
    });
    let out = kvh(&[
        "prune-log",
        dir.to_str().unwrap(),
        "--archive-dir",
        archive.to_str().unwrap(),
        "--older-than",
        "0",
        "--key-file",
        key.to_str().unwrap(),
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(chain_files(&dir).len(), 2, "the two newest files stay");

    let k = key.to_str().unwrap();
    let all = evidence_json(&dir, &["--key-file", k, "--allow-pruned"]);
    assert_eq!(all["counters"]["frees"], 25, "{all}");
    // A period holding the whole run, from a day before its start on.
    let since = rfc3339(began - day);
    let period = evidence_json(
        &dir,
        &["--key-file", k, "--allow-pruned", "--since", &since],
    );
    assert_eq!(
        period["audit_period"]["counters_unattributed"],
        serde_json::json!([]),
        "the run began in the period: nothing it did lies before it: {}",
        period["audit_period"]
    );
    assert_eq!(
        period["counters"]["frees"], 25,
        "the run's counters, all of the period: {}",
        period["counters"]
    );
}

/// An audit period that holds none of the log's security records: the report says the period
/// has none, not that the verified chains have none (they hold every one written).
#[test]
fn a_period_without_exceptions_does_not_say_the_log_has_none() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    // Three quarantines after failed verifications: security records.
    forensic_common::write_log(&cfg(&dir, 1 << 20), 3, false);
    let whole = evidence_json(&dir, &[]);
    assert_eq!(whole["exceptions_by_kind"]["quarantine"], 3, "{whole}");

    let out = kvh(&["evidence", dir.to_str().unwrap(), "--until", "2020-01-01"]);
    assert_eq!(out.status.code(), Some(0));
    let md = String::from_utf8_lossy(&out.stdout);
    let exceptions = md
        .split("## Exceptions")
        .nth(1)
        .and_then(|s| s.split("## ").next())
        .unwrap_or_default();
    assert!(
        !exceptions.contains("no security record in the verified chains"),
        "the verified chain holds 3 security records (outside the period):\n{exceptions}"
    );
}

/// The caller of a refused free is a tenant of the report: the record's own ids are the
/// owner's of the block it aimed at, its `caller_*` ids the caller's, and both tenants count.
#[test]
fn the_caller_of_a_refused_free_is_counted_among_the_tenants() {
    use kvhygiene::context::Context;
    use kvhygiene::events::{Event, EventKind, InvalidFreeReason};
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    let log = ForensicLog::open_with_secret(&cfg(&dir, 1 << 20), start(), None).unwrap();
    log.emit(Event {
        at: std::time::SystemTime::now(),
        kind: EventKind::InvalidFree {
            reason: InvalidFreeReason::DoubleFree,
            device: 0,
            caller: Context::new(Some("caller"), Some("req-c"), None).unwrap(),
        },
        context: Context::new(Some("owner"), Some("req-o"), None).unwrap(),
        block: None,
        addr: Some(0x1000),
    });
    log.stop();
    let v = evidence_json(&dir, &[]);
    assert_eq!(v["tenants"], 2, "{}", v["tenants"]);
}

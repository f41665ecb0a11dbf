//! `kvh tail-log`: every verified record passed on once, in order, across runs (`--state`),
//! and a log that stops verifying, goes back or vanishes reported as tampering.

mod forensic_common;
#[path = "skip/mod.rs"]
mod skip;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use forensic_common::{cfg, chain_files, event, forge_from, secret, start, write_log};
use kvhygiene::events::EventSink;
use kvhygiene::forensic::ForensicLog;
use serde_json::Value;

fn kvh() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kvh"));
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("KVH_")) {
        cmd.env_remove(k);
    }
    cmd
}

/// `kvh tail-log DIR --once ARGS...`.
fn tail_once(dir: &Path, args: &[&str]) -> Output {
    kvh()
        .arg("tail-log")
        .arg(dir)
        .arg("--once")
        .args(args)
        .output()
        .unwrap()
}

/// Exit status of `kvh verify-log DIR ARGS...`.
fn verify_log(dir: &Path, args: &[&str]) -> Option<i32> {
    kvh()
        .arg("verify-log")
        .arg(dir)
        .args(args)
        .output()
        .unwrap()
        .status
        .code()
}

/// The command exited 0 (its stderr shown when not).
fn assert_ok(out: &Output) {
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn stdout_lines(out: &Output) -> Vec<String> {
    String::from_utf8(out.stdout.clone())
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

/// A `--once` run passes on every record of the log: the chains appeared after the state
/// was saved, so they are passed on whole.
fn assert_passes_on_the_whole_log(k: &Keyed) {
    let out = tail_once(&k.dir, &k.args(&[]));
    assert_ok(&out);
    assert_eq!(
        stdout_lines(&out),
        log_lines(&k.dir),
        "the chain that appeared after the first run, whole"
    );
}

/// Every line of the chain files, in order.
fn log_lines(dir: &Path) -> Vec<String> {
    chain_files(dir)
        .iter()
        .flat_map(|f| forensic_common::read_lines(f))
        .collect()
}

struct Keyed {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    key: PathBuf,
    state: PathBuf,
}

fn keyed() -> Keyed {
    let tmp = tempfile::tempdir().unwrap();
    let key = tmp.path().join("hmac.key");
    std::fs::write(&key, &*secret()).unwrap();
    Keyed {
        dir: tmp.path().join("log"),
        state: tmp.path().join("tail.json"),
        key,
        _tmp: tmp,
    }
}

impl Keyed {
    /// `--key-file` and `extra`: the arguments of a `verify-log` of this log.
    fn keyed<'a>(&'a self, extra: &[&'a str]) -> Vec<&'a str> {
        let mut v = vec!["--key-file", self.key.to_str().unwrap()];
        v.extend_from_slice(extra);
        v
    }

    fn args<'a>(&'a self, extra: &[&'a str]) -> Vec<&'a str> {
        let mut v = vec![
            "--key-file",
            self.key.to_str().unwrap(),
            "--state",
            self.state.to_str().unwrap(),
        ];
        v.extend_from_slice(extra);
        v
    }
}

#[test]
fn each_record_is_passed_on_once_in_order_across_runs() {
    let k = keyed();
    // A running writer, in small files so that the records span rotations.
    let log = ForensicLog::open_with_secret(&cfg(&k.dir, 2048), start(), Some(secret())).unwrap();
    for i in 0..20 {
        log.emit(event(i));
    }
    log.flush();
    let out = tail_once(&k.dir, &k.args(&["--from-start"]));
    assert_ok(&out);
    let first = stdout_lines(&out);
    assert_eq!(first, log_lines(&k.dir), "every record, exactly as written");
    assert!(chain_files(&k.dir).len() > 1, "the records span files");

    for i in 20..45 {
        log.emit(event(i));
    }
    log.flush();
    let out = tail_once(&k.dir, &k.args(&[]));
    assert_eq!(out.status.code(), Some(0));
    let second = stdout_lines(&out);
    let events = second
        .iter()
        .filter(|l| l.contains("\"kind\":\"quarantine\""))
        .count();
    assert_eq!(
        events, 25,
        "the new events (with the rotations between them)"
    );
    let all: Vec<String> = first.iter().chain(&second).cloned().collect();
    assert_eq!(all, log_lines(&k.dir), "nothing twice, nothing missed");

    let out = tail_once(&k.dir, &k.args(&[]));
    assert_eq!(out.status.code(), Some(0));
    assert!(out.stdout.is_empty(), "nothing new: nothing passed on");
    log.stop();
    let out = tail_once(&k.dir, &k.args(&[]));
    let last = stdout_lines(&out);
    assert!(
        last.last().is_some_and(|l| l.contains("\"kind\":\"stop\"")),
        "{last:?}"
    );
}

#[test]
fn a_first_run_starts_at_the_end_and_a_new_chain_is_passed_on_whole() {
    let k = keyed();
    write_log(&cfg(&k.dir, 1 << 20), 5, true);
    let out = tail_once(&k.dir, &k.args(&[]));
    assert_eq!(out.status.code(), Some(0));
    assert!(
        out.stdout.is_empty(),
        "records already there are not passed on"
    );
    let before = log_lines(&k.dir);
    // A second process: a new chain, passed on from its first record.
    write_log(&cfg(&k.dir, 1 << 20), 3, true);
    let out = tail_once(&k.dir, &k.args(&[]));
    let lines = stdout_lines(&out);
    let now: Vec<String> = log_lines(&k.dir)
        .into_iter()
        .filter(|l| !before.contains(l))
        .collect();
    assert_eq!(lines.len(), 5, "start, 3 events, stop: {lines:?}");
    let mut sorted = lines.clone();
    sorted.sort();
    let mut expected = now;
    expected.sort();
    assert_eq!(sorted, expected);
}

/// The alert `v` gives a reason that says `why`.
fn says(v: &Value, why: &str) {
    let reason = v["reason"].as_str().unwrap_or_default();
    assert!(reason.contains(why), "{v}");
}

/// The alert line a tail writes when it stops on tampering.
fn alert(out: &Output) -> Value {
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines = stdout_lines(out);
    let v: Value = serde_json::from_str(lines.last().expect("an alert line")).unwrap();
    assert_eq!(v["kvh_tail_log"], "tampering", "{v}");
    v
}

#[test]
fn records_cut_off_a_rewritten_record_and_deleted_files_are_caught() {
    // Without a key or checkpoints, verify-log cannot tell any of these from a log that was
    // always so; the tail remembers what it passed on.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    let state = tmp.path().join("tail.json");
    let st = state.to_str().unwrap();
    write_log(&cfg(&dir, 1 << 20), 6, false);
    let out = tail_once(&dir, &["--state", st, "--from-start"]);
    assert_eq!(stdout_lines(&out).len(), 8);
    let file = chain_files(&dir).remove(0);
    let whole = std::fs::read(&file).unwrap();

    // The last three records cut off: the rest still verifies on its own.
    let lines = forensic_common::read_lines(&file);
    forensic_common::write_lines(&file, &lines[..5]);
    assert_eq!(verify_log(&dir, &[]), Some(0));
    let v = alert(&tail_once(&dir, &["--state", st]));
    says(&v, "went back from seq 7 to seq 4");

    // A record rewritten and the chain sealed again after it (no key to stop that).
    std::fs::write(&file, &whole).unwrap();
    forge_from(std::slice::from_ref(&file), 0, 3, None, |m| {
        m.insert("tenant_id".into(), "someone-else".into());
    });
    assert_eq!(verify_log(&dir, &[]), Some(0));
    let v = alert(&tail_once(&dir, &["--state", st]));
    says(&v, "rewritten");

    // The chain's files deleted.
    std::fs::remove_file(&file).unwrap();
    write_log(&cfg(&dir, 1 << 20), 1, false); // another chain, so the directory has a log
    let v = alert(&tail_once(&dir, &["--state", st]));
    says(&v, "its files are gone");
}

#[test]
fn a_log_that_stops_verifying_stops_the_tail_and_nothing_of_it_is_passed_on() {
    let k = keyed();
    write_log(&cfg(&k.dir, 1 << 20), 4, true);
    assert_eq!(tail_once(&k.dir, &k.args(&[])).status.code(), Some(0));
    let file = chain_files(&k.dir).remove(0);
    let text = std::fs::read_to_string(&file).unwrap();
    std::fs::write(&file, text.replacen("tenant-a", "tenant-b", 1)).unwrap();
    let out = tail_once(&k.dir, &k.args(&["--from-start"]));
    let v = alert(&out);
    says(&v, "no longer verifies");
    assert_eq!(stdout_lines(&out).len(), 1, "only the alert");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("TAMPERING"), "{err}");
}

#[test]
fn security_only_passes_on_the_exceptions() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    write_log(&cfg(&dir, 1 << 20), 4, false);
    let out = tail_once(&dir, &["--from-start", "--security-only"]);
    let lines = stdout_lines(&out);
    assert_eq!(
        lines.len(),
        4,
        "the four quarantines, not start and stop: {lines:?}"
    );
    assert!(lines.iter().all(|l| l.contains("\"kind\":\"quarantine\"")));
}

#[test]
fn the_tail_passes_on_records_as_they_are_written() {
    let k = keyed();
    let log =
        ForensicLog::open_with_secret(&cfg(&k.dir, 1 << 20), start(), Some(secret())).unwrap();
    log.emit(event(0));
    log.flush();
    let key = k.key.to_str().unwrap();
    let mut tail = spawn_tail(&k.dir, &["--key-file", key, "--interval", "1"]);
    // The first pass says it started at the end; records after it are passed on.
    let said = tail.said();
    assert!(said.contains("1 chains verified"), "{said}");
    for i in 1..4 {
        log.emit(event(i));
    }
    log.flush();
    let got = tail.lines_within(3, Duration::from_secs(30));
    let _ = tail.child.kill();
    let _ = tail.child.wait();
    assert_eq!(got.len(), 3, "{got:?}");
    let written = log_lines(&k.dir);
    assert_eq!(
        got,
        written[2..5].to_vec(),
        "the three records after the start"
    );
    log.stop();
}

#[test]
fn bad_arguments_and_a_bad_state_file_are_usage_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    write_log(&cfg(&dir, 1 << 20), 1, false);
    let out = tail_once(&dir, &["--json"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--json"));
    let out = tail_once(&dir, &["--interval", "0"]);
    assert_eq!(out.status.code(), Some(2));
    let state = tmp.path().join("state.json");
    std::fs::write(&state, "not json").unwrap();
    let out = tail_once(&dir, &["--state", state.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not a tail-log state file") && err.contains("state.json"),
        "{err}"
    );
    assert!(out.stdout.is_empty());
    // A key file named as the state by mistake: refused, quoting nothing of it (serde's own
    // message would quote the number a hex key's leading digits read as, or a JSON string
    // whole).
    for key in [
        "797094167e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495\n",
        "\"SECRETSECRET0123456789abcdef\"\n",
        "{\"chains\": {\"x\": \"SECRETSECRET0123\"}}\n",
    ] {
        std::fs::write(&state, key).unwrap();
        let out = tail_once(&dir, &["--state", state.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(2));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("not a tail-log state file"), "{err}");
        assert!(
            !err.contains("7970941") && !err.contains("SECRETSECRET"),
            "the state file was quoted: {err}"
        );
        assert!(out.stdout.is_empty());
    }
}

/// A chain whose files were deleted while its signed checkpoint stays is tampering evidence
/// (`verify-log` exits 1: the report's `errors`, not a chain's problem). The tail stops on it
/// as tampering (exit 1, the alert line), not as an unreadable directory it would try again
/// forever with nothing on stdout.
#[test]
fn tampering_evidence_outside_the_chains_stops_the_tail() {
    let k = keyed();
    let keys = tempfile::tempdir().unwrap();
    let (signer, public) = kvhygiene::forensic::cli::keygen(&keys.path().join("signer")).unwrap();
    let mut c = cfg(&k.dir, 1 << 20);
    c.signing_key_file = Some(signer);
    write_log(&c, 4, true);
    let public = public.to_str().unwrap().to_string();
    let out = tail_once(&k.dir, &k.args(&["--public-key", &public]));
    assert_ok(&out);
    // Every record file deleted; the checkpoint stays.
    for f in chain_files(&k.dir) {
        std::fs::remove_file(f).unwrap();
    }
    let keys = k.keyed(&["--public-key", &public]);
    assert_eq!(
        verify_log(&k.dir, &keys),
        Some(1),
        "verify-log calls it tampering"
    );
    let v = alert(&tail_once(&k.dir, &k.args(&["--public-key", &public])));
    assert!(v["reason"].as_str().is_some(), "{v}");
}

/// Records `prune-log` moved before the tail passed them on (a tail stopped for a while, a
/// scheduled `--once` job behind a nightly prune): the first record the tail then reads is
/// not the one after its position. It says which records went to the archive (a `gap`
/// line) and goes on from the first one left, rather than stalling on the chain.
#[test]
fn records_pruned_before_they_were_passed_on_are_named_as_a_gap() {
    let k = keyed();
    let archive = k._tmp.path().join("archive");
    std::fs::create_dir(&archive).unwrap();
    std::fs::set_permissions(
        &archive,
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();
    let log = ForensicLog::open_with_secret(&cfg(&k.dir, 4096), start(), Some(secret())).unwrap();
    log.emit(event(0));
    log.flush();
    let out = tail_once(&k.dir, &k.args(&["--from-start", "--allow-pruned"]));
    assert_ok(&out);
    // The tail is down; the writer goes on over many files, and the nightly prune runs.
    for i in 1..80 {
        log.emit(event(i));
    }
    log.flush();
    let pruned = kvh()
        .arg("prune-log")
        .arg(&k.dir)
        .args(["--archive-dir", archive.to_str().unwrap()])
        .args(["--older-than", "0", "--key-file", k.key.to_str().unwrap()])
        .output()
        .unwrap();
    assert_ok(&pruned);
    // The tail comes back, and the writer writes more.
    for i in 80..85 {
        log.emit(event(i));
    }
    log.flush();
    let out = tail_once(&k.dir, &k.args(&["--allow-pruned"]));
    assert_ok(&out);
    let lines = stdout_lines(&out);
    // First the gap, said; then every record left after it, the new ones among them.
    let gap: Value = serde_json::from_str(&lines[0]).unwrap();
    assert_eq!(gap["kvh_tail_log"], "gap", "{gap}");
    assert_eq!(
        gap["first_seq"], 2,
        "the record after the one passed on: {gap}"
    );
    let left = log_lines(&k.dir);
    assert_eq!(
        lines[1..],
        left[..],
        "every record still in the log directory"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("moved by prune-log"));
    // And nothing twice.
    let again = tail_once(&k.dir, &k.args(&["--allow-pruned"]));
    assert_eq!(again.status.code(), Some(0));
    assert!(again.stdout.is_empty());
    std::mem::forget(log);
}

/// A scheduled `--once --state` job whose first run finds no chain yet (a fresh deployment)
/// saves its state all the same: the next run is not a first run again (which would start
/// at the heads), so the chain that appeared in between is passed on whole.
#[test]
fn a_chain_appearing_after_a_first_run_on_an_empty_log_is_passed_on_whole() {
    let k = keyed();
    std::fs::create_dir(&k.dir).unwrap();
    std::fs::set_permissions(&k.dir, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let out = tail_once(&k.dir, &k.args(&[]));
    assert_ok(&out);
    write_log(&cfg(&k.dir, 1 << 20), 3, true);
    assert_passes_on_the_whole_log(&k);
}

/// The first pass without a state file puts each chain at its verified head, in the file the
/// verification found that head in, not the newest file listed: a writer that rotates after
/// the verification (here: its next file already created, still empty) would otherwise leave
/// the position past the records that follow it, and the chain would stall.
#[test]
fn the_first_position_is_the_file_of_the_verified_head() {
    let k = keyed();
    let log =
        ForensicLog::open_with_secret(&cfg(&k.dir, 1 << 20), start(), Some(secret())).unwrap();
    log.emit(event(0));
    log.flush();
    let file = chain_files(&k.dir).remove(0);
    let next = PathBuf::from(
        file.to_str()
            .unwrap()
            .replace("-000000.jsonl", "-000001.jsonl"),
    );
    {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&next)
            .unwrap();
    }
    let out = tail_once(&k.dir, &k.args(&[]));
    assert_ok(&out);
    let saved: Value = serde_json::from_slice(&std::fs::read(&k.state).unwrap()).unwrap();
    let pos = saved["chains"]
        .as_object()
        .unwrap()
        .values()
        .next()
        .unwrap()
        .clone();
    assert_eq!(pos["file"], 0, "{saved}");
    // The writer goes on in its file: the next run passes the new records on.
    std::fs::remove_file(&next).unwrap();
    for i in 1..4 {
        log.emit(event(i));
    }
    log.flush();
    let out = tail_once(&k.dir, &k.args(&[]));
    assert_eq!(
        stdout_lines(&out).len(),
        3,
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    log.stop();
}

/// A private archive directory beside the log, for `prune-log`.
fn archive_dir(k: &Keyed) -> PathBuf {
    let archive = k._tmp.path().join("archive");
    std::fs::create_dir(&archive).unwrap();
    std::fs::set_permissions(
        &archive,
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();
    archive
}

/// `kvh prune-log DIR --archive-dir ARCHIVE --older-than 0 --key-file KEY`, which must succeed.
fn prune_everything_it_may(k: &Keyed, archive: &Path) {
    let pruned = kvh()
        .arg("prune-log")
        .arg(&k.dir)
        .args(["--archive-dir", archive.to_str().unwrap()])
        .args(["--older-than", "0", "--key-file", k.key.to_str().unwrap()])
        .output()
        .unwrap();
    assert_ok(&pruned);
}

/// A chain the tail had not read yet when `prune-log` moved its first files (a scheduled
/// `--once --state` job behind a nightly prune, the chain begun between two runs; or a tail
/// started with `--from-start`): it is passed on "from its first record", and the records
/// that moved are named by a gap line, as for a chain the tail was already following, not
/// dropped from the shipped stream without a word.
#[test]
fn records_pruned_before_a_chain_was_first_read_are_named_as_a_gap() {
    let k = keyed();
    std::fs::create_dir(&k.dir).unwrap();
    std::fs::set_permissions(&k.dir, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let archive = archive_dir(&k);
    // The first run of the job: no chain yet, its state saved.
    let out = tail_once(&k.dir, &k.args(&["--allow-pruned"]));
    assert_ok(&out);
    // A process starts and writes many files; the nightly prune runs before the next run.
    let log = ForensicLog::open_with_secret(&cfg(&k.dir, 4096), start(), Some(secret())).unwrap();
    for i in 0..80 {
        log.emit(event(i));
    }
    log.flush();
    prune_everything_it_may(&k, &archive);
    let left = log_lines(&k.dir);
    let first_left: Value = serde_json::from_str(&left[0]).unwrap();
    let first_left = first_left["seq"].as_u64().unwrap();
    assert!(first_left > 0, "prune-log moved the chain's first files");

    let out = tail_once(&k.dir, &k.args(&["--allow-pruned"]));
    assert_ok(&out);
    let lines = stdout_lines(&out);
    let gap: Value = serde_json::from_str(&lines[0]).unwrap();
    assert_eq!(
        gap["kvh_tail_log"],
        "gap",
        "records 0 to {} were moved before they were passed on, and are not named: {}",
        first_left - 1,
        lines[0]
    );
    assert_eq!(
        (gap["first_seq"].as_u64(), gap["last_seq"].as_u64()),
        (Some(0), Some(first_left - 1))
    );
    assert_eq!(lines[1..], left[..]);
    std::mem::forget(log);
}

/// A chain the tail was following ends (`stop`), and `prune-log` moves it whole before the
/// tail's next pass. Its manifest accounts for it (`--allow-pruned`), so the tail does not
/// call it tampering; the records after the position (here 2 .. the `stop`), never passed on,
/// are named by a gap line, and the position moves to the chain's end.
#[test]
fn a_chain_pruned_whole_after_its_position_has_the_rest_named_as_a_gap() {
    let k = keyed();
    let archive = archive_dir(&k);
    let log = ForensicLog::open_with_secret(&cfg(&k.dir, 4096), start(), Some(secret())).unwrap();
    log.emit(event(0));
    log.flush();
    let out = tail_once(&k.dir, &k.args(&["--from-start", "--allow-pruned"]));
    assert_eq!(stdout_lines(&out).len(), 2, "start and the first event");
    let chain = log.stats().chain.clone().expect("a chain");
    // The tail is down; the process writes more, stops, and the nightly prune moves its
    // chain whole.
    for i in 1..40 {
        log.emit(event(i));
    }
    log.stop();
    let last: Value = serde_json::from_str(log_lines(&k.dir).last().unwrap()).unwrap();
    assert_eq!(last["kind"], "stop");
    let stop_seq = last["seq"].as_u64().unwrap();
    prune_everything_it_may(&k, &archive);
    assert!(chain_files(&k.dir).is_empty(), "the chain moved whole");
    // Another process writes meanwhile, so the log directory still holds records.
    write_log(&cfg(&k.dir, 1 << 20), 1, true);

    let out = tail_once(&k.dir, &k.args(&["--allow-pruned"]));
    assert_ok(&out);
    let gaps: Vec<Value> = stdout_lines(&out)
        .iter()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v["kvh_tail_log"] == "gap" && v["chain"] == chain.as_str())
        .collect();
    assert_eq!(
        gaps.len(),
        1,
        "records 2 to {stop_seq} of chain {chain} were moved before they were passed on, and \
         are not named: {:?}",
        stdout_lines(&out)
    );
    assert_eq!(
        (gaps[0]["first_seq"].as_u64(), gaps[0]["last_seq"].as_u64()),
        (Some(2), Some(stop_seq))
    );
    // The position moved to the chain's end: the next run names nothing again.
    let again = tail_once(&k.dir, &k.args(&["--allow-pruned"]));
    assert_eq!(again.status.code(), Some(0));
    assert!(
        !stdout_lines(&again).iter().any(|l| l.contains("\"gap\"")),
        "{:?}",
        stdout_lines(&again)
    );
}

/// A chain the tail passed on, rewritten without a key (which `verify-log` cannot tell from
/// a chain always so) with its files laid out anew: the record after the position is now in
/// an earlier file than the position's, so the first record the tail reads from its file is
/// not the next seq. No manifest accounts for the jump. A scheduled `--once --state` job (the
/// documented use of `--once`) reports it, at once or after the three passes the retry
/// allows (counted in the state, across runs), rather than exit 0 forever with nothing
/// passed on.
#[test]
fn a_seq_jump_without_a_manifest_is_reported_by_a_scheduled_once_job() {
    use kvhygiene::forensic::record::{self, Header};
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    let state = tmp.path().join("tail.json");
    let st = state.to_str().unwrap();
    write_log(&cfg(&dir, 2048), 20, false);
    let files = chain_files(&dir);
    assert!(files.len() >= 3, "the chain spans files");
    let out = tail_once(&dir, &["--state", st, "--from-start"]);
    assert_eq!(out.status.code(), Some(0));
    let passed = stdout_lines(&out).len() as u64;
    let last_file = files.len() - 1;

    // The forgery: every record but the rotates and the stop, ten events more, and the same
    // number of files, the later ones each a rotate and one event (the last with the stop).
    let mut body: Vec<serde_json::Map<String, Value>> = Vec::new();
    let mut rotate = None;
    for f in &files {
        for l in forensic_common::read_lines(f) {
            let Value::Object(m) = serde_json::from_str::<Value>(&l).unwrap() else {
                panic!()
            };
            match m["kind"].as_str().unwrap() {
                "rotate" => rotate = Some(m),
                "stop" => {}
                _ => body.push(m),
            }
        }
    }
    let stop: serde_json::Map<String, Value> =
        serde_json::from_str(log_lines(&dir).last().unwrap()).unwrap();
    let extra = body.last().unwrap().clone();
    for _ in 0..10 {
        body.push(extra.clone());
    }
    let rotate = rotate.unwrap();
    let mut layout: Vec<Vec<serde_json::Map<String, Value>>> = vec![Vec::new(); files.len()];
    let tail_events = body.split_off(body.len() - last_file);
    layout[0] = body;
    for (i, ev) in tail_events.into_iter().enumerate() {
        layout[i + 1] = vec![rotate.clone(), ev];
    }
    let chain = stop["chain"].as_str().unwrap().to_string();
    layout[last_file].push(stop);
    let mut prev = record::GENESIS_PREV;
    let mut seq = 0u64;
    for (index, records) in layout.into_iter().enumerate() {
        let mut lines = Vec::new();
        for mut m in records {
            if m["kind"] == "rotate" {
                let name = kvhygiene::forensic::files::file_name(&chain, index as u64 - 1);
                m.insert("prev_file".into(), name.into());
                m.insert("prev_seq".into(), (seq - 1).into());
            }
            let kind = m["kind"].as_str().unwrap().to_string();
            let h = Header {
                seq,
                ts: m["ts"].as_u64().unwrap(),
                kind: &kind,
                chain: &chain,
                epoch: index as u64,
                prev: &prev,
            };
            let sealed = record::seal(&h, m, None);
            prev = sealed.hash;
            lines.push(
                String::from_utf8(sealed.line)
                    .unwrap()
                    .trim_end()
                    .to_string(),
            );
            seq += 1;
        }
        forensic_common::write_lines(&files[index], &lines);
    }
    let verified = kvh().arg("verify-log").arg(&dir).output().unwrap();
    assert_eq!(
        verified.status.code(),
        Some(0),
        "the forgery verifies without a key: {}",
        String::from_utf8_lossy(&verified.stdout)
    );
    let first_in_last: Value =
        serde_json::from_str(&forensic_common::read_lines(&files[last_file])[0]).unwrap();
    assert!(
        first_in_last["seq"].as_u64().unwrap() > passed,
        "the record after the position ({passed}) is in an earlier file than the position's"
    );

    // The nightly job runs, three times (or more): the chain must be reported.
    let mut runs = Vec::new();
    for _ in 0..3 {
        let out = tail_once(&dir, &["--state", st]);
        let tampered = out.status.code() == Some(1);
        runs.push((out.status.code(), stdout_lines(&out)));
        if tampered {
            break;
        }
    }
    let (code, lines) = runs.last().unwrap();
    assert!(
        *code == Some(1) && lines.last().is_some_and(|l| l.contains("\"tampering\"")),
        "a chain rewritten after its position is never reported by --once runs (exit 0, \
         nothing passed on): {runs:?}"
    );
}

/// A pass that stops on tampering keeps what it already wrote: the records of the chains it
/// passed on before the tampered one are not passed on again by the next run.
#[test]
fn records_written_before_a_tampering_stop_are_not_passed_on_twice() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    let state = tmp.path().join("tail.json");
    let st = state.to_str().unwrap();
    // Two running writers: chain a (older, listed first) and chain b.
    let a = ForensicLog::open_with_secret(&cfg(&dir, 1 << 20), start(), None).unwrap();
    a.emit(event(0));
    a.flush();
    std::thread::sleep(Duration::from_millis(2));
    let b = ForensicLog::open_with_secret(&cfg(&dir, 1 << 20), start(), None).unwrap();
    b.emit(event(0));
    b.flush();
    assert_ok(&tail_once(&dir, &["--state", st, "--from-start"]));
    let files = chain_files(&dir);
    assert_eq!(files.len(), 2);
    // a writes more; b writes more, and someone re-seals b from its first event (no key
    // stops that): b no longer follows what was passed on.
    for i in 1..4 {
        a.emit(event(i));
        b.emit(event(i));
    }
    a.flush();
    b.flush();
    forge_from(std::slice::from_ref(&files[1]), 0, 2, None, |m| {
        m.insert("tenant_id".into(), "someone-else".into());
    });
    let first = tail_once(&dir, &["--state", st]);
    let v = alert(&first);
    says(&v, "rewritten");
    let written: Vec<String> = stdout_lines(&first)
        .into_iter()
        .filter(|l| !l.contains("kvh_tail_log"))
        .collect();
    assert_eq!(written.len(), 3, "chain a's three new records: {written:?}");
    let again = tail_once(&dir, &["--state", st]);
    alert(&again);
    let repeated: Vec<String> = stdout_lines(&again)
        .into_iter()
        .filter(|l| written.contains(l))
        .collect();
    assert!(repeated.is_empty(), "passed on twice: {repeated:?}");
    std::mem::forget(a);
    std::mem::forget(b);
}

/// A state file that cannot be written (its directory gone) is an error naming it, exit 2:
/// a tail that could not remember where it was would pass records on twice.
#[test]
fn a_state_file_that_cannot_be_written_is_a_usage_error() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    write_log(&cfg(&dir, 1 << 20), 1, false);
    let state = tmp.path().join("gone").join("tail.json");
    let out = tail_once(&dir, &["--state", state.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--state") && err.contains("tail.json"),
        "{err}"
    );
}

/// A running `kvh tail-log DIR ARGS...` whose stdout lines arrive on a channel.
struct Running {
    child: std::process::Child,
    stderr: BufReader<std::process::ChildStderr>,
    lines: std::sync::mpsc::Receiver<String>,
}

fn spawn_tail(dir: &Path, args: &[&str]) -> Running {
    let mut child = kvh()
        .arg("tail-log")
        .arg(dir)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let stdout = child.stdout.take().unwrap();
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if tx.send(line.unwrap()).is_err() {
                return;
            }
        }
    });
    Running {
        child,
        stderr,
        lines,
    }
}

impl Running {
    /// The next line the tail says on stderr.
    fn said(&mut self) -> String {
        let mut line = String::new();
        self.stderr.read_line(&mut line).unwrap();
        line
    }

    fn signal(&self, signal: i32) {
        let pid = i32::try_from(self.child.id()).unwrap();
        // SAFETY: kill(2) with the pid of a child this test spawned and has not waited for.
        assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
    }

    /// Exit status, within 30 s (the child is killed after that, and the test fails).
    fn exit_code(&mut self) -> Option<i32> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        panic!("the tail did not exit within 30 s");
    }

    /// The next `n` stdout lines, or those that came within `limit`.
    fn lines_within(&self, n: usize, limit: Duration) -> Vec<String> {
        let deadline = Instant::now() + limit;
        let mut got = Vec::new();
        while got.len() < n && Instant::now() < deadline {
            if let Ok(line) = self.lines.recv_timeout(Duration::from_millis(200)) {
                got.push(line);
            }
        }
        got
    }

    /// Every stdout line written, once stdout is closed.
    fn output(self) -> Vec<String> {
        self.lines.iter().collect()
    }
}

#[test]
fn sigterm_ends_the_tail_after_a_last_pass_over_what_was_written_until_then() {
    let k = keyed();
    let log =
        ForensicLog::open_with_secret(&cfg(&k.dir, 1 << 20), start(), Some(secret())).unwrap();
    log.emit(event(0));
    log.flush();
    // An hour between passes: only the signal can make the tail read again.
    let mut tail = spawn_tail(&k.dir, &k.args(&["--interval", "3600"]));
    let said = tail.said();
    assert!(said.contains("1 chains verified"), "{said}");
    for i in 1..4 {
        log.emit(event(i));
    }
    log.flush();
    tail.signal(libc::SIGTERM);
    assert_eq!(tail.exit_code(), Some(0), "a stopped tail exits 0");
    let written = log_lines(&k.dir);
    assert_eq!(
        tail.output(),
        written[2..5].to_vec(),
        "the records written before the signal"
    );
    // The position was saved: a restarted tail passes on only what came after.
    log.emit(event(4));
    log.flush();
    let out = tail_once(&k.dir, &k.args(&[]));
    assert_ok(&out);
    assert_eq!(stdout_lines(&out), log_lines(&k.dir)[5..6].to_vec());
    log.stop();
}

#[test]
fn a_tail_started_before_its_log_directory_passes_its_chains_on_whole() {
    let k = keyed();
    let mut tail = spawn_tail(&k.dir, &k.args(&["--interval", "1"]));
    let said = tail.said();
    assert!(said.contains("does not exist yet"), "{said}");
    assert!(
        k.state.is_file(),
        "the state is saved before the tail waits"
    );
    let log =
        ForensicLog::open_with_secret(&cfg(&k.dir, 1 << 20), start(), Some(secret())).unwrap();
    for i in 0..3 {
        log.emit(event(i));
    }
    log.flush();
    // Every record from the chain's first, though the first pass found them already written.
    let written = log_lines(&k.dir);
    let got = tail.lines_within(written.len(), Duration::from_secs(30));
    assert_eq!(got, written, "the chain whole, from its start record");
    tail.signal(libc::SIGINT);
    assert_eq!(tail.exit_code(), Some(0));
    log.stop();
}

#[test]
fn a_tail_stopped_while_waiting_for_its_directory_exits_0_and_remembers_it_started_first() {
    let k = keyed();
    let mut tail = spawn_tail(&k.dir, &k.args(&["--interval", "3600"]));
    let said = tail.said();
    assert!(said.contains("does not exist yet"), "{said}");
    tail.signal(libc::SIGTERM);
    assert_eq!(tail.exit_code(), Some(0));
    assert!(tail.output().is_empty());
    // The state says the tail started before the directory existed: the next run passes
    // the chains on whole, from their start records.
    let log =
        ForensicLog::open_with_secret(&cfg(&k.dir, 1 << 20), start(), Some(secret())).unwrap();
    log.emit(event(0));
    log.stop();
    assert_passes_on_the_whole_log(&k);
}

#[test]
fn a_directory_gone_after_chains_were_passed_on_is_tampering_not_waited_for() {
    let k = keyed();
    let log =
        ForensicLog::open_with_secret(&cfg(&k.dir, 1 << 20), start(), Some(secret())).unwrap();
    log.emit(event(0));
    log.stop();
    assert_ok(&tail_once(&k.dir, &k.args(&[])));
    std::fs::rename(&k.dir, k.dir.with_extension("moved")).unwrap();
    let mut tail = spawn_tail(&k.dir, &k.args(&["--interval", "3600"]));
    assert_eq!(tail.exit_code(), Some(1), "{}", tail.said());
    let out = tail.output();
    assert!(
        out.iter()
            .any(|l| l.contains("\"tampering\"") && l.contains("is gone")),
        "{out:?}"
    );
    // Once too.
    let once = tail_once(&k.dir, &k.args(&[]));
    assert_eq!(once.status.code(), Some(1));
    assert_eq!(alert(&once)["kvh_tail_log"], "tampering");
}

/// A scheduled `--once --state` job whose first run comes before the server created the log
/// directory (a fresh deployment, where the directory is created at the first allocation) is
/// a run on a log with no chain yet: the chains the directory then receives are new, and the
/// next run passes them on whole, from their first records, as a tail waiting for the
/// directory would.
#[test]
fn a_once_job_run_before_its_log_directory_exists_passes_its_chains_on_whole() {
    let k = keyed();
    let _ = tail_once(&k.dir, &k.args(&[]));
    let log =
        ForensicLog::open_with_secret(&cfg(&k.dir, 1 << 20), start(), Some(secret())).unwrap();
    for i in 0..3 {
        log.emit(event(i));
    }
    log.stop();
    assert_passes_on_the_whole_log(&k);
}

/// Arguments no pass could use (here a key file that does not exist) are a usage error when
/// the tail starts, also when the log directory does not exist yet: the tail does not wait
/// for the directory with them, nor write the state file that says it has started (which a
/// start-up probe takes as the tail being in place).
#[test]
fn bad_arguments_are_a_usage_error_before_the_wait_for_the_log_directory() {
    let k = keyed();
    let missing = k.key.with_file_name("missing.key");
    let mut tail = spawn_tail(
        &k.dir,
        &[
            "--key-file",
            missing.to_str().unwrap(),
            "--state",
            k.state.to_str().unwrap(),
            "--interval",
            "1",
        ],
    );
    assert_eq!(tail.exit_code(), Some(2), "{}", tail.said());
    assert!(
        !k.state.exists(),
        "the state file says the tail started, with a key file it cannot read"
    );
}

/// The log directory removed (or renamed) under a running tail, after its chains were passed
/// on: every chain passed on is gone from the directory, which is tampering as a chain whose
/// files are gone is. The tail stops with exit status 1 after the alert line, within a few
/// passes, rather than retrying for ever without a word on stdout.
#[test]
fn a_log_directory_removed_under_a_running_tail_stops_it_as_tampering() {
    let k = keyed();
    write_log(&cfg(&k.dir, 1 << 20), 3, true);
    let mut tail = spawn_tail(&k.dir, &k.args(&["--interval", "1"]));
    let said = tail.said();
    assert!(said.contains("1 chains verified"), "{said}");
    std::fs::remove_dir_all(&k.dir).unwrap();
    assert_eq!(
        tail.exit_code(),
        Some(1),
        "a tail whose log directory was removed did not stop as on tampering"
    );
    let lines = tail.output();
    let v: Value = serde_json::from_str(lines.last().expect("an alert line")).unwrap();
    assert_eq!(v["kvh_tail_log"], "tampering", "{v}");
}

/// A first run (no state file, so starting at the heads) that stops on tampering has passed
/// nothing on and established no position: the next run, once the log verifies (here with
/// the right key, the first run having been given another), is still a run from the heads,
/// and does not pass on every record that was already in the log.
#[test]
fn a_first_run_stopped_by_tampering_leaves_the_next_run_starting_at_the_heads() {
    let k = keyed();
    write_log(&cfg(&k.dir, 1 << 20), 4, true);
    let other = k.key.with_file_name("other.key");
    std::fs::write(&other, b"another-secret-of-enough-length-0123").unwrap();
    let st = k.state.to_str().unwrap();
    let first = tail_once(
        &k.dir,
        &["--key-file", other.to_str().unwrap(), "--state", st],
    );
    let v = alert(&first);
    says(&v, "no longer verifies");
    let next = tail_once(&k.dir, &k.args(&[]));
    assert_ok(&next);
    assert_eq!(
        stdout_lines(&next).len(),
        0,
        "the records already in the log at the first run are passed on"
    );
}

/// A chain that lost exactly the last record passed on (its `stop`) went back: without a key
/// or checkpoints it verifies on its own, and the tail's position catches it.
#[test]
fn a_chain_cut_by_its_last_passed_on_record_is_caught() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    let state = tmp.path().join("tail.json");
    let st = state.to_str().unwrap();
    write_log(&cfg(&dir, 1 << 20), 6, false);
    let out = tail_once(&dir, &["--state", st, "--from-start"]);
    assert_eq!(stdout_lines(&out).len(), 8);
    let file = chain_files(&dir).remove(0);
    let lines = forensic_common::read_lines(&file);
    forensic_common::write_lines(&file, &lines[..7]);
    assert_eq!(verify_log(&dir, &[]), Some(0));
    let v = alert(&tail_once(&dir, &["--state", st]));
    says(&v, "went back from seq 7 to seq 6");
}

/// Evidence of tampering that names no chain of the directory (the checkpoint of a chain
/// whose files were all deleted) stops a first run before anything is passed on, as
/// `verify-log` exits 1 on it.
#[test]
fn a_checkpoint_of_a_deleted_chain_stops_a_first_run() {
    let k = keyed();
    let keys = tempfile::tempdir().unwrap();
    let (signer, public) = kvhygiene::forensic::cli::keygen(&keys.path().join("signer")).unwrap();
    let mut c = cfg(&k.dir, 1 << 20);
    c.signing_key_file = Some(signer);
    write_log(&c, 4, true);
    let first = chain_files(&k.dir);
    std::thread::sleep(std::time::Duration::from_millis(5));
    write_log(&c, 4, true);
    let second: Vec<PathBuf> = chain_files(&k.dir)
        .into_iter()
        .filter(|f| !first.contains(f))
        .collect();
    assert!(!second.is_empty());
    for f in second {
        std::fs::remove_file(f).unwrap();
    }
    let public = public.to_str().unwrap().to_string();
    let out = tail_once(&k.dir, &k.args(&["--from-start", "--public-key", &public]));
    let v = alert(&out);
    says(&v, "no longer verifies");
    assert_eq!(stdout_lines(&out).len(), 1, "only the alert");
}

/// Scheduled `--once` runs on a log nobody writes to: each verifies, passes on nothing and
/// exits 0, however many there are.
#[test]
fn once_runs_over_a_log_that_does_not_grow_pass_on_nothing_and_exit_0() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    write_log(&cfg(&dir, 1 << 20), 5, false);
    let state = tmp.path().join("tail.json");
    let state_arg = ["--state", state.to_str().unwrap()];
    let first = tail_once(&dir, &[&["--from-start"][..], &state_arg[..]].concat());
    assert_ok(&first);
    assert_eq!(stdout_lines(&first), log_lines(&dir));
    for run in 0..5 {
        let out = tail_once(&dir, &state_arg);
        assert_ok(&out);
        assert!(
            stdout_lines(&out).is_empty(),
            "run {run}: {:?}",
            stdout_lines(&out)
        );
    }
}

/// The count of passes whose bytes did not hash to the verified head (kept in the state file
/// across `--once` runs) is per run of such passes: a pass that reads the chain as verified
/// clears it, so reads that raced a writer now and then never add up to a tampering report.
#[test]
fn a_pass_that_reads_a_chain_as_verified_clears_its_count_of_mismatched_reads() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    let log = ForensicLog::open_with_secret(&cfg(&dir, 1 << 20), start(), None).unwrap();
    log.emit(event(0));
    log.flush();
    let state = tmp.path().join("tail.json");
    let state_arg = ["--state", state.to_str().unwrap()];
    assert_ok(&tail_once(
        &dir,
        &[&["--from-start"][..], &state_arg[..]].concat(),
    ));
    let mut saved: Value = serde_json::from_slice(&std::fs::read(&state).unwrap()).unwrap();
    let chain = first_chain_of(&saved);
    // Two passes in a row read bytes other than those verified (a writer racing them).
    saved["stalls"] = serde_json::json!({ chain.clone(): 2 });
    std::fs::write(&state, serde_json::to_vec(&saved).unwrap()).unwrap();
    log.emit(event(1));
    log.flush();
    let out = tail_once(&dir, &state_arg);
    assert_ok(&out);
    assert_eq!(stdout_lines(&out).len(), 1, "{:?}", stdout_lines(&out));
    let saved: Value = serde_json::from_slice(&std::fs::read(&state).unwrap()).unwrap();
    assert!(
        saved.get("stalls").is_none_or(|s| s.get(&chain).is_none()),
        "{saved}"
    );
    log.stop();
}

/// A state file remembers which log directory its positions are in. Given with another log
/// directory (a scheduled job's arguments mixed up), it is a usage error (exit 2) that names
/// both directories, not tampering (exit 1, an alert line for the SIEM) over chains that
/// were never in that directory; the state file is left as it was.
#[test]
fn a_state_file_of_another_log_directory_is_a_usage_error_not_tampering() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    write_log(&cfg(&a, 1 << 20), 2, false);
    write_log(&cfg(&b, 1 << 20), 2, false);
    let state = tmp.path().join("tail.json");
    let st = state.to_str().unwrap();
    assert_ok(&tail_once(&a, &["--state", st, "--from-start"]));
    let saved = std::fs::read(&state).unwrap();
    let out = tail_once(&b, &["--state", st]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(out.stdout.is_empty(), "no alert line");
    assert!(
        err.contains(&std::fs::canonicalize(&a).unwrap().display().to_string())
            && err.contains(b.to_str().unwrap()),
        "{err}"
    );
    assert_eq!(
        std::fs::read(&state).unwrap(),
        saved,
        "the state file is untouched"
    );
    // Its own directory still goes on from the state.
    assert_ok(&tail_once(&a, &["--state", st]));
    // A state file of an earlier version (no directory in it) is taken as it is.
    let mut old: Value = serde_json::from_slice(&saved).unwrap();
    old.as_object_mut().unwrap().remove("log_dir");
    std::fs::write(&state, serde_json::to_vec(&old).unwrap()).unwrap();
    assert_ok(&tail_once(&a, &["--state", st]));
}

/// A state file saved before its log directory existed names the directory as it was given.
/// The same directory given later in another spelling (without the trailing slash) is its
/// own directory, not another one: the run goes on from the state (exit 0), it is not
/// refused as "the positions of another log directory".
#[test]
fn a_state_saved_before_the_directory_existed_accepts_the_same_directory_spelled_otherwise() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    let state = tmp.path().join("tail.json");
    let st = state.to_str().unwrap();
    let with_slash = PathBuf::from(format!("{}/", dir.display()));
    // A scheduled run before the writers created the directory.
    assert_ok(&tail_once(&with_slash, &["--state", st]));
    write_log(&cfg(&dir, 1 << 20), 2, false);
    let out = tail_once(&dir, &["--state", st]);
    assert_ok(&out);
    assert_eq!(stdout_lines(&out), log_lines(&dir), "passed on whole");
}

/// A state file saved before its log directory existed names the path it was awaited at:
/// given later with another directory (that one existing, with chains), it is refused
/// (exit 2) as one naming an existing directory is, nothing passed on and the state file
/// untouched; its own directory, once created, is passed on whole.
#[test]
fn a_state_saved_before_the_directory_existed_is_refused_with_another_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let (awaited, other) = (tmp.path().join("not-yet"), tmp.path().join("other"));
    write_log(&cfg(&other, 1 << 20), 2, false);
    let state = tmp.path().join("tail.json");
    let st = state.to_str().unwrap();
    assert_ok(&tail_once(&awaited, &["--state", st]));
    let saved = std::fs::read(&state).unwrap();
    let out = tail_once(&other, &["--state", st]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        out.stdout.is_empty(),
        "passed on another directory's records"
    );
    assert!(
        err.contains(awaited.to_str().unwrap()) && err.contains(other.to_str().unwrap()),
        "{err}"
    );
    assert_eq!(
        std::fs::read(&state).unwrap(),
        saved,
        "the state file changed"
    );
    write_log(&cfg(&awaited, 1 << 20), 2, false);
    let out = tail_once(&awaited, &["--state", st]);
    assert_ok(&out);
    assert_eq!(stdout_lines(&out), log_lines(&awaited), "passed on whole");
}

/// While its directory is still missing, a state file saved for it takes the same directory
/// in any spelling: through a symlinked parent or the real one, with `..` past a directory
/// that does not exist either (each run: exit 0, nothing passed on).
#[test]
fn a_state_saved_before_the_directory_existed_accepts_its_other_spellings_meanwhile() {
    let tmp = tempfile::tempdir().unwrap();
    let real = tmp.path().join("real");
    std::fs::create_dir(&real).unwrap();
    let link = tmp.path().join("link");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let state = tmp.path().join("tail.json");
    let st = state.to_str().unwrap();
    assert_ok(&tail_once(&link.join("logs"), &["--state", st]));
    for spelling in [
        real.join("logs"),
        real.join("not-there").join("..").join("logs"),
        link.join(".").join("logs"),
    ] {
        let out = tail_once(&spelling, &["--state", st]);
        assert_ok(&out);
        assert!(out.stdout.is_empty(), "{spelling:?}");
    }
}

/// A state file given with another existing log directory is refused (exit 2) whatever the
/// bytes of its directory's name: a name that is not UTF-8 is still the name of a directory
/// that exists, and the chains of the state are not reported gone (exit 1) from a directory
/// they were never in.
#[test]
fn a_state_file_of_a_directory_with_a_non_utf8_name_is_refused_for_another_directory() {
    use std::os::unix::ffi::OsStrExt;
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join(std::ffi::OsStr::from_bytes(b"log-\xff"));
    let b = tmp.path().join("b");
    write_log(&cfg(&a, 1 << 20), 2, false);
    write_log(&cfg(&b, 1 << 20), 2, false);
    let state = tmp.path().join("tail.json");
    let st = state.to_str().unwrap();
    assert_ok(&tail_once(&a, &["--state", st, "--from-start"]));
    let out = tail_once(&b, &["--state", st]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "stdout: {} stderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The state file's log directory reached at another path that is the same directory (a
/// bind mount, as a volume mounted at another path in another container) is its own
/// directory: the run goes on from the state (exit 0), it is not refused as "another log
/// directory". Skipped where bind mounts cannot be made.
#[test]
fn a_state_file_accepts_its_log_directory_reached_through_a_bind_mount() {
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    let other = tmp.path().join("mnt");
    std::fs::create_dir(&other).unwrap();
    write_log(&cfg(&dir, 1 << 20), 2, false);
    let mounted = Command::new("mount")
        .arg("--bind")
        .arg(&dir)
        .arg(&other)
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        skip::skipped("mount --bind is not available here");
        return;
    }
    let _guard = Unmount(other.clone());
    let state = tmp.path().join("tail.json");
    let st = state.to_str().unwrap();
    assert_ok(&tail_once(&dir, &["--state", st, "--from-start"]));
    let out = tail_once(&other, &["--state", st]);
    assert_ok(&out);
    assert!(out.stdout.is_empty(), "nothing new to pass on");
}

/// A state file saved by a run given its log directory as a relative path still names that
/// directory when the next run starts in another working directory: given there with
/// another existing log directory, while its own still exists, it is refused (exit 2, no
/// alert line), not read as every chain of its own directory deleted (exit 1, tampering).
#[test]
fn a_state_file_saved_with_a_relative_log_directory_is_refused_from_another_working_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    write_log(&cfg(&a, 1 << 20), 2, false);
    write_log(&cfg(&b, 1 << 20), 2, false);
    let state = tmp.path().join("tail.json");
    let st = state.to_str().unwrap();
    // The scheduled job: `cd <tmp> && kvh tail-log a --once --state <abs>`.
    let first = kvh()
        .current_dir(tmp.path())
        .args(["tail-log", "a", "--once", "--from-start", "--state", st])
        .output()
        .unwrap();
    assert_ok(&first);
    let saved = std::fs::read(&state).unwrap();
    // The same state file given with the other log directory, from another directory.
    let elsewhere = tmp.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    let out = kvh()
        .current_dir(&elsewhere)
        .arg("tail-log")
        .arg(&b)
        .args(["--once", "--state", st])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(2),
        "a state file of log directory a given with b: stdout {:?}, stderr: {err}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(out.stdout.is_empty(), "no alert line");
    assert_eq!(
        std::fs::read(&state).unwrap(),
        saved,
        "the state file is untouched"
    );
}

/// A state file given with a log directory that does not exist (a mistyped path), while the
/// directory the state names still exists with its chains: that is the state of another
/// directory, refused as a usage error (exit 2) naming both, as for another existing
/// directory. No chain was ever passed on from the mistyped path, so it is not tampering
/// (exit 1 and an alert line for the SIEM saying the directory "is gone").
#[test]
fn a_state_file_given_with_a_mistyped_missing_log_directory_is_a_usage_error_not_tampering() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    write_log(&cfg(&a, 1 << 20), 2, false);
    let state = tmp.path().join("tail.json");
    let st = state.to_str().unwrap();
    assert_ok(&tail_once(&a, &["--state", st, "--from-start"]));
    let typo = tmp.path().join("a-typo");
    let out = tail_once(&typo, &["--state", st]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        out.stdout.is_empty(),
        "no alert line: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    // Its own directory still goes on from the state.
    assert_ok(&tail_once(&a, &["--state", st]));
}

/// A `--state` file in an append-only directory (`chattr +a`), with records to pass on
/// (`--from-start`): the state can never be saved there, so the tail refuses the directory
/// before it passes any record on. Records written to stdout whose positions were not saved
/// are passed on again by the next run. Nothing is left in the directory (a temporary file
/// there could not be removed). Skipped where `chattr` is missing.
#[test]
fn a_state_file_in_an_append_only_directory_is_refused_before_any_record_is_passed_on() {
    let k = keyed();
    write_log(&cfg(&k.dir, 4096), 5, true);
    let states = k.state.with_file_name("states");
    std::fs::create_dir(&states).unwrap();
    let marked = Command::new("chattr")
        .arg("+a")
        .arg(&states)
        .status()
        .is_ok_and(|s| s.success());
    if !marked {
        skip::skipped("chattr +a is not available here");
        return;
    }
    let state = states.join("tail.json");
    let args = k.keyed(&["--state", state.to_str().unwrap(), "--from-start"]);
    let first = tail_once(&k.dir, &args);
    let second = tail_once(&k.dir, &args);
    let left: Vec<_> = std::fs::read_dir(&states).unwrap().collect();
    let _ = Command::new("chattr").arg("-a").arg(&states).status();
    let err = String::from_utf8_lossy(&first.stderr);
    assert_eq!(first.status.code(), Some(2), "{err}");
    assert!(err.contains("append-only"), "{err}");
    assert!(left.is_empty(), "left in the directory: {left:?}");
    assert!(
        first.stdout.is_empty(),
        "{} records passed on by a tail that then could not save its state; the next run \
         passed on {} again:\n{err}",
        stdout_lines(&first).len(),
        stdout_lines(&second).len()
    );
}

/// A `--state` file whose directory does not exist: the state cannot be saved, so the tail
/// refuses it before it passes any record on (else the next run passes them on again).
#[test]
fn a_state_file_in_a_missing_directory_is_refused_before_any_record_is_passed_on() {
    let k = keyed();
    write_log(&cfg(&k.dir, 4096), 5, true);
    let state = k.state.with_file_name("missing").join("tail.json");
    let args = k.keyed(&["--state", state.to_str().unwrap(), "--from-start"]);
    let first = tail_once(&k.dir, &args);
    let err = String::from_utf8_lossy(&first.stderr);
    assert_eq!(first.status.code(), Some(2), "{err}");
    assert!(
        first.stdout.is_empty(),
        "{} records passed on by a tail that then could not save its state:\n{err}",
        stdout_lines(&first).len()
    );
}

/// A `--state` that names a directory or a FIFO is refused (exit 2, naming it) before
/// anything is passed on, and without its lock file made beside it: a refused argument leaves
/// nothing behind.
#[test]
fn a_state_that_is_a_directory_or_a_fifo_is_refused_without_a_lock_file_left() {
    use std::os::unix::ffi::OsStrExt;
    let k = keyed();
    write_log(&cfg(&k.dir, 4096), 5, true);
    let directory = k.state.with_file_name("a-directory");
    std::fs::create_dir(&directory).unwrap();
    let fifo = k.state.with_file_name("a-fifo");
    let name = std::ffi::CString::new(fifo.as_os_str().as_bytes()).unwrap();
    // SAFETY: a NUL-terminated path that lives across the call.
    assert_eq!(unsafe { libc::mkfifo(name.as_ptr(), 0o600) }, 0);
    for state in [directory, fifo] {
        let args = k.keyed(&["--state", state.to_str().unwrap(), "--from-start"]);
        let first = tail_once(&k.dir, &args);
        let err = String::from_utf8_lossy(&first.stderr);
        assert_eq!(first.status.code(), Some(2), "{err}");
        assert!(
            err.contains(&format!("{}: not a regular file", state.display())),
            "{err}"
        );
        assert!(first.stdout.is_empty(), "records passed on:\n{err}");
        let mut lock = state.clone().into_os_string();
        lock.push(".lock");
        assert!(
            !PathBuf::from(lock).exists(),
            "a lock file was made for a refused --state"
        );
    }
}

/// Takes the immutable mark (`chattr -i`) off a file when dropped.
struct Immutable(PathBuf);

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = Command::new("chattr").arg("-i").arg(&self.0).status();
    }
}

/// A `--state` file of an earlier run marked immutable (`chattr +i`), in a directory that is
/// not marked: the state is installed by a rename over that file, which the mark refuses, so
/// the state can never be saved. As for an append-only directory, the tail refuses it before
/// it passes any record on; otherwise the records written since the earlier run are passed on
/// by every run again (skipped where `chattr` is missing).
#[test]
fn an_immutable_state_file_is_refused_before_any_record_is_passed_on() {
    let k = keyed();
    write_log(&cfg(&k.dir, 4096), 5, true);
    assert_ok(&tail_once(&k.dir, &k.args(&["--from-start"])));
    let marked = Command::new("chattr")
        .arg("+i")
        .arg(&k.state)
        .status()
        .is_ok_and(|s| s.success());
    if !marked {
        skip::skipped("chattr +i is not available here");
        return;
    }
    let _unmark = Immutable(k.state.clone());
    // Records written since the first run: a new chain.
    write_log(&cfg(&k.dir, 4096), 5, true);
    let second = tail_once(&k.dir, &k.args(&[]));
    let third = tail_once(&k.dir, &k.args(&[]));
    let err = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(2), "{err}");
    assert!(
        second.stdout.is_empty(),
        "{} records passed on by a tail that then could not save its state; the next run \
         passed on {} again:\n{err}",
        stdout_lines(&second).len(),
        stdout_lines(&third).len()
    );
}

/// A `--state` file in a directory the tail's user cannot write (root's 0755 directory, the
/// tail running as nobody): the state cannot be saved there, so the tail refuses it before it
/// passes any record on, as it does for a missing or append-only directory (skipped unless
/// run as root, which is needed to run the tail as another user).
#[test]
fn a_state_file_in_a_directory_the_user_cannot_write_is_refused_before_any_record_is_passed_on() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        skip::skipped("needs root to run the tail as nobody");
        return;
    }
    let k = keyed();
    write_log(&cfg(&k.dir, 4096), 5, true);
    let top = k.dir.parent().unwrap().to_path_buf();
    let chowned = Command::new("chown")
        .arg("-R")
        .arg("65534:65534")
        .arg(&top)
        .status()
        .is_ok_and(|s| s.success());
    assert!(chowned, "chown of the test's directory");
    let states = top.join("states");
    std::fs::create_dir(&states).unwrap();
    std::fs::set_permissions(&states, std::fs::Permissions::from_mode(0o755)).unwrap();
    let state = states.join("tail.json");
    let mut cmd = kvh();
    cmd.arg("tail-log").arg(&k.dir).arg("--once").args([
        "--key-file",
        k.key.to_str().unwrap(),
        "--state",
        state.to_str().unwrap(),
        "--from-start",
    ]);
    // SAFETY: only async-signal-safe calls (setgroups, setgid, setuid) between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(65534) != 0
                || libc::setuid(65534) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd.stdin(Stdio::null()).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        out.stdout.is_empty(),
        "{} records passed on by a tail that then could not save its state:\n{err}",
        stdout_lines(&out).len()
    );
}

/// A keyed writer of `dir` (files of 1 MiB) that wrote its start and one event.
fn writing(dir: &Path) -> std::sync::Arc<ForensicLog> {
    let log = ForensicLog::open_with_secret(&cfg(dir, 1 << 20), start(), Some(secret())).unwrap();
    log.emit(event(0));
    log.flush();
    log
}

/// `log` writes the events `ids`, and flushes.
fn emit(log: &ForensicLog, ids: std::ops::Range<u64>) {
    for i in ids {
        log.emit(event(i));
    }
    log.flush();
}

/// A running tail passing every second whose whole verifications are an hour apart: every
/// pass after the first reads only what was appended. Returned once its first pass said what
/// it verified (`said`, when it starts from the heads) and how far apart the next whole
/// verifications are.
fn spawn_between_whole(dir: &Path, args: &[&str], said: Option<&str>) -> Running {
    let mut all = vec!["--interval", "1", "--verify-every", "3600"];
    all.extend_from_slice(args);
    let mut tail = spawn_tail(dir, &all);
    if let Some(expected) = said {
        let line = tail.said();
        assert!(line.contains(expected), "{line}");
    }
    let line = tail.said();
    assert!(
        line.contains("verified whole again every 3600.0 s"),
        "{line}"
    );
    tail
}

/// The first stdout line of a running tail, within `secs` seconds, which must be a tampering
/// alert (`why`: what was done to the log); the tail is killed.
fn first_line_is_tampering(tail: &mut Running, secs: u64, why: &str) -> Value {
    let got = tail.lines_within(1, Duration::from_secs(secs));
    let _ = tail.child.kill();
    let line = got
        .first()
        .unwrap_or_else(|| panic!("no line within {secs} s: {why}"));
    let first: Value = serde_json::from_str(line).unwrap();
    assert_eq!(first["kvh_tail_log"], "tampering", "{why}: {first}");
    first
}

/// The chain whose first file (index 0) is `file`.
fn chain_of_first_file(file: &Path) -> String {
    let name = file.file_name().unwrap().to_str().unwrap();
    let chain = name
        .strip_prefix("kvh-")
        .and_then(|n| n.rsplit_once('-'))
        .map(|(c, _)| c.to_string())
        .unwrap();
    assert_eq!(kvhygiene::forensic::files::file_name(&chain, 0), name);
    chain
}

/// Exit status and stdout of `kvh verify-log DIR ARGS...`.
/// `kvh verify-log DIR ARGS` finds the log tampered (exit 1), for `reason` when given.
fn rejected_by_verify_log(dir: &Path, args: &[&str], reason: Option<&str>) {
    let (code, report) = verify_report(dir, args);
    assert_eq!(code, Some(1), "{report}");
    if let Some(reason) = reason {
        assert!(
            report.contains(reason),
            "a whole verification does not reject the log for {reason:?}: {report}"
        );
    }
}

fn verify_report(dir: &Path, args: &[&str]) -> (Option<i32>, String) {
    let out = kvh()
        .arg("verify-log")
        .arg(dir)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// The alert a running tail ends with: exit 1, the alert its last stdout line.
fn running_alert(mut tail: Running) -> Value {
    assert_eq!(tail.exit_code(), Some(1), "the tail stops on tampering");
    let lines = tail.output();
    let v: Value = serde_json::from_str(lines.last().expect("an alert line")).unwrap();
    assert_eq!(v["kvh_tail_log"], "tampering", "{v}");
    v
}

/// Replaces the first `from` in `file` with `to`.
fn rewrite(file: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(file).unwrap();
    assert!(text.contains(from), "{from} in {}", file.display());
    std::fs::write(file, text.replacen(from, to, 1)).unwrap();
}

#[test]
fn between_whole_verifications_the_records_appended_are_passed_on_across_rotations() {
    let k = keyed();
    let log = ForensicLog::open_with_secret(&cfg(&k.dir, 2048), start(), Some(secret())).unwrap();
    log.emit(event(0));
    log.flush();
    let mut tail = spawn_between_whole(&k.dir, &k.args(&[]), Some("1 chains verified"));
    let before = log_lines(&k.dir).len();
    emit(&log, 1..30);
    let written = log_lines(&k.dir)[before..].to_vec();
    assert!(chain_files(&k.dir).len() > 2, "the records span rotations");
    let got = tail.lines_within(written.len(), Duration::from_secs(30));
    assert_eq!(got, written, "every record appended, exactly as written");

    // A record passed on long ago, in a file no longer read, changed: found only by the
    // next whole verification, not by the passes that read what is appended.
    rewrite(&chain_files(&k.dir)[0], "req-0", "req-X");
    let before = log_lines(&k.dir).len();
    emit(&log, 30..33);
    let written = log_lines(&k.dir)[before..].to_vec();
    let got = tail.lines_within(written.len(), Duration::from_secs(30));
    assert_eq!(got, written);
    tail.signal(libc::SIGTERM);
    assert_eq!(tail.exit_code(), Some(0));
    let v = alert(&tail_once(&k.dir, &k.args(&[])));
    says(&v, "no longer verifies");
    log.stop();
}

#[test]
fn between_whole_verifications_a_record_that_does_not_follow_is_judged_at_once() {
    let k = keyed();
    let log = writing(&k.dir);
    let tail = spawn_between_whole(&k.dir, &k.args(&[]), Some("1 chains verified"));
    // The newest record written again after itself: its seq does not follow.
    let file = chain_files(&k.dir).pop().unwrap();
    let last = forensic_common::read_lines(&file).pop().unwrap();
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&file)
        .unwrap();
    std::io::Write::write_all(&mut f, format!("{last}\n").as_bytes()).unwrap();
    let v = running_alert(tail);
    says(&v, "no longer verifies");
    log.stop();
}

#[test]
fn between_whole_verifications_records_cut_off_the_end_are_caught_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    write_log(&cfg(&dir, 1 << 20), 6, false);
    let tail = spawn_between_whole(&dir, &["--from-start"], None);
    assert_eq!(tail.lines_within(8, Duration::from_secs(30)).len(), 8);
    let file = chain_files(&dir).remove(0);
    let lines = forensic_common::read_lines(&file);
    forensic_common::write_lines(&file, &lines[..5]);
    let v = running_alert(tail);
    says(&v, "went back from seq 7 to seq 4");
}

#[test]
fn between_whole_verifications_a_new_chain_is_passed_on_whole() {
    let k = keyed();
    write_log(&cfg(&k.dir, 1 << 20), 2, true);
    let mut tail = spawn_between_whole(&k.dir, &k.args(&[]), Some("1 chains verified"));
    let before = log_lines(&k.dir);
    write_log(&cfg(&k.dir, 1 << 20), 3, true);
    let new: Vec<String> = log_lines(&k.dir)
        .into_iter()
        .filter(|l| !before.contains(l))
        .collect();
    assert_eq!(new.len(), 5, "start, 3 events, stop");
    let got = tail.lines_within(new.len(), Duration::from_secs(30));
    tail.signal(libc::SIGTERM);
    assert_eq!(tail.exit_code(), Some(0));
    assert_eq!(got, new);
}

#[test]
fn on_a_small_log_every_pass_verifies_the_whole_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    write_log(&cfg(&dir, 1 << 20), 4, false);
    let mut tail = spawn_tail(&dir, &["--interval", "1"]);
    let said = tail.said();
    assert!(said.contains("1 chains verified"), "{said}");
    // A record already there when the tail started, never passed on: only a verification
    // of the whole directory reads it.
    rewrite(&chain_files(&dir)[0], "req-1", "req-X");
    let v = running_alert(tail);
    says(&v, "no longer verifies");
}

#[test]
fn verify_every_brings_the_next_whole_verification_after_that_many_seconds() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    write_log(&cfg(&dir, 1 << 20), 4, false);
    let mut tail = spawn_tail(&dir, &["--interval", "1", "--verify-every", "3"]);
    let said = tail.said();
    assert!(said.contains("1 chains verified"), "{said}");
    let said = tail.said();
    assert!(said.contains("verified whole again every 3.0 s"), "{said}");
    let started = Instant::now();
    rewrite(&chain_files(&dir)[0], "req-1", "req-X");
    let v = running_alert(tail);
    says(&v, "no longer verifies");
    assert!(started.elapsed() < Duration::from_secs(25));
}

/// The signed checkpoint files (`*.ckpt`) of `dir`.
fn checkpoint_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "ckpt"))
        .collect();
    v.sort();
    v
}

/// The chain ids a state file holds positions for.
fn state_chains(state: &Path) -> Vec<String> {
    let saved: Value = serde_json::from_slice(&std::fs::read(state).unwrap()).unwrap();
    saved["chains"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect()
}

/// A signing writer's chain made in a staging directory, of which the log directory `k.dir`
/// (created here) is first shown only the first records, with the checkpoint then signed:
/// its start and one event.
struct Staged {
    keys: tempfile::TempDir,
    /// The public key files of the writer's signing key.
    public: String,
    log: std::sync::Arc<ForensicLog>,
    /// The chain's file in the staging directory, and its copy in the log directory.
    file: PathBuf,
    in_log: PathBuf,
    /// The chain's checkpoint file in the staging directory, and its copy in the log
    /// directory.
    ckpt: PathBuf,
    ckpt_in_log: PathBuf,
    /// The lines shown.
    early: Vec<String>,
}

fn staged(k: &Keyed) -> Staged {
    use std::os::unix::fs::PermissionsExt;
    let keys = tempfile::tempdir().unwrap();
    let (signer, public) = kvhygiene::forensic::cli::keygen(&keys.path().join("signer")).unwrap();
    let staging = keys.path().join("staging");
    let mut c = cfg(&staging, 1 << 20);
    c.signing_key_file = Some(signer);
    let log = ForensicLog::open_with_secret(&c, start(), Some(secret())).unwrap();
    log.emit(event(0));
    log.flush();
    let file = chain_files(&staging).remove(0);
    let ckpt = checkpoint_files(&staging).remove(0);
    let early = forensic_common::read_lines(&file);
    std::fs::create_dir(&k.dir).unwrap();
    std::fs::set_permissions(&k.dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    let in_log = k.dir.join(file.file_name().unwrap());
    let ckpt_in_log = k.dir.join(ckpt.file_name().unwrap());
    forensic_common::write_lines(&in_log, &early);
    std::fs::copy(&ckpt, &ckpt_in_log).unwrap();
    Staged {
        public: public.to_str().unwrap().to_string(),
        keys,
        log,
        file,
        in_log,
        ckpt,
        ckpt_in_log,
        early,
    }
}

impl Staged {
    /// The records of the staged chain after those shown, the first changed and every one
    /// after it sealed again with the secret (what its holder, without the signing key, can
    /// write).
    fn forged_rest(&self) -> Vec<String> {
        let copy = self.keys.path().join(self.file.file_name().unwrap());
        std::fs::copy(&self.file, &copy).unwrap();
        forge_from(
            std::slice::from_ref(&copy),
            0,
            self.early.len() + 1,
            Some(kvhygiene::forensic::keys::EpochKey::from_secret(secret()).unwrap()),
            |m| {
                m.insert("request_id".into(), "req-forged".into());
            },
        );
        forensic_common::read_lines(&copy)[self.early.len()..].to_vec()
    }

    /// Appends `lines` to the chain's file in the log directory, in one write.
    fn append(&self, lines: &[String]) {
        let mut appended = lines.join("\n");
        appended.push('\n');
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.in_log)
            .unwrap();
        std::io::Write::write_all(&mut f, appended.as_bytes()).unwrap();
    }
}

/// Records appended after the position that differ from the chain's signed checkpoint (what
/// the holder of the HMAC secret, without the signing key, can write) are rejected by a whole
/// verification as new records ("record differs from the signed checkpoint"). A pass between
/// whole verifications holds them to what `verify-log`'s walk holds them to: it passes none
/// of them on, and the tail stops on them as tampering.
#[test]
fn between_whole_verifications_records_at_odds_with_the_signed_checkpoint_are_not_passed_on() {
    let k = keyed();
    let st = staged(&k);
    for i in 1..4 {
        st.log.emit(event(i));
    }
    st.log.stop();
    let public = st.public.as_str();
    let mut tail = spawn_between_whole(
        &k.dir,
        &k.args(&["--public-key", public]),
        Some("1 chains verified"),
    );

    // The rest of the chain forged; the checkpoint the writer signed at its stop.
    let forged = st.forged_rest();
    let staged_ckpt = st.keys.path().join("ckpt.tmp");
    std::fs::copy(&st.ckpt, &staged_ckpt).unwrap();
    std::fs::rename(&staged_ckpt, &st.ckpt_in_log).unwrap();
    st.append(&forged);
    let whole = k.keyed(&["--public-key", public]);
    rejected_by_verify_log(
        &k.dir,
        &whole,
        Some("record differs from the signed checkpoint"),
    );

    first_line_is_tampering(
        &mut tail,
        10,
        "a record a whole verification rejects was passed on",
    );
}

/// A chain `prune-log` moved whole leaves only its prune manifest in the log directory. With
/// the manifest deleted too, the chain is gone: a pass between whole verifications, which
/// finds a chain new or gone at the pass that meets it, stops the tail as tampering (as a
/// whole verification does: "its files are gone") before passing on anything after it.
#[test]
fn between_whole_verifications_a_chain_moved_whole_whose_manifest_is_deleted_is_caught() {
    let k = keyed();
    let archive = archive_dir(&k);
    // A chain that ended, moved whole by the nightly prune.
    write_log(&cfg(&k.dir, 1 << 20), 2, true);
    prune_everything_it_may(&k, &archive);
    assert!(chain_files(&k.dir).is_empty(), "the chain moved whole");
    let manifest: PathBuf = std::fs::read_dir(&k.dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_str().unwrap().ends_with(".pruned.json"))
        .expect("its prune manifest");
    // A process writing now.
    let log = writing(&k.dir);
    let mut tail = spawn_between_whole(
        &k.dir,
        &k.args(&["--allow-pruned"]),
        Some("2 chains verified"),
    );

    std::fs::remove_file(&manifest).unwrap();
    emit(&log, 1..4);
    let first = first_line_is_tampering(
        &mut tail,
        10,
        "the chain moved whole is gone, yet the tail went on",
    );
    says(&first, "gone");
    log.stop();
}

/// A chain counted as read other than verified (a pass that raced a prune, say), then moved
/// whole by `prune-log`: its count cannot clear by a reading any more, and must not make every
/// pass a whole verification. Between whole verifications the passes read only what was
/// appended (an older record changed is left to the next whole verification, as for
/// `between_whole_verifications_the_records_appended_are_passed_on_across_rotations`).
#[test]
fn a_count_of_mismatched_reads_of_a_chain_moved_whole_leaves_the_passes_between_whole_ones() {
    let k = keyed();
    let archive = archive_dir(&k);
    // A chain that ended, and a process writing now.
    write_log(&cfg(&k.dir, 1 << 20), 2, true);
    let log = writing(&k.dir);
    let live = log.stats().chain.clone().expect("a chain");
    assert_ok(&tail_once(
        &k.dir,
        &k.args(&["--from-start", "--allow-pruned"]),
    ));
    let ended = state_chains(&k.state)
        .into_iter()
        .find(|c| *c != live)
        .expect("the chain that ended");
    // The last pass read the ended chain's bytes as other than verified.
    let mut saved: Value = serde_json::from_slice(&std::fs::read(&k.state).unwrap()).unwrap();
    saved["stalls"] = serde_json::json!({ ended.clone(): 1 });
    std::fs::write(&k.state, serde_json::to_vec(&saved).unwrap()).unwrap();
    prune_everything_it_may(&k, &archive);
    assert_eq!(chain_files(&k.dir).len(), 1, "the ended chain moved whole");

    let mut tail = spawn_between_whole(&k.dir, &k.args(&["--allow-pruned"]), None);
    rewrite(&chain_files(&k.dir)[0], "req-0", "req-X");
    let before = log_lines(&k.dir).len();
    emit(&log, 1..4);
    let written = log_lines(&k.dir)[before..].to_vec();
    let got = tail.lines_within(written.len(), Duration::from_secs(10));
    let _ = tail.child.kill();
    assert_eq!(
        got, written,
        "a pass between whole verifications passes on what was appended"
    );
    log.stop();
}

/// Nothing may follow a chain's `stop` record, not even bytes of a line (`verify-log`: "bytes
/// after the chain's stop record"). Bytes appended to a stopped chain are found at the pass
/// that meets them, between whole verifications too: the tail stops as tampering before
/// passing on anything after them.
#[test]
fn between_whole_verifications_bytes_after_a_stop_record_are_caught_at_once() {
    let k = keyed();
    // A chain that ended, and a process writing now.
    write_log(&cfg(&k.dir, 1 << 20), 2, true);
    let ended = chain_files(&k.dir).remove(0);
    let log = writing(&k.dir);
    let mut tail = spawn_between_whole(&k.dir, &k.args(&[]), Some("2 chains verified"));

    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&ended)
        .unwrap();
    std::io::Write::write_all(&mut f, b"{\"v\":1,").unwrap();
    drop(f);
    assert_eq!(
        verify_log(&k.dir, &["--key-file", k.key.to_str().unwrap()]),
        Some(1),
        "verify-log rejects bytes after a stop record"
    );
    emit(&log, 1..4);
    first_line_is_tampering(
        &mut tail,
        10,
        "bytes after a stop record, yet the tail went on",
    );
    log.stop();
}

/// A signed checkpoint must be signed by the key the chain's own records name (`verify-log`:
/// "checkpoint re-signed with another key"). Whoever holds the HMAC secret and a retired
/// signing key the verifiers still pin can append records and sign a checkpoint over them:
/// a whole verification rejects them, and so does a pass between whole verifications, which
/// holds new records to the chain's signed checkpoint: nothing of them is passed on, the tail
/// stops as tampering.
#[test]
fn between_whole_verifications_a_checkpoint_signed_by_another_pinned_key_is_caught() {
    use kvhygiene::forensic::checkpoint;
    use std::os::unix::fs::PermissionsExt;
    let k = keyed();
    let st = staged(&k);
    let (retired, retired_pub) =
        kvhygiene::forensic::cli::keygen(&st.keys.path().join("retired")).unwrap();
    let retired_pub = retired_pub.to_str().unwrap().to_string();
    emit(&st.log, 1..4);
    let both = [
        "--public-key",
        st.public.as_str(),
        "--public-key",
        retired_pub.as_str(),
    ];
    let mut tail = spawn_between_whole(&k.dir, &k.args(&both), Some("1 chains verified"));

    // The rest of the chain forged; a checkpoint over its last record, signed with the
    // retired key.
    let forged = st.forged_rest();
    let head: Value = serde_json::from_str(forged.last().unwrap()).unwrap();
    let mut c = checkpoint::peek(&st.ckpt).unwrap().unwrap();
    c.seq = head["seq"].as_u64().unwrap();
    c.hash = kvhygiene::forensic::record::parse_hash(head["hash"].as_str().unwrap()).unwrap();
    let forger = st.keys.path().join("forger");
    std::fs::create_dir(&forger).unwrap();
    std::fs::set_permissions(&forger, std::fs::Permissions::from_mode(0o700)).unwrap();
    let retired = kvhygiene::forensic::keys::read_signing_key(&retired).unwrap();
    checkpoint::write(&forger, &retired, &c).unwrap();
    std::fs::rename(checkpoint_files(&forger).remove(0), &st.ckpt_in_log).unwrap();
    st.append(&forged);
    let mut whole = vec!["--key-file", k.key.to_str().unwrap()];
    whole.extend_from_slice(&both);
    rejected_by_verify_log(&k.dir, &whole, Some("re-signed with another key"));

    first_line_is_tampering(
        &mut tail,
        10,
        "a record a whole verification rejects was passed on",
    );
    st.log.stop();
}

/// A chain's files follow each other by index: a file after a gap (rotated files missing)
/// fails a whole verification ("file index jumps"), also when that file is empty. A pass
/// between whole verifications, which holds new records to the walk `verify-log` makes
/// (index continuity of files included), finds it at the pass that meets it: the tail
/// stops as tampering before passing on anything written after it.
#[test]
fn between_whole_verifications_an_empty_file_after_a_gap_is_caught() {
    let k = keyed();
    let log = writing(&k.dir);
    let chain = log.stats().chain.clone().expect("a chain");
    let mut tail = spawn_between_whole(&k.dir, &k.args(&[]), Some("1 chains verified"));

    let planted = k.dir.join(kvhygiene::forensic::files::file_name(&chain, 2));
    std::fs::write(&planted, b"").unwrap();
    std::fs::set_permissions(
        &planted,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    rejected_by_verify_log(
        &k.dir,
        &["--key-file", k.key.to_str().unwrap()],
        Some("file index jumps"),
    );
    emit(&log, 1..4);
    first_line_is_tampering(
        &mut tail,
        10,
        "the log no longer verifies, yet the tail went on",
    );
    log.stop();
}

/// A stopped chain's only file renamed to file index `index` under a tail between whole
/// verifications: the chain's first files are then missing ("chain starts at file index
/// ..."), which `verify-log` rejects, and the record passed on is no longer in its file. The
/// tail stops as tampering at the pass that meets it, without ratcheting its key towards the
/// planted index (the verifier and the whole passes ratchet only to an index they checked).
fn a_first_file_renamed_to_another_index_is_caught(index: u64) {
    let k = keyed();
    write_log(&cfg(&k.dir, 1 << 20), 2, true);
    let file = chain_files(&k.dir).remove(0);
    let chain = chain_of_first_file(&file);
    let mut tail = spawn_between_whole(&k.dir, &k.args(&[]), Some("1 chains verified"));
    let renamed = k
        .dir
        .join(kvhygiene::forensic::files::file_name(&chain, index));
    std::fs::rename(&file, &renamed).unwrap();
    assert_eq!(
        verify_log(&k.dir, &["--key-file", k.key.to_str().unwrap()]),
        Some(1),
        "verify-log rejects a chain whose first files are missing"
    );
    let why = format!("the chain's file renamed to index {index}");
    first_line_is_tampering(&mut tail, 20, &why);
}

#[test]
fn between_whole_verifications_the_record_passed_on_found_in_another_file_is_caught() {
    a_first_file_renamed_to_another_index_is_caught(3);
}

#[test]
fn between_whole_verifications_a_file_renamed_to_a_far_index_does_not_hang_the_tail() {
    a_first_file_renamed_to_another_index_is_caught(1 << 40);
}

/// A chain `prune-log` moved whole keeps its signed checkpoint in the log directory; with a
/// pinned public key a whole verification holds the moved chain to it ("no checkpoint for
/// chain ... signed by the pinned public key" once it is deleted). A checkpoint missing under
/// a pinned signer brings a whole pass between whole verifications too: the tail stops as
/// tampering before passing on anything written after the deletion.
#[test]
fn between_whole_verifications_the_checkpoint_of_a_chain_moved_whole_deleted_is_caught() {
    let k = keyed();
    let archive = archive_dir(&k);
    let keys = tempfile::tempdir().unwrap();
    let (signer, public) = kvhygiene::forensic::cli::keygen(&keys.path().join("signer")).unwrap();
    let public = public.to_str().unwrap().to_string();
    let mut c = cfg(&k.dir, 1 << 20);
    c.signing_key_file = Some(signer);
    // A chain that ended, moved whole by the nightly prune.
    write_log(&c, 2, true);
    let ended_ckpt = checkpoint_files(&k.dir).remove(0);
    prune_everything_it_may(&k, &archive);
    assert!(chain_files(&k.dir).is_empty(), "the chain moved whole");
    assert!(ended_ckpt.exists(), "its checkpoint stays");
    // A process writing now.
    let log = ForensicLog::open_with_secret(&c, start(), Some(secret())).unwrap();
    log.emit(event(0));
    log.flush();
    let mut tail = spawn_between_whole(
        &k.dir,
        &k.args(&["--allow-pruned", "--public-key", &public]),
        Some("2 chains verified"),
    );

    std::fs::remove_file(&ended_ckpt).unwrap();
    let whole = k.keyed(&["--allow-pruned", "--public-key", &public]);
    assert_eq!(
        verify_log(&k.dir, &whole),
        Some(1),
        "verify-log rejects a chain moved whole whose checkpoint is deleted"
    );
    emit(&log, 1..4);
    first_line_is_tampering(
        &mut tail,
        10,
        "the checkpoint of a chain moved whole is gone, yet the tail went on",
    );
    log.stop();
}

/// A chain whose writer died before its `start` record leaves its first file with no record
/// (a whole verification accepts it alone). A second file of that chain planted beside it
/// makes the first an empty rotated file, which a whole verification rejects ("empty rotated
/// file"). A pass between whole verifications, which brings a whole pass for an empty file
/// before the newest, finds it at the pass that meets it: the tail stops as tampering before
/// passing on anything written after it.
#[test]
fn between_whole_verifications_a_file_planted_beside_a_chain_without_records_is_caught() {
    use std::os::unix::fs::PermissionsExt;
    let k = keyed();
    let log = writing(&k.dir);
    let dead = "p999999-t1";
    let first = k.dir.join(kvhygiene::forensic::files::file_name(dead, 0));
    std::fs::write(&first, b"").unwrap();
    std::fs::set_permissions(&first, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(
        verify_log(&k.dir, &["--key-file", k.key.to_str().unwrap()]),
        Some(0),
        "a chain that never started verifies"
    );
    let mut tail = spawn_between_whole(&k.dir, &k.args(&[]), Some("chains verified"));

    let planted = k.dir.join(kvhygiene::forensic::files::file_name(dead, 1));
    std::fs::write(&planted, b"").unwrap();
    std::fs::set_permissions(&planted, std::fs::Permissions::from_mode(0o600)).unwrap();
    rejected_by_verify_log(&k.dir, &["--key-file", k.key.to_str().unwrap()], None);
    emit(&log, 1..4);
    first_line_is_tampering(
        &mut tail,
        10,
        "the log no longer verifies, yet the tail went on",
    );
    log.stop();
}

/// A chain whose writer had not yet written its `start` record (its first file alone, without
/// a complete line) verifies without a checkpoint. Its signed checkpoint appearing beside it
/// while the file still holds no record is what a whole verification rejects ("chain ends at
/// no record but the signed checkpoint covers seq ..."): the records it covers were cut. The
/// tail stops on it at the pass that meets it, before passing on anything written after it.
#[test]
fn between_whole_verifications_a_checkpoint_of_a_chain_without_records_is_caught() {
    use std::os::unix::fs::PermissionsExt;
    let k = keyed();
    let keys = tempfile::tempdir().unwrap();
    let (signer, public) = kvhygiene::forensic::cli::keygen(&keys.path().join("signer")).unwrap();
    let public = public.to_str().unwrap().to_string();
    // A chain that wrote its start, one event and its checkpoint (in a staging directory).
    let staging = keys.path().join("staging");
    let mut c = cfg(&staging, 1 << 20);
    c.signing_key_file = Some(signer.clone());
    let other = ForensicLog::open_with_secret(&c, start(), Some(secret())).unwrap();
    other.emit(event(0));
    other.flush();
    let file = chain_files(&staging).remove(0);
    let ckpt = checkpoint_files(&staging).remove(0);
    // The log: a signing writer, and that chain's first file without a record.
    let mut c = cfg(&k.dir, 1 << 20);
    c.signing_key_file = Some(signer);
    let log = ForensicLog::open_with_secret(&c, start(), Some(secret())).unwrap();
    log.emit(event(0));
    log.flush();
    let cut = k.dir.join(file.file_name().unwrap());
    std::fs::write(&cut, b"").unwrap();
    std::fs::set_permissions(&cut, std::fs::Permissions::from_mode(0o600)).unwrap();
    let whole = k.keyed(&["--public-key", &public]);
    assert_eq!(
        verify_log(&k.dir, &whole),
        Some(0),
        "a chain not yet started"
    );
    let mut tail = spawn_between_whole(
        &k.dir,
        &k.args(&["--public-key", &public]),
        Some("chains verified"),
    );

    let ckpt_in_log = k.dir.join(ckpt.file_name().unwrap());
    std::fs::copy(&ckpt, &ckpt_in_log).unwrap();
    std::fs::set_permissions(&ckpt_in_log, std::fs::Permissions::from_mode(0o600)).unwrap();
    rejected_by_verify_log(&k.dir, &whole, None);
    emit(&log, 1..4);
    first_line_is_tampering(
        &mut tail,
        10,
        "the signed checkpoint of a chain without records appeared, yet the tail went on",
    );
    log.stop();
    other.stop();
}

/// A prune manifest of a chain the log has no file of, and that no chain passed on had, is
/// what a whole verification rejects (without `--allow-pruned`: every file of that chain is
/// missing; with it, a manifest that accounts for nothing). A chain new to the tail, moved
/// whole or not: the tail stops on it at the pass that meets it, before passing on anything
/// written after it.
#[test]
fn between_whole_verifications_a_manifest_of_an_unknown_chain_is_caught() {
    use std::os::unix::fs::PermissionsExt;
    let k = keyed();
    let log = writing(&k.dir);
    let mut tail = spawn_between_whole(&k.dir, &k.args(&[]), Some("1 chains verified"));

    let planted = kvhygiene::forensic::prune::manifest_path(&k.dir, "p999999-t1");
    std::fs::write(&planted, b"{}\n").unwrap();
    std::fs::set_permissions(&planted, std::fs::Permissions::from_mode(0o600)).unwrap();
    rejected_by_verify_log(&k.dir, &["--key-file", k.key.to_str().unwrap()], None);
    emit(&log, 1..4);
    first_line_is_tampering(
        &mut tail,
        10,
        "a manifest of a chain the log never had appeared, yet the tail went on",
    );
    log.stop();
}

/// A prune manifest that accounts for nothing (not a manifest) appearing beside a chain that
/// ended, whose files are all still there, is what a whole verification with
/// `--allow-pruned` rejects. The chain is not being written: the tail stops on it at the pass
/// that meets it, before passing on anything written after it.
#[test]
fn between_whole_verifications_a_manifest_of_an_ended_chain_is_caught() {
    use std::os::unix::fs::PermissionsExt;
    let k = keyed();
    write_log(&cfg(&k.dir, 1 << 20), 2, true);
    let ended = chain_of_first_file(&chain_files(&k.dir)[0]);
    let log = writing(&k.dir);
    let mut tail = spawn_between_whole(
        &k.dir,
        &k.args(&["--allow-pruned"]),
        Some("2 chains verified"),
    );

    let planted = kvhygiene::forensic::prune::manifest_path(&k.dir, &ended);
    std::fs::write(&planted, b"{}\n").unwrap();
    std::fs::set_permissions(&planted, std::fs::Permissions::from_mode(0o600)).unwrap();
    rejected_by_verify_log(
        &k.dir,
        &["--key-file", k.key.to_str().unwrap(), "--allow-pruned"],
        None,
    );
    emit(&log, 1..4);
    first_line_is_tampering(
        &mut tail,
        10,
        "the ended chain's manifest is not a manifest, yet the tail went on",
    );
    log.stop();
}

/// A chain's first file without a record is excused from a checkpoint under a pinned signer
/// only while it could be a torn `start` record (64 KiB at most), as a whole verification
/// holds it. One that grows past that between two whole verifications no longer verifies:
/// the pass that meets it judges it, before anything written after it is passed on.
#[test]
fn between_whole_verifications_a_first_file_without_a_record_grown_past_a_start_record_is_caught() {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let k = keyed();
    let keys = tempfile::tempdir().unwrap();
    let (signer, public) = kvhygiene::forensic::cli::keygen(&keys.path().join("signer")).unwrap();
    let public = public.to_str().unwrap();
    let mut c = cfg(&k.dir, 1 << 20);
    c.signing_key_file = Some(signer);
    let log = ForensicLog::open_with_secret(&c, start(), Some(secret())).unwrap();
    emit(&log, 0..1);
    // What a writer that died in its `start` record leaves: file 0, a few torn bytes.
    let unstarted = k.dir.join("kvh-p4242-t1700000000000000000-000000.jsonl");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&unstarted)
        .unwrap();
    f.write_all(b"{\"chain\":\"p4242-t1700000000000000000\",\"config_dig")
        .unwrap();
    let mut tail = spawn_between_whole(
        &k.dir,
        &k.args(&["--public-key", public]),
        Some("1 chains verified"),
    );
    // Grown past the size of a torn `start` record, still without a newline.
    f.write_all(&vec![b'x'; 64 * 1024]).unwrap();
    drop(f);
    rejected_by_verify_log(
        &k.dir,
        &k.keyed(&["--public-key", public]),
        Some("no checkpoint for chain p4242-t1700000000000000000"),
    );
    emit(&log, 1..4);
    first_line_is_tampering(
        &mut tail,
        10,
        "a first file without a record grew past 64 KiB without a checkpoint, yet the tail went on",
    );
    log.stop();
}

/// The id of the first chain a saved `--state` holds a position of.
fn first_chain_of(saved: &Value) -> String {
    saved["chains"]
        .as_object()
        .unwrap()
        .keys()
        .next()
        .unwrap()
        .clone()
}

/// The `--state` file of a log of one chain, passed on whole by a first run, with the
/// chain's position set to `seq` and a `hash` that is not a hash (a corrupted state file),
/// and the output of a `--once` run with it.
fn run_with_corrupt_state_hash(seq: Option<u64>) -> (PathBuf, Output, tempfile::TempDir) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    write_log(&cfg(&dir, 1 << 20), 3, false);
    let state = tmp.path().join("tail.json");
    let st = state.to_str().unwrap();
    assert_ok(&tail_once(&dir, &["--state", st, "--from-start"]));
    let mut saved: Value = serde_json::from_slice(&std::fs::read(&state).unwrap()).unwrap();
    let chain = first_chain_of(&saved);
    saved["chains"][&chain]["hash"] = "not-a-hash".into();
    if let Some(seq) = seq {
        saved["chains"][&chain]["seq"] = seq.into();
    }
    std::fs::write(&state, serde_json::to_vec(&saved).unwrap()).unwrap();
    let out = tail_once(&dir, &["--state", st]);
    (state, out, tmp)
}

/// A state file whose position holds a hash that is not one (64 hex digits) is not a state
/// the tail wrote: it is a usage error (exit 2) naming the state file, not tampering of the
/// log (exit 1 and an alert line for the SIEM), whether or not the chain grew since.
#[test]
fn a_state_position_whose_hash_is_not_a_hash_is_a_usage_error_not_tampering() {
    // The position at the chain's head (nothing written since).
    let (state, out, _tmp) = run_with_corrupt_state_hash(None);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        out.stdout.is_empty(),
        "no alert line: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(err.contains(state.to_str().unwrap()), "{err}");
}

/// The same corrupted position below the chain's head: the error names the state file, so
/// that the operator knows which file to fix or remove.
#[test]
fn a_state_position_whose_hash_is_not_a_hash_is_an_error_naming_the_state_file() {
    let (state, out, _tmp) = run_with_corrupt_state_hash(Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains(state.to_str().unwrap()), "{err}");
}

/// Bytes without a newline appended after a crashed chain's last record (by someone with
/// write access to the log directory) are a torn tail to the verifier, which measures a line
/// longer than it holds (64 MiB) without holding it. The tail reads the files as the verifier
/// does: its memory stays bounded by that line limit, not by the planted bytes.
#[test]
fn bytes_planted_after_a_crashed_chain_s_end_are_read_in_bounded_memory() {
    use std::io::Write;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    write_log(&cfg(&dir, 1 << 20), 3, false);
    let newest = chain_files(&dir).pop().unwrap();
    let text = std::fs::read_to_string(&newest).unwrap();
    let without_stop = text.trim_end().rsplit_once('\n').unwrap().0.to_string() + "\n";
    assert!(text[without_stop.len()..].contains("\"kind\":\"stop\""));
    let mut f = std::fs::File::create(&newest).unwrap();
    f.write_all(without_stop.as_bytes()).unwrap();
    const PLANTED: usize = 160 << 20;
    let chunk = vec![b'x'; 1 << 20];
    for _ in 0..PLANTED >> 20 {
        f.write_all(&chunk).unwrap();
    }
    drop(f);
    // Reaped by wait4 below, which also reports its peak memory.
    #[allow(clippy::zombie_processes)]
    let child = kvh()
        .arg("tail-log")
        .arg(&dir)
        .args(["--once", "--from-start"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value for wait4 to fill.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `pid` is this test's child, not yet waited for (`child` is never waited on);
    // `status` and `usage` are valid for writes.
    let waited = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(waited, pid, "{}", std::io::Error::last_os_error());
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "tail-log did not pass the crashed chain on (wait status {status})"
    );
    let peak_mib = usage.ru_maxrss / 1024;
    assert!(
        peak_mib < 128,
        "tail-log held {peak_mib} MiB reading a file with {} MiB planted after its records",
        PLANTED >> 20
    );
}

//! `kvh tail-log`: a chain the tail passed on to its end, then rewritten and moved whole by
//! `prune-log`: its manifest's last record (seq and hash) is the record the position names,
//! and another hash there is a rewritten chain, as it is for a chain still in the directory.

mod forensic_common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use forensic_common::{cfg, chain_files, reseal_all, secret, write_log, SECRET};
use serde_json::Value;

fn kvh() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kvh"));
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("KVH_")) {
        cmd.env_remove(k);
    }
    cmd
}

fn run(dir: &Path, verb: &str, args: &[&str]) -> Output {
    kvh().arg(verb).arg(dir).args(args).output().unwrap()
}

/// The log directory, the HMAC key file (written), the archive (0700) and the state file
/// under `root`.
fn paths(root: &Path) -> (PathBuf, PathBuf, PathBuf, PathBuf) {
    let key = root.join("hmac.key");
    std::fs::write(&key, &*secret()).unwrap();
    let archive = root.join("archive");
    std::fs::create_dir(&archive).unwrap();
    std::fs::set_permissions(
        &archive,
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();
    (root.join("log"), key, archive, root.join("tail.json"))
}

/// One pass of a tail that remembers its position and accounts for pruned chains.
fn tail_args<'a>(key: &'a Path, state: &'a Path) -> [&'a str; 6] {
    [
        "--key-file",
        key.to_str().unwrap(),
        "--state",
        state.to_str().unwrap(),
        "--allow-pruned",
        "--once",
    ]
}

/// Whoever holds the HMAC secret rewrites the chain (another tenant on record 2) and seals it
/// again; then the nightly prune moves the ended chain whole.
fn rewrite_and_prune(dir: &Path, files: &[PathBuf], archive: &Path, key: &Path) {
    reseal_all(files, SECRET, |m| {
        if m["seq"] == 2 {
            m.insert("tenant_id".into(), Value::from("someone-else"));
        }
    });
    let pruned = run(
        dir,
        "prune-log",
        &[
            "--archive-dir",
            archive.to_str().unwrap(),
            "--older-than",
            "0",
            "--key-file",
            key.to_str().unwrap(),
        ],
    );
    assert_eq!(
        pruned.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&pruned.stderr)
    );
    assert!(chain_files(dir).is_empty(), "the chain moved whole");
}

/// Whether the tail stopped (exit 1) with a tampering line naming a rewritten record.
fn caught_rewrite(out: &Output) -> bool {
    let last: Option<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok());
    out.status.code() == Some(1)
        && last.as_ref().is_some_and(|v| {
            v["kvh_tail_log"] == "tampering"
                && v["reason"]
                    .as_str()
                    .is_some_and(|r| r.contains("rewritten"))
        })
}

#[test]
fn a_chain_rewritten_then_moved_whole_at_the_position_is_caught() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, key, archive, state) = paths(tmp.path());
    let args = tail_args(&key, &state);
    // A process that ran and stopped; the tail passes its chain on to the `stop`.
    write_log(&cfg(&dir, 1 << 20), 4, true);
    let files = chain_files(&dir);
    let mut from_start = args.to_vec();
    from_start.push("--from-start");
    let out = run(&dir, "tail-log", &from_start);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 6);
    // Whoever holds the HMAC secret rewrites the chain (another tenant on one record) and
    // seals it again; then the nightly prune moves the ended chain whole.
    rewrite_and_prune(&dir, &files, &archive, &key);
    // Another process writes meanwhile, so the log directory still holds records.
    write_log(&cfg(&dir, 1 << 20), 1, true);
    let out = run(&dir, "tail-log", &args);
    assert!(
        caught_rewrite(&out),
        "the chain's last record, passed on, now has another hash (its manifest says so), and \
         the tail says nothing: exit {:?}, stdout {:?}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout)
    );
}

/// As above, with the position at the last record of the chain's first file (a tail that
/// ran while the writer was still in its first file) rather than at the chain's end. The
/// manifest of the chain moved whole records that record's hash too (`last_hash` of the
/// file's entry): another hash there is a rewritten chain, and the tail says so (exit 1, a
/// tampering line) instead of naming the rest as a gap and going on.
#[test]
fn a_chain_rewritten_then_moved_whole_past_the_position_is_caught_at_a_recorded_file_end() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, key, archive, state) = paths(tmp.path());
    let args = tail_args(&key, &state);
    // A process that ran and stopped, in several files.
    write_log(&cfg(&dir, 4096), 30, true);
    let files = chain_files(&dir);
    assert!(files.len() >= 3, "{files:?}");
    // The tail ran while only the first file was written: its position is that file's last
    // record.
    let aside = tmp.path().join("aside");
    std::fs::create_dir(&aside).unwrap();
    for f in &files[1..] {
        std::fs::rename(f, aside.join(f.file_name().unwrap())).unwrap();
    }
    let mut from_start = args.to_vec();
    from_start.push("--from-start");
    let out = run(&dir, "tail-log", &from_start);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for f in &files[1..] {
        std::fs::rename(aside.join(f.file_name().unwrap()), f).unwrap();
    }
    // Whoever holds the HMAC secret rewrites the chain (another tenant on a record the tail
    // passed on) and seals it again; then the nightly prune moves the ended chain whole.
    rewrite_and_prune(&dir, &files, &archive, &key);
    write_log(&cfg(&dir, 1 << 20), 1, true);
    let out = run(&dir, "tail-log", &args);
    assert!(
        caught_rewrite(&out),
        "the record at the position, passed on, has another hash in the manifest: exit {:?}, \
         stdout {:?}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout)
    );
}

//! `kvh prune-log` and the verifier's two ways of reading a pruned log: what moves (a prefix
//! of files older than the cut-off, never the two newest of an open chain, every file of an
//! ended one), that nothing moves from a log that does not verify, that what is left verifies
//! with `--allow-pruned` and the whole with `--archive-dir`, and that deleting, editing or
//! forging after a prune is still caught.

mod forensic_common;
#[path = "mounted/mod.rs"]
mod mounted;
#[path = "skip/mod.rs"]
mod skip;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use forensic_common::{
    cfg, chain_files, event, keyed_opts, manifest_of_whole_chain, secret, start, verify, write_log,
};
use kvhygiene::events::EventSink;
use kvhygiene::forensic::keys::read_public_key;
use kvhygiene::forensic::prune::{manifest_path, Manifest};
use kvhygiene::forensic::{ForensicLog, VerifyOptions};
use mounted::Mounted;
use serde_json::Value;

fn kvh<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kvh"));
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("KVH_")) {
        cmd.env_remove(k);
    }
    cmd.args(args).output().expect("run kvh")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A temporary directory with a log directory, a private archive and the HMAC key file.
struct Setup {
    _tmp: tempfile::TempDir,
    log: PathBuf,
    archive: PathBuf,
    key: PathBuf,
}

fn setup() -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let log = tmp.path().join("log");
    let archive = tmp.path().join("archive");
    fs::create_dir(&archive).unwrap();
    fs::set_permissions(&archive, fs::Permissions::from_mode(0o700)).unwrap();
    let key = tmp.path().join("hmac.key");
    fs::write(&key, &*secret()).unwrap();
    Setup {
        _tmp: tmp,
        log,
        archive,
        key,
    }
}

/// A chain of `n` events in 4 KiB files whose writer is still running (no `stop`).
fn open_chain(dir: &Path, n: u64) {
    let log = ForensicLog::open_with_secret(&cfg(dir, 4096), start(), Some(secret())).unwrap();
    for i in 0..n {
        log.emit(event(i));
    }
    log.flush();
    // The writer keeps running for the rest of the test process: an open chain.
    std::mem::forget(log);
}

/// A signing writer's configuration for `s`'s log, its checkpoints kept apart in
/// `tmp/ckpt`, one every `every` records (0: by time only).
struct Signed {
    cfg: kvhygiene::config::LogConfig,
    /// The checkpoint directory.
    ck: PathBuf,
    /// The signing key file, and its public half.
    signer: PathBuf,
    public: PathBuf,
}

fn signed(s: &Setup, tmp: &Path, every: u64) -> Signed {
    let (signer, public) = kvhygiene::forensic::cli::keygen(&tmp.join("signer")).unwrap();
    let ck = tmp.join("ckpt");
    let mut cfg = cfg(&s.log, 4096);
    cfg.signing_key_file = Some(signer.clone());
    cfg.checkpoint_dir = Some(ck.clone());
    cfg.checkpoint_every_records = every;
    Signed {
        cfg,
        ck,
        signer,
        public,
    }
}

fn prune(s: &Setup, extra: &[&str]) -> Output {
    let mut args = vec![
        "prune-log",
        s.log.to_str().unwrap(),
        "--archive-dir",
        s.archive.to_str().unwrap(),
        "--key-file",
        s.key.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    kvh(&args)
}

/// `kvh prune-log --older-than 0` of the setup's log into `archive`, with the key, and no
/// `KVH_*` variable of the test's environment.
fn prune_command(s: &Setup, archive: &str) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kvh"));
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("KVH_")) {
        cmd.env_remove(k);
    }
    cmd.args([
        "prune-log",
        s.log.to_str().unwrap(),
        "--archive-dir",
        archive,
    ])
    .args(["--older-than", "0", "--key-file", s.key.to_str().unwrap()]);
    cmd
}

fn prune_into(s: &Setup, archive: &str) -> Output {
    prune_command(s, archive).output().unwrap()
}

/// The reason of a report's first problem (empty when it has none).
fn first_reason(r: &kvhygiene::forensic::Report) -> String {
    r.first_problem()
        .map(|p| p.reason.clone())
        .unwrap_or_default()
}

fn names(dir: &Path, ext: &str) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(ext))
        .collect();
    v.sort();
    v
}

fn pruned_opts() -> VerifyOptions {
    VerifyOptions {
        allow_pruned: true,
        ..keyed_opts()
    }
}

fn with_archive(s: &Setup) -> VerifyOptions {
    VerifyOptions {
        archive_dirs: vec![s.archive.clone()],
        ..keyed_opts()
    }
}

/// Asserts the exit code and that stderr says `needle`.
/// A run that succeeded (exit 0) and moved nothing.
fn assert_moved_nothing(out: &Output) {
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("moved 0 files"),
        "{}",
        text(&out.stdout)
    );
}

fn expect_failure(out: &Output, code: i32, needle: &str) {
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "{err}");
    assert!(err.contains(needle), "{err}");
}

/// The 1-based line of the first `q` in `bytes` (where the tests flip a byte).
fn first_q_line(bytes: &[u8]) -> u64 {
    let at = bytes.iter().position(|&b| b == b'q').unwrap();
    bytes[..at].iter().filter(|&&b| b == b'\n').count() as u64 + 1
}

/// The epoch-0 key manifests are sealed with.
fn key0() -> kvhygiene::forensic::keys::EpochKey {
    kvhygiene::forensic::prune::manifest_key(&secret()).unwrap()
}

/// An open chain of 80 events, pruned with `--older-than 0`.
fn pruned_open_chain() -> Setup {
    let s = setup();
    open_chain(&s.log, 80);
    let out = prune(&s, &["--older-than", "0"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    s
}

/// An ended chain of `events` events in 4 KiB files, its checkpoints signed: the directory
/// holding the signing key (kept while the test runs) and the public key's file.
fn signed_log(s: &Setup, events: u64) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let (signer, public) = kvhygiene::forensic::cli::keygen(&tmp.path().join("signer")).unwrap();
    let mut c = cfg(&s.log, 4096);
    c.signing_key_file = Some(signer);
    write_log(&c, events, true);
    (tmp, public)
}

fn manifest(s: &Setup) -> (PathBuf, Manifest) {
    let chain = &verify(&s.log, &pruned_opts()).chains[0].chain;
    let path = manifest_path(&s.log, chain);
    let m = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
    (path, m)
}

#[test]
fn an_open_chain_keeps_its_two_newest_files_and_verifies_from_the_manifest() {
    let s = setup();
    open_chain(&s.log, 80);
    let before = chain_files(&s.log);
    assert!(before.len() >= 5, "{} files", before.len());
    let records = verify(&s.log, &keyed_opts()).chains[0].records;

    let out = prune(&s, &["--older-than", "0", "--dry-run"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("would move"),
        "{}",
        text(&out.stdout)
    );
    assert_eq!(chain_files(&s.log), before, "a dry run moved files");
    assert!(names(&s.archive, ".jsonl").is_empty());

    let out = prune(&s, &["--older-than", "0"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let left = chain_files(&s.log);
    assert_eq!(
        left,
        before[before.len() - 2..],
        "the two newest files stay"
    );
    let moved = names(&s.archive, ".jsonl");
    assert_eq!(moved.len(), before.len() - 2);
    for f in &before[..before.len() - 2] {
        let archived = s.archive.join(f.file_name().unwrap());
        let mode = fs::metadata(&archived).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", archived.display());
    }

    // Without the option, missing files fail the chain.
    assert!(!verify(&s.log, &keyed_opts()).ok());
    let r = verify(&s.log, &pruned_opts());
    assert!(r.ok(), "{r:?}");
    let pruned = r.chains[0].pruned.clone().expect("pruned span");
    assert_eq!(pruned.files as usize, moved.len());
    assert_eq!(r.chains[0].first_seq, Some(pruned.last_seq + 1));
    let whole = verify(&s.log, &with_archive(&s));
    assert!(whole.ok(), "{whole:?}");
    assert_eq!(whole.chains[0].records, records);
    assert_eq!(whole.chains[0].pruned, None);

    // The CLI says the same, and evidence reports on what is left.
    let d = s.log.to_str().unwrap();
    let k = s.key.to_str().unwrap();
    let out = kvh(&["verify-log", d, "--key-file", k, "--allow-pruned"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stdout));
    assert!(
        text(&out.stdout).contains("moved to"),
        "{}",
        text(&out.stdout)
    );
    let out = kvh(&["evidence", d, "--key-file", k, "--allow-pruned", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let ev: Value = serde_json::from_slice(&out.stdout).unwrap();
    // The start record moved: the run is shown, its host and policy unknown here.
    assert_eq!(ev["processes"][0]["start_archived"], true);
    let said = &ev["integrity"]["pruned"][0];
    assert_eq!(said["files"], moved.len());
    assert_eq!(said["last_seq"], pruned.last_seq);
    let out = kvh(&["evidence", d, "--key-file", k, "--allow-pruned"]);
    assert!(
        text(&out.stdout).contains(&format!("the oldest {} files moved", moved.len())),
        "{}",
        text(&out.stdout)
    );

    // A second run finds nothing more to move (the two newest stay), and the manifest keeps
    // its entries once.
    let out = prune(&s, &["--older-than", "0"]);
    assert_moved_nothing(&out);
    assert_eq!(manifest(&s).1.files.len(), moved.len());
}

#[test]
fn nothing_moves_from_a_log_that_does_not_verify() {
    let s = setup();
    open_chain(&s.log, 60);
    let files = chain_files(&s.log);
    let mut bytes = fs::read(&files[0]).unwrap();
    let at = bytes.iter().position(|&b| b == b'q').unwrap(); // inside a record
    bytes[at] = b'Q';
    fs::write(&files[0], bytes).unwrap();
    let out = prune(&s, &["--older-than", "0"]);
    expect_failure(&out, 1, "nothing was moved");
    assert_eq!(chain_files(&s.log), files);
    assert!(fs::read_dir(&s.archive).unwrap().next().is_none());
    assert!(names(&s.log, ".pruned.json").is_empty());
    // With --json, stdout says so too (a script reads the outcome there), with the
    // verification's report.
    let out = prune(&s, &["--older-than", "0", "--json"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let outcome: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(outcome["verified"], false, "{outcome}");
    assert_eq!(outcome["files"], 0);
    assert!(
        outcome["verification"]["chains"][0]["problem"].is_object(),
        "{outcome}"
    );

    // A wrong key is caught the same way.
    let s = setup();
    open_chain(&s.log, 60);
    fs::write(&s.key, b"another-secret-0123456789").unwrap();
    let out = prune(&s, &["--older-than", "0"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(fs::read_dir(&s.archive).unwrap().next().is_none());
}

#[test]
fn deleting_or_forging_after_a_prune_is_caught() {
    let s = pruned_open_chain();
    let left = chain_files(&s.log);
    let (path, m) = manifest(&s);

    // Deleting the oldest file left: the manifest does not account for it.
    let kept = fs::read(&left[0]).unwrap();
    fs::remove_file(&left[0]).unwrap();
    let r = verify(&s.log, &pruned_opts());
    assert!(!r.ok());
    let reason = &r.first_problem().unwrap().reason;
    assert!(reason.contains("do not account"), "{reason}");
    fs::write(&left[0], &kept).unwrap();
    assert!(verify(&s.log, &pruned_opts()).ok());

    // Editing the manifest: its MAC fails with the key; without the key, a manifest is not
    // used at all; resealed with the key, the first file left no longer links to it.
    let mut forged = m.clone();
    forged.files.last_mut().unwrap().last_hash = "00".repeat(32);
    fs::write(&path, serde_json::to_vec(&forged).unwrap()).unwrap();
    let r = verify(&s.log, &pruned_opts());
    assert!(first_reason(&r).contains("MAC mismatch"), "{r:?}");
    // Without the key a manifest is not taken as the word for anything.
    let unkeyed = VerifyOptions {
        allow_pruned: true,
        ..VerifyOptions::default()
    };
    let r = verify(&s.log, &unkeyed);
    assert!(first_reason(&r).contains("needs the HMAC key"), "{r:?}");
    // Whoever holds the key can write a manifest that says anything; the chain left must
    // still link to it.
    let key = key0();
    forged.seal(&key);
    fs::write(&path, serde_json::to_vec(&forged).unwrap()).unwrap();
    let r = verify(&s.log, &pruned_opts());
    assert!(first_reason(&r).contains("prev is not"), "{r:?}");

    // Removing the manifest: the missing files are missing again, named as an inclusive
    // range, as every range a report gives.
    fs::remove_file(&path).unwrap();
    let r = verify(&s.log, &pruned_opts());
    assert!(first_reason(&r).contains("no prune manifest"), "{r:?}");
    let k = m.files.len();
    let said = if k == 1 {
        "file 0 is missing".to_string()
    } else {
        format!("files 0..{} are missing", k - 1)
    };
    assert!(first_reason(&r).contains(&said), "{said}: {r:?}");

    // An archive copy edited later fails when the chain is read whole.
    fs::write(&path, serde_json::to_vec(&m).unwrap()).unwrap();
    let first = s.archive.join(&m.files[0].name);
    let mut bytes = fs::read(&first).unwrap();
    let at = bytes.iter().position(|&b| b == b'q').unwrap();
    bytes[at] = b'Q';
    fs::set_permissions(&first, fs::Permissions::from_mode(0o600)).unwrap();
    fs::write(&first, bytes).unwrap();
    assert!(!verify(&s.log, &with_archive(&s)).ok());
}

/// The mark a first run leaves in its archive, before it copies anything there.
fn mark_as_archive(archive: &Path) {
    fs::write(
        archive.join(".kvh-archive"),
        "an archive of kvh prune-log\n",
    )
    .unwrap();
}

#[test]
fn an_interrupted_move_is_finished_by_running_again() {
    let s = setup();
    open_chain(&s.log, 80);
    let before = chain_files(&s.log);
    // The copies were made but the originals not removed (an interruption); the run had
    // marked the archive before it copied anything.
    mark_as_archive(&s.archive);
    for f in &before[..2] {
        fs::copy(f, s.archive.join(f.file_name().unwrap())).unwrap();
    }
    // Read whole with both copies present, each file counts once.
    let records = verify(&s.log, &keyed_opts()).chains[0].records;
    let both = verify(&s.log, &with_archive(&s));
    assert!(both.ok(), "{both:?}");
    assert_eq!(both.chains[0].records, records);

    let out = prune(&s, &["--older-than", "0"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(chain_files(&s.log), before[before.len() - 2..]);
    assert!(verify(&s.log, &pruned_opts()).ok());
}

/// The move stops (exit 2, nothing moved) when a file's name in the archive already holds
/// other bytes; a dry run, which says what the real run would do, stops there too.
#[test]
fn an_archive_file_with_other_bytes_stops_the_move() {
    let s = setup();
    open_chain(&s.log, 60);
    let before = chain_files(&s.log);
    mark_as_archive(&s.archive);
    fs::write(
        s.archive.join(before[0].file_name().unwrap()),
        b"something else\n",
    )
    .unwrap();
    let dry = prune(&s, &["--older-than", "0", "--dry-run"]);
    expect_failure(&dry, 2, "other contents");
    let out = prune(&s, &["--older-than", "0"]);
    expect_failure(&out, 2, "other contents");
    assert_eq!(chain_files(&s.log), before, "nothing may be removed");
    assert!(names(&s.log, ".pruned.json").is_empty());
    // Read together, the two different files of one name are named.
    let r = verify(&s.log, &with_archive(&s));
    assert!(first_reason(&r).contains("two different files"), "{r:?}");
}

#[test]
fn the_archive_must_be_a_private_directory_other_than_the_log() {
    let s = setup();
    open_chain(&s.log, 20);
    let log = s.log.to_str().unwrap().to_string();
    fs::set_permissions(&s.archive, fs::Permissions::from_mode(0o777)).unwrap();
    let out = prune(&s, &["--older-than", "0"]);
    expect_failure(&out, 2, "writable by group or others");
    fs::set_permissions(&s.archive, fs::Permissions::from_mode(0o700)).unwrap();

    for (archive, needle) in [
        (log.as_str(), "or inside it"),
        ("/nonexistent/archive", "no such directory; create it first"),
    ] {
        let out = prune_into(&s, archive);
        assert_eq!(out.status.code(), Some(2), "{archive}");
        assert!(text(&out.stderr).contains(needle), "{}", text(&out.stderr));
    }
    let link = s.archive.with_extension("link");
    std::os::unix::fs::symlink(&s.archive, &link).unwrap();
    let out = prune_into(&s, link.to_str().unwrap());
    expect_failure(&out, 2, "symlink");
    // verify-log refuses the same slip, the log directory or one inside it as the archive.
    let inside = s.log.join("sub");
    fs::create_dir(&inside).unwrap();
    for archive in [log.as_str(), inside.to_str().unwrap()] {
        let out = kvh(&["verify-log", &log, "--archive-dir", archive]);
        expect_failure(&out, 2, "or inside it");
    }
}

/// A directory with no chain and no manifest is no log (a mistyped path): exit 2 naming it,
/// for a dry run too, and the archive is left as it was (no mark written into it). A
/// directory whose every chain was moved earlier still holds their manifests: nothing to
/// move there is done (exit 0).
#[test]
fn a_directory_with_no_log_is_refused_and_the_archive_left_alone() {
    let s = setup();
    fs::create_dir(&s.log).unwrap();
    fs::set_permissions(&s.log, fs::Permissions::from_mode(0o700)).unwrap();
    for extra in [
        &["--older-than", "0"][..],
        &["--older-than", "0", "--dry-run"],
    ] {
        let out = prune(&s, extra);
        expect_failure(&out, 2, "no forensic log here");
        assert!(text(&out.stderr).contains(s.log.to_str().unwrap()));
        assert!(text(&out.stdout).is_empty(), "{}", text(&out.stdout));
        assert_eq!(fs::read_dir(&s.archive).unwrap().count(), 0, "{extra:?}");
    }
}

/// Once every chain was moved whole, the log directory holds their manifests alone: a later
/// run there has nothing to move (exit 0), not "no log".
#[test]
fn a_log_whose_every_chain_was_moved_is_still_a_log() {
    let s = setup();
    ended_chains(&s.log, 2);
    let out = prune(&s, &["--older-than", "0"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        chain_files(&s.log).is_empty(),
        "the ended chain moved whole"
    );
    let out = prune(&s, &["--older-than", "0"]);
    assert_moved_nothing(&out);
}

#[test]
fn recent_files_stay() {
    let s = setup();
    open_chain(&s.log, 60);
    let before = chain_files(&s.log);
    let out = prune(&s, &["--older-than", "1"]);
    assert_moved_nothing(&out);
    assert_eq!(chain_files(&s.log), before);
}

#[test]
fn an_ended_chain_moves_whole_and_its_checkpoint_is_held_to_the_manifest() {
    let s = setup();
    let (_keys, public) = signed_log(&s, 40);
    let files = chain_files(&s.log);
    let out = prune(&s, &["--older-than", "0"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("the whole chain"),
        "{}",
        text(&out.stdout)
    );
    assert!(chain_files(&s.log).is_empty());
    assert_eq!(names(&s.archive, ".jsonl").len(), files.len());

    let signed = VerifyOptions {
        public_keys: vec![read_public_key(&public).unwrap()],
        checkpoints: vec![s.log.clone()],
        ..pruned_opts()
    };
    let r = verify(&s.log, &signed);
    assert!(r.ok(), "{r:?}");
    assert!(r.chains[0].pruned.as_ref().unwrap().complete);
    assert!(r.chains[0].checkpoint_seq.is_some());
    // Without --allow-pruned the checkpoint's chain has no file: deleted.
    let strict = VerifyOptions {
        allow_pruned: false,
        ..signed
    };
    assert!(!verify(&s.log, &strict).ok());
    let signed = VerifyOptions {
        allow_pruned: true,
        ..strict
    };

    // Even a manifest sealed with the key must end at the signed checkpoint.
    let key = key0();
    let (path, mut m) = manifest(&s);
    let original = m.clone();
    m.files.pop();
    m.seal(&key);
    fs::write(&path, serde_json::to_vec(&m).unwrap()).unwrap();
    let r = verify(&s.log, &signed);
    assert!(
        first_reason(&r).contains("is not the last record the manifest moved"),
        "{r:?}"
    );
    // A manifest of an open chain whose files are all gone: deleted.
    let mut open = original.clone();
    open.complete = false;
    open.seal(&key);
    fs::write(&path, serde_json::to_vec(&open).unwrap()).unwrap();
    let r = verify(&s.log, &signed);
    assert!(first_reason(&r).contains("files deleted"), "{r:?}");
    // With a pinned key, a chain moved whole still needs its checkpoint.
    fs::write(&path, serde_json::to_vec(&original).unwrap()).unwrap();
    assert!(verify(&s.log, &signed).ok());
    for f in fs::read_dir(&s.log).unwrap() {
        let f = f.unwrap().path();
        if f.extension().is_some_and(|e| e == "ckpt") {
            fs::remove_file(f).unwrap();
        }
    }
    let r = verify(&s.log, &signed);
    assert!(first_reason(&r).contains("no checkpoint"), "{r:?}");
}

#[test]
fn the_manifest_records_each_moved_file() {
    let s = setup();
    open_chain(&s.log, 80);
    let before = chain_files(&s.log);
    assert_eq!(prune(&s, &["--older-than", "0"]).status.code(), Some(0));
    let (_, m) = manifest(&s);
    assert_eq!(m.v, 1);
    assert!(!m.complete);
    assert!(m.mac.is_some());
    let mut next_seq = 0;
    for (i, f) in m.files.iter().enumerate() {
        assert_eq!(f.name, before[i].file_name().unwrap().to_str().unwrap());
        let bytes = fs::read(s.archive.join(&f.name)).unwrap();
        use sha2::Digest;
        assert_eq!(
            f.sha256,
            kvhygiene::forensic::record::hex(&sha2::Sha256::digest(&bytes))
        );
        assert_eq!(f.first_seq, next_seq);
        let last: Value =
            serde_json::from_str(std::str::from_utf8(&bytes).unwrap().lines().last().unwrap())
                .unwrap();
        assert_eq!(last["seq"], f.last_seq);
        assert_eq!(last["hash"], f.last_hash.as_str());
        next_seq = f.last_seq + 1;
    }
}

/// A pruned log, made once: the log directory's remaining files and manifest, by name.
fn pruned_template() -> &'static Vec<(String, Vec<u8>)> {
    static T: std::sync::OnceLock<Vec<(String, Vec<u8>)>> = std::sync::OnceLock::new();
    T.get_or_init(|| {
        let s = setup();
        open_chain(&s.log, 80);
        let out = prune(&s, &["--older-than", "0"]);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        let mut files: Vec<(String, Vec<u8>)> = fs::read_dir(&s.log)
            .unwrap()
            .map(|e| e.unwrap())
            .map(|e| {
                let name = e.file_name().into_string().unwrap();
                (name, fs::read(e.path()).unwrap())
            })
            .collect();
        files.sort();
        assert!(files.iter().any(|(n, _)| n.ends_with(".pruned.json")));
        assert!(verify_in(&files, |_| {}).ok());
        files
    })
}

/// Writes the template into a fresh directory, lets `mutate` change it, and verifies it
/// with the key and `--allow-pruned`.
fn verify_in(
    files: &[(String, Vec<u8>)],
    mutate: impl FnOnce(&Path),
) -> kvhygiene::forensic::Report {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    fs::create_dir(&dir).unwrap();
    for (name, bytes) in files {
        fs::write(dir.join(name), bytes).unwrap();
    }
    mutate(&dir);
    verify(&dir, &pruned_opts())
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 128, ..Default::default() })]

    /// Any one deleted file, or any one changed byte of a chain file or the manifest, fails
    /// the verification, unless the manifest still says the same thing (a change of JSON
    /// whitespace, say).
    #[test]
    fn any_one_change_to_a_pruned_log_is_caught(
        pick in 0usize..64,
        at in 0usize..1_000_000,
        xor in 1u8..=255,
        delete in proptest::bool::weighted(0.15),
    ) {
        let files = pruned_template();
        let (name, bytes) = &files[pick % files.len()];
        // Deleting the newest file of a chain without a checkpoint cannot be told from a
        // writer that stopped before writing it (docs/forensic-log.md, chain rules 5 and 6):
        // the checkpoint tests cover that case.
        let newest = files.iter().rev().find(|(n, _)| n.ends_with(".jsonl")).map(|(n, _)| n);
        proptest::prop_assume!(!(delete && Some(name) == newest));
        // Nor can a newest file whose final newline is gone: that is a torn tail, what a
        // writer that crashed mid-line leaves (its last record is then not counted).
        proptest::prop_assume!(!(Some(name) == newest && at % bytes.len() == bytes.len() - 1));
        let r = verify_in(files, |dir| {
            let path = dir.join(name);
            if delete {
                fs::remove_file(&path).unwrap();
            } else {
                let mut b = bytes.clone();
                let i = at % b.len();
                b[i] ^= xor;
                fs::write(&path, b).unwrap();
            }
        });
        if r.ok() {
            // Only a manifest whose meaning is unchanged may pass.
            proptest::prop_assert!(!delete && name.ends_with(".pruned.json"), "{name}: {r:?}");
            let mut b = bytes.clone();
            let i = at % b.len();
            b[i] ^= xor;
            let before: Manifest = serde_json::from_slice(bytes).unwrap();
            let after: Result<Manifest, _> = serde_json::from_slice(&b);
            proptest::prop_assert_eq!(after.ok(), Some(before), "{}", name);
        }
    }
}

#[test]
fn the_checkpoints_file_stays_and_a_checkpoint_in_moved_files_fails() {
    use kvhygiene::forensic::checkpoint::{self, Checkpoint};
    use kvhygiene::forensic::keys::read_signing_key;
    let s = setup();
    open_chain(&s.log, 80);
    let files = chain_files(&s.log);
    assert!(files.len() >= 6);
    let tmp = tempfile::tempdir().unwrap();
    let (signer, public) = kvhygiene::forensic::cli::keygen(&tmp.path().join("signer")).unwrap();
    let signer = read_signing_key(&signer).unwrap();
    // A checkpoint at the last record of file 2 (as a writer that checkpointed then).
    let third = fs::read_to_string(&files[2]).unwrap();
    let last: Value = serde_json::from_str(third.lines().last().unwrap()).unwrap();
    let chain = verify(&s.log, &keyed_opts()).chains[0].chain.clone();
    let c = Checkpoint {
        chain: chain.clone(),
        seq: last["seq"].as_u64().unwrap(),
        hash: kvhygiene::forensic::record::parse_hash(last["hash"].as_str().unwrap()).unwrap(),
        file: files[2].file_name().unwrap().to_str().unwrap().to_string(),
        ts: 1,
        key_id: None,
        public_key: None,
    };
    checkpoint::write(&s.log, &signer, &c).unwrap();
    let first: Value = serde_json::from_str(
        fs::read_to_string(&files[0])
            .unwrap()
            .lines()
            .last()
            .unwrap(),
    )
    .unwrap();
    let out = prune(&s, &["--older-than", "0"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    // Files 0 and 1 moved; the checkpoint's file stays, so it is held to its record.
    assert_eq!(chain_files(&s.log), files[2..]);
    let opts = VerifyOptions {
        public_keys: vec![read_public_key(&public).unwrap()],
        checkpoints: vec![s.log.clone()],
        ..pruned_opts()
    };
    let r = verify(&s.log, &opts);
    assert!(r.ok(), "{r:?}");
    assert_eq!(r.chains[0].checkpoint_seq, Some(c.seq));

    // A checkpoint that points into the moved files cannot be held to a record here.
    let _ = fs::remove_file(checkpoint::path_for(&s.log, &chain));
    let earlier = Checkpoint {
        seq: first["seq"].as_u64().unwrap(),
        hash: kvhygiene::forensic::record::parse_hash(first["hash"].as_str().unwrap()).unwrap(),
        file: files[0].file_name().unwrap().to_str().unwrap().to_string(),
        ..c
    };
    checkpoint::write(&s.log, &signer, &earlier).unwrap();
    let r = verify(&s.log, &opts);
    assert!(
        first_reason(&r).contains("points into the moved files"),
        "{r:?}"
    );
    // Read whole, it verifies.
    let whole = VerifyOptions {
        allow_pruned: false,
        archive_dirs: vec![s.archive.clone()],
        ..opts
    };
    assert!(verify(&s.log, &whole).ok());
}

#[test]
fn a_file_changed_after_the_verification_is_not_moved() {
    use kvhygiene::forensic::prune::{prune_chain, ChainToPrune, PrunePlan, PruneRequest};
    let s = setup();
    open_chain(&s.log, 60);
    let files = chain_files(&s.log);
    let opts = keyed_opts();
    assert!(verify(&s.log, &opts).ok());
    // Between the verification and the move, file 0 changes.
    let mut bytes = fs::read(&files[0]).unwrap();
    let at = bytes.iter().position(|&b| b == b'q').unwrap();
    bytes[at] = b'Q';
    fs::write(&files[0], bytes).unwrap();
    let key = key0();
    let req = PruneRequest {
        dir: &s.log,
        archive: &s.archive,
        older_than_days: 0,
        dry_run: false,
        opts: &opts,
        checkpoint_place: None,
    };
    let plan = PrunePlan {
        req: &req,
        cutoff_ns: u64::MAX,
        keys: std::slice::from_ref(&key),
    };
    let list: Vec<(u64, PathBuf)> = files
        .iter()
        .cloned()
        .enumerate()
        .map(|(i, p)| (i as u64, p))
        .collect();
    let chain = verify(&s.log, &VerifyOptions::default()).chains[0]
        .chain
        .clone();
    let state = ChainToPrune {
        chain: &chain,
        list: &list,
        closed: false,
        last_seq: None,
        checkpoint_seq: None,
        key_index: Some(0),
    };
    let err = prune_chain(&plan, &state).unwrap_err();
    assert!(
        matches!(&err, kvhygiene::forensic::prune::PruneError::NotVerified(e) if e.contains("not moved")),
        "{err}"
    );
    assert_eq!(chain_files(&s.log), files, "nothing removed");
    assert!(names(&s.log, ".pruned.json").is_empty());
    assert!(names(&s.archive, ".jsonl").is_empty());
}

#[test]
fn a_key_is_required_and_the_archive_stays_with_the_chain() {
    let s = setup();
    open_chain(&s.log, 80);
    let d = s.log.to_str().unwrap();
    let a = s.archive.to_str().unwrap();
    let out = kvh(&["prune-log", d, "--archive-dir", a, "--older-than", "0"]);
    expect_failure(&out, 2, "--key-file <FILE>");
    let out = kvh(&["verify-log", d, "--allow-pruned"]);
    expect_failure(&out, 2, "needs --key-file");

    assert_eq!(prune(&s, &["--older-than", "0"]).status.code(), Some(0));
    // Leftovers of an interrupted copy are cleared by the next run.
    fs::write(s.archive.join(".kvh-tmp-x.jsonl.1"), b"partial").unwrap();
    let out = prune(&s, &["--older-than", "0"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        !s.archive.join(".kvh-tmp-x.jsonl.1").exists(),
        "leftover kept"
    );
}

#[test]
fn a_chains_files_all_go_to_one_archive() {
    let s = setup();
    let log = ForensicLog::open_with_secret(&cfg(&s.log, 4096), start(), Some(secret())).unwrap();
    for i in 0..60 {
        log.emit(event(i));
    }
    log.flush();
    assert_eq!(prune(&s, &["--older-than", "0"]).status.code(), Some(0));
    // The chain grows; its next old files may not go elsewhere.
    for i in 60..120 {
        log.emit(event(i));
    }
    log.flush();
    std::mem::forget(log);
    let other = s.archive.with_extension("other");
    fs::create_dir(&other).unwrap();
    fs::set_permissions(&other, fs::Permissions::from_mode(0o700)).unwrap();
    let out = prune_into(&s, other.to_str().unwrap());
    expect_failure(&out, 2, "to the same archive");
    assert_eq!(prune(&s, &["--older-than", "0"]).status.code(), Some(0));
    assert!(verify(&s.log, &pruned_opts()).ok());
}

#[test]
fn nothing_may_follow_a_stop_record() {
    let s = setup();
    write_log(&cfg(&s.log, 4096), 20, true);
    let files = chain_files(&s.log);
    let last = files.last().unwrap();
    let next = last.with_file_name(kvhygiene::forensic::files::file_name(
        &verify(&s.log, &keyed_opts()).chains[0].chain,
        files.len() as u64,
    ));
    fs::write(&next, b"").unwrap();
    let r = verify(&s.log, &keyed_opts());
    assert!(first_reason(&r).contains("after the chain's stop"), "{r:?}");
    fs::remove_file(&next).unwrap();
    let mut f = fs::OpenOptions::new().append(true).open(last).unwrap();
    std::io::Write::write_all(&mut f, b"{\"torn").unwrap();
    let r = verify(&s.log, &keyed_opts());
    assert!(first_reason(&r).contains("after the chain's stop"), "{r:?}");
}

#[test]
fn read_whole_every_moved_file_must_be_in_the_archive_as_recorded() {
    let s = pruned_open_chain();
    let (_, m) = manifest(&s);
    assert!(verify(&s.log, &with_archive(&s)).ok());
    // A moved file lost from the archive: with --allow-pruned too, reading the archive says so.
    let lost = s.archive.join(&m.files[0].name);
    let kept = fs::read(&lost).unwrap();
    fs::remove_file(&lost).unwrap();
    let both = VerifyOptions {
        allow_pruned: true,
        ..with_archive(&s)
    };
    let r = verify(&s.log, &both);
    assert!(first_reason(&r).contains("moved file lost"), "{r:?}");
    fs::write(&lost, &kept).unwrap();
    assert!(verify(&s.log, &both).ok());
    // A moved file replaced by other bytes (the chain catches an edit; the recorded SHA-256
    // catches it first, naming the file).
    let mut other = kept.clone();
    let at = other.iter().position(|&b| b == b'q').unwrap();
    other[at] = b'Q';
    fs::write(&lost, &other).unwrap();
    let r = verify(&s.log, &both);
    // The walk names the record when it finds one.
    assert!(first_reason(&r).contains("hash mismatch"), "{r:?}");
    assert_eq!(r.first_problem().unwrap().line, first_q_line(&kept));
    // Bytes that verify but are not the recorded ones: the manifest's SHA-256 says so (here a
    // key holder resealed a manifest recording other bytes).
    fs::write(&lost, &kept).unwrap();
    let (path, mut m) = manifest(&s);
    m.files[0].sha256 = "00".repeat(32);
    m.seal(&key0());
    fs::write(&path, serde_json::to_vec(&m).unwrap()).unwrap();
    let r = verify(&s.log, &both);
    assert!(first_reason(&r).contains("SHA-256 differs"), "{r:?}");
}

#[test]
fn the_archive_may_not_be_inside_the_log_directory() {
    let s = setup();
    open_chain(&s.log, 20);
    let inside = s.log.join("archive");
    fs::create_dir(&inside).unwrap();
    fs::set_permissions(&inside, fs::Permissions::from_mode(0o700)).unwrap();
    let out = prune_into(&s, inside.to_str().unwrap());
    expect_failure(&out, 2, "or inside it");
}

#[test]
fn checkpoints_kept_elsewhere_still_bound_what_moves() {
    let s = setup();
    let tmp = tempfile::tempdir().unwrap();
    let Signed {
        cfg: c, ck, public, ..
    } = signed(&s, tmp.path(), 25);
    let log = ForensicLog::open_with_secret(&c, start(), Some(secret())).unwrap();
    for i in 0..100 {
        log.emit(event(i));
    }
    log.flush();
    std::mem::forget(log); // a writer that dies: its last checkpoint stays where it was
    let before = chain_files(&s.log);
    // prune-log is not told where the checkpoints are: the chain's own checkpoint records
    // still keep the checkpoint's file in place.
    assert_eq!(prune(&s, &["--older-than", "0"]).status.code(), Some(0));
    assert!(chain_files(&s.log).len() < before.len(), "something moved");
    let opts = VerifyOptions {
        public_keys: vec![read_public_key(&public).unwrap()],
        checkpoints: vec![ck],
        ..pruned_opts()
    };
    let r = verify(&s.log, &opts);
    assert!(r.ok(), "{r:?}");
    assert!(r.chains[0].checkpoint_seq.is_some(), "{r:?}");
}

#[test]
fn after_a_chain_moved_whole_nothing_may_appear() {
    let s = setup();
    write_log(&cfg(&s.log, 4096), 30, true);
    let files = chain_files(&s.log);
    assert_eq!(prune(&s, &["--older-than", "0"]).status.code(), Some(0));
    assert!(verify(&s.log, &pruned_opts()).ok());
    // The last file put back (as an interrupted run leaves it) still verifies...
    let last = files.last().unwrap();
    fs::copy(s.archive.join(last.file_name().unwrap()), last).unwrap();
    assert!(verify(&s.log, &pruned_opts()).ok());
    fs::remove_file(last).unwrap();
    // ...but a file after the moved chain's end is not a continuation of anything.
    let next = last.with_file_name(kvhygiene::forensic::files::file_name(
        &manifest(&s).1.chain,
        files.len() as u64,
    ));
    fs::write(&next, b"{}\n").unwrap();
    let r = verify(&s.log, &pruned_opts());
    assert!(first_reason(&r).contains("after the chain's stop"), "{r:?}");
}

#[test]
fn a_manifest_swapped_during_the_move_is_not_sealed() {
    use kvhygiene::forensic::prune::{record_moved, PruneError};
    let s = pruned_open_chain();
    let (path, m) = manifest(&s);
    let key = key0();
    // The run started from `m`; meanwhile an older genuine manifest is put in its place.
    let mut older = m.clone();
    older.files.truncate(1);
    older.seal(&key);
    fs::write(&path, serde_json::to_vec(&older).unwrap()).unwrap();
    let err = record_moved(
        &s.log,
        Some(&m),
        &m.chain,
        Vec::new(),
        false,
        &s.archive,
        &key,
    )
    .unwrap_err();
    assert!(matches!(err, PruneError::NotVerified(_)), "{err}");
    let on_disk: Manifest = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
    assert_eq!(on_disk, older, "rewritten");
    // A manifest with a gap is refused even with a good MAC.
    let mut gap = m.clone();
    gap.files.remove(1);
    gap.seal(&key);
    assert!(gap
        .check(Some(&key))
        .unwrap_err()
        .contains("does not continue"));
}

#[test]
fn a_forged_manifest_is_reported_for_a_chain_starting_at_file_0() {
    let s = setup();
    open_chain(&s.log, 40);
    let chain = verify(&s.log, &keyed_opts()).chains[0].chain.clone();
    let forged = Manifest {
        v: 1,
        chain: chain.clone(),
        files: Vec::new(),
        complete: false,
        archive: "/nowhere".into(),
        updated_at: 0,
        mac: Some("00".repeat(32)),
    };
    fs::write(
        manifest_path(&s.log, &chain),
        serde_json::to_vec(&forged).unwrap(),
    )
    .unwrap();
    let r = verify(&s.log, &pruned_opts());
    assert!(first_reason(&r).contains("MAC mismatch"), "{r:?}");
    assert!(r.errors.is_empty(), "reported once: {r:?}");
}

#[test]
fn an_archive_is_never_a_log_directory() {
    let s = setup();
    open_chain(&s.log, 40);
    assert_eq!(prune(&s, &["--older-than", "0"]).status.code(), Some(0));
    assert!(s.archive.join(".kvh-archive").exists());
    let err = ForensicLog::open_with_secret(&cfg(&s.archive, 4096), start(), Some(secret()))
        .err()
        .expect("a writer in the archive");
    assert!(err.to_string().contains("archive"), "{err}");
}

#[test]
fn the_archive_is_one_place_however_it_is_named() {
    let s = setup();
    let log = ForensicLog::open_with_secret(&cfg(&s.log, 4096), start(), Some(secret())).unwrap();
    for i in 0..60 {
        log.emit(event(i));
    }
    log.flush();
    let base = s.archive.parent().unwrap().to_path_buf();
    let run_from = |cwd: &Path, archive: &str| {
        prune_command(&s, archive)
            .current_dir(cwd)
            .output()
            .unwrap()
    };
    let out = run_from(&base, "archive");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let (_, m) = manifest(&s);
    assert_eq!(Path::new(&m.archive), fs::canonicalize(&s.archive).unwrap());
    for i in 60..120 {
        log.emit(event(i));
    }
    log.flush();
    std::mem::forget(log);
    // Another spelling of the same directory, from elsewhere.
    let out = run_from(&s.log, "../archive/.");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(verify(&s.log, &with_archive(&s)).ok());
}

#[test]
fn a_dry_run_changes_nothing() {
    let s = setup();
    open_chain(&s.log, 60);
    let leftover = s.archive.join(".kvh-tmp-x.jsonl.1");
    fs::write(&leftover, b"partial").unwrap();
    let out = prune(&s, &["--older-than", "0", "--dry-run"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(leftover.exists());
    assert!(!s.archive.join(".kvh-archive").exists());
}

#[test]
fn one_run_at_a_time_and_usage_errors_are_named() {
    let s = setup();
    open_chain(&s.log, 40);
    {
        let _held = kvhygiene::forensic::prune::lock_dir(&s.archive).unwrap();
        let out = prune(&s, &["--older-than", "0"]);
        expect_failure(&out, 2, "another kvh prune-log is running");
    }
    let d = s.log.to_str().unwrap();
    let k = s.key.to_str().unwrap();
    let out = kvh(&["verify-log", d, "--key-file", k, "--archive-dir", k]);
    expect_failure(&out, 2, "not a directory");
}

#[test]
fn runs_whose_start_record_moved_are_not_judged_by_policy() {
    let s = pruned_open_chain();
    let d = s.log.to_str().unwrap();
    let k = s.key.to_str().unwrap();
    let digest = "ab".repeat(32);
    let out = kvh(&[
        "evidence",
        d,
        "--key-file",
        k,
        "--allow-pruned",
        "--json",
        "--approved-config",
        &digest,
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let ev: Value = serde_json::from_slice(&out.stdout).unwrap();
    let policy = &ev["policy"];
    assert_eq!(policy["processes_not_judged"], 1, "{policy}");
    assert_eq!(policy["processes_approved"], 0);
    assert_eq!(policy["unapproved"], serde_json::json!([]));
}

#[test]
fn a_directory_whose_every_chain_moved_has_nothing_to_verify() {
    let s = setup();
    write_log(&cfg(&s.log, 4096), 30, true);
    assert_eq!(prune(&s, &["--older-than", "0"]).status.code(), Some(0));
    let d = s.log.to_str().unwrap();
    let k = s.key.to_str().unwrap();
    let out = kvh(&["verify-log", d, "--key-file", k, "--allow-pruned"]);
    expect_failure(&out, 2, "every chain was moved whole by prune-log");
    // The readiness gate over that directory evicts (no running process's chain is there),
    // and says why rather than "empty or removed".
    let snap = s.archive.with_extension("prom");
    let mut stats = kvhygiene::stats::Stats::merge(
        "host".into(),
        &[kvhygiene::stats::PoolCounters::default()],
        None,
    );
    stats.log = serde_json::to_value(kvhygiene::forensic::LogStats::disabled()).ok();
    let text_of = kvhygiene::metrics::encode(
        &stats,
        &kvhygiene::metrics::ExporterStats::default(),
        std::time::SystemTime::now(),
    );
    fs::write(&snap, text_of).unwrap();
    let m = snap.to_str().unwrap();
    let out = kvh(&[
        "gate",
        "--metrics-file",
        m,
        "--log-dir",
        d,
        "--key-file",
        k,
        "--allow-pruned",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("every chain was moved whole by prune-log"),
        "{}",
        text(&out.stdout)
    );
    // Without --allow-pruned the gate evicts for the moved chain, said as such: the log was
    // not emptied or removed.
    let out = kvh(&["gate", "--metrics-file", m, "--log-dir", d, "--key-file", k]);
    let said = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(
        said.contains("--allow-pruned") && !said.contains("empty or was removed"),
        "{said}"
    );
    let a = s.archive.to_str().unwrap();
    let out = kvh(&["verify-log", d, "--key-file", k, "--archive-dir", a]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stdout));
}

/// A chain moved whole leaves its manifest and no file. A reading that does not take
/// manifests into account (no `--allow-pruned`, no `--archive-dir`) fails it as it fails any
/// chain with missing files, naming the manifest and the options that account for it: the
/// chain and its exceptions do not vanish from a report unseen.
#[test]
fn without_allow_pruned_a_chain_moved_whole_fails_the_reading() {
    let s = setup();
    write_log(&cfg(&s.log, 4096), 30, true);
    assert_eq!(prune(&s, &["--older-than", "0"]).status.code(), Some(0));
    let (_, m) = manifest(&s);
    let shown = manifest_path(Path::new(""), &m.chain).display().to_string();
    write_log(&cfg(&s.log, 4096), 10, true);
    let d = s.log.to_str().unwrap();
    let k = s.key.to_str().unwrap();
    for verb in ["verify-log", "evidence"] {
        let out = kvh(&[verb, d, "--key-file", k]);
        let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
        assert_eq!(out.status.code(), Some(1), "{verb}: {said}");
        assert!(
            said.contains(&shown) && said.contains(&m.chain),
            "{verb}: {said}"
        );
        assert!(said.contains("--allow-pruned"), "{verb}: {said}");
        let out = kvh(&[verb, d, "--key-file", k, "--allow-pruned"]);
        assert_eq!(out.status.code(), Some(0), "{verb}: {}", text(&out.stdout));
    }
}

#[test]
fn files_a_manifest_lists_may_not_vanish_from_the_end() {
    let s = pruned_open_chain();
    let (_, m) = manifest(&s);
    let k = m.files.len();
    assert!(k >= 4, "{k} files moved");
    // The state an interrupted run leaves: files recorded as moved are still here.
    for f in &m.files[k - 3..] {
        fs::copy(s.archive.join(&f.name), s.log.join(&f.name)).unwrap();
    }
    assert!(verify(&s.log, &pruned_opts()).ok());
    // Every file after the second of those deleted: the chain would end inside what the
    // manifest proves it reached.
    for f in chain_files(&s.log).iter().skip(2) {
        fs::remove_file(f).unwrap();
    }
    let r = verify(&s.log, &pruned_opts());
    assert!(first_reason(&r).contains("later files deleted"), "{r:?}");
}

#[test]
fn an_audit_period_reaching_into_moved_records_says_they_are_not_in_the_report() {
    let s = pruned_open_chain();
    let chain = verify(&s.log, &pruned_opts()).chains[0].chain.clone();
    let evidence = |period: &[&str]| {
        let mut args = vec![
            "evidence",
            s.log.to_str().unwrap(),
            "--key-file",
            s.key.to_str().unwrap(),
            "--allow-pruned",
            "--json",
        ];
        args.extend_from_slice(period);
        let out = kvh(&args);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        serde_json::from_slice::<Value>(&out.stdout).unwrap()
    };
    // The records were written today: a period from 2000 holds the moved ones.
    let v = evidence(&["--since", "2000-01-01"]);
    assert_eq!(
        v["audit_period"]["pruned_in_period"],
        serde_json::json!([chain]),
        "{v}"
    );
    // The stretch from 2000 to the first record read holds the moved records: its gap says
    // so, rather than that no process ran then.
    let gaps = &v["audit_period"]["gaps"];
    assert_eq!(
        gaps[0]["moved_records_of"],
        serde_json::json!([chain]),
        "{v}"
    );
    let v = evidence_with_archive(&s, &["--since", "2000-01-01"]);
    assert_eq!(
        v["audit_period"]["pruned_in_period"],
        serde_json::json!([]),
        "{v}"
    );
    let gap = &v["audit_period"]["gaps"][0];
    assert!(
        gap.is_object() && gap.get("moved_records_of").is_none(),
        "{v}"
    );
    for outside in [["--until", "2000-01-01"], ["--since", "2400-01-01"]] {
        let v = evidence(&outside);
        assert_eq!(
            v["audit_period"]["pruned_in_period"],
            serde_json::json!([]),
            "{outside:?}: {v}"
        );
    }
}

#[test]
fn an_audit_period_after_moved_records_does_not_count_what_the_run_did_before_it() {
    // One process runs throughout; its summary before the audit period (frees 10) lies in a
    // file `prune-log` moved, its summary in the period (frees 25) in a file still here. Read
    // whole (--archive-dir) the period's frees are 25 - 10 = 15. Read with --allow-pruned the
    // baseline is gone: the run's whole count (25) must not be reported as the period's; its
    // counters are left out and its chain named.
    let s = setup();
    open_chain(&s.log, 80);
    let files = chain_files(&s.log);
    assert!(files.len() >= 4, "{} files", files.len());
    let kept_from = files.len() - 2; // prune keeps the two newest files of an open chain
    let first_kept_seq = {
        let line = fs::read_to_string(&files[kept_from]).unwrap();
        let first: Value = serde_json::from_str(line.lines().next().unwrap()).unwrap();
        first["seq"].as_u64().unwrap()
    };
    let last_seq = {
        let line = fs::read_to_string(files.last().unwrap()).unwrap();
        let last: Value = serde_json::from_str(line.lines().last().unwrap()).unwrap();
        last["seq"].as_u64().unwrap()
    };
    // 2026-01-01T00:00Z plus one minute per record.
    let minute = |seq: u64| 20_454 * 86_400 * 1_000_000_000 + seq * 60_000_000_000;
    let summary = |frees: u64| serde_json::json!({"frees": frees});
    forensic_common::reseal_all(&files, &secret(), |m| {
        let seq = m["seq"].as_u64().unwrap();
        m.insert("ts".into(), minute(seq).into());
        let counters = if seq == first_kept_seq - 2 {
            Some(summary(10))
        } else if seq == last_seq {
            Some(summary(25))
        } else {
            None
        };
        if let Some(c) = counters {
            m.insert("kind".into(), "summary".into());
            m.insert("counters".into(), c);
        }
    });
    assert!(verify(&s.log, &keyed_opts()).ok());
    let out = prune(&s, &["--older-than", "0"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(chain_files(&s.log).len(), 2);

    let since = kvhygiene::forensic::verify::rfc3339(minute(first_kept_seq));
    let evidence = |how: &[&str]| {
        let mut args = vec![
            "evidence",
            s.log.to_str().unwrap(),
            "--key-file",
            s.key.to_str().unwrap(),
            "--since",
            &since,
            "--json",
        ];
        args.extend_from_slice(how);
        let out = kvh(&args);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        serde_json::from_slice::<Value>(&out.stdout).unwrap()
    };
    let whole = evidence(&["--archive-dir", s.archive.to_str().unwrap()]);
    assert_eq!(whole["counters"]["frees"], 15, "{whole}");
    assert_eq!(
        whole["audit_period"]["counters_unattributed"],
        serde_json::json!([])
    );
    let pruned = evidence(&["--allow-pruned"]);
    let chain = verify(&s.log, &pruned_opts()).chains[0].chain.clone();
    assert_eq!(
        pruned["audit_period"]["counters_unattributed"],
        serde_json::json!([chain]),
        "{pruned}"
    );
    assert_eq!(pruned["counters"].get("frees"), None, "{pruned}");
    assert_eq!(pruned["processes"].as_array().unwrap().len(), 1);
    let report = text(
        &kvh(&[
            "evidence",
            s.log.to_str().unwrap(),
            "--key-file",
            s.key.to_str().unwrap(),
            "--since",
            &since,
            "--allow-pruned",
        ])
        .stdout,
    );
    assert!(
        report.contains("its counters cannot be split at the period's start"),
        "{report}"
    );
}

/// `n` ended chains of one file each in `dir` (a `start` and a `stop` record a minute old,
/// sealed with the test secret): what short runs of a server (restarts, jobs) leave in a log
/// directory over a retention period. Written as the writer writes them (0700 directory,
/// 0600 files), without starting a writer for each.
fn ended_chains(dir: &Path, n: usize) {
    use kvhygiene::forensic::keys::EpochKey;
    use kvhygiene::forensic::record::{self, Header, GENESIS_PREV};
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    fs::create_dir_all(dir).unwrap();
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).unwrap();
    let key = EpochKey::from_secret(secret()).unwrap();
    let ts = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        - 60_000_000_000;
    for i in 0..n as u64 {
        let chain = format!("p{}-t{}", 4_000_000 + i, ts + i);
        let mut prev = GENESIS_PREV;
        let mut bytes = Vec::new();
        for (seq, kind) in [(0, "start"), (1, "stop")] {
            let h = Header {
                seq,
                ts: ts + i + seq,
                kind,
                chain: &chain,
                epoch: 0,
                prev: &prev,
            };
            let sealed = record::seal(&h, serde_json::Map::new(), Some(&key));
            bytes.extend_from_slice(&sealed.line);
            prev = sealed.hash;
        }
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(dir.join(kvhygiene::forensic::files::file_name(&chain, 0)))
            .and_then(|mut f| f.write_all(&bytes))
            .unwrap();
    }
}

/// `prune-log` moves every ended chain whole, one chain after the other, while a server
/// starts beside it (a pod restarted during the retention job). A chain file that the move
/// removed between the start-up's listing of the directory and its look at that file is gone,
/// not a refused file: every start-up opens its log.
#[test]
fn a_writer_starting_while_prune_log_moves_ended_chains_opens_its_log() {
    let s = setup();
    ended_chains(&s.log, 300);
    let mut run = prune_command(&s, s.archive.to_str().unwrap())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut starts = 0;
    let mut refused = Vec::new();
    while run.try_wait().unwrap().is_none() {
        match ForensicLog::open_with_secret(&cfg(&s.log, 4096), start(), Some(secret())) {
            Ok(log) => log.stop(),
            Err(e) => refused.push(e.to_string()),
        }
        starts += 1;
    }
    assert_eq!(run.wait().unwrap().code(), Some(0));
    assert!(
        refused.is_empty(),
        "{} of {starts} start-ups during the prune were refused, e.g. {}",
        refused.len(),
        refused[0]
    );
}

/// The manifest of an open chain (`complete: false`) proves that files came after the ones it
/// moved (`prune-log` never moves the two newest files of an open chain). Deleting every file
/// left in DIR is caught by `--allow-pruned` ("files deleted"), and reading the chain whole
/// with `--archive-dir`, which applies every rule to the chain whole, must catch it too.
#[test]
fn every_file_left_of_an_open_chain_deleted_is_caught_when_read_whole() {
    let s = pruned_open_chain();
    let (_, m) = manifest(&s);
    assert!(!m.complete);
    assert!(verify(&s.log, &with_archive(&s)).ok());
    for f in chain_files(&s.log) {
        fs::remove_file(f).unwrap();
    }
    let r = verify(&s.log, &pruned_opts());
    assert!(first_reason(&r).contains("files deleted"), "{r:?}");
    let r = verify(&s.log, &with_archive(&s));
    assert!(
        !r.ok(),
        "the files left after the prune of an open chain were deleted, yet the chain read \
         whole with --archive-dir verifies: {:?}",
        r.chains
    );
}

/// A manifest (MACed with the key) whose entries skip a record between two moved files
/// accounts for nothing: each entry must start at the seq after the previous one's last.
#[test]
fn a_manifest_whose_entries_skip_a_record_is_refused() {
    let s = pruned_open_chain();
    let (path, mut m) = manifest(&s);
    assert!(m.files.len() >= 2, "{m:?}");
    assert!(verify(&s.log, &pruned_opts()).ok());
    m.files[1].first_seq += 1;
    assert!(m.files[1].last_seq >= m.files[1].first_seq);
    m.seal(&key0());
    fs::write(&path, serde_json::to_vec(&m).unwrap()).unwrap();
    let r = verify(&s.log, &pruned_opts());
    assert!(
        first_reason(&r).contains("does not continue the one before it"),
        "{r:?}"
    );
}

/// A signed checkpoint at the very last record moved (the file it names is in the archive)
/// cannot be held to a record left in the log: it is reported as pointing into the moved
/// files.
#[test]
fn a_checkpoint_at_the_last_moved_record_points_into_the_moved_files() {
    use kvhygiene::forensic::checkpoint::{self, Checkpoint};
    use kvhygiene::forensic::keys::read_signing_key;
    let s = setup();
    open_chain(&s.log, 80);
    let files = chain_files(&s.log);
    assert!(files.len() >= 6);
    let tmp = tempfile::tempdir().unwrap();
    let (signer, public) = kvhygiene::forensic::cli::keygen(&tmp.path().join("signer")).unwrap();
    let signer = read_signing_key(&signer).unwrap();
    let last_of = |f: &Path| -> Value {
        serde_json::from_str(fs::read_to_string(f).unwrap().lines().last().unwrap()).unwrap()
    };
    let chain = verify(&s.log, &keyed_opts()).chains[0].chain.clone();
    let at = |f: &Path| {
        let last = last_of(f);
        Checkpoint {
            chain: chain.clone(),
            seq: last["seq"].as_u64().unwrap(),
            hash: kvhygiene::forensic::record::parse_hash(last["hash"].as_str().unwrap()).unwrap(),
            file: f.file_name().unwrap().to_str().unwrap().to_string(),
            ts: 1,
            key_id: None,
            public_key: None,
        }
    };
    // The checkpoint at file 2's end keeps files 2 and later in the log.
    checkpoint::write(&s.log, &signer, &at(&files[2])).unwrap();
    let out = prune(&s, &["--older-than", "0"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(chain_files(&s.log), files[2..]);
    let opts = VerifyOptions {
        public_keys: vec![read_public_key(&public).unwrap()],
        checkpoints: vec![s.log.clone()],
        ..pruned_opts()
    };
    assert!(verify(&s.log, &opts).ok());
    // One signed at the last record of file 1, the last file moved.
    let _ = fs::remove_file(checkpoint::path_for(&s.log, &chain));
    let moved_last = at(&s.archive.join(files[1].file_name().unwrap()));
    checkpoint::write(&s.log, &signer, &moved_last).unwrap();
    let r = verify(&s.log, &opts);
    assert_eq!(
        r.chains[0].pruned.as_ref().map(|p| p.last_seq),
        Some(moved_last.seq)
    );
    assert!(
        first_reason(&r).contains("points into the moved files"),
        "{r:?}"
    );
}

/// A chain moved whole is held to its signed checkpoint's hash, not only its seq: a manifest
/// sealed with the key whose last record has another hash (a rewritten chain) is refused.
#[test]
fn a_chain_moved_whole_must_end_at_its_checkpoints_hash() {
    let s = setup();
    let (_keys, public) = signed_log(&s, 40);
    let out = prune(&s, &["--older-than", "0"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(chain_files(&s.log).is_empty());
    let signed = VerifyOptions {
        public_keys: vec![read_public_key(&public).unwrap()],
        checkpoints: vec![s.log.clone()],
        ..pruned_opts()
    };
    assert!(verify(&s.log, &signed).ok());
    let (path, mut m) = manifest(&s);
    let last = m.files.last_mut().unwrap();
    let digit = if last.last_hash.starts_with('0') {
        "1"
    } else {
        "0"
    };
    last.last_hash.replace_range(0..1, digit);
    m.seal(&key0());
    fs::write(&path, serde_json::to_vec(&m).unwrap()).unwrap();
    let r = verify(&s.log, &signed);
    assert!(
        first_reason(&r).contains("is not the last record the manifest moved"),
        "{r:?}"
    );
}

/// The signed checkpoint of `chain` at the last record of `file` (or at its record `seq`),
/// as a writer that checkpointed then would have left it.
fn checkpoint_at(
    chain: &str,
    file: &Path,
    seq: Option<u64>,
) -> kvhygiene::forensic::checkpoint::Checkpoint {
    let lines: Vec<Value> = fs::read_to_string(file)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let record = match seq {
        Some(s) => lines.iter().find(|r| r["seq"] == s).unwrap(),
        None => lines.last().unwrap(),
    };
    kvhygiene::forensic::checkpoint::Checkpoint {
        chain: chain.to_string(),
        seq: record["seq"].as_u64().unwrap(),
        hash: kvhygiene::forensic::record::parse_hash(record["hash"].as_str().unwrap()).unwrap(),
        file: file.file_name().unwrap().to_str().unwrap().to_string(),
        ts: 1,
        key_id: None,
        public_key: None,
    }
}

/// An ended chain whose signed checkpoint is in its last file but before its last record
/// (the final checkpoint, at the `stop`, was never written): the file holding the checkpoint
/// stays, so the checkpoint is still held to a record; only the files before it move.
#[test]
fn an_ended_chain_whose_checkpoint_precedes_its_last_record_keeps_that_file() {
    use kvhygiene::forensic::checkpoint;
    use kvhygiene::forensic::keys::read_signing_key;
    let s = setup();
    write_log(&cfg(&s.log, 4096), 40, true);
    let files = chain_files(&s.log);
    assert!(files.len() >= 3, "{files:?}");
    let tmp = tempfile::tempdir().unwrap();
    let (signer, public) = kvhygiene::forensic::cli::keygen(&tmp.path().join("signer")).unwrap();
    let signer = read_signing_key(&signer).unwrap();
    let chain = verify(&s.log, &keyed_opts()).chains[0].chain.clone();
    let last_file = files.last().unwrap();
    let last_lines = fs::read_to_string(last_file).unwrap();
    assert!(last_lines.lines().count() >= 2, "{last_lines}");
    let stop: Value = serde_json::from_str(last_lines.lines().last().unwrap()).unwrap();
    assert_eq!(stop["kind"], "stop");
    let before_stop = stop["seq"].as_u64().unwrap() - 1;
    let c = checkpoint_at(&chain, last_file, Some(before_stop));
    checkpoint::write(&s.log, &signer, &c).unwrap();

    let out = prune(&s, &["--older-than", "0"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(
        chain_files(&s.log),
        files[files.len() - 1..],
        "the checkpoint's file stays: {}",
        text(&out.stdout)
    );
    let opts = VerifyOptions {
        public_keys: vec![read_public_key(&public).unwrap()],
        checkpoints: vec![s.log.clone()],
        ..pruned_opts()
    };
    let r = verify(&s.log, &opts);
    assert!(r.ok(), "{r:?}");
    assert_eq!(r.chains[0].checkpoint_seq, Some(before_stop));
}

/// Two checkpoints of one chain, an earlier one in the log directory and a later one in the
/// `--checkpoint` directory (with the chain's own `checkpoint` records naming the later
/// one): the earliest bounds what moves, so neither can point into the moved files.
#[test]
fn the_earliest_of_a_chains_checkpoints_bounds_what_moves() {
    use kvhygiene::forensic::checkpoint;
    use kvhygiene::forensic::keys::read_signing_key;
    let s = setup();
    let tmp = tempfile::tempdir().unwrap();
    let (signer_file, public) =
        kvhygiene::forensic::cli::keygen(&tmp.path().join("signer")).unwrap();
    let ck = tmp.path().join("ckpt");
    let mut c = cfg(&s.log, 4096);
    c.signing_key_file = Some(signer_file.clone());
    c.checkpoint_dir = Some(ck.clone());
    c.checkpoint_every_records = 25;
    let log = ForensicLog::open_with_secret(&c, start(), Some(secret())).unwrap();
    for i in 0..100 {
        log.emit(event(i));
    }
    log.flush();
    std::mem::forget(log); // a writer still running: an open chain
    let files = chain_files(&s.log);
    assert!(files.len() >= 6, "{files:?}");
    let r = verify(&s.log, &keyed_opts());
    let chain = r.chains[0].chain.clone();
    let recorded = r.chains[0].checkpoint_recorded.expect("checkpoint records");
    let elsewhere = checkpoint::peek(&checkpoint::path_for(&ck, &chain))
        .unwrap()
        .expect("the writer's checkpoint");
    // An earlier checkpoint (an auditor's copy, say), at the end of file 1.
    let signer = read_signing_key(&signer_file).unwrap();
    let early = checkpoint_at(&chain, &files[1], None);
    assert!(early.seq < recorded && early.seq < elsewhere.seq);
    checkpoint::write(&s.log, &signer, &early).unwrap();

    let out = prune(
        &s,
        &[
            "--older-than",
            "0",
            "--checkpoint",
            ck.to_str().unwrap(),
            "--public-key",
            public.to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(
        chain_files(&s.log),
        files[1..],
        "the earliest checkpoint's file stays: {}",
        text(&out.stdout)
    );
    let opts = VerifyOptions {
        public_keys: vec![read_public_key(&public).unwrap()],
        checkpoints: vec![s.log.clone()],
        ..pruned_opts()
    };
    let r = verify(&s.log, &opts);
    assert!(r.ok(), "{r:?}");
    assert_eq!(r.chains[0].checkpoint_seq, Some(early.seq));
}

#[test]
fn a_group_writable_archive_is_refused() {
    let s = setup();
    open_chain(&s.log, 20);
    let before = chain_files(&s.log);
    fs::set_permissions(&s.archive, fs::Permissions::from_mode(0o770)).unwrap();
    let out = prune(&s, &["--older-than", "0"]);
    expect_failure(&out, 2, "writable by group or others");
    assert_eq!(chain_files(&s.log), before);
}

/// A run interrupted after it wrote the manifest and before it removed the originals: the
/// files are in both places and the manifest lists them. Run again, the originals go and
/// the manifest lists each file once.
#[test]
fn a_move_interrupted_after_its_manifest_is_finished_by_running_again() {
    let s = setup();
    open_chain(&s.log, 80);
    let before = chain_files(&s.log);
    let out = prune(&s, &["--older-than", "0"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let moved = before.len() - 2;
    assert_eq!(chain_files(&s.log), before[moved..]);
    // The originals back in place, as the interrupted run left them.
    for f in &before[..moved] {
        fs::copy(s.archive.join(f.file_name().unwrap()), f).unwrap();
    }
    let (_, m) = manifest(&s);
    assert_eq!(m.files.len(), moved);

    let out = prune(&s, &["--older-than", "0"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(chain_files(&s.log), before[moved..]);
    let (_, m) = manifest(&s);
    let listed: Vec<&str> = m.files.iter().map(|f| f.name.as_str()).collect();
    let expected: Vec<String> = before[..moved]
        .iter()
        .map(|f| f.file_name().unwrap().to_str().unwrap().to_string())
        .collect();
    assert_eq!(listed, expected, "each moved file listed once");
    let r = verify(&s.log, &pruned_opts());
    assert!(r.ok(), "{r:?}");
    assert!(verify(&s.log, &with_archive(&s)).ok());
}

/// Records carry their event's time: a file whose events are all older than the cut-off
/// but which also holds a newer record (its `start` or `rotate`) is not old, and stays.
#[test]
fn a_file_with_any_record_newer_than_the_cut_off_stays() {
    let s = setup();
    let log = ForensicLog::open_with_secret(&cfg(&s.log, 4096), start(), Some(secret())).unwrap();
    let old = std::time::SystemTime::now() - std::time::Duration::from_secs(3 * 86_400);
    for i in 0..80 {
        let mut e = event(i);
        e.at = old;
        log.emit(e);
    }
    log.flush();
    std::mem::forget(log);
    let before = chain_files(&s.log);
    assert!(before.len() >= 4, "{before:?}");
    let out = prune(&s, &["--older-than", "1"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(chain_files(&s.log), before, "{}", text(&out.stdout));
    assert!(names(&s.archive, ".jsonl").is_empty());
}

/// The commands prune-log suggests for verifying afterwards (its last line) name the key
/// files it was given and run as printed: "what is left" with `--allow-pruned` while records
/// are left, only the whole chains with `--archive-dir` once every chain moved whole.
#[test]
fn the_suggested_verify_commands_run_as_printed() {
    let run_suggested = |line: &str| -> Vec<Output> {
        line.split("kvh verify-log ")
            .skip(1)
            .map(|cmd| {
                let cmd = cmd.split(';').next().unwrap().trim();
                let args: Vec<&str> = std::iter::once("verify-log")
                    .chain(cmd.split_whitespace())
                    .collect();
                kvh(&args)
            })
            .collect()
    };
    // An open chain: its two newest files stay.
    let s = setup();
    open_chain(&s.log, 80);
    let out = prune(&s, &["--older-than", "0"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let line = stdout.lines().last().unwrap();
    assert!(
        line.contains(&format!("--key-file {}", s.key.display()))
            && line.contains("--allow-pruned"),
        "{line}"
    );
    let runs = run_suggested(line);
    assert_eq!(runs.len(), 2, "{line}");
    for r in runs {
        assert_eq!(r.status.code(), Some(0), "{line}\n{}", text(&r.stdout));
    }
    // A chain that ended with a stop record moves whole.
    let s = setup();
    let log = ForensicLog::open_with_secret(&cfg(&s.log, 4096), start(), Some(secret())).unwrap();
    for i in 0..80 {
        log.emit(event(i));
    }
    log.stop();
    let out = prune(&s, &["--older-than", "0"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let line = stdout.lines().last().unwrap();
    assert!(
        line.starts_with("every chain moved whole") && !line.contains("--allow-pruned"),
        "{line}"
    );
    let runs = run_suggested(line);
    assert_eq!(runs.len(), 1, "{line}");
    assert_eq!(
        runs[0].status.code(),
        Some(0),
        "{line}\n{}",
        text(&runs[0].stdout)
    );
}

/// prune-log checked the log against its signed checkpoints (`--public-key`, `--checkpoint`)
/// before moving anything; the verify commands it suggests afterwards check them too, as the
/// key files: without them the suggested verification no longer detects a chain cut short
/// behind its checkpoint, and prints "no checkpoint checked" where prune-log checked one.
#[test]
fn the_suggested_verify_commands_carry_the_checkpoint_keys_given() {
    let s = setup();
    let tmp = tempfile::tempdir().unwrap();
    let (signer_file, public) =
        kvhygiene::forensic::cli::keygen(&tmp.path().join("signer")).unwrap();
    let ck = tmp.path().join("ckpt");
    let mut c = cfg(&s.log, 4096);
    c.signing_key_file = Some(signer_file);
    c.checkpoint_dir = Some(ck.clone());
    c.checkpoint_every_records = 25;
    let log = ForensicLog::open_with_secret(&c, start(), Some(secret())).unwrap();
    for i in 0..100 {
        log.emit(event(i));
    }
    log.flush();
    std::mem::forget(log); // a writer still running: an open chain
    let out = prune(
        &s,
        &[
            "--older-than",
            "0",
            "--public-key",
            public.to_str().unwrap(),
            "--checkpoint",
            ck.to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let line = stdout.lines().last().unwrap();
    for cmd in line.split("kvh verify-log ").skip(1) {
        assert!(
            cmd.contains(&format!("--public-key {}", public.display()))
                && cmd.contains(&format!("--checkpoint {}", ck.display())),
            "a suggested verify command without the checkpoint keys prune-log was given: {line}"
        );
    }
}

/// The verify commands prune-log suggests run as printed in a POSIX shell whatever the bytes
/// of the log directory's name: a name that is not UTF-8 is quoted as it is, not replaced by
/// another name (U+FFFD) that no directory has.
#[test]
fn the_suggested_verify_commands_name_a_non_utf8_log_directory_as_it_is() {
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    let base = setup();
    let log = base
        ._tmp
        .path()
        .join(std::ffi::OsStr::from_bytes(b"log \xff"));
    let s = Setup {
        log,
        archive: base.archive.clone(),
        key: base.key.clone(),
        _tmp: base._tmp,
    };
    open_chain(&s.log, 80);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kvh"));
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("KVH_")) {
        cmd.env_remove(k);
    }
    let out = cmd
        .arg("prune-log")
        .arg(&s.log)
        .arg("--archive-dir")
        .arg(&s.archive)
        .arg("--key-file")
        .arg(&s.key)
        .args(["--older-than", "0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let last = out
        .stdout
        .split(|&b| b == b'\n')
        .rfind(|l| !l.is_empty())
        .unwrap()
        .to_vec();
    let line = std::ffi::OsString::from_vec(last);
    let line = line.as_bytes();
    let at = line
        .windows(b"kvh verify-log ".len())
        .position(|w| w == b"kvh verify-log ")
        .unwrap();
    let rest = &line[at + b"kvh ".len()..];
    let end = rest.iter().position(|&b| b == b';').unwrap_or(rest.len());
    let suggested = std::ffi::OsStr::from_bytes(&rest[..end]);
    let mut script = std::ffi::OsString::from("exec \"$0\" ");
    script.push(suggested);
    let run = Command::new("sh")
        .arg("-c")
        .arg(&script)
        .arg(env!("CARGO_BIN_EXE_kvh"))
        .output()
        .unwrap();
    assert_eq!(
        run.status.code(),
        Some(0),
        "{}: {}{}",
        String::from_utf8_lossy(suggested.as_bytes()),
        text(&run.stdout),
        text(&run.stderr)
    );
}

/// The two directories given the wrong way round (a plausible slip in a cron job): the
/// archive, marked `.kvh-archive`, as the log directory and the live log directory as the
/// archive. The run is refused as a usage error, and the log directory is not marked as an
/// archive (the writer refuses a marked directory, so the next process start would fail).
#[test]
fn an_archive_given_as_the_log_directory_and_the_log_as_the_archive_is_refused() {
    let s = setup();
    // An ended chain, moved whole by a first, correct run.
    write_log(&cfg(&s.log, 4096), 40, true);
    assert_eq!(prune(&s, &["--older-than", "0"]).status.code(), Some(0));
    assert!(s.archive.join(".kvh-archive").exists());
    // A process writes a new chain in the log directory.
    write_log(&cfg(&s.log, 4096), 5, true);
    let out = kvh(&[
        "prune-log",
        s.archive.to_str().unwrap(),
        "--archive-dir",
        s.log.to_str().unwrap(),
        "--key-file",
        s.key.to_str().unwrap(),
        "--older-than",
        "0",
    ]);
    assert!(
        !s.log.join(".kvh-archive").exists(),
        "the live log directory was marked as an archive: {}",
        text(&out.stdout)
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("wrong way round"),
        "{}",
        text(&out.stderr)
    );
    ForensicLog::open_with_secret(&cfg(&s.log, 4096), start(), Some(secret()))
        .expect("a writer still opens the log directory")
        .stop();
    // Another log directory (not marked) given as the archive is refused too, and stays a
    // log directory.
    let other = s._tmp.path().join("other-log");
    write_log(&cfg(&other, 4096), 5, true);
    let out = kvh(&[
        "prune-log",
        s.log.to_str().unwrap(),
        "--archive-dir",
        other.to_str().unwrap(),
        "--key-file",
        s.key.to_str().unwrap(),
        "--older-than",
        "0",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stdout));
    assert!(
        text(&out.stderr).contains("not an archive"),
        "{}",
        text(&out.stderr)
    );
    assert!(!other.join(".kvh-archive").exists());
}

/// Every file of a chain with a signed checkpoint deleted by hand, and an empty file planted
/// under the name of its prune manifest. A reading without `--allow-pruned` does not read the
/// manifest, so it cannot say what the manifest says: the chain's files are reported deleted
/// (as the checkpoint proves), not "moved by kvh prune-log" on the word of a file nobody
/// read, which is not even a manifest.
#[test]
fn an_empty_file_named_as_a_manifest_does_not_turn_deleted_files_into_a_prune() {
    let s = setup();
    let (_keys, public) = signed_log(&s, 40);
    let chain = verify(&s.log, &keyed_opts()).chains[0].chain.clone();
    let d = s.log.to_str().unwrap();
    let k = s.key.to_str().unwrap();
    let p = public.to_str().unwrap();
    for f in chain_files(&s.log) {
        fs::remove_file(f).unwrap();
    }
    let out = kvh(&["verify-log", d, "--key-file", k, "--public-key", p]);
    let said = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(said.contains("files deleted"), "{said}");
    fs::write(manifest_path(&s.log, &chain), b"").unwrap();
    let out = kvh(&["verify-log", d, "--key-file", k, "--public-key", p]);
    let said = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(
        said.contains("files deleted") && !said.contains("says kvh prune-log moved them"),
        "{said}"
    );
}

/// Every file of an ended chain with a signed checkpoint deleted by hand, and an unsealed
/// manifest planted in its place that copies the checkpoint's seq and hash (both readable in
/// the checkpoint file): what someone who can write the log directory, without the HMAC key,
/// can forge. The reading is given the HMAC key (`--key-file`), with which the manifest's MAC
/// could be checked; a manifest whose MAC does not verify with it accounts for nothing. So the
/// chain's files are reported deleted, as without the planted file, and the report does not
/// say the checkpoint was verified at a record nobody could read.
#[test]
fn an_unsealed_manifest_copying_the_checkpoint_does_not_turn_deleted_files_into_a_prune() {
    let s = setup();
    let (_keys, public) = signed_log(&s, 40);
    let signed = VerifyOptions {
        public_keys: vec![read_public_key(&public).unwrap()],
        checkpoints: vec![s.log.clone()],
        ..keyed_opts()
    };
    let r = verify(&s.log, &signed);
    assert!(r.ok(), "{r:?}");
    let chain = r.chains[0].chain.clone();
    let seq = r.chains[0].checkpoint_seq.unwrap();
    assert_eq!(
        Some(seq),
        r.chains[0].last_seq,
        "the final checkpoint is at the stop"
    );
    let hash = r.chains[0].last_hash.clone().unwrap();
    for f in chain_files(&s.log) {
        fs::remove_file(f).unwrap();
    }
    let forged = manifest_of_whole_chain(&chain, seq, &hash);
    fs::write(
        manifest_path(&s.log, &chain),
        serde_json::to_vec(&forged).unwrap(),
    )
    .unwrap();
    let d = s.log.to_str().unwrap();
    let k = s.key.to_str().unwrap();
    let p = public.to_str().unwrap();
    let out = kvh(&["verify-log", d, "--key-file", k, "--public-key", p]);
    let said = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(
        said.contains("files deleted") && !said.contains("says kvh prune-log moved them"),
        "a manifest without a MAC, read with the key at hand, is taken as a prune: {said}"
    );
    assert!(
        !said.contains(&format!("checkpoint at seq {seq} verified")),
        "the checkpoint is said verified against an unsealed manifest: {said}"
    );
}

/// Takes the append-only mark (`chattr -a`) off a directory when dropped.
struct AppendOnly(PathBuf);

impl Drop for AppendOnly {
    fn drop(&mut self) {
        let _ = Command::new("chattr").arg("-a").arg(&self.0).status();
    }
}

/// A log directory marked append-only (`chattr +a`), as a writer without a signing key
/// accepts it: prune-log installs each manifest there by a rename and removes the moved files,
/// neither of which such a directory allows. It refuses the directory saying why (as the
/// writer does for a checkpoint directory), and leaves no temporary manifest behind: none
/// can be removed from that directory afterwards, so each run would add one.
#[test]
fn prune_log_in_an_append_only_log_directory_says_so_and_leaves_no_temporary_files() {
    let s = setup();
    write_log(&cfg(&s.log, 4096), 40, true);
    let marked = Command::new("chattr")
        .arg("+a")
        .arg(&s.log)
        .status()
        .is_ok_and(|st| st.success());
    if !marked {
        skip::skipped("chattr +a is not available here (needs root and ext4 or alike)");
        return;
    }
    let _unmark = AppendOnly(s.log.clone());
    let mut said = String::new();
    for _ in 0..2 {
        let out = prune(&s, &["--older-than", "0"]);
        assert_ne!(out.status.code(), Some(0));
        said = text(&out.stderr);
    }
    let left: Vec<String> = fs::read_dir(&s.log)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(
        left.is_empty(),
        "two runs left temporary manifests in the append-only log directory: {left:?}\n{said}"
    );
    assert!(
        said.contains("append-only"),
        "the refusal does not name the cause: {said}"
    );
}

/// A chain file marked append-only (`chattr +a`, as an operator may mark the log's files)
/// cannot be removed from the log directory, even by root. prune-log finds that out before
/// it copies anything, as it does for an append-only directory: no copy goes to the archive
/// and no manifest records the file as moved while it stays in the log. Otherwise its report
/// says it moved nothing while its manifest records the chain as moved (skipped where
/// `chattr` is missing).
#[test]
fn prune_log_refuses_an_append_only_chain_file_before_copying_or_recording_it() {
    let s = setup();
    write_log(&cfg(&s.log, 4096), 40, true);
    let first = chain_files(&s.log).remove(0);
    let marked = Command::new("chattr")
        .arg("+a")
        .arg(&first)
        .status()
        .is_ok_and(|st| st.success());
    if !marked {
        skip::skipped("chattr +a is not available here (needs root and ext4 or alike)");
        return;
    }
    let _unmark = AppendOnly(first.clone());
    // With --json, the chain that could not move is said on stdout too, with why.
    let json = prune(&s, &["--older-than", "0", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap_or_default();
    let name = first.file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        v["refused"].as_array().is_some_and(|r| r
            .iter()
            .any(|e| e.as_str().is_some_and(|e| e.contains(&name)))),
        "{}{}",
        text(&json.stdout),
        text(&json.stderr)
    );
    let out = prune(&s, &["--older-than", "0"]);
    let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert_ne!(out.status.code(), Some(0), "{said}");
    let manifests = names(&s.log, ".pruned.json");
    let copies = names(&s.archive, ".jsonl");
    assert!(
        manifests.is_empty() && copies.is_empty(),
        "{} still in the log directory, yet recorded as moved in {manifests:?} and copied to the \
         archive ({copies:?}):\n{said}",
        first.file_name().unwrap().to_string_lossy()
    );
}

/// An archive directory marked append-only (`chattr +a`), which keeps evidence from being
/// removed: prune-log moves into it, the chains read back whole from it, and nothing is left
/// in it under a temporary name (its copies are made unnamed and linked in). Skipped where
/// `chattr` is not available.
#[test]
fn an_append_only_archive_takes_the_moved_files_and_nothing_else() {
    let s = setup();
    write_log(&cfg(&s.log, 4096), 30, true);
    let marked = std::process::Command::new("chattr")
        .arg("+a")
        .arg(&s.archive)
        .status()
        .is_ok_and(|st| st.success());
    if !marked {
        skip::skipped("chattr +a is not available here");
        return;
    }
    let out = prune(&s, &["--older-than", "0"]);
    let archived = names(&s.archive, "");
    let _ = std::process::Command::new("chattr")
        .arg("-a")
        .arg(&s.archive)
        .status();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(chain_files(&s.log).is_empty(), "{archived:?}");
    assert!(
        archived
            .iter()
            .all(|n| n.ends_with(".jsonl") || n == ".kvh-archive"),
        "{archived:?}"
    );
    let whole = verify(&s.log, &with_archive(&s));
    assert!(whole.ok(), "{whole:?}");
}

/// Takes the append-only and immutable marks (`chattr -a -i`) off a file when dropped.
struct Marked(PathBuf);

impl Drop for Marked {
    fn drop(&mut self) {
        let _ = Command::new("chattr")
            .arg("-a")
            .arg("-i")
            .arg(&self.0)
            .status();
    }
}

/// An ended chain of 40 events in three or more files, its file `index` marked append-only
/// (`chattr +a`): the chain's files and the guard that takes the mark off. `None` (the test
/// skipped, said on stderr) where `chattr` is missing.
fn ended_chain_with_marked_file(s: &Setup, index: usize) -> Option<(Vec<PathBuf>, Marked)> {
    write_log(&cfg(&s.log, 4096), 40, true);
    let files = chain_files(&s.log);
    assert!(files.len() >= 3, "{files:?}");
    if !chattr("+a", &files[index]) {
        skip::skipped("chattr +a is not available here");
        return None;
    }
    let unmark = Marked(files[index].clone());
    Some((files, unmark))
}

fn chattr(flag: &str, path: &Path) -> bool {
    Command::new("chattr")
        .arg(flag)
        .arg(path)
        .status()
        .is_ok_and(|st| st.success())
}

/// A chain file marked append-only (`chattr +a`) stays in the log directory, and so do the
/// files after it, whether the mark is on the chain's oldest file or on a later one. The
/// run's outcome says so the same way in both cases: a file that could not be moved is an
/// error in the exit status (as it is when the marked file is the oldest: exit 2), not a
/// successful run whose only trace is a line on stderr (skipped where `chattr` is missing).
#[test]
fn a_marked_chain_file_after_moved_ones_fails_the_run_as_a_marked_oldest_file_does() {
    let s = setup();
    let Some((files, _unmark)) = ended_chain_with_marked_file(&s, 1) else {
        return;
    };
    let later = prune(&s, &["--older-than", "0", "--json"]);
    let said_later = format!("{}{}", text(&later.stdout), text(&later.stderr));
    assert!(files[1].exists(), "{said_later}");
    // The marked file is now the chain's oldest one.
    let oldest = prune(&s, &["--older-than", "0", "--json"]);
    let said_oldest = format!("{}{}", text(&oldest.stdout), text(&oldest.stderr));
    assert_eq!(
        later.status.code(),
        oldest.status.code(),
        "a marked file left behind after moved ones:\n{said_later}\nthe same file as the \
         chain's oldest:\n{said_oldest}"
    );
}

/// The prune manifest of a chain marked append-only (`chattr +a`, as an operator may mark
/// the log directory's files): the next run installs the chain's new manifest by a rename over
/// it, which the mark refuses. As for a marked chain file, prune-log finds that out before it
/// copies anything: no copy goes to the archive that no manifest records (skipped where
/// `chattr` is missing).
#[test]
fn a_marked_prune_manifest_is_found_before_anything_is_copied() {
    let s = setup();
    // An open chain, pruned once (its manifest written), whose writer then goes on and
    // rotates into more files that may move.
    let log = ForensicLog::open_with_secret(&cfg(&s.log, 4096), start(), Some(secret())).unwrap();
    for i in 0..80 {
        log.emit(event(i));
    }
    log.flush();
    let first = prune(&s, &["--older-than", "0"]);
    assert_eq!(first.status.code(), Some(0), "{}", text(&first.stderr));
    for i in 80..160 {
        log.emit(event(i));
    }
    log.flush();
    let manifests = names(&s.log, ".pruned.json");
    assert_eq!(manifests.len(), 1, "{}", text(&first.stderr));
    let manifest = s.log.join(&manifests[0]);
    if !chattr("+a", &manifest) {
        skip::skipped("chattr +a is not available here");
        return;
    }
    let _unmark = Marked(manifest.clone());
    let copies_before = names(&s.archive, ".jsonl");
    let second = prune(&s, &["--older-than", "0"]);
    let said = format!("{}{}", text(&second.stdout), text(&second.stderr));
    let copies_after = names(&s.archive, ".jsonl");
    assert_ne!(second.status.code(), Some(0), "{said}");
    assert_eq!(
        copies_after, copies_before,
        "copied to the archive, yet not recorded as moved (the manifest could not be \
         replaced):\n{said}"
    );
}

/// An archive directory marked append-only (`chattr +a`) on a file system that cannot make
/// unnamed files (`open(O_TMPFILE)` answers EOPNOTSUPP, as overlayfs did before Linux 6.6;
/// here an `LD_PRELOAD` shim stands for it): prune-log's copies then go through a temporary
/// name, which that directory never lets it remove. Either the archive is refused (as an
/// append-only archive was before copies were made unnamed) or nothing is left in it under a
/// temporary name: each run would add a full copy of every moved file under a name no
/// verifier reads (skipped where `chattr` or a C compiler is missing).
#[test]
fn an_append_only_archive_without_unnamed_files_is_left_no_temporary_copies() {
    let s = setup();
    write_log(&cfg(&s.log, 4096), 30, true);
    let shim_dir = tempfile::tempdir().unwrap();
    let src = shim_dir.path().join("no_tmpfile.c");
    let shim = shim_dir.path().join("no_tmpfile.so");
    fs::write(
        &src,
        r#"
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdarg.h>
#define TMPFILE_BIT 020000000
typedef int (*open_fn)(const char*, int, ...);
static int opened(const char* name, const char* p, int flags, int mode) {
    if ((flags & TMPFILE_BIT) == TMPFILE_BIT) { errno = EOPNOTSUPP; return -1; }
    return ((open_fn)dlsym(RTLD_NEXT, name))(p, flags, mode);
}
int open64(const char* p, int flags, ...) {
    va_list a; va_start(a, flags); int m = va_arg(a, int); va_end(a);
    return opened("open64", p, flags, m);
}
int open(const char* p, int flags, ...) {
    va_list a; va_start(a, flags); int m = va_arg(a, int); va_end(a);
    return opened("open", p, flags, m);
}
"#,
    )
    .unwrap();
    let built = Command::new(std::env::var("CC").unwrap_or_else(|_| "cc".into()))
        .args(["-shared", "-fPIC", "-o"])
        .arg(&shim)
        .arg(&src)
        .arg("-ldl")
        .status();
    match built {
        Ok(st) => assert!(st.success(), "the shim does not compile: {st}"),
        Err(e) => {
            skip::skipped(&format!("no C compiler for the shim: {e}"));
            return;
        }
    }
    if !chattr("+a", &s.archive) {
        skip::skipped("chattr +a is not available here");
        return;
    }
    let _unmark = AppendOnly(s.archive.clone());
    let out = prune_command(&s, s.archive.to_str().unwrap())
        .env("LD_PRELOAD", &shim)
        .output()
        .unwrap();
    let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
    let archived = names(&s.archive, "");
    let left: Vec<&String> = archived
        .iter()
        .filter(|n| n.starts_with(".kvh-tmp-"))
        .collect();
    assert!(
        left.is_empty(),
        "left in the append-only archive under temporary names (exit {:?}): {left:?}\n{said}",
        out.status.code()
    );
}

/// An archive directory marked immutable (`chattr +i`): nothing can be created in it. The
/// refusal names the cause, as it does for a log directory marked so, rather than only the
/// system's "Operation not permitted" for a file in it (skipped where `chattr` is missing).
#[test]
fn an_immutable_archive_is_refused_naming_the_mark() {
    let s = setup();
    write_log(&cfg(&s.log, 4096), 30, true);
    if !chattr("+i", &s.archive) {
        skip::skipped("chattr +i is not available here");
        return;
    }
    let _unmark = Marked(s.archive.clone());
    let out = prune(&s, &["--older-than", "0"]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("immutable"), "{err}");
}

/// A chain file marked append-only (`chattr +a`) that would not move anyway (its records are
/// newer than --older-than allows) is never removed nor replaced: the run is expected to go
/// as it does without the mark (nothing moves, exit 0, "moved 0 files"), the dry run saying
/// the same, rather than the chain being refused for a file it would leave in place
/// (skipped where `chattr` is missing).
#[test]
fn a_marked_file_too_recent_to_move_does_not_refuse_the_chain() {
    let s = setup();
    open_chain(&s.log, 60);
    let files = chain_files(&s.log);
    assert!(files.len() >= 3, "{files:?}");
    if !chattr("+a", &files[0]) {
        skip::skipped("chattr +a is not available here");
        return;
    }
    let _unmark = Marked(files[0].clone());
    for extra in [
        &["--older-than", "1"][..],
        &["--older-than", "1", "--dry-run"][..],
    ] {
        let out = prune(&s, extra);
        let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
        assert_eq!(out.status.code(), Some(0), "{extra:?}: {said}");
        assert!(
            text(&out.stdout).contains("moved 0 files") || extra.len() == 3,
            "{extra:?}: {said}"
        );
    }
    assert_eq!(chain_files(&s.log), files);
}

/// A chain file marked append-only (`chattr +a`) after files that move, with stdout that
/// cannot be written (`/dev/full`): the moves are made and only the report is lost. As for a
/// chain refused outright (its oldest file marked), stderr is expected to still name the
/// marked file that stays, since stdout carried nothing (skipped where `chattr` is missing).
#[test]
fn a_marked_file_left_after_moved_ones_is_named_on_stderr_when_stdout_fails() {
    let s = setup();
    let Some((files, _unmark)) = ended_chain_with_marked_file(&s, 1) else {
        return;
    };
    let full = fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let out = prune_command(&s, s.archive.to_str().unwrap())
        .stdout(full)
        .output()
        .unwrap();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(!files[0].exists(), "the oldest file did not move: {err}");
    assert!(
        err.contains("append-only") && err.contains(&files[1].display().to_string()),
        "stdout lost, and stderr does not name the marked file that stayed: {err}"
    );
}

/// docs/forensic-log.md, "Reading a pruned log": without `--allow-pruned` (or
/// `--archive-dir`) a chain moved whole is reported at its manifest's name. A reading with no
/// `--key-file` cannot verify the manifest's MAC: it fails the chain and repeats the
/// manifest's claim only marked as not verified, never as a fact.
#[test]
fn without_a_key_file_a_chain_moved_whole_is_not_said_moved_by_prune_log() {
    let s = setup();
    write_log(&cfg(&s.log, 4096), 30, true);
    assert_eq!(prune(&s, &["--older-than", "0"]).status.code(), Some(0));
    write_log(&cfg(&s.log, 4096), 10, true);
    let out = kvh(&["verify-log", s.log.to_str().unwrap()]);
    let said = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(
        said.contains("not verified (no --key-file)") && said.contains("--allow-pruned"),
        "the manifest's claim, unverified, is said as such: {said}"
    );
}

/// Checkpoint files found in the log directory are read without their signature when
/// `prune-log` bounds what may move (docs/forensic-log.md, Retention, step 2: "a forged one
/// can only make less move"). An ended chain whose signed checkpoint (kept in its own
/// checkpoint directory) covers a record before its `stop` keeps the file holding that record,
/// also when an unsigned-for checkpoint file in the log directory claims the last record.
#[test]
fn a_checkpoint_file_signed_by_another_key_does_not_let_an_ended_chain_move_whole() {
    use kvhygiene::forensic::checkpoint::{self, Checkpoint};
    use kvhygiene::forensic::keys::read_signing_key;
    let s = setup();
    let tmp = tempfile::tempdir().unwrap();
    let Signed {
        cfg: c,
        ck,
        signer: signer_file,
        public,
    } = signed(&s, tmp.path(), 25);
    let (other_file, _) = kvhygiene::forensic::cli::keygen(&tmp.path().join("other")).unwrap();
    write_log(&c, 100, true);
    let files = chain_files(&s.log);
    let r = verify(&s.log, &keyed_opts());
    let chain = r.chains[0].chain.clone();
    let recorded = r.chains[0].checkpoint_recorded.expect("checkpoint records");
    assert!(recorded < r.chains[0].last_seq.unwrap());
    // The chain's signed checkpoint covers `recorded` (its final one, at the stop, was never
    // written).
    let path = checkpoint::path_for(&ck, &chain);
    let real = checkpoint::peek(&path).unwrap().unwrap();
    let holder = files
        .iter()
        .find(|f| {
            fs::read_to_string(f)
                .unwrap()
                .contains(&format!("\"seq\":{recorded},"))
        })
        .unwrap()
        .clone();
    let earlier = Checkpoint {
        key_id: real.key_id.clone(),
        public_key: real.public_key,
        ..checkpoint_at(&chain, &holder, Some(recorded))
    };
    fs::remove_file(&path).unwrap();
    checkpoint::write(&ck, &read_signing_key(&signer_file).unwrap(), &earlier).unwrap();
    let opts = VerifyOptions {
        public_keys: vec![read_public_key(&public).unwrap()],
        checkpoints: vec![ck.clone()],
        ..pruned_opts()
    };
    assert!(verify(&s.log, &opts).ok());
    // A checkpoint file in the log directory at the chain's last record, signed by a key
    // that is not the chain's.
    let planted = checkpoint_at(&chain, files.last().unwrap(), None);
    checkpoint::write(&s.log, &read_signing_key(&other_file).unwrap(), &planted).unwrap();

    let out = prune(&s, &["--older-than", "0"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        chain_files(&s.log).contains(&holder),
        "the file holding the signed checkpoint (seq {recorded}) moved: {}",
        text(&out.stdout)
    );
    let r = verify(&s.log, &opts);
    assert!(r.ok(), "{:?}", r.first_problem());
}

/// A manifest records the archive's path as text, and later runs move a chain's files only to
/// that archive: an archive whose path is not UTF-8 could not be found the same by a later run
/// (a nightly job would fail from its second night on), so it is refused at once (exit 2),
/// naming it, with nothing moved.
#[test]
fn an_archive_whose_path_is_not_utf8_is_refused_before_anything_moves() {
    use std::os::unix::ffi::OsStrExt;
    let s = setup();
    open_chain(&s.log, 80);
    let before = chain_files(&s.log);
    let archive = s
        .archive
        .parent()
        .unwrap()
        .join(std::ffi::OsStr::from_bytes(b"archive-\xff"));
    fs::create_dir(&archive).unwrap();
    fs::set_permissions(&archive, fs::Permissions::from_mode(0o700)).unwrap();
    let out = kvh(&[
        "prune-log".as_ref(),
        s.log.as_os_str(),
        "--archive-dir".as_ref(),
        archive.as_os_str(),
        "--older-than".as_ref(),
        "0".as_ref(),
        "--key-file".as_ref(),
        s.key.as_os_str(),
    ]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("archive-") && err.contains("not UTF-8"),
        "{err}"
    );
    assert_eq!(chain_files(&s.log), before, "nothing moved");
}

/// The archive is marked (.kvh-archive), and a writer refuses a checkpoint directory that
/// holds the mark as it refuses such a log directory. `prune-log` given the checkpoint
/// directory (the one named by --checkpoint, holding the chains' checkpoints) as
/// --archive-dir refuses it (exit 2), so writers that keep their checkpoints there still
/// start.
#[test]
fn the_checkpoint_directory_given_as_the_archive_is_refused() {
    let s = setup();
    let tmp = tempfile::tempdir().unwrap();
    let Signed {
        cfg: c, ck, public, ..
    } = signed(&s, tmp.path(), 0);
    write_log(&c, 60, true);
    let out = kvh(&[
        "prune-log",
        s.log.to_str().unwrap(),
        "--archive-dir",
        ck.to_str().unwrap(),
        "--older-than",
        "0",
        "--key-file",
        s.key.to_str().unwrap(),
        "--public-key",
        public.to_str().unwrap(),
        "--checkpoint",
        ck.to_str().unwrap(),
    ]);
    let opened = ForensicLog::open_with_secret(&c, start(), Some(secret()));
    assert!(
        opened.is_ok(),
        "prune-log exited {:?} ({}); a writer with this checkpoint directory: {}",
        out.status.code(),
        text(&out.stdout),
        opened.err().unwrap()
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
}

/// A chain written by a writer whose records name no signer (records before the `signer`
/// field; the verifier still takes such chains, "not bound to its keys"), with `checkpoint`
/// records along the way, that ended with `stop`; its final checkpoint, at the last record,
/// signed, is in the log directory. `prune-log` without `--public-key` moves such a chain
/// whole, as it moves one whose records name the signer, and what is left verifies with the
/// checkpoint.
#[test]
fn an_ended_chain_whose_records_name_no_signer_moves_whole_with_its_final_checkpoint() {
    use kvhygiene::forensic::checkpoint;
    use kvhygiene::forensic::keys::read_signing_key;
    let s = setup();
    let tmp = tempfile::tempdir().unwrap();
    let (signer_file, public) =
        kvhygiene::forensic::cli::keygen(&tmp.path().join("signer")).unwrap();
    let mut c = cfg(&s.log, 4096);
    c.signing_key_file = Some(signer_file.clone());
    c.checkpoint_every_records = 25;
    write_log(&c, 100, true);
    let files = chain_files(&s.log);
    assert!(files.len() >= 3, "{files:?}");
    // The same chain as a writer that names no signer writes it.
    forensic_common::reseal_all(&files, &secret(), |m| {
        m.remove("signer");
    });
    let r = verify(&s.log, &keyed_opts());
    assert!(r.ok(), "{:?}", r.first_problem());
    let chain = r.chains[0].chain.clone();
    let recorded = r.chains[0].checkpoint_recorded.expect("checkpoint records");
    assert!(recorded < r.chains[0].last_seq.unwrap());
    // Its final checkpoint, at the stop record, signed by the writer's key.
    let path = checkpoint::path_for(&s.log, &chain);
    let _ = fs::remove_file(&path);
    let last = checkpoint_at(&chain, files.last().unwrap(), None);
    checkpoint::write(&s.log, &read_signing_key(&signer_file).unwrap(), &last).unwrap();
    let opts = VerifyOptions {
        public_keys: vec![read_public_key(&public).unwrap()],
        checkpoints: vec![s.log.clone()],
        ..pruned_opts()
    };
    let r = verify(&s.log, &opts);
    assert!(r.ok(), "{:?}", r.first_problem());
    assert_eq!(r.chains[0].checkpoint_seq, r.chains[0].last_seq);

    let out = prune(&s, &["--older-than", "0"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        chain_files(&s.log).is_empty(),
        "an ended chain whose final checkpoint is at its last record did not move whole: {}",
        text(&out.stdout)
    );
    let r = verify(&s.log, &opts);
    assert!(r.ok(), "{:?}", r.first_problem());
}

/// Runs `prune-log` with `args` as a dry run, then for real, and asserts that both exit
/// `code`: the dry run fails, or passes, where the real run does.
fn dry_run_agrees(s: &Setup, args: &[&str], code: i32) {
    let dry = prune(s, &[args, &["--dry-run"]].concat());
    let out = prune(s, args);
    assert_eq!(
        out.status.code(),
        Some(code),
        "precondition: the real run: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert_eq!(
        dry.status.code(),
        Some(code),
        "the dry run disagrees with the real run: {}{} (the real run: {})",
        text(&dry.stdout),
        text(&dry.stderr),
        text(&out.stderr)
    );
}

/// A dry run says what the real run would do: into an archive whose file system is too small
/// for the copies, the real run stops when it is full (exit 2; a chain not copied whole stays
/// whole in the log, nothing is lost), and the dry run says so before, naming the space. An archive
/// with room passes the dry run.
#[test]
fn a_dry_run_names_an_archive_too_small_for_the_copies() {
    let s = setup();
    open_chain(&s.log, 600);
    let before = chain_files(&s.log);
    let Some(_small) = Mounted::tmpfs(&s.archive, "64k", "") else {
        return;
    };
    let dry = prune(&s, &["--older-than", "0", "--dry-run"]);
    expect_failure(&dry, 2, "file system has");
    assert_eq!(chain_files(&s.log), before, "a dry run moved files");
    let out = prune(&s, &["--older-than", "0"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        verify(&s.log, &with_archive(&s)).ok(),
        "the log with what reached the archive no longer verifies"
    );
    drop(_small);

    let Some(_roomy) = Mounted::tmpfs(&s.archive, "64m", "") else {
        return;
    };
    let dry = prune(&s, &["--older-than", "0", "--dry-run"]);
    assert_eq!(dry.status.code(), Some(0), "{}", text(&dry.stderr));
}

/// A dry run into an archive on a read-only file system fails as the real run does (exit 2),
/// saying that no file can be created there; for root too, whom the mode bits do not stop.
#[test]
fn a_dry_run_names_an_archive_no_file_can_be_created_in() {
    let s = setup();
    open_chain(&s.log, 60);
    let Some(_ro) = Mounted::tmpfs(&s.archive, "1m", ",ro") else {
        return;
    };
    let dry = prune(&s, &["--older-than", "0", "--dry-run"]);
    expect_failure(&dry, 2, "no file can be created");
    let out = prune(&s, &["--older-than", "0"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
}

/// A tmpfs mounted with `size=0` has no size limit (tmpfs(5)); its `statvfs` reports no
/// blocks at all, as ramfs's does. The real run copies into such an archive (exit 0), so the
/// dry run before it, which says what the real run would do, passes too.
#[test]
fn a_dry_run_passes_for_an_archive_on_a_file_system_without_a_size_limit() {
    let s = setup();
    open_chain(&s.log, 60);
    let Some(_unlimited) = Mounted::tmpfs(&s.archive, "0", "") else {
        return;
    };
    dry_run_agrees(&s, &["--older-than", "0"], 0);
    assert!(
        !names(&s.archive, ".jsonl").is_empty(),
        "precondition: copies in the archive"
    );
}

/// An archive whose file system has room for the bytes but not for as many files (here a
/// tmpfs with 4 inodes: its root and three files) stops the real run when the inodes run
/// out (exit 2); the dry run, which fails where the real run would meet an archive that
/// cannot take a new file, fails too.
#[test]
fn a_dry_run_names_an_archive_with_too_few_inodes_for_the_copies() {
    let s = setup();
    open_chain(&s.log, 600);
    let Some(_few) = Mounted::tmpfs(&s.archive, "64m", ",nr_inodes=4") else {
        return;
    };
    dry_run_agrees(&s, &["--older-than", "0"], 2);
}

/// A first run into an archive on a file system with no file left to create (a tmpfs of one
/// inode, its root): the real run marks the archive before it looks for anything to move, so
/// it stops (exit 2) even when nothing is old enough to move. The dry run before it, which
/// counts the archive's marker on a first run, fails too.
#[test]
fn a_dry_run_that_moves_nothing_still_needs_room_for_the_archives_marker() {
    let s = setup();
    open_chain(&s.log, 20);
    let Some(_full) = Mounted::tmpfs(&s.archive, "64m", ",nr_inodes=1") else {
        return;
    };
    dry_run_agrees(&s, &["--older-than", "1"], 2);
}

/// A first run into an archive whose file system has inodes left but no bytes (a 64 KiB
/// tmpfs filled to its last page by another file): the real run writes the archive's marker
/// (its text needs a page) before it looks for anything to move, so it stops (exit 2) even
/// when nothing is old enough to move. The dry run before it counts the marker on a first
/// run, so it must find no room for it either and fail too.
#[test]
fn a_dry_run_that_moves_nothing_still_needs_bytes_for_the_archives_marker() {
    let s = setup();
    open_chain(&s.log, 20);
    let Some(_full) = Mounted::tmpfs(&s.archive, "64k", "") else {
        return;
    };
    // Fill the file system: writes stop at ENOSPC.
    {
        use std::io::Write;
        let mut filler = fs::File::create(s.archive.join("filler")).unwrap();
        let page = vec![0u8; 4096];
        while filler.write_all(&page).is_ok() {}
    }
    dry_run_agrees(&s, &["--older-than", "1"], 2);
}

/// The 4 KiB pages a tmpfs archive takes for copies of `files` and the archive's marker.
fn pages_of_copies_and_marker(files: &[PathBuf]) -> u64 {
    let copies: u64 = files
        .iter()
        .map(|f| fs::metadata(f).unwrap().len().div_ceil(4096))
        .sum();
    copies + 1
}

/// A first run into an archive whose file system holds exactly the copies, each in whole
/// blocks, and the archive's marker: the real run copies every file that may move (exit 0),
/// so the dry run before it, which counts each copy in whole blocks, passes too.
#[test]
fn a_dry_run_passes_for_an_archive_with_room_for_the_copies_in_whole_blocks() {
    let s = setup();
    write_log(&cfg(&s.log, 4096), 40, true);
    let files = chain_files(&s.log);
    assert!(files.len() > 2, "precondition: several files");
    // tmpfs counts whole pages: each copy takes its bytes rounded up to a page, the marker
    // one page.
    let pages = pages_of_copies_and_marker(&files);
    let size = format!("{}k", pages * 4);
    let Some(_fits) = Mounted::tmpfs(&s.archive, &size, "") else {
        return;
    };
    dry_run_agrees(&s, &["--older-than", "0"], 0);
    assert!(
        chain_files(&s.log).is_empty(),
        "precondition: the real run moved the ended chain whole"
    );
}

/// A first run into an archive on the same file system as the log directory: the real run
/// copies the files, then writes the chain's manifest into the log directory (a temporary
/// file, renamed) before it removes any original, so that file system must hold the copies,
/// the archive's marker and the manifest at once. Where it holds the copies and the marker
/// in whole blocks but not one block more, the real run stops at the manifest (exit 2, the
/// chain stays in the log), and the dry run before it, which says what the real run would
/// do, fails too.
#[test]
fn a_dry_run_counts_the_manifest_when_the_archive_shares_the_logs_file_system() {
    let Setup { _tmp, key, .. } = setup();
    let root = _tmp.path().join("fs");
    fs::create_dir(&root).unwrap();
    let s = Setup {
        log: root.join("log"),
        archive: root.join("archive"),
        key,
        _tmp,
    };
    let Some(_shared) = Mounted::tmpfs(&root, "16m", "") else {
        return;
    };
    fs::create_dir(&s.archive).unwrap();
    fs::set_permissions(&s.archive, fs::Permissions::from_mode(0o700)).unwrap();
    write_log(&cfg(&s.log, 4096), 40, true);
    let files = chain_files(&s.log);
    assert!(files.len() > 2, "precondition: several files");
    // tmpfs counts whole pages: each copy takes its bytes rounded up to a page, the marker
    // one page. Another file fills the rest of the file system.
    let pages = pages_of_copies_and_marker(&files);
    fill_leaving(&root, pages);
    dry_run_agrees(&s, &["--older-than", "0"], 2);
}

/// A first run whose log directory's file system (a tmpfs of its own; the archive is
/// elsewhere) is full: the real run copies the files, then cannot write the chain's manifest
/// (exit 2, the chain stays in the log), and the dry run before it fails too.
#[test]
fn a_dry_run_counts_the_manifest_on_a_full_log_file_system() {
    let Setup { _tmp, key, .. } = setup();
    let root = _tmp.path().join("fs");
    fs::create_dir(&root).unwrap();
    let archive = _tmp.path().join("archive");
    let s = Setup {
        log: root.join("log"),
        archive,
        key,
        _tmp,
    };
    let Some(_log_fs) = Mounted::tmpfs(&root, "16m", "") else {
        return;
    };
    write_log(&cfg(&s.log, 4096), 40, true);
    assert!(chain_files(&s.log).len() > 2, "precondition: several files");
    fill_leaving(&root, 0);
    dry_run_agrees(&s, &["--older-than", "0"], 2);
}

/// Free 4 KiB pages of the file system holding `dir`.
fn free_pages(dir: &Path) -> u64 {
    let c = std::ffi::CString::new(dir.to_str().unwrap()).unwrap();
    // SAFETY: a NUL-terminated path and a zeroed, writable statvfs.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut st) }, 0);
    assert_eq!(st.f_frsize, 4096, "precondition: 4 KiB pages");
    st.f_bfree as u64
}

/// Fills the file system of `dir` (a tmpfs) with a file in `dir`, leaving `pages` free.
fn fill_leaving(dir: &Path, pages: u64) {
    let fill = free_pages(dir) - pages;
    fs::write(dir.join("filler"), vec![0u8; (fill * 4096) as usize]).unwrap();
    assert_eq!(
        free_pages(dir),
        pages,
        "precondition: {pages} pages left free"
    );
}

/// Exceptions read from the archive (`--archive-dir`) are named by their file's path there,
/// where an auditor finds them; those in the log directory by their file's name.
#[test]
fn exceptions_read_from_the_archive_name_the_archived_file() {
    let s = pruned_open_chain();
    let v = evidence_with_archive(&s, &[]);
    let files: Vec<&str> = v["exceptions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["file"].as_str().unwrap())
        .collect();
    let archived = format!("{}/kvh-", s.archive.display());
    assert!(
        files.first().is_some_and(|f| f.starts_with(&archived)),
        "{files:?}"
    );
    let last = files.last().unwrap();
    assert!(
        last.starts_with("kvh-") && s.log.join(last).is_file(),
        "{files:?}"
    );
}

/// A chain `prune-log` moved whole holds records (in the archive) and its signed checkpoint
/// matched its manifest: `kvh evidence --allow-pruned` must not count it among the chains
/// "without a record, which no checkpoint covers" (`integrity.empty_chains`).
#[test]
fn a_chain_moved_whole_is_not_counted_as_a_chain_without_a_record() {
    let s = setup();
    let keys = tempfile::tempdir().unwrap();
    let (signer, public) = kvhygiene::forensic::cli::keygen(&keys.path().join("signer")).unwrap();
    let mut c = cfg(&s.log, 4096);
    c.signing_key_file = Some(signer);
    write_log(&c, 40, true);
    let out = prune(&s, &["--older-than", "0"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(chain_files(&s.log).is_empty());
    // A second chain, left in the log directory.
    write_log(&c, 5, true);
    let out = kvh(&[
        "evidence",
        s.log.to_str().unwrap(),
        "--key-file",
        s.key.to_str().unwrap(),
        "--public-key",
        public.to_str().unwrap(),
        "--allow-pruned",
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let i = &v["integrity"];
    assert_eq!(i["checkpoints_matched"], serde_json::json!(2), "{i}");
    assert_eq!(
        i["empty_chains"],
        serde_json::json!(0),
        "the chain moved whole has records and a matched checkpoint: {i}"
    );
}

/// `kvh evidence --json` of `s`'s log read whole (`--archive-dir`), with `extra` arguments;
/// the run must succeed.
fn evidence_with_archive(s: &Setup, extra: &[&str]) -> Value {
    let mut args = vec![
        "evidence",
        s.log.to_str().unwrap(),
        "--key-file",
        s.key.to_str().unwrap(),
        "--archive-dir",
        s.archive.to_str().unwrap(),
        "--json",
    ];
    args.extend_from_slice(extra);
    let out = kvh(&args);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// After a prune of `k` files, the oldest file left (index `k`) deleted too: the manifest
/// accounts for files 0 to `k - 1`, and the report names the missing files as the other
/// reports of missing files do, an inclusive range (`files 0..{k}`, files 0 to `k`), not one
/// that reaches the first file present (`k + 1`).
#[test]
fn a_manifest_short_of_the_missing_files_names_them_as_an_inclusive_range() {
    let s = pruned_open_chain();
    let left = chain_files(&s.log);
    let (_, m) = manifest(&s);
    let k = m.files.len();
    fs::remove_file(&left[0]).unwrap();
    let r = verify(&s.log, &pruned_opts());
    let reason = first_reason(&r);
    assert!(reason.contains("do not account"), "{reason}");
    assert!(
        reason.contains(&format!("files 0..{k}"))
            && !reason.contains(&format!("files 0..{}", k + 1)),
        "files 0 to {k} are missing (file {} is the first present): {reason}",
        k + 1
    );
}

/// docs/operations.md (During an incident): a chain sealed with a retired key, verified
/// without it, fails with `MAC mismatch at epoch 0` or `MAC mismatch: the chain's signed
/// checkpoint names HMAC key id ..., which none of the keys given has`, "which is not
/// tampering". The incident commands there read the log with `--allow-pruned`: a pruned
/// chain sealed with another key is expected to fail with one of those two messages too.
#[test]
fn a_pruned_chain_sealed_with_another_key_fails_as_the_runbook_quotes() {
    let s = pruned_open_chain();
    let other = tempfile::tempdir().unwrap();
    let key = other.path().join("current.key");
    fs::write(&key, b"another-secret-0123456789abcdef").unwrap();
    fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).unwrap();
    let out = kvh(&[
        "verify-log",
        s.log.to_str().unwrap(),
        "--key-file",
        key.to_str().unwrap(),
        "--allow-pruned",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
    let runbook =
        fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/operations.md"))
            .unwrap();
    // As read: the lines of a paragraph join with a space.
    let runbook = runbook.split_whitespace().collect::<Vec<_>>().join(" ");
    let quoted = [
        "MAC mismatch at epoch 0",
        "MAC mismatch: the chain's signed checkpoint names HMAC key id",
        "manifest MAC mismatch",
    ];
    for q in quoted {
        assert!(
            runbook.contains(q),
            "docs/operations.md does not quote {q:?}"
        );
    }
    assert!(quoted.iter().any(|q| said.contains(q)), "{said}");
}

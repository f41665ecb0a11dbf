//! Each chain is bound to its own keys: what the holder of a retired HMAC secret or of a
//! retired private signing key can try on a chain of the current keys, once verifiers take
//! both (each attack must fail, in every way of reading the log), and the legitimate logs that
//! must keep verifying (crash recovery by a process with another signing key). Chains whose
//! checkpoint names no key verify, and are reported as not bound to their keys.

#[path = "cli_common/mod.rs"]
mod cli_common;
mod forensic_common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use forensic_common::{
    cfg, chain_files, event, manifest_of_whole_chain, name, read_lines, reseal_all, start, verify,
    write_lines,
};
use kvhygiene::events::EventSink;
use kvhygiene::forensic::checkpoint::{self, Checkpoint};
use kvhygiene::forensic::cli::VerifyLogArgs;
use kvhygiene::forensic::evidence::{self, EvidenceArgs};
use kvhygiene::forensic::keys::{read_public_key, read_signing_key, EpochKey};
use kvhygiene::forensic::prune::{manifest_key, manifest_path, PrunedFile};
use kvhygiene::forensic::record::{self, parse_hash};
use kvhygiene::forensic::verify::ChainReport;
use kvhygiene::forensic::{ForensicLog, Report, SealKey, VerifyOptions};
use serde_json::Value;
use zeroize::Zeroizing;

const OLD: &[u8] = b"old-secret-retired-in-june-0123456789";
const NEW: &[u8] = b"new-secret-current-since-june-987654";

fn secret(s: &[u8]) -> Zeroizing<Vec<u8>> {
    Zeroizing::new(s.to_vec())
}

struct Env {
    tmp: tempfile::TempDir,
    log: PathBuf,
    archive: PathBuf,
    old_sk: PathBuf,
    new_sk: PathBuf,
    old_pub: PathBuf,
    new_pub: PathBuf,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    Plain,
    AllowPruned,
    Archive,
}
const MODES: [Mode; 3] = [Mode::Plain, Mode::AllowPruned, Mode::Archive];

impl Env {
    fn new() -> Env {
        let tmp = tempfile::tempdir().unwrap();
        let log = tmp.path().join("log");
        let archive = tmp.path().join("archive");
        fs::create_dir(&archive).unwrap();
        fs::set_permissions(&archive, fs::Permissions::from_mode(0o700)).unwrap();
        let (old_sk, old_pub) = kvhygiene::forensic::cli::keygen(&tmp.path().join("old")).unwrap();
        let (new_sk, new_pub) = kvhygiene::forensic::cli::keygen(&tmp.path().join("new")).unwrap();
        for (n, s) in [("old-hmac.key", OLD), ("new-hmac.key", NEW)] {
            fs::write(tmp.path().join(n), s).unwrap();
        }
        Env {
            tmp,
            log,
            archive,
            old_sk,
            new_sk,
            old_pub,
            new_pub,
        }
    }

    fn opts(&self, mode: Mode) -> VerifyOptions {
        VerifyOptions {
            hmac_keys: vec![
                SealKey::new("new", secret(NEW)),
                SealKey::new("old", secret(OLD)),
            ],
            public_keys: [&self.new_pub, &self.old_pub]
                .iter()
                .map(|p| read_public_key(p).unwrap())
                .collect(),
            checkpoints: vec![self.log.clone()],
            allow_pruned: matches!(mode, Mode::AllowPruned),
            archive_dirs: if matches!(mode, Mode::Archive) {
                vec![self.archive.clone()]
            } else {
                vec![]
            },
            ..Default::default()
        }
    }

    /// One chain sealed with `s`, signed by `sk`; ended unless `open`. Returns its files.
    fn chain(&self, s: &[u8], sk: &Path, n: u64, every: u64, open: bool) -> Vec<PathBuf> {
        let before = if self.log.exists() {
            chain_files(&self.log)
        } else {
            vec![]
        };
        let mut c = cfg(&self.log, 4096);
        c.signing_key_file = Some(sk.to_path_buf());
        c.checkpoint_every_records = every;
        let w = ForensicLog::open_with_secret(&c, start(), Some(secret(s))).unwrap();
        for i in 0..n {
            w.emit(event(i));
        }
        if open {
            w.flush();
            std::mem::forget(w);
        } else {
            w.stop();
        }
        std::thread::sleep(Duration::from_millis(5));
        let mut new: Vec<PathBuf> = chain_files(&self.log)
            .into_iter()
            .filter(|p| !before.contains(p))
            .collect();
        new.sort();
        new
    }

    /// An old-key chain, then the victim (new keys).
    fn rotated(&self, every: u64, open: bool) -> Vec<PathBuf> {
        self.chain(OLD, &self.old_sk, 30, 0, false);
        let v = self.chain(NEW, &self.new_sk, 120, every, open);
        assert!(v.len() >= 4, "{v:?}");
        for m in MODES {
            let r = verify(&self.log, &self.opts(m));
            assert!(r.ok(), "{m:?} {:?} {:?}", r.first_problem(), r.errors);
        }
        v
    }

    /// The ways of reading the log in which the attack on `chain` was not caught.
    fn accepting_modes(&self, chain: &str) -> Vec<Mode> {
        MODES
            .into_iter()
            .filter(|m| !caught(&verify(&self.log, &self.opts(*m)), chain))
            .collect()
    }

    fn prune(&self) {
        let mut cmd = cli_common::kvh();
        cmd.args([
            "prune-log",
            self.log.to_str().unwrap(),
            "--archive-dir",
            self.archive.to_str().unwrap(),
            "--older-than",
            "0",
        ]);
        for k in ["new-hmac.key", "old-hmac.key"] {
            cmd.arg("--key-file").arg(self.tmp.path().join(k));
        }
        for p in [&self.new_pub, &self.old_pub] {
            cmd.arg("--public-key").arg(p);
        }
        let (code, out, err) = cli_common::run(&mut cmd);
        assert_eq!(code, 0, "{out}{err}");
    }
}

fn chain_of(file: &Path) -> String {
    let n = file.file_name().unwrap().to_str().unwrap();
    let rest = n.strip_prefix("kvh-").unwrap();
    rest[..rest.rfind('-').unwrap()].to_string()
}

fn victim_report<'a>(r: &'a Report, chain: &str) -> Option<&'a ChainReport> {
    r.chains.iter().find(|c| c.chain == chain)
}

/// The verification caught the attack on `chain`: it failed (a chain, or a report error);
/// a chain that vanished from the report is not caught.
fn caught(r: &Report, chain: &str) -> bool {
    !r.ok() && (victim_report(r, chain).is_none_or(|c| !c.ok()) || !r.errors.is_empty())
}

/// Replaces the chain's checkpoint with one at `line` (a record's JSON) of `file`, signed
/// with `sk` and naming `key_id`.
fn forge_ckpt(
    ckpt_dir: &Path,
    chain: &str,
    file: &Path,
    line: &str,
    sk: &Path,
    key_id: Option<String>,
) {
    let rec: Value = serde_json::from_str(line).unwrap();
    let c = Checkpoint {
        chain: chain.to_string(),
        seq: rec["seq"].as_u64().unwrap(),
        hash: parse_hash(rec["hash"].as_str().unwrap()).unwrap(),
        file: name(file),
        ts: rec["ts"].as_u64().unwrap(),
        key_id,
        public_key: None,
    };
    let p = checkpoint::path_for(ckpt_dir, chain);
    let _ = fs::remove_file(&p);
    checkpoint::write(ckpt_dir, &read_signing_key(sk).unwrap(), &c).unwrap();
}

/// Cuts `chain` back to the first `keep` lines of `file` (all of them with `usize::MAX`),
/// deletes the chain's `later` files, and re-signs its checkpoint there with the retired
/// signing key, naming `key_id`: the truncation the holder of that key alone can make.
fn cut_and_resign(
    e: &Env,
    chain: &str,
    file: &Path,
    keep: usize,
    later: &[PathBuf],
    key_id: Option<String>,
) {
    for f in later {
        fs::remove_file(f).unwrap();
    }
    let lines = read_lines(file);
    let keep = keep.min(lines.len());
    write_lines(file, &lines[..keep]);
    forge_ckpt(&e.log, chain, file, &lines[keep - 1], &e.old_sk, key_id);
}

fn ckpt_of(dir: &Path, chain: &str) -> Checkpoint {
    checkpoint::peek(&checkpoint::path_for(dir, chain))
        .unwrap()
        .unwrap()
}

// ---------------------------------------------------------------------------------------
// The retired private signing key alone.

/// The current chain cut back to its `start` record (before its first `checkpoint` record)
/// and its checkpoint re-signed there with the retired key, the public key_id copied from
/// the genuine checkpoint: the `start` record names the signer.
#[test]
fn a_retired_signing_key_cannot_cut_a_current_chain_back_to_its_start() {
    let e = Env::new();
    let victim = e.rotated(0, false);
    let chain = chain_of(&victim[0]);
    let key_id = ckpt_of(&e.log, &chain).key_id;
    assert!(key_id.is_some());
    cut_and_resign(&e, &chain, &victim[0], 1, &victim[1..], key_id);
    let accepted = e.accepting_modes(&chain);
    assert!(
        accepted.is_empty(),
        "truncated chain accepted in {accepted:?}"
    );
}

/// After a prune, the walk with `allow_pruned` starts at the first file left: cut the chain
/// before that file's first `checkpoint` record and re-sign there with the retired key. The
/// file's `rotate` record names the signer.
#[test]
fn a_retired_signing_key_cannot_cut_a_pruned_chain() {
    let e = Env::new();
    let victim = e.rotated(25, true);
    let chain = chain_of(&victim[0]);
    e.prune();
    let r = verify(&e.log, &e.opts(Mode::AllowPruned));
    assert!(r.ok(), "{:?}", r.first_problem());
    let left: Vec<PathBuf> = chain_files(&e.log)
        .into_iter()
        .filter(|p| chain_of(p) == chain)
        .collect();
    let first = &left[0];
    assert!(
        !name(first).ends_with("000000.jsonl"),
        "nothing moved: {left:?}"
    );
    let lines = read_lines(first);
    let keep = lines
        .iter()
        .position(|l| l.contains("\"kind\":\"checkpoint\""))
        .unwrap_or(lines.len())
        .max(1);
    let key_id = ckpt_of(&e.log, &chain).key_id;
    let before = r.chains.iter().find(|c| c.chain == chain).unwrap().last_seq;
    cut_and_resign(&e, &chain, first, keep, &left[1..], key_id);
    let r = verify(&e.log, &e.opts(Mode::AllowPruned));
    let after = victim_report(&r, &chain).and_then(|c| c.last_seq);
    assert!(
        caught(&r, &chain),
        "pruned chain truncated from seq {before:?} to {after:?}, accepted"
    );
}

/// A chain whose checkpoint names no key (and whose records name no signer) is not bound to
/// its keys: it verifies, cut short and re-signed with a retired key too, and every report
/// says it is not bound, with several keys given.
#[test]
fn a_chain_whose_checkpoint_names_no_key_is_reported_not_bound() {
    let e = Env::new();
    let victim = e.rotated(0, false);
    let chain = chain_of(&victim[0]);
    reseal_all(&victim, NEW, |m| {
        m.remove("signer");
    });
    let last = read_lines(victim.last().unwrap()).last().unwrap().clone();
    forge_ckpt(
        &e.log,
        &chain,
        victim.last().unwrap(),
        &last,
        &e.new_sk,
        None,
    );
    let bound = |m: Mode| {
        let r = verify(&e.log, &e.opts(m));
        assert!(r.ok(), "{m:?}: {:?} {:?}", r.first_problem(), r.errors);
        victim_report(&r, &chain).unwrap().keys_bound
    };
    for m in MODES {
        assert!(!bound(m), "{m:?}");
    }
    // Cut short and re-signed with the retired key: not caught, still not bound.
    cut_and_resign(&e, &chain, &victim[1], usize::MAX, &victim[2..], None);
    assert!(!bound(Mode::Plain));
    // The chains of the writer bind their keys; the evidence names the one that does not.
    let r = verify(&e.log, &e.opts(Mode::Plain));
    assert!(r.chains.iter().any(|c| c.chain != chain && c.keys_bound));
    let mut a = VerifyLogArgs::of(e.log.clone());
    a.key_file = vec![
        e.tmp.path().join("new-hmac.key"),
        e.tmp.path().join("old-hmac.key"),
    ];
    a.public_key = vec![e.new_pub.clone(), e.old_pub.clone()];
    let ev = evidence::collect(&EvidenceArgs {
        max_exceptions: 10,
        ..EvidenceArgs::of(a)
    })
    .unwrap();
    assert_eq!(ev.integrity.unbound, std::slice::from_ref(&chain));
    let (code, out, _) = cli_common::run(
        cli_common::kvh()
            .args(["verify-log", e.log.to_str().unwrap(), "--public-key"])
            .arg(&e.new_pub)
            .arg("--public-key")
            .arg(&e.old_pub)
            .arg("--key-file")
            .arg(e.tmp.path().join("new-hmac.key"))
            .arg("--key-file")
            .arg(e.tmp.path().join("old-hmac.key")),
    );
    assert_eq!(code, 0, "{out}");
    assert_eq!(out.matches("not bound to its keys").count(), 1, "{out}");
}

/// A second checkpoint file for the chain, signed with the retired key, is an error.
#[test]
fn a_second_checkpoint_signed_by_a_retired_key_is_an_error() {
    let e = Env::new();
    let victim = e.rotated(0, false);
    let chain = chain_of(&victim[0]);
    let ckpt = fs::read(checkpoint::path_for(&e.log, &chain)).unwrap();
    let lines = read_lines(&victim[0]);
    forge_ckpt(&e.log, &chain, &victim[0], &lines[0], &e.old_sk, None);
    fs::rename(
        checkpoint::path_for(&e.log, &chain),
        e.log.join("kvh-zzz.ckpt"),
    )
    .unwrap();
    fs::write(checkpoint::path_for(&e.log, &chain), ckpt).unwrap();
    assert_eq!(e.accepting_modes(&chain), []);
}

/// An earlier checkpoint of the chain, signed by its own writer (a copy kept from a
/// snapshot), put beside the writer's file under another name, sorting before or after it:
/// the run fails, the chain is checked against the writer's file, and the error names the
/// other one as the extra.
#[test]
fn an_earlier_checkpoint_put_beside_the_writers_is_the_extra_one() {
    for extra in ["kvh-0earlier.ckpt", "kvh-zearlier.ckpt"] {
        let e = Env::new();
        let victim = e.rotated(0, false);
        let chain = chain_of(&victim[0]);
        let writers = checkpoint::path_for(&e.log, &chain);
        let genuine = fs::read(&writers).unwrap();
        let ck: Value = serde_json::from_slice(&genuine).unwrap();
        let key_id = ck["key_id"].as_str().map(str::to_string);
        let lines = read_lines(&victim[0]);
        forge_ckpt(&e.log, &chain, &victim[0], &lines[1], &e.new_sk, key_id);
        fs::rename(&writers, e.log.join(extra)).unwrap();
        fs::write(&writers, &genuine).unwrap();
        let r = verify(&e.log, &e.opts(Mode::Plain));
        assert_eq!(r.exit_code(), 1, "{extra}: {r:?}");
        let err = r
            .errors
            .iter()
            .find(|x| x.contains("a second checkpoint"))
            .unwrap_or_else(|| panic!("{extra}: {:?}", r.errors));
        assert!(
            err.starts_with(&e.log.join(extra).display().to_string()),
            "{err}"
        );
        assert!(!err.contains("a copy of the same bytes"), "{err}");
        let c = r.chains.iter().find(|c| c.chain == chain).unwrap();
        assert_eq!(c.checkpoint_seq, ck["seq"].as_u64(), "{extra}: {c:?}");
    }
}

// ---------------------------------------------------------------------------------------
// The retired HMAC secret alone.

/// The checkpoint deleted, the chain re-MACed with the retired secret and edited.
#[test]
fn a_retired_secret_cannot_reseal_a_chain_whose_checkpoint_was_deleted() {
    let e = Env::new();
    let victim = e.rotated(0, false);
    let chain = chain_of(&victim[0]);
    fs::remove_file(checkpoint::path_for(&e.log, &chain)).unwrap();
    reseal_all(&victim, OLD, |m| {
        if m.get("tenant_id").is_some_and(|t| !t.is_null()) {
            m.insert("tenant_id".into(), "someone-else".into());
        }
    });
    assert_eq!(e.accepting_modes(&chain), []);
}

/// A chain whose checkpoint names no key, removed with the retired secret alone: its files
/// deleted, and a manifest MACed with the retired secret saying it moved whole, ending at
/// the (public) checkpoint's seq and hash. Not caught, and reported as not bound.
#[test]
fn a_chain_moved_whole_whose_checkpoint_names_no_key_is_reported_not_bound() {
    let e = Env::new();
    let victim = e.rotated(0, false);
    let chain = chain_of(&victim[0]);
    let last = read_lines(victim.last().unwrap()).last().unwrap().clone();
    forge_ckpt(
        &e.log,
        &chain,
        victim.last().unwrap(),
        &last,
        &e.new_sk,
        None,
    );
    assert!(verify(&e.log, &e.opts(Mode::AllowPruned)).ok());
    let c = ckpt_of(&e.log, &chain);
    for f in &victim {
        fs::remove_file(f).unwrap();
    }
    let mut m = manifest_of_whole_chain(&chain, c.seq, &record::hex(&c.hash));
    m.seal(&manifest_key(&secret(OLD)).unwrap());
    fs::write(
        manifest_path(&e.log, &chain),
        serde_json::to_vec(&m).unwrap(),
    )
    .unwrap();
    let r = verify(&e.log, &e.opts(Mode::AllowPruned));
    let c = victim_report(&r, &chain).unwrap();
    assert!(c.ok() && !c.keys_bound, "{c:?}");
    // With the checkpoint naming the chain's secret, the same manifest fails.
    let with_key_id = Checkpoint {
        key_id: Some(EpochKey::from_secret(secret(NEW)).unwrap().key_id()),
        ..ckpt_of(&e.log, &chain)
    };
    fs::remove_file(checkpoint::path_for(&e.log, &chain)).unwrap();
    checkpoint::write(&e.log, &read_signing_key(&e.new_sk).unwrap(), &with_key_id).unwrap();
    assert!(caught(&verify(&e.log, &e.opts(Mode::AllowPruned)), &chain));
}

/// A pruned open chain: the retired secret's holder writes a manifest that claims more files
/// moved, and deletes them.
#[test]
fn a_retired_secret_cannot_extend_a_manifest() {
    let e = Env::new();
    let victim = e.rotated(25, true);
    let chain = chain_of(&victim[0]);
    e.prune();
    let left: Vec<PathBuf> = chain_files(&e.log)
        .into_iter()
        .filter(|p| chain_of(p) == chain)
        .collect();
    let mut m = kvhygiene::forensic::prune::read_manifest(&e.log, &chain)
        .unwrap()
        .unwrap();
    let bytes = fs::read(&left[0]).unwrap();
    use sha2::Digest;
    let lines = read_lines(&left[0]);
    let lastrec: Value = serde_json::from_str(lines.last().unwrap()).unwrap();
    let firstrec: Value = serde_json::from_str(&lines[0]).unwrap();
    m.files.push(PrunedFile {
        name: name(&left[0]),
        sha256: record::hex(&sha2::Sha256::digest(&bytes)),
        first_seq: firstrec["seq"].as_u64().unwrap(),
        last_seq: lastrec["seq"].as_u64().unwrap(),
        last_hash: lastrec["hash"].as_str().unwrap().into(),
        oldest_ts: 0,
        newest_ts: 0,
    });
    m.seal(&manifest_key(&secret(OLD)).unwrap());
    fs::write(
        manifest_path(&e.log, &chain),
        serde_json::to_vec(&m).unwrap(),
    )
    .unwrap();
    fs::remove_file(&left[0]).unwrap();
    assert!(caught(&verify(&e.log, &e.opts(Mode::AllowPruned)), &chain));
}

// ---------------------------------------------------------------------------------------
// Genuine logs: crash recovery, by a process with the same keys or another signing key.

/// The writer process the recovery tests kill: run as this test binary's `child_entry`
/// with these variables set (a no-op test otherwise). An empty signing key path runs it
/// without one.
const CHILD_DIR: &str = "KEY_BINDING_CHILD_DIR";
const CHILD_SK: &str = "KEY_BINDING_CHILD_SK";

#[test]
fn child_entry() {
    let (Some(dir), Some(sk)) = (std::env::var_os(CHILD_DIR), std::env::var_os(CHILD_SK)) else {
        return;
    };
    let mut c = cfg(Path::new(&dir), 4096);
    c.signing_key_file = (!sk.is_empty()).then(|| PathBuf::from(sk));
    c.checkpoint_every_records = 20;
    let log = ForensicLog::open_with_secret(&c, start(), Some(secret(NEW))).unwrap();
    let mut i = 0;
    loop {
        log.emit(event(i));
        i += 1;
        if i % 50 == 0 {
            log.flush();
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

/// Where the killed writer was.
#[derive(Clone, Copy, PartialEq)]
enum Crash {
    /// Anywhere in a file.
    MidFile,
    /// Between creating its next file and writing that file's first line: the newest file
    /// holds a torn fragment and the chain's last record is in the file before.
    BetweenFiles,
}

/// A writer with the current secret and signing key `sk` (none: `None`) killed mid-run, then
/// a process with the current secret and signing key `then_sk` that writes 60 events and
/// stops, with its checkpoints in `ckpt_dir`. Returns the crashed chain and the second
/// process's.
fn crash_then_restart(
    e: &Env,
    sk: Option<&Path>,
    then_sk: &Path,
    ckpt_dir: &Path,
    crash: Crash,
) -> (String, String) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["child_entry", "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_DIR, &e.log)
        .env(
            CHILD_SK,
            sk.map_or(Default::default(), |p| p.as_os_str().to_owned()),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while (!e.log.exists() || chain_files(&e.log).len() < 6) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let files = chain_files(&e.log);
    let crashed = chain_of(&files[0]);
    if crash == Crash::BetweenFiles {
        // The newest file, if the kill already left it without a complete line; else a next
        // one, after cutting a torn line off the newest (rotation leaves files complete).
        let newest = files.last().unwrap();
        let bytes = fs::read(newest).unwrap();
        let path = match bytes.iter().rposition(|&b| b == b'\n') {
            None => newest.clone(),
            Some(end) => {
                fs::write(newest, &bytes[..=end]).unwrap();
                let next = kvhygiene::forensic::files::file_name(&crashed, files.len() as u64);
                e.log.join(next)
            }
        };
        fs::write(&path, b"{\"chain\":\"").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
    }
    let mut c = cfg(&e.log, 4096);
    c.signing_key_file = Some(then_sk.to_path_buf());
    c.checkpoint_dir = Some(ckpt_dir.to_path_buf());
    c.checkpoint_every_records = 20;
    let w = ForensicLog::open_with_secret(&c, start(), Some(secret(NEW))).unwrap();
    let chain = w.stats().chain.clone().unwrap();
    for i in 0..60 {
        w.emit(event(i));
    }
    w.stop();
    (crashed, chain)
}

/// The records of `chain` that name a signer, by signer.
fn signers_of(log: &Path, chain: &str) -> std::collections::BTreeSet<String> {
    chain_files(log)
        .iter()
        .filter(|f| chain_of(f) == chain)
        .flat_map(|f| read_lines(f))
        .filter_map(|l| {
            serde_json::from_str::<Value>(&l).ok()?["signer"]
                .as_str()
                .map(String::from)
        })
        .collect()
}

/// After a rotation of the signing key alone, a crashed chain of the old one is not
/// continued by a process with the new one: it starts its own chain, so no chain has two
/// signers (with two, the old key's holder could cut off what the new one signed and
/// re-sign the end). Both chains verify, bound to their keys.
#[test]
fn a_process_with_another_signing_key_starts_a_new_chain() {
    let e = Env::new();
    let (crashed, chain) =
        crash_then_restart(&e, Some(&e.old_sk), &e.new_sk, &e.log, Crash::MidFile);
    assert_ne!(crashed, chain, "the crashed chain was continued");
    assert_eq!(signers_of(&e.log, &crashed).len(), 1);
    assert_eq!(signers_of(&e.log, &chain).len(), 1);
    for m in MODES {
        let r = verify(&e.log, &e.opts(m));
        assert!(r.ok(), "{m:?}: {:?} {:?}", r.first_problem(), r.errors);
        assert!(r.chains.iter().all(|c| c.keys_bound), "{m:?}: {r:?}");
        assert!(
            !victim_report(&r, &crashed).unwrap().closed,
            "crashed: open"
        );
    }
}

/// With the same keys, the crashed chain is continued (a `recovery` record), and verifies.
#[test]
fn a_process_with_the_same_keys_continues_a_crashed_chain() {
    let e = Env::new();
    let (crashed, chain) =
        crash_then_restart(&e, Some(&e.new_sk), &e.new_sk, &e.log, Crash::MidFile);
    assert_eq!(crashed, chain, "not continued");
    assert_eq!(signers_of(&e.log, &chain).len(), 1);
    for m in MODES {
        let r = verify(&e.log, &e.opts(m));
        assert!(r.ok(), "{m:?}: {:?} {:?}", r.first_problem(), r.errors);
        assert!(victim_report(&r, &chain).unwrap().keys_bound);
    }
}

/// A chain whose writer did not sign may gain a signer: a process with a signing key that
/// keeps its checkpoints in another directory continues it; the chain verifies bound (no
/// checkpoint before the signer is named can exist), also after a prune of the whole chain.
#[test]
fn an_unsigned_chain_continued_by_a_signing_process_verifies() {
    let e = Env::new();
    let ck = e.tmp.path().join("ckpts");
    let (crashed, chain) = crash_then_restart(&e, None, &e.new_sk, &ck, Crash::MidFile);
    assert_eq!(crashed, chain, "not continued");
    let check = |label: &str, modes: &[Mode]| {
        for &m in modes {
            let o = VerifyOptions {
                checkpoints: vec![ck.clone()],
                ..e.opts(m)
            };
            let r = verify(&e.log, &o);
            assert!(
                r.ok(),
                "{label} {m:?}: {:?} {:?}",
                r.first_problem(),
                r.errors
            );
            assert!(
                r.chains.iter().all(|c| c.keys_bound),
                "{label} {m:?}: unbound"
            );
        }
    };
    check("before prune", &MODES);
    let mut cmd = cli_common::kvh();
    cmd.args(["prune-log", e.log.to_str().unwrap(), "--archive-dir"])
        .arg(&e.archive)
        .args(["--older-than", "0", "--checkpoint"])
        .arg(&ck);
    for k in ["new-hmac.key", "old-hmac.key"] {
        cmd.arg("--key-file").arg(e.tmp.path().join(k));
    }
    for p in [&e.new_pub, &e.old_pub] {
        cmd.arg("--public-key").arg(p);
    }
    let (code, out, err) = cli_common::run(&mut cmd);
    assert_eq!(code, 0, "{out}{err}");
    // Read plainly, the moved files are missing, as for any pruned log.
    check("after prune", &[Mode::AllowPruned, Mode::Archive]);
}

/// A writer killed between creating its next file and writing its first line: the chain's
/// last record, and the signer it names, are in the file before. Its own signer continues
/// it; another one starts a new chain.
#[test]
fn a_chain_crashed_between_files_is_continued_only_by_its_signer() {
    for same_signer in [true, false] {
        let e = Env::new();
        let then_sk = if same_signer { &e.new_sk } else { &e.old_sk };
        let (crashed, chain) =
            crash_then_restart(&e, Some(&e.new_sk), then_sk, &e.log, Crash::BetweenFiles);
        assert_eq!(crashed == chain, same_signer, "continued");
        assert_eq!(signers_of(&e.log, &crashed).len(), 1);
        for m in MODES {
            let r = verify(&e.log, &e.opts(m));
            assert!(
                r.ok(),
                "{same_signer} {m:?}: {:?} {:?}",
                r.first_problem(),
                r.errors
            );
            assert!(r.chains.iter().all(|c| c.keys_bound), "{m:?}: {r:?}");
        }
    }
}

/// A chain whose first writer did not sign, continued after a crash by a signing process:
/// its records name the signer from the `recovery` record on. Cut back to before that
/// record and re-signed there with the retired key (the key id copied from the genuine
/// checkpoint), it is caught: no record up to the checkpoint names its signer.
#[test]
fn a_retired_signing_key_cannot_cut_a_chain_back_to_before_it_named_a_signer() {
    let e = Env::new();
    let unsigned = cfg(&e.log, 1 << 20);
    let w = ForensicLog::open_with_secret(&unsigned, start(), Some(secret(NEW))).unwrap();
    for i in 0..10 {
        w.emit(event(i));
    }
    w.stop();
    let file = chain_files(&e.log).remove(0);
    let mut lines = read_lines(&file);
    assert!(lines.pop().unwrap().contains("\"kind\":\"stop\""));
    write_lines(&file, &lines);
    let mut signed = cfg(&e.log, 1 << 20);
    signed.signing_key_file = Some(e.new_sk.clone());
    let w = ForensicLog::open_with_secret(&signed, start(), Some(secret(NEW))).unwrap();
    for i in 0..10 {
        w.emit(event(i));
    }
    w.stop();
    assert_eq!(chain_files(&e.log), vec![file.clone()], "not continued");
    let chain = chain_of(&file);
    let r = verify(&e.log, &e.opts(Mode::Plain));
    assert!(r.ok(), "{:?} {:?}", r.first_problem(), r.errors);
    let lines = read_lines(&file);
    let named = lines
        .iter()
        .position(|l| l.contains("\"signer\":"))
        .unwrap();
    assert!(
        lines[named].contains("\"kind\":\"recovery\""),
        "{}",
        lines[named]
    );
    let key_id = ckpt_of(&e.log, &chain).key_id;
    assert!(key_id.is_some());
    cut_and_resign(&e, &chain, &file, named, &[], key_id);
    let r = verify(&e.log, &e.opts(Mode::Plain));
    assert!(caught(&r, &chain), "truncated chain accepted: {r:?}");
}

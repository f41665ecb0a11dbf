//! Key rotation: a log directory holds chains sealed with the HMAC secret of their time and
//! checkpoints signed by the signing key of theirs. `verify-log`, `evidence`, `gate` and
//! `prune-log` take every key (`--key-file` and `--public-key` repeated): each chain must
//! verify with one secret throughout, the report names which, and the evidence report lists
//! a chain begun with a retired secret after a newer one was in use.

#[path = "cli_common/mod.rs"]
mod cli_common;
mod forensic_common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use forensic_common::{
    assert_problem, cfg, chain_files, event, forge_from, manifest_of_whole_chain, name, start,
    verify,
};
use kvhygiene::events::EventSink;
use kvhygiene::forensic::cli::VerifyLogArgs;
use kvhygiene::forensic::evidence::{self, EvidenceArgs};
use kvhygiene::forensic::keys::{read_public_key, EpochKey};
use kvhygiene::forensic::prune::{manifest_key, read_manifest};
use kvhygiene::forensic::{ForensicLog, Report, SealKey, VerifyOptions};
use serde_json::Value;
use zeroize::Zeroizing;

const OLD: &[u8] = b"old-secret-retired-in-june-0123456789";
const NEW: &[u8] = b"new-secret-current-since-june-987654";

fn secret(s: &[u8]) -> Zeroizing<Vec<u8>> {
    Zeroizing::new(s.to_vec())
}

fn seal_keys(secrets: &[(&str, &[u8])]) -> VerifyOptions {
    VerifyOptions {
        hmac_keys: secrets
            .iter()
            .map(|(n, s)| SealKey::new(*n, secret(s)))
            .collect(),
        ..VerifyOptions::default()
    }
}

/// `kvh ARGS --key-file K1 --key-file K2 ...`: exit code, stdout and stderr.
fn kvh_keyed(args: &[&str], key_files: &[&str]) -> (i32, String, String) {
    let mut cmd = cli_common::kvh();
    cmd.args(args);
    for k in key_files {
        cmd.args(["--key-file", k]);
    }
    cli_common::run(&mut cmd)
}

/// A private archive directory in `dir`.
fn archive_in(dir: &Path) -> PathBuf {
    let archive = dir.join("archive");
    fs::create_dir(&archive).unwrap();
    fs::set_permissions(&archive, fs::Permissions::from_mode(0o700)).unwrap();
    archive
}

/// `kvh prune-log LOG --archive-dir ARCHIVE --older-than 0` with `key_files`.
fn prune_everything(log: &Path, archive: &Path, key_files: &[&Path]) -> (i32, String, String) {
    let [log, archive] = [log, archive].map(|p| p.to_str().unwrap());
    let keys: Vec<&str> = key_files.iter().map(|p| p.to_str().unwrap()).collect();
    let args = [
        "prune-log",
        log,
        "--archive-dir",
        archive,
        "--older-than",
        "0",
    ];
    kvh_keyed(&args, &keys)
}

/// A chain of `n` events sealed with `secret`, in 4 KiB files, whose writer keeps running
/// for the rest of the test process: an open chain.
fn open_chain_sealed_with(dir: &Path, secret_bytes: &[u8], n: u64) {
    let log = ForensicLog::open_with_secret(&cfg(dir, 4096), start(), Some(secret(secret_bytes)))
        .unwrap();
    for i in 0..n {
        log.emit(event(i));
    }
    log.flush();
    std::mem::forget(log);
}

/// Writes one chain of `n` events sealed with `secret`, in 4 KiB files, and ends it.
fn chain_sealed_with(dir: &Path, secret_bytes: &[u8], n: u64) {
    let log = ForensicLog::open_with_secret(&cfg(dir, 4096), start(), Some(secret(secret_bytes)))
        .unwrap();
    for i in 0..n {
        log.emit(event(i));
    }
    log.stop();
}

/// The chain ids of a report, in its order, with the key each was sealed with.
fn keys_of(r: &Report) -> Vec<Option<String>> {
    r.chains.iter().map(|c| c.key.clone()).collect()
}

/// A log directory with a chain sealed with the old secret, then one with the new; and both
/// secrets as key files.
struct Rotated {
    tmp: tempfile::TempDir,
    log: PathBuf,
    old_key: PathBuf,
    new_key: PathBuf,
}

fn rotated() -> Rotated {
    let tmp = tempfile::tempdir().unwrap();
    let log = tmp.path().join("log");
    chain_sealed_with(&log, OLD, 40);
    std::thread::sleep(std::time::Duration::from_millis(5));
    chain_sealed_with(&log, NEW, 40);
    let old_key = tmp.path().join("old.key");
    let new_key = tmp.path().join("new.key");
    fs::write(&old_key, OLD).unwrap();
    fs::write(&new_key, NEW).unwrap();
    Rotated {
        tmp,
        log,
        old_key,
        new_key,
    }
}

impl Rotated {
    fn paths(&self) -> [&str; 3] {
        [
            self.log.to_str().unwrap(),
            self.new_key.to_str().unwrap(),
            self.old_key.to_str().unwrap(),
        ]
    }
}

#[test]
fn each_chain_verifies_with_the_secret_that_sealed_it() {
    let r = rotated();
    let only_new = verify(&r.log, &seal_keys(&[("new", NEW)]));
    assert!(
        !only_new.ok(),
        "the chain sealed with the old secret needs it"
    );
    let failed: Vec<_> = only_new.chains.iter().filter(|c| !c.ok()).collect();
    assert_eq!(failed.len(), 1);
    let p = failed[0].problem.as_ref().unwrap();
    assert_eq!(p.line, 1, "{p}");
    assert!(p.reason.contains("MAC mismatch at epoch 0"), "{p}");

    for order in [[("new", NEW), ("old", OLD)], [("old", OLD), ("new", NEW)]] {
        let both = verify(&r.log, &seal_keys(&order));
        assert!(both.ok(), "{:?}", both.first_problem());
        let mut keys = keys_of(&both);
        keys.sort();
        assert_eq!(keys, [Some("new".into()), Some("old".into())]);
        assert!(both.chains.iter().all(|c| c.macs_checked));
    }
}

#[test]
fn a_chain_continued_under_another_secret_fails_where_the_secret_changes() {
    let tmp = tempfile::tempdir().unwrap();
    let log = tmp.path().join("log");
    chain_sealed_with(&log, OLD, 120);
    let files = chain_files(&log);
    assert!(files.len() >= 3, "{files:?}");
    // From file 1 on, every record is re-sealed with the new secret's epoch-1 key: each file
    // is sealed with one of the given secrets, but the chain is not sealed with one.
    let mut k = EpochKey::from_secret(secret(NEW)).unwrap();
    k.ratchet();
    forge_from(&files, 1, 1, Some(k), |_| {});
    let opts = seal_keys(&[("new", NEW), ("old", OLD)]);
    assert_problem(
        &verify(&log, &opts),
        &name(&files[1]),
        1,
        "MAC mismatch at epoch 1",
    );
    // No given secret seals it at all: both are named as tried.
    let wrong = seal_keys(&[
        ("a", b"another-secret-of-no-use-0000"),
        ("b", b"and-one-more-of-no-use-1111"),
    ]);
    assert_problem(
        &verify(&log, &wrong),
        &name(&files[0]),
        1,
        "none of the 2 keys given seals this chain",
    );
}

#[test]
fn verify_log_takes_every_key_file_and_names_the_one_of_each_chain() {
    let r = rotated();
    let [log, new_key, old_key] = r.paths();
    let (code, out, _) = kvh_keyed(&["verify-log", log], &[new_key]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("MAC mismatch"), "{out}");
    // The walk stopped at the first file's first record: the chain's end was not read, so
    // the line says so rather than call it open.
    assert!(out.contains("read up to the problem below"), "{out}");
    assert!(!out.contains("open (no stop record)"), "{out}");

    let (code, out, err) = kvh_keyed(&["verify-log", log], &[new_key, old_key]);
    assert_eq!(code, 0, "{out}{err}");
    for key in [new_key, old_key] {
        assert!(out.contains(&format!("MACs verified with {key}")), "{out}");
    }

    let (code, out, _) = kvh_keyed(&["verify-log", log, "--json"], &[new_key, old_key]);
    assert_eq!(code, 0);
    let json: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["hmac_keys"], serde_json::json!([new_key, old_key]));
    let mut sealed: Vec<&str> = json["chains"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["key"].as_str().unwrap())
        .collect();
    sealed.sort();
    let mut expected = vec![new_key, old_key];
    expected.sort();
    assert_eq!(sealed, expected);

    // One secret in two files is one key, known by the first name given.
    let twice = r.tmp.path().join("again.key");
    fs::write(&twice, NEW).unwrap();
    let keys = [new_key, twice.to_str().unwrap(), old_key];
    let (code, out, _) = kvh_keyed(&["verify-log", log, "--json"], &keys);
    assert_eq!(code, 0);
    let json: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["hmac_keys"], serde_json::json!([new_key, old_key]));
    // A key file that cannot be used is named, and nothing is concluded.
    let short = r.tmp.path().join("short.key");
    fs::write(&short, b"too short").unwrap();
    let (code, _, err) = kvh_keyed(&["verify-log", log], &[new_key, short.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(err.contains("short.key: key is 9 bytes"), "{err}");
}

#[test]
fn checkpoints_of_a_rotated_signing_key_verify_with_both_public_keys() {
    let tmp = tempfile::tempdir().unwrap();
    let log = tmp.path().join("log");
    let mut publics = Vec::new();
    for (n, s) in [("old", OLD), ("new", NEW)] {
        let (private, public) =
            kvhygiene::forensic::cli::keygen(&tmp.path().join(format!("signer-{n}"))).unwrap();
        let mut c = cfg(&log, 4096);
        c.signing_key_file = Some(private);
        let w = ForensicLog::open_with_secret(&c, start(), Some(secret(s))).unwrap();
        for i in 0..30 {
            w.emit(event(i));
        }
        w.stop();
        publics.push(public);
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let with = |public: &[&PathBuf]| VerifyOptions {
        public_keys: public.iter().map(|p| read_public_key(p).unwrap()).collect(),
        checkpoints: vec![log.clone()],
        ..seal_keys(&[("new", NEW), ("old", OLD)])
    };
    let only_new = verify(&log, &with(&[&publics[1]]));
    assert!(
        only_new
            .errors
            .iter()
            .any(|e| e.contains("signed by another key than the pinned public key")),
        "{:?}",
        only_new.errors
    );
    let both = verify(&log, &with(&[&publics[1], &publics[0]]));
    assert!(both.ok(), "{:?} {:?}", both.first_problem(), both.errors);
    assert!(both.chains.iter().all(|c| c.checkpoint_seq.is_some()));

    let [p_old, p_new] = [&publics[0], &publics[1]].map(|p| p.to_str().unwrap().to_string());
    let key_files = [("old.key", OLD), ("new.key", NEW)].map(|(n, s)| {
        let p = tmp.path().join(n);
        fs::write(&p, s).unwrap();
        p.to_str().unwrap().to_string()
    });
    let public_keys = ["--public-key", &p_new, "--public-key", &p_old];
    let args = [&["verify-log", log.to_str().unwrap()][..], &public_keys].concat();
    let (code, out, _) = kvh_keyed(&args, &[&key_files[1], &key_files[0]]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(out.matches("checkpoint at seq").count(), 2);
}

fn evidence_of(r: &Rotated, key_files: &[&Path]) -> evidence::Evidence {
    evidence::collect(&EvidenceArgs {
        max_exceptions: 10,
        ..EvidenceArgs::of(VerifyLogArgs {
            key_file: key_files.iter().map(|p| p.to_path_buf()).collect(),
            ..VerifyLogArgs::of(r.log.clone())
        })
    })
    .unwrap()
}

#[test]
fn evidence_says_what_each_secret_sealed_and_names_a_late_chain_of_a_retired_one() {
    let r = rotated();
    let ev = evidence_of(&r, &[&r.new_key, &r.old_key]);
    assert!(ev.integrity.verified, "{:?}", ev.integrity.problems);
    let uses: Vec<(String, usize)> = ev
        .integrity
        .keys
        .iter()
        .map(|k| (k.key.clone(), k.chains))
        .collect();
    assert_eq!(
        uses,
        [
            (r.new_key.display().to_string(), 1),
            (r.old_key.display().to_string(), 1)
        ]
    );
    assert!(ev.integrity.late_retired_key.is_empty());
    // Without signed checkpoints no chain is bound to its keys: each is named.
    assert_eq!(ev.integrity.unbound.len(), 2, "{:?}", ev.integrity);
    let md = evidence::render(&ev);
    assert!(md.contains("- Sealed with "), "{md}");
    assert_eq!(md.matches("is not bound to its keys").count(), 2, "{md}");
    assert!(!md.contains(" began at "), "{md}");

    // A chain sealed with the old secret, begun after the new one was in use.
    std::thread::sleep(std::time::Duration::from_millis(5));
    chain_sealed_with(&r.log, OLD, 10);
    let ev = evidence_of(&r, &[&r.new_key, &r.old_key]);
    assert!(ev.integrity.verified, "listed, not failed");
    assert_eq!(ev.integrity.late_retired_key.len(), 1, "{:?}", ev.integrity);
    let late = &ev.integrity.late_retired_key[0];
    assert!(
        late.contains("old.key, after the newer key") && late.contains("new.key"),
        "{late}"
    );
    assert!(evidence::render(&ev).contains(&format!("- Attention: {}", late.replace('*', "\\*"))));
    // Which key is newer comes from the log, not from the order of the key files.
    let ev = evidence_of(&r, &[&r.old_key, &r.new_key]);
    assert_eq!(ev.integrity.late_retired_key, std::slice::from_ref(late));
}

#[test]
fn prune_log_seals_each_manifest_with_the_secret_of_its_chain() {
    let r = rotated();
    let [log, new_key, old_key] = r.paths();
    let archive_dir = archive_in(r.tmp.path());
    let archive = archive_dir.to_str().unwrap();
    let prune = |keys: &[&Path]| prune_everything(&r.log, &archive_dir, keys);
    // With the current secret alone, the old chain does not verify: nothing moves.
    let (code, _, err) = prune(&[&r.new_key]);
    assert_eq!(code, 1, "{err}");
    assert!(fs::read_dir(archive).unwrap().next().is_none());

    // Which secret seals which chain, from the chains themselves.
    let before = verify(&r.log, &seal_keys(&[("new", NEW), ("old", OLD)]));
    let sealed_by: std::collections::BTreeMap<String, Option<String>> = before
        .chains
        .iter()
        .map(|c| (c.chain.clone(), c.key.clone()))
        .collect();
    let (code, out, err) = prune(&[&r.new_key, &r.old_key]);
    assert_eq!(code, 0, "{out}{err}");
    let opts = VerifyOptions {
        allow_pruned: true,
        ..seal_keys(&[("new", NEW), ("old", OLD)])
    };
    let chains = verify(&r.log, &opts);
    assert!(chains.ok(), "{:?}", chains.first_problem());
    for c in &chains.chains {
        let m = read_manifest(&r.log, &c.chain)
            .unwrap()
            .expect("every chain ended: moved whole");
        assert_eq!(c.key, sealed_by[&c.chain], "chain {}", c.chain);
        let (sealer, other) = match c.key.as_deref() {
            Some("new") => (NEW, OLD),
            Some("old") => (OLD, NEW),
            k => panic!("chain {} sealed with {k:?}", c.chain),
        };
        m.check(Some(&manifest_key(&secret(sealer)).unwrap()))
            .unwrap();
        assert!(m
            .check(Some(&manifest_key(&secret(other)).unwrap()))
            .is_err());
    }
    // Read back with the archive, the log needs both secrets.
    let read_back = ["verify-log", log, "--archive-dir", archive];
    let (code, out, _) = kvh_keyed(&read_back, &[new_key, old_key]);
    assert_eq!(code, 0, "{out}");
    let (code, out, _) = kvh_keyed(&read_back, &[new_key]);
    assert_eq!(code, 1, "{out}");
}

#[test]
fn a_partly_pruned_chain_keeps_the_secret_of_its_manifest() {
    let r = rotated();
    let log = r.log.clone();
    // A process started before the rotation, still running: its chain stays open.
    open_chain_sealed_with(&log, OLD, 120);
    let archive = archive_in(r.tmp.path());
    let (code, _, err) = prune_everything(&log, &archive, &[&r.new_key, &r.old_key]);
    assert_eq!(code, 0, "{err}");
    let opts = VerifyOptions {
        allow_pruned: true,
        ..seal_keys(&[("new", NEW), ("old", OLD)])
    };
    let after = verify(&log, &opts);
    assert!(after.ok(), "{:?}", after.first_problem());
    let open = after
        .chains
        .iter()
        .find(|c| !c.closed)
        .expect("the open chain");
    assert!(
        open.pruned
            .as_ref()
            .is_some_and(|p| p.files > 0 && !p.complete),
        "{open:?}"
    );
    assert_eq!(open.key.as_deref(), Some("old"));

    // The current secret's holder rewrites the open chain's manifest (to hide deleted files,
    // say): the manifest now pins the chain to the new secret, and the chain's first record
    // left, sealed with the old one, fails.
    let mut m = read_manifest(&log, &open.chain).unwrap().unwrap();
    m.seal(&manifest_key(&secret(NEW)).unwrap());
    let path = kvhygiene::forensic::prune::manifest_path(&log, &open.chain);
    fs::write(&path, serde_json::to_vec(&m).unwrap()).unwrap();
    let forged = verify(&log, &opts);
    let bad = forged
        .chains
        .iter()
        .find(|c| c.chain == open.chain)
        .unwrap();
    let p = bad.problem.as_ref().expect("the forged manifest is caught");
    assert_eq!(p.line, 1, "{p}");
    assert!(p.reason.contains("MAC mismatch"), "{p}");
}

// What the holder of a retired key can do to the chains of the current one, once verifiers
// take both: with signed checkpoints pinned, nothing that verifies.

/// One ended chain sealed with `secret` and checkpointed with `signer`; returns its files.
fn signed_chain(dir: &Path, secret_bytes: &[u8], signer: &Path, n: u64) -> Vec<PathBuf> {
    let before = chain_files_or_none(dir);
    let mut c = cfg(dir, 4096);
    c.signing_key_file = Some(signer.to_path_buf());
    let w = ForensicLog::open_with_secret(&c, start(), Some(secret(secret_bytes))).unwrap();
    for i in 0..n {
        w.emit(event(i));
    }
    w.stop();
    std::thread::sleep(std::time::Duration::from_millis(5));
    let mut new: Vec<PathBuf> = chain_files_or_none(dir)
        .into_iter()
        .filter(|p| !before.contains(p))
        .collect();
    new.sort();
    new
}

fn chain_files_or_none(dir: &Path) -> Vec<PathBuf> {
    if dir.exists() {
        chain_files(dir)
    } else {
        Vec::new()
    }
}

/// The chain id of one of its files.
fn chain_of(file: &Path) -> String {
    let name = file.file_name().unwrap().to_str().unwrap();
    let rest = name.strip_prefix("kvh-").unwrap();
    rest[..rest.rfind('-').unwrap()].to_string()
}

/// A log with a chain of the old keys, then one of the new keys (the victim), both signed;
/// returns (log, victim's files, options pinning both public keys and taking both secrets).
fn rotated_signed(tmp: &tempfile::TempDir) -> (PathBuf, Vec<PathBuf>, VerifyOptions) {
    let log = tmp.path().join("log");
    let (old_signer, old_pub) = kvhygiene::forensic::cli::keygen(&tmp.path().join("old")).unwrap();
    let (new_signer, new_pub) = kvhygiene::forensic::cli::keygen(&tmp.path().join("new")).unwrap();
    signed_chain(&log, OLD, &old_signer, 30);
    let victim = signed_chain(&log, NEW, &new_signer, 90);
    assert!(victim.len() >= 3, "{victim:?}");
    let opts = VerifyOptions {
        public_keys: [&new_pub, &old_pub]
            .iter()
            .map(|p| read_public_key(p).unwrap())
            .collect(),
        checkpoints: vec![log.clone()],
        allow_pruned: true,
        ..seal_keys(&[("new", NEW), ("old", OLD)])
    };
    let r = verify(&log, &opts);
    assert!(r.ok(), "{:?} {:?}", r.first_problem(), r.errors);
    (log, victim, opts)
}

/// The victim chain's report.
fn report_of<'a>(r: &'a Report, files: &[PathBuf]) -> &'a kvhygiene::forensic::verify::ChainReport {
    let chain = chain_of(&files[0]);
    r.chains.iter().find(|c| c.chain == chain).unwrap()
}

#[test]
fn a_chain_of_the_current_secret_cannot_be_resealed_with_a_retired_one() {
    let tmp = tempfile::tempdir().unwrap();
    let (log, victim, opts) = rotated_signed(&tmp);
    // Re-MACed whole with the retired secret, hashes unchanged: the checkpoint still matches
    // the records, but it names the current secret.
    forge_from(
        &victim,
        0,
        1,
        Some(EpochKey::from_secret(secret(OLD)).unwrap()),
        |_| {},
    );
    let r = verify(&log, &opts);
    let p = report_of(&r, &victim).problem.as_ref().expect("caught");
    assert_eq!(
        (p.file.as_str(), p.line),
        (name(&victim[0]).as_str(), 1),
        "{p}"
    );
    assert!(p.reason.contains("MAC mismatch at epoch 0"), "{p}");
}

/// As above, from a later file: an edit there re-sealed with the retired secret's key of that
/// epoch is caught at the edited record, on a log untouched otherwise.
#[test]
fn an_edit_resealed_with_a_retired_secrets_later_key_is_caught_where_it_is() {
    let tmp = tempfile::tempdir().unwrap();
    let (log, victim, opts) = rotated_signed(&tmp);
    forge_from(&victim, 1, 2, Some(k_at(OLD, 1)), |m| {
        m.insert("tenant_id".into(), "someone-else".into());
    });
    let r = verify(&log, &opts);
    let p = report_of(&r, &victim).problem.as_ref().expect("caught");
    assert_eq!(
        (p.file.as_str(), p.line),
        (name(&victim[1]).as_str(), 2),
        "{p}"
    );
    assert!(p.reason.contains("MAC mismatch at epoch 1"), "{p}");
}

/// The key at `epoch` of `secret`.
fn k_at(secret_bytes: &[u8], epoch: u64) -> EpochKey {
    let mut k = EpochKey::from_secret(secret(secret_bytes)).unwrap();
    k.advance_to(epoch);
    k
}

/// A [`rotated_signed`] log whose victim chain (of the current secret, signed) was deleted
/// whole, and a manifest saying it moved, MACed with the retired secret and ending at the
/// (public) checkpoint's seq and hash: the log, the chain and the options.
fn victim_moved_by_a_retired_manifest(
    tmp: &tempfile::TempDir,
) -> (std::path::PathBuf, String, VerifyOptions) {
    use kvhygiene::forensic::prune::manifest_path;
    let (log, victim, opts) = rotated_signed(tmp);
    let chain = chain_of(&victim[0]);
    let ckpt = verify(&log, &opts);
    let seq = report_of(&ckpt, &victim).checkpoint_seq.unwrap();
    let last: Value = serde_json::from_str(
        fs::read_to_string(victim.last().unwrap())
            .unwrap()
            .lines()
            .last()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(last["seq"].as_u64(), Some(seq));
    for f in &victim {
        fs::remove_file(f).unwrap();
    }
    let mut m = manifest_of_whole_chain(&chain, seq, last["hash"].as_str().unwrap());
    m.seal(&manifest_key(&secret(OLD)).unwrap());
    fs::write(manifest_path(&log, &chain), serde_json::to_vec(&m).unwrap()).unwrap();
    (log, chain, opts)
}

#[test]
fn a_chain_of_the_current_secret_cannot_be_replaced_by_a_manifest_of_a_retired_one() {
    let tmp = tempfile::tempdir().unwrap();
    let (log, chain, opts) = victim_moved_by_a_retired_manifest(&tmp);
    let r = verify(&log, &opts);
    let c = r.chains.iter().find(|c| c.chain == chain).unwrap();
    let p = c.problem.as_ref().expect("caught");
    assert!(
        p.reason
            .contains("another HMAC key than the one the chain's signed checkpoint names"),
        "{p}"
    );
}

#[test]
fn a_checkpoint_of_the_current_signer_cannot_be_resigned_with_a_retired_one() {
    use kvhygiene::forensic::checkpoint::{self, Checkpoint};
    let tmp = tempfile::tempdir().unwrap();
    let (log, victim, opts) = rotated_signed(&tmp);
    let chain = chain_of(&victim[0]);
    // The newest file dropped, and a checkpoint at the new end signed with the retired key.
    let kept = &victim[victim.len() - 2];
    fs::remove_file(victim.last().unwrap()).unwrap();
    let last: Value =
        serde_json::from_str(fs::read_to_string(kept).unwrap().lines().last().unwrap()).unwrap();
    let old = kvhygiene::forensic::keys::read_signing_key(&tmp.path().join("old.key")).unwrap();
    let c = Checkpoint {
        chain: chain.clone(),
        seq: last["seq"].as_u64().unwrap(),
        hash: kvhygiene::forensic::record::parse_hash(last["hash"].as_str().unwrap()).unwrap(),
        file: name(kept),
        ts: last["ts"].as_u64().unwrap(),
        key_id: Some(EpochKey::from_secret(secret(NEW)).unwrap().key_id()),
        public_key: None,
    };
    fs::remove_file(checkpoint::path_for(&log, &chain)).unwrap();
    checkpoint::write(&log, &old, &c).unwrap();
    let r = verify(&log, &opts);
    let p = report_of(&r, &victim[..1])
        .problem
        .as_ref()
        .expect("caught");
    assert!(
        p.reason.contains("checkpoint re-signed with another key"),
        "{p}"
    );
}

#[test]
fn a_manifest_must_be_sealed_with_the_secret_of_its_chain() {
    let tmp = tempfile::tempdir().unwrap();
    let log = tmp.path().join("log");
    chain_sealed_with(&log, NEW, 60);
    let files = chain_files(&log);
    let chain = chain_of(&files[0]);
    let archive = archive_in(tmp.path());
    let new_key = tmp.path().join("new.key");
    fs::write(&new_key, NEW).unwrap();
    let (code, _, err) = prune_everything(&log, &archive, &[&new_key]);
    assert_eq!(code, 0, "{err}");
    // The manifest re-MACed with the retired secret.
    let path = kvhygiene::forensic::prune::manifest_path(&log, &chain);
    let mut m = read_manifest(&log, &chain).unwrap().unwrap();
    m.seal(&manifest_key(&secret(OLD)).unwrap());
    fs::write(&path, serde_json::to_vec(&m).unwrap()).unwrap();
    let both = seal_keys(&[("new", NEW), ("old", OLD)]);
    let whole = VerifyOptions {
        archive_dirs: vec![archive.clone()],
        ..seal_keys(&[("new", NEW), ("old", OLD)])
    };
    let reason = |r: &Report| {
        r.first_problem()
            .map(|p| p.reason.clone())
            .unwrap_or_default()
    };
    let r = verify(&log, &whole);
    assert!(
        reason(&r).contains("MACed with another HMAC key than its chain's records"),
        "{r:?}"
    );
    // An interrupted run: the files back in the log directory, the manifest still there.
    for f in chain_files(&archive) {
        fs::copy(&f, log.join(f.file_name().unwrap())).unwrap();
    }
    let pruned = VerifyOptions {
        allow_pruned: true,
        ..both
    };
    let r = verify(&log, &pruned);
    assert!(
        reason(&r).contains("MACed with another HMAC key than its chain's records"),
        "{r:?}"
    );
    // Without a MAC at all, the manifest says so, whatever the number of keys.
    m.mac = None;
    fs::write(&path, serde_json::to_vec(&m).unwrap()).unwrap();
    let r = verify(&log, &pruned);
    assert!(reason(&r).contains("manifest has no mac"), "{r:?}");
}

#[test]
fn a_late_chain_of_an_old_secret_stays_named_once_pruned() {
    let r = rotated();
    std::thread::sleep(std::time::Duration::from_millis(5));
    // Begun late with the old secret, still open, several files.
    open_chain_sealed_with(&r.log, OLD, 120);
    let ev = || {
        let mut a = VerifyLogArgs::of(r.log.clone());
        a.key_file = vec![r.new_key.clone(), r.old_key.clone()];
        a.allow_pruned = true;
        evidence::collect(&EvidenceArgs {
            max_exceptions: 10,
            ..EvidenceArgs::of(a)
        })
        .unwrap()
    };
    assert_eq!(
        ev().integrity.late_retired_key.len(),
        1,
        "named before pruning"
    );
    let archive = archive_in(r.tmp.path());
    let (code, _, err) = prune_everything(&r.log, &archive, &[&r.new_key, &r.old_key]);
    assert_eq!(code, 0, "{err}");
    let after = ev();
    assert!(after.integrity.verified, "{:?}", after.integrity.problems);
    assert!(
        after.integrity.pruned.len() >= 2,
        "{:?}",
        after.integrity.pruned
    );
    assert_eq!(
        after.integrity.late_retired_key.len(),
        1,
        "{:?}",
        after.integrity
    );
}

#[test]
fn a_chain_whose_checkpoint_names_a_secret_not_given_fails_naming_both_ids() {
    let tmp = tempfile::tempdir().unwrap();
    let (log, victim, opts) = rotated_signed(&tmp);
    let only_old = VerifyOptions {
        hmac_keys: vec![SealKey::new("old", secret(OLD))],
        ..opts
    };
    let r = verify(&log, &only_old);
    let p = report_of(&r, &victim).problem.as_ref().expect("fails");
    assert_eq!((p.file.clone(), p.line), (name(&victim[0]), 1), "{p}");
    let id = |s: &[u8]| EpochKey::from_secret(secret(s)).unwrap().key_id();
    assert!(
        p.reason.contains(&format!("names HMAC key id {}", id(NEW)))
            && p.reason.contains(&format!("their ids: {} (old)", id(OLD))),
        "{p}"
    );
    // The old chain, whose checkpoint names the old secret, verifies.
    assert_eq!(r.chains.iter().filter(|c| c.ok()).count(), 1);
}

/// The same forgery read strictly (no `--allow-pruned`, no `--archive-dir`), with both
/// secrets given: the victim chain's files deleted, and a manifest MACed with the retired
/// secret (which whoever kept it can still compute) saying they moved, ending at the
/// checkpoint's public seq and hash. The chain's signed checkpoint names the current secret,
/// so the manifest accounts for nothing, as in the reading that takes manifests into account:
/// the files are reported deleted, and the checkpoint is not taken as matched by the manifest.
#[test]
fn a_strict_reading_does_not_take_a_manifest_of_a_retired_secret_for_a_prune() {
    let tmp = tempfile::tempdir().unwrap();
    let (log, chain, opts) = victim_moved_by_a_retired_manifest(&tmp);
    let strict = VerifyOptions {
        allow_pruned: false,
        ..opts
    };
    let r = verify(&log, &strict);
    assert!(!r.ok());
    let c = r.chains.iter().find(|c| c.chain == chain).unwrap();
    let p = c.problem.as_ref().expect("caught");
    assert!(
        p.reason.contains("files deleted") && !p.reason.contains("says kvh prune-log moved them"),
        "a manifest MACed with a retired secret, not the one the checkpoint names, is taken \
         for a prune: {p}"
    );
    assert_eq!(
        c.checkpoint_seq, None,
        "the checkpoint is said matched by a manifest of another secret: {p}"
    );
}

/// The period of the records each secret sealed is the same whether the moved records are
/// read from the archive (`--archive-dir`) or accounted for by their MAC-verified manifests
/// (`--allow-pruned`): a manifest dates the moved records from the oldest to the newest.
#[test]
fn the_period_each_secret_sealed_is_kept_once_its_chains_are_pruned() {
    let r = rotated();
    // A process of the new secret still running: its newest files stay in the directory.
    open_chain_sealed_with(&r.log, NEW, 120);
    let archive = archive_in(r.tmp.path());
    let (code, _, err) = prune_everything(&r.log, &archive, &[&r.new_key, &r.old_key]);
    assert_eq!(code, 0, "{err}");
    let ev = |archived: bool| {
        let mut a = VerifyLogArgs::of(r.log.clone());
        a.key_file = vec![r.new_key.clone(), r.old_key.clone()];
        if archived {
            a.archive_dir = vec![archive.clone()];
        } else {
            a.allow_pruned = true;
        }
        evidence::collect(&EvidenceArgs {
            max_exceptions: 10,
            ..EvidenceArgs::of(a)
        })
        .unwrap()
    };
    let periods = |ev: &evidence::Evidence| -> Vec<(String, Option<String>, Option<String>)> {
        ev.integrity
            .keys
            .iter()
            .map(|k| (k.key.clone(), k.first_record.clone(), k.last_record.clone()))
            .collect()
    };
    let whole = ev(true);
    assert!(whole.integrity.verified, "{:?}", whole.integrity.problems);
    let pruned = ev(false);
    assert!(pruned.integrity.verified, "{:?}", pruned.integrity.problems);
    assert_eq!(periods(&pruned), periods(&whole));
}

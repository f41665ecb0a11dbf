//! Retention: `kvh prune-log` moves the old files of verified chains out of the log directory
//! into an archive directory, and leaves a manifest per chain that lets `kvh verify-log
//! --allow-pruned` accept the directory without them.
//!
//! A log directory only grows: every rotation adds a file and every process start a chain.
//! Deleting old files by hand makes `verify-log` report them missing (rightly: that is what
//! an attacker hiding evidence does). `prune-log` is the sanctioned way:
//!
//! 1. it verifies the whole directory first (as `verify-log --allow-pruned`) and refuses to
//!    touch a log that does not verify: moving files away would destroy the evidence;
//! 2. per chain, it picks a prefix of files whose newest record is older than the cut-off:
//!    never the two newest files of a chain that is still open (a live writer, or crash
//!    recovery, reads them), and every file of a chain that ended with `stop`;
//! 3. it copies each file into the archive (exclusive create, 0600, fsync, read back and
//!    compared), then writes the chain's manifest `kvh-<chain>.pruned.json` in the log
//!    directory (atomically, MACed with a key derived from the HMAC secret when one is
//!    given), and only then removes the originals. An interrupted run leaves identical
//!    copies in both places, which a rerun finishes and `verify-log --archive-dir` reads
//!    once.
//!
//! The manifest records, for each file moved, its name, SHA-256, first and last seq, last
//! record hash and times. `verify-log --allow-pruned` continues a chain whose first present
//! file is not file 0 from the manifest's last hash and seq, so the `rotate` link of the
//! first file left is still checked; `verify-log --archive-dir ARCHIVE` reads the moved files
//! back and checks the chains whole. The manifest is bookkeeping that the verifier holds the
//! chain to, not a protection of the moved files: those are protected by the archive's own
//! controls, and can be verified there at any time.

use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use hmac::Mac;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::files::{self, CreateStep};
use super::keys::EpochKey;
use super::record::{hex, parse_hash, write_canonical};
use super::scan::scan;

/// Schema version of the manifest.
pub const MANIFEST_VERSION: u64 = 1;

/// Domain separation of the manifest MAC from record MACs (over 32-byte hashes) and the key
/// ratchet (over `kvh-ratchet`).
const MANIFEST_MAC_DOMAIN: &[u8] = b"kvh-prune-manifest\n";

/// Largest manifest read (one entry is about 400 bytes).
const MAX_MANIFEST_BYTES: u64 = 64 << 20;

/// The manifest of `chain` in the log directory `dir`.
pub fn manifest_path(dir: &Path, chain: &str) -> PathBuf {
    dir.join(format!("kvh-{chain}.pruned.json"))
}

/// The chain id of a manifest file name, `None` for any other file.
pub fn parse_manifest_name(name: &str) -> Option<&str> {
    let chain = name.strip_prefix("kvh-")?.strip_suffix(".pruned.json")?;
    files::valid_chain_id(chain).then_some(chain)
}

/// One file moved out of the log directory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrunedFile {
    pub name: String,
    /// SHA-256 of the file's bytes, hex.
    pub sha256: String,
    pub first_seq: u64,
    pub last_seq: u64,
    /// Hash of the file's last record: the `prev` of the next file's first record.
    pub last_hash: String,
    /// Unix nanoseconds of the file's first and last records.
    pub first_ts: u64,
    pub last_ts: u64,
}

/// What `prune-log` moved of one chain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub v: u64,
    pub chain: String,
    /// Files 0, 1, ... in order, every one moved so far.
    pub files: Vec<PrunedFile>,
    /// Every file of the chain was moved (it had ended with `stop`).
    pub complete: bool,
    /// Where the files were moved to, as given to `prune-log`.
    pub archive: String,
    /// Unix nanoseconds of the last change.
    pub updated_at: u64,
    /// `HMAC-SHA256(K0, "kvh-prune-manifest\n" || body)` in hex, where K0 is the configured
    /// HMAC secret and body the canonical manifest without `mac` ([`manifest_mac`]); `None`
    /// when no key was given.
    pub mac: Option<String>,
}

impl Manifest {
    /// The canonical bytes the MAC covers: the manifest as JSON without `mac`, keys sorted.
    fn body(&self) -> Vec<u8> {
        let mut v = serde_json::to_value(self).unwrap_or_default();
        if let Some(m) = v.as_object_mut() {
            m.remove("mac");
        }
        let mut out = Vec::new();
        // Integers, strings and bools only: always canonical.
        let _ = write_canonical(&v, &mut out);
        out
    }

    /// Sets `mac` (or clears it without a key).
    pub fn seal(&mut self, key: Option<&EpochKey>) {
        self.mac = key.map(|k| hex(&manifest_mac(k, &self.body())));
    }

    /// Checks the MAC against `key` (the epoch-0 key); without a key nothing is checked.
    pub fn check(&self, key: Option<&EpochKey>) -> Result<(), String> {
        if self.v != MANIFEST_VERSION {
            return Err(format!("unsupported manifest version {}", self.v));
        }
        let Some(k) = key else { return Ok(()) };
        let Some(mac) = self.mac.as_deref() else {
            return Err("manifest has no mac but a key was given".into());
        };
        if parse_hash(mac) != Some(manifest_mac(k, &self.body())) {
            return Err("manifest MAC mismatch: wrong key or forged manifest".into());
        }
        Ok(())
    }

    /// The last file moved: where the chain left in the log directory picks up.
    pub fn tail(&self) -> Option<&PrunedFile> {
        self.files.last()
    }
}

/// The manifest MAC: HMAC-SHA256(K0, domain || body). Only the epoch-0 key (the configured
/// secret) is used: verifiers hold it, writers past their first rotation do not.
fn manifest_mac(key: &EpochKey, body: &[u8]) -> [u8; 32] {
    let mut m = key.mac();
    m.update(MANIFEST_MAC_DOMAIN);
    m.update(body);
    m.finalize().into_bytes().into()
}

/// Reads the manifest of `chain` in `dir`; `Ok(None)` when there is none.
pub fn read_manifest(dir: &Path, chain: &str) -> Result<Option<Manifest>, String> {
    let path = manifest_path(dir, chain);
    let bytes = match files::read_regular(&path, MAX_MANIFEST_BYTES) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let m: Manifest = serde_json::from_slice(&bytes)
        .map_err(|e| format!("{}: not a prune manifest: {e}", path.display()))?;
    if m.chain != chain {
        return Err(format!(
            "{}: manifest of chain {}, not {chain}",
            path.display(),
            m.chain
        ));
    }
    Ok(Some(m))
}

/// The chain ids of every manifest in `dir`.
pub fn list_manifests(dir: &Path) -> io::Result<Vec<String>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)? {
        let name = entry?.file_name();
        if let Some(chain) = name.to_str().and_then(parse_manifest_name) {
            out.push(chain.to_string());
        }
    }
    out.sort();
    Ok(out)
}

/// Writes `m` as the chain's manifest: a temporary file (exclusive, 0600), fsync, rename
/// over the old one, directory fsync.
fn write_manifest(dir: &Path, m: &Manifest) -> io::Result<()> {
    let path = manifest_path(dir, &m.chain);
    let tmp = dir.join(format!(
        ".kvh-{}.pruned.json.{}.tmp",
        m.chain,
        std::process::id()
    ));
    let _ = fs::remove_file(&tmp); // a leftover of an interrupted run of this pid
    let mut f = files::create_exclusive(&tmp, 0o600).map_err(|(_, e)| e)?;
    let mut text = serde_json::to_vec_pretty(m).map_err(io::Error::other)?;
    text.push(b'\n');
    let written = f.write_all(&text).and_then(|_| f.sync_all());
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    fs::rename(&tmp, &path)?;
    files::sync_dir(dir)
}

/// The facts of one chain file that a manifest entry records.
pub fn describe(name: &str, bytes: &[u8]) -> Result<PrunedFile, String> {
    let mut first: Option<(u64, u64)> = None;
    let mut last: Option<(u64, u64, String)> = None;
    for line in bytes.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        let r = scan(line).map_err(|e| format!("{name}: {e}"))?;
        let (Some(seq), Some(ts)) = (r.seq, r.ts) else {
            return Err(format!("{name}: a record without seq or ts"));
        };
        first.get_or_insert((seq, ts));
        last = Some((seq, ts, r.hash.to_string()));
    }
    let ((first_seq, first_ts), Some((last_seq, last_ts, last_hash))) =
        (first.unwrap_or((0, 0)), last)
    else {
        return Err(format!("{name}: no record"));
    };
    Ok(PrunedFile {
        name: name.to_string(),
        sha256: hex(&Sha256::digest(bytes)),
        first_seq,
        last_seq,
        last_hash,
        first_ts,
        last_ts,
    })
}

/// The archive directory must exist, be a real directory owned by us, and not be writable
/// by group or others (the moved files are evidence).
pub fn check_archive_dir(dir: &Path) -> Result<(), String> {
    let m = fs::symlink_metadata(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    if !m.is_dir() {
        return Err(format!(
            "{}: not a directory (a symlink is not followed)",
            dir.display()
        ));
    }
    if m.uid() != files::euid() {
        return Err(format!(
            "{}: owned by uid {}, not by this user ({})",
            dir.display(),
            m.uid(),
            files::euid()
        ));
    }
    if m.permissions().mode() & 0o022 != 0 {
        return Err(format!(
            "{}: writable by group or others (mode {:o}); use 0700 or 0750",
            dir.display(),
            m.permissions().mode() & 0o777
        ));
    }
    Ok(())
}

/// Copies `src` (whose bytes are `bytes`) to `dest`: exclusive create 0600, fsync, read
/// back and compared. An existing `dest` with the same bytes is accepted (a rerun after an
/// interruption); one with other bytes is an error.
pub fn archive_copy(bytes: &[u8], dest: &Path) -> Result<(), String> {
    match files::create_exclusive(dest, 0o600) {
        Ok(mut f) => {
            f.write_all(bytes)
                .and_then(|_| f.sync_all())
                .map_err(|e| format!("{}: {e}", dest.display()))?;
        }
        Err((CreateStep::Create, e)) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err((_, e)) => return Err(format!("{}: {e}", dest.display())),
    }
    let back = files::read_capped(dest).map_err(|e| format!("{}: {e}", dest.display()))?;
    if back != bytes {
        return Err(format!(
            "{}: exists with other contents than the file being archived; nothing removed",
            dest.display()
        ));
    }
    Ok(())
}

/// Adds `moved` to the chain's manifest (creating it), seals it and writes it.
pub fn record_moved(
    dir: &Path,
    chain: &str,
    moved: Vec<PrunedFile>,
    complete: bool,
    archive: &Path,
    key: Option<&EpochKey>,
) -> Result<Manifest, String> {
    let mut m = match read_manifest(dir, chain)? {
        Some(m) => {
            m.check(key)?;
            m
        }
        None => Manifest {
            v: MANIFEST_VERSION,
            chain: chain.to_string(),
            files: Vec::new(),
            complete: false,
            archive: String::new(),
            updated_at: 0,
            mac: None,
        },
    };
    for f in moved {
        // A rerun after an interruption moves the same file again: recorded once.
        if !m.files.iter().any(|g| g.name == f.name) {
            m.files.push(f);
        }
    }
    m.complete |= complete;
    m.archive = archive.display().to_string();
    m.updated_at = now_ns();
    m.seal(key);
    write_manifest(dir, &m).map_err(|e| format!("{}: {e}", manifest_path(dir, chain).display()))?;
    Ok(m)
}

/// The epoch-0 key of `secret`, for manifest MACs.
pub fn manifest_key(secret: Option<&Zeroizing<Vec<u8>>>) -> Result<Option<EpochKey>, String> {
    secret
        .map(|s| EpochKey::from_secret(s.clone()).map_err(|e| format!("--key-file: {e}")))
        .transpose()
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// An open directory, `flock`ed for the life of the value: one `prune-log` at a time per
/// archive.
pub struct DirLock(#[allow(dead_code)] File);

pub fn lock_dir(dir: &Path) -> Result<DirLock, String> {
    let f = File::open(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    if !files::try_lock(&f) {
        return Err(format!(
            "{}: another kvh prune-log is running on this archive",
            dir.display()
        ));
    }
    Ok(DirLock(f))
}

/// What one run of `prune-log` is asked to do.
pub struct PrunePlan<'a> {
    pub dir: &'a Path,
    pub archive: &'a Path,
    /// Files whose newest record is older than this (Unix nanoseconds) may move.
    pub cutoff_ns: u64,
    /// Say what would move; move nothing.
    pub dry_run: bool,
    /// The epoch-0 key, for the manifests' MACs.
    pub key: Option<&'a EpochKey>,
}

/// What moved (or, in a dry run, would move) of one chain.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ChainPruned {
    pub chain: String,
    pub files: Vec<PrunedFile>,
    /// The chain had ended and every file of it moved.
    pub complete: bool,
    /// Bytes moved.
    pub bytes: u64,
}

/// A file chosen to move: where it is, its bytes as verified, and its manifest entry.
pub struct Selected {
    pub path: PathBuf,
    pub bytes: Vec<u8>,
    pub facts: PrunedFile,
}

/// The files of one chain that may move, by the rules of the module docs: files of a chain
/// that ended (`closed`) when its newest record is older than the cut-off, all of them;
/// otherwise the oldest files whose newest record is, never the two newest.
pub fn select(
    list: &[(u64, PathBuf)],
    closed: bool,
    cutoff_ns: u64,
) -> Result<(Vec<Selected>, bool), String> {
    let keep = if closed { 0 } else { 2 };
    let movable = list.len().saturating_sub(keep);
    let mut out = Vec::new();
    for (_, path) in &list[..movable] {
        let name = file_name_of(path)?;
        let bytes = files::read_capped(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let facts = describe(&name, &bytes)?;
        if facts.last_ts >= cutoff_ns {
            break; // files are in time order: the rest are newer
        }
        out.push(Selected {
            path: path.clone(),
            bytes,
            facts,
        });
    }
    let complete = closed && out.len() == list.len();
    Ok((out, complete))
}

fn file_name_of(path: &Path) -> Result<String, String> {
    path.file_name()
        .and_then(|n| n.to_str())
        .map(str::to_string)
        .ok_or_else(|| format!("{}: not a chain file name", path.display()))
}

/// Moves the selected files of one chain: copies into the archive, records them in the
/// manifest, then removes the originals (oldest first, so what is left is always a suffix
/// of the chain).
pub fn move_chain(
    plan: &PrunePlan<'_>,
    chain: &str,
    selected: Vec<Selected>,
    complete: bool,
) -> Result<ChainPruned, String> {
    let mut done = ChainPruned {
        chain: chain.to_string(),
        complete,
        ..Default::default()
    };
    for f in &selected {
        done.bytes += f.bytes.len() as u64;
        done.files.push(f.facts.clone());
        if !plan.dry_run {
            archive_copy(&f.bytes, &plan.archive.join(&f.facts.name))?;
        }
    }
    if plan.dry_run || selected.is_empty() {
        return Ok(done);
    }
    files::sync_dir(plan.archive).map_err(|e| format!("{}: {e}", plan.archive.display()))?;
    record_moved(
        plan.dir,
        chain,
        done.files.clone(),
        complete,
        plan.archive,
        plan.key,
    )?;
    for f in &selected {
        fs::remove_file(&f.path).map_err(|e| {
            format!(
                "{}: archived and recorded, but cannot be removed: {e}",
                f.path.display()
            )
        })?;
    }
    files::sync_dir(plan.dir).map_err(|e| format!("{}: {e}", plan.dir.display()))?;
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(secret: &[u8]) -> EpochKey {
        EpochKey::from_secret(Zeroizing::new(secret.to_vec())).unwrap()
    }

    fn manifest() -> Manifest {
        Manifest {
            v: MANIFEST_VERSION,
            chain: "p1-t2".into(),
            files: vec![PrunedFile {
                name: files::file_name("p1-t2", 0),
                sha256: "ab".repeat(32),
                first_seq: 0,
                last_seq: 9,
                last_hash: "cd".repeat(32),
                first_ts: 1,
                last_ts: 2,
            }],
            complete: false,
            archive: "/archive".into(),
            updated_at: 3,
            mac: None,
        }
    }

    #[test]
    fn manifest_names_round_trip_and_refuse_other_files() {
        let p = manifest_path(Path::new("/log"), "p1-t2");
        assert_eq!(p, Path::new("/log/kvh-p1-t2.pruned.json"));
        let name = p.file_name().unwrap().to_str().unwrap();
        assert_eq!(parse_manifest_name(name), Some("p1-t2"));
        for other in [
            "kvh-p1-t2-000000.jsonl",
            "kvh-x.pruned.json",
            "kvh-p1-t2.pruned.json.tmp",
        ] {
            assert_eq!(parse_manifest_name(other), None, "{other}");
        }
    }

    #[test]
    fn the_mac_covers_every_field_and_needs_the_key() {
        let k = key(b"0123456789abcdef-secret");
        let mut m = manifest();
        m.seal(Some(&k));
        assert!(m.check(Some(&k)).is_ok());
        assert!(m.check(None).is_ok(), "unchecked without a key");
        assert!(m.check(Some(&key(b"another-secret-0123"))).is_err());
        let edits: [fn(&mut Manifest); 5] = [
            |m| m.files[0].last_seq = 10,
            |m| m.files[0].last_hash = "00".repeat(32),
            |m| m.complete = true,
            |m| m.archive = "/elsewhere".into(),
            |m| m.files.clear(),
        ];
        for edit in edits {
            let mut forged = m.clone();
            edit(&mut forged);
            assert!(forged.check(Some(&k)).unwrap_err().contains("MAC mismatch"));
        }
        let mut unsealed = m.clone();
        unsealed.mac = None;
        assert!(unsealed.check(Some(&k)).unwrap_err().contains("no mac"));
        let mut future = m;
        future.v = 2;
        assert!(future.check(None).unwrap_err().contains("version"));
    }

    #[test]
    fn describe_reads_the_first_and_last_records() {
        let line = |seq: u64, ts: u64, hash: &str| {
            format!(
                "{{\"chain\":\"p1-t2\",\"epoch\":0,\"kind\":\"summary\",\"seq\":{seq},\"ts\":{ts},\"v\":1,\"hash\":\"{hash}\"}}\n"
            )
        };
        let bytes = format!(
            "{}{}",
            line(4, 40, &"11".repeat(32)),
            line(5, 50, &"22".repeat(32))
        );
        let d = describe("f", bytes.as_bytes()).unwrap();
        assert_eq!(
            (d.first_seq, d.last_seq, d.first_ts, d.last_ts),
            (4, 5, 40, 50)
        );
        assert_eq!(d.last_hash, "22".repeat(32));
        assert_eq!(d.sha256, hex(&Sha256::digest(bytes.as_bytes())));
        assert!(describe("f", b"").unwrap_err().contains("no record"));
        assert!(describe("f", b"not json\n").is_err());
    }
}

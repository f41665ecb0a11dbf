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
//!    directory (atomically, MACed with the chain's HMAC secret), and only then removes the
//!    originals. An interrupted run leaves identical
//!    copies in both places, which a rerun finishes and `verify-log --archive-dir` reads
//!    once.
//!
//! Chain files are streamed, never held whole (one may be 1 GiB): each is read a line at a
//! time to describe it, again to check it, again to copy it, and its copy once more to compare
//! it. Every read computes the SHA-256 of the bytes it saw, and each must be the one the first
//! read recorded (the one the manifest names): so the bytes checked, copied and archived are
//! the same bytes, and a file that changes between two reads is not moved.
//!
//! The manifest records, for each file moved, its name, SHA-256, first and last seq, last
//! record hash and times. `verify-log --allow-pruned` continues a chain whose first present
//! file is not file 0 from the manifest's last hash and seq, so the `rotate` link of the
//! first file left is still checked; `verify-log --archive-dir ARCHIVE` reads the moved files
//! back and checks the chains whole. The manifest is bookkeeping that the verifier holds the
//! chain to, not a protection of the moved files: those are protected by the archive's own
//! controls, and can be verified there at any time.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use hmac::Mac;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::checkpoint;
use super::files;
use super::keys::EpochKey;
use super::lines::{Line, Lines};
use super::record::{hex, parse_hash, write_canonical};
use super::scan::scan;
use super::verify::{list_all, verify_all, ChainCheck, ChainReport, Report, VerifyOptions};

/// Schema version of the manifest.
pub const MANIFEST_VERSION: u64 = 1;

/// Domain separation of the manifest MAC from record MACs (over 32-byte hashes) and the key
/// ratchet (over `kvh-ratchet`).
const MANIFEST_MAC_DOMAIN: &[u8] = b"kvh-prune-manifest\n";

/// Largest manifest read (one entry is about 400 bytes).
pub const MAX_MANIFEST_BYTES: u64 = 64 << 20;

/// The manifest of `chain` in the log directory `dir`.
pub fn manifest_path(dir: &Path, chain: &str) -> PathBuf {
    dir.join(format!("kvh-{chain}.pruned.json"))
}

/// The chain id of a manifest file name, `None` for any other file.
pub fn parse_manifest_name(name: &str) -> Option<&str> {
    let chain = name.strip_prefix("kvh-")?.strip_suffix(".pruned.json")?;
    files::valid_chain_id(chain).then_some(chain)
}

/// One file moved out of the log directory. Unknown members are refused, here and in
/// [`Manifest`]: the MAC covers the members the struct holds, and a member it would drop on
/// reading would be unsealed content in a sealed file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrunedFile {
    pub name: String,
    /// SHA-256 of the file's bytes, hex.
    pub sha256: String,
    pub first_seq: u64,
    pub last_seq: u64,
    /// Hash of the file's last record: the `prev` of the next file's first record.
    pub last_hash: String,
    /// Unix nanoseconds of the file's oldest and newest records (records carry their
    /// event's time, which need not grow with seq).
    pub oldest_ts: u64,
    pub newest_ts: u64,
}

/// What `prune-log` moved of one chain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub v: u64,
    pub chain: String,
    /// Files 0, 1, ... in order, every one moved so far.
    pub files: Vec<PrunedFile>,
    /// Every file of the chain was moved (it had ended with `stop`).
    pub complete: bool,
    /// Where the files were moved to: the archive directory's absolute path.
    pub archive: String,
    /// Unix nanoseconds of the last change.
    pub updated_at: u64,
    /// `HMAC-SHA256(K0, "kvh-prune-manifest\n" || body)` in hex, where K0 is the configured
    /// HMAC secret and body the canonical manifest without `mac` (`manifest_mac`); `None`
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

    /// Sets `mac`.
    pub fn seal(&mut self, key: &EpochKey) {
        self.mac = Some(hex(&manifest_mac(key, &self.body())));
    }

    /// Checks the version and the contiguity of the files, and the MAC against `key` (the
    /// epoch-0 key) when one is given.
    pub fn check(&self, key: Option<&EpochKey>) -> Result<(), String> {
        if self.v != MANIFEST_VERSION {
            return Err(format!("unsupported manifest version {}", self.v));
        }
        self.check_contiguous()?;
        let Some(k) = key else { return Ok(()) };
        let Some(mac) = self.mac.as_deref() else {
            return Err("manifest has no mac but a key was given".into());
        };
        if !parse_hash(mac).is_some_and(|mac| manifest_mac_verifies(k, &self.body(), &mac)) {
            return Err("manifest MAC mismatch: wrong key or forged manifest".into());
        }
        Ok(())
    }

    /// Files 0, 1, ... of the chain, each starting at the seq after the previous one's last:
    /// a manifest that skips a file or a record accounts for nothing.
    fn check_contiguous(&self) -> Result<(), String> {
        let mut next_seq = 0u64;
        for (i, f) in self.files.iter().enumerate() {
            if f.name != files::file_name(&self.chain, i as u64) || f.first_seq != next_seq {
                return Err(format!(
                    "manifest entry {i} ({}) does not continue the one before it",
                    f.name
                ));
            }
            if f.last_seq < f.first_seq {
                return Err(format!(
                    "manifest entry {i} ({}) ends before it starts",
                    f.name
                ));
            }
            next_seq = f.last_seq.saturating_add(1);
        }
        Ok(())
    }

    /// The last file moved: where the chain left in the log directory picks up.
    pub fn tail(&self) -> Option<&PrunedFile> {
        self.files.last()
    }
}

/// The manifest MAC: HMAC-SHA256(K0, domain || body), K0 the epoch-0 key of the chain's
/// secret: verifiers hold it, writers past their first rotation do not (a writer still in its
/// first file does).
fn manifest_mac(key: &EpochKey, body: &[u8]) -> [u8; 32] {
    let mut m = key.mac();
    m.update(MANIFEST_MAC_DOMAIN);
    m.update(body);
    m.finalize().into_bytes().into()
}

/// Whether `mac` is [`manifest_mac`] of `body`, compared in constant time (`verify_slice`), as
/// the records' MACs are: a manifest is a file whoever writes to the log directory chooses,
/// and `tail-log` checks it again at every pass.
fn manifest_mac_verifies(key: &EpochKey, body: &[u8], mac: &[u8; 32]) -> bool {
    let mut m = key.mac();
    m.update(MANIFEST_MAC_DOMAIN);
    m.update(body);
    m.verify_slice(mac).is_ok()
}

/// Reads the manifest of `chain` in `dir`; `Ok(None)` when there is none.
pub fn read_manifest(dir: &Path, chain: &str) -> Result<Option<Manifest>, String> {
    let path = manifest_path(dir, chain);
    let bytes = match files::read_regular(&path, MAX_MANIFEST_BYTES) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let m: Manifest = serde_json::from_slice(&bytes).map_err(|e| {
        format!(
            "{}: not a prune manifest: {}",
            path.display(),
            crate::json_error_without_content(&e)
        )
    })?;
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

/// The chain's manifest once `moved` is recorded in it (`base`, the manifest on disk, or a new
/// one), not sealed yet.
fn updated_manifest(
    base: Option<&Manifest>,
    chain: &str,
    moved: Vec<PrunedFile>,
    complete: bool,
    archive: &Path,
) -> Manifest {
    let mut m = match base {
        Some(m) => m.clone(),
        None => Manifest {
            v: MANIFEST_VERSION,
            chain: chain.to_string(),
            files: Vec::new(),
            complete: false,
            archive: fs::canonicalize(archive)
                .unwrap_or_else(|_| archive.to_path_buf())
                .display()
                .to_string(),
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
    m.updated_at = super::unix_nanos(SystemTime::now());
    m
}

/// The size of the manifest file `write_manifest` would write for `m` once sealed (its MAC is
/// 64 hex digits).
fn manifest_file_len(mut m: Manifest) -> u64 {
    m.mac = Some("0".repeat(64));
    serde_json::to_vec_pretty(&m).map_or(0, |t| t.len() as u64 + 1)
}

/// The length and SHA-256 of a chain file's bytes, as one read of it saw them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Content {
    len: u64,
    sha256: [u8; 32],
}

impl Content {
    /// What `lines`, made [`Lines::hashing`], has read so far: all of the file once
    /// [`Lines::next_line`] returned `None`. `None` when it was not hashing.
    fn read_by<R: Read>(lines: &Lines<R>) -> Option<Content> {
        lines.sha256().map(|sha256| Content {
            len: lines.bytes_read(),
            sha256,
        })
    }
}

/// A chain file as its first read saw it: the facts its manifest entry records, and its
/// content, which every later read (the check, the copy, the archive's copy) must find again.
struct Described {
    facts: PrunedFile,
    content: Content,
}

/// Reads the chain file `name` (at most `cap` bytes, from `reader`) a line at a time and
/// describes it. Every line must be a whole record: a rotated file ends with a newline and
/// holds nothing else (a line longer than any record is refused without being held). A read
/// error is `Io`; bytes that are not such a file are `NotVerified`.
fn describe<R: Read>(name: &str, reader: R, cap: u64) -> Result<Described, PruneError> {
    let bad = |why: String| PruneError::NotVerified(format!("{name}: {why}"));
    let mut lines = Lines::new(reader, cap).hashing();
    let mut first: Option<u64> = None;
    let mut last: Option<(u64, String)> = None;
    let (mut oldest, mut newest) = (u64::MAX, 0u64);
    while let Some(line) = lines
        .next_line()
        .map_err(|e| PruneError::Io(format!("{name}: {e}")))?
    {
        let line = match line {
            Line::Whole(line) => line,
            Line::Torn(_) => return Err(bad("unterminated line at the end".into())),
            Line::Overlong { len, .. } => {
                return Err(bad(format!(
                    "a line of {len} bytes, longer than any record"
                )))
            }
        };
        let r = scan(line).map_err(|e| bad(e.to_string()))?;
        let (Some(seq), Some(ts)) = (r.seq, r.ts) else {
            return Err(bad("a record without seq or ts".into()));
        };
        first.get_or_insert(seq);
        last = Some((seq, r.hash.to_string()));
        // Records carry their event's time, which need not grow with seq.
        oldest = oldest.min(ts);
        newest = newest.max(ts);
    }
    let (Some(first_seq), Some((last_seq, last_hash))) = (first, last) else {
        return Err(bad("no record".into()));
    };
    // Made hashing above: always there.
    let content = Content::read_by(&lines).ok_or_else(|| bad("not hashed".into()))?;
    Ok(Described {
        facts: PrunedFile {
            name: name.to_string(),
            sha256: hex(&content.sha256),
            first_seq,
            last_seq,
            last_hash,
            oldest_ts: oldest,
            newest_ts: newest,
        },
        content,
    })
}

/// Describes the chain file at `path`, named `name` in the chain, opened as every chain file
/// is ([`files::open_regular`]: no symlink, no FIFO, a regular file within the read cap).
fn describe_file(path: &Path, name: &str) -> Result<Described, PruneError> {
    let (file, _) = files::open_regular(path, files::MAX_READ_BYTES)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    describe(name, file, files::MAX_READ_BYTES)
}

/// Checks the chain file at `path`, read again a line at a time, as file `index` of the chain
/// `chain` (`check`: hashes, links, MACs), and requires that the bytes checked are the ones
/// described (`want`, same length and SHA-256): that is how exactly the bytes that move are
/// the ones checked, without holding them.
fn check_described(
    check: &mut ChainCheck<'_>,
    chain: &str,
    index: u64,
    path: &Path,
    want: Content,
) -> Result<(), PruneError> {
    let (file, _) = files::open_regular(path, files::MAX_READ_BYTES)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let mut lines = Lines::new(ReadErrors::from(file), files::MAX_READ_BYTES).hashing();
    let checked = check.file(index, &mut lines);
    // A file that could not be read is an I/O error, not one that does not verify.
    if let Some(e) = &lines.get_ref().first {
        return Err(PruneError::Io(format!("{}: {e}", path.display())));
    }
    checked.map_err(|e| PruneError::NotVerified(format!("chain {chain}: not moved: {e}")))?;
    if Content::read_by(&lines) != Some(want) {
        return Err(PruneError::NotVerified(format!(
            "chain {chain}: not moved: {}: changed while it was read",
            path.display()
        )));
    }
    Ok(())
}

/// A reader that remembers its first error (other than an interrupted call, which is tried
/// again), so that a check that failed on it is told apart from one that failed on what it
/// read.
struct ReadErrors<R> {
    inner: R,
    first: Option<io::Error>,
}

impl<R> From<R> for ReadErrors<R> {
    fn from(inner: R) -> Self {
        ReadErrors { inner, first: None }
    }
}

impl<R: Read> Read for ReadErrors<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf).inspect_err(|e| {
            if e.kind() != io::ErrorKind::Interrupted && self.first.is_none() {
                self.first = Some(io::Error::new(e.kind(), e.to_string()));
            }
        })
    }
}

/// How much of a file a copy or a comparison reads at once.
const COPY_CHUNK: usize = 64 * 1024;

/// Copies all of `from` to `to` through one buffer, and returns the length and SHA-256 of
/// what was copied.
fn copy_hashing(mut from: impl Read, to: &mut impl Write) -> io::Result<Content> {
    let mut buf = vec![0u8; COPY_CHUNK];
    let mut sha = Sha256::new();
    let mut len = 0u64;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let chunk = &buf[..n];
        sha.update(chunk);
        to.write_all(chunk)?;
        len += n as u64;
    }
    Ok(Content {
        len,
        sha256: sha.finalize().into(),
    })
}

/// The file at `path`, opened as [`files::open_regular`] does, to be read up to one byte past
/// `want`'s length: enough to tell a longer file, and no more whatever it holds. Copied
/// ([`copy_hashing`]), it has the content `want` only when it holds exactly those bytes.
fn open_as_described(path: &Path, want: Content) -> io::Result<io::Take<File>> {
    let (file, _) = files::open_regular(path, files::MAX_READ_BYTES)?;
    Ok(file.take(want.len.saturating_add(1)))
}

/// The archive directory must exist, be a real directory owned by us, not be writable by
/// group or others, be neither the log directory nor inside it (nor reach it through a bind
/// mount: compared by device and inode), nor the checkpoint directory given, and have a
/// UTF-8 path (the manifests record it as text, and later runs hold it to that).
fn check_archive_dir(dir: &Path, log_dir: &Path, checkpoints: Option<&Path>) -> Result<(), String> {
    let m = fs::symlink_metadata(dir).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => format!(
            "--archive-dir {}: no such directory; create it first, private to this user \
             (mkdir -m 0700)",
            dir.display()
        ),
        _ => format!("--archive-dir {}: {e}", dir.display()),
    })?;
    if !m.is_dir() {
        return Err(format!(
            "--archive-dir {}: not a directory (a symlink is not followed)",
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
    fs::metadata(log_dir).map_err(|e| format!("{}: {e}", log_dir.display()))?;
    let canonical = fs::canonicalize(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    if canonical.ancestors().any(|a| same_place(a, log_dir)) {
        return Err(format!(
            "--archive-dir {} is the log directory {} or inside it",
            dir.display(),
            log_dir.display()
        ));
    }
    if canonical.to_str().is_none() {
        return Err(format!(
            "--archive-dir {}: its path is not UTF-8, and the prune manifests record it as \
             text (later runs would not find it the same): use a directory with a UTF-8 name",
            dir.display()
        ));
    }
    // Marking a log or checkpoint directory as an archive would stop every writer starting
    // with it.
    if checkpoints.is_some_and(|c| same_place(dir, c)) {
        return Err(format!(
            "--archive-dir {} is the checkpoint directory given (--checkpoint): marked as an \
             archive, it would stop every writer keeping its checkpoints there",
            dir.display()
        ));
    }
    if !is_marked_archive(dir) && holds_log_files(dir)? {
        return Err(format!(
            "--archive-dir {}: holds a forensic log's files (chain files, prune manifests or \
             signed checkpoints) but not {ARCHIVE_MARKER}: a log or checkpoint directory, not \
             an archive of kvh prune-log (were the log directory and --archive-dir given the \
             wrong way round?)",
            dir.display()
        ));
    }
    Ok(())
}

/// The log directory must not be an archive: pruning one would move the archived chains into
/// the directory given as the archive (the log directory, when the two are swapped) and mark
/// it as an archive, which every writer starting there then refuses.
fn check_log_dir(dir: &Path) -> Result<(), String> {
    if is_marked_archive(dir) {
        return Err(format!(
            "{}: an archive of kvh prune-log ({ARCHIVE_MARKER} is there), not a log directory \
             (were the log directory and --archive-dir given the wrong way round?)",
            dir.display()
        ));
    }
    Ok(())
}

/// Whether `dir` holds the marker a first run leaves in its archive.
fn is_marked_archive(dir: &Path) -> bool {
    dir.join(ARCHIVE_MARKER).symlink_metadata().is_ok()
}

/// Whether `dir` holds chain files or prune manifests.
fn holds_log_files(dir: &Path) -> Result<bool, String> {
    let chains = files::list_chains(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let manifests = list_manifests(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let checkpoints = checkpoint::find(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    Ok(!chains.is_empty() || !manifests.is_empty() || !checkpoints.is_empty())
}

/// Puts the chain file at `src`, described as `want`, in the archive as `name`: streamed into
/// a new file (unnamed, or a temporary name: exclusive, 0600), hashed as it is written,
/// fsynced, then linked to `name`, which must not exist. It is linked only when what was
/// written is `want` (a file changed since it was described and checked is `NotVerified`,
/// and nothing of it is linked). An existing `name` with the same bytes is accepted (a rerun
/// after an interruption); one with other bytes is an error. A failed write leaves no partial
/// file under `name`.
fn archive_copy(src: &Path, want: Content, archive: &Path, name: &str) -> Result<(), PruneError> {
    let dest = archive.join(name);
    // Set when the source held other bytes than `want`: what was written is not linked.
    let mut changed = false;
    // Called again, on the temporary name, when no unnamed file could be linked: each call
    // reads the source from its start.
    let mut fill = |to: &mut File| -> io::Result<()> {
        let from = open_as_described(src, want)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", src.display())))?;
        if copy_hashing(from, to)? != want {
            changed = true;
            return Err(io::Error::other("changed while copied"));
        }
        Ok(())
    };
    let linked = match files::link_new_file(archive, &dest, &mut fill) {
        Some(linked) => linked,
        None => link_via_temp_name(archive, &dest, name, &mut fill),
    };
    if changed {
        return Err(PruneError::NotVerified(format!(
            "{}: changed while copied to the archive: not moved; nothing linked as {}",
            src.display(),
            dest.display()
        )));
    }
    match linked {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(PruneError::Io(format!("{}: {e}", dest.display()))),
    }
    holds_the_same(&dest, want).map_err(PruneError::Io)
}

/// Where no unnamed file can be linked: `fill` writes a temporary file (exclusive, 0600),
/// which is fsynced and hard-linked to `dest` only when `fill` succeeded, then removed.
fn link_via_temp_name(
    archive: &Path,
    dest: &Path,
    name: &str,
    fill: impl FnOnce(&mut File) -> io::Result<()>,
) -> io::Result<()> {
    let tmp = archive.join(format!("{TMP_PREFIX}{name}.{}", std::process::id()));
    let _ = fs::remove_file(&tmp); // a leftover of an interrupted run of this pid
    let written = files::create_exclusive(&tmp, 0o600)
        .map_err(|(_, e)| e)
        .and_then(|mut f| fill(&mut f).and_then(|()| f.sync_all()));
    let linked = written.and_then(|()| fs::hard_link(&tmp, dest));
    let _ = fs::remove_file(&tmp);
    linked
}

/// What a dry run finds in place of [`archive_copy`]: an archive file already named `name`
/// must hold the bytes `want` describes (a rerun's copy), as the real run will require.
/// Writes nothing; says whether the real run would write a new copy.
fn archive_accepts(want: Content, archive: &Path, name: &str) -> Result<bool, String> {
    let dest = archive.join(name);
    match dest.symlink_metadata() {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(true),
        Err(e) => Err(format!("{}: {e}", dest.display())),
        Ok(_) => holds_the_same(&dest, want).map(|()| false),
    }
}

/// What a dry run finds in place of the writes of the copies it counted (each one's size in
/// `copies`): the archive directory takes a new file, and its file system has room for them,
/// each rounded up to whole blocks, and for as many new files (one more, of one block, for the
/// archive's marker on a first run: `marker`). A limit the file system does not state is not
/// checked. Writes nothing.
fn archive_has_room(archive: &Path, copies: &[u64], marker: bool) -> Result<(), String> {
    // A first run marks the archive before it looks for anything to move: the marker is a
    // file to create even when no copy is.
    if copies.is_empty() && !marker {
        return Ok(());
    }
    let files = copies.len() as u64;
    let bytes = copies.iter().fold(0u64, |sum, &b| sum.saturating_add(b));
    if !files::may_write(archive) {
        return Err(format!(
            "{}: no file can be created in the archive directory (its permissions, or a \
             read-only mount); the real run would move nothing",
            archive.display()
        ));
    }
    let free = files::free_space(archive).map_err(|e| format!("{}: {e}", archive.display()))?;
    // Each new file takes whole blocks, the marker (a few bytes) one.
    let new_files = files.saturating_add(u64::from(marker));
    let block = free.block.max(1);
    let needed = copies
        .iter()
        .map(|&b| b.div_ceil(block).max(1).saturating_mul(block))
        .fold(u64::from(marker).saturating_mul(block), u64::saturating_add);
    if let Some(have) = free.bytes.filter(|&have| needed > have) {
        return Err(format!(
            "{}: the copies need up to {needed} bytes ({files} files, {bytes} bytes of \
             records), but its file system has {have} bytes free; the real run would stop \
             when it is full (a chain not copied whole stays whole in the log, the copies \
             made kept in the archive for a rerun)",
            archive.display()
        ));
    }
    if let Some(have) = free.files.filter(|&have| new_files > have) {
        return Err(format!(
            "{}: the copies need {new_files} new files, but its file system can hold only \
             {have} more; the real run would stop there (a chain not copied whole stays whole \
             in the log, the copies made kept in the archive for a rerun)",
            archive.display()
        ));
    }
    Ok(())
}

/// What a dry run finds in place of the manifests the real run writes in the log directory
/// `dir` (each one's size in `manifests`): its file system has room for them, in whole
/// blocks, and for as many new files, besides the archive's copies (`copies`, `marker`) when
/// the archive is on the same file system. Counted as if every manifest were new and no
/// original removed: the real run frees space only after each chain's manifest is written.
/// A limit the file system does not state is not checked. Writes nothing.
fn log_has_room(
    dir: &Path,
    archive: &Path,
    copies: &[u64],
    marker: bool,
    manifests: &[u64],
) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    if manifests.is_empty() {
        return Ok(());
    }
    let device = |p: &Path| fs::metadata(p).map(|m| m.dev()).ok();
    let shared = device(dir).is_some() && device(dir) == device(archive);
    let free = files::free_space(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let block = free.block.max(1);
    let in_blocks = |b: u64| b.div_ceil(block).max(1).saturating_mul(block);
    let sum = |sizes: &[u64]| {
        sizes
            .iter()
            .map(|&b| in_blocks(b))
            .fold(0u64, u64::saturating_add)
    };
    let mut needed = sum(manifests);
    let mut new_files = manifests.len() as u64;
    if shared {
        needed = needed
            .saturating_add(sum(copies))
            .saturating_add(u64::from(marker).saturating_mul(block));
        new_files = new_files.saturating_add(copies.len() as u64 + u64::from(marker));
    }
    let what = if shared {
        "the manifests and the archive's copies (one file system)"
    } else {
        "the manifests"
    };
    if let Some(have) = free.bytes.filter(|&have| needed > have) {
        return Err(format!(
            "{}: {what} need up to {needed} bytes, but its file system has {have} bytes free; \
             the real run would stop when it is full (what was not recorded stays in the log)",
            dir.display()
        ));
    }
    if let Some(have) = free.files.filter(|&have| new_files > have) {
        return Err(format!(
            "{}: {what} need {new_files} new files, but its file system can hold only {have} \
             more; the real run would stop there",
            dir.display()
        ));
    }
    Ok(())
}

/// Whether `dest` (read as a regular file, not followed, streamed) holds exactly the bytes
/// `want` describes: the same length and SHA-256.
fn holds_the_same(dest: &Path, want: Content) -> Result<(), String> {
    let back = open_as_described(dest, want)
        .and_then(|from| copy_hashing(from, &mut io::sink()))
        .map_err(|e| format!("{}: {e}", dest.display()))?;
    if back != want {
        return Err(format!(
            "{}: exists with other contents than the file being archived; nothing removed",
            dest.display()
        ));
    }
    Ok(())
}

/// Refuses an archive directory that cannot take a copy and keep nothing else: immutable
/// (`chattr +i`: nothing can be created in it), or append-only (`chattr +a`, which keeps
/// evidence from being removed, and is fine) on a file system that cannot make an unnamed
/// file, where each copy would be written under a temporary name that could not be removed.
fn check_archive_marks(archive: &Path) -> Result<(), String> {
    let marks = files::marks(archive);
    if marks.immutable {
        return Err(format!(
            "{}: the archive directory is marked immutable (chattr +i): nothing can be moved \
             into it",
            archive.display()
        ));
    }
    if marks.append_only && !files::unnamed_files_supported(archive) {
        return Err(format!(
            "{}: the archive directory is marked append-only (chattr +a) on a file system \
             that cannot make unnamed files (O_TMPFILE): each copy would leave its temporary \
             name behind",
            archive.display()
        ));
    }
    Ok(())
}

/// Whether two paths name the same existing directory (device and inode).
pub(crate) fn same_place(a: &Path, b: &Path) -> bool {
    match (fs::metadata(a), fs::metadata(b)) {
        (Ok(x), Ok(y)) => (x.dev(), x.ino()) == (y.dev(), y.ino()),
        _ => false,
    }
}

/// The file that marks a directory as an archive of `kvh prune-log`: the forensic writer
/// refuses it as a log directory (a writer there would continue the archived chains).
pub const ARCHIVE_MARKER: &str = ".kvh-archive";

/// Marks `archive` (once; fsynced).
fn mark_archive(archive: &Path) -> Result<(), String> {
    let marker = archive.join(ARCHIVE_MARKER);
    if marker.symlink_metadata().is_ok() {
        return Ok(());
    }
    let mut f = files::create_exclusive(&marker, 0o600)
        .map_err(|(_, e)| format!("{}: {e}", marker.display()))?;
    f.write_all(b"an archive of kvh prune-log: not a log directory\n")
        .and_then(|_| f.sync_all())
        .and_then(|_| files::sync_dir(archive))
        .map_err(|e| format!("{}: {e}", marker.display()))
}

/// Names of this module's temporary files: `<archive>/.kvh-tmp-*` (copies) and
/// `<log>/.kvh-*.pruned.json.*.tmp` (manifests).
const TMP_PREFIX: &str = ".kvh-tmp-";

/// Removes temporary files an interrupted run left (under the locks, so no run is writing
/// them now).
fn remove_leftovers(log_dir: &Path, archive: &Path) {
    let remove_if = |dir: &Path, keep: &dyn Fn(&str) -> bool| {
        if let Ok(entries) = fs::read_dir(dir) {
            for e in entries.flatten() {
                let name = e.file_name();
                if name.to_str().is_some_and(|n| !keep(n)) {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
    };
    remove_if(archive, &|n| !n.starts_with(TMP_PREFIX));
    remove_if(log_dir, &|n| {
        !(n.starts_with(".kvh-") && n.contains(".pruned.json.") && n.ends_with(".tmp"))
    });
}

/// Adds `moved` to `base`, the manifest the run started from (`None`: a new one), seals it
/// and writes it, provided the manifest on disk is still `base`: one swapped in meanwhile
/// (an older one, say) is not extended and sealed.
pub fn record_moved(
    dir: &Path,
    base: Option<&Manifest>,
    chain: &str,
    moved: Vec<PrunedFile>,
    complete: bool,
    archive: &Path,
    key: &EpochKey,
) -> Result<Manifest, PruneError> {
    let on_disk = read_manifest(dir, chain)?;
    if on_disk.as_ref() != base {
        return Err(PruneError::NotVerified(format!(
            "{}: changed while the chain's files were being moved; not rewritten",
            manifest_path(dir, chain).display()
        )));
    }
    let mut m = updated_manifest(base, chain, moved, complete, archive);
    m.check_contiguous()
        .map_err(|e| PruneError::NotVerified(format!("chain {chain}: {e}")))?;
    manifest_fits(dir, chain, manifest_file_len(m.clone()))?;
    m.seal(key);
    write_manifest(dir, &m).map_err(|e| format!("{}: {e}", manifest_path(dir, chain).display()))?;
    Ok(m)
}

/// Refuses a manifest of `len` bytes larger than its readers take ([`MAX_MANIFEST_BYTES`]):
/// written, it would make the chain fail verification and refuse every later prune. Checked
/// before the moved files are removed, so a refusal leaves them where they were.
fn manifest_fits(dir: &Path, chain: &str, len: u64) -> Result<(), PruneError> {
    if len <= MAX_MANIFEST_BYTES {
        return Ok(());
    }
    Err(PruneError::Io(format!(
        "{}: chain {chain}'s manifest would take {len} bytes, more than the {MAX_MANIFEST_BYTES} \
         its readers take: nothing more of the chain is moved (its files stay; a larger \
         KVH_LOG_MAX_BYTES makes later chains' manifests shorter)",
        manifest_path(dir, chain).display()
    )))
}

/// The epoch-0 key of `secret`, for manifest MACs.
pub fn manifest_key(secret: &Zeroizing<Vec<u8>>) -> Result<EpochKey, String> {
    EpochKey::from_secret(secret.clone()).map_err(|e| format!("--key-file: {e}"))
}

/// An open directory, `flock`ed for the life of the value.
pub struct DirLock(#[allow(dead_code)] File);

/// Locks `dir` against another `prune-log` (on the same log directory, or the same archive).
pub fn lock_dir(dir: &Path) -> Result<DirLock, String> {
    let f = File::open(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    if !files::try_lock(&f) {
        return Err(format!(
            "{}: another kvh prune-log is running on this directory",
            dir.display()
        ));
    }
    Ok(DirLock(f))
}

/// A run's request, with what `prune_all` derived from it: the cut-off and the keys.
pub struct PrunePlan<'a> {
    pub req: &'a PruneRequest<'a>,
    /// Files whose newest record is older than this (Unix nanoseconds) may move.
    pub cutoff_ns: u64,
    /// The epoch-0 key of each HMAC secret of `req.opts.hmac_keys`, in order: a chain's
    /// manifest is MACed with the secret that seals the chain.
    pub keys: &'a [EpochKey],
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
    /// A file that would have moved next, left in place with the files after it because it is
    /// marked append-only or immutable (its removal refused); the files before it moved. A run
    /// with one fails (exit 2), as one whose first file is marked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub left_marked: Option<String>,
    /// In a dry run: the size of each file the archive does not hold yet (what the real run
    /// would write there).
    #[serde(skip)]
    pub new_copies: Vec<u64>,
    /// In a dry run: the size of the manifest the real run would write in the log directory.
    #[serde(skip)]
    pub new_manifest: u64,
}

/// Why a chain was not (wholly) moved.
#[derive(Debug, thiserror::Error)]
pub enum PruneError {
    /// A file read for the move is not the continuation of the chain that verified: it
    /// changed since. Nothing of it was removed.
    #[error("{0}")]
    NotVerified(String),
    /// An I/O error or a conflict in the archive.
    #[error("{0}")]
    Io(String),
}

impl From<String> for PruneError {
    fn from(e: String) -> Self {
        PruneError::Io(e)
    }
}

/// What `prune_chain` knows of a chain from the verification of the directory.
pub struct ChainToPrune<'a> {
    pub chain: &'a str,
    /// Its files in the log directory, oldest first.
    pub list: &'a [(u64, PathBuf)],
    /// It ended with `stop`.
    pub closed: bool,
    /// Its last seq.
    pub last_seq: Option<u64>,
    /// The seq of its signed checkpoint, if one was found.
    pub checkpoint_seq: Option<u64>,
    /// The HMAC secret that sealed it, as the verification found it (index in
    /// `hmac_keys`); `None` when no record's MAC was read.
    pub key_index: Option<usize>,
}

/// Moves what may move of one chain, one file at a time, by the rules of the module docs:
/// each file is described, checked as the continuation of the chain ([`ChainCheck`]: hashes,
/// links and MACs of exactly the bytes described: same SHA-256), copied to the archive (the
/// same bytes again) and read back; then the manifest is written and the originals are
/// removed, oldest first. Moving stops before the
/// file that holds the chain's checkpoint (so a verifier can always hold the checkpoint to a
/// record), unless the checkpoint is the last record of an ended chain.
pub fn prune_chain(plan: &PrunePlan<'_>, c: &ChainToPrune<'_>) -> Result<ChainPruned, PruneError> {
    let mut done = ChainPruned {
        chain: c.chain.to_string(),
        ..Default::default()
    };
    // A chain is sealed by one secret: its manifest is MACed with that one too.
    let key = || {
        c.key_index.and_then(|i| plan.keys.get(i)).ok_or_else(|| {
            PruneError::NotVerified(format!(
                "chain {}: no record's MAC was verified, so its HMAC key is not known",
                c.chain
            ))
        })
    };
    let base = read_manifest(plan.req.dir, c.chain)?;
    if let Some(m) = &base {
        m.check(Some(key()?)).map_err(|e| {
            PruneError::NotVerified(format!(
                "{}: {e}",
                manifest_path(plan.req.dir, c.chain).display()
            ))
        })?;
        if !same_place(Path::new(&m.archive), plan.req.archive) {
            return Err(PruneError::Io(format!(
                "chain {}: its earlier files went to {}; move the rest to the same archive",
                c.chain,
                m.archive.escape_debug()
            )));
        }
    }
    let Some((first, _)) = c.list.first() else {
        return Ok(done);
    };
    let mut check = ChainCheck::new(c.chain, base.as_ref(), *first, c.key_index, plan.req.opts)
        .map_err(PruneError::NotVerified)?;
    let keep = if c.closed { 0 } else { 2 };
    let movable = c.list.len().saturating_sub(keep);
    let whole_allowed = c.checkpoint_seq.is_none() || c.checkpoint_seq == c.last_seq;
    let mut moved_paths = Vec::new();
    for (index, path) in &c.list[..movable] {
        let name = files::file_name(c.chain, *index);
        let Described { facts, content } = describe_file(path, &name)?;
        if facts.newest_ts >= plan.cutoff_ns {
            break;
        }
        let holds_checkpoint = c.checkpoint_seq.is_some_and(|s| s <= facts.last_seq);
        let last_of_ended = c.closed && moved_paths.len() + 1 == c.list.len();
        if holds_checkpoint && !(last_of_ended && whole_allowed) {
            break;
        }
        // A file that would move, or the manifest that would record the first, marked
        // append-only or immutable: its removal (or replacement) would be refused once copied
        // and recorded. Before anything moved, the chain is refused; after, what moved stays
        // moved and this file and the later ones stay.
        let manifest = manifest_path(plan.req.dir, c.chain);
        let marked = if moved_paths.is_empty() && files::removal_refused(&manifest) {
            Some(manifest)
        } else {
            files::removal_refused(path).then(|| path.clone())
        };
        if let Some(marked) = marked {
            let why = format!(
                "chain {}: {} is marked append-only or immutable (chattr +a or +i), which \
                 refuses its removal or replacement",
                c.chain,
                marked.display()
            );
            if moved_paths.is_empty() {
                return Err(PruneError::Io(format!("{why}: nothing of the chain moved")));
            }
            done.left_marked = Some(format!("{why}: it and the files after it stay"));
            break;
        }
        check_described(&mut check, c.chain, *index, path, content)?;
        if plan.req.dry_run {
            if archive_accepts(content, plan.req.archive, &name)? {
                done.new_copies.push(content.len);
            }
        } else {
            archive_copy(path, content, plan.req.archive, &name)?;
        }
        if plan.req.opts.progress {
            crate::say(format_args!("prune-log:   {name} ({} bytes)", content.len));
        }
        done.bytes += content.len;
        done.files.push(facts);
        moved_paths.push(path.clone());
    }
    done.complete = c.closed && moved_paths.len() == c.list.len();
    if plan.req.dry_run && !moved_paths.is_empty() {
        let m = updated_manifest(
            base.as_ref(),
            c.chain,
            done.files.clone(),
            done.complete,
            plan.req.archive,
        );
        done.new_manifest = manifest_file_len(m);
        manifest_fits(plan.req.dir, c.chain, done.new_manifest)?;
    }
    if plan.req.dry_run || moved_paths.is_empty() {
        return Ok(done);
    }
    files::sync_dir(plan.req.archive)
        .map_err(|e| format!("{}: {e}", plan.req.archive.display()))?;
    record_moved(
        plan.req.dir,
        base.as_ref(),
        c.chain,
        done.files.clone(),
        done.complete,
        plan.req.archive,
        key()?,
    )?;
    for path in &moved_paths {
        fs::remove_file(path).map_err(|e| {
            format!(
                "{}: archived and recorded, but cannot be removed: {e}",
                path.display()
            )
        })?;
    }
    files::sync_dir(plan.req.dir).map_err(|e| format!("{}: {e}", plan.req.dir.display()))?;
    Ok(done)
}

/// What one `kvh prune-log` is asked to do.
pub struct PruneRequest<'a> {
    pub dir: &'a Path,
    pub archive: &'a Path,
    /// Files whose records are all older than this many days may move (0: any).
    pub older_than_days: u64,
    /// Say what would move; write and remove nothing.
    pub dry_run: bool,
    /// How the log is verified: with the HMAC key (required) and any checkpoints, reading
    /// earlier runs' manifests (`allow_pruned`).
    pub opts: &'a VerifyOptions,
    /// Where checkpoint files are looked for besides `dir` (`--checkpoint`).
    pub checkpoint_place: Option<&'a Path>,
}

/// What one `kvh prune-log` did.
pub struct PruneRun {
    /// Files whose records were all older than this (Unix nanoseconds) could move.
    pub cutoff_ns: u64,
    /// The verification before anything moved; when it failed, nothing moved.
    pub before: Report,
    /// What moved (or, in a dry run, would move), chain by chain.
    pub moved: Vec<ChainPruned>,
    /// The chains that could not move, and why (the others went on).
    pub refused: Vec<PruneError>,
    /// The verification of what is left, when files moved.
    pub after: Option<Report>,
    /// In a dry run: why the archive would not take the copies (the real run would stop
    /// there, exit 2).
    pub archive_refuses: Option<String>,
}

/// `kvh prune-log`: verifies the log, then moves what may move of each chain
/// ([`prune_chain`]), saying each chain that moved to `on_chain` as it goes, and verifies
/// what is left. Usage and set-up errors (archive, locks, key) are `Err`.
pub fn prune_all(
    req: &PruneRequest<'_>,
    mut on_chain: impl FnMut(&ChainPruned),
) -> Result<PruneRun, String> {
    if req.opts.hmac_keys.is_empty() {
        return Err("the HMAC key is required: the manifests are MACed with it".into());
    }
    let keys = req
        .opts
        .hmac_keys
        .iter()
        .map(|k| manifest_key(&k.secret))
        .collect::<Result<Vec<_>, _>>()?;
    check_log_dir(req.dir)?;
    check_archive_dir(req.archive, req.dir, req.checkpoint_place)?;
    // Before anything is copied: each manifest is installed in the log directory by a
    // rename, and each moved original removed from it. (An append-only archive is fine: its
    // copies are created unnamed and linked in, `files::link_new_file`.)
    files::check_renames(req.dir, "log directory", "each prune manifest")
        .map_err(|e| e.to_string())?;
    check_archive_marks(req.archive)?;
    // One run per log directory and per archive.
    let _log_lock = lock_dir(req.dir)?;
    let _archive_lock = lock_dir(req.archive)?;
    if !req.dry_run {
        remove_leftovers(req.dir, req.archive);
    }
    let cutoff_ns = super::unix_nanos(SystemTime::now())
        .saturating_sub(req.older_than_days.saturating_mul(86_400 * 1_000_000_000));
    let before = verify_all(req.dir, req.opts).map_err(|e| e.to_string())?;
    let mut run = PruneRun {
        cutoff_ns,
        before,
        moved: Vec::new(),
        refused: Vec::new(),
        after: None,
        archive_refuses: None,
    };
    if !run.before.ok() {
        return Ok(run);
    }
    // A directory with no chain and no manifest of an earlier run is not a log (a mistyped
    // path, a volume mounted elsewhere): a retention job must not report it as done, nor
    // mark an archive for it.
    if run.before.chains.is_empty() {
        return Err(format!(
            "{}: no forensic log here: no chain files (kvh-CHAIN-NNNNNN.jsonl) and no \
             manifest of an earlier prune-log run (kvh-CHAIN.pruned.json)",
            req.dir.display()
        ));
    }
    if !req.dry_run {
        mark_archive(req.archive)?;
    }
    let checkpoints = checkpoint_seqs(req.dir, req.checkpoint_place);
    let plan = PrunePlan {
        req,
        cutoff_ns,
        keys: &keys,
    };
    let verified: BTreeMap<&str, &ChainReport> = run
        .before
        .chains
        .iter()
        .map(|c| (c.chain.as_str(), c))
        .collect();
    let mut moved = Vec::new();
    let mut refused = Vec::new();
    for (chain, list) in list_all(req.dir, req.opts).map_err(|e| e.to_string())? {
        // A chain the verification did not see (a writer started since) was not verified:
        // nothing of it moves, and it is no failure; the next run takes it.
        let Some(report) = verified.get(chain.as_str()).copied() else {
            continue;
        };
        let state = ChainToPrune {
            chain: &chain,
            list: &list,
            closed: report.closed,
            last_seq: report.last_seq,
            checkpoint_seq: checkpoint_bound(Some(report), checkpoints.get(&chain)),
            key_index: report.key_index,
        };
        match prune_chain(&plan, &state) {
            Ok(done) if done.files.is_empty() => {}
            Ok(done) => {
                on_chain(&done);
                moved.push(done);
            }
            Err(e) => refused.push(e),
        }
    }
    if req.dry_run {
        let copies: Vec<u64> = moved
            .iter()
            .flat_map(|c| c.new_copies.iter().copied())
            .collect();
        let manifests: Vec<u64> = moved.iter().map(|c| c.new_manifest).collect();
        let marker = req.archive.join(ARCHIVE_MARKER).symlink_metadata().is_err();
        run.archive_refuses = archive_has_room(req.archive, &copies, marker)
            .and_then(|()| log_has_room(req.dir, req.archive, &copies, marker, &manifests))
            .err();
    }
    run.moved = moved;
    run.refused = refused;
    if !req.dry_run && run.moved.iter().any(|c| !c.files.is_empty()) {
        // What is left must still verify, from the manifests just written.
        run.after = Some(verify_all(req.dir, req.opts).map_err(|e| e.to_string())?);
    }
    Ok(run)
}

/// Where a chain's checkpoint points, for what `prune-log` may move: the earliest of its own
/// (MAC-checked) `checkpoint` records' newest `ckpt_seq`, the checkpoint the verification
/// matched and the checkpoint files found (`found`) — or, for a chain that ended, its last
/// record when the final checkpoint (written after `stop`, so named by no record) is there:
/// matched by the verification, or every file found at the last record and one of them
/// signed by the key the chain's own records name (a file read without its signature can
/// only make less move; a chain whose records name no signer, written before they did, has
/// none to hold it to).
fn checkpoint_bound(verified: Option<&ChainReport>, found: Option<&Vec<Found>>) -> Option<u64> {
    let matched = verified.and_then(|c| c.checkpoint_seq);
    let recorded = verified.and_then(|c| c.checkpoint_recorded);
    let last = verified.filter(|c| c.closed).and_then(|c| c.last_seq);
    let found = found.map_or(&[][..], Vec::as_slice);
    let file = found.iter().map(|f| f.seq).min();
    let final_signed = file.is_some()
        && file == last
        && verified
            .is_some_and(|c| c.signer.is_none() || found.iter().any(|f| f.signed_by_chain(c)));
    if last.is_some() && (matched == last || final_signed) {
        return last;
    }
    [recorded, matched, file].into_iter().flatten().min()
}

/// A checkpoint file found for a chain: the seq it claims, read without its signature, and
/// where it is.
struct Found {
    seq: u64,
    path: PathBuf,
}

impl Found {
    /// Whether the file is signed, for this seq, by the key `chain`'s own records name.
    fn signed_by_chain(&self, chain: &ChainReport) -> bool {
        let key = chain
            .signer
            .as_deref()
            .and_then(parse_hash)
            .and_then(|b| ed25519_dalek::VerifyingKey::from_bytes(&b).ok());
        key.is_some_and(|k| {
            checkpoint::read(&self.path, &[k])
                .is_ok_and(|c| c.chain == chain.chain && c.seq == self.seq)
        })
    }
}

/// The checkpoint files of each chain in DIR and in `--checkpoint`, with the seq each claims,
/// read without checking the signature: only to keep the checkpoint's file in place.
fn checkpoint_seqs(dir: &Path, extra: Option<&Path>) -> BTreeMap<String, Vec<Found>> {
    let mut out: BTreeMap<String, Vec<Found>> = BTreeMap::new();
    for place in std::iter::once(dir).chain(extra) {
        for f in checkpoint::find(place).unwrap_or_default() {
            if let Ok(Some(c)) = checkpoint::peek(&f) {
                out.entry(c.chain).or_default().push(Found {
                    seq: c.seq,
                    path: f,
                });
            }
        }
    }
    out
}

/// `kvh prune-log DIR --archive-dir ARCHIVE --older-than 0` with `opts`, for the tests of the
/// modules that read pruned logs.
#[cfg(test)]
pub(crate) fn prune_now(dir: &Path, archive: &Path, opts: &VerifyOptions) -> PruneRun {
    prune_all(
        &PruneRequest {
            dir,
            archive,
            older_than_days: 0,
            dry_run: false,
            opts,
            checkpoint_place: None,
        },
        |_| {},
    )
    .unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reader failing: first interrupted, then with `kind`, then with another error.
    struct Failing(Vec<io::Error>);

    impl Read for Failing {
        fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
            Err(self.0.pop().unwrap_or_else(|| io::Error::other("later")))
        }
    }

    /// A file at a manifest's name that is no manifest (a key put there by mistake) is
    /// refused by the JSON fault's kind and place, quoting nothing of it: serde's own message
    /// would quote the number a hex key's leading digits read as, or a JSON string whole.
    #[test]
    fn a_manifest_that_does_not_parse_is_refused_without_quoting_it() {
        let dir = tempfile::tempdir().unwrap();
        for (text, kind) in [
            // Read as far as the number `797094167e3`, of the wrong type.
            (
                "797094167e3b0c44298fc1c149afbf4c8996fb92427ae41e46\n",
                "JSON of another shape",
            ),
            (
                "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca4\n",
                "not JSON",
            ),
            (
                "\"SECRETSECRET0123456789abcdef\"\n",
                "JSON of another shape",
            ),
            ("{\"chain\": 797094167}\n", "JSON of another shape"),
        ] {
            std::fs::write(manifest_path(dir.path(), "p1-t1"), text).unwrap();
            let err = read_manifest(dir.path(), "p1-t1").unwrap_err();
            assert!(
                err.contains("not a prune manifest") && err.contains(kind),
                "{err}"
            );
            assert!(
                ["7970941", "e3b0c44", "SECRETSECRET"]
                    .iter()
                    .all(|quoted| !err.contains(quoted)),
                "the file was quoted: {err}"
            );
        }
    }

    #[test]
    fn a_read_error_is_remembered_and_an_interrupted_read_is_not() {
        let errors = vec![
            io::Error::from(io::ErrorKind::PermissionDenied),
            io::Error::from(io::ErrorKind::Interrupted),
        ];
        let mut lines = Lines::new(ReadErrors::from(Failing(errors)), 100);
        let err = lines.next_line().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::PermissionDenied);
        let first = lines.get_ref().first.as_ref().map(io::Error::kind);
        assert_eq!(first, Some(io::ErrorKind::PermissionDenied));
        assert!(lines.next_line().is_err());
        let first = lines.get_ref().first.as_ref().map(io::Error::kind);
        assert_eq!(
            first,
            Some(io::ErrorKind::PermissionDenied),
            "the first is kept"
        );
    }

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
                oldest_ts: 1,
                newest_ts: 2,
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
        m.seal(&k);
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
            line(4, 50, &"11".repeat(32)),
            line(5, 40, &"22".repeat(32))
        );
        let described = |b: &[u8]| describe("f", b, u64::MAX);
        let d = described(bytes.as_bytes()).unwrap();
        let f = &d.facts;
        assert_eq!(
            (f.first_seq, f.last_seq, f.oldest_ts, f.newest_ts),
            (4, 5, 40, 50)
        );
        assert_eq!(f.last_hash, "22".repeat(32));
        assert_eq!(f.sha256, hex(&Sha256::digest(bytes.as_bytes())));
        assert_eq!(d.content.len, bytes.len() as u64);
        assert_eq!(
            d.content.sha256,
            <[u8; 32]>::from(Sha256::digest(bytes.as_bytes()))
        );
        let refused = |b: &[u8]| match described(b) {
            Err(PruneError::NotVerified(e)) => e,
            Err(PruneError::Io(e)) => panic!("an I/O error: {e}"),
            Ok(_) => panic!("described: {}", String::from_utf8_lossy(b)),
        };
        assert!(refused(b"").contains("no record"));
        assert!(refused(b"not json\n").starts_with("f: "));
        // A rotated file ends with a newline and holds records only.
        let torn = &bytes.as_bytes()[..bytes.len() - 1];
        assert!(refused(torn).contains("unterminated line"));
        let blank = format!(
            "{}\n{}",
            line(4, 50, &"11".repeat(32)),
            line(5, 40, &"22".repeat(32))
        );
        refused(blank.as_bytes());
        // A file larger than the cap is an I/O error (it grew while read), not a judgement.
        assert!(matches!(
            describe("f", bytes.as_bytes(), 10),
            Err(PruneError::Io(e)) if e.contains("grew beyond")
        ));
    }

    /// A line longer than any record (made as it is read) is refused once it is known to be
    /// one: its bytes are measured, not held.
    #[test]
    fn describe_refuses_a_line_longer_than_any_record() {
        use crate::forensic::lines::MAX_LINE_BYTES;
        let long = MAX_LINE_BYTES as u64 + 1;
        let file = io::repeat(b'x').take(long).chain(&b"\n"[..]);
        match describe("f", file, u64::MAX) {
            Err(PruneError::NotVerified(e)) => assert!(
                e.contains(&format!("a line of {long} bytes, longer than any record")),
                "{e}"
            ),
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("described"),
        }
    }

    const SECRET: &[u8] = b"prune-stream-secret-0123456789";

    /// A stopped chain of a few files of 4 KiB in `dir`, its files oldest first.
    fn stopped_chain(dir: &Path) -> (String, Vec<(u64, PathBuf)>) {
        let log = crate::forensic::keyed_test_log(dir, 4096, SECRET, 48);
        log.stop();
        let mut chains = files::list_chains(dir).unwrap();
        assert_eq!(chains.len(), 1);
        let chain = chains.remove(0);
        assert!(chain.1.len() > 2, "{:?}", chain.1);
        chain
    }

    fn keyed() -> VerifyOptions {
        VerifyOptions {
            hmac_keys: vec![super::super::verify::SealKey::new(
                "hmac.key",
                Zeroizing::new(SECRET.to_vec()),
            )],
            ..VerifyOptions::default()
        }
    }

    /// `bytes` with its first `q` changed to `Q`: the same length, other bytes.
    fn altered(bytes: &[u8]) -> Vec<u8> {
        let mut out = bytes.to_vec();
        let at = out.iter().position(|&b| b == b'q').unwrap();
        out[at] = b'Q';
        out
    }

    fn private_dir(root: &Path, name: &str) -> PathBuf {
        let dir = root.join(name);
        fs::create_dir(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();
        dir
    }

    /// The first file of a stopped chain in `root`/log, and an empty archive beside it.
    struct FirstFile {
        archive: PathBuf,
        path: PathBuf,
        name: String,
        original: Vec<u8>,
        /// The file's content as described.
        want: Content,
    }

    fn first_file(root: &Path) -> FirstFile {
        let (chain, list) = stopped_chain(&root.join("log"));
        let path = list[0].1.clone();
        let name = files::file_name(&chain, 0);
        FirstFile {
            archive: private_dir(root, "archive"),
            original: fs::read(&path).unwrap(),
            want: describe_file(&path, &name).unwrap().content,
            path,
            name,
        }
    }

    fn entries(dir: &Path) -> Vec<String> {
        let mut out: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        out.sort();
        out
    }

    /// The check reads the file again: when it finds other bytes than the description (which
    /// the manifest would record), the chain is not moved, even though those bytes verify.
    #[test]
    fn a_file_checked_as_other_bytes_than_described_is_not_moved() {
        let tmp = tempfile::tempdir().unwrap();
        let (chain, list) = stopped_chain(&tmp.path().join("log"));
        let opts = keyed();
        let (index, path) = &list[0];
        let name = files::file_name(&chain, *index);
        let as_read = describe_file(path, &name).unwrap();
        let mut check = ChainCheck::new(&chain, None, 0, Some(0), &opts).unwrap();
        check_described(&mut check, &chain, *index, path, as_read.content).unwrap();
        // Described as other bytes than the (valid) file now holds.
        let other = describe(&name, &altered(&fs::read(path).unwrap())[..], u64::MAX).unwrap();
        let mut check = ChainCheck::new(&chain, None, 0, Some(0), &opts).unwrap();
        match check_described(&mut check, &chain, *index, path, other.content) {
            Err(PruneError::NotVerified(e)) => {
                assert!(
                    e.contains("not moved") && e.contains("changed while"),
                    "{e}"
                )
            }
            r => panic!("{:?}", r.err()),
        }
    }

    /// A file that changes after it was described and checked, before its copy: the copy
    /// (hashed as written) is not the file described, so nothing is linked in the archive,
    /// under its name or any other.
    #[test]
    fn a_file_changed_before_its_copy_is_not_linked() {
        let tmp = tempfile::tempdir().unwrap();
        let FirstFile {
            archive,
            path,
            name,
            original,
            want,
        } = first_file(tmp.path());
        let mut longer = original.clone();
        longer.extend_from_slice(&original);
        for changed in [altered(&original), longer, original[..100].to_vec()] {
            fs::write(&path, &changed).unwrap();
            match archive_copy(&path, want, &archive, &name) {
                Err(PruneError::NotVerified(e)) => assert!(e.contains("changed while"), "{e}"),
                r => panic!("{:?}", r.err()),
            }
            assert!(entries(&archive).is_empty(), "{:?}", entries(&archive));
            // Where no unnamed file can be made, the temporary name goes too.
            let fill = |to: &mut File| -> io::Result<()> {
                to.write_all(&changed)?;
                Err(io::Error::other("changed while copied"))
            };
            let dest = archive.join(&name);
            assert!(link_via_temp_name(&archive, &dest, &name, fill).is_err());
            assert!(entries(&archive).is_empty(), "{:?}", entries(&archive));
        }
        fs::write(&path, &original).unwrap();
        archive_copy(&path, want, &archive, &name).unwrap();
        assert_eq!(fs::read(archive.join(&name)).unwrap(), original);
        assert_eq!(entries(&archive), std::slice::from_ref(&name));
        // A rerun finds the same bytes there.
        archive_copy(&path, want, &archive, &name).unwrap();
        assert_eq!(entries(&archive), [name]);
    }

    /// An archive file of the name with other bytes (the same length, or more, or fewer)
    /// stops the move and the dry run, and is left as it was.
    #[test]
    fn an_archive_file_of_the_name_with_other_bytes_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let FirstFile {
            archive,
            path,
            name,
            original,
            want,
        } = first_file(tmp.path());
        let dest = archive.join(&name);
        let mut longer = original.clone();
        longer.push(b'\n');
        for other in [
            altered(&original),
            longer,
            original[..original.len() - 1].to_vec(),
        ] {
            fs::write(&dest, &other).unwrap();
            match archive_copy(&path, want, &archive, &name) {
                Err(PruneError::Io(e)) => assert!(e.contains("other contents"), "{e}"),
                r => panic!("{:?}", r.err()),
            }
            assert!(archive_accepts(want, &archive, &name)
                .unwrap_err()
                .contains("other contents"));
            assert_eq!(fs::read(&dest).unwrap(), other);
            assert_eq!(fs::read(&path).unwrap(), original);
        }
        fs::write(&dest, &original).unwrap();
        assert_eq!(archive_accepts(want, &archive, &name), Ok(false));
        fs::remove_file(&dest).unwrap();
        assert_eq!(archive_accepts(want, &archive, &name), Ok(true));
    }
}

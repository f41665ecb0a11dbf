//! Verification of every chain in a directory: the code behind `kvh verify-log`.
//!
//! Per record: JSON, canonical form, schema version, chain id, seq continuity, `prev`
//! linkage, hash, epoch, MAC (with the key ratcheted to the file's epoch); per file: index
//! continuity and the `rotate` link to the previous file; per chain: signed checkpoints
//! (the record at the checkpoint's seq must exist and carry its hash). The first problem of
//! a chain is reported as `file:line: reason` and ends that chain's check.
//!
//! Files `kvh prune-log` moved to an archive are read from there with `archive_dirs`, and
//! checked as if they had never moved; or, with `allow_pruned`, a chain whose oldest files
//! are gone is checked from where its manifest (`crate::forensic::prune`) says they ended.
//!
//! Keys rotate: several HMAC secrets and public keys may be given. Each chain is sealed by
//! one HMAC secret: the one its signed checkpoint names (`key_id`), or without one, the one
//! that verifies the first MAC the walk reads (its first record, or its prune manifest);
//! every MAC of the chain must verify with it. Its checkpoint must be signed by the key its
//! records name (`signer`).

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ed25519_dalek::VerifyingKey;
use serde::Serialize;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::checkpoint::{self, Checkpoint};
use super::files;
use super::keys::EpochKey;
use super::lines::{Line, Lines};
use super::prune::{self, Manifest};
use super::record::{chain_hash_open, hex, mac_verifies, parse_hash, GENESIS_PREV};
use super::scan::{scan, Scanned, ID_FIELDS};

/// An HMAC secret (the epoch-0 key) a log may be sealed with, and the name reports give it.
pub struct SealKey {
    /// Where the secret came from (its file), as reports name it.
    pub name: String,
    pub secret: Zeroizing<Vec<u8>>,
}

impl SealKey {
    pub fn new(name: impl Into<String>, secret: Zeroizing<Vec<u8>>) -> Self {
        SealKey {
            name: name.into(),
            secret,
        }
    }
}

/// What to verify with.
#[derive(Default)]
pub struct VerifyOptions {
    /// The HMAC secrets: the current one first, then those it replaced (a rotated key still
    /// verifies the chains it sealed). MACs are only checked when at least one is given;
    /// each chain must verify with one of them throughout.
    pub hmac_keys: Vec<SealKey>,
    /// Pinned Ed25519 public keys of the checkpoints: a checkpoint must be signed by one.
    pub public_keys: Vec<VerifyingKey>,
    /// Checkpoint files (or directories of them) to check against.
    pub checkpoints: Vec<PathBuf>,
    /// Print per-file progress on stderr.
    pub progress: bool,
    /// Accept a chain whose oldest files `kvh prune-log` moved away, as its manifest in the
    /// log directory records them; the chain is checked from the manifest's last record on.
    pub allow_pruned: bool,
    /// Directories `kvh prune-log` moved files to: their chain files are read with the log
    /// directory's, so the chains are checked whole.
    pub archive_dirs: Vec<PathBuf>,
}

/// The first bad record of a chain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Problem {
    pub file: String,
    pub line: u64,
    pub reason: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}: {}", self.file, self.line, self.reason)
    }
}

/// The result for one chain.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ChainReport {
    pub chain: String,
    pub files: usize,
    pub records: u64,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    pub first_ts: Option<u64>,
    pub last_ts: Option<u64>,
    /// Hash of the last record verified (hex): the head a reader of the chain's files can
    /// hold the bytes it reads to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_hash: Option<String>,
    /// Index of the file holding that record.
    #[serde(skip)]
    pub last_file: Option<u64>,
    /// A `stop` record ends the chain (the writer shut down cleanly).
    pub closed: bool,
    /// Every file was walked to its end: whether the chain is open is known. Not when the
    /// walk stopped at a problem in a record or a file.
    #[serde(skip)]
    pub walked_to_end: bool,
    /// Bytes after the last newline of the newest file (a writer crashed mid-line).
    pub torn_bytes: u64,
    pub macs_checked: bool,
    /// Its records carry MACs (a `mac` field), whether or not a key was given to check them:
    /// what the report says of a chain read without `--key-file`. A hint, not a check (without
    /// the key, anyone may have removed them and rehashed the chain).
    pub sealed: bool,
    /// The chain is bound to its keys: its MACs were checked with the HMAC secret its signed
    /// checkpoint names, and the checkpoint was signed by the key the chain's own records
    /// name (moved whole: its manifest is MACed with that secret). A chain that is not could
    /// have been rewritten by whoever holds another of the keys given.
    pub keys_bound: bool,
    /// The HMAC secret the chain's MACs were checked with (its [`SealKey::name`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Its index in [`VerifyOptions::hmac_keys`].
    #[serde(skip)]
    pub key_index: Option<usize>,
    /// Seq of the signed checkpoint that was matched, if any.
    pub checkpoint_seq: Option<u64>,
    /// Seq of the signed checkpoint read for the chain, matched or not: a chain that fails
    /// before or at it was checked against it, which "no checkpoint" would deny.
    #[serde(skip)]
    pub checkpoint_read: Option<u64>,
    /// Checkpoints were checked (a public key was pinned): a chain without one fails.
    pub checkpoints_checked: bool,
    /// With `allow_pruned`: the files `prune-log` moved away before the first one checked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pruned: Option<Pruned>,
    /// The newest seq a `checkpoint` record of the chain says was signed (`ckpt_seq`): where
    /// the chain's checkpoint points, whatever became of the checkpoint file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checkpoint_recorded: Option<u64>,
    /// The seq of a newer signed checkpoint found after the walk, when the one matched was
    /// behind `checkpoint_recorded`: a running writer signed it while the chain was read.
    #[serde(skip)]
    pub checkpoint_reread: Option<u64>,
    /// The public key (hex) the chain's newest record that names a signer names: the key its
    /// writer signed checkpoints with, MAC-checked when keys were given.
    #[serde(skip)]
    pub signer: Option<String>,
    pub problem: Option<Problem>,
}

/// The part of a chain `prune-log` moved away, as its manifest records it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Pruned {
    /// Files moved (0 .. files - 1).
    pub files: u64,
    /// Seq of the last record moved; the chain was checked from the next one.
    pub last_seq: u64,
    /// Every file was moved (the chain had ended with `stop`).
    pub complete: bool,
    /// Where the manifest says they went.
    pub archive: String,
    /// The oldest record time of the first file moved (the chain's start), as the manifest
    /// recorded it.
    pub first_ts: Option<u64>,
    /// The newest record time of the files moved, as the manifest recorded it.
    pub last_ts: Option<u64>,
    /// Hash of the last record moved (hex), as the manifest recorded it.
    #[serde(skip)]
    pub last_hash: Option<String>,
    /// The seq and hash (hex) of each moved file's last record, as the manifest recorded
    /// them: what a reader that passed records on can still hold its positions to.
    #[serde(skip)]
    pub file_ends: Vec<(u64, String)>,
}

impl Pruned {
    /// The hash the manifest recorded for record `seq`, when it ended a moved file.
    pub fn hash_at_file_end(&self, seq: u64) -> Option<&str> {
        self.file_ends
            .iter()
            .find(|(s, _)| *s == seq)
            .map(|(_, h)| h.as_str())
    }
}

impl ChainReport {
    pub fn ok(&self) -> bool {
        self.problem.is_none()
    }

    /// The seq the chain's own MAC-checked `checkpoint` records say was signed last, when it
    /// is later than the checkpoint file that matched: the file is an earlier one (put back
    /// over the newer one, or copied off the node before the newer was signed). Not a
    /// failure, since both are genuine, but the records after the matched checkpoint are
    /// protected only by the MACs, not by a signature: the chain may have been cut back.
    pub fn checkpoint_behind(&self) -> Option<u64> {
        let matched = self.checkpoint_seq?;
        let recorded = self.checkpoint_recorded?;
        // A checkpoint signed while the chain was read, as recorded or later, is the file's
        // own news, not one put back.
        let newest = matched.max(self.checkpoint_reread.unwrap_or(0));
        (self.ok() && self.macs_checked && recorded > newest).then_some(recorded)
    }
}

/// The result for a directory.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    /// The names of the HMAC secrets given, current first ([`VerifyOptions::hmac_keys`]).
    pub hmac_keys: Vec<String>,
    /// The public keys given (hex), in order.
    pub public_keys: Vec<String>,
    pub chains: Vec<ChainReport>,
    /// Problems not tied to a record (a checkpoint for a chain with no files, a forged
    /// checkpoint).
    pub errors: Vec<String>,
    /// Why the checkpoint file named after a chain (`kvh-<chain>.ckpt`) was refused, by
    /// chain: that chain's want of a checkpoint is then told by its real cause. Also in
    /// `errors`, with the file's path.
    #[serde(skip)]
    pub(crate) refused_checkpoints: BTreeMap<String, String>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.errors.is_empty() && self.chains.iter().all(ChainReport::ok)
    }

    /// 0 when everything verified, 1 when tampering or corruption was found.
    pub fn exit_code(&self) -> i32 {
        if self.ok() {
            0
        } else {
            1
        }
    }

    /// The first problem found, for messages and tests.
    pub fn first_problem(&self) -> Option<&Problem> {
        self.chains.iter().find_map(|c| c.problem.as_ref())
    }
}

/// A usage or I/O error (exit 2): nothing could be concluded about the log.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct VerifyError(pub String);

/// Verifies every chain found in `dir` (and in `opts.archive_dirs`).
pub fn verify_all(dir: &Path, opts: &VerifyOptions) -> Result<Report, VerifyError> {
    let mut report = Report {
        hmac_keys: opts.hmac_keys.iter().map(|k| k.name.clone()).collect(),
        public_keys: opts.public_keys.iter().map(|k| hex(k.as_bytes())).collect(),
        ..Report::default()
    };
    // The checkpoints are read before the files are listed: a checkpoint covers only records
    // already on disk, so every file it points into is in the listing that follows. Read
    // after it, a checkpoint a running writer signed just after rotating would point past
    // the files listed, and read as truncation.
    let (mut ckpts, mut ckpt_files_read) = load_checkpoints(opts, &mut report)?;
    let chains = list_all(dir, opts)?;
    // Prune manifests matter only to a pruned reading: read once, checked once.
    let mut manifests = if pruned_reading(opts) {
        load_manifests(dir, opts)?
    } else {
        BTreeMap::new()
    };
    let total = chains.len();
    // Chains that had no checkpoint yet, by their index in `report.chains`.
    let mut uncovered = Vec::new();
    for (i, (chain, list)) in chains.iter().enumerate() {
        if opts.progress {
            crate::say(format_args!("verify-log: chain {}/{total}: {chain}", i + 1));
        }
        let (ckpt, list) = match ckpts.remove(chain) {
            Some(c) => (Some(c), list.clone()),
            None => match late_checkpoint(chain, opts, &mut ckpt_files_read, &mut report)? {
                // Read after the listing: the chain's writer may have rotated and signed
                // since, so its files are listed again, after the checkpoint, as the first
                // reading lists them after the checkpoints.
                Some(c) => (Some(c), relisted(dir, chain, opts)?.unwrap_or(list.clone())),
                None => (None, list.clone()),
            },
        };
        let manifest = manifests.remove(chain);
        let Some(verified) = verify_listed(dir, chain, &list, opts, ckpt.as_ref(), manifest)?
        else {
            continue;
        };
        if ckpt.is_none() && !opts.public_keys.is_empty() {
            uncovered.push(report.chains.len());
        }
        report.chains.push(verified);
    }
    await_first_checkpoints(dir, opts, &mut report, &uncovered, &mut ckpt_files_read)?;
    // Manifests of chains with no file left.
    for (chain, manifest) in manifests {
        let ckpt = ckpts.remove(&chain);
        report
            .chains
            .push(archived_chain(&chain, manifest, opts, ckpt.as_ref()));
    }
    if !pruned_reading(opts) {
        for chain in moved_whole(dir, &chains)? {
            report
                .chains
                .push(moved_chain(dir, chain, opts, &mut ckpts));
        }
    }
    for c in &mut report.chains {
        c.key = c
            .key_index
            .and_then(|i| opts.hmac_keys.get(i))
            .map(|k| k.name.clone());
    }
    for (chain, c) in ckpts {
        report.errors.push(format!(
            "checkpoint for chain {chain} (seq {}, file {}) but no file of that chain in {}: \
             files deleted",
            c.seq,
            c.file,
            dir.display()
        ));
    }
    name_refused_checkpoints(&mut report);
    Ok(report)
}

/// A chain that failed for want of a checkpoint while a checkpoint file of its name was
/// refused (signed by another key than those pinned, malformed): its problem says so, so that
/// the first reason a reader meets is the real one, not "deleted, or never written".
fn name_refused_checkpoints(report: &mut Report) {
    let Report {
        chains,
        refused_checkpoints,
        ..
    } = report;
    for c in chains {
        let Some(p) = c
            .problem
            .as_mut()
            .filter(|p| p.reason.starts_with(NO_CHECKPOINT))
        else {
            continue;
        };
        if let Some(why) = refused_checkpoints.get(&c.chain) {
            p.reason = format!(
                "{NO_CHECKPOINT} {} signed by the pinned public key: its checkpoint file \
                 kvh-{}.ckpt was refused ({why}), so its end cannot be checked",
                c.chain, c.chain
            );
        }
    }
}

/// The files of `chain` as listed now (`None`: none are left).
fn relisted(
    dir: &Path,
    chain: &str,
    opts: &VerifyOptions,
) -> Result<Option<Vec<(u64, PathBuf)>>, VerifyError> {
    Ok(list_all(dir, opts)?
        .into_iter()
        .find(|(id, _)| id == chain)
        .map(|(_, l)| l)
        .filter(|l| !l.is_empty()))
}

/// How long a chain whose newest file changed this recently may still be waiting for its
/// first checkpoint: a writer signs one right after its `start` record is on disk.
const FIRST_CHECKPOINT_FRESH: Duration = Duration::from_secs(5);

/// How long a verification waits, in all, for the first checkpoints of such chains.
const FIRST_CHECKPOINT_WAIT: Duration = Duration::from_secs(2);

/// Chains `uncovered` (indexes into `report.chains`) that failed without a checkpoint under a
/// pinned signer, and whose newest file changed within [`FIRST_CHECKPOINT_FRESH`], may have
/// been listed between their writer's `start` record and its first checkpoint: their
/// checkpoints are looked for again, for up to [`FIRST_CHECKPOINT_WAIT`], and a chain whose
/// checkpoint appears is verified again with it (its files listed after it). A chain whose
/// checkpoint does not appear keeps its finding: one its writer died before signing cannot be
/// told from one whose checkpoint was deleted. A checkpoint file is read once in a
/// verification (`read`: those read so far): one refused is reported once, and its chain is
/// not waited for.
fn await_first_checkpoints(
    dir: &Path,
    opts: &VerifyOptions,
    report: &mut Report,
    uncovered: &[usize],
    read: &mut BTreeSet<PathBuf>,
) -> Result<(), VerifyError> {
    let candidates = |chain: &str| -> Vec<PathBuf> { checkpoints_named(opts, chain).collect() };
    let fresh = |c: &ChainReport| {
        let newest = c
            .last_file
            .unwrap_or(0)
            .max(c.files.saturating_sub(1) as u64);
        std::fs::metadata(dir.join(files::file_name(&c.chain, newest)))
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age < FIRST_CHECKPOINT_FRESH)
    };
    let mut waiting: Vec<usize> = uncovered
        .iter()
        .copied()
        .filter(|&i| report.chains.get(i).is_some_and(|c| !c.ok() && fresh(c)))
        // A checkpoint file already read and refused: nothing to wait for.
        .filter(|&i| {
            !candidates(&report.chains[i].chain)
                .iter()
                .any(|f| read.contains(f))
        })
        .collect();
    let deadline = Instant::now() + FIRST_CHECKPOINT_WAIT;
    while !waiting.is_empty() {
        let mut still = Vec::new();
        for i in waiting {
            let chain = report.chains[i].chain.clone();
            if candidates(&chain).is_empty() {
                still.push(i);
                continue;
            }
            // Refused when read (reported then, by `late_checkpoint`, now or before): the
            // chain keeps its finding.
            let Some(ckpt) = late_checkpoint(&chain, opts, read, report)? else {
                continue;
            };
            let Some(list) = relisted(dir, &chain, opts)? else {
                continue;
            };
            let manifest = if pruned_reading(opts) {
                load_manifest(dir, &chain, &manifest_keys(opts).map_err(VerifyError)?)
            } else {
                None
            };
            // With a checkpoint, a chain is never left out of the report.
            if let Some(verified) = verify_listed(dir, &chain, &list, opts, Some(&ckpt), manifest)?
            {
                report.chains[i] = verified;
            }
        }
        waiting = still;
        if waiting.is_empty() || Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// How many times a chain is verified again from a new listing that holds no fewer of its
/// files than the one before (see [`verify_listed`]). One is enough for a `prune-log` run,
/// which moves a chain's files once: more covers a chain whose files it moves while the
/// second reading runs.
const MAX_RELISTS: usize = 3;

/// Verifies one chain from the files listed for it and its manifest as loaded; when that
/// finds a problem and a listed file is gone now, from a new listing: again while each
/// listing holds fewer files than the one before, and [`MAX_RELISTS`] times more. `None`: a
/// chain that never started, gone whole since the listing (a start-up removes such a
/// chain), of which nothing is left to report.
///
/// A `prune-log` run that moves the chain meanwhile writes its manifest and then removes
/// the files it moved, oldest first: a verification that listed them finds one gone when it
/// reads it. Listed again (the files, then the manifest, as `verify_all` reads them), the
/// chain is judged by what is there: what the prune moved is accounted for by the manifest,
/// a file deleted otherwise is still missing. The checkpoint, read before the first
/// listing, covers only records on disk before it, as for the first reading.
fn verify_listed(
    dir: &Path,
    chain: &str,
    list: &[(u64, PathBuf)],
    opts: &VerifyOptions,
    ckpt: Option<&Checkpoint>,
    manifest: Option<LoadedManifest>,
) -> Result<Option<ChainReport>, VerifyError> {
    let mut report = verify_chain(chain, list, opts, ckpt, manifest)?;
    // Listed as a chain that may never have started (its file 0 alone, no checkpoint, no
    // record and no more torn bytes than such a chain holds, as far as it was read): one a
    // start-up removes, whole, once it is idle.
    let maybe_unstarted = ckpt.is_none()
        && matches!(list, [(0, _)])
        && report.records == 0
        && report.torn_bytes <= files::MAX_UNSTARTED_BYTES;
    let mut list = list.to_vec();
    let mut ckpt = ckpt.cloned();
    // A prune removes the files it moved one at a time, oldest first: a reading slower than
    // the removals (on a loaded machine) can find a newly removed file in each of its
    // readings. A listing that holds fewer files than the one before is that progress, and
    // is not counted; all in all, a chain is read at most once a file it was listed with,
    // and `MAX_RELISTS` times more (files deleted one at a time while it is read, by
    // whoever tampers with it, cost no more than that).
    let mut relists_left = MAX_RELISTS;
    let mut readings_left = list.len() + MAX_RELISTS;
    while relists_left > 0 && readings_left > 0 {
        readings_left -= 1;
        if report.ok() || !list.iter().any(|(_, path)| files::is_missing(path)) {
            break;
        }
        // The checkpoint again, before the files, as for the first reading: the prune may
        // have gone by a later checkpoint, which allowed it to move the file of this one.
        ckpt = newer_checkpoint(chain, opts, ckpt);
        let ckpt = ckpt.as_ref();
        let listed = list_all(dir, opts)?
            .into_iter()
            .find(|(id, _)| id == chain)
            .map(|(_, l)| l)
            .unwrap_or_default();
        if listed.len() >= list.len() {
            relists_left -= 1;
        }
        list = listed;
        let manifest = if pruned_reading(opts) {
            load_manifest(dir, chain, &manifest_keys(opts).map_err(VerifyError)?)
        } else {
            None
        };
        report = match (list.is_empty(), manifest) {
            (false, manifest) => verify_chain(chain, &list, opts, ckpt, manifest)?,
            (true, Some(manifest)) => archived_chain(chain, manifest, opts, ckpt),
            // Gone whole, where a start-up removes a chain that never started: as when
            // listed a moment later, nothing of it is left to report, and nothing of
            // evidence was in it (whoever can delete a checkpoint can delete such a chain).
            (true, None) if maybe_unstarted => return Ok(None),
            // Every file gone and no manifest: the first reading's report names one of them.
            (true, None) => break,
        };
    }
    if report.checkpoint_behind().is_some() {
        // The checkpoint was read before the files: a running writer may have signed a newer
        // one, and recorded it, while they were read. Read again, it settles which.
        report.checkpoint_reread = newer_checkpoint(chain, opts, ckpt).map(|c| c.seq);
    }
    Ok(Some(report))
}

/// The checkpoint of `chain` read again from the checkpoint locations, when one there
/// verifies and covers more of the chain than `had`; else `had`. Never an older one: a
/// checkpoint file swapped for an earlier signed one must not undo the check of the end.
/// (The first reading reports a checkpoint that does not verify; this one keeps `had`.)
fn newer_checkpoint(
    chain: &str,
    opts: &VerifyOptions,
    had: Option<Checkpoint>,
) -> Option<Checkpoint> {
    if opts.public_keys.is_empty() {
        return had;
    }
    // In a directory, only this chain's file; a file given by name, whichever chain it is.
    let newest = opts
        .checkpoints
        .iter()
        .map(|p| match p.is_dir() {
            true => checkpoint::path_for(p, chain),
            false => p.clone(),
        })
        .filter_map(|f| checkpoint::read(&f, &opts.public_keys).ok())
        .filter(|c| c.chain == chain)
        .max_by_key(|c| c.seq);
    match (had, newest) {
        (Some(h), Some(n)) if n.seq > h.seq => Some(n),
        (None, n) => n,
        (h, _) => h,
    }
}

/// The chain files of `dir` and of the archive directories.
pub fn list_all(dir: &Path, opts: &VerifyOptions) -> Result<files::ChainList, VerifyError> {
    let mut dirs = vec![dir];
    dirs.extend(opts.archive_dirs.iter().map(PathBuf::as_path));
    files::list_chains_in(&dirs).map_err(|e| {
        VerifyError(format!(
            "cannot list {}: {e}",
            dirs.iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ))
    })
}

/// A chain's prune manifest as read, or why it cannot be used (unreadable, not a manifest,
/// MAC or contiguity); reported at the manifest's name.
type LoadedManifest = Result<Manifest, String>;

/// Every prune manifest in `dir`, by chain, each checked (MAC with one of the keys when
/// given, contiguity always).
fn load_manifests(
    dir: &Path,
    opts: &VerifyOptions,
) -> Result<BTreeMap<String, LoadedManifest>, VerifyError> {
    let listed = prune::list_manifests(dir)
        .map_err(|e| VerifyError(format!("{}: cannot list: {e}", dir.display())))?;
    let keys = manifest_keys(opts).map_err(VerifyError)?;
    let mut out = BTreeMap::new();
    for chain in listed {
        let path = prune::manifest_path(dir, &chain);
        if files::unreadable_foreign(&path) {
            return Err(VerifyError(format!(
                "{}: {} (this process runs as uid {})",
                path.display(),
                std::io::Error::from_raw_os_error(libc::EACCES),
                files::euid()
            )));
        }
        let loaded = load_manifest(dir, &chain, &keys)
            .unwrap_or_else(|| Err("disappeared while verifying".to_string()));
        out.insert(chain, loaded);
    }
    Ok(out)
}

/// Whether the reading takes prune manifests into account: it accepts pruned chains, or
/// reads the archives too.
fn pruned_reading(opts: &VerifyOptions) -> bool {
    opts.allow_pruned || !opts.archive_dirs.is_empty()
}

/// The prune manifest of `chain` in `dir`, checked; `None` when there is none.
fn load_manifest(dir: &Path, chain: &str, keys: &[EpochKey]) -> Option<LoadedManifest> {
    match prune::read_manifest(dir, chain) {
        Ok(None) => None,
        Ok(Some(m)) => Some(manifest_sealer(&m, keys).map(|_| m)),
        Err(e) => Some(Err(e)),
    }
}

/// The epoch-0 key of each HMAC secret, in order, for manifest MACs.
fn manifest_keys(opts: &VerifyOptions) -> Result<Vec<EpochKey>, String> {
    opts.hmac_keys
        .iter()
        .map(|k| prune::manifest_key(&k.secret))
        .collect()
}

/// Checks a manifest (version, contiguity, and its MAC when keys are given); returns the
/// index of the key whose MAC it carries, `None` when none was given.
fn manifest_sealer(m: &Manifest, keys: &[EpochKey]) -> Result<Option<usize>, String> {
    let Some(first) = keys.first() else {
        return m.check(None).map(|()| None);
    };
    if keys.len() == 1 {
        return m.check(Some(first)).map(|()| Some(0));
    }
    m.check(None)?;
    if m.mac.is_none() {
        return Err("manifest has no mac but a key was given".into());
    }
    keys.iter()
        .position(|k| m.check(Some(k)).is_ok())
        .map(Some)
        .ok_or_else(|| {
            format!(
                "manifest MAC mismatch: none of the {} keys given seals it (wrong keys or \
                 forged manifest)",
                keys.len()
            )
        })
}

/// The chains of which `dir` holds a prune manifest and no file (`listed` are those with
/// files): moved whole by `prune-log`.
fn moved_whole(dir: &Path, listed: &files::ChainList) -> Result<Vec<String>, VerifyError> {
    let manifests = prune::list_manifests(dir)
        .map_err(|e| VerifyError(format!("{}: cannot list: {e}", dir.display())))?;
    Ok(manifests
        .into_iter()
        .filter(|chain| !listed.iter().any(|(c, _)| c == chain))
        .collect())
}

/// The report of a chain of which only a prune manifest is left, in a reading that does not
/// take manifests into account: its files are missing, which fails it as a missing file fails
/// any chain. Passed over, the chain and every exception in it would vanish from the report
/// unseen. The manifest only words the failure: one MAC-verified with a key given, that says
/// the chain was moved whole up to its signed checkpoint (if any), points to the options that
/// account for it, and the checkpoint, held to it, is not reported again as one of deleted
/// files. Without a key, anyone who can write the directory could have written the manifest
/// (the checkpoint it would copy is readable): its claim is said as unverified, and the
/// checkpoint's finding stands. Anything else named as a manifest (empty, garbled, unsealed
/// or sealed with another key, of an open chain, at odds with the checkpoint) accounts for
/// nothing: the files were deleted.
fn moved_chain(
    dir: &Path,
    chain: String,
    opts: &VerifyOptions,
    ckpts: &mut BTreeMap<String, Checkpoint>,
) -> ChainReport {
    let mut rep = ChainReport {
        chain: chain.clone(),
        macs_checked: !opts.hmac_keys.is_empty(),
        checkpoints_checked: !opts.public_keys.is_empty(),
        ..Default::default()
    };
    let said = prune::read_manifest(dir, &chain)
        .and_then(|m| m.ok_or_else(|| "it disappeared while verifying".to_string()))
        .and_then(|m| {
            let keys = manifest_keys(opts)?;
            let sealer = manifest_sealer(&m, &keys)?;
            let ckpt = ckpts.get(&chain);
            // As for a chain read with --allow-pruned: the manifest is MACed with the secret
            // the chain's signed checkpoint names, not any secret given (a retired one).
            if let (Some(i), Some(id)) = (sealer, ckpt.and_then(|c| c.key_id.as_deref())) {
                if keys.get(i).map(EpochKey::key_id).as_deref() != Some(id) {
                    return Err(format!(
                        "it is MACed with another HMAC key than the one the chain's signed \
                         checkpoint names ({id})"
                    ));
                }
            }
            moved_whole_to(&m, ckpt).map(|seq| (sealer, seq))
        });
    let options = "give --allow-pruned to account for them by the manifest, or --archive-dir \
                   to read them back";
    let reason = match said {
        Ok((Some(_), checkpoint_seq)) => {
            if checkpoint_seq.is_some() {
                ckpts.remove(&chain);
            }
            rep.checkpoint_seq = checkpoint_seq;
            format!(
                "every file of chain {chain} is missing; its prune manifest says kvh \
                 prune-log moved them: {options}"
            )
        }
        Ok((None, _)) => format!(
            "every file of chain {chain} is missing; a prune manifest, not verified (no \
             --key-file), says kvh prune-log moved them: {options}"
        ),
        Err(why) => format!(
            "every file of chain {chain} is missing, and the file named as its prune \
             manifest does not account for them ({why}): files deleted"
        ),
    };
    rep.problem = Some(manifest_problem(&chain, reason));
    rep
}

/// Whether the manifest `m` says its chain was moved whole, up to its checkpoint `ckpt` (if
/// any, whose seq is returned): the reason it does not otherwise.
fn moved_whole_to(m: &Manifest, ckpt: Option<&Checkpoint>) -> Result<Option<u64>, String> {
    let tail = m.tail().ok_or("it lists no file")?;
    if !m.complete {
        return Err(format!(
            "it moved files up to {} of an open chain",
            tail.name
        ));
    }
    match ckpt {
        None => Ok(None),
        Some(c) if c.seq == tail.last_seq && parse_hash(&tail.last_hash) == Some(c.hash) => {
            Ok(Some(c.seq))
        }
        Some(c) => Err(format!(
            "the signed checkpoint (seq {}) is not the last record it moved (seq {})",
            c.seq, tail.last_seq
        )),
    }
}

/// The problem of a manifest that cannot be used, at the manifest's name.
fn manifest_problem(chain: &str, reason: String) -> Problem {
    Problem {
        file: prune::manifest_path(Path::new(""), chain)
            .display()
            .to_string(),
        line: 1,
        reason,
    }
}

/// A chain of which only a prune manifest is left: with `allow_pruned`, one `prune-log`
/// moved whole (it had ended) is accepted, its checkpoint held to the manifest's last record;
/// one whose chain should still have files means they were deleted. Read whole
/// (`archive_dirs`), its files were in none of the directories.
fn archived_chain(
    chain: &str,
    manifest: LoadedManifest,
    opts: &VerifyOptions,
    ckpt: Option<&Checkpoint>,
) -> ChainReport {
    let mut rep = ChainReport {
        chain: chain.to_string(),
        macs_checked: !opts.hmac_keys.is_empty(),
        checkpoints_checked: !opts.public_keys.is_empty(),
        ..Default::default()
    };
    let judged = manifest.and_then(|m| {
        if !opts.archive_dirs.is_empty() {
            let names: Vec<&str> = m.files.iter().map(|f| f.name.as_str()).collect();
            return Err(format!(
                "the prune manifest lists {}, in none of the directories read: moved files \
                 lost",
                names.join(", ")
            ));
        }
        whole_chain_archived(&m, chain, opts, ckpt, &mut rep)
    });
    if let Err(reason) = judged {
        rep.problem = Some(manifest_problem(chain, reason));
    }
    rep
}

/// Checks the manifest of a chain with no file left: it must say the chain was moved whole,
/// and match the chain's checkpoint, if any.
fn whole_chain_archived(
    m: &Manifest,
    chain: &str,
    opts: &VerifyOptions,
    ckpt: Option<&Checkpoint>,
    rep: &mut ChainReport,
) -> Result<(), String> {
    let keys = manifest_keys(opts)?;
    let sealer = manifest_sealer(m, &keys)?.ok_or(NEEDS_KEY)?;
    if let Some(id) = ckpt.and_then(|c| c.key_id.as_deref()) {
        // The checkpoint is signed: the manifest must be MACed with the secret it names.
        if keys.get(sealer).map(EpochKey::key_id).as_deref() != Some(id) {
            return Err(format!(
                "the prune manifest is MACed with another HMAC key than the one the chain's \
                 signed checkpoint names ({id})"
            ));
        }
        rep.keys_bound = true;
    }
    rep.key_index = Some(sealer);
    let tail = m.tail().ok_or("manifest lists no file")?;
    rep.pruned = Some(pruned_of(m, m.files.len(), tail.last_seq));
    rep.closed = m.complete;
    if !m.complete {
        return Err(format!(
            "the manifest moved files up to {} of an open chain, but no later file of chain \
             {chain} exists: files deleted",
            tail.name
        ));
    }
    match ckpt {
        // prune-log moves a whole chain only when its checkpoint is at its last record.
        Some(c) if c.seq == tail.last_seq && parse_hash(&tail.last_hash) == Some(c.hash) => {
            rep.checkpoint_seq = Some(c.seq);
            Ok(())
        }
        Some(c) => Err(format!(
            "the signed checkpoint (seq {}) is not the last record the manifest moved (seq \
             {}): records truncated, chain rewritten or manifest forged",
            c.seq, tail.last_seq
        )),
        None if rep.checkpoints_checked => Err(format!(
            "{NO_CHECKPOINT} {chain} signed by the pinned public key: its end cannot be \
             checked (checkpoint deleted, or never written)"
        )),
        None => Ok(()),
    }
}

/// How the problem of a chain without a checkpoint, under a pinned key, begins: the verbs
/// look for it to add where checkpoints were looked for (`cli::hint_checkpoint_dir`).
pub(crate) const NO_CHECKPOINT: &str = "no checkpoint for chain";

/// Why `allow_pruned` without the HMAC key is refused: only a manifest whose MAC verifies
/// may stand in for files.
const NEEDS_KEY: &str = "--allow-pruned needs the HMAC key (--key-file): a prune manifest \
                         stands in for moved files only when its MAC verifies";

/// What the manifest `m` says of its first `files` files, the last of which ends at
/// `last_seq`.
fn pruned_of(m: &Manifest, files: usize, last_seq: u64) -> Pruned {
    let moved = &m.files[..files.min(m.files.len())];
    Pruned {
        files: moved.len() as u64,
        last_seq,
        complete: m.complete,
        archive: m.archive.clone(),
        first_ts: moved.first().map(|f| f.oldest_ts),
        last_ts: moved.iter().map(|f| f.newest_ts).max(),
        last_hash: moved.last().map(|f| f.last_hash.clone()),
        file_ends: moved
            .iter()
            .map(|f| (f.last_seq, f.last_hash.clone()))
            .collect(),
    }
}

/// Reads the checkpoints; a bad signature is tampering, an unreadable file a usage error.
/// The checkpoint of a chain listed after the checkpoints were read: a writer that started
/// in between created its chain and then its first checkpoint before the listing, so the
/// checkpoint is there now, under its chain's name. Looked up in each checkpoint directory,
/// unless that file was read already (`read`: its verdict stands); `None` when there is none
/// (the chain then has no checkpoint, which a pinned key refuses).
/// The checkpoint files named after `chain` that exist in the checkpoint directories.
fn checkpoints_named<'a>(
    opts: &'a VerifyOptions,
    chain: &'a str,
) -> impl Iterator<Item = PathBuf> + 'a {
    opts.checkpoints
        .iter()
        .filter(|p| p.is_dir())
        .map(move |d| checkpoint::path_for(d, chain))
        .filter(|f| std::fs::symlink_metadata(f).is_ok())
}

fn late_checkpoint(
    chain: &str,
    opts: &VerifyOptions,
    read: &mut BTreeSet<PathBuf>,
    report: &mut Report,
) -> Result<Option<Checkpoint>, VerifyError> {
    if opts.public_keys.is_empty() {
        return Ok(None);
    }
    let Some(found) = checkpoints_named(opts, chain).find(|f| !read.contains(f)) else {
        return Ok(None);
    };
    // Read once in a verification: a file refused now is not read (and reported) again.
    read.insert(found.clone());
    match checkpoint::load(&found, &opts.public_keys) {
        Ok(c) if c.chain == chain => Ok(Some(c)),
        Ok(c) => {
            let why = misnamed(&c, chain);
            refuse_checkpoint(report, &found, Some(chain), why);
            Ok(None)
        }
        Err(why) => {
            refuse_checkpoint(report, &found, Some(chain), why);
            Ok(None)
        }
    }
}

/// Why a checkpoint of another chain than the one its file is named after is refused.
fn misnamed(c: &Checkpoint, named: &str) -> String {
    format!(
        "a checkpoint of chain {} under the name of chain {named}",
        c.chain
    )
}

/// Reports the checkpoint file `file` refused for `why`, a problem of the log; when it is
/// named after a chain (`named`), also as that chain's reason for having no checkpoint (the
/// first reason given for a file, as the first is reported).
fn refuse_checkpoint(report: &mut Report, file: &Path, named: Option<&str>, why: String) {
    if let Some(chain) = named {
        report
            .refused_checkpoints
            .entry(chain.to_owned())
            .or_insert_with(|| why.clone());
    }
    report.errors.push(format!("{}: {why}", file.display()));
}

/// Every checkpoint in the checkpoint locations, by chain, and the files read.
type CheckpointsRead = (BTreeMap<String, Checkpoint>, BTreeSet<PathBuf>);

/// The signed checkpoints given (`--checkpoint`), by chain, read and checked as
/// [`verify_all`] reads them first; `None` when reading them found evidence against the log (a
/// checkpoint forged, misnamed or second for its chain), which a verification reports.
pub fn signed_checkpoints(
    opts: &VerifyOptions,
) -> Result<Option<BTreeMap<String, Checkpoint>>, VerifyError> {
    let mut report = Report::default();
    let (ckpts, _) = load_checkpoints(opts, &mut report)?;
    Ok(report.errors.is_empty().then_some(ckpts))
}

fn load_checkpoints(
    opts: &VerifyOptions,
    report: &mut Report,
) -> Result<CheckpointsRead, VerifyError> {
    let mut out = BTreeMap::new();
    if opts.checkpoints.is_empty() {
        return Ok((out, BTreeSet::new()));
    }
    if opts.public_keys.is_empty() {
        return Err(VerifyError("--checkpoint needs --public-key".into()));
    }
    let mut seen: BTreeMap<String, PathBuf> = BTreeMap::new();
    let mut files_seen = BTreeSet::new();
    for p in &opts.checkpoints {
        // A place the operator named (followed, as a path given on the command line is) must
        // hold checkpoints: a FIFO or a device there is a wrong argument, not a log finding.
        if let Ok(m) = std::fs::metadata(p) {
            if !m.is_dir() && !m.is_file() {
                return Err(VerifyError(format!(
                    "{}: not a checkpoint file nor a directory of them",
                    p.display()
                )));
            }
        }
        let found = match checkpoint::find(p) {
            Ok(found) => found,
            // This user's own checkpoint location made unreadable: evidence kept from the
            // verifier, a problem of the log (as its own chain file), not an I/O error.
            Err(e)
                if e.kind() == std::io::ErrorKind::PermissionDenied
                    && !files::unreadable_foreign(p) =>
            {
                report.errors.push(format!(
                    "{}: {e}: this user's own checkpoints cannot be read (their permissions \
                     were taken away)",
                    p.display()
                ));
                continue;
            }
            Err(e) => return Err(VerifyError(format!("{}: {e}", p.display()))),
        };
        for f in found {
            if !files_seen.insert(f.clone()) {
                continue; // the same file named twice (`--checkpoint DIR` and DIR's file)
            }
            if std::fs::symlink_metadata(&f).is_err() {
                return Err(VerifyError(format!("{}: no such checkpoint", f.display())));
            }
            // As for a chain file: another user's checkpoint this reader may not read says
            // nothing of the log.
            if files::unreadable_foreign(&f) {
                return Err(VerifyError(format!(
                    "{}: {} (this process runs as uid {})",
                    f.display(),
                    std::io::Error::from_raw_os_error(libc::EACCES),
                    files::euid()
                )));
            }
            let named = named_chain(&f);
            match checkpoint::load(&f, &opts.public_keys) {
                Ok(c) => {
                    if let Some(named) = named.as_deref().filter(|n| *n != c.chain) {
                        // As `late_checkpoint` says: moved onto another chain's name, it
                        // would leave that chain without its checkpoint, unseen.
                        let why = misnamed(&c, named);
                        refuse_checkpoint(report, &f, Some(named), why);
                        continue;
                    }
                    if let Some(first) = seen.get(&c.chain).cloned() {
                        // The run fails: the writer signs one file per chain, so one of the
                        // two was put there. The chain is judged against the file of the
                        // writer's name, whichever came first.
                        let writers = named.as_deref() == Some(c.chain.as_str())
                            && named_chain(&first).as_deref() != Some(c.chain.as_str());
                        let (kept, extra) = if writers { (&f, &first) } else { (&first, &f) };
                        report.errors.push(second_checkpoint(&c.chain, kept, extra));
                        if writers {
                            seen.insert(c.chain.clone(), f.clone());
                            out.insert(c.chain.clone(), c);
                        }
                        continue;
                    }
                    seen.insert(c.chain.clone(), f.clone());
                    out.insert(c.chain.clone(), c);
                }
                Err(why) => refuse_checkpoint(report, &f, named.as_deref(), why),
            }
        }
    }
    Ok((out, files_seen))
}

/// The error of a second signed checkpoint `extra` for `chain`, beside `kept`, the one the
/// chain is checked against. Which is genuine cannot be told from the signatures (a copy
/// of an earlier genuine checkpoint verifies too), so neither is called forged; a copy with
/// the same bytes is said as such.
fn second_checkpoint(chain: &str, kept: &Path, extra: &Path) -> String {
    let same = matches!(
        (std::fs::read(kept), std::fs::read(extra)),
        (Ok(a), Ok(b)) if a == b
    );
    format!(
        "{}: a second checkpoint for chain {chain}{}, beside {}: its writer signs one file \
         ({}), so one of them was put there; the chain is checked against {}",
        extra.display(),
        if same {
            " (a copy of the same bytes)"
        } else {
            ""
        },
        kept.display(),
        checkpoint::file_name_of(chain),
        kept.display()
    )
}

/// The chain a checkpoint file's name names (`kvh-<chain>.ckpt`, as the writer names it);
/// `None` for a file named otherwise (a copy given by its own name).
fn named_chain(path: &Path) -> Option<String> {
    let name = path.file_name()?.to_str()?;
    let chain = name.strip_prefix("kvh-")?.strip_suffix(".ckpt")?;
    files::valid_chain_id(chain).then(|| chain.to_owned())
}

/// One HMAC secret given to the verifier, as a chain walk holds it.
struct GivenKey {
    /// Its index in [`VerifyOptions::hmac_keys`].
    index: usize,
    /// Its key id ([`EpochKey::key_id`]).
    id: String,
    /// Its name ([`SealKey::name`]), for messages.
    name: String,
    /// The key at the walk's epoch.
    key: EpochKey,
}

impl GivenKey {
    /// `ID (NAME)`.
    fn described(&self) -> String {
        format!("{} ({})", self.id, self.name)
    }
}

/// The HMAC key of a chain walk. A chain is sealed by one secret throughout. The chain's
/// signed checkpoint names it (`key_id`); without one (no checkpoint checked), the first MAC
/// the walk reads picks it among the secrets given.
enum ChainKey {
    /// No secret given: MACs are not checked.
    Unchecked,
    /// Several secrets, none picked yet.
    Candidates(Vec<GivenKey>),
    /// The chain's secret.
    Pinned(GivenKey),
    /// The chain's signed checkpoint names a secret (`wanted`, a key id) that none of those
    /// given (`given`, their ids and names) is: no MAC of the chain can be checked.
    Absent { wanted: String, given: Vec<String> },
}

impl ChainKey {
    fn new(opts: &VerifyOptions) -> Result<Self, VerifyError> {
        let mut keys = Vec::with_capacity(opts.hmac_keys.len());
        for (index, k) in opts.hmac_keys.iter().enumerate() {
            let key = EpochKey::from_secret(k.secret.clone())
                .map_err(|e| VerifyError(format!("--key-file {}: {e}", k.name)))?;
            let id = key.key_id();
            keys.push(GivenKey {
                index,
                id,
                name: k.name.clone(),
                key,
            });
        }
        Ok(match keys.len() {
            0 => ChainKey::Unchecked,
            1 => ChainKey::Pinned(keys.remove(0)),
            _ => ChainKey::Candidates(keys),
        })
    }

    /// Binds the walk to the secret the chain's signed checkpoint names, before any MAC is
    /// read: a secret the verifier takes for other chains (a retired one) cannot seal this one.
    fn bind(&mut self, key_id: &str) {
        let absent = |given: Vec<String>| ChainKey::Absent {
            wanted: key_id.to_string(),
            given,
        };
        *self = match std::mem::replace(self, ChainKey::Unchecked) {
            ChainKey::Unchecked => ChainKey::Unchecked,
            ChainKey::Pinned(g) if g.id == key_id => ChainKey::Pinned(g),
            ChainKey::Pinned(g) => absent(vec![g.described()]),
            ChainKey::Candidates(keys) => {
                let ids = keys.iter().map(GivenKey::described).collect();
                match keys.into_iter().find(|g| g.id == key_id) {
                    Some(g) => ChainKey::Pinned(g),
                    None => absent(ids),
                }
            }
            ChainKey::Absent { given, .. } => absent(given),
        };
    }

    /// Ratchets every key still in play to `epoch`.
    fn advance_to(&mut self, epoch: u64) {
        match self {
            ChainKey::Unchecked | ChainKey::Absent { .. } => {}
            ChainKey::Candidates(keys) => keys.iter_mut().for_each(|g| g.key.advance_to(epoch)),
            ChainKey::Pinned(g) => g.key.advance_to(epoch),
        }
    }

    /// Makes the secret at `index` (the one found sealing the chain's prune manifest) the
    /// chain's key, before any record is read; a chain bound to another secret is refused.
    fn pin(&mut self, index: usize) -> Result<(), String> {
        match self {
            ChainKey::Unchecked => Ok(()),
            ChainKey::Pinned(g) if g.index == index => Ok(()),
            ChainKey::Pinned(_) => {
                Err("sealed with another HMAC key than the rest of its chain".into())
            }
            ChainKey::Absent { wanted, given } => Err(absent(wanted, given)),
            ChainKey::Candidates(keys) => {
                let pos = keys
                    .iter()
                    .position(|g| g.index == index)
                    .ok_or("no such HMAC key")?;
                *self = ChainKey::Pinned(keys.swap_remove(pos));
                Ok(())
            }
        }
    }

    /// Checks the MAC of the record whose chain hash is `hash` (`mac`: `None` when it is not
    /// a MAC at all); with several candidates, the one that verifies it becomes the chain's
    /// key. Returns the index of the chain's key (`None`: MACs not checked).
    fn check(&mut self, hash: &[u8; 32], mac: Option<[u8; 32]>) -> Result<Option<usize>, String> {
        let verifies = |key: &EpochKey| mac.is_some_and(|mac| mac_verifies(key, hash, &mac));
        match self {
            ChainKey::Unchecked => Ok(None),
            ChainKey::Absent { wanted, given } => Err(absent(wanted, given)),
            ChainKey::Pinned(g) if verifies(&g.key) => Ok(Some(g.index)),
            ChainKey::Pinned(g) => Err(format!(
                "MAC mismatch at epoch {}: wrong key or forged record",
                g.key.epoch()
            )),
            ChainKey::Candidates(keys) => {
                let epoch = keys.first().map_or(0, |g| g.key.epoch());
                let Some(pos) = keys.iter().position(|g| verifies(&g.key)) else {
                    return Err(format!(
                        "MAC mismatch at epoch {epoch}: none of the {} keys given seals this \
                         chain (wrong keys or forged record)",
                        keys.len()
                    ));
                };
                let g = keys.swap_remove(pos);
                let index = g.index;
                *self = ChainKey::Pinned(g);
                Ok(Some(index))
            }
        }
    }
}

/// Why no MAC of a chain bound to a secret not given can be checked.
fn absent(wanted: &str, given: &[String]) -> String {
    format!(
        "MAC mismatch: the chain's signed checkpoint names HMAC key id {wanted}, which none \
         of the keys given has (their ids: {}): wrong key, or a record sealed with another one",
        given.join(", ")
    )
}

/// Walk state of one chain.
struct Walk<'a> {
    chain: &'a str,
    key: ChainKey,
    next_seq: u64,
    prev: [u8; 32],
    /// The hash of the record before the one `prev` is (`None`: not read, in a walk resumed
    /// after a position), and the `ts` of the one `prev` is when it is a `rotate` record: a
    /// `recovery` record may name the record before its own process's `rotate`, which its
    /// writer sealed with the recovery's `ts`.
    before_prev: Option<[u8; 32]>,
    prev_rotate_ts: Option<u64>,
    prev_file: Option<String>,
    ckpt: Option<&'a Checkpoint>,
    /// Index of the last file checked.
    cur_index: u64,
    /// The signer the newest record read that names one names (`start`, `recovery`,
    /// `rotate` and `checkpoint` records do, when their writer signs checkpoints).
    signer: Option<String>,
    /// The signer named up to the record the checkpoint covers, once the walk reached it:
    /// the key the checkpoint must be signed with.
    signer_at_ckpt: Option<Option<String>>,
    /// Whether the records read so far carry a `mac` (`None` before the first).
    mac_seen: Option<bool>,
    report: ChainReport,
}

/// Verifies one chain's files. `manifest` is its prune manifest, read when the reading is a
/// pruned one: with `allow_pruned` it accounts for missing oldest files; every file it lists
/// that is read must have the SHA-256 it recorded, and read whole (`archive_dirs`), every
/// file it lists must be read.
fn verify_chain(
    chain: &str,
    list: &[(u64, PathBuf)],
    opts: &VerifyOptions,
    ckpt: Option<&Checkpoint>,
    manifest: Option<LoadedManifest>,
) -> Result<ChainReport, VerifyError> {
    let mut w = Walk::new(chain, opts, ckpt, list.len())?;
    let manifest = match manifest.transpose() {
        Ok(m) => m,
        Err(reason) => {
            w.report.problem = Some(manifest_problem(chain, reason));
            return Ok(w.report);
        }
    };
    if let (true, Some((first, _))) = (opts.allow_pruned, list.first()) {
        if *first > 0 {
            if let Err(p) = w.continue_pruned(manifest.as_ref(), *first, opts) {
                w.report.problem = Some(p);
                return Ok(w.report);
            }
        }
    }
    // Listed twice: the same name in the log and an archive directory, with other bytes.
    if let Some(pair) = list.windows(2).find(|p| p[0].0 == p[1].0) {
        w.report.problem = Some(Problem {
            file: files::file_name(chain, pair[0].0),
            line: 1,
            reason: format!(
                "two different files of this name: {} and {}",
                pair[0].1.display(),
                pair[1].1.display()
            ),
        });
        return Ok(w.report);
    }
    let mut last_line = (String::new(), 0u64);
    for (pos, (index, path)) in list.iter().enumerate() {
        let name = files::file_name(chain, *index);
        if opts.progress {
            crate::say(format_args!("verify-log:   {}", path.display()));
        }
        // Read a line at a time, hashed whole when a manifest recorded the file's SHA-256.
        let recorded = manifest
            .as_ref()
            .is_some_and(|m| recorded_sha256(m, &name).is_some());
        let mut lines = match Lines::open(path) {
            Ok(l) if recorded => l.hashing(),
            Ok(l) => l,
            // Another user's file the reader may not read (a log copied or mounted under
            // another account): nothing is known of its bytes, so the run fails as an I/O
            // error, not as tampering. The reader's own file made unreadable is a problem.
            Err(e)
                if e.kind() == std::io::ErrorKind::PermissionDenied
                    && files::unreadable_foreign(path) =>
            {
                return Err(VerifyError(format!("{}: {e}", path.display())));
            }
            Err(e) => {
                // A planted or broken file is a problem of this chain, not of the whole run.
                w.report.problem = Some(unreadable(&name, &e));
                return Ok(w.report);
            }
        };
        let is_last = pos + 1 == list.len();
        match w.file(&name, *index, &mut lines, is_last) {
            Ok(lines) => last_line = (name.clone(), lines),
            Err(p) => {
                w.report.problem = Some(p);
                return Ok(w.report);
            }
        }
        // After the walk, whose reason names the record when it finds one: bytes that verify
        // but are not the ones the manifest recorded.
        if let Some(p) = manifest
            .as_ref()
            .and_then(|m| moved_file_differs(m, &name, lines.sha256()))
        {
            w.report.problem = Some(p);
            return Ok(w.report);
        }
    }
    w.report.walked_to_end = true;
    if let Some(m) = &manifest {
        // The manifest proves the chain reached its last entry: no file it lists may lie
        // beyond the last one left (prune-log removes the oldest first), and read whole every
        // file it lists must have been read.
        let read: Vec<String> = list
            .iter()
            .map(|(i, _)| files::file_name(chain, *i))
            .collect();
        let last_read = list.last().map(|(i, _)| *i);
        let lost = m.files.iter().enumerate().find(|(i, f)| {
            let beyond = last_read.is_some_and(|l| *i as u64 > l);
            beyond || (!opts.archive_dirs.is_empty() && !read.contains(&f.name))
        });
        if let Some((_, f)) = lost {
            w.report.problem = Some(manifest_problem(
                chain,
                format!(
                    "the prune manifest lists {}, which is not among the files read: moved \
                     file lost, or later files deleted",
                    f.name
                ),
            ));
            return Ok(w.report);
        }
        // A manifest of an open chain (prune-log keeps its two newest files) proves a file
        // after the ones it moved: read whole, the chain must have one, as read pruned.
        let moved = m.files.len() as u64;
        if !m.complete && last_read.is_none_or(|l| l < moved) {
            let tail = m.files.last().map_or("", |f| f.name.as_str());
            w.report.problem = Some(manifest_problem(
                chain,
                format!(
                    "the manifest moved files up to {tail} of an open chain, but no later file \
                     of chain {chain} exists: files deleted"
                ),
            ));
            return Ok(w.report);
        }
    }
    if let Some(p) = manifest
        .as_ref()
        .and_then(|m| manifest_of_another_key(m, chain, w.report.key_index, opts))
    {
        w.report.problem = Some(p);
        return Ok(w.report);
    }
    if let (Some(c), Some(named)) = (ckpt, &w.signer_at_ckpt) {
        match signed_by_named(c, named.as_deref(), &last_line) {
            // Bound to a secret only when MACs were checked with it.
            Ok(bound) => w.report.keys_bound = bound && w.report.macs_checked,
            Err(p) => {
                w.report.problem = Some(p);
                return Ok(w.report);
            }
        }
    }
    // A chain whose writer died before its `start` record was whole: its first file alone, no
    // complete record, only torn bytes or none (the file is created and its directory synced
    // before `start` is written), no more of them than a `start` record could be. Nothing in
    // it for a checkpoint to cover (the next start removes it once it is idle), and whoever
    // can delete a checkpoint can delete such a chain whole. A larger one is not that: a
    // chain whose newlines were stripped, which start-up leaves in place.
    let never_started = w.report.records == 0
        && w.report.pruned.is_none()
        && w.report.torn_bytes <= files::MAX_UNSTARTED_BYTES
        && matches!(list, [(0, _)]);
    if ckpt.is_none() && !opts.public_keys.is_empty() && !never_started {
        // With a pinned signer every chain must be covered: deleting a chain's checkpoint
        // would otherwise silently turn off the truncation and rewrite checks for it.
        w.report.problem = Some(Problem {
            file: last_line.0,
            line: last_line.1 + 1,
            reason: format!(
                "{NO_CHECKPOINT} {chain} signed by the pinned public key: \
                 its end cannot be checked (checkpoint deleted, or never written)"
            ),
        });
        return Ok(w.report);
    }
    if let (Some(c), Some(pruned)) = (ckpt, &w.report.pruned) {
        if c.seq <= pruned.last_seq {
            // prune-log never moves the checkpoint's file: a checkpoint that points into the
            // moved files cannot be held to a record here, and the manifest's word for it is
            // not enough (anyone with the HMAC secret could write one).
            w.report.problem = Some(Problem {
                file: prune::manifest_path(Path::new(""), chain)
                    .display()
                    .to_string(),
                line: 1,
                reason: format!(
                    "the signed checkpoint (seq {}) points into the moved files (up to seq {}): \
                     verify with --archive-dir",
                    c.seq, pruned.last_seq
                ),
            });
            return Ok(w.report);
        }
    }
    if let Some(c) = ckpt {
        if w.report.checkpoint_seq.is_none() {
            let last = w
                .report
                .last_seq
                .map_or("no record".into(), |s| format!("seq {s}"));
            w.report.problem = Some(Problem {
                file: last_line.0,
                line: last_line.1 + 1,
                reason: format!(
                    "chain ends at {last} but the signed checkpoint covers seq {} in {}: \
                     records truncated or newest files deleted",
                    c.seq, c.file
                ),
            });
        }
    }
    if w.report.last_seq.is_some() {
        w.report.last_hash = Some(hex(&w.prev));
    }
    w.report.signer = w.signer.clone();
    Ok(w.report)
}

/// A prune manifest MACed with another of the secrets given than the one that seals its
/// chain's records (`key_index`): it does not vouch for this chain.
fn manifest_of_another_key(
    m: &Manifest,
    chain: &str,
    key_index: Option<usize>,
    opts: &VerifyOptions,
) -> Option<Problem> {
    let chain_key = key_index?;
    let sealer = manifest_keys(opts).and_then(|keys| manifest_sealer(m, &keys));
    match sealer {
        Ok(Some(i)) if i == chain_key => None,
        Ok(_) => Some(manifest_problem(
            chain,
            "the prune manifest is MACed with another HMAC key than its chain's records".into(),
        )),
        Err(reason) => Some(manifest_problem(chain, reason)),
    }
}

/// Holds the checkpoint's signer to the one the chain's own (MAC-checked) records name up
/// to the record it covers (`named`). Another key is a checkpoint re-signed with a key the
/// verifier also takes (a retired one); none named, when the checkpoint names the chain's
/// secret (a writer that names its signer in every run's and file's first record), is a
/// checkpoint signed at a point its writer never signed. Returns whether the chain is bound
/// to its keys: its checkpoint names its secret and was signed by the signer it names.
fn signed_by_named(
    c: &Checkpoint,
    named: Option<&str>,
    at: &(String, u64),
) -> Result<bool, Problem> {
    let bad = |reason: String| Problem {
        file: at.0.clone(),
        line: at.1 + 1,
        reason,
    };
    let signed_by = c.public_key.as_deref().unwrap_or("no key");
    match (named, &c.key_id) {
        (Some(n), _) if n != signed_by => Err(bad(format!(
            "the signed checkpoint (seq {}) is signed by {signed_by}, but the chain's records \
             up to it name {n}: checkpoint re-signed with another key",
            c.seq
        ))),
        (Some(_), key_id) => Ok(key_id.is_some()),
        (None, Some(_)) => Err(bad(format!(
            "no record up to the signed checkpoint (seq {}) names its signer, though the \
             checkpoint names the chain's HMAC key: checkpoint signed at a point its writer \
             never signed",
            c.seq
        ))),
        // Written by a writer that names neither: not bound to its keys.
        (None, None) => Ok(false),
    }
}

/// A file the manifest says was moved, read here with other bytes than it recorded.
fn moved_file_differs(m: &Manifest, name: &str, sha256: Option<[u8; 32]>) -> Option<Problem> {
    let recorded = recorded_sha256(m, name)?;
    (sha256.map(|h| super::record::hex(&h)).as_deref() != Some(recorded)).then(|| Problem {
        file: name.to_string(),
        line: 1,
        reason: "not the file the prune manifest recorded (SHA-256 differs)".into(),
    })
}

/// The SHA-256 (hex) the prune manifest `m` recorded of the file `name`, if it lists it.
fn recorded_sha256<'m>(m: &'m Manifest, name: &str) -> Option<&'m str> {
    m.files
        .iter()
        .find(|f| f.name == name)
        .map(|f| f.sha256.as_str())
}

/// A chain file that cannot be read as a regular file of a sane size.
fn unreadable(name: &str, e: &std::io::Error) -> Problem {
    Problem {
        file: name.to_string(),
        line: 1,
        reason: format!("cannot read chain file: {e}"),
    }
}

/// Checks, in order, files of one chain held in memory, as [`verify_all`] checks them on
/// disk: `kvh prune-log` moves exactly the bytes this accepted, so a file changed between
/// the verification of the directory and the move is caught.
pub struct ChainCheck<'a> {
    walk: Walk<'a>,
}

impl<'a> ChainCheck<'a> {
    /// Starts at file `first` of `chain`: from the genesis for file 0, else from where the
    /// chain's prune manifest says the moved files ended (which needs the HMAC key).
    /// `key_index` is the secret of `opts.hmac_keys` the chain's verification found sealing
    /// it: the files checked must carry its MACs.
    pub fn new(
        chain: &'a str,
        manifest: Option<&Manifest>,
        first: u64,
        key_index: Option<usize>,
        opts: &VerifyOptions,
    ) -> Result<Self, String> {
        let mut walk = Walk::new(chain, opts, None, 0).map_err(|e| e.0)?;
        if let Some(i) = key_index {
            walk.key.pin(i)?;
        }
        if first > 0 {
            walk.continue_pruned(manifest, first, opts)
                .map_err(|p| p.to_string())?;
        }
        Ok(ChainCheck { walk })
    }

    /// Checks the chain's next file, read to its end from `lines`, which must be complete (end
    /// with a newline, hold a record) as every file but an open chain's newest is.
    pub fn file<R: Read>(&mut self, index: u64, lines: &mut Lines<R>) -> Result<(), String> {
        let name = files::file_name(self.walk.chain, index);
        self.walk
            .file(&name, index, lines, false)
            .map(|_| ())
            .map_err(|p| p.to_string())
    }

    /// Starts just after a record a verification accepted: record `seq` of `chain`, whose
    /// hash is `hash`, in file `file`, sealed (when keys are given) by the secret at
    /// `key_index`, the records up to it naming `signer`. The records checked from here on ([`ChainCheck::record`]) are held to what
    /// the walk holds every record to, and to the chain's signed checkpoint `ckpt` (the secret
    /// it names; the hash of the record it covers, when that is this one or one checked);
    /// what lies before them and prune manifests are not looked at (a verification of the
    /// directory judges them).
    pub fn after(
        chain: &'a str,
        at: Accepted,
        key_index: Option<usize>,
        signer: Option<&str>,
        ckpt: Option<&'a Checkpoint>,
        opts: &VerifyOptions,
    ) -> Result<Self, String> {
        if let Some(c) = ckpt.filter(|c| c.seq == at.seq && c.hash != at.hash) {
            return Err(format!(
                "record differs from the signed checkpoint at seq {}: chain rewritten",
                c.seq
            ));
        }
        let mut walk = Walk::new(chain, opts, ckpt, 0).map_err(|e| e.0)?;
        if !opts.hmac_keys.is_empty() {
            walk.key
                .pin(key_index.ok_or("the chain's HMAC key is not known")?)?;
        }
        walk.key.advance_to(at.file);
        walk.next_seq = at.seq.checked_add(1).ok_or("seq out of range")?;
        walk.prev = at.hash;
        walk.cur_index = at.file;
        walk.prev_file = at.file.checked_sub(1).map(|f| files::file_name(chain, f));
        walk.report.closed = at.stop;
        walk.prev_rotate_ts = at.rotate;
        walk.signer = signer.map(str::to_string);
        if ckpt.is_some_and(|c| c.seq == at.seq) {
            walk.signer_at_ckpt = Some(walk.signer.clone());
        }
        Ok(ChainCheck { walk })
    }

    /// The signer the newest record checked (or, before any, the one given to
    /// [`ChainCheck::after`]) names.
    pub fn signer(&self) -> Option<&str> {
        self.walk.signer.as_deref()
    }

    /// Whether the chain's signed checkpoint, when it covers the record the check started
    /// after or one it checked, is signed by the key the records up to it name (as
    /// [`verify_all`] holds it).
    pub fn checkpoint_signer(&self) -> Result<(), String> {
        match (self.walk.ckpt, &self.walk.signer_at_ckpt) {
            (Some(c), Some(named)) => signed_by_named(c, named.as_deref(), &(String::new(), 0))
                .map(|_| ())
                .map_err(|p| p.reason),
            _ => Ok(()),
        }
    }

    /// Whether the chain's `stop` record was reached: nothing may follow it, not a byte nor a
    /// file.
    pub fn closed(&self) -> bool {
        self.walk.report.closed
    }

    /// Checks the chain's next record, the complete line `line` (without its newline) of file
    /// `index`: the file of the record before it, or, as the first line of a file
    /// (`first_in_file`), the next one. Returns its seq and hash.
    pub fn record(
        &mut self,
        index: u64,
        line: &[u8],
        first_in_file: bool,
    ) -> Result<(u64, [u8; 32]), String> {
        if index != self.walk.cur_index {
            if !first_in_file || Some(index) != self.walk.cur_index.checked_add(1) {
                return Err(format!(
                    "file index jumps from {} to {index}",
                    self.walk.cur_index
                ));
            }
            // The walk names the file before the one it reads: a `rotate` record links to it.
            self.walk.prev_file = Some(files::file_name(self.walk.chain, self.walk.cur_index));
            self.walk.cur_index = index;
            self.walk.key.advance_to(index);
        }
        let seq = self.walk.next_seq;
        self.walk.record(line, index, first_in_file)?;
        Ok((seq, self.walk.prev))
    }
}

/// A record a verification accepted, from which a [`ChainCheck`] goes on.
#[derive(Clone, Copy, Debug)]
pub struct Accepted {
    pub seq: u64,
    pub hash: [u8; 32],
    /// Index of the file holding it.
    pub file: u64,
    /// Whether it is the chain's `stop` record (nothing may follow it).
    pub stop: bool,
    /// Its `ts` when it is a `rotate` record (a `recovery` record after it, of the same
    /// process, may name the record before it).
    pub rotate: Option<u64>,
}

impl<'a> Walk<'a> {
    fn new(
        chain: &'a str,
        opts: &VerifyOptions,
        ckpt: Option<&'a Checkpoint>,
        files: usize,
    ) -> Result<Self, VerifyError> {
        let mut key = ChainKey::new(opts)?;
        if let Some(id) = ckpt.and_then(|c| c.key_id.as_deref()) {
            key.bind(id);
        }
        Ok(Walk {
            chain,
            cur_index: 0,
            key,
            next_seq: 0,
            prev: GENESIS_PREV,
            before_prev: None,
            prev_rotate_ts: None,
            prev_file: None,
            ckpt,
            signer: None,
            signer_at_ckpt: None,
            mac_seen: None,
            report: ChainReport {
                chain: chain.to_string(),
                files,
                macs_checked: !opts.hmac_keys.is_empty(),
                checkpoints_checked: !opts.public_keys.is_empty(),
                checkpoint_read: ckpt.map(|c| c.seq),
                ..Default::default()
            },
        })
    }

    /// Starts the walk where the manifest of `prune-log` in `dir` says the moved files ended:
    /// they must be exactly files 0 .. `first` - 1, so the first file left links to the last
    /// one moved.
    fn continue_pruned(
        &mut self,
        manifest: Option<&Manifest>,
        first: u64,
        opts: &VerifyOptions,
    ) -> Result<(), Problem> {
        // Without a manifest the problem is the first file left's, as without
        // `--allow-pruned`: the report names a file on disk.
        let m = manifest.ok_or_else(|| Problem {
            file: files::file_name(self.chain, first),
            line: 1,
            reason: format!(
                "chain starts at file index {first}: {}, and no prune manifest accounts \
                 for them",
                missing_before(first)
            ),
        })?;
        let name = prune::manifest_path(Path::new(""), self.chain)
            .display()
            .to_string();
        let bad = |reason: String| Problem {
            file: name.clone(),
            line: 1,
            reason,
        };
        let keys = manifest_keys(opts).map_err(&bad)?;
        let sealer = manifest_sealer(m, &keys)
            .map_err(&bad)?
            .ok_or_else(|| bad(NEEDS_KEY.into()))?;
        // The manifest was MACed with the chain's own key: the records left must be too.
        self.key.pin(sealer).map_err(&bad)?;
        self.report.key_index = Some(sealer);
        // An interrupted run may have recorded files it had not removed yet: the manifest
        // must cover the missing files (`check` made its entries files 0, 1, ... in order)
        // and may list later ones still present.
        if (m.files.len() as u64) < first {
            return Err(bad(format!(
                "the manifest lists {} moved files, which do not account for the missing \
                 ones ({})",
                m.files.len(),
                missing_before(first)
            )));
        }
        let tail = &m.files[first as usize - 1];
        let prev = parse_hash(&tail.last_hash)
            .ok_or_else(|| bad(format!("{}: last_hash is not a hash", tail.name)))?;
        self.next_seq = tail
            .last_seq
            .checked_add(1)
            .ok_or_else(|| bad(format!("{}: last_seq out of range", tail.name)))?;
        self.prev = prev;
        self.prev_file = Some(tail.name.clone());
        self.cur_index = first - 1;
        self.report.pruned = Some(pruned_of(m, first as usize, tail.last_seq));
        // A chain moved whole had ended: nothing may follow its last moved file. (Files the
        // manifest lists that are still here, from an interrupted run, end with the stop.)
        self.report.closed = m.complete && m.files.len() as u64 == first;
        Ok(())
    }

    /// Checks one file, read to its end from `lines`; returns its number of complete lines.
    fn file<R: Read>(
        &mut self,
        name: &str,
        index: u64,
        lines: &mut Lines<R>,
        is_last: bool,
    ) -> Result<u64, Problem> {
        let bad = |line: u64, reason: String| Problem {
            file: name.to_string(),
            line,
            reason,
        };
        if self.report.closed {
            // A writer writes nothing after `stop`: not a record, not a file.
            return Err(bad(1, "file after the chain's stop record".into()));
        }
        let expected_index = self.prev_file.as_ref().map_or(0, |_| self.cur_index + 1);
        if index != expected_index {
            let reason = if self.prev_file.is_none() {
                format!(
                    "chain starts at file index {index}: {}",
                    missing_before(index)
                )
            } else {
                format!(
                    "file index jumps from {} to {index}: rotated file(s) missing",
                    expected_index - 1
                )
            };
            return Err(bad(1, reason));
        }
        self.key.advance_to(index);
        let mut count = 0u64;
        loop {
            let line = lines
                .next_line()
                .map_err(|e| bad(count + 1, format!("cannot read chain file: {e}")))?;
            let torn = match line {
                None => break,
                Some(Line::Whole(line)) => {
                    count += 1;
                    self.record(line, index, count == 1)
                        .map_err(|r| bad(count, r))?;
                    continue;
                }
                Some(Line::Overlong { len, ended: true }) => {
                    let reason = format!("a line of {len} bytes, longer than any record");
                    return Err(bad(count + 1, reason));
                }
                Some(Line::Torn(bytes)) => bytes.len() as u64,
                Some(Line::Overlong { len, ended: false }) => len,
            };
            // The file's last bytes, after its last newline.
            if self.report.closed {
                return Err(bad(count + 1, "bytes after the chain's stop record".into()));
            }
            if !is_last {
                return Err(bad(count + 1, "unterminated line in a rotated file".into()));
            }
            self.report.torn_bytes = torn;
        }
        let lines = count;
        if lines == 0 && !is_last {
            return Err(bad(1, "empty rotated file".into()));
        }
        if lines > 0 {
            self.report.last_file = Some(index);
        }
        self.prev_file = Some(name.to_string());
        self.cur_index = index;
        Ok(lines)
    }

    fn record(&mut self, line: &[u8], index: u64, first_in_file: bool) -> Result<(), String> {
        let r = scan(line).map_err(|e| scan_reason(line, e))?;
        // Before any check: a chain failing at its first record still says it carried MACs.
        self.report.sealed |= r.mac.is_some();
        self.header(&r, index)?;
        let hash = chain_hash_open(&self.prev, r.body_open);
        if parse_hash(r.hash) != Some(hash) {
            return Err("hash mismatch: record modified".into());
        }
        let sealer = self.mac(&hash, r.mac)?;
        Self::unlinked_header(&r)?;
        if self.report.key_index.is_none() {
            self.report.key_index = sealer;
        }
        if let Some(c) = self
            .ckpt
            .filter(|c| c.seq == self.next_seq && c.hash != hash)
        {
            return Err(format!(
                "record differs from the signed checkpoint at seq {}: chain rewritten",
                c.seq
            ));
        }
        // The signer also said where the record is: a checkpoint that names another file
        // than the one holding it was not written by this chain's writer as it stands.
        if let Some(c) = self.ckpt.filter(|c| c.seq == self.next_seq) {
            let holding = files::file_name(self.chain, index);
            if c.file != holding {
                return Err(format!(
                    "the signed checkpoint names file {:?} for seq {}, which {holding} holds",
                    c.file, c.seq
                ));
            }
        }
        self.position(&r, first_in_file)?;
        if r.kind == Some("recovery") {
            self.recovery_claims(&r)?;
        }
        if r.kind == Some("checkpoint") {
            let rep = &mut self.report;
            rep.checkpoint_recorded = rep.checkpoint_recorded.max(r.ckpt_seq);
        }
        let names_signer = matches!(r.kind, Some("start" | "recovery" | "rotate" | "checkpoint"));
        if let (true, Some(signer)) = (names_signer, r.signer) {
            self.signer = Some(signer.to_string());
        }
        if self.ckpt.is_some_and(|c| c.seq == self.next_seq) {
            self.signer_at_ckpt = Some(self.signer.clone());
        }
        self.accept(&r, hash);
        Ok(())
    }

    /// Schema version, chain id, epoch, seq and prev: what places the record in the chain.
    fn header(&self, r: &Scanned<'_>, index: u64) -> Result<(), String> {
        if r.v != Some(1) {
            return Err("unsupported or missing schema version v".into());
        }
        let chain = r.chain.ok_or("record has no chain")?;
        if chain != self.chain {
            return Err(format!(
                "record belongs to chain {chain}, not {}: spliced from another chain",
                self.chain
            ));
        }
        if r.epoch != Some(index) {
            return Err(format!("epoch is not the file's index {index}"));
        }
        let seq = r.seq.ok_or("record has no seq")?;
        if seq == u64::MAX {
            // No record may follow it: the walk's next seq would not exist.
            return Err("seq out of range".into());
        }
        if seq != self.next_seq {
            return Err(format!(
                "seq {seq}, expected {}: records deleted, duplicated or reordered",
                self.next_seq
            ));
        }
        if r.prev.and_then(parse_hash) != Some(self.prev) {
            return Err("prev is not the previous record's hash".into());
        }
        Ok(())
    }

    /// The header fields the chain does not link: `ts`, `kind` and the owner ids. Checked
    /// once the hash and MAC are, so that an edit is named as one.
    fn unlinked_header(r: &Scanned<'_>) -> Result<(), String> {
        r.ts.ok_or("record has no ts (Unix nanoseconds: an integer, 0 or more)")?;
        r.kind.ok_or("record has no kind")?;
        if let Some(missing) = (0..ID_FIELDS.len()).find(|bit| r.ids & (1 << bit) == 0) {
            return Err(format!(
                "record has no {} (a string or null)",
                ID_FIELDS[missing]
            ));
        }
        Ok(())
    }

    /// Checks the record's MAC; returns the index of the chain's key (`None`: unchecked).
    /// A `mac` that is not 64 lower-case hex digits is refused also without a key: the line
    /// is then not in canonical form.
    fn mac(&mut self, hash: &[u8; 32], mac_hex: Option<&str>) -> Result<Option<usize>, String> {
        if let Some(m) = mac_hex {
            if parse_hash(m).is_none() {
                return Err("mac is not 64 lower-case hex digits".into());
            }
        }
        self.sealed_throughout(mac_hex.is_some())?;
        if let ChainKey::Unchecked = self.key {
            return Ok(None);
        }
        let mac = mac_hex.ok_or("record has no mac but a key was given")?;
        self.key.check(hash, parse_hash(mac))
    }

    /// A chain is sealed throughout or not at all: its writer seals every record or none, and
    /// a crashed chain is continued only by a writer that seals as it did
    /// (`recovery::continuable`). A signed checkpoint that names the chain's secret (`key_id`)
    /// says it is sealed. Both are checked also without the HMAC key: a verifier holding only
    /// the public key would otherwise take a chain whose MACs were stripped, all or some, for
    /// one written without a key.
    fn sealed_throughout(&mut self, has_mac: bool) -> Result<(), String> {
        if !has_mac {
            if let Some(id) = self.ckpt.and_then(|c| c.key_id.as_deref()) {
                return Err(format!(
                    "record has no mac, but the chain's signed checkpoint names the HMAC secret \
                     that seals it ({id}): MACs removed"
                ));
            }
        }
        match self.mac_seen.replace(has_mac) {
            Some(true) if !has_mac => Err("record has no mac, but the chain's earlier records \
                                           carry one: MACs removed"
                .into()),
            Some(false) if has_mac => Err("record carries a mac, but the chain's earlier \
                                           records carry none: its writer seals every record \
                                           or none"
                .into()),
            _ => Ok(()),
        }
    }

    /// `start` opens file 0, `rotate` opens every later file and links to the previous one,
    /// nothing follows `stop`.
    fn position(&self, r: &Scanned<'_>, first_in_file: bool) -> Result<(), String> {
        let kind = r.kind.unwrap_or("");
        if self.report.closed {
            return Err("record after the chain's stop record".into());
        }
        if !first_in_file {
            if kind == "start" || kind == "rotate" {
                return Err(format!("{kind} record in the middle of a file"));
            }
            return Ok(());
        }
        let Some(prev_name) = self.prev_file.as_deref() else {
            if kind != "start" {
                return Err(format!("chain starts with a {kind} record, not start"));
            }
            return Ok(());
        };
        if kind != "rotate" {
            return Err(format!("file starts with a {kind} record, not rotate"));
        }
        if r.prev_file != Some(prev_name) {
            return Err(format!(
                "rotate record links to {}, but the previous file is {prev_name}",
                r.prev_file.unwrap_or("nothing")
            ));
        }
        if r.prev_seq != self.next_seq.checked_sub(1) {
            return Err("rotate record's prev_seq is not the previous file's last seq".into());
        }
        Ok(())
    }

    fn accept(&mut self, r: &Scanned<'_>, hash: [u8; 32]) {
        let seq = self.next_seq;
        let ts = r.ts.unwrap_or(0);
        let rep = &mut self.report;
        rep.records += 1;
        rep.first_seq.get_or_insert(seq);
        rep.last_seq = Some(seq);
        rep.first_ts = Some(rep.first_ts.map_or(ts, |t| t.min(ts)));
        rep.last_ts = Some(rep.last_ts.map_or(ts, |t| t.max(ts)));
        if r.kind == Some("stop") {
            rep.closed = true;
        }
        if let Some(c) = self.ckpt.filter(|c| c.seq == seq && c.hash == hash) {
            rep.checkpoint_seq = Some(c.seq);
        }
        self.next_seq += 1;
        self.before_prev = Some(self.prev);
        self.prev = hash;
        self.prev_rotate_ts = r.ts.filter(|_| r.kind == Some("rotate"));
    }

    /// What a `recovery` record says of the crashed chain it continues, checked against the
    /// chain: its last whole record (`last_good_seq`, `last_good_hash`) is the record just
    /// before it or, when the recovering process first wrote a `rotate` record (sealed with
    /// the recovery's own `ts`: the crash came between a file's creation and its `rotate`
    /// record, or the crashed chain's file was full), the record before that `rotate` (whose
    /// hash a walk resumed at that `rotate` did not read: `tail-log` leaves that comparison
    /// to the whole verification). `torn_sha256`, where written (older records lack it), is
    /// a SHA-256: of nothing exactly when `torn_bytes` is 0. The torn bytes themselves were
    /// replaced: only a copy kept elsewhere can be matched to the digest.
    fn recovery_claims(&self, r: &Scanned<'_>) -> Result<(), String> {
        let seq = r
            .last_good_seq
            .ok_or("recovery record has no last_good_seq")?;
        let hash = r
            .last_good_hash
            .and_then(parse_hash)
            .ok_or("recovery record has no last_good_hash of 64 hex digits")?;
        let here = self.next_seq;
        let named = if seq.checked_add(1) == Some(here) {
            Some(self.prev)
        } else if self.prev_rotate_ts.is_some_and(|t| Some(t) == r.ts)
            && seq.checked_add(2) == Some(here)
        {
            self.before_prev
        } else {
            return Err(format!(
                "recovery record's last_good_seq {seq} is not the record before it"
            ));
        };
        if named.is_some_and(|named| hash != named) {
            return Err(format!(
                "recovery record's last_good_hash is not the hash of record {seq}"
            ));
        }
        let torn = r.torn_bytes.ok_or("recovery record has no torn_bytes")?;
        if let Some(digest) = r.torn_sha256 {
            let digest = parse_hash(digest)
                .ok_or("recovery record's torn_sha256 is not 64 lower-case hex digits")?;
            let of_nothing = digest == <[u8; 32]>::from(Sha256::digest(b""));
            if (torn == 0) != of_nothing {
                return Err(format!(
                    "recovery record's torn_sha256 does not fit its torn_bytes {torn}"
                ));
            }
        }
        Ok(())
    }
}

/// A precise reason for a line the scanner refused: JSON errors from a full parser (only
/// on this failure path), canonical-form errors from the scanner. The parser checks the
/// syntax without building the value: a planted line of gigabytes costs no memory to refuse.
#[cold]
fn scan_reason(line: &[u8], scan_err: &str) -> String {
    match serde_json::from_slice::<serde::de::IgnoredAny>(line) {
        Err(e) => format!("malformed JSON: {e}"),
        Ok(_) if line.trim_ascii_start().first() != Some(&b'{') => {
            "record is not a JSON object".into()
        }
        Ok(_) => scan_err.to_string(),
    }
}

/// `YYYY-MM-DDTHH:MM:SS.nnnnnnnnnZ` of Unix nanoseconds (proleptic Gregorian, UTC).
pub fn rfc3339(ns: u64) -> String {
    let secs = ns / 1_000_000_000;
    let days = secs / 86_400;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:09}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        ns % 1_000_000_000
    )
}

#[cfg(test)]
mod tests {
    use super::rfc3339;

    /// A chain whose records name a later checkpoint than the file matched is behind, unless
    /// reading the checkpoint again after the walk found one as late (a running writer
    /// signed it meanwhile); and only a chain that verified with its MACs checked.
    #[test]
    fn a_checkpoint_is_behind_only_when_no_newer_one_was_found_after_the_walk() {
        let report = super::ChainReport {
            macs_checked: true,
            checkpoint_seq: Some(10),
            checkpoint_recorded: Some(20),
            ..super::ChainReport::default()
        };
        assert_eq!(report.checkpoint_behind(), Some(20));
        let signed_meanwhile = super::ChainReport {
            checkpoint_reread: Some(20),
            ..report.clone()
        };
        assert_eq!(signed_meanwhile.checkpoint_behind(), None);
        let still_behind = super::ChainReport {
            checkpoint_reread: Some(15),
            ..report.clone()
        };
        assert_eq!(still_behind.checkpoint_behind(), Some(20));
        let unkeyed = super::ChainReport {
            macs_checked: false,
            ..report
        };
        assert_eq!(unkeyed.checkpoint_behind(), None);
    }

    /// A chain listed after the checkpoints were read (its writer started in between) has its
    /// checkpoint looked up by name; one already read is not read twice, and one that does
    /// not verify is an error, not a checkpoint.
    #[test]
    fn a_checkpoint_written_after_the_checkpoints_were_read_is_found_by_name() {
        use super::*;
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("log");
        let (key, public) = crate::forensic::cli::keygen(&tmp.path().join("signer")).unwrap();
        let cfg = crate::config::LogConfig {
            signing_key_file: Some(key),
            ..crate::forensic::quiet_test_config(&dir)
        };
        let start =
            crate::forensic::StartInfo::current(crate::config::Config::default().canonical_json());
        crate::forensic::ForensicLog::open_with_secret(&cfg, start, None)
            .unwrap()
            .stop();
        let opts = VerifyOptions {
            public_keys: vec![crate::forensic::keys::read_public_key(&public).unwrap()],
            checkpoints: vec![dir.clone()],
            ..VerifyOptions::default()
        };
        let (chain, _) = list_all(&dir, &opts).unwrap().remove(0);
        let mut report = Report::default();
        let found = late_checkpoint(&chain, &opts, &mut BTreeSet::new(), &mut report).unwrap();
        assert_eq!(found.map(|c| c.chain), Some(chain.clone()));
        let path = checkpoint::path_for(&dir, &chain);
        let mut read = BTreeSet::from([path.clone()]);
        assert!(late_checkpoint(&chain, &opts, &mut read, &mut report)
            .unwrap()
            .is_none());
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        let forged = std::fs::read_to_string(&path)
            .unwrap()
            .replace("\"seq\":", "\"seq\":1");
        std::fs::write(&path, forged).unwrap();
        assert!(
            late_checkpoint(&chain, &opts, &mut BTreeSet::new(), &mut report)
                .unwrap()
                .is_none()
        );
        assert_eq!(report.errors.len(), 1, "{:?}", report.errors);
    }

    #[test]
    fn rfc3339_of_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000000000Z");
        assert_eq!(
            rfc3339(1_700_000_000_123_456_789),
            "2023-11-14T22:13:20.123456789Z"
        );
        assert_eq!(
            rfc3339(951_782_400_000_000_000),
            "2000-02-29T00:00:00.000000000Z"
        );
    }
}

#[cfg(test)]
mod relist_tests {
    //! A `kvh prune-log` that runs while the log is verified removes files the verification
    //! listed: such a chain is verified again from a new listing, not reported as tampered.
    use super::*;
    use crate::forensic::ForensicLog;
    use std::os::unix::fs::PermissionsExt;

    const SECRET: &[u8] = b"relist-secret-0123456789abcdef";

    fn opts() -> VerifyOptions {
        VerifyOptions {
            hmac_keys: vec![SealKey::new("hmac.key", Zeroizing::new(SECRET.to_vec()))],
            allow_pruned: true,
            ..VerifyOptions::default()
        }
    }

    /// A chain of about `files` files of 4 KiB in `dir`, stopped when `stop`; the log is
    /// returned when it is left open.
    fn chain(dir: &Path, files: usize, stop: bool) -> Option<std::sync::Arc<ForensicLog>> {
        let log = crate::forensic::keyed_test_log(dir, 4096, SECRET, files * 16);
        if stop {
            log.stop();
            return None;
        }
        Some(log)
    }

    fn archive(root: &Path) -> PathBuf {
        let archive = root.join("archive");
        std::fs::create_dir(&archive).unwrap();
        std::fs::set_permissions(&archive, std::fs::Permissions::from_mode(0o700)).unwrap();
        archive
    }

    fn prune(dir: &Path, archive: &Path, opts: &VerifyOptions) {
        let run = crate::forensic::prune::prune_now(dir, archive, opts);
        assert!(run.refused.is_empty(), "{:?}", run.refused);
        assert!(!run.moved.is_empty(), "prune-log moved nothing");
    }

    /// The listing and the manifests as `verify_all` reads them, before the prune.
    fn listed(dir: &Path, opts: &VerifyOptions) -> (String, Vec<(u64, PathBuf)>) {
        let mut chains = list_all(dir, opts).unwrap();
        assert_eq!(chains.len(), 1);
        assert!(load_manifests(dir, opts).unwrap().is_empty());
        chains.remove(0)
    }

    #[test]
    fn files_moved_by_a_prune_after_the_listing_are_not_tampering() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("log");
        let opts = opts();
        let log = chain(&dir, 6, false);
        let (id, list) = listed(&dir, &opts);
        assert!(list.len() > 3, "{list:?}");
        prune(&dir, &archive(tmp.path()), &opts);
        let rep = verify_listed(&dir, &id, &list, &opts, None, None)
            .unwrap()
            .unwrap();
        assert!(rep.ok(), "{:?}", rep.problem);
        assert!(rep.pruned.is_some(), "{rep:?}");
        std::mem::forget(log);
    }

    #[test]
    fn a_chain_moved_whole_after_the_listing_is_not_tampering() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("log");
        let opts = opts();
        chain(&dir, 4, true);
        let (id, list) = listed(&dir, &opts);
        prune(&dir, &archive(tmp.path()), &opts);
        assert!(list_all(&dir, &opts).unwrap().is_empty());
        let rep = verify_listed(&dir, &id, &list, &opts, None, None)
            .unwrap()
            .unwrap();
        assert!(rep.ok(), "{:?}", rep.problem);
        assert!(rep.closed && rep.pruned.is_some(), "{rep:?}");
    }

    /// Listing again does not excuse a file deleted outside `prune-log`: no manifest
    /// accounts for it.
    #[test]
    fn a_file_deleted_after_the_listing_is_still_reported() {
        for victim in [0, 2] {
            let tmp = tempfile::tempdir().unwrap();
            let dir = tmp.path().join("log");
            let opts = opts();
            chain(&dir, 5, true);
            let (id, list) = listed(&dir, &opts);
            std::fs::remove_file(&list[victim].1).unwrap();
            let rep = verify_listed(&dir, &id, &list, &opts, None, None)
                .unwrap()
                .unwrap();
            assert!(!rep.ok(), "file {victim} deleted, yet the chain verifies");
        }
    }

    /// A chain whose writer died before its `start` record was whole (its file 0 alone,
    /// holding a few torn bytes) is removed by the next start-up once idle. A verification
    /// that listed the file before that removal and finds it gone when it reads it does not
    /// report the chain as tampered: nothing of evidence was in it, as when it is read whole.
    #[test]
    fn an_unstarted_chain_removed_by_a_start_up_after_the_listing_is_not_tampering() {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("log");
        let opts = opts();
        chain(&dir, 1, true);
        let id = "p4242-t1700000000000000000";
        let torn = dir.join(files::file_name(id, 0));
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&torn)
            .unwrap()
            .write_all(b"{\"chain\":\"p4242-t1700000000000000000\",\"config_dig")
            .unwrap();
        let list = list_all(&dir, &opts)
            .unwrap()
            .into_iter()
            .find(|(c, _)| c == id)
            .map(|(_, l)| l)
            .unwrap();
        assert!(verify_all(&dir, &opts).unwrap().ok(), "verifies with it");
        // Removed, as a start-up removes it, between the listing and the reading.
        std::fs::remove_file(&torn).unwrap();
        assert!(verify_all(&dir, &opts).unwrap().ok(), "verifies without it");
        let rep = verify_listed(&dir, id, &list, &opts, None, None).unwrap();
        assert!(
            rep.is_none(),
            "a chain without a record, removed at start-up while it was verified, is still \
             reported: {rep:?}"
        );
    }

    /// The signed checkpoint of the last record of `file`, written in `dir`.
    fn checkpoint_at(
        dir: &Path,
        chain: &str,
        file: &Path,
        signer: &ed25519_dalek::SigningKey,
    ) -> Checkpoint {
        let text = std::fs::read_to_string(file).unwrap();
        let last: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
        let c = Checkpoint {
            chain: chain.to_string(),
            seq: last["seq"].as_u64().unwrap(),
            hash: parse_hash(last["hash"].as_str().unwrap()).unwrap(),
            file: file.file_name().unwrap().to_str().unwrap().to_string(),
            ts: 1,
            key_id: None,
            public_key: None,
        };
        checkpoint::write(dir, signer, &c).unwrap();
        c
    }

    /// The checkpoint a verification read before listing may be older than the one a
    /// `prune-log` that runs meanwhile goes by: the chain is judged from a new listing, and a
    /// checkpoint that points into files moved since is not tampering.
    #[test]
    fn a_checkpoint_that_advanced_while_prune_log_ran_is_not_tampering() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("log");
        let (signer, public) = crate::forensic::cli::keygen(&tmp.path().join("signer")).unwrap();
        let signer = crate::forensic::keys::read_signing_key(&signer).unwrap();
        let public = crate::forensic::keys::read_public_key(&public).unwrap();
        let opts = VerifyOptions {
            public_keys: vec![public],
            checkpoints: vec![dir.clone()],
            ..opts()
        };
        let log = chain(&dir, 8, false);
        let (id, files) = list_all(&dir, &opts).unwrap().remove(0);
        assert!(files.len() >= 7, "{files:?}");
        checkpoint_at(&dir, &id, &files[1].1, &signer);
        // The verification reads the checkpoint, then lists the files.
        let read = checkpoint::read(&checkpoint::path_for(&dir, &id), &opts.public_keys).unwrap();
        let (_, list) = listed(&dir, &opts);
        // The writer signs a later checkpoint; prune-log moves the files before its file.
        checkpoint_at(&dir, &id, &files[4].1, &signer);
        prune(&dir, &archive(tmp.path()), &opts);
        assert!(
            verify_all(&dir, &opts).unwrap().ok(),
            "the log verifies once the prune is done"
        );
        let rep = verify_listed(&dir, &id, &list, &opts, Some(&read), None)
            .unwrap()
            .unwrap();
        assert!(rep.ok(), "{:?}", rep.problem);
        std::mem::forget(log);
    }

    /// `verify_all` in a loop while `prune-log` moves many chains: every reading verifies.
    #[test]
    fn verifications_overlapping_a_prune_all_verify() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("log");
        let opts = opts();
        for _ in 0..16 {
            chain(&dir, 5, true);
        }
        let archive = archive(tmp.path());
        assert!(verify_all(&dir, &opts).unwrap().ok());
        let done = std::sync::atomic::AtomicBool::new(false);
        let readings = std::thread::scope(|s| {
            s.spawn(|| {
                prune(&dir, &archive, &opts);
                done.store(true, std::sync::atomic::Ordering::SeqCst);
            });
            let mut readings = 0;
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                let report = verify_all(&dir, &opts).unwrap();
                assert!(
                    report.ok(),
                    "a verification overlapping prune-log fails: {:?}",
                    report.first_problem()
                );
                readings += 1;
            }
            readings
        });
        assert!(readings > 0);
        let after = verify_all(&dir, &opts).unwrap();
        assert!(after.ok() && after.chains.len() == 16, "{after:?}");
    }

    /// `kvh evidence` in a loop while `prune-log` moves many chains: every report is made,
    /// and verified (what a prune moved is accounted for by its manifest, not tampering).
    #[test]
    fn evidence_overlapping_a_prune_is_made_and_verified() {
        use crate::forensic::cli::VerifyLogArgs;
        use crate::forensic::evidence::{collect, EvidenceArgs};
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("log");
        let opts = opts();
        for _ in 0..15 {
            chain(&dir, 5, true);
        }
        // A chain still open keeps records in the log once the others are moved whole.
        let open = chain(&dir, 5, false);
        let key = tmp.path().join("hmac.key");
        std::fs::write(&key, SECRET).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        let args = EvidenceArgs::of(VerifyLogArgs {
            key_file: vec![key],
            allow_pruned: true,
            ..VerifyLogArgs::of(dir.clone())
        });
        let before = collect(&args).unwrap();
        assert!(before.integrity.verified, "{:?}", before.integrity.problems);
        let archive = archive(tmp.path());
        let done = std::sync::atomic::AtomicBool::new(false);
        let reports = std::thread::scope(|s| {
            s.spawn(|| {
                prune(&dir, &archive, &opts);
                done.store(true, std::sync::atomic::Ordering::SeqCst);
            });
            let mut reports = 0;
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                let ev = collect(&args).expect("a report overlapping prune-log is made");
                assert!(
                    ev.integrity.verified,
                    "a report overlapping prune-log is not verified: {:?}",
                    ev.integrity.problems
                );
                reports += 1;
            }
            reports
        });
        assert!(reports > 0);
        std::mem::forget(open);
    }
}

/// "file 0 is missing", "files 0..4 are missing": the files before `first` (at least 1), the
/// range inclusive, as every other range this module reports.
fn missing_before(first: u64) -> String {
    match first {
        0 | 1 => "file 0 is missing".to_string(),
        _ => format!("files 0..{} are missing", first - 1),
    }
}

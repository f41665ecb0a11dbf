//! The passes of `kvh tail-log` between two verifications of the whole directory: what a
//! whole verification leaves them ([`Verified`]: each chain's seal, the chains without
//! records, the prune manifests and moved chains' checkpoints as they were, when the next
//! whole one is due), and the pass itself ([`appended_pass`]), which reads only the records
//! appended after each chain's position, each checked as `verify-log`'s walk checks it, and
//! gives way to a whole pass whenever it cannot vouch for what it finds.

use std::collections::BTreeMap;
use std::io::{Read as _, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::batch::{Batches, Scout, Take, HOLD_BYTES};
use super::{directory_gone, pass_on, Pass, PassError, Position, State, Stop};
use crate::forensic::checkpoint::Checkpoint;
use crate::forensic::files;
use crate::forensic::lines::{Line, Lines};
use crate::forensic::prune;
use crate::forensic::record::{hex, parse_hash};
use crate::forensic::scan::scan;
use crate::forensic::verify::{self, Accepted, ChainCheck, Report, VerifyOptions};

/// What the last verification of the whole directory leaves to the passes until the next.
#[derive(Debug, Default)]
pub(super) struct Verified {
    /// The chains it found with records, each with what seals it.
    keys: BTreeMap<String, Seal>,
    /// The chains it found without a record: moved whole by `prune-log`, or never started.
    without_records: std::collections::BTreeSet<String>,
    /// The seq and hash the signed checkpoint of each chain it found moved whole covers
    /// (`None`: none read), as it was then.
    moved: BTreeMap<String, Option<(u64, [u8; 32])>>,
    /// The stamp of every prune manifest of the directory, taken before it.
    manifests: BTreeMap<String, Stamp>,
    /// When the next one is due (`None`: before the first).
    next: Option<Instant>,
    /// Where each chain's position record starts, as the last pass that read it found it.
    starts: BTreeMap<String, Start>,
    /// How long the last one took, and how long after its start the next is due.
    took: Duration,
    gap: Duration,
}

impl Verified {
    /// Whether the next pass verifies the whole directory: the first, one that is due, and
    /// every pass after one whose records did not hash to the verified head (the stalls are
    /// counted in whole passes).
    pub(super) fn due(&self, state: &State) -> bool {
        self.next.is_none_or(|t| Instant::now() >= t) || !state.stalls.is_empty()
    }

    /// Takes in a whole verification of `report` that started at `started` and took `took`
    /// of CPU time, with what it was given to read (`seen`, taken before it).
    pub(super) fn record(
        &mut self,
        report: &Report,
        mut seen: Seen,
        started: Instant,
        took: Duration,
        every: Option<u64>,
    ) {
        self.keys.clear();
        self.without_records.clear();
        self.moved.clear();
        self.starts.clear();
        self.manifests = seen.manifests;
        for c in &report.chains {
            if c.last_seq.is_some() {
                let seal = Seal {
                    key_index: c.key_index,
                    signer: c.signer.clone(),
                };
                self.keys.insert(c.chain.clone(), seal);
                continue;
            }
            self.without_records.insert(c.chain.clone());
            if self.manifests.contains_key(&c.chain) {
                let ckpt = seen.checkpoints.remove(&c.chain);
                self.moved.insert(c.chain.clone(), ckpt);
            }
        }
        self.gap = every.map_or(took.saturating_mul(WHOLE_SHARE), Duration::from_secs);
        self.took = took;
        self.next = Some(started + self.gap);
    }

    /// What a following tail says of its whole verifications after the first, when they will
    /// not be made at every pass (`interval` seconds apart).
    pub(super) fn cadence(&self, interval: u64) -> Option<String> {
        (self.gap > Duration::from_secs(interval)).then(|| {
            format!(
                "the whole directory verified in {:.1} s of CPU time: verified whole again \
                 every {:.1} s (--verify-every); the passes between hold each chain's new \
                 records to the last one passed on",
                self.took.as_secs_f64(),
                self.gap.as_secs_f64()
            )
        })
    }
}

/// Where a chain's record `seq` starts: byte `byte` of file `file`. A pass between whole
/// verifications reads the file of a chain's position from there, when it is the position's
/// record, rather than from the file's start (a file grows to `max_bytes`, 64 MiB by default).
#[derive(Clone, Copy, Debug)]
struct Start {
    seq: u64,
    file: u64,
    byte: u64,
}

/// What a whole verification was given to read beside the chain files, taken before it.
pub(super) struct Seen {
    /// The stamp of each prune manifest, by chain.
    manifests: BTreeMap<String, Stamp>,
    /// The seq and hash each signed checkpoint covers, by chain.
    checkpoints: BTreeMap<String, (u64, [u8; 32])>,
}

impl Seen {
    /// What `dir` holds now beside its chain files, taken before a whole verification reads
    /// it: one replaced meanwhile then differs at the next pass, which is whole again.
    pub(super) fn before(dir: &Path, opts: &VerifyOptions) -> Seen {
        Seen {
            manifests: manifest_stamps(dir),
            checkpoints: checkpoint_heads(opts),
        }
    }
}

/// What seals a chain: the index of its HMAC secret among those given (`None`: MACs not
/// checked), and the checkpoint signer its records up to its position name.
#[derive(Clone, Debug)]
struct Seal {
    key_index: Option<usize>,
    signer: Option<String>,
}

/// A file as it is: identity, size and times. Any change to it (a write, a replacement, a
/// rename onto it, a change of mode) changes its stamp.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    /// `path`'s stamp, not following a symlink; `None` when nothing is there.
    fn of(path: &Path) -> Option<Stamp> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::symlink_metadata(path).ok()?;
        Some(Stamp {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        })
    }
}

/// The stamp of each prune manifest in `dir`, by chain (none when it cannot be listed).
fn manifest_stamps(dir: &Path) -> BTreeMap<String, Stamp> {
    let chains = prune::list_manifests(dir).unwrap_or_default();
    chains
        .into_iter()
        .filter_map(|c| Stamp::of(&prune::manifest_path(dir, &c)).map(|s| (c, s)))
        .collect()
}

/// The seq and hash each signed checkpoint given covers, by chain (none when they cannot be
/// read, or hold evidence a verification reports).
fn checkpoint_heads(opts: &VerifyOptions) -> BTreeMap<String, (u64, [u8; 32])> {
    let ckpts = verify::signed_checkpoints(opts).ok().flatten();
    ckpts
        .unwrap_or_default()
        .into_iter()
        .map(|(chain, c)| (chain, (c.seq, c.hash)))
        .collect()
}

/// CPU time this process has used: what a whole verification costs, without the time it
/// waits (a slow volume, a writer's first checkpoint).
pub(super) fn cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec to the valid, exclusively borrowed `ts`.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return Duration::ZERO;
    }
    let secs = u64::try_from(ts.tv_sec).unwrap_or(0);
    let nanos = u32::try_from(ts.tv_nsec).unwrap_or(0);
    Duration::new(secs, nanos)
}

/// By default whole verifications take at most one part in this many of the tail's time.
const WHOLE_SHARE: u32 = 10;

/// What a pass between whole verifications did.
pub(super) enum Appended {
    /// It passed on what was appended; whether `state` changed.
    Done(bool),
    /// It cannot vouch for the directory as it finds it: a whole pass judges it. `wrote`:
    /// records of chains read before it gave way were passed on (their positions moved).
    Whole { wrote: bool },
}

/// A pass between whole verifications. For each chain with a position it reads the records
/// appended after it, each held to the walk `verify-log` makes ([`read_appended`]), and
/// passes them on once every chain's were. [`Appended::Whole`], with nothing written, when it
/// cannot vouch for the directory as it finds it (a chain new or gone, a position's record
/// missing or changed, a record that does not follow): a whole verification then judges it.
/// The lines read are held up to [`HOLD_BYTES`] for all the chains together; a chain's that
/// do not fit are read again and written a batch at a time, each batch once its last record
/// is the one the first reading found there, and the pass gives way to a whole one (with the
/// batches written passed on) if one is not.
pub(super) fn appended_pass(
    dir: &Path,
    how: &Pass<'_>,
    state: &mut State,
    verified: &mut Verified,
) -> Result<Appended, PassError> {
    const WHOLE: Appended = Appended::Whole { wrote: false };
    if let Some(stop) = directory_gone(dir, state) {
        return Err(PassError::Stop(stop));
    }
    // Read before the files are listed, as a verification reads them: a checkpoint covers
    // only records already on disk.
    let io = |e: verify::VerifyError| PassError::Io(e.to_string());
    let Some(ckpts) = verify::signed_checkpoints(how.opts).map_err(io)? else {
        return Ok(WHOLE);
    };
    let files = verify::list_all(dir, how.opts).map_err(io)?;
    // Any prune manifest written, replaced or removed since (a prune ran, or anything else):
    // a whole pass judges them.
    if manifest_stamps(dir) != verified.manifests {
        return Ok(WHOLE);
    }
    // Chains not listed: only those moved whole, as verified, their signed checkpoints
    // untouched.
    let listed = |id: &String| files.iter().any(|(c, _)| c == id);
    let moved_whole = |id: &String| {
        verified
            .moved
            .get(id)
            .is_some_and(|ckpt| *ckpt == ckpts.get(id).map(|c| (c.seq, c.hash)))
    };
    let mut unlisted = state.chains.keys().chain(ckpts.keys());
    if unlisted.any(|id| !listed(id) && !moved_whole(id)) {
        return Ok(WHOLE);
    }
    let mut room = HOLD_BYTES;
    let mut reads = Vec::with_capacity(files.len());
    for (id, list) in &files {
        match (state.chains.get(id), verified.keys.get(id)) {
            (Some(from), Some(seal)) => {
                let ckpt = ckpts.get(id);
                if ckpt.is_none() && !how.opts.public_keys.is_empty() {
                    return Ok(WHOLE);
                }
                let start = verified.starts.get(id).copied();
                let walk = Walk {
                    id,
                    list,
                    from,
                    seal,
                    ckpt,
                    opts: how.opts,
                    start,
                };
                let mut scout = Scout::new(room);
                let Some((to, at, signer)) = read_appended(&walk, &mut scout, None) else {
                    return Ok(WHOLE);
                };
                let new = scout.finish(to, None, from.file);
                room = room.saturating_sub(new.held());
                reads.push((id, list, from.clone(), new, at, signer));
            }
            // Still without a record (a chain being started, or one whose writer died
            // before its first): its file 0 alone, with no complete line and no checkpoint,
            // as verified.
            (None, None)
                if verified.without_records.contains(id)
                    && matches!(list.as_slice(), [(0, _)])
                    && !ckpts.contains_key(id)
                    && no_record(list) => {}
            _ => return Ok(WHOLE),
        }
    }
    let mut moved = false;
    let mut out = std::io::stdout().lock();
    for (id, list, from, new, at, signer) in reads {
        if new.is_empty() {
            // Nothing appended: only where the position's record starts, found now.
        } else if let Some(lines) = new.lines {
            pass_on(&mut out, id, lines, how.security_only, state)?;
            moved = true;
        } else {
            let Some(seal) = verified.keys.get(id) else {
                return Ok(Appended::Whole { wrote: moved });
            };
            let walk = Walk {
                id,
                list,
                from: &from,
                seal,
                ckpt: ckpts.get(id),
                opts: how.opts,
                start: verified.starts.get(id).copied(),
            };
            let until = new.to.seq;
            let mut batches = Batches::new(&mut out, id, how, state, new);
            let reached = read_appended(&walk, &mut batches, Some(until)).is_some();
            let (all, wrote) = batches.finish(reached)?;
            moved |= wrote;
            if !all {
                // Changed since the first reading. A position moved by the batches written
                // has no start nor signer recorded: the whole pass records them.
                out.flush()
                    .map_err(|e| PassError::Stop(Stop::Error(format!("cannot write: {e}"))))?;
                verified.next = None;
                return Ok(Appended::Whole { wrote: moved });
            }
        }
        verified.starts.insert(id.clone(), at);
        if let Some(seal) = verified.keys.get_mut(id) {
            seal.signer = signer;
        }
    }
    out.flush()
        .map_err(|e| PassError::Stop(Stop::Error(format!("cannot write: {e}"))))?;
    Ok(Appended::Done(moved))
}

/// Whether a chain's files hold no complete line (no record), and no more bytes than a
/// chain that never started may (`files::MAX_UNSTARTED_BYTES`, as `verify` holds it to): a
/// larger one is left to a whole verification.
fn no_record(list: &[(u64, PathBuf)]) -> bool {
    list.iter().all(|(_, path)| {
        files::open_regular(path, files::MAX_READ_BYTES).is_ok_and(|(file, len)| {
            if len > files::MAX_UNSTARTED_BYTES {
                return false;
            }
            let mut bytes = Vec::new();
            file.take(files::MAX_READ_BYTES)
                .read_to_end(&mut bytes)
                .is_ok_and(|_| !bytes.contains(&b'\n'))
        })
    })
}

/// What a reading of the records appended to chain `id` after the record at `from` reads:
/// the chain's files, what seals it, its signed checkpoint, and where the last pass found the
/// position's record.
struct Walk<'a> {
    id: &'a str,
    list: &'a [(u64, PathBuf)],
    from: &'a Position,
    seal: &'a Seal,
    ckpt: Option<&'a Checkpoint>,
    opts: &'a VerifyOptions,
    start: Option<Start>,
}

/// The records of chain `walk.id` appended after the record at `walk.from`, which must still
/// be in its file with the hash it had: each checked as the continuation of the chain from
/// there (as `verify-log` checks it, sealed by the secret at `key_index`), up to the last
/// complete line, or up to seq `until`, and handed to `take`. The last record's position,
/// where it starts, and the signer the records name; `None` when anything does not follow
/// (or `take` stopped the reading).
fn read_appended(
    walk: &Walk<'_>,
    take: &mut dyn Take,
    until: Option<u64>,
) -> Option<(Position, Start, Option<String>)> {
    use std::io::Seek as _;
    let Walk {
        id,
        list,
        from,
        seal,
        ckpt,
        opts,
        start,
    } = *walk;
    let hash = parse_hash(&from.hash)?;
    let newest = list.last().map(|(i, _)| *i);
    // One file listed twice (the log and an archive directory): the verification judges.
    if list.windows(2).any(|p| p[0].0 == p[1].0) {
        return None;
    }
    let mut check: Option<ChainCheck<'_>> = None;
    let mut to = from.clone();
    let mut last_start = None;
    // The files from the position's on, each the next index (none missing, none empty but
    // the newest): the first must be the position's own.
    let mut expected = from.file;
    'files: for (index, path) in list.iter().filter(|(i, _)| *i >= from.file) {
        if *index != expected {
            return None;
        }
        expected = index.checked_add(1)?;
        // No file after the one holding the chain's stop record.
        if check.as_ref().is_some_and(ChainCheck::closed) {
            return None;
        }
        // Opened as the verifier opens it: a FIFO or a symlink planted cannot hang or flood
        // the reading.
        let (mut file, _) = files::open_regular(path, files::MAX_READ_BYTES).ok()?;
        // The position's record where the last pass found it (it must be there still).
        let mut byte = start
            .filter(|s| (s.seq, s.file) == (from.seq, *index))
            .map_or(0, |s| s.byte);
        file.seek(std::io::SeekFrom::Start(byte)).ok()?;
        // Read as the verifier reads: a line longer than any reader holds (bytes planted
        // after a crashed chain's end, say) is measured, never held.
        let mut lines = Lines::new(file, files::MAX_READ_BYTES);
        let mut first_in_file = byte == 0;
        let mut any_line = false;
        loop {
            let line_start = byte;
            let next = lines.next_line().ok()?;
            byte += next.as_ref().map_or(0, Line::bytes);
            let line = match next {
                Some(Line::Whole(line)) => line,
                None => break,
                // A line still being written: only in the newest file, and not after the
                // chain's stop record.
                Some(Line::Torn(_) | Line::Overlong { ended: false, .. }) => {
                    let closed = check.as_ref().is_some_and(ChainCheck::closed);
                    if Some(*index) != newest || closed {
                        return None;
                    }
                    break;
                }
                // No record the verification passed is that long.
                Some(Line::Overlong { ended: true, .. }) => return None,
            };
            let first = std::mem::replace(&mut first_in_file, false);
            any_line = true;
            match check.as_mut() {
                Some(c) => {
                    let (seq, h) = c.record(*index, line, first).ok()?;
                    to = Position {
                        seq,
                        hash: hex(&h),
                        file: *index,
                    };
                    last_start = Some(Start {
                        seq,
                        file: *index,
                        byte: line_start,
                    });
                    if !take.take(line.to_vec(), to.clone(), None) {
                        return None;
                    }
                    // A second reading stops where the first one did: records appended
                    // since are the next pass's.
                    if until == Some(seq) {
                        break 'files;
                    }
                }
                // Up to the position's record, which must be in its file as it was passed on.
                None => {
                    let r = scan(line).ok()?;
                    let seq = r.seq?;
                    if seq < from.seq {
                        continue;
                    }
                    if seq != from.seq || r.hash != from.hash {
                        return None;
                    }
                    let at = Accepted {
                        seq,
                        hash,
                        file: *index,
                        stop: r.kind == Some("stop"),
                        rotate: r.ts.filter(|_| r.kind == Some("rotate")),
                    };
                    let signer = seal.signer.as_deref();
                    let c = ChainCheck::after(id, at, seal.key_index, signer, ckpt, opts).ok()?;
                    check = Some(c);
                    last_start = Some(Start {
                        seq,
                        file: *index,
                        byte: line_start,
                    });
                }
            }
        }
        check.as_ref()?;
        if !any_line && Some(*index) != newest {
            return None;
        }
    }
    let check = check?;
    check.checkpoint_signer().ok()?;
    let signer = check.signer().map(str::to_string);
    // A checkpoint beyond the records read: the verification judges (records cut off).
    if ckpt.is_some_and(|c| c.seq > to.seq) {
        return None;
    }
    Some((to, last_start?, signer))
}

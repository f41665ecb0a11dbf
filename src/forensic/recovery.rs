//! Crash recovery: finding a chain whose writer died and the state to continue it from.
//!
//! A live writer holds an exclusive `flock` on its active (newest) file and keeps the lock
//! on the previous file until the next one exists, so a file we manage to lock, that is
//! still its chain's newest, and whose last record is not `stop`, belongs to a dead writer.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use ed25519_dalek::VerifyingKey;
use serde_json::Value;

use super::checkpoint;
use super::files;
use super::keys::EpochKey;
use super::lines::{Line, Lines};
use super::record::{chain_hash_open, mac_hex_verifies, parse_hash};
use super::scan::scan;
use super::ForensicError;
use crate::fork_closed::ForkClosed;

/// A crashed chain, locked by us, ready to continue.
pub struct Adopted {
    pub chain: String,
    pub index: u64,
    pub path: PathBuf,
    /// Closed in a child forked while it is open: its lock, which a child keeps with the
    /// descriptor, would make the chain read as live after this process died.
    pub(crate) file: ForkClosed<File>,
    /// Length of the file up to its last whole record: where the continuation goes.
    pub len: u64,
    /// The bytes after `len`: a record the crash tore. They are still in the file: the
    /// continuation's first records are written over them (`ChainWriter::open`), so that a
    /// start-up that cannot write its `recovery` record, the only account of them, leaves
    /// them for the next one to count. Empty when the chain ended at a record's end.
    pub torn_tail: Vec<u8>,
    pub last_seq: u64,
    pub last_hash: [u8; 32],
    /// The crash came after the newest file was created and before its `rotate` record:
    /// the name of the previous file, which the continuation must link to first.
    pub link_from: Option<String>,
    /// Whether, just after `file` was opened and locked, `path` named another file while
    /// `file` still had links: a file system whose inode numbers do not stay put (or a
    /// rename racing that moment), where the writer cannot tell its file by them. Told then,
    /// before the file is read: a file removed, or moved away and replaced, while recovery
    /// reads it is a file gone, for the writer to notice.
    pub inodes_unreliable: bool,
}

/// Longest line of the newest file (each record is read to check that it leads to the last),
/// or torn tail, recovery holds to continue a chain: it runs in the inference process as it
/// starts. Far longer than any record of today's writer (its fields
/// are bounded by [`super::MAX_FIELD_BYTES`]) or than a torn piece of one; a chain ending in
/// a longer line (a record of an earlier version, or bytes someone appended) is left as it
/// ended, for verification to judge, and the process starts a chain of its own.
pub const MAX_CONTINUED_BYTES: usize = 4 << 20;

/// A chain file's lines as recovery reads them ([`MAX_CONTINUED_BYTES`] at most held).
fn continued_lines<R: Read>(reader: R, cap: u64) -> Lines<R> {
    Lines::new(reader, cap).with_max_line(MAX_CONTINUED_BYTES)
}

/// A chain file at `path`, opened as every chain file is, read as [`continued_lines`].
fn open_continued(path: &Path) -> io::Result<Lines<File>> {
    Lines::open(path).map(|l| l.with_max_line(MAX_CONTINUED_BYTES))
}

/// Where a dead writer's chain stands.
struct Head {
    tail: Tail,
    /// Index of the file holding `tail`.
    tail_index: u64,
    link_from: Option<String>,
    /// The signing key (hex) the chain's current writer named ([`Survey::signer`] of the
    /// file holding `tail`); `None` when its records name none.
    signer: Option<String>,
}

impl Head {
    /// Whether the file holding `tail` reads as one piece of the chain ending with it
    /// ([`file_links`]): the newest file's `complete` bytes (`file`, read from its start), or
    /// the previous file whole (`link_from`). Checked after the cheaper checks, since it
    /// hashes every line of the file.
    fn links(&self, chain: &str, file: &File, complete: u64, dir: &Path) -> bool {
        let head = match &self.link_from {
            Some(prev) => open_continued(&dir.join(prev))
                .ok()
                .and_then(|mut lines| file_links(&mut lines, chain, self.tail_index)),
            None => from_start(file).ok().and_then(|f| {
                file_links(
                    &mut continued_lines(f.take(complete), complete),
                    chain,
                    self.tail_index,
                )
            }),
        };
        head == Some((self.tail.seq, self.tail.hash))
    }
}

/// What one read of a chain file, a line at a time, finds of where it ends.
#[derive(Default)]
struct Survey {
    /// Bytes read: the file's length.
    len: u64,
    /// The last complete line, without its newline; `None` when the file has none, or when
    /// that line is longer than any record.
    last: Option<Vec<u8>>,
    /// Whether the file has a complete line at all.
    any_line: bool,
    /// The bytes after the last newline: a record the crash tore. `None` when they are
    /// longer than any record (not a torn record, and not held in memory).
    torn: Option<Vec<u8>>,
    /// The signer the file names last: the `signer` of its last `start`, `recovery`,
    /// `rotate` or `checkpoint` record that has one. A writer that signs names its key in
    /// the first record of every file it starts and in its `recovery` record, so in the file
    /// holding a chain's last record this is the chain's current signer. `None` when no
    /// record names one: its writer did not sign, or wrote before records named their
    /// signer. A chain that names another key (a rotated one) is not continued: with two
    /// signers in one chain, a holder of the old key could cut off what the new one signed
    /// and re-sign the end.
    signer: Option<String>,
}

impl Survey {
    /// Reads `lines` to the end. Scans each line only for its kind and signer; hashes
    /// nothing.
    fn of<R: Read>(mut lines: Lines<R>) -> io::Result<Survey> {
        let mut s = Survey {
            torn: Some(Vec::new()),
            ..Survey::default()
        };
        let mut last = Vec::new();
        let mut last_whole = false;
        while let Some(line) = lines.next_line()? {
            match line {
                Line::Whole(l) => {
                    last.clear();
                    last.extend_from_slice(l);
                    last_whole = true;
                    s.any_line = true;
                    if let Some(signer) = named_signer(l) {
                        s.signer = Some(signer);
                    }
                }
                Line::Overlong { ended: true, .. } => {
                    last_whole = false;
                    s.any_line = true;
                }
                Line::Torn(t) => s.torn = Some(t.to_vec()),
                Line::Overlong { ended: false, .. } => s.torn = None,
            }
        }
        s.len = lines.bytes_read();
        s.last = last_whole.then_some(last);
        Ok(s)
    }

    /// Length of the file up to its last newline.
    fn complete_len(&self) -> Option<u64> {
        let torn = self.torn.as_ref()?.len() as u64;
        Some(self.len - torn)
    }
}

/// `file`, read from its start.
fn from_start(mut file: &File) -> io::Result<&File> {
    file.seek(SeekFrom::Start(0))?;
    Ok(file)
}

/// The last complete record of the chain: in the newest file (`newest`, the survey of the
/// file numbered `index` at `path`), or, when that file holds no complete line yet, at the
/// end of the previous one (which rotation left complete).
///
/// Only a torn (newline-less) tail is ever cut. If the last complete line is not a
/// self-consistent record, the chain is not continued at all: a junk line is evidence for
/// `verify-log`, not something recovery may repair by cutting whole records.
fn chain_head(chain: &str, index: u64, newest: &Survey, path: &Path) -> Option<Head> {
    if newest.any_line {
        let tail = last_record(newest.last.as_deref()?, chain, index)?;
        return Some(Head {
            tail,
            tail_index: index,
            link_from: None,
            signer: newest.signer.clone(),
        });
    }
    // No newline at all: every byte of the newest file is the torn fragment of its first line.
    let prev_index = index.checked_sub(1)?;
    let prev_name = files::file_name(chain, prev_index);
    let prev = Survey::of(open_continued(&path.with_file_name(&prev_name)).ok()?).ok()?;
    if prev.complete_len() != Some(prev.len) {
        return None; // a rotated file always ends with a newline
    }
    let tail = last_record(prev.last.as_deref()?, chain, prev_index)?;
    Some(Head {
        tail,
        tail_index: prev_index,
        link_from: Some(prev_name),
        signer: prev.signer,
    })
}

/// How long a chain's first file must have gone unmodified before it counts as left by a
/// dead writer: a writer creates the file and locks it a few system calls later, so a file
/// we could lock and this old is nobody's.
const UNSTARTED_GRACE: std::time::Duration = std::time::Duration::from_millis(500);

/// How far ahead of the clock a chain's first file must be dated to count as left by a dead
/// writer before the clock stepped back: further than any file server's skew.
const UNSTARTED_AHEAD: std::time::Duration = std::time::Duration::from_secs(600);

/// Removes the first file of `chain`, locked by us, which holds no complete record: its
/// writer died before its `start` record was whole. Nothing of evidence is in it (no record,
/// no checkpoint), and left there it would read as a chain whose records and checkpoint were
/// deleted. A file modified within [`UNSTARTED_GRACE`] is left alone (its creator may not
/// have locked it yet). Failures leave the file: `verify-log` reports it.
fn remove_unstarted(dir: &Path, chain: &str, path: &Path, file: &File) {
    // A time far ahead of the clock is as old (the clock stepped back since); one a little
    // ahead may be a file just made, dated by a file server whose clock runs ahead.
    let idle = file
        .metadata()
        .and_then(|m| m.modified())
        .ok()
        .is_some_and(|t| match t.elapsed() {
            Ok(age) => age >= UNSTARTED_GRACE,
            Err(ahead) => ahead.duration() >= UNSTARTED_AHEAD,
        });
    if idle && std::fs::remove_file(path).is_ok() {
        let _ = files::sync_dir(dir);
        crate::say(format_args!(
            "kvhygiene: removed {}: the first file of chain {chain}, left without a complete \
             record by a writer that died as it started",
            path.display()
        ));
    }
}

/// Whether the last line of the chain file at `path` is a `stop` record, read from the file's
/// last 64 KiB (a `stop` record is far shorter). Unreadable, or no whole line there: false.
fn ends_with_stop(path: &Path) -> bool {
    use std::io::{Seek, SeekFrom};
    const WINDOW: u64 = 64 * 1024;
    let Ok((mut f, len)) = files::open_regular(path, files::MAX_READ_BYTES) else {
        return false;
    };
    let mut tail = Vec::new();
    let read = f
        .seek(SeekFrom::Start(len.saturating_sub(WINDOW)))
        .and_then(|_| f.take(WINDOW).read_to_end(&mut tail));
    if read.is_err() || tail.last() != Some(&b'\n') {
        return false;
    }
    let body = &tail[..tail.len() - 1];
    let line = match last_newline(body) {
        Some(i) => &body[i + 1..],
        None if len <= WINDOW => body,
        None => return false,
    };
    scan(line).is_ok_and(|r| r.kind == Some("stop"))
}

fn last_newline(bytes: &[u8]) -> Option<usize> {
    bytes.iter().rposition(|&b| b == b'\n')
}

/// The checks [`adopt`] makes of a log directory's files before it looks for a chain to
/// continue: the newest file of every chain is opened as a chain file to continue (regular,
/// ours, 0600, no symlink), and a refusal stops the start-up, whichever chain it would have
/// continued. Reads, locks and changes nothing; returns the number of chains (`kvh
/// preflight` makes the same check).
pub fn check_chain_files(dir: &Path) -> Result<usize, ForensicError> {
    let chains = files::list_chains(dir).map_err(|e| files::io_err(dir, "cannot list", e))?;
    for (_, list) in &chains {
        if let Some((_, path)) = list.last() {
            match files::open_existing(path) {
                Ok(_) => {}
                // Gone since the listing (`prune-log` moved its chain): not refused.
                Err(_) if files::is_missing(path) => {}
                // Immutable or read-only: never continued, left as it ended (`adopt`).
                Err(_) if files::unwritable_chain_file(path).is_some() => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(chains.len())
}

/// Finds and locks a crashed chain in `dir` that the key (or its absence) can continue, and
/// whose writer signed with `signer` (the public key; `None`: no signing key) or did not
/// sign, so that a chain is signed by one key at most. Files with a wrong owner or mode, or planted
/// symlinks, are refused with an error. `ckpt_dir` is where the chains' checkpoints are: a
/// chain whose checkpoint is ahead of (or disagrees with) what is on disk lost records and is
/// left for `verify-log` to report.
pub fn adopt(
    dir: &Path,
    ckpt_dir: &Path,
    key: Option<&mut EpochKey>,
    signer: Option<&VerifyingKey>,
) -> Result<Option<Adopted>, ForensicError> {
    // As the records name it.
    let signer_hex = signer.map(|k| super::record::hex(k.as_bytes()));
    let signer_hex = signer_hex.as_deref();
    // Every chain first: whether a refused file stops the start-up must not depend on which
    // chain sorts first, nor differ from what `kvh preflight` found.
    check_chain_files(dir)?;
    let chains = files::list_chains(dir).map_err(|e| files::io_err(dir, "cannot list", e))?;
    let mut key = key;
    let mut probes = Probes::default();
    for (chain, list) in chains.iter().rev() {
        let Some((index, path)) = list.last() else {
            continue;
        };
        let file = match ForkClosed::open(|| files::open_existing(path)) {
            Ok(f) => f,
            Err(_) if files::is_missing(path) => continue,
            Err(e) => match files::unwritable_chain_file(path) {
                Some(why) => {
                    // A chain that ended (`stop`) is never continued anyway: said only of one
                    // a process may have meant to continue.
                    if !ends_with_stop(path) {
                        crate::say(format_args!(
                            "kvhygiene: {}: chain {chain} is {why}; it is left as it ended \
                             and not continued",
                            path.display()
                        ));
                    }
                    continue;
                }
                None => return Err(e),
            },
        };
        // A chain that ended is never continued: told by its last line (64 KiB at most),
        // not by reading its newest file whole, which a directory of earlier processes'
        // chains would cost at every start-up.
        if ends_with_stop(path) {
            continue;
        }
        if !files::try_lock(&file) {
            continue; // a live writer
        }
        // A writer rotating right now creates its next file before unlocking this one: the
        // file must still be the chain's newest (one look at the next name, not a listing
        // of the directory per chain).
        let next = path.with_file_name(files::file_name(chain, index.saturating_add(1)));
        if std::fs::symlink_metadata(&next).is_ok() || files::is_missing(path) {
            continue;
        }
        let inodes_unreliable = names_another_file(path, &file);
        // A line at a time: the newest file may be as large as the rotation size, and this
        // runs in the inference process as it starts.
        let newest = Survey::of(continued_lines(&*file, u64::MAX))
            .map_err(|e| files::io_err(path, "cannot read", e))?;
        if *index == 0 && !newest.any_line {
            // Only what could be a torn `start` record, of a chain no checkpoint covers: a
            // file whose newlines were stripped is evidence, left for verification to report.
            let covered = !matches!(
                checkpoint::peek(&checkpoint::path_for(ckpt_dir, chain)),
                Ok(None)
            );
            if newest.len <= files::MAX_UNSTARTED_BYTES && !covered {
                remove_unstarted(dir, chain, path, &file);
            }
            continue;
        }
        // Bytes after the last newline longer than any record are not a torn record: the
        // chain is left as it ended, for verification to judge.
        let (Some(len), Some(torn_tail)) = (newest.complete_len(), &newest.torn) else {
            continue;
        };
        let Some(head) = chain_head(chain, *index, &newest, path) else {
            continue;
        };
        // The newest file holds no complete record: its writer created it at a rotation. It
        // died then only if it no longer holds the previous file, whose lock a live writer
        // keeps until it has locked the new one (a few system calls after creating it).
        if let Some(prev) = &head.link_from {
            let prev_path = path.with_file_name(prev);
            // Opened to read: the lock is all that is asked of it, and a finished file made
            // read-only since (mode 0400, `chattr +i`) is no sign of a live writer.
            let prev_free =
                files::open_regular(&prev_path, u64::MAX).is_ok_and(|(f, _)| files::try_lock(&f));
            if !prev_free {
                continue; // a live writer between creating its next file and locking it
            }
        }
        if !continuable(
            &head.tail.record,
            head.tail_index,
            key.as_deref_mut(),
            &mut probes,
        )? {
            continue;
        }
        // A chain that names a signer is continued only by that signer. One that names none
        // may gain one (if sealed: an unsealed one, below, only at that signer's own
        // checkpoint): if its writer did not sign, it has no checkpoint an old key could
        // stand in for (and one before the signer is named fails verification); if its
        // writer signed before records named signers, its checkpoint names no key, and
        // until our checkpoint replaces it verifiers report the chain as not bound.
        if head.signer.is_some() && head.signer.as_deref() != signer_hex {
            continue;
        }
        if !checkpoint_agrees(dir, ckpt_dir, chain, &head.tail) {
            continue;
        }
        // Without an HMAC key nothing shows who wrote a record: a signing writer continues
        // an unsealed chain only up to where its own signed checkpoint already vouches, lest
        // its next checkpoint vouch for records it cannot tell from forged ones (a whole
        // chain planted in the log directory, or records rewritten after the last
        // checkpoint). Such a chain is left as it ended: its records after the checkpoint
        // are reported as such by the verifiers.
        let vouched = |signer| own_checkpoint_at(ckpt_dir, chain, &head.tail, signer);
        if key.is_none() && signer.is_some_and(|k| !vouched(k)) {
            continue;
        }
        // The next record's seq would not fit (a planted record's seq; a writer never gets
        // there).
        if head.tail.seq == u64::MAX {
            continue;
        }
        if !head.links(chain, &file, len, dir) {
            continue;
        }
        // The links were read from the start: the writer appends (O_APPEND), but a write
        // made while appending is off must not land on records, so the offset goes back to
        // the end, where reading the whole file had left it.
        (&*file)
            .seek(SeekFrom::End(0))
            .map_err(|e| files::io_err(path, "cannot seek", e))?;
        // A torn tail is written over in place, with appending turned off for a moment; a
        // file with nothing torn is only appended to, so an append-only file (`chattr +a`)
        // that ended at a record's end is still continued. One with a torn tail refuses the
        // overwrite (EPERM): it is left as it ended, torn tail and all, which verification
        // accepts of a chain no process continued; the start-up goes on with another chain
        // or a new one.
        if !torn_tail.is_empty() {
            match files::set_append(&file, false).and_then(|()| files::set_append(&file, true)) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                    crate::say(format_args!(
                        "kvhygiene: {}: chain {chain} ended with a torn record that cannot be \
                         cut or written over ({e}: an append-only file); it is left as it ended \
                         and not continued",
                        path.display()
                    ));
                    continue;
                }
                Err(e) => return Err(files::io_err(path, "cannot write over the torn tail", e)),
            }
        }
        if let Some(k) = key.as_deref_mut() {
            k.advance_to(*index);
        }
        return Ok(Some(Adopted {
            chain: chain.clone(),
            index: *index,
            path: path.clone(),
            file,
            len,
            torn_tail: torn_tail.clone(),
            last_seq: head.tail.seq,
            last_hash: head.tail.hash,
            link_from: head.link_from,
            inodes_unreliable,
        }));
    }
    Ok(None)
}

/// Whether the checkpoint of `chain` in `ckpt_dir` is signed by `signer` and covers `tail`,
/// the chain's last whole record: either it is at `tail`, or `tail` is the `checkpoint`
/// record a writer appends right after signing, which holds nothing the signed checkpoint
/// does not fix but its time. Every record to be continued is then one that signer vouched
/// for already.
fn own_checkpoint_at(ckpt_dir: &Path, chain: &str, tail: &Tail, signer: &VerifyingKey) -> bool {
    let Ok(c) = checkpoint::read(&checkpoint::path_for(ckpt_dir, chain), &[*signer]) else {
        return false;
    };
    if c.chain != chain {
        return false;
    }
    if c.seq == tail.seq {
        return c.hash == tail.hash;
    }
    let r = &tail.record;
    let text = |field: &str| r.get(field).and_then(Value::as_str);
    c.seq.checked_add(1) == Some(tail.seq)
        && text("kind") == Some("checkpoint")
        && text("prev").and_then(parse_hash) == Some(c.hash)
        && r.get("ckpt_seq").and_then(Value::as_u64) == Some(c.seq)
        && text("ckpt_file") == Some(c.file.as_str())
        && text("signer") == Some(super::record::hex(signer.as_bytes()).as_str())
}

/// The signer `line` names, when it is a `start`, `recovery`, `rotate` or `checkpoint`
/// record that names one ([`Survey::signer`]).
fn named_signer(line: &[u8]) -> Option<String> {
    scan(line)
        .ok()
        .filter(|r| matches!(r.kind, Some("start" | "recovery" | "rotate" | "checkpoint")))
        .and_then(|r| r.signer.map(str::to_string))
}

/// Whether the chain's existing checkpoint (if any) is consistent with its last good record:
/// its seq must not be beyond it and the record at its seq must have its hash. Continuing a
/// chain behind its checkpoint would let our own (later) checkpoint hide the loss.
/// An unreadable or malformed checkpoint counts as disagreement.
fn checkpoint_agrees(dir: &Path, ckpt_dir: &Path, chain: &str, tail: &Tail) -> bool {
    let path = checkpoint::path_for(ckpt_dir, chain);
    let (seq, hash, file) = match checkpoint::peek(&path) {
        Ok(None) => return true,
        Ok(Some(c)) => (c.seq, c.hash, c.file),
        Err(_) => return false,
    };
    if seq > tail.seq {
        return false;
    }
    if seq == tail.seq {
        return hash == tail.hash;
    }
    let own_file = files::parse_file_name(&file).is_some_and(|f| f.chain == chain);
    own_file && hash_at(&dir.join(&file), seq) == Some(hash)
}

/// The hash of record `seq` in a chain file, if it holds it.
pub(crate) fn hash_at(path: &Path, seq: u64) -> Option<[u8; 32]> {
    let mut lines = Lines::open(path).ok()?;
    while let Some(line) = lines.next_line().ok()? {
        let (Line::Whole(l) | Line::Torn(l)) = line else {
            continue;
        };
        match scan(l) {
            Ok(r) if r.seq == Some(seq) => return parse_hash(r.hash),
            _ => {}
        }
    }
    None
}

struct Tail {
    record: Value,
    seq: u64,
    hash: [u8; 32],
}

/// `line`, the last complete line of the file of `chain` numbered `index`, if it is a
/// canonical record of that file whose hash recomputes from its `prev` and body. Whether the
/// whole file leads to it is [`Head::links`].
fn last_record(line: &[u8], chain: &str, index: u64) -> Option<Tail> {
    let r = scan(line).ok()?;
    let prev = parse_hash(r.prev?)?;
    let hash = parse_hash(r.hash)?;
    if r.chain != Some(chain)
        || r.epoch != Some(index)
        || chain_hash_open(&prev, r.body_open) != hash
    {
        return None;
    }
    let seq = r.seq?;
    let record: Value = serde_json::from_slice(line).ok()?;
    Some(Tail { record, seq, hash })
}

/// The seq and hash of the last of `lines` (a chain file read to its end, which must end
/// with a newline) when every line is a canonical record of the chain's file `index` (its `chain`,
/// its `epoch`) whose hash recomputes from its `prev` and body, the first is the `start`
/// (file 0) or `rotate` record a file begins with, and each one after follows the one
/// before it (`seq` one more, `prev` its hash). Whole sealed records appended after the
/// chain's end (another chain's, or the chain's own repeated, one or several) pass their own
/// hash and MAC checks but not these; a chain continued after them would put every new
/// record after lines that fail verification. The MAC is checked of the last line only
/// ([`continuable`]): forging a line before it would need one whose MAC verifies after it.
fn file_links<R: Read>(lines: &mut Lines<R>, chain: &str, index: u64) -> Option<(u64, [u8; 32])> {
    let mut head: Option<(u64, [u8; 32])> = None;
    while let Some(line) = lines.next_line().ok()? {
        let Line::Whole(line) = line else {
            return None; // longer than any record, or torn
        };
        let r = scan(line).ok()?;
        let prev = parse_hash(r.prev?)?;
        let hash = parse_hash(r.hash)?;
        let seq = r.seq?;
        if r.chain != Some(chain)
            || r.epoch != Some(index)
            || chain_hash_open(&prev, r.body_open) != hash
        {
            return None;
        }
        let follows = match head {
            None => r.kind == Some(if index == 0 { "start" } else { "rotate" }),
            Some((last_seq, last_hash)) => {
                last_seq.checked_add(1) == Some(seq) && last_hash == prev
            }
        };
        if !follows {
            return None;
        }
        head = Some((seq, hash));
    }
    head
}

/// The furthest a writer ratchets its key to continue a chain: 2^20 epochs, one HMAC each
/// (a fraction of a second in an optimised build). A chain file named with a larger index (4 GiB of one chain at the
/// smallest rotation size, 64 TiB at the default) is not continued, so a file planted with
/// an index near 2^64 cannot hold the writer's start-up in the ratchet for days; the
/// writer starts a chain of its own instead.
const MAX_ADOPTED_EPOCH: u64 = 1 << 20;

/// Epochs between the probe keys [`Probes`] keeps.
const PROBE_STRIDE: u64 = 256;

/// The keys one start-up's probes reached, every [`PROBE_STRIDE`] epochs from the writer's
/// key: each chain is probed from the nearest one below its epoch, so the ratchet is turned
/// at most [`MAX_ADOPTED_EPOCH`] times in all, plus a stride per chain, however many chains
/// (planted ones included) name far epochs. At most 2^12 keys, dropped (and zeroed) with it.
#[derive(Default)]
struct Probes {
    marks: std::collections::BTreeMap<u64, EpochKey>,
}

impl Probes {
    /// `key` ratcheted to `epoch` (not before `key`'s own epoch), from the nearest mark.
    /// Fails only when no memory can be mapped for a key.
    fn key_at(&mut self, key: &EpochKey, epoch: u64) -> Result<EpochKey, ForensicError> {
        let mut probe = match self.marks.range(key.epoch()..=epoch).next_back() {
            Some((_, mark)) => mark.clone_for_probe()?,
            None => key.clone_for_probe()?,
        };
        loop {
            let next_mark = (probe.epoch() / PROBE_STRIDE + 1) * PROBE_STRIDE;
            if next_mark > epoch {
                probe.advance_to(epoch);
                return Ok(probe);
            }
            probe.advance_to(next_mark);
            self.marks.insert(next_mark, probe.clone_for_probe()?);
        }
    }
}

/// A chain is continued only if it is not closed and its last MAC matches our key at that
/// record's epoch (or neither side uses a key): one writer never mixes secrets in a chain.
fn continuable(
    last: &Value,
    index: u64,
    key: Option<&mut EpochKey>,
    probes: &mut Probes,
) -> Result<bool, ForensicError> {
    if last.get("kind").and_then(Value::as_str) == Some("stop") {
        return Ok(false);
    }
    let mac = last.get("mac").and_then(Value::as_str);
    let hash = last
        .get("hash")
        .and_then(Value::as_str)
        .and_then(parse_hash);
    Ok(match (key, mac, hash) {
        (None, None, _) => true,
        (Some(k), Some(m), Some(h)) if k.epoch() <= index && index <= MAX_ADOPTED_EPOCH => {
            // Check with a scratch copy of the ratchet state: if the MAC does not match we
            // must keep our epoch-0 key for a fresh chain.
            let probe = probes.key_at(k, index)?;
            mac_hex_verifies(&probe, &h, m)
        }
        _ => false,
    })
}

/// Whether `path` (not followed) names another file than the open `file`, which still has
/// links. A name gone, or a file without links, is a file removed, not another file.
fn names_another_file(path: &Path, file: &File) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::symlink_metadata(path), file.metadata()) {
        (Ok(named), Ok(own)) => {
            own.nlink() > 0 && (named.dev(), named.ino()) != (own.dev(), own.ino())
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Probes of many chains at far epochs cost one walk of the ratchet and a stride each,
    /// and give the key the ratchet gives at each epoch.
    #[test]
    fn probes_share_the_ratchet_and_agree_with_it() {
        let key = EpochKey::from_secret(zeroize::Zeroizing::new(vec![9u8; 32])).unwrap();
        let mut probes = Probes::default();
        for epoch in [1000, 3, 700, 1000, 256, 255, 0, 2049] {
            let mut walked = key.clone_for_probe().unwrap();
            walked.advance_to(epoch);
            let probed = probes.key_at(&key, epoch).unwrap();
            assert_eq!(probed.epoch(), epoch);
            assert_eq!(probed.key_id(), walked.key_id(), "epoch {epoch}");
        }
        let marks: Vec<u64> = probes.marks.keys().copied().collect();
        assert_eq!(marks, (1..=8).map(|i| i * PROBE_STRIDE).collect::<Vec<_>>());
    }

    /// A record of a chain file named with a far index: its MAC is not checked (nor the key
    /// ratcheted towards it), so an open of the log is not held up.
    #[test]
    fn a_chain_file_with_a_far_index_is_not_continued_and_does_not_hold_up_the_open() {
        let record = serde_json::json!({
            "kind": "summary",
            "hash": "11".repeat(32),
            "mac": "22".repeat(32),
        });
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut key = EpochKey::from_secret(zeroize::Zeroizing::new(vec![7u8; 32])).unwrap();
            let _ = tx.send(continuable(
                &record,
                1 << 40,
                Some(&mut key),
                &mut Probes::default(),
            ));
        });
        let continued = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("the key was ratcheted towards a planted file's index")
            .unwrap();
        assert!(!continued);
    }
}

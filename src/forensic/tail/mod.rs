//! `kvh tail-log`: the records of a forensic log as they are written, each passed on only
//! once it has verified, for a log shipper or a SIEM.
//!
//! A whole pass verifies the directory as `verify-log` does (hashes, MACs, links, checkpoints),
//! then reads the records written since the last pass and writes them to stdout, exactly as
//! they are in the files, one per line. The bytes written are held to the chain's verified
//! head: each record's hash is computed again from its bytes and the previous hash, and the
//! last one must be the head the verification reached, so a file changed between the
//! verification and the reading is never passed on (it is read again at the next pass).
//!
//! A whole verification costs time in proportion to the log (a minute of one core for
//! 20 GiB), so on a large log the passes between two of them (`--verify-every`; by default
//! spaced so that they take a tenth of one core) only read what was appended: each chain's
//! records after the one last passed on, which must still be in its file with its hash, each
//! checked as `verify-log`'s walk checks it from there ([`verify::ChainCheck::after`]). Whatever such
//! a pass cannot vouch for (a chain new or gone, a record that does not follow) is left to a
//! whole pass made at once; what it does not look at (older records, a checkpoint's hold on
//! them) is checked by the next whole verification.
//!
//! A chain's backlog (a tail restarted after an outage) is passed on in bounded memory: the
//! records read are held only while they fit in `HOLD_BYTES`; past that the first reading
//! keeps where each batch ends, and they are read again and written a batch at a time, each
//! once it ends at the hash the first reading found there (`batch.rs`).
//!
//! Between passes the tail remembers where each chain was (seq and hash of the last record
//! passed on, in `--state` across runs), which adds two checks `verify-log` cannot make
//! without signed checkpoints: a chain that went back (records cut off its end, or the chain
//! rolled back to an earlier copy) and a chain whose files are gone. Either, like a chain that
//! no longer verifies, is reported on stderr and as a JSON line on stdout, and ends the tail
//! with exit status 1.
//!
//! A tail runs beside the writers, so it is started before them and stopped after them: it
//! waits for a log directory that does not exist yet (every chain then appears later and is
//! passed on whole), and SIGTERM or SIGINT ends it after one more pass, so that the records
//! written while the server shut down are passed on too.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::cli::{
    check_log_dir, options_but_dir, VerifyLogArgs, EXIT_OK, EXIT_TAMPERED, EXIT_USAGE,
};
use super::evidence::is_exception;
use super::files;
use super::keys::EpochKey;
use super::lines::{Line, Lines};
use super::record::{chain_hash_open, hex, mac_hex_verifies, parse_hash};
use super::scan::scan;
use super::unix_nanos;
use super::verify::{self, rfc3339, verify_all, ChainReport, Report, VerifyOptions};

mod appended;
mod batch;

use appended::{appended_pass, cpu_time, Appended, Seen, Verified};
use batch::{Batches, Gap, NewRecords, Scout, Take, HOLD_BYTES};

/// `kvh tail-log`: arguments.
#[derive(Clone, Debug, clap::Args)]
pub struct TailLogArgs {
    #[command(flatten)]
    pub log: VerifyLogArgs,
    /// Seconds between passes.
    #[arg(long, value_name = "SECS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub interval: u64,
    /// Pass on every record already in the log at the first pass (default: only those
    /// written after it). Chains that appear later are always passed on whole.
    #[arg(long)]
    pub from_start: bool,
    /// File keeping where each chain was, so that a restarted tail goes on where it stopped
    /// (none missed; a pass killed, or whose state could not be saved, after it wrote its
    /// records is passed on again: deduplicate on `chain` and `seq`) and still detects a
    /// chain that went back or vanished meanwhile. Written atomically (0600) after each pass
    /// that moved, and after each batch of a backlog passed on in batches (more than 8 MiB).
    /// It names its log directory (by its path while it does not exist yet): given with
    /// another one, it is refused (exit 2).
    /// So is a stdout that is /dev/null (or closed), which would mark records passed on that
    /// nobody received. Passed on means written to stdout: records still unread in a pipe
    /// when its reader died are not passed on again, so a shipper that can die with unread
    /// input reads from a file the tail appends to, not from a pipe. One tail per state
    /// file: a tail locks it for its whole run (through FILE.lock beside it, which is kept),
    /// and a second tail given it meanwhile is refused at once (exit 2).
    #[arg(long, value_name = "FILE")]
    pub state: Option<PathBuf>,
    /// Make one pass, then exit (0, or 1 on tampering): for a scheduled job, with --state.
    /// Without it the tail runs until SIGTERM or SIGINT, which end it after one more pass.
    #[arg(long)]
    pub once: bool,
    /// Pass on only security records (the exceptions `kvh evidence` lists), not every record.
    #[arg(long)]
    pub security_only: bool,
    /// Seconds between verifications of the whole directory (0: every pass). The passes
    /// between them hold each chain's new records to the record passed on before them (which
    /// must still be there, with its hash) as `verify-log` does: hashes, links, seqs, MACs,
    /// rotations, the signed checkpoint; a prune manifest changed brings a whole pass, and
    /// the older records are checked at the next whole verification. Default: as often as
    /// keeps them under a tenth of one core (every pass on a small log; about every 12
    /// minutes on 20 GiB).
    #[arg(long, value_name = "SECS",
          value_parser = clap::value_parser!(u64).range(0..=604_800))]
    pub verify_every: Option<u64>,
}

/// Where a chain was: its last record passed on (or, at a start from the end, its head).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Position {
    seq: u64,
    /// Hash of that record (hex).
    hash: String,
    /// Index of the file holding it: the next pass reads from there.
    file: u64,
}

/// What the tail remembers between passes (the `--state` file).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct State {
    /// The log directory the positions are in, once it existed: a state file given with
    /// another directory is refused, rather than every chain it remembers being reported as
    /// deleted. Absent in state files of earlier versions and before the directory existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    log_dir: Option<DirId>,
    /// Before the directory existed: the absolute path it was awaited at, so that a state
    /// file saved then is refused with another directory as well (`log_dir` replaces it once
    /// the directory exists). Absent in state files of earlier versions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    awaited_dir: Option<std::ffi::OsString>,
    chains: BTreeMap<String, Position>,
    /// Passes in a row whose bytes did not hash to the chain's verified head, per chain: kept
    /// across runs, so that scheduled `--once` runs count them too.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    stalls: BTreeMap<String, u32>,
}

/// A directory as the state file names it: by device and inode (the same directory through a
/// symlink, a bind mount or another spelling of its path is the same), with the path it was
/// given as, byte for byte, to look for it again and to name it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct DirId {
    dev: u64,
    ino: u64,
    path: std::ffi::OsString,
}

impl DirId {
    /// `dir`'s identity, `None` when it is not a directory that can be looked at now. The
    /// path kept is the canonical one: a relative path would name another directory from
    /// another working directory.
    fn of(dir: &Path) -> Option<DirId> {
        use std::os::unix::fs::MetadataExt;
        let md = std::fs::metadata(dir).ok().filter(|m| m.is_dir())?;
        let path = std::fs::canonicalize(dir).ok()?;
        Some(DirId {
            dev: md.dev(),
            ino: md.ino(),
            path: path.into_os_string(),
        })
    }

    fn same(&self, other: &DirId) -> bool {
        (self.dev, self.ino) == (other.dev, other.ino)
    }
}

/// Why the tail stops.
enum Stop {
    /// The log was tampered with: say so and exit 1. `chain` is `None` for evidence not
    /// tied to one chain (a forged checkpoint, a checkpoint whose chain's files are gone).
    Tampered {
        chain: Option<String>,
        reason: String,
    },
    /// Usage or I/O that cannot go on: exit 2.
    Error(String),
}

/// Runs `kvh tail-log`; returns the exit code (it returns only with `--once`, on tampering
/// or on an error).
pub fn run_tail_log(args: &TailLogArgs) -> i32 {
    // The `--state` file's lock, held until the tail has said how it ended.
    let mut lock = None;
    match tail(args, &mut lock) {
        Ok(()) => EXIT_OK,
        Err(Stop::Tampered { chain, reason }) => {
            // The reason may quote names and text planted in the directory: escaped on the
            // terminal (the JSON alert escapes them its own way).
            let shown = crate::printable(&reason);
            match &chain {
                Some(c) => crate::say(format_args!("kvh tail-log: TAMPERING: chain {c}: {shown}")),
                None => crate::say(format_args!("kvh tail-log: TAMPERING: {shown}")),
            }
            let alert = serde_json::json!({
                "kvh_tail_log": "tampering",
                "chain": chain,
                "reason": reason,
                "at": rfc3339(unix_nanos(std::time::SystemTime::now())),
            });
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{alert}").and_then(|()| out.flush());
            EXIT_TAMPERED
        }
        Err(Stop::Error(e)) => {
            crate::say(format_args!("kvh tail-log: {e}"));
            EXIT_USAGE
        }
    }
}

/// Ends the line an earlier run left cut short in its output (a write stopped part way by a
/// full disk or a file size limit: that run exited 2, and passes the record on again whole),
/// so that this run's first line, a tampering alert included, is a line of its own and not
/// glued to the fragment. Only for an output that is a regular file (appended to, as the help
/// suggests): its last byte is read through the file opened again for reading (stdout is open
/// for writing only); a pipe or a terminal cannot be read back, and a file this process may
/// not read is left as it is.
fn end_a_line_cut_short_in_the_output() -> Result<(), String> {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    // The file stdout is, by its /proc link: a pipe or a terminal is not opened.
    const STDOUT: &str = "/proc/self/fd/1";
    if !std::fs::metadata(STDOUT).is_ok_and(|m| m.is_file() && m.len() > 0) {
        return Ok(());
    }
    let Ok(file) = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(STDOUT)
    else {
        return Ok(());
    };
    let Ok(meta) = file.metadata() else {
        return Ok(());
    };
    let mut last = [0u8; 1];
    let cut = meta.is_file()
        && meta.len() > 0
        && file.read_exact_at(&mut last, meta.len() - 1).is_ok()
        && last[0] != b'\n';
    if !cut {
        return Ok(());
    }
    let mut out = std::io::stdout().lock();
    out.write_all(b"\n")
        .and_then(|()| out.flush())
        .map_err(|e| format!("cannot end the line an earlier run cut short in the output: {e}"))
}

/// The tail; `lock` receives the `--state` file's lock, for the caller to hold until the end.
fn tail(args: &TailLogArgs, lock: &mut Option<StateLock>) -> Result<(), Stop> {
    if args.log.json {
        return Err(Stop::Error(
            "--json: tail-log always writes JSON lines (the records themselves)".into(),
        ));
    }
    // The keys and the other arguments first: a tail that would fail at its first pass must
    // not wait for the directory (nor write the state that says it started) with them.
    let mut opts = options_but_dir(&args.log).map_err(Stop::Error)?;
    end_a_line_cut_short_in_the_output().map_err(Stop::Error)?;
    // One line per pass is said below; the verifier's own progress would repeat every pass.
    opts.progress = false;
    let saved = match &args.state {
        Some(path) => {
            check_state_dir(path).map_err(Stop::Error)?;
            refuse_null_stdout(path).map_err(Stop::Error)?;
            // Before the state is read: one tail at a time reads it, passes on from it and
            // saves it.
            *lock = Some(lock_state(path).map_err(Stop::Error)?);
            remove_unfinished_saves(path);
            load_state(path).map_err(Stop::Error)?
        }
        None => None,
    };
    if let (Some(path), Some(theirs)) =
        (&args.state, saved.as_ref().and_then(|s| s.log_dir.as_ref()))
    {
        // Only when the state's directory is still there, and the one given is not it (or
        // does not exist: a mistyped name): a log directory that is gone, or whose chains
        // are, is judged as tampering below.
        let here = DirId::of(&args.log.dir);
        let theirs_still = DirId::of(Path::new(&theirs.path)).is_some_and(|t| t.same(theirs));
        if theirs_still && !here.as_ref().is_some_and(|h| h.same(theirs)) {
            return Err(Stop::Error(format!(
                "--state {} holds the positions of log directory {}, not of {}{}: give that \
                 directory, or another --state file for this one",
                path.display(),
                Path::new(&theirs.path).display(),
                args.log.dir.display(),
                if here.is_none() {
                    " (which does not exist)"
                } else {
                    ""
                }
            )));
        }
    }
    if let (Some(path), Some(theirs)) = (
        &args.state,
        saved
            .as_ref()
            .filter(|s| s.log_dir.is_none())
            .and_then(|s| s.awaited_dir.as_ref()),
    ) {
        if !same_awaited_dir(Path::new(theirs), &args.log.dir) {
            return Err(Stop::Error(format!(
                "--state {} was saved for log directory {} (which did not exist then), not \
                 {}: give that directory, or another --state file for this one",
                path.display(),
                Path::new(theirs).display(),
                args.log.dir.display()
            )));
        }
    }
    let stop = if args.once {
        // A scheduled pass keeps the signals' default action: killed is killed.
        None
    } else {
        Some(stop_on_signals().map_err(Stop::Error)?)
    };
    // A directory that does not exist yet is waited for, unless the state says chains were
    // passed on from it: a directory that held them and is gone is not "not yet".
    let mut appeared_later = false;
    let nothing_passed_on = saved.as_ref().is_none_or(|s| s.chains.is_empty());
    if nothing_passed_on && not_there_yet(&args.log.dir) && (stop.is_some() || args.state.is_some())
    {
        // Saved first: every chain of the directory will be new, and a restarted tail (or
        // the next scheduled run) must know it too. The file's presence also says the tail
        // has started (a start-up probe can wait for it before the writers start).
        if let Some(path) = &args.state {
            let awaited = State {
                awaited_dir: resolved(&args.log.dir).map(PathBuf::into_os_string),
                ..State::default()
            };
            save_state(path, &awaited).map_err(Stop::Error)?;
        }
        let Some(stop) = &stop else {
            // A scheduled run before the writers created the directory: a log with no chain
            // yet. (Without --state there would be nothing to remember it by: an error.)
            crate::say(format_args!(
                "kvh tail-log: log directory {} does not exist yet: nothing to pass on; the \
                 chains written in it will be passed on from their first record",
                args.log.dir.display()
            ));
            return Ok(());
        };
        wait_for_dir(&args.log.dir, args.interval, stop);
        if not_there_yet(&args.log.dir) {
            // Stopped before it appeared: nothing was written, nothing to pass on.
            return Ok(());
        }
        // Stopped or not, the first pass passes on what is there (a stop makes it the last
        // one).
        appeared_later = true;
    }
    let resumed = saved.is_some();
    let mut state = saved.unwrap_or_default();
    // Named now that the directory exists (a state saved before it did names none).
    state.log_dir = DirId::of(&args.log.dir).or(state.log_dir);
    if state.log_dir.is_some() {
        state.awaited_dir = None;
    }
    if let Some(gone) = directory_gone(&args.log.dir, &state) {
        return Err(gone);
    }
    check_log_dir(&args.log.dir).map_err(Stop::Error)?;
    // The first pass: from the state, from the start, or from the heads (nothing passed on).
    // Chains in a directory that appeared after the start are all new: passed on whole.
    let mut skip_existing = !resumed && !args.from_start && !appeared_later;
    let mut first = true;
    let mut said_error: Option<String> = None;
    let mut failed_passes: u32 = 0;
    let mut verified = Verified::default();
    loop {
        // Asked to stop before this pass began: it is the last one, and it passes on every
        // record written up to the signal.
        let last = stop.as_ref().is_some_and(|s| s.load(Ordering::SeqCst));
        let how = Pass {
            opts: &opts,
            skip_existing,
            security_only: args.security_only,
            verify_every: args.verify_every,
            // Saved only once the first pass placed the chains (see `ending`).
            state_file: args.state.as_deref().filter(|_| !skip_existing),
        };
        match pass(&args.log.dir, &how, &mut state, &mut verified) {
            Ok(moved) => {
                if skip_existing && args.once {
                    crate::say(format_args!(
                        "kvh tail-log: {}: {} chains verified; --once from their ends: nothing \
                         written before this pass is passed on (--from-start passes it on, \
                         --state remembers where this pass stopped)",
                        args.log.dir.display(),
                        state.chains.len(),
                    ));
                } else if skip_existing {
                    crate::say(format_args!(
                        "kvh tail-log: {}: {} chains verified; passing on the records written \
                         from now on, every {} s",
                        args.log.dir.display(),
                        state.chains.len(),
                        args.interval
                    ));
                }
                if first && !args.once {
                    if let Some(said) = verified.cadence(args.interval) {
                        crate::say(format_args!("kvh tail-log: {said}"));
                    }
                }
                skip_existing = false;
                said_error = None;
                failed_passes = 0;
                // Saved after the first pass even when nothing moved: the next run then goes
                // on from here (a chain that appears meanwhile is passed on whole), instead of
                // starting at the heads again.
                if moved || first {
                    if let Some(path) = &args.state {
                        save_state(path, &state).map_err(Stop::Error)?;
                    }
                }
                first = false;
            }
            // The directory could not be read this time (a volume remounting, say): said
            // once, tried again at the next pass; with --once, or in the last pass, it is
            // the run's result. An error that lasts MAX_FAILED_PASSES passes in a row while
            // the directory is there (a file or directory whose permissions were taken away,
            // a failing device) ends the tail: it must not run on for ever passing nothing
            // on, silent on stdout. A directory that is not there is waited for, as at the
            // start (one that held chains passed on is tampering, judged by the pass).
            Err(PassError::Io(e)) if !args.once && !last => {
                if !not_there_yet(&args.log.dir) {
                    failed_passes += 1;
                }
                if failed_passes >= MAX_FAILED_PASSES {
                    let e = format!("{e} ({MAX_FAILED_PASSES} passes in a row: giving up)");
                    return Err(ending(args, first && skip_existing, &state, Stop::Error(e)));
                }
                if said_error.as_deref() != Some(e.as_str()) {
                    crate::say(format_args!(
                        "kvh tail-log: {e} (trying again every {} s)",
                        args.interval
                    ));
                    said_error = Some(e);
                }
            }
            Err(PassError::Io(e)) => {
                return Err(ending(args, first && skip_existing, &state, Stop::Error(e)))
            }
            Err(PassError::Stop(stop)) => {
                return Err(ending(args, first && skip_existing, &state, stop))
            }
        }
        match &stop {
            Some(stop) if !last => sleep_unless_stopped(Duration::from_secs(args.interval), stop),
            _ => return Ok(()),
        }
    }
}

/// Ends the tail with `why`, saving the state first. What the passes already wrote stays
/// written: the positions move past it, so a run after the investigation (or a restart) does
/// not pass it on twice; so too for an output that failed (a full disk, a pipe closed): the
/// records written before the failure were passed on. Only a first pass from the heads
/// (`unplaced`) is not saved: it wrote nothing and placed nothing, and saved, its empty
/// state would read as "every chain is new" and the next run would pass the log on whole.
fn ending(args: &TailLogArgs, unplaced: bool, state: &State, why: Stop) -> Stop {
    if let (Some(path), false) = (&args.state, unplaced) {
        let _ = save_state(path, state);
    }
    why
}

/// Makes SIGTERM and SIGINT set the returned flag, which ends the tail after one more pass; a
/// second one ends the process at once, with the shell's status for that signal (128 + its
/// number), in case the last pass hangs on a stuck volume.
fn stop_on_signals() -> Result<Arc<AtomicBool>, String> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let flag = Arc::new(AtomicBool::new(false));
    for signal in [SIGTERM, SIGINT] {
        // The order matters: the shutdown action, registered first, sees the flag the first
        // signal set only from the second signal on.
        signal_hook::flag::register_conditional_shutdown(signal, 128 + signal, Arc::clone(&flag))
            .and_then(|_| signal_hook::flag::register(signal, Arc::clone(&flag)))
            .map_err(|e| format!("cannot handle signal {signal}: {e}"))?;
    }
    Ok(flag)
}

/// How often a sleeping tail looks at the stop flag: a stop is served within this time.
const STOP_POLL: Duration = Duration::from_millis(100);

/// Sleeps `total`, or less once `stop` is set.
fn sleep_unless_stopped(total: Duration, stop: &AtomicBool) {
    let mut left = total;
    while !left.is_zero() && !stop.load(Ordering::SeqCst) {
        let step = left.min(STOP_POLL);
        std::thread::sleep(step);
        left -= step;
    }
}

/// Whether `given` names the directory a state file awaited at `awaited` (what [`resolved`]
/// made of the path it was given as): the same path however it is spelled (relative, through
/// a symlink, with `..`), also while the directory does not exist yet. `awaited` is resolved
/// again too: a symlink that dangled then (a volume linked into place before it was
/// mounted) leads to its target now.
fn same_awaited_dir(awaited: &Path, given: &Path) -> bool {
    let Some(given) = resolved(given) else {
        return false;
    };
    given == awaited || resolved(awaited).is_some_and(|a| a == given)
}

/// `dir` as one absolute path for all its spellings, whether it exists or not: its deepest
/// existing ancestor resolved as `canonicalize` does (symlinks followed, `..` applied), and
/// the components below it, which exist nowhere yet and so hold no symlink, applied
/// lexically (`.` dropped, `..` the ancestor's parent). `None` when no ancestor can be
/// resolved (no working directory, say).
fn resolved(dir: &Path) -> Option<PathBuf> {
    use std::path::Component;
    let absolute = std::path::absolute(dir).ok()?;
    let parts: Vec<Component> = absolute.components().collect();
    (1..=parts.len()).rev().find_map(|existing| {
        let mut path = std::fs::canonicalize(parts[..existing].iter().collect::<PathBuf>()).ok()?;
        for part in &parts[existing..] {
            match part {
                Component::ParentDir => {
                    path.pop();
                }
                Component::Normal(name) => path.push(name),
                Component::CurDir | Component::RootDir | Component::Prefix(_) => {}
            }
        }
        Some(path)
    })
}

/// Tampering when the log directory itself is gone (removed or renamed) after chains were
/// passed on from it, as when their files are gone; looked at again after a moment first.
/// `None` while nothing was passed on from it, or while it is there.
fn directory_gone(dir: &Path, state: &State) -> Option<Stop> {
    if state.chains.is_empty() || !no_directory_at(dir) {
        return None;
    }
    std::thread::sleep(RECHECK_AFTER);
    no_directory_at(dir).then(|| Stop::Tampered {
        chain: None,
        reason: format!(
            "the log directory {} is gone, with the {} chain(s) passed on from it",
            dir.display(),
            state.chains.len()
        ),
    })
}

/// With `--state`, a stdout that is `/dev/null` (given as such, or a closed descriptor the
/// runtime put it on) would have every record marked as passed on, and none delivered.
fn refuse_null_stdout(state: &Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let null = std::fs::metadata("/dev/null").map(|m| m.rdev());
    // SAFETY: an all-zero `stat` is a valid value of the plain C struct; fstat overwrites it.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a valid, writable `stat`; descriptor 1 may be anything or nothing (then
    // fstat fails, and nothing is refused).
    let out = unsafe { libc::fstat(1, &mut st) } == 0;
    let char_device = st.st_mode & libc::S_IFMT == libc::S_IFCHR;
    if out && char_device && null.is_ok_and(|n| n == st.st_rdev) {
        return Err(format!(
            "stdout is /dev/null (or was closed): with --state {} every record would be marked \
             as passed on, and none delivered; send stdout to the collector",
            state.display()
        ));
    }
    Ok(())
}

/// Whether nothing is at `dir` yet: no such path, or a link to nothing (followed, as the tail
/// was given it: a link made before the directory it names is a directory not created yet).
/// A path through a file (`ENOTDIR`) is not: no directory can appear there.
fn not_there_yet(dir: &Path) -> bool {
    std::fs::metadata(dir).is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound)
}

/// Whether no directory is at `dir` any more: nothing there, or something else in its place
/// (a file, a link to nothing). Followed when it is a link, as the tail was given it. Other
/// errors (a volume that does not answer) are not taken as gone: the pass says them.
fn no_directory_at(dir: &Path) -> bool {
    match std::fs::metadata(dir) {
        Ok(m) => !m.is_dir(),
        Err(e) => {
            e.kind() == std::io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ENOTDIR)
        }
    }
}

/// Waits for the missing `dir` to exist, looking every `interval` seconds, or until `stop` is
/// set: a tail started beside a server starts before the server's first record creates the
/// directory.
fn wait_for_dir(dir: &Path, interval: u64, stop: &AtomicBool) {
    crate::say(format_args!(
        "kvh tail-log: log directory {} does not exist yet: waiting for it (looking every {interval} s); \
         its chains will be passed on from their first record",
        dir.display()
    ));
    while not_there_yet(dir) && !stop.load(Ordering::SeqCst) {
        sleep_unless_stopped(Duration::from_secs(interval), stop);
    }
}

enum PassError {
    Stop(Stop),
    Io(String),
}

fn tampered(chain: &str, reason: String) -> PassError {
    PassError::Stop(Stop::Tampered {
        chain: Some(chain.to_string()),
        reason,
    })
}

/// Passes in a row whose bytes did not hash to the verified head before a chain is reported:
/// a file changed between a verification and the reading is read again, but bytes that never
/// match what was verified are not a race.
const MAX_STALLS: u32 = 3;

/// How long before a verification that found a problem is made again.
const RECHECK_AFTER: Duration = Duration::from_millis(200);

/// How a pass runs.
struct Pass<'a> {
    opts: &'a VerifyOptions,
    /// The first pass from the heads: chains are placed at their heads, nothing passed on.
    skip_existing: bool,
    security_only: bool,
    /// `--verify-every`.
    verify_every: Option<u64>,
    /// `--state`, saved after each batch of a backlog read again in batches.
    state_file: Option<&'a Path>,
}

/// One pass: verifies the whole directory when that is due, else reads only what was
/// appended ([`appended_pass`], which leaves to a whole verification what it cannot vouch
/// for). Returns whether `state` changed.
fn pass(
    dir: &Path,
    how: &Pass<'_>,
    state: &mut State,
    verified: &mut Verified,
) -> Result<bool, PassError> {
    let mut wrote = false;
    if !verified.due(state) {
        match appended_pass(dir, how, state, verified)? {
            Appended::Done(moved) => return Ok(moved),
            // Records it wrote before it gave way moved the positions too: saved now, since
            // the whole pass may fail (an unreadable directory) and the run then end cleanly
            // without another save, which would pass them on again at the next run.
            Appended::Whole { wrote: w } => {
                wrote = w;
                if let (true, Some(path)) = (w, how.state_file) {
                    save_state(path, state).map_err(|e| PassError::Stop(Stop::Error(e)))?;
                }
            }
        }
    }
    Ok(whole_pass(dir, how, state, verified)? || wrote)
}

/// A pass that verifies the whole directory, checks it against `state`, writes the new
/// records of each chain to stdout and moves `state` past them. Returns whether `state`
/// changed.
fn whole_pass(
    dir: &Path,
    how: &Pass<'_>,
    state: &mut State,
    verified: &mut Verified,
) -> Result<bool, PassError> {
    if let Some(stop) = directory_gone(dir, state) {
        return Err(PassError::Stop(stop));
    }
    let opts = how.opts;
    let started = Instant::now();
    let cpu_before = cpu_time();
    // Taken before the verification reads the manifests and checkpoints: one replaced
    // meanwhile then differs at the next pass, which verifies the whole directory again.
    let seen = Seen::before(dir, opts);
    let mut report = verify_all(dir, opts).map_err(|e| PassError::Io(e.to_string()))?;
    let took = cpu_time().saturating_sub(cpu_before);
    if !report.ok() {
        // A directory listed while a writer creates its next file may show the new file and
        // miss the one before it (readdir is not a snapshot): a problem is tampering only if a
        // second verification finds one too.
        std::thread::sleep(RECHECK_AFTER);
        report = verify_all(dir, opts).map_err(|e| PassError::Io(e.to_string()))?;
    }
    if let Some(p) = report.first_problem() {
        let chain = report
            .chains
            .iter()
            .find(|c| c.problem.is_some())
            .map_or_else(String::new, |c| c.chain.clone());
        return Err(tampered(&chain, format!("the log no longer verifies: {p}")));
    }
    // Evidence not tied to one chain (`verify-log` exits 1 on it too).
    if let Some(e) = report.errors.first() {
        return Err(PassError::Stop(Stop::Tampered {
            chain: None,
            reason: format!("the log no longer verifies: {e}"),
        }));
    }
    check_against(&report, state)?;
    // Counts of chains no longer read (moved whole, gone) would keep every pass whole.
    let counted = state.stalls.len();
    state.stalls.retain(|id, _| {
        report
            .chains
            .iter()
            .any(|c| &c.chain == id && c.last_seq.is_some())
    });
    let mut moved = state.stalls.len() != counted;
    let files = verify::list_all(dir, opts).map_err(|e| PassError::Io(e.to_string()))?;
    // Taken in only once this pass can read the chains: a pass that stops before leaves the
    // next one whole too.
    verified.record(&report, seen, started, took, how.verify_every);
    let mut out = std::io::stdout().lock();
    for chain in &report.chains {
        let (Some(head_seq), Some(head_hash)) = (chain.last_seq, chain.last_hash.as_deref()) else {
            // No record left: a chain `prune-log` moved whole. What was not passed on of it
            // is named, and its position moves to its end.
            if let Some(to) = moved_whole(chain, state.chains.get(&chain.chain), how, &mut out)? {
                state.chains.insert(chain.chain.clone(), to);
                moved = true;
            }
            continue;
        };
        let list = files
            .iter()
            .find(|(id, _)| *id == chain.chain)
            .map_or(&[][..], |(_, l)| l.as_slice());
        let from = state.chains.get(&chain.chain).cloned();
        if from.as_ref().is_some_and(|p| p.seq >= head_seq) {
            continue;
        }
        if how.skip_existing && from.is_none() {
            // The file the verification found the head in: the writer may have rotated since.
            let file = chain.last_file.unwrap_or(0);
            state.chains.insert(
                chain.chain.clone(),
                Position {
                    seq: head_seq,
                    hash: head_hash.to_string(),
                    file,
                },
            );
            moved = true;
            continue;
        }
        // Passed on, whole or in part (the positions moved), or counted as a stall.
        moved = true;
        if pass_chain(&mut out, chain, list, from.as_ref(), how, state)? {
            state.stalls.remove(&chain.chain);
            continue;
        }
        // Changed since the verification: read again at the next pass, a few times.
        let n = state.stalls.entry(chain.chain.clone()).or_default();
        *n += 1;
        if *n >= MAX_STALLS {
            return Err(tampered(
                &chain.chain,
                format!(
                    "in {MAX_STALLS} passes in a row the bytes read did not hash to the head \
                     the verification reached (seq {head_seq}): the files are not the ones \
                     verified"
                ),
            ));
        }
    }
    out.flush()
        .map_err(|e| PassError::Stop(Stop::Error(format!("cannot write: {e}"))))?;
    Ok(moved)
}

/// Reads the records of `chain` after `from` up to its verified head and writes them (all, or
/// the security ones) to `out`, moving its position in `state` past each one as it is
/// written: at once when they fit in [`HOLD_BYTES`], else read again and written a batch at a
/// time ([`Batches`]). Returns whether they were all passed on: else the bytes read did not
/// hash to the head, and what was not passed on is read again at the next pass.
fn pass_chain<W: Write>(
    out: &mut W,
    chain: &ChainReport,
    list: &[(u64, PathBuf)],
    from: Option<&Position>,
    how: &Pass<'_>,
    state: &mut State,
) -> Result<bool, PassError> {
    let new = match read_new(chain, list, from, how.opts, HOLD_BYTES)? {
        Read::New(new) => new,
        Read::Changed => return Ok(false),
    };
    let Some(lines) = new.lines else {
        let start_file = new.start_file;
        let mut batches = Batches::new(out, &chain.chain, how, state, new);
        let reached = read_from(chain, list, from, how.opts, start_file, &mut batches)?;
        return batches.finish(reached.is_some()).map(|(all, _)| all);
    };
    if let Some((first, last)) = new.gap {
        say_gap(out, &chain.chain, first, last)?;
    }
    pass_on(out, &chain.chain, lines, how.security_only, state)?;
    state.chains.insert(chain.chain.clone(), new.to);
    Ok(true)
}

/// Writes the records `lines` of `chain` (all, or the security ones) to `out`, moving its
/// position in `state` past each one as it is written.
fn pass_on(
    out: &mut impl Write,
    chain: &str,
    lines: Vec<(Vec<u8>, Position)>,
    security_only: bool,
    state: &mut State,
) -> Result<(), PassError> {
    for (line, at) in lines {
        if !security_only || security_line(&line) {
            // One write per line (the record and its newline), so that a failure is at a
            // line's boundary unless the write itself is cut short (a full disk): the line is
            // then passed on again, whole, by the next run.
            let mut whole = line;
            whole.push(b'\n');
            if let Err(e) = out.write_all(&whole).and_then(|()| out.flush()) {
                // The records written before stay passed on: the position moves past them
                // (and is saved), so that no run passes them on again.
                return Err(PassError::Stop(Stop::Error(format!("cannot write: {e}"))));
            }
        }
        state.chains.insert(chain.to_string(), at);
    }
    Ok(())
}

/// Writes the line that names records `first ..= last` of `chain`, moved by `prune-log` before
/// they were passed on (said on stderr too): they are in its archive, not skipped silently.
fn say_gap(out: &mut impl Write, chain: &str, first: u64, last: u64) -> Result<(), PassError> {
    let line = serde_json::json!({
        "kvh_tail_log": "gap",
        "chain": chain,
        "first_seq": first,
        "last_seq": last,
        "reason": "moved by kvh prune-log before they were passed on: read them in its archive \
                   (kvh verify-log --archive-dir)",
    });
    crate::say(format_args!(
        "kvh tail-log: chain {chain}: records {first} to {last} were moved by prune-log before \
         they were passed on; read them in its archive"
    ));
    writeln!(out, "{line}").map_err(|e| PassError::Stop(Stop::Error(format!("cannot write: {e}"))))
}

/// A chain `prune-log` moved whole (its manifest, MAC-verified, accounts for it): the records
/// after `from` are named as a gap (none on a first pass from the heads), and the position
/// it moves to, its last record, is returned; `None` when there is nothing to move.
fn moved_whole(
    chain: &ChainReport,
    from: Option<&Position>,
    how: &Pass<'_>,
    out: &mut impl Write,
) -> Result<Option<Position>, PassError> {
    let Some(p) = chain.pruned.as_ref().filter(|p| p.complete) else {
        return Ok(None);
    };
    let Some(hash) = p.last_hash.clone() else {
        return Ok(None);
    };
    let first = match from {
        Some(pos) if pos.seq >= p.last_seq => return Ok(None),
        Some(pos) => pos.seq + 1,
        None => 0,
    };
    if !(how.skip_existing && from.is_none()) {
        say_gap(out, &chain.chain, first, p.last_seq)?;
    }
    Ok(Some(Position {
        seq: p.last_seq,
        hash,
        file: p.files.saturating_sub(1),
    }))
}

/// The chains remembered must still be there, and no shorter: records cut off a chain's
/// end, a chain rolled back to an earlier copy, or a chain's files deleted would each verify
/// on their own.
fn check_against(report: &Report, state: &State) -> Result<(), PassError> {
    for (id, pos) in &state.chains {
        let Some(chain) = report.chains.iter().find(|c| &c.chain == id) else {
            return Err(tampered(
                id,
                format!(
                    "its files are gone (seq {} was passed on): deleted, or moved without a \
                     prune manifest",
                    pos.seq
                ),
            ));
        };
        // A chain `prune-log` moved whole has no record left; its manifest says how far.
        let head = chain
            .last_seq
            .or_else(|| chain.pruned.as_ref().map(|p| p.last_seq));
        if head.is_none_or(|h| h < pos.seq) {
            return Err(tampered(
                id,
                format!(
                    "it went back from seq {} to {}: records cut off its end, or the chain \
                     rolled back to an earlier copy",
                    pos.seq,
                    head.map_or("no record".into(), |h| format!("seq {h}"))
                ),
            ));
        }
        // The head's hash: its record's, or, for a chain moved whole, the one its manifest
        // recorded for the last record moved.
        let head_hash = chain.last_hash.as_deref().or_else(|| {
            chain
                .pruned
                .as_ref()
                .filter(|_| chain.last_seq.is_none())
                .and_then(|p| p.last_hash.as_deref())
        });
        // A record passed on that ended a file prune-log moved since: its manifest recorded
        // that record's hash. (One inside a moved file cannot be checked here: the archive
        // has it, and `verify-log --archive-dir` checks the chain whole.)
        let moved_hash = chain
            .pruned
            .as_ref()
            .and_then(|p| p.hash_at_file_end(pos.seq));
        let known = if head == Some(pos.seq) {
            head_hash
        } else {
            moved_hash
        };
        if known.is_some_and(|h| h != pos.hash) || moved_hash.is_some_and(|h| h != pos.hash) {
            return Err(tampered(
                id,
                format!("record seq {} is not the one passed on: rewritten", pos.seq),
            ));
        }
    }
    Ok(())
}

/// What reading a chain gave.
enum Read {
    New(NewRecords),
    /// The bytes read do not end at the verified head: changed since the verification.
    Changed,
}

/// Reads the records of `chain` after `from` (all of them without it) up to its verified
/// head, computing each hash again, and each MAC when keys were given (the hash does not
/// cover the seal): [`Read::Changed`] when the bytes read do not end at the head. Their lines
/// are held while they fit in `room` bytes.
fn read_new(
    chain: &ChainReport,
    list: &[(u64, PathBuf)],
    from: Option<&Position>,
    opts: &VerifyOptions,
    room: usize,
) -> Result<Read, PassError> {
    let mut start_file = from.map_or(0, |p| p.file);
    loop {
        let mut scout = Scout::new(room);
        match read_from(chain, list, from, opts, start_file, &mut scout)? {
            Some((to, gap)) => return Ok(Read::New(scout.finish(to, gap, start_file))),
            // The record after the position is not in its file or a later one: the files were
            // laid out again since (which an unkeyed chain allows). Read from the first file:
            // the records after the position, if there, still follow it by hash.
            None if start_file > 0 => start_file = 0,
            None => return Ok(Read::Changed),
        }
    }
}

/// [`read_new`] from file index `start_file` on, each record handed to `take` once checked:
/// the last record's position and the gap before the first, or `None` when the bytes read do
/// not end at the verified head (or `take` stopped the reading).
fn read_from(
    chain: &ChainReport,
    list: &[(u64, PathBuf)],
    from: Option<&Position>,
    opts: &VerifyOptions,
    start_file: u64,
    take: &mut dyn Take,
) -> Result<Option<(Position, Gap)>, PassError> {
    let id = chain.chain.as_str();
    let (Some(head_seq), Some(head_hash)) = (chain.last_seq, chain.last_hash.as_deref()) else {
        return Ok(None);
    };
    let mut key = match (opts.hmac_keys.is_empty(), chain.key_index) {
        (true, _) => None,
        (false, Some(i)) => match opts.hmac_keys.get(i) {
            Some(k) => Some(
                EpochKey::from_secret(k.secret.clone())
                    .map_err(|e| PassError::Stop(Stop::Error(format!("{}: {e}", k.name))))?,
            ),
            None => return Ok(None),
        },
        // Keys given, yet the chain's was not found: nothing to hold its seals to.
        (false, None) => return Ok(None),
    };
    let mut prev: Option<[u8; 32]> = match from {
        Some(p) => Some(parse_hash(&p.hash).ok_or_else(|| {
            PassError::Stop(Stop::Error(format!("state of chain {id}: not a hash")))
        })?),
        None => None,
    };
    let after = from.map(|p| p.seq);
    let mut gap = None;
    let mut last: Option<(u64, u64)> = None;
    'files: for (index, path) in list.iter().filter(|(i, _)| *i >= start_file) {
        // The verified head is in `last_file`: a file after it (planted since the
        // verification, say) holds no record to pass on.
        if chain.last_file.is_some_and(|last| *index > last) {
            break;
        }
        // Opened as the verifier opens it: a FIFO or a symlink planted since cannot hang or
        // flood the reading. A file that cannot be read now (moved by a prune since the
        // verification, say) is read again at the next pass.
        let Ok((file, _)) = files::open_regular(path, files::MAX_READ_BYTES) else {
            return Ok(None);
        };
        // Read as the verifier reads: a line longer than any reader holds (bytes planted
        // after a crashed chain's end, say) is measured, never held.
        let mut lines = Lines::new(file, files::MAX_READ_BYTES);
        loop {
            let line = match lines.next_line() {
                Ok(Some(Line::Whole(line))) => line,
                // The end of the file, or a line still being written (or torn by a crash):
                // the verification counted neither.
                Ok(None | Some(Line::Torn(_) | Line::Overlong { ended: false, .. })) => break,
                // No record the verification passed is that long.
                Ok(Some(Line::Overlong { ended: true, .. })) | Err(_) => return Ok(None),
            };
            let Ok(r) = scan(line) else {
                return Ok(None);
            };
            let Some(seq) = r.seq else {
                return Ok(None);
            };
            if after.is_some_and(|a| seq <= a) {
                continue;
            }
            if seq > head_seq {
                break 'files;
            }
            if last.is_none() {
                // The first record read: the one after the position (or the chain's first).
                let expected = after.map_or(0, |a| a + 1);
                if seq != expected {
                    // Records moved by `prune-log`: its manifest accounts for them, and the
                    // verification held this record's link to them. Anything else is read
                    // again at the next pass (a prune that ran after this pass's
                    // verification), whose verification judges the files.
                    let moved = chain.pruned.as_ref().map(|p| p.last_seq);
                    if moved.is_none_or(|m| m + 1 != seq) {
                        return Ok(None);
                    }
                    gap = Some((expected, seq - 1));
                    prev = None;
                } else if after.is_some() && r.prev != from.map(|p| p.hash.as_str()) {
                    return Err(tampered(
                        id,
                        format!(
                            "record seq {seq} no longer follows the record passed on before \
                             it: the chain was rewritten"
                        ),
                    ));
                }
            }
            let prior = match prev {
                Some(h) => h,
                None => match r.prev.and_then(parse_hash) {
                    Some(h) => h,
                    None => return Ok(None),
                },
            };
            let hash = chain_hash_open(&prior, r.body_open);
            if r.hash != hex(&hash) {
                return Ok(None);
            }
            // The seal is not hashed: a `mac` the verifier would refuse (not 64 lower-case hex
            // digits) makes the line another than the one verified, also with no key to check
            // it with.
            if r.mac.is_some_and(|m| parse_hash(m).is_none()) {
                return Ok(None);
            }
            if let Some(k) = key.as_mut() {
                // The verifier holds every record's epoch to its file's index; a record read
                // now that does not is not the one verified. Checked before the ratchet, which
                // an epoch far ahead would keep turning for ever.
                if r.epoch != Some(*index) {
                    return Ok(None);
                }
                k.advance_to(*index);
                if !r.mac.is_some_and(|mac| mac_hex_verifies(k, &hash, mac)) {
                    return Ok(None);
                }
            }
            prev = Some(hash);
            last = Some((seq, *index));
            let at = Position {
                seq,
                hash: hex(&hash),
                file: *index,
            };
            if !take.take(line.to_vec(), at, gap) {
                return Ok(None);
            }
        }
    }
    match (last, prev) {
        (Some((seq, file)), Some(hash)) if seq == head_seq && hex(&hash) == head_hash => {
            Ok(Some((
                Position {
                    seq,
                    hash: hex(&hash),
                    file,
                },
                gap,
            )))
        }
        _ => Ok(None),
    }
}

/// Whether a record line is a security record (`--security-only`).
fn security_line(line: &[u8]) -> bool {
    serde_json::from_slice::<Map<String, Value>>(line).is_ok_and(|r| is_exception(&r))
}

/// Passes in a row that fail to read the log (an I/O error, not tampering) after which a
/// following tail gives up (exit 2) instead of retrying silently for ever.
const MAX_FAILED_PASSES: u32 = 10;

/// Most bytes a state file may have: a position is about 200 bytes per chain.
const MAX_STATE_BYTES: u64 = 64 << 20;

/// The state file, if there is one. Read as a regular file of bounded size only: a FIFO or a
/// device given by mistake is refused at once, never waited for.
fn load_state(path: &Path) -> Result<Option<State>, String> {
    if files::is_missing(path) {
        return Ok(None);
    }
    let bytes = crate::config::read_regular_file(path, MAX_STATE_BYTES, "a tail-log state file")
        .map_err(|e| format!("--state {}: {e}", path.display()))?;
    let state: State = serde_json::from_slice(&bytes).map_err(|e| {
        format!(
            "--state {}: not a tail-log state file ({}); remove it to start afresh",
            path.display(),
            crate::json_error_without_content(&e)
        )
    })?;
    // A position the tail wrote holds a record's hash. Another one (a damaged file) is said
    // here, before any pass: a pass would hold the chain to it and report tampering.
    let damaged = state
        .chains
        .iter()
        .find(|(_, p)| parse_hash(&p.hash).is_none());
    if let Some((chain, _)) = damaged {
        return Err(format!(
            "--state {}: not a tail-log state file (the position of chain {} holds no \
             64-hex-digit hash); remove it to start afresh",
            path.display(),
            chain.escape_debug()
        ));
    }
    Ok(Some(state))
}

/// Replaces the state file atomically and durably (temporary file, 0600, fsync, rename, fsync
/// of the directory): a crash leaves the old position or the new one, never a torn file.
/// The directory of the `--state` file, named `path`, checked before any record is passed on:
/// a state that cannot be saved there would have each run pass its records on again.
fn check_state_dir(path: &Path) -> Result<(), String> {
    // A name the log's own files take: in the log or checkpoint directory, the state would
    // be read as a chain file, checkpoint or manifest, and the log fail verification.
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let logs_own = files::parse_file_name(name).is_some()
        || super::prune::parse_manifest_name(name).is_some()
        || super::checkpoint::is_checkpoint_name(name);
    if logs_own {
        return Err(format!(
            "--state {}: a name the forensic log's own files take (a chain file, checkpoint or \
             prune manifest); name the state file otherwise (tail-log.state, say)",
            path.display()
        ));
    }
    let dir = state_dir(path);
    if !std::fs::metadata(dir).is_ok_and(|m| m.is_dir()) {
        return Err(format!(
            "--state {}: its directory {} does not exist (or is not a directory)",
            path.display(),
            dir.display()
        ));
    }
    if !files::may_write(dir) {
        return Err(format!(
            "--state {}: its directory {}",
            path.display(),
            files::unwritable_said(dir)
        ));
    }
    refuse_marked_state_dir(path)?;
    if files::removal_refused(path) {
        return Err(format!(
            "--state {}: the file is marked append-only or immutable (chattr +a or +i), which \
             refuses its replacement",
            path.display()
        ));
    }
    // Something other than a file at the name (a directory, a FIFO) is refused before its lock
    // file is made: a refused argument leaves nothing behind. (Content is checked once the
    // lock is held, as another tail may be writing it.)
    if let Ok(m) = std::fs::metadata(path) {
        if !m.is_file() {
            return Err(format!(
                "--state {}: not a regular file (a state file kvh tail-log writes, or a name \
                 that does not exist yet)",
                path.display()
            ));
        }
    }
    Ok(())
}

/// `flock`s on the `--state` file's lock files, held for the life of the value (the kernel
/// drops them when the process ends, however it ends).
struct StateLock {
    _held: Vec<std::fs::File>,
}

/// Locks the `--state` file `path` against another `kvh tail-log`, which would pass every
/// record on a second time and overwrite this one's positions with its own: refused at once,
/// not waited for.
///
/// The lock is on a file of its own beside the state file, `NAME.lock`, not on the state
/// file: that is replaced by a rename at every save, so a lock on its inode would be left on
/// a file no longer named, and the next tail would lock the new one. The lock file is never
/// written, and never removed (a tail that opened it just before a removal would lock an
/// inode no longer named while another locked a new file at the name). An `flock` belongs to
/// the inode, so every spelling of the path (relative, `..`, through a linked directory)
/// meets the same lock. A state file named through a link is read from the file the link
/// names and saved at the link's name (the rename replaces the link), so both are locked.
/// Opened close-on-exec (nothing started later inherits it), without following a link at
/// its name and without waiting on a FIFO there; it must be an empty regular file (a file
/// with content is not one a tail made: another tail's state file, say).
fn lock_state(path: &Path) -> Result<StateLock, String> {
    let mut held = Vec::new();
    for lock in lock_paths(path)? {
        held.push(lock_one(path, &lock)?);
    }
    Ok(StateLock { _held: held })
}

/// Takes the lock file `lock` of the `--state` file `path`.
fn lock_one(path: &Path, lock: &Path) -> Result<std::fs::File, String> {
    use std::os::unix::fs::OpenOptionsExt;
    let said = |what: String| {
        format!(
            "--state {}: its lock file {}: {what}",
            path.display(),
            lock.display()
        )
    };
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(lock)
        .map_err(|e| {
            said(match e.raw_os_error() {
                Some(libc::ELOOP) => {
                    "a symbolic link, not a lock file of kvh tail-log (remove it)".into()
                }
                _ => format!("cannot be created or opened: {e}"),
            })
        })?;
    let meta = file.metadata().map_err(|e| said(e.to_string()))?;
    if !meta.is_file() || meta.len() != 0 {
        return Err(said(
            "not a lock file of kvh tail-log (those are empty regular files); move it away, \
             or name the state file otherwise"
                .into(),
        ));
    }
    match files::try_lock_or_error(&file) {
        Ok(true) => Ok(file),
        Ok(false) => Err(format!(
            "--state {}: another kvh tail-log is using this state file (it holds the lock on \
             {}); run one tail per state file",
            path.display(),
            lock.display()
        )),
        Err(e) => Err(said(format!("cannot be locked: {e}"))),
    }
}

/// The lock files of the `--state` file `path`: `NAME.lock` beside it and, when it is a
/// link, beside the file it links to.
fn lock_paths(path: &Path) -> Result<Vec<PathBuf>, String> {
    let beside = |file: &Path| {
        let mut name = file.file_name()?.to_os_string();
        name.push(".lock");
        Some(file.with_file_name(name))
    };
    let own = beside(path).ok_or_else(|| format!("--state {}: names no file", path.display()))?;
    let mut paths = vec![own];
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink()) {
        // A dangling link is refused when the state is read.
        if let Some(linked) = std::fs::canonicalize(path).ok().as_deref().and_then(beside) {
            paths.push(linked);
        }
    }
    Ok(paths)
}

/// Refuses a `--state` directory marked append-only or immutable: the state file is
/// installed by a rename, which it refuses (and its temporary file could not be removed).
fn refuse_marked_state_dir(path: &Path) -> Result<(), String> {
    if files::renames_refused(state_dir(path)) {
        return Err(format!(
            "--state {}: its directory is marked append-only or immutable (chattr +a or +i), \
             which refuses the rename that installs the state file",
            path.display()
        ));
    }
    Ok(())
}

/// The directory the `--state` file `path` is in.
fn state_dir(path: &Path) -> &Path {
    path.parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// The prefix of the temporary files `save_state` writes the `--state` file `path` through:
/// `.NAME.tmp-`, then the writer's process id and a time. In the name's own bytes: two state
/// files whose names are not UTF-8 must not share it (a lossy spelling would make them).
fn save_prefix(path: &Path) -> std::ffi::OsString {
    let mut prefix = std::ffi::OsString::from(".");
    prefix.push(path.file_name().unwrap_or(std::ffi::OsStr::new("state")));
    prefix.push(".tmp-");
    prefix
}

/// Removes the temporary files of saves of the `--state` file `path` that never ended (a
/// tail killed between writing one and renaming it: SIGKILL, the OOM killer), which would
/// otherwise pile up, one per such kill. Called with the state's lock held, so no other tail
/// is saving through one. Only regular files named as a save names them are removed (a link
/// is not followed); one that cannot be removed is left, harmless.
fn remove_unfinished_saves(path: &Path) {
    use std::os::unix::ffi::OsStrExt;
    let prefix = save_prefix(path);
    let Ok(entries) = std::fs::read_dir(state_dir(path)) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.as_bytes().strip_prefix(prefix.as_bytes()) else {
            continue;
        };
        let digits = |s: &[u8]| !s.is_empty() && s.iter().all(u8::is_ascii_digit);
        let numbered = rest
            .iter()
            .position(|&b| b == b'-')
            .is_some_and(|dash| digits(&rest[..dash]) && digits(&rest[dash + 1..]));
        // `DirEntry::file_type` does not follow a link.
        if numbered && entry.file_type().is_ok_and(|t| t.is_file()) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

fn save_state(path: &Path, state: &State) -> Result<(), String> {
    use std::os::unix::fs::OpenOptionsExt;
    let err = |e: std::io::Error| format!("--state {}: {e}", path.display());
    let mut text = serde_json::to_vec_pretty(state).map_err(|e| err(e.into()))?;
    text.push(b'\n');
    // Checked at the start too (`check_state_dir`); again here, as the mark may have been set
    // since: an append-only directory would take the temporary file and refuse its rename and
    // its removal.
    refuse_marked_state_dir(path)?;
    let mut tmp_name = save_prefix(path);
    tmp_name.push(format!(
        "{}-{}",
        std::process::id(),
        unix_nanos(std::time::SystemTime::now())
    ));
    let tmp = path.with_file_name(tmp_name);
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .and_then(|mut f| f.write_all(&text).and_then(|()| f.sync_all()))
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(err(e));
    }
    sync_parent(path).map_err(err)
}

/// Makes a rename in `path`'s directory durable: without it a crash of the machine can bring
/// back the previous state file, and the tail would pass on again what it had passed on. A
/// file system that cannot sync a directory (EINVAL) has nothing more to make durable.
fn sync_parent(path: &Path) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    match std::fs::File::open(dir).and_then(|d| d.sync_all()) {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, LogConfig};
    use crate::forensic::{ForensicLog, SealKey, StartInfo};
    use zeroize::Zeroizing;

    /// A stopped log of one chain in `dir`, sealed with `secret` if given: the options that
    /// verify it, its report and its file list.
    fn log(dir: &Path, secret: Option<&[u8]>) -> (VerifyOptions, Report, Vec<(u64, PathBuf)>) {
        let cfg = crate::forensic::quiet_test_config(dir);
        let start = StartInfo::current(Config::default().canonical_json());
        let secret = secret.map(|s| Zeroizing::new(s.to_vec()));
        ForensicLog::open_with_secret(&cfg, start, secret.clone())
            .unwrap()
            .stop();
        let opts = VerifyOptions {
            hmac_keys: secret
                .into_iter()
                .map(|s| SealKey::new("hmac.key", s))
                .collect(),
            ..VerifyOptions::default()
        };
        let report = verify_all(dir, &opts).unwrap();
        assert!(report.ok(), "{report:?}");
        let files = verify::list_all(dir, &opts).unwrap().remove(0).1;
        (opts, report, files)
    }

    /// The lines `read_new` passes on from the start, or `None` for [`Read::Changed`].
    fn read_all(
        chain: &ChainReport,
        files: &[(u64, PathBuf)],
        opts: &VerifyOptions,
    ) -> Option<Vec<String>> {
        match read_new(chain, files, None, opts, usize::MAX).ok()? {
            Read::New(n) => Some(
                n.lines?
                    .iter()
                    .map(|(l, _)| String::from_utf8_lossy(l).into_owned())
                    .collect(),
            ),
            Read::Changed => None,
        }
    }

    /// Replaces the last line of `path` by `f` of it.
    fn change_last_line(path: &Path, f: impl Fn(&str) -> String) -> String {
        let text = std::fs::read_to_string(path).unwrap();
        let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
        let last = lines.pop().unwrap();
        lines.push(f(&last));
        std::fs::write(path, lines.join("\n") + "\n").unwrap();
        text
    }

    #[test]
    fn bytes_that_do_not_hash_to_the_verified_head_are_not_passed_on() {
        let tmp = tempfile::tempdir().unwrap();
        let (opts, report, files) = log(&tmp.path().join("log"), None);
        let chain = &report.chains[0];
        let lines = read_all(chain, &files, &opts).expect("the verified bytes");
        assert_eq!(lines.len() as u64, chain.last_seq.unwrap() + 1);
        // The file changes after the verification (its last record's time, say): the bytes
        // read no longer end at the head verified, and nothing is passed on.
        let path = &files[0].1;
        let text = change_last_line(path, |l| {
            let at = l.find("\"ts\":").unwrap() + 5;
            let digit = if l.as_bytes()[at] == b'1' { "2" } else { "1" };
            let mut l = l.to_string();
            l.replace_range(at..at + 1, digit);
            l
        });
        assert!(read_all(chain, &files, &opts).is_none());
        // A head that is not the chain's: nothing either.
        std::fs::write(path, text).unwrap();
        let mut other = chain.clone();
        other.last_hash = Some("0".repeat(64));
        assert!(read_all(&other, &files, &opts).is_none());
    }

    #[test]
    fn a_seal_changed_after_the_verification_is_not_passed_on() {
        // The seal (`mac`) follows the hash and is not covered by it: with a key given, each
        // is computed again.
        let tmp = tempfile::tempdir().unwrap();
        let (opts, report, files) = log(
            &tmp.path().join("log"),
            Some(b"tail-secret-0123456789abcdef"),
        );
        let chain = &report.chains[0];
        assert!(read_all(chain, &files, &opts).is_some());
        change_last_line(&files[0].1, |l| {
            let at = l.find("\"mac\":\"").unwrap() + 7;
            let digit = if l.as_bytes()[at] == b'a' { "b" } else { "a" };
            let mut l = l.to_string();
            l.replace_range(at..at + 1, digit);
            l
        });
        assert!(read_all(chain, &files, &opts).is_none());
    }

    #[test]
    fn a_hash_field_changed_after_the_verification_is_not_passed_on() {
        // Without a key, a record's `hash` field is not covered by anything read later: the
        // chain's head is computed from the bodies, so each field is compared again.
        let tmp = tempfile::tempdir().unwrap();
        let (opts, report, files) = log(&tmp.path().join("log"), None);
        let chain = &report.chains[0];
        assert!(read_all(chain, &files, &opts).is_some());
        let path = &files[0].1;
        let text = std::fs::read_to_string(path).unwrap();
        let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
        assert!(lines.len() >= 2);
        let at = lines[0].find("\"hash\":\"").unwrap() + 8;
        let digit = if lines[0].as_bytes()[at] == b'a' {
            "b"
        } else {
            "a"
        };
        lines[0].replace_range(at..at + 1, digit);
        std::fs::write(path, lines.join("\n") + "\n").unwrap();
        assert!(read_all(chain, &files, &opts).is_none());
    }

    /// Without a key the seal is not checked, but a line `verify-log` rejects is not a record
    /// that verified: a `mac` that is not 64 lower-case hex digits, written after the pass's
    /// verification (the hash does not cover it), is rejected as the walk of `verify-log`
    /// (and of a pass between whole verifications) rejects it, and nothing is passed on.
    #[test]
    fn a_malformed_seal_written_after_the_verification_is_not_passed_on() {
        let tmp = tempfile::tempdir().unwrap();
        let (opts, report, files) = log(&tmp.path().join("log"), None);
        let chain = &report.chains[0];
        assert!(read_all(chain, &files, &opts).is_some());
        change_last_line(&files[0].1, |l| {
            let l = l.strip_suffix('}').unwrap().to_string();
            format!("{l},\"mac\":\"not-a-seal\"}}")
        });
        assert!(
            verify_all(&tmp.path().join("log"), &opts)
                .unwrap()
                .first_problem()
                .is_some(),
            "verify-log rejects the line"
        );
        assert!(
            read_all(chain, &files, &opts).is_none(),
            "a line verify-log rejects (a malformed mac) is passed on"
        );
    }

    /// A FIFO (or a symlink to one, or to `/dev/zero`) planted at a chain file name after the
    /// pass's verification and before its reading, here at the index after the newest file
    /// the verification read: the reading opens files as the verifier does, so it neither
    /// blocks on it forever (no alert line while the log is tampered with) nor follows it.
    #[test]
    fn a_fifo_planted_after_the_verification_does_not_hang_the_reading() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("log");
        let (opts, report, mut files) = log(&dir, None);
        let chain = report.chains[0].clone();
        let fifo = dir.join(crate::forensic::files::file_name(&chain.chain, 1));
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        // As the pass's second listing, made after the verification, sees the directory.
        files.push((1, fifo));
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let read = read_new(&chain, &files, None, &opts, usize::MAX);
            let _ = tx.send(matches!(read, Ok(Read::New(_))));
        });
        assert!(
            rx.recv_timeout(Duration::from_secs(5)).is_ok(),
            "the reading of a verified chain blocked opening a FIFO at a chain file name"
        );
    }

    /// A record rewritten after the pass's verification with an `epoch` far beyond its file's
    /// index (and its hash computed again, which needs no key): the reading of a keyed chain
    /// holds the record to its file before ratcheting the key to it, and reports the bytes as
    /// changed at once instead of ratcheting for ever (no alert, nothing more passed on).
    #[test]
    fn a_record_claiming_a_far_epoch_does_not_hang_the_reading() {
        use crate::forensic::record::{chain_hash, write_canonical};
        let tmp = tempfile::tempdir().unwrap();
        let (opts, report, files) = log(
            &tmp.path().join("log"),
            Some(b"tail-secret-0123456789abcdef"),
        );
        let chain = report.chains[0].clone();
        assert!(read_all(&chain, &files, &opts).is_some());
        change_last_line(&files[0].1, |l| {
            let mut m: Map<String, Value> = serde_json::from_str(l).unwrap();
            let mac = m.remove("mac").unwrap();
            m.remove("hash");
            m.insert("epoch".into(), Value::from(1u64 << 40));
            let prev = parse_hash(m["prev"].as_str().unwrap()).unwrap();
            let mut body = Vec::new();
            write_canonical(&Value::Object(m), &mut body).unwrap();
            let hash = hex(&chain_hash(&prev, &body));
            body.pop();
            let mut line = String::from_utf8(body).unwrap();
            line.push_str(&format!(",\"hash\":\"{hash}\",\"mac\":{mac}}}"));
            assert!(scan(line.as_bytes()).is_ok(), "{line}");
            line
        });
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let read = read_new(&chain, &files, None, &opts, usize::MAX);
            let _ = tx.send(matches!(read, Ok(Read::Changed)));
        });
        let changed = rx.recv_timeout(Duration::from_secs(10)).expect(
            "the reading of a keyed chain ratchets its key towards the epoch a rewritten record \
             claims, far beyond its file's index",
        );
        assert!(changed, "a record sealed for another epoch is passed on");
    }

    /// A file planted after the verification, named after the chain with a far index, holding
    /// a record that links to the verified head and claims the file's epoch: not read, so the
    /// key is not ratcheted towards it.
    #[test]
    fn a_file_planted_beyond_the_head_file_is_not_read() {
        use crate::forensic::record::{chain_hash, write_canonical};
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("log");
        let (opts, report, mut files) = log(&dir, Some(b"tail-secret-0123456789abcdef"));
        let chain = report.chains[0].clone();
        let expected = read_all(&chain, &files, &opts).expect("the verified records");
        let far = 1u64 << 40;
        let mut m = Map::new();
        m.insert("chain".into(), Value::from(chain.chain.clone()));
        m.insert("epoch".into(), Value::from(far));
        m.insert("kind".into(), Value::from("summary"));
        m.insert("prev".into(), Value::from(chain.last_hash.clone().unwrap()));
        m.insert("seq".into(), Value::from(chain.last_seq.unwrap()));
        let prev = parse_hash(chain.last_hash.as_deref().unwrap()).unwrap();
        let mut body = Vec::new();
        write_canonical(&Value::Object(m), &mut body).unwrap();
        let hash = hex(&chain_hash(&prev, &body));
        body.pop();
        let mut line = String::from_utf8(body).unwrap();
        line.push_str(&format!(
            ",\"hash\":\"{hash}\",\"mac\":\"{}\"}}\n",
            "00".repeat(32)
        ));
        let planted = dir.join(crate::forensic::files::file_name(&chain.chain, far));
        std::fs::write(&planted, line).unwrap();
        files.push((far, planted));
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(read_all(&chain, &files, &opts));
        });
        let read = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the key was ratcheted towards a planted file's index");
        assert_eq!(read, Some(expected));
    }

    /// A signed log in `TMP/log` with small files: the tail's position after its first record,
    /// then 79 more records over many files (an archive directory `TMP/archive` is ready for
    /// [`prune_now`]). The log is returned so that it stays open.
    fn position_before_many_files() -> (
        tempfile::TempDir,
        std::sync::Arc<ForensicLog>,
        VerifyOptions,
        Position,
    ) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("log");
        let archive = tmp.path().join("archive");
        std::fs::create_dir(&archive).unwrap();
        std::fs::set_permissions(
            &archive,
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .unwrap();
        let cfg = LogConfig {
            max_bytes: 4096,
            ..crate::forensic::quiet_test_config(&dir)
        };
        let secret = b"tail-secret-0123456789abcdef";
        let log = ForensicLog::open_with_secret(
            &cfg,
            StartInfo::current(Config::default().canonical_json()),
            Some(Zeroizing::new(secret.to_vec())),
        )
        .unwrap();
        log.record_anomaly(serde_json::json!({"n": 0}));
        log.flush();
        let opts = VerifyOptions {
            hmac_keys: vec![SealKey::new("hmac.key", Zeroizing::new(secret.to_vec()))],
            allow_pruned: true,
            ..VerifyOptions::default()
        };
        let report = verify_all(&dir, &opts).unwrap();
        let c = &report.chains[0];
        let pos = Position {
            seq: c.last_seq.unwrap(),
            hash: c.last_hash.clone().unwrap(),
            file: c.last_file.unwrap(),
        };
        for i in 1..80 {
            log.record_anomaly(serde_json::json!({"n": i, "pad": "x".repeat(200)}));
        }
        log.flush();
        (tmp, log, opts, pos)
    }

    /// `kvh prune-log --older-than 0` over `TMP/log` into `TMP/archive`.
    fn prune_now(tmp: &std::path::Path, opts: &VerifyOptions) {
        crate::forensic::prune::prune_now(&tmp.join("log"), &tmp.join("archive"), opts);
    }

    /// `prune-log` (a nightly job) runs while a pass is under way, after its verification and
    /// before its listing, and moves files the tail has not read yet (it lags two files or
    /// more: a `--once` job, a busy writer with small files). The verification saw no
    /// manifest, the reading no longer finds the records after the position: a race with
    /// normal operation, read again at the next pass, not tampering.
    #[test]
    fn a_prune_between_the_verification_and_the_reading_is_not_tampering() {
        let (tmp, log, opts, pos) = position_before_many_files();
        let dir = tmp.path().join("log");
        // The pass: its verification...
        let report = verify_all(&dir, &opts).unwrap();
        assert!(report.ok(), "{report:?}");
        // ... then prune-log runs ...
        prune_now(tmp.path(), &opts);
        assert!(
            verify::list_all(&dir, &opts).unwrap()[0].1[0].0 > 0,
            "prune-log moved the chain's first files"
        );
        // ... then the pass lists the files and reads the chain.
        let files = verify::list_all(&dir, &opts).unwrap().remove(0).1;
        let read = read_new(&report.chains[0], &files, Some(&pos), &opts, usize::MAX);
        let reason = match &read {
            Err(PassError::Stop(Stop::Tampered { reason, .. })) => Some(reason.clone()),
            _ => None,
        };
        assert!(
            reason.is_none(),
            "a prune racing a pass is reported as tampering: {reason:?}"
        );
        std::mem::forget(log);
    }

    /// A file deleted after a pass's verification of a pruned chain (records the manifest
    /// does not account for: it ends before them): the records after it are not passed on
    /// under a gap that says `prune-log` moved what was deleted; the reading is done again at
    /// the next pass, whose verification judges the files.
    #[test]
    fn records_gone_beyond_what_the_manifest_moved_are_not_named_a_prune_gap() {
        let (tmp, log, opts, pos) = position_before_many_files();
        let dir = tmp.path().join("log");
        prune_now(tmp.path(), &opts);
        // The pass's verification: the manifest accounts for the files moved.
        let report = verify_all(&dir, &opts).unwrap();
        assert!(report.ok(), "{report:?}");
        let moved = report.chains[0].pruned.as_ref().unwrap().last_seq;
        let mut files = verify::list_all(&dir, &opts).unwrap().remove(0).1;
        assert!(files.len() >= 2, "{files:?}");
        // Then the first file left is deleted, before the pass lists and reads the chain.
        let (_, first_left) = files.remove(0);
        std::fs::remove_file(&first_left).unwrap();
        let read = read_new(&report.chains[0], &files, Some(&pos), &opts, usize::MAX);
        match read {
            Ok(Read::Changed) => {}
            Ok(Read::New(n)) => panic!(
                "records after a deleted file passed on, with the gap {:?} named as moved by \
                 prune-log (its manifest ends at seq {moved})",
                n.gap
            ),
            Err(_) => panic!("an error instead of a reading done again"),
        }
        std::mem::forget(log);
    }

    /// The first reading of the records after `pos` in `files`, holding none, in batches of
    /// about 1 KiB.
    fn first_reading(
        chain: &ChainReport,
        files: &[(u64, PathBuf)],
        pos: &Position,
        opts: &VerifyOptions,
    ) -> NewRecords {
        let mut scout = Scout::batched(0, 1024);
        let read = read_from(chain, files, Some(pos), opts, pos.file, &mut scout);
        let (to, gap) = read.ok().flatten().expect("the verified records");
        scout.finish(to, gap, pos.file)
    }

    /// The second reading of what `first` found: what it wrote, the position it left, and
    /// whether it wrote every batch.
    fn second_reading(
        chain: &ChainReport,
        files: &[(u64, PathBuf)],
        pos: &Position,
        opts: &VerifyOptions,
        first: NewRecords,
    ) -> (Vec<u8>, Position, bool) {
        let how = Pass {
            opts,
            skip_existing: false,
            security_only: false,
            verify_every: None,
            state_file: None,
        };
        let mut state = State::default();
        state.chains.insert(chain.chain.clone(), pos.clone());
        let mut out = Vec::new();
        let mut batches = Batches::new(&mut out, &chain.chain, &how, &mut state, first);
        let reached = read_from(chain, files, Some(pos), opts, pos.file, &mut batches);
        let reached = reached.ok().flatten().is_some();
        let (all, _) = batches.finish(reached).ok().expect("no write failed");
        (out, state.chains[&chain.chain].clone(), all)
    }

    /// A backlog more than a reading holds is read again and written a batch at a time, each
    /// once its last record is the one the first reading found there (and followed to the
    /// verified head): a file changed between the two readings stops the writing after the
    /// batches before the change, with the position at the last record written.
    #[test]
    fn a_backlog_is_passed_on_in_batches_each_held_to_the_first_reading() {
        let (tmp, log, opts, pos) = position_before_many_files();
        let dir = tmp.path().join("log");
        let report = verify_all(&dir, &opts).unwrap();
        let chain = &report.chains[0];
        let files = verify::list_all(&dir, &opts).unwrap().remove(0).1;
        let expected: Vec<u8> = files
            .iter()
            .flat_map(|(_, f)| {
                std::fs::read_to_string(f)
                    .unwrap()
                    .lines()
                    .map(str::to_string)
                    .collect::<Vec<_>>()
            })
            .filter(|l| scan(l.as_bytes()).unwrap().seq.unwrap() > pos.seq)
            .flat_map(|l| (l + "\n").into_bytes())
            .collect();

        let first = first_reading(chain, &files, &pos, &opts);
        assert!(first.lines.is_none(), "the lines are not held");
        assert!(first.ends.len() > 5, "{} batches", first.ends.len());
        let (out, at, all) = second_reading(chain, &files, &pos, &opts, first);
        assert!(all);
        assert!(
            out == expected,
            "every record after the position, once, in order"
        );
        assert_eq!(at.seq, chain.last_seq.unwrap());

        let first = first_reading(chain, &files, &pos, &opts);
        let ends: Vec<u64> = first.ends.iter().map(|e| e.at.seq).collect();
        let (_, newest) = files.last().unwrap();
        change_last_line(newest, |l| {
            let at = l.find("\"ts\":").unwrap() + 5;
            let digit = if l.as_bytes()[at] == b'1' { "2" } else { "1" };
            let mut l = l.to_string();
            l.replace_range(at..at + 1, digit);
            l
        });
        let (out, at, all) = second_reading(chain, &files, &pos, &opts, first);
        assert!(!all, "a batch that does not end as first read is written");
        assert_eq!(
            at.seq,
            ends[ends.len() - 2],
            "the batches before the change"
        );
        assert!(expected.starts_with(&out) && out.ends_with(b"\n"));
        let written = out.iter().filter(|b| **b == b'\n').count() as u64;
        assert_eq!(pos.seq + written, at.seq);
        std::mem::forget(log);
    }

    #[test]
    fn the_state_file_round_trips_and_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("tail.json");
        assert_eq!(load_state(&path), Ok(None));
        let mut state = State::default();
        state.chains.insert(
            "p1-t2".into(),
            Position {
                seq: 7,
                hash: "ab".repeat(32),
                file: 3,
            },
        );
        save_state(&path, &state).unwrap();
        assert_eq!(load_state(&path), Ok(Some(state)));
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(
            std::fs::read_dir(tmp.path()).unwrap().count(),
            1,
            "no temporary left"
        );
    }
}

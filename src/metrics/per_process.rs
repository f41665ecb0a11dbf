//! Per-process metrics files. A multi-process engine (tensor-parallel workers that inherit the
//! environment) names its metrics file with `{pid}` in `KVH_METRICS_FILE`, and each process
//! writes its own. The verbs that read metrics files (`kvh metrics`, `kvh serve-metrics`,
//! `kvh gate`) take the same pattern and find here which files belong to live processes:
//! a process's file outlives it, and the last snapshot of a process that ended must neither
//! be judged stale forever nor be served as if the process were still running. A file last
//! written before the process now holding its id started is that of one that ended (the id
//! was reused).
//!
//! The writer tells its file from that of an ended process whose id was reused by the
//! identity it writes in it ([`ProcessIdentity`]: the boot and the process's start in clock
//! ticks since that boot), which the reader compares with what the kernel says of the process
//! now holding the id. Clock ticks since boot do not move when the wall clock is stepped; the
//! file's modification time, which decides for files without an identity (written by an older
//! release), does: a clock stepped forward after a worker's last write makes its file seem
//! older than its process, and a hung worker would be skipped as gone rather than judged
//! stale.
//!
//! Liveness is judged in the pid namespace of the reader: a probe or sidecar must share the
//! engine's (in a pod, the engine container itself, or `shareProcessNamespace: true`), and
//! its time namespace too (the one every container shares unless made otherwise, as CRIU
//! does): `/proc` gives start ticks offset by the reader's boot-time offset.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::config::PID_PLACEHOLDER;

/// What a verb reads: one metrics file, or every live process's file of a pattern.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    One(PathBuf),
    /// A path whose file name holds `{pid}`.
    PerProcess(PathBuf),
}

impl Target {
    /// The target `given` names: a pattern when `{pid}` is in its file name. `{pid}` in a
    /// directory is refused (the writer replaces it there too, but the readers look for files
    /// in one directory).
    pub fn of(given: PathBuf) -> Result<Target, String> {
        let has_pid = |p: &Path| p.to_string_lossy().contains(PID_PLACEHOLDER);
        if !has_pid(&given) {
            return Ok(Target::One(given));
        }
        // `file_name` reads "/run/{pid}/" and "/run/{pid}/." as the name "{pid}": they name
        // a directory, which KVH_METRICS_FILE refuses as well.
        let in_name = crate::config::names_a_file(&given)
            && given.file_name().is_some_and(|n| has_pid(n.as_ref()));
        let in_dir = given.parent().is_some_and(has_pid);
        if in_dir || !in_name {
            return Err(format!(
                "{}: {PID_PLACEHOLDER} is taken in the file name only, not in a directory",
                given.display()
            ));
        }
        Ok(Target::PerProcess(given))
    }

    /// The path as given (the pattern itself for [`Target::PerProcess`]).
    pub fn path(&self) -> &Path {
        match self {
            Target::One(p) | Target::PerProcess(p) => p,
        }
    }
}

/// The files of a pattern, split by whether their process is alive; each list by pid.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProcessFiles {
    pub live: Vec<(u32, PathBuf)>,
    pub gone: Vec<(u32, PathBuf)>,
}

impl ProcessFiles {
    /// The message for a pattern that no live process's file matches: nothing can be judged
    /// or served, which is not a pass.
    pub fn none_live(&self, pattern: &Path) -> String {
        none_live(pattern, self.gone.len(), 0)
    }
}

/// [`ProcessFiles::none_live`] with `gone` files of processes that are gone and `reused`
/// files written by an earlier holder of a process id a live process holds now.
pub fn none_live(pattern: &Path, gone: usize, reused: usize) -> String {
    let mut kinds = Vec::new();
    match gone {
        0 => {}
        1 => kinds.push("1 file of a process that is gone".to_string()),
        n => kinds.push(format!("{n} files of processes that are gone")),
    }
    match reused {
        0 => {}
        1 => kinds.push(
            "1 file of an earlier holder of a process id a live process holds now".to_string(),
        ),
        n => kinds.push(format!(
            "{n} files of earlier holders of process ids live processes hold now"
        )),
    }
    let found = if kinds.is_empty() {
        "no file of any process".to_string()
    } else {
        kinds.join(", ")
    };
    format!(
        "no metrics file of a live process matches {} ({found}); the reader must run in the \
         processes' pid namespace (in a pod: the same container, or shareProcessNamespace: \
         true)",
        pattern.display()
    )
}

/// The file of a process that is gone, listed, not judged (`--json`'s `gone`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct GoneFile {
    pub pid: u32,
    /// Null when the path is not UTF-8 (see `file_shell`).
    #[serde(serialize_with = "crate::report_out::path_or_null")]
    pub file: PathBuf,
    pub file_shell: String,
    /// The file was written by an earlier holder of the id, which a live process holds now:
    /// the process that wrote it is gone, not the one with its id.
    pub earlier_holder: bool,
}

impl GoneFile {
    fn of((pid, file): (u32, PathBuf), earlier_holder: bool) -> Self {
        GoneFile {
            pid,
            file_shell: crate::forensic::cli::shell_word(&file),
            file,
            earlier_holder,
        }
    }

    /// The note a report gives of it: the file is left out (`what`: "checked", "judged").
    pub fn note(&self, what: &str) -> String {
        let file = crate::printable(&self.file.display().to_string());
        if self.earlier_holder {
            format!(
                "note: {file} was written by an earlier holder of process id {} (it ended; \
                 the id names another process now): not {what} (remove it)",
                self.pid
            )
        } else {
            format!(
                "note: process {} is gone; its file {file} is not {what} (remove it)",
                self.pid
            )
        }
    }
}

/// What a per-process reader judged: each live process with its snapshot and judgement (by
/// pid), and the files of processes that are gone.
pub struct Judged<S, T> {
    pub processes: Vec<(u32, S, T)>,
    pub gone: Vec<GoneFile>,
}

/// Loads (`load`) and judges (`judge`) the file of every live process in `files`. A process
/// found to have ended meanwhile, or whose id now names another process, is gone, not judged
/// (`load` answers `None`): its file could not be loaded, or its
/// judgement fails (`passed` false) while it is no longer alive (its last snapshot only ages).
/// An error when every listed process ended meanwhile: nothing was judged.
pub fn judge_live<S, T>(
    pattern: &Path,
    files: ProcessFiles,
    load: impl Fn(u32, &Path) -> Result<Option<S>, String>,
    mut judge: impl FnMut(&Path, &S) -> T,
    passed: impl Fn(&T) -> bool,
) -> Result<Judged<S, T>, String> {
    let ProcessFiles { live, mut gone } = files;
    let mut earlier_holders = Vec::new();
    let mut processes = Vec::with_capacity(live.len());
    for (pid, file) in live {
        let Some(snap) = load(pid, &file)? else {
            // Not this process's to judge: an earlier holder of the id wrote it, or the
            // process ended meanwhile.
            if alive(pid) {
                earlier_holders.push((pid, file));
            } else {
                gone.push((pid, file));
            }
            continue;
        };
        let verdict = judge(&file, &snap);
        if !passed(&verdict) && !alive(pid) {
            gone.push((pid, file));
            continue;
        }
        processes.push((pid, snap, verdict));
    }
    gone.sort();
    earlier_holders.sort();
    if processes.is_empty() {
        return Err(none_live(pattern, gone.len(), earlier_holders.len()));
    }
    let gone = gone.into_iter().map(|g| GoneFile::of(g, false));
    let earlier = earlier_holders.into_iter().map(|g| GoneFile::of(g, true));
    Ok(Judged {
        processes,
        gone: gone.chain(earlier).collect(),
    })
}

/// The files in the pattern's directory whose name is the pattern's with `{pid}` replaced by
/// a process id, split into those whose id names a live process and those of processes that
/// are gone. A file of the first kind may still be that of an ended process whose id was
/// reused: that is known once it is read ([`belongs_to`]).
pub fn find(pattern: &Path) -> Result<ProcessFiles, String> {
    let (live, gone) = files_of(pattern)?
        .into_iter()
        .partition(|(pid, _)| alive(*pid));
    Ok(ProcessFiles { live, gone })
}

/// The process that wrote a per-process file, told apart from every other process that ever
/// held its id: the boot it ran in and when it started in that boot. Both are kernel facts
/// that a wall-clock step does not move.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessIdentity {
    /// `/proc/sys/kernel/random/boot_id`: a new value at each boot.
    pub boot_id: String,
    /// Field 22 of `/proc/PID/stat`: the process's start in clock ticks since boot.
    pub start_ticks: u64,
}

impl ProcessIdentity {
    /// This process's identity, or `None` without `/proc`.
    pub fn of_this_process() -> Option<Self> {
        Self::read("self")
    }

    /// The identity of process `pid` as this process sees it, or `None` when `/proc` does not
    /// say (no such process, no `/proc`).
    pub fn of(pid: u32) -> Option<Self> {
        Self::read(&pid.to_string())
    }

    fn read(proc_entry: &str) -> Option<Self> {
        let start_ticks = start_ticks(proc_entry)?;
        let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
        let boot_id = boot_id.trim();
        // A UUID; anything else is no identity to write as a label value.
        if boot_id.is_empty() || !boot_id.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-') {
            return None;
        }
        Some(ProcessIdentity {
            boot_id: boot_id.to_string(),
            start_ticks,
        })
    }
}

/// Whether the file of process `pid`, which carries the identity `written` of its writer
/// (`None` for a file an older release wrote), was written by that process rather than by an
/// ended one that held the id before. With an identity, the kernel's answer for `pid` decides;
/// when it cannot be read the file is taken as the process's (judged, so never skipped
/// unseen). Without one, the file's modification time must not be before the process started.
pub fn belongs_to(pid: u32, file: &Path, written: Option<&ProcessIdentity>) -> bool {
    match written {
        Some(written) => ProcessIdentity::of(pid).is_none_or(|now| *written == now),
        None => !written_before_start(pid, file),
    }
}

/// Whether `file` was last written before process `pid` started: the file of a process that
/// ended, whose id a later process holds now. Unknown (no `/proc`, no time) is `false`.
fn written_before_start(pid: u32, file: &Path) -> bool {
    let written = std::fs::metadata(file).and_then(|m| m.modified());
    match (written, process_start(pid)) {
        // The start is known to the second of the boot time: a margin keeps a file its process
        // wrote in its first moments its own.
        (Ok(written), Some(start)) => written + START_MARGIN < start,
        _ => false,
    }
}

/// How much earlier than its process's start a file may seem to be written and still be its.
const START_MARGIN: Duration = Duration::from_secs(2);

/// When process `pid` started, as wall-clock time: the boot time (`btime` in `/proc/stat`)
/// plus the process's start in clock ticks since boot (field 22 of `/proc/PID/stat`).
fn process_start(pid: u32) -> Option<SystemTime> {
    let ticks = start_ticks(&pid.to_string())?;
    let boot: u64 = std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    // SAFETY: sysconf only reads a system constant.
    let per_second = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).ok()?;
    if per_second == 0 {
        return None;
    }
    let since_boot = Duration::from_secs(ticks / per_second)
        + Duration::from_nanos((ticks % per_second) * 1_000_000_000 / per_second);
    UNIX_EPOCH.checked_add(Duration::from_secs(boot) + since_boot)
}

/// Field 22 of `/proc/ENTRY/stat` (`ENTRY` a pid or `self`): the process's start in clock
/// ticks since boot.
fn start_ticks(proc_entry: &str) -> Option<u64> {
    start_ticks_in(&std::fs::read_to_string(format!("/proc/{proc_entry}/stat")).ok()?)
}

/// Field 22 of the text of a `/proc/PID/stat`.
fn start_ticks_in(stat: &str) -> Option<u64> {
    // Field 2, the command name, is in parentheses and may hold spaces and parentheses:
    // the fields after the last ')' are fields 3, 4, ...
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(22 - 3)?.parse().ok()
}

/// Every file of the pattern, by pid.
fn files_of(pattern: &Path) -> Result<Vec<(u32, PathBuf)>, String> {
    let dir = match pattern.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = pattern
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let entries = std::fs::read_dir(&dir).map_err(|e| {
        format!(
            "{}: {e} (the directory of the per-process files {})",
            dir.display(),
            pattern.display()
        )
    })?;
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| format!("{}: {e}", dir.display()))?;
        let Some(candidate) = entry.file_name().to_str().map(str::to_string) else {
            continue;
        };
        if let Some(pid) = pid_of(&name, &candidate) {
            found.push((pid, dir.join(&candidate)));
        }
    }
    found.sort();
    Ok(found)
}

/// Whether the file name `candidate` is one of `pattern`'s (its file name with each `{pid}`
/// replaced by one process id), whatever the directories.
pub fn is_process_file_name(pattern: &Path, candidate: &Path) -> bool {
    let name = |p: &Path| p.file_name().map(|n| n.to_string_lossy().into_owned());
    match (name(pattern), name(candidate)) {
        (Some(pattern), Some(candidate)) => pid_of(&pattern, &candidate).is_some(),
        _ => false,
    }
}

/// The process id `candidate` names, when it is `pattern` with each `{pid}` replaced by the
/// same decimal id.
fn pid_of(pattern: &str, candidate: &str) -> Option<u32> {
    let prefix = pattern.split(PID_PLACEHOLDER).next()?;
    let rest = candidate.strip_prefix(prefix)?;
    let run = rest.bytes().take_while(u8::is_ascii_digit).count();
    // A digit may follow `{pid}` in the pattern (`kvh-{pid}0.prom`): each length of the run
    // of digits is tried. The id as the writer prints it (no leading zero), and the whole
    // name must match.
    (1..=run).find_map(|len| {
        let digits = &rest[..len];
        let pid: u32 = digits.parse().ok()?;
        (pid.to_string() == digits && pattern.replace(PID_PLACEHOLDER, digits) == candidate)
            .then_some(pid)
    })
}

/// Whether process `pid` runs in this pid namespace: a process, not a thread of another
/// (`kill(pid, 0)` also answers for thread ids, which come from the same pool), and not one
/// that exited and waits to be reaped (a zombie also answers the signal; an engine that is
/// its container's pid 1 may never reap a worker), when `/proc` says which.
pub fn alive(pid: u32) -> bool {
    // The reader writes no metrics file: a file named with its id is a writer's of another pid
    // namespace (a sidecar that does not share the engine's, both pid 1) or of a process that
    // ended, whose id the reader now holds.
    if pid == std::process::id() || !signalable(pid) {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/status")) {
        Ok(status) => running_process(&status, pid),
        // No /proc here: the signal's answer stands.
        Err(_) => true,
    }
}

/// Whether `/proc/PID/status` text describes process `pid` (its thread group leader) that has
/// not exited. `State:` is the leader thread's: a zombie (`Z`) or dead (`X`) leader is an
/// exited process only when it is the process's last thread, since a main thread that ended
/// (`pthread_exit`) shows as a zombie while the process's other threads run on.
fn running_process(status: &str, pid: u32) -> bool {
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
    };
    let leader = field("Tgid:").is_some_and(|tgid| tgid == pid.to_string());
    let leader_ended = field("State:").is_some_and(|s| s.starts_with('Z') || s.starts_with('X'));
    let other_threads = field("Threads:")
        .and_then(|n| n.parse::<u64>().ok())
        .is_some_and(|n| n > 1);
    leader && (!leader_ended || other_threads)
}

/// Whether `kill(pid, 0)` finds `pid` (a process or a thread).
fn signalable(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    if pid <= 0 {
        return false;
    }
    // SAFETY: signal 0 sends nothing: the call only checks that the process exists and may
    // be signalled; it has no other effect.
    if unsafe { libc::kill(pid, 0) } == 0 {
        return true;
    }
    // EPERM: it exists, under another user.
    std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The files found, by kind: a file whose process id a live process holds now is not
    /// called the file of a process that is gone.
    #[test]
    fn no_live_file_says_what_was_found_instead() {
        let p = Path::new("/run/kvh/metrics-{pid}.prom");
        let none = none_live(p, 0, 0);
        assert!(none.contains("(no file of any process)"), "{none}");
        let gone = none_live(p, 2, 0);
        assert!(
            gone.contains("(2 files of processes that are gone)"),
            "{gone}"
        );
        let reused = none_live(p, 0, 1);
        assert!(!reused.contains("gone"), "{reused}");
        assert!(
            reused.contains("1 file of an earlier holder of a process id"),
            "{reused}"
        );
        let both = none_live(p, 1, 3);
        assert!(
            both.contains("(1 file of a process that is gone, 3 files of earlier holders"),
            "{both}"
        );
    }

    #[test]
    fn a_file_written_before_its_pid_s_process_started_is_told_apart() {
        let me = std::process::id();
        let start = process_start(me).expect("this process's start, from /proc");
        let now = SystemTime::now();
        assert!(start <= now, "{start:?} is after {now:?}");
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("kvh.prom");
        let f = std::fs::File::create(&file).unwrap();
        assert!(!written_before_start(me, &file), "written now");
        f.set_modified(start - Duration::from_secs(3600)).unwrap();
        assert!(
            written_before_start(me, &file),
            "written an hour before this process"
        );
        f.set_modified(start - Duration::from_secs(1)).unwrap();
        assert!(!written_before_start(me, &file), "within the margin");
        assert!(!written_before_start(me, &dir.path().join("none")));
    }

    #[test]
    fn a_file_with_its_writer_s_identity_belongs_to_the_process_with_that_identity_only() {
        let me = std::process::id();
        let mine = ProcessIdentity::of(me).expect("this process's identity, from /proc");
        assert_eq!(ProcessIdentity::of_this_process(), Some(mine.clone()));
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("kvh.prom");
        let f = std::fs::File::create(&file).unwrap();
        // Seemingly written an hour before this process started (a wall clock stepped
        // forward since): the identity decides, not the time.
        let start = process_start(me).unwrap();
        f.set_modified(start - Duration::from_secs(3600)).unwrap();
        assert!(belongs_to(me, &file, Some(&mine)));
        assert!(
            !belongs_to(me, &file, None),
            "no identity: the time decides"
        );
        // Written just now, by another process that held the id before.
        f.set_modified(SystemTime::now()).unwrap();
        assert!(belongs_to(me, &file, None));
        let earlier = ProcessIdentity {
            start_ticks: mine.start_ticks - 1,
            ..mine.clone()
        };
        assert!(!belongs_to(me, &file, Some(&earlier)));
        let other_boot = ProcessIdentity {
            boot_id: "0".into(),
            ..mine
        };
        assert!(!belongs_to(me, &file, Some(&other_boot)));
    }

    #[test]
    fn the_start_in_ticks_is_read_after_a_command_name_holding_parentheses_and_spaces() {
        let fields_3_to_21 = "S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18";
        let stat = format!("77 (a) b (c) {fields_3_to_21} 4242 99 100\n");
        assert_eq!(start_ticks_in(&stat), Some(4242));
        assert_eq!(start_ticks_in("77 (a) S 1 2"), None, "too few fields");
        assert_eq!(start_ticks_in("77 a S"), None, "no command name");
        let me = std::process::id().to_string();
        assert_eq!(start_ticks("self"), start_ticks(&me));
        assert!(start_ticks(&me).is_some());
        assert_eq!(start_ticks("no-such-entry"), None);
    }

    #[test]
    fn a_file_names_a_pid_when_it_is_the_pattern_with_an_id_in_each_placeholder() {
        assert_eq!(pid_of("kvh-{pid}.prom", "kvh-42.prom"), Some(42));
        assert_eq!(pid_of("{pid}", "7"), Some(7));
        assert_eq!(pid_of("a{pid}b{pid}.prom", "a9b9.prom"), Some(9));
        for other in [
            "kvh-.prom",
            "kvh-42.prom.tmp",
            "kvh-042.prom",
            "kvh-4x.prom",
            "x-42.prom",
            "kvh-99999999999.prom",
        ] {
            assert_eq!(pid_of("kvh-{pid}.prom", other), None, "{other}");
        }
        assert_eq!(pid_of("a{pid}b{pid}.prom", "a9b8.prom"), None);
        // A digit after the placeholder.
        assert_eq!(pid_of("kvh-{pid}0.prom", "kvh-1200.prom"), Some(120));
        assert_eq!(pid_of("kvh-{pid}0.prom", "kvh-0.prom"), None);
        assert_eq!(pid_of("kvh-{pid}07.prom", "kvh-5007.prom"), Some(50));
    }

    #[test]
    fn a_pattern_takes_pid_in_the_file_name_only() {
        assert_eq!(
            Target::of("/run/kvh/kvh.prom".into()),
            Ok(Target::One("/run/kvh/kvh.prom".into()))
        );
        assert_eq!(
            Target::of("/run/kvh/kvh-{pid}.prom".into()),
            Ok(Target::PerProcess("/run/kvh/kvh-{pid}.prom".into()))
        );
        let err = Target::of("/run/{pid}/kvh-{pid}.prom".into()).unwrap_err();
        assert!(err.contains("file name only"), "{err}");
        assert!(Target::of("/run/{pid}/kvh.prom".into()).is_err());
        let err = Target::of("/run/kvh/{pid}/".into()).unwrap_err();
        assert!(err.contains("file name only"), "{err}");
    }

    #[test]
    fn a_zombie_or_a_thread_is_not_a_running_process_but_one_whose_main_thread_ended_is() {
        let status = |state: &str, tgid: u32| {
            format!("Name:\tpython\nState:\t{state}\nTgid:\t{tgid}\nThreads:\t1\n")
        };
        assert!(running_process(&status("S (sleeping)", 7), 7));
        assert!(running_process(&status("R (running)", 7), 7));
        assert!(!running_process(&status("Z (zombie)", 7), 7));
        assert!(!running_process(&status("X (dead)", 7), 7));
        assert!(!running_process(&status("S (sleeping)", 6), 7));
        assert!(!running_process("Name:\tx\n", 7));
        // The main thread ended, another thread runs on: the process runs.
        let threads = status("Z (zombie)", 7).replace("Threads:\t1", "Threads:\t2");
        assert!(running_process(&threads, 7));
    }

    /// Above the kernel's pid_max (at most 2^22): no process has it.
    const ENDED: u32 = 1 << 23;

    fn listed(live: &[u32]) -> ProcessFiles {
        ProcessFiles {
            live: live
                .iter()
                .map(|&p| (p, PathBuf::from(format!("kvh-{p}.prom"))))
                .collect(),
            gone: Vec::new(),
        }
    }

    /// A live process for a test to kill and reap.
    fn sleeping() -> std::process::Child {
        std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .expect("sleep runs")
    }

    #[test]
    fn a_process_that_ended_while_its_file_was_read_is_gone_not_judged() {
        let pattern = Path::new("kvh-{pid}.prom");
        let mut child = sleeping();
        let running = child.id();
        // Loaded and failed, but ended: gone. Loaded and failed while running: judged.
        let judged = judge_live(
            pattern,
            listed(&[running, ENDED]),
            |_, _| Ok(Some(())),
            |_, _| false,
            |passed| *passed,
        );
        let _ = child.kill();
        let _ = child.wait();
        let judged = judged.expect("one process judged");
        assert_eq!(judged.processes, vec![(running, (), false)]);
        assert_eq!(
            judged.gone,
            vec![GoneFile::of((ENDED, "kvh-8388608.prom".into()), false)]
        );
        // Its file unreadable because it ended: gone; nothing judged is an error.
        let err = judge_live(
            pattern,
            listed(&[ENDED]),
            |_, _| Ok(None::<()>),
            |_, _| true,
            |passed| *passed,
        )
        .err()
        .expect("nothing judged");
        assert!(err.contains("(1 file of a process that is gone)"), "{err}");
    }

    #[test]
    fn a_live_processs_file_another_process_wrote_is_an_earlier_holders() {
        let pattern = Path::new("kvh-{pid}.prom");
        let mut child = sleeping();
        let running = child.id();
        // Not the running process's to judge (`load` answers None): an earlier holder of its
        // id wrote it. Nothing else judged: the error counts it as such, not as gone.
        let err = judge_live(
            pattern,
            listed(&[running]),
            |_, _| Ok(None::<()>),
            |_, _| true,
            |passed| *passed,
        )
        .err()
        .expect("nothing judged");
        let _ = child.kill();
        let _ = child.wait();
        assert!(err.contains("1 file of an earlier holder"), "{err}");
        assert!(!err.contains("gone"), "{err}");
        let file = GoneFile::of((running, "kvh-7.prom".into()), true);
        assert!(file.note("judged").contains("earlier holder of process id"));
    }

    #[test]
    fn a_running_process_is_alive_and_an_unused_pid_or_the_reader_itself_is_not() {
        let mut child = sleeping();
        let running = alive(child.id());
        let _ = child.kill();
        let _ = child.wait();
        assert!(running);
        assert!(!alive(std::process::id()));
        // Above the kernel's pid_max (at most 2^22).
        assert!(!alive(1 << 23));
        assert!(!alive(0));
        assert!(!alive(u32::MAX));
    }
}

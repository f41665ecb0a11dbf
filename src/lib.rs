//! kvhygiene: verified zeroization of freed GPU memory for multi-tenant LLM inference.
//!
//! Crate map (one module, one job; dependencies point downwards only):
//!
//! - [`ffi`]: every `extern "C"` export (PyTorch's pluggable-allocator ABI and the rest of the
//!   C API), the panic boundary and the error codes. Nothing else lives there.
//! - [`alloc`]: the caching pool: size classes, the block table, the block state machine
//!   (LIVE → PENDING → CLEAN / QUARANTINED → RELEASED), batching and policies.
//! - [`backend`]: the narrow [`backend::Backend`] trait the pool drives, the host (CPU memory)
//!   backend and the shared sampled-verification rule.
//! - [`events`]: the structured security events the pool emits and the [`events::EventSink`]
//!   trait that consumers (the forensic log) implement.
//! - [`anomaly`]: the anomaly detector ("activation logger"), an [`events::EventSink`] layer
//!   in front of the log that turns bursts and surges of security events per tenant into
//!   `anomaly` records.
//! - [`forensic`]: the hash-chained, HMAC-sealed forensic log, its writer thread and `verify-log`.
//! - [`context`]: per-thread tenant / request / model ids, validated at the boundary.
//! - [`config`]: the policy, read from `KVH_*` variables or a TOML file, validated once, and
//!   the `config` verb that reports it and the controls it weakens.
//! - [`stats`]: counters and latency histograms of the pool, serialised as JSON.
//! - [`metrics`]: the Prometheus exposition of the statistics, the metrics file and the HTTP
//!   exporter, and the `metrics` / `serve-metrics` verbs.
//! - [`demo`]: the multi-tenant simulation behind `kvh demo`.
//! - [`gate`]: `kvh gate`, whether a process may keep serving tenants (its metrics snapshot and
//!   forensic log judged as one exit status).
//! - [`preflight`]: `kvh preflight`, the start-up's checks (policy, log directory and keys,
//!   metrics exports, backend) made without starting, before a server loads its model.
//! - [`report_out`]: standard output for the verbs' reports, a failed write remembered
//!   rather than a panic.
//!
//! The C header `include/kvhygiene.h` is generated from [`ffi`] by cbindgen.

// Messages go to stderr through `say` / `stderr_line`, never `eprintln!`: it panics when fd 2
// cannot be written (a closed pipe, a full device), in the middle of an allocation or of a
// verb whose exit status a script reads.
#![cfg_attr(not(test), warn(clippy::print_stderr))]

pub mod alloc;
pub mod anomaly;
pub mod backend;
pub mod config;
pub mod context;
pub mod demo;
pub mod events;
pub mod ffi;
pub mod forensic;
mod fork_closed;
pub mod gate;
pub mod metrics;
pub mod preflight;
pub mod report_out;
pub mod stats;

/// Writes one line on stderr for the operator, ignoring a failure. The allocator runs inside
/// servers whose stderr may be closed (EPIPE): `eprintln!` would turn that into a panic in the
/// middle of an allocation, a free or an abort for a failed verification.
pub(crate) fn say(line: std::fmt::Arguments<'_>) {
    stderr_line(&line.to_string());
}

/// Marks this process not dumpable (`PR_SET_DUMPABLE` 0): no core dump is written of it,
/// through a `core_pattern` pipe to a crash collector either, and only root may read its
/// memory. For the `kvh` tool, whose verbs hold keys (the HMAC secrets of `verify-log`,
/// `evidence`, `prune-log`, `tail-log` and `gate`, the signing key of `keygen` and `demo`)
/// that a core would carry to wherever cores are kept. The library, inside a server, leaves
/// the process's policy to its owner.
#[doc(hidden)]
pub fn forbid_core_dumps() -> std::io::Result<()> {
    // SAFETY: PR_SET_DUMPABLE takes an int and changes one flag of this process; the unused
    // arguments are zero, as prctl(2) asks.
    let rc = unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// What is wrong with JSON read from a file someone named, quoting nothing of it: serde's
/// own message quotes a value of the wrong type (`invalid type: integer `797094167``), which
/// in a key file named by mistake is part of the key. Its kind and place only.
pub fn json_error_without_content(e: &serde_json::Error) -> String {
    use serde_json::error::Category;
    let what = match e.classify() {
        Category::Io => "unreadable",
        Category::Syntax => "not JSON",
        Category::Data => "JSON of another shape",
        Category::Eof => "JSON cut short",
    };
    format!("{what} at line {} column {}", e.line(), e.column())
}

/// [`say`] without the line break: a progress line rewritten in place (`\r`).
pub(crate) fn say_text(text: std::fmt::Arguments<'_>) {
    stderr_text(&text.to_string());
}

/// Writes `line` and a line break to file descriptor 2 with `write(2)`, ignoring a failure.
/// Not through `std::io::stderr()`: its lock is held for as long as a write blocks (a full
/// pipe), and a child forked meanwhile by another thread inherits the lock held by a thread
/// it does not have, so the child's first message would wait for ever. The line is built
/// first and written in one call, in this process's turn ([`LineTurn`]): a line a pipe takes
/// in several writes (over `PIPE_BUF` bytes, or into a full pipe) is not cut by another
/// thread's. Shared with the interposer library.
#[doc(hidden)]
pub fn stderr_line(line: &str) {
    let mut text = Vec::with_capacity(line.len() + 1);
    text.extend_from_slice(line.as_bytes());
    text.push(b'\n');
    write_stderr(&text);
}

/// Says `line` on stderr ([`stderr_line`]) for the first `limit` calls that `said` (a static
/// of the caller's) counts, the last of them ending with `; {further}`: for failures a caller
/// may retry in a loop, whose reasons would otherwise flood stderr. Shared with the
/// interposer library.
#[doc(hidden)]
pub fn say_first(
    said: &std::sync::atomic::AtomicU64,
    limit: u64,
    line: std::fmt::Arguments<'_>,
    further: &str,
) {
    let n = said.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    match said_as(n, limit) {
        Some(false) => stderr_line(&line.to_string()),
        Some(true) => stderr_line(&format!("{line}; {further}")),
        None => {}
    }
}

/// Whether the call counted `n` (from 0) of [`say_first`] is said, and if so whether it is
/// the last one said.
fn said_as(n: u64, limit: u64) -> Option<bool> {
    // Lazily: `n + 1` would overflow for the counter's last value.
    (n < limit).then(|| n + 1 == limit)
}

#[cfg(test)]
mod say_first_tests {
    #[test]
    fn the_first_calls_are_said_the_last_of_them_says_so_and_no_more() {
        assert_eq!(super::said_as(0, 16), Some(false));
        assert_eq!(super::said_as(14, 16), Some(false));
        assert_eq!(super::said_as(15, 16), Some(true));
        assert_eq!(super::said_as(16, 16), None);
        assert_eq!(super::said_as(u64::MAX, 16), None);
    }
}

/// [`stderr_line`] without the line break.
#[doc(hidden)]
pub fn stderr_text(text: &str) {
    write_stderr(text.as_bytes());
}

/// Writes `text` to file descriptor 2 in one turn ([`LineTurn`]), ignoring a failure.
fn write_stderr(text: &[u8]) {
    let _turn = LineTurn::take();
    let mut rest = text;
    while !rest.is_empty() {
        // SAFETY: `rest` is a live byte slice and `write` reads at most `rest.len()` bytes of
        // it; fd 2 is only written to (a closed one fails with EBADF, which is ignored).
        let n = unsafe { libc::write(libc::STDERR_FILENO, rest.as_ptr().cast(), rest.len()) };
        match usize::try_from(n) {
            Ok(n) if n > 0 => rest = &rest[n.min(rest.len())..],
            // -1 with EINTR: tried again. 0 (nothing written) or another error: given up.
            Err(_) if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted => {
            }
            _ => return,
        }
    }
}

/// The pid of the process whose thread is writing a line, or 0. A pid, not a mutex: a child
/// forked while a thread of its parent was writing inherits the mark of a thread it does not
/// have, and takes the turn over at once (its pid differs) instead of waiting on it.
static LINE_WRITER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// How long a line waits for another thread's (blocked on a full pipe, say) before it is
/// written all the same.
const LINE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// This process's turn to write a line on stderr, given back when dropped; none (the line is
/// written regardless) after [`LINE_WAIT`].
struct LineTurn(bool);

impl LineTurn {
    fn take() -> LineTurn {
        use std::sync::atomic::Ordering;
        let me = std::process::id();
        let deadline = std::time::Instant::now() + LINE_WAIT;
        loop {
            match LINE_WRITER.compare_exchange(0, me, Ordering::Acquire, Ordering::Relaxed) {
                Ok(_) => return LineTurn(true),
                // Marked by another process: the parent this child was forked from.
                Err(other) if other != me => {
                    if LINE_WRITER
                        .compare_exchange(other, me, Ordering::Acquire, Ordering::Relaxed)
                        .is_ok()
                    {
                        return LineTurn(true);
                    }
                }
                Err(_) => {}
            }
            if std::time::Instant::now() >= deadline {
                return LineTurn(false);
            }
            std::thread::sleep(std::time::Duration::from_micros(100));
        }
    }
}

impl Drop for LineTurn {
    fn drop(&mut self) {
        if self.0 {
            LINE_WRITER.store(0, std::sync::atomic::Ordering::Release);
        }
    }
}

/// `text` with its control characters (line breaks included) and its invisible ones (format
/// characters such as bidirectional overrides, line and paragraph separators) written as
/// `\u{..}` escapes, for a report on a terminal: text from a file anyone who can write it
/// chose (a metrics label, a policy's path) must neither send an escape sequence to the
/// terminal, nor forge a line, nor show as other text than it is.
pub(crate) fn printable(text: &str) -> String {
    text.chars()
        .map(|c| {
            if context::unprintable(c) {
                c.escape_unicode().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// A path for a report on a terminal: [`printable`] of its text, with bytes that are not
/// UTF-8 shown as U+FFFD (the `--json` reports give such a path as a shell word beside it).
pub(crate) fn printable_path(path: &std::path::Path) -> String {
    printable(&path.to_string_lossy())
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::process::{Command, Stdio};

    /// In a forked child (the flag is the process's): dumpable before, not after.
    #[test]
    fn a_process_that_forbids_core_dumps_is_not_dumpable() {
        // SAFETY: the child makes only system calls (prctl, _exit) before it exits: safe in
        // the child of a multi-threaded process.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
        if pid == 0 {
            // SAFETY: PR_SET_DUMPABLE takes an int, PR_GET_DUMPABLE none; _exit ends the
            // child at once. Made dumpable first, so that the test cannot pass on a process
            // that was not (the flag a set-user-ID start leaves).
            unsafe {
                libc::prctl(libc::PR_SET_DUMPABLE, 1, 0, 0, 0);
                let before = libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0);
                let forbidden = super::forbid_core_dumps().is_ok();
                let after = libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0);
                libc::_exit(if before == 1 && forbidden && after == 0 {
                    0
                } else {
                    1
                });
            }
        }
        let mut status = 0;
        // SAFETY: waits for the child just forked; `status` is a valid out pointer.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "status {status}"
        );
    }

    #[test]
    fn printable_escapes_what_would_show_as_other_text() {
        // A right-to-left override, a line separator, a zero-width space, an escape.
        let shown = super::printable("/var/log/\u{202E}gol\u{2028}x\u{200B}y\u{1b}[2J");
        assert_eq!(shown, "/var/log/\\u{202e}gol\\u{2028}x\\u{200b}y\\u{1b}[2J");
        assert_eq!(super::printable("ünïcode path"), "ünïcode path");
    }

    /// Runs the test `name` of this module again in a child process with `flag` set (the test
    /// then plays the child) and returns its stderr, a pipe read only after 500 ms: writes of
    /// more than the pipe holds block until then.
    fn stderr_read_late(name: &str, flag: &str) -> Vec<u8> {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                &format!("tests::{name}"),
                "--test-threads=1",
                "--nocapture",
                "--quiet",
            ])
            .env(flag, "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(500));
        let mut err = Vec::new();
        child.stderr.take().unwrap().read_to_end(&mut err).unwrap();
        assert!(child.wait().unwrap().success());
        err
    }

    fn lines_of(text: &[u8]) -> Vec<&[u8]> {
        text.split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .collect()
    }

    /// Set in the child process of the test below.
    const STUCK_CHILD: &str = "KVHYGIENE_TEST_STDERR_STUCK_CHILD";

    /// A line whose turn another thread of this process holds for longer than the wait (a
    /// writer stuck on a full pipe) is written all the same after it, and leaves that
    /// thread's turn alone: it does not release what it never took.
    #[test]
    fn a_line_waits_for_a_stuck_writer_at_most_the_wait_and_leaves_its_turn() {
        use std::sync::atomic::Ordering;
        if std::env::var_os(STUCK_CHILD).is_some() {
            let me = std::process::id();
            super::LINE_WRITER.store(me, Ordering::SeqCst);
            let began = std::time::Instant::now();
            super::say(format_args!("a line written after the wait"));
            let waited = began.elapsed();
            assert!(waited >= super::LINE_WAIT, "waited only {waited:?}");
            assert!(waited < super::LINE_WAIT * 3, "waited {waited:?}");
            assert_eq!(super::LINE_WRITER.load(Ordering::SeqCst), me);
            return;
        }
        let err = stderr_read_late(
            "a_line_waits_for_a_stuck_writer_at_most_the_wait_and_leaves_its_turn",
            STUCK_CHILD,
        );
        assert!(
            String::from_utf8_lossy(&err).contains("a line written after the wait"),
            "{}",
            String::from_utf8_lossy(&err)
        );
    }

    /// Set in the child process the test below starts.
    const CHILD: &str = "KVHYGIENE_TEST_STDERR_LINES_CHILD";
    const LINE: usize = 1 << 20;

    /// Lines said on stderr by several threads at once reach it whole, one after the other,
    /// also lines longer than `PIPE_BUF` written to a pipe that fills up (a supervisor that
    /// reads stderr slowly): no line is cut by another thread's.
    #[test]
    fn long_lines_said_by_two_threads_at_once_do_not_interleave() {
        if std::env::var_os(CHILD).is_some() {
            let a = "a".repeat(LINE);
            let b = "b".repeat(LINE);
            std::thread::scope(|s| {
                s.spawn(|| super::say(format_args!("{a}")));
                s.spawn(|| super::say(format_args!("{b}")));
            });
            return;
        }
        let err = stderr_read_late(
            "long_lines_said_by_two_threads_at_once_do_not_interleave",
            CHILD,
        );
        let lines = lines_of(&err);
        let whole = |l: &[u8]| l.len() == LINE && l.iter().all(|&c| c == l[0]);
        assert!(
            lines.len() == 2 && lines.iter().all(|l| whole(l)),
            "stderr holds {} lines of lengths {:?}, not two whole lines of {LINE} bytes",
            lines.len(),
            lines.iter().map(|l| l.len()).collect::<Vec<_>>()
        );
    }

    /// Set in the child process of the test below.
    const MIXED_CHILD: &str = "KVHYGIENE_TEST_STDERR_MIXED_CHILD";

    /// A long line (over `PIPE_BUF`) said while another thread says a short one, on a pipe
    /// that fills up: each reaches stderr whole, one after the other; the short line is not
    /// written into the middle of the long one.
    #[test]
    fn a_short_line_said_while_a_long_one_is_written_does_not_cut_it() {
        if std::env::var_os(MIXED_CHILD).is_some() {
            let long = "a".repeat(LINE);
            std::thread::scope(|s| {
                s.spawn(|| super::say(format_args!("{long}")));
                s.spawn(|| {
                    // The long line is blocked on the full pipe by now.
                    std::thread::sleep(std::time::Duration::from_millis(100));
                    super::say(format_args!("{}", "b".repeat(100)));
                });
            });
            return;
        }
        let err = stderr_read_late(
            "a_short_line_said_while_a_long_one_is_written_does_not_cut_it",
            MIXED_CHILD,
        );
        let lines = lines_of(&err);
        let lengths: Vec<usize> = lines.iter().map(|l| l.len()).collect();
        let whole = |l: &[u8]| l.iter().all(|&c| c == l[0]);
        assert!(
            lines.len() == 2 && lines.iter().all(|l| whole(l)) && lengths.contains(&LINE),
            "stderr holds {} lines of lengths {lengths:?}, not a whole line of {LINE} bytes \
             and one of 100",
            lines.len()
        );
    }
}

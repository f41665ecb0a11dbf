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

pub mod alloc;
pub mod anomaly;
pub mod backend;
pub mod config;
pub mod context;
pub mod demo;
pub mod events;
pub mod ffi;
pub mod forensic;
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

/// Writes `line` and a line break to file descriptor 2 with `write(2)`, ignoring a failure.
/// Not through `std::io::stderr()`: its lock is held for as long as a write blocks (a full
/// pipe), and a child forked meanwhile by another thread inherits the lock held by a thread
/// it does not have, so the child's first message would wait for ever. The line is built
/// first and written in one call: a pipe takes up to `PIPE_BUF` bytes whole, so shorter lines
/// of several threads never interleave. A longer line is written under [`LONG_LINES`], waited
/// for at most [`LONG_LINE_WAIT`] (then written all the same: the lock may be one a forked
/// child inherited held). Shared with the interposer library.
#[doc(hidden)]
pub fn stderr_line(line: &str) {
    let mut text = Vec::with_capacity(line.len() + 1);
    text.extend_from_slice(line.as_bytes());
    text.push(b'\n');
    let _turn = (text.len() > libc::PIPE_BUF).then(long_line_turn).flatten();
    let mut rest = text.as_slice();
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

/// Taken while a line longer than `PIPE_BUF` is written, which the pipe may split.
static LONG_LINES: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// How long a long line waits for another one to be written.
const LONG_LINE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// [`LONG_LINES`], or `None` once [`LONG_LINE_WAIT`] has passed without it.
fn long_line_turn() -> Option<std::sync::MutexGuard<'static, ()>> {
    let deadline = std::time::Instant::now() + LONG_LINE_WAIT;
    loop {
        match LONG_LINES.try_lock() {
            Ok(turn) => return Some(turn),
            Err(std::sync::TryLockError::Poisoned(p)) => return Some(p.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => {}
        }
        if std::time::Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(std::time::Duration::from_micros(200));
    }
}

/// `text` with its control characters (line breaks included) written as `\u{..}` escapes, for
/// a report on a terminal: text from a file anyone who can write it chose (a metrics label, a
/// policy's path) must neither send an escape sequence to the terminal nor forge a line.
pub(crate) fn printable(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_unicode().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::process::{Command, Stdio};

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
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "tests::long_lines_said_by_two_threads_at_once_do_not_interleave",
                "--test-threads=1",
                "--nocapture",
                "--quiet",
            ])
            .env(CHILD, "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Both threads block on the full pipe before anything is read.
        std::thread::sleep(std::time::Duration::from_millis(500));
        let mut err = Vec::new();
        child.stderr.take().unwrap().read_to_end(&mut err).unwrap();
        assert!(child.wait().unwrap().success());
        let lines: Vec<&[u8]> = err
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .collect();
        let whole = |l: &[u8]| l.len() == LINE && l.iter().all(|&c| c == l[0]);
        assert!(
            lines.len() == 2 && lines.iter().all(|l| whole(l)),
            "stderr holds {} lines of lengths {:?}, not two whole lines of {LINE} bytes",
            lines.len(),
            lines.iter().map(|l| l.len()).collect::<Vec<_>>()
        );
    }
}

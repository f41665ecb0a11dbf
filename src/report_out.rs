//! Standard output for a verb's report, written without panicking.
//!
//! `println!` panics when stdout cannot be written (a full disk, a closed pipe), which would
//! end a verb half-way (a `prune-log` between two chains) with status 101. A [`ReportOut`]
//! remembers the first failure instead and stops writing; the verb finishes its work and
//! then says the report was lost, with its own exit status.
//!
//! A closed pipe is not such a failure: the reader of stdout went away (`kvh verify-log DIR |
//! head`) having taken what it wanted, so nothing is said and the verb's status is that of
//! its findings ([`reader_may_leave`]). `kvh tail-log` is the exception and does not use
//! this: there a reader gone means records not delivered.

use std::fmt;
use std::io::{self, Write};
use std::path::Path;

/// Lines of a report on stdout; the first write error is kept for [`ReportOut::finish`].
#[derive(Debug, Default)]
pub struct ReportOut {
    failed: Option<io::Error>,
}

impl ReportOut {
    pub fn new() -> Self {
        Self::default()
    }

    /// Writes `text` as it is, unless an earlier write failed.
    pub fn text(&mut self, text: &str) {
        if self.failed.is_none() {
            if let Err(e) = io::stdout().lock().write_all(text.as_bytes()) {
                self.failed = Some(e);
            }
        }
    }

    /// Writes one line.
    pub fn line(&mut self, line: fmt::Arguments<'_>) {
        self.text(&format!("{line}\n"));
    }

    /// Writes a whole report; `false` (said on stderr, naming `verb`) when it could not be
    /// written, which the verbs report with their usage status.
    pub fn print(verb: &str, text: &str) -> bool {
        let mut out = ReportOut::new();
        out.text(text);
        match out.finish() {
            Ok(()) => true,
            Err(e) => {
                crate::say(format_args!("kvh {verb}: cannot write the report: {e}"));
                false
            }
        }
    }

    /// Flushes stdout; the first error of the report, if any, but a closed pipe
    /// ([`reader_may_leave`]).
    pub fn finish(mut self) -> io::Result<()> {
        if self.failed.is_none() {
            if let Err(e) = io::stdout().lock().flush() {
                self.failed = Some(e);
            }
        }
        reader_may_leave(self.failed.map_or(Ok(()), Err))
    }
}

/// A verb's `--json` form when it could not make its check (its usage status, before any
/// report was written): one JSON object on stdout in the report's place, `{"error": TEXT}`
/// with `verdict`'s fields (the report's own verdict field, saying so), so that a script
/// reading that field (`jq -r .verdict`) reads that nothing was judged, not nothing at all.
/// The message is said on stderr too, by the verb. A write that fails is let go: stderr
/// already has the message, and the status says it.
pub fn json_error(error: &str, verdict: serde_json::Value) {
    let mut object = match verdict {
        serde_json::Value::Object(fields) => fields,
        _ => serde_json::Map::new(),
    };
    object.insert("error".into(), error.into());
    let mut out = io::stdout().lock();
    let _ = serde_json::to_writer(&mut out, &object)
        .map_err(io::Error::from)
        .and_then(|()| writeln!(out))
        .and_then(|()| out.flush());
}

/// `status` when a verb's report was written (a closed pipe counts: [`reader_may_leave`]);
/// else `usage`, after saying on stderr that `verb`'s report could not be written.
pub fn status_if_written(verb: &str, written: io::Result<()>, status: i32, usage: i32) -> i32 {
    match reader_may_leave(written) {
        Ok(()) => status,
        Err(e) => {
            crate::say(format_args!("kvh {verb}: cannot write the report: {e}"));
            usage
        }
    }
}

/// `written`, with a closed pipe taken as written (see the module's documentation).
pub fn reader_may_leave(written: io::Result<()>) -> io::Result<()> {
    match written {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
}

/// A path in a `--json` report: its text when it is UTF-8, else null. Text with U+FFFD for
/// the bytes that are not UTF-8 would name another file, one a script would then fail to
/// open (or open in its place); each such field has a `*_shell` field beside it that names
/// the path whatever its bytes, as one shell word (`kvh demo --json` does the same).
pub fn path_or_null<S: serde::Serializer>(path: &Path, s: S) -> Result<S::Ok, S::Error> {
    serde::Serialize::serialize(&path.to_str(), s)
}

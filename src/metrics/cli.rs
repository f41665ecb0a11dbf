//! The `metrics` and `serve-metrics` verbs. The binary only parses and dispatches; the logic
//! is here so that it is tested as a library.

use crate::forensic::cli::shell_word;
use crate::{printable, printable_path};
use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use super::encode::{
    format_f64, BUILD_INFO, CONTENT_TYPE, PROCESS_START_TICKS, SNAPSHOT_TIMESTAMP,
};
use super::http::{self, Response};
use super::parse::{self, Exposition};
use super::per_process::{self, ProcessIdentity, Target};
use crate::config::{read_regular_file, Config};
use crate::forensic::verify::rfc3339;

/// Exit code: the snapshot is fresh (and, when asked, shows no security failure).
pub const EXIT_OK: i32 = 0;
/// Exit code: the snapshot is stale, or under `--fail-on-security` shows a security failure
/// or lacks a checked series.
pub const EXIT_FAILED: i32 = 1;
/// Exit code: usage error, or the file is missing, unreadable, not a metrics snapshot, or
/// dated more than [`MAX_FUTURE_SECS`] in the future.
pub const EXIT_USAGE: i32 = 2;

/// Largest metrics file read (a snapshot is a few kilobytes).
pub const MAX_FILE_BYTES: u64 = 1 << 20;

/// How far in the future a snapshot's timestamp may be (clock adjustments) before the
/// snapshot is refused: its age, hence its staleness, cannot be judged.
pub const MAX_FUTURE_SECS: f64 = 5.0;

/// The body of every 503 of `serve-metrics`: the details (which name the file, and quote
/// nothing of it) go to its stderr only.
pub const UNAVAILABLE_BODY: &str =
    "kvh serve-metrics: metrics file missing, stale or not a kvhygiene snapshot\n";

/// A sample that, when non-zero, means the control failed or evidence was lost.
#[derive(Debug)]
pub struct SecurityCheck {
    pub metric: &'static str,
    pub labels: &'static [(&'static str, &'static str)],
    pub what: &'static str,
}

/// What `--fail-on-security` checks. Quarantines alone are not failures (a policy such as
/// a non-positive idle TTL quarantines every freed block), nor are invalid frees (caller
/// bugs the allocator refused); both are in the metrics for alerting rules.
pub const SECURITY_CHECKS: &[SecurityCheck] = &[
    SecurityCheck {
        metric: "kvh_verifications_total",
        labels: &[("result", "failed")],
        what: "scrub verifications failed",
    },
    SecurityCheck {
        metric: "kvh_residue_detected_total",
        labels: &[],
        what: "blocks written to after their free (residue)",
    },
    SecurityCheck {
        metric: "kvh_rescrub_failures_total",
        labels: &[],
        what: "quarantined blocks whose re-scrub failed",
    },
    SecurityCheck {
        metric: "kvh_kv_failed_blocks_total",
        labels: &[],
        what: "paged KV cache blocks whose scrub failed",
    },
    SecurityCheck {
        metric: "kvh_log_records_lost_total",
        labels: &[],
        what: "forensic log records lost",
    },
    SecurityCheck {
        metric: "kvh_async_error",
        labels: &[],
        what: "asynchronous backend error",
    },
];

/// `kvh metrics`: check a metrics file the library wrote.
#[derive(Clone, Debug, clap::Args)]
pub struct MetricsArgs {
    /// The metrics file (KVH_METRICS_FILE of the process that writes it, `{pid}` replaced),
    /// or a pattern with `{pid}` in the file name (one file per process of a multi-process
    /// engine): every live process's file of this pid namespace is checked, and one that
    /// fails fails the check. Default: this environment's KVH_METRICS_FILE.
    #[arg(long, value_name = "FILE")]
    pub file: Option<PathBuf>,
    /// Exit 1 when the snapshot was taken more than SECS seconds ago (the writer stopped).
    /// Pick a few times KVH_METRICS_INTERVAL_MS.
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..))]
    pub max_age: Option<u64>,
    /// Exit 1 when the snapshot shows a security failure: a failed verification, residue,
    /// a failed re-scrub, a failed KV block scrub, lost forensic log records or an
    /// asynchronous backend error; or when one of those series is missing from it (nothing
    /// to check is not a pass).
    #[arg(long)]
    pub fail_on_security: bool,
    /// Print a JSON summary on stdout instead of the samples and verdict; when the file
    /// cannot be checked (exit 2), an object with `ok` false and the `error`. A path that is
    /// not UTF-8 is null there, and given as a shell word in `*_shell`.
    #[arg(long)]
    pub json: bool,
}

/// `kvh serve-metrics`: serve a metrics file over HTTP.
#[derive(Clone, Debug, clap::Args)]
pub struct ServeMetricsArgs {
    /// The metrics file to serve (the inference process's KVH_METRICS_FILE), or a pattern with
    /// `{pid}` in the file name: the files of every live process of this pid namespace are
    /// served as one exposition (each sample carries its `pid` label).
    #[arg(long, value_name = "FILE")]
    pub file: PathBuf,
    /// Address to listen on (an IP and port). Use 0.0.0.0:9464 in a pod so that Prometheus
    /// can reach it.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9464", value_parser = listen_addr)]
    pub listen: SocketAddr,
    /// Answer /metrics with 503 when the snapshot is older than SECS seconds.
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..))]
    pub max_age: Option<u64>,
}

/// `--listen`: an IP address and a port, with an example when it is not one (a host name, or
/// a port alone, is what a user is likely to try).
fn listen_addr(s: &str) -> Result<SocketAddr, String> {
    s.parse().map_err(|_| {
        format!(
            "{s:?} is not an IP address and port: give both, e.g. 127.0.0.1:9464 (this machine \
             only), 0.0.0.0:9464 (every interface, in a pod) or [::1]:9464; host names are not \
             resolved"
        )
    })
}

/// A metrics file, read and parsed.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub text: String,
    pub exposition: Exposition,
    /// Unix seconds of `kvh_snapshot_timestamp_seconds`.
    pub timestamp: f64,
}

impl Snapshot {
    /// Seconds since the snapshot was taken (0 for a snapshot up to [`MAX_FUTURE_SECS`] in the
    /// future, which [`load_at`] allows for clock adjustments).
    pub fn age_seconds(&self, now: SystemTime) -> f64 {
        let now = now
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        (now - self.timestamp).max(0.0)
    }

    /// The security checks that fail: one of their samples is not zero (`Some(value)`, the
    /// first such; NaN included), or they have none in the snapshot (`None`), which is a
    /// failure too: an unchecked control is not a passed one. Every sample of a check counts
    /// (a series per device, or per label set a later version adds): one that passes does not
    /// hide another that failed.
    pub fn security_failures(&self) -> Vec<(&'static SecurityCheck, Option<f64>)> {
        SECURITY_CHECKS
            .iter()
            .filter_map(|c| {
                let mut values = self.exposition.values(c.metric, c.labels).peekable();
                if values.peek().is_none() {
                    return Some((c, None));
                }
                values.find(|v| *v != 0.0).map(|v| (c, Some(v)))
            })
            .collect()
    }

    /// The identity of the process that wrote this per-process snapshot
    /// (`kvh_process_start_ticks`), or `None` when it has none (an older release, no `/proc`)
    /// or its value is not a whole number of ticks.
    pub fn process_identity(&self) -> Option<ProcessIdentity> {
        let sample = self.exposition.sample(PROCESS_START_TICKS)?;
        let ticks = sample.value;
        // Below 2^53 every whole number is exact as a double: the text was an integer.
        if !(0.0..9_007_199_254_740_992.0).contains(&ticks) || ticks.fract() != 0.0 {
            return None;
        }
        Some(ProcessIdentity {
            boot_id: sample.label("boot_id")?.to_string(),
            start_ticks: ticks as u64,
        })
    }

    fn build_label(&self, name: &str) -> Option<String> {
        self.exposition
            .sample(BUILD_INFO)
            .and_then(|s| s.label(name))
            .map(str::to_string)
    }
}

/// Reads and parses `path` as of now; see [`load_at`].
pub fn load(path: &Path) -> Result<Snapshot, String> {
    load_at(path, SystemTime::now())
}

/// [`load`] for the file of process `pid` of a per-process pattern: `None` when it is not
/// that process's to judge: the file was written by an ended process that held the id before
/// ([`per_process::belongs_to`]), or it cannot be loaded because the process ended meanwhile
/// (a worker that exits may remove its file, or be caught half-way).
pub fn load_of_process(pid: u32, path: &Path) -> Result<Option<Snapshot>, String> {
    load_of_process_at(pid, path, SystemTime::now())
}

/// [`load_of_process`] as of `now`.
fn load_of_process_at(pid: u32, path: &Path, now: SystemTime) -> Result<Option<Snapshot>, String> {
    match load_at(path, now) {
        Ok(snap) if per_process::belongs_to(pid, path, snap.process_identity().as_ref()) => {
            Ok(Some(snap))
        }
        Ok(_) => Ok(None),
        Err(_) if !per_process::alive(pid) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Reads and parses `path`, a snapshot read at `now`; the error names the file and says what
/// is wrong. The file is opened without blocking (`O_NONBLOCK`: a FIFO put in its place
/// does not wait for a writer) and must be a regular file of at most [`MAX_FILE_BYTES`].
/// Links are followed, as operators and volume mounts use them; what is accepted must still
/// parse as a kvhygiene snapshot, and `serve-metrics` never serves an error's text. A
/// snapshot dated more than [`MAX_FUTURE_SECS`] after `now` is refused.
pub fn load_at(path: &Path, now: SystemTime) -> Result<Snapshot, String> {
    let shown = path.display();
    let bytes = read_regular_file(path, MAX_FILE_BYTES, "a metrics snapshot")
        .map_err(|e| format!("{shown}: {e}"))?;
    let text = String::from_utf8(bytes).map_err(|_| format!("{shown}: not UTF-8 text"))?;
    // The error quotes nothing of the file: a key file named by mistake (it parses as a
    // name with no value) must not reach a terminal, a probe's output or a container log.
    let exposition = parse::parse(&text).map_err(|e| {
        format!(
            "{shown}: not in the Prometheus text format: {}",
            e.without_content()
        )
    })?;
    // Exactly one time: a file holding two snapshots (concatenated, say) has no one age.
    let times: Vec<f64> = exposition.values(SNAPSHOT_TIMESTAMP, &[]).take(2).collect();
    let timestamp = match times[..] {
        // Before 1970 is no time a writer takes (a negative value would read as decades old).
        [t] if t.is_finite() && t >= 0.0 => t,
        [t] => {
            return Err(format!(
                "{shown}: not a kvhygiene metrics snapshot ({SNAPSHOT_TIMESTAMP} is {}, not a \
                 time)",
                value_said(t)
            ))
        }
        [_, _] => {
            return Err(format!(
                "{shown}: not a kvhygiene metrics snapshot (more than one {SNAPSHOT_TIMESTAMP})"
            ))
        }
        _ => {
            return Err(format!(
                "{shown}: not a kvhygiene metrics snapshot (no {SNAPSHOT_TIMESTAMP})"
            ))
        }
    };
    let now_secs = now
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    if timestamp > now_secs + MAX_FUTURE_SECS {
        // The message names the snapshot's own time, not the distance to now: it stays the
        // same while the file does (serve-metrics says each distinct problem once).
        return Err(format!(
            "{shown}: the snapshot is dated {timestamp:.0} (Unix seconds), more than \
             {MAX_FUTURE_SECS} s in the future: its age cannot be judged"
        ));
    }
    Ok(Snapshot {
        text,
        exposition,
        timestamp,
    })
}

/// The JSON summary of `kvh metrics --json`.
#[derive(Debug, Serialize)]
pub struct Report {
    /// The snapshot read; null when its path is not UTF-8 (see `file_shell`).
    #[serde(serialize_with = "crate::report_out::path_or_null")]
    pub file: PathBuf,
    /// The same path as one shell word, whatever its bytes.
    pub file_shell: String,
    pub taken_at: String,
    pub timestamp: f64,
    pub age_seconds: f64,
    pub version: Option<String>,
    pub backend: Option<String>,
    pub max_age_seconds: Option<u64>,
    pub stale: bool,
    /// Whether `--fail-on-security` was given (the failures are listed either way).
    pub security_checked: bool,
    pub security_failures: Vec<FailureJson>,
    /// The exit status's verdict: not stale, and no failure when they were checked.
    pub ok: bool,
    pub metrics: Vec<SampleJson>,
}

#[derive(Debug, Serialize)]
pub struct FailureJson {
    pub metric: String,
    /// The non-zero value; `null` when the series is missing from the snapshot. A value
    /// JSON has no number for is its text in the exposition format: `"NaN"`, `"+Inf"`,
    /// `"-Inf"`.
    #[serde(serialize_with = "optional_sample_value")]
    pub value: Option<f64>,
    /// The series is missing, so the control could not be checked.
    pub missing: bool,
    pub what: &'static str,
}

#[derive(Debug, Serialize)]
pub struct SampleJson {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// A number, or `"NaN"`, `"+Inf"`, `"-Inf"` (JSON has no number for them).
    #[serde(serialize_with = "sample_value")]
    pub value: f64,
}

/// A sample value as JSON: a number when it is finite, else its exposition-format text (not
/// serde's `null`, which `FailureJson::value` uses for a missing series).
fn sample_value<S: serde::Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
    if v.is_finite() {
        s.serialize_f64(*v)
    } else {
        s.serialize_str(prom_number(*v))
    }
}

fn optional_sample_value<S: serde::Serializer>(v: &Option<f64>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(v) => sample_value(v, s),
        None => s.serialize_none(),
    }
}

/// A value as a file most likely spells it, for the reader to find the line: a whole number
/// in digits (`-5`), another finite one in Rust's shortest round-trip form, with an exponent
/// where it is very small or large (`-1e-7`), else as [`prom_number`] does.
fn value_said(v: f64) -> String {
    if !v.is_finite() {
        prom_number(v).to_string()
    } else if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v}")
    } else {
        format!("{v:?}")
    }
}

/// The exposition format's text of a value that is not a finite number.
fn prom_number(v: f64) -> &'static str {
    if v.is_nan() {
        "NaN"
    } else if v > 0.0 {
        "+Inf"
    } else {
        "-Inf"
    }
}

/// The report on `snap` (read from `file`) as of `now`.
pub fn report(file: &Path, snap: &Snapshot, args: &MetricsArgs, now: SystemTime) -> Report {
    let age = snap.age_seconds(now);
    let stale = args.max_age.is_some_and(|m| age > m as f64);
    let failures: Vec<FailureJson> = snap
        .security_failures()
        .into_iter()
        .map(|(c, value)| FailureJson {
            metric: series_name(c.metric, c.labels),
            value,
            missing: value.is_none(),
            what: c.what,
        })
        .collect();
    let failed_security = args.fail_on_security && !failures.is_empty();
    let ok = !stale && !failed_security;
    Report {
        file: file.to_path_buf(),
        file_shell: shell_word(file),
        // Milliseconds, as the snapshot gives them: nanoseconds of the float would show noise.
        taken_at: rfc3339(
            ((snap.timestamp.max(0.0) * 1e3).round() as u64).saturating_mul(1_000_000),
        ),
        timestamp: snap.timestamp,
        age_seconds: (age * 1000.0).round() / 1000.0,
        version: snap.build_label("version"),
        backend: snap.build_label("backend"),
        max_age_seconds: args.max_age,
        stale,
        security_checked: args.fail_on_security,
        security_failures: failures,
        ok,
        metrics: snap
            .exposition
            .samples
            .iter()
            .map(|s| SampleJson {
                name: s.name.clone(),
                labels: s.labels.iter().cloned().collect(),
                value: s.value,
            })
            .collect(),
    }
}

fn series_name(metric: &str, labels: &[(&str, &str)]) -> String {
    if labels.is_empty() {
        return metric.to_string();
    }
    let inner: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    format!("{metric}{{{}}}", inner.join(","))
}

/// What a verb reads: `arg` (given with `flag`), else this environment's `KVH_METRICS_FILE`;
/// a per-process pattern when it holds `{pid}`.
pub fn resolve_target(arg: Option<&Path>, flag: &str) -> Result<Target, String> {
    let file = match arg {
        Some(f) => f.to_path_buf(),
        None => match Config::from_env() {
            Ok(c) => c.metrics.file.ok_or_else(|| {
                format!("no metrics file: pass {flag} FILE or set KVH_METRICS_FILE")
            })?,
            Err(e) => return Err(format!("configuration: {e}")),
        },
    };
    Target::of(file)
}

/// Runs `metrics`; returns the process exit code.
pub fn run_metrics(args: &MetricsArgs) -> i32 {
    let outcome = resolve_target(args.file.as_deref(), "--file").and_then(|t| match t {
        Target::One(file) => metrics_one(args, &file),
        Target::PerProcess(pattern) => metrics_per_process(args, &pattern),
    });
    match outcome {
        Ok(code) => code,
        // Nothing was written yet: a write that failed is said where it happens.
        Err(e) => {
            crate::say(format_args!("kvh metrics: {e}"));
            if args.json {
                crate::report_out::json_error(&e, serde_json::json!({ "ok": false }));
            }
            EXIT_USAGE
        }
    }
}

fn metrics_one(args: &MetricsArgs, file: &Path) -> Result<i32, String> {
    let snap = load(file)?;
    let r = report(file, &snap, args, SystemTime::now());
    let mut out = std::io::stdout().lock();
    let written = if args.json {
        write_json(&mut out, &r)
    } else {
        write_text(&mut out, &snap, &r)
    };
    let status = if r.ok { EXIT_OK } else { EXIT_FAILED };
    Ok(crate::report_out::status_if_written(
        "metrics", written, status, EXIT_USAGE,
    ))
}

/// The report on every live process of a per-process pattern (`--json`).
#[derive(Debug, Serialize)]
pub struct ProcessesReport {
    /// Null when the path is not UTF-8 (see `pattern_shell`).
    #[serde(serialize_with = "crate::report_out::path_or_null")]
    pub pattern: PathBuf,
    pub pattern_shell: String,
    /// Every live process's report is ok.
    pub ok: bool,
    pub processes: Vec<ProcessReport>,
    /// Files of processes that are gone (not checked).
    pub gone: Vec<per_process::GoneFile>,
}

#[derive(Debug, Serialize)]
pub struct ProcessReport {
    pub pid: u32,
    #[serde(flatten)]
    pub report: Report,
}

/// Checks the file of every live process of `pattern`; a file whose process is gone is
/// listed, not checked (its last snapshot only ages). No live process's file is an error:
/// nothing was checked, which is not a pass.
fn metrics_per_process(args: &MetricsArgs, pattern: &Path) -> Result<i32, String> {
    let files = per_process::find(pattern)?;
    if files.live.is_empty() {
        return Err(files.none_live(pattern));
    }
    let now = SystemTime::now();
    let judged = per_process::judge_live(
        pattern,
        files,
        load_of_process,
        |file, snap| report(file, snap, args, now),
        |r| r.ok,
    )?;
    let (snaps, processes): (Vec<Snapshot>, Vec<ProcessReport>) = judged
        .processes
        .into_iter()
        .map(|(pid, snap, report)| (snap, ProcessReport { pid, report }))
        .unzip();
    let all = ProcessesReport {
        pattern: pattern.to_path_buf(),
        pattern_shell: shell_word(pattern),
        ok: processes.iter().all(|p| p.report.ok),
        processes,
        gone: judged.gone,
    };
    let mut out = std::io::stdout().lock();
    let written = if args.json {
        write_json(&mut out, &all)
    } else {
        write_processes_text(&mut out, &snaps, &all)
    };
    let status = if all.ok { EXIT_OK } else { EXIT_FAILED };
    Ok(crate::report_out::status_if_written(
        "metrics", written, status, EXIT_USAGE,
    ))
}

/// `v` as pretty JSON and a newline (the `--json` output of the verbs).
pub fn write_json(out: &mut impl Write, v: &impl Serialize) -> std::io::Result<()> {
    serde_json::to_writer_pretty(&mut *out, v).map_err(std::io::Error::from)?;
    writeln!(out)
}

fn write_processes_text(
    out: &mut impl Write,
    snaps: &[Snapshot],
    all: &ProcessesReport,
) -> std::io::Result<()> {
    for (snap, p) in snaps.iter().zip(&all.processes) {
        writeln!(out, "process {}:", p.pid)?;
        write_text(out, snap, &p.report)?;
    }
    for g in &all.gone {
        writeln!(out, "{}", g.note("checked"))?;
    }
    let failed = all.processes.iter().filter(|p| !p.report.ok).count();
    if failed == 0 {
        let listed = all
            .processes
            .iter()
            .any(|p| !p.report.security_failures.is_empty());
        writeln!(
            out,
            "OK: {} processes of {}{}",
            all.processes.len(),
            printable_path(&all.pattern),
            if listed { UNCHECKED_FAILURES } else { "" }
        )
    } else {
        writeln!(
            out,
            "FAILED: {failed} of {} processes of {}",
            all.processes.len(),
            printable_path(&all.pattern)
        )
    }
}

/// Said after an OK verdict under listed security failures: exit 0 as documented, but a bare
/// OK would read as a pass.
const UNCHECKED_FAILURES: &str = " (the security failures above fail only with --fail-on-security)";

fn write_text(out: &mut impl Write, snap: &Snapshot, r: &Report) -> std::io::Result<()> {
    for line in snap.text.lines() {
        if !line.trim().is_empty() && !line.starts_with('#') {
            writeln!(out, "{}", printable(line))?;
        }
    }
    writeln!(
        out,
        "snapshot {}: taken {} ({:.1} s ago{}), kvhygiene {}, backend {}",
        printable_path(&r.file),
        r.taken_at,
        r.age_seconds,
        // Without a limit an old snapshot passes: say so, or OK reads as "fresh".
        if r.max_age_seconds.is_none() {
            "; age not checked without --max-age"
        } else {
            ""
        },
        printable(r.version.as_deref().unwrap_or("?")),
        printable(r.backend.as_deref().unwrap_or("?")),
    )?;
    if r.security_failures.is_empty() {
        writeln!(out, "security: no failures")?;
    } else {
        let list: Vec<String> = r
            .security_failures
            .iter()
            .map(|f| match f.value {
                Some(v) => format!("{} = {} ({})", f.metric, format_f64(v), f.what),
                None => format!(
                    "{} missing from the snapshot: not checked ({})",
                    f.metric, f.what
                ),
            })
            .collect();
        writeln!(out, "security: FAILURES: {}", list.join("; "))?;
    }
    if r.stale {
        writeln!(
            out,
            "STALE: the snapshot is {:.1} s old (--max-age {}): its writer has stopped exporting",
            r.age_seconds,
            r.max_age_seconds.unwrap_or(0)
        )?;
    }
    if !r.ok {
        return writeln!(out, "FAILED");
    }
    let listed = !r.security_failures.is_empty();
    writeln!(out, "OK{}", if listed { UNCHECKED_FAILURES } else { "" })
}

/// The series of a snapshot the sidecar requires, named, when some are missing: those every
/// snapshot the library writes carries and that say whether the control works (the security
/// checks', whether the allocator shut down, whether the anomaly detector runs). A file
/// without them was cut short (a writer that is not atomic, a copy) or is not kvhygiene's:
/// served with a 200, the series would vanish and the alerts on them go quiet, not fire.
fn missing_series(snap: &Snapshot) -> Option<String> {
    let none: &[(&str, &str)] = &[];
    let missing: Vec<String> = SECURITY_CHECKS
        .iter()
        .map(|c| (c.metric, c.labels))
        .chain([
            (crate::gate::SHUT_DOWN, none),
            (crate::gate::ANOMALY_ENABLED, none),
        ])
        .filter(|(metric, labels)| snap.exposition.values(metric, labels).next().is_none())
        .map(|(metric, labels)| series_name(metric, labels))
        .collect();
    (!missing.is_empty()).then(|| missing.join(", "))
}

/// The sidecar's endpoints: `/metrics` (the file, or 503) and `/healthz`.
pub struct FileRoutes {
    pub target: Target,
    pub max_age: Option<u64>,
    /// The kind of the last problem said on stderr (`None`: serving), so that each change
    /// is said once rather than at every scrape.
    said: Mutex<Option<String>>,
}

/// Why nothing can be served: the kind of problem (said once while it lasts: a snapshot that
/// keeps aging is one kind) and the message, which names the file.
type Unservable = (String, String);

impl FileRoutes {
    pub fn new(target: Target, max_age: Option<u64>) -> Self {
        FileRoutes {
            target,
            max_age,
            said: Mutex::new(None),
        }
    }

    /// The exposition to serve now, or why there is none (naming the file).
    pub fn check(&self, now: SystemTime) -> Result<String, String> {
        self.checked(now).map_err(|(_, why)| why)
    }

    fn checked(&self, now: SystemTime) -> Result<String, Unservable> {
        match &self.target {
            Target::One(file) => self.fresh(file, now).map(|snap| snap.text),
            Target::PerProcess(pattern) => self.merged(pattern, now),
        }
    }

    /// The snapshot in `file`, loaded and judged fresh enough.
    fn fresh(&self, file: &Path, now: SystemTime) -> Result<Snapshot, Unservable> {
        let snap = load_at(file, now).map_err(|e| (e.clone(), e))?;
        self.judged_fresh(file, snap, now)
    }

    /// `snap`, read from `file`, when it is whole ([`missing_series`]) and fresh enough.
    fn judged_fresh(
        &self,
        file: &Path,
        snap: Snapshot,
        now: SystemTime,
    ) -> Result<Snapshot, Unservable> {
        if let Some(missing) = missing_series(&snap) {
            return Err((
                format!("incomplete {}", file.display()),
                format!(
                    "{}: {missing} missing (every snapshot carries them; the file is cut short \
                     or not kvhygiene's): served, the alerts on them would go quiet",
                    file.display()
                ),
            ));
        }
        let age = snap.age_seconds(now);
        if let Some(max) = self.max_age.filter(|m| age > *m as f64) {
            return Err((
                format!("stale {}", file.display()),
                format!(
                    "{}: the snapshot is {age:.1} s old (--max-age {max}): its writer has \
                     stopped exporting",
                    file.display()
                ),
            ));
        }
        Ok(snap)
    }

    /// Every live process's snapshot as one exposition; nothing when one of them cannot be
    /// served (as for one file: a scrape that fails is what the KvhMetricsDown alert sees),
    /// or when no live process has a file. With `--max-age`, the last snapshot of a process
    /// that is gone is served too while it is that fresh ([`FileRoutes::last_words`]).
    fn merged(&self, pattern: &Path, now: SystemTime) -> Result<String, Unservable> {
        let same = |e: String| (e.clone(), e);
        let files = per_process::find(pattern).map_err(same)?;
        let mut gone = files.gone.clone();
        let mut snaps = Vec::with_capacity(files.live.len());
        let mut earlier_holders = 0;
        for (pid, file) in &files.live {
            // A file another process held the id before is not served, nor is its age judged
            // (that it is old says nothing of the process holding the id now).
            let served = match load_of_process_at(*pid, file, now).map_err(same)? {
                Some(snap) => self.judged_fresh(file, snap, now),
                None if per_process::alive(*pid) => {
                    earlier_holders += 1;
                    continue;
                }
                None => {
                    gone.push((*pid, file.clone()));
                    continue;
                }
            };
            match served {
                Ok(snap) => snaps.push((file.display().to_string(), snap)),
                // Ended since the directory was listed: gone.
                Err(_) if !per_process::alive(*pid) => gone.push((*pid, file.clone())),
                Err(e) => return Err(e),
            }
        }
        let last_words = self.last_words(&gone, now);
        if snaps.is_empty() && last_words.is_empty() {
            return Err(same(per_process::none_live(
                pattern,
                gone.len(),
                earlier_holders,
            )));
        }
        let merged = |snaps: &[(String, Snapshot)]| {
            let named: Vec<(&str, &Snapshot)> =
                snaps.iter().map(|(f, s)| (f.as_str(), s)).collect();
            super::merge::merge(&named).map_err(|e| same(format!("{}: {e}", pattern.display())))
        };
        // A gone process's last snapshot that cannot be served beside the others (its series
        // collide with theirs: a copy of a live one's file, a worker of another release
        // declaring a family otherwise) is left out, as `last_words` leaves out one that
        // cannot be read: never a reason to answer 503 for the live ones. One merge of all of
        // them first; only when it fails is each tried in turn (a merge per file).
        let live = snaps.len();
        snaps.extend(last_words);
        if let Ok(text) = merged(&snaps) {
            return Ok(text);
        }
        let candidates = snaps.split_off(live);
        for last in candidates {
            snaps.push(last);
            if merged(&snaps).is_err() {
                snaps.pop();
            }
        }
        merged(&snaps)
    }

    /// The last snapshots of processes that are gone, those no older than `--max-age`
    /// (none without it): a worker that ended, or aborted under `failure_mode=abort` after
    /// writing the snapshot that counts its failure, is scraped once more, so what it counted
    /// last reaches the alerts; then it ages out. A file of a gone process that cannot be
    /// read or is stale is left out, never a reason to answer 503 for the live ones.
    fn last_words(&self, gone: &[(u32, PathBuf)], now: SystemTime) -> Vec<(String, Snapshot)> {
        let Some(max) = self.max_age else {
            return Vec::new();
        };
        gone.iter()
            .filter_map(|(_, file)| {
                if written_before(file, now, max) {
                    return None;
                }
                let snap = load_at(file, now).ok()?;
                let served = snap.age_seconds(now) <= max as f64 && missing_series(&snap).is_none();
                served.then(|| (file.display().to_string(), snap))
            })
            .collect()
    }

    /// [`FileRoutes::check`], saying on stderr when the problem changes or goes away.
    fn check_and_say(&self) -> Option<String> {
        let checked = self.checked(SystemTime::now());
        let kind = checked.as_ref().err().map(|(kind, _)| kind.clone());
        let mut said = self.said.lock().unwrap_or_else(|p| p.into_inner());
        if *said != kind {
            match &checked {
                Err((_, e)) => {
                    crate::say(format_args!("kvh serve-metrics: {e}; /metrics answers 503"))
                }
                Ok(_) => crate::say(format_args!(
                    "kvh serve-metrics: serving {}",
                    self.target.path().display()
                )),
            }
            *said = kind;
        }
        checked.ok()
    }
}

impl http::Routes for FileRoutes {
    fn paths(&self) -> &[&'static str] {
        &["/metrics", "/healthz"]
    }

    fn get(&self, path: &str) -> Response {
        if path != "/metrics" {
            return Response::text(200, "ok\n");
        }
        match self.check_and_say() {
            Some(text) => Response::new(200, CONTENT_TYPE, text),
            None => Response::text(503, UNAVAILABLE_BODY),
        }
    }
}

/// Whether `file` was last modified more than `max_age` seconds before `now`. A snapshot is
/// dated before its file is written, so such a file's snapshot is older still: the last
/// words of processes long gone (nothing removes their files, and every restart leaves one)
/// are left out by a `stat` instead of a read and parse each at every scrape. A file whose
/// time cannot be read is not judged here.
fn written_before(file: &Path, now: SystemTime, max_age: u64) -> bool {
    std::fs::metadata(file)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|modified| now.duration_since(modified).ok())
        .is_some_and(|age| age > Duration::from_secs(max_age))
}

/// Runs `serve-metrics` until SIGTERM or SIGINT (then 0), or returns a start-up error's status.
pub fn run_serve_metrics(args: &ServeMetricsArgs) -> i32 {
    let target = match Target::of(args.file.clone()) {
        Ok(t) => t,
        Err(e) => {
            crate::say(format_args!("kvh serve-metrics: {e}"));
            return EXIT_USAGE;
        }
    };
    // Handled from before the start is said, so that no stop sent after it is missed.
    let stop = match StopSignals::install() {
        Ok(s) => s,
        Err(e) => {
            crate::say(format_args!(
                "kvh serve-metrics: cannot handle SIGTERM and SIGINT: {e}"
            ));
            return EXIT_USAGE;
        }
    };
    let routes = Arc::new(FileRoutes::new(target, args.max_age));
    let server = match http::Server::start(
        args.listen,
        routes.clone(),
        http::Limits::default(),
        "kvh-serve-metrics",
    ) {
        Ok(s) => s,
        Err(e) => {
            crate::say(format_args!(
                "kvh serve-metrics: {}",
                e.describe(args.listen)
            ));
            return EXIT_USAGE;
        }
    };
    say_refusals(server.rejected_counter());
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "kvh serve-metrics: serving {} at http://{}/metrics",
        args.file.display(),
        server.local_addr()
    );
    let _ = out.flush();
    drop(out);
    // Said at start when the file is not servable yet, and again at each change.
    let _ = routes.check_and_say();
    stop.wait();
    drop(server);
    0
}

/// How often the refusals reporter looks at the count.
const REFUSALS_POLL: Duration = Duration::from_secs(1);

/// The least time between two reports of refusals: a flood is said once a minute, not once a
/// request.
const REFUSALS_EVERY: Duration = Duration::from_secs(60);

/// Says on stderr, from a thread of its own, how many requests the server refused (slow,
/// oversize or malformed requests, connections over the limit): the sidecar's count is in no
/// snapshot it serves (`kvh_metrics_http_rejected_total` is the library's own exporter's), so
/// its log is where a sidecar turning clients away is seen. The first refusal is said within
/// [`REFUSALS_POLL`], later ones at most every [`REFUSALS_EVERY`]. The thread ends with the
/// process.
fn say_refusals(count: Arc<AtomicU64>) {
    let spawned = std::thread::Builder::new()
        .name("kvh-serve-metrics-refusals".into())
        .spawn(move || {
            let mut said = 0u64;
            let mut last: Option<Instant> = None;
            loop {
                std::thread::sleep(REFUSALS_POLL);
                let now = count.load(Ordering::Relaxed);
                let due = last.is_none_or(|t| t.elapsed() >= REFUSALS_EVERY);
                if now > said && due {
                    crate::say(format_args!(
                        "kvh serve-metrics: {}",
                        refusals_line(said, now)
                    ));
                    said = now;
                    last = Some(Instant::now());
                }
            }
        });
    if let Err(e) = spawned {
        // Serving matters more than the report of refusals.
        crate::say(format_args!(
            "kvh serve-metrics: refused requests will not be reported: {e}"
        ));
    }
}

/// The report of refusals, `before` counted at the last report and `now` in all.
fn refusals_line(before: u64, now: u64) -> String {
    format!(
        "refused {} request(s) since {} (slow, oversize or malformed requests, or connections \
         over the limit; {now} in all)",
        now - before,
        if before == 0 {
            "it started"
        } else {
            "the last report"
        }
    )
}

/// SIGTERM and SIGINT, handled: a sidecar is often PID 1 of its container, whose signals the
/// kernel drops unless a handler is installed, so that without one a pod's stop would wait for
/// the SIGKILL at the end of its grace period.
struct StopSignals(signal_hook::iterator::Signals);

impl StopSignals {
    fn install() -> std::io::Result<Self> {
        use signal_hook::consts::{SIGINT, SIGTERM};
        signal_hook::iterator::Signals::new([SIGTERM, SIGINT]).map(StopSignals)
    }

    /// Returns once either signal has arrived (since `install`).
    fn wait(mut self) {
        let _ = self.0.forever().next();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::encode::SERIES;

    #[test]
    fn a_file_is_judged_written_too_long_ago_by_its_modification_time() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("kvh-1.prom");
        std::fs::write(&file, "").unwrap();
        let now = SystemTime::now();
        assert!(!written_before(&file, now, 30), "a file just written");
        let hour_ago = now - Duration::from_secs(3600);
        std::fs::File::options()
            .write(true)
            .open(&file)
            .unwrap()
            .set_modified(hour_ago)
            .unwrap();
        assert!(written_before(&file, now, 30));
        assert!(
            !written_before(&file, now, 7200),
            "within a longer --max-age"
        );
        assert!(
            !written_before(&dir.path().join("gone.prom"), now, 30),
            "a file whose time cannot be read is not judged by it"
        );
    }

    #[test]
    fn a_report_of_refusals_counts_those_since_the_last_one() {
        let first = refusals_line(0, 3);
        assert!(
            first.starts_with("refused 3 request(s) since it started"),
            "{first}"
        );
        let later = refusals_line(3, 10);
        assert!(
            later.starts_with("refused 7 request(s) since the last report"),
            "{later}"
        );
        assert!(later.contains("10 in all"), "{later}");
    }

    #[test]
    fn every_security_check_names_an_exported_series() {
        for c in SECURITY_CHECKS {
            assert!(
                SERIES
                    .iter()
                    .any(|s| s.name == c.metric && s.labels == c.labels),
                "{} {:?} is not exported",
                c.metric,
                c.labels
            );
        }
    }

    #[test]
    fn a_snapshot_s_writer_identity_is_a_whole_number_of_ticks_with_a_boot() {
        let identity = ProcessIdentity {
            boot_id: "5f0c3a6e-0b1d-4c8e-9a57-2d4f1e6b7c80".into(),
            start_ticks: 123_456_789,
        };
        let written = crate::metrics::encode::encode_process(
            &crate::stats::Stats::merge("host".into(), &[Default::default()], None),
            &crate::metrics::ExporterStats::default(),
            SystemTime::now(),
            "7",
            Some(&identity),
        );
        let read = |text: &str| {
            let dir = tempfile::tempdir().unwrap();
            let file = dir.path().join("kvh-7.prom");
            std::fs::write(&file, text).unwrap();
            load(&file).unwrap().process_identity()
        };
        assert_eq!(read(&written), Some(identity));
        let line = |text: &str| {
            text.lines()
                .find(|l| l.starts_with(PROCESS_START_TICKS))
                .unwrap()
                .to_string()
        };
        let sample = line(&written);
        for (changed, why) in [
            (sample.replace("123456789", "123456789.5"), "not whole"),
            (sample.replace("123456789", "-1"), "negative"),
            (sample.replace("123456789", "NaN"), "not a number"),
            (sample.replace("boot_id", "boot"), "no boot"),
        ] {
            assert_eq!(read(&written.replace(&sample, &changed)), None, "{why}");
        }
        let without = written.replace(&format!("{sample}\n"), "");
        assert_eq!(read(&without), None, "an older writer's file");
    }

    #[test]
    fn control_characters_never_reach_the_terminal() {
        assert_eq!(printable("a{x=\"\u{1b}[2J\"} 1"), "a{x=\"\\u{1b}[2J\"} 1");
        assert_eq!(printable("kvh_x{v=\"0.1.0\"} 0"), "kvh_x{v=\"0.1.0\"} 0");
    }
}

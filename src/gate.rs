//! `kvh gate`: whether an inference process may keep serving tenants, as one exit status for a
//! Kubernetes readiness probe, a load balancer's health check or a deployment pipeline.
//!
//! The allocator keeps every tenant's bytes apart only while its control works. When it
//! stops working — a scrub fails verification, something writes freed memory, evidence is
//! lost, the process stops exporting its state — a process keeps running (quarantine is not a
//! crash), and traffic keeps coming unless something takes it out of rotation. This verb is
//! that decision, from the metrics snapshot the process exports (`KVH_METRICS_FILE`) and,
//! optionally, its forensic log:
//!
//! - **evict** (exit 1) when the snapshot is stale (the process stopped exporting), when it
//!   says the allocator shut down (`kvh_shut_down` not 0: it scrubs nothing any more; a
//!   snapshot without the series cannot show it runs, and evicts too), when it shows a security failure (the checks of `kvh metrics
//!   --fail-on-security`), when the anomaly detector flagged a signal that means the control
//!   failed (`verify_failed`, `residue`, `quarantine`; any signal with `--strict-anomalies`),
//!   when a series it must judge is missing (a security counter; a signal of a detector the
//!   snapshot says is on; `kvh_anomaly_enabled`, or a value of it neither 0 nor 1), or when the log does not verify (the snapshot judged is the one
//!   read after the log, which may take a while to verify);
//! - **admit** (exit 0) otherwise; what an operator should still look at (KV blocks that
//!   changed owner unscrubbed, which the eviction gate scrubbed, refused claims and KV
//!   scrubs, invalid frees, forensic log write errors that lost no record, anomalies of caller
//!   bugs such as bursts of invalid frees, which the allocator
//!   refused without harm) is printed as notes: one tenant's requests hitting an engine bug
//!   must not take every replica out;
//! - exit 2 for usage errors and unreadable inputs (a missing or malformed snapshot among
//!   them: nothing was judged, which a readiness probe also takes as not ready), as every verb.
//!
//! Counters are per process and only grow, so an evicted process stays evicted until it is
//! restarted: a control that failed once is not trusted again by itself. The gate keeps no
//! state between runs: that holds while only the library writes the file.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::Serialize;

use crate::forensic::cli::shell_word;
use crate::forensic::cli::{self as log_cli, VerifyLogArgs};
use crate::forensic::verify::{self, verify_all};
use crate::metrics::cli::{self as metrics_cli, Snapshot};
use crate::metrics::encode::format_f64;
use crate::metrics::per_process::{self, Target};
use crate::{printable, printable_path};

/// Exit code: the process may keep serving.
pub const EXIT_ADMIT: i32 = 0;
/// Exit code: take the process out of rotation.
pub const EXIT_EVICT: i32 = 1;
/// Exit code: usage error or unreadable input; nothing was concluded.
pub const EXIT_USAGE: i32 = 2;

/// The anomaly detector's counter (one series per signal).
pub const ANOMALIES: &str = "kvh_anomalies_total";

/// 1 when the anomaly detector is on (its every signal then has a series), 0 when off.
pub const ANOMALY_ENABLED: &str = "kvh_anomaly_enabled";

/// Anomaly signals that mean the control failed, not that a caller erred: they evict by
/// default. (Each also shows in the security checks; the anomaly adds the tenant and rate.)
pub const CONTROL_SIGNALS: &[&str] = &["verify_failed", "residue", "quarantine"];

/// Anomaly signals of caller errors the allocator refused or reported without harm: notes by
/// default, evictions with `--strict-anomalies`.
pub const CALLER_SIGNALS: &[&str] = &[
    "invalid_free",
    "size_mismatch",
    "ttl_exceeded",
    "policy_violation",
];

/// `kvh gate`.
#[derive(Clone, Debug, clap::Args)]
pub struct GateArgs {
    /// The process's metrics file (its KVH_METRICS_FILE, `{pid}` replaced), or a pattern
    /// with `{pid}` in the file name (one file per process of a multi-process engine): every
    /// file of a live process of this pid namespace is judged, and one evicted process
    /// evicts; files of processes that are gone are listed, not judged. Default: this
    /// environment's KVH_METRICS_FILE.
    #[arg(long, value_name = "FILE")]
    pub metrics_file: Option<PathBuf>,
    /// Evict when the snapshot is older than SECS seconds (the process stopped exporting:
    /// hung or gone). Pick a few times KVH_METRICS_INTERVAL_MS (default 10 s).
    #[arg(long, value_name = "SECS", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub max_age: u64,
    /// Also verify the forensic log in DIR (as `kvh verify-log`) and evict when it fails.
    /// This reads the whole log: for frequent probes, verify on a schedule instead.
    #[arg(long, value_name = "DIR")]
    pub log_dir: Option<PathBuf>,
    /// With --log-dir: the HMAC secret file, so that MACs are checked too. Repeatable after
    /// a key rotation, current key first (as `verify-log`).
    #[arg(long, value_name = "FILE", requires = "log_dir")]
    pub key_file: Vec<PathBuf>,
    /// With --log-dir: the Ed25519 public key (PREFIX.pub of `kvh keygen`) the checkpoints are
    /// signed with. Repeatable after a rotation of the signing key.
    #[arg(long, value_name = "FILE", requires = "log_dir")]
    pub public_key: Vec<PathBuf>,
    /// With --log-dir and --public-key: the checkpoint file or directory to check the chains
    /// against, which detects a truncated log and deleted files.
    #[arg(long, value_name = "FILE", requires = "public_key")]
    pub checkpoint: Option<PathBuf>,
    /// With --log-dir: accept chains whose oldest files `kvh prune-log` moved away (as
    /// `verify-log --allow-pruned`); without it, a pruned log evicts.
    #[arg(long, requires = "log_dir")]
    pub allow_pruned: bool,
    /// With --log-dir: an archive directory `kvh prune-log` moved files to, read back to
    /// verify the chains whole (as `verify-log --archive-dir`). Repeatable.
    #[arg(long, value_name = "DIR", requires = "log_dir")]
    pub archive_dir: Vec<PathBuf>,
    /// Evict on an anomaly of any signal, not only of those that mean the control failed
    /// (verify_failed, residue, quarantine): also on bursts of caller bugs the allocator
    /// refused without harm (invalid frees, size mismatches, TTL breaches, policy violations);
    /// and on a snapshot without anomaly counts (the detector off), which cannot be checked.
    #[arg(long)]
    pub strict_anomalies: bool,
    /// Print the verdict as JSON on stdout; when none can be made (exit 2), an object whose
    /// `verdict` is `error`, with the `error`. A path that is not UTF-8 is null there, and
    /// given as a shell word in `*_shell`.
    #[arg(long)]
    pub json: bool,
}

/// The gate's decision and why.
#[derive(Clone, Debug, Serialize)]
pub struct Verdict {
    /// `admit` or `evict`.
    pub verdict: &'static str,
    /// Why the process must be evicted (empty when admitted).
    pub reasons: Vec<String>,
    /// What an operator should look at, without evicting.
    pub notes: Vec<String>,
    /// The snapshot judged; null when its path is not UTF-8 (see `metrics_file_shell`).
    #[serde(serialize_with = "crate::report_out::path_or_null")]
    pub metrics_file: PathBuf,
    /// The same path as one shell word, whatever its bytes.
    pub metrics_file_shell: String,
    pub snapshot_age_seconds: f64,
    pub max_age_seconds: u64,
    /// The log directory verified, and the chains and records found, when --log-dir was given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log: Option<LogSummary>,
}

#[derive(Clone, Debug, Serialize)]
pub struct LogSummary {
    /// Null when the path is not UTF-8 (see `dir_shell`).
    #[serde(serialize_with = "crate::report_out::path_or_null")]
    pub dir: PathBuf,
    pub dir_shell: String,
    pub chains: usize,
    pub records: u64,
    pub verified: bool,
}

impl Verdict {
    pub fn admitted(&self) -> bool {
        self.reasons.is_empty()
    }
}

/// 1 once the allocator's shutdown (or process exit) began.
pub(crate) const SHUT_DOWN: &str = "kvh_shut_down";

/// Judges a snapshot (and a log report) as of `now`. Pure: everything it needs is passed in.
pub fn judge(
    file: &Path,
    snap: &Snapshot,
    args: &GateArgs,
    log: Option<(&Path, &verify::Report)>,
    now: SystemTime,
) -> Verdict {
    let age = snap.age_seconds(now);
    let mut reasons = Vec::new();
    let mut notes = Vec::new();
    if age > args.max_age as f64 {
        reasons.push(format!(
            "the metrics snapshot is {age:.0} s old (--max-age {}): the process stopped \
             exporting (hung or gone)",
            args.max_age
        ));
    }
    // The last snapshot of a process whose allocator shut down (`kvh_shutdown`, process
    // exit) stays fresh for a while, and no scrub runs behind it any more. A value that is not
    // 0 (NaN included) is not a running allocator. Every sample is judged, as for the security
    // checks; none at all is a snapshot cut short or not the encoder's (which writes the
    // series in every snapshot, as it does `kvh_anomaly_enabled`): nothing says the allocator
    // still runs.
    let mut shut_down = snap.exposition.values(SHUT_DOWN, &[]).peekable();
    if shut_down.peek().is_none() {
        reasons.push(format!(
            "{SHUT_DOWN} is missing from the snapshot (every snapshot carries it; the file is \
             cut short or not kvhygiene's): whether the allocator still scrubs cannot be checked"
        ));
    } else if let Some(v) = shut_down.find(|&v| v != 0.0) {
        reasons.push(format!(
            "the allocator shut down ({SHUT_DOWN} {}: kvh_shutdown, or the process is \
             exiting): it scrubs no freed memory any more",
            format_f64(v)
        ));
    }
    for (check, value) in snap.security_failures() {
        reasons.push(match value {
            Some(v) => format!("{}: {} = {}", check.what, check.metric, format_f64(v)),
            None => format!(
                "{} is missing from the snapshot: {} cannot be checked",
                check.metric, check.what
            ),
        });
    }
    // The encoder writes `kvh_anomaly_enabled 1` with a series for every signal from the
    // start: a snapshot that says the detector is on and lacks a signal's series is cut short
    // or not the encoder's, and the signal cannot be checked.
    let (detector_on, detector_known) = match detector_state(snap) {
        Ok(on) => (on, true),
        Err(reason) => {
            reasons.push(reason);
            // Judged as on: the signals' series are checked rather than noted as off.
            (true, false)
        }
    };
    match flagged(snap, ANOMALIES, "signal") {
        // The detector's state is not known: the reason given for it covers its series too.
        Flagged::Missing if !detector_known => {}
        Flagged::Missing if detector_on => reasons.push(format!(
            "{ANOMALIES} is missing from the snapshot, which says the anomaly detector is on \
             ({ANOMALY_ENABLED} 1): its anomalies cannot be checked"
        )),
        // With --strict-anomalies the anomalies are a check: one that cannot be made fails.
        Flagged::Missing if args.strict_anomalies => reasons.push(format!(
            "{ANOMALIES} is missing from the snapshot: --strict-anomalies cannot be checked \
             (the anomaly detector is off, KVH_ANOMALY=off, or predates it)"
        )),
        Flagged::Missing => notes.push(format!(
            "{ANOMALIES} is not in the snapshot: the anomaly detector is off ({ANOMALY_ENABLED} \
             0, KVH_ANOMALY=off)"
        )),
        Flagged::Clear => {}
        Flagged::Series(series) => {
            // A series without a signal label, with one not known here, or with a value no
            // counter can have (a corrupt snapshot) is judged as a control failure: what is
            // not understood is not a pass.
            let (control, callers): (Vec<_>, Vec<_>) = series.into_iter().partition(|(s, v)| {
                args.strict_anomalies
                    || !(v.is_finite() && *v >= 0.0)
                    || s.as_deref().is_none_or(|s| {
                        CONTROL_SIGNALS.contains(&s) || !CALLER_SIGNALS.contains(&s)
                    })
            });
            if !control.is_empty() {
                reasons.push(format!(
                    "the anomaly detector flagged anomalies ({}); see the `anomaly` records",
                    describe(&control)
                ));
            }
            if !callers.is_empty() {
                notes.push(format!(
                    "the anomaly detector flagged bursts of caller errors the allocator refused \
                     ({}); see the `anomaly` records (--strict-anomalies evicts on them)",
                    describe(&callers)
                ));
            }
        }
    }
    // A detector of unknown state with no anomaly series at all: its reason said it.
    if (detector_known && detector_on) || flagged(snap, ANOMALIES, "signal") != Flagged::Missing {
        for signal in unchecked_signals(snap) {
            reasons.push(format!(
                "{ANOMALIES}{{signal=\"{signal}\"}} is missing from the snapshot: the anomaly \
                 detector's {signal} signal cannot be checked"
            ));
        }
    }
    const OWNER_CHANGED: &str = "kvh_kv_gate_owner_changed_blocks_total";
    if flagged(snap, OWNER_CHANGED, "") == Flagged::Missing {
        // A library older than the split (a rolling upgrade): every gate scrub, as it says.
        note_if_positive(
            snap,
            &mut notes,
            "kvh_kv_gate_scrubbed_blocks_total",
            "the eviction gate scrubbed KV blocks that changed owner without the engine's \
             scrub or whose owner it did not know (this library does not tell them apart)",
        );
    }
    note_if_positive(
        snap,
        &mut notes,
        OWNER_CHANGED,
        "KV blocks changed owner without the engine's scrub; the eviction gate scrubbed them",
    );
    note_if_positive(
        snap,
        &mut notes,
        "kvh_kv_claims_refused_total",
        "kvh_claim_blocks calls were refused, or the engine recorded refusals (see the kv_gate policy_violation records)",
    );
    note_if_positive(
        snap,
        &mut notes,
        "kvh_kv_scrubs_refused_total",
        "kvh_scrub_blocks calls were refused: the KV blocks they named were not zeroed by them \
         (see the kv_scrub policy_violation records)",
    );
    note_if_positive(
        snap,
        &mut notes,
        "kvh_invalid_frees_total",
        "invalid frees were refused (caller bugs; see the invalid_free records)",
    );
    // Lost records evict (a security check); a write error that lost none (a failed fsync,
    // after which no checkpoint vouches for the chain; a chain file removed from the log
    // directory, whose records went with it) still deserves a look.
    note_if_positive(
        snap,
        &mut notes,
        "kvh_log_write_errors_total",
        "the forensic log's writes or fsyncs failed, or a chain file was removed from its \
         directory while in use (see last_error in kvh_stats_json, and verify the log)",
    );
    let log = log.map(|(dir, report)| {
        if let Some(p) = report.first_problem() {
            reasons.push(format!("the forensic log does not verify: {p}"));
        } else if let Some(e) = report.errors.first() {
            reasons.push(format!("the forensic log does not verify: {e}"));
        }
        LogSummary {
            dir: dir.to_path_buf(),
            dir_shell: shell_word(dir),
            chains: report.chains.len(),
            records: report.chains.iter().map(|c| c.records).sum(),
            verified: report.ok(),
        }
    });
    Verdict {
        verdict: if reasons.is_empty() { "admit" } else { "evict" },
        reasons,
        notes,
        metrics_file: file.to_path_buf(),
        metrics_file_shell: shell_word(file),
        snapshot_age_seconds: (age * 1000.0).round() / 1000.0,
        max_age_seconds: args.max_age,
        log,
    }
}

/// Whether the snapshot says its anomaly detector is on, from `kvh_anomaly_enabled`, which
/// every snapshot the encoder writes carries (0 with `KVH_ANOMALY=off`). Without it, or with a
/// value no gauge of the encoder has (not exactly one sample of 0 or 1), the snapshot is cut
/// short or not the encoder's: the error is the reason to evict, since whether the detector
/// flagged a failed control cannot be told.
fn detector_state(snap: &Snapshot) -> Result<bool, String> {
    let values: Vec<f64> = snap
        .exposition
        .values(ANOMALY_ENABLED, &[])
        .take(2)
        .collect();
    match values[..] {
        [1.0] => Ok(true),
        [0.0] => Ok(false),
        [v] => Err(format!(
            "{ANOMALY_ENABLED} is {}, neither 0 nor 1: whether the anomaly detector flagged a \
             failed control cannot be checked",
            format_f64(v)
        )),
        [] => Err(format!(
            "{ANOMALY_ENABLED} is missing from the snapshot (every snapshot carries it, 0 when \
             the detector is off; the file is cut short or not kvhygiene's): whether the \
             anomaly detector flagged a failed control cannot be checked"
        )),
        _ => Err(format!(
            "{ANOMALY_ENABLED} has more than one sample: whether the anomaly detector flagged a \
             failed control cannot be checked"
        )),
    }
}

/// What the series of a counter say.
#[derive(Debug, PartialEq)]
enum Flagged {
    /// The snapshot has no series of it.
    Missing,
    /// Every series is exactly 0.
    Clear,
    /// The label and value of each series that is not exactly 0: a count, or a value a
    /// counter cannot have (negative, NaN, infinite), which is judged the same way, never
    /// summed away.
    Series(Vec<(Option<String>, f64)>),
}

/// `a=1, b=2`, or `1` for a series without the label; values spelled as in the exposition
/// (`+Inf`, not Rust's `inf`).
fn describe(series: &[(Option<String>, f64)]) -> String {
    let parts: Vec<String> = series
        .iter()
        .map(|(label, v)| match label {
            Some(l) => format!("{l}={}", format_f64(*v)),
            None => format_f64(*v),
        })
        .collect();
    parts.join(", ")
}

fn flagged(snap: &Snapshot, metric: &str, label: &str) -> Flagged {
    let mut seen = false;
    let mut series = Vec::new();
    for s in snap.exposition.samples.iter().filter(|s| s.name == metric) {
        seen = true;
        // NaN != 0.0 too: a value that is not exactly zero is never a pass.
        if s.value != 0.0 {
            series.push((s.label(label).map(str::to_string), s.value));
        }
    }
    match (seen, series.is_empty()) {
        (false, _) => Flagged::Missing,
        (true, true) => Flagged::Clear,
        (true, false) => Flagged::Series(series),
    }
}

/// The signals that have no series in the snapshot. Every one, not only those whose
/// anomalies evict: the encoder writes a series for each signal of a detector that is on, so
/// one missing says the snapshot is cut short or not the encoder's, and its other series
/// cannot be trusted either.
fn unchecked_signals(snap: &Snapshot) -> Vec<&'static str> {
    CONTROL_SIGNALS
        .iter()
        .chain(CALLER_SIGNALS)
        .copied()
        .filter(|signal| {
            snap.exposition
                .values(ANOMALIES, &[("signal", signal)])
                .next()
                .is_none()
        })
        .collect()
}

fn note_if_positive(snap: &Snapshot, notes: &mut Vec<String>, metric: &str, what: &str) {
    if let Flagged::Series(series) = flagged(snap, metric, "") {
        notes.push(format!("{what}: {metric} = {}", describe(&series)));
    }
}

/// Runs `gate`; returns the process exit code.
pub fn run_gate(args: &GateArgs) -> i32 {
    let outcome = target_of(args).and_then(|target| match target {
        Target::One(file) => gate_one(args, &file),
        Target::PerProcess(pattern) => gate_per_process(args, &pattern),
    });
    match outcome {
        Ok(code) => code,
        // Nothing was written yet: a write that failed is said where it happens.
        Err(e) => {
            crate::say(format_args!("kvh gate: {e}"));
            if args.json {
                crate::report_out::json_error(&e, serde_json::json!({ "verdict": "error" }));
            }
            EXIT_USAGE
        }
    }
}

fn target_of(args: &GateArgs) -> Result<Target, String> {
    let given = match &args.metrics_file {
        Some(f) => f.clone(),
        None => match crate::config::Config::from_env() {
            Ok(c) => c.metrics.file.ok_or_else(|| {
                "no metrics file: pass --metrics-file FILE or set KVH_METRICS_FILE".to_string()
            })?,
            Err(e) => return Err(format!("configuration: {e}")),
        },
    };
    Target::of(given)
}

/// The forensic log's report when `--log-dir` was given.
fn log_report(args: &GateArgs) -> Result<Option<(&Path, verify::Report)>, String> {
    match &args.log_dir {
        Some(dir) => Ok(Some((dir.as_path(), verify_log(dir, args)?))),
        None => Ok(None),
    }
}

fn gate_one(args: &GateArgs, file: &std::path::Path) -> Result<i32, String> {
    // Read first, so that a missing or unreadable file is said before the log is read; then
    // again once the log is verified, which can take a while: the snapshot judged is the
    // process's latest, not one that aged while the log was read.
    let snap = metrics_cli::load(file)?;
    let log = log_report(args)?;
    let snap = match &log {
        Some(_) => metrics_cli::load(file)?,
        None => snap,
    };
    let verdict = judge(
        file,
        &snap,
        args,
        log.as_ref().map(|(d, r)| (*d, r)),
        SystemTime::now(),
    );
    let mut out = std::io::stdout().lock();
    let written = if args.json {
        metrics_cli::write_json(&mut out, &verdict)
    } else {
        write_text(&mut out, &verdict)
    };
    let status = if verdict.admitted() {
        EXIT_ADMIT
    } else {
        EXIT_EVICT
    };
    Ok(crate::report_out::status_if_written(
        "gate", written, status, EXIT_USAGE,
    ))
}

/// The verdict on every live process of a per-process pattern (`--json`).
#[derive(Debug, Serialize)]
pub struct ProcessesVerdict {
    /// `admit` when every live process is admitted, else `evict`.
    pub verdict: &'static str,
    /// Null when the path is not UTF-8 (see `pattern_shell`).
    #[serde(serialize_with = "crate::report_out::path_or_null")]
    pub pattern: PathBuf,
    pub pattern_shell: String,
    pub processes: Vec<ProcessVerdict>,
    /// Files of processes that are gone (not judged).
    pub gone: Vec<per_process::GoneFile>,
}

#[derive(Debug, Serialize)]
pub struct ProcessVerdict {
    pub pid: u32,
    #[serde(flatten)]
    pub verdict: Verdict,
}

/// Judges the file of every live process that matches `pattern`; a file whose process is
/// gone (a worker that ended leaves its file) is listed, not judged. No live process's file
/// is a usage error: nothing was judged, which is not a pass.
fn gate_per_process(args: &GateArgs, pattern: &std::path::Path) -> Result<i32, String> {
    let files = per_process::find(pattern)?;
    if files.live.is_empty() {
        return Err(files.none_live(pattern));
    }
    let log = log_report(args)?;
    let judged = per_process::judge_live(
        pattern,
        files,
        metrics_cli::load_of_process,
        |file, snap| {
            judge(
                file,
                snap,
                args,
                log.as_ref().map(|(d, r)| (*d, r)),
                SystemTime::now(),
            )
        },
        Verdict::admitted,
    )?;
    let processes: Vec<ProcessVerdict> = judged
        .processes
        .into_iter()
        .map(|(pid, _, verdict)| ProcessVerdict { pid, verdict })
        .collect();
    let all = ProcessesVerdict {
        verdict: if processes.iter().all(|p| p.verdict.admitted()) {
            "admit"
        } else {
            "evict"
        },
        pattern: pattern.to_path_buf(),
        pattern_shell: shell_word(pattern),
        processes,
        gone: judged.gone,
    };
    let mut out = std::io::stdout().lock();
    let written = if args.json {
        metrics_cli::write_json(&mut out, &all)
    } else {
        write_processes_text(&mut out, &all)
    };
    let status = if all.verdict == "admit" {
        EXIT_ADMIT
    } else {
        EXIT_EVICT
    };
    Ok(crate::report_out::status_if_written(
        "gate", written, status, EXIT_USAGE,
    ))
}

fn write_processes_text(out: &mut impl Write, all: &ProcessesVerdict) -> std::io::Result<()> {
    let evicted = all
        .processes
        .iter()
        .filter(|p| !p.verdict.admitted())
        .count();
    writeln!(
        out,
        "{}: {} of {} processes of {} evicted",
        all.verdict.to_uppercase(),
        evicted,
        all.processes.len(),
        printable_path(&all.pattern)
    )?;
    for p in &all.processes {
        write!(out, "process {}: ", p.pid)?;
        write_text(out, &p.verdict)?;
    }
    for g in &all.gone {
        writeln!(out, "{}", g.note("judged"))?;
    }
    Ok(())
}

/// Refuses a log this process may not read (a probe running under another uid than the
/// writer, whose files are 0600): the gate cannot judge it, which is a usage error (exit 2),
/// not a log that fails verification (an eviction that reads as tampering). As in
/// `verify-log`, the gate's own user's unreadable file is left to the verification, which
/// fails its chain.
fn readable(dir: &std::path::Path, opts: &verify::VerifyOptions) -> Result<(), String> {
    let denied = |p: &std::path::Path, e: std::io::Error| {
        format!(
            "{}: {e}: this process (uid {}) cannot read the forensic log; run the gate as the \
             writer's user",
            p.display(),
            crate::forensic::files::euid()
        )
    };
    let chains = verify::list_all(dir, opts).map_err(|e| e.to_string())?;
    for (_, files) in &chains {
        for (_, path) in files {
            // Opened as the verifier opens them: a FIFO planted there is not waited for.
            // Only another user's file: this user's own file made unreadable is a problem
            // of the log, which the verification reports (an eviction), as verify-log does.
            match crate::forensic::files::open_regular(path, u64::MAX) {
                Err(e)
                    if e.kind() == std::io::ErrorKind::PermissionDenied
                        && crate::forensic::files::unreadable_foreign(path) =>
                {
                    return Err(denied(path, e))
                }
                _ => {}
            }
        }
    }
    Ok(())
}

/// Verifies the log as `verify-log` does. A directory that holds no record is reported as
/// a problem of the log (evidence that should exist and does not), not as a usage error; a
/// directory that does not exist, or a key that cannot be read, is a usage error.
fn verify_log(dir: &std::path::Path, args: &GateArgs) -> Result<verify::Report, String> {
    let verify_args = VerifyLogArgs {
        key_file: args.key_file.clone(),
        public_key: args.public_key.clone(),
        checkpoint: args.checkpoint.clone(),
        allow_pruned: args.allow_pruned,
        archive_dir: args.archive_dir.clone(),
        ..VerifyLogArgs::of(dir.to_path_buf())
    };
    let opts = log_cli::options(&verify_args)?;
    readable(dir, &opts)?;
    let mut report = verify_all(dir, &opts).map_err(|e| e.to_string())?;
    // Said only of a log that verified: a chain that failed (one whose files prune-log
    // moved, read without --allow-pruned, say) is the reason already, and not an empty log.
    if report.chains.iter().all(|c| c.records == 0 && c.ok()) && report.errors.is_empty() {
        let archived = |c: &verify::ChainReport| c.pruned.as_ref().is_some_and(|p| p.complete);
        let why = if !report.chains.is_empty() && report.chains.iter().all(archived) {
            "every chain was moved whole by prune-log: no chain of a running process is here"
        } else {
            "no forensic log records (the log is empty or was removed)"
        };
        report.errors.push(format!("{}: {why}", dir.display()));
    }
    Ok(report)
}

/// The verdict for a terminal. Every text that comes from the inputs (label values of the
/// snapshot, paths, the verifier's reasons) is shown with its control characters escaped: a
/// snapshot must not be able to retitle the window or overwrite the EVICT line.
fn write_text(out: &mut impl Write, v: &Verdict) -> std::io::Result<()> {
    if v.admitted() {
        writeln!(
            out,
            "ADMIT: {} ({:.1} s old) shows the hygiene control working",
            printable_path(&v.metrics_file),
            v.snapshot_age_seconds
        )?;
    } else {
        writeln!(out, "EVICT: take this process out of rotation")?;
        for r in &v.reasons {
            writeln!(out, "  - {}", printable(r))?;
        }
    }
    if let Some(log) = &v.log {
        writeln!(
            out,
            "forensic log {}: {} chains, {} records, {}",
            printable_path(&log.dir),
            log.chains,
            log.records,
            if log.verified {
                "verified"
            } else {
                "NOT verified"
            }
        )?;
    }
    for n in &v.notes {
        writeln!(out, "note: {}", printable(n))?;
    }
    Ok(())
}

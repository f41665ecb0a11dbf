//! `kvh`: the kvhygiene command line. Each verb's logic lives in the library; this file only
//! parses arguments and maps results to exit codes (0 ok, 1 check failed, 2 usage or I/O).

// Messages go to stderr through `kvhygiene::stderr_line`, never `eprintln!`, which panics
// (exit 101) when fd 2 cannot be written: exit statuses are what scripts read.
#![warn(clippy::print_stderr)]

use kvhygiene::preflight::{self, PreflightArgs};
use kvhygiene::report_out::{reader_may_leave, ReportOut};
use std::path::Path;
use std::process::ExitCode;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use clap::{Args, CommandFactory, Parser, Subcommand};

use kvhygiene::backend;
use kvhygiene::config::cli::{self as config_cli, ConfigArgs};
use kvhygiene::config::{path_in_one_spelling, BackendChoice, Config};
use kvhygiene::demo::{self, DemoOptions};
use kvhygiene::events::EventSink;
use kvhygiene::forensic::cli::shell_word;
use kvhygiene::forensic::cli::{self as forensic_cli, KeygenArgs, PruneLogArgs, VerifyLogArgs};
use kvhygiene::forensic::evidence::{self, EvidenceArgs};
use kvhygiene::forensic::tail::{self, TailLogArgs};
use kvhygiene::forensic::{ForensicLog, StartInfo};
use kvhygiene::gate::{self, GateArgs};
use kvhygiene::metrics::cli::{self as metrics_cli, MetricsArgs, ServeMetricsArgs};

#[derive(Parser)]
#[command(
    name = "kvh",
    version,
    about = "Verified zeroization of freed GPU memory for multi-tenant LLM inference",
    long_about = "kvhygiene makes sure memory one inference request freed is zeroed and verified \
                  before any other request can get it, and keeps tamper-evident evidence of it.\n\n\
                  Configuration comes from KVH_* environment variables or the TOML file named by \
                  KVH_CONFIG; every key is listed in the README, and `kvh config` shows the \
                  policy this environment gives and the controls it weakens."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Simulate tenants running requests through the allocator and show that no byte leaks.
    ///
    /// Each tenant runs requests whose KV cache grows during decode and is freed at request
    /// end, and which borrow blocks of a shared paged KV cache, claimed through the eviction
    /// gate (kvh_claim_blocks) and handed back through kvh_scrub_blocks; one request in four
    /// is preempted down a path that skips the scrub, which the gate must catch. Every new
    /// allocation and every borrowed block is read back: any non-zero byte would be a leak.
    /// Exit status 0 when nothing had residue and the gate caught every unscrubbed block
    /// (and, with --inject-fault, both sabotaged scrubs were caught) and, with a forensic
    /// log, no record was lost and no write failed (a record, an fsync, a checkpoint); 1 when
    /// not; 2 for a usage, configuration or start-up error, host memory exhausted, or a
    /// report or --metrics-file snapshot that could not be written; 130 or 143 when Ctrl-C
    /// (SIGINT) or SIGTERM stopped the run between requests, its forensic log stopped.
    Demo(DemoArgs),
    /// Verify every forensic log chain in a directory (exit 0 ok, 1 tampered, 2 error).
    ///
    /// Checks hashes, MACs (with the key ratchet), sequence continuity, rotation linkage and,
    /// given a checkpoint and public key, truncation and deleted files. Names the first bad
    /// record as file:line: reason.
    VerifyLog(VerifyLogArgs),
    /// Create an Ed25519 key pair for signed forensic-log checkpoints.
    ///
    /// Exit status: 0 the pair was written; 2 usage error, or a file could not be written
    /// (one that exists is never overwritten).
    Keygen(KeygenArgs),
    /// Move the old files of a verified forensic log to an archive (exit 0 done, 1 log does not verify, 2 error).
    #[command(long_about = PRUNE_LOG_HELP)]
    PruneLog(PruneLogArgs),
    /// Auditor's report from a forensic log (exit 0 verified, 1 tampered, 2 error).
    ///
    /// Verifies the log as verify-log does, then reports, from the chains that verified only:
    /// the period and processes covered (host, pid, version, configuration digest, clean
    /// stop), what the allocator did (each process's last periodic counters, KV block
    /// scrubs), every exception (verification failures of freed and KV blocks, quarantines,
    /// invalid frees, size mismatches, TTL breaches, policy violations, anomalies, lost
    /// records, crash recoveries, KV scrubs that did not finish) with its file:line, and the
    /// SOC 2 criteria the figures serve. Markdown on stdout, or --json.
    ///
    /// With --since / --until, the report covers one audit period: the whole log is still
    /// verified, the figures count the period's records (each process's counters as their
    /// growth across it), and every stretch of the period in which no process wrote a record
    /// (--max-gap minutes or more) is listed.
    ///
    /// Example: kvh evidence /var/log/kvh --key-file hmac.key --public-key ckpt.pub > report.md
    ///
    /// Example, the first half of 2026: kvh evidence /var/log/kvh --key-file hmac.key
    /// --since 2026-01-01 --until 2026-07-01 > report-2026h1.md
    Evidence(EvidenceArgs),
    /// Pass on a forensic log's records as they are written, each once it verified (exit 1 on tampering).
    #[command(long_about = TAIL_LOG_HELP, mut_arg("json", |a| a.hide(true)))]
    TailLog(TailLogArgs),
    /// Check the metrics file an inference process exports (exit 0 ok, 1 stale or failure, 2 error).
    #[command(long_about = METRICS_HELP)]
    Metrics(MetricsArgs),
    /// Serve a metrics file over HTTP at /metrics: a sidecar for Prometheus.
    #[command(long_about = SERVE_METRICS_HELP)]
    ServeMetrics(ServeMetricsArgs),
    /// Decide whether an inference process may keep serving tenants (exit 0 admit, 1 evict, 2 error).
    #[command(long_about = GATE_HELP)]
    Gate(GateArgs),
    /// Check the policy a process started here would run with (exit 0 valid, 1 weakened with --strict, 2 invalid).
    #[command(long_about = CONFIG_HELP)]
    Config(ConfigArgs),
    /// Check that a process started here would start, with what its policy asks for (exit 0 ready, 1 not, 2 invalid policy).
    #[command(long_about = PREFLIGHT_HELP)]
    Preflight(PreflightArgs),
    /// Print a shell completion script for kvh on stdout.
    ///
    /// Example (bash): kvh completions bash > /etc/bash_completion.d/kvh
    ///
    /// Example (zsh): kvh completions zsh > "${fpath[1]}/_kvh"
    ///
    /// Exit status: 0; 2 for an unknown shell, or a script that could not be written.
    Completions {
        /// The shell to complete in.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// Writes the run's statistics, as a serving process exports them, to `--metrics-file`
/// (`{pid}` replaced) when it is given: what `kvh metrics`, `kvh gate` and `kvh serve-metrics`
/// read, without a GPU. Its `kvh_build_info` carries the digest of `config`, the policy the
/// run's `start` record names, as a process's does. The figures are the run's final ones
/// (taken after the shutdown that drained its scrubs), with `kvh_shut_down` 0: the snapshot
/// stands for a process that serves, which `kvh gate` judges by its figures (one that shut
/// down is evicted whatever they say). Returns the file written.
fn write_demo_metrics(
    metrics: &kvhygiene::config::MetricsConfig,
    config: &Config,
    stats: &kvhygiene::stats::Stats,
) -> Result<Option<std::path::PathBuf>, String> {
    let pid = std::process::id();
    let Some(file) = metrics.file_for(pid) else {
        return Ok(None);
    };
    let mut stats = stats.clone();
    stats.shut_down = false;
    stats.config_digest = Some(kvhygiene::forensic::config_digest(&config.canonical_json()));
    if stats.log.is_none() {
        // As the runtime exports a process without a log: its log series say so.
        stats.log = serde_json::to_value(kvhygiene::forensic::LogStats::disabled()).ok();
    }
    let exporter = kvhygiene::metrics::ExporterStats::default();
    let now = std::time::SystemTime::now();
    // As the runtime's exporter writes it: a per-process file names its writer.
    let text = if metrics.per_process() {
        let identity = kvhygiene::metrics::per_process::ProcessIdentity::of_this_process();
        kvhygiene::metrics::encode_process(
            &stats,
            &exporter,
            now,
            &pid.to_string(),
            identity.as_ref(),
        )
    } else {
        kvhygiene::metrics::encode(&stats, &exporter, now)
    };
    kvhygiene::metrics::textfile::replace_snapshot(&file, text.as_bytes())
        .map_err(|e| format!("--metrics-file {}: {e}", file.display()))?;
    Ok(Some(file))
}

/// The `kvh verify-log` command that checks what the demo's log was given: its MACs with the
/// HMAC key file, its checkpoints with the public key beside the signing key (`PREFIX.pub` of
/// `kvh keygen`) and in their directory.
fn verify_hint(dir: &Path, log: &kvhygiene::config::LogConfig, secret_in_env: bool) -> String {
    let mut hint = format!("kvh verify-log {}", shell_word(dir));
    // FORENSIC_HMAC_SECRET, when set, is the secret that seals (read before the key file).
    match &log.hmac_key_file {
        _ if secret_in_env => {
            hint.push_str(" --key-file FILE (a 0600 file holding FORENSIC_HMAC_SECRET's value)")
        }
        Some(key) => hint.push_str(&format!(" --key-file {}", shell_word(key))),
        None => {}
    }
    let Some(signing) = log.signing_key_file.as_deref() else {
        return hint;
    };
    match matching_public_key(signing) {
        Some(public) => hint.push_str(&format!(" --public-key {}", shell_word(&public))),
        None => hint.push_str(&format!(
            " --public-key PUBLIC (the public half of {}, which kvh keygen wrote beside it as \
             PREFIX.pub; none that matches it is there)",
            shell_word(signing)
        )),
    }
    if let Some(ckpt) = &log.checkpoint_dir {
        hint.push_str(&format!(" --checkpoint {}", shell_word(ckpt)));
    }
    hint
}

/// The chains in `dir` besides this run's (0 when it cannot be read): those sealed or signed
/// with other keys (before a key rotation) fail the printed command without their keys.
fn other_chains(dir: &Path) -> usize {
    use kvhygiene::forensic::files::parse_file_name;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let chains: std::collections::BTreeSet<String> = entries
        .filter_map(|e| parse_file_name(e.ok()?.file_name().to_str()?))
        .map(|f| f.chain)
        .collect();
    chains.len().saturating_sub(1)
}

/// `PREFIX.pub` beside the signing key `PREFIX.key` when it holds that key's public half (a
/// `.pub` of another key would make the printed command fail on every checkpoint).
fn matching_public_key(signing: &Path) -> Option<std::path::PathBuf> {
    use kvhygiene::forensic::keys::{public_beside, read_signing_key};
    let key = read_signing_key(signing).ok()?;
    match public_beside(signing, &key)? {
        (public, Ok(true)) => Some(public),
        _ => None,
    }
}

const PRUNE_LOG_HELP: &str = "\
Move the old files of a verified forensic log to an archive (exit 0 done, 1 log does not \
verify, 2 error).

The log directory only grows: a file per rotation, a chain per process start. Files removed \
by hand make verify-log report them missing, as it must. prune-log is the retention step \
that keeps the log verifiable. It needs --key-file: the manifests that stand in for moved \
files are MACed with each chain's HMAC secret (after a key rotation, give every key).

  1. it verifies the whole directory (as verify-log --allow-pruned, with the keys given) and \
moves nothing from a log that does not verify;
  2. per chain, oldest first, it moves files whose records are all older than --older-than \
days, stopping at the two newest files of a chain still open (a writer, or crash recovery, \
reads them) and at the file holding the chain's signed checkpoint (so verifiers can always \
hold the checkpoint to a record); every file of a chain that ended with a stop record may \
move;
  3. each file's bytes are checked again as the continuation of the chain (exactly the bytes \
that move), written to --archive-dir (temporary file, 0600, fsync, then linked to its name), \
recorded in the chain's manifest DIR/kvh-CHAIN.pruned.json, and only then removed. An \
interrupted run is finished by running it again.

Afterwards `kvh verify-log DIR --key-file F --allow-pruned` checks what is left from where \
the manifests say the moved files ended (the first file left must link to the last one \
moved), and `kvh verify-log DIR --key-file F --archive-dir ARCHIVE` checks the chains whole. \
One prune-log at a time per log directory and per archive.

Exit status: 0 done (or nothing to move); 1 the log does not verify (nothing moved), or a \
chain changed since the verification (that chain not moved); 2 usage or I/O error, no log \
in DIR (no chain file, no manifest of an earlier run), a file of another content already in \
the archive, or the report could not be written (the moves were made).

Example (a nightly job keeping 90 days in the log directory):
  kvh prune-log /var/log/kvh/chains --archive-dir /archive/kvh --older-than 90 \
--key-file hmac.key --public-key checkpoint.pub";

const TAIL_LOG_HELP: &str = "\
Pass on a forensic log's records as they are written, each once it verified (exit 1 on \
tampering).

For a log shipper or a SIEM: every --interval seconds it verifies the directory as verify-log \
does (give it the same keys), then writes the records written since the last pass to stdout, \
one per line, exactly as they are in the files. A record is written only when the bytes read \
hash (and, with keys, seal) to the chain's verified head, so nothing that did not verify is \
passed on.

It also remembers where each chain was (in --state across restarts), and so catches what \
verify-log alone cannot without signed checkpoints: records cut off a chain's end, a chain \
rolled back to an earlier copy, a chain whose files are gone. On that, or on a chain that no \
longer verifies, it writes a line {\"kvh_tail_log\": \"tampering\", \"chain\": ..., \
\"reason\": ...} to stdout, says why on stderr and exits 1.

By default the records already in the log are not passed on, only those written from the \
first pass on (--from-start passes them all); a chain that appears later is passed on whole. \
With --state FILE a restarted tail goes on where it stopped; one tail per state file (a \
second one given it while the first runs is refused, 2).

On a large log the whole verifications are spaced out (--verify-every; by default they take \
at most a tenth of one core): the passes between them check each chain's new records from \
the one passed on before them (which must still be there, with its hash) as verify-log does, \
signed checkpoint included, and leave the older records to the next whole verification (a \
prune manifest changed brings one at once). A record that does not follow brings a whole verification at once.

Where prune-log runs, give \
--allow-pruned (with --key-file), or the first prune reads as files gone; records it moved \
before they were passed on are named by a {\"kvh_tail_log\": \"gap\", ...} line.

A log directory that does not exist yet is waited for, and its chains are then passed on \
from their first records; with --once nothing waits: with --state the run passes on nothing \
(the state remembers that every chain is new), without it the missing directory is an error \
(2). SIGTERM or SIGINT ends the tail after one more pass over what was \
written until then (a second one ends it at once).

Exit status: 0 after --once or a SIGTERM/SIGINT; 1 tampering; 2 usage or I/O error.

Examples:
  kvh tail-log /var/log/kvh/chains --key-file hmac.key --state /var/lib/kvh/tail.json | shipper
  kvh tail-log /var/log/kvh/chains --key-file hmac.key --security-only --once --state s.json";

const PREFLIGHT_HELP: &str = "\
Check that a process started in this environment would start, with what its policy asks for.

The library starts at the server's first CUDA allocation, often minutes into a model load, \
and stops there (fail closed) when its log directory or a key cannot be used. This makes the \
same checks first, through the same code, without starting anything: the policy (as kvh \
config loads it; KVH_PRELOAD and the FORENSIC_HMAC_SECRET length, which kvh config also \
judges, are checks of their own here), the HMAC key (KVH_HMAC_KEY_FILE or FORENSIC_HMAC_SECRET: read, owner and mode), the \
log directory (usable as it is: ours, 0700, writable, each chain's newest file as crash \
recovery opens it; or creatable in its parent; at least 1 MiB and 16 files left on its file \
system; its chains sealed as the policy seals, with an HMAC key or without), the signing key (and PREFIX.pub beside it, when there, as its public half) and the checkpoint directory (with the same room), the metrics file's directory (writable) and address (free), the file size limit (ulimit -f: room for a log file and a snapshot), and the \
backend KVH_BACKEND names (started and shut down: on a GPU, a CUDA context for a moment; \
KVH_BACKEND=auto without a CUDA driver here is skipped, not ok: the server's CUDA backend was \
not checked). It \
writes nothing. Each check is ok, off (not configured: kvh config --strict judges that), \
skipped or FAIL.

Run it where the server runs, with its variables and volumes: in a Kubernetes init \
container, with --skip-backend when the container has no GPU.

Exit status: 0 no check failed; 1 a check failed; 2 the policy is invalid (the message names \
the key), a usage error, or the report could not be written.

Examples:
  kvh preflight
  kvh preflight --skip-backend --json";

const CONFIG_HELP: &str = "\
Check the policy a process started here would run with (exit 0 valid, 1 weakened with \
--strict, 2 invalid).

The library reads its policy once, at start: the TOML file named by KVH_CONFIG, then every \
KVH_* environment variable (which wins). An unknown key or a bad value stops it from starting. \
This verb reads the policy the same way, so a rollout can find out first (a pipeline step, an \
init container, a shell with the pod's environment), and prints:

  - every key: its value, where it came from (default, file, env) and its variable;
  - the configuration digest, which the forensic log's start records carry as config_digest \
(kvh evidence lists it per process) and kvh_build_info as a label: it ties a reviewed policy \
to the runs that used it (with --file, the digest of a process whose only setting is \
KVH_CONFIG naming the file; it covers every key of this version with its value, so a \
version that adds a key or changes a default digests the same settings differently);
  - KVH_PRELOAD, as the LD_PRELOAD interposers read it (a value they refuse is invalid, off \
is weakened);
  - the controls the policy turns off or weakens, each with its risk: no forensic log, a log \
without HMAC seal (no hmac_key_file or FORENSIC_HMAC_SECRET) or without signed checkpoints, \
log_fsync=never or an fsync interval over 60 s, checkpoints over an hour apart, no metrics \
export or a metrics file rewritten less often than every 30 s, tenant_isolation=off, \
kv_gate=off, kv_gate_scope=tenant, coverage_threshold or verify_samples below the defaults, \
anomaly=off, an anomaly_z or anomaly_burst_scale over 10 or an anomaly_window_ms under 1 s.

Nothing is opened but the KVH_CONFIG file: key files and directories are checked by the \
library when it starts. Of FORENSIC_HMAC_SECRET only the presence and the length are checked \
(the library refuses one under 16 bytes or over 65535, without one trailing newline); no \
value is printed.

Exit status: 0 the policy is valid (with --strict: and weakens nothing); 1 with --strict, a \
control is off or weakened; 2 the policy is invalid (the message names the key), a usage \
error, or the report could not be written.

Examples:
  kvh config                                # this environment's policy
  kvh config --file /etc/kvh/policy.toml --strict
  env $(cat policy.env) kvh config --strict --json";

const GATE_HELP: &str = "\
Decide whether an inference process may keep serving tenants (exit 0 admit, 1 evict, 2 error).

A process whose hygiene control failed keeps running (a quarantined block is not a crash), so \
something must take it out of rotation. This verb is that decision, from the metrics file the \
process exports (KVH_METRICS_FILE) and, with --log-dir, its forensic log:

  0  admit: the snapshot is fresh, does not say the allocator shut down, shows no security
     failure and no anomaly of a failed control (and the log verifies); what still deserves a look is printed as notes (KV
     blocks that changed owner unscrubbed, which the eviction gate scrubbed, refused claims
     and KV scrubs, invalid frees, forensic log write errors that lost no record, anomalies
     of caller errors such as a burst of invalid frees)
  1  evict: the snapshot is older than --max-age (default 60 s), says the allocator shut
     down (kvh_shut_down not 0, or missing: it scrubs nothing any more, or cannot be
     shown to), shows a failed verification, residue, a failed re-scrub, a
     failed KV block scrub, lost forensic log records or an asynchronous backend error, or
     lacks one of those series; the anomaly
     detector flagged verify_failed, residue or quarantine (any signal with
     --strict-anomalies), or is on and lacks the series of any signal; the snapshot does not
     say whether the detector is on (kvh_anomaly_enabled missing, or neither 0 nor 1); or
     the log does not verify or holds no record
  2  usage error, the metrics file is missing, unreadable, not kvhygiene's or dated over
     5 s in the future (a clock stepped back fails probes until the next write), the log
     directory does not exist or cannot be read, or the report could not be written

The library's counters only grow, so an evicted process stays evicted until it restarts. Each
run judges the snapshot as it is, remembering nothing: a file whose counters went back
without a restart (rewritten by something else) is judged as written.

One file per process ({pid} in KVH_METRICS_FILE, as in a tensor-parallel engine): give the
pattern, and the file of every live process of the probe's pid namespace is judged; one
evicted process evicts, and files of processes that are gone (or written by an earlier
holder of the id: the writer named in the file is not the process holding it now) are
listed, not judged.

Examples:
  # Kubernetes readinessProbe (exec) of the inference container
  kvh gate --metrics-file /run/kvh/kvh.prom --max-age 60

  # The same, for an engine whose workers each write their own file
  kvh gate --metrics-file '/run/kvh/kvh-{pid}.prom'

  # Before promoting a canary: the control held and the evidence verifies
  kvh gate --metrics-file /run/kvh/kvh.prom --log-dir /var/log/kvh --key-file /etc/kvh/hmac.key

  # For scripts
  kvh gate --metrics-file /run/kvh/kvh.prom --json | jq -r '.verdict'";

const METRICS_HELP: &str = "\
Check the metrics file an inference process exports (exit 0 ok, 1 stale or failure, 2 error).

A process with KVH_METRICS_FILE set rewrites that file, in the Prometheus text format, every \
KVH_METRICS_INTERVAL_MS (default 10 s) and once at exit. This verb reads it, prints its \
samples, when it was taken and whether it shows a security failure, and exits:

  0  the snapshot is fresh enough (and shows no security failure, when checked)
  1  the snapshot is older than --max-age (the process stopped exporting: hung or gone),
     or, with --fail-on-security, it shows a failed verification, residue, a failed
     re-scrub, a failed KV block scrub, lost forensic log records or an asynchronous
     backend error, or one of those series is missing from it (not checked is not passed)
  2  usage error, or the file is missing, unreadable, not a kvhygiene metrics snapshot,
     or dated more than 5 s in the future (its age cannot be judged), or the report could
     not be written

Without --file the file is this environment's KVH_METRICS_FILE. A file name holding {pid} \
(one file per process of a multi-process engine, as KVH_METRICS_FILE names them) checks the \
file of every live process of this pid namespace: the exit status is 1 when one of them \
fails, 2 when none has a file. Files of processes that are gone (or written by an earlier \
holder of the id: the writer named in the file is not the process holding it now) are \
listed, not checked.

Examples:
  # Liveness check (cron, Kubernetes exec probe): fail when the last snapshot is > 60 s old
  kvh metrics --file /var/lib/node_exporter/textfile/kvh.prom --max-age 60

  # The same for every process of a tensor-parallel engine
  kvh metrics --file '/run/kvh/kvh-{pid}.prom' --max-age 60

  # Alert when the control failed or evidence was lost, or the process stopped exporting
  kvh metrics --file /run/kvh/kvh.prom --fail-on-security --max-age 60 || page-oncall

  # Structured summary for scripts
  kvh metrics --file /run/kvh/kvh.prom --json | jq '.security_failures'";

const SERVE_METRICS_HELP: &str = "\
Serve a metrics file over HTTP at /metrics: a sidecar for Prometheus.

In Kubernetes, the inference container writes KVH_METRICS_FILE into a shared emptyDir and this \
verb, in a sidecar container, serves it, so the inference process opens no port. GET /metrics \
answers the file (Content-Type text/plain; version=0.0.4), or 503 when the file is missing, \
not a metrics snapshot, missing a series the alerts read (the security checks', \
kvh_shut_down, kvh_anomaly_enabled: a file cut short), or older than --max-age; the 503 body is the same in every case, and \
the reason (by line and what is wrong, quoting nothing of the file, which may be a key \
named by mistake) is written on stderr when it changes. The file is opened \
without blocking and must be a regular file of at most 1 MiB. GET /healthz answers ok \
while the sidecar runs. Other paths get 404, other methods 405. Requests are limited in size \
(8 KiB) and time (5 s), and at most 32 connections are served at once; when all are taken, a \
new connection takes the slot of one that has not sent a whole request within a second of \
connecting, so clients that connect and send nothing cannot keep a liveness probe of /healthz \
out. Requests refused (slow, oversize, malformed, over the limit) are counted on stderr, the \
first within a second, then at most once a minute: they are in no snapshot served.

A file name holding {pid} (one file per process of a multi-process engine) serves the files \
of every live process of this pid namespace as one exposition: each family declared once, \
every process's samples under it (each carries its pid label). A process that is gone is \
served with its last snapshot while that is no older than --max-age (left out without it, or \
once older), so that what it counted last (a failure it aborted on) is scraped; a file whose \
id a later process holds is left out; one live process's file that cannot be served makes \
the answer 503, as one file does. In a pod, the sidecar must share the engine's processes (shareProcessNamespace: true).

Runs until SIGTERM or SIGINT, then exits 0 (also as PID 1 of a container, where the kernel \
drops signals a process does not handle); exits 2 at once when the address cannot be bound or \
{pid} stands in a directory of --file.

Examples:
  # On this machine only
  kvh serve-metrics --file /run/kvh/kvh.prom --listen 127.0.0.1:9464

  # In a pod (reachable by Prometheus), 503 when the writer has been silent for a minute
  kvh serve-metrics --file /shared/kvh.prom --listen 0.0.0.0:9464 --max-age 60

  # Every process of a tensor-parallel engine
  kvh serve-metrics --file '/shared/kvh-{pid}.prom' --listen 0.0.0.0:9464 --max-age 60";

#[derive(Args)]
struct DemoArgs {
    /// Number of tenants (one thread each), 1 to 64.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
    tenants: u32,
    /// Requests each tenant runs, 1 to 100000.
    #[arg(long, default_value_t = 24, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    requests: u32,
    /// Tokens decoded per request (a KV block every 16 tokens), 16 to 65536.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(16..=65_536))]
    decode_tokens: u32,
    /// Sabotage one scrub of a freed block and one of a paged KV block on purpose and show
    /// verification catch both (host backend only). Its failures are logged only into a
    /// directory of its own given with --log-dir: with a log directory from the policy
    /// (KVH_LOG_DIR, which may be a running server's audit log) and no --log-dir, or a
    /// --log-dir that is that directory, the drill is refused. Under KVH_FAILURE_MODE=abort
    /// the first sabotage caught aborts the demo (status 134), as that policy says.
    #[arg(long)]
    inject_fault: bool,
    /// Memory backend; overrides KVH_BACKEND. `auto` uses CUDA when a driver is installed.
    #[arg(long, value_enum)]
    backend: Option<BackendArg>,
    /// Write the forensic log of the run into this directory (overrides KVH_LOG_DIR); the run
    /// ends with the `kvh verify-log` command that checks it (with the key files it was
    /// sealed and signed with).
    #[arg(long, value_name = "DIR")]
    log_dir: Option<std::path::PathBuf>,
    /// With --log-dir and KVH_SIGNING_KEY_FILE: keep the run's signed checkpoints in this
    /// directory (overrides KVH_CHECKPOINT_DIR). Without it they are written next to the run's log (or, for a
    /// --log-dir that is the policy's, where the policy keeps them). The policy's checkpoint
    /// directory may be a running server's, whose auditors would find a checkpoint there of
    /// a chain that is not in the server's log: it is refused for a log of the run's own.
    #[arg(long, value_name = "DIR", requires = "log_dir")]
    checkpoint_dir: Option<std::path::PathBuf>,
    /// Leave a metrics snapshot of the run's final figures in FILE (`{pid}` in its name is
    /// replaced by the demo's process id), as a serving process exports them (kvh_shut_down
    /// 0), for trying `kvh metrics`, `kvh gate` and `kvh serve-metrics` without a GPU. KVH_METRICS_FILE is not used, and FILE may not be it: it may be a running
    /// server's file.
    #[arg(long, value_name = "FILE")]
    metrics_file: Option<std::path::PathBuf>,
    /// Print the full report as JSON on stdout instead of the summary: with the verdict
    /// (`passed`), and the run's log (`forensic_log`: its directory and the `kvh verify-log`
    /// command that checks it) and metrics snapshot (`metrics_file`) when written; a path
    /// that is not UTF-8 is null there, and given as a shell word in `*_shell`.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum BackendArg {
    Auto,
    Host,
    Cuda,
}

fn main() -> ExitCode {
    // Before any key is read: no verb needs a core dump, and one would hold the keys.
    if let Err(e) = kvhygiene::forbid_core_dumps() {
        kvhygiene::stderr_line(&format!(
            "kvh: cannot keep core dumps off ({e}); a crash could leave keys in a core file"
        ));
    }
    fail_writes_past_the_file_size_limit();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return parse_outcome(&e),
    };
    match cli.command {
        Command::Demo(args) => run_demo(args),
        Command::VerifyLog(args) => exit_code(forensic_cli::run_verify_log(&args)),
        Command::Keygen(args) => exit_code(forensic_cli::run_keygen(&args)),
        Command::PruneLog(args) => exit_code(forensic_cli::run_prune_log(&args)),
        Command::Evidence(args) => exit_code(evidence::run_evidence(&args)),
        Command::TailLog(args) => exit_code(tail::run_tail_log(&args)),
        Command::Preflight(args) => {
            // The backend check loads the kernels; where the driver compiles the embedded PTX
            // for the device (no SASS for it), it would write its JIT cache (~/.nv). Preflight
            // writes nothing: the cache is off for this process, set before the driver is
            // loaded and before any thread starts.
            std::env::set_var("CUDA_CACHE_DISABLE", "1");
            exit_code(preflight::run_preflight(&args))
        }
        Command::Metrics(args) => exit_code(metrics_cli::run_metrics(&args)),
        Command::ServeMetrics(args) => exit_code(metrics_cli::run_serve_metrics(&args)),
        Command::Gate(args) => exit_code(gate::run_gate(&args)),
        Command::Config(args) => exit_code(config_cli::run_config(&args)),
        Command::Completions { shell } => print_completions(shell),
    }
}

/// A write past the file size limit (`ulimit -f`, `RLIMIT_FSIZE`) fails with `EFBIG`, which
/// every verb reports and ends on with its documented status (2, an I/O error), rather than
/// kill the process (`SIGXFSZ`'s default action) mid-write with nothing said: a tail-log
/// restarted so would die on its first write again, its position never saved.
fn fail_writes_past_the_file_size_limit() {
    // SAFETY: sets a standard signal's disposition to "ignore", before any thread of this
    // process starts; no handler is installed, so no code runs in signal context.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
}

fn run_demo(mut args: DemoArgs) -> ExitCode {
    // Spelled as the policy keys they stand in for are (KVH_LOG_DIR, KVH_CHECKPOINT_DIR), so
    // that the run's policy digest is the one the same paths given there make.
    args.log_dir = args.log_dir.as_deref().map(path_in_one_spelling);
    args.checkpoint_dir = args.checkpoint_dir.as_deref().map(path_in_one_spelling);
    let mut config = match Config::from_env() {
        Ok(c) => c,
        Err(e) => return usage_error("demo", &format!("configuration: {e}")),
    };
    if let Some(b) = args.backend {
        config.backend = match b {
            BackendArg::Auto => BackendChoice::Auto,
            BackendArg::Host => BackendChoice::Host,
            BackendArg::Cuda => BackendChoice::Cuda,
        };
    }
    if let Some(e) = drill_into_policy_log(&args, &config) {
        return usage_error("demo", &e);
    }
    let run_checkpoint_dir = match demo_checkpoint_dir(&args, &config) {
        Ok(dir) => dir,
        Err(e) => return usage_error("demo", &e),
    };
    if args.inject_fault && config.backend == BackendChoice::Auto {
        // The drill sabotages a scrub: only ever on host memory.
        config.backend = BackendChoice::Host;
    }
    if args.inject_fault && config.backend == BackendChoice::Cuda {
        // Refused before a CUDA backend is started only to be refused (or fails for want of
        // a driver, with a message that would not name --inject-fault), before the log opens
        // (a refused run leaves no chain behind) and before anything is printed.
        let e = kvhygiene::demo::DemoError::FaultNeedsHost(kvhygiene::backend::BackendKind::Cuda);
        return usage_error("demo", &e.to_string());
    }
    let backend = match backend::select(config.backend) {
        Ok(b) => b,
        // The demo's own way out, which a server has not: host memory.
        Err(e) => {
            return usage_error(
                "demo",
                &format!(
                    "backend: {e} (to run the demo without a usable GPU: kvh demo --backend host)"
                ),
            )
        }
    };
    let opts = DemoOptions {
        tenants: args.tenants,
        requests_per_tenant: args.requests,
        decode_tokens: args.decode_tokens,
        inject_fault: args.inject_fault,
        ..DemoOptions::default()
    };
    if let Some(dir) = args.log_dir {
        config.log.checkpoint_dir = run_checkpoint_dir;
        config.log.dir = Some(dir);
        if let Err(e) = config.check_combination() {
            return usage_error("demo", &format!("configuration: {e}"));
        }
    }
    // Checked before the run: a pattern the readers would refuse is refused here too, as is
    // a path that names no file (the snapshot could not be written at the end).
    if let Some(f) = &args.metrics_file {
        if !kvhygiene::config::names_a_file(f) {
            return usage_error(
                "demo",
                &format!(
                    "--metrics-file {}: names a directory, not a file (it ends with '/', '.' or \
                 '..')",
                    f.display()
                ),
            );
        }
        if let Err(e) = kvhygiene::metrics::per_process::Target::of(f.clone()) {
            return usage_error("demo", &format!("--metrics-file {e}"));
        }
    }
    let demo_metrics = kvhygiene::config::MetricsConfig {
        file: args.metrics_file.clone(),
        ..Default::default()
    };
    // Before the run, as at the write: a file there that is not a snapshot is not replaced.
    if let Some(file) = demo_metrics.file_for(std::process::id()) {
        if let Err(e) = kvhygiene::metrics::textfile::check_replaceable(&file) {
            return usage_error("demo", &format!("--metrics-file {}: {e}", file.display()));
        }
        // A run whose snapshot could not be written fails (exit 2): learnt before the run.
        let dir = file.parent().filter(|d| !d.as_os_str().is_empty());
        if dir.is_some_and(|d| !d.is_dir()) {
            return usage_error(
                "demo",
                &format!(
                    "--metrics-file {}: its directory does not exist",
                    file.display()
                ),
            );
        }
        if let Err(e) = kvhygiene::metrics::textfile::check_writable_dir(&file) {
            return usage_error("demo", &format!("--metrics-file {}: {e}", file.display()));
        }
        // The policy's KVH_METRICS_FILE may be a running server's snapshot, which its
        // probes and `kvh gate` read: the demo's counters (a drill's failures) must not
        // stand in for the server's, as its log and checkpoints must not mix with the run's.
        if policy_metrics_file(&config.metrics, &file) {
            return usage_error(
                "demo",
                &format!(
                    "--metrics-file {} is the policy's KVH_METRICS_FILE, which may be a running \
                 server's snapshot (its probes and `kvh gate` read it): name another file",
                    file.display()
                ),
            );
        }
    }
    // Before the log opens: it takes the secret out of the environment.
    let secret_in_env = kvhygiene::forensic::keys::secret_in_env();
    if let Some(e) = sealed_unlike_its_directory(&config, secret_in_env) {
        return usage_error("demo", &e);
    }
    let log = match open_log(&config) {
        Ok(log) => log,
        Err(code) => return code,
    };
    // The header once every argument passed and the log opened: a refusal prints nothing.
    let mut out = ReportOut::new();
    if !args.json {
        out.line(format_args!(
            "kvhygiene demo: {} tenants x {} requests on the {} backend",
            opts.tenants,
            opts.requests_per_tenant,
            backend.kind()
        ));
    }
    let sink = log.clone().map(|l| l as Arc<dyn EventSink>);
    let progress = demo::stderr_progress();
    let interrupt = match Interrupt::watch() {
        Ok(i) => i,
        Err(e) => return usage_error("demo", &e),
    };
    let result = demo::run(
        backend,
        config.clone(),
        sink,
        &opts,
        &progress,
        &interrupt.stop,
    );
    let mut report = match result {
        Ok(r) => r,
        Err(e) => {
            demo::end_progress_line();
            // The chain ends with its `stop` record, as a run that finished: not left looking
            // like a crashed process's.
            if let Some(log) = &log {
                log.stop();
            }
            if let demo::DemoError::Interrupted { .. } = e {
                kvhygiene::stderr_line(&format!(
                    "kvh demo: {e}; its forensic log, if any, was stopped"
                ));
                return interrupt.exit_code();
            }
            return usage_error("demo", &e.to_string());
        }
    };
    if let Some(log) = &log {
        if let Ok(counters) = serde_json::to_value(report.stats.counters) {
            log.record_summary(counters);
        }
        log.stop();
        let stats = log.stats();
        report.log_records_lost = stats.records_lost;
        report.log_write_errors = stats.write_errors;
        report.log_last_error = stats.last_error;
        report.stats.log = serde_json::to_value(log.stats()).ok();
    }
    // Said after the report: what the run found outranks a snapshot that cannot be written.
    let (metrics_file, metrics_error) =
        match write_demo_metrics(&demo_metrics, &config, &report.stats) {
            Ok(f) => (f, None),
            Err(e) => (None, Some(e)),
        };
    if args.json {
        // The report, with what the summary says after it: the verdict, and where the run's
        // log and metrics snapshot are and how to check them.
        let mut doc = serde_json::to_value(&report).unwrap_or_default();
        if let Some(fields) = doc.as_object_mut() {
            fields.insert("passed".into(), report.passed().into());
            if let (Some(log), Some(dir)) = (&log, &config.log.dir) {
                fields.insert(
                    "forensic_log".into(),
                    serde_json::json!({
                        "dir": dir.to_str(),
                        "dir_shell": shell_word(dir),
                        "records_written": log.stats().records_written,
                        "verify_command": verify_hint(dir, &config.log, secret_in_env),
                        "other_chains": other_chains(dir),
                    }),
                );
            }
            if let Some(file) = &metrics_file {
                fields.insert("metrics_file".into(), file.to_str().into());
                fields.insert("metrics_file_shell".into(), shell_word(file).into());
            }
        }
        out.line(format_args!(
            "{}",
            serde_json::to_string_pretty(&doc).unwrap_or_default()
        ));
    } else {
        out.text(&demo::render(&report));
        if let (Some(log), Some(dir)) = (&log, &config.log.dir) {
            let lost = match report.log_records_lost {
                0 => String::new(),
                n => format!(" ({n} more could not be written)"),
            };
            out.line(format_args!(
                "forensic log: {} records in {}{lost}; check it with: {}",
                log.stats().records_written,
                dir.display(),
                verify_hint(dir, &config.log, secret_in_env)
            ));
            match other_chains(dir) {
                0 => {}
                n => out.line(format_args!(
                    "  the directory holds {n} other chain{}: any sealed or signed with other \
                     keys, before a key rotation, needs those keys too (each --key-file and \
                     --public-key, current first)",
                    if n == 1 { "" } else { "s" }
                )),
            }
        }
        if let Some(file) = &metrics_file {
            out.line(format_args!(
                "metrics: the run's last snapshot is in {f} (written once: kvh gate, whose \
                 --max-age is 60 s unless given, reads it stale a minute later); check it with: \
                 kvh metrics --file {f}, or kvh gate --metrics-file {f}",
                f = shell_word(file)
            ));
        }
    }
    let written = out.finish();
    if let Some(e) = &metrics_error {
        kvhygiene::stderr_line(&format!(
            "kvh demo: the metrics snapshot cannot be written: {e}"
        ));
    }
    if !report.passed() {
        // What the run found outranks a report that could not be written.
        return ExitCode::from(1);
    }
    match written {
        Ok(()) if metrics_error.is_none() => ExitCode::SUCCESS,
        Ok(()) => ExitCode::from(2),
        Err(e) => {
            kvhygiene::stderr_line(&format!(
                "kvh demo: passed, but the report cannot be written: {e}"
            ));
            ExitCode::from(2)
        }
    }
}

/// What clap's answer to the command line exits with: `--help` and `--version` 0 once printed
/// (2 when they cannot be written: a script reading them must not take nothing for the
/// text; a reader that closed the pipe took what it wanted), a usage error 2.
fn parse_outcome(e: &clap::Error) -> ExitCode {
    let printed = reader_may_leave(e.print())
        .and_then(|()| reader_may_leave(std::io::Write::flush(&mut std::io::stdout())))
        .is_ok();
    match (e.use_stderr(), printed) {
        (false, true) => ExitCode::SUCCESS,
        (false, false) => {
            kvhygiene::stderr_line("kvh: cannot write the help text");
            ExitCode::from(2)
        }
        (true, _) => ExitCode::from(2),
    }
}

/// Why the run's chain, sealed with an HMAC key or not as `config` says, would leave its log
/// directory unverifiable with one `verify-log` and unprunable: chains there sealed the other
/// way. Refused before the log opens, so the refusal leaves no chain behind. A server's
/// start-up goes on there (`kvh preflight` fails it); a trial run has no reason to.
fn sealed_unlike_its_directory(config: &Config, secret_in_env: bool) -> Option<String> {
    let dir = config.log.dir.as_deref()?;
    let seals = secret_in_env || config.log.hmac_key_file.is_some();
    let ckpt_dir = config
        .log
        .checkpoint_dir
        .as_deref()
        .filter(|_| config.log.signing_key_file.is_some());
    preflight::sealed_otherwise(dir, seals, ckpt_dir)
        .map(|why| format!("{why} (kvh demo --log-dir DIR logs the run elsewhere)"))
}

/// The demo's forensic log, when a directory is configured.
fn open_log(config: &Config) -> Result<Option<Arc<ForensicLog>>, ExitCode> {
    if config.log.dir.is_none() {
        return Ok(None);
    }
    ForensicLog::open(&config.log, StartInfo::current(config.canonical_json()))
        .map_err(|e| usage_error("demo", &e.to_string()))
}

fn exit_code(code: i32) -> ExitCode {
    ExitCode::from(u8::try_from(code).unwrap_or(2))
}

/// Why the fault drill may not run: its sabotaged scrubs are verification failures and
/// quarantines in the forensic log, and a log directory the policy names (rather than
/// `--log-dir`) may be a running server's, watched by its auditors and its SIEM.
fn drill_into_policy_log(args: &DemoArgs, config: &Config) -> Option<String> {
    let dir = config.log.dir.as_ref()?;
    let into_policy_dir = match &args.log_dir {
        None => true,
        Some(given) => same_path(given, dir),
    };
    (args.inject_fault && into_policy_dir).then(|| {
        format!(
            "--inject-fault: the policy logs into {} (KVH_LOG_DIR, or log_dir in KVH_CONFIG's \
             file), which may be a running server's forensic log: the drill's deliberate \
             failures would be security records there. Pass --log-dir with another directory \
             to log the drill there",
            dir.display()
        )
    })
}

/// Whether `file` is one the policy's metrics exporter may write: its KVH_METRICS_FILE, or
/// with `{pid}` in it, any process's file of that pattern (another process's may be live).
fn policy_metrics_file(policy: &kvhygiene::config::MetricsConfig, file: &std::path::Path) -> bool {
    let Some(pattern) = policy.file.as_deref() else {
        return false;
    };
    match kvhygiene::metrics::per_process::Target::of(pattern.to_path_buf()) {
        Ok(kvhygiene::metrics::per_process::Target::PerProcess(pattern)) => {
            let dir = |p: &std::path::Path| {
                p.parent()
                    .filter(|d| !d.as_os_str().is_empty())
                    .unwrap_or(std::path::Path::new("."))
                    .to_path_buf()
            };
            same_path(&dir(&pattern), &dir(file))
                && kvhygiene::metrics::per_process::is_process_file_name(&pattern, file)
        }
        _ => policy
            .file_for(std::process::id())
            .is_some_and(|p| same_path(&p, file)),
    }
}

/// Whether `a` and `b` name one file or directory, existing or not: the same file once both
/// exist (a trailing slash, a symlink or another spelling of the path is the same one), else
/// the same path once each is resolved as far as it exists ([`resolved`]).
fn same_path(a: &std::path::Path, b: &std::path::Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => (x.dev(), x.ino()) == (y.dev(), y.ino()),
        _ => resolved(a) == resolved(b),
    }
}

/// Symbolic links [`resolved`] follows at most, as the kernel's own limit on a path's links.
const MAX_LINK_HOPS: u32 = 40;

/// `path` made absolute, with its deepest existing ancestor canonicalised and the rest (the
/// levels not created yet) appended as written: `logs` from /srv and `/srv/logs/` are one
/// path. A symbolic link whose target does not exist yet is followed to it. `None` when the
/// path cannot be made absolute or has more links than [`MAX_LINK_HOPS`].
fn resolved(path: &std::path::Path) -> Option<std::path::PathBuf> {
    resolved_within(path, MAX_LINK_HOPS)
}

fn resolved_within(path: &std::path::Path, hops: u32) -> Option<std::path::PathBuf> {
    let absolute = std::path::absolute(path).ok()?;
    let mut missing = Vec::new();
    let mut at = absolute.as_path();
    loop {
        if let Ok(real) = std::fs::canonicalize(at) {
            return Some(missing.iter().rev().fold(real, |p, name| p.join(name)));
        }
        let dangling = std::fs::symlink_metadata(at).is_ok_and(|m| m.file_type().is_symlink());
        if dangling {
            // Its target, relative to the link's directory, and the missing rest after it.
            let target = at.parent()?.join(std::fs::read_link(at).ok()?);
            let whole = missing.iter().rev().fold(target, |p, name| p.join(name));
            return resolved_within(&whole, hops.checked_sub(1)?);
        }
        missing.push(at.file_name()?.to_owned());
        at = at.parent()?;
    }
}

/// With `--log-dir`, where the run's signed checkpoints go, or why its flags are refused. A
/// log of the run's own keeps them next to it (the writer's default) or in `--checkpoint-dir`,
/// never where the policy's go (its checkpoint directory, or its log directory without one):
/// that is a server's, and its auditors would find a checkpoint there of a chain that is not
/// in the server's log. A run into the policy's own log directory keeps the policy's
/// checkpoint directory, where that log's verification looks for them.
fn demo_checkpoint_dir(
    args: &DemoArgs,
    config: &Config,
) -> Result<Option<std::path::PathBuf>, String> {
    let Some(run_log) = &args.log_dir else {
        return Ok(config.log.checkpoint_dir.clone());
    };
    let policy_log = config.log.dir.as_ref();
    let policy_checkpoints = config.log.checkpoint_dir.as_ref().or(policy_log);
    let is =
        |a: &std::path::Path, b: Option<&std::path::PathBuf>| b.is_some_and(|b| same_path(a, b));
    let into_policy_log = is(run_log, policy_log);
    if !into_policy_log && args.checkpoint_dir.is_none() && is(run_log, policy_checkpoints) {
        // Its checkpoints would go next to it: where the policy's are.
        return Err(format!(
            "--log-dir {} is the policy's checkpoint directory (KVH_CHECKPOINT_DIR, or \
             checkpoint_dir in KVH_CONFIG's file), which may be a running server's: a \
             checkpoint there of a chain that is not in its log makes its log fail \
             verification. Give another directory, or --checkpoint-dir",
            run_log.display()
        ));
    }
    let Some(given) = &args.checkpoint_dir else {
        return Ok(into_policy_log
            .then(|| config.log.checkpoint_dir.clone())
            .flatten());
    };
    if config.log.signing_key_file.is_none() {
        return Err(format!(
            "--checkpoint-dir {}: checkpoints are signed with KVH_SIGNING_KEY_FILE, which is \
             not set, so none would be written; set it (kvh keygen --out PREFIX makes a key) \
             or leave --checkpoint-dir out",
            given.display()
        ));
    }
    let policy_place = is(given, policy_checkpoints) || is(given, policy_log);
    if into_policy_log && !is(given, policy_checkpoints) {
        return Err(format!(
            "--checkpoint-dir {}: the run logs into the policy's log directory, whose \
             checkpoints are in {}; give that directory, or leave --checkpoint-dir out",
            given.display(),
            policy_checkpoints.map_or_else(Default::default, |d| d.display().to_string())
        ));
    }
    if !into_policy_log && policy_place {
        return Err(format!(
            "--checkpoint-dir {} is where the policy's checkpoints or log go \
             (KVH_CHECKPOINT_DIR or KVH_LOG_DIR), which may be a running server's: a \
             checkpoint there of a chain that is not in its log makes its log fail \
             verification. Give another directory",
            given.display()
        ));
    }
    // Said as the option given, before the log directory is made: the writer would name
    // the policy's variable, after making the log directory.
    use kvhygiene::forensic::ForensicError as E;
    kvhygiene::forensic::files::inspect_dir(given, "checkpoint directory").map_err(|e| {
        let (E::Io(m) | E::Permission(m) | E::Key(m)) = e;
        format!("--checkpoint-dir {m}")
    })?;
    Ok(Some(given.clone()))
}

/// SIGINT and SIGTERM during `kvh demo`: the first stops the run between requests, so that
/// its forensic log ends with a `stop` record rather than reading as a crashed process's; a
/// second ends the process at once (128 + the signal), should the stop hang.
struct Interrupt {
    stop: Arc<AtomicBool>,
    signal: Arc<AtomicUsize>,
}

impl Interrupt {
    fn watch() -> Result<Self, String> {
        use signal_hook::consts::{SIGINT, SIGTERM};
        let stop = Arc::new(AtomicBool::new(false));
        let signal = Arc::new(AtomicUsize::new(0));
        // On a terminal the progress line is open: the notice ends it first (its leading
        // newline); elsewhere there is no such line, and no blank line is wanted.
        let notice: &'static [u8] = if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            STOPPING_NOTICE
        } else {
            &STOPPING_NOTICE[1..]
        };
        for sig in [SIGINT, SIGTERM] {
            // Registered first, the shutdown sees the flag the first signal set only from the
            // second signal on; the notice, before the flag is set, only the first signal.
            let unstopped = Arc::clone(&stop);
            signal_hook::flag::register_conditional_shutdown(sig, 128 + sig, Arc::clone(&stop))
                .and_then(|_| {
                    signal_hook::flag::register_usize(sig, Arc::clone(&signal), sig as usize)
                })
                .and_then(|_| {
                    // SAFETY: the action runs in signal context and only loads an atomic and
                    // calls write(2), both async-signal-safe; it allocates and locks nothing.
                    unsafe {
                        signal_hook::low_level::register(sig, move || {
                            say_stopping(&unstopped, notice)
                        })
                    }
                })
                .and_then(|_| signal_hook::flag::register(sig, Arc::clone(&stop)))
                .map_err(|e| format!("cannot handle signal {sig}: {e}"))?;
        }
        Ok(Interrupt { stop, signal })
    }

    /// The shell's status for the signal that stopped the run (128 + its number).
    fn exit_code(&self) -> ExitCode {
        let sig = self.signal.load(Ordering::SeqCst);
        ExitCode::from(u8::try_from(128 + sig).unwrap_or(130))
    }
}

/// What the first SIGINT or SIGTERM says at once: a request under way may take a while (up
/// to 65536 decode steps), and a run that goes quiet reads as hung.
const STOPPING_NOTICE: &[u8] =
    b"\nkvh demo: stopping once the requests under way end (a second signal stops at once)\n";

/// Writes `notice` on stderr unless `stop` is already set (a later signal). Runs in signal
/// context: one atomic load and one write(2), whose result is of no use there.
fn say_stopping(stop: &AtomicBool, notice: &[u8]) {
    if !stop.load(Ordering::SeqCst) {
        // SAFETY: `notice` is a live byte slice of `notice.len()` bytes; write(2) reads no
        // more, and is async-signal-safe.
        unsafe {
            libc::write(2, notice.as_ptr().cast(), notice.len());
        }
    }
}

/// `kvh VERB: MSG` on stderr, as every verb begins its messages; the usage status (2).
fn usage_error(verb: &str, msg: &str) -> ExitCode {
    kvhygiene::stderr_line(&format!("kvh {verb}: {msg}"));
    ExitCode::from(2)
}

/// `kvh completions SHELL`. The script is built in memory first: the generator panics on a
/// failed write, and a full disk must be an error, not a panic (a closed pipe, `kvh
/// completions bash | head`, is a reader that took what it wanted).
fn print_completions(shell: clap_complete::Shell) -> ExitCode {
    use std::io::Write;
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "kvh", &mut script);
    match reader_may_leave(std::io::stdout().lock().write_all(&script)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => usage_error(
            "completions",
            &format!("cannot write the completion script: {e}"),
        ),
    }
}

//! `kvh evidence`: an auditor's report built from a verified forensic log.
//!
//! The log is verified first, exactly as `kvh verify-log` does; only chains that verified are
//! read for the report, so every figure in it comes from records whose hashes (and MACs and
//! checkpoints, when given) were checked. The report says what the log covers (period,
//! processes and their configuration digests), what the allocator did (the last periodic
//! counters of each process, KV block scrubs), and every exception (security records), with
//! the file and line an auditor can look up, and maps the figures to the SOC 2 criteria the
//! controls serve.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::Path;

use serde::Serialize;
use serde_json::{Map, Value};

use super::cli::{options, VerifyLogArgs, EXIT_OK, EXIT_TAMPERED, EXIT_USAGE};
use super::config_digest;
use super::lines::{Line, Lines};
use super::period::{self, Period};
use super::record::{chain_hash_open, hex, parse_hash, GENESIS_PREV};
use super::scan::scan;
use super::unix_nanos;
use super::verify::{self, rfc3339, verify_all, Pruned, Report};
use crate::config::Config;
use crate::context::unprintable;

/// `kvh evidence`: arguments.
#[derive(Clone, Debug, clap::Args)]
pub struct EvidenceArgs {
    #[command(flatten)]
    pub log: VerifyLogArgs,
    /// Exceptions listed one by one (all are counted).
    #[arg(long, default_value_t = 200, value_name = "N")]
    pub max_exceptions: usize,
    /// A reviewed policy: its digest (64 hex digits, as `kvh config` prints it in the
    /// process's environment) or its TOML file (digested as `kvh config --file` does, so it
    /// matches only processes whose whole policy is that file). Repeatable. The report then
    /// lists every process whose start record carries another digest. A version that adds a
    /// key or changes a default digests the same settings differently.
    #[arg(long, value_name = "DIGEST|FILE")]
    pub approved_config: Vec<String>,
    /// Report on an audit period only, from this instant on: a date (2026-01-01, meaning
    /// 00:00 UTC) or an RFC 3339 time (2026-01-01T08:00:00+02:00). The whole log is still
    /// verified; the figures, processes and exceptions are those of the period.
    #[arg(long, value_name = "TIME", value_parser = period::parse_instant)]
    pub since: Option<u64>,
    /// End of the audit period, not included: `--since 2026-01-01 --until 2026-07-01` is the
    /// first half of 2026.
    #[arg(long, value_name = "TIME", value_parser = period::parse_instant)]
    pub until: Option<u64>,
    /// With --since or --until (it needs one of them): list the stretches of the period of at
    /// least this many minutes (10 when not given) in which no process wrote a record (a
    /// running writer records a summary every summary_interval_ms, a minute by default, even
    /// when idle).
    #[arg(
        long,
        value_name = "MINUTES",
        value_parser = clap::value_parser!(u64).range(1..=5_256_000)
    )]
    pub max_gap: Option<u64>,
    /// Report on one tenant: the KV scrubs, exceptions and anomalies whose records name it
    /// (as the tenant of the request, or as the caller of a refused free), for a customer's
    /// audit or an incident. The whole log is still verified; starts, recoveries, summaries
    /// and lost records concern every tenant and stay in, and the counters stay each
    /// process's own (they are not kept per tenant). Ids are compared exactly: an id no
    /// verified record of the log names, in the period or out of it, is an error (status 2,
    /// no report) whose message lists the tenants the log names (the first 20, sorted), so a
    /// mistyped id is not reported as a tenant without exceptions.
    #[arg(long, value_name = "ID", value_parser = tenant_id)]
    pub tenant: Option<String>,
}

/// `--tenant`: a non-empty tenant id of at most [`MAX_ID_LEN`](crate::context::MAX_ID_LEN)
/// bytes without control characters, which no release of `kvh_set_context` took: asking for
/// one is a mistake to name, not a report of nothing. An id with an invisible character is
/// taken: logs outlive the releases that wrote them, and an earlier one took some that
/// `kvh_set_context` refuses now (the report shows the id escaped).
fn tenant_id(value: &str) -> Result<String, String> {
    const NO_RECORD: &str = "no record can name such a tenant";
    if value.is_empty() {
        return Err("a tenant id cannot be empty".into());
    }
    if value.len() > crate::context::MAX_ID_LEN {
        return Err(format!(
            "the tenant id is {} bytes long; ids are at most {} bytes ({NO_RECORD})",
            value.len(),
            crate::context::MAX_ID_LEN
        ));
    }
    if let Some(c) = value.chars().find(|c| c.is_control()) {
        return Err(format!(
            "the tenant id holds a control character (U+{:04X}) ({NO_RECORD})",
            u32::from(c)
        ));
    }
    Ok(value.to_string())
}

impl EvidenceArgs {
    /// The report on `log` with the defaults of the command line (no audit period, no
    /// approved policy); callers set what they have with struct update syntax.
    pub fn of(log: VerifyLogArgs) -> Self {
        EvidenceArgs {
            log,
            max_exceptions: 200,
            approved_config: Vec::new(),
            since: None,
            until: None,
            max_gap: None,
            tenant: None,
        }
    }
}

/// Envelope fields of every record; the rest are the kind's own.
const ENVELOPE: &[&str] = &[
    "v",
    "seq",
    "ts",
    "kind",
    "chain",
    "epoch",
    "prev",
    "hash",
    "mac",
    "tenant_id",
    "request_id",
    "model_id",
];

/// Record kinds that concern every tenant of their process: a `--tenant` report keeps them.
const SHARED_KINDS: &[&str] = &[
    "start",
    "recovery",
    "rotate",
    "summary",
    "checkpoint",
    "lost",
    "stop",
];

/// Record kinds that are exceptions an auditor must see.
const EXCEPTION_KINDS: &[&str] = &[
    "verify_failed",
    "kv_verify_failed",
    "quarantine",
    "invalid_free",
    "size_mismatch",
    "ttl_exceeded",
    "policy_violation",
    "anomaly",
    "lost",
    "recovery",
];

/// The report.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Evidence {
    /// Null when the path is not UTF-8 (see `log_dir_shell`).
    #[serde(serialize_with = "crate::report_out::path_or_null")]
    pub log_dir: std::path::PathBuf,
    /// The same path as one shell word, whatever its bytes.
    pub log_dir_shell: String,
    pub generated_at: String,
    pub generator: String,
    pub integrity: Integrity,
    /// First and last record of the verified chains.
    pub period: Option<(String, String)>,
    pub processes: Vec<Process>,
    pub records_by_kind: BTreeMap<String, u64>,
    /// The last `summary` counters of each process (run), summed.
    pub counters: BTreeMap<String, u64>,
    /// Processes (runs) that wrote no `summary` (in the audit period, when one is given):
    /// their counters are not in `counters`.
    pub processes_without_summary: u64,
    pub kv_scrubs: KvScrubs,
    /// Distinct tenant ids in the records.
    pub tenants: u64,
    pub exceptions_by_kind: BTreeMap<String, u64>,
    /// `anomaly` records by signal (records without one, written through
    /// `ForensicLog::record_anomaly`, count under `unspecified`).
    pub anomalies_by_signal: BTreeMap<String, u64>,
    /// The first `--max-exceptions`, chain by chain (in chain id order), each in log order.
    pub exceptions: Vec<Exception>,
    /// Records failed writes lost: per process, its `stop` record's total, or without one the
    /// sum of its `lost` records.
    pub records_lost: u64,
    /// With `--approved-config`: which processes ran a reviewed policy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<PolicyCheck>,
    /// With `--since` / `--until`: the audit period the figures cover (`period` is then the
    /// first and last record inside it, and every other figure counts its records only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audit_period: Option<AuditPeriod>,
    /// With `--tenant`: whose report it is. The record counts, KV scrubs, exceptions, anomalies
    /// and `tenants` are that tenant's (with the records every tenant shares); the integrity,
    /// period, processes, gaps, counters and lost records stay the log's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenant: Option<TenantScope>,
}

/// The tenant of a `--tenant` report.
#[derive(Clone, Debug, Default, Serialize)]
pub struct TenantScope {
    pub tenant_id: String,
    /// Records of the report's time that name neither this tenant nor every tenant (another
    /// tenant's, or a thread's without a context): verified, not counted.
    pub records_left_out: u64,
    /// Whether any verified record names the tenant, in the audit period or out of it: a
    /// period without its records is not a mistyped id. Always true in the report of a log
    /// that verified (a tenant no verified record names is refused, status 2); false only in
    /// that of a log that failed verification, whose unread records may name it.
    pub named_in_log: bool,
}

/// The audit period of `--since` / `--until`, and how fully the log covers it.
#[derive(Clone, Debug, Default, Serialize)]
pub struct AuditPeriod {
    /// From (included) and until (not included); `None` is an open end.
    pub since: Option<String>,
    pub until: Option<String>,
    /// The period had not ended when the report was made: it covers up to then.
    pub still_running: bool,
    /// Records of the verified chains outside the period: verified, not counted.
    pub records_outside: u64,
    /// Processes are counted by the differences of their periodic `summary` counters; a
    /// writer records one every `summary_interval_ms`, so activity within one interval of
    /// either end may fall on the other side.
    pub counters_from_summaries: bool,
    /// The gap length listed, in minutes (`--max-gap`).
    pub max_gap_minutes: u64,
    /// The stretch searched for gaps: the period from its start (without `--since`, the first
    /// record) up to its end or the report's time, whichever is first. `None` when none of
    /// the period lies there (it has not begun, or ends before the first record).
    pub searched: Option<(String, String)>,
    /// Stretches of `searched` of at least `max_gap_minutes` in which no process wrote a
    /// record to the verified chains: no process ran with kvhygiene, its writer stalled, or
    /// its log is not in the directory read.
    pub gaps: Vec<Gap>,
    /// Chains with a process that ran into the period but whose records before it (its
    /// `start`, and every summary before the period) `kvh prune-log` moved away: what it did
    /// before the period cannot be told from what it did in it, so its counters and its
    /// `stop` total of lost records are left out of the figures (its `lost` records in the
    /// period still count). Read the log with `--archive-dir` to count them.
    pub counters_unattributed: Vec<String>,
    /// Chains whose records `kvh prune-log` moved away include records of the period: they
    /// are not in this report (give `--archive-dir` to read them).
    pub pruned_in_period: Vec<String>,
}

/// A stretch of the audit period with no record.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Gap {
    pub from: String,
    pub to: String,
    pub minutes: u64,
    /// Chains whose records `kvh prune-log` moved span part of the stretch (as their
    /// manifests date them): records this report did not read may lie in it. Absent when
    /// none does.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub moved_records_of: Vec<String>,
}

/// The processes' policies against the reviewed ones (`--approved-config`).
#[derive(Clone, Debug, Default, Serialize)]
pub struct PolicyCheck {
    /// The approved digests, as given or computed from the files.
    pub approved: Vec<String>,
    /// Processes whose `start` (or `recovery`) record carries an approved digest.
    pub processes_approved: u64,
    /// The others: another digest, or none.
    pub unapproved: Vec<Process>,
    /// Processes whose `start` record `prune-log` moved away: not judged.
    pub processes_not_judged: u64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Integrity {
    pub verified: bool,
    pub chains: usize,
    pub files: usize,
    pub records: u64,
    /// Every chain's MACs were checked (a key was given).
    pub macs_checked: bool,
    /// Without `--key-file`: the chains whose records carry MACs, left unchecked (a hint, not
    /// a check: without the key anyone could have taken them off).
    pub unchecked_sealed: usize,
    /// Without `--public-key`: the chains that verified whose writer named a signing key, so
    /// signed checkpoints, left unchecked.
    pub unchecked_signed: usize,
    /// What each HMAC secret given sealed (the chains that verified), in the order given.
    pub keys: Vec<KeyUse>,
    /// Chains sealed with a secret whose first chain is older than another secret's first
    /// chain, begun after that newer secret was in use: a process started with the old key
    /// after the rotation, or a chain forged with a retired key. Listed, not failed: the log
    /// itself verified.
    pub late_retired_key: Vec<String>,
    /// With several keys given: chains that verified but are not bound to their keys (no
    /// signed checkpoint names their HMAC secret and signer), which whoever holds another
    /// key given could have rewritten.
    pub unbound: Vec<String>,
    /// Chains whose own `checkpoint` records name a later signed checkpoint than the file
    /// that matched ([`ChainReport::checkpoint_behind`](super::verify::ChainReport::checkpoint_behind)):
    /// an earlier checkpoint put back, or checkpoints copied before the later one.
    pub checkpoint_behind: Vec<CheckpointBehind>,
    /// Chains that verified, whose signed checkpoint matched, with records after it (but
    /// those in `checkpoint_behind`): a cut there would go unseen. A running writer's chain
    /// always has some, until its next checkpoint; a chain that stopped, or whose writer died,
    /// keeps them.
    pub past_checkpoint: Vec<PastCheckpoint>,
    /// Chains that verified and whose signed checkpoint matched, when a public key was given.
    pub checkpoints_matched: Option<usize>,
    /// Chains that verified without a record (a writer that ended before its first record
    /// was whole): nothing in them for a checkpoint to cover.
    pub empty_chains: usize,
    /// Chains whose oldest files (or all) `kvh prune-log` moved away: their records before
    /// the moved range's end are not in this report.
    pub pruned: Vec<PrunedChain>,
    /// Chains whose newest file ends in an incomplete line, with its length in bytes: part
    /// of a record that is not in the log (a writer that died mid-write, or a file cut
    /// short). Listed, not failed, as `verify-log` lists them.
    pub torn_tails: Vec<TornTail>,
    pub problems: Vec<String>,
}

/// A chain whose checkpoint file is older than its records say ([`Integrity::checkpoint_behind`]).
#[derive(Clone, Debug, Default, Serialize)]
pub struct CheckpointBehind {
    pub chain: String,
    /// The seq of the checkpoint file that matched.
    pub matched_seq: u64,
    /// The seq the chain's `checkpoint` records say was signed last.
    pub recorded_seq: u64,
}

/// A chain with records after its signed checkpoint ([`Integrity::past_checkpoint`]).
#[derive(Clone, Debug, Default, Serialize)]
pub struct PastCheckpoint {
    pub chain: String,
    /// The seq of the checkpoint that matched.
    pub checkpoint_seq: u64,
    /// The chain's last record.
    pub last_seq: u64,
    /// The chain ends with a `stop` record, whose own checkpoint is not the one read.
    pub stopped: bool,
}

/// A chain's incomplete last line ([`Integrity::torn_tails`]).
#[derive(Clone, Debug, Default, Serialize)]
pub struct TornTail {
    pub chain: String,
    pub bytes: u64,
}

/// The chains one HMAC secret sealed (after a key rotation, several secrets are given).
#[derive(Clone, Debug, Default, Serialize)]
pub struct KeyUse {
    /// The secret's file, as given.
    pub key: String,
    pub chains: usize,
    /// First and last record of those chains (the records left, for pruned chains).
    pub first_record: Option<String>,
    pub last_record: Option<String>,
}

/// A chain's part that `kvh prune-log` moved, as its (MAC-verified) manifest says.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PrunedChain {
    pub chain: String,
    #[serde(flatten)]
    pub pruned: Pruned,
}

/// One writer process: a run of a chain, from its `start` record, or from the `recovery`
/// record of a process that continued the chain after its writer crashed.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Process {
    pub chain: String,
    pub host: Option<String>,
    pub pid: Option<u64>,
    pub version: Option<String>,
    pub config_digest: Option<String>,
    /// The sampling rule its scrubs' seeds select words by (`backend::verify::SAMPLE_RULE`);
    /// absent from the records of earlier versions (see `SAMPLE_RULE` for theirs).
    pub sample_rule: Option<u64>,
    pub started: Option<String>,
    pub last_record: Option<String>,
    /// The run ends with a `stop` record.
    pub clean_stop: bool,
    /// The start-up error its `stop` record carries: the start-up failed after the log
    /// opened, and the process served no memory.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub start_failed: Option<String>,
    /// The run began with a `recovery` record: it continued a chain whose writer crashed.
    pub recovered: bool,
    /// No `start` or `recovery` record of the run is in the records read (`prune-log` moved
    /// it): host, pid, version and policy digest are unknown here, and `started` is the
    /// first record left.
    pub start_archived: bool,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct KvScrubs {
    pub calls: u64,
    /// Calls that stopped before every segment was verified (their records carry `error`).
    pub unfinished_calls: u64,
    /// Blocks named, blocks read back (every segment verified, or one failed), blocks that
    /// failed.
    pub blocks: u64,
    pub verified_blocks: u64,
    pub failed_blocks: u64,
    /// Bytes of the segments named.
    pub bytes: u64,
    /// Of the calls, those the eviction gate made inside `kvh_claim_blocks` (`trigger`
    /// `claim_gate`), and the blocks they named; of those, the blocks whose owner the gate
    /// did not know (`unknown_owner_blocks`: a new cache's first claims, or a forgotten
    /// ledger's, which a claim scrubs again), and the blocks the engine handed to another
    /// owner without scrubbing them first, which the gate's scrub verified and handed over
    /// (`owner_changed_blocks`; in records written before that field existed, every block
    /// named whose owner the gate knew, and in those written before `unknown_owner_blocks`
    /// existed, every block named).
    pub gate_calls: u64,
    pub gate_blocks: u64,
    pub gate_unknown_owner_blocks: u64,
    pub gate_owner_changed_blocks: u64,
}

/// One security record.
#[derive(Clone, Debug, Serialize)]
pub struct Exception {
    pub file: String,
    pub line: u64,
    pub time: String,
    pub kind: String,
    pub tenant_id: Option<String>,
    pub request_id: Option<String>,
    /// The kind's own fields, `key=value` joined by `, `.
    pub detail: String,
}

/// Runs `kvh evidence`; returns the exit code: 0 the log verified and the report was
/// written, 1 the log failed verification (the report says where; its figures cover only the
/// chains that verified), 2 usage or I/O error, no records, or a `--tenant` that no verified
/// record of a log that verified names (the message lists the tenants it names).
pub fn run_evidence(args: &EvidenceArgs) -> i32 {
    let evidence = match collect_with(args, |why| crate::say(format_args!("kvh evidence: {why}"))) {
        Ok(e) => e,
        Err(e) => {
            crate::say(format_args!("kvh evidence: {e}"));
            if args.log.json {
                crate::report_out::json_error(&e.to_string(), serde_json::json!({}));
            }
            return EXIT_USAGE;
        }
    };
    let mut out = std::io::stdout().lock();
    let written = if args.log.json {
        serde_json::to_writer_pretty(&mut out, &evidence)
            .map_err(std::io::Error::from)
            .and_then(|_| writeln!(out))
    } else {
        out.write_all(render(&evidence).as_bytes())
    };
    let problems = evidence.integrity.problems.iter().map(String::as_str);
    super::cli::hint_checkpoint_dir(&args.log, problems);
    if let Err(e) = crate::report_out::reader_may_leave(written) {
        crate::say(format_args!("kvh evidence: cannot write the report: {e}"));
        // A log that failed verification is still reported as such (1).
        if evidence.integrity.verified {
            return EXIT_USAGE;
        }
    }
    if evidence.integrity.verified {
        EXIT_OK
    } else {
        EXIT_TAMPERED
    }
}

/// Verifies the log and builds the report ([`collect_with`], saying nothing of its retries).
pub fn collect(args: &EvidenceArgs) -> Result<Evidence, String> {
    collect_with(args, |_| {})
}

/// How many times a report is made when `prune-log` moved files under each try.
const MAX_TRIES: u32 = 5;

/// Verifies the log and builds the report; `on_retry` hears why a try is made again.
///
/// The chain files are listed after the verification (so a running writer's newest file, which
/// may hold a verified head, is in the listing) and read, each chain only up to the last
/// record verified and held to it by hash; the log is then verified again, and a chain that
/// changed in between (an edit; not records appended after the head) makes the report
/// unverified, so no figure comes from a record that was not checked.
///
/// A `prune-log` run that moves files meanwhile changes chains too, legitimately: when every
/// chain that changed (or whose reading failed) is pruned further at the second
/// verification than at the first (its manifest, written before the prune removes a file,
/// accounts for the change), the report is made again (the whole of it, from a new
/// verification), up to `MAX_TRIES` times, waiting longer each time. Otherwise a change that
/// the second verification finds (an edit, a file deleted) makes the report unverified
/// (exit 1), and a reading that fails while the log still verifies makes it fail (exit 2).
pub fn collect_with(
    args: &EvidenceArgs,
    mut on_retry: impl FnMut(&str),
) -> Result<Evidence, String> {
    let period = audit_period_of(args)?;
    let opts = options(&args.log)?;
    let approved = approved_digests(&args.approved_config)?;
    let mut pause = std::time::Duration::from_millis(100);
    for tries in 1.. {
        match collect_once(args, period, &opts, &approved) {
            Ok(ev) => return Ok(ev),
            Err(Try::Failed(e)) => return Err(e),
            Err(Try::Pruned(why)) if tries >= MAX_TRIES => {
                return Err(format!(
                    "{why}, at each of {MAX_TRIES} tries: make the report once prune-log is done"
                ))
            }
            Err(Try::Pruned(why)) => {
                on_retry(&format!(
                    "{why}; making the report again (try {} of {MAX_TRIES})",
                    tries + 1
                ));
                std::thread::sleep(pause);
                pause *= 2;
            }
        }
    }
    unreachable!("the loop returns")
}

/// Why one try at the report did not make it.
enum Try {
    /// Nothing the log's state could change: the error to report.
    Failed(String),
    /// `prune-log` moved files while the try read them: worth another.
    Pruned(String),
}

/// One try at the report ([`collect_with`]).
fn collect_once(
    args: &EvidenceArgs,
    period: Period,
    opts: &verify::VerifyOptions,
    approved: &[String],
) -> Result<Evidence, Try> {
    let dir = &args.log.dir;
    let report = verify_all(dir, opts).map_err(|e| Try::Failed(e.to_string()))?;
    let chains = verify::list_all(dir, opts).map_err(|e| Try::Failed(e.to_string()))?;
    if report.ok() && report.chains.iter().all(|c| c.records == 0) {
        return Err(Try::Failed(format!(
            "{}: no forensic log records to report on",
            dir.display()
        )));
    }
    // One instant for the report: the time it says it was made is where its search of the
    // audit period ends.
    let now = unix_nanos(std::time::SystemTime::now());
    let mut ev = Evidence {
        log_dir: dir.to_path_buf(),
        log_dir_shell: super::cli::shell_word(dir),
        generated_at: rfc3339(now),
        generator: format!("kvh {}", env!("CARGO_PKG_VERSION")),
        integrity: integrity(&report),
        ..Evidence::default()
    };
    let mut tally = Tally {
        period,
        log_dir: dir.to_path_buf(),
        gap_ns: max_gap_minutes(args).saturating_mul(60_000_000_000),
        tenant: args.tenant.clone(),
        ..Tally::default()
    };
    // A reading that fails is judged once the log was verified again: a prune of its chain
    // explains it.
    let read = tally_chains(&report, &chains, &mut ev, &mut tally, args.max_exceptions);
    let again = verify_all(dir, opts).map_err(|e| Try::Failed(e.to_string()))?;
    if let Err((chain, e)) = read {
        if pruned_further(&report, &again, &chain) {
            return Err(Try::Pruned(pruned_message(&chain)));
        }
        // A chain that verifies again failed to be read for another reason (a file that
        // could not be opened): no report (exit 2). One that no longer verifies (or is gone)
        // was edited while the report was made: that is a finding (exit 1), reported as the
        // second verification found it, not a report that could not be made. Judged on that
        // chain alone: another's failure, found by both verifications, says nothing of it.
        let fails_now = again
            .chains
            .iter()
            .find(|c| c.chain == chain)
            .is_none_or(|c| !c.ok());
        if !fails_now {
            return Err(Try::Failed(e));
        }
        ev.integrity = integrity(&again);
        ev.integrity.problems.push(format!(
            "chain {chain} changed while the report was being made: {e}"
        ));
    }
    let head_still_there = |b: &super::verify::ChainReport| {
        let list = chains.iter().find(|(id, _)| *id == b.chain).map(|(_, l)| l);
        list.is_some_and(|l| head_in_files(b, l))
    };
    let changed = changed_chains(&report, &again, head_still_there);
    if let Some(first) = changed.first() {
        if changed.iter().all(|c| pruned_further(&report, &again, c)) {
            return Err(Try::Pruned(pruned_message(first)));
        }
    }
    for changed in changed {
        ev.integrity.verified = false;
        ev.integrity.problems.push(format!(
            "chain {changed} changed while the report was being made (a writer still running, \
             or an edit); make the report again from a stable copy"
        ));
    }
    // A tenant no verified record names is most likely a mistyped id: a report saying it has
    // no exceptions would read as a clean bill. A log that failed verification is reported
    // as such (its unread records may name the tenant, and its status must stay 1).
    if let Some(own) = tally.tenant.as_deref() {
        if !tally.tenant_named && ev.integrity.verified {
            let unread = !ev.integrity.pruned.is_empty() && args.log.archive_dir.is_empty();
            return Err(Try::Failed(tenant_not_named(own, &tally, unread)));
        }
    }
    ev.tenants = tally.tenants.len() as u64;
    ev.tenant = tally.tenant.as_ref().map(|t| TenantScope {
        tenant_id: t.clone(),
        records_left_out: tally.records_of_others,
        named_in_log: tally.tenant_named,
    });
    ev.period = tally
        .first_ts
        .zip(tally.last_ts)
        .map(|(a, b)| (rfc3339(a), rfc3339(b)));
    if period.is_set() {
        ev.audit_period = Some(coverage(args, tally, &ev.integrity, now));
    }
    if !approved.is_empty() {
        ev.policy = Some(check_policies(&ev.processes, approved.to_vec()));
    }
    Ok(ev)
}

/// How many of the tenants a log names the error for a `--tenant` it does not name lists.
const TENANTS_LISTED: usize = 20;

/// The error for `--tenant own` that no verified record names: the tenants the verified
/// records name (the first [`TENANTS_LISTED`] in sorted order), or that they name none;
/// `unread` when records `prune-log` moved were not read. Every id is shown escaped
/// ([`shown_id`]).
fn tenant_not_named(own: &str, tally: &Tally, unread: bool) -> String {
    let mut message = format!(
        "no verified record of the log names tenant {}, in the audit period or out of it \
         (tenant ids are compared exactly)",
        shown_id(own)
    );
    let ids: Vec<String> = tally.log_tenants.iter().map(|t| shown_id(t)).collect();
    message.push_str(&match (ids.len(), tally.log_tenants_more) {
        (0, _) => ": the log names no tenant at all".to_string(),
        (_, true) => format!(
            "; the log names more than {TENANTS_LISTED} tenants, the first {TENANTS_LISTED} \
             in sorted order: {}",
            ids.join(", ")
        ),
        (1, false) => format!("; the log names one tenant: {}", ids[0]),
        (n, false) => format!("; the log names {n} tenants: {}", ids.join(", ")),
    });
    if unread {
        message.push_str(
            "; records kvh prune-log moved to an archive were not read (give --archive-dir \
             to read them)",
        );
    }
    message
}

/// A tenant id from the log (or as given) for a terminal: quoted, with quotes, backslashes
/// and control characters escaped as Rust writes them, and every character that displays as
/// nothing escaped ([`crate::printable`]), so that no id can move the cursor, reorder the
/// text or read as another.
fn shown_id(id: &str) -> String {
    crate::printable(&format!("{id:?}"))
}

/// Notes `id` among the least [`TENANTS_LISTED`] of `kept`; `more` is set once more distinct
/// ids than that were seen. Memory stays bounded whatever the number of tenants.
fn keep_least(kept: &mut BTreeSet<String>, more: &mut bool, id: &str) {
    if kept.contains(id) {
        return;
    }
    if kept.len() >= TENANTS_LISTED {
        *more = true;
        if kept.last().is_some_and(|last| last.as_str() < id) {
            return;
        }
        kept.pop_last();
    }
    kept.insert(id.to_string());
}

/// Reads every chain that verified in `report` from its files in `chains`, up to its verified
/// head, into the report and the tally; an error names the chain whose reading failed.
fn tally_chains(
    report: &Report,
    chains: &[(String, Vec<(u64, std::path::PathBuf)>)],
    ev: &mut Evidence,
    tally: &mut Tally,
    max_exceptions: usize,
) -> Result<(), (String, String)> {
    for chain in report.chains.iter().filter(|c| c.ok()) {
        tally_chain(chain, chains, ev, tally, max_exceptions)
            .map_err(|e| (chain.chain.clone(), e))?;
    }
    Ok(())
}

fn tally_chain(
    chain: &super::verify::ChainReport,
    chains: &[(String, Vec<(u64, std::path::PathBuf)>)],
    ev: &mut Evidence,
    tally: &mut Tally,
    max_exceptions: usize,
) -> Result<(), String> {
    let Some((_, list)) = chains.iter().find(|(id, _)| *id == chain.chain) else {
        return Ok(());
    };
    let Some(last_seq) = chain.last_seq else {
        return Ok(());
    };
    let mut state = ChainState::new(&chain.chain);
    state.moved_from = chain.pruned.as_ref().and_then(|p| p.first_ts);
    let mut held = HeldToHead::of(chain);
    // A `rotate` record is tallied with the record after it: when that is a `recovery` of the
    // same time, the recovering process wrote both (its predecessor died between creating the
    // file and writing its first line; the two records carry the recovery's time), and the
    // `rotate` belongs to the new run. A `rotate` of its own time is the crashed run's.
    let mut rotate: Option<(std::path::PathBuf, u64, Map<String, Value>)> = None;
    for (_, path) in list {
        read_file(path, &mut |line, bytes, record| {
            let seq = record.get("seq").and_then(Value::as_u64);
            if seq.is_some_and(|s| s <= last_seq) {
                held.follow(bytes)
                    .map_err(|e| format!("{}:{line}: {e}", path.display()))?;
                let kind = record.get("kind").and_then(Value::as_str);
                let at = (path.as_path(), line);
                match (kind, rotate.take()) {
                    (Some("rotate"), before) => {
                        if let Some((p, l, r)) = before {
                            tally.add(ev, &mut state, (&p, l), &r, max_exceptions);
                        }
                        rotate = Some((path.clone(), line, record.clone()));
                    }
                    (Some("recovery"), Some((p, l, r))) if r.get("ts") == record.get("ts") => {
                        tally.add(ev, &mut state, at, record, max_exceptions);
                        tally.add(ev, &mut state, (&p, l), &r, max_exceptions);
                    }
                    (_, before) => {
                        if let Some((p, l, r)) = before {
                            tally.add(ev, &mut state, (&p, l), &r, max_exceptions);
                        }
                        tally.add(ev, &mut state, at, record, max_exceptions);
                    }
                }
            }
            Ok(())
        })?;
    }
    if let Some((p, l, r)) = rotate.take() {
        tally.add(ev, &mut state, (&p, l), &r, max_exceptions);
    }
    held.at(chain.last_hash.as_deref(), chain.records)
        .map_err(|e| format!("chain {}: {e}", chain.chain))?;
    state.finish_run(ev, tally);
    Ok(())
}

/// Whether `prune-log` moved files of `chain` between two verifications, `before` and
/// `after`: `after` finds it pruned further (a newer manifest, or the chain now wholly
/// archived). A file gone without a manifest that accounts for it is not a prune.
fn pruned_further(before: &Report, after: &Report, chain: &str) -> bool {
    let moved = |r: &Report| {
        r.chains
            .iter()
            .find(|c| c.chain == chain)
            .and_then(|c| c.pruned.as_ref())
            .map(|p| (p.files, p.last_seq, p.complete))
    };
    let (was, is) = (moved(before), moved(after));
    is.is_some() && is != was
}

fn pruned_message(chain: &str) -> String {
    format!("chain {chain} was pruned while the report was being made (prune-log ran)")
}

/// `--max-gap`'s minutes, or the default.
fn max_gap_minutes(args: &EvidenceArgs) -> u64 {
    args.max_gap.unwrap_or(DEFAULT_MAX_GAP_MINUTES)
}

/// Gaps listed when `--max-gap` is not given: ten summaries missed at the default interval.
const DEFAULT_MAX_GAP_MINUTES: u64 = 10;

/// The period `--since` / `--until` name, refused when it is empty; `--max-gap` without
/// either is refused too (gaps are listed for an audit period only, and an auditor asking
/// for them must not get a report without them).
fn audit_period_of(args: &EvidenceArgs) -> Result<Period, String> {
    if args.max_gap.is_some() && args.since.is_none() && args.until.is_none() {
        return Err(
            "--max-gap needs --since or --until: gaps are listed for an audit period \
                    (--since with the day of the log's first record covers the whole log)"
                .into(),
        );
    }
    if let (Some(since), Some(until)) = (args.since, args.until) {
        if since >= until {
            return Err(format!(
                "--since {} is not before --until {}: the audit period is empty",
                rfc3339(since),
                rfc3339(until)
            ));
        }
    }
    Ok(Period {
        since: args.since,
        until: args.until,
    })
}

/// How the verified chains cover the audit period: the stretches with no record in them,
/// up to `now` (the report's time), and the pruned chains whose moved records reach into it.
fn coverage(args: &EvidenceArgs, tally: Tally, integrity: &Integrity, now: u64) -> AuditPeriod {
    let period = tally.period;
    // The period up to the report's time; without --since from the first record.
    let from = period.since.or(tally.seen.iter().map(|s| s.0).min());
    let to = period.until.map_or(now, |until| until.min(now));
    let searched = from.filter(|&from| from < to).map(|from| (from, to));
    let gaps = match searched {
        Some((from, to)) => period::uncovered(tally.seen, from, to, tally.gap_ns),
        None => Vec::new(),
    };
    AuditPeriod {
        since: period.since.map(rfc3339),
        until: period.until.map(rfc3339),
        still_running: period.until.is_none_or(|u| u > now),
        searched: searched.map(|(a, b)| (rfc3339(a), rfc3339(b))),
        records_outside: tally.records_outside,
        counters_from_summaries: true,
        max_gap_minutes: max_gap_minutes(args),
        counters_unattributed: tally.counters_unattributed,
        gaps: gaps
            .into_iter()
            .map(|(a, b)| Gap {
                from: rfc3339(a),
                to: rfc3339(b),
                minutes: (b - a) / 60_000_000_000,
                moved_records_of: moved_within(integrity, |first, last| first < b && last >= a),
            })
            .collect(),
        pruned_in_period: moved_within(integrity, |a, b| period.overlaps(a, b)),
    }
}

/// The chains whose records `prune-log` moved span times that `reaches` (first, last record
/// time, as their manifests date them). A manifest without times (none is written so) is
/// taken to reach in.
fn moved_within(integrity: &Integrity, reaches: impl Fn(u64, u64) -> bool) -> Vec<String> {
    integrity
        .pruned
        .iter()
        .filter(|c| {
            let p = &c.pruned;
            p.first_ts.zip(p.last_ts).is_none_or(|(a, b)| reaches(a, b))
        })
        .map(|c| c.chain.clone())
        .collect()
}

/// The digests `--approved-config` names: each value a digest, or a policy file's digest.
fn approved_digests(values: &[String]) -> Result<Vec<String>, String> {
    let mut out: Vec<String> = Vec::with_capacity(values.len());
    for v in values {
        if v.trim().is_empty() {
            return Err(
                "--approved-config: an empty value; give a digest (64 hex digits) or a policy \
                 file"
                    .into(),
            );
        }
        let looks_like_digest = v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit());
        if looks_like_digest && Path::new(v).exists() {
            return Err(format!(
                "--approved-config {v}: both a digest and an existing file; name the file as \
                 ./{v}"
            ));
        }
        let digest = if looks_like_digest {
            v.to_ascii_lowercase()
        } else {
            let config = Config::explain_file(Path::new(v))
                .map(|(c, _)| c)
                .map_err(|e| {
                    format!(
                        "--approved-config {v}: neither a digest (64 hex digits) nor a valid \
                     policy file: {e}"
                    )
                })?;
            config_digest(&config.canonical_json())
        };
        if !out.contains(&digest) {
            out.push(digest);
        }
    }
    Ok(out)
}

/// Splits the processes into those that ran an approved policy and the others.
fn check_policies(processes: &[Process], approved: Vec<String>) -> PolicyCheck {
    let is_approved = |p: &Process| {
        p.config_digest
            .as_deref()
            .is_some_and(|d| approved.iter().any(|a| a == d))
    };
    // A run whose start record was moved away has no digest here to judge.
    let judged = processes.iter().filter(|p| !p.start_archived);
    let unapproved: Vec<Process> = judged
        .clone()
        .filter(|p| !is_approved(p))
        .cloned()
        .collect();
    PolicyCheck {
        processes_approved: (judged.count() - unapproved.len()) as u64,
        processes_not_judged: processes.iter().filter(|p| p.start_archived).count() as u64,
        approved,
        unapproved,
    }
}

/// Chains whose verification differs between two runs (records, last seq and hash, files or
/// verdict), but for a chain a running writer only added to: it verified both times, its
/// head moved forward, and `head_still_there` finds the first run's head record, hash and
/// all, in its files. The report counts each chain up to the first run's head, so records
/// after it change nothing it says (the nightly report runs beside a live server). For the
/// same reason a chain that verified without a record is not changed when it got its first
/// records meanwhile (a writer starting) or is gone (a start-up removed a file its crashed
/// writer left before its first record), as a chain that appears meanwhile is not: the
/// report took nothing from it. It is changed when it no longer verifies.
fn changed_chains(
    before: &Report,
    after: &Report,
    head_still_there: impl Fn(&super::verify::ChainReport) -> bool,
) -> Vec<String> {
    let key = |c: &super::verify::ChainReport| {
        (c.records, c.last_seq, c.last_hash.clone(), c.files, c.ok())
    };
    let grew = |b: &super::verify::ChainReport, a: &super::verify::ChainReport| {
        b.ok()
            && a.ok()
            && a.records > b.records
            && a.last_seq > b.last_seq
            && a.files >= b.files
            && head_still_there(b)
    };
    // Nothing in the directory, no manifest, key or checkpoint: nothing the report used.
    let unread = |b: &super::verify::ChainReport| {
        b.ok()
            && b.records == 0
            && b.last_seq.is_none()
            && b.files > 0
            && b.pruned.is_none()
            && b.key_index.is_none()
            && b.checkpoint_seq.is_none()
            && b.checkpoint_recorded.is_none()
    };
    before
        .chains
        .iter()
        .filter(|b| {
            let a = after.chains.iter().find(|a| a.chain == b.chain);
            if unread(b) {
                return a.is_some_and(|a| !a.ok());
            }
            a.is_none_or(|a| key(a) != key(b) && !grew(b, a))
        })
        .map(|b| b.chain.clone())
        .collect()
}

fn integrity(r: &Report) -> Integrity {
    let mut problems: Vec<String> = r
        .chains
        .iter()
        .filter_map(|c| {
            c.problem
                .as_ref()
                .map(|p| format!("chain {}: {p}", c.chain))
        })
        .collect();
    problems.extend(r.errors.iter().cloned());
    // What the verification was given, not what its chains say: a log of no chain (every
    // file deleted, its checkpoint left) had MACs checked only with a key, and checkpoints
    // checked with a public key, which is what found it empty.
    let keyed = !r.hmac_keys.is_empty() && r.chains.iter().all(|c| c.macs_checked);
    let pinned = !r.public_keys.is_empty();
    Integrity {
        verified: r.ok(),
        chains: r.chains.len(),
        files: r.chains.iter().map(|c| c.files).sum(),
        records: r.chains.iter().map(|c| c.records).sum(),
        macs_checked: keyed,
        unchecked_sealed: r
            .chains
            .iter()
            .filter(|c| !c.macs_checked && c.sealed)
            .count(),
        unchecked_signed: match pinned {
            true => 0,
            false => r.chains.iter().filter(|c| c.signer.is_some()).count(),
        },
        keys: key_uses(r),
        late_retired_key: late_retired_key(r),
        unbound: unbound(r),
        checkpoint_behind: r
            .chains
            .iter()
            .filter_map(|c| {
                Some(CheckpointBehind {
                    chain: c.chain.clone(),
                    matched_seq: c.checkpoint_seq?,
                    recorded_seq: c.checkpoint_behind()?,
                })
            })
            .collect(),
        past_checkpoint: r
            .chains
            .iter()
            .filter(|c| c.ok() && c.checkpoint_behind().is_none())
            .filter_map(|c| {
                // A checkpoint signed while the chain was read counts, as for `checkpoint_behind`.
                let checkpoint_seq = c.checkpoint_seq?.max(c.checkpoint_reread.unwrap_or(0));
                let last_seq = c.last_seq?;
                (last_seq > checkpoint_seq).then(|| PastCheckpoint {
                    chain: c.chain.clone(),
                    checkpoint_seq,
                    last_seq,
                    stopped: c.closed,
                })
            })
            .collect(),
        // Not a chain moved whole: its records are in the archive, and its manifest stands in.
        empty_chains: r
            .chains
            .iter()
            .filter(|c| c.ok() && c.records == 0 && c.pruned.is_none())
            .count(),
        checkpoints_matched: pinned.then(|| {
            r.chains
                .iter()
                // A chain that failed later in its walk did not match, whatever its
                // checkpoint's head was found to be.
                .filter(|c| c.ok() && c.checkpoint_seq.is_some())
                .count()
        }),
        // A chain that failed contributes nothing else: not its manifest's account either.
        pruned: r
            .chains
            .iter()
            .filter(|c| c.ok())
            .filter_map(|c| {
                Some(PrunedChain {
                    chain: c.chain.clone(),
                    pruned: c.pruned.clone()?,
                })
            })
            .collect(),
        torn_tails: r
            .chains
            .iter()
            .filter(|c| c.ok() && c.torn_bytes > 0)
            .map(|c| TornTail {
                chain: c.chain.clone(),
                bytes: c.torn_bytes,
            })
            .collect(),
        problems,
    }
}

/// Chains not bound to their keys, when several keys of a kind were given.
fn unbound(r: &Report) -> Vec<String> {
    if r.hmac_keys.len() < 2 && r.public_keys.len() < 2 {
        return Vec::new();
    }
    r.chains
        .iter()
        .filter(|c| c.ok() && c.macs_checked && !c.keys_bound)
        .map(|c| c.chain.clone())
        .collect()
}

/// What each HMAC secret sealed, of the chains that verified.
fn key_uses(r: &Report) -> Vec<KeyUse> {
    r.hmac_keys
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let sealed: Vec<_> = r
                .chains
                .iter()
                .filter(|c| c.ok() && c.key_index == Some(i))
                .collect();
            KeyUse {
                key: name.clone(),
                chains: sealed.len(),
                first_record: sealed.iter().filter_map(|c| started(c)).min().map(rfc3339),
                last_record: sealed.iter().filter_map(|c| ended(c)).max().map(rfc3339),
            }
        })
        .collect()
}

/// When a chain began: its first record, or for a pruned chain the oldest record of the
/// first file moved, as its MAC-verified manifest recorded it.
fn started(c: &verify::ChainReport) -> Option<u64> {
    match &c.pruned {
        Some(p) => p.first_ts,
        None => c.first_ts,
    }
}

/// When a chain's last record was written: the newest of the records read and, for a
/// pruned chain, of those moved, as its MAC-verified manifest recorded them (a chain moved
/// whole has no record read).
fn ended(c: &verify::ChainReport) -> Option<u64> {
    let moved = c.pruned.as_ref().and_then(|p| p.last_ts);
    c.last_ts.max(moved)
}

/// Chains begun with a secret after a newer secret was in use. Which secret is newer comes
/// from the log, not from the order the keys were given in: a secret is newer than another
/// when its first chain began later.
fn late_retired_key(r: &Report) -> Vec<String> {
    let mut first_use: BTreeMap<usize, u64> = BTreeMap::new();
    for c in r.chains.iter().filter(|c| c.ok()) {
        if let (Some(i), Some(t)) = (c.key_index, started(c)) {
            let u = first_use.entry(i).or_insert(t);
            *u = (*u).min(t);
        }
    }
    let name = |i: usize| r.hmac_keys.get(i).map_or("?", String::as_str);
    let mut out = Vec::new();
    for c in r.chains.iter().filter(|c| c.ok()) {
        let (Some(own), Some(t)) = (c.key_index, started(c)) else {
            continue;
        };
        let Some(&own_first) = first_use.get(&own) else {
            continue;
        };
        // The newest secret already in use when this chain began, if newer than its own.
        let newer = first_use
            .iter()
            .filter(|&(_, &u)| u > own_first && u < t)
            .max_by_key(|&(_, &u)| u);
        if let Some((&i, &u)) = newer {
            out.push(format!(
                "chain {} began at {}, sealed with {}, after the newer key {} sealed a chain \
                 (from {})",
                c.chain,
                rfc3339(t),
                name(own),
                name(i),
                rfc3339(u)
            ));
        }
    }
    out
}

/// The records a report counts, held to the chain the verification reached: they must be
/// that chain's records, all of them, in order: the first at the chain's first verified seq
/// (linked to the genesis hash when that is 0), each next one at the next seq, each one's
/// hash computed again from its bytes and the one before, and the last the verified head. A
/// file swapped, emptied or cut between the verification and the reading (and put back
/// before the second verification) therefore cannot feed the figures.
struct HeldToHead {
    /// The hash the next record must link to; `None` before the first record of a chain
    /// whose start is not the genesis (records `prune-log` moved): there its own link is
    /// taken, and held by the next record's.
    prev: Option<[u8; 32]>,
    next_seq: u64,
    read: u64,
}

impl HeldToHead {
    /// Before the first record of a chain whose first verified record is `first_seq`.
    fn from(first_seq: u64) -> Self {
        HeldToHead {
            prev: (first_seq == 0).then_some(GENESIS_PREV),
            next_seq: first_seq,
            read: 0,
        }
    }

    /// Before the first record of `chain` as the verification found it.
    fn of(chain: &super::verify::ChainReport) -> Self {
        Self::from(chain.first_seq.unwrap_or(0))
    }

    /// Takes the next record of the chain (its line without the newline).
    fn follow(&mut self, line: &[u8]) -> Result<(), &'static str> {
        const CHANGED: &str =
            "the record is not the one verified; the file changed after verification";
        let r = scan(line).map_err(|_| CHANGED)?;
        if r.seq != Some(self.next_seq) {
            return Err(CHANGED);
        }
        let linked = r.prev.and_then(parse_hash).ok_or(CHANGED)?;
        let prior = self.prev.unwrap_or(linked);
        if linked != prior {
            return Err(CHANGED);
        }
        let hash = chain_hash_open(&prior, r.body_open);
        if r.hash != hex(&hash) {
            return Err(CHANGED);
        }
        self.prev = Some(hash);
        self.next_seq += 1;
        self.read += 1;
        Ok(())
    }

    /// Whether the records taken are the verified chain: `records` of them, the last the
    /// verified `head` (`None`: the chain had no record).
    fn at(&self, head: Option<&str>, records: u64) -> Result<(), String> {
        let last = if self.read == 0 {
            None
        } else {
            self.prev.map(|h| hex(&h))
        };
        if last.as_deref() == head && self.read == records {
            Ok(())
        } else {
            Err(format!(
                "the records read ({} of {records}) are not the verified chain up to its head; \
                 the files changed after verification",
                self.read
            ))
        }
    }
}

/// Whether the record `chain` ended at when it was verified is still in its file, with the
/// same hash.
fn head_in_files(chain: &super::verify::ChainReport, list: &[(u64, std::path::PathBuf)]) -> bool {
    let (Some(seq), Some(hash), Some(file)) =
        (chain.last_seq, chain.last_hash.as_deref(), chain.last_file)
    else {
        return false;
    };
    list.iter()
        .find(|(i, _)| *i == file)
        .and_then(|(_, path)| super::recovery::hash_at(path, seq))
        .is_some_and(|h| hex(&h) == hash)
}

/// What [`read_file`] calls with each line: its number, its bytes and its record.
type LineVisitor<'a> = dyn FnMut(u64, &[u8], &Map<String, Value>) -> Result<(), String> + 'a;

/// Calls `f(line number, line without its newline, record)` for every complete line of a
/// verified chain file, until `f` fails. A torn last line (no newline: the writer crashed)
/// was reported by the verification and is skipped. Opened as the verifier opens files (no
/// symlink followed, no FIFO waited for, a regular file of bounded size), so a file planted
/// after the verification can neither hold the report up nor be read in place of the chain's.
fn read_file(path: &Path, f: &mut LineVisitor<'_>) -> Result<(), String> {
    let mut lines = Lines::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut line = 0;
    loop {
        let read = lines
            .next_line()
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let bytes = match read {
            None | Some(Line::Torn(_) | Line::Overlong { ended: false, .. }) => return Ok(()),
            Some(Line::Whole(bytes)) => bytes,
            // Longer than any record: not one, as the match below reports.
            Some(Line::Overlong { ended: true, .. }) => &[][..],
        };
        line += 1;
        // The verification parsed every line; one that does not parse now changed since.
        match serde_json::from_slice::<Value>(bytes) {
            Ok(Value::Object(record)) => f(line, bytes, &record)?,
            _ => {
                return Err(format!(
                    "{}:{line}: not a JSON record; the file changed after verification",
                    path.display()
                ))
            }
        }
    }
}

/// Running state of the aggregation over every chain.
#[derive(Default)]
struct Tally {
    /// The audit period: records outside it are verified but not counted.
    period: Period,
    /// The directory read: an exception in a file there is named by the file's name, one in
    /// a file read from an archive (`--archive-dir`) by its path.
    log_dir: std::path::PathBuf,
    tenants: BTreeSet<String>,
    /// First and last record counted.
    first_ts: Option<u64>,
    last_ts: Option<u64>,
    records_outside: u64,
    /// Spans of record times, in or out of the period, each cut where a run wrote nothing for
    /// `gap_ns` or more: when writers were seen writing.
    seen: Vec<(u64, u64)>,
    gap_ns: u64,
    /// See [`AuditPeriod::counters_unattributed`].
    counters_unattributed: Vec<String>,
    /// With `--tenant`: whose records are counted, and how many others were not.
    tenant: Option<String>,
    records_of_others: u64,
    /// With `--tenant`: a verified record names it, in the period or out of it.
    tenant_named: bool,
    /// With `--tenant`: the least [`TENANTS_LISTED`] other tenant ids the verified records
    /// name, in the period or out of it, and whether they name more: what the error for a
    /// tenant no record names lists ([`keep_least`]).
    log_tenants: BTreeSet<String>,
    log_tenants_more: bool,
}

/// Running state of one chain: the run (process) being read.
struct ChainState {
    chain: String,
    process: Option<Process>,
    /// Counters of the run's latest `summary` record (in the audit period, when one is given).
    last_summary: Option<Map<String, Value>>,
    /// Counters of the run's latest `summary` record before the audit period: what it had
    /// done before, taken off `last_summary`.
    baseline: Option<Map<String, Value>>,
    /// The run's `stop` total of lost records (when the stop is in the period), the sum of
    /// its `lost` records in the period, and of those before it.
    stop_lost: Option<u64>,
    lost_sum: u64,
    lost_before: u64,
    /// The run being read began with a `start` or `recovery` record that was read.
    run_started: bool,
    /// A record of the run in the audit period was read: records dated before the period
    /// that come after it were written after a step back of the clock, and are not what
    /// the run had done before the period.
    in_period_seen: bool,
    /// Time of the oldest record `prune-log` moved from this chain (its manifest's word).
    moved_from: Option<u64>,
    /// Times of the run's first and last records, in or out of the period.
    span: Option<(u64, u64)>,
    /// The span of record times being extended (see [`Tally::seen`]).
    piece: Option<(u64, u64)>,
}

impl ChainState {
    fn new(chain: &str) -> Self {
        ChainState {
            chain: chain.to_string(),
            process: None,
            last_summary: None,
            baseline: None,
            stop_lost: None,
            lost_sum: 0,
            lost_before: 0,
            run_started: false,
            in_period_seen: false,
            moved_from: None,
            span: None,
            piece: None,
        }
    }

    /// The run being read (one is opened for records before any `start`, as in a file whose
    /// earlier files were rotated away).
    fn process(&mut self) -> &mut Process {
        let chain = &self.chain;
        self.process.get_or_insert_with(|| Process {
            chain: chain.clone(),
            ..Process::default()
        })
    }

    /// Ends the run being read: its counters, lost records and row go into the report when
    /// it ran during the audit period (always, without one).
    fn finish_run(&mut self, ev: &mut Evidence, tally: &mut Tally) {
        let process = self.process.take();
        let run_started = std::mem::take(&mut self.run_started);
        self.in_period_seen = false;
        let (summary, baseline) = (self.last_summary.take(), self.baseline.take());
        let (stop_lost, lost_sum) = (self.stop_lost.take(), std::mem::take(&mut self.lost_sum));
        let lost_before = std::mem::take(&mut self.lost_before);
        let span = self.span.take();
        tally.seen.extend(self.piece.take());
        let Some(mut process) = process else {
            return;
        };
        let in_period = !tally.period.is_set()
            || span.is_some_and(|(first, last)| tally.period.overlaps(first, last));
        if !in_period {
            return;
        }
        process.start_archived = !run_started;
        // Records of this run were moved away (its start was not read), some from before the
        // period: what they told (a summary, a `lost` record) is not here to be taken off.
        let moved_before = !run_started
            && tally
                .period
                .since
                .is_some_and(|since| self.moved_from.is_none_or(|f| f < since));
        // A run that began before the period, whose records before it were all moved away:
        // its counters and its stop total include what it did before, which nothing read says.
        let unattributed = moved_before && baseline.is_none();
        if unattributed {
            if !tally.counters_unattributed.contains(&self.chain) {
                tally.counters_unattributed.push(self.chain.clone());
            }
            ev.records_lost = ev.records_lost.saturating_add(lost_sum);
            ev.processes.push(process);
            return;
        }
        match summary {
            Some(counters) => add_counters(ev, counters, baseline.as_ref()),
            None => ev.processes_without_summary += 1,
        }
        // A `stop` record's total already counts every loss its `lost` records describe,
        // those before the period too. When some of those were moved away, the total cannot
        // be split: the period's own `lost` records are what it lost.
        let lost = match stop_lost {
            Some(total) if !moved_before => total.saturating_sub(lost_before),
            _ => lost_sum,
        };
        ev.records_lost = ev.records_lost.saturating_add(lost);
        ev.processes.push(process);
    }

    /// Notes a record at `ts` in the run's spans of record times: a record `gap` or more after
    /// the span being extended (or before it) starts another, so a stretch in which the run
    /// wrote nothing stays uncovered.
    fn see(&mut self, ts: u64, gap: u64, seen: &mut Vec<(u64, u64)>) {
        let (first, last) = self.span.unwrap_or((ts, ts));
        self.span = Some((first.min(ts), last.max(ts)));
        self.piece = match self.piece {
            None => Some((ts, ts)),
            Some((a, b)) if ts >= b && ts - b < gap => Some((a, ts)),
            Some((a, b)) if ts >= b => {
                seen.push((a, b));
                Some((ts, ts))
            }
            Some((a, b)) if ts >= a => Some((a, b)),
            // Earlier than the span (records carry their event's time, not always in order).
            Some((a, b)) if a - ts < gap => Some((ts, b)),
            Some(piece) => {
                seen.push((ts, ts));
                Some(piece)
            }
        };
    }
}

/// Adds a run's counters to the report: those of its last summary, less those of its last
/// summary before the audit period (counters only grow within a run).
fn add_counters(
    ev: &mut Evidence,
    counters: Map<String, Value>,
    baseline: Option<&Map<String, Value>>,
) {
    for (k, v) in counters {
        let Some(n) = v.as_u64() else {
            continue;
        };
        let before = baseline
            .and_then(|b| b.get(&k))
            .and_then(Value::as_u64)
            .unwrap_or(0);
        let total = ev.counters.entry(k).or_default();
        *total = total.saturating_add(n.saturating_sub(before));
    }
}

impl Tally {
    /// Adds one record, found at `(file, line)`, to the report.
    fn add(
        &mut self,
        ev: &mut Evidence,
        chain: &mut ChainState,
        (path, line): (&Path, u64),
        record: &Map<String, Value>,
        max_exceptions: usize,
    ) {
        let kind = record.get("kind").and_then(Value::as_str).unwrap_or("?");
        if kind == "start" || kind == "recovery" {
            chain.finish_run(ev, self);
            chain.run_started = true;
        }
        let num = |k: &str| record.get(k).and_then(Value::as_u64).unwrap_or(0);
        let text = |k: &str| record.get(k).and_then(Value::as_str).map(str::to_string);
        let ts = record.get("ts").and_then(Value::as_u64);
        if let Some(ts) = ts {
            chain.see(ts, self.gap_ns, &mut self.seen);
        }
        // What the run is and how it ended describe its row, from records in or out of the
        // period.
        let process = chain.process();
        if let Some(ts) = ts {
            process.started.get_or_insert_with(|| rfc3339(ts));
            process.last_record = Some(rfc3339(ts));
        }
        match kind {
            "start" | "recovery" => {
                process.host = text("host");
                process.pid = record.get("pid").and_then(Value::as_u64);
                process.version = text("version");
                process.config_digest = text("config_digest");
                process.sample_rule = record.get("sample_rule").and_then(Value::as_u64);
                process.recovered = kind == "recovery";
            }
            "stop" => {
                process.clean_stop = true;
                process.start_failed = text("start_failed");
            }
            _ => {}
        }
        if let Some(own) = self.tenant.as_deref() {
            for field in ["tenant_id", "caller_tenant_id"] {
                match record.get(field).and_then(Value::as_str) {
                    Some(t) if t == own => self.tenant_named = true,
                    Some(t) => keep_least(&mut self.log_tenants, &mut self.log_tenants_more, t),
                    None => {}
                }
            }
        }
        // A record without a time cannot be placed in a period; every writer gives one.
        let in_period = ts.map_or(!self.period.is_set(), |t| self.period.contains(t));
        if !in_period {
            self.records_outside = self.records_outside.saturating_add(1);
            if ts.is_some_and(|t| self.period.is_before(t)) {
                match kind {
                    // Only before the run's first record in the period: one dated before it
                    // but written after (the clock stepped back) would cancel counts the run
                    // made in the period.
                    "summary" if !chain.in_period_seen => {
                        chain.baseline = record.get("counters").and_then(Value::as_object).cloned();
                    }
                    "lost" if !chain.in_period_seen => {
                        chain.lost_before = chain.lost_before.saturating_add(num("records_lost"))
                    }
                    _ => {}
                }
            }
            return;
        }
        chain.in_period_seen = true;
        if let Some(ts) = ts {
            self.first_ts = Some(self.first_ts.map_or(ts, |f| f.min(ts)));
            self.last_ts = Some(self.last_ts.map_or(ts, |l| l.max(ts)));
        }
        if !self.concerns_tenant(kind, record) {
            self.records_of_others = self.records_of_others.saturating_add(1);
            return;
        }
        // The caller of a refused or mismatched free is a tenant of the period too; a
        // `--tenant` report counts its own tenant only.
        for field in ["tenant_id", "caller_tenant_id"] {
            if let Some(t) = record.get(field).and_then(Value::as_str) {
                if self.tenant.as_deref().is_none_or(|own| own == t) {
                    self.tenants.insert(t.to_string());
                }
            }
        }
        let count = ev.records_by_kind.entry(kind.to_string()).or_default();
        *count = count.saturating_add(1);
        match kind {
            "summary" => {
                chain.last_summary = record.get("counters").and_then(Value::as_object).cloned();
            }
            "kv_scrub" => {
                let kv = &mut ev.kv_scrubs;
                kv.calls = kv.calls.saturating_add(1);
                kv.unfinished_calls = kv
                    .unfinished_calls
                    .saturating_add(u64::from(text("error").is_some()));
                kv.blocks = kv.blocks.saturating_add(num("blocks"));
                kv.verified_blocks = kv.verified_blocks.saturating_add(num("verified_blocks"));
                kv.failed_blocks = kv.failed_blocks.saturating_add(num("failed_blocks"));
                kv.bytes = kv.bytes.saturating_add(num("bytes"));
                if text("trigger").as_deref() == Some("claim_gate") {
                    kv.gate_calls = kv.gate_calls.saturating_add(1);
                    kv.gate_blocks = kv.gate_blocks.saturating_add(num("blocks"));
                    // Never more than the blocks the record names, whatever it says.
                    let unknown = num("unknown_owner_blocks").min(num("blocks"));
                    kv.gate_unknown_owner_blocks =
                        kv.gate_unknown_owner_blocks.saturating_add(unknown);
                    let changed = match record.get("owner_changed_blocks") {
                        Some(_) => num("owner_changed_blocks").min(num("blocks") - unknown),
                        None => num("blocks") - unknown,
                    };
                    kv.gate_owner_changed_blocks =
                        kv.gate_owner_changed_blocks.saturating_add(changed);
                }
            }
            "stop" => chain.stop_lost = Some(num("records_lost")),
            "lost" => chain.lost_sum = chain.lost_sum.saturating_add(num("records_lost")),
            "anomaly" => {
                let signal = text("signal").unwrap_or_else(|| ENGINE_SIGNAL.into());
                let count = ev.anomalies_by_signal.entry(signal).or_default();
                *count = count.saturating_add(1);
            }
            _ => {}
        }
        if is_exception(record) {
            let (tenant_id, request_id) = self.shown_ids(record);
            let count = ev.exceptions_by_kind.entry(kind.to_string()).or_default();
            *count = count.saturating_add(1);
            if ev.exceptions.len() < max_exceptions {
                let in_log_dir = path.parent() == Some(self.log_dir.as_path());
                ev.exceptions.push(Exception {
                    file: if in_log_dir {
                        path.file_name()
                            .map(|n| n.to_string_lossy().into_owned())
                            .unwrap_or_default()
                    } else {
                        path.display().to_string()
                    },
                    line,
                    time: ts.map(rfc3339).unwrap_or_default(),
                    kind: kind.to_string(),
                    tenant_id,
                    request_id,
                    detail: detail(record, self.tenant.as_deref()),
                });
            }
        }
    }
}

impl Tally {
    /// Whether the report counts `record`: always, but in a `--tenant` report, where only
    /// records naming the tenant (as the request's, or as the caller's) and those that
    /// concern every tenant count.
    fn concerns_tenant(&self, kind: &str, record: &Map<String, Value>) -> bool {
        let Some(tenant) = &self.tenant else {
            return true;
        };
        let names = |field: &str| record.get(field).and_then(Value::as_str) == Some(tenant);
        SHARED_KINDS.contains(&kind) || names("tenant_id") || names("caller_tenant_id")
    }

    /// The tenant and request an exception is listed under. A `--tenant` report goes to that
    /// tenant, so it never shows another tenant's ids: a refused free it made of another
    /// tenant's block is listed under its own request (the caller's), and the ids of any other
    /// tenant become [`ANOTHER_TENANT`].
    fn shown_ids(&self, record: &Map<String, Value>) -> (Option<String>, Option<String>) {
        let text = |k: &str| record.get(k).and_then(Value::as_str).map(str::to_string);
        let Some(own) = self.tenant.as_deref() else {
            return (text("tenant_id"), text("request_id"));
        };
        if text("tenant_id").as_deref() == Some(own) {
            (text("tenant_id"), text("request_id"))
        } else if text("caller_tenant_id").as_deref() == Some(own) {
            (text("caller_tenant_id"), text("caller_request_id"))
        } else {
            // A record every tenant shares (a lost or recovery record) names none, as a rule.
            (text("tenant_id").map(|_| ANOTHER_TENANT.to_string()), None)
        }
    }
}

/// What a `--tenant` report shows in place of another tenant's ids.
const ANOTHER_TENANT: &str = "(another tenant)";

/// The ids of the thread that made a refused or mismatched free, which a record carries
/// besides its own.
const CALLER_IDS: &[&str] = &["caller_tenant_id", "caller_request_id", "caller_model_id"];

/// Whether a record is an exception an auditor must see (a security record). Blocks retired
/// by the never-reuse policy are the control working, not an exception; a KV scrub that
/// stopped before verifying everything is one.
pub(crate) fn is_exception(record: &Map<String, Value>) -> bool {
    let text = |k: &str| record.get(k).and_then(Value::as_str);
    let kind = text("kind").unwrap_or("?");
    let policy_retirement = kind == "quarantine" && text("reason") == Some("never_reuse_policy");
    let incomplete_kv_scrub =
        kind == "kv_scrub" && record.get("error").is_some_and(|e| !e.is_null());
    (EXCEPTION_KINDS.contains(&kind) && !policy_retirement) || incomplete_kv_scrub
}

/// The signal under which `anomaly` records without one count: those the engine wrote
/// itself (`ForensicLog::record_anomaly`), its own findings, not the detector's summaries.
const ENGINE_SIGNAL: &str = "unspecified";

/// What a `--tenant` report shows in place of an engine's free-form anomaly detail.
const FREE_FORM_HIDDEN: &str = "(the engine's free-form detail: not shown in a tenant report)";

/// The kind's own fields as `key=value`, in the record's (sorted) order. In a report for
/// tenant `own`, the caller's ids are shown only when they are that tenant's (not when the
/// caller set none), and an engine's anomaly `detail` (free-form JSON, which may name any
/// tenant) is not shown.
fn detail(record: &Map<String, Value>, own: Option<&str>) -> String {
    let caller = record.get("caller_tenant_id").and_then(Value::as_str);
    let hide_caller = own.is_some_and(|own| caller != Some(own));
    let hide_free_form =
        own.is_some() && record.get("kind").and_then(Value::as_str) == Some("anomaly");
    record
        .iter()
        .filter(|(k, _)| !ENVELOPE.contains(&k.as_str()))
        .map(|(k, v)| match v {
            _ if hide_caller && CALLER_IDS.contains(&k.as_str()) && !v.is_null() => {
                format!("{k}={ANOTHER_TENANT}")
            }
            _ if hide_free_form && k == "detail" => format!("{k}={FREE_FORM_HIDDEN}"),
            Value::String(s) => format!("{k}={s}"),
            other => format!("{k}={other}"),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Whether the character at `i` of `chars` is where GitHub's extended autolinks would start
/// a link (`https://...`, any `scheme://`, `www.`): escaped there, the text shows as itself
/// and links nowhere (a client-chosen id spelled as a phishing address, say). An address
/// with `@` still renders as a `mailto:` link: that autolink is found after escapes are
/// resolved, where no escape can reach it.
fn opens_autolink(chars: &[char], i: usize) -> bool {
    match chars.get(i) {
        Some(':') => chars.get(i + 1) == Some(&'/') && chars.get(i + 2) == Some(&'/'),
        Some('.') => i >= 3 && chars[i - 3..i].iter().all(|c| c.eq_ignore_ascii_case(&'w')),
        _ => false,
    }
}

/// Text from the log made safe for one Markdown table cell or list line: control characters
/// (a newline would end the row and could forge lines after it) become spaces, and `\`, `|`,
/// `` ` ``, `<`, `[`, `*`, `~`, `&` and `_` at a word's edge are escaped, as are the `:` of
/// `://` and the `.` of `www.` ([`opens_autolink`]), so a tenant id or a detail can neither
/// shift the columns nor format anything, nor become a web link.
fn cell(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    for (i, &c) in chars.iter().enumerate() {
        // An underscore inside a word makes no emphasis (ids and kinds are snake_case, left
        // as they are); one at a word's edge can.
        // ASCII letters and digits only: a character Rust calls alphabetic can be punctuation
        // to CommonMark (a symbol such as U+24B6) or be written as an escape (below).
        let inside_word = |j: Option<usize>| {
            j.and_then(|j| chars.get(j))
                .is_some_and(|c| c.is_ascii_alphanumeric())
        };
        match c {
            c if c.is_control() => out.push(' '),
            // Shown, as `printable` shows it: a character that displays as nothing could make
            // an id or a path read as another (a backslash before `u` is no Markdown escape).
            c if unprintable(c) => out.push_str(&format!("\\u{{{:04x}}}", u32::from(c))),
            '_' if inside_word(i.checked_sub(1)) && inside_word(Some(i + 1)) => out.push('_'),
            '\\' | '|' | '`' | '<' | '[' | '*' | '~' | '&' | '_' => {
                out.push('\\');
                out.push(c);
            }
            c if opens_autolink(&chars, i) => {
                out.push('\\');
                out.push(c);
            }
            c => out.push(c),
        }
    }
    out
}

/// Text from the log as Markdown inline text that shows as itself after the start of a line
/// (a heading's text included): every character that can open emphasis, a link, a code span,
/// an entity or HTML, or close a heading is escaped, wherever it stands, as is where a web
/// autolink would start ([`opens_autolink`]), and control characters become spaces.
fn literal(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    for (i, &c) in chars.iter().enumerate() {
        match c {
            c if c.is_control() => out.push(' '),
            '\\' | '`' | '*' | '_' | '[' | ']' | '<' | '&' | '#' | '~' | '|' | '!' => {
                out.push('\\');
                out.push(c);
            }
            c if opens_autolink(&chars, i) => {
                out.push('\\');
                out.push(c);
            }
            c => out.push(c),
        }
    }
    out
}

/// `text` as a JSON string in a code span, so that its every character shows, spaces at its
/// ends included: the fence is one backtick longer than the longest run of them in it.
fn json_code(text: &str) -> String {
    // JSON escapes C0 controls only: DEL, C1 controls and invisible format characters are
    // written as escapes too, so that they show.
    let quoted: String = serde_json::Value::from(text)
        .to_string()
        .chars()
        .map(|c| match c {
            // Beyond the BMP, as JSON writes it: a surrogate pair.
            c if unprintable(c) => c
                .encode_utf16(&mut [0; 2])
                .iter()
                .map(|u| format!("\\u{u:04x}"))
                .collect(),
            c => c.to_string(),
        })
        .collect();
    let longest = quoted.split(|c| c != '`').map(str::len).max().unwrap_or(0);
    let fence = "`".repeat(longest + 1);
    format!("{fence} {quoted} {fence}")
}

/// [`cell`] of an optional value, `-` when absent.
fn cell_or_dash(v: Option<&str>) -> String {
    v.map_or_else(|| "-".into(), cell)
}

/// A tenant or request id in a table cell, `-` when absent; one that
/// [`would_read_as_another`] is shown as [`json_code`], whose quotes and escapes keep every
/// character in sight (its pipes escaped, which tables need even inside a code span).
fn id_cell(v: Option<&str>) -> String {
    match v {
        None => "-".into(),
        Some(id) if would_read_as_another(id) => json_code(id).replace('|', "\\|"),
        Some(id) => cell(id),
    }
}

/// An id in running text or a heading ([`literal`]), quoted as [`id_cell`] quotes it.
fn id_text(id: &str) -> String {
    if would_read_as_another(id) {
        json_code(id)
    } else {
        literal(id)
    }
}

/// Whether an id, shown as plain text, could read as another id or as none: renderers trim
/// a cell's or a heading's ends and show a run of spaces as one, a control character shows
/// as a space (or nothing), and `-` is the table's "no id".
fn would_read_as_another(id: &str) -> bool {
    let spaces_together = id
        .chars()
        .zip(id.chars().skip(1))
        .any(|(a, b)| a.is_whitespace() && b.is_whitespace());
    id.trim() != id || id.is_empty() || id == "-" || spaces_together || id.chars().any(unprintable)
}

/// The anomaly detector's findings, by signal (each record is also an exception below).
fn render_anomalies(ev: &Evidence, push: &mut impl FnMut(String)) {
    if ev.anomalies_by_signal.is_empty() {
        push("Anomalies (`anomaly` records): none.".into());
    } else {
        let by_signal: Vec<String> = ev
            .anomalies_by_signal
            .iter()
            .map(|(s, n)| format!("{} {n}", cell(s)))
            .collect();
        let total: u64 = ev.anomalies_by_signal.values().sum();
        let listed = ev.exceptions.iter().filter(|e| e.kind == "anomaly").count() as u64;
        let where_listed = if listed >= total {
            "each is listed under Exceptions".to_string()
        } else {
            format!("{listed} of them are listed under Exceptions, which stops at --max-exceptions")
        };
        let engines = if ev.anomalies_by_signal.contains_key(ENGINE_SIGNAL) {
            ", or, as `unspecified`, the engine's own findings"
        } else {
            ""
        };
        push(format!(
            "Anomalies (`anomaly` records: a tenant's burst or surge of security events{engines}; \
             {where_listed}): {}.",
            by_signal.join(", ")
        ));
    }
    push(String::new());
}

/// A digest from the log as a table cell: in a code span when it is one (64 lower-case hex
/// digits; backslash escapes do not work inside code spans), escaped text otherwise.
fn digest_cell(d: &str) -> String {
    let is_digest = d.len() == 64 && d.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    if is_digest {
        format!("`{d}`")
    } else {
        cell(d)
    }
}

/// The `--approved-config` part of the Coverage section.
fn render_policy(policy: &PolicyCheck, push: &mut impl FnMut(String)) {
    push(String::new());
    let total = policy.processes_approved as usize + policy.unapproved.len();
    if policy.processes_not_judged > 0 {
        push(format!(
            "{} processes are not judged: their start record was moved by `kvh prune-log`.",
            policy.processes_not_judged
        ));
    }
    push(format!(
        "Policy: {} of {total} processes ran an approved policy (config digest {}).",
        policy.processes_approved,
        policy
            .approved
            .iter()
            .map(|d| format!("`{d}`"))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    if policy.unapproved.is_empty() {
        return;
    }
    push(String::new());
    push("| chain | host | pid | started | config digest (not approved) |".into());
    push("| --- | --- | --- | --- | --- |".into());
    for p in &policy.unapproved {
        push(format!(
            "| {} | {} | {} | {} | {} |",
            cell(&p.chain),
            cell_or_dash(p.host.as_deref()),
            p.pid.map_or_else(|| "-".into(), |n| n.to_string()),
            cell_or_dash(p.started.as_deref()),
            p.config_digest
                .as_deref()
                .map_or_else(|| "none recorded".into(), digest_cell)
        ));
    }
}

/// Where an audit period's counters come from.
const PERIOD_COUNTERS: &str = "Over the audit period, from each process's periodic counters \
     (its last summary in the period less its last one before; summaries come every \
     summary_interval_ms, so activity within one interval of either end may be counted on the \
     other side)";

fn render_tenant(t: &TenantScope, named: bool, i: &Integrity, push: &mut impl FnMut(String)) {
    push(String::new());
    push(format!("## Tenant {}", id_text(&t.tenant_id)));
    push(String::new());
    push(format!(
        "A report on one tenant, {} (`--tenant`). The KV scrubs, exceptions, anomalies and record \
         counts below are those of the records naming it, as the tenant of the request or as \
         the caller of a refused free, and of the records that concern every tenant (starts, \
         recoveries, rotations, summaries, checkpoints, lost records, stops). The other {} \
         records were verified and not counted. The periodic counters (Activity) and the \
         records lost are each process's own, for all its tenants: they are not kept per \
         tenant. Where a record also names another tenant (a refused free of another \
         tenant's block), that tenant's ids are shown as \"{ANOTHER_TENANT}\", as are those \
         of a caller that set no tenant id; the engine's free-form detail of an anomaly it \
         recorded is not shown.",
        id_text(&t.tenant_id),
        t.records_left_out
    ));
    if !named && t.named_in_log {
        push(String::new());
        push(format!(
            "Tenant {} has records outside the audit period, but none in it.",
            id_text(&t.tenant_id)
        ));
    } else if !named {
        push(String::new());
        push(
            "No verified record names this tenant. Tenant ids are compared exactly, as the \
             engine passed them to `kvh_set_context`."
                .into(),
        );
        if !i.verified || !i.pruned.is_empty() {
            push(String::new());
            push(
                "Records this report did not read may name it: those of the chains that \
                 failed verification, and those `kvh prune-log` moved to the archive (give \
                 `--archive-dir` to read them)."
                    .into(),
            );
        }
    }
}

fn render_audit_period(p: &AuditPeriod, push: &mut impl FnMut(String)) {
    push(String::new());
    push("## Audit period".into());
    push(String::new());
    let since = p
        .since
        .as_ref()
        .map_or_else(|| "the first record".into(), |t| format!("{t} (included)"));
    let until = p
        .until
        .as_ref()
        .map_or_else(|| "no end".into(), |t| format!("{t} (not included)"));
    push(format!(
        "From {since} to {until}. The whole log was verified; the figures below count the \
         records of the period only ({} records outside it are not counted), and list the \
         processes that ran during it.",
        p.records_outside
    ));
    push(String::new());
    if p.still_running {
        push("- The period has not ended: the report covers it up to its own time.".into());
    }
    match &p.searched {
        None => push(
            "- None of the period lies between the log's first record and the report's time \
             (it has not begun, or it ends before the log begins): no record covers it."
                .into(),
        ),
        Some((a, b)) if p.gaps.is_empty() => push(format!(
            "- From {a} to {b}, no stretch of {} minutes or more without a record.",
            p.max_gap_minutes
        )),
        Some(_) => {}
    }
    for g in &p.gaps {
        if g.moved_records_of.is_empty() {
            push(format!(
                "- Attention: no record from {} to {} ({} minutes): no process ran with \
                 kvhygiene then, its writer stalled, or its log is not in this directory.",
                g.from, g.to, g.minutes
            ));
        } else {
            let chains: Vec<String> = g.moved_records_of.iter().map(|c| cell(c)).collect();
            push(format!(
                "- Attention: no record read from {} to {} ({} minutes); records `kvh \
                 prune-log` moved to the archive (chain {}) span part of it: give \
                 `--archive-dir` to read them.",
                g.from,
                g.to,
                g.minutes,
                chains.join(", ")
            ));
        }
    }
    for chain in &p.counters_unattributed {
        push(format!(
            "- Attention: chain {}: a process ran into the period, but `kvh prune-log` moved its \
             records from before it; its counters cannot be split at the period's start and \
             are left out of the figures below (give `--archive-dir` to count them).",
            cell(chain)
        ));
    }
    for chain in &p.pruned_in_period {
        push(format!(
            "- Attention: chain {}: records `kvh prune-log` moved to the archive fall in the \
             period and are not in this report; give `--archive-dir` to include them.",
            cell(chain)
        ));
    }
}

/// The report as Markdown. Everything taken from the log goes through `cell`.
pub fn render(ev: &Evidence) -> String {
    let mut s = String::new();
    let mut push = |line: String| {
        s.push_str(&line);
        s.push('\n');
    };
    push("# kvhygiene evidence report".into());
    push(String::new());
    push(format!(
        "Forensic log {}, report generated {} by {}.",
        cell(&ev.log_dir.to_string_lossy()),
        ev.generated_at,
        ev.generator
    ));
    push(String::new());
    push("## Integrity of the log".into());
    push(String::new());
    let i = &ev.integrity;
    push(format!(
        "- {}: {} chains, {} files, {} records; hash chain, sequence and rotation links checked.{}",
        if i.verified { "VERIFIED" } else { "FAILED" },
        i.chains,
        i.files,
        i.records,
        // Said up front: without the signed checkpoints, records cut off a chain's end leave
        // a chain that verifies.
        if i.checkpoints_matched.is_none() && i.unchecked_signed > 0 {
            " Not checked: the signed checkpoints (no --public-key), so records cut off a \
             chain's end would not be seen."
        } else {
            ""
        }
    ));
    push(format!(
        "- MACs: {}.",
        match (i.macs_checked, i.unchecked_sealed) {
            (true, _) => "checked with the key ratchet".to_string(),
            (false, 0) => "not checked (no --key-file given)".to_string(),
            (false, n) => format!(
                "not checked (no --key-file given), though the records of {n} of {} chains \
                 carry them",
                i.chains
            ),
        }
    ));
    for k in &i.keys {
        let period = match (&k.first_record, &k.last_record) {
            (Some(a), Some(b)) => format!(", records from {a} to {b}"),
            _ => String::new(),
        };
        push(format!(
            "- Sealed with {}: {} chain{}{period}.",
            cell(&k.key),
            k.chains,
            if k.chains == 1 { "" } else { "s" }
        ));
    }
    for chain in &i.unbound {
        push(format!(
            "- Attention: chain {} is not bound to its keys (no signed checkpoint names its \
             HMAC key and signer): whoever holds another of the keys given could have \
             rewritten it.",
            cell(chain)
        ));
    }
    for b in &i.checkpoint_behind {
        push(format!(
            "- Attention: chain {}: its records say a checkpoint at seq {} was signed, but the \
             checkpoint read is at seq {}: an earlier checkpoint was put back, or the \
             checkpoints were copied before then; records after seq {} are protected by \
             their MACs only, and the chain may have been cut.",
            cell(&b.chain),
            b.recorded_seq,
            b.matched_seq,
            b.matched_seq
        ));
    }
    for p in &i.past_checkpoint {
        let after = p.last_seq - p.checkpoint_seq;
        if p.stopped {
            push(format!(
                "- Attention: chain {}: it stopped at seq {}, but its signed checkpoint read is \
                 at seq {}: the {after} records after it are protected by their MACs only, and \
                 the chain may have been cut (its final checkpoint not kept, or an earlier one \
                 put back).",
                cell(&p.chain),
                p.last_seq,
                p.checkpoint_seq
            ));
        } else {
            push(format!(
                "- Chain {}: {after} records after its signed checkpoint (seq {}, the chain at \
                 seq {}) are protected by their MACs only until the next one: its process is \
                 still running, or ended without a `stop` record (crashed), and a cut there \
                 would not be seen.",
                cell(&p.chain),
                p.checkpoint_seq,
                p.last_seq
            ));
        }
    }
    for late in &i.late_retired_key {
        push(format!(
            "- Attention: {}: a process started with the old key after the rotation, or a \
             chain forged with a retired key.",
            cell(late)
        ));
    }
    push(format!(
        "- Signed checkpoints: {}.",
        match i.checkpoints_matched {
            Some(n) if i.empty_chains > 0 => format!(
                "matched for {n} of {} chains ({} without a record, which no checkpoint covers)",
                i.chains, i.empty_chains
            ),
            Some(n) => format!("matched for {n} of {} chains", i.chains),
            None if i.unchecked_signed > 0 => format!(
                "not checked (no --public-key given), though the writers of {} of {} chains \
                 signed them",
                i.unchecked_signed, i.chains
            ),
            None => "not checked (no --public-key given)".into(),
        }
    ));
    for PrunedChain { chain, pruned: p } in &i.pruned {
        push(format!(
            "- Retention: chain {}: {} by `kvh prune-log` to {} (records up to seq {}), \
             accounted for by its MAC-verified manifest; those records are not in this \
             report (verify them with `--archive-dir`).",
            cell(chain),
            if p.complete {
                "every file moved".to_string()
            } else {
                format!("the oldest {} files moved", p.files)
            },
            cell(&p.archive),
            p.last_seq
        ));
    }
    for t in &i.torn_tails {
        push(format!(
            "- Attention: chain {}: its newest file ends in {} bytes of an incomplete record \
             (torn tail: a record being written as the log was read, or one its writer never \
             finished, having died, or whose file was cut short); that record is not in this \
             report.",
            cell(&t.chain),
            t.bytes
        ));
    }
    for p in &i.problems {
        push(format!("- Problem: {}", cell(p)));
    }
    if !i.verified {
        push(
            "- The figures below cover only the chains that verified; the log cannot be relied \
             on as a whole."
                .into(),
        );
    }
    if let Some(period) = &ev.audit_period {
        render_audit_period(period, &mut push);
    }
    if let Some(tenant) = &ev.tenant {
        render_tenant(tenant, ev.tenants > 0, i, &mut push);
    }
    push(String::new());
    push("## Coverage".into());
    push(String::new());
    match &ev.period {
        Some((a, b)) => push(format!("Records from {a} to {b}; {} tenants.", ev.tenants)),
        None if ev.audit_period.is_some() => {
            push("No record of the verified chains falls in the audit period.".into())
        }
        None => {}
    }
    push(String::new());
    push(
        "| chain | host | pid | version | sampling rule | config digest | started | last record \
         | end |"
            .into(),
    );
    push("| --- | --- | --- | --- | --- | --- | --- | --- | --- |".into());
    for p in &ev.processes {
        let digest = p
            .config_digest
            .as_deref()
            .map(|d| d.chars().take(16).collect::<String>());
        let end = match (&p.start_failed, p.clean_stop) {
            (Some(e), _) => format!("start-up failed, served no memory: {}", cell(e)),
            (None, true) => "clean stop".into(),
            (None, false) => "no stop record (running or crashed)".into(),
        };
        // A run whose start is known but names no rule was written by an earlier version.
        let rule = match (p.sample_rule, p.start_archived) {
            (Some(n), _) => n.to_string(),
            (None, false) => "not recorded".into(),
            (None, true) => "-".into(),
        };
        push(format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {}{} |",
            cell(&p.chain),
            cell_or_dash(p.host.as_deref()),
            p.pid.map_or_else(|| "-".into(), |n| n.to_string()),
            cell_or_dash(p.version.as_deref()),
            rule,
            cell_or_dash(digest.as_deref()),
            cell_or_dash(p.started.as_deref()),
            cell_or_dash(p.last_record.as_deref()),
            end,
            if p.recovered {
                "; continued the chain after its writer crashed"
            } else if p.start_archived {
                "; start record moved by prune-log (started: first record left)"
            } else {
                ""
            }
        ));
    }
    // The table shows 16 hex digits; `--approved-config` takes all 64.
    let mut digests: Vec<&str> = ev
        .processes
        .iter()
        .filter_map(|p| p.config_digest.as_deref())
        .collect();
    digests.sort_unstable();
    digests.dedup();
    if !digests.is_empty() {
        push(String::new());
        push("Configuration digests in full (what `--approved-config` takes):".into());
        push(String::new());
        for d in digests {
            let n = ev
                .processes
                .iter()
                .filter(|p| p.config_digest.as_deref() == Some(d))
                .count();
            let what = if n == 1 { "process" } else { "processes" };
            push(format!("- {}: {n} {what}", digest_cell(d)));
        }
    }
    if let Some(policy) = &ev.policy {
        render_policy(policy, &mut push);
    }
    push(String::new());
    push("## Activity".into());
    push(String::new());
    let c = |k: &str| ev.counters.get(k).copied().unwrap_or(0);
    push(format!(
        "{}: {} frees; {} scrubs ({} bytes), \
         verifications passed {}, failed {}; residue detected {}; quarantined {}; invalid frees {}.",
        match (ev.audit_period.is_some(), ev.tenant.is_some()) {
            (true, false) => PERIOD_COUNTERS.to_string(),
            (true, true) => format!("{PERIOD_COUNTERS}, for all its tenants"),
            (false, false) => "From each process's last periodic counters".to_string(),
            (false, true) => {
                "From each process's last periodic counters, for all its tenants".to_string()
            }
        },
        c("frees"),
        c("scrubs"),
        c("bytes_scrubbed"),
        c("verifications_passed"),
        c("verifications_failed"),
        c("residue_detected"),
        c("quarantined"),
        c("invalid_frees")
    ));
    if ev.processes_without_summary > 0 {
        let when = match ev.audit_period {
            Some(_) => " in the audit period",
            None => "",
        };
        let (n, what) = match ev.processes_without_summary {
            1 => (1, "process"),
            n => (n, "processes"),
        };
        push(format!(
            "{n} {what} wrote no periodic counters{when}; theirs are not in these figures."
        ));
    }
    let kv = &ev.kv_scrubs;
    push(format!(
        "Paged KV cache scrubs (`kv_scrub` records): {} calls ({} did not finish); {} blocks \
         named ({} bytes), {} read back: {} verified clean, {} failed. Of them, the eviction \
         gate made {} calls for {} blocks: {} changed owner without the engine's scrub, {} had \
         an owner the gate did not know (a new cache's first claims, or a forgotten ledger's).",
        kv.calls,
        kv.unfinished_calls,
        kv.blocks,
        kv.bytes,
        kv.verified_blocks,
        kv.verified_blocks.saturating_sub(kv.failed_blocks),
        kv.failed_blocks,
        kv.gate_calls,
        kv.gate_blocks,
        kv.gate_owner_changed_blocks,
        kv.gate_unknown_owner_blocks
    ));
    push(format!(
        "Records lost by failed writes: {}.",
        ev.records_lost
    ));
    push(String::new());
    render_anomalies(ev, &mut push);
    push("| record kind | records |".into());
    push("| --- | --- |".into());
    for (k, n) in &ev.records_by_kind {
        push(format!("| {} | {n} |", cell(k)));
    }
    push(String::new());
    push("## Exceptions".into());
    push(String::new());
    let total = ev
        .exceptions_by_kind
        .values()
        .fold(0u64, |a, n| a.saturating_add(*n));
    let in_period = if ev.audit_period.is_some() {
        " in the audit period"
    } else {
        ""
    };
    if let (0, Some(t)) = (total, &ev.tenant) {
        push(format!(
            "None: no security record of the verified chains names tenant {}{in_period}.",
            id_text(&t.tenant_id)
        ));
    } else if total == 0 && ev.audit_period.is_some() {
        push("None: no security record of the verified chains falls in the audit period.".into());
    } else if total == 0 {
        push("None: no security record in the verified chains.".into());
    } else {
        let kinds: Vec<String> = ev
            .exceptions_by_kind
            .iter()
            .map(|(k, n)| format!("{} {n}", cell(k)))
            .collect();
        push(format!("{total} security records: {}.", kinds.join(", ")));
        let engines = ev
            .anomalies_by_signal
            .get(ENGINE_SIGNAL)
            .copied()
            .unwrap_or(0);
        let detectors: u64 = ev.anomalies_by_signal.values().sum::<u64>() - engines;
        if detectors > 0 {
            push(
                "An `anomaly` record with a signal summarises a burst or surge of the other \
                 records (by signal and tenant): it is not a further incident."
                    .into(),
            );
        }
        if engines > 0 {
            push(
                "An `anomaly` record without a signal is the engine's own finding \
                 (`record_anomaly`): an incident of its own, to be looked at."
                    .into(),
            );
        }
        if (ev.exceptions.len() as u64) < total {
            push(format!(
                "The first {} are listed (chain by chain, each in log order).",
                ev.exceptions.len()
            ));
        }
        push(String::new());
        push("| time | file:line | kind | tenant | request | detail |".into());
        push("| --- | --- | --- | --- | --- | --- |".into());
        for e in &ev.exceptions {
            push(format!(
                "| {} | {}:{} | {} | {} | {} | {} |",
                cell(&e.time),
                cell(&e.file),
                e.line,
                cell(&e.kind),
                id_cell(e.tenant_id.as_deref()),
                id_cell(e.request_id.as_deref()),
                cell(&e.detail)
            ));
        }
    }
    push(String::new());
    push("## Criteria served".into());
    push(String::new());
    if !i.verified {
        push(
            "The log FAILED verification: what follows holds for the chains that verified \
             only. The failures, quarantines and other events recorded in the chains that did \
             not are not among the figures and exceptions above."
                .into(),
        );
        push(String::new());
    }
    let sealed = if i.macs_checked || i.checkpoints_matched.is_some() {
        "logged as tamper-evident records"
    } else {
        "logged as hash-chained records (their MACs and signed checkpoints not checked here: \
         whoever could write the log could have rewritten them consistently)"
    };
    push(
        "- SOC 2 CC6.5 and C1.2 (data is unrecoverable before the resource is reused or \
         released; confidential data is disposed of): freed device memory is zeroed and the \
         zeroing verified by sampled read-back before any reuse (NIST SP 800-88 Clear); see \
         the verification and KV scrub figures above, and the exceptions for every failure \
         and its quarantine."
            .into(),
    );
    push(format!(
        "- SOC 2 CC7.2 (monitoring for anomalies): invalid frees, verification failures, policy \
         violations and lost records are {sealed}, listed above; bursts and surges of them per \
         tenant are flagged as `anomaly` records."
    ));
    if ev.policy.is_some() {
        push(
            "- SOC 2 CC8.1 (changes are authorised): each process's policy digest, from its \
             `start` record, against the reviewed policies given; see Policy above."
                .into(),
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only a prune excuses a change: the chain pruned further by the second verification.
    #[test]
    fn only_a_prune_between_two_verifications_makes_the_report_again() {
        use super::super::verify::ChainReport;
        let chain = |pruned: Option<u64>| ChainReport {
            chain: "a".into(),
            records: 5,
            pruned: pruned.map(|files| Pruned {
                files,
                last_seq: files * 10,
                complete: false,
                archive: "archive".into(),
                first_ts: None,
                last_ts: None,
                last_hash: None,
                file_ends: Vec::new(),
            }),
            ..ChainReport::default()
        };
        let report = |pruned| Report {
            chains: vec![chain(pruned)],
            ..Report::default()
        };
        // An edit, or a file deleted: nothing pruned further.
        assert!(!pruned_further(&report(None), &report(None), "a"));
        assert!(!pruned_further(&report(Some(2)), &report(Some(2)), "a"));
        assert!(!pruned_further(&report(Some(2)), &report(None), "a"));
        // Pruned meanwhile, or further; another chain's prune does not count.
        assert!(pruned_further(&report(None), &report(Some(1)), "a"));
        assert!(pruned_further(&report(Some(1)), &report(Some(2)), "a"));
        assert!(!pruned_further(&report(None), &report(Some(1)), "b"));
    }

    #[test]
    fn a_chain_that_changed_between_two_verifications_is_named() {
        use super::super::verify::ChainReport;
        let chain = |name: &str, records: u64| ChainReport {
            chain: name.into(),
            records,
            last_seq: records.checked_sub(1),
            files: 1,
            ..ChainReport::default()
        };
        let before = Report {
            chains: vec![chain("a", 5), chain("b", 3)],
            ..Report::default()
        };
        let after = Report {
            chains: vec![chain("a", 6), chain("b", 3)],
            ..Report::default()
        };
        // Grown: unchanged if the first head is still there, changed if not.
        assert!(changed_chains(&before, &after, |_| true).is_empty());
        assert_eq!(
            changed_chains(&before, &after, |_| false),
            vec!["a".to_string()]
        );
        let gone = Report {
            chains: vec![chain("a", 5)],
            ..Report::default()
        };
        assert_eq!(
            changed_chains(&before, &gone, |_| true),
            vec!["b".to_string()]
        );
        assert!(changed_chains(&before, &before, |_| false).is_empty());
        // Shorter: changed, whatever the files say.
        let shorter = Report {
            chains: vec![chain("a", 4), chain("b", 3)],
            ..Report::default()
        };
        assert_eq!(
            changed_chains(&before, &shorter, |_| true),
            vec!["a".to_string()]
        );
    }

    #[test]
    fn a_line_that_no_longer_parses_is_an_error_and_a_torn_tail_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kvh-x-000000.jsonl");
        std::fs::write(&path, "{\"seq\":0}\n{\"seq\":1}\n{\"seq\":2").unwrap();
        let mut seen = Vec::new();
        read_file(&path, &mut |line, _, _| {
            seen.push(line);
            Ok(())
        })
        .unwrap();
        assert_eq!(seen, vec![1, 2], "the torn third line is not read");
        std::fs::write(&path, "{\"seq\":0}\nnot json\n").unwrap();
        let e = read_file(&path, &mut |_, _, _| Ok(())).unwrap_err();
        assert!(
            e.ends_with(":2: not a JSON record; the file changed after verification"),
            "{e}"
        );
    }

    /// Two verified chains, each stopped after its start record, as (lines, head hash).
    fn two_chains(dir: &Path) -> Vec<(Vec<Vec<u8>>, String)> {
        use crate::forensic::{ForensicLog, StartInfo};
        let cfg = crate::forensic::quiet_test_config(dir);
        for _ in 0..2 {
            let start = StartInfo::current(Config::default().canonical_json());
            ForensicLog::open_with_secret(&cfg, start, None)
                .unwrap()
                .stop();
        }
        let opts = verify::VerifyOptions::default();
        let report = verify_all(dir, &opts).unwrap();
        assert!(report.ok() && report.chains.len() == 2, "{report:?}");
        let files = verify::list_all(dir, &opts).unwrap();
        report
            .chains
            .iter()
            .map(|c| {
                let (_, list) = files.iter().find(|(id, _)| *id == c.chain).unwrap();
                let text = std::fs::read(&list[0].1).unwrap();
                let lines = text.split(|b| *b == b'\n').filter(|l| !l.is_empty());
                (
                    lines.map(<[u8]>::to_vec).collect(),
                    c.last_hash.clone().unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn only_the_records_of_the_verified_chain_are_taken() {
        let tmp = tempfile::tempdir().unwrap();
        let chains = two_chains(&tmp.path().join("log"));
        let (lines, head) = &chains[0];
        let n = lines.len() as u64;
        let mut held = HeldToHead::from(0);
        for l in lines {
            held.follow(l).unwrap();
        }
        assert_eq!(held.at(Some(head), n), Ok(()));
        assert!(
            held.at(Some(head), n + 1).is_err(),
            "fewer records than verified"
        );
        // Another chain's records, each well formed and linked, in place of this one's.
        let (other, _) = &chains[1];
        let mut held = HeldToHead::from(0);
        for l in other {
            held.follow(l).unwrap();
        }
        assert!(
            held.at(Some(head), n).is_err(),
            "a swapped file ends elsewhere"
        );
        // A record edited (its hash no longer its bytes'), or records left out.
        let edited = String::from_utf8(lines[0].clone())
            .unwrap()
            .replace("\"start\"", "\"stert\"");
        assert!(HeldToHead::from(0).follow(edited.as_bytes()).is_err());
        let mut held = HeldToHead::from(0);
        held.follow(&lines[0]).unwrap();
        assert!(
            held.at(Some(head), n).is_err(),
            "the chain read stops short of its head"
        );
        assert!(
            HeldToHead::from(0).at(None, 0).is_ok(),
            "a chain without records"
        );
        // A chain whose first records were moved: it begins at its first verified seq.
        let mut held = HeldToHead::from(1);
        for l in &lines[1..] {
            held.follow(l).unwrap();
        }
        assert_eq!(held.at(Some(head), n - 1), Ok(()));
    }

    /// Records left out at the start of a chain (its first file emptied between the
    /// verification and the reading, and put back before the second verification): the
    /// records read still link to one another up to the verified head, but they are not the
    /// chain that was verified, and the records left out (exceptions among them) would be
    /// missing from a report marked verified. What is read must begin where the verified
    /// chain begins.
    #[test]
    fn records_left_out_at_the_start_of_the_chain_are_not_taken() {
        let tmp = tempfile::tempdir().unwrap();
        let chains = two_chains(&tmp.path().join("log"));
        let (lines, head) = &chains[0];
        assert!(lines.len() >= 2, "a chain of several records: {lines:?}");
        let mut held = HeldToHead::from(0);
        let followed = lines[1..].iter().all(|l| held.follow(l).is_ok());
        assert!(
            !followed || held.at(Some(head), lines.len() as u64).is_err(),
            "a chain read without its first record was taken as the verified chain"
        );
    }

    /// A FIFO planted at a chain file name after the verification and before the reading:
    /// the reading opens files as the verifier opens them (no FIFO waited for, regular files
    /// only), so the report is not held up for ever, nor fed by whoever writes to the FIFO.
    #[test]
    fn a_fifo_planted_after_the_verification_does_not_hang_the_reading() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kvh-p1-t2-000000.jsonl");
        let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let read = read_file(&path, &mut |_, _, _| Ok(()));
            let _ = tx.send(read.is_err());
        });
        let refused = rx
            .recv_timeout(std::time::Duration::from_secs(5))
            .expect("the reading of a verified chain blocked opening a FIFO at a chain file name");
        assert!(refused, "a FIFO was read as a chain file");
    }

    /// A symlink planted at a chain file name after the verification (to another file of
    /// records): the verifier never follows one, and the reading does not either, so no
    /// figure comes from records that were not verified.
    #[test]
    fn a_symlink_planted_after_the_verification_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let elsewhere = dir.path().join("elsewhere.jsonl");
        std::fs::write(&elsewhere, "{\"seq\":0}\n{\"seq\":1}\n").unwrap();
        let path = dir.path().join("kvh-p1-t2-000000.jsonl");
        std::os::unix::fs::symlink(&elsewhere, &path).unwrap();
        let mut seen = Vec::new();
        let read = read_file(&path, &mut |line, _, _| {
            seen.push(line);
            Ok(())
        });
        assert!(
            read.is_err() && seen.is_empty(),
            "records read through a symlink at a chain file name: {seen:?}"
        );
    }

    #[test]
    fn cells_keep_text_from_reshaping_a_table() {
        assert_eq!(cell("a|b\nc"), "a\\|b c");
        assert_eq!(
            cell("[x](y) <b> *z* `q` \\"),
            "\\[x](y) \\<b> \\*z\\* \\`q\\` \\\\"
        );
        assert_eq!(cell("kv_verify_failed"), "kv_verify_failed");
        // Strike-through and character references.
        assert_eq!(cell("~~t~~ &lt;"), "\\~\\~t\\~\\~ \\&lt;");
        // An underscore at a word's edge can open or close emphasis; inside one it cannot.
        assert_eq!(cell("_acme_ a_b __x"), "\\_acme\\_ a_b \\_\\_x");
    }

    /// GitHub's extended autolinks make `https://...`, any `scheme://...` and `www....` links
    /// in plain text: a client-chosen id spelled as an address must show as text. Escaped at
    /// the `:` of `://` and the `.` of `www.`, in cells and headings alike; other colons and
    /// dots are left as they are.
    #[test]
    fn text_spelled_as_a_web_address_links_nowhere() {
        assert_eq!(
            cell("https://evil.example/login"),
            "https\\://evil.example/login"
        );
        assert_eq!(cell("see www.evil.example"), "see www\\.evil.example");
        assert_eq!(cell("WWW.x"), "WWW\\.x");
        assert_eq!(cell("ftp://x"), "ftp\\://x");
        assert_eq!(cell("a:b 1.5 w.x ww.y"), "a:b 1.5 w.x ww.y");
        assert_eq!(literal("http://x"), "http\\://x");
        assert_eq!(literal("www.x"), "www\\.x");
    }

    #[test]
    fn ids_a_renderer_would_trim_or_take_for_none_are_quoted() {
        assert_eq!(id_cell(None), "-");
        assert_eq!(id_cell(Some("acme")), "acme");
        assert_eq!(id_cell(Some("acme ")), "` \"acme \" `");
        assert_eq!(id_cell(Some("-")), "` \"-\" `");
        assert_eq!(id_cell(Some("")), "` \"\" `");
        // A pipe splits a table's cell even inside a code span: escaped.
        assert_eq!(id_cell(Some(" a|b")), "` \" a\\|b\" `");
    }

    /// A cell's text as a GFM table shows it: trimmed of the whitespace at its ends.
    fn trimmed(cell: &str) -> &str {
        cell.trim_matches([' ', '\t'])
    }

    /// An id with a control character at an end (a log rewritten without a MAC key can hold
    /// one, as it can hold an empty id) is not shown as the id without it: the character
    /// must not turn into a space that the table then trims away.
    #[test]
    fn an_id_with_a_control_character_at_an_end_is_not_shown_as_the_id_without_it() {
        for id in ["acme\u{1}", "\u{7f}acme", "acme\u{9b}"] {
            assert_ne!(
                trimmed(&id_cell(Some(id))),
                trimmed(&id_cell(Some("acme"))),
                "tenant {id:?} shows as tenant \"acme\""
            );
        }
        // Nor is one made of a control character alone shown as a blank cell.
        assert_ne!(trimmed(&id_cell(Some("\u{1}"))), "");
    }

    /// Ids that differ in a run of spaces inside them are two tenants; a rendered table (HTML)
    /// shows a run of spaces in text as one, so the report shows such an id so that its
    /// spaces stay in sight (a code span keeps its spaces).
    #[test]
    fn ids_that_differ_in_a_run_of_inner_spaces_are_told_apart() {
        let shown = |cell: String| -> String {
            let cell = trimmed(&cell);
            if cell.starts_with('`') {
                cell.to_string()
            } else {
                cell.split_whitespace().collect::<Vec<_>>().join(" ")
            }
        };
        assert_ne!(
            shown(id_cell(Some("acme  corp"))),
            shown(id_cell(Some("acme corp"))),
            "tenants \"acme  corp\" and \"acme corp\" show as one"
        );
    }

    /// A cell as a reader sees it: characters that display as nothing are not seen.
    fn seen(cell: &str) -> String {
        cell.chars()
            .filter(|&c| {
                !c.is_control() && !matches!(c, '\u{200b}'..='\u{200d}' | '\u{2060}' | '\u{feff}')
            })
            .collect()
    }

    /// Two ids that differ in where a DEL (or C1 control) character sits are two tenants;
    /// the quoted form must show that character, not pass it through unseen.
    #[test]
    fn ids_that_differ_in_a_del_character_are_told_apart() {
        for (a, b) in [("\u{7f}acme", "acme\u{7f}"), ("\u{9b}acme", "acme\u{9b}")] {
            assert_ne!(
                seen(&id_cell(Some(a))),
                seen(&id_cell(Some(b))),
                "tenants {a:?} and {b:?} show as one"
            );
        }
    }

    /// An id holding a zero-width character is another tenant than the id without it.
    #[test]
    fn an_id_with_a_zero_width_character_is_not_shown_as_the_id_without_it() {
        for id in ["acme\u{200b}", "\u{feff}acme", "ac\u{2060}me"] {
            assert_ne!(
                seen(&id_cell(Some(id))),
                seen(&id_cell(Some("acme"))),
                "tenant {id:?} shows as tenant \"acme\""
            );
            assert_ne!(
                seen(&id_text(id)),
                seen(&id_text("acme")),
                "the heading of tenant {id:?} reads as that of tenant \"acme\""
            );
        }
    }

    /// The tenants listed for a mistyped `--tenant` are the least ones, whatever order the
    /// log names them in, and `more` says only that there are more distinct ones.
    #[test]
    fn keep_least_keeps_the_least_distinct_ids_and_says_when_there_are_more() {
        let (mut kept, mut more) = (BTreeSet::new(), false);
        for i in (0..TENANTS_LISTED).rev().chain(0..TENANTS_LISTED) {
            keep_least(&mut kept, &mut more, &format!("t-{i:02}"));
        }
        assert!(
            !more,
            "{TENANTS_LISTED} distinct ids, each named twice, are not more"
        );
        for i in [TENANTS_LISTED + 3, 0, TENANTS_LISTED + 1] {
            keep_least(&mut kept, &mut more, &format!("t-{i:02}"));
        }
        keep_least(&mut kept, &mut more, "a");
        let expected: BTreeSet<String> = std::iter::once("a".to_string())
            .chain((0..TENANTS_LISTED - 1).map(|i| format!("t-{i:02}")))
            .collect();
        assert_eq!((kept, more), (expected, true));
    }

    #[test]
    fn a_shown_id_is_quoted_and_escaped_for_a_terminal() {
        assert_eq!(shown_id("acme"), "\"acme\"");
        assert_eq!(
            shown_id("a\u{1b}[2J\"b\\\u{202e}\u{200b}"),
            "\"a\\u{1b}[2J\\\"b\\\\\\u{202e}\\u{200b}\""
        );
    }

    #[test]
    fn literal_text_cannot_format_or_close_a_heading() {
        assert_eq!(literal("acme #"), "acme \\#");
        assert_eq!(
            literal("_a_ *b* [c](d) `e` <f> &g;"),
            "\\_a\\_ \\*b\\* \\[c\\](d) \\`e\\` \\<f> \\&g;"
        );
        assert_eq!(literal("t-1.2\nx"), "t-1.2 x");
    }

    #[test]
    fn a_json_code_span_is_fenced_longer_than_any_backtick_run_in_it() {
        assert_eq!(json_code("acme "), "` \"acme \" `");
        assert_eq!(json_code("a``b"), "``` \"a``b\" ```");
    }

    #[test]
    fn only_a_real_digest_goes_in_a_code_span() {
        let d = "0123456789abcdef".repeat(4);
        assert_eq!(digest_cell(&d), format!("`{d}`"));
        for forged in ["`x` | y", &"0123456789ABCDEF".repeat(4), &d[..63]] {
            let c = digest_cell(forged);
            assert!(!c.starts_with('`'), "{c}");
            assert!(!c.contains(" | "), "{c}");
        }
    }

    #[test]
    fn detail_keeps_only_the_kinds_own_fields() {
        let record: Map<String, Value> = serde_json::from_str(
            r#"{"v":1,"seq":3,"ts":5,"kind":"invalid_free","chain":"c","epoch":0,"prev":"00",
                "hash":"11","tenant_id":"t","request_id":null,"model_id":null,
                "call_device":0,"ptr":"0xdead","reason":"double_free"}"#,
        )
        .expect("json");
        assert_eq!(
            detail(&record, None),
            "call_device=0, ptr=0xdead, reason=double_free"
        );
    }
}

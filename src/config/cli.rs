//! `kvh config`: the policy a process started here would run with, where each value came
//! from, its digest, and the controls it turns off or weakens.
//!
//! The library reads its policy once, at start, and refuses to start on an invalid one: this
//! verb lets an operator find out before a rollout instead (a pipeline step on the ConfigMap,
//! an init container, a shell on the node). It loads the policy exactly as the library does
//! ([`Config::from_env`]: `KVH_CONFIG`'s file, then `KVH_*` variables), or a file alone with
//! `--file`, and prints:
//!
//! - every key with its value and its source (default, file or environment);
//! - the configuration digest, which the forensic log's `start` record carries as
//!   `config_digest`: an auditor matches a reviewed policy to the processes that ran it;
//! - the controls the policy turns off or weakens against the recommended production posture
//!   ([`weakened`]); `--strict` makes any of them exit 1.
//!
//! Exit codes: 0 valid (and with `--strict`, nothing weakened), 1 (`--strict`) a control is
//! weakened, 2 usage error or an invalid policy (the message names the key).

use crate::printable;
use crate::report_out::ReportOut;
use std::path::PathBuf;

use serde::Serialize;

use super::{
    env_vars, Config, ConfigError, FsyncPolicy, KvGateMode, KvGateScope, PreloadSwitch, Setting,
    Source, TenantIsolation, BLANK_POLICY_PATH, PRELOAD_ENV,
};
use crate::forensic::config_digest;
use crate::forensic::keys::{secret_len, MAX_SECRET_LEN, MIN_SECRET_LEN};

/// Exit code: the policy is valid (and, with `--strict`, weakens nothing).
pub const EXIT_OK: i32 = 0;
/// Exit code (`--strict`): the policy turns a control off or weakens it.
pub const EXIT_WEAKENED: i32 = 1;
/// Exit code: usage error or an invalid policy.
pub const EXIT_USAGE: i32 = 2;

/// The environment variable that carries the HMAC secret itself (read once by the library,
/// then removed from its environment). `kvh config` only asks whether it is set, and its
/// length.
use crate::forensic::keys::SECRET_ENV as HMAC_SECRET_ENV;

/// `kvh config`.
#[derive(Clone, Debug, clap::Args)]
pub struct ConfigArgs {
    /// Check this TOML file alone, as a process whose only setting is KVH_CONFIG=FILE would
    /// read it; the environment (KVH_* and FORENSIC_HMAC_SECRET) is not read.
    #[arg(long, value_name = "FILE")]
    pub file: Option<PathBuf>,
    /// Exit 1 when the policy turns a control off or weakens it (each is listed with its risk).
    #[arg(long)]
    pub strict: bool,
    /// Print the report as JSON instead of text; for an invalid policy (exit 2), an object
    /// with the `error`.
    #[arg(long)]
    pub json: bool,
}

/// A control the policy turns off or weakens, and what that risks.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Weakened {
    /// The key responsible (its file name; the environment variable is `KVH_` + upper case).
    pub key: &'static str,
    /// Its value, as the settings list shows it.
    pub value: String,
    pub risk: String,
}

/// Whether the secret of the HMAC seal comes from somewhere.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HmacSecret {
    /// `FORENSIC_HMAC_SECRET` is set in the environment the policy was read from (the
    /// library then uses it, and not `hmac_key_file`).
    InEnvironment,
    /// Only `hmac_key_file` can provide it.
    NotInEnvironment,
}

/// Thresholds beyond which a valid value switches its control off in practice.
const MAX_FSYNC_INTERVAL_MS: u64 = 60_000;
const MAX_ANOMALY_Z: f64 = 10.0;
const MAX_ANOMALY_BURST_SCALE: f64 = 10.0;
/// A burst must reach its threshold within the window: a window this short sees only storms.
const MIN_ANOMALY_WINDOW_MS: u64 = 1_000;
const MAX_CHECKPOINT_INTERVAL_MS: u64 = 3_600_000;
/// The shipped probes read the metrics file with `--max-age 60` and KvhMetricsStale fires at
/// 120 s: a file rewritten less often than every 30 s leaves the probes less than half their
/// margin (a write takes time, and a probe may run just before the next one).
const MAX_METRICS_INTERVAL_MS: u64 = 30_000;

/// The controls `config` turns off or weakens (`KVH_PRELOAD`, added by [`report`], first;
/// then by subject: verification, isolation, the gate, the log, metrics, anomalies).
///
/// The bar is the recommended production posture of a multi-tenant server, not the defaults
/// (the log and the metrics are off by default, because they need paths only the operator
/// knows): every check here is something an auditor or an on-call engineer would ask about.
pub fn weakened(config: &Config, hmac: HmacSecret) -> Vec<Weakened> {
    let mut out = Vec::new();
    let mut add =
        |key: &'static str, value: String, risk: String| out.push(Weakened { key, value, risk });
    // Below the defaults, a scrub may pass with non-zero samples, or fewer samples look at
    // each block.
    let defaults = Config::default();
    if config.coverage_threshold < defaults.coverage_threshold {
        add(
            "coverage_threshold",
            // Debug, not Display: 1e-300 stays short instead of 300 digits.
            format!("{:?}", config.coverage_threshold),
            format!(
                "below the default {}: a scrub passes verification with up to {}% of its \
                 samples non-zero",
                defaults.coverage_threshold,
                percent((1.0 - config.coverage_threshold) * 100.0)
            ),
        );
    }
    if config.verify_samples < defaults.verify_samples && !config.full_verify {
        add(
            "verify_samples",
            config.verify_samples.to_string(),
            format!(
                "fewer than the default {} samples a block: a partly cleared block is likelier \
                 to pass verification",
                defaults.verify_samples
            ),
        );
    }
    if config.tenant_isolation == TenantIsolation::Off {
        add(
            "tenant_isolation",
            "off".into(),
            "a block one tenant freed is handed to another once its scrub verified: only the \
             sampled verification stands between tenants (strict keeps each tenant's blocks \
             its own)"
                .into(),
        );
    }
    match (config.kv_gate, config.kv_gate_scope) {
        (KvGateMode::Off, _) => add(
            "kv_gate",
            "off".into(),
            "KV blocks change owner unchecked: an engine path that frees blocks without \
             kvh_scrub_blocks (preemption, abort, eviction) hands one request's keys and values \
             to the next"
                .into(),
        ),
        (_, KvGateScope::Tenant) => add(
            "kv_gate_scope",
            "tenant".into(),
            "the eviction gate keeps tenants apart, not requests: one tenant's requests get \
             each other's KV blocks without a scrub"
                .into(),
        ),
        (_, KvGateScope::Request) => {}
    }
    log_weakened(config, hmac, &mut add);
    if config.metrics.file.is_none() && config.metrics.addr.is_none() {
        add(
            "metrics_file",
            "unset".into(),
            "the process exports no metrics (neither metrics_file nor metrics_addr): kvh \
             gate, readiness probes and alert rules cannot see a failed control"
                .into(),
        );
    }
    if config.metrics.file.is_some() && config.metrics.interval_ms > MAX_METRICS_INTERVAL_MS {
        add(
            "metrics_interval_ms",
            config.metrics.interval_ms.to_string(),
            format!(
                "the metrics file is rewritten only every {} (more than {}, half the shipped \
                 probes' `kvh metrics --max-age 60`): the probes and KvhMetricsStale may take \
                 a healthy process for a hung one between writes, and a failed control shows \
                 that late",
                duration_ms(config.metrics.interval_ms),
                duration_ms(MAX_METRICS_INTERVAL_MS)
            ),
        );
    }
    anomaly_weakened(config, &mut add);
    out
}

/// The anomaly detector's part of [`weakened`].
fn anomaly_weakened(config: &Config, add: &mut impl FnMut(&'static str, String, String)) {
    let a = &config.anomaly;
    if !a.enabled {
        add(
            "anomaly",
            "off".into(),
            "no anomaly detection: a tenant's burst of residue, failed verifications or \
             invalid frees raises no anomaly record and no kvh_anomalies_total"
                .into(),
        );
        return;
    }
    if a.z > MAX_ANOMALY_Z {
        add(
            "anomaly_z",
            a.z.to_string(),
            format!(
                "above {MAX_ANOMALY_Z}: a surge must stand so far above a tenant's baseline \
                 that the rule practically never fires"
            ),
        );
    }
    if a.window_ms < MIN_ANOMALY_WINDOW_MS {
        add(
            "anomaly_window_ms",
            a.window_ms.to_string(),
            format!(
                "below {MIN_ANOMALY_WINDOW_MS} ms: a burst must reach its threshold within so \
                 short a window that only a storm is flagged"
            ),
        );
    }
    if a.burst_scale > MAX_ANOMALY_BURST_SCALE {
        add(
            "anomaly_burst_scale",
            a.burst_scale.to_string(),
            format!(
                "above {MAX_ANOMALY_BURST_SCALE}: every burst threshold but residue's is that \
                 many times the default, so bursts of security events go unflagged"
            ),
        );
    }
}

/// The forensic log's part of [`weakened`].
fn log_weakened(
    config: &Config,
    hmac: HmacSecret,
    add: &mut impl FnMut(&'static str, String, String),
) {
    let log = &config.log;
    if log.dir.is_none() {
        add(
            "log_dir",
            "unset".into(),
            "no forensic log: security events are counted but not recorded, and no evidence \
             is left for an audit or an investigation"
                .into(),
        );
        return;
    }
    if log.hmac_key_file.is_none() && hmac == HmacSecret::NotInEnvironment {
        add(
            "hmac_key_file",
            "unset".into(),
            format!(
                "the log is hash-chained but not sealed (no hmac_key_file, no \
                 {HMAC_SECRET_ENV}): whoever can write its directory can rewrite a chain \
                 without detection"
            ),
        );
    }
    if log.signing_key_file.is_none() {
        add(
            "signing_key_file",
            "unset".into(),
            "no signed checkpoints: a truncated tail or a deleted log file goes unnoticed".into(),
        );
    }
    match log.fsync {
        FsyncPolicy::Never => add(
            "log_fsync",
            "never".into(),
            "records wait in the page cache for as long as the kernel likes: a machine crash \
             can lose the newest ones, security events included"
                .into(),
        ),
        FsyncPolicy::Interval if log.fsync_interval_ms > MAX_FSYNC_INTERVAL_MS => add(
            "log_fsync_interval_ms",
            log.fsync_interval_ms.to_string(),
            format!(
                "records reach the disk only every {} (more than {}): a machine crash can \
                 lose that much of the log",
                duration_ms(log.fsync_interval_ms),
                duration_ms(MAX_FSYNC_INTERVAL_MS)
            ),
        ),
        _ => {}
    }
    if log.signing_key_file.is_some() && log.checkpoint_interval_ms > MAX_CHECKPOINT_INTERVAL_MS {
        add(
            "checkpoint_interval_ms",
            log.checkpoint_interval_ms.to_string(),
            format!(
                "checkpoints may be {} apart (more than {}, unless checkpoint_every records \
                 come first): a truncated tail younger than the last checkpoint goes unnoticed",
                duration_ms(log.checkpoint_interval_ms),
                duration_ms(MAX_CHECKPOINT_INTERVAL_MS)
            ),
        );
    }
}

/// `ms` milliseconds in the largest unit that states it exactly (`90 min`, `119 s`,
/// `60001 ms`): a risk quotes the setting, never a figure rounded down to its limit.
fn duration_ms(ms: u64) -> String {
    match ms {
        0 => "0 ms".into(),
        _ if ms.is_multiple_of(3_600_000) => format!("{} h", ms / 3_600_000),
        _ if ms.is_multiple_of(60_000) => format!("{} min", ms / 60_000),
        _ if ms.is_multiple_of(1000) => format!("{} s", ms / 1000),
        _ => format!("{ms} ms"),
    }
}

/// Where `kvh config` read the policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    /// `KVH_CONFIG`'s file, then `KVH_*` variables, as the library reads them.
    Environment,
    /// A file alone (`--file`).
    File,
}

/// What `kvh config` reports (its `--json` form).
#[derive(Debug, Serialize)]
pub struct Report {
    pub origin: Origin,
    /// The TOML file read, if any.
    pub file: Option<String>,
    /// Whether `FORENSIC_HMAC_SECRET` is set (never its value); `false` with `--file`.
    pub hmac_secret_in_environment: bool,
    /// What `KVH_PRELOAD` asks of the LD_PRELOAD interposers; `None` with `--file`.
    pub preload: Option<PreloadSwitch>,
    /// The `config_digest` a `start` record of a process with this policy carries.
    pub config_digest: String,
    pub settings: Vec<Setting>,
    pub weakened: Vec<Weakened>,
}

/// Loads the policy as `args` asks and judges it.
pub fn report(args: &ConfigArgs) -> Result<Report, String> {
    let (origin, file, hmac, preload, loaded) = match &args.file {
        Some(path) => (
            Origin::File,
            Some(path.display().to_string()),
            HmacSecret::NotInEnvironment,
            None,
            Config::explain_file(path).map_err(|e| match e {
                // The blank path, in the terms of the command line the user typed.
                ConfigError::Invalid {
                    key,
                    value,
                    expected,
                } if key == BLANK_POLICY_PATH => ConfigError::Invalid {
                    key: "--file".into(),
                    value,
                    expected,
                },
                other => other,
            }),
        ),
        None => {
            let vars = env_vars().map_err(|e| e.to_string())?;
            let file = vars
                .iter()
                .find(|(k, v)| k == "KVH_CONFIG" && !v.is_empty())
                .map(|(_, v)| v.clone());
            let preload = PreloadSwitch::parse(std::env::var_os(PRELOAD_ENV).as_deref());
            let hmac = hmac_secret_of_env();
            (
                Origin::Environment,
                file,
                hmac,
                Some(preload),
                Config::explain(&vars),
            )
        }
    };
    let (config, settings) = loaded.map_err(|e| e.to_string())?;
    if preload == Some(PreloadSwitch::Refuse) {
        return Err(format!(
            "{PRELOAD_ENV}={:?}: expected on or off (or true/false, yes/no, 1/0); the LD_PRELOAD interposers would fail \
             every CUDA allocation",
            std::env::var_os(PRELOAD_ENV)
                .map(|v| v.to_string_lossy().into_owned())
                .unwrap_or_default()
        ));
    }
    // A file checked alone is judged alike wherever it is checked: the secret of this
    // environment is not its (nor, with `--file`, is any other variable).
    if origin == Origin::Environment {
        if let Some(e) = env_secret_error(&config) {
            return Err(e);
        }
    }
    let mut weak = weakened(&config, hmac);
    if preload == Some(PreloadSwitch::Forward) {
        weak.insert(
            0,
            Weakened {
                key: "KVH_PRELOAD",
                value: "off".into(),
                risk: "the LD_PRELOAD interposers forward every CUDA allocation unchanged: an \
                       engine that loads kvhygiene through LD_PRELOAD scrubs nothing (the \
                       PyTorch route does not read this variable)"
                    .into(),
            },
        );
    }
    Ok(Report {
        origin,
        file,
        hmac_secret_in_environment: hmac == HmacSecret::InEnvironment,
        preload,
        config_digest: config_digest(&config.canonical_json()),
        weakened: weak,
        settings,
    })
}

/// Whether `FORENSIC_HMAC_SECRET` is present: the library reads it whenever it exists, even
/// empty.
fn hmac_secret_of_env() -> HmacSecret {
    // Its length only: the value is not copied (`environ`).
    match super::environ::value_len(HMAC_SECRET_ENV) {
        Some(_) => HmacSecret::InEnvironment,
        None => HmacSecret::NotInEnvironment,
    }
}

/// Why the library would not start with `FORENSIC_HMAC_SECRET` under `config`: present (it is
/// then used whenever the log is on, even empty) and of a length it refuses. `kvh config` and
/// `kvh_check_config` both ask, so that a launcher told the policy is valid is not met by a
/// refusal at each worker's first allocation.
pub(crate) fn env_secret_error(config: &Config) -> Option<String> {
    let present = hmac_secret_of_env() == HmacSecret::InEnvironment;
    (present && config.log.dir.is_some())
        .then(check_secret_len)
        .and_then(Result::err)
}

/// The library refuses to start with a secret shorter than [`MIN_SECRET_LEN`] or longer than
/// [`MAX_SECRET_LEN`]; so does this check (the length is said, never the value).
fn check_secret_len() -> Result<(), String> {
    let len = super::environ::measure_value(HMAC_SECRET_ENV, secret_len).unwrap_or(0);
    if len < MIN_SECRET_LEN {
        return Err(format!(
            "{HMAC_SECRET_ENV} is {len} bytes; the library needs at least {MIN_SECRET_LEN} and \
             would not start (it uses this variable, when present, instead of hmac_key_file)"
        ));
    }
    if len > MAX_SECRET_LEN {
        return Err(format!(
            "{HMAC_SECRET_ENV} is {len} bytes; the library accepts at most {MAX_SECRET_LEN} \
             (a key file holding it must be readable by every verifier) and would not start"
        ));
    }
    Ok(())
}

/// `kvh config`: prints the report; returns the exit code.
pub fn run_config(args: &ConfigArgs) -> i32 {
    let report = match report(args) {
        Ok(r) => r,
        Err(e) => {
            crate::say(format_args!("kvh config: invalid policy: {e}"));
            if args.json {
                let why = format!("invalid policy: {e}");
                crate::report_out::json_error(&why, serde_json::json!({}));
            }
            return EXIT_USAGE;
        }
    };
    let text = if args.json {
        // Plain data with derived impls: serialising cannot fail.
        serde_json::to_string_pretty(&report).unwrap_or_default() + "\n"
    } else {
        render(&report)
    };
    if !ReportOut::print("config", &text) {
        return EXIT_USAGE;
    }
    if args.strict && !report.weakened.is_empty() {
        crate::say(format_args!(
            "kvh config: {} control(s) off or weakened (--strict)",
            report.weakened.len()
        ));
        return EXIT_WEAKENED;
    }
    EXIT_OK
}

/// A setting's value as text: JSON strings unquoted (their control characters escaped: the
/// policy's author chose them), `null` as `unset`.
fn shown(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::Null => "unset".into(),
        serde_json::Value::String(s) => printable(s),
        other => other.to_string(),
    }
}

/// The text form of a report.
fn render(r: &Report) -> String {
    let mut out = match (r.origin, &r.file) {
        (Origin::File, Some(f)) => format!(
            "kvh config: the policy of {} alone (environment not read)\n",
            printable(f)
        ),
        (_, Some(f)) => format!(
            "kvh config: the policy of this environment (KVH_CONFIG={}, then KVH_* variables)\n",
            printable(f)
        ),
        _ => "kvh config: the policy of this environment (KVH_* variables)\n".to_string(),
    };
    let whose = if r.origin == Origin::File {
        "of a process whose only setting is KVH_CONFIG naming this file"
    } else {
        "of a process started in this environment"
    };
    out += &format!(
        "config digest: {} (the config_digest of the forensic log's start records {whose}, \
         with this kvh version)\n",
        r.config_digest
    );
    out += &match r.preload {
        Some(PreloadSwitch::Forward) => {
            "KVH_PRELOAD: off (the LD_PRELOAD interposers forward everything)\n".to_string()
        }
        Some(_) => "KVH_PRELOAD: on (for engines that load libkvhygiene_preload.so)\n".to_string(),
        None => String::new(),
    };
    if r.hmac_secret_in_environment {
        // Not a policy key, so not in the table; it decides what seals the log all the same.
        let set = |key: &str| {
            r.settings
                .iter()
                .any(|s| s.key == key && !s.value.is_null())
        };
        out += &if !set("log_dir") {
            format!("{HMAC_SECRET_ENV}: set, and unused (no log_dir: no log to seal)\n")
        } else if set("hmac_key_file") {
            format!(
                "{HMAC_SECRET_ENV}: set (the HMAC secret that seals the log; hmac_key_file, \
                 set too, is not read)\n"
            )
        } else {
            format!("{HMAC_SECRET_ENV}: set (the HMAC secret that seals the log)\n")
        };
    }
    out.push('\n');
    let width = r.settings.iter().map(|s| s.key.len()).max().unwrap_or(0);
    let values: Vec<String> = r.settings.iter().map(|s| shown(&s.value)).collect();
    let vwidth = values.iter().map(String::len).max().unwrap_or(0).min(48);
    for (s, value) in r.settings.iter().zip(&values) {
        let source = match s.source {
            Source::Default => "default",
            Source::File => "file",
            Source::Env => "env",
        };
        out += &format!("{:width$}  {value:vwidth$}  {source:7}  {}\n", s.key, s.env);
    }
    if r.weakened.is_empty() {
        out += "\nweakened controls: none\n";
    } else {
        out += &format!("\nweakened controls ({}):\n", r.weakened.len());
        for w in &r.weakened {
            let (value, risk) = (printable(&w.value), printable(&w.risk));
            out += &format!("  {} = {value}: {risk}\n", w.key);
        }
    }
    out
}

/// A percentage with up to four decimals and no trailing zeros: an allowance such as 0.11%
/// reads as it was configured, not rounded to a smaller one (0.1%).
fn percent(p: f64) -> String {
    let text = format!("{p:.4}");
    text.trim_end_matches('0').trim_end_matches('.').to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::vars;
    use crate::config::{FailureMode, Source};

    /// A policy that weakens nothing: the log sealed and checkpointed, metrics exported.
    fn hardened() -> Vec<(String, String)> {
        vars(&[
            ("KVH_LOG_DIR", "/var/log/kvh"),
            ("KVH_HMAC_KEY_FILE", "/run/keys/hmac.key"),
            ("KVH_SIGNING_KEY_FILE", "/run/keys/ckpt.key"),
            ("KVH_METRICS_FILE", "/run/kvh/kvh.prom"),
        ])
    }

    fn keys_weakened(extra: &[(&str, &str)], hmac: HmacSecret) -> Vec<&'static str> {
        let mut v = hardened();
        v.retain(|(k, _)| !extra.iter().any(|(e, _)| e == k));
        v.extend(vars(extra));
        let config = Config::from_vars(&v).unwrap();
        weakened(&config, hmac).into_iter().map(|w| w.key).collect()
    }

    #[test]
    fn a_tiny_threshold_is_shown_short() {
        let config = Config::from_vars(&vars(&[("KVH_COVERAGE_THRESHOLD", "1e-300")])).unwrap();
        let w = weakened(&config, HmacSecret::NotInEnvironment);
        let w = w.iter().find(|w| w.key == "coverage_threshold").unwrap();
        assert_eq!(w.value, "1e-300");
    }

    /// The allowance a threshold below the default gives is said as configured: 0.9989 lets
    /// 0.11% of the samples read non-zero, not 0.1%.
    #[test]
    fn a_thresholds_allowance_is_not_rounded_down() {
        let config = Config::from_vars(&vars(&[("KVH_COVERAGE_THRESHOLD", "0.9989")])).unwrap();
        let w = weakened(&config, HmacSecret::NotInEnvironment);
        let w = w.iter().find(|w| w.key == "coverage_threshold").unwrap();
        assert!(w.risk.contains("up to 0.11% of its samples"), "{}", w.risk);
        let config = Config::from_vars(&vars(&[("KVH_COVERAGE_THRESHOLD", "0.5")])).unwrap();
        let w = weakened(&config, HmacSecret::NotInEnvironment);
        let w = w.iter().find(|w| w.key == "coverage_threshold").unwrap();
        assert!(w.risk.contains("up to 50% of its samples"), "{}", w.risk);
    }

    #[test]
    fn a_hardened_policy_weakens_nothing() {
        assert!(keys_weakened(&[], HmacSecret::NotInEnvironment).is_empty());
        // Stronger than the defaults is not weaker.
        let stronger = [
            ("KVH_COVERAGE_THRESHOLD", "1"),
            ("KVH_VERIFY_SAMPLES", "1024"),
            ("KVH_KV_GATE", "enforce"),
            ("KVH_FAILURE_MODE", "abort"),
            ("KVH_LOG_FSYNC", "always"),
        ];
        assert!(keys_weakened(&stronger, HmacSecret::NotInEnvironment).is_empty());
    }

    #[test]
    fn the_defaults_weaken_the_log_and_the_metrics_only() {
        let config = Config::default();
        assert_eq!(config.failure_mode, FailureMode::Quarantine);
        let keys: Vec<_> = weakened(&config, HmacSecret::NotInEnvironment)
            .into_iter()
            .map(|w| w.key)
            .collect();
        assert_eq!(keys, ["log_dir", "metrics_file"]);
    }

    #[test]
    fn each_weakening_is_named_by_its_key() {
        // (variables on top of the hardened policy, keys weakened)
        type Case = (
            &'static [(&'static str, &'static str)],
            &'static [&'static str],
        );
        let cases: &[Case] = &[
            (
                &[("KVH_COVERAGE_THRESHOLD", "0.9")],
                &["coverage_threshold"],
            ),
            (&[("KVH_VERIFY_SAMPLES", "8")], &["verify_samples"]),
            // Every word is read: the sample count no longer matters.
            (
                &[("KVH_VERIFY_SAMPLES", "8"), ("KVH_FULL_VERIFY", "yes")],
                &[],
            ),
            (&[("KVH_TENANT_ISOLATION", "off")], &["tenant_isolation"]),
            (&[("KVH_KV_GATE", "off")], &["kv_gate"]),
            // With the gate off, its scope is moot: one finding, not two.
            (
                &[("KVH_KV_GATE", "off"), ("KVH_KV_GATE_SCOPE", "tenant")],
                &["kv_gate"],
            ),
            (&[("KVH_KV_GATE_SCOPE", "tenant")], &["kv_gate_scope"]),
            (&[("KVH_LOG_FSYNC", "never")], &["log_fsync"]),
            (&[("KVH_ANOMALY", "off")], &["anomaly"]),
            // With the detector off, its thresholds are moot.
            (
                &[("KVH_ANOMALY", "off"), ("KVH_ANOMALY_Z", "50")],
                &["anomaly"],
            ),
            (&[("KVH_ANOMALY_Z", "10")], &[]),
            (&[("KVH_ANOMALY_WINDOW_MS", "1000")], &[]),
            (&[("KVH_ANOMALY_WINDOW_MS", "999")], &["anomaly_window_ms"]),
            (&[("KVH_ANOMALY_Z", "10.5")], &["anomaly_z"]),
            (
                &[("KVH_ANOMALY_BURST_SCALE", "11")],
                &["anomaly_burst_scale"],
            ),
            (&[("KVH_LOG_FSYNC_INTERVAL_MS", "60000")], &[]),
            (
                &[("KVH_LOG_FSYNC_INTERVAL_MS", "60001")],
                &["log_fsync_interval_ms"],
            ),
            // The interval is unused when every write is synced.
            (
                &[
                    ("KVH_LOG_FSYNC_INTERVAL_MS", "600000"),
                    ("KVH_LOG_FSYNC", "always"),
                ],
                &[],
            ),
            (&[("KVH_CHECKPOINT_INTERVAL_MS", "3600000")], &[]),
            (
                &[("KVH_CHECKPOINT_INTERVAL_MS", "7200000")],
                &["checkpoint_interval_ms"],
            ),
        ];
        for (extra, want) in cases {
            assert_eq!(
                keys_weakened(extra, HmacSecret::NotInEnvironment),
                *want,
                "{extra:?}"
            );
        }
    }

    #[test]
    fn log_keys_are_judged_only_with_a_log() {
        let mut v = hardened();
        v.retain(|(k, _)| k != "KVH_HMAC_KEY_FILE");
        let config = Config::from_vars(&v).unwrap();
        let keys =
            |hmac| -> Vec<_> { weakened(&config, hmac).into_iter().map(|w| w.key).collect() };
        assert_eq!(keys(HmacSecret::NotInEnvironment), ["hmac_key_file"]);
        assert!(keys(HmacSecret::InEnvironment).is_empty());

        let mut v = hardened();
        v.retain(|(k, _)| k != "KVH_SIGNING_KEY_FILE");
        let config = Config::from_vars(&v).unwrap();
        let keys: Vec<_> = weakened(&config, HmacSecret::NotInEnvironment)
            .into_iter()
            .map(|w| w.key)
            .collect();
        assert_eq!(keys, ["signing_key_file"]);

        // No log at all: one finding, not one a missing key.
        let config = Config::from_vars(&vars(&[("KVH_METRICS_ADDR", "127.0.0.1:9464")])).unwrap();
        let keys: Vec<_> = weakened(&config, HmacSecret::NotInEnvironment)
            .into_iter()
            .map(|w| w.key)
            .collect();
        assert_eq!(keys, ["log_dir"]);
    }

    /// A metrics file rewritten less often than every 30 s (half the probes' `--max-age 60`)
    /// is a weakened control; at the limit it is not, nor without a file (the HTTP exporter's snapshots
    /// are at most about a second old whatever the interval).
    #[test]
    fn a_metrics_file_rewritten_less_often_than_every_30_s_is_flagged() {
        let flagged = |env: &[(&str, &str)]| {
            let c = Config::from_vars(&vars(env)).unwrap();
            weakened(&c, HmacSecret::NotInEnvironment)
                .iter()
                .any(|w| w.key == "metrics_interval_ms")
        };
        let file = ("KVH_METRICS_FILE", "/tmp/kvh.prom");
        assert!(flagged(&[file, ("KVH_METRICS_INTERVAL_MS", "30001")]));
        assert!(flagged(&[file, ("KVH_METRICS_INTERVAL_MS", "60000")]));
        assert!(!flagged(&[file, ("KVH_METRICS_INTERVAL_MS", "30000")]));
        assert!(!flagged(&[
            ("KVH_METRICS_ADDR", "127.0.0.1:0"),
            ("KVH_METRICS_INTERVAL_MS", "600000")
        ]));
    }

    /// A risk quotes the interval as it is: 90 minutes between checkpoints is not "1 h apart
    /// (more than 1 h)", and 119 s between fsyncs is not "every 60 s (more than 60 s)".
    #[test]
    fn interval_risks_do_not_round_the_interval_down_to_the_limit() {
        let risk = |extra: &[(&str, &str)], key: &str| {
            let mut v = hardened();
            v.extend(vars(extra));
            let config = Config::from_vars(&v).unwrap();
            weakened(&config, HmacSecret::NotInEnvironment)
                .into_iter()
                .find(|w| w.key == key)
                .unwrap_or_else(|| panic!("{key} not weakened"))
                .risk
        };
        let ckpt = risk(
            &[("KVH_CHECKPOINT_INTERVAL_MS", "5400000")],
            "checkpoint_interval_ms",
        );
        assert!(!ckpt.contains("may be 1 h apart"), "{ckpt}");
        let fsync = risk(
            &[("KVH_LOG_FSYNC_INTERVAL_MS", "119000")],
            "log_fsync_interval_ms",
        );
        assert!(!fsync.contains("only every 60 s"), "{fsync}");
        assert!(
            ckpt.contains("may be 90 min apart (more than 1 h"),
            "{ckpt}"
        );
        assert!(fsync.contains("every 119 s (more than 1 min)"), "{fsync}");
        assert_eq!(duration_ms(60_001), "60001 ms");
    }

    #[test]
    fn the_coverage_risk_says_how_many_samples_may_be_dirty() {
        let config = Config::from_vars(&vars(&[("KVH_COVERAGE_THRESHOLD", "0.95")])).unwrap();
        let w = weakened(&config, HmacSecret::NotInEnvironment);
        assert!(w[0].risk.contains("up to 5% of"), "{}", w[0].risk);
        assert_eq!(w[0].value, "0.95");
    }

    #[test]
    fn sources_are_env_over_file_over_default() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kvh.toml");
        std::fs::write(&path, "batch_size = 8\nlog_dir = \"/from/file\"\n").unwrap();
        let (config, settings) = Config::explain(&vars(&[
            ("KVH_CONFIG", path.to_str().unwrap()),
            ("KVH_LOG_DIR", "/from/env"),
        ]))
        .unwrap();
        let find = |k: &str| settings.iter().find(|s| s.key == k).unwrap().clone();
        assert_eq!(find("batch_size").source, Source::File);
        assert_eq!(find("batch_size").value, serde_json::json!(8));
        assert_eq!(find("log_dir").source, Source::Env);
        assert_eq!(find("log_dir").value, serde_json::json!("/from/env"));
        assert_eq!(find("backend").source, Source::Default);
        assert_eq!(find("log_dir").env, "KVH_LOG_DIR");
        assert_eq!(config.batch_size, 8);

        let (_, alone) = Config::explain_file(&path).unwrap();
        let log_dir = alone.iter().find(|s| s.key == "log_dir").unwrap();
        assert_eq!(
            (log_dir.source, &log_dir.value),
            (Source::File, &serde_json::json!("/from/file"))
        );
    }

    #[test]
    fn a_file_alone_is_refused_for_what_the_library_would_refuse() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kvh.toml");
        std::fs::write(&path, "log_dir = \"/l\"\ncheckpoint_dir = \"/c\"\n").unwrap();
        let err = Config::explain_file(&path).unwrap_err().to_string();
        assert!(err.contains("signing_key_file"), "{err}");
    }

    #[test]
    fn every_key_changes_the_digest() {
        // (tests/config_cli.rs checks the digest against a real process's start record.)
        let base = config_digest(&Config::default().canonical_json());
        assert_eq!(base.len(), 64);
        assert!(base
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        let changed = [
            ("KVH_BATCH_SIZE", "8"),
            ("KVH_KV_GATE", "enforce"),
            ("KVH_LOG_DIR", "/l"),
            ("KVH_ANOMALY_Z", "5"),
            ("KVH_METRICS_ADDR", "127.0.0.1:1"),
        ];
        for (k, v) in changed {
            let c = Config::from_vars(&vars(&[(k, v)])).unwrap();
            assert_ne!(config_digest(&c.canonical_json()), base, "{k}");
        }
    }

    #[test]
    fn text_lists_every_key_and_each_weakening() {
        let (config, settings) = Config::explain(&vars(&[("KVH_KV_GATE", "off")])).unwrap();
        let r = Report {
            origin: Origin::Environment,
            file: None,
            hmac_secret_in_environment: false,
            preload: Some(PreloadSwitch::Serve),
            config_digest: config_digest(&config.canonical_json()),
            weakened: weakened(&config, HmacSecret::NotInEnvironment),
            settings,
        };
        let text = render(&r);
        for (key, env, _) in Config::keys() {
            assert!(
                text.lines()
                    .any(|l| l.starts_with(key) && l.ends_with(&env)),
                "{key} missing:\n{text}"
            );
        }
        assert!(
            text.contains("  kv_gate = off: KV blocks change owner unchecked"),
            "{text}"
        );
        assert!(text.contains("weakened controls (3):"), "{text}");
        assert!(
            text.lines()
                .any(|l| l.starts_with("log_dir ") && l.contains(" unset ")),
            "{text}"
        );
    }
}

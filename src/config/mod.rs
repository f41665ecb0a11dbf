//! The policy: read once from `KVH_*` environment variables or a TOML file named by
//! `KVH_CONFIG`, validated, then immutable.
//!
//! Every key has one name in the file (`coverage_threshold`) and one in the environment
//! (`KVH_COVERAGE_THRESHOLD`); the environment wins over the file. An unknown key, in either
//! place, is an error: a misspelt security knob must never be silently ignored. Errors name
//! the key, the bad value and the accepted range.

use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use serde::Serialize;

/// The largest policy file read: a policy is a few hundred bytes; this keeps a wrong path (a
/// device, a huge file) from being read into memory.
pub const MAX_POLICY_BYTES: u64 = 1 << 20;

/// Reads a regular file of at most `cap` bytes; `what` names what it should be, for the
/// messages. Links are followed (a Kubernetes ConfigMap mounts each key as one), but the file
/// must be regular: it is opened without waiting (a FIFO in its place cannot hold up the
/// reader; checked again after opening, which holds if the path changes in between), and a
/// device is refused before it is opened (opening one can have effects of its own). Errors
/// say what is wrong, without the path, which the caller adds.
pub(crate) fn read_regular_file(path: &Path, cap: u64, what: &str) -> Result<Vec<u8>, String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let too_large = || format!("larger than {cap} bytes; not {what}");
    match std::fs::metadata(path) {
        Ok(m) if !m.is_file() => return Err("not a regular file".into()),
        Ok(_) => {}
        Err(e) => return Err(e.to_string()),
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| e.to_string())?;
    let meta = file.metadata().map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    if meta.len() > cap {
        return Err(too_large());
    }
    let mut bytes = Vec::new();
    file.take(cap + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| e.to_string())?;
    if bytes.len() as u64 > cap {
        return Err(too_large());
    }
    Ok(bytes)
}

pub mod cli;
pub(crate) mod environ;

/// Which memory backend to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendChoice {
    /// CUDA when a driver is installed; host memory only when no driver exists at all.
    Auto,
    Host,
    Cuda,
}

/// Whether a block may move between tenants.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TenantIsolation {
    /// Scrubbed blocks are shared by all tenants.
    Off,
    /// A block last owned by tenant A is never handed to tenant B (even scrubbed).
    Strict,
}

/// What `kvh_claim_blocks` does with KV blocks that would change owner without a verified
/// scrub (the eviction gate; see `crate::alloc::kv_gate`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KvGateMode {
    /// No ledger: claims are accepted as they are (the engine scrubs with `kvh_scrub_blocks`).
    Off,
    /// Scrub and verify such blocks inside the claim, then hand them over.
    Scrub,
    /// Refuse the claim (nothing changes hands); the engine must scrub first.
    Enforce,
}

/// Whose KV blocks the eviction gate keeps apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KvGateScope {
    /// Every request is an owner: a block moves between requests only through a scrub.
    Request,
    /// Every tenant is an owner: a tenant's requests share its blocks (its prefix cache).
    Tenant,
}

/// What a failed verification does after the block is quarantined and the event logged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FailureMode {
    /// Quarantine the block and carry on.
    Quarantine,
    /// Fail closed: flush the event, then abort the process.
    Abort,
}

/// What `kvh_malloc` does when it cannot allocate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OomMode {
    /// Throw `std::bad_alloc` (PyTorch does not check for NULL).
    Throw,
    /// Return NULL and set the last error.
    Null,
}

/// When the forensic writer calls fsync.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FsyncPolicy {
    Always,
    Interval,
    Never,
}

/// The largest capacity of the forensic log's queue, in records (`KVH_LOG_QUEUE`): its slots
/// are allocated when the log opens.
pub const LOG_QUEUE_MAX: usize = 1 << 22;

/// Forensic log settings (used by `crate::forensic`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LogConfig {
    /// Directory of the chains; `None` disables logging.
    pub dir: Option<PathBuf>,
    pub max_bytes: u64,
    pub fsync: FsyncPolicy,
    pub fsync_interval_ms: u64,
    /// Capacity of the writer's queue, in records: 1 to [`LOG_QUEUE_MAX`] (the policy key
    /// takes 16 or more).
    pub queue_capacity: usize,
    pub summary_interval_ms: u64,
    /// File holding the HMAC key (`FORENSIC_HMAC_SECRET` is the other source).
    pub hmac_key_file: Option<PathBuf>,
    /// Ed25519 private key for checkpoints.
    pub signing_key_file: Option<PathBuf>,
    pub checkpoint_dir: Option<PathBuf>,
    pub checkpoint_every_records: u64,
    pub checkpoint_interval_ms: u64,
}

/// The whole policy.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Config {
    pub backend: BackendChoice,
    pub coverage_threshold: f64,
    pub verify_samples: u32,
    pub double_pass: bool,
    pub full_verify: bool,
    pub batch_size: usize,
    pub batch_max_delay_us: u64,
    /// Idle pooled blocks older than this go back to the backend; `<= 0`: never reuse.
    pub idle_ttl_ms: i64,
    /// A block live longer than this is reported, once per hand-out: by the flusher while it
    /// is still live, or at its free; 0 disables the check.
    pub live_ttl_ms: u64,
    /// After this many hand-outs a block is scrubbed and released; 0 = unlimited.
    pub max_reuse: u32,
    pub tenant_isolation: TenantIsolation,
    /// The KV eviction gate (`kvh_claim_blocks`) and whose blocks it keeps apart.
    pub kv_gate: KvGateMode,
    pub kv_gate_scope: KvGateScope,
    pub failure_mode: FailureMode,
    pub oom: OomMode,
    pub log: LogConfig,
    pub metrics: MetricsConfig,
    pub anomaly: AnomalyConfig,
}

/// Anomaly detector settings (used by `crate::anomaly`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AnomalyConfig {
    /// Whether the detector layer sits in front of the event sinks.
    pub enabled: bool,
    /// Length of the sliding (burst) and baseline (surge) windows, milliseconds.
    pub window_ms: u64,
    /// Spreads above the baseline that make a window's count a surge (the spread: the
    /// baseline's standard deviation, at least the square root of its mean and at least 1).
    pub z: f64,
    /// Multiplier of every signal's default burst threshold (thresholds stay at least 1).
    pub burst_scale: f64,
}

impl Default for AnomalyConfig {
    fn default() -> Self {
        AnomalyConfig {
            enabled: true,
            window_ms: 10_000,
            z: 4.0,
            burst_scale: 1.0,
        }
    }
}

/// Metrics export settings (used by `crate::metrics`). Both exports are off by default.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MetricsConfig {
    /// Prometheus text file rewritten every `interval_ms` and at exit; `None`: no file. Each
    /// [`PID_PLACEHOLDER`] in it is replaced by the writing process's id (see
    /// [`MetricsConfig::file_for`]).
    pub file: Option<PathBuf>,
    pub interval_ms: u64,
    /// Address of the in-process HTTP exporter (`/metrics`, `/stats`, `/healthz`); `None`: off.
    pub addr: Option<std::net::SocketAddr>,
}

/// Written in `KVH_METRICS_FILE`, replaced by the process id: each process of a multi-process
/// engine (whose workers inherit the environment) writes its own file.
pub const PID_PLACEHOLDER: &str = "{pid}";

impl MetricsConfig {
    /// Whether the file name holds [`PID_PLACEHOLDER`] (one file per process).
    pub fn per_process(&self) -> bool {
        self.file
            .as_ref()
            .is_some_and(|f| contains(f.as_os_str().as_bytes(), PID_PLACEHOLDER.as_bytes()))
    }

    /// The metrics file of process `pid`: `file` with each [`PID_PLACEHOLDER`] replaced.
    pub fn file_for(&self, pid: u32) -> Option<PathBuf> {
        let file = self.file.as_ref()?;
        let bytes = file.as_os_str().as_bytes();
        let needle = PID_PLACEHOLDER.as_bytes();
        let pid = pid.to_string();
        let mut out = Vec::with_capacity(bytes.len() + 8);
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i..].starts_with(needle) {
                out.extend_from_slice(pid.as_bytes());
                i += needle.len();
            } else {
                out.push(bytes[i]);
                i += 1;
            }
        }
        Some(PathBuf::from(std::ffi::OsString::from_vec(out)))
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            file: None,
            interval_ms: 10_000,
            addr: None,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            backend: BackendChoice::Auto,
            coverage_threshold: 0.999,
            verify_samples: 64,
            double_pass: false,
            full_verify: false,
            batch_size: 64,
            batch_max_delay_us: 1000,
            idle_ttl_ms: 300_000,
            live_ttl_ms: 0,
            max_reuse: 0,
            tenant_isolation: TenantIsolation::Strict,
            kv_gate: KvGateMode::Scrub,
            kv_gate_scope: KvGateScope::Request,
            failure_mode: FailureMode::Quarantine,
            oom: OomMode::Throw,
            log: LogConfig {
                dir: None,
                max_bytes: 64 << 20,
                fsync: FsyncPolicy::Interval,
                fsync_interval_ms: 1000,
                queue_capacity: 65_536,
                summary_interval_ms: 60_000,
                hmac_key_file: None,
                signing_key_file: None,
                checkpoint_dir: None,
                checkpoint_every_records: 10_000,
                checkpoint_interval_ms: 60_000,
            },
            metrics: MetricsConfig::default(),
            anomaly: AnomalyConfig::default(),
        }
    }
}

/// A configuration error; the message names the key, the value and what is accepted.
///
/// Shown with its control characters escaped (`printable`): a key, a path or a
/// file's text may hold any bytes whoever wrote the policy chose, and an error goes to a
/// terminal (the library's start-up message, `kvh config`, `kvh preflight`).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "{}: invalid value {value:?}; expected {expected}",
        crate::printable(key)
    )]
    Invalid {
        key: String,
        value: String,
        expected: &'static str,
    },
    /// A file's value of a TOML type the key does not take (`log_dir = 5`): its TOML text
    /// is shown, not the text it would convert to, which could be valid (`"5"`).
    #[error(
        "{}: {value} is a TOML {kind}, which this key does not take; expected {expected}{}",
        crate::printable(key),
        if *.strings_only { ", given as a quoted string" } else { "" }
    )]
    WrongType {
        key: String,
        value: String,
        kind: &'static str,
        expected: &'static str,
        /// The key takes strings only (a path, a word), not numbers or switches.
        strings_only: bool,
    },
    #[error(
        "{}: unknown configuration key{} (known keys: {known})",
        crate::printable(key),
        match nearest { Some(k) => format!("; did you mean {k}?"), None => String::new() }
    )]
    Unknown {
        key: String,
        known: String,
        /// The known key it most likely meant, in the same spelling (`KVH_*` for a variable,
        /// the bare name in a file).
        nearest: Option<String>,
    },
    #[error("{}: {}", crate::printable(path), crate::printable(message))]
    File { path: String, message: String },
    /// A `KVH_*` variable whose name or value is not UTF-8. The value is never shown: raw
    /// bytes (a key put in a variable by mistake) must not reach a terminal or a log.
    #[error(
        "{}: not UTF-8 text (its name or its {bytes}-byte value, which is not shown); \
         expected UTF-8 text in the variable's name and value",
        crate::printable(name)
    )]
    NotText { name: String, bytes: usize },
    /// Keys valid one by one that together would silently lose a safeguard.
    #[error("{}", crate::printable(.0))]
    Conflict(String),
}

/// Refuses a policy variable (a key's `KVH_*` name, or `KVH_CONFIG`) the environment holds
/// twice with different values (an `execve` may pass any list): `getenv` reads the first
/// entry, a loop over the whole environment the last, and Python's `os.environ` the last too,
/// so the policy and other readers of the variable (a launcher, a wrapper script) could
/// disagree. Refused, as a key given twice in a policy file is.
fn refuse_repeated_variables(vars: &[(String, String)]) -> Result<(), ConfigError> {
    let policy = |name: &str| {
        name == "KVH_CONFIG" || (name.starts_with("KVH_") && !OTHER_ENV.contains(&name))
    };
    let mut seen: std::collections::HashMap<&str, &str> = std::collections::HashMap::new();
    for (name, value) in vars.iter().filter(|(n, _)| policy(n)) {
        match seen.insert(name.as_str(), value.as_str()) {
            Some(earlier) if earlier != value => {
                let times = vars.iter().filter(|(n, _)| n == name).count();
                // The values are not shown: a variable set by mistake may hold a secret.
                return Err(ConfigError::Conflict(format!(
                    "{name} is set {times} times in the environment, to different values: \
                     programs reading it may take different ones; set it once"
                )));
            }
            _ => {}
        }
    }
    Ok(())
}

/// One configuration key: its file name, its environment name, what it accepts, its setter.
struct Key {
    name: &'static str,
    expected: &'static str,
    set: fn(&mut Config, &str) -> Option<()>,
}

impl Key {
    fn env_name(&self) -> String {
        format!("KVH_{}", self.name.to_ascii_uppercase())
    }
}

macro_rules! key {
    ($name:literal, $expected:expr, |$c:ident, $v:ident| $body:expr) => {
        Key {
            name: $name,
            expected: $expected,
            set: |$c: &mut Config, $v: &str| -> Option<()> { $body },
        }
    };
}

/// What a switch key expects, in every spelling [`parse_bool`] reads (a TOML integer `1` or
/// `0` too, as the environment's text).
const SWITCH: &str = "true or false (on/off, yes/no and 1/0 alike)";

/// Whether a TOML value's type suits a key, from what the key expects: numbers as TOML
/// numbers (integers for integer keys), switches as booleans (or the integers 1 and 0), and any key as a string (the
/// text the environment gives it). Everything else (paths, words) takes strings only, so
/// that `log_dir = false` is refused rather than read as a directory named `false`.
fn toml_type_fits(expected: &str, value: &toml::Value) -> bool {
    match value {
        toml::Value::String(_) => true,
        toml::Value::Integer(_) => {
            expected.starts_with("an integer")
                || expected.starts_with("a number")
                || expected == SWITCH
        }
        toml::Value::Float(_) => expected.starts_with("a number"),
        toml::Value::Boolean(_) => expected == SWITCH,
        _ => false,
    }
}

/// Whether a key takes its value from a TOML string only (a path, a word): no TOML number
/// or boolean fits it (`toml_type_fits`).
fn takes_strings_only(expected: &str) -> bool {
    !(expected.starts_with("an integer") || expected.starts_with("a number") || expected == SWITCH)
}

/// Every key, in documentation order. The README's table lists the same keys.
const KEYS: &[Key] = &[
    key!("backend", "one of auto, host, cuda", |c, v| {
        c.backend = match word(v).as_str() {
            "auto" => BackendChoice::Auto,
            "host" => BackendChoice::Host,
            "cuda" => BackendChoice::Cuda,
            _ => return None,
        };
        Some(())
    }),
    key!("coverage_threshold", "a number in (0, 1]", |c, v| {
        c.coverage_threshold = parse_unit_interval(v)?;
        Some(())
    }),
    key!("verify_samples", "an integer in [2, 1048576]", |c, v| {
        c.verify_samples = parse_in(v, 2, 1 << 20)? as u32;
        Some(())
    }),
    key!("double_pass", SWITCH, |c, v| {
        c.double_pass = parse_bool(v)?;
        Some(())
    }),
    key!("full_verify", SWITCH, |c, v| {
        c.full_verify = parse_bool(v)?;
        Some(())
    }),
    key!("batch_size", "an integer in [1, 65536]", |c, v| {
        c.batch_size = parse_in(v, 1, 65_536)? as usize;
        Some(())
    }),
    key!(
        "batch_max_delay_us",
        "an integer in [0, 10000000] (microseconds)",
        |c, v| {
            c.batch_max_delay_us = parse_in(v, 0, 10_000_000)?;
            Some(())
        }
    ),
    key!(
        "idle_ttl_ms",
        "an integer (milliseconds; <= 0 means never reuse a block)",
        |c, v| {
            c.idle_ttl_ms = v.trim().parse().ok()?;
            Some(())
        }
    ),
    key!(
        "live_ttl_ms",
        "an integer >= 0 (milliseconds; 0 disables the check)",
        |c, v| {
            c.live_ttl_ms = parse_in(v, 0, u64::MAX)?;
            Some(())
        }
    ),
    key!(
        "max_reuse",
        "an integer in [0, 4294967295] (0 = unlimited)",
        |c, v| {
            c.max_reuse = parse_in(v, 0, u64::from(u32::MAX))? as u32;
            Some(())
        }
    ),
    key!("tenant_isolation", "one of off, strict", |c, v| {
        c.tenant_isolation = match word(v).as_str() {
            "off" => TenantIsolation::Off,
            "strict" => TenantIsolation::Strict,
            _ => return None,
        };
        Some(())
    }),
    key!("kv_gate", "one of off, scrub, enforce", |c, v| {
        c.kv_gate = match word(v).as_str() {
            "off" => KvGateMode::Off,
            "scrub" => KvGateMode::Scrub,
            "enforce" => KvGateMode::Enforce,
            _ => return None,
        };
        Some(())
    }),
    key!("kv_gate_scope", "one of request, tenant", |c, v| {
        c.kv_gate_scope = match word(v).as_str() {
            "request" => KvGateScope::Request,
            "tenant" => KvGateScope::Tenant,
            _ => return None,
        };
        Some(())
    }),
    key!("failure_mode", "one of quarantine, abort", |c, v| {
        c.failure_mode = match word(v).as_str() {
            "quarantine" => FailureMode::Quarantine,
            "abort" => FailureMode::Abort,
            _ => return None,
        };
        Some(())
    }),
    key!("oom", "one of throw, null", |c, v| {
        c.oom = match word(v).as_str() {
            "throw" => OomMode::Throw,
            "null" => OomMode::Null,
            _ => return None,
        };
        Some(())
    }),
    key!(
        "log_dir",
        "a directory path, without '..' after a directory name (its real path)",
        |c, v| {
            c.log.dir = dir_path(v)?;
            Some(())
        }
    ),
    key!(
        "log_max_bytes",
        "an integer in [4096, 2^30] (bytes)",
        |c, v| {
            c.log.max_bytes = parse_in(v, 4096, crate::forensic::files::MAX_LOG_BYTES)?;
            Some(())
        }
    ),
    key!("log_fsync", "one of always, interval, never", |c, v| {
        c.log.fsync = match word(v).as_str() {
            "always" => FsyncPolicy::Always,
            "interval" => FsyncPolicy::Interval,
            "never" => FsyncPolicy::Never,
            _ => return None,
        };
        Some(())
    }),
    key!(
        "log_fsync_interval_ms",
        "an integer in [1, 3600000] (milliseconds)",
        |c, v| {
            c.log.fsync_interval_ms = parse_in(v, 1, 3_600_000)?;
            Some(())
        }
    ),
    key!(
        "log_queue",
        "an integer in [16, 4194304] (records)",
        |c, v| {
            c.log.queue_capacity = parse_in(v, 16, LOG_QUEUE_MAX as u64)? as usize;
            Some(())
        }
    ),
    key!(
        "summary_interval_ms",
        "an integer in [100, 86400000] (milliseconds)",
        |c, v| {
            c.log.summary_interval_ms = parse_in(v, 100, 86_400_000)?;
            Some(())
        }
    ),
    key!("hmac_key_file", "a file path", |c, v| {
        c.log.hmac_key_file = file_path(v)?;
        Some(())
    }),
    key!(
        "signing_key_file",
        "a file path, the private key (kvh keygen's PREFIX.key, not PREFIX.pub)",
        |c, v| {
            c.log.signing_key_file = private_key_path(v)?;
            Some(())
        }
    ),
    key!(
        "checkpoint_dir",
        "a directory path, without '..' after a directory name (its real path)",
        |c, v| {
            c.log.checkpoint_dir = dir_path(v)?;
            Some(())
        }
    ),
    key!(
        "checkpoint_every",
        "an integer in [1, 2^32] (records)",
        |c, v| {
            c.log.checkpoint_every_records = parse_in(v, 1, 1 << 32)?;
            Some(())
        }
    ),
    key!(
        "checkpoint_interval_ms",
        "an integer in [100, 86400000] (milliseconds)",
        |c, v| {
            c.log.checkpoint_interval_ms = parse_in(v, 100, 86_400_000)?;
            Some(())
        }
    ),
    key!(
        "metrics_file",
        "a file path (e.g. /var/lib/node_exporter/textfile/kvh.prom; {pid} in the file name, not in a directory, is replaced by the process id)",
        |c, v| {
            c.metrics.file = metrics_file_path(v)?;
            Some(())
        }
    ),
    key!(
        "metrics_interval_ms",
        "an integer in [100, 3600000] (milliseconds)",
        |c, v| {
            c.metrics.interval_ms = parse_in(v, 100, 3_600_000)?;
            Some(())
        }
    ),
    key!(
        "metrics_addr",
        "an IP address and port, e.g. 127.0.0.1:9464 (no host names)",
        |c, v| {
            c.metrics.addr = Some(v.parse().ok()?);
            Some(())
        }
    ),
    key!("anomaly", SWITCH, |c, v| {
        c.anomaly.enabled = parse_bool(v)?;
        Some(())
    }),
    key!(
        "anomaly_window_ms",
        "an integer in [100, 3600000] (milliseconds)",
        |c, v| {
            c.anomaly.window_ms = parse_in(v, 100, 3_600_000)?;
            Some(())
        }
    ),
    key!("anomaly_z", "a number in [1, 100]", |c, v| {
        c.anomaly.z = parse_f64_in(v, 1.0, 100.0)?;
        Some(())
    }),
    key!("anomaly_burst_scale", "a number in [0.01, 1000]", |c, v| {
        c.anomaly.burst_scale = parse_f64_in(v, 0.01, 1000.0)?;
        Some(())
    }),
];

/// A TOML syntax error as one line: `line L, column C: message`.
fn toml_error(text: &str, e: &toml::de::Error) -> String {
    let Some(span) = e.span() else {
        return e.message().to_string();
    };
    let before = text.get(..span.start).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.chars().rev().take_while(|&c| c != '\n').count() + 1;
    let message = e.message().trim_end().replace('\n', "; ");
    // The parser gives no description where a value should begin and none does (`key =` at
    // the end of a line or of the file): say what is missing.
    let message = if message.is_empty() {
        "expected a value (a quoted string, a number or true/false)".to_string()
    } else {
        message
    };
    let hint = number_hint(text, span.start, &message).unwrap_or_default();
    format!("line {line}, column {column}: {message}{hint}")
}

/// For a number TOML cannot hold (beyond its 64-bit integers, or a float it cannot read, as
/// `1e400`), given at byte `at` of `text` to a known key (bare or quoted): the key, what it
/// accepts, and, for an integer above them, how to write it (as a string of its decimal
/// value, which every key takes).
fn number_hint(text: &str, at: usize, message: &str) -> Option<String> {
    let beyond_integers = message.contains("to fit in target type");
    if !beyond_integers && !message.contains("invalid floating-point number") {
        return None;
    }
    let start = text.get(..at)?.rfind('\n').map_or(0, |i| i + 1);
    // A key under a `[table]` is no policy key: whether the line is at the top level is asked
    // of the parser, with a key of its own put there (a `[` may open a line of a string).
    let probe = format!("{}\n\"kvh probe\" = 0\n", &text[..start]);
    if !probe
        .parse::<toml::Table>()
        .is_ok_and(|t| t.contains_key("kvh probe"))
    {
        return None;
    }
    let end = text.get(at..)?.find('\n').map_or(text.len(), |i| at + i);
    let (name, value) = text.get(start..end)?.split_once('=')?;
    let name = name.trim();
    let name = ['"', '\'']
        .iter()
        .find_map(|q| name.strip_prefix(*q).and_then(|n| n.strip_suffix(*q)))
        .unwrap_or(name);
    let key = KEYS.iter().find(|k| k.name == name)?;
    let accepts = format!("; {name} accepts {}", key.expected);
    // Suggested only when the key takes that value written as a string.
    let takes = |n: &u128| (key.set)(&mut Config::default(), &n.to_string()).is_some();
    let integer = toml_integer(value).filter(|_| beyond_integers);
    Some(match integer.filter(takes) {
        Some(n) => format!(
            "{accepts}: write a number beyond TOML's 64-bit integers as a string \
             ({name} = \"{n}\")"
        ),
        None => accepts,
    })
}

/// The value of a TOML integer literal at the start of `value` (decimal with `_` between
/// digits, or `0x`, `0o`, `0b`), when it is positive and fits 128 bits.
fn toml_integer(value: &str) -> Option<u128> {
    let value = value.trim_start();
    let value = value.strip_prefix('+').unwrap_or(value);
    let (radix, digits) = [("0x", 16), ("0o", 8), ("0b", 2)]
        .iter()
        .find_map(|(p, r)| value.strip_prefix(p).map(|d| (*r, d)))
        .unwrap_or((10, value));
    let literal: String = digits
        .chars()
        .take_while(|c| c.is_digit(radix) || *c == '_')
        .filter(|c| *c != '_')
        .collect();
    u128::from_str_radix(&literal, radix).ok()
}

/// What `KVH_PRELOAD` asks of the LD_PRELOAD interposers (`preload/`), read by them and by
/// `kvh config`. Not a policy key: it decides whether the policy applies at all.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PreloadSwitch {
    /// Unset or `on` (or another spelling of a true switch): kvhygiene serves device
    /// allocations.
    Serve,
    /// `off` (or another spelling of a false switch): every call goes to the real runtime
    /// unchanged (no scrub).
    Forward,
    /// Any other value, or not UTF-8: allocations fail (fail closed).
    Refuse,
}

/// The environment variable of [`PreloadSwitch`].
pub const PRELOAD_ENV: &str = "KVH_PRELOAD";

impl PreloadSwitch {
    /// The switch for the variable's value (`None`: unset), read as every switch is
    /// (`on`/`off`, `true`/`false`, `yes`/`no`, `1`/`0`, any case), surrounding blanks
    /// ignored. A manifest that spells it as its other switches must not find every CUDA
    /// allocation failing; a value that is no switch (a path, `of`, empty) still does.
    pub fn parse(value: Option<&std::ffi::OsStr>) -> PreloadSwitch {
        let Some(v) = value else {
            return PreloadSwitch::Serve;
        };
        match v.to_str().map(str::trim).and_then(parse_bool) {
            Some(true) => PreloadSwitch::Serve,
            Some(false) => PreloadSwitch::Forward,
            None => PreloadSwitch::Refuse,
        }
    }
}

/// Environment variables with the `KVH_` prefix that are not policy keys.
/// `KVH_LIBRARY` is read by the Python package to find the library, not by the library.
/// `KVH_PRELOAD` is read by the LD_PRELOAD interposers (`preload/`), not by the policy.
const OTHER_ENV: &[&str] = &["KVH_CONFIG", "KVH_LIBRARY", "KVH_PRELOAD"];

/// Where a key's value came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Default,
    /// The TOML file named by `KVH_CONFIG`.
    File,
    /// A `KVH_*` environment variable (which wins over the file).
    Env,
}

/// One key of a loaded policy: its names, its value and where the value came from.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Setting {
    pub key: &'static str,
    pub env: String,
    /// The value as [`Config::canonical_json`] holds it (`null`: unset).
    pub value: serde_json::Value,
    pub source: Source,
    pub accepted: &'static str,
}

/// The `KVH_*` environment variables of this process, every one as UTF-8 text.
///
/// A policy variable (or `KVH_CONFIG`) whose name or value is not UTF-8 is an error, not
/// skipped: a log directory named in other bytes must not leave the process running without
/// a log. The variables other readers own (`KVH_LIBRARY`, `KVH_PRELOAD`) are left to them.
pub fn env_vars() -> Result<Vec<(String, String)>, ConfigError> {
    let mut vars = Vec::new();
    // Only the `KVH_*` entries are copied: not the HMAC secret (`environ`).
    for (name, value) in environ::vars_with_prefix(b"KVH_") {
        // Their readers judge these (`KVH_LIBRARY`: the Python package; `KVH_PRELOAD`: the
        // interposers), whatever their bytes.
        if name == "KVH_LIBRARY" || name == PRELOAD_ENV {
            continue;
        }
        match (name.into_string(), value.into_string()) {
            (Ok(name), Ok(value)) => vars.push((name, value)),
            (name, value) => {
                let name = match name {
                    Ok(s) => s,
                    Err(os) => os.to_string_lossy().into_owned(),
                };
                let bytes = match value {
                    Ok(s) => s.len(),
                    Err(os) => os.len(),
                };
                return Err(ConfigError::NotText { name, bytes });
            }
        }
    }
    Ok(vars)
}

/// The key [`Config::explain_file`]'s error names for a blank path.
pub(crate) const BLANK_POLICY_PATH: &str = "the policy file's path";

impl Config {
    /// The policy of this process: `KVH_CONFIG`'s file (if set), then `KVH_*` variables.
    pub fn from_env() -> Result<Config, ConfigError> {
        Config::from_vars(&env_vars()?)
    }

    /// As [`Config::from_env`], from an explicit variable list (tests, embedding).
    pub fn from_vars(vars: &[(String, String)]) -> Result<Config, ConfigError> {
        Ok(Config::load(vars)?.0)
    }

    /// As [`Config::from_vars`], with every key's value and its source (`kvh config`).
    pub fn explain(vars: &[(String, String)]) -> Result<(Config, Vec<Setting>), ConfigError> {
        let (config, file_keys) = Config::load(vars)?;
        let from_env = |k: &Key| vars.iter().any(|(name, _)| *name == k.env_name());
        let settings = settings(&config, |k| {
            if from_env(k) {
                Source::Env
            } else if file_keys.contains(&k.name) {
                Source::File
            } else {
                Source::Default
            }
        });
        Ok((config, settings))
    }

    /// The policy of a TOML file alone, as a process whose only variable is `KVH_CONFIG`
    /// naming it would run with, with every key's value and its source (`kvh config --file`).
    pub fn explain_file(path: &Path) -> Result<(Config, Vec<Setting>), ConfigError> {
        // Exactly the library's loading, with nothing else in the environment.
        let name = path.to_str().ok_or_else(|| ConfigError::File {
            path: path.display().to_string(),
            message: "the path is not UTF-8 (KVH_CONFIG could not name it)".into(),
        })?;
        // Refused here: the loading below would blame `KVH_CONFIG`, which the caller did not
        // set.
        if name.trim().is_empty() {
            return Err(ConfigError::Invalid {
                key: BLANK_POLICY_PATH.into(),
                value: name.to_string(),
                expected: "the path of a TOML policy file",
            });
        }
        // A file that cannot be read or parsed is named as given: `KVH_CONFIG=` would send
        // its reader to look for a variable nobody set.
        Config::explain(&[("KVH_CONFIG".to_string(), name.to_string())]).map_err(|e| match e {
            ConfigError::File { message, .. } => ConfigError::File {
                path: path.display().to_string(),
                message,
            },
            other => other,
        })
    }

    /// The policy and the names of the keys its file set.
    fn load(vars: &[(String, String)]) -> Result<(Config, Vec<&'static str>), ConfigError> {
        refuse_repeated_variables(vars)?;
        let (mut config, file_keys) = match vars.iter().find(|(k, _)| k == "KVH_CONFIG") {
            // Set but empty, as `KVH_CONFIG=$POLICY` leaves it when POLICY is unset: the
            // policy that file holds must not give way to the defaults unseen.
            Some((_, path)) if path.trim().is_empty() => {
                return Err(ConfigError::Invalid {
                    key: "KVH_CONFIG".into(),
                    value: path.clone(),
                    expected: "the path of a TOML policy file (unset the variable for none)",
                })
            }
            // A file that cannot be read or parsed is named as the variable that named it,
            // quoted (a stray space in a deployment's value shows), so that its reader knows
            // where the path was set.
            Some((_, path)) => Config::read_file(Path::new(path)).map_err(|e| match e {
                ConfigError::File { message, .. } => ConfigError::File {
                    path: format!("KVH_CONFIG={path:?}"),
                    message,
                },
                other => other,
            })?,
            None => (Config::default(), Vec::new()),
        };
        for (name, value) in vars {
            if !name.starts_with("KVH_") || OTHER_ENV.contains(&name.as_str()) {
                continue;
            }
            let key = KEYS.iter().find(|k| k.env_name() == *name).ok_or_else(|| {
                ConfigError::Unknown {
                    key: crate::printable(name),
                    known: known_keys(|k| k.env_name()),
                    nearest: nearest_key(name)
                        .map(Key::env_name)
                        .or_else(|| nearest_other_variable(name)),
                }
            })?;
            config.set(key, name, value)?;
        }
        config.check_combination()?;
        Ok((config, file_keys))
    }

    /// Refuses settings that are each valid but together do not do what they ask for.
    /// [`Config::from_vars`] calls it; a caller that changes the configuration afterwards
    /// (`kvh demo --log-dir`) calls it again.
    pub fn check_combination(&self) -> Result<(), ConfigError> {
        // Checkpoints belong to a log: without one, the key is inert, not a lost safeguard.
        let logging = self.log.dir.is_some();
        if logging && self.log.checkpoint_dir.is_some() && self.log.signing_key_file.is_none() {
            return Err(ConfigError::Conflict(
                "checkpoint_dir (KVH_CHECKPOINT_DIR) is set but signing_key_file \
                 (KVH_SIGNING_KEY_FILE) is not: checkpoints are signed, so none would be \
                 written (set both, or neither)"
                    .into(),
            ));
        }
        self.refuse_one_path_for_two_jobs()
    }

    /// Refuses two path keys that name one path as written (`a/b/` and `a/./b` are `a/b`):
    /// a clash the policy alone shows, refused here so that `kvh config` names it, before a
    /// start-up finds it. What only the file system shows (links, `..`, a copy of one key as
    /// the other) is refused where the files are opened.
    fn refuse_one_path_for_two_jobs(&self) -> Result<(), ConfigError> {
        use PathJob::*;
        let paths = [
            (
                HmacKey,
                "hmac_key_file (KVH_HMAC_KEY_FILE)",
                &self.log.hmac_key_file,
            ),
            (
                SigningKey,
                "signing_key_file (KVH_SIGNING_KEY_FILE)",
                &self.log.signing_key_file,
            ),
            (
                Metrics,
                "metrics_file (KVH_METRICS_FILE)",
                &self.metrics.file,
            ),
            (LogDir, "log_dir (KVH_LOG_DIR)", &self.log.dir),
            (
                CheckpointDir,
                "checkpoint_dir (KVH_CHECKPOINT_DIR)",
                &self.log.checkpoint_dir,
            ),
        ];
        for (i, (job_a, first, a)) in paths.iter().enumerate() {
            for (job_b, second, b) in &paths[i + 1..] {
                let (Some(a), Some(b)) = (a, b) else { continue };
                // Checkpoints kept in the log's own directory: where they go by default.
                let both_dirs = (*job_a, *job_b) == (LogDir, CheckpointDir);
                if both_dirs || !a.components().eq(b.components()) {
                    continue;
                }
                let why = match (job_a, job_b) {
                    (HmacKey, SigningKey) => {
                        "the HMAC secret must be a secret of its own: whoever holds it to check \
                         the log's MACs could sign its checkpoints"
                    }
                    (Metrics, _) | (_, Metrics) => {
                        "each needs its own (the metrics file is replaced at every write)"
                    }
                    _ => {
                        "each needs its own (a key file is read whole, and the log writes its \
                         directories)"
                    }
                };
                return Err(ConfigError::Conflict(format!(
                    "{first} and {second} name one path, {}: {why}",
                    a.display()
                )));
            }
        }
        Ok(())
    }

    /// Reads a TOML file of `key = value` pairs (file key names, e.g. `batch_size = 32`), and
    /// refuses it as [`Config::from_vars`] would ([`Config::check_combination`]).
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let config = Config::read_file(path)?.0;
        config.check_combination()?;
        Ok(config)
    }

    /// The `oom` mode a policy file sets, read key by key without judging the file as a whole
    /// policy (the environment may complete it): what a failed allocation does when the
    /// environment's policy is invalid. `None` when the file does not read or sets no `oom`.
    pub fn oom_of_file(path: &Path) -> Option<OomMode> {
        let bytes = read_regular_file(path, MAX_POLICY_BYTES, "a policy file").ok()?;
        let table: toml::Table = std::str::from_utf8(&bytes).ok()?.parse().ok()?;
        let text = table.get("oom")?.as_str()?;
        let key = KEYS.iter().find(|k| k.name == "oom")?;
        let mut config = Config::default();
        config.set(key, "oom", text).ok()?;
        Some(config.oom)
    }

    /// As [`Config::from_file`], with the names of the keys the file set.
    fn read_file(path: &Path) -> Result<(Config, Vec<&'static str>), ConfigError> {
        let file_err = |message: String| ConfigError::File {
            path: path.display().to_string(),
            message,
        };
        let bytes = read_regular_file(path, MAX_POLICY_BYTES, "a policy file")
            .map_err(|e| file_err(format!("cannot read the policy file: {e}")))?;
        let text = String::from_utf8(bytes).map_err(|_| file_err("not UTF-8 text".into()))?;
        Config::parse_toml(&text).map_err(|e| match e {
            ConfigError::File { message, .. } => file_err(message),
            ConfigError::Invalid {
                key,
                value,
                expected,
            } => ConfigError::Invalid {
                key: format!("{key} (in {})", path.display()),
                value,
                expected,
            },
            ConfigError::WrongType {
                key,
                value,
                kind,
                expected,
                strings_only,
            } => ConfigError::WrongType {
                key: format!("{key} (in {})", path.display()),
                value,
                kind,
                expected,
                strings_only,
            },
            ConfigError::Unknown {
                key,
                known,
                nearest,
            } => ConfigError::Unknown {
                key: format!("{key} (in {})", path.display()),
                known,
                nearest,
            },
            other => other,
        })
    }

    /// Parses TOML text (see [`Config::from_file`]).
    pub fn from_toml_str(text: &str) -> Result<Config, ConfigError> {
        let config = Config::parse_toml(text)?.0;
        config.check_combination()?;
        Ok(config)
    }

    /// As [`Config::from_toml_str`], with the names of the keys the text set.
    fn parse_toml(text: &str) -> Result<(Config, Vec<&'static str>), ConfigError> {
        let table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| ConfigError::File {
                path: "<config>".into(),
                message: toml_error(text, &e),
            })?;
        let mut config = Config::default();
        let mut set_keys = Vec::with_capacity(table.len());
        for (name, value) in &table {
            let key = KEYS
                .iter()
                .find(|k| k.name == name)
                .ok_or_else(|| ConfigError::Unknown {
                    // Shown on a terminal: the file's author chose these characters.
                    key: crate::printable(name),
                    known: known_keys(|k| k.name.to_string()),
                    nearest: nearest_key(name).map(|k| k.name.to_string()),
                })?;
            let text = match value {
                _ if !toml_type_fits(key.expected, value) => {
                    return Err(ConfigError::WrongType {
                        key: name.clone(),
                        value: value.to_string(),
                        kind: value.type_str(),
                        expected: key.expected,
                        strings_only: takes_strings_only(key.expected),
                    })
                }
                toml::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            config.set(key, name, &text)?;
            set_keys.push(key.name);
        }
        Ok((config, set_keys))
    }

    fn set(&mut self, key: &Key, shown_name: &str, value: &str) -> Result<(), ConfigError> {
        (key.set)(self, value.trim()).ok_or_else(|| ConfigError::Invalid {
            key: shown_name.to_string(),
            value: value.to_string(),
            expected: key.expected,
        })
    }

    /// Whether freed blocks may be handed out again at all.
    pub fn reuse_enabled(&self) -> bool {
        self.idle_ttl_ms > 0
    }

    /// Stable JSON of the whole policy (for the forensic `start` record's digest).
    pub fn canonical_json(&self) -> String {
        // Serialising plain data with derived impls cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// `(file key, environment variable, accepted values)` of every key, for docs and `--help`.
    pub fn keys() -> impl Iterator<Item = (&'static str, String, &'static str)> {
        KEYS.iter().map(|k| (k.name, k.env_name(), k.expected))
    }
}

/// Keys whose value is not at `/<key>` in the policy's JSON ([`Config::canonical_json`]).
const FIELDS: &[(&str, &str)] = &[
    ("log_dir", "/log/dir"),
    ("log_max_bytes", "/log/max_bytes"),
    ("log_fsync", "/log/fsync"),
    ("log_fsync_interval_ms", "/log/fsync_interval_ms"),
    ("log_queue", "/log/queue_capacity"),
    ("summary_interval_ms", "/log/summary_interval_ms"),
    ("hmac_key_file", "/log/hmac_key_file"),
    ("signing_key_file", "/log/signing_key_file"),
    ("checkpoint_dir", "/log/checkpoint_dir"),
    ("checkpoint_every", "/log/checkpoint_every_records"),
    ("checkpoint_interval_ms", "/log/checkpoint_interval_ms"),
    ("metrics_file", "/metrics/file"),
    ("metrics_interval_ms", "/metrics/interval_ms"),
    ("metrics_addr", "/metrics/addr"),
    ("anomaly", "/anomaly/enabled"),
    ("anomaly_window_ms", "/anomaly/window_ms"),
    ("anomaly_z", "/anomaly/z"),
    ("anomaly_burst_scale", "/anomaly/burst_scale"),
];

/// Where `key`'s value sits in the policy's JSON, as a JSON pointer.
fn field_of(key: &str) -> String {
    match FIELDS.iter().find(|(k, _)| *k == key) {
        Some((_, pointer)) => (*pointer).to_string(),
        None => format!("/{key}"),
    }
}

/// Every key of `config` in documentation order, its source given by `source`.
fn settings(config: &Config, source: impl Fn(&Key) -> Source) -> Vec<Setting> {
    // Plain data with derived impls: serialising cannot fail.
    let json = serde_json::to_value(config).unwrap_or_default();
    KEYS.iter()
        .map(|k| Setting {
            key: k.name,
            env: k.env_name(),
            value: json.pointer(&field_of(k.name)).cloned().unwrap_or_default(),
            source: source(k),
            accepted: k.expected,
        })
        .collect()
}

fn known_keys(name: impl Fn(&Key) -> String) -> String {
    KEYS.iter().map(name).collect::<Vec<_>>().join(", ")
}

/// The key an unknown `name` most likely meant, so that a typo that stops a server's start
/// names its fix: the key itself in the other spelling (`KVH_BATCH_SIZE` written in a file,
/// `batch_size` as a variable), else the key nearest by edit distance (strsim's
/// Damerau-Levenshtein: a swap of two letters is one edit) when at most a third of its
/// letters differ. The name is compared with and without a `KVH_` prefix (`kvh_gate` is
/// `kv_gate` mistyped, not `gate`); of keys as near, the one nearest with the separators
/// left out (`KVH_ANOMALYZ` is `anomaly_z`, not `anomaly`), then the first. `None` for a name
/// like no key.
fn nearest_key(name: &str) -> Option<&'static Key> {
    let lower = name.to_ascii_lowercase();
    let spellings = [lower.strip_prefix("kvh_").unwrap_or(&lower), lower.as_str()];
    let joined = |s: &str| s.replace(['_', '-'], "");
    KEYS.iter()
        .filter_map(|k| {
            let d = spellings
                .iter()
                .map(|s| strsim::damerau_levenshtein(s, k.name))
                .min()?;
            let without_separators = spellings
                .iter()
                .map(|s| strsim::damerau_levenshtein(&joined(s), &joined(k.name)))
                .min()?;
            (d <= (k.name.len() / 3).max(1)).then_some(((d, without_separators), k))
        })
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, k)| k)
}

/// The variable of [`OTHER_ENV`] (`KVH_CONFIG`, ...) a name that is no policy key most likely
/// meant (`KVH_CONFG`), by the rule of [`nearest_key`].
fn nearest_other_variable(name: &str) -> Option<String> {
    let name = name.to_ascii_uppercase();
    OTHER_ENV
        .iter()
        .map(|v| (strsim::damerau_levenshtein(&name, v), v))
        .filter(|(d, v)| *d <= (v.len() / 3).max(1))
        .min_by_key(|(d, _)| *d)
        .map(|(_, v)| v.to_string())
}

fn parse_in(v: &str, min: u64, max: u64) -> Option<u64> {
    let n: u64 = v.trim().parse().ok()?;
    (min..=max).contains(&n).then_some(n)
}

/// A number in (0, 1].
fn parse_unit_interval(v: &str) -> Option<f64> {
    let x: f64 = v.trim().parse().ok()?;
    (x.is_finite() && x > 0.0 && x <= 1.0).then_some(x)
}

/// A finite number in `[min, max]` (NaN and infinities are refused: they would disable or
/// break every comparison made with the value).
fn parse_f64_in(v: &str, min: f64, max: f64) -> Option<f64> {
    let x: f64 = v.trim().parse().ok()?;
    (x.is_finite() && (min..=max).contains(&x)).then_some(x)
}

/// What a path key of the policy is for ([`Config::check_combination`]'s clash check).
#[derive(Clone, Copy, PartialEq, Eq)]
enum PathJob {
    HmacKey,
    SigningKey,
    Metrics,
    LogDir,
    CheckpointDir,
}

/// A word value (`host`, `null`, `abort`, ...) as the keys compare it: case does not matter,
/// as for switches (`KVH_OOM=NULL` is `null`, not an invalid policy that falls back to
/// throwing).
fn word(v: &str) -> String {
    v.to_ascii_lowercase()
}

fn parse_bool(v: &str) -> Option<bool> {
    match v.to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Some(true),
        "0" | "false" | "no" | "off" => Some(false),
        _ => None,
    }
}

/// A path: non-empty and without a NUL character, which no file name can hold (a TOML
/// string can: `\u0000`), so that such a value fails here, naming its key, and not when the
/// file is first opened.
fn non_empty_path(v: &str) -> Option<Option<PathBuf>> {
    (!v.is_empty() && !v.contains('\0')).then(|| Some(one_spelling(v)))
}

/// The path `v` names, spelled one way: without repeated or trailing separators and `.`
/// components (a leading `./` included when more follows), as `Path::components` reads it
/// and the files are opened. Spellings of one path are one policy, with one digest: a
/// trailing slash in a deployment's value is no policy drift.
fn one_spelling(v: &str) -> PathBuf {
    path_in_one_spelling(Path::new(v))
}

/// The spelling the policy gives a path (without repeated or trailing separators and `.`
/// components), for a path given elsewhere than in the policy (a command-line flag that
/// stands in for a policy key, as `kvh demo --log-dir` does for `KVH_LOG_DIR`): the policy
/// it makes has the digest the same path given to the key would give.
pub fn path_in_one_spelling(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut parts: Vec<Component<'_>> = path.components().collect();
    if parts.len() > 1 && parts[0] == Component::CurDir {
        parts.remove(0);
    }
    parts.iter().collect()
}

/// A directory the log creates ([`non_empty_path`]) named without `..` after a directory
/// name (`logs/x/../kvh`), which the log refuses when it opens (creating `x` would make
/// `x/..` name a directory that already existed): refused here too, naming the key.
fn dir_path(v: &str) -> Option<Option<PathBuf>> {
    use std::path::Component;
    let path = non_empty_path(v)??;
    let mut named = false;
    for c in path.components() {
        match c {
            Component::Normal(_) => named = true,
            Component::ParentDir if named => return None,
            _ => {}
        }
    }
    Some(Some(path))
}

/// The signing key's file: a path ([`non_empty_path`]) that is not a `.pub` file, which is
/// `kvh keygen`'s public key (the log refuses it when it opens: refused here too, naming the
/// key).
fn private_key_path(v: &str) -> Option<Option<PathBuf>> {
    let path = file_path(v)??;
    let public = path.extension().is_some_and(|e| e == "pub");
    (!public).then_some(Some(path))
}

/// A path naming a file, not a directory: a path ([`non_empty_path`]) whose last component,
/// as written, is not empty, `.` or `..` (`key/` names a directory, which no file is; the
/// spelling [`one_spelling`] keeps would drop the slash and read the file).
fn file_path(v: &str) -> Option<Option<PathBuf>> {
    non_empty_path(v).filter(|_| names_a_file(Path::new(v)))
}

/// Whether `p`'s last component, as written, names a file: not empty (a trailing `/`), `.`
/// or `..`. (`Path::file_name` reads `dir/` and `dir/.` as the file `dir`.) The rule of the
/// policy's file paths, and of the verbs' file arguments that stand for them.
pub fn names_a_file(p: &Path) -> bool {
    let bytes = p.as_os_str().as_bytes();
    let last = bytes.rsplit(|&b| b == b'/').next().unwrap_or(bytes);
    !matches!(last, b"" | b"." | b"..")
}

/// The metrics file: a [`file_path`], since the exporter writes a temporary file beside it
/// and renames it there. [`PID_PLACEHOLDER`] is taken in that last component only: the
/// exporter creates files, not directories, and the verbs that read per-process files look
/// for them in one directory.
fn metrics_file_path(v: &str) -> Option<Option<PathBuf>> {
    let dir = v.rsplit_once('/').map_or("", |(dir, _)| dir);
    file_path(v).filter(|_| !dir.contains(PID_PLACEHOLDER))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `(name, value)` pairs as the variable list `Config::from_vars` takes.
    pub(super) fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn a_policy_variable_held_twice_with_different_values_is_refused() {
        let refused = |pairs: &[(&str, &str)]| match Config::from_vars(&vars(pairs)) {
            Err(ConfigError::Conflict(m)) => Some(m),
            _ => None,
        };
        let m = refused(&[("KVH_BATCH_SIZE", "8"), ("KVH_BATCH_SIZE", "16")]).unwrap();
        assert!(m.starts_with("KVH_BATCH_SIZE is set 2 times"), "{m}");
        assert!(refused(&[("KVH_CONFIG", "/a.toml"), ("KVH_CONFIG", "")]).is_some());
        // The same value twice: every reader reads it.
        assert!(
            Config::from_vars(&vars(&[("KVH_BATCH_SIZE", "8"), ("KVH_BATCH_SIZE", "8")])).is_ok()
        );
        // Not policy variables: the interposer's switch and the Python package's library path.
        for name in ["KVH_PRELOAD", "KVH_LIBRARY"] {
            assert!(
                Config::from_vars(&vars(&[(name, "a"), (name, "b")])).is_ok(),
                "{name}"
            );
        }
    }

    #[test]
    fn word_values_are_read_whatever_their_case_as_switches_are() {
        let c = Config::from_vars(&vars(&[
            ("KVH_OOM", "NULL"),
            ("KVH_BACKEND", "Host"),
            ("KVH_FAILURE_MODE", "ABORT"),
            ("KVH_TENANT_ISOLATION", "Off"),
            ("KVH_KV_GATE", "Enforce"),
            ("KVH_KV_GATE_SCOPE", "TENANT"),
            ("KVH_LOG_FSYNC", "Never"),
            ("KVH_FULL_VERIFY", "TRUE"),
        ]))
        .unwrap();
        assert_eq!(c.oom, OomMode::Null);
        assert_eq!(c.backend, BackendChoice::Host);
        assert_eq!(c.failure_mode, FailureMode::Abort);
        assert_eq!(c.tenant_isolation, TenantIsolation::Off);
        assert_eq!(c.kv_gate, KvGateMode::Enforce);
        assert_eq!(c.kv_gate_scope, KvGateScope::Tenant);
        assert_eq!(c.log.fsync, FsyncPolicy::Never);
        assert!(c.full_verify);
        assert_eq!(invalid_key(&[("KVH_OOM", "nul")]), "KVH_OOM");
    }

    fn invalid_key(pairs: &[(&str, &str)]) -> String {
        match Config::from_vars(&vars(pairs)) {
            Err(ConfigError::Invalid { key, .. }) => key,
            other => panic!("expected an invalid-value error, got {other:?}"),
        }
    }

    /// The JSON pointers of every leaf (non-object value) of `v`.
    fn leaves(v: &serde_json::Value, at: String, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, child) in m {
                    leaves(child, format!("{at}/{k}"), out);
                }
            }
            _ => out.push(at),
        }
    }

    #[test]
    fn every_field_of_the_policy_is_exactly_one_keys_value() {
        let json = serde_json::to_value(Config::default()).unwrap();
        let mut fields = Vec::new();
        leaves(&json, String::new(), &mut fields);
        let mut pointers: Vec<String> = KEYS.iter().map(|k| field_of(k.name)).collect();
        for p in &pointers {
            assert!(
                json.pointer(p).is_some(),
                "{p} is not a field of the policy"
            );
        }
        fields.sort();
        pointers.sort();
        assert_eq!(fields, pointers, "fields and keys differ");
        for (key, _) in FIELDS {
            assert!(
                KEYS.iter().any(|k| k.name == *key),
                "FIELDS names {key}, no key"
            );
        }
    }

    #[test]
    fn settings_show_each_keys_value_as_set() {
        let (_, settings) = Config::explain(&vars(&[
            ("KVH_LOG_QUEUE", "32"),
            ("KVH_ANOMALY", "off"),
            ("KVH_METRICS_ADDR", "127.0.0.1:9464"),
        ]))
        .unwrap();
        let value = |k: &str| settings.iter().find(|s| s.key == k).unwrap().value.clone();
        assert_eq!(value("log_queue"), serde_json::json!(32));
        assert_eq!(value("anomaly"), serde_json::json!(false));
        assert_eq!(value("metrics_addr"), serde_json::json!("127.0.0.1:9464"));
        assert_eq!(value("log_dir"), serde_json::Value::Null);
        assert_eq!(settings.len(), KEYS.len());
    }

    #[test]
    fn defaults_are_the_documented_safe_ones() {
        let c = Config::from_vars(&[]).unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.coverage_threshold, 0.999);
        assert_eq!(c.tenant_isolation, TenantIsolation::Strict);
        assert_eq!(c.kv_gate, KvGateMode::Scrub);
        assert_eq!(c.kv_gate_scope, KvGateScope::Request);
        assert_eq!(c.failure_mode, FailureMode::Quarantine);
        assert!(c.reuse_enabled());
    }

    #[test]
    fn env_values_are_applied() {
        let c = Config::from_vars(&vars(&[
            ("KVH_BACKEND", "host"),
            ("KVH_COVERAGE_THRESHOLD", "1"),
            ("KVH_VERIFY_SAMPLES", "128"),
            ("KVH_DOUBLE_PASS", "yes"),
            ("KVH_IDLE_TTL_MS", "-1"),
            ("KVH_TENANT_ISOLATION", "off"),
            ("KVH_KV_GATE", "enforce"),
            ("KVH_KV_GATE_SCOPE", "tenant"),
            ("KVH_FAILURE_MODE", "abort"),
            ("KVH_LOG_DIR", "/var/log/kvh"),
            ("PATH", "/usr/bin"),
        ]))
        .unwrap();
        assert_eq!(c.backend, BackendChoice::Host);
        assert_eq!(c.coverage_threshold, 1.0);
        assert_eq!(c.verify_samples, 128);
        assert!(c.double_pass);
        assert!(!c.reuse_enabled());
        assert_eq!(c.tenant_isolation, TenantIsolation::Off);
        assert_eq!(c.kv_gate, KvGateMode::Enforce);
        assert_eq!(c.kv_gate_scope, KvGateScope::Tenant);
        assert_eq!(c.failure_mode, FailureMode::Abort);
        assert_eq!(c.log.dir.as_deref(), Some(Path::new("/var/log/kvh")));
    }

    #[test]
    fn out_of_range_numbers_name_the_key() {
        assert_eq!(
            invalid_key(&[("KVH_COVERAGE_THRESHOLD", "0")]),
            "KVH_COVERAGE_THRESHOLD"
        );
        assert_eq!(
            invalid_key(&[("KVH_COVERAGE_THRESHOLD", "1.5")]),
            "KVH_COVERAGE_THRESHOLD"
        );
        assert_eq!(
            invalid_key(&[("KVH_COVERAGE_THRESHOLD", "NaN")]),
            "KVH_COVERAGE_THRESHOLD"
        );
        assert_eq!(
            invalid_key(&[("KVH_VERIFY_SAMPLES", "1")]),
            "KVH_VERIFY_SAMPLES"
        );
        assert_eq!(invalid_key(&[("KVH_BATCH_SIZE", "0")]), "KVH_BATCH_SIZE");
        assert_eq!(
            invalid_key(&[("KVH_LOG_MAX_BYTES", "10")]),
            "KVH_LOG_MAX_BYTES"
        );
    }

    #[test]
    fn malformed_values_name_the_key_and_range() {
        let err = Config::from_vars(&vars(&[("KVH_BATCH_SIZE", "lots")])).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("KVH_BATCH_SIZE") && msg.contains("[1, 65536]"),
            "{msg}"
        );
        assert_eq!(
            invalid_key(&[("KVH_DOUBLE_PASS", "maybe")]),
            "KVH_DOUBLE_PASS"
        );
        assert_eq!(invalid_key(&[("KVH_LIVE_TTL_MS", "-5")]), "KVH_LIVE_TTL_MS");
        assert_eq!(
            invalid_key(&[("KVH_IDLE_TTL_MS", "soon")]),
            "KVH_IDLE_TTL_MS"
        );
    }

    #[test]
    fn unknown_enum_words_are_refused() {
        assert_eq!(invalid_key(&[("KVH_BACKEND", "rocm")]), "KVH_BACKEND");
        assert_eq!(
            invalid_key(&[("KVH_TENANT_ISOLATION", "loose")]),
            "KVH_TENANT_ISOLATION"
        );
        assert_eq!(invalid_key(&[("KVH_KV_GATE", "warn")]), "KVH_KV_GATE");
        assert_eq!(
            invalid_key(&[("KVH_KV_GATE_SCOPE", "model")]),
            "KVH_KV_GATE_SCOPE"
        );
        assert_eq!(
            invalid_key(&[("KVH_FAILURE_MODE", "ignore")]),
            "KVH_FAILURE_MODE"
        );
        assert_eq!(
            invalid_key(&[("KVH_LOG_FSYNC", "sometimes")]),
            "KVH_LOG_FSYNC"
        );
    }

    #[test]
    fn misspelt_env_key_is_an_error() {
        let err = Config::from_vars(&vars(&[("KVH_COVERAGE_THRESHHOLD", "0.5")])).unwrap_err();
        assert!(
            matches!(err, ConfigError::Unknown { ref key, .. } if key == "KVH_COVERAGE_THRESHHOLD")
        );
    }

    #[test]
    fn preload_switch_is_not_a_policy_key() {
        // Read by the LD_PRELOAD interposers; the policy must not refuse to start over it.
        assert!(Config::from_vars(&vars(&[("KVH_PRELOAD", "off")])).is_ok());
    }

    #[test]
    fn file_values_and_env_override() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kvh.toml");
        std::fs::write(
            &path,
            "batch_size = 32\ndouble_pass = true\nbackend = \"host\"\n",
        )
        .unwrap();
        let c = Config::from_vars(&vars(&[
            ("KVH_CONFIG", path.to_str().unwrap()),
            ("KVH_BATCH_SIZE", "8"),
        ]))
        .unwrap();
        assert_eq!(c.batch_size, 8);
        assert!(c.double_pass);
        assert_eq!(c.backend, BackendChoice::Host);
    }

    #[test]
    fn metrics_keys_are_off_by_default_and_validated() {
        let c = Config::from_vars(&[]).unwrap();
        assert_eq!(c.metrics, MetricsConfig::default());
        assert!(c.metrics.file.is_none() && c.metrics.addr.is_none());
        assert_eq!(c.metrics.interval_ms, 10_000);
        let c = Config::from_vars(&vars(&[
            ("KVH_METRICS_FILE", "/var/lib/node_exporter/kvh.prom"),
            ("KVH_METRICS_INTERVAL_MS", "500"),
            ("KVH_METRICS_ADDR", "127.0.0.1:9464"),
        ]))
        .unwrap();
        assert_eq!(
            c.metrics.file.as_deref(),
            Some(Path::new("/var/lib/node_exporter/kvh.prom"))
        );
        assert_eq!(c.metrics.interval_ms, 500);
        assert_eq!(c.metrics.addr, Some("127.0.0.1:9464".parse().unwrap()));
        for bad in ["99", "3600001", "often", "-1"] {
            assert_eq!(
                invalid_key(&[("KVH_METRICS_INTERVAL_MS", bad)]),
                "KVH_METRICS_INTERVAL_MS",
                "{bad}"
            );
        }
        for bad in [
            "localhost:9464",
            "127.0.0.1",
            "9464",
            "[::1]",
            "127.0.0.1:99999",
        ] {
            assert_eq!(
                invalid_key(&[("KVH_METRICS_ADDR", bad)]),
                "KVH_METRICS_ADDR",
                "{bad}"
            );
        }
        for bad in [
            "",
            "/var/lib/",
            "/tmp/..",
            ".",
            "/tmp/.",
            "dir/.",
            "..",
            "/",
        ] {
            assert_eq!(
                invalid_key(&[("KVH_METRICS_FILE", bad)]),
                "KVH_METRICS_FILE",
                "{bad:?}"
            );
        }
        let err = Config::from_vars(&vars(&[("KVH_METRICS_ADDR", "localhost:1")])).unwrap_err();
        assert!(err.to_string().contains("127.0.0.1:9464"), "{err}");
        // The file keys are validated the same way, naming the file.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kvh.toml");
        std::fs::write(&path, "metrics_interval_ms = 5\n").unwrap();
        let err = Config::from_file(&path).unwrap_err().to_string();
        assert!(
            err.contains("metrics_interval_ms") && err.contains("kvh.toml"),
            "{err}"
        );
        std::fs::write(
            &path,
            "metrics_addr = \"[::1]:9464\"\nmetrics_file = \"m.prom\"\n",
        )
        .unwrap();
        let c = Config::from_file(&path).unwrap();
        assert_eq!(c.metrics.addr, Some("[::1]:9464".parse().unwrap()));
        assert_eq!(c.metrics.file.as_deref(), Some(Path::new("m.prom")));
        assert!(!c.metrics.per_process());
        assert_eq!(c.metrics.file_for(7).as_deref(), Some(Path::new("m.prom")));
        // One file per process: `{pid}` is replaced wherever it appears in the file name.
        let c =
            Config::from_vars(&vars(&[("KVH_METRICS_FILE", "/m/kvh-{pid}.{pid}.prom")])).unwrap();
        assert!(c.metrics.per_process());
        assert_eq!(
            c.metrics.file_for(4242).as_deref(),
            Some(Path::new("/m/kvh-4242.4242.prom"))
        );
        // Not in a directory: no process could create it, and no reader would look there.
        for v in [
            "/m/{pid}/kvh.prom",
            "{pid}/kvh-{pid}.prom",
            "/a{pid}b/c/kvh.prom",
        ] {
            let err = invalid_key(&[("KVH_METRICS_FILE", v)]);
            assert!(err.contains("KVH_METRICS_FILE"), "{v}: {err}");
        }
        assert_eq!(MetricsConfig::default().file_for(1), None);
    }

    #[test]
    fn anomaly_keys_default_on_and_are_validated() {
        let c = Config::from_vars(&[]).unwrap();
        assert_eq!(c.anomaly, AnomalyConfig::default());
        assert!(c.anomaly.enabled);
        assert_eq!(c.anomaly.window_ms, 10_000);
        assert_eq!(c.anomaly.z, 4.0);
        assert_eq!(c.anomaly.burst_scale, 1.0);
        let c = Config::from_vars(&vars(&[
            ("KVH_ANOMALY", "off"),
            ("KVH_ANOMALY_WINDOW_MS", "2500"),
            ("KVH_ANOMALY_Z", "3.5"),
            ("KVH_ANOMALY_BURST_SCALE", "0.5"),
        ]))
        .unwrap();
        assert!(!c.anomaly.enabled);
        assert_eq!(c.anomaly.window_ms, 2500);
        assert_eq!(c.anomaly.z, 3.5);
        assert_eq!(c.anomaly.burst_scale, 0.5);
        assert!(
            Config::from_vars(&vars(&[("KVH_ANOMALY", "on")]))
                .unwrap()
                .anomaly
                .enabled
        );
        for bad in ["maybe", ""] {
            assert_eq!(invalid_key(&[("KVH_ANOMALY", bad)]), "KVH_ANOMALY", "{bad}");
        }
        for bad in ["99", "3600001", "0", "-1", "soon", "1e4"] {
            assert_eq!(
                invalid_key(&[("KVH_ANOMALY_WINDOW_MS", bad)]),
                "KVH_ANOMALY_WINDOW_MS",
                "{bad}"
            );
        }
        for bad in ["NaN", "nan", "inf", "-inf", "0.5", "100.5", "-4", "four"] {
            assert_eq!(
                invalid_key(&[("KVH_ANOMALY_Z", bad)]),
                "KVH_ANOMALY_Z",
                "{bad}"
            );
        }
        for bad in ["NaN", "0", "0.001", "1001", "inf", "x"] {
            assert_eq!(
                invalid_key(&[("KVH_ANOMALY_BURST_SCALE", bad)]),
                "KVH_ANOMALY_BURST_SCALE",
                "{bad}"
            );
        }
        let err = Config::from_vars(&vars(&[("KVH_ANOMALY_Z", "NaN")])).unwrap_err();
        assert!(err.to_string().contains("[1, 100]"), "{err}");
        // The same keys in a file, named after the file's key.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kvh.toml");
        std::fs::write(
            &path,
            "anomaly = false\nanomaly_z = 6\nanomaly_window_ms = 500\n",
        )
        .unwrap();
        let c = Config::from_file(&path).unwrap();
        assert!(!c.anomaly.enabled);
        assert_eq!((c.anomaly.z, c.anomaly.window_ms), (6.0, 500));
        std::fs::write(&path, "anomaly_z = nan\n").unwrap();
        let err = Config::from_file(&path).unwrap_err().to_string();
        assert!(
            err.contains("anomaly_z") && err.contains("kvh.toml"),
            "{err}"
        );
    }

    #[test]
    fn one_path_named_for_two_jobs_is_refused_naming_both_keys() {
        let refused = |pairs: &[(&str, &str)]| match Config::from_vars(&vars(pairs)) {
            Err(ConfigError::Conflict(m)) => m,
            other => panic!("{pairs:?}: {other:?}"),
        };
        let log = ("KVH_LOG_DIR", "/log");
        let m = refused(&[
            log,
            ("KVH_HMAC_KEY_FILE", "/keys/a.key"),
            ("KVH_SIGNING_KEY_FILE", "/keys/./a.key"),
        ]);
        assert!(
            m.contains("hmac_key_file (KVH_HMAC_KEY_FILE) and signing_key_file")
                && m.contains("/keys/a.key")
                && m.contains("could sign its checkpoints"),
            "{m}"
        );
        let m = refused(&[
            ("KVH_METRICS_FILE", "/keys/a.key"),
            ("KVH_HMAC_KEY_FILE", "/keys/a.key"),
        ]);
        assert!(m.contains("metrics_file (KVH_METRICS_FILE)"), "{m}");
        let m = refused(&[("KVH_METRICS_FILE", "/log/m"), ("KVH_LOG_DIR", "/log/m/")]);
        assert!(m.contains("log_dir (KVH_LOG_DIR)"), "{m}");
        // Apart, or the checkpoints in the log's own directory: accepted.
        for pairs in [
            &[
                log,
                ("KVH_HMAC_KEY_FILE", "/keys/a.key"),
                ("KVH_SIGNING_KEY_FILE", "/keys/b.key"),
            ][..],
            &[
                log,
                ("KVH_CHECKPOINT_DIR", "/log/"),
                ("KVH_SIGNING_KEY_FILE", "/k.key"),
            ],
            &[("KVH_METRICS_FILE", "/log/m"), log],
        ] {
            assert!(Config::from_vars(&vars(pairs)).is_ok(), "{pairs:?}");
        }
    }

    #[test]
    fn a_checkpoint_dir_without_a_signing_key_is_refused() {
        let log = ("KVH_LOG_DIR", "/log");
        let err = Config::from_vars(&vars(&[log, ("KVH_CHECKPOINT_DIR", "/ckpt")])).unwrap_err();
        assert!(matches!(err, ConfigError::Conflict(_)));
        assert!(err.to_string().contains("KVH_SIGNING_KEY_FILE"), "{err}");
        let both = [
            log,
            ("KVH_CHECKPOINT_DIR", "/ckpt"),
            ("KVH_SIGNING_KEY_FILE", "/k.key"),
        ];
        assert!(Config::from_vars(&vars(&both))
            .unwrap()
            .log
            .checkpoint_dir
            .is_some());
        // Without a log there is nothing to checkpoint: inert, not refused.
        assert!(Config::from_vars(&vars(&[("KVH_CHECKPOINT_DIR", "/ckpt")])).is_ok());
        // The file and the environment each give one half: accepted, either way round.
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("kvh.toml");
        for (in_file, in_env) in [
            (
                "checkpoint_dir = \"/ckpt\"",
                ("KVH_SIGNING_KEY_FILE", "/k.key"),
            ),
            (
                "signing_key_file = \"/k.key\"",
                ("KVH_CHECKPOINT_DIR", "/ckpt"),
            ),
        ] {
            std::fs::write(&file, format!("log_dir = \"/log\"\n{in_file}\n")).unwrap();
            let path = file.to_string_lossy().into_owned();
            let c = Config::from_vars(&vars(&[("KVH_CONFIG", &path), in_env])).unwrap();
            assert!(c.log.checkpoint_dir.is_some() && c.log.signing_key_file.is_some());
        }
        // A checkpoint dir from the file alone: refused, naming the file's keys too.
        std::fs::write(&file, "log_dir = \"/log\"\ncheckpoint_dir = \"/ckpt\"\n").unwrap();
        let path = file.to_string_lossy().into_owned();
        let err = Config::from_vars(&vars(&[("KVH_CONFIG", &path)])).unwrap_err();
        assert!(err.to_string().contains("signing_key_file"), "{err}");
    }

    #[test]
    fn numbers_and_switches_in_a_file_take_their_toml_types() {
        let c = Config::from_toml_str("batch_size = 64\ncoverage_threshold = 1\ndouble_pass = true\nanomaly = false\nanomaly_z = 2.5\n").unwrap();
        assert_eq!(c.batch_size, 64);
        assert!(c.double_pass && !c.anomaly.enabled);
        // As text too, as the environment gives them.
        assert_eq!(
            Config::from_toml_str("batch_size = \"64\"\n")
                .unwrap()
                .batch_size,
            64
        );
        // A switch's 1 and 0 as the environment's text.
        let c = Config::from_toml_str("double_pass = 1\nanomaly = 0\n").unwrap();
        assert!(c.double_pass && !c.anomaly.enabled);
        for text in [
            "batch_size = 32.0\n",
            "double_pass = 2\n",
            "full_verify = 1.0\n",
            "backend = true\n",
            "anomaly_z = [2]\n",
        ] {
            let key = text.split(' ').next().unwrap();
            match Config::from_toml_str(text) {
                Err(
                    ConfigError::Invalid { key: k, .. } | ConfigError::WrongType { key: k, .. },
                ) => {
                    assert_eq!(k, key, "{text}")
                }
                other => panic!("{text:?}: expected an invalid-value error, got {other:?}"),
            }
        }
    }

    /// A policy file that cannot be read is named as the variable that named it, the path
    /// quoted: a stray space shows, and the reader knows where to look.
    #[test]
    fn an_unreadable_policy_file_is_named_by_its_variable() {
        let err = Config::from_vars(&vars(&[("KVH_CONFIG", "/nonexistent/p.toml ")]))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("KVH_CONFIG=\"/nonexistent/p.toml \": cannot read the policy file"),
            "{err}"
        );
        // Read directly (`kvh config --file`), no variable named it.
        let err = Config::from_file(Path::new("/nonexistent/p.toml"))
            .unwrap_err()
            .to_string();
        assert!(!err.contains("KVH_CONFIG"), "{err}");
    }

    #[test]
    fn an_unknown_key_names_the_key_it_most_likely_meant_in_its_own_spelling() {
        let env = |name: &str| {
            Config::from_vars(&[(name.to_string(), "1".to_string())])
                .unwrap_err()
                .to_string()
        };
        let file = |text: &str| Config::from_toml_str(text).unwrap_err().to_string();
        for (err, meant) in [
            (env("KVH_BATCHSIZE"), "KVH_BATCH_SIZE"),
            (env("KVH_TENANT_ISOLATON"), "KVH_TENANT_ISOLATION"),
            (env("KVH_COVERAGE_THRESHHOLD"), "KVH_COVERAGE_THRESHOLD"),
            (env("KVH_LOG_FSNYC"), "KVH_LOG_FSYNC"),
            (file("batch_sise = 32\n"), "batch_size"),
            // A variable's name written in a file: the file's spelling of the same key.
            (file("KVH_BATCH_SIZE = 32\n"), "batch_size"),
            (file("idle-ttl-ms = 5\n"), "idle_ttl_ms"),
            (file("kvh_gate = \"scrub\"\n"), "kv_gate"),
            (env("KVH_ANOMALYZ"), "KVH_ANOMALY_Z"),
            // The variables beside the policy keys are meant too.
            (env("KVH_CONFG"), "KVH_CONFIG"),
            (env("KVH_PRELAOD"), "KVH_PRELOAD"),
        ] {
            assert!(
                err.contains(&format!("; did you mean {meant}? (known keys: ")),
                "{err}"
            );
        }
        // A name like no key gets no guess.
        for err in [env("KVH_FOO"), file("verbose = true\n")] {
            assert!(!err.contains("did you mean"), "{err}");
            assert!(
                err.contains("unknown configuration key (known keys: "),
                "{err}"
            );
        }
    }

    #[test]
    fn an_unknown_key_in_a_file_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kvh.toml");
        std::fs::write(&path, "batch_sise = 32\n").unwrap();
        let err = Config::from_file(&path).unwrap_err().to_string();
        assert!(
            err.starts_with("batch_sise (in ") && err.contains("kvh.toml"),
            "{err}"
        );
    }

    #[test]
    fn path_keys_in_a_file_take_only_strings() {
        // A TOML boolean or number is not a path: `log_dir = false` must not become a log
        // directory named "false" (nor `metrics_file = true` a file named "true").
        for text in [
            "log_dir = false\n",
            "log_dir = 5\n",
            "metrics_file = true\n",
            "hmac_key_file = 0\n",
            "checkpoint_dir = 1.5\n",
        ] {
            let key = text.split(' ').next().unwrap();
            match Config::from_toml_str(text) {
                Err(e @ ConfigError::WrongType { .. }) => {
                    let shown = e.to_string();
                    // The TOML value as written, not the text "5" it would convert to, which
                    // a path key would take.
                    let value = text.split(" = ").nth(1).unwrap().trim();
                    assert!(
                        shown.starts_with(&format!("{key}: {value} is a TOML "))
                            && shown.ends_with("given as a quoted string"),
                        "{text:?}: {shown}"
                    );
                }
                other => panic!("{text:?}: expected a wrong-type error, got {other:?}"),
            }
        }
        // A number key given a boolean: no advice to quote it.
        let e = Config::from_toml_str("batch_size = true\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("batch_size: true is a TOML boolean") && !e.contains("quoted"),
            "{e}"
        );
        // A string is still a path.
        let c = Config::from_toml_str("log_dir = \"false\"\n").unwrap();
        assert_eq!(c.log.dir.as_deref(), Some(Path::new("false")));
    }

    /// A TOML string may hold a NUL character (`\u0000`); no file or directory can be named
    /// with one, so a path key holding one is refused at load, naming the key, rather than
    /// accepted and failing later (the log at start-up, the metrics file at every write).
    #[test]
    fn path_keys_with_a_nul_character_are_refused_naming_the_key() {
        for key in [
            "log_dir",
            "hmac_key_file",
            "signing_key_file",
            "checkpoint_dir",
            "metrics_file",
        ] {
            let text = format!("{key} = \"/run/kvh/a\\u0000b\"\n");
            match Config::from_toml_str(&text) {
                Err(ConfigError::Invalid { key: k, .. }) => assert_eq!(k, key, "{text}"),
                other => panic!("{text:?}: expected an invalid-value error, got {other:?}"),
            }
        }
    }

    /// Reading a policy file directly refuses what the library refuses when `KVH_CONFIG`
    /// names the same file: a checkpoint directory without a signing key.
    #[test]
    fn a_file_read_directly_is_refused_for_a_conflict_as_through_kvh_config() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kvh.toml");
        let text = "log_dir = \"/log\"\ncheckpoint_dir = \"/ckpt\"\n";
        std::fs::write(&path, text).unwrap();
        let through_env = Config::from_vars(&vars(&[("KVH_CONFIG", path.to_str().unwrap())]));
        assert!(matches!(through_env, Err(ConfigError::Conflict(_))));
        assert!(
            matches!(Config::from_file(&path), Err(ConfigError::Conflict(_))),
            "from_file accepted a policy the library refuses"
        );
        assert!(
            matches!(Config::from_toml_str(text), Err(ConfigError::Conflict(_))),
            "from_toml_str accepted a policy the library refuses"
        );
    }

    #[test]
    fn a_key_without_a_value_is_said_to_miss_one() {
        for text in [
            "batch_size =",
            "batch_size = ",
            "double_pass = true\nbatch_size =",
        ] {
            let err = Config::from_toml_str(text).unwrap_err().to_string();
            assert!(err.contains("expected a value"), "{text:?}: {err}");
        }
    }

    #[test]
    fn toml_error_columns_count_characters() {
        let err = Config::from_toml_str("double_pass = true\nmodel = \"ééé\" = 3\n").unwrap_err();
        // The second `=`: character 15 of the line (byte 18).
        assert!(err.to_string().contains("line 2, column 15"), "{err}");
    }

    #[test]
    fn malformed_file_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, "double_pass = true\nbatch_size = = 3\n").unwrap();
        let err = Config::from_file(&path).unwrap_err().to_string();
        assert!(err.contains("bad.toml: line 2, column 14"), "{err}");
        assert!(!err.contains('\n'), "one line: {err}");
        std::fs::write(&path, "batch_sise = 3\n").unwrap();
        assert!(matches!(
            Config::from_file(&path),
            Err(ConfigError::Unknown { .. })
        ));
        std::fs::write(&path, "batch_size = [1]\n").unwrap();
        let err = Config::from_file(&path).unwrap_err().to_string();
        assert!(
            err.contains("batch_size") && err.contains("bad.toml"),
            "{err}"
        );
        let missing = Config::from_file(&dir.path().join("absent.toml")).unwrap_err();
        assert!(missing.to_string().contains("absent.toml"));
    }

    #[test]
    fn every_key_has_a_unique_env_name() {
        let mut names: Vec<_> = Config::keys().map(|(_, env, _)| env).collect();
        let n = names.len();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), n);
    }
}

#[cfg(test)]
mod doc_tests {
    /// The README's configuration table documents every key.
    #[test]
    fn readme_documents_every_key() {
        let readme = include_str!("../../README.md");
        for (_, env, _) in super::Config::keys() {
            assert!(readme.contains(&format!("`{env}`")), "README lacks {env}");
        }
    }
}

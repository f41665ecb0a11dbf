//! `kvh preflight`: whether a process started in this environment would start, with what
//! its policy asks for, checked without starting one.
//!
//! The library starts at an inference server's first CUDA allocation, often minutes into a
//! model load, and a log directory it may not use or a key it cannot read stops it there
//! (fail closed: `KVH_ERR_LOG`). This verb makes the same checks first, through the same
//! functions the start-up calls, in its order (but the chain files, reported with their
//! directory): the policy, the forensic log's keys and directory, the checkpoint directory,
//! the backend (whose start loads the kernels on device 0: a CUDA context for a moment), and
//! the metrics file and address, which the library would run without. It writes nothing: a
//! directory the library would create is reported as such, not created.
//!
//! It checks the environment it runs in, so run it where the server runs, with its
//! variables and volumes (a Kubernetes init container, with `--skip-backend` where the
//! container has no GPU).

use std::net::TcpListener;
use std::path::Path;

use serde::Serialize;

use crate::backend::{self, BackendKind};
use crate::config::{BackendChoice, Config, PreloadSwitch, PRELOAD_ENV};
use crate::forensic::files::{self, DirState};
use crate::forensic::keys;
use crate::forensic::recovery;
use crate::forensic::StartInfo;
use crate::metrics::textfile::NAME_MAX;
use crate::printable;
use crate::report_out::ReportOut;

/// Exit code: every check passed.
pub const EXIT_READY: i32 = 0;
/// Exit code: a check failed; a process started here would not start, or would run without
/// something its policy asks for.
pub const EXIT_NOT_READY: i32 = 1;
/// Exit code: the policy is invalid (as `kvh config`), or the report could not be written.
pub const EXIT_USAGE: i32 = 2;

/// `kvh preflight`: arguments.
#[derive(Clone, Debug, clap::Args)]
pub struct PreflightArgs {
    /// Do not start the backend: for a container without the server's GPU (a Kubernetes
    /// init container). The other checks still run.
    #[arg(long)]
    pub skip_backend: bool,
    /// The checks as JSON; for an invalid policy (exit 2), an object whose `ready` is false,
    /// with the `error`.
    #[arg(long)]
    pub json: bool,
}

/// The outcome of one check.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Checked and usable.
    Ok,
    /// Not configured, so not used (`kvh config --strict` judges whether that is allowed).
    Off,
    /// Not checked (`--skip-backend`).
    Skipped,
    /// A process started here would fail at it, or run without it.
    Fail,
}

/// One check: what was checked, its outcome and why.
#[derive(Clone, Debug, Serialize)]
pub struct Check {
    pub check: &'static str,
    pub status: Status,
    pub detail: String,
}

/// Every check, in the start-up's order (the chain files with their directory).
#[derive(Clone, Debug, Serialize)]
pub struct Preflight {
    /// No check failed.
    pub ready: bool,
    /// The `config_digest` the process's `start` record would carry.
    pub config_digest: String,
    pub checks: Vec<Check>,
}

/// Runs `kvh preflight`; returns the exit code.
pub fn run_preflight(args: &PreflightArgs) -> i32 {
    let config = match Config::from_env() {
        Ok(c) => c,
        Err(e) => {
            crate::say(format_args!("kvh preflight: invalid policy: {e}"));
            if args.json {
                let why = format!("invalid policy: {e}");
                crate::report_out::json_error(&why, serde_json::json!({ "ready": false }));
            }
            return EXIT_USAGE;
        }
    };
    let report = preflight(&config, !args.skip_backend);
    let text = if args.json {
        serde_json::to_string_pretty(&report).unwrap_or_default() + "\n"
    } else {
        render(&report)
    };
    if !ReportOut::print("preflight", &text) {
        return EXIT_USAGE;
    }
    if report.ready {
        EXIT_READY
    } else {
        EXIT_NOT_READY
    }
}

/// Makes every check for `config`; the backend is started (and shut down) only with
/// `start_backend`.
pub fn preflight(config: &Config, start_backend: bool) -> Preflight {
    let mut checks = vec![Check {
        check: "policy",
        status: Status::Ok,
        detail: "valid (KVH_CONFIG and KVH_* variables)".into(),
    }];
    checks.extend(preload_check(std::env::var_os(PRELOAD_ENV).as_deref()));
    log_checks(config, &mut checks);
    checks.push(if start_backend {
        backend_check(config.backend)
    } else {
        Check {
            check: "backend",
            status: Status::Skipped,
            detail: "not started (--skip-backend)".into(),
        }
    });
    metrics_checks(config, &mut checks);
    checks.extend(file_size_limit_check(config, files::file_size_limit()));
    Preflight {
        ready: checks.iter().all(|c| c.status != Status::Fail),
        config_digest: StartInfo::current(config.canonical_json()).config_digest(),
        checks,
    }
}

/// `KVH_PRELOAD`, when set: the LD_PRELOAD interposers read it when the library is loaded,
/// before the policy, and fail every CUDA allocation on a value other than `on` or `off` (as
/// `kvh config` refuses it).
fn preload_check(value: Option<&std::ffi::OsStr>) -> Option<Check> {
    let shown = printable(&value?.to_string_lossy());
    Some(match PreloadSwitch::parse(value) {
        PreloadSwitch::Serve => check(PRELOAD_ENV, Status::Ok, format!("{shown}: the interposers serve CUDA allocations")),
        PreloadSwitch::Forward => check(
            PRELOAD_ENV,
            Status::Off,
            format!("{shown}: the interposers forward every CUDA allocation unchanged (nothing is scrubbed through LD_PRELOAD)"),
        ),
        PreloadSwitch::Refuse => check(
            PRELOAD_ENV,
            Status::Fail,
            format!("{shown}: expected on or off (or true/false, yes/no, 1/0); the LD_PRELOAD interposers would fail every CUDA allocation"),
        ),
    })
}

fn check(check: &'static str, status: Status, detail: String) -> Check {
    Check {
        check,
        status,
        detail,
    }
}

/// The forensic log's checks, as `ForensicLog::open` makes them: the HMAC key, the
/// directory, the signing key, the checkpoint directory.
fn log_checks(config: &Config, out: &mut Vec<Check>) {
    let log = &config.log;
    let Some(dir) = &log.dir else {
        out.push(check(
            "log directory",
            Status::Off,
            "KVH_LOG_DIR is not set: security events are counted, not recorded".into(),
        ));
        return;
    };
    let from_env = keys::secret_in_env();
    let secret = keys::load_secret(log.hmac_key_file.as_deref());
    // Whether this policy's chain would be sealed; not known when the key cannot be read.
    let seals = match &secret {
        Ok(key) => Some(key.is_some()),
        Err(_) => None,
    };
    out.push(match &secret {
        Ok(Some(key)) => {
            let source = if from_env {
                // Both set: the variable wins, and a verifier handed the file fails on every
                // record of this process's chain unless the two hold one key.
                match log.hmac_key_file.as_deref() {
                    Some(file) => format!(
                        "{} ({} is set too and not read: keep the two one key, or unset one)",
                        keys::SECRET_ENV,
                        shown_path("KVH_HMAC_KEY_FILE", Some(file))
                    ),
                    None => keys::SECRET_ENV.to_string(),
                }
            } else {
                shown_path("KVH_HMAC_KEY_FILE", log.hmac_key_file.as_deref())
            };
            check(
                "hmac key",
                Status::Ok,
                format!("{source}: read, key id {}", key.key_id()),
            )
        }
        Ok(None) => check(
            "hmac key",
            Status::Off,
            "no KVH_HMAC_KEY_FILE or FORENSIC_HMAC_SECRET: records are hash-chained, not sealed"
                .into(),
        ),
        Err(e) => check("hmac key", Status::Fail, printable(&e.to_string())),
    });
    let mut log_dir = dir_check("log directory", dir);
    if log_dir.status == Status::Ok && dir.is_dir() {
        // Crash recovery opens the newest file of every chain there, and a refusal stops
        // the start-up.
        match recovery::check_chain_files(dir) {
            Ok(n) => log_dir.detail += &format!("; {n} chain(s), each newest file usable"),
            Err(e) => log_dir = check("log directory", Status::Fail, printable(&e.to_string())),
        }
        if let (Status::Ok, Some(seals)) = (log_dir.status, seals) {
            let ckpt_dir = log
                .checkpoint_dir
                .as_deref()
                .filter(|_| log.signing_key_file.is_some());
            if let Some(why) = sealed_otherwise(dir, seals, ckpt_dir) {
                log_dir = check("log directory", Status::Fail, why);
            }
        }
    }
    with_room(&mut log_dir, dir);
    out.push(log_dir);
    let signing = match &log.signing_key_file {
        None => {
            out.push(check(
                "signing key",
                Status::Off,
                "KVH_SIGNING_KEY_FILE is not set: no signed checkpoints".into(),
            ));
            return;
        }
        Some(path) => keys::read_signing_key(path),
    };
    // As the start-up refuses it: one key for both uses.
    let one_key = match (&secret, &signing) {
        (Ok(Some(hmac)), Ok(signing)) => hmac.refuse_as_signing_key(&signing.verifying_key()).err(),
        _ => None,
    };
    match (signing, one_key) {
        (Ok(_), Some(e)) => out.push(check(
            "signing key",
            Status::Fail,
            printable(&e.to_string()),
        )),
        (Ok(key), None) => {
            let path = log.signing_key_file.as_deref();
            let shown = shown_path("KVH_SIGNING_KEY_FILE", path);
            let signer = crate::forensic::record::hex(key.verifying_key().as_bytes());
            out.push(match path.and_then(|p| keys::public_beside(p, &key)) {
                // The start-up signs with it all the same: a margin, as for the room left.
                Some((public, Err(why))) => check(
                    "signing key",
                    Status::Fail,
                    format!(
                        "{shown}: {} beside it is no public key the verifiers read ({}): \
                         verifiers that pin it would refuse to start; put kvh keygen's pair \
                         back together",
                        printable(&public.display().to_string()),
                        printable(&why)
                    ),
                ),
                Some((public, Ok(false))) => check(
                    "signing key",
                    Status::Fail,
                    format!(
                        "{shown}: its public half ({signer}) is not {} beside it: verifiers \
                         that pin that file would refuse every checkpoint (the public key \
                         copied over the private one, or a .pub of another key); put kvh \
                         keygen's pair back together",
                        printable(&public.display().to_string())
                    ),
                ),
                Some((public, Ok(true))) => check(
                    "signing key",
                    Status::Ok,
                    format!(
                        "{shown}: read, signer {signer}, the public half of {} beside it",
                        printable(&public.display().to_string())
                    ),
                ),
                None => check(
                    "signing key",
                    Status::Ok,
                    format!("{shown}: read, signer {signer}"),
                ),
            })
        }
        (Err(e), _) => out.push(check(
            "signing key",
            Status::Fail,
            printable(&keys::in_setting("KVH_SIGNING_KEY_FILE", e).to_string()),
        )),
    }
    // Where the checkpoints go, as the start-up checks it.
    let (ckpt, place, what) = match &log.checkpoint_dir {
        None => (
            check(
                "checkpoint directory",
                Status::Ok,
                "the log directory".into(),
            ),
            dir,
            "log directory (where the signed checkpoints go)",
        ),
        Some(ckpt) => {
            let mut c = dir_check("checkpoint directory", ckpt);
            with_room(&mut c, ckpt);
            (c, ckpt, "checkpoint directory (KVH_CHECKPOINT_DIR)")
        }
    };
    out.push(
        match files::check_renames(place, what, "each signed checkpoint") {
            Err(e) if ckpt.status == Status::Ok => check(
                "checkpoint directory",
                Status::Fail,
                printable(&e.to_string()),
            ),
            _ => ckpt,
        },
    );
}

/// `NAME PATH` for a report line.
fn shown_path(name: &str, path: Option<&Path>) -> String {
    match path {
        Some(p) => format!("{name} {}", printable(&p.display().to_string())),
        None => name.to_string(),
    }
}

/// A directory the log writer prepares: usable as it is, or creatable.
fn dir_check(what: &'static str, dir: &Path) -> Check {
    let shown = printable(&dir.display().to_string());
    match files::inspect_dir(dir, what) {
        Ok(DirState::Ready) => check(what, Status::Ok, format!("{shown}: usable (0700, ours)")),
        Ok(DirState::WouldCreate { parent }) => {
            let under = printable(&parent.display().to_string());
            // More than one level missing: each is created, which a mistyped path would
            // otherwise make unseen.
            let above = dir.parent().map(|p| match p.as_os_str().is_empty() {
                true => Path::new("."),
                false => p,
            });
            let said = if above.is_some_and(Path::is_dir) {
                format!(
                    "{shown}: does not exist yet; the first process creates it (0700) in {under}"
                )
            } else {
                format!(
                    "{shown}: does not exist yet; the first process creates it and each missing \
                     directory above it (0700) under {under}"
                )
            };
            check(what, Status::Ok, said)
        }
        Err(e) => check(what, Status::Fail, printable(&e.to_string())),
    }
}

/// Why a chain this policy writes in `dir` would leave it unverifiable: chains there sealed
/// otherwise than it seals (`seals`: with an HMAC key). `kvh verify-log --key-file` refuses a
/// record without a MAC, and verifying without the key cannot check sealed chains; and
/// `prune-log`, which needs the key, could then never move anything. The start-up itself
/// goes on (its chain is sound on its own): a deliberate margin, as for the room left.
/// `None` when every chain is sealed as this policy seals, or none can be read. `kvh demo`
/// refuses to start on it (a trial has no reason to leave a directory so).
pub fn sealed_otherwise(dir: &Path, seals: bool, ckpt_dir: Option<&Path>) -> Option<String> {
    let chains = files::list_chains(dir).ok()?;
    let with_files: Vec<(String, Option<bool>)> = chains
        .iter()
        .map(|(chain, list)| {
            let sealed = list
                .first()
                .and_then(|(_, first)| first_record_sealed(first));
            (chain.clone(), sealed)
        })
        .collect();
    // A chain `prune-log` moved whole has only its manifest here, MACed when it was sealed.
    let pruned_whole: Vec<(String, Option<bool>)> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            let chain = crate::forensic::prune::parse_manifest_name(&name)?;
            let listed = chains.iter().any(|(c, _)| c == chain);
            (!listed).then(|| (chain.to_string(), json_sealed(&dir.join(&name))))
        })
        .collect();
    let other: Vec<String> = with_files
        .into_iter()
        .chain(pruned_whole)
        .filter_map(|(chain, sealed)| (sealed? != seals).then_some(chain))
        .collect();
    let first = other.first()?;
    let named = match other.len() - 1 {
        0 => format!("chain {} was", printable(first)),
        n => format!("chains {} and {n} more were", printable(first)),
    };
    let (sealed, but) = if seals {
        (
            "written without an HMAC key (records without a MAC)",
            "this policy seals with one",
        )
    } else {
        (
            "sealed with an HMAC key",
            "this policy has none (no KVH_HMAC_KEY_FILE or FORENSIC_HMAC_SECRET)",
        )
    };
    Some(format!(
        "{}: {named} {sealed}, and {but}: a directory holding both kinds cannot be verified \
         with kvh verify-log --key-file, nor pruned. Move those chains out whole (their files \
         kvh-CHAIN-*.jsonl, their prune manifest kvh-CHAIN.pruned.json, and their signed \
         checkpoint kvh-CHAIN.ckpt{}, which verify-log otherwise reports as a chain without \
         files) to a directory of their own and verify them there, or give this policy a log \
         directory of its own",
        printable(&dir.display().to_string()),
        ckpt_dir.map_or(String::new(), |d| format!(
            " from {}",
            printable(&d.display().to_string())
        )),
    ))
}

/// Whether the first whole record of the chain file `path` carries a MAC; `None` when the
/// file cannot be read or holds no whole record (its chain is judged by nothing).
fn first_record_sealed(path: &Path) -> Option<bool> {
    use std::io::{BufRead, Read};
    // As the verifiers open it: no symlink followed, no FIFO waited for, a regular file.
    let (file, _) = files::open_regular(path, u64::MAX).ok()?;
    // A record is at most a few KiB; a line longer than this is no record to judge by.
    let mut line = Vec::new();
    std::io::BufReader::new(file.take(1 << 20))
        .read_until(b'\n', &mut line)
        .ok()?;
    if line.last() != Some(&b'\n') {
        return None;
    }
    let record: serde_json::Value = serde_json::from_slice(&line).ok()?;
    Some(record.get("mac").is_some_and(|m| !m.is_null()))
}

/// Whether the prune manifest in `path` carries a MAC; `None` when it cannot be read as one.
/// Read as the verifiers read it (up to their size limit: its `mac` is its last member).
fn json_sealed(path: &Path) -> Option<bool> {
    let text = files::read_regular(path, crate::forensic::prune::MAX_MANIFEST_BYTES).ok()?;
    let doc: serde_json::Value = serde_json::from_slice(&text).ok()?;
    Some(doc.get("mac").is_some_and(|m| !m.is_null()))
}

/// The least room a log or checkpoint directory's file system must have left: the start-up
/// writes its `start` record and first signed checkpoint there at once (and fails closed when
/// it cannot), and the records of the first minutes follow. A file system with less is full
/// for this purpose, though a start-up may still get past its first records.
pub const MIN_FREE_BYTES: u64 = 1 << 20;
/// The least number of files that file system must still take: the first chain file, a
/// checkpoint and its temporary name, the directories the start-up creates, and rotations.
pub const MIN_FREE_FILES: u64 = 16;

/// Adds the room left on `dir`'s file system (its nearest existing directory's, when it is
/// still to be created) to a check that passed, and fails it when that is less than the
/// start-up needs ([`MIN_FREE_BYTES`], [`MIN_FREE_FILES`]). A file system that states no
/// size (a tmpfs without one) or whose room cannot be read is reported, not failed: the
/// writer's own errors are the judge there.
fn with_room(c: &mut Check, dir: &Path) {
    if c.status != Status::Ok {
        return;
    }
    // A relative name's ancestors end at "": the working directory.
    let existing = dir
        .ancestors()
        .find(|a| a.is_dir())
        .unwrap_or(Path::new("."));
    let room = match files::free_space(existing) {
        Ok(room) => room,
        Err(e) => {
            c.detail += &format!("; room left not known ({e})");
            return;
        }
    };
    let short_of_bytes = room.bytes.filter(|&b| b < MIN_FREE_BYTES);
    let short_of_files = room.files.filter(|&f| f < MIN_FREE_FILES);
    let said = room_said(room.bytes, room.files);
    if short_of_bytes.is_some() || short_of_files.is_some() {
        c.status = Status::Fail;
        c.detail = format!(
            "{}: its file system has {said} left{}; a log needs at least {} KiB and {MIN_FREE_FILES} files there for the start-up's records and those of its first minutes: a start-up may get past its first records, and then lose the next ones (make room, or archive old chains with kvh prune-log)",
            printable(&dir.display().to_string()),
            kept_back_said(short_of_bytes.map_or(0, |_| room.kept_back)),
            MIN_FREE_BYTES >> 10,
        );
    } else {
        c.detail += &format!("; {said} left on its file system");
    }
}

/// The free bytes this check leaves out, when there are any: a root process could still
/// write into ext4's reserve for root, but a volume at its reserve is full for every other
/// writer (`df` shows it 100% used), and the floor counts what they have.
fn kept_back_said(kept_back: u64) -> String {
    if kept_back == 0 {
        return String::new();
    }
    format!(
        " for writers other than root (up to {} more are kept back by the file system, such as ext4's reserve for root, which this check does not count on)",
        size_said(kept_back)
    )
}

/// "12.5 GiB and 1000 files", with "no stated limit" for a count the file system does not give.
fn room_said(bytes: Option<u64>, files: Option<u64>) -> String {
    let bytes = bytes.map_or("no stated size limit".to_string(), size_said);
    let files = files.map_or("no stated file limit".to_string(), |f| format!("{f} files"));
    format!("{bytes} and {files}")
}

/// A byte count in the largest binary unit that keeps it at least 1, with one decimal.
fn size_said(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["bytes", "KiB", "MiB", "GiB", "TiB"];
    let mut unit = 0;
    let mut value = bytes as f64;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} bytes")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Which directory of the forensic log's start-up creates `dir` when it is missing: the log
/// directory, or the checkpoint directory when checkpoints are signed, each created with its
/// missing parents (0700, this user's) before the metrics export starts. `None` when neither
/// is `dir` or below it, or neither would be created.
fn created_by_the_log(config: &Config, dir: &Path) -> Option<&'static str> {
    let log = &config.log;
    let log_dir = log.dir.as_deref()?;
    let checkpoints = log
        .checkpoint_dir
        .as_deref()
        .filter(|_| log.signing_key_file.is_some());
    [
        (Some(log_dir), "log directory"),
        (checkpoints, "checkpoint directory"),
    ]
    .into_iter()
    .find_map(|(made, what)| {
        let made = made?;
        let dir = resolved(dir)?;
        let below = resolved(made)?.ancestors().any(|a| a == dir);
        let creatable = matches!(
            files::inspect_dir(made, what),
            Ok(DirState::WouldCreate { .. })
        );
        (below && creatable).then_some(what)
    })
}

/// `path` as the system will resolve it once its missing directories exist, as real ones:
/// absolute against the working directory, its longest existing part resolved (symlinks and
/// `..` in it), a symlink that points nowhere yet followed to where it points, the rest taken
/// by its text. `None` when that cannot be told: nothing of it resolves, an existing file
/// stands where a directory is needed, a `..` would leave a directory still to be created,
/// or symlinks nest too deep.
fn resolved(path: &Path) -> Option<std::path::PathBuf> {
    resolved_within(path, 0)
}

/// Symlinks `resolved` follows before it gives up (as the system's own limit, ELOOP).
const MAX_LINKS: u32 = 40;

fn resolved_within(path: &Path, links: u32) -> Option<std::path::PathBuf> {
    use std::path::Component;
    if links > MAX_LINKS {
        return None;
    }
    let joined = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir().ok()?.join(path)
    };
    let parts: Vec<Component<'_>> = joined.components().collect();
    let (existing, mut out) = (0..=parts.len()).rev().find_map(|k| {
        let prefix: std::path::PathBuf = parts[..k].iter().collect();
        std::fs::canonicalize(&prefix).ok().map(|real| (k, real))
    })?;
    let rest = &parts[existing..];
    if !rest.is_empty() && !out.is_dir() {
        return None;
    }
    for (i, c) in rest.iter().enumerate() {
        let Component::Normal(name) = c else {
            // `.` was resolved with the existing part; a `..` here leaves a directory that
            // does not exist yet, which the system cannot walk through.
            if matches!(c, Component::CurDir) {
                continue;
            }
            return None;
        };
        let next = out.join(name);
        if let Ok(target) = std::fs::read_link(&next) {
            let mut followed = out.join(target);
            followed.extend(&rest[i + 1..]);
            return resolved_within(&followed, links + 1);
        }
        out = next;
    }
    Some(out)
}

/// The metrics exports: the file's directory must take the file (written atomically next
/// to it), the address must be free to bind.
fn metrics_checks(config: &Config, out: &mut Vec<Check>) {
    let m = &config.metrics;
    out.push(match &m.file {
        None => check(
            "metrics file",
            Status::Off,
            "KVH_METRICS_FILE is not set: no metrics file for probes or node-exporter".into(),
        ),
        Some(file) => {
            let file = m
                .file_for(std::process::id())
                .unwrap_or_else(|| file.clone());
            let shown = printable(&file.display().to_string());
            let parent = match file.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                _ => ".".into(),
            };
            // The server's pid may have more digits than this process's: the name's length
            // is checked with the widest pid the system hands out.
            let name_len = m
                .file_for(widest_pid())
                .unwrap_or_else(|| file.clone())
                .file_name()
                .map_or(0, |n| n.len());
            if name_len > NAME_MAX {
                check(
                    "metrics file",
                    Status::Fail,
                    format!("{shown}: its name is up to {name_len} bytes (with the widest pid), longer than a file name may be ({NAME_MAX})"),
                )
            } else if std::fs::symlink_metadata(&file).is_ok_and(|md| md.is_dir()) {
                check(
                    "metrics file",
                    Status::Fail,
                    format!("{shown}: a directory is there"),
                )
            } else if let Some(what) = created_by_the_log(config, &file) {
                check(
                    "metrics file",
                    Status::Fail,
                    format!(
                        "{shown}: the forensic log's start-up creates the {what} there (or \
                         below it), so no snapshot can be written; name another file"
                    ),
                )
            } else if std::fs::symlink_metadata(&file).is_ok_and(|md| md.is_file())
                && files::removal_refused(&file)
            {
                // The exporter installs each snapshot by a rename over the file, which the
                // kernel refuses for a marked file, even to root. (Only a regular file is
                // opened to read its marks: a FIFO or device is left untouched, for the check
                // below to refuse.)
                check(
                    "metrics file",
                    Status::Fail,
                    format!(
                        "{shown}: the file there is marked immutable or append-only (chattr \
                         +i or +a): no snapshot can replace it"
                    ),
                )
            } else if !std::fs::metadata(&parent).is_ok_and(|md| md.is_dir()) {
                match created_by_the_log(config, &parent) {
                    Some(what) => check(
                        "metrics file",
                        Status::Ok,
                        format!(
                            "{shown}: its directory does not exist yet; the forensic log's \
                             start-up creates it (0700) with the {what}, before the metrics \
                             export starts"
                        ),
                    ),
                    None => check(
                        "metrics file",
                        Status::Fail,
                        format!("{shown}: its directory does not exist"),
                    ),
                }
            } else if let Err(e) = crate::metrics::textfile::check_replaceable(&file) {
                // The exporter would refuse to replace it: no metrics file for the probes.
                check("metrics file", Status::Fail, format!("{shown}: {e}"))
            } else if !files::may_write(&parent) {
                check(
                    "metrics file",
                    Status::Fail,
                    format!(
                        "{shown}: its directory {}",
                        files::unwritable_said(&parent)
                    ),
                )
            } else if let Err(e) =
                files::check_renames(&parent, "metrics file's directory", "each snapshot")
            {
                check("metrics file", Status::Fail, printable(&e.to_string()))
            } else if sticky_refuses_replace(&file, &parent) {
                check(
                    "metrics file",
                    Status::Fail,
                    format!(
                        "{shown}: another user's file in a sticky directory (as /tmp): only \
                         its owner may replace it"
                    ),
                )
            } else {
                check(
                    "metrics file",
                    Status::Ok,
                    format!("{shown}: its directory is writable"),
                )
            }
        }
    });
    if let Some(addr) = m.addr {
        // Bound and released at once: the process binds it at start-up.
        out.push(match TcpListener::bind(addr) {
            Ok(_) => check("metrics address", Status::Ok, format!("{addr}: free")),
            Err(e) => check(
                "metrics address",
                Status::Fail,
                format!("{addr}: cannot be bound: {e}"),
            ),
        });
    }
}

/// The smallest file size limit under which the metrics export writes its snapshots: the size
/// of an idle process's snapshot, with its `pid` label and the anomaly detector's series
/// (about 14 KiB; the families do not grow with the devices, which are summed), with room for
/// every sample's value to grow to 20 digits (about 16 KiB in all).
fn min_metrics_file_size_limit() -> u64 {
    let mut stats = crate::stats::Stats::merge("cuda".into(), &[Default::default()], None);
    stats.log = serde_json::to_value(crate::forensic::LogStats::disabled()).ok();
    // The detector on: a series for each of its signals.
    stats.anomaly =
        crate::anomaly::layer(&crate::config::AnomalyConfig::default(), None).stats_json();
    let idle = crate::metrics::encode::encode_labelled(
        &stats,
        &crate::metrics::ExporterStats::default(),
        std::time::SystemTime::now(),
        &[("pid", "4194303")],
    );
    let samples = idle.lines().filter(|l| !l.starts_with('#')).count();
    (idle.len() + samples * 20) as u64
}

/// The file size limit (`ulimit -f`, `RLIMIT_FSIZE`), when one is set and a file is written:
/// a write past it fails (EFBIG), so a limit below what a log file or a metrics snapshot
/// needs loses records or every snapshot. `limit` is this process's, which a server started
/// in the same environment inherits.
fn file_size_limit_check(config: &Config, limit: Option<u64>) -> Option<Check> {
    let limit = limit?;
    let mut needs = Vec::new();
    if config.log.dir.is_some() {
        needs.push(("forensic log files", crate::forensic::MIN_FILE_SIZE_LIMIT));
    }
    if config.metrics.file.is_some() {
        needs.push(("metrics snapshots", min_metrics_file_size_limit()));
    }
    if needs.is_empty() {
        return None;
    }
    let short: Vec<String> = needs
        .iter()
        .filter(|(_, need)| limit < *need)
        .map(|(what, need)| format!("{what} need at least {}", size_said(*need)))
        .collect();
    Some(if short.is_empty() {
        check(
            "file size limit",
            Status::Ok,
            format!(
                "{} (ulimit -f): enough for the {}",
                size_said(limit),
                needs
                    .iter()
                    .map(|(what, _)| *what)
                    .collect::<Vec<_>>()
                    .join(" and ")
            ),
        )
    } else {
        check(
            "file size limit",
            Status::Fail,
            format!(
                "{} (ulimit -f) is too small: {}; a write past it fails, losing records or \
                 every snapshot (raise it, or run without the limit)",
                size_said(limit),
                short.join(", ")
            ),
        )
    })
}

/// The largest pid this system hands out (`/proc/sys/kernel/pid_max` less one; Linux's
/// ceiling, 2^22 - 1, when it cannot be read).
fn widest_pid() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .ok()
        .and_then(|t| t.trim().parse::<u32>().ok())
        .and_then(|max| max.checked_sub(1))
        .filter(|&p| p > 0)
        .unwrap_or((1 << 22) - 1)
}

/// Whether the sticky bit of `parent` keeps this uid from renaming a new snapshot over
/// `file`: the file exists, and neither it nor the directory is this uid's (root, which may,
/// is not refused).
fn sticky_refuses_replace(file: &Path, parent: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    let (Ok(f), Ok(d)) = (std::fs::symlink_metadata(file), std::fs::metadata(parent)) else {
        return false;
    };
    euid != 0 && d.mode() & 0o1000 != 0 && f.uid() != euid && d.uid() != euid
}

/// Starts the backend `KVH_BACKEND` names, as the start-up does, and shuts it down.
fn backend_check(choice: BackendChoice) -> Check {
    match backend::select(choice) {
        Ok(b) => {
            let kind = b.kind();
            b.shutdown();
            match (choice, kind) {
                // Not a pass: where the server finds the GPU this preflight did not, the
                // server runs on CUDA, whose driver and kernels were not checked here.
                (BackendChoice::Auto, BackendKind::Host) => check(
                    "backend",
                    Status::Skipped,
                    "KVH_BACKEND=auto found no CUDA driver here: the CUDA backend was not \
                     checked (run preflight where the GPU is, or set KVH_BACKEND)"
                        .to_string(),
                ),
                (_, BackendKind::Host) => check(
                    "backend",
                    Status::Ok,
                    "host memory (KVH_BACKEND=host)".to_string(),
                ),
                (_, kind) => check(
                    "backend",
                    Status::Ok,
                    format!("{kind}: the driver loaded and the kernels loaded on device 0"),
                ),
            }
        }
        Err(e) => check("backend", Status::Fail, printable(&e.to_string())),
    }
}

/// The text form.
fn render(r: &Preflight) -> String {
    let mut out = format!(
        "kvh preflight: a process started in this environment (config digest {})\n",
        r.config_digest
    );
    let width = r.checks.iter().map(|c| c.check.len()).max().unwrap_or(0);
    for c in &r.checks {
        let status = match c.status {
            Status::Ok => "ok",
            Status::Off => "off",
            Status::Skipped => "skipped",
            Status::Fail => "FAIL",
        };
        out += &format!("  {status:7}  {:width$}  {}\n", c.check, c.detail);
    }
    let failed = r.checks.iter().filter(|c| c.status == Status::Fail).count();
    out += &if failed == 0 {
        "ready: no check failed\n".to_string()
    } else {
        format!(
            "NOT READY: {failed} check(s) failed; a process started here would not start, or \
             would run without what its policy asks for\n"
        )
    };
    out
}

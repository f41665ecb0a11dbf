//! The `verify-log` and `keygen` verbs. The binary only parses and dispatches; all logic is
//! here so that it is tested as a library.

use crate::report_out::ReportOut;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use super::files;
use super::keys;
use super::prune::{self, ChainPruned};
use super::record::hex;
use super::verify::{rfc3339, verify_all, ChainReport, Report, SealKey, VerifyOptions};
use super::ForensicError;

/// Exit code: the log verified.
pub const EXIT_OK: i32 = 0;
/// Exit code: tampering or corruption found.
pub const EXIT_TAMPERED: i32 = 1;
/// Exit code: usage or I/O error; nothing was concluded.
pub const EXIT_USAGE: i32 = 2;

/// Directories larger than this get progress lines on stderr even when it is not a TTY.
const PROGRESS_BYTES: u64 = 256 << 20;

/// `kvh verify-log`: check every chain in a log directory.
#[derive(Clone, Debug, clap::Args)]
pub struct VerifyLogArgs {
    /// The log directory (KVH_LOG_DIR of the writer).
    pub dir: PathBuf,
    /// File holding the HMAC secret (as given to the writer): MACs are checked, with the
    /// key ratcheted to each file's epoch. Repeatable, after a key rotation: the current key
    /// first, then the ones it replaced; each chain must verify with one of them throughout,
    /// the one its signed checkpoint names (the report names which, and any chain not bound
    /// to its keys).
    #[arg(long, value_name = "FILE")]
    pub key_file: Vec<PathBuf>,
    /// File holding the Ed25519 public key the checkpoints must be signed with
    /// (PREFIX.pub from `kvh keygen`: 64 hex digits). Repeatable, after a rotation of the
    /// signing key: each checkpoint must be signed by one of them, the one its chain's
    /// records name.
    #[arg(long, value_name = "FILE")]
    pub public_key: Vec<PathBuf>,
    /// Checkpoint file, or directory of `kvh-*.ckpt` files, to check the chains against
    /// (detects tail truncation and deleted files). Needs --public-key.
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    /// Accept chains whose oldest files `kvh prune-log` moved to an archive: each is checked
    /// from the last record its manifest (kvh-CHAIN.pruned.json in DIR) says was moved, and
    /// the manifest must account for every missing file (its MAC is checked with
    /// --key-file). Without it, missing files fail the chain.
    #[arg(long)]
    pub allow_pruned: bool,
    /// An archive directory `kvh prune-log` moved files to: its chain files are read with
    /// DIR's, so the chains are checked whole. Repeatable.
    #[arg(long, value_name = "ARCHIVE")]
    pub archive_dir: Vec<PathBuf>,
    /// Print the report as JSON on stdout; when nothing can be verified (exit 2), an object
    /// with the `error` (and for verify-log, `chains` empty and the error among `errors`). For
    /// evidence, a log directory whose path is not UTF-8 is null in `log_dir`, and given as a
    /// shell word in `log_dir_shell`.
    #[arg(long)]
    pub json: bool,
}

impl VerifyLogArgs {
    /// Verification of `dir` with nothing else given (no key, no checkpoint, text output);
    /// callers set what they have with struct update syntax.
    pub fn of(dir: PathBuf) -> Self {
        VerifyLogArgs {
            dir,
            key_file: Vec::new(),
            public_key: Vec::new(),
            checkpoint: None,
            allow_pruned: false,
            archive_dir: Vec::new(),
            json: false,
        }
    }
}

/// `kvh prune-log`: move the old files of a verified log to an archive directory.
#[derive(Clone, Debug, clap::Args)]
pub struct PruneLogArgs {
    /// The log directory (KVH_LOG_DIR of the writers).
    pub dir: PathBuf,
    /// Where the files go: an existing directory owned by this user, not writable by group or
    /// others (0700), on storage kept as long as the evidence must be; never the log directory.
    /// The first run marks it (.kvh-archive); one holding a log's files without the mark is
    /// refused, as is a marked one given as the log directory.
    #[arg(long, value_name = "ARCHIVE")]
    pub archive_dir: PathBuf,
    /// Move files whose newest record is older than DAYS days (0: every file that may move).
    #[arg(long, value_name = "DAYS", value_parser = clap::value_parser!(u64).range(0..=36_500))]
    pub older_than: u64,
    /// The HMAC secret file: the log's MACs are checked before anything moves, and the
    /// manifests that stand in for moved files are MACed with it (verify-log --allow-pruned
    /// checks them with the same file). A log without one cannot be pruned: keep it whole.
    /// Repeatable after a key rotation (as verify-log's): each chain's manifest is MACed
    /// with the secret that seals the chain.
    #[arg(long, value_name = "FILE", required = true)]
    pub key_file: Vec<PathBuf>,
    /// Ed25519 public key of the checkpoints, checked before anything moves. Repeatable.
    #[arg(long, value_name = "FILE")]
    pub public_key: Vec<PathBuf>,
    /// Checkpoint file or directory (needs --public-key).
    #[arg(long, value_name = "FILE")]
    pub checkpoint: Option<PathBuf>,
    /// Say what would move, and fail (exit 2) where the real run would: the archive holds
    /// other bytes under a name, cannot take a new file, or lacks room for the copies. Move
    /// nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print the result as JSON on stdout; when the run cannot be made (exit 2 before any
    /// move), an object with the `error`.
    #[arg(long)]
    pub json: bool,
}

/// `kvh keygen`: create an Ed25519 key pair for signed checkpoints.
#[derive(Clone, Debug, clap::Args)]
pub struct KeygenArgs {
    /// Writes PREFIX.key (private, 0600) and PREFIX.pub (public); neither may exist.
    #[arg(long, value_name = "PREFIX")]
    pub out: PathBuf,
}

/// `p` as one word of a POSIX shell command line: as it is when it holds only characters no
/// shell treats specially, else in single quotes; a path that is not UTF-8 as a `printf` of
/// its bytes (octal escapes, a `-` too, so the format is never taken for an option), with
/// its trailing newlines, which command substitution would drop, quoted after it. A relative
/// path beginning with `-`, which the command given it would read as an option, is written
/// `./-…`; one beginning with `=` (which zsh expands to a command's path) is quoted. For the
/// commands the verbs suggest.
pub fn shell_word(p: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    if p.as_os_str().as_bytes().first() == Some(&b'-') {
        return shell_word(&Path::new(".").join(p));
    }
    let Some(s) = p.to_str().map(str::to_string) else {
        let bytes = p.as_os_str().as_bytes();
        let end = bytes.iter().rposition(|&b| b != b'\n').map_or(0, |i| i + 1);
        let body = &bytes[..end];
        let newlines = "\n".repeat(bytes.len() - body.len());
        let format: String = body
            .iter()
            .map(|&b| match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'/' | b'.' | b'_' => {
                    char::from(b).to_string()
                }
                _ => format!("\\{b:03o}"),
            })
            .collect();
        let tail = if newlines.is_empty() {
            String::new()
        } else {
            format!("'{newlines}'")
        };
        return format!("\"$(printf '{format}')\"{tail}");
    };
    let plain = !s.is_empty()
        && !s.starts_with('=')
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_./-+,:@%=".contains(c));
    if plain {
        s
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// `verify-log --json`: the report, each chain with what the text's `ATTENTION` line says
/// (`checkpoint_behind`: the seq its records say was signed last, later than the checkpoint
/// read; absent otherwise), which no field of the report alone gives (a checkpoint signed
/// while the chain was read is not one put back).
fn json_report(report: &Report) -> serde_json::Value {
    // Plain data with derived impls: serialisation cannot fail.
    let mut value = serde_json::to_value(report).unwrap_or(serde_json::Value::Null);
    let chains = value
        .get_mut("chains")
        .and_then(serde_json::Value::as_array_mut);
    for (json, chain) in chains.into_iter().flatten().zip(&report.chains) {
        if let (Some(seq), Some(fields)) = (chain.checkpoint_behind(), json.as_object_mut()) {
            fields.insert("checkpoint_behind".into(), seq.into());
        }
    }
    value
}

/// What to say of a directory with no chain file when it holds files named `kvh-*.jsonl`
/// that are not chain files (`kvh-CHAIN-NNNNNN.jsonl`, CHAIN as `p<pid>-t<time>`): that they
/// were not read, and why. Empty when there are none, or the directory cannot be listed.
fn lookalike_names(dir: &Path) -> String {
    match lookalikes(dir) {
        Some(files) => format!("no forensic log files to verify: {files}"),
        None => String::new(),
    }
}

/// Files in `dir` named `kvh-*.jsonl` that are not chain files, said as "N file(s) ... were
/// not read: the first three names"; `None` when there are none, or the directory cannot be
/// listed. A verifier passes over them (docs/forensic-log.md), but says so: a file dropped
/// beside the chains, or a chain's file renamed, is something an auditor wants to see.
fn lookalikes(dir: &Path) -> Option<String> {
    let entries = std::fs::read_dir(dir).ok()?;
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("kvh-") && n.ends_with(".jsonl"))
        .filter(|n| files::parse_file_name(n).is_none())
        .collect();
    if names.is_empty() {
        return None;
    }
    names.sort();
    let count = names.len();
    names.truncate(3);
    let shown: Vec<String> = names.iter().map(|n| crate::printable(n)).collect();
    Some(format!(
        "{count} file(s) named kvh-*.jsonl are not chain files \
         (kvh-p<pid>-t<time>-NNNNNN.jsonl) and were not read: {}",
        shown.join(", ")
    ))
}

/// Runs `verify-log`; returns the process exit code.
pub fn run_verify_log(args: &VerifyLogArgs) -> i32 {
    let report = match options(args)
        .and_then(|opts| verify_all(&args.dir, &opts).map_err(|e| e.to_string()))
    {
        Ok(r) => r,
        Err(e) => return unverified(args, &e),
    };
    if report.errors.is_empty() && report.chains.iter().all(|c| c.ok() && c.records == 0) {
        // Nothing verified is not "verified": a mistyped directory, or chain files without a
        // single record, must not read as OK.
        let archived = |c: &ChainReport| c.pruned.as_ref().is_some_and(|p| p.complete);
        let lookalikes;
        let what = if report.chains.is_empty() {
            lookalikes = lookalike_names(&args.dir);
            if lookalikes.is_empty() {
                "no forensic log files (kvh-*.jsonl) to verify"
            } else {
                lookalikes.as_str()
            }
        } else if report.chains.iter().all(archived) {
            "every chain was moved whole by prune-log: nothing left to verify here (verify \
             them with --archive-dir)"
        } else {
            "no records in its forensic log files to verify"
        };
        return unverified(args, &format!("{}: {what}", args.dir.display()));
    }
    let mut out = std::io::stdout().lock();
    let written = if args.json {
        serde_json::to_writer_pretty(&mut out, &json_report(&report))
            .map_err(std::io::Error::from)
            .and_then(|_| writeln!(out))
    } else {
        write_text(&mut out, &args.dir, &args.archive_dir, &report)
    };
    let problems = report.chains.iter().filter_map(|c| c.problem.as_ref());
    hint_checkpoint_dir(args, problems.map(|p| p.reason.as_str()));
    // Beside chains that were read: said, the verdict stands (they are no chain's files).
    for dir in std::iter::once(&args.dir).chain(&args.archive_dir) {
        if let Some(files) = lookalikes(dir) {
            crate::say(format_args!(
                "kvh verify-log: note: in {}, {files}",
                dir.display()
            ));
        }
    }
    if let Err(e) = crate::report_out::reader_may_leave(written) {
        crate::say(format_args!("kvh verify-log: cannot write the report: {e}"));
        // What the verification found outranks a report that could not be written: a
        // script's `|| page` on a full disk must still learn of tampering.
        if report.ok() {
            return EXIT_USAGE;
        }
    }
    report.exit_code()
}

/// `verify-log` could not verify (`why`): said, and under `--json` a report in the
/// report's shape that verified no chain and has `why` among its errors. The usage status.
fn unverified(args: &VerifyLogArgs, why: &str) -> i32 {
    crate::say(format_args!("kvh verify-log: {why}"));
    if args.json {
        let verdict = serde_json::json!({ "chains": [], "errors": [why] });
        crate::report_out::json_error(why, verdict);
    }
    EXIT_USAGE
}

/// Checks the arguments and reads the keys they name.
pub(crate) fn options(args: &VerifyLogArgs) -> Result<VerifyOptions, String> {
    check_log_dir(&args.dir)?;
    options_but_dir(args)
}

/// The log directory must exist and be a directory.
pub(crate) fn check_log_dir(dir: &Path) -> Result<(), String> {
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(format!("log directory {}: not a directory", dir.display())),
        Err(e) => Err(format!("log directory {}: {e}", dir.display())),
    }
}

/// [`options`] but for the log directory, which a tail may wait for: the keys and the other
/// arguments are checked before it waits.
pub(crate) fn options_but_dir(args: &VerifyLogArgs) -> Result<VerifyOptions, String> {
    let mut hmac_keys: Vec<SealKey> = Vec::new();
    for p in &args.key_file {
        let secret = read_hmac_secret(p).map_err(|e| format!("--key-file {e}"))?;
        // The same secret named twice (one file under two paths) is one key.
        if !hmac_keys.iter().any(|k| k.secret == secret) {
            hmac_keys.push(SealKey::new(p.display().to_string(), secret));
        }
    }
    let mut public_keys = Vec::new();
    for p in &args.public_key {
        let key = keys::read_public_key(p).map_err(|e| match e {
            ForensicError::Key(m) => format!("--public-key {m}"),
            other => format!("--public-key {}: {other}", p.display()),
        })?;
        if let Some(k) = hmac_keys.iter().find(|k| is_hex_of(&k.secret, &key)) {
            // 64 hex digits are both an HMAC secret and (half the time) an Ed25519 point:
            // pinned, every checkpoint would read as forged.
            return Err(format!(
                "--public-key {}: holds the HMAC secret given with --key-file {}, not an \
                 Ed25519 public key: give kvh keygen's PREFIX.pub",
                p.display(),
                k.name
            ));
        }
        if !public_keys.contains(&key) {
            public_keys.push(key);
        }
    }
    if let Some((private, public)) = keys::private_of_another(&args.public_key, &public_keys) {
        return Err(format!(
            "--public-key {}: kvh keygen's private key of the key in {}: give only the public \
             keys (PREFIX.pub), and keep the private key readable by the writer only",
            private.display(),
            public.display()
        ));
    }
    if let Some(p) = &args.checkpoint {
        refuse_other_log_file(p)?;
    }
    let mut checkpoints: Vec<PathBuf> = args.checkpoint.iter().cloned().collect();
    if checkpoints.is_empty() && !public_keys.is_empty() {
        // With a pinned key and no explicit location, the writer's default is the log dir.
        checkpoints.push(args.dir.clone());
    }
    if !checkpoints.is_empty() && public_keys.is_empty() {
        return Err(
            "--checkpoint needs --public-key (the key the checkpoints are pinned to)".into(),
        );
    }
    if args.allow_pruned && hmac_keys.is_empty() {
        return Err(
            "--allow-pruned needs --key-file: a prune manifest stands in for moved \
                    files only when its MAC verifies"
                .into(),
        );
    }
    for a in &args.archive_dir {
        match std::fs::metadata(a) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(format!("--archive-dir {}: not a directory", a.display())),
            Err(e) => return Err(format!("--archive-dir {}: {e}", a.display())),
        }
        // As prune-log refuses it: an archive is where files were moved out of the log
        // directory to, never the log directory (a slip that would verify nothing extra).
        let inside = std::fs::canonicalize(a).is_ok_and(|c| {
            c.ancestors()
                .any(|up| super::prune::same_place(up, &args.dir))
        });
        if inside {
            return Err(format!(
                "--archive-dir {} is the log directory {} or inside it: name the directory \
                 prune-log moved files to",
                a.display(),
                args.dir.display()
            ));
        }
    }
    let mut dirs = vec![args.dir.as_path()];
    dirs.extend(args.archive_dir.iter().map(PathBuf::as_path));
    Ok(VerifyOptions {
        hmac_keys,
        public_keys,
        checkpoints,
        progress: std::io::stderr().is_terminal() || dir_bytes(&dirs) > PROGRESS_BYTES,
        allow_pruned: args.allow_pruned,
        archive_dirs: args.archive_dir.clone(),
    })
}

/// A `--checkpoint` file that the log's own naming says is something else (a chain file, a
/// prune manifest, a key of `kvh keygen`'s) is a wrong argument, said as one. Judged by the
/// name only: no checkpoint is ever named so, while a checkpoint whose content was replaced
/// must stay a finding of the verification (tampering), not an error of the command line.
fn refuse_other_log_file(p: &Path) -> Result<(), String> {
    let Some(name) = p.file_name().and_then(|n| n.to_str()) else {
        return Ok(());
    };
    if p.is_dir() {
        return Ok(());
    }
    let what = if files::parse_file_name(name).is_some() {
        "a chain file of the log"
    } else if prune::parse_manifest_name(name).is_some() {
        "a prune manifest"
    } else if name.ends_with(".key") || name.ends_with(".pub") {
        "a key file"
    } else {
        return Ok(());
    };
    Err(format!(
        "--checkpoint {}: {what}, not a checkpoint; give a checkpoint file (kvh-CHAIN.ckpt) or \
         the directory the writer signs them into (its KVH_CHECKPOINT_DIR, the log directory \
         when unset)",
        p.display()
    ))
}

/// Where checkpoints were looked for holds none while a chain has none: the likely cause is
/// the wrong place, which the report's "checkpoint deleted, or never written" does not
/// suggest. Without `--checkpoint` the log directory was searched (a writer may keep them
/// apart, `KVH_CHECKPOINT_DIR`); with a `--checkpoint` directory, that one (the wrong one, or
/// a volume not mounted). Said on stderr beside the verdict, which stands: checkpoints that
/// are missing from where they should be are what a deletion looks like too.
pub(crate) fn hint_checkpoint_dir<'a>(
    args: &VerifyLogArgs,
    problems: impl IntoIterator<Item = &'a str>,
) {
    if args.public_key.is_empty() {
        return;
    }
    let uncovered = problems
        .into_iter()
        .any(|p| p.contains(super::verify::NO_CHECKPOINT));
    if !uncovered {
        return;
    }
    let holds_none = |dir: &Path| super::checkpoint::find(dir).is_ok_and(|found| found.is_empty());
    match &args.checkpoint {
        None if holds_none(&args.dir) => crate::say(format_args!(
            "kvh: no checkpoint file (kvh-*.ckpt) in {}, where checkpoints are looked for \
             without --checkpoint: if the writer keeps them apart (KVH_CHECKPOINT_DIR), give \
             --checkpoint with that directory",
            args.dir.display()
        )),
        Some(dir) if dir.is_dir() && holds_none(dir) => crate::say(format_args!(
            "kvh: no checkpoint file (kvh-*.ckpt) in --checkpoint {}: is it the directory the \
             writer signs them into (its KVH_CHECKPOINT_DIR, the log directory when unset), \
             and is its volume mounted?",
            dir.display()
        )),
        _ => {}
    }
}

/// Whether `secret` is the text of `key`'s file: its 64 lower-case hex digits.
fn is_hex_of(secret: &[u8], key: &ed25519_dalek::VerifyingKey) -> bool {
    secret == hex(key.as_bytes()).as_bytes()
}

/// The HMAC secret in `p`, as the writer reads it (one trailing newline dropped), of a length
/// the writer accepts.
fn read_hmac_secret(p: &Path) -> Result<Zeroizing<Vec<u8>>, String> {
    let mut b = keys::read_given_file(p, super::files::MAX_CKPT_BYTES)?;
    let len = keys::secret_len(&b);
    b.truncate(len);
    if keys::is_keygen_public_key(p, &b) {
        return Err(keys::public_key_as_secret(p));
    }
    if let Some(message) = keys::signing_key_as_secret(p, &b) {
        return Err(format!(
            "{message}: --key-file takes the file KVH_HMAC_KEY_FILE names, --public-key the .pub"
        ));
    }
    if b.len() < keys::MIN_SECRET_LEN {
        return Err(format!(
            "{}: key is {} bytes; at least {} are required",
            p.display(),
            b.len(),
            keys::MIN_SECRET_LEN
        ));
    }
    // The writer refuses a longer one: no log was sealed with it.
    if b.len() > keys::MAX_SECRET_LEN {
        return Err(format!(
            "{}: key is {} bytes; at most {} are accepted",
            p.display(),
            b.len(),
            keys::MAX_SECRET_LEN
        ));
    }
    Ok(b)
}

fn dir_bytes(dirs: &[&Path]) -> u64 {
    files::list_chains_in(dirs)
        .map(|chains| {
            chains
                .iter()
                .flat_map(|(_, l)| l.iter())
                .filter_map(|(_, p)| p.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// Writes verification report `r` of `dir` on stderr, beside a verb's own report on stdout.
/// A stderr that cannot be written loses the text, never the verb's exit status.
fn say_findings(dir: &Path, r: &Report) {
    let mut text = Vec::new();
    // Writing into memory does not fail.
    let _ = write_text(&mut text, dir, &[], r);
    crate::stderr_text(&String::from_utf8_lossy(&text));
}

fn write_text(
    out: &mut impl Write,
    dir: &Path,
    archives: &[PathBuf],
    r: &Report,
) -> std::io::Result<()> {
    // With one key of each kind, every chain verified is sealed and signed by them; with
    // several, each line says which secret, and whether the chain is bound to its keys.
    let several = Several {
        secrets: r.hmac_keys.len() > 1,
        keys: r.hmac_keys.len() > 1 || r.public_keys.len() > 1,
    };
    for c in &r.chains {
        writeln!(out, "{}", chain_line(c, several))?;
        if let Some(p) = &c.problem {
            // The file may be one read from an archive directory.
            let path = std::iter::once(dir)
                .chain(archives.iter().map(PathBuf::as_path))
                .map(|d| d.join(&p.file))
                .find(|f| f.symlink_metadata().is_ok())
                .unwrap_or_else(|| dir.join(&p.file));
            // Reasons quote names and text found in the directory, which anyone who can
            // write there chose: shown escaped, they cannot rewrite the report's lines.
            writeln!(
                out,
                "  {}:{}: {}",
                crate::printable(&path.display().to_string()),
                p.line,
                crate::printable(&p.reason)
            )?;
        }
    }
    for e in &r.errors {
        writeln!(out, "error: {}", crate::printable(e))?;
    }
    writeln!(out, "{}", if r.ok() { "OK" } else { "FAILED" })
}

/// Which kinds of key were given more than one of (after a rotation).
#[derive(Clone, Copy)]
struct Several {
    secrets: bool,
    keys: bool,
}

/// `chain ID: N records, seq A..B, T1 .. T2, F files[, notes]: OK|FAILED`.
fn chain_line(c: &ChainReport, several: Several) -> String {
    let seq = match (c.first_seq, c.last_seq) {
        (Some(a), Some(b)) => format!(", seq {a}..{b}"),
        _ => String::new(),
    };
    let time = match (c.first_ts, c.last_ts) {
        (Some(a), Some(b)) => format!(", {} .. {}", rfc3339(a), rfc3339(b)),
        _ => String::new(),
    };
    let mut notes = Vec::new();
    notes.push(
        if c.closed {
            "closed"
        } else if c.files == 0 {
            // Only a manifest was left to read: whether the chain ended is not known.
            "end not known (no file read)"
        } else if c.problem.is_some() && !c.walked_to_end {
            // What follows the problem was not read: the chain may well have its `stop`.
            "read up to the problem below"
        } else {
            "open (no stop record)"
        }
        .to_string(),
    );
    if c.torn_bytes > 0 {
        notes.push(format!(
            "torn tail of {} bytes (writer crashed)",
            c.torn_bytes
        ));
    }
    let mut macs = match (c.macs_checked, c.ok()) {
        // A file without a complete record (a writer that died before its first): nothing
        // was verified, and "MACs verified" would say otherwise.
        (true, true) if c.records == 0 => "no record to check a MAC of",
        (true, true) => "MACs verified",
        // The problem line below says what failed, a MAC or something else.
        (true, false) => "MACs checked",
        (false, _) if c.sealed => "MACs present, not checked (no --key-file)",
        // No record read, none to say MACs of.
        (false, _) if c.records == 0 => "MACs not checked (no --key-file)",
        (false, _) => "no MACs (written without an HMAC key)",
    }
    .to_string();
    if let (true, Some(k)) = (several.secrets, &c.key) {
        macs.push_str(&format!(" with {}", k.escape_debug()));
    }
    notes.push(macs);
    if several.keys && c.ok() && c.macs_checked && !c.keys_bound {
        notes.push(
            "not bound to its keys (no signed checkpoint names them): another key given could \
             have rewritten it"
                .into(),
        );
    }
    if let Some(p) = &c.pruned {
        notes.push(format!(
            "{} oldest file(s) up to seq {} moved to {} by prune-log (MACed manifest){}",
            p.files,
            p.last_seq,
            p.archive.escape_debug(),
            if p.complete { " (the whole chain)" } else { "" }
        ));
    }
    notes.push(match (c.checkpoint_seq, c.checkpoint_read) {
        (Some(s), _) => format!("checkpoint at seq {s} verified"),
        // Read and signed, but the chain failed before or at it (the problem says how).
        (None, Some(s)) => format!("checkpoint at seq {s} read, not matched"),
        (None, None) if c.checkpoints_checked => "no checkpoint".into(),
        // Its writer named a signing key, so it signed checkpoints: said, since without them
        // a cut tail or a deleted newest file does not show.
        (None, None) if c.signer.is_some() => {
            "its writer signed checkpoints, not checked (no --public-key)".into()
        }
        (None, None) => "no checkpoint checked (no --public-key)".into(),
    });
    if let Some(recorded) = c.checkpoint_behind() {
        notes.push(format!(
            "ATTENTION: its records say a checkpoint at seq {recorded} was signed, later than \
             the checkpoint read (an earlier one put back, or checkpoints copied before then): \
             what follows the checkpoint read may have been cut"
        ));
    }
    format!(
        "chain {}: {} records{seq}{time}, {} files, {}: {}",
        c.chain,
        c.records,
        c.files,
        notes.join(", "),
        if c.ok() { "OK" } else { "FAILED" }
    )
}

/// What `prune-log` did, for `--json`.
#[derive(serde::Serialize)]
struct PruneOutcome<'a> {
    /// Whether the log verified before anything was moved (when not, nothing was).
    verified: bool,
    dry_run: bool,
    archive: String,
    cutoff: String,
    chains: &'a [ChainPruned],
    files: usize,
    bytes: u64,
    /// The verification that refused the move, or the one after the move when it failed, as
    /// `verify-log --json` reports it.
    #[serde(skip_serializing_if = "Option::is_none")]
    verification: Option<&'a Report>,
    /// Why a chain could not move (changed since the verification, an I/O error): the others
    /// moved all the same.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    refused: Vec<String>,
    /// A dry run's finding that the archive would not take the copies.
    #[serde(skip_serializing_if = "Option::is_none")]
    archive_refuses: Option<&'a str>,
}

/// Says why each chain that could not move did not. Reasons may quote names and manifest
/// text found in the directories: escaped.
fn say_refused(refused: &[prune::PruneError]) {
    for e in refused {
        crate::say(format_args!(
            "kvh prune-log: {}",
            crate::printable(&e.to_string())
        ));
    }
}

/// Runs `prune-log`; returns the process exit code: 0 done (or nothing to move), 1 the log
/// does not verify (nothing moved), 2 usage or I/O error.
pub fn run_prune_log(args: &PruneLogArgs) -> i32 {
    match prune_log(args) {
        Ok(code) => code,
        // Under --json nothing is written before the end: the error takes the report's place.
        Err(e) => {
            crate::say(format_args!("kvh prune-log: {e}"));
            if args.json {
                crate::report_out::json_error(&e, serde_json::json!({}));
            }
            EXIT_USAGE
        }
    }
}

fn prune_log(args: &PruneLogArgs) -> Result<i32, String> {
    let verify_args = VerifyLogArgs {
        key_file: args.key_file.clone(),
        public_key: args.public_key.clone(),
        checkpoint: args.checkpoint.clone(),
        // Earlier runs' manifests account for the files they moved.
        allow_pruned: true,
        ..VerifyLogArgs::of(args.dir.clone())
    };
    let opts = options(&verify_args)?;
    let request = prune::PruneRequest {
        dir: &args.dir,
        archive: &args.archive_dir,
        older_than_days: args.older_than,
        dry_run: args.dry_run,
        opts: &opts,
        checkpoint_place: args.checkpoint.as_deref(),
    };
    let mut out = ReportOut::new();
    let run = prune::prune_all(&request, |done| {
        if !args.json {
            out.line(format_args!("{}", pruned_line(done, args.dry_run)));
        }
    })?;
    if !run.before.ok() {
        say_findings(&args.dir, &run.before);
        crate::say(format_args!(
            "kvh prune-log: the log does not verify; nothing was moved"
        ));
        if args.json {
            // A script reading stdout learns the outcome there too, not from an empty output.
            let outcome = PruneOutcome {
                verified: false,
                dry_run: args.dry_run,
                archive: args.archive_dir.display().to_string(),
                cutoff: rfc3339(run.cutoff_ns),
                chains: &[],
                files: 0,
                bytes: 0,
                verification: Some(&run.before),
                archive_refuses: None,
                refused: Vec::new(),
            };
            let text = serde_json::to_string_pretty(&outcome).map_err(|e| e.to_string())?;
            out.line(format_args!("{text}"));
        }
        return Ok(EXIT_TAMPERED);
    }
    let files: usize = run.moved.iter().map(|c| c.files.len()).sum();
    let bytes: u64 = run.moved.iter().map(|c| c.bytes).sum();
    let failed_after = run.after.as_ref().filter(|after| !after.ok());
    if args.json {
        let outcome = PruneOutcome {
            verified: true,
            dry_run: args.dry_run,
            archive: args.archive_dir.display().to_string(),
            cutoff: rfc3339(run.cutoff_ns),
            chains: &run.moved,
            files,
            bytes,
            verification: failed_after,
            archive_refuses: run.archive_refuses.as_deref(),
            refused: run.refused.iter().map(|e| e.to_string()).collect(),
        };
        let text = serde_json::to_string_pretty(&outcome).map_err(|e| e.to_string())?;
        out.line(format_args!("{text}"));
    } else {
        let verb = if args.dry_run { "would move" } else { "moved" };
        out.line(format_args!(
            "{verb} {files} files ({bytes} bytes) of {} chains with no record since {} to {}",
            run.moved.len(),
            rfc3339(run.cutoff_ns),
            args.archive_dir.display()
        ));
    }
    if let Some(after) = &run.after {
        if !after.ok() {
            say_findings(&args.dir, after);
            crate::say(format_args!(
                "kvh prune-log: the log does not verify after the move"
            ));
            say_refused(&run.refused);
            return Ok(EXIT_TAMPERED);
        }
        if !args.json {
            let dir = shell_word(&args.dir);
            // The keys and checkpoints this run checked the log with, so that the commands
            // check as much.
            let mut keys: String = args
                .key_file
                .iter()
                .map(|k| format!(" --key-file {}", shell_word(k)))
                .collect();
            for k in &args.public_key {
                keys.push_str(&format!(" --public-key {}", shell_word(k)));
            }
            if let Some(c) = &args.checkpoint {
                keys.push_str(&format!(" --checkpoint {}", shell_word(c)));
            }
            let whole = format!(
                "kvh verify-log {dir}{keys} --archive-dir {}",
                shell_word(&args.archive_dir)
            );
            // A log whose chains all moved whole has nothing left for --allow-pruned to read.
            if after.chains.iter().any(|c| c.records > 0) {
                out.line(format_args!(
                    "verify what is left with: kvh verify-log {dir}{keys} --allow-pruned; the \
                     whole chains with: {whole}"
                ));
            } else {
                out.line(format_args!(
                    "every chain moved whole; verify them with: {whole}"
                ));
            }
        }
    }
    if let Err(e) = out.finish() {
        // The moves were made (and are in the manifests); only their report is lost.
        crate::say(format_args!("kvh prune-log: cannot write the report: {e}"));
        if run.refused.is_empty() && run.moved.iter().all(|c| c.left_marked.is_none()) {
            return Ok(EXIT_USAGE);
        }
    }
    if let Some(why) = &run.archive_refuses {
        crate::say(format_args!("kvh prune-log: {why}"));
    }
    // One chain that could not move (changed since the verification, an I/O error) did not
    // hold the others back; it is said here, and the exit status says it too.
    say_refused(&run.refused);
    // A chain moved up to a marked file is a chain not wholly moved, for its mark.
    let marked: Vec<&String> = run
        .moved
        .iter()
        .filter_map(|c| c.left_marked.as_ref())
        .collect();
    for why in &marked {
        crate::say(format_args!("kvh prune-log: {why}"));
    }
    let io = |e: &&prune::PruneError| matches!(e, prune::PruneError::Io(_));
    let failed = run.refused.iter().filter(io).count() + marked.len();
    if failed > 0 {
        crate::say(format_args!(
            "kvh prune-log: {failed} chain(s) not moved, or not wholly, for an I/O error or a \
             marked file (see above)"
        ));
        return Ok(EXIT_USAGE);
    }
    if run.archive_refuses.is_some() {
        return Ok(EXIT_USAGE);
    }
    if !run.refused.is_empty() {
        crate::say(format_args!(
            "kvh prune-log: {} chain(s) changed since the verification; not moved",
            run.refused.len()
        ));
        return Ok(EXIT_TAMPERED);
    }
    Ok(EXIT_OK)
}

fn pruned_line(c: &ChainPruned, dry_run: bool) -> String {
    let (Some(first), Some(last)) = (c.files.first(), c.files.last()) else {
        return format!("chain {}: nothing", c.chain);
    };
    format!(
        "chain {}: {} {} files ({} .. {}, seq {}..{}, {} bytes){}",
        c.chain,
        if dry_run { "would move" } else { "moved" },
        c.files.len(),
        first.name,
        last.name,
        first.first_seq,
        last.last_seq,
        c.bytes,
        if c.complete { ", the whole chain" } else { "" }
    )
}

/// Runs `keygen`; returns the process exit code.
pub fn run_keygen(args: &KeygenArgs) -> i32 {
    match keygen(&args.out) {
        Ok((private, public)) => {
            let mut out = ReportOut::new();
            out.line(format_args!(
                "wrote {} (private, 0600) and {} (public)",
                private.display(),
                public.display()
            ));
            // The key pair is what was asked for, and it exists: a lost confirmation is said,
            // not turned into a failure a retry would trip over ("already exists").
            if let Err(e) = out.finish() {
                crate::say(format_args!(
                    "kvh keygen: wrote {} and {}, but cannot write to stdout: {e}",
                    private.display(),
                    public.display()
                ));
            }
            EXIT_OK
        }
        Err(e) => {
            crate::say(format_args!("kvh keygen: {e}"));
            EXIT_USAGE
        }
    }
}

/// Writes `PREFIX.key` (0600) and `PREFIX.pub` (0644), each 64 hex digits and a newline.
/// Neither may exist; when the second cannot be written the first is removed, so a failure
/// leaves no half pair behind.
pub fn keygen(prefix: &Path) -> Result<(PathBuf, PathBuf), String> {
    // `DIR/` or `DIR` would give `DIR/.key` (hidden) or `DIR.key` beside it, not keys in it.
    let names_dir = prefix.as_os_str().as_encoded_bytes().ends_with(b"/") || prefix.is_dir();
    if names_dir || prefix.as_os_str().is_empty() {
        return Err(format!(
            "--out {}: names a directory, not a file prefix; give one such as {}",
            prefix.display(),
            prefix.join("checkpoint").display()
        ));
    }
    // `x.key` would give `x.key.key` and `x.key.pub`: a policy then naming `x.key` names
    // nothing. The prefix the user meant is said instead.
    use std::os::unix::ffi::OsStrExt;
    let bytes = prefix.as_os_str().as_encoded_bytes();
    let mut stem = bytes;
    while let Some(s) = stem
        .strip_suffix(b".key")
        .or_else(|| stem.strip_suffix(b".pub"))
        .filter(|s| !s.is_empty() && !s.ends_with(b"/"))
    {
        stem = s;
    }
    if stem.len() < bytes.len() {
        let stem = Path::new(std::ffi::OsStr::from_bytes(stem));
        let named = |ext: &str| {
            let mut s = stem.as_os_str().to_owned();
            s.push(ext);
            PathBuf::from(s)
        };
        let (a, b) = (named(".key"), named(".pub"));
        return Err(format!(
            "--out {}: a file prefix, to which .key and .pub are added; give --out {} for {} \
             and {}",
            shell_word(prefix),
            shell_word(stem),
            shell_word(&a),
            shell_word(&b)
        ));
    }
    let with_ext = |ext: &str| {
        let mut s = prefix.as_os_str().to_owned();
        s.push(ext);
        PathBuf::from(s)
    };
    let (private, public) = (with_ext(".key"), with_ext(".pub"));
    for p in [&private, &public] {
        if p.symlink_metadata().is_ok() {
            return Err(format!(
                "{}: already exists; keygen never overwrites a key",
                p.display()
            ));
        }
    }
    let key = keys::generate_signing_key().map_err(|e| e.to_string())?;
    // Built in place, in zeroized memory: `format!` would grow (and free) its buffer, and the
    // digits `hex` returns would be freed unzeroized.
    let digits = Zeroizing::new(hex(key.as_bytes()));
    let mut secret = Zeroizing::new(String::with_capacity(digits.len() + 1));
    secret.push_str(&digits);
    secret.push('\n');
    write_new_key(&private, secret.as_bytes(), 0o600)?;
    let verifying = format!("{}\n", hex(key.verifying_key().as_bytes()));
    if let Err(e) = write_new_key(&public, verifying.as_bytes(), 0o644) {
        return Err(remove_incomplete(&private, e));
    }
    Ok((private, public))
}

/// Creates `p` with exactly `mode` ([`files::create_exclusive`]) and writes `bytes` to disk;
/// a file it created but could not complete is removed.
fn write_new_key(p: &Path, bytes: &[u8], mode: u32) -> Result<(), String> {
    let fail =
        |what: &str, e: std::io::Error| format!("{}: cannot {what} the key file: {e}", p.display());
    let mut f = match files::create_exclusive(p, mode) {
        Ok(f) => f,
        Err((files::CreateStep::Create, e)) => return Err(fail("create", e)),
        Err((files::CreateStep::SetMode, e)) => {
            return Err(remove_incomplete(p, fail("set the mode of", e)))
        }
    };
    if let Err(e) = f.write_all(bytes).and_then(|_| f.sync_all()) {
        drop(f);
        return Err(remove_incomplete(p, fail("write", e)));
    }
    Ok(())
}

/// Removes a key file this command created but could not complete, so that a failure leaves
/// no half pair; `err` says why, and says too when the file could not be removed.
fn remove_incomplete(p: &Path, err: String) -> String {
    match std::fs::remove_file(p) {
        Ok(()) => err,
        Err(r) => format!("{err}; {} is left behind: {r}", p.display()),
    }
}

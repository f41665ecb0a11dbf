//! The `verify-log` and `keygen` verbs. The binary only parses and dispatches; all logic is
//! here so that it is tested as a library.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use super::files;
use super::keys;
use super::record::hex;
use super::verify::{rfc3339, verify_all, ChainReport, Report, VerifyOptions};

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
    /// key ratcheted to each file's epoch.
    #[arg(long)]
    pub key_file: Option<PathBuf>,
    /// File holding the Ed25519 public key the checkpoints must be signed with
    /// (PREFIX.pub from `kvh keygen`: 64 hex digits).
    #[arg(long, value_name = "FILE")]
    pub public_key: Option<PathBuf>,
    /// Checkpoint file, or directory of `kvh-*.ckpt` files, to check the chains against
    /// (detects tail truncation and deleted files). Needs --public-key.
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    /// Print the report as JSON on stdout.
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

/// Runs `verify-log`; returns the process exit code.
pub fn run_verify_log(args: &VerifyLogArgs) -> i32 {
    let opts = match options(args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("kvh verify-log: {e}");
            return EXIT_USAGE;
        }
    };
    let report = match verify_all(&args.dir, &opts) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("kvh verify-log: {e}");
            return EXIT_USAGE;
        }
    };
    if report.errors.is_empty() && report.chains.iter().all(|c| c.ok() && c.records == 0) {
        // Nothing verified is not "verified": a mistyped directory, or chain files without a
        // single record, must not read as OK.
        let what = if report.chains.is_empty() {
            "no forensic log files (kvh-*.jsonl)"
        } else {
            "no records in its forensic log files"
        };
        eprintln!("kvh verify-log: {}: {what} to verify", args.dir.display());
        return EXIT_USAGE;
    }
    let mut out = std::io::stdout().lock();
    let written = if args.json {
        serde_json::to_writer_pretty(&mut out, &report)
            .map_err(std::io::Error::from)
            .and_then(|_| writeln!(out))
    } else {
        write_text(&mut out, &args.dir, &report)
    };
    if let Err(e) = written {
        eprintln!("kvh verify-log: cannot write the report: {e}");
        return EXIT_USAGE;
    }
    report.exit_code()
}

/// Checks the arguments and reads the keys they name.
pub(crate) fn options(args: &VerifyLogArgs) -> Result<VerifyOptions, String> {
    match std::fs::metadata(&args.dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(format!("{}: not a directory", args.dir.display())),
        Err(e) => return Err(format!("{}: {e}", args.dir.display())),
    }
    let hmac_secret = match &args.key_file {
        Some(p) => {
            let mut b =
                Zeroizing::new(std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()))?);
            if b.last() == Some(&b'\n') {
                b.pop();
            }
            if b.len() < keys::MIN_SECRET_LEN {
                return Err(format!(
                    "{}: key is {} bytes; at least {} are required",
                    p.display(),
                    b.len(),
                    keys::MIN_SECRET_LEN
                ));
            }
            Some(b)
        }
        None => None,
    };
    let public_key = args
        .public_key
        .as_deref()
        .map(keys::read_public_key)
        .transpose()
        .map_err(|e| e.to_string())?;
    let mut checkpoints: Vec<PathBuf> = args.checkpoint.iter().cloned().collect();
    if checkpoints.is_empty() && public_key.is_some() {
        // With a pinned key and no explicit location, the writer's default is the log dir.
        checkpoints.push(args.dir.clone());
    }
    if !checkpoints.is_empty() && public_key.is_none() {
        return Err(
            "--checkpoint needs --public-key (the key the checkpoints are pinned to)".into(),
        );
    }
    Ok(VerifyOptions {
        hmac_secret,
        public_key,
        checkpoints,
        progress: std::io::stderr().is_terminal() || dir_bytes(&args.dir) > PROGRESS_BYTES,
    })
}

fn dir_bytes(dir: &Path) -> u64 {
    files::list_chains(dir)
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

fn write_text(out: &mut impl Write, dir: &Path, r: &Report) -> std::io::Result<()> {
    for c in &r.chains {
        writeln!(out, "{}", chain_line(c))?;
        if let Some(p) = &c.problem {
            writeln!(
                out,
                "  {}:{}: {}",
                dir.join(&p.file).display(),
                p.line,
                p.reason
            )?;
        }
    }
    for e in &r.errors {
        writeln!(out, "error: {e}")?;
    }
    writeln!(out, "{}", if r.ok() { "OK" } else { "FAILED" })
}

/// `chain ID: N records, seq A..B, T1 .. T2, F files[, notes]: OK|FAILED`.
fn chain_line(c: &ChainReport) -> String {
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
    notes.push(
        match (c.macs_checked, c.ok()) {
            (true, true) => "MACs verified",
            // The problem line below says what failed, a MAC or something else.
            (true, false) => "MACs checked",
            (false, _) => "MACs not checked (no --key-file)",
        }
        .into(),
    );
    notes.push(match c.checkpoint_seq {
        Some(s) => format!("checkpoint at seq {s} verified"),
        None if c.checkpoints_checked => "no checkpoint".into(),
        None => "no checkpoint checked (no --public-key)".into(),
    });
    format!(
        "chain {}: {} records{seq}{time}, {} files, {}: {}",
        c.chain,
        c.records,
        c.files,
        notes.join(", "),
        if c.ok() { "OK" } else { "FAILED" }
    )
}

/// Runs `keygen`; returns the process exit code.
pub fn run_keygen(args: &KeygenArgs) -> i32 {
    match keygen(&args.out) {
        Ok((private, public)) => {
            println!(
                "wrote {} (private, 0600) and {} (public)",
                private.display(),
                public.display()
            );
            EXIT_OK
        }
        Err(e) => {
            eprintln!("kvh keygen: {e}");
            EXIT_USAGE
        }
    }
}

/// Writes `PREFIX.key` (0600) and `PREFIX.pub` (0644), each 64 hex digits and a newline.
/// Neither may exist; when the second cannot be written the first is removed, so a failure
/// leaves no half pair behind.
pub fn keygen(prefix: &Path) -> Result<(PathBuf, PathBuf), String> {
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
    let secret = Zeroizing::new(format!("{}\n", hex(key.as_bytes())));
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

//! Files named on the command line that are not what they should be (a FIFO where a key or a
//! state file should be): every verb answers with a usage error naming the file, at once,
//! as the library and the verifiers do for key, policy, checkpoint and chain files (opened
//! without waiting for a writer, regular files of a bounded size only). A readiness probe or
//! a nightly job must never hang on one.

#[path = "cli_common/mod.rs"]
mod cli_common;
#[path = "forensic_common/mod.rs"]
mod forensic_common;

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cli_common::kvh;
use forensic_common::{cfg, log_dir, write_log};

/// How long a verb may take to refuse a file it cannot use.
const DEADLINE: Duration = Duration::from_secs(20);

fn fifo(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    let c = CString::new(p.as_os_str().as_bytes()).unwrap();
    // SAFETY: `c` is a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    p
}

/// Runs `cmd`; its exit code and stderr, or `None` when it was still running at the deadline
/// (it is then killed).
fn run_with_deadline(cmd: &mut Command) -> Option<(i32, String)> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let out = child.wait_with_output().unwrap();
            return Some((
                status.code().unwrap_or(-1),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            ));
        }
        if start.elapsed() > DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A log directory with one sealed chain, and a FIFO in a sibling directory.
fn setup() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = log_dir(&tmp);
    write_log(&cfg(&dir, 1 << 20), 3, true);
    let f = fifo(tmp.path(), "key-fifo");
    (tmp, dir, f)
}

fn assert_refused(what: &str, result: Option<(i32, String)>, fifo: &Path) {
    let Some((code, err)) = result else {
        panic!(
            "{what} with a FIFO at {} still waits after {DEADLINE:?}",
            fifo.display()
        );
    };
    assert_eq!(code, 2, "{what}: {err}");
    assert!(err.contains(&fifo.display().to_string()), "{what}: {err}");
}

#[test]
fn verify_log_refuses_a_fifo_as_key_file() {
    let (_tmp, dir, f) = setup();
    let r = run_with_deadline(kvh().arg("verify-log").arg(&dir).arg("--key-file").arg(&f));
    assert_refused("verify-log --key-file", r, &f);
}

/// A key file longer than the writer accepts (the limit, plus one byte with no trailing
/// newline) sealed no log: the verifier refuses it as a usage error naming it, as the writer
/// refuses it.
#[test]
fn verify_log_refuses_a_key_file_longer_than_the_writer_accepts() {
    let (tmp, dir, _) = setup();
    let long = tmp.path().join("long.key");
    let len = kvhygiene::forensic::keys::MAX_SECRET_LEN + 1;
    std::fs::write(&long, vec![b'k'; len]).unwrap();
    std::fs::set_permissions(&long, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let r = run_with_deadline(
        kvh()
            .arg("verify-log")
            .arg(&dir)
            .arg("--key-file")
            .arg(&long),
    );
    let (code, err) = r.expect("verify-log did not end");
    assert_eq!(code, 2, "{err}");
    assert!(err.contains(&long.display().to_string()), "{err}");
    assert!(err.contains(&format!("{len} bytes; at most")), "{err}");
}

/// `kvh keygen`'s signing key (`PREFIX.key`, its public half `PREFIX.pub` beside it) given
/// as `--key-file` would read every record as forged (exit 1, tampering): it is refused as a
/// usage error naming both files. A hex HMAC secret named `*.key` with no such `.pub` beside
/// it is taken as a secret.
#[test]
fn verify_log_refuses_a_signing_key_as_key_file() {
    let (tmp, dir, _) = setup();
    let prefix = tmp.path().join("ckpt");
    let (signing, public) = kvhygiene::forensic::cli::keygen(&prefix).unwrap();
    let verify = || {
        let mut c = kvh();
        c.arg("verify-log")
            .arg(&dir)
            .arg("--key-file")
            .arg(&signing);
        run_with_deadline(&mut c).expect("verify-log did not end")
    };
    let (code, err) = verify();
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("kvh keygen's signing key") && err.contains(&public.display().to_string()),
        "{err}"
    );
    std::fs::remove_file(&public).unwrap();
    let (code, err) = verify();
    assert_eq!(code, 1, "taken as a secret (another than the log's): {err}");
}

#[test]
fn verify_log_refuses_a_fifo_as_public_key() {
    let (_tmp, dir, f) = setup();
    let r = run_with_deadline(
        kvh()
            .arg("verify-log")
            .arg(&dir)
            .arg("--public-key")
            .arg(&f),
    );
    assert_refused("verify-log --public-key", r, &f);
}

/// `--checkpoint` names where the operator keeps the checkpoints: a FIFO there is a wrong
/// argument (exit 2, naming it), as for the key options, not a finding about the log.
#[test]
fn verify_log_refuses_a_fifo_as_checkpoint() {
    let (tmp, dir, f) = setup();
    let (_, public) = kvhygiene::forensic::cli::keygen(&tmp.path().join("ckpt")).unwrap();
    let r = run_with_deadline(
        kvh()
            .arg("verify-log")
            .arg(&dir)
            .arg("--public-key")
            .arg(&public)
            .arg("--checkpoint")
            .arg(&f),
    );
    assert_refused("verify-log --checkpoint", r, &f);
}

/// The readiness probe: a hung `kvh gate` is a probe timeout, not a verdict.
#[test]
fn gate_refuses_a_fifo_as_key_file() {
    let (tmp, dir, f) = setup();
    let snap = tmp.path().join("kvh.prom");
    let stats = cli_common::runtime_stats(Default::default());
    std::fs::write(
        &snap,
        kvhygiene::metrics::encode(
            &stats,
            &kvhygiene::metrics::ExporterStats::default(),
            std::time::SystemTime::now(),
        ),
    )
    .unwrap();
    let r = run_with_deadline(
        kvh()
            .arg("gate")
            .arg("--metrics-file")
            .arg(&snap)
            .arg("--log-dir")
            .arg(&dir)
            .arg("--key-file")
            .arg(&f),
    );
    assert_refused("gate --key-file", r, &f);
}

#[test]
fn tail_log_once_refuses_a_fifo_as_state_file() {
    let (_tmp, dir, f) = setup();
    let r = run_with_deadline(
        kvh()
            .arg("tail-log")
            .arg(&dir)
            .arg("--once")
            .arg("--state")
            .arg(&f),
    );
    assert_refused("tail-log --state", r, &f);
}

/// A chain file the verifying user cannot read (a copy of the log made by another user, an
/// auditor's account that is not the writer's) is an I/O error, exit 2, as `verify-log`,
/// `evidence` and `tail-log` document it ("2 usage or I/O error"), and as `kvh gate` already
/// answers it. It is not tampering (exit 1): operations.md has exit 1 of verify-log escalated
/// as a security incident, and tail-log would hand a `"tampering"` line to the SIEM.
#[test]
fn an_unreadable_chain_file_is_an_io_error_not_tampering() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let tmp = tempfile::tempdir().unwrap();
    let open = |p: &Path, mode: u32| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap()
    };
    open(tmp.path(), 0o755);
    let dir = log_dir(&tmp);
    write_log(&cfg(&dir, 1 << 20), 3, false);
    open(&dir, 0o755);
    let chain = forensic_common::chain_files(&dir);
    assert_eq!(chain.len(), 1);
    open(&chain[0], 0o000);
    for args in [
        &["verify-log"][..],
        &["evidence"][..],
        &["tail-log", "--once", "--from-start"][..],
    ] {
        let mut cmd = kvh();
        cmd.args(args).arg(&dir);
        // SAFETY: only async-signal-safe calls (setgroups, setgid, setuid) between fork and
        // exec. Root reads any file: the verifier runs as nobody.
        unsafe {
            cmd.pre_exec(|| {
                if libc::geteuid() == 0
                    && (libc::setgroups(0, std::ptr::null()) != 0
                        || libc::setgid(65534) != 0
                        || libc::setuid(65534) != 0)
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let out = cmd.stdin(Stdio::null()).output().unwrap();
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert!(
            format!("{stdout}{stderr}").contains("Permission denied"),
            "{args:?}: the chain file must be unreadable to the verifier: {stdout}{stderr}"
        );
        assert!(
            !stdout.contains("tampering"),
            "{args:?}: an unreadable file is reported as tampering: {stdout}{stderr}"
        );
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?}: a log this user cannot read is an I/O error, not a log that failed \
             verification: {stdout}{stderr}"
        );
    }
}

/// A directory holding only files named like log files but not chain files (a copy renamed
/// by hand, another tool's output) has nothing to verify (exit 2), and the message names
/// them and the name a chain file has, rather than saying there are no kvh-*.jsonl files.
#[test]
fn files_named_like_log_files_but_not_chain_files_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("kvh-foreign.jsonl"), "{}\n").unwrap();
    let out = kvh()
        .arg("verify-log")
        .arg(tmp.path())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("kvh-foreign.jsonl") && err.contains("not chain files"),
        "{err}"
    );
}

/// The commands the verbs suggest name a path that is not UTF-8 as a word that expands, in a
/// POSIX shell, to that path and no other: byte for byte, a trailing newline and a leading
/// `-` included.
#[test]
fn a_suggested_shell_word_for_a_path_that_is_not_utf8_expands_to_that_path() {
    use std::os::unix::ffi::OsStrExt;
    let paths: [&[u8]; 4] = [
        b"log-\xff/kvh\n",
        b"-log-\xff",
        b"/var/log/kvh-\xff%d\\n",
        b"/var/log/kvh-\xff\n\n",
    ];
    for shell in ["dash", "bash", "sh"] {
        if Command::new(shell).arg("-c").arg("true").status().is_err() {
            continue;
        }
        for bytes in paths {
            let path = Path::new(std::ffi::OsStr::from_bytes(bytes));
            let word = kvhygiene::forensic::cli::shell_word(path);
            let out = Command::new(shell)
                .arg("-c")
                .arg(format!("printf '%s' {word}"))
                .output()
                .unwrap();
            // A relative path beginning with `-` is given as `./-…` (the same file), so that
            // the command given it does not read it as an option.
            let expected = match bytes.first() {
                Some(b'-') => [b"./", bytes].concat(),
                _ => bytes.to_vec(),
            };
            assert_eq!(
                out.stdout,
                expected,
                "{shell}: {word} expands to {:?}, not to {:?}; stderr: {}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&expected),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

/// A chain file is read whole (at most 4 GiB), so a verifier needs about as much memory as
/// the file is large; the line it refuses must not cost many times more. A 32 MiB chain file
/// whose single line is a JSON object (a long array of zeros) with no seal is reported as a
/// problem at its line (exit 1) by a `verify-log` whose address space is limited to 256 MiB,
/// eight times the file: the refusal does not build the line as a JSON tree to word it.
#[test]
fn a_large_line_that_is_not_a_record_is_refused_within_bounded_memory() {
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let tmp = tempfile::tempdir().unwrap();
    let dir = log_dir(&tmp);
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    let file = dir.join("kvh-p1-t2-000000.jsonl");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&file).unwrap());
    f.write_all(b"{\"a\":[").unwrap();
    let zeros = 16 * 1024 * 1024;
    for _ in 1..zeros {
        f.write_all(b"0,").unwrap();
    }
    f.write_all(b"0]}\n").unwrap();
    f.into_inner().unwrap().sync_all().unwrap();
    const LIMIT: libc::rlim_t = 256 << 20;
    let mut cmd = kvh();
    cmd.arg("verify-log").arg(&dir);
    // SAFETY: only setrlimit, which is async-signal-safe, between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: LIMIT,
                rlim_max: LIMIT,
            };
            if libc::setrlimit(libc::RLIMIT_AS, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd.stdin(Stdio::null()).output().unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "a 32 MiB line that is not a record is not refused within 256 MiB of memory \
         (status {:?}): {stdout}{}",
        out.status,
        stderr.lines().take(3).collect::<Vec<_>>().join("\n")
    );
    assert!(stdout.contains("kvh-p1-t2-000000.jsonl:1:"), "{stdout}");
}

/// Every name in `verify-log`'s text report that a file in the log directory chose (here a
/// file planted under a checkpoint name, `kvh-*.ckpt`, holding terminal escapes, a carriage
/// return and a line break) is shown escaped, as the names of files that look like chain
/// files are: a planted name cannot move the cursor, erase or hide lines, or add a line that
/// reads as the verdict `OK` to a report that failed.
#[test]
fn a_planted_checkpoint_name_cannot_rewrite_the_verify_log_report() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, public, _) = planted_checkpoint(
        &tmp,
        "kvh-\u{1b}[2A\u{1b}[2K\rchain p1-t2: 1 records: OK\nOK\u{1b}[8m.ckpt",
    );
    let out = verify_log_pinned(&dir, &public, &[]);
    failed_report_is_not_rewritten(&out, "the planted name");
}

/// A signed log of three records in `tmp`, and a file planted in it under `name`, a
/// checkpoint's name (`kvh-*.ckpt`), holding no checkpoint: (the directory, the public key,
/// the planted file).
fn planted_checkpoint(
    tmp: &tempfile::TempDir,
    name: &str,
) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let dir = log_dir(tmp);
    let (key, public) = kvhygiene::forensic::cli::keygen(&tmp.path().join("signer")).unwrap();
    let mut c = cfg(&dir, 1 << 20);
    c.signing_key_file = Some(key);
    write_log(&c, 3, false);
    let planted = dir.join(name);
    std::fs::write(&planted, "not a checkpoint").unwrap();
    (dir, public, planted)
}

/// `kvh verify-log DIR --public-key PUBLIC EXTRA...`.
fn verify_log_pinned(
    dir: &std::path::Path,
    public: &std::path::Path,
    extra: &[&str],
) -> std::process::Output {
    kvh()
        .arg("verify-log")
        .arg(dir)
        .arg("--public-key")
        .arg(public)
        .args(extra)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// Asserts that `out` is a failed `verify-log` report (exit 1) that `what`, text planted in
/// the directory, could not rewrite: no raw escape or carriage return, no line `OK`.
fn failed_report_is_not_rewritten(out: &std::process::Output, what: &str) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        !stdout.contains(['\u{1b}', '\r']),
        "the report holds {what}'s control characters raw: {stdout:?}"
    );
    assert!(
        !stdout.lines().any(|l| l == "OK"),
        "{what} adds a line `OK` to a report that failed: {stdout:?}"
    );
}

/// As for checkpoint names, a text a planted prune manifest holds (the name of a file it
/// lists) is shown escaped when `verify-log`, with no option, reports the manifest.
#[test]
fn a_planted_manifest_cannot_rewrite_the_verify_log_report() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = log_dir(&tmp);
    write_log(&cfg(&dir, 1 << 20), 3, false);
    let manifest = serde_json::json!({
        "v": 1,
        "chain": "p1-t2",
        "files": [{
            "name": "\u{1b}[1A\u{1b}[2K\rOK\n\u{1b}[8m",
            "sha256": "00".repeat(32),
            "first_seq": 0,
            "last_seq": 1,
            "last_hash": "00".repeat(32),
            "oldest_ts": 0,
            "newest_ts": 0
        }],
        "complete": true,
        "archive": "/nowhere",
        "updated_at": 0
    });
    std::fs::write(
        dir.join("kvh-p1-t2.pruned.json"),
        serde_json::to_vec(&manifest).unwrap(),
    )
    .unwrap();
    let out = kvh()
        .arg("verify-log")
        .arg(&dir)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    failed_report_is_not_rewritten(&out, "the manifest");
}

/// `verify-log --json` is read by programs: a name it reports is the name the file has, the
/// JSON string escaping its control characters its own way (as the `file` of a problem is),
/// so that a reader can find the file. A checkpoint file planted under a name holding an
/// escape character is named in the report's errors as it is named in the directory, not in
/// the terminal's escaped form.
#[test]
fn verify_log_json_names_a_planted_checkpoint_as_it_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, public, planted) = planted_checkpoint(&tmp, "kvh-\u{1b}[8m.ckpt");
    let out = verify_log_pinned(&dir, &public, &["--json"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let errors: Vec<&str> = report["errors"]
        .as_array()
        .unwrap_or_else(|| panic!("no errors in the report: {stdout}"))
        .iter()
        .filter_map(|e| e.as_str())
        .collect();
    let name = planted.display().to_string();
    assert!(
        errors.iter().any(|e| e.contains(&name)),
        "no error names {name:?} as it is named: {errors:?}"
    );
}

/// The `--json` reports of `gate`, `metrics` and `evidence` give a path whose bytes are not
/// UTF-8 as null, with the shell word that names it beside it (`*_shell`), as `demo --json`
/// does: text with U+FFFD in place of those bytes would name another file, one a script
/// reading the report would fail to open. Each such field is checked once, on its own path:
/// the snapshot file, the per-process pattern and a gone process's file, the log directory.
/// (`kvh config --file` refuses such a path: KVH_CONFIG could not name it.)
#[test]
fn json_reports_give_a_path_that_is_not_utf8_as_null_and_a_shell_word() {
    use kvhygiene::metrics::{encode, ExporterStats};
    use kvhygiene::stats::PoolCounters;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join(std::ffi::OsStr::from_bytes(b"d\xff"));
    std::fs::create_dir(&dir).unwrap();
    let snapshot = |path: &Path| {
        let text = encode(
            &cli_common::runtime_stats(PoolCounters::default()),
            &ExporterStats::default(),
            std::time::SystemTime::now(),
        );
        std::fs::write(path, text).unwrap();
    };
    let file = dir.join("kvh.prom");
    snapshot(&file);
    let pattern = dir.join("kvh-{pid}.prom");
    snapshot(&dir.join(format!("kvh-{}.prom", std::process::id())));
    // A process that ended (waited for), whose file is left behind.
    let mut ended = Command::new("true").spawn().unwrap();
    let gone = ended.id();
    ended.wait().unwrap();
    let gone_file = dir.join(format!("kvh-{gone}.prom"));
    snapshot(&gone_file);
    let logs = dir.join("log");
    write_log(&cfg(&logs, 1 << 20), 3, false);

    let json = |args: &mut Command| {
        let out = args.output().unwrap();
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(!text.contains('\u{fffd}'), "a lossy path in: {text}");
        let value: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| {
            panic!(
                "not JSON ({e}): {text}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
        value
    };
    let expect = |report: &serde_json::Value, field: &str, path: &Path| {
        assert!(report[field].is_null(), "{field} is not null: {report}");
        let word = kvhygiene::forensic::cli::shell_word(path);
        assert_eq!(report[format!("{field}_shell")], word, "{report}");
    };

    let metrics = json(kvh().args(["metrics", "--json", "--file"]).arg(&file));
    expect(&metrics, "file", &file);
    let gate = json(
        kvh()
            .args(["gate", "--json", "--metrics-file"])
            .arg(&file)
            .arg("--log-dir")
            .arg(&logs),
    );
    expect(&gate, "metrics_file", &file);
    expect(&gate["log"], "dir", &logs);
    let per_process = json(kvh().args(["metrics", "--json", "--file"]).arg(&pattern));
    expect(&per_process, "pattern", &pattern);
    assert_eq!(per_process["gone"][0]["pid"], gone, "{per_process}");
    expect(&per_process["gone"][0], "file", &gone_file);
    let gate_per_process = json(
        kvh()
            .args(["gate", "--json", "--metrics-file"])
            .arg(&pattern),
    );
    expect(&gate_per_process, "pattern", &pattern);
    expect(&gate_per_process["gone"][0], "file", &gone_file);
    let evidence = json(kvh().args(["evidence", "--json"]).arg(&logs));
    expect(&evidence, "log_dir", &logs);
}

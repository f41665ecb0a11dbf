//! The forensic-log walkthrough a newcomer follows from README.md and docs/forensic-log.md
//! (`kvh keygen`, `kvh demo --log-dir`, then the verbs that read the log), checked against the
//! built `kvh`: what the verbs print must be the right next step.

#[path = "cli_common/mod.rs"]
mod cli_common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use cli_common::{host_demo, kvh, run};

/// An HMAC key file as deploy/README.md makes one (`openssl rand -hex 32 > hmac.key`), 0600.
fn hmac_key(dir: &Path) -> PathBuf {
    let path = dir.join("hmac.key");
    std::fs::write(
        &path,
        "6b76682d646f63732d77616c6b7468726f7567682d686d61632d6b65792d3031\n",
    )
    .unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

/// A short `kvh demo --log-dir DIR` with the variables `envs` set; it must pass. Its stdout.
fn short_demo(log: &Path, envs: &[(&str, &std::ffi::OsStr)]) -> String {
    let mut cmd = host_demo(1, 2);
    for (name, value) in envs {
        cmd.env(name, value);
    }
    let (code, out, err) = run(cmd.arg("--log-dir").arg(log));
    assert_eq!(code, 0, "{out}{err}");
    out
}

/// A short `kvh demo --log-dir DIR` whose log is sealed with `key` (KVH_HMAC_KEY_FILE).
fn sealed_demo(log: &Path, key: &Path) -> String {
    short_demo(log, &[("KVH_HMAC_KEY_FILE", key.as_os_str())])
}

/// `kvh demo --log-dir DIR` ends with the command that checks the log it wrote. For a log
/// sealed with an HMAC key, that command must check the seal: followed as printed, it has to
/// report the MACs verified, not "MACs not checked (no --key-file)".
#[test]
fn the_demo_names_a_check_of_its_sealed_log_that_verifies_the_macs() {
    let tmp = tempfile::tempdir().unwrap();
    let key = hmac_key(tmp.path());
    let log = tmp.path().join("log");
    let out = sealed_demo(&log, &key);
    let hint = out
        .lines()
        .find_map(|l| {
            l.split_once("check it with: ")
                .map(|(_, cmd)| cmd.to_string())
        })
        .unwrap_or_else(|| panic!("no 'check it with:' line in the demo's output:\n{out}"));
    let argv: Vec<&str> = hint.split_whitespace().collect();
    assert_eq!(argv.first(), Some(&"kvh"), "{hint}");
    let (code, vout, verr) = run(kvh().current_dir(tmp.path()).args(&argv[1..]));
    assert_eq!(code, 0, "`{hint}`: {vout}{verr}");
    assert!(
        vout.contains("MACs verified"),
        "the demo sealed its log with KVH_HMAC_KEY_FILE, but the check it prints (`{hint}`) \
         does not verify the MACs:\n{vout}"
    );
}

/// `kvh tail-log DIR --once` makes one pass and exits (README.md's table: "0 after --once");
/// what it says on stderr must not promise passes every `--interval` seconds that will never
/// come.
#[test]
fn tail_log_once_does_not_announce_periodic_passes() {
    let tmp = tempfile::tempdir().unwrap();
    let key = hmac_key(tmp.path());
    let log = tmp.path().join("log");
    sealed_demo(&log, &key);
    let (code, out, err) = run(kvh()
        .arg("tail-log")
        .arg(&log)
        .arg("--key-file")
        .arg(&key)
        .arg("--once"));
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        !err.contains("every 10 s"),
        "a --once run makes a single pass, but says it passes records on periodically:\n{err}"
    );
}

/// docs/forensic-log.md: "`ARCHIVE` must exist". A `prune-log` whose `--archive-dir` does
/// not exist must say that it is the archive directory that is missing, as `verify-log
/// --archive-dir` does, not only the bare OS error on a path.
#[test]
fn prune_log_names_the_missing_archive_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let key = hmac_key(tmp.path());
    let log = tmp.path().join("log");
    sealed_demo(&log, &key);
    let archive = tmp.path().join("archive");
    let (code, out, err) = run(kvh()
        .arg("prune-log")
        .arg(&log)
        .arg("--archive-dir")
        .arg(&archive)
        .args(["--older-than", "30", "--dry-run"])
        .arg("--key-file")
        .arg(&key));
    assert_eq!(code, 2, "{out}{err}");
    // verify-log says which argument the missing path came from.
    let (vcode, _, verr) = run(kvh()
        .arg("verify-log")
        .arg(&log)
        .arg("--archive-dir")
        .arg(&archive));
    assert_eq!(vcode, 2, "{verr}");
    assert!(verr.contains("--archive-dir"), "{verr}");
    assert!(
        err.contains("--archive-dir"),
        "prune-log's error does not say the archive directory is what is missing:\n{err}"
    );
}

/// With both HMAC sources set (`FORENSIC_HMAC_SECRET` and `KVH_HMAC_KEY_FILE`), the writer
/// seals with the environment's secret (keys::load_secret reads it first). The check the demo
/// prints must then not name the key file, whose key did not seal the log: followed as
/// printed, such a command reports every MAC as a mismatch, i.e. a tampered log.
#[test]
fn the_demo_does_not_name_a_key_file_its_log_was_not_sealed_with() {
    let tmp = tempfile::tempdir().unwrap();
    let key = hmac_key(tmp.path());
    let log = tmp.path().join("log");
    let secret = "an-environment-secret-other-than-the-key-file-0123456789";
    let out = short_demo(
        &log,
        &[
            ("KVH_HMAC_KEY_FILE", key.as_os_str()),
            ("FORENSIC_HMAC_SECRET", std::ffi::OsStr::new(secret)),
        ],
    );
    let hint = out
        .lines()
        .find_map(|l| {
            l.split_once("check it with: ")
                .map(|(_, cmd)| cmd.to_string())
        })
        .unwrap_or_else(|| panic!("no 'check it with:' line in the demo's output:\n{out}"));
    if hint.contains(key.to_str().unwrap()) {
        let argv: Vec<&str> = hint.split_whitespace().collect();
        let (vcode, vout, verr) = run(kvh().current_dir(tmp.path()).args(&argv[1..]));
        panic!(
            "the demo's log was sealed with FORENSIC_HMAC_SECRET, but the check it prints \
             names KVH_HMAC_KEY_FILE's key (`{hint}`), which exits {vcode}:\n{vout}{verr}"
        );
    }
}

/// A signed demo log: a key pair as `kvh keygen --out DIR/checkpoint` writes it
/// (`checkpoint.key`, 0600, and `checkpoint.pub`, 64 hex digits and a newline each), then
/// `kvh demo --log-dir DIR/log` with `KVH_SIGNING_KEY_FILE=DIR/checkpoint.key`. Returns the
/// log directory and the key prefix. The pair is fixed: its private seed, read as 32 bytes,
/// also decodes as a point of the curve, as about half of the seeds keygen draws do.
fn signed_demo(dir: &Path) -> (PathBuf, PathBuf) {
    let prefix = dir.join("checkpoint");
    let key = prefix.with_extension("key");
    std::fs::write(
        &key,
        "aff50966ebb13d2087d8eb8936862febdcfa80a2cbb7aabb99ab8e5e100f498d\n",
    )
    .unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::write(
        prefix.with_extension("pub"),
        "778425af1d914b6332f9a8f92c79cde617e7d737c0a712b966cc283e5a132394\n",
    )
    .unwrap();
    let log = dir.join("log");
    short_demo(&log, &[("KVH_SIGNING_KEY_FILE", key.as_os_str())]);
    (log, prefix)
}

/// `kvh verify-log LOG` with a `--public-key` for each of `keys`.
fn verify_log_with(log: &Path, keys: &[PathBuf]) -> (i32, String, String) {
    let mut cmd = kvh();
    cmd.arg("verify-log").arg(log);
    for k in keys {
        cmd.arg("--public-key").arg(k);
    }
    run(&mut cmd)
}

/// README.md's verb table: `verify-log` exits 1 for tampering or corruption and 2 for a usage
/// error; docs/operations.md escalates exit 1 as a security incident. Giving `kvh keygen`'s
/// private key (`PREFIX.key`) where `--public-key` wants `PREFIX.pub` is a usage error of the
/// verifier, not tampering of an intact log: the exit status must be 2.
#[test]
fn verify_log_given_the_private_key_as_public_key_is_a_usage_error() {
    let tmp = tempfile::tempdir().unwrap();
    let (log, prefix) = signed_demo(tmp.path());
    // The log itself is intact: with the public key it verifies.
    let (code, out, err) = verify_log_with(&log, &[prefix.with_extension("pub")]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = verify_log_with(&log, &[prefix.with_extension("key")]);
    assert_eq!(
        code, 2,
        "--public-key named the private key PREFIX.key of an intact log: a usage error (2), \
         not tampering (1):\n{out}{err}"
    );
}

/// docs/forensic-log.md, `kvh tail-log`: "the key files and the other arguments are checked
/// first, so a bad one is status 2 at once"; a `{"kvh_tail_log": "tampering", ...}` line is
/// for a log that no longer verifies. `kvh keygen`'s private key given as `--public-key` is a
/// bad key file: status 2, and no tampering line for the SIEM.
#[test]
fn tail_log_given_the_private_key_as_public_key_reports_no_tampering() {
    let tmp = tempfile::tempdir().unwrap();
    let (log, prefix) = signed_demo(tmp.path());
    let (code, out, err) = run(kvh()
        .arg("tail-log")
        .arg(&log)
        .arg("--public-key")
        .arg(prefix.with_extension("key"))
        .arg("--once"));
    assert!(
        code == 2 && !out.contains("\"tampering\""),
        "--public-key named the private key PREFIX.key of an intact log; expected status 2 \
         without a tampering line, got {code}:\n{out}{err}"
    );
}

/// docs/forensic-log.md, `kvh tail-log`: "the key files and the other arguments are checked
/// first, so a bad one is status 2 at once". A tail that runs on (no `--once`) and is given
/// `kvh keygen`'s private key as `--public-key` ends with status 2 at its first pass, as a
/// `--once` run does: the key will not become a public key by trying again, so the tail
/// does not retry it pass after pass, saying it is "trying again".
#[test]
fn a_running_tail_log_given_the_private_key_as_public_key_ends_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let (log, prefix) = signed_demo(tmp.path());
    let mut child = kvh()
        .arg("tail-log")
        .arg(&log)
        .arg("--public-key")
        .arg(prefix.with_extension("key"))
        .args(["--interval", "1"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if std::time::Instant::now() >= deadline {
            break None;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    if status.is_none() {
        let _ = child.kill();
    }
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        status.is_some_and(|s| s.code() == Some(2)),
        "--public-key named the private key PREFIX.key: expected status 2 within 5 s, got \
         {status:?}; stderr:\n{err}"
    );
}

/// docs/forensic-log.md, key files: "a verifier given `PREFIX.key` as `--public-key` says so
/// and exits with the usage status (2) ... once it meets a checkpoint that key's public half
/// signed". Given the private key beside the public one, the verifier still meets such a
/// checkpoint: it says so, with status 2, rather than take the private key silently.
#[test]
fn verify_log_given_the_private_key_beside_the_public_key_is_a_usage_error() {
    let tmp = tempfile::tempdir().unwrap();
    let (log, prefix) = signed_demo(tmp.path());
    let (code, out, err) = verify_log_with(
        &log,
        &[prefix.with_extension("pub"), prefix.with_extension("key")],
    );
    assert_eq!(
        code, 2,
        "--public-key named the private key PREFIX.key (beside PREFIX.pub): a usage error \
         (2):\n{out}{err}"
    );
}

/// The private key copied under another name (no `.pub` beside it) and given with its public
/// key: the two keys given say it is the other's private key, whatever the log holds, so it
/// is refused as a usage error before the log is read.
#[test]
fn verify_log_given_a_renamed_private_key_with_its_public_key_is_a_usage_error() {
    let tmp = tempfile::tempdir().unwrap();
    let (log, prefix) = signed_demo(tmp.path());
    let renamed = tmp.path().join("verifier-copy.txt");
    std::fs::copy(prefix.with_extension("key"), &renamed).unwrap();
    let (code, out, err) = verify_log_with(&log, &[prefix.with_extension("pub"), renamed.clone()]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(
        err.contains("verifier-copy.txt") && err.contains("private key"),
        "{err}"
    );
}

/// `--key-file` and `--public-key` swapped: `kvh keygen`'s public key (`PREFIX.pub`) given
/// where the HMAC secret is wanted would make every MAC of an intact log fail, read as
/// tampering (1) and escalated as an incident. The file says what it is: a usage error (2),
/// naming the option and the file, before the log is read; and a writer refuses it as its
/// HMAC key (a key everyone may read seals nothing).
#[test]
fn a_public_key_given_as_the_hmac_key_is_a_usage_error() {
    let tmp = tempfile::tempdir().unwrap();
    let key = hmac_key(tmp.path());
    let (_, prefix) = signed_demo(tmp.path());
    let log = tmp.path().join("sealed");
    short_demo(
        &log,
        &[
            ("KVH_HMAC_KEY_FILE", key.as_os_str()),
            (
                "KVH_SIGNING_KEY_FILE",
                prefix.with_extension("key").as_os_str(),
            ),
        ],
    );
    let public = prefix.with_extension("pub");
    let (code, out, err) = run(kvh()
        .arg("verify-log")
        .arg(&log)
        .arg("--key-file")
        .arg(&public)
        .arg("--public-key")
        .arg(&key));
    assert_eq!(
        code, 2,
        "swapped key options: a usage error (2):\n{out}{err}"
    );
    assert!(
        err.contains("--key-file")
            && err.contains("checkpoint.pub")
            && err.contains("--public-key"),
        "the error does not name the option, the file and the option it is for:\n{err}"
    );
    // The same file as a writer's HMAC key (made private, as a key file must be).
    std::fs::set_permissions(&public, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert_refused_as_the_writers_hmac_key(tmp.path(), &public);
}

/// docs/forensic-log.md: a `PREFIX.pub` given as the writer's HMAC key
/// (`KVH_HMAC_KEY_FILE`) is refused as the public key it is. `kvh keygen` writes
/// `PREFIX.pub` for verifiers, readable by all (0644): given as it was made, the writer's
/// refusal is expected to say that the file is kvh keygen's public key, not only that its
/// mode is too open (which asks the operator to make a public key private).
#[test]
fn a_public_key_as_keygen_wrote_it_given_as_the_writers_hmac_key_is_named_as_such() {
    let tmp = tempfile::tempdir().unwrap();
    let prefix = tmp.path().join("ckpt");
    let (code, out, err) = run(kvh().arg("keygen").arg("--out").arg(&prefix));
    assert_eq!(code, 0, "kvh keygen:\n{out}{err}");
    let public = prefix.with_extension("pub");
    assert_refused_as_the_writers_hmac_key(tmp.path(), &public);
}

/// A demo whose log would be sealed with `public` (`KVH_HMAC_KEY_FILE`) does not start
/// (2), and says the file is a public key.
fn assert_refused_as_the_writers_hmac_key(dir: &Path, public: &Path) {
    let (code, out, err) = run(host_demo(1, 1)
        .env("KVH_HMAC_KEY_FILE", public)
        .arg("--log-dir")
        .arg(dir.join("refused")));
    assert_eq!(
        code, 2,
        "a public key as the writer's HMAC key:\n{out}{err}"
    );
    assert!(
        err.contains("KVH_HMAC_KEY_FILE") && err.contains("public key"),
        "{} given as KVH_HMAC_KEY_FILE is not named as a public key:\n{err}",
        public.display()
    );
}

/// The `kvh ...` command lines quoted (in backticks) in the section of docs/operations.md
/// whose heading starts with `heading`, whitespace joined, each cut before a shell
/// redirection (`> report.md`).
fn operations_commands(heading: &str) -> Vec<String> {
    let text =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/operations.md"))
            .unwrap();
    let start = text
        .find(&format!("\n## {heading}"))
        .unwrap_or_else(|| panic!("no section '{heading}' in docs/operations.md"));
    let rest = &text[start + 1..];
    let section = &rest[..rest[3..].find("\n## ").map_or(rest.len(), |e| e + 3)];
    let joined = section.split_whitespace().collect::<Vec<_>>().join(" ");
    joined
        .split('`')
        .skip(1)
        .step_by(2)
        .filter(|span| span.starts_with("kvh "))
        .map(|span| span.split(" > ").next().unwrap().trim().to_string())
        .collect()
}

/// Runs a command line of docs/operations.md with its placeholders (`DIR`, `KEY`, `PUB`,
/// `CKPT`) replaced by the paths given.
fn run_operations_command(line: &str, places: &[(&str, &Path)]) -> (i32, String, String) {
    let argv: Vec<std::ffi::OsString> = line
        .split_whitespace()
        .skip(1)
        .map(|w| {
            places
                .iter()
                .find(|(name, _)| *name == w)
                .map_or_else(|| w.into(), |(_, p)| p.as_os_str().to_owned())
        })
        .collect();
    run(kvh().args(argv))
}

/// docs/operations.md, "During an incident, in this order": step 2 verifies the kept log with
/// `kvh verify-log DIR --key-file KEY --public-key PUB --checkpoint CKPT --allow-pruned` (exit
/// 0: intact), and step 3 reads what happened with the `kvh evidence` command line it gives
/// for the same log and keys. On a log whose signed checkpoints are kept apart from it (the
/// runbook's "Forensic log off" section asks for `KVH_CHECKPOINT_DIR`), the report of step 3
/// has to verify the log step 2 found intact (exit 0), not report it as failed verification
/// (exit 1, which the runbook escalates as a security incident).
#[test]
fn the_incident_runbooks_evidence_step_verifies_the_log_its_verify_step_found_intact() {
    let tmp = tempfile::tempdir().unwrap();
    let key = hmac_key(tmp.path());
    let prefix = tmp.path().join("checkpoint");
    let (code, out, err) = run(kvh().arg("keygen").arg("--out").arg(&prefix));
    assert_eq!(code, 0, "{out}{err}");
    let log = tmp.path().join("log");
    let ckpt = tmp.path().join("checkpoints");
    let (code, out, err) = run(host_demo(1, 2)
        .env("KVH_HMAC_KEY_FILE", &key)
        .env("KVH_SIGNING_KEY_FILE", prefix.with_extension("key"))
        .arg("--log-dir")
        .arg(&log)
        .arg("--checkpoint-dir")
        .arg(&ckpt));
    assert_eq!(code, 0, "{out}{err}");
    let public = prefix.with_extension("pub");
    let places: [(&str, &Path); 4] = [
        ("DIR", &log),
        ("KEY", &key),
        ("PUB", &public),
        ("CKPT", &ckpt),
    ];
    let commands = operations_commands("During an incident");
    let verify = commands
        .iter()
        .find(|c| c.starts_with("kvh verify-log DIR"))
        .expect("step 2's kvh verify-log command line");
    let evidence = commands
        .iter()
        .find(|c| c.starts_with("kvh evidence DIR"))
        .expect("step 3's kvh evidence command line");
    let (vcode, vout, verr) = run_operations_command(verify, &places);
    assert_eq!(vcode, 0, "step 2, `{verify}`:\n{vout}{verr}");
    let (ecode, eout, eerr) = run_operations_command(evidence, &places);
    assert_eq!(
        ecode,
        0,
        "step 2 (`{verify}`) found the log intact, but step 3 (`{evidence}`) reports it as \
         failing verification:\n{}{eerr}",
        eout.lines()
            .filter(|l| l.contains("FAILED") || l.contains("Problem"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// Three demo logs in `dir`: one with signed checkpoints, one sealed with an HMAC key, one
/// with neither.
fn three_logs(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let key = hmac_key(dir);
    let (signed, _) = signed_demo(dir);
    let sealed = dir.join("sealed");
    sealed_demo(&sealed, &key);
    let plain = dir.join("plain");
    short_demo(&plain, &[]);
    (signed, sealed, plain)
}

/// `kvh verify-log` without keys checks the hash chain only, and says OK. Its report says
/// what it left unchecked of this log, not of logs in general: MACs its records carry, and
/// checkpoints its writer signed, so that a check run without its keys does not read as a
/// check of the seal; and of a log written without either, that there was none.
#[test]
fn verify_log_without_keys_says_which_seals_of_this_log_it_left_unchecked() {
    let tmp = tempfile::tempdir().unwrap();
    let (signed, sealed, plain) = three_logs(tmp.path());
    let line = |log: &Path| {
        let (code, out, err) = verify_log_with(log, &[]);
        assert_eq!(code, 0, "{out}{err}");
        out.lines().next().unwrap_or_default().to_string()
    };
    let sealed = line(&sealed);
    assert!(
        sealed.contains("MACs present, not checked (no --key-file)"),
        "{sealed}"
    );
    let signed = line(&signed);
    assert!(
        signed.contains("its writer signed checkpoints, not checked (no --public-key)"),
        "{signed}"
    );
    let plain = line(&plain);
    assert!(
        plain.contains("no MACs (written without an HMAC key)"),
        "{plain}"
    );
    assert!(
        plain.contains("no checkpoint checked (no --public-key)"),
        "{plain}"
    );
}

/// A checkpoint signed by another key than the one pinned: the chain fails, and its problem
/// (the first reason a reader meets) names the refused checkpoint file and why, not a
/// checkpoint "deleted, or never written".
#[test]
fn a_checkpoint_signed_by_another_key_is_the_reason_the_chain_gives() {
    let tmp = tempfile::tempdir().unwrap();
    let (log, _) = signed_demo(tmp.path());
    let other = tmp.path().join("other");
    let (code, out, err) = run(kvh().arg("keygen").arg("--out").arg(&other));
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = run(kvh()
        .arg("verify-log")
        .arg(&log)
        .arg("--public-key")
        .arg(other.with_extension("pub"))
        .arg("--checkpoint")
        .arg(&log));
    assert_eq!(code, 1, "{out}{err}");
    let problem = out
        .lines()
        .find(|l| l.contains("no checkpoint for chain"))
        .unwrap_or_else(|| panic!("no problem line:\n{out}"));
    assert!(
        problem.contains(
            ".ckpt was refused (checkpoint was signed by another key than the pinned public key)"
        ),
        "{problem}"
    );
    assert!(!problem.contains("deleted, or never written"), "{problem}");
}

/// An HMAC secret made as the README says (64 hex digits, as in a public key's file) given as
/// `--public-key` is a usage error (exit 2) that names the mistake, whether or not its digits
/// happen to be a point of the curve: pinned, it would read every checkpoint as forged.
#[test]
fn an_hmac_secret_given_as_the_public_key_is_a_usage_error() {
    let tmp = tempfile::tempdir().unwrap();
    let log = tmp.path().join("log");
    std::fs::create_dir(&log).unwrap();
    // A point of small order (all zeros is one) is refused as weak before this is asked.
    let key = |b: u8| ed25519_dalek::VerifyingKey::from_bytes(&[b; 32]).ok();
    let on = (0..=255u8)
        .find(|&b| key(b).is_some_and(|k| !k.is_weak()))
        .expect("a point");
    let off = (0..=255u8)
        .find(|&b| key(b).is_none())
        .expect("not a point");
    for (b, said) in [
        (on, "holds the HMAC secret given with --key-file"),
        (off, "no point of the curve): an HMAC secret"),
    ] {
        let secret = tmp.path().join(format!("hmac-{b}.key"));
        std::fs::write(&secret, format!("{}\n", format!("{b:02x}").repeat(32))).unwrap();
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
        let (code, out, err) = run(kvh()
            .arg("verify-log")
            .arg(&log)
            .arg("--key-file")
            .arg(&secret)
            .arg("--public-key")
            .arg(&secret));
        assert_eq!(code, 2, "{out}{err}");
        assert!(out.is_empty(), "{out}");
        assert!(err.contains("--public-key ") && err.contains(said), "{err}");
        assert!(!err.contains("Edwards"), "the library's own words: {err}");
    }
}

/// A file named like a log file but not a chain's (`kvh-bogus.jsonl`) is passed over by the
/// verifier (docs/forensic-log.md), beside chains too: the verdict stands, and stderr names
/// the file, so that one dropped beside the chains, or a chain's file renamed, is seen.
#[test]
fn verify_log_names_a_file_it_passed_over_beside_the_chains() {
    let tmp = tempfile::tempdir().unwrap();
    let log = tmp.path().join("log");
    short_demo(&log, &[]);
    std::fs::write(log.join("kvh-bogus.jsonl"), "{}\n").unwrap();
    let (code, out, err) = verify_log_with(&log, &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.ends_with("OK\n"), "{out}");
    assert!(
        err.contains("1 file(s) named kvh-*.jsonl are not chain files")
            && err.contains("were not read: kvh-bogus.jsonl"),
        "{err}"
    );
    // In an archive directory given too.
    let archive = tmp.path().join("archive");
    std::fs::create_dir(&archive).unwrap();
    std::fs::write(archive.join("kvh-old.jsonl"), "{}\n").unwrap();
    let (code, out, err) = run(kvh()
        .arg("verify-log")
        .arg(&log)
        .arg("--archive-dir")
        .arg(&archive));
    assert_eq!(code, 0, "{out}{err}");
    let said = format!("note: in {}, 1 file(s)", archive.display());
    assert!(
        err.contains(&said) && err.contains("were not read: kvh-old.jsonl"),
        "{err}"
    );
}

/// A sealed chain whose first record was edited fails there, before any record verified: its
/// line still says its records carry MACs, not that it was written without a key.
#[test]
fn a_sealed_chain_failing_at_its_first_record_is_not_said_to_have_no_macs() {
    let tmp = tempfile::tempdir().unwrap();
    let key = hmac_key(tmp.path());
    let log = tmp.path().join("log");
    sealed_demo(&log, &key);
    let file = std::fs::read_dir(&log)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "jsonl"))
        .unwrap();
    let text = std::fs::read_to_string(&file).unwrap();
    let edited = text.replacen("\"kind\":\"start\"", "\"kind\":\"stArt\"", 1);
    assert_ne!(edited, text, "no start record to edit");
    std::fs::write(&file, edited).unwrap();
    let (code, out, err) = verify_log_with(&log, &[]);
    assert_eq!(code, 1, "{out}{err}");
    let line = out.lines().next().unwrap_or_default();
    assert!(
        line.contains("MACs present, not checked (no --key-file)"),
        "{line}"
    );
}

/// `kvh evidence` without keys: its integrity section says the MACs and checkpoints were
/// not checked and, for a log whose chains carry them, how many do (`unchecked_sealed`,
/// `unchecked_signed` in the JSON), so that an auditor does not read a report made without
/// the keys as one made with them.
#[test]
fn evidence_without_keys_says_how_many_chains_carried_what_it_left_unchecked() {
    let tmp = tempfile::tempdir().unwrap();
    let (signed, sealed, plain) = three_logs(tmp.path());
    let evidence = |log: &Path, json: bool| {
        let mut cmd = kvh();
        cmd.arg("evidence").arg(log);
        if json {
            cmd.arg("--json");
        }
        let (code, out, err) = run(&mut cmd);
        assert_eq!(code, 0, "{out}{err}");
        out
    };
    let macs = "MACs: not checked (no --key-file given), though the records of 1 of 1 chains \
                carry them.";
    let ckpts = "Signed checkpoints: not checked (no --public-key given), though the writers \
                 of 1 of 1 chains signed them.";
    let text = evidence(&sealed, false);
    assert!(text.contains(macs) && !text.contains(ckpts), "{text}");
    let text = evidence(&signed, false);
    assert!(text.contains(ckpts) && !text.contains(macs), "{text}");
    // And in the headline: a chain cut at its end verifies without its checkpoints.
    let cut = "Not checked: the signed checkpoints (no --public-key), so records cut off a \
               chain's end would not be seen.";
    let headline = text.lines().find(|l| l.starts_with("- VERIFIED")).unwrap();
    assert!(headline.ends_with(cut), "{headline}");
    assert!(!evidence(&sealed, false).contains(cut) && !evidence(&plain, false).contains(cut));
    let text = evidence(&plain, false);
    assert!(
        text.contains("- MACs: not checked (no --key-file given).\n"),
        "{text}"
    );
    assert!(
        text.contains("- Signed checkpoints: not checked (no --public-key given).\n"),
        "{text}"
    );
    for (log, sealed_n, signed_n) in [(&sealed, 1, 0), (&signed, 0, 1), (&plain, 0, 0)] {
        let v: serde_json::Value = serde_json::from_str(&evidence(log, true)).unwrap();
        let i = &v["integrity"];
        assert_eq!(
            (
                i["unchecked_sealed"].as_u64(),
                i["unchecked_signed"].as_u64()
            ),
            (Some(sealed_n), Some(signed_n)),
            "{}: {i}",
            log.display()
        );
    }
}

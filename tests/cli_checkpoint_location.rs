//! Where the verbs look for signed checkpoints, and what they say when the place is wrong:
//! a `--checkpoint` naming another file of the log (a chain file, a prune manifest, a key) is
//! a usage error (2), and a log whose checkpoints are kept apart (`KVH_CHECKPOINT_DIR`)
//! verified without `--checkpoint` fails as before, with a hint naming the option. A
//! checkpoint whose content was replaced stays tampering (1). A checkpoint directory that
//! cannot be one refuses the start-up before the log directory is made, named as it was given.

mod cli_common;

use std::path::{Path, PathBuf};

use cli_common::{host_demo, kvh, run};

/// A signed log in DIR/log with its checkpoints in DIR/ckpt, and the key pair's paths.
struct SignedLog {
    _tmp: tempfile::TempDir,
    log: PathBuf,
    ckpt: PathBuf,
    public: PathBuf,
    private: PathBuf,
}

fn signed_log() -> SignedLog {
    let tmp = tempfile::tempdir().unwrap();
    let prefix = tmp.path().join("signer");
    let (code, _, err) = run(kvh().arg("keygen").arg("--out").arg(&prefix));
    assert_eq!(code, 0, "keygen: {err}");
    let (log, ckpt) = (tmp.path().join("log"), tmp.path().join("ckpt"));
    let (code, _, err) = run(host_demo(1, 2)
        .arg("--log-dir")
        .arg(&log)
        .arg("--checkpoint-dir")
        .arg(&ckpt)
        .env("KVH_SIGNING_KEY_FILE", prefix.with_extension("key")));
    assert_eq!(code, 0, "demo: {err}");
    SignedLog {
        log,
        ckpt,
        public: prefix.with_extension("pub"),
        private: prefix.with_extension("key"),
        _tmp: tmp,
    }
}

fn verify(s: &SignedLog, checkpoint: Option<&Path>) -> (i32, String, String) {
    verb("verify-log", s, checkpoint)
}

fn verb(name: &str, s: &SignedLog, checkpoint: Option<&Path>) -> (i32, String, String) {
    let mut c = kvh();
    c.arg(name).arg(&s.log).arg("--public-key").arg(&s.public);
    if let Some(p) = checkpoint {
        c.arg("--checkpoint").arg(p);
    }
    run(&mut c)
}

fn first_with_extension(dir: &Path, ext: &str) -> PathBuf {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == ext))
        .unwrap_or_else(|| panic!("no .{ext} file in {}", dir.display()))
}

#[test]
fn checkpoints_kept_apart_fail_without_checkpoint_and_the_hint_names_it() {
    let s = signed_log();
    let (code, _, err) = verify(&s, Some(&s.ckpt));
    assert_eq!(code, 0, "with --checkpoint: {err}");
    assert!(
        !err.contains("KVH_CHECKPOINT_DIR"),
        "a hint on a pass: {err}"
    );

    let (code, out, err) = verify(&s, None);
    assert_eq!(code, 1, "without --checkpoint: {out}{err}");
    assert!(out.contains("no checkpoint"), "report: {out}");
    assert!(
        err.contains("--checkpoint") && err.contains("KVH_CHECKPOINT_DIR"),
        "no hint of --checkpoint: {err}"
    );
    assert!(
        err.contains(&s.log.display().to_string()),
        "the hint does not name where it looked: {err}"
    );

    let (code, _, err) = verb("evidence", &s, Some(&s.ckpt));
    assert_eq!(code, 0, "evidence with --checkpoint: {err}");
    let (code, _, err) = verb("evidence", &s, None);
    assert_eq!(code, 1, "evidence without --checkpoint: {err}");
    assert!(
        err.contains("--checkpoint") && err.contains("KVH_CHECKPOINT_DIR"),
        "no hint of --checkpoint from evidence: {err}"
    );
}

/// A `--checkpoint` directory holding no checkpoint (a volume not mounted, a mistyped path)
/// fails as a deletion does, the verdict unchanged, with a hint naming that directory.
#[test]
fn an_empty_checkpoint_directory_fails_with_a_hint_naming_it() {
    let s = signed_log();
    let empty = s.log.parent().unwrap().join("not-mounted");
    std::fs::create_dir(&empty).unwrap();
    for name in ["verify-log", "evidence"] {
        let (code, out, err) = verb(name, &s, Some(&empty));
        assert_eq!(code, 1, "{name} with an empty --checkpoint: {out}{err}");
        assert!(
            err.contains("--checkpoint") && err.contains(&empty.display().to_string()),
            "{name}: the hint does not name the empty --checkpoint directory: {err}"
        );
    }
    // The right directory: no hint.
    let (code, _, err) = verify(&s, Some(&s.ckpt));
    assert_eq!(code, 0, "{err}");
    assert!(!err.contains("mounted"), "a hint on a pass: {err}");
}

#[test]
fn another_file_of_the_log_given_as_checkpoint_is_a_usage_error() {
    let s = signed_log();
    let chain_file = first_with_extension(&s.log, "jsonl");
    // Judged by its name, as a manifest prune-log writes beside the chain files.
    let manifest = s.ckpt.with_file_name("kvh-p1-t1.pruned.json");
    std::fs::write(&manifest, b"{}").unwrap();
    for (given, what) in [
        (&chain_file, "a chain file of the log"),
        (&manifest, "a prune manifest"),
        (&s.public, "a key file"),
        (&s.private, "a key file"),
    ] {
        let (code, out, err) = verify(&s, Some(given));
        assert_eq!(code, 2, "--checkpoint {}: {out}{err}", given.display());
        assert!(
            err.contains(what),
            "--checkpoint {}: {err}",
            given.display()
        );
        assert!(out.is_empty(), "a report for a refused command line: {out}");
    }
}

#[test]
fn a_checkpoint_whose_content_was_replaced_is_still_tampering() {
    let s = signed_log();
    let ckpt = first_with_extension(&s.ckpt, "ckpt");
    let chain_file = first_with_extension(&s.log, "jsonl");
    std::fs::copy(&chain_file, &ckpt).unwrap();
    let (code, out, err) = verify(&s, Some(&s.ckpt));
    assert_eq!(code, 1, "{out}{err}");
    let (code, out, err) = verify(&s, Some(&ckpt));
    assert_eq!(code, 1, "{out}{err}");
}

/// `kvh demo --checkpoint-dir FILE`: refused (2) by the option's name, and no log directory is
/// left behind; the same through the policy (`KVH_CHECKPOINT_DIR`), named by the variable.
#[test]
fn a_checkpoint_directory_that_is_a_file_refuses_the_start_and_makes_no_log_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let prefix = tmp.path().join("signer");
    let (code, _, err) = run(kvh().arg("keygen").arg("--out").arg(&prefix));
    assert_eq!(code, 0, "keygen: {err}");
    let not_a_dir = tmp.path().join("a-file");
    std::fs::write(&not_a_dir, b"").unwrap();
    let key = prefix.with_extension("key");

    let log = tmp.path().join("log-option");
    let (code, _, err) = run(host_demo(1, 1)
        .arg("--log-dir")
        .arg(&log)
        .arg("--checkpoint-dir")
        .arg(&not_a_dir)
        .env("KVH_SIGNING_KEY_FILE", &key));
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("--checkpoint-dir") && err.contains("not a directory"),
        "{err}"
    );
    assert!(!log.exists(), "the refused run made {}", log.display());

    let log = tmp.path().join("log-policy");
    let (code, _, err) = run(host_demo(1, 1)
        .env("KVH_LOG_DIR", &log)
        .env("KVH_CHECKPOINT_DIR", &not_a_dir)
        .env("KVH_SIGNING_KEY_FILE", &key));
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("KVH_CHECKPOINT_DIR") && err.contains("not a directory"),
        "{err}"
    );
    assert!(!log.exists(), "the refused start made {}", log.display());
}

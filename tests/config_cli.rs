//! `kvh config`, run as the built binary: the policy of an environment or of a file, its exit
//! codes (0 valid, 1 weakened with --strict, 2 invalid), and its digest against the
//! `config_digest` of a real process's `start` record.

#[path = "cli_common/mod.rs"]
mod cli_common;

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::Command;

use cli_common::{kvh, run};
use serde_json::Value;

/// `kvh config ARGS` with no `KVH_*` variable and no HMAC secret from the test's environment.
fn config(args: &[&str]) -> Command {
    let mut c = kvh();
    c.env_remove("FORENSIC_HMAC_SECRET")
        .arg("config")
        .args(args);
    c
}

/// The variables of a policy that weakens nothing (no file is opened by `kvh config`).
const HARDENED: &[(&str, &str)] = &[
    ("KVH_LOG_DIR", "/var/log/kvh"),
    ("KVH_HMAC_KEY_FILE", "/run/keys/hmac.key"),
    ("KVH_SIGNING_KEY_FILE", "/run/keys/ckpt.key"),
    ("KVH_METRICS_FILE", "/run/kvh/kvh.prom"),
];

fn json_of(cmd: &mut Command) -> Value {
    let (code, out, err) = run(cmd.arg("--json"));
    assert_eq!(code, 0, "{out}{err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

fn weakened_keys(report: &Value) -> Vec<String> {
    report["weakened"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["key"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn a_valid_policy_exits_0_and_strict_exits_1_only_when_a_control_is_weakened() {
    let (code, out, err) = run(&mut config(&[]));
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("weakened controls (2):"), "{out}");

    let (code, out, err) = run(&mut config(&["--strict"]));
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("2 control(s) off or weakened"), "{err}");
    assert!(out.contains("log_dir = unset: no forensic log"), "{out}");

    let (code, out, err) = run(config(&["--strict"]).envs(HARDENED.iter().copied()));
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("weakened controls: none"), "{out}");

    let (code, out, err) = run(config(&["--strict"])
        .envs(HARDENED.iter().copied())
        .env("KVH_TENANT_ISOLATION", "off"));
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.contains("tenant_isolation = off:"), "{out}");
}

#[test]
fn an_invalid_policy_exits_2_naming_the_key() {
    for (name, value) in [
        ("KVH_BATCH_SIZE", "0"),
        ("KVH_COVERAGE_TRESHOLD", "0.5"),
        ("KVH_KV_GATE", "warn"),
    ] {
        let (code, out, err) = run(config(&[]).env(name, value));
        assert_eq!(code, 2, "{name}={value}: {out}{err}");
        assert!(err.contains(name), "{name}: {err}");
        assert!(out.is_empty(), "an invalid policy printed a report: {out}");
    }
    // Keys valid one by one that the library refuses together.
    let (code, _, err) = run(config(&[])
        .env("KVH_LOG_DIR", "/l")
        .env("KVH_CHECKPOINT_DIR", "/c"));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("KVH_SIGNING_KEY_FILE"), "{err}");
}

#[test]
fn a_variable_that_is_not_utf8_is_refused_by_kvh_config_and_by_the_library() {
    let not_utf8 = OsStr::from_bytes(b"/var/log/kvh-\xff");
    let (code, _, err) = run(config(&[]).env("KVH_LOG_DIR", not_utf8));
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("KVH_LOG_DIR") && err.contains("UTF-8"),
        "{err}"
    );
    // Bytes that are not text are not shown: a key put in a variable by mistake (one that is
    // no configuration key) stays out of the terminal and the container logs.
    let key = OsStr::from_bytes(b"s3cr3tKEY\xff\x01");
    let (code, _, err) = run(config(&[]).env("KVH_HMAC_KEY", key));
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("KVH_HMAC_KEY") && !err.contains("s3cr3t"),
        "{err}"
    );
    // Nor is the text value of a variable whose name is not UTF-8 (never a setting).
    let name = OsStr::from_bytes(b"KVH_\xffTOKEN");
    let (code, _, err) = run(config(&[]).env(name, "ghp_s3cr3t"));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("UTF-8") && !err.contains("s3cr3t"), "{err}");
    // The library's own start reads the policy the same way: no log would be no evidence.
    let (code, _, err) = run(kvh()
        .args(["demo", "--tenants", "1", "--requests", "1"])
        .env("KVH_LOG_DIR", not_utf8));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("KVH_LOG_DIR"), "{err}");
}

#[test]
fn the_digest_is_the_config_digest_of_a_processs_start_record() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let env = [
        ("KVH_LOG_DIR", log.to_str().unwrap()),
        ("KVH_BATCH_SIZE", "8"),
        ("KVH_BACKEND", "host"),
    ];
    let (code, out, err) = run(kvh()
        .args([
            "demo",
            "--tenants",
            "1",
            "--requests",
            "2",
            "--decode-tokens",
            "16",
        ])
        .envs(env));
    assert_eq!(code, 0, "{out}{err}");
    let started = start_digests(&log);
    assert_eq!(started.len(), 1, "{started:?}");

    let report = json_of(config(&[]).envs(env));
    assert_eq!(report["config_digest"].as_str(), Some(started[0].as_str()));
    // Another policy, another digest.
    let other = json_of(config(&[]).envs(env).env("KVH_BATCH_SIZE", "9"));
    assert_ne!(other["config_digest"], report["config_digest"]);
}

/// The `config_digest` of every `start` record in the log directory.
fn start_digests(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(OsStr::to_str) != Some("jsonl") {
            continue;
        }
        for line in std::fs::read_to_string(&path).unwrap().lines() {
            let record: Value = serde_json::from_str(line).unwrap();
            if record["kind"] == "start" {
                out.push(record["config_digest"].as_str().unwrap().to_string());
            }
        }
    }
    out
}

#[test]
fn sources_and_values_follow_the_file_and_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("policy.toml");
    std::fs::write(&file, "batch_size = 8\nkv_gate = \"enforce\"\n").unwrap();
    let report = json_of(
        config(&[])
            .env("KVH_CONFIG", &file)
            .env("KVH_KV_GATE", "off"),
    );
    assert_eq!(report["origin"], "environment");
    assert_eq!(report["file"].as_str(), file.to_str());
    let settings = report["settings"].as_array().unwrap();
    assert_eq!(settings.len(), kvhygiene::config::Config::keys().count());
    let setting = |k: &str| settings.iter().find(|s| s["key"] == k).unwrap().clone();
    assert_eq!(setting("batch_size")["source"], "file");
    assert_eq!(setting("batch_size")["value"], 8);
    assert_eq!(setting("kv_gate")["source"], "env");
    assert_eq!(setting("kv_gate")["value"], "off");
    assert_eq!(setting("double_pass")["source"], "default");
    assert_eq!(
        weakened_keys(&report),
        ["kv_gate", "log_dir", "metrics_file"]
    );
}

#[test]
fn file_alone_ignores_the_environment_and_names_its_errors() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("policy.toml");
    std::fs::write(&file, "kv_gate = \"enforce\"\n").unwrap();
    let f = file.to_str().unwrap();
    // An invalid variable does not matter: only the file is read.
    let report = json_of(
        config(&["--file", f])
            .env("KVH_BATCH_SIZE", "0")
            .env("FORENSIC_HMAC_SECRET", "x".repeat(64)),
    );
    assert_eq!(report["origin"], "file");
    assert_eq!(report["hmac_secret_in_environment"], false);
    let kv_gate = &report["settings"][11];
    assert_eq!(
        (&kv_gate["key"], &kv_gate["source"]),
        (&"kv_gate".into(), &"file".into())
    );
    // Its digest is a process's whose only setting is KVH_CONFIG naming the file.
    let via_env = json_of(config(&[]).env("KVH_CONFIG", &file));
    assert_eq!(report["config_digest"], via_env["config_digest"]);

    std::fs::write(&file, "kv_gate = \"enforce\"\nbatch_size = [1]\n").unwrap();
    let (code, _, err) = run(&mut config(&["--file", f]));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("batch_size") && err.contains(f), "{err}");

    // A file the TOML reader refuses, and one that is not there, are named as given: no
    // KVH_CONFIG was set to send the reader to.
    std::fs::write(&file, "kv_gate = enforce\n").unwrap();
    let (code, _, err) = run(&mut config(&["--file", f]));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("line 1") && err.contains(f), "{err}");
    assert!(!err.contains("KVH_CONFIG"), "{err}");

    let missing = dir.path().join("missing.toml");
    let (code, _, err) = run(&mut config(&["--file", missing.to_str().unwrap()]));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("missing.toml"), "{err}");
    assert!(!err.contains("KVH_CONFIG"), "{err}");

    // With a log directory, a secret of this environment the library would refuse (too
    // short) is not the file's: the file passes alone as it would anywhere.
    let logs = dir.path().join("logs");
    std::fs::write(&file, format!("log_dir = {:?}\n", logs.to_str().unwrap())).unwrap();
    let (code, out, err) = run(config(&["--file", f]).env("FORENSIC_HMAC_SECRET", "x"));
    assert_eq!(code, 0, "{out}{err}");
    let (code, _, err) = run(config(&[])
        .env("KVH_CONFIG", &file)
        .env("FORENSIC_HMAC_SECRET", "x"));
    assert_eq!(code, 2, "the environment's own check: {err}");
    assert!(err.contains("FORENSIC_HMAC_SECRET"), "{err}");
}

#[test]
fn the_hmac_secret_counts_when_set_and_is_never_printed() {
    let secret = "5ecret-".repeat(10);
    let without_key: Vec<_> = HARDENED
        .iter()
        .copied()
        .filter(|(k, _)| *k != "KVH_HMAC_KEY_FILE")
        .collect();
    let report = json_of(config(&[]).envs(without_key.iter().copied()));
    assert_eq!(weakened_keys(&report), ["hmac_key_file"]);

    for json in [false, true] {
        let mut cmd = config(&["--strict"]);
        cmd.envs(without_key.iter().copied())
            .env("FORENSIC_HMAC_SECRET", &secret);
        if json {
            cmd.arg("--json");
        }
        let (code, out, err) = run(&mut cmd);
        assert_eq!(code, 0, "{out}{err}");
        assert!(
            !out.contains(&secret) && !err.contains(&secret),
            "the secret was printed"
        );
    }
}

#[test]
fn help_teaches_the_exit_codes_and_the_checks() {
    let (code, out, _) = run(&mut config(&["--help"]));
    assert_eq!(code, 0);
    for needle in [
        "--strict",
        "--file",
        "config_digest",
        "Exit status",
        "kv_gate=off",
    ] {
        assert!(out.contains(needle), "--help lacks {needle}:\n{out}");
    }
}

#[test]
fn kvh_preload_is_judged_as_the_interposers_read_it() {
    let (code, out, err) = run(config(&["--strict"])
        .envs(HARDENED.iter().copied())
        .env("KVH_PRELOAD", " Off "));
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.contains("KVH_PRELOAD = off:"), "{out}");
    let (code, out, err) = run(config(&["--strict"])
        .envs(HARDENED.iter().copied())
        .env("KVH_PRELOAD", "on"));
    assert_eq!(code, 0, "{out}{err}");
    // Read as every other switch: the other spellings of on and off are those switches.
    for (spelling, read) in [
        ("1", "on"),
        ("Yes", "on"),
        ("true", "on"),
        ("0", "off"),
        ("no", "off"),
        (" FALSE ", "off"),
    ] {
        let (code, out, err) = run(config(&["--strict"])
            .envs(HARDENED.iter().copied())
            .env("KVH_PRELOAD", spelling));
        assert_eq!(
            code,
            if read == "on" { 0 } else { 1 },
            "{spelling:?}: {out}{err}"
        );
        let shown = if read == "on" {
            "KVH_PRELOAD: on"
        } else {
            "KVH_PRELOAD = off:"
        };
        assert!(out.contains(shown), "{spelling:?}: {out}");
    }
    // A value the interposers refuse (they would fail every allocation) is an invalid policy.
    for bad in ["of", "", "enabled", "/usr/lib/libkvhygiene_preload.so"] {
        let (code, out, err) = run(config(&[]).env("KVH_PRELOAD", bad));
        assert_eq!(code, 2, "{bad:?}: {out}{err}");
        assert!(err.contains("KVH_PRELOAD"), "{err}");
    }
    let (code, _, err) = run(config(&[]).env("KVH_PRELOAD", OsStr::from_bytes(b"o\xffn")));
    assert_eq!(code, 2, "{err}");
}

#[test]
fn an_hmac_secret_the_library_would_refuse_is_an_invalid_policy() {
    for short in ["", "short"] {
        let (code, out, err) = run(config(&[])
            .envs(HARDENED.iter().copied())
            .env("FORENSIC_HMAC_SECRET", short));
        assert_eq!(code, 2, "{short:?}: {out}{err}");
        assert!(err.contains(&format!("is {} bytes", short.len())), "{err}");
        // The library agrees: the demo opens the log as the runtime does.
        let dir = tempfile::tempdir().unwrap();
        let (code, _, err) = run(kvh()
            .args(["demo", "--tenants", "1", "--requests", "1"])
            .env("KVH_LOG_DIR", dir.path().join("log"))
            .env("FORENSIC_HMAC_SECRET", short));
        assert_eq!(code, 2, "{err}");
    }
    // Without a log the secret is never read.
    let (code, out, err) = run(config(&[]).env("FORENSIC_HMAC_SECRET", "short"));
    assert_eq!(code, 0, "{out}{err}");
}

/// The shortest secret the library accepts (16 bytes) is valid, one byte less is not; the
/// library draws the same line.
#[test]
fn the_hmac_secret_length_is_judged_at_the_librarys_limit() {
    for (len, want) in [(15, 2), (16, 0)] {
        let secret = "k".repeat(len);
        let (code, out, err) = run(config(&[])
            .envs(HARDENED.iter().copied())
            .env("FORENSIC_HMAC_SECRET", &secret));
        assert_eq!(code, want, "{len} bytes: {out}{err}");
        let dir = tempfile::tempdir().unwrap();
        let (code, _, err) = run(kvh()
            .args(["demo", "--tenants", "1", "--requests", "1"])
            .env("KVH_BACKEND", "host")
            .env("KVH_LOG_DIR", dir.path().join("log"))
            .env("FORENSIC_HMAC_SECRET", &secret));
        assert_eq!(code, want, "{len} bytes, the library: {err}");
    }
}

#[test]
fn variables_of_other_readers_need_not_be_utf8() {
    let (code, out, err) =
        run(config(&[]).env("KVH_LIBRARY", OsStr::from_bytes(b"/opt/\xff/lib.so")));
    assert_eq!(code, 0, "{out}{err}");
}

#[test]
fn the_text_report_passes_no_control_character_of_the_policy_to_the_terminal() {
    // A policy file's paths are text its author chose: an escape sequence in one (here one
    // that hides all that follows) or a line break must not reach the operator's terminal,
    // where it could hide or forge the list of weakened controls.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("policy.toml");
    std::fs::write(
        &file,
        "kv_gate = \"off\"\n\
         log_dir = \"/var/log/kvh\\u001b[8m\\nweakened controls: none\"\n",
    )
    .unwrap();
    let (code, out, err) = run(&mut config(&["--file", file.to_str().unwrap()]));
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        !out.chars().any(|c| c.is_control() && c != '\n'),
        "a control character of the policy reached stdout: {out:?}"
    );
    assert_eq!(
        out.lines()
            .filter(|l| l.starts_with("weakened controls"))
            .count(),
        1,
        "a value forged a line of the report: {out}"
    );
    assert!(out.contains("  kv_gate = off:"), "{out}");
}

/// Runs `cmd` for at most `limit`; `None` (the process killed) when it is still running then.
fn run_for(cmd: &mut Command, limit: std::time::Duration) -> Option<(i32, String)> {
    use std::io::Read;
    let mut child = cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let began = std::time::Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            return Some((status.code().unwrap_or(-1), err));
        }
        if began.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn a_policy_file_that_is_a_fifo_is_refused_without_waiting_for_a_writer() {
    // KVH_CONFIG (read by the library at its first allocation) or --file naming a FIFO that
    // nobody writes: the policy is refused as not a regular file, promptly, rather than
    // waiting for ever.
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("policy.toml");
    let c = std::ffi::CString::new(fifo.as_os_str().as_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let limit = std::time::Duration::from_secs(10);
    let by_file = run_for(&mut config(&["--file", fifo.to_str().unwrap()]), limit);
    let by_env = run_for(config(&[]).env("KVH_CONFIG", &fifo), limit);
    for (how, result) in [("--file", by_file), ("KVH_CONFIG", by_env)] {
        let (code, err) = result.unwrap_or_else(|| panic!("{how}: still waiting after {limit:?}"));
        assert_eq!(code, 2, "{how}: {err}");
        assert!(err.contains("policy.toml"), "{how}: {err}");
    }
}

#[test]
fn a_policy_file_that_cannot_be_read_is_named_as_the_policy_file() {
    // A KVH_CONFIG naming a file that is not there: the message says which file it is, not
    // only the system's "No such file or directory" after a path.
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("policy.toml");
    let (code, _, err) = run(config(&[]).env("KVH_CONFIG", &missing));
    assert_eq!(code, 2, "{err}");
    let named = format!(
        "KVH_CONFIG={:?}: cannot read the policy file",
        missing.display().to_string()
    );
    assert!(err.contains(&named), "{err}");
}

#[test]
fn a_report_that_cannot_be_written_exits_2() {
    // As the other reporting verbs: a policy report lost to a full disk is not a success.
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let (code, _, err) = run(config(&["--json"]).stdout(full));
    assert_eq!(code, 2, "{err}");
}

#[test]
fn an_unknown_key_of_a_policy_file_reaches_the_terminal_without_its_control_characters() {
    // A key of a policy file is text its author chose, as its values are: the message that
    // names an unknown one must not pass an escape sequence (here one that sets the
    // terminal's title, then one that erases the line) to the operator's terminal.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("policy.toml");
    std::fs::write(
        &file,
        "\"batch_size\\u001b]0;title\\u0007\\u001b[2K\" = 64\n",
    )
    .unwrap();
    let (code, out, err) = run(&mut config(&["--file", file.to_str().unwrap()]));
    assert_eq!(code, 2, "{out}{err}");
    assert!(err.contains("policy.toml"), "{err}");
    assert!(
        !err.chars().any(|c| c.is_control() && c != '\n'),
        "a control character of the policy reached stderr: {err:?}"
    );
}

/// Whether `text` holds a control character other than a line break.
fn has_control(text: &str) -> bool {
    text.chars().any(|c| c.is_control() && c != '\n')
}

#[test]
fn a_syntax_error_of_a_policy_file_reaches_the_terminal_without_its_control_characters() {
    // A TOML error message quotes the file's text (here a key given twice): that text was
    // chosen by whoever can write the policy file, as its keys and values are, and an escape
    // sequence in it (one that sets the terminal's title, then one that erases the line)
    // must not reach the operator's terminal, whichever verb reads the file.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("policy.toml");
    let key = "\"batch_size\\u001b]0;title\\u0007\\u001b[2K\"";
    std::fs::write(&file, format!("{key} = 1\n{key} = 2\n")).unwrap();
    let path = file.to_str().unwrap();
    let cases = [
        ("config --file", run(&mut config(&["--file", path]))),
        ("config", run(config(&[]).env("KVH_CONFIG", path))),
        (
            "preflight",
            run(kvh()
                .args(["preflight", "--skip-backend"])
                .env("KVH_CONFIG", path)),
        ),
    ];
    for (how, (code, out, err)) in cases {
        assert_eq!(code, 2, "{how}: {out}{err}");
        assert!(err.contains("policy.toml"), "{how}: {err}");
        assert!(
            !has_control(&err),
            "{how}: a control character of the policy file reached stderr: {err:?}"
        );
    }
}

#[test]
fn a_kvh_config_path_in_an_error_reaches_the_terminal_without_its_control_characters() {
    // The report prints KVH_CONFIG's path with its control characters escaped; the message
    // saying that the file cannot be read must do the same (here a path holding a sequence
    // that erases the line, then a line break that forges a second one).
    let dir = tempfile::tempdir().unwrap();
    let missing = dir
        .path()
        .join("policy\u{1b}[2K\nkvh config: weakened controls: none.toml");
    for (how, mut cmd) in [
        ("config", config(&[])),
        ("preflight", {
            let mut c = kvh();
            c.args(["preflight", "--skip-backend"]);
            c
        }),
    ] {
        let (code, out, err) = run(cmd.env("KVH_CONFIG", &missing));
        assert_eq!(code, 2, "{how}: {out}{err}");
        assert!(
            !has_control(&err),
            "{how}: a control character of KVH_CONFIG reached stderr: {err:?}"
        );
        assert_eq!(
            err.lines().count(),
            1,
            "{how}: the path forged a line of the message: {err:?}"
        );
    }
}

#[test]
fn a_variable_name_that_is_not_utf8_reaches_the_terminal_without_its_control_characters() {
    // A variable's value is quoted with its control characters escaped; its name must be
    // too, when it is the part that is not UTF-8 and is shown lossily.
    let name = OsStr::from_bytes(b"KVH_X\x1b]0;title\x07\x1b[2K\xff");
    let (code, out, err) = run(config(&[]).env(name, "1"));
    assert_eq!(code, 2, "{out}{err}");
    assert!(err.contains("UTF-8"), "{err}");
    assert!(
        !has_control(&err),
        "a control character of a variable's name reached stderr: {err:?}"
    );
}

/// A variable named twice in the environment (an `execve` whose environment repeats a name)
/// is read as C's `getenv` and Rust's `std::env::var` read it, by its first entry (as the
/// policy loader itself reads `KVH_CONFIG`, and the library reads `KVH_OOM` and
/// `KVH_PRELOAD`), or refused naming it, as a key given twice in a policy file is: the
/// policy never runs with another value than the one other readers of the environment see.
#[test]
fn a_variable_named_twice_in_the_environment_is_not_read_by_its_last_entry() {
    use std::ffi::CString;
    use std::os::unix::process::CommandExt;

    /// The `execve` arguments, made before the fork (nothing is allocated after it).
    struct Exec {
        _strings: Vec<CString>,
        path: *const libc::c_char,
        argv: Vec<*const libc::c_char>,
        envp: Vec<*const libc::c_char>,
    }
    // SAFETY: the pointers point into `_strings`, owned by the struct and never changed.
    unsafe impl Send for Exec {}
    unsafe impl Sync for Exec {}

    let cs = |s: &str| CString::new(s).unwrap();
    let path = cs(env!("CARGO_BIN_EXE_kvh"));
    let args = ["kvh", "config", "--json"].map(cs);
    let env = [
        "KVH_TENANT_ISOLATION=strict",
        "KVH_TENANT_ISOLATION=off",
        "PATH=/usr/bin:/bin",
    ]
    .map(cs);
    let nul = std::iter::once(std::ptr::null());
    let exec = Exec {
        path: path.as_ptr(),
        argv: args.iter().map(|a| a.as_ptr()).chain(nul.clone()).collect(),
        envp: env.iter().map(|e| e.as_ptr()).chain(nul).collect(),
        _strings: std::iter::once(path.clone())
            .chain(args.iter().cloned())
            .chain(env.iter().cloned())
            .collect(),
    };
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kvh"));
    // SAFETY: the closure only calls execve (async-signal-safe) on memory made before the
    // fork, and reads errno when it returns.
    unsafe {
        cmd.pre_exec(move || {
            let e = &exec;
            libc::execve(e.path, e.argv.as_ptr(), e.envp.as_ptr());
            Err(std::io::Error::last_os_error())
        });
    }
    let (code, out, err) = run(&mut cmd);
    if code == 2 {
        assert!(err.contains("KVH_TENANT_ISOLATION"), "{err}");
        return;
    }
    assert_eq!(code, 0, "{out}{err}");
    let report: Value = serde_json::from_str(&out).unwrap();
    let setting = report["settings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["key"] == "tenant_isolation")
        .unwrap()
        .clone();
    assert_eq!(
        setting["value"], "strict",
        "getenv(\"KVH_TENANT_ISOLATION\") is \"strict\" in this environment; the policy read \
         {setting}"
    );
}

/// A log or checkpoint directory named with `..` after a directory name (`a/../chains`) is
/// refused by the start-up whatever the file system holds (the name alone decides it), so
/// `kvh config` must refuse it too (exit 2, naming the key), as deploy/README.md promises of
/// `kvh config --strict`: "exits 2 on a value the library would refuse at start, naming the
/// key". It must not call the policy valid.
#[test]
fn a_directory_named_with_dot_dot_after_a_name_is_refused_as_the_start_up_refuses_it() {
    let tmp = tempfile::tempdir().unwrap();
    let log = format!("{}/a/../chains", tmp.path().display());
    // The start-up (kvh demo opens the log as the library does) refuses the name.
    let (code, _, err) = run(kvh()
        .args(["demo", "--tenants", "1", "--requests", "1"])
        .env("KVH_LOG_DIR", &log));
    assert_eq!(code, 2, "the start-up accepted KVH_LOG_DIR={log}: {err}");
    let (code, out, err) = run(config(&[]).env("KVH_LOG_DIR", &log));
    assert_eq!(
        code, 2,
        "kvh config calls KVH_LOG_DIR={log} valid, which the start-up refuses ({err}):\n{out}"
    );
    assert!(err.contains("KVH_LOG_DIR"), "{err}");

    let ckpt = format!("{}/x/../checkpoints", tmp.path().display());
    let (code, out, err) = run(config(&[])
        .env("KVH_LOG_DIR", tmp.path().join("log"))
        .env("KVH_SIGNING_KEY_FILE", tmp.path().join("ckpt.key"))
        .env("KVH_CHECKPOINT_DIR", &ckpt));
    assert_eq!(
        code, 2,
        "kvh config calls KVH_CHECKPOINT_DIR={ckpt} valid, which the start-up refuses:\n{out}{err}"
    );
    assert!(err.contains("KVH_CHECKPOINT_DIR"), "{err}");
}

/// `KVH_SIGNING_KEY_FILE` naming `kvh keygen`'s public key (`PREFIX.pub`, which sits next to
/// `PREFIX.key` in the Secret) is refused by the start-up from its name alone, whatever the
/// file holds. `kvh config` must refuse it too (exit 2, naming the key) rather than call the
/// policy valid and leave the refusal to the server's first CUDA allocation.
#[test]
fn a_signing_key_file_named_pub_is_refused_as_the_start_up_refuses_it() {
    let tmp = tempfile::tempdir().unwrap();
    let (code, _, err) = run(kvh().args(["keygen", "--out"]).arg(tmp.path().join("ckpt")));
    assert_eq!(code, 0, "{err}");
    let public = tmp.path().join("ckpt.pub");
    let log = tmp.path().join("log");
    // The start-up (kvh demo opens the log as the library does) refuses it.
    let (code, _, err) = run(kvh()
        .args(["demo", "--tenants", "1", "--requests", "1"])
        .env("KVH_LOG_DIR", &log)
        .env("KVH_SIGNING_KEY_FILE", &public));
    assert_eq!(
        code, 2,
        "the start-up accepted the .pub file as signing key: {err}"
    );
    let (code, out, err) = run(config(&[])
        .env("KVH_LOG_DIR", &log)
        .env("KVH_SIGNING_KEY_FILE", &public));
    assert_eq!(
        code, 2,
        "kvh config calls KVH_SIGNING_KEY_FILE={} valid, which the start-up refuses ({err}):\n{out}",
        public.display()
    );
    assert!(err.contains("KVH_SIGNING_KEY_FILE"), "{err}");
}

/// The library drops one trailing newline from `FORENSIC_HMAC_SECRET` before it judges the
/// secret's length (as it does for a key file). A value of 15 bytes and a newline is therefore
/// a 15-byte secret, which the library refuses: `kvh config` judges the same secret, so it
/// refuses the policy too (exit 2) and says the length the library sees.
#[test]
fn the_hmac_secret_length_is_judged_without_the_trailing_newline_the_library_drops() {
    let secret = format!("{}\n", "k".repeat(15));
    let dir = tempfile::tempdir().unwrap();
    let (started, _, start_err) = run(kvh()
        .args(["demo", "--tenants", "1", "--requests", "1"])
        .env("KVH_BACKEND", "host")
        .env("KVH_LOG_DIR", dir.path().join("log"))
        .env("FORENSIC_HMAC_SECRET", &secret));
    assert_eq!(started, 2, "the library refuses the secret: {start_err}");
    let (code, out, err) = run(config(&[])
        .envs(HARDENED.iter().copied())
        .env("FORENSIC_HMAC_SECRET", &secret));
    assert_eq!(
        code, 2,
        "kvh config accepted a secret the library refuses ({start_err:?}): {out}{err}"
    );
    assert!(err.contains("is 15 bytes"), "{err}");
}

/// The digest covers the policy's values, not how a path was typed: `/var/log/kvh`,
/// `/var/log/kvh/` and `/var/log/./kvh` name the same log directory (the library opens it
/// by its components, and the loaded policies compare equal), so a process started with
/// any of them must carry the digest a reviewer approved for the others.
#[test]
fn the_digest_does_not_depend_on_how_the_log_directory_is_spelled() {
    let spellings = ["/var/log/kvh", "/var/log/kvh/", "/var/log/./kvh"];
    let policies: Vec<_> = spellings
        .iter()
        .map(|s| {
            kvhygiene::config::Config::from_vars(&[("KVH_LOG_DIR".to_string(), s.to_string())])
                .unwrap()
        })
        .collect();
    assert!(
        policies.iter().all(|p| *p == policies[0]),
        "the spellings load as different policies"
    );
    let digests: Vec<String> = spellings
        .iter()
        .map(|s| {
            json_of(config(&[]).env("KVH_LOG_DIR", s))["config_digest"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    for (s, d) in spellings.iter().zip(&digests) {
        assert_eq!(
            d, &digests[0],
            "KVH_LOG_DIR={s} gives another config_digest than KVH_LOG_DIR={}",
            spellings[0]
        );
    }
}

/// `KVH_CONFIG` set to an empty value names no policy file: like any other policy
/// variable set to nothing (`KVH_LOG_DIR=`), it is refused, naming the variable, rather
/// than read as unset (a launcher's `KVH_CONFIG=$POLICY` with `POLICY` unset would
/// otherwise start every process on the defaults: no forensic log, no metrics).
#[test]
fn an_empty_kvh_config_is_refused_naming_it() {
    // Another policy variable set to nothing is refused.
    let (code, _, err) = run(config(&[]).env("KVH_LOG_DIR", ""));
    assert_eq!(code, 2, "{err}");
    let (code, out, err) = run(config(&[]).env("KVH_CONFIG", ""));
    assert_eq!(
        code, 2,
        "KVH_CONFIG= was accepted as no policy file (exit {code}):\n{out}{err}"
    );
    assert!(err.contains("KVH_CONFIG"), "{err}");
}

/// A path with a trailing slash names a directory: path resolution fails with ENOTDIR when
/// `hmac.key/` names a regular file. A key file named so is not the regular file `hmac.key`:
/// the policy refuses the value naming its key (as `metrics_file` refuses `kvh.prom/`), or
/// keeps it so that the log refuses to read it, as the system does; it is not read as
/// another path than the one configured.
#[test]
fn a_key_file_named_with_a_trailing_slash_is_not_read_as_the_regular_file() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("hmac.key");
    std::fs::write(&key, "ab".repeat(32) + "\n").unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let spelled = format!("{}/", key.display());
    assert!(
        std::fs::File::open(&spelled).is_err(),
        "the system opens {spelled}"
    );
    let loaded =
        kvhygiene::config::Config::from_vars(&[("KVH_HMAC_KEY_FILE".to_string(), spelled.clone())]);
    if let Ok(config) = loaded {
        let named = config.log.hmac_key_file.clone();
        let read = kvhygiene::forensic::keys::load_secret(named.as_deref());
        assert!(
            read.is_err(),
            "KVH_HMAC_KEY_FILE={spelled} was accepted and read as the regular file {} \
             (the policy holds {named:?}), which the system refuses to open by that name",
            key.display()
        );
    }
}

/// `live_ttl_ms` accepts any integer >= 0, and the environment takes 18446744073709551615.
/// The same value written as a TOML number in a policy file is beyond TOML's integers (the
/// parser cannot hold it): refused with the usage status and a message naming the key, its
/// accepted range and the string form that holds the value.
#[test]
fn a_file_number_beyond_toml_integers_is_refused_naming_its_key_and_the_string_form() {
    let (code, _, err) = run(config(&[]).env("KVH_LIVE_TTL_MS", "18446744073709551615"));
    assert_eq!(code, 0, "the environment's value is in range: {err}");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("policy.toml");
    std::fs::write(&file, "live_ttl_ms = 18446744073709551615\n").unwrap();
    let (code, _, err) = run(&mut config(&["--file", file.to_str().unwrap()]));
    assert_eq!(code, 2, "{err}");
    for needed in [
        "live_ttl_ms accepts an integer >= 0",
        "(live_ttl_ms = \"18446744073709551615\")",
    ] {
        assert!(err.contains(needed), "the message lacks {needed:?}: {err}");
    }
}

/// A TOML integer literal beyond 64 bits may be written in any of TOML's forms (hexadecimal,
/// with digit separators). The message refusing it suggests writing the value as a string:
/// the line it suggests, written to the policy, is accepted and gives the key the value the
/// literal denotes (here 2^64 - 1), not another one.
#[test]
fn the_string_suggested_for_a_number_beyond_toml_integers_holds_the_same_value() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("policy.toml");
    for literal in ["0xFFFFFFFFFFFFFFFF", "18_446_744_073_709_551_615"] {
        std::fs::write(&file, format!("live_ttl_ms = {literal}\n")).unwrap();
        let (code, _, err) = run(&mut config(&["--file", file.to_str().unwrap()]));
        assert_ne!(code, 0, "{literal}: {err}");
        let start = err
            .find("(live_ttl_ms = ")
            .unwrap_or_else(|| panic!("{literal}: no suggested line: {err}"));
        let suggested = err[start + 1..].split(')').next().unwrap().to_string();
        std::fs::write(&file, format!("{suggested}\n")).unwrap();
        let (code, out, err2) = run(&mut config(&["--file", file.to_str().unwrap(), "--json"]));
        assert_eq!(
            code, 0,
            "{literal}: the suggested `{suggested}` is refused: {err2} (first message: {err})"
        );
        let report: Value = serde_json::from_str(&out).unwrap();
        let value = report["settings"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["key"] == "live_ttl_ms")
            .unwrap()["value"]
            .clone();
        assert_eq!(
            value.as_u64(),
            Some(u64::MAX),
            "{literal}: the suggested `{suggested}` sets live_ttl_ms to {value} (first message: {err})"
        );
    }
}

/// A key may be written quoted in TOML (`"live_ttl_ms" = ...`), and the policy takes it as the
/// bare key. A number beyond TOML's integers given to it is refused with a message naming the
/// key, its accepted range and the string form, as for the bare key.
#[test]
fn a_number_beyond_toml_integers_given_to_a_quoted_key_names_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("policy.toml");
    std::fs::write(&file, "\"live_ttl_ms\" = \"1\"\n").unwrap();
    let (code, _, err) = run(&mut config(&["--file", file.to_str().unwrap()]));
    assert_eq!(code, 0, "a quoted key is the key: {err}");
    std::fs::write(&file, "\"live_ttl_ms\" = 18446744073709551615\n").unwrap();
    let (code, _, err) = run(&mut config(&["--file", file.to_str().unwrap()]));
    assert_eq!(code, 2, "{err}");
    for needed in [
        "live_ttl_ms accepts an integer >= 0",
        "(live_ttl_ms = \"18446744073709551615\")",
    ] {
        assert!(err.contains(needed), "the message lacks {needed:?}: {err}");
    }
}

/// A number beyond TOML's integers given to a key whose range does not reach it (here above
/// what the key accepts, or beyond 64 bits altogether): the message refusing it suggests no
/// line the policy refuses in turn. A suggested `key = "..."` line, written to the policy, is
/// accepted.
#[test]
fn no_suggested_string_for_a_number_beyond_toml_integers_is_refused_in_turn() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("policy.toml");
    for line in [
        "batch_size = 99999999999999999999",
        "idle_ttl_ms = 9999999999999999999",
        "live_ttl_ms = 18446744073709551616",
    ] {
        std::fs::write(&file, format!("{line}\n")).unwrap();
        let (code, _, err) = run(&mut config(&["--file", file.to_str().unwrap()]));
        assert_ne!(code, 0, "{line}: {err}");
        let Some(start) = err.find("as a string (") else {
            continue;
        };
        let suggested = err[start + "as a string (".len()..]
            .split(')')
            .next()
            .unwrap()
            .to_string();
        std::fs::write(&file, format!("{suggested}\n")).unwrap();
        let (code, _, err2) = run(&mut config(&["--file", file.to_str().unwrap()]));
        assert_eq!(
            code, 0,
            "{line}: the suggested `{suggested}` is refused: {err2} (first message: {err})"
        );
    }
}

/// A line starting with `[` inside a multi-line string is text, not a table header: a number
/// beyond TOML's integers given to a top-level key after it is refused with the message naming
/// the key and its range, as it is without the string before it.
#[test]
fn a_bracket_line_inside_a_multi_line_string_does_not_hide_the_key_of_a_number_beyond_toml_integers(
) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("policy.toml");
    let text = "hmac_key_file = '''\n[not a table]\n'''\nlive_ttl_ms = 18446744073709551615\n";
    std::fs::write(&file, text).unwrap();
    let (code, _, err) = run(&mut config(&["--file", file.to_str().unwrap()]));
    assert_ne!(code, 0, "{err}");
    assert!(
        err.contains("live_ttl_ms accepts")
            && err.contains("(live_ttl_ms = \"18446744073709551615\")"),
        "the message names neither the key nor its range: {err}"
    );
}

/// A file starting with a byte order mark and a `[table]` header: the key below it is no
/// policy key, and the message suggests no top-level line for it.
#[test]
fn a_key_under_a_table_after_a_byte_order_mark_gets_no_suggested_line() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("policy.toml");
    let text = "\u{feff}[extra]\nlive_ttl_ms = 18446744073709551615\n";
    std::fs::write(&file, text).unwrap();
    let (code, _, err) = run(&mut config(&["--file", file.to_str().unwrap()]));
    assert_ne!(code, 0, "{err}");
    assert!(
        !err.contains("as a string ("),
        "a line is suggested for a key under [extra]: {err}"
    );
}

/// `--file` with a blank path is a usage error about `--file`: the message names the option
/// the user gave, not `KVH_CONFIG`, which was not set (and which the message would tell the
/// user to unset).
#[test]
fn a_blank_file_argument_is_refused_naming_the_option() {
    let (code, out, err) = run(config(&["--file", "  "]).env_remove("KVH_CONFIG"));
    assert_eq!(code, 2, "{out}{err}");
    assert!(
        err.contains("--file"),
        "the error does not name --file, the input given:\n{err}"
    );
    assert!(
        !err.contains("KVH_CONFIG:"),
        "the error blames KVH_CONFIG, which is not set:\n{err}"
    );
}

/// `FORENSIC_HMAC_SECRET` is no policy key, so it has no row of the table; the text report
/// still says it is set and seals the log, and that `hmac_key_file`, set beside it, is not
/// read (the library seals with the variable). Its value is never shown.
#[test]
fn the_text_report_says_when_the_environment_secret_seals_the_log() {
    let secret = "s".repeat(40);
    let (code, out, err) = run(config(&[])
        .env("FORENSIC_HMAC_SECRET", &secret)
        .env("KVH_LOG_DIR", "/var/log/kvh"));
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("FORENSIC_HMAC_SECRET: set (the HMAC secret that seals the log)"),
        "{out}"
    );
    assert!(!out.contains(&secret));
    let (code, out, err) = run(config(&[]).env("FORENSIC_HMAC_SECRET", &secret));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("set, and unused (no log_dir"), "{out}");
    let (code, out, err) = run(config(&[])
        .env("FORENSIC_HMAC_SECRET", &secret)
        .env("KVH_LOG_DIR", "/var/log/kvh")
        .env("KVH_HMAC_KEY_FILE", "/run/keys/hmac.key"));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("hmac_key_file, set too, is not read"), "{out}");
    let (_, out, _) = run(&mut config(&[]));
    assert!(!out.contains("FORENSIC_HMAC_SECRET: set"), "{out}");
}

/// A float TOML cannot read (`1e400`, beyond its 64-bit floats; `1e`) is refused naming the
/// key and what it accepts, as an integer beyond TOML's is, but with no suggested string: the
/// digits before the exponent are not the number written.
#[test]
fn a_float_toml_cannot_read_is_refused_naming_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("policy.toml");
    for line in [
        "anomaly_z = 1e400",
        "\"anomaly_z\" = 1e",
        "anomaly_z = 2.5e",
    ] {
        std::fs::write(&file, format!("{line}\n")).unwrap();
        let (code, _, err) = run(&mut config(&["--file", file.to_str().unwrap()]));
        assert_eq!(code, 2, "{line}: {err}");
        assert!(
            err.contains("anomaly_z accepts a number in [1, 100]"),
            "{line}: {err}"
        );
        assert!(!err.contains("as a string"), "{line}: {err}");
    }
}

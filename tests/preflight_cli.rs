//! `kvh preflight`: the start-up's checks without starting. Each check is held to what the
//! start-up itself does with the same environment (`kvh demo`, which starts the library's
//! log and backend the same way): a check passes exactly when the start-up gets past it.

mod cli_common;
#[path = "fake_cuda/mod.rs"]
mod fake_cuda;
#[path = "mounted/mod.rs"]
mod mounted;
#[path = "skip/mod.rs"]
mod skip;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use cli_common::{kvh, run};
use mounted::Mounted;
use serde_json::Value;

/// The start-up's stand-in: `kvh demo` opens the log and the backend as the library does.
const START: [&str; 7] = [
    "demo",
    "--tenants",
    "1",
    "--requests",
    "1",
    "--decode-tokens",
    "16",
];

/// A server's environment, laid out in a temporary directory: keys, a log directory not
/// created yet, a metrics directory.
struct Env {
    tmp: tempfile::TempDir,
    vars: Vec<(String, String)>,
}

impl Env {
    fn new() -> Env {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        let hmac = root.join("hmac.key");
        fs::write(&hmac, "ab".repeat(32) + "\n").unwrap();
        fs::set_permissions(&hmac, fs::Permissions::from_mode(0o600)).unwrap();
        let (code, _, err) = run(kvh().args(["keygen", "--out"]).arg(root.join("ckpt")));
        assert_eq!(code, 0, "{err}");
        fs::create_dir(root.join("metrics")).unwrap();
        let path = |p: &str| root.join(p).display().to_string();
        let vars = vec![
            ("KVH_BACKEND".into(), "host".into()),
            ("KVH_LOG_DIR".into(), path("log/chains")),
            ("KVH_HMAC_KEY_FILE".into(), path("hmac.key")),
            ("KVH_SIGNING_KEY_FILE".into(), path("ckpt.key")),
            ("KVH_METRICS_FILE".into(), path("metrics/kvh.prom")),
        ];
        Env { tmp, vars }
    }

    fn root(&self) -> &Path {
        self.tmp.path()
    }

    fn set(&mut self, key: &str, value: impl Into<String>) {
        self.vars.retain(|(k, _)| k != key);
        self.vars.push((key.into(), value.into()));
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = kvh();
        c.args(args).envs(self.vars.iter().map(|(k, v)| (k, v)));
        c
    }

    /// Exit code and the checks by name (`--json`).
    fn preflight(&self, extra: &[&str]) -> (i32, Value) {
        let mut args = vec!["preflight", "--json"];
        args.extend_from_slice(extra);
        let (code, out, err) = run(&mut self.command(&args));
        let report: Value =
            serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}{err}"));
        assert_eq!(report["ready"], Value::Bool(code == 0), "{report}");
        (code, report)
    }

    /// The start-up with this environment: `kvh demo` opens the log and the backend as the
    /// library does. Its exit code.
    fn start(&self) -> i32 {
        run(&mut self.command(&START)).0
    }

    /// The library's start-up of the forensic log with this environment, in this process
    /// (`ForensicLog::open`, as the runtime opens it), stopped at once. Where a directory
    /// holds chains sealed otherwise, a server's start-up goes on and `kvh demo` does not:
    /// there this stands in for the start-up.
    fn open_log_as_the_library_does(&self) -> Result<(), String> {
        let config = kvhygiene::config::Config::from_vars(&self.vars).map_err(|e| e.to_string())?;
        let start = kvhygiene::forensic::StartInfo::current(config.canonical_json());
        let log = kvhygiene::forensic::ForensicLog::open(&config.log, start)
            .map_err(|e| e.to_string())?;
        if let Some(log) = log {
            log.stop();
        }
        Ok(())
    }
}

fn status<'a>(report: &'a Value, check: &str) -> (&'a str, &'a str) {
    let c = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["check"] == check)
        .unwrap_or_else(|| panic!("no check {check}: {report}"));
    (c["status"].as_str().unwrap(), c["detail"].as_str().unwrap())
}

/// A log directory several levels below the nearest that exists: the start-up creates each
/// missing level (0700), and preflight says so, naming where they start, so that a mistyped
/// path is not created unseen. One level missing reads as before.
#[test]
fn a_log_directory_missing_several_levels_is_said_to_create_each() {
    let mut env = Env::new();
    let deep = env.root().join("a/b/log");
    env.set("KVH_LOG_DIR", deep.display().to_string());
    let (code, report) = env.preflight(&["--skip-backend"]);
    assert_eq!(code, 0, "{report}");
    let (st, detail) = status(&report, "log directory");
    assert_eq!(st, "ok", "{detail}");
    let under = format!(
        "creates it and each missing directory above it (0700) under {}",
        env.root().display()
    );
    assert!(detail.contains(&under), "{detail}");
    assert_eq!(env.start(), 0);
    for level in [env.root().join("a"), env.root().join("a/b"), deep] {
        let mode = fs::metadata(&level).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "{}", level.display());
    }
}

#[test]
fn a_ready_environment_passes_every_check_and_nothing_is_created() {
    let env = Env::new();
    let (code, report) = env.preflight(&[]);
    assert_eq!(code, 0, "{report}");
    for check in [
        "policy",
        "hmac key",
        "log directory",
        "signing key",
        "checkpoint directory",
        "metrics file",
        "backend",
    ] {
        assert_eq!(status(&report, check).0, "ok", "{check}: {report}");
    }
    let (_, log_detail) = status(&report, "log directory");
    assert!(log_detail.contains("does not exist yet"), "{log_detail}");
    assert!(
        log_detail.contains("left on its file system"),
        "the room left is not said: {log_detail}"
    );
    assert!(
        !env.root().join("log").exists(),
        "preflight created the log directory"
    );
    assert!(!env.root().join("metrics/kvh.prom").exists());
    // What it said: the start-up passes, and the directory it created passes too.
    assert_eq!(env.start(), 0);
    let (code, report) = env.preflight(&[]);
    assert_eq!(code, 0, "{report}");
    assert!(
        status(&report, "log directory").1.contains("usable"),
        "{report}"
    );
}

/// Each thing the start-up refuses fails its check, and the start-up does refuse it.
#[test]
fn what_the_start_up_refuses_fails_its_check() {
    type Break = fn(&mut Env);
    let cases: [(&str, &str, Break); 5] = [
        ("log directory", "mode 0755", |e| {
            let d = e.root().join("log/chains");
            fs::create_dir_all(&d).unwrap();
            fs::set_permissions(&d, fs::Permissions::from_mode(0o755)).unwrap();
        }),
        ("log directory", "Not a directory", |e| {
            fs::write(e.root().join("log"), "a file").unwrap();
        }),
        ("hmac key", "hmac.key", |e| {
            let k = e.root().join("hmac.key");
            fs::set_permissions(&k, fs::Permissions::from_mode(0o644)).unwrap();
        }),
        ("signing key", "KVH_SIGNING_KEY_FILE", |e| {
            fs::write(e.root().join("ckpt.key"), "not a key\n").unwrap();
        }),
        ("checkpoint directory", "not a directory", |e| {
            let f = e.root().join("ckpt-file");
            fs::write(&f, "").unwrap();
            e.set("KVH_CHECKPOINT_DIR", f.display().to_string());
        }),
    ];
    for (check, says, break_it) in cases {
        let mut env = Env::new();
        break_it(&mut env);
        let (code, report) = env.preflight(&[]);
        assert_eq!(code, 1, "{check}: {report}");
        let (st, detail) = status(&report, check);
        assert_eq!(st, "fail", "{check}: {report}");
        assert!(detail.contains(says), "{check}: {detail}");
        assert_eq!(
            env.start(),
            2,
            "{check}: the start-up got past what preflight failed"
        );
    }
}

/// Any group or other permission bit fails: a log directory its group may list or enter, a
/// key file its group or others may write (and so replace), a key file only its group may
/// read. The start-up refuses each of them too.
#[test]
fn any_group_or_other_permission_on_the_log_directory_or_a_key_fails() {
    let cases: [(&str, &str, u32); 6] = [
        ("log directory", "log/chains", 0o750),
        ("log directory", "log/chains", 0o710),
        ("hmac key", "hmac.key", 0o620),
        ("hmac key", "hmac.key", 0o602),
        ("signing key", "ckpt.key", 0o640),
        ("signing key", "ckpt.key", 0o610),
    ];
    for (check, path, mode) in cases {
        let env = Env::new();
        let p = env.root().join(path);
        if check == "log directory" {
            fs::create_dir_all(&p).unwrap();
        }
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
        let (code, report) = env.preflight(&[]);
        assert_eq!(code, 1, "{check} {mode:04o}: {report}");
        let (st, detail) = status(&report, check);
        assert_eq!(st, "fail", "{check} {mode:04o}: {report}");
        assert!(
            detail.contains(&format!("mode {mode:04o}")),
            "{check}: {detail}"
        );
        assert_eq!(
            env.start(),
            2,
            "{check} {mode:04o}: the start-up got past what preflight failed"
        );
    }
}

#[test]
fn metrics_exports_that_cannot_work_fail() {
    let mut env = Env::new();
    let missing = env.root().join("no-such-dir/kvh.prom");
    env.set("KVH_METRICS_FILE", missing.display().to_string());
    let (code, report) = env.preflight(&[]);
    assert_eq!(code, 1);
    assert_eq!(status(&report, "metrics file").0, "fail", "{report}");

    // A file there that is not a snapshot (a key, by a mistyped name): the exporter would
    // not replace it, so the probes would have no metrics file.
    let mut env = Env::new();
    let key = env.root().join("other.key");
    fs::write(&key, "0011223344556677\n").unwrap();
    env.set("KVH_METRICS_FILE", key.display().to_string());
    let (code, report) = env.preflight(&[]);
    assert_eq!(code, 1);
    let (st, detail) = status(&report, "metrics file");
    assert_eq!(st, "fail", "{report}");
    assert!(
        detail.contains("not a kvhygiene metrics snapshot"),
        "{detail}"
    );
    assert_eq!(fs::read_to_string(&key).unwrap(), "0011223344556677\n");

    let mut env = Env::new();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    env.set("KVH_METRICS_ADDR", taken.local_addr().unwrap().to_string());
    let (code, report) = env.preflight(&[]);
    assert_eq!(code, 1);
    let (st, detail) = status(&report, "metrics address");
    assert_eq!(st, "fail", "{detail}");
    drop(taken);
}

/// `cuda` on this machine: preflight says what the start-up does (on a machine without a
/// driver both fail; with a working one both pass).
#[test]
fn the_backend_check_agrees_with_the_start_up() {
    let mut env = Env::new();
    env.set("KVH_BACKEND", "cuda");
    let (code, report) = env.preflight(&[]);
    let started = env.start();
    assert_eq!(
        status(&report, "backend").0 == "ok",
        started == 0,
        "{report}"
    );
    assert_eq!(code == 0, started == 0);
    let (code, report) = env.preflight(&["--skip-backend"]);
    assert_eq!(code, 0, "{report}");
    assert_eq!(status(&report, "backend").0, "skipped");
}

/// `auto` (the default) on a machine without a CUDA driver runs on host memory, which is no
/// check of the CUDA backend the server gets where the GPU is: skipped, not ok.
#[test]
fn auto_without_a_driver_does_not_pass_the_backend_check() {
    let mut env = Env::new();
    env.set("KVH_BACKEND", "auto");
    env.set("LD_LIBRARY_PATH", "/nonexistent");
    let (code, report) = env.preflight(&[]);
    let (st, detail) = status(&report, "backend");
    if detail.starts_with("cuda") {
        skip::skipped(&format!("a CUDA driver is installed here: {detail}"));
        return;
    }
    assert_eq!(st, "skipped", "{detail}");
    assert!(detail.contains("not checked"), "{detail}");
    assert_eq!(code, 0, "{report}");
}

#[test]
fn an_unset_log_or_metrics_file_is_off_not_failed() {
    let (code, out, err) = run(kvh().args(["preflight", "--skip-backend"]));
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("off      log directory"), "{out}");
    assert!(out.contains("off      metrics file"), "{out}");
    assert!(out.contains("ready: no check failed"), "{out}");
}

#[test]
fn an_invalid_policy_exits_2_naming_the_key() {
    let (code, _, err) = run(kvh().args(["preflight"]).env("KVH_BATCH_SIZE", "0"));
    assert_eq!(code, 2);
    assert!(err.contains("KVH_BATCH_SIZE"), "{err}");
}

/// tests/fake_cuda/fake_libcuda.cpp compiled as `libcuda.so.1` into a directory of its own,
/// for `LD_LIBRARY_PATH`; `None` without a C++ compiler.
fn fake_driver_dir() -> Option<tempfile::TempDir> {
    fake_cuda::as_libcuda_dir()
}

/// With a driver (the host stand-in) the backend starts: preflight's check passes, and so
/// does the start-up on the same driver.
#[test]
fn with_a_driver_the_backend_check_passes_as_the_start_up_does() {
    let Some(driver) = fake_driver_dir() else {
        return;
    };
    let mut env = Env::new();
    env.set("KVH_BACKEND", "cuda");
    env.set("LD_LIBRARY_PATH", driver.path().display().to_string());
    let (code, report) = env.preflight(&[]);
    assert_eq!(code, 0, "{report}");
    let (st, detail) = status(&report, "backend");
    assert_eq!(st, "ok", "{detail}");
    assert!(detail.starts_with("cuda"), "{detail}");
    assert_eq!(env.start(), 0);
}

/// The start-up continues in an existing log directory: crash recovery opens the newest file
/// of every chain in it and refuses one that is not a regular file of ours with mode 0600 (a
/// file made group-readable by a restore, a symlink planted at a chain file's name), which
/// stops the start-up. Preflight fails on such a file as the start-up does.
#[test]
fn a_chain_file_the_start_up_refuses_fails_the_preflight() {
    type Break = fn(&Path);
    let cases: [(&str, Break); 2] = [
        ("a group-readable chain file", |f| {
            fs::set_permissions(f, fs::Permissions::from_mode(0o644)).unwrap();
        }),
        ("a symlink at a chain file's name", |f| {
            let copy = f.with_extension("copy");
            fs::rename(f, &copy).unwrap();
            std::os::unix::fs::symlink(&copy, f).unwrap();
        }),
    ];
    for (what, break_it) in cases {
        let env = Env::new();
        assert_eq!(env.start(), 0, "{what}: the first start-up");
        let dir = env.root().join("log/chains");
        let file = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().is_some_and(|x| x == "jsonl"))
            .expect("a chain file");
        break_it(&file);
        let (code, report) = env.preflight(&[]);
        assert_eq!(
            env.start(),
            2,
            "{what}: the start-up refuses the log directory's chain file"
        );
        assert_eq!(
            code, 1,
            "{what}: preflight passed a log directory the start-up refuses: {report}"
        );
        assert!(
            report["checks"]
                .as_array()
                .unwrap()
                .iter()
                .any(|c| c["status"] == "fail"),
            "{what}: {report}"
        );
    }
}

/// `kvh ARGS` under `env` with the existing directory `dir` not writable: mode 0500 (ours,
/// no group or other access, which the directory checks accept) for an unprivileged user; a
/// read-only bind mount in a mount namespace of its own for root (whom modes do not stop).
/// `None` where neither can be arranged.
fn with_dir_unwritable(env: &Env, dir: &Path, args: &[&str]) -> Option<Command> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o500)).unwrap();
        return Some(env.command(args));
    }
    // The read-only bind mount must work here and must stop a write (a container without
    // the capability to mount, or a mount that ignores `ro`, skips the test).
    let read_only_works = Command::new("unshare")
        .args(["--mount", "sh", "-c"])
        .arg(r#"mount --bind -o ro "$1" "$1" 2>/dev/null && ! touch "$1/.probe" 2>/dev/null"#)
        .arg("sh")
        .arg(dir)
        .status()
        .is_ok_and(|s| s.success());
    if !read_only_works {
        return None;
    }
    let mut c = Command::new("unshare");
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("KVH_")) {
        c.env_remove(k);
    }
    c.args(["--mount", "sh", "-c"])
        .arg(r#"d="$1"; shift; mount --bind -o ro "$d" "$d" && exec "$@""#)
        .arg("sh")
        .arg(dir)
        .arg(env!("CARGO_BIN_EXE_kvh"))
        .args(args)
        .envs(env.vars.iter().map(|(k, v)| (k, v)));
    Some(c)
}

/// An existing log directory of ours, mode 0700 or narrower, in which no file can be
/// created (a read-only volume, say): the start-up cannot create its chain file and stops.
/// Preflight fails on the directory as the start-up does.
#[test]
fn an_existing_log_directory_that_cannot_be_written_fails_the_preflight() {
    let env = Env::new();
    let dir = env.root().join("log/chains");
    fs::create_dir_all(&dir).unwrap();
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();
    let Some(mut start) = with_dir_unwritable(&env, &dir, &START) else {
        skip::skipped("no way to make the directory unwritable here");
        return;
    };
    let (started, _, err) = run(&mut start);
    assert_eq!(
        started, 2,
        "the start-up cannot create its chain file: {err}"
    );
    let mut preflight = with_dir_unwritable(&env, &dir, &["preflight", "--json"]).unwrap();
    let (code, out, err) = run(&mut preflight);
    let report: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}{err}"));
    assert_eq!(
        code, 1,
        "preflight passed a log directory the start-up cannot write: {report}"
    );
    assert_eq!(status(&report, "log directory").0, "fail", "{report}");
}

/// The chain files in `dir`, sorted by name (chain id, then index).
fn chain_files_in(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
        .collect();
    v.sort();
    v
}

/// Leaves `file` as a writer killed before its `stop` record leaves it: every record but the
/// last (the `stop`).
fn cut_stop_record(file: &Path) {
    let text = fs::read_to_string(file).unwrap();
    let mut lines: Vec<&str> = text.lines().collect();
    assert!(
        lines
            .last()
            .is_some_and(|l| l.contains("\"kind\":\"stop\"")),
        "{text}"
    );
    lines.pop();
    fs::write(file, lines.join("\n") + "\n").unwrap();
}

/// A log directory holding two chains of earlier processes: one that ended cleanly and
/// whose file was restored group-readable, and one whose writer died (no `stop` record),
/// which crash recovery continues. Whatever the start-up does with such a directory,
/// preflight says the same: it passes exactly when the start-up gets past the directory.
#[test]
fn preflight_and_the_start_up_agree_on_a_directory_with_a_crashed_chain_and_a_refused_file() {
    let mut env = Env::new();
    // Checkpoints unsigned, so that a chain cut before its `stop` record is one recovery
    // continues (a signed final checkpoint would be ahead of it).
    env.vars.retain(|(k, _)| k != "KVH_SIGNING_KEY_FILE");
    assert_eq!(env.start(), 0, "the first process");
    assert_eq!(env.start(), 0, "the second process");
    let dir = env.root().join("log/chains");
    let files = chain_files_in(&dir);
    assert_eq!(files.len(), 2, "two chains of one file each: {files:?}");
    // Crash recovery looks at the chains from the last in name order: the last one's writer
    // died, the first one's file was restored with mode 0644.
    cut_stop_record(&files[1]);
    fs::set_permissions(&files[0], fs::Permissions::from_mode(0o644)).unwrap();
    let (code, report) = env.preflight(&[]);
    let started = env.start();
    assert_eq!(
        code == 0,
        started == 0,
        "preflight exit {code}, start-up exit {started}: {report}"
    );
}

/// A log directory holding the chain of a writer that died (no `stop` record), on a volume
/// that has since become read-only: crash recovery could append to that chain's newest file,
/// but its rotation, its checkpoints and any later start-up could not be written. The
/// start-up refuses the directory at once, and preflight fails it as the start-up does.
#[test]
fn a_crashed_chain_in_a_log_directory_that_cannot_be_written_is_refused_by_both() {
    let mut env = Env::new();
    env.vars.retain(|(k, _)| k != "KVH_SIGNING_KEY_FILE");
    assert_eq!(env.start(), 0, "the first process");
    let dir = env.root().join("log/chains");
    let files = chain_files_in(&dir);
    assert_eq!(files.len(), 1, "{files:?}");
    cut_stop_record(&files[0]);
    let Some(mut start) = with_dir_unwritable(&env, &dir, &START) else {
        skip::skipped("no way to make the directory unwritable here");
        return;
    };
    let (started, _, err) = run(&mut start);
    assert_eq!(
        started, 2,
        "the start-up ran in a read-only log directory: {err}"
    );
    assert!(err.contains("no file can be created"), "{err}");
    let mut preflight = with_dir_unwritable(&env, &dir, &["preflight", "--json"]).unwrap();
    let (code, out, err) = run(&mut preflight);
    let report: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}{err}"));
    assert_eq!(code, 1, "{report}");
    assert_eq!(status(&report, "log directory").0, "fail", "{report}");
}

/// A `chattr` mark (`a` append-only, `i` immutable) set on a path, taken off again when
/// dropped, so that the temporary directory can be removed.
struct Marked(std::path::PathBuf, char);

impl Drop for Marked {
    fn drop(&mut self) {
        let _ = Command::new("chattr")
            .arg(format!("-{}", self.1))
            .arg(&self.0)
            .status();
    }
}

/// Marks `path` with `chattr +FLAG`; `None` (the caller's test skipped, said on stderr) where
/// that is not available.
fn mark(flag: char, path: &Path) -> Option<Marked> {
    let marked = Command::new("chattr")
        .arg(format!("+{flag}"))
        .arg(path)
        .status()
        .is_ok_and(|s| s.success());
    if !marked {
        skip::skipped(&format!(
            "chattr +{flag} is not available here (needs root and ext4 or alike)"
        ));
        return None;
    }
    Some(Marked(path.to_path_buf(), flag))
}

/// The log of a process that died without its `stop` record, `torn` (part of a record, or
/// nothing) left after its last line, the chain file then marked append-only: the
/// environment, the log directory and the guard that takes the mark off again. `None` (and
/// the test skipped) where `chattr +a` is not available.
fn append_only_crashed_chain(torn: &[u8]) -> Option<(Env, std::path::PathBuf, Marked)> {
    let mut env = Env::new();
    env.vars.retain(|(k, _)| k != "KVH_SIGNING_KEY_FILE");
    assert_eq!(env.start(), 0, "the first process");
    let dir = env.root().join("log/chains");
    let files = chain_files_in(&dir);
    assert_eq!(files.len(), 1, "{files:?}");
    cut_stop_record(&files[0]);
    let mut f = fs::OpenOptions::new().append(true).open(&files[0]).unwrap();
    std::io::Write::write_all(&mut f, torn).unwrap();
    drop(f);
    let unmark = mark('a', &files[0])?;
    Some((env, dir, unmark))
}

/// A chain whose writer died after a whole record (no torn tail to cut), its file marked
/// append-only (`chattr +a`, which still lets a writer append): crash recovery continues it by
/// appending. Preflight passes such a directory only if the start-up does get past it.
#[test]
fn preflight_and_the_start_up_agree_on_an_append_only_chain_file_of_a_crashed_writer() {
    let Some((env, _dir, _unmark)) = append_only_crashed_chain(b"") else {
        return;
    };
    let (code, report) = env.preflight(&[]);
    let (started, _, err) = run(&mut env.command(&START));
    assert_eq!(
        code == 0,
        started == 0,
        "preflight exit {code} ({report}), start-up exit {started}: {err}"
    );
}

/// A metrics file named with a NUL character (possible in a TOML string) can never be
/// written: the process would run without its metrics file, so the preflight is not ready
/// (exit 1), or refuses the policy outright (exit 2).
#[test]
fn a_metrics_file_that_cannot_be_named_is_not_ready() {
    let mut env = Env::new();
    let policy = env.root().join("policy.toml");
    let file = env.root().join("metrics").display().to_string() + "/kvh\\u0000.prom";
    fs::write(&policy, format!("metrics_file = \"{file}\"\n")).unwrap();
    env.vars.retain(|(k, _)| k != "KVH_METRICS_FILE");
    env.set("KVH_CONFIG", policy.display().to_string());
    let (code, out, err) = run(&mut env.command(&["preflight", "--skip-backend"]));
    assert_ne!(
        code, 0,
        "preflight passed a metrics file no write can create:\n{out}{err}"
    );
}

/// `KVH_PRELOAD` with a value the LD_PRELOAD interposers refuse makes them fail every CUDA
/// allocation, so a process started here would not start: `kvh config` refuses it (exit 2),
/// and the preflight does not report the environment ready.
#[test]
fn a_preload_switch_the_interposers_refuse_is_not_ready() {
    let mut env = Env::new();
    env.set("KVH_PRELOAD", "/usr/lib/libkvhygiene_preload.so");
    let (code, _, err) = run(&mut env.command(&["config"]));
    assert_eq!(code, 2, "{err}");
    let (code, out, err) = run(&mut env.command(&["preflight", "--skip-backend"]));
    assert_ne!(
        code, 0,
        "preflight reported ready with KVH_PRELOAD set to a path:\n{out}{err}"
    );
}

/// A log directory to be created in `/proc`, where no directory can be created (procfs
/// answers ENOENT to `mkdir`, to root too, while its access check may grant write access):
/// the start-up fails to create it, so the preflight does not report the log directory, nor
/// the environment, ready. The two agree whichever user runs them.
#[test]
fn a_log_directory_in_proc_is_not_ready() {
    let mut env = Env::new();
    let dir = Path::new("/proc").join("kvh-preflight-log");
    assert!(
        fs::create_dir(&dir).is_err(),
        "{} was created",
        dir.display()
    );
    env.set("KVH_LOG_DIR", dir.display().to_string());
    let (started, _, err) = run(&mut env.command(&START));
    assert_eq!(started, 2, "the start-up ran with its log in /proc: {err}");
    let (code, report) = env.preflight(&["--skip-backend"]);
    assert_eq!(
        (code, status(&report, "log directory").0),
        (1, "fail"),
        "preflight passed a log directory the start-up cannot create ({err}): {report}"
    );
    // Nor a metrics file there, which the exporter could never create.
    let log = env.root().join("log/chains").display().to_string();
    env.set("KVH_LOG_DIR", log);
    env.set("KVH_METRICS_FILE", "/proc/kvh.prom");
    let (code, report) = env.preflight(&["--skip-backend"]);
    let (st, detail) = status(&report, "metrics file");
    assert_eq!((code, st), (1, "fail"), "{report}");
    assert!(detail.contains("kernel interface file system"), "{detail}");
}

/// A metrics file whose name is longer than a file name may be (255 bytes) can never be
/// created: the process would run without its metrics file, so the preflight is not ready.
#[test]
fn a_metrics_file_name_too_long_to_create_is_not_ready() {
    let mut env = Env::new();
    let file = env
        .root()
        .join("metrics")
        .join(format!("{}.prom", "k".repeat(300)));
    assert!(fs::write(&file, "").is_err(), "the name is creatable here");
    env.set("KVH_METRICS_FILE", file.display().to_string());
    let (code, out, err) = run(&mut env.command(&["preflight", "--skip-backend"]));
    assert_ne!(
        code, 0,
        "preflight passed a metrics file no write can create:\n{out}{err}"
    );
}

/// A chain whose writer died in the middle of a record (a torn last line), its file marked
/// append-only (`chattr +a`): crash recovery would have to cut the torn bytes to continue the
/// chain, which an append-only file refuses. Preflight and the start-up agree on it: the
/// start-up leaves that chain as it ended and starts another, and the log verifies.
#[test]
fn preflight_and_the_start_up_agree_on_an_append_only_chain_file_with_a_torn_tail() {
    // The writer died half-way through its next record.
    let Some((env, dir, _unmark)) = append_only_crashed_chain(b"{\"v\":1,\"seq\":9") else {
        return;
    };
    let (code, report) = env.preflight(&[]);
    let (started, _, err) = run(&mut env.command(&START));
    assert_eq!(
        code == 0,
        started == 0,
        "preflight exit {code} ({report}), start-up exit {started}: {err}"
    );
    // The start-up leaves the chain it cannot cut as it ended and starts another; the log
    // verifies (a torn end of a chain no process continued is a crash, not tampering).
    assert_eq!(started, 0, "{err}");
    assert!(err.contains("cannot be cut"), "{err}");
    let key = env.root().join("hmac.key");
    let (verified, out, verr) = run(kvh()
        .arg("verify-log")
        .arg(&dir)
        .arg("--key-file")
        .arg(&key));
    assert_eq!(verified, 0, "{out}{verr}");
    // The start-up leaves the chain it cannot cut as it ended and starts another; the log
    // verifies (a torn end of a chain no process continued is a crash, not tampering).
    assert_eq!(started, 0, "{err}");
    assert!(err.contains("cannot be cut"), "{err}");
    let key = env.root().join("hmac.key");
    let (verified, out, verr) = run(kvh()
        .arg("verify-log")
        .arg(&dir)
        .arg("--key-file")
        .arg(&key));
    assert_eq!(verified, 0, "{out}{verr}");
}

/// KVH_LOG_DIR naming a symlink to a directory, written with a trailing slash (`link/`): the
/// log directory "must be a real directory (not a symlink)" (docs/forensic-log.md), and
/// without the slash both preflight and the start-up refuse it. The slash must not change
/// that.
#[test]
fn a_log_directory_named_through_a_symlink_with_a_trailing_slash_is_refused() {
    let mut env = Env::new();
    let real = env.root().join("real-log");
    fs::create_dir(&real).unwrap();
    fs::set_permissions(&real, fs::Permissions::from_mode(0o700)).unwrap();
    let link = env.root().join("log-link");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    env.set("KVH_LOG_DIR", link.display().to_string());
    let (code, report) = env.preflight(&["--skip-backend"]);
    assert_eq!(code, 1, "{report}");
    assert!(
        status(&report, "log directory").1.contains("symlink"),
        "{report}"
    );
    env.set("KVH_LOG_DIR", format!("{}/", link.display()));
    let (code, report) = env.preflight(&["--skip-backend"]);
    assert_eq!(
        status(&report, "log directory").0,
        "fail",
        "a symlinked log directory passed with a trailing slash: {report}"
    );
    assert_eq!(code, 1, "{report}");
    assert_eq!(
        env.start(),
        2,
        "the start-up wrote its log through a symlink: {:?}",
        chain_files_in(&real)
    );
}

/// A metrics file left by another user (a snapshot, uid 1234) in a sticky directory (mode
/// 1777, as /tmp): the exporter replaces the file by renaming a temporary file over it, which
/// the sticky bit refuses to anyone but the file's owner, so a process started here would run
/// without its metrics file. Preflight must not call that file ready. Shown for an
/// unprivileged uid (65534) through `setpriv`, from root; `kvh demo --metrics-file` writes
/// through the exporter's own replacement (`textfile::replace_snapshot`).
#[test]
fn a_metrics_snapshot_of_another_user_in_a_sticky_directory_is_not_ready() {
    use std::os::unix::fs::PermissionsExt;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        skip::skipped("needs root to give the file to another user");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let shared = tmp.path().join("shared");
    fs::create_dir(&shared).unwrap();
    fs::set_permissions(&shared, fs::Permissions::from_mode(0o1777)).unwrap();
    let file = shared.join("kvh.prom");
    fs::write(&file, "kvh_up 1\n").unwrap();
    fs::set_permissions(&file, fs::Permissions::from_mode(0o644)).unwrap();
    std::os::unix::fs::chown(&file, Some(1234), None).unwrap();
    let exe = cli_common::kvh_copy_in(tmp.path());
    let as_nobody = |args: &[&str]| {
        let mut c = Command::new("setpriv");
        c.args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
            .arg(&exe)
            .args(args)
            .env_clear()
            .env("KVH_BACKEND", "host")
            .env("KVH_METRICS_FILE", &file);
        c
    };
    let (code, out, err) = run(&mut as_nobody(&["preflight", "--skip-backend"]));
    if err.contains("Permission denied") && out.is_empty() {
        skip::skipped(&format!(
            "the built kvh cannot be run by uid 65534 here: {err}"
        ));
        return;
    }
    let f = file.display().to_string();
    let (written, wout, werr) = run(&mut as_nobody(&[
        "demo",
        "--tenants",
        "1",
        "--requests",
        "1",
        "--decode-tokens",
        "16",
        "--metrics-file",
        &f,
    ]));
    assert_eq!(
        written, 2,
        "the snapshot could be replaced after all:\n{wout}{werr}"
    );
    assert_eq!(
        code, 1,
        "preflight called a metrics file ready that this uid cannot replace:\n{out}{err}\n\
         the write: {werr}"
    );
}

/// A checkpoint directory (`KVH_CHECKPOINT_DIR`) of this uid, without group or other
/// access, that the owner may write and enter but not read (mode 0300): the start-up opens
/// it as a directory (`LogDir::open`, a read-only open) and stops there. Preflight's
/// checkpoint directory check must fail as the start-up does. Shown for an unprivileged uid
/// (65534) through `setpriv`, from root (root may open any directory).
#[test]
fn a_checkpoint_directory_the_start_up_cannot_open_fails_the_preflight() {
    use std::os::unix::fs::PermissionsExt;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        skip::skipped("needs root to run kvh as another uid");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    fs::set_permissions(root, fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::chown(root, Some(65534), Some(65534)).unwrap();
    let ckpt = root.join("ckpt");
    fs::create_dir(&ckpt).unwrap();
    std::os::unix::fs::chown(&ckpt, Some(65534), Some(65534)).unwrap();
    fs::set_permissions(&ckpt, fs::Permissions::from_mode(0o300)).unwrap();
    let exe = cli_common::kvh_copy_in(root);
    let as_nobody = |args: &[&str]| {
        let mut c = Command::new("setpriv");
        c.args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
            .arg(&exe)
            .args(args)
            .env_clear()
            .env("KVH_BACKEND", "host")
            .env("KVH_LOG_DIR", root.join("log"))
            .env("KVH_SIGNING_KEY_FILE", root.join("signing.key"))
            .env("KVH_CHECKPOINT_DIR", &ckpt);
        c
    };
    let signing = root.join("signing").display().to_string();
    let (made, _, err) = run(&mut as_nobody(&["keygen", "--out", &signing]));
    if made != 0 && err.contains("Permission denied") {
        skip::skipped(&format!(
            "the built kvh cannot be run by uid 65534 here: {err}"
        ));
        return;
    }
    assert_eq!(made, 0, "{err}");
    let (started, _, start_err) = run(&mut as_nobody(&START));
    assert_eq!(
        started, 2,
        "the start-up opened the checkpoint directory after all: {start_err}"
    );
    let (code, out, err) = run(&mut as_nobody(&["preflight", "--skip-backend", "--json"]));
    let report: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}{err}"));
    assert_eq!(
        code, 1,
        "preflight called ready an environment whose start-up fails ({start_err}): {report}"
    );
    assert_eq!(
        status(&report, "checkpoint directory").0,
        "fail",
        "{report}"
    );
}

/// A runtime whose `faccessat` answers EPERM to every `AT_EACCESS` question (as a container
/// seccomp profile that refuses the faccessat2 system call makes glibc answer), built as an
/// LD_PRELOAD shim; `None` without a C compiler.
fn faccessat_refusing_shim(dir: &Path) -> Option<std::path::PathBuf> {
    let src = dir.join("shim.c");
    fs::write(
        &src,
        "#include <errno.h>\n\
         int faccessat(int fd, const char *path, int mode, int flags) {\n\
         (void)fd; (void)path; (void)mode; (void)flags;\n\
         errno = EPERM; return -1; }\n",
    )
    .unwrap();
    let so = dir.join("shim.so");
    let built = Command::new(std::env::var("CC").unwrap_or_else(|_| "cc".into()))
        .args(["-shared", "-fPIC", "-o"])
        .arg(&so)
        .arg(&src)
        .status()
        .ok()?;
    // A compiler that fails on the shim is a broken test, not a machine without one.
    assert!(
        built.success(),
        "the faccessat shim does not compile: {built}"
    );
    Some(so)
}

/// The start-up judges a log directory by what it can do in it, not by `faccessat` alone: a
/// directory it has just created itself (0700, ours), in which files can be created, is
/// usable even where `faccessat` answers wrongly (a seccomp profile that refuses faccessat2
/// with EPERM, under which glibc's `faccessat` fails every `AT_EACCESS` question). The
/// start-up worked there before the access check was added to it, and must still work.
#[test]
fn the_start_up_does_not_refuse_a_usable_log_directory_on_faccessat_alone() {
    let mut env = Env::new();
    env.vars.retain(|(k, _)| k != "KVH_SIGNING_KEY_FILE");
    let Some(shim) = faccessat_refusing_shim(env.root()) else {
        skip::skipped("no C compiler to build the faccessat shim");
        return;
    };
    let (code, _, err) = run(env.command(&START).env("LD_PRELOAD", &shim));
    assert_eq!(
        code, 0,
        "the start-up refused a log directory it created itself and can write: {err}"
    );
    let chains = env.root().join("log/chains");
    assert!(chains.is_dir(), "no log directory was created");
}

/// A log directory marked immutable (`chattr +i`) holding the chain of a writer that died: no
/// file can be created in it (the system answers EPERM, to root too), so its rotation, its
/// checkpoints and the next start-up could not be written, as in a read-only directory. The
/// start-up refuses it at once ("no file can be created"), and preflight fails it as the
/// start-up does; EPERM from the access check is the system's refusal here, not a question
/// left unanswered.
#[test]
fn a_crashed_chain_in_an_immutable_log_directory_is_refused_by_both() {
    let mut env = Env::new();
    env.vars.retain(|(k, _)| k != "KVH_SIGNING_KEY_FILE");
    assert_eq!(env.start(), 0, "the first process");
    let dir = env.root().join("log/chains");
    let files = chain_files_in(&dir);
    assert_eq!(files.len(), 1, "{files:?}");
    cut_stop_record(&files[0]);
    let Some(_unmark) = mark('i', &dir) else {
        return;
    };
    assert!(
        fs::File::create(dir.join("probe")).is_err(),
        "a file was created in the immutable directory"
    );
    let (code, report) = env.preflight(&[]);
    let (started, _, err) = run(&mut env.command(&START));
    assert_eq!(
        started, 2,
        "the start-up ran in a log directory where no file can be created: {err}"
    );
    assert!(err.contains("no file can be created"), "{err}");
    assert_eq!(code, 1, "{report}");
    assert_eq!(status(&report, "log directory").0, "fail", "{report}");
}

/// A metrics file whose directory is marked immutable (`chattr +i`): the exporter cannot
/// create its temporary file there (EPERM, to root too), so the process would run without a
/// metrics file for its probes. Preflight says so (not ready), as it does for a directory
/// this process may not write.
#[test]
fn a_metrics_file_in_an_immutable_directory_is_not_ready() {
    let env = Env::new();
    let dir = env.root().join("metrics");
    let Some(_unmark) = mark('i', &dir) else {
        return;
    };
    assert!(
        fs::File::create(dir.join("probe")).is_err(),
        "a file was created in the immutable directory"
    );
    let (code, report) = env.preflight(&["--skip-backend"]);
    let (st, detail) = status(&report, "metrics file");
    assert_eq!(
        st, "fail",
        "preflight passed a metrics directory in which no file can be created: {detail}"
    );
    assert_eq!(code, 1, "{report}");
}

/// A log directory marked append-only (`chattr +a`) with a signing key configured: files can
/// be created and appended to there, but no entry can be renamed or removed (EPERM, to root
/// too), and a signed checkpoint is installed by renaming its temporary file. The start-up
/// writes its first checkpoint at once and fails (exit 2, "cannot install checkpoint"),
/// leaving a chain without a checkpoint behind. Preflight, whose checks pass exactly when the
/// start-up gets past them, must not report such a directory ready.
#[test]
fn preflight_and_the_start_up_agree_on_an_append_only_log_directory_with_a_signing_key() {
    let env = Env::new();
    assert_eq!(env.start(), 0, "the first process");
    let dir = env.root().join("log/chains");
    let Some(_unmark) = mark('a', &dir) else {
        return;
    };
    let (code, report) = env.preflight(&[]);
    let (started, _, err) = run(&mut env.command(&START));
    assert_eq!(
        code == 0,
        started == 0,
        "preflight exit {code} ({report}), start-up exit {started}: {err}"
    );
}

/// A metrics file whose directory is marked append-only (`chattr +a`): the exporter writes
/// each snapshot to a temporary file and renames it over the metrics file, and no entry can
/// be renamed there (EPERM, to root too), so the process would run without a metrics file for
/// its probes. Preflight says so (not ready), as for an immutable directory.
#[test]
fn a_metrics_file_in_an_append_only_directory_is_not_ready() {
    let env = Env::new();
    let dir = env.root().join("metrics");
    let Some(_unmark) = mark('a', &dir) else {
        return;
    };
    assert!(
        kvhygiene::metrics::textfile::write_atomic(&dir.join("kvh.prom"), b"kvh_up 1\n").is_err(),
        "the exporter replaced a snapshot in the append-only directory"
    );
    let (code, report) = env.preflight(&["--skip-backend"]);
    let (st, detail) = status(&report, "metrics file");
    assert_eq!(
        st, "fail",
        "preflight passed a metrics directory in which no snapshot can be installed: {detail}"
    );
    assert_eq!(code, 1, "{report}");
}

/// Marks the child run of a test below that starts the library itself (not a `KVH_`
/// variable: the policy refuses unknown ones).
const START_CHILD: &str = "PREFLIGHT_CLI_START_CHILD";

/// In the child run of a test below: starts and stops the library, says how it went, and
/// returns true (the test ends there).
fn started_as_child() -> bool {
    if std::env::var_os(START_CHILD).is_none() {
        return false;
    }
    let rc = kvhygiene::ffi::kvh_init();
    println!("INIT {rc}");
    kvhygiene::ffi::kvh_shutdown();
    true
}

/// Runs `kvh preflight` in `env` from the working directory `cwd`, then starts the library
/// the same way (the test `name` run again as a child), and checks that the preflight passes
/// the metrics file's check exactly when the started library writes the file, which the
/// system puts at `lands`. Returns whether it was written.
fn judged_as_the_start_up_writes(env: &Env, name: &str, cwd: &Path, lands: &Path) -> bool {
    let (code, out, err) = run(env
        .command(&["preflight", "--json", "--skip-backend"])
        .current_dir(cwd));
    let report: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}{err}"));
    let mut child = Command::new(std::env::current_exe().unwrap());
    child
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .current_dir(cwd)
        .env(START_CHILD, "1")
        .envs(env.vars.iter().map(|(k, v)| (k, v)));
    for (k, _) in std::env::vars() {
        if k.starts_with("KVH_") && !env.vars.iter().any(|(n, _)| *n == k) {
            child.env_remove(k);
        }
    }
    let (_, cout, cerr) = run(&mut child);
    assert!(
        cout.contains("INIT 0"),
        "the library did not start:\n{cout}{cerr}"
    );
    let written = lands.is_file();
    let status = status(&report, "metrics file").0;
    assert_eq!(
        status == "ok",
        written,
        "preflight says {status} of a metrics file the start-up {} at {}: {report}",
        if written { "writes" } else { "does not write" },
        lands.display()
    );
    if written {
        assert_eq!(code, 0, "{report}");
    }
    written
}

/// A metrics file in a directory the start-up itself creates (here the parent of the log
/// directory, which the log makes with it before the metrics export starts) is written by the
/// started library. The preflight then passes its check: a check passes exactly when the
/// start-up gets past it.
#[test]
fn a_metrics_file_in_a_directory_the_log_creates_passes_as_the_start_up_writes_it() {
    if started_as_child() {
        return;
    }
    let mut env = Env::new();
    let root = env.root().to_path_buf();
    env.set("KVH_LOG_DIR", root.join("kvh/log").display().to_string());
    let metrics = root.join("kvh/kvh.prom");
    env.set("KVH_METRICS_FILE", metrics.display().to_string());
    let name = "a_metrics_file_in_a_directory_the_log_creates_passes_as_the_start_up_writes_it";
    assert!(judged_as_the_start_up_writes(&env, name, &root, &metrics));
}

/// The same directory named two ways: the log directory absolute, the metrics file relative
/// to the working directory (a unit's WorkingDirectory, say). The start-up creates the log
/// directory with its parents and then writes the metrics file there; the preflight, run in
/// the same working directory, passes the metrics file's check as the start-up gets past it.
#[test]
fn a_metrics_file_named_relative_in_a_directory_the_log_creates_passes_as_the_start_up_writes_it() {
    if started_as_child() {
        return;
    }
    let mut env = Env::new();
    let root = env.root().to_path_buf();
    env.set("KVH_LOG_DIR", root.join("kvh/log").display().to_string());
    env.set("KVH_METRICS_FILE", "kvh/kvh.prom");
    let name =
        "a_metrics_file_named_relative_in_a_directory_the_log_creates_passes_as_the_start_up_writes_it";
    assert!(judged_as_the_start_up_writes(
        &env,
        name,
        &root,
        &root.join("kvh/kvh.prom")
    ));
}

/// The metrics file named through a symlinked directory and `..` (`link/../kvh/kvh.prom`,
/// `link` pointing into another directory): the system resolves `link/..` to the parent of the
/// link's target, not to the directory holding the link, so that file's directory is not the
/// one the log's start-up creates.
#[test]
fn a_metrics_file_named_through_a_symlink_and_dot_dot_is_judged_where_the_system_resolves_it() {
    if started_as_child() {
        return;
    }
    let mut env = Env::new();
    let root = env.root().to_path_buf();
    std::fs::create_dir_all(root.join("real/sub")).unwrap();
    std::os::unix::fs::symlink(root.join("real/sub"), root.join("link")).unwrap();
    env.set("KVH_LOG_DIR", root.join("kvh/log").display().to_string());
    let metrics = root.join("link/../kvh/kvh.prom");
    env.set("KVH_METRICS_FILE", metrics.display().to_string());
    let name =
        "a_metrics_file_named_through_a_symlink_and_dot_dot_is_judged_where_the_system_resolves_it";
    judged_as_the_start_up_writes(&env, name, &root, &root.join("real/kvh/kvh.prom"));
}

/// The log directory named under a symlinked directory (`link/kvh/log`, `link` pointing to
/// `real`), the metrics file named through the link's target (`real/kvh/kvh.prom`): one
/// directory, which the log's start-up creates.
#[test]
fn a_log_directory_under_a_symlink_creates_the_metrics_file_directory_named_through_its_target() {
    if started_as_child() {
        return;
    }
    let mut env = Env::new();
    let root = env.root().to_path_buf();
    std::fs::create_dir_all(root.join("real")).unwrap();
    std::os::unix::fs::symlink(root.join("real"), root.join("link")).unwrap();
    env.set(
        "KVH_LOG_DIR",
        root.join("link/kvh/log").display().to_string(),
    );
    let metrics = root.join("real/kvh/kvh.prom");
    env.set("KVH_METRICS_FILE", metrics.display().to_string());
    let name =
        "a_log_directory_under_a_symlink_creates_the_metrics_file_directory_named_through_its_target";
    assert!(judged_as_the_start_up_writes(&env, name, &root, &metrics));
}

/// The metrics file named through a directory that does not exist and `..`
/// (`missing/../kvh/kvh.prom`), the log directory `kvh/log`: the system walks through
/// `missing`, which nothing creates, so the started library writes no file there.
#[test]
fn a_metrics_file_named_through_a_missing_directory_and_dot_dot_is_judged_as_the_start_up_writes_it(
) {
    if started_as_child() {
        return;
    }
    let mut env = Env::new();
    let root = env.root().to_path_buf();
    env.set("KVH_LOG_DIR", root.join("kvh/log").display().to_string());
    let metrics = root.join("missing/../kvh/kvh.prom");
    env.set("KVH_METRICS_FILE", metrics.display().to_string());
    let name = "a_metrics_file_named_through_a_missing_directory_and_dot_dot_is_judged_as_the_start_up_writes_it";
    judged_as_the_start_up_writes(&env, name, &root, &root.join("kvh/kvh.prom"));
}

/// The metrics file named through a regular file and `..` (`file/../kvh/kvh.prom`): the system
/// refuses to walk through a file (ENOTDIR), so the started library writes no metrics file.
#[test]
fn a_metrics_file_named_through_a_regular_file_and_dot_dot_is_judged_as_the_start_up_writes_it() {
    if started_as_child() {
        return;
    }
    let mut env = Env::new();
    let root = env.root().to_path_buf();
    std::fs::write(root.join("file"), "x").unwrap();
    env.set("KVH_LOG_DIR", root.join("kvh/log").display().to_string());
    let metrics = root.join("file/../kvh/kvh.prom");
    env.set("KVH_METRICS_FILE", metrics.display().to_string());
    let name = "a_metrics_file_named_through_a_regular_file_and_dot_dot_is_judged_as_the_start_up_writes_it";
    judged_as_the_start_up_writes(&env, name, &root, &root.join("kvh/kvh.prom"));
}

/// The metrics file's directory a symlink whose target is the log directory, not created yet
/// (`dl -> kvh/log`): the log's start-up creates the target, and the started library writes
/// the metrics file through the link.
#[test]
fn a_metrics_directory_symlinked_to_the_log_directory_not_yet_created_is_judged_as_the_start_up_writes_it(
) {
    if started_as_child() {
        return;
    }
    let mut env = Env::new();
    let root = env.root().to_path_buf();
    let log = root.join("kvh").join("log");
    std::os::unix::fs::symlink(&log, root.join("dl")).unwrap();
    env.set("KVH_LOG_DIR", log.display().to_string());
    let metrics = root.join("dl/kvh.prom");
    env.set("KVH_METRICS_FILE", metrics.display().to_string());
    let name = "a_metrics_directory_symlinked_to_the_log_directory_not_yet_created_is_judged_as_the_start_up_writes_it";
    assert!(judged_as_the_start_up_writes(&env, name, &root, &metrics));
}

/// The metrics file's directory a symlink in a loop (`a -> b`, `b -> a`): nothing can be
/// written there, and the preflight says so (it follows the links a bounded number of times
/// instead of for ever).
#[test]
fn a_metrics_directory_in_a_symlink_loop_fails_its_check() {
    let mut env = Env::new();
    let root = env.root().to_path_buf();
    std::os::unix::fs::symlink(root.join("b"), root.join("a")).unwrap();
    std::os::unix::fs::symlink(root.join("a"), root.join("b")).unwrap();
    env.set("KVH_LOG_DIR", root.join("kvh/log").display().to_string());
    env.set(
        "KVH_METRICS_FILE",
        root.join("a/kvh.prom").display().to_string(),
    );
    let (code, report) = env.preflight(&["--skip-backend"]);
    assert_eq!(status(&report, "metrics file").0, "fail", "{report}");
    assert_eq!(code, 1, "{report}");
}

/// The metrics file named as the log directory itself, which does not exist yet. Spelled as
/// the log directory is, the policy is invalid (2, naming both keys). Spelled through a link
/// to the log's parent, it passes the policy: the log's start-up creates a directory at that
/// path before the metrics export starts, so no snapshot can be renamed there. The
/// preflight's metrics file check passes exactly when the started library writes the file, so
/// here it fails.
#[test]
fn a_metrics_file_named_as_the_log_directory_not_yet_created_fails_as_the_start_up_writes_none() {
    if started_as_child() {
        return;
    }
    let mut env = Env::new();
    let root = env.root().to_path_buf();
    let log = root.join("kvh/log");
    env.set("KVH_LOG_DIR", log.display().to_string());
    env.set("KVH_METRICS_FILE", log.display().to_string());
    let (code, out, err) = run(&mut env.command(&["preflight", "--skip-backend"]));
    assert_eq!(code, 2, "{out}{err}");
    assert!(
        err.contains("metrics_file (KVH_METRICS_FILE) and log_dir (KVH_LOG_DIR)"),
        "{err}"
    );
    std::os::unix::fs::symlink(root.join("kvh"), root.join("alias")).unwrap();
    env.set(
        "KVH_METRICS_FILE",
        root.join("alias/log").display().to_string(),
    );
    let name =
        "a_metrics_file_named_as_the_log_directory_not_yet_created_fails_as_the_start_up_writes_none";
    assert!(!judged_as_the_start_up_writes(&env, name, &root, &log));
}

/// An earlier snapshot at the metrics file's path, marked immutable (`chattr +i`) in a
/// directory that is not: no new snapshot can be renamed over it (the kernel refuses to
/// replace an immutable file, even for root), so the started library leaves it as it was.
/// The preflight's metrics file check passes exactly when the start-up writes the file, so
/// it fails here.
#[test]
fn an_immutable_metrics_snapshot_fails_as_the_start_up_cannot_replace_it() {
    if started_as_child() {
        return;
    }
    let mut env = Env::new();
    let root = env.root().to_path_buf();
    let metrics = root.join("metrics/kvh.prom");
    let old = "# HELP kvh_scrubs_total earlier snapshot\n";
    fs::write(&metrics, old).unwrap();
    fs::set_permissions(&metrics, fs::Permissions::from_mode(0o644)).unwrap();
    env.set("KVH_METRICS_FILE", metrics.display().to_string());
    let Some(_marked) = mark('i', &metrics) else {
        return;
    };
    // The start-up, as the library runs it (started and shut down: a last snapshot).
    let name = "an_immutable_metrics_snapshot_fails_as_the_start_up_cannot_replace_it";
    let mut child = Command::new(std::env::current_exe().unwrap());
    child
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env(START_CHILD, "1")
        .envs(env.vars.iter().map(|(k, v)| (k, v)));
    for (k, _) in std::env::vars() {
        if k.starts_with("KVH_") && !env.vars.iter().any(|(n, _)| *n == k) {
            child.env_remove(k);
        }
    }
    let (_, cout, cerr) = run(&mut child);
    assert!(cout.contains("INIT 0"), "{cout}{cerr}");
    assert_eq!(
        fs::read_to_string(&metrics).unwrap(),
        old,
        "the start-up replaced an immutable file"
    );
    let (code, report) = env.preflight(&["--skip-backend"]);
    assert_eq!(
        status(&report, "metrics file").0,
        "fail",
        "preflight passes a metrics file the start-up cannot replace: {report}"
    );
    assert_eq!(code, 1, "{report}");
}

/// A FIFO stands where the metrics file is named. The preflight reports it (the exporter
/// replaces only a snapshot, never a special file) without opening it: opening a FIFO, or a
/// device file, has effects of its own (a writer blocked on the FIFO is let through), and a
/// check must leave what it looks at as it found it. Seen with inotify, which reports every
/// open of the file.
#[test]
fn the_metrics_file_check_does_not_open_a_special_file_it_finds() {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let mut env = Env::new();
    let fifo = env.root().join("metrics/kvh.prom");
    let c_fifo = CString::new(fifo.as_os_str().as_bytes()).unwrap();
    // SAFETY: a NUL-terminated path that lives across the call.
    assert_eq!(unsafe { libc::mkfifo(c_fifo.as_ptr(), 0o600) }, 0);
    env.set("KVH_METRICS_FILE", fifo.display().to_string());
    // SAFETY: no pointer arguments.
    let watch = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
    assert!(watch >= 0, "inotify_init1");
    // SAFETY: `watch` is an inotify descriptor; the path is NUL-terminated.
    let added = unsafe { libc::inotify_add_watch(watch, c_fifo.as_ptr(), libc::IN_OPEN) };
    assert!(added >= 0, "inotify_add_watch");
    let (code, report) = env.preflight(&["--skip-backend"]);
    let mut buf = [0u8; 4096];
    // SAFETY: `buf` is writable for its length.
    let n = unsafe { libc::read(watch, buf.as_mut_ptr().cast(), buf.len()) };
    // SAFETY: closes the descriptor opened above, once.
    unsafe { libc::close(watch) };
    assert_eq!(
        status(&report, "metrics file").0,
        "fail",
        "precondition: a FIFO is no snapshot: {report}"
    );
    assert_eq!(code, 1, "{report}");
    assert!(
        n <= 0,
        "kvh preflight opened the FIFO at the metrics file's path ({n} bytes of inotify \
         IN_OPEN events): {report}"
    );
}

/// Fills the file system holding `dir` until it takes no more bytes.
fn fill(dir: &Path) {
    use std::io::Write;
    let mut f = fs::File::create(dir.join("filler")).unwrap();
    let page = [0u8; 4096];
    while f.write_all(&page).is_ok() {}
}

/// A log directory whose file system is full: the start-up cannot write its `start` record
/// and fails closed, and preflight fails the log directory first, naming the room left.
#[test]
fn a_full_log_file_system_fails_as_the_start_up_does() {
    let env = Env::new();
    let log = env.root().join("log");
    fs::create_dir(&log).unwrap();
    let Some(_full) = Mounted::tmpfs(&log, "1m", "") else {
        return;
    };
    fill(&log);
    let (code, report) = env.preflight(&["--skip-backend"]);
    assert_eq!(code, 1, "{report}");
    let (st, detail) = status(&report, "log directory");
    assert_eq!(st, "fail", "{report}");
    assert!(
        detail.contains("its file system has 0 bytes"),
        "the room is not named: {detail}"
    );
    let (started, _, err) = run(&mut env.command(&START));
    assert_eq!(started, 2, "the start-up ran on a full file system: {err}");
}

/// Room below the start-up's floor fails: a file system that takes too few more files (its
/// inodes), or one with bytes to spare under 1 MiB. A file system with room passes, and one
/// that states no size (tmpfs `size=0`) is reported as such and passes.
#[test]
fn a_log_file_system_short_of_files_or_bytes_fails_and_one_with_room_passes() {
    type Case = (&'static str, &'static str, Option<&'static str>);
    let cases: [Case; 4] = [
        ("64m", ",nr_inodes=8", Some("files there")),
        ("512k", "", Some("KiB and")),
        ("64m", "", None),
        ("0", "", None),
    ];
    for (size, options, fails_with) in cases {
        let env = Env::new();
        let log = env.root().join("log");
        fs::create_dir(&log).unwrap();
        let Some(_mounted) = Mounted::tmpfs(&log, size, options) else {
            return;
        };
        let (code, report) = env.preflight(&["--skip-backend"]);
        let (st, detail) = status(&report, "log directory");
        match fails_with {
            Some(says) => {
                assert_eq!((code, st), (1, "fail"), "size={size}{options}: {report}");
                assert!(detail.contains(says), "size={size}{options}: {detail}");
            }
            None => {
                assert_eq!((code, st), (0, "ok"), "size={size}{options}: {report}");
                assert!(detail.contains("left on its file system"), "{detail}");
            }
        }
        if size == "0" {
            assert!(detail.contains("no stated size limit"), "{detail}");
        }
    }
}

/// On ext4, the blocks statvfs counts free (`f_bfree`) include a pool the kernel keeps back
/// from every writer, root included (2% of the volume, up to 4096 blocks). On a volume filled
/// until this process's writes fail, the start-up cannot create the log directory, and the
/// preflight, run by the same user, fails the log directory too.
#[test]
fn a_full_ext4_log_file_system_fails_as_the_start_up_does() {
    let env = Env::new();
    let log = env.root().join("log");
    fs::create_dir(&log).unwrap();
    let Some(_full) = Mounted::ext4(&log, 128) else {
        return;
    };
    fill(&log);
    let (started, _, err) = run(&mut env.command(&START));
    assert_eq!(started, 2, "the start-up ran on a full file system: {err}");
    let (code, report) = env.preflight(&["--skip-backend"]);
    let (st, detail) = status(&report, "log directory");
    assert_eq!(
        (code, st),
        (1, "fail"),
        "the start-up fails on this file system, the preflight passes it: {detail}"
    );
}

/// A separate checkpoint directory on a full file system fails its own check: the start-up
/// writes the first signed checkpoint there, and fails closed when it cannot.
#[test]
fn a_full_checkpoint_file_system_fails_as_the_start_up_does() {
    let mut env = Env::new();
    let ckpt = env.root().join("ckpt-dir");
    fs::create_dir(&ckpt).unwrap();
    env.set(
        "KVH_CHECKPOINT_DIR",
        ckpt.join("signed").display().to_string(),
    );
    let Some(_full) = Mounted::tmpfs(&ckpt, "1m", "") else {
        return;
    };
    fill(&ckpt);
    let (code, report) = env.preflight(&["--skip-backend"]);
    assert_eq!(code, 1, "{report}");
    let (st, detail) = status(&report, "checkpoint directory");
    assert_eq!(st, "fail", "{report}");
    assert!(detail.contains("file system has"), "{detail}");
    assert_eq!(status(&report, "log directory").0, "ok", "{report}");
    let (started, _, err) = run(&mut env.command(&START));
    assert_eq!(
        started, 2,
        "the start-up ran with a full checkpoint file system: {err}"
    );
}

/// With `FORENSIC_HMAC_SECRET` and `KVH_HMAC_KEY_FILE` both set, the start-up seals with the
/// variable and never reads the file: the check says which one it read and that the file is
/// not, since a verifier handed that file would fail on every record were the two different.
#[test]
fn a_secret_in_the_environment_next_to_a_key_file_says_the_file_is_not_read() {
    let mut env = Env::new();
    env.set("FORENSIC_HMAC_SECRET", "cd".repeat(32));
    let (code, report) = env.preflight(&["--skip-backend"]);
    assert_eq!(code, 0, "{report}");
    let (st, detail) = status(&report, "hmac key");
    assert_eq!(st, "ok", "{report}");
    assert!(
        detail.starts_with("FORENSIC_HMAC_SECRET (KVH_HMAC_KEY_FILE")
            && detail.contains("hmac.key is set too and not read"),
        "{detail}"
    );
    env.vars.retain(|(k, _)| k != "KVH_HMAC_KEY_FILE");
    let (_, report) = env.preflight(&["--skip-backend"]);
    let (_, detail) = status(&report, "hmac key");
    assert!(detail.starts_with("FORENSIC_HMAC_SECRET: read"), "{detail}");
}

/// A log directory holding a chain sealed otherwise than the policy seals (written without
/// an HMAC key, and a key is configured now; or the reverse) fails: the start-up goes on, but
/// the directory then holds both kinds, which `kvh verify-log --key-file` refuses. The
/// chains' sealing as the policy's passes.
#[test]
fn a_log_directory_whose_chains_are_sealed_otherwise_than_the_policy_fails() {
    for key_first in [false, true] {
        let mut env = Env::new();
        let hmac = env.root().join("hmac.key").display().to_string();
        if !key_first {
            env.vars.retain(|(k, _)| k != "KVH_HMAC_KEY_FILE");
        }
        assert_eq!(env.start(), 0, "the first process (key: {key_first})");
        let (code, report) = env.preflight(&["--skip-backend"]);
        assert_eq!(code, 0, "as the first process sealed: {report}");
        if key_first {
            env.vars.retain(|(k, _)| k != "KVH_HMAC_KEY_FILE");
        } else {
            env.set("KVH_HMAC_KEY_FILE", hmac.clone());
        }
        let (code, report) = env.preflight(&["--skip-backend"]);
        assert_eq!(code, 1, "key first: {key_first}: {report}");
        let (st, detail) = status(&report, "log directory");
        assert_eq!(st, "fail", "{report}");
        let says = if key_first {
            "sealed with an HMAC key"
        } else {
            "written without an HMAC key"
        };
        assert!(detail.contains(says), "{detail}");
        assert!(
            detail.contains("chain p"),
            "the chain is not named: {detail}"
        );
        // What it warns of: the start-up goes on, and the directory no longer verifies
        // with the key.
        assert_eq!(
            env.open_log_as_the_library_does(),
            Ok(()),
            "the second process"
        );
        let dir = env.root().join("log/chains");
        let (verified, out, _) = run(kvh()
            .arg("verify-log")
            .arg(&dir)
            .args(["--key-file", &hmac]));
        assert_eq!(
            verified, 1,
            "a directory holding both kinds verified: {out}"
        );
    }
}

/// A signing key whose `PREFIX.pub` beside it is not its public half (the public key copied
/// over the private one in the Secret, or a `.pub` of another key) fails: the start-up signs
/// with it all the same, and verifiers that pin that `.pub` then refuse every checkpoint. The
/// pair as `kvh keygen` wrote it passes, naming the `.pub`.
#[test]
fn a_signing_key_whose_pub_beside_it_is_not_its_public_half_fails() {
    let env = Env::new();
    let (code, report) = env.preflight(&["--skip-backend"]);
    assert_eq!(code, 0, "{report}");
    assert!(
        status(&report, "signing key")
            .1
            .contains("the public half of"),
        "{report}"
    );
    let key = env.root().join("ckpt.key");
    let public = env.root().join("ckpt.pub");
    // The public key copied over the private one.
    fs::copy(&public, &key).unwrap();
    fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).unwrap();
    let (code, report) = env.preflight(&["--skip-backend"]);
    assert_eq!(code, 1, "{report}");
    let (st, detail) = status(&report, "signing key");
    assert_eq!(st, "fail", "{report}");
    assert!(
        detail.contains("is not") && detail.contains("ckpt.pub"),
        "{detail}"
    );
    // What it warns of: the start-up signs, and the pinned .pub refuses the checkpoint.
    assert_eq!(env.start(), 0);
    let (verified, out, err) = verify_pinned(&env, &public);
    assert_eq!(verified, 1, "{out}{err}");
}

/// A private directory (0700) at `path`, as `kvh prune-log` wants its archive.
fn private_dir(path: &Path) {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new().mode(0o700).create(path).unwrap();
}

/// Starts a sealed process in `env`, then moves its chain whole to `archive` (made here) with
/// `kvh prune-log` and the HMAC key, `extra` arguments added (relative to the environment's
/// root).
fn pruned_whole(env: &Env, archive: &Path, extra: &[&str]) {
    let root = env.root();
    let dir = root.join("log/chains");
    private_dir(archive);
    assert_eq!(env.start(), 0, "the sealed process");
    let (code, out, err) = run(kvh()
        .current_dir(root)
        .arg("prune-log")
        .arg(&dir)
        .arg("--archive-dir")
        .arg(archive)
        .args(["--older-than", "0"])
        .arg("--key-file")
        .arg(root.join("hmac.key"))
        .args(extra));
    assert_eq!(code, 0, "{out}{err}");
    assert!(chain_files_in(&dir).is_empty(), "not moved whole: {out}");
}

/// A sealed chain that `kvh prune-log` moved whole to an archive leaves its MACed manifest
/// (`kvh-CHAIN.pruned.json`) in the log directory; `verify-log --allow-pruned` needs the key
/// to account for it. A policy without a key writing into that directory would leave both
/// kinds there, so preflight fails the log directory as it does for a sealed chain whose
/// files are still there.
#[test]
fn a_sealed_chain_pruned_whole_still_counts_as_sealed() {
    let mut env = Env::new();
    let root = env.root().to_path_buf();
    let hmac = root.join("hmac.key");
    let dir = root.join("log/chains");
    let archive = root.join("archive");
    pruned_whole(&env, &archive, &["--public-key", "ckpt.pub"]);
    env.vars.retain(|(k, _)| k != "KVH_HMAC_KEY_FILE");
    let (_, report) = env.preflight(&["--skip-backend"]);
    let (st, detail) = status(&report, "log directory");
    // What the check guards against: after a start-up without a key, the directory verifies
    // neither with the key (`--allow-pruned`) nor without it.
    assert_eq!(
        env.open_log_as_the_library_does(),
        Ok(()),
        "the unsealed process"
    );
    let (with_key, out_key, _) = run(kvh()
        .arg("verify-log")
        .arg(&dir)
        .arg("--key-file")
        .arg(&hmac)
        .arg("--public-key")
        .arg(root.join("ckpt.pub"))
        .arg("--allow-pruned"));
    let (without_key, out_nokey, _) = run(kvh()
        .arg("verify-log")
        .arg(&dir)
        .arg("--public-key")
        .arg(root.join("ckpt.pub")));
    assert!(
        with_key != 0 && without_key != 0,
        "the mixed directory verified: {out_key}{out_nokey}"
    );
    assert_eq!(
        st, "fail",
        "a directory holding a sealed chain's prune manifest passed for a policy without a \
         key: {detail}"
    );
}

/// Following the failed check's remediation for a sealed chain that `kvh prune-log` pruned
/// in part (its oldest files in an archive, its manifest `kvh-CHAIN.pruned.json` in the log
/// directory) leaves both directories verifying: the log directory, with the unsealed
/// chain written afterwards, without a key; the chain moved out, with its key and
/// `--allow-pruned`.
#[test]
fn moving_a_pruned_chain_out_as_preflight_says_leaves_both_directories_verifying() {
    let mut env = Env::new();
    // Unsigned, and small files: a chain of several files whose writer died (no `stop`
    // record), of which prune-log moves all but the two newest.
    env.vars.retain(|(k, _)| k != "KVH_SIGNING_KEY_FILE");
    env.set("KVH_LOG_MAX_BYTES", "4096");
    let root = env.root().to_path_buf();
    let hmac = root.join("hmac.key");
    let dir = root.join("log/chains");
    let archive = root.join("archive");
    let moved = root.join("moved");
    private_dir(&archive);
    private_dir(&moved);
    let (code, out, err) = run(&mut env.command(&["demo", "--tenants", "2", "--requests", "8"]));
    assert_eq!(code, 0, "{out}{err}");
    let files = chain_files_in(&dir);
    assert!(files.len() >= 3, "{files:?}");
    cut_stop_record(files.last().unwrap());
    let (code, out, err) = run(kvh()
        .arg("prune-log")
        .arg(&dir)
        .arg("--archive-dir")
        .arg(&archive)
        .args(["--older-than", "0"])
        .arg("--key-file")
        .arg(&hmac));
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(chain_files_in(&dir).len(), 2, "{out}");

    env.vars.retain(|(k, _)| k != "KVH_HMAC_KEY_FILE");
    let (code, report) = env.preflight(&["--skip-backend"]);
    assert_eq!(code, 1, "{report}");
    let (_, detail) = status(&report, "log directory");
    assert!(detail.contains("Move those chains out whole"), "{detail}");
    // As the message says: every file it names of the chain, moved to a directory of its own.
    let chain = chain_files_in(&dir)[0]
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .rsplit_once('-')
        .unwrap()
        .0
        .to_string();
    let named = |name: &str| {
        (name.starts_with(&format!("{chain}-")) && name.ends_with(".jsonl"))
            || name == format!("{chain}.ckpt")
            || (detail.contains(".pruned.json") && name == format!("{chain}.pruned.json"))
    };
    for entry in fs::read_dir(&dir).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        if named(&name) {
            fs::rename(dir.join(&name), moved.join(&name)).unwrap();
        }
    }
    assert_eq!(env.start(), 0, "the unsealed process");
    let (here, out_here, err_here) = run(kvh().arg("verify-log").arg(&dir));
    let (there, out_there, err_there) = run(kvh()
        .arg("verify-log")
        .arg(&moved)
        .arg("--key-file")
        .arg(&hmac)
        .arg("--allow-pruned"));
    assert_eq!(
        (here, there),
        (0, 0),
        "remediation followed ({detail}):\nlog directory: {out_here}{err_here}\nmoved: \
         {out_there}{err_there}"
    );
}

/// A FIFO in place of a chain's first file (its newer file a regular one, which crash
/// recovery opens) is never waited on by preflight, which reads nothing it would block on:
/// the start-up gets past such a directory, and preflight answers for it. (The deadline only
/// keeps a hung preflight from hanging the test: it answers in well under a second.)
#[test]
fn preflight_does_not_wait_on_a_fifo_in_place_of_a_chains_first_file() {
    let mut env = Env::new();
    env.vars.retain(|(k, _)| k != "KVH_SIGNING_KEY_FILE");
    env.set("KVH_LOG_MAX_BYTES", "4096");
    let (code, out, err) = run(&mut env.command(&["demo", "--tenants", "2", "--requests", "2"]));
    assert_eq!(code, 0, "{out}{err}");
    let dir = env.root().join("log/chains");
    let files = chain_files_in(&dir);
    assert!(files.len() >= 2, "{files:?}");
    let first = files[0].clone();
    fs::remove_file(&first).unwrap();
    let c = std::ffi::CString::new(first.to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    assert_eq!(env.start(), 0, "the start-up gets past the directory");

    let mut child = env
        .command(&["preflight", "--skip-backend"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let ended = loop {
        if child.try_wait().unwrap().is_some() {
            break true;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break false;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert!(
        ended,
        "preflight did not end: it waits on the FIFO {}",
        first.display()
    );
}

/// The pair mixed up the other way round: the private key copied over the public one, so
/// that `PREFIX.pub` beside the signing key holds its seed, not its public half. Verifiers
/// pinning that `.pub` refuse it, whatever the seed, so preflight fails the signing key for
/// every seed, not only for those whose bytes happen to decode as an Ed25519 point.
#[test]
fn a_signing_key_whose_pub_beside_it_holds_its_seed_fails() {
    let env = Env::new();
    let key = env.root().join("ckpt.key");
    let public = env.root().join("ckpt.pub");
    // A seed whose 32 bytes are not an Ed25519 point (about half of all seeds).
    let seed = (0u8..=255)
        .map(|i| [i; 32])
        .find(|s| ed25519_dalek::VerifyingKey::from_bytes(s).is_err())
        .unwrap();
    let hex: String = seed.iter().map(|b| format!("{b:02x}")).collect();
    fs::write(&key, format!("{hex}\n")).unwrap();
    fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).unwrap();
    fs::write(&public, format!("{hex}\n")).unwrap();
    // What the pinned .pub gives the verifiers: a refusal.
    assert_eq!(env.start(), 0);
    let (verified, out, err) = verify_pinned(&env, &public);
    assert_ne!(verified, 0, "{out}{err}");
    let (code, report) = env.preflight(&["--skip-backend"]);
    let (st, detail) = status(&report, "signing key");
    assert_eq!(
        (code, st),
        (1, "fail"),
        "a signing key with its own seed as the .pub beside it passed: {detail}"
    );
}

/// A sealed chain pruned whole whose manifest is over 1 MiB (about 2,700 files moved; the
/// verifiers read manifests up to 64 MiB) counts as sealed as a small one does. The padding
/// below stands in for the entries: the manifest stays valid (`verify-log --allow-pruned`
/// accepts it), its `mac` past the first MiB, as in a manifest of that many files.
#[test]
fn a_sealed_chain_pruned_whole_with_a_large_manifest_still_counts_as_sealed() {
    let mut env = Env::new();
    env.vars.retain(|(k, _)| k != "KVH_SIGNING_KEY_FILE");
    let root = env.root().to_path_buf();
    let hmac = root.join("hmac.key");
    let dir = root.join("log/chains");
    let archive = root.join("archive");
    pruned_whole(&env, &archive, &[]);
    let manifest = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_str().unwrap().ends_with(".pruned.json"))
        .unwrap();
    let text = fs::read_to_string(&manifest).unwrap();
    let padded = text.replacen(
        "\"files\": [",
        &format!("\"files\": [{}", " ".repeat(1 << 20)),
        1,
    );
    assert_ne!(padded, text);
    fs::write(&manifest, padded).unwrap();
    let (code, out, err) = run(kvh()
        .arg("verify-log")
        .arg(&dir)
        .arg("--key-file")
        .arg(&hmac)
        .arg("--archive-dir")
        .arg(&archive)
        .arg("--allow-pruned"));
    assert_eq!(code, 0, "the manifest is a valid one: {out}{err}");
    env.vars.retain(|(k, _)| k != "KVH_HMAC_KEY_FILE");
    let (_, report) = env.preflight(&["--skip-backend"]);
    let (st, detail) = status(&report, "log directory");
    assert_eq!(
        st, "fail",
        "a sealed chain's large prune manifest passed for a policy without a key: {detail}"
    );
}

/// `PREFIX.pub` beside the signing key holding its public half in upper-case hex digits:
/// the verifiers refuse that file for `--public-key` (64 lower-case hex digits wanted), so
/// preflight, which holds the signing key to the `.pub` beside it, does not pass it either.
#[test]
fn a_signing_key_whose_pub_beside_it_the_verifiers_refuse_does_not_pass() {
    let env = Env::new();
    let public = env.root().join("ckpt.pub");
    let text = fs::read_to_string(&public).unwrap();
    fs::write(&public, text.to_uppercase()).unwrap();
    assert_eq!(env.start(), 0);
    let (verified, out, err) = verify_pinned(&env, &public);
    assert_eq!(verified, 2, "the verifiers refuse the .pub: {out}{err}");
    let (code, report) = env.preflight(&["--skip-backend"]);
    let (st, detail) = status(&report, "signing key");
    assert_eq!(
        (code, st),
        (1, "fail"),
        "a .pub beside the signing key that verifiers refuse passed: {detail}"
    );
}

/// `kvh verify-log` of the environment's log with its HMAC key and `public` pinned.
fn verify_pinned(env: &Env, public: &Path) -> (i32, String, String) {
    run(kvh()
        .arg("verify-log")
        .arg(env.root().join("log/chains"))
        .arg("--key-file")
        .arg(env.root().join("hmac.key"))
        .arg("--public-key")
        .arg(public))
}

/// Run as root, on an ext4 volume whose unprivileged share is nearly used up but with blocks
/// reserved for root (`mkfs.ext4 -m`), the start-up still has megabytes of room. The check
/// counts what every writer has (a deliberate margin, ARCHITECTURE.md): it fails, and says
/// how much more the reserve keeps back.
#[test]
fn a_log_file_system_full_but_for_roots_reserve_fails_and_names_the_reserve() {
    use std::io::Write;
    if unsafe { libc::geteuid() } != 0 {
        skip::skipped("not root");
        return;
    }
    let env = Env::new();
    let log = env.root().join("log");
    fs::create_dir(&log).unwrap();
    // 64 MiB, a quarter reserved for root.
    let Some(_volume) = Mounted::ext4_reserved(&log, 64, 25) else {
        return;
    };
    // Fills the unprivileged share up to 512 KiB.
    let c = std::ffi::CString::new(log.to_str().unwrap()).unwrap();
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut st) }, 0);
    let avail = st.f_bavail * st.f_frsize;
    let mut filler = fs::File::create(log.join("filler")).unwrap();
    let chunk = vec![0u8; 1 << 20];
    let mut left = avail - (512 << 10);
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        filler.write_all(&chunk[..n]).unwrap();
        left -= n as u64;
    }
    filler.sync_all().unwrap();
    drop(filler);
    // Root still has the reserved blocks: several MiB written there, then removed.
    let probe = log.join("probe");
    fs::write(&probe, vec![0u8; 8 << 20]).expect("root cannot write 8 MiB more");
    fs::remove_file(&probe).unwrap();
    let (started, _, err) = run(&mut env.command(&START));
    assert_eq!(started, 0, "the root start-up: {err}");
    let (code, report) = env.preflight(&["--skip-backend"]);
    let (st, detail) = status(&report, "log directory");
    assert_eq!((code, st), (1, "fail"), "{detail}");
    assert!(
        detail.contains("for writers other than root (up to ")
            && detail.contains(
                "MiB more are kept back by the file system, such as ext4's reserve for root"
            ),
        "{detail}"
    );
}

/// `command` run with the file size limit (`RLIMIT_FSIZE`) at `bytes`, as `ulimit -f` sets
/// it for a server and everything it starts.
fn with_file_size_limit(mut command: Command, bytes: u64) -> Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the forked child before exec and only calls setrlimit,
    // which is async-signal-safe, on a limit it builds on its stack.
    unsafe {
        command.pre_exec(move || {
            let limit = libc::rlimit {
                rlim_cur: bytes,
                rlim_max: bytes,
            };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &limit) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        })
    };
    command
}

/// A file size limit too small for a log file fails the check, as the start-up fails on its
/// first record; one that holds a log file and a snapshot passes, as the start-up writes
/// both.
#[test]
fn a_file_size_limit_the_log_cannot_write_under_fails_as_the_start_up_does() {
    let env = Env::new();
    let small = with_file_size_limit(env.command(&["preflight", "--json"]), 4096);
    let (code, out, err) = run(&mut { small });
    let report: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}{err}"));
    assert_eq!(code, 1, "{report}");
    let (st, detail) = status(&report, "file size limit");
    assert_eq!(st, "fail", "{report}");
    assert!(
        detail.contains("forensic log files need at least 8.0 KiB")
            && detail.contains("metrics snapshots need"),
        "{detail}"
    );
    let (code, _, err) = run(&mut with_file_size_limit(env.command(&START), 4096));
    assert_ne!(
        code, 0,
        "the start-up wrote its log under a 4 KiB limit: {err}"
    );

    let env = Env::new();
    let roomy = 1 << 20;
    let (code, out, err) = run(&mut with_file_size_limit(
        env.command(&["preflight", "--json"]),
        roomy,
    ));
    let report: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}{err}"));
    assert_eq!(code, 0, "{report}");
    assert_eq!(status(&report, "file size limit").0, "ok", "{report}");
    let (code, _, err) = run(&mut with_file_size_limit(env.command(&START), roomy));
    assert_eq!(code, 0, "the start-up failed under a 1 MiB limit: {err}");
    assert!(!chain_files_in(&env.root().join("log/chains")).is_empty());
    // Without a limit there is nothing to check.
    let (_, report) = Env::new().preflight(&[]);
    assert!(
        report["checks"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["check"] != "file size limit"),
        "{report}"
    );
}

/// A relative log directory or metrics file whose working directory was removed: nothing
/// can be created there, though the directory still answers `stat` as writable. Both checks
/// fail, as the start-up fails to create the log directory.
#[test]
fn relative_paths_under_a_removed_working_directory_fail_as_the_start_up_does() {
    use std::os::unix::process::CommandExt;
    let mut env = Env::new();
    env.set("KVH_LOG_DIR", "logs");
    env.set("KVH_METRICS_FILE", "kvh.prom");
    let in_removed = |args: &[&str]| {
        let gone = env.root().join("gone");
        fs::create_dir(&gone).unwrap();
        let path = std::ffi::CString::new(gone.as_os_str().as_encoded_bytes()).unwrap();
        let mut c = env.command(args);
        c.current_dir(&gone);
        // SAFETY: runs in the forked child before exec, after it moved into `gone`, and only
        // calls rmdir (async-signal-safe) on a path built before the fork.
        unsafe {
            c.pre_exec(move || {
                if libc::rmdir(path.as_ptr()) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            })
        };
        c
    };
    let (code, out, err) = run(&mut in_removed(&["preflight", "--json"]));
    let report: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}{err}"));
    assert_eq!(code, 1, "{report}");
    for check in ["log directory", "metrics file"] {
        let (st, detail) = status(&report, check);
        assert_eq!(st, "fail", "{check}: {report}");
        assert!(detail.contains("was removed"), "{check}: {detail}");
    }
    let (code, _, err) = run(&mut in_removed(&START));
    assert_eq!(
        code, 2,
        "the start-up got past a removed working directory: {err}"
    );
}

//! `kvh demo` under a server's policy (`KVH_LOG_DIR`, `KVH_CHECKPOINT_DIR`, a signing key):
//! the run never leaves in the server's directories what would make the server's log fail
//! verification or hold the fault drill's deliberate failures. Its own `--log-dir` and
//! `--checkpoint-dir` are compared with the policy's as directories (another spelling, a
//! relative path, a link, a directory not created yet are the same directory).

#[path = "cli_common/mod.rs"]
mod cli_common;

use std::ffi::OsStr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use cli_common::{kvh, run};

/// A server's sealed and signed log: its policy, and its log written by a first run under it.
struct Server {
    tmp: tempfile::TempDir,
    /// `KVH_CHECKPOINT_DIR`; without one, checkpoints are kept next to the log.
    checkpoint_dir: Option<PathBuf>,
}

impl Server {
    /// A policy with a signing key, checkpoints in a directory of their own or not, and the
    /// server's log already written under it.
    fn started(own_checkpoint_dir: bool) -> Server {
        let tmp = tempfile::tempdir().unwrap();
        let (code, _, err) = run(kvh().args(["keygen", "--out"]).arg(tmp.path().join("sign")));
        assert_eq!(code, 0, "{err}");
        let hmac = tmp.path().join("hmac.key");
        std::fs::write(&hmac, "ab".repeat(32) + "\n").unwrap();
        std::fs::set_permissions(&hmac, std::fs::Permissions::from_mode(0o600)).unwrap();
        let checkpoint_dir = own_checkpoint_dir.then(|| private_dir(&tmp.path().join("ckpt")));
        let server = Server {
            tmp,
            checkpoint_dir,
        };
        let (code, out, err) = server.demo::<&str>(&[]);
        assert_eq!(code, 0, "the server's own run: {out}{err}");
        server
    }

    fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    fn log(&self) -> PathBuf {
        self.path("server-log")
    }

    /// Where the policy's checkpoints are.
    fn checkpoints(&self) -> PathBuf {
        self.checkpoint_dir.clone().unwrap_or_else(|| self.log())
    }

    fn policy<'a>(&self, cmd: &'a mut Command) -> &'a mut Command {
        cmd.env("KVH_BACKEND", "host")
            .env("KVH_LOG_DIR", self.log())
            .env("KVH_SIGNING_KEY_FILE", self.path("sign.key"))
            .env("KVH_HMAC_KEY_FILE", self.path("hmac.key"));
        if let Some(dir) = &self.checkpoint_dir {
            cmd.env("KVH_CHECKPOINT_DIR", dir);
        }
        cmd
    }

    /// A short demo under the policy, with `args`.
    fn demo<S: AsRef<OsStr>>(&self, args: &[S]) -> (i32, String, String) {
        let mut cmd = kvh();
        cmd.args(["demo", "--tenants", "1", "--requests", "1"])
            .args(args);
        run(self.policy(&mut cmd))
    }

    /// The server's log verified with its checkpoints, as its auditors do.
    fn verify(&self) -> (i32, String, String) {
        run(kvh()
            .arg("verify-log")
            .arg(self.log())
            .arg("--key-file")
            .arg(self.path("hmac.key"))
            .arg("--public-key")
            .arg(self.path("sign.pub"))
            .arg("--checkpoint")
            .arg(self.checkpoints()))
    }

    fn assert_verifies(&self, after: &str) {
        let (code, out, err) = self.verify();
        assert_eq!(
            code, 0,
            "after {after}, the server's log no longer verifies with its checkpoints:\n{out}{err}"
        );
    }
}

/// `dir`, created 0700 (as the log writer requires).
fn private_dir(dir: &Path) -> PathBuf {
    std::fs::create_dir(dir).unwrap();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    dir.to_path_buf()
}

fn entries(dir: &Path) -> Vec<std::ffi::OsString> {
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .map(|d| d.map(|e| e.unwrap().file_name()).collect())
        .unwrap_or_default();
    names.sort();
    names
}

/// The fault drill, with `KVH_LOG_DIR=policy_log` and `args`, run from `cwd`.
fn drill(policy_log: &Path, cwd: &Path, args: &[&OsStr]) -> (i32, String, String) {
    run(kvh()
        .current_dir(cwd)
        .args([
            "demo",
            "--tenants",
            "1",
            "--requests",
            "2",
            "--inject-fault",
        ])
        .args(args)
        .env("KVH_LOG_DIR", policy_log))
}

/// The fault drill's sabotaged scrubs are verification failures and quarantines in the
/// forensic log. Under a policy that names a log directory (a server's environment, where
/// KVH_LOG_DIR is its audit log, watched by a SIEM), the drill runs only with a --log-dir of
/// its own: without one it is refused, and nothing is written into the policy's directory.
#[test]
fn the_fault_drill_is_not_logged_into_the_policys_log_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let policy_log = tmp.path().join("server-log");
    let (code, out, err) = drill(&policy_log, tmp.path(), &[]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(
        err.contains("--log-dir") && err.contains(&*policy_log.to_string_lossy()),
        "{err}"
    );
    assert!(
        !policy_log.exists(),
        "the drill wrote into the policy's log"
    );

    // With a directory of its own, the drill runs and logs there only.
    let drill_log = tmp.path().join("drill-log");
    let (code, out, err) = drill(
        &policy_log,
        tmp.path(),
        &["--log-dir".as_ref(), drill_log.as_ref()],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(drill_log.is_dir() && !policy_log.exists());

    // A run without the drill logs where the policy says, as the process it stands for would.
    let (code, out, err) = run(kvh()
        .args(["demo", "--tenants", "1", "--requests", "2"])
        .env("KVH_LOG_DIR", &policy_log));
    assert_eq!(code, 0, "{out}{err}");
    assert!(policy_log.is_dir());
}

/// A --log-dir that is the policy's own log directory, in whatever spelling, is not a
/// directory of the drill's own: the drill is refused and creates nothing there. The same
/// directory: the same path (existing), a relative spelling of one not created yet, the
/// target of a link the policy names before that target exists.
#[test]
fn the_fault_drill_is_refused_when_its_log_dir_is_the_policys() {
    let tmp = tempfile::tempdir().unwrap();
    let existing = private_dir(&tmp.path().join("existing"));
    let (code, out, err) = drill(
        &existing,
        tmp.path(),
        &["--log-dir".as_ref(), existing.as_ref()],
    );
    assert_eq!(
        (code, entries(&existing).len()),
        (2, 0),
        "the same path: {out}{err}"
    );

    let not_yet = tmp.path().join("not-yet");
    let (code, out, err) = drill(
        &not_yet,
        tmp.path(),
        &["--log-dir".as_ref(), "not-yet".as_ref()],
    );
    assert_eq!(
        (code, not_yet.exists()),
        (2, false),
        "a relative spelling: {out}{err}"
    );

    let target = tmp.path().join("data");
    let link = tmp.path().join("var-log");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let (code, out, err) = drill(
        &link.join("kvh"),
        tmp.path(),
        &["--log-dir".as_ref(), target.join("kvh").as_ref()],
    );
    assert_eq!(
        (code, target.exists()),
        (2, false),
        "through a link not resolved yet: {out}{err}"
    );
}

/// A server's policy that signs checkpoints keeps them in a directory of their own
/// (KVH_CHECKPOINT_DIR). The fault drill, run in that environment with a --log-dir of its
/// own, writes nothing where the server's auditors verify the server's log, and the server's
/// log still verifies with its checkpoints afterwards.
#[test]
fn the_fault_drill_leaves_nothing_in_the_policys_checkpoint_directory() {
    let server = Server::started(true);
    let before = entries(&server.checkpoints());
    let drill_log = server.path("drill-log");
    let (code, out, err) = server.demo(&[
        "--inject-fault".as_ref(),
        "--log-dir".as_ref(),
        drill_log.as_os_str(),
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(entries(&server.checkpoints()), before);
    server.assert_verifies("the drill with a --log-dir of its own");
}

/// With a log of the run's own, a --checkpoint-dir where the policy's checkpoints go (its
/// KVH_CHECKPOINT_DIR, or without one its log directory) would leave there a checkpoint of a
/// chain that is not in the server's log, and the server's log would fail verification
/// ("files deleted"). Such a run is refused (exit 2) and writes nothing there.
#[test]
fn a_checkpoint_dir_where_the_policys_checkpoints_go_is_refused_for_a_log_of_the_runs_own() {
    for own_checkpoint_dir in [true, false] {
        let server = Server::started(own_checkpoint_dir);
        let before = entries(&server.checkpoints());
        let (code, out, err) = server.demo(&[
            "--log-dir".as_ref(),
            server.path("demo-log").as_os_str(),
            "--checkpoint-dir".as_ref(),
            server.checkpoints().as_os_str(),
        ]);
        assert_eq!(code, 2, "{out}{err}");
        assert_eq!(entries(&server.checkpoints()), before);
        server.assert_verifies("a refused --checkpoint-dir");
    }
}

/// A --log-dir that names the policy's checkpoint directory (not its log directory) is a
/// log of the run's own whose checkpoints would go next to it, where the policy's are: the
/// run is refused (exit 2), and the server's log still verifies.
#[test]
fn a_log_dir_that_is_the_policys_checkpoint_directory_is_refused() {
    let server = Server::started(true);
    let before = entries(&server.checkpoints());
    let (code, out, err) = server.demo(&["--log-dir".as_ref(), server.checkpoints().as_os_str()]);
    assert_eq!(code, 2, "{out}{err}");
    assert_eq!(entries(&server.checkpoints()), before);
    server.assert_verifies("`kvh demo --log-dir <the policy's checkpoint directory>`");
}

/// The README: a run's `--log-dir` keeps its signed checkpoints "next to it, or in
/// `--checkpoint-dir`, never in the policy's `KVH_CHECKPOINT_DIR`". A --log-dir naming the
/// policy's checkpoint directory together with a --checkpoint-dir of the run's own puts no
/// checkpoint there (they go to that --checkpoint-dir), so the run is not refused on that
/// ground: it runs (exit 0), the policy's checkpoint directory gains no checkpoint, and the
/// server's log still verifies.
#[test]
fn a_log_dir_that_is_the_policys_checkpoint_directory_with_a_checkpoint_dir_of_its_own_runs() {
    let server = Server::started(true);
    let ckpt_files = |dir: &Path| {
        entries(dir)
            .into_iter()
            .filter(|n| n.to_string_lossy().ends_with(".ckpt"))
            .collect::<Vec<_>>()
    };
    let before = ckpt_files(&server.checkpoints());
    let mine = server.path("my-ckpt");
    let (code, out, err) = server.demo(&[
        "--log-dir".as_ref(),
        server.checkpoints().as_os_str(),
        "--checkpoint-dir".as_ref(),
        mine.as_os_str(),
    ]);
    assert_eq!(
        code, 0,
        "refused although its checkpoints go to its own --checkpoint-dir:\n{out}{err}"
    );
    assert_eq!(ckpt_files(&server.checkpoints()), before);
    assert_eq!(ckpt_files(&mine).len(), 1, "{:?}", entries(&mine));
    server.assert_verifies(
        "`kvh demo --log-dir <the policy's checkpoint directory> --checkpoint-dir <its own>`",
    );
}

/// A --log-dir that names the policy's own log directory (a plain run, which may log there)
/// writes its chain into the server's log: its checkpoint goes where the policy keeps that
/// log's checkpoints, and a --checkpoint-dir of another directory is refused. Either way the
/// server's log still verifies with its checkpoint directory.
#[test]
fn a_run_into_the_policys_log_directory_keeps_it_verifiable() {
    let server = Server::started(true);
    let (code, out, err) = server.demo(&["--log-dir".as_ref(), server.log().as_os_str()]);
    assert_eq!(code, 0, "{out}{err}");
    server.assert_verifies("`kvh demo --log-dir <the policy's log directory>`");

    let (code, out, err) = server.demo(&[
        "--log-dir".as_ref(),
        server.log().as_os_str(),
        "--checkpoint-dir".as_ref(),
        server.path("my-ckpt").as_os_str(),
    ]);
    assert_eq!(code, 2, "{out}{err}");
    server.assert_verifies("a refused --checkpoint-dir of another directory");
}

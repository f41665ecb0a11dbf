//! `kvh demo`, run as the built binary: its verdict and exit status account for everything the
//! run was asked to show, the forensic log it was asked to write included.

#[path = "cli_common/mod.rs"]
mod cli_common;
#[path = "fake_cuda/mod.rs"]
mod fake_cuda;
#[path = "skip/mod.rs"]
mod skip;

use std::os::unix::process::CommandExt;

use cli_common::{host_demo, kvh, run};
use kvhygiene::backend::host::HostBackend;
use kvhygiene::backend::Backend;
use kvhygiene::config::Config;
use kvhygiene::demo::{self, DemoOptions};

/// A demo whose forensic log could not be written in full (the disk filled up after the
/// start record: here, a file size limit lets the first records through and refuses the
/// rest) lost security records (the drill's verification failure and quarantine). Lost
/// security records are a failure everywhere else (`kvh metrics --fail-on-security`,
/// `kvh gate`), so the demo must not print PASS and exit 0 over them, nor tell the user to
/// verify a log that is missing records without saying so.
#[test]
fn a_demo_whose_forensic_log_lost_records_does_not_pass() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    let mut cmd = kvh();
    cmd.args([
        "demo",
        "--tenants",
        "1",
        "--requests",
        "2",
        "--inject-fault",
        "--log-dir",
    ])
    .arg(&dir);
    limit_file_size(&mut cmd);
    let (code, out, err) = run(&mut cmd);
    assert!(!err.contains("panicked"), "{err}");
    assert_ne!(
        code, 0,
        "records of the run were lost from its forensic log, yet the demo passed:\n{out}{err}"
    );
    assert!(
        !out.contains("PASS"),
        "the demo says PASS over a forensic log that lost records:\n{out}"
    );
}

/// The fault drill under a valid policy that tolerates a few non-zero samples
/// (`KVH_COVERAGE_THRESHOLD=0.5`, inside (0, 1]): the sabotaged block reads non-zero samples
/// after its scrub and is quarantined for residue, never handed out again, which is what the
/// drill is there to show. The demo must report it caught, not "NOT caught" and FAIL.
#[test]
fn the_fault_drill_is_caught_under_a_lower_coverage_threshold() {
    let (code, out, err) = run(kvh()
        .args([
            "demo",
            "--tenants",
            "1",
            "--requests",
            "2",
            "--inject-fault",
        ])
        .env("KVH_COVERAGE_THRESHOLD", "0.5"));
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        !out.contains("NOT caught"),
        "the sabotaged block was quarantined, yet the drill says it was not caught:\n{out}"
    );
    // Its verification passed the lowered threshold: the table says what was read instead.
    assert!(
        out.contains("failed 0, residue read in 1"),
        "the verifications row does not show the residue the block was quarantined for:\n{out}"
    );
    assert_eq!(code, 0, "{out}{err}");
}

/// With `--metrics-file`, the demo leaves the run's last metrics snapshot there, as a process
/// would: what `kvh metrics` and `kvh gate` read, without a GPU. A clean run is admitted; the
/// fault drill's failures evict. `{pid}` names the demo's own file, with a `pid` label on
/// every sample. KVH_METRICS_FILE (a running server's file, maybe) is left alone.
#[test]
fn the_demo_leaves_a_metrics_snapshot_the_gate_judges() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("kvh.prom");
    let demo = |extra: &[&str]| {
        run(kvh()
            .args([
                "demo",
                "--tenants",
                "1",
                "--requests",
                "2",
                "--metrics-file",
            ])
            .arg(&file)
            .args(extra))
    };
    let (code, out, err) = demo(&[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains(&format!("kvh gate --metrics-file {}", file.display())),
        "{out}"
    );
    let gate = || run(kvh().arg("gate").arg("--metrics-file").arg(&file));
    let (code, out, err) = gate();
    assert_eq!(code, 0, "a clean run is admitted: {out}{err}");
    let (code, out, err) = run(kvh()
        .args(["metrics", "--fail-on-security", "--file"])
        .arg(&file));
    assert_eq!(code, 0, "{out}{err}");

    let (code, out, err) = demo(&["--inject-fault"]);
    assert_eq!(code, 0, "the drill is caught: {out}{err}");
    let (code, out, err) = gate();
    assert_eq!(code, 1, "the drill's failures evict: {out}{err}");
    assert!(out.contains("kvh_verifications_total"), "{out}");

    let server = tmp.path().join("server.prom");
    let pattern = tmp.path().join("kvh-{pid}.prom");
    let (code, out, err) = run(kvh()
        .env("KVH_METRICS_FILE", &server)
        .args([
            "demo",
            "--tenants",
            "1",
            "--requests",
            "2",
            "--metrics-file",
        ])
        .arg(&pattern));
    assert_eq!(code, 0, "{out}{err}");
    assert!(!server.exists(), "the demo wrote KVH_METRICS_FILE");
    // `{pid}` in a directory is refused before the run, as the readers refuse it.
    let (code, _, err) = run(kvh()
        .args(["demo", "--requests", "1", "--metrics-file"])
        .arg(tmp.path().join("{pid}").join("kvh.prom")));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("in the file name only"), "{err}");
    // Named as every verb names its messages.
    assert!(err.starts_with("kvh demo: --metrics-file "), "{err}");
    let written: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("kvh-"))
        .collect();
    assert_eq!(written.len(), 1, "{written:?}");
    let pid = written[0]
        .trim_start_matches("kvh-")
        .trim_end_matches(".prom")
        .to_string();
    let text = std::fs::read_to_string(tmp.path().join(&written[0])).unwrap();
    assert!(
        text.contains(&format!("kvh_allocations_total{{pid=\"{pid}\"}}")),
        "{text}"
    );
}

/// A run that fails (here its forensic log lost records, as in
/// `a_demo_whose_forensic_log_lost_records_does_not_pass`) exits 1 and says FAIL also when
/// --metrics-file cannot be written: what the run found outranks an output that could not
/// be written (README: 1 for a failed run, 2 only for a passing run whose report is lost).
#[test]
fn a_failed_demo_exits_1_even_when_its_metrics_file_cannot_be_written() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    // Larger than the file size limit below allows: its write fails.
    let metrics = tmp.path().join("kvh.prom");
    let mut cmd = kvh();
    cmd.args([
        "demo",
        "--tenants",
        "1",
        "--requests",
        "2",
        "--inject-fault",
        "--metrics-file",
    ])
    .arg(&metrics)
    .arg("--log-dir")
    .arg(&dir);
    limit_file_size(&mut cmd);
    let (code, out, err) = run(&mut cmd);
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(
        code, 1,
        "a failed run whose metrics file could not be written must still exit 1:\n{out}{err}"
    );
}

/// A `--metrics-file` the demo cannot write is named in the error as the user gave it: the
/// snapshot's file comes from `--metrics-file` alone (KVH_METRICS_FILE is not used by the
/// demo), so the message must not send the user to the environment variable.
#[test]
fn an_unwritable_metrics_file_is_reported_as_the_metrics_file_option() {
    let tmp = tempfile::tempdir().unwrap();
    // Larger than the file size limit allows: its write fails after the run.
    let metrics = tmp.path().join("kvh.prom");
    let mut cmd = kvh();
    cmd.env_remove("KVH_METRICS_FILE")
        .args([
            "demo",
            "--tenants",
            "1",
            "--requests",
            "2",
            "--metrics-file",
        ])
        .arg(&metrics);
    limit_file_size(&mut cmd);
    let (code, out, err) = run(&mut cmd);
    assert_ne!(code, 0, "{out}{err}");
    assert!(
        err.contains("cannot be written") && err.contains("--metrics-file"),
        "the error does not name --metrics-file:\n{err}"
    );
    assert!(
        !err.contains("KVH_METRICS_FILE"),
        "the error names KVH_METRICS_FILE, which the demo does not read:\n{err}"
    );
}

/// Lets the demo's log hold its start record and the room the writer keeps after its records
/// (4 KiB, for the `lost` and `stop` records), not the whole run, nor a second file (the
/// writer gives a new file room for its link and those records, 5 KiB, before the chain
/// moves there): the disk fills up. A write past 4900 bytes fails with EFBIG instead of
/// killing the process.
fn limit_file_size(cmd: &mut std::process::Command) {
    // SAFETY: only async-signal-safe calls (signal, setrlimit) between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            let limit = libc::rlimit {
                rlim_cur: 4900,
                rlim_max: 4900,
            };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// `--metrics-file` names where the run's snapshot goes; a file already there that is not a
/// kvhygiene metrics snapshot (here an HMAC key file, as a mistyped or tab-completed name
/// gives) is not the demo's to replace. keygen never overwrites a key and tail-log refuses
/// a --state file that is not its own; the demo must likewise leave such a file as it was
/// and exit 2 (its snapshot could not be written), not replace it with a world-readable
/// snapshot.
#[test]
fn a_metrics_file_that_is_not_a_snapshot_is_not_replaced() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let key = tmp.path().join("hmac.key");
    let secret = b"0123456789abcdef0123456789abcdef\n";
    std::fs::write(&key, secret).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (code, out, err) = run(kvh()
        .args([
            "demo",
            "--tenants",
            "1",
            "--requests",
            "2",
            "--metrics-file",
        ])
        .arg(&key));
    assert!(!err.contains("panicked"), "{err}");
    let now = std::fs::read(&key).unwrap();
    assert_eq!(
        now,
        secret,
        "the demo replaced {} (not a metrics snapshot) with its snapshot:\n{out}{err}",
        key.display()
    );
    assert_eq!(code, 2, "{out}{err}");
}

/// A demo that signs checkpoints (KVH_SIGNING_KEY_FILE, KVH_CHECKPOINT_DIR) into a directory
/// in which no checkpoint can be written (a read-only volume; mode 0500 for an unprivileged
/// user): the log's end is then covered by no checkpoint, and the `kvh verify-log` command the
/// demo prints (with `--public-key` and `--checkpoint`) fails. A run whose forensic log
/// cannot be verified as written must not say PASS and exit 0.
#[test]
fn a_demo_whose_checkpoints_cannot_be_written_does_not_pass() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let hmac = root.join("hmac.key");
    std::fs::write(&hmac, "ab".repeat(32) + "\n").unwrap();
    std::fs::set_permissions(&hmac, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (code, _, err) = run(kvh().args(["keygen", "--out"]).arg(root.join("ckpt")));
    assert_eq!(code, 0, "{err}");
    let ckpt = root.join("checkpoints");
    std::fs::create_dir(&ckpt).unwrap();
    std::fs::set_permissions(&ckpt, std::fs::Permissions::from_mode(0o700)).unwrap();
    let log = root.join("log");
    let demo: [&str; 5] = ["demo", "--tenants", "1", "--requests", "2"];
    // SAFETY: geteuid has no preconditions.
    let mut cmd = if unsafe { libc::geteuid() } != 0 {
        std::fs::set_permissions(&ckpt, std::fs::Permissions::from_mode(0o500)).unwrap();
        let mut c = kvh();
        c.args(demo);
        c
    } else {
        // Root: a read-only bind mount in a mount namespace of its own.
        let works = std::process::Command::new("unshare")
            .args(["--mount", "sh", "-c"])
            .arg(r#"mount --bind -o ro "$1" "$1" 2>/dev/null && ! touch "$1/.probe" 2>/dev/null"#)
            .arg("sh")
            .arg(&ckpt)
            .status()
            .is_ok_and(|s| s.success());
        if !works {
            skip::skipped("no way to make the checkpoint directory unwritable here");
            return;
        }
        let mut c = std::process::Command::new("unshare");
        c.args(["--mount", "sh", "-c"])
            .arg(r#"d="$1"; shift; mount --bind -o ro "$d" "$d" && exec "$@""#)
            .arg("sh")
            .arg(&ckpt)
            .arg(env!("CARGO_BIN_EXE_kvh"))
            .args(demo);
        c
    };
    cmd.arg("--log-dir")
        .arg(&log)
        .arg("--checkpoint-dir")
        .arg(&ckpt)
        .env("KVH_BACKEND", "host")
        .env("KVH_HMAC_KEY_FILE", &hmac)
        .env("KVH_SIGNING_KEY_FILE", root.join("ckpt.key"));
    let (code, out, err) = run(&mut cmd);
    let _ = std::fs::set_permissions(&ckpt, std::fs::Permissions::from_mode(0o700));
    assert!(!err.contains("panicked"), "{err}");
    let (vcode, vout, verr) = run(kvh()
        .arg("verify-log")
        .arg(&log)
        .arg("--key-file")
        .arg(&hmac)
        .arg("--public-key")
        .arg(root.join("ckpt.pub"))
        .arg("--checkpoint")
        .arg(&ckpt));
    assert!(
        vcode == 0 || (code != 0 && !out.contains("PASS")),
        "the demo exited {code} saying PASS, but the log it wrote does not verify \
         (verify-log exit {vcode}):\n{out}{err}\n{vout}{verr}"
    );
}

/// The demo's options at values its `--help` accepts (`--decode-tokens 65536`: 4096 KV blocks
/// of 256 KiB per request, 1 GiB per tenant) can ask for more host memory than the machine
/// has (here, an address-space limit of 2 GiB). Running out must end the run with an error
/// and exit 2, as the backend's own out-of-memory does, not abort the process (SIGABRT,
/// shell status 134, which the README reserves for `KVH_FAILURE_MODE=abort`).
#[test]
fn a_demo_that_runs_out_of_host_memory_exits_with_an_error_not_an_abort() {
    let mut cmd = kvh();
    cmd.env("KVH_BACKEND", "host")
        .args(["demo", "--requests", "1", "--decode-tokens", "65536"]);
    // SAFETY: only async-signal-safe calls (setrlimit) between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: 2 << 30,
                rlim_max: 2 << 30,
            };
            if libc::setrlimit(libc::RLIMIT_AS, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let (code, out, err) = run(&mut cmd);
    let tail: String = err.lines().take(3).collect::<Vec<_>>().join("\n");
    assert_ne!(
        code, -1,
        "the demo was killed by a signal when host memory ran out:\n{out}{tail}"
    );
    assert_eq!(code, 2, "{out}{tail}");
}

/// `--checkpoint-dir` without a signing key (none in the policy either) cannot keep any
/// checkpoint, and the run is refused: the message names the option the user gave, not
/// `KVH_CHECKPOINT_DIR`, which is not set, so that the user knows what to drop or complete.
#[test]
fn a_checkpoint_dir_without_a_signing_key_is_refused_naming_the_option() {
    let tmp = tempfile::tempdir().unwrap();
    let (code, _, err) = run(kvh()
        .args(["demo", "--tenants", "1", "--requests", "1", "--log-dir"])
        .arg(tmp.path().join("log"))
        .arg("--checkpoint-dir")
        .arg(tmp.path().join("ckpt")));
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("--checkpoint-dir"),
        "the refusal does not name --checkpoint-dir, the option given:\n{err}"
    );
    assert!(
        !err.contains("KVH_CHECKPOINT_DIR"),
        "the refusal blames KVH_CHECKPOINT_DIR, which is not set:\n{err}"
    );
    // One readable sentence: words separated by single spaces.
    assert!(!err.contains("  "), "runs of blanks in the refusal:\n{err}");
}

/// A `--metrics-file` that names a file that is not a metrics snapshot is refused before the
/// run, as the other argument checks are: nothing is printed on stdout then (not even the
/// run's header), so that a script reading the report does not take a header for the start
/// of one.
#[test]
fn a_refused_metrics_file_prints_no_header_on_stdout() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("notes.txt");
    std::fs::write(&file, "not a snapshot\n").unwrap();
    let (code, out, err) = run(kvh()
        .args([
            "demo",
            "--tenants",
            "1",
            "--requests",
            "1",
            "--metrics-file",
        ])
        .arg(&file));
    assert_eq!(code, 2, "{out}{err}");
    assert!(
        out.is_empty(),
        "the demo printed its header before refusing --metrics-file:\n{out}\n{err}"
    );
}

/// `--inject-fault` on the CUDA backend (chosen by `--backend cuda`, or `KVH_BACKEND=cuda`,
/// where a driver is installed: here the host stand-in of libcuda.so.1) is an argument
/// combination the demo refuses with status 2. As for every other refusal, nothing is printed
/// on stdout first (not even the run's header), and nothing is written into the run's
/// `--log-dir` (no chain with a `start` record and no `stop` record left for an auditor).
#[test]
fn inject_fault_on_the_cuda_backend_is_refused_before_the_header_and_the_log() {
    let Some(driver) = fake_cuda::as_libcuda_dir() else {
        return;
    };
    for how in [&["--backend", "cuda"][..], &[][..]] {
        let tmp = tempfile::tempdir().unwrap();
        let log = tmp.path().join("log");
        let mut cmd = kvh();
        cmd.args([
            "demo",
            "--tenants",
            "1",
            "--requests",
            "1",
            "--inject-fault",
        ])
        .args(how)
        .arg("--log-dir")
        .arg(&log)
        .env("LD_LIBRARY_PATH", driver.path());
        if how.is_empty() {
            cmd.env("KVH_BACKEND", "cuda");
        }
        let (code, out, err) = run(&mut cmd);
        assert_eq!(code, 2, "{how:?}: {out}{err}");
        assert!(
            err.contains("--inject-fault"),
            "{how:?}: the refusal does not name --inject-fault:\n{err}"
        );
        assert!(
            out.is_empty(),
            "{how:?}: the demo printed its header before refusing --inject-fault on the CUDA \
             backend:\n{out}"
        );
        let written: Vec<_> = std::fs::read_dir(&log)
            .map(|d| d.map(|e| e.unwrap().file_name()).collect())
            .unwrap_or_default();
        assert!(
            written.is_empty(),
            "{how:?}: the refused run left a forensic log in --log-dir: {written:?}\n{err}"
        );
    }
}

/// In a server's environment (KVH_METRICS_FILE names the snapshot its probes and its
/// `kvh gate` readiness check read), `kvh demo --inject-fault --metrics-file` naming that same
/// file must leave the server's snapshot alone: the drill's deliberate failures would
/// otherwise stand in the server's file until its next write, and its readiness probe would
/// evict a healthy server. As with a `--log-dir` or `--checkpoint-dir` that is the policy's
/// own, such a run is refused (exit 2) and the file is left as it was.
#[test]
fn the_fault_drill_does_not_replace_the_policys_metrics_file() {
    let tmp = tempfile::tempdir().unwrap();
    let server = tmp.path().join("server.prom");
    drill_into_a_served_snapshot(&server, &server);
}

/// Writes a clean run's snapshot to `served` (a server's, which the gate admits), then runs
/// the fault drill with KVH_METRICS_FILE=`policy` and `--metrics-file served`: the drill is
/// refused (exit 2) and the snapshot left as it was.
fn drill_into_a_served_snapshot(policy: &std::path::Path, served: &std::path::Path) {
    let demo = |extra: &[&str]| {
        let mut cmd = kvh();
        cmd.args(["demo", "--tenants", "1", "--requests", "1"])
            .args(extra)
            .arg("--metrics-file")
            .arg(served);
        cmd
    };
    let (code, out, err) = run(&mut demo(&[]));
    assert_eq!(code, 0, "{out}{err}");
    let before = std::fs::read(served).unwrap();
    let (code, out, err) = run(demo(&["--inject-fault"]).env("KVH_METRICS_FILE", policy));
    let after = std::fs::read(served).unwrap();
    let (gate, gate_out, gate_err) = run(kvh().arg("gate").arg("--metrics-file").arg(policy));
    assert!(
        after == before,
        "the drill replaced {}, the policy's KVH_METRICS_FILE {} or a process's file of it \
         (the gate on it now exits {gate}: {gate_out}{gate_err}); demo exit {code}:\n{out}{err}",
        served.display(),
        policy.display()
    );
    assert_eq!(code, 2, "{out}{err}");
}

/// A demo that cannot start its backend (here a `libcuda.so.1` that opens but is not a
/// driver, on the loader's path before any installed one) says so, exit 2, and names the
/// demo's own way out: `--backend host`.
#[test]
fn a_demo_without_a_usable_gpu_points_to_the_host_backend() {
    let tmp = tempfile::tempdir().unwrap();
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    let libc = maps
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| p.contains("/libc.so") || p.contains("/libc-"))
        .expect("libc is mapped");
    std::fs::copy(libc, tmp.path().join("libcuda.so.1")).unwrap();
    let (code, out, err) = run(kvh().env("LD_LIBRARY_PATH", tmp.path()).args([
        "demo",
        "--backend",
        "cuda",
        "--tenants",
        "1",
        "--requests",
        "1",
    ]));
    assert_eq!(code, 2, "{out}{err}");
    assert!(
        err.contains("backend: ") && err.contains("kvh demo --backend host"),
        "{err}"
    );
}

/// A `--metrics-file` in a directory that does not exist would fail the run at its end
/// (exit 2, the snapshot not written): it is refused before the run, naming the file.
#[test]
fn a_metrics_file_in_a_missing_directory_is_refused_before_the_run() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("missing").join("kvh.prom");
    let (code, out, err) = run(kvh()
        .args([
            "demo",
            "--tenants",
            "1",
            "--requests",
            "1",
            "--metrics-file",
        ])
        .arg(&file));
    assert_eq!(code, 2, "{out}{err}");
    assert!(out.is_empty(), "the run started: {out}");
    assert!(
        err.contains(&file.display().to_string()) && err.contains("directory does not exist"),
        "{err}"
    );
}

/// With a per-process policy file (KVH_METRICS_FILE=DIR/kvh-{pid}.prom, a tensor-parallel
/// server whose workers each write their own snapshot, read by `kvh gate --metrics-file
/// 'DIR/kvh-{pid}.prom'` and `kvh serve-metrics`), a live worker's file DIR/kvh-<pid>.prom
/// is the policy's KVH_METRICS_FILE for that worker. `kvh demo --inject-fault
/// --metrics-file` naming it must be refused (exit 2) and leave the worker's snapshot as it
/// was, as it is for a policy file without `{pid}`.
#[test]
fn the_fault_drill_does_not_replace_a_live_process_file_of_the_policys_metrics_pattern() {
    let tmp = tempfile::tempdir().unwrap();
    let pattern = tmp.path().join("kvh-{pid}.prom");
    // A live process's snapshot under the pattern (this test's process stands for the worker).
    let worker = tmp.path().join(format!("kvh-{}.prom", std::process::id()));
    drill_into_a_served_snapshot(&pattern, &worker);
}

/// A one-request demo logging into `dir` on the host backend, with `var=value` set (the HMAC
/// secret or its key file): (exit status, stdout, stderr).
fn sealed_demo(
    dir: &std::path::Path,
    var: &str,
    value: impl AsRef<std::ffi::OsStr>,
) -> (i32, String, String) {
    run(kvh()
        .args(["demo", "--tenants", "1", "--requests", "1", "--log-dir"])
        .arg(dir)
        .env("KVH_BACKEND", "host")
        .env(var, value))
}

/// `kvh verify-log dir --key-file key`: (exit status, stdout, stderr).
fn verify_with_key(dir: &std::path::Path, key: &std::path::Path) -> (i32, String, String) {
    run(kvh().arg("verify-log").arg(dir).arg("--key-file").arg(key))
}

/// Writes `bytes` to `path`, 0600 (a key file the verifiers accept).
fn key_file(path: &std::path::Path, bytes: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, bytes).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// A demo whose chain would be sealed otherwise than the chains already in its log directory
/// (with an HMAC key where they have none, or without one where they are sealed) is refused
/// (exit 2) before its log opens, naming a chain there and `--log-dir`: the directory is left
/// as it was, verifiable with one `verify-log`, and prunable.
#[test]
fn a_demo_sealed_unlike_its_log_directory_is_refused_and_leaves_it_as_it_was() {
    let tmp = tempfile::tempdir().unwrap();
    let key = tmp.path().join("hmac.key");
    key_file(&key, &"5a".repeat(32));
    let sealed = tmp.path().join("sealed");
    let (code, out, err) = sealed_demo(&sealed, "KVH_HMAC_KEY_FILE", &key);
    assert_eq!(code, 0, "{out}{err}");
    let unsealed = tmp.path().join("unsealed");
    let demo_into = |dir: &std::path::Path| {
        let mut cmd = kvh();
        cmd.args(["demo", "--tenants", "1", "--requests", "1", "--log-dir"])
            .arg(dir)
            .env("KVH_BACKEND", "host");
        cmd
    };
    let (code, out, err) = run(&mut demo_into(&unsealed));
    assert_eq!(code, 0, "{out}{err}");
    let names = |dir: &std::path::Path| {
        let mut names: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        names
    };
    for (dir, keyed) in [(&sealed, false), (&unsealed, true)] {
        let before = names(dir);
        let mut cmd = demo_into(dir);
        if keyed {
            cmd.env("KVH_HMAC_KEY_FILE", &key);
        }
        let (code, out, err) = run(&mut cmd);
        assert_eq!(code, 2, "keyed {keyed}: {out}{err}");
        assert!(
            err.contains(" was ") && err.contains("chain p") && err.contains("--log-dir"),
            "keyed {keyed}: {err}"
        );
        assert!(out.is_empty(), "a refusal prints no report: {out}");
        assert_eq!(
            names(dir),
            before,
            "the refused run changed {}",
            dir.display()
        );
    }
    let (code, out, err) = verify_with_key(&sealed, &key);
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = run(kvh().arg("verify-log").arg(&unsealed));
    assert_eq!(code, 0, "{out}{err}");
}

/// The same secret seals and verifies, whichever way it reaches each side. A secret kept in
/// a file that ends with a newline (`openssl rand -hex 32 > hmac.key`, as deploy/README.md
/// makes it) and handed to the writer through `FORENSIC_HMAC_SECRET` (a Kubernetes
/// `secretKeyRef` of a Secret made `--from-file`, which keeps the newline) must verify with
/// that same file as `--key-file`, as the demo's hint says ("a 0600 file holding
/// FORENSIC_HMAC_SECRET's value"): the writer and the verifier read one secret.
#[test]
fn a_secret_from_the_environment_verifies_with_the_file_holding_its_value() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    let value = format!("{}\n", "5a".repeat(32));
    let key = tmp.path().join("hmac.key");
    key_file(&key, &value);
    let (code, out, err) = sealed_demo(&dir, "FORENSIC_HMAC_SECRET", &value);
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = verify_with_key(&dir, &key);
    assert_eq!(
        code, 0,
        "the log sealed with FORENSIC_HMAC_SECRET does not verify with the file holding \
         its value:\n{out}{err}"
    );
}

/// A secret longer than any `--key-file` a verifier reads (64 KiB): the writer refuses
/// `FORENSIC_HMAC_SECRET` of that length at start-up, and `kvh config` refuses the policy,
/// rather than seal a log nobody can verify. The longest accepted seals a log that verifies
/// with the file holding it (and its newline).
#[test]
fn a_secret_too_long_for_a_key_file_is_refused_and_the_longest_accepted_verifies() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    let too_long = "5a".repeat(35_000);
    let (code, out, err) = sealed_demo(&dir, "FORENSIC_HMAC_SECRET", &too_long);
    assert_eq!(code, 2, "the writer took a 70000-byte secret: {out}{err}");
    assert!(
        err.contains("FORENSIC_HMAC_SECRET") && err.contains("at most 65535"),
        "{err}"
    );
    let (code, out, err) = run(kvh()
        .args(["config"])
        .env("KVH_LOG_DIR", &dir)
        .env("FORENSIC_HMAC_SECRET", &too_long));
    assert_eq!(code, 2, "kvh config accepted it: {out}{err}");
    let longest = "a".repeat(65_535);
    let key = tmp.path().join("hmac.key");
    key_file(&key, &format!("{longest}\n"));
    let (code, out, err) = sealed_demo(&dir, "FORENSIC_HMAC_SECRET", &longest);
    assert_eq!(code, 0, "the writer refused the longest secret: {out}{err}");
    let (code, out, err) = verify_with_key(&dir, &key);
    assert_eq!(code, 0, "{out}{err}");
}

/// One bound for the HMAC secret whichever way it is given: a secret of 65536 bytes (no
/// newline) in `KVH_HMAC_KEY_FILE` is accepted by the writer, and its log verifies with that
/// file; the same bytes in `FORENSIC_HMAC_SECRET` are the same secret, which every verifier
/// can read from that same file, and are accepted alike (or both are refused).
#[test]
fn the_longest_secret_is_the_same_from_the_key_file_and_from_the_environment() {
    let tmp = tempfile::tempdir().unwrap();
    let secret = "b".repeat(65_536);
    let key = tmp.path().join("hmac.key");
    key_file(&key, &secret);
    let from_file = tmp.path().join("file-log");
    let (file_code, out, err) = sealed_demo(&from_file, "KVH_HMAC_KEY_FILE", &key);
    if file_code == 0 {
        let (code, vout, verr) = run(kvh()
            .arg("verify-log")
            .arg(&from_file)
            .arg("--key-file")
            .arg(&key));
        assert_eq!(code, 0, "{vout}{verr}");
    }
    let from_env = tmp.path().join("env-log");
    let (env_code, eout, eerr) = sealed_demo(&from_env, "FORENSIC_HMAC_SECRET", &secret);
    assert_eq!(
        file_code, env_code,
        "a 65536-byte secret: KVH_HMAC_KEY_FILE exit {file_code} ({out}{err}), \
         FORENSIC_HMAC_SECRET exit {env_code} ({eout}{eerr})"
    );
}

/// `--json` prints "the full report as JSON on stdout instead of the summary". The summary's
/// last line is the run's verdict (PASS or FAIL), which is what the run is for; the JSON report
/// carries it too, as a field that agrees with the exit status, so that a script reading the
/// report does not have to re-derive the pass rule (residue, drill, gate, lost records) from
/// the counters.
#[test]
fn the_json_report_carries_the_verdict_of_the_run() {
    let (code, out, err) = run(host_demo(1, 2).args(["--json"]));
    assert_eq!(code, 0, "{out}{err}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    let passed = report.get("passed").and_then(serde_json::Value::as_bool);
    let verdict = report.get("verdict").and_then(serde_json::Value::as_str);
    assert!(
        passed == Some(true) || verdict.is_some_and(|v| v.eq_ignore_ascii_case("pass")),
        "the run passed (exit 0, the summary says PASS), but its JSON report has no verdict \
         (no \"passed\" or \"verdict\" field); top-level keys: {:?}",
        report.as_object().map(|o| o.keys().collect::<Vec<_>>())
    );
}

/// `--log-dir DIR`'s help: "the run ends with the `kvh verify-log` command that checks it
/// (with the key files it was sealed and signed with)". With `--json` too, the run still says
/// where its log is and how to check it: in the JSON report, or on stderr.
#[test]
fn a_json_run_with_a_log_dir_still_names_the_verify_log_command() {
    let tmp = tempfile::tempdir().unwrap();
    let log = tmp.path().join("log");
    let (code, out, err) = run(host_demo(1, 1).args(["--json", "--log-dir"]).arg(&log));
    assert_eq!(code, 0, "{out}{err}");
    assert!(log.is_dir(), "no log written: {out}{err}");
    assert!(
        out.contains("kvh verify-log") || err.contains("kvh verify-log"),
        "with --json, the run does not end with the `kvh verify-log` command that checks its \
         log (--log-dir's help promises it); stderr: {err:?}"
    );
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(
        out.contains(&log.display().to_string()),
        "the JSON report does not name the log directory {}: stats.log = {}",
        log.display(),
        report["stats"]["log"]
    );
}

/// `--json` names the run's log directory (`forensic_log.dir`) and metrics snapshot
/// (`metrics_file`), as the summary does (its `shell_word` form names any path). With a log
/// directory and a metrics file whose names are not UTF-8, the JSON strings are expected to
/// name those paths, so that a script reading the report finds them.
#[test]
fn the_json_report_names_non_utf8_log_and_metrics_paths() {
    use std::os::unix::ffi::OsStrExt;
    let tmp = tempfile::tempdir().unwrap();
    let log = tmp.path().join(std::ffi::OsStr::from_bytes(b"log\xff"));
    let metrics = tmp.path().join(std::ffi::OsStr::from_bytes(b"m\xff.prom"));
    let (code, out, err) = run(host_demo(1, 1)
        .args(["--json", "--log-dir"])
        .arg(&log)
        .arg("--metrics-file")
        .arg(&metrics));
    assert_eq!(code, 0, "{out}{err}");
    assert!(log.is_dir() && metrics.is_file(), "{out}{err}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    // No lossy spelling that looks like a path: null where the path is not UTF-8, and the
    // shell word (as the text summary gives it) beside it.
    assert!(!out.contains('\u{fffd}'), "{out}");
    assert!(report["forensic_log"]["dir"].is_null(), "{report}");
    assert!(report["metrics_file"].is_null(), "{report}");
    for shell in [
        &report["forensic_log"]["dir_shell"],
        &report["metrics_file_shell"],
    ] {
        assert!(
            shell.as_str().is_some_and(|s| s.contains("printf")),
            "{report}"
        );
    }
}

/// A memory cgroup of `limit` bytes for one test (cgroup v2, or v1's memory controller),
/// removed on drop; `None`, said on stderr, where none can be made (not root, no controller).
struct MemoryCgroup(std::path::PathBuf);

impl MemoryCgroup {
    fn new(limit: u64) -> Option<MemoryCgroup> {
        static MADE: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = MADE.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let name = format!("kvh-demo-test-{}-{n}", std::process::id());
        let candidates = [
            (
                std::path::Path::new("/sys/fs/cgroup/memory").join(&name),
                "memory.limit_in_bytes",
            ),
            (
                std::path::Path::new("/sys/fs/cgroup").join(&name),
                "memory.max",
            ),
        ];
        for (dir, knob) in candidates {
            if std::fs::create_dir(&dir).is_err() {
                continue;
            }
            let group = MemoryCgroup(dir);
            if std::fs::write(group.0.join(knob), limit.to_string()).is_ok() {
                return Some(group);
            }
        }
        skip::skipped("no memory cgroup can be made here");
        None
    }

    /// Makes `cmd`'s process join the cgroup between fork and exec.
    fn enter_at_exec(&self, cmd: &mut std::process::Command) {
        use std::os::unix::ffi::OsStrExt;
        let procs =
            std::ffi::CString::new(self.0.join("cgroup.procs").as_os_str().as_bytes()).unwrap();
        // SAFETY: only async-signal-safe calls (open, write, close) between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // "0" is the writing process itself.
                let written = libc::write(fd, b"0".as_ptr().cast(), 1);
                libc::close(fd);
                if written != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// README.md's table: `kvh demo` exits 2 when host memory is exhausted. The host backend's
/// memory is committed as it is zeroed, so where memory is limited by a cgroup (a container
/// run with `--memory`, a Kubernetes pod's limit) rather than by the address space, options
/// its `--help` accepts (`--tenants 4 --decode-tokens 16384`: about 1 GiB of KV blocks, here
/// with 512 MiB allowed) must still end in that error and exit 2, not in the kernel's
/// out-of-memory kill (SIGKILL, shell status 137) with nothing said.
#[test]
fn a_demo_in_a_memory_limited_container_exits_with_an_error_not_a_kill() {
    let Some(group) = MemoryCgroup::new(512 << 20) else {
        return;
    };
    let mut cmd = host_demo(4, 1);
    cmd.args(["--decode-tokens", "16384"]);
    group.enter_at_exec(&mut cmd);
    let output = cmd.output().unwrap();
    let (out, err) = (
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        output.status.signal(),
        None,
        "the demo was killed by a signal when the container's memory ran out:\n{out}{err}"
    );
    assert_eq!(output.status.code(), Some(2), "{out}{err}");
    assert!(err.contains("out of host memory"), "{err}");
}

/// Run by the test below, in a memory cgroup of 256 MiB: 160 MiB of the process's own memory
/// are in use when the host backend is built, and given back before it allocates.
#[test]
#[ignore = "run by a_host_backend_built_while_memory_was_short_can_use_memory_given_back_later"]
fn host_backend_built_while_memory_was_short() {
    use kvhygiene::backend::host::HostBackend;
    use kvhygiene::backend::Backend;
    if std::env::var_os("KVH_TEST_BUILT_WHILE_SHORT").is_none() {
        return;
    }
    let hog = std::hint::black_box(vec![1u8; 160 << 20]);
    let b = HostBackend::within_available_memory();
    drop(hog);
    let a = b.allocate(0, 96 << 20);
    assert!(
        a.is_ok(),
        "96 MiB refused with about 240 MiB of the cgroup free: {a:?}"
    );
}

/// The library's host backend lives as long as its process (a Python test session under
/// KVH_BACKEND=host). Memory that was short when it was built and is given back later can
/// be used: what a process may commit is not fixed at its start.
#[test]
fn a_host_backend_built_while_memory_was_short_can_use_memory_given_back_later() {
    let Some(group) = MemoryCgroup::new(256 << 20) else {
        return;
    };
    let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "host_backend_built_while_memory_was_short",
        "--exact",
        "--ignored",
        "--nocapture",
    ])
    .env("KVH_TEST_BUILT_WHILE_SHORT", "1");
    group.enter_at_exec(&mut cmd);
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A long demo (`--requests` up to 100000) is stopped the way a user stops any command:
/// Ctrl-C (SIGINT). Its forensic log must then end as the log of a run that ended, with its
/// `stop` record, as a demo that fails does: not as a crashed process's, which `kvh
/// evidence` reports as "no stop record (running or crashed)".
#[test]
fn an_interrupted_demo_ends_its_forensic_log_with_a_stop_record() {
    let tmp = tempfile::tempdir().unwrap();
    let log = tmp.path().join("log");
    let mut child = host_demo(2, 100000)
        .arg("--log-dir")
        .arg(&log)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Until the run is well under way: its log holds request records.
    let started = std::time::Instant::now();
    let lines = || -> usize {
        std::fs::read_dir(&log)
            .map(|d| {
                d.filter_map(|e| std::fs::read(e.ok()?.path()).ok())
                    .map(|b| b.iter().filter(|&&c| c == b'\n').count())
                    .sum()
            })
            .unwrap_or(0)
    };
    while lines() < 20 {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(60),
            "the demo's log did not grow"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // SAFETY: kill(2) on the child's own pid.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGINT);
    }
    child.wait().unwrap();
    let records = cli_common::log_records(&log);
    let last = records.last().expect("records");
    assert_eq!(
        last["kind"],
        "stop",
        "the interrupted demo's chain ends without a stop record ({} records, the last a \
         `{}`): it reads as a crashed process's",
        records.len(),
        last["kind"]
    );
}

/// On a terminal the demo keeps a progress line (`\r  requests N/M`, no newline until the
/// run ends). Stopped part way (SIGINT), what it says next starts a line of its own rather
/// than run on from the count.
#[test]
fn an_interrupted_demo_ends_its_progress_line_before_it_says_why() {
    use std::io::Read;
    use std::os::fd::{FromRawFd, OwnedFd};
    let (mut leader, mut follower) = (-1, -1);
    // SAFETY: out-pointers to two ints; no name, termios or window size asked for.
    let rc = unsafe {
        libc::openpty(
            &mut leader,
            &mut follower,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors were just opened by openpty and are owned here alone.
    let (leader, follower) =
        unsafe { (OwnedFd::from_raw_fd(leader), OwnedFd::from_raw_fd(follower)) };
    let mut child = host_demo(2, 100000)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::from(follower))
        .spawn()
        .unwrap();
    // The terminal's output, read until the child closes it (EIO once no process holds it),
    // passed on as it comes.
    let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
    std::thread::spawn(move || {
        let mut tty = std::fs::File::from(leader);
        let mut buf = [0u8; 4096];
        while let Ok(n) = tty.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    let started = std::time::Instant::now();
    // Under way: the progress line is drawn.
    while !String::from_utf8_lossy(&seen).contains("requests ") {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(60),
            "no progress line after 60 s: {:?}",
            String::from_utf8_lossy(&seen)
        );
        if let Ok(chunk) = rx.recv_timeout(std::time::Duration::from_millis(100)) {
            seen.extend(chunk);
        }
    }
    // SAFETY: kill(2) on the child's own pid.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGINT);
    }
    let status = child.wait().unwrap();
    // The rest, until the terminal is closed (the sender is dropped then).
    while let Ok(chunk) = rx.recv_timeout(std::time::Duration::from_secs(10)) {
        seen.extend(chunk);
    }
    let text = String::from_utf8_lossy(&seen).into_owned();
    assert_eq!(status.code(), Some(130), "{text}");
    // Said at once, on a line of its own: requests under way may take a while to end.
    let notice = text
        .find("\nkvh demo: stopping once the requests under way end")
        .expect("the first signal is answered at once");
    let said = text
        .find("kvh demo: interrupted")
        .expect("the interruption is said");
    assert!(notice < said, "{text:?}");
    assert!(
        text[..said].contains("requests "),
        "no progress line was drawn: {text:?}"
    );
    let before = &text[..said];
    assert!(
        before.ends_with('\n'),
        "the interruption runs on from the progress line: {:?}",
        &text[said.saturating_sub(40)..(said + 30).min(text.len())]
    );
}

/// README and `kvh demo --help`: "every new allocation and every paged KV block taken is read
/// back". The fault drill's paged-cache step takes two blocks from the free list and claims
/// them through the eviction gate like a request does; the report's `kv_blocks_checked` is
/// expected to count every block the claims handed over (the allocator's
/// `kv_blocks_claimed`), as `allocations_checked` counts the drill's own allocations.
#[test]
fn every_paged_kv_block_the_fault_drill_claims_is_read_back() {
    let (code, out, err) = run(host_demo(1, 2).args(["--inject-fault", "--json"]));
    assert_eq!(code, 0, "{out}{err}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    let checked = report["kv_blocks_checked"].as_u64().unwrap();
    let claimed = report["stats"]["counters"]["kv_blocks_claimed"]
        .as_u64()
        .unwrap();
    assert_eq!(
        checked, claimed,
        "{claimed} paged KV blocks were handed over by claims, but the report says {checked} \
         were read back"
    );
}

/// The summary's "bytes scrubbed" row reads "X MiB in N scrubs, M batches": the batches
/// that carried those N freed-block scrubs. Each batch holds at least one scrub, so with
/// `KVH_BATCH_SIZE=1` (one block a batch) M is expected to be at most N.
#[test]
fn the_bytes_scrubbed_row_counts_no_more_batches_than_scrubs() {
    let (code, out, err) = run(host_demo(1, 4).env("KVH_BATCH_SIZE", "1"));
    assert_eq!(code, 0, "{out}{err}");
    let row = out
        .lines()
        .find(|l| l.trim_start().starts_with("bytes scrubbed"))
        .expect("a bytes scrubbed row");
    let number_before = |word: &str| -> u64 {
        let words: Vec<&str> = row.split_whitespace().collect();
        let at = words
            .iter()
            .position(|w| w.trim_end_matches(',') == word)
            .unwrap();
        words[at - 1].trim_end_matches(',').parse().unwrap()
    };
    let (scrubs, batches) = (number_before("scrubs"), number_before("batches"));
    assert!(
        batches <= scrubs,
        "{batches} batches for {scrubs} scrubs (one block a batch): {row}"
    );
}

/// `preemption_simulated` is documented as "whether requests were preempted without a scrub".
/// With three requests a tenant, none is preempted (one in four is), as the summary's
/// eviction-gate row says ("0 blocks released unscrubbed by preempted requests"): the JSON
/// field is expected to agree.
#[test]
fn the_json_report_says_no_request_was_preempted_when_none_was() {
    let (code, out, err) = run(host_demo(1, 3).args(["--json"]));
    assert_eq!(code, 0, "{out}{err}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["kv_blocks_released_unscrubbed"], 0, "{out}");
    assert_eq!(
        report["preemption_simulated"], false,
        "no request was preempted, yet the JSON report says preemption was simulated"
    );
}

/// A usage error (here `--checkpoint-dir` without a signing key) exits 2, as the README's
/// table says, also when stderr cannot be written (a full disk): the message is lost, the
/// status is not, and nothing panics (status 101).
#[test]
fn a_usage_error_exits_2_when_stderr_cannot_be_written() {
    let tmp = tempfile::tempdir().unwrap();
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let (code, _, _) = run(host_demo(1, 1)
        .arg("--log-dir")
        .arg(tmp.path().join("log"))
        .arg("--checkpoint-dir")
        .arg(tmp.path().join("ckpt"))
        .stderr(full));
    assert_eq!(code, 2, "a usage error with stderr on a full device");
}

/// Under `KVH_COVERAGE_THRESHOLD=0.5` the drill's sabotaged block passes coverage and is
/// quarantined for residue: the run shows no failed verification and one residue. One more
/// verification failure elsewhere (a block whose result slot was never written reads no
/// residue, and fails) is a failure the drill did not cause, and is expected to fail the run.
#[test]
fn a_verification_failure_beside_a_drill_quarantined_for_residue_fails_the_run() {
    let backend: std::sync::Arc<dyn Backend> = HostBackend::new();
    let config = Config {
        coverage_threshold: 0.5,
        ..Config::default()
    };
    let opts = DemoOptions {
        tenants: 1,
        requests_per_tenant: 2,
        decode_tokens: 32,
        inject_fault: true,
        ..DemoOptions::default()
    };
    let report = demo::run(
        backend,
        config,
        None,
        &opts,
        &|_, _| {},
        &std::sync::atomic::AtomicBool::new(false),
    )
    .expect("demo runs");
    assert!(report.passed(), "{}", demo::render(&report));
    let c = &report.stats.counters;
    assert_eq!(
        (c.verifications_failed, c.residue_detected),
        (0, 1),
        "the drill's block is quarantined for residue, its verification passing"
    );
    let mut other = report.clone();
    other.stats.counters.verifications_failed += 1;
    assert!(
        !other.passed(),
        "a verification failure besides the drill's residue passed the run:\n{}",
        demo::render(&other)
    );
}

/// The text after "check it with: " on the demo's output line that starts with `prefix`.
fn printed_check(out: &str, prefix: &str) -> String {
    out.lines()
        .filter(|l| l.starts_with(prefix))
        .find_map(|l| l.split_once("check it with: ").map(|(_, c)| c.to_string()))
        .unwrap_or_else(|| panic!("no '{prefix}... check it with:' line in:\n{out}"))
}

/// Runs `command`, a `kvh ...` command line as the demo prints it, through `sh` in `dir`
/// with `kvh` the built binary: (exit status, stdout, stderr).
fn run_as_printed(dir: &std::path::Path, command: &str) -> (i32, String, String) {
    let args = command
        .strip_prefix("kvh ")
        .unwrap_or_else(|| panic!("not a kvh command: {command}"));
    let mut sh = std::process::Command::new("sh");
    for (k, _) in std::env::vars() {
        if k.starts_with("KVH_") {
            sh.env_remove(k);
        }
    }
    run(sh
        .current_dir(dir)
        .env("BIN", env!("CARGO_BIN_EXE_kvh"))
        .arg("-c")
        .arg(format!("exec \"$BIN\" {args}")))
}

/// `kvh demo --log-dir DIR` ends with the `kvh verify-log` command that checks the log it
/// wrote. Followed as printed, in the directory the demo ran in, that command is expected to
/// verify the run's log (exit 0) for any DIR the demo accepted, a relative one whose name
/// begins with `-` (given as `--log-dir=-log`) included.
#[test]
fn the_printed_verify_log_command_checks_a_log_dir_whose_name_begins_with_a_dash() {
    let tmp = tempfile::tempdir().unwrap();
    let (code, out, err) = run(host_demo(1, 1)
        .current_dir(tmp.path())
        .arg("--log-dir=-log"));
    assert_eq!(code, 0, "{out}{err}");
    assert!(tmp.path().join("-log").is_dir(), "{out}{err}");
    let hint = printed_check(&out, "forensic log:");
    let (vcode, vout, verr) = run_as_printed(tmp.path(), &hint);
    assert_eq!(
        vcode, 0,
        "the demo's log is in ./-log, but the check it prints (`{hint}`) does not verify it:\n\
         {vout}{verr}"
    );
    assert!(vout.contains("OK"), "`{hint}`:\n{vout}{verr}");
}

/// The same for the HMAC key file the printed `kvh verify-log` command names: a relative
/// KVH_HMAC_KEY_FILE whose name begins with `-` is expected to be given so that the command,
/// run as printed, reads it as the key file and verifies the run's MACs.
#[test]
fn the_printed_verify_log_command_reads_a_key_file_whose_name_begins_with_a_dash() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let key = tmp.path().join("-hmac.key");
    std::fs::write(
        &key,
        "6b76682d646f63732d77616c6b7468726f7567682d686d61632d6b65792d3031\n",
    )
    .unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (code, out, err) = run(host_demo(1, 1)
        .current_dir(tmp.path())
        .env("KVH_HMAC_KEY_FILE", "-hmac.key")
        .args(["--log-dir", "log"]));
    assert_eq!(code, 0, "{out}{err}");
    let hint = printed_check(&out, "forensic log:");
    let (vcode, vout, verr) = run_as_printed(tmp.path(), &hint);
    assert_eq!(
        vcode, 0,
        "the check the demo prints (`{hint}`) does not run:\n{vout}{verr}"
    );
    assert!(vout.contains("MACs verified"), "`{hint}`:\n{vout}{verr}");
}

/// `--metrics-file FILE` ends the summary with the `kvh metrics` and `kvh gate` commands that
/// read the snapshot left. Run as printed, each is expected to read the run's snapshot (a
/// clean run's: exit 0, admitted), a relative FILE whose name begins with `-` (given as
/// `--metrics-file=-kvh.prom`) included.
#[test]
fn the_printed_metrics_commands_read_a_file_whose_name_begins_with_a_dash() {
    let tmp = tempfile::tempdir().unwrap();
    let (code, out, err) = run(host_demo(1, 1)
        .current_dir(tmp.path())
        .arg("--metrics-file=-kvh.prom"));
    assert_eq!(code, 0, "{out}{err}");
    assert!(tmp.path().join("-kvh.prom").is_file(), "{out}{err}");
    let hints = printed_check(&out, "metrics:");
    for command in hints.split(", or ") {
        let (mcode, mout, merr) = run_as_printed(tmp.path(), command);
        assert_eq!(
            mcode, 0,
            "the run's snapshot is ./-kvh.prom, but `{command}`, as the demo prints it, does \
             not read it:\n{mout}{merr}"
        );
    }
}

/// A `--metrics-file` that ends with `/` names a directory, in which no snapshot can be
/// written: like one in a directory that does not exist, it would fail the run at its end
/// (exit 2, after the whole run). It is expected to be refused before the run (exit 2,
/// nothing on stdout).
#[test]
fn a_metrics_file_ending_with_a_slash_is_refused_before_the_run() {
    let tmp = tempfile::tempdir().unwrap();
    let mut file = tmp.path().join("missing").into_os_string();
    file.push("/");
    let (code, out, err) = run(host_demo(1, 1).arg("--metrics-file").arg(&file));
    assert_eq!(code, 2, "{out}{err}");
    assert!(
        out.is_empty(),
        "the run started and ran whole before its snapshot could not be written:\n{out}{err}"
    );
}

/// The `kvh verify-log` command the demo prints pins `PREFIX.pub` beside the signing key
/// only when it is that key's public half, and then passes as printed; a `.pub` of another
/// key there is not pinned (every checkpoint would fail against it): the command names the
/// public key it needs instead.
#[test]
fn the_printed_verify_command_pins_the_public_key_only_when_it_matches_the_signing_key() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    for prefix in ["a", "b"] {
        let (code, _, err) = run(kvh().args(["keygen", "--out"]).arg(root.join(prefix)));
        assert_eq!(code, 0, "{err}");
    }
    let demo = |log: &str| {
        let (code, out, err) = run(one_request_demo(root)
            .args(["--log-dir", log])
            .env("KVH_SIGNING_KEY_FILE", "a.key"));
        assert_eq!(code, 0, "{out}{err}");
        let hint = out
            .lines()
            .find_map(|l| l.split_once("check it with: ").map(|(_, h)| h.to_string()))
            .unwrap_or_else(|| panic!("no verify command: {out}"));
        hint
    };
    let hint = demo("matching");
    assert_eq!(hint, "kvh verify-log matching --public-key a.pub");
    let args: Vec<&str> = hint.split(' ').skip(1).collect();
    let (code, out, err) = run(kvh().current_dir(root).args(&args));
    assert_eq!(code, 0, "the printed command failed: {out}{err}");

    // A second run into the same directory: the command names this run's keys, and the line
    // after it says the other chain there may need its own.
    let (code, out, err) = run(one_request_demo(root)
        .args(["--log-dir", "matching"])
        .env("KVH_SIGNING_KEY_FILE", "a.key"));
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains(
            "check it with: kvh verify-log matching --public-key a.pub\n  the directory holds 1 \
             other chain: any sealed or signed with other keys"
        ),
        "{out}"
    );

    std::fs::copy(root.join("b.pub"), root.join("a.pub")).unwrap();
    let hint = demo("other");
    assert!(
        !hint.contains("--public-key a.pub") && hint.contains("--public-key PUBLIC"),
        "{hint}"
    );
}

/// `kvh keygen`'s key pair `a.key` / `a.pub` in a new directory `root`.
fn keygen_in(root: &std::path::Path) {
    let (code, _, err) = run(kvh().args(["keygen", "--out"]).arg(root.join("a")));
    assert_eq!(code, 0, "{err}");
}

/// A one-request demo on the host backend logging into `root/log`, signing with `a.key`, and
/// `kvh preflight --skip-backend`, both in `root` with `var=value` (the HMAC key):
/// (the demo's exit status and stderr, preflight's exit status and stdout).
fn demo_and_preflight_signing_with_a_key(
    root: &std::path::Path,
    var: &str,
    value: &str,
) -> ((i32, String), (i32, String)) {
    let env = |c: &mut std::process::Command| {
        c.current_dir(root)
            .env_remove("FORENSIC_HMAC_SECRET")
            .env("KVH_BACKEND", "host")
            .env("KVH_LOG_DIR", root.join("log"))
            .env("KVH_SIGNING_KEY_FILE", "a.key")
            .env(var, value);
    };
    let mut demo = kvh();
    demo.args(["demo", "--tenants", "1", "--requests", "1"]);
    env(&mut demo);
    let (demo_code, out, err) = run(&mut demo);
    let mut preflight = kvh();
    preflight.args(["preflight", "--skip-backend"]);
    env(&mut preflight);
    let (preflight_code, report, _) = run(&mut preflight);
    ((demo_code, format!("{out}{err}")), (preflight_code, report))
}

/// `kvh keygen`'s signing key (`b.key`, a copy of `a.key`, its public half `b.pub` beside it)
/// named as the HMAC key: the writer refuses it, as every verifier refuses it for `--key-file`
/// (a log sealed with it could be checked by none of them), naming the file; `kvh preflight`
/// fails it first. Named by the signing key's own path, the policy is invalid: refused before
/// any file is read, naming both keys (`kvh config` and `preflight` exit 2).
#[test]
fn the_signing_key_named_as_the_hmac_key_is_refused_by_the_writer_and_preflight() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    keygen_in(root);
    let ((code, err), (preflight, report)) =
        demo_and_preflight_signing_with_a_key(root, "KVH_HMAC_KEY_FILE", "./a.key");
    assert_eq!((code, preflight), (2, 2), "{err}{report}");
    assert!(
        err.contains("hmac_key_file (KVH_HMAC_KEY_FILE) and signing_key_file"),
        "{err}"
    );
    for ext in ["key", "pub"] {
        std::fs::copy(root.join(format!("a.{ext}")), root.join(format!("b.{ext}"))).unwrap();
    }
    let ((code, err), (preflight, report)) =
        demo_and_preflight_signing_with_a_key(root, "KVH_HMAC_KEY_FILE", "b.key");
    assert_eq!(code, 2, "the writer sealed with the signing key: {err}");
    assert!(
        err.contains("b.key: kvh keygen's signing key"),
        "the refusal does not name the file: {err}"
    );
    // What goes where, in the environment's words (not the verifiers' flags).
    assert!(
        err.contains("KVH_HMAC_KEY_FILE takes an HMAC secret of its own")
            && err.contains("the signing key goes in KVH_SIGNING_KEY_FILE")
            && !err.contains("--key-file"),
        "{err}"
    );
    assert_eq!(preflight, 1, "{report}");
    assert!(report.contains("kvh keygen's signing key"), "{report}");
}

/// The signing key's seed as the HMAC secret, with no public half beside it to tell the key
/// file apart: a copy of the key file named as the HMAC key, or `FORENSIC_HMAC_SECRET`
/// holding the seed's hex, each also in upper case.
/// The writer refuses it (whoever checks the MACs could sign checkpoints), starting no chain,
/// and so does `kvh preflight`.
#[test]
fn one_key_as_both_the_hmac_secret_and_the_signing_key_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    keygen_in(root);
    std::fs::remove_file(root.join("a.pub")).unwrap();
    let seed = std::fs::read_to_string(root.join("a.key")).unwrap();
    std::fs::copy(root.join("a.key"), root.join("copy.key")).unwrap();
    // The same key in upper case: `tr a-f A-F` leaves it the signing key.
    let upper = seed.to_ascii_uppercase();
    std::fs::write(root.join("upper.key"), &upper).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        let private = std::fs::Permissions::from_mode(0o600);
        std::fs::set_permissions(root.join("upper.key"), private).unwrap();
    }
    for (var, value) in [
        ("KVH_HMAC_KEY_FILE", "copy.key"),
        ("FORENSIC_HMAC_SECRET", &seed),
        ("KVH_HMAC_KEY_FILE", "upper.key"),
        ("FORENSIC_HMAC_SECRET", &upper),
    ] {
        assert_secret_refused(root, var, value, "the HMAC secret is the signing key");
    }
}

/// `demo` and `kvh preflight` with `var=value` as the HMAC secret of a signing run: the writer
/// refuses it (exit 2, saying `said`) and starts no chain, and preflight fails it (exit 1)
/// saying the same.
fn assert_secret_refused(root: &std::path::Path, var: &str, value: &str, said: &str) {
    let ((code, err), (preflight, report)) =
        demo_and_preflight_signing_with_a_key(root, var, value);
    assert_eq!(code, 2, "{var}: the writer sealed with it: {err}");
    assert!(err.contains(said), "{var}: {err}");
    let chain_files = std::fs::read_dir(root.join("log")).map_or(0, |d| {
        d.filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".jsonl"))
        })
        .count()
    });
    assert_eq!(chain_files, 0, "{var}: a chain was started");
    assert_eq!(preflight, 1, "{var}: {report}");
    assert!(report.contains(said), "{var}: {report}");
}

/// The signing key's public half (its `.pub` copied under another name, or its hex in
/// `FORENSIC_HMAC_SECRET`) as the HMAC secret: every verifier of checkpoints is given it and
/// could forge the MACs. The writer refuses it, starting no chain, and so does `kvh preflight`.
#[test]
fn the_signing_keys_public_half_as_the_hmac_secret_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    keygen_in(root);
    let public = std::fs::read_to_string(root.join("a.pub")).unwrap();
    std::fs::write(root.join("pubcopy.key"), &public).unwrap();
    std::fs::set_permissions(
        root.join("pubcopy.key"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    for (var, value) in [
        ("KVH_HMAC_KEY_FILE", "pubcopy.key"),
        ("FORENSIC_HMAC_SECRET", public.trim_end()),
    ] {
        assert_secret_refused(root, var, value, "signing key's public half");
    }
}

/// What the demo's metrics line says of its snapshot holds for the commands it prints: on a
/// snapshot dated an hour back, `kvh gate` (whose `--max-age` is 60 s unless given, as the
/// line says) evicts, exit 1, and `kvh metrics`, which checks the age only with `--max-age`,
/// passes it.
#[test]
fn the_metrics_hint_staleness_holds_for_every_command_it_prints() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (code, out, err) = run(one_request_demo(root).args(["--metrics-file", "m.prom"]));
    assert_eq!(code, 0, "{out}{err}");
    let line = out
        .lines()
        .find(|l| l.starts_with("metrics: "))
        .unwrap_or_else(|| panic!("no metrics line: {out}"));
    let file = root.join("m.prom");
    let text = std::fs::read_to_string(&file).unwrap();
    let hour_ago = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        - 3600;
    let aged: String = text
        .lines()
        .map(|l| {
            if l.starts_with("kvh_snapshot_timestamp_seconds ") {
                format!("kvh_snapshot_timestamp_seconds {hour_ago}.000\n")
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    assert_ne!(aged, text);
    std::fs::write(&file, aged).unwrap();
    assert!(
        line.contains("kvh gate, whose --max-age is 60 s unless given, reads it stale"),
        "{line}"
    );
    let (_, commands) = line.split_once("check it with: ").unwrap();
    for command in commands.split(", or ") {
        let args: Vec<&str> = command.split(' ').skip(1).collect();
        let (code, out, err) = run(kvh().current_dir(root).args(&args));
        let stale = if command.starts_with("kvh gate") {
            1
        } else {
            0
        };
        assert_eq!(
            code, stale,
            "{command} on an hour-old snapshot ({line}):\n{out}{err}"
        );
    }
}

/// `kvh demo` of one tenant's one request on the host backend, run in `root`.
fn one_request_demo(root: &std::path::Path) -> std::process::Command {
    let mut c = kvh();
    c.current_dir(root)
        .args(["demo", "--tenants", "1", "--requests", "1"])
        .env("KVH_BACKEND", "host");
    c
}

/// `--json`'s `forensic_log.verify_command` names the command that checks the run's log. Two
/// runs into one log directory, sealed with the same HMAC key file: the command the second
/// run reports names every key the directory's chains need, and is expected to run as given
/// in a POSIX shell (exit 0), as the first run's does.
#[test]
fn the_json_verify_command_runs_in_a_shell_when_the_directory_holds_another_chain() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    key_file(&root.join("hmac.key"), "0123456789abcdef0123456789abcdef");
    let demo = || {
        let (code, out, err) = run(one_request_demo(root)
            .args(["--json", "--log-dir", "log"])
            .env("KVH_HMAC_KEY_FILE", "hmac.key"));
        assert_eq!(code, 0, "{out}{err}");
        let report: serde_json::Value = serde_json::from_str(&out).unwrap();
        let command = report["forensic_log"]["verify_command"]
            .as_str()
            .unwrap_or_else(|| panic!("no verify_command: {report}"))
            .to_string();
        (command, report["forensic_log"]["other_chains"].clone())
    };
    let in_shell = |command: &str| {
        let rest = command
            .strip_prefix("kvh ")
            .unwrap_or_else(|| panic!("not a kvh command: {command}"));
        run(std::process::Command::new("sh")
            .current_dir(root)
            .arg("-c")
            .arg(format!("exec \"$0\" {rest}"))
            .arg(env!("CARGO_BIN_EXE_kvh")))
    };
    let (first, others) = demo();
    assert_eq!(others, 0);
    let (code, out, err) = in_shell(&first);
    assert_eq!(code, 0, "{first}: {out}{err}");
    // The other chain is counted beside the command, not written into it.
    let (second, others) = demo();
    assert_eq!(others, 1);
    let (code, out, err) = in_shell(&second);
    assert_eq!(
        code, 0,
        "verify_command of a second run into the directory: {second}\n{out}{err}"
    );
}

/// A process that may start few threads (a container's pids limit, `ulimit -u`): the demo
/// says why it cannot run and exits 2, as README.md's table says of a start-up error, not
/// with a panic (101) when a tenant's thread cannot start. The limit binds an unprivileged
/// uid only, hence `setpriv` from root; which thread fails first (a tenant's or the
/// library's) depends on what else runs, and either must end so.
#[test]
fn a_demo_that_may_not_start_its_threads_exits_2_without_a_panic() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        skip::skipped("needs root to run kvh as another uid");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let exe = cli_common::kvh_copy_in(tmp.path());
    let mut cmd = std::process::Command::new("setpriv");
    cmd.args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
        .arg(&exe)
        .args([
            "demo",
            "--backend",
            "host",
            "--tenants",
            "64",
            "--requests",
            "1",
        ])
        .env_clear();
    // SAFETY: only async-signal-safe calls (setrlimit) between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: 6,
                rlim_max: 6,
            };
            if libc::setrlimit(libc::RLIMIT_NPROC, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd.output().unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    if stderr.contains("Permission denied") || out.status.code() == Some(0) {
        skip::skipped(&format!(
            "uid 65534 cannot run the built kvh here, or its threads are not limited: {stderr}"
        ));
        return;
    }
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(out.status.code(), Some(2), "{stdout}{stderr}");
    assert!(
        stderr.contains("thread"),
        "the error does not say a thread could not start: {stderr}"
    );
}

/// `--metrics-file` in a directory this uid cannot write: refused before the run (2, naming
/// the option and why), not after a whole run whose report then says the snapshot was lost.
/// Shown for an unprivileged uid (65534) through `setpriv`, from root (root may write any
/// directory).
#[test]
fn a_metrics_file_in_a_directory_this_uid_cannot_write_is_refused_before_the_run() {
    use std::os::unix::fs::PermissionsExt;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        skip::skipped("needs root to run kvh as another uid");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let file = tmp.path().join("kvh.prom");
    let exe = cli_common::kvh_copy_in(tmp.path());
    let out = std::process::Command::new("setpriv")
        .args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
        .arg(&exe)
        .args([
            "demo",
            "--backend",
            "host",
            "--tenants",
            "1",
            "--requests",
            "1",
        ])
        .arg("--metrics-file")
        .arg(&file)
        .env_clear()
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    if stderr.contains("Permission denied") && !stderr.contains("--metrics-file") {
        skip::skipped(&format!(
            "the built kvh cannot be run by uid 65534 here: {stderr}"
        ));
        return;
    }
    assert_eq!(out.status.code(), Some(2), "{stdout}{stderr}");
    assert!(
        stderr.contains("--metrics-file") && stderr.contains("not writable"),
        "{stderr}"
    );
    assert!(stdout.is_empty(), "the run went ahead: {stdout}");
}

/// Under a policy that returns every freed block to the device (`KVH_MAX_REUSE=1`), no
/// block goes back to the pool, and no free→clean latency is measured: the report says so,
/// rather than print latencies of 0 µs that read as measured.
#[test]
fn a_run_that_measured_no_scrub_latency_says_so() {
    let (code, out, err) = cli_common::run(host_demo(2, 3).env("KVH_MAX_REUSE", "1"));
    assert_eq!(code, 0, "{out}\n{err}");
    let line = out
        .lines()
        .find(|l| l.contains("scrub latency"))
        .unwrap_or_else(|| panic!("no latency line: {out}"));
    assert!(line.contains("none measured"), "{line}");
    let (code, out, err) = cli_common::run(&mut host_demo(2, 3));
    assert_eq!(code, 0, "{out}\n{err}");
    let line = out.lines().find(|l| l.contains("scrub latency")).unwrap();
    assert!(line.contains("p50 ") && !line.contains("none"), "{line}");
}

//! `kvh demo`, run as the built binary: its verdict and exit status account for everything the
//! run was asked to show, the forensic log it was asked to write included.

#[path = "cli_common/mod.rs"]
mod cli_common;

use std::os::unix::process::CommandExt;

use cli_common::{kvh, run};

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
    let metrics = tmp.path().join("missing-dir").join("kvh.prom");
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
    let metrics = tmp.path().join("missing-dir").join("kvh.prom");
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

/// Lets the demo's files hold the start record and a few more, not the whole run (the disk
/// fills up): a write beyond 3000 bytes fails with EFBIG instead of killing the process.
fn limit_file_size(cmd: &mut std::process::Command) {
    // SAFETY: only async-signal-safe calls (signal, setrlimit) between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            let limit = libc::rlimit {
                rlim_cur: 3000,
                rlim_max: 3000,
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

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
    // SAFETY: only async-signal-safe calls (signal, setrlimit) between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            // Room for the start record and a few more, not for the whole run.
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

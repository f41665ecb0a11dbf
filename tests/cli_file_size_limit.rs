//! The forensic log under a file size limit (`RLIMIT_FSIZE`, `ulimit -f`) below its
//! `KVH_LOG_MAX_BYTES`: a write past the limit kills the process (`SIGXFSZ`, shell status
//! 153), and a process that died so left a torn tail its next start-up died on in turn. The
//! writer rotates its files within the limit instead.

mod cli_common;
mod forensic_common;

use std::os::unix::process::CommandExt;

use cli_common::{host_demo, kvh, run};
use forensic_common::{cfg, secret_key_file, write_log};

const LIMIT: u64 = 32 << 10;

/// Runs `cmd` under a file size limit of `limit` bytes (`RLIMIT_FSIZE`, `ulimit -f`).
fn limit_file_size(cmd: &mut std::process::Command, limit: u64) {
    // SAFETY: the closure runs in the forked child before exec and makes one
    // async-signal-safe call (setrlimit) on a value it owns.
    unsafe {
        cmd.pre_exec(move || {
            let r = libc::rlimit {
                rlim_cur: limit,
                rlim_max: limit,
            };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &r) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[test]
fn a_file_size_limit_below_the_log_size_rotates_the_files_within_it() {
    let tmp = tempfile::tempdir().unwrap();
    let log = tmp.path().join("log");
    let mut demo = host_demo(4, 24);
    demo.arg("--log-dir")
        .arg(&log)
        .env("KVH_LOG_MAX_BYTES", "1048576");
    limit_file_size(&mut demo, LIMIT);
    let (code, out, err) = run(&mut demo);
    assert_eq!(
        code, 0,
        "the demo under a {LIMIT}-byte file size limit: {out}\n{err}"
    );
    let files: Vec<u64> = std::fs::read_dir(&log)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".jsonl"))
        .map(|e| e.metadata().unwrap().len())
        .collect();
    assert!(files.len() > 1, "the log was not rotated: {files:?}");
    // Each file keeps the room for a `lost` and a `stop` record (4 KiB) within the limit.
    assert!(files.iter().all(|&n| n <= LIMIT - 4096), "{files:?}");
    let (code, out, err) = run(kvh().arg("verify-log").arg(&log));
    assert_eq!(code, 0, "{out}\n{err}");
}

/// `kvh tail-log` writing to a file that reaches the file size limit: the write fails, and
/// the tail says so and exits 2, its position saved, as for a full disk. (Killed by
/// `SIGXFSZ` at the limit, it ended with nothing said and no state saved, and each restart
/// died the same way on its first write.)
#[test]
fn a_tail_whose_output_reaches_the_file_size_limit_says_so_and_exits_2() {
    let tmp = tempfile::tempdir().unwrap();
    let log = tmp.path().join("log");
    write_log(&cfg(&log, 1 << 20), 200, true);
    let key = secret_key_file(tmp.path());
    let out = tmp.path().join("out.jsonl");
    let state = tmp.path().join("state.json");
    let mut tail = kvh();
    tail.arg("tail-log")
        .arg(&log)
        .arg("--key-file")
        .arg(&key)
        .args(["--once", "--from-start", "--state"])
        .arg(&state)
        .stdout(std::fs::File::create(&out).unwrap());
    const OUTPUT_LIMIT: u64 = 8 << 10;
    limit_file_size(&mut tail, OUTPUT_LIMIT);
    let (code, _, err) = run(&mut tail);
    let written = std::fs::metadata(&out).unwrap().len();
    assert!(
        written == OUTPUT_LIMIT,
        "the records did not reach the limit ({written} bytes written): {err}"
    );
    assert_eq!(code, 2, "killed by a signal (-1) or another status: {err}");
    assert!(err.contains("cannot write"), "{err}");
    assert!(state.exists(), "the position was not saved: {err}");
}

//! `kvh tail-log`: what a pass wrote to stdout is remembered, also when the pass ends early,
//! so that a restarted tail passes no record on twice and misses none.

mod forensic_common;

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output};

use forensic_common::{cfg, chain_files, read_lines, write_log};

fn kvh() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kvh"));
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("KVH_")) {
        cmd.env_remove(k);
    }
    cmd
}

fn stdout_lines(out: &Output) -> Vec<String> {
    String::from_utf8(out.stdout.clone())
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

/// `kvh tail-log DIR --once --state STATE ARGS...` whose stdout is `out`, a file it may not
/// grow beyond `limit` bytes (`RLIMIT_FSIZE`, `SIGXFSZ` ignored): each write past the limit
/// fails with `EFBIG`, as a write to a full disk fails with `ENOSPC`.
fn tail_into_limited_file(
    dir: &Path,
    state: &Path,
    out: std::fs::File,
    limit: u64,
    args: &[&str],
) -> Output {
    let mut cmd = kvh();
    cmd.arg("tail-log")
        .arg(dir)
        .args(["--once", "--state", state.to_str().unwrap()])
        .args(args)
        .stdout(out);
    // SAFETY: only async-signal-safe calls (signal, setrlimit) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
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
    cmd.output().unwrap()
}

/// A pass whose output stops part way (stdout on a full disk, a log pipeline that went
/// away) has already written the records before the failure. The records it wrote are
/// remembered in `--state` (as a pass that stops on tampering remembers them), so the next
/// run passes on the records after them, not those again.
#[test]
fn records_written_before_an_output_error_are_not_passed_on_again() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    let state = tmp.path().join("tail.json");
    let st = state.to_str().unwrap();
    // A first chain; the first run places the tail at its head.
    write_log(&cfg(&dir, 1 << 20), 2, false);
    let first = kvh()
        .arg("tail-log")
        .arg(&dir)
        .args(["--once", "--state", st])
        .output()
        .unwrap();
    assert_eq!(first.status.code(), Some(0));
    assert!(first.stdout.is_empty());
    let before: Vec<String> = chain_files(&dir)
        .iter()
        .flat_map(|f| read_lines(f))
        .collect();
    // A second process: a new chain of 12 records, to be passed on whole.
    write_log(&cfg(&dir, 1 << 20), 10, false);
    let new: Vec<String> = chain_files(&dir)
        .iter()
        .flat_map(|f| read_lines(f))
        .filter(|l| !before.contains(l))
        .collect();
    assert_eq!(new.len(), 12);
    // The output takes exactly its first five records, then fails.
    let limit: u64 = new[..5].iter().map(|l| l.len() as u64 + 1).sum();
    let out = tmp.path().join("out.jsonl");
    let run = tail_into_limited_file(
        &dir,
        &state,
        std::fs::File::create(&out).unwrap(),
        limit,
        &[],
    );
    assert_ne!(run.status.code(), Some(0), "the output failed");
    let delivered: Vec<String> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(delivered, new[..5].to_vec(), "the five records that fit");
    // The next run (the output fixed).
    let next = kvh()
        .arg("tail-log")
        .arg(&dir)
        .args(["--once", "--state", st])
        .output()
        .unwrap();
    assert_eq!(next.status.code(), Some(0));
    let again = stdout_lines(&next);
    let twice: Vec<&String> = again.iter().filter(|l| delivered.contains(l)).collect();
    assert!(
        twice.is_empty(),
        "{} records already written to stdout were passed on again",
        twice.len()
    );
    assert_eq!(again, new[5..].to_vec(), "the records after those written");
}

/// The output is a file the tail appends to (as its help suggests a collector reads). A run
/// whose write is cut part way through a record exits 2 and passes that record on again,
/// whole, at the next run: the next run must not glue its first line to the fragment, which
/// would leave neither line valid JSON (a record, or a tampering alert, lost to the
/// collector).
#[test]
fn a_record_cut_short_in_the_output_does_not_swallow_the_next_runs_first_line() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    write_log(&cfg(&dir, 1 << 20), 40, false);
    let state = tmp.path().join("tail.json");
    let out_path = tmp.path().join("out.jsonl");
    let appended = || {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&out_path)
            .unwrap()
    };
    let first = tail_into_limited_file(&dir, &state, appended(), 3000, &["--from-start"]);
    assert_eq!(
        first.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let after_first = std::fs::read(&out_path).unwrap();
    assert!(
        after_first.last() != Some(&b'\n'),
        "the limit did not cut a record part way ({} bytes): the test proves nothing",
        after_first.len()
    );
    let second = kvh()
        .arg("tail-log")
        .arg(&dir)
        .args(["--once", "--state", state.to_str().unwrap()])
        .stdout(appended())
        .output()
        .unwrap();
    assert_eq!(
        second.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    let text = std::fs::read_to_string(&out_path).unwrap();
    let whole: Vec<&str> = text
        .lines()
        .filter(|l| serde_json::from_str::<serde_json::Value>(l).is_ok())
        .collect();
    for record in chain_files(&dir).iter().flat_map(|f| read_lines(f)) {
        assert!(
            whole.contains(&record.as_str()),
            "a record never reached the output as a line of its own: {record}\n--- output:\n{text}"
        );
    }
}

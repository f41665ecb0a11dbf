//! `kvh evidence` and files that disappear while the report is made. Only `prune-log` may
//! move a chain's files, and it writes a manifest that accounts for them; a file deleted by
//! anything else while the report is read is tampering the report must not hide.

mod forensic_common;

use std::ffi::{CStr, CString};
use std::path::{Path, PathBuf};

use forensic_common::{cfg, chain_files, secret_key_file, write_log};
use kvhygiene::forensic::cli::VerifyLogArgs;
use kvhygiene::forensic::evidence::{collect_with, EvidenceArgs};

/// Watches `dir` and, at the `nth` opening of `trigger` (a file name in `dir`), deletes
/// `victim` at once. Returns the watcher thread; it ends after the deletion or when `dir`
/// goes quiet for a second.
fn delete_at_nth_open(
    dir: &Path,
    trigger: String,
    nth: usize,
    victim: PathBuf,
) -> std::thread::JoinHandle<bool> {
    // SAFETY: plain syscalls on a descriptor this function owns.
    let fd = unsafe { libc::inotify_init1(0) };
    assert!(fd >= 0);
    let c = CString::new(dir.to_str().unwrap()).unwrap();
    // SAFETY: `c` is NUL-terminated and outlives the call.
    let wd = unsafe { libc::inotify_add_watch(fd, c.as_ptr(), libc::IN_OPEN) };
    assert!(wd >= 0);
    std::thread::spawn(move || {
        let mut seen = 0;
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let mut pfd = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            if unsafe { libc::poll(&mut pfd, 1, 1000) } <= 0 {
                // SAFETY: `fd` is ours.
                unsafe { libc::close(fd) };
                return false;
            }
            // SAFETY: `buf` is writable for its length.
            let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
            let mut off = 0usize;
            while (off as isize) < n {
                // SAFETY: the kernel wrote whole events into `buf`.
                let e = unsafe { &*(buf.as_ptr().add(off) as *const libc::inotify_event) };
                let head = std::mem::size_of::<libc::inotify_event>();
                if e.len > 0 {
                    // SAFETY: the name follows the event, NUL-padded.
                    let name = unsafe { CStr::from_ptr(buf.as_ptr().add(off + head).cast()) };
                    if name.to_str() == Ok(trigger.as_str()) {
                        seen += 1;
                        if seen == nth {
                            std::fs::remove_file(&victim).unwrap();
                            // SAFETY: `fd` is ours.
                            unsafe { libc::close(fd) };
                            return true;
                        }
                    }
                }
                off += head + e.len as usize;
            }
        }
    })
}

/// The newest file of a chain is deleted (by something other than `prune-log`: no manifest,
/// no archive) after the report's first verification listed it and before the report read
/// it. The report must not come out verified as if nothing happened: before it was made
/// again, this was an error naming the missing file; a retry that takes the deletion for a
/// prune reports the shortened chain as verified.
#[test]
fn a_file_deleted_while_the_report_is_read_is_not_taken_for_a_prune() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    write_log(&cfg(&dir, 4096), 2000, false);
    let files = chain_files(&dir);
    assert!(files.len() > 20, "{} files", files.len());
    let first = files[0].file_name().unwrap().to_str().unwrap().to_string();
    let newest = files.last().unwrap().clone();
    // The first verification opens file 0 once, the reading of the chain a second time.
    let watcher = delete_at_nth_open(&dir, first, 2, newest.clone());
    let args = EvidenceArgs::of(VerifyLogArgs::of(dir.clone()));
    let mut retries = Vec::new();
    let result = collect_with(&args, |why| retries.push(why.to_string()));
    assert!(watcher.join().unwrap(), "the newest file was not deleted");
    assert!(!newest.exists());
    assert!(
        !dir.read_dir().unwrap().any(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .contains("pruned")),
        "no prune-log ran: there is no manifest"
    );
    if let Ok(ev) = &result {
        assert!(
            !ev.integrity.verified,
            "a chain file deleted while the report was made (no prune-log ran, no manifest) \
             was taken for a prune (retries: {retries:?}) and the report says the log \
             verified: {} records",
            ev.integrity.records
        );
    }
}

/// A keyed chain of many files, and beside it a chain whose writer died before its `start`
/// record was whole (its file 0 alone, a few torn bytes), named to be verified after the
/// first. Returns the first chain's file 0 (its opening starts the verification of that
/// chain) and the unstarted chain's file.
fn log_with_an_unstarted_chain(dir: &Path) -> (String, PathBuf) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    write_log(&cfg(dir, 4096), 2000, true);
    let files = chain_files(dir);
    assert!(files.len() > 20, "{} files", files.len());
    let first = files[0].file_name().unwrap().to_str().unwrap().to_string();
    let id = "p99999999999-t1700000000000000000";
    let torn = dir.join(format!("kvh-{id}-000000.jsonl"));
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&torn)
        .unwrap()
        .write_all(b"{\"chain\":\"p99999999999-t1700000000000000000\",\"config_dig")
        .unwrap();
    (first, torn)
}

/// A chain that never started, removed by a start-up after a verification listed it and
/// before it read it, is reported as when it is listed a moment later: nothing of it. The
/// report has no entry for it (`verify-log` would print a chain line of 0 files saying its
/// MACs were not checked for lack of a key file, and only a manifest was read), and every
/// chain of a verification given the key had its MACs checked.
#[test]
fn an_unstarted_chain_removed_while_the_log_is_verified_leaves_nothing_in_the_report() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    let (first, torn) = log_with_an_unstarted_chain(&dir);
    let opts = forensic_common::keyed_opts();
    let before = kvhygiene::forensic::verify_all(&dir, &opts).unwrap();
    assert!(before.ok() && before.chains.len() == 2, "{before:?}");
    // Removed, as a start-up removes it, while the first chain is verified.
    let watcher = delete_at_nth_open(&dir, first, 1, torn.clone());
    let report = kvhygiene::forensic::verify_all(&dir, &opts).unwrap();
    assert!(
        watcher.join().unwrap(),
        "the unstarted chain was not removed"
    );
    assert!(report.ok(), "{:?}", report.first_problem());
    let empty: Vec<_> = report
        .chains
        .iter()
        .filter(|c| c.files == 0 || !c.macs_checked)
        .map(|c| (&c.chain, c.files, c.records, c.macs_checked))
        .collect();
    assert!(
        empty.is_empty(),
        "the removed unstarted chain is still reported, as a chain of no file whose MACs \
         were not checked (chain, files, records, MACs checked): {empty:?}"
    );
}

/// `kvh evidence` over the same log: the unstarted chain removed while the report is made
/// held no record, so the report verifies, with every chain's MACs checked.
#[test]
fn an_unstarted_chain_removed_while_the_evidence_report_is_made_does_not_fail_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    let (first, torn) = log_with_an_unstarted_chain(&dir);
    let key = secret_key_file(tmp.path());
    let watcher = delete_at_nth_open(&dir, first, 1, torn.clone());
    let args = EvidenceArgs::of(VerifyLogArgs {
        key_file: vec![key],
        ..VerifyLogArgs::of(dir.clone())
    });
    let ev = collect_with(&args, |_| {}).unwrap();
    assert!(
        watcher.join().unwrap(),
        "the unstarted chain was not removed"
    );
    assert!(!torn.exists());
    assert!(
        ev.integrity.verified && ev.integrity.macs_checked,
        "a chain without a record, removed by a start-up while the report was made, fails \
         the report or hides that MACs were checked: verified {}, MACs checked {}, \
         problems {:?}",
        ev.integrity.verified,
        ev.integrity.macs_checked,
        ev.integrity.problems
    );
}

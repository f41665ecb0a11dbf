//! `kvh evidence` and files that disappear while the report is made. Only `prune-log` may
//! move a chain's files, and it writes a manifest that accounts for them; a file deleted by
//! anything else while the report is read is tampering the report must not hide.

mod forensic_common;

use std::ffi::{CStr, CString};
use std::path::{Path, PathBuf};

use forensic_common::{cfg, chain_files, write_log};
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

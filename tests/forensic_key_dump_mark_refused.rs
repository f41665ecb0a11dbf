//! Where the kernel refuses to leave a key's memory out of core dumps (`madvise` with
//! `MADV_DONTDUMP` failing: an old or emulating kernel, a seccomp profile that denies it),
//! no key is held at all: the log refuses to open sealed, the process-wide allocator refuses to
//! start on such a log, and `kvh verify-log` refuses its `--key-file`, each naming why
//! (docs/forensic-log.md, "Key files"). The refusal is made by a seccomp filter on one thread,
//! which the processes that thread starts inherit; a log without keys opens under it.

#![cfg(all(
    target_os = "linux",
    any(target_arch = "x86_64", target_arch = "aarch64")
))]

mod forensic_common;

use std::process::{Command, Output};

use forensic_common::*;
use kvhygiene::forensic::ForensicLog;

/// What the errors must name.
const WHY: &str = "MADV_DONTDUMP";

/// Not `KVH_*`: the allocator refuses configuration keys it does not know.
const CHILD_ENV: &str = "KVHYGIENE_TEST_DUMP_MARK_CHILD";

#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 0xC000_003E;
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 0xC000_00B7;

/// Offsets in the kernel's `struct seccomp_data`: the syscall number, the architecture, and
/// the low word of the third argument (little-endian: both architectures above are).
const NR_AT: u32 = 0;
const ARCH_AT: u32 = 4;
const ARG2_LOW_AT: u32 = 16 + 2 * 8;

fn stmt(code: u32, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jump_unless(k: u32, skip: u8) -> libc::sock_filter {
    libc::sock_filter {
        code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
        jt: 0,
        jf: skip,
        k,
    }
}

/// From now on, on this thread and in the processes it starts, `madvise(.., MADV_DONTDUMP)`
/// fails with EINVAL, as on a kernel without the advice; every other call is let through.
fn refuse_dump_marks_on_this_thread() {
    let load = libc::BPF_LD | libc::BPF_W | libc::BPF_ABS;
    let mut filter = [
        stmt(load, ARCH_AT),
        jump_unless(AUDIT_ARCH, 5),
        stmt(load, NR_AT),
        jump_unless(libc::SYS_madvise as u32, 3),
        stmt(load, ARG2_LOW_AT),
        jump_unless(libc::MADV_DONTDUMP as u32, 1),
        stmt(
            libc::BPF_RET | libc::BPF_K,
            libc::SECCOMP_RET_ERRNO | libc::EINVAL as u32,
        ),
        stmt(libc::BPF_RET | libc::BPF_K, libc::SECCOMP_RET_ALLOW),
    ];
    let prog = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_mut_ptr(),
    };
    // SAFETY: PR_SET_NO_NEW_PRIVS takes plain integers. PR_SET_SECCOMP reads `prog` and the
    // `filter` array it points to, both alive for the call (the kernel copies the program).
    // Both affect only the calling thread (no SECCOMP_FILTER_FLAG_TSYNC), which ends with
    // the test.
    unsafe {
        assert_eq!(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), 0);
        assert_eq!(
            libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER,
                &prog as *const libc::sock_fprog
            ),
            0,
            "cannot install the seccomp filter: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Runs `f` on a thread of its own with the dump mark refused.
fn with_dump_marks_refused<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    std::thread::scope(|s| {
        s.spawn(|| {
            refuse_dump_marks_on_this_thread();
            f()
        })
        .join()
        .unwrap()
    })
}

/// The filter refuses what it should: the mark on a page, and nothing else asked of it.
#[test]
fn the_filter_refuses_the_dump_mark_and_only_it() {
    with_dump_marks_refused(|| {
        // SAFETY: a fresh private anonymous mapping of one page, advised and unmapped here
        // and used by nothing else.
        unsafe {
            let page = libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            assert_ne!(page, libc::MAP_FAILED);
            assert_eq!(libc::madvise(page, 4096, libc::MADV_DONTDUMP), -1);
            assert_eq!(
                std::io::Error::last_os_error().raw_os_error(),
                Some(libc::EINVAL)
            );
            assert_eq!(libc::madvise(page, 4096, libc::MADV_DODUMP), 0);
            assert_eq!(libc::munmap(page, 4096), 0);
        }
    });
}

#[test]
fn a_sealed_log_is_refused_and_one_without_keys_opens() {
    let tmp = tempfile::tempdir().unwrap();
    let sealed = tmp.path().join("sealed");
    let plain = tmp.path().join("plain");
    let (sealed_err, plain_opened) = with_dump_marks_refused(|| {
        let sealed_err =
            ForensicLog::open_with_secret(&cfg(&sealed, 1 << 20), start(), Some(secret()))
                .err()
                .map(|e| e.to_string());
        let plain = ForensicLog::open_with_secret(&cfg(&plain, 1 << 20), start(), None);
        let opened = plain.map(|log| log.stop()).is_ok();
        (sealed_err, opened)
    });
    let err = sealed_err.expect("a sealed log opened with its key's memory left in core dumps");
    assert!(err.contains(WHY), "the error does not say why: {err}");
    assert!(
        plain_opened,
        "a log without keys did not open under the filter"
    );
    assert!(
        !sealed.exists() || chain_files(&sealed).is_empty(),
        "the refused log left chain files: {:?}",
        chain_files(&sealed)
    );
}

/// Each verb that reads the HMAC secret (`--key-file`), on a sealed log: runs without the
/// filter; with it, exits with the status of a run that could not be made (2), naming why,
/// and quoting nothing of the secret.
#[test]
fn every_verb_reading_a_key_refuses_its_key_file() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = log_dir(&tmp);
    write_log(&cfg(&dir, 1 << 20), 3, true);
    let key = secret_key_file(tmp.path());
    let archive = tmp.path().join("archive");
    std::fs::create_dir(&archive).unwrap();
    let state = tmp.path().join("tail.state");
    let verbs: [&[&std::ffi::OsStr]; 4] = [
        &["verify-log".as_ref()],
        &["evidence".as_ref()],
        &[
            "tail-log".as_ref(),
            "--once".as_ref(),
            "--state".as_ref(),
            state.as_ref(),
        ],
        &[
            "prune-log".as_ref(),
            "--dry-run".as_ref(),
            "--older-than".as_ref(),
            "0".as_ref(),
            "--archive-dir".as_ref(),
            archive.as_ref(),
        ],
    ];
    for verb in verbs {
        let run = || -> Output {
            Command::new(env!("CARGO_BIN_EXE_kvh"))
                .args(verb)
                .arg("--key-file")
                .arg(&key)
                .arg(&dir)
                .output()
                .unwrap()
        };
        let name = verb[0].to_string_lossy();
        let refused = with_dump_marks_refused(run);
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert_eq!(refused.status.code(), Some(2), "kvh {name}: {stderr}");
        assert!(
            stderr.contains(WHY),
            "kvh {name} does not say why: {stderr}"
        );
        assert!(
            !stderr.contains(std::str::from_utf8(SECRET).unwrap()),
            "kvh {name} quotes the secret: {stderr}"
        );
        let plain = run();
        assert_eq!(
            plain.status.code(),
            Some(0),
            "control run of kvh {name}: {}",
            String::from_utf8_lossy(&plain.stderr)
        );
    }
}

/// The process-wide allocator started on a sealed log (`KVH_LOG_DIR`, `KVH_HMAC_KEY_FILE`)
/// does not start: `kvh_init` answers an error whose message names why. Run in a child
/// process, whose environment and allocator are its own.
#[test]
fn the_allocator_does_not_start_on_a_sealed_log() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = log_dir(&tmp);
    let key = secret_key_file(tmp.path());
    let child = || {
        Command::new(std::env::current_exe().unwrap())
            .args([
                "allocator_start_child",
                "--exact",
                "--test-threads=1",
                "--nocapture",
            ])
            .env(CHILD_ENV, "1")
            .env("KVH_LOG_DIR", &dir)
            .env("KVH_HMAC_KEY_FILE", &key)
            .output()
            .unwrap()
    };
    let out = with_dump_marks_refused(child);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "child: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = stdout
        .lines()
        .find_map(|l| l.split_once("kvh_init: ").map(|(_, said)| said))
        .unwrap_or_else(|| panic!("the child said nothing of kvh_init: {stdout}"));
    assert!(said.starts_with("error "), "kvh_init started: {said}");
    assert!(said.contains(WHY), "the error does not say why: {said}");
    assert!(
        !dir.exists() || chain_files(&dir).is_empty(),
        "the refused start wrote a log"
    );
}

/// In the child: starts the allocator and prints what `kvh_init` answered.
#[test]
fn allocator_start_child() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    let code = kvhygiene::ffi::kvh_init();
    if code == 0 {
        println!("kvh_init: started");
        return;
    }
    let mut buf = vec![0u8; 4096];
    let mut len = 0usize;
    kvhygiene::ffi::kvh_last_error_message(buf.as_mut_ptr().cast(), buf.len(), &mut len);
    let message = String::from_utf8_lossy(&buf[..len.min(buf.len())]);
    let message = message.trim_end_matches('\0');
    println!("kvh_init: error {code}: {message}");
}

//! A server's core dump holds neither of the log's keys: a process writing a sealed, signed log
//! is made to dump core, and the dump is searched for the HMAC secret and the Ed25519 seed
//! (docs/forensic-log.md, "Key files"). A value the process read from a file into its heap,
//! as it reads the keys, is searched for too, and must be found: the dump is one that would
//! hold the keys if they were on the heap.
//!
//! The dump is taken where the kernel writes it as a file in the crashing process's directory
//! (`core_pattern` a plain name, as on a default kernel and in most containers) and the core
//! size limit may be raised; elsewhere (a pipe to systemd-coredump or apport) the test says
//! so and checks nothing.

mod forensic_common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use forensic_common::*;
use kvhygiene::events::EventSink;
use kvhygiene::forensic::ForensicLog;

const CHILD_ENV: &str = "KVH_KEY_CORE_DUMP_CHILD_DIR";

/// In the child (the re-executed test binary): opens a sealed, signed log in DIR/log with the
/// keys in DIR, writes and signs, keeps DIR/marker's bytes on the heap, and aborts: a crash of
/// the server while its log is open.
#[test]
fn core_dump_child_entry() {
    let Some(dir) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let dir = PathBuf::from(dir);
    let mut c = cfg(&dir.join("log"), 1 << 20);
    c.hmac_key_file = Some(dir.join("hmac.key"));
    c.signing_key_file = Some(dir.join("signer.key"));
    c.checkpoint_every_records = 4;
    let log = ForensicLog::open(&c, start()).unwrap().unwrap();
    for i in 0..64 {
        log.emit(event(i));
    }
    log.flush();
    // The dump is of a writer waiting for records, where it spends its time: what a round of
    // records leaves on its stack is cleared before it waits, after the round a flush waits for.
    std::thread::sleep(std::time::Duration::from_millis(200));
    let marker = std::fs::read(dir.join("marker")).unwrap();
    std::hint::black_box(&marker);
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: `setrlimit` reads the struct given; `abort` ends the process, with the log and
    // the marker alive: the dump is of a running writer.
    unsafe {
        libc::setrlimit(libc::RLIMIT_CORE, &unlimited);
        libc::abort();
    }
}

/// Why this machine cannot give the test a core file, if it cannot.
fn no_core_file_here() -> Option<String> {
    let pattern = std::fs::read_to_string("/proc/sys/kernel/core_pattern").ok()?;
    let pattern = pattern.trim();
    if pattern.starts_with('|') || pattern.contains('/') || pattern.is_empty() {
        return Some(format!(
            "core_pattern is {pattern:?}, not a file in the process's directory"
        ));
    }
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `getrlimit` writes the struct given, which lives for the call.
    let got = unsafe { libc::getrlimit(libc::RLIMIT_CORE, &mut limit) } == 0;
    if got && limit.rlim_max != libc::RLIM_INFINITY && limit.rlim_max < (1 << 30) {
        return Some(format!(
            "the core size limit's ceiling is {} bytes",
            limit.rlim_max
        ));
    }
    None
}

fn random_bytes(n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    getrandom::getrandom(&mut b).unwrap();
    b
}

fn write_private(p: &Path, bytes: &[u8]) {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(p)
        .unwrap();
    std::io::Write::write_all(&mut f, bytes).unwrap();
}

fn hex_decode(text: &str) -> Vec<u8> {
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
        .collect()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// `bytes` with each group of `word` bytes reversed: a hash function's message words as a
/// little-endian machine holds them (SHA-256 reads 4-byte words, SHA-512 8-byte ones).
fn words_swapped(bytes: &[u8], word: usize) -> Vec<u8> {
    bytes
        .chunks(word)
        .flat_map(|w| w.iter().rev().copied())
        .collect()
}

/// The forms in which a computation with `key` may leave it in memory: itself, and, as the
/// key block of HMAC-SHA256 (a key of at most 64 bytes is used as it is), XORed with the
/// inner and outer pads, each also as SHA-256's message words.
fn hmac_key_forms(key: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut forms = vec![("as it is".to_string(), key.to_vec())];
    for (name, pad) in [("ipad", 0x36u8), ("opad", 0x5c)] {
        let xored: Vec<u8> = key.iter().map(|b| b ^ pad).collect();
        forms.push((format!("XORed with the HMAC {name}"), xored.clone()));
        forms.push((
            format!("XORed with the HMAC {name}, as words"),
            words_swapped(&xored, 4),
        ));
    }
    forms
}

/// The forms an Ed25519 signature with `seed` may leave: the seed, as SHA-512's message words,
/// and the two halves of its SHA-512 (the secret scalar before clamping, the nonce prefix).
fn signing_key_forms(seed: &[u8]) -> Vec<(String, Vec<u8>)> {
    use sha2::Digest;
    let expanded = sha2::Sha512::digest(seed);
    vec![
        ("the signing seed".into(), seed.to_vec()),
        (
            "the signing seed as SHA-512 words".into(),
            words_swapped(seed, 8),
        ),
        ("the secret scalar's hash".into(), expanded[..32].to_vec()),
        ("the nonce prefix".into(), expanded[32..].to_vec()),
    ]
}

#[test]
fn a_core_dump_of_a_writer_holds_neither_key() {
    if let Some(why) = no_core_file_here() {
        eprintln!("not checked: {why}");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // Random, so that no copy is in the test binary's file (whose pages a dump leaves out)
    // nor anywhere but the files the child reads.
    let secret = random_bytes(32);
    write_private(&dir.join("hmac.key"), &secret);
    let marker = random_bytes(32);
    std::fs::write(dir.join("marker"), &marker).unwrap();
    let (key_file, _) = kvhygiene::forensic::cli::keygen(&dir.join("signer")).unwrap();
    let seed_hex = std::fs::read_to_string(&key_file).unwrap();
    let seed = hex_decode(seed_hex.trim_end());

    let status = Command::new(std::env::current_exe().unwrap())
        .args(["core_dump_child_entry", "--exact", "--test-threads=1"])
        .env(CHILD_ENV, dir)
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(!status.success(), "the child did not abort");

    let core = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .find(|e| e.file_name().to_string_lossy().starts_with("core"))
        .map(|e| e.path())
        .unwrap_or_else(|| panic!("no core file in {} after the child aborted", dir.display()));
    let dump = std::fs::read(&core).unwrap();
    assert!(
        contains(&dump, &marker),
        "the dump ({} bytes) does not hold the heap's marker: it proves nothing of the keys",
        dump.len()
    );
    let found: Vec<String> = hmac_key_forms(&secret)
        .into_iter()
        .map(|(form, bytes)| (format!("the HMAC secret {form}"), bytes))
        .chain(signing_key_forms(&seed))
        .filter(|(_, bytes)| contains(&dump, bytes))
        .map(|(form, _)| form)
        .collect();
    assert!(found.is_empty(), "the dump holds {}", found.join("; "));
    assert!(
        !contains(&dump, seed_hex.trim_end().as_bytes()),
        "the dump holds the signing key file's text"
    );
}

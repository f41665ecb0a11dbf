//! A server's core dump holds neither of the log's keys: a process writing a sealed log is made
//! to dump core, and the dump is searched for the HMAC secret and the Ed25519 seed in every
//! form computing with them leaves (docs/forensic-log.md, "Key files"). A value the process
//! read from a file into its heap, as it reads the keys, is searched for too, and must be
//! found: the dump is one that would hold the keys if they were on the heap.
//!
//! The dump is taken where the kernel writes it as a file in the crashing process's directory
//! (`core_pattern` without a `/` or a pipe, as on a default kernel and in most containers) and
//! the core size limit's ceiling allows it; elsewhere (a pipe to systemd-coredump or apport)
//! the test says so and checks nothing, unless `KVHYGIENE_REQUIRE_CORE_DUMP=1` (set by CI
//! where the machine writes such files), which makes that a failure.
//!
//! In a debug build the calls that follow a MAC overwrite the frames it left the key in, so
//! the test passes there without the stack clearing it checks; CI runs it on a release build.

mod forensic_common;

use std::path::PathBuf;
use std::process::{Command, Stdio};

use forensic_common::*;
use kvhygiene::events::EventSink;
use kvhygiene::forensic::ForensicLog;

const CHILD_ENV: &str = "KVH_KEY_CORE_DUMP_CHILD_DIR";
const SCENARIO_ENV: &str = "KVH_KEY_CORE_DUMP_SCENARIO";

/// The files the test puts in the child's directory; the core file is the one other.
const GIVEN: [&str; 5] = ["hmac.key", "signer.key", "signer.pub", "marker", "log"];

/// What the child does before it aborts.
#[derive(Clone, Copy)]
enum Scenario {
    /// A sealed, signed log, open: the writer waits for records after a round of them.
    SignedAndWaiting,
    /// A sealed log without a signing key, stopped: the writer thread has ended (its stack is
    /// kept by glibc for the next thread) after sealing the `stop` record.
    SealedAndStopped,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::SignedAndWaiting => "signed-and-waiting",
            Scenario::SealedAndStopped => "sealed-and-stopped",
        }
    }

    fn from_name(name: &str) -> Self {
        match name {
            "sealed-and-stopped" => Scenario::SealedAndStopped,
            _ => Scenario::SignedAndWaiting,
        }
    }
}

/// In the child (the re-executed test binary): opens a sealed log in DIR/log with the keys in
/// DIR, writes, keeps DIR/marker's bytes on the heap, and aborts: a crash of the server.
#[test]
fn core_dump_child_entry() {
    let Some(dir) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let dir = PathBuf::from(dir);
    let scenario = Scenario::from_name(&std::env::var(SCENARIO_ENV).unwrap_or_default());
    let mut c = cfg(&dir.join("log"), 1 << 20);
    c.hmac_key_file = Some(dir.join("hmac.key"));
    if let Scenario::SignedAndWaiting = scenario {
        c.signing_key_file = Some(dir.join("signer.key"));
        c.checkpoint_every_records = 4;
    }
    let log = ForensicLog::open(&c, start()).unwrap().unwrap();
    for i in 0..64 {
        log.emit(event(i));
    }
    log.flush();
    match scenario {
        // After the round a flush waits for, the writer does what is due, clears its stack
        // and waits: the dump is of a writer waiting, where it spends its time.
        Scenario::SignedAndWaiting => std::thread::sleep(std::time::Duration::from_millis(200)),
        Scenario::SealedAndStopped => log.stop(),
    }
    let marker = std::fs::read(dir.join("marker")).unwrap();
    std::hint::black_box(&marker);
    raise_core_limit();
    // SAFETY: `abort` ends the process, with the log and the marker alive.
    unsafe { libc::abort() }
}

/// Raises the core size limit to its ceiling (an unprivileged process cannot raise the
/// ceiling), which the parent checked is large enough.
fn raise_core_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `getrlimit` writes and `setrlimit` reads the struct given, which lives for the
    // calls.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_CORE, &mut limit), 0);
        limit.rlim_cur = limit.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_CORE, &limit), 0, "setrlimit");
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

/// SHA-256's state after one block, as a machine holds its words and as they are written out.
fn sha256_midstate(block: &[u8; 64]) -> [Vec<u8>; 2] {
    let mut state: [u32; 8] = [
        0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab,
        0x5be0cd19,
    ];
    let block = sha2::digest::generic_array::GenericArray::clone_from_slice(block);
    sha2::compress256(&mut state, &[block]);
    [
        state.iter().flat_map(|w| w.to_ne_bytes()).collect(),
        state.iter().flat_map(|w| w.to_be_bytes()).collect(),
    ]
}

/// The forms in which a computation with `key` may leave it in memory: itself; as the key
/// block of HMAC-SHA256 (a key of at most 64 bytes is used as it is) XORed with the inner and
/// outer pads, also as SHA-256's message words; and the keyed states an `Hmac` holds, SHA-256
/// after each padded block, which serve as the key.
fn hmac_key_forms(key: &[u8]) -> Vec<(String, Vec<u8>)> {
    assert!(key.len() <= 64);
    let mut forms = vec![("as it is".to_string(), key.to_vec())];
    for (name, pad) in [("ipad", 0x36u8), ("opad", 0x5c)] {
        let xored: Vec<u8> = key.iter().map(|b| b ^ pad).collect();
        forms.push((format!("XORed with the HMAC {name}"), xored.clone()));
        forms.push((
            format!("XORed with the HMAC {name}, as words"),
            words_swapped(&xored, 4),
        ));
        let mut block = [pad; 64];
        for (b, k) in block.iter_mut().zip(key) {
            *b ^= k;
        }
        let [held, written] = sha256_midstate(&block);
        forms.push((format!("as the {name} keyed state"), held));
        forms.push((format!("as the {name} keyed state, written out"), written));
    }
    forms
}

/// The forms an Ed25519 signature with `seed` may leave: the seed, as SHA-512's message words,
/// the two halves of its SHA-512 (the secret scalar before clamping, the nonce prefix), and
/// the secret scalar as the signing key holds it.
fn signing_key_forms(seed: &[u8; 32]) -> Vec<(String, Vec<u8>)> {
    use sha2::Digest;
    let expanded = sha2::Sha512::digest(seed);
    let scalar = ed25519_dalek::SigningKey::from_bytes(seed).to_scalar();
    vec![
        ("the signing seed".into(), seed.to_vec()),
        (
            "the signing seed as SHA-512 words".into(),
            words_swapped(seed, 8),
        ),
        ("the secret scalar's hash".into(), expanded[..32].to_vec()),
        ("the nonce prefix".into(), expanded[32..].to_vec()),
        ("the secret scalar".into(), scalar.to_bytes().to_vec()),
    ]
}

/// Runs `scenario` in a child that aborts, and returns the forms of either key its core
/// dump holds; `None` when this machine gives no core file.
fn forms_in_a_dump(scenario: Scenario) -> Option<Vec<String>> {
    if let Some(why) = no_core_file_here() {
        assert!(
            std::env::var_os("KVHYGIENE_REQUIRE_CORE_DUMP").is_none(),
            "KVHYGIENE_REQUIRE_CORE_DUMP is set, but {why}"
        );
        eprintln!("not checked: {why}");
        return None;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // Random, so that no copy is in the test binary's file (whose pages a dump leaves out)
    // nor anywhere but the files the child reads.
    let secret = random_bytes(32);
    write_key_file(&dir.join("hmac.key"), &secret);
    let marker = random_bytes(32);
    std::fs::write(dir.join("marker"), &marker).unwrap();
    let (key_file, _) = kvhygiene::forensic::cli::keygen(&dir.join("signer")).unwrap();
    let seed_hex = std::fs::read_to_string(&key_file).unwrap();
    let seed = kvhygiene::forensic::record::parse_hash(seed_hex.trim_end()).unwrap();

    let status = Command::new(std::env::current_exe().unwrap())
        .args(["core_dump_child_entry", "--exact", "--test-threads=1"])
        .env(CHILD_ENV, dir)
        .env(SCENARIO_ENV, scenario.name())
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(!status.success(), "the child did not abort");

    let core = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .find(|e| !GIVEN.iter().any(|g| e.file_name() == *g))
        .map(|e| e.path())
        .unwrap_or_else(|| panic!("no core file in {} after the child aborted", dir.display()));
    let dump = std::fs::read(&core).unwrap();
    assert!(
        contains(&dump, &marker),
        "the dump ({} bytes) does not hold the heap's marker: it proves nothing of the keys",
        dump.len()
    );
    let mut forms: Vec<(String, Vec<u8>)> = hmac_key_forms(&secret)
        .into_iter()
        .map(|(form, bytes)| (format!("the HMAC secret {form}"), bytes))
        .collect();
    if let Scenario::SignedAndWaiting = scenario {
        forms.extend(signing_key_forms(&seed));
        forms.push((
            "the signing key file's text".into(),
            seed_hex.trim_end().into(),
        ));
    }
    Some(
        forms
            .into_iter()
            .filter(|(_, bytes)| contains(&dump, bytes))
            .map(|(form, _)| form)
            .collect(),
    )
}

#[test]
fn a_core_dump_of_a_signing_writer_holds_neither_key() {
    if let Some(found) = forms_in_a_dump(Scenario::SignedAndWaiting) {
        assert!(found.is_empty(), "the dump holds {}", found.join("; "));
    }
}

#[test]
fn a_core_dump_after_a_log_stopped_holds_no_key() {
    if let Some(found) = forms_in_a_dump(Scenario::SealedAndStopped) {
        assert!(found.is_empty(), "the dump holds {}", found.join("; "));
    }
}

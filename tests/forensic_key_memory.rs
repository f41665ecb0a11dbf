//! Key material in memory: the HMAC secret, the ratchet's epoch keys and the Ed25519 seed
//! leave no copy behind in memory the process frees (docs/forensic-log.md: the secret is
//! "held in memory that is zeroized on drop"; keys.rs: an epoch key is "zeroized on drop"
//! and the old one is zeroized at each rotation, so that a key stolen later cannot forge
//! earlier files).
//!
//! The test binary's global allocator looks, while a test arms it, at every block freed (and
//! every block a `realloc` moves away from) for a needle: bytes of the secret, or the keyed
//! HMAC-SHA256 state of an epoch key, which computes that epoch's MACs and every later key
//! as well as the key itself does.

use std::os::unix::fs::OpenOptionsExt;

use kvhygiene::forensic::keys::{self, EpochKey};
use zeroize::Zeroizing;

mod freed_needle;

use freed_needle::{freed_copies, SERIAL};

#[global_allocator]
static GLOBAL: freed_needle::Watch = freed_needle::Watch;

fn write_private(path: &std::path::Path, bytes: &[u8]) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .unwrap();
    f.write_all(bytes).unwrap();
}

/// The HMAC secret read from `KVH_HMAC_KEY_FILE` is read into the one buffer that holds it
/// (zeroized on drop): no buffer holding its bytes is freed on the way.
#[test]
fn reading_the_hmac_key_file_frees_no_copy_of_the_secret() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("hmac.key");
    let secret = b"Qz7-unique-hmac-secret-for-the-memory-test-0123456789\n";
    write_private(&path, secret);
    let mut key = None;
    let copies = freed_copies(&secret[..16], || {
        key = Some(keys::read_key_file(&path).unwrap());
    });
    drop(key);
    assert_eq!(
        copies, 0,
        "{copies} freed heap block(s) still held the HMAC secret read from the key file"
    );
}

/// Likewise the Ed25519 seed read from `KVH_SIGNING_KEY_FILE`.
#[test]
fn reading_the_signing_key_file_frees_no_copy_of_the_seed() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("signer.key");
    let seed_hex = b"5a3f0c9e1b7d2468ace013579bdf02468ace13579bdf0246813579bdf0246ace\n";
    write_private(&path, seed_hex);
    // Looked for in both forms a copy could take: the file's hex digits and the decoded seed.
    let raw: Vec<u8> = (0..16)
        .map(|i| {
            u8::from_str_radix(
                std::str::from_utf8(&seed_hex[2 * i..2 * i + 2]).unwrap(),
                16,
            )
        })
        .collect::<Result<_, _>>()
        .unwrap();
    for needle in [&seed_hex[..16], &raw[..]] {
        let mut key = None;
        let copies = freed_copies(needle, || {
            key = Some(keys::read_signing_key(&path).unwrap());
        });
        drop(key);
        assert_eq!(
            copies, 0,
            "{copies} freed heap block(s) still held the signing key's seed read from its file \
             (needle {needle:02x?})"
        );
    }
}

/// The watch itself: a freed block holding the needle is counted. Without this, a watch that
/// saw nothing would pass every "no copy" test here.
#[test]
fn the_watch_counts_a_freed_copy_of_the_needle() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let needle = *b"Kp2-needle-for-the-watch-itself";
    let mut block = vec![0u8; 100];
    block[37..37 + needle.len()].copy_from_slice(&needle);
    let copies = freed_copies(&needle, || drop(block));
    assert_eq!(
        copies, 1,
        "the watch missed a freed block holding the needle"
    );
}

/// The form the epoch-key test looks for is the one a heap copy would take: the `hmac`
/// crate's keyed state, boxed and dropped, is found. So a key type that kept that state in
/// its own memory (as one built once per key would) fails that test.
#[test]
fn a_freed_keyed_hmac_state_is_found_in_the_form_looked_for() {
    use hmac::Mac;
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let secret = b"epoch-key-secret-for-the-memory-test-42";
    let inner = keyed_state(secret, 0x36);
    let state = Box::new(hmac::Hmac::<sha2::Sha256>::new_from_slice(secret).unwrap());
    let copies = freed_copies(&inner, || drop(state));
    assert!(
        copies >= 1,
        "a freed HMAC-SHA256 state was not found by its keyed state"
    );
}

/// SHA-256's state after one compression of `key ^ pad` (a key of at most 64 bytes, zero
/// padded): the keyed half of an HMAC-SHA256 state, in the byte order it has in memory.
fn keyed_state(key: &[u8], pad: u8) -> Vec<u8> {
    let mut block = [0u8; 64];
    block[..key.len()].copy_from_slice(key);
    for b in &mut block {
        *b ^= pad;
    }
    let mut state: [u32; 8] = [
        0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab,
        0x5be0cd19,
    ];
    compress(&mut state, &block);
    state.iter().flat_map(|w| w.to_ne_bytes()).collect()
}

/// The SHA-256 compression function (FIPS 180-4, 6.2.2) on one block.
fn compress(state: &mut [u32; 8], block: &[u8; 64]) {
    const K: [u32; 64] = [
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
        0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
        0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
        0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
        0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
        0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
        0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
        0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
        0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
        0xc67178f2,
    ];
    let mut w = [0u32; 64];
    for i in 0..16 {
        w[i] = u32::from_be_bytes(block[4 * i..4 * i + 4].try_into().unwrap());
    }
    for i in 16..64 {
        let s0 = w[i - 15].rotate_right(7) ^ w[i - 15].rotate_right(18) ^ (w[i - 15] >> 3);
        let s1 = w[i - 2].rotate_right(17) ^ w[i - 2].rotate_right(19) ^ (w[i - 2] >> 10);
        w[i] = w[i - 16]
            .wrapping_add(s0)
            .wrapping_add(w[i - 7])
            .wrapping_add(s1);
    }
    let [mut a, mut b, mut c, mut d, mut e, mut f, mut g, mut h] = *state;
    for i in 0..64 {
        let s1 = e.rotate_right(6) ^ e.rotate_right(11) ^ e.rotate_right(25);
        let ch = (e & f) ^ (!e & g);
        let t1 = h
            .wrapping_add(s1)
            .wrapping_add(ch)
            .wrapping_add(K[i])
            .wrapping_add(w[i]);
        let s0 = a.rotate_right(2) ^ a.rotate_right(13) ^ a.rotate_right(22);
        let maj = (a & b) ^ (a & c) ^ (b & c);
        let t2 = s0.wrapping_add(maj);
        h = g;
        g = f;
        f = e;
        e = d.wrapping_add(t1);
        d = c;
        c = b;
        b = a;
        a = t1.wrapping_add(t2);
    }
    for (s, v) in state.iter_mut().zip([a, b, c, d, e, f, g, h]) {
        *s = s.wrapping_add(v);
    }
}

/// The compression above computes SHA-256 (checked on a one-block message).
#[test]
fn the_test_compression_is_sha256() {
    use sha2::Digest;
    let mut block = [0u8; 64];
    block[..3].copy_from_slice(b"abc");
    block[3] = 0x80;
    block[63] = 24;
    let mut state: [u32; 8] = [
        0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab,
        0x5be0cd19,
    ];
    compress(&mut state, &block);
    let ours: Vec<u8> = state.iter().flat_map(|w| w.to_be_bytes()).collect();
    assert_eq!(ours, sha2::Sha256::digest(b"abc").to_vec());
}

/// An epoch key frees no keyed HMAC state (with that state anyone computes the epoch's MACs,
/// and by the ratchet every later key): the key keeps its bytes alone, in a mapping of its
/// own that is zeroized before it is unmapped (`key_memory::KeyBytes`), and builds the state
/// for each MAC on the stack. What a dropped key frees on the heap must not hold that state.
#[test]
fn a_dropped_epoch_key_leaves_no_keyed_hmac_state_behind() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let secret = b"epoch-key-secret-for-the-memory-test-42".to_vec();
    let inner = keyed_state(&secret, 0x36);
    let key = Box::new(EpochKey::from_secret(Zeroizing::new(secret)).unwrap());
    let copies = freed_copies(&inner, || drop(key));
    assert_eq!(
        copies, 0,
        "the memory of a dropped epoch key still holds its keyed HMAC state"
    );
}

/// With logging off, `FORENSIC_HMAC_SECRET` is removed from the environment all the same
/// (docs/forensic-log.md). Removing it frees no copy of the secret: the secret that seals the
/// deployment's other chains leaves no bytes behind in freed memory on the way out.
#[test]
fn removing_the_environment_secret_with_logging_off_frees_no_copy_of_it() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let secret = "Wq4-unique-env-secret-for-the-logging-off-test-0123";
    std::env::set_var("FORENSIC_HMAC_SECRET", secret);
    let cfg = kvhygiene::config::LogConfig {
        dir: None,
        ..kvhygiene::config::Config::default().log
    };
    let start = kvhygiene::forensic::StartInfo::current(String::new());
    let mut opened = None;
    let copies = freed_copies(&secret.as_bytes()[..16], || {
        opened = Some(kvhygiene::forensic::ForensicLog::open(&cfg, start));
    });
    assert!(matches!(opened, Some(Ok(None))), "logging is off");
    assert!(
        std::env::var_os("FORENSIC_HMAC_SECRET").is_none(),
        "the secret is removed from the environment"
    );
    assert_eq!(
        copies, 0,
        "{copies} freed heap block(s) still held FORENSIC_HMAC_SECRET after it was removed"
    );
}

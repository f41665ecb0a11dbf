//! Secrets: the HMAC chain key with its forward-secure ratchet, and Ed25519 signing keys.
//!
//! Epoch 0's key is the configured secret itself; `K(e+1) = HMAC-SHA256(K(e), "kvh-ratchet")`.
//! The writer holds only the current epoch's key and zeroizes the previous one when it
//! ratchets, so a key stolen from a running process cannot forge files of earlier epochs. The
//! keys do not depend on the chain: a stolen `K(e)` seals epoch `e` and later of every chain of
//! the secret, and epoch 0's is the secret (docs/forensic-log.md, "Key ratchet").

use std::fs;
use std::path::Path;

use ed25519_dalek::{SigningKey, VerifyingKey};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use zeroize::{Zeroize, Zeroizing};

use super::key_memory::KeyBytes;
use super::ForensicError;

/// The environment variable holding the HMAC secret (read once, then removed).
pub const SECRET_ENV: &str = "FORENSIC_HMAC_SECRET";

/// The ratchet label.
const RATCHET: &[u8] = b"kvh-ratchet";

/// The label of a secret's key id.
const KEY_ID: &[u8] = b"kvh-key-id";

/// Shortest secret accepted, in bytes.
pub const MIN_SECRET_LEN: usize = 16;

/// Longest secret accepted, in bytes, from the environment or a key file: a key file holding
/// it and a newline is within what every verifier reads (`files::MAX_CKPT_BYTES`), so a log sealed with a secret from the
/// environment can always be verified with a file holding it.
pub const MAX_SECRET_LEN: usize = super::files::MAX_CKPT_BYTES as usize - 1;

/// The HMAC key of one epoch, zeroized on drop. Only the key bytes are kept, in a mapping
/// core dumps leave out (`key_memory::KeyBytes`; moving an `EpochKey` copies a pointer, not
/// the key): the keyed HMAC state (SHA-256 of the key with ipad and opad) is as good as the key for
/// computing this epoch's MACs and every later key, and the `hmac` crate does not zeroize it,
/// so it is built for each MAC and lives only as long as the computation, on the caller's
/// stack. That costs each MAC two more SHA-256 compressions (four instead of two); see
/// docs/benchmarks.md.
pub struct EpochKey {
    epoch: u64,
    key: KeyBytes,
}

impl EpochKey {
    /// Epoch 0 from the raw secret.
    pub fn from_secret(secret: Zeroizing<Vec<u8>>) -> Result<Self, ForensicError> {
        if secret.len() < MIN_SECRET_LEN {
            return Err(ForensicError::Key(format!(
                "HMAC secret is {} bytes; at least {MIN_SECRET_LEN} are required",
                secret.len()
            )));
        }

        Ok(EpochKey {
            epoch: 0,
            key: KeyBytes::copy_of(&secret)?,
        })
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// A fresh keyed MAC, to be finalized at once (it holds the keyed state).
    pub fn mac(&self) -> Hmac<Sha256> {
        // HMAC accepts keys of any length, so this cannot fail.
        <Hmac<Sha256> as Mac>::new_from_slice(self.key.as_bytes())
            .unwrap_or_else(|_| <Hmac<Sha256> as Mac>::new(&Default::default()))
    }

    /// Moves to the next epoch; the current key material is overwritten, in place.
    pub fn ratchet(&mut self) {
        let mut m = self.mac();
        m.update(RATCHET);
        let mut next: [u8; 32] = m.finalize().into_bytes().into();
        self.key.replace_with_digest(&next);
        next.zeroize();
        self.epoch += 1;
    }

    /// The id of the secret this key ratchets from: the first 16 bytes of
    /// `HMAC-SHA256(K(0), "kvh-key-id")`, in hex. Only meaningful at epoch 0 (the caller takes
    /// it before ratcheting); it names the secret without revealing it.
    pub fn key_id(&self) -> String {
        let mut m = self.mac();
        m.update(KEY_ID);
        super::record::hex(&m.finalize().into_bytes()[..16])
    }

    /// Refuses a signing key that is this secret (epoch 0) written as text: one file named as
    /// both `KVH_HMAC_KEY_FILE` and `KVH_SIGNING_KEY_FILE` (or `FORENSIC_HMAC_SECRET` holding
    /// the seed's hex), in either case, or as its 32 bytes (`as_key_material`). Every
    /// verifier of MACs holds the HMAC secret, and with it could sign checkpoints, which exist to be trusted by those who cannot: one key, one use. Its
    /// public half (the `.pub`, copied under another name) is refused too: every verifier of
    /// checkpoints is given it, and could forge MACs.
    pub fn refuse_as_signing_key(&self, signer: &VerifyingKey) -> Result<(), ForensicError> {
        for seed in as_key_material(self.key.as_bytes()) {
            refuse_as_key_of(&seed, signer)?;
        }
        Ok(())
    }
}

/// [`EpochKey::refuse_as_signing_key`] for one reading of the secret as 32 bytes.
fn refuse_as_key_of(seed: &[u8; 32], signer: &VerifyingKey) -> Result<(), ForensicError> {
    if *seed == signer.to_bytes() {
        return Err(ForensicError::Key(
            "the HMAC secret is the signing key's public half (the .pub of \
             KVH_SIGNING_KEY_FILE): every verifier of checkpoints holds it, and could forge \
             the MACs; give the HMAC secret a key of its own \
             (`(umask 077; openssl rand -hex 32 > hmac.key)`)"
                .into(),
        ));
    }
    if SigningKey::from_bytes(seed).verifying_key() != *signer {
        return Ok(());
    }
    Err(ForensicError::Key(
        "the HMAC secret is the signing key (KVH_SIGNING_KEY_FILE's seed): whoever checks \
         the MACs could then sign checkpoints; give the HMAC secret a key of its own \
         (`(umask 077; openssl rand -hex 32 > hmac.key)`)"
            .into(),
    ))
}

/// The 32-byte values a secret may be another key written as: its text as 64 hex digits,
/// of either case (`kvh keygen` writes lower case; `tr a-f A-F` of its file is the same
/// key), with a trailing line break; and its bytes themselves when there are 32 (a raw seed
/// or public key). Each is held zeroed on drop, as the secret is.
fn as_key_material(secret: &[u8]) -> Vec<Zeroizing<[u8; 32]>> {
    let mut found = Vec::new();
    if let Ok(text) = std::str::from_utf8(secret) {
        let lower = Zeroizing::new(text.trim_end().to_ascii_lowercase());
        if let Some(bytes) = super::record::parse_hash(&lower) {
            found.push(Zeroizing::new(bytes));
        }
    }
    if let Ok(raw) = <[u8; 32]>::try_from(secret) {
        found.push(Zeroizing::new(raw));
    }
    found
}

impl EpochKey {
    /// A copy, for trying a ratchet position without giving up the current key. Fails only
    /// when no memory can be mapped for it.
    pub(crate) fn clone_for_probe(&self) -> Result<Self, ForensicError> {
        Ok(EpochKey {
            epoch: self.epoch,
            key: KeyBytes::scratch_copy_of(self.key.as_bytes())?,
        })
    }

    /// Ratchets forward until `epoch` (no-op when already there or past).
    pub fn advance_to(&mut self, epoch: u64) {
        while self.epoch < epoch {
            self.ratchet();
        }
    }
}

/// An Ed25519 signing key as a writer holds it between checkpoints: the seed in a mapping
/// core dumps leave out (`key_memory::KeyBytes`), beside its public half. The `SigningKey`
/// (the seed with its SHA-512 expansion) is made for each signature and zeroized when
/// dropped (ed25519-dalek's `zeroize` feature); making it costs one base-point
/// multiplication, tens of microseconds, at each checkpoint.
pub struct HeldSigningKey {
    /// The 32-byte seed (invariant: exactly 32 bytes).
    seed: KeyBytes,
    public: VerifyingKey,
}

impl HeldSigningKey {
    /// Holds `key`, which is zeroized as it is dropped here.
    pub fn hold(key: SigningKey) -> Result<Self, ForensicError> {
        let seed = Zeroizing::new(key.to_bytes());
        Ok(HeldSigningKey {
            seed: KeyBytes::copy_of(seed.as_ref())?,
            public: key.verifying_key(),
        })
    }

    /// The public key.
    pub fn verifying_key(&self) -> VerifyingKey {
        self.public
    }

    /// Runs `sign` with the signing key, which exists only for the call; the stack it used is
    /// cleared after it (`key_memory::with_stack_cleared`).
    pub fn with_key<R>(
        &self,
        sign: impl FnOnce(&SigningKey) -> Result<R, ForensicError>,
    ) -> Result<R, ForensicError> {
        let seed = self
            .seed
            .as_bytes()
            .first_chunk::<32>()
            .ok_or_else(|| ForensicError::Key("a held signing key is not 32 bytes".into()))?;
        super::key_memory::with_stack_cleared(|| sign(&SigningKey::from_bytes(seed)))
    }
}

/// Whether `FORENSIC_HMAC_SECRET` is set, asked without copying its value (a copy would be
/// freed unzeroized).
pub fn secret_in_env() -> bool {
    crate::config::environ::value_len(SECRET_ENV).is_some()
}

/// Reads the secret: the environment variable first (then removed from the environment),
/// else the key file. `None` when neither is configured.
pub fn load_secret(key_file: Option<&Path>) -> Result<Option<EpochKey>, ForensicError> {
    if let Some(v) = std::env::var_os(SECRET_ENV) {
        // `remove_var` only unlinks the entry from `environ`: the bytes stay where they
        // were, and for a variable inherited at exec that is the stack area that
        // /proc/<pid>/environ shows. So the value is overwritten in place first; the removal
        // then keeps the (now zeroed) entry out of child processes.
        scrub_env_value(SECRET_ENV.as_bytes());
        std::env::remove_var(SECRET_ENV);
        let mut bytes = Zeroizing::new(std::os::unix::ffi::OsStringExt::into_vec(v));
        // As in a key file: a Secret made from a file (`openssl rand -hex 32 > hmac.key`)
        // keeps its newline, and the verifiers, given that file, drop it.
        let len = secret_len(&bytes);
        bytes.truncate(len);
        // A key file is read up to that size already (`read_private`).
        if len > MAX_SECRET_LEN {
            return Err(in_setting(
                SECRET_ENV,
                ForensicError::Key(format!(
                    "HMAC secret is {len} bytes; at most {MAX_SECRET_LEN} are accepted (a key \
                     file holding it must be readable by every verifier)"
                )),
            ));
        }
        return EpochKey::from_secret(bytes)
            .map(Some)
            .map_err(|e| in_setting(SECRET_ENV, e));
    }
    match key_file {
        Some(p) => read_key_file(p)
            .map(Some)
            .map_err(|e| in_setting("KVH_HMAC_KEY_FILE", e)),
        None => Ok(None),
    }
}

/// Removes `FORENSIC_HMAC_SECRET` from the environment, its value overwritten in place, when
/// no log will use it (logging off): the secret that seals the deployment's other chains must
/// not stay in `/proc/<pid>/environ` or pass to child processes.
pub fn discard_env_secret() {
    // Not `var_os`, which would copy the secret into a buffer freed unzeroized.
    if scrub_env_value(SECRET_ENV.as_bytes()) {
        std::env::remove_var(SECRET_ENV);
    }
}

/// A key error prefixed with the setting that named the key, so that the operator knows which
/// of the keys to fix: `forensic log key: KVH_SIGNING_KEY_FILE: /path: reason`.
pub fn in_setting(setting: &str, e: ForensicError) -> ForensicError {
    match e {
        ForensicError::Key(m) => ForensicError::Key(format!("{setting}: {m}")),
        other => other,
    }
}

extern "C" {
    /// The C library's environment array (POSIX).
    static mut environ: *const *mut libc::c_char;
}

/// Overwrites with zeros the value bytes of every `name=value` entry of the process
/// environment, in place (the entry keeps its length: `name=` then NULs). Returns whether
/// there was one.
fn scrub_env_value(name: &[u8]) -> bool {
    // SAFETY: `environ` is either null or a null-terminated array of pointers to
    // NUL-terminated strings (POSIX). It is read once here and walked in a single pass,
    // under the same precondition as `std::env::remove_var`, which is called right after:
    // no other thread changes the environment meanwhile. kvhygiene cannot enforce that (this
    // runs at start-up, the process's first allocation, or when a start-up ends): a process
    // that calls `setenv` from another thread then breaks it, as it breaks every `getenv` of
    // the C library; and the removal that follows moves the later entries, which a `getenv`
    // in another thread at that moment may miss (docs/forensic-log.md: the key file is the
    // route without either). The entries are writable memory: the exec-time environment is on the
    // initial stack, and `setenv` (which std uses) copies into the heap.
    unsafe {
        let mut p = std::ptr::addr_of!(environ).read();
        if p.is_null() {
            return false;
        }
        let mut found = false;
        while !(*p).is_null() {
            found |= scrub_entry(*p, name);
            p = p.add(1);
        }
        found
    }
}

/// Zeroes the value of one environment entry if its name is `name`; returns whether it was.
///
/// # Safety
/// `entry` points to a NUL-terminated, writable string that nothing else accesses during
/// the call.
unsafe fn scrub_entry(entry: *mut libc::c_char, name: &[u8]) -> bool {
    // SAFETY: `entry` is NUL-terminated (caller).
    let len = unsafe { libc::strlen(entry) };
    let matches = {
        // SAFETY: the `len` bytes before the NUL are readable; the slice is dropped before
        // any write below, so no reference aliases the writes.
        let bytes = unsafe { std::slice::from_raw_parts(entry.cast::<u8>(), len) };
        bytes.starts_with(name) && bytes.get(name.len()) == Some(&b'=')
    };
    if !matches {
        return false;
    }
    let value = name.len() + 1;
    for i in value..len {
        // SAFETY: `i < len`, inside the string and before its NUL; the memory is writable
        // (caller). Volatile: the compiler must not drop writes to memory it sees no
        // further reads of.
        unsafe { std::ptr::write_volatile(entry.add(i), 0) };
    }
    true
}

/// The length of the secret held in `value` (a key file's bytes, or the environment
/// variable's): one trailing newline is not part of it. One rule for the library, the
/// verifiers and `kvh config`'s check of the length.
pub fn secret_len(value: &[u8]) -> usize {
    value.len() - usize::from(value.last() == Some(&b'\n'))
}

/// A key file holds the secret's bytes; one trailing newline is not part of it.
pub fn read_key_file(p: &Path) -> Result<EpochKey, ForensicError> {
    let mut bytes = read_private(p)?;
    let len = secret_len(&bytes);
    bytes.truncate(len);
    if len > MAX_SECRET_LEN {
        return Err(ForensicError::Key(format!(
            "{}: HMAC secret is {len} bytes; at most {MAX_SECRET_LEN} are accepted",
            p.display()
        )));
    }
    // As the verifiers refuse it: a log sealed with it could be checked by none of them.
    if let Some(message) = signing_key_as_secret(p, &bytes) {
        return Err(ForensicError::Key(format!(
            "{message}: KVH_HMAC_KEY_FILE takes an HMAC secret of its own \
             (`(umask 077; openssl rand -hex 32 > hmac.key)`), the signing key goes in \
             KVH_SIGNING_KEY_FILE"
        )));
    }
    EpochKey::from_secret(bytes).map_err(|e| match e {
        ForensicError::Key(m) => ForensicError::Key(format!("{}: {m}", p.display())),
        other => other,
    })
}

/// Reads a secret file the writer uses. It is opened without following a symlink (a link
/// planted at the configured path could point at a file an attacker controls) and without
/// blocking (a FIFO), and must be a regular file owned by the effective uid that group and
/// others cannot access: a key someone else owns or can read protects nothing.
fn read_private(p: &Path) -> Result<Zeroizing<Vec<u8>>, ForensicError> {
    use std::os::unix::fs::MetadataExt;
    let (mut f, m) = open_no_follow(p)?;
    let judge = || check_private(p, m.is_file(), m.uid(), m.mode());
    // kvh keygen's PREFIX.pub, readable by all, given as a secret is named as the public key
    // it is, not as a file to make private (which would mislead): such a file is read first.
    // 64 hex digits and a line end (kvh keygen's "\n", or a copy's "\r\n" or blank line): a
    // file over this size cannot be that key.
    const PUBLIC_KEY_FILE_MAX: u64 = 128;
    let public_named =
        p.extension().is_some_and(|e| e == "pub") && m.is_file() && m.len() <= PUBLIC_KEY_FILE_MAX;
    if !public_named {
        judge()?;
    }
    let bytes = read_capped(p, &mut f)?;
    if public_named {
        if is_keygen_public_key(p, &bytes[..secret_len(&bytes)]) {
            return Err(ForensicError::Key(public_key_as_secret(p)));
        }
        judge()?;
    }
    Ok(bytes)
}

/// The file at `p`, opened never through a link and never waiting on a FIFO, with its
/// metadata.
fn open_no_follow(p: &Path) -> Result<(fs::File, fs::Metadata), ForensicError> {
    use std::os::unix::fs::OpenOptionsExt;
    let err = |e: std::io::Error| ForensicError::Key(format!("{}: {e}", p.display()));
    let f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(p)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => ForensicError::Key(format!(
                "{}: is a symlink; a key file is never read through a link",
                p.display()
            )),
            _ => err(e),
        })?;
    let m = f.metadata().map_err(err)?;
    Ok((f, m))
}

/// The bytes of key file `f` (at `p`, a regular file), of at most a checkpoint's size.
fn read_capped(p: &Path, f: &mut fs::File) -> Result<Zeroizing<Vec<u8>>, ForensicError> {
    use std::io::Read;
    let err = |e: std::io::Error| ForensicError::Key(format!("{}: {e}", p.display()));
    // Capped: a real key is at most a few hundred bytes; a larger file is not a key. The
    // buffer is allocated once, at its final size: a buffer grown step by step would free
    // blocks still holding the secret's first bytes.
    let cap = super::files::MAX_CKPT_BYTES;
    let mut bytes = Zeroizing::new(Vec::with_capacity(usize::try_from(cap + 1).unwrap_or(0)));
    f.take(cap + 1).read_to_end(&mut bytes).map_err(err)?;
    if bytes.len() as u64 > cap {
        return Err(ForensicError::Key(format!(
            "{}: key file is larger than {cap} bytes",
            p.display()
        )));
    }
    Ok(bytes)
}

/// A key file must be a regular file of ours with no group or other access.
fn check_private(p: &Path, regular: bool, uid: u32, mode: u32) -> Result<(), ForensicError> {
    let refuse = |why: String| Err(ForensicError::Key(format!("{}: {why}", p.display())));
    if !regular {
        return refuse("key file is not a regular file".into());
    }
    let euid = super::files::euid();
    if uid != euid {
        return refuse(format!(
            "key file is owned by uid {uid}, not by this process's uid {euid}"
        ));
    }
    if mode & 0o077 != 0 {
        return refuse(format!(
            "key file has mode {:04o}; it must not be accessible to group or others (0600)",
            mode & 0o7777
        ));
    }
    Ok(())
}

/// Reads an Ed25519 private key file: 64 hex digits (the 32-byte seed), optional newline.
pub fn read_signing_key(p: &Path) -> Result<SigningKey, ForensicError> {
    // Both files of `kvh keygen` are 64 hex digits: the public one given here would sign as
    // another key than the one verifiers pin, which they would only find out later.
    if p.extension().is_some_and(|e| e == "pub") {
        return Err(ForensicError::Key(format!(
            "{}: a .pub file is kvh keygen's public key; the signing key is PREFIX.key",
            p.display()
        )));
    }
    let bytes = read_private(p)?;
    let text = std::str::from_utf8(&bytes).unwrap_or("");
    let seed = super::record::parse_hash(text.trim_end()).ok_or_else(|| {
        ForensicError::Key(format!(
            "{}: expected 64 lower-case hex digits (an Ed25519 private key seed)",
            p.display()
        ))
    })?;
    let mut seed = Zeroizing::new(seed);
    let key = SigningKey::from_bytes(&seed);
    seed.zeroize();
    Ok(key)
}

/// Reads a key file named on a verifier's command line (an HMAC secret, a public key). Unlike
/// `read_private` it follows links and does not ask who owns the file (Kubernetes mounts a
/// Secret's files as links, readable by a group), but it never waits for a writer (a FIFO
/// given by mistake must not hang a probe or a nightly job) and reads only a regular file of
/// at most `cap` bytes, into a buffer allocated once, so that a secret leaves no copy behind
/// in freed memory.
pub fn read_given_file(p: &Path, cap: u64) -> Result<Zeroizing<Vec<u8>>, String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let err = |e: &dyn std::fmt::Display| format!("{}: {e}", p.display());
    // Checked before the open: opening a FIFO for reading, even non-blocking, is harmless,
    // but a device such as a tape drive may act on the open itself.
    if !fs::metadata(p).map_err(|e| err(&e))?.is_file() {
        return Err(err(&"not a regular file"));
    }
    let f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(p)
        .map_err(|e| err(&e))?;
    let m = f.metadata().map_err(|e| err(&e))?;
    if !m.is_file() {
        return Err(err(&"not a regular file"));
    }
    if m.len() > cap {
        return Err(err(&format!("larger than {cap} bytes; not a key file")));
    }
    let mut bytes = Zeroizing::new(Vec::with_capacity(usize::try_from(cap + 1).unwrap_or(0)));
    f.take(cap + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| err(&e))?;
    if bytes.len() as u64 > cap {
        return Err(err(&format!("larger than {cap} bytes; not a key file")));
    }
    Ok(bytes)
}

/// Reads an Ed25519 public key file: 64 hex digits, optional newline.
pub fn read_public_key(p: &Path) -> Result<VerifyingKey, ForensicError> {
    let bytes = read_given_file(p, super::files::MAX_CKPT_BYTES).map_err(ForensicError::Key)?;
    let text = std::str::from_utf8(&bytes).map_err(|_| {
        ForensicError::Key(format!(
            "{}: not UTF-8 text (an Ed25519 public key)",
            p.display()
        ))
    })?;
    let bytes = super::record::parse_hash(text.trim_end()).ok_or_else(|| {
        ForensicError::Key(format!(
            "{}: expected 64 lower-case hex digits (an Ed25519 public key)",
            p.display()
        ))
    })?;
    if let Some(public) = public_half_beside(p, &bytes) {
        return Err(ForensicError::Key(format!(
            "{}: kvh keygen's private key, whose public half is {}: give that file",
            p.display(),
            public.display()
        )));
    }
    let key = VerifyingKey::from_bytes(&bytes).map_err(|_| {
        ForensicError::Key(format!(
            "{}: not an Ed25519 public key (its 64 hex digits are no point of the curve): an \
             HMAC secret, or kvh keygen's private key PREFIX.key, given for PREFIX.pub?",
            p.display()
        ))
    })?;
    // A point of small order is no one's key: signatures made for it by anyone, over anything,
    // would verify against it (the checkpoints are also checked strictly).
    if key.is_weak() {
        return Err(ForensicError::Key(format!(
            "{}: a weak Ed25519 public key (a point of small order), which anyone can sign \
             for: not a key kvh keygen makes",
            p.display()
        )));
    }
    Ok(key)
}

/// Whether `p`, whose bytes are `secret`, is `kvh keygen`'s public key (`PREFIX.pub`: the 64
/// hex digits of an Ed25519 key), given where an HMAC secret is wanted. A verifier given it
/// for `--key-file` (the two options swapped) would report every record as forged; a writer
/// would seal with a key everyone may read. Told from the file alone: refused before the log
/// is read or written.
///
/// The name and the 64 hex digits decide, not whether the digits are a valid Ed25519 point:
/// about half of all random 32-byte strings are, so a point check would refuse an HMAC secret
/// that happens to sit in a `.pub` file on one key and accept it on the next. One rule for
/// every key: a secret must not be named `*.pub`.
pub fn is_keygen_public_key(p: &Path, secret: &[u8]) -> bool {
    if p.extension().is_none_or(|e| e != "pub") {
        return false;
    }
    let Ok(text) = std::str::from_utf8(secret) else {
        return false;
    };
    super::record::parse_hash(text.trim_end()).is_some()
}

/// The message for a public key given as an HMAC secret ([`is_keygen_public_key`]).
pub fn public_key_as_secret(p: &Path) -> String {
    format!(
        "{}: kvh keygen's public key (for --public-key), not an HMAC secret (the file \
         KVH_HMAC_KEY_FILE names): a .pub file of 64 hex digits is taken for a public key; \
         an HMAC secret must be named otherwise",
        p.display()
    )
}

/// `PREFIX.pub` beside the signing key file `PREFIX.key` (`kvh keygen`'s pair): with whether
/// it is `key`'s public half, or why it does not read as a public key file (the verifiers'
/// words). `None` when the file is not named `*.key` or nothing is at `PREFIX.pub`. A `.pub`
/// that is not the key's own half means the pair was mixed up (the public key copied over the
/// private one, or a `.pub` of another key kept): verifiers that pin that `.pub` refuse
/// every checkpoint it signs.
pub fn public_beside(
    key_file: &Path,
    key: &SigningKey,
) -> Option<(std::path::PathBuf, Result<bool, String>)> {
    let (public, listed) = digits_beside(key_file)?;
    let matches = listed.map(|l| *l == key.verifying_key().to_bytes());
    Some((public, matches))
}

/// The 32 bytes a `.pub` file lists, zeroized: a mixed-up pair can put a seed there.
type PubDigits = Zeroizing<[u8; 32]>;

/// The 64 hex digits of `PREFIX.pub` beside `PREFIX.key`, read as the verifiers read a public
/// key file, but not as a curve point: the key's own seed copied there (the private key over
/// the public one) is no point for about half of all keys, and is told apart all the same.
/// `None` when `p` is not named `*.key` or nothing is at `PREFIX.pub`; the error says why a
/// file there is no public key file. Zeroized: such a file can hold a seed.
fn digits_beside(p: &Path) -> Option<(std::path::PathBuf, Result<PubDigits, String>)> {
    if p.extension().is_none_or(|e| e != "key") {
        return None;
    }
    let public = p.with_extension("pub");
    if std::fs::symlink_metadata(&public).is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound) {
        return None;
    }
    // As the file given is read: a regular file only, never waited on, of bounded size.
    let listed = read_given_file(&public, super::files::MAX_CKPT_BYTES).and_then(|bytes| {
        std::str::from_utf8(&bytes)
            .ok()
            .and_then(|text| super::record::parse_hash(text.trim_end()))
            .map(Zeroizing::new)
            .ok_or_else(|| match read_public_key(&public) {
                Err(e) => e.to_string(),
                Ok(_) => format!("{}: not 64 lower-case hex digits", public.display()),
            })
    });
    Some((public, listed))
}

/// The message for `kvh keygen`'s signing key given as an HMAC secret: `Some` when `p` is
/// `PREFIX.key` holding the 64 hex digits of a seed whose public half is `PREFIX.pub` beside
/// it; the message says so, each caller what goes where instead. The writer refuses it as `KVH_HMAC_KEY_FILE` (one key, one use), and a verifier as
/// `--key-file`, where it would report every record as forged, the status of tampering:
/// told from the files alone, a usage error first. (An HMAC secret of 64 hex digits named
/// `*.key` passes: no `.pub` beside it holds its public half.)
pub fn signing_key_as_secret(p: &Path, secret: &[u8]) -> Option<String> {
    let public = as_key_material(secret)
        .iter()
        .find_map(|seed| public_half_beside(p, seed))?;
    Some(format!(
        "{}: kvh keygen's signing key (its public half {} is beside it), not an HMAC secret",
        p.display(),
        public.display()
    ))
}

/// The `PREFIX.pub` beside `p` when `p` is `PREFIX.key` and its 32 bytes are the seed of the
/// key in that file: `kvh keygen`'s private key given where a public key is wanted (both files
/// hold 64 hex digits). Told from the files alone, so a verifier refuses the mistake as a
/// usage error before it reads the log, whatever the log holds.
fn public_half_beside(p: &Path, seed: &[u8; 32]) -> Option<std::path::PathBuf> {
    let (public, listed) = digits_beside(p)?;
    let listed = listed.ok()?;
    let seed = Zeroizing::new(*seed);
    let derived = SigningKey::from_bytes(&seed).verifying_key();
    (derived.as_bytes() == &*listed).then_some(public)
}

/// Among public keys given (`paths`, read as `keys` in order, duplicates dropped), one that is
/// the private key (the seed) of another given: `(its path, the other's path)`. Told from the
/// keys given alone, so the mistake is refused before the log is read.
pub fn private_of_another<'a>(
    paths: &'a [std::path::PathBuf],
    keys: &[VerifyingKey],
) -> Option<(&'a Path, &'a Path)> {
    let key_of = |p: &Path| read_public_key(p).ok();
    for (i, k) in keys.iter().enumerate() {
        let seed = Zeroizing::new(*k.as_bytes());
        let derived = SigningKey::from_bytes(&seed).verifying_key();
        let Some(j) = keys.iter().position(|o| *o == derived) else {
            continue;
        };
        if i == j {
            continue;
        }
        let private = paths.iter().find(|p| key_of(p) == Some(*k))?;
        let public = paths.iter().find(|p| key_of(p) == Some(keys[j]))?;
        return Some((private, public));
    }
    None
}

/// A fresh signing key from the operating system's CSPRNG.
pub fn generate_signing_key() -> Result<SigningKey, ForensicError> {
    let mut seed = Zeroizing::new([0u8; 32]);
    getrandom::getrandom(seed.as_mut())
        .map_err(|e| ForensicError::Key(format!("no randomness from the OS: {e}")))?;
    Ok(SigningKey::from_bytes(&seed))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The signing key is refused as the HMAC secret however it is written: its seed or its
    /// public half, as hex of either case (a line break after it or not), or as its 32 bytes.
    /// Another secret passes.
    #[test]
    fn the_signing_key_is_refused_as_the_hmac_secret_in_every_spelling() {
        let signer = SigningKey::from_bytes(&[7u8; 32]);
        let public = signer.verifying_key();
        let secret = |bytes: &[u8]| EpochKey::from_secret(Zeroizing::new(bytes.to_vec())).unwrap();
        for half in [signer.to_bytes(), public.to_bytes()] {
            let hex = super::super::record::hex(&half);
            for spelling in [
                hex.clone().into_bytes(),
                format!("{hex}\n").into_bytes(),
                hex.to_ascii_uppercase().into_bytes(),
                format!("{}\r\n", hex.to_ascii_uppercase()).into_bytes(),
                half.to_vec(),
            ] {
                let refused = secret(&spelling).refuse_as_signing_key(&public);
                assert!(refused.is_err(), "{:?}", String::from_utf8_lossy(&spelling));
            }
        }
        assert!(secret(&[9u8; 32]).refuse_as_signing_key(&public).is_ok());
        assert!(secret("ab".repeat(32).as_bytes())
            .refuse_as_signing_key(&public)
            .is_ok());
    }

    /// A public key of small order (the identity point, which accepts forged signatures) is
    /// refused as a public key to pin, naming the file.
    #[test]
    fn a_weak_public_key_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("weak.pub");
        fs::write(&p, format!("01{}\n", "00".repeat(31))).unwrap();
        let e = read_public_key(&p).unwrap_err().to_string();
        assert!(e.contains("weak.pub") && e.contains("small order"), "{e}");
    }

    #[test]
    fn a_public_key_file_is_refused_as_the_signing_key() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("ckpt.pub");
        fs::write(&p, format!("{}\n", "ab".repeat(32))).unwrap();
        let e = read_signing_key(&p).unwrap_err().to_string();
        assert!(e.contains("public key") && e.contains("PREFIX.key"), "{e}");
    }

    /// A public key file named `PREFIX.key` is read whatever lies at `PREFIX.pub`: a FIFO
    /// there is never opened for a blocking read, so reading the key returns at once.
    #[test]
    fn a_fifo_beside_a_public_key_file_does_not_hang_its_reading() {
        let tmp = tempfile::tempdir().unwrap();
        let given = tmp.path().join("verifier.key");
        let signer = SigningKey::from_bytes(&[7u8; 32]);
        let public = signer.verifying_key();
        fs::write(
            &given,
            format!("{}\n", super::super::record::hex(public.as_bytes())),
        )
        .unwrap();
        let fifo = std::ffi::CString::new(
            tmp.path()
                .join("verifier.pub")
                .into_os_string()
                .into_encoded_bytes(),
        )
        .unwrap();
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        let (tx, rx) = std::sync::mpsc::channel();
        let path = given.clone();
        std::thread::spawn(move || {
            let _ = tx.send(read_public_key(&path).map_err(|e| e.to_string()));
        });
        let read = rx
            .recv_timeout(std::time::Duration::from_secs(5))
            .expect("reading the public key still waits on the FIFO beside it after 5 s");
        assert_eq!(read.unwrap(), public);
    }

    #[test]
    fn ratchet_is_deterministic_and_moves_forward() {
        let s = || Zeroizing::new(b"0123456789abcdef-secret".to_vec());
        let mut a = EpochKey::from_secret(s()).unwrap();
        let mut b = EpochKey::from_secret(s()).unwrap();
        a.ratchet();
        a.ratchet();
        b.advance_to(2);
        assert_eq!(a.epoch(), 2);
        assert_eq!(a.key.as_bytes(), b.key.as_bytes());
        let mut m = EpochKey::from_secret(s()).unwrap().mac();
        m.update(RATCHET);
        let k1: [u8; 32] = m.finalize().into_bytes().into();
        let mut c = EpochKey::from_secret(s()).unwrap();
        c.ratchet();
        assert_eq!(c.key.as_bytes(), &k1);
    }

    #[test]
    fn secret_from_the_environment_is_removed_from_it() {
        // The only test in this binary that touches this variable.
        std::env::set_var(SECRET_ENV, "env-secret-0123456789");
        let k = load_secret(None).unwrap().unwrap();
        assert_eq!(k.key.as_bytes(), b"env-secret-0123456789");
        assert!(std::env::var_os(SECRET_ENV).is_none());
        assert!(load_secret(None).unwrap().is_none());
    }

    #[test]
    fn epoch_keys_are_held_out_of_core_dumps_through_the_ratchet() {
        use crate::forensic::key_memory::tests::vm_flags_at;
        let dumped = |k: &EpochKey| {
            let flags = vm_flags_at(k.key.as_bytes().as_ptr()).expect("the key's mapping");
            !flags.iter().any(|f| f == "dd")
        };
        let mut key = EpochKey::from_secret(Zeroizing::new(vec![0x5a; 48])).unwrap();
        assert!(!dumped(&key));
        key.advance_to(3);
        assert!(!dumped(&key));
        assert!(!dumped(&key.clone_for_probe().unwrap()));
    }

    #[test]
    fn a_held_signing_key_signs_as_the_key_it_holds() {
        use crate::forensic::key_memory::tests::vm_flags_at;
        use ed25519_dalek::Signer;
        let key = generate_signing_key().unwrap();
        let (public, expected) = (key.verifying_key(), key.sign(b"checkpoint"));
        let held = HeldSigningKey::hold(key).unwrap();
        assert_eq!(held.verifying_key(), public);
        let sig = held.with_key(|k| Ok(k.sign(b"checkpoint"))).unwrap();
        // Ed25519 signatures are deterministic: the same key gives the same one.
        assert_eq!(sig, expected);
        let flags = vm_flags_at(held.seed.as_bytes().as_ptr()).expect("the seed's mapping");
        assert!(flags.iter().any(|f| f == "dd"), "VmFlags: {flags:?}");
    }

    #[test]
    fn short_secret_refused() {
        assert!(EpochKey::from_secret(Zeroizing::new(b"short".to_vec())).is_err());
    }
}

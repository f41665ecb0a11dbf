//! Ed25519-signed checkpoints: "chain C had head hash H at seq N at time T".
//!
//! One file per chain, `kvh-<chain>.ckpt`, replaced atomically (write a temporary file,
//! fsync, rename, fsync the directory). Its single line is the canonical JSON (see
//! [`super::record`]) of `{v, chain, seq, hash, file, ts, public_key}` (and `key_id`, the id
//! of the chain's HMAC secret, when the chain is sealed) with `sig` appended last exactly
//! like a record's seal: `...,"sig":"<128 hex>"}`. The signature covers the canonical bytes
//! without `sig`.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde_json::{Map, Value};

use super::files;
use super::record::{hex, parse_hash, write_canonical};
use super::ForensicError;

/// The content of a checkpoint.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Checkpoint {
    pub chain: String,
    pub seq: u64,
    pub hash: [u8; 32],
    /// File holding the record `seq`.
    pub file: String,
    pub ts: u64,
    /// The id of the HMAC secret that seals the chain ([`super::keys::EpochKey::key_id`]):
    /// signed, so that the chain is verified with that secret and no other one a verifier
    /// takes. `None` for an unsealed chain.
    pub key_id: Option<String>,
    /// The signer's public key, in hex, as the file names it (set when a file is read; the
    /// writer signs with its own key, whatever this says).
    pub public_key: Option<String>,
}

impl Checkpoint {
    fn body(&self, public_key: &VerifyingKey) -> Vec<u8> {
        let mut m = Map::new();
        m.insert("v".into(), 1.into());
        m.insert("chain".into(), self.chain.clone().into());
        m.insert("seq".into(), self.seq.into());
        m.insert("hash".into(), hex(&self.hash).into());
        m.insert("file".into(), self.file.clone().into());
        m.insert("ts".into(), self.ts.into());
        m.insert("public_key".into(), hex(public_key.as_bytes()).into());
        if let Some(id) = &self.key_id {
            m.insert("key_id".into(), id.clone().into());
        }
        let mut out = Vec::new();
        // Strings and integers only: always canonicalisable.
        let _ = write_canonical(&Value::Object(m), &mut out);
        out
    }
}

/// The name of `chain`'s checkpoint file.
pub(crate) fn file_name_of(chain: &str) -> String {
    format!("kvh-{chain}.ckpt")
}

/// Whether `name` is a checkpoint file's name (`kvh-CHAIN.ckpt`).
pub fn is_checkpoint_name(name: &str) -> bool {
    name.starts_with("kvh-") && name.ends_with(".ckpt")
}

/// The checkpoint file of `chain` in `dir`.
pub fn path_for(dir: &Path, chain: &str) -> PathBuf {
    dir.join(file_name_of(chain))
}

/// Signs and atomically replaces the chain's checkpoint file in `dir`, a directory the
/// caller chose (the writer uses [`write_in`] on the directory it checked and holds).
pub fn write(dir: &Path, key: &SigningKey, c: &Checkpoint) -> Result<(), ForensicError> {
    write_in(&files::LogDir::open_as_is(dir)?, key, c)
}

/// Signs and atomically replaces the chain's checkpoint file in the directory the writer
/// holds open (temporary file, fsync, rename, directory fsync), every step relative to it: a
/// directory renamed and replaced by a symlink is not followed.
pub fn write_in(
    dir: &files::LogDir,
    key: &SigningKey,
    c: &Checkpoint,
) -> Result<(), ForensicError> {
    let mut line = c.body(&key.verifying_key());
    let sig = key.sign(&line);
    line.pop();
    line.extend_from_slice(b",\"sig\":\"");
    line.extend_from_slice(hex(&sig.to_bytes()).as_bytes());
    line.extend_from_slice(b"\"}\n");
    let name = file_name_of(&c.chain);
    let dest = dir.path().join(&name);
    refuse_going_back(dir, &name, c)?;
    let tmp_name = format!(".kvh-{}.ckpt.{}.tmp", c.chain, c.seq);
    let tmp = dir.path().join(&tmp_name);
    let _ = dir.remove(&tmp_name);
    let mut f = dir.create_named(&tmp_name, "checkpoint file")?;
    let installed = f
        .write_all(&line)
        .and_then(|_| f.sync_all())
        .map_err(|e| files::io_err(&tmp, "cannot write checkpoint", e))
        .and_then(|()| {
            dir.rename(&tmp_name, &name)
                .map_err(|e| files::io_err(&dest, "cannot install checkpoint", e))
        });
    if installed.is_err() {
        // A temporary file per failed checkpoint (each has its own seq) would pile up on a
        // disk that is full already.
        let _ = dir.remove(&tmp_name);
    }
    installed?;
    dir.sync()
        .map_err(|e| files::io_err(dir.path(), "cannot fsync checkpoint directory", e))
}

/// A checkpoint only moves forward: replacing one with a lower seq would erase the proof
/// that the records between them existed.
fn refuse_going_back(dir: &files::LogDir, name: &str, c: &Checkpoint) -> Result<(), ForensicError> {
    let old = match dir.read_regular(name, files::MAX_CKPT_BYTES) {
        Ok(text) => parse_fields(&text).ok(),
        Err(_) => None,
    };
    match old {
        Some(old) if old.seq > c.seq => Err(ForensicError::Io(format!(
            "{}: holds seq {}; refusing to replace it with seq {}",
            dir.path().join(name).display(),
            old.seq,
            c.seq
        ))),
        _ => Ok(()),
    }
}

/// Reads and verifies a checkpoint file: it must be signed by one of the pinned public keys
/// (several when the signing key was rotated).
pub fn read(path: &Path, keys: &[VerifyingKey]) -> Result<Checkpoint, String> {
    // The path as it is named (JSON reports carry it so); the text reports escape it.
    load(path, keys).map_err(|e| format!("{}: {e}", path.display()))
}

/// As [`read`], its error the reason alone, without the path (for a message that names the
/// file otherwise).
pub fn load(path: &Path, keys: &[VerifyingKey]) -> Result<Checkpoint, String> {
    let text = files::read_regular(path, files::MAX_CKPT_BYTES).map_err(|e| e.to_string())?;
    parse(&text, keys)
}

/// The unverified content of a chain's checkpoint, `None` when there is none. Recovery uses
/// it to refuse continuing a chain that is behind its checkpoint; a forged file can only
/// make it start a fresh chain, so the signature is not needed for that decision.
pub fn peek(path: &Path) -> Result<Option<Checkpoint>, String> {
    let text = match files::read_regular(path, files::MAX_CKPT_BYTES) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    parse_fields(&text).map(Some)
}

/// The unverified fields of a checkpoint file's text.
fn parse_fields(text: &[u8]) -> Result<Checkpoint, String> {
    fields(&json_line(text)?)
}

/// The one JSON line of a checkpoint file's text.
fn json_line(text: &[u8]) -> Result<Value, String> {
    let line = text.strip_suffix(b"\n").unwrap_or(text);
    if line.iter().all(u8::is_ascii_whitespace) {
        // A checkpoint is installed whole by a rename: an empty one was emptied since.
        return Err("empty, not a checkpoint (one signed JSON line)".into());
    }
    serde_json::from_slice(line).map_err(|e| format!("malformed checkpoint: {e}"))
}

/// The checkpoint fields of a parsed checkpoint object.
fn fields(m: &Value) -> Result<Checkpoint, String> {
    let s = |k: &str| m.get(k).and_then(Value::as_str).map(str::to_string);
    let u = |k: &str| m.get(k).and_then(Value::as_u64);
    Ok(Checkpoint {
        chain: s("chain").ok_or("checkpoint has no chain")?,
        seq: u("seq").ok_or("checkpoint has no seq")?,
        hash: s("hash")
            .and_then(|h| parse_hash(&h))
            .ok_or("checkpoint has no valid hash")?,
        file: s("file").unwrap_or_default(),
        ts: u("ts").unwrap_or(0),
        key_id: s("key_id"),
        public_key: s("public_key"),
    })
}

fn parse(text: &[u8], keys: &[VerifyingKey]) -> Result<Checkpoint, String> {
    let line = text.strip_suffix(b"\n").unwrap_or(text);
    let Value::Object(mut m) = json_line(text)? else {
        return Err("checkpoint is not a JSON object".into());
    };
    let sig_hex = match m.remove("sig") {
        Some(Value::String(s)) => s,
        _ => return Err("checkpoint has no signature".into()),
    };
    let sig_bytes: [u8; 64] = parse_sig(&sig_hex).ok_or("signature is not 128 hex digits")?;
    let mut body = Vec::new();
    write_canonical(&Value::Object(m.clone()), &mut body)
        .map_err(|e| format!("checkpoint not canonical: {}", e.0))?;
    let mut expect_line = body.clone();
    expect_line.pop();
    expect_line.extend_from_slice(format!(",\"sig\":\"{sig_hex}\"}}").as_bytes());
    if expect_line != line {
        return Err("checkpoint is not in canonical form".into());
    }
    // The file names its signer; only a pinned key is trusted to be it.
    let embedded = m.get("public_key").and_then(Value::as_str).unwrap_or("");
    let Some(key) = keys.iter().find(|k| embedded == hex(k.as_bytes())) else {
        // The field is not authenticated, and a key derived from a public key as a seed is
        // anyone's to sign with: a finding either way, which names the likely mistake.
        if keys.iter().any(|k| is_private_key_of(k, embedded)) {
            return Err(
                "the public key given is the PRIVATE key of this checkpoint's signer, or the \
                 checkpoint was forged to look so: give \
                 PREFIX.pub of kvh keygen (PREFIX.key is the private key; both are 64 hex \
                 digits), and keep the private key readable by the writer only"
                    .into(),
            );
        }
        return Err("checkpoint was signed by another key than the pinned public key".into());
    };
    // Strict: a key or a signature's R of small order is refused (with the identity pinned as
    // the key, a signature of R = identity, s = 0 would verify over any content), as are
    // non-canonical encodings; the writer's signatures are none of these.
    key.verify_strict(&body, &Signature::from_bytes(&sig_bytes))
        .map_err(|_| "bad checkpoint signature".to_string())?;
    // Signed, so written by the key's holder; a version this verifier does not know may mean
    // other fields than it reads.
    match m.get("v").and_then(Value::as_u64) {
        Some(1) => {}
        other => {
            return Err(format!(
                "unsupported checkpoint version {other:?} (1 expected)"
            ))
        }
    }
    documented_members(&m)?;
    fields(&Value::Object(m))
}

/// The members of a version-1 checkpoint (docs/forensic-log.md, "Signed checkpoints"), and
/// whether each must be there: `key_id` only is absent, for an unsealed chain.
const MEMBERS: [(&str, bool); 8] = [
    ("chain", true),
    ("file", true),
    ("hash", true),
    ("key_id", false),
    ("public_key", true),
    ("seq", true),
    ("ts", true),
    ("v", true),
];

/// Refuses a signed checkpoint whose members are not the documented ones: one missing would
/// otherwise be read as empty or 0, and one unknown would be signed but never checked.
fn documented_members(m: &serde_json::Map<String, Value>) -> Result<(), String> {
    if let Some(unknown) = m
        .keys()
        .find(|k| !MEMBERS.iter().any(|(name, _)| name == k))
    {
        return Err(format!("checkpoint has an undocumented member {unknown:?}"));
    }
    if let Some((missing, _)) = MEMBERS
        .iter()
        .find(|&&(name, required)| required && !m.contains_key(name))
    {
        return Err(format!("checkpoint has no {missing}"));
    }
    let typed =
        m.get("file").is_some_and(Value::is_string) && m.get("ts").is_some_and(Value::is_u64);
    if !typed {
        return Err("checkpoint's file is not a string or its ts not an unsigned integer".into());
    }
    Ok(())
}

/// Whether `given`, taken for a public key, is in fact the private seed whose public key is
/// `signer` (hex): the two files of `kvh keygen` have the same format, so the mistake reads
/// as a foreign signer unless it is told apart.
fn is_private_key_of(given: &VerifyingKey, signer: &str) -> bool {
    let seed = zeroize::Zeroizing::new(*given.as_bytes());
    hex(SigningKey::from_bytes(&seed).verifying_key().as_bytes()) == signer
}

fn parse_sig(s: &str) -> Option<[u8; 64]> {
    // ASCII first: the halves are sliced by byte index, which must fall between characters.
    if !s.is_ascii() || s.len() != 128 {
        return None;
    }
    let a = parse_hash(&s[..64])?;
    let b = parse_hash(&s[64..])?;
    let mut out = [0u8; 64];
    out[..32].copy_from_slice(&a);
    out[32..].copy_from_slice(&b);
    Some(out)
}

/// Checkpoint files at `path`: the file itself, or every `kvh-*.ckpt` in a directory.
pub fn find(path: &Path) -> std::io::Result<Vec<PathBuf>> {
    if !path.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut out = Vec::new();
    for e in fs::read_dir(path)? {
        let p = e?.path();
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if is_checkpoint_name(name) {
            out.push(p);
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_emptied_checkpoint_is_said_to_be_empty() {
        for text in [&b""[..], b"\n", b"  \n"] {
            let e = parse(text, &[]).unwrap_err();
            assert!(e.starts_with("empty, not a checkpoint"), "{e}");
            let e = parse_fields(text).unwrap_err();
            assert!(e.starts_with("empty, not a checkpoint"), "{e}");
        }
        let e = parse(b"{", &[]).unwrap_err();
        assert!(e.starts_with("malformed checkpoint: "), "{e}");
    }

    fn at(seq: u64) -> Checkpoint {
        Checkpoint {
            chain: "p1-t2".into(),
            seq,
            hash: [seq as u8; 32],
            file: "kvh-p1-t2-000000.jsonl".into(),
            ts: 1,
            key_id: None,
            public_key: None,
        }
    }

    /// A checkpoint naming as its signer a key of small order (the identity point) with a
    /// signature of R = identity, s = 0, which such a key would accept over any content under
    /// a lax verification, is refused even with that key pinned.
    #[test]
    fn a_signature_for_a_weak_key_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let key = super::super::keys::generate_signing_key().unwrap();
        write(tmp.path(), &key, &at(5)).unwrap();
        let path = path_for(tmp.path(), "p1-t2");
        let mut identity = [0u8; 32];
        identity[0] = 1;
        let weak = VerifyingKey::from_bytes(&identity).unwrap();
        assert!(weak.is_weak());
        let mut forged = [0u8; 64];
        forged[0] = 1;
        let text = std::fs::read_to_string(&path).unwrap();
        let text = text
            .replace(&hex(key.verifying_key().as_bytes()), &hex(&identity))
            .split(",\"sig\":")
            .next()
            .unwrap()
            .to_string()
            + &format!(",\"sig\":\"{}\"}}\n", hex(&forged));
        std::fs::write(&path, text).unwrap();
        let e = read(&path, &[weak]).unwrap_err();
        assert!(e.contains("bad checkpoint signature"), "{e}");
    }

    #[test]
    fn the_key_id_is_signed_and_the_signer_named() {
        let tmp = tempfile::tempdir().unwrap();
        let key = super::super::keys::generate_signing_key().unwrap();
        let c = Checkpoint {
            key_id: Some("00112233445566778899aabbccddeeff".into()),
            ..at(5)
        };
        write(tmp.path(), &key, &c).unwrap();
        let path = path_for(tmp.path(), "p1-t2");
        let back = read(&path, &[key.verifying_key()]).unwrap();
        assert_eq!(back.key_id, c.key_id);
        assert_eq!(back.public_key, Some(hex(key.verifying_key().as_bytes())));
        // Another key id in the file breaks the signature.
        let text = fs::read_to_string(&path).unwrap();
        fs::write(&path, text.replace("00112233", "00112234")).unwrap();
        let err = read(&path, &[key.verifying_key()]).unwrap_err();
        assert!(err.contains("bad checkpoint signature"), "{err}");
    }

    /// A checkpoint that cannot be installed leaves no temporary file behind: each failed
    /// one has its own seq, so they would pile up on a disk that is full already.
    #[test]
    fn a_checkpoint_that_cannot_be_installed_leaves_no_temporary_file() {
        let tmp = tempfile::tempdir().unwrap();
        let key = super::super::keys::generate_signing_key().unwrap();
        // A directory where the checkpoint file belongs: the rename onto it fails.
        let blocker = path_for(tmp.path(), "p1-t2");
        fs::create_dir(&blocker).unwrap();
        fs::write(blocker.join("x"), b"x").unwrap();
        let err = write(tmp.path(), &key, &at(5)).unwrap_err();
        assert!(
            err.to_string().contains("cannot install checkpoint"),
            "{err}"
        );
        let left: Vec<_> = fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(left, vec![blocker.file_name().unwrap().to_string_lossy()]);
    }

    #[test]
    fn a_signed_checkpoint_of_another_version_is_refused() {
        use ed25519_dalek::Signer;
        let key = super::super::keys::generate_signing_key().unwrap();
        let body = at(5).body(&key.verifying_key());
        let body = String::from_utf8(body)
            .unwrap()
            .replace("\"v\":1", "\"v\":2");
        let sig = key.sign(body.as_bytes());
        let line = format!(
            "{},\"sig\":\"{}\"}}\n",
            body.strip_suffix('}').unwrap(),
            hex(&sig.to_bytes())
        );
        let err = parse(line.as_bytes(), &[key.verifying_key()]).unwrap_err();
        assert!(err.contains("unsupported checkpoint version"), "{err}");
    }

    /// The private key given where the public one belongs (the two files of `kvh keygen`
    /// have one format) is named as such, not taken for another signer's key.
    #[test]
    fn the_signers_private_key_given_as_the_public_key_is_named() {
        let tmp = tempfile::tempdir().unwrap();
        // A seed that also reads as a curve point, as half of them do: the verifier then
        // accepts the file as a public key and only the checkpoint can tell.
        let (key, misread) = (0u8..=255)
            .find_map(|i| {
                let seed = [i; 32];
                let misread = VerifyingKey::from_bytes(&seed).ok()?;
                Some((SigningKey::from_bytes(&seed), misread))
            })
            .expect("a seed that is a point");
        write(tmp.path(), &key, &at(5)).unwrap();
        let path = path_for(tmp.path(), "p1-t2");
        let e = read(&path, &[misread]).unwrap_err();
        assert!(e.contains("PRIVATE key") && e.contains("PREFIX.pub"), "{e}");
        let other = super::super::keys::generate_signing_key().unwrap();
        let e = read(&path, &[other.verifying_key()]).unwrap_err();
        assert!(e.contains("another key"), "{e}");
    }

    /// A checkpoint file whose `sig` is 128 bytes of text that are not hex digits (here
    /// multi-byte characters, as a garbled or planted file may hold) is refused as a bad
    /// signature, the file named: never a panic of the verifier that reads it.
    #[test]
    fn a_signature_of_non_ascii_text_is_refused_not_a_panic() {
        let tmp = tempfile::tempdir().unwrap();
        let key = super::super::keys::generate_signing_key().unwrap();
        write(tmp.path(), &key, &at(5)).unwrap();
        let path = path_for(tmp.path(), "p1-t2");
        let text = fs::read_to_string(&path).unwrap();
        let start = text.find("\"sig\":\"").unwrap() + 7;
        let garbled = format!("{}{}ab\"}}\n", &text[..start], "\u{20ac}".repeat(42));
        assert_eq!(garbled.len() - start - 3, 128, "a 128-byte signature text");
        fs::write(&path, garbled).unwrap();
        let outcome = std::panic::catch_unwind(|| read(&path, &[key.verifying_key()]));
        let result = outcome.expect("reading a garbled checkpoint panicked");
        let err = result.expect_err("a garbled signature was accepted");
        assert!(err.contains(&path.display().to_string()), "{err}");
    }

    #[test]
    fn a_checkpoint_is_never_replaced_by_a_lower_seq() {
        let tmp = tempfile::tempdir().unwrap();
        let key = super::super::keys::generate_signing_key().unwrap();
        write(tmp.path(), &key, &at(5)).unwrap();
        assert!(write(tmp.path(), &key, &at(3)).is_err());
        let path = path_for(tmp.path(), "p1-t2");
        assert_eq!(read(&path, &[key.verifying_key()]).unwrap().seq, 5);
        write(tmp.path(), &key, &at(6)).unwrap();
        assert_eq!(read(&path, &[key.verifying_key()]).unwrap().seq, 6);
    }
}

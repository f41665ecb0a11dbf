//! Record schema and canonical form.
//!
//! A record is a flat-ish JSON object. Its *canonical bytes* are the compact JSON
//! serialisation of the record without `hash` and `mac`, with every object's keys sorted by
//! their UTF-8 bytes at every depth, and only integers as numbers (the writer turns any
//! non-integer number into a string first). Strings are escaped as JSON requires and no
//! more: `"` and `\` with a backslash, `\b \f \n \r \t` by name, other characters below
//! U+0020 as `\u00xx` (lower-case hex); everything else, including non-ASCII, is written as
//! its UTF-8 bytes. `docs/forensic-log.md` is the normative description.
//!
//! The line on disk is the canonical bytes without the closing `}`, then `,"hash":"<hex>"`,
//! then `,"mac":"<hex>"` when a key is configured, then `}` and a newline. Putting the seal
//! last lets the writer hash exactly the bytes it writes.

use std::borrow::Cow;

use hmac::Mac;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::keys::EpochKey;

/// Schema version of every record.
pub const SCHEMA_VERSION: u64 = 1;

/// The `prev` of the first record of a chain.
pub const GENESIS_PREV: [u8; 32] = [0u8; 32];

/// Fields the writer sets itself; a caller-supplied field of these names is never emitted.
pub const RESERVED: &[&str] = &[
    "v", "seq", "ts", "kind", "chain", "epoch", "prev", "hash", "mac",
];

/// Why a value cannot be put into canonical form.
#[derive(Debug, PartialEq, Eq)]
pub struct NonCanonical(pub &'static str);

/// Appends the canonical serialisation of `v` to `out`.
///
/// Fails on non-integer numbers (their text form is not unique) and on nesting deeper than
/// 32 levels (bounded recursion on untrusted input).
pub fn write_canonical(v: &Value, out: &mut Vec<u8>) -> Result<(), NonCanonical> {
    write_value(v, out, 0)
}

/// Appends the canonical serialisation of an object given as a map.
pub fn write_canonical_map(m: &Map<String, Value>, out: &mut Vec<u8>) -> Result<(), NonCanonical> {
    write_object(m.iter(), out, 0)
}

/// Objects and arrays are the levels of nesting: the outermost one (at `depth` 0) is level 1.
const MAX_LEVELS: usize = 32;

fn enter_level(depth: usize) -> Result<(), NonCanonical> {
    if depth >= MAX_LEVELS {
        return Err(NonCanonical("nesting deeper than 32 levels"));
    }
    Ok(())
}

fn write_value(v: &Value, out: &mut Vec<u8>, depth: usize) -> Result<(), NonCanonical> {
    match v {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Number(n) => {
            if let Some(i) = n.as_u64() {
                write_int(out, i, false);
            } else if let Some(i) = n.as_i64() {
                write_int(out, i.unsigned_abs(), i < 0);
            } else {
                return Err(NonCanonical("non-integer number"));
            }
        }
        Value::String(s) => write_string(s, out),
        Value::Array(items) => {
            enter_level(depth)?;
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_value(item, out, depth + 1)?;
            }
            out.push(b']');
        }
        Value::Object(map) => write_object(map.iter(), out, depth)?,
    }
    Ok(())
}

/// Writes an object with its keys sorted bytewise, whatever order the map iterates in.
fn write_object<'a>(
    entries: impl Iterator<Item = (&'a String, &'a Value)>,
    out: &mut Vec<u8>,
    depth: usize,
) -> Result<(), NonCanonical> {
    enter_level(depth)?;
    let mut sorted: Vec<(&String, &Value)> = entries.collect();
    sorted.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    out.push(b'{');
    for (i, (k, v)) in sorted.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_string(k, out);
        out.push(b':');
        write_value(v, out, depth + 1)?;
    }
    out.push(b'}');
    Ok(())
}

/// How [`write_string`] writes a byte: the one table of the escapes the docs define.
enum Escape {
    /// As itself.
    Plain,
    /// A two-byte escape: a quote, a backslash, or a named control character.
    Short(&'static [u8; 2]),
    /// Another control character, as `\u00xx`.
    Unicode,
}

impl Escape {
    fn of(b: u8) -> Escape {
        match b {
            b'"' => Escape::Short(b"\\\""),
            b'\\' => Escape::Short(b"\\\\"),
            0x08 => Escape::Short(b"\\b"),
            0x0c => Escape::Short(b"\\f"),
            b'\n' => Escape::Short(b"\\n"),
            b'\r' => Escape::Short(b"\\r"),
            b'\t' => Escape::Short(b"\\t"),
            0..=0x1f => Escape::Unicode,
            _ => Escape::Plain,
        }
    }

    /// Bytes written for the byte.
    fn len(&self) -> usize {
        match self {
            Escape::Plain => 1,
            Escape::Short(_) => 2,
            Escape::Unicode => 6,
        }
    }
}

/// The bytes [`write_string`] writes for `s`, quotes included, without writing them: a
/// control byte takes six (`\u00xx`), a quote, a backslash and the named escapes two.
pub fn string_len(s: &str) -> usize {
    s.bytes().map(|b| Escape::of(b).len()).sum::<usize>() + 2
}

/// JSON string escaping, exactly the minimal set the docs define.
pub fn write_string(s: &str, out: &mut Vec<u8>) {
    out.push(b'"');
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let unicode;
        let escaped: &[u8] = match Escape::of(b) {
            Escape::Plain => continue,
            Escape::Short(e) => e,
            Escape::Unicode => {
                let (hi, lo) = (HEX[usize::from(b >> 4)], HEX[usize::from(b & 0xf)]);
                unicode = [b'\\', b'u', b'0', b'0', hi, lo];
                &unicode
            }
        };
        out.extend_from_slice(&bytes[start..i]);
        out.extend_from_slice(escaped);
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

/// Makes caller-supplied JSON canonicalisable: non-integer numbers become strings (their
/// shortest round-trip text), nesting is cut at 16 levels.
pub fn sanitize(v: Value, depth: usize) -> Value {
    match v {
        Value::Number(n) if n.as_u64().is_none() && n.as_i64().is_none() => {
            Value::String(n.to_string())
        }
        Value::Array(items) if depth < 16 => {
            Value::Array(items.into_iter().map(|x| sanitize(x, depth + 1)).collect())
        }
        Value::Object(map) if depth < 16 => Value::Object(
            map.into_iter()
                .map(|(k, x)| (k, sanitize(x, depth + 1)))
                .collect(),
        ),
        Value::Array(_) | Value::Object(_) => Value::String("<nested too deep>".into()),
        other => other,
    }
}

/// `SHA-256(prev || canonical)`.
pub fn chain_hash(prev: &[u8; 32], canonical: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(prev);
    h.update(canonical);
    h.finalize().into()
}

/// `SHA-256(prev || body_open || "}")`: the hash of a line's body without copying it.
pub fn chain_hash_open(prev: &[u8; 32], body_open: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(prev);
    h.update(body_open);
    h.update(b"}");
    h.finalize().into()
}

/// `HMAC-SHA256(key, hash)`.
pub fn mac_of(key: &EpochKey, hash: &[u8; 32]) -> [u8; 32] {
    let mut m = key.mac();
    m.update(hash);
    m.finalize().into_bytes().into()
}

/// Whether `mac` is `HMAC-SHA256(key, hash)`, compared in constant time (`verify_slice`), so
/// that how long a check takes says nothing of how much of a forged MAC was right.
pub fn mac_verifies(key: &EpochKey, hash: &[u8; 32], mac: &[u8; 32]) -> bool {
    let mut m = key.mac();
    m.update(hash);
    m.verify_slice(mac).is_ok()
}

/// [`mac_verifies`] for a MAC as a record writes it (64 lower-case hex digits); anything else
/// is no MAC.
pub fn mac_hex_verifies(key: &EpochKey, hash: &[u8; 32], mac: &str) -> bool {
    parse_hash(mac).is_some_and(|mac| mac_verifies(key, hash, &mac))
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        s.push(char::from(HEX[usize::from(b >> 4)]));
        s.push(char::from(HEX[usize::from(b & 0xf)]));
    }
    s
}

/// Parses exactly 64 lower-case hex digits.
pub fn parse_hash(s: &str) -> Option<[u8; 32]> {
    let b = s.as_bytes();
    if b.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in b.chunks_exact(2).enumerate() {
        out[i] = (nibble(pair[0])? << 4) | nibble(pair[1])?;
    }
    Some(out)
}

fn nibble(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

/// A record's header fields, set by the writer.
pub struct Header<'a> {
    pub seq: u64,
    pub ts: u64,
    pub kind: &'a str,
    pub chain: &'a str,
    pub epoch: u64,
    pub prev: &'a [u8; 32],
}

/// A sealed record, ready to append.
pub struct Sealed {
    /// The full line, newline included.
    pub line: Vec<u8>,
    pub hash: [u8; 32],
}

/// Builds the canonical record from a header and the kind's fields, hashes and seals it.
pub fn seal(h: &Header<'_>, fields: Map<String, Value>, key: Option<&EpochKey>) -> Sealed {
    seal_fields(h, fields_from_map(fields), key)
}

/// One field value. Borrowed strings and plain integers keep the writer's hot path free of
/// JSON maps; `Json` carries caller-supplied structure (summaries, anomaly details).
#[derive(Clone, Debug)]
pub enum Field<'a> {
    U(u64),
    I(i64),
    S(Cow<'a, str>),
    Null,
    Json(Value),
}

/// A record's fields in any order; [`seal_fields`] sorts them.
pub type Fields<'a> = Vec<(Cow<'a, str>, Field<'a>)>;

impl From<Value> for Field<'_> {
    fn from(v: Value) -> Self {
        match v {
            Value::Null => Field::Null,
            Value::String(s) => Field::S(Cow::Owned(s)),
            Value::Number(n) if n.is_u64() => Field::U(n.as_u64().unwrap_or(0)),
            Value::Number(n) if n.is_i64() => Field::I(n.as_i64().unwrap_or(0)),
            other => Field::Json(other),
        }
    }
}

/// Converts a JSON map into fields.
pub fn fields_from_map<'a>(m: Map<String, Value>) -> Fields<'a> {
    m.into_iter()
        .map(|(k, v)| (Cow::Owned(k), Field::from(v)))
        .collect()
}

/// Builds the canonical record from a header and the kind's fields, hashes and seals it.
/// Caller fields named like header fields are dropped; of repeated names the last wins.
pub fn seal_fields<'a>(h: &Header<'a>, mut fields: Fields<'a>, key: Option<&EpochKey>) -> Sealed {
    fields.retain(|(k, _)| !RESERVED.contains(&k.as_ref()));
    let prev = hex(h.prev);
    fields.extend([
        (Cow::Borrowed("v"), Field::U(SCHEMA_VERSION)),
        (Cow::Borrowed("seq"), Field::U(h.seq)),
        (Cow::Borrowed("ts"), Field::U(h.ts)),
        (Cow::Borrowed("kind"), Field::S(Cow::Borrowed(h.kind))),
        (Cow::Borrowed("chain"), Field::S(Cow::Borrowed(h.chain))),
        (Cow::Borrowed("epoch"), Field::U(h.epoch)),
        (Cow::Borrowed("prev"), Field::S(Cow::Owned(prev))),
    ]);
    for id in ["tenant_id", "request_id", "model_id"] {
        if !fields.iter().any(|(k, _)| k == id) {
            fields.push((Cow::Borrowed(id), Field::Null));
        }
    }
    // Stable sort of the reversed list puts the last-inserted of equal keys first; dedup
    // then keeps it, as a map insert would.
    fields.reverse();
    fields.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    fields.dedup_by(|a, b| a.0 == b.0);
    let mut line = Vec::with_capacity(512);
    if write_fields(&fields, &mut line).is_err() {
        // Only reachable with a caller value that `sanitize` did not see: keep the record
        // (security events are never dropped) with its body replaced by the reason.
        line.clear();
        // The header stays whole: the owner ids are strings the C boundary validated, or
        // null, and a verifier requires all three.
        fields.retain(|(k, v)| {
            ["chain", "epoch", "kind", "prev", "seq", "ts", "v"].contains(&k.as_ref())
                || matches!(v, Field::Null)
                || (super::scan::ID_FIELDS.contains(&k.as_ref()) && matches!(v, Field::S(_)))
        });
        fields.push((
            Cow::Borrowed("unserialisable"),
            Field::S(Cow::Borrowed("a caller value had no canonical form")),
        ));
        fields.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
        let _ = write_fields(&fields, &mut line);
    }
    let hash = chain_hash(h.prev, &line);
    line.pop(); // the closing brace; the seal goes before it
    line.extend_from_slice(b",\"hash\":\"");
    line.extend_from_slice(hex(&hash).as_bytes());
    line.push(b'"');
    if let Some(k) = key {
        line.extend_from_slice(b",\"mac\":\"");
        line.extend_from_slice(hex(&mac_of(k, &hash)).as_bytes());
        line.push(b'"');
    }
    line.extend_from_slice(b"}\n");
    Sealed { line, hash }
}

/// Writes sorted, unique fields as a canonical object.
fn write_fields(fields: &Fields<'_>, out: &mut Vec<u8>) -> Result<(), NonCanonical> {
    out.push(b'{');
    for (i, (k, v)) in fields.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_string(k, out);
        out.push(b':');
        match v {
            Field::U(n) => write_int(out, *n, false),
            Field::I(n) => write_int(out, n.unsigned_abs(), *n < 0),
            Field::S(s) => write_string(s, out),
            Field::Null => out.extend_from_slice(b"null"),
            Field::Json(j) => write_value(j, out, 1)?,
        }
    }
    out.push(b'}');
    Ok(())
}

/// Decimal digits without going through a `String`.
fn write_int(out: &mut Vec<u8>, mut n: u64, negative: bool) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    if negative {
        out.push(b'-');
    }
    out.extend_from_slice(&buf[i..]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    proptest::proptest! {
        /// `string_len` is the length `write_string` writes, for any text (control bytes,
        /// quotes and backslashes weighted in).
        #[test]
        fn string_len_is_the_written_length(s in "(\\PC|[\\x00-\\x1f\"\\\\])*") {
            let mut out = Vec::new();
            write_string(&s, &mut out);
            proptest::prop_assert_eq!(string_len(&s), out.len());
        }
    }

    #[test]
    fn canonical_sorts_keys_and_escapes_minimally() {
        let v = json!({"b": 1, "a": {"y": "q\"\\\n\u{1}é", "x": [true, null, -3]}});
        let mut out = Vec::new();
        write_canonical(&v, &mut out).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{"a":{"x":[true,null,-3],"y":"q\"\\\n\u0001é"},"b":1}"#
        );
    }

    #[test]
    fn canonical_refuses_floats() {
        let mut out = Vec::new();
        assert!(write_canonical(&json!({"c": 0.5}), &mut out).is_err());
        assert_eq!(sanitize(json!({"c": 0.5}), 0), json!({"c": "0.5"}));
    }

    #[test]
    fn a_record_whose_body_has_no_canonical_form_keeps_its_whole_header() {
        // A float deep in caller data: the body is replaced, the owner ids stay.
        let mut deep = json!(0.5);
        for _ in 0..40 {
            deep = json!([deep]);
        }
        let fields: Fields = vec![
            (Cow::Borrowed("tenant_id"), Field::S(Cow::Borrowed("acme"))),
            (Cow::Borrowed("detail"), Field::Json(deep)),
        ];
        let sealed = seal_fields(&vector_header(), fields, None);
        let line = std::str::from_utf8(&sealed.line).unwrap();
        assert!(line.contains(r#""unserialisable":"#), "{line}");
        assert!(line.contains(r#""tenant_id":"acme""#), "{line}");
        let scanned = crate::forensic::scan::scan(line.trim_end().as_bytes()).unwrap();
        assert_eq!(scanned.ids, 0b111, "{line}");
    }

    const VECTOR_BODY: &str = r#"{"chain":"p1-t2","epoch":0,"kind":"start","model_id":null,"pid":1,"prev":"0000000000000000000000000000000000000000000000000000000000000000","request_id":null,"seq":0,"tenant_id":null,"ts":1700000000000000000,"v":1}"#;
    const VECTOR_HASH: &str = "bf1f7834f3783672df5afe4e576d5b322beac65b6479a1fa729062761472c8fe";

    fn vector_header() -> Header<'static> {
        Header {
            seq: 0,
            ts: 1_700_000_000_000_000_000,
            kind: "start",
            chain: "p1-t2",
            epoch: 0,
            prev: &GENESIS_PREV,
        }
    }

    fn vector_fields() -> Map<String, Value> {
        let mut f = Map::new();
        f.insert("pid".into(), 1.into());
        f
    }

    /// Fixed vectors (also in docs/forensic-log.md, computed independently with Python's
    /// hashlib/hmac): an outside implementation of the documented form must reproduce them.
    #[test]
    fn fixed_vector_without_key() {
        let s = seal(&vector_header(), vector_fields(), None);
        assert_eq!(hex(&s.hash), VECTOR_HASH);
        let line = String::from_utf8(s.line).unwrap();
        let body = VECTOR_BODY;
        assert_eq!(
            line,
            format!("{},\"hash\":\"{VECTOR_HASH}\"}}\n", &body[..body.len() - 1])
        );
    }

    #[test]
    fn fixed_vector_with_key_and_ratchet() {
        let secret = || zeroize::Zeroizing::new(b"0123456789abcdef-secret".to_vec());
        let k0 = EpochKey::from_secret(secret()).unwrap();
        let s = seal(&vector_header(), vector_fields(), Some(&k0));
        let line = String::from_utf8(s.line).unwrap();
        assert!(line.ends_with(
            ",\"mac\":\"181958f446e125d9452fad319e0fbd9137d2d5900f60496de925d1ea44bea117\"}\n"
        ));
        let mut k1 = EpochKey::from_secret(secret()).unwrap();
        k1.ratchet();
        assert_eq!(
            hex(&mac_of(&k1, &s.hash)),
            "a6d8b2c3038111f67189625763273db5692c6dd76b76f80f1d97de7f3837c598"
        );
    }

    #[test]
    fn a_mac_verifies_with_its_key_and_hash_only() {
        let secret = || zeroize::Zeroizing::new(b"0123456789abcdef-secret".to_vec());
        let k0 = EpochKey::from_secret(secret()).unwrap();
        let mut k1 = EpochKey::from_secret(secret()).unwrap();
        k1.ratchet();
        let hash = [7u8; 32];
        let mac = mac_of(&k0, &hash);
        assert!(mac_verifies(&k0, &hash, &mac));
        assert!(mac_hex_verifies(&k0, &hash, &hex(&mac)));
        assert!(!mac_verifies(&k1, &hash, &mac), "another epoch's key");
        assert!(!mac_verifies(&k0, &[8u8; 32], &mac), "another record");
        let mut flipped = mac;
        flipped[31] ^= 1;
        assert!(!mac_verifies(&k0, &hash, &flipped));
        let upper = hex(&mac).to_uppercase();
        assert!(
            !mac_hex_verifies(&k0, &hash, &upper),
            "records write lower case"
        );
        assert!(!mac_hex_verifies(&k0, &hash, &hex(&mac)[..62]));
    }

    #[test]
    fn hex_round_trip() {
        let h = [0xabu8; 32];
        assert_eq!(parse_hash(&hex(&h)), Some(h));
        assert_eq!(parse_hash("AB"), None);
        assert_eq!(parse_hash(&"G".repeat(64)), None);
    }
}

//! A single-pass, allocation-free reader of record lines that accepts exactly the canonical
//! form of [`super::record`] (sorted keys, minimal escapes, integers only, no whitespace)
//! followed by the seal, and hands back the header fields the verifier needs.
//!
//! It is the verifier's fast path: checking canonical form this way instead of parsing into
//! a `serde_json::Value` and re-serialising keeps `verify-log` close to the speed of hashing.
//! A test checks it against the reference definition (`write_canonical` of the parsed line).

/// Header fields of one record, borrowed from the line (strings in their escaped form,
/// which for every header field the writer produces is the plain text).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Scanned<'a> {
    /// The canonical body without its closing `}` (append `}` to hash it).
    pub body_open: &'a [u8],
    pub hash: &'a str,
    pub mac: Option<&'a str>,
    pub v: Option<u64>,
    pub seq: Option<u64>,
    pub ts: Option<u64>,
    pub epoch: Option<u64>,
    pub prev_seq: Option<u64>,
    pub kind: Option<&'a str>,
    pub chain: Option<&'a str>,
    pub prev: Option<&'a str>,
    pub prev_file: Option<&'a str>,
    /// The seq a `checkpoint` record says was signed.
    pub ckpt_seq: Option<u64>,
    /// The public key a `checkpoint` record says signed it.
    pub signer: Option<&'a str>,
    /// What a `recovery` record says of the crashed chain it continues: its last whole
    /// record, and the torn bytes after it.
    pub last_good_seq: Option<u64>,
    pub last_good_hash: Option<&'a str>,
    pub torn_bytes: Option<u64>,
    pub torn_sha256: Option<&'a str>,
    /// The owner ids (`tenant_id`, `request_id`, `model_id`, in that bit order) present as a
    /// string or `null`, as every record carries them.
    pub ids: u8,
}

/// The owner id fields every record carries, each a string or `null`.
pub const ID_FIELDS: [&str; 3] = ["tenant_id", "request_id", "model_id"];

/// Levels of nesting accepted (the writer's `write_canonical` limit): objects and arrays,
/// the record itself (at depth 0) being level 1.
const MAX_LEVELS: usize = 32;

/// Why a line is not a canonical record.
pub type ScanError = &'static str;

struct P<'a> {
    b: &'a [u8],
    i: usize,
}

/// Scans one line (without its newline).
pub fn scan(line: &[u8]) -> Result<Scanned<'_>, ScanError> {
    if std::str::from_utf8(line).is_err() {
        return Err("record is not valid UTF-8");
    }
    let mut p = P { b: line, i: 0 };
    let mut out = Scanned::default();
    p.expect(b'{')?;
    let mut last_key: Option<&[u8]> = None;
    loop {
        let key_start = p.i;
        let key = p.string()?;
        if key == b"hash" {
            out.body_open = &line[..key_start.saturating_sub(1)];
            if last_key.is_none() {
                return Err("record has no fields before its hash");
            }
            p.expect(b':')?;
            out.hash = p.plain_string()?;
            if p.peek() == Some(b',') {
                p.i += 1;
                if p.string()? != b"mac" {
                    return Err("only mac may follow hash");
                }
                p.expect(b':')?;
                out.mac = Some(p.plain_string()?);
            }
            p.expect(b'}')?;
            if p.i != line.len() {
                return Err("bytes after the record");
            }
            return Ok(out);
        }
        if key == b"mac" {
            // The body is the record without `hash` and `mac`: a `mac` before the hash would
            // be a second one, a key repeated.
            return Err("record is not in canonical form (mac in its body)");
        }
        if last_key.is_some_and(|k| !key_less(k, key)) {
            return Err("record is not in canonical form (keys not sorted or repeated)");
        }
        last_key = Some(key);
        p.expect(b':')?;
        let vstart = p.i;
        p.value(1)?;
        header_field(&mut out, key, &line[vstart..p.i]);
        match p.next() {
            Some(b',') => {}
            Some(b'}') => return Err("record has no hash"),
            _ => return Err("record is not in canonical form"),
        }
    }
}

/// Records a top-level field the verifier reads.
fn header_field<'a>(out: &mut Scanned<'a>, key: &[u8], raw: &'a [u8]) {
    let num = || std::str::from_utf8(raw).ok()?.parse::<u64>().ok();
    let s = || {
        let inner = raw.strip_prefix(b"\"")?.strip_suffix(b"\"")?;
        std::str::from_utf8(inner).ok()
    };
    match key {
        b"v" => out.v = num(),
        b"seq" => out.seq = num(),
        b"ts" => out.ts = num(),
        b"epoch" => out.epoch = num(),
        b"prev_seq" => out.prev_seq = num(),
        b"kind" => out.kind = s(),
        b"chain" => out.chain = s(),
        b"prev" => out.prev = s(),
        b"prev_file" => out.prev_file = s(),
        b"ckpt_seq" => out.ckpt_seq = num(),
        b"signer" => out.signer = s(),
        b"last_good_seq" => out.last_good_seq = num(),
        b"last_good_hash" => out.last_good_hash = s(),
        b"torn_bytes" => out.torn_bytes = num(),
        // Present but not a string: an empty digest, which verification refuses.
        b"torn_sha256" => out.torn_sha256 = Some(s().unwrap_or("")),
        _ => {
            let typed = raw == b"null" || raw.starts_with(b"\"");
            if let Some(bit) = ID_FIELDS.iter().position(|f| f.as_bytes() == key) {
                if typed {
                    out.ids |= 1 << bit;
                }
            }
        }
    }
}

/// Whether raw (escaped) key `a` sorts strictly before `b` by their decoded bytes.
fn key_less(a: &[u8], b: &[u8]) -> bool {
    if !a.contains(&b'\\') && !b.contains(&b'\\') {
        return a < b;
    }
    unescape(a) < unescape(b)
}

/// Decodes the canonical escapes (the input was validated by `P::string`).
fn unescape(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        if raw[i] != b'\\' {
            out.push(raw[i]);
            i += 1;
            continue;
        }
        let c = raw.get(i + 1).copied().unwrap_or(b'\\');
        i += 2;
        out.push(match c {
            b'b' => 0x08,
            b'f' => 0x0c,
            b'n' => b'\n',
            b'r' => b'\r',
            b't' => b'\t',
            b'u' => {
                let hex = raw.get(i + 2..i + 4).unwrap_or(b"00");
                i += 4;
                std::str::from_utf8(hex)
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .unwrap_or(0)
            }
            other => other,
        });
    }
    out
}

impl<'a> P<'a> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn next(&mut self) -> Option<u8> {
        let c = self.peek();
        self.i += 1;
        c
    }

    fn expect(&mut self, c: u8) -> Result<(), ScanError> {
        if self.next() == Some(c) {
            Ok(())
        } else {
            Err("record is not in canonical form")
        }
    }

    fn value(&mut self, depth: usize) -> Result<(), ScanError> {
        match self.peek() {
            Some(b'"') => self.string().map(|_| ()),
            Some(b'{') => self.object(depth),
            Some(b'[') => self.array(depth),
            Some(b't') => self.literal(b"true"),
            Some(b'f') => self.literal(b"false"),
            Some(b'n') => self.literal(b"null"),
            Some(b'-' | b'0'..=b'9') => self.integer(),
            _ => Err("record is not in canonical form"),
        }
    }

    fn literal(&mut self, lit: &[u8]) -> Result<(), ScanError> {
        if self.b[self.i..].starts_with(lit) {
            self.i += lit.len();
            Ok(())
        } else {
            Err("record is not in canonical form")
        }
    }

    /// `0`, or an optional `-` and digits without a leading zero, within u64 / i64.
    fn integer(&mut self) -> Result<(), ScanError> {
        let start = self.i;
        let neg = self.peek() == Some(b'-');
        if neg {
            self.i += 1;
        }
        let digits = self.i;
        while self.peek().is_some_and(|c| c.is_ascii_digit()) {
            self.i += 1;
        }
        let d = &self.b[digits..self.i];
        let bad = d.is_empty()
            || (d[0] == b'0' && (d.len() > 1 || neg))
            || matches!(self.peek(), Some(b'.' | b'e' | b'E'));
        if bad {
            return Err("record is not canonical: numbers must be plain integers");
        }
        let text = std::str::from_utf8(&self.b[start..self.i]).unwrap_or("x");
        let fits = if neg {
            text.parse::<i64>().is_ok()
        } else {
            text.parse::<u64>().is_ok()
        };
        if fits {
            Ok(())
        } else {
            Err("record is not canonical: integer out of range")
        }
    }

    fn enter_level(depth: usize) -> Result<(), ScanError> {
        if depth >= MAX_LEVELS {
            return Err("record is not canonical: nesting deeper than 32 levels");
        }
        Ok(())
    }

    fn array(&mut self, depth: usize) -> Result<(), ScanError> {
        Self::enter_level(depth)?;
        self.expect(b'[')?;
        if self.peek() == Some(b']') {
            self.i += 1;
            return Ok(());
        }
        loop {
            self.value(depth + 1)?;
            match self.next() {
                Some(b',') => {}
                Some(b']') => return Ok(()),
                _ => return Err("record is not in canonical form"),
            }
        }
    }

    fn object(&mut self, depth: usize) -> Result<(), ScanError> {
        Self::enter_level(depth)?;
        self.expect(b'{')?;
        if self.peek() == Some(b'}') {
            self.i += 1;
            return Ok(());
        }
        let mut last: Option<&[u8]> = None;
        loop {
            let key = self.string()?;
            if last.is_some_and(|k| !key_less(k, key)) {
                return Err("record is not in canonical form (keys not sorted or repeated)");
            }
            last = Some(key);
            self.expect(b':')?;
            self.value(depth + 1)?;
            match self.next() {
                Some(b',') => {}
                Some(b'}') => return Ok(()),
                _ => return Err("record is not in canonical form"),
            }
        }
    }

    /// A string with canonical escapes; returns its raw (escaped) content. Keys compare
    /// correctly in raw form only when they have no escapes, so a key with an escape is
    /// compared by its decoded bytes below.
    fn string(&mut self) -> Result<&'a [u8], ScanError> {
        self.expect(b'"')?;
        let start = self.i;
        loop {
            match self.next() {
                None => return Err("unterminated string"),
                Some(b'"') => return Ok(&self.b[start..self.i - 1]),
                Some(b'\\') => self.escape()?,
                Some(c) if c < 0x20 => {
                    return Err("record is not canonical: raw control character")
                }
                Some(_) => {}
            }
        }
    }

    fn escape(&mut self) -> Result<(), ScanError> {
        match self.next() {
            Some(b'"' | b'\\' | b'b' | b'f' | b'n' | b'r' | b't') => Ok(()),
            Some(b'u') => {
                let h = self
                    .b
                    .get(self.i..self.i + 4)
                    .ok_or("unterminated string")?;
                self.i += 4;
                let lower_hex = |c: u8| c.is_ascii_digit() || (b'a'..=b'f').contains(&c);
                let ok = h[0] == b'0'
                    && h[1] == b'0'
                    && (h[2] == b'0' || h[2] == b'1')
                    && lower_hex(h[3])
                    && !matches!((h[2], h[3]), (b'0', b'8' | b'9' | b'a' | b'c' | b'd'));
                if ok {
                    Ok(())
                } else {
                    Err("record is not canonical: escape not in minimal form")
                }
            }
            _ => Err("record is not canonical: invalid escape"),
        }
    }

    /// A string that must not contain escapes (hex digests).
    fn plain_string(&mut self) -> Result<&'a str, ScanError> {
        let s = self.string()?;
        if s.contains(&b'\\') {
            return Err("seal contains an escape");
        }
        std::str::from_utf8(s).map_err(|_| "seal is not UTF-8")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: &str = "0000000000000000000000000000000000000000000000000000000000000000";

    fn line(body: &str) -> String {
        format!("{},\"hash\":\"{H}\"}}", &body[..body.len() - 1])
    }

    #[test]
    fn accepts_canonical_and_extracts_header() {
        let l = line(
            r#"{"a":[1,-2,{"x":null}],"chain":"p1-t2","kind":"rotate","prev_seq":7,"s":"q\"\u001f\n","seq":8,"v":1}"#,
        );
        let r = scan(l.as_bytes()).unwrap();
        assert_eq!(r.kind, Some("rotate"));
        assert_eq!(r.seq, Some(8));
        assert_eq!(r.prev_seq, Some(7));
        assert_eq!(r.hash, H);
        assert_eq!(r.mac, None);
        assert!(l.as_bytes().starts_with(r.body_open));
    }

    #[test]
    fn refuses_non_canonical_forms() {
        for body in [
            r#"{"b":1,"a":2}"#,
            r#"{"a":1,"a":1}"#,
            r#"{"a":1,"mac":"00"}"#,
            r#"{"a": 1}"#,
            r#"{"a":1.0}"#,
            r#"{"a":01}"#,
            r#"{"a":-0}"#,
            r#"{"a":"\u0041"}"#,
            r#"{"a":"\u000a"}"#,
            r#"{"a":"\/"}"#,
            r#"{"a":18446744073709551616}"#,
            r#"{"a":[1,]}"#,
        ] {
            assert!(scan(line(body).as_bytes()).is_err(), "{body}");
        }
        assert!(scan(br#"{"a":1}"#).is_err());
        assert!(scan(format!("{},\"x\":1", line(r#"{"a":1}"#)).as_bytes()).is_err());
    }

    #[test]
    fn escaped_keys_sort_by_decoded_bytes() {
        assert!(scan(line(r#"{"\n":1,"A":2}"#).as_bytes()).is_ok());
        assert!(scan(line(r#"{"A":2,"\n":1}"#).as_bytes()).is_err());
    }
}

//! Verification of every chain in a directory: the code behind `kvh verify-log`.
//!
//! Per record: JSON, canonical form, schema version, chain id, seq continuity, `prev`
//! linkage, hash, epoch, MAC (with the key ratcheted to the file's epoch); per file: index
//! continuity and the `rotate` link to the previous file; per chain: signed checkpoints
//! (the record at the checkpoint's seq must exist and carry its hash). The first problem of
//! a chain is reported as `file:line: reason` and ends that chain's check.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use ed25519_dalek::VerifyingKey;
use serde::Serialize;
use serde_json::{Map, Value};
use zeroize::Zeroizing;

use super::checkpoint::{self, Checkpoint};
use super::files;
use super::keys::EpochKey;
use super::record::{chain_hash, hex, mac_of, parse_hash, write_canonical, GENESIS_PREV};

/// What to verify with.
#[derive(Default)]
pub struct VerifyOptions {
    /// The HMAC secret (epoch-0 key); MACs are only checked when it is given.
    pub hmac_secret: Option<Zeroizing<Vec<u8>>>,
    /// Pinned Ed25519 public key of the checkpoints.
    pub public_key: Option<VerifyingKey>,
    /// Checkpoint files (or directories of them) to check against.
    pub checkpoints: Vec<PathBuf>,
    /// Print per-file progress on stderr.
    pub progress: bool,
}

/// The first bad record of a chain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Problem {
    pub file: String,
    pub line: u64,
    pub reason: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}: {}", self.file, self.line, self.reason)
    }
}

/// The result for one chain.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ChainReport {
    pub chain: String,
    pub files: usize,
    pub records: u64,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    pub first_ts: Option<u64>,
    pub last_ts: Option<u64>,
    /// A `stop` record ends the chain (the writer shut down cleanly).
    pub closed: bool,
    /// Bytes after the last newline of the newest file (a writer crashed mid-line).
    pub torn_bytes: u64,
    pub macs_checked: bool,
    /// Seq of the signed checkpoint that was matched, if any.
    pub checkpoint_seq: Option<u64>,
    pub problem: Option<Problem>,
}

impl ChainReport {
    pub fn ok(&self) -> bool {
        self.problem.is_none()
    }
}

/// The result for a directory.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    pub chains: Vec<ChainReport>,
    /// Problems not tied to a record (a checkpoint for a chain with no files, a forged
    /// checkpoint).
    pub errors: Vec<String>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.errors.is_empty() && self.chains.iter().all(ChainReport::ok)
    }

    /// 0 when everything verified, 1 when tampering or corruption was found.
    pub fn exit_code(&self) -> i32 {
        if self.ok() {
            0
        } else {
            1
        }
    }

    /// The first problem found, for messages and tests.
    pub fn first_problem(&self) -> Option<&Problem> {
        self.chains.iter().find_map(|c| c.problem.as_ref())
    }
}

/// A usage or I/O error (exit 2): nothing could be concluded about the log.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct VerifyError(pub String);

/// Verifies every chain found in `dir`.
pub fn verify_all(dir: &Path, opts: &VerifyOptions) -> Result<Report, VerifyError> {
    let chains = files::list_chains(dir)
        .map_err(|e| VerifyError(format!("{}: cannot list: {e}", dir.display())))?;
    let mut report = Report::default();
    let mut ckpts = load_checkpoints(opts, &mut report)?;
    let total = chains.len();
    for (i, (chain, list)) in chains.iter().enumerate() {
        if opts.progress {
            eprintln!("verify-log: chain {}/{total}: {chain}", i + 1);
        }
        let ckpt = ckpts.remove(chain);
        report
            .chains
            .push(verify_chain(chain, list, opts, ckpt.as_ref())?);
    }
    for (chain, c) in ckpts {
        report.errors.push(format!(
            "checkpoint for chain {chain} (seq {}, file {}) but no file of that chain in {}: \
             files deleted",
            c.seq,
            c.file,
            dir.display()
        ));
    }
    Ok(report)
}

/// Reads the checkpoints; a bad signature is tampering, an unreadable file a usage error.
fn load_checkpoints(
    opts: &VerifyOptions,
    report: &mut Report,
) -> Result<BTreeMap<String, Checkpoint>, VerifyError> {
    let mut out = BTreeMap::new();
    if opts.checkpoints.is_empty() {
        return Ok(out);
    }
    let key = opts
        .public_key
        .as_ref()
        .ok_or_else(|| VerifyError("--checkpoint needs --public-key".into()))?;
    for p in &opts.checkpoints {
        let found =
            checkpoint::find(p).map_err(|e| VerifyError(format!("{}: {e}", p.display())))?;
        for f in found {
            if !f.exists() {
                return Err(VerifyError(format!("{}: no such checkpoint", f.display())));
            }
            match checkpoint::read(&f, key) {
                Ok(c) => {
                    out.insert(c.chain.clone(), c);
                }
                Err(e) => report.errors.push(e),
            }
        }
    }
    Ok(out)
}

/// Walk state of one chain.
struct Walk<'a> {
    chain: &'a str,
    key: Option<EpochKey>,
    next_seq: u64,
    prev: [u8; 32],
    prev_file: Option<String>,
    ckpt: Option<&'a Checkpoint>,
    /// Index of the last file checked.
    cur_index: u64,
    report: ChainReport,
}

fn verify_chain(
    chain: &str,
    list: &[(u64, PathBuf)],
    opts: &VerifyOptions,
    ckpt: Option<&Checkpoint>,
) -> Result<ChainReport, VerifyError> {
    let key = match &opts.hmac_secret {
        Some(s) => Some(
            EpochKey::from_secret(s.clone())
                .map_err(|e| VerifyError(format!("--key-file: {e}")))?,
        ),
        None => None,
    };
    let mut w = Walk {
        chain,
        cur_index: 0,
        key,
        next_seq: 0,
        prev: GENESIS_PREV,
        prev_file: None,
        ckpt,
        report: ChainReport {
            chain: chain.to_string(),
            files: list.len(),
            macs_checked: opts.hmac_secret.is_some(),
            ..Default::default()
        },
    };
    let mut last_line = (String::new(), 0u64);
    for (pos, (index, path)) in list.iter().enumerate() {
        let name = files::file_name(chain, *index);
        if opts.progress {
            eprintln!("verify-log:   {}", path.display());
        }
        let bytes = fs::read(path).map_err(|e| VerifyError(format!("{}: {e}", path.display())))?;
        let is_last = pos + 1 == list.len();
        match w.file(&name, *index, &bytes, is_last) {
            Ok(lines) => last_line = (name, lines),
            Err(p) => {
                w.report.problem = Some(p);
                return Ok(w.report);
            }
        }
    }
    if let Some(c) = ckpt {
        if w.report.checkpoint_seq.is_none() {
            let last = w
                .report
                .last_seq
                .map_or("no record".into(), |s| format!("seq {s}"));
            w.report.problem = Some(Problem {
                file: last_line.0,
                line: last_line.1 + 1,
                reason: format!(
                    "chain ends at {last} but the signed checkpoint covers seq {} in {}: \
                     records truncated or newest files deleted",
                    c.seq, c.file
                ),
            });
        }
    }
    Ok(w.report)
}

impl Walk<'_> {
    /// Checks one file; returns its number of complete lines.
    fn file(
        &mut self,
        name: &str,
        index: u64,
        bytes: &[u8],
        is_last: bool,
    ) -> Result<u64, Problem> {
        let bad = |line: u64, reason: String| Problem {
            file: name.to_string(),
            line,
            reason,
        };
        let expected_index = self.prev_file.as_ref().map_or(0, |_| self.cur_index + 1);
        if index != expected_index {
            let reason = if self.prev_file.is_none() {
                format!("chain starts at file index {index}: files 0..{index} are missing")
            } else {
                format!(
                    "file index jumps from {} to {index}: rotated file(s) missing",
                    expected_index - 1
                )
            };
            return Err(bad(1, reason));
        }
        if let Some(k) = self.key.as_mut() {
            k.advance_to(index);
        }
        let mut lines = 0u64;
        let mut rest = bytes;
        while !rest.is_empty() {
            let Some(nl) = rest.iter().position(|&b| b == b'\n') else {
                if is_last {
                    self.report.torn_bytes = rest.len() as u64;
                    break;
                }
                return Err(bad(lines + 1, "unterminated line in a rotated file".into()));
            };
            lines += 1;
            let first_in_file = lines == 1;
            self.record(&rest[..nl], index, first_in_file)
                .map_err(|r| bad(lines, r))?;
            rest = &rest[nl + 1..];
        }
        if lines == 0 && !is_last {
            return Err(bad(1, "empty rotated file".into()));
        }
        self.prev_file = Some(name.to_string());
        self.cur_index = index;
        Ok(lines)
    }

    fn record(&mut self, line: &[u8], index: u64, first_in_file: bool) -> Result<(), String> {
        let v: Value = serde_json::from_slice(line).map_err(|e| format!("malformed JSON: {e}"))?;
        let Value::Object(mut m) = v else {
            return Err("record is not a JSON object".into());
        };
        let hash_hex = take_str(&mut m, "hash")?.ok_or("record has no hash")?;
        let mac_hex = take_str(&mut m, "mac")?;
        let body = canonical_body(&m)?;
        check_line_form(line, &body, &hash_hex, mac_hex.as_deref())?;
        self.header(&m, index)?;
        let hash = chain_hash(&self.prev, &body);
        if parse_hash(&hash_hex) != Some(hash) {
            return Err("hash mismatch: record modified".into());
        }
        self.mac(&hash, mac_hex.as_deref())?;
        if let Some(c) = self
            .ckpt
            .filter(|c| c.seq == self.next_seq && c.hash != hash)
        {
            return Err(format!(
                "record differs from the signed checkpoint at seq {}: chain rewritten",
                c.seq
            ));
        }
        self.position(&m, first_in_file)?;
        self.accept(&m, hash);
        Ok(())
    }

    /// Schema version, chain id, epoch, seq and prev.
    fn header(&self, m: &Map<String, Value>, index: u64) -> Result<(), String> {
        if m.get("v").and_then(Value::as_u64) != Some(1) {
            return Err("unsupported or missing schema version v".into());
        }
        let chain = m
            .get("chain")
            .and_then(Value::as_str)
            .ok_or("record has no chain")?;
        if chain != self.chain {
            return Err(format!(
                "record belongs to chain {chain}, not {}: spliced from another chain",
                self.chain
            ));
        }
        if m.get("epoch").and_then(Value::as_u64) != Some(index) {
            return Err(format!("epoch is not the file's index {index}"));
        }
        let seq = m
            .get("seq")
            .and_then(Value::as_u64)
            .ok_or("record has no seq")?;
        if seq != self.next_seq {
            return Err(format!(
                "seq {seq}, expected {}: records deleted, duplicated or reordered",
                self.next_seq
            ));
        }
        let prev = m
            .get("prev")
            .and_then(Value::as_str)
            .ok_or("record has no prev")?;
        if prev != hex(&self.prev) {
            return Err("prev is not the previous record's hash".into());
        }
        m.get("ts")
            .and_then(Value::as_u64)
            .ok_or("record has no ts")?;
        m.get("kind")
            .and_then(Value::as_str)
            .ok_or("record has no kind")?;
        Ok(())
    }

    fn mac(&self, hash: &[u8; 32], mac_hex: Option<&str>) -> Result<(), String> {
        let Some(k) = &self.key else { return Ok(()) };
        let mac = mac_hex.ok_or("record has no mac but a key was given")?;
        if mac != hex(&mac_of(k, hash)) {
            return Err(format!(
                "MAC mismatch at epoch {}: wrong key or forged record",
                k.epoch()
            ));
        }
        Ok(())
    }

    /// `start` opens file 0, `rotate` opens every later file and links to the previous one,
    /// nothing follows `stop`.
    fn position(&self, m: &Map<String, Value>, first_in_file: bool) -> Result<(), String> {
        let kind = m.get("kind").and_then(Value::as_str).unwrap_or("");
        if self.report.closed {
            return Err("record after the chain's stop record".into());
        }
        if !first_in_file {
            if kind == "start" || kind == "rotate" {
                return Err(format!("{kind} record in the middle of a file"));
            }
            return Ok(());
        }
        let Some(prev_name) = self.prev_file.as_deref() else {
            if kind != "start" {
                return Err(format!("chain starts with a {kind} record, not start"));
            }
            return Ok(());
        };
        if kind != "rotate" {
            return Err(format!("file starts with a {kind} record, not rotate"));
        }
        let pf = m.get("prev_file").and_then(Value::as_str);
        if pf != Some(prev_name) {
            return Err(format!(
                "rotate record links to {}, but the previous file is {prev_name}",
                pf.unwrap_or("nothing")
            ));
        }
        if m.get("prev_seq").and_then(Value::as_u64) != self.next_seq.checked_sub(1) {
            return Err("rotate record's prev_seq is not the previous file's last seq".into());
        }
        Ok(())
    }

    fn accept(&mut self, m: &Map<String, Value>, hash: [u8; 32]) {
        let seq = self.next_seq;
        let ts = m.get("ts").and_then(Value::as_u64).unwrap_or(0);
        let r = &mut self.report;
        r.records += 1;
        r.first_seq.get_or_insert(seq);
        r.last_seq = Some(seq);
        r.first_ts = Some(r.first_ts.map_or(ts, |t| t.min(ts)));
        r.last_ts = Some(r.last_ts.map_or(ts, |t| t.max(ts)));
        if m.get("kind").and_then(Value::as_str) == Some("stop") {
            r.closed = true;
        }
        if let Some(c) = self.ckpt.filter(|c| c.seq == seq && c.hash == hash) {
            r.checkpoint_seq = Some(c.seq);
        }
        self.next_seq += 1;
        self.prev = hash;
    }
}

fn take_str(m: &mut Map<String, Value>, k: &str) -> Result<Option<String>, String> {
    match m.remove(k) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(format!("{k} is not a string")),
    }
}

fn canonical_body(m: &Map<String, Value>) -> Result<Vec<u8>, String> {
    let mut body = Vec::with_capacity(512);
    write_canonical(&Value::Object(m.clone()), &mut body)
        .map_err(|e| format!("record is not canonical: {}", e.0))?;
    Ok(body)
}

/// The line must be exactly the canonical body with the seal appended.
fn check_line_form(line: &[u8], body: &[u8], hash: &str, mac: Option<&str>) -> Result<(), String> {
    let mut expect = Vec::with_capacity(body.len() + 160);
    expect.extend_from_slice(&body[..body.len() - 1]);
    expect.extend_from_slice(b",\"hash\":\"");
    expect.extend_from_slice(hash.as_bytes());
    expect.push(b'"');
    if let Some(m) = mac {
        expect.extend_from_slice(b",\"mac\":\"");
        expect.extend_from_slice(m.as_bytes());
        expect.push(b'"');
    }
    expect.push(b'}');
    if expect != line {
        return Err("record is not in canonical form".into());
    }
    Ok(())
}

/// `YYYY-MM-DDTHH:MM:SS.nnnnnnnnnZ` of Unix nanoseconds (proleptic Gregorian, UTC).
pub fn rfc3339(ns: u64) -> String {
    let secs = ns / 1_000_000_000;
    let days = secs / 86_400;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:09}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        ns % 1_000_000_000
    )
}

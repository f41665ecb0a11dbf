//! Crash recovery: finding a chain whose writer died and the state to continue it from.
//!
//! A live writer holds an exclusive `flock` on its active (newest) file and keeps the lock
//! on the previous file until the next one exists, so a file we manage to lock, that is
//! still its chain's newest, and whose last record is not `stop`, belongs to a dead writer.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::files;
use super::keys::EpochKey;
use super::record::{mac_of, parse_hash};
use super::ForensicError;

/// A crashed chain, locked by us, ready to continue.
pub struct Adopted {
    pub chain: String,
    pub index: u64,
    pub path: PathBuf,
    pub file: File,
    /// Length after the torn tail was cut.
    pub len: u64,
    pub torn_bytes: u64,
    pub last_seq: u64,
    pub last_hash: [u8; 32],
    /// The crash came after the newest file was created and before its `rotate` record:
    /// the name of the previous file, which the continuation must link to first.
    pub link_from: Option<String>,
}

/// Where a dead writer's chain stands.
struct Head {
    tail: Tail,
    /// Index of the file holding `tail`.
    tail_index: u64,
    /// Bytes of the newest file to cut.
    torn: usize,
    link_from: Option<String>,
}

/// The last complete record of the chain: in the newest file, or, when that file holds no
/// complete line yet, at the end of the previous one (which rotation left complete).
fn chain_head(chain: &str, index: u64, bytes: &[u8], path: &Path) -> Option<Head> {
    if let Some(tail) = last_record(bytes) {
        let torn = tail.torn;
        return Some(Head {
            tail,
            tail_index: index,
            torn,
            link_from: None,
        });
    }
    let prev_index = index.checked_sub(1)?;
    let prev_name = files::file_name(chain, prev_index);
    let prev_bytes = std::fs::read(path.with_file_name(&prev_name)).ok()?;
    let tail = last_record(&prev_bytes).filter(|t| t.torn == 0)?;
    Some(Head {
        tail,
        tail_index: prev_index,
        torn: bytes.len(),
        link_from: Some(prev_name),
    })
}

/// Finds and locks a crashed chain in `dir` that the key (or its absence) can continue.
/// Files with a wrong owner or mode, or planted symlinks, are refused with an error.
pub fn adopt(dir: &Path, key: Option<&mut EpochKey>) -> Result<Option<Adopted>, ForensicError> {
    let chains = files::list_chains(dir).map_err(|e| files::io_err(dir, "cannot list", e))?;
    let mut key = key;
    for (chain, list) in chains.iter().rev() {
        let Some((index, path)) = list.last() else {
            continue;
        };
        let mut file = files::open_existing(path)?;
        if !files::try_lock(&file) {
            continue; // a live writer
        }
        // Re-list: a writer rotating right now creates its next file before unlocking this one.
        let newest = files::list_chains(dir)
            .ok()
            .and_then(|c| c.into_iter().find(|(c, _)| c == chain))
            .and_then(|(_, l)| l.last().map(|(i, _)| *i));
        if newest != Some(*index) {
            continue;
        }
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)
            .map_err(|e| files::io_err(path, "cannot read", e))?;
        let Some(head) = chain_head(chain, *index, &bytes, path) else {
            continue;
        };
        if !continuable(&head.tail.record, head.tail_index, key.as_deref_mut()) {
            continue;
        }
        if let Some(k) = key.as_deref_mut() {
            k.advance_to(*index);
        }
        let len = (bytes.len() - head.torn) as u64;
        file.set_len(len)
            .map_err(|e| files::io_err(path, "cannot cut the torn tail", e))?;
        return Ok(Some(Adopted {
            chain: chain.clone(),
            index: *index,
            path: path.clone(),
            file,
            len,
            torn_bytes: head.torn as u64,
            last_seq: head.tail.seq,
            last_hash: head.tail.hash,
            link_from: head.link_from,
        }));
    }
    Ok(None)
}

struct Tail {
    record: Value,
    seq: u64,
    hash: [u8; 32],
    /// Bytes after the last newline.
    torn: usize,
}

/// The last complete line of a file and the size of the torn fragment after it.
fn last_record(bytes: &[u8]) -> Option<Tail> {
    let end = bytes.iter().rposition(|&b| b == b'\n')?;
    let torn = bytes.len() - end - 1;
    let start = bytes[..end]
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1);
    let record: Value = serde_json::from_slice(&bytes[start..end]).ok()?;
    let seq = record.get("seq")?.as_u64()?;
    let hash = parse_hash(record.get("hash")?.as_str()?)?;
    Some(Tail {
        record,
        seq,
        hash,
        torn,
    })
}

/// A chain is continued only if it is not closed and its last MAC matches our key at that
/// record's epoch (or neither side uses a key): one writer never mixes secrets in a chain.
fn continuable(last: &Value, index: u64, key: Option<&mut EpochKey>) -> bool {
    if last.get("kind").and_then(Value::as_str) == Some("stop") {
        return false;
    }
    let mac = last.get("mac").and_then(Value::as_str);
    let hash = last
        .get("hash")
        .and_then(Value::as_str)
        .and_then(parse_hash);
    match (key, mac, hash) {
        (None, None, _) => true,
        (Some(k), Some(m), Some(h)) if k.epoch() <= index => {
            // Check with a scratch copy of the ratchet state: if the MAC does not match we
            // must keep our epoch-0 key for a fresh chain.
            let mut probe = k.clone_for_probe();
            probe.advance_to(index);
            super::record::hex(&mac_of(&probe, &h)) == m
        }
        _ => false,
    }
}

//! Tamper suite: each manipulation is detected and reported at the right `file:line`.

mod forensic_common;

use std::fs;
use std::path::{Path, PathBuf};

use forensic_common::*;
use kvhygiene::forensic::keys::{read_public_key, EpochKey};
use kvhygiene::forensic::{Report, SealKey, VerifyOptions};
use serde_json::Value;

/// A keyed, signed log of several files; returns (log dir, checkpoint dir, public key file).
fn signed_log(tmp: &tempfile::TempDir) -> (PathBuf, PathBuf, PathBuf) {
    let dir = log_dir(tmp);
    let ck = tmp.path().join("ckpt");
    let (key, public) = kvhygiene::forensic::cli::keygen(&tmp.path().join("signer")).unwrap();
    let mut c = cfg(&dir, 16 * 1024);
    c.signing_key_file = Some(key);
    c.checkpoint_dir = Some(ck.clone());
    write_log(&c, 300, true);
    assert!(chain_files(&dir).len() >= 4);
    (dir, ck, public)
}

fn with_checkpoint(ck: &Path, public: &Path) -> VerifyOptions {
    VerifyOptions {
        hmac_keys: vec![SealKey::new("hmac.key", secret())],
        public_keys: vec![read_public_key(public).unwrap()],
        checkpoints: vec![ck.to_path_buf()],
        ..VerifyOptions::default()
    }
}

fn keyed_log(tmp: &tempfile::TempDir) -> (PathBuf, Vec<PathBuf>) {
    let dir = log_dir(tmp);
    write_log(&cfg(&dir, 16 * 1024), 300, true);
    let files = chain_files(&dir);
    assert!(files.len() >= 3);
    (dir, files)
}

#[test]
fn flipped_byte_is_reported_at_its_line() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, files) = keyed_log(&tmp);
    let mut lines = read_lines(&files[1]);
    // Change one digit of a value: still valid canonical JSON, so the hash catches it.
    lines[4] = lines[4].replacen("\"capacity\":4096", "\"capacity\":4097", 1);
    write_lines(&files[1], &lines);
    assert_problem(
        &verify(&dir, &keyed_opts()),
        &name(&files[1]),
        5,
        "hash mismatch",
    );
}

#[test]
fn flipped_byte_anywhere_is_detected_without_a_key() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = log_dir(&tmp);
    write_log(&cfg(&dir, 1 << 20), 20, false);
    let f = &chain_files(&dir)[0];
    let orig = fs::read(f).unwrap();
    let line_of = |pos: usize| orig[..pos].iter().filter(|&&b| b == b'\n').count() as u64 + 1;
    for pos in (0..orig.len()).step_by(97) {
        if orig[pos] == b'\n' {
            continue;
        }
        let mut b = orig.clone();
        b[pos] ^= 0x04;
        fs::write(f, &b).unwrap();
        let r = verify(&dir, &Default::default());
        let p = r
            .first_problem()
            .unwrap_or_else(|| panic!("flip at {pos} undetected"));
        assert_eq!(p.line, line_of(pos), "flip at {pos}: {p}");
    }
}

#[test]
fn deleted_record_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, files) = keyed_log(&tmp);
    let mut lines = read_lines(&files[1]);
    lines.remove(6);
    write_lines(&files[1], &lines);
    assert_problem(&verify(&dir, &keyed_opts()), &name(&files[1]), 7, "seq");
}

#[test]
fn swapped_records_are_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, files) = keyed_log(&tmp);
    let mut lines = read_lines(&files[0]);
    lines.swap(10, 11);
    write_lines(&files[0], &lines);
    assert_problem(&verify(&dir, &keyed_opts()), &name(&files[0]), 11, "seq");
}

#[test]
fn duplicated_record_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, files) = keyed_log(&tmp);
    let mut lines = read_lines(&files[2]);
    let dup = lines[3].clone();
    lines.insert(4, dup);
    write_lines(&files[2], &lines);
    assert_problem(&verify(&dir, &keyed_opts()), &name(&files[2]), 5, "seq");
}

#[test]
fn truncated_tail_is_detected_with_a_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, ck, public) = signed_log(&tmp);
    let files = chain_files(&dir);
    let last = files.last().unwrap();
    let mut lines = read_lines(last);
    let cut = (lines.len() - 1).min(3);
    assert!(cut > 0);
    lines.truncate(lines.len() - cut);
    let kept = lines.len() as u64;
    write_lines(last, &lines);
    // Without the checkpoint, a clean cut at a line boundary is indistinguishable from an
    // unfinished chain...
    assert!(verify(&dir, &keyed_opts()).ok());
    // ...with it, the cut is found.
    let r = verify(&dir, &with_checkpoint(&ck, &public));
    assert_problem(&r, &name(last), kept + 1, "truncated");
}

#[test]
fn deleted_middle_file_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, files) = keyed_log(&tmp);
    fs::remove_file(&files[1]).unwrap();
    assert_problem(&verify(&dir, &keyed_opts()), &name(&files[2]), 1, "missing");
    fs::remove_file(&files[0]).unwrap();
    assert_problem(&verify(&dir, &keyed_opts()), &name(&files[2]), 1, "missing");
}

#[test]
fn deleted_newest_file_is_detected_with_a_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, ck, public) = signed_log(&tmp);
    let files = chain_files(&dir);
    fs::remove_file(files.last().unwrap()).unwrap();
    let prev = &files[files.len() - 2];
    let n = read_lines(prev).len() as u64;
    let r = verify(&dir, &with_checkpoint(&ck, &public));
    assert_problem(&r, &name(prev), n + 1, "newest files deleted");
    // Deleting every file leaves the checkpoint pointing at nothing.
    for f in &files {
        let _ = fs::remove_file(f);
    }
    let r = verify(&dir, &with_checkpoint(&ck, &public));
    assert!(!r.ok());
    assert!(r.errors[0].contains("files deleted"), "{:?}", r.errors);
}

#[test]
fn record_spliced_from_another_chain_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = log_dir(&tmp);
    let c = cfg(&dir, 1 << 20);
    write_log(&c, 20, true);
    write_log(&c, 20, true);
    let files = chain_files(&dir);
    assert_eq!(files.len(), 2);
    let donor = read_lines(&files[1]);
    let mut lines = read_lines(&files[0]);
    lines[5] = donor[5].clone(); // same seq, valid hash and MAC in its own chain
    write_lines(&files[0], &lines);
    assert_problem(
        &verify(&dir, &keyed_opts()),
        &name(&files[0]),
        6,
        "another chain",
    );
}

#[test]
fn wrong_key_is_reported_at_the_first_record() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, files) = keyed_log(&tmp);
    let opts = VerifyOptions {
        hmac_keys: vec![SealKey::new(
            "wrong.key",
            zeroize::Zeroizing::new(b"not-the-right-secret-at-all".to_vec()),
        )],
        ..Default::default()
    };
    assert_problem(&verify(&dir, &opts), &name(&files[0]), 1, "MAC mismatch");
}

#[test]
fn recomputed_hashes_without_the_key_fail_the_mac() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, files) = keyed_log(&tmp);
    forge_from(&files, 1, 3, None, |m| {
        m.insert("tenant_id".into(), Value::String("someone-else".into()));
    });
    assert_problem(&verify(&dir, &keyed_opts()), &name(&files[1]), 3, "no mac");
}

/// An attacker steals the key of epoch 2 from the running process and rewrites history
/// from there on: files before epoch 2 still verify as authentic, the forged records carry
/// valid MACs, and the signed checkpoint exposes them. Going back is impossible: the stolen
/// key does not produce epoch 1's MACs.
#[test]
fn stolen_epoch_key_cannot_forge_earlier_files_and_forgery_fails_the_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, ck, public) = signed_log(&tmp);
    let files = chain_files(&dir);
    let stolen = || {
        let mut k = EpochKey::from_secret(secret()).unwrap();
        k.advance_to(2);
        k
    };
    forge_from(&files, 2, 4, Some(stolen()), |m| {
        m.insert("request_id".into(), Value::String("innocent".into()));
    });
    // MACs all check out: the forgery is only visible against the checkpoint.
    let r = verify(&dir, &keyed_opts());
    assert!(r.ok(), "{r:?}");
    let r = verify(&dir, &with_checkpoint(&ck, &public));
    let last = files.last().unwrap();
    let n = read_lines(last).len() as u64;
    assert_problem(&r, &name(last), n, "signed checkpoint");

    // The same key used on an earlier file fails at once.
    let tmp2 = tempfile::tempdir().unwrap();
    let (dir2, _, _) = signed_log(&tmp2);
    let files2 = chain_files(&dir2);
    forge_from(&files2[..2], 1, 2, Some(stolen()), |m| {
        m.insert("request_id".into(), Value::String("innocent".into()));
    });
    assert_problem(
        &verify(&dir2, &keyed_opts()),
        &name(&files2[1]),
        2,
        "MAC mismatch",
    );
}

#[test]
fn forged_checkpoint_signature_is_tampering() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, ck, public) = signed_log(&tmp);
    let ckpt = fs::read_dir(&ck).unwrap().next().unwrap().unwrap().path();
    let text = fs::read_to_string(&ckpt).unwrap();
    fs::write(&ckpt, text.replacen("\"seq\":", "\"seq\":1", 1)).unwrap();
    let r = verify(&dir, &with_checkpoint(&ck, &public));
    assert_eq!(r.exit_code(), 1);
    assert!(r.errors[0].contains("signature"), "{:?}", r.errors);
}

#[test]
fn deleted_checkpoint_fails_the_chain_when_a_key_is_pinned() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, ck, public) = signed_log(&tmp);
    for f in fs::read_dir(&ck).unwrap() {
        fs::remove_file(f.unwrap().path()).unwrap();
    }
    let r = verify(&dir, &with_checkpoint(&ck, &public));
    assert_eq!(r.exit_code(), 1, "{r:?}");
    let p = r.first_problem().unwrap();
    assert!(p.reason.contains("no checkpoint for chain"), "{p}");
    assert_eq!(p.file, name(chain_files(&dir).last().unwrap()));
}

#[test]
fn two_checkpoints_for_one_chain_are_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, ck, public) = signed_log(&tmp);
    let other = tmp.path().join("ckpt2");
    fs::create_dir(&other).unwrap();
    for f in fs::read_dir(&ck).unwrap() {
        let p = f.unwrap().path();
        fs::copy(&p, other.join(p.file_name().unwrap())).unwrap();
    }
    let mut opts = with_checkpoint(&ck, &public);
    opts.checkpoints.push(other);
    let r = verify(&dir, &opts);
    assert_eq!(r.exit_code(), 1, "{r:?}");
    assert!(
        r.errors.iter().any(|e| e.contains("a second checkpoint")),
        "{r:?}"
    );
    // The same directory named twice is one set of files, not a duplicate.
    let mut opts = with_checkpoint(&ck, &public);
    opts.checkpoints.push(ck.clone());
    assert!(verify(&dir, &opts).ok());
}

/// An unkeyed log of several files (anyone can recompute its hashes); returns its directory
/// and files.
fn unkeyed_log(tmp: &tempfile::TempDir) -> (PathBuf, Vec<PathBuf>) {
    let dir = log_dir(tmp);
    write_log(&cfg(&dir, 16 * 1024), 300, false);
    let files = chain_files(&dir);
    assert!(files.len() >= 3);
    (dir, files)
}

/// A record whose `epoch` is not its file's index is refused, even when every hash after
/// it was recomputed: the epoch names the key a record is sealed with.
#[test]
fn a_record_whose_epoch_is_not_its_files_index_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, files) = unkeyed_log(&tmp);
    forge_from(&files, 1, 3, None, |m| {
        m.insert("epoch".into(), Value::from(0u64));
    });
    assert_problem(
        &verify(&dir, &VerifyOptions::default()),
        &name(&files[1]),
        3,
        "epoch is not the file's index",
    );
}

/// A file's `rotate` record must name the previous file, even when every hash after it was
/// recomputed.
#[test]
fn a_rotate_record_naming_another_previous_file_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, files) = unkeyed_log(&tmp);
    let other = name(&files[0]).replace("000000", "000007");
    forge_from(&files, 1, 1, None, move |m| {
        assert_eq!(m["kind"], "rotate");
        m.insert("prev_file".into(), Value::String(other.clone()));
    });
    assert_problem(
        &verify(&dir, &VerifyOptions::default()),
        &name(&files[1]),
        1,
        "rotate record links to",
    );
}

/// A file's `rotate` record must carry the previous file's last seq, even when every hash
/// after it was recomputed.
#[test]
fn a_rotate_record_with_another_prev_seq_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, files) = unkeyed_log(&tmp);
    forge_from(&files, 2, 1, None, |m| {
        assert_eq!(m["kind"], "rotate");
        let prev_seq = m["prev_seq"].as_u64().unwrap();
        m.insert("prev_seq".into(), Value::from(prev_seq - 1));
    });
    assert_problem(
        &verify(&dir, &VerifyOptions::default()),
        &name(&files[2]),
        1,
        "prev_seq is not the previous file's last seq",
    );
}

/// A chain of one file holding records is not a chain whose writer died before its start
/// record: with a pinned public key, deleting its checkpoint fails it.
#[test]
fn deleted_checkpoint_of_a_single_file_chain_fails_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = log_dir(&tmp);
    let ck = tmp.path().join("ckpt");
    let (key, public) = kvhygiene::forensic::cli::keygen(&tmp.path().join("signer")).unwrap();
    let mut c = cfg(&dir, 1 << 20);
    c.signing_key_file = Some(key);
    c.checkpoint_dir = Some(ck.clone());
    write_log(&c, 10, true);
    assert_eq!(chain_files(&dir).len(), 1);
    assert!(verify(&dir, &with_checkpoint(&ck, &public)).ok());
    for f in fs::read_dir(&ck).unwrap() {
        fs::remove_file(f.unwrap().path()).unwrap();
    }
    let r = verify(&dir, &with_checkpoint(&ck, &public));
    assert_eq!(r.exit_code(), 1, "{r:?}");
    let p = r.first_problem().expect("a problem");
    assert!(p.reason.contains("no checkpoint for chain"), "{p}");
}

/// A rotated file whose last line lost its end (cut mid-line) is reported in that file, at
/// that line: only the newest file of a chain may end in a torn line.
#[test]
fn a_rotated_file_cut_mid_line_is_reported_at_that_line() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, files) = keyed_log(&tmp);
    let bytes = fs::read(&files[1]).unwrap();
    let lines = bytes.iter().filter(|&&b| b == b'\n').count() as u64;
    fs::write(&files[1], &bytes[..bytes.len() - 10]).unwrap();
    assert_problem(
        &verify(&dir, &keyed_opts()),
        &name(&files[1]),
        lines,
        "unterminated line in a rotated file",
    );
}

/// A checkpoint file rewritten out of canonical form (whitespace added) is not accepted,
/// though the signature covers the same fields.
#[test]
fn a_checkpoint_out_of_canonical_form_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, ck, public) = signed_log(&tmp);
    assert!(verify(&dir, &with_checkpoint(&ck, &public)).ok());
    let f = fs::read_dir(&ck).unwrap().next().unwrap().unwrap().path();
    let text = fs::read_to_string(&f).unwrap().replacen("\":", "\": ", 1);
    fs::write(&f, text).unwrap();
    let r = verify(&dir, &with_checkpoint(&ck, &public));
    assert_eq!(r.exit_code(), 1, "{r:?}");
    assert!(
        r.errors.iter().any(|e| e.contains("canonical")),
        "{:?}",
        r.errors
    );
}

/// A `mac` that is not 64 lower-case hex digits is refused also without the key: the line
/// is not in canonical form.
#[test]
fn a_mac_in_upper_case_is_reported_without_a_key() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, files) = keyed_log(&tmp);
    let mut lines = read_lines(&files[1]);
    let at = lines[2].find("\"mac\":\"").unwrap() + 7;
    let upper = lines[2][at..at + 64].to_ascii_uppercase();
    assert_ne!(upper, lines[2][at..at + 64]);
    lines[2].replace_range(at..at + 64, &upper);
    write_lines(&files[1], &lines);
    assert_problem(
        &verify(&dir, &VerifyOptions::default()),
        &name(&files[1]),
        3,
        "mac is not 64 lower-case hex digits",
    );
}

/// `start` and `rotate` records only open files: one in the middle of a file is refused,
/// even when every hash after it was recomputed.
#[test]
fn a_rotate_record_in_the_middle_of_a_file_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, files) = unkeyed_log(&tmp);
    forge_from(&files, 1, 4, None, |m| {
        m.insert("kind".into(), Value::String("rotate".into()));
    });
    assert_problem(
        &verify(&dir, &VerifyOptions::default()),
        &name(&files[1]),
        4,
        "rotate record in the middle of a file",
    );
}

/// A record of another schema version is refused, though its hash was recomputed.
#[test]
fn a_record_of_another_schema_version_is_reported() {
    use sha2::{Digest, Sha256};
    let tmp = tempfile::tempdir().unwrap();
    let (dir, files) = unkeyed_log(&tmp);
    let last_file = files.last().unwrap();
    let mut lines = read_lines(last_file);
    let n = lines.len();
    let line = lines.pop().unwrap();
    let v: Value = serde_json::from_str(&line).unwrap();
    let prev = kvhygiene::forensic::record::parse_hash(v["prev"].as_str().unwrap()).unwrap();
    let body_open = line[..line.find(",\"hash\":").unwrap()].to_string();
    assert!(body_open.ends_with(",\"v\":1"), "{body_open}");
    let body_open = format!("{}2", &body_open[..body_open.len() - 1]);
    let mut h = Sha256::new();
    h.update(prev);
    h.update(body_open.as_bytes());
    h.update(b"}");
    let hash = kvhygiene::forensic::record::hex(&h.finalize());
    lines.push(format!("{body_open},\"hash\":\"{hash}\"}}"));
    write_lines(last_file, &lines);
    assert_problem(
        &verify(&dir, &VerifyOptions::default()),
        &name(last_file),
        n as u64,
        "unsupported or missing schema version",
    );
}

/// `n` arrays nested in one another: `[[...]]`, `n` levels deep.
fn nested_arrays(n: usize) -> Value {
    (1..n).fold(Value::Array(Vec::new()), |inner, _| {
        Value::Array(vec![inner])
    })
}

/// Wraps the `nested` field of line `line` (1-based) of `files[file]` in one more array, as
/// a forger writing lines by hand would (the writer refuses to), then seals that line and
/// every one after it again.
fn nest_once_more(files: &[PathBuf], file: usize, line: usize) {
    let mut lines = read_lines(&files[file]);
    let text = &lines[line - 1];
    let Value::Object(m) = serde_json::from_str::<Value>(text).unwrap() else {
        panic!("not an object: {text}")
    };
    let prev = kvhygiene::forensic::record::parse_hash(m["prev"].as_str().unwrap()).unwrap();
    let old_hash = m["hash"].as_str().unwrap().to_string();
    let body_end = text.find(",\"hash\":").unwrap();
    let body = format!("{}}}", &text[..body_end])
        .replacen("\"nested\":[", "\"nested\":[[", 1)
        .replacen("]]]", "]]]]", 1);
    let hash = kvhygiene::forensic::record::chain_hash(&prev, body.as_bytes());
    let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
    lines[line - 1] = format!("{},\"hash\":\"{hex}\"}}", &body[..body.len() - 1]);
    lines[line] = lines[line].replace(&old_hash, &hex);
    write_lines(&files[file], &lines);
    forge_from(files, file, line + 1, None, |_| {});
}

/// The canonical form allows at most 32 levels of nesting (docs/forensic-log.md, "Canonical
/// form"); a record counts as one level. A record nesting 32 levels verifies, one nesting 33
/// is out of canonical form and is reported, though its hash was recomputed: a verifier
/// written from the specification refuses it too.
#[test]
fn a_record_nested_deeper_than_32_levels_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, files) = unkeyed_log(&tmp);
    // The record is level 1; its field's arrays are levels 2 to 32.
    forge_from(&files, 1, 3, None, |m| {
        m.insert("nested".into(), nested_arrays(31));
    });
    let r = verify(&dir, &VerifyOptions::default());
    assert_eq!(r.exit_code(), 0, "32 levels: {:?}", r.first_problem());
    // Levels 2 to 33.
    nest_once_more(&files, 1, 3);
    assert_problem(
        &verify(&dir, &VerifyOptions::default()),
        &name(&files[1]),
        3,
        "32 levels",
    );
}

/// With `--allow-pruned`, a chain whose oldest files are gone and for which no prune manifest
/// exists is reported at the first file left, line 1, as it is without `--allow-pruned`:
/// the report names a file that holds the chain, not the name of a manifest that does not
/// exist.
#[test]
fn missing_oldest_files_without_a_manifest_are_reported_at_an_existing_file_with_allow_pruned() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, files) = keyed_log(&tmp);
    fs::remove_file(&files[0]).unwrap();
    fs::remove_file(&files[1]).unwrap();
    let plain = verify(&dir, &keyed_opts());
    assert_problem(&plain, &name(&files[2]), 1, "missing");
    let pruned = verify(
        &dir,
        &VerifyOptions {
            allow_pruned: true,
            ..keyed_opts()
        },
    );
    let p = pruned
        .first_problem()
        .expect("the missing files are a problem");
    assert!(
        dir.join(&p.file).exists(),
        "the problem names {}, which is not a file in the log directory: {p}",
        p.file
    );
    assert_problem(&pruned, &name(&files[2]), 1, "missing");
}

/// A chain file has one name (docs/forensic-log.md, "Files and chains": the index
/// zero-padded to six digits). A file renamed to another spelling of its index
/// (`kvh-CHAIN-0000001.jsonl`) is not the chain's file: the chain misses file 1, reported at
/// the next file that exists, and no report names a file that is not on disk.
#[test]
fn a_chain_file_renamed_to_another_spelling_of_its_index_is_missing() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, files) = keyed_log(&tmp);
    let seven = files[1].with_file_name(name(&files[1]).replace("-000001.jsonl", "-0000001.jsonl"));
    fs::rename(&files[1], &seven).unwrap();
    let r = verify(&dir, &keyed_opts());
    let p = r.first_problem().expect("file 1 is missing");
    assert!(dir.join(&p.file).exists(), "{p}");
    assert_problem(&r, &name(&files[2]), 1, "missing");
}

/// A checkpoint moved onto another chain's checkpoint name (which would leave that chain
/// without its checkpoint, unseen) is an error, as it is when found late; a copy given by a
/// name of its own is read as the chain it names.
#[test]
fn a_checkpoint_under_another_chains_name_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, ck, public) = signed_log(&tmp);
    let own = fs::read_dir(&ck).unwrap().next().unwrap().unwrap().path();
    let copy = tmp.path().join("latest.ckpt");
    fs::copy(&own, &copy).unwrap();
    let mut opts = with_checkpoint(&copy, &public);
    assert!(verify(&dir, &opts).ok(), "a copy given by its own name");
    let moved = ck.join("kvh-p1-t2.ckpt");
    fs::rename(&own, &moved).unwrap();
    opts.checkpoints = vec![ck.clone()];
    let r = verify(&dir, &opts);
    assert_eq!(r.exit_code(), 1, "{r:?}");
    assert!(
        r.errors
            .iter()
            .any(|e| e.contains("under the name of chain p1-t2")),
        "{r:?}"
    );
}

/// A chain whose checkpoint is missing gives as its reason its own checkpoint file's
/// refusal, never another file's: a refused file in a directory whose name reads like the
/// chain's checkpoint (`kvh-CHAIN.ckpt: old/`) is not that chain's checkpoint.
#[test]
fn a_chain_is_told_only_its_own_checkpoint_files_refusal() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, ck, public) = signed_log(&tmp);
    let own = fs::read_dir(&ck).unwrap().next().unwrap().unwrap().path();
    let own_name = name(&own);
    fs::remove_file(&own).unwrap();
    let lookalike = tmp.path().join(format!("{own_name}: old"));
    fs::create_dir(&lookalike).unwrap();
    fs::write(lookalike.join("kvh-p9-t9.ckpt"), "not a checkpoint\n").unwrap();
    let mut opts = with_checkpoint(&ck, &public);
    opts.checkpoints.push(lookalike);
    let r = verify(&dir, &opts);
    assert_eq!(r.exit_code(), 1, "{r:?}");
    assert!(
        r.errors.iter().any(|e| e.contains("kvh-p9-t9.ckpt: ")),
        "the malformed file is reported: {r:?}"
    );
    let p = r.first_problem().expect("the chain has no checkpoint");
    assert!(p.reason.starts_with("no checkpoint for chain"), "{p}");
    assert!(!p.reason.contains("was refused"), "{p}");
}

/// The canonical form has no duplicate keys, and a record's body is the record without
/// `hash` and `mac` (docs/forensic-log.md, "Canonical form"): a line whose body holds a
/// `mac` member of its own, before a seal that ends in another `mac`, is not in canonical
/// form and is refused, though its hash was computed over the bytes before the seal.
#[test]
fn a_record_with_a_second_mac_member_in_its_body_is_reported() {
    use kvhygiene::forensic::record::{self, write_canonical};
    let tmp = tempfile::tempdir().unwrap();
    let (dir, files) = unkeyed_log(&tmp);
    let last = files.last().unwrap();
    let mut lines = read_lines(last);
    let n = lines.len();
    let Value::Object(mut m) = serde_json::from_str::<Value>(&lines[n - 1]).unwrap() else {
        panic!("not an object")
    };
    m.remove("hash");
    let prev = record::parse_hash(m["prev"].as_str().unwrap()).unwrap();
    m.insert("mac".into(), Value::String("not a seal".into()));
    let mut body = Vec::new();
    write_canonical(&Value::Object(m), &mut body).unwrap();
    let hash = record::chain_hash(&prev, &body);
    body.pop();
    let line = format!(
        "{},\"hash\":\"{}\",\"mac\":\"{}\"}}",
        String::from_utf8(body).unwrap(),
        record::hex(&hash),
        "ab".repeat(32)
    );
    assert_eq!(line.matches("\"mac\":").count(), 2, "{line}");
    lines[n - 1] = line;
    write_lines(last, &lines);
    let r = verify(&dir, &VerifyOptions::default());
    let p = r
        .first_problem()
        .unwrap_or_else(|| panic!("a line with two `mac` members verifies: {r:?}"));
    assert_eq!(
        (p.file.as_str(), p.line),
        (name(last).as_str(), n as u64),
        "{p}"
    );
    assert_eq!(r.exit_code(), 1);
}

/// A checkpoint's `file` is the file holding record `seq` (docs/forensic-log.md, "Signed
/// checkpoints"), and the independent verifier of the spec (tests/python) refuses one that
/// names another file. `verify-log` is expected to refuse it as well.
#[test]
fn checkpoint_naming_another_file_than_the_one_holding_its_seq_fails() {
    use kvhygiene::forensic::checkpoint::{self, Checkpoint};
    let tmp = tempfile::tempdir().unwrap();
    let (dir, ck, public) = signed_log(&tmp);
    let path = checkpoint_file_in(&ck);
    let old = checkpoint::peek(&path).unwrap().unwrap();
    let other = name(&chain_files(&dir)[0]);
    assert_ne!(old.file, other);
    let signer =
        kvhygiene::forensic::keys::read_signing_key(&tmp.path().join("signer.key")).unwrap();
    checkpoint::write(&ck, &signer, &Checkpoint { file: other, ..old }).unwrap();
    let r = verify(&dir, &with_checkpoint(&ck, &public));
    refused_saying(&r, "the signed checkpoint names file");
}

/// The one checkpoint file in `ck`.
fn checkpoint_file_in(ck: &Path) -> PathBuf {
    fs::read_dir(ck)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "ckpt"))
        .unwrap()
}

/// `r` failed, and what it says (its errors, its first problem) holds `reason`.
fn refused_saying(r: &Report, reason: &str) {
    let said = format!("{:?} {:?}", r.errors, r.first_problem());
    assert!(said.contains(reason), "{said}");
    assert!(
        !r.ok(),
        "verified: {:?}",
        r.chains
            .iter()
            .map(|c| (&c.chain, c.checkpoint_seq, &c.problem))
            .collect::<Vec<_>>()
    );
}

/// A checkpoint is the canonical JSON of `{chain, file, hash, key_id, public_key, seq, ts,
/// v}` (docs/forensic-log.md, "Signed checkpoints"; `key_id` only may be absent), which the
/// independent verifier of the spec (tests/python) holds it to. A signed checkpoint without
/// `file` and `ts` is expected to be refused, not read with an empty file name and time 0.
#[test]
fn signed_checkpoint_without_file_and_ts_fails() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, ck, public) = signed_log(&tmp);
    resign_checkpoint(&tmp, &ck, |m| {
        m.remove("file");
        m.remove("ts");
    });
    let r = verify(&dir, &with_checkpoint(&ck, &public));
    refused_saying(&r, "checkpoint has no file");
}

/// A signed checkpoint with a member the spec does not list would be signed but never
/// checked: it is refused, naming the member.
#[test]
fn signed_checkpoint_with_an_undocumented_member_fails() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, ck, public) = signed_log(&tmp);
    resign_checkpoint(&tmp, &ck, |m| {
        m.insert("covers".into(), Value::from("everything"));
    });
    let r = verify(&dir, &with_checkpoint(&ck, &public));
    refused_saying(&r, "undocumented member");
}

/// Rewrites the checkpoint in `ck` changed by `change` (its members, without `sig`), signed
/// again in canonical form with the log's signing key (`signer.key` in `tmp`).
fn resign_checkpoint(
    tmp: &tempfile::TempDir,
    ck: &Path,
    change: impl FnOnce(&mut serde_json::Map<String, Value>),
) {
    use ed25519_dalek::Signer;
    use kvhygiene::forensic::checkpoint;
    use kvhygiene::forensic::record::{hex, write_canonical};
    let path = checkpoint_file_in(ck);
    let text = fs::read_to_string(&path).unwrap();
    let Value::Object(mut m) = serde_json::from_str::<Value>(text.trim_end()).unwrap() else {
        panic!("{} is not a JSON object", path.display())
    };
    m.remove("sig");
    change(&mut m);
    let mut body = Vec::new();
    write_canonical(&Value::Object(m), &mut body).unwrap();
    let signer =
        kvhygiene::forensic::keys::read_signing_key(&tmp.path().join("signer.key")).unwrap();
    let sig = signer.sign(&body);
    let mut line = body.clone();
    line.pop();
    line.extend_from_slice(format!(",\"sig\":\"{}\"}}\n", hex(&sig.to_bytes())).as_bytes());
    fs::write(&path, &line).unwrap();
    assert!(checkpoint::peek(&path).unwrap().is_some());
}

/// A line far longer than any record, in place of a record, is reported at its line, as
/// not a record, without the reader holding it.
#[test]
fn a_line_longer_than_any_record_is_reported_at_its_line() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, files) = keyed_log(&tmp);
    let mut lines = read_lines(&files[1]);
    lines[2] = "x".repeat(kvhygiene::forensic::lines::MAX_LINE_BYTES + 1);
    write_lines(&files[1], &lines);
    assert_problem(
        &verify(&dir, &keyed_opts()),
        &name(&files[1]),
        3,
        "longer than any record",
    );
}

/// Bytes after the newest file's last newline, more than any record, of a chain that did
/// not stop: counted as torn bytes (as a crash's are), not held, and not tampering.
#[test]
fn a_torn_end_longer_than_any_record_is_counted_as_torn_bytes() {
    use std::io::Write;
    let tmp = tempfile::tempdir().unwrap();
    let (dir, files) = keyed_log(&tmp);
    let newest = files.last().unwrap();
    let mut lines = read_lines(newest);
    assert!(lines.pop().unwrap().contains("\"kind\":\"stop\""));
    write_lines(newest, &lines);
    let torn = kvhygiene::forensic::lines::MAX_LINE_BYTES + 7;
    std::fs::OpenOptions::new()
        .append(true)
        .open(newest)
        .unwrap()
        .write_all(&vec![b'y'; torn])
        .unwrap();
    let r = verify(&dir, &keyed_opts());
    assert!(r.ok(), "{:?}", r.first_problem());
    assert_eq!(r.chains[0].torn_bytes, torn as u64);
}

/// `line` without its `mac` member (the last one; the hash does not cover it): what anyone
/// can do to a sealed record without the secret.
fn without_mac(line: &str) -> String {
    let at = line.rfind(",\"mac\":\"").expect("a sealed line");
    format!("{}}}", &line[..at])
}

#[test]
fn macs_stripped_from_a_sealed_chain_fail_it_with_the_public_key_alone() {
    // The hash chain and the checkpoint still hold, so without this check a verifier holding
    // only the public key took the chain for one written without an HMAC key.
    let tmp = tempfile::tempdir().unwrap();
    let (dir, ck, public) = signed_log(&tmp);
    let files = chain_files(&dir);
    for f in &files {
        let lines: Vec<String> = read_lines(f).iter().map(|l| without_mac(l)).collect();
        write_lines(f, &lines);
    }
    let mut opts = with_checkpoint(&ck, &public);
    opts.hmac_keys.clear();
    let r = verify(&dir, &opts);
    assert_problem(
        &r,
        &name(&files[0]),
        1,
        "signed checkpoint names the HMAC secret",
    );
    assert!(r.first_problem().unwrap().reason.contains("MACs removed"));
}

#[test]
fn a_mac_stripped_from_one_record_fails_the_chain_without_any_key() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, files) = keyed_log(&tmp);
    let mut lines = read_lines(&files[1]);
    lines[2] = without_mac(&lines[2]);
    write_lines(&files[1], &lines);
    let r = verify(&dir, &VerifyOptions::default());
    assert_problem(
        &r,
        &name(&files[1]),
        3,
        "earlier records carry one: MACs removed",
    );
}

#[test]
fn a_mac_added_to_one_record_of_an_unsealed_chain_fails_it() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, files) = unkeyed_log(&tmp);
    assert!(verify(&dir, &VerifyOptions::default()).ok());
    let mut lines = read_lines(&files[1]);
    let open = lines[2].strip_suffix('}').unwrap().to_string();
    lines[2] = format!("{open},\"mac\":\"{}\"}}", "ab".repeat(32));
    write_lines(&files[1], &lines);
    let r = verify(&dir, &VerifyOptions::default());
    assert_problem(&r, &name(&files[1]), 3, "earlier records carry none");
}

#[test]
fn a_chain_that_fails_at_its_checkpoint_is_said_to_have_one() {
    // The chain line said "no checkpoint" for a chain whose checkpoint was read and caught
    // the cut: the words of a deleted checkpoint, at odds with the problem line under it.
    let tmp = tempfile::tempdir().unwrap();
    let (dir, ck, public) = signed_log(&tmp);
    let newest = chain_files(&dir).pop().unwrap();
    let mut lines = read_lines(&newest);
    lines.pop();
    write_lines(&newest, &lines);
    let key_file = secret_key_file(tmp.path());
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kvh"))
        .arg("verify-log")
        .arg(&dir)
        .arg("--key-file")
        .arg(&key_file)
        .arg("--public-key")
        .arg(&public)
        .arg("--checkpoint")
        .arg(&ck)
        .env_remove("KVH_LOG_DIR")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    let chain_line = text.lines().find(|l| l.starts_with("chain ")).unwrap();
    assert!(chain_line.contains(", not matched: FAILED"), "{chain_line}");
    assert!(chain_line.contains("checkpoint at seq "), "{chain_line}");
    assert!(!chain_line.contains("no checkpoint"), "{chain_line}");
}

/// A copy of the chain's checkpoint put beside the writer's, under a name sorting before it
/// and under one sorting after it (chain ids read `p<pid>-t<time>`).
#[test]
fn a_second_checkpoint_is_named_as_the_extra_one_whichever_name_sorts_first() {
    for extra in ["kvh-0copy.ckpt", "kvh-zcopy.ckpt"] {
        let tmp = tempfile::tempdir().unwrap();
        let (dir, ck, public) = signed_log(&tmp);
        let writers = fs::read_dir(&ck).unwrap().next().unwrap().unwrap().path();
        fs::copy(&writers, ck.join(extra)).unwrap();
        let r = verify(&dir, &with_checkpoint(&ck, &public));
        assert_eq!(r.exit_code(), 1, "{r:?}");
        let e = r
            .errors
            .iter()
            .find(|e| e.contains("a second checkpoint"))
            .unwrap_or_else(|| panic!("{extra}: {r:?}"));
        assert!(
            e.starts_with(&ck.join(extra).display().to_string()),
            "{extra}: {e}"
        );
        assert!(e.contains("(a copy of the same bytes)"), "{e}");
        assert!(
            e.ends_with(&format!("checked against {}", writers.display())),
            "{e}"
        );
    }
}

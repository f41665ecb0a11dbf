//! What crash recovery takes over when a writer signs checkpoints but seals no MACs: without
//! an HMAC key nothing shows who wrote a record, so a signing writer continues an unsealed
//! chain only where its own signed checkpoint already covers the chain's last record. A chain
//! planted in the log directory, or a crashed chain's records after its last checkpoint, must
//! not gain a checkpoint of the genuine key by being continued: a pinned verification that
//! failed them before the start-up must fail them after it. A planted record whose next seq
//! would not fit is not continued either.

mod forensic_common;

use std::path::{Path, PathBuf};

use forensic_common::*;
use kvhygiene::events::EventSink;
use kvhygiene::forensic::keys::read_public_key;
use kvhygiene::forensic::record::{self, Header};
use kvhygiene::forensic::{ForensicLog, VerifyOptions};

/// A signing key pair in `tmp`, and a checkpoint directory out of the log directory's reach.
struct Signer {
    key: PathBuf,
    opts: VerifyOptions,
    ckpt: PathBuf,
}

fn signer(tmp: &Path) -> Signer {
    let (key, public) = kvhygiene::forensic::cli::keygen(&tmp.join("signer")).unwrap();
    let ckpt = tmp.join("ckpt");
    std::fs::create_dir(&ckpt).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&ckpt, std::fs::Permissions::from_mode(0o700)).unwrap();
    let opts = VerifyOptions {
        public_keys: vec![read_public_key(&public).unwrap()],
        checkpoints: vec![ckpt.clone()],
        ..Default::default()
    };
    Signer { key, opts, ckpt }
}

fn signed_cfg(dir: &Path, s: &Signer) -> kvhygiene::config::LogConfig {
    let mut c = cfg(dir, 1 << 20);
    c.signing_key_file = Some(s.key.clone());
    c.checkpoint_dir = Some(s.ckpt.clone());
    c
}

/// Drops the last line of the chain's newest file: a writer that died before its `stop`.
fn crash(dir: &Path) -> Vec<PathBuf> {
    let files = chain_files(dir);
    let newest = files.last().unwrap();
    let mut lines = read_lines(newest);
    lines.pop();
    write_lines(newest, &lines);
    files
}

fn chains(dir: &Path) -> usize {
    verify(dir, &VerifyOptions::default()).chains.len()
}

#[test]
fn a_planted_unsealed_chain_gains_no_checkpoint_of_the_genuine_signer() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = log_dir(&tmp);
    let s = signer(tmp.path());
    // Written without any key, as whoever can write the directory can.
    write_log(&cfg(&dir, 1 << 20), 5, false);
    let files = crash(&dir);
    forge_from(&files, 0, 2, None, |m| {
        m.insert("tenant_id".into(), "FORGED-TENANT".into());
    });
    let before = verify(&dir, &s.opts);
    assert!(!before.ok(), "a chain without a checkpoint passed");

    restart(&dir, &s);
    let after = verify(&dir, &s.opts);
    assert!(
        !after.ok(),
        "the planted chain verifies after a genuine start-up: {:?}",
        after.chains
    );
    assert_eq!(chains(&dir), 2, "the start-up continued the planted chain");
}

const CHILD_ENV: &str = "KVHYGIENE_TEST_RECOVERY_CHILD";

/// In the child (the re-executed test binary): a signing writer without an HMAC key in the
/// directory the environment names writes `events` records and dies without its `stop`
/// (`_exit`: no destructor, its lock released by the kernel), after waiting, with
/// `at_checkpoint`, for the checkpoint of its last record.
#[test]
fn writer_child_entry() {
    let Some(spec) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let spec = spec.into_string().unwrap();
    let [dir, key, ckpt, public, mode] = spec.split('|').collect::<Vec<_>>()[..] else {
        panic!("bad child spec {spec}");
    };
    let s = Signer {
        key: key.into(),
        ckpt: ckpt.into(),
        opts: VerifyOptions {
            public_keys: vec![read_public_key(Path::new(public)).unwrap()],
            checkpoints: vec![ckpt.into()],
            ..Default::default()
        },
    };
    let dir = Path::new(dir);
    let at_checkpoint = mode == "at-checkpoint";
    let mut c = signed_cfg(dir, &s);
    if at_checkpoint {
        c.checkpoint_every_records = 1;
    }
    let log = ForensicLog::open_with_secret(&c, start(), None).unwrap();
    for i in 0..4 {
        log.emit(event(i));
    }
    log.flush();
    if at_checkpoint {
        wait_for_checkpoint_of_last_record(dir, &s.opts);
    }
    // SAFETY: ends the process at once, as a crash would: no destructor, no stop record.
    unsafe { libc::_exit(0) };
}

/// The checkpoint of the chain's last record is signed after the record is written, and
/// followed by the `checkpoint` record that says so: waits for both.
fn wait_for_checkpoint_of_last_record(dir: &Path, opts: &VerifyOptions) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let report = verify(dir, opts);
        let chain = &report.chains[0];
        if chain.checkpoint_seq.map(|c| c + 1) == chain.last_seq {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "{chain:?}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// A genuine start-up of a signing writer without an HMAC key on `dir`, and its stop.
fn restart(dir: &Path, s: &Signer) {
    let log = ForensicLog::open_with_secret(&signed_cfg(dir, s), start(), None).unwrap();
    log.stop();
}

/// Runs [`writer_child_entry`] on `dir` and waits for it to die.
fn crashed_writer(dir: &Path, s: &Signer, mode: &str) {
    let public = s.key.with_extension("pub");
    let spec = format!(
        "{}|{}|{}|{}|{mode}",
        dir.display(),
        s.key.display(),
        s.ckpt.display(),
        public.display()
    );
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["writer_child_entry", "--exact", "--test-threads=1"])
        .env(CHILD_ENV, spec)
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "the writer child failed: {status}");
}

/// A genuine writer that died with records after its last checkpoint: the next writer does
/// not vouch for them (it starts a chain of its own), so records rewritten there stay
/// outside every checkpoint, as they were.
#[test]
fn records_after_the_last_checkpoint_of_an_unsealed_chain_are_not_vouched_for() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = log_dir(&tmp);
    let s = signer(tmp.path());
    crashed_writer(&dir, &s, "between-checkpoints");
    let files = chain_files(&dir);
    let n = read_lines(files.last().unwrap()).len();
    forge_from(&files, files.len() - 1, n, None, |m| {
        m.insert("tenant_id".into(), "REWRITTEN".into());
    });
    let before = verify(&dir, &s.opts);
    assert!(before.ok(), "{:?}", before.chains);
    let (cs, last) = (before.chains[0].checkpoint_seq, before.chains[0].last_seq);
    assert!(
        cs < last,
        "no record after the checkpoint: {:?}",
        before.chains
    );

    restart(&dir, &s);
    assert_eq!(
        chains(&dir),
        2,
        "the start-up continued past the checkpoint"
    );
    let after = verify(&dir, &s.opts);
    let crashed = after
        .chains
        .iter()
        .find(|ch| ch.chain == before.chains[0].chain)
        .unwrap();
    assert_eq!((crashed.checkpoint_seq, crashed.last_seq), (cs, last));
}

/// A writer that died right after its checkpoint (its last record is the `checkpoint` record
/// that follows the signed head) is continued: every record continued is vouched for.
#[test]
fn an_unsealed_chain_ending_at_its_own_checkpoint_is_continued() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = log_dir(&tmp);
    let s = signer(tmp.path());
    crashed_writer(&dir, &s, "at-checkpoint");
    restart(&dir, &s);
    assert_eq!(
        chains(&dir),
        1,
        "the chain at its own checkpoint was not continued"
    );
    let r = verify(&dir, &s.opts);
    assert!(r.ok(), "{:?}", r.chains);
    assert!(r.chains[0].closed);
}

/// A planted chain whose last record has the largest seq: its next record's seq would
/// overflow. Not continued (the start-up makes a chain of its own and does not panic).
#[test]
fn a_chain_whose_next_seq_would_not_fit_is_not_continued() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = log_dir(&tmp);
    std::fs::create_dir(&dir).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    let chain = "p1-t1";
    std::fs::write(dir.join(format!("kvh-{chain}-000000.jsonl")), b"junk\n").unwrap();
    let header = Header {
        seq: u64::MAX,
        ts: 1,
        kind: "rotate",
        chain,
        epoch: 1,
        prev: &[7; 32],
    };
    let mut body = serde_json::Map::new();
    body.insert(
        "prev_file".into(),
        format!("kvh-{chain}-000000.jsonl").into(),
    );
    body.insert("prev_seq".into(), (u64::MAX - 1).into());
    let sealed = record::seal(&header, body, None);
    std::fs::write(dir.join(format!("kvh-{chain}-000001.jsonl")), &sealed.line).unwrap();
    for f in std::fs::read_dir(&dir).unwrap() {
        let p = f.unwrap().path();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let log = ForensicLog::open_with_secret(&cfg(&dir, 1 << 20), start(), None).unwrap();
    log.stop();
    assert_eq!(chains(&dir), 2, "the planted chain was continued");
}

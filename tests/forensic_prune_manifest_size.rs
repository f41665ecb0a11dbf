//! `kvh prune-log` never writes a manifest its readers refuse: `read_manifest` (which
//! `verify-log --allow-pruned`, `tail-log`, `evidence` and `prune-log` read it with) takes at
//! most `MAX_MANIFEST_BYTES`.

mod forensic_common;

use std::os::unix::fs::OpenOptionsExt;

use forensic_common::*;

/// A manifest entry is about 390 bytes, so a chain with about 172,000 moved files (at the
/// smallest `KVH_LOG_MAX_BYTES`, 4096, some 700 MiB of one chain) reaches the bound: the run
/// that would cross it is refused, and the manifest on disk stays one the readers take.
#[test]
fn prune_log_never_writes_a_manifest_its_readers_refuse() {
    use kvhygiene::forensic::files::file_name;
    use kvhygiene::forensic::prune::{self, Manifest, PrunedFile, MAX_MANIFEST_BYTES};
    let tmp = tempfile::tempdir().unwrap();
    let dir = log_dir(&tmp);
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let archive = tmp.path().join("archive");
    std::fs::create_dir(&archive).unwrap();
    let chain = "p4242-t1796095770106579739";
    let key = prune::manifest_key(&secret()).unwrap();
    // Entries 1 and later all serialise to the same length (fixed-width numbers), so the
    // size of a manifest of n files is known without making it.
    const FAR: u64 = 1_000_000_000_000;
    let entry = |i: u64| {
        let (first_seq, last_seq) = match i {
            0 => (0, FAR - 1),
            _ => (FAR + (i - 1) * 10, FAR + (i - 1) * 10 + 9),
        };
        PrunedFile {
            name: file_name(chain, i),
            sha256: "ab".repeat(32),
            first_seq,
            last_seq,
            last_hash: "cd".repeat(32),
            oldest_ts: 1_796_095_770_106_579_739,
            newest_ts: 1_796_095_770_106_579_739,
        }
    };
    let manifest = |n: u64, sealed: bool| {
        let mut m = Manifest {
            v: prune::MANIFEST_VERSION,
            chain: chain.into(),
            files: (0..n).map(entry).collect(),
            complete: false,
            archive: std::fs::canonicalize(&archive)
                .unwrap()
                .display()
                .to_string(),
            updated_at: 1_796_095_770_106_579_739,
            mac: Some("0".repeat(64)),
        };
        if sealed {
            m.seal(&key);
        }
        m
    };
    let text = |m: &Manifest| {
        let mut t = serde_json::to_vec_pretty(m).unwrap();
        t.push(b'\n');
        t
    };
    // The largest manifest the readers take, written as prune-log writes it.
    let two = text(&manifest(2, false)).len() as u64;
    let per_entry = text(&manifest(3, false)).len() as u64 - two;
    let n = 2 + (MAX_MANIFEST_BYTES - two) / per_entry;
    let base = manifest(n, true);
    assert!(text(&base).len() as u64 <= MAX_MANIFEST_BYTES);
    let path = prune::manifest_path(&dir, chain);
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .unwrap();
        std::io::Write::write_all(&mut f, &text(&base)).unwrap();
    }
    assert_eq!(
        prune::read_manifest(&dir, chain).unwrap().as_ref(),
        Some(&base),
        "the readers take a manifest of {n} files"
    );
    // The next prune-log run moves 8 more files of the chain.
    let more: Vec<PrunedFile> = (n..n + 8).map(entry).collect();
    let written = prune::record_moved(&dir, Some(&base), chain, more, false, &archive, &key);
    let written_len = std::fs::metadata(&path).unwrap().len();
    let read_back = prune::read_manifest(&dir, chain);
    assert!(
        written
            .as_ref()
            .is_err_and(|e| e.to_string().contains("more than the")),
        "a manifest over the bound was written: {:?}",
        written.as_ref().map(|m| m.files.len())
    );
    assert!(
        written.is_err() || read_back.is_ok(),
        "prune-log wrote a manifest of {} files ({written_len} bytes) that read_manifest, \
         which verify-log, tail-log, evidence and prune-log read it with, refuses: {:?}",
        n + 8,
        read_back.err()
    );
}

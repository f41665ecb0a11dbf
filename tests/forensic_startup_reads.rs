//! What a writer's start-up (`ForensicLog::open`, run by the inference process at its first
//! allocation) reads in a log directory that holds many chains: crash recovery
//! (`recovery::adopt`) looks at every chain, newest first, for one to continue. The test
//! counts what the process reads (`/proc/self/io`: one test in this file, so nothing else of
//! the process reads meanwhile).

mod forensic_common;

use std::path::Path;

use forensic_common::*;
use kvhygiene::forensic::ForensicLog;

/// Bytes this process has read through read(2) and its kind so far.
fn rchar() -> u64 {
    let io = std::fs::read_to_string("/proc/self/io").unwrap();
    io.lines()
        .find_map(|l| l.strip_prefix("rchar: "))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// `chains` stopped chains in `dir`, each one file of about `bytes` bytes.
fn stopped_chains(dir: &Path, chains: usize, bytes: u64) {
    let record = 64 * 1024;
    let pad = "x".repeat(record);
    for _ in 0..chains {
        let log =
            ForensicLog::open_with_secret(&cfg(dir, 2 * bytes), start(), Some(secret())).unwrap();
        for i in 0..bytes / record as u64 {
            log.record_anomaly(serde_json::json!({"n": i, "pad": pad}));
        }
        log.stop();
    }
}

/// A chain that ended with its `stop` record is never continued, and whether it ended so is
/// told by its last line (`recovery::ends_with_stop` reads the file's last 64 KiB for it),
/// not by reading its newest file whole: a node whose log directory holds the stopped chains
/// of earlier processes (every clean restart leaves one) would read up to
/// `KVH_LOG_MAX_BYTES` per earlier process at every start, on the inference process's first
/// allocation.
#[test]
fn start_up_reads_a_stopped_chains_end_not_its_whole_newest_file() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = log_dir(&tmp);
    let chains = 12;
    let each = 3 << 20;
    stopped_chains(&dir, chains, each);

    let before = rchar();
    let log = ForensicLog::open_with_secret(&cfg(&dir, 2 * each), start(), Some(secret())).unwrap();
    let read = rchar() - before;
    log.stop();

    // Each earlier chain's last line (64 KiB at most, as `ends_with_stop` reads it), and room
    // for the keys, the checkpoints and the listing.
    let bound = chains as u64 * 64 * 1024 + (1 << 20);
    assert!(
        read <= bound,
        "a start-up beside {chains} stopped chains of {} MiB each read {read} bytes ({} MiB): \
         every stopped chain's newest file whole; a stopped chain's end is its last line \
         (bound {bound} bytes)",
        each >> 20,
        read >> 20
    );
}

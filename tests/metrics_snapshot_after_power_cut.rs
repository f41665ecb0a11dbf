//! The metrics file is replaced without fsync ("a snapshot lost to a power cut is replaced by
//! the next one", src/metrics/textfile.rs). A power cut after the rename but before the data
//! reached the disk leaves the snapshot's name with its length and no data: zero bytes (NUL)
//! on filesystems that allocate the blocks without their contents. That file is what the
//! exporter itself left there; the next snapshot replaces it, as it replaces an empty file.

use kvhygiene::metrics::textfile::replace_snapshot;

#[test]
fn a_snapshot_a_power_cut_left_as_zero_bytes_is_replaced_by_the_next_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kvh.prom");
    replace_snapshot(&path, b"# HELP kvh_up Up.\nkvh_up 1\n").unwrap();
    let len = std::fs::metadata(&path).unwrap().len() as usize;
    // What the power cut left: the snapshot's length, its data never written.
    std::fs::write(&path, vec![0u8; len]).unwrap();
    let next = b"# HELP kvh_up Up.\nkvh_up 2\n";
    let r = replace_snapshot(&path, next);
    assert!(
        r.is_ok(),
        "the exporter's own snapshot, zeroed by a power cut, is never replaced again (every \
         write refused, the probes reading a stale file): {}",
        r.unwrap_err()
    );
    assert_eq!(std::fs::read(&path).unwrap(), next);
}

/// Only a file that is zero bytes throughout is what a power cut left of a snapshot. A file
/// whose first block is zero and whose data follows (a disk or ISO image, a sparse file, a
/// database), named by a mistyped path, is not the exporter's: it is not replaced.
#[test]
fn a_file_that_only_starts_with_zero_bytes_is_not_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.img");
    let mut data = vec![0u8; 64 << 10];
    data.extend_from_slice(b"CD001 volume descriptor and the data after it\n");
    std::fs::write(&path, &data).unwrap();
    let r = replace_snapshot(&path, b"# HELP kvh_up Up.\nkvh_up 1\n");
    assert!(
        r.is_err(),
        "a file with data after its zero first block was replaced"
    );
    assert_eq!(
        std::fs::read(&path).unwrap(),
        data,
        "the file is left as it was"
    );
}

//! The metrics file's mode does not depend on the process's umask being restrictive: it is
//! created 0644 at most, so no other local user can rewrite the snapshot a collector reads.
//! (A test binary of its own: the umask is process-wide.)

use std::os::unix::fs::PermissionsExt;

#[test]
fn the_metrics_file_is_not_group_or_world_writable_under_an_open_umask() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kvh.prom");
    // SAFETY: umask only changes this process's file creation mask.
    let old = unsafe { libc::umask(0) };
    let written = kvhygiene::metrics::textfile::write_atomic(&path, b"a 1\n");
    unsafe { libc::umask(old) };
    written.unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o644, "{mode:o}");
}

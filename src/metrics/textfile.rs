//! Atomic writes of the metrics file, as node-exporter's textfile collector expects them: the
//! text goes to a temporary file in the same directory, which is then renamed over the target,
//! so a reader sees the old snapshot or the new one, never a torn one.
//!
//! The file is created with mode 0644 (less whatever the umask removes): metrics hold counts,
//! sizes and the version, never payload bytes, keys or tenant ids, so other local users (the
//! node exporter among them) may read them. The temporary file's name starts with a dot and
//! does not end in `.prom`, so the collector never reads a half-written one.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// The temporary file beside `path` that [`write_atomic`] renames over it.
pub fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "metrics".into());
    let tmp = format!(".{name}.tmp-{}", std::process::id());
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.join(tmp),
        _ => PathBuf::from(tmp),
    }
}

/// Replaces `path` with `contents` atomically (temporary file + rename). The temporary file
/// is created exclusively and without following links; on failure it is removed and `path`
/// is left as it was. No fsync: a snapshot lost to a power cut is replaced by the next one.
pub fn write_atomic(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let tmp = temp_path(path);
    // A leftover of a crashed writer with our pid (or anything planted there) goes first;
    // `remove_file` removes a link itself, never its target.
    match std::fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&tmp)?;
    let written = file
        .write_all(contents)
        .and_then(|_| file.flush())
        .and_then(|_| {
            drop(file);
            std::fs::rename(&tmp, path)
        });
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn replaces_the_file_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kvh.prom");
        write_atomic(&path, b"a 1\n").unwrap();
        write_atomic(&path, b"a 2\n").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "a 2\n");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("kvh.prom")]);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode & !0o644, 0, "at most 0644: {mode:o}");
    }

    #[test]
    fn a_planted_link_at_the_temporary_name_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kvh.prom");
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "keep").unwrap();
        std::os::unix::fs::symlink(&victim, temp_path(&path)).unwrap();
        write_atomic(&path, b"a 1\n").unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "a 1\n");
    }

    #[test]
    fn a_failed_write_keeps_the_old_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kvh.prom");
        write_atomic(&path, b"a 1\n").unwrap();
        // A directory where the file should be: the rename fails.
        let blocked = dir.path().join("sub");
        std::fs::create_dir_all(blocked.join("x")).unwrap();
        assert!(write_atomic(&blocked, b"a 2\n").is_err());
        assert!(!temp_path(&blocked).exists());
        assert!(write_atomic(&dir.path().join("missing/kvh.prom"), b"a 3\n").is_err());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "a 1\n");
    }
}

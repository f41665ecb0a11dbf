//! Atomic writes of the metrics file, as node-exporter's textfile collector expects them: the
//! text goes to a temporary file in the same directory, which is then renamed over the target,
//! so a reader sees the old snapshot or the new one, never a torn one.
//!
//! The file is created with mode 0644, whatever the umask: metrics hold counts,
//! sizes and the version, never payload bytes, keys or tenant ids, so other local users (the
//! node exporter among them) may read them. The temporary file's name starts with a dot, does
//! not end in `.prom` (so the collector never reads a half-written one) and ends in 64 random
//! bits, so another local user cannot guess it in advance; it is created exclusively
//! (`O_EXCL`) and without following links (`O_NOFOLLOW`), so a name planted in the directory
//! makes the write fail rather than redirect it. A writer killed between create and rename
//! leaves its temporary file behind (the collector ignores it).

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Longest file name the filesystems the file goes on take (`NAME_MAX` of Linux's).
pub const NAME_MAX: usize = 255;

/// A fresh temporary file name beside `path` for [`write_atomic`]: `.NAME.tmp-RANDOM`, or
/// `.kvh.tmp-RANDOM` when that would be longer than a file name may be (hidden and not ending
/// in `.prom` either way, so no collector reads it half-written).
pub fn temp_path(path: &Path) -> std::io::Result<PathBuf> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "metrics".into());
    let mut random = [0u8; 8];
    getrandom::getrandom(&mut random).map_err(|e| std::io::Error::other(e.to_string()))?;
    let random = u64::from_le_bytes(random);
    let mut tmp = format!(".{name}.tmp-{random:016x}");
    if tmp.len() > NAME_MAX {
        tmp = format!(".kvh.tmp-{random:016x}");
    }
    Ok(match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.join(tmp),
        _ => PathBuf::from(tmp),
    })
}

/// Bytes of an existing file read first to tell whether it is a snapshot (its first line is
/// well within them).
const SNIFF_BYTES: usize = 4096;

/// Replaces the snapshot at `path` with `contents` ([`write_atomic`]) after
/// [`check_replaceable`]: what the exporter and `kvh demo` write through.
pub fn replace_snapshot(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    check_replaceable(path)?;
    write_atomic(path, contents)
}

/// Whether the snapshot at `path` can be written: its directory (which must exist) takes new
/// files from this process, as the temporary file each write renames into place needs. Asked
/// before a run that writes its snapshot only at the end (`kvh demo --metrics-file`), so that
/// it fails before the run rather than after it.
pub fn check_writable_dir(path: &Path) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if crate::forensic::files::may_write(dir) {
        return Ok(());
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::PermissionDenied,
        format!(
            "its directory {} {}",
            dir.display(),
            crate::forensic::files::unwritable_said(dir)
        ),
    ))
}

/// Whether a snapshot may replace what is at `path`: nothing, an empty regular file or one of
/// zero bytes throughout (a snapshot a power cut emptied, up to a snapshot's largest size),
/// or a regular file whose first line is a kvhygiene snapshot's (`# HELP kvh_`, `# TYPE kvh_` or
/// a `kvh_` sample). Anything else there (a key file, a log, another program's metrics, a
/// link, a directory), named by a mistyped or tab-completed path, is not the exporter's to
/// replace: an error that says so without quoting the file (nor naming the path, which the
/// caller's message does). Guards against mistakes, not
/// against a user who can write the directory (who could replace the file anyway).
pub fn check_replaceable(path: &Path) -> std::io::Result<()> {
    let refused = |what: &str| {
        std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            format!(
                "{what} is there, not a kvhygiene metrics snapshot; it is not replaced \
                 (remove it or choose another name)"
            ),
        )
    };
    let md = match std::fs::symlink_metadata(path) {
        Ok(md) => md,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if md.is_symlink() {
        return Err(refused("a symbolic link"));
    }
    if md.is_dir() {
        return Err(refused("a directory"));
    }
    if !md.is_file() {
        return Err(refused("a special file"));
    }
    // Opened as the log's readers open files: no link followed, a FIFO cannot hang it. The
    // first bytes tell a snapshot; a file of zero bytes only is read whole (up to a
    // snapshot's largest size) to tell it from one that merely starts with zeros.
    let read = |cap: u64| {
        crate::forensic::files::open_regular(path, u64::MAX).and_then(|(f, _)| {
            use std::io::Read;
            let mut bytes = Vec::new();
            f.take(cap).read_to_end(&mut bytes)?;
            Ok(bytes)
        })
    };
    let looked = read(SNIFF_BYTES as u64).and_then(|head| {
        if is_snapshot_start(&head) {
            return Ok(true);
        }
        if !head.iter().all(|&b| b == 0) {
            return Ok(false);
        }
        // All zero bytes, throughout: a snapshot a power cut left at its length but without
        // its data (the write is not synced), which the next snapshot must replace.
        let whole = read(MAX_ZEROED_BYTES + 1)?;
        Ok(whole.len() as u64 <= MAX_ZEROED_BYTES && whole.iter().all(|&b| b == 0))
    });
    match looked {
        Ok(true) => Ok(()),
        Ok(false) => Err(refused("a file")),
        // Replaced by another writer between the two looks: nothing left to protect.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Largest file of zero bytes taken for a snapshot a power cut emptied: the largest snapshot
/// `kvh metrics` reads.
const MAX_ZEROED_BYTES: u64 = super::cli::MAX_FILE_BYTES;

/// Whether `head`, a file's first bytes, starts as a kvhygiene snapshot does.
fn is_snapshot_start(head: &[u8]) -> bool {
    [b"# HELP kvh_".as_slice(), b"# TYPE kvh_", b"kvh_"]
        .iter()
        .any(|p| head.starts_with(p))
}

/// Replaces `path` with `contents` atomically (temporary file + rename). On failure the
/// temporary file is removed and `path` is left as it was. No fsync: a snapshot lost to a
/// power cut is replaced by the next one.
pub fn write_atomic(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    // An append-only directory takes the temporary file but refuses the rename and the
    // removal: each try would leave one behind.
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if crate::forensic::files::renames_refused(dir) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "{}: marked append-only or immutable (chattr +a or +i), which refuses the \
                 rename that installs each snapshot",
                dir.display()
            ),
        ));
    }
    write_via(path, &temp_path(path)?, contents)
}

/// [`write_atomic`] through the temporary file `tmp`, which must not exist yet.
fn write_via(path: &Path, tmp: &Path, contents: &[u8]) -> std::io::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(tmp)?;
    // 0644 whatever the umask: the file is for a collector running as another user
    // (node-exporter's textfile collector), and holds no payload, key or tenant id.
    let written = file
        .set_permissions(std::fs::Permissions::from_mode(0o644))
        .and_then(|()| file.write_all(contents))
        .and_then(|_| file.flush())
        .and_then(|_| {
            drop(file);
            std::fs::rename(tmp, path)
        });
    if written.is_err() {
        let _ = std::fs::remove_file(tmp);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn names(dir: &Path) -> Vec<std::ffi::OsString> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect()
    }

    #[test]
    fn replaces_the_file_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kvh.prom");
        write_atomic(&path, b"a 1\n").unwrap();
        write_atomic(&path, b"a 2\n").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "a 2\n");
        assert_eq!(
            names(dir.path()),
            vec![std::ffi::OsString::from("kvh.prom")]
        );
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode & !0o644, 0, "at most 0644: {mode:o}");
    }

    #[test]
    fn only_a_snapshot_or_an_empty_file_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kvh.prom");
        replace_snapshot(&path, b"kvh_up 1\n").unwrap();
        replace_snapshot(&path, b"# HELP kvh_up Up.\nkvh_up 1\n").unwrap();
        std::fs::write(&path, b"").unwrap();
        replace_snapshot(&path, b"kvh_up 2\n").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "kvh_up 2\n");
        let key = dir.path().join("hmac.key");
        std::fs::write(&key, b"00112233\n").unwrap();
        let e = replace_snapshot(&key, b"kvh_up 1\n").unwrap_err();
        assert!(
            e.to_string().contains("not a kvhygiene metrics snapshot"),
            "{e}"
        );
        assert!(
            !e.to_string().contains("00112233"),
            "the file is not quoted: {e}"
        );
        assert_eq!(std::fs::read(&key).unwrap(), b"00112233\n");
        let sub = dir.path().join("sub");
        std::fs::create_dir(&sub).unwrap();
        assert!(replace_snapshot(&sub, b"kvh_up 1\n").is_err());
        let link = dir.path().join("link.prom");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        assert!(replace_snapshot(&link, b"kvh_up 1\n").is_err());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "kvh_up 2\n");
    }

    #[test]
    fn temporary_names_are_hidden_and_unpredictable() {
        let path = Path::new("/d/kvh.prom");
        let a = temp_path(path).unwrap();
        let b = temp_path(path).unwrap();
        assert_ne!(a, b);
        for t in [&a, &b] {
            assert_eq!(t.parent(), Some(Path::new("/d")));
            let name = t.file_name().unwrap().to_str().unwrap();
            assert!(name.starts_with(".kvh.prom.tmp-"), "{name}");
            assert!(!name.ends_with(".prom"), "{name}");
            assert_eq!(name.len(), ".kvh.prom.tmp-".len() + 16, "{name}");
        }
    }

    #[test]
    fn a_planted_name_is_neither_followed_nor_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kvh.prom");
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "keep").unwrap();
        let link = dir.path().join(".kvh.prom.tmp-planted");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        assert!(write_via(&path, &link, b"a 1\n").is_err());
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep");
        assert!(!path.exists());
        let plain = dir.path().join(".kvh.prom.tmp-file");
        std::fs::write(&plain, "other").unwrap();
        assert!(write_via(&path, &plain, b"a 1\n").is_err());
        assert!(!path.exists());
    }

    #[test]
    fn a_failed_write_keeps_the_old_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kvh.prom");
        write_atomic(&path, b"a 1\n").unwrap();
        // A directory where the file should be: the rename fails, its temporary is removed.
        let blocked = dir.path().join("sub");
        std::fs::create_dir_all(blocked.join("x")).unwrap();
        assert!(write_atomic(&blocked, b"a 2\n").is_err());
        let mut left = names(dir.path());
        left.sort();
        assert_eq!(left, vec!["kvh.prom", "sub"]);
        assert!(write_atomic(&dir.path().join("missing/kvh.prom"), b"a 3\n").is_err());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "a 1\n");
    }

    /// The temporary name adds 22 bytes (`.` + `.tmp-` + 16 hex digits) to the file's own: a
    /// valid file name of 234..=255 bytes gets the short temporary name instead.
    #[test]
    fn a_long_but_valid_file_name_can_be_written() {
        let dir = tempfile::tempdir().unwrap();
        let name = format!("{}.prom", "k".repeat(245));
        assert_eq!(name.len(), 250);
        let path = dir.path().join(&name);
        std::fs::write(&path, b"a 0\n").expect("the name itself is valid");
        write_atomic(&path, b"a 1\n").expect("replacing a file with a valid name");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "a 1\n");
    }
}

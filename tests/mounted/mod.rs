//! A small file system mounted on a directory for one test (tmpfs), for the paths a full
//! file system takes. Mounting needs root: where it is refused, the test skips (see `skip`).

// The including binary declares `mod skip` (tests/skip) beside this module.
use crate::skip;

use std::path::{Path, PathBuf};
use std::process::Command;

/// A tmpfs mounted on a directory, unmounted when dropped.
pub struct Mounted(PathBuf);

impl Mounted {
    /// Mounts a tmpfs of `size` on `dir` with `options` (`,ro`, ...); `None`, said on
    /// stderr, where this process may not mount.
    pub fn tmpfs(dir: &Path, size: &str, options: &str) -> Option<Mounted> {
        let opts = format!("size={size},mode=0700{options}");
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &opts, "tmpfs"])
            .arg(dir)
            .output()
            .is_ok_and(|o| o.status.success());
        if !ok {
            skip::skipped("this process may not mount a tmpfs");
            return None;
        }
        Some(Mounted(dir.to_path_buf()))
    }

    /// Mounts an ext4 file system of `mib` MiB (4 KiB blocks, no blocks reserved for root by
    /// `-m`) on `dir`, from an image file beside it; `None`, said on stderr, where mkfs.ext4
    /// is missing or this process may not mount a loop device.
    #[allow(dead_code)]
    pub fn ext4(dir: &Path, mib: u64) -> Option<Mounted> {
        Mounted::ext4_reserved(dir, mib, 0)
    }

    /// [`Mounted::ext4`] with `percent` of its blocks reserved for root (`mkfs.ext4 -m`).
    #[allow(dead_code)]
    pub fn ext4_reserved(dir: &Path, mib: u64, percent: u32) -> Option<Mounted> {
        let image = dir.with_extension("ext4.img");
        let made = std::fs::File::create(&image)
            .and_then(|f| f.set_len(mib << 20))
            .is_ok()
            && Command::new("mkfs.ext4")
                .args(["-q", "-F", "-m", &percent.to_string(), "-b", "4096"])
                .arg(&image)
                .output()
                .is_ok_and(|o| o.status.success());
        let ok = made
            && Command::new("mount")
                .args(["-o", "loop"])
                .arg(&image)
                .arg(dir)
                .output()
                .is_ok_and(|o| o.status.success());
        if !ok {
            skip::skipped("no mkfs.ext4, or this process may not mount a loop device");
            return None;
        }
        Some(Mounted(dir.to_path_buf()))
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).output();
    }
}

//! File system side of the log: naming, modes, ownership checks, locking, directory fsync.
//!
//! A chain's files are `kvh-<chain>-<index>.jsonl` with `<chain>` = `p<pid>-t<start unix
//! nanoseconds>` and `<index>` six or more decimal digits, starting at 0. The directory is
//! 0700, files 0600; both must belong to the effective user. Files are created with
//! `O_CREAT|O_EXCL|O_NOFOLLOW` so a planted file or symlink is never written through.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use super::ForensicError;
use crate::fork_closed::ForkClosed;

/// A parsed chain file name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ChainFile {
    pub chain: String,
    pub index: u64,
}

impl ChainFile {
    pub fn name(&self) -> String {
        file_name(&self.chain, self.index)
    }
}

/// The file name of `chain`'s file number `index`.
pub fn file_name(chain: &str, index: u64) -> String {
    format!("kvh-{chain}-{index:06}.jsonl")
}

/// Parses a chain file name, as [`file_name`] spells it; `None` for any other file. One
/// spelling per file: another (`-0000001` for file 1) is not the chain's file, so every
/// report that names a file names the one on disk.
pub fn parse_file_name(name: &str) -> Option<ChainFile> {
    let rest = name.strip_prefix("kvh-")?.strip_suffix(".jsonl")?;
    let (chain, idx) = rest.rsplit_once('-')?;
    if idx.len() < 6 || !idx.bytes().all(|b| b.is_ascii_digit()) || !valid_chain_id(chain) {
        return None;
    }
    let index: u64 = idx.parse().ok()?;
    if file_name(chain, index) != name {
        return None;
    }
    Some(ChainFile {
        chain: chain.to_string(),
        index,
    })
}

/// `p<digits>-t<digits>`.
pub fn valid_chain_id(chain: &str) -> bool {
    let Some((p, t)) = chain.split_once('-') else {
        return false;
    };
    let digits = |s: &str, tag: char| {
        s.strip_prefix(tag).is_some_and(|d| {
            !d.is_empty() && d.len() <= 20 && d.bytes().all(|b| b.is_ascii_digit())
        })
    };
    digits(p, 'p') && digits(t, 't')
}

pub(crate) fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Whether `path` is a file of another user than this process's effective one that this
/// process may not read: a log copied or mounted under another account, whose read errors
/// say nothing of the log's integrity (an I/O error for the verbs, exit 2). A file of this
/// process's own user that it may not read had its permissions taken away (the writer
/// creates them 0600): that stays a problem of the log, as does a link or a missing file.
pub fn unreadable_foreign(path: &Path) -> bool {
    let Ok(md) = std::fs::symlink_metadata(path) else {
        return false;
    };
    if md.file_type().is_symlink() || md.uid() == euid() {
        return false;
    }
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: `c` is NUL-terminated and outlives the call; faccessat only reads it.
    let denied =
        unsafe { libc::faccessat(libc::AT_FDCWD, c.as_ptr(), libc::R_OK, libc::AT_EACCESS) } != 0;
    denied && io::Error::last_os_error().kind() == io::ErrorKind::PermissionDenied
}

/// What [`inspect_dir`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DirState {
    /// The directory exists and [`prepare_dir`] accepts it as it is.
    Ready,
    /// It does not exist; [`prepare_dir`] would create it (0700) under `parent`, the nearest
    /// existing directory above it, which this process may write.
    WouldCreate { parent: PathBuf },
}

/// What [`prepare_dir`] would do with `dir`, without doing it: for a check before start-up
/// (`kvh preflight`). The same refusals, plus a missing directory whose nearest existing
/// parent is not a directory this process may write (and so could not create it).
pub fn inspect_dir(dir: &Path, what: &str) -> Result<DirState, ForensicError> {
    let dir = &as_named(dir);
    refuse_inner_parent(dir, what)?;
    match fs::symlink_metadata(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let parent = dir
                .ancestors()
                .skip(1)
                .map(|a| {
                    if a.as_os_str().is_empty() {
                        Path::new(".")
                    } else {
                        a
                    }
                })
                .find(|a| fs::symlink_metadata(a).is_ok())
                .unwrap_or(Path::new("/"))
                .to_path_buf();
            if !fs::metadata(&parent).is_ok_and(|m| m.is_dir()) {
                return Err(ForensicError::Permission(format!(
                    "{}: cannot create {what}: {} is not a directory",
                    dir.display(),
                    parent.display()
                )));
            }
            if !may_write(&parent) {
                return Err(ForensicError::Permission(format!(
                    "{}: cannot create {what}: {} {}",
                    dir.display(),
                    parent.display(),
                    unwritable_said(&parent)
                )));
            }
            Ok(DirState::WouldCreate { parent })
        }
        Err(e) => Err(io_err(dir, &format!("cannot stat {what}"), e)),
        Ok(m) => {
            check_usable(dir, &m, what)?;
            Ok(DirState::Ready)
        }
    }
}

/// Whether nothing is at `path` (not even a dangling symlink). Other failures to look at it
/// are not "missing": the caller's next step reports them.
pub fn is_missing(path: &Path) -> bool {
    matches!(fs::symlink_metadata(path), Err(e) if e.kind() == io::ErrorKind::NotFound)
}

/// Whether this process (its effective ids) may create entries in the directory `dir`. Asked
/// with `faccessat`; an answer that is neither yes nor EACCES or EROFS is not taken as one:
/// EPERM comes from an immutable directory (`chattr +i`), but also from a container's
/// seccomp filter that refuses `faccessat2` (which glibc uses), and ENOSYS from an old
/// kernel. Those are settled by creating an unnamed file in `dir` ([`may_create_unnamed`]),
/// which leaves nothing behind; where the file system cannot make one, the creation the
/// caller makes tells.
pub(crate) fn may_write(dir: &Path) -> bool {
    if is_removed_dir(dir) {
        return false;
    }
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: `c` is a valid NUL-terminated path that outlives the call; faccessat only reads
    // it. AT_EACCESS checks with the effective ids, as the creation would.
    let answered = unsafe {
        libc::faccessat(
            libc::AT_FDCWD,
            c.as_ptr(),
            libc::W_OK | libc::X_OK,
            libc::AT_EACCESS,
        ) == 0
    };
    if answered {
        return !on_kernel_interface(&c);
    }
    match io::Error::last_os_error().raw_os_error() {
        Some(libc::EACCES | libc::EROFS) => false,
        _ => may_create_unnamed(&c).unwrap_or(true),
    }
}

/// Why [`may_write`] said no of `dir`, after its name: "is not writable by this process's
/// uid 0", or that it is one of the kernel's interface file systems.
pub(crate) fn unwritable_said(dir: &Path) -> String {
    if is_removed_dir(dir) {
        return "was removed (the working directory, for a relative path): nothing can be \
                created in it"
            .to_string();
    }
    let kernel =
        std::ffi::CString::new(dir.as_os_str().as_bytes()).is_ok_and(|c| on_kernel_interface(&c));
    if kernel {
        "is on a kernel interface file system (proc, sysfs, cgroup and kin), where no file can \
         be created"
            .to_string()
    } else {
        format!("is not writable by this process's uid {}", euid())
    }
}

/// Whether `dir` is a directory that was removed while something still refers to it: the
/// working directory, through a relative path. It still answers `stat` and `faccessat` as it
/// was, but an entry created in it fails (ENOENT). Told by its link count, which removal
/// makes 0 (a live directory has at least 1, on file systems that count no subdirectories
/// too). Not by `getcwd` failing: it also fails for a working directory outside the
/// process's root (a `chroot` without `chdir`), where relative paths still work.
fn is_removed_dir(dir: &Path) -> bool {
    fs::metadata(dir).is_ok_and(|m| m.is_dir() && m.nlink() == 0)
}

/// Whether `dir` lies on one of the kernel's interface file systems (`/proc`, `/sys`, cgroups,
/// `/dev/pts`, debugfs and kin): their directories answer `faccessat` as writable to root, but
/// creating a file or directory there fails, so nothing can be written into them. Told by the
/// file system's magic number: permission bits there say nothing.
// The magic numbers' type, and `f_type`'s, differ between targets: the casts stay.
#[allow(clippy::unnecessary_cast)]
fn on_kernel_interface(dir: &std::ffi::CStr) -> bool {
    const KERNEL_INTERFACES: [i64; 12] = [
        libc::PROC_SUPER_MAGIC as i64,
        libc::SYSFS_MAGIC as i64,
        libc::CGROUP_SUPER_MAGIC as i64,
        libc::CGROUP2_SUPER_MAGIC as i64,
        libc::DEVPTS_SUPER_MAGIC as i64,
        libc::DEBUGFS_MAGIC as i64,
        libc::TRACEFS_MAGIC as i64,
        libc::SECURITYFS_MAGIC as i64,
        libc::SELINUX_MAGIC as i64,
        libc::BPF_FS_MAGIC as i64,
        libc::NSFS_MAGIC as i64,
        libc::RDTGROUP_SUPER_MAGIC as i64,
    ];
    // SAFETY: an all-zero `statfs` is a valid value of the plain C struct; statfs overwrites it.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `dir` is NUL-terminated and outlives the call; `st` is a valid, writable `statfs`
    // that the call fills.
    if unsafe { libc::statfs(dir.as_ptr(), &mut st) } != 0 {
        return false; // unknown: the creation the caller makes tells
    }
    KERNEL_INTERFACES.contains(&(st.f_type as i64))
}

/// Whether an unnamed file (`O_TMPFILE`: never linked, gone at its close) can be created in
/// the directory `dir`; `None` when the file system cannot make one, or for another failure
/// that says nothing of the permission.
fn may_create_unnamed(dir: &std::ffi::CStr) -> Option<bool> {
    // SAFETY: `dir` is NUL-terminated and outlives the call; the mode is passed as the
    // variadic `mode_t` open reads with O_TMPFILE.
    let fd = unsafe {
        libc::open(
            dir.as_ptr(),
            libc::O_TMPFILE | libc::O_WRONLY | libc::O_CLOEXEC,
            0o600 as libc::c_uint,
        )
    };
    if fd >= 0 {
        // SAFETY: `fd` was just returned by open and is owned by nothing else.
        unsafe { libc::close(fd) };
        return Some(true);
    }
    match io::Error::last_os_error().raw_os_error() {
        Some(libc::EACCES | libc::EROFS | libc::EPERM) => Some(false),
        _ => None,
    }
}

/// The inode flags that make a directory refuse renames and removals in it, even by root:
/// immutable (`chattr +i`) and append-only (`chattr +a`), from `<linux/fs.h>` (the libc crate
/// has the request, not the flags).
const FS_IMMUTABLE_FL: libc::c_int = 0x10;
const FS_APPEND_FL: libc::c_int = 0x20;

/// Refuses a directory that is marked append-only or immutable, in which a file installed by
/// a rename never is (`what` names it, and `why` the file): files can be created in an
/// append-only directory, so the other checks pass it. Flags that cannot be read (a file
/// system without them) refuse nothing.
pub fn check_renames(dir: &Path, what: &str, why: &str) -> Result<(), ForensicError> {
    if renames_refused(dir) {
        return Err(ForensicError::Permission(format!(
            "{}: the {what} is marked append-only or immutable (chattr +a or +i), which \
             refuses every rename in it, and {why} is installed by a rename",
            dir.display()
        )));
    }
    Ok(())
}

/// Whether the directory `dir` carries the append-only or the immutable flag.
pub(crate) fn renames_refused(dir: &Path) -> bool {
    marks(dir) != Marks::default()
}

/// Whether the file `path` carries the append-only or the immutable flag: it cannot be
/// removed or renamed over (nor, immutable, written), even by root. Not followed through a
/// symlink; a file that is not there carries none.
pub fn removal_refused(path: &Path) -> bool {
    marks(path) != Marks::default()
}

/// The append-only and immutable inode flags (`chattr +a`, `+i`) of a file or directory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Marks {
    pub append_only: bool,
    pub immutable: bool,
}

/// The marks of `path` (not followed through a symlink); none when it cannot be opened or
/// its flags read (a file system without them).
pub fn marks(path: &Path) -> Marks {
    let Ok(f) = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
    else {
        return Marks::default();
    };
    let flags = inode_flags(&f);
    Marks {
        append_only: flags & FS_APPEND_FL != 0,
        immutable: flags & FS_IMMUTABLE_FL != 0,
    }
}

/// Whether an unnamed file (`O_TMPFILE`) can be made in the directory `dir`, as
/// [`link_new_file`] makes them: false where the file system cannot.
pub fn unnamed_files_supported(dir: &Path) -> bool {
    match OpenOptions::new()
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_TMPFILE | libc::O_CLOEXEC)
        .open(dir)
    {
        Ok(_) => true,
        Err(e) => !e.raw_os_error().is_some_and(unnamed_unsupported),
    }
}

/// The room on the file system holding `path` that this process may still fill: bytes, their
/// block size and files. A file system that states no size (tmpfs with `size=0`, ramfs: no
/// total) or no file count (no total of inodes) has no limit this can tell: `None`. The
/// figures are those of an unprivileged writer (`f_bavail`, `f_favail`), for root too: the
/// free count (`f_bfree`) includes blocks no writer gets (ext4 keeps some back from root as
/// well), and what root may use beyond them cannot be told apart. Root's room is understated
/// by what is reserved for it (`mkfs.ext4 -m`), never overstated: a volume is taken as full
/// once it is for every other writer, as `df` shows it. `kept_back` says how much more is
/// free, for the messages.
pub fn free_space(path: &Path) -> io::Result<FreeSpace> {
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in the path"))?;
    // SAFETY: an all-zero `statvfs` is a valid value of the plain C struct; statvfs
    // overwrites it.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c_path` is NUL-terminated and outlives the call; `st` is a valid, writable
    // `statvfs` that the call fills.
    if unsafe { libc::statvfs(c_path.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(room_of(&st))
}

/// [`free_space`] of the file system holding the open file or directory `fd`.
fn free_space_of_fd(fd: &File) -> io::Result<FreeSpace> {
    // SAFETY: an all-zero `statvfs` is a valid value of the plain C struct; fstatvfs
    // overwrites it.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is an open descriptor for the duration of the call; `st` is a valid,
    // writable `statvfs` that the call fills.
    if unsafe { libc::fstatvfs(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(room_of(&st))
}

/// The room a `statvfs` states, as [`free_space`] reports it.
// `statvfs`'s fields are 64-bit here and 32-bit on other targets: the conversions stay.
#[allow(clippy::useless_conversion)]
fn room_of(st: &libc::statvfs) -> FreeSpace {
    let (blocks, files) = (st.f_bavail, st.f_favail);
    let block = u64::from(st.f_frsize).max(1);
    let kept_back = u64::from(st.f_bfree).saturating_sub(u64::from(blocks));
    FreeSpace {
        bytes: (st.f_blocks > 0).then(|| u64::from(blocks).saturating_mul(block)),
        block,
        files: (st.f_files > 0).then(|| u64::from(files)),
        kept_back: kept_back.saturating_mul(block),
    }
}

/// What [`free_space`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FreeSpace {
    /// Bytes this process may still write; `None` where the file system states no size.
    pub bytes: Option<u64>,
    /// The file system's block size: each file takes whole blocks.
    pub block: u64,
    /// Files this process may still create; `None` where the file system states no count.
    pub files: Option<u64>,
    /// Free bytes beyond `bytes` that no unprivileged writer gets: ext4's reserve for root
    /// (`mkfs.ext4 -m`, which a root writer may fill) and the pool it keeps from every writer.
    pub kept_back: u64,
}

/// Creates a file in the directory `dir` without a name (0600), has `fill` write its contents,
/// syncs it, and links it in as `dest`: nothing is left under another name, in a directory
/// that refuses removals (`chattr +a`) too. When `fill` fails (its source changed while
/// copied, say), nothing is linked: the unnamed file goes with its descriptor. `None` where
/// the file system or the system cannot make an unnamed file or link one (no `O_TMPFILE`, no
/// `/proc`): the caller writes it under a temporary name instead, and `fill` may have run
/// once already (it must start over when called again). The link fails with `AlreadyExists`
/// when `dest` exists.
pub fn link_new_file(
    dir: &Path,
    dest: &Path,
    fill: impl FnOnce(&mut File) -> io::Result<()>,
) -> Option<io::Result<()>> {
    let mut f = match OpenOptions::new()
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_TMPFILE | libc::O_CLOEXEC)
        .open(dir)
    {
        Ok(f) => f,
        Err(e) if e.raw_os_error().is_some_and(unnamed_unsupported) => return None,
        Err(e) => return Some(Err(e)),
    };
    let written = f
        .set_permissions(fs::Permissions::from_mode(0o600))
        .and_then(|()| fill(&mut f))
        .and_then(|()| f.sync_all());
    if let Err(e) = written {
        return Some(Err(e));
    }
    // `linkat` of the descriptor's `/proc` name: AT_EMPTY_PATH would need CAP_DAC_READ_SEARCH.
    let from = format!("/proc/self/fd/{}", f.as_raw_fd());
    let (Ok(from), Ok(to)) = (
        std::ffi::CString::new(from),
        std::ffi::CString::new(dest.as_os_str().as_bytes()),
    ) else {
        return Some(Err(io::Error::other("a NUL in a file name")));
    };
    // SAFETY: both paths are NUL-terminated and outlive the call; the descriptor `from`
    // names stays open until `f` drops, after it.
    let r = unsafe {
        libc::linkat(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::AT_SYMLINK_FOLLOW,
        )
    };
    if r == 0 {
        return Some(Ok(()));
    }
    let e = io::Error::last_os_error();
    // No /proc to name the descriptor by: the caller's way.
    if e.kind() == io::ErrorKind::NotFound && fs::symlink_metadata("/proc/self/fd").is_err() {
        return None;
    }
    Some(Err(e))
}

/// Errors of `open(O_TMPFILE)` that say the file system (or kernel) cannot make an unnamed
/// file, not that this one may not.
fn unnamed_unsupported(errno: i32) -> bool {
    matches!(errno, libc::EOPNOTSUPP | libc::EISDIR | libc::EINVAL)
}

/// The inode flags of the open file `f` (`FS_IOC_GETFLAGS`); 0 when they cannot be read.
fn inode_flags(f: &File) -> libc::c_int {
    // The request is encoded with a `long`, but the kernel writes an `int`: two of them,
    // zeroed, hold either, and the first is the flags on either byte order for an `int`.
    let mut flags: [libc::c_int; 2] = [0; 2];
    // SAFETY: the descriptor is open for the call; FS_IOC_GETFLAGS writes at most a `long`
    // (8 bytes) through the pointer, which points at 8 writable bytes that outlive the call.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), libc::FS_IOC_GETFLAGS, flags.as_mut_ptr()) };
    if r == 0 {
        flags[0]
    } else {
        0
    }
}

/// Refuses a `..` after a directory name (`logs/x/../kvh`): creating the missing levels
/// would create `x`, and `x/..` would then name a directory that already existed, whose
/// mode the creation would set. A leading `..` (`../kvh`) names an existing directory and is
/// accepted.
fn refuse_inner_parent(dir: &Path, what: &str) -> Result<(), ForensicError> {
    use std::path::Component;
    let mut named = false;
    for c in dir.components() {
        match c {
            Component::Normal(_) => named = true,
            Component::ParentDir if named => {
                return Err(ForensicError::Io(format!(
                    "{}: the {what} is named with '..' after a directory name; name it \
                     without (its real path)",
                    dir.display()
                )))
            }
            _ => {}
        }
    }
    Ok(())
}

/// How long [`prepare_dir`] waits for another start-up to finish the mode of a parent it
/// created just before.
const PARENT_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// `dir` without a trailing `/` or `/.`: the system resolves a symlink named with one
/// (`link/`) even for `lstat` and `O_NOFOLLOW`, so the checks that refuse a symlinked
/// directory look at the name itself.
fn as_named(dir: &Path) -> PathBuf {
    dir.components().collect()
}

/// Creates the log directory (or the checkpoint directory: `what` names it in errors) 0700
/// (with parents), or checks an existing one: it must be a real directory (not a symlink),
/// owned by us, with no group or other permissions, that we may write and open.
pub fn prepare_dir(dir: &Path, what: &str) -> Result<(), ForensicError> {
    let dir = &as_named(dir);
    refuse_inner_parent(dir, what)?;
    match fs::symlink_metadata(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => create_missing_levels(dir, what)?,
        Err(e) => return Err(io_err(dir, &format!("cannot stat {what}"), e)),
        Ok(_) => {}
    }
    // Another start-up (a worker per GPU) may have created it, before the look above or
    // between that look and create_missing_levels listing what was missing, and not yet given
    // its mode: waited for a moment, as for a parent level.
    wait_until_finished(dir);
    let m =
        fs::symlink_metadata(dir).map_err(|e| io_err(dir, &format!("cannot stat {what}"), e))?;
    check_usable(dir, &m, what)
}

/// Waits up to [`PARENT_WAIT`] while `level` is [`unfinished`] (a user's own directory,
/// narrowed on purpose, is then refused by the checks that follow).
fn wait_until_finished(level: &Path) {
    let until = std::time::Instant::now() + PARENT_WAIT;
    while unfinished(level) && std::time::Instant::now() < until {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// Whether the existing directory `dir` (`m` its metadata) is one the writer can use as it
/// is: [`check_existing_dir`]'s refusals, plus a directory in which no file can be created
/// (a read-only volume refuses even root) or that cannot be opened (a mode without read
/// access: the writer creates its files through an open descriptor). One function for the
/// start-up and for [`inspect_dir`], so that a check before start-up passes exactly when the
/// start-up would. A crashed chain's newest file could still be appended to in a read-only
/// directory, but its next rotation, its checkpoints and the next start-up could not be
/// written: refused at once.
fn check_usable(dir: &Path, m: &fs::Metadata, what: &str) -> Result<(), ForensicError> {
    check_existing_dir(dir, m, what)?;
    if !may_write(dir) {
        return Err(ForensicError::Permission(format!(
            "{}: no file can be created in the {what} (a read-only volume, or a mode \
             without write access)",
            dir.display()
        )));
    }
    LogDir::open_as_is(dir)?;
    Ok(())
}

/// Creates the levels of `dir` missing now, outermost first, each 0700 with its mode then set
/// exactly: the umask may narrow a mode, and a parent it left without owner write (umask
/// 0277) would refuse the next level. Only these levels are ever given a mode: a directory
/// that was there already keeps its own.
fn create_missing_levels(dir: &Path, what: &str) -> Result<(), ForensicError> {
    let missing: Vec<&Path> = dir
        .ancestors()
        .take_while(|a| !a.as_os_str().is_empty() && fs::symlink_metadata(a).is_err())
        .collect();
    for level in missing.iter().rev().copied() {
        let mut created = DirBuilder::new().mode(0o700).create(level);
        let refused = created
            .as_ref()
            .is_err_and(|e| e.kind() == io::ErrorKind::PermissionDenied);
        // Refused by a parent another start-up (a worker per GPU) created and has not given
        // its mode yet: finished here when this call found it missing too, else waited for a
        // moment (a user's own directory, read-only on purpose, then still refuses). A parent
        // the other start-up finished between the refusal and this look is tried again too.
        if let Some(parent) = level.parent().filter(|p| refused && private_of_ours(p)) {
            if unfinished(parent) {
                if missing.contains(&parent) {
                    set_private(parent, what)?;
                } else {
                    wait_until_finished(parent);
                }
            }
            created = DirBuilder::new().mode(0o700).create(level);
        }
        match created {
            Ok(()) => {
                set_private(level, what)?;
                sync_parent(level, what)?;
            }
            // Created meanwhile by another start-up: finished here if it has not been yet.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                if unfinished(level) {
                    set_private(level, what)?;
                }
            }
            Err(e) => {
                let step = if level == dir {
                    format!("cannot create {what}")
                } else {
                    format!("cannot create {what}: a missing parent")
                };
                return Err(io_err(level, &step, e));
            }
        }
    }
    Ok(())
}

/// fsync of the directory holding `level`, which this call created. An fsync of a file
/// persists neither its directory's entry in that directory's parent nor any level above: on
/// a fresh volume, a power failure after the first records were synced could otherwise lose
/// the directory, and the chain with it. Outermost level first, so each entry is synced once
/// it exists.
fn sync_parent(level: &Path, what: &str) -> Result<(), ForensicError> {
    let parent = match level.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    match sync_dir(parent) {
        Ok(()) => Ok(()),
        // A parent this user may enter but not read (mode 0311) cannot be opened to be
        // synced: the entry is then as durable as the filesystem's own ordering makes it, as
        // it is for every directory above the levels created here.
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => Ok(()),
        Err(e) => Err(io_err(
            parent,
            &format!("cannot sync the directory holding the new {what}"),
            e,
        )),
    }
}

/// Sets a directory this call (or another start-up) created to 0700.
fn set_private(level: &Path, what: &str) -> Result<(), ForensicError> {
    fs::set_permissions(level, fs::Permissions::from_mode(0o700))
        .map_err(|e| io_err(level, &format!("cannot set the mode of the {what}"), e))
}

/// Whether `level` is a directory of ours that no one else may enter (finished or not).
fn private_of_ours(level: &Path) -> bool {
    fs::symlink_metadata(level)
        .is_ok_and(|m| m.is_dir() && m.uid() == euid() && m.mode() & 0o077 == 0)
}

/// Whether `level` is a directory of ours, private, but without all of the owner's
/// permissions: one a start-up created and has not given its mode yet.
fn unfinished(level: &Path) -> bool {
    fs::symlink_metadata(level).is_ok_and(|m| {
        m.is_dir() && m.uid() == euid() && m.mode() & 0o077 == 0 && m.mode() & 0o700 != 0o700
    })
}

/// The checks of an existing log (or checkpoint: `what`) directory: a real directory (not a
/// symlink), owned by us, with no group or other permissions, and not an archive of
/// `prune-log`.
fn check_existing_dir(dir: &Path, m: &fs::Metadata, what: &str) -> Result<(), ForensicError> {
    if m.file_type().is_symlink() {
        return Err(ForensicError::Permission(format!(
            "{}: {what} is a symlink; refusing to follow it",
            dir.display()
        )));
    }
    if !m.is_dir() {
        return Err(ForensicError::Permission(format!(
            "{}: the {what} is not a directory",
            dir.display()
        )));
    }
    check_owner_mode(dir, m.uid(), m.mode(), 0o700, what)?;
    // A writer in an archive would continue the chains `prune-log` moved there.
    if dir
        .join(super::prune::ARCHIVE_MARKER)
        .symlink_metadata()
        .is_ok()
    {
        return Err(ForensicError::Permission(format!(
            "{}: an archive of kvh prune-log ({} is there), not a {what}",
            dir.display(),
            super::prune::ARCHIVE_MARKER
        )));
    }
    Ok(())
}

fn check_owner_mode(
    p: &Path,
    uid: u32,
    mode: u32,
    want: u32,
    what: &str,
) -> Result<(), ForensicError> {
    if uid != euid() {
        return Err(ForensicError::Permission(format!(
            "{}: {what} is owned by uid {uid}, not by this process's uid {}; refusing to use it",
            p.display(),
            euid()
        )));
    }
    if mode & 0o077 != 0 {
        return Err(ForensicError::Permission(format!(
            "{}: {what} has mode {:04o}; it must be {want:04o} (no group or other access)",
            p.display(),
            mode & 0o7777
        )));
    }
    Ok(())
}

/// The process's file size limit (`RLIMIT_FSIZE`, `ulimit -f`) in bytes; `None` when there is
/// none (or it cannot be read). A write past it kills the process (`SIGXFSZ`).
pub fn file_size_limit() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the limit into `limit`, a valid rlimit owned by this frame.
    let known = unsafe { libc::getrlimit(libc::RLIMIT_FSIZE, &mut limit) } == 0;
    (known && limit.rlim_cur != libc::RLIM_INFINITY).then_some(limit.rlim_cur)
}

/// Makes sure `len` bytes can be written at `offset` of `file` before any is: within the
/// process's file size limit (`RLIMIT_FSIZE`) and, where the file system can say, with the
/// disk space allocated (`fallocate`, keeping the file's size, which an append-only file
/// allows). For a write whose partial landing could not be undone. On a file system without
/// `fallocate` the write itself is the only test of room.
pub fn reserve(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let too_large = || io::Error::from_raw_os_error(libc::EFBIG);
    let end = offset.checked_add(len).ok_or_else(too_large)?;
    if file_size_limit().is_some_and(|limit| end > limit) {
        return Err(too_large());
    }
    let (Ok(at), Ok(n)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return Err(too_large());
    };
    if n == 0 {
        return Ok(());
    }
    loop {
        // SAFETY: the descriptor is open for as long as `file` is borrowed; with
        // FALLOC_FL_KEEP_SIZE the call only allocates blocks, the file's size and bytes
        // unchanged.
        if unsafe { libc::fallocate(file.as_raw_fd(), libc::FALLOC_FL_KEEP_SIZE, at, n) } == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EOPNOTSUPP | libc::ENOSYS) => return Ok(()),
            // A signal handled while the call waited (the inference process's own): asked
            // again, whatever the interrupted call allocated or undid.
            Some(libc::EINTR) => continue,
            _ => return Err(e),
        }
    }
}

/// Turns appending on or off for `file`'s open file description (`O_APPEND`). A file the
/// kernel keeps append-only (`chattr +a`) refuses to have it turned off (EPERM).
pub fn set_append(file: &File, on: bool) -> io::Result<()> {
    let fd = file.as_raw_fd();
    // SAFETY: `fd` is open for as long as `file` is borrowed; F_GETFL takes no argument.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    let flags = if on {
        flags | libc::O_APPEND
    } else {
        flags & !libc::O_APPEND
    };
    // SAFETY: as above; F_SETFL takes an int of status flags, of which only O_APPEND changed.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Which step of [`create_exclusive`] failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CreateStep {
    Create,
    SetMode,
}

/// Creates a new file for appending with exactly `mode`: exclusive (an existing file, or a
/// symlink at the name, is an error) and close-on-exec. The umask may have narrowed the mode
/// and an inherited default ACL widened it, so it is set again after the open. Chain files
/// and `kvh keygen`'s key files come through here.
pub fn create_exclusive(path: &Path, mode: u32) -> Result<File, (CreateStep, io::Error)> {
    let f = OpenOptions::new()
        .append(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| (CreateStep::Create, e))?;
    f.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(|e| (CreateStep::SetMode, e))?;
    Ok(f)
}

/// The log directory as the writer checked it, held open: the files it creates, reads back
/// and removes are named relative to it (`openat`, `unlinkat`), so a directory renamed and
/// replaced by a symlink after the check is never followed; the writer stays in the
/// directory it checked.
pub struct LogDir {
    fd: File,
    path: PathBuf,
}

impl LogDir {
    /// Opens `path`, a directory [`prepare_dir`] checked, without following a symlink; the
    /// directory opened must still pass the check (ours, 0700): one swapped in between the
    /// check and the open is refused.
    pub fn open(path: &Path) -> Result<LogDir, ForensicError> {
        let dir = Self::open_as_is(path)?;
        let m = dir
            .fd
            .metadata()
            .map_err(|e| io_err(path, "cannot stat log directory", e))?;
        check_owner_mode(path, m.uid(), m.mode(), 0o700, "directory")?;
        Ok(dir)
    }

    /// Opens the directory `path` without following a symlink and without the owner and
    /// mode check of [`LogDir::open`]: for a directory the caller chose (a tool signing a
    /// checkpoint into a directory it names).
    pub fn open_as_is(path: &Path) -> Result<LogDir, ForensicError> {
        let path = &as_named(path);
        let fd = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
            .map_err(|e| io_err(path, "cannot open directory", e))?;
        Ok(LogDir {
            fd,
            path: path.to_path_buf(),
        })
    }

    /// The path the directory was opened at, for messages.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The room left on the file system of the directory opened (not of whatever its path
    /// names now), as [`free_space`] reports it.
    pub fn free_space(&self) -> io::Result<FreeSpace> {
        free_space_of_fd(&self.fd)
    }

    fn name(name: &str) -> io::Result<std::ffi::CString> {
        std::ffi::CString::new(name).map_err(|_| io::Error::other("a NUL in a file name"))
    }

    /// `openat` in this directory, never through a symlink.
    fn open_at(&self, name: &str, flags: libc::c_int, mode: u32) -> io::Result<File> {
        let c = Self::name(name)?;
        let flags = flags | libc::O_NOFOLLOW | libc::O_CLOEXEC;
        // SAFETY: the descriptor is open for the life of `self`; `c` is NUL-terminated and
        // outlives the call; `mode` is passed as the variadic `mode_t` openat reads with
        // O_CREAT (ignored otherwise).
        let fd = unsafe { libc::openat(self.fd.as_raw_fd(), c.as_ptr(), flags, mode) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by openat and is owned by nothing else.
        Ok(unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) })
    }

    /// Creates the chain file `name`, as [`create_file`] does, in this directory.
    pub(crate) fn create_file(&self, name: &str) -> Result<ForkClosed<File>, ForensicError> {
        self.create_named(name, "log file")
    }

    /// [`LogDir::create_file`] for a file of another kind (`what`, as errors name it).
    ///
    /// Closed in a child forked from the moment it is opened: the lock taken below belongs to
    /// the open file description, which a child keeps with the descriptor, so a child forked
    /// before the caller is done with the file (its fsyncs and reservations) would otherwise
    /// hold the chain's lock for as long as it lives.
    pub(crate) fn create_named(
        &self,
        name: &str,
        what: &str,
    ) -> Result<ForkClosed<File>, ForensicError> {
        let path = self.path.join(name);
        let flags = libc::O_WRONLY | libc::O_APPEND | libc::O_CREAT | libc::O_EXCL;
        let f = ForkClosed::open(|| self.open_at(name, flags, 0o600))
            .map_err(|e| io_err(&path, &format!("cannot create {what}"), e))?;
        // From here the file is ours (O_EXCL): one refused below is removed, so that the next
        // rotation can create it again rather than find it there for good.
        let usable = f
            .set_permissions(fs::Permissions::from_mode(0o600))
            .map_err(|e| io_err(&path, &format!("cannot set {what} mode"), e))
            .and_then(|()| checked(&path, &f));
        if let Err(e) = usable {
            let _ = self.remove(name);
            return Err(e);
        }
        // Another process's start-up may hold the lock for a moment: its crash recovery locks
        // the newest file of each chain to tell a live writer from a dead one. Waited for a
        // while; if it is still held, the file is removed, as above.
        if !lock_within(&f, CREATE_LOCK_WAIT) {
            let _ = self.remove(name);
            return Err(ForensicError::Permission(format!(
                "{}: another process held the lock of a file just created for {} ms; the \
                 file was removed",
                path.display(),
                CREATE_LOCK_WAIT.as_millis()
            )));
        }
        Ok(f)
    }

    /// Opens `name` in this directory for reading (no FIFO waited for).
    pub fn open_read(&self, name: &str) -> io::Result<File> {
        self.open_at(name, libc::O_RDONLY | libc::O_NONBLOCK, 0)
    }

    /// Reads `name` in this directory as [`read_regular`] reads a path: a regular file of at
    /// most `cap` bytes, no symlink followed, no FIFO waited for.
    pub fn read_regular(&self, name: &str, cap: u64) -> io::Result<Vec<u8>> {
        let f = self.open_read(name)?;
        let len = regular_len(&f, cap)?;
        read_opened(f, len, cap)
    }

    /// Renames `from` to `to`, both in this directory (replacing `to`).
    pub fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        let (a, b) = (Self::name(from)?, Self::name(to)?);
        let fd = self.fd.as_raw_fd();
        // SAFETY: the descriptor is open for the life of `self`; both names are
        // NUL-terminated and outlive the call.
        if unsafe { libc::renameat(fd, a.as_ptr(), fd, b.as_ptr()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Removes `name` from this directory.
    pub fn remove(&self, name: &str) -> io::Result<()> {
        let c = Self::name(name)?;
        // SAFETY: the descriptor is open for the life of `self`; `c` is NUL-terminated.
        if unsafe { libc::unlinkat(self.fd.as_raw_fd(), c.as_ptr(), 0) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// The device and inode number of `name` in this directory (a symlink's own, not its
    /// target's).
    pub fn identity(&self, name: &str) -> io::Result<(u64, u64)> {
        let c = Self::name(name)?;
        let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
        // SAFETY: the descriptor is open for the life of `self`; `c` is NUL-terminated and
        // outlives the call; `st` is writable memory of a `stat`, which fstatat fills on
        // success.
        let rc = unsafe {
            libc::fstatat(
                self.fd.as_raw_fd(),
                c.as_ptr(),
                st.as_mut_ptr(),
                libc::AT_SYMLINK_NOFOLLOW,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fstatat returned 0, so it filled `st`.
        let st = unsafe { st.assume_init() };
        Ok((st.st_dev, st.st_ino))
    }

    /// Makes the directory's entries durable.
    pub fn sync(&self) -> io::Result<()> {
        self.fd.sync_all()
    }
}

/// Creates a new chain file: 0600, exclusive, never through a symlink. The returned file
/// is locked (see [`try_lock`]) for the life of the writer.
pub fn create_file(path: &Path) -> Result<File, ForensicError> {
    let f = create_exclusive(path, 0o600).map_err(|(step, e)| match step {
        CreateStep::Create => io_err(path, "cannot create log file", e),
        CreateStep::SetMode => io_err(path, "cannot set log file mode", e),
    })?;
    checked(path, &f)?;
    if !try_lock(&f) {
        return Err(ForensicError::Permission(format!(
            "{}: another process holds the lock of a file just created",
            path.display()
        )));
    }
    Ok(f)
}

/// Opens an existing chain file for appending (crash recovery), refusing symlinks, files not
/// owned by us and files with group or other permissions.
pub fn open_existing(path: &Path) -> Result<File, ForensicError> {
    let f = OpenOptions::new()
        .read(true)
        .append(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| {
            if e.raw_os_error() == Some(libc::ELOOP) {
                return ForensicError::Permission(format!(
                    "{}: is a symlink; refusing to open a log file through a link",
                    path.display()
                ));
            }
            // Refused by the file's attributes (immutable): a wrong owner or mode, which the
            // open never got to check, is named first.
            let unfit = fs::symlink_metadata(path)
                .ok()
                .and_then(|m| fit_chain_file(path, &m).err());
            unfit.unwrap_or_else(|| io_err(path, "cannot open log file", e))
        })?;
    checked(path, &f)?;
    Ok(f)
}

/// Why `path`, a chain file that passes every check [`open_existing`] makes (a regular file,
/// not a link, ours, no group or other access), cannot be opened to append: it is immutable
/// (`chattr +i`: EPERM) or lacks its owner's write permission (EACCES: a finished log made
/// read-only, 0400). Crash recovery leaves such a chain as it ended instead of refusing the
/// start-up; any other refusal stays one. `None` when the file is unfit or opens.
pub fn unwritable_chain_file(path: &Path) -> Option<&'static str> {
    let meta = fs::symlink_metadata(path).ok()?;
    fit_chain_file(path, &meta).ok()?;
    // Non-blocking: a FIFO swapped in since the lstat must not hold the start-up.
    let refused = OpenOptions::new()
        .append(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .err()?;
    match refused.raw_os_error() {
        Some(libc::EPERM) => Some("immutable (chattr +i)"),
        Some(libc::EACCES) if meta.mode() & 0o200 == 0 => {
            Some("read-only (no write permission for its owner)")
        }
        _ => None,
    }
}

/// fstat checks on an open file: regular, ours, 0600.
fn checked(path: &Path, f: &File) -> Result<(), ForensicError> {
    let m = f
        .metadata()
        .map_err(|e| io_err(path, "cannot stat log file", e))?;
    fit_chain_file(path, &m)
}

/// What a chain file must be: a regular file, ours, 0600.
fn fit_chain_file(path: &Path, m: &fs::Metadata) -> Result<(), ForensicError> {
    if !m.is_file() {
        return Err(ForensicError::Permission(format!(
            "{}: not a regular file",
            path.display()
        )));
    }
    check_owner_mode(path, m.uid(), m.mode(), 0o600, "log file")
}

/// Largest `KVH_LOG_MAX_BYTES` accepted (1 GiB).
pub const MAX_LOG_BYTES: u64 = 1 << 30;

/// Largest chain file a reader reads: 4 x [`MAX_LOG_BYTES`], room for a record larger than
/// the rotation size. Anything larger was not written by a writer and is refused. (Readers
/// hold a line at a time, `lines::Lines`, not the file.)
pub const MAX_READ_BYTES: u64 = 4 * MAX_LOG_BYTES;

/// Largest checkpoint file read (a real one is about 400 bytes).
pub const MAX_CKPT_BYTES: u64 = 64 * 1024;

/// Largest first file, without a complete record, that counts as left by a writer that died
/// in its `start` record: crash recovery removes one once idle (when no checkpoint covers its
/// chain), and verification excuses it from needing a checkpoint. A `start` record is a few
/// hundred bytes (its host, model and policy fields bounded), so a larger file is not one.
pub const MAX_UNSTARTED_BYTES: u64 = 64 * 1024;

/// Reads a planted-file-safe copy of `path`: opened with `O_NOFOLLOW` (no symlink to
/// `/dev/zero` or elsewhere) and `O_NONBLOCK` (a FIFO cannot hang the open), then `fstat`
/// must show a regular file of at most `cap` bytes; the read itself is also capped, in case
/// the file grows meanwhile.
pub fn read_regular(path: &Path, cap: u64) -> io::Result<Vec<u8>> {
    let (f, len) = open_regular(path, cap)?;
    read_opened(f, len, cap)
}

/// Reads a file [`regular_len`] found `len` bytes long, at most `cap` bytes: one that grew
/// beyond the cap since is refused.
fn read_opened(f: File, len: u64, cap: u64) -> io::Result<Vec<u8>> {
    use std::io::Read;
    let mut out = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    f.take(cap + 1).read_to_end(&mut out)?;
    if out.len() as u64 > cap {
        return Err(io::Error::other(format!(
            "grew beyond the {cap}-byte limit while read"
        )));
    }
    Ok(out)
}

/// The length of an opened file that must be a regular file of at most `cap` bytes.
fn regular_len(f: &File, cap: u64) -> io::Result<u64> {
    let m = f.metadata()?;
    if !m.is_file() {
        return Err(io::Error::other("not a regular file"));
    }
    if m.len() > cap {
        return Err(io::Error::other(format!(
            "{} bytes, larger than the {cap}-byte limit",
            m.len()
        )));
    }
    Ok(m.len())
}

/// Opens `path` as [`read_regular`] does (no symlink followed, no FIFO waited for, a regular
/// file of at most `cap` bytes), for a reader that streams it; returns it and its length. The
/// caller caps its reads too, in case the file grows meanwhile.
pub fn open_regular(path: &Path, cap: u64) -> io::Result<(File, u64)> {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => io::Error::other("is a symlink; not followed"),
            _ => e,
        })?;
    let len = regular_len(&f, cap)?;
    Ok((f, len))
}

/// How long [`LogDir::create_file`] waits for a lock another process holds on the file it
/// just created.
const CREATE_LOCK_WAIT: std::time::Duration = std::time::Duration::from_millis(500);

/// [`try_lock`], tried again every millisecond or so until `wait` has passed.
fn lock_within(f: &File, wait: std::time::Duration) -> bool {
    let until = std::time::Instant::now() + wait;
    loop {
        if try_lock(f) {
            return true;
        }
        if std::time::Instant::now() >= until {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// Takes an exclusive, non-blocking `flock`. A live writer holds it on its active file; the
/// kernel drops it when the process dies, however it dies, which is how a crashed chain is
/// told apart from one still being written by another process.
pub fn try_lock(f: &File) -> bool {
    matches!(try_lock_or_error(f), Ok(true))
}

/// [`try_lock`], telling a lock held through another open file (`Ok(false)`) from a failure
/// to lock (`Err`: no lock records left, a file system that refuses locks).
pub fn try_lock_or_error(f: &File) -> io::Result<bool> {
    // SAFETY: the descriptor is valid for the lifetime of `f`; flock has no memory effects.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(e)
    }
}

/// fsync of the directory, so a created or renamed entry survives a power failure.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Chain ids with their files' `(index, path)`, sorted by chain then index.
pub type ChainList = Vec<(String, Vec<(u64, PathBuf)>)>;

/// Chain files in `dir`, grouped by chain and sorted by index.
pub fn list_chains(dir: &Path) -> io::Result<ChainList> {
    list_chains_in(&[dir])
}

/// Chain files in every directory of `dirs` (a log directory and the archive directories
/// `kvh prune-log` moved its older files to), grouped by chain and sorted by index.
///
/// A file found under the same name in two directories is listed once when both copies
/// have the same bytes (a move `prune-log` was interrupted in), and twice otherwise, which
/// the verifier reports.
pub fn list_chains_in(dirs: &[&Path]) -> io::Result<ChainList> {
    let mut all: Vec<(ChainFile, PathBuf)> = Vec::new();
    for dir in dirs {
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            if let Some(cf) = entry.file_name().to_str().and_then(parse_file_name) {
                all.push((cf, entry.path()));
            }
        }
    }
    all.sort();
    all.dedup_by(|b, a| a.0 == b.0 && same_bytes(&a.1, &b.1));
    let mut out: ChainList = Vec::new();
    for (cf, p) in all {
        match out.last_mut() {
            Some((c, files)) if *c == cf.chain => files.push((cf.index, p)),
            _ => out.push((cf.chain, vec![(cf.index, p)])),
        }
    }
    for (chain, files) in &mut out {
        fill_listing_gaps(dirs, chain, files);
    }
    Ok(out)
}

/// Most missing files looked up by name per chain: more is a chain with files deleted, not a
/// listing that raced a writer.
const MAX_GAP_LOOKUPS: u64 = 64;

/// `readdir` is not a snapshot: a file a writer creates while the directory is listed may be
/// missing from the listing while a newer one shows (`file index jumps from 4 to 6`, on a log
/// that is whole). Each index missing between a chain's listed ones is looked up by name,
/// which finds the file if it exists now; one that does not stays missing, for the verifier
/// to report.
fn fill_listing_gaps(dirs: &[&Path], chain: &str, files: &mut Vec<(u64, PathBuf)>) {
    let (Some(&(first, _)), Some(&(last, _))) = (files.first(), files.last()) else {
        return;
    };
    // Sorted by index: as many files as indices means none missing (a file listed twice,
    // from two directories, is reported by the verifier and not looked at here). A span of
    // every u64 (a planted name) is too many missing.
    let Some(span) = (last - first).checked_add(1) else {
        return;
    };
    let missing = span.saturating_sub(files.len() as u64);
    if missing == 0 || missing > MAX_GAP_LOOKUPS {
        return;
    }
    let listed: std::collections::BTreeSet<u64> = files.iter().map(|(i, _)| *i).collect();
    for index in (first..last).filter(|i| !listed.contains(i)) {
        let found = dirs
            .iter()
            .map(|d| d.join(file_name(chain, index)))
            .find(|p| fs::symlink_metadata(p).is_ok_and(|m| m.is_file()));
        if let Some(p) = found {
            files.push((index, p));
        }
    }
    files.sort();
}

/// Whether two files hold the same bytes (both readable as chain files), compared a buffer
/// at a time: a chain file may be as large as the rotation size.
fn same_bytes(a: &Path, b: &Path) -> bool {
    let (Ok((fa, la)), Ok((fb, lb))) = (
        open_regular(a, MAX_READ_BYTES),
        open_regular(b, MAX_READ_BYTES),
    ) else {
        return false;
    };
    // One byte past the length read too: a file that grew is not the same.
    use io::Read;
    la == lb && same_contents(fa.take(la + 1), fb.take(lb + 1)).unwrap_or(false)
}

/// Whether two readers give the same bytes to their ends.
fn same_contents(mut a: impl io::Read, mut b: impl io::Read) -> io::Result<bool> {
    const CHUNK: usize = 64 * 1024;
    let (mut ba, mut bb) = (vec![0u8; CHUNK], vec![0u8; CHUNK]);
    loop {
        let n = read_up_to(&mut a, &mut ba)?;
        if n != read_up_to(&mut b, &mut bb)? || ba[..n] != bb[..n] {
            return Ok(false);
        }
        if n == 0 {
            return Ok(true);
        }
    }
}

/// Fills `buf` from `r` as far as its end allows; returns the bytes read (fewer than the
/// buffer's length only at the end).
fn read_up_to(r: &mut impl io::Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

pub fn io_err(p: &Path, what: &str, e: io::Error) -> ForensicError {
    ForensicError::Io(format!("{}: {what}: {e}", p.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_the_listing_missed_is_found_by_name_and_a_deleted_one_is_not() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let chain = "p1-t2";
        for i in [0, 1, 2, 4] {
            fs::write(dir.join(file_name(chain, i)), b"x\n").unwrap();
        }
        // As a listing made while file 1 was being created could see the chain.
        let mut files: Vec<(u64, PathBuf)> = [0, 2, 4]
            .iter()
            .map(|&i| (i, dir.join(file_name(chain, i))))
            .collect();
        fill_listing_gaps(&[dir], chain, &mut files);
        let indices: Vec<u64> = files.iter().map(|(i, _)| *i).collect();
        assert_eq!(
            indices,
            vec![0, 1, 2, 4],
            "1 found by name, 3 (deleted) still missing"
        );
        // Too many missing: a chain with files deleted, not looked up one by one.
        let mut far = vec![(0, dir.join(file_name(chain, 0))), (1000, dir.join("x"))];
        fill_listing_gaps(&[dir], chain, &mut far);
        assert_eq!(far.len(), 2);
    }

    /// A file planted under the largest index (`kvh-<chain>-18446744073709551615.jsonl`, a
    /// name `parse_file_name` accepts) beside file 0: the count of indices must not overflow
    /// (a panic in the listing of verify-log, tail-log and prune-log in a debug build).
    #[test]
    fn indices_spanning_the_whole_range_do_not_overflow_the_gap_count() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let chain = "p1-t2";
        let mut files = vec![
            (0, dir.join(file_name(chain, 0))),
            (u64::MAX, dir.join(file_name(chain, u64::MAX))),
        ];
        fill_listing_gaps(&[dir], chain, &mut files);
        assert_eq!(files.len(), 2);
    }

    #[test]
    fn names_round_trip() {
        let n = file_name("p12-t345", 7);
        assert_eq!(n, "kvh-p12-t345-000007.jsonl");
        assert_eq!(
            parse_file_name(&n),
            Some(ChainFile {
                chain: "p12-t345".into(),
                index: 7
            })
        );
        assert_eq!(parse_file_name("kvh-p1-t2-7.jsonl"), None);
        // One spelling per file: extra leading zeros are another file's name.
        assert_eq!(parse_file_name("kvh-p1-t2-0000001.jsonl"), None);
        assert_eq!(
            parse_file_name("kvh-p1-t2-1000000.jsonl").map(|f| f.index),
            Some(1_000_000)
        );
        assert_eq!(parse_file_name("kvh-x-000001.jsonl"), None);
        assert_eq!(parse_file_name("other.jsonl"), None);
    }
}

#[cfg(test)]
mod log_dir_tests {
    use super::*;

    /// The writer's handle is only ever a directory that passes the check it made first:
    /// ours and 0700; never one reached through a symlink.
    #[test]
    fn a_log_dir_opens_only_a_private_directory_and_never_a_link() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("d");
        fs::create_dir(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        assert!(LogDir::open(&dir).is_err(), "0755 accepted");
        assert!(LogDir::open_as_is(&dir).is_ok());
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();
        let d = LogDir::open(&dir).unwrap();
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&dir, &link).unwrap();
        assert!(LogDir::open(&link).is_err(), "a symlink followed");
        // Files made, read back, renamed and removed relative to the handle.
        let mut f = d.create_file("a").unwrap();
        std::io::Write::write_all(&mut *f, b"x\n").unwrap();
        assert_eq!(d.read_regular("a", 10).unwrap(), b"x\n");
        d.rename("a", "b").unwrap();
        d.remove("b").unwrap();
        assert!(d.read_regular("b", 10).is_err());
    }

    /// A chain file is closed in a child forked at any moment after its creation, before the
    /// writer is done with it (its fsyncs, its reservation) included: the child would keep
    /// the file's lock, and with it the chain from crash recovery, for as long as it lives.
    #[test]
    fn a_file_just_created_is_closed_in_a_child_forked_at_once() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("d");
        DirBuilder::new().mode(0o700).create(&dir).unwrap();
        let d = LogDir::open(&dir).unwrap();
        let f = d.create_file("kvh-p1-t1-000000.jsonl").unwrap();
        let fd = f.as_raw_fd();
        // SAFETY: the child only asks whether a descriptor is open (fcntl), then leaves with
        // `_exit`, never returning into the test harness.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            // SAFETY: F_GETFD reads a descriptor's flags; -1 (EBADF) when it is not open.
            let open = unsafe { libc::fcntl(fd, libc::F_GETFD) } != -1;
            // SAFETY: ends the child without running the parent's handlers or destructors.
            unsafe { libc::_exit(i32::from(open)) };
        }
        let mut status = 0;
        // SAFETY: `pid` is this test's child; `status` is a valid out-pointer.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "the child kept the chain file it inherited open: {status}"
        );
        // The parent's file is as it was: still locked by this process.
        assert!(!try_lock(
            &open_existing(&dir.join("kvh-p1-t1-000000.jsonl")).unwrap()
        ));
        drop(f);
    }
}

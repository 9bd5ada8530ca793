//! The local store's system calls beyond std: free space (statvfs), writeback control
//! (sync_file_range, posix_fadvise), and opening without following a planted symlink. The one
//! module of the store that holds `unsafe`.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Free space the filesystem gives an unprivileged writer, in bytes.
pub fn available_bytes(dir: &Path) -> io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: statvfs(3) fills the zeroed struct and reads only the NUL-terminated path.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((s.f_bavail as u64).saturating_mul(s.f_frsize as u64))
}

/// Opens without following a symlink planted at the last component: the archive must never be
/// tricked into writing or reading outside itself. Created files are 0640 (less the umask).
pub fn open_nofollow(path: &Path, write: bool) -> io::Result<File> {
    let mut o = OpenOptions::new();
    o.read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC);
    if write {
        o.write(true).create(true).truncate(false).mode(0o640);
    }
    o.open(path)
}

/// An open that found nothing to open, or a symlink where `open_nofollow` refuses one.
pub fn is_gone_or_link(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ELOOP))
}

/// Whether `sync_file_range` works on this file.
pub enum Writeback {
    Started,
    /// Not supported here (some FUSE or network filesystems).
    Unsupported,
}

/// Starts writeback of `len` bytes at `off` without waiting for it.
pub fn start_writeback(file: &File, off: u64, len: u64) -> io::Result<Writeback> {
    // SAFETY: sync_file_range(2) on our own open descriptor; it touches no user memory.
    let rc = unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            off as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        )
    };
    if rc == 0 {
        return Ok(Writeback::Started);
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP | libc::ESPIPE) => {
            Ok(Writeback::Unsupported)
        }
        _ => Err(e),
    }
}

/// Waits until `len` bytes at `off` are on disk, then drops them from the page cache.
pub fn settle(file: &File, off: u64, len: u64) -> io::Result<()> {
    let fd = file.as_raw_fd();
    let (off, len) = (off as libc::off64_t, len as libc::off64_t);
    let wait = libc::SYNC_FILE_RANGE_WAIT_BEFORE
        | libc::SYNC_FILE_RANGE_WRITE
        | libc::SYNC_FILE_RANGE_WAIT_AFTER;
    // SAFETY: sync_file_range(2) on our own open descriptor; it touches no user memory.
    if unsafe { libc::sync_file_range(fd, off, len, wait) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // Advice only: a failure costs page cache, nothing else.
    // SAFETY: posix_fadvise(2) on our own descriptor.
    unsafe { libc::posix_fadvise(fd, off, len, libc::POSIX_FADV_DONTNEED) };
    Ok(())
}

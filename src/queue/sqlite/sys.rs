//! The one place the SQLite queue calls the C library: byte-range locks on an open file
//! description (`F_OFD_SETLK`), which std does not offer (`File::lock` locks the whole file).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

fn byte(kind: libc::c_short, offset: u64) -> libc::flock {
    // SAFETY: `flock` is plain old data; all-zero is a valid value of it.
    let mut l: libc::flock = unsafe { std::mem::zeroed() };
    l.l_type = kind;
    l.l_whence = libc::SEEK_SET as libc::c_short;
    l.l_start = offset as libc::off_t;
    l.l_len = 1;
    l
}

/// Read-locks one byte, without waiting; `false` if another open file holds a write lock on it.
/// The lock lives as long as `file` (every descriptor of its open file description) stays open.
/// A read lock needs `file` open only for reading.
pub fn try_lock_byte(file: &File, offset: u64) -> io::Result<bool> {
    let mut l = byte(libc::F_RDLCK as libc::c_short, offset);
    // SAFETY: fcntl(2) with F_OFD_SETLK reads the `flock` it is given, on our own descriptor.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &mut l) } == 0 {
        return Ok(true);
    }
    match io::Error::last_os_error() {
        e if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EACCES)) => Ok(false),
        e => Err(e),
    }
}

/// Whether another open file holds any lock on the byte (asked as for a write lock, which every
/// lock conflicts with).
pub fn byte_is_locked(file: &File, offset: u64) -> io::Result<bool> {
    let mut l = byte(libc::F_WRLCK as libc::c_short, offset);
    // SAFETY: fcntl(2) with F_OFD_GETLK fills the `flock` it is given, on our own descriptor.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut l) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(l.l_type != libc::F_UNLCK as libc::c_short)
}

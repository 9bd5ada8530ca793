//! The process's own set-up, where it needs the C library: core dumps off, the allocator's
//! settings, dropping root for `fetch`, and telling which file a descriptor is. With the local
//! store's and the SQLite queue's `sys.rs`, the only modules that hold `unsafe`.

use std::io;
use std::os::fd::RawFd;

/// Every command that reads the token first turns core dumps off: one would hold the token
/// (and signed URLs) in the clear.
pub fn no_core_dumps() {
    let no_core = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: setrlimit with a valid pointer to an initialised struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_CORE, &no_core) } != 0 {
        tracing::warn!(error = %std::io::Error::last_os_error(), "cannot turn core dumps off");
    }
}

/// Buffers of 128 KiB and more (hyper's read buffers are about 400 KiB, one or more per download)
/// get their own mappings, returned to the kernel when freed. By default glibc raises this
/// threshold after the first such free and keeps later buffers in its heaps, where freed memory
/// stays resident: peak RSS then grows with concurrency (measured in BENCHMARKS.md).
///
/// And one malloc arena per core, not glibc's eight: the download, writer and database threads
/// each touching an arena of their own kept a few MiB resident for nothing (BENCHMARKS.md:
/// peak RSS 2,000 x 1 MiB 26.3 -> about 20 MiB, time unchanged).
pub fn flat_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let arenas = libc::c_int::try_from(cores).unwrap_or(libc::c_int::MAX);
        // SAFETY: mallopt(3) only sets allocator parameters; called before any other thread
        // exists.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
            libc::mallopt(libc::M_ARENA_MAX, arenas.max(1));
        }
    }
}

/// Whether the process runs as root (effective user id 0).
pub fn running_as_root() -> bool {
    // SAFETY: geteuid(2) has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Drops root for good: no supplementary groups, then the group, then the user (the order that
/// leaves no root privilege behind), and the unit's `UMask=0007`. On failure, which step and
/// the system's error.
pub fn become_user(uid: u32, gid: u32) -> Result<(), (&'static str, io::Error)> {
    let step = |what, rc: libc::c_int| {
        if rc == 0 {
            Ok(())
        } else {
            Err((what, io::Error::last_os_error()))
        }
    };
    // SAFETY: plain syscalls on integers; setgroups(2) is given no list (a null pointer with
    // a length of 0).
    unsafe {
        step("setgroups", libc::setgroups(0, std::ptr::null()))?;
        step("setresgid", libc::setresgid(gid, gid, gid))?;
        step("setresuid", libc::setresuid(uid, uid, uid))?;
        libc::umask(0o007);
    }
    Ok(())
}

/// The device and inode of what `fd` refers to, if it is open.
pub fn fd_identity(fd: RawFd) -> Option<(u64, u64)> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: fstat(2) fills the buffer it is given; it is read only when the call succeeded.
    let st = unsafe {
        if libc::fstat(fd, st.as_mut_ptr()) != 0 {
            return None;
        }
        st.assume_init()
    };
    // dev_t and ino_t are not u64 on every target.
    #[allow(clippy::unnecessary_cast)]
    Some((st.st_dev as u64, st.st_ino as u64))
}

/// This host's name (a fleet daemon's default `queue.instance`), kept to the characters an
/// instance name may have.
pub fn host_name() -> String {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let name: String = name
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || "._-".contains(*c))
        .take(64)
        .collect();
    if name.is_empty() {
        "hingnetd".into()
    } else {
        name
    }
}

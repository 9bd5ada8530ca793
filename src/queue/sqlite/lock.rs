//! The locks that stand for live processes, which the kernel drops when a process dies (even on
//! `kill -9`): the single-daemon lock on `<database>.lock`, and a claim lock for each video a
//! `hingnetd fetch` downloads, so that the daemon can tell a live claim from a dead one at once.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::sys;
use crate::queue::QueueError;

/// Holds an exclusive advisory lock on `<database>.lock` for the life of the daemon, so only one
/// daemon serves a database. The kernel drops it when the process dies, even on kill -9.
#[derive(Debug)]
pub struct InstanceLock {
    _file: File,
}

impl InstanceLock {
    pub fn path_for(database: &Path) -> PathBuf {
        let mut p = database.as_os_str().to_owned();
        p.push(".lock");
        PathBuf::from(p)
    }

    pub fn acquire(database: &Path) -> Result<InstanceLock, QueueError> {
        let path = InstanceLock::path_for(database);
        let io = |source| QueueError::LockIo {
            path: path.clone(),
            source,
        };
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        // `status` and `fetch` take the lock for an instant to see whether a daemon holds it:
        // a daemon starting at that moment tries again rather than refusing to run.
        let mut tries = 0;
        let held = loop {
            match file.try_lock() {
                Err(std::fs::TryLockError::WouldBlock) if tries < 20 => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(50));
                }
                other => break other,
            }
        };
        match held {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = match holder.trim() {
                    "" => "unknown pid".to_string(),
                    pid => format!("pid {pid}"),
                };
                return Err(QueueError::AlreadyRunning {
                    database: database.to_owned(),
                    holder,
                });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
        }
        file.set_len(0).map_err(io)?;
        file.rewind().map_err(io)?;
        writeln!(file, "{}", std::process::id()).map_err(io)?;
        Ok(InstanceLock { _file: file })
    }

    /// Whether some daemon holds the lock now (for `status`).
    pub fn is_held(database: &Path) -> bool {
        let Ok(file) = File::open(InstanceLock::path_for(database)) else {
            return false;
        };
        matches!(file.try_lock(), Err(std::fs::TryLockError::WouldBlock))
    }
}

/// A claim made by a process that is not the daemon (`hingnetd fetch`), held for as long as it
/// downloads: a lock on one byte of `<database>.lock`, at an offset drawn from the claim's
/// token. Byte-range locks (open file description locks) do not conflict with the daemon's
/// whole-file lock, and each claim has a lock of its own, so the daemon tests every claim apart.
#[derive(Debug)]
pub struct ClaimLock {
    _file: File,
}

impl ClaimLock {
    /// Where the token's byte is: anywhere below 2^62, so that two live tokens meeting at one
    /// byte is out of the question in practice (and would only make `take` fail).
    fn offset(token: &str) -> u64 {
        // FNV-1a: stable across builds and versions, unlike std's hasher.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in token.bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        h >> 2
    }

    fn open(database: &Path) -> Result<(File, PathBuf), QueueError> {
        let path = InstanceLock::path_for(database);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|source| QueueError::LockIo {
                path: path.clone(),
                source,
            })?;
        Ok((file, path))
    }

    /// Takes the lock for `token`; `None` if another process holds that byte.
    pub fn take(database: &Path, token: &str) -> Result<Option<ClaimLock>, QueueError> {
        let (file, path) = ClaimLock::open(database)?;
        match sys::try_lock_byte(&file, ClaimLock::offset(token)) {
            Ok(true) => Ok(Some(ClaimLock { _file: file })),
            Ok(false) => Ok(None),
            Err(source) => Err(QueueError::LockIo { path, source }),
        }
    }

    /// Whether a live process holds the lock for `token`.
    pub fn is_held(database: &Path, token: &str) -> Result<bool, QueueError> {
        let (file, path) = ClaimLock::open(database)?;
        sys::byte_is_locked(&file, ClaimLock::offset(token))
            .map_err(|source| QueueError::LockIo { path, source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_lock_is_exclusive() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("q.db");
        let held = InstanceLock::acquire(&db).unwrap();
        assert!(InstanceLock::is_held(&db));
        let e = InstanceLock::acquire(&db).unwrap_err();
        assert!(e.to_string().contains("already running"), "{e}");
        drop(held);
        assert!(!InstanceLock::is_held(&db));
        InstanceLock::acquire(&db).unwrap();
    }

    #[test]
    fn a_claim_lock_is_seen_until_it_is_let_go_and_beside_the_daemon_lock() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("q.db");
        let _daemon = InstanceLock::acquire(&db).unwrap();
        assert!(!ClaimLock::is_held(&db, "1-a").unwrap());
        let held = ClaimLock::take(&db, "1-a").unwrap().expect("free");
        assert!(ClaimLock::is_held(&db, "1-a").unwrap());
        assert!(!ClaimLock::is_held(&db, "1-b").unwrap());
        assert!(ClaimLock::take(&db, "1-a").unwrap().is_none());
        drop(held);
        assert!(!ClaimLock::is_held(&db, "1-a").unwrap());
        // The daemon's lock is still its own.
        assert!(InstanceLock::is_held(&db));
    }
}

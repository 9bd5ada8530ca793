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
/// downloads: a read lock on one byte of `<database>.claims`, at an offset drawn from the
/// claim's token, so that the daemon tests every claim apart. The file holds nothing and is
/// only ever opened for reading (a read lock needs no more), so whoever created it, every user
/// of the queue can take and test the locks; the daemon's own lock file is left to the daemon.
#[derive(Debug)]
pub struct ClaimLock {
    _file: File,
}

/// Tokens tried before giving up on a claim lock. Read locks never conflict with each other:
/// every byte taken means a write lock over the whole file, which no hingnetd takes (a
/// filesystem that emulates locks badly).
const CLAIM_LOCK_TRIES: usize = 8;

impl ClaimLock {
    pub fn path_for(database: &Path) -> PathBuf {
        let mut p = database.as_os_str().to_owned();
        p.push(".claims");
        PathBuf::from(p)
    }

    /// Where the token's byte is: anywhere below 2^62.
    fn offset(token: &str) -> u64 {
        // FNV-1a: stable across builds and versions, unlike std's hasher.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in token.bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        h >> 2
    }

    /// Opens the claims file for reading, creating it (empty, readable by all) if need be.
    fn open_or_create(path: &Path) -> std::io::Result<File> {
        use std::os::unix::fs::OpenOptionsExt;
        match File::open(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                match std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o644)
                    .open(path)
                {
                    Ok(_) => {}
                    // Another process made it meanwhile.
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(e),
                }
                File::open(path)
            }
            other => other,
        }
    }

    /// A fresh claim token (from `token`) with its lock taken. The lock is a safeguard, not a
    /// condition of the claim: where it cannot be had, the claim goes ahead without one, and
    /// says so; a daemon may then take the row over, which the partial file's own lock and the
    /// claim's token keep harmless.
    pub fn take(database: &Path, token: impl Fn() -> String) -> (String, Option<ClaimLock>) {
        let path = ClaimLock::path_for(database);
        let why = match ClaimLock::open_or_create(&path) {
            Ok(file) => {
                let mut tried = 0;
                loop {
                    let t = token();
                    match sys::try_lock_byte(&file, ClaimLock::offset(&t)) {
                        Ok(true) => return (t, Some(ClaimLock { _file: file })),
                        Ok(false) if tried + 1 < CLAIM_LOCK_TRIES => tried += 1,
                        Ok(false) => break "every byte tried is locked".to_owned(),
                        Err(e) => break e.to_string(),
                    }
                }
            }
            Err(e) => e.to_string(),
        };
        tracing::warn!(path = %path.display(), reason = %why, "cannot take a claim lock; a daemon may take this video over");
        (token(), None)
    }

    /// Whether a live process holds the lock for `token`. One that cannot be told (no claims
    /// file, or an unreadable one) counts as not held: the row goes back to pending, and the
    /// claim's token keeps the other process from recording over it.
    pub fn is_held(database: &Path, token: &str) -> bool {
        File::open(ClaimLock::path_for(database))
            .and_then(|file| sys::byte_is_locked(&file, ClaimLock::offset(token)))
            .unwrap_or(false)
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
        // Before any daemon ran: the claims file is made, the daemon's lock file is not.
        assert!(!ClaimLock::is_held(&db, "1-a"));
        let (token, held) = ClaimLock::take(&db, || "1-a".into());
        let held = held.expect("free");
        assert_eq!(token, "1-a");
        assert!(!InstanceLock::path_for(&db).exists());
        assert!(ClaimLock::is_held(&db, "1-a"));
        assert!(!ClaimLock::is_held(&db, "1-b"));
        // A daemon starting meanwhile: its lock and the claim lock are held side by side.
        let _daemon = InstanceLock::acquire(&db).unwrap();
        assert!(ClaimLock::is_held(&db, "1-a"));
        let (_, second) = ClaimLock::take(&db, || "1-c".into());
        assert!(second.is_some());
        drop(held);
        assert!(!ClaimLock::is_held(&db, "1-a"));
        assert!(ClaimLock::is_held(&db, "1-c"));
        assert!(InstanceLock::is_held(&db));
    }
}

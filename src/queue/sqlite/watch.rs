//! Noticing other processes' commits to the queue database at once, by watching its directory.
//!
//! A producer's commit lands in the `-wal` file, not the database file, and inotify reports the
//! write of the WAL frames *before* SQLite publishes the commit in the shared-memory index. So a
//! file event only says "look soon": `Sqlite::changed` confirms with `PRAGMA data_version`, and
//! re-checks a few times over the next second (`Recheck`) when the first look sees nothing yet.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::Notify;
use tokio::time::Instant;

#[derive(Debug, thiserror::Error)]
#[error("cannot watch {dir} for new rows: {source}")]
pub struct WatchError {
    dir: PathBuf,
    source: notify::Error,
}

/// Keeps the watch alive; dropping it stops it.
pub struct DbWatch {
    _watcher: notify::RecommendedWatcher,
}

/// Starts watching the directory of `database`; every write to the database, its WAL or its
/// rollback journal calls `wake.notify_one()` (coalesced: a burst is one wake-up).
pub fn watch(database: &Path, wake: Arc<Notify>) -> Result<DbWatch, WatchError> {
    let dir = match database.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    let name = database.file_name().map(OsString::from).unwrap_or_default();
    let names: Vec<OsString> = ["", "-wal", "-journal"]
        .iter()
        .map(|s| {
            let mut n = name.clone();
            n.push(s);
            n
        })
        .collect();
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        let Ok(event) = res else {
            // An overflowed or failed watch: wake anyway, the check is cheap.
            wake.notify_one();
            return;
        };
        let relevant_kind = matches!(
            event.kind,
            EventKind::Modify(_) | EventKind::Create(_) | EventKind::Any
        ) || matches!(
            event.kind,
            EventKind::Access(notify::event::AccessKind::Close(
                notify::event::AccessMode::Write
            ))
        );
        let ours = event
            .paths
            .iter()
            .any(|p| p.file_name().is_some_and(|f| names.iter().any(|n| n == f)));
        if relevant_kind && ours {
            wake.notify_one();
        }
    })
    .map_err(|source| WatchError {
        dir: dir.clone(),
        source,
    })?;
    watcher
        .watch(&dir, RecursiveMode::NonRecursive)
        .map_err(|source| WatchError {
            dir: dir.clone(),
            source,
        })?;
    Ok(DbWatch { _watcher: watcher })
}

/// The follow-up checks after a file event: 5 ms, then doubling, for about 1.3 s in all.
#[derive(Debug, Default)]
pub struct Recheck {
    next: Option<(Instant, u32)>,
}

impl Recheck {
    const FIRST: Duration = Duration::from_millis(5);
    const STEPS: u32 = 8;

    /// A file event arrived: check now, then keep checking for a while.
    pub fn start(&mut self) {
        self.next = Some((Instant::now(), 0));
    }

    pub fn due_at(&self) -> Option<Instant> {
        self.next.map(|(t, _)| t)
    }

    /// A check happened and found nothing new: schedule the next one, if any.
    pub fn advance(&mut self) {
        self.next = match self.next {
            Some((_, step)) if step < Self::STEPS => {
                Some((Instant::now() + Self::FIRST * 2u32.pow(step), step + 1))
            }
            _ => None,
        };
    }
}

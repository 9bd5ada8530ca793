//! The queue on SQLite, the embedded default, behind the queue's contracts: the connection
//! and every statement (`db`), the single-daemon lock and the claim locks (`lock`), and the
//! file watch with `PRAGMA data_version` as its change notification (`watch`).
//!
//! rusqlite is blocking. The daemon's calls (`Claims`) never run on an async worker: each goes
//! to tokio's blocking pool, one at a time over one connection (`Sqlite::call`). The operator's
//! commands (`Admin`) block their own thread.

mod db;
mod lock;
mod sys;
mod watch;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;

pub use db::WAL_SIZE_LIMIT;
use db::{Queue, new_token};
use lock::{ClaimLock, InstanceLock};

use super::{
    Claimed, Counts, Cursor, Enqueued, Finish, LogEntry, QueueError, Recovered, Removal, RowView,
    State, Status,
};

/// The queue on SQLite, behind the contracts: one connection, with what the daemon holds.
pub struct Sqlite {
    db: Arc<Mutex<Queue>>,
    path: PathBuf,
    /// The daemon's alone (`serve`).
    serving: Option<Serving>,
    /// The claims `claim_one` made in this process and has not finished, by token.
    claim_locks: Mutex<HashMap<String, ClaimLock>>,
}

/// What `hingnetd run` holds: the single-daemon lock, and the watch on the database's files
/// with the `data_version` checks that confirm what it saw (see `watch`).
struct Serving {
    _watch: watch::DbWatch,
    wake: Arc<Notify>,
    recheck: Mutex<watch::Recheck>,
    version: AtomicI64,
}

impl Sqlite {
    fn new(q: Queue, serving: Option<Serving>) -> Sqlite {
        Sqlite {
            path: q.path().to_owned(),
            db: Arc::new(Mutex::new(q)),
            serving,
            claim_locks: Mutex::default(),
        }
    }

    /// For the daemon: the lock first (a second daemon stops here, before it touches the
    /// schema), then the migrations. The caller keeps the lock for as long as the process runs.
    pub fn open_for_daemon(path: &Path) -> Result<(InstanceLock, Unwatched), QueueError> {
        let lock = InstanceLock::acquire(path)?;
        let q = Queue::open_and_migrate(path)?;
        Ok((lock, Unwatched(q)))
    }

    pub fn open_existing(path: &Path) -> Result<Sqlite, QueueError> {
        Ok(Sqlite::new(Queue::open_existing(path)?, None))
    }

    pub fn open_and_migrate(path: &Path) -> Result<Sqlite, QueueError> {
        Ok(Sqlite::new(Queue::open_and_migrate(path)?, None))
    }

    fn db(&self) -> MutexGuard<'_, Queue> {
        self.db.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on the connection on tokio's blocking pool: a statement may wait seconds on a
    /// producer's lock, which must not stall an async worker.
    async fn call<T, F>(&self, f: F) -> Result<T, QueueError>
    where
        F: FnOnce(&mut Queue) -> Result<T, QueueError> + Send + 'static,
        T: Send + 'static,
    {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || f(&mut db.lock().unwrap_or_else(|p| p.into_inner())))
            .await
            .expect("queue database task panicked")
    }

    fn claim_locks(&self) -> MutexGuard<'_, HashMap<String, ClaimLock>> {
        self.claim_locks.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The daemon's connection before its watch starts (`Unwatched::serve`).
pub struct Unwatched(Queue);

impl Unwatched {
    /// Starts watching the database's files for other processes' commits.
    pub fn serve(self) -> Result<Sqlite, QueueError> {
        let q = self.0;
        let version = q.data_version().unwrap_or(0);
        let wake = Arc::new(Notify::new());
        let watch =
            watch::watch(q.path(), wake.clone()).map_err(|e| QueueError::Watch(e.into()))?;
        Ok(Sqlite::new(
            q,
            Some(Serving {
                _watch: watch,
                wake,
                recheck: Mutex::default(),
                version: AtomicI64::new(version),
            }),
        ))
    }
}

#[async_trait::async_trait]
impl super::Claims for Sqlite {
    async fn claim(
        &self,
        n: usize,
        avoid: Vec<String>,
        or_avoided: bool,
    ) -> Result<Vec<Claimed>, QueueError> {
        let (claimed, took) = self
            .call(move |q| {
                let t = std::time::Instant::now();
                let mut c = q.claim(n, &avoid)?;
                if c.is_empty() && !avoid.is_empty() && or_avoided {
                    c = q.claim(n, &[])?;
                }
                Ok((c, t.elapsed()))
            })
            .await?;
        // The claim's own cost (the UPDATE and its commit, on the database thread); the
        // benchmark reads it to report claim time on a large queue.
        tracing::debug!(
            claimed = claimed.len(),
            took_us = took.as_micros() as u64,
            "claimed due rows"
        );
        Ok(claimed)
    }

    async fn claim_one(&self, video_id: &str) -> Result<Result<Claimed, State>, QueueError> {
        // The claim lock first, then the claim: the daemon never sees this claim without a
        // live lock behind it (where one can be had: see `ClaimLock::take`), so it never takes
        // the row over.
        let (token, lock) = ClaimLock::take(&self.path, new_token);
        let id = video_id.to_owned();
        let t = token.clone();
        let claimed = self.call(move |q| q.claim_one(&id, &t)).await?;
        if let (Ok(_), Some(lock)) = (&claimed, lock) {
            self.claim_locks().insert(token, lock);
        }
        Ok(claimed)
    }

    async fn finish(
        &self,
        claimed: &Claimed,
        finish: &Finish,
        elapsed: Duration,
        expires_at: Option<i64>,
    ) -> Result<bool, QueueError> {
        let (c, f) = (claimed.clone(), finish.clone());
        let ours = self
            .call(move |q| q.finish(&c, &f, elapsed, expires_at))
            .await;
        if ours.is_ok() {
            self.claim_locks().remove(&claimed.token);
        }
        ours
    }

    async fn fail_released(
        &self,
        claimed: &Claimed,
        error: &str,
        http_status: Option<u16>,
    ) -> Result<bool, QueueError> {
        let (c, e) = (claimed.clone(), error.to_owned());
        self.call(move |q| q.fail_released(&c, &e, http_status))
            .await
    }

    /// A claim is alive while its process holds its claim lock (`hingnetd fetch`), or while
    /// this daemon downloads it (`ours`): the daemon's own claims need no lock, as no other
    /// process recovers rows while it holds the single-daemon lock.
    async fn recover_stale(&self, ours: Vec<String>) -> Recovered {
        let path = self.path.clone();
        self.call(move |q| {
            let mut done = Recovered::default();
            let held = match q.downloading() {
                Ok(rows) => rows,
                Err(e) => {
                    done.error = Some(e);
                    return Ok(done);
                }
            };
            for held in held {
                if ours.contains(&held.video_id) {
                    continue;
                }
                if let Some(token) = &held.token
                    && ClaimLock::is_held(&path, token)
                {
                    continue;
                }
                match q.release_stale(&held) {
                    Ok(true) => done.released.push(held.video_id),
                    Ok(false) => {}
                    Err(e) => {
                        done.error = Some(e);
                        break;
                    }
                }
            }
            Ok(done)
        })
        .await
        .unwrap_or_else(|e| Recovered {
            released: Vec::new(),
            error: Some(e),
        })
    }

    async fn next_due_in(&self) -> Result<Option<Duration>, QueueError> {
        self.call(|q| q.next_due_in()).await
    }

    async fn counts(&self) -> Result<Counts, QueueError> {
        self.call(|q| q.counts()).await
    }

    async fn set_pauses(&self, pauses: Vec<crate::pause::Record>) -> Result<(), QueueError> {
        self.call(move |q| q.set_pauses(&pauses)).await
    }

    /// A file event says "look soon"; `PRAGMA data_version` confirms a commit, checked again
    /// a few times over the next second when the first look sees nothing yet (see `watch`).
    /// After a change, the checks go on: the event may belong to a later commit than the one
    /// just seen.
    async fn changed(&self) {
        let Some(s) = &self.serving else {
            return std::future::pending().await;
        };
        let recheck = || s.recheck.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let due = recheck().due_at();
            match due {
                None => {
                    s.wake.notified().await;
                    recheck().start();
                    continue;
                }
                Some(at) => {
                    tokio::select! {
                        _ = s.wake.notified() => {
                            recheck().start();
                            continue;
                        }
                        _ = tokio::time::sleep_until(at) => {}
                    }
                }
            }
            match self.call(|q| q.data_version()).await {
                Ok(v) if s.version.swap(v, Ordering::Relaxed) != v => {
                    recheck().start();
                    return;
                }
                _ => recheck().advance(),
            }
        }
    }
}

impl super::Admin for Sqlite {
    fn enqueue(&self, ids: &[String]) -> Result<Enqueued, QueueError> {
        self.db().enqueue(ids.iter().map(String::as_str))
    }

    fn retry_failed(&self, ids: Option<&[String]>) -> Result<Vec<String>, QueueError> {
        self.db().retry_failed(ids)
    }

    fn remove(&self, video_id: &str, force: bool) -> Result<Removal, QueueError> {
        self.db().remove(video_id, force)
    }

    fn requeue_archived(
        &self,
        video_id: &str,
        sha256: Option<&str>,
        why: &str,
        then: &mut dyn FnMut() -> Result<Option<String>, String>,
    ) -> Result<Option<Result<Option<String>, String>>, QueueError> {
        self.db().requeue_archived(video_id, sha256, why, then)
    }

    fn status(&self, failures: usize) -> Result<Status, QueueError> {
        self.db().status(failures)
    }

    fn list(&self, state: Option<State>, limit: usize) -> Result<Vec<RowView>, QueueError> {
        self.db().list(state, limit)
    }

    fn get(&self, video_id: &str) -> Result<Option<RowView>, QueueError> {
        self.db().get(video_id)
    }

    fn resolve(&self, video_id: &str) -> Result<Option<String>, QueueError> {
        self.db().resolve(video_id)
    }

    fn history(&self, video_id: &str) -> Result<Vec<LogEntry>, QueueError> {
        self.db().history(video_id)
    }

    fn archived_page(&self, after: Cursor, n: usize) -> Result<Vec<(Cursor, RowView)>, QueueError> {
        self.db().archived_page(after, n)
    }

    fn archived_bytes(&self) -> Result<u64, QueueError> {
        self.db().archived_bytes()
    }

    fn pauses(&self) -> Result<Vec<crate::pause::Published>, QueueError> {
        self.db().pauses()
    }

    fn daemon_running(&self) -> bool {
        self.serving.is_some() || InstanceLock::is_held(&self.path)
    }

    fn location(&self) -> String {
        self.path.display().to_string()
    }
}

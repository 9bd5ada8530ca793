//! One connection to the SQLite queue, and every statement the daemon and the operator's
//! commands run on it: opening (WAL, `synchronous=FULL`, the file's mode), migrations, claims
//! in expiry order, outcomes guarded by the claim's token, the attempt log, the published
//! pauses, and busy retries (`with_busy_retry`). Blocking: `Sqlite` (`mod.rs`) keeps it off the
//! async workers.

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::types::{Value, ValueRef};
use rusqlite::{
    Connection, ErrorCode, OptionalExtension, TransactionBehavior, named_params, params,
};

use crate::queue::{
    Claimed, Counts, Cursor, EXPIRING_SOON, Enqueued, FailureRow, FileRecord, Finish, LogEntry,
    MAX_DELAY, Oldest, QueueError, Removal, RowId, RowView, State, Status,
};

/// The migrations, in order. `PRAGMA user_version` records how many have been applied.
/// Append only: a shipped migration is never edited.
const MIGRATIONS: &[(&str, &str)] = &[
    (
        "0001_queue.sql",
        include_str!("../../../migrations/sqlite/0001_queue.sql"),
    ),
    (
        "0002_attempt_log.sql",
        include_str!("../../../migrations/sqlite/0002_attempt_log.sql"),
    ),
    (
        "0003_claimed_by.sql",
        include_str!("../../../migrations/sqlite/0003_claimed_by.sql"),
    ),
    (
        "0004_state_bytes_index.sql",
        include_str!("../../../migrations/sqlite/0004_state_bytes_index.sql"),
    ),
    (
        "0005_expiry_metadata.sql",
        include_str!("../../../migrations/sqlite/0005_expiry_metadata.sql"),
    ),
    (
        "0006_daemon_pauses.sql",
        include_str!("../../../migrations/sqlite/0006_daemon_pauses.sql"),
    ),
];

/// Attempt-log entries kept per video.
const LOG_KEEP: i64 = 20;

/// SQLite's own clock, in the text format every timestamp column uses.
const NOW: &str = "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')";

/// The claim order's key: a row's expiry, rows without one after every real time. Spelled as
/// in the `queue_pending_expiry` index, which the planner uses only for this exact expression.
const EXPIRY_KEY: &str = "coalesce(expires_at, '9999-12-31T23:59:59.999Z')";

/// Due rows up to which a claim sorts them by expiry itself (see `Queue::claim`).
const SORT_DUE_UP_TO: i64 = 256;

/// How long one statement waits on a producer's lock before we log and try again.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Size the WAL file is cut back to after a checkpoint (`PRAGMA journal_size_limit`).
pub const WAL_SIZE_LIMIT: i64 = 4 << 20;

fn sql(what: impl Into<String>) -> impl FnOnce(rusqlite::Error) -> QueueError {
    move |source| QueueError::Query {
        what: what.into(),
        source: source.into(),
    }
}

/// The key as a producer stored it, kept opaque outside this module: a tag, then the value.
fn row_id(v: ValueRef<'_>) -> RowId {
    let (tag, bytes): (u8, Vec<u8>) = match v {
        ValueRef::Null => (b'n', Vec::new()),
        ValueRef::Integer(i) => (b'i', i.to_le_bytes().to_vec()),
        ValueRef::Real(f) => (b'r', f.to_bits().to_le_bytes().to_vec()),
        ValueRef::Text(t) => (b't', t.to_vec()),
        ValueRef::Blob(b) => (b'b', b.to_vec()),
    };
    let mut out = Vec::with_capacity(1 + bytes.len());
    out.push(tag);
    out.extend(bytes);
    RowId(out)
}

/// The stored key back from `row_id`, to bind in a statement.
pub(super) fn key_of(id: &RowId) -> Value {
    let (tag, rest) = id.0.split_first().unwrap_or((&b'n', &[]));
    let eight = || <[u8; 8]>::try_from(rest).unwrap_or_default();
    match tag {
        b'i' => Value::Integer(i64::from_le_bytes(eight())),
        b'r' => Value::Real(f64::from_bits(u64::from_le_bytes(eight()))),
        b't' => Value::Text(String::from_utf8_lossy(rest).into_owned()),
        b'b' => Value::Blob(rest.to_vec()),
        _ => Value::Null,
    }
}

/// What a claim returns, in the order `Claimed::from_row` reads it.
const CLAIMED_COLUMNS: &str = "video_id, attempts, \
     (julianday('now') - julianday(first_attempt_at)) * 86400000.0, \
     CAST(round((julianday(expires_at) - 2440587.5) * 86400.0) AS INTEGER)";

fn claimed_from_row(r: &rusqlite::Row<'_>, token: &str) -> rusqlite::Result<Claimed> {
    let ms: f64 = r.get::<_, Option<f64>>(2)?.unwrap_or(0.0);
    Ok(Claimed {
        // An ID a producer stored as a blob fails the ID check later; its row is still
        // found through `row`.
        row: row_id(r.get_ref(0)?),
        video_id: id_text(r.get_ref(0)?),
        token: token.to_owned(),
        attempts: r.get(1)?,
        since_first_attempt: Duration::from_millis(ms.max(0.0) as u64),
        expires_at: r.get(3)?,
    })
}

/// A `downloading` row as the orphan check sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Held {
    /// The key exactly as stored (see `row_id`).
    pub key: Value,
    pub video_id: String,
    pub token: Option<String>,
}

/// The columns `row_view` reads, in order. The last: whether `next_attempt_at` has come, by
/// SQLite's clock and its reading of the text (a producer may have written its own format).
const ROW_COLUMNS: &str = "video_id, state, attempts, next_attempt_at, last_error, http_status, \
     path, sha256, bytes, enqueued_at, first_attempt_at, finished_at, expires_at, metadata, \
     coalesce(julianday('now') - julianday(next_attempt_at) >= 0, 0)";

fn row_view(r: &rusqlite::Row<'_>) -> rusqlite::Result<RowView> {
    row_view_at(r, 0)
}

fn row_view_at(r: &rusqlite::Row<'_>, i: usize) -> rusqlite::Result<RowView> {
    let state: String = r.get(i + 1)?;
    Ok(RowView {
        video_id: id_text(r.get_ref(i)?),
        // The schema's CHECK allows no other word.
        state: State::parse(&state).ok_or_else(|| {
            rusqlite::Error::FromSqlConversionFailure(
                i + 1,
                rusqlite::types::Type::Text,
                format!("unknown state {state:?}").into(),
            )
        })?,
        attempts: r.get(i + 2)?,
        next_attempt_at: r.get(i + 3)?,
        last_error: r.get(i + 4)?,
        http_status: r.get(i + 5)?,
        path: r.get(i + 6)?,
        sha256: r.get(i + 7)?,
        bytes: r.get(i + 8)?,
        enqueued_at: r.get(i + 9)?,
        first_attempt_at: r.get(i + 10)?,
        finished_at: r.get(i + 11)?,
        // A producer may have stored anything here; it is shown, never trusted.
        expires_at: r
            .get::<_, Option<rusqlite::types::Value>>(i + 12)?
            .map(|v| match v {
                rusqlite::types::Value::Text(t) => t,
                other => format!("{other:?}"),
            }),
        metadata: r.get(i + 13)?,
        due: r.get(i + 14)?,
        archived_on: None,
    })
}

/// One connection to the queue database.
#[derive(Debug)]
pub struct Queue {
    conn: Connection,
    path: PathBuf,
}

impl Queue {
    /// Opens (creating if needed) and migrates. For `run`, `migrate` and `enqueue`.
    pub fn open_and_migrate(path: &Path) -> Result<Queue, QueueError> {
        let mut q = Queue::open_raw(path)?;
        // SQLite quietly opens a file it cannot write read-only; the first claim would fail,
        // and every one after it. Say so at start instead.
        if q.conn.is_readonly(rusqlite::MAIN_DB).unwrap_or(false) {
            return Err(QueueError::ReadOnly {
                path: path.to_owned(),
            });
        }
        q.migrate()?;
        Ok(q)
    }

    /// Opens an existing database for the operator's commands: one that was never migrated is
    /// refused rather than created.
    pub fn open_existing(path: &Path) -> Result<Queue, QueueError> {
        if !path.exists() {
            return Err(QueueError::NotMigrated {
                path: path.to_owned(),
            });
        }
        let mut q = Queue::open_raw(path)?;
        if q.checked_version()? == 0 {
            return Err(QueueError::NotMigrated {
                path: path.to_owned(),
            });
        }
        // An older schema (a newer binary installed, daemon not yet restarted) is upgraded
        // in place, as the daemon would.
        q.migrate()?;
        Ok(q)
    }

    fn open_raw(path: &Path) -> Result<Queue, QueueError> {
        let open_err = |source: rusqlite::Error| QueueError::Open {
            path: path.to_owned(),
            source: source.into(),
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| QueueError::Create {
                path: dir.to_owned(),
                source: e,
            })?;
        }
        // SQLite would create a new database 0644 & ~umask (0640 under the unit's UMask=0007),
        // which producers in the group could not write. An empty file is a valid new database,
        // so create it first as 0660 & ~umask; SQLite gives -wal/-shm the database file's mode.
        if let Err(e) = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o660)
            .open(path)
            && e.kind() != std::io::ErrorKind::AlreadyExists
        {
            return Err(QueueError::Create {
                path: path.to_owned(),
                source: e,
            });
        }
        let conn = Connection::open(path).map_err(open_err)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(open_err)?;
        // WAL lets producers insert while we read and write; FULL makes a commit (a row marked
        // done) survive power loss, not just a crash of the process.
        let mode: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
            .map_err(open_err)?;
        if !mode.eq_ignore_ascii_case("wal") {
            tracing::warn!(database = %path.display(), journal_mode = %mode, "database is not in WAL mode");
        }
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(open_err)?;
        // A producer holding a read snapshot for long stops checkpoints from reaching the end
        // of the WAL, which then grows with every commit. Once it lets go and a checkpoint
        // completes, this gives the space back instead of keeping the file at its peak size.
        conn.pragma_update(None, "journal_size_limit", WAL_SIZE_LIMIT)
            .map_err(open_err)?;
        Ok(Queue {
            conn,
            path: path.to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn user_version(&self) -> Result<i64, QueueError> {
        self.conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(|source| QueueError::Open {
                path: self.path.clone(),
                source: source.into(),
            })
    }

    /// Applies the migrations this database has not seen yet, each in its own transaction
    /// together with the `user_version` bump, so a crash leaves a consistent version.
    pub fn migrate(&mut self) -> Result<usize, QueueError> {
        let mut applied = 0;
        loop {
            // A read first: an up-to-date database (every start but the first after an
            // upgrade) needs no write lock, so a producer holding one cannot stop a start.
            let v = self.checked_version()?;
            let Some(&(name, text)) = MIGRATIONS.get(v) else {
                return Ok(applied);
            };
            let mig_err = |source: rusqlite::Error| QueueError::Migration {
                path: self.path.clone(),
                name,
                source: source.into(),
            };
            with_busy_retry("begin a migration", || {
                self.conn.execute_batch("BEGIN IMMEDIATE")
            })?;
            // Another process may have migrated meanwhile: decide again under the lock.
            let result = match self.checked_version() {
                Ok(now) if now == v => self
                    .conn
                    .execute_batch(text)
                    .and_then(|_| {
                        self.conn
                            .pragma_update(None, "user_version", (v + 1) as i64)
                    })
                    .map_err(mig_err)
                    .map(|_| true),
                Ok(_) => Ok(false),
                Err(e) => Err(e),
            };
            match result {
                Ok(did) => {
                    self.conn.execute_batch("COMMIT").map_err(mig_err)?;
                    if did {
                        tracing::info!(database = %self.path.display(), migration = name, "applied migration");
                        applied += 1;
                    }
                }
                Err(e) => {
                    let _ = self.conn.execute_batch("ROLLBACK");
                    return Err(e);
                }
            }
        }
    }

    /// `user_version`, refusing a database newer than this binary.
    fn checked_version(&self) -> Result<usize, QueueError> {
        let v = self.user_version()?;
        let v = usize::try_from(v).unwrap_or(usize::MAX);
        if v > MIGRATIONS.len() {
            return Err(QueueError::TooNew {
                path: self.path.clone(),
                found: v as i64,
                known: MIGRATIONS.len(),
            });
        }
        Ok(v)
    }

    /// Rows in `downloading` with their claim tokens: candidates for recovery when their
    /// downloader is gone.
    pub fn downloading(&self) -> Result<Vec<Held>, QueueError> {
        with_busy_retry("list downloading rows", || {
            self.conn
                .prepare_cached(
                    "SELECT video_id, claimed_by FROM queue WHERE state = 'downloading'",
                )?
                .query_map([], |r| {
                    Ok(Held {
                        key: r.get(0)?,
                        video_id: id_text(r.get_ref(0)?),
                        token: r.get(1)?,
                    })
                })?
                .collect()
        })
    }

    /// Puts a `downloading` row whose downloader is gone back to `pending`, if it is still held
    /// by the same claim. Returns whether it was.
    pub fn release_stale(&self, held: &Held) -> Result<bool, QueueError> {
        with_busy_retry("recover an interrupted row", || {
            self.conn.execute(
                &format!(
                    "UPDATE queue SET state = 'pending', next_attempt_at = {NOW}, claimed_by = NULL, \
                     last_error = coalesce(last_error, 'interrupted: its downloader stopped') \
                     WHERE video_id = ?1 AND state = 'downloading' AND claimed_by IS ?2"
                ),
                params![held.key, held.token],
            )
        })
        .map(|n| n > 0)
    }

    /// Claims up to `n` due rows in one statement: the video that expires first first, then
    /// those without an expiry, earliest due first. `except` names videos not to claim now
    /// (the token probe's suspects).
    ///
    /// No one index serves "due, by expiry": when few rows are due (at most `SORT_DUE_UP_TO`,
    /// the usual case) they are found by `queue_state_due` and sorted; when many are (a
    /// backlog, where the order matters most) `queue_pending_expiry` is read in expiry order,
    /// skipping those not due. Either way a large set of rows waiting out a backoff is not
    /// walked at every claim.
    pub fn claim(&self, n: usize, except: &[String]) -> Result<Vec<Claimed>, QueueError> {
        let token = new_token();
        let except = serde_json::to_string(except).expect("strings serialize");
        with_busy_retry("claim due rows", || {
            let due: i64 = self
                .conn
                .prepare_cached(&format!(
                    "SELECT count(*) FROM (SELECT 1 FROM queue INDEXED BY queue_state_due \
                     WHERE state = 'pending' AND next_attempt_at <= {NOW} LIMIT ?1)"
                ))?
                .query_row([SORT_DUE_UP_TO + 1], |r| r.get(0))?;
            let pick = if due > SORT_DUE_UP_TO {
                format!(
                    "SELECT rowid FROM queue INDEXED BY queue_pending_expiry \
                     WHERE state = 'pending' AND next_attempt_at <= {NOW} \
                       AND video_id NOT IN (SELECT value FROM json_each(?3)) \
                     ORDER BY {EXPIRY_KEY}, next_attempt_at LIMIT ?1"
                )
            } else {
                format!(
                    "SELECT rowid FROM queue INDEXED BY queue_state_due \
                     WHERE state = 'pending' AND next_attempt_at <= {NOW} \
                       AND video_id NOT IN (SELECT value FROM json_each(?3)) \
                     ORDER BY {EXPIRY_KEY}, next_attempt_at LIMIT ?1"
                )
            };
            let mut stmt = self.conn.prepare_cached(&format!(
                "UPDATE queue SET state = 'downloading', attempts = attempts + 1, \
                     first_attempt_at = coalesce(first_attempt_at, {NOW}), claimed_by = ?2 \
                 WHERE rowid IN ({pick}) \
                 RETURNING {CLAIMED_COLUMNS}"
            ))?;
            let rows = stmt.query_map(params![n as i64, token, except], |r| {
                claimed_from_row(r, &token)
            })?;
            rows.collect()
        })
    }

    /// Records a claimed video's outcome. Guarded on `state = 'downloading'` so an operator's
    /// edit made meanwhile (a deleted or reset row) is not overwritten; returns whether the row
    /// was still ours.
    ///
    /// `expires_at` (unix seconds) is what the attempt learned from the status object; it
    /// replaces what the row held.
    pub fn finish(
        &self,
        claimed: &Claimed,
        finish: &Finish,
        elapsed: Duration,
        expires_at: Option<i64>,
    ) -> Result<bool, QueueError> {
        let what = format!("record outcome of {}", claimed.video_id);
        with_busy_retry(&what, || {
            let tx = self.conn.unchecked_transaction()?;
            let ours = self.update_row(claimed, finish, expires_at)? == 1;
            if ours {
                self.log_attempt(claimed, finish, elapsed)?;
            }
            tx.commit()?;
            Ok(ours)
        })
    }

    /// Fails a row that a claim gave back to `pending` (`Finish::Release`) once it is clear the
    /// video itself was refused (the API refused it while it accepted the token for others).
    /// Guarded on the row still being pending: a `hingnetd fetch` or an operator may have
    /// taken it meanwhile. Returns whether it was failed.
    pub fn fail_released(
        &self,
        claimed: &Claimed,
        error: &str,
        http_status: Option<u16>,
    ) -> Result<bool, QueueError> {
        let what = format!("fail {}", claimed.video_id);
        let failed = Finish::Failed {
            error: error.to_owned(),
            http_status,
            kept: None,
        };
        with_busy_retry(&what, || {
            let tx = self.conn.unchecked_transaction()?;
            let n = self.conn.execute(
                &format!(
                    "UPDATE queue SET state = 'failed', last_error = ?2, http_status = ?3, \
                     finished_at = {NOW} WHERE video_id = ?1 AND state = 'pending'"
                ),
                params![key_of(&claimed.row), error, http_status],
            )?;
            if n == 1 {
                self.log_attempt(claimed, &failed, Duration::ZERO)?;
            }
            tx.commit()?;
            Ok(n == 1)
        })
    }

    fn log_attempt(
        &self,
        claimed: &Claimed,
        finish: &Finish,
        elapsed: Duration,
    ) -> rusqlite::Result<()> {
        let (outcome, http_status, bytes) = finish.log_fields();
        self.conn
            .prepare_cached(
                "INSERT INTO attempt_log(video_id, attempt, outcome, http_status, bytes, \
                 elapsed_ms, detail) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?
            .execute(params![
                claimed.video_id,
                claimed.attempts,
                outcome,
                http_status,
                bytes.map(|b| b as i64),
                elapsed.as_millis() as i64,
                finish.describe()
            ])?;
        self.conn
            .prepare_cached(
                "DELETE FROM attempt_log WHERE video_id = ?1 AND id <= \
                 (SELECT id FROM attempt_log WHERE video_id = ?1 ORDER BY id DESC \
                  LIMIT 1 OFFSET ?2)",
            )?
            .execute(params![claimed.video_id, LOG_KEEP])?;
        Ok(())
    }

    /// Every transition out of `downloading` is guarded by the claim's token and clears it,
    /// and takes the expiry the attempt learned.
    fn update_row(
        &self,
        claimed: &Claimed,
        finish: &Finish,
        expires_at: Option<i64>,
    ) -> rusqlite::Result<usize> {
        const OURS: &str = "video_id = :id AND state = 'downloading' AND claimed_by = :token";
        const EXPIRY: &str =
            "expires_at = coalesce(strftime('%Y-%m-%dT%H:%M:%fZ', :exp, 'unixepoch'), expires_at)";
        let (id, token) = (&key_of(&claimed.row), &claimed.token);
        let file = |f: &FileRecord, error: Option<&str>, state: &str, status: Option<u16>| {
            self.conn.execute(
                &format!(
                    "UPDATE queue SET state = :state, path = :path, sha256 = :sha, bytes = :bytes, \
                     metadata = :meta, http_status = :status, last_error = :error, \
                     finished_at = {NOW}, claimed_by = NULL, {EXPIRY} WHERE {OURS}"
                ),
                named_params! {
                    ":id": id, ":token": token, ":state": state, ":path": f.path,
                    ":sha": f.sha256, ":bytes": f.bytes as i64, ":meta": f.metadata,
                    ":status": status, ":error": error, ":exp": expires_at,
                },
            )
        };
        match finish {
            Finish::Done { file: f, http_status } => file(f, None, "done", Some(*http_status)),
            Finish::Failed {
                error,
                http_status,
                kept: Some(f),
            } => file(f, Some(error), "failed", *http_status),
            Finish::Retry {
                delay,
                error,
                http_status,
            } => self.conn.execute(
                &format!(
                    "UPDATE queue SET state = 'pending', last_error = :error, \
                     http_status = :status, claimed_by = NULL, {EXPIRY}, \
                     next_attempt_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now', :delay) \
                     WHERE {OURS}"
                ),
                named_params! {
                    ":id": id, ":token": token, ":error": error, ":status": http_status,
                    ":delay": sqlite_offset(*delay), ":exp": expires_at,
                },
            ),
            // The attempt did not count: take it back, and restart the give-up clock if it was
            // the video's first.
            Finish::Release { delay, error } => self.conn.execute(
                &format!(
                    "UPDATE queue SET state = 'pending', last_error = coalesce(:error, last_error), \
                     next_attempt_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now', :delay), \
                     attempts = max(attempts - 1, 0), claimed_by = NULL, {EXPIRY}, \
                     first_attempt_at = CASE WHEN attempts <= 1 THEN NULL ELSE first_attempt_at END \
                     WHERE {OURS}"
                ),
                named_params! {
                    ":id": id, ":token": token, ":error": error, ":delay": sqlite_offset(*delay),
                    ":exp": expires_at,
                },
            ),
            Finish::Failed {
                error,
                http_status,
                kept: None,
            } => self.conn.execute(
                &format!(
                    "UPDATE queue SET state = 'failed', last_error = :error, {EXPIRY}, \
                     http_status = :status, finished_at = {NOW}, claimed_by = NULL WHERE {OURS}"
                ),
                named_params! {
                    ":id": id, ":token": token, ":error": error, ":status": http_status,
                    ":exp": expires_at,
                },
            ),
        }
    }

    /// How long until the earliest pending row is due (zero if one is due now).
    pub fn next_due_in(&self) -> Result<Option<Duration>, QueueError> {
        let ms: Option<f64> = with_busy_retry("find next due row", || {
            self.conn
                .prepare_cached(
                    "SELECT (julianday(min(next_attempt_at)) - julianday('now')) * 86400000.0 \
                     FROM queue WHERE state = 'pending'",
                )?
                .query_row([], |r| r.get(0))
        })?;
        Ok(ms.map(|ms| Duration::from_millis(ms.max(0.0).ceil() as u64)))
    }

    /// Changes whenever another connection (a producer) commits. Cheap: no disk access.
    pub fn data_version(&self) -> Result<i64, QueueError> {
        self.conn
            .query_row("PRAGMA data_version", [], |r| r.get(0))
            .map_err(sql("read data_version"))
    }

    /// The producer contract, for `hingnetd enqueue`: one transaction for the whole batch.
    pub fn enqueue<'a>(
        &mut self,
        ids: impl IntoIterator<Item = &'a str>,
    ) -> Result<Enqueued, QueueError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql("begin enqueue"))?;
        let mut out = Enqueued::default();
        {
            let mut stmt = tx
                .prepare("INSERT OR IGNORE INTO queue(video_id) VALUES (?1)")
                .map_err(sql("prepare enqueue"))?;
            for id in ids {
                match stmt.execute([id]).map_err(sql(format!("enqueue {id}")))? {
                    0 => out.already += 1,
                    _ => out.added += 1,
                }
            }
        }
        tx.commit().map_err(sql("commit enqueue"))?;
        Ok(out)
    }

    /// Replaces the published pauses with `pauses` (empty: none in force).
    pub fn set_pauses(&mut self, pauses: &[crate::pause::Record]) -> Result<(), QueueError> {
        with_busy_retry("publish pauses", || {
            let tx = self
                .conn
                .transaction_with_behavior(TransactionBehavior::Immediate)?;
            tx.execute("DELETE FROM daemon_pauses", [])?;
            for p in pauses {
                // Not capped like a delay: a pause may have lasted longer than any of those.
                let ago = format!("-{:.3} seconds", p.since_ago.as_secs_f64());
                tx.execute(
                    "INSERT INTO daemon_pauses(reason, detail, since, until, advice) VALUES \
                     (?1, ?2, strftime('%Y-%m-%dT%H:%M:%fZ', 'now', ?3), \
                      CASE WHEN ?4 IS NULL THEN NULL \
                      ELSE strftime('%Y-%m-%dT%H:%M:%fZ', 'now', ?4) END, ?5)",
                    params![
                        p.reason.as_str(),
                        p.detail,
                        ago,
                        p.until_in.map(sqlite_offset),
                        p.advice
                    ],
                )?;
            }
            tx.commit()
        })
    }

    /// The pauses the daemon last published (stale if no daemon is running), in the order to
    /// act on them (`Reason`'s).
    pub fn pauses(&self) -> Result<Vec<crate::pause::Published>, QueueError> {
        let mut stmt = self
            .conn
            .prepare("SELECT reason, detail, since, until, advice FROM daemon_pauses")
            .map_err(sql("read pauses"))?;
        let rows = stmt
            .query_map([], |r| {
                // A reason this version does not know (a newer one wrote it) is skipped.
                let Some(reason) = crate::pause::Reason::parse(&r.get::<_, String>(0)?) else {
                    return Ok(None);
                };
                Ok(Some(crate::pause::Published {
                    reason,
                    detail: r.get(1)?,
                    since: r.get(2)?,
                    until: r.get(3)?,
                    advice: r.get(4)?,
                }))
            })
            .map_err(sql("read pauses"))?;
        let mut pauses: Vec<crate::pause::Published> = rows
            .filter_map(Result::transpose)
            .collect::<Result<_, _>>()
            .map_err(sql("read pauses"))?;
        pauses.sort_by_key(|p| p.reason);
        Ok(pauses)
    }

    /// Rows per state and the archived bytes, in one pass over the `(state, bytes)` index.
    pub fn counts(&self) -> Result<Counts, QueueError> {
        let mut s = Counts::default();
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT state, count(*), coalesce(sum(bytes), 0) FROM queue GROUP BY state",
            )
            .map_err(sql("count rows"))?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)? as u64,
                    r.get::<_, i64>(2)? as u64,
                ))
            })
            .map_err(sql("count rows"))?;
        for row in rows {
            let (state, n, bytes) = row.map_err(sql("count rows"))?;
            match state.as_str() {
                "pending" => s.pending = n,
                "downloading" => s.downloading = n,
                "done" => (s.done, s.archived_bytes) = (n, bytes),
                "failed" => s.failed = n,
                _ => {}
            }
        }
        Ok(s)
    }

    pub fn status(&self, failures: usize) -> Result<Status, QueueError> {
        let mut s = Status {
            counts: self.counts()?,
            ..Status::default()
        };
        let (soon, expired): (i64, i64) = self
            .conn
            .query_row(
                &format!(
                    "SELECT coalesce(sum(e > {NOW}), 0), coalesce(sum(e <= {NOW}), 0) FROM \
                     (SELECT {EXPIRY_KEY} AS e FROM queue INDEXED BY queue_pending_expiry \
                      WHERE state = 'pending' \
                        AND {EXPIRY_KEY} <= strftime('%Y-%m-%dT%H:%M:%fZ', 'now', ?1))"
                ),
                [sqlite_offset(EXPIRING_SOON)],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .map_err(sql("count expiring rows"))?;
        (s.expiring_soon, s.expired_pending) = (soon as u64, expired as u64);
        s.oldest_pending = self
            .conn
            .query_row(
                "SELECT video_id, enqueued_at, \
                 (julianday('now') - julianday(enqueued_at)) * 86400000.0 \
                 FROM queue WHERE state = 'pending' ORDER BY enqueued_at LIMIT 1",
                [],
                |r| {
                    let ms: Option<f64> = r.get(2)?;
                    Ok(Oldest {
                        video_id: id_text(r.get_ref(0)?),
                        enqueued_at: r.get(1)?,
                        age: ms
                            .filter(|ms| *ms >= 0.0)
                            .map(|ms| Duration::from_millis(ms as u64)),
                    })
                },
            )
            .optional()
            .map_err(sql("find oldest pending row"))?;
        s.next_due_in = self.next_due_in()?;
        let mut stmt = self
            .conn
            .prepare(
                "SELECT video_id, finished_at, http_status, last_error FROM queue \
                 WHERE state = 'failed' ORDER BY finished_at DESC LIMIT ?1",
            )
            .map_err(sql("list failures"))?;
        s.recent_failures = stmt
            .query_map([failures as i64], |r| {
                Ok(FailureRow {
                    video_id: id_text(r.get_ref(0)?),
                    finished_at: r.get(1)?,
                    http_status: r.get(2)?,
                    last_error: r.get(3)?,
                })
            })
            .and_then(|rows| rows.collect())
            .map_err(sql("list failures"))?;
        Ok(s)
    }

    /// Rows for `hingnetd list`, newest first.
    pub fn list(&self, state: Option<State>, limit: usize) -> Result<Vec<RowView>, QueueError> {
        let state = state.map(State::as_str);
        // Newest first by insertion order (rowid), which needs no sort of the whole table.
        let filter = if state.is_some() {
            "WHERE state = ?1"
        } else {
            "WHERE ?1 IS NULL"
        };
        let mut stmt = self
            .conn
            .prepare(&format!(
                "SELECT {ROW_COLUMNS} FROM queue {filter} ORDER BY rowid DESC LIMIT ?2"
            ))
            .map_err(sql("list rows"))?;
        stmt.query_map(params![state, limit as i64], row_view)
            .and_then(|rows| rows.collect())
            .map_err(sql("list rows"))
    }

    /// The row of a video, by its ID as the operator (or the archive's file name) gives it: a
    /// producer's row may hold the ID with whitespace around it (see `VideoId::from_queued`).
    /// One primary-key lookup when the ID is stored as given (`verify` does one per file).
    pub fn get(&self, video_id: &str) -> Result<Option<RowView>, QueueError> {
        if let Some(row) = self.get_exact(video_id)? {
            return Ok(Some(row));
        }
        match self.padded_key(video_id)? {
            Some(key) => self.get_exact(&key),
            None => Ok(None),
        }
    }

    fn get_exact(&self, video_id: &str) -> Result<Option<RowView>, QueueError> {
        self.conn
            .prepare_cached(&format!(
                "SELECT {ROW_COLUMNS} FROM queue WHERE video_id = ?1"
            ))
            .and_then(|mut stmt| stmt.query_row([video_id], row_view).optional())
            .map_err(sql(format!("read row {video_id}")))
    }

    /// The `video_id` as stored for `video_id`: itself if a row has it exactly, else the row
    /// whose ID is it with ASCII whitespace around.
    pub fn resolve(&self, video_id: &str) -> Result<Option<String>, QueueError> {
        let exact: Option<i64> = self
            .conn
            .query_row("SELECT 1 FROM queue WHERE video_id = ?1", [video_id], |r| {
                r.get(0)
            })
            .optional()
            .map_err(sql(format!("read row {video_id}")))?;
        match exact {
            Some(_) => Ok(Some(video_id.to_owned())),
            None => self.padded_key(video_id),
        }
    }

    /// The stored ID of the row whose ID is `video_id` with ASCII whitespace around it: a scan
    /// of the table, so only ever asked after an exact lookup missed.
    fn padded_key(&self, video_id: &str) -> Result<Option<String>, QueueError> {
        self.conn
            .query_row(
                "SELECT video_id FROM queue WHERE typeof(video_id) = 'text' \
                 AND trim(video_id, ' ' || char(9, 10, 12, 13)) = ?1 LIMIT 1",
                [video_id],
                |r| r.get(0),
            )
            .optional()
            .map_err(sql(format!("read row {video_id}")))
    }

    /// A video's attempt log, oldest first.
    pub fn history(&self, video_id: &str) -> Result<Vec<LogEntry>, QueueError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT at, attempt, outcome, http_status, bytes, elapsed_ms, detail \
                 FROM attempt_log WHERE video_id = ?1 ORDER BY id",
            )
            .map_err(sql("read attempt log"))?;
        stmt.query_map([video_id], |r| {
            Ok(LogEntry {
                at: r.get(0)?,
                attempt: r.get(1)?,
                outcome: r.get(2)?,
                http_status: r.get(3)?,
                bytes: r.get(4)?,
                elapsed_ms: r.get(5)?,
                detail: r.get(6)?,
            })
        })
        .and_then(|rows| rows.collect())
        .map_err(sql("read attempt log"))
    }

    /// Puts failed rows back to pending with a fresh give-up deadline and backoff; returns the
    /// IDs that were changed. `None` means every failed row.
    pub fn retry_failed(&mut self, ids: Option<&[String]>) -> Result<Vec<String>, QueueError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql("begin retry"))?;
        let mut changed = Vec::new();
        {
            let filter = if ids.is_some() {
                "AND video_id = ?1"
            } else {
                "AND ?1 IS NULL"
            };
            let mut stmt = tx
                .prepare(&format!(
                    "UPDATE queue SET state = 'pending', next_attempt_at = {NOW}, attempts = 0, \
                     first_attempt_at = NULL, finished_at = NULL \
                     WHERE state = 'failed' {filter} RETURNING video_id"
                ))
                .map_err(sql("retry failed rows"))?;
            let mut run = |id: Option<&str>| -> Result<(), QueueError> {
                let rows = stmt
                    .query_map([id], |r| Ok(id_text(r.get_ref(0)?)))
                    .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
                    .map_err(sql("retry failed rows"))?;
                changed.extend(rows);
                Ok(())
            };
            match ids {
                None => run(None)?,
                Some(ids) => {
                    for id in ids {
                        run(Some(id))?;
                    }
                }
            }
        }
        tx.commit().map_err(sql("commit retry"))?;
        Ok(changed)
    }

    /// Deletes a video's row and its attempt log (`hingnetd remove`). A row being downloaded
    /// is left alone unless `force`: its downloader would archive a file no row names.
    pub fn remove(&mut self, video_id: &str, force: bool) -> Result<Removal, QueueError> {
        let Some(key) = self.resolve(video_id)? else {
            return Ok(Removal::Missing);
        };
        let what = format!("remove {video_id}");
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql(what.clone()))?;
        let row = tx
            .query_row(
                &format!("SELECT {ROW_COLUMNS} FROM queue WHERE video_id = ?1"),
                [&key],
                row_view,
            )
            .optional()
            .map_err(sql(what.clone()))?;
        let Some(row) = row else {
            return Ok(Removal::Missing);
        };
        if row.state == State::Downloading && !force {
            return Ok(Removal::Busy);
        }
        tx.execute("DELETE FROM queue WHERE video_id = ?1", [&key])
            .and_then(|_| tx.execute("DELETE FROM attempt_log WHERE video_id = ?1", [&key]))
            .map_err(sql(what.clone()))?;
        tx.commit().map_err(sql(what))?;
        Ok(Removal::Removed(Box::new(row)))
    }

    /// Puts a row whose archived file is missing or changed back to pending, to be downloaded
    /// again (`verify --repair`), only if it still records the file `verify` checked
    /// (`sha256`): a row that changed meanwhile is not touched (`None`). `then` (setting the
    /// changed file aside) runs inside the same transaction, after the update: no downloader
    /// can claim the row before it has run, and its error rolls the update back.
    pub fn requeue_archived<T>(
        &mut self,
        video_id: &str,
        sha256: Option<&str>,
        why: &str,
        then: impl FnOnce() -> Result<T, String>,
    ) -> Result<Option<Result<T, String>>, QueueError> {
        let what = format!("put {video_id} back to pending");
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql(what.clone()))?;
        let n = tx
            .execute(
                &format!(
                    "UPDATE queue SET state = 'pending', next_attempt_at = {NOW}, attempts = 0, \
                     first_attempt_at = NULL, finished_at = NULL, path = NULL, sha256 = NULL, \
                     bytes = NULL, http_status = NULL, last_error = ?3 \
                     WHERE video_id = ?1 AND state IN ('done', 'failed') AND sha256 IS ?2"
                ),
                params![video_id, sha256, why],
            )
            .map_err(sql(what.clone()))?;
        if n == 0 {
            return Ok(None);
        }
        match then() {
            Ok(t) => {
                tx.commit().map_err(sql(what))?;
                Ok(Some(Ok(t)))
            }
            // Dropping the transaction rolls the update back.
            Err(e) => Ok(Some(Err(e))),
        }
    }

    /// Claims one specific video for `hingnetd fetch`, as the daemon would claim it: a pending
    /// or failed row (inserted if missing). A row another process is downloading, or one that is
    /// done, is not claimed; its current state is returned instead.
    pub fn claim_one(
        &mut self,
        video_id: &str,
        token: &str,
    ) -> Result<Result<Claimed, State>, QueueError> {
        // The producer's row, if it holds the ID with whitespace around it.
        let stored = self.resolve(video_id)?;
        let video_id = stored.as_deref().unwrap_or(video_id);
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql("begin claim"))?;
        tx.execute(
            "INSERT OR IGNORE INTO queue(video_id) VALUES (?1)",
            [video_id],
        )
        .map_err(sql(format!("enqueue {video_id}")))?;
        let claimed = tx
            .query_row(
                &format!(
                    "UPDATE queue SET state = 'downloading', attempts = attempts + 1, \
                     first_attempt_at = coalesce(first_attempt_at, {NOW}), claimed_by = ?2 \
                     WHERE video_id = ?1 AND state IN ('pending', 'failed') \
                     RETURNING {CLAIMED_COLUMNS}"
                ),
                params![video_id, token],
                |r| claimed_from_row(r, token),
            )
            .optional()
            .map_err(sql(format!("claim {video_id}")))?;
        let out = match claimed {
            Some(c) => Ok(c),
            None => {
                let state: String = tx
                    .query_row(
                        "SELECT state FROM queue WHERE video_id = ?1",
                        [video_id],
                        |r| r.get(0),
                    )
                    .map_err(sql(format!("read {video_id}")))?;
                // The schema's CHECK allows no other word.
                Err(State::parse(&state).unwrap_or(State::Downloading))
            }
        };
        tx.commit().map_err(sql("commit claim"))?;
        Ok(out)
    }

    /// Rows that name an archived file (done, or failed with the bytes kept) after `after`, in
    /// rowid order, for `verify` to page through without holding a read snapshot (which would
    /// stop WAL checkpoints) for the whole run.
    pub fn archived_page(
        &self,
        after: Cursor,
        n: usize,
    ) -> Result<Vec<(Cursor, RowView)>, QueueError> {
        let mut stmt = self
            .conn
            .prepare_cached(&format!(
                "SELECT rowid, {ROW_COLUMNS} FROM queue WHERE rowid > ?1 \
                 AND (state = 'done' OR (state = 'failed' AND path IS NOT NULL)) \
                 ORDER BY rowid LIMIT ?2"
            ))
            .map_err(sql("list done rows"))?;
        stmt.query_map(params![after.0, n as i64], |r| {
            Ok((Cursor(r.get(0)?), row_view_at(r, 1)?))
        })
        .and_then(|rows| rows.collect())
        .map_err(sql("list done rows"))
    }

    /// Bytes recorded for done rows: the archive's size as the queue knows it.
    pub fn archived_bytes(&self) -> Result<u64, QueueError> {
        self.conn
            .query_row(
                "SELECT coalesce(sum(bytes), 0) FROM queue WHERE state = 'done'",
                [],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| n as u64)
            .map_err(sql("sum archived bytes"))
    }
}

/// A claim token: this process and a random part, so claims never collide.
pub(super) fn new_token() -> String {
    format!("{}-{:016x}", std::process::id(), fastrand::u64(..))
}

/// A `video_id` as text, whatever type a producer stored it as.
fn id_text(v: ValueRef<'_>) -> String {
    match v {
        ValueRef::Text(t) => String::from_utf8_lossy(t).into_owned(),
        ValueRef::Integer(i) => i.to_string(),
        ValueRef::Real(f) => f.to_string(),
        ValueRef::Blob(b) => format!("x'{}'", crate::id::hex(b)),
        ValueRef::Null => "NULL".into(),
    }
}

/// A SQLite date modifier adding `d` (capped at `MAX_DELAY`) to 'now'.
fn sqlite_offset(d: Duration) -> String {
    format!("+{:.3} seconds", d.min(MAX_DELAY).as_secs_f64())
}

/// Runs a statement until it gets past a producer's lock. Each try already waits
/// `BUSY_TIMEOUT` inside SQLite; a producer holding the lock longer only delays us: a
/// finished download must never be lost to a busy error.
fn with_busy_retry<T>(
    what: &str,
    mut f: impl FnMut() -> rusqlite::Result<T>,
) -> Result<T, QueueError> {
    let mut waited = 0u32;
    loop {
        match f() {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if matches!(e.code, ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) =>
            {
                waited += 1;
                tracing::warn!(
                    operation = what,
                    waited_s = waited * BUSY_TIMEOUT.as_secs() as u32,
                    "queue database is locked by another writer; still waiting"
                );
                // The busy handler already slept; a short pause avoids a hot loop when the
                // error is returned without waiting (a stale WAL snapshot).
                std::thread::sleep(Duration::from_millis(50));
            }
            other => return other.map_err(sql(what)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_queue() -> (tempfile::TempDir, Queue) {
        let dir = tempfile::tempdir().unwrap();
        let q = Queue::open_and_migrate(&dir.path().join("q.db")).unwrap();
        (dir, q)
    }

    #[test]
    fn pauses_read_back_in_the_order_to_act_on_them_with_since_kept() {
        use crate::pause::{Reason, Record};
        let (_dir, mut q) = temp_queue();
        let record = |reason, ago: u64| Record {
            reason,
            detail: format!("{reason:?}"),
            since_ago: Duration::from_secs(ago),
            until_in: None,
            advice: None,
        };
        // The token was refused long before the disk filled (and eight days ago: older than
        // any delay cap).
        q.set_pauses(&[
            record(Reason::Storage, 10),
            record(Reason::Token, 8 * 86400),
        ])
        .unwrap();
        let read = q.pauses().unwrap();
        let reasons: Vec<Reason> = read.iter().map(|p| p.reason).collect();
        assert_eq!(reasons, [Reason::Storage, Reason::Token]);
        let age = |p: &crate::pause::Published| {
            let ms: f64 = q
                .conn
                .query_row(
                    "SELECT (julianday('now') - julianday(?1)) * 86400000.0",
                    [&p.since],
                    |r| r.get(0),
                )
                .unwrap();
            Duration::from_millis(ms as u64)
        };
        assert!(age(&read[1]) >= Duration::from_secs(8 * 86400), "{read:?}");
        assert!(age(&read[0]) < Duration::from_secs(86400), "{read:?}");
    }

    #[test]
    fn migrate_is_idempotent_and_versioned() {
        let (dir, mut q) = temp_queue();
        assert_eq!(q.migrate().unwrap(), 0);
        assert_eq!(q.user_version().unwrap(), MIGRATIONS.len() as i64);
        q.conn.pragma_update(None, "user_version", 99).unwrap();
        drop(q);
        let e = Queue::open_and_migrate(&dir.path().join("q.db")).unwrap_err();
        assert!(matches!(e, QueueError::TooNew { found: 99, .. }), "{e}");
    }

    #[test]
    fn an_older_database_upgrades_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.db");
        {
            // A database as the first release left it, with a producer's row in it.
            let c = Connection::open(&path).unwrap();
            c.execute_batch(MIGRATIONS[0].1).unwrap();
            c.pragma_update(None, "user_version", 1).unwrap();
            c.execute("INSERT OR IGNORE INTO queue(video_id) VALUES ('kept')", [])
                .unwrap();
        }
        let q = Queue::open_existing(&path).unwrap();
        assert_eq!(q.user_version().unwrap(), MIGRATIONS.len() as i64);
        let c = q.claim(1, &[]).unwrap().remove(0);
        assert_eq!(c.video_id, "kept");
        let done = Finish::Done {
            file: FileRecord {
                path: "/x".into(),
                sha256: "00".into(),
                bytes: 1,
                metadata: None,
            },
            http_status: 200,
        };
        assert!(q.finish(&c, &done, Duration::ZERO, None).unwrap());
        assert_eq!(q.history("kept").unwrap().len(), 1);
    }

    #[test]
    fn claim_finish_cycle() {
        let (_dir, mut q) = temp_queue();
        let e = q.enqueue(["a", "b", "a"]).unwrap();
        assert_eq!(
            e,
            Enqueued {
                added: 2,
                already: 1
            }
        );
        let c = q.claim(10, &[]).unwrap();
        assert_eq!(c.len(), 2);
        assert!(c.iter().all(|c| c.attempts == 1));
        let (a, b) = if c[0].video_id == "a" {
            (&c[0], &c[1])
        } else {
            (&c[1], &c[0])
        };
        assert!(q.claim(10, &[]).unwrap().is_empty());
        let done = Finish::Done {
            file: FileRecord {
                path: "/x/a.mp4".into(),
                sha256: "00".into(),
                bytes: 3,
                metadata: None,
            },
            http_status: 200,
        };
        assert!(q.finish(a, &done, Duration::ZERO, None).unwrap());
        // Not ours any more: a second outcome is refused.
        assert!(!q.finish(a, &done, Duration::ZERO, None).unwrap());
        let retry = Finish::Retry {
            delay: Duration::from_secs(3600),
            error: "not ready".into(),
            http_status: Some(400),
        };
        assert!(q.finish(b, &retry, Duration::ZERO, None).unwrap());
        assert!(
            q.claim(10, &[]).unwrap().is_empty(),
            "b is not due for an hour"
        );
        let due = q.next_due_in().unwrap().unwrap();
        // julianday's floating point puts "now + 3600 s" up to a few microseconds off, which the
        // rounding up to whole milliseconds can make 1 ms over (seen in 1 run of about 6).
        assert!(
            due > Duration::from_secs(3500) && due <= Duration::from_millis(3_600_001),
            "{due:?}"
        );
        // Re-inserting a done ID changes nothing.
        assert_eq!(
            q.enqueue(["a"]).unwrap(),
            Enqueued {
                added: 0,
                already: 1
            }
        );
        let s = q.status(5).unwrap();
        let c = s.counts;
        assert_eq!((c.pending, c.done, c.failed, c.downloading), (1, 1, 0, 0));
    }

    #[test]
    fn a_stale_claim_is_released_and_can_no_longer_record() {
        let (_dir, mut q) = temp_queue();
        q.enqueue(["a"]).unwrap();
        let old = q.claim(1, &[]).unwrap().remove(0);
        let held = q.downloading().unwrap().remove(0);
        assert_eq!(
            (held.video_id.as_str(), held.token.as_deref()),
            ("a", Some(&*old.token))
        );
        // Another token does not release it; the right one does.
        let other = Held {
            token: Some("someone-else".into()),
            ..held.clone()
        };
        assert!(!q.release_stale(&other).unwrap());
        assert!(q.release_stale(&held).unwrap());
        let new = q.claim(1, &[]).unwrap().remove(0);
        assert_eq!(new.attempts, 2);
        // The old downloader finishing late cannot touch the new claim's row.
        let done = Finish::Done {
            file: FileRecord {
                path: "/x".into(),
                sha256: "00".into(),
                bytes: 1,
                metadata: None,
            },
            http_status: 200,
        };
        assert!(!q.finish(&old, &done, Duration::ZERO, None).unwrap());
        assert!(q.finish(&new, &done, Duration::ZERO, None).unwrap());
    }

    #[test]
    fn a_released_attempt_does_not_count() {
        let (_dir, mut q) = temp_queue();
        q.enqueue(["a"]).unwrap();
        let c = q.claim(1, &[]).unwrap().remove(0);
        let release = Finish::Release {
            delay: Duration::ZERO,
            error: Some("paused".into()),
        };
        assert!(q.finish(&c, &release, Duration::ZERO, None).unwrap());
        let row = q.get("a").unwrap().unwrap();
        assert_eq!(row.attempts, 0);
        assert_eq!(row.first_attempt_at, None);
        assert_eq!(row.last_error.as_deref(), Some("paused"));
    }

    #[test]
    fn a_blob_id_still_gets_its_outcome() {
        let (_dir, q) = temp_queue();
        q.conn
            .execute("INSERT INTO queue(video_id) VALUES (x'00ff')", [])
            .unwrap();
        // Recovered when its downloader dies...
        q.claim(1, &[]).unwrap();
        assert!(q.release_stale(&q.downloading().unwrap()[0]).unwrap());
        // ...and failed by the next attempt.
        let c = q.claim(1, &[]).unwrap().remove(0);
        let failed = Finish::Failed {
            error: "invalid video id".into(),
            http_status: None,
            kept: None,
        };
        assert!(q.finish(&c, &failed, Duration::ZERO, None).unwrap());
        assert_eq!(q.status(5).unwrap().counts.failed, 1);
    }

    #[test]
    fn hot_queries_use_the_index_without_sorting() {
        let (_dir, q) = temp_queue();
        for (sql, index) in [
            (
                format!(
                    "SELECT rowid FROM queue INDEXED BY queue_pending_expiry \
                     WHERE state = 'pending' AND next_attempt_at <= {NOW} \
                       AND video_id NOT IN (SELECT value FROM json_each('[]')) \
                     ORDER BY {EXPIRY_KEY}, next_attempt_at LIMIT 4"
                ),
                "INDEX queue_pending_expiry",
            ),
            (
                "SELECT min(next_attempt_at) FROM queue WHERE state = 'pending'".into(),
                "COVERING INDEX queue_state_",
            ),
            (
                "SELECT state, count(*), coalesce(sum(bytes), 0) FROM queue GROUP BY state".into(),
                "COVERING INDEX queue_state_",
            ),
            (
                "SELECT coalesce(sum(bytes), 0) FROM queue WHERE state = 'done'".into(),
                "COVERING INDEX queue_state_",
            ),
            (
                format!(
                    "SELECT {EXPIRY_KEY} FROM queue INDEXED BY queue_pending_expiry \
                     WHERE state = 'pending' AND {EXPIRY_KEY} <= {NOW}"
                ),
                // A range of the index: only the rows that expire soon are read.
                "SEARCH queue USING INDEX queue_pending_expiry",
            ),
        ] {
            let plan: Vec<String> = q
                .conn
                .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
                .unwrap()
                .query_map([], |r| r.get::<_, String>(3))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            let plan = plan.join("; ");
            assert!(plan.contains(index), "{sql}: {plan}");
            assert!(!plan.contains("TEMP B-TREE"), "{sql}: {plan}");
        }
    }

    #[test]
    fn the_video_that_expires_first_is_claimed_first() {
        let (_dir, q) = temp_queue();
        for (id, exp) in [
            ("none1", None),
            ("late", Some("+30 minutes")),
            ("soon", Some("+5 minutes")),
            ("none2", None),
            ("past", Some("-1 minutes")),
        ] {
            q.conn
                .execute(
                    "INSERT INTO queue(video_id, expires_at) VALUES \
                     (?1, strftime('%Y-%m-%dT%H:%M:%fZ', 'now', ?2))",
                    params![id, exp],
                )
                .unwrap();
        }
        let order: Vec<String> = (0..5)
            .map(|_| q.claim(1, &[]).unwrap().remove(0).video_id)
            .collect();
        assert_eq!(order, ["past", "soon", "late", "none1", "none2"]);
        let s = q.status(5).unwrap();
        assert_eq!((s.expiring_soon, s.expired_pending), (0, 0), "none pending");
    }

    /// Both ways a claim finds due rows (a few, sorted; a backlog, read in expiry order) give
    /// the same order.
    #[test]
    fn a_backlog_is_claimed_by_expiry_too() {
        let (_dir, mut q) = temp_queue();
        let ids: Vec<String> = (0..300).map(|i| format!("v{i:03}")).collect();
        q.enqueue(ids.iter().map(String::as_str)).unwrap();
        q.conn
            .execute_batch(
                "INSERT INTO queue(video_id, expires_at) VALUES \
                 ('dies_soon', strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '+1 minutes')); \
                 INSERT INTO queue(video_id, next_attempt_at, expires_at) VALUES \
                 ('not_due', strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '+1 hours'), \
                  strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-1 minutes'));",
            )
            .unwrap();
        assert_eq!(q.claim(1, &[]).unwrap()[0].video_id, "dies_soon");
        assert_eq!(q.claim(1, &[]).unwrap()[0].video_id, "v000");
        // Down to a few due rows: the other way, the same order, and never a row not due.
        let many = q.claim(290, &[]).unwrap();
        assert_eq!(many.len(), 290);
        let mut rest: Vec<String> = q
            .claim(20, &[])
            .unwrap()
            .into_iter()
            .map(|c| c.video_id)
            .collect();
        // Rows due at the same millisecond may come in any order.
        rest.sort();
        assert_eq!(rest, ids[291..]);
    }

    #[test]
    fn expiry_counts_and_what_an_attempt_learned() {
        let (_dir, mut q) = temp_queue();
        q.enqueue(["a", "b", "c"]).unwrap();
        q.conn
            .execute_batch(
                "UPDATE queue SET expires_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '+5 minutes') \
                 WHERE video_id = 'a'; \
                 UPDATE queue SET expires_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-5 minutes') \
                 WHERE video_id = 'b';",
            )
            .unwrap();
        let s = q.status(5).unwrap();
        assert_eq!((s.expiring_soon, s.expired_pending), (1, 1));
        let c = q.claim(1, &["b".to_owned()]).unwrap().remove(0);
        assert_eq!(c.video_id, "a", "b is excepted");
        let soon = c.expires_at.unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        assert!((soon - now - 300).abs() <= 2, "{soon} vs {now}");
        let retry = Finish::Retry {
            delay: Duration::from_secs(60),
            error: "not ready".into(),
            http_status: Some(400),
        };
        assert!(
            q.finish(&c, &retry, Duration::ZERO, Some(1_900_000_000))
                .unwrap()
        );
        let row = q.get("a").unwrap().unwrap();
        assert_eq!(row.expires_at.as_deref(), Some("2030-03-17T17:46:40.000Z"));
        let c = q.claim(1, &[]).unwrap().remove(0);
        assert_eq!(c.video_id, "b");
        let failed = Finish::Failed {
            error: "kept".into(),
            http_status: Some(200),
            kept: Some(FileRecord {
                path: "/x/b.mp4".into(),
                sha256: "00".into(),
                bytes: 9,
                metadata: Some("{}".into()),
            }),
        };
        assert!(q.finish(&c, &failed, Duration::ZERO, None).unwrap());
        let row = q.get("b").unwrap().unwrap();
        assert_eq!(
            (
                row.state.as_str(),
                row.path.as_deref(),
                row.bytes,
                row.metadata.as_deref()
            ),
            ("failed", Some("/x/b.mp4"), Some(9), Some("{}"))
        );
        assert!(
            row.expires_at.is_some(),
            "kept when nothing new was learned"
        );
        assert_eq!(
            q.archived_page(Cursor::default(), 10).unwrap().len(),
            1,
            "a kept file is verified"
        );
        // A released row failed afterwards, and only while it is still pending.
        let c = q.claim(1, &[]).unwrap().remove(0);
        let release = Finish::Release {
            delay: Duration::ZERO,
            error: None,
        };
        assert!(q.finish(&c, &release, Duration::ZERO, None).unwrap());
        assert!(q.fail_released(&c, "refused 3 times", Some(403)).unwrap());
        assert!(!q.fail_released(&c, "again", Some(403)).unwrap());
        let row = q.get("c").unwrap().unwrap();
        assert_eq!((row.state.as_str(), row.http_status), ("failed", Some(403)));
        assert_eq!(q.history("c").unwrap().last().unwrap().outcome, "failed");
    }

    #[test]
    fn a_new_database_is_group_writable_within_the_umask() {
        use std::os::unix::fs::PermissionsExt;
        let (dir, _q) = temp_queue();
        // Read without changing it (umask(2) would race with other tests' files).
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let umask = status
            .lines()
            .find_map(|l| l.strip_prefix("Umask:"))
            .map(|m| u32::from_str_radix(m.trim(), 8).unwrap())
            .unwrap();
        let mode = std::fs::metadata(dir.path().join("q.db"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o660 & !umask);
    }
}

//! The queue's contract: what the daemon (`Claims`) and the operator's commands (`Admin`) ask
//! of the queue, in types that name no database. Two backends: `sqlite` (the embedded
//! default) and `postgres` (a fleet's); `Location` and the `open_*` functions are the one place
//! that picks one.
//!
//! A claim's life: `claim` (or `claim_one`) marks rows `downloading` under a fresh token; only
//! that token's `finish` records the outcome; `recover_stale` gives back the rows whose claimer
//! is gone, and the backend alone says whether a claim is still alive.

pub mod postgres;
pub mod sqlite;

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Pending rows whose expiry is this close count as expiring soon (`hingnetd status`).
pub const EXPIRING_SOON: Duration = Duration::from_secs(600);

/// The longest delay a row can be given: anything longer is a bug or a hostile header.
pub const MAX_DELAY: Duration = Duration::from_secs(7 * 24 * 3600);

/// A driver's error, carried without naming the driver.
pub type Cause = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("cannot open queue database {path}: {source}")]
    Open { path: PathBuf, source: Cause },
    #[error(
        "queue database {path} has schema version {found}, newer than this hingnetd knows ({known}); upgrade hingnetd"
    )]
    TooNew {
        path: PathBuf,
        found: i64,
        known: usize,
    },
    #[error("queue database {path}: migration {name} failed: {source}")]
    Migration {
        path: PathBuf,
        name: &'static str,
        source: Cause,
    },
    #[error("queue database {path} has no queue table yet; run `hingnetd migrate` first")]
    NotMigrated { path: PathBuf },
    #[error(
        "queue database {path} is read-only (file mode, attribute or a read-only filesystem); hingnetd must be able to write it"
    )]
    ReadOnly { path: PathBuf },
    /// A statement failed; `what` names what it was for.
    #[error("queue database: {what}: {source}")]
    Query { what: String, source: Cause },
    #[error("cannot create {path}: {source}")]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot use lock file {path}: {source}")]
    LockIo {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("another hingnetd ({holder}) is already running on {database}")]
    AlreadyRunning { database: PathBuf, holder: String },
    /// The change notification could not be set up.
    #[error(transparent)]
    Watch(Cause),
    /// The database server cannot be reached, or the connection was lost: never a row's fault.
    #[error("queue database unreachable ({location}): {source}")]
    Unreachable { location: String, source: Cause },
    #[error("queue database {location} refused the login: {source}")]
    Login { location: String, source: Cause },
    #[error("queue database {location}: TLS: {source}")]
    Tls { location: String, source: Cause },
    #[error("queue database {location}: permission denied ({what}): {source}")]
    Privilege {
        location: String,
        what: String,
        source: Cause,
    },
    /// A statement the database refused for now (a deadlock, a serialization failure, a
    /// cancelled statement, a lock or resource shortage): worth trying again.
    #[error("queue database: {what}: {source} (temporary)")]
    Transient { what: String, source: Cause },
    /// The settings to reach the database do not work (a password file, the TLS roots, a
    /// database that does not exist).
    #[error("queue database {location}: {problem}")]
    Setup { location: String, problem: String },
}

impl QueueError {
    /// The database is away for now (PostgreSQL): worth waiting for, and never the row's fault.
    pub fn is_unreachable(&self) -> bool {
        matches!(self, QueueError::Unreachable { .. })
    }

    /// Trying again later may succeed: the database is away, or refused a statement for now.
    pub fn is_temporary(&self) -> bool {
        matches!(
            self,
            QueueError::Unreachable { .. } | QueueError::Transient { .. }
        )
    }
}

/// A row's identity as its backend keeps it, opaque to everyone else. (SQLite's is the key
/// exactly as a producer stored it, a BLOB or a number included, so that an outcome lands on
/// that row whatever the ID's type.)
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RowId(pub(crate) Vec<u8>);

/// Where a page of `Admin::archived_page` ends: the next page starts after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Cursor(pub(crate) i64);

/// A row's state, as the `state` column spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Pending,
    Downloading,
    Done,
    Failed,
}

impl State {
    pub const ALL: [State; 4] = [
        State::Pending,
        State::Downloading,
        State::Done,
        State::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            State::Pending => "pending",
            State::Downloading => "downloading",
            State::Done => "done",
            State::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<State> {
        State::ALL.into_iter().find(|st| st.as_str() == s)
    }
}

/// So that a state reads as its word: `row.state == "done"`.
impl PartialEq<&str> for State {
    fn eq(&self, word: &&str) -> bool {
        self.as_str() == *word
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // `pad`, so that `{:<11}` lines up the CLI's columns.
        f.pad(self.as_str())
    }
}

/// A video handed to a worker.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub row: RowId,
    /// The ID as text, for the ID check, paths and logs.
    pub video_id: String,
    /// This claim's token: only its holder records the outcome.
    pub token: String,
    /// Including this one.
    pub attempts: u32,
    /// Time since the first attempt, at the moment of the claim (the give-up clock).
    pub since_first_attempt: Duration,
    /// When the video's file expires (unix seconds), if the row says.
    pub expires_at: Option<i64>,
}

/// A file in the archive, as a row records it.
#[derive(Debug, Clone, PartialEq)]
pub struct FileRecord {
    pub path: String,
    pub sha256: String,
    pub bytes: u64,
    /// The status object (JSON text), when it was read.
    pub metadata: Option<String>,
}

/// What happened to a claimed video, as the row will record it.
#[derive(Debug, Clone, PartialEq)]
pub enum Finish {
    Done {
        file: FileRecord,
        http_status: u16,
    },
    /// Back to pending, to be tried again after `delay`.
    Retry {
        delay: Duration,
        error: String,
        http_status: Option<u16>,
    },
    /// Back to pending with nothing held against the video (shutdown, account paused).
    Release {
        delay: Duration,
        error: Option<String>,
    },
    /// For good. `kept`: the bytes the API served are in the archive all the same (an
    /// incomplete MP4 it served twice), so that nothing is thrown away.
    Failed {
        error: String,
        http_status: Option<u16>,
        kept: Option<FileRecord>,
    },
}

impl Finish {
    /// What the attempt log records of the outcome, whatever the backend: its word (done,
    /// retry, released, failed), the HTTP status and the bytes archived.
    pub fn log_fields(&self) -> (&'static str, Option<u16>, Option<u64>) {
        match self {
            Finish::Done { http_status, file } => ("done", Some(*http_status), Some(file.bytes)),
            Finish::Retry { http_status, .. } => ("retry", *http_status, None),
            Finish::Release { .. } => ("released", None, None),
            Finish::Failed {
                http_status, kept, ..
            } => ("failed", *http_status, kept.as_ref().map(|f| f.bytes)),
        }
    }

    /// One line for the attempt log: what happened and when the next try is.
    pub fn describe(&self) -> String {
        use crate::config::format_duration as fd;
        match self {
            Finish::Done { file, .. } => {
                format!("archived {} bytes, sha256 {}", file.bytes, file.sha256)
            }
            Finish::Retry { delay, error, .. } => {
                format!("next try in {} (backoff): {error}", fd(round_ms(*delay)))
            }
            Finish::Release { delay, error } => format!(
                "given back, next try in {}: {}",
                fd(round_ms(*delay)),
                error.as_deref().unwrap_or("shutdown")
            ),
            Finish::Failed {
                error, kept: None, ..
            } => format!("failed: {error}"),
            Finish::Failed {
                error,
                kept: Some(f),
                ..
            } => format!(
                "failed: {error}; the {} bytes it served are kept at {} (sha256 {})",
                f.bytes, f.path, f.sha256
            ),
        }
    }
}

fn round_ms(d: Duration) -> Duration {
    Duration::from_millis(d.as_millis() as u64)
}

/// What `Claims::recover_stale` did: the videos put back, and the error that stopped it
/// partway, if one did (the rows put back before it stay put back).
#[derive(Debug, Default)]
pub struct Recovered {
    pub released: Vec<String>,
    pub error: Option<QueueError>,
}

/// What `Admin::remove` did.
#[derive(Debug)]
pub enum Removal {
    Removed(Box<RowView>),
    /// Being downloaded; not removed without `force`.
    Busy,
    Missing,
}

/// Rows per state, and the bytes the done ones recorded: one pass over the queue.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Counts {
    pub pending: u64,
    pub downloading: u64,
    pub done: u64,
    pub failed: u64,
    /// Bytes recorded for done rows: the archive's size as the queue knows it.
    pub archived_bytes: u64,
}

impl Counts {
    pub fn of(&self, state: State) -> u64 {
        match state {
            State::Pending => self.pending,
            State::Downloading => self.downloading,
            State::Done => self.done,
            State::Failed => self.failed,
        }
    }
}

/// What `hingnetd status` (and a metrics scrape) shows of the queue.
#[derive(Debug, Clone, Default)]
pub struct Status {
    pub counts: Counts,
    /// Pending rows whose file expires within `EXPIRING_SOON`.
    pub expiring_soon: u64,
    /// Pending rows whose file has already expired (the next attempt fails them, unless the
    /// API still serves it).
    pub expired_pending: u64,
    pub oldest_pending: Option<Oldest>,
    /// How long until the earliest pending row is due (zero if one is due now).
    pub next_due_in: Option<Duration>,
    pub recent_failures: Vec<FailureRow>,
    /// The daemons holding claims, by instance (a fleet's queue; empty for SQLite).
    pub claimants: Vec<Claimant>,
}

/// A daemon holding claims on a shared queue.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Claimant {
    pub instance: String,
    pub claims: u64,
}

/// The pending row enqueued first.
#[derive(Debug, Clone)]
pub struct Oldest {
    pub video_id: String,
    pub enqueued_at: String,
    /// By the queue's clock; `None` if the time is in the future or not one it can read.
    pub age: Option<Duration>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct FailureRow {
    pub video_id: String,
    pub finished_at: Option<String>,
    pub http_status: Option<u16>,
    pub last_error: Option<String>,
}

/// A queue row, as the CLI shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RowView {
    pub video_id: String,
    pub state: State,
    pub attempts: i64,
    pub next_attempt_at: String,
    pub last_error: Option<String>,
    pub http_status: Option<i64>,
    pub path: Option<String>,
    pub sha256: Option<String>,
    pub bytes: Option<i64>,
    pub enqueued_at: String,
    pub first_attempt_at: Option<String>,
    pub finished_at: Option<String>,
    pub expires_at: Option<String>,
    /// The status object, kept once the video is archived.
    pub metadata: Option<String>,
    /// `next_attempt_at` has come, by the queue's clock.
    #[serde(skip)]
    pub due: bool,
    /// A shared queue's: the instance whose archive holds the file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub archived_on: Option<String>,
}

impl RowView {
    /// Whether the row names an archived file: done, or failed with the bytes the API served
    /// kept.
    pub fn names_a_file(&self) -> bool {
        self.state == State::Done || (self.state == State::Failed && self.path.is_some())
    }

    /// The instance whose archive holds the file, when it is not `here` (`Admin::instance`):
    /// another host's disk, which this host can neither check nor delete.
    pub fn archived_elsewhere(&self, here: Option<&str>) -> Option<&str> {
        match (self.archived_on.as_deref(), here) {
            (Some(on), Some(here)) if on != here => Some(on),
            _ => None,
        }
    }
}

/// One entry of the attempt log.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LogEntry {
    pub at: String,
    pub attempt: i64,
    pub outcome: String,
    pub http_status: Option<i64>,
    pub bytes: Option<i64>,
    pub elapsed_ms: Option<i64>,
    pub detail: Option<String>,
}

/// Outcome of `enqueue`.
#[derive(Debug, Default, PartialEq)]
pub struct Enqueued {
    pub added: usize,
    pub already: usize,
}

/// What the daemon asks of the queue. A backend keeps its blocking work off the caller's
/// async workers (SQLite's statements run on tokio's blocking pool).
#[async_trait::async_trait]
pub trait Claims: Send + Sync {
    /// Claims up to `n` due rows, the one that expires first first, leaving `avoid` alone
    /// unless `or_avoided` and no other row is due.
    async fn claim(
        &self,
        n: usize,
        avoid: Vec<String>,
        or_avoided: bool,
    ) -> Result<Vec<Claimed>, QueueError>;

    /// Claims one video for `hingnetd fetch`, as the daemon would claim it: a pending or
    /// failed row, inserted if missing. A row another process is downloading, or one that is
    /// done, is not claimed; its current state is returned instead. The claim is alive (see
    /// `recover_stale`) for as long as this process is, or until it is finished.
    async fn claim_one(&self, video_id: &str) -> Result<Result<Claimed, State>, QueueError>;

    /// Records a claimed video's outcome, only while the claim is still the row's; returns
    /// whether it was. `expires_at` (unix seconds) is what the attempt learned of the expiry.
    async fn finish(
        &self,
        claimed: &Claimed,
        finish: &Finish,
        elapsed: Duration,
        expires_at: Option<i64>,
    ) -> Result<bool, QueueError>;

    /// Fails a row that a claim gave back to `pending` once it is clear the video itself was
    /// refused; only while the row is still pending. Returns whether it was failed.
    async fn fail_released(
        &self,
        claimed: &Claimed,
        error: &str,
        http_status: Option<u16>,
    ) -> Result<bool, QueueError>;

    /// Puts back to pending every `downloading` row whose claim is no longer alive (its
    /// downloader stopped), except the videos this process is downloading (`ours`).
    async fn recover_stale(&self, ours: Vec<String>) -> Recovered;

    /// How long until the earliest pending row is due (zero if one is due now).
    async fn next_due_in(&self) -> Result<Option<Duration>, QueueError>;

    async fn counts(&self) -> Result<Counts, QueueError>;

    /// Replaces the pauses published for `hingnetd status` (empty: none in force).
    async fn set_pauses(&self, pauses: Vec<crate::pause::Record>) -> Result<(), QueueError>;

    /// Resolves once another process may have added or changed rows: a hint to look again,
    /// never a promise. Cancel-safe: a change seen while it was not polled is not lost.
    async fn changed(&self);
}

/// What the operator's commands ask of the queue. Blocking: they run on the command's own
/// thread (or a metrics scrape's blocking thread), never on an async worker.
pub trait Admin: Send {
    /// The producer contract, for `hingnetd enqueue`: one transaction for the whole batch.
    fn enqueue(&self, ids: &[String]) -> Result<Enqueued, QueueError>;

    /// Puts failed rows back to pending with a fresh give-up deadline and backoff; returns the
    /// IDs that were changed. `None` means every failed row.
    fn retry_failed(&self, ids: Option<&[String]>) -> Result<Vec<String>, QueueError>;

    /// Deletes a video's row and its attempt log. A row being downloaded is left alone unless
    /// `force`.
    fn remove(&self, video_id: &str, force: bool) -> Result<Removal, QueueError>;

    /// Puts a row whose archived file is missing or changed back to pending, only if it still
    /// records `sha256`; `None` if it changed meanwhile. `then` runs after the update and
    /// before it is committed; its error rolls the update back.
    fn requeue_archived(
        &self,
        video_id: &str,
        sha256: Option<&str>,
        why: &str,
        then: &mut dyn FnMut() -> Result<Option<String>, String>,
    ) -> Result<Option<Result<Option<String>, String>>, QueueError>;

    /// `failures`: how many of the latest failed rows to list.
    fn status(&self, failures: usize) -> Result<Status, QueueError>;

    /// Rows for `hingnetd list`, newest first.
    fn list(&self, state: Option<State>, limit: usize) -> Result<Vec<RowView>, QueueError>;

    /// The row of a video, by its ID as the operator (or the archive's file name) gives it.
    fn get(&self, video_id: &str) -> Result<Option<RowView>, QueueError>;

    /// The ID as its row holds it (a producer's may have whitespace around it).
    fn resolve(&self, video_id: &str) -> Result<Option<String>, QueueError>;

    /// A video's attempt log, oldest first.
    fn history(&self, video_id: &str) -> Result<Vec<LogEntry>, QueueError>;

    /// Up to `n` rows that name an archived file, after `after`, for `verify` to page through
    /// without holding the queue for the whole run.
    fn archived_page(&self, after: Cursor, n: usize) -> Result<Vec<(Cursor, RowView)>, QueueError>;

    /// Bytes recorded for done rows.
    fn archived_bytes(&self) -> Result<u64, QueueError>;

    /// The pauses the daemon last published, in the order to act on them (stale when no
    /// daemon is running: see `daemon_running`).
    fn pauses(&self) -> Result<Vec<crate::pause::Published>, QueueError>;

    /// Whether a daemon serves this queue now.
    fn daemon_running(&self) -> bool;

    /// Where the queue is, for messages.
    fn location(&self) -> String;

    /// This daemon's name in a queue several hosts share; `None` for a queue only this host
    /// uses.
    fn instance(&self) -> Option<&str> {
        None
    }
}

/// Both contracts, on one connection: what `hingnetd fetch` works with.
pub trait Backend: Claims + Admin {}

impl<T: Claims + Admin> Backend for T {}

/// The daemon's hold on its queue (SQLite: the single-daemon lock), taken before anything
/// else touches it. Kept until the process ends, after the runtime has stopped: a statement
/// still waiting on a producer's lock must not outlive it.
pub struct Hold(#[allow(dead_code)] Box<dyn std::any::Any + Send>);

/// Where the queue is: `queue.database` as a file path (SQLite) or a `postgres://` URL.
#[derive(Debug, Clone)]
pub enum Location {
    Sqlite(PathBuf),
    Postgres(Box<postgres::target::Target>),
}

impl Location {
    /// Reads `[queue]`; every problem is one line, without the URL (it may hold a password).
    pub fn of(q: &crate::config::QueueConfig) -> Result<Location, String> {
        if postgres::target::is_url(&q.database) {
            let instance = if q.instance.is_empty() {
                crate::sys::host_name()
            } else {
                q.instance.clone()
            };
            return postgres::target::Target::parse(
                &q.database,
                &q.password_file,
                &instance,
                q.lease,
            )
            .map(|t| Location::Postgres(Box::new(t)));
        }
        if q.database.contains("://") {
            return Err("a URL must start with postgres:// or postgresql://; anything else is a SQLite file's path".into());
        }
        Ok(Location::Sqlite(PathBuf::from(&q.database)))
    }

    /// For messages: the path, or the URL without secrets.
    pub fn display(&self) -> String {
        match self {
            Location::Sqlite(p) => p.display().to_string(),
            Location::Postgres(t) => t.display(),
        }
    }
}

/// The daemon's queue, held and migrated, not yet watched for changes (`Daemon::serve`).
pub enum Daemon {
    Sqlite(sqlite::Unwatched),
    Postgres(postgres::Unserved),
}

impl Daemon {
    /// Starts the change notification; the claims from then on.
    pub async fn serve(self) -> Result<Arc<dyn Claims>, QueueError> {
        Ok(match self {
            Daemon::Sqlite(u) => Arc::new(u.serve()?),
            Daemon::Postgres(u) => Arc::new(u.serve().await?),
        })
    }
}

/// For `hingnetd run`: refuses a second daemon on the same queue (PostgreSQL: of the same
/// instance name, at `serve`), then migrates.
pub fn open_for_daemon(at: &Location) -> Result<(Hold, Daemon), QueueError> {
    match at {
        Location::Sqlite(path) => {
            let (lock, unwatched) = sqlite::Sqlite::open_for_daemon(path)?;
            Ok((Hold(Box::new(lock)), Daemon::Sqlite(unwatched)))
        }
        Location::Postgres(t) => Ok((
            Hold(Box::new(())),
            Daemon::Postgres(postgres::Postgres::open_for_daemon((**t).clone())?),
        )),
    }
}

/// For the operator's commands: an existing, migrated queue (one never migrated is refused
/// rather than created); an older schema is upgraded in place.
pub fn open_existing(at: &Location) -> Result<Box<dyn Admin>, QueueError> {
    Ok(match at {
        Location::Sqlite(path) => Box::new(sqlite::Sqlite::open_existing(path)?),
        Location::Postgres(t) => Box::new(postgres::Postgres::open_existing((**t).clone())?),
    })
}

/// For `migrate`, `enqueue` and `fetch`: opened, created and migrated if need be.
pub fn open_and_migrate(at: &Location) -> Result<Arc<dyn Backend>, QueueError> {
    Ok(match at {
        Location::Sqlite(path) => Arc::new(sqlite::Sqlite::open_and_migrate(path)?),
        Location::Postgres(t) => Arc::new(postgres::Postgres::open_and_migrate((**t).clone())?),
    })
}

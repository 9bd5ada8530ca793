//! Shared test support: the HingNet stand-in server, the harness that runs the real binary, the
//! leak sweep (`canary`), and the backends: one module per kind of queue database (`sqlite`,
//! `postgres`, reached through `queue_db`) and of archive (`local`, and `bucket` on a real
//! Garage, `garage`, reached through `archive`).

pub mod archive;
pub mod audit;
pub mod bucket;
pub mod canary;
pub mod faults;
pub mod garage;
pub mod harness;
pub mod local;
pub mod notify;
pub mod postgres;
pub mod sqlite;
pub mod standin;
pub mod tcp_proxy;
pub mod tls;

pub mod queue_db;

/// The queue the stories run against: SQLite, or PostgreSQL when `HINGNETD_TEST_QUEUE` is
/// `postgres` (`scripts/test` runs the suite once each way). The one line that picks it;
/// `queue_db` then reaches the backend's module, which provides the same functions. Tests about
/// SQLite itself (its locks, WAL, dialect, `user_version`, shell and Python producers) make
/// call `sqlite_only` first and name `sqlite`.
pub fn stories_on_postgres() -> bool {
    FORCED
        .get()
        .unwrap_or_else(|| std::env::var("HINGNETD_TEST_QUEUE").is_ok_and(|v| v == "postgres"))
}

thread_local! {
    /// Set by a test about one backend: whether its envs are on PostgreSQL.
    static FORCED: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
    /// Set by a test about one store: whether its envs archive into a bucket.
    static FORCED_STORE: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
}

/// The archive the stories run against: a directory, or a bucket on a real Garage when
/// `HINGNETD_TEST_STORE` is `s3` (`scripts/test` runs the archive's stories both ways). The
/// one line that picks it; `archive` then reaches the store's module. Tests about files in a
/// directory (partials, planted links, permissions) call `local_only` first.
pub fn stories_on_s3() -> bool {
    FORCED_STORE
        .get()
        .unwrap_or_else(|| std::env::var("HINGNETD_TEST_STORE").is_ok_and(|v| v == "s3"))
}

/// Marks the running test as one about the archive as a directory. Returns true on the
/// bucket pass (`HINGNETD_TEST_STORE=s3`), where such a test would only repeat the first
/// pass: the caller returns at once, saying so.
#[allow(dead_code)]
#[must_use]
pub fn local_only() -> bool {
    FORCED_STORE.set(Some(false));
    let repeat = std::env::var("HINGNETD_TEST_STORE").is_ok_and(|v| v == "s3");
    if repeat {
        println!(
            "skipped on the bucket pass: about the archive as a directory (run in the first pass)"
        );
    }
    repeat
}

/// Marks the running test as one about the archive as a bucket.
#[allow(dead_code)]
pub fn s3_only() {
    FORCED_STORE.set(Some(true));
}

/// Marks the running test as one about SQLite itself: the envs it makes have a SQLite queue,
/// whatever the stories run against.
#[allow(dead_code)]
pub fn sqlite_only() {
    FORCED.set(Some(false));
}

/// Marks the running test as one about PostgreSQL itself (`tests/postgres.rs`).
#[allow(dead_code)]
pub fn postgres_only() {
    FORCED.set(Some(true));
}

/// The archive the stories run against: the one line to change for another backend. Tests
/// about files on disk name `local` instead.
pub use local as store;

//! Shared test support: the HingNet stand-in server, the harness that runs the real binary, the
//! leak sweep (`canary`), and the backends: one module per kind of queue database (`sqlite`)
//! and of archive (`local`).

pub mod audit;
pub mod canary;
pub mod harness;
pub mod local;
pub mod postgres;
pub mod sqlite;
pub mod standin;
pub mod tls;

/// The queue database the stories run against: the one line to change to run them against
/// another backend, whose module provides the same functions. Tests about SQLite itself (its
/// locks, WAL, dialect, `user_version`, shell and Python producers) name `sqlite` instead.
pub use sqlite as queue_db;

/// The archive the stories run against: the one line to change for another backend. Tests
/// about files on disk name `local` instead.
pub use local as store;

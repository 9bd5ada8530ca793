//! hingnetd: downloads finished HingNet videos named in a queue into a verified archive.
//!
//! Modules, one concern each:
//! - the two backends' contracts, each with its one implementation so far: `queue` (what the
//!   daemon and the operator's commands ask of the queue; `queue::sqlite`) and `store` (where
//!   downloads are written and published; `store::local`, a directory);
//! - the download: `api` (the HTTP client and the status-to-action table), `fetch` (one
//!   attempt and the `Outcome` it ends in), `mp4` (what a whole video file is), `bandwidth` (the
//!   one rate limit all downloads share), `id` (the video ID check);
//! - the daemon: `policy` (what a row becomes after an attempt, backoff), `pause` (the
//!   client-wide pauses), `daemon` (the scheduler loop and shutdown), `service` (sd_notify),
//!   `journal` (native journald logging), `metrics` (Prometheus and `/metrics`);
//! - the operator's side: `cli` (commands and exit codes), `verify` (re-checking the archive),
//!   `config` (the file and the token), `sys` (the process's own C-library calls).
//!
//! Public only where the binary or the integration tests reach in.

mod api;
mod bandwidth;
pub mod cli;
mod config;
mod daemon;
mod fetch;
pub mod id;
mod journal;
mod metrics;
mod mp4;
mod pause;
mod policy;
pub mod queue;
mod service;
pub mod store;
mod sys;
mod verify;

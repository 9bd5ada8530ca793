//! hingnetd: downloads finished HingNet videos named in a SQLite queue into a verified archive.
//!
//! Modules, one concern each: `config` (the file and the token), `queue` (all SQL), `api` (the
//! HTTP client and the status-to-action table), `archive` (file discipline), `mp4` (what a
//! whole video file is), `fetch` (one download attempt), `bandwidth` (the
//! one rate limit all downloads share), `daemon` (the scheduler loop and retry
//! policy), `watch` (noticing new rows), `service` (sd_notify), `verify` (re-checking the
//! archive), `journal` (native journald logging under systemd), `metrics` (Prometheus counters
//! and the `/metrics` listener), `pause` (what the daemon publishes about its pauses), `cli`
//! (commands and exit codes).

pub mod api;
pub mod bandwidth;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod fetch;
pub mod id;
pub mod journal;
pub mod metrics;
pub mod mp4;
pub mod pause;
pub mod policy;
pub mod queue;
pub mod service;
pub mod store;
pub mod sys;
pub mod verify;

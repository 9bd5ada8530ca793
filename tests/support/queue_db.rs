//! The queue the stories run against, whichever it is: each function goes to the module of the
//! env's backend (`sqlite`, or `postgres` when the env has a server), which provide the same
//! ones. SQL given here must mean the same on both (standard SQL: alias every subquery).

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Child;

use super::harness::{Env, Row};
use super::{postgres, sqlite};

macro_rules! either {
    ($env:expr, $f:ident ( $($arg:expr),* )) => {
        match &$env.pg {
            Some(_) => postgres::$f($env $(, $arg)*),
            None => sqlite::$f($env $(, $arg)*),
        }
    };
}

/// The `[queue]` lines of the config besides `poll_interval`.
pub fn config(env: &Env) -> String {
    either!(env, config())
}

/// What the queue keeps in the env's directory.
pub fn files(env: &Env) -> Vec<&'static str> {
    either!(env, files())
}

/// What the leak sweep reads besides the env's files, labelled.
pub fn contents(env: &Env) -> Vec<(String, Vec<u8>)> {
    either!(env, contents())
}

/// Where the sweep finds the queue's rows, as its findings name them.
pub fn kept_in(env: &Env) -> &'static str {
    either!(env, kept_in())
}

/// Inserts IDs the way a producer does.
pub fn insert(env: &Env, ids: &[&str]) {
    either!(env, insert(ids))
}

pub fn row(env: &Env, id: &str) -> Option<Row> {
    either!(env, row(id))
}

/// Every row, in insertion order.
pub fn rows(env: &Env) -> Vec<Row> {
    either!(env, rows())
}

pub fn count(env: &Env, state: &str) -> i64 {
    either!(env, count(state))
}

pub fn state_counts(env: &Env) -> BTreeMap<String, i64> {
    either!(env, state_counts())
}

pub fn count_where(env: &Env, cond: &str) -> i64 {
    either!(env, count_where(cond))
}

pub fn query_i64(env: &Env, query: &str) -> i64 {
    either!(env, query_i64(query))
}

pub fn query_text(env: &Env, query: &str) -> String {
    either!(env, query_text(query))
}

pub fn query_texts(env: &Env, query: &str) -> Vec<String> {
    either!(env, query_texts(query))
}

/// `(attempt, outcome, at, detail)` from the attempt log of `id`, oldest first.
pub fn attempt_log(env: &Env, id: &str) -> Vec<(i64, String, String, Option<String>)> {
    either!(env, attempt_log(id))
}

/// Inserts `(id, expires in minutes)` in one transaction, as a producer that knows each
/// video's expiry does.
pub fn insert_expiring(env: &Env, rows: &[(&str, Option<u32>)]) {
    either!(env, insert_expiring(rows))
}

/// The row's `expires_at` in the queue's timestamp format (`YYYY-MM-DDTHH:MM:SS.SSSZ`).
pub fn expires_at(env: &Env, id: &str) -> Option<String> {
    either!(env, expires_at(id))
}

/// Runs SQL on the queue the way an operator's shell does.
pub fn sql(env: &Env, statement: &str) {
    either!(env, sql(statement))
}

pub fn set_last_error(env: &Env, id: &str, text: &str) {
    either!(env, set_last_error(id, text))
}

/// A producer process inserting the IDs listed in `list` in batches of 25, one transaction
/// each, appending each batch to `acked` once it is committed.
pub fn spawn_producer(env: &Env, list: &Path, acked: &Path) -> Child {
    either!(env, spawn_producer(list, acked))
}

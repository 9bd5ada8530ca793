//! The archive as the stories see it, whatever the store: each function goes to the env's
//! backend module (`local` for a directory, `bucket` for Garage), which provide the same ones.

#![allow(dead_code)]

use super::harness::Env;
use super::{bucket, local};

macro_rules! either {
    ($env:expr, $f:ident ( $($arg:expr),* )) => {
        if $env.garage.is_some() {
            bucket::$f($($arg),*)
        } else {
            local::$f($($arg),*)
        }
    };
}

pub fn config(env: &Env) -> String {
    either!(env, config(env))
}

/// What a done row's `path` says for the video with these bytes.
pub fn video_path(env: &Env, id: &str, sha256: &str) -> String {
    either!(env, video_path(env, id, sha256))
}

/// The bytes a row's `path` names, or why there are none.
pub fn read(env: &Env, path: &str) -> Result<Vec<u8>, String> {
    either!(env, read(env, path))
}

/// Where the sidecar of the video at `path` is: beside it, `.json` for `.mp4`, on either store.
pub fn sidecar_of(_env: &Env, path: &str) -> String {
    match path.strip_suffix(".mp4") {
        Some(p) => format!("{p}.json"),
        None => format!("{path}.json"),
    }
}

/// Everything published (videos and sidecars), as `(name, path)`.
pub fn published(env: &Env) -> Vec<(String, String)> {
    if env.garage.is_some() {
        bucket::published(env)
    } else {
        local::published(env)
            .into_iter()
            .map(|(n, p)| (n, p.display().to_string()))
            .collect()
    }
}

/// What the archive keeps in the env's directory besides the queue's: the archive directory,
/// or nothing (a bucket stages under `state`).
pub fn files(env: &Env) -> Vec<&'static str> {
    if env.garage.is_some() {
        Vec::new()
    } else {
        vec!["videos"]
    }
}

/// Names in the archive as a directory holds them (see `bucket::archive_files`), sorted.
pub fn archive_files(env: &Env) -> Vec<String> {
    either!(env, archive_files(env))
}

/// Where a download's partial is (in a bucket's staging directory).
pub fn partial_path(env: &Env, id: &str) -> std::path::PathBuf {
    either!(env, partial_path(env, id))
}

/// What is left behind for a video (a partial, or a staged file).
pub fn leftover(env: &Env, id: &str) -> Option<String> {
    either!(env, leftover(env, id))
}

/// SHA-256 of bytes, as rows record it.
pub fn sha256(bytes: &[u8]) -> String {
    use sha2::Digest;
    hingnetd::id::hex(&sha2::Sha256::digest(bytes))
}

//! The archive is a bucket (Garage): everything the tests know about that. Where a done row's
//! object is, reading it back, what the bucket holds, and what staging holds for a video. The
//! stories reach it through `archive` when the env's archive is a bucket.

#![allow(dead_code)]

use super::garage::{BUCKET, PREFIX, REGION};
use super::harness::Env;

fn garage(env: &Env) -> &super::garage::Garage {
    env.garage.as_ref().expect("the env's archive is a bucket")
}

/// The `[archive]` lines: the bucket, staging beside the queue, and the endpoint (an inline
/// table, so that the lines after it stay in `[archive]`).
pub fn config(env: &Env) -> String {
    format!(
        "dir = \"s3://{BUCKET}/{PREFIX}\"\nstaging_dir = {:?}\ns3 = {{ endpoint = {:?}, region = \"{REGION}\", path_style = true }}\n",
        env.staging(),
        garage(env).endpoint(),
    )
}

/// What a done row's `path` says for the video's bytes.
pub fn video_path(_env: &Env, id: &str, sha256: &str) -> String {
    format!("s3://{BUCKET}/{PREFIX}{id}/{sha256}.mp4")
}

fn key_of(path: &str) -> Option<&str> {
    path.strip_prefix(&format!("s3://{BUCKET}/"))
}

/// The object's bytes, or why there are none.
pub fn read(env: &Env, path: &str) -> Result<Vec<u8>, String> {
    let key = key_of(path).ok_or_else(|| format!("{path} is not in the bucket"))?;
    garage(env)
        .get(key)
        .ok_or_else(|| format!("no object {key}"))
}

/// Every object under the prefix (but the daemon's start-up probe), as `(key, path)`.
pub fn published(env: &Env) -> Vec<(String, String)> {
    garage(env)
        .list(PREFIX)
        .into_iter()
        .filter(|(k, _)| !k[PREFIX.len()..].starts_with(".hingnetd-probe-"))
        .map(|(k, _)| {
            let path = format!("s3://{BUCKET}/{k}");
            (k, path)
        })
        .collect()
}

/// The archive's names as a directory would hold them: `<id>.mp4` and `<id>.json` for each
/// video's objects, and what staging holds (partials, finished downloads not uploaded), sorted;
/// so that a story's "which files are there" reads the same on either store.
pub fn archive_files(env: &Env) -> Vec<String> {
    let mut v: Vec<String> = published(env)
        .into_iter()
        .map(|(k, _)| {
            let rest = &k[PREFIX.len()..];
            match rest.split_once('/') {
                Some((id, name)) if name.ends_with(".mp4") => format!("{id}.mp4"),
                Some((id, name)) if name.ends_with(".json") => format!("{id}.json"),
                _ => rest.to_owned(),
            }
        })
        .collect();
    if let Ok(rd) = std::fs::read_dir(env.staging()) {
        v.extend(
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned()),
        );
    }
    v.sort();
    v
}

/// Where staging keeps the video's partial.
pub fn partial_path(env: &Env, id: &str) -> std::path::PathBuf {
    env.staging().join(format!(".{id}.mp4.part"))
}

/// What staging still holds for the video (a partial, a finished download not uploaded).
pub fn leftover(env: &Env, id: &str) -> Option<String> {
    let staging = env.staging();
    [
        format!(".{id}.mp4.part"),
        format!("{id}.mp4"),
        format!(".{id}.mp4.part.validator"),
    ]
    .into_iter()
    .map(|n| staging.join(n))
    .find(|p| p.exists())
    .map(|p| p.display().to_string())
}

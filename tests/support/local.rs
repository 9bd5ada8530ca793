//! The archive is a local directory: everything the tests know about that. Where a video, its
//! partial and its sidecar sit, what the directory holds, whether a published video is a
//! regular file, a file's SHA-256, and a partial parked by the library's own archive code. The
//! only module that names the library's `archive` module.
//!
//! Backend-neutral stories reach it as `support::store` (see `mod.rs`): another backend's
//! module provides the same functions. Tests about files on disk name `support::local`.

#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};

use super::harness::Env;

/// Where the archive is: the `[archive]` lines of the config besides `min_free` and
/// `sidecar`.
pub fn config(env: &Env) -> String {
    format!("dir = {:?}\n", env.archive)
}

/// Names in the archive directory (including hidden partials), sorted.
pub fn archive_files(env: &Env) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(&env.archive)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

pub fn partial_path(env: &Env, id: &str) -> PathBuf {
    env.archive.join(format!(".{id}.mp4.part"))
}

pub fn final_path(env: &Env, id: &str) -> PathBuf {
    env.archive.join(format!("{id}.mp4"))
}

/// Beside the video: what the API said about it.
pub fn sidecar_path(env: &Env, id: &str) -> PathBuf {
    env.archive.join(format!("{id}.json"))
}

/// What the daemon published, as `(name, path)`: everything in the archive directory but
/// hidden names (partials, files set aside) and links (a link there was planted by a test, not
/// published by the daemon).
pub fn published(env: &Env) -> Vec<(String, PathBuf)> {
    let mut out = Vec::new();
    if let Ok(rd) = fs::read_dir(&env.archive) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let link = e.file_type().is_ok_and(|t| t.is_symlink());
            if !name.starts_with('.') && !link {
                out.push((name, e.path()));
            }
        }
    }
    out
}

/// Whether `path` is a regular file itself (not a link to one); if not, what it is instead.
pub fn regular_file(path: &Path) -> Result<(), String> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_file() => Ok(()),
        Ok(m) => Err(format!("{:?} is {:?}", path, m.file_type())),
        Err(e) => Err(format!("its file: {e}")),
    }
}

/// Lowercase hex SHA-256 of a file, the way the row records it.
pub fn file_sha256(p: &Path) -> String {
    use sha2::Digest;
    let bytes = fs::read(p).expect("read archived file");
    hingnetd::id::hex(&sha2::Sha256::digest(&bytes))
}

/// Leaves `bytes` as the parked partial of `id`, exactly as the archive code leaves a download
/// it stops (holding the partial's lock while it writes, with its resume record); returns what
/// `park` says it kept.
pub fn park_partial(env: &Env, id: &str, bytes: &[u8]) -> u64 {
    let archive = hingnetd::store::local::Archive::open(&env.local_dir()).unwrap();
    let mut p = archive
        .begin(&hingnetd::id::VideoId::parse(id).unwrap())
        .unwrap();
    p.write(bytes).unwrap();
    p.park().unwrap()
}

/// What a done row's `path` says for the video.
pub fn video_path(env: &Env, id: &str, _sha256: &str) -> String {
    final_path(env, id).display().to_string()
}

/// The file's bytes, if it is a regular file itself; or why not.
pub fn read(_env: &Env, path: &str) -> Result<Vec<u8>, String> {
    regular_file(Path::new(path))?;
    fs::read(path).map_err(|e| format!("{path}: {e}"))
}

/// What is left for the video to resume from.
pub fn leftover(env: &Env, id: &str) -> Option<String> {
    let p = partial_path(env, id);
    p.exists().then(|| p.display().to_string())
}

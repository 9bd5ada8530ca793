//! The archive's promise, checked from outside the way an operator would: an audit of `done`
//! (and kept `failed`) rows against their files and the stand-in's videos. The promise is
//! stated here; how to look at the archive is the `store` backend's.

#![allow(dead_code)]

use std::collections::BTreeSet;

use super::harness::Env;
use super::standin::{StandIn, Video};
use super::store::{self, file_sha256};

/// Waits until the row says done, then checks that the file it names is exactly the video and
/// that no partial is left behind.
pub fn assert_archived(env: &Env, v: &Video) {
    let row = env.wait_state(&v.id, "done");
    let path = env.final_path(&v.id);
    assert_eq!(row.path.as_deref(), Some(path.to_str().unwrap()));
    assert_eq!(row.sha256.as_deref(), Some(v.sha256.as_str()));
    assert_eq!(row.bytes, Some(v.bytes.len() as i64));
    assert_eq!(file_sha256(&path), v.sha256);
    assert!(!env.partial_path(&v.id).exists(), "partial left behind");
}

/// The promise: a `done` row names a regular file (not a link) at the video's final path whose
/// SHA-256 and size are the row's and the stand-in's video's; a `failed` row that names a file
/// (bytes the API served, kept) names exactly those bytes; no published file (nor its
/// `<id>.json`) without such a row. Returns one line per breach.
pub fn audit(env: &Env, api: &StandIn) -> Vec<String> {
    let mut bad = Vec::new();
    let mut named = BTreeSet::new();
    for r in env.rows() {
        if r.state == "failed" && r.path.is_some() {
            let final_path = env.final_path(&r.id);
            named.insert(final_path.clone());
            named.insert(env.sidecar_path(&r.id));
            if r.path.as_deref() != final_path.to_str() {
                bad.push(format!("{}: kept with path {:?}", r.id, r.path));
            } else if final_path.is_file() {
                let on_disk = file_sha256(&final_path);
                if r.sha256.as_deref() != Some(on_disk.as_str()) {
                    bad.push(format!(
                        "{}: kept, row sha256 {:?}, file {on_disk}",
                        r.id, r.sha256
                    ));
                }
            } else {
                bad.push(format!("{}: kept, but {final_path:?} is not a file", r.id));
            }
            continue;
        }
        if r.state != "done" {
            continue;
        }
        let final_path = env.final_path(&r.id);
        named.insert(final_path.clone());
        named.insert(env.sidecar_path(&r.id));
        if r.path.as_deref() != final_path.to_str() {
            bad.push(format!("{}: done with path {:?}", r.id, r.path));
            continue;
        }
        if let Err(why) = store::regular_file(&final_path) {
            bad.push(format!("{}: done, but {why}", r.id));
            continue;
        }
        let on_disk = file_sha256(&final_path);
        let want = api
            .video(&r.id)
            .map(|v| (v.sha256.clone(), v.bytes.len() as i64));
        if r.sha256.as_deref() != Some(on_disk.as_str()) {
            bad.push(format!(
                "{}: row sha256 {:?}, file {on_disk}",
                r.id, r.sha256
            ));
        }
        match want {
            Some((sha, len)) if sha != on_disk || r.bytes != Some(len) => bad.push(format!(
                "{}: WRONG FILE MARKED DONE: {} bytes sha256 {on_disk}, the video is {len} bytes {sha}",
                r.id,
                r.bytes.unwrap_or(-1)
            )),
            Some(_) => {}
            None => bad.push(format!("{}: done, but the stand-in has no such video", r.id)),
        }
    }
    for (name, path) in store::published(env) {
        if !named.contains(&path) {
            bad.push(format!("published file without a done row: {name}"));
        }
    }
    bad
}

//! The archive's promise, checked from outside the way an operator would: an audit of `done`
//! (and kept `failed`) rows against their files and the stand-in's videos. The promise is
//! stated here; how to look at the archive is the backend's (`archive`).

#![allow(dead_code)]

use std::collections::BTreeSet;

use super::archive;
use super::harness::Env;
use super::standin::{StandIn, Video};

/// Waits until the row says done, then checks that the file it names is exactly the video and
/// that nothing is left behind to resume from.
pub fn assert_archived(env: &Env, v: &Video) {
    let row = env.wait_state(&v.id, "done");
    let path = archive::video_path(env, &v.id, &v.sha256);
    assert_eq!(row.path.as_deref(), Some(path.as_str()));
    assert_eq!(row.sha256.as_deref(), Some(v.sha256.as_str()));
    assert_eq!(row.bytes, Some(v.bytes.len() as i64));
    let bytes = archive::read(env, &path).expect("the archived file");
    assert_eq!(archive::sha256(&bytes), v.sha256);
    assert_eq!(archive::leftover(env, &v.id), None, "partial left behind");
}

/// The promise: a `done` row names a regular file (not a link; in a bucket, an object) at the
/// video's place whose SHA-256 and size are the row's and the stand-in's video's; a `failed`
/// row that names a file (bytes the API served, kept) names exactly those bytes; nothing
/// published (nor its sidecar) without such a row. Returns one line per breach.
pub fn audit(env: &Env, api: &StandIn) -> Vec<String> {
    let mut bad = Vec::new();
    let mut named = BTreeSet::new();
    for r in env.rows() {
        if r.state == "failed" && r.path.is_some() {
            let want = archive::video_path(env, &r.id, r.sha256.as_deref().unwrap_or(""));
            named.insert(want.clone());
            named.insert(archive::sidecar_of(env, &want));
            if r.path.as_deref() != Some(want.as_str()) {
                bad.push(format!("{}: kept with path {:?}", r.id, r.path));
                continue;
            }
            match archive::read(env, &want) {
                Ok(bytes) => {
                    let found = archive::sha256(&bytes);
                    if r.sha256.as_deref() != Some(found.as_str()) {
                        bad.push(format!(
                            "{}: kept, row sha256 {:?}, file {found}",
                            r.id, r.sha256
                        ));
                    }
                }
                Err(why) => bad.push(format!("{}: kept, but {why}", r.id)),
            }
            continue;
        }
        if r.state != "done" {
            continue;
        }
        let want = archive::video_path(env, &r.id, r.sha256.as_deref().unwrap_or(""));
        named.insert(want.clone());
        named.insert(archive::sidecar_of(env, &want));
        if r.path.as_deref() != Some(want.as_str()) {
            bad.push(format!("{}: done with path {:?}", r.id, r.path));
            continue;
        }
        let bytes = match archive::read(env, &want) {
            Ok(b) => b,
            Err(why) => {
                bad.push(format!("{}: done, but {why}", r.id));
                continue;
            }
        };
        let found = archive::sha256(&bytes);
        if r.sha256.as_deref() != Some(found.as_str()) {
            bad.push(format!("{}: row sha256 {:?}, file {found}", r.id, r.sha256));
        }
        let expected = api
            .video(&r.id)
            .map(|v| (v.sha256.clone(), v.bytes.len() as i64));
        match expected {
            Some((sha, len)) if sha != found || r.bytes != Some(len) => bad.push(format!(
                "{}: WRONG FILE MARKED DONE: {} bytes sha256 {found}, the video is {len} bytes {sha}",
                r.id,
                r.bytes.unwrap_or(-1)
            )),
            Some(_) => {}
            None => bad.push(format!("{}: done, but the stand-in has no such video", r.id)),
        }
    }
    for (name, path) in archive::published(env) {
        if !named.contains(&path) {
            bad.push(format!("published file without a done row: {name}"));
        }
    }
    bad
}

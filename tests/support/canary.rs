//! The leak sweep: after a run, every byte the run produced is searched for the secrets it
//! handled. The token is a canary (`hn-CANARY-<hex>`, unique per run) and the stand-in's signed
//! URLs carry `sig=SIGNED-<hex>`; neither may appear in a log, the database (its `-wal`/`-shm`
//! too), the archive (file names and contents), anything else in the scratch directory, or any
//! command output a test captured. The one place the token belongs, the token file, is skipped.
//!
//! The same sweep counts what the stand-in's CDN received: no `Authorization` header, and no
//! request line or header carrying the token.

#![allow(dead_code)]

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

use super::harness::Env;
use super::standin::StandIn;

/// A canary token: `hn-CANARY-` and 16 hex digits from the seed, so a failing run reproduces.
pub fn token(seed: u64) -> String {
    let mut rng = fastrand::Rng::with_seed(seed ^ 0xca7a_4157_0000_0001);
    format!("hn-CANARY-{:016x}", rng.u64(..))
}

/// One place a secret was found.
#[derive(Debug, Clone)]
pub struct Hit {
    /// A file path (with `(name)` when it was the file's name), or the label of an output.
    pub place: String,
    /// Which secret: "token", "signed URL", ...
    pub what: String,
    pub count: usize,
}

/// What a sweep looked at and found.
#[derive(Debug, Default)]
pub struct Sweep {
    pub files: usize,
    pub bytes: u64,
    pub hits: Vec<Hit>,
    /// CDN requests that carried an `Authorization` header.
    pub cdn_authorization: usize,
    /// CDN requests whose path, query or headers carried the token.
    pub cdn_token: usize,
}

impl Sweep {
    /// Occurrences of any secret anywhere, plus the token reaching the CDN.
    pub fn violations(&self) -> usize {
        self.hits.iter().map(|h| h.count).sum::<usize>() + self.cdn_authorization + self.cdn_token
    }

    /// `leaks=<n> cdn_auth=<n> swept_files=<n> swept_bytes=<n>`, for a FAULTS line.
    pub fn figures(&self) -> String {
        format!(
            "leaks={} cdn_auth={} swept_files={} swept_bytes={}",
            self.hits.iter().map(|h| h.count).sum::<usize>() + self.cdn_token,
            self.cdn_authorization,
            self.files,
            self.bytes
        )
    }

    pub fn describe(&self) -> String {
        let mut out = String::new();
        for h in &self.hits {
            let _ = writeln!(out, "  {} x{} in {}", h.what, h.count, h.place);
        }
        if self.cdn_authorization > 0 {
            let _ = writeln!(
                out,
                "  {} CDN requests carried Authorization",
                self.cdn_authorization
            );
        }
        if self.cdn_token > 0 {
            let _ = writeln!(out, "  {} CDN requests carried the token", self.cdn_token);
        }
        out
    }
}

/// The secrets of a run: the token (and its random tail, which would survive a partial echo),
/// the `SIGNED-` prefix of every signed query string, and each signature the stand-in issued.
fn needles(token: &str, api: &StandIn) -> Vec<(String, Vec<u8>)> {
    let mut n = vec![
        ("token".to_owned(), token.as_bytes().to_vec()),
        ("signed URL".to_owned(), b"SIGNED-".to_vec()),
    ];
    if let Some(tail) = token.strip_prefix("hn-CANARY-") {
        n.push(("token tail".to_owned(), tail.as_bytes().to_vec()));
    }
    for sig in api.signatures_issued() {
        if let Some(hex) = sig.strip_prefix("SIGNED-") {
            n.push(("signature".to_owned(), hex.as_bytes().to_vec()));
        }
    }
    n
}

/// Occurrences of each needle in `hay`, in one pass indexed by each needle's first two bytes
/// (the test profile is unoptimised, and a run leaves megabytes of archive and hundreds of
/// signatures to look for).
fn count(hay: &[u8], needles: &[(String, Vec<u8>)], counts: &mut [usize]) {
    let mut by_prefix: Vec<Vec<usize>> = vec![Vec::new(); 1 << 16];
    for (k, (_, n)) in needles.iter().enumerate() {
        assert!(n.len() >= 2, "needles are at least two bytes");
        by_prefix[usize::from(n[0]) << 8 | usize::from(n[1])].push(k);
    }
    let any: Vec<bool> = by_prefix.iter().map(|v| !v.is_empty()).collect();
    let mut prefix = 0usize;
    for (i, &b) in hay.iter().enumerate() {
        prefix = (prefix << 8 | usize::from(b)) & 0xffff;
        if i == 0 || !any[prefix] {
            continue;
        }
        for &k in &by_prefix[prefix] {
            let i = i - 1;
            if hay[i..].starts_with(&needles[k].1) {
                counts[k] += 1;
            }
        }
    }
}

fn record(sweep: &mut Sweep, place: &str, needles: &[(String, Vec<u8>)], hay: &[u8]) {
    let mut counts = vec![0; needles.len()];
    count(hay, needles, &mut counts);
    for (k, c) in counts.into_iter().enumerate() {
        if c > 0 {
            sweep.hits.push(Hit {
                place: place.to_owned(),
                what: needles[k].0.clone(),
                count: c,
            });
        }
    }
}

/// Every file under `dir`, recursively, without following symlinks (a link's own name is
/// still checked).
fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let p = e.path();
        out.push(p.clone());
        if fs::symlink_metadata(&p).is_ok_and(|m| m.is_dir()) {
            walk(&p, out);
        }
    }
}

/// Occurrences of each needle in each of `files`, by `grep -F -a -o` (one process for all of
/// them: the archive holds megabytes, and the test profile is unoptimised).
fn grep_files(files: &[PathBuf], needles: &[(String, Vec<u8>)], sweep: &mut Sweep) {
    use std::os::unix::ffi::OsStrExt;
    if files.is_empty() {
        return;
    }
    let patterns = tempfile::NamedTempFile::new().expect("patterns file");
    let mut list = Vec::new();
    for (_, n) in needles {
        list.extend_from_slice(n);
        list.push(b'\n');
    }
    fs::write(patterns.path(), &list).expect("write patterns");
    let out = std::process::Command::new("grep")
        .args(["-F", "-a", "-o", "-H", "--null", "-f"])
        .arg(patterns.path())
        .arg("--")
        .args(files)
        .output()
        .expect("grep is needed for the leak sweep");
    // 0: found, 1: nothing found; 2: trouble (a file vanished is fine, anything else is not).
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.code() != Some(2)
            || stderr
                .lines()
                .all(|l| l.contains("No such file or directory")),
        "grep failed: {stderr}"
    );
    let mut found: std::collections::BTreeMap<(String, String), usize> = Default::default();
    for line in out.stdout.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        let Some(nul) = line.iter().position(|b| *b == 0) else {
            continue;
        };
        let (file, matched) = (&line[..nul], &line[nul + 1..]);
        let what = needles
            .iter()
            .find(|(_, n)| n.as_slice() == matched)
            .map_or("secret", |(w, _)| w.as_str());
        let place = std::path::Path::new(std::ffi::OsStr::from_bytes(file))
            .display()
            .to_string();
        *found.entry((place, what.to_owned())).or_default() += 1;
    }
    for ((place, what), count) in found {
        sweep.hits.push(Hit { place, what, count });
    }
}

/// Searches everything the run produced: every file in the env's scratch directory (logs,
/// config, the database and its `-wal`/`-shm`/lock files, the archive and partials, anything a
/// test left there) by name and content, except the token file, plus `outputs` (captured
/// command output, labelled), plus what the stand-in's CDN received.
pub fn sweep(env: &Env, api: &StandIn, token: &str, outputs: &[(&str, &[u8])]) -> Sweep {
    let mut needles = needles(token, api);
    // A bucket archive: its secret, and any presigned request's signature.
    if let Some(g) = &env.garage {
        needles.push(("S3 secret".to_owned(), g.secret.as_bytes().to_vec()));
        needles.push(("S3 signed request".to_owned(), b"X-Amz-Signature=".to_vec()));
    }
    let mut sweep = Sweep::default();
    let mut paths = Vec::new();
    walk(env.dir.path(), &mut paths);
    paths.sort();
    let mut files = Vec::new();
    for p in paths {
        let name = p
            .file_name()
            .map(|n| n.as_encoded_bytes())
            .unwrap_or_default();
        record(
            &mut sweep,
            &format!("{} (name)", p.display()),
            &needles,
            name,
        );
        if p == env.token_file {
            continue;
        }
        if let Ok(m) = fs::symlink_metadata(&p)
            && m.is_file()
        {
            sweep.files += 1;
            sweep.bytes += m.len();
            files.push(p);
        }
    }
    grep_files(&files, &needles, &mut sweep);
    for (label, bytes) in outputs {
        sweep.bytes += bytes.len() as u64;
        record(&mut sweep, label, &needles, bytes);
    }
    for (label, bytes) in super::queue_db::contents(env) {
        sweep.bytes += bytes.len() as u64;
        record(&mut sweep, &label, &needles, &bytes);
    }
    // What the daemon wrote to a bucket besides the videos themselves: its sidecars.
    if env.garage.is_some() {
        for (name, path) in super::archive::published(env) {
            if name.ends_with(".json")
                && let Ok(bytes) = super::archive::read(env, &path)
            {
                sweep.bytes += bytes.len() as u64;
                record(&mut sweep, &format!("{path} (object)"), &needles, &bytes);
            }
        }
    }
    for r in api
        .requests()
        .iter()
        .filter(|r| r.host == super::standin::Host::Cdn)
    {
        if r.authorization.is_some() {
            sweep.cdn_authorization += 1;
        }
        let seen = format!(
            "{} {} {:?} {:?} {:?}",
            r.path,
            r.query.as_deref().unwrap_or(""),
            r.authorization,
            r.range,
            r.if_range
        );
        if seen.contains(token) {
            sweep.cdn_token += 1;
        }
    }
    sweep
}

/// Sweeps and fails the test on any finding, listing where each secret was found.
pub fn assert_clean(env: &Env, api: &StandIn, token: &str, outputs: &[(&str, &[u8])]) -> Sweep {
    let s = sweep(env, api, token, outputs);
    assert_eq!(
        s.violations(),
        0,
        "secrets leaked:\n{}request log:\n{}",
        s.describe(),
        api.dump()
    );
    s
}

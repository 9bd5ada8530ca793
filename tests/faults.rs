//! The crash, storage and database half of the fault suite (issue 4): the real daemon, killed
//! with SIGKILL at random points, starved of disk, given a vanished archive, corrupt or
//! read-only databases and producers that hold locks and snapshots; then every promise is
//! checked: no `done` row without its exact file, no lost ID, nothing published half-written.
//!
//! Bounded by default; `HINGNETD_FAULTS=full` runs the full sizes (see the README). Seeds are
//! fixed and printed; `HINGNETD_FAULTS_SEED=N` replays one. Every test prints one
//! `FAULTS <name>: ...` line with its figures before it asserts.

mod support;

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use support::harness::{DEADLINE, Env, Settings, file_sha256, stderr};
use support::standin::{Request, StandIn, Step, Video};

const TOKEN: &str = "hn-faults-token-5d2c";

fn full() -> bool {
    std::env::var("HINGNETD_FAULTS").as_deref() == Ok("full")
}

/// Bounded or full size.
fn scale(bounded: usize, full_size: usize) -> usize {
    if full() { full_size } else { bounded }
}

fn seed(default: u64) -> u64 {
    std::env::var("HINGNETD_FAULTS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn setup_with(tune: impl FnOnce(&mut Settings)) -> (StandIn, Env) {
    let api = StandIn::start(TOKEN);
    let mut s = Settings::new(&api.base_url());
    tune(&mut s);
    let env = Env::new(s, TOKEN);
    (api, env)
}

/// Polls `cond` every 5 ms until it holds; panics with `what` after the deadline.
fn wait_until(what: &str, deadline: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Rows per state, read the way an operator's tool reads them.
fn state_counts(env: &Env) -> BTreeMap<String, i64> {
    let c = env.open_db();
    let mut st = c
        .prepare("SELECT state, count(*) FROM queue GROUP BY state")
        .unwrap();
    st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

fn count(env: &Env, state: &str) -> i64 {
    state_counts(env).get(state).copied().unwrap_or(0)
}

/// Every violation of the archive's promises for these videos: a `done` row whose file is
/// missing, short or different; a row not `done`; a file in the archive no row explains.
fn archive_violations(env: &Env, videos: &[Video]) -> Vec<String> {
    let mut bad = Vec::new();
    let c = env.open_db();
    for v in videos {
        let row: Option<(String, Option<String>, Option<String>, Option<i64>)> = c
            .query_row(
                "SELECT state, path, sha256, bytes FROM queue WHERE video_id = ?1",
                [&v.id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .ok();
        let Some((state, path, sha, bytes)) = row else {
            bad.push(format!("{}: row lost", v.id));
            continue;
        };
        if state != "done" {
            bad.push(format!("{}: ended {state}", v.id));
            continue;
        }
        let path = PathBuf::from(path.unwrap_or_default());
        if path != env.final_path(&v.id) {
            bad.push(format!("{}: done with path {}", v.id, path.display()));
            continue;
        }
        match std::fs::metadata(&path) {
            Err(e) => bad.push(format!("{}: done but file unreadable: {e}", v.id)),
            Ok(m) if m.len() != v.bytes.len() as u64 => bad.push(format!(
                "{}: file is {} of {} bytes",
                v.id,
                m.len(),
                v.bytes.len()
            )),
            Ok(_) if file_sha256(&path) != v.sha256 => {
                bad.push(format!("{}: file has another SHA-256", v.id))
            }
            Ok(_) => {}
        }
        if sha.as_deref() != Some(v.sha256.as_str()) || bytes != Some(v.bytes.len() as i64) {
            bad.push(format!("{}: row records sha {sha:?} bytes {bytes:?}", v.id));
        }
    }
    let expected: HashSet<String> = videos.iter().map(|v| format!("{}.mp4", v.id)).collect();
    for name in env.archive_files() {
        if !expected.contains(&name) {
            bad.push(format!("unexplained file in the archive: {name}"));
        }
    }
    bad
}

/// Complete bodies the stand-in sent per video (a full 200, or a 206 for the rest of the file).
fn complete_bodies(reqs: &[Request], videos: &BTreeMap<String, usize>) -> BTreeMap<String, usize> {
    let mut n = BTreeMap::new();
    for r in reqs {
        let Some(id) = r.video_id() else { continue };
        let Some(len) = videos.get(&id) else { continue };
        let from: usize = r
            .range
            .as_deref()
            .and_then(|x| x.strip_prefix("bytes="))
            .and_then(|x| x.strip_suffix('-'))
            .and_then(|x| x.parse().ok())
            .unwrap_or(0);
        let whole = match r.status {
            200 => r.body_sent == *len,
            206 => from == 0 && r.body_sent == *len,
            _ => false,
        };
        if whole && r.finished {
            *n.entry(id).or_insert(0) += 1;
        }
    }
    n
}

/// kill -9 at random points over a run of mixed videos (sizes, redirects, not-ready answers,
/// truncations), restarting each time; then: every row done with its exact file, no ID lost,
/// no partial published, and at most one redundant full download per kill.
#[test]
fn kill_9_at_random_points_loses_and_corrupts_nothing() {
    let seed = seed(0x5eed_0004);
    let mut rng = fastrand::Rng::with_seed(seed);
    let (n_videos, n_kills) = (scale(120, 500), scale(40, 200));
    let (api, env) = setup_with(|s| {
        s.concurrency = 4;
        s.initial_delay = "20ms";
        s.max_delay = "100ms";
    });
    let mut videos = Vec::new();
    let mut sizes = BTreeMap::new();
    for i in 0..n_videos {
        let id = format!("video_k{i:04}");
        let size = match rng.u32(0..10) {
            0..=5 => rng.usize(2_000..200_000),
            6..=8 => rng.usize(200_000..2_000_000),
            _ => rng.usize(2_000_000..6_000_000),
        };
        let v = api.add_video(&id, size);
        let script = match rng.u32(0..10) {
            0..=2 => vec![Step::Redirect],
            3 => vec![Step::NotReady, Step::NotReady, Step::Serve],
            4 => vec![Step::NotReady, Step::Redirect],
            5 => vec![Step::Truncate(rng.usize(1..size)), Step::Serve],
            _ => vec![Step::Serve],
        };
        api.script(&id, script);
        sizes.insert(id, size);
        videos.push(v);
    }
    let ids: Vec<&str> = videos.iter().map(|v| v.id.as_str()).collect();
    env.insert_sqlite3(&ids);

    let mut kills = 0;
    let mut restarts = 0;
    let started = Instant::now();
    while kills < n_kills {
        let mut d = env.start_with_log(&format!("daemon-{restarts:03}.log"));
        restarts += 1;
        // A random point: a few requests into this run, then a random instant (deliberately a
        // sleep: it is what puts the kill mid-body, mid-publish or mid-update).
        let seen = api.requests().len();
        let more = rng.usize(1..4);
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut finished = false;
        while api.requests().len() < seen + more && Instant::now() < deadline {
            if count(&env, "done") as usize == n_videos {
                finished = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        if finished {
            break;
        }
        std::thread::sleep(Duration::from_millis(rng.u64(0..30)));
        d.kill9();
        kills += 1;
    }
    let _d = env.start_with_log("daemon-final.log");
    wait_until("every video done", DEADLINE * 3, || {
        count(&env, "done") as usize == n_videos
    });
    drop(_d);

    let violations = archive_violations(&env, &videos);
    let partials = std::fs::read_dir(&env.archive)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with('.')
        })
        .count();
    let reqs = api.requests();
    let complete = complete_bodies(&reqs, &sizes);
    let redundant: usize = complete.values().map(|n| n.saturating_sub(1)).sum();
    let sent: usize = reqs.iter().map(|r| r.body_sent).sum();
    let total: usize = sizes.values().sum();
    println!(
        "FAULTS kill_9_soak: videos={n_videos} kills={kills} restarts={restarts} violations={} \
         leftover_partials={partials} redundant_full_downloads={redundant} \
         bytes_sent={sent} bytes_archived={total} requests={} elapsed={:.1}s seed={seed}",
        violations.len(),
        reqs.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(
        violations.is_empty(),
        "violations:\n{}",
        violations.join("\n")
    );
    assert_eq!(partials, 0, "partial files left: {:?}", env.archive_files());
    assert!(
        redundant <= kills,
        "{redundant} redundant full downloads for {kills} kills"
    );
    assert!(kills > 0, "no kill landed");
}

/// A small tmpfs, unmounted (lazily) when dropped. Mounting needs root (CAP_SYS_ADMIN); where
/// that is missing the test prints why and skips.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(test: &str, dir: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(dir).unwrap();
        let ok = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0755"),
                "tmpfs",
            ])
            .arg(dir)
            .output()
            .is_ok_and(|o| o.status.success());
        if !ok {
            println!("FAULTS {test}: skipped: mounting a tmpfs needs root (CAP_SYS_ADMIN)");
            return None;
        }
        Some(Tmpfs(dir.to_owned()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).output();
    }
}

fn ballast(path: &Path, mib: usize) {
    std::fs::write(path, vec![0xa5u8; mib << 20]).expect("write ballast");
}

/// The disk fills mid-write (a real ENOSPC on a small tmpfs): the video is neither done nor
/// failed and its partial is removed. While free space is below `archive.min_free`, new
/// downloads wait; when space returns they resume by themselves.
#[test]
fn a_full_disk_pauses_downloads_and_they_resume_when_space_returns() {
    const NAME: &str = "disk_full";
    let (api, mut env) = setup_with(|s| {
        s.concurrency = 2;
        s.min_free = "4MiB";
    });
    let Some(_fs) = Tmpfs::mount(NAME, &env.dir.path().join("small"), "64m") else {
        return;
    };
    env.archive = env.dir.path().join("small/videos");
    env.write_config();
    let filler = env.dir.path().join("small/ballast1");
    ballast(&filler, 50);
    // No length announced, so nothing can refuse it up front: it runs into the full disk.
    let chunky = api.add_video("video_chunky", 20 << 20);
    api.script("video_chunky", vec![Step::Chunked]);
    let d = env.start();
    env.insert_sqlite3(&["video_chunky"]);
    let row = env.wait_row("video_chunky", "a disk-full error", |r| {
        r.last_error
            .as_deref()
            .is_some_and(|e| e.contains("No space left on device"))
    });
    assert_ne!(row.state, "failed", "{row:?}");
    assert_ne!(row.state, "done", "{row:?}");
    wait_until("the partial removed", DEADLINE, || {
        !env.partial_path("video_chunky").exists()
    });

    // Below the reserve: new downloads wait, and say why.
    let filler2 = env.dir.path().join("small/ballast2");
    ballast(&filler2, 12);
    d.wait_log("NEW DOWNLOADS PAUSED");
    assert!(d.log().contains("disk short"), "{}", d.log());
    let sized: Vec<Video> = (0..3)
        .map(|i| api.add_video(&format!("video_sized{i}"), 8 << 20))
        .collect();
    env.insert_sqlite3(&["video_sized0", "video_sized1", "video_sized2"]);
    // A measurement window (two storage checks), not a wait for an event: nothing may start.
    let paused_at = api.requests().len();
    std::thread::sleep(Duration::from_secs(5));
    let during: Vec<String> = api.requests()[paused_at..]
        .iter()
        .map(ToString::to_string)
        .collect();
    for v in &sized {
        let r = env.row(&v.id).unwrap();
        assert_eq!((r.state.as_str(), r.attempts), ("pending", 0), "{r:?}");
    }

    std::fs::remove_file(&filler).unwrap();
    std::fs::remove_file(&filler2).unwrap();
    d.wait_log("downloads resumed");
    let mut all = sized.clone();
    all.push(chunky);
    wait_until("every video done", DEADLINE, || count(&env, "done") == 4);
    let violations = archive_violations(&env, &all);
    let failed = count(&env, "failed");
    println!(
        "FAULTS {NAME}: requests_while_paused={} failed={failed} violations={}",
        during.len(),
        violations.len()
    );
    assert!(during.is_empty(), "requests while paused: {during:?}");
    assert!(violations.is_empty(), "{violations:?}");
}

/// The archive directory disappears: before a download (nothing is claimed until it is back)
/// and during one (the publish fails; the row is not done). Recreating it resumes everything.
#[test]
fn an_archive_directory_that_disappears_fails_nothing() {
    let (api, env) = setup_with(|_| {});
    let held = api.add_video("video_held", 1_000_000);
    api.script("video_held", vec![Step::Hold(500_000), Step::Serve]);
    let d = env.start();
    env.insert_sqlite3(&["video_held"]);
    api.wait_for("held download", DEADLINE, |l| l.iter().any(|r| r.paused));
    std::fs::remove_dir_all(&env.archive).unwrap();
    api.release("video_held");
    let row = env.wait_row("video_held", "a storage error", |r| r.last_error.is_some());
    assert_eq!(row.state, "pending", "{row:?}");
    d.wait_log("is missing");
    let later = api.add_video("video_later", 300_000);
    env.insert_sqlite3(&["video_later"]);
    assert!(!env.final_path("video_held").exists());
    std::fs::create_dir(&env.archive).unwrap();
    d.wait_log("downloads resumed");
    wait_until("both done", DEADLINE, || count(&env, "done") == 2);
    let violations = archive_violations(&env, &[held, later]);
    println!(
        "FAULTS archive_dir_vanishes: failed={} violations={}",
        count(&env, "failed"),
        violations.len()
    );
    assert!(violations.is_empty(), "{violations:?}");
}

/// A parked partial whose bytes were changed on disk is not resumed from: the download starts
/// over and the archived file is the server's.
#[test]
fn a_partial_whose_bytes_changed_is_downloaded_again() {
    let (api, env) = setup_with(|_| {});
    let v = api.add_video("video_tampered", 2_000_000);
    api.script("video_tampered", vec![Step::Hold(1_200_000), Step::Serve]);
    let mut d = env.start();
    env.insert_sqlite3(&["video_tampered"]);
    api.wait_for("held download", DEADLINE, |l| l.iter().any(|r| r.paused));
    d.signal(libc::SIGTERM);
    assert_eq!(d.wait_exit().code(), Some(0));
    let path = env.partial_path("video_tampered");
    let mut bytes = std::fs::read(&path).unwrap();
    assert!(bytes.len() > 100_000, "parked {} bytes", bytes.len());
    bytes[99_999] ^= 0x01;
    std::fs::write(&path, &bytes).unwrap();
    api.release("video_tampered");
    let d2 = env.start_with_log("daemon2.log");
    env.wait_state("video_tampered", "done");
    let violations = archive_violations(&env, std::slice::from_ref(&v));
    let last = api
        .requests()
        .into_iter()
        .rfind(|r| r.is_content())
        .unwrap();
    println!(
        "FAULTS changed_partial: violations={} restarted_from_zero={}",
        violations.len(),
        last.range.is_none()
    );
    assert!(violations.is_empty(), "{violations:?}");
    assert!(
        last.range.is_none(),
        "resumed from a changed partial: {last}"
    );
    assert!(d2.log().contains("partial file changed"), "{}", d2.log());
}

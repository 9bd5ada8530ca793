//! The bucket archive's promises under faults, against a real Garage: kill -9 of the daemon at
//! random moments during hundreds of uploads, Garage itself killed and restarted mid-run, and
//! connections reset mid-upload. Afterwards every `done` row's object is exactly the video (the
//! audit of `support::audit`, reading the bucket back), nothing is failed, no object exists that
//! no row names, staging is empty and no multipart upload is left unfinished.
//!
//! Bounded by default; `HINGNETD_FAULTS=full` runs the full sizes. Seeds are fixed and printed;
//! `HINGNETD_FAULTS_SEED=N` replays one. Every test prints one `FAULTS <name>: ...` line.

mod support;

use std::time::{Duration, Instant};

use support::audit::audit;
use support::faults::{scale, seed};
use support::garage::PREFIX;
use support::harness::{DEADLINE, Env, Settings, wait_until};
use support::standin::{StandIn, Step, Video};

const TOKEN: &str = "tok_faults_s3_0123456789";

fn setup(concurrency: usize) -> (StandIn, Env) {
    support::s3_only();
    let api = StandIn::start(TOKEN);
    let mut s = Settings::new(&api.base_url());
    s.concurrency = concurrency;
    s.initial_delay = "20ms";
    s.max_delay = "200ms";
    let env = Env::new(s, TOKEN);
    (api, env)
}

fn videos(api: &StandIn, rng: &mut fastrand::Rng, prefix: &str, n: usize) -> Vec<Video> {
    (0..n)
        .map(|i| {
            let id = format!("video_{prefix}{i:04}");
            let size = match rng.u32(0..10) {
                0..=6 => rng.usize(20_000..400_000),
                _ => rng.usize(400_000..4_000_000),
            };
            let v = api.add_video(&id, size);
            if rng.u32(0..4) == 0 {
                api.script(&id, vec![Step::Redirect]);
            }
            v
        })
        .collect()
}

fn done(env: &Env) -> usize {
    env.rows().iter().filter(|r| r.state == "done").count()
}

/// What must hold at the end of every run: one line per breach.
fn violations(env: &Env, api: &StandIn, n: usize) -> Vec<String> {
    let mut bad = audit(env, api);
    let rows = env.rows();
    if rows.len() != n {
        bad.push(format!("{} rows for {n} videos", rows.len()));
    }
    for r in rows.iter().filter(|r| r.state != "done") {
        bad.push(format!("{}: {} ({:?})", r.id, r.state, r.last_error));
    }
    let g = env.garage.as_ref().unwrap();
    let unfinished = g.unfinished_uploads("");
    if !unfinished.is_empty() {
        bad.push(format!("unfinished multipart uploads: {unfinished:?}"));
    }
    // Each video has exactly one object (no second one of other bytes), and at most one
    // sidecar: a kill between staging's two renames leaves a video without its sidecar, as it
    // does in a directory (`store::local`).
    let listed = g.list(PREFIX);
    let videos = listed.iter().filter(|(k, _)| k.ends_with(".mp4")).count();
    let sidecars = listed.iter().filter(|(k, _)| k.ends_with(".json")).count();
    if videos != n || sidecars > n {
        bad.push(format!(
            "{videos} video objects and {sidecars} sidecars for {n} videos"
        ));
    }
    if let Ok(rd) = std::fs::read_dir(env.staging()) {
        let left: Vec<_> = rd.flatten().map(|e| e.file_name()).collect();
        if !left.is_empty() {
            bad.push(format!("left in staging: {left:?}"));
        }
    }
    bad
}

/// kill -9 of the daemon at random moments while it downloads and uploads, restarting it each
/// time: a kill mid-upload leaves no object (a PUT is whole or nothing), one after the upload
/// and before the row says done is adopted at the restart, never uploaded as other bytes.
#[test]
fn kill_9_during_uploads_loses_and_corrupts_nothing() {
    let seed = seed(0x5eed_5301);
    let mut rng = fastrand::Rng::with_seed(seed);
    let (n, n_kills) = (scale(300, 1000), scale(25, 150));
    let (api, env) = setup(4);
    let vs = videos(&api, &mut rng, "k", n);
    let ids: Vec<&str> = vs.iter().map(|v| v.id.as_str()).collect();
    env.insert(&ids);
    let started = Instant::now();
    let (mut kills, mut restarts) = (0, 0);
    while kills < n_kills {
        let mut d = env.start_with_log(&format!("daemon-{restarts:03}.log"));
        restarts += 1;
        // A few downloads into this run, then a random instant (a sleep on purpose: it is what
        // puts the kill mid-upload, mid-confirmation or mid-update).
        let seen = api.requests().len();
        let more = rng.usize(1..6);
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut finished = false;
        while api.requests().len() < seen + more && Instant::now() < deadline {
            if done(&env) == n {
                finished = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        if finished {
            break;
        }
        std::thread::sleep(Duration::from_millis(rng.u64(0..40)));
        d.kill9();
        kills += 1;
    }
    let d = env.start_with_log("daemon-final.log");
    wait_until("every video done", DEADLINE * 3, || done(&env) == n);
    drop(d);
    let bad = violations(&env, &api, n);
    let sidecars = env
        .garage
        .as_ref()
        .unwrap()
        .list(PREFIX)
        .iter()
        .filter(|(k, _)| k.ends_with(".json"))
        .count();
    println!(
        "FAULTS s3_kill_9_soak: uploads={n} kills={kills} restarts={restarts} violations={} sidecars={sidecars} requests={} elapsed={:.1}s seed={seed}",
        bad.len(),
        api.requests().len(),
        started.elapsed().as_secs_f64()
    );
    assert!(bad.is_empty(), "violations:\n{}", bad.join("\n"));
    assert!(kills > 0, "no kill landed");
}

/// Garage itself killed (SIGKILL) and restarted at random moments under a running daemon:
/// uploads in flight fail and are tried again, finished downloads wait staged, nothing fails.
#[test]
fn garage_killed_and_restarted_mid_run_fails_nothing() {
    let seed = seed(0x5eed_5302);
    let mut rng = fastrand::Rng::with_seed(seed);
    let (n, n_kills) = (scale(120, 500), scale(6, 30));
    let (api, mut env) = setup(4);
    let vs = videos(&api, &mut rng, "g", n);
    let ids: Vec<&str> = vs.iter().map(|v| v.id.as_str()).collect();
    let started = Instant::now();
    let d = env.start();
    env.insert(&ids);
    let mut kills = 0;
    while kills < n_kills && done(&env) < n {
        let at = done(&env) + rng.usize(1..n / n_kills + 2);
        let deadline = Instant::now() + DEADLINE;
        while done(&env) < at.min(n) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        if done(&env) == n {
            break;
        }
        let g = env.garage.as_mut().unwrap();
        g.kill();
        kills += 1;
        // Down longer than one request's retries (about 2 s): uploads in flight give up, their
        // downloads wait staged and the pause begins.
        std::thread::sleep(Duration::from_millis(rng.u64(2500..4000)));
        g.restart();
    }
    wait_until("every video done", DEADLINE * 3, || done(&env) == n);
    let paused = d.log().matches("NEW DOWNLOADS PAUSED").count();
    drop(d);
    let bad = violations(&env, &api, n);
    println!(
        "FAULTS s3_garage_restarts: videos={n} garage_kills={kills} pauses={paused} violations={} elapsed={:.1}s seed={seed}",
        bad.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(bad.is_empty(), "violations:\n{}", bad.join("\n"));
    assert!(kills > 0, "Garage was never killed");
    assert!(paused > 0, "no outage was long enough to pause downloads");
}

/// Connections to the store reset mid-upload (a RST once part of the body has gone): each
/// upload is tried again and the object is whole; nothing fails.
#[test]
fn connections_reset_during_uploads_fail_nothing() {
    let seed = seed(0x5eed_5303);
    let mut rng = fastrand::Rng::with_seed(seed);
    let n = scale(60, 300);
    let (api, env) = setup(4);
    let vs = videos(&api, &mut rng, "r", n);
    let ids: Vec<&str> = vs.iter().map(|v| v.id.as_str()).collect();
    let proxy = &env.garage.as_ref().unwrap().proxy;
    let started = Instant::now();
    let _d = env.start();
    // One reset at a time, of the connection that next sends 10-200 KB (an upload's body:
    // listings and HEADs are far smaller); the next is armed once it has happened and another
    // video is done, up to a bounded number.
    let max_resets = scale(20, 100);
    let (mut planned, mut done_at_reset) = (0, 0);
    env.insert(&ids);
    while done(&env) < n && Instant::now() < started + DEADLINE * 3 {
        let now_done = done(&env);
        if proxy.resets_done() >= planned && planned < max_resets && now_done > done_at_reset {
            proxy.reset_next(1, rng.u64(10_000..200_000));
            planned += 1;
            done_at_reset = now_done;
        }
        std::thread::sleep(Duration::from_millis(rng.u64(5..50)));
    }
    proxy.reset_next(0, 0);
    wait_until("every video done", DEADLINE * 3, || done(&env) == n);
    let bad = violations(&env, &api, n);
    let resets = proxy.resets_done();
    println!(
        "FAULTS s3_connection_resets: videos={n} resets={resets} connections={} violations={} elapsed={:.1}s seed={seed}",
        proxy.accepted(),
        bad.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(bad.is_empty(), "violations:\n{}", bad.join("\n"));
    assert!(resets > 0, "no connection was reset");
}

//! The daemon as a systemd service and the operator's commands, against a real database while
//! a real daemon runs: sd_notify messages on a test socket, the watchdog, SIGHUP reloads,
//! status/list/show/retry/verify/fetch/check-config.

mod support;

use std::process::Stdio;

use std::time::{Duration, Instant};

use support::harness::{DEADLINE, Env, Settings, stderr, stdout};
use support::notify::NotifySocket;
use support::sqlite;
use support::standin::{StandIn, Step};

const TOKEN: &str = "oh-ops-canary-5e0d";

fn setup() -> (StandIn, Env) {
    let api = StandIn::start(TOKEN);
    let env = Env::new(Settings::new(&api.base_url()), TOKEN);
    (api, env)
}

/// Received messages with their arrival times, and a condvar notified on each.
#[test]
fn tells_systemd_ready_status_watchdog_and_stopping() {
    let (api, env) = setup();
    let sock = NotifySocket::bind(&env);
    let (k, v) = sock.env();
    let mut d = env.start_with_env("daemon.log", &[(k, &v), ("WATCHDOG_USEC", "200000")]);
    sock.wait("READY=1", |m| m.lines().any(|l| l == "READY=1"));
    api.add_video("video_notify", 1000);
    env.insert(&["video_notify"]);
    env.wait_state("video_notify", "done");
    sock.wait("a status line counting the done video", |m| {
        m.starts_with("STATUS=") && m.contains("0 downloading, 0 pending, 1 done, 0 failed")
    });
    // The watchdog is pinged while the loop runs, busy or idle.
    sock.wait_n("two watchdog pings", 2, |m| m == "WATCHDOG=1");
    d.signal(libc::SIGTERM);
    assert_eq!(d.wait_exit().code(), Some(0));
    sock.wait("STOPPING=1", |m| m.lines().any(|l| l == "STOPPING=1"));
}

#[test]
fn the_watchdog_stops_while_the_loop_is_stuck_and_resumes_after() {
    support::sqlite_only();
    let (_api, env) = setup();
    let sock = NotifySocket::bind(&env);
    let (k, v) = sock.env();
    let d = env.start_with_env("daemon.log", &[(k, &v), ("WATCHDOG_USEC", "200000")]);
    sock.wait("WATCHDOG=1", |m| m == "WATCHDOG=1");
    // A producer inserts a row due in a second, then holds the write lock. When the row falls
    // due the loop must claim it, and cannot: it is stuck until the lock goes.
    let lock = sqlite::hold_write_lock(
        &env,
        "INSERT INTO queue(video_id, next_attempt_at) VALUES ('video_stuck', \
         strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '+1 seconds'))",
        "",
    );
    // The daemon says it has waited on the lock for a busy timeout (5 s): its loop is stuck.
    d.wait_log("locked by another writer");
    let seen_stuck = Instant::now();
    let last_ping = sock
        .messages()
        .iter()
        .filter(|(_, m)| m == "WATCHDOG=1")
        .map(|(t, _)| *t)
        .max()
        .unwrap();
    assert!(
        seen_stuck - last_ping > Duration::from_secs(2),
        "pings went on while the loop was stuck (last {:?} ago)",
        seen_stuck - last_ping
    );
    lock.commit();
    let pings = sock
        .messages()
        .iter()
        .filter(|(_, m)| m == "WATCHDOG=1")
        .count();
    sock.wait_n("a ping after the lock went", pings + 1, |m| {
        m == "WATCHDOG=1"
    });
}

#[test]
fn sighup_reloads_config_and_token_without_dropping_downloads() {
    let (api, env) = setup();
    let v = api.add_video("video_inflight", 400_000);
    api.script("video_inflight", vec![Step::Hold(100_000), Step::Serve]);
    let d = env.start();
    env.insert(&["video_inflight"]);
    api.wait_for("held download", DEADLINE, |l| l.iter().any(|r| r.paused));

    // A second API with another token; the new config points there.
    let api2 = StandIn::start("oh-second-token");
    let w = api2.add_video("video_after_reload", 1000);
    let text = env.render().replace(&api.base_url(), &api2.base_url());
    std::fs::write(&env.config, text).unwrap();
    env.set_token("oh-second-token");
    d.signal(libc::SIGHUP);
    d.wait_log("configuration reloaded");
    // The download in flight finishes on the old client.
    api.release("video_inflight");
    let row = env.wait_state("video_inflight", "done");
    assert_eq!(row.sha256.as_deref(), Some(v.sha256.as_str()));
    // New work goes to the new API with the new token.
    env.insert(&["video_after_reload"]);
    let row = env.wait_state("video_after_reload", "done");
    assert_eq!(row.sha256.as_deref(), Some(w.sha256.as_str()));
    assert!(api2.requests().iter().all(|r| r.status != 401));

    // A bad config is refused and the running one stays.
    let good = std::fs::read_to_string(&env.config).unwrap();
    std::fs::write(&env.config, format!("{good}\n[api]\nbase_url = \"x\"\n")).unwrap();
    d.signal(libc::SIGHUP);
    d.wait_log("reload rejected");
    let x = api2.add_video("video_after_bad_reload", 1000);
    env.insert(&["video_after_bad_reload"]);
    let row = env.wait_state("video_after_bad_reload", "done");
    assert_eq!(row.sha256.as_deref(), Some(x.sha256.as_str()));

    // What cannot change live says so.
    let moved = good.replace(
        &support::queue_db::config(&env),
        "database = \"/elsewhere/queue.db\"\n",
    );
    std::fs::write(&env.config, moved).unwrap();
    d.signal(libc::SIGHUP);
    d.wait_log("cannot change while running");
    assert!(!d.log().contains(TOKEN) && !d.log().contains("oh-second-token"));
}

#[test]
fn operator_commands_work_while_the_daemon_runs() {
    // About the archive as a directory (its files, paths and disk).
    if support::local_only() {
        return;
    }
    let (api, env) = setup();
    api.add_video("video_ok", 100_000);
    api.add_video("video_gone", 1000);
    api.script("video_gone", vec![Step::NotFound]);
    api.set_status("video_gone", None);
    let d = env.start();
    env.insert(&["video_ok", "video_gone"]);
    env.wait_state("video_ok", "done");
    env.wait_state("video_gone", "failed");

    let out = env.cmd(&["status"]);
    let text = stdout(&out);
    assert!(
        text.contains("0 pending, 0 downloading, 1 done, 1 failed"),
        "{text}"
    );
    assert!(text.contains("daemon: running"), "{text}");
    assert!(text.contains("archive: 97.7 KiB in 1 files"), "{text}");
    assert!(text.contains("video_gone"), "{text}");
    let v: serde_json::Value =
        serde_json::from_slice(&env.cmd(&["status", "--json"]).stdout).unwrap();
    assert_eq!(
        (v["done"].as_u64(), v["daemon_running"].as_bool()),
        (Some(1), Some(true))
    );
    assert_eq!(v["archive_bytes"].as_u64(), Some(100_000));

    let out = env.cmd(&["list", "--state", "failed"]);
    let text = stdout(&out);
    assert!(
        text.contains("video_gone") && !text.contains("video_ok"),
        "{text}"
    );
    let rows: serde_json::Value =
        serde_json::from_slice(&env.cmd(&["list", "--json"]).stdout).unwrap();
    assert_eq!(rows.as_array().unwrap().len(), 2);

    let out = env.cmd(&["show", "video_gone"]);
    let text = stdout(&out);
    assert!(text.contains("never (failed"), "{text}");
    // The first JSON 404 is confirmed once more before the video fails.
    assert!(text.contains("attempt 1 retry (http 404"), "{text}");
    assert!(text.contains("attempt 2 failed (http 404"), "{text}");

    // retry: the failed video goes back, the daemon notices, and this time it is there.
    api.script("video_gone", vec![Step::Serve]);
    let out = env.cmd(&["retry", "video_gone"]);
    assert!(
        stdout(&out).contains("1 failed video(s) back to pending"),
        "{}",
        stdout(&out)
    );
    env.wait_state("video_gone", "done");
    let out = env.cmd(&["retry", "video_ok"]);
    assert_eq!(out.status.code(), Some(65));
    assert!(
        stderr(&out).contains("video_ok: not a failed video"),
        "{}",
        stderr(&out)
    );

    // verify: all good, then a changed file, a missing one and an orphan.
    let out = env.cmd(&["verify"]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert!(
        stdout(&out).contains("verified 2 file(s)"),
        "{}",
        stdout(&out)
    );
    let mut bytes = std::fs::read(env.final_path("video_ok")).unwrap();
    bytes[5000] ^= 1;
    std::fs::write(env.final_path("video_ok"), &bytes).unwrap();
    std::fs::remove_file(env.final_path("video_gone")).unwrap();
    std::fs::write(env.archive.join("stray.mp4"), b"?").unwrap();
    let out = env.cmd(&["verify", "--all"]);
    assert_eq!(out.status.code(), Some(1));
    let text = stdout(&out);
    assert!(text.contains("CHANGED video_ok"), "{text}");
    assert!(text.contains("MISSING video_gone"), "{text}");
    assert!(
        text.contains("ORPHAN") && text.contains("stray.mp4"),
        "{text}"
    );
    assert!(
        text.contains("0 ok, 1 missing, 1 changed, 1 orphan(s)"),
        "{text}"
    );
    let out = env.cmd(&["verify", "video_gone"]);
    assert_eq!(out.status.code(), Some(1));
    drop(d);
}

#[test]
fn fetch_downloads_one_video_in_the_foreground() {
    let (api, env) = setup();
    let v = api.add_video("video_fg", 300_000);
    api.script("video_fg", vec![Step::Redirect]);
    let out = env.cmd(&["fetch", "video_fg"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains(&v.sha256), "{}", stdout(&out));
    let row = env.row("video_fg").unwrap();
    assert_eq!(
        (row.state.as_str(), row.sha256.as_deref()),
        ("done", Some(v.sha256.as_str()))
    );
    let out = env.cmd(&["fetch", "video_fg"]);
    assert!(
        stdout(&out).contains("already archived"),
        "{}",
        stdout(&out)
    );
    // Not ready: the row is updated as the daemon would, and the command says so.
    api.add_video("video_later", 1000);
    api.script("video_later", vec![Step::NotReady]);
    let out = env.cmd(&["fetch", "video_later"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("video not ready"), "{}", stderr(&out));
    assert_eq!(env.row("video_later").unwrap().state, "pending");
    // A video the daemon is downloading is left to it.
    api.add_video("video_busy", 300_000);
    api.script("video_busy", vec![Step::Hold(1000), Step::Serve]);
    let _d = env.start();
    env.insert(&["video_busy"]);
    api.wait_for("held", DEADLINE, |l| l.iter().any(|r| r.paused));
    let out = env.cmd(&["fetch", "video_busy"]);
    assert_eq!(out.status.code(), Some(75), "{}", stderr(&out));
    api.release("video_busy");
    env.wait_state("video_busy", "done");
}

#[test]
fn check_config_completions_and_man_page() {
    let (_api, env) = setup();
    let out = env.cmd(&["check-config"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains("token: read from token file") && !text.contains(TOKEN),
        "{text}"
    );
    assert!(text.contains("initial_delay = \"50ms\""), "{text}");
    std::fs::write(&env.token_file, "").unwrap();
    let out = env.cmd(&["check-config"]);
    assert_eq!(out.status.code(), Some(78));
    let out = env.cmd(&["completions", "bash"]);
    assert!(out.status.success() && stdout(&out).contains("hingnetd"));
    let out = env.cmd(&["man"]);
    assert!(out.status.success() && stdout(&out).contains(".TH"));
    for sub in [
        "run",
        "enqueue",
        "status",
        "list",
        "show",
        "retry",
        "verify",
        "fetch",
        "check-config",
        "migrate",
    ] {
        let out = env.cmd(&[sub, "--help"]);
        assert!(
            stdout(&out).contains("Example"),
            "{sub} --help has no example"
        );
    }
}

#[test]
fn json_logs_carry_the_decision_fields() {
    let (api, env) = setup();
    let text = format!("{}\n[log]\nformat = \"json\"\n", env.render());
    std::fs::write(&env.config, text).unwrap();
    api.add_video("video_json", 1000);
    let d = env.start();
    env.insert(&["video_json"]);
    env.wait_state("video_json", "done");
    d.wait_log("archived");
    let line = d
        .log()
        .lines()
        .find(|l| l.contains("archived"))
        .map(str::to_owned)
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&line).expect("one JSON object per line");
    assert_eq!(v["video_id"], "video_json");
    assert_eq!(v["http_status"], 200);
    assert_eq!(v["attempt"], 1);
    assert_eq!(v["bytes"], 1000);
    assert!(v["elapsed_ms"].is_u64(), "{line}");
}

/// Starts `hingnetd fetch ID` in the background, its output in a log file of the env.
fn spawn_fetch(env: &Env, id: &str) -> std::process::Child {
    let log = std::fs::File::create(env.dir.path().join(format!("fetch-{id}.log"))).unwrap();
    env.command(&["fetch", id])
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap()
}

#[test]
fn a_killed_fetch_leaves_no_stuck_row_behind() {
    let api = StandIn::start(TOKEN);
    let mut settings = Settings::new(&api.base_url());
    // The orphan check runs on the poll interval.
    settings.poll_interval = "300ms";
    let env = Env::new(settings, TOKEN);
    let v = api.add_video("video_killed_fetch", 400_000);
    api.script("video_killed_fetch", vec![Step::Hold(100_000), Step::Serve]);
    let _d = env.start();
    let mut fetch = spawn_fetch(&env, "video_killed_fetch");
    api.wait_for("held", DEADLINE, |l| l.iter().any(|r| r.paused));
    assert_eq!(env.row("video_killed_fetch").unwrap().state, "downloading");
    fetch.kill().unwrap();
    fetch.wait().unwrap();
    // The daemon sees the row's downloader is gone, takes it over and finishes it.
    let row = env.wait_state("video_killed_fetch", "done");
    assert_eq!(row.sha256.as_deref(), Some(v.sha256.as_str()));
    assert!(
        env.logs().contains("downloader that stopped"),
        "{}",
        env.logs()
    );
}

#[test]
fn a_daemon_starting_during_a_fetch_leaves_the_video_to_it() {
    let (api, env) = setup();
    let v = api.add_video("video_fetching", 400_000);
    api.script("video_fetching", vec![Step::Hold(100_000), Step::Serve]);
    let mut fetch = spawn_fetch(&env, "video_fetching");
    api.wait_for("held", DEADLINE, |l| l.iter().any(|r| r.paused));
    // The daemon starts while the fetch holds the video: its start-up check leaves the row
    // alone (the fetch's claim is alive: it holds its claim lock). Its ready line comes after
    // that check began; a second video proves the loop has gone round since.
    let w = api.add_video("video_meanwhile", 1000);
    let _d = env.start();
    env.insert(&["video_meanwhile"]);
    env.wait_state("video_meanwhile", "done");
    assert_eq!(env.row("video_fetching").unwrap().state, "downloading");
    api.release("video_fetching");
    assert!(fetch.wait().unwrap().success(), "{}", env.logs());
    let row = env.wait_state("video_fetching", "done");
    assert_eq!(row.sha256.as_deref(), Some(v.sha256.as_str()));
    let content = api
        .requests()
        .iter()
        .filter(|r| r.is_content() && r.video_id().as_deref() == Some("video_fetching"))
        .count();
    assert_eq!(content, 1, "downloaded twice:\n{}", api.dump());
    let _ = w;
}

#[test]
fn a_reload_ends_the_token_pause_at_once() {
    let api = StandIn::start(TOKEN);
    let mut settings = Settings::new(&api.base_url());
    // Without the reload, the next probe would be an hour away.
    settings.initial_delay = "1h";
    settings.max_delay = "1h";
    let env = Env::new(settings, "oh-wrong-token");
    let v = api.add_video("video_after_fix", 1000);
    let d = env.start();
    env.insert(&["video_after_fix"]);
    d.wait_log("ALL DOWNLOADS PAUSED");
    env.set_token(TOKEN);
    d.signal(libc::SIGHUP);
    let row = env.wait_state("video_after_fix", "done");
    assert_eq!(row.sha256.as_deref(), Some(v.sha256.as_str()));
}

/// `download.rate_limit` holds in a real run, and a reload lifts it from a download in flight.
/// Only a lower bound on time is asserted (load cannot make a download faster), and the lifted
/// limit is shown by the row becoming done within the usual generous deadline, where the old
/// limit would have needed minutes.
#[test]
fn the_rate_limit_holds_and_a_reload_lifts_it_mid_download() {
    const KIB: u64 = 1 << 10;
    let api = StandIn::start(TOKEN);
    let mut settings = Settings::new(&api.base_url());
    settings.rate_limit = Some("256KiB/s");
    let mut env = Env::new(settings, TOKEN);
    let size: u64 = 1 << 20;
    let v = api.add_video("video_capped", size as usize);
    let d = env.start();
    d.wait_log("download rate limit: 256 KiB/s (shared by all downloads)");
    let t0 = Instant::now();
    env.insert(&["video_capped"]);
    let row = env.wait_state("video_capped", "done");
    let took = t0.elapsed();
    assert_eq!(row.sha256.as_deref(), Some(v.sha256.as_str()));
    // A full bucket (256 KiB) goes at once; every other byte waits for the rate.
    let floor = Duration::from_secs_f64((size - 256 * KIB) as f64 / (256 * KIB) as f64);
    assert!(
        took >= floor,
        "1 MiB at 256 KiB/s took {took:?}, less than {floor:?}"
    );

    // 16 MiB at 64 KiB/s would take over four minutes: the reload must reach it in flight.
    env.settings.rate_limit = Some("64KiB/s");
    env.write_config();
    d.signal(libc::SIGHUP);
    d.wait_log("download rate limit: 64 KiB/s");
    let w = api.add_video("video_lifted", 16 << 20);
    env.insert(&["video_lifted"]);
    let lifted = |r: &support::standin::Request| r.video_id().as_deref() == Some("video_lifted");
    api.wait_for("the body under way", DEADLINE, |l| {
        l.iter().any(|r| lifted(r) && r.body_sent > 0)
    });
    assert_eq!(env.row("video_lifted").unwrap().state, "downloading");
    env.settings.rate_limit = Some("0");
    env.write_config();
    d.signal(libc::SIGHUP);
    d.wait_log("download rate limit: unlimited");
    let row = env.wait_state("video_lifted", "done");
    assert_eq!(row.sha256.as_deref(), Some(w.sha256.as_str()));
    // Lifted in flight: one attempt, one request, no restart.
    assert_eq!(row.attempts, 1);
    let requests = api
        .requests()
        .into_iter()
        .filter(|r| r.is_content() && lifted(r))
        .count();
    assert_eq!(requests, 1, "{}", api.dump());
}

#[test]
fn check_config_refuses_a_bad_rate_limit_naming_key_value_and_form() {
    let (_api, mut env) = setup();
    let mut with_rate = |rate: &'static str| {
        env.settings.rate_limit = Some(rate);
        env.write_config();
        env.cmd(&["check-config"])
    };
    for bad in ["50MiB", "fast", "50Mbit/s"] {
        let out = with_rate(bad);
        assert_eq!(out.status.code(), Some(78), "{bad}: {}", stderr(&out));
        let e = stderr(&out);
        assert!(
            e.contains("download.rate_limit")
                && e.contains(&format!("{bad:?}"))
                && e.contains("\"50MiB/s\""),
            "{e}"
        );
        assert_eq!(e.trim().lines().count(), 1, "one line: {e}");
    }
    let out = with_rate("2MB/s");
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("rate_limit = \"2000000B/s\""),
        "{}",
        stdout(&out)
    );
}

/// A shutdown does not wait for the budget: at 1 KiB/s the read past the first 256 KiB would
/// wait minutes, and the daemon still parks the download and exits within the grace period's
/// reach (the test's deadline is the usual generous one).
#[test]
fn a_shutdown_is_not_held_up_by_a_rate_wait() {
    let api = StandIn::start(TOKEN);
    let mut settings = Settings::new(&api.base_url());
    settings.rate_limit = Some("1KiB/s");
    let env = Env::new(settings, TOKEN);
    api.add_video("video_waiting", 4 << 20);
    // 512 KiB reach the socket, twice the burst: past it, the reader waits on the bucket.
    api.script("video_waiting", vec![Step::Hold(512 << 10), Step::Serve]);
    let mut d = env.start();
    env.insert(&["video_waiting"]);
    api.wait_for("held download", DEADLINE, |l| l.iter().any(|r| r.paused));
    d.signal(libc::SIGTERM);
    let status = d.wait_exit();
    assert_eq!(status.code(), Some(0), "{}", d.log());
    assert_eq!(env.row("video_waiting").unwrap().state, "pending");
    assert!(d.log().contains("partial file kept"), "{}", d.log());
}

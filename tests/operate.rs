//! Running it for months, as an operator does: `/metrics` scraped during a run (and checked by
//! Prometheus' own `promtool`), `status` showing every pause and what to do about it, `remove`,
//! `verify --repair`, the unit's `ExecReload=` refusing a bad config, and the trust store checked
//! by `check-config`. Real daemon, real database, the HingNet stand-in on loopback.

mod support;

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::harness::{DEADLINE, Daemon, Env, Settings, stderr, stdout, wait_until};
use support::queue_db;
use support::standin::{StandIn, Step};

const TOKEN: &str = "oh-operate-canary-77b1";

fn setup() -> (StandIn, Env) {
    let api = StandIn::start(TOKEN);
    let env = Env::new(Settings::new(&api.base_url()), TOKEN);
    (api, env)
}

/// The config file with a `[metrics]` section: port 0, so that the daemon picks a free one and
/// logs it.
fn with_metrics(env: &Env, listen: &str) {
    let text = format!("{}[metrics]\nlisten = {listen:?}\n", env.render());
    std::fs::write(&env.config, text).unwrap();
}

/// The address the daemon's latest "serving metrics" log line names.
fn metrics_addr(d: &Daemon) -> String {
    d.wait_log("serving metrics");
    let log = d.log();
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("serving metrics"))
        .unwrap();
    let at = line.find("listen=").expect("listen= in the log line") + "listen=".len();
    line[at..].split_whitespace().next().unwrap().to_owned()
}

/// `GET path` over plain HTTP/1.1: the status code and the body.
fn http_get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(DEADLINE))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: */*\r\n\r\n"
    )?;
    let mut all = String::new();
    s.read_to_string(&mut all)?;
    let code = all
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = all.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_owned();
    Ok((code, body))
}

fn scrape(addr: &str) -> String {
    let (code, body) = http_get(addr, "/metrics").expect("scrape /metrics");
    assert_eq!(code, 200, "{body}");
    body
}

/// The value of one sample (`name{labels}` exactly as exposed), or None.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Scrapes until `pred` holds on the text (the scheduler publishes on its next turn).
fn scrape_until(addr: &str, what: &str, pred: impl Fn(&str) -> bool) -> String {
    let start = Instant::now();
    loop {
        let text = scrape(addr);
        if pred(&text) {
            return text;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "timed out waiting for {what}:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn promtool_check_metrics(text: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package; scripts/test installs it)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n{text}",
        stdout(&out),
        stderr(&out)
    );
}

#[test]
fn metrics_scraped_during_a_run_move_with_the_work_and_pass_promtool() {
    let (api, env) = setup();
    with_metrics(&env, "127.0.0.1:0");
    let v = api.add_video("video_metrics", 300_000);
    api.script("video_metrics", vec![Step::NotReady, Step::Redirect]);
    let d = env.start();
    let addr = metrics_addr(&d);
    let before = scrape(&addr);
    promtool_check_metrics(&before);
    assert_eq!(
        sample(&before, "hingnetd_downloads_total{result=\"done\"}"),
        Some(0.0)
    );
    assert_eq!(
        sample(&before, "hingnetd_queue_rows{state=\"done\"}"),
        Some(0.0)
    );
    assert_eq!(
        sample(&before, "hingnetd_paused{reason=\"token\"}"),
        Some(0.0)
    );

    env.insert(&["video_metrics"]);
    env.wait_state("video_metrics", "done");
    let after = scrape_until(&addr, "the done row", |t| {
        sample(t, "hingnetd_queue_rows{state=\"done\"}") == Some(1.0)
    });
    promtool_check_metrics(&after);
    let get = |s: &str| sample(&after, s).unwrap_or_else(|| panic!("no {s} in:\n{after}"));
    assert_eq!(get("hingnetd_downloads_total{result=\"done\"}"), 1.0);
    assert_eq!(get("hingnetd_attempts_total{outcome=\"not_ready\"}"), 1.0);
    assert_eq!(get("hingnetd_attempts_total{outcome=\"archived\"}"), 1.0);
    assert_eq!(
        get("hingnetd_http_responses_total{role=\"api\",class=\"4xx\"}"),
        1.0
    );
    assert!(get("hingnetd_http_responses_total{role=\"api\",class=\"3xx\"}") >= 1.0);
    assert!(get("hingnetd_http_responses_total{role=\"cdn\",class=\"2xx\"}") >= 1.0);
    assert_eq!(get("hingnetd_downloaded_bytes_total"), v.bytes.len() as f64);
    assert_eq!(get("hingnetd_download_size_bytes_count"), 1.0);
    assert_eq!(
        get("hingnetd_download_size_bytes_sum"),
        v.bytes.len() as f64
    );
    assert_eq!(get("hingnetd_download_duration_seconds_count"), 1.0);
    assert_eq!(get("hingnetd_queue_rows{state=\"pending\"}"), 0.0);
    assert!(get("hingnetd_archive_free_bytes") > 0.0);
    // Nothing in any series names a video, a URL or the token.
    for secret in ["video_metrics", "sig=", "://", TOKEN] {
        let named: Vec<&str> = after
            .lines()
            .filter(|l| !l.starts_with('#') && l.contains(secret))
            .collect();
        assert!(named.is_empty(), "{secret:?} in {named:?}");
    }
    // Anything but /metrics is not found.
    assert_eq!(http_get(&addr, "/").unwrap().0, 404);
}

#[test]
fn a_reload_starts_moves_and_stops_the_metrics_listener() {
    let (_api, env) = setup();
    let d = env.start();
    d.wait_log("hingnetd ready");
    assert!(!d.log().contains("serving metrics"));
    with_metrics(&env, "127.0.0.1:0");
    d.signal(libc::SIGHUP);
    let addr = metrics_addr(&d);
    scrape(&addr);
    // An address that cannot be bound (it is in use) is refused, and the old listener stays.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    with_metrics(&env, &taken.local_addr().unwrap().to_string());
    d.signal(libc::SIGHUP);
    d.wait_log("reload rejected");
    assert!(d.log().contains("metrics.listen"), "{}", d.log());
    scrape(&addr);
    // Moved: the new address serves, the old one stops.
    with_metrics(&env, "127.0.0.2:0");
    d.signal(libc::SIGHUP);
    d.wait_log("metrics listener moved");
    let moved = metrics_addr(&d);
    assert!(moved.starts_with("127.0.0.2:"), "{moved}");
    scrape(&moved);
    refused(&addr);
    // Empty: stopped.
    with_metrics(&env, "");
    d.signal(libc::SIGHUP);
    d.wait_log("metrics listener stopped");
    refused(&moved);
}

/// Waits until nothing listens at `addr` (a stopped listener's task ends just after the log
/// line that says so).
fn refused(addr: &str) {
    wait_until(&format!("{addr} to stop listening"), DEADLINE, || {
        std::net::TcpStream::connect(addr).is_err()
    });
}

/// `hingnetd status` once it shows the token pause, confirmed as the token's.
fn status_with_a_token_pause(env: &Env) -> String {
    let mut text = String::new();
    wait_until("status to show the token pause", DEADLINE, || {
        let out = env.cmd(&["status"]);
        assert!(out.status.success(), "{}", stderr(&out));
        text = stdout(&out);
        text.contains("PAUSED (token)") && text.contains("API rejected the token")
    });
    text
}

#[test]
fn a_head_request_gets_the_length_of_the_metrics_without_them() {
    let (_api, env) = setup();
    with_metrics(&env, "127.0.0.1:0");
    let d = env.start();
    let addr = metrics_addr(&d);
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    write!(s, "HEAD /metrics HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut all = String::new();
    s.read_to_string(&mut all).unwrap();
    let (head, body) = all.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(length > 1000, "{head}");
    assert_eq!(body, "");
}

#[test]
fn status_shows_a_token_pause_with_the_advice_for_where_the_daemon_runs() {
    let (api, env) = setup();
    with_metrics(&env, "127.0.0.1:0");
    api.add_video("video_p0", 20_000);
    api.add_video("video_p1", 20_000);
    env.set_token("oh-wrong-token");
    let d = env.start();
    let addr = metrics_addr(&d);
    env.insert(&["video_p0", "video_p1"]);
    // Confirmed as the token's: both videos refused.
    d.wait_log("API rejected the token for another video too");
    let text = status_with_a_token_pause(&env);
    // Not under systemd: the token file is re-read before each probe.
    assert!(text.contains("re-read before each probe"), "{text}");
    assert!(text.contains("HTTP 401"), "{text}");
    assert!(!text.contains("oh-wrong-token"), "{text}");
    let json: serde_json::Value =
        serde_json::from_str(&stdout(&env.cmd(&["status", "--json"]))).unwrap();
    let pauses = json["pauses"].as_array().unwrap();
    assert_eq!(pauses.len(), 1, "{json}");
    assert_eq!(pauses[0]["reason"], "token");
    assert!(
        pauses[0]["since"].as_str().unwrap().ends_with('Z'),
        "{json}"
    );
    scrape_until(&addr, "the token pause", |t| {
        sample(t, "hingnetd_paused{reason=\"token\"}") == Some(1.0)
    });

    // Fixed: the pause ends, in status and in the metrics.
    env.set_token(TOKEN);
    env.wait_state("video_p0", "done");
    env.wait_state("video_p1", "done");
    scrape_until(&addr, "the pause's end", |t| {
        sample(t, "hingnetd_paused{reason=\"token\"}") == Some(0.0)
    });
    let text = stdout(&env.cmd(&["status"]));
    assert!(!text.contains("PAUSED"), "{text}");
    drop(d);
}

#[test]
fn under_systemd_the_token_advice_is_a_restart() {
    let (api, env) = setup();
    api.add_video("video_c0", 20_000);
    api.add_video("video_c1", 20_000);
    let creds = env.dir.path().join("credentials");
    std::fs::create_dir(&creds).unwrap();
    std::fs::write(creds.join("hingnet-token"), "oh-wrong-credential\n").unwrap();
    let d = env.start_with_env(
        "daemon.log",
        &[("CREDENTIALS_DIRECTORY", creds.to_str().unwrap())],
    );
    env.insert(&["video_c0", "video_c1"]);
    d.wait_log("API rejected the token for another video too");
    assert!(
        d.log().contains("systemctl restart hingnetd"),
        "{}",
        d.log()
    );
    let text = status_with_a_token_pause(&env);
    assert!(text.contains("systemctl restart hingnetd"), "{text}");
    assert!(!text.contains("re-read before each probe"), "{text}");
}

/// Runs the unit's `ExecReload=` lines as systemd does: in order, each with `$MAINPID`, the
/// first failure failing the reload (and the rest not run). The packaged paths are mapped to
/// this test's binary and config.
fn systemctl_reload(env: &Env, d: &Daemon) -> Result<(), String> {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/packaging/hingnetd.service"
    ))
    .unwrap();
    let lines: Vec<&str> = unit
        .lines()
        .filter_map(|l| l.strip_prefix("ExecReload="))
        .collect();
    assert!(lines.len() >= 2, "a check, then the signal: {lines:?}");
    for line in lines {
        let args: Vec<String> = line
            .split_whitespace()
            .map(|w| match w {
                "/usr/bin/hingnetd" => support::harness::BIN.to_owned(),
                "/etc/hingnetd/hingnetd.toml" => env.config.to_str().unwrap().to_owned(),
                "$MAINPID" => d.child.id().to_string(),
                w => w.to_owned(),
            })
            .collect();
        // systemd runs ExecReload= with the unit's environment, ExecStart='s: the daemon's
        // (with a bucket archive, its access key).
        let mut c = Command::new(&args[0]);
        c.args(&args[1..]);
        if let Some(g) = &env.garage {
            c.env("AWS_ACCESS_KEY_ID", &g.key_id)
                .env("AWS_SECRET_ACCESS_KEY", &g.secret);
        }
        let out = c.output().unwrap();
        if !out.status.success() {
            return Err(format!("{line}: {}{}", stdout(&out), stderr(&out)));
        }
    }
    Ok(())
}

#[test]
fn a_reload_with_a_bad_config_fails_the_reload_command_and_signals_nothing() {
    let (_api, env) = setup();
    let d = env.start();
    d.wait_log("hingnetd ready");
    let good = env.render();
    std::fs::write(
        &env.config,
        good.replace("concurrency = 2", "concurrency = \"four\""),
    )
    .unwrap();
    let err = systemctl_reload(&env, &d).unwrap_err();
    assert!(err.contains("check-config"), "{err}");
    assert!(err.contains("download.concurrency"), "{err}");
    assert!(err.contains("hingnetd.toml:"), "names the line: {err}");
    // The daemon heard nothing: no SIGHUP, no reload attempt.
    assert!(!d.log().contains("SIGHUP"), "{}", d.log());
    // A good config: checked quietly, then signalled, and taken.
    std::fs::write(
        &env.config,
        good.replace("concurrency = 2", "concurrency = 3"),
    )
    .unwrap();
    systemctl_reload(&env, &d).unwrap();
    d.wait_log("configuration reloaded");
    assert!(d.log().contains("concurrency=3"), "{}", d.log());
}

#[test]
fn check_config_fails_without_a_trust_store_as_the_service_would() {
    let (_api, env) = setup();
    let empty = env.dir.path().join("empty.pem");
    std::fs::write(&empty, "").unwrap();
    let no_dir = env.dir.path().join("no-certs");
    std::fs::create_dir(&no_dir).unwrap();
    let out = env
        .command(&["check-config"])
        .env("SSL_CERT_FILE", &empty)
        .env("SSL_CERT_DIR", &no_dir)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("No CA certificates"),
        "{}",
        stderr(&out)
    );
    assert!(!stdout(&out).contains("valid"), "{}", stdout(&out));
    // With the system's store: valid.
    let out = env.cmd(&["check-config"]);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn remove_takes_rows_out_keeping_files_unless_asked_and_spares_downloads_in_flight() {
    // About the archive as a directory (its files, paths and disk).
    if support::local_only() {
        return;
    }
    let (api, env) = setup();
    let kept = api.add_video("video_rm_kept", 20_000);
    let gone = api.add_video("video_rm_gone", 20_000);
    api.add_video("video_rm_busy", 200_000);
    api.script("video_rm_busy", vec![Step::Hold(1000)]);
    let d = env.start();
    env.insert(&["video_rm_kept", "video_rm_gone", "video_rm_busy"]);
    support::audit::assert_archived(&env, &kept);
    support::audit::assert_archived(&env, &gone);
    env.wait_state("video_rm_busy", "downloading");

    // Being downloaded: refused, and the row stays.
    let out = env.cmd(&["remove", "video_rm_busy"]);
    assert_eq!(out.status.code(), Some(65), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("being downloaded"),
        "{}",
        stderr(&out)
    );
    assert_eq!(env.row("video_rm_busy").unwrap().state, "downloading");

    // Done: the row goes, the file and its sidecar stay.
    let out = env.cmd(&["remove", "video_rm_kept"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("its file stays at"),
        "{}",
        stdout(&out)
    );
    assert!(env.row("video_rm_kept").is_none());
    assert_eq!(
        support::store::file_sha256(&env.final_path("video_rm_kept")),
        kept.sha256
    );
    assert!(env.sidecar_path("video_rm_kept").exists());
    // --delete-file: the file and its sidecar go too.
    let out = env.cmd(&["remove", "--delete-file", "video_rm_gone"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(env.row("video_rm_gone").is_none());
    assert!(!env.final_path("video_rm_gone").exists());
    assert!(!env.sidecar_path("video_rm_gone").exists());
    // Unknown IDs are named; the others in the same command are still removed.
    let out = env.cmd(&["remove", "video_rm_nope", "--force", "video_rm_busy"]);
    assert_eq!(out.status.code(), Some(65), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("video_rm_nope: not in the queue"),
        "{}",
        stderr(&out)
    );
    assert!(env.row("video_rm_busy").is_none());
    // The attempt log went with the rows.
    let n = queue_db::query_i64(
        &env,
        "SELECT count(*) FROM attempt_log WHERE video_id LIKE 'video_rm_%'",
    );
    assert_eq!(n, 0);
    api.release("video_rm_busy");
    drop(d);
}

#[test]
fn verify_repair_downloads_missing_and_changed_files_again_keeping_the_changed_one() {
    // About the archive as a directory (its files, paths and disk).
    if support::local_only() {
        return;
    }
    let (api, env) = setup();
    let lost = api.add_video("video_fix_lost", 30_000);
    let hurt = api.add_video("video_fix_hurt", 30_000);
    let fine = api.add_video("video_fix_fine", 30_000);
    let _d = env.start();
    env.insert(&["video_fix_lost", "video_fix_hurt", "video_fix_fine"]);
    for v in [&lost, &hurt, &fine] {
        support::audit::assert_archived(&env, v);
    }
    std::fs::remove_file(env.final_path("video_fix_lost")).unwrap();
    let mut bytes = std::fs::read(env.final_path("video_fix_hurt")).unwrap();
    bytes[20_000] ^= 0xff;
    std::fs::write(env.final_path("video_fix_hurt"), &bytes).unwrap();
    let requests_before = api.requests().len();

    // Without --repair: found, nothing changed.
    let out = env.cmd(&["verify", "--all"]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert_eq!(env.row("video_fix_lost").unwrap().state, "done");

    let out = env.cmd(&["verify", "--all", "--repair"]);
    let text = stdout(&out);
    assert!(out.status.success(), "{text}{}", stderr(&out));
    assert!(text.contains("REPAIRED video_fix_lost"), "{text}");
    assert!(text.contains("REPAIRED video_fix_hurt"), "{text}");
    assert!(text.contains("repaired 2 video(s)"), "{text}");
    // Both are downloaded again; the untouched one is not.
    support::audit::assert_archived(&env, &lost);
    support::audit::assert_archived(&env, &hurt);
    let again: Vec<String> = api.requests()[requests_before..]
        .iter()
        .map(|r| r.to_string())
        .collect();
    assert!(
        !again.iter().any(|r| r.contains("video_fix_fine")),
        "{again:?}"
    );
    // The changed file was renamed aside, not deleted.
    let aside: Vec<String> = env
        .archive_files()
        .into_iter()
        .filter(|f| f.starts_with(".video_fix_hurt.mp4.replaced-"))
        .collect();
    assert_eq!(aside.len(), 1, "{:?}", env.archive_files());
    assert_eq!(std::fs::read(env.archive.join(&aside[0])).unwrap(), bytes);
    let out = env.cmd(&["verify", "--all"]);
    assert!(out.status.success(), "{}", stdout(&out));
}

#[test]
fn fetch_run_as_root_writes_files_the_daemon_can_read_as_their_owner() {
    // About the archive as a directory (its files, paths and disk).
    if support::local_only() {
        return;
    }
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    // SAFETY: geteuid(2) has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "this test runs as root, as CI does (it proves what `sudo hingnetd fetch` leaves)"
    );
    let (api, env) = setup();
    let v = api.add_video("video_as_root", 40_000);
    env.insert(&["video_as_root"]);
    // The packaged layout: the state directory and the archive belong to the daemon's user
    // (nobody here), the token file stays root's.
    const DAEMON: u32 = 65534;
    std::fs::set_permissions(env.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::create_dir_all(&env.archive).unwrap();
    // (A PostgreSQL queue keeps nothing here.)
    for dir in [env.db.parent().unwrap(), &env.archive]
        .into_iter()
        .filter(|d| d.exists())
    {
        for entry in std::fs::read_dir(dir).unwrap() {
            std::os::unix::fs::chown(entry.unwrap().path(), Some(DAEMON), Some(DAEMON)).unwrap();
        }
        std::os::unix::fs::chown(dir, Some(DAEMON), Some(DAEMON)).unwrap();
    }
    let out = env.cmd(&["fetch", "video_as_root"]);
    assert!(out.status.success(), "{}", stderr(&out));
    support::audit::assert_archived(&env, &v);
    for p in [
        env.final_path("video_as_root"),
        env.sidecar_path("video_as_root"),
    ] {
        let m = std::fs::metadata(&p).unwrap();
        assert_eq!((m.uid(), m.gid()), (DAEMON, DAEMON), "{}", p.display());
        assert_eq!(m.mode() & 0o007, 0, "{} is {:o}", p.display(), m.mode());
    }
}

#[test]
fn list_prints_a_header_on_a_terminal_only() {
    let (_api, env) = setup();
    env.insert(&["video_listed"]);
    let piped = stdout(&env.cmd(&["list"]));
    assert!(piped.starts_with("video_listed"), "{piped}");
    // script(1) gives the command a terminal.
    let cmd = format!(
        "{} --config {} list",
        support::harness::BIN,
        env.config.display()
    );
    let out = Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    let text = stdout(&out);
    assert!(out.status.success(), "{text}");
    let first = text.lines().next().unwrap_or("");
    assert!(first.starts_with("VIDEO ID"), "{text}");
    assert!(text.contains("video_listed"), "{text}");
}

#[test]
fn fetch_of_a_done_video_whose_file_is_gone_says_so_and_how_to_repair_it() {
    // About the archive as a directory (its files, paths and disk).
    if support::local_only() {
        return;
    }
    let (api, env) = setup();
    let v = api.add_video("video_fetch_gone", 20_000);
    env.insert(&["video_fetch_gone"]);
    let out = env.cmd(&["fetch", "video_fetch_gone"]);
    assert!(out.status.success(), "{}", stderr(&out));
    support::audit::assert_archived(&env, &v);
    let out = env.cmd(&["fetch", "video_fetch_gone"]);
    assert!(
        stdout(&out).contains("already archived"),
        "{}",
        stdout(&out)
    );
    // Changed in place, same size: not "archived" either.
    let mut bytes = std::fs::read(env.final_path("video_fetch_gone")).unwrap();
    bytes[10_000] ^= 0xff;
    std::fs::write(env.final_path("video_fetch_gone"), &bytes).unwrap();
    let out = env.cmd(&["fetch", "video_fetch_gone"]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(stderr(&out).contains("sha256"), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("verify --repair video_fetch_gone"),
        "{}",
        stderr(&out)
    );
    std::fs::remove_file(env.final_path("video_fetch_gone")).unwrap();
    let out = env.cmd(&["fetch", "video_fetch_gone"]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(
        !stdout(&out).contains("already archived"),
        "{}",
        stdout(&out)
    );
    assert!(
        stderr(&out).contains("verify --repair video_fetch_gone"),
        "{}",
        stderr(&out)
    );
    // And the repair it names works.
    let out = env.cmd(&["verify", "--repair", "video_fetch_gone"]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    let out = env.cmd(&["fetch", "video_fetch_gone"]);
    assert!(out.status.success(), "{}", stderr(&out));
    support::audit::assert_archived(&env, &v);
}

#[test]
fn remove_delete_file_without_a_usable_archive_removes_nothing() {
    // About the archive as a directory (its files, paths and disk).
    if support::local_only() {
        return;
    }
    let (api, env) = setup();
    let v = api.add_video("video_rm_noarchive", 20_000);
    env.insert(&["video_rm_noarchive"]);
    let out = env.cmd(&["fetch", "video_rm_noarchive"]);
    assert!(out.status.success(), "{}", stderr(&out));
    support::audit::assert_archived(&env, &v);
    // The archive directory is replaced by a file: nothing can be deleted in it.
    let moved = env.dir.path().join("videos.moved");
    std::fs::rename(&env.archive, &moved).unwrap();
    std::fs::write(&env.archive, "not a directory").unwrap();
    let out = env.cmd(&["remove", "--delete-file", "video_rm_noarchive"]);
    assert_eq!(
        out.status.code(),
        Some(78),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    assert!(stderr(&out).contains("nothing removed"), "{}", stderr(&out));
    assert_eq!(env.row("video_rm_noarchive").unwrap().state, "done");
    assert!(moved.join("video_rm_noarchive.mp4").exists());
}

#[test]
fn fetch_as_root_with_a_relative_archive_dir_not_made_yet_makes_it() {
    // About the archive as a directory (its files, paths and disk).
    if support::local_only() {
        return;
    }
    let (api, env) = setup();
    let v = api.add_video("video_relative", 20_000);
    env.insert(&["video_relative"]);
    let text = env.render().replace(
        &format!("dir = {:?}", env.archive),
        "dir = \"relative-videos\"",
    );
    std::fs::write(&env.config, text).unwrap();
    let out = env
        .command(&["fetch", "video_relative"])
        .current_dir(env.dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let file = env.dir.path().join("relative-videos/video_relative.mp4");
    assert_eq!(support::local::file_sha256(&file), v.sha256);
}

/// `fetch` leaves the daemon's lock file to the daemon: one created by whoever ran `fetch` first
/// would belong to them, and a daemon running as another user could then not open it and would
/// refuse to start.
#[test]
fn fetch_does_not_create_the_daemons_lock_file() {
    let (api, env) = setup();
    let v = api.add_video("video_fetch_nolock", 20_000);
    let lock = std::path::PathBuf::from(format!("{}.lock", env.db.display()));
    let out = env.cmd(&["fetch", "video_fetch_nolock"]);
    assert!(out.status.success(), "{}", stderr(&out));
    support::audit::assert_archived(&env, &v);
    assert!(!lock.exists(), "fetch created {}", lock.display());
}

/// `remove --delete-file` knows the archive's file by its path, however the row spells it
/// (`dir//id.mp4` and `dir/./id.mp4` are the same file).
#[test]
fn remove_delete_file_takes_a_path_spelled_another_way() {
    // About the archive as a directory (its files, paths and disk).
    if support::local_only() {
        return;
    }
    let (api, env) = setup();
    let v = api.add_video("video_rm_spelled", 20_000);
    env.insert(&["video_rm_spelled"]);
    let out = env.cmd(&["fetch", "video_rm_spelled"]);
    assert!(out.status.success(), "{}", stderr(&out));
    support::audit::assert_archived(&env, &v);
    let spelled = format!("{}//./video_rm_spelled.mp4", env.archive.display());
    queue_db::sql(
        &env,
        &format!("UPDATE queue SET path = '{spelled}' WHERE video_id = 'video_rm_spelled'"),
    );
    let out = env.cmd(&["remove", "--delete-file", "video_rm_spelled"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!env.final_path("video_rm_spelled").exists());
}

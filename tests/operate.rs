//! Running it for months, as an operator does: `/metrics` scraped during a run (and checked by
//! Prometheus' own `promtool`), `status` showing every pause and what to do about it, `remove`,
//! `verify --repair`, the unit's `ExecReload=` refusing a bad config, and the trust store checked
//! by `check-config`. Real daemon, real database, the HingNet stand-in on loopback.

mod support;

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::harness::{DEADLINE, Daemon, Env, Settings, stderr, stdout};
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

    env.insert_sqlite3(&["video_metrics"]);
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
    // Empty: stopped.
    with_metrics(&env, "");
    d.signal(libc::SIGHUP);
    d.wait_log("metrics listener stopped");
    assert!(http_get(&addr, "/metrics").is_err(), "still listening");
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
    env.insert_sqlite3(&["video_p0", "video_p1"]);
    // Confirmed as the token's: both videos refused.
    d.wait_log("API rejected the token for another video too");
    let start = Instant::now();
    let text = loop {
        let out = env.cmd(&["status"]);
        assert!(out.status.success(), "{}", stderr(&out));
        let text = stdout(&out);
        if text.contains("PAUSED (token)") && text.contains("API rejected the token") {
            break text;
        }
        assert!(start.elapsed() < DEADLINE, "no token pause in:\n{text}");
        std::thread::sleep(Duration::from_millis(20));
    };
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
    env.insert_sqlite3(&["video_c0", "video_c1"]);
    d.wait_log("API rejected the token for another video too");
    assert!(
        d.log().contains("systemctl restart hingnetd"),
        "{}",
        d.log()
    );
    let start = Instant::now();
    loop {
        let text = stdout(&env.cmd(&["status"]));
        if text.contains("PAUSED (token)") && text.contains("API rejected the token") {
            assert!(text.contains("systemctl restart hingnetd"), "{text}");
            assert!(!text.contains("re-read before each probe"), "{text}");
            break;
        }
        assert!(start.elapsed() < DEADLINE, "no token pause in:\n{text}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

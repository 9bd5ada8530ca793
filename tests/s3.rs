//! What only the archive in a bucket has, against a real Garage: start-up problems each one
//! line with its own exit code, the key layout and the store's own checksum, a store that goes
//! away (or stops accepting the key) under a running daemon, unfinished multipart uploads
//! swept at start, `verify` on the bucket, and Garage's ignoring of `If-None-Match` pinned.
//! The stories every store shares run on the bucket too (`HINGNETD_TEST_STORE=s3`,
//! `scripts/test`'s third pass).

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use support::audit::{assert_archived, audit};
use support::garage::{BUCKET, KEY_ID, PREFIX, SECRET};
use support::harness::{DEADLINE, Env, Settings, error_line, stderr, stdout};
use support::standin::{StandIn, Step};

const TOKEN: &str = "tok_s3_0123456789abcdef";

/// A story's env whose archive is a bucket, whatever the stories run against.
fn s3_env(api: &StandIn) -> Env {
    support::s3_only();
    Env::new(Settings::new(&api.base_url()), TOKEN)
}

fn garage(env: &Env) -> &support::garage::Garage {
    env.garage.as_ref().unwrap()
}

/// A config beside the env's with `dir` for `archive.dir` and `s3` for the inline table.
fn config_for(env: &Env, dir: &str, endpoint: &str) -> PathBuf {
    let text = env.render().replace(
        &support::archive::config(env),
        &format!(
            "dir = {dir:?}\nstaging_dir = {:?}\ns3 = {{ endpoint = {endpoint:?}, region = \"garage\", path_style = true }}\n",
            env.staging()
        ),
    );
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = env.dir.path().join(format!("other-{n}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

/// Runs `hingnetd run` with `config` and these access-key variables, expecting it to stop
/// before READY: (code, stderr).
fn run_refused(env: &Env, config: &Path, keys: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut c = env.command_with(config, &["run"]);
    c.env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY");
    for (k, v) in keys {
        c.env(k, v);
    }
    let out = support::harness::bounded(c, Duration::from_secs(60));
    assert!(
        !stdout(&out).contains("READY") && !stderr(&out).contains("hingnetd ready"),
        "{}",
        stderr(&out)
    );
    (out.status.code(), stderr(&out))
}

#[test]
fn start_up_problems_are_one_line_each_with_its_own_exit_code() {
    let api = StandIn::start(TOKEN);
    let env = s3_env(&api);
    let g = garage(&env);
    g.add_key(
        "GKreadonly0123456789",
        "readonly-secret-0123456789",
        &["--read"],
    );
    let endpoint = g.endpoint();
    let ours = format!("s3://{BUCKET}/{PREFIX}");
    let nobody = format!(
        "http://127.0.0.1:{}",
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    );
    let right = [
        ("AWS_ACCESS_KEY_ID", KEY_ID),
        ("AWS_SECRET_ACCESS_KEY", SECRET),
    ];
    let secrets = [
        SECRET,
        "wrong-secret-0123456789",
        "readonly-secret-0123456789",
    ];
    // (what, archive.dir, endpoint, keys, exit code, what the line says)
    type Case<'a> = (
        &'a str,
        &'a str,
        &'a str,
        Vec<(&'a str, &'a str)>,
        i32,
        &'a str,
    );
    let cases: [Case; 7] = [
        (
            "a wrong secret",
            &ours,
            &endpoint,
            vec![
                ("AWS_ACCESS_KEY_ID", KEY_ID),
                ("AWS_SECRET_ACCESS_KEY", "wrong-secret-0123456789"),
            ],
            67,
            "refused the access key",
        ),
        (
            "an unknown key",
            &ours,
            &endpoint,
            vec![
                ("AWS_ACCESS_KEY_ID", "GKnobody0123456789"),
                ("AWS_SECRET_ACCESS_KEY", SECRET),
            ],
            67,
            "refused the access key",
        ),
        (
            "a missing bucket",
            "s3://nosuchbucket/x/",
            &endpoint,
            right.to_vec(),
            78,
            "no such bucket",
        ),
        (
            "a key that may only read",
            &ours,
            &endpoint,
            vec![
                ("AWS_ACCESS_KEY_ID", "GKreadonly0123456789"),
                ("AWS_SECRET_ACCESS_KEY", "readonly-secret-0123456789"),
            ],
            77,
            "permission denied",
        ),
        (
            "nothing listening",
            &ours,
            &nobody,
            right.to_vec(),
            69,
            "cannot reach the store",
        ),
        (
            "no access key",
            &ours,
            &endpoint,
            Vec::new(),
            78,
            "no S3 access key",
        ),
        (
            "plain http to another host",
            &ours,
            "http://s3.example.internal:3900",
            right.to_vec(),
            78,
            "plain http",
        ),
    ];
    let cases_n = cases.len();
    for (what, dir, endpoint, keys, code, says) in cases {
        let config = config_for(&env, dir, endpoint);
        let (got, err) = run_refused(&env, &config, &keys);
        let line = error_line(&err);
        assert_eq!(got, Some(code), "{what}: {err}");
        assert!(line.contains(says), "{what}: {line}");
        for s in secrets {
            assert!(!err.contains(s), "{what}: a secret in {err}");
        }
        assert!(!err.contains("X-Amz-Signature"), "{what}: {err}");
    }
    println!(
        "FAULTS s3_start_up_problems: cases={} violations=0 (wrong secret 67, unknown key 67, missing bucket 78, read-only key 77, nothing listening 69, no key 78, plain http 78)",
        cases_n
    );
    // check-config finds the access key too (without asking the bucket).
    let mut c = env.command(&["check-config"]);
    c.env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY");
    let out = c.output().unwrap();
    assert_eq!(out.status.code(), Some(78), "{}", stderr(&out));
    assert!(
        error_line(&stderr(&out)).contains("no S3 access key"),
        "{}",
        stderr(&out)
    );
    let out = env.cmd(&["check-config"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("S3 access key: read from environment"),
        "{}",
        stdout(&out)
    );
    assert!(!stdout(&out).contains(SECRET));
    // Nothing was archived, and the right key still works.
    let v = api.add_video("video_s3ok", 100_000);
    let _d = env.start();
    env.insert(&["video_s3ok"]);
    assert_archived(&env, &v);
}

/// The key is the content's: `<prefix><id>/<sha256>.mp4`, its sidecar beside it with the same
/// name, the row's path that key, nothing left in staging; and a second writer of the same
/// bytes (a stale daemon, a retry) writes the same key.
#[test]
fn objects_are_content_addressed_with_their_sidecar_and_nothing_staged_after() {
    let api = StandIn::start(TOKEN);
    let env = s3_env(&api);
    let v = api.add_video("video_key1", 250_000);
    let _d = env.start();
    env.insert(&["video_key1"]);
    assert_archived(&env, &v);
    let keys: Vec<String> = garage(&env)
        .list(PREFIX)
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(
        keys,
        [
            format!("{PREFIX}video_key1/{}.json", v.sha256),
            format!("{PREFIX}video_key1/{}.mp4", v.sha256)
        ]
    );
    let side = garage(&env)
        .get(&format!("{PREFIX}video_key1/{}.json", v.sha256))
        .unwrap();
    let meta: serde_json::Value = serde_json::from_slice(&side).unwrap();
    assert_eq!(meta["id"], "video_key1");
    let staged: Vec<_> = std::fs::read_dir(env.staging())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(staged.is_empty(), "{staged:?}");
    assert!(audit(&env, &api).is_empty());
}

/// The store dies while a download is in flight: the finished download stays staged (the row
/// goes back to wait, never failed), new downloads are not started while it is away, and once
/// it is back the staged file is uploaded without asking the API again.
#[test]
fn a_store_that_goes_away_keeps_the_download_staged_and_pauses_new_ones() {
    let api = StandIn::start(TOKEN);
    let mut env = s3_env(&api);
    let v1 = api.add_video("video_away1", 400_000);
    let v2 = api.add_video("video_away2", 100_000);
    api.script("video_away1", vec![Step::Hold(100_000)]);
    let d = env.start();
    env.insert(&["video_away1"]);
    api.wait_for("the body held", DEADLINE, |r| r.iter().any(|r| r.paused));
    env.garage.as_mut().unwrap().kill();
    api.release("video_away1");
    let row = env.wait_row("video_away1", "waiting for the store", |r| {
        r.state == "pending"
            && r.last_error
                .as_deref()
                .is_some_and(|e| e.contains("archive bucket"))
    });
    assert!(row.last_error.unwrap().contains("stays staged"));
    assert!(env.staging().join("video_away1.mp4").exists(), "not staged");
    d.wait_log("NEW DOWNLOADS PAUSED");
    let status = stdout(&env.cmd(&["status"]));
    assert!(status.contains("archive bucket"), "{status}");
    env.insert(&["video_away2"]);
    // The pause holds new downloads: video_away2 is not even claimed while the store is away
    // (without the pause the daemon, woken by the insert, would claim it at once and find the
    // store away itself). A negative, so watched over a window of several pause re-checks.
    let window = std::time::Instant::now() + Duration::from_secs(5);
    while std::time::Instant::now() < window {
        let r = env.row("video_away2").unwrap();
        assert_eq!((r.state.as_str(), r.attempts), ("pending", 0), "{r:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let restarted = std::time::Instant::now();
    env.garage.as_mut().unwrap().restart();
    assert_archived(&env, &v1);
    assert_archived(&env, &v2);
    let fetched = api
        .requests()
        .iter()
        .filter(|r| r.is_content() && r.video_id().as_deref() == Some("video_away1"))
        .count();
    assert_eq!(
        fetched,
        1,
        "the staged file was fetched again: {}",
        api.dump()
    );
    assert!(
        api.requests()
            .iter()
            .filter(|r| r.video_id().as_deref() == Some("video_away2"))
            .all(|r| r.at >= restarted),
        "{}",
        api.dump()
    );
    assert!(env.rows().iter().all(|r| r.state == "done"));
    assert!(audit(&env, &api).is_empty());
}

/// Found by review: the bucket's client had the API's read timeout, which runs from sending a
/// request until its answer, so an upload that took longer than `api.read_timeout` (2 s here)
/// to send timed out, was sent again and again, and never finished. An upload is now watched
/// for progress instead.
#[test]
fn an_upload_slower_than_the_read_timeout_finishes() {
    let api = StandIn::start(TOKEN);
    let env = s3_env(&api);
    // 3 MB at 600 KB/s: about 5 s to send, more than twice read_timeout.
    garage(&env).proxy.throttle(600_000);
    let v = api.add_video("video_slowup", 3_000_000);
    let d = env.start();
    env.insert(&["video_slowup"]);
    assert_archived(&env, &v);
    let log = d.log();
    assert!(
        !log.contains("trying again"),
        "the upload was retried:\n{log}"
    );
}

/// The store stops accepting the key mid-run (deleted, as when it is rotated): downloads pause
/// rather than fail, and once the operator puts a working key where the daemon reads it (here
/// the shared credentials file), they resume without a restart.
#[test]
fn a_key_the_store_stops_accepting_pauses_and_fails_nothing() {
    let api = StandIn::start(TOKEN);
    let env = s3_env(&api);
    let g = garage(&env);
    g.add_key(
        "GKrotating0000000001",
        "first-secret-0123456789",
        &["--read", "--write", "--owner"],
    );
    let file = env.dir.path().join("aws-credentials");
    let write_keys = |id: &str, secret: &str| {
        std::fs::write(
            &file,
            format!("[default]\naws_access_key_id = {id}\naws_secret_access_key = {secret}\n"),
        )
        .unwrap();
    };
    write_keys("GKrotating0000000001", "first-secret-0123456789");
    let file_var = file.display().to_string();
    let d = env.start_with_env(
        "daemon.log",
        &[
            ("AWS_ACCESS_KEY_ID", ""),
            ("AWS_SECRET_ACCESS_KEY", ""),
            ("AWS_SHARED_CREDENTIALS_FILE", &file_var),
        ],
    );
    let v = api.add_video("video_keyless", 150_000);
    g.delete_key("GKrotating0000000001");
    env.insert(&["video_keyless"]);
    env.wait_row("video_keyless", "waiting for the store", |r| {
        r.last_error
            .as_deref()
            .is_some_and(|e| e.contains("refused the access key"))
    });
    d.wait_log("NEW DOWNLOADS PAUSED");
    assert_ne!(env.row("video_keyless").unwrap().state, "failed");
    g.add_key(
        "GKrotating0000000002",
        "second-secret-0123456789",
        &["--read", "--write", "--owner"],
    );
    write_keys("GKrotating0000000002", "second-secret-0123456789");
    assert_archived(&env, &v);
    d.wait_log("read the S3 access key again");
    println!(
        "FAULTS s3_wrong_credentials: paused=yes failed_rows={} violations=0",
        env.rows().iter().filter(|r| r.state == "failed").count()
    );
    let log = d.log();
    for s in [
        "first-secret-0123456789",
        "second-secret-0123456789",
        "X-Amz-Signature",
    ] {
        assert!(!log.contains(s), "{s} in the log");
    }
}

/// The systemd credentials `s3-access-key-id` and `s3-secret-access-key` come first: a wrong
/// key in the environment beside them is not used.
#[test]
fn the_access_key_comes_from_systemd_credentials_first() {
    let api = StandIn::start(TOKEN);
    let env = s3_env(&api);
    let creds = env.dir.path().join("credentials");
    std::fs::create_dir(&creds).unwrap();
    std::fs::write(creds.join("s3-access-key-id"), format!("{KEY_ID}\n")).unwrap();
    std::fs::write(creds.join("s3-secret-access-key"), format!("{SECRET}\n")).unwrap();
    let dir = creds.display().to_string();
    let v = api.add_video("video_creds", 30_000);
    let d = env.start_with_env(
        "daemon.log",
        &[
            ("CREDENTIALS_DIRECTORY", &dir),
            ("AWS_ACCESS_KEY_ID", "GKwrong0123456789"),
            ("AWS_SECRET_ACCESS_KEY", "wrong-secret-0123456789"),
        ],
    );
    env.insert(&["video_creds"]);
    assert_archived(&env, &v);
    assert!(!d.log().contains(SECRET));
}

/// Multipart uploads left unfinished under the archive's keys are aborted at start (their
/// parts are billed and never visible); others' under other prefixes are left alone.
#[test]
fn unfinished_multipart_uploads_under_the_prefix_are_aborted_at_start() {
    let api = StandIn::start(TOKEN);
    let env = s3_env(&api);
    let g = garage(&env);
    let sha = "b".repeat(64);
    g.begin_upload(&format!("{PREFIX}video_old/{sha}.mp4"));
    g.begin_upload("elsewhere/big.bin");
    assert_eq!(g.unfinished_uploads("").len(), 2);
    let d = env.start();
    d.wait_log("aborted an unfinished multipart upload");
    assert_eq!(g.unfinished_uploads(PREFIX), Vec::<String>::new());
    assert_eq!(g.unfinished_uploads("elsewhere/"), ["elsewhere/big.bin"]);
}

/// `verify` on the bucket: a missing object, one whose bytes changed (its size, or the same
/// size with other bytes, which only the store's checksum or `--deep` tells), an orphan under
/// the prefix; `--repair` puts the damaged ones back and they are downloaded again.
#[test]
fn verify_finds_missing_changed_and_orphan_objects() {
    let api = StandIn::start(TOKEN);
    let env = s3_env(&api);
    let vs: Vec<_> = (0..3)
        .map(|i| api.add_video(&format!("video_ver{i}"), 50_000 + i * 1000))
        .collect();
    {
        let _d = env.start();
        env.insert(&["video_ver0", "video_ver1", "video_ver2"]);
        for v in &vs {
            assert_archived(&env, v);
        }
    }
    let out = env.cmd(&["verify"]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert!(
        stdout(&out).contains("3 ok, 0 missing, 0 changed, 0 orphan(s)"),
        "{}",
        stdout(&out)
    );
    let key = |v: &support::standin::Video| format!("{PREFIX}{}/{}.mp4", v.id, v.sha256);
    let g = garage(&env);
    // Missing: deleted behind the daemon's back.
    g.request("DELETE", &format!("/{BUCKET}/{}", key(&vs[0])), None);
    // Changed, same size: other bytes under the key, written by a tool that sends no checksum.
    let mut other = vs[1].bytes.to_vec();
    other[1000] ^= 0xff;
    g.put(&key(&vs[1]), &other);
    g.put(&format!("{PREFIX}stray.bin"), b"not ours");
    let out = env.cmd(&["verify"]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    // The overwritten object has no store SHA-256 any more: not known to be wrong without
    // reading it (counted as changed, marked unreadable).
    assert!(text.contains("1 ok, 1 missing, 1 changed"), "{text}");
    assert!(text.contains("1 orphan(s)"), "{text}");
    assert!(text.contains("stray.bin"), "{text}");
    let deep = env.cmd(&["verify", "--deep"]);
    let deep_text = stdout(&deep);
    assert!(deep_text.contains("1 changed"), "{deep_text}");
    assert!(deep_text.contains("video_ver1"), "{deep_text}");
    // --repair: both back to pending, downloaded again to their (same) keys.
    let out = env.cmd(&["verify", "--deep", "--repair"]);
    assert!(
        stdout(&out).contains("repaired 2 video(s)"),
        "{}",
        stdout(&out)
    );
    g.request("DELETE", &format!("/{BUCKET}/{PREFIX}stray.bin"), None);
    let _d = env.start();
    for v in &vs {
        assert_archived(&env, v);
    }
    let out = env.cmd(&["verify", "--deep"]);
    assert!(out.status.success(), "{}", stdout(&out));
}

/// `remove --delete-file` on a bucket deletes the video's objects (any host's: the bucket is
/// shared), and `remove` without it keeps them.
#[test]
fn remove_delete_file_deletes_the_objects_and_only_when_asked() {
    let api = StandIn::start(TOKEN);
    let env = s3_env(&api);
    let a = api.add_video("video_rm_a", 40_000);
    let b = api.add_video("video_rm_b", 40_000);
    {
        let _d = env.start();
        env.insert(&["video_rm_a", "video_rm_b"]);
        assert_archived(&env, &a);
        assert_archived(&env, &b);
    }
    let out = env.cmd(&["remove", "--delete-file", "video_rm_a"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = env.cmd(&["remove", "video_rm_b"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let keys: Vec<String> = garage(&env)
        .list(PREFIX)
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert!(keys.iter().all(|k| !k.contains("video_rm_a")), "{keys:?}");
    assert_eq!(
        keys.iter().filter(|k| k.contains("video_rm_b")).count(),
        2,
        "{keys:?}"
    );
    assert!(env.row("video_rm_a").is_none() && env.row("video_rm_b").is_none());
}

/// Pinned: Garage answers a PUT with `If-None-Match: *` over an existing key with 200 and
/// replaces the object. hingnetd's design must not (and does not) depend on conditional
/// writes; if a Garage upgrade starts honouring them, this says so.
#[test]
fn garage_ignores_if_none_match_on_put() {
    let api = StandIn::start(TOKEN);
    let env = s3_env(&api);
    let g = garage(&env);
    g.put("pin/x", b"first");
    let f = env.dir.path().join("second");
    std::fs::write(&f, b"second").unwrap();
    let out = std::process::Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-X",
            "PUT",
            "--aws-sigv4",
            "aws:amz:garage:s3",
        ])
        .arg("--user")
        .arg(format!("{KEY_ID}:{SECRET}"))
        .args([
            "-H",
            "x-amz-content-sha256: UNSIGNED-PAYLOAD",
            "-H",
            "If-None-Match: *",
        ])
        .arg("--data-binary")
        .arg(format!("@{}", f.display()))
        .arg(format!("{}/{BUCKET}/pin/x", g.endpoint()))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200");
    assert_eq!(g.get("pin/x").as_deref(), Some(&b"second"[..]));
}

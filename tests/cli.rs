//! The command line without a server: configuration errors refused before any work, with one
//! line naming what is wrong and a distinct exit code; `enqueue`, `status` and `migrate`.

mod support;

use support::harness::{BIN, Env, Settings, stderr, stdout};
use support::sqlite;

const CONFIG_EXIT: i32 = 78;
const TOKEN: &str = "oh-cli-canary-4b1d";

fn env() -> Env {
    Env::new(Settings::new("http://127.0.0.1:9"), TOKEN)
}

/// Runs `hingnetd run` with a config file text; returns (exit code, stderr).
fn run_with(env: &Env, config: &str) -> (Option<i32>, String) {
    std::fs::write(&env.config, config).unwrap();
    let out = env.cmd(&["run"]);
    let err = stderr(&out);
    assert!(
        !err.contains(TOKEN) && !stdout(&out).contains(TOKEN),
        "token printed: {err}"
    );
    (out.status.code(), err)
}

fn assert_config_error(env: &Env, config: &str, needle: &str) {
    let (code, err) = run_with(env, config);
    assert_eq!(code, Some(CONFIG_EXIT), "{config}\n{err}");
    assert!(err.contains(needle), "expected {needle:?} in: {err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
}

#[test]
fn bad_configs_are_refused_before_any_work() {
    // About the archive as a directory (its files, paths and disk).
    if support::local_only() {
        return;
    }
    let env = env();
    let good = env.render();
    assert_config_error(&env, &format!("{good}\n[extra]\nx = 1\n"), "extra");
    assert_config_error(
        &env,
        &good.replace("read_timeout", "raed_timeout"),
        "raed_timeout",
    );
    assert_config_error(&env, &good.replace("\"50ms\"", "\"soon\""), "soon");
    assert_config_error(
        &env,
        &good.replace("concurrency = 2", "concurrency = 0"),
        "download.concurrency",
    );
    assert_config_error(
        &env,
        &good.replace("http://127.0.0.1:9", "ftp://x"),
        "api.base_url",
    );
    assert_config_error(&env, "[api\n", "invalid config file");
    // The token: missing, empty.
    std::fs::remove_file(&env.token_file).unwrap();
    assert_config_error(&env, &good, "token file");
    env.set_token("");
    assert_config_error(&env, &good, "is empty");
    env.set_token(TOKEN);
    // A token file anyone could have written is refused; one others can read is warned about.
    use std::os::unix::fs::PermissionsExt;
    let mode = |m| std::fs::set_permissions(&env.token_file, std::fs::Permissions::from_mode(m));
    mode(0o666).unwrap();
    assert_config_error(&env, &good, "world-writable");
    mode(0o644).unwrap();
    let out = env.cmd(&["check-config"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("readable by group or others"),
        "{}",
        stderr(&out)
    );
    mode(0o600).unwrap();
    let out = env.cmd(&["check-config"]);
    assert!(
        !stderr(&out).contains("readable by group or others"),
        "{}",
        stderr(&out)
    );
    // An archive directory that cannot be created (a file is in the way; root ignores modes).
    let blocker = env.dir.path().join("blocker");
    std::fs::write(&blocker, "").unwrap();
    let bad_archive = good.replace(
        &format!("{:?}", env.archive),
        &format!("{:?}", blocker.join("videos")),
    );
    assert_config_error(&env, &bad_archive, "archive.dir");
    // None of that touched the queue.
    let out = env.cmd(&["status"]);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn a_missing_named_config_file_is_an_error() {
    let out = std::process::Command::new(BIN)
        .args(["--config", "/nonexistent/hingnetd.toml", "status"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(CONFIG_EXIT));
    assert!(stderr(&out).contains("/nonexistent/hingnetd.toml"));
}

#[test]
fn enqueue_and_status() {
    let env = env();
    let out = env.cmd(&["enqueue", "video_a", "video_b", "video_a"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("enqueued 2 new, 1 already queued"),
        "{}",
        stdout(&out)
    );
    // From stdin, with a bad ID: the good ones are kept, the bad one named, exit non-zero.
    let mut child = env
        .command(&["enqueue", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"video_c\n../evil\n\nvideo_a\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(65));
    assert!(
        stderr(&out).contains("invalid video id \"../evil\""),
        "{}",
        stderr(&out)
    );
    assert!(stdout(&out).contains("enqueued 1 new, 1 already queued"));
    let out = env.cmd(&["status"]);
    assert!(out.status.success());
    let text = stdout(&out);
    assert!(
        text.contains("3 pending, 0 downloading, 0 done, 0 failed"),
        "{text}"
    );
    assert!(text.contains("daemon: not running"), "{text}");
    let out = env.cmd(&["status", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["pending"], 3);
    assert_eq!(v["daemon_running"], false);
}

#[test]
fn migrate_is_repeatable_and_refuses_a_newer_schema() {
    support::sqlite_only();
    let env = env();
    let out = env.cmd(&["migrate"]);
    assert!(out.status.success());
    sqlite::set_user_version(&env, 999);
    let out = env.cmd(&["migrate"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("newer than this hingnetd knows"),
        "{}",
        stderr(&out)
    );
}

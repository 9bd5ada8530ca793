//! Logging to a real systemd-journald, read back with `journalctl --file`: the daemon whose
//! stderr `JOURNAL_STREAM` names sends its events natively (priority, fields, no timestamp),
//! and one whose stderr is something else logs there as before. journald runs in a private
//! mount and PID namespace (`unshare`), on tmpfs over /run/systemd and /run/log, so the host's
//! journal is never touched and journald dies with the namespace whatever happens to the test.

mod support;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::harness::{Daemon, Env, Settings};
use support::standin::StandIn;

/// Set for the test binary run inside the namespace: only there may it mount over /run.
const INSIDE: &str = "HINGNETD_TEST_INSIDE_JOURNAL_NAMESPACE";
const INNER_TEST: &str = "in_a_private_mount_namespace";
/// How long an entry may take to show up in the journal file.
const JOURNAL_WAIT: Duration = Duration::from_secs(30);
const TOKEN: &str = "oh-journal-canary-51c2";
const VIDEO: &str = "video_journal_refused";

#[test]
fn under_systemd_events_go_to_the_journal_with_their_fields() {
    let out = Command::new("unshare")
        .args(["--mount", "--pid", "--fork", "--mount-proc", "--kill-child"])
        .arg(std::env::current_exe().expect("the test binary's path"))
        .args(["--exact", INNER_TEST, "--ignored", "--nocapture"])
        .args(["--test-threads", "1"])
        .env(INSIDE, "1")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| {
            panic!("this test needs unshare(1) from util-linux, run as root: cannot run it: {e}")
        });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "the scenario in a private namespace failed ({}); unshare needs root (CAP_SYS_ADMIN):\n{text}",
        out.status
    );
    // A filter that matched nothing would pass too.
    assert!(
        text.contains("1 passed"),
        "the inner test did not run:\n{text}"
    );
}

#[test]
#[ignore = "run by under_systemd_events_go_to_the_journal_with_their_fields inside a private namespace"]
fn in_a_private_mount_namespace() {
    assert_eq!(
        std::env::var(INSIDE).as_deref(),
        Ok("1"),
        "only the namespace under_systemd_events_go_to_the_journal_with_their_fields makes may \
         mount over /run/systemd"
    );
    for dir in ["/run/systemd", "/run/log", "/var/log/journal"] {
        if dir != "/var/log/journal" || Path::new(dir).is_dir() {
            fs::create_dir_all(dir).unwrap();
            mount_tmpfs(dir);
        }
    }
    let api = StandIn::start(TOKEN);
    api.add_video(VIDEO, 10_000);
    // A token the API refuses: the daemon logs "ALL DOWNLOADS PAUSED" at ERROR, with the
    // video's ID and the 401.
    let env = Env::new(Settings::new(&api.base_url()), "oh-refused-token");
    let out = env.cmd(&["enqueue", VIDEO]);
    assert!(out.status.success(), "{out:?}");

    // stderr is the journal's stream, but there is no journal socket (yet): lines on stderr,
    // without a timestamp of their own.
    let log = env.dir.path().join("no-socket.log");
    let mut d = daemon(&env, &log, Stream::Names(&log));
    d.wait_log("ALL DOWNLOADS PAUSED");
    stop(&mut d);
    let text = d.log();
    assert!(
        text.contains("cannot log to the journal natively") && text.contains("hingnetd ready"),
        "{text}"
    );
    for line in text.lines() {
        let level = line.trim_start().split(' ').next().unwrap_or("");
        assert!(
            ["ERROR", "WARN", "INFO", "DEBUG", "TRACE"].contains(&level),
            "a line that does not start with its level (a timestamp?): {line:?}\n{text}"
        );
    }

    let _journald = Journald::start();
    let journal = journal_file();

    // Native: the entries are in the journal, and not on stderr.
    let log = env.dir.path().join("native.log");
    let mut d = daemon(&env, &log, Stream::Names(&log));
    let pid = format!("_PID={}", d.child.id());
    wait_entries(&journal, &[&pid, "-p", "err"], "ERROR entry", |e| {
        e.iter()
            .any(|e| text_of(e, "MESSAGE").contains("ALL DOWNLOADS PAUSED"))
    });
    stop(&mut d);
    let all = wait_entries(&journal, &[&pid], "entry for the stop", |e| {
        e.iter()
            .any(|e| text_of(e, "MESSAGE") == "hingnetd stopped")
    });
    let ready = all
        .iter()
        .find(|e| text_of(e, "MESSAGE").starts_with("hingnetd ready "))
        .unwrap_or_else(|| panic!("no ready entry: {all:#?}"));
    assert_eq!(text_of(ready, "PRIORITY"), "6", "{ready:#}");
    assert!(
        text_of(ready, "MESSAGE").contains(" concurrency=2"),
        "{ready:#}"
    );

    let errors = entries(&journal, &[&pid, "-p", "err"]);
    assert!(!errors.is_empty());
    for e in &errors {
        assert_eq!(text_of(e, "PRIORITY"), "3", "{e:#}");
        assert!(!text_of(e, "MESSAGE").starts_with("hingnetd "), "{e:#}");
    }

    let for_video = entries(&journal, &[&pid, &format!("VIDEO_ID={VIDEO}")]);
    let paused = for_video
        .iter()
        .find(|e| text_of(e, "MESSAGE").contains("ALL DOWNLOADS PAUSED"))
        .unwrap_or_else(|| panic!("VIDEO_ID= does not find the ERROR entry: {for_video:#?}"));
    for (field, want) in [
        ("PRIORITY", "3"),
        ("SYSLOG_IDENTIFIER", "hingnetd"),
        ("VIDEO_ID", VIDEO),
        ("HTTP_STATUS", "401"),
        ("TARGET", "hingnetd::daemon"),
        ("CODE_FILE", "src/daemon.rs"),
        ("_TRANSPORT", "journal"),
    ] {
        assert_eq!(text_of(paused, field), want, "{field}: {paused:#}");
    }
    let message = text_of(paused, "MESSAGE");
    // The text log's line without timestamp or level: it starts with the message itself.
    assert!(
        message.starts_with("API refused a download: ALL DOWNLOADS PAUSED")
            && message.contains(&format!("video_id={VIDEO}"))
            && message.contains("http_status=401"),
        "{message}"
    );
    assert!(
        !entries(&journal, &[&pid, "HTTP_STATUS=401"]).is_empty(),
        "HTTP_STATUS= finds nothing"
    );
    let verbose = journalctl(&journal, &[&pid, "-p", "err", "-o", "verbose"]);
    assert!(
        verbose.contains(&format!("    VIDEO_ID={VIDEO}\n")),
        "{verbose}"
    );

    let text = d.log();
    assert!(
        !text.contains("ALL DOWNLOADS PAUSED") && !text.contains("hingnetd ready"),
        "native mode wrote log lines to stderr too:\n{text}"
    );

    // Outside systemd: no JOURNAL_STREAM, or one naming another file. stderr as before, with
    // timestamps, and nothing in the journal.
    let other = env.config.clone();
    for (name, stream) in [
        ("plain.log", Stream::Unset),
        ("other.log", Stream::Names(&other)),
    ] {
        let log = env.dir.path().join(name);
        let mut d = daemon(&env, &log, stream);
        d.wait_log("ALL DOWNLOADS PAUSED");
        let pid = format!("_PID={}", d.child.id());
        stop(&mut d);
        let text = d.log();
        assert!(text.contains("hingnetd ready"), "{name}: {text}");
        for line in text.lines() {
            assert!(
                line.starts_with(|c: char| c.is_ascii_digit()),
                "{name}: a line without its timestamp: {line:?}\n{text}"
            );
        }
        let leaked = entries(&journal, &[&pid]);
        assert!(leaked.is_empty(), "{name}: in the journal: {leaked:#?}");
    }
}

fn mount_tmpfs(dir: &str) {
    let out = Command::new("mount")
        .args(["-t", "tmpfs", "none", dir])
        .output()
        .unwrap_or_else(|e| panic!("cannot run mount(8): {e}"));
    assert!(
        out.status.success(),
        "cannot mount a tmpfs on {dir} (this test needs root): {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// What `JOURNAL_STREAM` says.
enum Stream<'a> {
    Unset,
    /// The `<dev>:<ino>` of this file.
    Names(&'a Path),
}

/// `hingnetd run` with stdout and stderr to `log` (created first, so a stream can name it).
fn daemon(env: &Env, log: &Path, stream: Stream<'_>) -> Daemon {
    let file = fs::File::create(log).expect("log file");
    let mut cmd = env.command(&["run"]);
    cmd.env_remove("JOURNAL_STREAM");
    if let Stream::Names(path) = stream {
        let m = fs::metadata(path).unwrap();
        cmd.env("JOURNAL_STREAM", format!("{}:{}", m.dev(), m.ino()));
    }
    let child = cmd
        .stdin(Stdio::null())
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .expect("spawn hingnetd run");
    Daemon {
        child,
        log: log.to_path_buf(),
    }
}

fn stop(d: &mut Daemon) {
    d.signal(libc::SIGTERM);
    let status = d.wait_exit();
    assert!(status.success(), "{status}: {}", d.log());
}

/// journald, killed when dropped (and with the namespace, if the test dies first).
struct Journald(Child);

impl Journald {
    fn start() -> Journald {
        let bin = [
            "/usr/lib/systemd/systemd-journald",
            "/lib/systemd/systemd-journald",
        ]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("this test needs systemd-journald (the systemd package)");
        let child = Command::new(bin)
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {bin}: {e}"));
        let j = Journald(child);
        let socket = Path::new("/run/systemd/journal/socket");
        let start = Instant::now();
        while !socket.exists() {
            assert!(
                start.elapsed() < JOURNAL_WAIT,
                "{bin} made no {} in {JOURNAL_WAIT:?}",
                socket.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        j
    }
}

impl Drop for Journald {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `/run/log/journal/<machine-id>/system.journal`, once journald has made it.
fn journal_file() -> PathBuf {
    let start = Instant::now();
    loop {
        let found = fs::read_dir("/run/log/journal").ok().and_then(|rd| {
            rd.flatten()
                .map(|e| e.path().join("system.journal"))
                .find(|p| p.exists())
        });
        if let Some(f) = found {
            return f;
        }
        assert!(
            start.elapsed() < JOURNAL_WAIT,
            "journald wrote no /run/log/journal/*/system.journal"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn journalctl(file: &Path, args: &[&str]) -> String {
    let out = Command::new("journalctl")
        .arg("--file")
        .arg(file)
        .args(["--no-pager", "SYSLOG_IDENTIFIER=hingnetd"])
        .args(args)
        .output()
        .expect("this test needs journalctl");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// hingnetd's entries that match `args`, as `-o json` objects.
fn entries(file: &Path, args: &[&str]) -> Vec<Value> {
    let mut args = args.to_vec();
    args.extend(["-o", "json"]);
    journalctl(file, &args)
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).expect("journalctl -o json"))
        .collect()
}

fn wait_entries(
    file: &Path,
    args: &[&str],
    what: &str,
    done: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let start = Instant::now();
    loop {
        let e = entries(file, args);
        if done(&e) {
            return e;
        }
        assert!(
            start.elapsed() < JOURNAL_WAIT,
            "no {what} in the journal after {JOURNAL_WAIT:?}; entries matching {args:?}: {e:#?}\n\
             all of hingnetd's: {}",
            journalctl(file, &[])
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A field's value as text ("" when absent; journalctl gives binary values as byte arrays).
fn text_of<'a>(entry: &'a Value, field: &str) -> &'a str {
    entry[field].as_str().unwrap_or("")
}

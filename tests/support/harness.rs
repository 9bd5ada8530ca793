//! Running the real `hingnetd` binary in a scratch directory: config and token files, the
//! daemon process and its log, and waiting for rows to change. What the queue database and the
//! archive are is not known here: their config lines and `Env`'s row, insert and archive
//! methods come from the backends `mod.rs` picks (`queue_db`, `store`).
//!
//! Every wait here waits for an event (a row changing, a log line, a process exiting) with a
//! generous deadline; nothing sleeps a fixed time to "let things happen".

#![allow(dead_code)]

use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use super::{postgres, queue_db, store};

/// How long any single wait may take before the test fails: long, because a loaded CI machine
/// is slow, and a passing test never waits this long.
pub const DEADLINE: Duration = Duration::from_secs(60);
/// How often polled conditions (rows, log lines) are looked at.
const POLL: Duration = Duration::from_millis(10);

pub const BIN: &str = env!("CARGO_BIN_EXE_hingnetd");

/// Settings a test may change; `render` turns them into the config file.
#[derive(Clone, Debug)]
pub struct Settings {
    pub base_url: String,
    pub concurrency: usize,
    pub read_timeout: &'static str,
    pub initial_delay: &'static str,
    pub max_delay: &'static str,
    pub give_up_after: &'static str,
    pub shutdown_grace: &'static str,
    pub max_bytes: &'static str,
    /// `archive.min_free`: 0 here, so that a full disk on the test machine fails no test.
    pub min_free: &'static str,
    /// Kept at an hour so every test proves that new rows are noticed without polling.
    pub poll_interval: &'static str,
    /// `api.allow_plain_http`: a test that names a host other than loopback needs it.
    pub allow_plain_http: bool,
    /// `download.low_speed_limit` and `download.low_speed_time`; `None`: the daemon's defaults.
    pub low_speed: Option<(&'static str, &'static str)>,
    /// `archive.sidecar`.
    pub sidecar: bool,
    /// `download.rate_limit`; `None`: the daemon's default (unlimited).
    pub rate_limit: Option<&'static str>,
}

impl Settings {
    pub fn new(base_url: &str) -> Settings {
        Settings {
            base_url: base_url.to_owned(),
            concurrency: 2,
            read_timeout: "2s",
            initial_delay: "50ms",
            max_delay: "200ms",
            give_up_after: "1h",
            shutdown_grace: "200ms",
            max_bytes: "5GiB",
            min_free: "0",
            poll_interval: "1h",
            allow_plain_http: false,
            low_speed: None,
            sidecar: true,
            rate_limit: None,
        }
    }
}

pub struct Env {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    /// The queue database's file (`sqlite`'s).
    pub db: PathBuf,
    /// The archive directory (`local`'s).
    pub archive: PathBuf,
    pub token_file: PathBuf,
    pub settings: Settings,
    /// The queue's server when the queue is PostgreSQL (`postgres`'s), stopped with the env;
    /// `None`: the queue is the SQLite file `db`.
    pub pg: Option<postgres::Postgres>,
    /// The archive's store when it is a bucket (`bucket`'s), stopped with the env; `None`: the
    /// directory `archive`.
    pub garage: Option<super::garage::Garage>,
}

impl Env {
    /// A scratch directory with a config and token file, and a migrated queue database of
    /// the kind the stories run against (`super::stories_on_postgres`).
    pub fn new(settings: Settings, token: &str) -> Env {
        Env::with_queue(settings, token, super::stories_on_postgres())
    }

    fn with_queue(settings: Settings, token: &str, on_postgres: bool) -> Env {
        let dir = tempfile::tempdir().expect("tempdir");
        let env = Env {
            config: dir.path().join("hingnetd.toml"),
            db: dir.path().join("state").join("queue.db"),
            archive: dir.path().join("videos"),
            token_file: dir.path().join("token"),
            settings,
            pg: on_postgres.then(postgres::Postgres::for_queue),
            garage: super::stories_on_s3().then(super::garage::Garage::start),
            dir,
        };
        env.write_config();
        env.set_token(token);
        let out = env.cmd(&["migrate"]);
        assert!(out.status.success(), "migrate failed: {}", stderr(&out));
        if let Some(pg) = &env.pg {
            pg.grant_producer();
        }
        env
    }

    pub fn render(&self) -> String {
        let s = &self.settings;
        format!(
            "[api]\nbase_url = {:?}\ntoken_file = {:?}\nconnect_timeout = \"2s\"\nread_timeout = {:?}\n{}\
             [queue]\n{}poll_interval = {:?}\n\
             [archive]\n{}min_free = {:?}\n{}\
             [download]\nconcurrency = {}\nshutdown_grace = {:?}\nmax_bytes = {:?}\n{}{}\
             [retry]\ninitial_delay = {:?}\nmax_delay = {:?}\ngive_up_after = {:?}\n",
            s.base_url,
            self.token_file,
            s.read_timeout,
            // Written only when a test sets them, so that a file the defaults describe stays
            // as short as an operator's.
            if s.allow_plain_http {
                "allow_plain_http = true\n"
            } else {
                ""
            },
            // Where the queue and the archive are: the backends' lines.
            queue_db::config(self),
            s.poll_interval,
            super::archive::config(self),
            s.min_free,
            if s.sidecar { "" } else { "sidecar = false\n" },
            s.concurrency,
            s.shutdown_grace,
            s.max_bytes,
            s.low_speed.map_or(String::new(), |(limit, time)| format!(
                "low_speed_limit = {limit:?}\nlow_speed_time = {time:?}\n"
            )),
            s.rate_limit
                .map_or(String::new(), |r| format!("rate_limit = {r:?}\n")),
            s.initial_delay,
            s.max_delay,
            s.give_up_after,
        )
    }

    pub fn write_config(&self) {
        fs::write(&self.config, self.render()).expect("write config");
    }

    /// Writes the token file the way an operator should: mode 0600.
    pub fn set_token(&self, token: &str) {
        use std::os::unix::fs::PermissionsExt;
        fs::write(&self.token_file, format!("{token}\n")).expect("write token");
        fs::set_permissions(&self.token_file, fs::Permissions::from_mode(0o600)).expect("chmod");
    }

    /// A `hingnetd` command with this env's config and a clean environment (no proxies, no
    /// token variable, no credentials directory inherited from the developer's shell).
    pub fn command(&self, args: &[&str]) -> Command {
        self.command_with(&self.config, args)
    }

    /// Like `command`, with another config file (a second daemon's).
    pub fn command_with(&self, config: &std::path::Path, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.arg("--config").arg(config).args(args);
        for v in [
            "HINGNET_TOKEN",
            "CREDENTIALS_DIRECTORY",
            "HTTP_PROXY",
            "HTTPS_PROXY",
            "ALL_PROXY",
            "http_proxy",
            "https_proxy",
            "all_proxy",
            "HINGNETD_CONFIG",
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_SESSION_TOKEN",
            "AWS_PROFILE",
            "AWS_SHARED_CREDENTIALS_FILE",
        ] {
            c.env_remove(v);
        }
        if let Some(g) = &self.garage {
            c.env("AWS_ACCESS_KEY_ID", &g.key_id);
            c.env("AWS_SECRET_ACCESS_KEY", &g.secret);
        }
        // No ~/.aws/credentials of the developer's.
        c.env("HOME", self.dir.path());
        c.env("RUST_LOG", "info");
        c
    }

    pub fn cmd(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run hingnetd")
    }

    /// Like `cmd`, for a command that is expected to exit at once (a start-up error): one that
    /// runs on instead (a daemon that starts anyway) is killed after `limit`, and its output
    /// returned all the same, so that the test fails rather than hangs.
    pub fn cmd_bounded(&self, args: &[&str], limit: Duration) -> Output {
        bounded(self.command(args), limit)
    }

    pub fn start(&self) -> Daemon {
        self.start_with_log("daemon.log")
    }

    pub fn start_with_log(&self, name: &str) -> Daemon {
        self.start_with_env(name, &[])
    }

    pub fn start_with_env(&self, name: &str, vars: &[(&str, &str)]) -> Daemon {
        self.start_daemon(&self.config, name, vars)
    }

    /// A daemon with its own config file (one of a fleet), logging to `name` in the env.
    pub fn start_daemon(
        &self,
        config: &std::path::Path,
        name: &str,
        vars: &[(&str, &str)],
    ) -> Daemon {
        let log = self.dir.path().join(name);
        let file = fs::File::create(&log).expect("log file");
        let child = self
            .command_with(config, &["run"])
            .envs(vars.iter().copied())
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .expect("spawn hingnetd run");
        let d = Daemon { child, log };
        d.wait_log("hingnetd ready");
        d
    }

    /// Inserts IDs the way a producer does (`queue_db::insert`).
    pub fn insert(&self, ids: &[&str]) {
        queue_db::insert(self, ids);
    }

    /// The row of `id`, if there is one.
    pub fn row(&self, id: &str) -> Option<Row> {
        queue_db::row(self, id)
    }

    /// Every row, in insertion order.
    pub fn rows(&self) -> Vec<Row> {
        queue_db::rows(self)
    }

    /// Waits until the row satisfies `pred`; fails with the row and the log otherwise.
    pub fn wait_row(&self, id: &str, what: &str, pred: impl Fn(&Row) -> bool) -> Row {
        let start = Instant::now();
        loop {
            let row = self.row(id);
            if let Some(r) = &row
                && pred(r)
            {
                return r.clone();
            }
            if start.elapsed() > DEADLINE {
                panic!(
                    "timed out waiting for {id}: {what}; row: {row:?}\nlogs:\n{}",
                    self.logs()
                );
            }
            std::thread::sleep(POLL);
        }
    }

    pub fn wait_state(&self, id: &str, state: &str) -> Row {
        self.wait_row(id, &format!("state {state}"), |r| r.state == state)
    }

    /// Every log file the daemons of this env wrote.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        if let Ok(rd) = fs::read_dir(self.dir.path()) {
            for e in rd.flatten() {
                if e.path().extension().is_some_and(|x| x == "log") {
                    out.push_str(&format!("--- {}\n", e.path().display()));
                    out.push_str(&fs::read_to_string(e.path()).unwrap_or_default());
                }
            }
        }
        out
    }

    /// Where downloads are written: the archive directory, or a bucket's staging.
    pub fn local_dir(&self) -> PathBuf {
        if self.garage.is_some() {
            self.staging()
        } else {
            self.archive.clone()
        }
    }

    /// Where a bucket archive stages its downloads.
    pub fn staging(&self) -> PathBuf {
        self.dir.path().join("state").join("staging")
    }

    /// Names in the archive (including hidden partials), sorted.
    pub fn archive_files(&self) -> Vec<String> {
        super::archive::archive_files(self)
    }

    pub fn partial_path(&self, id: &str) -> PathBuf {
        super::archive::partial_path(self, id)
    }

    pub fn final_path(&self, id: &str) -> PathBuf {
        store::final_path(self, id)
    }

    /// Beside the video: what the API said about it.
    pub fn sidecar_path(&self, id: &str) -> PathBuf {
        store::sidecar_path(self, id)
    }
}

/// One queue row as an operator's tools see it, whatever the backend (`queue_db` reads it).
#[derive(Clone, Debug)]
pub struct Row {
    /// Shown lossily when it is a BLOB or not UTF-8 (a hostile producer's).
    pub id: String,
    pub state: String,
    pub attempts: i64,
    pub last_error: Option<String>,
    pub http_status: Option<i64>,
    pub path: Option<String>,
    pub sha256: Option<String>,
    pub bytes: Option<i64>,
    pub next_attempt_at: String,
    pub finished_at: Option<String>,
}

pub struct Daemon {
    pub child: Child,
    pub log: PathBuf,
}

impl Daemon {
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn wait_log(&self, needle: &str) {
        let start = Instant::now();
        while !self.log().contains(needle) {
            if start.elapsed() > DEADLINE {
                panic!(
                    "timed out waiting for log line {needle:?}; log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(POLL);
        }
    }

    pub fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) on our own child's pid.
        let r = unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
        assert_eq!(r, 0, "kill failed");
    }

    /// kill -9: no chance to clean up.
    pub fn kill9(&mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reap");
    }

    pub fn wait_exit(&mut self) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                return s;
            }
            if start.elapsed() > DEADLINE {
                panic!("daemon did not exit; log:\n{}", self.log());
            }
            std::thread::sleep(POLL);
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `cond` every 5 ms until it holds; panics with `what` after the deadline.
/// The last line of a command's stderr that is its error (after any log lines).
pub fn error_line(text: &str) -> &str {
    text.lines()
        .rev()
        .find(|l| l.contains("hingnetd: error:"))
        .unwrap_or_else(|| panic!("no error line in {text:?}"))
}

pub fn wait_until(what: &str, deadline: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Runs `c`, killing it after `limit` if it has not exited (see `Env::cmd_bounded`).
pub fn bounded(mut c: Command, limit: Duration) -> Output {
    let mut child = c
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run hingnetd");
    let start = Instant::now();
    while child.try_wait().expect("try_wait").is_none() && start.elapsed() < limit {
        std::thread::sleep(POLL);
    }
    let _ = child.kill();
    child.wait_with_output().expect("hingnetd's output")
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

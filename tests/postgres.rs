//! What only the PostgreSQL queue has: start-up problems each with one line and its own exit
//! code, TLS by `sslmode`, producers that may only insert, leases taken over and fenced, and a
//! database that goes away under a running daemon. The stories every backend shares run on
//! PostgreSQL too (`HINGNETD_TEST_QUEUE=postgres`, `scripts/test`'s second pass).

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use support::harness::{DEADLINE, Env, Settings, error_line, stderr, stdout};
use support::notify::NotifySocket;
use support::postgres::{Options, Postgres};
use support::queue_db;
use support::standin::{StandIn, Step};
use support::tls::make_certs;

const TOKEN: &str = "tok_pg_0123456789abcdef";

/// A story's env whose queue is PostgreSQL, whatever the stories run against.
fn pg_env(api: &StandIn) -> Env {
    support::postgres_only();
    Env::new(Settings::new(&api.base_url()), TOKEN)
}

/// A config for `database` (and `extra` `[queue]` lines) beside the env's, for a start-up
/// check; returns its path.
fn config_for(env: &Env, database: &str, extra: &str) -> PathBuf {
    let text = env.render().replace(
        &queue_db::config(env),
        &format!("database = {database:?}\n{extra}"),
    );
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = env.dir.path().join(format!("other-{n}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

/// Runs `hingnetd run` with `config`, expecting it to stop before READY: (code, stderr).
fn run_refused(env: &Env, config: &Path) -> (Option<i32>, String) {
    let out =
        support::harness::bounded(env.command_with(config, &["run"]), Duration::from_secs(60));
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
    let env = pg_env(&api);
    // A server of its own where TCP logins need a password.
    let pg = Postgres::start_with(Options {
        host_auth: Some("scram-sha-256"),
        ..Options::default()
    });
    pg.psql(
        "postgres",
        "CREATE ROLE hingnetd LOGIN PASSWORD 'right-pass-7Qx'; \
         CREATE ROLE weak LOGIN PASSWORD 'weak-pass-3Rt'",
    );
    pg.psql("postgres", "CREATE DATABASE hingnet OWNER hingnetd");
    let url = pg.url("hingnetd", "hingnet");
    let right = env.dir.path().join("db-password");
    std::fs::write(&right, "right-pass-7Qx\n").unwrap();
    let wrong = env.dir.path().join("wrong-password");
    std::fs::write(&wrong, "wrong-pass-9Zz\n").unwrap();
    for f in [&right, &wrong] {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let secrets = [
        "right-pass-7Qx",
        "wrong-pass-9Zz",
        "weak-pass-3Rt",
        "hunter2-in-url",
    ];
    let file = |p: &Path| format!("password_file = {p:?}\n");

    let with_password = url.replace("hingnetd@", "hingnetd:hunter2-in-url@");
    let nobody = format!(
        "postgres://hingnetd@127.0.0.1:{}/hingnet?connect_timeout=5",
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    );
    // (what, config, exit code, what the line says)
    let cases = [
        (
            "a password in the URL",
            config_for(&env, &with_password, ""),
            78,
            "password in the URL is refused",
        ),
        (
            "nothing listening",
            config_for(&env, &nobody, ""),
            69,
            "queue database unreachable",
        ),
        (
            "a wrong password",
            config_for(&env, &url, &file(&wrong)),
            67,
            "refused the login",
        ),
        (
            "no password at all",
            config_for(&env, &url, ""),
            67,
            "refused the login",
        ),
        (
            "a database that does not exist",
            config_for(&env, &pg.url("hingnetd", "nowhere"), &file(&right)),
            78,
            "does not exist",
        ),
    ];
    for (what, config, code, says) in &cases {
        let (got, err) = run_refused(&env, config);
        let line = error_line(&err);
        assert_eq!(got, Some(*code), "{what}: {err}");
        assert!(line.contains(says), "{what}: {line}");
        for s in secrets {
            assert!(!err.contains(s), "{what}: the password {s} in {err}");
        }
        assert_eq!(
            err.lines().filter(|l| l.contains("error")).count(),
            1,
            "{what}: one line: {err}"
        );
    }

    // The right password, from each of its three places, is accepted; the schema is made.
    let (ok, _) = (config_for(&env, &url, &file(&right)), ());
    let out = env.command_with(&ok, &["migrate"]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let bare = config_for(&env, &url, "");
    let out = env
        .command_with(&bare, &["migrate"])
        .env("PGPASSWORD", "right-pass-7Qx")
        .output()
        .unwrap();
    assert!(out.status.success(), "PGPASSWORD: {}", stderr(&out));
    let creds = env.dir.path().join("credentials");
    std::fs::create_dir(&creds).unwrap();
    std::fs::copy(&right, creds.join("hingnet-db-password")).unwrap();
    let out = env
        .command_with(&bare, &["status"])
        .env("CREDENTIALS_DIRECTORY", &creds)
        .output()
        .unwrap();
    assert!(out.status.success(), "credential: {}", stderr(&out));

    // A role that may read and insert but not update: refused before READY, naming what.
    pg.psql(
        "hingnet",
        "GRANT SELECT ON hingnetd_schema TO weak; \
         GRANT SELECT, INSERT ON queue, attempt_log, daemon_pauses TO weak",
    );
    let weak = config_for(
        &env,
        &pg.url("weak", "hingnet"),
        &format!("password_file = {:?}\n", {
            let p = env.dir.path().join("weak-password");
            std::fs::write(&p, "weak-pass-3Rt").unwrap();
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
            p
        }),
    );
    let (got, err) = run_refused(&env, &weak);
    let line = error_line(&err);
    assert_eq!(got, Some(77), "{err}");
    assert!(
        line.contains("UPDATE on queue") && line.contains("DELETE on queue"),
        "{line}"
    );
    for s in secrets {
        assert!(!err.contains(s), "{err}");
    }
}

#[test]
fn tls_verify_full_against_the_test_ca_and_a_wrong_ca_refused() {
    let api = StandIn::start(TOKEN);
    let env = pg_env(&api);
    let certs = tempfile::tempdir().unwrap();
    make_certs(certs.path());
    let other = tempfile::tempdir().unwrap();
    make_certs(other.path());
    let pg = Postgres::start_with(Options {
        host_auth: Some("trust"),
        settings: vec![
            "ssl=on".into(),
            // Relative to the data directory; `files` are copied beside it.
            "ssl_cert_file=../srv.pem".into(),
            "ssl_key_file=../srv.key".into(),
        ],
        files: vec![certs.path().join("srv.pem"), certs.path().join("srv.key")],
    });
    pg.psql("postgres", "CREATE ROLE hingnetd LOGIN");
    pg.psql("postgres", "CREATE DATABASE hingnet OWNER hingnetd");
    let url = |mode: &str, ca: &Path, host: &str| {
        format!(
            "postgres://hingnetd@{host}:{}/hingnet?sslmode={mode}&sslrootcert={}",
            pg.port(),
            ca.display()
        )
    };
    let good = config_for(
        &env,
        &url("verify-full", &certs.path().join("ca.pem"), "127.0.0.1"),
        "",
    );
    let out = env.command_with(&good, &["migrate"]).output().unwrap();
    assert!(out.status.success(), "verify-full: {}", stderr(&out));
    // The session really is encrypted: the server says so of the daemon's connections.
    let mut d = env.start_daemon(&good, "tls.log", &[]);
    let sessions = || {
        pg.psql(
            "postgres",
            "SELECT count(*) || ' ' || count(*) FILTER (WHERE s.ssl) FROM pg_stat_ssl s \
             JOIN pg_stat_activity a USING (pid) WHERE a.application_name = 'hingnetd'",
        )
    };
    // The daemon's two connections (statements, LISTEN), both encrypted.
    support::harness::wait_until("two TLS sessions", DEADLINE, || sessions() == "2 2");
    d.signal(libc::SIGTERM);
    assert!(d.wait_exit().success());

    // Another CA's certificate: refused, in one line, with the TLS exit code.
    let bad = config_for(
        &env,
        &url("verify-full", &other.path().join("ca.pem"), "127.0.0.1"),
        "",
    );
    let (code, err) = run_refused(&env, &bad);
    assert_eq!(code, Some(76), "{err}");
    assert!(error_line(&err).contains("TLS"), "{err}");
    // The certificate is for 127.0.0.1, not localhost: verify-full refuses the name, verify-ca
    // (the chain only) accepts it.
    let name = config_for(
        &env,
        &url("verify-full", &certs.path().join("ca.pem"), "localhost"),
        "",
    );
    let (code, err) = run_refused(&env, &name);
    assert_eq!(code, Some(76), "{err}");
    let chain = config_for(
        &env,
        &url("verify-ca", &certs.path().join("ca.pem"), "localhost"),
        "",
    );
    let out = env.command_with(&chain, &["status"]).output().unwrap();
    assert!(out.status.success(), "verify-ca: {}", stderr(&out));
}

#[test]
fn producers_may_only_insert_and_are_picked_up_at_once() {
    let api = StandIn::start(TOKEN);
    let env = pg_env(&api);
    let a = api.add_video("video_psql", 2000);
    let b = api.add_video("video_psycopg", 2000);
    let _d = env.start();
    // `psql` as the producer role (every story's producer on PostgreSQL does this).
    env.insert(&["video_psql", "video_psql"]);
    // Python with Debian's psycopg2, the same statement.
    let pg = env.pg.as_ref().unwrap();
    let out = std::process::Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(
            "import psycopg2, sys\n\
             c = psycopg2.connect(sys.argv[1])\n\
             with c:\n\
             \x20   with c.cursor() as cur:\n\
             \x20       cur.execute('INSERT INTO queue(video_id) VALUES (%s) ON CONFLICT DO NOTHING', (sys.argv[2],))\n",
        )
        .arg(pg.url("producer", "hingnet"))
        .arg("video_psycopg")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    support::audit::assert_archived(&env, &a);
    support::audit::assert_archived(&env, &b);
    // The producer can do nothing else.
    for sql in [
        "UPDATE queue SET state = 'failed'",
        "SELECT count(*) FROM queue",
        "DELETE FROM queue",
    ] {
        let out = pg.psql_as("producer", sql);
        assert!(!out.status.success(), "{sql} was allowed");
        assert!(
            stderr(&out).contains("permission denied"),
            "{}",
            stderr(&out)
        );
    }
    assert_eq!(queue_db::count(&env, "done"), 2);
}

#[test]
fn a_daemon_past_its_lease_is_taken_over_and_its_late_outcome_is_discarded() {
    let api = StandIn::start(TOKEN);
    let env = pg_env(&api);
    let v = api.add_video("video_late", 300_000);
    // Both downloads stop after 100 kB: d1's for good (its claim is lost meanwhile), d2's
    // until released, so that d1's late outcome meets a row another daemon holds.
    api.script(
        "video_late",
        vec![Step::Hold(100_000), Step::Hold(100_000), Step::Serve],
    );
    let (c1, dir1) = support::postgres::fleet_config(&env, "d1", "2s");
    let (c2, dir2) = support::postgres::fleet_config(&env, "d2", "2s");
    let d1 = env.start_daemon(&c1, "d1.log", &[]);
    env.insert(&["video_late"]);
    api.wait_for("d1's held download", DEADLINE, |l| {
        l.iter().filter(|r| r.paused).count() == 1
    });
    let out = env.cmd(&["status"]);
    assert!(
        stdout(&out).contains("claims held by: d1 (1)"),
        "{}",
        stdout(&out)
    );
    // d1 freezes past its lease (a paused VM, a partition); d2 takes the row over.
    d1.signal(libc::SIGSTOP);
    let _d2 = env.start_daemon(&c2, "d2.log", &[]);
    api.wait_for("d2's held download", DEADLINE, |l| {
        l.iter().filter(|r| r.paused).count() == 2
    });
    // d1 comes back: its stalled attempt ends (its read timeout passed while it was stopped),
    // and its outcome must not be recorded over d2's claim.
    d1.signal(libc::SIGCONT);
    d1.wait_log("lost the claim while downloading");
    let row = env.row("video_late").unwrap();
    assert_eq!(row.state, "downloading", "{row:?}");
    assert_eq!(
        queue_db::query_text(
            &env,
            "SELECT claimed_on FROM queue WHERE video_id = 'video_late'"
        ),
        "d2"
    );
    assert!(queue_db::attempt_log(&env, "video_late").is_empty());
    // d2 finishes: the one outcome recorded, its file in d2's archive.
    api.release("video_late");
    let row = env.wait_state("video_late", "done");
    let path = PathBuf::from(row.path.clone().unwrap());
    assert!(path.starts_with(&dir2), "{path:?}");
    assert_eq!(support::local::file_sha256(&path), v.sha256);
    assert_eq!(
        queue_db::query_text(
            &env,
            "SELECT archived_on FROM queue WHERE video_id = 'video_late'"
        ),
        "d2"
    );
    assert_eq!(
        queue_db::query_text(
            &env,
            "SELECT string_agg(instance || ' ' || outcome, ',') FROM attempt_log \
             WHERE video_id = 'video_late'"
        ),
        "d2 done"
    );
    assert_eq!(queue_db::count(&env, "downloading"), 0);
    assert!(!dir1.join("video_late.mp4").exists());
}

#[test]
fn the_database_going_away_mid_download_loses_nothing_and_is_named() {
    let api = StandIn::start(TOKEN);
    support::postgres_only();
    // One slot, taken by the download: no claim is tried while the database is away, and the
    // status line must say so all the same.
    let mut settings = Settings::new(&api.base_url());
    settings.concurrency = 1;
    let mut env = Env::new(settings, TOKEN);
    let v = api.add_video("video_outage", 200_000);
    api.script("video_outage", vec![Step::Hold(50_000), Step::Serve]);
    let sock = NotifySocket::bind(&env);
    let (k, val) = sock.env();
    let d = env.start_with_env("daemon.log", &[(k, &val)]);
    env.insert(&["video_outage"]);
    api.wait_for("the held download", DEADLINE, |l| {
        l.iter().any(|r| r.paused)
    });
    env.pg.as_mut().unwrap().stop();
    // The operator's view while it is away: one line, the unavailable code.
    let out = env.cmd(&["status"]);
    assert_eq!(out.status.code(), Some(69), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("queue database unreachable"),
        "{}",
        stderr(&out)
    );
    sock.wait("STATUS= saying the database is unreachable", |m| {
        m.starts_with("STATUS=queue database unreachable")
    });
    // The download ends while the database is away: its outcome waits for it.
    api.release("video_outage");
    d.wait_log("cannot record the outcome yet");
    env.pg.as_mut().unwrap().start_again();
    support::audit::assert_archived(&env, &v);
    assert_eq!(queue_db::count(&env, "failed"), 0);

    // Every connection of the daemon's cut by the server: it reconnects, and a row inserted
    // afterwards is noticed without the poll (an hour here).
    let w = api.add_video("video_after_cut", 2000);
    env.pg.as_ref().unwrap().psql(
        "postgres",
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE usename = 'hingnetd'",
    );
    d.wait_log("listening for new rows again");
    env.insert(&["video_after_cut"]);
    support::audit::assert_archived(&env, &w);
}

#[test]
fn timestamps_postgres_cannot_use_are_refused_or_ignored_and_stall_nothing() {
    let api = StandIn::start(TOKEN);
    let env = pg_env(&api);
    let far = api.add_video("video_far_expiry", 2000);
    // An expiry the API reports in milliseconds past what a timestamp holds (year 294276).
    api.status_fields(
        "video_far_expiry",
        serde_json::json!({ "expires_at": 9_300_000_000_000_000i64 }),
    );
    let after = api.add_video("video_after_infinity", 2000);
    let _d = env.start();
    // 'infinity' sorts first and no claim could read it back: refused at the insert, in words
    // that name the problem.
    let out = env.pg.as_ref().unwrap().psql_as(
        "producer",
        "INSERT INTO queue(video_id, expires_at) VALUES ('video_inf', '-infinity') \
         ON CONFLICT DO NOTHING",
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("queue_times_finite"),
        "{}",
        stderr(&out)
    );
    env.insert(&["video_far_expiry", "video_after_infinity"]);
    support::audit::assert_archived(&env, &far);
    support::audit::assert_archived(&env, &after);
    assert_eq!(queue_db::count(&env, "downloading"), 0);
}

#[test]
fn an_outcome_the_database_refuses_does_not_leave_the_row_claimed() {
    let api = StandIn::start(TOKEN);
    let env = pg_env(&api);
    let v = api.add_video("video_refused_once", 2000);
    let pg = env.pg.as_ref().unwrap();
    // The database refuses to record this video done (a DBA's trigger, a constraint a newer
    // schema added): not the database being away, so not retried as such.
    pg.psql(
        "hingnet",
        "CREATE FUNCTION refuse_done() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN RAISE EXCEPTION 'refused by the test'; END $$; \
         CREATE TRIGGER refuse_done BEFORE UPDATE ON queue FOR EACH ROW \
         WHEN (NEW.state = 'done') EXECUTE FUNCTION refuse_done();",
    );
    let d = env.start();
    env.insert(&["video_refused_once"]);
    d.wait_log("cannot record outcome");
    // Given back for later, saying why: not left `downloading` and renewed for ever, nor
    // downloaded again at once for as long as the refusal lasts.
    let row = env.wait_row("video_refused_once", "given back", |r| r.state == "pending");
    assert!(
        row.last_error.as_deref().is_some_and(
            |e| e.contains("cannot record the outcome") && e.contains("refused by the test")
        ),
        "{row:?}"
    );
    assert_eq!(api.content_requests("video_refused_once").len(), 1);
    // The operator lifts the refusal and makes the row due now (waking the daemons, as
    // `hingnetd retry` does for failed rows): archived.
    pg.psql(
        "hingnet",
        "DROP TRIGGER refuse_done ON queue; \
         UPDATE queue SET next_attempt_at = now() WHERE video_id = 'video_refused_once'; \
         SELECT pg_notify('hingnetd_queue', '')",
    );
    support::audit::assert_archived(&env, &v);
}

#[test]
fn a_file_in_another_hosts_archive_is_neither_repaired_nor_deleted_from_here() {
    let api = StandIn::start(TOKEN);
    let env = pg_env(&api);
    let v = api.add_video("video_on_d2", 2000);
    let (c1, _) = support::postgres::fleet_config(&env, "d1", "5s");
    let (c2, dir2) = support::postgres::fleet_config(&env, "d2", "5s");
    {
        let _d2 = env.start_daemon(&c2, "d2.log", &[]);
        env.insert(&["video_on_d2"]);
        env.wait_state("video_on_d2", "done");
    }
    let before = env.row("video_on_d2").unwrap();
    assert!(PathBuf::from(before.path.as_deref().unwrap()).starts_with(&dir2));
    let out = env
        .command_with(&c1, &["verify", "--repair", "video_on_d2"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stdout(&out).contains("ELSEWHERE video_on_d2 is archived on d2"),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    let out = env
        .command_with(&c1, &["remove", "--delete-file", "video_on_d2"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("in d2's archive"), "{}", stderr(&out));
    let after = env.row("video_on_d2").unwrap();
    assert_eq!(after.state, "done");
    assert_eq!(after.path, before.path);
    assert_eq!(
        support::local::file_sha256(Path::new(after.path.as_deref().unwrap())),
        v.sha256
    );
    // From d2 itself, verify checks the file.
    let out = env
        .command_with(&c2, &["verify", "video_on_d2"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
}

//! A real PostgreSQL server for the tests, from Debian's packages: a throwaway cluster (`initdb`
//! into a temporary directory) on a free loopback port with a private socket directory, which a
//! test can restart, and which is stopped and removed when dropped. PostgreSQL refuses to run as
//! root: as root (CI), the cluster belongs to the `postgres` user the package creates, and the
//! server runs as that user.
//!
//! As the stories' queue (`for_queue`): the daemon's role `hingnetd` owns the database
//! `hingnet`, and producers insert as the role `producer`, which may only INSERT. The functions
//! after `Postgres` are the ones `queue_db` reaches, as `sqlite`'s are.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::harness::{Env, Row};

/// How long a server may take to accept connections after it is started.
const READY_WITHIN: Duration = Duration::from_secs(60);

pub struct Postgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    /// `Some` while the server runs.
    server: Option<Child>,
    /// Settings given to the server (`-c name=value`) besides the usual ones.
    settings: Vec<String>,
}

/// How a server is set up (`Postgres::start_with`).
#[derive(Default)]
pub struct Options {
    /// Authentication for TCP connections (`initdb --auth-host`); the default is `trust`. The
    /// superuser always gets in over the private socket.
    pub host_auth: Option<&'static str>,
    /// Extra server settings, `name=value`.
    pub settings: Vec<String>,
    /// Files for the server to read (a TLS key and certificate): copied into its directory,
    /// owned by it, mode 0600.
    pub files: Vec<PathBuf>,
}

/// The newest PostgreSQL's programs (`/usr/lib/postgresql/<version>/bin`).
fn bin_dir() -> PathBuf {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL is needed (scripts/test installs Debian's postgresql)")
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("postgres").exists().then_some((version, bin))
        })
        .collect();
    found.sort();
    found
        .pop()
        .expect("no /usr/lib/postgresql/*/bin/postgres")
        .1
}

fn running_as_root() -> bool {
    // SAFETY: geteuid(2) has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

impl Postgres {
    pub fn start() -> Postgres {
        Postgres::start_with(Options::default())
    }

    /// The directory the server's own files are in (`Options::files` are copied there).
    pub fn files_dir(&self) -> PathBuf {
        self.dir.path().to_owned()
    }

    pub fn start_with(options: Options) -> Postgres {
        let dir = tempfile::tempdir().expect("temporary directory");
        let socket_dir = dir.path().join("socket");
        std::fs::create_dir(&socket_dir).unwrap();
        if running_as_root() {
            let id = |flag: &str| -> u32 {
                let out = Command::new("id")
                    .args([flag, "postgres"])
                    .output()
                    .unwrap();
                assert!(out.status.success(), "no postgres user: {out:?}");
                String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
            };
            let (uid, gid) = (id("-u"), id("-g"));
            for d in [dir.path(), &socket_dir] {
                std::os::unix::fs::chown(d, Some(uid), Some(gid))
                    .expect("give the cluster's directories to postgres");
            }
        }
        for f in &options.files {
            use std::os::unix::fs::PermissionsExt;
            let to = dir.path().join(f.file_name().unwrap());
            std::fs::copy(f, &to).unwrap();
            std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o600)).unwrap();
            if running_as_root() {
                let meta = std::fs::metadata(dir.path()).unwrap();
                use std::os::unix::fs::MetadataExt;
                std::os::unix::fs::chown(&to, Some(meta.uid()), Some(meta.gid())).unwrap();
            }
        }
        let mut pg = Postgres {
            dir,
            bin: bin_dir(),
            port: free_port(),
            server: None,
            settings: options.settings,
        };
        let host_auth = format!("--auth-host={}", options.host_auth.unwrap_or("trust"));
        let out = pg
            .as_owner(&pg.bin.join("initdb"))
            .args([
                "-U",
                "postgres",
                "-A",
                "trust",
                &host_auth,
                "-E",
                "UTF8",
                "--no-sync",
            ])
            .arg("--locale=C")
            .arg("-D")
            .arg(pg.data())
            .output()
            .expect("run initdb");
        assert!(out.status.success(), "initdb: {}", text(&out));
        pg.start_server();
        pg
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn socket_dir(&self) -> PathBuf {
        self.dir.path().join("socket")
    }

    /// A command run as the cluster's owner (`postgres` when the tests run as root).
    fn as_owner(&self, program: &Path) -> Command {
        if running_as_root() {
            let mut c = Command::new("setpriv");
            c.args([
                "--reuid=postgres",
                "--regid=postgres",
                "--clear-groups",
                "--",
            ])
            .arg(program);
            c
        } else {
            Command::new(program)
        }
    }

    fn start_server(&mut self) {
        assert!(self.server.is_none(), "already running");
        let log = std::fs::File::create(self.dir.path().join("server.log")).unwrap();
        let child = self
            .as_owner(&self.bin.join("postgres"))
            .arg("-D")
            .arg(self.data())
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-k")
            .arg(self.socket_dir())
            .args(["-c", "listen_addresses=127.0.0.1"])
            // Test data need not survive a power cut; every test's server is thrown away.
            .args(["-c", "fsync=off"])
            .args(self.settings.iter().flat_map(|s| ["-c", s.as_str()]))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start postgres");
        self.server = Some(child);
        let started = Instant::now();
        while !self.accepts() {
            if let Some(status) = self.server.as_mut().unwrap().try_wait().unwrap() {
                panic!("postgres exited ({status}):\n{}", self.log());
            }
            assert!(
                started.elapsed() < READY_WITHIN,
                "postgres not ready within {READY_WITHIN:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether the server answers on its TCP port.
    fn accepts(&self) -> bool {
        Command::new(self.bin.join("pg_isready"))
            .args(["-q", "-h", "127.0.0.1", "-p", &self.port.to_string()])
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Stops the server the way an operator's `systemctl stop` does (a fast shutdown: open
    /// connections are closed), and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.server.take() {
            let out = self
                .as_owner(&self.bin.join("pg_ctl"))
                .args(["stop", "-m", "fast", "-w", "-D"])
                .arg(self.data())
                .output()
                .expect("run pg_ctl");
            if !out.status.success() {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
    }

    /// Stops and starts the server on the same port and data.
    pub fn restart(&mut self) {
        self.stop();
        self.start_server();
    }

    /// Starts the server again after `stop`.
    pub fn start_again(&mut self) {
        self.start_server();
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// A URL for `user` on `database`, over TCP on loopback, without a password.
    pub fn url(&self, user: &str, database: &str) -> String {
        format!("postgres://{user}@127.0.0.1:{}/{database}", self.port)
    }

    /// Runs SQL as the superuser on `database` over the private socket (`psql`, stopping at the
    /// first error), and returns what it printed, unaligned and without headers.
    pub fn psql(&self, database: &str, sql: &str) -> String {
        let out = Command::new(self.bin.join("psql"))
            .arg("-h")
            .arg(self.socket_dir())
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                database,
            ])
            .args(["-v", "ON_ERROR_STOP=1", "-X", "-q", "-A", "-t", "-c", sql])
            .output()
            .expect("run psql");
        assert!(out.status.success(), "psql {sql:?}: {}", text(&out));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// A server for the stories' queue: the database `hingnet`, owned by the daemon's role
    /// `hingnetd`, and the role `producer` (`grant_producer`, once the schema exists).
    pub fn for_queue() -> Postgres {
        let pg = Postgres::start();
        pg.psql(
            "postgres",
            "CREATE ROLE hingnetd LOGIN; CREATE ROLE producer LOGIN",
        );
        // On its own: CREATE DATABASE cannot run in the transaction a multi-statement -c is.
        pg.psql("postgres", "CREATE DATABASE hingnet OWNER hingnetd");
        pg
    }

    /// Lets `producer` insert into the queue, and nothing else: the README's grant.
    pub fn grant_producer(&self) {
        self.psql(
            "hingnet",
            "GRANT CONNECT ON DATABASE hingnet TO producer; GRANT INSERT ON queue TO producer",
        );
    }

    /// The daemon's URL for the stories' queue.
    pub fn queue_url(&self) -> String {
        format!("{}?sslmode=disable", self.url("hingnetd", "hingnet"))
    }

    /// Runs `sql` as `user` on the stories' database over TCP, as a producer's or an
    /// operator's `psql` does; returns what it printed.
    pub fn psql_as(&self, user: &str, sql: &str) -> Output {
        let mut child = Command::new(self.bin.join("psql"))
            .arg(self.url(user, "hingnet"))
            .args(["-v", "ON_ERROR_STOP=1", "-X", "-q", "-A", "-t"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run psql");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(sql.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    }

    /// The server's own log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

// ---------------------------------------------------------------------------------------------
// The stories' queue on PostgreSQL: what `queue_db` reaches (the same functions as `sqlite`'s)
// ---------------------------------------------------------------------------------------------

fn server(env: &Env) -> &Postgres {
    env.pg.as_ref().expect("an env with a PostgreSQL queue")
}

/// Runs `f` on a connection of its own as the daemon's role (an operator's session), times
/// in UTC.
fn with_client<T>(env: &Env, f: impl AsyncFnOnce(&tokio_postgres::Client) -> T) -> T {
    let url = server(env).queue_url();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .expect("connect to the test database");
        tokio::spawn(conn);
        c.batch_execute("SET TimeZone = 'UTC'").await.unwrap();
        f(&c).await
    })
}

/// The lease is short so that a story's killed downloader is taken over within its wait.
pub fn config(env: &Env) -> String {
    format!("database = {:?}\nlease = \"5s\"\n", server(env).queue_url())
}

/// What the sweep for leaked secrets reads besides the env's files: every table's rows
/// (`pg_dump`) and the server's log, which quotes failed statements.
pub fn contents(env: &Env) -> Vec<(String, Vec<u8>)> {
    let pg = server(env);
    let out = Command::new(pg.bin.join("pg_dump"))
        .arg("-h")
        .arg(pg.socket_dir())
        .args([
            "-p",
            &pg.port.to_string(),
            "-U",
            "postgres",
            "--data-only",
            "hingnet",
        ])
        .output()
        .expect("run pg_dump");
    assert!(out.status.success(), "pg_dump: {}", text(&out));
    vec![
        ("queue database (pg_dump)".into(), out.stdout),
        ("queue database server log".into(), pg.log().into_bytes()),
    ]
}

/// Where the sweep finds the queue's rows, as its findings name them.
pub fn kept_in(_env: &Env) -> &'static str {
    "pg_dump"
}

/// The env's config with `[queue]` and `[archive]` as one daemon of a fleet has them: its
/// own instance name and lease, and its own archive directory (another host's disk).
pub fn fleet_config(env: &Env, instance: &str, lease: &str) -> (PathBuf, PathBuf) {
    let archive = env.dir.path().join(format!("videos-{instance}"));
    let text = env
        .render()
        .replace(
            "lease = \"5s\"\n",
            &format!("lease = {lease:?}\ninstance = {instance:?}\n"),
        )
        .replace(
            &format!("dir = {:?}\n", env.archive),
            &format!("dir = {archive:?}\n"),
        );
    assert!(text.contains(instance) && text.contains(archive.to_str().unwrap()));
    let path = env.dir.path().join(format!("{instance}.toml"));
    std::fs::write(&path, text).unwrap();
    (path, archive)
}

/// Nothing: the queue is on the server.
pub fn files(_env: &Env) -> Vec<&'static str> {
    Vec::new()
}

/// Inserts IDs the way a producer on another host does: `psql` as the role that may only
/// INSERT, with the producer contract's statement.
pub fn insert(env: &Env, ids: &[&str]) {
    let mut sql = String::new();
    for id in ids {
        sql.push_str(&format!(
            "INSERT INTO queue(video_id) VALUES ('{}') ON CONFLICT DO NOTHING;\n",
            id.replace('\'', "''")
        ));
    }
    let out = server(env).psql_as("producer", &sql);
    assert!(out.status.success(), "psql as producer: {}", text(&out));
}

const ROW_COLUMNS: &str = "video_id, state, attempts::int8, last_error, http_status::int8, \
     path, sha256, bytes, \
     to_char(next_attempt_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'), \
     to_char(finished_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')";

fn read_row(r: &tokio_postgres::Row) -> Row {
    Row {
        id: r.get(0),
        state: r.get(1),
        attempts: r.get(2),
        last_error: r.get(3),
        http_status: r.get(4),
        path: r.get(5),
        sha256: r.get(6),
        bytes: r.get(7),
        next_attempt_at: r.get(8),
        finished_at: r.get(9),
    }
}

pub fn row(env: &Env, id: &str) -> Option<Row> {
    with_client(env, async |c| {
        c.query_opt(
            &format!("SELECT {ROW_COLUMNS} FROM queue WHERE video_id = $1"),
            &[&id],
        )
        .await
        .expect("read row")
        .map(|r| read_row(&r))
    })
}

pub fn rows(env: &Env) -> Vec<Row> {
    with_client(env, async |c| {
        c.query(
            &format!("SELECT {ROW_COLUMNS} FROM queue ORDER BY seq"),
            &[],
        )
        .await
        .expect("read rows")
        .iter()
        .map(read_row)
        .collect()
    })
}

pub fn count(env: &Env, state: &str) -> i64 {
    state_counts(env).get(state).copied().unwrap_or(0)
}

pub fn state_counts(env: &Env) -> BTreeMap<String, i64> {
    with_client(env, async |c| {
        c.query("SELECT state, count(*) FROM queue GROUP BY state", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect()
    })
}

pub fn count_where(env: &Env, cond: &str) -> i64 {
    query_i64(env, &format!("SELECT count(*) FROM queue WHERE {cond}"))
}

/// The first column of every row a query gives, as PostgreSQL prints it (NULL as "").
pub fn query_texts(env: &Env, query: &str) -> Vec<String> {
    with_client(env, async |c| {
        c.simple_query(query)
            .await
            .unwrap_or_else(|e| panic!("{query}: {e}"))
            .iter()
            .filter_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => {
                    Some(r.get(0).unwrap_or_default().to_owned())
                }
                _ => None,
            })
            .collect()
    })
}

pub fn query_text(env: &Env, query: &str) -> String {
    query_texts(env, query)
        .into_iter()
        .next()
        .unwrap_or_else(|| panic!("{query}: no row"))
}

pub fn query_i64(env: &Env, query: &str) -> i64 {
    query_text(env, query).parse().expect("an integer")
}

pub fn attempt_log(env: &Env, id: &str) -> Vec<(i64, String, String, Option<String>)> {
    with_client(env, async |c| {
        c.query(
            "SELECT attempt::int8, outcome, \
             to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'), detail \
             FROM attempt_log WHERE video_id = $1 ORDER BY id",
            &[&id],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect()
    })
}

/// As a producer on another host: `psql` as the role that may only INSERT.
pub fn insert_expiring(env: &Env, rows: &[(&str, Option<u32>)]) {
    let mut statements = String::from("BEGIN;");
    for (id, exp) in rows {
        statements.push_str(&match exp {
            Some(m) => format!(
                "INSERT INTO queue(video_id, expires_at) VALUES \
                 ('{id}', now() + interval '{m} minutes') ON CONFLICT DO NOTHING;"
            ),
            None => format!("INSERT INTO queue(video_id) VALUES ('{id}') ON CONFLICT DO NOTHING;"),
        });
    }
    statements.push_str("COMMIT;");
    let out = server(env).psql_as("producer", &statements);
    assert!(out.status.success(), "psql as producer: {}", text(&out));
}

pub fn expires_at(env: &Env, id: &str) -> Option<String> {
    with_client(env, async |c| {
        c.query_one(
            "SELECT to_char(expires_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"') \
             FROM queue WHERE video_id = $1",
            &[&id],
        )
        .await
        .unwrap()
        .get(0)
    })
}

/// Runs SQL as the daemon's role, as an operator's `psql` does.
pub fn sql(env: &Env, statement: &str) {
    let out = server(env).psql_as("hingnetd", statement);
    assert!(out.status.success(), "psql: {}", text(&out));
}

pub fn set_last_error(env: &Env, id: &str, text: &str) {
    with_client(env, async |c| {
        c.execute(
            "UPDATE queue SET last_error = $1 WHERE video_id = $2",
            &[&text, &id],
        )
        .await
        .unwrap()
    });
}

/// A producer on another host: Debian's psycopg2 as the role that may only INSERT, batches of
/// 25 in one transaction each, each batch appended to `acked` once committed. Each batch is
/// sorted, as the README asks of producers that insert several IDs in one transaction:
/// overlapping batches in different orders deadlock each other.
pub fn spawn_producer(env: &Env, list: &Path, acked: &Path) -> Child {
    Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(
            "import psycopg2, sys\n\
             ids = open(sys.argv[2]).read().split()\n\
             out = open(sys.argv[3], 'w')\n\
             c = psycopg2.connect(sys.argv[1])\n\
             for i in range(0, len(ids), 25):\n\
             \x20   batch = sorted(ids[i:i + 25])\n\
             \x20   with c:\n\
             \x20       with c.cursor() as cur:\n\
             \x20           cur.executemany('INSERT INTO queue(video_id) VALUES (%s) ON CONFLICT DO NOTHING', [(x,) for x in batch])\n\
             \x20   out.write('\\n'.join(batch) + '\\n'); out.flush()\n",
        )
        .arg(server(env).url("producer", "hingnet"))
        .arg(list)
        .arg(acked)
        .spawn()
        .expect("/usr/bin/python3 with psycopg2 is needed (scripts/test installs python3-psycopg2)")
}

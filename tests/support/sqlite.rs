//! The queue database is SQLite: everything the tests know about that. Producers inserting
//! (the system `sqlite3` shell, Python), the one reader of rows, SQL run the way an operator
//! runs it, counts, the attempt log, and what only SQLite has: its write lock, a reader's
//! snapshot, the WAL, `user_version`, BLOB IDs. The only module that names `rusqlite` or the
//! library's `queue` module.
//!
//! Backend-neutral stories reach it as `support::queue_db` (see `mod.rs`), through the
//! functions before the "SQLite only" section below: another backend's module provides the
//! same ones. Tests about SQLite itself name `support::sqlite`.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use rusqlite::OptionalExtension;

use super::harness::{Env, Row, stderr};

/// Where the daemon keeps the queue: the `[queue]` lines of the config besides
/// `poll_interval`.
pub fn config(env: &Env) -> String {
    format!("database = {:?}\n", env.db)
}

/// What the queue keeps in the env's directory: the database's.
pub fn files(_env: &Env) -> Vec<&'static str> {
    vec!["state"]
}

/// Nothing besides the env's files, which the sweep reads anyway.
pub fn contents(_env: &Env) -> Vec<(String, Vec<u8>)> {
    Vec::new()
}

/// Where the sweep finds the queue's rows, as its findings name them.
pub fn kept_in(_env: &Env) -> &'static str {
    "queue.db"
}

/// Inserts IDs the way a producer script does: with the system `sqlite3` shell.
pub fn insert(env: &Env, ids: &[&str]) {
    insert_sqlite3(env, ids);
}

/// The row of `id`, if there is one.
pub fn row(env: &Env, id: &str) -> Option<Row> {
    open(env)
        .query_row(
            &format!("SELECT {ROW_COLUMNS} FROM queue WHERE video_id = ?1"),
            [id],
            read_row,
        )
        .optional()
        .expect("read row")
}

/// Every row, in insertion order.
pub fn rows(env: &Env) -> Vec<Row> {
    let db = open(env);
    let mut stmt = db
        .prepare(&format!("SELECT {ROW_COLUMNS} FROM queue ORDER BY rowid"))
        .unwrap();
    stmt.query_map([], read_row)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

/// The columns `read_row` reads, in its order.
const ROW_COLUMNS: &str = "video_id, state, attempts, last_error, http_status, path, sha256, \
                           bytes, next_attempt_at, finished_at";

fn read_row(r: &rusqlite::Row) -> rusqlite::Result<Row> {
    // A producer may insert a BLOB, or text that is not UTF-8 (`insert_raw`).
    let id = match r.get_ref(0)? {
        rusqlite::types::ValueRef::Text(t) | rusqlite::types::ValueRef::Blob(t) => {
            String::from_utf8_lossy(t).into_owned()
        }
        other => format!("{other:?}"),
    };
    Ok(Row {
        id,
        state: r.get(1)?,
        attempts: r.get(2)?,
        last_error: r.get(3)?,
        http_status: r.get(4)?,
        path: r.get(5)?,
        sha256: r.get(6)?,
        bytes: r.get(7)?,
        next_attempt_at: r.get(8)?,
        finished_at: r.get(9)?,
    })
}

/// Rows in `state`.
pub fn count(env: &Env, state: &str) -> i64 {
    state_counts(env).get(state).copied().unwrap_or(0)
}

/// Rows per state, read the way an operator's tool reads them.
pub fn state_counts(env: &Env) -> BTreeMap<String, i64> {
    let c = open(env);
    let mut st = c
        .prepare("SELECT state, count(*) FROM queue GROUP BY state")
        .unwrap();
    st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

/// Rows for which the SQL condition `cond` holds.
pub fn count_where(env: &Env, cond: &str) -> i64 {
    query_i64(env, &format!("SELECT count(*) FROM queue WHERE {cond}"))
}

/// The one integer a query gives (a count).
pub fn query_i64(env: &Env, query: &str) -> i64 {
    open(env).query_row(query, [], |r| r.get(0)).unwrap()
}

/// The one text value a query gives.
pub fn query_text(env: &Env, query: &str) -> String {
    open(env).query_row(query, [], |r| r.get(0)).unwrap()
}

/// The first column of every row a query gives, as text.
pub fn query_texts(env: &Env, query: &str) -> Vec<String> {
    open(env)
        .prepare(query)
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

/// `(attempt, outcome, at, detail)` from the attempt log of `id`, oldest first.
pub fn attempt_log(env: &Env, id: &str) -> Vec<(i64, String, String, Option<String>)> {
    let db = open(env);
    let mut stmt = db
        .prepare(
            "SELECT attempt, outcome, at, detail FROM attempt_log WHERE video_id = ?1 ORDER BY id",
        )
        .unwrap();
    stmt.query_map([id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

pub fn insert_expiring(env: &Env, rows: &[(&str, Option<u32>)]) {
    let mut statements = String::from("BEGIN;");
    for (id, exp) in rows {
        statements.push_str(&match exp {
            Some(m) => format!(
                "INSERT OR IGNORE INTO queue(video_id, expires_at) VALUES \
                 ('{id}', strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '+{m} minutes'));"
            ),
            None => format!("INSERT OR IGNORE INTO queue(video_id) VALUES ('{id}');"),
        });
    }
    statements.push_str("COMMIT;");
    sql(env, &statements);
}

pub fn expires_at(env: &Env, id: &str) -> Option<String> {
    open(env)
        .query_row(
            "SELECT expires_at FROM queue WHERE video_id = ?1",
            [id],
            |r| r.get(0),
        )
        .optional()
        .unwrap()
        .flatten()
}

/// Runs SQL on the queue the way an operator's shell does (the system `sqlite3`).
pub fn sql(env: &Env, statement: &str) {
    let out = Command::new("sqlite3")
        .args(["-bail", "-cmd", ".timeout 30000"])
        .arg(&env.db)
        .arg(statement)
        .output()
        .expect("sqlite3");
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "sqlite3: {}",
        stderr(&out)
    );
}

/// Writes `text` into the row's `last_error`, behind the daemon's back (a planted secret).
pub fn set_last_error(env: &Env, id: &str, text: &str) {
    let db = rusqlite::Connection::open(&env.db).unwrap();
    db.busy_timeout(Duration::from_secs(30)).unwrap();
    db.execute(
        "UPDATE queue SET last_error = ?1 WHERE video_id = ?2",
        [text, id],
    )
    .unwrap();
}

/// A producer process: inserts the IDs listed in the file `list` (whitespace-separated) in
/// batches of 25, one transaction each, appending each batch to `acked` once it is committed.
pub fn spawn_producer(env: &Env, list: &Path, acked: &Path) -> Child {
    Command::new("python3")
        .arg("-c")
        .arg(
            "import sqlite3, sys\n\
             ids = open(sys.argv[2]).read().split()\n\
             out = open(sys.argv[3], 'w')\n\
             c = sqlite3.connect(sys.argv[1], timeout=60, isolation_level=None)\n\
             for i in range(0, len(ids), 25):\n\
             \x20   batch = ids[i:i + 25]\n\
             \x20   c.execute('BEGIN IMMEDIATE')\n\
             \x20   c.executemany('INSERT OR IGNORE INTO queue(video_id) VALUES (?)', [(x,) for x in batch])\n\
             \x20   c.execute('COMMIT')\n\
             \x20   out.write('\\n'.join(batch) + '\\n'); out.flush()\n",
        )
        .arg(&env.db)
        .arg(list)
        .arg(acked)
        .spawn()
        .expect("python3 is needed")
}

/// Read-only, as an operator's tool opens it, waiting out a producer's lock.
fn open(env: &Env) -> rusqlite::Connection {
    let c =
        rusqlite::Connection::open_with_flags(&env.db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .expect("open queue db");
    c.busy_timeout(Duration::from_secs(30)).unwrap();
    c
}

// ---------------------------------------------------------------------------------------------
// SQLite only: what the tests of SQLite itself use
// ---------------------------------------------------------------------------------------------

/// The size the daemon cuts the WAL back to (`PRAGMA journal_size_limit`).
// Every test binary compiles this module; one uses this.
#[allow(unused_imports)]
pub use hingnetd::queue::sqlite::WAL_SIZE_LIMIT;

/// The database's write-ahead log.
pub fn wal_path(env: &Env) -> PathBuf {
    env.db.with_extension("db-wal")
}

/// Inserts IDs with the system `sqlite3` shell, as a producer's script does.
pub fn insert_sqlite3(env: &Env, ids: &[&str]) {
    let mut sql = String::new();
    for id in ids {
        sql.push_str(&format!(
            "INSERT OR IGNORE INTO queue(video_id) VALUES ('{}');\n",
            id.replace('\'', "''")
        ));
    }
    let mut child = Command::new("sqlite3")
        .arg("-bail")
        .arg(&env.db)
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the sqlite3 shell is needed (apt-get install sqlite3)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!(".timeout 30000\n{sql}").as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "sqlite3: {}", stderr(&out));
}

/// Inserts one ID with Python's `sqlite3` module, as a Python producer does; the caller checks
/// the exit status.
pub fn insert_python(env: &Env, id: &str) -> Output {
    Command::new("python3")
        .arg("-c")
        .arg(
            "import sqlite3, sys\n\
             c = sqlite3.connect(sys.argv[1], timeout=30)\n\
             c.execute('INSERT OR IGNORE INTO queue(video_id) VALUES (?)', (sys.argv[2],))\n\
             c.commit()\n",
        )
        .arg(&env.db)
        .arg(id)
        .output()
        .unwrap()
}

/// Inserts raw IDs by parameter binding, so NUL and invalid UTF-8 survive: `(true, bytes)` as
/// a BLOB (SQLite's dynamic typing lets a producer do that), `(false, bytes)` as text (UTF-8).
/// A thousand per transaction.
pub fn insert_raw(env: &Env, ids: &[(bool, &[u8])]) {
    let mut db = rusqlite::Connection::open(&env.db).unwrap();
    db.busy_timeout(Duration::from_secs(30)).unwrap();
    for batch in ids.chunks(1000) {
        let tx = db.transaction().unwrap();
        {
            let mut st = tx
                .prepare("INSERT OR IGNORE INTO queue(video_id) VALUES (?1)")
                .unwrap();
            for (blob, id) in batch {
                if *blob {
                    st.execute([rusqlite::types::Value::Blob(id.to_vec())])
                        .unwrap();
                } else {
                    st.execute([String::from_utf8(id.to_vec()).unwrap()])
                        .unwrap();
                }
            }
        }
        tx.commit().unwrap();
    }
}

/// Sets `PRAGMA user_version`, the schema version `migrate` checks.
pub fn set_user_version(env: &Env, version: i64) {
    let c = rusqlite::Connection::open(&env.db).unwrap();
    c.pragma_update(None, "user_version", version).unwrap();
}

/// A Python producer holding the database's write lock: it runs `before` (committed), then
/// `BEGIN IMMEDIATE` and `during`, and keeps the transaction open until `commit`.
pub struct WriteLock {
    child: Child,
}

pub fn hold_write_lock(env: &Env, before: &str, during: &str) -> WriteLock {
    let mut child = Command::new("python3")
        .arg("-c")
        .arg(
            "import sqlite3, sys\n\
             c = sqlite3.connect(sys.argv[1], timeout=30, isolation_level=None)\n\
             if sys.argv[2]: c.execute(sys.argv[2])\n\
             c.execute('BEGIN IMMEDIATE')\n\
             if sys.argv[3]: c.execute(sys.argv[3])\n\
             print('locked', flush=True)\n\
             sys.stdin.readline()\n\
             c.execute('COMMIT')\n",
        )
        .arg(&env.db)
        .args([before, during])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 is needed");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.as_mut().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(
        line.trim(),
        "locked",
        "the producer could not take the lock"
    );
    WriteLock { child }
}

impl WriteLock {
    pub fn commit(mut self) {
        self.child
            .stdin
            .as_mut()
            .unwrap()
            .write_all(b"commit\n")
            .unwrap();
        assert!(
            self.child.wait().unwrap().success(),
            "the producer's commit failed"
        );
    }
}

impl Drop for WriteLock {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A Python reader holding one read transaction (one snapshot) open until `release`: while it
/// does, no checkpoint can reset the WAL.
pub struct Snapshot {
    child: Child,
}

pub fn hold_snapshot(env: &Env) -> Snapshot {
    let mut child = Command::new("python3")
        .arg("-c")
        .arg(
            "import sqlite3, sys\n\
             c = sqlite3.connect(sys.argv[1], isolation_level=None)\n\
             c.execute('BEGIN')\n\
             c.execute('SELECT count(*) FROM queue').fetchone()\n\
             print('reading', flush=True)\n\
             sys.stdin.readline()\n\
             c.execute('COMMIT')\n",
        )
        .arg(&env.db)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.as_mut().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "reading");
    Snapshot { child }
}

impl Snapshot {
    pub fn release(mut self) {
        self.child.stdin.as_mut().unwrap().write_all(b"\n").unwrap();
        assert!(self.child.wait().unwrap().success());
    }
}

impl Drop for Snapshot {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

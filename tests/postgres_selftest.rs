//! The PostgreSQL the tests use (`support::postgres`) is a real server from Debian's packages:
//! it starts, takes SQL from psql, serves a producer on another "host" (Python with Debian's
//! psycopg2, over TCP), keeps its data across a restart, and is gone once dropped.

mod support;

use std::process::Command;

use support::harness::stderr;
use support::postgres::Postgres;

#[test]
fn a_throwaway_server_takes_sql_keeps_it_over_a_restart_and_stops() {
    let mut pg = Postgres::start();
    pg.psql("postgres", "CREATE TABLE t (id text PRIMARY KEY)");
    pg.psql(
        "postgres",
        "INSERT INTO t VALUES ('a') ON CONFLICT DO NOTHING",
    );
    let out = Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(
            "import psycopg2, sys\n\
             c = psycopg2.connect(sys.argv[1])\n\
             c.autocommit = True\n\
             c.cursor().execute('INSERT INTO t VALUES (%s), (%s) ON CONFLICT DO NOTHING', ('a', 'b'))\n",
        )
        .arg(pg.url("postgres", "postgres"))
        .output()
        .expect("Debian's python3 (scripts/test installs python3-psycopg2)");
    assert!(out.status.success(), "python3: {}", stderr(&out));
    let rows = "SELECT string_agg(id, ',' ORDER BY id) FROM t";
    assert_eq!(pg.psql("postgres", rows), "a,b");
    pg.restart();
    assert_eq!(pg.psql("postgres", rows), "a,b", "{}", pg.log());
    let port = pg.port();
    drop(pg);
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "something still answers on {port}"
    );
}

//! The fleet half of the fault suite (issue 13): three daemons on one PostgreSQL queue, each
//! with its own archive directory (another host's disk), while four producers insert with
//! duplicates; meanwhile a random daemon is killed with SIGKILL and restarted, one is stopped
//! (SIGSTOP) for longer than its lease and then continued, the server cuts the daemons'
//! connections, and PostgreSQL itself restarts. Then every promise is checked: each distinct ID
//! done exactly once, each done file whole where its row says (in the archive of the instance
//! that recorded it), no row left claimed, and no outcome recorded by a daemon that had lost
//! its claim.
//!
//! Bounded by default; `HINGNETD_FAULTS=full` runs the sizes (2,000 videos, 4 x 5,000
//! inserts). Prints one `FAULTS fleet: ...` line.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::faults::{scale, seed};
use support::harness::{DEADLINE, Daemon, Env, Settings, wait_until};
use support::queue_db::{self, count};
use support::standin::StandIn;

const TOKEN: &str = "hn-fleet-token-81f3";
/// Short, so that takeovers happen within the run; the heartbeat renews every third of it.
const LEASE: Duration = Duration::from_secs(2);

/// One daemon of the fleet: its config, its archive directory, the process now running.
struct Member {
    name: String,
    config: PathBuf,
    archive: PathBuf,
    daemon: Option<Daemon>,
    starts: usize,
}

impl Member {
    /// Starts the daemon; a restart right after a kill may find the instance's lock still held
    /// for a moment by the killed process's session, and exits 75: it is tried again.
    fn start(&mut self, env: &Env) {
        let deadline = Instant::now() + DEADLINE;
        loop {
            self.starts += 1;
            let log = env
                .dir
                .path()
                .join(format!("{}-{}.log", self.name, self.starts));
            let file = std::fs::File::create(&log).unwrap();
            let mut child = env
                .command_with(&self.config, &["run"])
                .stdin(Stdio::null())
                .stdout(file.try_clone().unwrap())
                .stderr(file)
                .spawn()
                .expect("spawn hingnetd run");
            let ready = loop {
                if std::fs::read_to_string(&log)
                    .unwrap_or_default()
                    .contains("hingnetd ready")
                {
                    break true;
                }
                if let Some(status) = child.try_wait().unwrap() {
                    assert_eq!(
                        status.code(),
                        Some(75),
                        "{} exited at start: {}",
                        self.name,
                        std::fs::read_to_string(&log).unwrap_or_default()
                    );
                    break false;
                }
                assert!(Instant::now() < deadline, "{} never got ready", self.name);
                std::thread::sleep(Duration::from_millis(20));
            };
            if ready {
                self.daemon = Some(Daemon { child, log });
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn daemon(&mut self) -> &mut Daemon {
        self.daemon.as_mut().expect("running")
    }
}

/// A producer on another host that survives the database restarting: batches of 25, sorted
/// (see the README), each in one transaction, tried again on a lost connection (the insert is
/// idempotent), appended to `acked` once committed.
fn spawn_producer(url: &str, list: &Path, acked: &Path) -> Child {
    Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(
            "import psycopg2, sys, time\n\
             ids = open(sys.argv[2]).read().split()\n\
             out = open(sys.argv[3], 'w')\n\
             c = None\n\
             i = 0\n\
             while i < len(ids):\n\
             \x20   batch = sorted(ids[i:i + 25])\n\
             \x20   try:\n\
             \x20       if c is None or c.closed:\n\
             \x20           c = psycopg2.connect(sys.argv[1])\n\
             \x20       with c:\n\
             \x20           with c.cursor() as cur:\n\
             \x20               cur.executemany('INSERT INTO queue(video_id) VALUES (%s) ON CONFLICT DO NOTHING', [(x,) for x in batch])\n\
             \x20   except (psycopg2.OperationalError, psycopg2.InterfaceError):\n\
             \x20       c = None\n\
             \x20       time.sleep(0.2)\n\
             \x20       continue\n\
             \x20   out.write('\\n'.join(batch) + '\\n'); out.flush()\n\
             \x20   i += 25\n",
        )
        .arg(url)
        .arg(list)
        .arg(acked)
        .spawn()
        .expect("/usr/bin/python3 with psycopg2 is needed")
}

/// How many lines of every log of the env contain `needle`.
fn log_lines(env: &Env, needle: &str) -> usize {
    env.logs().lines().filter(|l| l.contains(needle)).count()
}

#[test]
fn three_daemons_under_kills_a_stop_cuts_and_a_database_restart_archive_each_video_once() {
    support::postgres_only();
    let seed = seed(0x000f_1ee7);
    let mut rng = fastrand::Rng::with_seed(seed);
    let (n_videos, per_producer) = (scale(300, 2_000), scale(750, 5_000));
    let api = StandIn::start(TOKEN);
    let mut s = Settings::new(&api.base_url());
    s.concurrency = 4;
    s.initial_delay = "20ms";
    s.max_delay = "100ms";
    let mut env = Env::new(s, TOKEN);
    let videos: Vec<_> = (0..n_videos)
        .map(|i| api.add_video(&format!("video_f{i:05}"), rng.usize(2_000..60_000)))
        .collect();
    let by_id: BTreeMap<&str, &str> = videos
        .iter()
        .map(|v| (v.id.as_str(), v.sha256.as_str()))
        .collect();

    let lease = format!("{}s", LEASE.as_secs());
    let mut fleet: Vec<Member> = ["d1", "d2", "d3"]
        .iter()
        .map(|name| {
            let (config, archive) = support::postgres::fleet_config(&env, name, &lease);
            Member {
                name: name.to_string(),
                config,
                archive,
                daemon: None,
                starts: 0,
            }
        })
        .collect();
    for m in &mut fleet {
        m.start(&env);
    }

    // Producer p inserts the IDs i with i % 4 in {p, p + 1}, and as many more picked at random:
    // every ID at least twice, by two processes, with duplicates within one list too.
    let url = env.pg.as_ref().unwrap().url("producer", "hingnet");
    let ids: Vec<&str> = videos.iter().map(|v| v.id.as_str()).collect();
    let mut producers = Vec::new();
    let mut inserts = 0;
    for p in 0..4 {
        let mine = support::faults::producer_share(&ids, p, per_producer, &mut rng);
        inserts += mine.len();
        let list = env.dir.path().join(format!("ids-{p}.txt"));
        std::fs::write(&list, mine.join("\n")).unwrap();
        let acked = env.dir.path().join(format!("acked-{p}.txt"));
        producers.push((spawn_producer(&url, &list, &acked), acked));
    }

    let started = Instant::now();
    let (mut kills, mut cuts, mut stops, mut restarts) = (0, 0, 0, 0);
    let mut stopped: Option<(usize, Instant)> = None;
    let mut producing = true;
    let min_faults = scale(12, 40);
    loop {
        let done = count(&env, "done") as usize;
        if producing
            && producers
                .iter_mut()
                .all(|(c, _)| c.try_wait().unwrap().is_some())
        {
            producing = false;
        }
        if stopped.is_none() && !producing && done == n_videos && kills + cuts >= min_faults {
            break;
        }
        // The next fault once the fleet has made some progress (or a moment has passed, for
        // the faults that stop progress: a stopped daemon, a restarting database).
        let target = done + rng.usize(5..30);
        let until = Instant::now() + Duration::from_millis(rng.u64(300..1_500));
        while (count(&env, "done") as usize) < target.min(n_videos) && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(20));
        }
        if let Some((i, at)) = stopped {
            // Continued once it has been stopped for three leases: long past its claims' lease.
            if at.elapsed() >= 3 * LEASE {
                fleet[i].daemon().signal(libc::SIGCONT);
                stopped = None;
            }
            continue;
        }
        let done = count(&env, "done") as usize;
        if stops == 0 && done >= n_videos / 4 {
            let i = rng.usize(..3);
            fleet[i].daemon().signal(libc::SIGSTOP);
            stopped = Some((i, Instant::now()));
            stops += 1;
            continue;
        }
        if restarts == 0 && done >= n_videos / 2 {
            let pg = env.pg.as_mut().unwrap();
            pg.stop();
            std::thread::sleep(Duration::from_millis(rng.u64(200..1_500)));
            pg.start_again();
            restarts += 1;
            continue;
        }
        if kills + cuts >= min_faults && done == n_videos {
            continue;
        }
        if rng.u8(..10) < 6 {
            let i = rng.usize(..3);
            fleet[i].daemon().kill9();
            fleet[i].start(&env);
            kills += 1;
        } else {
            env.pg.as_ref().unwrap().psql(
                "postgres",
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                 WHERE usename = 'hingnetd'",
            );
            cuts += 1;
        }
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "the fleet made no end: {} of {n_videos} done\n{}",
            count(&env, "done"),
            env.logs()
        );
    }
    for (child, _) in &mut producers {
        assert!(child.wait().unwrap().success(), "a producer failed");
    }
    wait_until("every ID done", DEADLINE, || {
        count(&env, "done") as usize == n_videos
    });
    // Stopped cleanly, so that nothing is still being written while the archive is checked.
    for m in &mut fleet {
        let d = m.daemon();
        d.signal(libc::SIGTERM);
        assert!(d.wait_exit().success(), "{} did not stop cleanly", m.name);
    }
    let elapsed = started.elapsed();

    let mut violations = Vec::new();
    let acked = support::faults::acknowledged(producers.iter().map(|(_, f)| f.as_path()));
    if acked.len() != n_videos {
        violations.push(format!(
            "{} distinct IDs acknowledged, {n_videos} made",
            acked.len()
        ));
    }
    let rows = queue_db::query_i64(&env, "SELECT count(*) FROM queue");
    if rows != n_videos as i64 {
        violations.push(format!("{rows} rows for {n_videos} IDs"));
    }
    let claimed = queue_db::count_where(
        &env,
        "state = 'downloading' OR claimed_by IS NOT NULL OR lease_expires_at IS NOT NULL",
    );
    if claimed != 0 {
        violations.push(format!("{claimed} rows left claimed"));
    }
    let archives: BTreeMap<&str, &Path> = fleet
        .iter()
        .map(|m| (m.name.as_str(), m.archive.as_path()))
        .collect();
    let recorded: BTreeMap<String, (String, String)> = queue_db::query_texts(
        &env,
        "SELECT video_id || ' ' || coalesce(archived_on, '?') || ' ' || \
           coalesce(string_agg(l.instance, ',' ORDER BY l.id) FILTER (WHERE l.outcome = 'done'), '') \
         FROM queue q LEFT JOIN attempt_log l USING (video_id) GROUP BY video_id, archived_on",
    )
    .into_iter()
    .map(|line| {
        let mut f = line.split(' ');
        let id = f.next().unwrap().to_owned();
        let on = f.next().unwrap_or("").to_owned();
        let by = f.next().unwrap_or("").to_owned();
        (id, (on, by))
    })
    .collect();
    for (id, sha) in &by_id {
        let Some(row) = env.row(id) else {
            violations.push(format!("{id}: row lost"));
            continue;
        };
        if row.state != "done" {
            violations.push(format!("{id}: ended {}", row.state));
            continue;
        }
        let (on, by) = recorded.get(*id).cloned().unwrap_or_default();
        // One recorded outcome, by the instance whose archive holds the file: a late daemon's
        // outcome would be a second entry, or a row naming another archive than the entry.
        if by != on {
            violations.push(format!("{id}: done recorded by {by:?}, archived on {on:?}"));
        }
        let path = PathBuf::from(row.path.clone().unwrap_or_default());
        match archives.get(on.as_str()) {
            Some(dir) if path.starts_with(dir) => {}
            _ => violations.push(format!("{id}: {path:?} is not in {on}'s archive")),
        }
        match std::fs::read(&path) {
            Ok(bytes) if support::standin::sha256_hex(&bytes) == *sha => {}
            Ok(_) => violations.push(format!("{id}: {path:?} is not the video")),
            Err(e) => violations.push(format!("{id}: {path:?}: {e}")),
        }
        if row.sha256.as_deref() != Some(*sha) {
            violations.push(format!("{id}: row records sha256 {:?}", row.sha256));
        }
    }
    let fenced = log_lines(&env, "lost the claim while downloading");
    let takeovers = log_lines(
        &env,
        "row was left downloading by a downloader that stopped",
    );
    println!(
        "FAULTS fleet: daemons=3 videos={n_videos} inserts={inserts} kills={kills} stops={stops} \
         cuts={cuts} pg_restarts={restarts} takeovers={takeovers} fenced={fenced} \
         violations={} elapsed={:.1}s seed={seed}",
        violations.len(),
        elapsed.as_secs_f64()
    );
    assert!(violations.is_empty(), "{violations:#?}");
    // The faults happened: a stop past the lease, the database restarted.
    assert!(
        stops == 1 && restarts == 1,
        "stops={stops} restarts={restarts}"
    );
    assert!(takeovers > 0, "no claim of a killed daemon was taken back");
}

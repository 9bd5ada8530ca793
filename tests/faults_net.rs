//! Network and security faults (issue 4): the real `hingnetd run` against the loopback stand-in
//! (API on 127.0.0.1, CDN on 127.0.0.2) misbehaving in every way the contract names. Each
//! scenario must end in a correct file or a clear retry/failure, never in a `done` row whose
//! file differs from the stand-in's video, and nothing secret may leak anywhere (the canary
//! sweep of `support::canary` closes every test).
//!
//! Seeds are fixed per test and printed; `HINGNETD_FAULTS_SEED=<n>` replays or explores another.
//! `HINGNETD_FAULTS=full` runs the long form (more trials). Each test prints one line
//!
//! `FAULTS <test-name>: trials=<n> violations=<n> seed=<n> <other figures>`
//!
//! before it asserts, so a run's figures can be collected with `grep '^FAULTS'` (run with
//! `--no-capture`, or read nextest's captured output).

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use support::audit::audit;
use support::canary;
use support::faults::{full, seed};
use support::harness::{DEADLINE, Env, Settings};
use support::queue_db::{self, attempt_log, count_where};
use support::sqlite;
use support::standin::{Host, Request, StandIn, Step, Video, sha256_hex, video_content};
use support::tls::{HttpsServer, make_certs};

// ---------------------------------------------------------------------------------------------
// The frame every test shares
// ---------------------------------------------------------------------------------------------

struct Run {
    name: &'static str,
    seed: u64,
    token: String,
    api: StandIn,
    env: Env,
    started: Instant,
    /// Violations found along the way (each one line).
    violations: Vec<String>,
}

fn setup(name: &'static str, default_seed: u64, tune: impl FnOnce(&mut Settings)) -> Run {
    let seed = seed(default_seed);
    println!("{name}: seed={seed} (HINGNETD_FAULTS_SEED={seed} to replay)");
    let token = canary::token(seed);
    let api = StandIn::start(&token);
    let mut settings = Settings::new(&api.base_url());
    settings.concurrency = 4;
    tune(&mut settings);
    let env = Env::new(settings, &token);
    Run {
        name,
        seed,
        token,
        api,
        env,
        started: Instant::now(),
        violations: Vec::new(),
    }
}

/// Waits (polling the database, as `wait_row` does) until `cond` holds for every row.
fn wait_all(env: &Env, what: &str, deadline: Duration, cond: &str) {
    let start = Instant::now();
    loop {
        if count_where(env, &format!("NOT ({cond})")) == 0 {
            return;
        }
        assert!(
            start.elapsed() < deadline,
            "timed out after {deadline:?} waiting for {what}; rows not there yet: {:?}\nlogs:\n{}",
            env.rows()
                .into_iter()
                .filter(|r| r.state != "done" && r.state != "failed")
                .take(20)
                .collect::<Vec<_>>(),
            tail(&env.logs(), 60)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Operator commands whose output the leak sweep also reads.
fn operator_outputs(env: &Env, ids: &[&str]) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut run = |label: String, args: &[&str]| {
        let o = env.cmd(args);
        let mut bytes = o.stdout;
        bytes.extend_from_slice(&o.stderr);
        out.push((label, bytes));
    };
    run("status --json".into(), &["status", "--json"]);
    run(
        "list --json".into(),
        &["list", "--json", "--limit", "100000"],
    );
    run("verify --all".into(), &["verify", "--all"]);
    for id in ids.iter().take(5) {
        run(format!("show {id}"), &["show", id, "--json"]);
    }
    out
}

impl Run {
    fn violation(&mut self, what: String) {
        self.violations.push(what);
    }

    /// Audits the archive, sweeps for leaks (with the output of operator commands about
    /// `ids`), prints the FAULTS line, then asserts no violation.
    fn finish(mut self, trials: usize, figures: &str, ids: &[&str]) {
        let audit = audit(&self.env, &self.api);
        self.violations.extend(audit);
        let outputs = operator_outputs(&self.env, ids);
        let outputs: Vec<(&str, &[u8])> = outputs
            .iter()
            .map(|(l, b)| (l.as_str(), b.as_slice()))
            .collect();
        let sweep = canary::sweep(&self.env, &self.api, &self.token, &outputs);
        if sweep.violations() > 0 {
            self.violations
                .push(format!("secrets leaked:\n{}", sweep.describe()));
        }
        let n = self.violations.len() - usize::from(sweep.violations() > 0) + sweep.violations();
        println!(
            "FAULTS {}: trials={trials} violations={n} seed={} {figures} {} requests={} elapsed_s={:.1}",
            self.name,
            self.seed,
            sweep.figures(),
            self.api.requests().len(),
            self.started.elapsed().as_secs_f64()
        );
        assert!(
            self.violations.is_empty(),
            "{} violations:\n{}\nrequest log (last 40):\n{}\nlogs:\n{}",
            n,
            self.violations.join("\n"),
            tail(&self.api.dump(), 40),
            tail(&self.env.logs(), 80)
        );
    }
}

fn bound(n: usize) -> Duration {
    DEADLINE + Duration::from_millis(100) * n as u32
}

/// The sweep itself can fail: secrets planted in a log, the database, a file's name and
/// contents in the archive, and a command's output are each found.
#[test]
fn the_leak_sweep_finds_planted_secrets() {
    let run = setup("the_leak_sweep_finds_planted_secrets", 0x7e57_0013, |_| {});
    run.api.add_video("video_plant", 1000);
    run.api.script("video_plant", vec![Step::Redirect]);
    // One real signed URL, to plant.
    let _d = run.env.start();
    run.env.insert(&["video_plant"]);
    run.env.wait_state("video_plant", "done");
    let sig = run.api.signatures_issued().pop().unwrap();
    assert!(canary::sweep(&run.env, &run.api, &run.token, &[]).violations() == 0);
    let dir = run.env.dir.path();
    std::fs::write(dir.join("planted.log"), format!("x Bearer {} y", run.token)).unwrap();
    std::fs::create_dir_all(run.env.archive.join("sub")).unwrap();
    std::fs::write(run.env.archive.join("sub").join(format!("{sig}.mp4")), b"").unwrap();
    std::fs::write(
        run.env.archive.join("x.bin"),
        format!("\0\0?sig={sig}&exp=1"),
    )
    .unwrap();
    queue_db::set_last_error(
        &run.env,
        "video_plant",
        &format!("token {}", &run.token[10..]),
    );
    let out = format!("status: {sig}");
    let s = canary::sweep(
        &run.env,
        &run.api,
        &run.token,
        &[("planted output", out.as_bytes())],
    );
    let places: Vec<String> = s
        .hits
        .iter()
        .map(|h| format!("{} {}", h.what, h.place))
        .collect();
    for want in [
        "planted.log",
        "(name)",
        "x.bin",
        queue_db::kept_in(&run.env),
        "planted output",
    ] {
        assert!(
            places.iter().any(|p| p.contains(want)),
            "the sweep missed the secret planted in {want}: {places:?}"
        );
    }
    println!(
        "FAULTS the_leak_sweep_finds_planted_secrets: trials=5 violations=0 seed={} found={}",
        run.seed,
        s.violations()
    );
}

// ---------------------------------------------------------------------------------------------
// Bodies cut short: truncation, resets
// ---------------------------------------------------------------------------------------------

/// `n` videos of random sizes, each scripted with one or two `fault(offset)`s at random byte
/// offsets (on the API host, on the CDN, or one on each) before a clean answer. Every one must
/// end `done` with exactly the video's bytes.
fn cut_trials(name: &'static str, default_seed: u64, n: usize, fault: fn(usize) -> Step) {
    let mut run = setup(name, default_seed, |_| {});
    let mut rng = fastrand::Rng::with_seed(run.seed);
    let mut videos: Vec<Video> = Vec::new();
    let mut shapes = [0usize; 4];
    for i in 0..n {
        let id = format!("video_cut_{i:04}");
        let len = rng.usize(64..=256 * 1024);
        let v = run.api.add_video(&id, len);
        // Offsets anywhere from 0 (head only) to the last byte, the ftyp sniff included.
        let a = if rng.u8(0..8) == 0 {
            rng.usize(0..16.min(len))
        } else {
            rng.usize(0..len)
        };
        let b = rng.usize(0..len);
        let shape = rng.usize(0..4);
        shapes[shape] += 1;
        match shape {
            0 => run.api.script(&id, vec![fault(a), Step::Serve]),
            // The second cut lands in the resumed 206 (or a fresh 200).
            1 => run.api.script(&id, vec![fault(a), fault(b), Step::Serve]),
            2 => {
                run.api.script(&id, vec![Step::Redirect]);
                run.api.script_cdn(&id, vec![fault(a), Step::Serve]);
            }
            _ => {
                run.api.script(&id, vec![fault(a), Step::Redirect]);
                run.api.script_cdn(&id, vec![fault(b), Step::Serve]);
            }
        }
        videos.push(v);
    }
    let _d = run.env.start();
    let ids: Vec<&str> = videos.iter().map(|v| v.id.as_str()).collect();
    run.env.insert(&ids);
    wait_all(
        &run.env,
        "every video done or failed",
        bound(n),
        "state IN ('done', 'failed')",
    );
    let rows = run.env.rows();
    for r in &rows {
        if r.state != "done" {
            run.violation(format!("{}: ended {} ({:?})", r.id, r.state, r.last_error));
        }
    }
    let reqs = run.api.requests();
    let resumed = reqs.iter().filter(|r| r.status == 206).count();
    let restarts_200 = reqs
        .iter()
        .filter(|r| r.status == 200 && r.range.is_some())
        .count();
    let done_416 = rows.iter().filter(|r| r.http_status == Some(416)).count();
    let attempts: i64 = rows.iter().map(|r| r.attempts).sum();
    let figures = format!(
        "done={} resumed_206={resumed} whole_200_on_range={restarts_200} done_by_416={done_416} \
         attempts={attempts} shapes={shapes:?}",
        rows.iter().filter(|r| r.state == "done").count()
    );
    run.finish(n, &figures, &ids);
}

#[test]
fn truncation_at_random_offsets() {
    let n = if full() { 1000 } else { 200 };
    cut_trials(
        "truncation_at_random_offsets",
        0x7e57_0001,
        n,
        Step::Truncate,
    );
}

#[test]
fn connection_resets_at_random_offsets() {
    let n = if full() { 1000 } else { 200 };
    cut_trials(
        "connection_resets_at_random_offsets",
        0x7e57_0002,
        n,
        Step::Reset,
    );
}

// ---------------------------------------------------------------------------------------------
// Stalls and slow links
// ---------------------------------------------------------------------------------------------

/// A connection that goes silent (after N body bytes, or before any status line) is dropped by
/// the daemon within `read_timeout` + 5 s, measured by the stand-in from the moment it went
/// silent to the moment it saw the daemon hang up; then the video is resumed and archived.
#[test]
fn a_stalled_connection_is_dropped_within_read_timeout_plus_5s() {
    let read_timeout = Duration::from_secs(1);
    let limit = read_timeout + Duration::from_secs(5);
    let mut run = setup(
        "a_stalled_connection_is_dropped_within_read_timeout_plus_5s",
        0x7e57_0003,
        |s| {
            s.read_timeout = "1s";
            s.concurrency = 4;
        },
    );
    let mut rng = fastrand::Rng::with_seed(run.seed);
    let n = if full() { 16 } else { 4 };
    let mut ids = Vec::new();
    for i in 0..n {
        let id = format!("video_stall_{i:02}");
        let len = rng.usize(64..=512 * 1024);
        run.api.add_video(&id, len);
        let stall = match i % 4 {
            // Silent before the status line: the header timeout's turn.
            0 => Step::Silent,
            1 => Step::Stall(0),
            _ => Step::Stall(rng.usize(0..len)),
        };
        if i % 2 == 1 {
            run.api.script(&id, vec![Step::Redirect]);
            run.api.script_cdn(&id, vec![stall, Step::Serve]);
        } else {
            run.api.script(&id, vec![stall, Step::Serve]);
        }
        ids.push(id);
    }
    let _d = run.env.start();
    let idr: Vec<&str> = ids.iter().map(String::as_str).collect();
    run.env.insert(&idr);
    wait_all(
        &run.env,
        "every video done or failed",
        bound(n * 10),
        "state IN ('done', 'failed')",
    );
    let mut worst = Duration::ZERO;
    let mut stalls = 0;
    for r in run.api.requests() {
        let Some(paused) = r.paused_at else { continue };
        stalls += 1;
        let ended = r.finished_at.expect("finished");
        let held = ended - paused;
        worst = worst.max(held);
        if !r.peer_closed || held > limit {
            run.violation(format!(
                "stall not dropped within {limit:?}: held {held:?}, peer_closed={}: {r}",
                r.peer_closed
            ));
        }
    }
    if stalls != n {
        run.violation(format!("{stalls} stalls seen, {n} scripted"));
    }
    for r in run.env.rows() {
        if r.state != "done" {
            run.violation(format!("{}: ended {} ({:?})", r.id, r.state, r.last_error));
        }
    }
    let figures = format!(
        "stalls={stalls} worst_drop_ms={} limit_ms={}",
        worst.as_millis(),
        limit.as_millis()
    );
    run.finish(n, &figures, &idr);
}

/// A slow link: the body comes in small pieces with pauses far below `read_timeout`. That is
/// not a stall; each video completes in its first request, with the right bytes.
#[test]
fn slow_drip_bodies_complete_in_one_attempt() {
    let mut run = setup(
        "slow_drip_bodies_complete_in_one_attempt",
        0x7e57_0004,
        |s| {
            s.read_timeout = "1s";
        },
    );
    let mut rng = fastrand::Rng::with_seed(run.seed);
    let n = if full() { 12 } else { 4 };
    let mut ids = Vec::new();
    let mut longest_pause = Duration::ZERO;
    for i in 0..n {
        let id = format!("video_drip_{i:02}");
        let len = rng.usize(8 * 1024..=48 * 1024);
        run.api.add_video(&id, len);
        let piece = rng.usize(512..=4096);
        // At most a tenth of read_timeout.
        let pause = Duration::from_millis(rng.u64(5..=100));
        longest_pause = longest_pause.max(pause);
        let drip = Step::Drip { piece, pause };
        if i % 2 == 1 {
            run.api.script(&id, vec![Step::Redirect]);
            run.api.script_cdn(&id, vec![drip]);
        } else {
            run.api.script(&id, vec![drip]);
        }
        ids.push(id);
    }
    let _d = run.env.start();
    let idr: Vec<&str> = ids.iter().map(String::as_str).collect();
    run.env.insert(&idr);
    wait_all(
        &run.env,
        "every video done or failed",
        bound(n * 10),
        "state IN ('done', 'failed')",
    );
    let mut slowest = Duration::ZERO;
    for r in run.env.rows() {
        if r.state != "done" || r.attempts != 1 {
            run.violation(format!(
                "{}: {} after {} attempts ({:?})",
                r.id, r.state, r.attempts, r.last_error
            ));
        }
    }
    for r in run.api.requests().iter().filter(|r| r.status == 200) {
        slowest = slowest.max(r.finished_at.unwrap_or(r.at) - r.at);
    }
    let content = run.api.requests().iter().filter(|r| r.is_content()).count();
    if content != n {
        run.violation(format!(
            "{content} content requests for {n} videos: a drip was retried"
        ));
    }
    let figures = format!(
        "longest_pause_ms={} slowest_body_ms={}",
        longest_pause.as_millis(),
        slowest.as_millis()
    );
    run.finish(n, &figures, &idr);
}

// ---------------------------------------------------------------------------------------------
// Lengths and ranges that lie
// ---------------------------------------------------------------------------------------------

/// Shared by the length and range tests: `cases` (id suffix, size, API script, CDN script)
/// must all end `done` with the right bytes.
type Case = (String, usize, Vec<Step>, Option<Vec<Step>>);
type NamedCase = (&'static str, usize, Vec<Step>, Option<Vec<Step>>);

fn all_done_trials(mut run: Run, cases: Vec<Case>, figures: impl Fn(&Run) -> String) {
    let mut ids = Vec::new();
    for (id, len, script, cdn) in &cases {
        run.api.add_video(id, *len);
        run.api.script(id, script.clone());
        if let Some(cdn) = cdn {
            run.api.script_cdn(id, cdn.clone());
        }
        ids.push(id.as_str());
    }
    let _d = run.env.start();
    run.env.insert(&ids);
    wait_all(
        &run.env,
        "every video done or failed",
        bound(cases.len() * 5),
        "state IN ('done', 'failed')",
    );
    for r in run.env.rows() {
        if r.state != "done" {
            run.violation(format!("{}: ended {} ({:?})", r.id, r.state, r.last_error));
        }
    }
    let f = figures(&run);
    let n = cases.len();
    run.finish(n, &f, &ids);
}

/// `Content-Length` larger than the body, then close: the body is cut short, the next attempt
/// resumes (here: asks past the end and gets a 416 saying the file is complete), and the file
/// is right.
#[test]
fn content_length_larger_than_the_body_is_retried_to_the_right_file() {
    let run = setup(
        "content_length_larger_than_the_body_is_retried_to_the_right_file",
        0x7e57_0005,
        |_| {},
    );
    let mut rng = fastrand::Rng::with_seed(run.seed);
    let n = if full() { 100 } else { 20 };
    let cases = (0..n)
        .map(|i| {
            let len = rng.usize(64..=128 * 1024);
            let over = Step::LengthOver(rng.usize(1..=200_000));
            let id = format!("video_cl_over_{i:03}");
            if i % 2 == 0 {
                (id, len, vec![over, Step::Serve], None)
            } else {
                (id, len, vec![Step::Redirect], Some(vec![over, Step::Serve]))
            }
        })
        .collect();
    all_done_trials(run, cases, |run| {
        let by_416 = run
            .env
            .rows()
            .iter()
            .filter(|r| r.http_status == Some(416))
            .count();
        format!("done_by_416={by_416}")
    });
}

/// `Content-Length` smaller than the body: the HTTP layer cannot see anything wrong (it reads
/// the declared bytes and stops), so only the file itself can tell: the stand-in's videos, like
/// real MP4s, are a sequence of boxes whose sizes add up to the file's length, and a file cut
/// short ends inside its last box. Same for a 416 claiming that the bytes we have are the whole
/// file. Either way a short file must not be marked done.
#[test]
fn a_body_shorter_than_the_file_is_never_marked_done() {
    let run = setup(
        "a_body_shorter_than_the_file_is_never_marked_done",
        0x7e57_0006,
        |s| {
            s.give_up_after = "2s";
        },
    );
    let mut rng = fastrand::Rng::with_seed(run.seed);
    let n = if full() { 40 } else { 10 };
    let cases = (0..n)
        .map(|i| {
            let len = rng.usize(1024..=128 * 1024);
            let less = rng.usize(1..len - 512);
            let cut = rng.usize(512..len);
            let id = format!("video_short_{i:03}");
            match i % 3 {
                0 => (id, len, vec![Step::LengthUnder(less), Step::Serve], None),
                1 => (
                    id,
                    len,
                    vec![Step::Redirect],
                    Some(vec![Step::LengthUnder(less), Step::Serve]),
                ),
                _ => (
                    id,
                    len,
                    vec![Step::Truncate(cut), Step::Unsatisfiable(None), Step::Serve],
                    None,
                ),
            }
        })
        .collect();
    all_done_trials(run, cases, |_| String::new());
}

/// Ranges answered wrongly: a 206 that starts elsewhere than asked, a 416 with another total,
/// a 416 without a partial, a server that ignores Range. Each restarts or resumes to the right
/// file.
#[test]
fn wrong_ranges_end_in_the_right_file() {
    let run = setup("wrong_ranges_end_in_the_right_file", 0x7e57_0007, |_| {});
    let mut rng = fastrand::Rng::with_seed(run.seed);
    let rounds = if full() { 20 } else { 4 };
    let mut cases: Vec<Case> = Vec::new();
    for i in 0..rounds {
        let len = rng.usize(1024..=128 * 1024);
        let a = rng.usize(1..len);
        let k = |s: &str| format!("video_range_{s}_{i:02}");
        cases.push((
            k("elsewhere"),
            len,
            vec![Step::Truncate(a), Step::BadContentRange, Step::Serve],
            None,
        ));
        cases.push((
            k("416_bigger"),
            len,
            vec![
                Step::Truncate(a),
                Step::Unsatisfiable(Some(len + 7)),
                Step::Serve,
            ],
            None,
        ));
        cases.push((
            k("416_smaller"),
            len,
            vec![
                Step::Truncate(a),
                Step::Unsatisfiable(Some(a / 2)),
                Step::Serve,
            ],
            None,
        ));
        cases.push((
            k("416_fresh"),
            len,
            vec![Step::Unsatisfiable(Some(len)), Step::Serve],
            None,
        ));
        cases.push((
            k("ignored"),
            len,
            vec![Step::Redirect],
            Some(vec![Step::Truncate(a), Step::IgnoreRange]),
        ));
    }
    all_done_trials(run, cases, |run| {
        let reqs = run.api.requests();
        format!(
            "answers_206={} answers_416={}",
            reqs.iter().filter(|r| r.status == 206).count(),
            reqs.iter().filter(|r| r.status == 416).count()
        )
    });
}

/// The contract: "accept a 206 only when its Content-Range starts at N and the total matches".
/// A 206 that starts at N but says the file has another total (shorter, or longer with filler)
/// must not complete the file.
#[test]
fn a_206_with_another_total_is_refused() {
    let run = setup("a_206_with_another_total_is_refused", 0x7e57_0008, |s| {
        s.give_up_after = "2s";
    });
    let mut rng = fastrand::Rng::with_seed(run.seed);
    let n = if full() { 40 } else { 10 };
    let cases = (0..n)
        .map(|i| {
            let len = rng.usize(4096..=128 * 1024);
            let a = rng.usize(1..len / 2);
            let delta = if i % 2 == 0 {
                -(rng.i64(1..(len - a) as i64))
            } else {
                rng.i64(1..=100_000)
            };
            (
                format!("video_total_{i:03}"),
                len,
                vec![Step::Truncate(a), Step::OtherTotal(delta), Step::Serve],
                None,
            )
        })
        .collect();
    all_done_trials(run, cases, |_| String::new());
}

// ---------------------------------------------------------------------------------------------
// Bodies that are not the video
// ---------------------------------------------------------------------------------------------

/// Chunked bodies with no length are archived; bodies over `download.max_bytes` are refused by
/// their announced length or as they stream (chunked), and leave nothing; exactly the limit is
/// fine.
#[test]
fn chunked_bodies_and_max_bytes() {
    let mut run = setup("chunked_bodies_and_max_bytes", 0x7e57_0009, |s| {
        s.max_bytes = "100KiB";
        s.give_up_after = "1s";
    });
    let limit = 100 * 1024;
    let ok: [NamedCase; 5] = [
        ("video_chunked_small", 60_000, vec![Step::Chunked], None),
        (
            "video_chunked_cdn",
            70_000,
            vec![Step::Redirect],
            Some(vec![Step::Chunked]),
        ),
        ("video_chunked_at_limit", limit, vec![Step::Chunked], None),
        ("video_length_at_limit", limit, vec![Step::Serve], None),
        (
            "video_chunked_after_cut",
            90_000,
            vec![Step::Truncate(30_000), Step::Chunked],
            None,
        ),
    ];
    let over: [NamedCase; 3] = [
        ("video_length_over", limit + 1, vec![Step::Serve], None),
        ("video_chunked_over", limit + 1, vec![Step::Chunked], None),
        (
            "video_chunked_over_cdn",
            3 * limit,
            vec![Step::Redirect],
            Some(vec![Step::Chunked]),
        ),
    ];
    let mut ids = Vec::new();
    for (id, len, script, cdn) in ok.iter().chain(over.iter()) {
        run.api.add_video(id, *len);
        run.api.script(id, script.clone());
        if let Some(cdn) = cdn {
            run.api.script_cdn(id, cdn.clone());
        }
        ids.push(*id);
    }
    let _d = run.env.start();
    run.env.insert(&ids);
    wait_all(
        &run.env,
        "every video done or failed",
        DEADLINE,
        "state IN ('done', 'failed')",
    );
    for (id, ..) in &ok {
        let r = run.env.row(id).unwrap();
        if r.state != "done" {
            run.violation(format!("{id}: ended {} ({:?})", r.state, r.last_error));
        }
    }
    for (id, ..) in &over {
        let r = run.env.row(id).unwrap();
        let e = r.last_error.clone().unwrap_or_default();
        if r.state != "failed" || !e.contains("download.max_bytes") {
            run.violation(format!(
                "{id}: ended {} ({e:?}), expected failed over max_bytes",
                r.state
            ));
        }
        for p in [run.env.final_path(id), run.env.partial_path(id)] {
            if p.exists() {
                run.violation(format!("{id}: {} left behind", p.display()));
            }
        }
    }
    let n = ok.len() + over.len();
    run.finish(n, &format!("limit={limit} refused={}", over.len()), &ids);
}

/// HTML and JSON on a 200 (labelled as text, or lying `video/mp4`), from the API or the CDN,
/// fresh or in place of a resumed 206: never archived, retried to the real file.
#[test]
fn html_or_json_on_a_200_is_never_archived() {
    let run = setup(
        "html_or_json_on_a_200_is_never_archived",
        0x7e57_000a,
        |_| {},
    );
    let mut rng = fastrand::Rng::with_seed(run.seed);
    let rounds = if full() { 10 } else { 2 };
    let mut cases: Vec<Case> = Vec::new();
    for i in 0..rounds {
        let len = rng.usize(1024..=64 * 1024);
        let a = rng.usize(1..len);
        let k = |s: &str| format!("video_text_{s}_{i:02}");
        cases.push((
            k("api"),
            len,
            vec![Step::Html, Step::WrongType, Step::Serve],
            None,
        ));
        cases.push((
            k("cdn"),
            len,
            vec![Step::Redirect],
            Some(vec![Step::WrongType, Step::Html, Step::Serve]),
        ));
        cases.push((
            k("resume"),
            len,
            vec![Step::Truncate(a), Step::Html, Step::WrongType, Step::Serve],
            None,
        ));
    }
    all_done_trials(run, cases, |run| {
        let logs = run.env.logs();
        format!(
            "refused_text={} refused_not_mp4={}",
            logs.matches("not a video").count(),
            logs.matches("not an MP4").count()
        )
    });
}

// ---------------------------------------------------------------------------------------------
// Redirects
// ---------------------------------------------------------------------------------------------

/// Redirect loops and chains: up to 10 hops are followed, an 11th is not; a loop back to the
/// same URL, and redirects to `file://` (pointing at a real MP4 outside the archive), `ftp://`,
/// `gopher://`, `data:` and `javascript:` are refused with a clear reason and never followed.
#[test]
fn redirect_loops_long_chains_and_other_schemes() {
    let mut run = setup(
        "redirect_loops_long_chains_and_other_schemes",
        0x7e57_000b,
        |s| {
            s.give_up_after = "1s";
        },
    );
    // A real MP4 outside the archive, which a followed file:// would archive.
    let outside = run.env.dir.path().join("outside.mp4");
    let outside_bytes = video_content("outside", 5000);
    std::fs::write(&outside, &outside_bytes).unwrap();
    let outside_sha = sha256_hex(&outside_bytes);

    let ten = run.api.add_video("video_ten_hops", 20_000);
    run.api.script("video_ten_hops", vec![Step::Redirect]);
    // API → CDN (1), then 9 CDN → CDN hops (10 redirects in all), then the file.
    let mut chain = vec![Step::Redirect; 9];
    chain.push(Step::Serve);
    run.api.script_cdn("video_ten_hops", chain);

    let refused: Vec<(&str, Step, &str)> = vec![
        (
            "video_eleven_hops",
            Step::Redirect,
            "more than 10 redirects",
        ),
        (
            "video_self_loop",
            Step::RedirectTo("/v1/videos/{id}/content".into()),
            "more than 10 redirects",
        ),
        (
            "video_to_file",
            Step::RedirectTo(format!("file://{}", outside.display())),
            "unsupported scheme \"file\"",
        ),
        (
            "video_to_ftp",
            Step::RedirectTo("ftp://{cdn}/cdn/{id}?sig={sig}".into()),
            "unsupported scheme \"ftp\"",
        ),
        (
            "video_to_gopher",
            Step::RedirectTo("gopher://{cdn}/cdn/{id}?sig={sig}".into()),
            "unsupported scheme \"gopher\"",
        ),
        (
            "video_to_data",
            Step::RedirectTo("data:video/mp4;base64,AAAAGGZ0eXBpc29tAAACAGlzb21tcDQx".into()),
            "unsupported scheme \"data\"",
        ),
        (
            "video_to_js",
            Step::RedirectTo("javascript:alert(1)".into()),
            "unsupported scheme \"javascript\"",
        ),
    ];
    for (id, step, _) in &refused {
        run.api.add_video(id, 20_000);
        run.api.script(id, vec![step.clone()]);
    }
    run.api
        .script_cdn("video_eleven_hops", vec![Step::Redirect]);
    let mut ids = vec!["video_ten_hops"];
    ids.extend(refused.iter().map(|(id, ..)| *id));
    let _d = run.env.start();
    run.env.insert(&ids);
    wait_all(
        &run.env,
        "every video done or failed",
        DEADLINE,
        "state IN ('done', 'failed')",
    );

    let r = run.env.row("video_ten_hops").unwrap();
    if r.state != "done" || r.attempts != 1 {
        run.violation(format!(
            "10 hops: {} after {} attempts ({:?})",
            r.state, r.attempts, r.last_error
        ));
    }
    let _ = ten;
    for (id, _, reason) in &refused {
        let r = run.env.row(id).unwrap();
        let e = r.last_error.clone().unwrap_or_default();
        if r.state != "failed" || !e.contains(reason) {
            run.violation(format!(
                "{id}: {} with {e:?}, expected failed with {reason:?}",
                r.state
            ));
        }
    }
    // Nothing followed a refused scheme: every request the stand-ins saw is http to them, and the
    // outside file is nowhere in the archive.
    for r in run.env.rows() {
        if r.sha256.as_deref() == Some(outside_sha.as_str()) {
            run.violation(format!("{}: archived the file:// target", r.id));
        }
    }
    for id in [
        "video_to_ftp",
        "video_to_gopher",
        "video_to_file",
        "video_to_data",
        "video_to_js",
    ] {
        let after_api = run
            .api
            .requests()
            .iter()
            .filter(|r| r.host == Host::Cdn && r.video_id().as_deref() == Some(id))
            .count();
        if after_api > 0 {
            run.violation(format!(
                "{id}: {after_api} requests followed the refused redirect"
            ));
        }
    }
    let hops_eleven = run
        .api
        .requests()
        .iter()
        .filter(|r| r.video_id().as_deref() == Some("video_eleven_hops"))
        .count();
    let attempts = run.env.row("video_eleven_hops").unwrap().attempts;
    if hops_eleven as i64 != attempts * 11 {
        run.violation(format!(
            "eleven hops: {hops_eleven} requests for {attempts} attempts, expected 11 each"
        ));
    }
    let n = ids.len();
    run.finish(n, &format!("refused={}", refused.len()), &ids);
}

/// The token goes to the API host only, also on chains that leave it and come back:
/// API → CDN → API → file, API → CDN → API → CDN → file, API → API → CDN → file; and a
/// redirect carrying `user:password@` does not turn into an `Authorization` header either.
/// The stand-in's CDN must count 0 `Authorization` headers.
#[test]
fn the_token_never_reaches_the_cdn_on_chains_that_leave_and_return() {
    let mut run = setup(
        "the_token_never_reaches_the_cdn_on_chains_that_leave_and_return",
        0x7e57_000c,
        |_| {},
    );
    let back_to_api = || Step::RedirectTo("http://{api}/files/{id}?sig={sig}".into());
    let rounds = if full() { 10 } else { 2 };
    let mut ids = Vec::new();
    for i in 0..rounds {
        let a = format!("video_chain_acaf_{i:02}");
        run.api.add_video(&a, 30_000);
        run.api.script(&a, vec![Step::Redirect]);
        run.api.script_cdn(&a, vec![back_to_api(), Step::Serve]);
        let b = format!("video_chain_acacf_{i:02}");
        run.api.add_video(&b, 30_000);
        run.api.script(&b, vec![Step::Redirect]);
        run.api
            .script_cdn(&b, vec![back_to_api(), Step::Redirect, Step::Serve]);
        let c = format!("video_chain_aacf_{i:02}");
        run.api.add_video(&c, 30_000);
        run.api.script(&c, vec![Step::RedirectRelative]);
        run.api.script_cdn(&c, vec![Step::Redirect, Step::Serve]);
        // Credentials in the redirect's own userinfo are not ours to forward either.
        let d = format!("video_chain_userinfo_{i:02}");
        run.api.add_video(&d, 30_000);
        run.api.script(
            &d,
            vec![Step::RedirectTo(
                "http://hn-user:hn-pass@{cdn}/cdn/{id}?sig={sig}".into(),
            )],
        );
        ids.extend([a, b, c, d]);
    }
    let idr: Vec<&str> = ids.iter().map(String::as_str).collect();
    let _d = run.env.start();
    run.env.insert(&idr);
    wait_all(
        &run.env,
        "every video done or failed",
        DEADLINE,
        "state IN ('done', 'failed')",
    );
    for r in run.env.rows() {
        if r.state != "done" {
            run.violation(format!("{}: ended {} ({:?})", r.id, r.state, r.last_error));
        }
    }
    let reqs = run.api.requests();
    let cdn = reqs.iter().filter(|r| r.host == Host::Cdn).count();
    let returned = reqs
        .iter()
        .filter(|r| r.host == Host::Api && r.is_signed())
        .count();
    // The round trip really happened for every video.
    if returned < 3 * rounds || cdn < ids.len() {
        run.violation(format!(
            "chains not taken: {cdn} CDN requests, {returned} back on the API host"
        ));
    }
    let n = ids.len();
    run.finish(
        n,
        &format!("cdn_requests={cdn} api_signed_requests={returned}"),
        &idr,
    );
}

/// An HTTPS API stand-in that answers every request with a 302 to `argv[3]`, and counts them.
const TLS_REDIRECTOR: &str = r#"
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(302)
        self.send_header("Location", sys.argv[3].replace("{path}", self.path))
        self.send_header("Content-Length", "0")
        self.end_headers()
    def log_message(self, *a):
        pass
"#;

/// An https API that redirects to a plain-http signed URL: refused, nothing is requested from
/// the http host, and the signed URL appears nowhere.
#[test]
fn a_redirect_from_https_to_http_is_refused() {
    let mut run = setup(
        "a_redirect_from_https_to_http_is_refused",
        0x7e57_000d,
        |s| {
            s.give_up_after = "1s";
        },
    );
    let certs = tempfile::tempdir().unwrap();
    make_certs(certs.path());
    let location = format!(
        "http://{}/cdn/video_tls_down?sig=SIGNED-{:016x}&exp=1",
        run.api.cdn_addr(),
        run.seed
    );
    let server = HttpsServer::start(certs.path(), TLS_REDIRECTOR, &[&location]);
    run.env.settings.base_url = format!("https://127.0.0.1:{}", server.port);
    run.env.write_config();
    run.api.add_video("video_tls_down", 5000);
    let ca = certs.path().join("ca.pem");
    let _d = run
        .env
        .start_with_env("daemon.log", &[("SSL_CERT_FILE", ca.to_str().unwrap())]);
    run.env.insert(&["video_tls_down"]);
    let r = run.env.wait_state("video_tls_down", "failed");
    let e = r.last_error.clone().unwrap_or_default();
    if !e.contains("from https to plain http") {
        run.violation(format!("last_error {e:?}: not the refused downgrade"));
    }
    let followed = run.api.requests().len();
    if followed > 0 {
        run.violation(format!("{followed} requests reached the plain-http host"));
    }
    run.finish(1, &format!("attempts={}", r.attempts), &["video_tls_down"]);
}

// ---------------------------------------------------------------------------------------------
// The API host cannot be reached
// ---------------------------------------------------------------------------------------------

/// A port on 127.0.0.1 that was bound and closed again: connections to it are refused.
fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

fn millis(at: &str) -> i64 {
    // YYYY-MM-DDTHH:MM:SS.SSSZ, within one test run: seconds of the day are enough unless the
    // run crosses midnight, which the +86400 below absorbs.
    let t = &at[11..23];
    let h: i64 = t[0..2].parse().unwrap();
    let m: i64 = t[3..5].parse().unwrap();
    let s: i64 = t[6..8].parse().unwrap();
    let ms: i64 = t[9..12].parse().unwrap();
    ((h * 60 + m) * 60 + s) * 1000 + ms
}

/// DNS failure (a `.invalid` host never resolves) and a refused connection on the API host:
/// retried with growing backoff, the rows stay pending (never failed, never done), and the
/// error says which host could not be reached and why.
#[test]
fn an_unreachable_api_host_is_retried_with_backoff_and_named() {
    let seed = seed(0x7e57_000e);
    let port = closed_port();
    let cases = [
        (
            "hingnet-api.invalid",
            format!("http://hingnet-api.invalid:{port}"),
        ),
        ("127.0.0.1", format!("http://127.0.0.1:{port}")),
    ];
    let mut run = setup(
        "an_unreachable_api_host_is_retried_with_backoff_and_named",
        seed,
        |_| {},
    );
    let mut trials = 0;
    let mut min_ratio = f64::MAX;
    let want = 5;
    for (host, base) in &cases {
        let mut s = run.env.settings.clone();
        s.base_url = base.clone();
        s.initial_delay = "100ms";
        s.max_delay = "400ms";
        // Plain http to a name that is not loopback (it resolves nowhere): allowed only so.
        s.allow_plain_http = true;
        let env = Env::new(s, &run.token);
        let d = env.start();
        env.insert(&["video_unreachable"]);
        // An outage is not the video's fault: each try is given back (outcome `released`), so
        // the row keeps attempts = 0 and its give-up clock never starts.
        let start = Instant::now();
        while attempt_log(&env, "video_unreachable").len() < want {
            assert!(
                start.elapsed() < DEADLINE,
                "{host}: no retries:\n{}",
                d.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        drop(d);
        let r = env.row("video_unreachable").unwrap();
        let log = attempt_log(&env, "video_unreachable");
        trials += log.len();
        if r.state != "pending" && r.state != "downloading" {
            run.violation(format!("{host}: row is {} ({:?})", r.state, r.last_error));
        }
        if r.attempts > 1 {
            run.violation(format!(
                "{host}: the outage counted {} attempts",
                r.attempts
            ));
        }
        if log.iter().any(|(_, o, ..)| o != "released") {
            run.violation(format!("{host}: attempt log {log:?}"));
        }
        let e = r.last_error.clone().unwrap_or_default();
        if !e.contains(base.as_str()) || !(e.contains("dns") || e.contains("refused")) {
            run.violation(format!(
                "{host}: last_error {e:?} does not name the host and cause"
            ));
        }
        // Backoff: attempt k+1 starts at least half of min(100 ms * 2^(k-1), 400 ms) after k.
        for w in log.windows(2) {
            let gap = millis(&w[1].2) - millis(&w[0].2);
            let nominal = (100i64 << (w[0].0 - 1).min(8)).min(400);
            min_ratio = min_ratio.min(gap as f64 / nominal as f64);
            if gap < nominal / 2 {
                run.violation(format!(
                    "{host}: attempt {} after {gap} ms, nominal {nominal} ms",
                    w[1].0
                ));
            }
        }
        let out = env.cmd(&["status"]);
        let sweep = canary::sweep(&env, &run.api, &run.token, &[("status", &out.stdout)]);
        if sweep.violations() > 0 {
            run.violation(format!("{host}: secrets leaked:\n{}", sweep.describe()));
        }
        println!("{host}: {} attempts, last_error {e:?}", r.attempts);
    }
    run.finish(trials, &format!("min_gap_over_nominal={min_ratio:.2}"), &[]);
}

/// Not reaching the API host says nothing about the video: like a rejected token, it must not
/// spend the video's give-up clock (README: `attempts` counts attempts "that got an answer
/// about the video"). With `give_up_after` = 300 ms, the row is still pending after many
/// refused attempts spread over more than that.
#[test]
fn an_unreachable_api_host_does_not_fail_the_videos() {
    let port = closed_port();
    let mut run = setup(
        "an_unreachable_api_host_does_not_fail_the_videos",
        0x7e57_000f,
        |s| {
            s.base_url = format!("http://127.0.0.1:{port}");
            s.give_up_after = "300ms";
        },
    );
    run.env.write_config();
    let d = run.env.start();
    run.env.insert(&["video_outage"]);
    let start = Instant::now();
    // Ten refused connections, logged, over more than give_up_after; or the row given up.
    let wait = Instant::now();
    loop {
        let refused = d.log().matches("Connection refused").count();
        if refused >= 10 && start.elapsed() >= Duration::from_millis(600) {
            break;
        }
        if run
            .env
            .row("video_outage")
            .is_some_and(|r| r.state == "failed")
        {
            break;
        }
        assert!(wait.elapsed() < DEADLINE, "no retries:\n{}", d.log());
        std::thread::sleep(Duration::from_millis(10));
    }
    let r = run.env.row("video_outage").unwrap();
    if r.state == "failed" || r.state == "done" {
        run.violation(format!(
            "row is {} after an outage: {:?}",
            r.state, r.last_error
        ));
    }
    run.finish(1, &format!("attempts={}", r.attempts), &["video_outage"]);
}

// ---------------------------------------------------------------------------------------------
// Hostile IDs
// ---------------------------------------------------------------------------------------------

/// The README's rule, written independently of the daemon's: 1-128 of `[A-Za-z0-9_-]`, not
/// starting with `-`, once the ASCII whitespace around it (a producer's newline) is trimmed.
fn valid_id(b: &[u8]) -> bool {
    let b = b.trim_ascii();
    (1..=128).contains(&b.len())
        && b[0] != b'-'
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || *c == b'_' || *c == b'-')
}

/// One hostile id (text or raw bytes) from a family chosen by the generator.
fn hostile_id(rng: &mut fastrand::Rng, marker: &str) -> Vec<u8> {
    const LOOKALIKES: &[&str] = &[
        "\u{ff0f}", // fullwidth solidus
        "\u{2024}", // one dot leader
        "\u{2025}", // two dot leader
        "\u{2215}", // division slash
        "\u{2044}", // fraction slash
        "\u{29f8}", // big solidus
        "\u{ff3c}", // fullwidth reverse solidus
        "\u{0430}", // Cyrillic a
        "\u{0435}", // Cyrillic e
        "\u{043e}", // Cyrillic o
        "\u{0440}", // Cyrillic er
        "\u{0441}", // Cyrillic es
        "\u{0456}", // Cyrillic i
        "\u{200b}", // zero width space
        "\u{202e}", // right-to-left override
        "\u{0301}", // combining acute
        "\u{ff56}", // fullwidth v
        "\u{00a0}", // no-break space
    ];
    const BITS: &[&str] = &[
        "..", "/", "\\", "\0", ".", "%2e", "%2f", "%2F", "%5c", "%00", "%252e", "..%2f", "~", " ",
        "\n", "\r", "\t", "\x1b[31m", "\x7f", "'", "\"", ";", "$(id)", "`id`", "*", "?", ":", "@",
        "#", "&", "=", "+", ",", "|", "<", ">",
    ];
    let base = format!("video_{:x}", rng.u64(..));
    let family = rng.u8(0..10);
    let s: Vec<u8> = match family {
        // Traversal towards a marker name, relative and absolute.
        0 => {
            let up = "../".repeat(rng.usize(1..8));
            let tail = ["", ".mp4", "/", "/x"][rng.usize(0..4)];
            match rng.u8(0..4) {
                0 => format!("{up}{marker}{tail}"),
                1 => format!("/tmp/{marker}{tail}"),
                2 => format!("..\\..\\{marker}"),
                _ => format!("{base}/../../{marker}"),
            }
            .into_bytes()
        }
        // Separators and dots alone or around a valid id.
        1 => [
            "..",
            ".",
            "/",
            "\\",
            "./",
            "../",
            "/..",
            "a/b",
            "a\\b",
            ".hidden",
            "x.mp4",
            "x.mp4.part",
        ][rng.usize(0..12)]
        .replace('x', &base)
        .into_bytes(),
        // NUL and control characters inside a valid-looking id.
        2 => {
            let mut b = base.clone().into_bytes();
            let c = match rng.u8(0..3) {
                0 => 0,
                1 => rng.u8(1..0x20),
                _ => 0x7f,
            };
            // ASCII whitespace around an id is trimmed (a producer's newline): inside it, not.
            let at = if c.is_ascii_whitespace() {
                rng.usize(1..b.len())
            } else {
                rng.usize(0..=b.len())
            };
            b.insert(at, c);
            b
        }
        // Unicode look-alikes of '/', '.', and of Latin letters.
        3 => {
            let mut s = base.clone();
            let at = rng.usize(0..=s.len());
            s.insert_str(at, LOOKALIKES[rng.usize(0..LOOKALIKES.len())]);
            if rng.bool() {
                s = format!("..{}{marker}", LOOKALIKES[rng.usize(0..7)]);
            }
            s.into_bytes()
        }
        // Very long: just over the limit, or far over it, possibly with traversal.
        4 => {
            let n = if rng.bool() {
                129
            } else {
                rng.usize(130..5000)
            };
            let mut s: String = std::iter::repeat_with(|| {
                char::from(b"abcdefghijklmnopqrstuvwxyz0123456789_-"[rng.usize(0..38)])
            })
            .take(n)
            .collect();
            s.replace_range(0..1, "v");
            if rng.bool() {
                s.push_str("/../..");
            }
            s.into_bytes()
        }
        // Percent-encoded (once or twice) traversal and separators.
        5 => [
            "%2e%2e%2f",
            "%2E%2E/",
            "%2f",
            "%5C",
            "%00",
            "%252e%252e%252f",
            "video%5fabc",
            "%c0%af",
        ][rng.usize(0..8)]
        .repeat(rng.usize(1..4))
        .into_bytes(),
        // Leading '-': options to a shell tool.
        6 => ["-", "-rf", "--help", "-x", "--", "-video_1"][rng.usize(0..6)]
            .replace("_1", &base[5..])
            .into_bytes(),
        // Empty-ish: nothing, blanks, invisible characters, padding around a valid id.
        7 => ["", " ", "  ", "\t", "\u{3000}", "\u{feff}", "\u{00a0}"][rng.usize(0..7)]
            .to_owned()
            .into_bytes(),
        // Padding that is not ASCII whitespace (which is trimmed), and a blank inside.
        8 => match rng.u8(0..3) {
            0 => format!("\u{3000}{base}"),
            1 => format!("{base}\u{a0}"),
            _ => format!("{} {}", &base[..4], &base[4..]),
        }
        .into_bytes(),
        // Raw bytes: invalid UTF-8, overlong '/' and '.', lone surrogates' encodings.
        _ => {
            let bits: &[&[u8]] = &[
                b"\xff",
                b"\xc0\xaf",
                b"\xc0\xae\xc0\xae",
                b"\xed\xa0\x80",
                b"\xfe",
            ];
            let mut b = base.clone().into_bytes();
            b.extend_from_slice(bits[rng.usize(0..bits.len())]);
            if rng.bool() {
                b.extend_from_slice(BITS[rng.usize(0..BITS.len())].as_bytes());
            }
            b
        }
    };
    s
}

/// Every path under `dir` (recursively, links not followed), relative to it.
fn tree(dir: &Path) -> BTreeSet<PathBuf> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeSet<PathBuf>) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for e in rd.flatten() {
            let p = e.path();
            out.insert(p.strip_prefix(root).unwrap().to_owned());
            if std::fs::symlink_metadata(&p).is_ok_and(|m| m.is_dir()) {
                walk(root, &p, out);
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(dir, dir, &mut out);
    out
}

/// Names in `dir` (not recursive) that contain `marker`.
fn marked(dir: &Path, marker: &str) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.file_name().to_string_lossy().contains(marker))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

/// 10,000 hostile IDs inserted while the daemon runs, by a producer using parameter binding
/// (so NUL and invalid UTF-8 survive; a share stored as BLOB): each ends `failed` with
/// "invalid video id", none is requested, and no file appears anywhere.
#[test]
fn ten_thousand_hostile_ids_are_failed_without_a_request_or_a_file() {
    support::sqlite_only();
    let n = 10_000;
    let mut run = setup(
        "ten_thousand_hostile_ids_are_failed_without_a_request_or_a_file",
        0x7e57_0010,
        |_| {},
    );
    let mut rng = fastrand::Rng::with_seed(run.seed);
    let marker = format!("hnesc{:x}", run.seed);
    let mut ids: BTreeSet<(bool, Vec<u8>)> = BTreeSet::new();
    let mut families_blob = 0;
    while ids.len() < n {
        let id = hostile_id(&mut rng, &marker);
        assert!(!valid_id(&id), "the generator made a valid id: {id:?}");
        // Text needs valid UTF-8; everything else, and a tenth of the rest, goes in as BLOB.
        let blob = std::str::from_utf8(&id).is_err() || rng.u8(0..10) == 0;
        if ids.insert((blob, id)) && blob {
            families_blob += 1;
        }
    }
    let sentinel = run.api.add_video("video_sentinel", 4096);
    let before = tree(run.env.dir.path());
    let above: Vec<PathBuf> = [
        run.env.dir.path().to_owned(),
        run.env.dir.path().parent().unwrap().to_owned(),
        PathBuf::from("/"),
        PathBuf::from("/tmp"),
    ]
    .into();
    let _d = run.env.start();
    let started = Instant::now();
    let all: Vec<(bool, &[u8])> = ids.iter().map(|(b, id)| (*b, id.as_slice())).collect();
    sqlite::insert_raw(&run.env, &all);
    run.env.insert(&["video_sentinel"]);
    let inserted = count_where(&run.env, "video_id != 'video_sentinel'");
    if inserted != n as i64 {
        run.violation(format!(
            "{inserted} hostile rows in the queue, {n} inserted"
        ));
    }
    wait_all(
        &run.env,
        "every row done or failed",
        // About 30 s on 2 busy cores; the margin is for a loaded CI machine.
        Duration::from_secs(300),
        "state IN ('done', 'failed')",
    );
    let settled = started.elapsed();
    let wrong = count_where(
        &run.env,
        "video_id != 'video_sentinel' AND NOT (state = 'failed' AND last_error = 'invalid video id' \
         AND path IS NULL AND sha256 IS NULL)",
    );
    if wrong > 0 {
        let sample: Vec<_> = run
            .env
            .rows()
            .into_iter()
            .filter(|r| {
                r.id != "video_sentinel"
                    && (r.state != "failed" || r.last_error.as_deref() != Some("invalid video id"))
            })
            .take(10)
            .collect();
        run.violation(format!(
            "{wrong} hostile rows not failed as invalid: {sample:?}"
        ));
    }
    if run.env.row("video_sentinel").map(|r| r.state) != Some("done".into()) {
        run.violation("the sentinel video was not archived".into());
    }
    let stray: Vec<Request> = run
        .api
        .requests()
        .into_iter()
        .filter(|r| r.video_id().as_deref() != Some(sentinel.id.as_str()))
        .collect();
    if !stray.is_empty() {
        run.violation(format!(
            "{} requests for hostile ids: {:?}",
            stray.len(),
            &stray[..stray.len().min(5)]
        ));
    }
    // Files: the scratch dir gained only what a run always makes; the archive holds only the
    // sentinel; nothing named after the marker exists above the archive.
    let after = tree(run.env.dir.path());
    let expected_new: BTreeSet<PathBuf> = [
        "daemon.log",
        "videos",
        "videos/video_sentinel.mp4",
        "videos/video_sentinel.json",
        "state/queue.db-wal",
        "state/queue.db-shm",
        "state/queue.db.lock",
        // A bucket archive's staging directory (empty again once the sentinel is uploaded).
        "state/staging",
    ]
    .iter()
    .map(PathBuf::from)
    .collect();
    let new: Vec<&PathBuf> = after
        .difference(&before)
        .filter(|p| !expected_new.contains(*p))
        .collect();
    if !new.is_empty() {
        run.violation(format!("new files in the scratch dir: {new:?}"));
    }
    // Log forging: an id with a newline or an escape sequence must not start a line of its own
    // or reach a terminal raw. Every line of the log is one event, opening with its timestamp.
    let log = std::fs::read(run.env.dir.path().join("daemon.log")).unwrap();
    let forged = String::from_utf8_lossy(&log)
        .lines()
        .filter(|l| {
            !(l.len() > 4
                && l.starts_with("20")
                && l.as_bytes()[..4].iter().all(u8::is_ascii_digit))
        })
        .count();
    let escapes = log.iter().filter(|b| **b == 0x1b).count();
    if forged > 0 || escapes > 0 {
        run.violation(format!(
            "log forging: {forged} log lines that are not events, {escapes} raw ESC bytes"
        ));
    }
    let archive: Vec<String> = run.env.archive_files();
    if archive != ["video_sentinel.json", "video_sentinel.mp4"] {
        run.violation(format!("archive holds {archive:?}"));
    }
    for dir in &above {
        let m = marked(dir, &marker);
        if !m.is_empty() {
            run.violation(format!(
                "files named after the marker in {}: {m:?}",
                dir.display()
            ));
        }
    }
    let figures = format!(
        "blob_ids={families_blob} settled_ms={} hostile_requests={} new_files={}",
        settled.as_millis(),
        stray.len(),
        new.len()
    );
    run.finish(n, &figures, &["video_sentinel"]);
}

// ---------------------------------------------------------------------------------------------
// Symlinks planted in the archive
// ---------------------------------------------------------------------------------------------

/// What a planted link points at: a file outside the archive, with content that must never be
/// overwritten, nor read into the archive or onto the network.
struct Outside {
    path: PathBuf,
    bytes: Vec<u8>,
    mtime: std::time::SystemTime,
}

fn outside(env: &Env, name: &str, bytes: Vec<u8>) -> Outside {
    let dir = env.dir.path().join("outside");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, &bytes).unwrap();
    let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
    Outside { path, bytes, mtime }
}

impl Outside {
    /// Breaches: the target changed, or its content turned up in the archive or a request.
    fn check(&self, env: &Env, api: &StandIn) -> Vec<String> {
        let mut bad = Vec::new();
        let now = std::fs::read(&self.path).unwrap_or_default();
        let mtime = std::fs::metadata(&self.path)
            .and_then(|m| m.modified())
            .ok();
        if now != self.bytes || mtime != Some(self.mtime) {
            bad.push(format!(
                "{} was written through a link",
                self.path.display()
            ));
        }
        let sha = sha256_hex(&self.bytes);
        for r in env.rows() {
            if r.sha256.as_deref() == Some(sha.as_str()) {
                bad.push(format!("{}: archived the link's target", r.id));
            }
        }
        let text = String::from_utf8_lossy(&self.bytes).into_owned();
        let first_line = text.lines().next().unwrap_or_default().to_owned();
        for r in api.requests() {
            let sent = format!("{:?} {:?} {:?}", r.range, r.if_range, r.query);
            if !first_line.is_empty() && sent.contains(&first_line) {
                bad.push(format!("the link's target was sent to the server: {r}"));
            }
        }
        bad
    }
}

/// Links planted at a video's final path, partial path and validator sidecar, pointing outside
/// the archive. The target is never written, never archived and never sent anywhere; a `done`
/// row always names a regular file with the right bytes. (Whether the link is replaced and the
/// video archived, or the video waits with a clear error, is reported in the FAULTS line; the
/// test `planted_links_are_replaced_and_the_video_archived` asks for the former.)
#[test]
fn symlinks_planted_in_the_archive_are_never_followed() {
    let mut run = setup(
        "symlinks_planted_in_the_archive_are_never_followed",
        0x7e57_0011,
        |_| {},
    );
    std::fs::create_dir_all(&run.env.archive).unwrap();
    let mut targets = Vec::new();
    let mut ids = Vec::new();
    let plant = |run: &Run, id: &str, name: String, target: &Outside| {
        std::os::unix::fs::symlink(&target.path, run.env.archive.join(name)).unwrap();
        let _ = id;
    };
    // Final path: points at a valid MP4 outside (which `existing` would otherwise take).
    let t = outside(&run.env, "final.mp4", video_content("outside-final", 4096));
    run.api.add_video("video_link_final", 50_000);
    plant(&run, "video_link_final", "video_link_final.mp4".into(), &t);
    targets.push(t);
    // Partial path: a file the daemon would append to.
    let t = outside(
        &run.env,
        "partial",
        b"OUTSIDE-PARTIAL-do-not-touch\n".to_vec(),
    );
    run.api.add_video("video_link_partial", 50_000);
    plant(
        &run,
        "video_link_partial",
        ".video_link_partial.mp4.part".into(),
        &t,
    );
    targets.push(t);
    // Validator with no partial: must not be read, nor written through.
    let t = outside(
        &run.env,
        "validator",
        b"OUTSIDE-VALIDATOR-do-not-touch".to_vec(),
    );
    run.api.add_video("video_link_validator", 50_000);
    plant(
        &run,
        "video_link_validator",
        ".video_link_validator.mp4.part.validator".into(),
        &t,
    );
    targets.push(t);
    ids.extend([
        "video_link_final",
        "video_link_partial",
        "video_link_validator",
    ]);

    let _d = run.env.start();
    run.env.insert(&ids);
    // Each either archived, or held back with an error that names the link's path.
    for id in &ids {
        run.env
            .wait_row(id, "done, or an error about the link", |r| {
                r.state == "done"
                    || r.last_error
                        .as_deref()
                        .is_some_and(|e| e.contains(&format!("{id}.mp4")))
            });
    }
    let mut outcomes = Vec::new();
    for id in &ids {
        let r = run.env.row(id).unwrap();
        outcomes.push(format!(
            "{id}={}",
            if r.state == "done" {
                "archived".to_owned()
            } else {
                format!("{}:{:?}", r.state, r.last_error.unwrap_or_default())
            }
        ));
        if r.state == "failed" {
            run.violation(format!("{id}: failed for good over a planted link"));
        }
    }
    for t in &targets {
        for b in t.check(&run.env, &run.api) {
            run.violation(b);
        }
    }
    println!("outcomes: {}", outcomes.join("; "));
    let archived = outcomes.iter().filter(|o| o.ends_with("=archived")).count();
    run.finish(
        ids.len(),
        &format!(
            "archived={archived} held_with_error={}",
            ids.len() - archived
        ),
        &ids,
    );
}

/// The stricter half of the decision: a link at a name that is the daemon's own (the partial,
/// its validator) or that a finished download replaces by rename (the final path) is removed or
/// replaced without touching its target, and the video is archived: refusing would lose the
/// video when its CDN link expires, and `rename`/`unlink` never follow a link.
#[test]
fn planted_links_are_replaced_and_the_video_archived() {
    // About the archive as a directory (its files, paths and disk).
    if support::local_only() {
        return;
    }
    let mut run = setup(
        "planted_links_are_replaced_and_the_video_archived",
        0x7e57_0012,
        |_| {},
    );
    std::fs::create_dir_all(&run.env.archive).unwrap();
    let mut targets = Vec::new();
    let t = outside(&run.env, "final.mp4", video_content("outside-final", 4096));
    let vf = run.api.add_video("video_link_final", 50_000);
    std::os::unix::fs::symlink(&t.path, run.env.final_path(&vf.id)).unwrap();
    targets.push(t);
    let t = outside(
        &run.env,
        "partial",
        b"OUTSIDE-PARTIAL-do-not-touch\n".to_vec(),
    );
    let vp = run.api.add_video("video_link_partial", 50_000);
    std::os::unix::fs::symlink(&t.path, run.env.partial_path(&vp.id)).unwrap();
    targets.push(t);
    // A real partial (the video's first bytes) with its validator sidecar linked outside.
    let t = outside(
        &run.env,
        "validator",
        b"OUTSIDE-VALIDATOR-do-not-touch".to_vec(),
    );
    let vv = run.api.add_video("video_link_validator", 50_000);
    std::fs::write(run.env.partial_path(&vv.id), &vv.bytes[..10_000]).unwrap();
    std::os::unix::fs::symlink(
        &t.path,
        run.env
            .archive
            .join(format!(".{}.mp4.part.validator", vv.id)),
    )
    .unwrap();
    targets.push(t);
    let ids = [vf.id.as_str(), vp.id.as_str(), vv.id.as_str()];
    let _d = run.env.start();
    run.env.insert(&ids);
    for id in ids {
        let r = run
            .env
            .wait_row(id, "done, or an error about the link", |r| {
                r.state == "done"
                    || r.last_error
                        .as_deref()
                        .is_some_and(|e| e.contains(&format!("{id}.mp4")))
            });
        if r.state != "done" {
            run.violation(format!("{id}: {} with {:?}", r.state, r.last_error));
        }
    }
    for t in &targets {
        for b in t.check(&run.env, &run.api) {
            run.violation(b);
        }
    }
    run.finish(ids.len(), "", &ids);
}

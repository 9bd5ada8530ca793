//! Every statement the PostgreSQL queue runs, and the migrations. Each of the daemon's is one
//! statement (an outcome and its attempt-log entry in one, through data-modifying CTEs), so it
//! is atomic without a transaction and pipelines on the shared connection. Every instant comes
//! from the server's `now()`, never from a host's clock.

use std::time::Duration;

use tokio_postgres::{Client, Row};

use crate::queue::{
    Claimant, Claimed, Counts, EXPIRING_SOON, FailureRow, FileRecord, Finish, LogEntry, MAX_DELAY,
    Oldest, RowId, RowView, State, Status,
};

type PgResult<T> = Result<T, tokio_postgres::Error>;

/// The migrations, in order; `hingnetd_schema.version` records how many have been applied.
/// Append only: a shipped migration is never edited.
pub(super) const MIGRATIONS: &[(&str, &str)] = &[(
    "0001_queue.sql",
    include_str!("../../../migrations/postgres/0001_queue.sql"),
)];

/// The advisory-lock class hingnetd's locks use ("hing"): migrations take (class, 0) for their
/// transaction, and each daemon holds (class, hashtext(instance)) while it runs.
pub(super) const LOCK_CLASS: i32 = 0x6869_6e67;

/// The channel the row trigger (`migrations/postgres/`) notifies, and the daemons listen on.
pub(super) const CHANNEL: &str = "hingnetd_queue";

/// Attempt-log entries kept per video.
const LOG_KEEP: i64 = 20;

/// A timestamp in the text format every `RowView` field uses (as SQLite's columns hold it).
macro_rules! ts {
    ($c:literal) => {
        concat!(
            "to_char(",
            $c,
            " AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')"
        )
    };
}

/// The columns `row_view` reads, in order; the last says whether the row is due.
const ROW_COLUMNS: &str = concat!(
    "video_id, state, attempts, ",
    ts!("next_attempt_at"),
    ", last_error, http_status, path, sha256, bytes, ",
    ts!("enqueued_at"),
    ", ",
    ts!("first_attempt_at"),
    ", ",
    ts!("finished_at"),
    ", ",
    ts!("expires_at"),
    ", metadata, next_attempt_at <= now(), archived_on"
);

/// What a claim returns, in the order `claimed` reads it.
const CLAIMED_COLUMNS: &str = "q.video_id, q.attempts, \
     (extract(epoch FROM now() - q.first_attempt_at) * 1000)::float8, \
     extract(epoch FROM q.expires_at)::int8";

fn secs(d: Duration) -> f64 {
    d.min(MAX_DELAY).as_secs_f64()
}

fn claimed(r: &Row, token: &str) -> Claimed {
    let id: String = r.get(0);
    let ms: Option<f64> = r.get(2);
    Claimed {
        row: RowId(id.as_bytes().to_vec()),
        video_id: id,
        token: token.to_owned(),
        attempts: r.get::<_, i32>(1).max(0) as u32,
        since_first_attempt: Duration::from_millis(ms.unwrap_or(0.0).max(0.0) as u64),
        expires_at: r.get(3),
    }
}

fn row_view(r: &Row, i: usize) -> RowView {
    let state: String = r.get(i + 1);
    RowView {
        video_id: r.get(i),
        // The schema's CHECK allows no other word.
        state: State::parse(&state).unwrap_or(State::Pending),
        attempts: r.get::<_, i32>(i + 2).into(),
        next_attempt_at: r.get(i + 3),
        last_error: r.get(i + 4),
        http_status: r.get::<_, Option<i32>>(i + 5).map(i64::from),
        path: r.get(i + 6),
        sha256: r.get(i + 7),
        bytes: r.get(i + 8),
        enqueued_at: r.get(i + 9),
        first_attempt_at: r.get(i + 10),
        finished_at: r.get(i + 11),
        expires_at: r.get(i + 12),
        metadata: r.get(i + 13),
        due: r.get(i + 14),
        archived_on: r.get(i + 15),
    }
}

/// The schema version, 0 for a database never migrated.
pub(super) async fn schema_version(c: &Client) -> PgResult<i64> {
    let exists: bool = c
        .query_one("SELECT to_regclass('hingnetd_schema') IS NOT NULL", &[])
        .await?
        .get(0);
    if !exists {
        return Ok(0);
    }
    let v: Option<i32> = c
        .query_opt("SELECT max(version) FROM hingnetd_schema", &[])
        .await?
        .and_then(|r| r.get(0));
    Ok(v.unwrap_or(0).into())
}

/// Applies the migrations not yet applied, all in one transaction under an advisory lock, so
/// that daemons starting together migrate once and a failure leaves the schema as it was.
/// Returns the names applied.
pub(super) async fn migrate(c: &mut Client) -> PgResult<Vec<&'static str>> {
    let tx = c.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1, 0)", &[&LOCK_CLASS])
        .await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS hingnetd_schema (version integer NOT NULL); \
         INSERT INTO hingnetd_schema (version) SELECT 0 WHERE NOT EXISTS (SELECT 1 FROM hingnetd_schema)",
    )
    .await?;
    let v: i32 = tx
        .query_one("SELECT max(version) FROM hingnetd_schema", &[])
        .await?
        .get(0);
    let mut applied = Vec::new();
    for (i, &(name, text)) in MIGRATIONS.iter().enumerate().skip(v.max(0) as usize) {
        tx.batch_execute(text).await?;
        tx.execute(
            "UPDATE hingnetd_schema SET version = $1",
            &[&(i as i32 + 1)],
        )
        .await?;
        applied.push(name);
    }
    tx.commit().await?;
    Ok(applied)
}

/// The table privileges the daemon's statements need that its role lacks, as "UPDATE on queue".
pub(super) async fn missing_privileges(c: &Client) -> PgResult<Vec<String>> {
    const NEEDED: &[(&str, &str)] = &[
        ("hingnetd_schema", "SELECT"),
        ("queue", "SELECT"),
        ("queue", "INSERT"),
        ("queue", "UPDATE"),
        ("queue", "DELETE"),
        ("attempt_log", "SELECT"),
        ("attempt_log", "INSERT"),
        ("attempt_log", "DELETE"),
        ("daemon_pauses", "SELECT"),
        ("daemon_pauses", "INSERT"),
        ("daemon_pauses", "UPDATE"),
        ("daemon_pauses", "DELETE"),
    ];
    let mut missing = Vec::new();
    for (table, privilege) in NEEDED {
        let has: bool = c
            .query_one("SELECT has_table_privilege($1, $2)", &[table, privilege])
            .await?
            .get(0);
        if !has {
            missing.push(format!("{privilege} on {table}"));
        }
    }
    Ok(missing)
}

/// Claims up to `n` due rows, the one that expires first first, skipping rows another daemon
/// is claiming at this moment (`SKIP LOCKED`) and those in `except`.
pub(super) async fn claim(
    c: &Client,
    n: usize,
    except: &[String],
    token: &str,
    instance: &str,
    lease: Duration,
) -> PgResult<Vec<Claimed>> {
    let rows = c
        .query(
            &format!(
                "WITH due AS ( \
                   SELECT video_id FROM queue \
                   WHERE state = 'pending' AND next_attempt_at <= now() \
                     AND video_id <> ALL($3::text[]) \
                   ORDER BY coalesce(expires_at, 'infinity'::timestamptz), next_attempt_at \
                   LIMIT $1 FOR UPDATE SKIP LOCKED), \
                 claimed AS ( \
                   UPDATE queue q SET state = 'downloading', attempts = q.attempts + 1, \
                     first_attempt_at = coalesce(q.first_attempt_at, now()), claimed_by = $2, \
                     claimed_on = $4, lease_expires_at = now() + make_interval(secs => $5) \
                   FROM due WHERE q.video_id = due.video_id \
                   RETURNING {CLAIMED_COLUMNS}, \
                     coalesce(q.expires_at, 'infinity'::timestamptz) AS k1, q.next_attempt_at AS k2) \
                 SELECT * FROM claimed ORDER BY k1, k2"
            ),
            &[&(n as i64), &token, &except, &instance, &lease.as_secs_f64()],
        )
        .await?;
    Ok(rows.iter().map(|r| claimed(r, token)).collect())
}

/// Claims one video for `hingnetd fetch`: inserted if missing, claimed if pending or failed.
/// `Err(state)` when another downloader holds it or it is done.
pub(super) async fn claim_one(
    c: &Client,
    video_id: &str,
    token: &str,
    instance: &str,
    lease: Duration,
) -> PgResult<Result<Claimed, State>> {
    let row = c
        .query_opt(
            &format!(
                "INSERT INTO queue AS q (video_id, state, attempts, first_attempt_at, claimed_by, \
                   claimed_on, lease_expires_at) \
                 VALUES ($1, 'downloading', 1, now(), $2, $3, now() + make_interval(secs => $4)) \
                 ON CONFLICT (video_id) DO UPDATE SET state = 'downloading', \
                   attempts = q.attempts + 1, first_attempt_at = coalesce(q.first_attempt_at, now()), \
                   claimed_by = $2, claimed_on = $3, lease_expires_at = now() + make_interval(secs => $4) \
                 WHERE q.state IN ('pending', 'failed') \
                 RETURNING {CLAIMED_COLUMNS}"
            ),
            &[&video_id, &token, &instance, &lease.as_secs_f64()],
        )
        .await?;
    if let Some(r) = row {
        return Ok(Ok(claimed(&r, token)));
    }
    let state: String = c
        .query_one("SELECT state FROM queue WHERE video_id = $1", &[&video_id])
        .await?
        .get(0);
    Ok(Err(State::parse(&state).unwrap_or(State::Downloading)))
}

/// Renews the leases of the claims this process still holds: `(tokens[i], videos[i])` pairs,
/// not whole tokens (one claim's rows share a token, and a row whose outcome could not be
/// recorded is no longer kept alive while its batch-mates download on). Returns the rows
/// renewed.
pub(super) async fn renew(
    c: &Client,
    (tokens, videos): &(Vec<String>, Vec<String>),
    lease: Duration,
) -> PgResult<u64> {
    c.execute(
        "UPDATE queue q SET lease_expires_at = now() + make_interval(secs => $3) \
         FROM unnest($1::text[], $2::text[]) AS held(token, video) \
         WHERE q.state = 'downloading' AND q.claimed_by = held.token \
           AND q.video_id = held.video",
        &[tokens, videos, &lease.as_secs_f64()],
    )
    .await
}

/// Puts back to pending every `downloading` row whose lease has passed, and every row a
/// predecessor of this daemon claimed (`instance`: only the daemon holding the instance's lock
/// can say its predecessor is gone), except those held by the claims `ours` (this process is
/// still downloading them: its heartbeat renews them once it reaches the database again,
/// unless another daemon has taken them meanwhile).
pub(super) async fn release_expired(
    c: &Client,
    (tokens, videos): &(Vec<String>, Vec<String>),
    instance: Option<&str>,
) -> PgResult<Vec<String>> {
    let rows = c
        .query(
            "UPDATE queue SET state = 'pending', next_attempt_at = now(), claimed_by = NULL, \
               claimed_on = NULL, lease_expires_at = NULL, \
               last_error = coalesce(last_error, 'interrupted: its claim''s lease passed (its downloader stopped or lost the database)') \
             WHERE state = 'downloading' \
               AND (lease_expires_at IS NULL OR lease_expires_at < now() OR claimed_on = $2) \
               AND NOT EXISTS (SELECT 1 FROM unnest($1::text[], $3::text[]) AS held(token, video) \
                               WHERE held.token = claimed_by AND held.video = video_id) \
             RETURNING video_id",
            &[tokens, &instance, videos],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// An update of one row (named `u` in a CTE, returning `video_id`) together with its
/// attempt-log entry and the log's trimming, as one statement. The entry's values are $1 to $8
/// (video, attempt, outcome, status, bytes, elapsed, detail, instance); the update's own from $9.
fn logged(update: &str) -> String {
    format!(
        "WITH u AS ({update} RETURNING video_id), \
         l AS (INSERT INTO attempt_log (video_id, attempt, outcome, http_status, bytes, \
                 elapsed_ms, detail, instance) \
               SELECT video_id, $2, $3, $4, $5, $6, $7, $8 FROM u), \
         t AS (DELETE FROM attempt_log WHERE video_id = $1 AND EXISTS (SELECT 1 FROM u) \
               AND id <= (SELECT id FROM attempt_log WHERE video_id = $1 \
                          ORDER BY id DESC OFFSET {} LIMIT 1)) \
         SELECT count(*) FROM u",
        LOG_KEEP - 1
    )
}

/// Records a claimed video's outcome, only while `claimed`'s token still holds the row (the
/// fence); returns whether it did.
pub(super) async fn finish(
    c: &Client,
    claimed: &Claimed,
    finish: &Finish,
    elapsed: Duration,
    expires_at: Option<i64>,
    instance: &str,
) -> PgResult<bool> {
    const OURS: &str = "claimed_by = NULL, claimed_on = NULL, lease_expires_at = NULL, \
         expires_at = coalesce(to_timestamp($10::float8), expires_at) \
         WHERE video_id = $1 AND state = 'downloading' AND claimed_by = $9";
    let (outcome, status, bytes) = finish.log_fields();
    let status = status.map(i32::from);
    let bytes = bytes.map(|b| b as i64);
    let attempt = claimed.attempts as i32;
    let elapsed_ms = elapsed.as_millis() as i64;
    let detail = finish.describe();
    // An expiry past year 9999 is nonsense from the API (and past 294276, more than a
    // timestamp holds): ignored, as SQLite's strftime ignores it (NULL).
    let exp = expires_at
        .filter(|e| (0..=253_402_300_799).contains(e))
        .map(|e| e as f64);
    let id = claimed.video_id.as_str();
    let token = claimed.token.as_str();
    let file = |f: &FileRecord| {
        (
            f.path.clone(),
            f.sha256.clone(),
            f.bytes as i64,
            f.metadata.clone(),
        )
    };
    let n: i64 = match finish {
        Finish::Done { file: f, .. }
        | Finish::Failed {
            kept: Some(f), ..
        } => {
            let (path, sha, fbytes, meta) = file(f);
            let (state, error) = match finish {
                Finish::Failed { error, .. } => ("failed", Some(error.as_str())),
                _ => ("done", None),
            };
            c.query_one(
                &logged(&format!(
                    "UPDATE queue SET state = $11, path = $12, sha256 = $13, bytes = $14, \
                     metadata = $15, http_status = $4, last_error = $16, finished_at = now(), \
                     archived_on = $8, {OURS}"
                )),
                &[
                    &id, &attempt, &outcome, &status, &bytes, &elapsed_ms, &detail, &instance,
                    &token, &exp, &state, &path, &sha, &fbytes, &meta, &error,
                ],
            )
            .await?
            .get(0)
        }
        Finish::Retry { delay, error, .. } => {
            c.query_one(
                &logged(&format!(
                    "UPDATE queue SET state = 'pending', last_error = $11, http_status = $4, \
                     next_attempt_at = now() + make_interval(secs => $12), {OURS}"
                )),
                &[
                    &id, &attempt, &outcome, &status, &bytes, &elapsed_ms, &detail, &instance,
                    &token, &exp, error, &secs(*delay),
                ],
            )
            .await?
            .get(0)
        }
        // The attempt did not count: take it back, and restart the give-up clock if it was
        // the video's first.
        Finish::Release { delay, error } => {
            c.query_one(
                &logged(&format!(
                    "UPDATE queue SET state = 'pending', last_error = coalesce($11, last_error), \
                     next_attempt_at = now() + make_interval(secs => $12), \
                     attempts = greatest(attempts - 1, 0), \
                     first_attempt_at = CASE WHEN attempts <= 1 THEN NULL ELSE first_attempt_at END, \
                     {OURS}"
                )),
                &[
                    &id, &attempt, &outcome, &status, &bytes, &elapsed_ms, &detail, &instance,
                    &token, &exp, error, &secs(*delay),
                ],
            )
            .await?
            .get(0)
        }
        Finish::Failed {
            error, kept: None, ..
        } => {
            c.query_one(
                &logged(&format!(
                    "UPDATE queue SET state = 'failed', last_error = $11, http_status = $4, \
                     finished_at = now(), {OURS}"
                )),
                &[
                    &id, &attempt, &outcome, &status, &bytes, &elapsed_ms, &detail, &instance,
                    &token, &exp, error,
                ],
            )
            .await?
            .get(0)
        }
    };
    Ok(n == 1)
}

/// Puts a claimed row back to pending after `delay`, fenced like an outcome: for a claim whose
/// outcome the database refused (the attempt's work is kept where it is: a published file is
/// found again by the next attempt).
pub(super) async fn give_back(
    c: &Client,
    claimed: &Claimed,
    delay: Duration,
    why: &str,
) -> PgResult<bool> {
    Ok(c.execute(
        "UPDATE queue SET state = 'pending', claimed_by = NULL, claimed_on = NULL, \
               lease_expires_at = NULL, last_error = $3, \
               next_attempt_at = now() + make_interval(secs => $4) \
             WHERE video_id = $1 AND state = 'downloading' AND claimed_by = $2",
        &[&claimed.video_id, &claimed.token, &why, &secs(delay)],
    )
    .await?
        == 1)
}

/// Fails a row a claim gave back to pending, only while it is still pending.
pub(super) async fn fail_released(
    c: &Client,
    claimed: &Claimed,
    error: &str,
    http_status: Option<u16>,
    instance: &str,
) -> PgResult<bool> {
    let failed = Finish::Failed {
        error: error.to_owned(),
        http_status,
        kept: None,
    };
    let n: i64 = c
        .query_one(
            // Only while no daemon has tried it since it was given back: the release took its
            // attempt back, so a newer attempt shows in the count.
            &logged(
                "UPDATE queue SET state = 'failed', last_error = $9, http_status = $4, \
                 finished_at = now() WHERE video_id = $1 AND state = 'pending' \
                 AND attempts = greatest($2 - 1, 0)",
            ),
            &[
                &claimed.video_id,
                &(claimed.attempts as i32),
                &"failed",
                &http_status.map(i32::from),
                &None::<i64>,
                &0i64,
                &failed.describe(),
                &instance,
                &error,
            ],
        )
        .await?
        .get(0);
    Ok(n == 1)
}

pub(super) async fn next_due_in(c: &Client) -> PgResult<Option<Duration>> {
    let ms: Option<f64> = c
        .query_one(
            "SELECT (extract(epoch FROM min(next_attempt_at) - now()) * 1000)::float8 \
             FROM queue WHERE state = 'pending'",
            &[],
        )
        .await?
        .get(0);
    Ok(ms.map(|ms| Duration::from_millis(ms.max(0.0).ceil() as u64)))
}

pub(super) async fn counts(c: &Client) -> PgResult<Counts> {
    let mut s = Counts::default();
    for r in c
        .query(
            "SELECT state, count(*), coalesce(sum(bytes), 0)::int8 FROM queue GROUP BY state",
            &[],
        )
        .await?
    {
        let (state, n, bytes): (String, i64, i64) = (r.get(0), r.get(1), r.get(2));
        let n = n as u64;
        match state.as_str() {
            "pending" => s.pending = n,
            "downloading" => s.downloading = n,
            "done" => (s.done, s.archived_bytes) = (n, bytes as u64),
            "failed" => s.failed = n,
            _ => {}
        }
    }
    Ok(s)
}

/// Replaces this instance's published pauses with `pauses`, in one statement.
pub(super) async fn set_pauses(
    c: &Client,
    instance: &str,
    pauses: &[crate::pause::Record],
) -> PgResult<()> {
    let reasons: Vec<&str> = pauses.iter().map(|p| p.reason.as_str()).collect();
    let details: Vec<&str> = pauses.iter().map(|p| p.detail.as_str()).collect();
    let since: Vec<f64> = pauses.iter().map(|p| p.since_ago.as_secs_f64()).collect();
    let until: Vec<Option<f64>> = pauses.iter().map(|p| p.until_in.map(secs)).collect();
    let advice: Vec<Option<&str>> = pauses.iter().map(|p| p.advice.as_deref()).collect();
    c.execute(
        "WITH gone AS (DELETE FROM daemon_pauses WHERE instance = $1 AND reason <> ALL($2::text[])) \
         INSERT INTO daemon_pauses (instance, reason, detail, since, until, advice) \
         SELECT $1, r, d, now() - make_interval(secs => s), \
                CASE WHEN u IS NULL THEN NULL ELSE now() + make_interval(secs => u) END, a \
         FROM unnest($2::text[], $3::text[], $4::float8[], $5::float8[], $6::text[]) AS x(r, d, s, u, a) \
         ON CONFLICT (instance, reason) DO UPDATE SET detail = excluded.detail, \
           since = excluded.since, until = excluded.until, advice = excluded.advice",
        &[&instance, &reasons, &details, &since, &until, &advice],
    )
    .await?;
    Ok(())
}

pub(super) async fn pauses(c: &Client, instance: &str) -> PgResult<Vec<crate::pause::Published>> {
    let rows = c
        .query(
            concat!(
                "SELECT reason, detail, ",
                ts!("since"),
                ", ",
                ts!("until"),
                ", advice FROM daemon_pauses WHERE instance = $1"
            ),
            &[&instance],
        )
        .await?;
    let mut out: Vec<crate::pause::Published> = rows
        .iter()
        .filter_map(|r| {
            // A reason this version does not know (a newer one wrote it) is skipped.
            let reason = crate::pause::Reason::parse(r.get(0))?;
            Some(crate::pause::Published {
                reason,
                detail: r.get(1),
                since: r.get(2),
                until: r.get(3),
                advice: r.get(4),
            })
        })
        .collect();
    out.sort_by_key(|p| p.reason);
    Ok(out)
}

/// Whether a daemon named `instance` holds its lock now (on any host).
pub(super) async fn daemon_running(c: &Client, instance: &str) -> PgResult<bool> {
    Ok(c.query_one(
        "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted \
               AND classid = $1::int4::oid AND objid = hashtext($2)::oid AND objsubid = 2)",
        &[&LOCK_CLASS, &instance],
    )
    .await?
    .get(0))
}

/// Takes this daemon's lock for `instance` on the connection `c` (held until it closes).
pub(super) async fn lock_instance(c: &Client, instance: &str) -> PgResult<bool> {
    Ok(c.query_one(
        "SELECT pg_try_advisory_lock($1, hashtext($2))",
        &[&LOCK_CLASS, &instance],
    )
    .await?
    .get(0))
}

pub(super) async fn enqueue(c: &Client, ids: &[String]) -> PgResult<usize> {
    Ok(c.query(
        // In sorted order: two batches that overlap, each in its own order, would
        // deadlock on each other's rows.
        "INSERT INTO queue (video_id) SELECT v FROM unnest($1::text[]) AS t(v) ORDER BY v \
             ON CONFLICT DO NOTHING RETURNING 1",
        &[&ids],
    )
    .await?
    .len())
}

pub(super) async fn retry_failed(c: &Client, ids: Option<&[String]>) -> PgResult<Vec<String>> {
    let ids = ids.map(<[String]>::to_vec);
    let rows = c
        .query(
            "UPDATE queue SET state = 'pending', next_attempt_at = now(), attempts = 0, \
               first_attempt_at = NULL, finished_at = NULL \
             WHERE state = 'failed' AND ($1::text[] IS NULL OR video_id = ANY($1::text[])) \
             RETURNING video_id",
            &[&ids],
        )
        .await?;
    if !rows.is_empty() {
        wake_daemons(c).await?;
    }
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Tells the daemons that rows are due: the row trigger notifies inserts only, and an
/// operator's command that makes rows pending again should not wait for the poll. In a
/// transaction, delivered when it commits.
pub(super) async fn wake_daemons(c: &impl tokio_postgres::GenericClient) -> PgResult<()> {
    c.execute("SELECT pg_notify($1, '')", &[&CHANNEL])
        .await
        .map(drop)
}

pub(super) async fn status(c: &Client, failures: usize) -> PgResult<Status> {
    let mut s = Status {
        counts: counts(c).await?,
        ..Status::default()
    };
    let r = c
        .query_one(
            "SELECT count(*) FILTER (WHERE e > now()), count(*) FILTER (WHERE e <= now()) \
             FROM (SELECT coalesce(expires_at, 'infinity'::timestamptz) AS e FROM queue \
                   WHERE state = 'pending') p \
             WHERE e <= now() + make_interval(secs => $1)",
            &[&EXPIRING_SOON.as_secs_f64()],
        )
        .await?;
    (s.expiring_soon, s.expired_pending) = (r.get::<_, i64>(0) as u64, r.get::<_, i64>(1) as u64);
    s.oldest_pending = c
        .query_opt(
            concat!(
                "SELECT video_id, ",
                ts!("enqueued_at"),
                ", (extract(epoch FROM now() - enqueued_at) * 1000)::float8 \
                 FROM queue WHERE state = 'pending' ORDER BY enqueued_at LIMIT 1"
            ),
            &[],
        )
        .await?
        .map(|r| Oldest {
            video_id: r.get(0),
            enqueued_at: r.get(1),
            age: r
                .get::<_, Option<f64>>(2)
                .filter(|ms| *ms >= 0.0)
                .map(|ms| Duration::from_millis(ms as u64)),
        });
    s.next_due_in = next_due_in(c).await?;
    s.recent_failures = c
        .query(
            concat!(
                "SELECT video_id, ",
                ts!("finished_at"),
                ", http_status, last_error FROM queue WHERE state = 'failed' \
                 ORDER BY finished_at DESC NULLS LAST LIMIT $1"
            ),
            &[&(failures as i64)],
        )
        .await?
        .iter()
        .map(|r| FailureRow {
            video_id: r.get(0),
            finished_at: r.get(1),
            http_status: r.get::<_, Option<i32>>(2).map(|s| s as u16),
            last_error: r.get(3),
        })
        .collect();
    s.claimants = c
        .query(
            "SELECT coalesce(claimed_on, '(unknown)'), count(*) FROM queue \
             WHERE state = 'downloading' GROUP BY 1 ORDER BY 1",
            &[],
        )
        .await?
        .iter()
        .map(|r| Claimant {
            instance: r.get(0),
            claims: r.get::<_, i64>(1) as u64,
        })
        .collect();
    Ok(s)
}

pub(super) async fn list(c: &Client, state: Option<State>, limit: usize) -> PgResult<Vec<RowView>> {
    let state = state.map(State::as_str);
    let rows = c
        .query(
            &format!(
                "SELECT {ROW_COLUMNS} FROM queue WHERE ($1::text IS NULL OR state = $1::text) \
                 ORDER BY seq DESC LIMIT $2"
            ),
            &[&state, &(limit as i64)],
        )
        .await?;
    Ok(rows.iter().map(|r| row_view(r, 0)).collect())
}

pub(super) async fn get_exact(c: &Client, video_id: &str) -> PgResult<Option<RowView>> {
    Ok(c.query_opt(
        &format!("SELECT {ROW_COLUMNS} FROM queue WHERE video_id = $1"),
        &[&video_id],
    )
    .await?
    .map(|r| row_view(&r, 0)))
}

/// The stored ID for `video_id`: itself, or the row whose ID is it with ASCII whitespace
/// around (a producer's), found by a scan only after the exact lookup missed.
pub(super) async fn resolve(c: &Client, video_id: &str) -> PgResult<Option<String>> {
    if c.query_opt("SELECT 1 FROM queue WHERE video_id = $1", &[&video_id])
        .await?
        .is_some()
    {
        return Ok(Some(video_id.to_owned()));
    }
    Ok(c.query_opt(
        "SELECT video_id FROM queue WHERE btrim(video_id, E' \\t\\n\\f\\r') = $1 LIMIT 1",
        &[&video_id],
    )
    .await?
    .map(|r| r.get(0)))
}

pub(super) async fn history(c: &Client, video_id: &str) -> PgResult<Vec<LogEntry>> {
    let rows = c
        .query(
            concat!(
                "SELECT ",
                ts!("at"),
                ", attempt, outcome, http_status, bytes, elapsed_ms, detail \
                 FROM attempt_log WHERE video_id = $1 ORDER BY id"
            ),
            &[&video_id],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| LogEntry {
            at: r.get(0),
            attempt: r.get::<_, i32>(1).into(),
            outcome: r.get(2),
            http_status: r.get::<_, Option<i32>>(3).map(i64::from),
            bytes: r.get(4),
            elapsed_ms: r.get(5),
            detail: r.get(6),
        })
        .collect())
}

/// Rows that name a file in this instance's archive, after `after`, in insertion order.
pub(super) async fn archived_page(
    c: &Client,
    after: i64,
    n: usize,
    instance: &str,
) -> PgResult<Vec<(i64, RowView)>> {
    let rows = c
        .query(
            &format!(
                "SELECT seq, {ROW_COLUMNS} FROM queue WHERE seq > $1 \
                   AND (state = 'done' OR (state = 'failed' AND path IS NOT NULL)) \
                   AND (archived_on = $3 OR archived_on IS NULL) \
                 ORDER BY seq LIMIT $2"
            ),
            &[&after, &(n as i64), &instance],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), row_view(r, 1))).collect())
}

pub(super) async fn archived_bytes(c: &Client, instance: &str) -> PgResult<u64> {
    let n: i64 = c
        .query_one(
            "SELECT coalesce(sum(bytes), 0)::int8 FROM queue WHERE state = 'done' \
               AND (archived_on = $1 OR archived_on IS NULL)",
            &[&instance],
        )
        .await?
        .get(0);
    Ok(n as u64)
}

/// `hingnetd remove`, in the caller's transaction: the row (locked), whether it may go, and
/// the deletion with its attempt log.
pub(super) async fn remove(
    tx: &tokio_postgres::Transaction<'_>,
    key: &str,
    force: bool,
) -> PgResult<crate::queue::Removal> {
    use crate::queue::Removal;
    let Some(r) = tx
        .query_opt(
            &format!("SELECT {ROW_COLUMNS} FROM queue WHERE video_id = $1 FOR UPDATE"),
            &[&key],
        )
        .await?
    else {
        return Ok(Removal::Missing);
    };
    let row = row_view(&r, 0);
    if row.state == State::Downloading && !force {
        return Ok(Removal::Busy);
    }
    tx.execute("DELETE FROM queue WHERE video_id = $1", &[&key])
        .await?;
    tx.execute("DELETE FROM attempt_log WHERE video_id = $1", &[&key])
        .await?;
    Ok(Removal::Removed(Box::new(row)))
}

/// `verify --repair`'s update, in the caller's transaction: only while the row still records
/// `sha256`. Returns whether it did.
pub(super) async fn requeue_archived(
    tx: &tokio_postgres::Transaction<'_>,
    video_id: &str,
    sha256: Option<&str>,
    why: &str,
    instance: &str,
) -> PgResult<bool> {
    Ok(tx
        .execute(
            "UPDATE queue SET state = 'pending', next_attempt_at = now(), attempts = 0, \
               first_attempt_at = NULL, finished_at = NULL, path = NULL, sha256 = NULL, \
               bytes = NULL, http_status = NULL, archived_on = NULL, last_error = $3 \
             WHERE video_id = $1 AND state IN ('done', 'failed') \
               AND sha256 IS NOT DISTINCT FROM $2 \
               AND (archived_on IS NULL OR archived_on = $4)",
            &[&video_id, &sha256, &why, &instance],
        )
        .await?
        == 1)
}

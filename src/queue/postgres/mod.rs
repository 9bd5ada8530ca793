//! The queue on PostgreSQL, for a fleet of daemons and producers on several hosts, behind the
//! queue's contracts: the URL, password and TLS (`target`), connections and what their errors
//! mean (`link`), and every statement with the migrations (`sql`).
//!
//! What a fleet changes from the SQLite queue:
//! - A claim carries a lease (`queue.lease`), renewed by this process's heartbeat while the
//!   download runs; any daemon takes back a row whose lease has passed. Every outcome is
//!   fenced by the claim's token, so a daemon that comes back late (paused, partitioned, slow)
//!   records nothing over a newer claim.
//! - New rows are noticed by `LISTEN` on a connection of its own (a row trigger `NOTIFY`s),
//!   a hint only: the daemon looks again after every (re)connect, and polls.
//! - A lost connection is opened again at the next statement; the caller paces its retries.
//!
//! The daemon's calls (`Claims`) are async on its runtime. The operator's commands (`Admin`)
//! block: they run the same statements on a connection of their own, on a small runtime of
//! their own.

mod link;
mod sql;
pub mod target;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_postgres::Client;

use self::link::{Link, classify, connect};
use self::sql::CHANNEL;
use self::target::Target;
use super::{
    Claimed, Counts, Cursor, Enqueued, Finish, LogEntry, QueueError, Recovered, Removal, RowView,
    State, Status,
};

/// How long the LISTEN connection's own test notification may take before the daemon says
/// that notifications do not arrive.
const PROBE_WAIT: Duration = Duration::from_secs(10);

/// The longest wait between attempts to open the LISTEN connection again.
const MAX_RECONNECT: Duration = Duration::from_secs(30);

/// When a row whose outcome the database refused is tried again.
const GIVE_BACK_DELAY: Duration = Duration::from_secs(300);

/// How often the instance's lock is tried again while another session holds it.
const LOCK_RETRY: Duration = Duration::from_secs(5);

/// What the daemon's tasks share: the statement connection and the claims in flight.
struct Shared {
    target: Arc<Target>,
    link: Link,
    /// Claims this process made and has not finished: token -> videos.
    live: Mutex<HashMap<String, HashSet<String>>>,
    heartbeat: std::sync::Once,
}

impl Shared {
    fn live(&self) -> MutexGuard<'_, HashMap<String, HashSet<String>>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The claims held, as (tokens, videos) pairs.
    fn held(&self) -> (Vec<String>, Vec<String>) {
        self.live()
            .iter()
            .flat_map(|(t, vs)| vs.iter().map(move |v| (t.clone(), v.clone())))
            .unzip()
    }

    /// Notes new claims, and starts the heartbeat with the first.
    fn hold(self: &Arc<Self>, claims: &[Claimed]) {
        if claims.is_empty() {
            return;
        }
        {
            let mut live = self.live();
            for c in claims {
                live.entry(c.token.clone())
                    .or_default()
                    .insert(c.video_id.clone());
            }
        }
        self.heartbeat.call_once(|| {
            tokio::spawn(heartbeat(Arc::downgrade(self)));
        });
    }

    /// Forgets the claims of every video but `videos`.
    fn keep_only(&self, videos: &[String]) {
        self.live().retain(|_, held| {
            held.retain(|v| videos.contains(v));
            !held.is_empty()
        });
    }

    fn release(&self, claimed: &Claimed) {
        let mut live = self.live();
        if let Some(videos) = live.get_mut(&claimed.token) {
            videos.remove(&claimed.video_id);
            if videos.is_empty() {
                live.remove(&claimed.token);
            }
        }
    }

    fn instance(&self) -> &str {
        &self.target.instance
    }
}

/// Renews this process's leases every third of a lease, for as long as the queue is open. A
/// renewal that cannot reach the database is tried again at the next beat; the lease runs on
/// meanwhile, and once it has passed another daemon may take the row (the fence then keeps
/// this one's late outcome out).
async fn heartbeat(shared: Weak<Shared>) {
    let every = match shared.upgrade() {
        Some(s) => (s.target.lease / 3).max(Duration::from_millis(100)),
        None => return,
    };
    let mut unreachable = false;
    loop {
        tokio::time::sleep(every).await;
        let Some(s) = shared.upgrade() else { return };
        let held = s.held();
        if held.0.is_empty() {
            continue;
        }
        let lease = s.target.lease;
        match s
            .link
            .run("renew leases", move |c| async move {
                sql::renew(&c, &held, lease).await
            })
            .await
        {
            Ok(n) => {
                if unreachable {
                    tracing::info!(
                        renewed = n,
                        "queue database reachable again; leases renewed"
                    );
                }
                unreachable = false;
            }
            Err(e) => {
                if !unreachable {
                    tracing::warn!(error = %e, lease = %crate::config::format_duration(lease), "cannot renew leases; downloads go on, and a claim whose lease passes may be taken over");
                }
                unreachable = true;
            }
        }
    }
}

/// The operator's side: a connection on a runtime of its own, opened again if it was lost.
struct Blocking {
    runtime: Option<tokio::runtime::Runtime>,
    client: Option<Client>,
    target: Arc<Target>,
}

impl Blocking {
    fn open(target: Arc<Target>) -> Result<Blocking, QueueError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| QueueError::Setup {
                location: target.display(),
                problem: format!("cannot start the database runtime: {e}"),
            })?;
        let mut b = Blocking {
            runtime: Some(runtime),
            client: None,
            target,
        };
        b.client()?;
        Ok(b)
    }

    fn client(&mut self) -> Result<&mut Client, QueueError> {
        if self.client.as_ref().is_none_or(|c| c.is_closed()) {
            let target = self.target.clone();
            let rt = self.runtime.as_ref().expect("present until drop");
            let (client, _driver) = rt.block_on(async move { connect(&target, |_| {}).await })?;
            self.client = Some(client);
        }
        Ok(self.client.as_mut().expect("just set"))
    }

    /// Runs `f` on the connection, blocking this thread (never an async worker's).
    fn run<T>(
        &mut self,
        what: &str,
        f: impl AsyncFnOnce(&mut Client) -> Result<T, tokio_postgres::Error>,
    ) -> Result<T, QueueError> {
        let target = self.target.clone();
        self.client()?;
        let rt = self.runtime.as_ref().expect("present until drop");
        let client = self.client.as_mut().expect("opened above");
        rt.block_on(f(client))
            .map_err(|e| classify(&target, what, e))
    }
}

impl Drop for Blocking {
    fn drop(&mut self) {
        // A metrics scrape's queue is dropped on the daemon's runtime, where a runtime may not
        // be dropped the ordinary way.
        self.client = None;
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// The queue on PostgreSQL, behind the contracts.
pub struct Postgres {
    shared: Arc<Shared>,
    blocking: Mutex<Option<Blocking>>,
    /// The daemon's: woken by notifications and reconnects.
    wake: Option<Arc<Notify>>,
    /// The daemon's: whether its LISTEN session holds the instance's lock now.
    locked: Option<Arc<AtomicBool>>,
}

/// The daemon's queue before `serve`: checked and migrated.
pub struct Unserved(Arc<Target>);

impl Postgres {
    fn new(
        target: Arc<Target>,
        blocking: Option<Blocking>,
        wake: Option<Arc<Notify>>,
        locked: Option<Arc<AtomicBool>>,
    ) -> Postgres {
        Postgres {
            shared: Arc::new(Shared {
                link: Link::new(target.clone()),
                target,
                live: Mutex::default(),
                heartbeat: std::sync::Once::new(),
            }),
            blocking: Mutex::new(blocking),
            wake,
            locked,
        }
    }

    /// Connects, migrates and checks that the role may do what the daemon does: every problem
    /// is found here, before systemd hears READY.
    pub fn open_for_daemon(target: Target) -> Result<Unserved, QueueError> {
        let target = Arc::new(target);
        let mut b = Blocking::open(target.clone())?;
        migrate(&mut b)?;
        let missing = b.run("check privileges", async |c| {
            sql::missing_privileges(c).await
        })?;
        if !missing.is_empty() {
            return Err(QueueError::Privilege {
                location: target.display(),
                what: format!("the role lacks {}", missing.join(", ")),
                source: "the daemon's role needs them (see README: Several servers, one queue)"
                    .into(),
            });
        }
        Ok(Unserved(target))
    }

    pub fn open_existing(target: Target) -> Result<Postgres, QueueError> {
        let target = Arc::new(target);
        let mut b = Blocking::open(target.clone())?;
        if b.run("read the schema version", async |c| {
            sql::schema_version(c).await
        })? == 0
        {
            return Err(QueueError::NotMigrated {
                path: target.display().into(),
            });
        }
        migrate(&mut b)?;
        Ok(Postgres::new(target, Some(b), None, None))
    }

    pub fn open_and_migrate(target: Target) -> Result<Postgres, QueueError> {
        let target = Arc::new(target);
        let mut b = Blocking::open(target.clone())?;
        migrate(&mut b)?;
        Ok(Postgres::new(target, Some(b), None, None))
    }

    fn admin<T>(
        &self,
        what: &str,
        f: impl AsyncFnOnce(&mut Client) -> Result<T, tokio_postgres::Error>,
    ) -> Result<T, QueueError> {
        let mut held = self.blocking.lock().unwrap_or_else(|p| p.into_inner());
        if held.is_none() {
            *held = Some(Blocking::open(self.shared.target.clone())?);
        }
        held.as_mut().expect("just set").run(what, f)
    }

    fn instance_name(&self) -> String {
        self.shared.instance().to_owned()
    }
}

/// Applies the migrations this database has not seen, refusing one newer than this binary.
fn migrate(b: &mut Blocking) -> Result<(), QueueError> {
    let location = b.target.display();
    let v = b.run("read the schema version", async |c| {
        sql::schema_version(c).await
    })?;
    let known = sql::MIGRATIONS.len();
    if v > known as i64 {
        return Err(QueueError::TooNew {
            path: location.into(),
            found: v,
            known,
        });
    }
    if v == known as i64 {
        return Ok(());
    }
    let applied = b
        .run("migrate", async |c| sql::migrate(c).await)
        .map_err(|e| match e {
            QueueError::Query { source, .. } => QueueError::Migration {
                path: location.clone().into(),
                name: sql::MIGRATIONS[v.max(0) as usize].0,
                source,
            },
            other => other,
        })?;
    for name in applied {
        tracing::info!(database = %location, migration = name, "applied migration");
    }
    Ok(())
}

impl Unserved {
    /// Opens the LISTEN connection and takes this instance's lock on it (a second daemon of
    /// the same name stops here), then starts listening: the claims from then on.
    pub async fn serve(self) -> Result<Postgres, QueueError> {
        let wake = Arc::new(Notify::new());
        let locked = Arc::new(AtomicBool::new(false));
        let (started, first) = tokio::sync::oneshot::channel();
        tokio::spawn(listen(
            self.0.clone(),
            wake.clone(),
            locked.clone(),
            started,
        ));
        first.await.unwrap_or_else(|_| {
            Err(QueueError::Setup {
                location: self.0.display(),
                problem: "the listener stopped".into(),
            })
        })?;
        Ok(Postgres::new(self.0, None, Some(wake), Some(locked)))
    }
}

/// The LISTEN connection: wakes the scheduler on every notification and after every
/// (re)connect (what was notified while it was away is gone), holds the instance's lock, and
/// says once if its own test notification never arrives (PgBouncer in transaction mode
/// passes no notifications: the poll is all there is then). The first attempt's result goes
/// to `started`; after that, it reconnects with backoff for as long as the daemon runs.
async fn listen(
    target: Arc<Target>,
    wake: Arc<Notify>,
    locked: Arc<AtomicBool>,
    started: tokio::sync::oneshot::Sender<Result<(), QueueError>>,
) {
    let mut started = Some(started);
    let mut backoff = Duration::from_millis(250);
    let mut said_silent = false;
    let probe = format!("probe {}", fastrand::u64(..));
    let seen = Arc::new(Notify::new());
    loop {
        let (w, s, p) = (wake.clone(), seen.clone(), probe.clone());
        let opened = async {
            let (client, driver) = connect(&target, move |n| {
                if n.channel() == CHANNEL {
                    if n.payload() == p {
                        s.notify_one();
                    }
                    w.notify_one();
                }
            })
            .await?;
            let locked = async {
                client.batch_execute(&format!("LISTEN {CHANNEL}")).await?;
                // The server's keepalives for this session, which holds the instance's lock: a
                // daemon whose host was cut off otherwise keeps it until the server's default
                // keepalive (two hours) notices. Set here, not as startup options, which a
                // pooler may refuse; a server that refuses them (too old) keeps its defaults.
                if let Err(e) = client
                    .batch_execute(
                        "SET tcp_keepalives_idle = 15; SET tcp_keepalives_interval = 5; \
                         SET tcp_keepalives_count = 3; SET tcp_user_timeout = 30000",
                    )
                    .await
                {
                    tracing::debug!(error = %e, "cannot set the LISTEN session's keepalives");
                }
                sql::lock_instance(&client, &target.instance).await
            }
            .await
            .map_err(|e| classify(&target, "listen for new rows", e))?;
            Ok::<_, QueueError>((client, driver, locked))
        }
        .await;
        let (client, driver) = match opened {
            Ok((client, driver, got_lock)) => {
                locked.store(got_lock, Ordering::Relaxed);
                if !got_lock {
                    let e = QueueError::AlreadyRunning {
                        database: target.display().into(),
                        holder: format!("a daemon with queue.instance = {:?}", target.instance),
                    };
                    match started.take() {
                        Some(tx) => {
                            let _ = tx.send(Err(e));
                            return;
                        }
                        None => {
                            tracing::warn!(error = %e, "after reconnecting, this instance's lock is held by another session (this daemon's old one, until the server notices it gone, or another daemon of the same queue.instance); taking it when it is free, and meanwhile leaving claims of this instance to their lease")
                        }
                    }
                }
                if let Some(tx) = started.take() {
                    let _ = tx.send(Ok(()));
                } else {
                    tracing::info!(database = %target.display(), "listening for new rows again");
                }
                backoff = Duration::from_millis(250);
                (client, driver)
            }
            Err(e) => {
                if let Some(tx) = started.take() {
                    let _ = tx.send(Err(e));
                    return;
                }
                tracing::warn!(error = %e, retry_in = ?backoff, "cannot listen for new rows; polling meanwhile");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_RECONNECT);
                continue;
            }
        };
        // Look again: rows inserted while this connection was away notified nobody.
        wake.notify_one();
        let probed = client
            .execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &probe])
            .await;
        let mut probing = probed.is_ok() && !said_silent;
        let probe_by = tokio::time::Instant::now() + PROBE_WAIT;
        let mut relock = tokio::time::interval(LOCK_RETRY);
        let mut driver = driver;
        // Until the connection ends (the only way out, so the driver is awaited once).
        loop {
            tokio::select! {
                _ = &mut driver => break,
                _ = seen.notified(), if probing => probing = false,
                _ = tokio::time::sleep_until(probe_by), if probing => {
                    probing = false;
                    said_silent = true;
                    tracing::warn!(database = %target.display(), "no notifications arrive on the LISTEN connection (PgBouncer in transaction mode passes none); new rows are noticed by the poll (queue.poll_interval) only");
                }
                // Another session held the lock when this one came back (often this daemon's
                // own, not yet noticed gone by the server): take it once it is free.
                _ = relock.tick(), if !locked.load(Ordering::Relaxed) => {
                    if let Ok(true) = sql::lock_instance(&client, &target.instance).await {
                        locked.store(true, Ordering::Relaxed);
                        tracing::info!(instance = %target.instance, "holding this instance's lock again");
                    }
                }
            }
        }
        // The lock went with the session.
        locked.store(false, Ordering::Relaxed);
        drop(client);
        tracing::warn!(database = %target.display(), "lost the LISTEN connection; polling until it is back");
        // The scheduler looks now, and learns from its own statements whether the database
        // is away (it then says so in the status line) or only this connection was cut.
        wake.notify_one();
        tokio::time::sleep(backoff).await;
    }
}

#[async_trait::async_trait]
impl super::Claims for Postgres {
    async fn claim(
        &self,
        n: usize,
        avoid: Vec<String>,
        or_avoided: bool,
    ) -> Result<Vec<Claimed>, QueueError> {
        let (instance, lease) = (self.instance_name(), self.shared.target.lease);
        let token = new_token(&instance);
        let t = std::time::Instant::now();
        let claimed = self
            .shared
            .link
            .run("claim due rows", move |c| async move {
                let mut got = sql::claim(&c, n, &avoid, &token, &instance, lease).await?;
                if got.is_empty() && !avoid.is_empty() && or_avoided {
                    got = sql::claim(&c, n, &[], &token, &instance, lease).await?;
                }
                Ok(got)
            })
            .await?;
        self.shared.hold(&claimed);
        // The benchmark reads this to report claim latency.
        tracing::debug!(
            claimed = claimed.len(),
            took_us = t.elapsed().as_micros() as u64,
            "claimed due rows"
        );
        Ok(claimed)
    }

    async fn claim_one(&self, video_id: &str) -> Result<Result<Claimed, State>, QueueError> {
        // Not the daemon's name: a restarting daemon takes back its own predecessor's claims.
        let (instance, lease) = (
            format!("{} (fetch)", self.instance_name()),
            self.shared.target.lease,
        );
        let token = new_token(&instance);
        let id = video_id.to_owned();
        let claimed = self
            .shared
            .link
            .run(&format!("claim {video_id}"), move |c| async move {
                let stored = sql::resolve(&c, &id).await?.unwrap_or(id);
                sql::claim_one(&c, &stored, &token, &instance, lease).await
            })
            .await?;
        if let Ok(c) = &claimed {
            self.shared.hold(std::slice::from_ref(c));
        }
        Ok(claimed)
    }

    async fn finish(
        &self,
        claimed: &Claimed,
        finish: &Finish,
        elapsed: Duration,
        expires_at: Option<i64>,
    ) -> Result<bool, QueueError> {
        let (c2, f, instance) = (claimed.clone(), finish.clone(), self.instance_name());
        let ours =
            self.shared
                .link
                .run(
                    &format!("record outcome of {}", claimed.video_id),
                    move |c| async move {
                        sql::finish(&c, &c2, &f, elapsed, expires_at, &instance).await
                    },
                )
                .await;
        // Recorded, fenced out, or failed for good: no longer a claim this process keeps alive.
        // Only while the caller will try again (the database away) is it still ours.
        match &ours {
            Err(e) if e.is_temporary() => {}
            Err(e) => {
                self.shared.release(claimed);
                // Failed for good (a trigger, a constraint): given back, not retried at once,
                // or a refusal that lasts would have the video downloaded again and again. If
                // even this fails, the row's lease lapses and it is taken back then.
                let (c2, why) = (claimed.clone(), format!("cannot record the outcome: {e}"));
                let _ = self
                    .shared
                    .link
                    .run("give the row back", move |c| async move {
                        sql::give_back(&c, &c2, GIVE_BACK_DELAY, &why).await
                    })
                    .await;
            }
            Ok(_) => self.shared.release(claimed),
        }
        ours
    }

    async fn fail_released(
        &self,
        claimed: &Claimed,
        error: &str,
        http_status: Option<u16>,
    ) -> Result<bool, QueueError> {
        let (c2, e, instance) = (claimed.clone(), error.to_owned(), self.instance_name());
        self.shared
            .link
            .run(&format!("fail {}", claimed.video_id), move |c| async move {
                sql::fail_released(&c, &c2, &e, http_status, &instance).await
            })
            .await
    }

    /// A claim is alive while its lease runs; this process's own claims (its heartbeat renews
    /// them) are never taken back here, even late. The daemon also takes back at once what its
    /// predecessor of the same instance left (killed, or crashed): it holds the instance's lock,
    /// so no other daemon of that name runs. (`hingnetd fetch` claims under a name of its own.)
    async fn recover_stale(&self, ours: Vec<String>) -> Recovered {
        if self.wake.is_some() {
            // The daemon's downloads in flight are `ours`: a claim of a task that is gone (it
            // panicked, or could not record its outcome) is not kept alive any longer.
            self.shared.keep_only(&ours);
        }
        let held = self.shared.held();
        let instance = self
            .locked
            .as_ref()
            .is_some_and(|l| l.load(Ordering::Relaxed))
            .then(|| self.instance_name());
        match self
            .shared
            .link
            .run("take back expired claims", move |c| async move {
                sql::release_expired(&c, &held, instance.as_deref()).await
            })
            .await
        {
            Ok(released) => Recovered {
                released,
                error: None,
            },
            Err(e) => Recovered {
                released: Vec::new(),
                error: Some(e),
            },
        }
    }

    async fn next_due_in(&self) -> Result<Option<Duration>, QueueError> {
        self.shared
            .link
            .run("find next due row", |c| async move {
                sql::next_due_in(&c).await
            })
            .await
    }

    async fn counts(&self) -> Result<Counts, QueueError> {
        self.shared
            .link
            .run("count rows", |c| async move { sql::counts(&c).await })
            .await
    }

    async fn set_pauses(&self, pauses: Vec<crate::pause::Record>) -> Result<(), QueueError> {
        let instance = self.instance_name();
        self.shared
            .link
            .run("publish pauses", move |c| async move {
                sql::set_pauses(&c, &instance, &pauses).await
            })
            .await
    }

    async fn changed(&self) {
        match &self.wake {
            Some(w) => w.notified().await,
            None => std::future::pending().await,
        }
    }
}

impl super::Admin for Postgres {
    fn enqueue(&self, ids: &[String]) -> Result<Enqueued, QueueError> {
        let added = self.admin("enqueue", async |c| sql::enqueue(c, ids).await)?;
        Ok(Enqueued {
            added,
            already: ids.len() - added,
        })
    }

    fn retry_failed(&self, ids: Option<&[String]>) -> Result<Vec<String>, QueueError> {
        self.admin("retry failed rows", async |c| {
            sql::retry_failed(c, ids).await
        })
    }

    fn remove(&self, video_id: &str, force: bool) -> Result<Removal, QueueError> {
        self.admin(&format!("remove {video_id}"), async |c| {
            let Some(key) = sql::resolve(c, video_id).await? else {
                return Ok(Removal::Missing);
            };
            let tx = c.transaction().await?;
            let out = sql::remove(&tx, &key, force).await?;
            tx.commit().await?;
            Ok(out)
        })
    }

    fn requeue_archived(
        &self,
        video_id: &str,
        sha256: Option<&str>,
        why: &str,
        then: &mut dyn FnMut() -> Result<Option<String>, String>,
    ) -> Result<Option<Result<Option<String>, String>>, QueueError> {
        let instance = self.instance_name();
        self.admin(&format!("put {video_id} back to pending"), async |c| {
            let tx = c.transaction().await?;
            if !sql::requeue_archived(&tx, video_id, sha256, why, &instance).await? {
                return Ok(None);
            }
            sql::wake_daemons(&tx).await?;
            // Inside the transaction: no downloader can claim the row before `then` has run,
            // and its error rolls the update back (dropping `tx`).
            match then() {
                Ok(t) => {
                    tx.commit().await?;
                    Ok(Some(Ok(t)))
                }
                Err(e) => Ok(Some(Err(e))),
            }
        })
    }

    fn status(&self, failures: usize) -> Result<Status, QueueError> {
        self.admin("read status", async |c| sql::status(c, failures).await)
    }

    fn list(&self, state: Option<State>, limit: usize) -> Result<Vec<RowView>, QueueError> {
        self.admin("list rows", async |c| sql::list(c, state, limit).await)
    }

    fn get(&self, video_id: &str) -> Result<Option<RowView>, QueueError> {
        self.admin(&format!("read row {video_id}"), async |c| {
            if let Some(row) = sql::get_exact(c, video_id).await? {
                return Ok(Some(row));
            }
            match sql::resolve(c, video_id).await? {
                Some(key) => sql::get_exact(c, &key).await,
                None => Ok(None),
            }
        })
    }

    fn resolve(&self, video_id: &str) -> Result<Option<String>, QueueError> {
        self.admin(&format!("read row {video_id}"), async |c| {
            sql::resolve(c, video_id).await
        })
    }

    fn history(&self, video_id: &str) -> Result<Vec<LogEntry>, QueueError> {
        self.admin("read attempt log", async |c| {
            sql::history(c, video_id).await
        })
    }

    fn archived_page(&self, after: Cursor, n: usize) -> Result<Vec<(Cursor, RowView)>, QueueError> {
        let instance = self.instance_name();
        let rows = self.admin("list done rows", async |c| {
            sql::archived_page(c, after.0, n, &instance).await
        })?;
        Ok(rows.into_iter().map(|(s, r)| (Cursor(s), r)).collect())
    }

    fn archived_bytes(&self) -> Result<u64, QueueError> {
        let instance = self.instance_name();
        self.admin("sum archived bytes", async |c| {
            sql::archived_bytes(c, &instance).await
        })
    }

    fn pauses(&self) -> Result<Vec<crate::pause::Published>, QueueError> {
        let instance = self.instance_name();
        self.admin("read pauses", async |c| sql::pauses(c, &instance).await)
    }

    fn daemon_running(&self) -> bool {
        if self.wake.is_some() {
            return true;
        }
        let instance = self.instance_name();
        self.admin("look for a running daemon", async |c| {
            sql::daemon_running(c, &instance).await
        })
        .unwrap_or(false)
    }

    fn location(&self) -> String {
        self.shared.target.display()
    }

    fn instance(&self) -> Option<&str> {
        Some(self.shared.instance())
    }
}

/// A claim token: the instance, this process and a random part, so claims never collide
/// across the fleet.
fn new_token(instance: &str) -> String {
    format!(
        "{instance}/{}-{:016x}",
        std::process::id(),
        fastrand::u64(..)
    )
}

//! The daemon loop: claiming due rows, running downloads up to the concurrency limit, turning
//! each attempt's `Outcome` into the row's next state (`decide`), client-wide pauses (429,
//! rejected token), and shutdown.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use std::path::PathBuf;

use crate::api::ApiClient;
use crate::archive::VideoId;
use crate::config::{self, Config, RetryConfig, format_duration};
use crate::fetch::{Fetcher, Outcome};
use crate::queue::{Claimed, Finish, SharedQueue};
use crate::service::{Service, thousands};
use crate::watch::Recheck;

/// What the loop runs with. Replaced on SIGHUP, except what cannot change live.
pub struct Settings {
    pub config: Config,
    /// Re-read on SIGHUP.
    pub config_path: PathBuf,
}

/// The row's next state after an attempt. The whole retry policy is here.
pub fn decide(
    claimed: &Claimed,
    outcome: &Outcome,
    retry: &RetryConfig,
    held_for: Duration,
) -> Finish {
    let backoff = backoff(retry, claimed.attempts);
    let retry_or_give_up = |http_status: Option<u16>, reason: &str| {
        let elapsed = claimed.since_first_attempt + held_for;
        let Some(left) = retry
            .give_up_after
            .checked_sub(elapsed)
            .filter(|l| !l.is_zero())
        else {
            return Finish::Failed {
                error: format!(
                    "gave up after {} (retry.give_up_after): {reason}",
                    format_duration(retry.give_up_after)
                ),
                http_status,
            };
        };
        // The last try lands on the deadline rather than after it.
        Finish::Retry {
            delay: backoff.min(left),
            error: reason.to_owned(),
            http_status,
        }
    };
    match outcome {
        Outcome::Archived {
            published,
            http_status,
            ..
        } => Finish::Done {
            path: published.path.display().to_string(),
            sha256: published.sha256.clone(),
            bytes: published.bytes,
            http_status: *http_status,
        },
        Outcome::NotReady {
            http_status,
            reason,
        } => retry_or_give_up(Some(*http_status), reason),
        Outcome::Transient {
            http_status,
            reason,
        } => retry_or_give_up(*http_status, reason),
        Outcome::Gone {
            http_status,
            reason,
        } => Finish::Failed {
            error: reason.clone(),
            http_status: Some(*http_status),
        },
        Outcome::InvalidId => Finish::Failed {
            error: "invalid video id".into(),
            http_status: None,
        },
        // Not the video's fault: its row keeps its schedule and nothing counts against it.
        Outcome::AccountProblem {
            http_status,
            reason,
        } => Finish::Release {
            delay: Duration::ZERO,
            error: Some(format!(
                "waiting: API rejected the token ({http_status}): {reason}"
            )),
        },
        Outcome::RateLimited { retry_after } => Finish::Release {
            delay: retry_after.unwrap_or(backoff),
            error: Some("waiting: rate limited (429)".into()),
        },
        // Given back, but not due at once: the row is written before the loop hears of the
        // outage and pauses, and a look in between must not retry it straight away.
        Outcome::Unreachable { reason } => Finish::Release {
            delay: backoff,
            error: Some(format!("waiting: API unreachable: {reason}")),
        },
        Outcome::Interrupted { .. } => Finish::Release {
            delay: Duration::ZERO,
            error: None,
        },
        Outcome::Storage { reason } => Finish::Release {
            delay: backoff,
            error: Some(format!("archive error: {reason}")),
        },
    }
}

/// Exponential backoff with jitter: `initial * 2^(attempt-1)`, capped, then drawn uniformly
/// from its upper half so that videos enqueued together do not retry in lockstep.
pub fn backoff(retry: &RetryConfig, attempt: u32) -> Duration {
    let exp = attempt.saturating_sub(1).min(30);
    let base = retry
        .initial_delay
        .saturating_mul(1u32 << exp)
        .min(retry.max_delay);
    let half = base / 2;
    half + half.mul_f64(fastrand::f64())
}

/// The shortest wait before claiming again when the clock and the claim disagree.
const RELOOK: Duration = Duration::from_millis(250);

/// The status line is recounted at most this often.
const STATUS_EVERY: Duration = Duration::from_secs(2);

/// How long parked downloads get to record themselves after the grace period.
const PARK_TIMEOUT: Duration = Duration::from_secs(5);

/// While new downloads wait for the archive's disk, how often it is looked at again.
const STORAGE_RECHECK: Duration = Duration::from_secs(2);

/// New downloads wait: the archive's disk is short of `archive.min_free`, or its directory is
/// gone. Downloads in flight go on; the condition is checked again every `STORAGE_RECHECK`.
struct StoragePause {
    reason: String,
    next_check: Instant,
}

/// What a finished download task reports to the loop.
struct Report {
    outcome: Outcome,
}

/// The client-wide pause after the API rejected the token: one probe at a time, backing off.
struct AccountPause {
    /// `None` while a probe is in flight.
    next_probe: Option<Instant>,
    delay: Duration,
}

pub struct Scheduler {
    settings: Settings,
    queue: SharedQueue,
    fetcher: Arc<Fetcher>,
    wake: Arc<Notify>,
    tasks: JoinSet<Report>,
    /// Videos this daemon is downloading now, by task (the rest of `downloading` rows belong to
    /// a `hingnetd fetch`, or to a downloader that died). A panicked task is removed by its id.
    in_flight: HashMap<tokio::task::Id, String>,
    /// When `downloading` rows were last checked for a dead downloader.
    orphans_checked: Option<Instant>,
    /// Cancels downloads in flight (after the shutdown grace period).
    downloads: CancellationToken,
    rate_limited_until: Option<Instant>,
    /// 429s without a success in between: the client-wide wait grows with them when the
    /// server gives no `Retry-After`.
    rate_limits_in_a_row: u32,
    /// The API host could not be reached: nothing is requested until then.
    unreachable_until: Option<Instant>,
    unreachable_in_a_row: u32,
    account: Option<AccountPause>,
    storage: Option<StoragePause>,
    /// Fired by SIGHUP.
    reload: Arc<Notify>,
    service: Service,
    /// The status line needs fresh counts (something changed since the last ones).
    counts_stale: bool,
    counts_at: Option<Instant>,
}

impl Scheduler {
    pub fn new(
        settings: Settings,
        queue: SharedQueue,
        fetcher: Arc<Fetcher>,
        wake: Arc<Notify>,
        reload: Arc<Notify>,
        service: Service,
    ) -> Scheduler {
        Scheduler {
            settings,
            queue,
            fetcher,
            wake,
            tasks: JoinSet::new(),
            in_flight: HashMap::new(),
            orphans_checked: None,
            downloads: CancellationToken::new(),
            rate_limited_until: None,
            rate_limits_in_a_row: 0,
            unreachable_until: None,
            unreachable_in_a_row: 0,
            account: None,
            storage: None,
            reload,
            service,
            counts_stale: true,
            counts_at: None,
        }
    }

    /// Runs until `shutdown` is cancelled, then drains (see `drain`).
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut recheck = Recheck::default();
        let mut data_version = self.queue.call(|q| q.data_version()).await.unwrap_or(0);
        // Whether a due row may be waiting: set by anything that can make one due.
        let mut look = true;
        let mut next_due: Option<Instant> = None;
        let mut last_look = Instant::now();
        let mut db_backoff = Duration::from_millis(500);
        loop {
            let now = Instant::now();
            if self.rate_limited_until.is_some_and(|t| t <= now) {
                self.rate_limited_until = None;
                self.counts_stale = true;
                look = true;
            }
            if self.unreachable_until.is_some_and(|t| t <= now) {
                self.unreachable_until = None;
                self.counts_stale = true;
                look = true;
            }
            if self
                .orphans_checked
                .is_none_or(|t| t.elapsed() >= self.orphan_interval())
            {
                self.orphans_checked = Some(Instant::now());
                if let Err(e) = self.recover_orphans().await {
                    tracing::error!(error = %e, "cannot check for interrupted rows");
                }
            }
            if look {
                last_look = Instant::now();
                match self.fill_slots().await {
                    Ok(due) => {
                        next_due = due;
                        look = false;
                        db_backoff = Duration::from_millis(500);
                    }
                    Err(e) => {
                        tracing::error!(error = %e, retry_in = ?db_backoff, "queue database error");
                        self.service.status(format!("queue database error: {e}"));
                        // Looked again at next_due, not at the next wake-up of any kind.
                        look = false;
                        next_due = Some(Instant::now() + db_backoff);
                        db_backoff = (db_backoff * 2).min(Duration::from_secs(60));
                    }
                }
            }
            self.service.ping_if_due();
            self.update_status().await;
            let poll = self.settings.config.queue.poll_interval;
            // When to look for due rows whatever else happens: the safety-net poll, the next
            // due row, the end of a pause. Kept apart from the other wake-ups (rechecks, pings,
            // the status line) so that no stream of those can put a look off.
            let look_at = [
                Some(last_look + poll),
                next_due,
                self.rate_limited_until,
                self.unreachable_until,
                self.storage.as_ref().map(|s| s.next_check),
                // A probe waits for the downloads in flight; their completion wakes us.
                // (and for a rate-limit pause to end, which is its own deadline).
                self.account
                    .as_ref()
                    .and_then(|a| a.next_probe)
                    .filter(|_| self.tasks.is_empty() && self.rate_limited_until.is_none()),
            ]
            .into_iter()
            .flatten()
            .min()
            .expect("the poll deadline is always there");
            let wake_at = [
                Some(look_at),
                self.orphans_checked.map(|t| t + self.orphan_interval()),
                self.service.ping_due(),
                self.counts_at
                    .filter(|_| self.counts_stale)
                    .map(|t| t + STATUS_EVERY),
                recheck.due_at(),
            ]
            .into_iter()
            .flatten()
            .min()
            .expect("look_at is always there");
            tokio::select! {
                _ = shutdown.cancelled() => break,
                Some(joined) = self.tasks.join_next_with_id() => {
                    match joined {
                        Ok((task, report)) => {
                            self.in_flight.remove(&task);
                            self.absorb(report.outcome);
                        }
                        // The row stays `downloading`, no longer ours: the orphan check
                        // recovers it.
                        Err(e) => {
                            let video = self.in_flight.remove(&e.id()).unwrap_or_default();
                            tracing::error!(video_id = %video, error = %e, "download task panicked");
                        }
                    }
                    // Paused, and nothing in flight said anything about the token (a 429, a
                    // shutdown, a panic): the next probe may go as soon as the loop allows.
                    if let Some(a) = self.account.as_mut()
                        && a.next_probe.is_none()
                        && self.tasks.is_empty()
                    {
                        a.next_probe = Some(Instant::now());
                    }
                    self.counts_stale = true;
                    look = true;
                }
                _ = self.wake.notified() => recheck.start(),
                _ = self.reload.notified() => {
                    self.apply_reload();
                    look = true;
                }
                _ = tokio::time::sleep_until(wake_at) => {
                    let now = Instant::now();
                    if recheck.due_at().is_some_and(|t| t <= now) {
                        match self.queue.call(|q| q.data_version()).await {
                            Ok(v) if v != data_version => {
                                data_version = v;
                                self.counts_stale = true;
                                // Keep looking: the event that started this check may belong
                                // to a later commit than the one just seen.
                                recheck.start();
                                look = true;
                            }
                            _ => recheck.advance(),
                        }
                    }
                    if look_at <= now {
                        look = true;
                    }
                }
            }
        }
        // Ask systemd for the time the drain may take, so TimeoutStopSec= cannot cut it short.
        self.service
            .stopping(self.settings.config.download.shutdown_grace + PARK_TIMEOUT);
        self.drain().await;
    }

    /// Keeps systemd's STATUS= line current, e.g. "3 downloading, 120 pending, 18,044 done,
    /// 2 failed; paused: API rejected the token". Counting costs a scan of the state index, so
    /// it runs only after something changed, and at most every `STATUS_EVERY`.
    async fn update_status(&mut self) {
        if !self.counts_stale || self.counts_at.is_some_and(|t| t.elapsed() < STATUS_EVERY) {
            return;
        }
        self.counts_at = Some(Instant::now());
        let counts = match self.queue.call(|q| q.counts()).await {
            Ok(c) => c,
            // Stays stale: tried again after STATUS_EVERY.
            Err(e) => {
                tracing::warn!(error = %e, "cannot count rows for the status line");
                return;
            }
        };
        self.counts_stale = false;
        let mut text = format!(
            "{} downloading, {} pending, {} done, {} failed",
            thousands(counts.downloading),
            thousands(counts.pending),
            thousands(counts.done),
            thousands(counts.failed)
        );
        if let Some(s) = &self.storage {
            text.push_str("; paused: ");
            text.push_str(&s.reason);
        } else if self.account.is_some() {
            text.push_str("; paused: API rejected the token");
        } else if self.rate_limited_until.is_some() {
            text.push_str("; paused: rate limited (429)");
        } else if self.unreachable_until.is_some() {
            text.push_str("; paused: API host unreachable");
        }
        self.service.status(text);
    }

    /// SIGHUP: re-read the config file and the token. A bad new config (or token) is refused
    /// and the running one stays; settings that cannot change live say so.
    fn apply_reload(&mut self) {
        self.service.reloading();
        match self.try_reload() {
            Ok(()) => {
                tracing::info!(config = %self.settings.config_path.display(), "configuration reloaded");
                // The operator may have just fixed the token: probe now, not at the end of
                // the current backoff.
                if let Some(a) = &mut self.account {
                    a.delay = self.settings.config.retry.initial_delay;
                    if a.next_probe.is_some() {
                        a.next_probe = Some(Instant::now());
                    }
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "reload rejected; the running configuration stays in force")
            }
        }
        self.service.ready();
        self.counts_stale = true;
    }

    fn try_reload(&mut self) -> Result<(), String> {
        let mut new = Config::load(&self.settings.config_path, true).map_err(|e| e.to_string())?;
        let (token, source) = config::load_token(&new.api).map_err(|e| e.to_string())?;
        let api = ApiClient::new(&new.api, new.base_url(), token).map_err(|e| e.to_string())?;
        let old = &self.settings.config;
        if new.queue.database != old.queue.database {
            tracing::warn!(
                key = "queue.database",
                "cannot change while running; restart to apply"
            );
            new.queue.database = old.queue.database.clone();
        }
        if new.archive.dir != old.archive.dir {
            tracing::warn!(
                key = "archive.dir",
                "cannot change while running; restart to apply"
            );
            new.archive.dir = old.archive.dir.clone();
        }
        if new.log.level != old.log.level || new.log.format != old.log.format {
            tracing::warn!(key = "log", "log settings apply at the next start");
        }
        // Downloads in flight keep the client they started with.
        self.fetcher.replace_api(api);
        self.fetcher
            .set_limits(new.download.max_bytes, new.archive.min_free);
        tracing::info!(token_from = %source, concurrency = new.download.concurrency, "token and settings re-read");
        self.settings.config = new;
        Ok(())
    }

    /// How often `downloading` rows are checked for a dead downloader: the poll interval, but
    /// neither so often that it loads the database nor so rarely that a row waits for hours.
    fn orphan_interval(&self) -> Duration {
        self.settings
            .config
            .queue
            .poll_interval
            .clamp(Duration::from_secs(1), Duration::from_secs(60))
    }

    /// Rows left `downloading` by a downloader that is gone (a crashed daemon, a killed
    /// `hingnetd fetch`, a panicked task) go back to `pending`. A row is another process's
    /// while it holds the lock on the video's partial file; the token guard makes the release
    /// lose any race with a downloader that finishes meanwhile.
    async fn recover_orphans(&mut self) -> Result<(), crate::queue::QueueError> {
        let rows = self.queue.call(|q| q.downloading()).await?;
        for held in rows {
            if self.in_flight.values().any(|v| *v == held.video_id) {
                continue;
            }
            let fetcher = self.fetcher.clone();
            let id = held.video_id.clone();
            let live = tokio::task::spawn_blocking(move || {
                VideoId::parse(&id).is_ok_and(|v| fetcher.archive.partial_in_use(&v))
            })
            .await
            .unwrap_or(false);
            if live {
                continue;
            }
            let id = held.video_id.clone();
            if self.queue.call(move |q| q.release_stale(&held)).await? {
                tracing::warn!(video_id = %id, "row was left downloading by a downloader that stopped; pending again");
                self.counts_stale = true;
            }
        }
        Ok(())
    }

    /// Claims as many due rows as there are free slots, starts their downloads, and returns
    /// when the next pending row falls due (if none is due now).
    async fn fill_slots(&mut self) -> Result<Option<Instant>, crate::queue::QueueError> {
        let now = Instant::now();
        let free = match &self.account {
            _ if self.rate_limited_until.is_some() || self.unreachable_until.is_some() => 0,
            // Paused: one probe at a time, when its time comes.
            Some(a) if a.next_probe.is_some_and(|t| t <= now) && self.tasks.is_empty() => 1,
            Some(_) => 0,
            None => self
                .settings
                .config
                .download
                .concurrency
                .saturating_sub(self.tasks.len()),
        };
        if free == 0 {
            // Nothing to claim with: a finished download, or the end of a pause, looks again.
            // (Asking for the next due row here would spin while due rows wait for a slot.)
            return Ok(None);
        }
        if self.storage.as_ref().is_some_and(|s| s.next_check > now) {
            return Ok(None);
        }
        match self.fetcher.storage_problem().await {
            Some(reason) => {
                if self.storage.is_none() {
                    tracing::error!(reason = %reason, "NEW DOWNLOADS PAUSED until the archive has room again");
                    self.counts_stale = true;
                }
                self.storage = Some(StoragePause {
                    reason,
                    next_check: now + STORAGE_RECHECK,
                });
                return Ok(None);
            }
            None => {
                if self.storage.take().is_some() {
                    tracing::info!("archive storage is usable again: downloads resumed");
                    self.counts_stale = true;
                }
            }
        }
        if let Some(a) = &mut self.account {
            a.next_probe = None;
            self.reload_token();
        }
        let (claimed, took) = self
            .queue
            .call(move |q| {
                let t = std::time::Instant::now();
                q.claim(free).map(|c| (c, t.elapsed()))
            })
            .await?;
        let got = claimed.len();
        // The claim's own cost (the UPDATE and its commit, on the database thread); the
        // benchmark reads it to report claim time on a large queue.
        tracing::debug!(
            claimed = got,
            took_us = took.as_micros() as u64,
            "claimed due rows"
        );
        for c in claimed {
            self.spawn(c);
            self.counts_stale = true;
        }
        if got == free {
            // Every slot was filled; the next completion triggers the next look.
            return Ok(None);
        }
        if let Some(a) = self.account.as_mut().filter(|_| got == 0) {
            // Nothing to probe with; look again at the next backoff step.
            a.next_probe = Some(now + a.delay);
        }
        let due = self.queue.call(|q| q.next_due_in()).await?;
        // A row that is due by the clock but was not claimed has a timestamp that compares
        // differently as text (a producer's own format); look again soon, without spinning.
        let due = due.map(|d| if got == 0 && d.is_zero() { RELOOK } else { d });
        Ok(due.map(|d| now + d))
    }

    fn spawn(&mut self, claimed: Claimed) {
        let fetcher = self.fetcher.clone();
        let queue = self.queue.clone();
        let retry = self.settings.config.retry.clone();
        let cancel = self.downloads.clone();
        let video_id = claimed.video_id.clone();
        let task = self.tasks.spawn(async move {
            let started = Instant::now();
            let outcome = fetcher.download(&claimed.video_id, &cancel).await;
            let finish = decide(&claimed, &outcome, &retry, started.elapsed());
            log_decision(&claimed, &outcome, &finish, started.elapsed());
            let (c, f) = (claimed.clone(), finish.clone());
            let elapsed = started.elapsed();
            match queue.call(move |q| q.finish(&c, &f, elapsed)).await {
                Ok(true) => {}
                Ok(false) => tracing::warn!(video_id = %claimed.video_id, "row changed or vanished while downloading; outcome not recorded"),
                Err(e) => tracing::error!(video_id = %claimed.video_id, error = %e, "cannot record outcome; the row stays downloading until restart"),
            }
            Report { outcome }
        });
        self.in_flight.insert(task.id(), video_id);
    }

    /// Client-wide consequences of one attempt.
    fn absorb(&mut self, outcome: Outcome) {
        match outcome {
            Outcome::AccountProblem {
                http_status,
                reason,
            } => {
                let delay = match &self.account {
                    Some(a) => (a.delay * 2).min(self.settings.config.retry.max_delay),
                    None => self.settings.config.retry.initial_delay,
                };
                tracing::error!(
                    http_status,
                    reason = %reason,
                    probe_in = %format_duration(delay),
                    "API rejected the token: ALL DOWNLOADS PAUSED; fix the token (it is re-read before each probe)"
                );
                self.account = Some(AccountPause {
                    next_probe: Some(Instant::now() + delay),
                    delay,
                });
            }
            Outcome::RateLimited { retry_after } => {
                self.rate_limits_in_a_row += 1;
                let wait = retry_after.unwrap_or_else(|| {
                    backoff(&self.settings.config.retry, self.rate_limits_in_a_row)
                });
                let until = Instant::now() + wait;
                if self.rate_limited_until.is_none_or(|t| t < until) {
                    tracing::warn!(wait = %format_duration(wait), "rate limited (429): pausing all requests");
                    self.rate_limited_until = Some(until);
                }
            }
            Outcome::Unreachable { reason } => {
                self.unreachable_in_a_row += 1;
                let wait = backoff(&self.settings.config.retry, self.unreachable_in_a_row);
                let until = Instant::now() + wait;
                if self.unreachable_until.is_none_or(|t| t < until) {
                    tracing::warn!(reason = %reason, wait = %format_duration(wait), "API host unreachable: pausing all requests");
                    self.unreachable_until = Some(until);
                    self.counts_stale = true;
                }
            }
            // Any other answer means the token was accepted.
            Outcome::Archived { .. }
            | Outcome::NotReady { .. }
            | Outcome::Gone { .. }
            | Outcome::Transient { .. } => {
                self.rate_limits_in_a_row = 0;
                if std::mem::take(&mut self.unreachable_in_a_row) > 0 {
                    tracing::info!("API host reachable again");
                }
                if self.account.take().is_some() {
                    tracing::info!("API accepts the token again: downloads resumed");
                }
            }
            Outcome::InvalidId | Outcome::Interrupted { .. } | Outcome::Storage { .. } => {}
        }
    }

    fn reload_token(&self) {
        match config::load_token(&self.settings.config.api) {
            Ok((token, source)) => {
                tracing::info!(source = %source, "re-read the token before probing the API");
                self.fetcher.api().set_token(token);
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot re-read the token; probing with the old one")
            }
        }
    }

    /// Shutdown: no new claims; downloads in flight get the grace period to finish, then are
    /// cancelled, which parks their partial files and puts their rows back to pending.
    async fn drain(mut self) {
        if self.tasks.is_empty() {
            return;
        }
        tracing::info!(
            in_flight = self.tasks.len(),
            grace = %format_duration(self.settings.config.download.shutdown_grace),
            "shutting down: letting downloads in flight finish"
        );
        let grace_over = Instant::now() + self.settings.config.download.shutdown_grace;
        // Parking is quick, but recording it may wait on a producer's lock: past this, stop
        // anyway. Rows left `downloading` are recovered at the next start, and a partial file is
        // only ever resumed, never trusted as it is.
        let hard_stop = grace_over + PARK_TIMEOUT;
        loop {
            tokio::select! {
                joined = self.tasks.join_next() => match joined {
                    None => return,
                    Some(Ok(_)) => {}
                    Some(Err(e)) => tracing::error!(error = %e, "download task panicked"),
                },
                _ = tokio::time::sleep_until(grace_over), if !self.downloads.is_cancelled() => {
                    tracing::info!(in_flight = self.tasks.len(), "grace period over: parking downloads in flight");
                    self.downloads.cancel();
                }
                _ = tokio::time::sleep_until(hard_stop) => {
                    tracing::warn!(in_flight = self.tasks.len(), "downloads did not park in time; leaving them to recovery at the next start");
                    self.tasks.abort_all();
                    return;
                }
            }
        }
    }
}

fn log_decision(claimed: &Claimed, outcome: &Outcome, finish: &Finish, elapsed: Duration) {
    let id = claimed.video_id.as_str();
    let attempt = claimed.attempts;
    let elapsed_ms = elapsed.as_millis() as u64;
    match (outcome, finish) {
        (
            Outcome::Archived {
                published,
                http_status,
                received,
                resumed_from,
            },
            _,
        ) => tracing::info!(
            video_id = id,
            attempt,
            http_status,
            bytes = published.bytes,
            received,
            resumed_from,
            elapsed_ms,
            sha256 = %published.sha256,
            "archived"
        ),
        (
            _,
            Finish::Retry {
                delay,
                error,
                http_status,
            },
        ) => tracing::info!(
            video_id = id,
            attempt,
            http_status = http_status.map(i64::from),
            elapsed_ms,
            retry_in = %format_duration(*delay),
            reason = %error,
            "not downloaded yet; will retry"
        ),
        (_, Finish::Failed { error, http_status }) => tracing::warn!(
            video_id = id,
            attempt,
            http_status = http_status.map(i64::from),
            elapsed_ms,
            reason = %error,
            "failed for good"
        ),
        (Outcome::Interrupted { parked_bytes }, _) => tracing::info!(
            video_id = id,
            attempt,
            parked_bytes,
            elapsed_ms,
            "interrupted by shutdown; partial file kept for resume"
        ),
        (_, Finish::Release { delay, error }) => tracing::warn!(
            video_id = id,
            attempt,
            elapsed_ms,
            retry_in = %format_duration(*delay),
            reason = error.as_deref().unwrap_or(""),
            "put back to pending"
        ),
        (_, Finish::Done { .. }) => unreachable!("only Archived becomes Done"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn retry() -> RetryConfig {
        RetryConfig {
            initial_delay: Duration::from_secs(30),
            max_delay: Duration::from_secs(600),
            give_up_after: Duration::from_secs(3600),
        }
    }

    #[test]
    fn backoff_grows_with_jitter_and_caps() {
        let r = retry();
        for attempt in 1..40 {
            let full = (Duration::from_secs(30) * 2u32.pow((attempt - 1).min(10))).min(r.max_delay);
            let d = backoff(&r, attempt);
            assert!(
                d >= full / 2 && d <= full,
                "attempt {attempt}: {d:?} vs {full:?}"
            );
        }
    }

    #[test]
    fn not_ready_retries_until_the_deadline() {
        let r = retry();
        let c = |since| Claimed {
            key: rusqlite::types::Value::Text("v".into()),
            video_id: "v".into(),
            token: "t".into(),
            attempts: 3,
            since_first_attempt: Duration::from_secs(since),
        };
        let o = Outcome::NotReady {
            http_status: 400,
            reason: "not ready".into(),
        };
        assert!(matches!(
            decide(&c(0), &o, &r, Duration::ZERO),
            Finish::Retry { .. }
        ));
        match decide(&c(3590), &o, &r, Duration::ZERO) {
            Finish::Retry { delay, .. } => assert!(delay <= Duration::from_secs(10)),
            f => panic!("{f:?}"),
        }
        match decide(&c(3600), &o, &r, Duration::ZERO) {
            Finish::Failed { error, http_status } => {
                assert!(error.contains("gave up after 1h"), "{error}");
                assert_eq!(http_status, Some(400));
            }
            f => panic!("{f:?}"),
        }
    }

    #[test]
    fn gone_and_invalid_fail_account_problems_do_not() {
        let r = retry();
        let c = Claimed {
            key: rusqlite::types::Value::Text("v".into()),
            video_id: "v".into(),
            token: "t".into(),
            attempts: 1,
            since_first_attempt: Duration::from_secs(99_999),
        };
        let gone = Outcome::Gone {
            http_status: 404,
            reason: "x".into(),
        };
        assert!(matches!(
            decide(&c, &gone, &r, Duration::ZERO),
            Finish::Failed {
                http_status: Some(404),
                ..
            }
        ));
        assert!(matches!(
            decide(&c, &Outcome::InvalidId, &r, Duration::ZERO),
            Finish::Failed { .. }
        ));
        let auth = Outcome::AccountProblem {
            http_status: 401,
            reason: "bad".into(),
        };
        assert!(matches!(
            decide(&c, &auth, &r, Duration::ZERO),
            Finish::Release { .. }
        ));
    }
}

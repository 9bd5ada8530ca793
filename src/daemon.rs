//! The daemon loop: claiming due rows, running downloads up to the concurrency limit, turning
//! each attempt's `Outcome` into the row's next state (`decide`), client-wide pauses (429, an
//! unreachable API host, a refused token, a short disk), telling a refused token from one
//! refused video, and shutdown.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::api::ApiClient;
use crate::config::{self, Config, RetryConfig, format_duration};
use crate::fetch::{Ended, Fetcher, Limits, Outcome};
use crate::id::VideoId;
use crate::pause::{AccountPause, Pauses, token_advice};
use crate::policy::{REFUSALS_TO_FAIL, decide};
use crate::queue::{Claimed, Claims, Finish, QueueError};
use crate::service::{Service, thousands};
use crate::store::Partial;

/// What the loop runs with. Replaced on SIGHUP, except what cannot change live.
pub struct Settings {
    pub config: Config,
    /// Re-read on SIGHUP.
    pub config_path: PathBuf,
}

/// One claimed video, from the download to the row's next state, the way both the daemon and
/// `hingnetd fetch` run it: the download (into `partial` if the caller already holds it), the
/// verdict (`decide`), its log line, and the removal of what a failed video left behind. The
/// caller records the `Finish`.
pub async fn attempt(
    fetcher: &Arc<Fetcher>,
    claimed: &Claimed,
    partial: Option<(VideoId, Box<dyn Partial>)>,
    retry: &RetryConfig,
    cancel: &CancellationToken,
) -> (Ended, Finish, Duration) {
    let started = Instant::now();
    let ended = match partial {
        Some((id, p)) => {
            fetcher
                .download_into(id, p, claimed.expires_at, cancel)
                .await
        }
        None => {
            fetcher
                .download(&claimed.video_id, claimed.expires_at, cancel)
                .await
        }
    };
    let elapsed = started.elapsed();
    let finish = decide(claimed, &ended, retry, elapsed, SystemTime::now());
    log_decision(claimed, &ended.outcome, &finish, elapsed);
    let m = crate::metrics::get();
    m.attempt(ended.outcome.label());
    match &finish {
        Finish::Done { file, .. } => {
            m.finished(true);
            m.archived(elapsed, file.bytes);
        }
        Finish::Failed { .. } => m.finished(false),
        Finish::Retry { .. } | Finish::Release { .. } => {}
    }
    if matches!(finish, Finish::Failed { .. })
        && let Ok((id, _)) = VideoId::from_queued(&claimed.video_id)
    {
        fetcher.remove_leftovers(&id).await;
    }
    (ended, finish, elapsed)
}

/// The shortest wait before claiming again when the clock and the claim disagree.
const RELOOK: Duration = Duration::from_millis(250);

/// The status line while the queue's database is away.
const UNREACHABLE: &str = "queue database unreachable; downloads in flight go on, and record their outcomes once it is back";

/// The status line is recounted at most this often.
const STATUS_EVERY: Duration = Duration::from_secs(2);

/// How long parked downloads get to record themselves after the grace period.
const PARK_TIMEOUT: Duration = Duration::from_secs(5);

/// What a finished download task reports to the loop.
struct Report {
    claimed: Claimed,
    outcome: Outcome,
    /// When the task started (its request was sent after this).
    started: Instant,
}

pub struct Scheduler {
    settings: Settings,
    queue: Arc<dyn Claims>,
    fetcher: Arc<Fetcher>,
    tasks: JoinSet<Report>,
    /// Videos this daemon is downloading now, by task (the rest of `downloading` rows belong to
    /// a `hingnetd fetch`, or to a downloader that died). A panicked task is removed by its id.
    in_flight: HashMap<tokio::task::Id, String>,
    /// When `downloading` rows were last checked for a dead downloader.
    orphans_checked: Option<Instant>,
    /// Cancels downloads in flight (after the shutdown grace period).
    downloads: CancellationToken,
    pauses: Pauses,
    /// Fired by SIGHUP.
    reload: Arc<Notify>,
    service: Service,
    /// The status line needs fresh counts (something changed since the last ones).
    counts_stale: bool,
    counts_at: Option<Instant>,
    metrics: crate::metrics::Serving,
}

impl Scheduler {
    pub fn new(
        settings: Settings,
        queue: Arc<dyn Claims>,
        fetcher: Arc<Fetcher>,
        reload: Arc<Notify>,
        service: Service,
        metrics: crate::metrics::Serving,
    ) -> Scheduler {
        Scheduler {
            settings,
            queue,
            fetcher,
            tasks: JoinSet::new(),
            in_flight: HashMap::new(),
            orphans_checked: None,
            downloads: CancellationToken::new(),
            pauses: Pauses::default(),
            reload,
            service,
            counts_stale: true,
            counts_at: None,
            metrics,
        }
    }

    /// Runs until `shutdown` is cancelled, then drains (see `drain`).
    pub async fn run(mut self, shutdown: CancellationToken) {
        // Pauses a daemon that died left behind are not in force.
        self.clear_pauses().await;
        // Whether a due row may be waiting: set by anything that can make one due.
        let mut look = true;
        let mut next_due: Option<Instant> = None;
        let mut last_look = Instant::now();
        let mut db_backoff = Duration::from_millis(500);
        loop {
            if self.pauses.expire(Instant::now()) {
                self.counts_stale = true;
                look = true;
            }
            if self
                .orphans_checked
                .is_none_or(|t| t.elapsed() >= self.orphan_interval())
            {
                self.orphans_checked = Some(Instant::now());
                match self.recover_orphans().await {
                    // Rows put back are due now.
                    Ok(true) => look = true,
                    Ok(false) => {}
                    Err(e) => tracing::error!(error = %e, "cannot check for interrupted rows"),
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
                        self.service.status(if e.is_unreachable() {
                            UNREACHABLE.to_owned()
                        } else {
                            format!("queue database error: {e}")
                        });
                        // Looked again at next_due, not at the next wake-up of any kind; a
                        // probe that was due waits as long (it would meet the same error).
                        look = false;
                        let again = Instant::now() + db_backoff;
                        next_due = Some(again);
                        if let Some(a) = &mut self.pauses.account {
                            a.next_probe = a.next_probe.max(again);
                        }
                        db_backoff = (db_backoff * 2).min(Duration::from_secs(60));
                    }
                }
            }
            self.service.ping_if_due();
            self.update_status().await;
            self.publish_pauses().await;
            let poll = self.settings.config.queue.poll_interval;
            // When to look for due rows whatever else happens: the safety-net poll, the next
            // due row, the end of a pause. Kept apart from the other wake-ups (rechecks, pings,
            // the status line) so that no stream of those can put a look off.
            let look_at = [Some(last_look + poll), next_due]
                .into_iter()
                .flatten()
                .chain(self.pauses.deadlines(self.tasks.is_empty()))
                .min()
                .expect("the poll deadline is always there");
            let wake_at = [
                Some(look_at),
                self.orphans_checked.map(|t| t + self.orphan_interval()),
                self.service.ping_due(),
                self.counts_at
                    .filter(|_| self.counts_stale)
                    .map(|t| t + STATUS_EVERY),
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
                            self.absorb(task, report).await;
                        }
                        // The row stays `downloading`, no longer ours: the orphan check
                        // recovers it.
                        Err(e) => {
                            let video = self.in_flight.remove(&e.id()).unwrap_or_default();
                            tracing::error!(video_id = %video, error = %e, "download task panicked");
                            if let Some(a) = self.pauses.account.as_mut().filter(|a| a.probe == Some(e.id())) {
                                a.probe = None;
                            }
                        }
                    }
                    self.counts_stale = true;
                    look = true;
                }
                // Another process added or changed rows.
                _ = self.queue.changed() => {
                    self.counts_stale = true;
                    look = true;
                }
                _ = self.reload.notified() => {
                    self.apply_reload();
                    look = true;
                }
                _ = tokio::time::sleep_until(wake_at) => {
                    if look_at <= Instant::now() {
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
        let counts = match self.queue.counts().await {
            Ok(c) => c,
            // Stays stale: tried again after STATUS_EVERY. (With every slot busy no claim is
            // tried, so this is where an unreachable database shows.)
            Err(e) => {
                tracing::warn!(error = %e, "cannot count rows for the status line");
                if e.is_unreachable() {
                    self.service.status(UNREACHABLE.to_owned());
                }
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
        // The first pause is the one to fix first (`pauses` lists them in that order).
        if let Some(p) = self.pauses().first() {
            text.push_str("; paused: ");
            text.push_str(&p.detail);
        }
        self.service.status(text);
    }

    /// Every pause in force now, the one to act on first first.
    fn pauses(&self) -> Vec<crate::pause::Pause> {
        self.pauses.in_force(|reason| {
            if reason.starts_with("archive bucket") {
                format!(
                    "the archive bucket ({}): what the reason names (the store, its access key or permissions); new downloads start once it answers",
                    self.fetcher.store().location(),
                )
            } else {
                format!(
                    "free space in the archive's filesystem ({}); new downloads start once it has archive.min_free ({}) free",
                    self.fetcher.store().location(),
                    config::format_size(self.settings.config.archive.min_free)
                )
            }
        })
    }

    async fn clear_pauses(&mut self) {
        crate::metrics::get().set_paused(&[]);
        match self.queue.set_pauses(Vec::new()).await {
            Ok(()) => self.pauses.published(Vec::new()),
            Err(e) => tracing::warn!(error = %e, "cannot clear the published pauses"),
        }
    }

    /// Publishes the pauses when they change: to the queue database for `hingnetd status`
    /// (another process) and to the metrics. A failed write is tried again at the next turn.
    async fn publish_pauses(&mut self) {
        let now = self.pauses();
        let Some(records) = self.pauses.unpublished(&now) else {
            return;
        };
        crate::metrics::get().set_paused(&records.iter().map(|r| r.reason).collect::<Vec<_>>());
        match self.queue.set_pauses(records).await {
            Ok(()) => self.pauses.published(now),
            Err(e) => tracing::warn!(error = %e, "cannot publish the pauses for `hingnetd status`"),
        }
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
                if let Some(a) = &mut self.pauses.account {
                    a.delay = self.settings.config.retry.initial_delay;
                    a.next_probe = Instant::now();
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
        for (key, changed) in [
            (
                "queue.password_file",
                new.queue.password_file != old.queue.password_file,
            ),
            ("queue.lease", new.queue.lease != old.queue.lease),
            ("queue.instance", new.queue.instance != old.queue.instance),
        ] {
            if changed {
                tracing::warn!(key, "cannot change while running; restart to apply");
            }
        }
        new.queue.password_file = old.queue.password_file.clone();
        new.queue.lease = old.queue.lease;
        new.queue.instance = old.queue.instance.clone();
        for (key, changed) in [
            ("archive.dir", new.archive.dir != old.archive.dir),
            (
                "archive.staging_dir",
                new.archive.staging_dir != old.archive.staging_dir,
            ),
            ("archive.s3", new.archive.s3 != old.archive.s3),
        ] {
            if changed {
                tracing::warn!(key, "cannot change while running; restart to apply");
            }
        }
        new.archive.dir = old.archive.dir.clone();
        new.archive.staging_dir = old.archive.staging_dir.clone();
        new.archive.s3 = old.archive.s3.clone();
        if new.log.level != old.log.level || new.log.format != old.log.format {
            tracing::warn!(key = "log", "log settings apply at the next start");
        }
        // Last of the checks, as it acts: the new listener is bound before the old one stops.
        self.metrics
            .apply(new.metrics.addr(), new.archive.min_free)
            .map_err(|e| e.to_string())?;
        // Downloads in flight keep the client they started with.
        self.fetcher.replace_api(api);
        self.fetcher.set_limits(Limits::of(&new));
        self.fetcher.store().keep_free(new.archive.min_free);
        tracing::info!(token_from = %source, concurrency = new.download.concurrency, "token and settings re-read");
        log_rate_limit(new.download.rate_limit);
        self.settings.config = new;
        Ok(())
    }

    /// How often `downloading` rows are checked for a dead downloader: the poll interval, but
    /// neither so often that it loads the database nor so rarely that a row waits for hours,
    /// nor much longer than a lease (a shared queue's claims of a dead daemon wait that long).
    fn orphan_interval(&self) -> Duration {
        let queue = &self.settings.config.queue;
        queue
            .poll_interval
            .clamp(Duration::from_secs(1), Duration::from_secs(60))
            .min(queue.lease.max(Duration::from_secs(1)))
    }

    /// Rows left `downloading` by a downloader that is gone (a crashed daemon, a killed
    /// `hingnetd fetch`, a panicked task) go back to `pending`; the queue tells which claims
    /// are still alive, apart from the downloads in flight here.
    /// Returns whether any row was put back.
    async fn recover_orphans(&mut self) -> Result<bool, QueueError> {
        let ours = self.in_flight.values().cloned().collect();
        let recovered = self.queue.recover_stale(ours).await;
        let any = !recovered.released.is_empty();
        for id in recovered.released {
            tracing::warn!(video_id = %id, "row was left downloading by a downloader that stopped; pending again");
            self.counts_stale = true;
        }
        recovered.error.map_or(Ok(any), Err)
    }

    /// Claims as many due rows as there are free slots, starts their downloads, and returns
    /// when the next pending row falls due (if none is due now).
    async fn fill_slots(&mut self) -> Result<Option<Instant>, QueueError> {
        let now = Instant::now();
        let free = self.pauses.slots(
            self.settings.config.download.concurrency,
            self.tasks.len(),
            now,
        );
        if free == 0 {
            // Nothing to claim with: a finished download, or the end of a pause, looks again.
            // (Asking for the next due row here would spin while due rows wait for a slot.)
            return Ok(None);
        }
        if self.pauses.storage_resting(now) {
            return Ok(None);
        }
        let problem = self.fetcher.store().storage_problem().await;
        let short = problem.is_some();
        if self.pauses.storage_seen(problem, now) {
            self.counts_stale = true;
        }
        if short {
            return Ok(None);
        }
        // A probe goes to another video than those refused, if one is due; to any video only
        // at the probe's time. Nothing here changes the pause until a probe is under way, so
        // an error (the database) leaves the probe scheduled.
        let (except, any_at) = match &self.pauses.account {
            Some(a) => (
                a.suspects.keys().cloned().collect::<Vec<_>>(),
                a.next_probe <= now,
            ),
            None => (Vec::new(), true),
        };
        let mut claimed = self.queue.claim(free, except, any_at).await?;
        let got = claimed.len();
        if self.pauses.account.is_some() {
            // The operator may have fixed the token: the probe goes with what is there now.
            let probe = claimed.pop().map(|c| {
                self.reload_token();
                self.spawn(c)
            });
            let a = self.pauses.account.as_mut().expect("checked above");
            match probe {
                Some(task) => {
                    a.probe = Some(task);
                    self.counts_stale = true;
                }
                // Nothing to probe with now; look again at the next backoff step.
                None if any_at => a.next_probe = now + a.delay,
                None => {}
            }
            // The next look is the probe's time, a new row, or a download's end: the rows due
            // now are the suspects, which are not to be claimed before then.
            return Ok(None);
        }
        for c in claimed {
            self.spawn(c);
            self.counts_stale = true;
        }
        if got == free {
            // Every slot was filled; the next completion triggers the next look.
            return Ok(None);
        }
        let due = self.queue.next_due_in().await?;
        // A row that is due by the clock but was not claimed has a timestamp that compares
        // differently as text (a producer's own format); look again soon, without spinning.
        let due = due.map(|d| if got == 0 && d.is_zero() { RELOOK } else { d });
        Ok(due.map(|d| now + d))
    }

    fn spawn(&mut self, claimed: Claimed) -> tokio::task::Id {
        let fetcher = self.fetcher.clone();
        let queue = self.queue.clone();
        let retry = self.settings.config.retry.clone();
        let cancel = self.downloads.clone();
        let video_id = claimed.video_id.clone();
        let task = self.tasks.spawn(async move {
            let started = Instant::now();
            let (ended, finish, elapsed) = attempt(&fetcher, &claimed, None, &retry, &cancel).await;
            record(&*queue, &claimed, &finish, elapsed, ended.expires_at).await;
            Report {
                claimed,
                outcome: ended.outcome,
                started,
            }
        });
        let id = task.id();
        self.in_flight.insert(id, video_id);
        id
    }

    /// Client-wide consequences of one attempt.
    async fn absorb(&mut self, task: tokio::task::Id, report: Report) {
        let Report {
            claimed,
            outcome,
            started,
        } = report;
        let retry = self.settings.config.retry.clone();
        let probe = (self.pauses.account.as_ref()).is_some_and(|a| a.probe == Some(task));
        if probe && let Some(a) = &mut self.pauses.account {
            a.probe = None;
            // Whatever it says (a 429, a shutdown, no request at all), the next probe may go
            // as soon as the loop allows, unless the answer below says otherwise.
            a.next_probe = a.next_probe.min(Instant::now());
        }
        match outcome {
            Outcome::AccountProblem {
                http_status,
                reason,
            } => self.refused(claimed, probe, http_status, reason),
            Outcome::RateLimited { retry_after } => self.pauses.rate_limited(&retry, retry_after),
            Outcome::Unreachable { reason } => {
                if self.pauses.unreachable(&retry, &reason) {
                    self.counts_stale = true;
                }
            }
            Outcome::DiskShort { reason } | Outcome::StoreAway { reason } => {
                self.pauses.disk_short(reason);
                self.counts_stale = true;
            }
            // Any other answer means the token was accepted.
            Outcome::Archived { .. }
            | Outcome::Kept { .. }
            | Outcome::NotReady { .. }
            | Outcome::MaybeMissing { .. }
            | Outcome::Gone { .. }
            | Outcome::Transient { .. } => {
                if let Some(a) = self.pauses.answered(&claimed.video_id, started) {
                    self.accepted(a, &claimed.video_id).await;
                }
            }
            Outcome::InvalidId
            | Outcome::Blocked { .. }
            | Outcome::Interrupted { .. }
            | Outcome::Storage { .. } => {}
        }
    }

    /// The API refused a video (401/402/403). A refusal only pauses: it is the token's when
    /// another video is refused too, the video's when others are not (`accepted`).
    fn refused(&mut self, claimed: Claimed, probe: bool, http_status: u16, reason: String) {
        let retry = &self.settings.config.retry;
        let video = claimed.video_id.clone();
        let Some(a) = &mut self.pauses.account else {
            tracing::error!(
                video_id = %video,
                http_status,
                reason = %reason,
                "API refused a download: ALL DOWNLOADS PAUSED while one probe on another video tells whether the token or this video is refused"
            );
            let suspects = HashMap::from([(video, (claimed, http_status, reason))]);
            self.pauses.account = Some(AccountPause {
                since: Instant::now(),
                next_probe: Instant::now() + retry.initial_delay,
                delay: retry.initial_delay,
                confirmed: false,
                probe: None,
                suspects,
            });
            self.counts_stale = true;
            return;
        };
        let another = !a.suspects.contains_key(&video);
        if another && !a.confirmed {
            a.confirmed = true;
            tracing::error!(
                http_status,
                reason = %reason,
                probe_in = %format_duration(a.delay),
                "API rejected the token for another video too: ALL DOWNLOADS PAUSED; fix the token ({})",
                token_advice()
            );
            self.counts_stale = true;
        }
        // Only a probe's refusal moves the next probe back: the downloads that were in flight
        // when the pause began are refused too, and say nothing new.
        if probe {
            a.delay = (a.delay * 2).min(retry.max_delay);
            a.next_probe = Instant::now() + a.delay;
            tracing::warn!(video_id = %video, http_status, probe_in = %format_duration(a.delay), "token probe refused");
        }
        a.suspects
            .entry(video)
            .or_insert((claimed, http_status, reason));
    }

    /// An answer that is not a refusal, to a request sent after the first refusal, ended the
    /// pause. If no second video was refused, the refusals were about the videos themselves:
    /// each counts against its video (not the one that just answered), which fails at
    /// `REFUSALS_TO_FAIL` with the API's message.
    async fn accepted(&mut self, pause: AccountPause, answered: &str) {
        self.counts_stale = true;
        if pause.confirmed {
            tracing::info!("API accepts the token again: downloads resumed");
            return;
        }
        tracing::info!(
            refused = pause.suspects.len(),
            "API accepts the token for other videos: the refusal was about the video; downloads resumed"
        );
        for (video, (claimed, http_status, reason)) in pause.suspects {
            if video == answered {
                continue;
            }
            let n = self.pauses.refusals.entry(video.clone()).or_default();
            *n += 1;
            if *n < REFUSALS_TO_FAIL {
                tracing::warn!(video_id = %video, http_status, refusals = *n, reason = %reason, "the API refused this video, not the token; it fails after {REFUSALS_TO_FAIL} such refusals");
                continue;
            }
            self.pauses.refusals.remove(&video);
            let error = format!(
                "the API refused this video {REFUSALS_TO_FAIL} times ({http_status}) while it accepted the token for others: {reason}"
            );
            match self
                .queue
                .fail_released(&claimed, &error, Some(http_status))
                .await
            {
                Ok(true) => {
                    crate::metrics::get().finished(false);
                    tracing::warn!(video_id = %video, http_status, reason = %error, "failed for good");
                    if let Ok((id, _)) = VideoId::from_queued(&video) {
                        self.fetcher.remove_leftovers(&id).await;
                    }
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::error!(video_id = %video, error = %e, "cannot fail the refused video; it is tried again")
                }
            }
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
        self.clear_pauses().await;
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

/// Records a download's outcome. While the queue's server is unreachable it waits and tries
/// again (the download's work is not thrown away, and nothing is failed for the database's
/// absence); the claim's fence decides, once it is back, whether the outcome is still ours.
async fn record(
    queue: &dyn Claims,
    claimed: &Claimed,
    finish: &Finish,
    elapsed: Duration,
    expires_at: Option<i64>,
) {
    let mut wait = Duration::from_millis(250);
    let mut tried = false;
    // A refusal "for now" that keeps coming (a statement_timeout shorter than the statement)
    // is given up on after a while; the database being away is waited out.
    const TRANSIENT_TRIES: u32 = 10;
    let mut tries = 0;
    loop {
        match queue.finish(claimed, finish, elapsed, expires_at).await {
            Ok(true) => return,
            Ok(false) if tried => {
                tracing::warn!(video_id = %claimed.video_id, "the row is no longer this claim's: an earlier try may have recorded this outcome before its answer was lost, or the claim was lost while the database was away; not recorded again");
                return;
            }
            Ok(false) => {
                tracing::warn!(video_id = %claimed.video_id, "lost the claim while downloading (the row changed or vanished, or its lease passed and another downloader took it over); outcome discarded");
                return;
            }
            Err(e) if e.is_unreachable() || e.is_temporary() && tries < TRANSIENT_TRIES => {
                tried = true;
                if !e.is_unreachable() {
                    tries += 1;
                }
                tracing::warn!(video_id = %claimed.video_id, error = %e, retry_in = ?wait, "cannot record the outcome yet; trying again");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(15));
            }
            Err(e) => {
                tracing::error!(video_id = %claimed.video_id, error = %e, "cannot record outcome; the row is left to be recovered and tried again");
                return;
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
        (
            _,
            Finish::Failed {
                error,
                http_status,
                kept: Some(kept),
            },
        ) => tracing::warn!(
            video_id = id,
            attempt,
            http_status = http_status.map(i64::from),
            bytes = kept.bytes,
            path = %kept.path,
            sha256 = %kept.sha256,
            elapsed_ms,
            reason = %error,
            "failed for good; the bytes the API served are kept"
        ),
        (
            _,
            Finish::Failed {
                error,
                http_status,
                kept: None,
            },
        ) => tracing::warn!(
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

/// At start and on every reload: what the operator set, as it is in force.
pub fn log_rate_limit(rate: u64) {
    match rate {
        0 => tracing::info!("download rate limit: unlimited"),
        r => tracing::info!(
            rate_limit = %config::format_rate(r),
            "download rate limit: {} (shared by all downloads)",
            crate::bandwidth::describe(r)
        ),
    }
}

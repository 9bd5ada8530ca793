//! One download attempt of one video, from the API request to a published archive file, and
//! the `Outcome` it ends in. Decisions about the row (when to retry, when to give up) are the
//! daemon's; this module only says what happened, and what the status endpoint said about the
//! video when the content endpoint did not give it (`Attempt::not_served`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use reqwest::StatusCode;
use tokio_util::sync::CancellationToken;

use crate::api::{self, Action, Answer, ApiClient, StatusObject, StatusRead, VideoState};
use crate::bandwidth::Bandwidth;
use crate::config::{Config, format_duration, format_size};
use crate::id::VideoId;
use crate::store::{Existing, Partial, Publish, Published, Store, StoreError, Written};

/// A download that the server will not resume properly starts over at most this many times
/// within one attempt.
const MAX_RESTARTS: u32 = 2;
/// Whole downloads of a file that is complete by HTTP but not a whole MP4, at most: the second
/// (or third) bringing the same bytes again means they are what the API has.
const MAX_FULL_DOWNLOADS: u32 = 3;
/// Ranges requested one after another within one attempt from a server that caps the size of
/// a 206 (see `StreamEnd::Continue`); past this the attempt ends, resumably.
const MAX_PIECES: u32 = 10_000;
/// The status object is read at most this often per video (see `status_interval`).
const STATUS_EVERY: Duration = Duration::from_secs(60);
/// What a video's entry in `Fetcher::seen` is forgotten after, once the map grows.
const SEEN_FOR: Duration = Duration::from_secs(3600);

/// How one attempt ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Archived {
        published: Published,
        http_status: u16,
        /// Bytes received in this attempt (less than the file when resumed).
        received: u64,
        resumed_from: u64,
    },
    /// A body complete by HTTP that is not a whole MP4, served the same way twice (or three
    /// different ways): what the API has. Kept in the archive; the row fails.
    Kept {
        published: Published,
        http_status: u16,
        reason: String,
    },
    /// Not downloadable yet (400, or 404 while the status endpoint says pending).
    NotReady { http_status: u16, reason: String },
    /// Content and status both a JSON 404, once: perhaps a lagging replica. Confirmed again at
    /// least `retry.initial_delay` later before the video fails.
    MaybeMissing { reason: String },
    /// Worth retrying with backoff: network trouble, 5xx, truncated or non-video bodies.
    Transient {
        http_status: Option<u16>,
        reason: String,
    },
    /// The video does not exist, failed upstream or expired: never request it again.
    Gone { http_status: u16, reason: String },
    /// Something that is not a regular file sits at the video's archive path.
    Blocked { reason: String },
    /// The ID can never be requested.
    InvalidId,
    /// The API refused (401/402/403): the token, or this one video; the daemon finds out which.
    AccountProblem { http_status: u16, reason: String },
    /// 429: the whole client waits.
    RateLimited { retry_after: Option<Duration> },
    /// The API host could not be reached at all: the whole client waits.
    Unreachable { reason: String },
    /// Shutdown: the partial file is parked for the next run.
    Interrupted { parked_bytes: u64 },
    /// The archive could not be written (disk, permissions): not the video's fault.
    Storage { reason: String },
    /// The disk's free space fell below `archive.min_free` while writing: the partial is kept,
    /// and new downloads wait for room.
    DiskShort { reason: String },
    /// The archive's store cannot be used now (a bucket down, busy or refusing the key): a
    /// finished download stays staged for the next attempt, and new downloads wait.
    StoreAway { reason: String },
}

impl Outcome {
    /// Every `label`, for the metrics to create their series up front.
    pub const LABELS: [&'static str; 15] = [
        "archived",
        "kept",
        "not_ready",
        "maybe_missing",
        "transient",
        "gone",
        "blocked",
        "invalid_id",
        "refused",
        "rate_limited",
        "unreachable",
        "interrupted",
        "storage",
        "disk_short",
        "store_away",
    ];

    /// The outcome's name as a metrics label.
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Archived { .. } => "archived",
            Outcome::Kept { .. } => "kept",
            Outcome::NotReady { .. } => "not_ready",
            Outcome::MaybeMissing { .. } => "maybe_missing",
            Outcome::Transient { .. } => "transient",
            Outcome::Gone { .. } => "gone",
            Outcome::Blocked { .. } => "blocked",
            Outcome::InvalidId => "invalid_id",
            Outcome::AccountProblem { .. } => "refused",
            Outcome::RateLimited { .. } => "rate_limited",
            Outcome::Unreachable { .. } => "unreachable",
            Outcome::Interrupted { .. } => "interrupted",
            Outcome::Storage { .. } => "storage",
            Outcome::DiskShort { .. } => "disk_short",
            Outcome::StoreAway { .. } => "store_away",
        }
    }
}

/// An attempt's outcome, and what it learned about the video on the way.
#[derive(Debug, Clone, PartialEq)]
pub struct Ended {
    pub outcome: Outcome,
    /// When the video's file expires (unix seconds), if the status object said.
    pub expires_at: Option<i64>,
}

impl From<Outcome> for Ended {
    fn from(outcome: Outcome) -> Ended {
        Ended {
            outcome,
            expires_at: None,
        }
    }
}

/// Told the bytes of the file so far and its total (when known) as a download streams.
pub type Progress = Arc<dyn Fn(u64, Option<u64>) + Send + Sync>;

/// The settings a download runs with; replaced as a whole on reload.
#[derive(Debug, Clone)]
pub struct Limits {
    /// `download.max_bytes`.
    pub max_bytes: u64,
    /// `download.low_speed_limit` (bytes a second; 0: off) and `download.low_speed_time`.
    pub low_speed: (u64, Duration),
    /// `archive.sidecar`.
    pub sidecar: bool,
    /// `download.rate_limit` (bytes a second for the whole process; 0: unlimited).
    pub rate_limit: u64,
    /// How often a video's status object may be read.
    pub status_every: Duration,
    /// How far apart the two JSON 404s that fail a video as not found must be
    /// (`retry.initial_delay`).
    pub confirm_gap: Duration,
}

/// How often a video's status object may be read: once a minute, or once per
/// `retry.max_delay` if that is shorter, so that every retry may look.
pub fn status_interval(retry: &crate::config::RetryConfig) -> Duration {
    STATUS_EVERY.min(retry.max_delay)
}

impl Limits {
    pub fn of(config: &Config) -> Limits {
        Limits {
            max_bytes: config.download.max_bytes,
            low_speed: (
                config.download.low_speed_limit,
                config.download.low_speed_time,
            ),
            sidecar: config.archive.sidecar,
            rate_limit: config.download.rate_limit,
            status_every: status_interval(&config.retry),
            confirm_gap: config.retry.initial_delay,
        }
    }
}

/// What the fetcher remembers of a video between attempts (in memory: a restart forgets, which
/// costs at most one more status read, 404 confirmation or refused resume).
#[derive(Debug, Clone, Copy)]
struct Seen {
    status_read: Option<Instant>,
    /// The first of the two JSON 404 confirmations.
    not_found: Option<Instant>,
    /// The offset of the last resume a server answered with a 5xx.
    resume_refused_at: Option<u64>,
    at: Instant,
}

/// `Seen` for every video the fetcher has something to remember of. Entries go when a video
/// is archived or gone; the rest are pruned once the map doubles, keeping the last hour's.
#[derive(Debug, Default)]
struct Memory {
    videos: HashMap<VideoId, Seen>,
    prune_at: usize,
}

impl Memory {
    fn entry(&mut self, id: &VideoId) -> &mut Seen {
        if self.videos.len() >= self.prune_at.max(4096) {
            self.videos.retain(|_, s| s.at.elapsed() < SEEN_FOR);
            self.prune_at = 2 * self.videos.len();
        }
        let now = Instant::now();
        let s = self.videos.entry(id.clone()).or_insert(Seen {
            status_read: None,
            not_found: None,
            resume_refused_at: None,
            at: now,
        });
        s.at = now;
        s
    }
}

pub struct Fetcher {
    /// Replaced as a whole on reload; a download keeps the client it started with.
    api: RwLock<Arc<ApiClient>>,
    store: Arc<dyn Store>,
    progress: Option<Progress>,
    limits: RwLock<Limits>,
    seen: Mutex<Memory>,
    /// One budget for every download this fetcher runs: the limit is their total.
    bandwidth: Bandwidth,
}

impl Fetcher {
    pub fn new(api: ApiClient, store: Arc<dyn Store>, limits: Limits) -> Fetcher {
        Fetcher {
            api: RwLock::new(Arc::new(api)),
            store,
            progress: None,
            bandwidth: Bandwidth::new(limits.rate_limit),
            limits: RwLock::new(limits),
            seen: Mutex::default(),
        }
    }

    /// The settings, after a reload. The rate limit reaches downloads in flight too (they
    /// keep the rest of the settings they started with).
    pub fn set_limits(&self, limits: Limits) {
        self.bandwidth.set_rate(limits.rate_limit);
        *self.limits.write().unwrap_or_else(|p| p.into_inner()) = limits;
    }

    fn limits(&self) -> Limits {
        self.limits
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The archive downloads go to.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    pub fn with_progress(mut self, progress: Progress) -> Fetcher {
        self.progress = Some(progress);
        self
    }

    pub fn api(&self) -> Arc<ApiClient> {
        self.api.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn replace_api(&self, api: ApiClient) {
        *self.api.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(api);
    }

    /// Downloads one video, named as the queue holds it. `expires_at` is what the row knows of
    /// its expiry. `cancel` parks the download as a resumable partial.
    pub async fn download(
        self: &Arc<Self>,
        raw_id: &str,
        expires_at: Option<i64>,
        cancel: &CancellationToken,
    ) -> Ended {
        let Ok((id, trimmed)) = VideoId::from_queued(raw_id) else {
            return Outcome::InvalidId.into();
        };
        if trimmed {
            tracing::info!(queued_as = ?raw_id, video_id = %id, "video id had whitespace around it; trimmed");
        }
        match self.begin(&id).await {
            Ok(partial) => self.download_into(id, partial, expires_at, cancel).await,
            Err(outcome) => outcome.into(),
        }
    }

    /// Begins or resumes the video's partial: the video's only writer while it lives, in any
    /// process (`StoreError::Busy` for a second one).
    pub async fn begin(&self, id: &VideoId) -> Result<Box<dyn Partial>, Outcome> {
        self.store.begin(id).await.map_err(storage_outcome)
    }

    /// Removes what a download of this video left, once its row has failed.
    pub async fn remove_leftovers(&self, id: &VideoId) {
        self.forget(id);
        if let Err(e) = self.store.remove_leftovers(id).await {
            tracing::warn!(video_id = %id, error = %e, "cannot remove the failed video's partial file");
        }
    }

    /// Downloads into a partial from `begin`.
    pub async fn download_into(
        self: &Arc<Self>,
        id: VideoId,
        partial: Box<dyn Partial>,
        expires_at: Option<i64>,
        cancel: &CancellationToken,
    ) -> Ended {
        let existing = match self.store.existing(&id).await {
            Ok(e) => e,
            Err(e) => return storage_outcome(e).into(),
        };
        match existing {
            Existing::Adopted(mut published) => {
                tracing::info!(video_id = %id, path = %published.path, "found already archived file; not downloading again");
                published.metadata = published.metadata.as_deref().and_then(api::clean_metadata);
                let _ = partial.discard().await;
                self.forget(&id);
                return Outcome::Archived {
                    published,
                    http_status: 200,
                    received: 0,
                    resumed_from: 0,
                }
                .into();
            }
            Existing::Blocked(reason) => {
                let _ = partial.discard().await;
                return Outcome::Blocked { reason }.into();
            }
            // Logged where it was renamed; the download goes ahead.
            Existing::SetAside { .. } | Existing::Absent => {}
        }
        let mut attempt = Attempt {
            api: self.api(),
            fetcher: self.clone(),
            limits: self.limits(),
            id,
            partial: Some(partial),
            resumed_from: None,
            resume_failed: false,
            status: None,
            metadata_read: None,
            expires_at,
            cancel,
        };
        let outcome = attempt.run().await;
        if matches!(
            outcome,
            Outcome::Archived { .. } | Outcome::Kept { .. } | Outcome::Gone { .. }
        ) {
            self.forget(&attempt.id);
        }
        if let Some(task) = attempt.metadata_read.take() {
            task.abort();
        }
        Ended {
            outcome,
            expires_at: attempt.learned_expiry(),
        }
    }

    fn seen(&self) -> std::sync::MutexGuard<'_, Memory> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn forget(&self, id: &VideoId) {
        self.seen().videos.remove(id);
    }

    /// Whether the status object of `id` may be read now (at most every `status_every`); if it
    /// may, the read is counted.
    fn may_read_status(&self, id: &VideoId, every: Duration) -> bool {
        let mut seen = self.seen();
        let s = seen.entry(id);
        if s.status_read.is_some_and(|t| t.elapsed() < every) {
            return false;
        }
        s.status_read = Some(Instant::now());
        true
    }

    /// A JSON 404 from both endpoints: `Some(gap)` if it confirms one seen at least `gap` ago,
    /// `None` if this is the first (now remembered).
    fn confirm_missing(&self, id: &VideoId, gap: Duration) -> Option<Duration> {
        let mut seen = self.seen();
        let s = seen.entry(id);
        match s.not_found {
            Some(first) if first.elapsed() >= gap => Some(first.elapsed()),
            Some(_) => None,
            None => {
                s.not_found = Some(Instant::now());
                None
            }
        }
    }

    /// Anything but a 404 from the content endpoint: an earlier 404 proved nothing.
    fn not_missing(&self, id: &VideoId) {
        if let Some(s) = self.seen().videos.get_mut(id) {
            s.not_found = None;
        }
    }

    /// A resume at `offset` answered with a 5xx: whether the one before was refused at the
    /// same offset too (then the Range itself is suspect, not the server's health).
    fn resume_refused_again(&self, id: &VideoId, offset: u64) -> bool {
        let mut seen = self.seen();
        let s = seen.entry(id);
        let again = s.resume_refused_at == Some(offset);
        s.resume_refused_at = Some(offset);
        again
    }
}

struct Attempt<'a> {
    api: Arc<ApiClient>,
    fetcher: Arc<Fetcher>,
    limits: Limits,
    id: VideoId,
    /// `None` only while its writer has it, and once an end (published, parked) took it.
    partial: Option<Box<dyn Partial>>,
    /// Where this attempt's own bytes started (non-zero for a resumed download).
    resumed_from: Option<u64>,
    /// A resume request was answered with an error: the next attempt starts from zero.
    resume_failed: bool,
    /// The status object, when this attempt read it.
    status: Option<StatusObject>,
    /// The status read started alongside the body, for the metadata kept with the video.
    metadata_read: Option<tokio::task::JoinHandle<StatusRead>>,
    /// What the row knew of the expiry (the status object above may say better).
    expires_at: Option<i64>,
    cancel: &'a CancellationToken,
}

/// Why streaming a body stopped.
enum StreamEnd {
    /// The file is complete by HTTP: check it, then publish it.
    Complete,
    /// A 206 that covered only part of the rest (a CDN that caps ranges): ask for the next
    /// range within the same attempt.
    Continue,
    Outcome(Outcome),
    /// The server will not resume correctly: start again from byte zero.
    Restart(String),
}

/// Where a 200/206 body goes in the file (`Attempt::body_range`).
struct Range {
    /// Its first byte's offset in the file.
    start: u64,
    /// A 206's last byte.
    last: Option<u64>,
    /// The whole file's size, if the response says.
    total: Option<u64>,
    /// What identifies this version of the file (`ETag`, `Last-Modified`).
    validator: Option<String>,
}

/// What the content endpoint said instead of the video.
#[derive(Debug, Clone, Copy, PartialEq)]
enum NotServed {
    /// 400: not ready.
    NotReady,
    /// 404: "does not exist or is not finished yet".
    Missing,
    /// 410 from the API host: the file is gone.
    Gone,
}

impl Attempt<'_> {
    fn partial(&mut self) -> &mut dyn Partial {
        self.partial.as_deref_mut().expect("partial is home")
    }

    async fn run(&mut self) -> Outcome {
        let mut restarts = 0;
        let mut pieces = 0;
        loop {
            let offset = self.partial().size();
            let url = self.api.content_url(&self.id);
            let validator = self.partial().validator().map(str::to_owned);
            let answer = tokio::select! {
                r = self.api.get(url, Some(offset), validator.as_deref()) => r,
                _ = self.cancel.cancelled() => {
                    return self.keep(Outcome::Interrupted { parked_bytes: 0 }).await;
                }
            };
            let answer = match answer {
                Ok(a) => a,
                Err(api::ApiError::Unreachable(reason)) => {
                    return self.keep(Outcome::Unreachable { reason }).await;
                }
                Err(e) => {
                    return self
                        .keep(Outcome::Transient {
                            http_status: None,
                            reason: e.to_string(),
                        })
                        .await;
                }
            };
            let status = answer.response.status();
            if status != StatusCode::NOT_FOUND {
                self.fetcher.not_missing(&self.id);
            }
            // A resume the server answers with an error may be the Range itself it chokes on:
            // the next attempt asks for the whole file. A 5xx may as well be the server's
            // health, and a partial can be gigabytes: the same offset refused twice, then.
            // (A CDN's 404 is its way to say the signed URL expired: not about the Range.)
            if offset > 0 {
                self.resume_failed |= match (answer.host, status.as_u16()) {
                    (_, 400) | (api::Host::Api, 404) => true,
                    (_, 500..=599) => self.fetcher.resume_refused_again(&self.id, offset),
                    _ => false,
                };
            }
            let end = match api::classify(answer.host, status) {
                Action::Stream => self.stream(answer, offset).await,
                Action::RangeNotSatisfiable => self.range_not_satisfiable(&answer, offset),
                Action::NotReady => {
                    let reason = self.api.error_reason(answer).await;
                    StreamEnd::Outcome(self.not_served(NotServed::NotReady, reason).await)
                }
                Action::ConfirmMissing => {
                    let reason = self.api.error_reason(answer).await;
                    StreamEnd::Outcome(self.not_served(NotServed::Missing, reason).await)
                }
                Action::Expired => {
                    let reason = self.api.error_reason(answer).await;
                    StreamEnd::Outcome(self.not_served(NotServed::Gone, reason).await)
                }
                Action::AccountProblem => {
                    let reason = self.api.error_reason(answer).await;
                    StreamEnd::Outcome(Outcome::AccountProblem {
                        http_status: status.as_u16(),
                        reason,
                    })
                }
                Action::RateLimited => StreamEnd::Outcome(Outcome::RateLimited {
                    retry_after: api::retry_after(answer.response.headers()),
                }),
                Action::SignedUrlExpired => {
                    let origin = answer.origin.clone();
                    let reason = self.api.error_reason(answer).await;
                    StreamEnd::Outcome(Outcome::Transient {
                        http_status: Some(status.as_u16()),
                        reason: format!(
                            "CDN {origin} answered {status}: signed URL expired? {reason}"
                        ),
                    })
                }
                Action::Transient => {
                    let origin = answer.origin.clone();
                    let reason = self.api.error_reason(answer).await;
                    StreamEnd::Outcome(Outcome::Transient {
                        http_status: Some(status.as_u16()),
                        reason: format!("{origin} answered {status}: {reason}"),
                    })
                }
            };
            match end {
                StreamEnd::Complete => return self.complete(status).await,
                StreamEnd::Continue if pieces < MAX_PIECES => pieces += 1,
                StreamEnd::Continue => {
                    return self
                        .keep(Outcome::Transient {
                            http_status: Some(206),
                            reason: format!(
                                "the server sent the file in more than {MAX_PIECES} ranges"
                            ),
                        })
                        .await;
                }
                StreamEnd::Outcome(o) => return self.keep(o).await,
                StreamEnd::Restart(why) if restarts < MAX_RESTARTS => {
                    restarts += 1;
                    tracing::warn!(video_id = %self.id, reason = %why, "restarting download from byte 0");
                    if let Err(e) = self.restart_partial().await {
                        return Outcome::Storage {
                            reason: e.to_string(),
                        };
                    }
                }
                StreamEnd::Restart(why) => {
                    return self
                        .keep(Outcome::Transient {
                            http_status: Some(status.as_u16()),
                            reason: why,
                        })
                        .await;
                }
            }
        }
    }

    /// 416: if the server's total is exactly what we hold, the partial is complete (and is
    /// checked like any other complete body).
    fn range_not_satisfiable(&mut self, answer: &Answer, offset: u64) -> StreamEnd {
        let had_total = self.partial().total();
        match api::unsatisfied_range_total(answer.response.headers()) {
            Some(total)
                if total == offset && offset > 0 && had_total.is_none_or(|h| h == total) =>
            {
                self.resumed_from.get_or_insert(offset);
                StreamEnd::Complete
            }
            total => StreamEnd::Restart(format!(
                "416 for bytes={offset}- with total {}",
                total.map_or("unknown".into(), |t| t.to_string())
            )),
        }
    }

    /// The content endpoint did not give the video (400, 404, 410): what the status object
    /// says decides. Read at most every `Limits::status_every` per video. A video fails as not
    /// found only on two JSON 404s from both endpoints at least `retry.initial_delay` apart (a
    /// lagging replica, or a proxy's own 404 page, must not fail it); an expiry the status
    /// object gives is learned here and acted on by the retry policy (`daemon::decide`).
    async fn not_served(&mut self, what: NotServed, reason: String) -> Outcome {
        let read = if self
            .fetcher
            .may_read_status(&self.id, self.limits.status_every)
        {
            tokio::select! {
                r = self.api.read_status(&self.id) => Some(r),
                _ = self.cancel.cancelled() => return Outcome::Interrupted { parked_bytes: 0 },
            }
        } else {
            None
        };
        if let Some(StatusRead::Object(o)) = &read {
            self.learn(o);
        }
        let code = match what {
            NotServed::NotReady => 400,
            NotServed::Missing => 404,
            NotServed::Gone => 410,
        };
        match (what, read) {
            (NotServed::Gone, _) => Outcome::Gone {
                http_status: 410,
                reason: format!(
                    "{} (the API answered 410 Gone): {reason}",
                    expired_words(self.expiry())
                ),
            },
            (_, Some(StatusRead::RateLimited { retry_after })) => {
                Outcome::RateLimited { retry_after }
            }
            (
                _,
                Some(StatusRead::Object(StatusObject {
                    state: VideoState::Failed(word),
                    ..
                })),
            ) => Outcome::Gone {
                http_status: code,
                reason: format!("content {code} and status {word:?}: {reason}"),
            },
            (NotServed::Missing, Some(StatusRead::Missing)) => {
                match self
                    .fetcher
                    .confirm_missing(&self.id, self.limits.confirm_gap)
                {
                    Some(gap) => Outcome::Gone {
                        http_status: 404,
                        reason: format!(
                            "not found (content and status both 404, confirmed {} apart): {reason}",
                            format_duration(Duration::from_millis(gap.as_millis() as u64))
                        ),
                    },
                    None => Outcome::MaybeMissing {
                        reason: format!(
                            "content and status both 404 (confirmed again before the video fails): {reason}"
                        ),
                    },
                }
            }
            (NotServed::Missing, Some(StatusRead::Object(o))) => match o.state {
                VideoState::Finished => Outcome::Transient {
                    http_status: Some(404),
                    reason: "content 404 although status says finished".into(),
                },
                VideoState::Unknown(word) => {
                    tracing::warn!(video_id = %self.id, status_word = %word, "unknown video status; treating as pending");
                    Outcome::NotReady {
                        http_status: 404,
                        reason: format!("content 404, unknown status {word:?}"),
                    }
                }
                _ => Outcome::NotReady {
                    http_status: 404,
                    reason: "content 404 while status says still processing".into(),
                },
            },
            (NotServed::Missing, Some(StatusRead::Failed(why))) => Outcome::Transient {
                http_status: Some(404),
                reason: format!("content 404, status check failed: {why}"),
            },
            // The content endpoint accepted the token moments ago: a status endpoint that
            // refuses it (a key allowed to download, not to read status) says nothing about
            // the video, and nothing about the account. (A 400's is the catch-all below.)
            (
                NotServed::Missing,
                Some(StatusRead::AccountProblem {
                    http_status,
                    reason,
                }),
            ) => Outcome::Transient {
                http_status: Some(404),
                reason: format!(
                    "content 404, and the status endpoint refused the token ({http_status}): {reason}"
                ),
            },
            (NotServed::Missing, None) => Outcome::NotReady {
                http_status: 404,
                reason: format!("content 404 (status read again at a later try): {reason}"),
            },
            (NotServed::NotReady, Some(StatusRead::Object(o)))
                if o.state == VideoState::Finished =>
            {
                Outcome::NotReady {
                    http_status: 400,
                    reason: format!("{reason} (although the status endpoint says finished)"),
                }
            }
            (NotServed::NotReady, _) => Outcome::NotReady {
                http_status: 400,
                reason,
            },
        }
    }

    /// An attempt reads at most one status object: `not_served` ends the attempt, and the read
    /// for the metadata happens only without one.
    fn learn(&mut self, o: &StatusObject) {
        self.status = Some(o.clone());
    }

    /// What this attempt learned of the expiry.
    fn learned_expiry(&self) -> Option<i64> {
        self.status.as_ref().and_then(|o| o.expires_at)
    }

    fn expiry(&self) -> Option<i64> {
        self.learned_expiry().or(self.expires_at)
    }

    /// Streams a 200/206 body into the partial: where it belongs in the file (`body_range`),
    /// whether it may be written there (`admit_body`), the bytes (`pump`), then whether the
    /// file, or the range asked for, is complete.
    async fn stream(&mut self, answer: Answer, offset: u64) -> StreamEnd {
        let status = answer.response.status();
        let range = match self.body_range(&answer.response, offset) {
            Ok(r) => r,
            Err(end) => return end,
        };
        let (response, queued) = match self.admit_body(answer, offset, &range).await {
            Ok(admitted) => admitted,
            Err(end) => return end,
        };
        let end = self.pump(response, &range, queued).await;
        let Range { last, total, .. } = range;
        if matches!(end, StreamEnd::Complete) {
            let have = self.partial().size();
            match (last, total) {
                (Some(last), _) if have != last + 1 => {
                    return transient(
                        status,
                        format!("body ended at {have}, its range at {}", last + 1),
                    );
                }
                (Some(last), Some(t)) if last + 1 < t => return StreamEnd::Continue,
                (_, Some(t)) if have != t => {
                    return transient(status, format!("body ended at {have} of {t} bytes"));
                }
                _ => {}
            }
        }
        end
    }

    /// Where a body starts in the file, where it ends (a 206), and the file's size; a 206 for
    /// another range than asked, or of another file, restarts the download.
    fn body_range(
        &mut self,
        response: &reqwest::Response,
        offset: u64,
    ) -> Result<Range, StreamEnd> {
        let had_total = self.partial().total();
        let (start, last, total) = if response.status() == StatusCode::PARTIAL_CONTENT {
            match api::content_range(response.headers()) {
                // The rest (or the next piece) of the same file: where we asked, and the total
                // the file started with. Without a Range (offset 0), the whole file or its
                // first piece.
                Some((s, e, Some(t)))
                    if s == offset
                        && s <= e
                        && e < t
                        && (offset == 0 || had_total.is_none_or(|h| h == t)) =>
                {
                    (s, Some(e), Some(t))
                }
                // The whole file as a 206, whatever was asked: a 200 by another name.
                Some((0, e, Some(t))) if e + 1 == t => (0, Some(e), Some(t)),
                other => {
                    return Err(StreamEnd::Restart(format!(
                        "206 with Content-Range {other:?} for bytes={offset}-"
                    )));
                }
            }
        } else {
            (0, None, response.content_length())
        };
        Ok(Range {
            start,
            last,
            total,
            validator: api::validator(response.headers()),
        })
    }

    /// Whether the body may go into the partial, before any of it does: one that starts
    /// mid-file must be the same version of the file and not an error page; one that starts at
    /// zero must look like an MP4 (its first chunks, read to tell, are returned), and starts
    /// the partial over; the file must fit `download.max_bytes` and the disk.
    async fn admit_body(
        &mut self,
        answer: Answer,
        offset: u64,
        range: &Range,
    ) -> Result<(reqwest::Response, Vec<Bytes>), StreamEnd> {
        let Range {
            start,
            total,
            ref validator,
            ..
        } = *range;
        let mut response = answer.response;
        let status = response.status();
        if start > 0 {
            // The bytes cannot be looked at (they start mid-file): refuse an error page by its
            // label, and another version of the file (the server ignored If-Range) rather than
            // splice two versions together.
            if let Some(mime) = api::is_text_type(response.headers()) {
                self.resume_failed = true;
                return Err(transient(
                    status,
                    format!(
                        "{} answered {status} with {mime}, not a video",
                        answer.origin
                    ),
                ));
            }
            if let (Some(had), Some(now)) = (self.partial().validator(), validator.as_deref())
                && had != now
            {
                return Err(StreamEnd::Restart(format!(
                    "the file changed on the server since byte {offset} was written"
                )));
            }
        }
        // The first bytes decide whether this is a video, whatever Content-Type says.
        let mut queued = Vec::new();
        if start == 0 {
            match self.sniff(&mut response).await {
                Sniffed::Video(chunks) => queued = chunks,
                Sniffed::Interrupted => {
                    return Err(StreamEnd::Outcome(Outcome::Interrupted { parked_bytes: 0 }));
                }
                Sniffed::NotVideo(head) => {
                    let what = match api::is_text_type(response.headers()) {
                        Some(mime) => format!("{mime}, not a video"),
                        None => "a body that is not an MP4".into(),
                    };
                    let reason = match answer.host {
                        api::Host::Api => {
                            let mut body = head;
                            body.extend(self.api.read_small(response).await);
                            api::error_summary(&body)
                        }
                        api::Host::Cdn => api::CDN_BODY_NOT_KEPT.into(),
                    };
                    return Err(transient(
                        status,
                        format!("{} answered {status} with {what}: {reason}", answer.origin),
                    ));
                }
                Sniffed::Short => {
                    return Err(transient(status, "the body ended before 8 bytes".into()));
                }
            }
        }
        if start == 0 && offset > 0 {
            tracing::info!(video_id = %self.id, had = offset, "server sent the whole file; discarding partial");
            if let Err(e) = self.restart_partial().await {
                return Err(storage(e));
            }
        }
        if start == 0
            && let Err(e) = self.partial().set_version(validator.as_deref(), total)
        {
            return Err(storage(e));
        }
        let max = self.limits.max_bytes;
        if let Some(t) = total.filter(|t| *t > max) {
            return Err(transient(
                status,
                format!("the file is {t} bytes, over download.max_bytes ({max})"),
            ));
        }
        if let Err(e) = self.partial().admit(total).await {
            return Err(storage(e));
        }
        if start == 0 || self.resumed_from.is_none() {
            self.resumed_from = Some(start);
        }
        if self.status.is_none() && self.metadata_read.is_none() {
            // Read alongside the body, so the metadata costs no time of its own.
            let (api, id) = (self.api.clone(), self.id.clone());
            self.metadata_read = Some(tokio::spawn(async move { api.read_status(&id).await }));
        }
        Ok((response, queued))
    }

    /// The body's bytes into the partial, through its writer: read with the stall limit and
    /// the speed floor, held to `download.max_bytes` and paid for from the rate limit, until
    /// it ends, fails or is cancelled. The partial is back home after (unless writing failed).
    async fn pump(
        &mut self,
        mut response: reqwest::Response,
        range: &Range,
        queued: Vec<Bytes>,
    ) -> StreamEnd {
        let (status, start, total) = (response.status(), range.start, range.total);
        let max = self.limits.max_bytes;
        let mut writer = self.partial.take().expect("partial is home").writer();
        let read_timeout = self.api.read_timeout();
        let mut floor = SpeedFloor::new(self.limits.low_speed);
        let mut worthless = false;
        let mut received: u64 = queued.iter().map(|c| c.len() as u64).sum();
        let mut queued = queued.into_iter();
        let mut end = StreamEnd::Complete;
        loop {
            let chunk = match queued.next() {
                Some(c) => c,
                None => {
                    // One timer per read: the stall limit, or the end of the speed floor's
                    // window if that comes first.
                    let stall_at = Instant::now() + read_timeout;
                    let wake = floor.window_end().map_or(stall_at, |w| w.min(stall_at));
                    let read = tokio::select! {
                        c = tokio::time::timeout_at(wake.into(), response.chunk()) => c,
                        _ = self.cancel.cancelled() => { end = StreamEnd::Outcome(Outcome::Interrupted { parked_bytes: 0 }); break }
                    };
                    if let Some(why) = floor.check() {
                        end = transient(status, why);
                        break;
                    }
                    match read {
                        Err(_) if Instant::now() < stall_at => continue,
                        Err(_) => {
                            end = transient(status, stalled(read_timeout));
                            break;
                        }
                        Ok(Err(e)) if e.is_timeout() => {
                            end = transient(status, stalled(read_timeout));
                            break;
                        }
                        Ok(Err(e)) => {
                            end = transient(
                                status,
                                format!("body cut short: {}", api::error_text(&e)),
                            );
                            break;
                        }
                        Ok(Ok(None)) => break,
                        Ok(Ok(Some(c))) => {
                            received += c.len() as u64;
                            c
                        }
                    }
                }
            };
            crate::metrics::get().received(chunk.len() as u64);
            // A body without a length is held to the limit as it arrives.
            if start + received > max {
                worthless = true;
                end = transient(
                    status,
                    format!("the body went past download.max_bytes ({max}); refused"),
                );
                break;
            }
            // Paid for before it is written: a wait here holds back the next read, so the
            // server's sending slows to the rate (TCP's window does the rest). Shutdown does
            // not wait for the budget. `biased`: without a limit `take` is ready at once, and
            // the cancellation is then not registered and dropped again for every chunk.
            let paid = tokio::select! {
                biased;
                w = self.fetcher.bandwidth.take(chunk.len() as u64) => w,
                _ = self.cancel.cancelled() => { end = StreamEnd::Outcome(Outcome::Interrupted { parked_bytes: 0 }); break }
            };
            // The speed floor judges the server, not our own limit.
            floor.pause(paid);
            floor.add(chunk.len());
            if !writer.write(chunk).await {
                break; // the writer stopped; why is collected below
            }
            if let Some(progress) = &self.fetcher.progress {
                progress(start + received, total);
            }
        }
        match writer.finish().await {
            Written::All(p) => self.partial = Some(p),
            Written::Short(p, e) => {
                self.partial = Some(p);
                return StreamEnd::Outcome(Outcome::DiskShort {
                    reason: e.to_string(),
                });
            }
            Written::Failed(e) => return storage(e),
        }
        if worthless {
            // Nothing of that body is worth resuming from.
            if let Err(e) = self.restart_partial().await {
                return storage(e);
            }
        }
        end
    }

    /// Reads a body's first chunks until there are 8 bytes to look at, and says what they are.
    async fn sniff(&self, response: &mut reqwest::Response) -> Sniffed {
        let mut chunks: Vec<Bytes> = Vec::new();
        let mut head = Vec::with_capacity(8);
        while head.len() < 8 {
            let chunk = tokio::select! {
                c = tokio::time::timeout(self.api.read_timeout(), response.chunk()) => c,
                _ = self.cancel.cancelled() => return Sniffed::Interrupted,
            };
            match chunk {
                Ok(Ok(Some(c))) => {
                    head.extend_from_slice(&c[..c.len().min(8 - head.len())]);
                    chunks.push(c);
                }
                _ if head.is_empty() => return Sniffed::Short,
                _ => break,
            }
        }
        if crate::mp4::looks_like_mp4(&head) {
            Sniffed::Video(chunks)
        } else {
            Sniffed::NotVideo(chunks.concat())
        }
    }

    async fn restart_partial(&mut self) -> Result<(), StoreError> {
        self.partial().restart().await
    }

    /// The file is complete by HTTP. A whole MP4 is published (with its metadata); one that is
    /// not is downloaded once more from zero at the next attempt, unless the same bytes came
    /// before, or this was the last download allowed: then those bytes are what the API has,
    /// and they are kept with the row failed.
    async fn complete(&mut self, status: StatusCode) -> Outcome {
        let metadata = self.metadata().await;
        let sidecar = metadata.clone().filter(|_| self.limits.sidecar);
        let p = self.partial.take().expect("partial is home");
        let resumed_from = self.resumed_from.unwrap_or(0);
        let received = p.size() - resumed_from;
        let why = match p.publish(sidecar).await {
            Ok(Publish::Published(published)) => {
                return Outcome::Archived {
                    published: Published {
                        metadata,
                        ..published
                    },
                    http_status: status.as_u16(),
                    received,
                    resumed_from,
                };
            }
            // The files are gone already.
            Err(e) => return storage_outcome(e),
            Ok(Publish::NotWhole(p, why)) => {
                self.partial = Some(p);
                why
            }
        };
        let p = self.partial();
        let sha = p.sha256();
        let before = p.rejections().map(|(n, s)| (n, s.to_owned()));
        let again = before.as_ref().is_some_and(|(_, s)| *s == sha);
        let downloads = before.as_ref().map_or(0, |(n, _)| *n) + 1;
        if !again && downloads < MAX_FULL_DOWNLOADS {
            // At the next attempt, after a backoff: a CDN's cached copy cut short may have
            // been replaced by then.
            if let Err(e) = self.partial().reject().await {
                return storage_outcome(e);
            }
            return self
                .keep(Outcome::Transient {
                    http_status: Some(status.as_u16()),
                    reason: format!(
                        "the file is complete by HTTP but not a whole MP4 ({why}); it is downloaded once more from byte 0"
                    ),
                })
                .await;
        }
        let reason = if again {
            format!("the API served an incomplete MP4 twice: {why}")
        } else {
            format!(
                "the API served an incomplete MP4 {downloads} times, different each time: {why}"
            )
        };
        let sidecar = metadata.clone().filter(|_| self.limits.sidecar);
        let p = self.partial.take().expect("partial is home");
        match p.keep_incomplete(sidecar).await {
            Ok(published) => Outcome::Kept {
                published: Published {
                    metadata,
                    ..published
                },
                http_status: status.as_u16(),
                reason,
            },
            Err(e) => storage_outcome(e),
        }
    }

    /// The status object to keep with the video: the one this attempt read, the read started
    /// alongside the body, or one read now (a file completed by a 416 had no body). `None` if
    /// it could not be had.
    async fn metadata(&mut self) -> Option<String> {
        if self.status.is_none() {
            let task = self.metadata_read.take().unwrap_or_else(|| {
                let (api, id) = (self.api.clone(), self.id.clone());
                tokio::spawn(async move { api.read_status(&id).await })
            });
            // A shutdown does not wait for it: the file is complete and is published without.
            let read = tokio::select! {
                r = task => r.ok(),
                _ = self.cancel.cancelled() => None,
            };
            match read {
                Some(StatusRead::Object(o)) => self.learn(&o),
                other => {
                    tracing::info!(video_id = %self.id, status = ?other, "no status object to keep with the video")
                }
            }
        }
        self.status.as_ref().map(StatusObject::to_metadata)
    }

    /// Ends the attempt: the partial file is parked for a later resume (flushed, or removed if
    /// empty), started over if its resume was refused, or discarded when the video is gone.
    async fn keep(&mut self, outcome: Outcome) -> Outcome {
        let Some(mut p) = self.partial.take() else {
            return outcome;
        };
        let kept = if matches!(outcome, Outcome::Gone { .. }) {
            p.discard().await.map(|()| 0)
        } else if self.resume_failed {
            match p.restart().await {
                Ok(()) => p.park().await,
                Err(e) => Err(e),
            }
        } else {
            p.park().await
        };
        match (kept, outcome) {
            (Err(e), _) => storage_outcome(e),
            (Ok(n), Outcome::Interrupted { .. }) => Outcome::Interrupted { parked_bytes: n },
            (Ok(_), outcome) => outcome,
        }
    }
}

/// `download.low_speed_limit` over `download.low_speed_time`, as curl's `--speed-limit` and
/// `--speed-time`: the bytes of each window of that length must reach the limit times its
/// length. Off when the limit is 0.
struct SpeedFloor {
    limit: u64,
    time: Duration,
    start: Instant,
    bytes: u64,
}

impl SpeedFloor {
    fn new((limit, time): (u64, Duration)) -> SpeedFloor {
        SpeedFloor {
            limit,
            time,
            start: Instant::now(),
            bytes: 0,
        }
    }

    fn window_end(&self) -> Option<Instant> {
        (self.limit > 0).then(|| self.start + self.time)
    }

    fn add(&mut self, n: usize) {
        self.bytes += n as u64;
    }

    /// Time spent waiting for `download.rate_limit` is left out of the window.
    fn pause(&mut self, waited: Duration) {
        if !waited.is_zero() {
            self.start += waited;
        }
    }

    /// At the end of a window: why the body is too slow, or `None` (and a new window begins).
    fn check(&mut self) -> Option<String> {
        if self.limit == 0 || self.start.elapsed() < self.time {
            return None;
        }
        if (self.bytes as f64) < self.limit as f64 * self.time.as_secs_f64() {
            return Some(format!(
                "slower than {}/s for {} ({} bytes; download.low_speed_limit, download.low_speed_time)",
                format_size(self.limit),
                format_duration(self.time),
                self.bytes
            ));
        }
        (self.start, self.bytes) = (Instant::now(), 0);
        None
    }
}

/// What a body's first bytes are.
enum Sniffed {
    /// An MP4's start: the chunks read, as they came (not copied).
    Video(Vec<Bytes>),
    /// Anything else (an error page): its bytes so far.
    NotVideo(Vec<u8>),
    /// The body ended (or stalled) before 8 bytes.
    Short,
    /// Shutdown.
    Interrupted,
}

/// "expired at Tue, 01 Dec 2026 16:00:00 GMT before it could be downloaded", or without the
/// time when it is not known to have passed.
pub fn expired_words(expires_at: Option<i64>) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    match expires_at.filter(|t| *t <= now) {
        Some(t) => format!(
            "expired at {} before it could be downloaded",
            httpdate::fmt_http_date(std::time::UNIX_EPOCH + Duration::from_secs(t.max(0) as u64))
        ),
        None => "expired before it could be downloaded".into(),
    }
}

fn stalled(read_timeout: Duration) -> String {
    format!(
        "body stalled for {} (api.read_timeout)",
        format_duration(read_timeout)
    )
}

fn transient(status: StatusCode, reason: String) -> StreamEnd {
    StreamEnd::Outcome(Outcome::Transient {
        http_status: Some(status.as_u16()),
        reason,
    })
}

fn storage_outcome(e: StoreError) -> Outcome {
    if e.is_away() {
        return Outcome::StoreAway {
            reason: e.to_string(),
        };
    }
    Outcome::Storage {
        reason: e.to_string(),
    }
}

fn storage(e: StoreError) -> StreamEnd {
    StreamEnd::Outcome(storage_outcome(e))
}

//! One download attempt of one video, from the API request to a published archive file, and
//! the `Outcome` it ends in. Decisions about the row (when to retry, when to give up) are the
//! daemon's; this module only says what happened.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use reqwest::StatusCode;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::api::{self, Action, Answer, ApiClient, Host, VideoState};
use crate::archive::{Archive, ArchiveError, Partial, Published, VideoId};

/// Chunks queued between the network and the writer thread: bounds memory per download. A
/// chunk is what hyper read at once (up to about 400 KiB on a fast link), so two keep the
/// writer busy while memory stays under about 1.5 MiB a download, buffers included.
const SINK_DEPTH: usize = 2;
/// A download that the server will not resume properly starts over at most this many times
/// within one attempt.
const MAX_RESTARTS: u32 = 2;

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
    /// Not downloadable yet (400, or 404 while the status endpoint says pending).
    NotReady { http_status: u16, reason: String },
    /// Worth retrying with backoff: network trouble, 5xx, truncated or non-video bodies.
    Transient {
        http_status: Option<u16>,
        reason: String,
    },
    /// The video does not exist or failed upstream: never request it again.
    Gone { http_status: u16, reason: String },
    /// The ID can never be requested.
    InvalidId,
    /// The API refused our credentials: the whole client pauses.
    AccountProblem { http_status: u16, reason: String },
    /// 429: the whole client waits.
    RateLimited { retry_after: Option<Duration> },
    /// The API host could not be reached at all: the whole client waits.
    Unreachable { reason: String },
    /// Shutdown: the partial file is parked for the next run.
    Interrupted { parked_bytes: u64 },
    /// The archive could not be written (disk, permissions): not the video's fault.
    Storage { reason: String },
}

/// Told the bytes of the file so far and its total (when known) as a download streams.
pub type Progress = Arc<dyn Fn(u64, Option<u64>) + Send + Sync>;

pub struct Fetcher {
    /// Replaced as a whole on reload; a download keeps the client it started with.
    api: RwLock<Arc<ApiClient>>,
    pub archive: Archive,
    progress: Option<Progress>,
    /// `download.max_bytes`; changes on reload.
    max_bytes: AtomicU64,
    /// `archive.min_free`; changes on reload.
    min_free: AtomicU64,
}

impl Fetcher {
    pub fn new(api: ApiClient, archive: Archive, max_bytes: u64, min_free: u64) -> Fetcher {
        Fetcher {
            api: RwLock::new(Arc::new(api)),
            archive,
            progress: None,
            max_bytes: AtomicU64::new(max_bytes),
            min_free: AtomicU64::new(min_free),
        }
    }

    /// `download.max_bytes` and `archive.min_free`, after a reload.
    pub fn set_limits(&self, max_bytes: u64, min_free: u64) {
        self.max_bytes.store(max_bytes, Ordering::Relaxed);
        self.min_free.store(min_free, Ordering::Relaxed);
    }

    /// Why new downloads should wait for the archive's disk, if they should.
    pub async fn storage_problem(self: &Arc<Self>) -> Option<String> {
        let me = self.clone();
        let min_free = self.min_free.load(Ordering::Relaxed);
        tokio::task::spawn_blocking(move || me.archive.storage_problem(min_free))
            .await
            .expect("archive task panicked")
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

    /// Downloads one video. `cancel` parks the download as a resumable partial.
    pub async fn download(self: &Arc<Self>, raw_id: &str, cancel: &CancellationToken) -> Outcome {
        let Ok(id) = VideoId::parse(raw_id) else {
            return Outcome::InvalidId;
        };
        match self.begin(&id).await {
            Ok(partial) => self.download_into(id, partial, cancel).await,
            Err(outcome) => outcome,
        }
    }

    /// Opens the video's partial file and takes its lock, which tells every other process the
    /// video has a live downloader. `hingnetd fetch` does this before it claims the row, so the
    /// daemon never sees that claim without the lock.
    pub async fn begin(self: &Arc<Self>, id: &VideoId) -> Result<Partial, Outcome> {
        let me = self.clone();
        let id = id.clone();
        tokio::task::spawn_blocking(move || me.archive.begin(&id))
            .await
            .expect("archive task panicked")
            .map_err(|e| Outcome::Storage {
                reason: e.to_string(),
            })
    }

    /// Downloads into a partial from `begin`.
    pub async fn download_into(
        self: &Arc<Self>,
        id: VideoId,
        partial: Partial,
        cancel: &CancellationToken,
    ) -> Outcome {
        let me = self.clone();
        let id2 = id.clone();
        let existing = tokio::task::spawn_blocking(move || me.archive.existing(&id2))
            .await
            .expect("archive task panicked");
        match existing {
            Ok(Some(published)) => {
                tracing::info!(video_id = %id, path = %published.path.display(), "found already archived file; not downloading again");
                let _ = tokio::task::spawn_blocking(move || partial.discard()).await;
                return Outcome::Archived {
                    published,
                    http_status: 200,
                    received: 0,
                    resumed_from: 0,
                };
            }
            Ok(None) => {}
            Err(e) => {
                return Outcome::Storage {
                    reason: e.to_string(),
                };
            }
        }
        let mut attempt = Attempt {
            api: self.api(),
            fetcher: self.clone(),
            id,
            partial: Some(partial),
            resumed_from: 0,
            cancel,
        };
        attempt.run().await
    }
}

struct Attempt<'a> {
    api: Arc<ApiClient>,
    fetcher: Arc<Fetcher>,
    id: VideoId,
    /// `None` only while the writer thread owns it.
    partial: Option<Partial>,
    /// Where the body that completed the file started (non-zero for a resumed download).
    resumed_from: u64,
    cancel: &'a CancellationToken,
}

/// Why streaming a body stopped early.
enum StreamEnd {
    Complete,
    Outcome(Outcome),
    /// The server will not resume correctly: start again from byte zero.
    Restart(String),
}

impl Attempt<'_> {
    fn partial(&mut self) -> &mut Partial {
        self.partial.as_mut().expect("partial is home")
    }

    async fn run(&mut self) -> Outcome {
        let mut restarts = 0;
        loop {
            let offset = self.partial().len();
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
            let end = match api::classify(answer.host, status) {
                Action::Stream => self.stream(answer, offset).await,
                Action::RangeNotSatisfiable => self.range_not_satisfiable(&answer, offset),
                Action::NotReady => {
                    let reason = self.api.error_reason(answer).await;
                    StreamEnd::Outcome(Outcome::NotReady {
                        http_status: 400,
                        reason,
                    })
                }
                Action::ConfirmMissing => {
                    let reason = self.api.error_reason(answer).await;
                    StreamEnd::Outcome(self.confirm_missing(reason).await)
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
                StreamEnd::Complete => return self.publish(status).await,
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

    /// 416: if the server's total is exactly what we hold, the partial is complete.
    fn range_not_satisfiable(&mut self, answer: &Answer, offset: u64) -> StreamEnd {
        let had_total = self.partial().total();
        match api::unsatisfied_range_total(answer.response.headers()) {
            Some(total)
                if total == offset && offset > 0 && had_total.is_none_or(|h| h == total) =>
            {
                self.resumed_from = offset;
                StreamEnd::Complete
            }
            total => StreamEnd::Restart(format!(
                "416 for bytes={offset}- with total {}",
                total.map_or("unknown".into(), |t| t.to_string())
            )),
        }
    }

    /// The download page's 404 also means "not finished yet": ask the status endpoint before
    /// failing a video for good.
    async fn confirm_missing(&mut self, reason404: String) -> Outcome {
        let url = self.api.status_url(&self.id);
        let answer = tokio::select! {
            r = self.api.get(url, None, None) => r,
            _ = self.cancel.cancelled() => return Outcome::Interrupted { parked_bytes: 0 },
        };
        let answer = match answer {
            Ok(a) => a,
            Err(e) => {
                return Outcome::Transient {
                    http_status: Some(404),
                    reason: format!("content 404, status check failed: {e}"),
                };
            }
        };
        let status = answer.response.status();
        let state = match (answer.host, status) {
            (Host::Api, StatusCode::NOT_FOUND) => VideoState::Missing,
            (_, StatusCode::OK) => {
                let body = self.api.read_small(answer.response).await;
                match serde_json::from_slice::<serde_json::Value>(&body) {
                    Ok(v) => match v.get("status").and_then(|s| s.as_str()) {
                        Some(word) => api::classify_status_word(word),
                        None => VideoState::Unknown("(no status field)".into()),
                    },
                    Err(_) => VideoState::Unknown("(status body is not JSON)".into()),
                }
            }
            (host, s) => match api::classify(host, s) {
                Action::AccountProblem => {
                    return Outcome::AccountProblem {
                        http_status: s.as_u16(),
                        reason: self.api.error_reason(answer).await,
                    };
                }
                Action::RateLimited => {
                    return Outcome::RateLimited {
                        retry_after: api::retry_after(answer.response.headers()),
                    };
                }
                _ => {
                    return Outcome::Transient {
                        http_status: Some(404),
                        reason: format!("content 404, status endpoint answered {s}"),
                    };
                }
            },
        };
        match state {
            VideoState::Missing => Outcome::Gone {
                http_status: 404,
                reason: format!("not found (content and status both 404): {reason404}"),
            },
            VideoState::Failed(word) => Outcome::Gone {
                http_status: 404,
                reason: format!("content 404 and status {word:?}"),
            },
            VideoState::Pending => Outcome::NotReady {
                http_status: 404,
                reason: "content 404 while status says still processing".into(),
            },
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
        }
    }

    /// Streams a 200/206 body into the partial file through the writer thread.
    async fn stream(&mut self, answer: Answer, offset: u64) -> StreamEnd {
        let mut response = answer.response;
        let status = response.status();
        if let Some(mime) = api::is_text_type(response.headers()) {
            let origin = answer.origin.clone();
            let reason = self.api.error_reason(Answer { response, ..answer }).await;
            return StreamEnd::Outcome(Outcome::Transient {
                http_status: Some(status.as_u16()),
                reason: format!(
                    "{} answered {status} with {mime}, not a video: {reason}",
                    origin
                ),
            });
        }
        // Where this body starts in the file, and the file's expected total size.
        let validator = api::validator(response.headers());
        let had_total = self.partial().total();
        let (start, total) = if status == StatusCode::PARTIAL_CONTENT {
            match api::content_range(response.headers()) {
                // The rest of the same file: where we asked, and the total the file started with.
                Some((s, e, Some(t)))
                    if s == offset && e < t && offset > 0 && had_total.is_none_or(|h| h == t) =>
                {
                    (s, Some(t))
                }
                other => {
                    return StreamEnd::Restart(format!(
                        "206 with Content-Range {other:?} for bytes={offset}-"
                    ));
                }
            }
        } else {
            (0, response.content_length())
        };
        // A 206 of another version of the file (the server ignored If-Range) would splice two
        // versions together: start over instead.
        if start > 0
            && let (Some(had), Some(now)) = (self.partial().validator(), validator.as_deref())
            && had != now
        {
            return StreamEnd::Restart(format!(
                "the file changed on the server since byte {offset} was written"
            ));
        }
        if start == 0 && offset > 0 {
            tracing::info!(video_id = %self.id, had = offset, "server sent the whole file; discarding partial");
            if let Err(e) = self.restart_partial().await {
                return StreamEnd::Outcome(Outcome::Storage {
                    reason: e.to_string(),
                });
            }
        }
        if start == 0 {
            let p = self.partial.as_mut().expect("partial is home");
            if let Err(e) = p.set_version(validator.as_deref(), total) {
                return StreamEnd::Outcome(Outcome::Storage {
                    reason: e.to_string(),
                });
            }
        }
        let max = self.fetcher.max_bytes.load(Ordering::Relaxed);
        if let Some(t) = total.filter(|t| *t > max) {
            return transient(
                status,
                format!("the file is {t} bytes, over download.max_bytes ({max})"),
            );
        }
        if let Some(t) = total {
            let min_free = self.fetcher.min_free.load(Ordering::Relaxed);
            if let Err(e) = self.on_partial(move |p| p.reserve(t, min_free)).await {
                return StreamEnd::Outcome(Outcome::Storage {
                    reason: e.to_string(),
                });
            }
        }
        self.resumed_from = start;
        let (tx, writer) = self.spawn_writer();
        let read_timeout = self.api.read_timeout();
        let mut sniff = Vec::with_capacity(8);
        let mut worthless = false;
        let mut received = 0u64;
        let mut end = StreamEnd::Complete;
        loop {
            let chunk = tokio::select! {
                c = tokio::time::timeout(read_timeout, response.chunk()) => c,
                _ = self.cancel.cancelled() => { end = StreamEnd::Outcome(Outcome::Interrupted { parked_bytes: 0 }); break }
            };
            let chunk: Bytes = match chunk {
                Err(_) => {
                    end = transient(status, stalled(read_timeout));
                    break;
                }
                Ok(Err(e)) if e.is_timeout() => {
                    end = transient(status, stalled(read_timeout));
                    break;
                }
                Ok(Err(e)) => {
                    end = transient(status, format!("body cut short: {}", api::error_text(&e)));
                    break;
                }
                Ok(Ok(None)) => break,
                Ok(Ok(Some(c))) => c,
            };
            // Refuse a non-video body as soon as its first 8 bytes are in.
            if start == 0 && sniff.len() < 8 {
                sniff.extend_from_slice(&chunk[..chunk.len().min(8 - sniff.len())]);
                if sniff.len() == 8 && !crate::archive::looks_like_mp4(&sniff) {
                    worthless = true;
                    end = StreamEnd::Outcome(Outcome::Transient {
                        http_status: Some(status.as_u16()),
                        reason: format!(
                            "{} answered {status} with a body that is not an MP4 (no ftyp box)",
                            answer.origin
                        ),
                    });
                    break;
                }
            }
            received += chunk.len() as u64;
            // A body without a length (chunked) is held to the limit as it arrives.
            if start + received > max {
                worthless = true;
                end = transient(
                    status,
                    format!("the body went past download.max_bytes ({max}); refused"),
                );
                break;
            }
            if tx.send(chunk).await.is_err() {
                break; // the writer failed; its error is collected below
            }
            if let Some(progress) = &self.fetcher.progress {
                progress(start + received, total);
            }
        }
        drop(tx);
        match writer.await.expect("writer task panicked") {
            Ok(p) => self.partial = Some(p),
            Err(e) => {
                return StreamEnd::Outcome(Outcome::Storage {
                    reason: e.to_string(),
                });
            }
        }
        if worthless {
            // Nothing of that body is worth resuming from.
            if let Err(e) = self.restart_partial().await {
                return StreamEnd::Outcome(Outcome::Storage {
                    reason: e.to_string(),
                });
            }
        }
        if matches!(end, StreamEnd::Complete) {
            let have = self.partial().len();
            if let Some(t) = total
                && have != t
            {
                return transient(status, format!("body ended at {have} of {t} bytes"));
            }
        }
        end
    }

    /// Hashing and writing happen on a blocking thread, overlapping the network reads.
    fn spawn_writer(
        &mut self,
    ) -> (
        mpsc::Sender<Bytes>,
        tokio::task::JoinHandle<Result<Partial, ArchiveError>>,
    ) {
        let (tx, mut rx) = mpsc::channel::<Bytes>(SINK_DEPTH);
        let mut partial = self.partial.take().expect("partial is home");
        let writer = tokio::task::spawn_blocking(move || {
            while let Some(chunk) = rx.blocking_recv() {
                if let Err(e) = partial.write(&chunk) {
                    // A failed write (a full disk) may have left anything in the file.
                    let _ = partial.discard();
                    return Err(e);
                }
            }
            Ok(partial)
        });
        (tx, writer)
    }

    async fn restart_partial(&mut self) -> Result<(), ArchiveError> {
        self.on_partial(Partial::restart).await
    }

    /// Runs a file operation on the partial on a blocking thread.
    async fn on_partial(
        &mut self,
        f: impl FnOnce(&mut Partial) -> Result<(), ArchiveError> + Send + 'static,
    ) -> Result<(), ArchiveError> {
        let mut p = self.partial.take().expect("partial is home");
        let (p, r) = tokio::task::spawn_blocking(move || {
            let r = f(&mut p);
            (p, r)
        })
        .await
        .expect("archive task panicked");
        self.partial = Some(p);
        r
    }

    async fn publish(&mut self, status: StatusCode) -> Outcome {
        let p = self.partial.take().expect("partial is home");
        let resumed_from = self.resumed_from;
        let received = p.len() - resumed_from;
        match tokio::task::spawn_blocking(move || p.publish())
            .await
            .expect("archive task panicked")
        {
            Ok(published) => Outcome::Archived {
                published,
                http_status: status.as_u16(),
                received,
                resumed_from,
            },
            // `publish` has already discarded the worthless partial.
            Err(ArchiveError::NotMp4 { .. }) => Outcome::Transient {
                http_status: Some(status.as_u16()),
                reason: "downloaded file is not an MP4 (no ftyp box); discarded".into(),
            },
            Err(ArchiveError::Incomplete { why, .. }) => Outcome::Transient {
                http_status: Some(status.as_u16()),
                reason: format!("downloaded file is not a whole MP4 ({why}); discarded"),
            },
            Err(e) => Outcome::Storage {
                reason: e.to_string(),
            },
        }
    }

    /// Ends the attempt: the partial file is parked for a later resume (flushed, or removed if
    /// empty), or discarded when the video is gone for good.
    async fn keep(&mut self, outcome: Outcome) -> Outcome {
        let Some(p) = self.partial.take() else {
            return outcome;
        };
        let gone = matches!(outcome, Outcome::Gone { .. });
        let kept = tokio::task::spawn_blocking(move || {
            if gone {
                p.discard().map(|()| 0)
            } else {
                p.park()
            }
        })
        .await
        .expect("archive task panicked");
        match (kept, outcome) {
            (Err(e), _) => Outcome::Storage {
                reason: e.to_string(),
            },
            (Ok(n), Outcome::Interrupted { .. }) => Outcome::Interrupted { parked_bytes: n },
            (Ok(_), outcome) => outcome,
        }
    }
}

fn stalled(read_timeout: Duration) -> String {
    format!(
        "body stalled for {} (api.read_timeout)",
        crate::config::format_duration(read_timeout)
    )
}

fn transient(status: StatusCode, reason: String) -> StreamEnd {
    StreamEnd::Outcome(Outcome::Transient {
        http_status: Some(status.as_u16()),
        reason,
    })
}

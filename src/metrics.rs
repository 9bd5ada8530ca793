//! The Prometheus metrics: what the daemon counts, and the `[metrics] listen` endpoint that
//! serves them at `/metrics` in the Prometheus text format (0.0.4, which `promtool check
//! metrics` reads). Every label is a closed set of `&'static str`: a video ID or a URL can never
//! become one (unbounded series, and a signed URL is a credential).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::api::Host;
use crate::pause::Reason;
use crate::queue::{self, Admin, State};
use crate::store::Store;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpLabel {
    role: &'static str,
    class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabel {
    version: &'static str,
}

pub struct Metrics {
    registry: Registry,
    rows: Family<StateLabel, Gauge>,
    oldest_pending_age: Gauge<f64, AtomicU64>,
    expiring_soon: Gauge,
    expired: Gauge,
    downloads: Family<ResultLabel, Counter>,
    attempts: Family<OutcomeLabel, Counter>,
    http: Family<HttpLabel, Counter>,
    bytes: Counter,
    duration: Histogram,
    size: Histogram,
    paused: Family<ReasonLabel, Gauge>,
    free: Gauge,
    reserve: Gauge,
}

/// One set per process: counting is a few atomic adds wherever the event happens, whether or
/// not a listener serves them.
static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

pub fn get() -> &'static Metrics {
    &METRICS
}

impl Metrics {
    fn new() -> Metrics {
        let mut registry = Registry::with_prefix("hingnetd");
        let m = Metrics {
            rows: Family::default(),
            oldest_pending_age: Gauge::default(),
            expiring_soon: Gauge::default(),
            expired: Gauge::default(),
            downloads: Family::default(),
            attempts: Family::default(),
            http: Family::default(),
            bytes: Counter::default(),
            // 0.5 s to about 2.3 h: a small file on a fast link to a large one on a slow link.
            duration: Histogram::new([
                0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 8192.0,
            ]),
            // 1 MiB to 16 GiB, by fours.
            size: Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                1048576.0, 4.0, 8,
            )),
            paused: Family::default(),
            free: Gauge::default(),
            reserve: Gauge::default(),
            registry: Registry::default(),
        };
        // Every series is created up front (each guard dropped at once), so that `rate()` and
        // the alerts see it from the first scrape.
        for state in State::ALL {
            drop(m.rows.get_or_create(&StateLabel {
                state: state.as_str(),
            }));
        }
        for result in ["done", "failed"] {
            drop(m.downloads.get_or_create(&ResultLabel { result }));
        }
        for outcome in crate::fetch::Outcome::LABELS {
            drop(m.attempts.get_or_create(&OutcomeLabel { outcome }));
        }
        for role in ["api", "cdn"] {
            for class in ["2xx", "3xx", "4xx", "5xx"] {
                drop(m.http.get_or_create(&HttpLabel { role, class }));
            }
        }
        for r in Reason::ALL {
            drop(m.paused.get_or_create(&ReasonLabel { reason: r.as_str() }));
        }
        registry.register("queue_rows", "Queue rows per state", m.rows.clone());
        registry.register(
            "queue_oldest_pending_age_seconds",
            "Age of the oldest pending row (0 when none)",
            m.oldest_pending_age.clone(),
        );
        registry.register(
            "queue_pending_expiring_soon",
            "Pending rows whose video expires within 10 minutes",
            m.expiring_soon.clone(),
        );
        registry.register(
            "queue_pending_expired",
            "Pending rows whose video has already expired undownloaded",
            m.expired.clone(),
        );
        registry.register(
            "downloads",
            "Videos finished, by final result",
            m.downloads.clone(),
        );
        registry.register(
            "attempts",
            "Download attempts, by outcome",
            m.attempts.clone(),
        );
        registry.register(
            "http_responses",
            "HTTP responses, by host role (api, cdn) and status class",
            m.http.clone(),
        );
        registry.register(
            "downloaded_bytes",
            "Video bytes received from the API and CDN",
            m.bytes.clone(),
        );
        registry.register(
            "download_duration_seconds",
            "Time from a download's start to its archived file, for archived videos",
            m.duration.clone(),
        );
        registry.register(
            "download_size_bytes",
            "Size of archived video files",
            m.size.clone(),
        );
        registry.register(
            "paused",
            "1 while every new download waits for this reason",
            m.paused.clone(),
        );
        registry.register(
            "archive_free_bytes",
            "Free space in the archive directory's filesystem",
            m.free.clone(),
        );
        registry.register(
            "archive_reserve_bytes",
            "Free space new downloads keep (archive.min_free)",
            m.reserve.clone(),
        );
        let build: Family<BuildLabel, Gauge> = Family::default();
        build
            .get_or_create(&BuildLabel {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        registry.register("build_info", "The running hingnetd's version", build);
        Metrics { registry, ..m }
    }

    pub fn http_response(&self, host: Host, status: u16) {
        let class = match status {
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            // 1xx never reaches us (hyper handles it); anything odd counts with the errors.
            _ => "5xx",
        };
        let role = match host {
            Host::Api => "api",
            Host::Cdn => "cdn",
        };
        self.http.get_or_create(&HttpLabel { role, class }).inc();
    }

    pub fn received(&self, bytes: u64) {
        self.bytes.inc_by(bytes);
    }

    pub fn attempt(&self, outcome: &'static str) {
        self.attempts.get_or_create(&OutcomeLabel { outcome }).inc();
    }

    pub fn finished(&self, done: bool) {
        let result = if done { "done" } else { "failed" };
        self.downloads.get_or_create(&ResultLabel { result }).inc();
    }

    pub fn archived(&self, took: Duration, bytes: u64) {
        self.duration.observe(took.as_secs_f64());
        self.size.observe(bytes as f64);
    }

    /// The pauses in force now: 1 for each, 0 for every other reason.
    pub fn set_paused(&self, reasons: &[Reason]) {
        for r in Reason::ALL {
            self.paused
                .get_or_create(&ReasonLabel { reason: r.as_str() })
                .set(i64::from(reasons.contains(&r)));
        }
    }

    fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("metrics.listen {addr}: cannot listen: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// What a scrape reads fresh: the queue's gauges and the archive's free space.
pub struct Scrape {
    pub database: queue::Location,
    store: Arc<dyn Store>,
    /// `archive.min_free`, which a reload may change (`Serving::apply`).
    reserve: AtomicU64,
    /// A read connection kept between scrapes (opened on the first).
    queue: Mutex<Option<Box<dyn Admin>>>,
}

impl Scrape {
    pub fn new(database: queue::Location, store: Arc<dyn Store>) -> Scrape {
        Scrape {
            database,
            store,
            reserve: AtomicU64::new(0),
            queue: Mutex::new(None),
        }
    }

    /// Blocking (SQLite, statvfs): called on a blocking thread.
    fn refresh(&self, m: &Metrics) {
        let mut slot = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            match queue::open_existing(&self.database) {
                Ok(q) => *slot = Some(q),
                Err(e) => tracing::warn!(error = %e, "metrics: cannot open the queue database"),
            }
        }
        if let Some(q) = slot.as_ref() {
            match q.status(0) {
                Ok(s) => {
                    for state in State::ALL {
                        m.rows
                            .get_or_create(&StateLabel {
                                state: state.as_str(),
                            })
                            .set(s.counts.of(state) as i64);
                    }
                    m.expiring_soon.set(s.expiring_soon as i64);
                    m.expired.set(s.expired_pending as i64);
                    let age = s.oldest_pending.as_ref().and_then(|o| o.age);
                    m.oldest_pending_age
                        .set(age.map_or(0.0, |a| a.as_secs_f64()));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "metrics: cannot read the queue's counts");
                    // Opened again at the next scrape.
                    *slot = None;
                }
            }
        }
        drop(slot);
        if let Ok(free) = self.store.free_bytes() {
            m.free.set(i64::try_from(free).unwrap_or(i64::MAX));
        }
        m.reserve
            .set(i64::try_from(self.reserve.load(Ordering::Relaxed)).unwrap_or(i64::MAX));
    }
}

/// The daemon's metrics serving: what a scrape reads, and the listener if one is configured.
/// A reload moves or stops the listener (`apply`).
pub struct Serving {
    pub scrape: Arc<Scrape>,
    pub endpoint: Option<Endpoint>,
}

impl Serving {
    /// Serves at `addr` (none: not at all): the new address is bound before the old listener
    /// stops, so a reload that cannot bind it changes nothing.
    pub fn apply(&mut self, addr: Option<SocketAddr>, min_free: u64) -> Result<(), MetricsError> {
        self.scrape.reserve.store(min_free, Ordering::Relaxed);
        let old = self.endpoint.as_ref().map(|e| e.asked);
        if old == addr {
            return Ok(());
        }
        let Some(a) = addr else {
            self.endpoint = None;
            tracing::info!("metrics listener stopped");
            return Ok(());
        };
        let started = match Endpoint::start(a, self.scrape.clone()) {
            // The old listener holds the port (0.0.0.0:9464 becoming 127.0.0.1:9464): it
            // stops first, and comes back if the new address cannot be bound either.
            Err(MetricsError::Bind { source, .. })
                if source.kind() == std::io::ErrorKind::AddrInUse
                    && old.is_some_and(|o| o.port() == a.port()) =>
            {
                self.endpoint = None;
                Endpoint::start(a, self.scrape.clone()).inspect_err(|_| {
                    self.endpoint = old.and_then(|o| Endpoint::start(o, self.scrape.clone()).ok());
                })
            }
            other => other,
        }?;
        if old.is_some() {
            tracing::info!("metrics listener moved to {a}; the old one stopped");
        }
        self.endpoint = Some(started);
        Ok(())
    }
}

/// A running `/metrics` listener; dropping it stops it.
pub struct Endpoint {
    /// The address configured (its port may be 0; the log names the one bound).
    asked: SocketAddr,
    stop: CancellationToken,
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Longest request head accepted, and how long a client gets to send it.
const MAX_REQUEST: usize = 8192;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

impl Endpoint {
    /// Binds now (so that a bad address fails the start or the reload that asked for it) and
    /// serves on the runtime until dropped.
    pub fn start(asked: SocketAddr, scrape: Arc<Scrape>) -> Result<Endpoint, MetricsError> {
        let bind = |source| MetricsError::Bind {
            addr: asked,
            source,
        };
        let addr = asked;
        let std_listener = std::net::TcpListener::bind(addr).map_err(bind)?;
        std_listener.set_nonblocking(true).map_err(bind)?;
        let listener = TcpListener::from_std(std_listener).map_err(bind)?;
        let addr = listener.local_addr().map_err(bind)?;
        let stop = CancellationToken::new();
        let token = stop.clone();
        tokio::spawn(async move {
            loop {
                let stream = tokio::select! {
                    _ = token.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok((stream, _)) => stream,
                        Err(e) => {
                            // EMFILE and the like: do not spin on them.
                            tracing::warn!(error = %e, "metrics: accept failed");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    },
                };
                let scrape = scrape.clone();
                let token = token.clone();
                tokio::spawn(async move {
                    tokio::select! {
                        _ = token.cancelled() => {}
                        _ = tokio::time::timeout(REQUEST_TIMEOUT, answer(stream, scrape)) => {}
                    }
                });
            }
        });
        tracing::info!(listen = %addr, "serving metrics at /metrics");
        Ok(Endpoint { asked, stop })
    }
}

/// One HTTP/1.x exchange: `GET /metrics` (or `HEAD`), then the connection closes.
async fn answer(mut stream: TcpStream, scrape: Arc<Scrape>) {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
        if head.len() > MAX_REQUEST {
            let _ = respond(
                &mut stream,
                "431 Request Header Fields Too Large",
                "",
                "",
                true,
            )
            .await;
            return;
        }
    }
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split(' ');
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    match (method, path) {
        ("GET" | "HEAD", "/metrics") => {
            let rendered = tokio::task::spawn_blocking(move || {
                let m = get();
                scrape.refresh(m);
                m.render()
            })
            .await;
            let Ok(body) = rendered else {
                let _ = respond(&mut stream, "500 Internal Server Error", "", "", true).await;
                return;
            };
            let ct = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;
            let _ = respond(&mut stream, "200 OK", ct, &body, method == "GET").await;
        }
        (_, "/metrics") => {
            let _ = respond(&mut stream, "405 Method Not Allowed", "", "", true).await;
        }
        _ => {
            let _ = respond(
                &mut stream,
                "404 Not Found",
                "text/plain",
                "hingnetd serves /metrics only\n",
                true,
            )
            .await;
        }
    }
}

/// `send_body` false: a HEAD's answer, with the length the GET's body would have.
async fn respond(
    stream: &mut TcpStream,
    status: &str,
    content_type: &str,
    body: &str,
    send_body: bool,
) -> std::io::Result<()> {
    let mut head = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    if !content_type.is_empty() {
        head.push_str(&format!("Content-Type: {content_type}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await?;
    if send_body {
        stream.write_all(body.as_bytes()).await?;
    }
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_family_is_exported_from_the_start() {
        let text = get().render();
        for name in [
            "hingnetd_queue_rows{state=\"pending\"}",
            "hingnetd_downloads_total{result=\"failed\"}",
            "hingnetd_attempts_total{outcome=\"not_ready\"}",
            "hingnetd_http_responses_total{role=\"cdn\",class=\"2xx\"}",
            "hingnetd_downloaded_bytes_total",
            "hingnetd_download_duration_seconds_bucket",
            "hingnetd_download_size_bytes_count",
            "hingnetd_paused{reason=\"token\"}",
            "hingnetd_archive_free_bytes",
            "hingnetd_archive_reserve_bytes",
            "hingnetd_build_info{version=",
        ] {
            assert!(text.contains(name), "{name} missing from:\n{text}");
        }
    }

    #[test]
    fn pauses_are_one_for_those_in_force_and_zero_for_the_rest() {
        let m = Metrics::new();
        m.set_paused(&[Reason::Storage]);
        let text = m.render();
        assert!(
            text.contains("hingnetd_paused{reason=\"storage\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("hingnetd_paused{reason=\"token\"} 0"),
            "{text}"
        );
        m.set_paused(&[]);
        assert!(m.render().contains("hingnetd_paused{reason=\"storage\"} 0"));
    }
}

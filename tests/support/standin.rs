//! A loopback stand-in for the HingNet video API and the CDN it redirects to.
//!
//! Integration tests run the real `hingnetd` binary as a child process and point it at this
//! server. It is a hand-written HTTP/1.1 server on raw TCP sockets rather than a framework so
//! that it can misbehave exactly the way the real service (or a proxy in front of it) might: cut
//! a body short while promising more, go silent mid-body, lie in `Content-Range`, ignore
//! `Range`, or send an HTML error page with a 200. Every response carries `Connection: close`
//! and the socket is closed after it, so one request = one connection = one log entry.
//!
//! Two listeners run on one background thread with its own tokio runtime:
//! - the **API host** (`127.0.0.1:<port>` by default) serves `GET /v1/videos/{id}/content` and
//!   `GET /v1/videos/{id}`, and checks `Authorization: Bearer <token>` on them;
//! - the **CDN host** (`127.0.0.2:<port>` by default, a different IP so that the daemon sees a
//!   different host) serves signed URLs `/cdn/{id}?sig=SIGNED-<hex>&exp=<unix>` and never checks
//!   `Authorization`, but logs it so tests can prove the token was not sent there.
//!
//! What a content request answers is decided by a per-video *script* of [`Step`]s: one step is
//! consumed per content request, and the last step repeats forever. Signed-file requests (CDN
//! `/cdn/..` and the relative-redirect target `/files/..`) have their own script, see
//! [`StandIn::script_cdn`], which defaults to [`Step::Serve`].
//!
//! Tests talk to the stand-in through a synchronous API: they register videos, script
//! behaviour, and block on [`StandIn::wait_for`], which waits on a condition variable that is
//! notified on every change of the request log (new request, bytes sent, paused, finished).
//! Nothing in here sleeps to synchronise; the only timers are the 120 s give-up limits of
//! [`Step::Stall`], [`Step::Silent`] and [`Step::Hold`], the pauses of a slow link that
//! [`Step::Drip`] plays, and a 10 ms back-off after a failed `accept`.
//!
//! Include it with `#[path = "support/standin.rs"] mod standin;` from a test file or
//! `#[path = "../tests/support/standin.rs"] mod standin;` from an example.

// Each test file uses a different subset of this module.
#![allow(dead_code)]

use std::collections::{HashMap, VecDeque};
use std::fmt::{self, Write as _};
use std::io;
use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, oneshot};

/// Bodies are written (and `body_sent` updated) in pieces of this size.
const CHUNK: usize = 64 * 1024;
/// How long a [`Step::Stall`] stays silent, and the longest a [`Step::Hold`] waits for release.
const PAUSE_LIMIT: Duration = Duration::from_secs(120);
/// A request head larger than this is answered with 400 (the daemon never sends one).
const MAX_HEAD: usize = 64 * 1024;
/// Size of the videos that demo mode creates on first sight.
const DEMO_SIZE: usize = 3 * 1024 * 1024;
/// Lifetime advertised by the `exp=` parameter of signed URLs and by `expires_at`.
const EXPIRY_SECS: u64 = 3600;

/// One scripted answer to a content request (API host) or a signed-file request (CDN host).
#[derive(Clone, Debug)]
pub enum Step {
    /// 200 `video/mp4` with `Content-Length`. Honours `Range: bytes=N-` with a 206 and
    /// `Content-Range: bytes N-(len-1)/len`, or 416 with `Content-Range: bytes */len` when
    /// `N >= len`. Other `Range` forms are ignored (full 200), as many real servers do.
    Serve,
    /// 302 to `http://{cdn}/cdn/{id}?sig=SIGNED-<hex>&exp=<unix>`; the CDN then serves the
    /// video according to the signed-file script (default [`Step::Serve`]).
    Redirect,
    /// 302 with the relative `Location: /files/{id}?sig=SIGNED-<hex>&exp=<unix>`, which the
    /// same host then serves like the CDN does.
    RedirectRelative,
    /// 400 `video_not_ready` JSON error.
    NotReady,
    /// 404 "task does not exist or is not finished yet" JSON error.
    NotFound,
    /// That status with an OpenAI-shaped JSON error body.
    Error(u16),
    /// 429 with `Retry-After: <value>` (seconds or an HTTP date, verbatim) and a JSON body.
    RateLimited(String),
    /// 200 `text/html` with an HTML error page, as a misconfigured proxy would answer.
    Html,
    /// 200 labelled `video/mp4` whose body is JSON (no `ftyp` box).
    WrongType,
    /// Like [`Step::Serve`] (200, or 206 for a satisfiable Range) with the honest full
    /// `Content-Length`, but only `n` body bytes are sent before the socket is closed.
    Truncate(usize),
    /// Like [`Step::Truncate`], but after `n` bytes the socket stays open and silent
    /// (`paused = true`) for 120 s, or until the client hangs up, then it is closed.
    Stall(usize),
    /// Reads the request and answers nothing at all, not even a status line: `paused = true` at
    /// once, until the client hangs up or 120 s pass.
    Silent,
    /// Sends `n` bytes, sets `paused = true`, waits for [`StandIn::release`] of this id (or
    /// 120 s), then sends the rest normally. Stops early if the client hangs up meanwhile.
    Hold(usize),
    /// Always 200 with the full body, even when `Range` is asked.
    IgnoreRange,
    /// Answers `Range: bytes=N-` with a 206 whose `Content-Range` starts at 0 (and the full
    /// body); without `Range` behaves like [`Step::Serve`].
    BadContentRange,
    /// 200 with `Transfer-Encoding: chunked` and no `Content-Length`; full body, ignores Range.
    Chunked,
    /// Like [`Step::Truncate`], but after `n` bytes the connection is reset (`SO_LINGER` 0,
    /// then close: the client sees RST, not EOF).
    Reset(usize),
    /// Like [`Step::Serve`], but the body goes out in pieces of `piece` bytes with `pause`
    /// between them (a slow link). Each pause is a server-side delay, not a test's wait.
    Drip { piece: usize, pause: Duration },
    /// Like [`Step::Serve`], but `Content-Length` claims `n` bytes more than the body, which is
    /// sent whole before the socket is closed.
    LengthOver(usize),
    /// Like [`Step::Serve`], but `Content-Length` claims `n` bytes fewer than the body, which is
    /// still sent whole (the extra bytes follow the declared end) before the socket is closed.
    LengthUnder(usize),
    /// Answers `Range: bytes=N-` with a 206 whose `Content-Range` says the file has another total
    /// (`len + delta`): `bytes N-(T-1)/T`, with exactly `T - N` body bytes (the video's own
    /// bytes, then filler past its end). Without `Range` behaves like [`Step::Serve`].
    OtherTotal(i64),
    /// 416 with `Content-Range: bytes */T`: `Some(T)`, or `None` for "whatever offset was asked",
    /// a server claiming the client already has the whole file.
    Unsatisfiable(Option<usize>),
    /// 302 with this `Location`, verbatim except for the placeholders `{api}` and `{cdn}` (the
    /// listeners' `ip:port`), `{id}` (the percent-encoded id) and `{sig}` (a fresh signature,
    /// valid for `/cdn/{id}` and `/files/{id}` on either host).
    RedirectTo(String),
    /// Like [`Step::Serve`], labelled with this `Content-Type` instead of `video/mp4`.
    ServeAs(String),
    /// Like [`Step::Serve`] (honouring `Range`), but with these bytes instead of the video's:
    /// an encoder's unfinished file, stray bytes after the last box, another version.
    Body(Arc<Vec<u8>>),
    /// A request with `Range` gets this status (an OpenAI-shaped error); one without is served.
    RefuseRange(u16),
    /// 206 for at most `n` bytes from the requested offset (0 without `Range`), with
    /// `Content-Range: bytes S-E/len`: a CDN that caps the size of a range, or answers a
    /// plain GET with a 206 for the whole file.
    Capped(usize),
    /// That status with an OpenAI-shaped error whose message is this text, with `{token}`
    /// replaced by the token the stand-in accepts and `{url}` by the request's own path and
    /// query (a server that echoes what it was sent).
    Echo(u16, String),
}

/// One scripted answer of the status endpoint (`GET /v1/videos/{id}`).
#[derive(Clone, Debug)]
pub enum StatusStep {
    /// 200 with the status object, this status word.
    Word(String),
    /// 404 with an OpenAI-shaped JSON error: the endpoint does not know the video.
    Missing,
    /// 404 with an HTML page, as a proxy in front of the API answers a path it does not know.
    Html404,
    /// That status with an OpenAI-shaped JSON error (a 403: a key not allowed to read status).
    Error(u16),
}

/// Which listener a request arrived on.
// Deliberately not `Copy`: tests written against `Clone` would trip clippy's `clone_on_copy`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Host {
    Api,
    Cdn,
}

/// A registered video: its exact content and the SHA-256 the daemon must end up with.
#[derive(Clone)]
pub struct Video {
    pub id: String,
    pub bytes: Arc<Vec<u8>>,
    /// Lowercase hex SHA-256 of `bytes`.
    pub sha256: String,
}

// Hand-written so that a failing `assert_eq!` does not print megabytes of video.
impl fmt::Debug for Video {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Video")
            .field("id", &self.id)
            .field("len", &self.bytes.len())
            .field("sha256", &self.sha256)
            .finish()
    }
}

/// One entry of the request log. Entries are appended when a request has been parsed and its
/// answer decided (before any body byte is written), then updated while the body streams.
#[derive(Clone, Debug)]
pub struct Request {
    pub host: Host,
    pub method: String,
    /// Raw (still percent-encoded) path, without the query.
    pub path: String,
    pub query: Option<String>,
    pub authorization: Option<String>,
    pub range: Option<String>,
    pub if_range: Option<String>,
    /// When the request head was fully received.
    pub at: Instant,
    /// Status code of the status line the stand-in answered.
    pub status: u16,
    /// Body bytes handed to the socket so far (payload only, without chunk framing). A client
    /// that hung up may not have received all of them.
    pub body_sent: usize,
    /// The response is complete (or deliberately cut) and the stand-in closed its side.
    pub finished: bool,
    /// A [`Step::Stall`] or [`Step::Hold`] has sent its first bytes and is waiting.
    pub paused: bool,
    /// When `paused` was first set.
    pub paused_at: Option<Instant>,
    /// When `finished` was set.
    pub finished_at: Option<Instant>,
    /// The client went away before the stand-in was done with the response (a write failed,
    /// or the client closed the connection during a stall/hold).
    pub peer_closed: bool,
}

impl Request {
    /// The percent-decoded video id, for content, status and signed-file paths.
    pub fn video_id(&self) -> Option<String> {
        match classify(&self.path) {
            Route::Content(id) | Route::Status(id) | Route::Signed(id) => Some(id),
            Route::Other => None,
        }
    }

    /// `GET /v1/videos/{id}/content` on the API host.
    pub fn is_content(&self) -> bool {
        self.host == Host::Api && matches!(classify(&self.path), Route::Content(_))
    }

    /// `GET /v1/videos/{id}` on the API host.
    pub fn is_status(&self) -> bool {
        self.host == Host::Api && matches!(classify(&self.path), Route::Status(_))
    }

    /// A signed-URL request (`/cdn/{id}` or `/files/{id}`), on either host.
    pub fn is_signed(&self) -> bool {
        matches!(classify(&self.path), Route::Signed(_))
    }
}

impl fmt::Display for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} {} {}", self.host, self.method, self.path)?;
        if let Some(query) = &self.query {
            write!(f, "?{query}")?;
        }
        if let Some(auth) = &self.authorization {
            write!(f, " [authorization: {auth}]")?;
        }
        if let Some(range) = &self.range {
            write!(f, " [range: {range}]")?;
        }
        if let Some(v) = &self.if_range {
            write!(f, " [if-range: {v}]")?;
        }
        write!(f, " -> {} ({} body bytes", self.status, self.body_sent)?;
        for (flag, name) in [
            (self.paused, "paused"),
            (self.finished, "finished"),
            (self.peer_closed, "peer closed"),
        ] {
            if flag {
                write!(f, ", {name}")?;
            }
        }
        write!(f, ")")
    }
}

/// The running stand-in. Dropping it stops both listeners and closes every open connection.
pub struct StandIn {
    shared: Arc<Shared>,
    api: SocketAddr,
    cdn: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl StandIn {
    /// Starts on ephemeral ports: API on 127.0.0.1, CDN on 127.0.0.2. Panics if it cannot bind.
    pub fn start(token: &str) -> StandIn {
        let api = SocketAddr::from(([127, 0, 0, 1], 0));
        let cdn = SocketAddr::from(([127, 0, 0, 2], 0));
        StandIn::start_on(api, cdn, token, false).expect("start the HingNet stand-in")
    }

    /// Starts on the given addresses. In `demo` mode any unknown id (except ids containing
    /// "missing") gets a 3 MiB video whose script is `[NotReady, Redirect]`.
    pub fn start_on(
        api: SocketAddr,
        cdn: SocketAddr,
        token: &str,
        demo: bool,
    ) -> io::Result<StandIn> {
        // Bind here, not on the server thread, so that bind errors reach the caller and the
        // real ports are known before `start_on` returns.
        let api_std = StdTcpListener::bind(api)?;
        let cdn_std = StdTcpListener::bind(cdn)?;
        let api = api_std.local_addr()?;
        let cdn = cdn_std.local_addr()?;
        api_std.set_nonblocking(true)?;
        cdn_std.set_nonblocking(true)?;

        // Everything the server does is async (including stalls), so one thread is plenty and
        // keeps the order of events easy to reason about.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (api_listener, cdn_listener) = {
            let _context = runtime.enter();
            (
                TcpListener::from_std(api_std)?,
                TcpListener::from_std(cdn_std)?,
            )
        };

        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                token: token.to_owned(),
                demo,
                api,
                cdn,
                videos: HashMap::new(),
                scripts: HashMap::new(),
                cdn_scripts: HashMap::new(),
                status_scripts: HashMap::new(),
                status_extra: HashMap::new(),
                added_at: HashMap::new(),
                signatures: HashMap::new(),
                holds: HashMap::new(),
                issued: Vec::new(),
                log: Vec::new(),
            }),
            changed: Condvar::new(),
            started: Instant::now(),
        });

        let (stop, stopped) = oneshot::channel::<()>();
        let server = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("hingnet-standin".into())
            .spawn(move || {
                runtime.block_on(async move {
                    tokio::select! {
                        () = accept_loop(api_listener, Host::Api, Arc::clone(&server)) => {}
                        () = accept_loop(cdn_listener, Host::Cdn, server) => {}
                        _ = stopped => {}
                    }
                });
                // Dropping the runtime here cancels every connection task, stalled ones
                // included, which closes their sockets.
                drop(runtime);
            })?;

        Ok(StandIn {
            shared,
            api,
            cdn,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// `http://127.0.0.1:PORT`, without a trailing slash.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.api)
    }

    pub fn api_addr(&self) -> SocketAddr {
        self.api
    }

    pub fn cdn_addr(&self) -> SocketAddr {
        self.cdn
    }

    /// From now on API-host requests need `Authorization: Bearer {token}`; others get 401.
    pub fn set_token(&self, token: &str) {
        self.shared.lock().token = token.to_owned();
    }

    /// Registers `id` with deterministic content of `size` bytes (see [`video_content`]).
    /// Gives it the script `[Serve]` and status "completed" unless those were already set.
    pub fn add_video(&self, id: &str, size: usize) -> Video {
        let video = make_video(id, size);
        self.shared
            .lock()
            .insert_video(video.clone(), vec![Step::Serve]);
        video
    }

    /// The registered (or demo-created) video, if any.
    pub fn video(&self, id: &str) -> Option<Video> {
        self.shared.lock().videos.get(id).cloned()
    }

    /// Replaces the content-request script of `id`: one step per content request on the API
    /// host; the last step repeats forever. An auth failure (401) does not consume a step.
    pub fn script(&self, id: &str, steps: Vec<Step>) {
        assert!(!steps.is_empty(), "a script needs at least one step");
        self.shared
            .lock()
            .scripts
            .insert(id.to_owned(), steps.into());
    }

    /// Replaces the signed-file script of `id` (CDN `/cdn/{id}` and relative `/files/{id}`
    /// requests). Default `[Serve]`. [`Step::Redirect`] here chains to a fresh CDN URL.
    pub fn script_cdn(&self, id: &str, steps: Vec<Step>) {
        assert!(!steps.is_empty(), "a script needs at least one step");
        self.shared
            .lock()
            .cdn_scripts
            .insert(id.to_owned(), steps.into());
    }

    /// What `GET /v1/videos/{id}` answers: `Some(word)` → 200 JSON with that status word,
    /// `None` → 404 JSON error.
    pub fn set_status(&self, id: &str, status: Option<&str>) {
        let step = match status {
            Some(w) => StatusStep::Word(w.to_owned()),
            None => StatusStep::Missing,
        };
        self.script_status(id, vec![step]);
    }

    /// Replaces the status endpoint's script for `id`: one step per status request, the last
    /// one repeating (a replica that lags, a proxy's page).
    pub fn script_status(&self, id: &str, steps: Vec<StatusStep>) {
        assert!(!steps.is_empty(), "a script needs at least one step");
        self.shared
            .lock()
            .status_scripts
            .insert(id.to_owned(), steps.into());
    }

    /// Fields merged into every status object of `id` (`expires_at`, a Veo-style `video_url`,
    /// ...). In a string value, `{sig}` becomes a fresh signed-URL signature, which the leak
    /// sweep then looks for.
    pub fn status_fields(&self, id: &str, fields: serde_json::Value) {
        assert!(fields.is_object());
        self.shared
            .lock()
            .status_extra
            .insert(id.to_owned(), fields);
    }

    /// The status requests for `id` so far.
    pub fn status_requests(&self, id: &str) -> Vec<Request> {
        self.requests()
            .into_iter()
            .filter(|r| r.is_status() && r.video_id().as_deref() == Some(id))
            .collect()
    }

    /// The content requests for `id` so far (API host).
    pub fn content_requests(&self, id: &str) -> Vec<Request> {
        self.requests()
            .into_iter()
            .filter(|r| r.is_content() && r.video_id().as_deref() == Some(id))
            .collect()
    }

    /// Registers `id` with exactly these bytes (see [`StandIn::add_video`]).
    pub fn add_video_bytes(&self, id: &str, bytes: Vec<u8>) -> Video {
        let video = Video {
            id: id.to_owned(),
            sha256: sha256_hex(&bytes),
            bytes: Arc::new(bytes),
        };
        self.shared
            .lock()
            .insert_video(video.clone(), vec![Step::Serve]);
        video
    }

    /// Invalidates every signed URL issued so far: the CDN answers them with 403 (XML body),
    /// as a real CDN does once the signature has expired.
    pub fn expire_signatures(&self) {
        self.shared.lock().signatures.clear();
    }

    /// Every signed-URL signature issued so far (`SIGNED-<hex>`), expired ones included: the
    /// secrets a leak sweep looks for.
    pub fn signatures_issued(&self) -> Vec<String> {
        self.shared.lock().issued.clone()
    }

    /// Requests that reached the CDN listener carrying an `Authorization` header: the token
    /// leaving the API host. Must stay empty.
    pub fn cdn_authorizations(&self) -> Vec<Request> {
        self.shared
            .lock()
            .log
            .iter()
            .filter(|r| r.host == Host::Cdn && r.authorization.is_some())
            .cloned()
            .collect()
    }

    /// A snapshot of the request log, in arrival order, both hosts.
    pub fn requests(&self) -> Vec<Request> {
        self.shared.lock().log.clone()
    }

    /// Blocks until `pred(log)` holds and returns that log. Panics after `timeout` with `what`
    /// and a dump of the log. `Duration::MAX` waits forever.
    pub fn wait_for<F: Fn(&[Request]) -> bool>(
        &self,
        what: &str,
        timeout: Duration,
        pred: F,
    ) -> Vec<Request> {
        let deadline = Instant::now().checked_add(timeout);
        let mut state = self.shared.lock();
        loop {
            if pred(&state.log) {
                return state.log.clone();
            }
            let wait = match deadline {
                // Re-check periodically only because Condvar cannot wait forever by timeout.
                None => Duration::from_secs(3600),
                Some(deadline) => match deadline.checked_duration_since(Instant::now()) {
                    Some(left) if !left.is_zero() => left,
                    _ => break,
                },
            };
            state = self
                .shared
                .changed
                .wait_timeout(state, wait)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        let dump = self.shared.dump(&state.log);
        // Release the lock before panicking so the server thread is not left with a poisoned
        // mutex while the test unwinds.
        drop(state);
        panic!("timed out after {timeout:?} waiting for {what}; request log:\n{dump}");
    }

    /// Lets one [`Step::Hold`] of `id` continue. If no hold is waiting yet, the release is
    /// remembered and the next hold of `id` passes straight through (no lost wake-ups).
    pub fn release(&self, id: &str) {
        self.shared.lock().hold_gate(id).add_permits(1);
    }

    /// The request log formatted one line per request, as `wait_for` prints it on timeout.
    pub fn dump(&self) -> String {
        let state = self.shared.lock();
        self.shared.dump(&state.log)
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            // Quick: the runtime only has to drop its tasks. Joining guarantees the ports are
            // closed when `drop` returns.
            let _ = thread.join();
        }
    }
}

/// The deterministic content of video `id` with `size` bytes (`size >= 64`): an MP4 `ftyp`
/// box (`isom`, minor 0x200, brands `isom mp41`), a small `moov` box, an `mdat` box header
/// covering the rest, then xorshift bytes seeded from the id. The same id always yields the
/// same prefix. A whole MP4 to the daemon's box walk; any cut of it is not.
pub fn video_content(id: &str, size: usize) -> Vec<u8> {
    assert!(
        size >= 64,
        "video size must be at least 64 bytes, got {size}"
    );
    const HEAD: [u8; 48] = *b"\0\0\0\x18ftypisom\0\0\x02\0isommp41\0\0\0\x18moovstand-in movie\0\0";
    let mut out = vec![0u8; size];
    out[..48].copy_from_slice(&HEAD);
    // An `mdat` box spanning the rest keeps the file walkable box by box.
    let mdat_len = u32::try_from(size - HEAD.len()).unwrap_or(u32::MAX);
    out[48..52].copy_from_slice(&mdat_len.to_be_bytes());
    out[52..56].copy_from_slice(b"mdat");
    // xorshift64 must not start at zero; `| 1` guarantees that.
    let mut x = fnv1a(id.as_bytes()) | 1;
    for word in out[56..].chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        word.copy_from_slice(&x.to_le_bytes()[..word.len()]);
    }
    out
}

/// Lowercase hex SHA-256.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .fold(String::new(), |mut hex, b| {
            let _ = write!(hex, "{b:02x}");
            hex
        })
}

fn make_video(id: &str, size: usize) -> Video {
    let bytes = video_content(id, size);
    Video {
        id: id.to_owned(),
        sha256: sha256_hex(&bytes),
        bytes: Arc::new(bytes),
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

// ---------------------------------------------------------------------------------------------
// Shared state
// ---------------------------------------------------------------------------------------------

struct Shared {
    state: Mutex<State>,
    /// Notified on every change of `State::log`.
    changed: Condvar,
    started: Instant,
}

struct State {
    token: String,
    demo: bool,
    api: SocketAddr,
    cdn: SocketAddr,
    videos: HashMap<String, Video>,
    scripts: HashMap<String, VecDeque<Step>>,
    cdn_scripts: HashMap<String, VecDeque<Step>>,
    status_scripts: HashMap<String, VecDeque<StatusStep>>,
    /// Fields merged into a video's status object (`{sig}` in a string: a fresh signature).
    status_extra: HashMap<String, serde_json::Value>,
    /// Unix time at which each video was registered; the status JSON derives its times from it.
    added_at: HashMap<String, u64>,
    /// Signed-URL signature → the video id it was issued for.
    signatures: HashMap<String, String>,
    /// Release permits for `Step::Hold`, per id.
    holds: HashMap<String, Arc<Semaphore>>,
    /// Every signature ever issued (`expire_signatures` does not forget them here).
    issued: Vec<String>,
    log: Vec<Request>,
}

impl Shared {
    /// Locks the state, shrugging off poisoning: a panicking test must not take the server
    /// thread (or other assertions) down with it.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn update(&self, idx: usize, change: impl FnOnce(&mut Request)) {
        if let Some(request) = self.lock().log.get_mut(idx) {
            change(request);
        }
        self.changed.notify_all();
    }

    fn dump(&self, log: &[Request]) -> String {
        if log.is_empty() {
            return "  (no requests)\n".to_owned();
        }
        let mut out = String::new();
        for (i, request) in log.iter().enumerate() {
            let at = request.at.saturating_duration_since(self.started);
            let _ = writeln!(out, "  #{i} +{:.3}s {request}", at.as_secs_f64());
        }
        out
    }
}

impl State {
    fn insert_video(&mut self, video: Video, default_script: Vec<Step>) {
        let id = video.id.clone();
        self.scripts
            .entry(id.clone())
            .or_insert_with(|| default_script.into());
        self.status_scripts
            .entry(id.clone())
            .or_insert_with(|| vec![StatusStep::Word("completed".to_owned())].into());
        self.added_at.insert(id.clone(), unix_now());
        self.videos.insert(id, video);
    }

    /// In demo mode, creates a video for an id seen for the first time.
    fn ensure_demo_video(&mut self, id: &str) {
        if self.demo && !id.contains("missing") && !self.videos.contains_key(id) {
            self.insert_video(
                make_video(id, DEMO_SIZE),
                vec![Step::NotReady, Step::Redirect],
            );
        }
    }

    fn hold_gate(&mut self, id: &str) -> Arc<Semaphore> {
        Arc::clone(
            self.holds
                .entry(id.to_owned())
                .or_insert_with(|| Arc::new(Semaphore::new(0))),
        )
    }

    fn new_signature(&mut self, id: &str) -> String {
        // Unpredictable enough to be a "secret" in log-leak tests, unique per issue.
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let seed = nanos ^ COUNTER.fetch_add(1, Ordering::Relaxed).rotate_left(32);
        let sig = format!(
            "SIGNED-{:016x}{:016x}",
            splitmix64(seed),
            splitmix64(seed ^ 0x5bd1_e995)
        );
        self.signatures.insert(sig.clone(), id.to_owned());
        self.issued.push(sig.clone());
        sig
    }
}

/// Takes the next step of a script; the last one stays and repeats.
fn next_step(script: &mut VecDeque<Step>) -> Step {
    if script.len() > 1 {
        script.pop_front().unwrap_or(Step::Serve)
    } else {
        script.front().cloned().unwrap_or(Step::Serve)
    }
}

// ---------------------------------------------------------------------------------------------
// Routing: decide the answer (under the lock), without any I/O
// ---------------------------------------------------------------------------------------------

enum Route {
    Content(String),
    Status(String),
    Signed(String),
    Other,
}

fn classify(path: &str) -> Route {
    let single_segment = |s: &str| !s.is_empty() && !s.contains('/');
    if let Some(rest) = path
        .strip_prefix("/cdn/")
        .or_else(|| path.strip_prefix("/files/"))
        && single_segment(rest)
    {
        return Route::Signed(percent_decode(rest));
    }
    if let Some(rest) = path.strip_prefix("/v1/videos/") {
        if single_segment(rest) {
            return Route::Status(percent_decode(rest));
        }
        if let Some(raw) = rest.strip_suffix("/content")
            && single_segment(raw)
        {
            return Route::Content(percent_decode(raw));
        }
    }
    Route::Other
}

/// The parsed request head.
struct Head {
    method: String,
    path: String,
    query: Option<String>,
    authorization: Option<String>,
    range: Option<String>,
    if_range: Option<String>,
}

fn parse_head(raw: &[u8]) -> Option<Head> {
    let text = String::from_utf8_lossy(raw);
    let mut lines = text.split("\r\n");
    let mut parts = lines.next()?.split(' ');
    let (method, target, version) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || !version.starts_with("HTTP/1.") || method.is_empty() {
        return None;
    }
    // Accept absolute-form targets too, in case a client talks to us as if we were a proxy.
    let target = match target.strip_prefix("http://") {
        Some(rest) => rest.find('/').map_or("/", |i| &rest[i..]),
        None => target,
    };
    let (path, query) = match target.split_once('?') {
        Some((path, query)) => (path, Some(query.to_owned())),
        None => (target, None),
    };
    let mut head = Head {
        method: method.to_owned(),
        path: path.to_owned(),
        query,
        authorization: None,
        range: None,
        if_range: None,
    };
    for line in lines {
        let (name, value) = line.split_once(':')?;
        let slot = match name.trim().to_ascii_lowercase().as_str() {
            "authorization" => &mut head.authorization,
            "range" => &mut head.range,
            "if-range" => &mut head.if_range,
            _ => continue,
        };
        // A repeated header keeps its first value.
        slot.get_or_insert_with(|| value.trim().to_owned());
    }
    Some(head)
}

/// `bytes=N-` → `Some(N)`. Any other form is treated as no Range at all.
fn parse_range(range: Option<&str>) -> Option<usize> {
    range?
        .trim()
        .strip_prefix("bytes=")?
        .strip_suffix('-')?
        .trim()
        .parse()
        .ok()
}

fn query_param<'a>(query: Option<&'a str>, name: &str) -> Option<&'a str> {
    query?
        .split('&')
        .find_map(|pair| pair.strip_prefix(name)?.strip_prefix('='))
}

fn route(state: &mut State, host: &Host, head: &Head) -> Reply {
    if head.method != "GET" && head.method != "HEAD" {
        return Reply::api_error(405, "method not allowed", "invalid_request_error", None);
    }
    let range = parse_range(head.range.as_deref());
    match classify(&head.path) {
        // Signed URLs carry their own credential (the query), so they are served on either
        // host without looking at Authorization.
        Route::Signed(id) => signed_file(state, &id, head, range),
        _ if *host == Host::Cdn => {
            Reply::xml_error(404, "NoSuchKey", "The specified key does not exist.")
        }
        route => {
            let expected = format!("Bearer {}", state.token);
            if head.authorization.as_deref() != Some(expected.as_str()) {
                return Reply::api_error(
                    401,
                    "Incorrect API key provided",
                    "invalid_request_error",
                    Some("invalid_api_key"),
                );
            }
            match route {
                Route::Content(id) => content(state, &id, head, range),
                Route::Status(id) => status(state, &id),
                _ => Reply::api_error(404, "not found", "invalid_request_error", None),
            }
        }
    }
}

fn not_found() -> Reply {
    Reply::api_error(
        404,
        "task does not exist or is not finished yet",
        "invalid_request_error",
        Some("not_found"),
    )
}

/// A video's entity tag: changes whenever its content does.
fn etag(video: &Video) -> String {
    format!("\"{}\"", &video.sha256[..16])
}

/// Serves the video the way `step` says, with its ETag, honouring `If-Range`: a validator that
/// no longer matches turns a Range request into a full 200 (RFC 9110 §13.1.5).
fn video_reply(
    state: &mut State,
    step: Step,
    video: &Video,
    head: &Head,
    range: Option<usize>,
) -> Reply {
    let tag = etag(video);
    let range = range.filter(|_| head.if_range.as_deref().is_none_or(|v| v == tag));
    let reply = match step {
        Step::Echo(code, text) => {
            let url = match &head.query {
                Some(q) => format!("{}?{q}", head.path),
                None => head.path.clone(),
            };
            let message = text.replace("{token}", &state.token).replace("{url}", &url);
            Reply::api_error(code, &message, "invalid_request_error", None)
        }
        step => apply(state, step, video, range),
    };
    if matches!(reply.status, 200 | 206) {
        reply.header("ETag", tag)
    } else {
        reply
    }
}

fn content(state: &mut State, id: &str, head: &Head, range: Option<usize>) -> Reply {
    state.ensure_demo_video(id);
    let Some(video) = state.videos.get(id).cloned() else {
        return not_found();
    };
    let step = next_step(state.scripts.entry(id.to_owned()).or_default());
    video_reply(state, step, &video, head, range)
}

fn signed_file(state: &mut State, id: &str, head: &Head, range: Option<usize>) -> Reply {
    let query = head.query.as_deref();
    let valid = query_param(query, "sig").and_then(|sig| state.signatures.get(sig));
    if valid.map(String::as_str) != Some(id) {
        return Reply::xml_error(403, "AccessDenied", "Request has expired");
    }
    let Some(video) = state.videos.get(id).cloned() else {
        return Reply::xml_error(404, "NoSuchKey", "The specified key does not exist.");
    };
    let step = next_step(state.cdn_scripts.entry(id.to_owned()).or_default());
    video_reply(state, step, &video, head, range)
}

fn status(state: &mut State, id: &str) -> Reply {
    state.ensure_demo_video(id);
    let step = state.status_scripts.get_mut(id).map(|s| {
        if s.len() > 1 {
            s.pop_front().expect("non-empty")
        } else {
            s.front().cloned().expect("non-empty")
        }
    });
    let word = match step {
        Some(StatusStep::Word(w)) => w,
        Some(StatusStep::Html404) => {
            return Reply::new(404).body(
                "text/html",
                b"<html><head><title>404 Not Found</title></head><body><h1>Not Found</h1></body></html>\n"
                    .to_vec(),
            );
        }
        Some(StatusStep::Error(code)) => {
            return Reply::api_error(
                code,
                &format!("stand-in status error {code}"),
                "permission_error",
                None,
            );
        }
        Some(StatusStep::Missing) | None => {
            return Reply::api_error(
                404,
                "task does not exist",
                "invalid_request_error",
                Some("not_found"),
            );
        }
    };
    let word = &word;
    let added = state.added_at.get(id).copied().unwrap_or_else(unix_now);
    let finished = matches!(word.as_str(), "completed" | "success");
    let progress = match word.as_str() {
        "completed" | "success" => 100,
        "queued" | "queueing" | "created" | "failed" | "cancelled" | "expired" => 0,
        _ => 50,
    };
    let mut body = json!({
        "id": id,
        "object": "video",
        "status": word,
        "progress": progress,
        "created_at": added.saturating_sub(60),
        "model": "sora-2",
        "prompt": "a stand-in video",
        "seconds": "8",
        "size": "720x1280",
    });
    if finished {
        body["completed_at"] = json!(added);
        body["expires_at"] = json!(added + EXPIRY_SECS);
    }
    if let Some(extra) = state.status_extra.get(id).cloned() {
        for (k, v) in extra.as_object().expect("an object") {
            let v = match v {
                serde_json::Value::String(t) if t.contains("{sig}") => {
                    json!(t.replace("{sig}", &state.new_signature(id)))
                }
                serde_json::Value::Object(o) => {
                    let mut o = o.clone();
                    for v in o.values_mut() {
                        if let Some(t) = v.as_str().filter(|t| t.contains("{sig}")) {
                            *v = json!(t.replace("{sig}", &state.new_signature(id)));
                        }
                    }
                    serde_json::Value::Object(o)
                }
                other => other.clone(),
            };
            body[k] = v;
        }
    }
    Reply::json(200, &body)
}

fn apply(state: &mut State, step: Step, video: &Video, range: Option<usize>) -> Reply {
    let bytes = &video.bytes;
    let len = bytes.len();
    match step {
        Step::Serve => Reply::ranged(bytes, range, Cut::None),
        Step::Truncate(n) => Reply::ranged(bytes, range, Cut::Close(n)),
        Step::Stall(n) => Reply::ranged(bytes, range, Cut::Stall(n)),
        Step::Silent => {
            let mut reply = Reply::ranged(bytes, range, Cut::Silent);
            // Logged as 0: no status line ever goes out.
            reply.status = 0;
            reply
        }
        Step::Hold(n) => Reply::ranged(bytes, range, Cut::Hold(n, state.hold_gate(&video.id))),
        Step::Redirect => {
            let sig = state.new_signature(&video.id);
            let location = format!(
                "http://{}/cdn/{}?sig={sig}&exp={}",
                state.cdn,
                percent_encode(&video.id),
                unix_now() + EXPIRY_SECS
            );
            Reply::new(302).header("Location", location)
        }
        Step::RedirectRelative => {
            let sig = state.new_signature(&video.id);
            let location = format!(
                "/files/{}?sig={sig}&exp={}",
                percent_encode(&video.id),
                unix_now() + EXPIRY_SECS
            );
            Reply::new(302).header("Location", location)
        }
        Step::NotReady => Reply::api_error(
            400,
            "video not ready",
            "invalid_request_error",
            Some("video_not_ready"),
        ),
        Step::NotFound => not_found(),
        Step::Error(code) => Reply::api_error(
            code,
            &format!("stand-in error {code}"),
            "server_error",
            None,
        ),
        Step::RateLimited(retry_after) => Reply::api_error(
            429,
            "rate limit exceeded",
            "rate_limit_error",
            Some("rate_limit_exceeded"),
        )
        .header("Retry-After", retry_after),
        Step::Html => Reply::new(200).body(
            "text/html; charset=utf-8",
            b"<!DOCTYPE html>\n<html><head><title>502 Bad Gateway</title></head>\n\
              <body><h1>502 Bad Gateway</h1><hr><center>nginx</center></body></html>\n"
                .to_vec(),
        ),
        Step::WrongType => Reply::new(200).body(
            "video/mp4",
            json!({"error": {"message": "video not ready", "type": "invalid_request_error",
                             "param": null, "code": "video_not_ready"}})
            .to_string()
            .into_bytes(),
        ),
        Step::IgnoreRange => Reply::ranged(bytes, None, Cut::None),
        Step::BadContentRange => match range {
            Some(_) => Reply::new(206)
                .shared_body("video/mp4", bytes, 0..len)
                .header("Content-Range", format!("bytes 0-{}/{len}", len - 1)),
            None => Reply::ranged(bytes, None, Cut::None),
        },
        Step::Chunked => {
            let mut reply = Reply::ranged(bytes, None, Cut::None);
            reply.chunked = true;
            reply
        }
        Step::Reset(n) => Reply::ranged(bytes, range, Cut::Reset(n)),
        Step::Drip { piece, pause } => Reply::ranged(bytes, range, Cut::Drip(piece.max(1), pause)),
        Step::LengthOver(n) => {
            let mut reply = Reply::ranged(bytes, range, Cut::None);
            reply.declared = Some(reply.span.len() + n);
            reply
        }
        Step::LengthUnder(n) => {
            let mut reply = Reply::ranged(bytes, range, Cut::None);
            reply.declared = Some(reply.span.len().saturating_sub(n));
            reply
        }
        Step::OtherTotal(delta) => match range {
            Some(start) => {
                let total = usize::try_from(len as i64 + delta)
                    .expect("OtherTotal: total must stay positive");
                assert!(
                    start < total,
                    "OtherTotal: the range must start before the total"
                );
                let mut body = bytes[start.min(len)..total.min(len)].to_vec();
                body.resize(total - start, 0xA5);
                Reply::new(206).body("video/mp4", body).header(
                    "Content-Range",
                    format!("bytes {start}-{}/{total}", total - 1),
                )
            }
            None => Reply::ranged(bytes, None, Cut::None),
        },
        Step::Unsatisfiable(total) => {
            let total = total.or(range).unwrap_or(len);
            Reply::new(416).header("Content-Range", format!("bytes */{total}"))
        }
        Step::ServeAs(content_type) => {
            let mut reply = Reply::ranged(bytes, range, Cut::None);
            for h in &mut reply.headers {
                if h.0 == "Content-Type" {
                    h.1 = content_type.clone();
                }
            }
            reply
        }
        Step::Body(other) => Reply::ranged(&other, range, Cut::None),
        Step::RefuseRange(code) => match range {
            Some(_) => Reply::api_error(
                code,
                &format!("stand-in refuses ranges ({code})"),
                "server_error",
                None,
            ),
            None => Reply::ranged(bytes, None, Cut::None),
        },
        Step::Capped(n) => {
            let start = range.unwrap_or(0);
            if start >= len {
                return Reply::new(416).header("Content-Range", format!("bytes */{len}"));
            }
            let end = start.saturating_add(n.max(1)).min(len);
            Reply::new(206)
                .shared_body("video/mp4", bytes, start..end)
                .header("Content-Range", format!("bytes {start}-{}/{len}", end - 1))
        }
        Step::Echo(..) => unreachable!("answered in video_reply"),
        Step::RedirectTo(location) => {
            let mut location = location
                .replace("{api}", &state.api.to_string())
                .replace("{cdn}", &state.cdn.to_string())
                .replace("{id}", &percent_encode(&video.id));
            if location.contains("{sig}") {
                let sig = state.new_signature(&video.id);
                location = location.replace("{sig}", &sig);
            }
            Reply::new(302).header("Location", location)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Responses
// ---------------------------------------------------------------------------------------------

/// Where the body stops short of what the head promised.
enum Cut {
    None,
    /// Send n bytes, then close.
    Close(usize),
    /// Send n bytes, then stay silent until the pause limit or the client hangs up, then close.
    Stall(usize),
    /// Send n bytes, wait for a permit from the gate, then send the rest.
    Hold(usize, Arc<Semaphore>),
    /// Send n bytes, then reset the connection.
    Reset(usize),
    /// Send nothing, not even the head; wait for the client to hang up.
    Silent,
    /// Send everything, `piece` bytes at a time with a pause between pieces.
    Drip(usize, Duration),
}

struct Reply {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: Arc<Vec<u8>>,
    span: Range<usize>,
    chunked: bool,
    cut: Cut,
    /// A `Content-Length` that differs from the body actually sent.
    declared: Option<usize>,
}

impl Reply {
    fn new(status: u16) -> Reply {
        Reply {
            status,
            headers: Vec::new(),
            body: Arc::default(),
            span: 0..0,
            chunked: false,
            cut: Cut::None,
            declared: None,
        }
    }

    fn header(mut self, name: &'static str, value: impl Into<String>) -> Reply {
        self.headers.push((name, value.into()));
        self
    }

    fn body(self, content_type: &str, body: Vec<u8>) -> Reply {
        let len = body.len();
        self.shared_body(content_type, &Arc::new(body), 0..len)
    }

    fn shared_body(mut self, content_type: &str, body: &Arc<Vec<u8>>, span: Range<usize>) -> Reply {
        self.body = Arc::clone(body);
        self.span = span;
        self.header("Content-Type", content_type)
    }

    fn json(status: u16, value: &serde_json::Value) -> Reply {
        Reply::new(status).body("application/json", value.to_string().into_bytes())
    }

    /// An OpenAI-shaped error, as the HingNet API sends them.
    fn api_error(status: u16, message: &str, kind: &str, code: Option<&str>) -> Reply {
        let body =
            json!({"error": {"message": message, "type": kind, "param": null, "code": code}});
        Reply::json(status, &body)
    }

    /// An S3-style XML error, as CDNs send them.
    fn xml_error(status: u16, code: &str, message: &str) -> Reply {
        let body = format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n\
             <Error><Code>{code}</Code><Message>{message}</Message></Error>\n"
        );
        Reply::new(status).body("application/xml", body.into_bytes())
    }

    /// The video, as a 200, a 206 for `bytes=N-`, or a 416 when N is past the end.
    fn ranged(bytes: &Arc<Vec<u8>>, range: Option<usize>, cut: Cut) -> Reply {
        let len = bytes.len();
        let mut reply = match range {
            None => Reply::new(200).shared_body("video/mp4", bytes, 0..len),
            Some(start) if start >= len => {
                return Reply::new(416).header("Content-Range", format!("bytes */{len}"));
            }
            Some(start) => Reply::new(206)
                .shared_body("video/mp4", bytes, start..len)
                .header("Content-Range", format!("bytes {start}-{}/{len}", len - 1)),
        };
        reply.cut = cut;
        reply
    }

    fn head(&self) -> Vec<u8> {
        let mut head = format!("HTTP/1.1 {} {}\r\n", self.status, reason(self.status));
        for (name, value) in &self.headers {
            let _ = write!(head, "{name}: {value}\r\n");
        }
        if self.chunked {
            head.push_str("Transfer-Encoding: chunked\r\n");
        } else {
            // The honest length of the whole span, even when the body will be cut, unless a
            // step lies about it.
            let declared = self.declared.unwrap_or(self.span.len());
            let _ = write!(head, "Content-Length: {declared}\r\n");
        }
        head.push_str("Connection: close\r\nServer: hingnet-standin\r\n\r\n");
        head.into_bytes()
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        206 => "Partial Content",
        301 => "Moved Permanently",
        302 => "Found",
        303 => "See Other",
        307 => "Temporary Redirect",
        308 => "Permanent Redirect",
        400 => "Bad Request",
        401 => "Unauthorized",
        402 => "Payment Required",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        410 => "Gone",
        416 => "Range Not Satisfiable",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Stand-In Status",
    }
}

fn percent_decode(s: &str) -> String {
    let hex = |b: u8| char::from(b).to_digit(16).map(|d| d as u8);
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hi = bytes.get(i + 1).copied().and_then(hex);
            let lo = bytes.get(i + 2).copied().and_then(hex);
            if let (Some(hi), Some(lo)) = (hi, lo) {
                out.push(hi << 4 | lo);
                i += 3;
                continue;
            }
        }
        // Malformed escapes are kept literally.
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for &b in s.as_bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Connections
// ---------------------------------------------------------------------------------------------

async fn accept_loop(listener: TcpListener, host: Host, shared: Arc<Shared>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(serve_connection(stream, host.clone(), Arc::clone(&shared)));
            }
            // Typically EMFILE or a connection reset before accept; back off a little rather
            // than spin, then keep serving.
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// Reads the request head (up to the blank line). `None` if the client left before sending a
/// complete head, which is not worth logging (port probes, aborted connects).
async fn read_head(stream: &mut TcpStream) -> Option<Vec<u8>> {
    let mut buf = Vec::with_capacity(1024);
    let mut scratch = [0u8; 4096];
    loop {
        let n = stream.read(&mut scratch).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&scratch[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            buf.truncate(end);
            return Some(buf);
        }
        if buf.len() > MAX_HEAD {
            return Some(buf);
        }
    }
}

async fn serve_connection(mut stream: TcpStream, host: Host, shared: Arc<Shared>) {
    // Small writes (headers, first bytes of a Hold) should leave at once.
    let _ = stream.set_nodelay(true);
    let Some(raw) = read_head(&mut stream).await else {
        return;
    };
    let at = Instant::now();
    let parsed = parse_head(&raw);

    // Decide the answer and log the request in one critical section, so the log order is the
    // order in which script steps were consumed.
    let (idx, reply, head_only) = {
        let mut state = shared.lock();
        let (entry, reply, head_only) = match parsed {
            Some(head) => {
                let reply = route(&mut state, &host, &head);
                let head_only = head.method == "HEAD";
                let entry = Request {
                    host,
                    method: head.method,
                    path: head.path,
                    query: head.query,
                    authorization: head.authorization,
                    range: head.range,
                    if_range: head.if_range,
                    at,
                    status: reply.status,
                    body_sent: 0,
                    finished: false,
                    paused: false,
                    paused_at: None,
                    finished_at: None,
                    peer_closed: false,
                };
                (entry, reply, head_only)
            }
            None => {
                let line = String::from_utf8_lossy(&raw);
                let line = line.lines().next().unwrap_or_default().to_owned();
                let reply = Reply::new(400).body("text/plain", b"malformed request\n".to_vec());
                let entry = Request {
                    host,
                    method: String::new(),
                    path: line,
                    query: None,
                    authorization: None,
                    range: None,
                    if_range: None,
                    at,
                    status: 400,
                    body_sent: 0,
                    finished: false,
                    paused: false,
                    paused_at: None,
                    finished_at: None,
                    peer_closed: false,
                };
                (entry, reply, false)
            }
        };
        state.log.push(entry);
        (state.log.len() - 1, reply, head_only)
    };
    shared.changed.notify_all();

    let mut conn = Connection {
        stream,
        shared: &shared,
        idx,
        sent: 0,
        peer_closed: false,
        reset: false,
    };
    if conn.respond(reply, head_only).await.is_err() {
        conn.peer_closed = true;
    }
    // Close our side; the client sees EOF right after the last byte we chose to send.
    // Not after a reset: a FIN first would let the client read a clean EOF.
    if !conn.reset {
        let _ = conn.stream.shutdown().await;
    }
    let peer_closed = conn.peer_closed;
    drop(conn);
    let ended = Instant::now();
    shared.update(idx, |r| {
        r.finished = true;
        r.finished_at = Some(ended);
        r.paused = false;
        r.peer_closed = peer_closed;
    });
}

enum PauseEnd {
    Released,
    TimedOut,
    PeerClosed,
}

struct Connection<'a> {
    stream: TcpStream,
    shared: &'a Shared,
    idx: usize,
    sent: usize,
    peer_closed: bool,
    /// The response ends with a reset: no FIN before the close.
    reset: bool,
}

impl Connection<'_> {
    async fn respond(&mut self, reply: Reply, head_only: bool) -> io::Result<()> {
        if let Cut::Silent = reply.cut {
            self.pause(None).await;
            return Ok(());
        }
        self.stream.write_all(&reply.head()).await?;
        self.stream.flush().await?;
        if head_only {
            return Ok(());
        }
        let body = &reply.body[reply.span.clone()];
        match &reply.cut {
            Cut::None => {
                self.write_body(body, reply.chunked).await?;
                self.finish_chunked(reply.chunked).await
            }
            Cut::Close(n) => {
                self.write_body(&body[..body.len().min(*n)], reply.chunked)
                    .await
            }
            Cut::Stall(n) => {
                self.write_body(&body[..body.len().min(*n)], reply.chunked)
                    .await?;
                self.pause(None).await;
                Ok(())
            }
            Cut::Hold(n, gate) => {
                let (first, rest) = body.split_at(body.len().min(*n));
                self.write_body(first, reply.chunked).await?;
                if let PauseEnd::PeerClosed = self.pause(Some(Arc::clone(gate))).await {
                    return Ok(());
                }
                self.write_body(rest, reply.chunked).await?;
                self.finish_chunked(reply.chunked).await
            }
            Cut::Silent => Ok(()),
            Cut::Reset(n) => {
                self.write_body(&body[..body.len().min(*n)], reply.chunked)
                    .await?;
                // SO_LINGER 0: closing sends RST instead of FIN. The caller's shutdown() then
                // fails harmlessly on the reset socket.
                self.stream.set_zero_linger()?;
                self.reset = true;
                Ok(())
            }
            Cut::Drip(piece, pause) => {
                for (i, part) in body.chunks(*piece).enumerate() {
                    if i > 0 {
                        tokio::time::sleep(*pause).await;
                    }
                    self.write_body(part, reply.chunked).await?;
                }
                self.finish_chunked(reply.chunked).await
            }
        }
    }

    /// Writes `data` in `CHUNK`-sized pieces, publishing progress after each one.
    async fn write_body(&mut self, data: &[u8], chunked: bool) -> io::Result<()> {
        for piece in data.chunks(CHUNK) {
            if chunked {
                let size = format!("{:x}\r\n", piece.len());
                self.stream.write_all(size.as_bytes()).await?;
            }
            self.stream.write_all(piece).await?;
            if chunked {
                self.stream.write_all(b"\r\n").await?;
            }
            self.stream.flush().await?;
            self.sent += piece.len();
            let sent = self.sent;
            self.shared.update(self.idx, |r| r.body_sent = sent);
        }
        Ok(())
    }

    async fn finish_chunked(&mut self, chunked: bool) -> io::Result<()> {
        if chunked {
            self.stream.write_all(b"0\r\n\r\n").await?;
            self.stream.flush().await?;
        }
        Ok(())
    }

    /// Sits silent with `paused = true` until released (if `gate` is given), the pause limit
    /// passes, or the client closes the connection — whichever comes first. Watching the read
    /// side lets tests see a daemon's stall timeout as `peer_closed` without waiting 120 s.
    async fn pause(&mut self, gate: Option<Arc<Semaphore>>) -> PauseEnd {
        let now = Instant::now();
        self.shared.update(self.idx, |r| {
            r.paused = true;
            r.paused_at.get_or_insert(now);
        });
        let released = async move {
            match gate {
                Some(gate) => {
                    if let Ok(permit) = gate.acquire().await {
                        permit.forget();
                    }
                }
                None => std::future::pending::<()>().await,
            }
        };
        let stream = &mut self.stream;
        let peer_gone = async move {
            let mut sink = [0u8; 512];
            // The request was fully read, so anything but more bytes means the client left.
            while let Ok(n) = stream.read(&mut sink).await {
                if n == 0 {
                    break;
                }
            }
        };
        let end = tokio::select! {
            () = released => PauseEnd::Released,
            () = peer_gone => PauseEnd::PeerClosed,
            () = tokio::time::sleep(PAUSE_LIMIT) => PauseEnd::TimedOut,
        };
        if let PauseEnd::PeerClosed = end {
            self.peer_closed = true;
        }
        self.shared.update(self.idx, |r| r.paused = false);
        end
    }
}

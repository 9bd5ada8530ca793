//! The HingNet API client: the HTTP client's settings, who gets the token, redirect following,
//! the status object, what may be kept of an answer (`redact`), and — in `classify` — the one
//! table that turns an HTTP status into what we do about it.

use std::sync::RwLock;
use std::time::{Duration, SystemTime};

use reqwest::header::{self, HeaderMap, HeaderValue};
use reqwest::{Response, StatusCode, Url};

use crate::config::{ApiConfig, Token};
use crate::id::VideoId;

/// Error pages and status JSON are read up to this size.
const SMALL_BODY: usize = 64 * 1024;
/// The longest `Retry-After` honoured; a larger one is a broken or hostile header.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);
/// Redirect hops followed before giving up (the contract's limit).
pub const MAX_REDIRECTS: usize = 10;
/// How much of an error body is kept for `last_error`.
const ERROR_BODY_LIMIT: usize = 512;

/// Which side answered: the API host (same scheme, host and port as `api.base_url`) or anything
/// a redirect led to (the CDN). Only the API host ever sees the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Host {
    Api,
    Cdn,
}

/// What to do with a response. The status-to-action rules of the contract, in one place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// 200/206: the body is (part of) the video.
    Stream,
    /// 416: the server says we asked past the end; may mean the partial is complete.
    RangeNotSatisfiable,
    /// 400 from the API: the video is not ready yet; ask again later.
    NotReady,
    /// 404 from the API: "does not exist or is not finished yet"; ask the status endpoint.
    ConfirmMissing,
    /// 401/402/403 from the API: the account or token, not the video: pause everything.
    AccountProblem,
    /// 429 anywhere: slow the whole client down.
    RateLimited,
    /// 410 from the API: the file is gone (expired); never asked for again.
    Expired,
    /// 401/403/404/410 from the CDN: the signed URL expired; start over from the API URL.
    SignedUrlExpired,
    /// 5xx, 408 and anything else unexpected: retry with backoff.
    Transient,
}

pub fn classify(host: Host, status: StatusCode) -> Action {
    match (host, status.as_u16()) {
        (_, 200 | 206) => Action::Stream,
        (_, 416) => Action::RangeNotSatisfiable,
        (_, 429) => Action::RateLimited,
        (Host::Api, 400) => Action::NotReady,
        (Host::Api, 404) => Action::ConfirmMissing,
        (Host::Api, 410) => Action::Expired,
        (Host::Api, 401..=403) => Action::AccountProblem,
        (Host::Cdn, 401 | 403 | 404 | 410) => Action::SignedUrlExpired,
        _ => Action::Transient,
    }
}

/// What the status endpoint says about a video.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VideoState {
    Pending,
    Finished,
    Failed(String),
    /// A status word the contract does not list: treated as pending, with a warning.
    Unknown(String),
}

pub fn classify_status_word(word: &str) -> VideoState {
    match word {
        "queued" | "processing" | "in_progress" | "created" | "queueing" | "pending" => {
            VideoState::Pending
        }
        "success" | "completed" | "succeeded" => VideoState::Finished,
        "failed" | "cancelled" | "canceled" | "expired" => VideoState::Failed(word.to_owned()),
        // Kept in `last_error` and the log: what a server sent, so redacted, and short.
        other => VideoState::Unknown(one_line(&redact(other), 64)),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Connection refused, DNS, TLS, reset, timeout: the message names the origin
    /// (`scheme://host:port`) that could not be reached, never the whole URL.
    #[error("{0}")]
    Network(String),
    /// The API host itself could not be reached (DNS, refused, TLS handshake): an outage of
    /// the client or the service, not something about any one video.
    #[error("{0}")]
    Unreachable(String),
    #[error("more than {MAX_REDIRECTS} redirects")]
    TooManyRedirects,
    #[error("refused redirect: {0}")]
    BadRedirect(String),
    #[error("no response headers from {1} within {0:?}")]
    HeaderTimeout(Duration, String),
}

/// What is recorded instead of a CDN's error body.
pub const CDN_BODY_NOT_KEPT: &str = "(body not kept: a CDN error page may echo the signed URL)";

/// What `GET /v1/videos/{id}` said.
#[derive(Debug, Clone, PartialEq)]
pub enum StatusRead {
    Object(StatusObject),
    /// A JSON 404 from the API host: the status endpoint does not know the video (which a
    /// lagging replica also says for a moment).
    Missing,
    AccountProblem {
        http_status: u16,
        reason: String,
    },
    RateLimited {
        retry_after: Option<Duration>,
    },
    /// No answer that says anything about the video: the network, a 5xx, a 404 that is not
    /// the API's (an HTML page), a body that is not JSON.
    Failed(String),
}

/// The status object: `status`, `expires_at` and the rest (model, prompt, seconds, size,
/// created_at, completed_at), kept with the video.
#[derive(Debug, Clone, PartialEq)]
pub struct StatusObject {
    pub state: VideoState,
    /// Unix seconds, when the object says.
    pub expires_at: Option<i64>,
    json: serde_json::Value,
}

impl StatusObject {
    pub fn new(json: serde_json::Value) -> StatusObject {
        let state = match json.get("status").and_then(|s| s.as_str()) {
            Some(word) => classify_status_word(word),
            None => VideoState::Unknown("(no status field)".into()),
        };
        let expires_at = json.get("expires_at").and_then(unix_seconds);
        StatusObject {
            state,
            expires_at,
            json,
        }
    }

    /// The object as it may be kept: every string redacted (`redact`: tokens, and the query
    /// strings of signed links such as Veo's `video_url`), as compact JSON.
    pub fn to_metadata(&self) -> String {
        fn clean(v: &serde_json::Value) -> serde_json::Value {
            use serde_json::Value;
            match v {
                Value::String(s) => Value::String(redact(s)),
                Value::Array(a) => Value::Array(a.iter().map(clean).collect()),
                Value::Object(o) => {
                    Value::Object(o.iter().map(|(k, v)| (redact(k), clean(v))).collect())
                }
                other => other.clone(),
            }
        }
        clean(&self.json).to_string()
    }
}

/// A time the API gives in unix seconds (a number, or a number in a string; milliseconds are
/// recognised by their size).
fn unix_seconds(v: &serde_json::Value) -> Option<i64> {
    let n = match v {
        serde_json::Value::Number(n) => n.as_f64()?,
        serde_json::Value::String(s) => s.trim().parse::<f64>().ok()?,
        _ => return None,
    };
    let secs = if n > 1e11 { n / 1000.0 } else { n };
    (secs.is_finite() && secs > 0.0).then_some(secs as i64)
}

/// A response and where it came from. `hops` counts the redirects followed.
pub struct Answer {
    pub response: Response,
    pub host: Host,
    /// The answering host's name and port, safe to log (no path, no query).
    pub origin: String,
}

/// Every token this process has used (a reload may have replaced the one in use): scrubbed from
/// anything kept, whichever of them a server echoes.
static SECRETS: RwLock<Vec<String>> = RwLock::new(Vec::new());

pub(crate) fn remember_secret(secret: &str) {
    let mut all = SECRETS.write().unwrap_or_else(|p| p.into_inner());
    if !all.iter().any(|s| s == secret) {
        all.push(secret.to_owned());
    }
}

/// What may be kept (in `last_error`, the attempt log, a log line or the metadata) of text a
/// server sent: every token this process has used is replaced by `<token>`, and every URL's
/// query string is dropped (a signed URL's query is a credential, and an API error page reached
/// through a redirect may echo it).
pub fn redact(text: &str) -> String {
    let mut out = text.to_owned();
    for secret in SECRETS.read().unwrap_or_else(|p| p.into_inner()).iter() {
        if secret.len() >= 4 && out.contains(secret.as_str()) {
            out = out.replace(secret.as_str(), "<token>");
        }
    }
    drop_queries(&out)
}

/// Drops the query string of everything in `text` that looks like a URL or a path (a `?`, or
/// its encoding `%3F`, after a `/` in the same word), up to the end of that word; and the
/// value of any parameter named like a credential (`sig=`, `X-Amz-Signature=`, `token=`...),
/// wherever it stands.
fn drop_queries(text: &str) -> String {
    let ends_word =
        |c: char| c.is_whitespace() || matches!(c, '"' | '\'' | '<' | '>' | '(' | ')' | '`');
    let mut out = String::with_capacity(text.len());
    let mut word_has_slash = false;
    let mut skipping = false;
    let mut chars = text.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        if ends_word(c) {
            word_has_slash = false;
            skipping = false;
            out.push(c);
            continue;
        }
        if skipping {
            continue;
        }
        let encoded = c == '%'
            && text[i..]
                .get(..3)
                .is_some_and(|h| h.eq_ignore_ascii_case("%3f"));
        if (c == '?' || encoded) && word_has_slash {
            out.push_str("?[query removed]");
            skipping = true;
            continue;
        }
        if c == '=' && ends_with_credential_name(&out) {
            out.push_str("=[removed]");
            // Up to the next separator of parameters, or the end of the word.
            while let Some(&(_, n)) = chars.peek() {
                if ends_word(n) || n == '&' || n == ';' || n == ',' {
                    break;
                }
                chars.next();
            }
            continue;
        }
        word_has_slash |= c == '/';
        out.push(c);
    }
    out
}

/// Whether the text so far ends with a parameter name that carries a credential.
fn ends_with_credential_name(before: &str) -> bool {
    const NAMES: [&str; 8] = [
        "sig",
        "signature",
        "x-amz-signature",
        "x-amz-credential",
        "x-amz-security-token",
        "x-goog-signature",
        "token",
        "access_token",
    ];
    let name_start = before
        .rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '_'))
        .map_or(0, |i| i + 1);
    let name = &before[name_start..];
    NAMES.iter().any(|n| name.eq_ignore_ascii_case(n))
}

/// The metadata kept from a sidecar that was already there (an earlier run's, or anybody's):
/// redacted like a status object just read, or nothing if it is not a JSON object.
pub fn clean_metadata(text: &str) -> Option<String> {
    serde_json::from_str::<serde_json::Value>(text)
        .ok()
        .filter(serde_json::Value::is_object)
        .map(|v| StatusObject::new(v).to_metadata())
}

pub struct ApiClient {
    http: reqwest::Client,
    base: Url,
    token: RwLock<Token>,
    header_timeout: Duration,
    read_timeout: Duration,
}

/// The HTTP client every request of the daemon goes through (the API, its CDN, an archive
/// bucket): no automatic redirects, the configured timeouts, proxies from the environment.
pub fn http_client(cfg: &ApiConfig) -> Result<reqwest::Client, reqwest::Error> {
    client_builder(cfg).read_timeout(cfg.read_timeout).build()
}

/// The same client without a read timeout, for uploads: reqwest's read timeout runs from the
/// request until the answer's headers, and sending a large body takes longer than that; an
/// upload's caller watches its progress instead (`store::s3`).
pub fn upload_client(cfg: &ApiConfig) -> Result<reqwest::Client, reqwest::Error> {
    client_builder(cfg).build()
}

fn client_builder(cfg: &ApiConfig) -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(cfg.connect_timeout)
        .user_agent(concat!("hingnetd/", env!("CARGO_PKG_VERSION")))
        .https_only(false)
}

impl ApiClient {
    pub fn new(cfg: &ApiConfig, base: Url, token: Token) -> Result<ApiClient, ApiError> {
        // Redirects are followed by hand (`get`) so that we decide who receives the token and
        // which schemes are acceptable. Proxies come from HTTPS_PROXY/NO_PROXY (reqwest's
        // default), TLS roots from the system store via rustls-platform-verifier.
        let http = http_client(cfg).map_err(|e| ApiError::Network(error_text(&e)))?;
        remember_secret(token.expose());
        Ok(ApiClient {
            http,
            base,
            token: RwLock::new(token),
            header_timeout: cfg.connect_timeout + cfg.read_timeout,
            read_timeout: cfg.read_timeout,
        })
    }

    pub fn read_timeout(&self) -> Duration {
        self.read_timeout
    }

    pub fn set_token(&self, token: Token) {
        remember_secret(token.expose());
        *self.token.write().unwrap_or_else(|p| p.into_inner()) = token;
    }

    /// A small body (status JSON, an error page), bounded in size and time.
    pub async fn read_small(&self, response: Response) -> Vec<u8> {
        read_limited(response, SMALL_BODY, self.read_timeout).await
    }

    /// What to record about an error answer's body. From the API: its message, redacted
    /// (`redact`) before it is cut to length, so that no part of a secret survives the cut.
    /// From a CDN: nothing, because CDN error pages may echo the signed URL, a credential.
    pub async fn error_reason(&self, answer: Answer) -> String {
        if answer.host == Host::Cdn {
            return CDN_BODY_NOT_KEPT.into();
        }
        error_summary(&self.read_small(answer.response).await)
    }

    /// `GET /v1/videos/{id}`: what the status endpoint says about the video.
    pub async fn read_status(&self, id: &VideoId) -> StatusRead {
        let answer = match self.get(self.status_url(id), None, None).await {
            Ok(a) => a,
            Err(e) => return StatusRead::Failed(e.to_string()),
        };
        let status = answer.response.status();
        match (answer.host, status.as_u16()) {
            (Host::Api, 200) => {
                let body = self.read_small(answer.response).await;
                match serde_json::from_slice::<serde_json::Value>(&body) {
                    Ok(v) if v.is_object() => StatusRead::Object(StatusObject::new(v)),
                    _ => StatusRead::Failed(
                        "the status endpoint answered 200 without a JSON object".into(),
                    ),
                }
            }
            (Host::Api, 404) => {
                let body = self.read_small(answer.response).await;
                if serde_json::from_slice::<serde_json::Value>(&body).is_ok() {
                    StatusRead::Missing
                } else {
                    StatusRead::Failed(
                        "the status endpoint answered 404 without JSON (a proxy's page, or a wrong api.base_url?)"
                            .into(),
                    )
                }
            }
            (host, _) => match classify(host, status) {
                Action::AccountProblem => StatusRead::AccountProblem {
                    http_status: status.as_u16(),
                    reason: self.error_reason(answer).await,
                },
                Action::RateLimited => StatusRead::RateLimited {
                    retry_after: retry_after(answer.response.headers()),
                },
                _ => {
                    let origin = answer.origin.clone();
                    let reason = self.error_reason(answer).await;
                    StatusRead::Failed(format!(
                        "status endpoint {origin} answered {status}: {reason}"
                    ))
                }
            },
        }
    }

    /// `{base}/v1/videos/{id}` plus any extra segments, the ID pushed as one encoded segment.
    fn video_url(&self, id: &VideoId, tail: Option<&str>) -> Url {
        let mut url = self.base.clone();
        {
            let mut segs = url
                .path_segments_mut()
                .expect("base_url was validated as http(s)");
            segs.pop_if_empty().extend(["v1", "videos", id.as_str()]);
            if let Some(t) = tail {
                segs.push(t);
            }
        }
        url
    }

    pub fn content_url(&self, id: &VideoId) -> Url {
        self.video_url(id, Some("content"))
    }

    pub fn status_url(&self, id: &VideoId) -> Url {
        self.video_url(id, None)
    }

    fn host_of(&self, url: &Url) -> Host {
        if url.scheme() == self.base.scheme()
            && url.host() == self.base.host()
            && url.port_or_known_default() == self.base.port_or_known_default()
        {
            Host::Api
        } else {
            Host::Cdn
        }
    }

    fn auth_header(&self) -> HeaderValue {
        let token = self.token.read().unwrap_or_else(|p| p.into_inner());
        let mut v = HeaderValue::from_str(&format!("Bearer {}", token.expose()))
            .expect("token characters were checked at load");
        v.set_sensitive(true);
        v
    }

    /// GET with redirects followed by hand. The token is attached only when the request goes to
    /// the API host; `Range: bytes=N-` goes to every hop. A redirect from https to anything but
    /// https, or to a scheme other than http(s), is refused.
    pub async fn get(
        &self,
        url: Url,
        range_from: Option<u64>,
        if_range: Option<&str>,
    ) -> Result<Answer, ApiError> {
        let mut url = url;
        for hop in 0..=MAX_REDIRECTS {
            let host = self.host_of(&url);
            let mut headers = HeaderMap::new();
            if host == Host::Api {
                headers.insert(header::AUTHORIZATION, self.auth_header());
            }
            if let Some(n) = range_from.filter(|n| *n > 0) {
                headers.insert(
                    header::RANGE,
                    HeaderValue::from_str(&format!("bytes={n}-")).expect("ascii"),
                );
                // The server sends the whole file instead if its version changed.
                if let Some(v) = if_range.and_then(|v| HeaderValue::from_str(v).ok()) {
                    headers.insert(header::IF_RANGE, v);
                }
            }
            let send = self.http.get(url.clone()).headers(headers).send();
            let response = match tokio::time::timeout(self.header_timeout, send).await {
                Err(_) => {
                    return Err(ApiError::HeaderTimeout(
                        self.header_timeout,
                        origin_of(&url),
                    ));
                }
                Ok(Err(e)) if e.is_connect() && hop == 0 && host == Host::Api => {
                    return Err(ApiError::Unreachable(network_error(&url, &e)));
                }
                Ok(Err(e)) => return Err(ApiError::Network(network_error(&url, &e))),
                Ok(Ok(r)) => r,
            };
            let status = response.status();
            crate::metrics::get().http_response(host, status.as_u16());
            if !status.is_redirection() || status == StatusCode::NOT_MODIFIED {
                return Ok(Answer {
                    response,
                    host,
                    origin: origin_of(&url),
                });
            }
            if hop == MAX_REDIRECTS {
                return Err(ApiError::TooManyRedirects);
            }
            let location = response
                .headers()
                .get(header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .ok_or_else(|| ApiError::BadRedirect(format!("{status} without a Location")))?;
            let next = redirect_target(&url, location)
                .map_err(|e| e.unwrap_or_else(|| format!("{status} to an unparsable Location")))
                .map_err(ApiError::BadRedirect)?;
            tracing::debug!(from = %origin_of(&url), to = %origin_of(&next), "following redirect");
            url = next;
        }
        unreachable!("the loop returns on its last hop")
    }
}

/// Where a redirect leads: `location` resolved against `from`, checked (`check_redirect`), and
/// without any `user:password@`, which reqwest would otherwise send to that host as an
/// `Authorization: Basic` header: only the API host gets credentials, and only ours.
/// `Err(None)` for a Location that does not parse.
fn redirect_target(from: &Url, location: &str) -> Result<Url, Option<String>> {
    let mut next = from.join(location).map_err(|_| None)?;
    check_redirect(from, &next).map_err(|e| match e {
        ApiError::BadRedirect(why) => Some(why),
        other => Some(other.to_string()),
    })?;
    if !next.username().is_empty() || next.password().is_some() {
        // Both only fail for URLs that cannot have credentials, which then have none.
        let _ = next.set_username("");
        let _ = next.set_password(None);
    }
    Ok(next)
}

/// The redirect rules: http(s) only, and never from https down to plain http.
fn check_redirect(from: &Url, to: &Url) -> Result<(), ApiError> {
    match (from.scheme(), to.scheme()) {
        ("https", "https") | ("http", "http" | "https") => Ok(()),
        ("https", "http") => Err(ApiError::BadRedirect(format!(
            "from https to plain http ({})",
            origin_of(to)
        ))),
        (_, other) => Err(ApiError::BadRedirect(format!(
            "to unsupported scheme {other:?}"
        ))),
    }
}

/// A failed request as one line that says which host could not be reached (its origin only: a
/// signed URL's path and query are a credential) and why.
fn network_error(url: &Url, e: &reqwest::Error) -> String {
    let origin = origin_of(url);
    let text = error_text(e);
    match text.strip_prefix("cannot connect") {
        Some(rest) => format!("cannot connect to {origin}{rest}"),
        None => format!("{origin}: {text}"),
    }
}

/// `scheme://host:port` of a URL: what may be logged of a signed URL.
pub fn origin_of(url: &Url) -> String {
    url.origin().ascii_serialization()
}

/// A reqwest error as text, without the URL it carries (a signed URL is a credential), with its
/// causes, on one line.
pub fn error_text(e: &reqwest::Error) -> String {
    use std::error::Error;
    let mut parts: Vec<String> = Vec::new();
    if e.is_timeout() {
        parts.push("timed out".into());
    } else if e.is_connect() {
        parts.push("cannot connect".into());
    } else if e.is_body() || e.is_decode() {
        parts.push("error reading body".into());
    } else if e.is_redirect() {
        parts.push("redirect error".into());
    }
    let mut src = e.source();
    while let Some(s) = src {
        let t = s.to_string();
        if !t.is_empty() && !parts.iter().any(|p| p.contains(&t)) {
            parts.push(t);
        }
        src = s.source();
    }
    if parts.is_empty() {
        parts.push("request failed".into());
    }
    parts.join(": ").replace('\n', " ")
}

/// The gist of an error body, for `last_error`: OpenAI-shaped JSON if it is, else the start of
/// the text, redacted (`redact`) and then cut to `ERROR_BODY_LIMIT`. Never assumes JSON (a
/// proxy may answer HTML).
pub fn error_summary(body: &[u8]) -> String {
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) {
        let pick =
            |v: &serde_json::Value, k: &str| v.get(k).and_then(|m| m.as_str()).map(str::to_owned);
        let err = v.get("error");
        let found = err
            .and_then(|e| pick(e, "message").or_else(|| pick(e, "code")))
            .or_else(|| err.and_then(|e| e.as_str().map(str::to_owned)))
            .or_else(|| pick(&v, "message"))
            .or_else(|| pick(&v, "msg"));
        if let Some(m) = found {
            return one_line(&redact(&m), ERROR_BODY_LIMIT);
        }
    }
    one_line(&redact(&String::from_utf8_lossy(body)), ERROR_BODY_LIMIT)
}

fn one_line(s: &str, max: usize) -> String {
    let mut out: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect::<String>()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    if out.len() > max {
        let mut cut = max;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
    }
    out
}

/// Reads at most `limit` bytes of a body within `time` overall: a slow-drip error page must
/// not hold a download slot (or a shutdown).
async fn read_limited(mut response: Response, limit: usize, time: Duration) -> Vec<u8> {
    let mut out = Vec::new();
    let read = async {
        while out.len() < limit {
            match response.chunk().await {
                Ok(Some(c)) => out.extend_from_slice(&c[..c.len().min(limit - out.len())]),
                _ => break,
            }
        }
    };
    let _ = tokio::time::timeout(time, read).await;
    out
}

/// `Retry-After`, capped at `MAX_RETRY_AFTER`.
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    parse_retry_after(headers).map(|d| d.min(MAX_RETRY_AFTER))
}

/// `Retry-After` as seconds or an HTTP date.
fn parse_retry_after(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get(header::RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = httpdate::parse_http_date(v).ok()?;
    Some(
        when.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

/// `Content-Range: bytes START-END/TOTAL` (206) → (start, end, total).
pub fn content_range(headers: &HeaderMap) -> Option<(u64, u64, Option<u64>)> {
    let v = headers.get(header::CONTENT_RANGE)?.to_str().ok()?;
    let rest = v.trim().strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let total = if total == "*" {
        None
    } else {
        Some(total.parse().ok()?)
    };
    let (a, b) = range.split_once('-')?;
    Some((a.parse().ok()?, b.parse().ok()?, total))
}

/// `Content-Range: bytes */TOTAL` (416) → total.
pub fn unsatisfied_range_total(headers: &HeaderMap) -> Option<u64> {
    let v = headers.get(header::CONTENT_RANGE)?.to_str().ok()?;
    v.trim().strip_prefix("bytes */")?.parse().ok()
}

/// What identifies this version of the file for `If-Range`: a strong ETag, else Last-Modified
/// (a weak ETag cannot be used there).
pub fn validator(headers: &HeaderMap) -> Option<String> {
    let etag = headers
        .get(header::ETAG)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.starts_with("W/"));
    etag.or_else(|| {
        headers
            .get(header::LAST_MODIFIED)
            .and_then(|v| v.to_str().ok())
    })
    .map(str::to_owned)
}

/// A 200 body with one of these types is an error page, not a video.
pub fn is_text_type(headers: &HeaderMap) -> Option<String> {
    let ct = headers.get(header::CONTENT_TYPE)?.to_str().ok()?;
    let mime = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let textual = mime.starts_with("text/")
        || mime.contains("json")
        || mime.contains("xml")
        || mime.contains("html");
    textual.then_some(mime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table() {
        use Action::*;
        let s = |n| StatusCode::from_u16(n).unwrap();
        assert_eq!(classify(Host::Api, s(200)), Stream);
        assert_eq!(classify(Host::Cdn, s(206)), Stream);
        assert_eq!(classify(Host::Api, s(400)), NotReady);
        assert_eq!(classify(Host::Api, s(404)), ConfirmMissing);
        assert_eq!(classify(Host::Api, s(401)), AccountProblem);
        assert_eq!(classify(Host::Api, s(402)), AccountProblem);
        assert_eq!(classify(Host::Api, s(403)), AccountProblem);
        assert_eq!(classify(Host::Cdn, s(403)), SignedUrlExpired);
        assert_eq!(classify(Host::Cdn, s(410)), SignedUrlExpired);
        assert_eq!(classify(Host::Api, s(429)), RateLimited);
        assert_eq!(classify(Host::Api, s(503)), Transient);
        assert_eq!(classify(Host::Cdn, s(400)), Transient);
        assert_eq!(classify(Host::Api, s(416)), RangeNotSatisfiable);
        assert_eq!(classify(Host::Api, s(410)), Expired);
        assert_eq!(classify(Host::Cdn, s(410)), SignedUrlExpired);
    }

    #[test]
    fn status_words() {
        assert_eq!(classify_status_word("in_progress"), VideoState::Pending);
        assert_eq!(classify_status_word("success"), VideoState::Finished);
        assert_eq!(classify_status_word("completed"), VideoState::Finished);
        assert!(matches!(
            classify_status_word("expired"),
            VideoState::Failed(_)
        ));
        assert!(matches!(
            classify_status_word("weird"),
            VideoState::Unknown(_)
        ));
    }

    #[test]
    fn error_bodies() {
        assert_eq!(
            error_summary(br#"{"error":{"message":"video not ready","code":"x"}}"#),
            "video not ready"
        );
        assert_eq!(error_summary(br#"{"msg":"busy"}"#), "busy");
        assert_eq!(
            error_summary(b"<html>\n<b>Bad\tGateway</b></html>"),
            "<html> <b>Bad Gateway</b></html>"
        );
        assert_eq!(error_summary(&[b'x'; 2000]).len(), 512);
    }

    #[test]
    fn nothing_of_a_secret_survives_the_cut() {
        remember_secret("oh-old-token-0123456789");
        remember_secret("oh-new-token-9876543210");
        // A token straddling byte 512 of the message: scrubbed first, then cut.
        let msg = format!("{} oh-new-token-9876543210 and more", "x".repeat(495));
        let body = serde_json::json!({"error": {"message": msg}}).to_string();
        let kept = error_summary(body.as_bytes());
        assert!(kept.len() <= 512);
        assert!(!kept.contains("oh-new"), "{kept}");
        // Every token this process has used, not only the one in use.
        let kept = error_summary(b"denied for oh-old-token-0123456789");
        assert_eq!(kept, "denied for <token>");
        // Query strings of anything that looks like a URL or a path, in text and in JSON.
        let kept = error_summary(
            br#"{"message":"signed URL /files/v?sig=SIGNED-abc&exp=1 expired; see https://x/y?a=b."}"#,
        );
        assert_eq!(
            kept,
            "signed URL /files/v?[query removed] expired; see https://x/y?[query removed]"
        );
        assert_eq!(redact("not ready? try later"), "not ready? try later");
        // Found by review: an encoded query, and a signature with no query around it.
        assert_eq!(
            redact("see https://gw.example/login%3Fnext=/v%3Fsig%3DS1 now"),
            "see https://gw.example/login?[query removed] now"
        );
        assert_eq!(
            redact("X-Amz-Signature=abc123&X-Amz-Date=2026 and sig=SIGNED-9, fine"),
            "X-Amz-Signature=[removed]&X-Amz-Date=2026 and sig=[removed], fine"
        );
        assert_eq!(redact("a cat, key=blue"), "a cat, key=blue");
        assert_eq!(
            redact("<a href=\"/files/x?sig=S\">x</a>"),
            "<a href=\"/files/x?[query removed]\">x</a>"
        );
    }

    #[test]
    fn status_objects() {
        let o = StatusObject::new(serde_json::json!({
            "id": "video_1", "status": "completed", "expires_at": 1_900_000_000,
            "model": "veo-3", "video_url": "https://gw.example/v/1.mp4?sig=SIGNED-1&exp=2",
            "result": {"video_url": "https://gw.example/v/1.mp4?X-Amz-Signature=SIGNED-2"}
        }));
        assert_eq!(o.state, VideoState::Finished);
        assert_eq!(o.expires_at, Some(1_900_000_000));
        let kept = o.to_metadata();
        assert!(!kept.contains("SIGNED"), "{kept}");
        assert!(kept.contains("\"model\":\"veo-3\""), "{kept}");
        assert!(
            kept.contains("https://gw.example/v/1.mp4?[query removed]"),
            "{kept}"
        );
        let ms = StatusObject::new(
            serde_json::json!({"status": "queued", "expires_at": "1900000000123"}),
        );
        assert_eq!(
            (ms.state, ms.expires_at),
            (VideoState::Pending, Some(1_900_000_000))
        );
        assert_eq!(
            StatusObject::new(serde_json::json!({"expires_at": null})).expires_at,
            None
        );
        // An unknown status word reaches last_error: short, and redacted.
        let long = format!("weird-{}-/x?sig=SIGNED-3", "y".repeat(200));
        match StatusObject::new(serde_json::json!({"status": long})).state {
            VideoState::Unknown(w) => assert!(w.len() <= 64 && !w.contains("SIGNED"), "{w}"),
            other => panic!("{other:?}"),
        }
        // A sidecar found beside an adopted video is cleaned like a status object.
        let kept = clean_metadata(r#"{"video_url":"https://g/v.mp4?sig=SIGNED-4"}"#).unwrap();
        assert!(!kept.contains("SIGNED"), "{kept}");
        assert_eq!(clean_metadata("[1, 2]"), None);
    }

    #[test]
    fn headers() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONTENT_RANGE,
            HeaderValue::from_static("bytes 100-199/200"),
        );
        assert_eq!(content_range(&h), Some((100, 199, Some(200))));
        h.insert(
            header::CONTENT_RANGE,
            HeaderValue::from_static("bytes */200"),
        );
        assert_eq!(unsatisfied_range_total(&h), Some(200));
        h.insert(header::RETRY_AFTER, HeaderValue::from_static("7"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(7)));
        h.insert(
            header::RETRY_AFTER,
            HeaderValue::from_static("18446744073709551615"),
        );
        assert_eq!(retry_after(&h), Some(MAX_RETRY_AFTER));
        h.insert(
            header::RETRY_AFTER,
            HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        assert_eq!(retry_after(&h), Some(Duration::ZERO));
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/html; charset=utf-8"),
        );
        assert_eq!(is_text_type(&h).as_deref(), Some("text/html"));
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("binary/octet-stream"),
        );
        assert_eq!(is_text_type(&h), None);
    }

    #[test]
    fn redirect_rules() {
        let u = |s| Url::parse(s).unwrap();
        assert!(check_redirect(&u("https://a/x"), &u("https://b/y?sig=1")).is_ok());
        assert!(check_redirect(&u("http://a/x"), &u("https://b/y")).is_ok());
        let e = check_redirect(&u("https://a/x"), &u("http://b/y?sig=SECRET")).unwrap_err();
        assert!(e.to_string().contains("plain http") && !e.to_string().contains("SECRET"));
        assert!(check_redirect(&u("https://a/x"), &u("file:///etc/passwd")).is_err());
        assert!(check_redirect(&u("http://a/x"), &u("ftp://b/y")).is_err());
        let to = redirect_target(&u("http://a/x"), "http://user:pw@b:81/y?sig=1").unwrap();
        assert_eq!(to.as_str(), "http://b:81/y?sig=1");
        assert_eq!(
            redirect_target(&u("http://a/x"), "/z").unwrap().as_str(),
            "http://a/z"
        );
        assert_eq!(redirect_target(&u("http://a/x"), "http://[::1"), Err(None));
        assert!(
            redirect_target(&u("https://a/x"), "http://b/")
                .unwrap_err()
                .unwrap()
                .contains("plain http")
        );
    }

    #[test]
    fn urls_and_hosts() {
        let cfg = ApiConfig::default();
        let c = ApiClient::new(
            &cfg,
            Url::parse("https://api.example/base/").unwrap(),
            Token::new("t".into()),
        )
        .unwrap();
        let id = VideoId::parse("video_1").unwrap();
        assert_eq!(
            c.content_url(&id).as_str(),
            "https://api.example/base/v1/videos/video_1/content"
        );
        assert_eq!(
            c.host_of(&Url::parse("https://api.example:443/x").unwrap()),
            Host::Api
        );
        assert_eq!(
            c.host_of(&Url::parse("http://api.example/x").unwrap()),
            Host::Cdn
        );
        assert_eq!(
            c.host_of(&Url::parse("https://cdn.example/x").unwrap()),
            Host::Cdn
        );
    }
}

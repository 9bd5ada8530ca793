//! The S3 requests the bucket store makes (put, head, get, list, delete, and the sweep of
//! unfinished multipart uploads), signed by rusty-s3 and sent with the daemon's own reqwest
//! settings; and, in one place, what an answer means (`S3Error`, `S3Error::pauses`).
//!
//! Requests are presigned (the signature rides in the URL's query), so a request URL is a
//! credential: no error or log line built here carries one (`api::error_text` drops it; only
//! the endpoint's origin is ever named).

use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use reqwest::{Method, StatusCode};
use rusty_s3::{Bucket, Credentials, S3Action, UrlStyle};

use super::target::{Keys, Target, load_keys};

/// How long a signed request stays valid from its signing: it is sent at once, so this only
/// has to cover clock skew with the store.
const SIGNED_FOR: Duration = Duration::from_secs(300);
/// Object metadata saying whether the bytes passed the MP4 check (`whole`) or are bytes the
/// API served twice that did not (`incomplete`, a failed row's). Only `whole` is adopted.
pub const MP4_META: &str = "x-amz-meta-hingnetd-mp4";
/// Keys listed per request.
const PAGE: usize = 1000;
/// A store's error body longer than this is cut (it is only read for its code and message).
const ERROR_BODY: usize = 16 * 1024;

/// Why a request did not do what it asked. `pauses` says which of these mean the store is
/// away (downloads wait) rather than something about one object.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum S3Error {
    /// No answer: refused, reset, timed out, DNS.
    #[error("cannot reach the store: {0}")]
    Unreachable(String),
    /// The store is up but not serving now: 5xx, 429, SlowDown, RequestTimeout.
    #[error("the store is busy or failing: {0}")]
    Busy(String),
    /// The access key is unknown or the secret wrong.
    #[error("the store refused the access key: {0}")]
    Credentials(String),
    /// The key is known but may not do this.
    #[error("permission denied: {0}")]
    Permission(String),
    #[error("no such bucket: {0}")]
    NoBucket(String),
    /// The store computed another SHA-256 (or MD5) of the body than the one sent: the staged
    /// file is not what was hashed.
    #[error("the store found the upload's checksum wrong: {0}")]
    Digest(String),
    /// The store answered an upload but did not end up holding it as sent (refused, or not
    /// confirmed by `HeadObject`): nothing about the video, so like the store's absence.
    #[error("the upload was not confirmed: {0}")]
    Unconfirmed(String),
    /// No such object (404 `NoSuchKey`, or a bare 404 to a HEAD).
    #[error("no such object: {0}")]
    NotFound(String),
    /// Any other refusal of this request.
    #[error("the store refused: {0}")]
    Refused(String),
    /// The local file being uploaded could not be read.
    #[error("cannot read {0}")]
    Local(String),
}

impl S3Error {
    /// The store as a whole cannot be used now (down, busy, the key refused or not allowed, the
    /// bucket gone): new downloads wait and finished ones are kept staged, never failed.
    pub fn pauses(&self) -> bool {
        matches!(
            self,
            S3Error::Unreachable(_)
                | S3Error::Busy(_)
                | S3Error::Credentials(_)
                | S3Error::Permission(_)
                | S3Error::NoBucket(_)
                | S3Error::Unconfirmed(_)
        )
    }

    /// Worth trying again at once, a few times, within one upload.
    pub fn retry_soon(&self) -> bool {
        matches!(self, S3Error::Unreachable(_) | S3Error::Busy(_))
    }
}

/// What `HeadObject` says of an object.
#[derive(Debug, Clone, PartialEq)]
pub struct Head {
    pub size: u64,
    /// The store's SHA-256 of the whole object, base64, when it keeps one (a single PUT with
    /// `x-amz-checksum-sha256`; a multipart object's is composite and ends in `-N`).
    pub sha256: Option<String>,
    /// `MP4_META`.
    pub mp4: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Listed {
    pub key: String,
    pub size: u64,
}

/// The HTTP clients a bucket is reached with (`store::http_clients`).
#[derive(Clone)]
pub struct Http {
    /// With `api.read_timeout`: listings, HEADs, GETs, deletes, small PUTs.
    pub reads: reqwest::Client,
    /// Without a read timeout: video uploads, which fail instead when no byte of the body has
    /// been taken for `stall` (and the answer is awaited as long after the last one).
    pub uploads: reqwest::Client,
    pub stall: Duration,
}

/// A bucket and a client for it. Cheap to clone.
#[derive(Clone)]
pub struct Client {
    http: Http,
    bucket: Arc<Bucket>,
    keys: Arc<RwLock<Arc<(Keys, Credentials)>>>,
    origin: String,
}

impl Client {
    pub fn new(target: &Target, http: Http, keys: Keys) -> Result<Client, String> {
        let style = if target.path_style {
            UrlStyle::Path
        } else {
            UrlStyle::VirtualHost
        };
        let bucket = Bucket::new(
            target.endpoint.clone(),
            style,
            target.bucket.clone(),
            target.region.clone(),
        )
        .map_err(|e| format!("archive.s3.endpoint: {e}"))?;
        let client = Client {
            http,
            bucket: Arc::new(bucket),
            keys: Arc::new(RwLock::new(Arc::new(with_credentials(keys.clone())))),
            origin: crate::api::origin_of(&target.endpoint),
        };
        Ok(client)
    }

    /// Where requests go, for messages: the endpoint's origin.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    fn keys(&self) -> Arc<(Keys, Credentials)> {
        self.keys.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Where the access key came from.
    pub fn key_source(&self) -> String {
        self.keys().0.source.clone()
    }

    /// Reads the access key again (the store refused the one held; the operator may have
    /// fixed it). Keeps the old one if none can be read now.
    pub fn reload_keys(&self) {
        match load_keys() {
            Ok(k) if k != self.keys().0 => {
                tracing::info!(source = %k.source, "read the S3 access key again: it changed");
                *self.keys.write().unwrap_or_else(|p| p.into_inner()) =
                    Arc::new(with_credentials(k));
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the S3 access key again; keeping the one held")
            }
        }
    }

    /// Sends a signed request and returns a success's response; anything else as `S3Error`.
    async fn send<'a, A: S3Action<'a>>(
        &self,
        action: &A,
        headers: &[(&'static str, String)],
        body: Option<reqwest::Body>,
        what: &str,
    ) -> Result<reqwest::Response, S3Error> {
        self.send_with(&self.http.reads, action, headers, body, what)
            .await
    }

    async fn send_with<'a, A: S3Action<'a>>(
        &self,
        http: &reqwest::Client,
        action: &A,
        headers: &[(&'static str, String)],
        body: Option<reqwest::Body>,
        what: &str,
    ) -> Result<reqwest::Response, S3Error> {
        let url = action.sign(SIGNED_FOR);
        let method = match A::METHOD {
            rusty_s3::Method::Head => Method::HEAD,
            rusty_s3::Method::Get => Method::GET,
            rusty_s3::Method::Put => Method::PUT,
            rusty_s3::Method::Post => Method::POST,
            rusty_s3::Method::Delete => Method::DELETE,
        };
        let mut request = http.request(method.clone(), url);
        for (k, v) in headers {
            request = request.header(*k, v);
        }
        if let Some(b) = body {
            request = request.body(b);
        }
        let response = request.send().await.map_err(|e| {
            let text = crate::api::error_text(&e);
            S3Error::Unreachable(format!("{what} at {}: {text}", self.origin))
        })?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let body = if method == Method::HEAD {
            String::new()
        } else {
            read_capped(response).await
        };
        Err(classify(status, &body, what))
    }

    /// Uploads a local file to `key` in one streamed PUT that carries its SHA-256, which the
    /// store checks against the bytes it received (`S3Error::Digest` if they differ): an object
    /// appears whole and verified or not at all. Memory stays flat: the body is read from the
    /// file as it is sent.
    pub async fn put_file(
        &self,
        key: &str,
        file: &Path,
        size: u64,
        sha256_hex: &str,
        content_type: &str,
        mp4: &str,
    ) -> Result<(), S3Error> {
        let f = tokio::fs::File::open(file)
            .await
            .map_err(|e| S3Error::Local(format!("{}: {e}", file.display())))?;
        let started = std::time::Instant::now();
        let last = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let sent = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let read = Progress {
            inner: f,
            last: last.clone(),
            sent: sent.clone(),
            left: size,
            started,
        };
        let stream = tokio_util::io::ReaderStream::with_capacity(read, 256 * 1024);
        let body = reqwest::Body::wrap_stream(stream);
        let put = self.put(key, body, size, sha256_hex, content_type, Some(mp4), true);
        tokio::pin!(put);
        // No read timeout on an upload (see `Http`): a body the store stops taking ends it
        // after `stall`. Once the whole file is read, the bytes may still sit in socket
        // buffers (megabytes, minutes on a slow link): the answer gets ten times as long.
        let stall = self.http.stall;
        loop {
            tokio::select! {
                r = &mut put => return r,
                _ = tokio::time::sleep(Duration::from_secs(1).min(stall)) => {
                                        let idle = started.elapsed().saturating_sub(Duration::from_millis(
                        last.load(std::sync::atomic::Ordering::Relaxed),
                    ));
                    let limit = if sent.load(std::sync::atomic::Ordering::Relaxed) {
                        stall * 10
                    } else {
                        stall
                    };
                    if idle > limit {
                                                return Err(S3Error::Unreachable(format!(
                            "PUT {key} at {}: no progress for {}",
                            self.origin,
                            crate::config::format_duration(limit)
                        )));
                    }
                }
            }
        }
    }

    /// A small object from memory (the sidecar), checked the same way.
    pub async fn put_bytes(
        &self,
        key: &str,
        bytes: Bytes,
        content_type: &str,
    ) -> Result<(), S3Error> {
        use sha2::Digest;
        let sha = crate::id::hex(&sha2::Sha256::digest(&bytes));
        let size = bytes.len() as u64;
        self.put(key, bytes.into(), size, &sha, content_type, None, false)
            .await
    }

    #[allow(clippy::too_many_arguments)]
    async fn put(
        &self,
        key: &str,
        body: reqwest::Body,
        size: u64,
        sha256_hex: &str,
        content_type: &str,
        mp4: Option<&str>,
        upload: bool,
    ) -> Result<(), S3Error> {
        let keys = self.keys();
        let checksum = sha256_base64(sha256_hex);
        let mut action = self.bucket.put_object(Some(&keys.1), key);
        let mut headers = vec![
            ("x-amz-checksum-sha256", checksum.clone()),
            ("content-type", content_type.to_owned()),
        ];
        if let Some(m) = mp4 {
            headers.push((MP4_META, m.to_owned()));
        }
        for (k, v) in &headers {
            action.headers_mut().insert(*k, v.clone());
        }
        headers.push(("content-length", size.to_string()));
        let http = if upload {
            &self.http.uploads
        } else {
            &self.http.reads
        };
        self.send_with(http, &action, &headers, Some(body), &format!("PUT {key}"))
            .await
            .map(drop)
    }

    /// The object's size, stored SHA-256 and our metadata; `None` if there is no such object.
    pub async fn head(&self, key: &str) -> Result<Option<Head>, S3Error> {
        let keys = self.keys();
        let mut action = self.bucket.head_object(Some(&keys.1), key);
        action
            .headers_mut()
            .insert("x-amz-checksum-mode", "ENABLED");
        let headers = [("x-amz-checksum-mode", "ENABLED".to_owned())];
        let response = match self
            .send(&action, &headers, None, &format!("HEAD {key}"))
            .await
        {
            Ok(r) => r,
            Err(S3Error::NotFound(_)) => return Ok(None),
            Err(e) => return Err(e),
        };
        let h = response.headers();
        let text = |name: &str| h.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let size = text("content-length")
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| {
                S3Error::Refused(format!("HEAD {key}: no Content-Length in the answer"))
            })?;
        Ok(Some(Head {
            size,
            sha256: text("x-amz-checksum-sha256"),
            mp4: text(MP4_META),
        }))
    }

    /// The object's body as a response to stream; `None` if there is no such object.
    pub async fn get(&self, key: &str) -> Result<Option<reqwest::Response>, S3Error> {
        let keys = self.keys();
        let action = self.bucket.get_object(Some(&keys.1), key);
        match self.send(&action, &[], None, &format!("GET {key}")).await {
            Ok(r) => Ok(Some(r)),
            Err(S3Error::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// A small object's bytes (at most `limit`; a larger one is not ours to read).
    pub async fn get_small(&self, key: &str, limit: usize) -> Result<Option<Vec<u8>>, S3Error> {
        let Some(mut r) = self.get(key).await? else {
            return Ok(None);
        };
        let mut out = Vec::new();
        while let Some(chunk) = r.chunk().await.map_err(|e| {
            S3Error::Unreachable(format!("GET {key}: {}", crate::api::error_text(&e)))
        })? {
            if out.len() + chunk.len() > limit {
                return Ok(None);
            }
            out.extend_from_slice(&chunk);
        }
        Ok(Some(out))
    }

    pub async fn delete(&self, key: &str) -> Result<(), S3Error> {
        let keys = self.keys();
        let action = self.bucket.delete_object(Some(&keys.1), key);
        self.send(&action, &[], None, &format!("DELETE {key}"))
            .await
            .map(drop)
    }

    /// Every object under `prefix` (at most `max`, when given), in key order.
    pub async fn list(&self, prefix: &str, max: Option<usize>) -> Result<Vec<Listed>, S3Error> {
        let keys = self.keys();
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        // A store that hands out new tokens for ever is not followed for ever.
        for _ in 0..100_000 {
            let mut action = self.bucket.list_objects_v2(Some(&keys.1));
            action.with_prefix(prefix);
            action.with_max_keys(max.unwrap_or(PAGE).min(PAGE));
            if let Some(t) = &token {
                action.with_continuation_token(t.clone());
            }
            let r = self
                .send(&action, &[], None, &format!("LIST {prefix}"))
                .await?;
            let text = read_body(r, "LIST").await?;
            let page = rusty_s3::actions::ListObjectsV2::parse_response(&text).map_err(|e| {
                S3Error::Refused(format!(
                    "LIST {prefix}: an answer that is not a listing: {e}"
                ))
            })?;
            out.extend(page.contents.into_iter().map(|c| Listed {
                key: c.key,
                size: c.size.unwrap_or(0),
            }));
            if max.is_some_and(|m| out.len() >= m) {
                out.truncate(max.unwrap_or(usize::MAX));
                return Ok(out);
            }
            match page.next_continuation_token {
                Some(t) if token.as_ref() != Some(&t) => token = Some(t),
                _ => return Ok(out),
            }
        }
        Err(S3Error::Refused(format!(
            "LIST {prefix}: more than 100,000 pages"
        )))
    }

    /// Multipart uploads begun and never completed or aborted under `prefix`, as
    /// `(key, upload id)`. rusty-s3 has no action for it, so it is signed by hand.
    pub async fn unfinished_uploads(&self, prefix: &str) -> Result<Vec<(String, String)>, S3Error> {
        let keys = self.keys();
        let mut out = Vec::new();
        let (mut key_marker, mut id_marker) = (String::new(), String::new());
        for _ in 0..1000 {
            let mut query = vec![("uploads", String::new()), ("prefix", prefix.to_owned())];
            if !key_marker.is_empty() {
                query.push(("key-marker", key_marker.clone()));
                query.push(("upload-id-marker", id_marker.clone()));
            }
            // The signer merges these with its own parameters assuming both are sorted.
            query.sort();
            let action = ListUploads {
                bucket: &self.bucket,
                credentials: &keys.1,
                query: query.iter().map(|(k, v)| (*k, v.as_str())).collect(),
            };
            let r = self
                .send(&action, &[], None, &format!("LIST uploads {prefix}"))
                .await?;
            let text = read_body(r, "LIST uploads").await?;
            for upload in elements(&text, "Upload") {
                if let (Some(k), Some(id)) = (element(upload, "Key"), element(upload, "UploadId")) {
                    out.push((xml_unescape(k), xml_unescape(id)));
                }
            }
            let truncated = element(&text, "IsTruncated") == Some("true");
            let next = (
                element(&text, "NextKeyMarker").map(xml_unescape),
                element(&text, "NextUploadIdMarker").map(xml_unescape),
            );
            match next {
                (Some(k), Some(i)) if truncated && (k != key_marker || i != id_marker) => {
                    (key_marker, id_marker) = (k, i);
                }
                _ => return Ok(out),
            }
        }
        Ok(out)
    }

    pub async fn abort_upload(&self, key: &str, upload_id: &str) -> Result<(), S3Error> {
        let keys = self.keys();
        let action = self
            .bucket
            .abort_multipart_upload(Some(&keys.1), key, upload_id);
        self.send(&action, &[], None, &format!("ABORT upload of {key}"))
            .await
            .map(drop)
    }
}

/// A file being uploaded, noting when the body last took bytes from it (milliseconds since
/// `started`), and once it has taken them all.
struct Progress {
    inner: tokio::fs::File,
    last: Arc<std::sync::atomic::AtomicU64>,
    sent: Arc<std::sync::atomic::AtomicBool>,
    /// Bytes not read yet (the body may not be read to its end: HTTP stops at its length).
    left: u64,
    started: std::time::Instant,
}

impl tokio::io::AsyncRead for Progress {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        if let std::task::Poll::Ready(Ok(())) = r {
            let at = self.started.elapsed().as_millis() as u64;
            self.last.store(at, std::sync::atomic::Ordering::Relaxed);
            let n = (buf.filled().len() - before) as u64;
            self.left = self.left.saturating_sub(n);
            if n == 0 || self.left == 0 {
                self.sent.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        }
        r
    }
}

fn with_credentials(k: Keys) -> (Keys, Credentials) {
    // The secret must never reach a log line or a row: every text kept goes through
    // `api::redact`, which replaces the secrets it was told of.
    crate::api::remember_secret(&k.secret);
    if let Some(t) = &k.session_token {
        crate::api::remember_secret(t);
    }
    let c = match &k.session_token {
        Some(t) => Credentials::new_with_token(k.id.clone(), k.secret.clone(), t.clone()),
        None => Credentials::new(k.id.clone(), k.secret.clone()),
    };
    (k, c)
}

/// `ListMultipartUploads` (`GET /?uploads&prefix=`), which rusty-s3 lacks.
struct ListUploads<'a> {
    bucket: &'a Bucket,
    credentials: &'a Credentials,
    query: Vec<(&'a str, &'a str)>,
}

impl<'a> S3Action<'a> for ListUploads<'a> {
    const METHOD: rusty_s3::Method = rusty_s3::Method::Get;

    fn query_mut(&mut self) -> &mut rusty_s3::Map<'a> {
        unreachable!("ListUploads is built with its query")
    }

    fn headers_mut(&mut self) -> &mut rusty_s3::Map<'a> {
        unreachable!("ListUploads sends no signed headers")
    }

    fn sign_with_time(&self, expires_in: Duration, time: &jiff::Timestamp) -> reqwest::Url {
        rusty_s3::signing::sign(
            time,
            Self::METHOD,
            self.bucket.base_url().clone(),
            self.credentials.key(),
            self.credentials.secret(),
            self.credentials.token(),
            self.bucket.region(),
            expires_in.as_secs(),
            self.query.iter().copied(),
            std::iter::empty(),
        )
    }
}

/// What an answer other than a success means. The store's error code decides where it gives
/// one; the status otherwise (a HEAD has no body).
fn classify(status: StatusCode, body: &str, what: &str) -> S3Error {
    let code = element(body, "Code").unwrap_or("");
    let message = element(body, "Message")
        .map(xml_unescape)
        .unwrap_or_default();
    let said = match (code, message.as_str()) {
        ("", "") => format!("{what}: HTTP {}", status.as_u16()),
        (c, "") => format!("{what}: HTTP {} {c}", status.as_u16()),
        ("", m) => format!("{what}: HTTP {}: {m}", status.as_u16()),
        (c, m) => format!("{what}: HTTP {} {c}: {m}", status.as_u16()),
    };
    let said = crate::api::redact(&said);
    match code {
        "InvalidAccessKeyId"
        | "SignatureDoesNotMatch"
        | "InvalidToken"
        | "ExpiredToken"
        | "TokenRefreshRequired"
        | "AuthorizationHeaderMalformed" => S3Error::Credentials(said),
        // Garage says a wrong secret or an unknown key with AccessDenied ("Forbidden: Invalid
        // signature", "Forbidden: No such key: GK...").
        "AccessDenied" if message.contains("signature") || message.contains("No such key") => {
            S3Error::Credentials(said)
        }
        "AccessDenied" | "AllAccessDisabled" | "AccountProblem" => S3Error::Permission(said),
        "NoSuchBucket" => S3Error::NoBucket(said),
        "NoSuchKey" => S3Error::NotFound(said),
        "BadDigest" | "InvalidDigest" | "XAmzContentSHA256Mismatch" => S3Error::Digest(said),
        "SlowDown"
        | "ServiceUnavailable"
        | "InternalError"
        | "RequestTimeout"
        | "RequestTimeTooSkewed" => S3Error::Busy(said),
        _ => match status.as_u16() {
            // A HEAD's 403 has no body: the key or its permissions, one cannot tell.
            403 => S3Error::Permission(said),
            404 if code.is_empty() => S3Error::NotFound(said),
            408 | 429 | 500..=599 => S3Error::Busy(said),
            _ => S3Error::Refused(said),
        },
    }
}

async fn read_capped(mut r: reqwest::Response) -> String {
    let mut out = Vec::new();
    while let Ok(Some(c)) = r.chunk().await {
        out.extend_from_slice(&c);
        if out.len() > ERROR_BODY {
            break;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn read_body(r: reqwest::Response, what: &str) -> Result<String, S3Error> {
    r.text()
        .await
        .map_err(|e| S3Error::Unreachable(format!("{what}: {}", crate::api::error_text(&e))))
}

/// The text of the first `<name>...</name>` in `xml` (the answers read here are flat enough
/// that this is all the XML needed).
fn element<'a>(xml: &'a str, name: &str) -> Option<&'a str> {
    let open = format!("<{name}>");
    let start = xml.find(&open)? + open.len();
    let end = xml[start..].find(&format!("</{name}>"))?;
    Some(&xml[start..start + end])
}

/// Every `<name>...</name>` in `xml`, in order.
fn elements<'a>(xml: &'a str, name: &str) -> Vec<&'a str> {
    let (open, close) = (format!("<{name}>"), format!("</{name}>"));
    let mut out = Vec::new();
    let mut rest = xml;
    while let Some(i) = rest.find(&open) {
        let after = &rest[i + open.len()..];
        let Some(j) = after.find(&close) else { break };
        out.push(&after[..j]);
        rest = &after[j + close.len()..];
    }
    out
}

fn xml_unescape(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&amp;", "&")
}

/// The base64 of the 32 bytes a lowercase hex SHA-256 spells, as `x-amz-checksum-sha256`
/// carries them.
pub fn sha256_base64(hex: &str) -> String {
    let bytes: Vec<u8> = (0..hex.len() / 2)
        .filter_map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok())
        .collect();
    base64(&bytes)
}

fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_of_a_sha256() {
        // sha256("") as hex, and its base64 as S3 shows it.
        assert_eq!(
            sha256_base64("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"),
            "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="
        );
        assert_eq!(base64(b"ab"), "YWI=");
        assert_eq!(base64(b"a"), "YQ==");
    }

    #[test]
    fn what_answers_mean() {
        let xml = |code: &str, msg: &str| {
            format!(
                "<?xml version=\"1.0\"?><Error><Code>{code}</Code><Message>{msg}</Message></Error>"
            )
        };
        let c = |s: u16, body: &str| classify(StatusCode::from_u16(s).unwrap(), body, "PUT k");
        assert!(matches!(
            c(403, &xml("InvalidAccessKeyId", "x")),
            S3Error::Credentials(_)
        ));
        assert!(matches!(
            c(403, &xml("SignatureDoesNotMatch", "x")),
            S3Error::Credentials(_)
        ));
        assert!(matches!(
            c(403, &xml("AccessDenied", "x")),
            S3Error::Permission(_)
        ));
        // Garage's words for a wrong secret and an unknown key.
        for m in [
            "Forbidden: Invalid signature",
            "Forbidden: No such key: GK1",
        ] {
            assert!(
                matches!(c(403, &xml("AccessDenied", m)), S3Error::Credentials(_)),
                "{m}"
            );
        }
        assert!(matches!(
            c(404, &xml("NoSuchBucket", "x")),
            S3Error::NoBucket(_)
        ));
        assert!(matches!(
            c(400, &xml("InvalidDigest", "x")),
            S3Error::Digest(_)
        ));
        assert!(matches!(c(503, &xml("SlowDown", "x")), S3Error::Busy(_)));
        assert!(matches!(c(502, ""), S3Error::Busy(_)));
        assert!(matches!(
            c(400, &xml("EntityTooLarge", "x")),
            S3Error::Refused(_)
        ));
        let e = c(
            403,
            &xml("AccessDenied", "see https://s3/x?X-Amz-Signature=abc"),
        );
        assert!(!e.to_string().contains("abc"), "{e}");
        for e in [c(503, ""), S3Error::Unreachable("x".into())] {
            assert!(e.pauses() && e.retry_soon(), "{e}");
        }
        for e in [
            c(403, &xml("AccessDenied", "")),
            c(404, &xml("NoSuchBucket", "")),
        ] {
            assert!(e.pauses() && !e.retry_soon(), "{e}");
        }
        assert!(!c(400, &xml("InvalidDigest", "")).pauses());
    }

    #[test]
    fn listing_uploads() {
        let xml = "<ListMultipartUploadsResult><Bucket>b</Bucket><Upload><Key>p/a&amp;b/1.mp4</Key><UploadId>u1</UploadId></Upload><Upload><Key>p/c</Key><UploadId>u2</UploadId></Upload><IsTruncated>false</IsTruncated></ListMultipartUploadsResult>";
        let ups: Vec<_> = elements(xml, "Upload")
            .into_iter()
            .map(|u| {
                (
                    xml_unescape(element(u, "Key").unwrap()),
                    element(u, "UploadId").unwrap(),
                )
            })
            .collect();
        assert_eq!(
            ups,
            [("p/a&b/1.mp4".to_owned(), "u1"), ("p/c".to_owned(), "u2")]
        );
    }
}

//! The archive in an S3-compatible bucket: a download is staged as a local partial (resume,
//! checkpointed SHA-256 and the MP4 check are the directory store's, in `archive.staging_dir`),
//! published there, then uploaded in one PUT that carries its SHA-256, confirmed by `HeadObject`
//! and only then reported published; `verify`'s view of the bucket. The protocol is `client`,
//! where the bucket is and its key `target`.
//!
//! Keys are content-addressed: `<prefix><id>/<sha256>.mp4`, and the sidecar
//! `<prefix><id>/<sha256>.json`. Garage (for one) ignores `If-None-Match`, so no store's
//! conditional write is relied on; instead a late or duplicate writer of the same video writes
//! the same bytes to the same key, and different bytes go to a different key, which no `done`
//! row names: an object a row names is never replaced by other bytes. The row's finish is fenced
//! by its claim in the queue, so a writer that lost its claim cannot record its key either.
//!
//! Invariant: an object under a video key is complete (the store checked the SHA-256 of every
//! byte against the one sent) and, when its `hingnetd-mp4` metadata says `whole`, passed the
//! MP4 check; a row is `done` only after `HeadObject` confirmed its size and SHA-256. A finished
//! download whose upload fails stays staged (fsynced) and is uploaded by the next attempt,
//! without asking the API again; it is never failed for the store's absence.

mod client;
pub mod target;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;

use client::{Client, Head, sha256_base64};
pub use client::{Http, S3Error};
pub use target::{Target, is_bucket};

use crate::id::VideoId;
use crate::store::local;
use crate::store::{
    Checked, Entry, EntryKind, Existing, Inventory, Partial, Publish, Published, Store, StoreError,
    Writer, Written,
};

/// The most one PUT may carry (S3's limit for a single upload); `download.max_bytes` is held
/// to it.
pub const MAX_OBJECT: u64 = 5 << 30;
/// Tries of one request that met a reset, a timeout or a busy store before the store counts
/// as away.
const TRIES: u32 = 4;
/// The first pause between those tries; doubled each time, with jitter.
const FIRST_RETRY: Duration = Duration::from_millis(250);
/// A sidecar larger than this was not written by us.
const SMALL_OBJECT: usize = 64 * 1024;
/// What the start-up probe writes and deletes (and `verify` ignores).
const PROBE: &str = ".hingnetd-probe-";
/// While the store is away: the first pause between probes, the longest, and how long one
/// probe may take (it runs in the scheduler's loop, which must stay responsive).
const PROBE_FIRST: Duration = Duration::from_secs(2);
const PROBE_MAX: Duration = Duration::from_secs(60);
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// The bucket archive. Cheap to clone.
#[derive(Clone)]
pub struct BucketStore {
    inner: Arc<Inner>,
}

struct Inner {
    target: Target,
    client: Client,
    /// Where downloads are written and published before their upload.
    staging: local::Archive,
    /// Why the store cannot be used now, since a request found it so; cleared by a request
    /// that succeeds (`storage_problem` probes while it is set).
    away: Mutex<Option<String>>,
    /// While away: when the next probe may go, and the pause before the one after (doubled
    /// up to `PROBE_MAX`), so that a store away for days is not asked every two seconds.
    probe: Mutex<(std::time::Instant, Duration)>,
}

impl BucketStore {
    /// Reads the access key, opens the staging directory and proves the bucket usable (a
    /// listing, a write and a delete under the prefix), then aborts multipart uploads left
    /// unfinished under the prefix. Every problem is one line, before the daemon is ready.
    pub fn open(
        target: Target,
        staging: &Path,
        http: &dyn Fn() -> Result<Http, StoreError>,
    ) -> Result<BucketStore, StoreError> {
        let keys = target::load_keys().map_err(StoreError::Setup)?;
        let staging = local::Archive::open(staging).map_err(|e| match e {
            StoreError::Dir { path, source } => StoreError::Dir {
                path,
                source: std::io::Error::new(
                    source.kind(),
                    format!("{source} (archive.staging_dir)"),
                ),
            },
            other => other,
        })?;
        // The start-up checks run on a runtime of their own, with clients of their own: a
        // connection pooled there would be dead on the daemon's runtime.
        let checking = Inner::new(
            target.clone(),
            Client::new(&target, http()?, keys.clone()).map_err(StoreError::Setup)?,
            staging.clone(),
        );
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| StoreError::Setup(format!("cannot start a runtime: {e}")))?;
        rt.block_on(checking.prove())?;
        rt.block_on(checking.sweep_uploads());
        drop(rt);
        let client = Client::new(&target, http()?, keys).map_err(StoreError::Setup)?;
        let store = BucketStore {
            inner: Arc::new(Inner::new(target, client, staging)),
        };
        tracing::debug!(
            archive = %store.inner.target.display(),
            endpoint = %store.inner.client.origin(),
            keys_from = %store.inner.client.key_source(),
            staging = %store.inner.staging.dir().display(),
            "archive bucket usable"
        );
        Ok(store)
    }

    /// The bucket for reading (`verify`): nothing is written, and nothing is asked of it until
    /// a command does.
    pub fn inspect(target: Target, staging: &Path, http: Http) -> Result<BucketStore, StoreError> {
        let keys = target::load_keys().map_err(StoreError::Setup)?;
        let client = Client::new(&target, http, keys).map_err(StoreError::Setup)?;
        Ok(BucketStore {
            inner: Arc::new(Inner::new(target, client, local::Archive::inspect(staging))),
        })
    }

    /// The store for the operator's blocking commands, with a runtime of its own.
    pub fn into_inventory(self) -> Result<Box<dyn Inventory>, StoreError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| StoreError::Setup(format!("cannot start a runtime: {e}")))?;
        Ok(Box::new(BucketInventory { store: self, rt }))
    }
}

impl Inner {
    fn new(target: Target, client: Client, staging: local::Archive) -> Inner {
        Inner {
            target,
            client,
            staging,
            away: Mutex::new(None),
            probe: Mutex::new((std::time::Instant::now(), PROBE_FIRST)),
        }
    }

    fn video_key(&self, id: &VideoId, sha256: &str) -> String {
        format!("{}{id}/{sha256}.mp4", self.target.prefix)
    }

    fn sidecar_key(&self, id: &VideoId, sha256: &str) -> String {
        format!("{}{id}/{sha256}.json", self.target.prefix)
    }

    fn err(&self, source: S3Error) -> StoreError {
        StoreError::Bucket {
            location: self.target.display(),
            source,
        }
    }

    /// Runs one request, again after a short backoff while the store is busy or unreachable;
    /// a failure that means the store is away is remembered (`storage_problem`).
    async fn request<T, F, Fut>(&self, what: F) -> Result<T, StoreError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, S3Error>>,
    {
        let mut pause = FIRST_RETRY;
        let mut tries = 1;
        loop {
            match what().await {
                Ok(v) => {
                    if self
                        .away
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .take()
                        .is_some()
                    {
                        tracing::info!(archive = %self.target.display(), "archive bucket usable again");
                    }
                    return Ok(v);
                }
                Err(e) if e.retry_soon() && tries < TRIES => {
                    tracing::warn!(error = %e, retry_in = ?pause, "archive bucket request failed; trying again");
                    tokio::time::sleep(pause.mul_f64(0.5 + fastrand::f64() / 2.0)).await;
                    pause *= 2;
                    tries += 1;
                }
                Err(e) => {
                    if matches!(e, S3Error::Credentials(_)) {
                        self.client.reload_keys();
                    }
                    if e.pauses() {
                        let mut away = self.away.lock().unwrap_or_else(|p| p.into_inner());
                        if away.is_none() {
                            *self.probe.lock().unwrap_or_else(|p| p.into_inner()) =
                                (std::time::Instant::now(), PROBE_FIRST);
                            tracing::error!(archive = %self.target.display(), error = %e, "ARCHIVE BUCKET UNAVAILABLE: finished downloads stay staged, new downloads wait");
                        }
                        *away = Some(e.to_string());
                    }
                    return Err(self.err(e));
                }
            }
        }
    }

    /// The start-up check: the bucket can be listed, written and (else a warning) deleted
    /// from under the prefix.
    async fn prove(&self) -> Result<(), StoreError> {
        let prefix = &self.target.prefix;
        self.request(|| self.client.list(prefix, Some(1))).await?;
        let probe = self.probe_key();
        let body = Bytes::from_static(b"hingnetd checks it may write here\n");
        self.request(|| self.client.put_bytes(&probe, body.clone(), "text/plain"))
            .await?;
        // The whole design rests on the store checking and keeping a SHA-256 of each upload:
        // one that ignores `x-amz-checksum-sha256` is refused here, not at the first video.
        let head = self.request(|| self.client.head(&probe)).await?;
        use sha2::Digest;
        let sha = crate::id::hex(&sha2::Sha256::digest(&body));
        if let Err(why) = confirm(head.as_ref(), body.len() as u64, &sha) {
            return Err(StoreError::Setup(format!(
                "archive bucket {}: the store does not keep the SHA-256 hingnetd sends with each upload ({why}); it cannot vouch for the objects",
                self.target.display()
            )));
        }
        // Not through `request`: a key that may not delete is no reason to pause anything.
        if let Err(e) = self.client.delete(&probe).await {
            tracing::warn!(error = %e, "the S3 key may not delete objects: `hingnetd remove --delete-file` will fail");
        }
        Ok(())
    }

    fn probe_key(&self) -> String {
        format!("{}{PROBE}{}", self.target.prefix, crate::sys::host_name())
    }

    /// Aborts multipart uploads left unfinished under the prefix (by an older version, a
    /// crash, another tool writing our layout): their parts are billed and never visible.
    /// hingnetd itself uploads in single PUTs, so nothing of a live download is aborted.
    async fn sweep_uploads(&self) {
        let prefix = &self.target.prefix;
        let uploads = match self.client.unfinished_uploads(prefix).await {
            Ok(u) => u,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list unfinished multipart uploads; add the store's lifecycle rule (README)");
                return;
            }
        };
        for (key, upload) in uploads {
            if classify_key(&self.target, &key).is_none() {
                continue;
            }
            match self.client.abort_upload(&key, &upload).await {
                Ok(()) => {
                    tracing::warn!(key = %key, "aborted an unfinished multipart upload under the archive's prefix")
                }
                Err(e) => {
                    tracing::warn!(key = %key, error = %e, "cannot abort an unfinished multipart upload")
                }
            }
        }
    }

    /// Uploads a file published in staging (sidecar first, so a video object always has its
    /// sidecar), confirms it with `HeadObject`, then removes the staged copy.
    async fn upload(
        &self,
        id: &VideoId,
        staged: Published,
        mp4: &str,
    ) -> Result<Published, StoreError> {
        let key = self.video_key(id, &staged.sha256);
        if let Some(meta) = &staged.metadata {
            let side = self.sidecar_key(id, &staged.sha256);
            let body = Bytes::from(meta.clone().into_bytes());
            self.request(|| {
                self.client
                    .put_bytes(&side, body.clone(), "application/json")
            })
            .await?;
        }
        let file = PathBuf::from(&staged.path);
        let put = self
            .request(|| {
                self.client
                    .put_file(&key, &file, staged.bytes, &staged.sha256, "video/mp4", mp4)
            })
            .await;
        match put {
            // The store computed another SHA-256 than the one sent: either the staged bytes
            // changed on disk since they were hashed (then they cannot be trusted, and the next
            // attempt downloads them again), or they were damaged on the way (then they are
            // still good, and are uploaded again later).
            Err(StoreError::Bucket {
                source: S3Error::Digest(why),
                ..
            }) => {
                let (f, want) = (file.clone(), staged.sha256.clone());
                let same = tokio::task::spawn_blocking(move || local::hash_file(&f, &|_| {}))
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .is_some_and(|sha| sha == want);
                if same {
                    return Err(self.unconfirmed(format!(
                        "{key}: the store found the upload's SHA-256 wrong, but the staged file is intact (damaged on the way?): {why}"
                    )));
                }
                tracing::error!(video_id = %id, error = %why, "the staged file no longer matches its SHA-256; removed, to be downloaded again");
                self.remove_staged(id).await;
                return Err(self.err(S3Error::Digest(why)));
            }
            // Refused for this object (not for the store's absence): still nothing to fail the
            // row for while the file is staged.
            Err(StoreError::Bucket {
                source: S3Error::Refused(why) | S3Error::NotFound(why),
                ..
            }) => return Err(self.unconfirmed(why)),
            other => other?,
        }
        let head = self.request(|| self.client.head(&key)).await?;
        confirm(head.as_ref(), staged.bytes, &staged.sha256)
            .map_err(|why| self.unconfirmed(format!("{key}: after the upload, {why}")))?;
        self.remove_staged(id).await;
        Ok(Published {
            path: self.target.path_of(&key),
            ..staged
        })
    }

    /// An upload that did not end in a confirmed object although the store answered: the file
    /// stays staged, the row waits (`S3Error::Unconfirmed` pauses, never fails), and new
    /// downloads wait until a probe finds the store writable again.
    fn unconfirmed(&self, why: String) -> StoreError {
        let e = S3Error::Unconfirmed(why);
        let mut away = self.away.lock().unwrap_or_else(|p| p.into_inner());
        if away.is_none() {
            *self.probe.lock().unwrap_or_else(|p| p.into_inner()) =
                (std::time::Instant::now(), PROBE_FIRST);
            tracing::error!(archive = %self.target.display(), error = %e, "ARCHIVE BUCKET DID NOT TAKE AN UPLOAD: the download stays staged, new downloads wait");
        }
        *away = Some(e.to_string());
        self.err(e)
    }

    /// The staged copy of a video (and its sidecar), once it is in the bucket.
    async fn remove_staged(&self, id: &VideoId) {
        let (staging, id2) = (self.staging.clone(), id.clone());
        let removed =
            tokio::task::spawn_blocking(move || Inventory::delete_published(&staging, &id2)).await;
        if let Ok(Err(e)) = removed {
            tracing::warn!(video_id = %id, error = %e, "cannot remove the staged copy of an uploaded video");
        }
    }

    /// A whole video already in the bucket under its key (an earlier run uploaded it and died
    /// before its row said so): confirmed by `HeadObject`, with its sidecar.
    async fn adoptable(&self, id: &VideoId) -> Result<Option<Published>, StoreError> {
        let under = format!("{}{id}/", self.target.prefix);
        let listed = self.request(|| self.client.list(&under, None)).await?;
        for obj in listed {
            let Some((kid, Kind::Video(sha))) = classify_key(&self.target, &obj.key) else {
                continue;
            };
            if kid != *id {
                continue;
            }
            let head = self.request(|| self.client.head(&obj.key)).await?;
            if head.as_ref().and_then(|h| h.mp4.as_deref()) != Some("whole")
                || confirm(head.as_ref(), obj.size, &sha).is_err()
            {
                continue;
            }
            let side = self.sidecar_key(id, &sha);
            let metadata = self
                .request(|| self.client.get_small(&side, SMALL_OBJECT))
                .await?
                .and_then(|b| String::from_utf8(b).ok())
                .filter(|t| {
                    serde_json::from_str::<serde_json::Value>(t).is_ok_and(|v| v.is_object())
                });
            return Ok(Some(Published {
                path: self.target.path_of(&obj.key),
                sha256: sha,
                bytes: obj.size,
                metadata,
            }));
        }
        Ok(None)
    }
}

/// Whether `HeadObject` says what was uploaded: the size, and the store's own SHA-256 of the
/// whole object equal to ours. A store that keeps no SHA-256 has not checked the upload.
fn confirm(head: Option<&Head>, bytes: u64, sha256: &str) -> Result<(), String> {
    let Some(h) = head else {
        return Err("HeadObject finds no object".into());
    };
    if h.size != bytes {
        return Err(format!("the object is {} bytes, not {bytes}", h.size));
    }
    match &h.sha256 {
        Some(s) if *s == sha256_base64(sha256) => Ok(()),
        Some(s) => Err(format!(
            "the store's SHA-256 is {s}, not {}",
            sha256_base64(sha256)
        )),
        None => {
            Err("the store keeps no SHA-256 of it (does it support x-amz-checksum-sha256?)".into())
        }
    }
}

/// What a key under the prefix is.
#[derive(Debug, PartialEq)]
enum Kind {
    /// `<id>/<sha256>.mp4`, with the SHA-256.
    Video(String),
    Sidecar(String),
}

fn classify_key(target: &Target, key: &str) -> Option<(VideoId, Kind)> {
    let rest = key.strip_prefix(target.prefix.as_str())?;
    let (id, name) = rest.split_once('/')?;
    let id = VideoId::parse(id).ok()?;
    let is_sha = |s: &str| {
        s.len() == 64
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    if let Some(sha) = name.strip_suffix(".mp4").filter(|s| is_sha(s)) {
        return Some((id, Kind::Video(sha.to_owned())));
    }
    if let Some(sha) = name.strip_suffix(".json").filter(|s| is_sha(s)) {
        return Some((id, Kind::Sidecar(sha.to_owned())));
    }
    None
}

#[async_trait::async_trait]
impl Store for BucketStore {
    fn location(&self) -> String {
        self.inner.target.display()
    }

    fn keep_free(&self, bytes: u64) {
        Store::keep_free(&self.inner.staging, bytes);
    }

    /// The staging directory's problems, or the bucket's: while a request has found the store
    /// away, each look probes it (a one-key listing) and ends the pause when it answers.
    async fn storage_problem(&self) -> Option<String> {
        if let Some(p) = Store::storage_problem(&self.inner.staging).await {
            return Some(format!("staging: {p}"));
        }
        let away = self
            .inner
            .away
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let why = away?;
        let shown = self.inner.target.display();
        let now = std::time::Instant::now();
        if now < self.inner.probe.lock().unwrap_or_else(|p| p.into_inner()).0 {
            return Some(format!("archive bucket {shown}: {why}"));
        }
        // The probe is a write (a store may list but refuse uploads), bounded in time: it runs
        // in the scheduler's loop.
        self.inner.client.reload_keys();
        let key = self.inner.probe_key();
        let body = Bytes::from_static(b"hingnetd checks it may write here\n");
        let put = self.inner.client.put_bytes(&key, body, "text/plain");
        let r = tokio::time::timeout(PROBE_TIMEOUT, put)
            .await
            .unwrap_or_else(|_| {
                Err(S3Error::Unreachable(format!(
                    "PUT {key}: no answer in {}",
                    crate::config::format_duration(PROBE_TIMEOUT)
                )))
            });
        match r {
            Ok(()) => {
                *self.inner.away.lock().unwrap_or_else(|p| p.into_inner()) = None;
                tracing::info!(archive = %shown, "archive bucket usable again");
                None
            }
            Err(e) => {
                let mut probe = self.inner.probe.lock().unwrap_or_else(|p| p.into_inner());
                *probe = (now + probe.1, (probe.1 * 2).min(PROBE_MAX));
                *self.inner.away.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
                Some(format!("archive bucket {shown}: {e}"))
            }
        }
    }

    fn free_bytes(&self) -> std::io::Result<u64> {
        Store::free_bytes(&self.inner.staging)
    }

    /// A whole video in the bucket is adopted; else a video published in staging whose upload
    /// did not finish is uploaded now (no request to the API); else what the staging directory
    /// says.
    async fn existing(&self, id: &VideoId) -> Result<Existing, StoreError> {
        if let Some(p) = self.inner.adoptable(id).await? {
            self.inner.remove_staged(id).await;
            return Ok(Existing::Adopted(p));
        }
        match Store::existing(&self.inner.staging, id).await? {
            Existing::Adopted(staged) => {
                tracing::info!(video_id = %id, "uploading a finished download left in staging");
                Ok(Existing::Adopted(
                    self.inner.upload(id, staged, "whole").await?,
                ))
            }
            other => Ok(other),
        }
    }

    async fn begin(&self, id: &VideoId) -> Result<Box<dyn Partial>, StoreError> {
        let p = Store::begin(&self.inner.staging, id).await?;
        Ok(self.wrap(p, id))
    }

    /// The partial only: a finished download staged for its upload is the video's bytes, kept
    /// even when the row failed (`verify` reports it; `hingnetd remove` deletes it).
    async fn remove_leftovers(&self, id: &VideoId) -> Result<(), StoreError> {
        Store::remove_leftovers(&self.inner.staging, id).await
    }
}

impl BucketStore {
    fn wrap(&self, inner: Box<dyn Partial>, id: &VideoId) -> Box<dyn Partial> {
        Box::new(BucketPartial {
            inner,
            store: self.clone(),
            id: id.clone(),
        })
    }
}

/// A download staged locally; publishing it uploads it.
struct BucketPartial {
    inner: Box<dyn Partial>,
    store: BucketStore,
    id: VideoId,
}

#[async_trait::async_trait]
impl Partial for BucketPartial {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn validator(&self) -> Option<&str> {
        self.inner.validator()
    }

    fn total(&self) -> Option<u64> {
        self.inner.total()
    }

    fn set_version(
        &mut self,
        validator: Option<&str>,
        total: Option<u64>,
    ) -> Result<(), StoreError> {
        self.inner.set_version(validator, total)
    }

    async fn restart(&mut self) -> Result<(), StoreError> {
        self.inner.restart().await
    }

    async fn admit(&mut self, total: Option<u64>) -> Result<(), StoreError> {
        self.inner.admit(total).await
    }

    fn writer(self: Box<Self>) -> Box<dyn Writer> {
        let BucketPartial { inner, store, id } = *self;
        Box::new(BucketWriter {
            inner: inner.writer(),
            store,
            id,
        })
    }

    async fn park(self: Box<Self>) -> Result<u64, StoreError> {
        self.inner.park().await
    }

    async fn discard(self: Box<Self>) -> Result<(), StoreError> {
        self.inner.discard().await
    }

    async fn publish(self: Box<Self>, sidecar: Option<String>) -> Result<Publish, StoreError> {
        let BucketPartial { inner, store, id } = *self;
        match inner.publish(sidecar).await? {
            Publish::Published(staged) => Ok(Publish::Published(
                store.inner.upload(&id, staged, "whole").await?,
            )),
            Publish::NotWhole(p, why) => Ok(Publish::NotWhole(store.wrap(p, &id), why)),
        }
    }

    fn sha256(&self) -> String {
        self.inner.sha256()
    }

    fn rejections(&self) -> Option<(u32, &str)> {
        self.inner.rejections()
    }

    async fn reject(&mut self) -> Result<u32, StoreError> {
        self.inner.reject().await
    }

    async fn keep_incomplete(
        self: Box<Self>,
        sidecar: Option<String>,
    ) -> Result<Published, StoreError> {
        let BucketPartial { inner, store, id } = *self;
        let staged = inner.keep_incomplete(sidecar).await?;
        store.inner.upload(&id, staged, "incomplete").await
    }
}

struct BucketWriter {
    inner: Box<dyn Writer>,
    store: BucketStore,
    id: VideoId,
}

#[async_trait::async_trait]
impl Writer for BucketWriter {
    async fn write(&mut self, chunk: Bytes) -> bool {
        self.inner.write(chunk).await
    }

    async fn finish(self: Box<Self>) -> Written {
        let BucketWriter { inner, store, id } = *self;
        match inner.finish().await {
            Written::All(p) => Written::All(store.wrap(p, &id)),
            Written::Short(p, e) => Written::Short(store.wrap(p, &id), e),
            Written::Failed(e) => Written::Failed(e),
        }
    }
}

/// The bucket for the operator's commands, which block: requests run on a runtime of its own.
struct BucketInventory {
    store: BucketStore,
    rt: tokio::runtime::Runtime,
}

impl BucketInventory {
    fn inner(&self) -> &Inner {
        &self.store.inner
    }
}

impl BucketInventory {
    /// Deletes every object under the video's keys; returns their paths.
    fn delete_objects(&self, id: &VideoId) -> Result<Vec<String>, StoreError> {
        let inner = self.inner();
        let under = format!("{}{id}/", inner.target.prefix);
        self.rt.block_on(async {
            let listed = inner
                .client
                .list(&under, None)
                .await
                .map_err(|e| inner.err(e))?;
            let mut gone = Vec::new();
            for obj in listed {
                if classify_key(&inner.target, &obj.key).is_some_and(|(kid, _)| kid == *id) {
                    inner
                        .client
                        .delete(&obj.key)
                        .await
                        .map_err(|e| inner.err(e))?;
                    gone.push(inner.target.path_of(&obj.key));
                }
            }
            Ok(gone)
        })
    }
}

impl Inventory for BucketInventory {
    /// The video's keys begin here; which one a row names depends on its bytes.
    fn video_path(&self, id: &VideoId) -> String {
        self.inner()
            .target
            .path_of(&format!("{}{id}/<sha256>.mp4", self.inner().target.prefix))
    }

    fn keeps_at(&self, id: &VideoId, path: &str) -> bool {
        let inner = self.inner();
        inner
            .target
            .key_of(path)
            .and_then(|k| classify_key(&inner.target, k))
            .is_some_and(|(kid, kind)| kid == *id && matches!(kind, Kind::Video(_)))
    }

    fn belongs(&self, row_path: &str, entry: &Entry) -> bool {
        entry.path == row_path
            || entry
                .path
                .strip_suffix(".json")
                .map(|p| format!("{p}.mp4"))
                .as_deref()
                == Some(row_path)
    }

    fn shared(&self) -> bool {
        true
    }

    fn check(
        &self,
        path: &str,
        bytes: Option<i64>,
        sha256: Option<&str>,
        deep: bool,
        progress: &dyn Fn(u64),
    ) -> Checked {
        let inner = self.inner();
        let Some(key) = inner.target.key_of(path) else {
            return Checked::Changed(format!("not in the bucket {}", inner.target.display()));
        };
        let head = match self.rt.block_on(inner.client.head(key)) {
            Ok(None) => return Checked::Missing,
            Ok(Some(h)) => h,
            Err(e) => return Checked::Unreadable(format!("cannot read: {e}")),
        };
        let expected = bytes.unwrap_or(-1);
        if head.size as i64 != expected {
            return Checked::Changed(format!("size {} bytes, recorded {expected}", head.size));
        }
        let want = sha256.unwrap_or("");
        match &head.sha256 {
            Some(s) if *s != sha256_base64(want) => {
                return Checked::Changed(format!(
                    "the store's sha256 {s}, recorded {}",
                    sha256.unwrap_or("none")
                ));
            }
            Some(_) => {}
            None if !deep => {
                return Checked::Unreadable(
                    "the store keeps no SHA-256 of it; `verify --deep` reads it".into(),
                );
            }
            None => {}
        }
        if !deep {
            progress(head.size);
            return Checked::Intact { bytes: head.size };
        }
        match self.rt.block_on(hash_object(&inner.client, key, progress)) {
            Ok(None) => Checked::Missing,
            Ok(Some((sha, n))) if sha != want || n != head.size => Checked::Changed(format!(
                "read back: {n} bytes, sha256 {sha}, recorded {}",
                sha256.unwrap_or("none")
            )),
            Ok(Some((_, n))) => Checked::Intact { bytes: n },
            Err(e) => Checked::Unreadable(format!("cannot read: {e}")),
        }
    }

    /// Every key under the prefix (but the start-up probe's), and what staging holds: a
    /// download's partial, or a finished download waiting for its upload, both leftovers of
    /// their video.
    fn entries(&self) -> Result<Vec<Entry>, StoreError> {
        let inner = self.inner();
        let listed = self
            .rt
            .block_on(inner.client.list(&inner.target.prefix, None))
            .map_err(|e| inner.err(e))?;
        let mut out = Vec::new();
        for obj in listed {
            let name = &obj.key[inner.target.prefix.len()..];
            if name.starts_with(PROBE) {
                continue;
            }
            let kind = match classify_key(&inner.target, &obj.key) {
                Some((id, Kind::Video(_))) => EntryKind::Video(id),
                Some((id, Kind::Sidecar(_))) => EntryKind::Sidecar(id),
                None => EntryKind::Unknown,
            };
            out.push(Entry {
                path: inner.target.path_of(&obj.key),
                kind,
            });
        }
        for e in Inventory::entries(&inner.staging)? {
            let kind = match e.kind {
                EntryKind::Video(id) | EntryKind::Sidecar(id) | EntryKind::Partial(id) => {
                    EntryKind::Partial(id)
                }
                EntryKind::Unknown => EntryKind::Unknown,
            };
            out.push(Entry { path: e.path, kind });
        }
        Ok(out)
    }

    /// A bucket has no rename: the video's objects are deleted (their bytes are not the
    /// video's, and a whole-looking one would otherwise be adopted again by the next
    /// download), which the message says.
    fn set_aside(&self, id: &VideoId) -> Result<String, StoreError> {
        let gone = self.delete_objects(id)?;
        Ok(format!("(deleted from the bucket: {})", gone.join(", ")))
    }

    /// Every object under the video's keys, and any staged copy.
    fn delete_published(&self, id: &VideoId) -> Result<(), StoreError> {
        self.delete_objects(id)?;
        Inventory::delete_published(&self.inner().staging, id)
    }

    fn remove_leftovers(&self, id: &VideoId) -> Result<(), StoreError> {
        let staging = &self.inner().staging;
        Inventory::remove_leftovers(staging, id)?;
        Inventory::delete_published(staging, id)
    }
}

/// Reads an object back and hashes it: `(sha256 hex, bytes)`, or `None` if it is gone.
async fn hash_object(
    client: &Client,
    key: &str,
    progress: &dyn Fn(u64),
) -> Result<Option<(String, u64)>, S3Error> {
    use sha2::Digest;
    let Some(mut r) = client.get(key).await? else {
        return Ok(None);
    };
    let mut hasher = sha2::Sha256::new();
    let mut n = 0u64;
    while let Some(chunk) = r
        .chunk()
        .await
        .map_err(|e| S3Error::Unreachable(format!("GET {key}: {}", crate::api::error_text(&e))))?
    {
        hasher.update(&chunk);
        n += chunk.len() as u64;
        progress(chunk.len() as u64);
    }
    Ok(Some((crate::id::hex(&hasher.finalize()), n)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_name_only_checked_ids_and_hashes() {
        let t = Target::parse("s3://videos/p/", &crate::config::S3Config::default()).unwrap();
        let sha = "a".repeat(64);
        let id = VideoId::parse("video_1").unwrap();
        assert_eq!(
            classify_key(&t, &format!("p/video_1/{sha}.mp4")),
            Some((id.clone(), Kind::Video(sha.clone())))
        );
        assert_eq!(
            classify_key(&t, &format!("p/video_1/{sha}.json")),
            Some((id, Kind::Sidecar(sha.clone())))
        );
        for other in [
            format!("q/video_1/{sha}.mp4"),
            format!("p/video_1/{}.mp4", "A".repeat(64)),
            "p/video_1/x.mp4".to_owned(),
            format!("p/bad id/{sha}.mp4"),
            format!("p/video_1/{sha}.mp4/x"),
            format!("p/{PROBE}host"),
        ] {
            assert_eq!(classify_key(&t, &other), None, "{other}");
        }
    }

    #[test]
    fn confirming_an_upload() {
        let sha = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        let head = |size, sha256: Option<&str>| Head {
            size,
            sha256: sha256.map(str::to_owned),
            mp4: None,
        };
        let b64 = sha256_base64(sha);
        assert!(confirm(Some(&head(0, Some(&b64))), 0, sha).is_ok());
        assert!(
            confirm(Some(&head(1, Some(&b64))), 0, sha)
                .unwrap_err()
                .contains("1 bytes")
        );
        assert!(confirm(Some(&head(0, Some("xx"))), 0, sha).is_err());
        assert!(
            confirm(Some(&head(0, None)), 0, sha)
                .unwrap_err()
                .contains("no SHA-256")
        );
        assert!(confirm(None, 0, sha).is_err());
    }
}

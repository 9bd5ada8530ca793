//! The archive's contract: where downloads are written and published (`Store`, `Partial`,
//! `Writer`) and what the operator's commands ask of it (`Inventory`), in terms that name no
//! storage. Two stores: `local` (a directory, the default) and `s3` (a bucket, which stages
//! downloads in a local directory); `Location` and the `open`/`inspect` functions are the one
//! place that picks one.
//!
//! The promise every store keeps: a video appears under its final name only complete, checked
//! (`mp4::check`) and durable; a partial keeps exactly the bytes it can vouch for, so a resume
//! never splices in anything else; nothing outside the store builds a path inside it.

pub mod local;
pub mod s3;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;

use crate::id::VideoId;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("archive directory {path}: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("archive file {path}: {source}")]
    File {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a whole MP4 file: {why}")]
    Incomplete { path: PathBuf, why: String },
    /// The bucket refused or could not be reached (`S3Error::pauses` says whether that means
    /// the store is away).
    #[error("archive bucket {location}: {source}")]
    Bucket {
        location: String,
        source: s3::S3Error,
    },
    /// The store's settings or credentials cannot be used.
    #[error("{0}")]
    Setup(String),
    #[error("{path} is being written by another process (a `hingnetd fetch`?)")]
    Busy { path: PathBuf },
    #[error(
        "not enough disk space in {dir}: {need} more bytes needed, {free} free, {min_free} kept free (archive.min_free)"
    )]
    NoSpace {
        dir: PathBuf,
        need: u64,
        free: u64,
        min_free: u64,
    },
    /// Free space fell below the reserve while a download was writing: the partial is kept
    /// (it is not damaged), and the download waits for room.
    #[error(
        "disk short while writing: {free} bytes free in {dir} (after what other downloads need), below archive.min_free ({min_free}); partial file kept"
    )]
    DiskShort {
        dir: PathBuf,
        free: u64,
        min_free: u64,
    },
}

impl StoreError {
    /// The store as a whole cannot be used now (a bucket unreachable, or refusing the key):
    /// not the video's fault, and nothing to fail its row for.
    pub fn is_away(&self) -> bool {
        matches!(self, StoreError::Bucket { source, .. } if source.pauses())
    }
}

/// Where the archive is, from `[archive]`.
#[derive(Debug, Clone, PartialEq)]
pub enum Location {
    Dir(PathBuf),
    Bucket {
        target: Box<s3::Target>,
        /// `archive.staging_dir`, or its default.
        staging: PathBuf,
    },
}

impl Location {
    /// `archive.dir` and, for a bucket, `[archive.s3]` and the staging directory (by default
    /// `staging` beside the SQLite queue); the key and why it is wrong otherwise.
    pub fn of(cfg: &crate::config::Config) -> Result<Location, (&'static str, String)> {
        let a = &cfg.archive;
        if !s3::is_bucket(&a.dir) {
            return Ok(Location::Dir(a.dir.clone()));
        }
        let dir = a.dir.to_str().unwrap_or_default();
        let target = s3::Target::parse(dir, &a.s3).map_err(|e| ("archive.dir", e))?;
        let staging = if !a.staging_dir.as_os_str().is_empty() {
            a.staging_dir.clone()
        } else {
            match crate::queue::Location::of(&cfg.queue) {
                Ok(crate::queue::Location::Sqlite(db)) => {
                    db.parent().unwrap_or(Path::new(".")).join("staging")
                }
                _ => {
                    return Err((
                        "archive.staging_dir",
                        "must be set when archive.dir is a bucket and the queue is not a SQLite file (a local directory for downloads in progress)".into(),
                    ));
                }
            }
        };
        Ok(Location::Bucket {
            target: Box::new(target),
            staging,
        })
    }

    pub fn is_bucket(&self) -> bool {
        matches!(self, Location::Bucket { .. })
    }

    /// The directory where files are written (the archive's, or the bucket's staging).
    pub fn local_dir(&self) -> &Path {
        match self {
            Location::Dir(d) => d,
            Location::Bucket { staging, .. } => staging,
        }
    }

    pub fn display(&self) -> String {
        match self {
            Location::Dir(d) => d.display().to_string(),
            Location::Bucket { target, .. } => target.display(),
        }
    }
}

/// A video that made it into the archive.
#[derive(Debug, Clone, PartialEq)]
pub struct Published {
    /// Where the store keeps it, as its row records it.
    pub path: String,
    pub sha256: String,
    pub bytes: u64,
    /// The status object kept beside it (`<id>.json`), when there is one.
    pub metadata: Option<String>,
}

/// What sits at a video's final place before it is downloaded.
#[derive(Debug, PartialEq)]
pub enum Existing {
    /// Nothing (or a planted symlink, which the publish renames over without following).
    Absent,
    /// A whole MP4 that an earlier run published but did not record: taken as it is.
    Adopted(Published),
    /// Something that is not a whole MP4 (empty, short, something else): set aside under this
    /// name, never deleted (it may be someone's), and the video downloaded afresh.
    SetAside { path: String, why: String },
    /// Nothing of ours can go there (a directory, a socket), and why.
    Blocked(String),
}

/// How a `Writer` ended.
pub enum Written {
    All(Box<dyn Partial>),
    /// Stopped for `archive.min_free` (`StoreError::DiskShort`); every byte written is sound
    /// and kept.
    Short(Box<dyn Partial>, StoreError),
    /// A write failed; the partial is gone.
    Failed(StoreError),
}

/// What checking a complete partial found (`Partial::publish`).
pub enum Publish {
    Published(Published),
    /// Not a whole MP4, and why: the partial, to be refused or kept as it is.
    NotWhole(Box<dyn Partial>, String),
}

/// What `Inventory::check` found of a file a row names.
#[derive(Debug, PartialEq)]
pub enum Checked {
    /// Size and SHA-256 as recorded.
    Intact {
        bytes: u64,
    },
    Missing,
    /// Not what the row recorded, and how.
    Changed(String),
    /// Could not be read: not known to be wrong.
    Unreadable(String),
}

/// One thing in the archive, as `verify`'s orphan check sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub path: String,
    pub kind: EntryKind,
}

#[derive(Debug, Clone, PartialEq)]
pub enum EntryKind {
    /// A published video, or the metadata beside it.
    Video(VideoId),
    Sidecar(VideoId),
    /// What a download left to resume from.
    Partial(VideoId),
    /// Something no video's name accounts for.
    Unknown,
}

/// The archive as downloads use it. A store keeps its blocking work off the caller's async
/// workers (the directory's file I/O runs on tokio's blocking pool).
#[async_trait::async_trait]
pub trait Store: Send + Sync {
    /// Where the archive is, for messages.
    fn location(&self) -> String;

    /// `archive.min_free`: what admission keeps free. Set at start and on reload.
    fn keep_free(&self, bytes: u64);

    /// Why new downloads should wait (no room above `archive.min_free`, the archive gone), if
    /// they should.
    async fn storage_problem(&self) -> Option<String>;

    /// Free space, in bytes, for the metrics. Blocking: call on a blocking thread.
    fn free_bytes(&self) -> std::io::Result<u64>;

    /// What sits at the video's final place: an earlier run's whole MP4 is adopted, anything
    /// else set aside or in the way.
    async fn existing(&self, id: &VideoId) -> Result<Existing, StoreError>;

    /// Begins or resumes the video's partial. It is the video's only writer while it lives
    /// (`StoreError::Busy` for a second one, in any process).
    async fn begin(&self, id: &VideoId) -> Result<Box<dyn Partial>, StoreError>;

    /// Removes what a download of the video left, once its row has failed: nothing will
    /// resume it. A partial another process is writing is left to it.
    async fn remove_leftovers(&self, id: &VideoId) -> Result<(), StoreError>;
}

/// A download in progress, hashed as it is written.
#[async_trait::async_trait]
pub trait Partial: Send + Sync {
    /// Bytes received so far: where a resumed request starts.
    fn size(&self) -> u64;

    /// What identifies the server's version of the bytes held, for `If-Range`.
    fn validator(&self) -> Option<&str>;

    /// The whole file's size, as the response that started the file announced it.
    fn total(&self) -> Option<u64>;

    /// Records which version of the file is being written from byte zero, before its body,
    /// so that it outlives a kill. A small local write.
    fn set_version(
        &mut self,
        validator: Option<&str>,
        total: Option<u64>,
    ) -> Result<(), StoreError>;

    /// Starts over from byte zero.
    async fn restart(&mut self) -> Result<(), StoreError>;

    /// Admission against free space, before a body is written: the rest of a `total`-byte
    /// file must fit above `archive.min_free` (counting what other downloads were promised),
    /// and while writing, the store stops with `StoreError::DiskShort` once it would not.
    async fn admit(&mut self, total: Option<u64>) -> Result<(), StoreError>;

    /// Hands the partial to a writer that hashes and writes chunks while the next ones are
    /// read.
    fn writer(self: Box<Self>) -> Box<dyn Writer>;

    /// Keeps what was received for a later resume; an empty partial goes. Returns the bytes
    /// kept.
    async fn park(self: Box<Self>) -> Result<u64, StoreError>;

    /// Removes the partial: what it holds will never be needed.
    async fn discard(self: Box<Self>) -> Result<(), StoreError>;

    /// The file is complete by HTTP: a whole MP4 is published under its final name, with the
    /// metadata beside it (`sidecar`), in one step.
    async fn publish(self: Box<Self>, sidecar: Option<String>) -> Result<Publish, StoreError>;

    /// The SHA-256 of the bytes written (after `publish` found them not whole).
    fn sha256(&self) -> String;

    /// Whole downloads refused so far as incomplete MP4s, and the last one's SHA-256.
    fn rejections(&self) -> Option<(u32, &str)>;

    /// Refuses these bytes as an incomplete MP4 (remembered past this attempt and a restart),
    /// and starts over. Returns the refusals so far.
    async fn reject(&mut self) -> Result<u32, StoreError>;

    /// Publishes an incomplete MP4 as it is, with the same care: the API served these very
    /// bytes twice, so they are kept (their row fails, never becomes done).
    async fn keep_incomplete(
        self: Box<Self>,
        sidecar: Option<String>,
    ) -> Result<Published, StoreError>;
}

/// A partial being written.
#[async_trait::async_trait]
pub trait Writer: Send {
    /// Queues the next chunk; `false` once writing has stopped (`finish` says why).
    async fn write(&mut self, chunk: Bytes) -> bool;

    /// Waits for the queued chunks to be written: the partial back, or why writing stopped.
    async fn finish(self: Box<Self>) -> Written;
}

/// What the operator's commands ask of the archive. Blocking: they run on the command's own
/// thread.
pub trait Inventory {
    /// Where the store keeps the video (what a done row's `path` says when it is ours).
    fn video_path(&self, id: &VideoId) -> String;

    /// Whether `path` (as a row records it) is where the store keeps the video.
    fn keeps_at(&self, id: &VideoId, path: &str) -> bool;

    /// Checks a file a row names against `bytes` and `sha256` as recorded: a directory re-reads
    /// it always; a bucket compares the store's own size and SHA-256, and reads the object back
    /// only when `deep`. `progress` is told the bytes as they are checked.
    fn check(
        &self,
        path: &str,
        bytes: Option<i64>,
        sha256: Option<&str>,
        deep: bool,
        progress: &dyn Fn(u64),
    ) -> Checked;

    /// Whether `entry` is the file a row recording `row_path` names, or its sidecar.
    fn belongs(&self, row_path: &str, entry: &Entry) -> bool {
        match &entry.kind {
            EntryKind::Video(id) | EntryKind::Sidecar(id) => row_path == self.video_path(id),
            _ => false,
        }
    }

    /// Every host's daemons write to this same archive (a bucket), so a row another host
    /// archived is checked here too.
    fn shared(&self) -> bool {
        false
    }

    /// Everything in the archive (none if it is not there).
    fn entries(&self) -> Result<Vec<Entry>, StoreError>;

    /// Sets aside what is at the video's final place (`verify --repair`), under a name nothing
    /// else has; returns that name.
    fn set_aside(&self, id: &VideoId) -> Result<String, StoreError>;

    /// Deletes a published video and its metadata (`remove --delete-file`).
    fn delete_published(&self, id: &VideoId) -> Result<(), StoreError>;

    /// See `Store::remove_leftovers`.
    fn remove_leftovers(&self, id: &VideoId) -> Result<(), StoreError>;
}

/// The archive for downloads: created if need be and proven writable (a bucket: listed,
/// written and its access key checked), so that a bad `[archive]` is reported at start.
pub fn open(cfg: &crate::config::Config) -> Result<Arc<dyn Store>, StoreError> {
    let store: Arc<dyn Store> = match cfg.archive_location() {
        Location::Dir(dir) => Arc::new(local::Archive::open(&dir)?),
        Location::Bucket { target, staging } => {
            Arc::new(s3::BucketStore::open(*target, &staging, &|| {
                http_clients(cfg)
            })?)
        }
    };
    store.keep_free(cfg.archive.min_free);
    Ok(store)
}

/// The archive for the operator's commands that change it (`remove`, `verify --repair`):
/// opened as for downloads.
pub fn open_inventory(cfg: &crate::config::Config) -> Result<Box<dyn Inventory>, StoreError> {
    match cfg.archive_location() {
        Location::Dir(dir) => Ok(Box::new(local::Archive::open(&dir)?)),
        Location::Bucket { target, staging } => {
            s3::BucketStore::open(*target, &staging, &|| http_clients(cfg))?.into_inventory()
        }
    }
}

/// The archive for reading only (`verify`): nothing is created, and an archive that is not
/// there has no entries.
pub fn inspect(cfg: &crate::config::Config) -> Result<Box<dyn Inventory>, StoreError> {
    match cfg.archive_location() {
        Location::Dir(dir) => Ok(Box::new(local::Archive::inspect(&dir))),
        Location::Bucket { target, staging } => {
            s3::BucketStore::inspect(*target, &staging, http_clients(cfg)?)?.into_inventory()
        }
    }
}

/// The bucket's HTTP clients: the API client's settings (timeouts, proxies, TLS roots, no
/// automatic redirects), one without a read timeout for uploads, which are watched for
/// progress for `api.read_timeout` instead.
fn http_clients(cfg: &crate::config::Config) -> Result<s3::Http, StoreError> {
    let e = |e: reqwest::Error| StoreError::Setup(format!("cannot build the HTTP client: {e}"));
    Ok(s3::Http {
        reads: crate::api::http_client(&cfg.api).map_err(e)?,
        uploads: crate::api::upload_client(&cfg.api).map_err(e)?,
        stall: cfg.api.read_timeout,
    })
}

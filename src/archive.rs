//! The archive directory and its file discipline: which IDs may become file names, where a
//! video's partial, final and sidecar files live, hashing while writing, and the publish
//! sequence (fsync file → rename → fsync directory) that makes a final file trustworthy.
//!
//! Invariant: a file at a final path (`<dir>/<id>.mp4`) whose row is `done` was complete,
//! checked (`mp4::check`) and fsynced before it got that name. The one other file that gets a
//! final name is an incomplete MP4 the API served twice (`Partial::keep_incomplete`): its row
//! is `failed`, so `done` keeps meaning "complete and checked". Partial files are hidden
//! (`<dir>/.<id>.mp4.part`) in the same directory, so the rename is atomic and needs one
//! directory fsync.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use sha2::{Digest, Sha256};

use crate::id::{VideoId, hex};
use crate::mp4;

/// Bytes buffered before a write(2): large enough that a fast link costs few syscalls, small
/// enough that memory stays flat at any concurrency.
const WRITE_BUFFER: usize = 256 * 1024;
/// Data at least this large, with nothing buffered before it, is written from where it is.
const DIRECT_WRITE: usize = 64 * 1024;
/// Bytes a download writes before it has the kernel start putting them on disk (see
/// `Partial::write_back`).
const WRITEBACK_WINDOW: u64 = 8 * 1024 * 1024;
/// How often (in bytes written) a download looks at the free space (`Partial::keep_free`): a
/// statvfs(2) per MiB costs nothing next to the writes, and a body with no announced length
/// overshoots `archive.min_free` by at most this much.
const SPACE_CHECK: u64 = 1024 * 1024;
/// A sidecar or resume record larger than this was not written by us.
const SMALL_FILE: u64 = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("archive directory {path}: {source}")]
    Dir { path: PathBuf, source: io::Error },
    #[error("archive file {path}: {source}")]
    File { path: PathBuf, source: io::Error },
    #[error("{path} is not a whole MP4 file: {why}")]
    Incomplete { path: PathBuf, why: String },
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

/// A file that made it into the archive.
#[derive(Debug, Clone, PartialEq)]
pub struct Published {
    pub path: PathBuf,
    pub sha256: String,
    pub bytes: u64,
    /// The status object kept beside it (`<id>.json`), when there is one.
    pub metadata: Option<String>,
}

/// What sits at a video's final path before it is downloaded.
#[derive(Debug, PartialEq)]
pub enum Existing {
    /// Nothing (or a planted symlink, which the publish renames over without following).
    Absent,
    /// A whole MP4 that an earlier run published but did not record: taken as it is.
    Adopted(Published),
    /// A regular file that is not a whole MP4 (empty, short, something else): renamed aside to
    /// this hidden path, never deleted (it may be someone's), and the video downloaded afresh.
    SetAside { path: PathBuf, why: String },
    /// Not a regular file (a directory, a socket): nothing of ours can go there.
    Blocked(String),
}

#[derive(Debug, Clone)]
pub struct Archive {
    dir: PathBuf,
    /// Disk space promised to downloads in flight and not yet written.
    reservations: Arc<AtomicU64>,
}

impl Archive {
    /// Creates the directory if needed and proves it is writable, so a bad `archive.dir` is
    /// reported at start, not at the first finished download.
    pub fn open(dir: &Path) -> Result<Archive, ArchiveError> {
        let err = |source| ArchiveError::Dir {
            path: dir.to_owned(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(err)?;
        let dir = dir.canonicalize().map_err(err)?;
        let probe = dir.join(format!(".hingnetd-probe-{}", std::process::id()));
        File::create(&probe).map_err(err)?;
        std::fs::remove_file(&probe).map_err(err)?;
        Ok(Archive {
            dir,
            reservations: Arc::default(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Why new downloads should wait, if they should: the directory is gone, or the free space
    /// is below `min_free` (`archive.min_free`).
    pub fn storage_problem(&self, min_free: u64) -> Option<String> {
        match std::fs::metadata(&self.dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Some(format!(
                    "archive directory {} is not a directory",
                    self.dir.display()
                ));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Some(format!(
                    "archive directory {} is missing (recreate it, or restart hingnetd to create it)",
                    self.dir.display()
                ));
            }
            Err(e) => return Some(format!("archive directory {}: {e}", self.dir.display())),
        }
        match available_bytes(&self.dir) {
            Ok(free) if free < min_free => Some(format!(
                "disk short: {free} bytes free in {}, below archive.min_free ({min_free})",
                self.dir.display()
            )),
            Ok(_) => None,
            Err(e) => Some(format!("archive directory {}: {e}", self.dir.display())),
        }
    }

    pub fn final_path(&self, id: &VideoId) -> PathBuf {
        self.dir.join(format!("{id}.mp4"))
    }

    pub fn partial_path(&self, id: &VideoId) -> PathBuf {
        self.dir.join(format!(".{id}.mp4.part"))
    }

    /// Beside the partial: its resume record (see `ResumeRecord`).
    fn validator_path(&self, id: &VideoId) -> PathBuf {
        self.dir.join(format!(".{id}.mp4.part.validator"))
    }

    /// Beside the video: what the API said about it (the status object, without any URL
    /// query string).
    pub fn sidecar_path(&self, id: &VideoId) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    /// Looks at the video's final path before downloading: a whole MP4 there means an earlier
    /// run published it but died before the row said so (hash it and take it); anything else
    /// that is a regular file is renamed aside; anything that is not a regular file blocks the
    /// video.
    pub fn existing(&self, id: &VideoId) -> Result<Existing, ArchiveError> {
        let path = self.final_path(id);
        let ferr = |source| ArchiveError::File {
            path: path.clone(),
            source,
        };
        let meta = match std::fs::symlink_metadata(&path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Existing::Absent),
            Err(source) => return Err(ArchiveError::File { path, source }),
            Ok(m) => m,
        };
        let kind = meta.file_type();
        if kind.is_symlink() {
            // Not ours, and not followed: publishing renames over the link itself.
            tracing::warn!(path = %path.display(), "a symlink sits at the archive path; it will be replaced, not followed");
            return Ok(Existing::Absent);
        }
        if !kind.is_file() {
            let what = if kind.is_dir() {
                "a directory"
            } else {
                "not a regular file"
            };
            return Ok(Existing::Blocked(format!(
                "the archive path {} is {what}; move it away, then `hingnetd retry {id}`",
                path.display()
            )));
        }
        let mut file = match open_nofollow(&path, false) {
            Ok(f) => f,
            // Gone meanwhile, or replaced by a link: nothing to take.
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ELOOP)) => {
                return Ok(Existing::Absent);
            }
            Err(source) => return Err(ArchiveError::File { path, source }),
        };
        let bytes = file.metadata().map_err(ferr)?.len();
        let whole = match hash_prefix(&mut file, bytes).map_err(ferr)? {
            None => Err("it shrank while it was read".to_owned()),
            Some(_) if bytes == 0 => Err("it is empty".to_owned()),
            Some((hasher, _)) => mp4::check(&file, bytes).map(|()| hasher),
        };
        let hasher = match whole {
            Ok(h) => h,
            Err(why) => {
                let aside = self.set_aside(id)?;
                tracing::warn!(video_id = %id, path = %path.display(), renamed_to = %aside.display(), why = %why, "a file at the archive path is not a whole MP4: renamed aside (not deleted); downloading the video again");
                return Ok(Existing::SetAside { path: aside, why });
            }
        };
        // The run that renamed it may have died before (or failed at) the fsyncs: make the
        // file and its name durable before a row says done. If that fails, the file is not
        // trusted (a second fsync could report success over lost pages): it goes.
        if let Err(e) = file
            .sync_all()
            .map_err(ferr)
            .and_then(|()| sync_dir(&self.dir))
        {
            let _ = remove_if_exists(&path);
            return Err(e);
        }
        Ok(Existing::Adopted(Published {
            path,
            sha256: hex(&hasher.finalize()),
            bytes,
            metadata: self.read_sidecar(id),
        }))
    }

    /// Renames whatever is at the final path to `.<id>.mp4.replaced-<UTC time>`, a name no
    /// other file has, and makes the rename durable.
    pub fn set_aside(&self, id: &VideoId) -> Result<PathBuf, ArchiveError> {
        let from = self.final_path(id);
        let stamp = utc_stamp(SystemTime::now());
        let mut n = 1;
        let to = loop {
            let name = match n {
                1 => format!(".{id}.mp4.replaced-{stamp}"),
                n => format!(".{id}.mp4.replaced-{stamp}-{n}"),
            };
            let to = self.dir.join(name);
            if std::fs::symlink_metadata(&to).is_err() {
                break to;
            }
            n += 1;
        };
        std::fs::rename(&from, &to).map_err(|source| ArchiveError::File { path: from, source })?;
        sync_dir(&self.dir)?;
        Ok(to)
    }

    /// The sidecar an earlier run left beside an adopted video, if it is one of ours.
    fn read_sidecar(&self, id: &VideoId) -> Option<String> {
        let file = open_nofollow(&self.sidecar_path(id), false).ok()?;
        let mut text = String::new();
        file.take(SMALL_FILE).read_to_string(&mut text).ok()?;
        serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .filter(serde_json::Value::is_object)
            .map(|_| text)
    }

    /// Whether a live process is writing this video's partial file (it holds the file's lock).
    pub fn partial_in_use(&self, id: &VideoId) -> bool {
        let Ok(file) = open_nofollow(&self.partial_path(id), false) else {
            return false;
        };
        matches!(file.try_lock(), Err(std::fs::TryLockError::WouldBlock))
    }

    /// Deletes a published video and its sidecar (`hingnetd remove --delete-file`): regular
    /// files only; a directory or device planted there is not ours to delete.
    pub fn delete_published(&self, id: &VideoId) -> Result<(), ArchiveError> {
        for path in [self.final_path(id), self.sidecar_path(id)] {
            let file = |source| ArchiveError::File {
                path: path.clone(),
                source,
            };
            match std::fs::symlink_metadata(&path) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(file(e)),
                Ok(m) if !m.file_type().is_file() => {
                    return Err(file(io::Error::other("not a regular file; left as it is")));
                }
                Ok(_) => remove_if_exists(&path).map_err(file)?,
            }
        }
        sync_dir(&self.dir)
    }

    /// Removes what a download of this video left (its partial and resume record) once its
    /// row has failed: nothing will resume it. A partial another process holds
    /// (a `hingnetd fetch` that has just started) is left to it.
    pub fn remove_leftovers(&self, id: &VideoId) -> Result<(), ArchiveError> {
        let path = self.partial_path(id);
        match open_nofollow(&path, false) {
            Ok(file) => match file.try_lock() {
                Err(std::fs::TryLockError::WouldBlock) => return Ok(()),
                // Held while removing, so that no one starts on it in between.
                _ => remove_if_exists(&path).map_err(|source| ArchiveError::File {
                    path: path.clone(),
                    source,
                })?,
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            // A planted link, or an unreadable file: still not ours to keep.
            Err(_) => remove_if_exists(&path).map_err(|source| ArchiveError::File {
                path: path.clone(),
                source,
            })?,
        }
        let p = self.validator_path(id);
        remove_if_exists(&p).map_err(|source| ArchiveError::File { path: p, source })
    }

    /// Opens the video's partial file, creating it or picking up what an earlier attempt left.
    /// Only the bytes covered by the resume record's checkpoint are kept, and only if they
    /// still hash to what was recorded; they are re-hashed so the final SHA-256 covers the
    /// whole file.
    pub fn begin(&self, id: &VideoId) -> Result<Partial, ArchiveError> {
        let path = self.partial_path(id);
        let ferr = |source| ArchiveError::File {
            path: path.clone(),
            source,
        };
        let mut file = open_own(&path).map_err(ferr)?;
        // Held for as long as the download runs (the lock goes with the file): it tells other
        // processes the partial has a live writer, and the kernel drops it if that writer dies.
        // `partial_in_use` takes the lock for an instant to test it: try a little longer
        // before calling the file busy.
        let mut tries = 0;
        loop {
            match file.try_lock() {
                Ok(()) => break,
                Err(std::fs::TryLockError::WouldBlock) if tries < 20 => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                Err(std::fs::TryLockError::WouldBlock) => return Err(ArchiveError::Busy { path }),
                Err(std::fs::TryLockError::Error(e)) => return Err(ferr(e)),
            }
        }
        let record_path = self.validator_path(id);
        let rerr = |source| ArchiveError::File {
            path: record_path.clone(),
            source,
        };
        let mut record = open_own(&record_path).map_err(rerr)?;
        let mut text = String::new();
        // Unreadable as text is the same as absent: nothing is resumed. A real record is a few
        // hundred bytes; a planted huge file is not read whole.
        let _ = (&mut record).take(4096).read_to_string(&mut text);
        let record_len = text.len() as u64;
        let parsed = ResumeRecord::parse(&text);
        // What earlier downloads of this video were refused for, whatever happens to the bytes.
        let rejected = parsed.as_ref().and_then(|r| r.rejected.clone());
        let on_disk = file.metadata().map_err(ferr)?.len();
        let mut resumed = None;
        if on_disk > 0 {
            match parsed {
                Some(r) if r.len > 0 && r.len <= on_disk => {
                    match hash_prefix(&mut file, r.len).map_err(ferr)? {
                        Some((hasher, head))
                            if hex(&hasher.clone().finalize()) == r.sha256
                                && (head.len() < 8 || mp4::looks_like_mp4(&head)) =>
                        {
                            if r.len < on_disk {
                                tracing::info!(path = %path.display(), kept = r.len, dropped = on_disk - r.len, "dropping partial bytes written after the last checkpoint");
                            }
                            resumed = Some((r, hasher, head));
                        }
                        _ => {
                            tracing::warn!(path = %path.display(), "partial file changed since it was written; starting over")
                        }
                    }
                }
                _ => {
                    tracing::warn!(path = %path.display(), bytes = on_disk, "partial file has no usable checkpoint; starting over")
                }
            }
        }
        let (validator, total, written, hasher, head) = match resumed {
            Some((r, hasher, head)) => (r.validator, r.total, r.len, hasher, head),
            None => (None, None, 0, Sha256::new(), Vec::with_capacity(8)),
        };
        file.set_len(written).map_err(ferr)?;
        file.seek(SeekFrom::Start(written)).map_err(ferr)?;
        let mut partial = Partial {
            validator,
            total,
            rejected,
            record,
            record_path,
            record_len,
            file,
            // Allocated on first use: a download whose chunks are all `DIRECT_WRITE` or
            // larger never needs it.
            buf: Vec::new(),
            hasher,
            written,
            submitted: written,
            previous: written,
            settled: written,
            writeback: true,
            head,
            path,
            final_path: self.final_path(id),
            sidecar_path: self.sidecar_path(id),
            dir: self.dir.clone(),
            reserved: 0,
            reservations: self.reservations.clone(),
            floor: None,
            space_checked: written,
        };
        if written == 0 {
            partial.checkpoint()?;
        }
        Ok(partial)
    }
}

/// What the archive's hidden files belong to, by name: the video ID of a partial
/// (`.<id>.mp4.part`) or its resume record (`...part.validator`); `None` for any other name (a
/// set-aside `.replaced-` file included).
pub fn leftover_of(name: &str) -> Option<&str> {
    let rest = name.strip_prefix('.')?;
    [".mp4.part.validator", ".mp4.part"]
        .iter()
        .find_map(|suffix| rest.strip_suffix(suffix))
        .filter(|id| VideoId::parse(id).is_ok())
}

/// `YYYYMMDDTHHMMSSZ` (UTC), for file names: sorts in time order, no characters a shell or a
/// file manager minds.
fn utc_stamp(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = ((secs / 86400) as i64, secs % 86400);
    // Howard Hinnant's days-to-civil, for the proleptic Gregorian calendar.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}{month:02}{day:02}T{:02}{:02}{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Free space the filesystem gives an unprivileged writer, in bytes.
pub fn available_bytes(dir: &Path) -> io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: statvfs(3) fills the zeroed struct and reads only the NUL-terminated path.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((s.f_bavail as u64).saturating_mul(s.f_frsize as u64))
}

fn sync_dir(dir: &Path) -> Result<(), ArchiveError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| ArchiveError::Dir {
            path: dir.to_owned(),
            source,
        })
}

fn remove_if_exists(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Opens without following a symlink planted at the last component: the archive must never be
/// tricked into writing or reading outside itself.
fn open_nofollow(path: &Path, write: bool) -> io::Result<File> {
    let mut o = OpenOptions::new();
    o.read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC);
    if write {
        o.write(true).create(true).truncate(false).mode(0o640);
    }
    o.open(path)
}

/// Opens (creating) one of our own hidden files. Those names are ours: a symlink found there
/// was planted, and is removed rather than followed.
fn open_own(path: &Path) -> io::Result<File> {
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink()) {
        tracing::warn!(path = %path.display(), "removed a symlink planted at a partial-file path (not followed)");
        std::fs::remove_file(path)?;
    }
    open_nofollow(path, true)
}

fn fill_head(head: &mut Vec<u8>, data: &[u8]) {
    if head.len() < 8 {
        let take = (8 - head.len()).min(data.len());
        head.extend_from_slice(&data[..take]);
    }
}

/// The resume record beside a partial file: the server's validator for its bytes, and a
/// checkpoint (a length and the SHA-256 of that many leading bytes) rewritten after every
/// write to the file. A resume trusts exactly the checkpointed bytes, after re-hashing them:
/// bytes changed on disk, or written after the last checkpoint by a process that died, are
/// never spliced into a published file. It also remembers how many whole downloads of the
/// video were refused as incomplete MP4s, and the last one's SHA-256, so that the rule "the
/// same incomplete bytes twice are what the API has" holds across attempts and restarts.
#[derive(Debug, Default, PartialEq)]
struct ResumeRecord {
    validator: Option<String>,
    /// The whole file's size, as the response that started it announced it.
    total: Option<u64>,
    len: u64,
    sha256: String,
    /// Whole downloads refused so far, and the SHA-256 of the last one.
    rejected: Option<(u32, String)>,
}

const RECORD_MAGIC: &str = "hingnetd-partial 1";

fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

impl ResumeRecord {
    fn render(&self) -> String {
        let mut text = format!(
            "{RECORD_MAGIC}\nvalidator {}\ntotal {}\ncheckpoint {} {}\n",
            self.validator.as_deref().unwrap_or(""),
            self.total.map_or("-".to_owned(), |t| t.to_string()),
            self.len,
            self.sha256
        );
        if let Some((n, sha)) = &self.rejected {
            text.push_str(&format!("rejected {n} {sha}\n"));
        }
        text
    }

    fn parse(text: &str) -> Option<ResumeRecord> {
        let mut lines = text.lines();
        (lines.next()? == RECORD_MAGIC).then_some(())?;
        let validator = lines.next()?.strip_prefix("validator ")?;
        let total = match lines.next()?.strip_prefix("total ")? {
            "-" => None,
            t => Some(t.parse().ok()?),
        };
        let (len, sha256) = lines.next()?.strip_prefix("checkpoint ")?.split_once(' ')?;
        let sha256 = is_sha256_hex(sha256).then(|| sha256.to_owned())?;
        // Optional: records written before it existed have no such line.
        let rejected = lines
            .next()
            .and_then(|l| l.strip_prefix("rejected "))
            .and_then(|l| l.split_once(' '))
            .and_then(|(n, sha)| Some((n.parse().ok()?, sha.to_owned())))
            .filter(|(_, sha)| is_sha256_hex(sha));
        Some(ResumeRecord {
            validator: Some(validator.to_owned()).filter(|v| !v.is_empty()),
            total,
            len: len.parse().ok()?,
            sha256,
            rejected,
        })
    }
}

/// Reads the first `n` bytes of `file`: their hash and head, or `None` if the file is shorter.
fn hash_prefix(file: &mut File, n: u64) -> io::Result<Option<(Sha256, Vec<u8>)>> {
    file.seek(SeekFrom::Start(0))?;
    let mut hasher = Sha256::new();
    let mut head = Vec::with_capacity(8);
    let mut left = n;
    let mut buf = vec![0u8; WRITE_BUFFER];
    while left > 0 {
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let got = file.read(&mut buf[..want])?;
        if got == 0 {
            return Ok(None);
        }
        hasher.update(&buf[..got]);
        fill_head(&mut head, &buf[..got]);
        left -= got as u64;
    }
    Ok(Some((hasher, head)))
}

/// A download in progress: the hidden partial file, hashed as it is written.
pub struct Partial {
    /// What identifies the server's version of the bytes already in the file, for `If-Range`.
    validator: Option<String>,
    /// The file's size as announced when its first byte was received, if it was.
    total: Option<u64>,
    /// Whole downloads refused as incomplete MP4s, and the last one's SHA-256.
    rejected: Option<(u32, String)>,
    record: File,
    record_path: PathBuf,
    /// Length of the record file's current contents (rewritten in place).
    record_len: u64,
    file: File,
    /// Received bytes not yet written: large writes cost fewer syscalls and checkpoints.
    buf: Vec<u8>,
    /// Covers exactly the bytes written to the file (`written`).
    hasher: Sha256,
    written: u64,
    /// The file up to here has been handed to the kernel's writeback (`write_back`).
    submitted: u64,
    /// Where the submission before that one ended.
    previous: u64,
    /// The file up to here is on disk and out of the page cache.
    settled: u64,
    /// Off when the filesystem does not support `sync_file_range`.
    writeback: bool,
    head: Vec<u8>,
    path: PathBuf,
    final_path: PathBuf,
    sidecar_path: PathBuf,
    dir: PathBuf,
    /// Disk space promised to this download and not yet written (see `reserve`).
    reserved: u64,
    reservations: Arc<AtomicU64>,
    /// `archive.min_free` while writing (see `keep_free`).
    floor: Option<u64>,
    /// `written` when the free space was last looked at.
    space_checked: u64,
}

/// Proof that a partial's bytes were checked to be a whole MP4 (`Partial::check_whole`): the
/// only way to give a file a final name with a `done` row behind it.
#[derive(Debug)]
pub struct Whole {
    len: u64,
}

impl Partial {
    /// Bytes received so far: where a resumed request starts.
    pub fn len(&self) -> u64 {
        self.written + self.buf.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn err(&self, source: io::Error) -> ArchiveError {
        ArchiveError::File {
            path: self.path.clone(),
            source,
        }
    }

    pub fn validator(&self) -> Option<&str> {
        self.validator.as_deref()
    }

    /// Rewrites the resume record in place: one small `pwrite`, cheap enough for every flush.
    fn checkpoint(&mut self) -> Result<(), ArchiveError> {
        use std::os::unix::fs::FileExt;
        let text = ResumeRecord {
            validator: self.validator.clone(),
            total: self.total,
            len: self.written,
            sha256: hex(&self.hasher.clone().finalize()),
            rejected: self.rejected.clone(),
        }
        .render();
        let r = self.record.write_all_at(text.as_bytes(), 0).and_then(|()| {
            if (text.len() as u64) < self.record_len {
                self.record.set_len(text.len() as u64)?;
            }
            Ok(())
        });
        r.map_err(|source| ArchiveError::File {
            path: self.record_path.clone(),
            source,
        })?;
        self.record_len = text.len() as u64;
        Ok(())
    }

    /// The whole file's size, as the response that started the file announced it.
    pub fn total(&self) -> Option<u64> {
        self.total
    }

    /// Records which version of the file is being written from byte zero: its validator and
    /// its announced size. Written before the body, so it survives a kill as well as a park.
    pub fn set_version(
        &mut self,
        validator: Option<&str>,
        total: Option<u64>,
    ) -> Result<(), ArchiveError> {
        // A header value cannot hold a line break; one here would corrupt the record.
        self.validator = validator
            .filter(|v| !v.contains(['\n', '\r']))
            .map(str::to_owned);
        self.total = total;
        self.checkpoint()
    }

    /// Starts over from byte zero (the server would not resume, or sent something else).
    pub fn restart(&mut self) -> Result<(), ArchiveError> {
        self.buf.clear();
        let f = &mut self.file;
        let r = f
            .set_len(0)
            .and_then(|_| f.seek(SeekFrom::Start(0)).map(drop));
        r.map_err(|e| self.err(e))?;
        self.hasher = Sha256::new();
        self.head.clear();
        self.written = 0;
        self.submitted = 0;
        self.previous = 0;
        self.settled = 0;
        self.space_checked = 0;
        self.set_version(None, None)
    }

    /// While writing, stop with `ArchiveError::DiskShort` once the free space, less what other
    /// downloads in flight were promised, falls below `min_free` (`archive.min_free`). A body
    /// without a length reserved nothing up front, and another process may fill the disk.
    pub fn keep_free(&mut self, min_free: u64) {
        self.floor = Some(min_free).filter(|m| *m > 0);
    }

    /// Takes the next bytes of the body. `ArchiveError::DiskShort` (see `keep_free`) comes only
    /// from here, after the bytes are written and checkpointed: the flushes that finish a
    /// file (`park`, `check_whole`) never refuse it for the disk, so they never cost it.
    pub fn write(&mut self, data: &[u8]) -> Result<(), ArchiveError> {
        fill_head(&mut self.head, data);
        if self.buf.len() + data.len() > WRITE_BUFFER {
            self.flush()?;
        }
        if self.buf.is_empty() && data.len() >= DIRECT_WRITE {
            // Large enough on its own: written from where it is, not copied first.
            self.write_out(data)?;
        } else {
            self.buf.extend_from_slice(data);
        }
        self.check_space()
    }

    /// Writes out the buffer, then checkpoints the resume record to cover it.
    fn flush(&mut self) -> Result<(), ArchiveError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let buf = std::mem::take(&mut self.buf);
        let r = self.write_out(&buf);
        self.buf = buf;
        self.buf.clear();
        r
    }

    fn write_out(&mut self, data: &[u8]) -> Result<(), ArchiveError> {
        let r = self.file.write_all(data);
        r.map_err(|e| self.err(e))?;
        self.hasher.update(data);
        let n = data.len() as u64;
        self.written += n;
        let done = n.min(self.reserved);
        self.reserved -= done;
        self.reservations.fetch_sub(done, Ordering::Relaxed);
        self.checkpoint()?;
        self.write_back()
    }

    /// See `keep_free`. The bytes written so far are checkpointed: the file can be resumed.
    fn check_space(&mut self) -> Result<(), ArchiveError> {
        let Some(min_free) = self.floor else {
            return Ok(());
        };
        if self.written - self.space_checked < SPACE_CHECK {
            return Ok(());
        }
        self.space_checked = self.written;
        let available = available_bytes(&self.dir).map_err(|source| ArchiveError::Dir {
            path: self.dir.clone(),
            source,
        })?;
        // Our own promise shrinks as we write, and so does the free space: what is left of it
        // is still ours to write.
        let free = available.saturating_sub(self.reservations.load(Ordering::Relaxed));
        if free < min_free {
            return Err(ArchiveError::DiskShort {
                dir: self.dir.clone(),
                free,
                min_free,
            });
        }
        Ok(())
    }

    /// Streams the file to disk while it downloads instead of all at the final fsync: every
    /// `WRITEBACK_WINDOW` bytes, starts writeback of the new window, waits for the window two
    /// before it and drops that from the page cache. So the disk works while the network does
    /// (a large file costs about the disk's time, not network + disk), with two windows queued
    /// so it never waits for us; a download holds at most three windows of dirty pages; and
    /// archiving terabytes does not evict the server's cache.
    ///
    /// Any error while waiting is a write error: the kernel reports a failed writeback once,
    /// to whoever waits first, so the final fsync might never hear of it.
    fn write_back(&mut self) -> Result<(), ArchiveError> {
        use std::os::fd::AsRawFd;
        if !self.writeback || self.written - self.submitted < WRITEBACK_WINDOW {
            return Ok(());
        }
        let fd = self.file.as_raw_fd();
        let range = |from: u64, to: u64| (from as libc::off64_t, (to - from) as libc::off64_t);
        let (off, len) = range(self.submitted, self.written);
        // SAFETY: sync_file_range(2) on our own open descriptor; it touches no user memory.
        if unsafe { libc::sync_file_range(fd, off, len, libc::SYNC_FILE_RANGE_WRITE) } != 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                // Not supported here (some FUSE or network filesystems): the fsync at publish
                // does all the work, as it would without this.
                Some(libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP | libc::ESPIPE) => {
                    self.writeback = false;
                    Ok(())
                }
                _ => Err(self.err(e)),
            };
        }
        if self.previous > self.settled {
            let (off, len) = range(self.settled, self.previous);
            let wait = libc::SYNC_FILE_RANGE_WAIT_BEFORE
                | libc::SYNC_FILE_RANGE_WRITE
                | libc::SYNC_FILE_RANGE_WAIT_AFTER;
            // SAFETY: as above.
            if unsafe { libc::sync_file_range(fd, off, len, wait) } != 0 {
                return Err(self.err(io::Error::last_os_error()));
            }
            // Advice only: a failure costs page cache, nothing else.
            // SAFETY: posix_fadvise(2) on our own descriptor.
            unsafe { libc::posix_fadvise(fd, off, len, libc::POSIX_FADV_DONTNEED) };
            self.settled = self.previous;
        }
        self.previous = self.submitted;
        self.submitted = self.written;
        Ok(())
    }

    /// Checks that the rest of a `total`-byte file fits on the disk while keeping `min_free`
    /// bytes free, counting the space other downloads in flight have been promised, and
    /// promises it to this one.
    pub fn reserve(&mut self, total: u64, min_free: u64) -> Result<(), ArchiveError> {
        self.reservations
            .fetch_sub(self.reserved, Ordering::Relaxed);
        self.reserved = 0;
        let need = total.saturating_sub(self.len());
        let available = available_bytes(&self.dir).map_err(|source| ArchiveError::Dir {
            path: self.dir.clone(),
            source,
        })?;
        let promised = self.reservations.fetch_add(need, Ordering::Relaxed);
        let free = available.saturating_sub(promised);
        if free < need.saturating_add(min_free) {
            self.reservations.fetch_sub(need, Ordering::Relaxed);
            return Err(ArchiveError::NoSpace {
                dir: self.dir.clone(),
                need,
                free,
                min_free,
            });
        }
        self.reserved = need;
        Ok(())
    }

    /// Whether what has been written so far could be the start of an MP4 (undecided below
    /// 8 bytes).
    pub fn head_is_plausible(&self) -> bool {
        self.head.len() < 8 || mp4::looks_like_mp4(&self.head)
    }

    /// Writes out the buffer so a later attempt can resume from every byte received. An empty
    /// file is removed instead: a video that is not ready yet leaves nothing behind. A write
    /// error discards the file: bytes that may not have reached it are not resumed from.
    pub fn park(mut self) -> Result<u64, ArchiveError> {
        if let Err(e) = self.flush() {
            self.remove_files();
            return Err(e);
        }
        let written = self.written;
        if written == 0 && self.rejected.is_none() {
            self.discard()?;
        }
        Ok(written)
    }

    fn remove_files(&self) {
        let _ = remove_if_exists(&self.path);
        let _ = remove_if_exists(&self.record_path);
    }

    /// Removes the partial file: what it holds will never be needed.
    pub fn discard(self) -> Result<(), ArchiveError> {
        remove_if_exists(&self.path).map_err(|e| self.err(e))?;
        remove_if_exists(&self.record_path).map_err(|source| ArchiveError::File {
            path: self.record_path.clone(),
            source,
        })
    }

    /// Flushes, then checks that the bytes are a whole MP4 (`mp4::check`): `Ok(Err(why))` if
    /// they are not. A flush error removes the file, as every write error does.
    pub fn check_whole(&mut self) -> Result<Result<Whole, String>, ArchiveError> {
        if let Err(e) = self.flush() {
            self.remove_files();
            return Err(e);
        }
        Ok(mp4::check(&self.file, self.written).map(|()| Whole { len: self.written }))
    }

    /// The SHA-256 of the bytes written (call after `check_whole`, which flushes).
    pub fn sha256(&self) -> String {
        hex(&self.hasher.clone().finalize())
    }

    /// How many whole downloads of this video were refused as incomplete, and the SHA-256 of
    /// the last one.
    pub fn rejections(&self) -> Option<(u32, &str)> {
        self.rejected.as_ref().map(|(n, sha)| (*n, sha.as_str()))
    }

    /// Refuses these bytes as an incomplete MP4: remembers their SHA-256 (in the resume record,
    /// so it outlives this attempt) and starts over from byte zero. Returns the refusals so far.
    pub fn reject(&mut self) -> Result<u32, ArchiveError> {
        let n = self.rejected.as_ref().map_or(0, |(n, _)| *n) + 1;
        self.rejected = Some((n, self.sha256()));
        self.restart()?;
        Ok(n)
    }

    /// The publish sequence for a checked file: the sidecar (if any) is written and renamed
    /// into place first, then fsync the video → rename → fsync the directory, once for both
    /// names. Any error on the video means it is not trusted: it is removed (after a failed
    /// fsync the kernel may have dropped the very pages a retry would read back), and the
    /// caller downloads again rather than marking anything done.
    pub fn publish(self, whole: Whole, sidecar: Option<&str>) -> Result<Published, ArchiveError> {
        if whole.len != self.len() {
            // Written after the check: check again.
            self.remove_files();
            return Err(ArchiveError::Incomplete {
                path: self.path.clone(),
                why: "bytes were written after the check".into(),
            });
        }
        self.install(sidecar)
    }

    /// Gives an incomplete MP4 its final name as it is, with the same care as `publish`: the
    /// API served these very bytes twice, so they are what there is, and they are kept; the
    /// row that records them is `failed`, never `done`.
    pub fn keep_incomplete(self, sidecar: Option<&str>) -> Result<Published, ArchiveError> {
        self.install(sidecar)
    }

    fn install(mut self, sidecar: Option<&str>) -> Result<Published, ArchiveError> {
        if let Err(e) = self.flush() {
            self.remove_files();
            return Err(e);
        }
        if let Err(e) = self.file.sync_all() {
            self.remove_files();
            return Err(self.err(e));
        }
        // The video first: a crash between the two renames leaves a video without its sidecar
        // (which the row's metadata column still holds), never a complete partial without its
        // resume record.
        if let Err(e) = std::fs::rename(&self.path, &self.final_path) {
            self.remove_files();
            return Err(self.err(e));
        }
        let metadata = sidecar.map(|text| {
            if let Err(e) = self.record_to_sidecar(text) {
                // The status object is in the row too: a sidecar that cannot be written costs
                // the video nothing.
                tracing::warn!(path = %self.sidecar_path.display(), error = %e, "cannot write the metadata file");
            }
            text.to_owned()
        });
        // Only a leftover now, unless it became the sidecar; a failure to remove it costs
        // nothing.
        let _ = remove_if_exists(&self.record_path);
        if let Err(e) = sync_dir(&self.dir) {
            // The names may not be durable: take them back so that no row says done over them.
            let _ = remove_if_exists(&self.final_path);
            if metadata.is_some() {
                let _ = remove_if_exists(&self.sidecar_path);
            }
            return Err(e);
        }
        Ok(Published {
            path: self.final_path.clone(),
            sha256: self.sha256(),
            bytes: self.written,
            metadata,
        })
    }

    /// `<id>.json`, atomically. The resume record has served its purpose once the video has
    /// its name: it is rewritten with the sidecar's text, fsynced, and renamed into place (the
    /// directory fsync that follows in `install` makes the name durable with the video's). A
    /// file of its own would cost every video a third inode, where two suffice.
    fn record_to_sidecar(&mut self, text: &str) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        if std::fs::symlink_metadata(&self.sidecar_path).is_ok_and(|m| m.is_dir()) {
            return Err(io::Error::other("a directory is in the way"));
        }
        self.record.set_len(0)?;
        self.record.write_all_at(text.as_bytes(), 0)?;
        self.record.sync_all()?;
        std::fs::rename(&self.record_path, &self.sidecar_path)
    }
}

impl Drop for Partial {
    fn drop(&mut self) {
        self.reservations
            .fetch_sub(self.reserved, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mp4::sample::whole as mp4;

    proptest::proptest! {
        /// No string, hostile or not, that passes the ID check can name a file outside the
        /// archive directory, or anything but a plain file directly in it.
        #[test]
        fn no_id_can_leave_the_archive(
            s in proptest::prop_oneof![
                proptest::arbitrary::any::<String>(),
                "(\\.\\.|/|\\\\|\\x00|%2[eEfF]|[\\x00-\\x1f]|\\.|[A-Za-z0-9_-]|\\p{Cyrillic}|[ \\t\\n\\r]){0,140}",
            ]
        ) {
            if let Ok((id, _)) = VideoId::from_queued(&s) {
                let a = Archive {
                    dir: PathBuf::from("/srv/archive"),
                    reservations: Arc::default(),
                };
                for p in [
                    a.final_path(&id),
                    a.partial_path(&id),
                    a.validator_path(&id),
                    a.sidecar_path(&id),
                ] {
                    proptest::prop_assert_eq!(p.parent(), Some(Path::new("/srv/archive")));
                    let name = p.file_name().unwrap().to_str().unwrap();
                    proptest::prop_assert!(!name.contains('/') && name != "." && name != "..");
                    proptest::prop_assert!(!name.bytes().any(|b| b.is_ascii_whitespace()));
                }
            }
        }
    }

    /// The daemon's way to publish: check, then publish with the proof.
    fn publish(mut p: Partial, sidecar: Option<&str>) -> Result<Published, ArchiveError> {
        let whole = p.check_whole()?.expect("a whole MP4");
        p.publish(whole, sidecar)
    }

    #[test]
    fn write_resume_publish() {
        let dir = tempfile::tempdir().unwrap();
        let a = Archive::open(dir.path()).unwrap();
        let id = VideoId::parse("video_1").unwrap();
        let data = mp4(1_000_000);
        let mut p = a.begin(&id).unwrap();
        p.write(&data[..300_000]).unwrap();
        assert_eq!(p.park().unwrap(), 300_000);
        let mut p = a.begin(&id).unwrap();
        assert_eq!(p.len(), 300_000);
        p.write(&data[300_000..]).unwrap();
        let meta = r#"{"id":"video_1","model":"sora-2"}"#;
        let pubd = publish(p, Some(meta)).unwrap();
        assert_eq!(pubd.sha256, hex(&Sha256::digest(&data)));
        assert_eq!(std::fs::read(&pubd.path).unwrap(), data);
        assert_eq!(std::fs::read_to_string(a.sidecar_path(&id)).unwrap(), meta);
        assert!(!a.partial_path(&id).exists());
        assert!(!a.validator_path(&id).exists());
        // Found again by a later run, with its sidecar.
        assert_eq!(a.existing(&id).unwrap(), Existing::Adopted(pubd));
    }

    #[test]
    fn refuses_incomplete_files_and_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let a = Archive::open(dir.path()).unwrap();
        let id = VideoId::parse("v").unwrap();
        let mut p = a.begin(&id).unwrap();
        p.write(b"{\"error\": \"nope\"}").unwrap();
        assert!(!p.head_is_plausible());
        assert!(p.check_whole().unwrap().is_err());
        drop(p);
        assert!(!a.final_path(&id).exists());

        let outside = dir.path().join("outside");
        std::fs::write(&outside, b"keep").unwrap();
        let id2 = VideoId::parse("w").unwrap();
        std::os::unix::fs::symlink(&outside, a.partial_path(&id2)).unwrap();
        std::os::unix::fs::symlink(&outside, a.validator_path(&id2)).unwrap();
        std::os::unix::fs::symlink(&outside, a.final_path(&id2)).unwrap();
        // Planted links are removed or replaced, never written through.
        assert_eq!(a.existing(&id2).unwrap(), Existing::Absent);
        let mut p = a.begin(&id2).unwrap();
        p.write(&mp4(1000)).unwrap();
        publish(p, Some("{}")).unwrap();
        assert_eq!(std::fs::read(&outside).unwrap(), b"keep");
        assert!(
            std::fs::symlink_metadata(a.final_path(&id2))
                .unwrap()
                .is_file()
        );
    }

    #[test]
    fn what_sits_at_the_final_path_is_adopted_set_aside_or_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let a = Archive::open(dir.path()).unwrap();
        let whole = mp4(5000);
        let mut cut = whole.clone();
        cut.truncate(3000);
        for (name, bytes) in [
            ("empty", Vec::new()),
            ("text", b"not a video at all\n".to_vec()),
            ("cut", cut),
        ] {
            let id = VideoId::parse(name).unwrap();
            std::fs::write(a.final_path(&id), &bytes).unwrap();
            let Existing::SetAside { path, why } = a.existing(&id).unwrap() else {
                panic!("{name}: not set aside");
            };
            assert!(!a.final_path(&id).exists(), "{name}");
            assert_eq!(std::fs::read(&path).unwrap(), bytes, "{name}: kept whole");
            let file = path.file_name().unwrap().to_str().unwrap();
            assert!(
                file.starts_with(&format!(".{name}.mp4.replaced-")),
                "{file}"
            );
            assert!(!why.is_empty());
            // A second one the same second gets a name of its own.
            std::fs::write(a.final_path(&id), b"again").unwrap();
            let Existing::SetAside { path: second, .. } = a.existing(&id).unwrap() else {
                panic!("{name}: not set aside twice");
            };
            assert_ne!(second, path);
            assert_eq!(std::fs::read(&path).unwrap(), bytes);
        }
        let id = VideoId::parse("dir").unwrap();
        std::fs::create_dir(a.final_path(&id)).unwrap();
        let Existing::Blocked(why) = a.existing(&id).unwrap() else {
            panic!("a directory does not block");
        };
        assert!(why.contains(a.final_path(&id).to_str().unwrap()), "{why}");
        assert!(why.contains("directory"), "{why}");
        let id = VideoId::parse("ok").unwrap();
        std::fs::write(a.final_path(&id), &whole).unwrap();
        let Existing::Adopted(p) = a.existing(&id).unwrap() else {
            panic!("a whole file is not adopted");
        };
        assert_eq!((p.bytes, p.metadata), (whole.len() as u64, None));
    }

    #[test]
    fn refusals_outlive_the_attempt_and_the_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let a = Archive::open(dir.path()).unwrap();
        let id = VideoId::parse("v").unwrap();
        let mut bad = mp4(2000);
        bad.extend_from_slice(b"stray");
        let mut p = a.begin(&id).unwrap();
        p.write(&bad).unwrap();
        let why = p.check_whole().unwrap().unwrap_err();
        assert!(why.contains("stray"), "{why}");
        let sha = p.sha256();
        assert_eq!(p.reject().unwrap(), 1);
        assert_eq!(p.len(), 0);
        p.park().unwrap();
        let p = a.begin(&id).unwrap();
        assert_eq!(p.rejections(), Some((1, sha.as_str())));
        let kept = p.keep_incomplete(None).unwrap();
        assert_eq!(kept.bytes, 0);
        assert!(!a.validator_path(&id).exists());
    }

    #[test]
    fn leftovers_are_named_and_removed() {
        assert_eq!(leftover_of(".video_1.mp4.part"), Some("video_1"));
        assert_eq!(leftover_of(".video_1.mp4.part.validator"), Some("video_1"));
        assert_eq!(leftover_of(".video_1.json.part"), None);
        for other in [
            "video_1.mp4",
            ".video_1.mp4.replaced-20261201T120000Z",
            "..mp4.part",
            ".a/b.mp4.part",
            ".hingnetd-probe-1",
        ] {
            assert_eq!(leftover_of(other), None, "{other}");
        }
        let dir = tempfile::tempdir().unwrap();
        let a = Archive::open(dir.path()).unwrap();
        let id = VideoId::parse("v").unwrap();
        parked(&a, &id, &mp4(1000), 500);
        let held = a.begin(&id).unwrap();
        a.remove_leftovers(&id).unwrap();
        assert!(a.partial_path(&id).exists(), "a held partial is left alone");
        drop(held);
        a.remove_leftovers(&id).unwrap();
        assert!(!a.partial_path(&id).exists() && !a.validator_path(&id).exists());
    }

    #[test]
    fn stamps() {
        let t = |s| SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(s);
        assert_eq!(utc_stamp(t(0)), "19700101T000000Z");
        assert_eq!(utc_stamp(t(951_782_400)), "20000229T000000Z");
        assert_eq!(utc_stamp(t(1_796_083_200 + 3661)), "20261201T010101Z");
    }

    /// Found by review: the flush that finishes a file ran the free-space check too, and its
    /// refusal removed a complete, checkpointed file (`check_whole`) or the parked partial.
    #[test]
    fn a_short_disk_never_costs_the_bytes_already_written() {
        let dir = tempfile::tempdir().unwrap();
        let a = Archive::open(dir.path()).unwrap();
        let id = VideoId::parse("v").unwrap();
        // Small chunks: the last 150 KB sit in the write buffer until the final flush.
        let data = mp4(1_200_000);
        let mut p = a.begin(&id).unwrap();
        p.keep_free(u64::MAX / 4);
        for c in data.chunks(1000) {
            p.write(c).unwrap();
        }
        let whole = p.check_whole().unwrap().expect("a whole MP4");
        let pubd = p.publish(whole, None).unwrap();
        assert_eq!(pubd.bytes, data.len() as u64);
        // And a partial parked while the disk is short keeps every byte.
        let id = VideoId::parse("w").unwrap();
        let mut p = a.begin(&id).unwrap();
        p.keep_free(u64::MAX / 4);
        for c in data[..600_000].chunks(1000) {
            p.write(c).unwrap();
        }
        assert_eq!(p.park().unwrap(), 600_000);
        assert_eq!(a.begin(&id).unwrap().len(), 600_000);
    }

    #[test]
    fn writing_stops_when_the_disk_is_short_and_the_partial_resumes() {
        let dir = tempfile::tempdir().unwrap();
        let a = Archive::open(dir.path()).unwrap();
        let id = VideoId::parse("v").unwrap();
        let data = mp4(3 << 20);
        let mut p = a.begin(&id).unwrap();
        p.keep_free(u64::MAX);
        let e = data
            .chunks(256 * 1024)
            .find_map(|c| p.write(c).err())
            .expect("stops");
        assert!(matches!(e, ArchiveError::DiskShort { .. }), "{e}");
        assert!(e.to_string().contains("archive.min_free"), "{e}");
        let have = p.park().unwrap();
        assert!(have >= SPACE_CHECK, "{have}");
        let mut p = a.begin(&id).unwrap();
        assert_eq!(p.len(), have);
        p.write(&data[have as usize..]).unwrap();
        let pubd = publish(p, None).unwrap();
        assert_eq!(pubd.sha256, hex(&Sha256::digest(&data)));
    }

    /// Parks `n` bytes of `data` as a partial, as a shutdown would.
    fn parked(a: &Archive, id: &VideoId, data: &[u8], n: usize) {
        let mut p = a.begin(id).unwrap();
        p.set_version(Some("\"etag-1\""), Some(data.len() as u64))
            .unwrap();
        p.write(&data[..n]).unwrap();
        assert_eq!(p.park().unwrap(), n as u64);
    }

    #[test]
    fn a_partial_whose_bytes_changed_starts_over() {
        let dir = tempfile::tempdir().unwrap();
        let a = Archive::open(dir.path()).unwrap();
        let id = VideoId::parse("v").unwrap();
        let data = mp4(700_000);
        parked(&a, &id, &data, 500_000);
        let p = a.begin(&id).unwrap();
        assert_eq!((p.len(), p.validator()), (500_000, Some("\"etag-1\"")));
        drop(p);
        // One byte flipped in the middle: nothing of the file is trusted.
        let path = a.partial_path(&id);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[123_456] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let p = a.begin(&id).unwrap();
        assert_eq!((p.len(), p.validator()), (0, None));
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
        // No record at all (left by an older version, or planted): the same.
        drop(p);
        parked(&a, &id, &data, 500_000);
        std::fs::remove_file(a.validator_path(&id)).unwrap();
        assert_eq!(a.begin(&id).unwrap().len(), 0);
    }

    #[test]
    fn a_large_file_goes_to_disk_while_it_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let a = Archive::open(dir.path()).unwrap();
        let id = VideoId::parse("big").unwrap();
        let window = WRITEBACK_WINDOW as usize;
        let data = mp4(5 * window);
        let mut p = a.begin(&id).unwrap();
        // Chunks of the odd sizes a network hands over, small and large.
        for chunk in data.chunks(417_792).flat_map(|c| {
            let (x, y) = c.split_at(c.len().min(5_000));
            [x, y]
        }) {
            p.write(chunk).unwrap();
        }
        // Two windows stay in flight; everything before them was waited for and let go.
        assert!(
            p.writeback,
            "sync_file_range works on the test's filesystem"
        );
        assert!(p.settled >= 2 * WRITEBACK_WINDOW, "settled {}", p.settled);
        assert!(p.settled < p.previous && p.previous < p.submitted);
        assert!(p.submitted <= p.written);
        let pubd = publish(p, None).unwrap();
        assert_eq!(pubd.sha256, hex(&Sha256::digest(&data)));
        assert_eq!(std::fs::read(&pubd.path).unwrap(), data);
    }

    #[test]
    fn bytes_after_the_last_checkpoint_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let a = Archive::open(dir.path()).unwrap();
        let id = VideoId::parse("v").unwrap();
        let data = mp4(700_000);
        parked(&a, &id, &data, 300_000);
        // Bytes that reached the file after the checkpoint (a writer killed in between).
        let mut f = OpenOptions::new()
            .append(true)
            .open(a.partial_path(&id))
            .unwrap();
        f.write_all(&data[300_000..400_000]).unwrap();
        let mut p = a.begin(&id).unwrap();
        assert_eq!(p.len(), 300_000);
        p.write(&data[300_000..]).unwrap();
        let pubd = publish(p, None).unwrap();
        assert_eq!(pubd.sha256, hex(&Sha256::digest(&data)));
    }

    #[test]
    fn a_file_that_does_not_fit_above_min_free_is_not_started() {
        let dir = tempfile::tempdir().unwrap();
        let a = Archive::open(dir.path()).unwrap();
        let free = available_bytes(dir.path()).unwrap();
        let mut p = a.begin(&VideoId::parse("v").unwrap()).unwrap();
        let e = p.reserve(free + 1, 0).unwrap_err();
        assert!(e.to_string().contains("not enough disk space"), "{e}");
        p.reserve(1000, 0).unwrap();
        // A second download sees the first one's promise.
        let mut q = a.begin(&VideoId::parse("w").unwrap()).unwrap();
        assert!(q.reserve(free - 500, 0).is_err());
        drop(p);
        assert_eq!(a.reservations.load(Ordering::Relaxed), 0);
        assert!(a.storage_problem(0).is_none());
        assert!(a.storage_problem(u64::MAX).unwrap().contains("disk short"));
        drop(q);
    }
}

//! The archive directory and its file discipline: which IDs may become file names, where a
//! video's partial and final files live, hashing while writing, and the publish sequence
//! (fsync file → rename → fsync directory) that makes a final file trustworthy.
//!
//! Invariant: a file at a final path (`<dir>/<id>.mp4`) was complete, checked and fsynced
//! before it got that name. Partial files are hidden (`<dir>/.<id>.mp4.part`) in the same
//! directory, so the rename is atomic and needs one directory fsync.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};

/// Bytes buffered before a write(2): large enough that a fast link costs few syscalls, small
/// enough that memory stays flat at any concurrency.
const WRITE_BUFFER: usize = 256 * 1024;
/// Data at least this large, with nothing buffered before it, is written from where it is.
const DIRECT_WRITE: usize = 64 * 1024;
/// Bytes a download writes before it has the kernel start putting them on disk (see
/// `Partial::write_back`).
const WRITEBACK_WINDOW: u64 = 8 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("archive directory {path}: {source}")]
    Dir { path: PathBuf, source: io::Error },
    #[error("archive file {path}: {source}")]
    File { path: PathBuf, source: io::Error },
    #[error("{path} is not a video (no MP4 ftyp box at the start)")]
    NotMp4 { path: PathBuf },
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
}

/// A video ID that passed the check: 1-128 characters of `[A-Za-z0-9_-]`, not starting with
/// `-`. Only a `VideoId` can become part of a path or URL, so nothing else ever does.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct VideoId(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid video id")]
pub struct InvalidId;

impl VideoId {
    pub fn parse(s: &str) -> Result<VideoId, InvalidId> {
        let ok = (1..=128).contains(&s.len())
            && !s.starts_with('-')
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if ok {
            Ok(VideoId(s.to_owned()))
        } else {
            Err(InvalidId)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for VideoId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Whether the bytes start like an ISO-BMFF (MP4) file: a box whose type is `ftyp`.
pub fn looks_like_mp4(head: &[u8]) -> bool {
    head.len() >= 8 && &head[4..8] == b"ftyp"
}

pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 15)] as char);
    }
    s
}

/// A file that made it into the archive.
#[derive(Debug, Clone, PartialEq)]
pub struct Published {
    pub path: PathBuf,
    pub sha256: String,
    pub bytes: u64,
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

    /// A final file already there means an earlier run published it but died before the row
    /// said so: hash it and take it, instead of downloading again.
    pub fn existing(&self, id: &VideoId) -> Result<Option<Published>, ArchiveError> {
        let path = self.final_path(id);
        if std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_symlink()) {
            // Not ours, and not followed: publishing renames over the link itself.
            tracing::warn!(path = %path.display(), "a symlink sits at the archive path; it will be replaced, not followed");
            return Ok(None);
        }
        let mut file = match open_nofollow(&path, false) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(ArchiveError::File { path, source }),
        };
        let ferr = |source| ArchiveError::File {
            path: path.clone(),
            source,
        };
        let meta = file.metadata().map_err(ferr)?;
        if !meta.is_file() {
            return Err(ferr(io::Error::other("not a regular file")));
        }
        let bytes = meta.len();
        let Some((hasher, head)) = hash_prefix(&mut file, bytes).map_err(ferr)? else {
            return Err(ferr(io::Error::other(
                "the file shrank while it was hashed",
            )));
        };
        let sha256 = hex(&hasher.finalize());
        if !looks_like_mp4(&head) {
            return Err(ArchiveError::NotMp4 { path });
        }
        if let Err(why) = check_boxes(&file, bytes) {
            // Not something a publish of ours left: downloaded again, and renamed over.
            tracing::warn!(path = %path.display(), why = %why, "a file at the archive path is not a whole MP4; downloading again");
            return Ok(None);
        }
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
        Ok(Some(Published {
            path,
            sha256,
            bytes,
        }))
    }

    /// Whether a live process is writing this video's partial file (it holds the file's lock).
    pub fn partial_in_use(&self, id: &VideoId) -> bool {
        let Ok(file) = open_nofollow(&self.partial_path(id), false) else {
            return false;
        };
        matches!(file.try_lock(), Err(std::fs::TryLockError::WouldBlock))
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
        let on_disk = file.metadata().map_err(ferr)?.len();
        let mut resumed = None;
        if on_disk > 0 {
            match ResumeRecord::parse(&text) {
                Some(r) if r.len > 0 && r.len <= on_disk => {
                    match hash_prefix(&mut file, r.len).map_err(ferr)? {
                        Some((hasher, head))
                            if hex(&hasher.clone().finalize()) == r.sha256
                                && (head.len() < 8 || looks_like_mp4(&head)) =>
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
            dir: self.dir.clone(),
            reserved: 0,
            reservations: self.reservations.clone(),
        };
        if written == 0 {
            partial.checkpoint()?;
        }
        Ok(partial)
    }
}

/// Free space the filesystem gives an unprivileged writer, in bytes.
fn available_bytes(dir: &Path) -> io::Result<u64> {
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
/// never spliced into a published file.
#[derive(Debug, Default, PartialEq)]
struct ResumeRecord {
    validator: Option<String>,
    /// The whole file's size, as the response that started it announced it.
    total: Option<u64>,
    len: u64,
    sha256: String,
}

const RECORD_MAGIC: &str = "hingnetd-partial 1";

impl ResumeRecord {
    fn render(&self) -> String {
        format!(
            "{RECORD_MAGIC}\nvalidator {}\ntotal {}\ncheckpoint {} {}\n",
            self.validator.as_deref().unwrap_or(""),
            self.total.map_or("-".to_owned(), |t| t.to_string()),
            self.len,
            self.sha256
        )
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
        let sha256 = (sha256.len() == 64 && sha256.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| sha256.to_owned())?;
        Some(ResumeRecord {
            validator: Some(validator.to_owned()).filter(|v| !v.is_empty()),
            total,
            len: len.parse().ok()?,
            sha256,
        })
    }
}

/// Whether the file is whole as an ISO-BMFF (MP4) file: starting with `ftyp`, its top-level
/// boxes, walked by their sizes, end exactly at its length. A body cut short (a server that
/// announced too few bytes, a 416 that lied about the total) almost never ends on a box
/// boundary; nothing at the HTTP level can tell.
fn check_boxes(file: &File, len: u64) -> Result<(), String> {
    use std::os::unix::fs::FileExt;
    let mut at = 0u64;
    while at < len {
        if len - at < 8 {
            return Err(format!("{} stray bytes after the last box", len - at));
        }
        let mut h = [0u8; 16];
        file.read_exact_at(&mut h[..8], at)
            .map_err(|e| format!("reading the box at byte {at}: {e}"))?;
        if at == 0 && &h[4..8] != b"ftyp" {
            return Err("it does not start with an ftyp box".into());
        }
        let (size, header) = match u32::from_be_bytes([h[0], h[1], h[2], h[3]]) {
            // The last box, running to the end of the file.
            0 => return Ok(()),
            1 => {
                if len - at < 16 {
                    return Err(format!("the box at byte {at} is cut short"));
                }
                file.read_exact_at(&mut h[8..16], at + 8)
                    .map_err(|e| format!("reading the box at byte {at}: {e}"))?;
                let mut big = [0u8; 8];
                big.copy_from_slice(&h[8..16]);
                (u64::from_be_bytes(big), 16)
            }
            n => (u64::from(n), 8),
        };
        if size < header {
            return Err(format!(
                "the box at byte {at} has an impossible size {size}"
            ));
        }
        at = at.saturating_add(size);
    }
    if at != len {
        return Err(format!(
            "its last box ends at byte {at}, but the file has {len} bytes"
        ));
    }
    Ok(())
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
    dir: PathBuf,
    /// Disk space promised to this download and not yet written (see `reserve`).
    reserved: u64,
    reservations: Arc<AtomicU64>,
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

    /// Starts over from byte zero (the server would not resume).
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
        self.set_version(None, None)
    }

    pub fn write(&mut self, data: &[u8]) -> Result<(), ArchiveError> {
        fill_head(&mut self.head, data);
        if self.buf.len() + data.len() > WRITE_BUFFER {
            self.flush()?;
        }
        if self.buf.is_empty() && data.len() >= DIRECT_WRITE {
            // Large enough on its own: written from where it is, not copied first.
            return self.write_out(data);
        }
        self.buf.extend_from_slice(data);
        Ok(())
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
        self.head.len() < 8 || looks_like_mp4(&self.head)
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
        if written == 0 {
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

    /// The publish sequence: flush → fsync file → rename → fsync directory. Any error here
    /// means the file is not trusted: it is removed (after a failed fsync the kernel may have
    /// dropped the very pages a retry would read back), and the caller downloads again rather
    /// than marking anything done.
    pub fn publish(mut self) -> Result<Published, ArchiveError> {
        if let Err(e) = self.flush() {
            self.remove_files();
            return Err(e);
        }
        if !looks_like_mp4(&self.head) {
            // Worthless: nothing of it is kept.
            self.remove_files();
            return Err(ArchiveError::NotMp4 {
                path: self.path.clone(),
            });
        }
        if let Err(why) = check_boxes(&self.file, self.written) {
            self.remove_files();
            return Err(ArchiveError::Incomplete {
                path: self.path.clone(),
                why,
            });
        }
        if let Err(e) = self.file.sync_all() {
            self.remove_files();
            return Err(self.err(e));
        }
        if let Err(e) = std::fs::rename(&self.path, &self.final_path) {
            self.remove_files();
            return Err(self.err(e));
        }
        // Only a leftover now; a failure to remove it costs nothing.
        let _ = remove_if_exists(&self.record_path);
        if let Err(e) = sync_dir(&self.dir) {
            // The name may not be durable: take it back so that no row says done over it.
            let _ = remove_if_exists(&self.final_path);
            return Err(e);
        }
        Ok(Published {
            path: self.final_path.clone(),
            sha256: hex(&self.hasher.clone().finalize()),
            bytes: self.written,
        })
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

    proptest::proptest! {
        /// No string, hostile or not, that passes the ID check can name a file outside the
        /// archive directory, or anything but a plain file directly in it.
        #[test]
        fn no_id_can_leave_the_archive(
            s in proptest::prop_oneof![
                proptest::arbitrary::any::<String>(),
                "(\\.\\.|/|\\\\|\\x00|%2[eEfF]|[\\x00-\\x1f]|\\.|[A-Za-z0-9_-]|\\p{Cyrillic}){0,140}",
            ]
        ) {
            if let Ok(id) = VideoId::parse(&s) {
                let a = Archive {
                    dir: PathBuf::from("/srv/archive"),
                    reservations: Arc::default(),
                };
                for p in [a.final_path(&id), a.partial_path(&id), a.validator_path(&id)] {
                    proptest::prop_assert_eq!(p.parent(), Some(Path::new("/srv/archive")));
                    let name = p.file_name().unwrap().to_str().unwrap();
                    proptest::prop_assert!(!name.contains('/') && name != "." && name != "..");
                }
            }
        }
    }

    #[test]
    fn ids() {
        for ok in ["video_abc123", "a", "A-b_9", &"x".repeat(128)] {
            assert!(VideoId::parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "-x",
            "../x",
            "a/b",
            "a.b",
            "a b",
            "a\0b",
            "é",
            "a\\b",
            "%2e%2e",
            &"x".repeat(129),
        ] {
            assert_eq!(VideoId::parse(bad), Err(InvalidId), "{bad:?}");
        }
    }

    /// An `ftyp` box, then an `mdat` box holding `n` bytes.
    fn mp4(n: usize) -> Vec<u8> {
        let mut v = b"\0\0\0\x10ftypisom\0\0\0\0".to_vec();
        v.extend_from_slice(&(n as u32 + 8).to_be_bytes());
        v.extend_from_slice(b"mdat");
        v.extend((0..n).map(|i| (i % 251) as u8));
        v
    }

    #[test]
    fn only_whole_box_sequences_pass() {
        let dir = tempfile::tempdir().unwrap();
        let check = |bytes: &[u8]| {
            let p = dir.path().join("f");
            std::fs::write(&p, bytes).unwrap();
            check_boxes(&File::open(&p).unwrap(), bytes.len() as u64)
        };
        let whole = mp4(1000);
        assert_eq!(check(&whole), Ok(()));
        for cut in [9, 15, 20, 23, 500, 1023] {
            assert!(check(&whole[..cut]).is_err(), "cut at {cut}");
        }
        let mut longer = whole.clone();
        longer.extend_from_slice(b"xx");
        assert!(check(&longer).is_err());
        // 64-bit sizes, and a last box that runs to the end (size 0).
        let mut big = b"\0\0\0\x10ftypisom\0\0\0\0\0\0\0\x01mdat".to_vec();
        big.extend_from_slice(&(16u64 + 100).to_be_bytes());
        big.extend_from_slice(&[7; 100]);
        assert_eq!(check(&big), Ok(()));
        let mut open_ended = b"\0\0\0\x10ftypisom\0\0\0\0\0\0\0\0mdat".to_vec();
        open_ended.extend_from_slice(&[7; 100]);
        assert_eq!(check(&open_ended), Ok(()));
        assert!(check(b"\0\0\0\x10moovisom\0\0\0\0").is_err());
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
        let pubd = p.publish().unwrap();
        assert_eq!(pubd.sha256, hex(&Sha256::digest(&data)));
        assert_eq!(std::fs::read(&pubd.path).unwrap(), data);
        assert!(!a.partial_path(&id).exists());
        assert_eq!(a.existing(&id).unwrap(), Some(pubd));
    }

    #[test]
    fn refuses_non_mp4_and_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let a = Archive::open(dir.path()).unwrap();
        let id = VideoId::parse("v").unwrap();
        let mut p = a.begin(&id).unwrap();
        p.write(b"{\"error\": \"nope\"}").unwrap();
        assert!(!p.head_is_plausible());
        assert!(matches!(p.publish(), Err(ArchiveError::NotMp4 { .. })));
        assert!(!a.final_path(&id).exists());

        let outside = dir.path().join("outside");
        std::fs::write(&outside, b"keep").unwrap();
        let id2 = VideoId::parse("w").unwrap();
        std::os::unix::fs::symlink(&outside, a.partial_path(&id2)).unwrap();
        std::os::unix::fs::symlink(&outside, a.validator_path(&id2)).unwrap();
        std::os::unix::fs::symlink(&outside, a.final_path(&id2)).unwrap();
        // Planted links are removed or replaced, never written through.
        assert_eq!(a.existing(&id2).unwrap(), None);
        let mut p = a.begin(&id2).unwrap();
        p.write(&mp4(1000)).unwrap();
        p.publish().unwrap();
        assert_eq!(std::fs::read(&outside).unwrap(), b"keep");
        assert!(
            std::fs::symlink_metadata(a.final_path(&id2))
                .unwrap()
                .is_file()
        );
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
        let pubd = p.publish().unwrap();
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
        let pubd = p.publish().unwrap();
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

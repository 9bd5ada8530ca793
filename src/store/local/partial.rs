//! A download in progress in the directory: the hidden partial file and its resume record,
//! hashed as it is written, with writeback while it downloads, admission against free space,
//! and the publish sequence (fsync file → rename → fsync directory). `Partial` is the blocking
//! core; `LocalPartial` and `LocalWriter` are the store contract's async face, which run it on
//! tokio's blocking pool (file I/O must not stall an async worker).

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use super::{
    Archive, DIRECT_WRITE, SPACE_CHECK, WRITE_BUFFER, WRITEBACK_WINDOW, open_own, remove_if_exists,
    sync_dir, sys,
};
use crate::id::{VideoId, hex};
use crate::mp4;
use crate::store::{self, Publish, Published, StoreError, Written};

/// Chunks queued between the network and the writer thread: bounds memory per download. A
/// chunk is what hyper read at once (up to about 400 KiB on a fast link), so two keep the
/// writer busy while memory stays under about 1.5 MiB a download, buffers included.
const SINK_DEPTH: usize = 2;

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
pub(super) fn hash_prefix(file: &mut File, n: u64) -> io::Result<Option<(Sha256, Vec<u8>)>> {
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
    /// The server's version of the bytes, and what earlier downloads were refused for.
    version: Version,
    record: Record,
    file: File,
    path: PathBuf,
    /// Received bytes not yet written: large writes cost fewer syscalls and checkpoints.
    buf: Vec<u8>,
    /// Covers exactly the bytes written to the file (`written`).
    hasher: Sha256,
    written: u64,
    head: Vec<u8>,
    writeback: Writeback,
    space: Space,
    names: Names,
}

/// What the resume record says besides its checkpoint.
struct Version {
    /// What identifies the server's version of the bytes already in the file, for `If-Range`.
    validator: Option<String>,
    /// The file's size as announced when its first byte was received, if it was.
    total: Option<u64>,
    /// Whole downloads refused as incomplete MP4s, and the last one's SHA-256.
    rejected: Option<(u32, String)>,
}

/// The resume record's file (see `ResumeRecord`).
struct Record {
    file: File,
    path: PathBuf,
    /// Length of its current contents (rewritten in place).
    len: u64,
}

/// How far the file has gone to disk while it downloads (see `Partial::write_back`).
struct Writeback {
    /// Off when the filesystem does not support `sync_file_range`.
    enabled: bool,
    /// The file up to here has been handed to the kernel's writeback.
    submitted: u64,
    /// Where the submission before that one ended.
    previous: u64,
    /// The file up to here is on disk and out of the page cache.
    settled: u64,
}

/// The download's share of the disk (see `Partial::reserve` and `Partial::keep_free`).
struct Space {
    /// Disk space promised to this download and not yet written.
    reserved: u64,
    /// Promised to every download in flight: the archive's.
    reservations: Arc<AtomicU64>,
    /// `archive.min_free` while writing.
    floor: Option<u64>,
    /// `written` when the free space was last looked at.
    checked: u64,
}

/// Where the video's files end up.
struct Names {
    final_path: PathBuf,
    sidecar_path: PathBuf,
    dir: PathBuf,
}

/// Proof that a partial's bytes were checked to be a whole MP4 (`Partial::check_whole`): the
/// only way to give a file a final name with a `done` row behind it.
#[derive(Debug)]
pub struct Whole {
    len: u64,
}

impl Partial {
    /// Opens the video's partial file, creating it or picking up what an earlier attempt left.
    /// Only the bytes covered by the resume record's checkpoint are kept, and only if they
    /// still hash to what was recorded; they are re-hashed so the final SHA-256 covers the
    /// whole file.
    pub(super) fn begin(archive: &Archive, id: &VideoId) -> Result<Partial, StoreError> {
        let path = archive.partial_path(id);
        let ferr = |source| StoreError::File {
            path: path.clone(),
            source,
        };
        let mut file = open_own(&path).map_err(ferr)?;
        // Held for as long as the download runs (the lock goes with the file): it tells other
        // processes the partial has a live writer, and the kernel drops it if that writer dies.
        // `remove_leftovers` takes the lock for an instant to test it: try a little longer
        // before calling the file busy.
        let mut tries = 0;
        loop {
            match file.try_lock() {
                Ok(()) => break,
                Err(std::fs::TryLockError::WouldBlock) if tries < 20 => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                Err(std::fs::TryLockError::WouldBlock) => return Err(StoreError::Busy { path }),
                Err(std::fs::TryLockError::Error(e)) => return Err(ferr(e)),
            }
        }
        let record_path = archive.validator_path(id);
        let rerr = |source| StoreError::File {
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
            version: Version {
                validator,
                total,
                rejected,
            },
            record: Record {
                file: record,
                path: record_path,
                len: record_len,
            },
            file,
            // Allocated on first use: a download whose chunks are all `DIRECT_WRITE` or
            // larger never needs it.
            buf: Vec::new(),
            hasher,
            written,
            head,
            writeback: Writeback {
                enabled: true,
                submitted: written,
                previous: written,
                settled: written,
            },
            path,
            space: Space {
                reserved: 0,
                reservations: archive.reservations.clone(),
                floor: None,
                checked: written,
            },
            names: Names {
                final_path: archive.final_path(id),
                sidecar_path: archive.sidecar_path(id),
                dir: archive.dir.clone(),
            },
        };
        if written == 0 {
            partial.checkpoint()?;
        }
        Ok(partial)
    }

    /// Bytes received so far: where a resumed request starts.
    pub fn len(&self) -> u64 {
        self.written + self.buf.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn err(&self, source: io::Error) -> StoreError {
        StoreError::File {
            path: self.path.clone(),
            source,
        }
    }

    pub fn validator(&self) -> Option<&str> {
        self.version.validator.as_deref()
    }

    /// Rewrites the resume record in place: one small `pwrite`, cheap enough for every flush.
    fn checkpoint(&mut self) -> Result<(), StoreError> {
        use std::os::unix::fs::FileExt;
        let text = ResumeRecord {
            validator: self.version.validator.clone(),
            total: self.version.total,
            len: self.written,
            sha256: hex(&self.hasher.clone().finalize()),
            rejected: self.version.rejected.clone(),
        }
        .render();
        let r = self
            .record
            .file
            .write_all_at(text.as_bytes(), 0)
            .and_then(|()| {
                if (text.len() as u64) < self.record.len {
                    self.record.file.set_len(text.len() as u64)?;
                }
                Ok(())
            });
        r.map_err(|source| StoreError::File {
            path: self.record.path.clone(),
            source,
        })?;
        self.record.len = text.len() as u64;
        Ok(())
    }

    /// The whole file's size, as the response that started the file announced it.
    pub fn total(&self) -> Option<u64> {
        self.version.total
    }

    /// Records which version of the file is being written from byte zero: its validator and
    /// its announced size. Written before the body, so it survives a kill as well as a park.
    pub fn set_version(
        &mut self,
        validator: Option<&str>,
        total: Option<u64>,
    ) -> Result<(), StoreError> {
        // A header value cannot hold a line break; one here would corrupt the record.
        self.version.validator = validator
            .filter(|v| !v.contains(['\n', '\r']))
            .map(str::to_owned);
        self.version.total = total;
        self.checkpoint()
    }

    /// Starts over from byte zero (the server would not resume, or sent something else).
    pub fn restart(&mut self) -> Result<(), StoreError> {
        self.buf.clear();
        let f = &mut self.file;
        let r = f
            .set_len(0)
            .and_then(|_| f.seek(SeekFrom::Start(0)).map(drop));
        r.map_err(|e| self.err(e))?;
        self.hasher = Sha256::new();
        self.head.clear();
        self.written = 0;
        self.writeback.submitted = 0;
        self.writeback.previous = 0;
        self.writeback.settled = 0;
        self.space.checked = 0;
        self.set_version(None, None)
    }

    /// While writing, stop with `StoreError::DiskShort` once the free space, less what other
    /// downloads in flight were promised, falls below `min_free` (`archive.min_free`). A body
    /// without a length reserved nothing up front, and another process may fill the disk.
    pub fn keep_free(&mut self, min_free: u64) {
        self.space.floor = Some(min_free).filter(|m| *m > 0);
    }

    /// Takes the next bytes of the body. `StoreError::DiskShort` (see `keep_free`) comes only
    /// from here, after the bytes are written and checkpointed: the flushes that finish a
    /// file (`park`, `check_whole`) never refuse it for the disk, so they never cost it.
    pub fn write(&mut self, data: &[u8]) -> Result<(), StoreError> {
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
    fn flush(&mut self) -> Result<(), StoreError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let buf = std::mem::take(&mut self.buf);
        let r = self.write_out(&buf);
        self.buf = buf;
        self.buf.clear();
        r
    }

    fn write_out(&mut self, data: &[u8]) -> Result<(), StoreError> {
        let r = self.file.write_all(data);
        r.map_err(|e| self.err(e))?;
        self.hasher.update(data);
        let n = data.len() as u64;
        self.written += n;
        let done = n.min(self.space.reserved);
        self.space.reserved -= done;
        self.space.reservations.fetch_sub(done, Ordering::Relaxed);
        self.checkpoint()?;
        self.write_back()
    }

    /// See `keep_free`. The bytes written so far are checkpointed: the file can be resumed.
    fn check_space(&mut self) -> Result<(), StoreError> {
        let Some(min_free) = self.space.floor else {
            return Ok(());
        };
        if self.written - self.space.checked < SPACE_CHECK {
            return Ok(());
        }
        self.space.checked = self.written;
        let available =
            sys::available_bytes(&self.names.dir).map_err(|source| StoreError::Dir {
                path: self.names.dir.clone(),
                source,
            })?;
        // Our own promise shrinks as we write, and so does the free space: what is left of it
        // is still ours to write.
        let free = available.saturating_sub(self.space.reservations.load(Ordering::Relaxed));
        if free < min_free {
            return Err(StoreError::DiskShort {
                dir: self.names.dir.clone(),
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
    fn write_back(&mut self) -> Result<(), StoreError> {
        if !self.writeback.enabled || self.written - self.writeback.submitted < WRITEBACK_WINDOW {
            return Ok(());
        }
        let started = sys::start_writeback(
            &self.file,
            self.writeback.submitted,
            self.written - self.writeback.submitted,
        );
        match started.map_err(|e| self.err(e))? {
            sys::Writeback::Started => {}
            // The fsync at publish does all the work, as it would without this.
            sys::Writeback::Unsupported => {
                self.writeback.enabled = false;
                return Ok(());
            }
        }
        if self.writeback.previous > self.writeback.settled {
            let r = sys::settle(
                &self.file,
                self.writeback.settled,
                self.writeback.previous - self.writeback.settled,
            );
            r.map_err(|e| self.err(e))?;
            self.writeback.settled = self.writeback.previous;
        }
        self.writeback.previous = self.writeback.submitted;
        self.writeback.submitted = self.written;
        Ok(())
    }

    /// Checks that the rest of a `total`-byte file fits on the disk while keeping `min_free`
    /// bytes free, counting the space other downloads in flight have been promised, and
    /// promises it to this one.
    pub fn reserve(&mut self, total: u64, min_free: u64) -> Result<(), StoreError> {
        self.space
            .reservations
            .fetch_sub(self.space.reserved, Ordering::Relaxed);
        self.space.reserved = 0;
        let need = total.saturating_sub(self.len());
        let available =
            sys::available_bytes(&self.names.dir).map_err(|source| StoreError::Dir {
                path: self.names.dir.clone(),
                source,
            })?;
        let promised = self.space.reservations.fetch_add(need, Ordering::Relaxed);
        let free = available.saturating_sub(promised);
        if free < need.saturating_add(min_free) {
            self.space.reservations.fetch_sub(need, Ordering::Relaxed);
            return Err(StoreError::NoSpace {
                dir: self.names.dir.clone(),
                need,
                free,
                min_free,
            });
        }
        self.space.reserved = need;
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
    pub fn park(mut self) -> Result<u64, StoreError> {
        if let Err(e) = self.flush() {
            self.remove_files();
            return Err(e);
        }
        let written = self.written;
        if written == 0 && self.version.rejected.is_none() {
            self.discard()?;
        }
        Ok(written)
    }

    fn remove_files(&self) {
        let _ = remove_if_exists(&self.path);
        let _ = remove_if_exists(&self.record.path);
    }

    /// Removes the partial file: what it holds will never be needed.
    pub fn discard(self) -> Result<(), StoreError> {
        remove_if_exists(&self.path).map_err(|e| self.err(e))?;
        remove_if_exists(&self.record.path).map_err(|source| StoreError::File {
            path: self.record.path.clone(),
            source,
        })
    }

    /// Flushes, then checks that the bytes are a whole MP4 (`mp4::check`): `Ok(Err(why))` if
    /// they are not. A flush error removes the file, as every write error does.
    pub fn check_whole(&mut self) -> Result<Result<Whole, String>, StoreError> {
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
        self.version
            .rejected
            .as_ref()
            .map(|(n, sha)| (*n, sha.as_str()))
    }

    /// Refuses these bytes as an incomplete MP4: remembers their SHA-256 (in the resume record,
    /// so it outlives this attempt) and starts over from byte zero. Returns the refusals so far.
    pub fn reject(&mut self) -> Result<u32, StoreError> {
        let n = self.version.rejected.as_ref().map_or(0, |(n, _)| *n) + 1;
        self.version.rejected = Some((n, self.sha256()));
        self.restart()?;
        Ok(n)
    }

    /// The publish sequence for a checked file: the sidecar (if any) is written and renamed
    /// into place first, then fsync the video → rename → fsync the directory, once for both
    /// names. Any error on the video means it is not trusted: it is removed (after a failed
    /// fsync the kernel may have dropped the very pages a retry would read back), and the
    /// caller downloads again rather than marking anything done.
    pub fn publish(self, whole: Whole, sidecar: Option<&str>) -> Result<Published, StoreError> {
        if whole.len != self.len() {
            // Written after the check: check again.
            self.remove_files();
            return Err(StoreError::Incomplete {
                path: self.path.clone(),
                why: "bytes were written after the check".into(),
            });
        }
        self.install(sidecar)
    }

    /// Gives an incomplete MP4 its final name as it is, with the same care as `publish`: the
    /// API served these very bytes twice, so they are what there is, and they are kept; the
    /// row that records them is `failed`, never `done`.
    pub fn keep_incomplete(self, sidecar: Option<&str>) -> Result<Published, StoreError> {
        self.install(sidecar)
    }

    fn install(mut self, sidecar: Option<&str>) -> Result<Published, StoreError> {
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
        if let Err(e) = std::fs::rename(&self.path, &self.names.final_path) {
            self.remove_files();
            return Err(self.err(e));
        }
        let metadata = sidecar.map(|text| {
            if let Err(e) = self.record_to_sidecar(text) {
                // The status object is in the row too: a sidecar that cannot be written costs
                // the video nothing.
                tracing::warn!(path = %self.names.sidecar_path.display(), error = %e, "cannot write the metadata file");
            }
            text.to_owned()
        });
        // Only a leftover now, unless it became the sidecar; a failure to remove it costs
        // nothing.
        let _ = remove_if_exists(&self.record.path);
        if let Err(e) = sync_dir(&self.names.dir) {
            // The names may not be durable: take them back so that no row says done over them.
            let _ = remove_if_exists(&self.names.final_path);
            if metadata.is_some() {
                let _ = remove_if_exists(&self.names.sidecar_path);
            }
            return Err(e);
        }
        Ok(Published {
            path: self.names.final_path.display().to_string(),
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
        if std::fs::symlink_metadata(&self.names.sidecar_path).is_ok_and(|m| m.is_dir()) {
            return Err(io::Error::other("a directory is in the way"));
        }
        self.record.file.set_len(0)?;
        self.record.file.write_all_at(text.as_bytes(), 0)?;
        self.record.file.sync_all()?;
        std::fs::rename(&self.record.path, &self.names.sidecar_path)
    }
}

impl Drop for Partial {
    fn drop(&mut self) {
        self.space
            .reservations
            .fetch_sub(self.space.reserved, Ordering::Relaxed);
    }
}

/// `Partial` as the store contract's `store::Partial`: every call that touches the files runs
/// on the blocking pool, taking the partial there and back.
pub(super) struct LocalPartial {
    /// `None` only while a blocking thread has it.
    inner: Option<Partial>,
    /// `archive.min_free` as it was when the partial was begun: an attempt keeps the settings
    /// it started with, as the rest of its limits.
    min_free: u64,
}

impl LocalPartial {
    pub(super) fn new(inner: Partial, min_free: u64) -> LocalPartial {
        LocalPartial {
            inner: Some(inner),
            min_free,
        }
    }

    fn home(&self) -> &Partial {
        self.inner.as_ref().expect("partial is home")
    }

    /// Runs `f` on the partial on a blocking thread, and takes it back.
    async fn on<T: Send + 'static>(
        &mut self,
        f: impl FnOnce(&mut Partial) -> T + Send + 'static,
    ) -> T {
        let mut p = self.inner.take().expect("partial is home");
        let (p, r) = tokio::task::spawn_blocking(move || {
            let r = f(&mut p);
            (p, r)
        })
        .await
        .expect("archive task panicked");
        self.inner = Some(p);
        r
    }

    /// Runs `f`, which ends the partial one way or another, on a blocking thread.
    async fn end<T: Send + 'static>(
        self: Box<Self>,
        f: impl FnOnce(Partial, u64) -> T + Send + 'static,
    ) -> T {
        let LocalPartial { inner, min_free } = *self;
        let p = inner.expect("partial is home");
        tokio::task::spawn_blocking(move || f(p, min_free))
            .await
            .expect("archive task panicked")
    }
}

#[async_trait::async_trait]
impl store::Partial for LocalPartial {
    fn size(&self) -> u64 {
        self.home().len()
    }

    fn validator(&self) -> Option<&str> {
        self.home().validator()
    }

    fn total(&self) -> Option<u64> {
        self.home().total()
    }

    fn set_version(
        &mut self,
        validator: Option<&str>,
        total: Option<u64>,
    ) -> Result<(), StoreError> {
        self.inner
            .as_mut()
            .expect("partial is home")
            .set_version(validator, total)
    }

    async fn restart(&mut self) -> Result<(), StoreError> {
        self.on(Partial::restart).await
    }

    async fn admit(&mut self, total: Option<u64>) -> Result<(), StoreError> {
        let min_free = self.min_free;
        self.on(move |p| {
            p.keep_free(min_free);
            match total {
                Some(t) => p.reserve(t, min_free),
                None => Ok(()),
            }
        })
        .await
    }

    /// Hashing and writing happen on a blocking thread, overlapping the network reads.
    fn writer(self: Box<Self>) -> Box<dyn store::Writer> {
        let (tx, mut rx) = mpsc::channel::<Bytes>(SINK_DEPTH);
        let LocalPartial { inner, min_free } = *self;
        let mut partial = inner.expect("partial is home");
        let task = tokio::task::spawn_blocking(move || {
            let back = |p| -> Box<dyn store::Partial> { Box::new(LocalPartial::new(p, min_free)) };
            while let Some(chunk) = rx.blocking_recv() {
                match partial.write(&chunk) {
                    Ok(()) => {}
                    // Every byte written is checkpointed and sound: kept for a resume.
                    Err(e @ StoreError::DiskShort { .. }) => {
                        return Written::Short(back(partial), e);
                    }
                    Err(e) => {
                        // A failed write (a full disk) may have left anything in the file.
                        let _ = partial.discard();
                        return Written::Failed(e);
                    }
                }
            }
            Written::All(back(partial))
        });
        Box::new(LocalWriter { tx, task })
    }

    async fn park(self: Box<Self>) -> Result<u64, StoreError> {
        self.end(|p, _| p.park()).await
    }

    async fn discard(self: Box<Self>) -> Result<(), StoreError> {
        self.end(|p, _| p.discard()).await
    }

    /// Checked and published on one blocking thread: the common case costs one hand-off.
    async fn publish(self: Box<Self>, sidecar: Option<String>) -> Result<Publish, StoreError> {
        self.end(move |mut p, min_free| match p.check_whole()? {
            Ok(whole) => p.publish(whole, sidecar.as_deref()).map(Publish::Published),
            Err(why) => Ok(Publish::NotWhole(
                Box::new(LocalPartial::new(p, min_free)),
                why,
            )),
        })
        .await
    }

    fn sha256(&self) -> String {
        self.home().sha256()
    }

    fn rejections(&self) -> Option<(u32, &str)> {
        self.home().rejections()
    }

    async fn reject(&mut self) -> Result<u32, StoreError> {
        self.on(Partial::reject).await
    }

    async fn keep_incomplete(
        self: Box<Self>,
        sidecar: Option<String>,
    ) -> Result<Published, StoreError> {
        self.end(move |p, _| p.keep_incomplete(sidecar.as_deref()))
            .await
    }
}

/// The writer thread's end of a download: chunks go over a bounded channel.
struct LocalWriter {
    tx: mpsc::Sender<Bytes>,
    task: tokio::task::JoinHandle<Written>,
}

#[async_trait::async_trait]
impl store::Writer for LocalWriter {
    async fn write(&mut self, chunk: Bytes) -> bool {
        self.tx.send(chunk).await.is_ok()
    }

    async fn finish(self: Box<Self>) -> Written {
        let LocalWriter { tx, task } = *self;
        drop(tx);
        task.await.expect("writer task panicked")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mp4::sample::whole as mp4;

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
            p.writeback.enabled,
            "sync_file_range works on the test's filesystem"
        );
        assert!(
            p.writeback.settled >= 2 * WRITEBACK_WINDOW,
            "settled {}",
            p.writeback.settled
        );
        assert!(
            p.writeback.settled < p.writeback.previous
                && p.writeback.previous < p.writeback.submitted
        );
        assert!(p.writeback.submitted <= p.written);
        let whole = p.check_whole().unwrap().expect("a whole MP4");
        let pubd = p.publish(whole, None).unwrap();
        assert_eq!(pubd.sha256, hex(&Sha256::digest(&data)));
        assert_eq!(std::fs::read(&pubd.path).unwrap(), data);
    }
}

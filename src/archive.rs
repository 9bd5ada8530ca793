//! The archive directory and its file discipline: which IDs may become file names, where a
//! video's partial and final files live, hashing while writing, and the publish sequence
//! (fsync file → rename → fsync directory) that makes a final file trustworthy.
//!
//! Invariant: a file at a final path (`<dir>/<id>.mp4`) was complete, checked and fsynced
//! before it got that name. Partial files are hidden (`<dir>/.<id>.mp4.part`) in the same
//! directory, so the rename is atomic and needs one directory fsync.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// Bytes buffered before a write(2): large enough that a fast link costs few syscalls, small
/// enough that memory stays flat at any concurrency.
const WRITE_BUFFER: usize = 256 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("archive directory {path}: {source}")]
    Dir { path: PathBuf, source: io::Error },
    #[error("archive file {path}: {source}")]
    File { path: PathBuf, source: io::Error },
    #[error("{path} is not a video (no MP4 ftyp box at the start)")]
    NotMp4 { path: PathBuf },
    #[error("{path} is being written by another process (a `hingnetd fetch`?)")]
    Busy { path: PathBuf },
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
        Ok(Archive { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn final_path(&self, id: &VideoId) -> PathBuf {
        self.dir.join(format!("{id}.mp4"))
    }

    pub fn partial_path(&self, id: &VideoId) -> PathBuf {
        self.dir.join(format!(".{id}.mp4.part"))
    }

    /// Beside the partial: the server's validator (ETag or Last-Modified) for the bytes in it.
    fn validator_path(&self, id: &VideoId) -> PathBuf {
        self.dir.join(format!(".{id}.mp4.part.validator"))
    }

    /// A final file already there means an earlier run published it but died before the row
    /// said so: hash it and take it, instead of downloading again.
    pub fn existing(&self, id: &VideoId) -> Result<Option<Published>, ArchiveError> {
        let path = self.final_path(id);
        let file = match open_nofollow(&path, false) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(ArchiveError::File { path, source }),
        };
        let ferr = |source| ArchiveError::File {
            path: path.clone(),
            source,
        };
        let (sha256, bytes, head) = hash_reader(&file).map_err(ferr)?;
        if !looks_like_mp4(&head) {
            return Err(ArchiveError::NotMp4 { path });
        }
        // The run that renamed it may have died before (or failed at) the fsyncs: make the
        // file and its name durable before a row says done.
        file.sync_all().map_err(ferr)?;
        sync_dir(&self.dir)?;
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

    /// Opens the video's partial file, creating it or picking up what an earlier attempt left
    /// (its bytes are re-hashed so the final SHA-256 covers the whole file).
    pub fn begin(&self, id: &VideoId) -> Result<Partial, ArchiveError> {
        let path = self.partial_path(id);
        let ferr = |source| ArchiveError::File {
            path: path.clone(),
            source,
        };
        let mut file = open_nofollow(&path, true).map_err(ferr)?;
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
        let mut hasher = Sha256::new();
        let mut head = Vec::with_capacity(8);
        let mut len = 0u64;
        let mut buf = vec![0u8; WRITE_BUFFER];
        loop {
            let n = file.read(&mut buf).map_err(ferr)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            fill_head(&mut head, &buf[..n]);
            len += n as u64;
        }
        // A resumed file that does not start like a video is not worth resuming.
        if len >= 8 && !looks_like_mp4(&head) {
            file.set_len(0).map_err(ferr)?;
            file.seek(SeekFrom::Start(0)).map_err(ferr)?;
            hasher = Sha256::new();
            head.clear();
            len = 0;
        }
        let validator_path = self.validator_path(id);
        let validator = match len {
            // Whatever validator an earlier partial left is not this one's.
            0 => {
                remove_if_exists(&validator_path).map_err(|source| ArchiveError::File {
                    path: validator_path.clone(),
                    source,
                })?;
                None
            }
            _ => std::fs::read_to_string(&validator_path)
                .ok()
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty()),
        };
        Ok(Partial {
            validator,
            validator_path,
            out: BufWriter::with_capacity(WRITE_BUFFER, file),
            hasher,
            head,
            len,
            path,
            final_path: self.final_path(id),
            dir: self.dir.clone(),
        })
    }
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

fn fill_head(head: &mut Vec<u8>, data: &[u8]) {
    if head.len() < 8 {
        let take = (8 - head.len()).min(data.len());
        head.extend_from_slice(&data[..take]);
    }
}

fn hash_reader(mut r: impl Read) -> io::Result<(String, u64, Vec<u8>)> {
    let mut hasher = Sha256::new();
    let mut head = Vec::with_capacity(8);
    let mut len = 0u64;
    let mut buf = vec![0u8; WRITE_BUFFER];
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            return Ok((hex(&hasher.finalize()), len, head));
        }
        hasher.update(&buf[..n]);
        fill_head(&mut head, &buf[..n]);
        len += n as u64;
    }
}

/// A download in progress: the hidden partial file, hashed as it is written.
pub struct Partial {
    /// What identifies the server's version of the bytes already in the file, for `If-Range`.
    validator: Option<String>,
    validator_path: PathBuf,
    out: BufWriter<File>,
    hasher: Sha256,
    head: Vec<u8>,
    len: u64,
    path: PathBuf,
    final_path: PathBuf,
    dir: PathBuf,
}

impl Partial {
    /// Bytes already in the file: where a resumed request starts.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
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

    /// Records the validator of the version being written from byte zero. Written before the
    /// body, so it survives a kill as well as a park.
    pub fn set_validator(&mut self, v: Option<&str>) -> Result<(), ArchiveError> {
        let r = match v {
            Some(v) => std::fs::write(&self.validator_path, v),
            None => remove_if_exists(&self.validator_path),
        };
        r.map_err(|source| ArchiveError::File {
            path: self.validator_path.clone(),
            source,
        })?;
        self.validator = v.map(str::to_owned);
        Ok(())
    }

    /// Starts over from byte zero (the server would not resume).
    pub fn restart(&mut self) -> Result<(), ArchiveError> {
        self.out.flush().map_err(|e| self.err(e))?;
        let f = self.out.get_mut();
        let r = f
            .set_len(0)
            .and_then(|_| f.seek(SeekFrom::Start(0)).map(drop));
        r.map_err(|e| self.err(e))?;
        self.hasher = Sha256::new();
        self.head.clear();
        self.len = 0;
        self.set_validator(None)
    }

    pub fn write(&mut self, data: &[u8]) -> Result<(), ArchiveError> {
        self.out.write_all(data).map_err(|e| self.err(e))?;
        self.hasher.update(data);
        fill_head(&mut self.head, data);
        self.len += data.len() as u64;
        Ok(())
    }

    /// Whether what has been written so far could be the start of an MP4 (undecided below
    /// 8 bytes).
    pub fn head_is_plausible(&self) -> bool {
        self.head.len() < 8 || looks_like_mp4(&self.head)
    }

    /// Writes out the buffer so a later attempt can resume from every byte received. An empty
    /// file is removed instead: a video that is not ready yet leaves nothing behind.
    pub fn park(mut self) -> Result<u64, ArchiveError> {
        self.out.flush().map_err(|e| self.err(e))?;
        if self.len == 0 {
            remove_if_exists(&self.path).map_err(|e| self.err(e))?;
            self.set_validator(None)?;
        }
        Ok(self.len)
    }

    /// Removes the partial file: what it holds will never be needed.
    pub fn discard(mut self) -> Result<(), ArchiveError> {
        remove_if_exists(&self.path).map_err(|e| self.err(e))?;
        self.set_validator(None)
    }

    /// The publish sequence. Any error here means the file is not trusted: the caller
    /// downloads again rather than marking anything done.
    pub fn publish(mut self) -> Result<Published, ArchiveError> {
        if !looks_like_mp4(&self.head) {
            // Worthless: nothing of it is kept.
            let path = self.path.clone();
            let _ = self.discard();
            return Err(ArchiveError::NotMp4 { path });
        }
        self.out.flush().map_err(|e| self.err(e))?;
        self.out.get_ref().sync_all().map_err(|e| self.err(e))?;
        std::fs::rename(&self.path, &self.final_path).map_err(|e| self.err(e))?;
        // Only a leftover now; a failure to remove it costs nothing.
        let _ = remove_if_exists(&self.validator_path);
        sync_dir(&self.dir)?;
        let sha256 = hex(&self.hasher.clone().finalize());
        Ok(Published {
            path: self.final_path.clone(),
            sha256,
            bytes: self.len,
        })
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
                let a = Archive { dir: PathBuf::from("/srv/archive") };
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

    fn mp4(n: usize) -> Vec<u8> {
        let mut v = b"\0\0\0\x18ftypisom".to_vec();
        v.extend((0..n).map(|i| (i % 251) as u8));
        v
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
        assert!(a.begin(&id2).is_err());
        assert_eq!(std::fs::read(&outside).unwrap(), b"keep");
    }
}

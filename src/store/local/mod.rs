//! The archive as a local directory, the embedded default: where a video's partial, final and
//! sidecar files live (only a checked `VideoId` becomes a name), adopting or setting aside what
//! is already there, free space, and what `verify` reads; the download itself is `partial`,
//! the system calls `sys`.
//!
//! Invariant: a file at a final path (`<dir>/<id>.mp4`) whose row is `done` was complete,
//! checked (`mp4::check`) and fsynced before it got that name. The one other file that gets a
//! final name is an incomplete MP4 the API served twice (`Partial::keep_incomplete`): its row
//! is `failed`, so `done` keeps meaning "complete and checked". Partial files are hidden
//! (`<dir>/.<id>.mp4.part`) in the same directory, so the rename is atomic and needs one
//! directory fsync.

mod partial;
mod sys;

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use sha2::{Digest, Sha256};

use crate::id::{VideoId, hex};
use crate::mp4;
use crate::store::{Checked, Entry, EntryKind, Existing, Published, StoreError};
pub use partial::Partial;
use partial::{LocalPartial, hash_prefix};

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

#[derive(Debug, Clone)]
pub struct Archive {
    dir: PathBuf,
    /// Disk space promised to downloads in flight and not yet written.
    reservations: Arc<AtomicU64>,
    /// `archive.min_free` (`Store::keep_free`).
    min_free: Arc<AtomicU64>,
    /// The directory as configured, which messages about listing it name.
    given: PathBuf,
}

impl Archive {
    /// Creates the directory if needed and proves it is writable, so a bad `archive.dir` is
    /// reported at start, not at the first finished download.
    pub fn open(dir: &Path) -> Result<Archive, StoreError> {
        let err = |source| StoreError::Dir {
            path: dir.to_owned(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(err)?;
        let dir = dir.canonicalize().map_err(err)?;
        let probe = dir.join(format!(".hingnetd-probe-{}", std::process::id()));
        File::create(&probe).map_err(err)?;
        std::fs::remove_file(&probe).map_err(err)?;
        Ok(Archive {
            given: dir.clone(),
            ..Archive::at(dir)
        })
    }

    /// For reading only: nothing is created or written.
    pub fn inspect(dir: &Path) -> Archive {
        Archive {
            given: dir.to_owned(),
            ..Archive::at(dir.canonicalize().unwrap_or_else(|_| dir.to_owned()))
        }
    }

    /// The directory, as opened.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn at(dir: PathBuf) -> Archive {
        Archive {
            given: dir.clone(),
            dir,
            reservations: Arc::default(),
            min_free: Arc::default(),
        }
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
        match sys::available_bytes(&self.dir) {
            Ok(free) if free < min_free => Some(format!(
                "disk short: {free} bytes free in {}, below archive.min_free ({min_free})",
                self.dir.display()
            )),
            Ok(_) => None,
            Err(e) => Some(format!("archive directory {}: {e}", self.dir.display())),
        }
    }

    fn final_path(&self, id: &VideoId) -> PathBuf {
        self.dir.join(format!("{id}.mp4"))
    }

    fn partial_path(&self, id: &VideoId) -> PathBuf {
        self.dir.join(format!(".{id}.mp4.part"))
    }

    /// Beside the partial: its resume record (see `ResumeRecord`).
    fn validator_path(&self, id: &VideoId) -> PathBuf {
        self.dir.join(format!(".{id}.mp4.part.validator"))
    }

    /// Beside the video: what the API said about it (the status object, without any URL
    /// query string).
    fn sidecar_path(&self, id: &VideoId) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    /// Looks at the video's final path before downloading: a whole MP4 there means an earlier
    /// run published it but died before the row said so (hash it and take it); anything else
    /// that is a regular file is renamed aside; anything that is not a regular file blocks the
    /// video.
    pub fn existing(&self, id: &VideoId) -> Result<Existing, StoreError> {
        let path = self.final_path(id);
        let ferr = |source| StoreError::File {
            path: path.clone(),
            source,
        };
        let meta = match std::fs::symlink_metadata(&path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Existing::Absent),
            Err(source) => return Err(StoreError::File { path, source }),
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
        let mut file = match sys::open_nofollow(&path, false) {
            Ok(f) => f,
            // Gone meanwhile, or replaced by a link: nothing to take.
            Err(e) if sys::is_gone_or_link(&e) => {
                return Ok(Existing::Absent);
            }
            Err(source) => return Err(StoreError::File { path, source }),
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
                return Ok(Existing::SetAside {
                    path: aside.display().to_string(),
                    why,
                });
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
            path: path.display().to_string(),
            sha256: hex(&hasher.finalize()),
            bytes,
            metadata: self.read_sidecar(id),
        }))
    }

    /// Renames whatever is at the final path to `.<id>.mp4.replaced-<UTC time>`, a name no
    /// other file has, and makes the rename durable.
    pub fn set_aside(&self, id: &VideoId) -> Result<PathBuf, StoreError> {
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
        std::fs::rename(&from, &to).map_err(|source| StoreError::File { path: from, source })?;
        sync_dir(&self.dir)?;
        Ok(to)
    }

    /// The sidecar an earlier run left beside an adopted video, if it is one of ours.
    fn read_sidecar(&self, id: &VideoId) -> Option<String> {
        let file = sys::open_nofollow(&self.sidecar_path(id), false).ok()?;
        let mut text = String::new();
        file.take(SMALL_FILE).read_to_string(&mut text).ok()?;
        serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .filter(serde_json::Value::is_object)
            .map(|_| text)
    }

    /// Deletes a published video and its sidecar (`hingnetd remove --delete-file`): regular
    /// files only; a directory or device planted there is not ours to delete.
    pub fn delete_published(&self, id: &VideoId) -> Result<(), StoreError> {
        for path in [self.final_path(id), self.sidecar_path(id)] {
            let file = |source| StoreError::File {
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
    pub fn remove_leftovers(&self, id: &VideoId) -> Result<(), StoreError> {
        let path = self.partial_path(id);
        match sys::open_nofollow(&path, false) {
            Ok(file) => match file.try_lock() {
                Err(std::fs::TryLockError::WouldBlock) => return Ok(()),
                // Held while removing, so that no one starts on it in between.
                _ => remove_if_exists(&path).map_err(|source| StoreError::File {
                    path: path.clone(),
                    source,
                })?,
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            // A planted link, or an unreadable file: still not ours to keep.
            Err(_) => remove_if_exists(&path).map_err(|source| StoreError::File {
                path: path.clone(),
                source,
            })?,
        }
        let p = self.validator_path(id);
        remove_if_exists(&p).map_err(|source| StoreError::File { path: p, source })
    }

    /// Opens the video's partial (see `Partial::begin`).
    pub fn begin(&self, id: &VideoId) -> Result<Partial, StoreError> {
        Partial::begin(self, id)
    }

    /// Runs `f` on a clone of the archive on tokio's blocking pool: file I/O must not stall an
    /// async worker.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Archive) -> T + Send + 'static,
    ) -> T {
        let me = self.clone();
        tokio::task::spawn_blocking(move || f(&me))
            .await
            .expect("archive task panicked")
    }
}

#[async_trait::async_trait]
impl crate::store::Store for Archive {
    fn location(&self) -> String {
        self.dir.display().to_string()
    }

    fn keep_free(&self, bytes: u64) {
        self.min_free.store(bytes, Ordering::Relaxed);
    }

    async fn storage_problem(&self) -> Option<String> {
        let min_free = self.min_free.load(Ordering::Relaxed);
        self.blocking(move |a| a.storage_problem(min_free)).await
    }

    fn free_bytes(&self) -> io::Result<u64> {
        sys::available_bytes(&self.dir)
    }

    async fn existing(&self, id: &VideoId) -> Result<Existing, StoreError> {
        let id = id.clone();
        self.blocking(move |a| a.existing(&id)).await
    }

    async fn begin(&self, id: &VideoId) -> Result<Box<dyn crate::store::Partial>, StoreError> {
        let id = id.clone();
        let partial = self.blocking(move |a| a.begin(&id)).await?;
        let min_free = self.min_free.load(Ordering::Relaxed);
        Ok(Box::new(LocalPartial::new(partial, min_free)))
    }

    async fn remove_leftovers(&self, id: &VideoId) -> Result<(), StoreError> {
        let id = id.clone();
        self.blocking(move |a| a.remove_leftovers(&id)).await
    }
}

impl crate::store::Inventory for Archive {
    fn video_path(&self, id: &VideoId) -> String {
        self.final_path(id).display().to_string()
    }

    /// As paths, not text: `a//b.mp4` and `a/./b.mp4` name the same file.
    fn keeps_at(&self, id: &VideoId, path: &str) -> bool {
        Path::new(path) == self.final_path(id)
    }

    fn check(
        &self,
        path: &str,
        bytes: Option<i64>,
        sha256: Option<&str>,
        _deep: bool,
        progress: &dyn Fn(u64),
    ) -> Checked {
        let meta = match std::fs::symlink_metadata(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Checked::Missing,
            Err(e) => return Checked::Unreadable(format!("cannot read: {e}")),
            Ok(m) => m,
        };
        if !meta.file_type().is_file() {
            return Checked::Changed("not a regular file".into());
        }
        let expected = bytes.unwrap_or(-1);
        if meta.len() as i64 != expected {
            return Checked::Changed(format!("size {} bytes, recorded {expected}", meta.len()));
        }
        match hash_file(Path::new(path), progress) {
            Err(e) => Checked::Unreadable(format!("cannot read: {e}")),
            Ok(sha) if Some(sha.as_str()) != sha256 => Checked::Changed(format!(
                "sha256 {sha}, recorded {}",
                sha256.unwrap_or("none")
            )),
            Ok(_) => Checked::Intact { bytes: meta.len() },
        }
    }

    /// Hidden files other than a download's leftovers (downloads' partials are listed as such;
    /// files set aside as `.<id>.mp4.replaced-...` and our own probes are not listed at all).
    fn entries(&self) -> Result<Vec<Entry>, StoreError> {
        let dir_err = |source| StoreError::Dir {
            path: self.given.clone(),
            source,
        };
        let rd = match std::fs::read_dir(&self.dir) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            other => other.map_err(dir_err)?,
        };
        let mut out = Vec::new();
        for entry in rd {
            let name = entry.map_err(dir_err)?.file_name();
            let name = name.to_string_lossy();
            let kind = if name.starts_with('.') {
                match leftover_of(&name).and_then(|id| VideoId::parse(id).ok()) {
                    Some(id) => EntryKind::Partial(id),
                    None => continue,
                }
            } else {
                let video = |suffix| {
                    name.strip_suffix(suffix)
                        .and_then(|id| VideoId::parse(id).ok())
                };
                match (video(".mp4"), video(".json")) {
                    (Some(id), _) => EntryKind::Video(id),
                    (_, Some(id)) => EntryKind::Sidecar(id),
                    _ => EntryKind::Unknown,
                }
            };
            out.push(Entry {
                path: self.dir.join(&*name).display().to_string(),
                kind,
            });
        }
        Ok(out)
    }

    fn set_aside(&self, id: &VideoId) -> Result<String, StoreError> {
        Archive::set_aside(self, id).map(|p| p.display().to_string())
    }

    fn delete_published(&self, id: &VideoId) -> Result<(), StoreError> {
        Archive::delete_published(self, id)
    }

    fn remove_leftovers(&self, id: &VideoId) -> Result<(), StoreError> {
        Archive::remove_leftovers(self, id)
    }
}

/// The SHA-256 of a file, as rows record it; `progress` is told the bytes as they are read.
pub fn hash_file(path: &Path, progress: &dyn Fn(u64)) -> io::Result<String> {
    let mut f = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(hex(&hasher.finalize()));
        }
        hasher.update(&buf[..n]);
        progress(n as u64);
    }
}

/// What the archive's hidden files belong to, by name: the video ID of a partial
/// (`.<id>.mp4.part`) or its resume record (`...part.validator`); `None` for any other name (a
/// set-aside `.replaced-` file included).
fn leftover_of(name: &str) -> Option<&str> {
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

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| StoreError::Dir {
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

/// Opens (creating) one of our own hidden files. Those names are ours: a symlink found there
/// was planted, and is removed rather than followed.
fn open_own(path: &Path) -> io::Result<File> {
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink()) {
        tracing::warn!(path = %path.display(), "removed a symlink planted at a partial-file path (not followed)");
        std::fs::remove_file(path)?;
    }
    sys::open_nofollow(path, true)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

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
                let a = Archive::at(PathBuf::from("/srv/archive"));
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
    fn publish(mut p: Partial, sidecar: Option<&str>) -> Result<Published, StoreError> {
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
            let file = Path::new(&path).file_name().unwrap().to_str().unwrap();
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
        assert!(matches!(e, StoreError::DiskShort { .. }), "{e}");
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
    fn bytes_after_the_last_checkpoint_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let a = Archive::open(dir.path()).unwrap();
        let id = VideoId::parse("v").unwrap();
        let data = mp4(700_000);
        parked(&a, &id, &data, 300_000);
        // Bytes that reached the file after the checkpoint (a writer killed in between).
        let mut f = std::fs::OpenOptions::new()
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
        let free = sys::available_bytes(dir.path()).unwrap();
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

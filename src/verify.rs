//! `hingnetd verify`: re-hashing archived files against the SHA-256 and size their rows
//! recorded, finding files in the archive that no row names, and partial files left behind by
//! videos that will never resume them.

use std::fmt;

use indicatif::ProgressBar;

use crate::id::VideoId;
use crate::queue::{Admin, Cursor, QueueError, RowView, State};
use crate::store::{Checked, EntryKind, Inventory, StoreError};

/// Rows read from the database at a time (no read snapshot is held across the whole run).
const PAGE: usize = 500;

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("{0}")]
    Queue(#[from] QueueError),
    /// "cannot list archive directory …: …"
    #[error("cannot list {0}")]
    List(StoreError),
}

/// What `repair` did about one missing or changed file.
#[derive(Debug)]
pub enum Repair {
    /// Back to pending: the daemon downloads it again (a changed file was renamed aside
    /// first, never deleted).
    Requeued {
        id: String,
        set_aside: Option<String>,
    },
    /// Left as it is, and why.
    Skipped { id: String, why: String },
}

impl fmt::Display for Repair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Repair::Requeued {
                id,
                set_aside: None,
            } => write!(f, "REPAIRED {id}: back to pending, to be downloaded again"),
            Repair::Requeued {
                id,
                set_aside: Some(p),
            } => write!(
                f,
                "REPAIRED {id}: the changed file is kept as {p}; back to pending, to be downloaded again"
            ),
            Repair::Skipped { id, why } => write!(f, "NOT REPAIRED {id}: {why}"),
        }
    }
}

/// `verify --repair`: every row whose file is missing or changed goes back to pending. A
/// changed file is first renamed aside (`.<id>.mp4.replaced-<UTC>`), so that the download
/// cannot adopt it and nothing is deleted. If the video has expired meanwhile, the API's
/// answer fails the row as usual.
pub fn repair(
    q: &dyn Admin,
    archive: &dyn Inventory,
    report: &Report,
) -> Result<Vec<Repair>, VerifyError> {
    let mut done = Vec::new();
    for p in &report.problems {
        let (id, path, recorded, changed) = match p {
            Problem::Missing { id, path, recorded } => (id, path, recorded, false),
            Problem::Changed {
                id,
                path,
                recorded,
                unreadable: false,
                ..
            } => (id, path, recorded, true),
            // Not known to be wrong: the file could not be read.
            Problem::Changed { id, detail, .. } => {
                done.push(Repair::Skipped {
                    id: id.clone(),
                    why: format!("{detail}; fix what keeps it from being read, then verify again"),
                });
                continue;
            }
            _ => continue,
        };
        let skip = |why: String| Repair::Skipped {
            id: id.clone(),
            why,
        };
        let Ok((vid, _)) = VideoId::from_queued(id) else {
            done.push(skip("not a valid video ID".into()));
            continue;
        };
        if changed && !archive.keeps_at(&vid, path) {
            done.push(skip(format!(
                "its file {path} is not where the archive keeps it ({}); move it there or remove the row",
                archive.video_path(&vid)
            )));
            continue;
        }
        let why = if changed {
            "verify --repair: the archived file had changed; downloading again"
        } else {
            "verify --repair: the archived file was missing; downloading again"
        };
        // The file is set aside only once the row is back to pending, in the same
        // transaction; a row re-archived since `verify` read it is left alone.
        let mut set_aside = || {
            changed
                .then(|| archive.set_aside(&vid))
                .transpose()
                .map_err(|e| format!("cannot rename the changed file aside: {e}"))
        };
        done.push(
            match q.requeue_archived(id, recorded.as_deref(), why, &mut set_aside)? {
                Some(Ok(set_aside)) => Repair::Requeued {
                    id: id.clone(),
                    set_aside,
                },
                Some(Err(e)) => skip(e),
                None => skip("its row changed since it was checked; run verify again".into()),
            },
        );
    }
    Ok(done)
}

#[derive(Debug, PartialEq)]
pub enum Problem {
    /// `recorded`: the SHA-256 the row held when it was checked.
    Missing {
        id: String,
        path: String,
        recorded: Option<String>,
    },
    /// `unreadable`: the file could not be read, so it is not known to be wrong.
    Changed {
        id: String,
        path: String,
        detail: String,
        recorded: Option<String>,
        unreadable: bool,
    },
    Orphan {
        path: String,
    },
    NotDone {
        id: String,
        state: State,
    },
    NotQueued {
        id: String,
    },
    /// A shared queue's row whose file is in another instance's archive (another host's
    /// disk): not checked here, and never repaired from here.
    Elsewhere {
        id: String,
        on: String,
    },
    /// A partial file (or its resume record) whose video will not resume it: its row is done,
    /// failed, or gone.
    Leftover {
        path: String,
        why: String,
    },
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::Missing { id, path, .. } => write!(f, "MISSING {id} {path}"),
            Problem::Changed {
                id, path, detail, ..
            } => write!(f, "CHANGED {id} {path}: {detail}"),
            Problem::Orphan { path } => write!(f, "ORPHAN  {path} (no done row names it)"),
            Problem::NotDone { id, state } => {
                write!(f, "NOTDONE {id} is {state}, nothing to verify")
            }
            Problem::NotQueued { id } => write!(f, "UNKNOWN {id} is not in the queue"),
            Problem::Elsewhere { id, on } => {
                write!(f, "ELSEWHERE {id} is archived on {on}; verify it there")
            }
            Problem::Leftover { path, why } => {
                write!(f, "PARTIAL {path} ({why}; nothing will resume it)")
            }
        }
    }
}

#[derive(Debug, Default)]
pub struct Report {
    pub checked: u64,
    pub ok: u64,
    pub bytes: u64,
    pub problems: Vec<Problem>,
    pub scanned_for_orphans: bool,
}

impl Report {
    pub fn summary(&self) -> String {
        let count = |f: fn(&Problem) -> bool| self.problems.iter().filter(|p| f(p)).count();
        let mut s = format!(
            "verified {} file(s), {} bytes: {} ok, {} missing, {} changed",
            self.checked,
            self.bytes,
            self.ok,
            count(|p| matches!(p, Problem::Missing { .. })),
            count(|p| matches!(p, Problem::Changed { .. })),
        );
        if self.scanned_for_orphans {
            s.push_str(&format!(
                ", {} orphan(s), {} leftover partial file(s)",
                count(|p| matches!(p, Problem::Orphan { .. })),
                count(|p| matches!(p, Problem::Leftover { .. }))
            ));
        }
        s
    }
}

/// Checks every done row (`all`, which also looks for orphans) or the given IDs.
pub fn run(
    q: &dyn Admin,
    archive: &dyn Inventory,
    all: bool,
    deep: bool,
    ids: &[String],
    make_bar: impl FnOnce(u64) -> Option<ProgressBar>,
) -> Result<Report, VerifyError> {
    let mut report = Report::default();
    if all {
        let bar = make_bar(q.archived_bytes()?);
        let mut after = Cursor::default();
        loop {
            let page = q.archived_page(after, PAGE)?;
            let Some((last, _)) = page.last() else { break };
            after = *last;
            for (_, row) in &page {
                check(row, archive, deep, &mut report, bar.as_ref());
            }
        }
        if let Some(b) = bar {
            b.finish_and_clear();
        }
        report.scanned_for_orphans = true;
        find_orphans(q, archive, &mut report)?;
    } else {
        let mut rows = Vec::new();
        for id in ids {
            match q.get(id)? {
                None => report.problems.push(Problem::NotQueued { id: id.clone() }),
                Some(r) if !r.names_a_file() => report.problems.push(Problem::NotDone {
                    id: id.clone(),
                    state: r.state,
                }),
                Some(r) if !archive.shared() && r.archived_elsewhere(q.instance()).is_some() => {
                    report.problems.push(Problem::Elsewhere {
                        id: id.clone(),
                        on: r.archived_on.unwrap_or_default(),
                    })
                }
                Some(r) => rows.push(r),
            }
        }
        let bar = make_bar(rows.iter().map(|r| r.bytes.unwrap_or(0) as u64).sum());
        for row in &rows {
            check(row, archive, deep, &mut report, bar.as_ref());
        }
        if let Some(b) = bar {
            b.finish_and_clear();
        }
    }
    Ok(report)
}

fn check(
    row: &RowView,
    archive: &dyn Inventory,
    deep: bool,
    report: &mut Report,
    bar: Option<&ProgressBar>,
) {
    report.checked += 1;
    let path = row.path.clone().unwrap_or_default();
    let problem = |detail: String, unreadable| Problem::Changed {
        id: row.video_id.clone(),
        path: path.clone(),
        detail,
        recorded: row.sha256.clone(),
        unreadable,
    };
    let progress = |n| {
        if let Some(b) = bar {
            b.inc(n);
        }
    };
    match archive.check(&path, row.bytes, row.sha256.as_deref(), deep, &progress) {
        Checked::Intact { bytes } => {
            report.ok += 1;
            report.bytes += bytes;
        }
        Checked::Missing => report.problems.push(Problem::Missing {
            id: row.video_id.clone(),
            path: path.clone(),
            recorded: row.sha256.clone(),
        }),
        Checked::Changed(detail) => report.problems.push(problem(detail, false)),
        Checked::Unreadable(detail) => report.problems.push(problem(detail, true)),
    }
}

/// What is in the archive that no row names (a video, or its metadata beside it), and partial
/// files whose video will never resume them. A video whose row is still `downloading` was just
/// published and is being recorded: not an orphan.
fn find_orphans(
    q: &dyn Admin,
    archive: &dyn Inventory,
    report: &mut Report,
) -> Result<(), VerifyError> {
    for entry in archive.entries().map_err(VerifyError::List)? {
        let id = match &entry.kind {
            EntryKind::Partial(id) => {
                let why = match q.get(id.as_str())? {
                    None => "its video is not in the queue".to_owned(),
                    Some(r) if matches!(r.state, State::Pending | State::Downloading) => continue,
                    Some(r) => format!("its video is {}", r.state),
                };
                report.problems.push(Problem::Leftover {
                    path: entry.path,
                    why,
                });
                continue;
            }
            EntryKind::Video(id) | EntryKind::Sidecar(id) => id,
            EntryKind::Unknown => {
                report.problems.push(Problem::Orphan { path: entry.path });
                continue;
            }
        };
        let named = q.get(id.as_str())?.is_some_and(|r| {
            r.state == State::Downloading
                || (r.names_a_file()
                    && r.path
                        .as_deref()
                        .is_some_and(|p| archive.belongs(p, &entry)))
        });
        if !named {
            report.problems.push(Problem::Orphan { path: entry.path });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    /// A done row for `video_r` whose file at the archive's path holds `bytes`, recorded with
    /// `sha256`.
    fn archived(
        dir: &std::path::Path,
        bytes: &[u8],
        sha256: &str,
    ) -> (
        Arc<dyn crate::queue::Backend>,
        crate::store::local::Archive,
        std::path::PathBuf,
    ) {
        use crate::queue::{FileRecord, Finish};
        let q = crate::queue::open_and_migrate(&crate::queue::Location::Sqlite(dir.join("q.db")))
            .unwrap();
        let archive = crate::store::local::Archive::open(&dir.join("videos")).unwrap();
        let path =
            std::path::PathBuf::from(archive.video_path(&VideoId::parse("video_r").unwrap()));
        std::fs::write(&path, bytes).unwrap();
        let done = Finish::Done {
            file: FileRecord {
                path: path.to_str().unwrap().into(),
                sha256: sha256.into(),
                bytes: bytes.len() as u64,
                metadata: None,
            },
            http_status: 200,
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        runtime.block_on(async {
            let c = q.claim_one("video_r").await.unwrap().unwrap();
            assert!(q.finish(&c, &done, Duration::ZERO, None).await.unwrap());
        });
        (q, archive, path)
    }

    fn changed(path: &std::path::Path, recorded: &str, unreadable: bool) -> Report {
        Report {
            problems: vec![Problem::Changed {
                id: "video_r".into(),
                path: path.to_str().unwrap().into(),
                detail: "sha256 x, recorded y".into(),
                recorded: Some(recorded.into()),
                unreadable,
            }],
            ..Report::default()
        }
    }

    #[test]
    fn a_changed_file_is_set_aside_and_its_row_goes_back_to_pending() {
        let dir = tempfile::tempdir().unwrap();
        let (q, archive, path) = archived(dir.path(), b"tampered", "aa");
        let done = repair(&*q, &archive, &changed(&path, "aa", false)).unwrap();
        let Repair::Requeued {
            set_aside: Some(aside),
            ..
        } = &done[0]
        else {
            panic!("{done:?}");
        };
        assert_eq!(std::fs::read(aside).unwrap(), b"tampered");
        assert!(!path.exists());
        assert_eq!(q.get("video_r").unwrap().unwrap().state, "pending");
    }

    #[test]
    fn a_row_archived_again_since_the_check_keeps_its_file() {
        let dir = tempfile::tempdir().unwrap();
        // Checked while the row recorded "old"; archived again since, as "new".
        let (q, archive, path) = archived(dir.path(), b"the new file", "new");
        let done = repair(&*q, &archive, &changed(&path, "old", false)).unwrap();
        assert!(matches!(done[0], Repair::Skipped { .. }), "{done:?}");
        assert_eq!(std::fs::read(&path).unwrap(), b"the new file");
        assert_eq!(q.get("video_r").unwrap().unwrap().state, "done");
    }

    #[test]
    fn a_file_that_could_not_be_read_is_not_repaired() {
        let dir = tempfile::tempdir().unwrap();
        let (q, archive, path) = archived(dir.path(), b"fine, perhaps", "aa");
        let done = repair(&*q, &archive, &changed(&path, "aa", true)).unwrap();
        assert!(matches!(done[0], Repair::Skipped { .. }), "{done:?}");
        assert!(path.exists());
        assert_eq!(q.get("video_r").unwrap().unwrap().state, "done");
    }
}

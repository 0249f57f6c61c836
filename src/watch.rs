//! Noticing commits to the queue file without asking SQLite: how an idle daemon stays idle.
//!
//! Job: tell the idle scheduler that some connection may have committed to the queue file since
//! it last asked the database (a CRM's INSERT, an UPDATE of a due time, the daemon's own
//! writes, a checkpoint), so that it asks again. Every commit in WAL mode writes to the `-wal`
//! file with `write()`; the watch sees that in one of two ways:
//! - **inotify** (Linux): a watch on the queue file's directory; an event for the queue file or
//!   its `-wal` wakes the scheduler at once. An idle daemon then has no wakeup at all of its own
//!   but the scheduler's periodic full check.
//! - **polling** (inotify unavailable, or its watch lost): every `poll_interval`, two `stat()`
//!   calls compare the files' size, times and inode with a [`FileStamp`] taken before the
//!   database was last asked.
//!
//! Not its job: deciding what is due (the scheduler asks `store`), or SQL.
//!
//! A WAL write is seen before the commit it belongs to is visible (the writer syncs, then
//! publishes the commit in shared memory, which no event or file time shows), so the caller
//! reads under the write lock after a change (`Store::next_due` does): the writer has finished
//! by then.
//!
//! Invariants: no SQLite file is ever opened here (closing a descriptor of a file drops every
//! POSIX lock this process holds on it, SQLite's included) — inotify watches the directory and
//! polling only calls `stat()`; a change is never missed, only over-reported: anything unclear
//! (an unreadable file, an event queue overflow, a lost watch, a stamp too recent to trust)
//! counts as a change, which costs one query.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// Writes this close to the moment a stamp is taken may share their times and size with a
/// write that follows (coarse file times advance once per kernel tick, 1–10 ms, and the WAL is
/// rewritten in place after a checkpoint): such a stamp proves nothing.
const STAMP_GRANULE: Duration = Duration::from_millis(20);

/// One file's inode, size, mtime and ctime (seconds and nanoseconds).
type FileTimes = (u64, u64, i64, i64, i64, i64);

/// How the queue file and its WAL look from outside SQLite.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStamp {
    /// The queue file, then its `-wal` (`None`: absent).
    files: [Option<FileTimes>; 2],
}

/// The queue file as the watch sees it before the database is asked.
#[derive(Debug, Clone, Copy)]
pub struct Mark {
    /// The stamp (`None`: cannot tell, treat any later look as a change).
    stamp: Option<FileStamp>,
}

/// Watches one queue file.
pub struct Watch {
    /// The queue file.
    db: PathBuf,
    /// Its `-wal`.
    wal: PathBuf,
    /// The file names events are for: the queue file's and its `-wal`'s.
    names: [OsString; 2],
    /// The inotify event stream on the directory; `None`: polling.
    #[cfg(target_os = "linux")]
    events: Option<inotify::EventStream<Vec<u8>>>,
}

impl Watch {
    /// A watch on `db`: inotify where it works, else polling. Call it inside the runtime.
    pub fn new(db: &Path) -> Watch {
        let mut wal = db.as_os_str().to_owned();
        wal.push("-wal");
        let name = db.file_name().map(|n| n.to_owned()).unwrap_or_default();
        let mut wal_name = name.clone();
        wal_name.push("-wal");
        let mut w = Watch {
            db: db.to_path_buf(),
            wal: PathBuf::from(wal),
            names: [name, wal_name],
            #[cfg(target_os = "linux")]
            events: None,
        };
        #[cfg(target_os = "linux")]
        if !crate::failpoint::hit("no-inotify") {
            w.events = match w.inotify() {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::info!(error = %e, "Cannot watch the queue file's directory with inotify; polling it every queue.poll_interval instead.");
                    None
                }
            };
        }
        w
    }

    #[cfg(target_os = "linux")]
    fn inotify(&self) -> std::io::Result<inotify::EventStream<Vec<u8>>> {
        use inotify::{Inotify, WatchMask};
        let dir = match self.db.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let ino = Inotify::init()?;
        ino.watches().add(
            &dir,
            WatchMask::MODIFY
                | WatchMask::CREATE
                | WatchMask::MOVED_TO
                | WatchMask::DELETE
                | WatchMask::ATTRIB,
        )?;
        ino.into_event_stream(vec![0u8; 4096])
    }

    /// Whether commits are seen as events (inotify) rather than by polling.
    pub fn is_event_driven(&self) -> bool {
        #[cfg(target_os = "linux")]
        {
            self.events.is_some()
        }
        #[cfg(not(target_os = "linux"))]
        {
            false
        }
    }

    /// Takes a mark: call it right before asking the database, so that any commit after the
    /// answer was read is reported by [`Watch::changed`]. Events already queued are forgotten
    /// (the database is about to be asked anyway).
    pub fn mark(&mut self) -> Mark {
        #[cfg(target_os = "linux")]
        if let Some(events) = self.events.as_mut() {
            use futures::{FutureExt, StreamExt};
            while let Some(Some(_)) = events.next().now_or_never() {}
        }
        Mark {
            stamp: self.stamp(),
        }
    }

    /// Waits up to `d` for a change since `mark`: true if the files changed (or may have),
    /// false if `d` ran out without one. Event-driven, it returns at the first event for the
    /// queue file; polling, it sleeps `d` and compares stamps.
    pub async fn changed(&mut self, mark: &Mark, d: Duration) -> bool {
        #[cfg(target_os = "linux")]
        if let Some(events) = self.events.as_mut() {
            use futures::StreamExt;
            let wanted = |e: &inotify::EventOwned| {
                e.mask.contains(inotify::EventMask::Q_OVERFLOW)
                    || e.name.as_ref().is_some_and(|n| self.names.contains(n))
            };
            let deadline = tokio::time::Instant::now() + d;
            loop {
                match tokio::time::timeout_at(deadline, events.next()).await {
                    Err(_) => return false,
                    Ok(Some(Ok(e))) if e.mask.contains(inotify::EventMask::IGNORED) => {
                        tracing::warn!("The watch on the queue file's directory was lost; polling every queue.poll_interval instead.");
                        self.events = None;
                        return true;
                    }
                    Ok(Some(Ok(e))) if wanted(&e) => return true,
                    Ok(Some(Ok(_))) => continue,
                    Ok(Some(Err(e))) => {
                        tracing::warn!(error = %e, "Cannot read the watch on the queue file's directory; polling every queue.poll_interval instead.");
                        self.events = None;
                        return true;
                    }
                    Ok(None) => {
                        self.events = None;
                        return true;
                    }
                }
            }
        }
        tokio::time::sleep(d).await;
        match (mark.stamp, self.stamp()) {
            (Some(a), Some(b)) => a != b,
            _ => true,
        }
    }

    /// The stamp of the queue file and its WAL: two `stat()` calls, no file opened. `None`
    /// when it cannot tell (a file cannot be examined, or was written within
    /// [`STAMP_GRANULE`]).
    pub fn stamp(&self) -> Option<FileStamp> {
        self.stamp_at(SystemTime::now())
    }

    fn stamp_at(&self, now: SystemTime) -> Option<FileStamp> {
        use std::os::unix::fs::MetadataExt;
        let mut files = [None, None];
        for (i, p) in [&self.db, &self.wal].into_iter().enumerate() {
            let m = match std::fs::metadata(p) {
                Ok(m) => m,
                Err(e) if i == 1 && e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(_) => return None,
            };
            let changed = SystemTime::UNIX_EPOCH
                + Duration::new(
                    m.ctime().max(0) as u64,
                    m.ctime_nsec().clamp(0, 999_999_999) as u32,
                );
            let written = m.modified().ok()?.max(changed);
            if now
                .duration_since(written)
                .map_or(true, |age| age < STAMP_GRANULE)
            {
                return None;
            }
            files[i] = Some((
                m.ino(),
                m.len(),
                m.mtime(),
                m.mtime_nsec(),
                m.ctime(),
                m.ctime_nsec(),
            ));
        }
        Some(FileStamp { files })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(p: &Path, data: &[u8]) {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .unwrap();
        f.write_all(data).unwrap();
    }

    #[test]
    fn a_stamp_changes_with_a_write_and_is_not_trusted_right_after_one() {
        let d = tempfile::tempdir().unwrap();
        let db = d.path().join("q.db");
        let wal = d.path().join("q.db-wal");
        write(&db, b"x");
        let w = Watch {
            db: db.clone(),
            wal: wal.clone(),
            names: [OsString::new(), OsString::new()],
            #[cfg(target_os = "linux")]
            events: None,
        };
        let later = || SystemTime::now() + Duration::from_secs(1);
        // Just written: a write in the same clock tick could leave the same stamp.
        assert_eq!(w.stamp_at(SystemTime::now() - Duration::from_secs(1)), None);
        let before = w.stamp_at(later()).expect("a settled stamp");
        assert_eq!(
            w.stamp_at(later()),
            Some(before),
            "nothing written: the same stamp"
        );
        // The WAL appears (the first commit), then grows (the next).
        write(&wal, b"frame");
        let one = w.stamp_at(later()).unwrap();
        assert_ne!(one, before);
        write(&wal, b"frame");
        assert_ne!(w.stamp_at(later()).unwrap(), one);
        // The queue file unreadable (here: gone): no stamp, which counts as a change.
        std::fs::remove_file(&db).unwrap();
        assert_eq!(w.stamp_at(later()), None);
    }

    #[tokio::test]
    async fn an_event_for_the_wal_wakes_the_watch_and_other_files_do_not() {
        let d = tempfile::tempdir().unwrap();
        let db = d.path().join("q.db");
        let wal = d.path().join("q.db-wal");
        write(&db, b"x");
        write(&wal, b"x");
        let mut w = Watch::new(&db);
        if !w.is_event_driven() {
            eprintln!("inotify unavailable here: only the polling path is tested");
            return;
        }
        let m = w.mark();
        // Another file in the directory is no reason to ask the database.
        write(&d.path().join("other.log"), b"x");
        assert!(!w.changed(&m, Duration::from_millis(50)).await);
        write(&wal, b"commit");
        assert!(w.changed(&m, Duration::from_secs(10)).await);
        // The mark forgets what was seen before it.
        write(&wal, b"commit");
        let m = w.mark();
        assert!(!w.changed(&m, Duration::from_millis(50)).await);
    }

    #[tokio::test]
    async fn polling_sees_a_write_to_the_wal() {
        let d = tempfile::tempdir().unwrap();
        let db = d.path().join("q.db");
        let wal = d.path().join("q.db-wal");
        write(&db, b"x");
        write(&wal, b"x");
        let mut w = Watch::new(&db);
        #[cfg(target_os = "linux")]
        {
            w.events = None;
        }
        // Freshly written files: no stamp can be trusted, so every look reports a change. (The
        // stamp is taken as of the WAL's own write time, so a slow machine cannot make it old.)
        let written = std::fs::metadata(&wal).unwrap().modified().unwrap();
        let m = Mark {
            stamp: w.stamp_at(written),
        };
        assert!(m.stamp.is_none());
        assert!(w.changed(&m, Duration::from_millis(1)).await);
    }
}

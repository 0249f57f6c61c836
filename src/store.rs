//! The queue table and everything else in SQLite: the only module that speaks SQL.
//!
//! Job: open the queue file (WAL, busy timeout), create and upgrade the schema by versioned
//! migrations (keeping a `VACUUM INTO` copy before upgrading an existing file), claim due rows,
//! record outcomes, and answer the CLI's questions. docs/queue-table.md documents the tables for
//! the CRM; a test runs the SQL from that page against this schema.
//!
//! Not its job: deciding outcomes (`policy`) or talking to servers (`deliver`).
//!
//! Invariants:
//! - no rusqlite call runs on the async runtime's threads: every async method hops to the
//!   blocking pool ([`Store::call`]);
//! - every write is one short `BEGIN IMMEDIATE` transaction; none is held across network I/O;
//! - a row is claimed by flipping `queued` → `sending` inside `BEGIN IMMEDIATE`, so two processes
//!   on one file never claim the same row;
//! - every claim writes the claiming process's token into `claimed_by`, and that process holds
//!   its owner lock file (`<queue file>.owner-<token>.lock`) from before its first claim until
//!   it ends; rows are recovered from `sending` only when no one can be delivering them: at a
//!   start with the exclusive run lock, or when their claimer's lock can be taken;
//! - timestamps are UTC text `YYYY-MM-DDTHH:MM:SS.sssZ` (sortable as text);
//! - queries are bounded (LIMIT) — nothing loads every row.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use time::format_description::well_known::Rfc3339;
use time::{OffsetDateTime, PrimitiveDateTime, UtcOffset};

use crate::error::Error;
use crate::policy::{Fate, Outcome};

/// The status words of `mail_queue.status` (a public contract with the CRM).
pub const STATUSES: &[&str] = &["queued", "sending", "sent", "failed", "cancelled", "held"];

/// How long a connection waits for another writer (the CRM) before giving up.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// The schema, one migration per version. Never edit a released entry; append a new one.
const MIGRATIONS: &[&str] = &[
    // 1: the CRM's interface and the daemon's bookkeeping.
    r#"
CREATE TABLE mail_queue (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    to_addrs        TEXT    NOT NULL DEFAULT '',
    cc_addrs        TEXT    NOT NULL DEFAULT '',
    bcc_addrs       TEXT    NOT NULL DEFAULT '',
    reply_to        TEXT    NOT NULL DEFAULT '',
    subject         TEXT    NOT NULL DEFAULT '',
    body_text       TEXT    NOT NULL DEFAULT '',
    body_html       TEXT,
    priority        INTEGER NOT NULL DEFAULT 0,
    send_after      TEXT,
    max_attempts    INTEGER CHECK (max_attempts IS NULL OR max_attempts >= 1),
    status          TEXT    NOT NULL DEFAULT 'queued'
                    CHECK (status IN ('queued','sending','sent','failed','cancelled','held')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ','now')),
    created_at      TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ','now')),
    updated_at      TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ','now')),
    sent_at         TEXT,
    message_id      TEXT,
    last_error      TEXT,
    error_code      TEXT,
    smtp_reply      TEXT
);
CREATE INDEX mail_queue_waiting ON mail_queue (priority DESC, created_at, id) WHERE status = 'queued';
CREATE INDEX mail_queue_status ON mail_queue (status, updated_at);
CREATE TABLE mail_recipient (
    id          INTEGER PRIMARY KEY,
    mail_id     INTEGER NOT NULL REFERENCES mail_queue(id) ON DELETE CASCADE,
    address     TEXT    NOT NULL,
    kind        TEXT    NOT NULL CHECK (kind IN ('to','cc','bcc')),
    status      TEXT    NOT NULL DEFAULT 'pending' CHECK (status IN ('pending','sent','failed')),
    smtp_reply  TEXT,
    updated_at  TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ','now')),
    UNIQUE (mail_id, address)
);
CREATE TABLE mail_attempt (
    id          INTEGER PRIMARY KEY,
    mail_id     INTEGER NOT NULL REFERENCES mail_queue(id) ON DELETE CASCADE,
    started_at  TEXT    NOT NULL,
    finished_at TEXT,
    outcome     TEXT    CHECK (outcome IN ('sent','retry','failed','in_doubt','paused')),
    error_code  TEXT,
    error_text  TEXT,
    smtp_reply  TEXT
);
CREATE INDEX mail_attempt_mail ON mail_attempt (mail_id);
CREATE INDEX mail_attempt_started ON mail_attempt (started_at);
CREATE TABLE queue_state (
    id           INTEGER PRIMARY KEY CHECK (id = 1),
    paused       INTEGER NOT NULL DEFAULT 0,
    paused_since TEXT,
    paused_until TEXT,
    pause_level  INTEGER NOT NULL DEFAULT 0,
    error_code   TEXT,
    error_text   TEXT,
    updated_at   TEXT
);
INSERT INTO queue_state (id) VALUES (1);
"#,
    // 2: attachments and a few extra headers, so a CRM can attach files and thread its reports.
    r#"
ALTER TABLE mail_queue ADD COLUMN headers TEXT;
CREATE TABLE mail_attachment (
    id           INTEGER PRIMARY KEY,
    mail_id      INTEGER NOT NULL REFERENCES mail_queue(id) ON DELETE CASCADE,
    file_name    TEXT    NOT NULL,
    content_type TEXT    NOT NULL DEFAULT 'application/octet-stream',
    content      BLOB,
    path         TEXT,
    CHECK ((content IS NULL) <> (path IS NULL))
);
CREATE INDEX mail_attachment_mail ON mail_attachment (mail_id);
"#,
    // 3: which process claimed a row (its token, also the name of its lock file), so that the
    // daemon can recover the rows of a process that died while the daemon runs.
    r#"
ALTER TABLE mail_queue ADD COLUMN claimed_by TEXT;
"#,
];

/// The schema version this build writes.
pub fn schema_version() -> i64 {
    MIGRATIONS.len() as i64
}

/// Formats a time as the queue's timestamp text: `2026-12-03T09:15:00.000Z`.
pub fn ts(t: SystemTime) -> String {
    let dt = OffsetDateTime::from(t);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        dt.year(),
        dt.month() as u8,
        dt.day(),
        dt.hour(),
        dt.minute(),
        dt.second(),
        dt.millisecond()
    )
}

/// Reads a timestamp the way SQLite does: `YYYY-MM-DD HH:MM[:SS[.sss]]`, with `T` or a space,
/// `Z` or an offset (or nothing, meaning UTC). `None` if it is not one.
pub fn parse_ts(s: &str) -> Option<SystemTime> {
    let s = s.trim();
    if let Ok(dt) = OffsetDateTime::parse(s, &Rfc3339) {
        return Some(dt.into());
    }
    let (body, offset) = match s.strip_suffix('Z') {
        Some(b) => (b, UtcOffset::UTC),
        None => (s, UtcOffset::UTC),
    };
    let body = body.replacen(' ', "T", 1);
    let formats: &[&[time::format_description::BorrowedFormatItem<'_>]] = &[
        time::macros::format_description!(
            "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond]"
        ),
        time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]"),
        time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]"),
    ];
    for f in formats {
        if let Ok(p) = PrimitiveDateTime::parse(&body, f) {
            return Some(p.assume_offset(offset).into());
        }
    }
    if let Ok(d) = time::Date::parse(
        &body,
        time::macros::format_description!("[year]-[month]-[day]"),
    ) {
        return Some(d.midnight().assume_offset(offset).into());
    }
    None
}

/// A claimed row: everything delivery needs, read in the claim's transaction.
#[derive(Debug, Clone)]
pub struct Claim {
    /// `mail_queue.id`.
    pub id: i64,
    /// The `mail_attempt` row opened for this attempt.
    pub attempt_id: i64,
    /// The Message-ID, created at the first claim and reused on every retry.
    pub message_id: String,
    /// Attempts including this one.
    pub attempts: u32,
    /// The row's own `max_attempts` (NULL = the config's).
    pub max_attempts: Option<u32>,
    /// `to_addrs`.
    pub to_addrs: String,
    /// `cc_addrs`.
    pub cc_addrs: String,
    /// `bcc_addrs`.
    pub bcc_addrs: String,
    /// `reply_to`.
    pub reply_to: String,
    /// `subject`.
    pub subject: String,
    /// `body_text`.
    pub body_text: String,
    /// `body_html`.
    pub body_html: Option<String>,
    /// `created_at` as written.
    pub created_at: String,
    /// `send_after` as written.
    pub send_after: Option<String>,
    /// Recipients settled by earlier attempts: address → `sent` or `failed`.
    pub settled: Vec<(String, String)>,
    /// Whether the queue was paused when this row was claimed (it is a probe or a test mail).
    pub while_paused: bool,
    /// Earlier attempts that ended in doubt (the mail may have gone out).
    pub doubts_before: u32,
}

/// What the row becomes after an attempt (already decided by `policy`, texts already written).
#[derive(Debug, Clone)]
pub struct Record {
    /// `mail_queue.id`.
    pub id: i64,
    /// `mail_attempt.id`.
    pub attempt_id: i64,
    /// The attempt's outcome (`mail_attempt.outcome`).
    pub outcome: Outcome,
    /// The row's new status: queued, sent or failed.
    pub status: &'static str,
    /// When a `queued` row is due again (`None`: keep its old due time).
    pub next_attempt_at: Option<SystemTime>,
    /// Whether this attempt counts against `max_attempts` (account pauses do not).
    pub counts: bool,
    /// `error_code` (NULL on a clean send).
    pub error_code: Option<String>,
    /// `last_error`.
    pub error_text: Option<String>,
    /// `smtp_reply`: the server's reply that decided it.
    pub smtp_reply: Option<String>,
    /// Recipients tried: address, kind (to/cc/bcc), fate, the server's reply.
    pub rcpts: Vec<(String, &'static str, Fate, String)>,
    /// Pause the account until this long from now (account-level trouble).
    pub pause: Option<(Duration, PauseLevel)>,
    /// The attempt proved the account works: lift a pause.
    pub resume: bool,
    /// When the message was handed over (the server's answer to MAIL FROM, else the pace's
    /// moment), replacing the claim time as the attempt's `started_at`, which the pace is
    /// rebuilt from after a restart.
    pub started_at: Option<SystemTime>,
}

/// How the pause length is chosen: from the back-off steps by the failure count.
#[derive(Debug, Clone)]
pub struct PauseLevel {
    /// `[queue] retry_backoff`, indexed by consecutive account failures.
    pub steps: Vec<Duration>,
}

/// `queue_state`, as `status` and the CRM's settings screen show it.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct QueueState {
    /// Whether the account is paused.
    pub paused: bool,
    /// Since when.
    pub paused_since: Option<String>,
    /// Until when (the next probe).
    pub paused_until: Option<String>,
    /// Consecutive account failures.
    pub pause_level: i64,
    /// Why: the error code.
    pub error_code: Option<String>,
    /// Why: the text.
    pub error_text: Option<String>,
}

/// A mail to insert (CLI `enqueue`, `test-send`, the demo).
#[derive(Debug, Clone, Default)]
pub struct NewMail {
    /// `to_addrs`.
    pub to: String,
    /// `cc_addrs`.
    pub cc: String,
    /// `bcc_addrs`.
    pub bcc: String,
    /// `subject`.
    pub subject: String,
    /// `body_text`.
    pub body_text: String,
    /// `body_html`.
    pub body_html: Option<String>,
    /// `priority`.
    pub priority: i64,
    /// `send_after`.
    pub send_after: Option<String>,
    /// `max_attempts`.
    pub max_attempts: Option<u32>,
    /// `headers`: extra header lines.
    pub headers: Option<String>,
    /// Attachments stored in the row: file name, content type, content.
    pub attachments: Vec<(String, String, Vec<u8>)>,
}

/// Counts and the oldest waiting mail, for `mailqueue status`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Summary {
    /// Rows per status.
    pub counts: Vec<(String, i64)>,
    /// The oldest `queued` row's `created_at`.
    pub oldest_waiting: Option<String>,
    /// The pause.
    pub state: QueueState,
}

/// A handle on the queue file. Cheap to clone; one SQLite connection behind a mutex.
#[derive(Clone)]
pub struct Store {
    /// The connection. A mutex, not a pool: the daemon's writes are serial by design, and a
    /// second connection in the same process would only contend for SQLite's write lock.
    /// `None` after storage trouble that the connection cannot recover from by itself (a file
    /// opened read-only stays read-only): the next call opens it again.
    conn: Arc<Mutex<Option<Connection>>>,
    /// The file, for messages.
    path: PathBuf,
    /// This process's [`OwnerLock`], taken before its first claim and held for its life.
    owner: Arc<Mutex<Option<OwnerLock>>>,
    /// Claimed rows' extra headers (by id), read in the claim's transaction when the row has
    /// no attachments, so [`Store::extras`] needs no second trip to the blocking pool. Bounded:
    /// each claim replaces the whole map with its own rows (at most `commit_batch` of them).
    prefetched: Arc<Mutex<Prefetched>>,
}

/// Claimed rows' ids and their `headers`, read by the claim (see `Store::prefetched`).
type Prefetched = std::collections::HashMap<i64, Option<String>>;

fn now_ts() -> String {
    ts(SystemTime::now())
}

/// The settings every connection gets: the busy timeout, WAL, `synchronous`, foreign keys.
fn configure(conn: &Connection, path: &Path) -> Result<(), Error> {
    conn.busy_timeout(BUSY_TIMEOUT)?;
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(Error::db(format!(
            "{} cannot use WAL mode (got {mode})",
            path.display()
        )));
    }
    // NORMAL in WAL mode: a power loss may forget the last outcomes, which makes a mail
    // sent again (a duplicate), never lost. See docs/queue-table.md.
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    Ok(())
}

/// Opens the (already migrated) queue file again after storage trouble.
fn reconnect(path: &Path) -> Result<Connection, Error> {
    let conn = Connection::open(path)?;
    configure(&conn, path)?;
    tracing::debug!(database = %path.display(), "Opened the queue database again.");
    Ok(conn)
}

/// Names the queue file in a storage error ("attempt to write a readonly database" alone does
/// not say which file).
fn with_file(e: Error, path: &Path) -> Error {
    match e {
        Error::Database {
            detail,
            storage: Some(s),
        } if !detail.contains(&*path.to_string_lossy()) => Error::Database {
            detail: format!("{}: {detail}", path.display()),
            storage: Some(s),
        },
        e => e,
    }
}

/// The `WHERE` clause of a due row, always read through the partial index `mail_queue_waiting`
/// (`INDEXED BY`): left to itself SQLite picks `mail_queue_status` and sorts every queued row
/// for each claim — 16 ms a claim with 20 000 rows waiting, measured by benches/e2e.sh. `?1` is
/// now. While the account is paused (and the pause has not run out), only rows whose own
/// `max_attempts` is 1 — a CRM's test mail — are due.
const DUE: &str = "status = 'queued' AND next_attempt_at <= ?1
     AND (send_after IS NULL OR coalesce(strftime('%Y-%m-%dT%H:%M:%fZ', send_after), '') <= ?1)
     AND (max_attempts = 1 OR NOT EXISTS
          (SELECT 1 FROM queue_state WHERE id = 1 AND paused = 1 AND paused_until > ?1))";

impl Store {
    /// Opens (creating if needed) and migrates the queue file. Blocking: call it before the
    /// runtime's work starts or through `spawn_blocking`.
    pub fn open(path: &Path) -> Result<Store, Error> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            if !dir.is_dir() {
                return Err(Error::Config {
                    problems: vec![format!(
                        "queue.database: the directory {} does not exist",
                        dir.display()
                    )],
                });
            }
        }
        let mut conn = Connection::open(path).map_err(|e| Error::Config {
            problems: vec![format!(
                "queue.database: cannot open {}: {e}",
                path.display()
            )],
        })?;
        configure(&conn, path).map_err(|e| with_file(e, path))?;
        // A new file reclaims the pages of purged rows a little at a time (housekeeping runs
        // `incremental_vacuum`); this can only be chosen before the first table exists.
        let tables: i64 = conn.query_row("SELECT count(*) FROM sqlite_schema", [], |r| r.get(0))?;
        if tables == 0 {
            conn.pragma_update(None, "auto_vacuum", "INCREMENTAL")?;
        }
        migrate(&mut conn, path).map_err(|e| with_file(e, path))?;
        Ok(Store {
            conn: Arc::new(Mutex::new(Some(conn))),
            path: path.to_path_buf(),
            owner: Arc::new(Mutex::new(None)),
            prefetched: Arc::default(),
        })
    }

    /// The queue file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on the connection in tokio's blocking pool, never on a runtime thread.
    ///
    /// Storage trouble (a read-only file, an I/O error, a file that cannot be opened) closes
    /// the connection, and the next call opens it afresh, so the daemon recovers when the admin
    /// fixes the file, without a restart; the error names the file.
    pub async fn call<T, F>(&self, f: F) -> Result<T, Error>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, Error> + Send + 'static,
    {
        let (conn, path) = (self.conn.clone(), self.path.clone());
        tokio::task::spawn_blocking(move || {
            let mut slot = conn.lock().unwrap_or_else(|p| p.into_inner());
            let c = match &mut *slot {
                Some(c) => c,
                None => slot.insert(reconnect(&path).map_err(|e| with_file(e, &path))?),
            };
            let r = f(c).map_err(|e| with_file(e, &path));
            if let Err(e) = &r {
                if e.storage().is_some_and(|s| s.needs_reopen()) {
                    tracing::debug!(database = %path.display(), "Closing the queue database connection after storage trouble; the next try opens it again.");
                    // Closed before the next open: SQLite shares one -shm mapping per file in a
                    // process, and a read-only one must go for a writable one to come.
                    *slot = None;
                }
            }
            r
        })
        .await
        .map_err(|e| Error::db(format!("database task failed: {e}")))?
    }

    /// Whether this process can write the queue file (SQLite opens a file it may not write
    /// read-only, and every write then fails): `Err` with the read-only error if not.
    pub async fn check_writable(&self) -> Result<(), Error> {
        self.call(|c| {
            if c.is_readonly(rusqlite::MAIN_DB)? {
                return Err(Error::Database {
                    detail: "attempt to write a readonly database".into(),
                    storage: Some(crate::error::Storage::ReadOnly),
                });
            }
            Ok(())
        })
        .await
    }

    /// Puts rows left in `sending` by a crash back to `queued`, due now; their open attempt is
    /// recorded as `in_doubt` (the mail may have gone out). Only safe when no other process is
    /// delivering from this file (the caller holds the exclusive run lock).
    pub async fn recover_sending(&self, text: String, hold: bool) -> Result<Vec<i64>, Error> {
        let status = if hold { "held" } else { "queued" };
        self.call(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let now = now_ts();
            let ids: Vec<i64> = {
                let mut st =
                    tx.prepare("SELECT id FROM mail_queue WHERE status = 'sending' ORDER BY id")?;
                let v = st.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?;
                v
            };
            recover_rows(&tx, &ids, &now, &text, status)?;
            tx.commit()?;
            Ok(ids)
        })
        .await
    }

    /// Recovers the rows left `sending` by processes that are gone, while others may be
    /// delivering: a row whose claimer's [`OwnerLock`] file can be locked (so that process has
    /// ended) is settled as [`Store::recover_sending`] does (its open attempt `in_doubt`; the
    /// row `queued`, due now, or `held`), and the file is removed. A row whose claimer still
    /// holds its lock is never touched. Lock files of ended processes with nothing left
    /// `sending` are removed too.
    pub async fn recover_orphans(&self, text: String, hold: bool) -> Result<Orphans, Error> {
        let status = if hold { "held" } else { "queued" };
        let db = self.path.clone();
        self.call(move |c| {
            let mut out = Orphans::default();
            for (token, path) in owner_files(&db)? {
                // Read-only is enough for flock, whoever created the file.
                let file = match std::fs::File::open(&path) {
                    Ok(f) => f,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue, // just removed
                    Err(e) => return Err(Error::db(format!("cannot open the lock file {}: {e}", path.display()))),
                };
                match file.try_lock() {
                    Ok(()) => {}
                    Err(std::fs::TryLockError::WouldBlock) => continue, // alive
                    Err(std::fs::TryLockError::Error(e)) => {
                        return Err(Error::db(format!("cannot lock {}: {e}", path.display())))
                    }
                }
                // Its process has ended: nobody delivers under this token any more.
                let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
                let ids: Vec<i64> = {
                    let mut st = tx.prepare(
                        "SELECT id FROM mail_queue WHERE status = 'sending' AND claimed_by = ?1 ORDER BY id",
                    )?;
                    let v = st.query_map(params![token], |r| r.get(0))?.collect::<Result<_, _>>()?;
                    v
                };
                recover_rows(&tx, &ids, &now_ts(), &text, status)?;
                tx.commit()?;
                out.recovered.extend(ids);
                // Removed while we hold its lock; a failure only leaves it for the next round.
                let _ = std::fs::remove_file(&path);
            }
            remove_stale_new_owner_files(&db);
            let claimed: Vec<(i64, String)> = {
                let mut st = c.prepare(
                    "SELECT id, claimed_by FROM mail_queue WHERE status = 'sending' AND claimed_by IS NOT NULL
                     ORDER BY id LIMIT 1000",
                )?;
                let v = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<Result<_, _>>()?;
                v
            };
            for (id, token) in claimed {
                if valid_token(&token) && owner_path(&db, &token).exists() {
                    out.live += 1;
                } else {
                    out.unknown.push(id);
                }
            }
            Ok(out)
        })
        .await
    }

    /// Claims the most urgent due row (highest priority, then oldest): `queued` → `sending`,
    /// attempts + 1, a Message-ID if it has none, and a `mail_attempt` row opened. `None` if
    /// nothing is due (or another process took it first).
    pub async fn claim(
        &self,
        now: SystemTime,
        msgid_domain: String,
    ) -> Result<Option<Claim>, Error> {
        let job = self.claim_job(now, msgid_domain, 1);
        self.call(move |c| Ok(job(c)?.pop())).await
    }

    /// Claims up to `n` due rows, most urgent first, in one transaction (each as
    /// [`Store::claim`] does): a daemon draining an unpaced backlog claims a batch at once.
    pub async fn claim_many(
        &self,
        now: SystemTime,
        msgid_domain: String,
        n: usize,
    ) -> Result<Vec<Claim>, Error> {
        self.call(self.claim_job(now, msgid_domain, n)).await
    }

    // Not reformatted: the body is as it was inside `self.call(..)`, where rustfmt left it.
    #[rustfmt::skip]
    fn claim_job(&self, now: SystemTime, msgid_domain: String, n: usize)
        -> impl FnOnce(&mut Connection) -> Result<Vec<Claim>, Error> + Send + 'static {
        let now = ts(now);
        let (owner, db) = (self.owner.clone(), self.path.clone());
        let prefetched = self.prefetched.clone();
        move |c: &mut Connection| {
            let token = owner_token(&owner, &db)?;
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let sql = format!("SELECT id FROM mail_queue INDEXED BY mail_queue_waiting WHERE {DUE} ORDER BY priority DESC, created_at, id LIMIT ?2");
            let ids: Vec<i64> = tx.prepare_cached(&sql)?
                .query_map(params![now, n.max(1) as i64], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            if ids.is_empty() {
                return Ok(vec![]);
            }
            let paused: bool = tx
                .prepare_cached("SELECT paused = 1 FROM queue_state WHERE id = 1")?
                .query_row([], |r| r.get(0))?;
            let mut claims = Vec::with_capacity(ids.len());
            let mut quick = Prefetched::new();
            for id in ids {
            let new_id = format!("<{}@{}>", uuid::Uuid::new_v4().simple(), msgid_domain);
            let claim = tx.prepare_cached(
                "UPDATE mail_queue SET status = 'sending', attempts = attempts + 1, updated_at = ?2,
                        message_id = coalesce(message_id, ?3), claimed_by = ?4
                 WHERE id = ?1 AND status = 'queued'
                 RETURNING id, message_id, attempts, max_attempts, to_addrs, cc_addrs, bcc_addrs, reply_to,
                           subject, body_text, body_html, created_at, send_after",
            )?
            .query_row(params![id, now, new_id, token], |r| {
                Ok(Claim {
                    id: r.get(0)?,
                    attempt_id: 0,
                    message_id: r.get(1)?,
                    attempts: r.get(2)?,
                    max_attempts: r.get(3)?,
                    to_addrs: r.get(4)?,
                    cc_addrs: r.get(5)?,
                    bcc_addrs: r.get(6)?,
                    reply_to: r.get(7)?,
                    subject: r.get(8)?,
                    body_text: r.get(9)?,
                    body_html: r.get(10)?,
                    created_at: r.get(11)?,
                    send_after: r.get(12)?,
                    settled: vec![],
                    while_paused: paused,
                    doubts_before: 0,
                })
            });
            let mut claim = match claim {
                Ok(c) => c,
                Err(
                    e @ (rusqlite::Error::FromSqlConversionFailure(..)
                    | rusqlite::Error::InvalidColumnType(..)
                    | rusqlite::Error::IntegralValueOutOfRange(..)
                    | rusqlite::Error::Utf8Error(..)),
                ) => {
                    // A column of the wrong type (a BLOB subject, text that is not UTF-8, a
                    // negative max_attempts): fail the row with the reason, keep going.
                    let text = format!("a column has a value of the wrong type ({e})");
                    tx.execute(
                        "UPDATE mail_queue SET status = 'failed', updated_at = ?2, error_code = 'invalid_row', last_error = ?3 WHERE id = ?1",
                        params![id, now, text],
                    )?;
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            tx.prepare_cached("INSERT INTO mail_attempt (mail_id, started_at) VALUES (?1, ?2)")?
                .execute(params![id, now])?;
            claim.attempt_id = tx.last_insert_rowid();
            claim.doubts_before = tx
                .prepare_cached("SELECT count(*) FROM mail_attempt WHERE mail_id = ?1 AND outcome = 'in_doubt'")?
                .query_row(params![id], |r| r.get(0))?;
            crate::failpoint::crash("crash-in-claim");
            claim.settled = {
                let mut st = tx.prepare_cached(
                    "SELECT address, status FROM mail_recipient WHERE mail_id = ?1 AND status != 'pending'",
                )?;
                let v = st.query_map(params![id], |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<Result<_, _>>()?;
                v
            };
            if let Some(h) = prefetch_headers(&tx, id)? {
                quick.insert(id, h);
            }
            claims.push(claim);
            }
            tx.commit()?;
            *prefetched.lock().unwrap_or_else(|p| p.into_inner()) = quick;
            Ok(claims)
        }
    }

    /// [`Store::record_many`], then [`Store::claim_many`] of `n` rows (none if `n` is 0), in one
    /// trip to the blocking pool (two transactions, the outcomes committed first, exactly as the
    /// two calls one after the other): the scheduler draining a backlog records what it sent and
    /// claims what comes next at once. An error recording skips the claim (`Err`); the claim's
    /// own result comes back as is.
    pub async fn record_then_claim(
        &self,
        recs: Vec<Record>,
        now: SystemTime,
        msgid_domain: String,
        n: usize,
    ) -> Result<Result<Vec<Claim>, Error>, Error> {
        let record = Self::record_job(recs);
        let claim = (n > 0).then(|| self.claim_job(now, msgid_domain, n));
        self.call(move |c| {
            record(c)?;
            Ok(claim.map_or(Ok(vec![]), |claim| claim(c)))
        })
        .await
    }

    /// Inserts a test mail already claimed (`sending`, one attempt, `max_attempts` 1), so the
    /// daemon never picks it up while `test-send` delivers it in-process.
    pub async fn insert_claimed(
        &self,
        mail: NewMail,
        msgid_domain: String,
    ) -> Result<Claim, Error> {
        let id = self
            .enqueue_with(mail, "sending", Some(msgid_domain))
            .await?;
        self.call(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let now = now_ts();
            tx.execute("INSERT INTO mail_attempt (mail_id, started_at) VALUES (?1, ?2)", params![id, now])?;
            let attempt_id = tx.last_insert_rowid();
            let claim = tx.query_row(
                "SELECT id, message_id, attempts, max_attempts, to_addrs, cc_addrs, bcc_addrs, reply_to,
                        subject, body_text, body_html, created_at, send_after
                 FROM mail_queue WHERE id = ?1",
                params![id],
                |r| {
                    Ok(Claim {
                        id: r.get(0)?,
                        attempt_id,
                        message_id: r.get(1)?,
                        attempts: r.get(2)?,
                        max_attempts: r.get(3)?,
                        to_addrs: r.get(4)?,
                        cc_addrs: r.get(5)?,
                        bcc_addrs: r.get(6)?,
                        reply_to: r.get(7)?,
                        subject: r.get(8)?,
                        body_text: r.get(9)?,
                        body_html: r.get(10)?,
                        created_at: r.get(11)?,
                        send_after: r.get(12)?,
                        settled: vec![],
                        while_paused: false,
                        doubts_before: 0,
                    })
                },
            )?;
            tx.commit()?;
            Ok(claim)
        })
        .await
    }

    /// Writes the outcome of one attempt in one short transaction: the row, its recipients, the
    /// attempt, and the account's pause.
    pub async fn record(&self, rec: Record) -> Result<(), Error> {
        self.record_many(vec![rec]).await
    }

    /// Writes the outcomes of several attempts, in order, in one transaction (all or none).
    pub async fn record_many(&self, recs: Vec<Record>) -> Result<(), Error> {
        self.call(Self::record_job(recs)).await
    }

    fn record_job(
        recs: Vec<Record>,
    ) -> impl FnOnce(&mut Connection) -> Result<(), Error> + Send + 'static {
        move |c: &mut Connection| {
            if recs.is_empty() {
                return Ok(());
            }
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            for rec in &recs {
                record_in(&tx, rec)?;
            }
            tx.commit()?;
            Ok(())
        }
    }
}

/// One outcome, written inside the caller's transaction (see [`Store::record_many`]).
// Not reformatted: the body is as it was inside `self.call(..)`, where rustfmt left it.
#[rustfmt::skip]
fn record_in(tx: &rusqlite::Transaction<'_>, rec: &Record) -> Result<(), Error> {
    let now_t = SystemTime::now();
    let now = ts(now_t);
    let sent_at = (rec.status == "sent").then(|| now.clone());
    let changed = tx.prepare_cached(
        "UPDATE mail_queue SET status = ?2, updated_at = ?3,
                next_attempt_at = coalesce(?4, next_attempt_at),
                attempts = attempts - ?5,
                sent_at = coalesce(?6, sent_at),
                error_code = ?7, last_error = ?8, smtp_reply = coalesce(?9, smtp_reply)
         WHERE id = ?1",
    )?
    .execute(params![
        rec.id,
        rec.status,
        now,
        rec.next_attempt_at.map(ts),
        if rec.counts { 0 } else { 1 },
        sent_at,
        rec.error_code,
        rec.error_text,
        rec.smtp_reply,
    ])?;
    if changed == 0 {
        // The CRM deleted the row meanwhile: nothing left to record it on.
        tracing::warn!(mail_id = rec.id, "The row was deleted while it was being sent; its outcome is not recorded.");
        return Ok(());
    }
    for (addr, kind, fate, reply) in &rec.rcpts {
        tx.prepare_cached(
            "INSERT INTO mail_recipient (mail_id, address, kind, status, smtp_reply, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT (mail_id, address) DO UPDATE SET
                status = excluded.status, smtp_reply = excluded.smtp_reply, updated_at = excluded.updated_at",
        )?
        .execute(params![rec.id, addr, kind, fate.name(), reply, now])?;
    }
    tx.prepare_cached(
        "UPDATE mail_attempt SET finished_at = ?2, outcome = ?3, error_code = ?4, error_text = ?5, smtp_reply = ?6,
                started_at = coalesce(?7, started_at)
         WHERE id = ?1",
    )?
    .execute(params![rec.attempt_id, now, rec.outcome.name(), rec.error_code, rec.error_text, rec.smtp_reply, rec.started_at.map(ts)])?;
    if let Some((_, level)) = &rec.pause {
        let (was_paused, old_level): (bool, i64) =
            tx.query_row("SELECT paused = 1, pause_level FROM queue_state WHERE id = 1", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })?;
        let new_level = old_level + 1;
        let wait = crate::policy::pause_for(&level.steps, new_level as u32);
        tx.execute(
            "UPDATE queue_state SET paused = 1, paused_since = coalesce(paused_since, ?1),
                    paused_until = ?2, pause_level = ?3, error_code = ?4, error_text = ?5, updated_at = ?1
             WHERE id = 1",
            params![now, ts(now_t + wait), new_level, rec.error_code, rec.error_text],
        )?;
        if !was_paused {
            // Every waiting row shows why it waits (bounded: one statement, once per pause).
            tx.execute(
                "UPDATE mail_queue SET last_error = ?1, error_code = ?2 WHERE status = 'queued'",
                params![rec.error_text, rec.error_code],
            )?;
        }
    } else if rec.resume {
        tx.prepare_cached(
            "UPDATE queue_state SET paused = 0, paused_since = NULL, paused_until = NULL, pause_level = 0,
                    error_code = NULL, error_text = NULL, updated_at = ?1
             WHERE id = 1 AND (paused = 1 OR pause_level > 0)",
        )?
        .execute(params![now])?;
    }
    Ok(())
}

impl Store {
    /// Gives a claimed row back untouched: `queued` again, the attempt neither counted nor
    /// recorded (used when stopping before anything was sent).
    pub async fn release(&self, id: i64, attempt_id: i64) -> Result<(), Error> {
        self.release_many(vec![(id, attempt_id)]).await
    }

    /// [`Store::release`] for several claimed rows (`(id, attempt_id)`), in one transaction.
    pub async fn release_many(&self, claims: Vec<(i64, i64)>) -> Result<(), Error> {
        let prefetched = self.prefetched.clone();
        self.call(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let now = now_ts();
            for (id, attempt_id) in &claims {
                tx.prepare_cached("DELETE FROM mail_attempt WHERE id = ?1")?
                    .execute(params![attempt_id])?;
                tx.prepare_cached(
                    "UPDATE mail_queue SET status = 'queued', attempts = attempts - 1, updated_at = ?2
                     WHERE id = ?1 AND status = 'sending'",
                )?
                .execute(params![id, now])?;
            }
            tx.commit()?;
            let mut quick = prefetched.lock().unwrap_or_else(|p| p.into_inner());
            for (id, _) in &claims {
                quick.remove(id);
            }
            Ok(())
        })
        .await
    }

    /// The newest `limit` attempt start times: the send history the pace is rebuilt from.
    pub async fn send_history(&self, limit: usize) -> Result<Vec<SystemTime>, Error> {
        self.call(move |c| {
            let mut st =
                c.prepare("SELECT started_at FROM mail_attempt
                 WHERE error_code IS NULL OR error_code NOT IN ('invalid_row', 'invalid_address', 'too_large', 'expired')
                 ORDER BY started_at DESC LIMIT ?1")?;
            let rows: Vec<String> = st
                .query_map(params![limit as i64], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            Ok(rows.iter().filter_map(|s| parse_ts(s)).collect())
        })
        .await
    }

    /// `queue_state`.
    pub async fn queue_state(&self) -> Result<QueueState, Error> {
        self.call(|c| read_state(c)).await
    }

    /// Lifts the pause by hand (`mailqueue resume`). Returns whether it was paused.
    pub async fn resume(&self) -> Result<bool, Error> {
        self.call(|c| {
            let n = c.execute(
                "UPDATE queue_state SET paused = 0, paused_since = NULL, paused_until = NULL, pause_level = 0,
                        error_code = NULL, error_text = NULL, updated_at = ?1 WHERE id = 1 AND paused = 1",
                params![now_ts()],
            )?;
            Ok(n > 0)
        })
        .await
    }

    /// Inserts a new `queued` mail and returns its id.
    pub async fn enqueue(&self, mail: NewMail) -> Result<i64, Error> {
        self.enqueue_with(mail, "queued", None).await
    }

    async fn enqueue_with(
        &self,
        m: NewMail,
        status: &'static str,
        msgid_domain: Option<String>,
    ) -> Result<i64, Error> {
        let (owner, db) = (self.owner.clone(), self.path.clone());
        self.call(move |c| {
            let attempts = if status == "sending" { 1 } else { 0 };
            // A row inserted already claimed (a test mail) carries this process's token.
            let claimed_by = if status == "sending" { Some(owner_token(&owner, &db)?) } else { None };
            let msgid = msgid_domain.map(|d| format!("<{}@{}>", uuid::Uuid::new_v4().simple(), d));
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            tx.execute(
                "INSERT INTO mail_queue (to_addrs, cc_addrs, bcc_addrs, subject, body_text, body_html, priority,
                                         send_after, max_attempts, status, attempts, message_id, headers, claimed_by)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
                params![
                    m.to,
                    m.cc,
                    m.bcc,
                    m.subject,
                    m.body_text,
                    m.body_html,
                    m.priority,
                    m.send_after,
                    m.max_attempts,
                    status,
                    attempts,
                    msgid,
                    m.headers,
                    claimed_by
                ],
            )?;
            let id = tx.last_insert_rowid();
            for (name, ct, content) in &m.attachments {
                tx.execute(
                    "INSERT INTO mail_attachment (mail_id, file_name, content_type, content) VALUES (?1, ?2, ?3, ?4)",
                    params![id, name, ct, content],
                )?;
            }
            tx.commit()?;
            Ok(id)
        })
        .await
    }

    /// Counts per status, the oldest waiting mail and the pause.
    pub async fn summary(&self) -> Result<Summary, Error> {
        self.call(|c| {
            let mut counts = Vec::new();
            for s in STATUSES {
                let n: i64 = c.query_row("SELECT count(*) FROM mail_queue WHERE status = ?1", params![s], |r| r.get(0))?;
                counts.push((s.to_string(), n));
            }
            let oldest_waiting = c
                .query_row(
                    "SELECT created_at FROM mail_queue WHERE status = 'queued' ORDER BY created_at LIMIT 1",
                    [],
                    |r| r.get(0),
                )
                .optional()?;
            Ok(Summary { counts, oldest_waiting, state: read_state(c)? })
        })
        .await
    }

    /// Rows as column → value maps, newest first, optionally of one status; at most `limit`.
    pub async fn list(
        &self,
        status: Option<String>,
        limit: usize,
    ) -> Result<Vec<serde_json::Map<String, serde_json::Value>>, Error> {
        self.call(move |c| {
            let sql = "SELECT id, status, priority, attempts, to_addrs, subject, created_at, next_attempt_at,
                              sent_at, error_code, last_error
                       FROM mail_queue WHERE (?1 IS NULL OR status = ?1) ORDER BY id DESC LIMIT ?2";
            rows_as_maps(c, sql, params![status, limit as i64])
        })
        .await
    }

    /// One row with its recipients and attempts, for `mailqueue show`.
    pub async fn show(&self, id: i64) -> Result<serde_json::Value, Error> {
        self.call(move |c| {
            let row = rows_as_maps(c, "SELECT * FROM mail_queue WHERE id = ?1", params![id])?;
            let Some(row) = row.into_iter().next() else {
                return Err(Error::Usage { detail: format!("no mail with id {id}") });
            };
            let rcpts = rows_as_maps(
                c,
                "SELECT address, kind, status, smtp_reply, updated_at FROM mail_recipient WHERE mail_id = ?1 ORDER BY id",
                params![id],
            )?;
            let attempts = rows_as_maps(
                c,
                "SELECT id, started_at, finished_at, outcome, error_code, error_text, smtp_reply
                 FROM mail_attempt WHERE mail_id = ?1 ORDER BY id",
                params![id],
            )?;
            Ok(serde_json::json!({ "mail": row, "recipients": rcpts, "attempts": attempts }))
        })
        .await
    }

    /// Puts failed (or held, cancelled) rows back in the queue, due now, with fresh attempts;
    /// recipients refused earlier are tried again, those that accepted are not.
    pub async fn retry(&self, id: Option<i64>) -> Result<usize, Error> {
        self.call(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let now = now_ts();
            let ids: Vec<i64> = match id {
                Some(id) => {
                    let st: Option<String> =
                        tx.query_row("SELECT status FROM mail_queue WHERE id = ?1", params![id], |r| r.get(0)).optional()?;
                    match st.as_deref() {
                        None => return Err(Error::Usage { detail: format!("no mail with id {id}") }),
                        Some("failed" | "held" | "cancelled" | "queued") => vec![id],
                        Some(s) => {
                            return Err(Error::Usage { detail: format!("mail {id} is {s}; only failed, held, cancelled or queued mails can be retried") })
                        }
                    }
                }
                None => {
                    let mut st = tx.prepare("SELECT id FROM mail_queue WHERE status = 'failed'")?;
                    let v = st.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?;
                    v
                }
            };
            for id in &ids {
                tx.execute(
                    "UPDATE mail_queue SET status = 'queued', attempts = 0, next_attempt_at = ?2, updated_at = ?2,
                            last_error = NULL, error_code = NULL WHERE id = ?1",
                    params![id, now],
                )?;
                tx.execute(
                    "UPDATE mail_recipient SET status = 'pending', updated_at = ?2 WHERE mail_id = ?1 AND status = 'failed'",
                    params![id, now],
                )?;
            }
            tx.commit()?;
            Ok(ids.len())
        })
        .await
    }

    /// Cancels a waiting row (`queued` or `held`).
    pub async fn cancel(&self, id: i64) -> Result<(), Error> {
        self.call(move |c| {
            let n = c.execute(
                "UPDATE mail_queue SET status = 'cancelled', updated_at = ?2 WHERE id = ?1 AND status IN ('queued', 'held')",
                params![id, now_ts()],
            )?;
            if n == 1 {
                return Ok(());
            }
            let st: Option<String> =
                c.query_row("SELECT status FROM mail_queue WHERE id = ?1", params![id], |r| r.get(0)).optional()?;
            Err(Error::Usage {
                detail: match st {
                    None => format!("no mail with id {id}"),
                    Some(s) => format!("mail {id} is {s}; only queued or held mails can be cancelled"),
                },
            })
        })
        .await
    }

    /// Deletes finished rows (sent, failed, cancelled) last updated before `cutoff`, with their
    /// recipients and attempts, in batches so no transaction is long.
    pub async fn purge(&self, cutoff: SystemTime) -> Result<usize, Error> {
        self.purge_status(&["sent", "failed", "cancelled"], cutoff)
            .await
    }

    /// Like [`Store::purge`], for the given finished statuses only.
    pub async fn purge_status(
        &self,
        statuses: &'static [&'static str],
        cutoff: SystemTime,
    ) -> Result<usize, Error> {
        let cutoff = ts(cutoff);
        let list = statuses
            .iter()
            .map(|s| format!("'{s}'"))
            .collect::<Vec<_>>()
            .join(",");
        let mut total = 0;
        loop {
            let cutoff = cutoff.clone();
            let list = list.clone();
            let n = self
                .call(move |c| {
                    let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
                    let ids: Vec<i64> = {
                        let mut st = tx.prepare(
                            &format!("SELECT id FROM mail_queue WHERE status IN ({list}) AND updated_at < ?1 LIMIT 500"),
                        )?;
                        let v = st.query_map(params![cutoff], |r| r.get(0))?.collect::<Result<_, _>>()?;
                        v
                    };
                    for id in &ids {
                        tx.execute("DELETE FROM mail_recipient WHERE mail_id = ?1", params![id])?;
                        tx.execute("DELETE FROM mail_attempt WHERE mail_id = ?1", params![id])?;
                        tx.execute("DELETE FROM mail_attachment WHERE mail_id = ?1", params![id])?;
                        tx.execute("DELETE FROM mail_queue WHERE id = ?1", params![id])?;
                    }
                    tx.commit()?;
                    Ok(ids.len())
                })
                .await?;
            total += n;
            if n < 500 {
                return Ok(total);
            }
        }
    }
}

/// An advisory lock on `<queue file>.lock`, held by every process that delivers from the file.
///
/// Delivering processes hold it shared. Recovering every row left `sending` is only safe when
/// no other process is delivering (one of them may be sending that very row), so start-up
/// recovery first tries to take it exclusively and skips that if another process holds it.
/// The rows of one process that has ended are recovered any time through its own
/// [`OwnerLock`] ([`Store::recover_orphans`]).
pub struct RunLock {
    /// The open lock file; the lock lives as long as it does.
    file: std::fs::File,
}

impl RunLock {
    /// Takes the lock: exclusively if no other process holds it (then recovery is safe; call
    /// [`RunLock::downgrade`] after it), else shared (waiting while another process recovers).
    pub fn acquire(db: &Path) -> Result<(RunLock, bool), Error> {
        let path = PathBuf::from(format!("{}.lock", db.display()));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| Error::db(format!("cannot open the lock file {}: {e}", path.display())))?;
        let exclusive = file.try_lock().is_ok();
        if !exclusive {
            file.lock_shared()
                .map_err(|e| Error::db(format!("cannot lock {}: {e}", path.display())))?;
        }
        Ok((RunLock { file }, exclusive))
    }

    /// Lets other delivering processes in (after recovery).
    pub fn downgrade(&self) -> Result<(), Error> {
        self.file
            .lock_shared()
            .map_err(|e| Error::db(format!("cannot downgrade the run lock: {e}")))
    }
}

/// Settles rows left `sending` by a process that ended mid-attempt: the open attempt becomes
/// `in_doubt` (the mail may have gone out), the row `status` (`queued`, due now, or `held`).
fn recover_rows(
    tx: &rusqlite::Transaction<'_>,
    ids: &[i64],
    now: &str,
    text: &str,
    status: &str,
) -> Result<(), Error> {
    for id in ids {
        tx.execute(
            // started_at becomes now: the mail may have gone out just before the crash, and
            // the pace is rebuilt from these times (a claim time would be too early).
            "UPDATE mail_attempt SET finished_at = ?2, started_at = ?2, outcome = 'in_doubt', error_code = 'in_doubt', error_text = ?3
             WHERE mail_id = ?1 AND finished_at IS NULL",
            params![id, now, text],
        )?;
        tx.execute(
            "UPDATE mail_queue SET status = ?4, next_attempt_at = ?2, updated_at = ?2,
                    last_error = ?3, error_code = 'in_doubt'
             WHERE id = ?1",
            params![id, now, text, status],
        )?;
    }
    Ok(())
}

/// What [`Store::recover_orphans`] found.
#[derive(Debug, Default)]
pub struct Orphans {
    /// Rows whose claimer had ended: settled (in doubt).
    pub recovered: Vec<i64>,
    /// Rows `sending` under a process that is alive: left alone.
    pub live: usize,
    /// Rows `sending` whose claimer's lock file is missing (deleted by hand?): left alone, for
    /// the next start's recovery.
    pub unknown: Vec<i64>,
}

/// The mark of a process that claims rows: the lock file `<queue file>.owner-<token>.lock`,
/// held exclusively (flock) from before its first claim until the process ends, and the
/// token written into `mail_queue.claimed_by` by each of its claims. The kernel drops the lock
/// when the process ends, however it ends (SIGKILL included): a file that can be locked names a
/// process that is gone, and its `sending` rows can be recovered while others run.
struct OwnerLock {
    /// `<pid>-<random>`: unique, so a token is never reused by a later process.
    token: String,
    /// The open, locked file.
    _file: std::fs::File,
}

/// Where the owner lock files of `db` live (next to it) and how their names start.
fn owner_dir_and_prefix(db: &Path) -> (PathBuf, String) {
    let dir = db
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    let name = db
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    (dir, format!("{name}.owner-"))
}

fn owner_path(db: &Path, token: &str) -> PathBuf {
    let (dir, prefix) = owner_dir_and_prefix(db);
    dir.join(format!("{prefix}{token}.lock"))
}

/// A token as mailqueue writes it (the column is the CRM's to read, not to trust: it names a
/// file).
fn valid_token(t: &str) -> bool {
    !t.is_empty() && t.len() <= 64 && t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// The owner lock files next to `db`: (token, path).
fn owner_files(db: &Path) -> Result<Vec<(String, PathBuf)>, Error> {
    let (dir, prefix) = owner_dir_and_prefix(db);
    let entries = std::fs::read_dir(&dir)
        .map_err(|e| Error::db(format!("cannot list {}: {e}", dir.display())))?;
    let mut out = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(token) = name
            .strip_prefix(&prefix)
            .and_then(|r| r.strip_suffix(".lock"))
            .filter(|t| valid_token(t))
        {
            out.push((token.to_string(), e.path()));
        }
    }
    Ok(out)
}

/// Removes `.lock.new` files left by a process that ended between creating its lock file and
/// renaming it into place (a window of microseconds; an hour-old one is certainly stale).
fn remove_stale_new_owner_files(db: &Path) {
    let (dir, prefix) = owner_dir_and_prefix(db);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > Duration::from_secs(3600));
        if name.starts_with(&prefix) && name.ends_with(".lock.new") && old {
            if let Ok(f) = std::fs::File::open(e.path()) {
                if f.try_lock().is_ok() {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }
}

impl OwnerLock {
    /// Creates and locks this process's file. It is locked under a temporary name and renamed
    /// into place, so a file under its final name is locked from the moment it exists (the
    /// daemon never sees it unlocked and takes its owner for gone).
    fn create(db: &Path) -> Result<OwnerLock, Error> {
        use std::io::Write;
        let random = uuid::Uuid::new_v4().simple().to_string();
        let token = format!("{}-{}", std::process::id(), &random[..12]);
        let path = owner_path(db, &token);
        let tmp = PathBuf::from(format!("{}.new", path.display()));
        let err = |e: std::io::Error| {
            Error::db(format!(
                "cannot create the lock file {}: {e}",
                path.display()
            ))
        };
        let mut file = std::fs::OpenOptions::new()
            .create_new(true)
            .write(true)
            .open(&tmp)
            .map_err(err)?;
        file.lock().map_err(err)?;
        let _ = writeln!(file, "{}", std::process::id());
        std::fs::rename(&tmp, &path).map_err(err)?;
        Ok(OwnerLock { token, _file: file })
    }
}

/// This process's claim token, creating its [`OwnerLock`] at the first claim. Blocking: call
/// it inside [`Store::call`].
fn owner_token(owner: &Mutex<Option<OwnerLock>>, db: &Path) -> Result<String, Error> {
    let mut o = owner.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(l) = o.as_ref() {
        return Ok(l.token.clone());
    }
    let l = OwnerLock::create(db)?;
    let token = l.token.clone();
    *o = Some(l);
    Ok(token)
}

/// The "one daemon per queue file" lock on `<queue file>.daemon.lock`, held exclusively by
/// `mailqueue run` for its whole life; the file holds the holder's pid for the message a second
/// daemon gets. The claim stays safe without it (two processes never claim one row); the lock
/// keeps two daemons from sharing one account's pace.
pub struct DaemonLock {
    /// The open, locked file.
    _file: std::fs::File,
}

impl DaemonLock {
    /// Takes the lock or explains who holds it.
    pub fn acquire(db: &Path) -> Result<DaemonLock, Error> {
        use std::io::{Read, Seek, Write};
        let path = PathBuf::from(format!("{}.daemon.lock", db.display()));
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| Error::db(format!("cannot open the lock file {}: {e}", path.display())))?;
        if file.try_lock().is_err() {
            let mut pid = String::new();
            let _ = file.read_to_string(&mut pid);
            return Err(Error::Usage {
                detail: format!(
                    "another mailqueue daemon (pid {}) is already running on {}; one daemon per queue file",
                    pid.trim(),
                    db.display()
                ),
            });
        }
        let _ = file.set_len(0);
        let _ = file.rewind();
        let _ = write!(file, "{}", std::process::id());
        Ok(DaemonLock { _file: file })
    }
}

/// An attachment row as the CRM wrote it.
#[derive(Debug, Clone)]
pub struct AttachmentRow {
    /// `file_name` (shown to the recipient; Japanese names are encoded per RFC 2231).
    pub file_name: String,
    /// `content_type`, e.g. `application/pdf`.
    pub content_type: String,
    /// `content`, when the file is in the row.
    pub content: Option<Vec<u8>>,
    /// `path`, when the file is on disk under `[queue] attachments_dir`.
    pub path: Option<String>,
}

impl Store {
    /// The row's extra headers and attachment rows (read after the claim, outside its
    /// transaction: attachments can be large).
    pub async fn extras(&self, id: i64) -> Result<(Option<String>, Vec<AttachmentRow>), Error> {
        use rusqlite::types::ValueRef;
        let quick = self
            .prefetched
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        if let Some(headers) = quick {
            return Ok((headers, vec![]));
        }
        self.call(move |c| {
            let bad = |what: String| Error::InvalidRow { detail: what };
            let headers: Option<String> = c.query_row("SELECT headers FROM mail_queue WHERE id = ?1", params![id], |r| {
                Ok(match r.get_ref(0)? {
                    ValueRef::Null => Ok(None),
                    ValueRef::Text(t) => Ok(Some(String::from_utf8_lossy(t).into_owned())),
                    _ => Err(()),
                })
            })?
            .map_err(|_| bad("headers is not text".into()))?;
            let mut st = c.prepare_cached(
                "SELECT file_name, content_type, content, path FROM mail_attachment WHERE mail_id = ?1 ORDER BY id",
            )?;
            let mut rows = st.query(params![id])?;
            let mut out = Vec::new();
            while let Some(r) = rows.next()? {
                let n = out.len() + 1;
                let text = |i: usize| -> Result<Option<String>, Error> {
                    match r.get_ref(i)? {
                        ValueRef::Null => Ok(None),
                        ValueRef::Text(t) => Ok(Some(String::from_utf8_lossy(t).into_owned())),
                        _ => Err(bad(format!("attachment {n}: a text column holds something else"))),
                    }
                };
                // A CRM that passes a string where bytes were meant still gets its file sent.
                let content = match r.get_ref(2)? {
                    ValueRef::Null => None,
                    ValueRef::Blob(b) | ValueRef::Text(b) => Some(b.to_vec()),
                    _ => return Err(bad(format!("attachment {n}: content is a number, not a file"))),
                };
                out.push(AttachmentRow {
                    file_name: text(0)?.unwrap_or_default(),
                    content_type: text(1)?.unwrap_or_else(|| "application/octet-stream".into()),
                    content,
                    path: text(3)?,
                });
            }
            Ok((headers, out))
        })
        .await
    }
}

/// When the next waiting row comes due, as [`Store::next_due`] finds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NextDue {
    /// A row is due now.
    Now,
    /// No row is due now; the earliest waiting row comes due at this moment (`None`: its time
    /// is text that is not a timestamp, so no moment can be computed).
    Later(Option<SystemTime>),
    /// No row is waiting at all.
    Nothing,
}

impl Store {
    /// When the next waiting row comes due (the same conditions as the claim's, so `Now` means
    /// the claim will find a row unless another process takes it first).
    ///
    /// Read inside `BEGIN IMMEDIATE`, like the claim: every write to the WAL is made under the
    /// write lock, so a writer whose WAL write the caller noticed (see `watch`) has finished its
    /// transaction — its frames synced and the commit made visible — before this reads. A plain
    /// read could run between a CRM's WAL write and its commit and see nothing.
    pub async fn next_due(&self, now: SystemTime) -> Result<NextDue, Error> {
        let now = ts(now);
        self.call(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            // `Now` is decided by the claim's own condition (DUE), so the two cannot disagree
            // (a `Now` the claim does not share would spin the loop). The moment a waiting row
            // becomes due is the latest of DUE's three conditions (text compares as SQLite
            // compares it there); the earliest such moment is the next due time. `max()` with
            // a NULL is NULL, hence the coalesces.
            let sql = format!(
                "SELECT (SELECT min(max(next_attempt_at,
                             CASE WHEN send_after IS NULL THEN ''
                                  ELSE coalesce(strftime('%Y-%m-%dT%H:%M:%fZ', send_after), '') END,
                             CASE WHEN max_attempts = 1 THEN ''
                                  ELSE coalesce((SELECT paused_until FROM queue_state WHERE id = 1 AND paused = 1), '') END))
                         FROM mail_queue INDEXED BY mail_queue_waiting WHERE status = 'queued'),
                        EXISTS (SELECT 1 FROM mail_queue INDEXED BY mail_queue_waiting WHERE {DUE})"
            );
            let (at, due): (Option<String>, bool) = tx
                .prepare_cached(&sql)?
                .query_row(params![now], |r| Ok((r.get(0)?, r.get(1)?)))?;
            tx.commit()?;
            Ok(match (at, due) {
                (_, true) => NextDue::Now,
                (None, false) => NextDue::Nothing,
                (Some(t), false) => NextDue::Later(parse_ts(&t)),
            })
        })
        .await
    }
}

/// What one round of file maintenance found.
#[derive(Debug, Clone, Copy)]
pub struct Maintenance {
    /// A reader kept the checkpoint from finishing (the WAL could not be reset).
    pub checkpoint_blocked: bool,
    /// Pages in the WAL before the checkpoint.
    pub wal_pages: i64,
    /// The WAL file's size after the checkpoint, in bytes.
    pub wal_bytes: u64,
    /// Free pages left after reclaiming some.
    pub free_pages: i64,
}

impl Store {
    /// Checkpoints the WAL (resetting it when no reader holds it) and reclaims up to `pages`
    /// free pages of purged rows.
    pub async fn maintain(&self, pages: i64) -> Result<Maintenance, Error> {
        let wal = PathBuf::from(format!("{}-wal", self.path.display()));
        self.call(move |c| {
            // PASSIVE never blocks the CRM's writes; only when it copied the whole WAL is the
            // file reset (TRUNCATE), and then without waiting for anyone (busy timeout 0).
            let (busy, log, done): (i64, i64, i64) =
                c.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                })?;
            let mut blocked = busy != 0 || done < log;
            if !blocked {
                c.busy_timeout(Duration::ZERO)?;
                let t: rusqlite::Result<i64> =
                    c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0));
                c.busy_timeout(BUSY_TIMEOUT)?;
                blocked = !matches!(t, Ok(0));
            }
            c.execute_batch(&format!("PRAGMA incremental_vacuum({pages})"))?;
            let free_pages: i64 = c.query_row("PRAGMA freelist_count", [], |r| r.get(0))?;
            let wal_bytes = std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
            Ok(Maintenance {
                checkpoint_blocked: blocked,
                wal_pages: log,
                wal_bytes,
                free_pages,
            })
        })
        .await
    }

    /// When the newest `sent` row was sent (for "seconds since the last successful send").
    pub async fn last_sent_at(&self) -> Result<Option<SystemTime>, Error> {
        self.call(|c| {
            let t: Option<String> = c.query_row(
                "SELECT max(sent_at) FROM mail_queue WHERE status = 'sent'",
                [],
                |r| r.get(0),
            )?;
            Ok(t.as_deref().and_then(parse_ts))
        })
        .await
    }
}

/// Row `id`'s extra headers if it has no attachments and its `headers` is text or NULL (what
/// [`Store::extras`] would answer); `None` when `extras` must look (attachments, or a value it
/// refuses with the reason).
fn prefetch_headers(c: &Connection, id: i64) -> Result<Option<Option<String>>, Error> {
    use rusqlite::types::ValueRef;
    Ok(c.prepare_cached(
        "SELECT headers, EXISTS (SELECT 1 FROM mail_attachment WHERE mail_id = ?1) FROM mail_queue WHERE id = ?1",
    )?
    .query_row(params![id], |r| {
        Ok(match (r.get_ref(0)?, r.get::<_, bool>(1)?) {
            (_, true) => None,
            (ValueRef::Null, false) => Some(None),
            (ValueRef::Text(t), false) => Some(Some(String::from_utf8_lossy(t).into_owned())),
            _ => None,
        })
    })?)
}

fn read_state(c: &Connection) -> Result<QueueState, Error> {
    Ok(c.query_row(
        "SELECT paused, paused_since, paused_until, pause_level, error_code, error_text FROM queue_state WHERE id = 1",
        [],
        |r| {
            Ok(QueueState {
                paused: r.get::<_, i64>(0)? == 1,
                paused_since: r.get(1)?,
                paused_until: r.get(2)?,
                pause_level: r.get(3)?,
                error_code: r.get(4)?,
                error_text: r.get(5)?,
            })
        },
    )?)
}

fn rows_as_maps(
    c: &Connection,
    sql: &str,
    p: impl rusqlite::Params,
) -> Result<Vec<serde_json::Map<String, serde_json::Value>>, Error> {
    use rusqlite::types::ValueRef;
    let mut st = c.prepare(sql)?;
    let names: Vec<String> = st.column_names().map(|s| s.to_string()).collect();
    let mut rows = st.query(p)?;
    let mut out = Vec::new();
    while let Some(r) = rows.next()? {
        let mut m = serde_json::Map::new();
        for (i, n) in names.iter().enumerate() {
            let v = match r.get_ref(i)? {
                ValueRef::Null => serde_json::Value::Null,
                ValueRef::Integer(x) => x.into(),
                ValueRef::Real(x) => x.into(),
                ValueRef::Text(t) => String::from_utf8_lossy(t).into_owned().into(),
                ValueRef::Blob(b) => format!("<{} bytes>", b.len()).into(),
            };
            m.insert(n.clone(), v);
        }
        out.push(m);
    }
    Ok(out)
}

/// Brings the schema to [`schema_version`]. Refuses a file from a newer mailqueue; keeps a
/// `VACUUM INTO` copy of an existing file before changing its schema.
fn migrate(conn: &mut Connection, path: &Path) -> Result<(), Error> {
    migrate_with(conn, path, MIGRATIONS)
}

fn migrate_with(conn: &mut Connection, path: &Path, migrations: &[&str]) -> Result<(), Error> {
    let current: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let latest = migrations.len() as i64;
    if current > latest {
        return Err(Error::Config {
            problems: vec![format!(
                "queue.database: {} has schema version {current}, newer than this mailqueue knows ({latest}); upgrade mailqueue",
                path.display()
            )],
        });
    }
    if current == latest {
        return Ok(());
    }
    if current > 0 {
        let stamp = ts(SystemTime::now()).replace([':', '.'], "");
        let backup = PathBuf::from(format!("{}.v{current}-{stamp}.bak", path.display()));
        conn.execute("VACUUM INTO ?1", params![backup.to_string_lossy()])
            .map_err(|e| {
                Error::db(format!(
                    "cannot keep a copy before upgrading the schema: {e}"
                ))
            })?;
        tracing::info!(backup = %backup.display(), from = current, to = latest, "Kept a copy of the queue file before upgrading its schema.");
    }
    for (i, sql) in migrations.iter().enumerate().skip(current as usize) {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        // Another process may have migrated meanwhile.
        let v: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if v > i as i64 {
            continue;
        }
        tx.execute_batch(sql)
            .map_err(|e| Error::db(format!("migration {} failed: {e}", i + 1)))?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
        tx.commit()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_round_trip_and_sort_as_text() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_796_000_000_123);
        let s = ts(t);
        assert_eq!(s.len(), 24);
        assert!(s.ends_with('Z') && s.contains('T'));
        assert_eq!(parse_ts(&s), Some(t));
        assert!(ts(t) < ts(t + Duration::from_millis(1)));
        assert!(parse_ts("2026-12-03 10:00:00").is_some());
        assert!(parse_ts("2026-12-03T10:00").is_some());
        assert!(parse_ts("tomorrow").is_none());
    }

    fn temp_store() -> (tempfile::TempDir, Store) {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(&d.path().join("q.db")).unwrap();
        (d, s)
    }

    #[tokio::test]
    async fn a_crm_row_with_three_columns_takes_every_default() {
        let (_d, s) = temp_store();
        s.call(|c| {
            c.execute("INSERT INTO mail_queue (to_addrs, subject, body_text) VALUES ('a@example.com', 's', 'b')", [])?;
            Ok(())
        })
        .await
        .unwrap();
        let claim = s
            .claim(
                SystemTime::now() + Duration::from_secs(1),
                "example.com".into(),
            )
            .await
            .unwrap()
            .unwrap();
        assert_eq!(claim.attempts, 1);
        assert!(claim.message_id.starts_with('<') && claim.message_id.ends_with("@example.com>"));
        // Claimed once: a second claim finds nothing.
        assert!(s
            .claim(SystemTime::now() + Duration::from_secs(1), "x".into())
            .await
            .unwrap()
            .is_none());
    }

    /// Rows of an ended claimer are recovered (attempt in doubt, row queued, its lock file
    /// removed); a live claimer's row (another `Store` in this process holds its lock) and a
    /// row whose claimer left no lock file are left alone.
    #[tokio::test]
    async fn only_the_rows_of_ended_claimers_are_recovered() {
        let (d, live) = temp_store();
        let daemon = Store::open(&d.path().join("q.db")).unwrap();
        async fn insert(s: &Store) -> Result<i64, Error> {
            s.call(|c| {
                c.execute("INSERT INTO mail_queue (to_addrs, subject, body_text) VALUES ('a@example.com', 's', 'b')", [])?;
                Ok(c.last_insert_rowid())
            })
            .await
        }
        let mine = insert(&live).await.unwrap();
        let claim = live
            .claim(SystemTime::now() + Duration::from_secs(1), "x".into())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(claim.id, mine);
        let token: String = live
            .call(move |c| {
                Ok(c.query_row(
                    "SELECT claimed_by FROM mail_queue WHERE id = ?1",
                    [mine],
                    |r| r.get(0),
                )?)
            })
            .await
            .unwrap();
        assert!(
            owner_path(&d.path().join("q.db"), &token).exists(),
            "{token}"
        );
        // Two rows left `sending` by claimers that are gone: one left its (unlocked) lock file,
        // the other none.
        let dead = insert(&daemon).await.unwrap();
        let lost = insert(&daemon).await.unwrap();
        daemon
            .call(move |c| {
                c.execute("UPDATE mail_queue SET status = 'sending', attempts = 1, claimed_by = '1-dead' WHERE id = ?1", [dead])?;
                c.execute("INSERT INTO mail_attempt (mail_id, started_at) VALUES (?1, '2026-01-01T00:00:00.000Z')", [dead])?;
                c.execute("UPDATE mail_queue SET status = 'sending', attempts = 1, claimed_by = '2-lost' WHERE id = ?1", [lost])?;
                Ok(())
            })
            .await
            .unwrap();
        let dead_file = owner_path(&d.path().join("q.db"), "1-dead");
        std::fs::write(&dead_file, "1\n").unwrap();

        let o = daemon
            .recover_orphans("in doubt".into(), false)
            .await
            .unwrap();
        assert_eq!(o.recovered, vec![dead]);
        assert_eq!(o.live, 1);
        assert_eq!(o.unknown, vec![lost]);
        assert!(!dead_file.exists());
        let rows: Vec<(i64, String, Option<String>, Option<String>)> = daemon
            .call(|c| {
                let mut st = c.prepare(
                    "SELECT q.id, q.status, q.error_code, a.outcome FROM mail_queue q
                     LEFT JOIN mail_attempt a ON a.mail_id = q.id ORDER BY q.id",
                )?;
                let v = st
                    .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
                    .collect::<Result<_, _>>()?;
                Ok(v)
            })
            .await
            .unwrap();
        assert_eq!(
            rows,
            vec![
                (mine, "sending".into(), None, None),
                (
                    dead,
                    "queued".into(),
                    Some("in_doubt".into()),
                    Some("in_doubt".into())
                ),
                (lost, "sending".into(), None, None),
            ]
        );
        // The live claimer's file stays; once its process (here: its Store) is gone, its row is
        // recovered too.
        drop(claim);
        drop(live);
        let o = daemon
            .recover_orphans("in doubt".into(), true)
            .await
            .unwrap();
        assert_eq!(o.recovered, vec![mine]);
        assert!(!owner_path(&d.path().join("q.db"), &token).exists());
        let status: String = daemon
            .call(move |c| {
                Ok(
                    c.query_row("SELECT status FROM mail_queue WHERE id = ?1", [mine], |r| {
                        r.get(0)
                    })?,
                )
            })
            .await
            .unwrap();
        assert_eq!(status, "held");
    }

    /// A batch claim takes the most urgent rows in order, each with its own attempt, and
    /// prefetches every row's headers; given back, the rows are `queued` again, untouched, and
    /// their prefetched headers forgotten.
    #[tokio::test]
    async fn a_batch_is_claimed_in_order_and_given_back_untouched() {
        let (_d, s) = temp_store();
        let mut ids = vec![];
        for (i, prio) in [0, 5, 0, 9].into_iter().enumerate() {
            let id = s
                .enqueue(NewMail {
                    to: "a@x.example".into(),
                    headers: Some(format!("X-N: {i}")),
                    ..Default::default()
                })
                .await
                .unwrap();
            s.call(move |c| {
                c.execute(
                    "UPDATE mail_queue SET priority = ?2 WHERE id = ?1",
                    params![id, prio],
                )?;
                Ok(())
            })
            .await
            .unwrap();
            ids.push(id);
        }
        let later = SystemTime::now() + Duration::from_secs(1);
        let batch = s.claim_many(later, "x".into(), 3).await.unwrap();
        let got: Vec<i64> = batch.iter().map(|c| c.id).collect();
        assert_eq!(
            got,
            vec![ids[3], ids[1], ids[0]],
            "priority first, then age"
        );
        let attempts: std::collections::HashSet<i64> = batch.iter().map(|c| c.attempt_id).collect();
        assert_eq!(attempts.len(), 3, "one attempt each");
        assert_eq!(s.extras(ids[1]).await.unwrap().0.as_deref(), Some("X-N: 1"));
        s.release_many(batch.iter().map(|c| (c.id, c.attempt_id)).collect())
            .await
            .unwrap();
        let (statuses, attempts_left): (Vec<(String, i64)>, i64) = s
            .call(|c| {
                let v = c
                    .prepare("SELECT status, attempts FROM mail_queue ORDER BY id")?
                    .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                    .collect::<Result<_, _>>()?;
                let n = c.query_row("SELECT count(*) FROM mail_attempt", [], |r| r.get(0))?;
                Ok((v, n))
            })
            .await
            .unwrap();
        assert!(
            statuses.iter().all(|(st, a)| st == "queued" && *a == 0),
            "{statuses:?}"
        );
        assert_eq!(attempts_left, 0);
        assert!(s.prefetched.lock().unwrap().is_empty());
        // Given back, all four are due again.
        assert_eq!(s.claim_many(later, "x".into(), 10).await.unwrap().len(), 4);
    }

    #[tokio::test]
    async fn the_claim_reads_the_headers_of_a_row_without_attachments() {
        let (_d, s) = temp_store();
        let plain = s
            .enqueue(NewMail {
                to: "a@x.example".into(),
                headers: Some("X-Report: 1".into()),
                ..Default::default()
            })
            .await
            .unwrap();
        let attached = s
            .enqueue(NewMail {
                to: "b@x.example".into(),
                headers: Some("X-Report: 2".into()),
                attachments: vec![("a.txt".into(), "text/plain".into(), b"hi".to_vec())],
                ..Default::default()
            })
            .await
            .unwrap();
        let later = SystemTime::now() + Duration::from_secs(1);
        assert_eq!(s.claim(later, "x".into()).await.unwrap().unwrap().id, plain);
        // Changed after the claim: the claim's own reading is what `extras` answers, as for
        // the row's other columns.
        s.call(move |c| {
            c.execute(
                "UPDATE mail_queue SET headers = 'X-Report: changed' WHERE id = ?1",
                [plain],
            )?;
            Ok(())
        })
        .await
        .unwrap();
        let (h, a) = s.extras(plain).await.unwrap();
        assert_eq!((h.as_deref(), a.len()), (Some("X-Report: 1"), 0));
        // Asked again (no claim in between), the database answers.
        assert_eq!(
            s.extras(plain).await.unwrap().0.as_deref(),
            Some("X-Report: changed")
        );
        // A row with attachments is read by `extras` itself.
        assert_eq!(
            s.claim(later, "x".into()).await.unwrap().unwrap().id,
            attached
        );
        let (h, a) = s.extras(attached).await.unwrap();
        assert_eq!((h.as_deref(), a.len()), (Some("X-Report: 2"), 1));
        assert_eq!(a[0].content.as_deref(), Some(&b"hi"[..]));
    }

    #[tokio::test]
    async fn a_paused_queue_only_offers_test_mails() {
        let (_d, s) = temp_store();
        let normal = s
            .enqueue(NewMail {
                to: "a@x.example".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        let test = s
            .enqueue(NewMail {
                to: "b@x.example".into(),
                max_attempts: Some(1),
                ..Default::default()
            })
            .await
            .unwrap();
        s.call(|c| {
            c.execute(
                "UPDATE queue_state SET paused = 1, paused_until = '2999-01-01T00:00:00.000Z'",
                [],
            )?;
            Ok(())
        })
        .await
        .unwrap();
        let later = SystemTime::now() + Duration::from_secs(1);
        let c = s.claim(later, "x".into()).await.unwrap().unwrap();
        assert_eq!(c.id, test);
        assert!(c.while_paused);
        assert!(s.claim(later, "x".into()).await.unwrap().is_none());
        assert!(s.resume().await.unwrap());
        assert_eq!(
            s.claim(later, "x".into()).await.unwrap().unwrap().id,
            normal
        );
    }

    #[test]
    fn an_upgrade_keeps_a_copy_of_the_old_file_first() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("q.db");
        let mut c = Connection::open(&p).unwrap();
        let v1 = "CREATE TABLE t (a INTEGER); INSERT INTO t VALUES (7);";
        let v2 = "ALTER TABLE t ADD COLUMN b TEXT;";
        migrate_with(&mut c, &p, &[v1]).unwrap();
        migrate_with(&mut c, &p, &[v1, v2]).unwrap();
        let v: i64 = c
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(v, 2);
        let backups: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("q.db.v1-") && n.ends_with(".bak"))
            .collect();
        assert_eq!(backups.len(), 1, "{backups:?}");
        let old = Connection::open(d.path().join(&backups[0])).unwrap();
        let (a, ver): (i64, i64) = old
            .query_row(
                "SELECT a, (SELECT user_version FROM pragma_user_version) FROM t",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!(
            (a, ver),
            (7, 1),
            "the copy is the file as it was before the upgrade"
        );
        // A fresh file is created without a copy.
        let fresh = d.path().join("fresh.db");
        migrate_with(&mut Connection::open(&fresh).unwrap(), &fresh, &[v1, v2]).unwrap();
        assert!(!std::fs::read_dir(d.path()).unwrap().any(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with("fresh.db.v")));
    }

    #[tokio::test]
    async fn a_newer_schema_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("q.db");
        Store::open(&p).unwrap();
        Connection::open(&p)
            .unwrap()
            .pragma_update(None, "user_version", 99)
            .unwrap();
        match Store::open(&p) {
            Err(Error::Config { problems }) => {
                assert!(problems[0].contains("newer"), "{problems:?}")
            }
            other => panic!("{:?}", other.err()),
        }
    }
}

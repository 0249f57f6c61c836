//! The scheduler: due rows in, paced attempts out (Postfix's queue manager, in small).
//!
//! Job: find due rows; when one is due, claim it, build it (`message`), wait for the pace
//! ([`rate::Pacer`]), hand it to `deliver`, let `policy` judge and settle the outcome, and have
//! `store` record it. One mail at a time per account: the provider's pace is the limit, and one
//! connection is what providers expect.
//!
//! Finding due rows: while rows are due it claims one after another — the next row in the same
//! trip to the database as the last one's outcome (outcome committed first; not while a rolling
//! cap is full, where rows wait unclaimed; a row claimed ahead is given back untouched if the
//! daemon stops before sending it). Unpaced (`interval_ms = 0`, a relay draining a backlog) it
//! works in batches of up to `[queue] commit_batch`: several rows claimed in one transaction,
//! and their `sent` outcomes committed together in one (any other outcome at once; everything
//! before a wait or a stop) — two commits per batch instead of two per mail, at the price of a
//! crash window: a crash leaves up to a batch of rows `sending`, settled in doubt at the next
//! start (see [`Worker::write`]). When a claim finds
//! nothing it asks the database once when the next waiting row comes due ([`Store::next_due`])
//! and sleeps until then, or until [`Watch`] reports a commit to the queue file — a CRM's
//! INSERT, an UPDATE of a due time — at once (inotify) or within one `poll_interval` (polling
//! two `stat()`s where inotify is unavailable); then it asks the database again. So a new row is
//! seen at once (or within one `poll_interval`), a retry time comes due on time, and an idle
//! daemon does not query the database ten times a second. It asks again at least every
//! [`FULL_CHECK_EVERY`] in any case.
//!
//! Not its job: SQL, SMTP, or failure policy; those live in `store`, `deliver` and `policy`.
//! Retry times are stored on the row (`next_attempt_at`), never held by a sleeping task.
//!
//! Signals arrive as [`Control`] values: a reload is applied between mails (new settings from
//! the next connection; the pace keeps its last send time; an account pause is cleared); a stop
//! lets the mail in flight finish within `[queue] shutdown_grace`.
//!
//! Invariants: shutdown is checked only between mails, so a mail in flight finishes (or, past
//! the grace, stays `sending` to be recovered as in doubt); no outcome waits uncommitted while
//! the loop waits (pace, idle, back-off, stop) or while the pace is on; the heartbeat is
//! renewed before every bounded wait, so the watchdog sees a frozen loop and only that; a
//! database error never kills the loop (it backs off and tries again) and an outcome is
//! retried until it is written, so nothing is marked sent that was not, and a row is never left
//! `sending` while this process lives.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::mpsc;

use crate::config::{self, Config};
use crate::deliver::Deliverer;
use crate::error::{Error, Lang};
use crate::message;
use crate::policy::{self, Fate, Outcome, RowFacts, Settlement};
use crate::rate::Pacer;
use crate::service::{self, Heartbeat};
use crate::signals::{Control, Shutdown};
use crate::store::{parse_ts, Claim, NextDue, PauseLevel, Record, Store};
use crate::watch::{Mark, Watch};

/// Added to every heartbeat promise: the time to get from one promise to the next.
const HEARTBEAT_SLACK: Duration = Duration::from_secs(2);

/// The end of a pace wait shorter than this is slept precisely (see [`Worker::wait_for_pace`]).
const FINE_WAIT: Duration = Duration::from_millis(2);

/// How a finished attempt ended, for the caller (`test-send` prints it).
#[derive(Debug, Clone)]
pub struct Finished {
    /// `mail_queue.id`.
    pub id: i64,
    /// The row's status after the attempt: queued, sent, failed or held; "released" when it
    /// was given back untried (the database could not be read).
    pub status: &'static str,
    /// `error_code`, if any.
    pub error_code: Option<String>,
    /// `last_error`, if any.
    pub text: Option<String>,
}

/// Everything one account's delivery needs, owned by the loop.
pub struct Worker {
    /// The settings in force.
    cfg: Config,
    /// The queue.
    store: Store,
    /// The SMTP side.
    deliverer: Deliverer,
    /// The pace.
    pacer: Pacer,
    /// The domain for new Message-IDs (the From address's).
    msgid_domain: String,
    /// No send before this moment: the rest of the interval after the last send the database
    /// records (set at start and on reload, when the pacer is rebuilt).
    not_before: Option<Instant>,
    /// The promise the watchdog checks.
    heartbeat: Arc<Heartbeat>,
    /// Claim the next rows in the same trip to the database as outcomes (the daemon's loop
    /// sets it; `test-send` does not).
    claim_ahead: bool,
    /// Rows claimed ahead, most urgent first: the loop sends them before asking the database
    /// again. At most `commit_batch` (one row when paced); given back untouched on a stop, on
    /// an account pause, and when a rolling cap is full.
    ahead: VecDeque<Claim>,
    /// Outcomes not yet committed, in order: an unpaced backlog drains with one commit per
    /// batch. Written when the batch is full, when no row is claimed ahead, before any wait,
    /// before a stop, and at once for any outcome but `sent` (see [`Worker::write`]).
    unrecorded: Vec<Record>,
    /// When the oldest of `unrecorded` was made: the batch is written once it is older than
    /// [`BATCH_WINDOW`].
    unrecorded_since: Option<Instant>,
    /// When the last batch of rows was claimed and how many: the next batch is sized to what is
    /// sent in about [`BATCH_WINDOW`], so a slow server does not keep rows claimed for long.
    last_batch: Option<(Instant, usize)>,
}

/// About how long an unpaced drain's batch lasts: rows are claimed ahead for this long at most
/// (as the last batch's pace predicts) and an outcome waits about this long at most (plus the
/// mail in flight) to be committed.
const BATCH_WINDOW: Duration = Duration::from_millis(50);

/// Counts of one `run`, for `--once` and the demo.
#[derive(Debug, Default, Clone, Copy)]
pub struct RunStats {
    /// Attempts made.
    pub attempts: u64,
    /// Rows that ended `sent`.
    pub sent: u64,
    /// Rows that ended `failed`.
    pub failed: u64,
}

impl Worker {
    /// Builds a worker; the pace is rebuilt from the send times the database recorded.
    pub async fn new(cfg: Config, store: Store, deliverer: Deliverer) -> Result<Worker, Error> {
        let (pacer, not_before) = Self::pacer(&cfg, &store).await?;
        let msgid_domain = cfg.sender.from.email.domain().to_string();
        Ok(Worker {
            cfg,
            store,
            deliverer,
            pacer,
            msgid_domain,
            not_before,
            heartbeat: Heartbeat::new(),
            claim_ahead: false,
            ahead: VecDeque::new(),
            unrecorded: Vec::new(),
            unrecorded_since: None,
            last_batch: None,
        })
    }

    /// A pacer for `cfg.rate`, restored from the database's send history.
    async fn pacer(cfg: &Config, store: &Store) -> Result<(Pacer, Option<Instant>), Error> {
        let mut pacer = Pacer::new(&cfg.rate);
        let history = store.send_history(pacer.history_needed()).await?;
        let wait = pacer.restore(&history, SystemTime::now());
        Ok((pacer, (!wait.is_zero()).then(|| Instant::now() + wait)))
    }

    /// How long the pace makes the first send wait (the database records a recent send).
    pub fn first_wait(&self) -> Duration {
        self.not_before.map_or(Duration::ZERO, |t| {
            t.saturating_duration_since(Instant::now())
        })
    }

    /// Shares the heartbeat the watchdog checks.
    pub fn with_heartbeat(mut self, hb: Arc<Heartbeat>) -> Self {
        self.heartbeat = hb;
        self
    }

    /// Reads the config file again and applies it: the next connection uses the new account
    /// settings, the pace keeps its last send time, the log level changes, an account pause is
    /// cleared (the admin has just fixed something). An invalid file changes nothing.
    pub async fn reload(&mut self) {
        let path = self.cfg.path.clone();
        let mut new = match config::load(&path) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(config = %path.display(), error = %e.text(Lang::En),
                    "Reload refused: the new configuration is invalid; still running with the old one.");
                return;
            }
        };
        let deliverer = match Deliverer::new(&new) {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(error = %e.text(Lang::En), "Reload refused; still running with the old configuration.");
                return;
            }
        };
        if new.queue.database != self.cfg.queue.database {
            tracing::warn!(old = %self.cfg.queue.database.display(), new = %new.queue.database.display(),
                "queue.database changed: that needs a restart; the other settings are applied.");
            new.queue.database = self.cfg.queue.database.clone();
        }
        if new.log.format != self.cfg.log.format {
            tracing::warn!(
                "log.format changed: that needs a restart; the other settings are applied."
            );
        }
        let (pacer, not_before) = match Self::pacer(&new, &self.store).await {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %e.text(Lang::En), "Reload refused: cannot read the send history.");
                return;
            }
        };
        if let Err(e) = crate::telemetry::set_level(&new.log.level) {
            tracing::warn!(error = %e, "Cannot apply log.level.");
        }
        self.deliverer.close().await;
        self.deliverer = deliverer;
        self.pacer = pacer;
        self.not_before = not_before;
        self.cfg = new;
        match self.store.resume().await {
            Ok(true) => tracing::info!("The account pause is cleared by the reload."),
            Ok(false) => {}
            Err(e) => tracing::error!(error = %e.text(Lang::En), "Cannot clear the account pause."),
        }
        tracing::info!(config = %path.display(), interval_ms = self.cfg.rate.interval.as_millis() as u64,
            "Configuration reloaded.");
    }

    fn lang(&self) -> Lang {
        self.cfg.log.error_language
    }

    /// The domain new Message-IDs are made in.
    pub fn msgid_domain(&self) -> &str {
        &self.msgid_domain
    }

    /// Waits until the pace allows a send (or stopping is asked for: returns false).
    pub async fn wait_for_pace(&mut self, shutdown: &mut Shutdown) -> bool {
        if let Some(t) = self.not_before.take() {
            let wait = t.saturating_duration_since(Instant::now());
            self.heartbeat.promise(wait + HEARTBEAT_SLACK);
            if !shutdown.sleep(wait).await {
                self.not_before = Some(t);
                return false;
            }
        }
        loop {
            match self.pacer.try_acquire(SystemTime::now()) {
                Ok(()) => return true,
                Err(wait) => {
                    // Nothing waits uncommitted while the pace makes us wait.
                    self.flush(false).await;
                    self.heartbeat.promise(wait + HEARTBEAT_SLACK);
                    // tokio's timer ticks in milliseconds and fires up to a tick late, which
                    // would add ~1 ms to every gap; the last stretch is slept on a blocking
                    // thread instead (accurate to tens of microseconds).
                    if wait > FINE_WAIT {
                        if !shutdown.sleep(wait - FINE_WAIT).await {
                            return false;
                        }
                    } else {
                        let _ = tokio::task::spawn_blocking(move || std::thread::sleep(wait)).await;
                    }
                }
            }
        }
    }

    /// The longest one delivery attempt can take with every step's timeout: the watchdog's
    /// promise while the server is slow.
    fn attempt_budget(&self, rcpts: usize) -> Duration {
        let s = &self.cfg.smtp;
        let pop = self
            .cfg
            .pop
            .as_ref()
            .map_or(Duration::ZERO, |p| p.timeout * 16);
        // connect (x2), greeting/EHLO, STARTTLS + EHLO, AUTH, MAIL, RCPT each, DATA, RSET, and a
        // second round for a stale kept connection or a relay retry; then the final reply.
        s.timeout * (2 * (8 + rcpts as u32)) + s.data_timeout + pop + HEARTBEAT_SLACK
    }

    /// Delivers one claimed row and records the outcome. `allow_pause` is false for
    /// `test-send`, which must never pause the queue.
    ///
    /// The pace is waited for here, after the row is claimed and built and right before the
    /// message is handed over, so the interval governs the moments the provider sees (MAIL
    /// FROM), not claim times. If stopping is asked for during that wait, the claim is released
    /// (the row is `queued` again, the attempt not counted) and `None` is returned.
    pub async fn attempt(
        &mut self,
        claim: Claim,
        allow_pause: bool,
        shutdown: &mut Shutdown,
    ) -> Option<Finished> {
        let started = Instant::now();
        let lang = self.lang();
        let test_mail = claim.max_attempts == Some(1);
        let max_rcpts = self.cfg.queue.max_recipients as usize;
        let extras = match self.extras(&claim).await {
            Ok(x) => x,
            Err(e) => {
                // A database error: give the claim back and let the loop back off.
                tracing::error!(mail_id = claim.id, error = %e.text(Lang::En), "Cannot read the row's attachments; trying again later.");
                self.release(&claim).await;
                return Some(Finished {
                    id: claim.id,
                    status: "released",
                    error_code: None,
                    text: None,
                });
            }
        };
        let composed = match extras
            .and_then(|x| {
                message::compose_full(
                    &claim,
                    &self.cfg.sender,
                    self.cfg.queue.max_message_size,
                    self.cfg.charset,
                    &x,
                )
            })
            .map(|(c, note)| {
                if let Some(note) = note {
                    tracing::info!(
                        mail_id = claim.id,
                        "The mail goes out in UTF-8 instead of ISO-2022-JP: {note}."
                    );
                }
                c
            })
            .and_then(|c| {
                if c.recipients.len() > max_rcpts {
                    Err(Error::InvalidRow {
                        detail: format!(
                            "{} recipients, more than queue.max_recipients ({max_rcpts})",
                            c.recipients.len()
                        ),
                    })
                } else {
                    Ok(c)
                }
            }) {
            Ok(c) => c,
            Err(e) => {
                let rec = Record {
                    id: claim.id,
                    attempt_id: claim.attempt_id,
                    outcome: Outcome::Failed,
                    status: "failed",
                    next_attempt_at: None,
                    counts: true,
                    error_code: Some(e.code().to_string()),
                    error_text: Some(e.text(lang)),
                    smtp_reply: None,
                    rcpts: vec![],
                    pause: None,
                    resume: false,
                    started_at: None,
                };
                tracing::warn!(mail_id = claim.id, message_id = %claim.message_id, outcome = "failed",
                    error_code = e.code(), error = %e.text(Lang::En), "The mail cannot be built; the row is failed.");
                return Some(self.write(rec).await);
            }
        };
        let born = [Some(&claim.created_at), claim.send_after.as_ref()]
            .into_iter()
            .flatten()
            .filter_map(|s| parse_ts(s))
            .max()
            .unwrap_or_else(SystemTime::now);
        let settled_sent = claim.settled.iter().any(|(_, s)| s == "sent");
        // Staging: the mail goes to `redirect_all_to` alone, the original recipients named in a
        // header (the row keeps them too); that one address is the mail's only recipient.
        let composed = match &self.cfg.redirect_all_to {
            None => composed,
            Some(to) => {
                let originals: Vec<String> = composed
                    .recipients
                    .iter()
                    .map(|r| format!("{} ({})", r.address, r.kind))
                    .collect();
                let mut bytes = format!(
                    "X-Mailqueue-Original-Recipients: {}\r\n",
                    originals.join(",\r\n ")
                )
                .into_bytes();
                bytes.extend_from_slice(&composed.bytes);
                message::Composed {
                    recipients: vec![message::Recipient {
                        address: to.clone(),
                        kind: "to",
                    }],
                    bytes,
                }
            }
        };
        let pending: Vec<&message::Recipient> = composed
            .recipients
            .iter()
            .filter(|r| {
                !claim
                    .settled
                    .iter()
                    .any(|(a, _)| a.eq_ignore_ascii_case(r.address.as_ref()))
            })
            .collect();
        let kind_of = |addr: &str| {
            composed
                .recipients
                .iter()
                .find(|r| r.address.to_string().eq_ignore_ascii_case(addr))
                .map(|r| r.kind)
                .unwrap_or("to")
        };

        // A mail that waited past its lifetime (e.g. through a long pause) is not sent late.
        let lifetime = self.cfg.queue.message_lifetime;
        let expired = SystemTime::now()
            .duration_since(born)
            .is_ok_and(|age| age > lifetime);
        let mut paced_at = None;
        let (verdict, report_reply) = if expired || pending.is_empty() {
            let e = Error::Expired {
                lifetime: humantime::format_duration(lifetime).to_string(),
                last: None,
            };
            (
                policy::Verdict {
                    outcome: if pending.is_empty() && settled_sent {
                        Outcome::Sent
                    } else {
                        Outcome::Failed
                    },
                    error: Some(e),
                    rcpts: vec![],
                },
                None,
            )
        } else {
            let addrs: Vec<lettre::Address> = pending.iter().map(|r| r.address.clone()).collect();
            if !self.wait_for_pace(shutdown).await {
                self.release(&claim).await;
                return None;
            }
            paced_at = Some(SystemTime::now());
            self.heartbeat.promise(self.attempt_budget(addrs.len()));
            self.deliverer.take_mail_from_at();
            let report = self
                .deliverer
                .send(&self.cfg.sender.envelope_from, &addrs, &composed.bytes)
                .await;
            // The pace counts from the server's answer to MAIL FROM (the latest moment it can
            // have seen it), and so does the send time kept for a restart.
            if let Some(at) = self.deliverer.take_mail_from_at() {
                let ago = at.elapsed();
                self.pacer.handed_over(ago);
                paced_at = SystemTime::now().checked_sub(ago).or(paced_at);
            }
            crate::failpoint::crash("crash-after-reply");
            let reply = report.end.as_ref().ok().cloned();
            (policy::judge(&report), reply)
        };

        let any_accepted =
            settled_sent || verdict.rcpts.iter().any(|(_, f, _)| *f == Fate::Accepted);
        let any_pending = pending.iter().any(|r| {
            let a = r.address.to_string();
            !verdict
                .rcpts
                .iter()
                .any(|(x, f, _)| x.eq_ignore_ascii_case(&a) && *f != Fate::Pending)
        });
        let facts = RowFacts {
            attempts: claim.attempts,
            max_attempts: claim.max_attempts.unwrap_or(self.cfg.queue.max_attempts),
            born,
            any_accepted,
            any_pending,
            doubts_before: claim.doubts_before,
        };
        let rules = policy::Rules {
            backoff: &self.cfg.queue.retry_backoff,
            lifetime,
            on_doubt: self.cfg.queue.on_doubt,
        };
        let settlement = policy::settle(
            &verdict,
            &facts,
            SystemTime::now(),
            &rules,
            test_mail || !allow_pause,
        );

        let (status, next, err, counts) = match &settlement {
            Settlement::Sent(e) => ("sent", None, e.clone(), true),
            Settlement::Retry(at, e) => ("queued", Some(*at), Some(e.clone()), true),
            Settlement::Failed(e) => ("failed", None, Some(e.clone()), true),
            Settlement::Paused(e) => ("queued", None, Some(e.clone()), false),
            Settlement::Held(e) => ("held", None, Some(e.clone()), true),
        };
        let ends = status != "queued";
        let mut rcpts: Vec<(String, &'static str, Fate, String)> = verdict
            .rcpts
            .iter()
            .map(|(a, f, r)| {
                let fate = if ends && *f == Fate::Pending {
                    Fate::Refused
                } else {
                    *f
                };
                (a.clone(), kind_of(a), fate, r.to_string())
            })
            .collect();
        // Recipients never reached in this attempt are recorded too, so `show` lists them all.
        for r in &pending {
            let a = r.address.to_string();
            if !rcpts.iter().any(|(x, ..)| x.eq_ignore_ascii_case(&a)) {
                let fate = if ends { Fate::Refused } else { Fate::Pending };
                let why = err.as_ref().map(|e| e.text(lang)).unwrap_or_default();
                rcpts.push((a, r.kind, fate, why));
            }
        }
        let smtp_reply = err
            .as_ref()
            .and_then(|e| e.reply().map(|r| r.to_string()))
            .or_else(|| report_reply.map(|r| r.to_string()));
        let paused = verdict.outcome == Outcome::Paused;
        let rec = Record {
            id: claim.id,
            attempt_id: claim.attempt_id,
            outcome: verdict.outcome,
            status,
            next_attempt_at: next,
            counts,
            error_code: err.as_ref().map(|e| e.code().to_string()),
            error_text: err.as_ref().map(|e| e.text(lang)),
            smtp_reply: smtp_reply.clone(),
            rcpts,
            pause: (paused && allow_pause).then(|| {
                (
                    Duration::ZERO,
                    PauseLevel {
                        steps: self.cfg.queue.retry_backoff.clone(),
                    },
                )
            }),
            // Any attempt that got past login proves the account works again.
            resume: !paused && !expired,
            started_at: paced_at,
        };
        let recipients: Vec<String> = pending.iter().map(|r| r.address.to_string()).collect();
        let duration_ms = started.elapsed().as_millis() as u64;
        let code = err.as_ref().map(|e| e.code()).unwrap_or("");
        let text_en = err.as_ref().map(|e| e.text(Lang::En)).unwrap_or_default();
        match verdict.outcome {
            Outcome::Sent => {
                tracing::info!(mail_id = claim.id, message_id = %claim.message_id, recipients = %recipients.join(", "),
                outcome = verdict.outcome.name(), status, error_code = code, smtp_reply = smtp_reply.as_deref().unwrap_or(""), duration_ms,
                "Delivery attempt finished.")
            }
            _ => {
                tracing::warn!(mail_id = claim.id, message_id = %claim.message_id, recipients = %recipients.join(", "),
                outcome = verdict.outcome.name(), status, error_code = code, smtp_reply = smtp_reply.as_deref().unwrap_or(""), duration_ms,
                error = %text_en, "Delivery attempt finished.")
            }
        }
        if paused && allow_pause && !claim.while_paused {
            tracing::warn!(error_code = code, error = %text_en, "The account is in trouble: the queue is paused; waiting rows keep their place.");
        } else if !paused && claim.while_paused && !expired {
            tracing::info!(
                mail_id = claim.id,
                "The account works again: the queue is resumed."
            );
        }
        Some(self.write(rec).await)
    }

    /// The row's extra headers and attachments: `Err` for a database error (try again later),
    /// `Ok(Err)` for a row whose attachments cannot be used (fail the row).
    async fn extras(&self, claim: &Claim) -> Result<Result<message::Extras, Error>, Error> {
        let (headers, rows) = match self.store.extras(claim.id).await {
            Ok(x) => x,
            Err(e @ Error::InvalidRow { .. }) => return Ok(Err(e)),
            Err(e) => return Err(e),
        };
        if rows.is_empty() {
            return Ok(Ok(message::Extras {
                headers,
                attachments: vec![],
            }));
        }
        let dir = self.cfg.queue.attachments_dir.clone();
        let loaded =
            tokio::task::spawn_blocking(move || message::load_attachments(rows, dir.as_deref()))
                .await
                .map_err(|e| Error::db(format!("attachment task failed: {e}")))?;
        Ok(loaded.map(|attachments| message::Extras {
            headers,
            attachments,
        }))
    }

    /// Gives a claimed row back (stopping during the pace wait), retrying like [`Self::write`].
    async fn release(&self, claim: &Claim) {
        self.release_all(vec![(claim.id, claim.attempt_id)]).await;
    }

    /// Gives every row claimed ahead back untouched (a stop, an account pause, a full rolling
    /// cap), in one transaction, retrying like [`Self::write`].
    async fn release_ahead(&mut self) {
        // Dropped from `ahead` only once given back (a stop past the grace may drop this future).
        let claims: Vec<(i64, i64)> = self.ahead.iter().map(|c| (c.id, c.attempt_id)).collect();
        if !claims.is_empty() {
            self.release_all(claims).await;
            self.ahead.clear();
        }
    }

    /// Before anything that must not find a batch half done (a stop, a wait for a rolling cap, a
    /// reload): what was sent is written, what was claimed ahead goes back untouched.
    async fn settle(&mut self) {
        self.flush(false).await;
        self.release_ahead().await;
    }

    async fn release_all(&self, claims: Vec<(i64, i64)>) {
        let mut wait = Duration::from_millis(200);
        while let Err(e) = self.store.release_many(claims.clone()).await {
            tracing::error!(mail_id = claims[0].0, rows = claims.len(), error = %e.text(Lang::En),
                "Cannot give the claimed rows back; trying again.");
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(30));
        }
    }

    /// Takes an outcome to be recorded: a mail that went out must not be left looking unsent,
    /// nor a failure unrecorded.
    ///
    /// Unpaced (`interval_ms = 0`), in the daemon's loop, with `commit_batch` > 1, a `sent`
    /// outcome waits in memory while rows claimed ahead remain, up to `commit_batch` outcomes
    /// or [`BATCH_WINDOW`]; then the batch is committed in one transaction ([`Self::flush`]).
    /// A crash before that leaves those rows `sending`, settled in doubt at the next start (the
    /// window docs/BENCHMARKS.md and docs/reliability.md describe). Any other outcome, and
    /// every outcome when paced or in `test-send`, is committed before this returns.
    async fn write(&mut self, rec: Record) -> Finished {
        crate::telemetry::record_attempt(rec.outcome.name(), rec.status, rec.error_code.as_deref());
        let fin = Finished {
            id: rec.id,
            status: rec.status,
            error_code: rec.error_code.clone(),
            text: rec.error_text.clone(),
        };
        let pause = rec.pause.is_some();
        let hold = self.batching()
            && rec.outcome == Outcome::Sent
            && !self.ahead.is_empty()
            && self.unrecorded.len() + 1 < self.cfg.queue.commit_batch as usize
            && self
                .unrecorded_since
                .is_none_or(|t| t.elapsed() < BATCH_WINDOW);
        self.unrecorded_since.get_or_insert_with(Instant::now);
        self.unrecorded.push(rec);
        if !hold {
            self.flush(true).await;
        }
        if pause {
            // The queue is paused: what was claimed ahead waits, unclaimed, like the rest.
            self.release_ahead().await;
        }
        fin
    }

    /// Whether outcomes may wait to be committed in batches (see [`Self::write`]).
    fn batching(&self) -> bool {
        self.claim_ahead && self.cfg.queue.commit_batch > 1 && self.pacer.unpaced()
    }

    /// Commits the outcomes not yet written, in one transaction, retrying until the database
    /// takes them. With `claim`, in the daemon's loop, when no row is claimed ahead, the next
    /// rows are claimed in the same trip to the blocking pool, right after the outcomes are
    /// committed ([`Store::record_then_claim`]) — unless a rolling cap is full, where rows
    /// wait unclaimed.
    async fn flush(&mut self, claim: bool) {
        if self.unrecorded.is_empty() {
            return;
        }
        // Kept in `unrecorded` until the database takes them (each try writes a copy): if this
        // future is dropped mid-retry (the shutdown grace ran out), the loop's last flush still
        // has them to write.
        let claim = claim
            && self.claim_ahead
            && self.ahead.is_empty()
            && !self.unrecorded.iter().any(|r| r.pause.is_some());
        let mut wait = Duration::from_millis(200);
        loop {
            let now = SystemTime::now();
            let n = if claim { self.claim_size(now) } else { 0 };
            let result = if n > 0 {
                let r = self
                    .store
                    .record_then_claim(self.unrecorded.clone(), now, self.msgid_domain.clone(), n)
                    .await;
                r.map(|next| match next {
                    Ok(c) => self.ahead.extend(c),
                    Err(e) => {
                        // The loop claims again (and reports the error if it persists).
                        tracing::debug!(error = %e.text(Lang::En), "Cannot claim the next rows yet.")
                    }
                })
            } else {
                self.store.record_many(self.unrecorded.clone()).await
            };
            match result {
                Ok(()) => {
                    self.unrecorded.clear();
                    self.unrecorded_since = None;
                    return;
                }
                Err(e) => {
                    tracing::error!(mail_id = self.unrecorded[0].id, outcomes = self.unrecorded.len(), error = %e.text(Lang::En), retry_in_ms = wait.as_millis() as u64,
                        "Cannot record the outcome in the queue database; trying again.");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(30));
                }
            }
        }
    }

    /// How many rows to claim at once now: none while a rolling cap is full; one when paced;
    /// unpaced, what the last batch's pace says is sent in about [`BATCH_WINDOW`] (at most
    /// twice the last batch, `commit_batch`, and what the rolling caps still allow).
    fn claim_size(&mut self, now: SystemTime) -> usize {
        if self.pacer.window_wait(now).is_some() {
            return 0;
        }
        let mut n = 1;
        if self.batching() {
            if let Some((at, k)) = self.last_batch {
                let per_mail = at.elapsed().as_nanos() / k as u128;
                let fits = (BATCH_WINDOW.as_nanos() / per_mail.max(1)) as usize;
                n = fits
                    .clamp(1, 2 * k)
                    .min(self.cfg.queue.commit_batch as usize);
            }
            if let Some(room) = self.pacer.room(now) {
                n = n.min(room as usize).max(1);
            }
        }
        self.last_batch = Some((Instant::now(), n));
        n
    }

    /// Closes the SMTP connection (QUIT).
    pub async fn close(&mut self) {
        self.deliverer.close().await;
    }
}

/// How `run` is driven.
pub struct RunOptions {
    /// Deliver what is due now, then return.
    pub once: bool,
    /// Reload requests (SIGHUP); `None` for one-shot commands.
    pub controls: Option<mpsc::UnboundedReceiver<Control>>,
    /// The watchdog's heartbeat.
    pub heartbeat: Arc<Heartbeat>,
}

impl RunOptions {
    /// `run --once` and the demo: no signals, no watchdog.
    pub fn once() -> RunOptions {
        RunOptions {
            once: true,
            controls: None,
            heartbeat: Heartbeat::new(),
        }
    }
}

/// What ended an idle wait.
enum Wake {
    /// The wait ran out.
    Timer,
    /// A control message arrived.
    Control(Control),
}

async fn idle(
    shutdown: &mut Shutdown,
    controls: &mut Option<mpsc::UnboundedReceiver<Control>>,
    d: Duration,
) -> Wake {
    match controls {
        Some(rx) => tokio::select! {
            _ = shutdown.sleep(d) => Wake::Timer,
            Some(c) = rx.recv() => Wake::Control(c),
        },
        None => {
            shutdown.sleep(d).await;
            Wake::Timer
        }
    }
}

/// The longest the idle scheduler trusts its file stamps and computed due time without asking
/// the database again (a wall-clock step, a file system whose times say too little).
const FULL_CHECK_EVERY: Duration = Duration::from_secs(30);

/// When an idle scheduler asks the database again at the latest: when the next waiting row
/// comes due (1 ms late rather than early: stored times have millisecond text), else after
/// [`FULL_CHECK_EVERY`]; a due time that cannot be read (or that the text comparison does not
/// yet take as due) is looked at again after one `poll_interval`, as before.
fn wake_at(next: NextDue, poll: Duration) -> Instant {
    let now = Instant::now();
    let wait = match next {
        NextDue::Now => Duration::ZERO,
        NextDue::Nothing => FULL_CHECK_EVERY,
        NextDue::Later(None) => poll,
        NextDue::Later(Some(t)) => match t.duration_since(SystemTime::now()) {
            Ok(d) if !d.is_zero() => d + Duration::from_millis(1),
            _ => poll,
        },
    };
    now + wait.min(FULL_CHECK_EVERY)
}

/// Waits, idle, until `until`, a control message, stopping, or a commit to the queue file
/// since `mark` ([`Watch`]: an inotify event, or — polling — a changed file stamp, looked at
/// every `poll_interval`). Event-driven, one wait covers the whole idle time (cut at the kept
/// SMTP connection's `idle_timeout`, to close it): an idle daemon has no wakeups of its own.
/// The heartbeat is promised for each wait.
async fn idle_until(
    worker: &mut Worker,
    watch: &mut Watch,
    mark: Mark,
    until: Instant,
    shutdown: &mut Shutdown,
    controls: &mut Option<mpsc::UnboundedReceiver<Control>>,
) {
    let poll = worker.cfg.queue.poll_interval;
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() || shutdown.is_requested() {
            return;
        }
        worker.deliverer.close_if_idle().await;
        let step = if watch.is_event_driven() {
            worker.deliverer.idle_left().map_or(left, |d| left.min(d))
        } else {
            left.min(poll)
        };
        worker.heartbeat.promise(step + HEARTBEAT_SLACK);
        tokio::select! {
            changed = watch.changed(&mark, step) => if changed { return },
            _ = shutdown.requested() => return,
            Some(c) = next_control(controls) => {
                apply(worker, c).await;
                return;
            }
        }
    }
}

/// The next control message; never, without a channel.
async fn next_control(controls: &mut Option<mpsc::UnboundedReceiver<Control>>) -> Option<Control> {
    match controls {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// The daemon's loop. Returns when `shutdown` fires, or — with `once` — when nothing is due.
pub async fn run(
    cfg: Config,
    store: Store,
    mut shutdown: Shutdown,
    mut opts: RunOptions,
) -> Result<RunStats, Error> {
    let deliverer = Deliverer::new(&cfg)?;
    let mut worker = Worker::new(cfg, store.clone(), deliverer)
        .await?
        .with_heartbeat(opts.heartbeat.clone());
    let hb = opts.heartbeat.clone();
    let mut stats = RunStats::default();
    let first_wait = worker.first_wait();
    if !first_wait.is_zero() {
        tracing::info!(
            wait_ms = first_wait.as_millis() as u64,
            "Waiting for the pace before the first send (the database records a recent send)."
        );
    }
    worker.claim_ahead = true;
    let mut watch = Watch::new(store.path());
    let mut db_backoff = worker.cfg.queue.poll_interval;
    while !shutdown.is_requested() {
        let poll = worker.cfg.queue.poll_interval;
        if crate::failpoint::hit("freeze-scheduler") {
            tracing::warn!("Failpoint freeze-scheduler: the scheduler stops here (tests only).");
            std::future::pending::<()>().await;
        }
        hb.promise(poll * 2 + HEARTBEAT_SLACK);
        if let Some(rx) = opts.controls.as_mut() {
            while let Ok(c) = rx.try_recv() {
                apply(&mut worker, c).await;
            }
        }
        // A row claimed together with the last outcome goes straight to delivery; otherwise
        // (nothing was due then, or no claim was made) the database is asked first, so that
        // nothing — no POP login, no connection — is started for a queue with nothing due.
        let ahead = worker.ahead.pop_front();
        if ahead.is_none() {
            // Taken before asking, so a commit made while the database answers is seen.
            let mark = watch.mark();
            // The read waits for the write lock (a CRM's transaction) up to the busy timeout.
            hb.promise(crate::store::BUSY_TIMEOUT + HEARTBEAT_SLACK);
            let next = match store.next_due(SystemTime::now()).await {
                Ok(n) => n,
                Err(e) => {
                    tracing::error!(error = %e.text(Lang::En), retry_in_ms = db_backoff.as_millis() as u64, "Cannot read the queue database; trying again.");
                    hb.promise(db_backoff + HEARTBEAT_SLACK);
                    shutdown.sleep(db_backoff).await;
                    db_backoff = (db_backoff * 2).min(Duration::from_secs(30));
                    continue;
                }
            };
            if next != NextDue::Now {
                db_backoff = poll;
                if opts.once {
                    break;
                }
                let until = wake_at(next, poll);
                idle_until(
                    &mut worker,
                    &mut watch,
                    mark,
                    until,
                    &mut shutdown,
                    &mut opts.controls,
                )
                .await;
                continue;
            }
        }
        // A rolling cap that is full: wait here, unclaimed (the CRM can still cancel, and a crash
        // leaves nothing in doubt), not after claiming.
        if let Some(w) = worker.pacer.window_wait(SystemTime::now()) {
            if w > poll {
                worker.ahead.extend(ahead);
                worker.settle().await;
                tracing::debug!(
                    wait_ms = w.as_millis() as u64,
                    "The hourly or daily cap is reached; waiting."
                );
                let w = w.min(Duration::from_secs(60));
                hb.promise(w + HEARTBEAT_SLACK);
                if let Wake::Control(c) = idle(&mut shutdown, &mut opts.controls, w).await {
                    apply(&mut worker, c).await;
                }
                continue;
            }
        }
        hb.promise(worker.attempt_budget(1));
        worker.deliverer.prepare().await;
        let claimed = match ahead {
            Some(c) => Ok(Some(c)),
            None => {
                let now = SystemTime::now();
                let n = worker.claim_size(now).max(1);
                match store.claim_many(now, worker.msgid_domain.clone(), n).await {
                    Ok(v) => {
                        worker.ahead.extend(v);
                        Ok(worker.ahead.pop_front())
                    }
                    Err(e) => Err(e),
                }
            }
        };
        let claim = match claimed {
            Ok(Some(c)) => {
                db_backoff = poll;
                c
            }
            Ok(None) => continue,
            Err(e) => {
                // A full disk or a read-only file: back off (growing) until writes work again.
                tracing::error!(error = %e.text(Lang::En), retry_in_ms = db_backoff.as_millis() as u64,
                    "Cannot claim a row from the queue database; trying again.");
                hb.promise(db_backoff + HEARTBEAT_SLACK);
                shutdown.sleep(db_backoff).await;
                db_backoff = (db_backoff * 2).min(Duration::from_secs(30));
                continue;
            }
        };
        let grace = worker.cfg.queue.shutdown_grace;
        let mut stop = shutdown.clone();
        let mut pace_stop = shutdown.clone();
        let fin = {
            let fut = worker.attempt(claim, true, &mut pace_stop);
            tokio::pin!(fut);
            tokio::select! {
                r = &mut fut => Some(r),
                _ = stop.requested() => match tokio::time::timeout(grace, &mut fut).await {
                    Ok(r) => Some(r),
                    Err(_) => {
                        tracing::warn!(grace_ms = grace.as_millis() as u64,
                            "The mail in flight did not finish within queue.shutdown_grace; it stays 'sending' and is recovered as in doubt at the next start.");
                        None
                    }
                },
            }
        };
        let Some(fin) = fin else {
            // The mail in flight is abandoned; what finished before it is still written.
            worker.settle().await;
            return Ok(stats);
        };
        let Some(fin) = fin else { break };
        if fin.status == "released" {
            // The database could not be read for this row: back off like any database error.
            worker.flush(false).await;
            hb.promise(db_backoff + HEARTBEAT_SLACK);
            shutdown.sleep(db_backoff).await;
            db_backoff = (db_backoff * 2).min(Duration::from_secs(30));
            continue;
        }
        stats.attempts += 1;
        match fin.status {
            "sent" => stats.sent += 1,
            "failed" => stats.failed += 1,
            _ => {}
        }
    }
    worker.settle().await;
    worker.close().await;
    Ok(stats)
}

/// Carries out one control message between mails.
async fn apply(worker: &mut Worker, c: Control) {
    match c {
        Control::Reload => {
            service::notify_reloading();
            // The new settings may set a pace or a smaller batch: the rows claimed ahead under
            // the old ones go back, to be claimed under the new.
            worker.settle().await;
            worker.reload().await;
            service::notify_ready("reloaded");
        }
        Control::Stop => {}
    }
}

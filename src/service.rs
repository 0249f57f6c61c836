//! Running as a service: systemd notifications, the watchdog, housekeeping, metrics gauges.
//!
//! Job: tell systemd when the daemon is ready, reloading or stopping (`Type=notify`); feed the
//! watchdog only while the scheduler keeps its [`Heartbeat`] promise, so a frozen scheduler is
//! restarted but a long, bounded wait on a slow server is not; recover the rows another
//! mailqueue process left `sending` when it ended mid-attempt (a killed `test-send`); purge old
//! rows and keep the queue file small (`keep_sent`, `keep_failed`, WAL checkpoints, incremental
//! vacuum); refresh the metrics gauges that come from the database.
//!
//! Not its job: delivering, or deciding anything about a mail.
//!
//! Invariants: every background task here ends when the shutdown flag fires; a database error
//! in housekeeping is logged and retried next round, never fatal; without `NOTIFY_SOCKET`
//! (not under systemd) notifications are silently skipped.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sd_notify::NotifyState;

use crate::config::Config;
use crate::error::{Error, Lang};
use crate::policy::OnDoubt;
use crate::signals::Shutdown;
use crate::store::Store;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The scheduler's promise to come back by a deadline. It renews the promise before every wait
/// it knows to be bounded (a poll, the pace, an SMTP step with its timeout); the watchdog pings
/// systemd only while the promise holds.
#[derive(Debug, Default)]
pub struct Heartbeat {
    /// Unix milliseconds until which the scheduler is known to be alive.
    until_ms: AtomicU64,
}

impl Heartbeat {
    /// A new heartbeat, not yet promised.
    pub fn new() -> Arc<Heartbeat> {
        Arc::new(Heartbeat::default())
    }

    /// The scheduler will be back within `within`.
    pub fn promise(&self, within: Duration) {
        self.until_ms
            .store(now_ms() + within.as_millis() as u64, Ordering::Relaxed);
    }

    /// Whether the last promise still holds.
    pub fn alive(&self) -> bool {
        now_ms() <= self.until_ms.load(Ordering::Relaxed)
    }
}

fn notify(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!(error = %e, "Cannot notify systemd.");
    }
}

/// READY=1 with a status line.
pub fn notify_ready(status: &str) {
    notify(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// RELOADING=1 (with the monotonic time systemd wants for it).
pub fn notify_reloading() {
    match sd_notify::NotifyState::monotonic_usec_now() {
        Ok(t) => notify(&[NotifyState::Reloading, t]),
        Err(_) => notify(&[NotifyState::Reloading]),
    }
}

/// STOPPING=1.
pub fn notify_stopping() {
    notify(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

/// Feeds systemd's watchdog (when `WATCHDOG_USEC` asks for it) at half its period, as long as
/// the heartbeat's promise holds.
pub fn spawn_watchdog(heartbeat: Arc<Heartbeat>, mut shutdown: Shutdown) {
    let Some(period) = sd_notify::watchdog_enabled() else {
        return;
    };
    let every = (period / 2).max(Duration::from_millis(10));
    tracing::info!(
        period_ms = period.as_millis() as u64,
        "The systemd watchdog is on."
    );
    tokio::spawn(async move {
        let mut warned = false;
        loop {
            if heartbeat.alive() {
                notify(&[NotifyState::Watchdog]);
                warned = false;
            } else if !warned {
                tracing::error!(
                    "The scheduler missed its heartbeat: no longer feeding the watchdog."
                );
                warned = true;
            }
            if !shutdown.sleep(every).await {
                return;
            }
        }
    });
}

/// Recovers the rows left `sending` by another mailqueue process that has ended (a `test-send`
/// or a `run --once` killed mid-attempt) as start-up recovery does: the attempt is `in_doubt`,
/// the row queued again (or held with `on_doubt = "hold"`). Rows of live processes are never
/// touched (see `Store::recover_orphans`). Errors are logged; the next round tries again.
pub async fn recover_orphans(store: &Store, cfg: &Config) {
    let (text, hold) = recovery_text(
        cfg,
        "the mailqueue process that was sending it stopped during the delivery",
    );
    match store.recover_orphans(text, hold).await {
        Ok(o) => {
            if !o.recovered.is_empty() {
                tracing::warn!(mail_ids = ?o.recovered, "Rows left 'sending' by a mailqueue process that has ended may have been delivered (in doubt): queued again, or held with on_doubt = \"hold\".");
            }
            if !o.unknown.is_empty() {
                tracing::warn!(mail_ids = ?o.unknown, "Rows are 'sending' but the lock file of the process that claimed them is missing (deleted by hand?); they are left alone until mailqueue next starts.");
            }
            tracing::debug!(
                recovered = o.recovered.len(),
                live = o.live,
                unknown = o.unknown.len(),
                "Checked the rows other processes are sending."
            );
        }
        Err(e) => {
            tracing::error!(error = %e.text(Lang::En), "Cannot check the rows other processes are sending; trying again next round.")
        }
    }
}

/// What a row recovered from `sending` says (`in_doubt`, in the configured language), and
/// whether it is held (`on_doubt = "hold"`) rather than queued again.
pub fn recovery_text(cfg: &Config, why: &str) -> (String, bool) {
    let hold = cfg.queue.on_doubt == OnDoubt::Hold;
    let text = Error::InDoubt {
        detail: why.into(),
        held: hold,
    }
    .text(cfg.log.error_language);
    (text, hold)
}

/// Every `[queue] housekeeping_interval`: recovers the rows of processes that ended while
/// sending, purges old rows and maintains the file.
pub fn spawn_housekeeping(store: Store, cfg: &Config, mut shutdown: Shutdown) {
    let (keep_sent, keep_failed, every) = (
        cfg.queue.keep_sent,
        cfg.queue.keep_failed,
        cfg.queue.housekeeping_interval,
    );
    let cfg = cfg.clone();
    tokio::spawn(async move {
        let mut blocked_rounds = 0u32;
        loop {
            if !shutdown.sleep(every).await {
                return;
            }
            recover_orphans(&store, &cfg).await;
            let now = SystemTime::now();
            let sent = store
                .purge_status(&["sent"], now.checked_sub(keep_sent).unwrap_or(UNIX_EPOCH))
                .await;
            let failed = store
                .purge_status(
                    &["failed", "cancelled"],
                    now.checked_sub(keep_failed).unwrap_or(UNIX_EPOCH),
                )
                .await;
            match (sent, failed) {
                (Ok(a), Ok(b)) if a + b > 0 => {
                    tracing::info!(sent = a, failed_or_cancelled = b, "Purged old mails.")
                }
                (Ok(_), Ok(_)) => {}
                (Err(e), _) | (_, Err(e)) => {
                    tracing::error!(error = %e.text(Lang::En), "Cannot purge old mails; trying again next round.")
                }
            }
            match store.maintain(1000).await {
                Ok(m) => {
                    blocked_rounds = if m.checkpoint_blocked {
                        blocked_rounds + 1
                    } else {
                        0
                    };
                    if blocked_rounds >= 3 || m.wal_bytes > 64 << 20 {
                        tracing::warn!(wal_bytes = m.wal_bytes, wal_pages = m.wal_pages, rounds = blocked_rounds,
                            "The queue file's WAL keeps growing: a reader (the CRM?) holds a transaction open, so it cannot be checkpointed.");
                    } else {
                        tracing::debug!(
                            wal_pages = m.wal_pages,
                            free_pages = m.free_pages,
                            "Checkpointed the WAL."
                        );
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e.text(Lang::En), "Cannot maintain the queue file; trying again next round.")
                }
            }
        }
    });
}

/// Refreshes the gauges that come from the database every few seconds.
pub fn spawn_gauges(store: Store, mut shutdown: Shutdown) {
    tokio::spawn(async move {
        loop {
            if let Ok(s) = store.summary().await {
                crate::telemetry::set_queue_gauges(&s);
            }
            if !shutdown.sleep(Duration::from_secs(5)).await {
                return;
            }
        }
    });
}

//! Signals and shutdown: Unix signals become one [`Control`] enum; stopping is a [`Shutdown`].
//!
//! Job: listen for SIGTERM, SIGINT and SIGHUP with signal-hook and turn them into
//! [`Control`] values on a channel; give every long wait a [`Shutdown`] it can select on.
//!
//! Not its job: deciding what a reload changes (the daemon does that) or finishing the mail in
//! flight (the scheduler checks [`Shutdown`] only between mails, so a mail being sent finishes).
//!
//! Invariants: a second SIGTERM/SIGINT while stopping exits at once (status 1); a mail
//! interrupted that way stays `sending` and is recovered as in doubt at the next start.

use futures::StreamExt;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use tokio::sync::{mpsc, watch};

/// What an operator asked the daemon to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// SIGTERM or SIGINT: stop claiming, finish the mail in flight, exit 0.
    Stop,
    /// SIGHUP: read the config again.
    Reload,
}

/// A cheap, cloneable "we are stopping" flag that can be awaited.
#[derive(Clone)]
pub struct Shutdown {
    /// Becomes true once; never back.
    rx: watch::Receiver<bool>,
}

/// The sending side of [`Shutdown`].
pub struct ShutdownTrigger {
    /// Sets the flag.
    tx: watch::Sender<bool>,
}

/// A new shutdown flag and its trigger.
pub fn shutdown_pair() -> (ShutdownTrigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (ShutdownTrigger { tx }, Shutdown { rx })
}

impl ShutdownTrigger {
    /// Asks everything holding a [`Shutdown`] to stop.
    pub fn trigger(&self) {
        let _ = self.tx.send(true);
    }
}

impl Shutdown {
    /// A flag that never fires (for one-shot commands).
    pub fn never() -> Shutdown {
        let (tx, rx) = watch::channel(false);
        std::mem::forget(tx);
        Shutdown { rx }
    }

    /// Whether stopping was asked for.
    pub fn is_requested(&self) -> bool {
        *self.rx.borrow()
    }

    /// Completes when stopping is asked for.
    pub async fn requested(&mut self) {
        let _ = self.rx.wait_for(|v| *v).await;
    }

    /// Sleeps for `d` unless stopping is asked for first; returns false if interrupted.
    pub async fn sleep(&mut self, d: std::time::Duration) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(d) => true,
            _ = self.requested() => false,
        }
    }
}

/// Starts listening for signals. Stop requests fire `trigger`; a second one exits at once.
/// Reload requests are sent on the returned channel.
pub fn listen(trigger: ShutdownTrigger) -> std::io::Result<mpsc::UnboundedReceiver<Control>> {
    let mut signals = signal_hook_tokio::Signals::new([SIGTERM, SIGINT, SIGHUP])?;
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut stopping = false;
        while let Some(sig) = signals.next().await {
            let control = if sig == SIGHUP {
                Control::Reload
            } else {
                Control::Stop
            };
            match control {
                Control::Stop if stopping => {
                    tracing::warn!(signal = sig, "Second stop signal: exiting at once; a mail in flight stays 'sending' and is recovered at the next start.");
                    std::process::exit(1);
                }
                Control::Stop => {
                    stopping = true;
                    tracing::info!(
                        signal = sig,
                        "Stop requested: finishing the mail in flight, then exiting."
                    );
                    trigger.trigger();
                }
                Control::Reload => {
                    let _ = tx.send(Control::Reload);
                }
            }
        }
    });
    Ok(rx)
}

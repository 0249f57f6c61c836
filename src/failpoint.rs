//! Test-only fault injection (cargo feature `failpoints`; never in a release build).
//!
//! Job: let tests and the soak script stop the daemon at exact places. `MAILQUEUE_FAILPOINT`
//! holds `name` or `name:probability` entries separated by commas; [`hit`] answers whether the
//! named point fires now, and [`crash`] aborts the process there (like SIGKILL: no cleanup, no
//! outcome written).
//!
//! Points: `freeze-scheduler` (the loop stops without a heartbeat), `leak-secret` (a planted
//! secret in the trace log), `crash-in-claim` (inside the claim's transaction, before commit),
//! `crash-after-reply` (between the server's final reply and the outcome write), `no-inotify`
//! (the idle scheduler polls the queue file's stamp instead of waiting for inotify events).
//!
//! Not its job: anything in a normal build — without the feature every call is `false`.

/// Whether the failpoint `name` fires now.
pub fn hit(name: &str) -> bool {
    #[cfg(feature = "failpoints")]
    {
        let Ok(spec) = std::env::var("MAILQUEUE_FAILPOINT") else {
            return false;
        };
        for entry in spec.split(',') {
            let (n, p) = entry.split_once(':').unwrap_or((entry, "1"));
            if n.trim() == name {
                let p: f64 = p.trim().parse().unwrap_or(1.0);
                return p >= 1.0 || rand_unit() < p;
            }
        }
        false
    }
    #[cfg(not(feature = "failpoints"))]
    {
        let _ = name;
        false
    }
}

/// Aborts the process at failpoint `name` when it fires.
pub fn crash(name: &str) {
    if hit(name) {
        eprintln!("failpoint {name}: aborting");
        std::process::abort();
    }
}

#[cfg(feature = "failpoints")]
fn rand_unit() -> f64 {
    (uuid::Uuid::new_v4().as_u128() % 1_000_000) as f64 / 1_000_000.0
}

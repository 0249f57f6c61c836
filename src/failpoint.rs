//! Test-only fault injection (cargo feature `failpoints`; never in a release build).
//!
//! Job: let tests and the soak script stop the daemon at exact places. `MAILQUEUE_FAILPOINT`
//! holds `name`, `name:probability` or `name#n` (fires at the n-th time the point is reached
//! only) entries separated by commas; [`hit`] answers whether the named point fires now, and
//! [`crash`] aborts the process there (like SIGKILL: no cleanup, no outcome written).
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
            if let Some((n, nth)) = entry.split_once('#') {
                if n.trim() == name {
                    return count(name) == nth.trim().parse::<u64>().unwrap_or(0);
                }
                continue;
            }
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

/// How many times the point `name` has been reached in this process, this time included.
#[cfg(feature = "failpoints")]
fn count(name: &str) -> u64 {
    static COUNTS: std::sync::Mutex<Vec<(String, u64)>> = std::sync::Mutex::new(Vec::new());
    let mut counts = COUNTS.lock().unwrap_or_else(|p| p.into_inner());
    match counts.iter_mut().find(|(n, _)| n == name) {
        Some((_, c)) => {
            *c += 1;
            *c
        }
        None => {
            counts.push((name.to_string(), 1));
            1
        }
    }
}

#[cfg(feature = "failpoints")]
fn rand_unit() -> f64 {
    (uuid::Uuid::new_v4().as_u128() % 1_000_000) as f64 / 1_000_000.0
}

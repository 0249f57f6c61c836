//! Pacing: at most what the provider allows, even across a restart.
//!
//! Job: a governor token bucket derived from `[rate] interval_ms` and `burst` (GCRA: one token
//! every interval, `burst` tokens at most), plus the rolling `max_per_hour` / `max_per_day`
//! windows. [`Pacer::restore`] rebuilds the bucket from the send times the database records, so
//! a daemon restarted right after a burst does not send sooner than the interval allows.
//!
//! Not its job: sleeping. [`Pacer::try_acquire`] answers at once — a slot was taken, or how long
//! to wait — and the caller sleeps on tokio's clock (cancellable by shutdown). This keeps the
//! pacer testable with governor's `FakeRelativeClock` (governor's own `until_ready` waits on
//! futures-timer, which tokio's paused clock does not drive).
//!
//! The bucket spaces the moments the pace lets mails go; what the provider sees is when each
//! MAIL FROM reaches it, a little later and not always equally later. So the pacer also holds
//! the next MAIL FROM until `interval` after the server's reply to the `burst`-th previous one
//! ([`Pacer::handed_over`]): the reply is the latest moment the server can have received it.
//! That keeps every window of one interval at the server to `burst` MAIL FROMs; it adds the
//! MAIL FROM round trip to each gap (well under 1 ms on a LAN).
//!
//! Invariants: a slot is taken only when the caller is about to send; never more than `burst`
//! MAIL FROMs within one interval at the server (the caller reports each reply); the windows
//! never count more than the database recorded plus what this process sent.

use std::collections::VecDeque;
use std::num::NonZeroU32;
use std::time::{Duration, SystemTime};

use governor::clock::{Clock, DefaultClock, Reference};
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};

use crate::config::RateConfig;

const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(86400);
/// The resolution of the send times the database records (millisecond text).
const HISTORY_RESOLUTION: Duration = Duration::from_millis(1);

type Limiter<C> = RateLimiter<NotKeyed, InMemoryState, C, NoOpMiddleware<<C as Clock>::Instant>>;

/// The pace keeper. One per account; the scheduler owns it.
pub struct Pacer<C: Clock = DefaultClock> {
    /// The token bucket; `None` when `interval_ms = 0` (unpaced).
    limiter: Option<Limiter<C>>,
    /// The clock the bucket runs on (real, or fake in tests).
    clock: C,
    /// The configured interval, kept to rebuild the bucket's state after a restart.
    interval: Duration,
    /// The configured burst.
    burst: u32,
    /// Tokens to take before the next send: the part of the restored state the bucket
    /// could not be given directly (see [`Pacer::restore`]).
    owed: u32,
    /// Send times of the last 24 hours, oldest first, for the rolling windows (bounded by the
    /// larger cap, so it never grows without limit).
    recent: VecDeque<SystemTime>,
    /// `[rate] max_per_hour`.
    max_per_hour: Option<u32>,
    /// `[rate] max_per_day`.
    max_per_day: Option<u32>,
    /// When the server answered the last `burst` MAIL FROMs, oldest first: the latest moments
    /// it can have received them (see [`Pacer::handed_over`]).
    handed: VecDeque<C::Instant>,
}

impl Pacer<DefaultClock> {
    /// A pacer on the real clock.
    pub fn new(cfg: &RateConfig) -> Self {
        Self::with_clock(cfg, DefaultClock::default())
    }
}

impl<C: Clock + Clone> Pacer<C> {
    /// A pacer on the given clock (tests pass governor's `FakeRelativeClock`).
    pub fn with_clock(cfg: &RateConfig, clock: C) -> Self {
        let burst = NonZeroU32::new(cfg.burst.max(1)).expect("burst >= 1");
        let limiter = Quota::with_period(cfg.interval)
            .map(|q| RateLimiter::direct_with_clock(q.allow_burst(burst), clock.clone()));
        Pacer {
            limiter,
            clock,
            interval: cfg.interval,
            burst: burst.get(),
            owed: 0,
            recent: VecDeque::new(),
            max_per_hour: cfg.max_per_hour,
            max_per_day: cfg.max_per_day,
            handed: VecDeque::new(),
        }
    }

    /// Records that the server answered a MAIL FROM `ago` before now. The server received it
    /// somewhere between our write and its reply; the pace lets the next MAIL FROM (the
    /// `burst`-th next, with a burst) go no sooner than `interval` after this reply, so no two
    /// reach the server closer together than the interval, however late a MAIL FROM left after
    /// the pace let it go (a slow wakeup, a busy CPU) or however late the server saw it. The
    /// token bucket alone spaces the moments the pace *let* mails go, which a late one then
    /// crowds at the server.
    pub fn handed_over(&mut self, ago: Duration) {
        if self.limiter.is_none() {
            return;
        }
        self.handed
            .push_back(self.clock.now().saturating_sub(ago.into()));
        while self.handed.len() > self.burst as usize {
            self.handed.pop_front();
        }
    }

    /// How many past sends [`Pacer::restore`] wants to see (the newest ones).
    pub fn history_needed(&self) -> usize {
        let windows = self.max_per_day.max(self.max_per_hour).unwrap_or(0) as usize;
        windows.max(self.burst as usize)
    }

    /// Rebuilds the pace from the send times the database recorded (any order), as if this
    /// process had made them. Returns how long to wait before the first send; the caller sleeps
    /// that long before calling [`Pacer::try_acquire`].
    ///
    /// The bucket's state is its "theoretical arrival time" (TAT): replaying the history gives
    /// the TAT a never-restarted daemon would have. governor has no setter for it, but taking
    /// `k` tokens from a full bucket at time `t1` gives TAT = t1 + k·interval; so we wait until
    /// `t1 = TAT - k·interval` with the largest `k` that keeps `t1` in the future, then take `k`.
    pub fn restore(&mut self, history: &[SystemTime], now: SystemTime) -> Duration {
        let mut times: Vec<SystemTime> = history.iter().copied().filter(|t| *t <= now).collect();
        times.sort();
        let horizon = now.checked_sub(DAY).unwrap_or(SystemTime::UNIX_EPOCH);
        self.recent = times.iter().copied().filter(|t| *t > horizon).collect();
        if self.limiter.is_none() || times.is_empty() {
            return Duration::ZERO;
        }
        let t = self.interval;
        let mut tat: Option<SystemTime> = None;
        for s in &times {
            // The database keeps milliseconds, truncated: the send may have been up to 1 ms later.
            let s = *s + HISTORY_RESOLUTION;
            tat = Some(tat.map_or(s, |x| x.max(s)) + t);
        }
        let Some(tat) = tat else {
            return Duration::ZERO;
        };
        let Ok(ahead) = tat.duration_since(now) else {
            return Duration::ZERO;
        };
        let k = ((ahead.as_nanos() / t.as_nanos()) as u32).min(self.burst);
        let wait = ahead - t * k;
        self.owed = k;
        wait
    }

    /// Takes a slot if one is free now; otherwise says how long until one may be.
    pub fn try_acquire(&mut self, now: SystemTime) -> Result<(), Duration> {
        if let Some(wait) = self.window_wait(now) {
            return Err(wait);
        }
        if let Some(limiter) = &self.limiter {
            if self.handed.len() >= self.burst as usize {
                let now = self.clock.now();
                let free = self.handed[0] + self.interval.into();
                if now < free {
                    return Err(free.duration_since(now).into());
                }
            }
            if let Some(owed) = NonZeroU32::new(std::mem::take(&mut self.owed)) {
                // Owed tokens come from a full bucket, so this cannot fail for capacity.
                let _ = limiter.check_n(owed);
            }
            if let Err(not_until) = limiter.check() {
                let from = self.clock.now();
                return Err(not_until.wait_time_from(from));
            }
        }
        self.record(now);
        Ok(())
    }

    /// How long the rolling windows (`max_per_hour`, `max_per_day`) make the next send wait, if
    /// at all. Takes nothing: the scheduler asks before claiming, so a row does not sit claimed
    /// for an hour.
    pub fn window_wait(&mut self, now: SystemTime) -> Option<Duration> {
        let horizon = now.checked_sub(DAY).unwrap_or(SystemTime::UNIX_EPOCH);
        while self.recent.front().is_some_and(|t| *t <= horizon) {
            self.recent.pop_front();
        }
        let mut wait = None::<Duration>;
        for (cap, span) in [(self.max_per_hour, HOUR), (self.max_per_day, DAY)] {
            let Some(cap) = cap else { continue };
            let start = now.checked_sub(span).unwrap_or(SystemTime::UNIX_EPOCH);
            // `recent` is sorted (sends are recorded in time order): a binary search finds the
            // window, so the cost stays O(log n) however large the cap.
            let first = self.recent.partition_point(|t| *t <= start);
            let in_window = self.recent.len() - first;
            if in_window >= cap as usize {
                // Free again when the oldest send that makes the count reach the cap leaves.
                let oldest = self.recent[self.recent.len() - cap as usize];
                let w = (oldest + span)
                    .duration_since(now)
                    .unwrap_or(Duration::ZERO)
                    + Duration::from_millis(1);
                wait = Some(wait.map_or(w, |x| x.max(w)));
            }
        }
        wait
    }

    /// How many more sends the rolling windows allow right now (`None`: no cap is set). The
    /// scheduler claims no more rows ahead than this.
    pub fn room(&mut self, now: SystemTime) -> Option<u32> {
        self.window_wait(now); // drops sends older than a day
        let mut room = None::<u32>;
        for (cap, span) in [(self.max_per_hour, HOUR), (self.max_per_day, DAY)] {
            let Some(cap) = cap else { continue };
            let start = now.checked_sub(span).unwrap_or(SystemTime::UNIX_EPOCH);
            let first = self.recent.partition_point(|t| *t <= start);
            let left = (cap as usize).saturating_sub(self.recent.len() - first) as u32;
            room = Some(room.map_or(left, |r| r.min(left)));
        }
        room
    }

    /// Whether there is no pace (`interval_ms = 0`): a send may follow the last one at once.
    pub fn unpaced(&self) -> bool {
        self.limiter.is_none()
    }

    fn record(&mut self, now: SystemTime) {
        if self.max_per_hour.is_some() || self.max_per_day.is_some() {
            self.recent.push_back(now);
            let cap = self.max_per_day.max(self.max_per_hour).unwrap_or(0) as usize;
            while self.recent.len() > cap {
                self.recent.pop_front();
            }
        }
    }

    /// The configured interval (zero when unpaced).
    pub fn interval(&self) -> Duration {
        self.interval
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;

    fn cfg(ms: u64, burst: u32) -> RateConfig {
        RateConfig {
            interval: Duration::from_millis(ms),
            burst,
            max_per_hour: None,
            max_per_day: None,
        }
    }

    /// Drives a pacer on a fake clock: whenever it says wait, advance the clock (and the wall
    /// time) by exactly that much. Returns the send times in ms from the start.
    fn drive(
        p: &mut Pacer<FakeRelativeClock>,
        clock: &FakeRelativeClock,
        n: usize,
        start: SystemTime,
    ) -> Vec<u128> {
        let mut now = start;
        let mut sends = vec![];
        while sends.len() < n {
            match p.try_acquire(now) {
                Ok(()) => sends.push(now.duration_since(start).unwrap().as_millis()),
                Err(w) => {
                    assert!(w > Duration::ZERO);
                    clock.advance(w);
                    now += w;
                }
            }
        }
        sends
    }

    #[test]
    fn one_mail_per_interval() {
        let clock = FakeRelativeClock::default();
        let mut p = Pacer::with_clock(&cfg(6000, 1), clock.clone());
        let sends = drive(&mut p, &clock, 4, SystemTime::UNIX_EPOCH);
        assert_eq!(sends, vec![0, 6000, 12000, 18000]);
    }

    #[test]
    fn burst_then_interval() {
        let clock = FakeRelativeClock::default();
        let mut p = Pacer::with_clock(&cfg(1000, 3), clock.clone());
        let sends = drive(&mut p, &clock, 5, SystemTime::UNIX_EPOCH);
        assert_eq!(sends, vec![0, 0, 0, 1000, 2000]);
    }

    #[test]
    fn unpaced_never_waits() {
        let clock = FakeRelativeClock::default();
        let mut p = Pacer::with_clock(&cfg(0, 1), clock.clone());
        for _ in 0..100 {
            assert_eq!(p.try_acquire(SystemTime::UNIX_EPOCH), Ok(()));
        }
    }

    #[test]
    fn a_restart_right_after_a_send_waits_out_the_interval() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let clock = FakeRelativeClock::default();
        let mut p = Pacer::with_clock(&cfg(6000, 1), clock.clone());
        // The last send was 1.5 s ago: the next may go 4.5 s from now, not earlier (+1 ms: the
        // database keeps truncated milliseconds).
        let wait = p.restore(&[t0 - Duration::from_millis(1500)], t0);
        assert_eq!(wait, Duration::from_millis(4501));
        clock.advance(wait);
        let sends = drive(&mut p, &clock, 2, t0 + wait);
        assert_eq!(sends, vec![0, 6000]);
    }

    #[test]
    fn a_restart_after_a_burst_keeps_the_bucket_empty() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let clock = FakeRelativeClock::default();
        let mut p = Pacer::with_clock(&cfg(1000, 3), clock.clone());
        // Three sends just now: a fresh daemon would allow three more at once; ours must not.
        let wait = p.restore(&[t0, t0, t0], t0);
        clock.advance(wait);
        let start = t0 + wait;
        let sends = drive(&mut p, &clock, 3, start);
        let since_t0: Vec<u128> = sends.iter().map(|s| s + wait.as_millis()).collect();
        // +1 ms: the recorded times are truncated milliseconds.
        assert_eq!(since_t0, vec![1001, 2001, 3001]);
    }

    /// Sends `n` mails: each MAIL FROM is answered `late[i]` after the pace let it go. Returns
    /// when the pace let each go and when each was answered, in ms from the start.
    fn drive_late(
        p: &mut Pacer<FakeRelativeClock>,
        clock: &FakeRelativeClock,
        late: &[u64],
    ) -> (Vec<u64>, Vec<u64>) {
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let mut t = 0u64;
        let (mut released, mut answered) = (vec![], vec![]);
        for l in late {
            loop {
                match p.try_acquire(start + Duration::from_millis(t)) {
                    Ok(()) => break,
                    Err(w) => {
                        assert!(w > Duration::ZERO);
                        let w = w.as_millis() as u64;
                        clock.advance(Duration::from_millis(w));
                        t += w;
                    }
                }
            }
            released.push(t);
            clock.advance(Duration::from_millis(*l));
            t += l;
            answered.push(t);
            p.handed_over(Duration::ZERO);
        }
        (released, answered)
    }

    #[test]
    fn a_late_mail_from_holds_the_next_one_back_a_full_interval() {
        let clock = FakeRelativeClock::default();
        let mut p = Pacer::with_clock(&cfg(100, 1), clock.clone());
        // The second MAIL FROM is answered 8 ms after the pace let it go (a busy CPU, a slow
        // server); the third was let go at 200 ms by the bucket alone, 92 ms after it.
        let (released, answered) = drive_late(&mut p, &clock, &[0, 8, 0, 0]);
        assert_eq!(answered, vec![0, 108, 208, 308]);
        assert_eq!(released, vec![0, 100, 208, 308]);
        for i in 1..released.len() {
            assert!(
                released[i] - answered[i - 1] >= 100,
                "{released:?} {answered:?}"
            );
        }
    }

    #[test]
    fn prompt_mail_froms_keep_the_exact_interval() {
        let clock = FakeRelativeClock::default();
        let mut p = Pacer::with_clock(&cfg(100, 1), clock.clone());
        let (released, _) = drive_late(&mut p, &clock, &[0; 5]);
        assert_eq!(released, vec![0, 100, 200, 300, 400]);
    }

    #[test]
    fn with_a_burst_the_burst_th_previous_reply_is_the_limit() {
        let clock = FakeRelativeClock::default();
        let mut p = Pacer::with_clock(&cfg(100, 3), clock.clone());
        // Three at once (each answered 5 ms after the previous); the fourth may not reach the
        // server within 100 ms of the first's reply, so at most 3 fall in any interval.
        let (released, answered) = drive_late(&mut p, &clock, &[5, 5, 5, 5]);
        assert_eq!(answered[..3], [5, 10, 15]);
        assert_eq!(released[3], 105);
    }

    #[test]
    fn unpaced_ignores_replies() {
        let clock = FakeRelativeClock::default();
        let mut p = Pacer::with_clock(&cfg(0, 1), clock.clone());
        let (released, _) = drive_late(&mut p, &clock, &[3, 3, 3]);
        assert_eq!(released, vec![0, 3, 6]);
    }

    #[test]
    fn old_history_does_not_delay() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let mut p = Pacer::with_clock(&cfg(6000, 1), FakeRelativeClock::default());
        assert_eq!(
            p.restore(&[t0 - Duration::from_secs(60)], t0),
            Duration::ZERO
        );
        assert_eq!(p.try_acquire(t0), Ok(()));
    }

    #[test]
    fn hourly_cap_counts_restored_sends() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let mut c = cfg(0, 1);
        c.max_per_hour = Some(2);
        let mut p = Pacer::with_clock(&c, FakeRelativeClock::default());
        p.restore(&[t0 - Duration::from_secs(1800)], t0);
        assert_eq!(p.try_acquire(t0), Ok(()));
        // Two in the last hour now: the next waits until the older one is an hour old.
        let w = p.try_acquire(t0).unwrap_err();
        assert_eq!(w, Duration::from_secs(1800) + Duration::from_millis(1));
        assert_eq!(p.try_acquire(t0 + w), Ok(()));
    }

    #[test]
    fn room_is_what_the_tightest_window_has_left() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let mut p = Pacer::with_clock(&cfg(0, 1), FakeRelativeClock::default());
        assert_eq!(p.room(t0), None, "no cap, no limit");
        assert!(p.unpaced());
        let mut c = cfg(0, 1);
        c.max_per_hour = Some(5);
        c.max_per_day = Some(3);
        let mut p = Pacer::with_clock(&c, FakeRelativeClock::default());
        p.restore(&[t0 - Duration::from_secs(7200)], t0);
        assert_eq!(p.room(t0), Some(2), "the day's cap of 3 has one send in it");
        assert_eq!(p.try_acquire(t0), Ok(()));
        assert_eq!(p.try_acquire(t0), Ok(()));
        assert_eq!(p.room(t0), Some(0));
        assert!(!Pacer::with_clock(&cfg(100, 1), FakeRelativeClock::default()).unpaced());
    }
}

//! The kill -9 soak (issue 5.1): a few thousand queued mails, the real daemon (`mailqueue run`,
//! `interval_ms = 0`) against a real SMTP server that keeps every message
//! (tests/servers/smtp_server.py), killed with SIGKILL at random moments and restarted until the
//! queue is drained. With `--features failpoints` some restarts also run with
//! `MAILQUEUE_FAILPOINT=crash-in-claim:P` or `crash-after-reply:P`, which abort the process inside
//! the claim's transaction or between the server's final reply and the outcome write.
//!
//! At the end: every row is `sent`, `failed` or `held` (the last two with a reason), no attempt
//! is left open, every `sent` row reached the server for every recipient (matched by the row's
//! Message-ID), each mail's extra copies at the server are covered by its `in_doubt` attempts (so
//! the total duplicates are at most the `in_doubt` attempts), nothing at the server is unknown,
//! nothing is lost, and `PRAGMA integrity_check` says `ok`.
//!
//! Modes (`MAILQUEUE_SOAK`):
//! - unset / `fast`: an ordinary test (300 mails, ~10 kills, a few seconds); asserts only.
//! - `full`: 3000 mails, at least 50 random kills plus failpoint aborts; needs
//!   `--features failpoints`; also rewrites the soak section of docs/reliability.md (between
//!   `<!-- BEGIN soak -->` and `<!-- END soak -->`). Run it with scripts/soak.sh.
//!
//! `MAILQUEUE_SOAK_SEED=N` replays the same schedule of modes and kill delays (the moments the
//! kills land on still depend on timing). On a failure the work directory (queue file, every
//! run's daemon log, a copy of the server's spool, `report.txt`) is kept and its path printed.

mod support;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::fs;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use support::*;

/// Whether this build has the failpoints (then the daemon binary has them too: same features).
const FAILPOINTS: bool = cfg!(feature = "failpoints");

/// The failpoints a restart may run with.
const CRASH_IN_CLAIM: &str = "crash-in-claim";
const CRASH_AFTER_REPLY: &str = "crash-after-reply";

/// The command the docs name when none is given by scripts/soak.sh.
const FULL_COMMAND: &str =
    "MAILQUEUE_SOAK=full cargo test --release --features failpoints --test soak -- --nocapture";

/// How big a soak is.
#[derive(Debug, Clone)]
struct Plan {
    name: &'static str,
    mails: usize,
    /// Random SIGKILLs to deliver before the final, clean run.
    random_kills: usize,
    /// Aborts wanted from each failpoint (0 without the feature).
    per_failpoint: usize,
    /// The failpoint probability per mail.
    probability: f64,
    /// Give up (a hang is a finding too) after this long.
    deadline: Duration,
    write_docs: bool,
}

impl Plan {
    fn from_env() -> Plan {
        match std::env::var("MAILQUEUE_SOAK").as_deref() {
            Ok("full") => {
                if !FAILPOINTS {
                    panic!("the full soak needs the failpoints: cargo test --release --features failpoints --test soak");
                }
                Plan {
                    name: "full",
                    mails: 3000,
                    random_kills: 60,
                    per_failpoint: 10,
                    probability: 0.02,
                    deadline: Duration::from_secs(30 * 60),
                    write_docs: true,
                }
            }
            Ok("fast") | Ok("") | Err(_) => Plan {
                name: "fast",
                // 600: with batched commits a run drains 300 too fast for ten random kills.
                mails: 600,
                random_kills: 10,
                per_failpoint: if FAILPOINTS { 2 } else { 0 },
                // Higher than the full run's 0.02, so that four aborts fit into the fast run.
                probability: 0.05,
                deadline: Duration::from_secs(45),
                write_docs: false,
            },
            Ok(other) => panic!("MAILQUEUE_SOAK={other:?}: use fast or full"),
        }
    }
}

/// SplitMix64: a small, seedable generator (no rand crate in dev-dependencies).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// How one restart is run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// SIGKILL after a random delay.
    Random,
    /// With `MAILQUEUE_FAILPOINT=<name>:<p>` until it aborts.
    Failpoint(&'static str),
    /// No faults: until the queue is drained, then SIGTERM.
    Final,
}

impl Mode {
    fn label(self) -> &'static str {
        match self {
            Mode::Random => "random",
            Mode::Failpoint(name) => name,
            Mode::Final => "final",
        }
    }
}

/// How one run of the daemon ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// We sent SIGKILL.
    Killed,
    /// The failpoint aborted it.
    Aborted,
    /// The failpoint never fired before the queue was drained; we sent SIGKILL.
    NotFired,
    /// Stopped with SIGTERM after the queue was drained.
    Stopped,
}

/// One run of the daemon, for the figures and the report.
#[derive(Debug)]
struct Run {
    n: usize,
    mode: Mode,
    end: End,
    /// Rows `sent` by this run (the count before and after).
    progress: i64,
    /// Rows left `sending` when it died: it died in the middle of a delivery.
    left_sending: i64,
    elapsed: Duration,
    log: PathBuf,
}

/// Counts of rows by status.
fn status_counts(db: &Db) -> BTreeMap<String, i64> {
    db.rows("SELECT status, count(*) AS n FROM mail_queue GROUP BY status")
        .into_iter()
        .map(|r| {
            (
                r["status"].as_str().unwrap_or_default().to_owned(),
                r["n"].as_i64().unwrap_or(0),
            )
        })
        .collect()
}

/// Rows still to deliver: `queued` or `sending`.
fn waiting(db: &Db) -> i64 {
    db.query_one("SELECT count(*) FROM mail_queue WHERE status IN ('queued', 'sending')")
}

fn sent(db: &Db) -> i64 {
    db.query_one("SELECT count(*) FROM mail_queue WHERE status = 'sent'")
}

/// The soak's working files: a queue, a config, the logs.
struct Soak {
    plan: Plan,
    /// A copy of the daemon binary: another `cargo build` in the same target directory (without
    /// the failpoints, say) must not swap it in the middle of the soak.
    bin: PathBuf,
    dir: tempfile::TempDir,
    config: PathBuf,
    db_path: PathBuf,
    rng: Rng,
    seed: u64,
    commit: String,
    runs: Vec<Run>,
}

impl Soak {
    fn new(plan: Plan, server_port: u16) -> Soak {
        let seed = std::env::var("MAILQUEUE_SOAK_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                let t = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap();
                t.as_nanos() as u64 ^ u64::from(std::process::id()) << 32
            });
        let dir = tempfile::Builder::new()
            .prefix("mq-soak-")
            .tempdir()
            .unwrap();
        fs::create_dir(dir.path().join("logs")).unwrap();
        let db_path = dir.path().join("queue.db");
        // base_config already has interval_ms = 0 (no pacing) and a 50 ms poll.
        let config = write_config(dir.path(), &base_config(&db_path, server_port));
        migrate(&config);
        let bin = dir.path().join("mailqueue");
        fs::copy(mailqueue_bin(), &bin).unwrap();
        if FAILPOINTS {
            // The string is only in a build with the feature (src/failpoint.rs).
            let has = Command::new("grep")
                .args(["-q", "-a", "-F", "MAILQUEUE_FAILPOINT"])
                .arg(&bin)
                .status()
                .unwrap();
            assert!(
                has.success(),
                "{} has no failpoints: was it rebuilt without --features failpoints meanwhile?",
                mailqueue_bin().display()
            );
        }
        Soak {
            plan,
            bin,
            dir,
            config,
            db_path,
            rng: Rng(seed),
            seed,
            commit: commit_under_test(),
            runs: Vec::new(),
        }
    }

    fn db(&self) -> Db {
        Db::open(&self.db_path)
    }

    /// Queues the mails in one transaction: every 7th with a Cc, every 11th with a Bcc, every
    /// 10th with a body of ~40 kB (so that kills also land in the middle of DATA).
    fn enqueue(&self) -> Vec<i64> {
        let db = self.db();
        db.execute("BEGIN IMMEDIATE");
        let mut ids = Vec::with_capacity(self.plan.mails);
        for i in 0..self.plan.mails {
            let cc = if i % 7 == 3 {
                format!("cc{i}@example.org")
            } else {
                String::new()
            };
            let bcc = if i % 11 == 5 {
                format!("bcc{i}@example.net")
            } else {
                String::new()
            };
            let line =
                format!("活動報告 {i}: 本日の訪問結果を報告します。 line of the soak mail {i}\n");
            let body = line.repeat(if i % 10 == 9 { 500 } else { 4 });
            ids.push(db.insert_cols(&[
                ("to_addrs", &format!("rcpt{i}@example.com")),
                ("cc_addrs", &cc),
                ("bcc_addrs", &bcc),
                ("subject", &format!("soak {i}")),
                ("body_text", &body),
            ]));
        }
        db.execute("COMMIT");
        ids
    }

    /// `mailqueue --config C run`, with core dumps off (aborts are expected) and the work
    /// directory as its cwd. `sh` execs the daemon, so the child's pid is the daemon's.
    fn spawn(&self, failpoint: Option<String>) -> Daemon {
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg("ulimit -c 0; exec \"$0\" \"$@\"")
            .arg(&self.bin)
            .arg("--config")
            .arg(&self.config)
            .arg("run")
            .env("NO_COLOR", "1")
            .env_remove("MAILQUEUE_FAILPOINT")
            .current_dir(self.dir.path())
            .stdin(Stdio::null());
        if let Some(f) = failpoint {
            cmd.env("MAILQUEUE_FAILPOINT", f);
        }
        Daemon::from_command(cmd)
    }

    /// The mode of the next restart: one whose quota is not met yet, weighted by what is left;
    /// `Final` when all are met.
    fn next_mode(&mut self) -> Mode {
        let mut left: Vec<(Mode, usize)> = vec![(
            Mode::Random,
            self.plan
                .random_kills
                .saturating_sub(self.ended(Mode::Random, End::Killed)),
        )];
        if FAILPOINTS {
            for fp in [CRASH_IN_CLAIM, CRASH_AFTER_REPLY] {
                let m = Mode::Failpoint(fp);
                left.push((
                    m,
                    self.plan
                        .per_failpoint
                        .saturating_sub(self.ended(m, End::Aborted)),
                ));
            }
        }
        let total: usize = left.iter().map(|(_, n)| n).sum();
        if total == 0 {
            return Mode::Final;
        }
        let mut pick = self.rng.below(total);
        for (m, n) in left {
            if pick < n {
                return m;
            }
            pick -= n;
        }
        unreachable!()
    }

    fn ended(&self, mode: Mode, end: End) -> usize {
        self.runs
            .iter()
            .filter(|r| r.mode == mode && r.end == end)
            .count()
    }

    /// The delay before a random kill: uniform in [0, 2 × mean], the mean chosen from the rate
    /// seen so far so that the remaining kills are spread over the remaining mails (leaving room
    /// for the failpoint runs, which take about 1/p mails each).
    fn kill_delay(&mut self, db: &Db) -> Duration {
        let (done, time) = self.runs.iter().fold((0i64, Duration::ZERO), |(d, t), r| {
            (d + r.progress, t + r.elapsed)
        });
        // Mails per second; a guess until something was measured.
        let rate = if done > 20 && !time.is_zero() {
            done as f64 / time.as_secs_f64()
        } else {
            200.0
        };
        let left = waiting(db) as f64;
        let fp_left: usize = [CRASH_IN_CLAIM, CRASH_AFTER_REPLY]
            .iter()
            .map(|fp| {
                let m = Mode::Failpoint(fp);
                self.plan
                    .per_failpoint
                    .saturating_sub(self.ended(m, End::Aborted))
            })
            .sum();
        let for_random = (left - fp_left as f64 / self.plan.probability).max(left * 0.2);
        let kills_left = self
            .plan
            .random_kills
            .saturating_sub(self.ended(Mode::Random, End::Killed)) as f64;
        let per_kill = for_random / (kills_left + 1.0);
        let mean = per_kill / rate;
        Duration::from_secs_f64(2.0 * mean * self.rng.unit())
    }

    /// One run of the daemon in `mode`; returns when it is dead.
    fn run_once(&mut self, mode: Mode, db: &Db) {
        let n = self.runs.len() + 1;
        let before = sent(db);
        let failpoint = match mode {
            Mode::Failpoint(fp) => Some(format!("{fp}:{}", self.plan.probability)),
            _ => None,
        };
        let delay = match mode {
            Mode::Random => Some(self.kill_delay(db)),
            _ => None,
        };
        let started = Instant::now();
        let mut d = self.spawn(failpoint);
        let (end, status) = match mode {
            Mode::Random => {
                let status = d.wait_timeout(delay.unwrap());
                assert!(
                    status.is_none(),
                    "run {n}: the daemon exited by itself ({status:?}) before the kill:\n{}",
                    d.stderr()
                );
                d.child.kill().unwrap();
                (End::Killed, self.reap(&mut d, n))
            }
            Mode::Failpoint(_) => {
                // Until it aborts, or (the failpoint never fired) the queue is drained.
                let mut idle_since = None;
                loop {
                    if let Some(st) = d.wait_timeout(POLL) {
                        break (End::Aborted, st);
                    }
                    if waiting(db) == 0 {
                        let t = *idle_since.get_or_insert_with(Instant::now);
                        if t.elapsed() > Duration::from_millis(200) {
                            d.child.kill().unwrap();
                            break (End::NotFired, self.reap(&mut d, n));
                        }
                    }
                    assert!(
                        started.elapsed() < Duration::from_secs(300),
                        "run {n} ({}) neither aborted nor drained the queue in 300 s; counts {:?}; stderr:\n{}",
                        mode.label(),
                        status_counts(db),
                        d.stderr()
                    );
                }
            }
            Mode::Final => {
                // SIGTERM before the handlers are installed would kill it the default way.
                wait_until(Duration::from_secs(20), "the daemon's Ready line", || {
                    d.stderr().contains("Ready").then_some(())
                });
                let deadline = Instant::now() + Duration::from_secs(120);
                while waiting(db) > 0 {
                    if let Some(st) = d.child.try_wait().unwrap() {
                        panic!(
                            "run {n} (final): the daemon exited ({st}) with rows waiting; counts {:?}; stderr:\n{}",
                            status_counts(db),
                            d.stderr()
                        );
                    }
                    assert!(
                        Instant::now() < deadline,
                        "run {n} (final): the queue was not drained in 120 s; counts {:?}; stderr:\n{}",
                        status_counts(db),
                        d.stderr()
                    );
                    thread::sleep(POLL);
                }
                let st = d.terminate(Duration::from_secs(30));
                assert!(
                    st.success(),
                    "run {n} (final): exit {st} after SIGTERM; stderr:\n{}",
                    d.stderr()
                );
                (End::Stopped, st)
            }
        };
        let elapsed = started.elapsed();
        let stderr = d.stderr();
        let log = self
            .dir
            .path()
            .join(format!("logs/run-{n:03}-{}.log", mode.label()));
        fs::write(&log, &stderr).unwrap();
        if end == End::Aborted {
            let Mode::Failpoint(fp) = mode else {
                unreachable!()
            };
            assert!(
                status.signal() == Some(6) && stderr.contains(&format!("failpoint {fp}: aborting")),
                "run {n} ({fp}): the daemon ended ({status}) but not by the failpoint; stderr:\n{stderr}"
            );
        }
        if end == End::Killed || end == End::NotFired {
            assert_eq!(
                status.signal(),
                Some(9),
                "run {n}: {status}; stderr:\n{stderr}"
            );
        }
        let left_sending: i64 =
            db.query_one("SELECT count(*) FROM mail_queue WHERE status = 'sending'");
        self.runs.push(Run {
            n,
            mode,
            end,
            progress: sent(db) - before,
            left_sending,
            elapsed,
            log,
        });
    }

    /// Waits for a killed daemon to be gone (its locks are released with it).
    fn reap(&self, d: &mut Daemon, n: usize) -> ExitStatus {
        d.wait_timeout(Duration::from_secs(10))
            .unwrap_or_else(|| panic!("run {n}: the daemon did not die after SIGKILL"))
    }

    fn all_logs(&self) -> Vec<(PathBuf, String)> {
        self.runs
            .iter()
            .map(|r| (r.log.clone(), read_lossy(&r.log)))
            .collect()
    }
}

/// What the end state says.
#[derive(Debug, Default)]
struct Figures {
    rows: i64,
    sent: i64,
    failed: i64,
    held: i64,
    other: BTreeMap<String, i64>,
    /// Messages the server kept.
    received: usize,
    /// Extra copies at the server, by Message-ID.
    duplicates: usize,
    in_doubt: i64,
    lost: usize,
    integrity: String,
    /// Problems, one line each (empty = pass).
    problems: Vec<String>,
    /// Rows worth a closer look in the report.
    suspects: BTreeSet<i64>,
}

/// `<abc@x>` / `abc@x` → `abc@x`
fn bare_id(s: &str) -> String {
    s.trim().trim_matches(['<', '>']).to_owned()
}

fn addresses(list: &str) -> Vec<String> {
    list.split([',', ';'])
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|a| bare_id(a.rsplit('<').next().unwrap_or(a)).to_ascii_lowercase())
        .collect()
}

fn check(db: &Db, ids: &[i64], msgs: &[Received]) -> Figures {
    let mut f = Figures::default();
    let rows = db.rows(
        "SELECT id, status, message_id, to_addrs, cc_addrs, bcc_addrs, error_code, last_error
         FROM mail_queue ORDER BY id",
    );
    f.rows = rows.len() as i64;

    // Copies at the server by Message-ID, with their recipients.
    let mut at_server: HashMap<String, Vec<&Received>> = HashMap::new();
    for m in msgs {
        match m.message_id() {
            Some(mid) => at_server.entry(bare_id(&mid)).or_default().push(m),
            None => f
                .problems
                .push(format!("server message {} has no Message-ID", m.seq)),
        }
    }
    f.received = msgs.len();
    f.duplicates = at_server.values().map(|v| v.len() - 1).sum();

    let in_doubt_by_mail: HashMap<i64, i64> = db
        .rows("SELECT mail_id, count(*) AS n FROM mail_attempt WHERE outcome = 'in_doubt' GROUP BY mail_id")
        .into_iter()
        .map(|r| (r["mail_id"].as_i64().unwrap(), r["n"].as_i64().unwrap()))
        .collect();
    f.in_doubt = in_doubt_by_mail.values().sum();

    let present: BTreeSet<i64> = rows.iter().map(|r| r["id"].as_i64().unwrap()).collect();
    for id in ids {
        if !present.contains(id) {
            f.lost += 1;
            f.problems
                .push(format!("row {id} is missing from mail_queue"));
        }
    }
    let mut known = BTreeSet::new();
    for r in &rows {
        let id = r["id"].as_i64().unwrap();
        let status = r["status"].as_str().unwrap_or_default();
        let mid = r["message_id"].as_str().map(bare_id);
        let copies = mid
            .as_ref()
            .and_then(|m| at_server.get(m))
            .map_or(&[][..], |v| v.as_slice());
        if let Some(m) = &mid {
            known.insert(m.clone());
        }
        match status {
            "sent" => f.sent += 1,
            "failed" => f.failed += 1,
            "held" => f.held += 1,
            s => *f.other.entry(s.to_owned()).or_default() += 1,
        }
        let has_reason = r["error_code"].is_string() && r["last_error"].is_string();
        match status {
            "sent" => {
                if copies.is_empty() {
                    f.lost += 1;
                    f.suspects.insert(id);
                    f.problems.push(format!(
                        "LOST: row {id} is sent but its Message-ID {mid:?} never reached the server"
                    ));
                } else {
                    // Every recipient got it (in one of the copies).
                    let got: BTreeSet<String> = copies
                        .iter()
                        .flat_map(|m| m.rcpt_tos.iter().map(|a| a.to_ascii_lowercase()))
                        .collect();
                    let want: Vec<String> = ["to_addrs", "cc_addrs", "bcc_addrs"]
                        .iter()
                        .flat_map(|c| addresses(r[*c].as_str().unwrap_or_default()))
                        .collect();
                    let missing: Vec<&String> = want.iter().filter(|a| !got.contains(*a)).collect();
                    if !missing.is_empty() {
                        f.lost += 1;
                        f.suspects.insert(id);
                        f.problems.push(format!(
                            "LOST: row {id} is sent but never reached {missing:?} at the server"
                        ));
                    }
                }
            }
            "failed" | "held" if has_reason => {}
            "failed" | "held" => {
                f.suspects.insert(id);
                f.problems
                    .push(format!("row {id} is {status} without a reason: {r}"));
            }
            other => {
                f.lost += 1;
                f.suspects.insert(id);
                f.problems
                    .push(format!("row {id} ended {other:?} (not sent/failed/held)"));
            }
        }
        let extra = copies.len().saturating_sub(1) as i64;
        let doubt = in_doubt_by_mail.get(&id).copied().unwrap_or(0);
        if extra > doubt {
            f.suspects.insert(id);
            f.problems.push(format!(
                "DUPLICATE: row {id} ({status}) reached the server {} times but has {doubt} in_doubt attempt(s)",
                copies.len()
            ));
        }
    }
    for (mid, v) in &at_server {
        if !known.contains(mid) {
            f.problems.push(format!(
                "{} message(s) at the server with Message-ID {mid} that no row has",
                v.len()
            ));
        }
    }
    if f.duplicates as i64 > f.in_doubt {
        f.problems.push(format!(
            "{} duplicates at the server but only {} in_doubt attempts",
            f.duplicates, f.in_doubt
        ));
    }
    let open: Vec<serde_json::Value> = db
        .rows("SELECT id, mail_id FROM mail_attempt WHERE finished_at IS NULL OR outcome IS NULL");
    for a in &open {
        f.suspects.insert(a["mail_id"].as_i64().unwrap_or(0));
        f.problems.push(format!("attempt left open: {a}"));
    }
    f.integrity = db
        .rows("PRAGMA integrity_check")
        .iter()
        .map(|r| r["integrity_check"].as_str().unwrap_or("?").to_owned())
        .collect::<Vec<_>>()
        .join("; ");
    if f.integrity != "ok" {
        f.problems
            .push(format!("PRAGMA integrity_check: {}", f.integrity));
    }
    let fk = db.rows("PRAGMA foreign_key_check");
    if !fk.is_empty() {
        f.problems.push(format!("PRAGMA foreign_key_check: {fk:?}"));
    }
    f
}

/// The rows, attempts, server copies and log lines of the suspect rows.
fn report(soak: &Soak, db: &Db, msgs: &[Received], f: &Figures) -> String {
    let mut out = String::new();
    let logs = soak.all_logs();
    for id in f.suspects.iter().take(20) {
        let row = db
            .rows_with(
                "SELECT id, status, attempts, message_id, to_addrs, cc_addrs, bcc_addrs, created_at,
                        updated_at, next_attempt_at, sent_at, error_code, last_error, smtp_reply
                 FROM mail_queue WHERE id = ?1",
                [id],
            )
            .pop()
            .unwrap_or_default();
        let mid = row["message_id"].as_str().map(bare_id).unwrap_or_default();
        let _ = writeln!(out, "=== row {id}\n{row}");
        for a in db.rows_with(
            "SELECT * FROM mail_attempt WHERE mail_id = ?1 ORDER BY id",
            [id],
        ) {
            let _ = writeln!(out, "attempt {a}");
        }
        for r in db.rows_with(
            "SELECT * FROM mail_recipient WHERE mail_id = ?1 ORDER BY id",
            [id],
        ) {
            let _ = writeln!(out, "recipient {r}");
        }
        for m in msgs
            .iter()
            .filter(|m| !mid.is_empty() && m.message_id().map(|x| bare_id(&x)) == Some(mid.clone()))
        {
            let _ = writeln!(
                out,
                "at the server: seq {} connection {} received_at {:.3} rcpt {:?}",
                m.seq, m.connection, m.received_at, m.rcpt_tos
            );
        }
        let tag = format!("mail_id={id}");
        for (path, text) in &logs {
            for line in text.lines() {
                let mentions_id = line
                    .match_indices(&tag)
                    .any(|(i, _)| !line[i + tag.len()..].starts_with(|c: char| c.is_ascii_digit()));
                let in_list = line.contains("mail_ids=")
                    && line
                        .split(|c: char| !c.is_ascii_digit())
                        .any(|w| w == id.to_string());
                if mentions_id || (!mid.is_empty() && line.contains(&mid)) || in_list {
                    let name = path.file_name().unwrap().to_string_lossy();
                    let _ = writeln!(out, "{name}: {line}");
                }
            }
        }
    }
    out
}

fn git(args: &[&str]) -> String {
    Command::new("git")
        .args(args)
        .current_dir(manifest_dir())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// The commit under test, taken when the soak starts (others may commit while it runs): `abc1234`,
/// or `abc1234` plus a note when src/ or Cargo.* have uncommitted changes.
fn commit_under_test() -> String {
    let commit = git(&["rev-parse", "--short", "HEAD"]);
    let dirty = git(&[
        "status",
        "--porcelain",
        "--untracked-files=no",
        "--",
        "src",
        "Cargo.toml",
        "Cargo.lock",
    ]);
    if dirty.is_empty() {
        format!("`{commit}`")
    } else {
        format!("`{commit}` plus uncommitted changes to src/ or Cargo.*")
    }
}

fn render(soak: &Soak, f: &Figures, duration: Duration, passed: bool) -> String {
    let p = &soak.plan;
    let commit = &soak.commit;
    let now = time::OffsetDateTime::now_utc();
    let date = format!(
        "{:04}-{:02}-{:02} {:02}:{:02} UTC",
        now.year(),
        now.month() as u8,
        now.day(),
        now.hour(),
        now.minute()
    );
    let command = std::env::var("MAILQUEUE_SOAK_COMMAND").unwrap_or_else(|_| FULL_COMMAND.into());
    let killed = soak.ended(Mode::Random, End::Killed);
    let mid_delivery = soak
        .runs
        .iter()
        .filter(|r| r.mode == Mode::Random && r.left_sending > 0)
        .count();
    let aborts = |fp| soak.ended(Mode::Failpoint(fp), End::Aborted);
    let not_fired = soak.runs.iter().filter(|r| r.end == End::NotFired).count();
    let restarts = soak.runs.len().saturating_sub(1);
    let mut s = String::new();
    let _ = writeln!(s, "## Kill -9 soak\n");
    let _ = writeln!(
        s,
        "Written by `tests/soak.rs` (`scripts/soak.sh`), {date}, commit {commit}.\n"
    );
    let _ = writeln!(s, "```sh\n{command}\n```\n");
    let _ = writeln!(
        s,
        "The daemon (`mailqueue run`, built with `--features failpoints`, `interval_ms = 0`) delivers \
         a queue to tests/servers/smtp_server.py (aiosmtpd), which keeps every message it accepts. \
         It is killed with SIGKILL after random delays and restarted each time; some restarts run \
         with `MAILQUEUE_FAILPOINT=crash-in-claim:{prob}` (abort inside the claim's transaction) or \
         `crash-after-reply:{prob}` (abort between the server's final reply and the outcome write). \
         A last, clean run drains the queue. Then every row must be `sent`, `failed` or `held` \
         with a reason, no attempt open, every `sent` row at the server for every recipient (by \
         Message-ID), each mail's extra copies covered by its own `in_doubt` attempts. The queue is \
         unpaced, so the daemon claims and commits in batches (`[queue] commit_batch`, default 64, \
         about 50 ms of sending at most): every crash leaves the rows of the batch in flight in \
         doubt — those already sent go out twice (the duplicates below), those only claimed once \
         (see docs/reliability.md, batched commits).\n",
        prob = p.probability
    );
    let _ = writeln!(s, "| | |\n|---|---|");
    let _ = writeln!(
        s,
        "| result | **{}** |",
        if passed { "pass" } else { "FAIL" }
    );
    let _ = writeln!(
        s,
        "| mails | {} (every 7th with a Cc, every 11th with a Bcc, every 10th ~40 kB) |",
        p.mails
    );
    let _ = writeln!(
        s,
        "| kills | {} random SIGKILLs ({mid_delivery} of them in the middle of a delivery), {} `crash-in-claim` aborts, {} `crash-after-reply` aborts |",
        killed,
        aborts(CRASH_IN_CLAIM),
        aborts(CRASH_AFTER_REPLY)
    );
    let _ = writeln!(
        s,
        "| restarts | {restarts} ({} runs in all{}) |",
        soak.runs.len(),
        if not_fired > 0 {
            format!("; {not_fired} failpoint run(s) drained the queue without firing")
        } else {
            String::new()
        }
    );
    let mut outcome = format!("{} sent, {} failed, {} held", f.sent, f.failed, f.held);
    for (st, n) in &f.other {
        let _ = write!(outcome, ", {n} {st}");
    }
    let _ = writeln!(s, "| rows | {outcome} (of {}) |", f.rows);
    let _ = writeln!(
        s,
        "| at the server | {} messages, {} duplicates by Message-ID; {} `in_doubt` attempts |",
        f.received, f.duplicates, f.in_doubt
    );
    let _ = writeln!(s, "| lost | {} |", f.lost);
    let _ = writeln!(s, "| `PRAGMA integrity_check` | {} |", f.integrity);
    let run_time: Duration = soak.runs.iter().map(|r| r.elapsed).sum();
    let cpus = thread::available_parallelism().map_or(0, |n| n.get());
    let _ = writeln!(
        s,
        "| duration | {:.0} s on {cpus} CPUs, {:.0} mails/s while the daemon ran (seed {}) |",
        duration.as_secs_f64(),
        p.mails as f64 / run_time.as_secs_f64().max(0.001),
        soak.seed
    );
    if !passed {
        let _ = writeln!(s, "\nProblems:\n");
        for pr in f.problems.iter().take(20) {
            let _ = writeln!(s, "- {pr}");
        }
    }
    s
}

/// Replaces what is between the soak markers of docs/reliability.md.
fn write_docs(section: &str) {
    let path = manifest_dir().join("docs/reliability.md");
    let text = fs::read_to_string(&path).unwrap();
    let (begin, end) = ("<!-- BEGIN soak -->", "<!-- END soak -->");
    let b = text.find(begin).expect("BEGIN soak marker") + begin.len();
    let e = text.find(end).expect("END soak marker");
    assert!(b <= e, "soak markers out of order");
    let new = format!("{}\n{}{}", &text[..b], section, &text[e..]);
    fs::write(&path, new).unwrap();
    println!("soak: wrote the figures into {}", path.display());
}

/// Copies the server's spool into the work dir (it is deleted with the server).
fn keep_spool(server: &SmtpServer, to: &Path) {
    let _ = fs::create_dir_all(to);
    if let Ok(rd) = fs::read_dir(&server.spool) {
        for e in rd.flatten() {
            let _ = fs::copy(e.path(), to.join(e.file_name()));
        }
    }
}

#[test]
fn kill_9_soak_loses_nothing() {
    let plan = Plan::from_env();
    let started = Instant::now();
    let server = SmtpServer::start(NO_ARGS);
    let mut soak = Soak::new(plan.clone(), server.port);
    println!(
        "soak: {} mode, {} mails, {} random kills, {} aborts per failpoint (p = {}), seed {} (MAILQUEUE_SOAK_SEED replays it), work dir {}",
        plan.name,
        plan.mails,
        plan.random_kills,
        plan.per_failpoint,
        plan.probability,
        soak.seed,
        soak.dir.path().display()
    );
    let ids = soak.enqueue();
    let db = soak.db();
    loop {
        let mode = if waiting(&db) == 0 {
            break;
        } else {
            soak.next_mode()
        };
        assert!(
            started.elapsed() < plan.deadline,
            "the soak did not drain the queue within {:?}: {} runs, counts {:?}",
            plan.deadline,
            soak.runs.len(),
            status_counts(&db)
        );
        soak.run_once(mode, &db);
        let r = soak.runs.last().unwrap();
        {
            println!(
                "soak: run {:3} {:18} {:?} after {:6.3} s, +{} sent{}",
                r.n,
                r.mode.label(),
                r.end,
                r.elapsed.as_secs_f64(),
                r.progress,
                if r.left_sending > 0 {
                    ", one left sending"
                } else {
                    ""
                }
            );
        }
    }
    if soak.runs.last().map(|r| r.mode) != Some(Mode::Final) {
        // The kills drained it: one clean run still proves the daemon starts and recovers.
        soak.run_once(Mode::Final, &db);
    }
    let duration = started.elapsed();

    // Every row is settled, so the server has everything it will get.
    let expected = sent(&db) as usize;
    let msgs = server.wait_for_messages(expected, Duration::from_secs(30));
    drop(db);
    let db = soak.db();
    let mut f = check(&db, &ids, &msgs);
    let killed = soak.ended(Mode::Random, End::Killed);
    if killed < plan.random_kills {
        f.problems.push(format!(
            "only {killed} random kills before the queue was drained (wanted {})",
            plan.random_kills
        ));
    }
    for fp in [CRASH_IN_CLAIM, CRASH_AFTER_REPLY] {
        let n = soak.ended(Mode::Failpoint(fp), End::Aborted);
        // The fast run may drain before a failpoint fires; the full run must not.
        if n < plan.per_failpoint && plan.name == "full" {
            f.problems.push(format!(
                "only {n} {fp} aborts (wanted {})",
                plan.per_failpoint
            ));
        }
    }
    let passed = f.problems.is_empty();
    let section = render(&soak, &f, duration, passed);
    println!("{section}");
    if plan.write_docs {
        write_docs(&section);
    }
    if !passed {
        let text = report(&soak, &db, &msgs, &f);
        keep_spool(&server, &soak.dir.path().join("spool"));
        fs::write(soak.dir.path().join("report.txt"), &text).unwrap();
        let dir = soak.dir.keep();
        panic!(
            "the soak found {} problem(s):\n{}\n\n{text}\nwork dir kept: {} (queue.db, logs/, spool/, report.txt)",
            f.problems.len(),
            f.problems.join("\n"),
            dir.display()
        );
    }
}

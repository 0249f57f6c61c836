//! Running as a service: signals, reload, systemd notifications and watchdog, metrics,
//! housekeeping, the daemon lock, and secrets kept out of every output.

mod support;

use std::io::{Read, Write};
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use support::*;
use tempfile::TempDir;

const LONG: Duration = Duration::from_secs(30);

struct Setup {
    _dir: TempDir,
    db_path: PathBuf,
    config: PathBuf,
}

fn setup(port: u16, edit: impl Fn(String) -> String) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let db_path = dir.path().join("queue.db");
    let config = write_config(dir.path(), &edit(base_config(&db_path, port)));
    migrate(&config);
    Setup {
        _dir: dir,
        db_path,
        config,
    }
}

impl Setup {
    fn db(&self) -> Db {
        Db::open(&self.db_path)
    }
    fn edit(&self, f: impl Fn(String) -> String) {
        let t = std::fs::read_to_string(&self.config).unwrap();
        std::fs::write(&self.config, f(t)).unwrap();
    }
}

fn in_queue(extra: &str) -> impl Fn(String) -> String {
    let extra = extra.to_string();
    move |t: String| t.replace("[queue]\n", &format!("[queue]\n{extra}\n"))
}

fn wait_for_log(d: &Daemon, needle: &str) {
    wait_until(LONG, needle, || d.stderr().contains(needle).then_some(()));
}

#[test]
fn sigterm_during_a_slow_transaction_finishes_the_mail_then_exits_0() {
    // smtp-sink waits 2 s before answering DATA: the mail is in flight when SIGTERM comes.
    let sink = SmtpSink::start(&["-w", "2"]);
    let s = setup(sink.port, |t| t);
    let db = s.db();
    let id = db.insert("a@example.com", "slow", "x");
    let mut d = Daemon::spawn(&s.config, &["run"]);
    db.wait_for_status(id, "sending", LONG);
    d.signal("TERM");
    let status = d.wait_timeout(LONG).expect("exits");
    assert!(status.success(), "{status:?}\n{}", d.stderr());
    assert_eq!(db.status(id), "sent", "the mail in flight finished");
    assert_eq!(
        db.query_one::<i64>("SELECT count(*) FROM mail_queue WHERE status = 'sending'"),
        0
    );
    assert!(d.stderr().contains("mailqueue stopped."));
}

#[test]
fn stopping_while_draining_a_backlog_gives_the_next_row_back() {
    // While a backlog drains, the next row is claimed together with each outcome; a stop
    // between mails must give that row back untouched, not leave it `sending` (in doubt).
    let sink = SmtpSink::start(NO_ARGS);
    let s = setup(sink.port, |t| t);
    let db = s.db();
    db.execute("BEGIN");
    for i in 0..2000 {
        db.insert(&format!("r{i}@example.com"), "backlog", "x");
    }
    db.execute("COMMIT");
    let mut d = Daemon::spawn(&s.config, &["run"]);
    wait_until(LONG, "20 mails sent", || {
        (db.query_one::<i64>("SELECT count(*) FROM mail_queue WHERE status = 'sent'") >= 20)
            .then_some(())
    });
    d.signal("TERM");
    let status = d.wait_timeout(LONG).expect("exits");
    assert!(status.success(), "{status:?}\n{}", d.stderr());
    let count = |st: &str| {
        db.query_one::<i64>(&format!(
            "SELECT count(*) FROM mail_queue WHERE status = '{st}'"
        ))
    };
    assert!(
        count("queued") > 0,
        "stopped before the backlog was drained"
    );
    assert_eq!(count("sending"), 0);
    assert_eq!(count("sent") + count("queued"), 2000);
    // The row given back has no attempt left behind, and every sent row exactly one.
    assert_eq!(
        db.query_one::<i64>("SELECT count(*) FROM mail_attempt"),
        count("sent")
    );
}

#[test]
fn past_the_grace_the_mail_stays_sending_and_is_recovered_in_doubt() {
    let sink = SmtpSink::start(&["-w", "5"]);
    let s = setup(sink.port, in_queue("shutdown_grace = \"500ms\""));
    let db = s.db();
    let id = db.insert("a@example.com", "slower", "x");
    let mut d = Daemon::spawn(&s.config, &["run"]);
    db.wait_for_status(id, "sending", LONG);
    let t = Instant::now();
    d.signal("TERM");
    assert!(d.wait_timeout(LONG).expect("exits").success());
    assert!(
        t.elapsed() < Duration::from_secs(4),
        "it did not wait for the 5 s server"
    );
    assert_eq!(db.status(id), "sending");
    // The next start recovers it as in doubt and sends it again.
    let out = run_mailqueue(&s.config, &["run", "--once"]);
    assert!(out.status.success());
    let outcomes: Vec<String> = db
        .rows_with(
            "SELECT outcome FROM mail_attempt WHERE mail_id = ?1 ORDER BY id",
            [id],
        )
        .iter()
        .map(|r| r["outcome"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(outcomes, vec!["in_doubt", "sent"]);
}

#[test]
fn sighup_with_an_invalid_file_keeps_the_old_settings() {
    let server = SmtpServer::start(NO_ARGS);
    let s = setup(server.port, |t| t);
    let mut d = Daemon::spawn(&s.config, &["run"]);
    wait_for_log(&d, "Ready");
    s.edit(|t| t.replace("interval_ms = 0", "interval_ms = \"soon\""));
    d.signal("HUP");
    wait_for_log(&d, "Reload refused");
    assert!(d.stderr().contains("rate.interval_ms"), "{}", d.stderr());
    let id = s.db().insert("a@example.com", "still sending", "x");
    s.db().wait_for_status(id, "sent", LONG);
    assert!(d.terminate(LONG).success());
}

#[test]
fn sighup_with_a_new_interval_changes_the_pace_and_clears_a_pause() {
    let server = SmtpServer::start(NO_ARGS);
    let s = setup(server.port, |t| {
        t.replace("interval_ms = 0", "interval_ms = 1500")
    });
    let db = s.db();
    let mut d = Daemon::spawn(&s.config, &["run"]);
    wait_for_log(&d, "Ready");
    for i in 0..2 {
        db.insert("a@example.com", &format!("slow {i}"), "x");
    }
    let m = server.wait_for_messages(2, LONG);
    assert!(
        m[1].mail_at - m[0].mail_at >= 1.49,
        "1500 ms apart before the reload"
    );
    // Pause the account (as a failed login would) and make the pace fast.
    db.execute("UPDATE queue_state SET paused = 1, paused_until = '2999-01-01T00:00:00.000Z', error_code = 'auth_failed'");
    s.edit(|t| t.replace("interval_ms = 1500", "interval_ms = 100"));
    d.signal("HUP");
    wait_for_log(&d, "Configuration reloaded");
    assert_eq!(
        db.query_one::<i64>("SELECT paused FROM queue_state"),
        0,
        "the reload clears the pause"
    );
    let ids: Vec<i64> = (0..4)
        .map(|i| db.insert("a@example.com", &format!("fast {i}"), "x"))
        .collect();
    for id in &ids {
        db.wait_for_status(*id, "sent", LONG);
    }
    let m = server.wait_for_messages(6, LONG);
    let span = m[5].mail_at - m[2].mail_at;
    assert!(
        (0.29..1.2).contains(&span),
        "three 100 ms intervals, not 1500 ms ones: {span}"
    );
    assert!(d.terminate(LONG).success());
}

/// A NOTIFY_SOCKET the test listens on, as systemd would.
fn notify_socket(dir: &std::path::Path) -> (UnixDatagram, PathBuf) {
    let path = dir.join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    (sock, path)
}

/// Messages received until `until`, with their arrival times.
fn collect(sock: &UnixDatagram, until: Instant) -> Vec<(Instant, String)> {
    let mut out = vec![];
    let mut buf = [0u8; 4096];
    while Instant::now() < until {
        if let Ok(n) = sock.recv(&mut buf) {
            out.push((
                Instant::now(),
                String::from_utf8_lossy(&buf[..n]).into_owned(),
            ));
        }
    }
    out
}

fn spawn_notified(s: &Setup, sock: &std::path::Path, extra_env: &[(&str, &str)]) -> Daemon {
    let mut cmd = std::process::Command::new(mailqueue_bin());
    cmd.arg("--config").arg(&s.config).arg("run");
    cmd.env("NOTIFY_SOCKET", sock)
        .env("WATCHDOG_USEC", "300000");
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    Daemon::from_command(cmd)
}

#[test]
fn ready_and_watchdog_notifications_arrive() {
    let server = SmtpServer::start(NO_ARGS);
    let s = setup(server.port, |t| t);
    let dir = tempfile::tempdir().unwrap();
    let (sock, path) = notify_socket(dir.path());
    let mut d = spawn_notified(&s, &path, &[]);
    let msgs = collect(&sock, Instant::now() + Duration::from_secs(2));
    let texts: Vec<&str> = msgs.iter().map(|(_, m)| m.as_str()).collect();
    assert!(texts.iter().any(|m| m.contains("READY=1")), "{texts:?}");
    assert!(
        texts.iter().filter(|m| m.contains("WATCHDOG=1")).count() >= 4,
        "{texts:?}"
    );
    d.signal("HUP");
    let msgs = collect(&sock, Instant::now() + Duration::from_secs(1));
    assert!(
        msgs.iter().any(|(_, m)| m.contains("RELOADING=1")),
        "{msgs:?}"
    );
    d.signal("TERM");
    let msgs = collect(&sock, Instant::now() + Duration::from_secs(1));
    assert!(
        msgs.iter().any(|(_, m)| m.contains("STOPPING=1")),
        "{msgs:?}"
    );
    assert!(d.wait_timeout(LONG).expect("exits").success());
}

#[cfg(feature = "failpoints")]
#[test]
fn a_frozen_scheduler_stops_the_watchdog_pings() {
    let server = SmtpServer::start(NO_ARGS);
    let s = setup(server.port, |t| t);
    let dir = tempfile::tempdir().unwrap();
    let (sock, path) = notify_socket(dir.path());
    let start = Instant::now();
    let _d = spawn_notified(&s, &path, &[("MAILQUEUE_FAILPOINT", "freeze-scheduler")]);
    let msgs = collect(&sock, start + Duration::from_secs(6));
    assert!(msgs.iter().any(|(_, m)| m.contains("READY=1")), "{msgs:?}");
    let pings: Vec<Duration> = msgs
        .iter()
        .filter(|(_, m)| m.contains("WATCHDOG=1"))
        .map(|(t, _)| t.duration_since(start))
        .collect();
    // The promise made at start (2 poll intervals + 2 s) runs out; then no more pings.
    assert!(!pings.is_empty(), "pings while the promise held");
    assert!(
        pings.iter().all(|t| *t < Duration::from_secs(4)),
        "pings after the freeze: {pings:?}"
    );
}

#[test]
fn metrics_report_sent_and_failed_counts() {
    let server = SmtpServer::start(&["--refuse-rcpt", "nobody"]);
    let port = free_port();
    let s = setup(server.port, move |t| {
        t + &format!("\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n")
    });
    let db = s.db();
    let ok1 = db.insert("a@example.com", "1", "x");
    let ok2 = db.insert("b@example.com", "2", "x");
    let bad = db.insert("nobody@example.com", "3", "x");
    let mut d = Daemon::spawn(&s.config, &["run"]);
    for id in [ok1, ok2] {
        db.wait_for_status(id, "sent", LONG);
    }
    db.wait_for_status(bad, "failed", LONG);
    let body = wait_until(LONG, "metrics with the counts", || {
        let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
        c.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .ok()?;
        let mut text = String::new();
        c.read_to_string(&mut text).ok()?;
        (text.contains("mailqueue_sent_total 2")
            && text.contains("mailqueue_mails{status=\"sent\"} 2"))
        .then_some(text)
    });
    assert!(
        body.contains("mailqueue_failed_total{error_code=\"recipient_refused\"} 1"),
        "{body}"
    );
    assert!(
        body.contains("mailqueue_paused{error_code=\"\"} 0"),
        "{body}"
    );
    assert!(body.contains("mailqueue_seconds_since_last_sent"), "{body}");
    assert!(d.terminate(LONG).success());
}

#[test]
fn old_rows_are_purged_and_recent_ones_kept() {
    let server = SmtpServer::start(NO_ARGS);
    let s = setup(
        server.port,
        in_queue("keep_sent = \"1s\"\nkeep_failed = \"1h\"\nhousekeeping_interval = \"200ms\""),
    );
    let db = s.db();
    let old_sent = db.insert("a@example.com", "old", "x");
    let failed = db.insert("", "no recipients", "x");
    let mut d = Daemon::spawn(&s.config, &["run"]);
    db.wait_for_status(failed, "failed", LONG);
    wait_until(LONG, "the sent row purged", || {
        (db.query_one::<i64>(&format!(
            "SELECT count(*) FROM mail_queue WHERE id = {old_sent}"
        )) == 0)
            .then_some(())
    });
    assert_eq!(
        db.query_one::<i64>(&format!(
            "SELECT count(*) FROM mail_attempt WHERE mail_id = {old_sent}"
        )),
        0
    );
    assert_eq!(db.status(failed), "failed", "kept: keep_failed is an hour");
    wait_for_log(&d, "Purged old mails.");
    assert!(d.terminate(LONG).success());
}

#[test]
fn a_second_daemon_on_the_same_queue_is_refused() {
    let server = SmtpServer::start(NO_ARGS);
    let s = setup(server.port, |t| t);
    let mut d = Daemon::spawn(&s.config, &["run"]);
    wait_for_log(&d, "Ready");
    let out = run_mailqueue(&s.config, &["run"]);
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("another mailqueue daemon (pid {})", d.pid())),
        "{err}"
    );
    // Commands that never send keep working while the daemon runs.
    assert!(run_mailqueue(&s.config, &["status"]).status.success());
    assert!(d.terminate(LONG).success());
}

/// Every place a secret could show up: base64 of it and of the AUTH PLAIN string included.
fn leaks(haystack: &[u8], user: &str, password: &str) -> Vec<String> {
    use base64::Engine;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let needles = [
        password.to_string(),
        b64(password),
        b64(&format!("\0{user}\0{password}")),
    ];
    needles
        .iter()
        .filter(|n| haystack.windows(n.len()).any(|w| w == n.as_bytes()))
        .cloned()
        .collect()
}

fn secrets_run(failpoint: Option<&str>) -> (Vec<u8>, &'static str, &'static str) {
    let (user, password) = ("crm", "Tr4ce-Secret-9f2");
    let ca = TestCa::new();
    let mut args = ca.server_args("starttls");
    args.extend(["--auth-user", user, "--auth-password", password].map(String::from));
    let server = SmtpServer::start(&args);
    let s = setup(server.port, |t| {
        t.replace("tls = \"none\"", "tls = \"starttls\"")
            .replace("auth = false", "auth = true")
            .replace(
                "[smtp]\n",
                &format!(
                    "[smtp]\nuser = \"{user}\"\npassword = \"{password}\"\nca_file = {}\n",
                    toml_str(ca.ca_pem_path.to_str().unwrap())
                ),
            )
            .replace("level = \"info\"", "level = \"trace\"")
    });
    s.db().insert("a@example.com", "secret test", "x");
    let mut cmd = std::process::Command::new(mailqueue_bin());
    cmd.arg("--config").arg(&s.config).args(["run", "--once"]);
    if let Some(f) = failpoint {
        cmd.env("MAILQUEUE_FAILPOINT", f);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(server.wait_for_messages(1, LONG).len(), 1);
    let mut all = out.stdout.clone();
    all.extend(&out.stderr);
    for f in [
        s.db_path.clone(),
        PathBuf::from(format!("{}-wal", s.db_path.display())),
    ] {
        if f.exists() {
            all.extend(std::fs::read(&f).unwrap());
        }
    }
    // Every other path a password takes: the connection check, a test mail, and a login the
    // server refuses (the wrong password must not show either).
    for args in [
        &["check-config", "--connect"][..],
        &["test-send", "--to", "b@example.com"],
    ] {
        let out = run_mailqueue(&s.config, args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        all.extend(out.stdout);
        all.extend(out.stderr);
    }
    let wrong = "Wr0ng-Tr4ce-Secret";
    let text = std::fs::read_to_string(&s.config)
        .unwrap()
        .replace(password, wrong);
    std::fs::write(&s.config, text).unwrap();
    s.db().insert("a@example.com", "refused login", "x");
    for args in [
        &["run", "--once"][..],
        &["test-send", "--to", "b@example.com"],
        &["check-config", "--connect"],
    ] {
        let out = run_mailqueue(&s.config, args);
        all.extend(out.stdout);
        all.extend(out.stderr);
    }
    assert!(
        String::from_utf8_lossy(&all).contains("535 5.7.8"),
        "the refused login was exercised"
    );
    for f in [
        s.db_path.clone(),
        PathBuf::from(format!("{}-wal", s.db_path.display())),
    ] {
        if f.exists() {
            all.extend(std::fs::read(&f).unwrap());
        }
    }
    assert_eq!(
        leaks(&all, user, wrong),
        Vec::<String>::new(),
        "the refused password leaked"
    );
    (all, user, password)
}

#[test]
fn a_trace_level_run_shows_no_secret_anywhere() {
    let (all, user, password) = secrets_run(None);
    let text = String::from_utf8_lossy(&all);
    assert!(
        text.contains("TRACE") && text.contains("stage=\"auth\""),
        "the run logged every SMTP step at trace level"
    );
    assert_eq!(leaks(&all, user, password), Vec::<String>::new());
}

/// The check above is only worth something if it catches a leak: plant one.
#[cfg(feature = "failpoints")]
#[test]
fn the_secret_check_catches_a_planted_leak() {
    let (all, user, password) = secrets_run(Some("leak-secret"));
    let found = leaks(&all, user, password);
    assert_eq!(
        found.len(),
        1,
        "the planted AUTH PLAIN base64 is found: {found:?}"
    );
}

/// An idle daemon finds a new row without polling the database, and wakes for a row whose
/// `send_after` comes due with no commit in between. Both well within the scheduler's 30 s
/// safety re-check, which would otherwise be what finds them.
fn idle_daemon_finds_new_and_delayed_rows(env: &[(&str, &str)]) {
    let server = SmtpServer::start(NO_ARGS);
    let s = setup(server.port, |t| {
        t.replace("poll_interval = \"50ms\"", "poll_interval = \"100ms\"")
    });
    let db = s.db();
    let mut cmd = std::process::Command::new(mailqueue_bin());
    cmd.arg("--config").arg(&s.config).arg("run");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut d = Daemon::from_command(cmd);
    wait_for_log(&d, "Ready");
    let id = db.insert("new@example.com", "new", "x");
    db.wait_for_status(id, "sent", Duration::from_secs(5));
    // Due in 2 s; nothing else is written meanwhile, so only the computed due time wakes it.
    let at_text = mailqueue::store::ts(std::time::SystemTime::now() + Duration::from_secs(2));
    let later = db.insert_cols(&[
        ("to_addrs", &"later@example.com"),
        ("subject", &"later"),
        ("send_after", &at_text),
    ]);
    let row = db.wait_for_status(later, "sent", Duration::from_secs(10));
    let sent_at = row["sent_at"].as_str().unwrap().to_string();
    assert!(
        sent_at >= at_text,
        "sent at {sent_at}, before send_after {at_text}"
    );
    d.signal("TERM");
    assert!(d.wait_timeout(LONG).expect("exits").success());
}

#[test]
fn an_idle_daemon_finds_new_and_delayed_rows_by_inotify() {
    idle_daemon_finds_new_and_delayed_rows(&[]);
}

#[cfg(feature = "failpoints")]
#[test]
fn an_idle_daemon_finds_new_and_delayed_rows_by_polling() {
    idle_daemon_finds_new_and_delayed_rows(&[("MAILQUEUE_FAILPOINT", "no-inotify")]);
}

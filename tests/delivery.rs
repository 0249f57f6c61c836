//! End-to-end delivery: the real binary against real SMTP servers nobody on this team wrote
//! (aiosmtpd via tests/servers/smtp_server.py, Postfix's smtp-sink).

mod support;

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Duration;

use support::*;
use tempfile::TempDir;

const LONG: Duration = Duration::from_secs(30);

/// A temp dir with a migrated queue and a config built from `base_config` plus edits.
struct Setup {
    _dir: TempDir,
    db_path: PathBuf,
    config: PathBuf,
}

impl Setup {
    fn new(port: u16, edit: impl Fn(String) -> String) -> Setup {
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
    fn db(&self) -> Db {
        Db::open(&self.db_path)
    }
    fn run(&self, args: &[&str]) -> std::process::Output {
        run_mailqueue(&self.config, args)
    }
    fn once(&self) -> std::process::Output {
        let out = self.run(&["run", "--once"]);
        assert!(
            out.status.success(),
            "run --once failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }
    fn rewrite(&self, edit: impl Fn(String) -> String) {
        let text = std::fs::read_to_string(&self.config).unwrap();
        std::fs::write(&self.config, edit(text)).unwrap();
    }
}

fn set(key: &str, value: &str) -> impl Fn(String) -> String {
    let key = key.to_string();
    let value = value.to_string();
    move |t: String| {
        let prefix = format!("{key} = ");
        assert!(
            t.lines().any(|l| l.starts_with(&prefix)),
            "no {key} in config"
        );
        t.lines()
            .map(|l| {
                if l.starts_with(&prefix) {
                    format!("{key} = {value}")
                } else {
                    l.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
            + "\n"
    }
}

fn add_smtp(lines: &str) -> impl Fn(String) -> String {
    let lines = lines.to_string();
    move |t: String| t.replace("[smtp]\n", &format!("[smtp]\n{lines}\n"))
}

fn chain(edits: Vec<Box<dyn Fn(String) -> String>>) -> impl Fn(String) -> String {
    move |mut t: String| {
        for e in &edits {
            t = e(t);
        }
        t
    }
}

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A TLS + AUTH config against the python server: STARTTLS with the test CA, login crm/secret.
fn tls_auth_config(ca: &TestCa, password: &str) -> impl Fn(String) -> String {
    chain(vec![
        Box::new(set("tls", "\"starttls\"")),
        Box::new(set("auth", "true")),
        Box::new(add_smtp(&format!(
            "user = \"crm\"\npassword = {}\nca_file = {}",
            toml_str(password),
            toml_str(ca.ca_pem_path.to_str().unwrap())
        ))),
        Box::new(|t: String| {
            t.replace(
                "[sender]\n",
                "[sender]\nenvelope_from = \"bounces@example.com\"\n",
            )
        }),
    ])
}

fn auth_server(ca: &TestCa, extra: &[&str]) -> SmtpServer {
    let mut args = ca.server_args("starttls");
    args.extend(["--auth-user", "crm", "--auth-password", "secret"].map(String::from));
    args.extend(extra.iter().map(|s| s.to_string()));
    SmtpServer::start(&args)
}

#[test]
fn a_sent_mail_arrives_with_from_to_subject_envelope_and_message_id() {
    let ca = TestCa::new();
    let server = auth_server(&ca, &[]);
    let s = Setup::new(server.port, tls_auth_config(&ca, "secret"));
    let db = s.db();
    let id = db.insert_cols(&[
        ("to_addrs", &"山田 太郎 <yamada@example.jp>"),
        ("cc_addrs", &"sato@example.com"),
        ("bcc_addrs", &"archive@example.net"),
        ("subject", &"活動報告: 株式会社サンプル訪問"),
        ("body_text", &"本日の訪問結果を報告します。\n. 以上"),
    ]);
    s.once();
    let row = db.row(id);
    assert_eq!(row["status"], "sent", "{row}");
    assert!(row["sent_at"].as_str().unwrap().ends_with('Z'));
    assert!(
        row["smtp_reply"].as_str().unwrap().starts_with("250"),
        "{row}"
    );
    let msgs = server.wait_for_messages(1, LONG);
    let m = &msgs[0];
    assert_eq!(
        m.mail_from, "bounces@example.com",
        "envelope sender is envelope_from"
    );
    let mut rcpts = m.rcpt_tos.clone();
    rcpts.sort();
    assert_eq!(
        rcpts,
        vec![
            "archive@example.net",
            "sato@example.com",
            "yamada@example.jp"
        ]
    );
    assert_eq!(m.helo, "crm.example.test");
    assert_eq!(
        m.subject().as_deref(),
        Some("活動報告: 株式会社サンプル訪問")
    );
    assert_eq!(m.from_addr().as_deref(), Some("crm@example.com"));
    assert_eq!(m.from_name().as_deref(), Some("CRM 通知"));
    assert_eq!(m.to_addrs(), vec!["yamada@example.jp".to_string()]);
    assert_eq!(m.cc_addrs(), vec!["sato@example.com".to_string()]);
    assert!(
        !String::from_utf8_lossy(&m.raw)
            .to_ascii_lowercase()
            .contains("archive@"),
        "Bcc must not be in the headers"
    );
    let stored = row["message_id"]
        .as_str()
        .unwrap()
        .trim_matches(['<', '>'])
        .to_string();
    assert_eq!(m.message_id().as_deref(), Some(stored.as_str()));
    let body = m.body_text().unwrap().replace("\r\n", "\n");
    assert!(
        body.contains("本日の訪問結果を報告します。\n. 以上"),
        "a line starting with a dot survives: {body:?}"
    );
    // The recipients and the attempt are recorded.
    let rcpt_rows = db.rows_with(
        "SELECT address, kind, status FROM mail_recipient WHERE mail_id = ?1 ORDER BY id",
        [id],
    );
    assert_eq!(rcpt_rows.len(), 3);
    assert!(
        rcpt_rows.iter().all(|r| r["status"] == "sent"),
        "{rcpt_rows:?}"
    );
    let attempts = db.rows_with("SELECT outcome FROM mail_attempt WHERE mail_id = ?1", [id]);
    assert_eq!(attempts.len(), 1);
    assert_eq!(attempts[0]["outcome"], "sent");
}

#[test]
fn pacing_holds_between_mails_and_across_a_restart() {
    let server = SmtpServer::start(NO_ARGS);
    let interval = 300u64;
    let s = Setup::new(server.port, set("interval_ms", &interval.to_string()));
    let db = s.db();
    for i in 0..5 {
        db.insert("a@example.com", &format!("paced {i}"), "x");
    }
    s.once();
    let msgs = server.wait_for_messages(5, LONG);
    // Taken at the server when each transaction starts (MAIL FROM): what a provider counts.
    // The slack covers loopback latency, not a missing pace.
    let t: Vec<f64> = msgs.iter().map(|m| m.mail_at).collect();
    let slack = 0.010;
    for w in t.windows(2) {
        assert!(
            w[1] - w[0] >= interval as f64 / 1000.0 - slack,
            "two mails within one interval: {t:?}"
        );
    }
    assert!(
        t[4] - t[0] >= 4.0 * interval as f64 / 1000.0 - slack,
        "{t:?}"
    );

    // A restart right after a send still waits out the interval the database records.
    s.rewrite(set("interval_ms", "1500"));
    db.insert("a@example.com", "before restart", "x");
    s.once();
    db.insert("a@example.com", "after restart", "x");
    s.once();
    let msgs = server.wait_for_messages(7, LONG);
    let gap = msgs[6].mail_at - msgs[5].mail_at;
    assert!(
        gap >= 1.5 - slack,
        "the restarted daemon sent {gap:.3}s after the last send"
    );
}

#[test]
fn one_connection_serves_many_mails_and_each_attempt_is_one_json_log_line() {
    let server = SmtpServer::start(NO_ARGS);
    let s = Setup::new(server.port, |t| {
        t.replace("[log]\n", "[log]\nformat = \"json\"\n")
    });
    let db = s.db();
    for i in 0..10 {
        db.insert("a@example.com", &format!("m{i}"), "x");
    }
    let out = s.once();
    server.wait_for_messages(10, LONG);
    assert_eq!(
        server.connections(),
        1,
        "ten mails should share one connection"
    );
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stderr)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
        .filter(|v: &serde_json::Value| v["message"] == "Delivery attempt finished.")
        .collect();
    assert_eq!(lines.len(), 10);
    for l in &lines {
        for field in [
            "mail_id",
            "message_id",
            "recipients",
            "outcome",
            "smtp_reply",
            "duration_ms",
        ] {
            assert!(!l[field].is_null(), "{field} missing in {l}");
        }
        assert_eq!(l["outcome"], "sent");
    }
}

#[test]
fn an_idle_connection_is_closed_with_quit() {
    let sink = SmtpSink::start(NO_ARGS);
    let s = Setup::new(sink.port, add_smtp("idle_timeout = \"300ms\""));
    s.db().insert("a@example.com", "idle", "x");
    let mut daemon = Daemon::spawn(&s.config, &["run"]);
    // The session ends while the daemon keeps running: only the idle timer can have closed it.
    let c = sink.wait_for_sessions(1, LONG);
    assert_eq!((c.messages, c.quits), (1, 1), "{c:?}");
    assert!(
        daemon.wait_timeout(Duration::from_millis(1)).is_none(),
        "the daemon is still running"
    );
    daemon.terminate(LONG);
}

#[test]
fn a_wrong_password_pauses_the_queue_and_a_test_mail_is_tried_at_once() {
    let ca = TestCa::new();
    let server = auth_server(&ca, &[]);
    let s = Setup::new(
        server.port,
        chain(vec![
            Box::new(tls_auth_config(&ca, "wrong-password")),
            Box::new(|t: String| t.replace("[log]\n", "[log]\nerror_language = \"ja\"\n")),
        ]),
    );
    let db = s.db();
    let normal: Vec<i64> = (0..3)
        .map(|i| db.insert("a@example.com", &format!("r{i}"), "x"))
        .collect();
    let test_mail = db.insert_cols(&[
        ("to_addrs", &"admin@example.org"),
        ("subject", &"test"),
        ("max_attempts", &1),
    ]);
    s.once();
    let want = "SMTPログインに失敗しました (535 5.7.8 Authentication credentials invalid)";
    for id in &normal {
        let row = db.row(*id);
        assert_eq!(row["status"], "queued", "{row}");
        assert_eq!(
            row["attempts"], 0,
            "an account failure must not burn attempts: {row}"
        );
        assert_eq!(row["error_code"], "auth_failed");
        assert_eq!(row["last_error"], want);
    }
    let t = db.row(test_mail);
    assert_eq!(t["status"], "failed", "{t}");
    assert_eq!(t["last_error"], want);
    let state = db.rows("SELECT paused, error_code, error_text FROM queue_state");
    assert_eq!(state[0]["paused"], 1);
    assert_eq!(state[0]["error_code"], "auth_failed");
    let status = stdout(&s.run(&["status"]));
    assert!(
        status.contains("PAUSED") && status.contains(want),
        "{status}"
    );
    assert_eq!(server.messages().len(), 0);
    // The password appears in no output and nowhere in the queue file.
    let wal = PathBuf::from(format!("{}-wal", s.db_path.display()));
    for f in [s.db_path.clone(), wal].iter().filter(|f| f.exists()) {
        let bytes = std::fs::read(f).unwrap();
        assert!(
            !bytes.windows(14).any(|w| w == b"wrong-password"),
            "password in {}",
            f.display()
        );
    }
    assert!(!status.contains("wrong-password"));

    // The admin fixes the password and sends a test mail: it goes through while the queue is
    // paused, resumes it, and the waiting rows follow in the same run.
    s.rewrite(|t| t.replace("\"wrong-password\"", "\"secret\""));
    let fixed = db.insert_cols(&[
        ("to_addrs", &"admin@example.org"),
        ("subject", &"test 2"),
        ("max_attempts", &1),
    ]);
    s.once();
    assert_eq!(db.status(fixed), "sent");
    for id in &normal {
        assert_eq!(db.status(*id), "sent");
    }
    assert_eq!(db.query_one::<i64>("SELECT paused FROM queue_state"), 0);
}

#[test]
fn one_refused_recipient_of_three_does_not_stop_the_others() {
    let server = SmtpServer::start(&["--refuse-rcpt", "nobody"]);
    let s = Setup::new(server.port, |t| t);
    let db = s.db();
    let id = db.insert(
        "a@example.com, nobody@example.com, c@example.com",
        "three",
        "x",
    );
    s.once();
    let row = db.row(id);
    assert_eq!(row["status"], "sent", "{row}");
    assert_eq!(row["error_code"], "partly_refused");
    let err = row["last_error"].as_str().unwrap();
    assert!(err.contains("nobody@example.com (550 5.1.1"), "{err}");
    let msgs = server.wait_for_messages(1, LONG);
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0].rcpt_tos, vec!["a@example.com", "c@example.com"]);
    let refused = db.rows_with("SELECT status, smtp_reply FROM mail_recipient WHERE mail_id = ?1 AND address = 'nobody@example.com'", [id]);
    assert_eq!(refused[0]["status"], "failed");
}

#[test]
fn a_greylisted_recipient_is_retried_alone_and_then_sent() {
    let server = SmtpServer::start(&["--defer-rcpt", "grey:1"]);
    let s = Setup::new(server.port, set("retry_backoff", "[\"1s\"]"));
    let db = s.db();
    let id = db.insert("a@example.com, grey@example.com", "greylisted", "x");
    let mut daemon = Daemon::spawn(&s.config, &["run"]);
    let row = db.wait_for_status(id, "sent", LONG);
    daemon.terminate(LONG);
    assert_eq!(row["attempts"], 2, "{row}");
    let msgs = server.wait_for_messages(2, LONG);
    assert_eq!(
        msgs[0].rcpt_tos,
        vec!["a@example.com"],
        "the accepted recipient gets it once"
    );
    assert_eq!(
        msgs[1].rcpt_tos,
        vec!["grey@example.com"],
        "the deferred one is retried alone"
    );
    assert_eq!(
        msgs[0].message_id(),
        msgs[1].message_id(),
        "the retry keeps the Message-ID"
    );
    let outcomes: Vec<String> = db
        .rows_with(
            "SELECT outcome FROM mail_attempt WHERE mail_id = ?1 ORDER BY id",
            [id],
        )
        .iter()
        .map(|r| r["outcome"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(outcomes, vec!["retry", "sent"]);
    let first = db.rows_with(
        "SELECT error_code, smtp_reply FROM mail_attempt WHERE mail_id = ?1 ORDER BY id LIMIT 1",
        [id],
    );
    assert_eq!(first[0]["error_code"], "recipient_deferred");
    assert!(first[0]["smtp_reply"]
        .as_str()
        .unwrap()
        .starts_with("451 4.7.1"));
}

#[test]
fn a_quota_reply_sent_as_5xx_pauses_instead_of_failing() {
    let server = SmtpServer::start(&[
        "--mail-reply",
        "550 5.4.5 Daily user sending limit exceeded",
    ]);
    let s = Setup::new(server.port, |t| t);
    let db = s.db();
    let id = db.insert("a@example.com", "quota", "x");
    s.once();
    let row = db.row(id);
    assert_eq!(row["status"], "queued", "{row}");
    assert_eq!(row["attempts"], 0);
    assert_eq!(row["error_code"], "sending_limit");
    assert!(row["last_error"]
        .as_str()
        .unwrap()
        .contains("550 5.4.5 Daily user sending limit exceeded"));
    assert_eq!(db.query_one::<i64>("SELECT paused FROM queue_state"), 1);
    let attempt = db.rows_with("SELECT outcome FROM mail_attempt WHERE mail_id = ?1", [id]);
    assert_eq!(attempt[0]["outcome"], "paused");
}

/// Postfix's smtp-sink injects replies and hang-ups at each stage.
#[test]
fn smtp_sink_faults_end_in_the_documented_outcomes() {
    // (flags, status, error_code, attempt outcome)
    let cases: &[(&[&str], &str, &str, &str)] = &[
        (&["-f", "rcpt"], "failed", "recipient_refused", "failed"),
        (&["-r", "rcpt"], "queued", "recipient_deferred", "retry"),
        (&["-f", "data"], "failed", "message_refused", "failed"),
        (&["-r", "data"], "queued", "message_deferred", "retry"),
        (&["-Q", "mail"], "queued", "server_unavailable", "paused"),
        (&["-q", "data"], "queued", "connection_lost", "retry"),
        (
            &["-f", "ehlo", "-f", "helo"],
            "queued",
            "server_unavailable",
            "paused",
        ),
    ];
    for (flags, status, code, outcome) in cases {
        let sink = SmtpSink::start(flags);
        let s = Setup::new(sink.port, set("timeout", "\"5s\""));
        let db = s.db();
        let id = db.insert("a@example.com", "fault", "x");
        s.once();
        let row = db.row(id);
        assert_eq!(
            (
                row["status"].as_str().unwrap(),
                row["error_code"].as_str().unwrap()
            ),
            (*status, *code),
            "{flags:?}: {row}"
        );
        let a = db.rows_with("SELECT outcome FROM mail_attempt WHERE mail_id = ?1", [id]);
        assert_eq!(a[0]["outcome"], *outcome, "{flags:?}");
        assert!(!row["last_error"].as_str().unwrap().is_empty());
    }
}

#[test]
fn starttls_is_required_when_configured() {
    // The server offers no STARTTLS: no AUTH, no mail, a clear error.
    let ca = TestCa::new();
    let server = SmtpServer::start(&["--auth-user", "crm", "--auth-password", "secret"]);
    let s = Setup::new(server.port, tls_auth_config(&ca, "secret"));
    let db = s.db();
    let id = db.insert("a@example.com", "tls", "x");
    s.once();
    let row = db.row(id);
    assert_eq!(row["status"], "queued");
    assert_eq!(row["error_code"], "starttls_unavailable");
    assert!(server.messages().is_empty());
    let log = server.log();
    assert!(
        !log.contains("AUTH"),
        "no AUTH may be sent in plaintext: {log}"
    );
}

#[test]
fn an_untrusted_certificate_pauses_with_a_tls_error() {
    let ca = TestCa::new();
    let mut args = ca.untrusted_server_args("starttls");
    args.extend(["--auth-user", "crm", "--auth-password", "secret"].map(String::from));
    let server = SmtpServer::start(&args);
    let s = Setup::new(server.port, tls_auth_config(&ca, "secret"));
    let db = s.db();
    let id = db.insert("a@example.com", "tls", "x");
    s.once();
    let row = db.row(id);
    assert_eq!(row["error_code"], "tls_failed", "{row}");
    assert_eq!(row["status"], "queued");
    assert!(
        row["last_error"]
            .as_str()
            .unwrap()
            .contains("UnknownIssuer"),
        "{row}"
    );
}

#[test]
fn a_row_left_sending_by_a_crash_is_recovered_and_sent_in_doubt() {
    let server = SmtpServer::start(NO_ARGS);
    let s = Setup::new(server.port, |t| t);
    let db = s.db();
    let id = db.insert("a@example.com", "crashed", "x");
    // What a crash mid-delivery leaves behind: the row claimed, its attempt open.
    db.execute(&format!("UPDATE mail_queue SET status = 'sending', attempts = 1, message_id = '<crash@example.com>' WHERE id = {id}"));
    db.execute(&format!(
        "INSERT INTO mail_attempt (mail_id, started_at) VALUES ({id}, '2026-01-01T00:00:00.000Z')"
    ));
    s.once();
    let row = db.row(id);
    assert_eq!(row["status"], "sent", "{row}");
    let outcomes: Vec<String> = db
        .rows_with(
            "SELECT outcome FROM mail_attempt WHERE mail_id = ?1 ORDER BY id",
            [id],
        )
        .iter()
        .map(|r| r["outcome"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(outcomes, vec!["in_doubt", "sent"]);
    let msgs = server.wait_for_messages(1, LONG);
    assert_eq!(
        msgs[0].message_id().as_deref(),
        Some("crash@example.com"),
        "the stored Message-ID is reused"
    );
}

#[test]
fn two_processes_on_one_file_send_each_mail_once() {
    let sink = SmtpSink::start(NO_ARGS);
    let s = Setup::new(sink.port, |t| t);
    let db = s.db();
    let n = 300;
    db.execute("BEGIN");
    for i in 0..n {
        db.insert("a@example.com", &format!("m{i}"), "x");
    }
    db.execute("COMMIT");
    let mut a = Daemon::spawn(&s.config, &["run", "--once", "--no-lock-dangerous"]);
    let mut b = Daemon::spawn(&s.config, &["run", "--once", "--no-lock-dangerous"]);
    assert!(
        a.wait_timeout(LONG).expect("first exits").success(),
        "{}",
        a.stderr()
    );
    assert!(
        b.wait_timeout(LONG).expect("second exits").success(),
        "{}",
        b.stderr()
    );
    assert_eq!(
        db.query_one::<i64>("SELECT count(*) FROM mail_queue WHERE status = 'sent'"),
        n
    );
    let msgs = sink.wait_for_messages(n as usize, LONG);
    let ids: HashSet<String> = msgs
        .iter()
        .map(|m| {
            let text = String::from_utf8_lossy(&m.message);
            text.lines()
                .find(|l| l.to_ascii_lowercase().starts_with("message-id:"))
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(msgs.len(), n as usize, "each mail exactly once");
    assert_eq!(ids.len(), n as usize);
    // Both processes really took part (otherwise this proves nothing about the claim).
    let sent_by = |d: &Daemon| d.stderr().matches("Delivery attempt finished").count();
    assert!(
        sent_by(&a) > 0 && sent_by(&b) > 0,
        "a: {}, b: {}",
        sent_by(&a),
        sent_by(&b)
    );
}

#[test]
fn a_crm_inserting_while_the_daemon_runs_never_sees_database_is_locked() {
    let sink = SmtpSink::start(NO_ARGS);
    let s = Setup::new(sink.port, |t| t);
    let mut daemon = Daemon::spawn(&s.config, &["run"]);
    let script = r#"
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], timeout=5.0, isolation_level=None)
errors = 0
for i in range(400):
    try:
        db.execute("BEGIN IMMEDIATE")
        db.execute("INSERT INTO mail_queue (to_addrs, subject, body_text) VALUES (?, ?, ?)",
                   ("crm@example.com", "crm %d" % i, "x"))
        db.execute("COMMIT")
        if i % 50 == 0:
            db.execute("SELECT count(*) FROM mail_queue WHERE status = 'sent'").fetchone()
    except sqlite3.OperationalError as e:
        errors += 1
        print("ERROR", e, flush=True)
print("errors", errors)
"#;
    let out = std::process::Command::new(python())
        .arg("-c")
        .arg(script)
        .arg(&s.db_path)
        .output()
        .unwrap();
    let text = stdout(&out);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("errors 0"), "{text}");
    let db = s.db();
    wait_until(LONG, "every CRM row sent", || {
        (db.query_one::<i64>("SELECT count(*) FROM mail_queue WHERE status = 'sent'") == 400)
            .then_some(())
    });
    daemon.terminate(LONG);
    assert!(!daemon.stderr().contains("locked"), "{}", daemon.stderr());
}

/// The SQL and Python on docs/queue-table.md run as written against the real schema.
#[test]
fn the_queue_table_docs_run_as_written() {
    let s = Setup::new(1, |t| t);
    let doc = std::fs::read_to_string(manifest_dir().join("docs/queue-table.md")).unwrap();
    let blocks = |lang: &str| -> Vec<String> {
        let fence = format!("```{lang}\n");
        doc.split(&fence)
            .skip(1)
            .map(|b| b.split("```").next().unwrap().to_string())
            .collect()
    };
    let sql = blocks("sql");
    assert!(sql.len() >= 3, "the page should show INSERTs and SELECTs");
    let db = s.db();
    for b in &sql {
        db.conn
            .execute_batch(b)
            .unwrap_or_else(|e| panic!("{b}\n{e}"));
    }
    let py = blocks("python");
    assert_eq!(py.len(), 1);
    let out = std::process::Command::new(python())
        .arg("-c")
        .arg(&py[0])
        .env("MAILQUEUE_DB", &s.db_path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id: i64 = stdout(&out).trim().parse().unwrap();
    let row = db.row(id);
    assert_eq!(row["status"], "queued");
    assert_eq!(row["priority"], 0);
    assert_eq!(row["attempts"], 0);
    assert!(row["created_at"].as_str().unwrap().ends_with('Z'));
    // Every documented status word and error code is one the code knows.
    for code in [
        "auth_failed",
        "sending_limit",
        "partly_refused",
        "recipient_deferred",
        "in_doubt",
    ] {
        assert!(doc.contains(&format!("`{code}`")), "{code} undocumented");
    }
}

/// Every example config in config/ loads (secret files replaced by a temp file).
#[test]
fn every_example_config_loads() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "pw\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut n = 0;
    for e in std::fs::read_dir(manifest_dir().join("config")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_none_or(|x| x != "toml") {
            continue;
        }
        let text = std::fs::read_to_string(&p)
            .unwrap()
            .replace("/etc/mailqueue/smtp-password", secret.to_str().unwrap())
            .replace("/etc/mailqueue/pop-password", secret.to_str().unwrap())
            .replace(
                "/etc/mailqueue/oauth2-client-secret",
                secret.to_str().unwrap(),
            )
            .replace(
                "/var/lib/mailqueue/oauth2-refresh-token",
                secret.to_str().unwrap(),
            );
        let cfg = dir.path().join(p.file_name().unwrap());
        std::fs::write(&cfg, text).unwrap();
        let out = run_mailqueue(&cfg, &["check-config"]);
        assert!(
            out.status.success(),
            "{}: {}",
            p.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout(&out).contains("# config OK"));
        n += 1;
    }
    assert!(n >= 4, "expected the demo and three examples, found {n}");
}

#[test]
fn a_bad_config_names_the_key_and_exits_78() {
    let s = Setup::new(25, |t| t);
    s.rewrite(set("interval_ms", "\"fast\""));
    let out = s.run(&["check-config"]);
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("rate.interval_ms") && err.contains("line"),
        "{err}"
    );
    s.rewrite(|t| t.replace("interval_ms = \"fast\"", "interval_ms = 0\nspeed = 3"));
    let out = s.run(&["run", "--once"]);
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("speed"));
    // The password never shows in check-config.
    s.rewrite(chain(vec![
        Box::new(|t: String| t.replace("speed = 3\n", "")),
        Box::new(set("auth", "true")),
        Box::new(add_smtp("user = \"u\"\npassword = \"hunter2-xyz\"")),
    ]));
    let out = s.run(&["check-config"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!stdout(&out).contains("hunter2-xyz"));
    assert!(stdout(&out).contains("password = \"********\""));
}

#[test]
fn test_send_prints_each_step_and_never_pauses_the_queue() {
    let ca = TestCa::new();
    let server = auth_server(&ca, &[]);
    let s = Setup::new(server.port, tls_auth_config(&ca, "secret"));
    // --config after the subcommand works too.
    let out = std::process::Command::new(mailqueue_bin())
        .args([
            "test-send",
            "--to",
            "admin@example.org",
            "--subject",
            "テスト",
            "--config",
        ])
        .arg(&s.config)
        .output()
        .unwrap();
    let text = stdout(&out);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for step in [
        "[ok] connect to",
        "[ok] STARTTLS",
        "[ok] SMTP login as crm",
        "Mail sent",
    ] {
        assert!(text.contains(step), "missing {step:?} in:\n{text}");
    }
    let m = &server.wait_for_messages(1, LONG)[0];
    assert_eq!(m.subject().as_deref(), Some("テスト"));

    s.rewrite(|t| {
        t.replace("\"secret\"", "\"wrong\"")
            .replace("[log]\n", "[log]\nerror_language = \"ja\"\n")
    });
    let out = s.run(&["test-send", "--to", "admin@example.org"]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("[failed] SMTP login as crm"), "{text}");
    assert!(
        text.contains("SMTPログインに失敗しました (535 5.7.8 Authentication credentials invalid)"),
        "{text}"
    );
    assert_eq!(
        s.db().query_one::<i64>("SELECT paused FROM queue_state"),
        0,
        "test-send must not pause"
    );
}

#[test]
fn operators_can_list_show_retry_cancel_resume_and_purge() {
    let server = SmtpServer::start(&["--refuse-rcpt", "nobody"]);
    let s = Setup::new(server.port, |t| t);
    let db = s.db();
    let out = s.run(&[
        "enqueue",
        "--to",
        "nobody@example.com",
        "--subject",
        "s",
        "--body",
        "b",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let failed: i64 = stdout(&out).trim().parse().unwrap();
    let later: i64 = stdout(&s.run(&[
        "enqueue",
        "--to",
        "a@example.com",
        "--subject",
        "s",
        "--body",
        "b",
        "--send-after",
        "2099-01-01T00:00:00Z",
    ]))
    .trim()
    .parse()
    .unwrap();
    s.once();
    assert_eq!(db.status(failed), "failed");
    assert_eq!(db.status(later), "queued", "send_after in the future");
    let list = stdout(&s.run(&["list", "--status", "failed", "--json"]));
    let v: serde_json::Value = serde_json::from_str(&list).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 1);
    let show: serde_json::Value =
        serde_json::from_str(&stdout(&s.run(&["show", &failed.to_string()]))).unwrap();
    assert_eq!(show["recipients"][0]["status"], "failed");
    assert_eq!(show["attempts"].as_array().unwrap().len(), 1);
    assert!(s.run(&["retry", &failed.to_string()]).status.success());
    assert_eq!(db.status(failed), "queued");
    assert!(s.run(&["cancel", &later.to_string()]).status.success());
    assert_eq!(db.status(later), "cancelled");
    let out = s.run(&["cancel", "99999"]);
    assert_eq!(out.status.code(), Some(64));
    db.execute("UPDATE queue_state SET paused = 1, paused_until = '2999-01-01T00:00:00.000Z'");
    assert!(stdout(&s.run(&["resume"])).contains("queue resumed"));
    db.execute(
        "UPDATE mail_queue SET updated_at = '2000-01-01T00:00:00.000Z' WHERE status = 'cancelled'",
    );
    assert!(stdout(&s.run(&["purge", "--older-than", "30d"])).contains("1 mail(s) purged"));
    assert_eq!(db.query_one::<i64>("SELECT count(*) FROM mail_queue"), 1);
}

#[test]
fn broken_rows_fail_with_a_reason_and_the_others_still_go() {
    let sink = SmtpSink::start(NO_ARGS);
    let s = Setup::new(sink.port, set("max_attempts", "5"));
    let db = s.db();
    let bad_addr = db.insert("not an address", "s", "b");
    let no_rcpt = db.insert("", "s", "b");
    let injected = db.insert("a@example.com", "hi\r\nBcc: evil@example.com", "b");
    let blob = db.insert_cols(&[
        ("to_addrs", &"a@example.com"),
        ("subject", &vec![0xffu8, 0xfe]),
    ]);
    let many: Vec<String> = (0..101).map(|i| format!("r{i}@example.com")).collect();
    let too_many = db.insert(&many.join(", "), "s", "b");
    let good = db.insert("a@example.com", "fine", "b");
    s.once();
    assert_eq!(db.row(bad_addr)["error_code"], "invalid_address");
    assert_eq!(db.row(no_rcpt)["error_code"], "invalid_row");
    assert_eq!(db.row(injected)["error_code"], "invalid_row");
    assert_eq!(db.row(blob)["status"], "failed");
    let row = db.row(too_many);
    assert_eq!(row["error_code"], "invalid_row");
    assert!(
        row["last_error"]
            .as_str()
            .unwrap()
            .contains("101 recipients, more than queue.max_recipients (100)"),
        "{row}"
    );
    assert_eq!(db.status(good), "sent");
    assert_eq!(sink.wait_for_messages(1, LONG).len(), 1);
}

/// No reply after the final "." (smtp-sink hangs up there): the mail may have gone out.
#[test]
fn a_mail_without_a_final_reply_is_resent_once_then_held() {
    let sink = SmtpSink::start(&["-q", "."]);
    let s = Setup::new(sink.port, set("retry_backoff", "[\"1s\"]"));
    let db = s.db();
    let id = db.insert("a@example.com", "in doubt", "x");
    let mut daemon = Daemon::spawn(&s.config, &["run"]);
    let row = db.wait_for_status(id, "held", LONG);
    daemon.terminate(LONG);
    assert_eq!(row["error_code"], "in_doubt", "{row}");
    assert!(
        row["last_error"]
            .as_str()
            .unwrap()
            .contains("held for an operator"),
        "{row}"
    );
    let outcomes: Vec<String> = db
        .rows_with(
            "SELECT outcome FROM mail_attempt WHERE mail_id = ?1 ORDER BY id",
            [id],
        )
        .iter()
        .map(|r| r["outcome"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        outcomes,
        vec!["in_doubt", "in_doubt"],
        "resent once, then held"
    );
    // An operator settles it.
    assert!(s.run(&["cancel", &id.to_string()]).status.success());
    assert_eq!(db.status(id), "cancelled");
}

#[test]
fn with_on_doubt_hold_the_first_doubt_waits_for_an_operator() {
    let sink = SmtpSink::start(&["-q", "."]);
    let s = Setup::new(sink.port, |t| {
        t.replace("[queue]\n", "[queue]\non_doubt = \"hold\"\n")
    });
    let db = s.db();
    let id = db.insert("a@example.com", "in doubt", "x");
    s.once();
    assert_eq!(db.status(id), "held");
    assert_eq!(db.query_one::<i64>("SELECT count(*) FROM mail_attempt"), 1);
    assert!(s.run(&["retry", &id.to_string()]).status.success());
    assert_eq!(db.status(id), "queued");
}

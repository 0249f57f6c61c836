//! Proves the test harness itself works, without the daemon: the aiosmtpd server (plain,
//! STARTTLS, implicit TLS, AUTH, fault options), smtp-sink, the certificates and the helpers.
//! Needs scripts/test-setup.sh to have run.

mod support;

use std::time::Duration;
use support::*;

const WAIT: Duration = Duration::from_secs(10);

/// EHLO, MAIL, RCPT..., DATA, returning the final reply; the connection stays open.
fn send(c: &mut RawSmtp, from: &str, to: &[&str], message: &str) -> String {
    assert!(c.cmd(&format!("MAIL FROM:<{from}>")).starts_with("250"));
    for t in to {
        let r = c.cmd(&format!("RCPT TO:<{t}>"));
        assert!(r.starts_with("250"), "RCPT {t}: {r}");
    }
    c.data(message)
}

const MSG: &str = "From: CRM <crm@example.com>\r\nTo: alice@example.net\r\nSubject: hello\r\n\
                   Message-ID: <m1@crm.example.test>\r\n\r\nline one\r\n.dotted line\r\n";

#[test]
fn python_server_accepts_a_mail_and_spools_it() {
    let srv = SmtpServer::start(NO_ARGS);
    let (mut c, greeting) = RawSmtp::connect(srv.port);
    assert!(greeting.starts_with("220 "), "{greeting}");
    let ehlo = c.cmd("EHLO client.test");
    assert!(ehlo.starts_with("250-"), "{ehlo}");
    assert!(
        !ehlo.contains("AUTH"),
        "AUTH must not be offered without --auth-user: {ehlo}"
    );
    assert!(!ehlo.contains("STARTTLS"), "{ehlo}");
    let r = send(
        &mut c,
        "crm@example.com",
        &["alice@example.net", "bob@example.net"],
        MSG,
    );
    assert!(r.starts_with("250"), "{r}");
    // A second transaction on the same connection, after an RSET.
    assert!(c.cmd("RSET").starts_with("250"));
    assert!(send(
        &mut c,
        "crm@example.com",
        &["carol@example.net"],
        "Subject: two\r\n\r\nx\r\n"
    )
    .starts_with("250"));
    assert!(c.cmd("QUIT").starts_with("221"));

    let msgs = srv.wait_for_messages(2, WAIT);
    assert_eq!(msgs.len(), 2);
    let m = &msgs[0];
    assert_eq!(m.seq, 1);
    assert_eq!(m.mail_from, "crm@example.com");
    assert_eq!(m.rcpt_tos, ["alice@example.net", "bob@example.net"]);
    assert_eq!(m.connection, 1);
    assert_eq!(m.helo, "client.test");
    assert!(m.received_at > 1.0e9);
    assert_eq!(m.raw, MSG.as_bytes(), "raw bytes, CRLF kept, dot-unstuffed");
    assert_eq!(m.subject().as_deref(), Some("hello"));
    assert_eq!(m.message_id().as_deref(), Some("m1@crm.example.test"));
    assert_eq!(m.from_addr().as_deref(), Some("crm@example.com"));
    assert_eq!(m.from_name().as_deref(), Some("CRM"));
    assert_eq!(m.to_addrs(), ["alice@example.net"]);
    assert_eq!(m.header("From").as_deref(), Some("CRM <crm@example.com>"));
    assert_eq!(
        m.body_text().as_deref(),
        Some("line one\r\n.dotted line\r\n")
    );
    assert_eq!(
        (msgs[1].seq, msgs[1].connection, msgs[1].rcpt_tos.as_slice()),
        (2, 1, &["carol@example.net".to_string()][..])
    );
    assert_eq!(srv.connections(), 1);

    // A second connection gets number 2.
    let (mut c2, _) = RawSmtp::connect(srv.port);
    c2.cmd("EHLO again.test");
    assert!(send(
        &mut c2,
        "crm@example.com",
        &["dave@example.net"],
        "Subject: 3\r\n\r\ny\r\n"
    )
    .starts_with("250"));
    let msgs = srv.wait_for_messages(3, WAIT);
    assert_eq!(
        (msgs[2].connection, msgs[2].helo.as_str()),
        (2, "again.test")
    );
    assert_eq!(srv.connections(), 2);
}

#[test]
fn python_server_offers_starttls_in_starttls_mode() {
    let ca = TestCa::new();
    let srv = SmtpServer::start(&ca.server_args("starttls"));
    let (mut c, _) = RawSmtp::connect(srv.port);
    let ehlo = c.cmd("EHLO client.test");
    assert!(
        ehlo.lines().any(|l| l[4..].starts_with("STARTTLS")),
        "{ehlo}"
    );
    assert!(c.cmd("STARTTLS").starts_with("220"));
}

#[test]
fn python_server_refuses_and_defers_recipients() {
    let srv = SmtpServer::start(&["--refuse-rcpt", "nobody", "--defer-rcpt", "grey:2"]);
    let (mut c, _) = RawSmtp::connect(srv.port);
    c.cmd("EHLO client.test");
    assert!(c.cmd("MAIL FROM:<crm@example.com>").starts_with("250"));
    let r = c.cmd("RCPT TO:<nobody@example.net>");
    assert_eq!(
        r,
        "550 5.1.1 <nobody@example.net>: Recipient address rejected: User unknown"
    );
    let grey =
        "451 4.7.1 <grey@example.net>: Recipient address rejected: Greylisted, try again later";
    assert_eq!(c.cmd("RCPT TO:<grey@example.net>"), grey);
    // The count is per address and survives reconnects.
    let (mut c2, _) = RawSmtp::connect(srv.port);
    c2.cmd("EHLO client.test");
    c2.cmd("MAIL FROM:<crm@example.com>");
    assert_eq!(c2.cmd("RCPT TO:<grey@example.net>"), grey);
    assert!(c2.cmd("RCPT TO:<grey@example.net>").starts_with("250"));
    assert!(c2.cmd("RCPT TO:<ok@example.net>").starts_with("250"));
    assert!(c2.data("Subject: s\r\n\r\nb\r\n").starts_with("250"));
    let m = srv.wait_for_messages(1, WAIT);
    assert_eq!(m[0].rcpt_tos, ["grey@example.net", "ok@example.net"]);
    assert_eq!(m[0].connection, 2);
}

#[test]
fn python_server_requires_auth_and_fakes_replies() {
    let srv = SmtpServer::start(&[
        "--auth-user",
        "crm",
        "--auth-password",
        "secret",
        "--data-reply",
        "554 5.7.1 Rejected as spam",
    ]);
    let (mut c, _) = RawSmtp::connect(srv.port);
    let ehlo = c.cmd("EHLO client.test");
    assert!(ehlo.contains("AUTH LOGIN PLAIN"), "{ehlo}");
    assert!(c.cmd("MAIL FROM:<crm@example.com>").starts_with("530"));
    // base64("\0crm\0wrong") and base64("\0crm\0secret")
    assert_eq!(
        c.cmd("AUTH PLAIN AGNybQB3cm9uZw=="),
        "535 5.7.8 Authentication credentials invalid"
    );
    assert!(c.cmd("AUTH PLAIN AGNybQBzZWNyZXQ=").starts_with("235"));
    assert!(send(
        &mut c,
        "crm@example.com",
        &["a@example.net"],
        "Subject: s\r\n\r\nb\r\n"
    )
    .starts_with("554 5.7.1"));
    // AUTH LOGIN with the usual "Username:"/"Password:" prompts, on a new connection.
    let (mut c, _) = RawSmtp::connect(srv.port);
    c.cmd("EHLO client.test");
    assert_eq!(c.cmd("AUTH LOGIN"), "334 VXNlcm5hbWU6");
    assert_eq!(c.cmd("Y3Jt"), "334 UGFzc3dvcmQ6");
    assert!(c.cmd("c2VjcmV0").starts_with("235"));
    assert!(srv.messages().is_empty(), "a 5xx after DATA is not spooled");

    let quota = SmtpServer::start(&[
        "--mail-reply",
        "550 5.4.5 Daily user sending limit exceeded",
    ]);
    let (mut c, _) = RawSmtp::connect(quota.port);
    c.cmd("EHLO client.test");
    assert_eq!(
        c.cmd("MAIL FROM:<crm@example.com>"),
        "550 5.4.5 Daily user sending limit exceeded"
    );
}

// The test CA's certificates against rustls are exercised by the daemon itself:
// tests/delivery.rs (STARTTLS with AUTH, an untrusted certificate) and tests/fault_matrix.rs
// (implicit TLS). The crate no longer builds lettre's own TLS, which this test used.

#[test]
fn smtp_sink_accepts_and_keeps_a_mail() {
    let sink = SmtpSink::start(NO_ARGS);
    assert_eq!(listeners_on(sink.port), 1);
    let (mut c, greeting) = RawSmtp::connect(sink.port);
    assert!(greeting.starts_with("220"), "{greeting}");
    c.cmd("EHLO client.test");
    let r = send(
        &mut c,
        "crm@example.com",
        &["alice@example.net", "bob@example.net"],
        MSG,
    );
    assert!(r.starts_with("250"), "{r}");
    assert!(c.cmd("QUIT").starts_with("221"));

    let msgs = sink.wait_for_messages(1, WAIT);
    assert_eq!(msgs.len(), 1);
    let m = &msgs[0];
    assert_eq!(m.mail_from, "crm@example.com");
    assert_eq!(m.rcpt_tos, ["alice@example.net", "bob@example.net"]);
    assert_eq!(m.helo.as_deref(), Some("client.test"));
    // smtp-sink stores LF line ends.
    assert_eq!(m.message, MSG.replace("\r\n", "\n").as_bytes());
    let c = sink.wait_for_sessions(1, WAIT);
    assert_eq!((c.sessions, c.quits, c.messages), (1, 1, 1));
}

#[test]
fn smtp_sink_fault_flags() {
    // -r RCPT: every RCPT gets a 4xx; -f MAIL: 5xx.
    let sink = SmtpSink::start(&["-r", "RCPT"]);
    let (mut c, _) = RawSmtp::connect(sink.port);
    let ehlo = c.cmd("EHLO client.test");
    let mail = c.cmd("MAIL FROM:<crm@example.com>");
    assert!(mail.starts_with("250"), "MAIL: {mail:?} (EHLO: {ehlo:?})");
    let rcpt = c.cmd("RCPT TO:<a@example.net>");
    // The whole session in the message: a failure here (seen once, in the trace-level rerun of
    // the suite, not reproduced in 70 runs) must say what the sink answered and which port.
    assert!(
        rcpt.starts_with("450 4.3.0"),
        "RCPT on port {} with -r RCPT: {rcpt:?} (EHLO: {ehlo:?}, listeners now: {})",
        sink.port,
        listeners_on(sink.port)
    );
    drop(c);
    sink.wait_for_sessions(1, WAIT);
    // smtp-sink counts the ended session (and prints its counters) before it deletes the
    // aborted transaction's dump file (`disconnect()` in smtp-sink.c), so the count alone does
    // not mean the file is gone: wait for the deletion itself. (Asserting right after the count
    // failed once in the trace-level rerun of the suite in CI, at 852250d.)
    wait_until(
        WAIT,
        "the aborted transaction's dump file to be deleted",
        || sink.raw_messages().is_empty().then_some(()),
    );
    assert_eq!(sink.counters().messages, 0);

    let sink = SmtpSink::start(&["-f", "MAIL"]);
    let (mut c, _) = RawSmtp::connect(sink.port);
    c.cmd("EHLO client.test");
    let mail = c.cmd("MAIL FROM:<crm@example.com>");
    assert!(
        mail.starts_with("500 5.3.0"),
        "MAIL on port {} with -f MAIL: {mail:?}",
        sink.port
    );
}

#[test]
fn db_and_config_helpers() {
    let dir = tempfile::tempdir().unwrap();
    let db_path = dir.path().join("queue \"q\".db"); // a quote in the path: TOML escaping
                                                     // A stand-in for the daemon's schema (the real one comes from `mailqueue migrate`).
    let db = Db::open(&db_path);
    db.execute(
        "CREATE TABLE mail_queue (id INTEGER PRIMARY KEY, to_addrs TEXT NOT NULL, subject TEXT, \
         body_text TEXT, cc_addrs TEXT, status TEXT NOT NULL DEFAULT 'pending', attempts INTEGER \
         NOT NULL DEFAULT 0, last_error TEXT, score REAL)",
    );
    let id = db.insert("alice@example.net", "件名", "本文");
    let id2 = db.insert_cols(&[
        ("to_addrs", &"bob@example.net"),
        ("cc_addrs", &"c@example.net"),
        ("score", &1.5),
    ]);
    assert_eq!((id, id2), (1, 2));
    assert_eq!(db.status(id), "pending");
    let row = db.row(id);
    assert_eq!(row["to_addrs"], "alice@example.net");
    assert_eq!(row["subject"], "件名");
    assert_eq!(row["attempts"], 0);
    assert!(row["last_error"].is_null());
    assert_eq!(db.row(id2)["score"], 1.5);
    assert_eq!(db.query_one::<i64>("SELECT count(*) FROM mail_queue"), 2);
    assert_eq!(
        db.rows("SELECT id FROM mail_queue ORDER BY id DESC")[0]["id"],
        2
    );

    // Another connection (as the daemon would) changes the row; wait_for_status sees it.
    let other = Db::open(&db_path);
    other.execute("UPDATE mail_queue SET status = 'sent', attempts = 1 WHERE id = 1");
    assert_eq!(db.wait_for_status(id, "sent", WAIT)["attempts"], 1);

    let text = base_config(&db_path, 2525);
    let parsed: toml::Table = toml::from_str(&text).expect("base_config is valid TOML");
    assert_eq!(parsed["queue"]["database"].as_str(), db_path.to_str());
    assert_eq!(parsed["smtp"]["port"].as_integer(), Some(2525));
    assert_eq!(parsed["sender"]["from_name"].as_str(), Some("CRM 通知"));
    let cfg = write_config(dir.path(), &text);
    assert_eq!(std::fs::read_to_string(cfg).unwrap(), text);
}

//! `mailqueue::pop3` against a real Dovecot POP3 server, started by each test with a throwaway
//! config under a temp dir (`support::dovecot`, `dovecot -F -c FILE`): plaintext, APOP, STLS and
//! POP3S logins, a wrong password, a login from another source address, and proof from
//! Dovecot's own log that every session ended with QUIT. Also the python SMTP server's
//! POP-before-SMTP gate (`--pop-log`), which trusts nothing but that log.
//!
//! Prerequisites: `scripts/dovecot-test.sh` (installs dovecot-core and dovecot-pop3d) and root,
//! since Dovecot's master drops privileges to `dovecot`/`dovenull`/`nobody`; the gate test also
//! needs `scripts/test-setup.sh` (the python server). Without Dovecot the tests print why and
//! pass — unless `CI` is set, where a missing Dovecot fails them.
//!
//! Waiting is always "poll every 20 ms until a deadline", never a bare sleep — except for letting
//! the gate's 1 s window expire, which is the scenario itself.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use mailqueue::pop3::{login, login_with_progress, PopError, PopSettings, PopTls};
use support::dovecot::{dovecot_available, Dovecot};
use support::{free_port, RawSmtp, SmtpServer};

/// The client's per-step timeout: above Dovecot's 2 s `auth_failure_delay`.
const TIMEOUT: Duration = Duration::from_secs(10);

const USER: &str = "alice";
const PASSWORD: &str = "Open sesame 1";

/// A Dovecot that knows [`USER`].
fn start() -> Dovecot {
    Dovecot::start(&[(USER, PASSWORD)])
}

/// Settings for [`USER`] on `dc`.
fn settings(dc: &Dovecot, tls: PopTls) -> PopSettings {
    PopSettings {
        host: "127.0.0.1".into(),
        port: if tls == PopTls::Tls {
            dc.pop3s_port
        } else {
            dc.pop3_port
        },
        tls,
        user: USER.into(),
        password: PASSWORD.into(),
        apop: false,
        timeout: TIMEOUT,
        ca_file: Some(dc.ca_pem_path.clone()),
        source_address: None,
    }
}

/// Records the progress hook's reports as `step:ok` / `step:err`.
#[derive(Default)]
struct Steps(Mutex<Vec<String>>);

impl Steps {
    fn hook(&self) -> impl Fn(&str, Result<&str, &str>) + Sync + '_ {
        move |step, r| {
            let r = if r.is_ok() { "ok" } else { "err" };
            self.0.lock().unwrap().push(format!("{step}:{r}"));
        }
    }
    fn get(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn user_pass_logs_in_and_quits() {
    if !dovecot_available("user_pass_logs_in_and_quits") {
        return;
    }
    let dc = start();
    let steps = Steps::default();
    let session = login_with_progress(&settings(&dc, PopTls::None), &steps.hook())
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", dc.log()));
    assert_eq!(session.method, "USER/PASS");
    assert!(!session.tls);
    assert!(session.greeting.contains("Dovecot"), "{}", session.greeting);
    assert_eq!(session.quit, Ok("Logging out.".to_string()));
    assert_eq!(steps.get(), ["connect:ok", "login:ok", "QUIT:ok"]);
    dc.wait_for_log(&["Login: user=<alice>", "method=PLAIN"]);
    dc.assert_every_session_quit(USER, 1, 0);
}

#[tokio::test]
async fn apop_logs_in_and_quits() {
    if !dovecot_available("apop_logs_in_and_quits") {
        return;
    }
    let dc = start();
    let mut s = settings(&dc, PopTls::None);
    s.apop = true;
    let session = login(&s)
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", dc.log()));
    assert_eq!(session.method, "APOP");
    dc.wait_for_log(&["Login: user=<alice>", "method=APOP"]);
    dc.assert_every_session_quit(USER, 1, 0);
}

#[tokio::test]
async fn stls_with_the_test_ca_logs_in_over_tls() {
    if !dovecot_available("stls_with_the_test_ca_logs_in_over_tls") {
        return;
    }
    let dc = start();
    let steps = Steps::default();
    let session = login_with_progress(&settings(&dc, PopTls::StartTls), &steps.hook())
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", dc.log()));
    assert!(session.tls);
    assert_eq!(
        steps.get(),
        ["connect:ok", "STLS:ok", "login:ok", "QUIT:ok"]
    );
    // The capabilities are the ones asked again over TLS: Dovecot no longer offers STLS there.
    let caps = &session.capabilities;
    assert!(caps.iter().any(|c| c == "USER"), "{caps:?}");
    assert!(!caps.iter().any(|c| c == "STLS"), "{caps:?}");
    // Dovecot marks a login over TLS with "TLS" (a plaintext one on loopback says "secured").
    dc.wait_for_log(&["Login: user=<alice>", "method=PLAIN", ", TLS"]);
    dc.assert_every_session_quit(USER, 1, 0);
}

#[tokio::test]
async fn pop3s_with_the_test_ca_logs_in_over_tls() {
    if !dovecot_available("pop3s_with_the_test_ca_logs_in_over_tls") {
        return;
    }
    let dc = start();
    let mut s = settings(&dc, PopTls::Tls);
    // By name this time: the certificate's DNS SAN is checked (localhost may resolve to ::1
    // first, where nothing listens; the next address is tried).
    s.host = "localhost".into();
    // APOP over TLS works too.
    s.apop = true;
    let session = login(&s)
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", dc.log()));
    assert!(session.tls);
    assert_eq!(session.server, format!("localhost:{}", dc.pop3s_port));
    dc.wait_for_log(&["Login: user=<alice>", "method=APOP", ", TLS"]);
    dc.assert_every_session_quit(USER, 1, 0);
}

#[tokio::test]
async fn wrong_password_is_a_login_error_and_still_quits() {
    if !dovecot_available("wrong_password_is_a_login_error_and_still_quits") {
        return;
    }
    let dc = start();
    let mut s = settings(&dc, PopTls::StartTls);
    s.password = "not the password".into();
    let steps = Steps::default();
    let e = login_with_progress(&s, &steps.hook()).await.unwrap_err();
    match &e {
        PopError::Login { reply } => {
            assert!(reply.contains("Authentication failed"), "{reply}");
            assert!(reply.starts_with("-ERR"), "{reply}");
        }
        other => panic!("expected a Login error, got {other:?}"),
    }
    assert_eq!(e.code(), "pop_login_failed");
    assert!(
        e.text(true).starts_with("POP認証に失敗しました (-ERR"),
        "{}",
        e.text(true)
    );
    assert!(!e.text(false).contains("not the password"));
    assert_eq!(
        steps.get(),
        ["connect:ok", "STLS:ok", "login:err", "QUIT:ok"]
    );
    dc.assert_every_session_quit(USER, 0, 1);
}

#[tokio::test]
async fn wrong_apop_secret_is_a_login_error() {
    if !dovecot_available("wrong_apop_secret_is_a_login_error") {
        return;
    }
    let dc = start();
    let mut s = settings(&dc, PopTls::None);
    s.apop = true;
    s.password = "not the password".into();
    let e = login(&s).await.unwrap_err();
    assert!(
        matches!(&e, PopError::Login { reply } if reply.contains("Authentication failed")),
        "{e:?}"
    );
    dc.assert_every_session_quit(USER, 0, 1);
}

#[tokio::test]
async fn without_the_test_ca_the_certificate_is_refused() {
    if !dovecot_available("without_the_test_ca_the_certificate_is_refused") {
        return;
    }
    let dc = start();
    let mut s = settings(&dc, PopTls::Tls);
    s.ca_file = None; // webpki roots only: the test CA is unknown
    let e = login(&s).await.unwrap_err();
    match &e {
        PopError::Tls { detail } => assert!(detail.contains("UnknownIssuer"), "{detail}"),
        other => panic!("expected a Tls error, got {other:?}"),
    }
    // No login was attempted.
    assert!(!dc.log().contains("Login: user=<alice>"));
}

#[tokio::test]
async fn refused_connection_is_a_connect_error() {
    // Needs no Dovecot: a port that was just free, where nothing listens.
    let port = free_port();
    let s = PopSettings {
        host: "127.0.0.1".into(),
        port,
        tls: PopTls::None,
        user: USER.into(),
        password: PASSWORD.into(),
        apop: false,
        timeout: TIMEOUT,
        ca_file: None,
        source_address: None,
    };
    let steps = Steps::default();
    let e = login_with_progress(&s, &steps.hook()).await.unwrap_err();
    match &e {
        PopError::Connect { server, detail } => {
            assert_eq!(server, &format!("127.0.0.1:{port}"));
            assert!(detail.to_lowercase().contains("refused"), "{detail}");
        }
        other => panic!("expected a Connect error, got {other:?}"),
    }
    assert_eq!(e.code(), "pop_connect_failed");
    assert_eq!(steps.get(), ["connect:err"]);
}

/// The log markers the QUIT checks rely on really tell a QUIT from a hang-up: a client that logs
/// in and closes without QUIT is logged as `Disconnected: Connection closed`, not `Logged out`.
#[test]
fn harness_log_tells_a_hang_up_from_a_quit() {
    if !dovecot_available("harness_log_tells_a_hang_up_from_a_quit") {
        return;
    }
    let dc = start();
    let tcp = TcpStream::connect(("127.0.0.1", dc.pop3_port)).unwrap();
    tcp.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut reader = BufReader::new(&tcp);
    let mut line = String::new();
    for cmd in ["", "USER alice", &format!("PASS {PASSWORD}")] {
        if !cmd.is_empty() {
            (&tcp).write_all(format!("{cmd}\r\n").as_bytes()).unwrap();
        }
        line.clear();
        reader.read_line(&mut line).unwrap();
        assert!(line.starts_with("+OK"), "{cmd}: {line}");
    }
    drop(reader);
    drop(tcp); // no QUIT
    let hung_up = dc.wait_for_log(&["pop3(alice)", "Disconnected: Connection closed"]);
    assert!(!hung_up.contains("Logged out"), "{hung_up}");
    assert!(!dc.log().contains("Disconnected: Logged out"));
}

#[test]
fn harness_starts_dovecot_for_pop3() {
    // A smoke test of the harness itself: Dovecot's log shows its own start-up line.
    if !dovecot_available("harness_starts_dovecot_for_pop3") {
        return;
    }
    let dc = start();
    assert!(dc.ca_pem_path.is_file());
    let first = dc.wait_for_log(&["master: Info: Dovecot v"]);
    assert!(first.contains("starting up for pop3"), "{first}");
}

/// A client bound to another loopback address reaches Dovecot's 127.0.0.1 listener, and Dovecot
/// logs that address as `rip=` (what the POP-before-SMTP gate matches on). It is not "secured"
/// (rip != lip), which `disable_plaintext_auth = no` allows.
#[tokio::test]
async fn login_from_127_0_0_2_is_logged_with_that_rip() {
    if !dovecot_available("login_from_127_0_0_2_is_logged_with_that_rip") {
        return;
    }
    let dc = start();
    let mut s = settings(&dc, PopTls::None);
    s.source_address = Some("127.0.0.2".parse().unwrap());
    login(&s)
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", dc.log()));
    let line = dc.wait_for_log(&["Login: user=<alice>", "rip=127.0.0.2, lip=127.0.0.1"]);
    assert!(!line.contains("secured"), "{line}");
    assert_eq!(dc.login_rips(USER), ["127.0.0.2"]);
    dc.assert_every_session_quit(USER, 1, 0);
}

/// The python server's POP-before-SMTP gate (`--pop-log` = this Dovecot's log, `--pop-window 1`):
/// RCPT is refused before any POP login, and after a login from another address (127.0.0.2);
/// allowed within a second of a login from the SMTP client's own address (other RCPT checks
/// still apply); refused again once that login is older than the window.
#[tokio::test]
async fn pop_before_smtp_gate_follows_dovecots_log() {
    if !dovecot_available("pop_before_smtp_gate_follows_dovecots_log") {
        return;
    }
    const DENIED: &str = "554 5.7.1 <bob@example.net>: Relay access denied";
    let dc = start();
    let log = dc.log_path.to_str().unwrap();
    let srv = SmtpServer::start(&[
        "--pop-log",
        log,
        "--pop-window",
        "1",
        "--refuse-rcpt",
        "nobody",
    ]);
    // One RCPT on a fresh connection from 127.0.0.1 (RawSmtp's default source address).
    let rcpt = |to: &str| {
        let (mut c, _) = RawSmtp::connect(srv.port);
        c.cmd("EHLO client.test");
        assert!(c.cmd("MAIL FROM:<crm@example.com>").starts_with("250"));
        let r = c.cmd(&format!("RCPT TO:<{to}>"));
        c.cmd("QUIT");
        r
    };

    // 1. No POP login yet.
    assert_eq!(rcpt("bob@example.net"), DENIED, "{}", srv.log());

    // 2. A login from 127.0.0.2 does not open the gate for 127.0.0.1.
    let mut other = settings(&dc, PopTls::None);
    other.source_address = Some("127.0.0.2".parse().unwrap());
    login(&other)
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", dc.log()));
    dc.wait_for_log(&["Login: user=<alice>", "rip=127.0.0.2,"]);
    assert_eq!(rcpt("bob@example.net"), DENIED, "{}", srv.log());

    // 3. A login from 127.0.0.1 does, once Dovecot has logged it.
    login(&settings(&dc, PopTls::None))
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", dc.log()));
    dc.wait_for_log(&["Login: user=<alice>", "rip=127.0.0.1,"]);
    // The login is at most this old from here on (it was logged before now).
    let logged_by = Instant::now();
    let r = rcpt("bob@example.net");
    assert!(r.starts_with("250"), "{r}\n{}\n{}", srv.log(), dc.log());
    // The gate lets it through to the other checks.
    assert!(rcpt("nobody@example.net").starts_with("550 5.1.1"));

    // 4. After the window the gate closes again.
    let expired = logged_by + Duration::from_millis(1200);
    std::thread::sleep(expired.saturating_duration_since(Instant::now()));
    assert_eq!(rcpt("bob@example.net"), DENIED, "{}", srv.log());

    // What the gate recorded, one line per RCPT.
    let d = srv.relay_decisions();
    let summary: Vec<(&str, bool)> = d
        .iter()
        .map(|v| (v["rcpt"].as_str().unwrap(), v["allowed"].as_bool().unwrap()))
        .collect();
    assert_eq!(
        summary,
        [
            ("bob@example.net", false),
            ("bob@example.net", false),
            ("bob@example.net", true),
            ("nobody@example.net", true),
            ("bob@example.net", false),
        ]
    );
    assert!(d.iter().all(|v| v["peer"] == "127.0.0.1"), "{d:#?}");
    // Before a login from 127.0.0.1 there was none to measure.
    assert!(
        d[0]["login_age"].is_null() && d[1]["login_age"].is_null(),
        "{d:#?}"
    );
    assert!(d[0]["pop_user"].is_null(), "{d:#?}");
    let age = |i: usize| d[i]["login_age"].as_f64().unwrap();
    assert!((0.0..1.0).contains(&age(2)), "{d:#?}");
    assert_eq!(d[2]["pop_user"], USER);
    assert!(age(4) > 1.0, "{d:#?}");
    assert!(d[4]["at"].as_f64().unwrap() > d[2]["at"].as_f64().unwrap());
    // Each decision is on the server's stderr too.
    let text = srv.log();
    assert_eq!(text.matches("relay DENIED").count(), 3, "{text}");
    assert_eq!(text.matches("relay allowed").count(), 2, "{text}");
    assert_eq!(dc.login_rips(USER), ["127.0.0.2", "127.0.0.1"]);
    dc.assert_every_session_quit(USER, 2, 0);
}

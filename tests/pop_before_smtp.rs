//! POP-before-SMTP end to end, the way providers do it: a real Dovecot takes the POP login, and
//! the SMTP test server relays only for an address Dovecot itself logged a login for within its
//! window (it reads Dovecot's log, never our client's word).

mod support;

use std::path::PathBuf;
use std::time::Duration;

use support::dovecot::{dovecot_available, Dovecot};
use support::*;
use tempfile::TempDir;

const LONG: Duration = Duration::from_secs(30);
const USER: &str = "alice";
const PASSWORD: &str = "Open sesame 1";

struct Setup {
    _dir: TempDir,
    db_path: PathBuf,
    config: PathBuf,
}

/// A config delivering to `smtp_port` with POP-before-SMTP against `dovecot`.
fn setup(dovecot: &Dovecot, smtp_port: u16, pop: &str, extra: &str) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let db_path = dir.path().join("queue.db");
    let mut text = base_config(&db_path, smtp_port);
    text = text.replace(
        "[smtp]\n",
        &format!(
            "[smtp]\nca_file = {}\n{extra}\n",
            toml_str(dovecot.ca_pem_path.to_str().unwrap())
        ),
    );
    text += &format!(
        "\n[pop_before_smtp]\nenabled = true\nhost = \"127.0.0.1\"\nport = {}\nuser = \"{USER}\"\n{pop}\n",
        dovecot.pop3_port
    );
    if !pop.contains("password") {
        text += &format!("password = {}\n", toml_str(PASSWORD));
    }
    let config = write_config(dir.path(), &text);
    migrate(&config);
    Setup {
        _dir: dir,
        db_path,
        config,
    }
}

/// The relay: only for a peer Dovecot logged a login for in the last `window` seconds.
fn relay(dovecot: &Dovecot, window: &str) -> SmtpServer {
    SmtpServer::start(&[
        "--pop-log",
        dovecot.log_path.to_str().unwrap(),
        "--pop-window",
        window,
        // Dovecot's log process may write the Login line a moment after the client's +OK.
        "--pop-grace",
        "0.5",
    ])
}

fn once(s: &Setup) -> std::process::Output {
    run_once(&s.config)
}

#[test]
fn mails_go_out_after_one_pop_login_over_stls_from_the_source_address() {
    if !dovecot_available("mails_go_out_after_one_pop_login") {
        return;
    }
    let dovecot = Dovecot::start(&[(USER, PASSWORD)]);
    let server = relay(&dovecot, "30");
    let s = setup(
        &dovecot,
        server.port,
        "tls = \"starttls\"\nvalid_for = \"60s\"",
        "source_address = \"127.0.0.2\"",
    );
    let db = Db::open(&s.db_path);
    let ids: Vec<i64> = (0..3)
        .map(|i| db.insert("a@example.com", &format!("m{i}"), "x"))
        .collect();
    once(&s);
    for id in &ids {
        assert_eq!(db.status(*id), "sent", "{}", db.row(*id));
    }
    assert_eq!(server.wait_for_messages(3, LONG).len(), 3);
    assert_eq!(
        dovecot.logins(USER),
        1,
        "one login serves every mail in the window:\n{}",
        dovecot.log()
    );
    assert_eq!(
        dovecot.login_rips(USER),
        vec!["127.0.0.2"],
        "the POP login comes from source_address"
    );
    assert!(
        dovecot.login_lines(USER)[0].contains("TLS"),
        "STLS was used: {}",
        dovecot.log()
    );
    dovecot.assert_every_session_quit(USER, 1, 0);
    assert!(server
        .relay_decisions()
        .iter()
        .all(|d| d["allowed"] == true && d["peer"] == "127.0.0.2"));
}

#[test]
fn the_login_is_repeated_after_valid_for_also_on_a_reused_connection() {
    if !dovecot_available("the_login_is_repeated_after_valid_for") {
        return;
    }
    let dovecot = Dovecot::start(&[(USER, PASSWORD)]);
    let server = relay(&dovecot, "60");
    let s = setup(
        &dovecot,
        server.port,
        "tls = \"none\"\nvalid_for = \"1s\"",
        "",
    );
    std::fs::write(
        &s.config,
        std::fs::read_to_string(&s.config)
            .unwrap()
            .replace("interval_ms = 0", "interval_ms = 1300"),
    )
    .unwrap();
    let db = Db::open(&s.db_path);
    for i in 0..3 {
        db.insert("a@example.com", &format!("m{i}"), "x");
    }
    once(&s);
    assert_eq!(server.wait_for_messages(3, LONG).len(), 3);
    assert_eq!(server.connections(), 1, "the SMTP connection is reused");
    assert_eq!(
        dovecot.logins(USER),
        3,
        "a login before each mail, as each came after valid_for:\n{}",
        dovecot.log()
    );
    dovecot.assert_every_session_quit(USER, 3, 0);
}

#[test]
fn relay_denied_logs_in_again_and_retries_once() {
    if !dovecot_available("relay_denied_logs_in_again_and_retries_once") {
        return;
    }
    let dovecot = Dovecot::start(&[(USER, PASSWORD)]);
    // The provider's window (1 s) is shorter than the client believes (60 s).
    let server = relay(&dovecot, "1");
    let s = setup(
        &dovecot,
        server.port,
        "tls = \"none\"\nvalid_for = \"60s\"",
        "",
    );
    std::fs::write(
        &s.config,
        std::fs::read_to_string(&s.config)
            .unwrap()
            .replace("interval_ms = 0", "interval_ms = 1600"),
    )
    .unwrap();
    let db = Db::open(&s.db_path);
    let a = db.insert("a@example.com", "first", "x");
    let b = db.insert("b@example.com", "second", "x");
    once(&s);
    assert_eq!(db.status(a), "sent");
    assert_eq!(db.status(b), "sent", "{}", db.row(b));
    let decisions = server.relay_decisions();
    let allowed: Vec<bool> = decisions
        .iter()
        .map(|d| d["allowed"].as_bool().unwrap())
        .collect();
    assert_eq!(allowed, vec![true, false, true], "{decisions:?}");
    assert_eq!(dovecot.logins(USER), 2);
    assert_eq!(server.wait_for_messages(2, LONG).len(), 2, "each mail once");
}

#[test]
fn a_wrong_pop_password_pauses_the_queue_with_the_servers_reply() {
    if !dovecot_available("a_wrong_pop_password_pauses_the_queue") {
        return;
    }
    let dovecot = Dovecot::start(&[(USER, PASSWORD)]);
    let server = relay(&dovecot, "30");
    let s = setup(
        &dovecot,
        server.port,
        "tls = \"none\"\npassword = \"wrong\"",
        "",
    );
    std::fs::write(
        &s.config,
        std::fs::read_to_string(&s.config)
            .unwrap()
            .replace("[log]\n", "[log]\nerror_language = \"ja\"\n"),
    )
    .unwrap();
    let db = Db::open(&s.db_path);
    let id = db.insert("a@example.com", "m", "x");
    once(&s);
    let row = db.row(id);
    assert_eq!(row["status"], "queued", "{row}");
    assert_eq!(row["attempts"], 0);
    assert_eq!(row["error_code"], "pop_login_failed");
    assert_eq!(
        row["last_error"],
        "POP認証に失敗しました (-ERR [AUTH] Authentication failed.)"
    );
    assert_eq!(db.query_one::<i64>("SELECT paused FROM queue_state"), 1);
    assert!(server.messages().is_empty());
    dovecot.assert_every_session_quit(USER, 0, 1);
}

#[test]
fn check_config_connect_and_test_send_show_each_step() {
    if !dovecot_available("check_config_connect_and_test_send_show_each_step") {
        return;
    }
    let dovecot = Dovecot::start(&[(USER, PASSWORD)]);
    let server = relay(&dovecot, "30");
    let s = setup(&dovecot, server.port, "tls = \"starttls\"", "");
    let out = run_mailqueue(&s.config, &["check-config", "--connect"]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for step in [
        "[ok] POP connect",
        "[ok] POP STLS",
        "[ok] POP login",
        "[ok] POP QUIT",
        "[ok] connect to 127.0.0.1",
        "[ok] QUIT",
    ] {
        assert!(text.contains(step), "missing {step:?}:\n{text}");
    }
    assert!(
        server.messages().is_empty(),
        "check-config --connect sends nothing"
    );
    let out = run_mailqueue(&s.config, &["test-send", "--to", "admin@example.org"]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success() && text.contains("Mail sent"), "{text}");

    // A wrong POP password: the POP login step says so and nothing else is tried.
    std::fs::write(
        &s.config,
        std::fs::read_to_string(&s.config)
            .unwrap()
            .replace(PASSWORD, "nope"),
    )
    .unwrap();
    let out = run_mailqueue(&s.config, &["check-config", "--connect"]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("[failed] POP login") && text.contains("-ERR [AUTH] Authentication failed."),
        "{text}"
    );
    assert!(
        !text.contains("connect to 127.0.0.1"),
        "SMTP is not tried after a failed POP login:\n{text}"
    );
}

/// At trace level, the POP password shows up nowhere: not in any output, not in the queue file.
#[test]
fn a_trace_level_pop_run_shows_no_pop_password() {
    if !dovecot_available("a_trace_level_pop_run_shows_no_pop_password") {
        return;
    }
    use base64::Engine;
    let dovecot = Dovecot::start(&[(USER, PASSWORD)]);
    let server = relay(&dovecot, "30");
    let s = setup(&dovecot, server.port, "tls = \"starttls\"", "");
    std::fs::write(
        &s.config,
        std::fs::read_to_string(&s.config)
            .unwrap()
            .replace("level = \"info\"", "level = \"trace\""),
    )
    .unwrap();
    Db::open(&s.db_path).insert("a@example.com", "m", "x");
    let mut all = Vec::new();
    for args in [
        &["check-config", "--connect"][..],
        &["run", "--once"],
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
    assert!(
        String::from_utf8_lossy(&all).contains("TRACE"),
        "the runs logged at trace level"
    );
    for f in [
        s.db_path.clone(),
        PathBuf::from(format!("{}-wal", s.db_path.display())),
    ] {
        if f.exists() {
            all.extend(std::fs::read(f).unwrap());
        }
    }
    let b64 = base64::engine::general_purpose::STANDARD.encode(PASSWORD);
    for needle in [PASSWORD, b64.as_str()] {
        assert!(
            !all.windows(needle.len()).any(|w| w == needle.as_bytes()),
            "{needle:?} leaked"
        );
    }
}

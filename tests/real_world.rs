//! Real-world account setups (issue 7, first part): a password from a command, a chosen AUTH
//! mechanism, XOAUTH2 with Gmail's failure sequence, and a staging redirect.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use support::*;

struct Setup {
    _dir: tempfile::TempDir,
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

fn with_auth(extra: &str) -> impl Fn(String) -> String {
    let extra = extra.to_string();
    move |t: String| {
        t.replace(
            "auth = false",
            &format!("auth = true\nuser = \"crm\"\n{extra}"),
        )
    }
}

fn once(s: &Setup) -> std::process::Output {
    let out = run_mailqueue(&s.config, &["run", "--once"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
fn a_staging_run_delivers_only_to_the_redirect_address() {
    let server = SmtpServer::start(NO_ARGS);
    let s = setup(server.port, |t| {
        t.replace(
            "[sender]\n",
            "[sender]\nredirect_all_to = \"qa@example.com\"\n",
        )
    });
    let db = Db::open(&s.db_path);
    let id = db.insert_cols(&[
        ("to_addrs", &"Customer <customer@example.org>"),
        ("cc_addrs", &"boss@example.org"),
        ("bcc_addrs", &"archive@example.org"),
        ("subject", &"quote"),
        ("body_text", &"x"),
    ]);
    let out = once(&s);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("STAGING MODE"),
        "the start says so loudly"
    );
    assert_eq!(db.status(id), "sent");
    let m = &server.wait_for_messages(1, std::time::Duration::from_secs(30))[0];
    assert_eq!(
        m.rcpt_tos,
        vec!["qa@example.com"],
        "only the redirect address gets it"
    );
    let original = m.header("X-Mailqueue-Original-Recipients").unwrap();
    for a in [
        "customer@example.org (to)",
        "boss@example.org (cc)",
        "archive@example.org (bcc)",
    ] {
        assert!(original.contains(a), "{a} missing in {original}");
    }
    assert_eq!(
        db.row(id)["to_addrs"],
        "Customer <customer@example.org>",
        "the row keeps its recipients"
    );
    assert!(server.messages().len() == 1);
}

#[test]
fn the_password_comes_from_a_command_and_its_failure_pauses_clearly() {
    let server = SmtpServer::start(&["--auth-user", "crm", "--auth-password", "secret"]);
    let s = setup(
        server.port,
        with_auth("password_command = \"printf 'secret\\\\nnot this line\\\\n'\""),
    );
    let db = Db::open(&s.db_path);
    let id = db.insert("a@example.com", "m", "x");
    once(&s);
    assert_eq!(db.status(id), "sent", "{}", db.row(id));

    let text = std::fs::read_to_string(&s.config).unwrap();
    let broken = text
        .lines()
        .map(|l| {
            if l.starts_with("password_command") {
                "password_command = \"echo oops >&2; exit 3\""
            } else {
                l
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(&s.config, broken).unwrap();
    let id = db.insert("a@example.com", "m2", "x");
    let out = once(&s);
    let row = db.row(id);
    assert_eq!(row["status"], "queued", "{row}");
    assert_eq!(row["error_code"], "password_command_failed");
    assert!(
        row["last_error"]
            .as_str()
            .unwrap()
            .contains("exit status: 3"),
        "{row}"
    );
    assert_eq!(
        db.query_one::<i64>("SELECT paused FROM queue_state"),
        1,
        "account-level: the queue pauses"
    );
    let all = format!(
        "{}{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        row
    );
    assert!(!all.contains("oops"), "the command's output is never shown");
}

#[test]
fn auth_mechanism_login_is_used_when_configured() {
    let server = SmtpServer::start(&[
        "--auth-user",
        "crm",
        "--auth-password",
        "secret",
        "--verbose",
    ]);
    let s = setup(
        server.port,
        with_auth("password = \"secret\"\nauth_mechanism = \"login\""),
    );
    let db = Db::open(&s.db_path);
    let id = db.insert("a@example.com", "m", "x");
    once(&s);
    assert_eq!(db.status(id), "sent");
    let log = server.log();
    assert!(
        log.contains("AUTH LOGIN") && !log.contains("AUTH PLAIN"),
        "{log}"
    );
}

/// A server that takes XOAUTH2 only with the current token and answers a stale one the way
/// Gmail does: `334 <base64 JSON>`, then — after the client's empty line — 535.
fn xoauth2_server(good_token: &'static str) -> (u16, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    std::thread::spawn(move || {
        for sock in listener.incoming() {
            let Ok(sock) = sock else { return };
            let log = log.clone();
            std::thread::spawn(move || {
                let mut w = sock.try_clone().unwrap();
                let mut r = BufReader::new(sock);
                let mut say = |s: &str| w.write_all(s.as_bytes()).unwrap();
                say("220 fake.gmail ESMTP\r\n");
                let mut line = String::new();
                while {
                    line.clear();
                    r.read_line(&mut line).unwrap_or(0) > 0
                } {
                    let cmd = line.trim_end().to_string();
                    log.lock().unwrap().push(cmd.clone());
                    let upper = cmd.to_ascii_uppercase();
                    if upper.starts_with("EHLO") {
                        say("250-fake.gmail\r\n250-AUTH LOGIN PLAIN XOAUTH2\r\n250 8BITMIME\r\n");
                    } else if let Some(b64) = cmd.strip_prefix("AUTH XOAUTH2 ") {
                        use base64::Engine;
                        let raw = base64::engine::general_purpose::STANDARD
                            .decode(b64)
                            .unwrap();
                        let text = String::from_utf8(raw).unwrap();
                        if text
                            == format!("user=crm@example.com\x01auth=Bearer {good_token}\x01\x01")
                        {
                            say("235 2.7.0 Accepted\r\n");
                        } else {
                            say("334 eyJzdGF0dXMiOiI0MDEiLCJzY2hlbWVzIjoiYmVhcmVyIn0=\r\n");
                            line.clear();
                            r.read_line(&mut line).unwrap();
                            log.lock().unwrap().push(format!("after 334: {:?}", line));
                            say("535-5.7.8 Username and Password not accepted.\r\n535 5.7.8 https://support.google.com/mail/?p=BadCredentials\r\n");
                        }
                    } else if upper.starts_with("DATA") {
                        say("354 go ahead\r\n");
                        let mut body = Vec::new();
                        loop {
                            let mut l = Vec::new();
                            r.by_ref().read_until(b'\n', &mut l).unwrap();
                            if l == b".\r\n" || l.is_empty() {
                                break;
                            }
                            body.extend(l);
                        }
                        say("250 2.0.0 OK queued\r\n");
                    } else if upper.starts_with("QUIT") {
                        say("221 bye\r\n");
                        return;
                    } else {
                        say("250 OK\r\n");
                    }
                }
            });
        }
    });
    (port, seen)
}

#[test]
fn xoauth2_with_gmails_failure_sequence() {
    let (port, seen) = xoauth2_server("ya29.good");
    let s = setup(port, |t| {
        t.replace("auth = false", "auth = true\nuser = \"crm@example.com\"\npassword_command = \"echo ya29.stale\"\nauth_mechanism = \"xoauth2\"")
    });
    let db = Db::open(&s.db_path);
    let id = db.insert("a@example.com", "m", "x");
    once(&s);
    let row = db.row(id);
    assert_eq!(row["error_code"], "auth_failed", "{row}");
    assert!(
        row["last_error"]
            .as_str()
            .unwrap()
            .contains("535 5.7.8 Username and Password not accepted."),
        "{row}"
    );
    assert!(
        seen.lock()
            .unwrap()
            .iter()
            .any(|l| l == "after 334: \"\\r\\n\""),
        "the client answered the challenge with an empty line: {:?}",
        seen.lock().unwrap()
    );
    // With the current token it goes through (and, after a pause, `resume` lets it).
    let t = std::fs::read_to_string(&s.config)
        .unwrap()
        .replace("ya29.stale", "ya29.good");
    std::fs::write(&s.config, t).unwrap();
    assert!(run_mailqueue(&s.config, &["resume"]).status.success());
    once(&s);
    assert_eq!(db.status(id), "sent", "{}", db.row(id));
}

#[test]
fn iso_2022_jp_mails_decode_with_a_real_mime_parser_and_fall_back_to_utf8() {
    let server = SmtpServer::start(NO_ARGS);
    let s = setup(server.port, |t| {
        t.replace("[sender]\n", "[sender]\ncharset = \"iso-2022-jp\"\n")
    });
    let db = Db::open(&s.db_path);
    let subject =
        "活動報告：株式会社サンプル訪問の件（長い件名は複数の encoded-word に分かれます）";
    let body = "本日の訪問結果を報告します。\n次回は来週火曜日です。\n";
    let jp = db.insert_cols(&[
        ("to_addrs", &"山田 太郎 <yamada@example.jp>"),
        ("subject", &subject),
        ("body_text", &body),
    ]);
    let emoji = db.insert_cols(&[
        ("to_addrs", &"a@example.com"),
        ("subject", &"お祝い 🎉"),
        ("body_text", &"おめでとう 🎉"),
    ]);
    let out = once(&s);
    assert_eq!(db.status(jp), "sent");
    assert_eq!(db.status(emoji), "sent");
    let msgs = server.wait_for_messages(2, std::time::Duration::from_secs(30));
    let m = &msgs[0];
    let raw = String::from_utf8(m.raw.clone()).expect("7bit");
    assert!(
        raw.is_ascii() && raw.to_ascii_lowercase().contains("charset=iso-2022-jp"),
        "{raw}"
    );
    assert_eq!(m.subject().as_deref(), Some(subject));
    assert_eq!(m.from_name().as_deref(), Some("CRM 通知"));
    let parsed = m.parsed();
    let to = parsed.to().unwrap().first().unwrap();
    assert_eq!(to.name(), Some("山田 太郎"));
    assert_eq!(m.body_text().unwrap().replace("\r\n", "\n").trim_end(), body.trim_end());
    // A character ISO-2022-JP cannot carry: the mail goes out in UTF-8, and the log says so.
    let e = &msgs[1];
    assert!(String::from_utf8_lossy(&e.raw)
        .to_ascii_lowercase()
        .contains("charset=utf-8"));
    assert_eq!(e.subject().as_deref(), Some("お祝い 🎉"));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("instead of ISO-2022-JP"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

//! Real-world account setups (issue 7): a password from a command, a chosen AUTH mechanism, a
//! staging redirect, ISO-2022-JP, attachments and thread headers. XOAUTH2 (with a token from a
//! command or from `[smtp.oauth2]`) is in tests/oauth2.rs.

mod support;

use std::path::PathBuf;

use mail_parser::MimeHeaders;
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
    run_once(&s.config)
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
    assert_eq!(
        m.body_text().unwrap().replace("\r\n", "\n").trim_end(),
        body.trim_end()
    );
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

#[test]
fn attachments_and_thread_headers_arrive_intact() {
    let server = SmtpServer::start(NO_ARGS);
    let files = tempfile::tempdir().unwrap();
    std::fs::write(files.path().join("見積書.csv"), "品目,金額\n保守,10000\n").unwrap();
    let dir = files.path().to_str().unwrap().to_string();
    let s = setup(server.port, move |t| {
        t.replace(
            "[queue]\n",
            &format!(
                "[queue]\nattachments_dir = {}\nmax_message_size = 20000\n",
                toml_str(&dir)
            ),
        )
    });
    let db = Db::open(&s.db_path);
    let pdf: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
    db.execute("BEGIN IMMEDIATE");
    let id = db.insert_cols(&[
        ("to_addrs", &"a@example.com"),
        ("subject", &"活動報告"),
        ("body_text", &"添付をご確認ください。"),
        ("body_html", &"<p>添付をご確認ください。</p>"),
        ("headers", &"In-Reply-To: <report-41@crm.example.com>\nReferences: <report-40@crm.example.com> <report-41@crm.example.com>\nX-CRM-Activity: 12345"),
    ]);
    db.conn
        .execute(
            "INSERT INTO mail_attachment (mail_id, file_name, content_type, content) VALUES (?1, '報告書 2026年12月.pdf', 'application/pdf', ?2)",
            rusqlite::params![id, pdf],
        )
        .unwrap();
    db.conn
        .execute(
            "INSERT INTO mail_attachment (mail_id, file_name, content_type, path) VALUES (?1, '見積書.csv', 'text/csv; charset=utf-8', '見積書.csv')",
            rusqlite::params![id],
        )
        .unwrap();
    db.execute("COMMIT");
    // Rows that must fail, with a reason: a header not allowed, a path outside the directory,
    // attachments over max_message_size.
    let bad_header = db.insert_cols(&[
        ("to_addrs", &"a@example.com"),
        ("subject", &"s"),
        ("headers", &"Bcc: evil@example.com"),
    ]);
    let outside = db.insert_cols(&[("to_addrs", &"a@example.com"), ("subject", &"s")]);
    db.conn
        .execute("INSERT INTO mail_attachment (mail_id, file_name, path) VALUES (?1, 'passwd', '../../../../etc/passwd')", rusqlite::params![outside])
        .unwrap();
    let big = db.insert_cols(&[("to_addrs", &"a@example.com"), ("subject", &"s")]);
    db.conn
        .execute("INSERT INTO mail_attachment (mail_id, file_name, content) VALUES (?1, 'big.bin', zeroblob(30000))", rusqlite::params![big])
        .unwrap();
    once(&s);
    assert_eq!(db.status(id), "sent", "{}", db.row(id));
    assert_eq!(db.row(bad_header)["error_code"], "invalid_row");
    assert!(db.row(bad_header)["last_error"]
        .as_str()
        .unwrap()
        .contains("\"Bcc\" is not allowed"));
    assert!(
        db.row(outside)["last_error"]
            .as_str()
            .unwrap()
            .contains("outside attachments_dir"),
        "{}",
        db.row(outside)
    );
    assert_eq!(db.row(big)["error_code"], "too_large");
    let msgs = server.wait_for_messages(1, std::time::Duration::from_secs(30));
    assert_eq!(msgs.len(), 1);
    let m = msgs[0].parsed();
    assert_eq!(m.in_reply_to().as_text(), Some("report-41@crm.example.com"));
    assert_eq!(msgs[0].header("X-CRM-Activity").as_deref(), Some("12345"));
    let names: Vec<String> = m
        .attachments()
        .map(|a| a.attachment_name().unwrap_or("").to_string())
        .collect();
    assert_eq!(names, vec!["報告書 2026年12月.pdf", "見積書.csv"]);
    let first = m.attachments().next().unwrap();
    assert_eq!(first.contents(), pdf.as_slice());
    assert_eq!(
        m.body_html(0).unwrap().trim(),
        "<p>添付をご確認ください。</p>"
    );
    assert!(
        String::from_utf8_lossy(&msgs[0].raw).contains("filename*"),
        "RFC 2231 file names"
    );

    // The CLI attaches files too.
    let f = files.path().join("note.txt");
    std::fs::write(&f, "hello").unwrap();
    let out = run_mailqueue(
        &s.config,
        &[
            "enqueue",
            "--to",
            "b@example.com",
            "--subject",
            "s",
            "--body",
            "b",
            "--attach",
            f.to_str().unwrap(),
            "--header",
            "X-CRM-Id: 7",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    once(&s);
    let msgs = server.wait_for_messages(2, std::time::Duration::from_secs(30));
    let m = msgs[1].parsed();
    assert_eq!(m.attachments().next().unwrap().contents(), b"hello");
    assert_eq!(msgs[1].header("X-CRM-Id").as_deref(), Some("7"));
}

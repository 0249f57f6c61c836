//! SMTP PIPELINING (RFC 2920, issue 6): with a server that offers it, MAIL, the RCPTs and DATA
//! reach it in one write; without it, one command at a time; the rows come out the same either
//! way, also when the transaction ends early; over STARTTLS only the post-TLS EHLO counts.
//!
//! Most tests use a scripted server of ours (below): it records which of its socket reads each
//! command arrived in, which no real server reports. smtp-sink (which offers PIPELINING) checks
//! that a real server takes what we send.

mod support;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::*;
use tempfile::TempDir;

const LONG: Duration = Duration::from_secs(30);

/// What the scripted server offers and answers. By default: a plain ESMTP server that accepts
/// everything and, like Postfix, answers DATA with 554 when no recipient was accepted and
/// RCPT/DATA with 503 after a refused MAIL.
#[derive(Clone, Default)]
struct Script {
    /// EHLO keywords (on a plaintext session, and before STARTTLS).
    ehlo: Vec<&'static str>,
    /// STARTTLS: the TLS config and the EHLO keywords after it (STARTTLS must be in `ehlo`).
    tls: Option<(Arc<rustls::ServerConfig>, Vec<&'static str>)>,
    /// The reply to the first MAIL of the server's life instead of 250.
    first_mail: Option<&'static str>,
    /// Recipients containing the first string are answered with the second.
    refuse: Vec<(&'static str, &'static str)>,
    /// Answer DATA with 354 even when no recipient was accepted (RFC 2920 allows it).
    data_without_rcpt: bool,
    /// After the first message of a connection, send this line (unless empty) and hang up, as a
    /// server whose idle timeout struck while the client kept the connection.
    hang_up: Option<&'static str>,
}

/// What one connection brought.
#[derive(Debug, Default, Clone)]
struct Conn {
    /// Each command line (message lines excluded) with the number of the socket read that
    /// brought it: commands sent in one write share a number.
    commands: Vec<(usize, String)>,
    /// The messages between 354 and the "." line, as received.
    messages: Vec<Vec<u8>>,
    /// For each message, how many socket reads brought it, its final "." included.
    message_reads: Vec<usize>,
}

impl Conn {
    /// The commands' verbs grouped by the read that brought them, e.g.
    /// `[["EHLO"], ["EHLO"], ["MAIL", "RCPT", "DATA"], ["QUIT"]]`.
    fn groups(&self) -> Vec<Vec<String>> {
        let mut out: Vec<Vec<String>> = Vec::new();
        let mut last = None;
        for (read, line) in &self.commands {
            let verb = line.split_whitespace().next().unwrap_or("").to_uppercase();
            if last == Some(*read) {
                out.last_mut().unwrap().push(verb);
            } else {
                out.push(vec![verb]);
                last = Some(*read);
            }
        }
        out
    }
}

/// `g(&["MAIL RCPT DATA", "QUIT"])` → `[["MAIL", "RCPT", "DATA"], ["QUIT"]]`.
fn g(groups: &[&str]) -> Vec<Vec<String>> {
    groups
        .iter()
        .map(|s| s.split_whitespace().map(String::from).collect())
        .collect()
}

/// The scripted server on 127.0.0.1, serving connections one after the other on a thread.
struct Scripted {
    port: u16,
    conns: Arc<Mutex<Vec<Conn>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Scripted {
    fn start(script: Script) -> Scripted {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let conns = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (c, s) = (conns.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mails = AtomicUsize::new(0);
            while !s.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((sock, _)) => {
                        let mut conn = Conn::default();
                        let _ = serve(sock, &script, &mails, &mut conn);
                        c.lock().unwrap().push(conn);
                    }
                    Err(_) => std::thread::sleep(POLL),
                }
            }
        });
        Scripted {
            port,
            conns,
            stop,
            thread: Some(thread),
        }
    }

    /// Stops the server (the client must be done) and returns its connections.
    fn finish(mut self) -> Vec<Conn> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.take().unwrap().join().unwrap();
        self.conns.lock().unwrap().clone()
    }
}

impl Drop for Scripted {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

trait Io: Read + Write {}
impl<T: Read + Write> Io for T {}

/// One session: answers line by line, in order, as the lines come.
fn serve(
    sock: TcpStream,
    script: &Script,
    mails: &AtomicUsize,
    conn: &mut Conn,
) -> std::io::Result<()> {
    sock.set_nonblocking(false)?;
    sock.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut io: Box<dyn Io> = Box::new(sock.try_clone()?);
    let mut encrypted = false;
    io.write_all(b"220 scripted ESMTP\r\n")?;
    let (mut pending, mut reads) = (Vec::<u8>::new(), 0usize);
    let (mut mail_ok, mut accepted, mut data) = (false, 0, None::<Vec<u8>>);
    let mut first_read = None::<usize>;
    loop {
        while let Some(end) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            if let Some(message) = &mut data {
                if line == b".\r\n" {
                    conn.messages.push(std::mem::take(message));
                    conn.message_reads
                        .push(first_read.take().map_or(1, |first| reads - first + 1));
                    data = None;
                    let reply = if accepted > 0 {
                        "250 2.0.0 Ok: queued"
                    } else {
                        "554 5.5.1 Error: no valid recipients"
                    };
                    io.write_all(format!("{reply}\r\n").as_bytes())?;
                    (mail_ok, accepted) = (false, 0);
                    if let Some(last) = script.hang_up {
                        if !last.is_empty() {
                            io.write_all(format!("{last}\r\n").as_bytes())?;
                        }
                        return Ok(());
                    }
                } else {
                    first_read.get_or_insert(reads);
                    message.extend_from_slice(&line);
                }
                continue;
            }
            let text = String::from_utf8_lossy(&line).trim_end().to_string();
            conn.commands.push((reads, text.clone()));
            let verb = text.split_whitespace().next().unwrap_or("").to_uppercase();
            let reply = match verb.as_str() {
                "EHLO" => {
                    let keywords = match (&script.tls, encrypted) {
                        (Some((_, after)), true) => after,
                        _ => &script.ehlo,
                    };
                    let mut r = String::from("250-scripted\r\n");
                    for k in keywords {
                        r.push_str(&format!("250-{k}\r\n"));
                    }
                    r.push_str("250 8BITMIME");
                    r
                }
                "STARTTLS" => "220 2.0.0 Ready to start TLS".into(),
                "MAIL" => match script.first_mail {
                    Some(r) if mails.fetch_add(1, Ordering::SeqCst) == 0 => r.into(),
                    _ => {
                        mail_ok = true;
                        "250 2.1.0 Ok".into()
                    }
                },
                "RCPT" if !mail_ok => "503 5.5.1 Error: need MAIL command".into(),
                "RCPT" => match script.refuse.iter().find(|(s, _)| text.contains(s)) {
                    Some((_, r)) => r.to_string(),
                    None => {
                        accepted += 1;
                        "250 2.1.5 Ok".into()
                    }
                },
                "DATA" if !mail_ok => "503 5.5.1 Error: need RCPT command".into(),
                "DATA" if accepted == 0 && !script.data_without_rcpt => {
                    "554 5.5.1 Error: no valid recipients".into()
                }
                "DATA" => {
                    data = Some(Vec::new());
                    "354 End data with <CR><LF>.<CR><LF>".into()
                }
                "RSET" => {
                    (mail_ok, accepted) = (false, 0);
                    "250 2.0.0 Ok".into()
                }
                "QUIT" => "221 2.0.0 Bye".into(),
                _ => "502 5.5.2 Error: command not recognized".into(),
            };
            io.write_all(format!("{reply}\r\n").as_bytes())?;
            match verb.as_str() {
                "QUIT" => return Ok(()),
                "STARTTLS" => {
                    let (cfg, _) = script.tls.as_ref().expect("STARTTLS not scripted");
                    let tls = rustls::ServerConnection::new(cfg.clone()).unwrap();
                    io = Box::new(rustls::StreamOwned::new(tls, sock.try_clone()?));
                    encrypted = true;
                }
                _ => {}
            }
        }
        let mut buf = [0u8; 65536];
        let n = io.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        reads += 1;
        pending.extend_from_slice(&buf[..n]);
    }
}

/// A queue and a config for the scripted server (or any server on `port`).
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
}

/// A mail's row as far as the outcome goes, and its recipients' rows.
fn outcome(db: &Db, id: i64) -> serde_json::Value {
    let row = db.row(id);
    serde_json::json!({
        "status": row["status"],
        "error_code": row["error_code"],
        "last_error": row["last_error"],
        "attempts": row["attempts"],
        "recipients": db.rows_with(
            "SELECT address, status, smtp_reply FROM mail_recipient WHERE mail_id = ?1 ORDER BY id",
            [id],
        ),
    })
}

/// Runs `run --once` for a mail to `to` followed by one to ok@example.com against `script`,
/// with `pipelining` offered or not; returns the first mail's outcome and the one connection.
/// The second mail must be sent on the same connection: the session stayed in step.
fn two_mails(mut script: Script, pipelining: bool, to: &str) -> (serde_json::Value, Conn) {
    if pipelining {
        script.ehlo.push("PIPELINING");
    }
    let server = Scripted::start(script);
    let s = Setup::new(server.port, |t| t);
    let db = s.db();
    let first = db.insert(to, "first", "the first mail");
    let second = db.insert("ok@example.com", "second", "the second mail");
    run_once(&s.config);
    let conns = server.finish();
    assert_eq!(conns.len(), 1, "one connection for both mails: {conns:?}");
    let conn = conns.into_iter().next().unwrap();
    assert_eq!(db.status(second), "sent", "{conn:?}");
    assert!(
        conn.messages
            .last()
            .is_some_and(|m| String::from_utf8_lossy(m).contains("the second mail")),
        "{conn:?}"
    );
    let last = conn.commands.last().map(|(_, c)| c.as_str());
    assert_eq!(last, Some("QUIT"), "ended with QUIT: {conn:?}");
    (outcome(&db, first), conn)
}

#[test]
fn mail_rcpt_and_data_go_out_in_one_write_when_pipelining_is_offered() {
    let server = Scripted::start(Script {
        ehlo: vec!["PIPELINING", "SIZE 10240000"],
        ..Script::default()
    });
    let s = Setup::new(server.port, |t| t);
    let db = s.db();
    let a = db.insert("a@example.com, b@example.com", "two", "to two");
    let b = db.insert("c@example.com", "one", "to one");
    run_once(&s.config);
    let conns = server.finish();
    assert_eq!(conns.len(), 1);
    assert_eq!(
        conns[0].groups(),
        g(&[
            "EHLO",
            "EHLO",
            "MAIL RCPT RCPT DATA",
            "MAIL RCPT DATA",
            "QUIT"
        ]),
        "{:?}",
        conns[0].commands
    );
    let lines: Vec<&str> = conns[0].commands[2..6]
        .iter()
        .map(|(_, l)| l.as_str())
        .collect();
    assert_eq!(
        lines,
        [
            "MAIL FROM:<crm@example.com>",
            "RCPT TO:<a@example.com>",
            "RCPT TO:<b@example.com>",
            "DATA"
        ]
    );
    assert_eq!(db.status(a), "sent");
    assert_eq!(db.status(b), "sent");
    assert_eq!(conns[0].messages.len(), 2);
    assert!(String::from_utf8_lossy(&conns[0].messages[0]).contains("to two"));
    // The message and its final "." in one write too. (lettre's `message` writes them apart;
    // the server then usually needs a second read for the ".", though not always: a slow
    // reader can find both waiting.)
    assert_eq!(conns[0].message_reads, [1, 1], "{conns:?}");
}

#[test]
fn without_pipelining_each_command_waits_for_its_reply() {
    let server = Scripted::start(Script {
        ehlo: vec!["SIZE 10240000"],
        ..Script::default()
    });
    let s = Setup::new(server.port, |t| t);
    let db = s.db();
    let a = db.insert("a@example.com, b@example.com", "two", "to two");
    run_once(&s.config);
    let conns = server.finish();
    assert_eq!(
        conns[0].groups(),
        g(&["EHLO", "EHLO", "MAIL", "RCPT", "RCPT", "DATA", "QUIT"]),
        "{:?}",
        conns[0].commands
    );
    assert_eq!(db.status(a), "sent");
}

/// A group longer than 4096 bytes (RFC 2920's "usually 4K" TCP window) is not pipelined.
#[test]
fn a_mail_to_very_many_recipients_goes_one_command_at_a_time() {
    let server = Scripted::start(Script {
        ehlo: vec!["PIPELINING"],
        ..Script::default()
    });
    let s = Setup::new(server.port, |t| {
        t.replace("[queue]\n", "[queue]\nmax_recipients = 200\n")
    });
    let db = s.db();
    let to: Vec<String> = (100..250).map(|i| format!("r{i}@example.com")).collect();
    let id = db.insert(&to.join(", "), "many", "x");
    run_once(&s.config);
    let conns = server.finish();
    assert_eq!(db.status(id), "sent", "{:?}", db.row(id));
    let mut expected = vec!["EHLO", "EHLO", "MAIL"];
    expected.extend(["RCPT"; 150]);
    expected.extend(["DATA", "QUIT"]);
    assert_eq!(conns[0].groups(), g(&expected));
}

#[test]
fn one_refused_recipient_of_two_is_recorded_alike_pipelined_or_not() {
    let script = Script {
        refuse: vec![("nobody", "550 5.1.1 <nobody@example.com>: User unknown")],
        ..Script::default()
    };
    let to = "a@example.com, nobody@example.com";
    let (plain, c) = two_mails(script.clone(), false, to);
    assert_eq!(
        c.groups(),
        g(&["EHLO", "EHLO", "MAIL", "RCPT", "RCPT", "DATA", "MAIL", "RCPT", "DATA", "QUIT"])
    );
    let (piped, c) = two_mails(script, true, to);
    assert_eq!(
        c.groups(),
        g(&[
            "EHLO",
            "EHLO",
            "MAIL RCPT RCPT DATA",
            "MAIL RCPT DATA",
            "QUIT"
        ])
    );
    assert_eq!(piped, plain);
    assert_eq!(piped["status"], "sent", "{piped}");
    assert_eq!(piped["error_code"], "partly_refused", "{piped}");
    assert_eq!(piped["recipients"][0]["status"], "sent", "{piped}");
    assert_eq!(piped["recipients"][1]["status"], "failed", "{piped}");
    assert!(piped["recipients"][1]["smtp_reply"]
        .as_str()
        .unwrap()
        .starts_with("550 5.1.1"));
}

#[test]
fn all_recipients_refused_and_data_refused_resets_and_goes_on() {
    let script = Script {
        refuse: vec![("nobody", "550 5.1.1 <nobody@example.com>: User unknown")],
        ..Script::default()
    };
    let (plain, c) = two_mails(script.clone(), false, "nobody@example.com");
    assert_eq!(
        c.groups(),
        g(&["EHLO", "EHLO", "MAIL", "RCPT", "RSET", "MAIL", "RCPT", "DATA", "QUIT"])
    );
    let (piped, c) = two_mails(script, true, "nobody@example.com");
    assert_eq!(
        c.groups(),
        g(&[
            "EHLO",
            "EHLO",
            "MAIL RCPT DATA",
            "RSET",
            "MAIL RCPT DATA",
            "QUIT"
        ])
    );
    assert_eq!(c.messages.len(), 1, "only the second mail: {c:?}");
    assert_eq!(piped, plain);
    assert_eq!(piped["status"], "failed", "{piped}");
    assert_eq!(piped["error_code"], "recipient_refused", "{piped}");
}

#[test]
fn all_recipients_refused_and_data_accepted_ends_it_with_a_lone_dot() {
    let script = Script {
        refuse: vec![("nobody", "550 5.1.1 <nobody@example.com>: User unknown")],
        data_without_rcpt: true,
        ..Script::default()
    };
    let (plain, _) = two_mails(script.clone(), false, "nobody@example.com");
    let (piped, c) = two_mails(script, true, "nobody@example.com");
    assert_eq!(
        c.groups(),
        g(&[
            "EHLO",
            "EHLO",
            "MAIL RCPT DATA",
            "RSET",
            "MAIL RCPT DATA",
            "QUIT"
        ])
    );
    assert_eq!(c.messages.len(), 2, "{c:?}");
    assert_eq!(
        c.messages[0], b"",
        "the 354 is ended with a lone \".\", no message"
    );
    assert_eq!(piped, plain);
    assert_eq!(piped["status"], "failed", "{piped}");
    assert_eq!(piped["error_code"], "recipient_refused", "{piped}");
}

#[test]
fn a_refused_mail_from_reads_the_rest_of_the_group_and_goes_on() {
    let script = Script {
        first_mail: Some("552 5.3.4 Message size exceeds fixed limit"),
        ..Script::default()
    };
    let to = "a@example.com, b@example.com";
    let (plain, c) = two_mails(script.clone(), false, to);
    assert_eq!(
        c.groups(),
        g(&["EHLO", "EHLO", "MAIL", "RSET", "MAIL", "RCPT", "DATA", "QUIT"])
    );
    let (piped, c) = two_mails(script, true, to);
    assert_eq!(
        c.groups(),
        g(&[
            "EHLO",
            "EHLO",
            "MAIL RCPT RCPT DATA",
            "RSET",
            "MAIL RCPT DATA",
            "QUIT"
        ])
    );
    assert_eq!(c.messages.len(), 1, "{c:?}");
    assert_eq!(piped, plain);
    assert_eq!(piped["status"], "failed", "{piped}");
    assert_eq!(piped["error_code"], "message_refused", "{piped}");
    assert!(
        !piped.to_string().contains("503"),
        "the discarded RCPT/DATA replies count for nothing: {piped}"
    );
}

/// A kept connection the server closed (silently, or with a 421 first) is found so by the
/// pipelined group's first reply, and the mail goes out on a fresh connection, in one attempt.
#[test]
fn a_kept_connection_the_server_closed_is_replaced_by_a_fresh_one() {
    for hang_up in ["", "421 4.4.2 scripted: idle timeout, closing"] {
        let server = Scripted::start(Script {
            ehlo: vec!["PIPELINING"],
            hang_up: Some(hang_up),
            ..Script::default()
        });
        let s = Setup::new(server.port, |t| t);
        let db = s.db();
        let a = db.insert("a@example.com", "first", "x");
        let b = db.insert("b@example.com", "second", "y");
        run_once(&s.config);
        let conns = server.finish();
        for id in [a, b] {
            let row = db.row(id);
            assert_eq!(row["status"], "sent", "{hang_up:?}: {row}");
            assert_eq!(row["attempts"], 1, "{hang_up:?}: {row}");
        }
        assert_eq!(conns.len(), 2, "{hang_up:?}: {conns:?}");
        assert_eq!(conns[0].groups(), g(&["EHLO", "EHLO", "MAIL RCPT DATA"]));
        assert_eq!(conns[1].messages.len(), 1, "{hang_up:?}: {conns:?}");
        assert!(String::from_utf8_lossy(&conns[1].messages[0]).contains("second"));
    }
}

/// Over STARTTLS the pre-TLS EHLO may have been rewritten by anyone on the path (RFC 3207): only
/// the reply to the EHLO sent over TLS decides, both ways.
#[test]
fn over_starttls_the_post_tls_ehlo_decides() {
    let ca = TestCa::new();
    for (before, after, expected) in [
        (
            vec!["STARTTLS", "PIPELINING"],
            vec![],
            g(&["EHLO", "STARTTLS", "EHLO", "MAIL", "RCPT", "DATA", "QUIT"]),
        ),
        (
            vec!["STARTTLS"],
            vec!["PIPELINING"],
            g(&["EHLO", "STARTTLS", "EHLO", "MAIL RCPT DATA", "QUIT"]),
        ),
    ] {
        let server = Scripted::start(Script {
            ehlo: before.clone(),
            tls: Some((ca.rustls_server_config(), after.clone())),
            ..Script::default()
        });
        let ca_file = toml_str(ca.ca_pem_path.to_str().unwrap());
        let s = Setup::new(server.port, |t| {
            t.replace("tls = \"none\"", "tls = \"starttls\"")
                .replace("[smtp]\n", &format!("[smtp]\nca_file = {ca_file}\n"))
        });
        let db = s.db();
        let id = db.insert("a@example.com", "tls", "over TLS");
        run_once(&s.config);
        let conns = server.finish();
        assert_eq!(db.status(id), "sent", "{:?}", db.row(id));
        assert_eq!(
            conns[0].groups(),
            expected,
            "before TLS {before:?}, after {after:?}: {:?}",
            conns[0].commands
        );
    }
}

/// smtp-sink (issue 6's benchmark server) offers PIPELINING, and takes what we pipeline.
#[test]
fn smtp_sink_takes_pipelined_mails() {
    let sink = SmtpSink::start(NO_ARGS);
    let (mut raw, _) = RawSmtp::connect(sink.port);
    assert!(
        raw.cmd("EHLO probe.test").contains("PIPELINING"),
        "smtp-sink offers PIPELINING"
    );
    raw.cmd("QUIT");
    let s = Setup::new(sink.port, |t| t);
    let db = s.db();
    let ids: Vec<i64> = (0..3)
        .map(|i| db.insert(&format!("a{i}@example.com, b{i}@example.com"), "s", "x"))
        .collect();
    run_once(&s.config);
    for id in &ids {
        assert_eq!(db.status(*id), "sent", "{:?}", db.row(*id));
    }
    let msgs = sink.wait_for_messages(3, LONG);
    let mut rcpts: Vec<Vec<String>> = msgs.iter().map(|m| m.rcpt_tos.clone()).collect();
    rcpts.sort();
    assert_eq!(
        rcpts,
        (0..3)
            .map(|i| vec![format!("a{i}@example.com"), format!("b{i}@example.com")])
            .collect::<Vec<_>>()
    );
}

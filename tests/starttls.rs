//! STARTTLS safety (issue 5.4): plaintext a server sends in the same packet as its STARTTLS
//! reply (the "response injection" attack on buffered plaintext) makes the client abort before
//! TLS, and nothing — no AUTH, no mail — is sent. The fake server is ours on purpose: no real
//! server misbehaves this way.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::time::Duration;

use support::*;

#[test]
fn plaintext_injected_after_the_starttls_reply_aborts_the_session() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let (sock, _) = listener.accept().unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut w = sock.try_clone().unwrap();
        let mut r = BufReader::new(sock);
        let mut line = String::new();
        w.write_all(b"220 fake ESMTP\r\n").unwrap();
        r.read_line(&mut line).unwrap(); // EHLO
        w.write_all(b"250-fake\r\n250-AUTH PLAIN\r\n250 STARTTLS\r\n")
            .unwrap();
        line.clear();
        r.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "STARTTLS");
        // The attack: more replies in the same write as the 220.
        w.write_all(b"220 Go ahead\r\n250-injected\r\n250 AUTH PLAIN LOGIN\r\n")
            .unwrap();
        // Everything the client sends afterwards (a TLS ClientHello, AUTH, MAIL ...) until it hangs up.
        let mut rest = Vec::new();
        let _ = r.read_to_end(&mut rest);
        rest
    });
    let dir = tempfile::tempdir().unwrap();
    let db_path = dir.path().join("queue.db");
    let cfg = base_config(&db_path, port)
        .replace("tls = \"none\"", "tls = \"starttls\"")
        .replace(
            "auth = false",
            "auth = true\nuser = \"crm\"\npassword = \"secret\"",
        );
    let config = write_config(dir.path(), &cfg);
    migrate(&config);
    let db = Db::open(&db_path);
    let id = db.insert("a@example.com", "s", "b");
    let out = run_mailqueue(&config, &["run", "--once"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let row = db.row(id);
    assert_eq!(row["status"], "queued", "{row}");
    assert_eq!(row["error_code"], "tls_failed");
    assert!(
        row["last_error"]
            .as_str()
            .unwrap()
            .contains("STARTTLS response injection"),
        "{row}"
    );
    let rest = server.join().unwrap();
    assert!(
        rest.is_empty(),
        "the client sent {} bytes after the injected reply: {:?}",
        rest.len(),
        String::from_utf8_lossy(&rest)
    );
}

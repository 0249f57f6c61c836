//! `[smtp.oauth2]` end to end (issue 7): a local OAuth2 token endpoint of ours (the
//! refresh-token grant, with optional rotation and RFC 6749 errors) and an SMTP server that takes
//! XOAUTH2 only with a token the endpoint issued and has not revoked, answering any other the way
//! Gmail does (`334 <base64 JSON>`, an empty line from the client, then 535). They prove the
//! refresh, the cache, the expiry, the rotation written back, the one retry with a fresh token,
//! and the account-level pause when no token can be had.

mod support;

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use support::*;

const USER: &str = "crm@example.com";
const CLIENT_ID: &str = "1234-crm.apps.example";
const CLIENT_SECRET: &str = "cl1ent-S3cret-0auth";
const FIRST_REFRESH: &str = "1//refresh-T0ken-0";

/// What the provider (token endpoint and SMTP server) does and saw.
#[derive(Default)]
struct Provider {
    /// The refresh token the endpoint accepts now.
    refresh: String,
    /// Issue a new refresh token with every access token (as Microsoft does).
    rotate: bool,
    /// `expires_in` of the access tokens.
    expires_in: u64,
    /// Answer every token request with this status and JSON instead.
    refuse: Option<(u16, String)>,
    /// Revoke the access token once a message was accepted with it.
    revoke_after_mail: bool,
    /// The SMTP server takes no token at all (a wrong user, SMTP AUTH off for the mailbox).
    refuse_all: bool,
    /// Access tokens issued so far.
    issued: u32,
    /// Access tokens the SMTP server takes.
    valid: HashSet<String>,
    /// The token requests' form fields, in order.
    requests: Vec<HashMap<String, String>>,
    /// The SMTP side: commands, decoded XOAUTH2 tokens and replies, in order.
    smtp: Vec<String>,
    /// Messages accepted.
    accepted: u32,
}

type Shared = Arc<Mutex<Provider>>;

fn provider(rotate: bool, expires_in: u64) -> Shared {
    Arc::new(Mutex::new(Provider {
        refresh: FIRST_REFRESH.into(),
        rotate,
        expires_in,
        ..Provider::default()
    }))
}

/// The token endpoint: `POST /token`, form-encoded, HTTP/1.1, one request per connection; over
/// TLS with `tls = Some((cert, key))` (PEM files).
fn token_endpoint(p: Shared, tls: Option<(PathBuf, PathBuf)>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let tls = tls.map(|(cert, key)| rustls_server_config(&cert, &key));
    std::thread::spawn(move || {
        for sock in listener.incoming() {
            let Ok(sock) = sock else { return };
            match &tls {
                Some(cfg) => {
                    let conn = rustls::ServerConnection::new(cfg.clone()).unwrap();
                    answer(rustls::StreamOwned::new(conn, sock), &p);
                }
                None => answer(sock, &p),
            }
        }
    });
    port
}

/// One token request and its answer.
fn answer<S: Read + Write>(sock: S, p: &Shared) {
    let mut r = BufReader::new(sock);
    let mut len = 0;
    let mut line = String::new();
    loop {
        line.clear();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            // A client that gave up (e.g. on our certificate).
            return;
        }
        if line == "\r\n" {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().unwrap();
        }
    }
    let mut body = vec![0; len];
    r.read_exact(&mut body).unwrap();
    let form: HashMap<String, String> =
        reqwest::Url::parse(&format!("http://x/?{}", String::from_utf8(body).unwrap()))
            .unwrap()
            .query_pairs()
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
    let (status, json) = {
        let mut p = p.lock().unwrap();
        p.requests.push(form.clone());
        if let Some(refusal) = p.refuse.clone() {
            refusal
        } else if form.get("grant_type").map(String::as_str) != Some("refresh_token")
            || form.get("client_id").map(String::as_str) != Some(CLIENT_ID)
            || form.get("client_secret").map(String::as_str) != Some(CLIENT_SECRET)
        {
            (401, r#"{"error":"invalid_client"}"#.to_string())
        } else if form.get("refresh_token") != Some(&p.refresh) {
            (
                400,
                r#"{"error":"invalid_grant","error_description":"Token has been expired or revoked."}"#
                    .to_string(),
            )
        } else {
            p.issued += 1;
            let access = format!("ya29.access-{}", p.issued);
            p.valid.insert(access.clone());
            let mut json = format!(
                r#"{{"access_token":"{access}","token_type":"Bearer","expires_in":{},"scope":"https://mail.google.com/""#,
                p.expires_in
            );
            if p.rotate {
                p.refresh = format!("1//refresh-T0ken-{}", p.issued);
                json += &format!(r#","refresh_token":"{}""#, p.refresh);
            }
            (200, json + "}")
        }
    };
    let w = r.get_mut();
    let _ = write!(
        w,
        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{json}",
        json.len()
    );
    let _ = w.flush();
}

/// The SMTP server: XOAUTH2 with a valid token, Gmail's failure sequence for any other.
fn smtp_server(p: Shared) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for sock in listener.incoming() {
            let Ok(sock) = sock else { return };
            let p = p.clone();
            std::thread::spawn(move || {
                let mut w = sock.try_clone().unwrap();
                let mut r = BufReader::new(sock);
                let log = |s: String| p.lock().unwrap().smtp.push(s);
                let mut say = |s: &str| w.write_all(s.as_bytes()).unwrap();
                say("220 fake.provider ESMTP\r\n");
                let mut token = None;
                let mut line = String::new();
                while {
                    line.clear();
                    r.read_line(&mut line).unwrap_or(0) > 0
                } {
                    let cmd = line.trim_end().to_string();
                    let upper = cmd.to_ascii_uppercase();
                    if upper.starts_with("EHLO") {
                        log("EHLO".into());
                        say(
                            "250-fake.provider\r\n250-AUTH LOGIN PLAIN XOAUTH2\r\n250 8BITMIME\r\n",
                        );
                    } else if let Some(b64) = cmd.strip_prefix("AUTH XOAUTH2 ") {
                        use base64::Engine;
                        let raw = base64::engine::general_purpose::STANDARD
                            .decode(b64)
                            .unwrap();
                        let text = String::from_utf8(raw).unwrap();
                        let t = text
                            .strip_prefix(&format!("user={USER}\x01auth=Bearer "))
                            .and_then(|t| t.strip_suffix("\x01\x01"))
                            .unwrap_or("(malformed)")
                            .to_string();
                        let ok = {
                            let g = p.lock().unwrap();
                            !g.refuse_all && g.valid.contains(&t)
                        };
                        if ok {
                            log(format!("AUTH {t} 235"));
                            token = Some(t);
                            say("235 2.7.0 Accepted\r\n");
                        } else {
                            say("334 eyJzdGF0dXMiOiI0MDEiLCJzY2hlbWVzIjoiYmVhcmVyIiwic2NvcGUiOiJodHRwczovL21haWwuZ29vZ2xlLmNvbS8ifQ==\r\n");
                            line.clear();
                            r.read_line(&mut line).unwrap();
                            log(format!("AUTH {t} 334 {line:?} 535"));
                            say("535-5.7.8 Username and Password not accepted.\r\n535 5.7.8 https://support.google.com/mail/?p=BadCredentials\r\n");
                        }
                    } else if upper.starts_with("MAIL") && token.is_none() {
                        say("530 5.7.0 Authentication Required\r\n");
                    } else if upper.starts_with("DATA") {
                        say("354 go ahead\r\n");
                        loop {
                            let mut l = Vec::new();
                            r.by_ref().read_until(b'\n', &mut l).unwrap();
                            if l == b".\r\n" || l.is_empty() {
                                break;
                            }
                        }
                        let mut g = p.lock().unwrap();
                        g.accepted += 1;
                        if g.revoke_after_mail {
                            let t = token.clone().unwrap();
                            g.valid.remove(&t);
                            g.smtp.push(format!("revoked {t}"));
                        }
                        drop(g);
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
    port
}

struct Setup {
    dir: tempfile::TempDir,
    db_path: PathBuf,
    config: PathBuf,
    refresh_file: PathBuf,
}

/// A queue with `[smtp.oauth2]` against the two servers; one mail per connection so that every
/// mail logs in.
fn setup(p: &Shared, extra_oauth: &str) -> Setup {
    setup_with(p, extra_oauth, None, "")
}

/// [`setup`] with the token endpoint on TLS (`cert`, `key`), and more `[smtp]` keys.
fn setup_with(
    p: &Shared,
    extra_oauth: &str,
    tls: Option<(PathBuf, PathBuf)>,
    extra_smtp: &str,
) -> Setup {
    let https = tls.is_some();
    let dir = tempfile::tempdir().unwrap();
    let db_path = dir.path().join("queue.db");
    let secret = dir.path().join("client_secret");
    std::fs::write(&secret, format!("{CLIENT_SECRET}\n")).unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    let refresh_file = state.join("refresh_token");
    std::fs::write(&refresh_file, format!("{FIRST_REFRESH}\n")).unwrap();
    std::fs::set_permissions(&refresh_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let token_port = token_endpoint(p.clone(), tls);
    let scheme = if https { "https" } else { "http" };
    let smtp_port = smtp_server(p.clone());
    let text = base_config(&db_path, smtp_port)
        .replace(
            "auth = false",
            &format!("auth = true\nuser = \"{USER}\"\nmax_messages_per_connection = 1\n{extra_smtp}"),
        )
        .replace(
            "[rate]",
            &format!(
                "[smtp.oauth2]\ntoken_url = \"{scheme}://127.0.0.1:{token_port}/token\"\nclient_id = \"{CLIENT_ID}\"\nclient_secret_file = {}\nrefresh_token_file = {}\n{extra_oauth}\n\n[rate]",
                toml_str(secret.to_str().unwrap()),
                toml_str(refresh_file.to_str().unwrap()),
            ),
        );
    let config = write_config(dir.path(), &text);
    migrate(&config);
    Setup {
        dir,
        db_path,
        config,
        refresh_file,
    }
}

fn once(s: &Setup) -> std::process::Output {
    run_once(&s.config)
}

/// The row waits (`queued`, no attempt spent: the account is paused) with `code`, and its
/// `last_error` holds `text`; returns the row.
fn assert_paused(db: &Db, id: i64, code: &str, text: &str) -> serde_json::Value {
    let row = db.row(id);
    assert_eq!(row["status"], "queued", "{row}");
    assert_eq!(row["attempts"], 0, "{row}");
    assert_eq!(row["error_code"], code, "{row}");
    assert!(row["last_error"].as_str().unwrap().contains(text), "{row}");
    row
}

fn smtp_log(p: &Shared) -> Vec<String> {
    p.lock()
        .unwrap()
        .smtp
        .iter()
        .filter(|l| *l != "EHLO")
        .cloned()
        .collect()
}

#[test]
fn one_refresh_serves_every_connection_while_the_token_is_good() {
    let p = provider(false, 3600);
    let s = setup(&p, "scope = \"https://mail.google.com/\"");
    let db = Db::open(&s.db_path);
    let ids: Vec<i64> = (0..3)
        .map(|i| db.insert("a@example.com", &format!("m{i}"), "x"))
        .collect();
    let out = once(&s);
    for id in &ids {
        assert_eq!(db.status(*id), "sent", "{}", db.row(*id));
    }
    let g = p.lock().unwrap();
    assert_eq!(
        g.requests.len(),
        1,
        "one token request for three connections"
    );
    let req = &g.requests[0];
    assert_eq!(req["grant_type"], "refresh_token");
    assert_eq!(req["refresh_token"], FIRST_REFRESH);
    assert_eq!(req["client_id"], CLIENT_ID);
    assert_eq!(
        req["client_secret"], CLIENT_SECRET,
        "the secret from client_secret_file"
    );
    assert_eq!(req["scope"], "https://mail.google.com/");
    drop(g);
    assert_eq!(
        smtp_log(&p),
        vec!["AUTH ya29.access-1 235"; 3],
        "three connections, each logged in with the cached token"
    );
    // Not left unrotated by mistake.
    assert_eq!(
        std::fs::read_to_string(&s.refresh_file).unwrap(),
        format!("{FIRST_REFRESH}\n")
    );
    // No token, refresh token or client secret in the output or the queue file.
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let dbfile = std::fs::read(&s.db_path).unwrap();
    for secret in ["ya29.access-1", FIRST_REFRESH, CLIENT_SECRET] {
        assert!(!text.contains(secret), "{secret} in the output: {text}");
        assert!(
            !String::from_utf8_lossy(&dbfile).contains(secret),
            "{secret} in the queue file"
        );
    }
}

#[test]
fn a_token_past_its_lifetime_is_not_used_again() {
    // expires_in = 0: good for no time at all, so each connection asks for a new one.
    let p = provider(false, 0);
    let s = setup(&p, "");
    let db = Db::open(&s.db_path);
    let a = db.insert("a@example.com", "m1", "x");
    let b = db.insert("a@example.com", "m2", "x");
    once(&s);
    assert_eq!(db.status(a), "sent");
    assert_eq!(db.status(b), "sent");
    assert_eq!(p.lock().unwrap().requests.len(), 2);
    assert_eq!(
        smtp_log(&p),
        vec!["AUTH ya29.access-1 235", "AUTH ya29.access-2 235"]
    );
}

#[test]
fn a_rotated_refresh_token_is_written_back_and_used_next_time() {
    let p = provider(true, 3600);
    let s = setup(&p, "");
    std::fs::set_permissions(&s.refresh_file, std::fs::Permissions::from_mode(0o640)).unwrap();
    let ino = |f: &PathBuf| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(f).unwrap());
    let before = ino(&s.refresh_file);
    let db = Db::open(&s.db_path);
    let a = db.insert("a@example.com", "m1", "x");
    once(&s);
    assert_eq!(db.status(a), "sent");
    assert_eq!(
        std::fs::read_to_string(&s.refresh_file).unwrap(),
        "1//refresh-T0ken-1\n",
        "the rotated refresh token was saved"
    );
    let meta = std::fs::metadata(&s.refresh_file).unwrap();
    assert_eq!(
        meta.permissions().mode() & 0o777,
        0o640,
        "with the same mode"
    );
    assert_ne!(
        ino(&s.refresh_file),
        before,
        "by replacing the file, not rewriting it"
    );
    let stray: Vec<_> = std::fs::read_dir(s.refresh_file.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "refresh_token" && n != "refresh_token.lock")
        .collect();
    assert!(stray.is_empty(), "temporary files left: {stray:?}");
    // A new process (a restart) refreshes with the saved token; the first one is dead now.
    let b = db.insert("a@example.com", "m2", "x");
    once(&s);
    assert_eq!(db.status(b), "sent", "{}", db.row(b));
    let g = p.lock().unwrap();
    assert_eq!(g.requests.len(), 2);
    assert_eq!(g.requests[1]["refresh_token"], "1//refresh-T0ken-1");
    assert_eq!(g.refresh, "1//refresh-T0ken-2");
    drop(g);
    assert_eq!(
        std::fs::read_to_string(&s.refresh_file).unwrap(),
        "1//refresh-T0ken-2\n"
    );
}

#[test]
fn a_refused_cached_token_is_retried_once_with_a_fresh_one() {
    let p = provider(false, 3600);
    p.lock().unwrap().revoke_after_mail = true;
    let s = setup(&p, "");
    let db = Db::open(&s.db_path);
    let a = db.insert("a@example.com", "m1", "x");
    let b = db.insert("a@example.com", "m2", "x");
    once(&s);
    assert_eq!(db.status(a), "sent");
    assert_eq!(db.status(b), "sent", "{}", db.row(b));
    assert_eq!(
        db.row(b)["attempts"],
        1,
        "the refused token cost the mail no attempt"
    );
    assert_eq!(
        smtp_log(&p),
        vec![
            "AUTH ya29.access-1 235",
            "revoked ya29.access-1",
            // Gmail's sequence for the stale token: 334, our empty line, 535 ...
            "AUTH ya29.access-1 334 \"\\r\\n\" 535",
            // ... then one fresh token on the same connection.
            "AUTH ya29.access-2 235",
            "revoked ya29.access-2",
        ]
    );
    assert_eq!(p.lock().unwrap().requests.len(), 2);
}

#[test]
fn a_refused_fresh_token_pauses_the_account_without_a_second_try() {
    let p = provider(false, 3600);
    p.lock().unwrap().refuse_all = true;
    let s = setup(&p, "");
    let db = Db::open(&s.db_path);
    let a = db.insert("a@example.com", "m1", "x");
    once(&s);
    assert_paused(
        &db,
        a,
        "auth_failed",
        "535 5.7.8 Username and Password not accepted.",
    );
    assert_eq!(
        p.lock().unwrap().requests.len(),
        1,
        "no second token for a fresh one refused"
    );
    assert_eq!(smtp_log(&p), vec!["AUTH ya29.access-1 334 \"\\r\\n\" 535"]);
}

#[test]
fn a_refused_refresh_token_pauses_the_account_with_the_providers_words() {
    let p = provider(false, 3600);
    p.lock().unwrap().refresh = "1//some-other-token".into();
    let s = setup(&p, "");
    let db = Db::open(&s.db_path);
    let a = db.insert("a@example.com", "m1", "x");
    let out = once(&s);
    let row = assert_paused(&db, a, "oauth2_token_failed", "invalid_grant");
    let text = row["last_error"].as_str().unwrap();
    assert!(
        text.contains("Token has been expired or revoked."),
        "{text}"
    );
    assert!(text.contains("/token"), "names the endpoint: {text}");
    assert!(
        smtp_log(&p).is_empty(),
        "no AUTH without a token: {:?}",
        smtp_log(&p)
    );
    let paused: String = db.query_one("SELECT COALESCE(error_text, '') FROM queue_state");
    assert!(paused.contains("invalid_grant"), "{paused}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains(FIRST_REFRESH), "{stderr}");

    // The admin puts a good refresh token in the file: the next run uses it, no restart needed
    // for the file to be read again.
    std::fs::write(&s.refresh_file, "1//some-other-token\n").unwrap();
    assert!(run_mailqueue(&s.config, &["resume"]).status.success());
    once(&s);
    assert_eq!(db.status(a), "sent", "{}", db.row(a));
}

#[test]
fn an_unreachable_token_endpoint_pauses_the_account() {
    let p = provider(false, 3600);
    let s = setup(&p, "");
    let closed = free_port();
    let text = std::fs::read_to_string(&s.config).unwrap();
    let start = text.find("token_url = ").unwrap();
    let end = start + text[start..].find('\n').unwrap();
    let text = format!(
        "{}token_url = \"http://127.0.0.1:{closed}/token\"{}",
        &text[..start],
        &text[end..]
    );
    std::fs::write(&s.config, text).unwrap();
    let db = Db::open(&s.db_path);
    let a = db.insert("a@example.com", "m1", "x");
    once(&s);
    assert_paused(&db, a, "oauth2_token_failed", "could not be reached");
    let _ = &s.dir;
}

#[test]
fn test_send_shows_the_xoauth2_login() {
    let p = provider(false, 3600);
    let s = setup(&p, "");
    let out = run_mailqueue(&s.config, &["test-send", "--to", "qa@example.com"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!("SMTP login as {USER} (XOAUTH2)")),
        "{stdout}"
    );
    assert!(!stdout.contains("ya29.access-1"), "{stdout}");
    // check-config --connect (what docs/providers.md tells the admin to run) logs in the same way.
    let out = run_mailqueue(&s.config, &["check-config", "--connect"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        smtp_log(&p),
        vec!["AUTH ya29.access-1 235", "AUTH ya29.access-2 235"],
        "each process gets its own token"
    );
}

#[test]
fn the_token_endpoint_over_tls_is_checked_against_ca_file() {
    let ca = TestCa::new();
    let ca_file = format!("ca_file = {}", toml_str(ca.ca_pem_path.to_str().unwrap()));
    // Trusted (ca_file holds its CA): the token comes over TLS.
    let p = provider(false, 3600);
    let s = setup_with(
        &p,
        "",
        Some((ca.cert_path.clone(), ca.key_path.clone())),
        &ca_file,
    );
    let db = Db::open(&s.db_path);
    let a = db.insert("a@example.com", "m1", "x");
    once(&s);
    assert_eq!(db.status(a), "sent", "{}", db.row(a));
    assert_eq!(p.lock().unwrap().requests.len(), 1);
    // A certificate from another CA: no request is made, the account pauses and says why.
    let p = provider(false, 3600);
    let s = setup_with(
        &p,
        "",
        Some((
            ca.untrusted_cert_path.clone(),
            ca.untrusted_key_path.clone(),
        )),
        &ca_file,
    );
    let db = Db::open(&s.db_path);
    let a = db.insert("a@example.com", "m1", "x");
    once(&s);
    assert_paused(&db, a, "oauth2_token_failed", "UnknownIssuer");
    assert!(
        p.lock().unwrap().requests.is_empty(),
        "the refresh token never left"
    );
}

/// `password_command` with `auth_mechanism = "xoauth2"` (a token from elsewhere): the command's
/// token goes into the XOAUTH2 string, Gmail's failure sequence for a stale one is answered with
/// an empty line and reported as the 535; with a current token the mail goes out.
#[test]
fn xoauth2_with_a_token_from_password_command() {
    let p = provider(false, 3600);
    p.lock().unwrap().valid.insert("ya29.good".into());
    let dir = tempfile::tempdir().unwrap();
    let db_path = dir.path().join("queue.db");
    let text = base_config(&db_path, smtp_server(p.clone())).replace(
        "auth = false",
        &format!("auth = true\nuser = \"{USER}\"\npassword_command = \"echo ya29.stale\"\nauth_mechanism = \"xoauth2\""),
    );
    let config = write_config(dir.path(), &text);
    migrate(&config);
    let db = Db::open(&db_path);
    let id = db.insert("a@example.com", "m", "x");
    run_once(&config);
    assert_paused(
        &db,
        id,
        "auth_failed",
        "535 5.7.8 Username and Password not accepted.",
    );
    assert_eq!(
        smtp_log(&p),
        vec!["AUTH ya29.stale 334 \"\\r\\n\" 535"],
        "the client answered the challenge with an empty line, once"
    );
    // With the current token it goes through (after `resume` lifts the pause).
    std::fs::write(&config, text.replace("ya29.stale", "ya29.good")).unwrap();
    assert!(run_mailqueue(&config, &["resume"]).status.success());
    run_once(&config);
    assert_eq!(db.status(id), "sent", "{}", db.row(id));
    assert!(
        p.lock().unwrap().requests.is_empty(),
        "no token endpoint involved"
    );
}

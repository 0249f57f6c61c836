//! `mailqueue::pop3` against a real Dovecot POP3 server, started by each test with a throwaway
//! config under a temp dir (`dovecot -F -c FILE`): plaintext, APOP, STLS and POP3S logins, a
//! wrong password, and proof from Dovecot's own log that every session ended with QUIT.
//!
//! Prerequisites: `scripts/dovecot-test.sh` (installs dovecot-core and dovecot-pop3d) and root,
//! since Dovecot's master drops privileges to `dovecot`/`dovenull`/`nobody`. Without Dovecot the
//! tests print why and pass — unless `CI` is set, where a missing Dovecot fails them.
//!
//! Waiting is always "poll every 20 ms until a deadline", never a bare sleep.

use std::collections::HashSet;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use mailqueue::pop3::{login, login_with_progress, PopError, PopSettings, PopTls};
use tempfile::TempDir;

/// Poll interval for every wait here.
const POLL: Duration = Duration::from_millis(20);
/// How long Dovecot may take to start or to write a log line.
const WAIT: Duration = Duration::from_secs(15);
/// The client's per-step timeout: above Dovecot's 2 s `auth_failure_delay`.
const TIMEOUT: Duration = Duration::from_secs(10);

const USER: &str = "alice";
const PASSWORD: &str = "Open sesame 1";

// ---------------------------------------------------------------------------------------------
// Finding Dovecot, or skipping
// ---------------------------------------------------------------------------------------------

/// The dovecot binary, looked up in PATH and the sbin directories a non-root PATH may lack.
fn dovecot_bin() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/usr/local/sbin".into(), "/sbin".into()])
        .map(|d| d.join("dovecot"))
        .find(|p| p.is_file())
}

/// Whether we run under CI, where a missing server is a failure, not a skip.
fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && v != "false")
}

/// The dovecot binary, or `None` after printing why the test is skipped. Panics under CI.
fn require_dovecot(test: &str) -> Option<PathBuf> {
    match dovecot_bin() {
        Some(p) => Some(p),
        None if under_ci() => {
            panic!("dovecot is not installed but CI is set: run scripts/dovecot-test.sh")
        }
        None => {
            eprintln!(
                "SKIPPED {test}: dovecot is not installed (run scripts/dovecot-test.sh; \
                 with CI set this fails instead)"
            );
            None
        }
    }
}

/// Whether this process runs as root (Dovecot's master needs it to switch users).
fn is_root() -> bool {
    fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find(|l| l.starts_with("Uid:"))
            .and_then(|l| l.split_whitespace().nth(2))
            == Some("0")
    })
}

// ---------------------------------------------------------------------------------------------
// Certificates
// ---------------------------------------------------------------------------------------------

/// Returns (CA cert PEM, server cert PEM, server key PEM): a test CA and a certificate for
/// `localhost` and `127.0.0.1` signed by it.
fn make_ca_and_server() -> (String, String, String) {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "mailqueue POP3 test CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);

    // "127.0.0.1" becomes an IP SAN (rcgen parses it), "localhost" a DNS SAN.
    let mut params =
        CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    (ca_cert.pem(), cert.pem(), key.serialize_pem())
}

// ---------------------------------------------------------------------------------------------
// A throwaway Dovecot
// ---------------------------------------------------------------------------------------------

/// A free port on 127.0.0.1, never the same twice in this process (tests run in parallel and
/// each gets its own Dovecot).
fn free_port() -> u16 {
    static GIVEN: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    let given = GIVEN.get_or_init(Default::default);
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if given.lock().unwrap().insert(port) {
            return port;
        }
    }
}

/// Polls `f` every [`POLL`] until it gives `Some`, or panics with `what` after `timeout`.
fn wait_until<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(POLL);
    }
}

/// Whether a POP3 server on 127.0.0.1:`port` sends its `+OK` greeting (then QUIT, so Dovecot
/// logs the probe as a clean logout of `user=<>`).
fn greets(port: u16) -> bool {
    let Ok(mut tcp) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = tcp.set_read_timeout(Some(Duration::from_secs(2)));
    let mut line = String::new();
    let ok = BufReader::new(&tcp).read_line(&mut line).is_ok() && line.starts_with("+OK");
    if ok {
        let _ = tcp.write_all(b"QUIT\r\n");
        let _ = BufReader::new(&tcp).read_line(&mut line);
    }
    ok
}

/// A running Dovecot with POP3 (plain + STLS) and POP3S listeners on 127.0.0.1. Stopped on drop.
struct Dovecot {
    /// Port of the plaintext listener (STLS offered).
    pop3: u16,
    /// Port of the implicit-TLS listener.
    pop3s: u16,
    /// The test CA that signed the server certificate, for `ca_file`.
    ca_pem: PathBuf,
    /// Dovecot's log (`log_path`): logins, logouts, errors.
    log: PathBuf,
    /// The master process (`dovecot -F`).
    child: Child,
    /// Everything lives here; removed on drop after Dovecot stopped.
    dir: TempDir,
}

impl Dovecot {
    /// Starts a Dovecot and waits until both listeners accept connections. Retries with other
    /// ports if one was taken meanwhile.
    fn start(bin: &Path) -> Dovecot {
        assert!(
            is_root(),
            "these tests start Dovecot, whose master must run as root (it switches to the \
             dovecot, dovenull and nobody users)"
        );
        let mut last = String::new();
        for _ in 0..3 {
            match Dovecot::try_start(bin) {
                Ok(d) => return d,
                Err(why) => last = why,
            }
        }
        panic!("dovecot did not start: {last}");
    }

    fn try_start(bin: &Path) -> Result<Dovecot, String> {
        // Under /tmp, not $TMPDIR: Dovecot's unix sockets live in base_dir and socket paths are
        // limited to 108 bytes.
        let dir = tempfile::Builder::new()
            .prefix("mq-dovecot-")
            .tempdir_in("/tmp")
            .unwrap();
        let d = dir.path();
        // Dovecot's unprivileged processes (auth as `dovecot`, mail as `nobody`) must reach the
        // files in here; tempfile makes the dir 0700.
        fs::set_permissions(d, fs::Permissions::from_mode(0o755)).unwrap();
        let mail = d.join("mail");
        fs::create_dir(&mail).unwrap();
        // The mail processes run as nobody and create each user's Maildir here. Without write
        // access PASS still answers "+OK Logged in." and the session then dies with
        // "-ERR [SYS/TEMP] Internal error occurred." (seen with 2.3.19).
        fs::set_permissions(&mail, fs::Permissions::from_mode(0o777)).unwrap();

        let (ca, cert, key) = make_ca_and_server();
        let ca_pem = d.join("ca.pem");
        fs::write(&ca_pem, ca).unwrap();
        fs::write(d.join("server.pem"), cert).unwrap();
        fs::write(d.join("server.key"), key).unwrap();
        // {PLAIN}: APOP needs the password itself, not a hash of it.
        fs::write(d.join("users"), format!("{USER}:{{PLAIN}}{PASSWORD}\n")).unwrap();

        let (pop3, pop3s) = (free_port(), free_port());
        let log = d.join("dovecot.log");
        let conf = d.join("dovecot.conf");
        let dd = d.display();
        fs::write(
            &conf,
            format!(
                r#"# Throwaway config for tests/pop3_dovecot.rs.
base_dir = {dd}/run
state_dir = {dd}/state
log_path = {dd}/dovecot.log
protocols = pop3
listen = 127.0.0.1
ssl = yes
ssl_cert = <{dd}/server.pem
ssl_key = <{dd}/server.key
# Loopback counts as secure for Dovecot anyway; say it so the file reads true elsewhere.
disable_plaintext_auth = no
auth_mechanisms = plain apop
# The users the Debian package creates; the master runs as root and switches to them.
default_internal_user = dovecot
default_login_user = dovenull
mail_location = maildir:{dd}/mail/%u
passdb {{
  driver = passwd-file
  args = {dd}/users
}}
userdb {{
  driver = static
  args = uid=nobody gid=nogroup home={dd}/mail/%u
}}
service pop3-login {{
  inet_listener pop3 {{
    address = 127.0.0.1
    port = {pop3}
  }}
  inet_listener pop3s {{
    address = 127.0.0.1
    port = {pop3s}
    ssl = yes
  }}
}}
"#
            ),
        )
        .unwrap();

        let stderr = fs::File::create(d.join("stderr")).unwrap();
        let mut child = Command::new(bin)
            .arg("-F")
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(stderr.try_clone().unwrap())
            .stderr(stderr)
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", bin.display()))?;

        let deadline = Instant::now() + WAIT;
        // Ready means the plaintext listener greets: pop3-login holds the greeting back until
        // the auth process is up (a Dovecot stopped before that takes seconds to shut down).
        // The POP3S listener belongs to the same login service: accepting is enough there.
        let ready = || greets(pop3) && TcpStream::connect(("127.0.0.1", pop3s)).is_ok();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return Err(format!(
                    "dovecot exited with {status}\n--- stderr ---\n{}\n--- log ---\n{}",
                    fs::read_to_string(d.join("stderr")).unwrap_or_default(),
                    fs::read_to_string(&log).unwrap_or_default()
                ));
            }
            if ready() {
                break;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "dovecot not listening on {pop3}/{pop3s} after {WAIT:?}"
                ));
            }
            std::thread::sleep(POLL);
        }
        Ok(Dovecot {
            pop3,
            pop3s,
            ca_pem,
            log,
            child,
            dir,
        })
    }

    /// Settings for [`USER`] on this Dovecot.
    fn settings(&self, tls: PopTls) -> PopSettings {
        PopSettings {
            host: "127.0.0.1".into(),
            port: if tls == PopTls::Tls {
                self.pop3s
            } else {
                self.pop3
            },
            tls,
            user: USER.into(),
            password: PASSWORD.into(),
            apop: false,
            timeout: TIMEOUT,
            ca_file: Some(self.ca_pem.clone()),
            source_address: None,
        }
    }

    /// The log's lines so far.
    fn log_lines(&self) -> Vec<String> {
        fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// The log, for assertion messages.
    fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log has a line with all of `parts`, and returns it.
    fn wait_for_log(&self, parts: &[&str]) -> String {
        let what = format!(
            "a Dovecot log line with {parts:?} in {}",
            self.log.display()
        );
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(l) = self
                .log_lines()
                .into_iter()
                .find(|l| parts.iter().all(|p| l.contains(p)))
            {
                return l;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}\n--- log ---\n{}",
                self.log_text()
            );
            std::thread::sleep(POLL);
        }
    }

    /// Asserts from Dovecot's log that every session of [`USER`] ended with QUIT: each
    /// successful login is followed by the mail process's `Disconnected: Logged out`, and each
    /// refused one by the login process's `Disconnected: Aborted login by logging out`; a client
    /// that just hangs up shows `Disconnected: Connection closed` instead.
    fn assert_every_session_quit(&self, logins: usize, refused: usize) {
        let mail_process = format!("pop3({USER})");
        let login_process = format!("user=<{USER}>");
        // The logout lines are written after the client already has its reply: wait for them.
        wait_until(WAIT, "all logout lines", || {
            let lines = self.log_lines();
            let count = |p: &str, who: &str| {
                lines
                    .iter()
                    .filter(|l| l.contains(p) && l.contains(who))
                    .count()
            };
            let logged_out = count("Disconnected: Logged out", &mail_process);
            let aborted = count("Disconnected: Aborted login by logging out", &login_process);
            (logged_out >= logins && aborted >= refused).then_some(())
        });
        let lines = self.log_lines();
        let count = |p: &str| {
            lines
                .iter()
                .filter(|l| l.contains(p) && l.contains(login_process.as_str()))
                .count()
        };
        assert_eq!(count("Login: "), logins, "{}", self.log_text());
        let logged_out = lines
            .iter()
            .filter(|l| l.contains(&mail_process) && l.contains("Disconnected: Logged out"))
            .count();
        assert_eq!(logged_out, logins, "{}", self.log_text());
        assert_eq!(
            count("Disconnected: Aborted login by logging out"),
            refused,
            "{}",
            self.log_text()
        );
        let hung_up: Vec<&String> = lines
            .iter()
            .filter(|l| {
                (l.contains(&mail_process) || l.contains(&login_process))
                    && l.contains("Connection closed")
            })
            .collect();
        assert!(hung_up.is_empty(), "sessions without QUIT: {hung_up:#?}");
        let errors: Vec<&String> = lines
            .iter()
            .filter(|l| l.contains(": Error: ") || l.contains(": Fatal: "))
            .collect();
        assert!(errors.is_empty(), "Dovecot logged errors: {errors:#?}");
    }
}

impl Drop for Dovecot {
    fn drop(&mut self) {
        // SIGTERM lets the master stop its children; SIGKILL only if it does not exit in time.
        // (Dovecot 2.3's master takes about 2-3 s to stop: it waits for its log process.)
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(POLL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        eprintln!("dovecot in {} needed SIGKILL", self.dir.path().display());
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
    let Some(bin) = require_dovecot("user_pass_logs_in_and_quits") else {
        return;
    };
    let dc = Dovecot::start(&bin);
    let steps = Steps::default();
    let session = login_with_progress(&dc.settings(PopTls::None), &steps.hook())
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", dc.log_text()));
    assert_eq!(session.method, "USER/PASS");
    assert!(!session.tls);
    assert!(session.greeting.contains("Dovecot"), "{}", session.greeting);
    assert_eq!(session.quit, Ok("Logging out.".to_string()));
    assert_eq!(steps.get(), ["connect:ok", "login:ok", "QUIT:ok"]);
    dc.wait_for_log(&["Login: user=<alice>", "method=PLAIN"]);
    dc.assert_every_session_quit(1, 0);
}

#[tokio::test]
async fn apop_logs_in_and_quits() {
    let Some(bin) = require_dovecot("apop_logs_in_and_quits") else {
        return;
    };
    let dc = Dovecot::start(&bin);
    let mut s = dc.settings(PopTls::None);
    s.apop = true;
    let session = login(&s)
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", dc.log_text()));
    assert_eq!(session.method, "APOP");
    dc.wait_for_log(&["Login: user=<alice>", "method=APOP"]);
    dc.assert_every_session_quit(1, 0);
}

#[tokio::test]
async fn stls_with_the_test_ca_logs_in_over_tls() {
    let Some(bin) = require_dovecot("stls_with_the_test_ca_logs_in_over_tls") else {
        return;
    };
    let dc = Dovecot::start(&bin);
    let steps = Steps::default();
    let session = login_with_progress(&dc.settings(PopTls::StartTls), &steps.hook())
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", dc.log_text()));
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
    dc.assert_every_session_quit(1, 0);
}

#[tokio::test]
async fn pop3s_with_the_test_ca_logs_in_over_tls() {
    let Some(bin) = require_dovecot("pop3s_with_the_test_ca_logs_in_over_tls") else {
        return;
    };
    let dc = Dovecot::start(&bin);
    let mut s = dc.settings(PopTls::Tls);
    // By name this time: the certificate's DNS SAN is checked (localhost may resolve to ::1
    // first, where nothing listens; the next address is tried).
    s.host = "localhost".into();
    // APOP over TLS works too.
    s.apop = true;
    let session = login(&s)
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", dc.log_text()));
    assert!(session.tls);
    assert_eq!(session.server, format!("localhost:{}", dc.pop3s));
    dc.wait_for_log(&["Login: user=<alice>", "method=APOP", ", TLS"]);
    dc.assert_every_session_quit(1, 0);
}

#[tokio::test]
async fn wrong_password_is_a_login_error_and_still_quits() {
    let Some(bin) = require_dovecot("wrong_password_is_a_login_error_and_still_quits") else {
        return;
    };
    let dc = Dovecot::start(&bin);
    let mut s = dc.settings(PopTls::StartTls);
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
    dc.assert_every_session_quit(0, 1);
}

#[tokio::test]
async fn wrong_apop_secret_is_a_login_error() {
    let Some(bin) = require_dovecot("wrong_apop_secret_is_a_login_error") else {
        return;
    };
    let dc = Dovecot::start(&bin);
    let mut s = dc.settings(PopTls::None);
    s.apop = true;
    s.password = "not the password".into();
    let e = login(&s).await.unwrap_err();
    assert!(
        matches!(&e, PopError::Login { reply } if reply.contains("Authentication failed")),
        "{e:?}"
    );
    dc.assert_every_session_quit(0, 1);
}

#[tokio::test]
async fn without_the_test_ca_the_certificate_is_refused() {
    let Some(bin) = require_dovecot("without_the_test_ca_the_certificate_is_refused") else {
        return;
    };
    let dc = Dovecot::start(&bin);
    let mut s = dc.settings(PopTls::Tls);
    s.ca_file = None; // webpki roots only: the test CA is unknown
    let e = login(&s).await.unwrap_err();
    match &e {
        PopError::Tls { detail } => assert!(detail.contains("UnknownIssuer"), "{detail}"),
        other => panic!("expected a Tls error, got {other:?}"),
    }
    // No login was attempted.
    assert!(!dc.log_text().contains("Login: user=<alice>"));
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
    let Some(bin) = require_dovecot("harness_log_tells_a_hang_up_from_a_quit") else {
        return;
    };
    let dc = Dovecot::start(&bin);
    let tcp = TcpStream::connect(("127.0.0.1", dc.pop3)).unwrap();
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
    assert!(!dc.log_text().contains("Disconnected: Logged out"));
}

#[test]
fn harness_starts_dovecot_for_pop3() {
    // A smoke test of the harness itself: Dovecot's log shows its own start-up line.
    let Some(bin) = require_dovecot("harness_starts_dovecot_for_pop3") else {
        return;
    };
    let dc = Dovecot::start(&bin);
    assert!(dc.ca_pem.is_file());
    let first = dc.wait_for_log(&["master: Info: Dovecot v"]);
    assert!(first.contains("starting up for pop3"), "{first}");
}

//! Shared helpers for mailqueue's integration tests. Each test file does `mod support;`.
//!
//! - [`SmtpServer`]: tests/servers/smtp_server.py (aiosmtpd) with TLS/AUTH/fault options and a spool.
//! - [`SmtpSink`]: Postfix's `smtp-sink`, fast, with its own fault flags (-r/-f/-Q/-q/-w ...).
//! - [`TestCa`]: a CA and a server cert for localhost/127.0.0.1 (plus an untrusted one), via rcgen.
//! - [`Db`]: the queue database; [`base_config`]/[`write_config`]/[`run_mailqueue`]/[`Daemon`].
//! - [`dovecot::Dovecot`]: a real Dovecot POP3/POP3S server with its own log (for POP-before-SMTP,
//!   together with the python server's `--pop-log`).
//!
//! Prerequisites: `scripts/test-setup.sh` (postfix binaries and target/test-venv with aiosmtpd);
//! for [`dovecot`], `scripts/dovecot-test.sh` and root.
//! Waiting is always "poll an external event every 20 ms until a deadline", never a bare sleep.
#![allow(dead_code)]

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

pub mod dovecot;

/// For starting a server with no extra arguments: `SmtpServer::start(NO_ARGS)`.
pub const NO_ARGS: &[&str] = &[];

/// Poll interval for every wait in this module.
pub const POLL: Duration = Duration::from_millis(20);

// ---------------------------------------------------------------------------------------------
// Paths and generic waiting
// ---------------------------------------------------------------------------------------------

/// The crate root (where Cargo.toml is).
pub fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The daemon binary cargo built for this test run.
pub fn mailqueue_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_mailqueue"))
}

/// The python that has aiosmtpd: `$MAILQUEUE_TEST_PYTHON` or `target/test-venv/bin/python`.
pub fn python() -> PathBuf {
    let p = match std::env::var_os("MAILQUEUE_TEST_PYTHON") {
        Some(p) => PathBuf::from(p),
        None => manifest_dir().join("target/test-venv/bin/python"),
    };
    assert!(
        p.exists(),
        "no test python at {} — run scripts/test-setup.sh (or set MAILQUEUE_TEST_PYTHON)",
        p.display()
    );
    p
}

/// tests/servers/smtp_server.py
pub fn smtp_server_script() -> PathBuf {
    manifest_dir().join("tests/servers/smtp_server.py")
}

/// Postfix's smtp-sink (in /usr/sbin, which a non-root PATH may lack).
pub fn smtp_sink_bin() -> PathBuf {
    find_sbin("smtp-sink")
}

/// Postfix's smtp-source (SMTP load generator).
pub fn smtp_source_bin() -> PathBuf {
    find_sbin("smtp-source")
}

fn find_sbin(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/usr/local/sbin".into()])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!("{name} not found — run scripts/test-setup.sh (installs postfix)")
        })
}

/// Polls `f` every 20 ms until it returns `Some`, or panics after `timeout` saying `what`.
pub fn wait_until<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        thread::sleep(POLL);
    }
}

/// A file's contents as text (lossy), empty if unreadable.
pub fn read_lossy(path: &Path) -> String {
    fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// Effective uid, read from /proc (no libc dependency).
fn euid() -> u32 {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("Uid:"))?.to_owned();
            line.split_whitespace().nth(2)?.parse().ok()
        })
        .unwrap_or(u32::MAX)
}

// ---------------------------------------------------------------------------------------------
// Ports
// ---------------------------------------------------------------------------------------------

/// Number of sockets in LISTEN state on TCP port `port` (IPv4 and IPv6), from /proc/net/tcp{,6}.
/// Unlike a connect probe this opens no SMTP session, so smtp-sink's counters stay clean.
pub fn listeners_on(port: u16) -> usize {
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|f| fs::read_to_string(f).ok())
        .flat_map(|text| {
            text.lines()
                .skip(1)
                .filter(|line| {
                    let cols: Vec<&str> = line.split_whitespace().collect();
                    cols.len() > 3
                        && cols[3] == "0A" // TCP_LISTEN
                        && cols[1].rsplit(':').next().and_then(|h| u16::from_str_radix(h, 16).ok())
                            == Some(port)
                })
                .map(|_| ())
                .collect::<Vec<_>>()
        })
        .count()
}

/// A free TCP port on 127.0.0.1, never handed out twice by this process, with nothing listening
/// on it (checked by re-binding without SO_REUSEPORT and by /proc). Also good for "nothing listens
/// here" tests (connection refused).
pub fn free_port() -> u16 {
    static GIVEN: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    let given = GIVEN.get_or_init(Default::default);
    for _ in 0..100 {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        // Re-bind to make sure nobody (e.g. a SO_REUSEPORT smtp-sink) holds it, then release it.
        let free = TcpListener::bind(("127.0.0.1", port)).is_ok() && listeners_on(port) == 0;
        if free && given.lock().unwrap().insert(port) {
            return port;
        }
    }
    panic!("could not find a free port");
}

// ---------------------------------------------------------------------------------------------
// Certificates
// ---------------------------------------------------------------------------------------------

/// A test CA with a server certificate for `localhost` and `127.0.0.1`, plus a server certificate
/// (same names) from an unrelated CA that clients must reject. All PEM files in a temp dir.
pub struct TestCa {
    pub dir: TempDir,
    /// The trusted CA certificate (give it to the daemon as `ca_file`).
    pub ca_pem_path: PathBuf,
    /// Server certificate signed by that CA, and its PKCS#8 key.
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    /// Server certificate + key from a second, unrelated CA ("untrusted certificate" tests).
    pub untrusted_cert_path: PathBuf,
    pub untrusted_key_path: PathBuf,
    /// That unrelated CA's certificate (trusting it makes the untrusted cert valid).
    pub untrusted_ca_pem_path: PathBuf,
}

impl TestCa {
    pub fn new() -> TestCa {
        let dir = tempfile::Builder::new().prefix("mq-ca-").tempdir().unwrap();
        let write = |name: &str, text: &str| {
            let p = dir.path().join(name);
            fs::write(&p, text).unwrap();
            p
        };
        let (ca, cert, key) = make_ca_and_server("mailqueue test CA");
        let (uca, ucert, ukey) = make_ca_and_server("untrusted test CA");
        TestCa {
            ca_pem_path: write("ca.pem", &ca),
            cert_path: write("server.pem", &cert),
            key_path: write("server.key", &key),
            untrusted_ca_pem_path: write("untrusted-ca.pem", &uca),
            untrusted_cert_path: write("untrusted-server.pem", &ucert),
            untrusted_key_path: write("untrusted-server.key", &ukey),
            dir,
        }
    }

    /// The trusted CA certificate as PEM text.
    pub fn ca_pem(&self) -> String {
        fs::read_to_string(&self.ca_pem_path).unwrap()
    }

    /// A rustls server config (ring) with the trusted server certificate, for test servers
    /// written in Rust.
    pub fn rustls_server_config(&self) -> Arc<rustls::ServerConfig> {
        rustls_server_config(&self.cert_path, &self.key_path)
    }

    /// `["--tls-mode", mode, "--cert", .., "--key", ..]` for [`SmtpServer::start`] (trusted cert).
    pub fn server_args(&self, tls_mode: &str) -> Vec<String> {
        tls_args(tls_mode, &self.cert_path, &self.key_path)
    }

    /// Same with the untrusted certificate.
    pub fn untrusted_server_args(&self, tls_mode: &str) -> Vec<String> {
        tls_args(
            tls_mode,
            &self.untrusted_cert_path,
            &self.untrusted_key_path,
        )
    }
}

/// A rustls server config (ring, no client auth) from PEM files: the certificate chain and key.
pub fn rustls_server_config(cert: &Path, key: &Path) -> Arc<rustls::ServerConfig> {
    use rustls::pki_types::pem::PemObject;
    let certs = rustls::pki_types::CertificateDer::pem_file_iter(cert)
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let key = rustls::pki_types::PrivateKeyDer::from_pem_file(key).unwrap();
    Arc::new(
        rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap(),
    )
}

fn tls_args(mode: &str, cert: &Path, key: &Path) -> Vec<String> {
    let s = |p: &Path| p.to_str().unwrap().to_owned();
    vec![
        "--tls-mode".into(),
        mode.into(),
        "--cert".into(),
        s(cert),
        "--key".into(),
        s(key),
    ]
}

/// Returns (CA cert PEM, server cert PEM, server key PEM).
fn make_ca_and_server(ca_name: &str) -> (String, String, String) {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params
        .distinguished_name
        .push(DnType::CommonName, ca_name);
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
// The aiosmtpd server (tests/servers/smtp_server.py)
// ---------------------------------------------------------------------------------------------

/// A running tests/servers/smtp_server.py on 127.0.0.1. Killed on drop.
pub struct SmtpServer {
    pub port: u16,
    /// Spool directory: `<seq>.eml`, `<seq>.json`, `connections`.
    pub spool: PathBuf,
    /// The server's stderr (python tracebacks; the whole dialogue with `--verbose`).
    pub log_path: PathBuf,
    child: Child,
    _dir: TempDir,
}

/// One message accepted by [`SmtpServer`].
#[derive(Debug, Clone)]
pub struct Received {
    pub seq: u64,
    pub mail_from: String,
    pub rcpt_tos: Vec<String>,
    /// Unix time at the end of DATA.
    pub received_at: f64,
    /// Unix time of the MAIL FROM that started the transaction.
    pub mail_at: f64,
    /// Connection number (1 = first connection the server accepted).
    pub connection: u64,
    /// The EHLO/HELO name the client gave on that connection (after STARTTLS: the second EHLO).
    pub helo: String,
    /// The message as received (dot-unstuffed, CRLF line ends).
    pub raw: Vec<u8>,
}

impl SmtpServer {
    /// Starts the server with `--port 0 --spool <fresh dir>` plus `args` (see the script's
    /// docstring: --tls-mode/--cert/--key, --auth-user/--auth-password, --refuse-rcpt,
    /// --defer-rcpt SUBSTR:N, --mail-reply, --data-reply, --max-messages, --verbose, and the
    /// POP-before-SMTP relay gate --pop-log DOVECOT_LOG --pop-window SECS [--pop-grace SECS],
    /// whose decisions [`SmtpServer::relay_decisions`] reads).
    /// Waits (20 s at most) for its `{"port": N}` line; panics with its stderr if it dies.
    pub fn start<S: AsRef<OsStr>>(args: &[S]) -> SmtpServer {
        let dir = tempfile::Builder::new()
            .prefix("mq-smtpd-")
            .tempdir()
            .unwrap();
        let spool = dir.path().join("spool");
        let log_path = dir.path().join("server.log");
        let mut child = Command::new(python())
            .arg(smtp_server_script())
            .args(["--port", "0", "--spool"])
            .arg(&spool)
            .args(args)
            .env("PYTHONDONTWRITEBYTECODE", "1") // no __pycache__ in tests/servers
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            // stderr to a file: a pipe nobody reads could fill up and stall the server.
            .stderr(fs::File::create(&log_path).unwrap())
            .spawn()
            .expect("spawn smtp_server.py");

        // Read the first stdout line on a thread (then keep draining), so we can apply a deadline.
        let (tx, rx) = mpsc::channel();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        thread::spawn(move || {
            let mut line = String::new();
            let _ = stdout.read_line(&mut line);
            let _ = tx.send(line);
            let _ = std::io::copy(&mut stdout, &mut std::io::sink());
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        let line = loop {
            match rx.recv_timeout(POLL) {
                Ok(line) if !line.is_empty() => break line,
                Ok(_) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = child.wait().unwrap();
                    panic!(
                        "smtp_server.py exited ({status}) before listening:\n{}",
                        read_lossy(&log_path)
                    );
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if let Some(status) = child.try_wait().unwrap() {
                        panic!(
                            "smtp_server.py exited ({status}):\n{}",
                            read_lossy(&log_path)
                        );
                    }
                    if Instant::now() > deadline {
                        let _ = child.kill();
                        panic!(
                            "smtp_server.py did not report its port in 20 s:\n{}",
                            read_lossy(&log_path)
                        );
                    }
                }
            }
        };
        let v: serde_json::Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("bad port line {line:?} from smtp_server.py: {e}"));
        let port = v["port"].as_u64().expect("port") as u16;
        SmtpServer {
            port,
            spool,
            log_path,
            child,
            _dir: dir,
        }
    }

    /// "127.0.0.1:PORT"
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The server's stderr so far.
    pub fn log(&self) -> String {
        read_lossy(&self.log_path)
    }

    /// Accepted messages so far, sorted by sequence number.
    pub fn messages(&self) -> Vec<Received> {
        let mut seqs: Vec<u64> = fs::read_dir(&self.spool)
            .map(|rd| {
                rd.filter_map(|e| {
                    let name = e.ok()?.file_name().into_string().ok()?;
                    name.strip_suffix(".json")?.parse().ok()
                })
                .collect()
            })
            .unwrap_or_default();
        seqs.sort_unstable();
        seqs.into_iter()
            .map(|seq| {
                // The .eml was renamed into place before the .json, so both are complete.
                let meta: serde_json::Value = serde_json::from_slice(
                    &fs::read(self.spool.join(format!("{seq}.json"))).unwrap(),
                )
                .unwrap();
                Received {
                    seq,
                    mail_from: meta["mail_from"].as_str().unwrap_or_default().to_owned(),
                    rcpt_tos: meta["rcpt_tos"]
                        .as_array()
                        .map(|a| {
                            a.iter()
                                .filter_map(|v| v.as_str().map(str::to_owned))
                                .collect()
                        })
                        .unwrap_or_default(),
                    received_at: meta["received_at"].as_f64().unwrap_or_default(),
                    mail_at: meta["mail_at"].as_f64().unwrap_or_default(),
                    connection: meta["connection"].as_u64().unwrap_or_default(),
                    helo: meta["helo"].as_str().unwrap_or_default().to_owned(),
                    raw: fs::read(self.spool.join(format!("{seq}.eml"))).unwrap(),
                }
            })
            .collect()
    }

    /// The POP-before-SMTP gate's decisions so far (`--pop-log`), one per RCPT, oldest first,
    /// from `SPOOL/relay.log`: `{"rcpt", "peer", "allowed", "login_age", "pop_user", "at"}`
    /// (`login_age`/`pop_user`: null if no POP login from that peer was found at all).
    pub fn relay_decisions(&self) -> Vec<serde_json::Value> {
        read_lossy(&self.spool.join("relay.log"))
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok()) // a line being written is skipped
            .collect()
    }

    /// Number of TCP connections the server has accepted so far.
    pub fn connections(&self) -> u64 {
        fs::read_to_string(self.spool.join("connections"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Polls every 20 ms until at least `n` messages are spooled; panics (with the server log)
    /// after `timeout`. Returns all messages.
    pub fn wait_for_messages(&self, n: usize, timeout: Duration) -> Vec<Received> {
        let deadline = Instant::now() + timeout;
        loop {
            let count = fs::read_dir(&self.spool)
                .map(|rd| {
                    rd.filter(|e| {
                        e.as_ref()
                            .is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".json"))
                    })
                    .count()
                })
                .unwrap_or(0);
            if count >= n {
                return self.messages();
            }
            if Instant::now() > deadline {
                panic!("timed out after {timeout:?} waiting for {n} messages (have {count}); server log:\n{}", self.log());
            }
            thread::sleep(POLL);
        }
    }

    /// Polls until the server has accepted at least `n` connections.
    pub fn wait_for_connections(&self, n: u64, timeout: Duration) -> u64 {
        wait_until(timeout, &format!("{n} connections"), || {
            Some(self.connections()).filter(|&c| c >= n)
        })
    }
}

impl Drop for SmtpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Received {
    /// The parsed message (mail-parser). Panics if it does not parse.
    pub fn parsed(&self) -> mail_parser::Message<'_> {
        mail_parser::MessageParser::default()
            .parse(&self.raw)
            .expect("message parses")
    }

    /// A header's decoded value as text (addresses as `Name <addr>, ...`), None if absent.
    pub fn header(&self, name: &str) -> Option<String> {
        let msg = self.parsed();
        header_text(&msg, name)
    }

    /// A header's raw value as it is on the wire (unfolded only by trimming), None if absent.
    pub fn header_raw(&self, name: &str) -> Option<String> {
        self.parsed().header_raw(name).map(|s| s.trim().to_owned())
    }

    /// Decoded Subject.
    pub fn subject(&self) -> Option<String> {
        self.parsed().subject().map(str::to_owned)
    }

    /// Message-ID without angle brackets.
    pub fn message_id(&self) -> Option<String> {
        self.parsed().message_id().map(str::to_owned)
    }

    /// First From address (`crm@example.com`).
    #[allow(clippy::wrong_self_convention)]
    pub fn from_addr(&self) -> Option<String> {
        self.parsed()
            .from()
            .and_then(|a| a.first())
            .and_then(|a| a.address())
            .map(str::to_owned)
    }

    /// First From display name (decoded: `CRM 通知`).
    #[allow(clippy::wrong_self_convention)]
    pub fn from_name(&self) -> Option<String> {
        self.parsed()
            .from()
            .and_then(|a| a.first())
            .and_then(|a| a.name())
            .map(str::to_owned)
    }

    /// All To addresses.
    pub fn to_addrs(&self) -> Vec<String> {
        let msg = self.parsed();
        msg.to()
            .map(|a| {
                a.iter()
                    .filter_map(|a| a.address())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// All Cc addresses.
    pub fn cc_addrs(&self) -> Vec<String> {
        let msg = self.parsed();
        msg.cc()
            .map(|a| {
                a.iter()
                    .filter_map(|a| a.address())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The first text/plain body, decoded.
    pub fn body_text(&self) -> Option<String> {
        self.parsed().body_text(0).map(|s| s.into_owned())
    }
}

/// A header of a parsed message as text (see [`Received::header`]).
pub fn header_text(msg: &mail_parser::Message<'_>, name: &str) -> Option<String> {
    use mail_parser::HeaderValue;
    let addr = |a: &mail_parser::Addr<'_>| match (a.name(), a.address()) {
        (Some(n), Some(e)) => format!("{n} <{e}>"),
        (None, Some(e)) => e.to_owned(),
        (Some(n), None) => n.to_owned(),
        (None, None) => String::new(),
    };
    Some(match msg.header(name)? {
        HeaderValue::Text(t) => t.to_string(),
        HeaderValue::TextList(l) => l.join(", "),
        HeaderValue::Address(a) => a.iter().map(addr).collect::<Vec<_>>().join(", "),
        HeaderValue::DateTime(d) => d.to_rfc822(),
        _ => msg.header_raw(name)?.trim().to_owned(),
    })
}

// ---------------------------------------------------------------------------------------------
// Postfix smtp-sink
// ---------------------------------------------------------------------------------------------

/// A running `smtp-sink -c -d DIR/%s. [flags] 127.0.0.1:PORT 256`. Killed on drop.
///
/// smtp-sink keeps one file per transaction in `dir` (created at MAIL, deleted on RSET/abort,
/// complete after "."), and with -c prints `sess=N quit=N mesg=N` to stdout (a file here).
pub struct SmtpSink {
    pub port: u16,
    /// Where the dump files go.
    pub dir: PathBuf,
    stdout_path: PathBuf,
    stderr_path: PathBuf,
    child: Child,
    _tmp: TempDir,
}

/// smtp-sink's running counters (`-c`): updated when a session ends, on QUIT, and on ".".
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SinkCounters {
    /// Sessions that have ended (connections closed), not connections currently open.
    pub sessions: u64,
    /// QUIT commands received.
    pub quits: u64,
    /// Messages received (final "." seen; counted even if -f/-r/-Q rejected the ".").
    pub messages: u64,
}

/// One dump file of smtp-sink, split into its `X-*` records and the message.
#[derive(Debug, Clone)]
pub struct SinkMessage {
    /// The whole file as written by smtp-sink (LF line ends; X-* records, Received, message, "\n").
    pub file: Vec<u8>,
    /// X-Helo-Args.
    pub helo: Option<String>,
    /// Address inside `<>` of X-Mail-Args (`mail_args` keeps parameters such as SIZE=, BODY=).
    pub mail_from: String,
    pub mail_args: String,
    /// Addresses of the X-Rcpt-Args records, in order.
    pub rcpt_tos: Vec<String>,
    /// The message as received (after smtp-sink's Received header; LF line ends, dot-unstuffed,
    /// without the empty line smtp-sink appends).
    pub message: Vec<u8>,
}

impl SmtpSink {
    /// Starts smtp-sink on a free 127.0.0.1 port with `extra` flags (e.g. `["-r", "RCPT"]`,
    /// `["-f", "MAIL"]`, `["-Q", "."]`, `["-q", "DATA"]`, `["-w", "2"]`). Waits until it listens.
    pub fn start<S: AsRef<OsStr>>(extra: &[S]) -> SmtpSink {
        for _ in 0..5 {
            if let Some(sink) = Self::try_start(extra) {
                return sink;
            }
        }
        panic!("could not start smtp-sink on a port of its own");
    }

    fn try_start<S: AsRef<OsStr>>(extra: &[S]) -> Option<SmtpSink> {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::Builder::new()
            .prefix("mq-sink-")
            .tempdir()
            .unwrap();
        let dir = tmp.path().join("dump");
        fs::create_dir(&dir).unwrap();
        let (stdout_path, stderr_path) = (tmp.path().join("stdout"), tmp.path().join("stderr"));
        let port = free_port();

        let mut cmd = Command::new(smtp_sink_bin());
        if euid() == 0 {
            // smtp-sink refuses to run as root without -u; the user then needs to write `dir`.
            cmd.args(["-u", "nobody"]);
            fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755)).unwrap();
            fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).unwrap();
        }
        // -d template: strftime, then smtp-sink appends a random hex number ("1796319834.4d010da1").
        let mut template = dir.clone().into_os_string();
        template.push("/%s.");
        let mut child = cmd
            .arg("-c")
            .arg("-d")
            .arg(template)
            .args(extra)
            .arg(format!("127.0.0.1:{port}"))
            .arg("256")
            .stdin(Stdio::null())
            .stdout(fs::File::create(&stdout_path).unwrap())
            .stderr(fs::File::create(&stderr_path).unwrap())
            .spawn()
            .expect("spawn smtp-sink");

        // Ready once its socket is in LISTEN state (no connect probe: it would count as a session).
        let deadline = Instant::now() + Duration::from_secs(20);
        while listeners_on(port) == 0 {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("smtp-sink exited ({status}): {}", read_lossy(&stderr_path));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!(
                    "smtp-sink did not listen on {port} within 20 s: {}",
                    read_lossy(&stderr_path)
                );
            }
            thread::sleep(POLL);
        }
        let sink = SmtpSink {
            port,
            dir,
            stdout_path,
            stderr_path,
            child,
            _tmp: tmp,
        };
        // SO_REUSEPORT: if another sink (another test process) got the same port, both would
        // share the traffic silently. Two listeners => give this port up and try another.
        if listeners_on(port) > 1 {
            return None; // Drop kills it
        }
        Some(sink)
    }

    /// "127.0.0.1:PORT"
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// smtp-sink's stderr so far.
    pub fn log(&self) -> String {
        read_lossy(&self.stderr_path)
    }

    /// The last counters smtp-sink printed (all zero before the first event).
    pub fn counters(&self) -> SinkCounters {
        let out = read_lossy(&self.stdout_path);
        let last = out
            .split(['\r', '\n'])
            .rfind(|l| l.starts_with("sess="))
            .unwrap_or("");
        let mut c = SinkCounters::default();
        for kv in last.split_whitespace() {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            let v = v.parse().unwrap_or(0);
            match k {
                "sess" => c.sessions = v,
                "quit" => c.quits = v,
                "mesg" => c.messages = v,
                _ => {}
            }
        }
        c
    }

    /// Sessions that have ended so far (smtp-sink only counts a connection once it closes).
    pub fn connections(&self) -> u64 {
        self.counters().sessions
    }

    /// The raw dump files, oldest first (by modification time, then name). A transaction still in
    /// progress has a file too: call this once the client is done, or use `wait_for_messages`.
    pub fn raw_messages(&self) -> Vec<Vec<u8>> {
        let mut files: Vec<(std::time::SystemTime, PathBuf)> = fs::read_dir(&self.dir)
            .unwrap()
            .filter_map(|e| {
                let e = e.ok()?;
                Some((e.metadata().ok()?.modified().ok()?, e.path()))
            })
            .collect();
        files.sort();
        files
            .into_iter()
            .filter_map(|(_, p)| fs::read(p).ok())
            .collect()
    }

    /// The dump files, parsed, oldest first.
    pub fn messages(&self) -> Vec<SinkMessage> {
        self.raw_messages()
            .into_iter()
            .map(parse_sink_file)
            .collect()
    }

    /// Polls until smtp-sink has counted `n` messages and `n` dump files exist.
    pub fn wait_for_messages(&self, n: usize, timeout: Duration) -> Vec<SinkMessage> {
        let deadline = Instant::now() + timeout;
        loop {
            let counted = self.counters().messages as usize;
            let files = fs::read_dir(&self.dir).map(|rd| rd.count()).unwrap_or(0);
            if counted >= n && files >= n {
                return self.messages();
            }
            if Instant::now() > deadline {
                panic!("timed out after {timeout:?} waiting for {n} messages in smtp-sink (counted {counted}, files {files}): {}", self.log());
            }
            thread::sleep(POLL);
        }
    }

    /// Polls until at least `n` sessions have ended. smtp-sink counts a session before it deletes
    /// that session's unfinished dump file: to see an aborted transaction's file gone, wait for
    /// that too.
    pub fn wait_for_sessions(&self, n: u64, timeout: Duration) -> SinkCounters {
        wait_until(timeout, &format!("{n} smtp-sink sessions to end"), || {
            Some(self.counters()).filter(|c| c.sessions >= n)
        })
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Splits one smtp-sink dump file (see `man smtp-sink`, DUMP FILE FORMAT).
pub fn parse_sink_file(file: Vec<u8>) -> SinkMessage {
    let (mut helo, mut mail_args, mut rcpts) = (None, String::new(), Vec::new());
    let mut offset = 0; // start of the message proper
    let mut in_received = false;
    for line in file.split_inclusive(|&b| b == b'\n') {
        if in_received && !line.starts_with(b"\t") {
            break; // past the three-line Received header that ends smtp-sink's records
        }
        offset += line.len();
        let l = String::from_utf8_lossy(line);
        let l = l.trim_end_matches(['\r', '\n']);
        if let Some(v) = l.strip_prefix("X-Helo-Args: ") {
            helo = Some(v.to_owned());
        } else if let Some(v) = l.strip_prefix("X-Mail-Args: ") {
            mail_args = v.to_owned();
        } else if let Some(v) = l.strip_prefix("X-Rcpt-Args: ") {
            rcpts.push(angle_addr(v));
        } else if l.starts_with("Received: ") {
            in_received = true;
        }
    }
    let body = &file[offset.min(file.len())..];
    let message = body.strip_suffix(b"\n").unwrap_or(body).to_vec(); // smtp-sink appends an empty line
    SinkMessage {
        mail_from: angle_addr(&mail_args),
        mail_args,
        helo,
        rcpt_tos: rcpts,
        message,
        file,
    }
}

/// `<a@b.c> SIZE=12` -> `a@b.c`
fn angle_addr(args: &str) -> String {
    match (args.find('<'), args.find('>')) {
        (Some(i), Some(j)) if i < j => args[i + 1..j].to_owned(),
        _ => args.split_whitespace().next().unwrap_or("").to_owned(),
    }
}

// ---------------------------------------------------------------------------------------------
// The queue database
// ---------------------------------------------------------------------------------------------

/// The test's queue database (schema made by `mailqueue --config F migrate`).
pub struct Db {
    pub conn: rusqlite::Connection,
    pub path: PathBuf,
}

impl Db {
    /// Opens the SQLite file with a 5 s busy timeout (the daemon writes to it concurrently).
    pub fn open(path: impl AsRef<Path>) -> Db {
        let path = path.as_ref().to_path_buf();
        let conn = rusqlite::Connection::open(&path)
            .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
        conn.busy_timeout(Duration::from_secs(5)).unwrap();
        Db { conn, path }
    }

    /// Queues a mail; returns its id.
    pub fn insert(&self, to: &str, subject: &str, body: &str) -> i64 {
        self.conn
            .execute(
                "INSERT INTO mail_queue (to_addrs, subject, body_text) VALUES (?1, ?2, ?3)",
                rusqlite::params![to, subject, body],
            )
            .expect("insert into mail_queue");
        self.conn.last_insert_rowid()
    }

    /// Queues a row with arbitrary columns: `db.insert_cols(&[("to_addrs", &"a@b.c"), ("cc_addrs", &"x@y.z")])`.
    pub fn insert_cols(&self, cols: &[(&str, &dyn rusqlite::ToSql)]) -> i64 {
        let names: Vec<&str> = cols.iter().map(|(n, _)| *n).collect();
        let marks: Vec<String> = (1..=cols.len()).map(|i| format!("?{i}")).collect();
        let sql = format!(
            "INSERT INTO mail_queue ({}) VALUES ({})",
            names.join(", "),
            marks.join(", ")
        );
        let values: Vec<&dyn rusqlite::ToSql> = cols.iter().map(|(_, v)| *v).collect();
        self.conn
            .execute(&sql, values.as_slice())
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        self.conn.last_insert_rowid()
    }

    /// The row's `status` column.
    pub fn status(&self, id: i64) -> String {
        self.conn
            .query_row("SELECT status FROM mail_queue WHERE id = ?1", [id], |r| {
                r.get(0)
            })
            .unwrap_or_else(|e| panic!("status of row {id}: {e}"))
    }

    /// The whole row as a JSON object (column → value; NULL → null, BLOB → lossy UTF-8 string).
    /// `assert_eq!(row["attempts"], 1)` and `row["last_error"].as_str()` work directly.
    pub fn row(&self, id: i64) -> serde_json::Value {
        let mut rows = self.rows_with("SELECT * FROM mail_queue WHERE id = ?1", [id]);
        assert_eq!(rows.len(), 1, "row {id} not found in mail_queue");
        rows.remove(0)
    }

    /// Any SELECT as a list of JSON objects.
    pub fn rows(&self, sql: &str) -> Vec<serde_json::Value> {
        self.rows_with(sql, [])
    }

    /// Any SELECT with parameters as a list of JSON objects.
    pub fn rows_with(&self, sql: &str, params: impl rusqlite::Params) -> Vec<serde_json::Value> {
        use rusqlite::types::ValueRef;
        let mut stmt = self
            .conn
            .prepare(sql)
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        let names: Vec<String> = stmt.column_names().map(str::to_owned).collect();
        let rows = stmt
            .query_map(params, |r| {
                let mut obj = serde_json::Map::new();
                for (i, name) in names.iter().enumerate() {
                    let v = match r.get_ref(i)? {
                        ValueRef::Null => serde_json::Value::Null,
                        ValueRef::Integer(n) => n.into(),
                        ValueRef::Real(f) => f.into(),
                        ValueRef::Text(t) | ValueRef::Blob(t) => {
                            String::from_utf8_lossy(t).into_owned().into()
                        }
                    };
                    obj.insert(name.clone(), v);
                }
                Ok(serde_json::Value::Object(obj))
            })
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        rows.collect::<Result<_, _>>()
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// The first column of the first row: `db.query_one::<i64>("SELECT count(*) FROM mail_queue")`.
    pub fn query_one<T: rusqlite::types::FromSql>(&self, sql: &str) -> T {
        self.conn
            .query_row(sql, [], |r| r.get(0))
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// Runs a statement; returns the number of changed rows.
    pub fn execute(&self, sql: &str) -> usize {
        self.conn
            .execute(sql, [])
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// Polls until row `id` has status `status`; returns the row.
    pub fn wait_for_status(&self, id: i64, status: &str, timeout: Duration) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        loop {
            let row = self.row(id);
            if row["status"] == status {
                return row;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting for row {id} to be {status:?}; row: {row}"
            );
            thread::sleep(POLL);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Config and running the daemon
// ---------------------------------------------------------------------------------------------

/// A TOML basic string for `s` (JSON string escapes are valid TOML escapes).
pub fn toml_str(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

/// A config for `db_path` and a plaintext, unauthenticated SMTP server on 127.0.0.1:`smtp_port`,
/// polling every 50 ms, no pacing. Append or `replace` to vary it.
pub fn base_config(db_path: &Path, smtp_port: u16) -> String {
    format!(
        r#"[queue]
database = {db}
poll_interval = "50ms"
max_attempts = 5
retry_backoff = ["1s", "5s"]

[sender]
from_address = "crm@example.com"
from_name = "CRM 通知"
local_hostname = "crm.example.test"

[smtp]
transport = "smtp"
host = "127.0.0.1"
port = {smtp_port}
tls = "none"
auth = false
timeout = "10s"

[rate]
interval_ms = 0

[log]
level = "info"
"#,
        db = toml_str(db_path.to_str().expect("UTF-8 path")),
    )
}

/// Writes `toml_text` to `dir/mailqueue.toml`; returns its path.
pub fn write_config(dir: &Path, toml_text: &str) -> PathBuf {
    let path = dir.join("mailqueue.toml");
    fs::write(&path, toml_text).unwrap();
    path
}

fn mailqueue_cmd<S: AsRef<OsStr>>(config: &Path, args: &[S]) -> Command {
    let mut cmd = Command::new(mailqueue_bin());
    cmd.arg("--config")
        .arg(config)
        .args(args)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null());
    cmd
}

/// Runs `mailqueue --config CONFIG ARGS...` to completion.
pub fn run_mailqueue<S: AsRef<OsStr>>(config: &Path, args: &[S]) -> Output {
    mailqueue_cmd(config, args).output().expect("run mailqueue")
}

/// `mailqueue --config CONFIG migrate`, asserting success.
pub fn migrate(config: &Path) {
    let out = run_mailqueue(config, &["migrate"]);
    assert!(
        out.status.success(),
        "mailqueue migrate failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `mailqueue --config CONFIG run --once`, asserting success; returns its output.
pub fn run_once(config: &Path) -> Output {
    let out = run_mailqueue(config, &["run", "--once"]);
    assert!(
        out.status.success(),
        "mailqueue run --once failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Spawns `mailqueue --config CONFIG ARGS...` with stdout/stderr piped.
/// Careful: a pipe nobody reads fills up (64 KiB) and blocks the daemon; prefer [`Daemon`].
pub fn spawn_mailqueue<S: AsRef<OsStr>>(config: &Path, args: &[S]) -> Child {
    mailqueue_cmd(config, args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn mailqueue")
}

/// A running daemon whose stdout/stderr are drained into memory by background threads.
/// Killed (SIGKILL) on drop if still running.
pub struct Daemon {
    pub child: Child,
    stdout: Arc<Mutex<Vec<u8>>>,
    stderr: Arc<Mutex<Vec<u8>>>,
    readers: Vec<thread::JoinHandle<()>>,
}

impl Daemon {
    /// Spawns `mailqueue --config CONFIG ARGS...` (e.g. `&["run"]`).
    pub fn spawn<S: AsRef<OsStr>>(config: &Path, args: &[S]) -> Daemon {
        Daemon::from_child(spawn_mailqueue(config, args))
    }

    /// Spawns a prepared command (extra environment, say) as a [`Daemon`].
    pub fn from_command(mut cmd: Command) -> Daemon {
        let child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn mailqueue");
        Daemon::from_child(child)
    }

    fn from_child(mut child: Child) -> Daemon {
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let readers = vec![
            drain(child.stdout.take().unwrap(), stdout.clone()),
            drain(child.stderr.take().unwrap(), stderr.clone()),
        ];
        Daemon {
            child,
            stdout,
            stderr,
            readers,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Output so far.
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.stdout.lock().unwrap()).into_owned()
    }
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
    }

    /// Sends a signal by name ("TERM", "INT", "HUP", ...) with /bin/kill.
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .expect("kill");
        assert!(ok.success(), "kill -{sig} {} failed", self.pid());
    }

    /// Polls for exit; None if still running after `timeout`.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                // Let the readers reach EOF so stdout()/stderr() are complete.
                for r in self.readers.drain(..) {
                    let _ = r.join();
                }
                return Some(st);
            }
            if Instant::now() > deadline {
                return None;
            }
            thread::sleep(POLL);
        }
    }

    /// SIGTERM, then waits up to `timeout` for exit (panics with stderr otherwise).
    pub fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        self.signal("TERM");
        match self.wait_timeout(timeout) {
            Some(st) => st,
            None => panic!(
                "mailqueue did not exit within {timeout:?} of SIGTERM; stderr:\n{}",
                self.stderr()
            ),
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn drain(mut r: impl Read + Send + 'static, buf: Arc<Mutex<Vec<u8>>>) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let mut chunk = [0u8; 8192];
        while let Ok(n) = r.read(&mut chunk) {
            if n == 0 {
                break;
            }
            buf.lock().unwrap().extend_from_slice(&chunk[..n]);
        }
    })
}

// ---------------------------------------------------------------------------------------------
// A tiny raw SMTP client (for harness self-tests and protocol-level checks)
// ---------------------------------------------------------------------------------------------

/// A line-oriented plaintext SMTP client over std TcpStream, for talking to the test servers
/// directly. `cmd` sends one line and returns the full (possibly multi-line) reply.
pub struct RawSmtp {
    reader: BufReader<TcpStream>,
    stream: TcpStream,
}

impl RawSmtp {
    /// Connects and reads the greeting; returns the client and the greeting reply.
    pub fn connect(port: u16) -> (RawSmtp, String) {
        let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let reader = BufReader::new(stream.try_clone().unwrap());
        let mut c = RawSmtp { reader, stream };
        let greeting = c.reply();
        (c, greeting)
    }

    /// Reads one reply (all `NNN-` lines up to the `NNN ` line), lines joined with "\n".
    pub fn reply(&mut self) -> String {
        let mut lines = Vec::new();
        loop {
            let mut line = String::new();
            let n = self.reader.read_line(&mut line).expect("read reply");
            assert!(n > 0, "connection closed; reply so far: {lines:?}");
            let line = line.trim_end().to_owned();
            let last = line.len() < 4 || line.as_bytes()[3] != b'-';
            lines.push(line);
            if last {
                return lines.join("\n");
            }
        }
    }

    /// Sends `line` + CRLF and returns the reply.
    pub fn cmd(&mut self, line: &str) -> String {
        use std::io::Write;
        self.stream
            .write_all(format!("{line}\r\n").as_bytes())
            .unwrap();
        self.reply()
    }

    /// Sends DATA, the message (dot-stuffed here, CRLF line ends) and ".", returns the final reply.
    pub fn data(&mut self, message: &str) -> String {
        use std::io::Write;
        let r = self.cmd("DATA");
        assert!(r.starts_with("354"), "DATA: {r}");
        let mut out = String::new();
        for line in message.lines() {
            if line.starts_with('.') {
                out.push('.');
            }
            out.push_str(line);
            out.push_str("\r\n");
        }
        out.push_str(".\r\n");
        self.stream.write_all(out.as_bytes()).unwrap();
        self.reply()
    }
}

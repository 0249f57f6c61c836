//! POP-before-SMTP: a small POP3 client that logs in once and logs out again.
//!
//! Job: open a POP3 session to the account's server (plain, STLS as in RFC 2595, or POP3S),
//! log in with USER/PASS or APOP (RFC 1939), and QUIT — so that a provider which allows relaying
//! only after a recent POP login lets the SMTP session through. Every step is reported to an
//! optional progress hook (connect / STLS / login / QUIT) so an admin sees which one fails, and
//! every failure is a [`PopError`] with a stable code and a sentence in English or Japanese.
//!
//! Not its job: reading or deleting mail (no STAT/LIST/RETR/DELE), SASL AUTH, deciding *when*
//! to log in (the scheduler does), or retrying (policy does).
//!
//! Invariants:
//! - every network step (connect, each reply, the TLS handshake, QUIT) is bounded by
//!   [`PopSettings::timeout`]: a silent, slow or closing server gives an error, never a hang;
//! - `tls = StartTls` never falls back to plaintext: without STLS in CAPA, or when STLS is
//!   refused, no credentials are sent (not even USER);
//! - after `+OK` to STLS nothing the server sent in plaintext is kept: bytes already buffered
//!   behind that reply fail the session before the handshake (STARTTLS response injection);
//! - APOP without a timestamp in the greeting fails closed (it never falls back to USER/PASS);
//! - QUIT is sent after every session that got past the greeting and is still in step with the
//!   server, including after a refused login or STLS, so the server releases the maildrop lock
//!   (after a timeout, a broken reply, injected plaintext or a failed TLS handshake the
//!   connection is dropped instead: a QUIT could be misread there, or go out in plaintext where
//!   TLS was expected);
//! - lines are capped at [`MAX_LINE`] bytes; the password is never formatted (`Debug` masks it)
//!   and never appears in an error.

use std::fmt;
use std::future::Future;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use md5::{Digest, Md5};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_rustls::rustls;
use tokio_rustls::TlsConnector;

/// The longest line accepted from the server, CRLF included. RFC 1939 allows 512 octets for a
/// status line; real servers' CAPA and greeting lines stay well below this.
pub const MAX_LINE: usize = 4096;

/// The most lines accepted in a CAPA listing, so that an endless listing ends in an error.
const MAX_CAPA_LINES: usize = 200;

/// How the POP3 connection is protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PopTls {
    /// Plaintext (port 110). Only sensible on a trusted network.
    None,
    /// Plaintext first, then `STLS` (RFC 2595) before any credentials (port 110).
    #[default]
    StartTls,
    /// TLS from the first byte: POP3S (port 995).
    Tls,
}

/// Everything needed to log in to one POP3 account.
#[derive(Clone)]
pub struct PopSettings {
    /// The server's host name or IP address; also the name its certificate must carry.
    pub host: String,
    /// The server's port (110 for plaintext/STLS, 995 for POP3S).
    pub port: u16,
    /// How the connection is protected; see [`PopTls`].
    pub tls: PopTls,
    /// The POP user name, sent with USER or APOP.
    pub user: String,
    /// The POP password (the APOP shared secret). Never formatted: `Debug` masks it.
    pub password: String,
    /// Log in with APOP (an MD5 digest of the greeting's timestamp and the password) instead of
    /// USER/PASS, for servers that still want it on plaintext connections.
    pub apop: bool,
    /// The limit for each step: connect, the TLS handshake, and every reply.
    pub timeout: Duration,
    /// A PEM file of CA certificates to trust *instead of* the built-in web roots (for a
    /// provider with a private CA). `None` trusts webpki-roots.
    pub ca_file: Option<PathBuf>,
    /// The local address to connect from, for providers that allow relaying per source IP on a
    /// host with several addresses. `None` lets the OS choose.
    pub source_address: Option<IpAddr>,
}

impl fmt::Debug for PopSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PopSettings")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls", &self.tls)
            .field("user", &self.user)
            .field("password", &"********")
            .field("apop", &self.apop)
            .field("timeout", &self.timeout)
            .field("ca_file", &self.ca_file)
            .field("source_address", &self.source_address)
            .finish()
    }
}

/// What a successful login found out, for logs and `check-config --connect`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PopSession {
    /// `host:port` as connected to.
    pub server: String,
    /// The greeting's text after `+OK` (may be empty).
    pub greeting: String,
    /// Whether the credentials went over TLS (STLS or POP3S).
    pub tls: bool,
    /// How the login was made: `"APOP"` or `"USER/PASS"`.
    pub method: &'static str,
    /// The server's CAPA lines (after STLS: the ones it sent over TLS); empty when the server
    /// answered CAPA with `-ERR`. Shown by `check-config --connect`, e.g. to suggest STLS.
    pub capabilities: Vec<String>,
    /// The outcome of QUIT: `Ok(reply text)`, or `Err(why)` when the server refused it, closed
    /// early or did not answer. The login already counted by then, so this is not an error; it
    /// is kept so a caller can warn that the maildrop lock may not have been released.
    pub quit: Result<String, String>,
}

/// Everything that can go wrong in a POP-before-SMTP login.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PopError {
    /// The TCP connection could not be made (name not found, refused, unreachable, source
    /// address not bindable), or the server refused the session in its greeting.
    #[error("{}", self.text(false))]
    Connect {
        /// `host:port`.
        server: String,
        /// The OS error or the server's `-ERR` greeting.
        detail: String,
    },
    /// TLS could not be set up: bad `ca_file`, handshake failure, untrusted certificate, STLS
    /// refused, or plaintext injected after the STLS reply.
    #[error("{}", self.text(false))]
    Tls {
        /// What went wrong, with rustls's own words where it gave some.
        detail: String,
    },
    /// `tls = StartTls` but the server's CAPA does not list STLS: nothing was sent in plaintext.
    #[error("{}", self.text(false))]
    StlsUnavailable,
    /// `apop = true` but the greeting carries no `<...@...>` timestamp: no login was attempted.
    #[error("{}", self.text(false))]
    ApopUnavailable,
    /// The server refused the login.
    #[error("{}", self.text(false))]
    Login {
        /// The server's reply line as sent, e.g. `-ERR [AUTH] Authentication failed.`
        reply: String,
    },
    /// The server did not answer within [`PopSettings::timeout`].
    #[error("{}", self.text(false))]
    Timeout {
        /// The step that was waited for (`connect`, `greeting`, `PASS`, ...).
        step: &'static str,
        /// The timeout, in whole seconds rounded up.
        secs: u64,
    },
    /// The server sent something that is not POP3 (garbage, an over-long line), or a setting
    /// cannot be sent (a line break in the user name).
    #[error("{}", self.text(false))]
    Protocol {
        /// The step (`greeting`, `CAPA`, ..., or `settings`).
        step: &'static str,
        /// What was wrong, with the offending line shown safely.
        detail: String,
    },
    /// The server closed the connection before answering.
    #[error("{}", self.text(false))]
    Closed {
        /// The step whose reply never came.
        step: &'static str,
    },
}

impl PopError {
    /// The stable code for logs and the queue table. Never rename one.
    pub fn code(&self) -> &'static str {
        match self {
            PopError::Connect { .. } => "pop_connect_failed",
            PopError::Tls { .. } | PopError::StlsUnavailable => "pop_tls_failed",
            PopError::Login { .. } | PopError::ApopUnavailable => "pop_login_failed",
            PopError::Timeout { .. } => "pop_timeout",
            PopError::Protocol { .. } | PopError::Closed { .. } => "pop_protocol_error",
        }
    }

    /// The sentence shown to an admin, in Japanese when `ja`, else English; it carries the
    /// server's reply where there is one. Always one line.
    pub fn text(&self, ja: bool) -> String {
        match self {
            PopError::Connect { server, detail } => {
                if ja {
                    format!("POPサーバー {server} に接続できませんでした ({detail})")
                } else {
                    format!("Could not connect to the POP server {server} ({detail})")
                }
            }
            PopError::Tls { detail } => {
                if ja {
                    format!("POPサーバーとのTLS接続に失敗しました ({detail})")
                } else {
                    format!("TLS with the POP server could not be set up ({detail})")
                }
            }
            PopError::StlsUnavailable => {
                if ja {
                    "POPサーバーがSTLSに対応していないため、暗号化せずにログインすることはしませんでした".into()
                } else {
                    "The POP server does not offer STLS; nothing was sent unencrypted".into()
                }
            }
            PopError::ApopUnavailable => {
                if ja {
                    "POPサーバーがAPOPに対応していません (挨拶にタイムスタンプがありません)。ログインは行いませんでした".into()
                } else {
                    "The POP server does not offer APOP (its greeting has no timestamp); no login was attempted".into()
                }
            }
            PopError::Login { reply } => {
                if ja {
                    format!("POP認証に失敗しました ({reply})")
                } else {
                    format!("POP login failed ({reply})")
                }
            }
            PopError::Timeout { step, secs } => {
                if ja {
                    format!("POPサーバーが{secs}秒以内に応答しませんでした ({step})")
                } else {
                    format!("The POP server did not answer within {secs} s ({step})")
                }
            }
            PopError::Protocol { step, detail } => {
                if ja {
                    format!("POPサーバーの応答がプロトコルに沿っていません ({step}: {detail})")
                } else {
                    format!(
                        "The POP server's reply does not follow the protocol ({step}: {detail})"
                    )
                }
            }
            PopError::Closed { step } => {
                if ja {
                    format!("POPサーバーが応答する前に接続を切断しました ({step})")
                } else {
                    format!("The POP server closed the connection before answering ({step})")
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Pure parsing
// ---------------------------------------------------------------------------------------------

/// A POP3 status line: `+OK text` or `-ERR text` (the text may be empty).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PopReply {
    /// `+OK`, with the text after it.
    Ok(String),
    /// `-ERR`, with the text after it.
    Err(String),
}

impl PopReply {
    /// The line as the server sent it, minus CRLF, e.g. `-ERR [AUTH] Authentication failed.`
    pub fn line(&self) -> String {
        let (status, text) = match self {
            PopReply::Ok(t) => ("+OK", t),
            PopReply::Err(t) => ("-ERR", t),
        };
        if text.is_empty() {
            status.to_string()
        } else {
            format!("{status} {text}")
        }
    }
}

/// Strips one trailing CRLF, bare LF or bare CR.
fn strip_eol(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// Shows server bytes safely on one line: invalid UTF-8 becomes U+FFFD, control characters
/// become `\xNN`, and long text is cut.
fn printable(bytes: &[u8]) -> String {
    const MAX_SHOWN: usize = 200;
    let mut out = String::new();
    for (i, c) in String::from_utf8_lossy(bytes).chars().enumerate() {
        if i == MAX_SHOWN {
            out.push('…');
            break;
        }
        if c.is_control() {
            out.push_str(&format!("\\x{:02x}", c as u32));
        } else {
            out.push(c);
        }
    }
    out
}

/// Parses one status line (with or without its CRLF or bare LF). The status is matched without
/// regard to case (RFC 1939 says `+OK`/`-ERR`, some old servers wrote `+ok`) and must be followed
/// by a space or the end of the line. The text is made printable (see [`printable`]).
pub fn parse_status_line(line: &[u8]) -> Result<PopReply, String> {
    let body = strip_eol(line);
    if body.is_empty() {
        return Err("empty line where a +OK/-ERR reply was expected".into());
    }
    let split = |status_len: usize| -> Option<String> {
        let rest = &body[status_len..];
        match rest.first() {
            None => Some(String::new()),
            Some(b' ') => Some(printable(&rest[1..]).trim().to_string()),
            Some(_) => None,
        }
    };
    if body.len() >= 3 && body[..3].eq_ignore_ascii_case(b"+OK") {
        if let Some(text) = split(3) {
            return Ok(PopReply::Ok(text));
        }
    }
    if body.len() >= 4 && body[..4].eq_ignore_ascii_case(b"-ERR") {
        if let Some(text) = split(4) {
            return Ok(PopReply::Err(text));
        }
    }
    Err(format!(
        "not a POP3 reply (expected +OK or -ERR): \"{}\"",
        printable(body)
    ))
}

/// One line of a multi-line response (RFC 1939 §3), after the status line.
#[derive(Debug, Clone, PartialEq, Eq)]
enum MultiLine {
    /// The terminating `.` line.
    End,
    /// A content line, byte-stuffing removed, CRLF stripped.
    Line(Vec<u8>),
}

/// Classifies a line of a multi-line response: `.` alone ends it; a leading `.` before more text
/// is byte-stuffing and is removed.
fn multiline_item(line: &[u8]) -> MultiLine {
    let body = strip_eol(line);
    match body {
        b"." => MultiLine::End,
        [b'.', rest @ ..] => MultiLine::Line(rest.to_vec()),
        _ => MultiLine::Line(body.to_vec()),
    }
}

/// Whether a CAPA listing names the capability (the first word of a line, case-insensitive).
fn capa_has(capa: &[Vec<u8>], name: &str) -> bool {
    capa.iter().any(|l| {
        l.split(|b| *b == b' ')
            .next()
            .is_some_and(|w| w.eq_ignore_ascii_case(name.as_bytes()))
    })
}

/// The APOP timestamp in a greeting: the first `<...>` that contains an `@` and only printable
/// ASCII without spaces (RFC 1939 §7: a msg-id such as `<1896.697170952@dbc.mtview.ca.us>`),
/// brackets included.
pub fn apop_timestamp(greeting: &[u8]) -> Option<String> {
    let mut rest = greeting;
    while let Some(start) = rest.iter().position(|b| *b == b'<') {
        let after = &rest[start + 1..];
        let end = after.iter().position(|b| *b == b'>')?;
        let inner = &after[..end];
        let valid = !inner.is_empty()
            && inner.contains(&b'@')
            && inner.iter().all(|b| b.is_ascii_graphic() && *b != b'<');
        if valid {
            return Some(format!("<{}>", String::from_utf8_lossy(inner)));
        }
        rest = after;
    }
    None
}

/// The APOP digest: lower-case hex MD5 of the timestamp (brackets included) and the secret.
pub fn apop_digest(timestamp: &str, secret: &str) -> String {
    let mut h = Md5::new();
    h.update(timestamp.as_bytes());
    h.update(secret.as_bytes());
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

// ---------------------------------------------------------------------------------------------
// The session
// ---------------------------------------------------------------------------------------------

/// A byte stream the session can run over: plain TCP or TLS.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// The progress hook: `(step, Ok(detail) | Err(why))`, steps `connect`, `STLS`, `login`, `QUIT`.
pub type ProgressFn<'a> = &'a (dyn Fn(&str, Result<&str, &str>) + Sync);

/// An open connection and the settings' timeout.
struct Conn {
    /// The stream with a read buffer. Replaced (after checking the buffer is empty) at STLS.
    io: BufReader<Box<dyn Io>>,
    /// [`PopSettings::timeout`].
    timeout: Duration,
}

/// The timeout in whole seconds, rounded up so that 300 ms does not read "0 s".
fn secs(d: Duration) -> u64 {
    d.as_millis().div_ceil(1000) as u64
}

/// Runs one step under the timeout.
async fn bounded<T>(
    timeout: Duration,
    step: &'static str,
    f: impl Future<Output = Result<T, PopError>>,
) -> Result<T, PopError> {
    match tokio::time::timeout(timeout, f).await {
        Ok(r) => r,
        Err(_) => Err(PopError::Timeout {
            step,
            secs: secs(timeout),
        }),
    }
}

impl Conn {
    fn new(io: Box<dyn Io>, timeout: Duration) -> Conn {
        Conn {
            io: BufReader::new(io),
            timeout,
        }
    }

    /// Reads one line (CRLF or LF terminated, at most [`MAX_LINE`] bytes), without a timeout.
    async fn read_line_raw(&mut self, step: &'static str) -> Result<Vec<u8>, PopError> {
        let mut buf = Vec::new();
        let n = (&mut self.io)
            .take(MAX_LINE as u64)
            .read_until(b'\n', &mut buf)
            .await
            .map_err(|e| io_error(step, "read", e))?;
        if buf.ends_with(b"\n") {
            Ok(buf)
        } else if n >= MAX_LINE {
            Err(PopError::Protocol {
                step,
                detail: format!("a line longer than {MAX_LINE} bytes"),
            })
        } else {
            // End of stream, possibly in the middle of a line.
            Err(PopError::Closed { step })
        }
    }

    /// Reads one status line within the timeout. Returns the parsed reply and the raw line.
    async fn reply(&mut self, step: &'static str) -> Result<(PopReply, Vec<u8>), PopError> {
        let t = self.timeout;
        bounded(t, step, async {
            let line = self.read_line_raw(step).await?;
            let reply =
                parse_status_line(&line).map_err(|detail| PopError::Protocol { step, detail })?;
            Ok((reply, line))
        })
        .await
    }

    /// Reads the lines of a multi-line response up to its `.`, all within one timeout.
    async fn multiline(&mut self, step: &'static str) -> Result<Vec<Vec<u8>>, PopError> {
        let t = self.timeout;
        bounded(t, step, async {
            let mut lines = Vec::new();
            loop {
                let line = self.read_line_raw(step).await?;
                match multiline_item(&line) {
                    MultiLine::End => return Ok(lines),
                    MultiLine::Line(l) => lines.push(l),
                }
                if lines.len() > MAX_CAPA_LINES {
                    return Err(PopError::Protocol {
                        step,
                        detail: format!("more than {MAX_CAPA_LINES} lines without the final \".\""),
                    });
                }
            }
        })
        .await
    }

    /// Sends one command line within the timeout.
    async fn send(&mut self, step: &'static str, line: &str) -> Result<(), PopError> {
        let t = self.timeout;
        bounded(t, step, async {
            let io = self.io.get_mut();
            let mut data = Vec::with_capacity(line.len() + 2);
            data.extend_from_slice(line.as_bytes());
            data.extend_from_slice(b"\r\n");
            io.write_all(&data)
                .await
                .map_err(|e| io_error(step, "write", e))?;
            io.flush().await.map_err(|e| io_error(step, "write", e))
        })
        .await
    }

    /// Sends a command and reads its status line.
    async fn command(&mut self, step: &'static str, line: &str) -> Result<PopReply, PopError> {
        self.send(step, line).await?;
        Ok(self.reply(step).await?.0)
    }

    /// CAPA, tolerating `-ERR` from servers older than RFC 2449 (`None` then).
    async fn capa(&mut self) -> Result<Option<Vec<Vec<u8>>>, PopError> {
        match self.command("CAPA", "CAPA").await? {
            PopReply::Ok(_) => Ok(Some(self.multiline("CAPA").await?)),
            PopReply::Err(_) => Ok(None),
        }
    }

    /// QUIT and its reply, then closes the stream (TLS close_notify included). Never fails: the
    /// outcome is returned for the caller to report.
    async fn quit(mut self) -> Result<String, String> {
        let r = match self.command("QUIT", "QUIT").await {
            Ok(PopReply::Ok(t)) => Ok(t),
            Ok(r @ PopReply::Err(_)) => Err(r.line()),
            Err(e) => Err(e.text(false)),
        };
        let t = self.timeout;
        let _ = tokio::time::timeout(t, self.io.get_mut().shutdown()).await;
        r
    }
}

/// A read or write that failed: [`PopError::Closed`] when the server has gone away (also when it
/// reset the connection), else the OS error. Over TLS, rustls errors (a bad record) land here too.
fn io_error(step: &'static str, what: &str, e: std::io::Error) -> PopError {
    use std::io::ErrorKind::*;
    match e.kind() {
        BrokenPipe | ConnectionReset | ConnectionAborted | UnexpectedEof => {
            PopError::Closed { step }
        }
        _ => PopError::Protocol {
            step,
            detail: format!("{what} failed: {e}"),
        },
    }
}

/// Refuses settings that cannot be sent safely: a line break would inject commands.
fn validate(s: &PopSettings) -> Result<(), PopError> {
    let bad = |detail: &str| {
        Err(PopError::Protocol {
            step: "settings",
            detail: detail.into(),
        })
    };
    if s.user.is_empty() {
        return bad("the POP user name is empty");
    }
    if s.user.chars().any(|c| c.is_control() || c == ' ') {
        return bad("the POP user name contains a space or a control character");
    }
    if s.password.contains(['\r', '\n', '\0']) {
        return bad("the POP password contains a line break or NUL");
    }
    if s.host.is_empty() {
        return bad("the POP server host is empty");
    }
    Ok(())
}

/// The TLS client config for `s` (its `ca_file`, or the webpki roots).
async fn tls_config(s: &PopSettings) -> Result<Arc<rustls::ClientConfig>, PopError> {
    crate::net::client_config(s.ca_file.as_deref()).map_err(|detail| PopError::Tls { detail })
}

/// Resolves the host and connects (from `source_address` when set), all within the timeout.
async fn connect(s: &PopSettings, server: &str) -> Result<TcpStream, PopError> {
    crate::net::connect(&s.host, s.port, s.source_address, s.timeout)
        .await
        .map_err(|e| match e {
            crate::net::ConnectError::Timeout => PopError::Timeout {
                step: "connect",
                secs: secs(s.timeout),
            },
            crate::net::ConnectError::Failed(detail) => PopError::Connect {
                server: server.to_string(),
                detail,
            },
        })
}

/// The TLS handshake over `io`, within the timeout.
async fn handshake(
    cfg: Arc<rustls::ClientConfig>,
    host: &str,
    io: Box<dyn Io>,
    timeout: Duration,
) -> Result<Box<dyn Io>, PopError> {
    let name =
        rustls::pki_types::ServerName::try_from(host.to_string()).map_err(|e| PopError::Tls {
            detail: format!("{host} is not a valid TLS server name: {e}"),
        })?;
    bounded(timeout, "TLS handshake", async {
        let tls = TlsConnector::from(cfg)
            .connect(name, io)
            .await
            .map_err(|e| PopError::Tls {
                detail: e.to_string(),
            })?;
        Ok(Box::new(tls) as Box<dyn Io>)
    })
    .await
}

/// Logs in and out once. See [`login_with_progress`].
pub async fn login(s: &PopSettings) -> Result<PopSession, PopError> {
    login_with_progress(s, &|_, _| {}).await
}

/// Logs in and out once, reporting each step to `progress` as it ends: `connect` (TCP, POP3S
/// handshake and greeting), `STLS` (only with [`PopTls::StartTls`]), `login`, `QUIT`.
///
/// A refused login still sends QUIT before returning [`PopError::Login`]. A QUIT that is refused
/// or unanswered after a successful login does not fail the call (see [`PopSession::quit`]).
pub async fn login_with_progress(
    s: &PopSettings,
    progress: ProgressFn<'_>,
) -> Result<PopSession, PopError> {
    let server = if s.host.contains(':') {
        format!("[{}]:{}", s.host, s.port)
    } else {
        format!("{}:{}", s.host, s.port)
    };

    // connect (+ POP3S handshake) + greeting
    let connected = async {
        validate(s)?;
        let tls_cfg = match s.tls {
            PopTls::None => None,
            PopTls::StartTls | PopTls::Tls => Some(tls_config(s).await?),
        };
        let tcp = connect(s, &server).await?;
        let mut io: Box<dyn Io> = Box::new(tcp);
        if let (PopTls::Tls, Some(cfg)) = (s.tls, &tls_cfg) {
            io = handshake(cfg.clone(), &s.host, io, s.timeout).await?;
        }
        let mut conn = Conn::new(io, s.timeout);
        let (greeting, raw) = conn.reply("greeting").await?;
        match greeting {
            PopReply::Ok(text) => Ok((conn, tls_cfg, text, apop_timestamp(&raw))),
            PopReply::Err(_) => Err(PopError::Connect {
                server: server.clone(),
                detail: format!("the server refused the session: {}", greeting.line()),
            }),
        }
    }
    .await;
    let (mut conn, tls_cfg, greeting, timestamp) = match connected {
        Ok((conn, cfg, text, ts)) => {
            let shown = if text.is_empty() {
                "+OK".to_string()
            } else {
                text.clone()
            };
            progress("connect", Ok(&format!("{server}: {shown}")));
            (conn, cfg, text, ts)
        }
        Err(e) => {
            progress("connect", Err(&e.text(false)));
            return Err(e);
        }
    };

    // CAPA and STLS
    let mut tls = s.tls == PopTls::Tls;
    let mut capa = match conn.capa().await {
        Ok(c) => c,
        Err(e) => {
            let step = if s.tls == PopTls::StartTls {
                "STLS"
            } else {
                "login"
            };
            progress(step, Err(&e.text(false)));
            return Err(e);
        }
    };
    if let (PopTls::StartTls, Some(cfg)) = (s.tls, tls_cfg) {
        match start_tls(conn, capa.as_deref(), cfg, &s.host).await {
            Ok((c, tls_capa)) => {
                conn = c;
                capa = tls_capa;
                tls = true;
                progress("STLS", Ok("TLS started"));
            }
            Err((e, still_in_step)) => {
                progress("STLS", Err(&e.text(false)));
                // Still in step with the server (no STLS offered, or a plaintext -ERR to it):
                // say goodbye. Nothing may be sent after an injection or a failed handshake.
                if let Some(conn) = still_in_step {
                    report_quit(progress, &conn.quit().await);
                }
                return Err(e);
            }
        }
    }

    // login
    let method = if s.apop { "APOP" } else { "USER/PASS" };
    let logged_in: Result<(), (PopError, bool)> = async {
        if s.apop {
            let ts = timestamp
                .as_deref()
                .ok_or((PopError::ApopUnavailable, true))?;
            let digest = apop_digest(ts, &s.password);
            match conn
                .command("APOP", &format!("APOP {} {digest}", s.user))
                .await
            {
                Ok(PopReply::Ok(_)) => Ok(()),
                Ok(r @ PopReply::Err(_)) => Err((PopError::Login { reply: r.line() }, true)),
                Err(e) => Err((e, false)),
            }
        } else {
            match conn.command("USER", &format!("USER {}", s.user)).await {
                Ok(PopReply::Ok(_)) => {}
                Ok(r @ PopReply::Err(_)) => {
                    return Err((PopError::Login { reply: r.line() }, true))
                }
                Err(e) => return Err((e, false)),
            }
            match conn.command("PASS", &format!("PASS {}", s.password)).await {
                Ok(PopReply::Ok(_)) => Ok(()),
                Ok(r @ PopReply::Err(_)) => Err((PopError::Login { reply: r.line() }, true)),
                Err(e) => Err((e, false)),
            }
        }
    }
    .await;
    match logged_in {
        Ok(()) => {
            let how = format!(
                "{} as {} ({method})",
                if tls { "over TLS" } else { "in plaintext" },
                s.user
            );
            progress("login", Ok(&how));
        }
        Err((e, in_step)) => {
            progress("login", Err(&e.text(false)));
            if in_step {
                let q = conn.quit().await;
                report_quit(progress, &q);
            }
            return Err(e);
        }
    }

    // QUIT
    let quit = conn.quit().await;
    report_quit(progress, &quit);
    Ok(PopSession {
        server,
        greeting,
        tls,
        method,
        capabilities: capa
            .unwrap_or_default()
            .iter()
            .map(|l| printable(l))
            .collect(),
        quit,
    })
}

/// STLS and the handshake after it (RFC 2595). On failure, the connection comes back only when
/// it is still in step with the server (nothing sent or a plaintext `-ERR` received), so that
/// QUIT can be sent.
async fn start_tls(
    mut conn: Conn,
    capa: Option<&[Vec<u8>]>,
    cfg: Arc<rustls::ClientConfig>,
    host: &str,
) -> Result<(Conn, Option<Vec<Vec<u8>>>), (PopError, Option<Conn>)> {
    if !capa.is_some_and(|c| capa_has(c, "STLS")) {
        return Err((PopError::StlsUnavailable, Some(conn)));
    }
    match conn.command("STLS", "STLS").await {
        Ok(PopReply::Ok(_)) => {}
        Ok(r @ PopReply::Err(_)) => {
            let detail = format!("the server refused STLS: {}", r.line());
            return Err((PopError::Tls { detail }, Some(conn)));
        }
        Err(e) => return Err((e, None)),
    }
    // Anything already read past the +OK came in plaintext and could have been injected by a
    // man in the middle, to be taken later as a reply over TLS: refuse instead of discarding.
    let buffered = conn.io.buffer().len();
    if buffered > 0 {
        let detail = format!(
            "the server sent {buffered} more bytes in plaintext right after its +OK to STLS \
             (possible STARTTLS response injection); TLS was not started"
        );
        return Err((PopError::Tls { detail }, None));
    }
    let timeout = conn.timeout;
    let io = handshake(cfg, host, conn.io.into_inner(), timeout)
        .await
        .map_err(|e| (e, None))?;
    let mut conn = Conn::new(io, timeout);
    // RFC 2595 §4: forget what CAPA said in plaintext and ask again.
    let capa = conn.capa().await.map_err(|e| (e, None))?;
    Ok((conn, capa))
}

/// Reports QUIT's outcome to the hook.
fn report_quit(progress: ProgressFn<'_>, q: &Result<String, String>) {
    match q {
        Ok(t) => progress("QUIT", Ok(if t.is_empty() { "+OK" } else { t })),
        Err(e) => progress("QUIT", Err(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::time::Instant;
    use tokio::net::TcpListener;
    use tokio::task::JoinHandle;

    // ----- pure parsing ------------------------------------------------------------------

    #[test]
    fn status_lines() {
        let ok = |t: &str| Ok(PopReply::Ok(t.into()));
        let err = |t: &str| Ok(PopReply::Err(t.into()));
        assert_eq!(parse_status_line(b"+OK ready\r\n"), ok("ready"));
        assert_eq!(parse_status_line(b"+OK\r\n"), ok(""));
        assert_eq!(parse_status_line(b"+OK"), ok(""), "missing CRLF");
        assert_eq!(parse_status_line(b"+OK bare LF\n"), ok("bare LF"));
        assert_eq!(parse_status_line(b"+ok lower\r\n"), ok("lower"));
        assert_eq!(parse_status_line(b"+Ok mixed\r\n"), ok("mixed"));
        assert_eq!(parse_status_line(b"+OK \r\n"), ok(""));
        assert_eq!(
            parse_status_line(b"-ERR [AUTH] Authentication failed.\r\n"),
            err("[AUTH] Authentication failed.")
        );
        assert_eq!(parse_status_line(b"-err\r\n"), err(""));
        assert!(parse_status_line(b"\r\n").is_err(), "empty line");
        assert!(parse_status_line(b"").is_err());
        assert!(
            parse_status_line(b"+OKAY\r\n").is_err(),
            "status must end at a space"
        );
        assert!(parse_status_line(b"-ERROR x\r\n").is_err());
        assert!(parse_status_line(b"220 smtp.example.com ESMTP\r\n").is_err());
        assert!(parse_status_line(b"* OK IMAP4rev1\r\n").is_err());
        // Non-UTF-8 text is kept, made printable; control characters are escaped.
        assert_eq!(
            parse_status_line(b"+OK caf\xe9 \x01x\r\n"),
            ok("caf\u{fffd} \\x01x")
        );
        let e = parse_status_line(b"\xff\xfe garbage\r\n").unwrap_err();
        assert!(e.contains("not a POP3 reply"), "{e}");
    }

    #[test]
    fn reply_line_round_trips() {
        assert_eq!(PopReply::Ok(String::new()).line(), "+OK");
        assert_eq!(
            PopReply::Err("[AUTH] Authentication failed.".into()).line(),
            "-ERR [AUTH] Authentication failed."
        );
    }

    #[test]
    fn multiline_and_capa() {
        let raw: &[&[u8]] = &[
            b"CAPA\r\n",
            b"TOP\n",
            b"SASL PLAIN LOGIN\r\n",
            b"..stuffed\r\n",
            b"stls\r\n",
            b".\r\n",
        ];
        let mut lines = Vec::new();
        for l in raw {
            match multiline_item(l) {
                MultiLine::End => break,
                MultiLine::Line(l) => lines.push(l),
            }
        }
        assert_eq!(
            lines,
            vec![
                b"CAPA".to_vec(),
                b"TOP".to_vec(),
                b"SASL PLAIN LOGIN".to_vec(),
                b".stuffed".to_vec(),
                b"stls".to_vec()
            ]
        );
        assert!(capa_has(&lines, "STLS"), "case-insensitive");
        assert!(capa_has(&lines, "SASL"));
        assert!(
            !capa_has(&lines, "PLAIN"),
            "only the first word is the capability"
        );
        assert!(!capa_has(&lines, "USER"));
        assert_eq!(multiline_item(b".\n"), MultiLine::End);
        assert_eq!(multiline_item(b"."), MultiLine::End);
        assert_eq!(multiline_item(b"..\r\n"), MultiLine::Line(b".".to_vec()));
        assert_eq!(multiline_item(b"\r\n"), MultiLine::Line(Vec::new()));
    }

    #[test]
    fn apop_timestamps() {
        assert_eq!(
            apop_timestamp(b"+OK POP3 server ready <1896.697170952@dbc.mtview.ca.us>\r\n")
                .as_deref(),
            Some("<1896.697170952@dbc.mtview.ca.us>")
        );
        // Dovecot's form.
        assert_eq!(
            apop_timestamp(b"+OK Dovecot (Debian) ready. <50da.4.6b11abec.uLKKq/+S==@vm>\r\n")
                .as_deref(),
            Some("<50da.4.6b11abec.uLKKq/+S==@vm>")
        );
        assert_eq!(apop_timestamp(b"+OK Dovecot ready.\r\n"), None);
        assert_eq!(apop_timestamp(b"+OK <no-at-sign>\r\n"), None);
        assert_eq!(apop_timestamp(b"+OK <a b@c>\r\n"), None, "no spaces");
        assert_eq!(apop_timestamp(b"+OK <>\r\n"), None);
        assert_eq!(apop_timestamp(b"+OK <unclosed@x\r\n"), None);
        assert_eq!(
            apop_timestamp(b"+OK <x> then <1.2@h>\r\n").as_deref(),
            Some("<1.2@h>"),
            "the first valid one"
        );
        assert_eq!(apop_timestamp(b"+OK <\xff@h>\r\n"), None, "ASCII only");
    }

    #[test]
    fn apop_digest_matches_rfc_1939() {
        assert_eq!(
            apop_digest("<1896.697170952@dbc.mtview.ca.us>", "tanstaaf"),
            "c4c9334bac560ecc979e58001b3e22fb"
        );
    }

    #[test]
    fn debug_masks_the_password() {
        let s = settings(110, PopTls::None);
        let d = format!("{s:?}");
        assert!(!d.contains("s3cret-pw"), "{d}");
        assert!(d.contains("********") && d.contains("alice"), "{d}");
    }

    #[test]
    fn codes_and_texts() {
        let login = PopError::Login {
            reply: "-ERR [AUTH] Authentication failed.".into(),
        };
        assert_eq!(login.code(), "pop_login_failed");
        assert_eq!(
            login.text(true),
            "POP認証に失敗しました (-ERR [AUTH] Authentication failed.)"
        );
        assert_eq!(
            login.text(false),
            "POP login failed (-ERR [AUTH] Authentication failed.)"
        );
        assert_eq!(login.to_string(), login.text(false));
        let all = [
            (
                PopError::Connect {
                    server: "h:110".into(),
                    detail: "refused".into(),
                },
                "pop_connect_failed",
            ),
            (PopError::Tls { detail: "x".into() }, "pop_tls_failed"),
            (PopError::StlsUnavailable, "pop_tls_failed"),
            (PopError::ApopUnavailable, "pop_login_failed"),
            (
                PopError::Timeout {
                    step: "PASS",
                    secs: 30,
                },
                "pop_timeout",
            ),
            (
                PopError::Protocol {
                    step: "CAPA",
                    detail: "x".into(),
                },
                "pop_protocol_error",
            ),
            (PopError::Closed { step: "USER" }, "pop_protocol_error"),
        ];
        for (e, code) in all {
            assert_eq!(e.code(), code, "{e:?}");
            for ja in [false, true] {
                let t = e.text(ja);
                assert!(!t.is_empty() && !t.contains('\n'), "{t}");
            }
        }
    }

    // ----- an in-process fake server -----------------------------------------------------

    /// What the fake server does on connect or on a command.
    enum Act {
        /// Sends these bytes as they are (one write: one packet on loopback).
        Send(Vec<u8>),
        /// Says nothing and keeps reading.
        Silent,
        /// Closes the connection.
        Close,
        /// Sends these bytes, then closes at once.
        SendClose(Vec<u8>),
    }

    fn send(s: &str) -> Act {
        Act::Send(s.as_bytes().to_vec())
    }

    /// Accepts one connection on 127.0.0.1, acts on connect and on each line it receives, and
    /// returns every byte it received once the client hangs up or it closes.
    async fn fake(
        on_connect: Act,
        on_line: impl Fn(&str) -> Act + Send + 'static,
    ) -> (u16, JoinHandle<Vec<u8>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut io = BufReader::new(tcp);
            let mut seen = Vec::new();
            if !act(io.get_mut(), on_connect).await {
                return seen;
            }
            loop {
                let mut line = Vec::new();
                match io.read_until(b'\n', &mut line).await {
                    Ok(0) | Err(_) => return seen,
                    Ok(_) => {}
                }
                seen.extend_from_slice(&line);
                let cmd = String::from_utf8_lossy(strip_eol(&line)).to_string();
                if !act(io.get_mut(), on_line(&cmd)).await {
                    return seen;
                }
            }
        });
        (port, task)
    }

    /// Carries out an [`Act`]; false when the connection is to end.
    async fn act(io: &mut TcpStream, a: Act) -> bool {
        match a {
            Act::Send(b) => io.write_all(&b).await.is_ok(),
            Act::Silent => true,
            Act::Close => false,
            Act::SendClose(b) => {
                let _ = io.write_all(&b).await;
                false
            }
        }
    }

    /// A well-behaved server: CAPA without STLS, alice/s3cret-pw, QUIT.
    fn plain_server(cmd: &str) -> Act {
        match cmd {
            "CAPA" => send("+OK Capability list follows\r\nTOP\r\nUSER\r\nUIDL\r\n.\r\n"),
            "USER alice" => send("+OK\r\n"),
            "PASS s3cret-pw" => send("+OK Logged in.\r\n"),
            c if c.starts_with("PASS ") => send("-ERR [AUTH] Authentication failed.\r\n"),
            "QUIT" => send("+OK Logging out.\r\n"),
            _ => send("-ERR Unknown command.\r\n"),
        }
    }

    fn settings(port: u16, tls: PopTls) -> PopSettings {
        PopSettings {
            host: "127.0.0.1".into(),
            port,
            tls,
            user: "alice".into(),
            password: "s3cret-pw".into(),
            apop: false,
            timeout: Duration::from_secs(5),
            ca_file: None,
            source_address: None,
        }
    }

    fn lines(seen: &[u8]) -> Vec<String> {
        String::from_utf8_lossy(seen)
            .split("\r\n")
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect()
    }

    /// Records every progress report.
    #[derive(Default)]
    struct Steps(Mutex<Vec<(String, Result<String, String>)>>);

    impl Steps {
        fn hook(&self) -> impl Fn(&str, Result<&str, &str>) + Sync + '_ {
            move |step, r| {
                let r = r.map(str::to_string).map_err(str::to_string);
                self.0.lock().unwrap().push((step.to_string(), r));
            }
        }
        fn names(&self) -> Vec<String> {
            let v = self.0.lock().unwrap();
            v.iter()
                .map(|(s, r)| format!("{s}:{}", if r.is_ok() { "ok" } else { "err" }))
                .collect()
        }
    }

    #[tokio::test]
    async fn user_pass_login_and_quit() {
        let (port, server) = fake(send("+OK ready\r\n"), plain_server).await;
        let steps = Steps::default();
        let session = login_with_progress(&settings(port, PopTls::None), &steps.hook())
            .await
            .unwrap();
        assert_eq!(session.method, "USER/PASS");
        assert!(!session.tls);
        assert_eq!(session.greeting, "ready");
        assert_eq!(session.capabilities, ["TOP", "USER", "UIDL"]);
        assert_eq!(session.quit, Ok("Logging out.".into()));
        assert_eq!(
            lines(&server.await.unwrap()),
            ["CAPA", "USER alice", "PASS s3cret-pw", "QUIT"]
        );
        assert_eq!(steps.names(), ["connect:ok", "login:ok", "QUIT:ok"]);
    }

    #[tokio::test]
    async fn quit_is_sent_after_a_refused_password() {
        let (port, server) = fake(send("+OK ready\r\n"), plain_server).await;
        let mut s = settings(port, PopTls::None);
        s.password = "wrong".into();
        let steps = Steps::default();
        let e = login_with_progress(&s, &steps.hook()).await.unwrap_err();
        assert_eq!(
            e,
            PopError::Login {
                reply: "-ERR [AUTH] Authentication failed.".into()
            }
        );
        assert_eq!(
            lines(&server.await.unwrap()),
            ["CAPA", "USER alice", "PASS wrong", "QUIT"]
        );
        assert_eq!(steps.names(), ["connect:ok", "login:err", "QUIT:ok"]);
        let text = e.text(false);
        assert!(!text.contains("wrong"), "no password in texts: {text}");
    }

    #[tokio::test]
    async fn old_server_without_capa_still_logs_in() {
        let (port, server) = fake(send("+OK ready\r\n"), |cmd| match cmd {
            "CAPA" => send("-ERR unknown command\r\n"),
            c => plain_server(c),
        })
        .await;
        login(&settings(port, PopTls::None)).await.unwrap();
        assert_eq!(lines(&server.await.unwrap()).len(), 4);
    }

    #[tokio::test]
    async fn close_after_greeting_is_closed() {
        let greeting = Act::SendClose(b"+OK ready\r\n".to_vec());
        let (port, _server) = fake(greeting, |_| Act::Close).await;
        let e = login(&settings(port, PopTls::None)).await.unwrap_err();
        assert_eq!(e, PopError::Closed { step: "CAPA" });
        assert_eq!(e.code(), "pop_protocol_error");
    }

    #[tokio::test]
    async fn close_before_greeting_is_closed() {
        let (port, _server) = fake(Act::Close, |_| Act::Close).await;
        let e = login(&settings(port, PopTls::None)).await.unwrap_err();
        assert_eq!(e, PopError::Closed { step: "greeting" });
    }

    #[tokio::test]
    async fn silent_server_times_out_in_time() {
        let (port, _server) = fake(Act::Silent, |_| Act::Silent).await;
        let mut s = settings(port, PopTls::None);
        s.timeout = Duration::from_millis(300);
        let t0 = Instant::now();
        let e = login(&s).await.unwrap_err();
        let took = t0.elapsed();
        assert_eq!(
            e,
            PopError::Timeout {
                step: "greeting",
                secs: 1
            }
        );
        assert!(took < Duration::from_secs(2), "took {took:?}");
    }

    #[tokio::test]
    async fn silence_after_pass_times_out() {
        let (port, _server) = fake(send("+OK ready\r\n"), |cmd| match cmd {
            c if c.starts_with("PASS") => Act::Silent,
            c => plain_server(c),
        })
        .await;
        let mut s = settings(port, PopTls::None);
        s.timeout = Duration::from_millis(300);
        let e = login(&s).await.unwrap_err();
        assert_eq!(
            e,
            PopError::Timeout {
                step: "PASS",
                secs: 1
            }
        );
    }

    #[tokio::test]
    async fn garbage_greeting_is_a_protocol_error() {
        let (port, _server) = fake(send("220 smtp.example.com ESMTP\r\n"), |_| Act::Close).await;
        let e = login(&settings(port, PopTls::None)).await.unwrap_err();
        assert!(
            matches!(&e, PopError::Protocol { step: "greeting", detail } if detail.contains("220 smtp")),
            "{e:?}"
        );
    }

    #[tokio::test]
    async fn over_long_line_is_a_protocol_error() {
        let long = format!("+OK {}\r\n", "x".repeat(MAX_LINE * 2));
        let (port, _server) = fake(Act::Send(long.into_bytes()), |_| Act::Silent).await;
        let e = login(&settings(port, PopTls::None)).await.unwrap_err();
        assert!(
            matches!(&e, PopError::Protocol { step: "greeting", detail } if detail.contains("longer")),
            "{e:?}"
        );
    }

    #[tokio::test]
    async fn err_greeting_is_a_connect_error() {
        let (port, _server) = fake(send("-ERR too many connections\r\n"), |_| Act::Close).await;
        let e = login(&settings(port, PopTls::None)).await.unwrap_err();
        assert_eq!(e.code(), "pop_connect_failed");
        assert!(e.text(false).contains("-ERR too many connections"), "{e}");
    }

    #[tokio::test]
    async fn stls_missing_from_capa_sends_no_credentials() {
        let (port, server) = fake(send("+OK ready\r\n"), plain_server).await;
        let steps = Steps::default();
        let e = login_with_progress(&settings(port, PopTls::StartTls), &steps.hook())
            .await
            .unwrap_err();
        assert_eq!(e, PopError::StlsUnavailable);
        assert_eq!(e.code(), "pop_tls_failed");
        let seen = lines(&server.await.unwrap());
        assert_eq!(seen, ["CAPA", "QUIT"], "no USER, PASS or STLS");
        assert_eq!(steps.names(), ["connect:ok", "STLS:err", "QUIT:ok"]);
    }

    #[tokio::test]
    async fn stls_refused_sends_no_credentials() {
        let (port, server) = fake(send("+OK ready\r\n"), |cmd| match cmd {
            "CAPA" => send("+OK\r\nSTLS\r\nUSER\r\n.\r\n"),
            "STLS" => send("-ERR TLS not available now\r\n"),
            c => plain_server(c),
        })
        .await;
        let e = login(&settings(port, PopTls::StartTls)).await.unwrap_err();
        assert!(
            matches!(&e, PopError::Tls { detail } if detail.contains("-ERR TLS not available now")),
            "{e:?}"
        );
        assert_eq!(lines(&server.await.unwrap()), ["CAPA", "STLS", "QUIT"]);
    }

    #[tokio::test]
    async fn plaintext_injected_after_stls_ok_stops_before_the_handshake() {
        let (port, server) = fake(send("+OK ready\r\n"), |cmd| match cmd {
            "CAPA" => send("+OK\r\nSTLS\r\nUSER\r\n.\r\n"),
            // The reply and an injected reply in one write, as a man in the middle would.
            "STLS" => send("+OK Begin TLS negotiation now.\r\n+OK Logged in.\r\n"),
            _ => Act::Close,
        })
        .await;
        let e = login(&settings(port, PopTls::StartTls)).await.unwrap_err();
        assert!(
            matches!(&e, PopError::Tls { detail } if detail.contains("injection")),
            "{e:?}"
        );
        let seen = server.await.unwrap();
        // Everything the client sent is exactly the two plaintext lines: no ClientHello after.
        assert_eq!(seen, b"CAPA\r\nSTLS\r\n");
    }

    #[tokio::test]
    async fn apop_without_timestamp_fails_closed() {
        let (port, server) = fake(send("+OK ready\r\n"), plain_server).await;
        let mut s = settings(port, PopTls::None);
        s.apop = true;
        let e = login(&s).await.unwrap_err();
        assert_eq!(e, PopError::ApopUnavailable);
        assert_eq!(e.code(), "pop_login_failed");
        assert_eq!(
            lines(&server.await.unwrap()),
            ["CAPA", "QUIT"],
            "no USER/PASS fallback"
        );
    }

    #[tokio::test]
    async fn apop_sends_the_rfc_digest() {
        let (port, server) = fake(
            send("+OK POP3 server ready <1896.697170952@dbc.mtview.ca.us>\r\n"),
            |cmd| match cmd {
                "APOP mrose c4c9334bac560ecc979e58001b3e22fb" => {
                    send("+OK mrose's maildrop has 2 messages (320 octets)\r\n")
                }
                c if c.starts_with("APOP") => send("-ERR permission denied\r\n"),
                c => plain_server(c),
            },
        )
        .await;
        let mut s = settings(port, PopTls::None);
        s.apop = true;
        s.user = "mrose".into();
        s.password = "tanstaaf".into();
        let session = login(&s).await.unwrap();
        assert_eq!(session.method, "APOP");
        assert_eq!(
            lines(&server.await.unwrap()),
            [
                "CAPA",
                "APOP mrose c4c9334bac560ecc979e58001b3e22fb",
                "QUIT"
            ]
        );
    }

    #[tokio::test]
    async fn refused_connection_is_a_connect_error() {
        // A port that was just free: nothing listens there.
        let port = {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            l.local_addr().unwrap().port()
        };
        let e = login(&settings(port, PopTls::None)).await.unwrap_err();
        assert!(
            matches!(&e, PopError::Connect { server, .. } if *server == format!("127.0.0.1:{port}")),
            "{e:?}"
        );
    }

    #[tokio::test]
    async fn source_address_is_used() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            let (mut tcp, peer) = listener.accept().await.unwrap();
            tcp.write_all(b"+OK ready\r\n").await.unwrap();
            drop(tcp);
            peer.ip()
        });
        let mut s = settings(port, PopTls::None);
        s.source_address = Some("127.0.0.2".parse().unwrap());
        let _ = login(&s).await;
        assert_eq!(task.await.unwrap(), "127.0.0.2".parse::<IpAddr>().unwrap());
    }

    #[tokio::test]
    async fn line_breaks_in_settings_are_refused_before_connecting() {
        let mut s = settings(1, PopTls::None);
        s.user = "alice\r\nDELE 1".into();
        let e = login(&s).await.unwrap_err();
        assert!(
            matches!(
                e,
                PopError::Protocol {
                    step: "settings",
                    ..
                }
            ),
            "{e:?}"
        );
        let mut s = settings(1, PopTls::None);
        s.password = "pw\r\nDELE 1".into();
        let e = login(&s).await.unwrap_err();
        assert!(
            matches!(
                e,
                PopError::Protocol {
                    step: "settings",
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(!e.text(false).contains("DELE"));
    }

    #[tokio::test]
    async fn unreadable_ca_file_is_a_tls_error() {
        let mut s = settings(1, PopTls::Tls);
        s.ca_file = Some("/nonexistent/ca.pem".into());
        let e = login(&s).await.unwrap_err();
        assert_eq!(e.code(), "pop_tls_failed", "{e:?}");
    }
}

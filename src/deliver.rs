//! Delivery: the only module that speaks SMTP (and writes the file transport).
//!
//! Job: hand one built mail to the configured account and report exactly what the server said —
//! per recipient and at the end — as a [`Report`]. It drives lettre's low-level
//! `AsyncSmtpConnection` itself (MAIL, one RCPT per recipient, DATA) because lettre's `send()`
//! stops at the first refused recipient and its async timeout covers only connecting: here every
//! step has `[smtp] timeout` and the reply to the final "." has `data_timeout`.
//!
//! PIPELINING (RFC 2920): when the session's last EHLO reply offers it (lettre's, copied as it
//! passes — after STARTTLS that is the post-TLS one; see `hand_over`), MAIL, the RCPTs and DATA
//! go out as one write and their replies are read one by one, each within `[smtp] timeout`: two
//! round trips per mail (that group, then the message) instead of four. The [`Report`] is the
//! one the one-command-at-a-time path (kept for servers without PIPELINING, and for a group
//! longer than `PIPELINE_MAX_BYTES`) gives for the same replies; a transaction that ends early
//! still reads the replies already on their way, so the session stays in step.
//!
//! The connection is kept between mails (no NOOP round trip before reuse: if the first command
//! on a reused connection finds it closed, one fresh connection is made and the mail goes there),
//! renewed after `max_messages_per_connection`, and closed after `idle_timeout` without mails.
//!
//! Not its job: judging replies (that is `policy::judge`) or touching the database.
//!
//! Invariants: `tls = "starttls"` never falls back to plaintext (no STARTTLS offered → nothing
//! is sent, not even AUTH); a connection that timed out or broke is dropped, never reused; the
//! password is only ever passed to lettre's AUTH and never formatted.
//!
//! STARTTLS is done here, not by lettre (see `open_starttls`): lettre upgrades the socket under
//! its own buffered reader, which would let plaintext injected after the STARTTLS reply be read
//! as if it had come over TLS. The TLS stream is then handed to lettre for the rest.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use lettre::address::Envelope;
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::AsyncSmtpConnection;
use lettre::transport::smtp::commands::{Data, Mail, Quit, Rcpt, Rset};
use lettre::transport::smtp::extension::{ClientId, Extension, MailParameter};
use lettre::transport::smtp::response::{Response, Severity};
use lettre::{Address, AsyncFileTransport, AsyncTransport, Tokio1Executor};

use crate::config::{AuthMechanism, Config, TlsMode, TransportKind};
use crate::error::{Error, Reply, Stage};
use crate::policy::{Failure, Problem, Report};

/// A step of the session, reported to a progress observer (`test-send`, `check-config --connect`).
#[derive(Debug, Clone)]
pub struct Step {
    /// What was done, e.g. "connect to smtp.example.com:587".
    pub what: String,
    /// `Ok(detail)` or `Err(why)`.
    pub result: Result<String, String>,
}

/// Receives each [`Step`] as it completes.
pub type Progress = Box<dyn Fn(&Step) + Send + Sync>;

/// An open SMTP session and what we know about it.
struct Session {
    /// lettre's connection, after EHLO (and STARTTLS and AUTH when configured).
    conn: AsyncSmtpConnection,
    /// Whether MAIL, RCPT and DATA go out as one write (RFC 2920): only when the reply to the
    /// session's last EHLO — lettre's, after STARTTLS when there is one, never the pre-TLS
    /// one — offers PIPELINING (see `hand_over`).
    pipelining: bool,
    /// When it was last used, for `idle_timeout`.
    last_used: Instant,
    /// Transactions completed on it, for `max_messages_per_connection`.
    transactions: u32,
}

/// Sends mails through the configured account. One per account; owned by its user.
pub struct Deliverer {
    /// The settings it was built from (rebuilt on reload).
    cfg: Config,
    /// The EHLO name.
    client_id: ClientId,
    /// The rustls config (trusted roots: `ca_file` or the public ones), built once.
    rustls: Option<std::sync::Arc<rustls::ClientConfig>>,
    /// The kept-open session, if any.
    session: Option<Session>,
    /// Where `test-send` wants to see each step.
    progress: Option<Progress>,
    /// When the last successful POP-before-SMTP login started (the relay window opens with
    /// it); `None` before the first one.
    pop_login: Option<Instant>,
    /// A failure `prepare` met, reported by the next `send` instead of trying again at once
    /// (a wrong password must not be tried twice per mail: providers lock accounts for that).
    prepared: Option<(Instant, Failure)>,
    /// `[smtp.oauth2]`: where XOAUTH2's access tokens come from, with their cache (rebuilt on
    /// reload, like the rest).
    oauth: Option<std::sync::Arc<crate::oauth::TokenSource>>,
    /// When the server last answered a MAIL FROM (or the command ended without an answer):
    /// the latest moment it can have received it, for the pace.
    mail_from_at: Option<Instant>,
}

/// The opening of a session (greeting, EHLO, STARTTLS), read byte by byte so nothing is ever
/// read ahead of the reply in hand: what follows stays on the socket, where TLS (or lettre) finds
/// it, or where a STARTTLS injection is detected.
struct Plain<S> {
    /// The stream (TCP, or TLS for implicit TLS), handed on afterwards.
    io: S,
    /// Per-reply timeout.
    timeout: Duration,
}

impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> Plain<S> {
    /// Reads one (multi-line) reply within the timeout: the reply and its text lines.
    async fn reply(&mut self, stage: Stage) -> Result<(Reply, Vec<String>), Failure> {
        use tokio::io::AsyncReadExt;
        let limit = self.timeout;
        let read = async {
            let mut lines = Vec::new();
            loop {
                let mut line = Vec::new();
                loop {
                    let b = self
                        .io
                        .read_u8()
                        .await
                        .map_err(|e| Problem::Io(e.to_string()))?;
                    line.push(b);
                    if b == b'\n' {
                        break;
                    }
                    if line.len() > 4096 {
                        return Err(Problem::Client(
                            "a reply line longer than 4096 bytes".into(),
                        ));
                    }
                }
                let text = String::from_utf8_lossy(&line).trim_end().to_string();
                let code: Option<u16> = text.get(..3).and_then(|c| c.parse().ok());
                let Some(code) = code else {
                    return Err(Problem::Client(format!("not an SMTP reply: {text:?}")));
                };
                let last = text.as_bytes().get(3) != Some(&b'-');
                lines.push(text.get(4..).unwrap_or("").to_string());
                if last {
                    return Ok((Reply::new(code, &lines.join("\n")), lines));
                }
                if lines.len() > 100 {
                    return Err(Problem::Client("a reply of more than 100 lines".into()));
                }
            }
        };
        match tokio::time::timeout(limit, read).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(problem)) => Err(Failure { stage, problem }),
            Err(_) => Err(Failure {
                stage,
                problem: Problem::Timeout(limit.as_secs()),
            }),
        }
    }

    /// Sends a command line and reads its reply.
    async fn command(&mut self, stage: Stage, line: &str) -> Result<(Reply, Vec<String>), Failure> {
        use tokio::io::AsyncWriteExt;
        let bytes = format!("{line}\r\n");
        match tokio::time::timeout(self.timeout, self.io.write_all(bytes.as_bytes())).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                return Err(Failure {
                    stage,
                    problem: Problem::Io(e.to_string()),
                })
            }
            Err(_) => {
                return Err(Failure {
                    stage,
                    problem: Problem::Timeout(self.timeout.as_secs()),
                })
            }
        }
        self.reply(stage).await
    }

    /// Reads the greeting and sends EHLO; returns the EHLO reply's lines.
    async fn hello(&mut self, name: &str) -> Result<Vec<String>, Failure> {
        let (greeting, _) = self.reply(Stage::Greeting).await?;
        if greeting.code != 220 {
            return Err(Failure {
                stage: Stage::Greeting,
                problem: Problem::Reply(greeting),
            });
        }
        let (reply, lines) = self.command(Stage::Ehlo, &format!("EHLO {name}")).await?;
        if reply.class() != 2 {
            return Err(Failure {
                stage: Stage::Ehlo,
                problem: Problem::Reply(reply),
            });
        }
        Ok(lines)
    }
}

impl Plain<tokio::net::TcpStream> {
    /// Whether bytes are already waiting on the socket (checked without waiting).
    async fn pending(&self) -> bool {
        let mut buf = [0u8; 1];
        futures::future::poll_fn(|cx| {
            let mut rb = tokio::io::ReadBuf::new(&mut buf);
            match self.io.poll_peek(cx, &mut rb) {
                std::task::Poll::Ready(Ok(n)) => std::task::Poll::Ready(n > 0),
                std::task::Poll::Ready(Err(_)) | std::task::Poll::Pending => {
                    std::task::Poll::Ready(false)
                }
            }
        })
        .await
    }
}

/// What lettre reads first on the stream we hand it: it expects a greeting, then sends EHLO
/// (after STARTTLS the EHLO RFC 3207 requires; otherwise a harmless second EHLO).
const GREETING_FOR_LETTRE: &[u8] = b"220 session opened by mailqueue\r\n";

/// A stream that first yields a synthetic greeting, so lettre's connect (which reads a greeting,
/// then sends EHLO) can take over a session we opened. It also copies lettre's EHLO reply as it
/// passes (see [`EhloTap`]).
#[derive(Debug)]
struct Greeted<S> {
    /// How much of the greeting was read.
    at: usize,
    /// The stream.
    inner: S,
    /// Watches the reply to lettre's EHLO; `None` once that reply is complete (or too long).
    tap: Option<EhloTap>,
}

impl<S> Greeted<S> {
    /// Wraps `inner`; the lines of the reply to lettre's EHLO will be in `ehlo` once it is read.
    fn new(inner: S, ehlo: &std::sync::Arc<std::sync::OnceLock<Vec<String>>>) -> Greeted<S> {
        Greeted {
            at: 0,
            inner,
            tap: Some(EhloTap {
                seen: Vec::new(),
                out: ehlo.clone(),
            }),
        }
    }
}

/// The most bytes of lettre's EHLO reply [`EhloTap`] keeps; beyond that it gives up (and the
/// session is not pipelined). Real replies are a few hundred bytes.
const EHLO_TAP_MAX: usize = 8192;

/// A copy of the first reply read from the server after the synthetic greeting — the reply to
/// lettre's EHLO, which is the one that counts for the session (after STARTTLS it is the EHLO
/// RFC 3207 requires). lettre's `ServerInfo` keeps only the extensions lettre uses, not
/// PIPELINING, so the keyword lines are taken here as they pass, without reading anything
/// lettre would not read itself. Bounded by [`EHLO_TAP_MAX`]; done at the reply's last line.
#[derive(Debug)]
struct EhloTap {
    /// The bytes so far.
    seen: Vec<u8>,
    /// Where the reply's text lines (the part after "250-"/"250 ") go once it is complete.
    out: std::sync::Arc<std::sync::OnceLock<Vec<String>>>,
}

impl EhloTap {
    /// Takes the next bytes read; true when it is done (the reply is complete, or too long).
    fn feed(&mut self, bytes: &[u8]) -> bool {
        self.seen.extend_from_slice(bytes);
        let mut lines = Vec::new();
        for line in self.seen.split_inclusive(|&b| b == b'\n') {
            if !line.ends_with(b"\n") {
                break;
            }
            let text = String::from_utf8_lossy(line).trim_end().to_string();
            lines.push(text.get(4..).unwrap_or("").to_string());
            if text.as_bytes().get(3) != Some(&b'-') {
                let _ = self.out.set(lines);
                return true;
            }
        }
        self.seen.len() > EHLO_TAP_MAX
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Greeted<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.at < GREETING_FOR_LETTRE.len() {
            let from = self.at;
            let n = buf.remaining().min(GREETING_FOR_LETTRE.len() - from);
            buf.put_slice(&GREETING_FOR_LETTRE[from..from + n]);
            self.at += n;
            return std::task::Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        if let (std::task::Poll::Ready(Ok(())), Some(tap)) = (&r, &mut self.tap) {
            if tap.feed(&buf.filled()[before..]) {
                self.tap = None;
            }
        }
        r
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Greeted<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

type TlsTcp = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

impl lettre::transport::smtp::client::AsyncTokioStream for Greeted<tokio::net::TcpStream> {
    fn peer_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.inner.peer_addr()
    }
}

impl lettre::transport::smtp::client::AsyncTokioStream for Greeted<TlsTcp> {
    fn peer_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.inner.get_ref().0.peer_addr()
    }
}

/// Runs `[smtp] password_command` and returns the first line it printed. Its output never goes
/// anywhere else; a failure says how the command ended, not what it printed.
async fn run_password_command(cmd: &str, limit: Duration) -> Result<String, String> {
    let child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = match tokio::time::timeout(limit, child).await {
        Ok(Ok(o)) => o,
        Ok(Err(e)) => return Err(format!("cannot run it: {e}")),
        Err(_) => return Err(format!("it did not finish within {} s", limit.as_secs())),
    };
    if !out.status.success() {
        return Err(format!("it ended with {}", out.status));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    match text.lines().next().map(str::trim_end) {
        Some(line) if !line.is_empty() => Ok(line.to_string()),
        _ => Err("it printed nothing".into()),
    }
}

/// AUTH XOAUTH2 (RFC 7628 style, as Gmail and Microsoft 365 take it), done here because lettre's
/// does not expect the failure sequence: a refused token gets `334 <base64 JSON>`, the client
/// must answer with an empty line, and only then comes the 535.
async fn xoauth2(
    conn: &mut AsyncSmtpConnection,
    user: &str,
    token: &str,
) -> Result<(), lettre::transport::smtp::Error> {
    use base64::Engine;
    /// A raw command line for lettre's `command` (which writes it as is).
    struct Line(String);
    impl std::fmt::Display for Line {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "{}\r\n", self.0)
        }
    }
    let initial = base64::engine::general_purpose::STANDARD
        .encode(format!("user={user}\x01auth=Bearer {token}\x01\x01"));
    let reply = conn
        .command(Line(format!("AUTH XOAUTH2 {initial}")))
        .await?;
    if reply.has_code(334) {
        // The error details (base64 JSON); the final reply follows our empty line.
        conn.command(Line(String::new())).await?;
    }
    Ok(())
}

/// Whether an EHLO reply's lines (as `Plain::hello` and [`EhloTap`] give them: the first is the
/// server's name, then one extension a line) offer the extension `keyword`.
fn offers(ehlo: &[String], keyword: &str) -> bool {
    ehlo.iter().skip(1).any(|l| {
        l.split_whitespace()
            .next()
            .is_some_and(|k| k.eq_ignore_ascii_case(keyword))
    })
}

/// Sends the message and the final "." as one write, and reads the reply: what lettre's
/// `message` sends (the message with leading dots doubled, RFC 5321 4.5.2, then "\r\n.\r\n"),
/// but lettre writes the message and the final dot separately, and the second small write
/// wakes the server a second time for every mail. A message that is not UTF-8 (lettre's
/// `command` takes text) goes through lettre's `message` as before.
async fn send_message(
    conn: &mut AsyncSmtpConnection,
    bytes: &[u8],
) -> Result<Response, lettre::transport::smtp::Error> {
    match std::str::from_utf8(bytes) {
        Ok(text) => conn.command(data_with_end(text)).await,
        Err(_) => conn.message(bytes).await,
    }
}

/// The message as the DATA phase sends it: a "." that begins a line (after CRLF, or at the
/// very start) doubled, then "\r\n.\r\n" — byte for byte what lettre's `message` writes.
fn data_with_end(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + text.len() / 64 + 8);
    let mut line_start = true;
    for line in text.split_inclusive('\n') {
        if line_start && line.starts_with('.') {
            out.push('.');
        }
        out.push_str(line);
        line_start = line.ends_with("\r\n");
    }
    out.push_str("\r\n.\r\n");
    out
}

/// Joins an error with its sources into one line (lettre puts the server text in the source).
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(x) = src {
        let t = x.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        src = x.source();
    }
    s
}

/// Turns a lettre error into what happened, without judging it.
fn problem_of(e: &lettre::transport::smtp::Error, stage: Stage, timeout: Duration) -> Problem {
    if let Some(code) = e.status() {
        let text = std::error::Error::source(e)
            .map(|s| s.to_string())
            .unwrap_or_default();
        return Problem::Reply(Reply::new(u16::from(code), &text));
    }
    let text = chain(e);
    let lower = text.to_ascii_lowercase();
    if e.is_timeout() {
        return Problem::Timeout(timeout.as_secs());
    }
    if e.is_client() {
        if lower.contains("authentication mechanism") {
            return Problem::NoAuthMechanism(text);
        }
        return Problem::Client(text);
    }
    if stage == Stage::Connect && !e.is_response() {
        return Problem::Connect(text);
    }
    Problem::Io(text)
}

fn reply_of(r: &Response) -> Reply {
    Reply::new(
        u16::from(r.code()),
        &r.message().collect::<Vec<_>>().join("\n"),
    )
}

/// The longest MAIL + RCPTs + DATA group sent as one pipelined write; a longer one (well over
/// a hundred recipients) goes one command at a time. We write the whole group before reading
/// any reply, so it must fit in the TCP window or both sides can block (RFC 2920 3.1: "make
/// sure that each group of commands fits entirely within the window", usually 4K octets).
const PIPELINE_MAX_BYTES: usize = 4096;

/// Runs one SMTP step with a timeout; a timeout or error becomes a [`Failure`] at `stage`.
async fn step<T>(
    stage: Stage,
    limit: Duration,
    fut: impl std::future::Future<Output = Result<T, lettre::transport::smtp::Error>>,
) -> Result<T, Failure> {
    let r = tokio::time::timeout(limit, fut).await;
    tracing::trace!(
        stage = stage.name(),
        ok = matches!(r, Ok(Ok(_))),
        "SMTP step finished."
    );
    match r {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(Failure {
            stage,
            problem: problem_of(&e, stage, limit),
        }),
        Err(_) => Err(Failure {
            stage,
            problem: Problem::Timeout(limit.as_secs()),
        }),
    }
}

impl Deliverer {
    /// Builds a deliverer for the config. Reads `ca_file`; a bad one is a config error.
    pub fn new(cfg: &Config) -> Result<Deliverer, Error> {
        let rustls = if cfg.smtp.transport == TransportKind::Smtp && cfg.smtp.tls != TlsMode::None {
            Some(
                crate::net::client_config(cfg.smtp.ca_file.as_deref()).map_err(|e| {
                    Error::Config {
                        problems: vec![format!("smtp.ca_file: {e}")],
                    }
                })?,
            )
        } else {
            None
        };
        let oauth = match &cfg.smtp.oauth2 {
            Some(o) if cfg.smtp.transport == TransportKind::Smtp => Some(std::sync::Arc::new(
                crate::oauth::TokenSource::new(o, cfg.smtp.timeout, cfg.smtp.ca_file.as_deref())
                    .map_err(|e| Error::Config { problems: vec![e] })?,
            )),
            _ => None,
        };
        Ok(Deliverer {
            oauth,
            cfg: cfg.clone(),
            client_id: ClientId::Domain(cfg.sender.local_hostname.clone()),
            rustls,
            session: None,
            progress: None,
            pop_login: None,
            prepared: None,
            mail_from_at: None,
        })
    }

    /// Reports every step to `p` (for `test-send`).
    pub fn with_progress(mut self, p: Progress) -> Self {
        self.progress = Some(p);
        self
    }

    fn report_step(&self, what: impl Into<String>, result: Result<String, String>) {
        if let Some(p) = &self.progress {
            p(&Step {
                what: what.into(),
                result,
            });
        }
    }

    /// The admin's sentence for a failure, as a row would show it.
    fn describe(&self, f: &Failure) -> String {
        let v = crate::policy::judge(&Report {
            rcpts: vec![],
            end: Err(f.clone()),
            relay_gated: false,
        });
        v.error
            .map(|e| e.text(self.cfg.log.error_language))
            .unwrap_or_default()
    }

    fn server(&self) -> String {
        format!("{}:{}", self.cfg.smtp.host, self.cfg.smtp.port)
    }

    /// Opens a session: connect (implicit TLS), greeting, EHLO, STARTTLS + EHLO, AUTH.
    async fn open(&self) -> Result<Session, Failure> {
        let s = &self.cfg.smtp;
        let (mut conn, pipelining) = self.open_session().await?;
        if let (Some((user, _)), Some(source)) = (&s.credentials, &self.oauth) {
            let what = format!("SMTP login as {user} (XOAUTH2)");
            match self.xoauth2_login(&mut conn, user, source).await {
                Ok(()) => self.report_step(what, Ok("accepted".into())),
                Err(f) => {
                    self.report_step(what, Err(self.describe(&f)));
                    let _ = tokio::time::timeout(s.timeout, conn.abort()).await;
                    return Err(f);
                }
            }
        } else if let Some((user, password)) = &s.credentials {
            let what = format!("SMTP login as {user}");
            let secret = match &s.password_command {
                Some(cmd) => match run_password_command(cmd, s.timeout).await {
                    Ok(p) => p,
                    Err(detail) => {
                        let f = Failure {
                            stage: Stage::Auth,
                            problem: Problem::PasswordCommand(detail),
                        };
                        self.report_step(what, Err(self.describe(&f)));
                        let _ = tokio::time::timeout(s.timeout, conn.abort()).await;
                        return Err(f);
                    }
                },
                None => password.reveal().to_string(),
            };
            if crate::failpoint::hit("leak-secret") {
                // A planted leak, so the secrets test can show that its check catches one.
                use base64::Engine;
                let plain = format!("\0{user}\0{secret}");
                let b64 = base64::engine::general_purpose::STANDARD.encode(plain);
                tracing::trace!("Failpoint leak-secret: AUTH PLAIN {b64}");
            }
            let result = match s.auth_mechanism {
                Some(AuthMechanism::Xoauth2) => {
                    step(
                        Stage::Auth,
                        s.timeout * 2,
                        xoauth2(&mut conn, user, &secret),
                    )
                    .await
                }
                m => {
                    let mechanisms: &[Mechanism] = match m {
                        Some(AuthMechanism::Plain) => &[Mechanism::Plain],
                        Some(AuthMechanism::Login) => &[Mechanism::Login],
                        _ => &[Mechanism::Plain, Mechanism::Login],
                    };
                    let creds = Credentials::new(user.clone(), secret);
                    step(Stage::Auth, s.timeout, conn.auth(mechanisms, &creds))
                        .await
                        .map(|_| ())
                }
            };
            match result {
                Ok(()) => self.report_step(what, Ok("accepted".into())),
                Err(f) => {
                    self.report_step(what, Err(self.describe(&f)));
                    // lettre's abort sends QUIT and waits for its reply without a limit.
                    let _ = tokio::time::timeout(s.timeout, conn.abort()).await;
                    return Err(f);
                }
            }
        }
        Ok(Session {
            conn,
            pipelining,
            last_used: Instant::now(),
            transactions: 0,
        })
    }

    /// AUTH XOAUTH2 with a token from `[smtp.oauth2]`: the cached one, and if the server
    /// refuses that (5xx: revoked, or expired early), once more with a fresh one.
    async fn xoauth2_login(
        &self,
        conn: &mut AsyncSmtpConnection,
        user: &str,
        source: &crate::oauth::TokenSource,
    ) -> Result<(), Failure> {
        let limit = self.cfg.smtp.timeout * 2;
        let no_token = |e: crate::oauth::TokenError| Failure {
            stage: Stage::Auth,
            problem: Problem::OAuth2(e.to_string()),
        };
        let token = source.token().await.map_err(no_token)?;
        let first = step(
            Stage::Auth,
            limit,
            xoauth2(conn, user, token.secret.reveal()),
        )
        .await;
        match first {
            Err(Failure {
                problem: Problem::Reply(r),
                ..
            }) if token.cached && r.code >= 500 => {
                tracing::info!(
                    reply = %r,
                    "The server refused the cached OAuth2 access token; trying once more with a fresh one."
                );
                let fresh = source.fresh().await.map_err(no_token)?;
                step(
                    Stage::Auth,
                    limit,
                    xoauth2(conn, user, fresh.secret.reveal()),
                )
                .await
            }
            other => other,
        }
    }

    /// Opens a session up to EHLO (and STARTTLS) ourselves, then hands the stream to lettre.
    ///
    /// Ours rather than lettre's `connect_tokio1` for two reasons: lettre upgrades STARTTLS
    /// under its own buffered reader, so plaintext a server (or a man in the middle) sends in the
    /// same packet as its STARTTLS reply would be read after the handshake as if it had come
    /// encrypted ("STARTTLS response injection"); and its connect reads the greeting and EHLO in
    /// one step, so a refusal could not be told apart from the other. Here the opening is read
    /// byte by byte, never ahead, and anything that follows the STARTTLS 220 drops the session.
    async fn open_session(&self) -> Result<(AsyncSmtpConnection, bool), Failure> {
        let s = &self.cfg.smtp;
        let implicit = s.tls == TlsMode::Tls;
        let what = format!(
            "connect to {}{}",
            self.server(),
            if implicit { " (TLS)" } else { "" }
        );
        let fail = |f: Failure, step: &str| {
            self.report_step(step.to_string(), Err(self.describe(&f)));
            f
        };
        let tcp = match crate::net::connect(&s.host, s.port, s.source_address, s.timeout).await {
            Ok(t) => t,
            Err(crate::net::ConnectError::Timeout) => {
                return Err(fail(
                    Failure {
                        stage: Stage::Connect,
                        problem: Problem::Timeout(s.timeout.as_secs()),
                    },
                    &what,
                ))
            }
            Err(crate::net::ConnectError::Failed(d)) => {
                let f = Failure {
                    stage: Stage::Connect,
                    problem: Problem::Connect(d),
                };
                return Err(fail(f, &what));
            }
        };
        let hello = self.cfg.sender.local_hostname.clone();
        if implicit {
            let tls = self
                .handshake(tcp, Stage::Connect)
                .await
                .map_err(|f| fail(f, &what))?;
            let mut p = Plain {
                io: tls,
                timeout: s.timeout,
            };
            p.hello(&hello).await.map_err(|f| fail(f, &what))?;
            self.report_step(what, Ok("connected".into()));
            return self.hand_over(p.io).await;
        }
        let mut p = Plain {
            io: tcp,
            timeout: s.timeout,
        };
        let ehlo = p.hello(&hello).await.map_err(|f| fail(f, &what))?;
        self.report_step(what, Ok("connected".into()));
        if s.tls == TlsMode::None {
            return self.hand_over(p.io).await;
        }
        if !offers(&ehlo, "STARTTLS") {
            self.report_step("STARTTLS", Err("not offered by the server".into()));
            let _ = p.command(Stage::Ehlo, "QUIT").await;
            return Err(Failure {
                stage: Stage::Ehlo,
                problem: Problem::NoStartTls,
            });
        }
        let (reply, _) = p
            .command(Stage::StartTls, "STARTTLS")
            .await
            .map_err(|f| fail(f, "STARTTLS"))?;
        if reply.code != 220 {
            return Err(fail(
                Failure {
                    stage: Stage::StartTls,
                    problem: Problem::Reply(reply),
                },
                "STARTTLS",
            ));
        }
        if p.pending().await {
            let f = Failure {
                stage: Stage::StartTls,
                problem: Problem::Tls("the server sent more data right after its STARTTLS reply (STARTTLS response injection?); the connection was dropped before TLS, nothing was sent".into()),
            };
            return Err(fail(f, "STARTTLS"));
        }
        let tls = self
            .handshake(p.io, Stage::StartTls)
            .await
            .map_err(|f| fail(f, "STARTTLS"))?;
        self.report_step("STARTTLS", Ok("encrypted".into()));
        self.hand_over(tls).await
    }

    /// The TLS handshake within the timeout, verifying the server's name and certificate.
    async fn handshake(&self, tcp: tokio::net::TcpStream, stage: Stage) -> Result<TlsTcp, Failure> {
        let s = &self.cfg.smtp;
        let config = self
            .rustls
            .clone()
            .expect("built for tls = starttls or tls");
        let name =
            rustls::pki_types::ServerName::try_from(s.host.clone()).map_err(|e| Failure {
                stage,
                problem: Problem::Tls(format!("{} is not a TLS server name: {e}", s.host)),
            })?;
        match tokio::time::timeout(
            s.timeout,
            tokio_rustls::TlsConnector::from(config).connect(name, tcp),
        )
        .await
        {
            Ok(Ok(t)) => Ok(t),
            Ok(Err(e)) => Err(Failure {
                stage,
                problem: Problem::Tls(e.to_string()),
            }),
            Err(_) => Err(Failure {
                stage,
                problem: Problem::Timeout(s.timeout.as_secs()),
            }),
        }
    }

    /// Gives the opened stream to lettre, which reads our synthetic greeting and sends EHLO;
    /// returns lettre's connection and whether that EHLO's reply offers PIPELINING.
    ///
    /// The PIPELINING decision is taken from lettre's EHLO (copied by [`EhloTap`] as it passes
    /// through [`Greeted`]), in every TLS mode: it is the last EHLO of the session, and for
    /// `tls = "starttls"` it is the first one over TLS — the pre-TLS reply may have been
    /// rewritten by anyone on the path and must not be trusted (RFC 3207 4.2). Doing the
    /// post-TLS EHLO ourselves would cost a round trip per connection for the same answer.
    async fn hand_over<S>(&self, inner: S) -> Result<(AsyncSmtpConnection, bool), Failure>
    where
        Greeted<S>: lettre::transport::smtp::client::AsyncTokioStream + 'static,
    {
        let ehlo = std::sync::Arc::new(std::sync::OnceLock::new());
        let stream = Greeted::new(inner, &ehlo);
        let conn = step(
            Stage::Ehlo,
            self.cfg.smtp.timeout,
            AsyncSmtpConnection::connect_with_transport(Box::new(stream), &self.client_id),
        )
        .await?;
        let pipelining = ehlo.get().is_some_and(|lines| offers(lines, "PIPELINING"));
        tracing::debug!(pipelining, "SMTP session opened.");
        Ok((conn, pipelining))
    }

    /// Sends one mail to `rcpts` (the recipients still pending). Never fails: everything that
    /// happened is in the [`Report`].
    pub async fn send(&mut self, from: &Address, rcpts: &[Address], bytes: &[u8]) -> Report {
        if self.cfg.smtp.transport == TransportKind::File {
            return self.send_file(from, rcpts, bytes).await;
        }
        let gated = self.cfg.pop.is_some();
        // A failure `prepare` just met stands for this attempt; an old one is forgotten.
        if let Some((at, f)) = self.prepared.take() {
            if at.elapsed() < self.cfg.smtp.timeout {
                return Report {
                    rcpts: vec![],
                    end: Err(f),
                    relay_gated: gated,
                };
            }
        }
        if let Err(f) = self.ensure_pop(false).await {
            return Report {
                rcpts: vec![],
                end: Err(f),
                relay_gated: gated,
            };
        }
        // Only a connection that already carried a mail can have gone stale; one `prepare` just
        // opened must not be opened twice (a 421 at MAIL is an answer, not a stale socket).
        let reused = self
            .session
            .as_ref()
            .is_some_and(|s| s.transactions > 0 || s.last_used.elapsed() > Duration::from_secs(10));
        let mut report = self.try_send(from, rcpts, bytes).await;
        // A kept connection may have been closed by the server while idle: if the very first
        // command found it gone, nothing was sent; try once on a fresh connection.
        let stale = matches!(
            &report.end,
            Err(Failure {
                stage: Stage::MailFrom,
                problem: Problem::Io(_) | Problem::Timeout(_)
            })
        ) || matches!(&report.end, Err(Failure { stage: Stage::MailFrom, problem: Problem::Reply(r) }) if r.code == 421);
        if reused && stale {
            tracing::debug!(
                "The kept SMTP connection was closed by the server; opening a new one."
            );
            self.session = None;
            report = self.try_send(from, rcpts, bytes).await;
        }
        // With POP-before-SMTP, "relay access denied" most likely means the provider's window
        // closed earlier than `valid_for` said: log in again and try once more. Only when no
        // recipient accepted the mail, so nobody gets it twice.
        let denied = matches!(
            report.end,
            Err(Failure {
                problem: Problem::NoRecipientAccepted,
                ..
            })
        ) && report
            .rcpts
            .iter()
            .any(|(_, r)| crate::policy::is_relay_denied(r));
        if gated && denied {
            tracing::info!("Relaying was refused: logging in to POP3 again and retrying once.");
            if let Err(f) = self.ensure_pop(true).await {
                return Report {
                    rcpts: vec![],
                    end: Err(f),
                    relay_gated: gated,
                };
            }
            report = self.try_send(from, rcpts, bytes).await;
        }
        report.relay_gated = gated;
        report
    }

    /// When the server answered the last MAIL FROM `send` made, if it made one (taken: the
    /// next call says `None` until another is sent). The pace counts from this moment.
    pub fn take_mail_from_at(&mut self) -> Option<Instant> {
        self.mail_from_at.take()
    }

    /// Opens the session (and does the POP login) ahead of the pace wait, so the pace decides
    /// when mails are handed over, not when connections happen to be made. A failure here is
    /// not reported: `send` connects again and reports what it sees.
    pub async fn prepare(&mut self) {
        if self.cfg.smtp.transport == TransportKind::File || self.session.is_some() {
            return;
        }
        self.prepared = None;
        if let Err(f) = self.ensure_pop(false).await {
            self.prepared = Some((Instant::now(), f));
            return;
        }
        match self.open().await {
            Ok(s) => self.session = Some(s),
            Err(f) => self.prepared = Some((Instant::now(), f)),
        }
    }

    /// Logs in to POP3 when POP-before-SMTP is on and the last login is older than
    /// `valid_for` (or `force`). Always ends with QUIT, so the maildrop lock is released.
    async fn ensure_pop(&mut self, force: bool) -> Result<(), Failure> {
        let Some(p) = &self.cfg.pop else {
            return Ok(());
        };
        if !force && self.pop_login.is_some_and(|t| t.elapsed() < p.valid_for) {
            return Ok(());
        }
        let settings = crate::pop3::PopSettings {
            host: p.host.clone(),
            port: p.port,
            tls: match p.tls {
                TlsMode::None => crate::pop3::PopTls::None,
                TlsMode::StartTls => crate::pop3::PopTls::StartTls,
                TlsMode::Tls => crate::pop3::PopTls::Tls,
            },
            user: p.user.clone(),
            password: p.password.reveal().to_string(),
            apop: p.apop,
            timeout: p.timeout,
            ca_file: self.cfg.smtp.ca_file.clone(),
            source_address: self.cfg.smtp.source_address,
        };
        let started = Instant::now();
        let progress = |what: &str, r: Result<&str, &str>| {
            self.report_step(
                format!("POP {what}"),
                r.map(str::to_string).map_err(str::to_string),
            );
        };
        match crate::pop3::login_with_progress(&settings, &progress).await {
            Ok(session) => {
                tracing::info!(server = %session.server, method = session.method, tls = session.tls,
                    "Logged in to POP3 before SMTP.");
                self.pop_login = Some(started);
                Ok(())
            }
            Err(e) => {
                self.pop_login = None;
                tracing::warn!(error_code = e.code(), error = %e.text(false), "The POP-before-SMTP login failed.");
                Err(Failure {
                    stage: Stage::Pop,
                    problem: Problem::Pop(e),
                })
            }
        }
    }

    async fn try_send(&mut self, from: &Address, rcpts: &[Address], bytes: &[u8]) -> Report {
        let limit = self.cfg.smtp.timeout;
        let mut session = match self.session.take() {
            Some(s) => s,
            None => match self.open().await {
                Ok(s) => s,
                Err(f) => {
                    return Report {
                        rcpts: vec![],
                        end: Err(f),
                        relay_gated: false,
                    }
                }
            },
        };
        let mut params = vec![];
        let non_ascii =
            !from.to_string().is_ascii() || rcpts.iter().any(|r| !r.to_string().is_ascii());
        if non_ascii {
            if !session
                .conn
                .server_info()
                .supports_feature(Extension::SmtpUtfEight)
            {
                self.session = Some(session);
                return Report {
                    rcpts: vec![],
                    end: Err(Failure {
                        stage: Stage::MailFrom,
                        problem: Problem::Client(
                            "an address is not ASCII and the server does not offer SMTPUTF8".into(),
                        ),
                    }),
                    relay_gated: false,
                };
            }
            params.push(MailParameter::SmtpUtfEight);
        }
        let mut out = Report {
            rcpts: vec![],
            end: Ok(Reply::new(250, "")),
            relay_gated: false,
        };
        // Pipelined (RFC 2920): MAIL, every RCPT and DATA in one write, then their replies read
        // in order. Each reply is judged exactly as in the one-by-one path, so the report is the
        // same; what differs is that replies to commands already sent must still be read (and
        // a 354 to DATA ended with a lone ".") when the transaction ends early.
        let mail = Mail::new(Some(from.clone()), params);
        let group = session
            .pipelining
            .then(|| {
                let mut group = mail.to_string();
                for rcpt in rcpts {
                    group.push_str(&Rcpt::new(rcpt.clone(), vec![]).to_string());
                }
                group.push_str(&Data.to_string());
                group
            })
            .filter(|group| group.len() <= PIPELINE_MAX_BYTES);
        let pipelined = group.is_some();
        let r = match group {
            // `command` writes the text as is (one write, one flush) and reads MAIL's reply.
            Some(group) => step(Stage::MailFrom, limit, session.conn.command(group)).await,
            None => step(Stage::MailFrom, limit, session.conn.command(mail)).await,
        };
        self.mail_from_at = Some(Instant::now());
        let r = match r {
            Ok(resp) if resp.code().severity != Severity::PositiveCompletion => Err(Failure {
                stage: Stage::MailFrom,
                problem: Problem::Client(format!(
                    "unexpected reply {} to MAIL FROM",
                    reply_of(&resp)
                )),
            }),
            other => other,
        };
        if let Err(f) = r {
            // An answer other than 421 leaves the session usable, once the RCPT and DATA
            // replies already on their way are read; anything else drops it in `finish`.
            let answered = match &f.problem {
                Problem::Reply(reply) => reply.code != 421,
                Problem::Client(_) => true,
                _ => false,
            };
            out.end = Err(f);
            if pipelined && answered && !self.discard(&mut session.conn, rcpts.len()).await {
                return out; // out of step: dropped, never reused
            }
            self.finish(session, &out).await;
            return out;
        }
        let mut accepted = 0;
        for rcpt in rcpts {
            let r = if pipelined {
                step(Stage::RcptTo, limit, session.conn.read_response()).await
            } else {
                step(
                    Stage::RcptTo,
                    limit,
                    session.conn.command(Rcpt::new(rcpt.clone(), vec![])),
                )
                .await
            };
            match r {
                // lettre takes 3xx as success; only a 2xx accepts a recipient.
                Ok(resp) if resp.code().severity != Severity::PositiveCompletion => {
                    out.rcpts.push((rcpt.to_string(), reply_of(&resp)));
                }
                Ok(resp) => {
                    accepted += 1;
                    out.rcpts.push((rcpt.to_string(), reply_of(&resp)));
                }
                Err(Failure {
                    problem: Problem::Reply(reply),
                    ..
                }) => {
                    let closing = reply.code == 421;
                    out.rcpts.push((rcpt.to_string(), reply.clone()));
                    if closing {
                        out.end = Err(Failure {
                            stage: Stage::RcptTo,
                            problem: Problem::Reply(reply),
                        });
                        self.finish(session, &out).await;
                        return out;
                    }
                }
                Err(f) => {
                    out.end = Err(f);
                    self.finish(session, &out).await;
                    return out;
                }
            }
        }
        if accepted == 0 {
            out.end = Err(Failure {
                stage: Stage::RcptTo,
                problem: Problem::NoRecipientAccepted,
            });
            if pipelined && !self.discard(&mut session.conn, 0).await {
                return out; // out of step: dropped, never reused
            }
            self.finish(session, &out).await;
            return out;
        }
        let r = if pipelined {
            step(Stage::Data, limit, session.conn.read_response()).await
        } else {
            step(Stage::Data, limit, session.conn.command(Data)).await
        };
        if let Err(f) = r {
            out.end = Err(f);
            self.finish(session, &out).await;
            return out;
        }
        out.end = step(
            Stage::DataEnd,
            self.cfg.smtp.data_timeout,
            send_message(&mut session.conn, bytes),
        )
        .await
        .and_then(|r| {
            if r.code().severity == Severity::PositiveCompletion {
                Ok(reply_of(&r))
            } else {
                // Not an answer the protocol allows after the message: it may have been taken.
                Err(Failure {
                    stage: Stage::DataEnd,
                    problem: Problem::Io(format!(
                        "unexpected reply {} to the end of the message",
                        reply_of(&r)
                    )),
                })
            }
        });
        // A write that broke (the server hung up while the message was still being sent) means
        // the final "." never reached it: a plain retry, not a doubt.
        if let Err(Failure {
            stage,
            problem: Problem::Io(t),
        }) = &mut out.end
        {
            if t.to_ascii_lowercase().contains("broken pipe") {
                *stage = Stage::Data;
            }
        }
        session.transactions += 1;
        self.finish(session, &out).await;
        out
    }

    /// Reads the rest of a pipelined group that carries no message (MAIL refused, or no
    /// recipient accepted): the replies to `rcpts` RCPTs, then DATA's. A DATA that got 354
    /// anyway is ended with a lone "." (as RFC 2920 says: the server then refuses the empty
    /// transaction) and that reply is read too. True when every reply came and none was 421,
    /// so the session is in step and `finish` may reset and keep it.
    async fn discard(&self, conn: &mut AsyncSmtpConnection, rcpts: usize) -> bool {
        let limit = self.cfg.smtp.timeout;
        type Read =
            Result<Result<Response, lettre::transport::smtp::Error>, tokio::time::error::Elapsed>;
        let answered = |r: &Read| match r {
            Ok(Ok(_)) => true,
            Ok(Err(e)) => e.status().is_some_and(|c| u16::from(c) != 421),
            Err(_) => false,
        };
        for _ in 0..rcpts {
            if !answered(&tokio::time::timeout(limit, conn.read_response()).await) {
                return false;
            }
        }
        let data = tokio::time::timeout(limit, conn.read_response()).await;
        match &data {
            Ok(Ok(r)) if r.code().severity == Severity::PositiveIntermediate => {
                // Not `message(b"")`, which would send an empty line before the dot.
                let dot = tokio::time::timeout(self.cfg.smtp.data_timeout, conn.command(".\r\n"));
                answered(&dot.await)
            }
            other => answered(other),
        }
    }

    /// Decides whether the session can be kept after a transaction, and resets it if needed.
    async fn finish(&mut self, mut session: Session, report: &Report) {
        let keep = match &report.end {
            Ok(_) => true,
            Err(Failure {
                problem: Problem::Reply(r),
                stage,
            }) => {
                // After the final "." the transaction is over either way; before it, RSET.
                r.code != 421
                    && (*stage == Stage::DataEnd
                        || step(
                            Stage::MailFrom,
                            self.cfg.smtp.timeout,
                            session.conn.command(Rset),
                        )
                        .await
                        .is_ok())
            }
            Err(Failure {
                problem: Problem::NoRecipientAccepted | Problem::Client(_),
                ..
            }) => step(
                Stage::MailFrom,
                self.cfg.smtp.timeout,
                session.conn.command(Rset),
            )
            .await
            .is_ok(),
            Err(_) => false,
        };
        if keep
            && session.transactions < self.cfg.smtp.max_messages_per_connection
            && !session.conn.has_broken()
        {
            session.last_used = Instant::now();
            self.session = Some(session);
        } else if keep {
            self.quit(session).await;
        }
        // Otherwise it is dropped: a broken or timed-out connection is never reused.
    }

    async fn quit(&self, mut s: Session) {
        let _ = tokio::time::timeout(self.cfg.smtp.timeout, s.conn.command(Quit)).await;
    }

    /// How long until the kept connection reaches `idle_timeout` (`None`: no connection).
    pub fn idle_left(&self) -> Option<Duration> {
        self.session.as_ref().map(|s| {
            self.cfg
                .smtp
                .idle_timeout
                .saturating_sub(s.last_used.elapsed())
        })
    }

    /// Closes the kept connection if it has been idle for `idle_timeout`.
    pub async fn close_if_idle(&mut self) {
        if self
            .session
            .as_ref()
            .is_some_and(|s| s.last_used.elapsed() >= self.cfg.smtp.idle_timeout)
        {
            if let Some(s) = self.session.take() {
                tracing::debug!("Closing the idle SMTP connection.");
                self.quit(s).await;
            }
        }
    }

    /// Closes the kept connection with QUIT.
    pub async fn close(&mut self) {
        if let Some(s) = self.session.take() {
            self.quit(s).await;
        }
    }

    /// Connects, sets up TLS and logs in, then QUITs without sending (`check-config --connect`).
    pub async fn probe(&mut self) -> Result<(), Failure> {
        if self.cfg.smtp.transport == TransportKind::File {
            self.report_step(
                format!("file transport into {}", self.file_dir().display()),
                Ok("no connection needed".into()),
            );
            return Ok(());
        }
        self.close().await;
        self.ensure_pop(true).await?;
        let s = self.open().await?;
        self.quit(s).await;
        self.report_step("QUIT", Ok("closed".into()));
        Ok(())
    }

    fn file_dir(&self) -> PathBuf {
        self.cfg
            .smtp
            .dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("."))
    }

    async fn send_file(&mut self, from: &Address, rcpts: &[Address], bytes: &[u8]) -> Report {
        let dir = self.file_dir();
        let fail = |detail: String| Report {
            rcpts: vec![],
            // Retried: a full disk or a missing directory is not the mail's fault.
            end: Err(Failure {
                stage: Stage::Data,
                problem: Problem::Io(detail),
            }),
            relay_gated: false,
        };
        if let Err(e) = tokio::fs::create_dir_all(&dir).await {
            return fail(format!("cannot create {}: {e}", dir.display()));
        }
        let envelope = match Envelope::new(Some(from.clone()), rcpts.to_vec()) {
            Ok(e) => e,
            Err(e) => return fail(e.to_string()),
        };
        let transport = AsyncFileTransport::<Tokio1Executor>::new(&dir);
        match transport.send_raw(&envelope, bytes).await {
            Ok(id) => {
                let path = dir.join(format!("{id}.eml"));
                let ok = Reply::new(250, &format!("written to {}", path.display()));
                Report {
                    rcpts: rcpts.iter().map(|r| (r.to_string(), ok.clone())).collect(),
                    end: Ok(ok),
                    relay_gated: false,
                }
            }
            Err(e) => fail(format!(
                "cannot write into {}: {}",
                dir.display(),
                chain(&e)
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Dots are doubled exactly where lettre's codec doubles them: at the very start and after
    /// CRLF, not after a bare LF or CR; the end is lettre's "\r\n.\r\n".
    #[test]
    fn the_data_phase_doubles_leading_dots_like_lettre() {
        assert_eq!(
            data_with_end(".a\r\nb\r\n..c\r\n.\r\n"),
            "..a\r\nb\r\n...c\r\n..\r\n\r\n.\r\n"
        );
        assert_eq!(data_with_end("a\n.b\r.c"), "a\n.b\r.c\r\n.\r\n");
        assert_eq!(data_with_end("日本\r\n.語"), "日本\r\n..語\r\n.\r\n");
        assert_eq!(data_with_end(""), "\r\n.\r\n");
    }
}

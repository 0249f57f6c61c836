//! Delivery: the only module that speaks SMTP (and writes the file transport).
//!
//! Job: hand one built mail to the configured account and report exactly what the server said —
//! per recipient and at the end — as a [`Report`]. It drives lettre's low-level
//! `AsyncSmtpConnection` itself (MAIL, one RCPT per recipient, DATA) because lettre's `send()`
//! stops at the first refused recipient and its async timeout covers only connecting: here every
//! step has `[smtp] timeout` and the reply to the final "." has `data_timeout`.
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
//! Known limit (see docs): lettre upgrades STARTTLS under its own buffered reader; whether
//! plaintext injected after the STARTTLS reply is discarded is examined by the reliability work.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use lettre::address::Envelope;
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{AsyncSmtpConnection, Certificate, TlsParameters};
use lettre::transport::smtp::commands::{Data, Mail, Quit, Rcpt, Rset};
use lettre::transport::smtp::extension::{ClientId, Extension, MailParameter};
use lettre::transport::smtp::response::Response;
use lettre::{Address, AsyncFileTransport, AsyncTransport, Tokio1Executor};

use crate::config::{Config, TlsMode, TransportKind};
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
    /// TLS parameters (server name, trusted roots), built once.
    tls: Option<TlsParameters>,
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
    if e.is_tls()
        || lower.contains("certificate")
        || lower.contains("unknownissuer")
        || lower.contains("handshake")
    {
        return Problem::Tls(text);
    }
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
        let tls = if cfg.smtp.transport == TransportKind::Smtp && cfg.smtp.tls != TlsMode::None {
            let mut b = TlsParameters::builder(cfg.smtp.host.clone());
            if let Some(ca) = &cfg.smtp.ca_file {
                let pem = std::fs::read(ca).map_err(|e| Error::Config {
                    problems: vec![format!("smtp.ca_file: cannot read {}: {e}", ca.display())],
                })?;
                let mut n = 0;
                for der in rustls_pemfile::certs(&mut pem.as_slice()) {
                    let der = der.map_err(|e| Error::Config {
                        problems: vec![format!("smtp.ca_file: {} is not PEM: {e}", ca.display())],
                    })?;
                    let cert = Certificate::from_der(der.to_vec()).map_err(|e| Error::Config {
                        problems: vec![format!("smtp.ca_file: {}: {e}", ca.display())],
                    })?;
                    b = b.add_root_certificate(cert);
                    n += 1;
                }
                if n == 0 {
                    return Err(Error::Config {
                        problems: vec![format!(
                            "smtp.ca_file: {} holds no certificate",
                            ca.display()
                        )],
                    });
                }
            }
            Some(b.build_rustls().map_err(|e| Error::Config {
                problems: vec![format!("smtp.tls: {}", chain(&e))],
            })?)
        } else {
            None
        };
        Ok(Deliverer {
            cfg: cfg.clone(),
            client_id: ClientId::Domain(cfg.sender.local_hostname.clone()),
            tls,
            session: None,
            progress: None,
            pop_login: None,
            prepared: None,
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
        let implicit = if s.tls == TlsMode::Tls {
            self.tls.clone()
        } else {
            None
        };
        let what = format!(
            "connect to {}{}",
            self.server(),
            if implicit.is_some() { " (TLS)" } else { "" }
        );
        // lettre's own timeout covers the TCP connect only; ours covers the TLS handshake,
        // the greeting and EHLO too.
        let connect = AsyncSmtpConnection::connect_tokio1(
            (s.host.as_str(), s.port),
            Some(s.timeout),
            &self.client_id,
            implicit,
            s.source_address,
        );
        // TCP connect (lettre's timeout) plus TLS handshake, greeting and EHLO (ours).
        let mut conn = match step(Stage::Connect, s.timeout * 2, connect).await {
            Ok(c) => c,
            Err(mut f) => {
                if let Problem::Reply(_) = f.problem {
                    f.stage = Stage::Greeting;
                }
                if let Problem::Connect(d) = &f.problem {
                    f.problem = Problem::Connect(format!("{}: {d}", self.server()));
                }
                self.report_step(what, Err(self.describe(&f)));
                return Err(f);
            }
        };
        self.report_step(what, Ok("connected".into()));
        if s.tls == TlsMode::StartTls {
            if !conn.server_info().supports_feature(Extension::StartTls) {
                self.report_step("STARTTLS", Err("not offered by the server".into()));
                conn.abort().await;
                return Err(Failure {
                    stage: Stage::Ehlo,
                    problem: Problem::NoStartTls,
                });
            }
            let params = self.tls.clone().expect("tls parameters exist for starttls");
            if let Err(f) = step(
                Stage::StartTls,
                s.timeout,
                conn.starttls(params, &self.client_id),
            )
            .await
            {
                self.report_step("STARTTLS", Err(self.describe(&f)));
                return Err(f);
            }
            self.report_step("STARTTLS", Ok("encrypted".into()));
        }
        if let Some((user, password)) = &s.credentials {
            let creds = Credentials::new(user.clone(), password.reveal().to_string());
            if crate::failpoint::hit("leak-secret") {
                // A planted leak, so the secrets test can show that its check catches one.
                use base64::Engine;
                let plain = format!("\0{user}\0{}", password.reveal());
                let b64 = base64::engine::general_purpose::STANDARD.encode(plain);
                tracing::trace!("Failpoint leak-secret: AUTH PLAIN {b64}");
            }
            let what = format!("SMTP login as {user}");
            match step(
                Stage::Auth,
                s.timeout,
                conn.auth(&[Mechanism::Plain, Mechanism::Login], &creds),
            )
            .await
            {
                Ok(_) => self.report_step(what, Ok("accepted".into())),
                Err(f) => {
                    self.report_step(what, Err(self.describe(&f)));
                    conn.abort().await;
                    return Err(f);
                }
            }
        }
        Ok(Session {
            conn,
            last_used: Instant::now(),
            transactions: 0,
        })
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
        let reused = self.session.is_some();
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
        let r = step(
            Stage::MailFrom,
            limit,
            session.conn.command(Mail::new(Some(from.clone()), params)),
        )
        .await;
        if let Err(f) = r {
            out.end = Err(f);
            self.finish(session, &out).await;
            return out;
        }
        let mut accepted = 0;
        for rcpt in rcpts {
            match step(
                Stage::RcptTo,
                limit,
                session.conn.command(Rcpt::new(rcpt.clone(), vec![])),
            )
            .await
            {
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
            self.finish(session, &out).await;
            return out;
        }
        if let Err(f) = step(Stage::Data, limit, session.conn.command(Data)).await {
            out.end = Err(f);
            self.finish(session, &out).await;
            return out;
        }
        out.end = step(
            Stage::DataEnd,
            self.cfg.smtp.data_timeout,
            session.conn.message(bytes),
        )
        .await
        .map(|r| reply_of(&r));
        session.transactions += 1;
        self.finish(session, &out).await;
        out
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

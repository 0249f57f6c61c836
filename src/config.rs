//! The configuration: one TOML file, read and validated before anything else runs.
//!
//! Job: turn the file into a [`Config`] whose values are all usable, or into one
//! [`Error::Config`] that lists every problem with its key (and line, where toml gives one), so
//! the process can exit with 78 (EX_CONFIG) and the admin fixes everything in one go.
//!
//! Not its job: connecting anywhere (`check-config --connect` lives in the CLI and uses
//! `deliver`), or opening the database.
//!
//! Invariants: unknown keys are errors (`deny_unknown_fields`); a [`Config`] only exists valid;
//! secrets live in [`Secret`], whose `Debug`/`Display` never show them. The key names mirror the
//! CRM's settings screen and are a public contract: add keys, never rename.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use lettre::message::Mailbox;
use lettre::Address;
use serde::Deserialize;

use crate::error::{Error, Lang};

/// Where the config is read from when neither `--config` nor `$MAILQUEUE_CONFIG` says.
pub const DEFAULT_PATH: &str = "/etc/mailqueue/mailqueue.toml";

/// The largest `[queue] commit_batch`: bounds the rows one transaction claims and the crash
/// window (rows in doubt) an admin can choose.
pub const MAX_COMMIT_BATCH: u32 = 1000;

/// A password or token. Its `Debug` and `Display` print a mask, so it cannot leak by formatting.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }
    /// The secret itself, for the one place that must send it (SMTP AUTH).
    pub fn reveal(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("********")
    }
}

// ---------------------------------------------------------------------------------------------
// The file as written. Every field has a doc comment: it is the reference for the config keys.
// ---------------------------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    /// The queue table and its retry policy.
    queue: RawQueue,
    /// Who the mails are from.
    sender: RawSender,
    /// How mails leave: the SMTP account (or the file transport for demos).
    smtp: RawSmtp,
    /// Pacing: how fast the provider lets the account send.
    #[serde(default)]
    rate: RawRate,
    /// Logs and the language of error texts.
    #[serde(default)]
    log: RawLog,
    /// POP-before-SMTP: log in to POP3 first, so the provider relays for this host a while.
    pop_before_smtp: Option<RawPop>,
    /// Prometheus metrics (off unless `listen` is set).
    #[serde(default)]
    metrics: RawMetrics,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    /// Address to serve `/metrics` on, e.g. "127.0.0.1:9464". Off when absent.
    listen: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawQueue {
    /// Path of the SQLite queue file (the CRM writes to the same file).
    database: PathBuf,
    /// How often the table is checked for due rows. Default "100ms".
    poll_interval: Option<String>,
    /// Attempts per mail before it ends `failed`, when its row's `max_attempts` is NULL. Default 5.
    max_attempts: Option<u32>,
    /// Waits between attempts of one mail; the last step repeats. Default ["1m","5m","15m","1h","4h"].
    retry_backoff: Option<Vec<String>>,
    /// How long a mail may wait in all before it ends `failed`. Default "5d".
    message_lifetime: Option<String>,
    /// The largest mail (headers and body) that is sent, in bytes or "10MB"/"25MiB". Default 25MiB.
    max_message_size: Option<toml::Value>,
    /// On SIGTERM, how long the mail in flight may take to finish. Default "30s".
    shutdown_grace: Option<String>,
    /// Sent mails are purged this long after they were sent. Default "30d".
    keep_sent: Option<String>,
    /// Failed and cancelled mails are purged this long after they ended. Default "90d".
    keep_failed: Option<String>,
    /// How often old rows are purged and the file checkpointed. Default "10m".
    housekeeping_interval: Option<String>,
    /// A mail that may have gone out (no reply after the final "."): "resend" it once with the
    /// same Message-ID (default), or "hold" it for an operator.
    on_doubt: Option<String>,
    /// The most envelope recipients (To + Cc + Bcc) one mail may have. Default 100.
    max_recipients: Option<u32>,
    /// The directory attachment `path`s are read from (and must stay under). Off by default.
    attachments_dir: Option<PathBuf>,
    /// Unpaced only (`[rate] interval_ms = 0`, a relay): the most outcomes committed in one
    /// transaction, and rows claimed at once, while a backlog drains. A crash can leave up to
    /// this many rows in doubt (sent or claimed, not yet recorded). 1 = commit every outcome
    /// before the next mail. Default 64.
    commit_batch: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSender {
    /// The From address (送信元メールアドレス).
    from_address: String,
    /// The From display name (送信元表示名). Optional.
    from_name: Option<String>,
    /// The envelope sender (bounce address). Default: from_address.
    envelope_from: Option<String>,
    /// The name sent in EHLO (ローカルホスト名). Default: this machine's fully qualified name.
    local_hostname: Option<String>,
    /// Staging: send every mail to this address instead of its recipients (the originals are
    /// kept in a header and in the row). Never set this in production.
    redirect_all_to: Option<String>,
    /// "utf-8" (default) or "iso-2022-jp" for the subject, display names and text body.
    charset: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSmtp {
    /// "smtp" (default) or "file" (write .eml files into `dir`; for demos and tests).
    transport: Option<String>,
    /// Directory for the file transport.
    dir: Option<PathBuf>,
    /// SMTP server host name or address (SMTPホスト).
    host: Option<String>,
    /// SMTP port (SMTPポート). Default from `tls`: none 25, starttls 587, tls 465.
    port: Option<u16>,
    /// "none", "starttls" (required, never a silent fallback) or "tls" (implicit TLS). Default "starttls".
    tls: Option<String>,
    /// Whether to log in (SMTP認証). Default false.
    auth: Option<bool>,
    /// The login name (SMTPユーザー).
    user: Option<String>,
    /// The password (SMTPパスワード). Prefer `password_file`.
    password: Option<String>,
    /// A file whose first line is the password (e.g. a systemd credential).
    password_file: Option<PathBuf>,
    /// Timeout for connecting and for each SMTP command. Default "30s".
    timeout: Option<String>,
    /// Timeout for the reply to the final "." (RFC 5321 suggests 10 minutes). Default "10m".
    data_timeout: Option<String>,
    /// PEM file of CA certificates to trust instead of the public roots (a private relay).
    ca_file: Option<PathBuf>,
    /// Allow AUTH over an unencrypted connection to a non-loopback host. Default false.
    allow_insecure_auth: Option<bool>,
    /// Run this command (with `sh -c`) at each connection and use the first line it prints as
    /// the password or token (like msmtp's passwordeval); its output is never logged.
    password_command: Option<String>,
    /// "plain", "login" or "xoauth2". Default: what the server offers, PLAIN first.
    auth_mechanism: Option<String>,
    /// Close an idle SMTP connection after this long. Default "30s".
    idle_timeout: Option<String>,
    /// Open a new connection after this many mails on one. Default 100.
    max_messages_per_connection: Option<u32>,
    /// The local address to connect from (SMTP and POP), for hosts with several addresses:
    /// POP-before-SMTP opens the relay for the address the POP login came from.
    source_address: Option<String>,
    /// Log in with XOAUTH2 using an access token the daemon gets itself with an OAuth2 refresh
    /// token (instead of password, password_file or password_command).
    oauth2: Option<RawOAuth2>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOAuth2 {
    /// The provider's token endpoint (Google: https://oauth2.googleapis.com/token). https only;
    /// http is accepted for a loopback host (a local token proxy, tests).
    token_url: Option<String>,
    /// The OAuth client ID the refresh token was issued to.
    client_id: Option<String>,
    /// The OAuth client secret. Prefer `client_secret_file`; leave both out for a public client
    /// (e.g. a Microsoft app registration used with the device code flow).
    client_secret: Option<String>,
    /// A file whose first line is the client secret (owner-only permissions).
    client_secret_file: Option<PathBuf>,
    /// A file whose first line is the refresh token (owner-only permissions). Put it where the
    /// daemon may write (the state directory, /var/lib/mailqueue): a provider that rotates the
    /// refresh token gets the new one written back here.
    refresh_token_file: Option<PathBuf>,
    /// Scopes to ask for, separated by spaces. Google: leave out (the refresh token's own);
    /// Microsoft 365: "https://outlook.office.com/SMTP.Send offline_access".
    scope: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPop {
    /// Turn POP-before-SMTP on (POP before SMTP). Default false.
    enabled: Option<bool>,
    /// POP server (POPホスト).
    host: Option<String>,
    /// POP port (POPポート). Default 110, or 995 with tls = "tls".
    port: Option<u16>,
    /// "none", "starttls" (STLS, required) or "tls" (POP3S). Default "starttls".
    tls: Option<String>,
    /// POP user (POPユーザー).
    user: Option<String>,
    /// POP password (POPパスワード). Prefer `password_file`.
    password: Option<String>,
    /// A file whose first line is the POP password.
    password_file: Option<PathBuf>,
    /// Log in with APOP; fails closed when the greeting offers no timestamp. Default false.
    apop: Option<bool>,
    /// How long one login opens the relay. Default "5m" (providers commonly grant 10 minutes).
    valid_for: Option<String>,
    /// Timeout for connecting and each POP command. Default "30s".
    timeout: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRate {
    /// The pause between two mails in milliseconds (送信間隔). Default 6000; 0 = unpaced.
    interval_ms: Option<u64>,
    /// How many mails may go out back to back before the interval applies. Default 1.
    burst: Option<u32>,
    /// At most this many mails in any rolling hour (counted from the database).
    max_per_hour: Option<u32>,
    /// At most this many mails in any rolling 24 hours (counted from the database).
    max_per_day: Option<u32>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLog {
    /// "text" (default) or "json".
    format: Option<String>,
    /// A tracing filter: "info" (default), "debug", or directives like "mailqueue=debug".
    level: Option<String>,
    /// Language of `last_error` texts and CLI messages: "en" (default) or "ja".
    error_language: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// The validated config.
// ---------------------------------------------------------------------------------------------

/// The whole validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it was read from (for messages).
    pub path: PathBuf,
    /// `[queue]`.
    pub queue: QueueConfig,
    /// `[sender]`.
    pub sender: SenderConfig,
    /// `[smtp]`.
    pub smtp: SmtpConfig,
    /// `[rate]`.
    pub rate: RateConfig,
    /// `[log]`.
    pub log: LogConfig,
    /// `[pop_before_smtp]`, when enabled.
    pub pop: Option<PopConfig>,
    /// `[metrics] listen`, when set.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// `[sender] redirect_all_to`: staging mode.
    pub redirect_all_to: Option<Address>,
    /// `[sender] charset`.
    pub charset: crate::message::Charset,
}

/// `[pop_before_smtp]`, enabled.
#[derive(Debug, Clone)]
pub struct PopConfig {
    /// POP server.
    pub host: String,
    /// POP port.
    pub port: u16,
    /// TLS mode (the same words as `[smtp] tls`).
    pub tls: TlsMode,
    /// POP user.
    pub user: String,
    /// POP password.
    pub password: Secret,
    /// APOP instead of USER/PASS.
    pub apop: bool,
    /// How long one login opens the relay.
    pub valid_for: Duration,
    /// Per-step timeout.
    pub timeout: Duration,
}

/// `[queue]`: the table and the retry policy.
#[derive(Debug, Clone)]
pub struct QueueConfig {
    /// The SQLite file.
    pub database: PathBuf,
    /// How often due rows are looked for.
    pub poll_interval: Duration,
    /// Attempts per mail when the row does not say.
    pub max_attempts: u32,
    /// Waits between attempts; the last repeats. Never empty.
    pub retry_backoff: Vec<Duration>,
    /// How long a mail may wait in all.
    pub message_lifetime: Duration,
    /// The largest mail sent, in bytes.
    pub max_message_size: u64,
    /// How long the mail in flight may take to finish after SIGTERM.
    pub shutdown_grace: Duration,
    /// Purge sent rows after this long.
    pub keep_sent: Duration,
    /// Purge failed and cancelled rows after this long.
    pub keep_failed: Duration,
    /// How often housekeeping runs.
    pub housekeeping_interval: Duration,
    /// What an in-doubt attempt leads to.
    pub on_doubt: crate::policy::OnDoubt,
    /// The most envelope recipients one mail may have.
    pub max_recipients: u32,
    /// Where attachment paths are read from.
    pub attachments_dir: Option<PathBuf>,
    /// Outcomes per commit (and rows per claim) while an unpaced queue drains; 1 = none batched.
    pub commit_batch: u32,
}

/// `[sender]`.
#[derive(Debug, Clone)]
pub struct SenderConfig {
    /// The From header: display name and address.
    pub from: Mailbox,
    /// The envelope sender (MAIL FROM).
    pub envelope_from: Address,
    /// The EHLO name.
    pub local_hostname: String,
}

/// How mails leave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportKind {
    /// Through the SMTP account.
    Smtp,
    /// Into .eml files in a directory (demo, tests).
    File,
}

/// `[smtp] tls`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// Plaintext.
    None,
    /// STARTTLS, required.
    StartTls,
    /// Implicit TLS from the first byte.
    Tls,
}

impl TlsMode {
    /// The word used in the config file.
    pub fn name(self) -> &'static str {
        match self {
            TlsMode::None => "none",
            TlsMode::StartTls => "starttls",
            TlsMode::Tls => "tls",
        }
    }
}

/// `[smtp]`.
#[derive(Debug, Clone)]
pub struct SmtpConfig {
    /// smtp or file.
    pub transport: TransportKind,
    /// Directory of the file transport.
    pub dir: Option<PathBuf>,
    /// Server host (empty for the file transport).
    pub host: String,
    /// Server port.
    pub port: u16,
    /// TLS mode.
    pub tls: TlsMode,
    /// Login name and password, when `auth = true`.
    pub credentials: Option<(String, Secret)>,
    /// Per-step timeout.
    pub timeout: Duration,
    /// Timeout for the reply to the final ".".
    pub data_timeout: Duration,
    /// Extra trusted CA file.
    pub ca_file: Option<PathBuf>,
    /// Close idle connections after this long.
    pub idle_timeout: Duration,
    /// Mails per connection before it is renewed.
    pub max_messages_per_connection: u32,
    /// Local address to connect from (SMTP and POP).
    pub source_address: Option<IpAddr>,
    /// A command printing the password or token, run at each connection (instead of a stored
    /// password).
    pub password_command: Option<String>,
    /// The AUTH mechanism to use; `None`: PLAIN or LOGIN, as the server offers.
    pub auth_mechanism: Option<AuthMechanism>,
    /// `[smtp.oauth2]`: XOAUTH2 with access tokens from the refresh-token grant.
    pub oauth2: Option<OAuth2Config>,
}

/// `[smtp.oauth2]`.
#[derive(Debug, Clone)]
pub struct OAuth2Config {
    /// The token endpoint (https, or http on a loopback host).
    pub token_url: String,
    /// The OAuth client ID.
    pub client_id: String,
    /// The client secret, if the client has one.
    pub client_secret: Option<Secret>,
    /// Where the refresh token is read from at each refresh and a rotated one written back.
    pub refresh_token_file: PathBuf,
    /// Scopes to ask for (empty: the refresh token's own).
    pub scope: Vec<String>,
}

/// `[smtp] auth_mechanism`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMechanism {
    /// AUTH PLAIN.
    Plain,
    /// AUTH LOGIN.
    Login,
    /// AUTH XOAUTH2 (an OAuth2 access token as the password).
    Xoauth2,
}

impl AuthMechanism {
    /// The config word.
    pub fn name(self) -> &'static str {
        match self {
            AuthMechanism::Plain => "plain",
            AuthMechanism::Login => "login",
            AuthMechanism::Xoauth2 => "xoauth2",
        }
    }
}

/// `[rate]`.
#[derive(Debug, Clone, PartialEq)]
pub struct RateConfig {
    /// The pause between two mails; zero means unpaced.
    pub interval: Duration,
    /// Mails that may go back to back.
    pub burst: u32,
    /// Rolling-hour cap.
    pub max_per_hour: Option<u32>,
    /// Rolling-day cap.
    pub max_per_day: Option<u32>,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// `[log]`.
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// text or json.
    pub format: LogFormat,
    /// The tracing filter.
    pub level: String,
    /// Language of error texts.
    pub error_language: Lang,
}

/// Reads the path the CLI resolved (`--config` > `$MAILQUEUE_CONFIG` > [`DEFAULT_PATH`]).
pub fn load(path: &Path) -> Result<Config, Error> {
    load_with(path, Secrets::Read)
}

/// Whether the secret files are read. Commands that never talk to a server (status, list,
/// retry, migrate, ...) must work while the secrets are out of reach, e.g. when systemd hands
/// them to the running service only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Secrets {
    /// Read and check `password_file`s.
    Read,
    /// Leave them alone; passwords are empty.
    Skip,
}

/// [`load`], choosing whether secret files are read.
pub fn load_with(path: &Path, secrets: Secrets) -> Result<Config, Error> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::Config {
        problems: vec![format!("cannot read config file {}: {e}", path.display())],
    })?;
    parse_with(&text, path, secrets)
}

/// Parses and validates config text; `path` is used in messages only.
pub fn parse(text: &str, path: &Path) -> Result<Config, Error> {
    parse_with(text, path, Secrets::Read)
}

fn parse_with(text: &str, path: &Path, secrets: Secrets) -> Result<Config, Error> {
    let raw: RawConfig = toml::from_str(text).map_err(|e| {
        let msg = e.message().trim().to_string();
        let problem = match e.span() {
            Some(span) => {
                let line = text[..span.start].matches('\n').count() + 1;
                match key_at(text, span.start) {
                    // toml's message repeats the value: never for a secret.
                    Some(key)
                        if key.contains("password")
                            || key.contains("secret")
                            || key.contains("token") =>
                    {
                        format!(
                            "{key} ({} line {line}): must be a quoted string",
                            path.display()
                        )
                    }
                    Some(key) => format!("{key} ({} line {line}): {msg}", path.display()),
                    None => format!("{} line {line}: {msg}", path.display()),
                }
            }
            None => format!("{}: {msg}", path.display()),
        };
        Error::Config {
            problems: vec![problem],
        }
    })?;
    let mut v = Validator {
        problems: Vec::new(),
        secrets,
    };
    let cfg = v.config(raw, path);
    match cfg {
        Some(c) if v.problems.is_empty() => Ok(c),
        _ => Err(Error::Config {
            problems: v.problems,
        }),
    }
}

/// Reads a secret file's first line, refusing a file that group or others may access (as msmtp
/// does): a password readable by other local users is not a secret.
pub(crate) fn read_secret_file(f: &Path) -> Result<String, String> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(f).map_err(|e| format!("cannot read {}: {e}", f.display()))?;
    let mode = meta.permissions().mode() & 0o777;
    // Others may not read it, nobody but the owner may change it. Group read stays allowed:
    // systemd >= 255 hands credentials over as root-owned 0440 files with an ACL.
    if mode & 0o004 != 0 || mode & 0o022 != 0 {
        return Err(format!(
            "{} may be read or changed by other users (mode {mode:o}); allow only its owner: chmod 600 {}",
            f.display(),
            f.display()
        ));
    }
    let text =
        std::fs::read_to_string(f).map_err(|e| format!("cannot read {}: {e}", f.display()))?;
    Ok(text.lines().next().unwrap_or("").to_string())
}

/// The dotted key (`rate.interval_ms`) of the line holding byte `pos`, for toml's errors, which
/// give a position but not the key's name.
fn key_at(text: &str, pos: usize) -> Option<String> {
    let start = text[..pos].rfind('\n').map_or(0, |i| i + 1);
    let line = text[start..].lines().next()?;
    let key = line.split('=').next()?.trim();
    if key.is_empty() || key.starts_with('[') || key.starts_with('#') {
        return None;
    }
    let section = text[..start].lines().rev().find_map(|l| {
        let l = l.trim();
        (l.starts_with('[') && l.ends_with(']'))
            .then(|| l.trim_matches(['[', ']']).trim().to_string())
    });
    Some(match section {
        Some(s) => format!("{s}.{key}"),
        None => key.to_string(),
    })
}

/// Parses "100ms", "30s", "5m", "4h", "5d" (humantime's grammar).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim())
        .map_err(|e| format!("{s:?} is not a duration like \"30s\", \"5m\" or \"4h\" ({e})"))
}

/// Parses a size: a number of bytes, or a number with kB/MB/GB (powers of 1000) or KiB/MiB/GiB.
pub fn parse_size(v: &toml::Value) -> Result<u64, String> {
    match v {
        toml::Value::Integer(i) if *i > 0 => Ok(*i as u64),
        toml::Value::String(s) => {
            let s = s.trim();
            let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
            let (num, unit) = s.split_at(split);
            let n: u64 = num
                .parse()
                .map_err(|_| format!("{s:?} is not a size like 26214400 or \"25MiB\""))?;
            let mult = match unit.trim().to_ascii_lowercase().as_str() {
                "" | "b" => 1,
                "k" | "kb" => 1_000,
                "m" | "mb" => 1_000_000,
                "g" | "gb" => 1_000_000_000,
                "kib" => 1 << 10,
                "mib" => 1 << 20,
                "gib" => 1 << 30,
                _ => {
                    return Err(format!(
                        "{s:?} has an unknown unit (use B, kB, MB, GB, KiB, MiB or GiB)"
                    ))
                }
            };
            if n == 0 {
                return Err("must be larger than 0".into());
            }
            n.checked_mul(mult)
                .ok_or_else(|| format!("{s:?} is too large"))
        }
        _ => Err("must be a positive number of bytes or a string like \"25MiB\"".into()),
    }
}

/// Whether `host` is a loopback address or "localhost" (AUTH without TLS is allowed there).
pub fn is_loopback_host(host: &str) -> bool {
    let h = host.trim_start_matches('[').trim_end_matches(']');
    h.eq_ignore_ascii_case("localhost") || h.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// The machine's fully qualified host name (for EHLO), or its plain host name if none is known.
pub fn default_hostname() -> String {
    let short = hostname_short();
    if short.contains('.') {
        return short;
    }
    canonical_name(&short).unwrap_or(short)
}

fn hostname_short() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

/// Looks the name up in /etc/hosts the way `hostname -f` does for most machines: the first name
/// on the line that lists `short` and contains a dot.
fn canonical_name(short: &str) -> Option<String> {
    let hosts = std::fs::read_to_string("/etc/hosts").ok()?;
    hosts
        .lines()
        .map(|l| l.split('#').next().unwrap_or(""))
        .find_map(|l| {
            let names: Vec<&str> = l.split_whitespace().skip(1).collect();
            if names.contains(&short) {
                names
                    .iter()
                    .find(|n| n.contains('.'))
                    .map(|n| n.to_string())
            } else {
                None
            }
        })
}

struct Validator {
    /// Everything wrong so far, each naming its key.
    problems: Vec<String>,
    /// Whether secret files are read.
    secrets: Secrets,
}

impl Validator {
    fn bad(&mut self, key: &str, msg: impl std::fmt::Display) {
        self.problems.push(format!("{key}: {msg}"));
    }

    fn duration(&mut self, key: &str, v: Option<String>, default: &str) -> Duration {
        let s = v.unwrap_or_else(|| default.to_string());
        parse_duration(&s).unwrap_or_else(|e| {
            self.bad(key, e);
            Duration::from_secs(1)
        })
    }

    fn word<T: Copy>(
        &mut self,
        key: &str,
        v: Option<String>,
        default: T,
        words: &[(&str, T)],
    ) -> T {
        let Some(v) = v else { return default };
        match words.iter().find(|(w, _)| *w == v) {
            Some((_, t)) => *t,
            None => {
                let allowed: Vec<String> = words.iter().map(|(w, _)| format!("{w:?}")).collect();
                self.bad(key, format!("{v:?} is not one of {}", allowed.join(", ")));
                default
            }
        }
    }

    fn config(&mut self, raw: RawConfig, path: &Path) -> Option<Config> {
        let charset = self.word(
            "sender.charset",
            raw.sender.charset.clone(),
            crate::message::Charset::Utf8,
            &[
                ("utf-8", crate::message::Charset::Utf8),
                ("iso-2022-jp", crate::message::Charset::Iso2022Jp),
            ],
        );
        let redirect_all_to =
            raw.sender
                .redirect_all_to
                .as_deref()
                .and_then(|a| match a.trim().parse::<Address>() {
                    Ok(addr) => Some(addr),
                    Err(e) => {
                        self.bad(
                            "sender.redirect_all_to",
                            format!("{a:?} is not an email address ({e})"),
                        );
                        None
                    }
                });
        let queue = self.queue(raw.queue);
        let sender = self.sender(raw.sender);
        let smtp = self.smtp(raw.smtp);
        let rate = self.rate(raw.rate);
        let log = self.log(raw.log);
        let pop = match raw.pop_before_smtp {
            Some(p) if p.enabled.unwrap_or(false) => Some(self.pop(p)?),
            _ => None,
        };
        let metrics_listen = raw.metrics.listen.as_deref().and_then(|a| match a.parse() {
            Ok(addr) => Some(addr),
            Err(_) => {
                self.bad(
                    "metrics.listen",
                    format!("{a:?} is not an address like \"127.0.0.1:9464\""),
                );
                None
            }
        });
        Some(Config {
            path: path.to_path_buf(),
            queue,
            sender: sender?,
            smtp: smtp?,
            rate,
            log,
            pop,
            metrics_listen,
            redirect_all_to,
            charset,
        })
    }

    /// A password given inline or as the first line of a file, under `section.password`.
    fn secret(
        &mut self,
        section: &str,
        inline: Option<String>,
        file: Option<&PathBuf>,
        why: &str,
    ) -> Option<Secret> {
        let key = format!("{section}.password");
        match self.optional_secret(&key, inline, file) {
            Some(Some(s)) => Some(s),
            Some(None) => {
                self.bad(&key, format!("is required {why} (or set password_file)"));
                None
            }
            None => None,
        }
    }

    /// A secret given inline as `key` or as the first line of the file `key_file`, at most
    /// one of them: `Some(None)` when neither is given, `None` after a problem (reported).
    fn optional_secret(
        &mut self,
        key: &str,
        inline: Option<String>,
        file: Option<&PathBuf>,
    ) -> Option<Option<Secret>> {
        let file_key = format!("{key}_file");
        let name = key.rsplit('.').next().unwrap_or(key);
        match (inline, file) {
            (Some(_), Some(_)) => {
                self.bad(key, format!("give either {name} or {name}_file, not both"));
                None
            }
            (Some(p), None) if p.is_empty() => {
                self.bad(key, "is empty");
                None
            }
            (Some(p), None) => Some(Some(Secret::new(p))),
            (None, Some(_)) if self.secrets == Secrets::Skip => Some(Some(Secret::new(""))),
            (None, Some(f)) => match read_secret_file(f) {
                Ok(t) if t.is_empty() => {
                    self.bad(&file_key, format!("{} is empty", f.display()));
                    None
                }
                Ok(t) => Some(Some(Secret::new(t))),
                Err(e) => {
                    self.bad(&file_key, e);
                    None
                }
            },
            (None, None) => Some(None),
        }
    }

    fn pop(&mut self, p: RawPop) -> Option<PopConfig> {
        let tls = self.word(
            "pop_before_smtp.tls",
            p.tls,
            TlsMode::StartTls,
            &[
                ("none", TlsMode::None),
                ("starttls", TlsMode::StartTls),
                ("tls", TlsMode::Tls),
            ],
        );
        let host = p.host.unwrap_or_default().trim().to_string();
        if host.is_empty() {
            self.bad("pop_before_smtp.host", "is required with enabled = true");
        }
        let port = p
            .port
            .unwrap_or(if tls == TlsMode::Tls { 995 } else { 110 });
        if port == 0 {
            self.bad("pop_before_smtp.port", "must be between 1 and 65535");
        }
        let user = p.user.unwrap_or_default();
        if user.is_empty() || user.chars().any(|c| c.is_whitespace() || c.is_control()) {
            self.bad(
                "pop_before_smtp.user",
                "is required with enabled = true and must not contain spaces or line breaks",
            );
        }
        let password = self.secret(
            "pop_before_smtp",
            p.password,
            p.password_file.as_ref(),
            "with enabled = true",
        );
        let valid_for = self.duration("pop_before_smtp.valid_for", p.valid_for, "5m");
        if valid_for.is_zero() {
            self.bad("pop_before_smtp.valid_for", "must be larger than 0");
        }
        let timeout = self.duration("pop_before_smtp.timeout", p.timeout, "30s");
        Some(PopConfig {
            host,
            port,
            tls,
            user,
            password: password?,
            apop: p.apop.unwrap_or(false),
            valid_for,
            timeout,
        })
    }

    fn queue(&mut self, q: RawQueue) -> QueueConfig {
        if q.database.as_os_str().is_empty() {
            self.bad("queue.database", "must name the SQLite file");
        }
        let poll_interval = self.duration("queue.poll_interval", q.poll_interval, "100ms");
        if poll_interval.is_zero() {
            self.bad("queue.poll_interval", "must be larger than 0");
        }
        let max_attempts = q.max_attempts.unwrap_or(5);
        if max_attempts == 0 {
            self.bad("queue.max_attempts", "must be at least 1");
        }
        let steps = q.retry_backoff.unwrap_or_else(|| {
            ["1m", "5m", "15m", "1h", "4h"]
                .iter()
                .map(|s| s.to_string())
                .collect()
        });
        if steps.is_empty() {
            self.bad(
                "queue.retry_backoff",
                "must list at least one wait, e.g. [\"1m\", \"5m\"]",
            );
        }
        let retry_backoff: Vec<Duration> = steps
            .iter()
            .enumerate()
            .map(|(i, s)| {
                parse_duration(s).unwrap_or_else(|e| {
                    self.bad(&format!("queue.retry_backoff[{i}]"), e);
                    Duration::from_secs(60)
                })
            })
            .collect();
        let message_lifetime = self.duration("queue.message_lifetime", q.message_lifetime, "5d");
        let max_message_size = match &q.max_message_size {
            None => 25 << 20,
            Some(v) => parse_size(v).unwrap_or_else(|e| {
                self.bad("queue.max_message_size", e);
                0
            }),
        };
        QueueConfig {
            database: q.database,
            poll_interval,
            max_attempts,
            retry_backoff: if retry_backoff.is_empty() {
                vec![Duration::from_secs(60)]
            } else {
                retry_backoff
            },
            message_lifetime,
            max_message_size,
            shutdown_grace: self.duration("queue.shutdown_grace", q.shutdown_grace, "30s"),
            keep_sent: self.duration("queue.keep_sent", q.keep_sent, "30d"),
            keep_failed: self.duration("queue.keep_failed", q.keep_failed, "90d"),
            housekeeping_interval: self.duration(
                "queue.housekeeping_interval",
                q.housekeeping_interval,
                "10m",
            ),
            on_doubt: self.word(
                "queue.on_doubt",
                q.on_doubt,
                crate::policy::OnDoubt::Resend,
                &[
                    ("resend", crate::policy::OnDoubt::Resend),
                    ("hold", crate::policy::OnDoubt::Hold),
                ],
            ),
            max_recipients: match q.max_recipients {
                Some(0) => {
                    self.bad("queue.max_recipients", "must be at least 1");
                    1
                }
                Some(n) => n,
                None => 100,
            },
            attachments_dir: q.attachments_dir,
            commit_batch: match q.commit_batch {
                Some(n) if (1..=MAX_COMMIT_BATCH).contains(&n) => n,
                Some(n) => {
                    self.bad(
                        "queue.commit_batch",
                        format!("{n} is not between 1 and {MAX_COMMIT_BATCH}"),
                    );
                    1
                }
                None => 64,
            },
        }
    }

    fn sender(&mut self, s: RawSender) -> Option<SenderConfig> {
        let from_addr: Option<Address> = match s.from_address.trim().parse() {
            Ok(a) => Some(a),
            Err(e) => {
                self.bad(
                    "sender.from_address",
                    format!("{:?} is not an email address ({e})", s.from_address),
                );
                None
            }
        };
        let name = s.from_name.filter(|n| !n.trim().is_empty());
        if let Some(n) = &name {
            if n.chars().any(|c| c.is_control()) {
                self.bad(
                    "sender.from_name",
                    "must not contain control characters (line breaks, tabs, NUL)",
                );
            }
        }
        let envelope_from = match s.envelope_from {
            None => from_addr.clone(),
            Some(e) => match e.trim().parse() {
                Ok(a) => Some(a),
                Err(err) => {
                    self.bad(
                        "sender.envelope_from",
                        format!("{e:?} is not an email address ({err})"),
                    );
                    None
                }
            },
        };
        let local_hostname = s.local_hostname.unwrap_or_else(default_hostname);
        if local_hostname.is_empty()
            || !local_hostname
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '[' | ']' | ':'))
        {
            self.bad(
                "sender.local_hostname",
                format!("{local_hostname:?} is not a host name"),
            );
        }
        Some(SenderConfig {
            from: Mailbox::new(name, from_addr?),
            envelope_from: envelope_from?,
            local_hostname,
        })
    }

    fn smtp(&mut self, s: RawSmtp) -> Option<SmtpConfig> {
        let transport = self.word(
            "smtp.transport",
            s.transport,
            TransportKind::Smtp,
            &[("smtp", TransportKind::Smtp), ("file", TransportKind::File)],
        );
        let tls = self.word(
            "smtp.tls",
            s.tls,
            TlsMode::StartTls,
            &[
                ("none", TlsMode::None),
                ("starttls", TlsMode::StartTls),
                ("tls", TlsMode::Tls),
            ],
        );
        let host = s.host.unwrap_or_default().trim().to_string();
        if transport == TransportKind::Smtp && host.is_empty() {
            self.bad("smtp.host", "is required with transport = \"smtp\"");
        }
        if transport == TransportKind::File && s.dir.is_none() {
            self.bad("smtp.dir", "is required with transport = \"file\"");
        }
        let port = s.port.unwrap_or(match tls {
            TlsMode::None => 25,
            TlsMode::StartTls => 587,
            TlsMode::Tls => 465,
        });
        if port == 0 {
            self.bad("smtp.port", "must be between 1 and 65535");
        }
        let auth = s.auth.unwrap_or(false);
        let credentials = if auth {
            let user = s.user.clone().unwrap_or_default();
            if user.is_empty() {
                self.bad("smtp.user", "is required with auth = true");
            }
            let password = match &s.password_command {
                _ if s.oauth2.is_some() => {
                    if s.password.is_some()
                        || s.password_file.is_some()
                        || s.password_command.is_some()
                    {
                        self.bad(
                            "smtp.oauth2",
                            "give either [smtp.oauth2] or one of password, password_file and password_command, not both",
                        );
                        None
                    } else {
                        // The access token comes from the token endpoint at connection time.
                        Some(Secret::new(""))
                    }
                }
                Some(cmd) if cmd.trim().is_empty() => {
                    self.bad("smtp.password_command", "is empty");
                    None
                }
                Some(_) if s.password.is_some() || s.password_file.is_some() => {
                    self.bad(
                        "smtp.password_command",
                        "give one of password, password_file and password_command",
                    );
                    None
                }
                // The command runs at each connection (a token may change); nothing stored.
                Some(_) => Some(Secret::new("")),
                None => self.secret(
                    "smtp",
                    s.password,
                    s.password_file.as_ref(),
                    "with auth = true",
                ),
            };
            if tls == TlsMode::None
                && transport == TransportKind::Smtp
                && !is_loopback_host(&host)
                && !s.allow_insecure_auth.unwrap_or(false)
            {
                self.bad(
                    "smtp.auth",
                    "would send the password unencrypted (tls = \"none\"); use tls = \"starttls\" or \"tls\", or set allow_insecure_auth = true",
                );
            }
            password.map(|p| (user, p))
        } else {
            None
        };
        if let Some(ca) = &s.ca_file {
            if let Err(e) = std::fs::metadata(ca) {
                self.bad("smtp.ca_file", format!("cannot read {}: {e}", ca.display()));
            }
        }
        let timeout = self.duration("smtp.timeout", s.timeout, "30s");
        let data_timeout = self.duration("smtp.data_timeout", s.data_timeout, "10m");
        let idle_timeout = self.duration("smtp.idle_timeout", s.idle_timeout, "30s");
        for (k, d) in [
            ("smtp.timeout", timeout),
            ("smtp.data_timeout", data_timeout),
        ] {
            if d.is_zero() {
                self.bad(k, "must be larger than 0");
            }
        }
        let source_address =
            s.source_address
                .as_deref()
                .and_then(|a| match a.trim().parse::<IpAddr>() {
                    Ok(ip) => Some(ip),
                    Err(_) => {
                        self.bad("smtp.source_address", format!("{a:?} is not an IP address"));
                        None
                    }
                });
        let auth_mechanism = match s.auth_mechanism.as_deref() {
            None => None,
            Some("plain") => Some(AuthMechanism::Plain),
            Some("login") => Some(AuthMechanism::Login),
            Some("xoauth2") => Some(AuthMechanism::Xoauth2),
            Some(other) => {
                self.bad(
                    "smtp.auth_mechanism",
                    format!("{other:?} is not one of \"plain\", \"login\", \"xoauth2\""),
                );
                None
            }
        };
        let oauth2 = match s.oauth2 {
            Some(o) if !auth => {
                let _ = o;
                self.bad("smtp.oauth2", "needs auth = true and a user");
                None
            }
            Some(o) => self.oauth2(o),
            None => None,
        };
        let auth_mechanism = match (auth_mechanism, &oauth2) {
            (None | Some(AuthMechanism::Xoauth2), Some(_)) => Some(AuthMechanism::Xoauth2),
            (Some(m), Some(_)) => {
                self.bad(
                    "smtp.auth_mechanism",
                    format!(
                        "must be \"xoauth2\" (or left out) with [smtp.oauth2], not {:?}",
                        m.name()
                    ),
                );
                None
            }
            (m, None) => m,
        };
        let max_messages_per_connection = s.max_messages_per_connection.unwrap_or(100);
        if max_messages_per_connection == 0 {
            self.bad("smtp.max_messages_per_connection", "must be at least 1");
        }
        if auth && credentials.is_none() {
            return None;
        }
        Some(SmtpConfig {
            transport,
            dir: s.dir,
            host,
            port,
            tls,
            credentials,
            timeout,
            data_timeout,
            ca_file: s.ca_file,
            idle_timeout,
            max_messages_per_connection,
            source_address,
            password_command: s.password_command,
            auth_mechanism,
            oauth2,
        })
    }

    fn oauth2(&mut self, o: RawOAuth2) -> Option<OAuth2Config> {
        let token_url = o.token_url.unwrap_or_default().trim().to_string();
        if token_url.is_empty() {
            self.bad("smtp.oauth2.token_url", "is required");
        } else {
            match reqwest::Url::parse(&token_url) {
                Err(e) => self.bad("smtp.oauth2.token_url", format!("{token_url:?} is not a URL ({e})")),
                Ok(u) if u.scheme() == "https" => {}
                Ok(u) if u.scheme() == "http" && u.host_str().is_some_and(is_loopback_host) => {}
                Ok(_) => self.bad(
                    "smtp.oauth2.token_url",
                    format!("{token_url:?} must be https (http only for a loopback host): the request carries the refresh token"),
                ),
            }
        }
        let client_id = o.client_id.unwrap_or_default().trim().to_string();
        if client_id.is_empty() {
            self.bad("smtp.oauth2.client_id", "is required");
        }
        let client_secret = self.optional_secret(
            "smtp.oauth2.client_secret",
            o.client_secret,
            o.client_secret_file.as_ref(),
        );
        let refresh_token_file = match o.refresh_token_file {
            None => {
                self.bad("smtp.oauth2.refresh_token_file", "is required");
                None
            }
            Some(f) if self.secrets == Secrets::Skip => Some(f),
            // Read now only to check it; the daemon reads it again at each refresh.
            Some(f) => match read_secret_file(&f) {
                Ok(t) if t.trim().is_empty() => {
                    self.bad(
                        "smtp.oauth2.refresh_token_file",
                        format!("{} is empty", f.display()),
                    );
                    None
                }
                Ok(_) => Some(f),
                Err(e) => {
                    self.bad("smtp.oauth2.refresh_token_file", e);
                    None
                }
            },
        };
        let scope = o
            .scope
            .unwrap_or_default()
            .split_whitespace()
            .map(str::to_string)
            .collect();
        Some(OAuth2Config {
            token_url,
            client_id,
            client_secret: client_secret?,
            refresh_token_file: refresh_token_file?,
            scope,
        })
    }

    fn rate(&mut self, r: RawRate) -> RateConfig {
        let burst = r.burst.unwrap_or(1);
        if burst == 0 {
            self.bad("rate.burst", "must be at least 1");
        }
        for (k, v) in [
            ("rate.max_per_hour", r.max_per_hour),
            ("rate.max_per_day", r.max_per_day),
        ] {
            if v == Some(0) {
                self.bad(k, "must be at least 1 (leave it out for no cap)");
            }
        }
        RateConfig {
            interval: Duration::from_millis(r.interval_ms.unwrap_or(6000)),
            burst: burst.max(1),
            max_per_hour: r.max_per_hour,
            max_per_day: r.max_per_day,
        }
    }

    fn log(&mut self, l: RawLog) -> LogConfig {
        let format = self.word(
            "log.format",
            l.format,
            LogFormat::Text,
            &[("text", LogFormat::Text), ("json", LogFormat::Json)],
        );
        let error_language = self.word(
            "log.error_language",
            l.error_language,
            Lang::En,
            &[("en", Lang::En), ("ja", Lang::Ja)],
        );
        let level = l.level.unwrap_or_else(|| "info".to_string());
        if let Err(e) = tracing_subscriber::EnvFilter::builder().parse(&level) {
            self.bad(
                "log.level",
                format!("{level:?} is not a log level or filter ({e})"),
            );
        }
        LogConfig {
            format,
            level,
            error_language,
        }
    }
}

impl Config {
    /// The effective settings as TOML-like text with secrets masked (`check-config`).
    pub fn describe(&self) -> String {
        let q = &self.queue;
        let s = &self.smtp;
        let r = &self.rate;
        let d = |d: &Duration| humantime::format_duration(*d).to_string();
        let mut out = String::new();
        out += &format!("# effective settings from {}\n", self.path.display());
        out += "[queue]\n";
        out += &format!("database = {:?}\n", q.database.display().to_string());
        out += &format!("poll_interval = {:?}\n", d(&q.poll_interval));
        out += &format!("max_attempts = {}\n", q.max_attempts);
        let steps: Vec<String> = q
            .retry_backoff
            .iter()
            .map(|x| format!("{:?}", d(x)))
            .collect();
        out += &format!("retry_backoff = [{}]\n", steps.join(", "));
        out += &format!("message_lifetime = {:?}\n", d(&q.message_lifetime));
        out += &format!("max_message_size = {}\n", q.max_message_size);
        out += "\n[sender]\n";
        out += &format!("from_address = {:?}\n", self.sender.from.email.to_string());
        out += &format!(
            "from_name = {:?}\n",
            self.sender.from.name.clone().unwrap_or_default()
        );
        out += &format!(
            "envelope_from = {:?}\n",
            self.sender.envelope_from.to_string()
        );
        out += &format!("local_hostname = {:?}\n", self.sender.local_hostname);
        if self.charset == crate::message::Charset::Iso2022Jp {
            out += "charset = \"iso-2022-jp\"\n";
        }
        if let Some(r) = &self.redirect_all_to {
            out += &format!(
                "redirect_all_to = {:?}   # STAGING: every mail goes here\n",
                r.to_string()
            );
        }
        out += "\n[smtp]\n";
        match s.transport {
            TransportKind::File => {
                out += "transport = \"file\"\n";
                out += &format!(
                    "dir = {:?}\n",
                    s.dir
                        .as_ref()
                        .map(|p| p.display().to_string())
                        .unwrap_or_default()
                );
            }
            TransportKind::Smtp => {
                out += "transport = \"smtp\"\n";
                out += &format!(
                    "host = {:?}\nport = {}\ntls = {:?}\n",
                    s.host,
                    s.port,
                    s.tls.name()
                );
                out += &format!("auth = {}\n", s.credentials.is_some());
                if let Some((user, _)) = &s.credentials {
                    out += &format!("user = {user:?}\n");
                    if s.oauth2.is_none() && s.password_command.is_none() {
                        out += "password = \"********\"\n";
                    }
                }
                out += &format!(
                    "timeout = {:?}\ndata_timeout = {:?}\n",
                    d(&s.timeout),
                    d(&s.data_timeout)
                );
                if let Some(ca) = &s.ca_file {
                    out += &format!("ca_file = {:?}\n", ca.display().to_string());
                }
                out += &format!("idle_timeout = {:?}\n", d(&s.idle_timeout));
                out += &format!(
                    "max_messages_per_connection = {}\n",
                    s.max_messages_per_connection
                );
                if s.password_command.is_some() {
                    out += "password_command = \"(set; run at each connection)\"\n";
                }
                if let Some(m) = s.auth_mechanism {
                    out += &format!("auth_mechanism = {:?}\n", format!("{m:?}").to_lowercase());
                }
                if let Some(a) = s.source_address {
                    out += &format!("source_address = \"{a}\"\n");
                }
                if let Some(o) = &s.oauth2 {
                    out += "\n[smtp.oauth2]\n";
                    out += &format!(
                        "token_url = {:?}\nclient_id = {:?}\n",
                        o.token_url, o.client_id
                    );
                    if o.client_secret.is_some() {
                        out += "client_secret = \"********\"\n";
                    }
                    out += &format!(
                        "refresh_token_file = {:?}\n",
                        o.refresh_token_file.display().to_string()
                    );
                    if !o.scope.is_empty() {
                        out += &format!("scope = {:?}\n", o.scope.join(" "));
                    }
                }
            }
        }
        out += "\n[rate]\n";
        out += &format!(
            "interval_ms = {}\nburst = {}\n",
            r.interval.as_millis(),
            r.burst
        );
        if let Some(h) = r.max_per_hour {
            out += &format!("max_per_hour = {h}\n");
        }
        if let Some(h) = r.max_per_day {
            out += &format!("max_per_day = {h}\n");
        }
        if let Some(p) = &self.pop {
            out += "\n[pop_before_smtp]\nenabled = true\n";
            out += &format!(
                "host = {:?}\nport = {}\ntls = {:?}\nuser = {:?}\npassword = \"********\"\n",
                p.host,
                p.port,
                p.tls.name(),
                p.user
            );
            out += &format!(
                "apop = {}\nvalid_for = {:?}\ntimeout = {:?}\n",
                p.apop,
                d(&p.valid_for),
                d(&p.timeout)
            );
        }
        out += "\n[log]\n";
        let fmt = if self.log.format == LogFormat::Json {
            "json"
        } else {
            "text"
        };
        let lang = if self.log.error_language == Lang::Ja {
            "ja"
        } else {
            "en"
        };
        out += &format!(
            "format = {fmt:?}\nlevel = {:?}\nerror_language = {lang:?}\n",
            self.log.level
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = r#"
[queue]
database = "q.db"
[sender]
from_address = "crm@example.com"
local_hostname = "crm.example.com"
[smtp]
host = "smtp.example.com"
"#;

    fn problems(text: &str) -> Vec<String> {
        match parse(text, Path::new("t.toml")) {
            Err(Error::Config { problems }) => problems,
            Ok(_) => vec![],
            Err(e) => panic!("unexpected {e:?}"),
        }
    }

    #[test]
    fn minimal_config_takes_the_documented_defaults() {
        let c = parse(MIN, Path::new("t.toml")).unwrap();
        assert_eq!(c.smtp.tls, TlsMode::StartTls);
        assert_eq!(c.smtp.port, 587);
        assert_eq!(c.rate.interval, Duration::from_millis(6000));
        assert_eq!(c.rate.burst, 1);
        assert_eq!(c.queue.max_attempts, 5);
        assert_eq!(c.queue.retry_backoff.len(), 5);
        assert_eq!(c.queue.message_lifetime, Duration::from_secs(5 * 86400));
        assert_eq!(c.smtp.data_timeout, Duration::from_secs(600));
        assert_eq!(c.sender.envelope_from.to_string(), "crm@example.com");
    }

    #[test]
    fn ports_follow_the_tls_mode() {
        for (tls, port) in [("none", 25), ("starttls", 587), ("tls", 465)] {
            let c = parse(&format!("{MIN}tls = \"{tls}\"\n"), Path::new("t.toml")).unwrap();
            assert_eq!(c.smtp.port, port, "tls = {tls}");
        }
    }

    #[test]
    fn unknown_key_is_reported_with_its_line() {
        let p = problems(&format!("{MIN}colour = \"red\"\n"));
        assert_eq!(p.len(), 1);
        assert!(p[0].starts_with("smtp.colour (t.toml line 9)"), "{p:?}");
    }

    #[test]
    fn every_bad_value_is_named_by_its_key() {
        let text = r#"
[queue]
database = "q.db"
poll_interval = "soon"
max_attempts = 0
retry_backoff = ["1m", "later"]
max_message_size = "10 parsecs"
[sender]
from_address = "not an address"
local_hostname = "bad host!"
[smtp]
tls = "maybe"
auth = true
[rate]
burst = 0
[log]
format = "xml"
error_language = "fr"
"#;
        let p = problems(text).join("\n");
        for key in [
            "queue.poll_interval",
            "queue.max_attempts",
            "queue.retry_backoff[1]",
            "queue.max_message_size",
            "sender.from_address",
            "sender.local_hostname",
            "smtp.tls",
            "smtp.host",
            "smtp.user",
            "smtp.password",
            "rate.burst",
            "log.format",
            "log.error_language",
        ] {
            assert!(p.contains(key), "{key} missing from:\n{p}");
        }
    }

    #[test]
    fn auth_without_tls_is_refused_except_on_loopback_or_when_allowed() {
        let base = |host: &str, extra: &str| {
            format!(
                "[queue]\ndatabase='q'\n[sender]\nfrom_address='a@b.c'\nlocal_hostname='h.example'\n[smtp]\nhost='{host}'\ntls='none'\nauth=true\nuser='u'\npassword='p'\n{extra}"
            )
        };
        assert!(problems(&base("smtp.example.com", ""))
            .iter()
            .any(|p| p.starts_with("smtp.auth")));
        assert!(problems(&base("127.0.0.1", "")).is_empty());
        assert!(problems(&base("localhost", "")).is_empty());
        assert!(problems(&base("smtp.example.com", "allow_insecure_auth = true")).is_empty());
    }

    #[test]
    fn secrets_are_masked_in_debug_and_describe() {
        let c = parse(
            &format!("{MIN}auth = true\nuser = \"u\"\npassword = \"hunter2-secret\"\n"),
            Path::new("t.toml"),
        )
        .unwrap();
        assert!(!format!("{c:?}").contains("hunter2-secret"));
        assert!(!c.describe().contains("hunter2-secret"));
        assert_eq!(
            c.smtp.credentials.as_ref().unwrap().1.reveal(),
            "hunter2-secret"
        );
    }

    #[test]
    fn pop_before_smtp_defaults_and_errors() {
        let on = format!("{MIN}\n[pop_before_smtp]\nenabled = true\nhost = \"pop.example.com\"\nuser = \"u\"\npassword = \"p\"\n");
        let c = parse(&on, Path::new("t.toml")).unwrap();
        let p = c.pop.unwrap();
        assert_eq!(
            (p.port, p.tls, p.valid_for, p.apop),
            (110, TlsMode::StartTls, Duration::from_secs(300), false)
        );
        let c = parse(&format!("{on}tls = \"tls\"\n"), Path::new("t.toml")).unwrap();
        assert_eq!(c.pop.unwrap().port, 995);
        let off = format!("{MIN}\n[pop_before_smtp]\nenabled = false\n");
        assert!(parse(&off, Path::new("t.toml")).unwrap().pop.is_none());
        let bad = format!("{MIN}\n[pop_before_smtp]\nenabled = true\nvalid_for = \"soon\"\n");
        let p = problems(&bad).join("\n");
        for key in [
            "pop_before_smtp.host",
            "pop_before_smtp.user",
            "pop_before_smtp.password",
            "pop_before_smtp.valid_for",
        ] {
            assert!(p.contains(key), "{key} missing: {p}");
        }
        assert!(
            !format!("{:?}", parse(&on, Path::new("t.toml")).unwrap()).contains("password: \"p\"")
        );
    }

    #[test]
    fn a_secret_file_others_may_read_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("pw");
        std::fs::write(&f, "s3cret\nignored\n").unwrap();
        let text = format!(
            "{MIN}auth = true\nuser = \"u\"\npassword_file = {:?}\n",
            f.to_str().unwrap()
        );
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        let p = problems(&text).join("\n");
        assert!(
            p.contains("smtp.password_file")
                && p.contains("chmod 600")
                && p.contains(f.to_str().unwrap()),
            "{p}"
        );
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        let c = parse(&text, Path::new("t.toml")).unwrap();
        assert_eq!(c.smtp.credentials.unwrap().1.reveal(), "s3cret");
    }

    #[test]
    fn a_mistyped_password_is_not_repeated_in_the_error() {
        let p = problems(&format!(
            "{MIN}auth = true\nuser = \"u\"\npassword = 98765432\n"
        ))
        .join("\n");
        assert!(
            p.contains("smtp.password") && p.contains("must be a quoted string"),
            "{p}"
        );
        assert!(!p.contains("98765432"), "{p}");
    }

    #[test]
    fn sizes_and_durations_parse() {
        assert_eq!(
            parse_size(&toml::Value::String("25MiB".into())).unwrap(),
            25 << 20
        );
        assert_eq!(
            parse_size(&toml::Value::String("10MB".into())).unwrap(),
            10_000_000
        );
        assert_eq!(parse_size(&toml::Value::Integer(1000)).unwrap(), 1000);
        assert!(parse_size(&toml::Value::Integer(-1)).is_err());
        for (s, d) in [
            ("100ms", 100u64),
            ("30s", 30_000),
            ("5m", 300_000),
            ("4h", 14_400_000),
            ("5d", 432_000_000),
        ] {
            assert_eq!(parse_duration(s).unwrap(), Duration::from_millis(d), "{s}");
        }
    }

    #[test]
    fn japanese_display_name_is_kept() {
        let c = parse(
            &MIN.replace("[smtp]", "from_name = \"山田 太郎\"\n[smtp]"),
            Path::new("t.toml"),
        )
        .unwrap();
        assert_eq!(c.sender.from.name.as_deref(), Some("山田 太郎"));
    }
}

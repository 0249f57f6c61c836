//! The one error type of mailqueue.
//!
//! Job: name every way something can go wrong — a delivery that did not go as planned, a bad
//! config value, a database that cannot be opened — with a *stable code* (written to
//! `mail_queue.error_code`, documented in docs/queue-table.md, never renamed) and a sentence an
//! admin understands, in English or Japanese, with the server's own reply beside it.
//!
//! Not its job: deciding what a failure *means* for the row (retry, fail, pause): that is
//! `policy`. This module only describes.
//!
//! Invariants: no variant ever carries a password or token; texts are one line (server replies
//! are folded onto one line when they are stored in [`Reply`]).

use std::fmt;

/// Which language `last_error` and the CLI's messages are written in (`[log] error_language`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Lang {
    /// English.
    #[default]
    En,
    /// Japanese: what the CRM's Japanese admins read on the settings screen.
    Ja,
}

/// One SMTP reply as the server sent it, folded onto one line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The three-digit reply code (e.g. 550).
    pub code: u16,
    /// The enhanced status code (RFC 3463, e.g. "5.7.8") when the text starts with one.
    pub enhanced: Option<String>,
    /// The rest of the text, lines joined with a space.
    pub text: String,
}

impl Reply {
    /// Builds a reply from a code and its text lines; the enhanced code is split off the text.
    pub fn new(code: u16, text: &str) -> Reply {
        let text = text
            .split(['\r', '\n'])
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join(" ");
        let text = text.trim().to_string();
        let (enhanced, rest) = match text.split_once(' ') {
            Some((first, rest)) if is_enhanced_code(first) => (Some(first.to_string()), rest),
            None if is_enhanced_code(&text) => (Some(text.clone()), ""),
            _ => (None, text.as_str()),
        };
        Reply {
            code,
            enhanced,
            text: rest.trim().to_string(),
        }
    }

    /// The first digit of the reply code: 2 success, 4 transient, 5 permanent.
    pub fn class(&self) -> u16 {
        self.code / 100
    }

    /// Whether the enhanced status code starts with the given prefix, e.g. `"5.7."`.
    pub fn enhanced_starts_with(&self, prefix: &str) -> bool {
        self.enhanced
            .as_deref()
            .is_some_and(|e| e.starts_with(prefix))
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.code)?;
        if let Some(e) = &self.enhanced {
            write!(f, " {e}")?;
        }
        if !self.text.is_empty() {
            write!(f, " {}", self.text)?;
        }
        Ok(())
    }
}

/// `x.y.z` with x in 2/4/5 and y, z numbers: RFC 3463's enhanced status code.
fn is_enhanced_code(s: &str) -> bool {
    let parts: Vec<&str> = s.split('.').collect();
    parts.len() == 3
        && matches!(parts[0], "2" | "4" | "5")
        && parts[1..]
            .iter()
            .all(|p| !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()))
}

/// The step of an SMTP session where something happened. Shown in texts and used by `policy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
    /// The POP3 login of POP-before-SMTP.
    Pop,
    /// TCP connect (and, for implicit TLS, the handshake and the greeting).
    Connect,
    /// The server's 220 greeting.
    Greeting,
    /// EHLO.
    Ehlo,
    /// STARTTLS and the TLS handshake after it.
    StartTls,
    /// AUTH.
    Auth,
    /// MAIL FROM.
    MailFrom,
    /// RCPT TO.
    RcptTo,
    /// The DATA command (before the message is sent).
    Data,
    /// The reply to the final "." after the message.
    DataEnd,
}

impl Stage {
    /// A stable lower-case name, used in logs and in `mail_attempt`.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Pop => "pop_login",
            Stage::Connect => "connect",
            Stage::Greeting => "greeting",
            Stage::Ehlo => "ehlo",
            Stage::StartTls => "starttls",
            Stage::Auth => "auth",
            Stage::MailFrom => "mail_from",
            Stage::RcptTo => "rcpt_to",
            Stage::Data => "data",
            Stage::DataEnd => "data_end",
        }
    }

    fn describe(self, lang: Lang) -> &'static str {
        match (self, lang) {
            (Stage::Pop, Lang::En) => "at the POP login",
            (Stage::Pop, Lang::Ja) => "POPログイン",
            (Stage::Connect, Lang::En) => "connecting",
            (Stage::Connect, Lang::Ja) => "接続中",
            (Stage::Greeting, Lang::En) => "waiting for the greeting",
            (Stage::Greeting, Lang::Ja) => "サーバーの応答待ち",
            (Stage::Ehlo, Lang::En) => "at EHLO",
            (Stage::Ehlo, Lang::Ja) => "EHLO",
            (Stage::StartTls, Lang::En) => "at STARTTLS",
            (Stage::StartTls, Lang::Ja) => "STARTTLS",
            (Stage::Auth, Lang::En) => "at SMTP login",
            (Stage::Auth, Lang::Ja) => "SMTPログイン",
            (Stage::MailFrom, Lang::En) => "at MAIL FROM",
            (Stage::MailFrom, Lang::Ja) => "MAIL FROM",
            (Stage::RcptTo, Lang::En) => "at RCPT TO",
            (Stage::RcptTo, Lang::Ja) => "RCPT TO",
            (Stage::Data, Lang::En) => "at DATA",
            (Stage::Data, Lang::Ja) => "DATA",
            (Stage::DataEnd, Lang::En) => "after sending the message",
            (Stage::DataEnd, Lang::Ja) => "メッセージ送信後",
        }
    }
}

/// Everything that can go wrong, each with a stable [`Error::code`] and a text in two languages.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    // ----- delivery: the connection and the account -----
    /// The TCP connection could not be made (refused, unreachable, name not found).
    #[error("connect_failed")]
    ConnectFailed { detail: String },
    /// The server did not answer in time.
    #[error("timeout")]
    Timeout { stage: Stage, after_secs: u64 },
    /// The connection broke before the message was handed over (nothing was delivered).
    #[error("connection_lost")]
    ConnectionLost { stage: Stage, detail: String },
    /// TLS could not be set up: handshake failure, untrusted certificate, STARTTLS refused.
    #[error("tls_failed")]
    TlsFailed { detail: String },
    /// `tls = "starttls"` but the server does not offer STARTTLS: no fallback to plaintext.
    #[error("starttls_unavailable")]
    StartTlsUnavailable,
    /// The server refused the SMTP login.
    #[error("auth_failed")]
    AuthFailed {
        reply: Option<Reply>,
        detail: String,
    },
    /// The server refused or closed the session before a transaction (greeting, EHLO, 421).
    #[error("server_unavailable")]
    ServerUnavailable { stage: Stage, reply: Reply },
    /// The provider's sending limit (quota or rate) was reached.
    #[error("sending_limit")]
    SendingLimit { stage: Stage, reply: Reply },
    /// The POP-before-SMTP login failed (connection, TLS, login, timeout): the POP module's
    /// error, with its own stable `pop_*` code.
    #[error("pop")]
    Pop { error: crate::pop3::PopError },
    /// `[smtp] password_command` failed: it could not run, ended with an error or printed nothing.
    #[error("password_command_failed")]
    PasswordCommand { detail: String },
    /// `[smtp.oauth2]`: no access token could be had from the token endpoint (refresh token
    /// refused, endpoint unreachable, or its file unreadable).
    #[error("oauth2_token_failed")]
    OAuth2Token { detail: String },
    /// With POP-before-SMTP, relaying was refused even right after a fresh POP login.
    #[error("relay_denied")]
    RelayDenied { reply: Reply },
    /// The configured sender address was refused at MAIL FROM.
    #[error("sender_refused")]
    SenderRefused { reply: Reply },
    /// Every recipient was refused for good.
    #[error("recipient_refused")]
    RecipientRefused { refused: Vec<(String, Reply)> },
    /// Some recipients were refused for now and will be tried again.
    #[error("recipient_deferred")]
    RecipientDeferred {
        deferred: Vec<(String, Reply)>,
        refused: Vec<(String, Reply)>,
    },
    /// The server refused the message itself (DATA or the final ".") for good.
    #[error("message_refused")]
    MessageRefused { stage: Stage, reply: Reply },
    /// The server refused the message for now.
    #[error("message_deferred")]
    MessageDeferred { stage: Stage, reply: Reply },
    /// The server said something that does not fit the protocol.
    #[error("protocol_error")]
    Protocol { stage: Stage, detail: String },
    /// The message was handed over but the server's final reply never came: it may have gone out.
    #[error("in_doubt")]
    InDoubt { detail: String, held: bool },

    // ----- delivery: the row itself -----
    /// An address in the row cannot be used.
    #[error("invalid_address")]
    InvalidAddress {
        column: String,
        value: String,
        detail: String,
    },
    /// The row cannot be built into a mail (no recipients, control characters, ...).
    #[error("invalid_row")]
    InvalidRow { detail: String },
    /// The built mail is larger than `[queue] max_message_size`.
    #[error("too_large")]
    TooLarge { size: u64, max: u64 },
    /// The mail kept failing for now until `message_lifetime` ran out.
    #[error("expired")]
    Expired {
        lifetime: String,
        last: Option<Box<Error>>,
    },
    /// The mail kept failing for now until its attempts ran out.
    #[error("attempts_exhausted")]
    AttemptsExhausted { attempts: u32, last: Box<Error> },
    /// Sent, but some recipients were refused for good (an outcome of a sent row, not a failure).
    #[error("partly_refused")]
    PartlyRefused { refused: Vec<(String, Reply)> },
    /// The file transport could not write the mail.
    #[error("file_write_failed")]
    FileWrite { detail: String },

    // ----- the process -----
    /// The configuration is invalid; each entry names the key.
    #[error("config_invalid")]
    Config { problems: Vec<String> },
    /// The queue database could not be opened, migrated or written.
    #[error("database")]
    Database {
        /// SQLite's text (with the file's name when the store adds it).
        detail: String,
        /// Trouble with the file or the disk under it, if that is what it was.
        storage: Option<Storage>,
    },
    /// Something the command line asked for is not possible (unknown id, wrong status).
    #[error("usage")]
    Usage { detail: String },
}

impl Error {
    /// The stable code written to `error_code`. Never rename one: the CRM matches on them.
    pub fn code(&self) -> &'static str {
        match self {
            Error::ConnectFailed { .. } => "connect_failed",
            Error::Timeout { .. } => "timeout",
            Error::ConnectionLost { .. } => "connection_lost",
            Error::TlsFailed { .. } => "tls_failed",
            Error::StartTlsUnavailable => "starttls_unavailable",
            Error::AuthFailed { .. } => "auth_failed",
            Error::ServerUnavailable { .. } => "server_unavailable",
            Error::SendingLimit { .. } => "sending_limit",
            Error::Pop { error } => error.code(),
            Error::RelayDenied { .. } => "relay_denied",
            Error::PasswordCommand { .. } => "password_command_failed",
            Error::OAuth2Token { .. } => "oauth2_token_failed",
            Error::SenderRefused { .. } => "sender_refused",
            Error::RecipientRefused { .. } => "recipient_refused",
            Error::RecipientDeferred { .. } => "recipient_deferred",
            Error::MessageRefused { .. } => "message_refused",
            Error::MessageDeferred { .. } => "message_deferred",
            Error::Protocol { .. } => "protocol_error",
            Error::InDoubt { .. } => "in_doubt",
            Error::InvalidAddress { .. } => "invalid_address",
            Error::InvalidRow { .. } => "invalid_row",
            Error::TooLarge { .. } => "too_large",
            Error::Expired { .. } => "expired",
            Error::AttemptsExhausted { .. } => "attempts_exhausted",
            Error::PartlyRefused { .. } => "partly_refused",
            Error::FileWrite { .. } => "file_write_failed",
            Error::Config { .. } => "config_invalid",
            Error::Database { .. } => "database",
            Error::Usage { .. } => "usage",
        }
    }

    /// The server reply most relevant to this error, for the `smtp_reply` column.
    pub fn reply(&self) -> Option<&Reply> {
        match self {
            Error::AuthFailed { reply, .. } => reply.as_ref(),
            Error::ServerUnavailable { reply, .. }
            | Error::SendingLimit { reply, .. }
            | Error::SenderRefused { reply }
            | Error::RelayDenied { reply }
            | Error::MessageRefused { reply, .. }
            | Error::MessageDeferred { reply, .. } => Some(reply),
            Error::RecipientRefused { refused } | Error::PartlyRefused { refused } => {
                refused.first().map(|(_, r)| r)
            }
            Error::RecipientDeferred { deferred, .. } => deferred.first().map(|(_, r)| r),
            Error::Expired { last, .. } => last.as_deref().and_then(Error::reply),
            Error::AttemptsExhausted { last, .. } => last.reply(),
            _ => None,
        }
    }

    /// The process exit status for this error (sysexits.h): 78 for configuration, 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Config { .. } => 78,
            Error::Usage { .. } => 64,
            _ => 1,
        }
    }

    /// The sentence shown to an admin, in the requested language, with the server's reply.
    pub fn text(&self, lang: Lang) -> String {
        let ja = lang == Lang::Ja;
        let list = |v: &[(String, Reply)]| {
            v.iter()
                .map(|(a, r)| format!("{a} ({r})"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        match self {
            Error::ConnectFailed { detail } => {
                if ja {
                    format!("SMTPサーバーに接続できませんでした ({detail})")
                } else {
                    format!("Could not connect to the SMTP server ({detail})")
                }
            }
            Error::Timeout { stage, after_secs } => {
                if ja {
                    format!(
                        "SMTPサーバーが{}秒以内に応答しませんでした ({})",
                        after_secs,
                        stage.describe(lang)
                    )
                } else {
                    format!(
                        "The SMTP server did not answer within {after_secs} s ({})",
                        stage.describe(lang)
                    )
                }
            }
            Error::ConnectionLost { stage, detail } => {
                if ja {
                    format!(
                        "送信中に接続が切れました ({}: {detail})。再送します",
                        stage.describe(lang)
                    )
                } else {
                    format!(
                        "The connection was lost {} ({detail}); the mail will be sent again",
                        stage.describe(lang)
                    )
                }
            }
            Error::TlsFailed { detail } => {
                if ja {
                    format!("TLS接続に失敗しました ({detail})")
                } else {
                    format!("TLS could not be set up ({detail})")
                }
            }
            Error::StartTlsUnavailable => {
                if ja {
                    "SMTPサーバーがSTARTTLSに対応していないため、暗号化せずに送信することはしませんでした".into()
                } else {
                    "The SMTP server does not offer STARTTLS; nothing was sent unencrypted".into()
                }
            }
            Error::AuthFailed { reply, detail } => {
                let why = reply
                    .as_ref()
                    .map(|r| r.to_string())
                    .unwrap_or_else(|| detail.clone());
                if ja {
                    format!("SMTPログインに失敗しました ({why})")
                } else {
                    format!("SMTP login failed ({why})")
                }
            }
            Error::ServerUnavailable { stage, reply } => {
                if ja {
                    format!(
                        "SMTPサーバーが接続を受け付けませんでした ({}: {reply})",
                        stage.describe(lang)
                    )
                } else {
                    format!(
                        "The SMTP server refused the session {} ({reply})",
                        stage.describe(lang)
                    )
                }
            }
            Error::SendingLimit { reply, .. } => {
                if ja {
                    format!("送信数の上限に達したため、送信を一時停止しています ({reply})")
                } else {
                    format!("The provider's sending limit was reached; sending is paused ({reply})")
                }
            }
            Error::Pop { error } => error.text(ja),
            Error::PasswordCommand { detail } => {
                if ja {
                    format!("パスワードを取得するコマンド (smtp.password_command) が失敗しました ({detail})")
                } else {
                    format!("The command that gives the password (smtp.password_command) failed ({detail})")
                }
            }
            Error::OAuth2Token { detail } => {
                if ja {
                    format!("OAuth2のアクセストークンを取得できません。smtp.oauth2の設定とリフレッシュトークンを確認してください ({detail})")
                } else {
                    format!("No OAuth2 access token could be had; check [smtp.oauth2] and the refresh token ({detail})")
                }
            }
            Error::RelayDenied { reply } => {
                if ja {
                    format!("POPログイン直後でも中継が拒否されました。POP before SMTPの設定を確認してください ({reply})")
                } else {
                    format!("Relaying was refused even right after a POP login; check the POP-before-SMTP settings ({reply})")
                }
            }
            Error::SenderRefused { reply } => {
                if ja {
                    format!("送信元アドレスが拒否されました ({reply})")
                } else {
                    format!("The sender address was refused ({reply})")
                }
            }
            Error::RecipientRefused { refused } => {
                if ja {
                    format!("宛先が拒否されました: {}", list(refused))
                } else {
                    format!("Recipient refused: {}", list(refused))
                }
            }
            Error::RecipientDeferred { deferred, refused } => {
                let mut s = if ja {
                    format!(
                        "宛先が一時的に拒否されました。後で再送します: {}",
                        list(deferred)
                    )
                } else {
                    format!("Recipient refused for now, will retry: {}", list(deferred))
                };
                if !refused.is_empty() {
                    s += &if ja {
                        format!("; 宛先が拒否されました: {}", list(refused))
                    } else {
                        format!("; recipient refused: {}", list(refused))
                    };
                }
                s
            }
            Error::MessageRefused { reply, .. } => {
                if ja {
                    format!("メールがサーバーに拒否されました ({reply})")
                } else {
                    format!("The message was refused by the server ({reply})")
                }
            }
            Error::MessageDeferred { reply, .. } => {
                if ja {
                    format!("メールが一時的に拒否されました。後で再送します ({reply})")
                } else {
                    format!("The message was refused for now and will be retried ({reply})")
                }
            }
            Error::Protocol { stage, detail } => {
                if ja {
                    format!(
                        "SMTPサーバーの応答が不正です ({}: {detail})",
                        stage.describe(lang)
                    )
                } else {
                    format!(
                        "The SMTP server's answer was not understood {} ({detail})",
                        stage.describe(lang)
                    )
                }
            }
            Error::InDoubt { detail, held } => {
                let mut t = if ja {
                    format!("メール送信後にサーバーの応答がありませんでした。送信済みの可能性があります ({detail})")
                } else {
                    format!("No reply after the message was sent; it may have been delivered ({detail})")
                };
                if *held {
                    t += if ja {
                        "。担当者の確認待ちです (再送: mailqueue retry、取消: mailqueue cancel)"
                    } else {
                        "; held for an operator (mailqueue retry sends it again, mailqueue cancel drops it)"
                    };
                }
                t
            }
            Error::InvalidAddress {
                column,
                value,
                detail,
            } => {
                if ja {
                    format!("{column} のアドレスが不正です: {value:?} ({detail})")
                } else {
                    format!("Invalid address in {column}: {value:?} ({detail})")
                }
            }
            Error::InvalidRow { detail } => {
                if ja {
                    format!("メールを作成できません ({detail})")
                } else {
                    format!("The mail cannot be built ({detail})")
                }
            }
            Error::TooLarge { size, max } => {
                if ja {
                    format!("メールが大きすぎます ({size} バイト、上限 {max} バイト)")
                } else {
                    format!("The mail is too large ({size} bytes, the limit is {max} bytes)")
                }
            }
            Error::Expired { lifetime, last } => {
                let last = last.as_ref().map(|e| e.text(lang));
                match (ja, last) {
                    (true, Some(l)) => {
                        format!("{lifetime} 以内に送信できませんでした。最後のエラー: {l}")
                    }
                    (true, None) => format!("{lifetime} 以内に送信できませんでした"),
                    (false, Some(l)) => format!("Not delivered within {lifetime}; last error: {l}"),
                    (false, None) => format!("Not delivered within {lifetime}"),
                }
            }
            Error::AttemptsExhausted { attempts, last } => {
                if ja {
                    format!(
                        "{attempts} 回試みましたが送信できませんでした。最後のエラー: {}",
                        last.text(lang)
                    )
                } else {
                    format!(
                        "Gave up after {attempts} attempts; last error: {}",
                        last.text(lang)
                    )
                }
            }
            Error::PartlyRefused { refused } => {
                if ja {
                    format!(
                        "送信しましたが、一部の宛先が拒否されました: {}",
                        list(refused)
                    )
                } else {
                    format!("Sent, but some recipients were refused: {}", list(refused))
                }
            }
            Error::FileWrite { detail } => {
                if ja {
                    format!("メールをファイルに書き込めませんでした ({detail})")
                } else {
                    format!("The mail could not be written to a file ({detail})")
                }
            }
            Error::Config { problems } => {
                let head = if ja {
                    "設定ファイルが不正です"
                } else {
                    "invalid configuration"
                };
                format!("{head}: {}", problems.join("; "))
            }
            Error::Database { detail, storage } => {
                let hint = match (storage, ja) {
                    (Some(Storage::ReadOnly), false) => "; the queue file is read-only for this process: give the mailqueue user write access to it and its -wal/-shm files (docs/operations.md, Repairing owners and modes); mailqueue tries again by itself",
                    (Some(Storage::ReadOnly), true) => "。キューのファイルにこのプロセスから書き込めません: mailqueue ユーザーに、このファイルと -wal/-shm ファイルへの書き込み権限を与えてください (docs/operations.md の Repairing owners and modes)。mailqueue は自動で再試行します",
                    (Some(Storage::Full), false) => "; the disk is full: free some space; mailqueue tries again by itself",
                    (Some(Storage::Full), true) => "。ディスクがいっぱいです: 空き容量を作ってください。mailqueue は自動で再試行します",
                    _ => "",
                };
                if ja {
                    format!("キューのデータベースエラー ({detail}){hint}")
                } else {
                    format!("queue database error ({detail}){hint}")
                }
            }
            Error::Usage { detail } => detail.clone(),
        }
    }

    /// A database error, described (rusqlite's own text names the problem).
    pub fn db(e: impl fmt::Display) -> Error {
        Error::Database {
            detail: e.to_string(),
            storage: None,
        }
    }

    /// The storage trouble behind a database error, if that is what it is.
    pub fn storage(&self) -> Option<Storage> {
        match self {
            Error::Database { storage, .. } => *storage,
            _ => None,
        }
    }
}

/// Trouble with the queue file or the disk under it (not with the SQL): the daemon backs off
/// and tries again, and the store opens its connection afresh before the next try when the
/// old one cannot recover by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Storage {
    /// SQLITE_READONLY: the file (or its -wal/-shm) is not writable by this process; a
    /// connection opened then stays read-only until it is opened again.
    ReadOnly,
    /// SQLITE_FULL: the disk (or the file system's quota) is full.
    Full,
    /// SQLITE_IOERR: the operating system reported an I/O error.
    Io,
    /// SQLITE_CANTOPEN: the file, its -wal/-shm or a temporary file cannot be opened.
    CantOpen,
}

impl Storage {
    /// Whether the connection must be opened again before the next try (SQLite keeps a file
    /// it opened read-only that way, and after an I/O error a fresh start is the safe one).
    pub fn needs_reopen(self) -> bool {
        !matches!(self, Storage::Full)
    }
}

impl From<rusqlite::Error> for Error {
    fn from(e: rusqlite::Error) -> Self {
        use rusqlite::ErrorCode as C;
        let storage = match e.sqlite_error_code() {
            Some(C::ReadOnly) => Some(Storage::ReadOnly),
            Some(C::DiskFull) => Some(Storage::Full),
            Some(C::SystemIoFailure) => Some(Storage::Io),
            Some(C::CannotOpen) => Some(Storage::CantOpen),
            _ => None,
        };
        Error::Database {
            detail: e.to_string(),
            storage,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_splits_enhanced_code_and_folds_lines() {
        let r = Reply::new(
            535,
            "5.7.8 Username and Password not accepted.\n5.7.8 Learn more",
        );
        assert_eq!(r.code, 535);
        assert_eq!(r.enhanced.as_deref(), Some("5.7.8"));
        assert_eq!(
            r.to_string(),
            "535 5.7.8 Username and Password not accepted. 5.7.8 Learn more"
        );
        let plain = Reply::new(250, "Ok");
        assert_eq!(plain.enhanced, None);
        assert_eq!(plain.to_string(), "250 Ok");
    }

    #[test]
    fn auth_text_carries_the_reply_in_both_languages() {
        let e = Error::AuthFailed {
            reply: Some(Reply::new(535, "5.7.8 Authentication credentials invalid")),
            detail: String::new(),
        };
        assert_eq!(e.code(), "auth_failed");
        assert_eq!(
            e.text(Lang::Ja),
            "SMTPログインに失敗しました (535 5.7.8 Authentication credentials invalid)"
        );
        assert_eq!(
            e.text(Lang::En),
            "SMTP login failed (535 5.7.8 Authentication credentials invalid)"
        );
    }

    #[test]
    fn config_errors_exit_78() {
        assert_eq!(
            Error::Config {
                problems: vec!["x".into()]
            }
            .exit_code(),
            78
        );
    }
}

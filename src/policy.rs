//! Failure policy: what an SMTP outcome means for the recipient, the mail and the account.
//!
//! Job: the one documented table (stage × reply code × enhanced code × the few provider texts
//! that need it) that turns what `deliver` saw into a [`Verdict`], and the arithmetic after it
//! ([`settle`]: retry time from `retry_backoff`, `max_attempts`, `message_lifetime`; and the
//! account's pause back-off). docs/queue-table.md describes the same table for the CRM.
//!
//! Not its job: talking to servers or the database. Everything here is pure and synchronous, so
//! it is tested exhaustively without a network.
//!
//! Invariants:
//! - account-level trouble (connection, TLS, login, the provider's sending limit, a refused
//!   sender) never burns a mail's attempts: it pauses the queue ([`Outcome::Paused`]);
//! - a recipient is `accepted` only when the final "." was accepted after its RCPT was;
//! - a mail that some recipient accepted never ends `failed`.

use std::time::{Duration, SystemTime};

use crate::error::{Error, Reply, Stage};

/// What went wrong at one step, as `deliver` observed it (no interpretation yet).
#[derive(Debug, Clone, PartialEq)]
pub enum Problem {
    /// The server answered with a negative reply.
    Reply(Reply),
    /// Reading or writing the socket failed, or the server hung up.
    Io(String),
    /// The server did not answer within this many seconds.
    Timeout(u64),
    /// The TCP connection could not be made.
    Connect(String),
    /// TLS failed (handshake, certificate, STARTTLS refused).
    Tls(String),
    /// `tls = "starttls"` and the server does not offer it.
    NoStartTls,
    /// The server offers no AUTH mechanism we can use.
    NoAuthMechanism(String),
    /// No RCPT was accepted, so no message was sent (the replies are in the report).
    NoRecipientAccepted,
    /// Anything else the client could not go on with (unparsable reply, SMTPUTF8 missing).
    Client(String),
    /// The POP-before-SMTP login failed.
    Pop(crate::pop3::PopError),
    /// `[smtp] password_command` failed (how, never what it printed).
    PasswordCommand(String),
    /// `[smtp.oauth2]` gave no access token (why, never a token).
    OAuth2(String),
}

/// The failure that ended a delivery attempt early, and where.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    /// Where it happened.
    pub stage: Stage,
    /// What happened.
    pub problem: Problem,
}

/// Everything `deliver` saw in one attempt for one mail.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// Each recipient tried in this attempt with the server's reply to its RCPT.
    pub rcpts: Vec<(String, Reply)>,
    /// The reply to the final "." (the message was accepted), or why the attempt stopped.
    pub end: Result<Reply, Failure>,
    /// The account relays only after a POP login (POP-before-SMTP is on), and `deliver` has
    /// already logged in again and retried once: a "relay access denied" is the account's.
    pub relay_gated: bool,
}

/// What happened to the mail as a whole in this attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Delivered; every recipient settled.
    Sent,
    /// Try this mail again later (only the recipients still pending).
    Retry,
    /// Give up on this mail (or on every pending recipient of it).
    Failed,
    /// The account is in trouble: pause the queue; this attempt does not count.
    Paused,
    /// The message was handed over but no final reply came: it may have been delivered.
    InDoubt,
}

impl Outcome {
    /// The word stored in `mail_attempt.outcome`.
    pub fn name(self) -> &'static str {
        match self {
            Outcome::Sent => "sent",
            Outcome::Retry => "retry",
            Outcome::Failed => "failed",
            Outcome::Paused => "paused",
            Outcome::InDoubt => "in_doubt",
        }
    }
}

/// What one recipient's RCPT reply means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// Accepted, and the message went out: done.
    Accepted,
    /// Refused for good: done, named in `last_error`.
    Refused,
    /// Refused for now (or not reached): tried again with the next attempt.
    Pending,
}

impl Fate {
    /// The word stored in `mail_recipient.status`.
    pub fn name(self) -> &'static str {
        match self {
            Fate::Accepted => "sent",
            Fate::Refused => "failed",
            Fate::Pending => "pending",
        }
    }
}

/// The policy's judgement of one attempt.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    /// What happens to the mail.
    pub outcome: Outcome,
    /// Why (absent for a clean success). For `Paused`, the account-level error.
    pub error: Option<Error>,
    /// Each recipient tried, with what its reply means and the reply itself.
    pub rcpts: Vec<(String, Fate, Reply)>,
}

/// Provider texts that mean "you sent too much", whatever code they come with. Lower-case.
const LIMIT_TEXTS: &[&str] = &[
    "sending limit",
    "send limit",
    "sending quota",
    "quota exceeded",
    "rate limit",
    "ratelimit",
    "too many messages",
    "too many mails",
    "too many emails",
    "too many connections",
    "submissionquotaexceeded",
    "message rate exceeded",
    "daily limit",
    "hourly limit",
];

/// Whether a reply says the account hit the provider's sending limit.
pub fn is_sending_limit(r: &Reply) -> bool {
    let t = r.text.to_ascii_lowercase();
    if r.enhanced_starts_with("5.4.5")
        || r.enhanced_starts_with("4.4.5")
        || t.contains("submissionquotaexceeded")
    {
        return true;
    }
    // An enhanced code about the address, the mailbox or the message (X.1.x, X.2.x, X.3.x) is
    // the recipient's trouble — "552 5.2.2 Quota exceeded (mailbox full)" — not the account's.
    let about_recipient = ["4.1.", "5.1.", "4.2.", "5.2.", "4.3.", "5.3."]
        .iter()
        .any(|p| r.enhanced_starts_with(p));
    !about_recipient && LIMIT_TEXTS.iter().any(|p| t.contains(p))
}

/// Whether an RCPT reply is a "relay access denied" (554/550 5.7.1, or the words).
pub fn is_relay_denied(r: &Reply) -> bool {
    r.class() == 5
        && (r.enhanced_starts_with("5.7.1") || r.text.to_ascii_lowercase().contains("relay"))
}

/// How one negative reply at a stage is to be treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    Account,
    MailTransient,
    MailPermanent,
}

/// The table. Stage × reply → who is at fault and for how long. See docs/queue-table.md.
fn classify_reply(stage: Stage, r: &Reply) -> (Class, Error) {
    use Class::*;
    if r.code == 421 {
        // "Service not available, closing transmission channel": the whole session is gone.
        if is_sending_limit(r) || r.enhanced_starts_with("4.7.") {
            return (
                Account,
                Error::SendingLimit {
                    stage,
                    reply: r.clone(),
                },
            );
        }
        return (
            Account,
            Error::ServerUnavailable {
                stage,
                reply: r.clone(),
            },
        );
    }
    if is_sending_limit(r) {
        return (
            Account,
            Error::SendingLimit {
                stage,
                reply: r.clone(),
            },
        );
    }
    let transient = r.class() == 4;
    match stage {
        Stage::Pop | Stage::Connect | Stage::Greeting | Stage::Ehlo => (
            Account,
            Error::ServerUnavailable {
                stage,
                reply: r.clone(),
            },
        ),
        Stage::StartTls => (
            Account,
            Error::TlsFailed {
                detail: format!("STARTTLS refused: {r}"),
            },
        ),
        Stage::Auth => (
            Account,
            Error::AuthFailed {
                reply: Some(r.clone()),
                detail: String::new(),
            },
        ),
        Stage::MailFrom => {
            if transient
                && matches!(r.code, 450 | 451 | 452 | 454)
                && r.enhanced_starts_with("4.7.")
            {
                (
                    Account,
                    Error::SendingLimit {
                        stage,
                        reply: r.clone(),
                    },
                )
            } else if r.code == 552 || r.enhanced_starts_with("5.3.4") {
                // SIZE= refused: this message is too big, the account is fine.
                (
                    MailPermanent,
                    Error::MessageRefused {
                        stage,
                        reply: r.clone(),
                    },
                )
            } else if r.code == 530
                || r.enhanced_starts_with("5.7.0") && r.text.to_ascii_lowercase().contains("auth")
            {
                (
                    Account,
                    Error::AuthFailed {
                        reply: Some(r.clone()),
                        detail: String::new(),
                    },
                )
            } else if transient {
                (
                    Account,
                    Error::ServerUnavailable {
                        stage,
                        reply: r.clone(),
                    },
                )
            } else {
                // The configured sender is refused: every mail would be. Not the message's fault.
                (Account, Error::SenderRefused { reply: r.clone() })
            }
        }
        Stage::RcptTo => {
            if transient {
                (
                    MailTransient,
                    Error::RecipientDeferred {
                        deferred: vec![],
                        refused: vec![],
                    },
                )
            } else {
                (MailPermanent, Error::RecipientRefused { refused: vec![] })
            }
        }
        Stage::Data | Stage::DataEnd => {
            if transient {
                (
                    MailTransient,
                    Error::MessageDeferred {
                        stage,
                        reply: r.clone(),
                    },
                )
            } else {
                (
                    MailPermanent,
                    Error::MessageRefused {
                        stage,
                        reply: r.clone(),
                    },
                )
            }
        }
    }
}

/// Whether the failure is at the account level (and so pauses the queue).
fn classify_failure(f: &Failure) -> (Class, Error) {
    let stage = f.stage;
    let before_transaction = matches!(
        stage,
        Stage::Pop | Stage::Connect | Stage::Greeting | Stage::Ehlo | Stage::StartTls | Stage::Auth
    );
    match &f.problem {
        Problem::Reply(r) => classify_reply(stage, r),
        Problem::Pop(e) => (Class::Account, Error::Pop { error: e.clone() }),
        Problem::PasswordCommand(d) => {
            (Class::Account, Error::PasswordCommand { detail: d.clone() })
        }
        Problem::OAuth2(d) => (Class::Account, Error::OAuth2Token { detail: d.clone() }),
        Problem::Connect(detail) => (
            Class::Account,
            Error::ConnectFailed {
                detail: detail.clone(),
            },
        ),
        Problem::Tls(detail) => (
            Class::Account,
            Error::TlsFailed {
                detail: detail.clone(),
            },
        ),
        Problem::NoStartTls => (Class::Account, Error::StartTlsUnavailable),
        Problem::NoAuthMechanism(d) => (
            Class::Account,
            Error::AuthFailed {
                reply: None,
                detail: d.clone(),
            },
        ),
        Problem::Timeout(secs) if before_transaction => (
            Class::Account,
            Error::Timeout {
                stage,
                after_secs: *secs,
            },
        ),
        Problem::Io(detail) if before_transaction => (
            Class::Account,
            Error::ConnectionLost {
                stage,
                detail: detail.clone(),
            },
        ),
        Problem::Timeout(secs) => (
            Class::MailTransient,
            Error::Timeout {
                stage,
                after_secs: *secs,
            },
        ),
        Problem::Io(detail) => (
            Class::MailTransient,
            Error::ConnectionLost {
                stage,
                detail: detail.clone(),
            },
        ),
        Problem::NoRecipientAccepted => (
            Class::MailPermanent,
            Error::RecipientRefused { refused: vec![] },
        ),
        Problem::Client(d) if before_transaction => (
            Class::Account,
            Error::Protocol {
                stage,
                detail: d.clone(),
            },
        ),
        Problem::Client(d) => (
            Class::MailPermanent,
            Error::Protocol {
                stage,
                detail: d.clone(),
            },
        ),
    }
}

/// Judges one attempt. Pure: the same report always gives the same verdict.
pub fn judge(report: &Report) -> Verdict {
    let delivered = report.end.is_ok();
    let mut rcpts = Vec::with_capacity(report.rcpts.len());
    let mut refused = Vec::new();
    let mut deferred = Vec::new();
    let mut account: Option<Error> = None;
    for (addr, reply) in &report.rcpts {
        let fate = if reply.class() == 2 {
            if delivered {
                Fate::Accepted
            } else {
                Fate::Pending
            }
        } else if report.relay_gated
            && is_relay_denied(reply)
            && matches!(
                report.end,
                Err(Failure {
                    problem: Problem::NoRecipientAccepted,
                    ..
                })
            )
        {
            account.get_or_insert(Error::RelayDenied {
                reply: reply.clone(),
            });
            deferred.push((addr.clone(), reply.clone()));
            Fate::Pending
        } else {
            match classify_reply(Stage::RcptTo, reply) {
                (Class::Account, e) => {
                    account.get_or_insert(e);
                    deferred.push((addr.clone(), reply.clone()));
                    Fate::Pending
                }
                (Class::MailTransient, _) => {
                    deferred.push((addr.clone(), reply.clone()));
                    Fate::Pending
                }
                (Class::MailPermanent, _) => {
                    refused.push((addr.clone(), reply.clone()));
                    Fate::Refused
                }
            }
        };
        rcpts.push((addr.clone(), fate, reply.clone()));
    }

    let (outcome, error) = match &report.end {
        Ok(_) => {
            if let Some(e) = account {
                (Outcome::Paused, Some(e))
            } else if !deferred.is_empty() {
                (
                    Outcome::Retry,
                    Some(Error::RecipientDeferred { deferred, refused }),
                )
            } else if !refused.is_empty() {
                (Outcome::Sent, Some(Error::PartlyRefused { refused }))
            } else {
                (Outcome::Sent, None)
            }
        }
        Err(f)
            if f.stage == Stage::DataEnd
                && matches!(f.problem, Problem::Io(_) | Problem::Timeout(_)) =>
        {
            let detail = match &f.problem {
                Problem::Timeout(s) => format!("no reply within {s} s"),
                Problem::Io(d) => d.clone(),
                _ => unreachable!(),
            };
            (
                Outcome::InDoubt,
                Some(Error::InDoubt {
                    detail,
                    held: false,
                }),
            )
        }
        Err(f) if f.problem == Problem::NoRecipientAccepted => {
            if let Some(e) = account {
                (Outcome::Paused, Some(e))
            } else if !deferred.is_empty() {
                (
                    Outcome::Retry,
                    Some(Error::RecipientDeferred { deferred, refused }),
                )
            } else {
                (Outcome::Failed, Some(Error::RecipientRefused { refused }))
            }
        }
        Err(f) => {
            let (class, e) = classify_failure(f);
            // A recipient refused for good stays refused even when the transaction broke later.
            match class {
                Class::Account => (Outcome::Paused, Some(e)),
                Class::MailTransient => (Outcome::Retry, Some(e)),
                Class::MailPermanent => (Outcome::Failed, Some(e)),
            }
        }
    };
    Verdict {
        outcome,
        error,
        rcpts,
    }
}

/// What to do with a mail that may have gone out (`[queue] on_doubt`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnDoubt {
    /// Send it again once, with the same Message-ID (a duplicate the recipient can recognise
    /// beats a lost mail); a second doubt in a row holds it.
    Resend,
    /// Hold it for an operator (`mailqueue retry` or `cancel`).
    Hold,
}

/// The retry rules from the config.
#[derive(Debug, Clone, Copy)]
pub struct Rules<'a> {
    /// `[queue] retry_backoff`.
    pub backoff: &'a [Duration],
    /// `[queue] message_lifetime`.
    pub lifetime: Duration,
    /// `[queue] on_doubt`.
    pub on_doubt: OnDoubt,
}

/// The retry-relevant facts of a row, read by the store at claim time.
#[derive(Debug, Clone)]
pub struct RowFacts {
    /// Attempts counted so far, including this one.
    pub attempts: u32,
    /// The row's own limit, or the config's.
    pub max_attempts: u32,
    /// When the mail's lifetime started: `send_after` if later than `created_at`.
    pub born: SystemTime,
    /// Whether some recipient already accepted the mail in this or an earlier attempt.
    pub any_accepted: bool,
    /// Whether any recipient is still pending after this attempt.
    pub any_pending: bool,
    /// Earlier attempts of this mail that ended in doubt.
    pub doubts_before: u32,
}

/// What happens to the row after an attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum Settlement {
    /// `sent`, with `partly_refused` as the error when some recipient was refused.
    Sent(Option<Error>),
    /// Back to `queued`, due at this time, with the error shown meanwhile.
    Retry(SystemTime, Error),
    /// `failed`, with the reason.
    Failed(Error),
    /// Back to `queued` at its old due time; the attempt is not counted; the queue pauses.
    Paused(Error),
    /// `held` for an operator: it may have gone out, and it is not to be sent again blindly.
    Held(Error),
}

/// Applies attempts, lifetime and back-off to a verdict. `test_mail` is a row whose own
/// `max_attempts` column is 1 (how a CRM marks its test mail): it ends at once, even when paused.
pub fn settle(
    verdict: &Verdict,
    facts: &RowFacts,
    now: SystemTime,
    rules: &Rules<'_>,
    test_mail: bool,
) -> Settlement {
    let (backoff, lifetime) = (rules.backoff, rules.lifetime);
    let error = verdict.error.clone();
    let refused: Vec<(String, Reply)> = verdict
        .rcpts
        .iter()
        .filter(|(_, f, _)| *f != Fate::Accepted)
        .map(|(a, _, r)| (a.clone(), r.clone()))
        .collect();
    // When the mail ends while some recipient had accepted it, it ends `sent` (partly refused).
    let end_failed = |e: Error| {
        if facts.any_accepted {
            Settlement::Sent(Some(Error::PartlyRefused {
                refused: if refused.is_empty() {
                    vec![(
                        "(the remaining recipients)".to_string(),
                        e.reply()
                            .cloned()
                            .unwrap_or_else(|| Reply::new(0, e.code())),
                    )]
                } else {
                    refused.clone()
                },
            }))
        } else {
            Settlement::Failed(e)
        }
    };
    match verdict.outcome {
        Outcome::Sent => Settlement::Sent(error),
        Outcome::Failed => end_failed(error.unwrap_or(Error::InvalidRow {
            detail: "unknown failure".into(),
        })),
        Outcome::Paused => {
            let e = error.unwrap_or(Error::InvalidRow {
                detail: "unknown account failure".into(),
            });
            if test_mail {
                end_failed(e)
            } else {
                Settlement::Paused(e)
            }
        }
        Outcome::InDoubt if rules.on_doubt == OnDoubt::Hold || facts.doubts_before >= 1 => {
            let detail = match error {
                Some(Error::InDoubt { detail, .. }) => detail,
                _ => String::new(),
            };
            Settlement::Held(Error::InDoubt { detail, held: true })
        }
        Outcome::Retry | Outcome::InDoubt => {
            let e = error.unwrap_or(Error::InvalidRow {
                detail: "unknown transient failure".into(),
            });
            if !facts.any_pending {
                // Nothing left to try (e.g. every pending recipient was refused meanwhile).
                return if facts.any_accepted {
                    Settlement::Sent(Some(Error::PartlyRefused { refused }))
                } else {
                    Settlement::Failed(e)
                };
            }
            if facts.attempts >= facts.max_attempts {
                return end_failed(Error::AttemptsExhausted {
                    attempts: facts.attempts,
                    last: Box::new(e),
                });
            }
            let wait = backoff_step(backoff, facts.attempts);
            let next = now + wait;
            if next > facts.born + lifetime {
                return end_failed(Error::Expired {
                    lifetime: humantime::format_duration(lifetime).to_string(),
                    last: Some(Box::new(e)),
                });
            }
            Settlement::Retry(next, e)
        }
    }
}

/// The wait after attempt number `n` (1-based): the n-th step, the last one repeating.
pub fn backoff_step(steps: &[Duration], n: u32) -> Duration {
    let i = (n.max(1) as usize - 1).min(steps.len().saturating_sub(1));
    steps.get(i).copied().unwrap_or(Duration::from_secs(60))
}

/// How long the queue stays paused after the `level`-th account failure in a row (1-based).
/// It grows along `retry_backoff`, so a broken password does not hammer the provider.
pub fn pause_for(steps: &[Duration], level: u32) -> Duration {
    backoff_step(steps, level)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(code: u16, text: &str) -> Reply {
        Reply::new(code, text)
    }

    fn fail(stage: Stage, p: Problem) -> Report {
        Report {
            rcpts: vec![],
            end: Err(Failure { stage, problem: p }),
            relay_gated: false,
        }
    }

    fn outcome_of(stage: Stage, code: u16, text: &str) -> (Outcome, &'static str) {
        let v = judge(&fail(stage, Problem::Reply(r(code, text))));
        (v.outcome, v.error.map(|e| e.code()).unwrap_or(""))
    }

    #[test]
    fn the_outcome_table() {
        use Outcome::*;
        use Stage::*;
        let table: &[(Stage, u16, &str, Outcome, &str)] = &[
            (
                Greeting,
                554,
                "5.7.1 no service for you",
                Paused,
                "server_unavailable",
            ),
            (Greeting, 421, "4.3.2 busy", Paused, "server_unavailable"),
            (Ehlo, 550, "no", Paused, "server_unavailable"),
            (
                StartTls,
                454,
                "4.7.0 TLS not available",
                Paused,
                "tls_failed",
            ),
            (
                Auth,
                535,
                "5.7.8 Authentication credentials invalid",
                Paused,
                "auth_failed",
            ),
            (
                Auth,
                454,
                "4.7.0 Temporary authentication failure",
                Paused,
                "auth_failed",
            ),
            (
                MailFrom,
                421,
                "4.7.0 Try again later, closing connection",
                Paused,
                "sending_limit",
            ),
            (MailFrom, 450, "4.7.1 rate limited", Paused, "sending_limit"),
            (
                MailFrom,
                451,
                "4.7.1 Please slow down",
                Paused,
                "sending_limit",
            ),
            (MailFrom, 452, "4.7.0 too much", Paused, "sending_limit"),
            (
                MailFrom,
                550,
                "5.4.5 Daily user sending limit exceeded",
                Paused,
                "sending_limit",
            ),
            (
                MailFrom,
                554,
                "5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException",
                Paused,
                "sending_limit",
            ),
            (
                MailFrom,
                553,
                "5.7.1 Sender address rejected: not owned by user",
                Paused,
                "sender_refused",
            ),
            (
                MailFrom,
                530,
                "5.7.0 Authentication required",
                Paused,
                "auth_failed",
            ),
            (
                MailFrom,
                552,
                "5.3.4 Message size exceeds fixed limit",
                Failed,
                "message_refused",
            ),
            (
                MailFrom,
                451,
                "4.3.0 local error",
                Paused,
                "server_unavailable",
            ),
            (
                Data,
                554,
                "5.5.1 no valid recipients",
                Failed,
                "message_refused",
            ),
            (Data, 451, "4.3.0 try later", Retry, "message_deferred"),
            (DataEnd, 552, "5.3.4 too big", Failed, "message_refused"),
            (DataEnd, 554, "5.7.1 spam", Failed, "message_refused"),
            (DataEnd, 451, "4.7.1 greylisted", Retry, "message_deferred"),
            (
                DataEnd,
                550,
                "5.4.5 Daily sending quota exceeded",
                Paused,
                "sending_limit",
            ),
            (DataEnd, 421, "4.4.2 bye", Paused, "server_unavailable"),
        ];
        for (stage, code, text, want, want_code) in table {
            assert_eq!(
                outcome_of(*stage, *code, text),
                (*want, *want_code),
                "{stage:?} {code} {text}"
            );
        }
    }

    #[test]
    fn transport_problems_before_the_transaction_pause_and_after_it_retry() {
        for (stage, p, want) in [
            (
                Stage::Connect,
                Problem::Connect("refused".into()),
                Outcome::Paused,
            ),
            (Stage::Connect, Problem::Timeout(30), Outcome::Paused),
            (
                Stage::StartTls,
                Problem::Tls("UnknownIssuer".into()),
                Outcome::Paused,
            ),
            (Stage::Ehlo, Problem::NoStartTls, Outcome::Paused),
            (
                Stage::Auth,
                Problem::NoAuthMechanism("none offered".into()),
                Outcome::Paused,
            ),
            (Stage::MailFrom, Problem::Io("reset".into()), Outcome::Retry),
            (Stage::Data, Problem::Timeout(30), Outcome::Retry),
            (Stage::DataEnd, Problem::Timeout(600), Outcome::InDoubt),
            (Stage::DataEnd, Problem::Io("eof".into()), Outcome::InDoubt),
        ] {
            assert_eq!(
                judge(&fail(stage, p.clone())).outcome,
                want,
                "{stage:?} {p:?}"
            );
        }
    }

    #[test]
    fn a_full_mailbox_is_the_recipients_trouble_not_a_sending_limit() {
        let full = r(
            552,
            "5.2.2 <b@x>: Quota exceeded (mailbox for user is full)",
        );
        assert!(!is_sending_limit(&full));
        assert_eq!(
            outcome_of(
                Stage::DataEnd,
                552,
                "5.2.2 Quota exceeded (mailbox for user is full)"
            ),
            (Outcome::Failed, "message_refused")
        );
        let v = judge(&Report {
            rcpts: vec![("a@x".into(), r(250, "ok")), ("b@x".into(), full)],
            end: Ok(r(250, "queued")),
            relay_gated: false,
        });
        assert_eq!(v.outcome, Outcome::Sent);
        assert!(is_sending_limit(&r(
            554,
            "5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException"
        )));
        assert!(is_sending_limit(&r(550, "Daily sending quota exceeded")));
    }

    #[test]
    fn relay_denied_for_one_recipient_among_accepted_ones_is_not_the_account() {
        let v = judge(&Report {
            rcpts: vec![
                ("a@x".into(), r(250, "ok")),
                ("b@x".into(), r(550, "5.7.1 Recipient address rejected")),
            ],
            end: Ok(r(250, "queued")),
            relay_gated: true,
        });
        assert_eq!(v.outcome, Outcome::Sent);
    }

    #[test]
    fn one_of_three_recipients_refused_is_sent_partly() {
        let v = judge(&Report {
            rcpts: vec![
                ("a@x".into(), r(250, "ok")),
                ("b@x".into(), r(550, "5.1.1 User unknown")),
                ("c@x".into(), r(250, "ok")),
            ],
            end: Ok(r(250, "queued")),
            relay_gated: false,
        });
        assert_eq!(v.outcome, Outcome::Sent);
        assert_eq!(v.error.as_ref().unwrap().code(), "partly_refused");
        let fates: Vec<Fate> = v.rcpts.iter().map(|x| x.1).collect();
        assert_eq!(fates, vec![Fate::Accepted, Fate::Refused, Fate::Accepted]);
        assert!(v
            .error
            .unwrap()
            .text(crate::error::Lang::En)
            .contains("b@x (550 5.1.1 User unknown)"));
    }

    #[test]
    fn a_greylisted_recipient_is_retried_alone() {
        let v = judge(&Report {
            rcpts: vec![
                ("a@x".into(), r(250, "ok")),
                ("b@x".into(), r(451, "4.7.1 Greylisted")),
            ],
            end: Ok(r(250, "queued")),
            relay_gated: false,
        });
        assert_eq!(v.outcome, Outcome::Retry);
        assert_eq!(v.rcpts[0].1, Fate::Accepted);
        assert_eq!(v.rcpts[1].1, Fate::Pending);
    }

    #[test]
    fn all_refused_fails_and_quota_at_rcpt_pauses() {
        let all = judge(&Report {
            rcpts: vec![("a@x".into(), r(550, "5.1.1 unknown"))],
            end: Err(Failure {
                stage: Stage::RcptTo,
                problem: Problem::NoRecipientAccepted,
            }),
            relay_gated: false,
        });
        assert_eq!(
            (all.outcome, all.error.unwrap().code()),
            (Outcome::Failed, "recipient_refused")
        );
        let quota = judge(&Report {
            rcpts: vec![(
                "a@x".into(),
                r(550, "5.4.5 Daily user sending limit exceeded"),
            )],
            end: Err(Failure {
                stage: Stage::RcptTo,
                problem: Problem::NoRecipientAccepted,
            }),
            relay_gated: false,
        });
        assert_eq!(
            (quota.outcome, quota.error.unwrap().code()),
            (Outcome::Paused, "sending_limit")
        );
    }

    #[test]
    fn accepted_rcpts_are_pending_when_the_message_did_not_go_out() {
        let v = judge(&Report {
            rcpts: vec![("a@x".into(), r(250, "ok"))],
            end: Err(Failure {
                stage: Stage::DataEnd,
                problem: Problem::Reply(r(451, "4.3.0 later")),
            }),
            relay_gated: false,
        });
        assert_eq!(v.outcome, Outcome::Retry);
        assert_eq!(v.rcpts[0].1, Fate::Pending);
    }

    fn facts(attempts: u32, max: u32) -> RowFacts {
        RowFacts {
            attempts,
            max_attempts: max,
            born: SystemTime::UNIX_EPOCH,
            any_accepted: false,
            any_pending: true,
            doubts_before: 0,
        }
    }

    fn retry_verdict() -> Verdict {
        Verdict {
            outcome: Outcome::Retry,
            error: Some(Error::Timeout {
                stage: Stage::Data,
                after_secs: 1,
            }),
            rcpts: vec![],
        }
    }

    fn rules(steps: &[Duration], lifetime: Duration) -> Rules<'_> {
        Rules {
            backoff: steps,
            lifetime,
            on_doubt: OnDoubt::Resend,
        }
    }

    #[test]
    fn a_doubt_is_resent_once_then_held_or_held_at_once() {
        let v = Verdict {
            outcome: Outcome::InDoubt,
            error: Some(Error::InDoubt {
                detail: "no reply within 600 s".into(),
                held: false,
            }),
            rcpts: vec![],
        };
        let steps = [Duration::from_secs(60)];
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(10);
        let long = Duration::from_secs(86400);
        assert!(matches!(
            settle(&v, &facts(1, 5), now, &rules(&steps, long), false),
            Settlement::Retry(..)
        ));
        let mut again = facts(2, 5);
        again.doubts_before = 1;
        match settle(&v, &again, now, &rules(&steps, long), false) {
            Settlement::Held(e) => assert!(e
                .text(crate::error::Lang::En)
                .contains("held for an operator")),
            s => panic!("{s:?}"),
        }
        let hold = Rules {
            backoff: &steps,
            lifetime: long,
            on_doubt: OnDoubt::Hold,
        };
        assert!(matches!(
            settle(&v, &facts(1, 5), now, &hold, false),
            Settlement::Held(_)
        ));
    }

    #[test]
    fn backoff_follows_the_steps_and_repeats_the_last() {
        let steps = [Duration::from_secs(60), Duration::from_secs(300)];
        assert_eq!(backoff_step(&steps, 1), Duration::from_secs(60));
        assert_eq!(backoff_step(&steps, 2), Duration::from_secs(300));
        assert_eq!(backoff_step(&steps, 9), Duration::from_secs(300));
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let s = settle(
            &retry_verdict(),
            &facts(2, 5),
            now,
            &rules(&steps, Duration::from_secs(86400)),
            false,
        );
        assert_eq!(
            s,
            Settlement::Retry(
                now + Duration::from_secs(300),
                retry_verdict().error.unwrap()
            )
        );
    }

    #[test]
    fn retries_end_at_max_attempts_and_at_the_lifetime() {
        let steps = [Duration::from_secs(60)];
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        match settle(
            &retry_verdict(),
            &facts(5, 5),
            now,
            &rules(&steps, Duration::from_secs(86400)),
            false,
        ) {
            Settlement::Failed(e) => assert_eq!(e.code(), "attempts_exhausted"),
            s => panic!("{s:?}"),
        }
        match settle(
            &retry_verdict(),
            &facts(1, 5),
            now,
            &rules(&steps, Duration::from_secs(1000)),
            false,
        ) {
            Settlement::Failed(e) => assert_eq!(e.code(), "expired"),
            s => panic!("{s:?}"),
        }
    }

    #[test]
    fn a_pause_does_not_fail_a_row_but_ends_a_test_mail() {
        let v = Verdict {
            outcome: Outcome::Paused,
            error: Some(Error::AuthFailed {
                reply: Some(r(535, "5.7.8 bad")),
                detail: String::new(),
            }),
            rcpts: vec![],
        };
        let now = SystemTime::UNIX_EPOCH;
        let steps = [Duration::from_secs(60)];
        assert!(matches!(
            settle(
                &v,
                &facts(1, 1),
                now,
                &rules(&steps, Duration::MAX / 4),
                false
            ),
            Settlement::Paused(_)
        ));
        assert!(matches!(
            settle(
                &v,
                &facts(1, 1),
                now,
                &rules(&steps, Duration::MAX / 4),
                true
            ),
            Settlement::Failed(_)
        ));
    }

    #[test]
    fn a_mail_someone_accepted_never_ends_failed() {
        let mut f = facts(5, 5);
        f.any_accepted = true;
        let now = SystemTime::UNIX_EPOCH;
        match settle(
            &retry_verdict(),
            &f,
            now,
            &rules(&[Duration::from_secs(1)], Duration::from_secs(9999)),
            false,
        ) {
            Settlement::Sent(Some(e)) => assert_eq!(e.code(), "partly_refused"),
            s => panic!("{s:?}"),
        }
    }
}

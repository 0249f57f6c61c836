//! The bodies of the fuzz targets, and the checks they make on every input.
//!
//! This file is the `mailqueue-fuzz` library that `fuzz_targets/*.rs` call, and it is also
//! compiled into ordinary tests of the main crate with `#[path]`: `tests/fuzz_corpus_replay.rs`
//! (replays `fuzz/corpus/<target>/` and `fuzz/seeds/<target>/` on stable, so CI exercises the
//! corpora without nightly), `tests/proptest_builders.rs` (reuses [`check_composed`]) and
//! `tests/hostile_rows.rs` (header checks on what the server received). So it may only use
//! what the main crate's tests have: `mailqueue`, `lettre` and `std`.
//!
//! A target "crashes" on a panic inside mailqueue, and also when one of the checks below fails:
//! the checks are the properties that must hold for *every* input, whatever the row says.
#![allow(dead_code)] // each user of this file calls a different part of it

use std::path::Path;

use lettre::message::Mailbox;
use mailqueue::config::SenderConfig;
use mailqueue::error::{Error, Lang};
use mailqueue::message::{compose_full, load_attachments, parse_list, Charset, Composed, Extras};
use mailqueue::store::{AttachmentRow, Claim};

/// A fuzz target's body.
pub type Target = fn(&[u8]);

/// Every fuzz target: its name (the directory under `fuzz/corpus/`) and its body.
pub const TARGETS: &[(&str, Target)] = &[
    ("compose", fuzz_compose),
    ("pop3_reply", fuzz_pop3_reply),
    ("config", fuzz_config),
];

/// The header fields mailqueue writes into the top-level header block; anything else in it was
/// smuggled in by a row (apart from the extra headers the row's `headers` column asks for).
pub const ALLOWED_HEADERS: &[&str] = &[
    "From",
    "To",
    "Cc",
    "Reply-To",
    "Subject",
    "Message-ID",
    "Date",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
];

/// The separator between the fields of a compose input. 0xFF never occurs in UTF-8, so a field
/// can hold any text (invalid UTF-8 inside a field becomes U+FFFD).
pub const FIELD_SEP: u8 = 0xFF;

/// The sender every composed mail uses (what `[sender]` in a typical config gives).
pub fn sender() -> SenderConfig {
    SenderConfig {
        from: Mailbox::new(
            Some("CRM 通知".into()),
            "crm@example.com".parse().expect("sender address"),
        ),
        envelope_from: "bounces@example.com".parse().expect("envelope sender"),
        local_hostname: "crm.example.test".into(),
    }
}

/// The content of the attachment a fuzzed row may carry: dot lines, bare CR/LF, NUL, 0xFF.
pub const ATTACHMENT_BYTES: &[u8] = b"%PDF-1.4\n.\r\n..\r\nbare\rCR\0NUL\xff\r\n.";

/// The row fields a claim is built from, with its `headers` column and one attachment row.
#[derive(Debug, Clone, Default)]
pub struct Row {
    pub to: String,
    pub cc: String,
    pub bcc: String,
    pub reply_to: String,
    pub subject: String,
    pub body_text: String,
    pub body_html: Option<String>,
    pub send_after: Option<String>,
    /// `mail_queue.headers`: extra `Name: value` lines.
    pub headers: Option<String>,
    /// One `mail_attachment` row: file name and content type (content: [`ATTACHMENT_BYTES`]).
    pub attachment: Option<(String, String)>,
}

impl Row {
    /// Splits a fuzz input at [`FIELD_SEP`]: to, cc, bcc, reply_to, subject, body_text,
    /// body_html, send_after, headers, attachment file name, attachment content type. Missing
    /// fields are empty, or NULL for the nullable columns (an empty send_after is NULL too, so
    /// that inputs with the later fields still build; a bad send_after is covered by any
    /// other text).
    pub fn from_bytes(data: &[u8]) -> Row {
        let mut f = data
            .split(|b| *b == FIELD_SEP)
            .map(|b| String::from_utf8_lossy(b).into_owned());
        let mut next = || f.next().unwrap_or_default();
        let mut row = Row {
            to: next(),
            cc: next(),
            bcc: next(),
            reply_to: next(),
            subject: next(),
            body_text: next(),
            ..Row::default()
        };
        row.body_html = f.next();
        row.send_after = f.next().filter(|s| !s.is_empty());
        row.headers = f.next();
        row.attachment = f
            .next()
            .map(|name| (name, f.next().unwrap_or_else(|| "application/pdf".into())));
        row
    }

    /// The extras the scheduler would load for this row (`message::load_attachments` checks
    /// the attachment row as it does for a real one).
    pub fn extras(&self) -> Result<Extras, Error> {
        let rows = self
            .attachment
            .iter()
            .map(|(file_name, content_type)| AttachmentRow {
                file_name: file_name.clone(),
                content_type: content_type.clone(),
                content: Some(ATTACHMENT_BYTES.to_vec()),
                path: None,
            })
            .collect();
        Ok(Extras {
            headers: self.headers.clone(),
            attachments: load_attachments(rows, None)?,
        })
    }

    /// The header names the row's `headers` column asks for (any case).
    pub fn extra_header_names(&self) -> Vec<String> {
        self.headers
            .iter()
            .flat_map(|h| h.lines())
            .filter_map(|l| l.split_once(':'))
            .map(|(n, _)| n.trim().to_string())
            .collect()
    }

    /// The claim the scheduler would hand to `compose` for this row.
    pub fn claim(&self) -> Claim {
        Claim {
            id: 1,
            attempt_id: 1,
            message_id: "<0123456789abcdef@crm.example.test>".into(),
            attempts: 1,
            max_attempts: None,
            to_addrs: self.to.clone(),
            cc_addrs: self.cc.clone(),
            bcc_addrs: self.bcc.clone(),
            reply_to: self.reply_to.clone(),
            subject: self.subject.clone(),
            body_text: self.body_text.clone(),
            body_html: self.body_html.clone(),
            created_at: "2026-12-03T09:00:00.000Z".into(),
            send_after: self.send_after.clone(),
            settled: vec![],
            while_paused: false,
            doubts_before: 0,
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// An error that ends a row: a stable code, and a one-line text in both languages (it goes into
/// `last_error` and into log lines).
pub fn check_row_error(e: &Error) {
    assert!(
        matches!(e.code(), "invalid_address" | "invalid_row" | "too_large"),
        "unexpected error code {} for a row: {e:?}",
        e.code()
    );
    for lang in [Lang::En, Lang::Ja] {
        let t = e.text(lang);
        assert!(!t.is_empty(), "empty error text for {e:?}");
        assert!(
            !t.chars().any(|c| c.is_control()),
            "error text with a control character (a second log line?): {t:?}"
        );
    }
}

/// The header block of a composed mail, up to and including the CRLF that ends its last field
/// (the blank line is not included).
pub fn header_block(bytes: &[u8]) -> &[u8] {
    let end = find(bytes, b"\r\n\r\n").expect("no blank line after the header block");
    &bytes[..end + 2]
}

/// The header names of a header block in order (continuation lines belong to the field above).
/// Panics on anything that is neither a field start nor a folded continuation, and on a field
/// that is neither ours nor one of `extra` (any case).
pub fn header_names(head: &[u8], extra: &[String]) -> Vec<String> {
    assert!(!head.contains(&0), "NUL in the header block");
    for (i, b) in head.iter().enumerate() {
        match b {
            b'\r' => assert_eq!(
                head.get(i + 1),
                Some(&b'\n'),
                "bare CR in the header block at {i}: {:?}",
                String::from_utf8_lossy(head)
            ),
            b'\n' => assert!(
                i > 0 && head[i - 1] == b'\r',
                "bare LF in the header block at {i}: {:?}",
                String::from_utf8_lossy(head)
            ),
            _ => {}
        }
    }
    let body = head
        .strip_suffix(b"\r\n")
        .expect("header block ends in CRLF");
    let mut names = Vec::new();
    for line in body.split(|b| *b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.first().is_some_and(|b| *b == b' ' || *b == b'\t') {
            assert!(!names.is_empty(), "continuation line before any field");
            assert!(
                line.iter().any(|b| !b" \t".contains(b)),
                "a whitespace-only continuation line (looks like the end of the headers to \
                 some parsers): {:?}",
                String::from_utf8_lossy(head)
            );
            continue;
        }
        let colon = line.iter().position(|b| *b == b':').unwrap_or_else(|| {
            panic!(
                "header line without a colon: {:?}",
                String::from_utf8_lossy(line)
            )
        });
        let name = String::from_utf8_lossy(&line[..colon]).into_owned();
        assert!(
            ALLOWED_HEADERS.contains(&name.as_str())
                || extra.iter().any(|e| e.eq_ignore_ascii_case(&name)),
            "a header line mailqueue does not write: {:?}\nin {:?}",
            String::from_utf8_lossy(line),
            String::from_utf8_lossy(head)
        );
        names.push(name);
    }
    names
}

/// What must hold for every mail `compose` builds, whatever the row said: the header block has
/// only CRLF line ends, only our fields (and the extra ones the row asked for), each of ours
/// once (Bcc never), the Message-ID is the row's, the size is within the limit, and every
/// envelope recipient is one clean address from the row.
pub fn check_composed(row: &Row, claim: &Claim, m: &Composed, max_size: u64) {
    assert!(
        m.bytes.len() as u64 <= max_size,
        "{} bytes over the {max_size} byte limit",
        m.bytes.len()
    );
    let head = header_block(&m.bytes);
    let names = header_names(head, &row.extra_header_names());
    let count = |n: &str| names.iter().filter(|x| x.as_str() == n).count();
    for once in [
        "From",
        "Subject",
        "Message-ID",
        "Date",
        "MIME-Version",
        "Content-Type",
    ] {
        assert_eq!(count(once), 1, "{once} not exactly once: {names:?}");
    }
    for at_most_once in ["To", "Cc", "Reply-To", "Content-Transfer-Encoding"] {
        assert!(count(at_most_once) <= 1, "{at_most_once} twice: {names:?}");
    }
    let head_text = String::from_utf8_lossy(head);
    assert!(
        head_text.contains(&format!("\r\nMessage-ID: {}\r\n", claim.message_id))
            || head_text.starts_with(&format!("Message-ID: {}\r\n", claim.message_id)),
        "the row's Message-ID is not the header's: {head_text:?}"
    );

    assert!(
        !m.recipients.is_empty(),
        "a mail without recipients was built"
    );
    let mut seen: Vec<String> = Vec::new();
    for r in &m.recipients {
        let a = r.address.to_string();
        assert!(
            !a.is_empty()
                && !a
                    .chars()
                    .any(|c| c.is_control() || c.is_whitespace() || "<>\",".contains(c)),
            "an envelope address that is not one clean address: {a:?}"
        );
        assert!(a.len() <= 254, "an envelope address over 254 octets: {a:?}");
        let column = match r.kind {
            "to" => &claim.to_addrs,
            "cc" => &claim.cc_addrs,
            "bcc" => &claim.bcc_addrs,
            k => panic!("unknown recipient kind {k:?}"),
        };
        assert!(
            column.contains(&a),
            "envelope address {a:?} is not in {}: {column:?}",
            r.kind
        );
        assert!(
            !seen.iter().any(|s| s.eq_ignore_ascii_case(&a)),
            "{a:?} twice in the envelope"
        );
        seen.push(a);
    }
}

/// `parse_list`: an error, or mailboxes whose addresses are in the input and whose names and
/// addresses carry no control characters.
pub fn check_parse_list(value: &str) {
    match parse_list("to_addrs", value) {
        Err(e) => {
            assert_eq!(e.code(), "invalid_address", "{e:?}");
            check_row_error(&e);
        }
        Ok(list) => {
            assert!(
                list.len() <= value.matches('@').count(),
                "more mailboxes than @ signs in {value:?}: {list:?}"
            );
            for mb in &list {
                let a = mb.email.to_string();
                assert!(value.contains(&a), "{a:?} is not in the input {value:?}");
                assert!(
                    !a.chars().any(|c| c.is_control() || c.is_whitespace()),
                    "{a:?}"
                );
                if let Some(n) = &mb.name {
                    assert!(!n.chars().any(|c| c.is_control()), "name {n:?}");
                }
            }
        }
    }
}

/// Builds the row as the scheduler does (`compose_full` with its extras), in each charset
/// (UTF-8 also with a tight size limit), and checks the result or the error.
pub fn compose_row(row: &Row) {
    let claim = row.claim();
    let s = sender();
    let extras = match row.extras() {
        Ok(x) => x,
        Err(e) => return check_row_error(&e),
    };
    for (charset, max) in [
        (Charset::Utf8, 1 << 20),
        (Charset::Utf8, 1500),
        (Charset::Iso2022Jp, 1 << 20),
    ] {
        match compose_full(&claim, &s, max, charset, &extras) {
            Ok((m, _)) => check_composed(row, &claim, &m, max),
            Err(e) => check_row_error(&e),
        }
    }
    for v in [&row.to, &row.cc, &row.bcc, &row.reply_to] {
        check_parse_list(v);
    }
}

/// Target `compose`: the row → mail builder with every text column fuzzed.
pub fn fuzz_compose(data: &[u8]) {
    compose_row(&Row::from_bytes(data));
}

/// Target `pop3_reply`: a POP3 server's status line and greeting, as read off the wire.
pub fn fuzz_pop3_reply(data: &[u8]) {
    use mailqueue::pop3::{apop_digest, apop_timestamp, parse_status_line, PopReply};
    match parse_status_line(data) {
        Ok(reply) => {
            let line = reply.line();
            assert!(
                !line.chars().any(|c| c.is_control()),
                "a reply shown with a control character: {line:?}"
            );
            assert!(
                line.starts_with("+OK") || line.starts_with("-ERR"),
                "{line:?}"
            );
            let text = match &reply {
                PopReply::Ok(t) | PopReply::Err(t) => t,
            };
            assert_eq!(text.trim(), text, "untrimmed reply text");
            // What is shown parses back to the same reply (unless it was cut: the cut counts the
            // server's characters, and an escaped control character shows as four).
            if text.chars().count() <= 200 {
                assert_eq!(
                    parse_status_line(line.as_bytes()),
                    Ok(reply.clone()),
                    "{line:?}"
                );
            }
        }
        Err(e) => assert!(
            !e.contains(['\r', '\n', '\0']),
            "an error text with a line break: {e:?}"
        ),
    }
    if let Some(ts) = apop_timestamp(data) {
        assert!(
            ts.len() >= 3 && ts.starts_with('<') && ts.ends_with('>'),
            "{ts:?}"
        );
        assert!(ts.contains('@'), "{ts:?}");
        assert!(ts.bytes().all(|b| b.is_ascii_graphic()), "{ts:?}");
        assert!(
            ts[1..ts.len() - 1].bytes().all(|b| b != b'<' && b != b'>'),
            "{ts:?}"
        );
        assert!(
            find(data, ts.as_bytes()).is_some(),
            "{ts:?} not in the greeting"
        );
        let d = apop_digest(&ts, "secret");
        assert!(
            d.len() == 32 && d.bytes().all(|b| b.is_ascii_hexdigit()),
            "{d:?}"
        );
    }
}

/// Target `config`: the TOML config loader and its validation.
pub fn fuzz_config(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    match mailqueue::config::parse(&text, Path::new("fuzz.toml")) {
        Ok(c) => {
            assert!(!c.queue.retry_backoff.is_empty());
            assert!(c.queue.max_message_size > 0);
            assert!(c.queue.max_attempts > 0);
            assert!(!c.queue.poll_interval.is_zero());
            assert!(c.rate.burst > 0);
            let _ = c.describe();
        }
        Err(e) => {
            assert_eq!(e.code(), "config_invalid", "{e:?}");
            match &e {
                Error::Config { problems } => {
                    assert!(!problems.is_empty(), "a config error without a problem")
                }
                other => panic!("not a config error: {other:?}"),
            }
            for lang in [Lang::En, Lang::Ja] {
                assert!(!e.text(lang).is_empty());
            }
        }
    }
}

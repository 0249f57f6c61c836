//! Building a mail from a queue row.
//!
//! Job: parse the row's address lists (RFC 5322: `山田 太郎 <yamada@example.jp>, b@example.com`),
//! check what would otherwise reach the wire unchecked (control characters in headers, an empty
//! recipient list, a malformed `send_after`), and build the RFC 5322 message with lettre: From
//! with its display name (encoded per RFC 2047 when not ASCII), To/Cc (Bcc only in the
//! envelope), Reply-To, Subject, the stored Message-ID, Date, and a text body with an optional
//! HTML alternative. The headers that carry the row's text (From, To, Cc, Reply-To, Subject)
//! are written here, not by lettre: every mailbox keeps its place (address literals too), lines
//! are folded far below 998 octets, and a subject that needs encoding is encoded whole (its
//! spaces, and text that merely looks like an encoded word, arrive as written).
//!
//! Not its job: sending, or deciding what a bad row means (it returns an [`Error`]; the caller
//! fails the row).
//!
//! Invariants: the same row builds the same headers on every attempt (the Message-ID is the
//! row's); every recipient appears once in the envelope; no header line is longer than 998
//! octets; the result is no larger than `max_message_size`.

use std::str::FromStr;

use lettre::message::header::{ContentType, HeaderName, HeaderValue};
use lettre::message::{Mailbox, MultiPart, SinglePart};
use lettre::Address;

use crate::config::SenderConfig;
use crate::error::Error;
use crate::store::Claim;

/// One envelope recipient and the header it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recipient {
    /// The address.
    pub address: Address,
    /// "to", "cc" or "bcc".
    pub kind: &'static str,
}

/// A built mail.
#[derive(Debug, Clone)]
pub struct Composed {
    /// Every recipient of the mail, in order, each once.
    pub recipients: Vec<Recipient>,
    /// The message as sent after DATA (CRLF line ends; lettre dot-stuffs on the wire).
    pub bytes: Vec<u8>,
}

/// Splits an address list at top-level commas (and semicolons, which many CRMs and Outlook
/// use), ignoring those inside quotes, angle brackets and comments.
fn split_list(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut quoted, mut angle, mut paren, mut escape) = (false, false, 0u32, false);
    let mut start = 0;
    for (i, c) in s.char_indices() {
        if escape {
            escape = false;
            continue;
        }
        match c {
            '\\' if quoted => escape = true,
            '"' if !angle => quoted = !quoted,
            '<' if !quoted => angle = true,
            '>' if !quoted => angle = false,
            '(' if !quoted && !angle => paren += 1,
            ')' if !quoted && !angle => paren = paren.saturating_sub(1),
            ',' | ';' if !quoted && !angle && paren == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out.into_iter()
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect()
}

/// Parses one `addr` or `Display Name <addr>` strictly: anything else is an error, never
/// silently dropped.
fn parse_mailbox(piece: &str) -> Result<Mailbox, String> {
    if piece.chars().any(|c| c.is_control()) {
        return Err("contains a control character (line break, tab or NUL)".into());
    }
    let (name, addr) = match (piece.rfind('<'), piece.ends_with('>')) {
        (Some(lt), true) => (Some(piece[..lt].trim()), &piece[lt + 1..piece.len() - 1]),
        (None, false) => (None, piece),
        _ => return Err("unbalanced < >".into()),
    };
    let addr = addr.trim();
    if addr.chars().any(char::is_whitespace) || addr.contains(['<', '>', '"', ',']) {
        return Err(format!("{addr:?} is not one address"));
    }
    if addr.len() > 254 {
        return Err("address longer than 254 characters".into());
    }
    let address = Address::from_str(addr).map_err(|e| format!("{addr:?}: {e}"))?;
    let name = name.filter(|n| !n.is_empty()).map(|n| {
        let n = n
            .strip_prefix('"')
            .and_then(|n| n.strip_suffix('"'))
            .unwrap_or(n);
        n.replace("\\\"", "\"").replace("\\\\", "\\")
    });
    Ok(Mailbox::new(name, address))
}

/// Parses a column's address list. Empty text is an empty list.
pub fn parse_list(column: &str, value: &str) -> Result<Vec<Mailbox>, Error> {
    split_list(value)
        .into_iter()
        .map(|p| {
            parse_mailbox(p).map_err(|detail| Error::InvalidAddress {
                column: column.to_string(),
                value: p.to_string(),
                detail,
            })
        })
        .collect()
}

/// Line ends as the wire needs them: a bare CR becomes a line break (never a bare CR on the
/// wire: a server that takes one for a line end could read the rest as SMTP commands — the
/// "SMTP smuggling" family), and lettre then writes every line end as CRLF and dot-stuffs.
fn normalize_lines(s: &str) -> String {
    s.replace("\r\n", "\n").replace('\r', "\n")
}

fn no_controls(column: &str, v: &str) -> Result<(), Error> {
    if v.chars().any(|c| c.is_control() && c != '\t') {
        return Err(Error::InvalidRow {
            detail: format!("{column} contains a line break or control character"),
        });
    }
    Ok(())
}

/// How the text part and the header texts (subject, display names) are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Charset {
    /// UTF-8 (RFC 2047 encoded words, base64 or quoted-printable bodies).
    #[default]
    Utf8,
    /// ISO-2022-JP, 7bit (RFC 1468): what older Japanese mail clients and phones read best.
    /// HTML parts stay UTF-8.
    Iso2022Jp,
}

/// What a row carries besides its columns: extra headers and attachments (loaded after the
/// claim).
#[derive(Debug, Clone, Default)]
pub struct Extras {
    /// `mail_queue.headers`: `Name: value` lines.
    pub headers: Option<String>,
    /// The attachments, files read.
    pub attachments: Vec<AttachmentData>,
}

/// One attachment, ready to attach.
#[derive(Debug, Clone)]
pub struct AttachmentData {
    /// The file name shown to the recipient.
    pub file_name: String,
    /// Its MIME type.
    pub content_type: String,
    /// Its bytes.
    pub content: Vec<u8>,
}

/// The extra headers a CRM may set: threading, unsubscribe, and its own `X-` headers.
const ALLOWED_HEADERS: &[&str] = &[
    "In-Reply-To",
    "References",
    "List-Unsubscribe",
    "List-Unsubscribe-Post",
    "List-Id",
];

/// Validates `headers` (one `Name: value` per line) into header values.
pub fn extra_headers(text: &str) -> Result<Vec<lettre::message::header::HeaderValue>, Error> {
    let bad = |detail: String| Error::InvalidRow {
        detail: format!("headers: {detail}"),
    };
    let mut out = Vec::new();
    for line in text
        .split('\n')
        .map(|l| l.strip_suffix('\r').unwrap_or(l))
        .filter(|l| !l.trim().is_empty())
    {
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| bad(format!("{line:?} is not `Name: value`")))?;
        let name = name.trim();
        let value = value.trim();
        let allowed = ALLOWED_HEADERS
            .iter()
            .find(|h| h.eq_ignore_ascii_case(name))
            .copied();
        let x_header = name.len() > 2
            && name.get(..2).is_some_and(|p| p.eq_ignore_ascii_case("x-"))
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
        let Some(canonical) = allowed
            .map(str::to_string)
            .or_else(|| x_header.then(|| name.to_string()))
        else {
            return Err(bad(format!(
                "{name:?} is not allowed (only {} and X- headers)",
                ALLOWED_HEADERS.join(", ")
            )));
        };
        if value.is_empty()
            || !value.is_ascii()
            || value.chars().any(|c| c.is_control())
            || value.len() > 900
        {
            return Err(bad(format!(
                "the value of {name} must be non-empty printable ASCII of at most 900 characters"
            )));
        }
        let hname = lettre::message::header::HeaderName::new_from_ascii(canonical)
            .map_err(|e| bad(e.to_string()))?;
        out.push(lettre::message::header::HeaderValue::new(
            hname,
            value.to_string(),
        ));
    }
    Ok(out)
}

/// Reads attachment rows into attachments: a path must lie under `dir`. Blocking (file reads):
/// call it off the async runtime.
pub fn load_attachments(
    rows: Vec<crate::store::AttachmentRow>,
    dir: Option<&std::path::Path>,
) -> Result<Vec<AttachmentData>, Error> {
    let mut out = Vec::with_capacity(rows.len());
    for (i, r) in rows.into_iter().enumerate() {
        let bad = |d: String| Error::InvalidRow {
            detail: format!("attachment {} ({:?}): {d}", i + 1, r.file_name),
        };
        if r.file_name.trim().is_empty() || r.file_name.chars().any(|c| c.is_control()) {
            return Err(bad("file_name is empty or has control characters".into()));
        }
        if ContentType::parse(&r.content_type).is_err() {
            return Err(bad(format!("{:?} is not a content type", r.content_type)));
        }
        let content = match (r.content.clone(), &r.path) {
            (Some(c), _) => c,
            (None, Some(p)) => {
                let Some(dir) = dir else {
                    return Err(bad("a path, but [queue] attachments_dir is not set".into()));
                };
                let base = std::fs::canonicalize(dir)
                    .map_err(|e| bad(format!("attachments_dir {}: {e}", dir.display())))?;
                let file = std::fs::canonicalize(base.join(p))
                    .map_err(|e| bad(format!("cannot read {p}: {e}")))?;
                if !file.starts_with(&base) {
                    return Err(bad(format!("{p} is outside attachments_dir")));
                }
                std::fs::read(&file).map_err(|e| bad(format!("cannot read {p}: {e}")))?
            }
            (None, None) => return Err(bad("neither content nor path".into())),
        };
        out.push(AttachmentData {
            file_name: r.file_name,
            content_type: r.content_type,
            content,
        });
    }
    Ok(out)
}

/// The body: the text part, an HTML alternative, attachments around them.
fn assemble(
    b: lettre::message::MessageBuilder,
    text: SinglePart,
    html: Option<&String>,
    extras: &Extras,
) -> Result<lettre::Message, Error> {
    let mut b = b;
    if let Some(h) = &extras.headers {
        for v in extra_headers(h)? {
            b = b.raw_header(v);
        }
    }
    let alternative = match html {
        Some(h) if !h.trim().is_empty() => Some(
            MultiPart::alternative()
                .singlepart(text.clone())
                .singlepart(
                    SinglePart::builder()
                        .content_type(ContentType::TEXT_HTML)
                        .body(h.clone()),
                ),
        ),
        _ => None,
    };
    let msg = if extras.attachments.is_empty() {
        match alternative {
            Some(m) => b.multipart(m),
            None => b.singlepart(text),
        }
    } else {
        let mut mixed = match alternative {
            Some(m) => MultiPart::mixed().multipart(m),
            None => MultiPart::mixed().singlepart(text),
        };
        for a in &extras.attachments {
            let ct = ContentType::parse(&a.content_type).unwrap_or(ContentType::TEXT_PLAIN);
            mixed = mixed.singlepart(
                lettre::message::Attachment::new(a.file_name.clone()).body(a.content.clone(), ct),
            );
        }
        b.multipart(mixed)
    };
    msg.map_err(|e| Error::InvalidRow {
        detail: e.to_string(),
    })
}

/// Builds the mail for a claimed row, in UTF-8.
pub fn compose(claim: &Claim, sender: &SenderConfig, max_size: u64) -> Result<Composed, Error> {
    compose_utf8(claim, sender, max_size, &Extras::default())
}

/// ISO-2022-JP bytes of `s`, or `None` if it has a character ISO-2022-JP cannot carry.
fn iso2022jp(s: &str) -> Option<Vec<u8>> {
    let (bytes, _, unmappable) = encoding_rs::ISO_2022_JP.encode(s);
    (!unmappable).then(|| bytes.into_owned())
}

/// The bytes of `s` in `charset`, or `None` if the charset cannot carry it.
fn charset_bytes(s: &str, charset: Charset) -> Option<Vec<u8>> {
    match charset {
        Charset::Utf8 => Some(s.as_bytes().to_vec()),
        Charset::Iso2022Jp => iso2022jp(s),
    }
}

/// The whole of `s` as RFC 2047 "B" encoded words in `charset`, each a self-contained piece of
/// whole characters (RFC 1468: an ISO-2022-JP word ends back in ASCII) of at most 70
/// characters. Every character, spaces included, is inside a word: the whitespace between two
/// encoded words is not shown (RFC 2047 §6.2), so a run of spaces survives only that way. `None`
/// if the charset cannot carry `s`.
fn encoded_words(s: &str, charset: Charset) -> Option<Vec<String>> {
    use base64::Engine;
    // The spellings lettre and older Japanese mailers use.
    let label = match charset {
        Charset::Utf8 => "utf-8?b",
        Charset::Iso2022Jp => "ISO-2022-JP?B",
    };
    // At most 39 octets per word: 52 base64 characters, 70 with the ISO-2022-JP label.
    const MAX_OCTETS: usize = 39;
    let mut words = Vec::new();
    let mut chunk = String::new();
    for c in s.chars() {
        let mut next = chunk.clone();
        next.push(c);
        if charset_bytes(&next, charset)?.len() > MAX_OCTETS && !chunk.is_empty() {
            words.push(std::mem::take(&mut chunk));
            chunk.push(c);
        } else {
            chunk = next;
        }
    }
    if !chunk.is_empty() {
        words.push(chunk);
    }
    words
        .iter()
        .map(|w| {
            charset_bytes(w, charset).map(|b| {
                format!(
                    "=?{label}?{}?=",
                    base64::engine::general_purpose::STANDARD.encode(b)
                )
            })
        })
        .collect()
}

/// Whether `s` can go into an unstructured header (Subject) as it is: printable ASCII (and
/// tab), nothing a recipient would decode as an encoded word (RFC 2047 §5: text that looks like
/// one must itself be encoded), and no word too long to fold.
fn plain_text_ok(s: &str) -> bool {
    s.bytes().all(|b| b == b'\t' || (b' '..=b'~').contains(&b))
        && !s.contains("=?")
        && s.split(' ').all(|w| w.len() <= MAX_PLAIN_WORD)
}

/// The longest space-free piece written as it is; longer ones are encoded (and so cut into
/// words), which keeps every header line far below RFC 5322's 998 octets.
const MAX_PLAIN_WORD: usize = 200;

/// The words of a header's value, to be joined by single spaces and folded between them:
/// the text as it is when [`plain_text_ok`], else its encoded words in `charset`.
fn text_words(s: &str, charset: Charset) -> Option<Vec<String>> {
    if plain_text_ok(s) {
        Some(s.split(' ').map(str::to_string).collect())
    } else {
        encoded_words(s, charset)
    }
}

/// A display name as phrase words: as it is when it is only letters, digits and single spaces;
/// a quoted string when it is other printable ASCII; encoded words otherwise (non-ASCII, `=?`,
/// or a piece too long to fold).
fn phrase_words(name: &str, charset: Charset) -> Option<Vec<String>> {
    if !plain_text_ok(name) || name.contains('\t') {
        return encoded_words(name, charset);
    }
    let atoms = name
        .split(' ')
        .all(|w| !w.is_empty() && w.bytes().all(|b| b.is_ascii_alphanumeric()));
    if atoms {
        return Some(name.split(' ').map(str::to_string).collect());
    }
    let quoted = format!("\"{}\"", name.replace('\\', "\\\\").replace('"', "\\\""));
    // Folding inside a quoted string is allowed (RFC 5322 §3.2.4: FWS between its characters);
    // unfolding gives back the same text.
    Some(quoted.split(' ').map(str::to_string).collect())
}

/// Joins `words` with single spaces after `name: `, folding (CRLF + the space) before a word
/// that would take the line past 76 characters. A continuation line always carries a word, and
/// no word is longer than a few hundred octets, so no line comes near 998 octets (RFC 5322
/// §2.1.1) whatever the row holds.
fn folded(name: &'static str, words: &[String]) -> String {
    let mut out = String::new();
    let mut line = name.len() + 2;
    let mut line_has_text = false;
    for (i, w) in words.iter().enumerate() {
        if i > 0 {
            if line_has_text && !w.is_empty() && line + 1 + w.len() > 76 {
                out.push_str("\r\n ");
                line = 1;
            } else {
                out.push(' ');
                line += 1;
            }
        }
        out.push_str(w);
        line += w.len();
        line_has_text |= !w.is_empty();
    }
    out
}

/// A header written by us (lettre would re-encode or re-parse it).
fn raw(name: &'static str, raw_value: String, encoded: String) -> HeaderValue {
    HeaderValue::dangerous_new_pre_encoded(HeaderName::new_from_ascii_str(name), raw_value, encoded)
}

/// The Subject header in `charset`, or `None` if the charset cannot carry it.
fn subject_header(subject: &str, charset: Charset) -> Option<HeaderValue> {
    let words = text_words(subject, charset)?;
    Some(raw(
        "Subject",
        subject.to_string(),
        folded("Subject", &words),
    ))
}

/// A mailbox-list header (From, To, Cc, Reply-To) written by us, so that every mailbox keeps
/// its place (lettre re-parses a list to append to it, and its parser drops what it cannot
/// read, such as `user@[127.0.0.1]`) and a long list is folded at its commas. `None` if
/// `charset` cannot carry a display name.
fn mailboxes_header(name: &'static str, list: &[Mailbox], charset: Charset) -> Option<HeaderValue> {
    let mut words = Vec::new();
    for (i, m) in list.iter().enumerate() {
        let comma = if i + 1 < list.len() { "," } else { "" };
        match m.name.as_deref().map(str::trim).filter(|n| !n.is_empty()) {
            Some(n) => {
                words.extend(phrase_words(n, charset)?);
                words.push(format!("<{}>{comma}", m.email));
            }
            None => words.push(format!("{}{comma}", m.email)),
        }
    }
    let shown: Vec<String> = list.iter().map(Mailbox::to_string).collect();
    Some(raw(name, shown.join(", "), folded(name, &words)))
}

/// Builds the mail for a claimed row in `charset`. With ISO-2022-JP, a mail with a character
/// ISO-2022-JP cannot carry goes out in UTF-8; the second value then says why, for the log.
pub fn compose_with(
    claim: &Claim,
    sender: &SenderConfig,
    max_size: u64,
    charset: Charset,
) -> Result<(Composed, Option<String>), Error> {
    compose_full(claim, sender, max_size, charset, &Extras::default())
}

/// [`compose_with`], with the row's extra headers and attachments.
pub fn compose_full(
    claim: &Claim,
    sender: &SenderConfig,
    max_size: u64,
    charset: Charset,
    extras: &Extras,
) -> Result<(Composed, Option<String>), Error> {
    if charset == Charset::Iso2022Jp {
        match compose_iso(claim, sender, max_size, extras)? {
            Some(c) => return Ok((c, None)),
            None => {
                let c = compose_utf8(claim, sender, max_size, extras)?;
                return Ok((
                    c,
                    Some("it has characters ISO-2022-JP cannot carry; sent as UTF-8".into()),
                ));
            }
        }
    }
    compose_utf8(claim, sender, max_size, extras).map(|c| (c, None))
}

/// The ISO-2022-JP mail, or `None` if some text cannot be carried in it.
fn compose_iso(
    claim: &Claim,
    sender: &SenderConfig,
    max_size: u64,
    extras: &Extras,
) -> Result<Option<Composed>, Error> {
    use lettre::message::header::ContentTransferEncoding;
    use lettre::message::Body;
    // Validation and the envelope come from the UTF-8 build; then the headers and the text part
    // are replaced by their ISO-2022-JP forms.
    let utf8 = compose_utf8(claim, sender, max_size, extras)?;
    let to = parse_list("to_addrs", &claim.to_addrs)?;
    let cc = parse_list("cc_addrs", &claim.cc_addrs)?;
    let reply_to = parse_list("reply_to", &claim.reply_to)?;
    let text = claim
        .body_text
        .replace("\r\n", "\n")
        .replace('\r', "\n")
        .replace('\n', "\r\n");
    let cs = Charset::Iso2022Jp;
    let (Some(subject), Some(from), Some(to_h), Some(cc_h), Some(rt_h), Some(body)) = (
        subject_header(&claim.subject, cs),
        mailboxes_header("From", std::slice::from_ref(&sender.from), cs),
        mailboxes_header("To", &to, cs),
        mailboxes_header("Cc", &cc, cs),
        mailboxes_header("Reply-To", &reply_to, cs),
        iso2022jp(&text),
    ) else {
        return Ok(None);
    };
    let Ok(body) = Body::new_with_encoding(body, ContentTransferEncoding::SevenBit) else {
        return Ok(None); // a line too long for 7bit
    };
    let all: Vec<Address> = utf8.recipients.iter().map(|r| r.address.clone()).collect();
    let envelope = lettre::address::Envelope::new(Some(sender.envelope_from.clone()), all)
        .map_err(|e| Error::InvalidRow {
            detail: format!("envelope: {e}"),
        })?;
    let mut b = lettre::Message::builder()
        .from(sender.from.clone())
        .message_id(Some(claim.message_id.clone()))
        .envelope(envelope)
        .raw_header(from)
        .raw_header(subject);
    if !to.is_empty() {
        b = b.raw_header(to_h);
    }
    if !cc.is_empty() {
        b = b.raw_header(cc_h);
    }
    if !reply_to.is_empty() {
        b = b.raw_header(rt_h);
    }
    let iso_text = SinglePart::builder()
        .content_type(
            ContentType::parse("text/plain; charset=ISO-2022-JP").expect("a valid content type"),
        )
        .body(body);
    let msg = assemble(b, iso_text, claim.body_html.as_ref(), extras)?;
    let bytes = msg.formatted();
    if bytes.len() as u64 > max_size {
        return Err(Error::TooLarge {
            size: bytes.len() as u64,
            max: max_size,
        });
    }
    Ok(Some(Composed {
        recipients: utf8.recipients,
        bytes,
    }))
}

/// The UTF-8 mail.
fn compose_utf8(
    claim: &Claim,
    sender: &SenderConfig,
    max_size: u64,
    extras: &Extras,
) -> Result<Composed, Error> {
    no_controls("subject", &claim.subject)?;
    if claim.subject.chars().count() > 900 {
        return Err(Error::InvalidRow {
            detail: "subject is longer than 900 characters".into(),
        });
    }
    if claim.body_text.contains('\0')
        || claim.body_html.as_deref().is_some_and(|h| h.contains('\0'))
    {
        return Err(Error::InvalidRow {
            detail: "the body contains a NUL character".into(),
        });
    }
    if let Some(sa) = &claim.send_after {
        if crate::store::parse_ts(sa).is_none() {
            return Err(Error::InvalidRow {
                detail: format!(
                    "send_after {sa:?} is not a timestamp like 2026-12-03T09:00:00.000Z"
                ),
            });
        }
    }
    let to = parse_list("to_addrs", &claim.to_addrs)?;
    let cc = parse_list("cc_addrs", &claim.cc_addrs)?;
    let bcc = parse_list("bcc_addrs", &claim.bcc_addrs)?;
    let reply_to = parse_list("reply_to", &claim.reply_to)?;

    let mut recipients: Vec<Recipient> = Vec::new();
    for (list, kind) in [(&to, "to"), (&cc, "cc"), (&bcc, "bcc")] {
        for mb in list {
            let dup = recipients.iter().any(|r| {
                r.address
                    .to_string()
                    .eq_ignore_ascii_case(mb.email.as_ref())
            });
            if !dup {
                recipients.push(Recipient {
                    address: mb.email.clone(),
                    kind,
                });
            }
        }
    }
    if recipients.is_empty() {
        return Err(Error::InvalidRow {
            detail: "no recipients (to_addrs, cc_addrs and bcc_addrs are empty)".into(),
        });
    }

    // Every header with text from the row or the config is written by us (see
    // `mailboxes_header` and `subject_header`); UTF-8 carries any text.
    let header = |h: Option<HeaderValue>| h.expect("UTF-8 carries any text");
    let cs = Charset::Utf8;
    let mut b = lettre::Message::builder()
        .from(sender.from.clone())
        .raw_header(header(mailboxes_header(
            "From",
            std::slice::from_ref(&sender.from),
            cs,
        )))
        .raw_header(header(subject_header(&claim.subject, cs)))
        .message_id(Some(claim.message_id.clone()));
    for (name, list) in [("To", &to), ("Cc", &cc), ("Reply-To", &reply_to)] {
        if !list.is_empty() {
            b = b.raw_header(header(mailboxes_header(name, list, cs)));
        }
    }
    let all: Vec<Address> = recipients.iter().map(|r| r.address.clone()).collect();
    let envelope = lettre::address::Envelope::new(Some(sender.envelope_from.clone()), all)
        .map_err(|e| Error::InvalidRow {
            detail: format!("envelope: {e}"),
        })?;
    b = b.envelope(envelope);
    let text = SinglePart::builder()
        .content_type(ContentType::TEXT_PLAIN)
        .body(normalize_lines(&claim.body_text));
    let html = claim.body_html.as_deref().map(normalize_lines);
    let msg = assemble(b, text, html.as_ref(), extras)?;
    let bytes = msg.formatted();
    if bytes.len() as u64 > max_size {
        return Err(Error::TooLarge {
            size: bytes.len() as u64,
            max: max_size,
        });
    }
    Ok(Composed { recipients, bytes })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sender() -> SenderConfig {
        SenderConfig {
            from: Mailbox::new(Some("CRM 通知".into()), "crm@example.com".parse().unwrap()),
            envelope_from: "bounce@example.com".parse().unwrap(),
            local_hostname: "h.example".into(),
        }
    }

    fn claim(to: &str) -> Claim {
        Claim {
            id: 1,
            attempt_id: 1,
            message_id: "<abc@example.com>".into(),
            attempts: 1,
            max_attempts: None,
            to_addrs: to.into(),
            cc_addrs: String::new(),
            bcc_addrs: String::new(),
            reply_to: String::new(),
            subject: "活動報告".into(),
            body_text: "本文\n. a dot line\n".into(),
            body_html: None,
            created_at: String::new(),
            send_after: None,
            settled: vec![],
            while_paused: false,
            doubts_before: 0,
        }
    }

    #[test]
    fn japanese_names_and_lists_parse() {
        let l = parse_list(
            "to_addrs",
            "山田 太郎 <yamada@example.jp>, b@example.com; \"Doe, John\" <j@example.com>",
        )
        .unwrap();
        assert_eq!(l.len(), 3);
        assert_eq!(l[0].name.as_deref(), Some("山田 太郎"));
        assert_eq!(l[0].email.to_string(), "yamada@example.jp");
        assert_eq!(l[2].name.as_deref(), Some("Doe, John"));
    }

    #[test]
    fn junk_is_an_error_not_a_dropped_recipient() {
        for bad in [
            "a@example.com junk",
            "not-an-address",
            "x <a@example.com",
            "a@example.com\r\nBcc: evil@x.com",
        ] {
            let e = parse_list("to_addrs", bad).unwrap_err();
            assert_eq!(e.code(), "invalid_address", "{bad}");
        }
    }

    #[test]
    fn the_built_mail_has_headers_envelope_and_no_bcc_header() {
        let mut c = claim("山田 太郎 <yamada@example.jp>");
        c.bcc_addrs = "hidden@example.net".into();
        c.cc_addrs = "YAMADA@example.jp, c@example.com".into();
        let m = compose(&c, &sender(), 1 << 20).unwrap();
        let kinds: Vec<(String, &str)> = m
            .recipients
            .iter()
            .map(|r| (r.address.to_string(), r.kind))
            .collect();
        assert_eq!(
            kinds,
            vec![
                ("yamada@example.jp".to_string(), "to"),
                ("c@example.com".to_string(), "cc"),
                ("hidden@example.net".to_string(), "bcc")
            ]
        );
        let text = String::from_utf8(m.bytes).unwrap();
        assert!(text.contains("Message-ID: <abc@example.com>"), "{text}");
        assert!(text.contains("From: =?utf-8?b?"), "{text}");
        assert!(!text.to_ascii_lowercase().contains("bcc:"), "{text}");
        assert!(!text.contains("hidden@example.net"));
        assert!(text.contains("\r\n"));
    }

    #[test]
    fn iso_2022_jp_headers_and_body_are_7bit_and_fall_back_to_utf8() {
        let mut c = claim("山田 太郎 <yamada@example.jp>");
        c.subject =
            "活動報告：株式会社サンプル訪問の件について、長い件名でも正しく折り返されること".into();
        let (m, note) = compose_with(&c, &sender(), 1 << 20, Charset::Iso2022Jp).unwrap();
        assert!(note.is_none());
        let text = String::from_utf8(m.bytes.clone()).expect("ASCII");
        assert!(text.is_ascii(), "{text}");
        assert!(
            text.to_ascii_lowercase().contains("charset=iso-2022-jp")
                && text.contains("Content-Transfer-Encoding: 7bit"),
            "{text}"
        );
        assert!(text.contains("Subject: =?ISO-2022-JP?B?"), "{text}");
        // RFC 2047: an encoded word is at most 75 characters; long subjects fold into several.
        let words: Vec<&str> = text
            .split_whitespace()
            .filter(|w| w.starts_with("=?ISO-2022-JP?B?"))
            .collect();
        assert!(
            words.len() >= 3 && words.iter().all(|w| w.len() <= 75),
            "{words:?}"
        );
        c.subject = "絵文字 🎉".into();
        let (m, note) = compose_with(&c, &sender(), 1 << 20, Charset::Iso2022Jp).unwrap();
        assert!(note.unwrap().contains("UTF-8"));
        assert!(String::from_utf8(m.bytes)
            .unwrap()
            .contains("charset=utf-8"));
    }

    #[test]
    fn hostile_or_empty_rows_are_refused_with_a_reason() {
        let mut c = claim("a@example.com");
        c.subject = "hi\r\nBcc: evil@example.com".into();
        assert_eq!(
            compose(&c, &sender(), 1 << 20).unwrap_err().code(),
            "invalid_row"
        );
        assert_eq!(
            compose(&claim(""), &sender(), 1 << 20).unwrap_err().code(),
            "invalid_row"
        );
        let mut big = claim("a@example.com");
        big.body_text = "x".repeat(5000);
        assert_eq!(
            compose(&big, &sender(), 1000).unwrap_err().code(),
            "too_large"
        );
        let mut late = claim("a@example.com");
        late.send_after = Some("next tuesday".into());
        assert_eq!(
            compose(&late, &sender(), 1 << 20).unwrap_err().code(),
            "invalid_row"
        );
    }
}

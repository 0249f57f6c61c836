#!/usr/bin/env python3
"""A configurable, real ESMTP server for mailqueue's integration tests (built on aiosmtpd).

Run it with the test venv's python (scripts/test-setup.sh creates target/test-venv):

    target/test-venv/bin/python tests/servers/smtp_server.py --port 0 --spool /tmp/spool \
        [--tls-mode none|starttls|tls --cert cert.pem --key key.pem] \
        [--auth-user U --auth-password P] [--refuse-rcpt SUBSTR]... [--defer-rcpt SUBSTR:N]... \
        [--mail-reply "CODE TEXT"] [--data-reply "CODE TEXT"] [--max-messages N] \
        [--fault STAGE="CODE TEXT"]... [--hang STAGE]... [--tls-fail [close|garbage]] \
        [--pop-log DOVECOT_LOG [--pop-window SECS] [--pop-grace SECS]]

Once it listens on 127.0.0.1 it prints exactly one line `{"port": N}` to stdout and flushes.

Spool layout (only messages that were answered 2xx after the final "." are written):
    DIR/<seq>.eml         the message as received (dot-unstuffed, CRLF line ends, raw bytes)
    DIR/<seq>.json        {"mail_from", "rcpt_tos", "received_at", "mail_at" (time of MAIL FROM),
                           "connection", "helo"}
    DIR/connections       number of TCP connections accepted so far
Every file is written to a temporary name and renamed, .eml before .json, so a reader that sees
N.json can read N.eml in full.

Any configured reply that starts with "421" also closes the connection, as a real server does.

Generic faults, by stage (STAGE is one of GREETING, EHLO, STARTTLS, AUTH, MAIL, RCPT, DATA, DOT;
GREETING = the banner, DATA = the reply to the DATA command instead of 354, DOT = the reply after
the final "."); they apply to every connection and take precedence over the other options:
    --fault STAGE="CODE TEXT"   answer that command with this reply instead of handling it
                                (GREETING: this banner instead of 220; the session then goes on
                                as usual, as long as the client stays)
    --hang STAGE                read the command (GREETING: accept the connection) and never
                                answer; the connection stays open until the client closes it
    --tls-fail [close|garbage]  (needs --tls-mode starttls) answer STARTTLS with 220, read the
                                client's first TLS bytes, then close the connection ("close", the
                                default) or send bytes that are not TLS and close ("garbage")

POP-before-SMTP (--pop-log): relaying is allowed only to a client that logged in by POP3 lately,
from the same IP address, as providers without SMTP AUTH do it. The only evidence trusted is
Dovecot's own log: on every RCPT the server reads the whole log file and takes the successful
login lines

    2026-12-03 18:17:49.141380 pop3-login: Info: Login: user=<alice>, method=PLAIN, rip=127.0.0.2, ...

(timestamp = Dovecot's log_timestamp, "%Y-%m-%d %H:%M:%S.%{usecs} " in the tests' Dovecot,
"%Y-%m-%d %H:%M:%S " also works; local time, read back with the same local time zone), keeps
those whose rip= equals the SMTP client's peer IP and takes the newest. If its age is at most
--pop-window seconds (default 600), the RCPT goes on to the other checks (--refuse-rcpt,
--defer-rcpt); otherwise it is answered
    554 5.7.1 <ADDR>: Relay access denied
With --pop-grace SECS (default 0) a refusal is held back for up to SECS while the log is polled
again, for a login line Dovecot has not written yet. Each decision is logged to stderr (WARNING)
and appended as one JSON line to DIR/relay.log:
    {"rcpt", "peer", "allowed": bool, "login_age": float|null, "pop_user": str|null, "at": float}
login_age/pop_user describe the newest login from that peer (null: none at all), also when it
was too old; "at" is the unix time of the decision.
Logs go to stderr (WARNING by default, --verbose for the whole SMTP dialogue).
"""

import argparse
import asyncio
import functools
import itertools
import json
import logging
import os
import re
import ssl
import sys
import time
import warnings

from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

log = logging.getLogger("smtp_server")


def atomic_write(path, data):
    """Write bytes to `path` through a temporary file and a rename (readers never see half)."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


# A successful POP3 login in Dovecot's log (login_log_format_elements at its default).
POP_LOGIN_RE = re.compile(
    r"^(?P<ts>\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2})(?:\.(?P<frac>\d+))? "
    r"pop3-login: Info: Login: user=<(?P<user>[^>]*)>,.*?\brip=(?P<rip>[^,\s]+)")

# Logins stamped up to this far in the future still count (clock granularity; same host).
POP_CLOCK_SLACK = 1.0


def normalize_ip(ip):
    """'::ffff:127.0.0.2' -> '127.0.0.2'; anything else unchanged."""
    return ip[7:] if ip.lower().startswith("::ffff:") and "." in ip else ip


def newest_pop_login(log_path, peer_ip, now):
    """(age in seconds, user) of the newest successful POP3 login from `peer_ip` in Dovecot's
    log `log_path` that is not in the future, or (None, None) if there is none (or no log)."""
    try:
        with open(log_path, encoding="utf-8", errors="replace") as f:
            lines = f.readlines()
    except FileNotFoundError:
        return None, None
    best = (None, None)
    for line in lines:
        m = POP_LOGIN_RE.match(line)
        if not m or normalize_ip(m["rip"]) != peer_ip:
            continue
        # Dovecot writes local time; mktime reads it back in the same (this process's) zone.
        at = time.mktime(time.strptime(m["ts"], "%Y-%m-%d %H:%M:%S"))
        if m["frac"]:
            at += int(m["frac"]) / 10 ** len(m["frac"])
        age = now - at
        if age < -POP_CLOCK_SLACK:
            continue
        if best[0] is None or age < best[0]:
            best = (max(age, 0.0), m["user"])
    return best


def parse_reply(text):
    """'550 5.4.5 Daily limit' -> the same string, after checking it starts with a 3-digit code."""
    code = text.split(" ", 1)[0]
    if len(code) != 3 or not code.isdigit():
        raise argparse.ArgumentTypeError(f"reply must start with a 3-digit code: {text!r}")
    return text


FAULT_STAGES = ("GREETING", "EHLO", "STARTTLS", "AUTH", "MAIL", "RCPT", "DATA", "DOT")


def parse_stage(text):
    """'rcpt' -> 'RCPT', after checking it is one of FAULT_STAGES."""
    stage = text.strip().upper()
    if stage not in FAULT_STAGES:
        raise argparse.ArgumentTypeError(
            f"stage must be one of {', '.join(FAULT_STAGES)}, got {text!r}")
    return stage


def parse_fault(text):
    """'MAIL=451 4.3.0 try later' -> ('MAIL', '451 4.3.0 try later')."""
    stage, sep, reply = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--fault wants STAGE=\"CODE TEXT\", got {text!r}")
    return parse_stage(stage), parse_reply(reply.strip())


def parse_defer(text):
    """'greylist:2' -> ('greylist', 2)."""
    substr, sep, count = text.rpartition(":")
    if not sep or not substr or not count.isdigit():
        raise argparse.ArgumentTypeError(f"--defer-rcpt wants SUBSTR:N, got {text!r}")
    return substr, int(count)


class Handler:
    """aiosmtpd hooks: the fault injection and the spool. One instance shared by all connections."""

    def __init__(self, args):
        self.args = args
        self.spool = args.spool
        self.seq = itertools.count(1)           # message sequence numbers (file names)
        self.accepted = 0                       # messages accepted so far (for --max-messages)
        self.defer_seen = {}                    # address -> times it was deferred so far

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        # The 5-argument hook must record the EHLO name itself.
        session.host_name = hostname
        if not self.args.auth_user:
            # No AUTH configured: do not advertise it (aiosmtpd would offer AUTH, failing always).
            responses = [r for r in responses if not r[4:].startswith("AUTH")]
        return responses

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        if self.args.mail_reply:
            return await server.configured_reply(self.args.mail_reply)
        if self.args.max_messages is not None and self.accepted >= self.args.max_messages:
            return await server.configured_reply(self.args.max_messages_reply)
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        envelope.mail_at = time.time()  # when the transaction started, for pacing checks
        return "250 2.1.0 OK"

    async def pop_before_smtp(self, session, address):
        """The POP-before-SMTP gate: None to go on, or the 554 reply. Logs and records the decision."""
        peer = normalize_ip(str(session.peer[0])) if session.peer else ""
        deadline = time.monotonic() + self.args.pop_grace
        while True:
            now = time.time()
            age, user = newest_pop_login(self.args.pop_log, peer, now)
            allowed = age is not None and age <= self.args.pop_window
            if allowed or time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.02)
        record = {"rcpt": address, "peer": peer, "allowed": allowed, "login_age": age,
                  "pop_user": user, "at": now}
        with open(os.path.join(self.spool, "relay.log"), "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        age_text = "no POP login" if age is None else f"POP login of {user} {age:.3f}s ago"
        log.warning("relay %s: RCPT <%s> from %s (%s; window %ss)",
                    "allowed" if allowed else "DENIED", address, peer, age_text,
                    self.args.pop_window)
        return None if allowed else f"554 5.7.1 <{address}>: Relay access denied"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if self.args.pop_log:
            denied = await self.pop_before_smtp(session, address)
            if denied:
                return denied
        if any(s in address for s in self.args.refuse_rcpt):
            return f"550 5.1.1 <{address}>: Recipient address rejected: User unknown"
        for substr, times in self.args.defer_rcpt:
            if substr in address:
                seen = self.defer_seen.get(address, 0)
                if seen < times:
                    self.defer_seen[address] = seen + 1
                    return (f"451 4.7.1 <{address}>: Recipient address rejected: "
                            "Greylisted, try again later")
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):
        # After the final ".": an injected fault or hang comes first (nothing is spooled).
        fault = await server.fault_reply("DOT")
        if fault is not None:
            return await server.configured_reply(fault)
        received_at = time.time()
        reply = self.args.data_reply or "250 2.0.0 OK: queued"
        if reply.startswith("2"):
            # Accepted: spool it. The .eml first, then the .json that announces it.
            seq = next(self.seq)
            self.accepted += 1
            base = os.path.join(self.spool, str(seq))
            atomic_write(base + ".eml", envelope.original_content)
            meta = {
                "mail_from": envelope.mail_from,
                "rcpt_tos": list(envelope.rcpt_tos),
                "received_at": received_at,
                "mail_at": getattr(envelope, "mail_at", received_at),
                "connection": server.connection_no,
                "helo": session.host_name,
            }
            atomic_write(base + ".json", json.dumps(meta).encode())
            log.info("spooled message %d from %s to %s", seq, envelope.mail_from, envelope.rcpt_tos)
        return await server.configured_reply(reply)


class CountingSMTP(SMTP):
    """aiosmtpd's SMTP protocol with a connection number and the usual LOGIN prompts."""

    # aiosmtpd's own prompts are "User Name\0" / "Password\0"; Postfix, Gmail & co send these.
    AuthLoginUsernameChallenge = "Username:"
    AuthLoginPasswordChallenge = "Password:"

    def __init__(self, handler, connection_no, faults=None, hangs=(), tls_fail=None, **kwargs):
        super().__init__(handler, **kwargs)
        self.connection_no = connection_no
        self.faults = dict(faults or {})    # stage -> reply
        self.hangs = set(hangs)             # stages never answered
        self.tls_fail = tls_fail            # None, "close" or "garbage"
        self.greeted = False                # the banner has been pushed (or replaced)

    async def fault_reply(self, stage):
        """The reply injected at `stage`, or None to handle it as usual. For a hang it never
        returns: it waits until the connection is lost (aiosmtpd then cancels the handler)."""
        if stage in self.hangs:
            log.warning("hang at %s (connection %d): no answer", stage, self.connection_no)
            await asyncio.get_running_loop().create_future()
        reply = self.faults.get(stage)
        if reply is not None:
            log.warning("fault at %s (connection %d): %s", stage, self.connection_no, reply)
        return reply

    async def inject(self, stage):
        """Answers `stage` with its fault (True), or returns False to let aiosmtpd handle it."""
        reply = await self.fault_reply(stage)
        if reply is None:
            return False
        await self.push(await self.configured_reply(reply))
        return True

    async def smtp_STARTTLS(self, arg):
        if await self.inject("STARTTLS"):
            return
        if self.tls_fail and self.tls_context and not arg:
            await self.push("220 2.0.0 Ready to start TLS")
            try:
                # The ClientHello (or part of it): the handshake has begun.
                await asyncio.wait_for(self._reader.read(5), timeout=10)
            except (asyncio.TimeoutError, ConnectionError):
                pass
            if self.tls_fail == "garbage":
                self._writer.write(b"this is not a TLS record\r\n")
            log.warning("TLS handshake failure injected (%s, connection %d)",
                        self.tls_fail, self.connection_no)
            self.transport.close()
            return
        await super().smtp_STARTTLS(arg)

    async def configured_reply(self, reply):
        """Return `reply` for aiosmtpd to send; for a 421 send it now and hang up."""
        if reply.startswith("421"):
            await self.push(reply)
            self.transport.close()
            return None  # aiosmtpd pushes nothing more (and the transport is closing anyway)
        return reply

    async def push(self, status):
        if status is None:  # our 421 path above already answered
            return
        if not self.greeted:
            # The first push is aiosmtpd's 220 banner.
            self.greeted = True
            reply = await self.fault_reply("GREETING")
            if reply is not None:
                await super().push(reply)
                if reply.startswith("421"):
                    self.transport.close()
                return
        await super().push(status)


def _faultable(stage, name):
    """An override of SMTP.<name> that answers with the --fault/--hang of `stage` first."""
    base = getattr(SMTP, name)

    async def method(self, arg):
        if await self.inject(stage):
            return
        await base(self, arg)

    functools.update_wrapper(method, base)  # keeps aiosmtpd's @syntax data (HELP)
    return method


for _stage, _name in (("EHLO", "smtp_EHLO"), ("AUTH", "smtp_AUTH"), ("MAIL", "smtp_MAIL"),
                      ("RCPT", "smtp_RCPT"), ("DATA", "smtp_DATA")):
    setattr(CountingSMTP, _name, _faultable(_stage, _name))
functools.update_wrapper(CountingSMTP.smtp_STARTTLS, SMTP.smtp_STARTTLS)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (0 = any free port)")
    p.add_argument("--spool", required=True, help="directory for accepted messages")
    p.add_argument("--tls-mode", choices=["none", "starttls", "tls"], default="none")
    p.add_argument("--cert", help="server certificate chain (PEM)")
    p.add_argument("--key", help="server private key (PEM)")
    p.add_argument("--auth-user")
    p.add_argument("--auth-password")
    p.add_argument("--refuse-rcpt", action="append", default=[], metavar="SUBSTR")
    p.add_argument("--defer-rcpt", action="append", default=[], type=parse_defer, metavar="SUBSTR:N")
    p.add_argument("--mail-reply", type=parse_reply, metavar='"CODE TEXT"')
    p.add_argument("--data-reply", type=parse_reply, metavar='"CODE TEXT"')
    p.add_argument("--max-messages", type=int, help="accept at most N messages; MAIL then gets "
                   "--max-messages-reply")
    p.add_argument("--max-messages-reply", type=parse_reply,
                   default="452 4.5.3 Message limit reached, try again later")
    p.add_argument("--fault", action="append", default=[], type=parse_fault,
                   metavar='STAGE="CODE TEXT"', help="answer STAGE (%s) with this reply"
                   % ", ".join(FAULT_STAGES))
    p.add_argument("--hang", action="append", default=[], type=parse_stage, metavar="STAGE",
                   help="read the command at STAGE and never answer")
    p.add_argument("--tls-fail", nargs="?", const="close", choices=["close", "garbage"],
                   help="with --tls-mode starttls: break the TLS handshake after STARTTLS")
    p.add_argument("--hostname", default="mx.test.invalid", help="name in the greeting and EHLO")
    p.add_argument("--pop-log", metavar="DOVECOT_LOG",
                   help="POP-before-SMTP: allow RCPT only after a POP3 login from the client's "
                   "IP in this Dovecot log (see above)")
    p.add_argument("--pop-window", type=float, default=600.0, metavar="SECS",
                   help="with --pop-log: how old that login may be (default 600)")
    p.add_argument("--pop-grace", type=float, default=0.0, metavar="SECS",
                   help="with --pop-log: poll the log this long before refusing (default 0)")
    p.add_argument("--verbose", action="store_true", help="log the SMTP dialogue to stderr")
    args = p.parse_args()

    if args.tls_mode != "none" and not (args.cert and args.key):
        p.error("--tls-mode starttls|tls needs --cert and --key")
    if bool(args.auth_user) != bool(args.auth_password):
        p.error("--auth-user and --auth-password go together")
    if args.tls_fail and args.tls_mode != "starttls":
        p.error("--tls-fail needs --tls-mode starttls")
    if len({stage for stage, _ in args.fault}) != len(args.fault):
        p.error("--fault: one reply per stage")
    if args.pop_window < 0 or args.pop_grace < 0:
        p.error("--pop-window and --pop-grace must not be negative")

    logging.basicConfig(stream=sys.stderr, level=logging.INFO if args.verbose else logging.WARNING,
                        format="smtp_server %(levelname)s %(name)s: %(message)s")
    # aiosmtpd warns (and logs) about AUTH without TLS; on loopback in tests that is intended.
    warnings.simplefilter("ignore")
    logging.getLogger("mail.log").setLevel(logging.DEBUG if args.verbose else logging.ERROR)

    os.makedirs(args.spool, exist_ok=True)
    asyncio.run(serve(args))


async def serve(args):
    tls_context = None
    if args.tls_mode != "none":
        tls_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)  # server side, no client certs
        tls_context.load_cert_chain(args.cert, args.key)

    def authenticator(server, session, envelope, mechanism, auth_data):
        # Called for AUTH PLAIN and AUTH LOGIN with the decoded login and password (bytes).
        ok = (isinstance(auth_data, LoginPassword)
              and auth_data.login == args.auth_user.encode()
              and auth_data.password == args.auth_password.encode())
        # A failure without a message makes aiosmtpd answer "535 5.7.8 Authentication credentials invalid".
        return AuthResult(success=ok, handled=False)

    handler = Handler(args)
    connections = itertools.count(1)
    connections_file = os.path.join(args.spool, "connections")
    atomic_write(connections_file, b"0")

    def new_connection():
        # The protocol factory runs once per accepted TCP connection (a STARTTLS upgrade stays on
        # the same protocol object, so it is not counted twice).
        n = next(connections)
        atomic_write(connections_file, str(n).encode())
        return CountingSMTP(
            handler, n,
            faults=dict(args.fault), hangs=args.hang, tls_fail=args.tls_fail,
            hostname=args.hostname,
            ident="mailqueue-test-smtpd",
            enable_SMTPUTF8=True,
            # STARTTLS is offered only in starttls mode; implicit TLS is done by the listener.
            tls_context=tls_context if args.tls_mode == "starttls" else None,
            auth_required=bool(args.auth_user),
            auth_require_tls=False,  # allow AUTH in plaintext: we only listen on loopback
            authenticator=authenticator if args.auth_user else None,
            timeout=60,
        )

    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        new_connection, host="127.0.0.1", port=args.port,
        ssl=tls_context if args.tls_mode == "tls" else None, reuse_address=True)
    port = server.sockets[0].getsockname()[1]
    sys.stdout.write(json.dumps({"port": port}) + "\n")
    sys.stdout.flush()
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        pass

#!/usr/bin/env python3
"""A configurable, real ESMTP server for mailqueue's integration tests (built on aiosmtpd).

Run it with the test venv's python (scripts/test-setup.sh creates target/test-venv):

    target/test-venv/bin/python tests/servers/smtp_server.py --port 0 --spool /tmp/spool \
        [--tls-mode none|starttls|tls --cert cert.pem --key key.pem] \
        [--auth-user U --auth-password P] [--refuse-rcpt SUBSTR]... [--defer-rcpt SUBSTR:N]... \
        [--mail-reply "CODE TEXT"] [--data-reply "CODE TEXT"] [--max-messages N]

Once it listens on 127.0.0.1 it prints exactly one line `{"port": N}` to stdout and flushes.

Spool layout (only messages that were answered 2xx after the final "." are written):
    DIR/<seq>.eml         the message as received (dot-unstuffed, CRLF line ends, raw bytes)
    DIR/<seq>.json        {"mail_from", "rcpt_tos", "received_at", "connection", "helo"}
    DIR/connections       number of TCP connections accepted so far
Every file is written to a temporary name and renamed, .eml before .json, so a reader that sees
N.json can read N.eml in full.

Any configured reply that starts with "421" also closes the connection, as a real server does.
Logs go to stderr (WARNING by default, --verbose for the whole SMTP dialogue).
"""

import argparse
import asyncio
import itertools
import json
import logging
import os
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


def parse_reply(text):
    """'550 5.4.5 Daily limit' -> the same string, after checking it starts with a 3-digit code."""
    code = text.split(" ", 1)[0]
    if len(code) != 3 or not code.isdigit():
        raise argparse.ArgumentTypeError(f"reply must start with a 3-digit code: {text!r}")
    return text


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
        return "250 2.1.0 OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
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

    def __init__(self, handler, connection_no, **kwargs):
        super().__init__(handler, **kwargs)
        self.connection_no = connection_no

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
        await super().push(status)


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
    p.add_argument("--hostname", default="mx.test.invalid", help="name in the greeting and EHLO")
    p.add_argument("--verbose", action="store_true", help="log the SMTP dialogue to stderr")
    args = p.parse_args()

    if args.tls_mode != "none" and not (args.cert and args.key):
        p.error("--tls-mode starttls|tls needs --cert and --key")
    if bool(args.auth_user) != bool(args.auth_password):
        p.error("--auth-user and --auth-password go together")

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

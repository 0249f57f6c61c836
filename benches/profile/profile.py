"""Profile of a backlog drain (see benches/profile.sh); writes docs/PROFILE.md.

One `mailqueue run --once` delivers N queued mails of about 1 KiB over one connection to
Postfix's smtp-sink; daemon and sink are pinned to CPU 0. `perf record -F 2000 -g` samples the
daemon (all threads, user and kernel); the samples are grouped by symbol into a few kinds of
work. The grouping rules are below (CATEGORIES): a symbol goes to the first rule it matches.
"""

import collections
import datetime
import json
import os
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.environ.get("BIN") or os.path.join(ROOT, "target", "release", "mailqueue")
N = int(os.environ.get("N", "20000"))
OUT = os.environ.get("OUT", os.path.join(ROOT, "docs", "PROFILE.md"))
SINK = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"

# (name, dso pattern, symbol pattern); first match wins.
CATEGORIES = [
    ("kernel: thread wakeups and context switches", r"kernel",
     r"sched|switch|futex|epoll|wake|hrtimer|tick|rcu|irq|idle"),
    ("kernel: TCP over loopback", r"kernel", r"tcp|sock|skb|inet|ip_|net_|netif|loopback|recv|sendmsg"),
    ("kernel: file writes, page cache, file locks, inotify", r"kernel",
     r"ext4|jbd|folio|filemap|page|write|block|iter|fsnotify|inotify|vfs|lock|fdget|mm|tlb|dentry|inode"),
    ("kernel: other (syscall entry and exit, ...)", r"kernel", r""),
    ("SQLite (the bundled library)", r"", r"^(sqlite3|wal|pcache|btree|vdbe)"),
    ("rusqlite", r"", r"rusqlite"),
    ("lettre (SMTP codec, message building)", r"", r"lettre|quoted_printable|email_encoding"),
    ("malloc, free, memcpy", r"", r"malloc|free|memmove|memset|memcpy|memcmp|realloc|_int_"),
    ("tokio runtime", r"", r"tokio|mio::"),
    ("mailqueue's own code", r"", r"mailqueue"),
    ("other user space", r"", r""),
]


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


HISTORY_KINDS = [("wakeups", "kernel: thread wakeups and context switches"),
                 ("TCP", "kernel: TCP over loopback"),
                 ("file writes", "kernel: file writes, page cache, file locks, inotify"),
                 ("SQLite", "SQLite (the bundled library)")]


def history(path, now):
    """The "Runs" table: this run first, then the rows of the page being replaced (or, for a page
    written before the table existed, that page's own run), so before and after stay on record."""
    head = ["## Runs, newest first", "",
            "Each run of this script adds a row; the last column is the newest commit that changed "
            "the daemon's source at the profiled commit (what the row measures). The shares are of "
            "the daemon's samples, as in the table above.", "",
            "| date | commit | mails/s under perf | CPU µs/mail | " +
            " | ".join(k for k, _ in HISTORY_KINDS) + " | the daemon's last source change |",
            "|---|---|---|---|" + "---|" * len(HISTORY_KINDS) + "---|"]

    def subject(commit):
        # The last commit that changed the daemon's source: what the row measures.
        r = subprocess.run(["git", "-C", ROOT, "log", "-1", "--format=%h %s", commit.rstrip("+"),
                            "--", "src", "Cargo.toml", "Cargo.lock"], capture_output=True, text=True)
        return (r.stdout.strip()[:100] or "?").replace("|", "/")

    def row(d):
        return (f"| {d['date']} | `{d['commit']}` | {d['rate']} | {d['cpu']} | " +
                " | ".join(f"{d['cats'].get(full, '?')} %" for _, full in HISTORY_KINDS) +
                f" | {subject(d['commit'])} |")

    old_rows = []
    try:
        old = open(path).read()
    except OSError:
        old = ""
    if "## Runs, newest first" in old:
        table = old.split("## Runs, newest first", 1)[1]
        old_rows = [l for l in table.splitlines() if l.startswith("| 20")]
    elif old:
        date = re.search(r"^- date: (.+)$", old, re.M)
        commit = re.search(r"^- commit: `(\w+)`", old, re.M)
        res = re.search(r"under perf \((\d+) mails/s.*= (\d+) µs per mail", old)
        if date and commit and res:
            cats = dict(re.findall(r"^\| ([^|]+?) \| ([\d.]+) % \|$", old, re.M))
            old_rows = [row({"date": date.group(1), "commit": commit.group(1), "rate": res.group(1),
                             "cpu": res.group(2), "cats": cats})]
    return head + [row(now)] + old_rows + [""]


def main():
    tmp = tempfile.mkdtemp(prefix="mq-profile-")
    port = free_port()
    sink_out = os.path.join(tmp, "sink.out")
    sink = subprocess.Popen(["taskset", "-c", "0", SINK, "-u", "nobody", "-c", f"127.0.0.1:{port}", "256"],
                            stdout=open(sink_out, "wb"), stderr=subprocess.STDOUT)
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), 0.1).close()
                break
            except OSError:
                time.sleep(0.05)
        db = os.path.join(tmp, "q.db")
        cfg = os.path.join(tmp, "mailqueue.toml")
        with open(cfg, "w") as f:
            f.write(f"""[queue]
database = {json.dumps(db)}
[sender]
from_address = "crm@example.com"
from_name = "CRM 通知"
local_hostname = "crm.example.test"
[smtp]
transport = "smtp"
host = "127.0.0.1"
port = {port}
tls = "none"
auth = false
max_messages_per_connection = 1000000
[rate]
interval_ms = 0
""")
        subprocess.run([BIN, "--config", cfg, "migrate"], check=True, stdout=subprocess.DEVNULL)
        body = ("Activity report line. " * 46)[:1000]
        c = sqlite3.connect(db, isolation_level=None)
        c.execute("BEGIN IMMEDIATE")
        c.executemany("INSERT INTO mail_queue (to_addrs, subject, body_text) VALUES (?, ?, ?)",
                      ((f"rcpt{i}@example.net", f"Activity report {i}", body) for i in range(N)))
        c.execute("COMMIT")
        c.close()
        data = os.path.join(tmp, "perf.data")
        log(f"profile: perf record of run --once, {N} mails")
        t0 = time.monotonic()
        p = subprocess.Popen(["perf", "record", "-q", "-F", "2000", "-g", "-o", data, "--",
                              "taskset", "-c", "0", BIN, "--config", cfg, "run", "--once"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _, _, ru = os.wait4(p.pid, 0)
        secs = time.monotonic() - t0
        c = sqlite3.connect(db)
        sent = c.execute("SELECT count(*) FROM mail_queue WHERE status = 'sent'").fetchone()[0]
        c.close()
        report = subprocess.run(["perf", "report", "-i", data, "--no-children", "--sort", "dso,sym",
                                 "-g", "none", "--stdio"], capture_output=True, text=True).stdout
    finally:
        sink.kill()
    cats = collections.Counter()
    top = []
    for line in report.splitlines():
        m = re.match(r"\s*([\d.]+)%\s+(\S+)\s+\[(.)\]\s+(.*)", line)
        if not m:
            continue
        pct, dso, sym = float(m.group(1)), m.group(2), m.group(4).strip()
        top.append((pct, dso, sym))
        for name, dpat, spat in CATEGORIES:
            if (dpat == "" or re.search(dpat, dso)) and (dpat != "" or "kernel" not in dso) \
                    and re.search(spat, sym, re.I):
                cats[name] += pct
                break
    total = sum(cats.values())
    commit = os.environ.get("PROFILE_COMMIT", "?")
    dirty = os.environ.get("PROFILE_DIRTY", "").split()
    lines = [
        "# Profile of a backlog drain",
        "",
        "Written by `bash benches/profile.sh` (benches/profile/profile.py); do not edit by hand.",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- commit: `{commit}`" + (f" plus uncommitted changes to {', '.join(dirty)}" if dirty else ""),
        f"- run: `mailqueue run --once` delivering {N} queued mails (1000-character bodies) over one "
        f"connection to Postfix's smtp-sink, both pinned to CPU 0; `perf record -F 2000 -g`",
        f"- result: {sent} sent in {secs:.1f} s under perf ({sent / secs:.0f} mails/s; perf's overhead "
        f"lowers it — benches/e2e.sh has the real rate); CPU {ru.ru_utime + ru.ru_stime:.2f} s "
        f"(user {ru.ru_utime:.2f}, system {ru.ru_stime:.2f}) = "
        f"{(ru.ru_utime + ru.ru_stime) / max(sent, 1) * 1e6:.0f} µs per mail",
        "",
        "| kind of work | share of the daemon's samples |",
        "|---|---|",
    ]
    for name, _, _ in CATEGORIES:
        if cats[name]:
            lines.append(f"| {name} | {cats[name] / total * 100:.1f} % |")
    lines += ["", "The 15 hottest symbols:", "", "| share | where | symbol |", "|---|---|---|"]
    for pct, dso, sym in sorted(top, reverse=True)[:15]:
        lines.append(f"| {pct:.2f} % | {dso} | `{sym[:80]}` |")
    lines += [
        "",
        "How to read it: unpaced, the daemon claims a batch of rows in one SQLite transaction and "
        "commits their outcomes in another (`[queue] commit_batch`, default 64: two WAL commits of "
        "a few pages per batch); each mail is still a handful of SQL statements inside those "
        "transactions. With a server that offers PIPELINING (smtp-sink does) each mail is two round "
        "trips to a sink on the same CPU — MAIL, RCPT and DATA in one write, then the message and "
        "its final dot in one write — each a wakeup of the daemon. smtp-source, the ceiling in "
        "docs/BENCHMARKS.md, writes nothing to disk and does not pipeline.",
        "",
    ]
    lines += history(OUT, {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit + ("+" if dirty else ""),
        "rate": f"{sent / secs:.0f}",
        "cpu": f"{(ru.ru_utime + ru.ru_stime) / max(sent, 1) * 1e6:.0f}",
        "cats": {name: f"{cats[name] / total * 100:.1f}" for name, _, _ in CATEGORIES},
    })
    with open(OUT, "w") as f:
        f.write("\n".join(lines))
    log(f"profile: wrote {OUT}")
    shutil.rmtree(tmp, ignore_errors=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()

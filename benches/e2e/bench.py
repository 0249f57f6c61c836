#!/usr/bin/env python3
"""mailqueue's end-to-end benchmark (issue 6). Run through benches/e2e.sh, which installs the
tools and builds target/release/mailqueue first; this file only measures and writes the page.

Everything runs on loopback against real servers:
  - Postfix's smtp-sink (the fast peer; counters with -c, no dump files),
  - Postfix's smtp-source (the ceiling of one SMTP client connection against that sink),
  - a throwaway Postfix instance (its own config/queue dir under the temp dir) draining its own
    queue to the sink: the MTA for comparison,
  - tests/servers/smtp_server.py (aiosmtpd) where arrival times are needed (pacing, latency).

Knobs (environment): N ROUNDS MQ_BUDGET_S PF_N PF_BUDGET_S DIAG_BUDGET_S PACE_N PACE_MS LAT_N
IDLE_S SCALE_SMALL SCALE_BIG SCALE_N SKIP_POSTFIX DIAG KEEP_TMP OUT; see benches/e2e.sh.
Progress goes to stderr, one result line per measurement to stdout; the page to $OUT
(docs/BENCHMARKS.md) and the raw figures to target/bench/e2e-results.json.
"""

import datetime
import glob
import json
import math
import os
import random
import re
import select
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
BIN = os.path.join(ROOT, "target", "release", "mailqueue")
VENV_PY = os.path.join(ROOT, "target", "test-venv", "bin", "python")
SERVER = os.path.join(ROOT, "tests", "servers", "smtp_server.py")
RESULTS_JSON = os.path.join(ROOT, "target", "bench", "e2e-results.json")


def env_int(name, default):
    v = os.environ.get(name, "")
    return int(v) if v.strip() else default


def env_float(name, default):
    v = os.environ.get(name, "")
    return float(v) if v.strip() else default


N = env_int("N", 20000)
ROUNDS = env_int("ROUNDS", 3)
MQ_BUDGET_S = env_float("MQ_BUDGET_S", 15.0)
PF_N = env_int("PF_N", N)
PF_BUDGET_S = env_float("PF_BUDGET_S", 15.0)
DIAG_BUDGET_S = env_float("DIAG_BUDGET_S", 8.0)
PACE_N = env_int("PACE_N", 300)
PACE_MS = env_int("PACE_MS", 100)
LAT_N = env_int("LAT_N", 200)
IDLE_S = env_float("IDLE_S", 60.0)
SCALE_SMALL = env_int("SCALE_SMALL", 1000)
SCALE_BIG = env_int("SCALE_BIG", 1000000)
SCALE_N = env_int("SCALE_N", 2000)
SKIP_POSTFIX = os.environ.get("SKIP_POSTFIX", "") not in ("", "0")
DIAG = os.environ.get("DIAG", "") not in ("", "0")
KEEP_TMP = os.environ.get("KEEP_TMP", "") not in ("", "0")
OUT = os.environ.get("OUT") or os.path.join(ROOT, "docs", "BENCHMARKS.md")
COMMAND = os.environ.get("BENCH_COMMAND", "bash benches/e2e.sh")
SEED = 6

IS_ROOT = os.geteuid() == 0
CLK_TCK = os.sysconf("SC_CLK_TCK")
POLL = 0.02
T_START = time.monotonic()

# A ~1 KiB body: 14 lines of CRM-report text (1000 characters of body; with the headers the
# daemon adds, a mail is about 1.3 KB on the wire, measured below from the aiosmtpd spool).
BODY = ("Activity report: visited the customer, discussed the quote, next call on Friday.\n" * 13)[:999] + "\n"


def log(msg):
    el = time.monotonic() - T_START
    print(f"[{int(el) // 60:02d}:{el % 60:04.1f}] {msg}", file=sys.stderr, flush=True)


def result(msg):
    print(msg, flush=True)


def sbin(name):
    for d in os.environ.get("PATH", "").split(":") + ["/usr/sbin", "/usr/local/sbin", "/sbin"]:
        p = os.path.join(d, name)
        if d and os.path.isfile(p) and os.access(p, os.X_OK):
            return p
    sys.exit(f"{name} not found (benches/e2e.sh installs it)")


SMTP_SINK = sbin("smtp-sink")
SMTP_SOURCE = sbin("smtp-source")
TASKSET = sbin("taskset")


def pin_prefix(pin):
    return [TASKSET, "-c", "0"] if pin else []


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port):
    for f in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(f).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if len(cols) > 3 and cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                return True
    return False


def wait_for(what, timeout, f):
    deadline = time.monotonic() + timeout
    while True:
        v = f()
        if v:
            return v
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(POLL)


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def pctl(xs, p):
    """Nearest-rank percentile."""
    s = sorted(xs)
    return s[max(0, math.ceil(p / 100 * len(s)) - 1)] if s else float("nan")


def proc_cpu_s(pid):
    try:
        st = open(f"/proc/{pid}/stat").read()
    except OSError:
        return None
    f = st.rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / CLK_TCK  # utime, stime (fields 14, 15)


def proc_status_kb(pid, key):
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


# ---------------------------------------------------------------------------------------------
# Peers
# ---------------------------------------------------------------------------------------------

CHILDREN = []  # processes to kill on the way out
POSTFIXES = []  # Postfix instances to stop on the way out


class Sink:
    """smtp-sink on 127.0.0.1, with -c counters on stdout (no dump files: as fast as it goes)."""

    def __init__(self, tmp, name, pin, flags=()):
        self.name, self.pin = name, pin
        self.port = free_port()
        self.out = os.path.join(tmp, f"sink-{name}.out")
        cmd = pin_prefix(pin) + [SMTP_SINK] + (["-u", "nobody"] if IS_ROOT else []) + list(flags)
        cmd += ["-c", f"127.0.0.1:{self.port}", "256"]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=open(self.out, "wb"),
                                     stderr=subprocess.STDOUT)
        CHILDREN.append(self.proc)
        wait_for(f"smtp-sink {name} to listen", 20, lambda: listening(self.port) or self._dead())

    def _dead(self):
        if self.proc.poll() is not None:
            raise RuntimeError(f"smtp-sink exited: {open(self.out, 'rb').read()[-500:]!r}")

    def count(self):
        """Messages received so far (smtp-sink's `mesg=` counter, updated at each final ".")."""
        with open(self.out, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 200))
            m = re.findall(rb"mesg=(\d+)\r", f.read())
        return int(m[-1]) if m else 0

    def stop(self):
        self.proc.kill()
        self.proc.wait()


class PyServer:
    """tests/servers/smtp_server.py with a spool (mail_at / received_at per message)."""

    def __init__(self, tmp, name):
        self.spool = os.path.join(tmp, f"spool-{name}")
        self.err = os.path.join(tmp, f"pyserver-{name}.log")
        self.proc = subprocess.Popen(
            [VENV_PY, SERVER, "--port", "0", "--spool", self.spool],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=open(self.err, "wb"),
            env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"))
        CHILDREN.append(self.proc)
        r, _, _ = select.select([self.proc.stdout], [], [], 20)
        if not r:
            raise RuntimeError("smtp_server.py did not report its port in 20 s")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"smtp_server.py died: {open(self.err).read()}")
        self.port = json.loads(line)["port"]

    def count(self):
        return len(glob.glob(os.path.join(self.spool, "*.json")))

    def messages(self):
        out = []
        for p in glob.glob(os.path.join(self.spool, "*.json")):
            m = json.load(open(p))
            m["eml_bytes"] = os.path.getsize(p[:-5] + ".eml")
            out.append(m)
        return sorted(out, key=lambda m: m["mail_at"])

    def connections(self):
        try:
            return int(open(os.path.join(self.spool, "connections")).read().strip() or 0)
        except OSError:
            return 0

    def stop(self):
        self.proc.kill()
        self.proc.wait()


# ---------------------------------------------------------------------------------------------
# The daemon's side: configs and queue files
# ---------------------------------------------------------------------------------------------

def write_config(path, db, port, smtp_extra="", rate="interval_ms = 0", queue_extra=""):
    with open(path, "w") as f:
        f.write(f"""[queue]
database = {json.dumps(db)}
{queue_extra}

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
{smtp_extra}

[rate]
{rate}
""")
    return path


def migrate(cfg):
    subprocess.run([BIN, "--config", cfg, "migrate"], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.PIPE)


def crm_connect(db):
    """A connection as the CRM opens one (docs/queue-table.md)."""
    return sqlite3.connect(db, timeout=5.0, isolation_level=None)


def insert_queued(db, n, prefix="rcpt"):
    """n ~1 KiB mails in ONE transaction."""
    c = crm_connect(db)
    c.execute("BEGIN IMMEDIATE")
    c.executemany("INSERT INTO mail_queue (to_addrs, subject, body_text) VALUES (?, ?, ?)",
                  ((f"{prefix}{i}@example.net", f"Activity report {i}", BODY) for i in range(n)))
    c.execute("COMMIT")
    c.close()


def crm_synchronous(db):
    c = crm_connect(db)
    v = c.execute("PRAGMA synchronous").fetchone()[0]
    mode = c.execute("PRAGMA journal_mode").fetchone()[0]
    c.close()
    return {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}.get(v, str(v)), mode


def make_template(tmp, name, n):
    """A migrated queue file holding n queued mails (copied for every run)."""
    db = os.path.join(tmp, f"{name}.db")
    cfg = write_config(os.path.join(tmp, f"{name}-migrate.toml"), db, 25)
    migrate(cfg)
    insert_queued(db, n)
    assert not os.path.exists(db + "-wal") or os.path.getsize(db + "-wal") == 0
    return db


def fresh_copy(template, tmp, name):
    db = os.path.join(tmp, f"{name}.db")
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(db + suffix):
            os.unlink(db + suffix)
    shutil.copyfile(template, db)
    return db


def run_mq(cfg, sink, pin, expect, budget, log_path, env_extra=None):
    """`mailqueue run --once` against `sink` until `expect` mails arrived or `budget` seconds
    passed (then SIGTERM: the mail in flight finishes). Rate = mails the sink counted up to the
    last increment / time from spawning the process to that increment."""
    env = dict(os.environ, NO_COLOR="1", **(env_extra or {}))
    c0 = sink.count()
    t0 = time.monotonic()
    p = subprocess.Popen(pin_prefix(pin) + [BIN, "--config", cfg, "run", "--once"],
                         stdin=subprocess.DEVNULL, stdout=open(log_path, "wb"),
                         stderr=subprocess.STDOUT, env=env)
    CHILDREN.append(p)
    last_c, t_last, stopped, ru, status = c0, t0, False, None, None
    # CPU per mail in the steady state: process CPU (all threads, /proc/PID/stat, clock ticks)
    # between the first and the last mail the sink counted, so start-up is not in it.
    c_first = cpu_first = c_cpu = cpu_last = None
    # Peak RSS: VmHWM of the process, sampled at every poll (ru_maxrss is no good here: Linux
    # folds the RSS of the forking Python parent into it at exec).
    hwm = 0
    while True:
        time.sleep(POLL)
        now = time.monotonic()
        c = sink.count()
        hwm = max(hwm, proc_status_kb(p.pid, "VmHWM") or 0)
        if c != last_c:
            last_c, t_last = c, now
            cpu_now = proc_cpu_s(p.pid)
            if cpu_now is not None:
                if c_first is None:
                    c_first, cpu_first = c, cpu_now
                c_cpu, cpu_last = c, cpu_now
        pid, st, r = os.wait4(p.pid, os.WNOHANG)
        if pid:
            ru, status = r, st
            last_c = max(last_c, sink.count())
            if last_c != c:
                t_last = now
            break
        if c - c0 >= expect:
            continue  # all there: --once exits by itself once it sees nothing is due
        if now - t0 > budget and not stopped:
            os.kill(p.pid, signal.SIGTERM)
            stopped = True
            delivered_at_stop, t_at_stop = last_c - c0, t_last
        if now - t0 > budget + 60:
            os.kill(p.pid, signal.SIGKILL)
    p.returncode = os.waitstatus_to_exitcode(status)
    delivered = (delivered_at_stop if stopped else last_c - c0)
    secs = (t_at_stop if stopped else t_last) - t0
    if delivered == 0:
        raise RuntimeError(f"mailqueue delivered nothing; see {log_path}:\n"
                           + open(log_path, errors="replace").read()[-2000:])
    cpu = ru.ru_utime + ru.ru_stime
    steady = c_first is not None and c_cpu - c_first >= 20
    per_mail = (cpu_last - cpu_first) / (c_cpu - c_first) if steady else cpu / max(1, last_c - c0)
    return {"delivered": delivered, "secs": secs, "rate": delivered / secs,
            "cpu_s": cpu, "cpu_us_per_mail": per_mail * 1e6, "cpu_steady": steady,
            "maxrss_kb": hwm, "stopped_by_budget": stopped, "exit": p.returncode}


def run_source(sink, pin, n):
    """smtp-source -s 1 -d -m N -l 1024: one connection, N mails of 1024 payload bytes."""
    c0 = sink.count()
    cmd = pin_prefix(pin) + [SMTP_SOURCE, "-s", "1", "-d", "-m", str(n), "-l", "1024",
                             "-f", "crm@example.com", "-t", "rcpt@example.net",
                             f"127.0.0.1:{sink.port}"]
    t0 = time.monotonic()
    subprocess.run(cmd, check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    secs = time.monotonic() - t0
    got = wait_for("smtp-sink to count smtp-source's mails", 10,
                   lambda: (sink.count() - c0 >= n) and sink.count() - c0)
    return {"delivered": got, "secs": secs, "rate": got / secs, "cmd": " ".join(cmd[-12:])}


# ---------------------------------------------------------------------------------------------
# A throwaway Postfix
# ---------------------------------------------------------------------------------------------

POSTFIX_SERVICES = """\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class Postfix:
    """Postfix with its own config, queue and data directories under the temp dir; smtpd on a
    loopback port for injection, relayhost = the sink. Started as `postfix -c DIR start`."""

    CONCURRENCY = 1

    def __init__(self, tmp):
        self.postfix, self.postconf = sbin("postfix"), sbin("postconf")
        self.base = os.path.join(tmp, "postfix")
        self.etc = os.path.join(self.base, "etc")
        self.queue = os.path.join(self.base, "queue")
        self.data = os.path.join(self.base, "data")
        self.maillog = os.path.join(self.base, "maillog")
        self.snapshot = os.path.join(self.base, "snapshot-incoming")
        for d in (self.etc, self.queue, self.data):
            os.makedirs(d)
        os.chmod(tmp, 0o755)
        shutil.chown(self.data, "postfix")
        self.inj_port = free_port()
        with open(os.path.join(self.etc, "master.cf"), "w") as f:
            f.write(f"127.0.0.1:{self.inj_port} inet n - n - - smtpd\n" + POSTFIX_SERVICES)
        with open(os.path.join(self.etc, "main.cf"), "w") as f:
            f.write(f"""compatibility_level = 3.6
queue_directory = {self.queue}
data_directory = {self.data}
mail_owner = postfix
setgid_group = postdrop
myhostname = bench.example.test
mydomain = example.test
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject
smtp_tls_security_level = none
smtpd_tls_security_level = none
relayhost = [127.0.0.1]:25
default_destination_concurrency_limit = {self.CONCURRENCY}
enable_long_queue_ids = yes
in_flow_delay = 0
alias_maps =
alias_database =
local_recipient_maps =
biff = no
maillog_file_prefixes = {self.base}
maillog_file = {self.maillog}
master_service_disable =
""")
        self.version = subprocess.run([self.postconf, "-d", "-h", "mail_version"],
                                      capture_output=True, text=True).stdout.strip()
        POSTFIXES.append(self)

    def _postfix(self, *args, pin=False):
        # Postfix reports its own errors to maillog_file (below), not to stderr.
        r = subprocess.run(pin_prefix(pin) + [self.postfix, "-c", self.etc, *args],
                           capture_output=True, text=True)
        return r

    def set(self, *kv):
        subprocess.run([self.postconf, "-c", self.etc, "-e", *kv], check=True)

    def master_pid(self):
        try:
            pid = int(open(os.path.join(self.queue, "pid", "master.pid")).read().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if os.path.exists(f"/proc/{pid}") else None

    def start(self, pin, qmgr):
        self.set("master_service_disable =" if qmgr else "master_service_disable = qmgr.unix")
        r = self._postfix("start", pin=pin)
        if r.returncode != 0 or not self.master_pid():
            tail = open(self.maillog, errors="replace").read()[-2000:] if os.path.exists(self.maillog) else ""
            raise RuntimeError(f"postfix start failed: {r.stdout}{r.stderr}\n{tail}")

    def stop(self):
        if self.master_pid():
            self._postfix("stop")
            wait_for("postfix to stop", 30, lambda: self.master_pid() is None)

    def clear_queue(self):
        for q in ("incoming", "active", "deferred", "defer", "bounce", "trace", "hold", "maildrop"):
            d = os.path.join(self.queue, q)
            if os.path.isdir(d):
                for e in os.listdir(d):
                    p = os.path.join(d, e)
                    shutil.rmtree(p) if os.path.isdir(p) else os.unlink(p)

    def queued(self, q="incoming"):
        return sum(len(fs) for _, _, fs in os.walk(os.path.join(self.queue, q)))

    def inject(self, n):
        """n mails of 1024 payload bytes into the queue while the queue manager is disabled, then
        a copy of queue/incoming is kept: every drain starts from the same n queue files."""
        self.start(pin=False, qmgr=False)
        t0 = time.monotonic()
        subprocess.run([SMTP_SOURCE, "-s", "8", "-d", "-m", str(n), "-l", "1024",
                        "-f", "crm@example.com", "-t", "rcpt@example.net",
                        f"127.0.0.1:{self.inj_port}"], check=True, stdout=subprocess.DEVNULL)
        secs = time.monotonic() - t0
        self.stop()
        have = self.queued("incoming")
        if have != n:
            raise RuntimeError(f"postfix holds {have} queue files after injecting {n}")
        subprocess.run(["cp", "-a", os.path.join(self.queue, "incoming"), self.snapshot], check=True)
        return secs

    def drain(self, sink, pin, n, budget):
        """Restore the n queue files, start Postfix (queue manager enabled) and time how fast it
        delivers them to the sink; stopped after `budget` seconds."""
        self.stop()
        self.clear_queue()
        os.rmdir(os.path.join(self.queue, "incoming"))
        subprocess.run(["cp", "-a", self.snapshot, os.path.join(self.queue, "incoming")], check=True)
        self.set(f"relayhost = [127.0.0.1]:{sink.port}")
        log_off = os.path.getsize(self.maillog) if os.path.exists(self.maillog) else 0
        c0 = sink.count()
        self.start(pin=pin, qmgr=True)
        t0 = time.monotonic()  # the master runs; the queue manager starts with it
        last_c, t_last, t_first = c0, t0, None
        while True:
            time.sleep(POLL)
            now = time.monotonic()
            c = sink.count()
            if c != last_c:
                last_c, t_last = c, now
                t_first = t_first or now
            if c - c0 >= n or now - t0 > budget:
                break
        self.stop()
        delivered = last_c - c0
        text = open(self.maillog, errors="replace").read()[log_off:]
        sent = [l for l in text.splitlines() if "status=sent" in l]
        conns = sum(1 for l in sent if "conn_use=" not in l)
        return {"delivered": delivered, "secs": t_last - t0, "rate": delivered / (t_last - t0),
                "first_mail_after_s": (t_first - t0) if t_first else None,
                "connections": conns, "stopped_by_budget": c - c0 < n}


# ---------------------------------------------------------------------------------------------
# The measurements
# ---------------------------------------------------------------------------------------------

def throughput(tmp, sinks, nodelay_so, np_sinks):
    log(f"throughput: building a queue file with N={N} mails (one transaction)")
    t = time.monotonic()
    template = make_template(tmp, "tp-template", N)
    log(f"  done in {time.monotonic() - t:.1f}s")
    cfgs = {}
    # "b1": one connection with `commit_batch = 1`, every outcome committed before the next mail
    # (no crash window), beside the default batched drain.
    # "np": one connection to the sink without PIPELINING.
    for mode, per_conn, q in (("one", 1000000, ""), ("b1", 1000000, "commit_batch = 1"),
                              ("np", 1000000, ""), ("new", 1, "")):
        for pin in (False, True):
            db = os.path.join(tmp, f"tp-{mode}-{int(pin)}.db")
            sink = np_sinks[pin] if mode == "np" else sinks[pin]
            cfgs[(mode, pin)] = write_config(
                os.path.join(tmp, f"tp-{mode}-{int(pin)}.toml"), db, sink.port,
                smtp_extra=f"max_messages_per_connection = {per_conn}", queue_extra=q)
    pf = None
    if not SKIP_POSTFIX:
        try:
            pf = Postfix(tmp)
            log(f"postfix {pf.version}: injecting PF_N={PF_N} mails into its queue (queue manager disabled)")
            secs = pf.inject(PF_N)
            log(f"  injected in {secs:.1f}s")
        except Exception as e:  # noqa: BLE001 - reported in the page
            log(f"postfix: cannot set it up: {e}")
            pf = RuntimeError(str(e))
    runs = {k: {False: [], True: []} for k in ("mq_one", "mq_b1", "mq_np", "mq_new", "source", "postfix", "diag")}
    for rnd in range(1, ROUNDS + 1):
        for pin in (False, True):
            tag = "pinned to CPU 0" if pin else "unpinned"
            label = f"round {rnd}/{ROUNDS}, {tag}"
            for key, mode in (("mq_one", "one"), ("source", None), ("mq_b1", "b1"), ("mq_np", "np"),
                              ("mq_new", "new"), ("postfix", None), ("diag", "one")):
                if key == "source":
                    r = run_source(sinks[pin], pin, N)
                    what = f"smtp-source -s 1 -d -m {N} -l 1024"
                elif key == "postfix":
                    if not isinstance(pf, Postfix):
                        continue
                    r = pf.drain(sinks[pin], pin, PF_N, PF_BUDGET_S)
                    what = f"Postfix drain (concurrency {Postfix.CONCURRENCY}, {r['connections']} connection(s))"
                else:
                    if key == "diag" and not nodelay_so:
                        continue
                    fresh_copy(template, tmp, f"tp-{mode}-{int(pin)}")
                    budget = DIAG_BUDGET_S if key == "diag" else MQ_BUDGET_S
                    extra = {"LD_PRELOAD": nodelay_so} if key == "diag" else None
                    sink = np_sinks[pin] if key == "mq_np" else sinks[pin]
                    r = run_mq(cfgs[(mode, pin)], sink, pin, N, budget,
                               os.path.join(tmp, f"{key}-{rnd}-{int(pin)}.log"), extra)
                    what = {"mq_one": "mailqueue, one connection",
                            "mq_b1": "mailqueue, one connection, commit_batch = 1",
                            "mq_np": "mailqueue, one connection, sink without PIPELINING",
                            "mq_new": "mailqueue, new connection per mail",
                            "diag": "diagnostic: mailqueue one connection + TCP_NODELAY shim"}[key]
                runs[key][pin].append(r)
                extra_txt = ""
                if "cpu_us_per_mail" in r:
                    extra_txt = f", CPU {r['cpu_us_per_mail']:.0f} µs/mail, max RSS {r['maxrss_kb'] / 1024:.1f} MiB"
                result(f"throughput {label}: {what}: {r['delivered']} mails in {r['secs']:.2f}s = "
                       f"{r['rate']:.1f} mails/s{extra_txt}")
    if isinstance(pf, Postfix):
        pf.stop()
    pf_info = {"version": pf.version, "concurrency": Postfix.CONCURRENCY} if isinstance(pf, Postfix) \
        else {"error": str(pf) if pf else "skipped (SKIP_POSTFIX)"}
    return runs, pf_info


def pacing(tmp):
    log(f"pacing: {PACE_N} mails, interval_ms = {PACE_MS}, to smtp_server.py")
    srv = PyServer(tmp, "pacing")
    db = os.path.join(tmp, "pacing.db")
    cfg = write_config(os.path.join(tmp, "pacing.toml"), db, srv.port, rate=f"interval_ms = {PACE_MS}")
    migrate(cfg)
    insert_queued(db, PACE_N, prefix="pace")
    with open(os.path.join(tmp, "pacing.log"), "wb") as lf:
        subprocess.run([BIN, "--config", cfg, "run", "--once"], check=True, stdout=lf,
                       stderr=subprocess.STDOUT, timeout=PACE_N * PACE_MS / 1000 * 3 + 60)
    msgs = srv.messages()
    srv.stop()
    t = [m["mail_at"] for m in msgs]
    iv = PACE_MS / 1000
    gaps = [b - a for a, b in zip(t, t[1:])]
    j, most = 0, 0
    for i in range(len(t)):  # most MAIL FROMs inside any half-open window [t_i, t_i + interval)
        while t[j] < t[i] - iv + 1e-9:
            j += 1
        most = max(most, i - j + 1)
    j, most_tol = 0, 0
    for i in range(len(t)):  # the same with a window 1 ms shorter (timestamping jitter)
        while t[j] < t[i] - (iv - 0.001) + 1e-9:
            j += 1
        most_tol = max(most_tol, i - j + 1)
    mean = (t[-1] - t[0]) / (len(t) - 1)
    short = [{"gap_ms": g * 1000, "prev_gap_ms": gaps[k - 1] * 1000 if k else None,
              "new_connection": msgs[k + 1]["connection"] != msgs[k]["connection"]}
             for k, g in enumerate(gaps) if g < iv]
    # The daemon's own clock: mail_attempt.started_at is when the server answered MAIL FROM
    # (millisecond text).
    c = crm_connect(db)
    st = [datetime.datetime.strptime(x, "%Y-%m-%dT%H:%M:%S.%fZ").timestamp()
          for (x,) in c.execute("SELECT started_at FROM mail_attempt ORDER BY started_at")]
    c.close()
    dgaps = [b - a for a, b in zip(st, st[1:])]
    r = {"n": len(t), "interval_ms": PACE_MS, "max_in_interval": most, "max_in_interval_less_1ms": most_tol,
         "mean_gap_ms": mean * 1000, "mean_gap_err_pct": (mean / iv - 1) * 100,
         "min_gap_ms": min(gaps) * 1000, "p50_gap_ms": median(gaps) * 1000,
         "p99_gap_ms": pctl(gaps, 99) * 1000, "max_gap_ms": max(gaps) * 1000,
         "gaps_below_interval": len(short), "short_gaps": short,
         "connections": len({m["connection"] for m in msgs}),
         "daemon_min_gap_ms": min(dgaps) * 1000 if dgaps else None,
         "daemon_gaps_below_interval": sum(1 for g in dgaps if g < iv - 0.0015),
         "daemon_mean_gap_ms": (st[-1] - st[0]) / (len(st) - 1) * 1000 if len(st) > 1 else None,
         "mail_bytes_mean": statistics.mean(m["eml_bytes"] for m in msgs)}
    result(f"pacing: {r['n']} mails at interval {PACE_MS} ms: at most {most} MAIL FROM in any "
           f"{PACE_MS} ms window; mean gap {r['mean_gap_ms']:.2f} ms ({r['mean_gap_err_pct']:+.2f} %), "
           f"min {r['min_gap_ms']:.2f} ms, p99 {r['p99_gap_ms']:.2f} ms, max {r['max_gap_ms']:.2f} ms")
    return r


def latency(tmp):
    log(f"latency: idle `mailqueue run`, {LAT_N} single-row INSERTs with random 50-150 ms gaps")
    srv = PyServer(tmp, "latency")
    db = os.path.join(tmp, "latency.db")
    cfg = write_config(os.path.join(tmp, "latency.toml"), db, srv.port)
    migrate(cfg)
    lp = os.path.join(tmp, "latency-daemon.log")
    d = subprocess.Popen([BIN, "--config", cfg, "run"], stdin=subprocess.DEVNULL,
                         stdout=open(lp, "wb"), stderr=subprocess.STDOUT)
    CHILDREN.append(d)
    wait_for("the daemon to be ready", 20, lambda: b"Ready" in open(lp, "rb").read())
    time.sleep(1.0)
    rng = random.Random(SEED)
    c = crm_connect(db)
    committed = {}
    for i in range(LAT_N):
        time.sleep(rng.uniform(0.050, 0.150))
        c.execute("BEGIN IMMEDIATE")
        c.execute("INSERT INTO mail_queue (to_addrs, subject, body_text) VALUES (?, ?, ?)",
                  (f"lat{i}@example.net", f"Activity report {i}", BODY))
        c.execute("COMMIT")
        committed[f"lat{i}@example.net"] = time.time()
    c.close()
    wait_for("all latency mails at the server", 120, lambda: srv.count() >= LAT_N)
    d.send_signal(signal.SIGTERM)
    d.wait(timeout=30)
    msgs = srv.messages()
    conns = srv.connections()
    srv.stop()
    lat = [(m["received_at"] - committed[m["rcpt_tos"][0]]) * 1000 for m in msgs]
    pick = [(m["mail_at"] - committed[m["rcpt_tos"][0]]) * 1000 for m in msgs]
    r = {"n": len(lat), "p50_ms": median(lat), "p99_ms": pctl(lat, 99), "max_ms": max(lat),
         "min_ms": min(lat), "mean_ms": statistics.mean(lat),
         "to_mail_from_p50_ms": median(pick), "to_mail_from_p99_ms": pctl(pick, 99),
         "mail_from_to_accept_p50_ms": median([a - b for a, b in zip(lat, pick)]),
         "connections": conns}
    result(f"latency: {r['n']} mails, INSERT commit -> end of DATA accepted: p50 {r['p50_ms']:.1f} ms, "
           f"p99 {r['p99_ms']:.1f} ms, max {r['max_ms']:.1f} ms (commit -> MAIL FROM p50 "
           f"{r['to_mail_from_p50_ms']:.1f} ms; MAIL FROM -> accepted p50 {r['mail_from_to_accept_p50_ms']:.1f} ms)")
    return r


def idle(tmp, sink):
    log(f"idle: `mailqueue run` on an empty queue for {IDLE_S:.0f}s")
    db = os.path.join(tmp, "idle.db")
    cfg = write_config(os.path.join(tmp, "idle.toml"), db, sink.port, rate="")
    migrate(cfg)
    lp = os.path.join(tmp, "idle-daemon.log")
    d = subprocess.Popen([BIN, "--config", cfg, "run"], stdin=subprocess.DEVNULL,
                         stdout=open(lp, "wb"), stderr=subprocess.STDOUT)
    CHILDREN.append(d)
    wait_for("the daemon to be ready", 20, lambda: b"Ready" in open(lp, "rb").read())
    time.sleep(2.0)
    c0, w0 = proc_cpu_s(d.pid), time.monotonic()
    time.sleep(IDLE_S)
    c1, w1 = proc_cpu_s(d.pid), time.monotonic()
    hwm, rss = proc_status_kb(d.pid, "VmHWM"), proc_status_kb(d.pid, "VmRSS")
    threads = len(os.listdir(f"/proc/{d.pid}/task"))
    d.send_signal(signal.SIGTERM)
    d.wait(timeout=30)
    r = {"secs": w1 - w0, "cpu_s": c1 - c0, "cpu_pct": (c1 - c0) / (w1 - w0) * 100,
         "vmhwm_kb": hwm, "vmrss_kb": rss, "threads": threads, "tick_s": 1 / CLK_TCK}
    result(f"idle: {r['cpu_s']:.2f} s CPU in {r['secs']:.1f} s = {r['cpu_pct']:.3f} % of one core; "
           f"VmHWM {hwm / 1024:.1f} MiB, VmRSS {rss / 1024:.1f} MiB, {threads} threads")
    return r


def scale(tmp, sink, nodelay_so):
    out = {}
    dbs = {}
    for rows in (SCALE_SMALL, SCALE_BIG):
        log(f"scale: building a queue file with {rows} sent mails (+ their attempts and recipients)")
        t = time.monotonic()
        db = os.path.join(tmp, f"scale-{rows}.db")
        cfg = write_config(os.path.join(tmp, f"scale-{rows}.toml"), db, sink.port)
        migrate(cfg)
        c = crm_connect(db)
        # Bulk load only: no journal for this one big transaction (WAL is set back below).
        c.execute("PRAGMA journal_mode = OFF")
        c.execute("PRAGMA synchronous = OFF")
        c.execute("BEGIN IMMEDIATE")
        c.execute("""WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM c WHERE i < ?1)
            INSERT INTO mail_queue (to_addrs, subject, body_text, status, attempts, created_at,
                                    updated_at, next_attempt_at, sent_at, message_id, smtp_reply)
            SELECT printf('old%d@example.net', i), printf('Activity report %d', i), ?2, 'sent', 1,
                   ts, ts, ts, ts, printf('<%d.old@example.com>', i), '250 2.0.0 Ok'
            FROM (SELECT i, strftime('%Y-%m-%dT%H:%M:%fZ', 'now',
                                     printf('-%d seconds', 3600 + (?1 - i) * 2)) AS ts FROM c)""",
                  (rows, BODY))
        c.execute("""INSERT INTO mail_attempt (mail_id, started_at, finished_at, outcome, smtp_reply)
                     SELECT id, sent_at, sent_at, 'sent', smtp_reply FROM mail_queue""")
        c.execute("""INSERT INTO mail_recipient (mail_id, address, kind, status, smtp_reply, updated_at)
                     SELECT id, to_addrs, 'to', 'sent', smtp_reply, sent_at FROM mail_queue""")
        c.execute("COMMIT")
        c.execute("PRAGMA journal_mode = WAL")
        c.close()
        dbs[rows] = (db, cfg)
        log(f"  {os.path.getsize(db) / 2**20:.0f} MiB in {time.monotonic() - t:.1f}s")

    def top_up(db, rows, queued):
        c = crm_connect(db)
        c.execute("BEGIN IMMEDIATE")
        for t in ("mail_attempt", "mail_recipient"):
            c.execute(f"DELETE FROM {t} WHERE mail_id > ?", (rows,))
        c.execute("DELETE FROM mail_queue WHERE id > ?", (rows,))
        c.executemany("INSERT INTO mail_queue (to_addrs, subject, body_text) VALUES (?, ?, ?)",
                      ((f"scale{i}@example.net", f"Activity report {i}", BODY) for i in range(queued)))
        c.execute("COMMIT")
        c.close()

    # (case, sent rows, queued rows): the table size, and the queue depth beside it.
    cases = [("small", SCALE_SMALL, SCALE_N), ("big", SCALE_BIG, SCALE_N)]
    if N > SCALE_N:
        cases.append(("deep", SCALE_SMALL, N))
    variants = [("mq", None, MQ_BUDGET_S)]
    if nodelay_so:
        variants.append(("diag", {"LD_PRELOAD": nodelay_so}, DIAG_BUDGET_S * 2))
    for key, _, _ in variants:
        for case, _, _ in cases:
            out[(key, case)] = []
    plan = None
    for rnd in range(1, ROUNDS + 1):
        for key, env_extra, budget in variants:
            for case, rows, queued in cases:
                db, cfg = dbs[rows]
                top_up(db, rows, queued)
                if plan is None and case == "small":
                    plan = claim_plan(db)
                r = run_mq(cfg, sink, True, queued, budget,
                           os.path.join(tmp, f"scale-{key}-{case}-{rnd}.log"), env_extra)
                out[(key, case)].append(r)
                name = "mailqueue" if key == "mq" else "diagnostic (TCP_NODELAY shim)"
                result(f"scale round {rnd}/{ROUNDS}, pinned: {name}, {rows} sent rows + {queued} queued: "
                       f"{r['delivered']} mails in {r['secs']:.2f}s = {r['rate']:.1f} mails/s, "
                       f"CPU {r['cpu_us_per_mail']:.0f} µs/mail")
    return out, {rows: os.path.getsize(dbs[rows][0]) for rows in dbs}, cases, plan


def claim_plan(db):
    """EXPLAIN QUERY PLAN of the daemon's claim query, as src/store.rs writes it (run by this
    script's python sqlite3, whose SQLite may differ from the daemon's bundled one)."""
    try:
        src = open(os.path.join(ROOT, "src", "store.rs")).read()
        due = re.search(r'const DUE: &str = "(.*?)";', src, re.S).group(1)
        q = re.search(r'format!\(\s*"(SELECT id FROM mail_queue[^"]*\{DUE\}[^"]*ORDER BY[^"]*)"', src).group(1)
        sql = q.replace("{DUE}", due)
        c = sqlite3.connect(db)
        now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")
        rows = c.execute("EXPLAIN QUERY PLAN " + sql, (now,)).fetchall()
        c.close()
        return {"sql": " ".join(sql.split()), "shape": " ".join(q.replace("{DUE}", "<due>").split()),
                "plan": [r[-1] for r in rows],
                "sqlite": sqlite3.sqlite_version}
    except Exception as e:  # noqa: BLE001 - only a note on the page
        log(f"claim query plan: {e}")
        return None


def strace_probe(tmp, sink):
    """Where a mail's time goes on the wire: the daemon's sendto() calls on a short run."""
    strace = shutil.which("strace")
    if not strace:
        log("no strace: the sendto() probe is skipped")
        return None
    n = 6
    db = os.path.join(tmp, "strace.db")
    cfg = write_config(os.path.join(tmp, "strace.toml"), db, sink.port,
                       smtp_extra="max_messages_per_connection = 1000000")
    migrate(cfg)
    insert_queued(db, n, prefix="strace")
    out = os.path.join(tmp, "strace.txt")
    subprocess.run([strace, "-f", "-ttt", "-e", "trace=sendto", "-s", "16", "-o", out,
                    BIN, "--config", cfg, "run", "--once"], stdin=subprocess.DEVNULL,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
    calls = []
    for line in open(out, errors="replace"):
        m = re.match(r'\d+\s+([\d.]+) sendto\(\d+, "(.*?)"(?:\.\.\.)?, (\d+),', line)
        if m:
            calls.append((float(m.group(1)), m.group(2), int(m.group(3))))
    mails = sum(1 for _, s, _ in calls if s.startswith("MAIL FROM"))
    dots, waits, body = 0, [], []
    for i, (t, s, size) in enumerate(calls):
        if s == r"\r\n.\r\n" and size == 5:
            dots += 1
            if i > 0:
                body.append(calls[i - 1][2])
            if i + 1 < len(calls):
                waits.append((calls[i + 1][0] - t) * 1000)
    r = {"mails": mails, "separate_dots": dots, "dot_wait_ms": median(waits) if waits else None,
         "body_send_bytes": int(median(body)) if body else 0}
    result(f"strace: {mails} mails; final dot sent on its own in {dots}; next command "
           f"{r['dot_wait_ms']} ms after it (median)")
    return r


# ---------------------------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------------------------

def sh(*cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT).stdout.strip()
    except OSError:
        return ""


def machine():
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    mem = next((int(l.split()[1]) for l in open("/proc/meminfo") if l.startswith("MemTotal")), 0)
    osname = next((l.split("=", 1)[1].strip().strip('"') for l in open("/etc/os-release")
                   if l.startswith("PRETTY_NAME")), "?") if os.path.exists("/etc/os-release") else "?"
    return {"nproc": sh("nproc"), "cpu": cpu, "kernel": os.uname().release,
            "mem_gib": mem / 2**20, "os": osname, "rustc": sh("rustc", "-V")}


def daemon_synchronous():
    src = open(os.path.join(ROOT, "src", "store.rs")).read()
    m = re.search(r'pragma_update\(\s*None,\s*"synchronous",\s*"(\w+)"\s*\)', src)
    return m.group(1) if m else "not found in src/store.rs"


def fmt_rates(rs):
    return ", ".join(f"{r['rate']:.0f}" if r["rate"] >= 100 else f"{r['rate']:.1f}" for r in rs)


def fr(x):
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}"


def verdict(ok):
    return "**met**" if ok else "**not met**"


RUN_COLS = [("date", "date"), ("commit", "commit"), ("mq", "mailqueue pinned (mails/s)"),
            ("src", "smtp-source pinned"), ("pf", "Postfix pinned"), ("of_src", "÷ smtp-source"),
            ("x_pf", "× Postfix"), ("lat", "latency p50"), ("idle", "idle CPU"),
            ("table", "1k ÷ 1M rows")]


def runs_table(path, now):
    """The "Runs" section: this run first, then the rows of the page being replaced (for a page
    written before the section existed, the figures of that page's own run), so before and after
    stay on record."""
    out = ["## Runs, newest first", "",
           "Each run of this script adds a row (the medians of section 1, pinned; the daemon's last "
           "source change is in `git log` at that commit).", "",
           "| " + " | ".join(t for _, t in RUN_COLS) + " |", "|" + "---|" * len(RUN_COLS)]
    row = lambda d: "| " + " | ".join(f"`{d[k]}`" if k == "commit" else d.get(k, "?")  # noqa: E731
                                     for k, _ in RUN_COLS) + " |"
    try:
        old = open(path).read()
    except OSError:
        old = ""
    rows = []
    if "## Runs, newest first" in old:
        rows = [l for l in old.split("## Runs, newest first", 1)[1].splitlines() if l.startswith("| 20")]
    elif old:
        g = lambda pat: (re.search(pat, old, re.M) or [None, None])[1]  # noqa: E731
        d = {"date": g(r"^\| date \| (.+?) \|$"), "commit": g(r"^\| commit \| `(\w+)`"),
             "mq": g(r"at least ½ of `smtp-source -d` \| (\d+) vs"),
             "src": g(r"at least ½ of `smtp-source -d` \| \d+ vs (\d+) mails/s"),
             "pf": g(r"at least 5× Postfix draining its queue \| \d+ vs (\d+) mails/s"),
             "of_src": g(r"mails/s \(([\d.]+ %); median"), "x_pf": g(r"mails/s \(([\d.]+×)\) \|"),
             "lat": g(r"latency p50 < 100 ms .*? \| p50 ([\d.]+ ms),"),
             "idle": g(r"idle CPU < 0.1 % of one core \| ([\d.]+ %)"),
             "table": g(r"rows within 1.5× \| ([\d.]+×)")}
        if d["date"] and d["commit"]:
            rows = [row({k: v or "?" for k, v in d.items()})]
    return out + [row(now)] + rows + [""]


def write_page(info, tp, pf_info, pace, lat, idl, sc, sc_sizes, st, sc_cases, plan):
    L = []
    a = L.append
    m = info["machine"]
    a("# Benchmarks")
    a("")
    a("Written by `benches/e2e.sh` (end-to-end, on loopback, against real servers); do not edit by "
      "hand — run the script again. The per-function micro-benchmarks are the criterion benches in "
      "`benches/hot_paths.rs` (`cargo bench --bench hot_paths`).")
    a("")
    a("## This run")
    a("")
    a("| | |")
    a("|---|---|")
    a(f"| date | {info['date']} |")
    a(f"| commit | `{info['commit']}`{info['dirty']} |")
    a(f"| machine | {m['nproc']} CPUs ({m['cpu']}), {m['mem_gib']:.1f} GiB RAM, kernel {m['kernel']}, {m['os']} |")
    a(f"| build | `cargo build --release --locked` ({m['rustc']}); the binary was built "
      f"{info.get('built', '?')}; commit and changes as they were right after that command |")
    a(f"| command | `{info['command']}` |")
    a(f"| knobs | N={N} ROUNDS={ROUNDS} MQ_BUDGET_S={MQ_BUDGET_S:g} PF_N={PF_N} PF_BUDGET_S={PF_BUDGET_S:g} "
      f"DIAG={int(DIAG)} DIAG_BUDGET_S={DIAG_BUDGET_S:g} PACE_N={PACE_N} PACE_MS={PACE_MS} LAT_N={LAT_N} IDLE_S={IDLE_S:g} "
      f"SCALE_SMALL={SCALE_SMALL} SCALE_BIG={SCALE_BIG} SCALE_N={SCALE_N} |")
    a(f"| SQLite durability | the daemon sets `PRAGMA synchronous = {info['sync_daemon']}` on its connection, in "
      f"WAL mode (`src/store.rs`, `Store::open`; the setting is per connection, so it cannot be read "
      f"from outside the process). The queue file's journal mode as another connection sees it: "
      f"`{info['journal_mode']}`. The benchmark's own CRM-side connection (the INSERTs) runs with "
      f"SQLite's default for it, `synchronous = {info['sync_crm']}`. All queue files are on the "
      f"same local disk as `/tmp` (not tmpfs). |")
    a(f"| peers | Postfix {info['postfix_version']} `smtp-sink` (`-c`, no dump files), `smtp-source`, a "
      f"throwaway Postfix; `tests/servers/smtp_server.py` (aiosmtpd) for arrival times |")
    a(f"| mail size | body 1000 characters; {pace.get('mail_bytes_mean', 0):.0f} bytes on the wire "
      f"with mailqueue's headers; smtp-source: `-l 1024` payload bytes plus its own few headers |")
    a(f"| duration | {info['duration_min']:.1f} min for the measurements (build and setup not counted) |")
    a("")

    # --- targets -----------------------------------------------------------------------------
    sending_rss = max(r["maxrss_kb"] for k in ("mq_one", "mq_b1", "mq_np", "mq_new") for p in (False, True)
                      for r in tp.get(k, {}).get(p, [])) / 1024
    sc_ratio = median([r["rate"] for r in sc[("mq", "small")]]) / \
        median([r["rate"] for r in sc[("mq", "big")]])
    a("## Targets")
    a("")
    a("| target | measured | |")
    a("|---|---|---|")
    dmin = pace.get("daemon_min_gap_ms")
    a(f"| pacing: never more than burst = 1 mail in one interval | at the server: at most "
      f"{pace['max_in_interval']} MAIL FROM in any {PACE_MS} ms window ({pace['gaps_below_interval']} "
      f"of {pace['n'] - 1} gaps shorter than {PACE_MS} ms, the shortest {pace['min_gap_ms']:.2f} ms; "
      f"allowing 1 ms for timestamping: at most {pace['max_in_interval_less_1ms']})"
      + (f"; on the daemon's clock (`mail_attempt.started_at`): shortest gap {dmin:.0f} ms, "
         f"{pace['daemon_gaps_below_interval']} short" if dmin is not None else "")
      + f" | {verdict(pace['max_in_interval'] <= 1)} at the server"
      + (f"; {verdict(pace['daemon_gaps_below_interval'] == 0)} on the daemon's clock" if dmin is not None else "")
      + " |")
    a(f"| pacing: mean gap within 2 % of `interval_ms` | {pace['mean_gap_ms']:.2f} ms vs {PACE_MS} ms "
      f"({pace['mean_gap_err_pct']:+.2f} %) | {verdict(abs(pace['mean_gap_err_pct']) <= 2)} |")
    a(f"| latency p50 < 100 ms (INSERT commit → server accepted the mail) | p50 {lat['p50_ms']:.1f} ms, "
      f"p99 {lat['p99_ms']:.1f} ms | {verdict(lat['p50_ms'] < 100)} |")
    a(f"| idle CPU < 0.1 % of one core | {idl['cpu_pct']:.3f} % ({idl['cpu_s']:.2f} s in {idl['secs']:.0f} s) "
      f"| {verdict(idl['cpu_pct'] < 0.1)} |")
    a(f"| idle RSS < 20 MiB | peak (VmHWM) {idl['vmhwm_kb'] / 1024:.1f} MiB | {verdict(idl['vmhwm_kb'] / 1024 < 20)} |")
    a(f"| RSS while sending < 40 MiB | peak {sending_rss:.1f} MiB over all throughput runs | "
      f"{verdict(sending_rss < 40)} |")
    a(f"| table size: {SCALE_SMALL:,} vs {SCALE_BIG:,} rows within 1.5× | {sc_ratio:.2f}× (delivery rate, "
      f"median of {ROUNDS}) | {verdict(sc_ratio <= 1.5 and 1 / sc_ratio <= 1.5)} |")
    tmed = lambda key: median([r["rate"] for r in tp[key][True]]) if tp[key][True] else None  # noqa: E731
    t_mq, t_src, t_pf = tmed("mq_one"), tmed("source"), tmed("postfix")
    if t_mq and t_src:
        a(f"| throughput, pinned: at least ½ of `smtp-source -d` | {fr(t_mq)} vs {fr(t_src)} mails/s "
          f"({t_mq / t_src * 100:.1f} %; median of {ROUNDS}, section 1) | {verdict(t_mq >= t_src / 2)} |")
    if t_mq and t_pf:
        a(f"| throughput, pinned: at least 5× Postfix draining its queue | {fr(t_mq)} vs {fr(t_pf)} mails/s "
          f"({t_mq / t_pf:.2f}×) | {verdict(t_mq >= 5 * t_pf)} |")
    a("")

    # --- throughput --------------------------------------------------------------------------
    a("## 1. Throughput")
    a("")
    a(f"A queue file with N = {N} queued mails (inserted in one transaction), `interval_ms = 0`, "
      f"delivered by `mailqueue run --once` to `smtp-sink`. Each mailqueue run starts from a fresh "
      f"copy of that file and is stopped (SIGTERM) after {MQ_BUDGET_S:g} s if it has not finished "
      f"(`MQ_BUDGET_S`); the rate is the mails the sink counted divided by the time from starting "
      f"the process to the last one. Beside it, against the same sink in the same round, "
      f"`smtp-source -s 1 -d -m {N} -l 1024` (one session, `-d`: all messages over one connection; "
      f"flags as on this machine's smtp-source(1)): the ceiling of one SMTP client connection here. "
      f"Rounds interleave mailqueue, smtp-source, mailqueue, Postfix; medians of {ROUNDS} rounds; "
      f"all rounds listed. *Pinned*: sink and client both `taskset -c 0` (one CPU, no cross-CPU "
      f"wakeups); *unpinned*: the scheduler places them. The CPU column is the daemon's CPU time "
      f"(all threads) between the first and the last mail the sink counted, per mail; it grows "
      f"with the number of queued rows (section 5).")
    a("")
    a("| client | CPUs | mails/s (median) | rounds | ÷ smtp-source | mails per round | CPU µs/mail | connections |")
    a("|---|---|---|---|---|---|---|---|")
    names = [("mq_one", "mailqueue, one connection (`max_messages_per_connection = 1000000`; "
                        "default `commit_batch = 64`)"),
             ("mq_b1", "mailqueue, one connection, `commit_batch = 1` (every outcome committed before "
                       "the next mail)"),
             ("mq_np", "mailqueue, one connection, to `smtp-sink -p` (no PIPELINING offered: four "
                       "round trips per mail, like smtp-source)"),
             ("mq_new", "mailqueue, new connection per mail (`max_messages_per_connection = 1`)"),
             ("source", "smtp-source `-s 1 -d` (one connection)"),
             ("postfix", f"Postfix {pf_info.get('version', '')} draining its queue "
                         f"(`default_destination_concurrency_limit = {pf_info.get('concurrency', 1)}`)"),
             ("diag", "diagnostic: mailqueue one connection + `TCP_NODELAY` (LD_PRELOAD shim)")]
    for pin in (True, False):
        src_med = median([r["rate"] for r in tp["source"][pin]])
        for key, name in names:
            rs = tp.get(key, {}).get(pin, [])
            if not rs:
                continue
            med = median([r["rate"] for r in rs])
            per = "1" if key == "source" else f"{med / src_med:.4f}"
            ns = sorted(r["delivered"] for r in rs)
            n_txt = f"{ns[0]}" if ns[0] == ns[-1] else f"{ns[0]}–{ns[-1]}"
            cpu = f"{median([r['cpu_us_per_mail'] for r in rs]):.0f}" if "cpu_us_per_mail" in rs[0] else "–"
            conns = {"mq_one": "1", "mq_b1": "1", "mq_np": "1", "mq_new": "1 per mail", "source": "1", "diag": "1"}.get(key)
            if key == "postfix":
                conns = "/".join(sorted({str(r["connections"]) for r in rs}))
            a(f"| {name} | {'pinned' if pin else 'unpinned'} | **{fr(med)}** | {fmt_rates(rs)} | {per} | {n_txt} | {cpu} | {conns} |")
    a("")
    if "error" in pf_info:
        a(f"Postfix was not measured: {pf_info['error']}")
        a("")
    else:
        fm = [r["first_mail_after_s"] for p in (False, True) for r in tp["postfix"][p]
              if r["first_mail_after_s"] is not None] or [float("nan")]
        a(f"How Postfix is measured: a throwaway instance (`postfix -c DIR start`; its own `main.cf`, "
          f"`master.cf`, queue and data directories under the temp dir; smtpd on a loopback port, "
          f"`relayhost = [127.0.0.1]:SINKPORT`, `default_destination_concurrency_limit = "
          f"{pf_info['concurrency']}` so that, like mailqueue, it sends over one connection — the "
          f"default would be 20 — with `in_flow_delay = 0`, no chroot, TLS off). PF_N = {PF_N} "
          f"mails of 1024 payload bytes are injected once with smtp-source while the queue manager "
          f"is disabled (`master_service_disable = qmgr.unix`), and `queue/incoming` is copied; each "
          f"drain restores that copy, starts Postfix with the queue manager enabled (pinned: "
          f"`taskset -c 0 postfix start`, so every Postfix process is on CPU 0 with the sink) and "
          f"counts at the sink, from the moment `postfix start` returned (the first mail arrived "
          f"{min(fm):.2f}–{max(fm):.2f} s later) to the last mail, stopped after {PF_BUDGET_S:g} s "
          f"(`PF_BUDGET_S`). The connections column counts deliveries without `conn_use=` in "
          f"Postfix's log (each opens a connection).")
        a("")
    a("RSS while sending (peak VmHWM of the mailqueue process, sampled every 20 ms): "
      + ", ".join(f"{n} {max(r['maxrss_kb'] for p in (False, True) for r in tp[k][p]) / 1024:.1f} MiB"
                  for k, n in (("mq_one", "one connection"), ("mq_b1", "commit_batch = 1"),
                               ("mq_np", "no PIPELINING"), ("mq_new", "new connection per mail"))
                  if tp.get(k, {}).get(True)) + ".")
    a("")

    # --- pacing --------------------------------------------------------------------------------
    a("## 2. Pacing accuracy")
    a("")
    a(f"{pace['n']} queued mails, `interval_ms = {PACE_MS}` (burst 1), `mailqueue run --once` to "
      f"`tests/servers/smtp_server.py`; times are the server's: `mail_at` (when MAIL FROM arrived) "
      f"of each spooled mail.")
    a("")
    a("| figure | value | meaning |")
    a("|---|---|---|")
    a(f"| most mails in one interval | {pace['max_in_interval']} | the largest number of MAIL FROMs inside any half-open window of {PACE_MS} ms (sliding over every MAIL FROM) |")
    a(f"| mean gap | {pace['mean_gap_ms']:.2f} ms ({pace['mean_gap_err_pct']:+.2f} %) | (last − first MAIL FROM) / (n − 1), against the configured {PACE_MS} ms |")
    a(f"| gaps: min / median / p99 / max | {pace['min_gap_ms']:.2f} / {pace['p50_gap_ms']:.2f} / {pace['p99_gap_ms']:.2f} / {pace['max_gap_ms']:.2f} ms | between consecutive MAIL FROMs |")
    a(f"| gaps shorter than the interval | {pace['gaps_below_interval']} of {pace['n'] - 1} | |")
    a(f"| most mails in {PACE_MS - 1} ms | {pace['max_in_interval_less_1ms']} | the same with a window 1 ms shorter, allowing for the timestamping at the server (aiosmtpd's event loop) |")
    if pace.get("daemon_min_gap_ms") is not None:
        a(f"| the daemon's own clock: shortest gap, mean gap | {pace['daemon_min_gap_ms']:.0f} ms, "
          f"{pace['daemon_mean_gap_ms']:.2f} ms ({pace['daemon_gaps_below_interval']} of {pace['n'] - 1} "
          f"shorter than {PACE_MS} ms by more than the 1 ms resolution) | between the `started_at` "
          f"times of `mail_attempt`: when the server answered each MAIL FROM, the moment the pace "
          f"counts the next interval from (millisecond text, truncated) |")
    a("")
    if pace["short_gaps"]:
        a(f"The gaps shorter than {PACE_MS} ms at the server, each with the gap before it: "
          + ", ".join(f"{g['gap_ms']:.2f} after {g['prev_gap_ms']:.2f}" if g["prev_gap_ms"] is not None
                      else f"{g['gap_ms']:.2f}" for g in pace["short_gaps"][:12])
          + (" …" if len(pace["short_gaps"]) > 12 else "")
          + f" ms; {sum(1 for g in pace['short_gaps'] if g['new_connection'])} of them on a new "
          f"connection ({pace['connections']} connections in all: `max_messages_per_connection` "
          f"is 100). The pace holds each MAIL FROM until {PACE_MS} ms after the server answered "
          f"the previous one (`src/rate.rs`), and the server stamps `mail_at` before it answers, so "
          f"a short gap here means a MAIL FROM left earlier than that rule allows.")
    a("")

    # --- latency -------------------------------------------------------------------------------
    a("## 3. Latency")
    a("")
    a(f"An idle `mailqueue run` with the defaults (`poll_interval = 100ms`, "
      f"`max_messages_per_connection = 100`, ...) except `interval_ms = 0`, sending to "
      f"`smtp_server.py`. {lat['n']} mails are inserted one at a time, as a CRM would (one "
      f"`BEGIN IMMEDIATE; INSERT; COMMIT` each), with random gaps of 50–150 ms (seed {SEED}). "
      f"Latency = the server's `received_at` (its reply to the final \".\") − the moment COMMIT "
      f"returned in the inserting process (same clock).")
    a("")
    a("| figure | p50 | p99 | max | meaning |")
    a("|---|---|---|---|---|")
    a(f"| commit → accepted | **{lat['p50_ms']:.1f} ms** | {lat['p99_ms']:.1f} ms | {lat['max_ms']:.1f} ms | what the CRM's user waits for (min {lat['min_ms']:.1f} ms, mean {lat['mean_ms']:.1f} ms) |")
    a(f"| commit → MAIL FROM | {lat['to_mail_from_p50_ms']:.1f} ms | {lat['to_mail_from_p99_ms']:.1f} ms | | noticing the commit (an inotify event on the queue file's directory, `src/watch.rs`), reading the due rows under the write lock, claiming and building the row, and the commands before MAIL |")
    a(f"| MAIL FROM → accepted | {lat['mail_from_to_accept_p50_ms']:.1f} ms | | | the SMTP transaction itself |")
    a("")
    a(f"The server saw {lat['connections']} connection(s) for the {lat['n']} mails.")
    a("")

    # --- idle ----------------------------------------------------------------------------------
    a("## 4. Idle cost and memory")
    a("")
    a(f"`mailqueue run` with the default settings on an empty queue, measured over {idl['secs']:.0f} s "
      f"after it reported ready (+2 s): CPU = utime + stime from `/proc/PID/stat` (all threads; "
      f"resolution {idl['tick_s'] * 1000:.0f} ms), memory from `/proc/PID/status`.")
    a("")
    a("| figure | value |")
    a("|---|---|")
    a(f"| CPU | {idl['cpu_s']:.2f} s in {idl['secs']:.1f} s = **{idl['cpu_pct']:.3f} %** of one core |")
    a(f"| peak RSS (VmHWM) / RSS at the end (VmRSS) | **{idl['vmhwm_kb'] / 1024:.1f} MiB** / {idl['vmrss_kb'] / 1024:.1f} MiB |")
    a(f"| threads | {idl['threads']} |")
    a(f"| peak RSS while sending (throughput runs, VmHWM sampled every 20 ms) | **{sending_rss:.1f} MiB** |")
    a("")

    # --- scale ---------------------------------------------------------------------------------
    a("## 5. Table size (and queue depth)")
    a("")
    a(f"The cost of claim + outcome as the table grows: queue files holding {SCALE_SMALL:,} and "
      f"{SCALE_BIG:,} `sent` mails (each with its `mail_attempt` and `mail_recipient` row; bodies "
      f"as above; loaded with SQL in one transaction into a migrated file; "
      f"{sc_sizes[SCALE_SMALL] / 2**20:.0f} MiB and {sc_sizes[SCALE_BIG] / 2**20:.0f} MiB), plus "
      f"{SCALE_N} queued mails on top, delivered by `mailqueue run --once` over one connection to "
      f"`smtp-sink`, both pinned to CPU 0, stopped after {MQ_BUDGET_S:g} s"
      + (f" (the diagnostic after {DIAG_BUDGET_S * 2:g} s)" if ("diag", "small") in sc else "")
      + f"; the queued rows are renewed before every run; {ROUNDS} rounds, "
      f"alternating. Beside them, the queue depth: the small file with {N:,} queued mails instead "
      f"of {SCALE_N:,} (as in the throughput runs).")
    a("")
    a("| client | sent rows | queued rows | mails/s (median) | rounds | CPU µs/mail (median) |")
    a("|---|---|---|---|---|---|")
    for key, name in (("mq", "mailqueue"), ("diag", "diagnostic: + `TCP_NODELAY` shim")):
        for case, rows, queued in sc_cases:
            rs = sc.get((key, case))
            if rs:
                a(f"| {name} | {rows:,} | {queued:,} | **{fr(median([r['rate'] for r in rs]))}** | "
                  f"{fmt_rates(rs)} | {median([r['cpu_us_per_mail'] for r in rs]):.0f} |")
    a("")

    def scm(key, case, f="rate"):
        return median([r[f] for r in sc[(key, case)]])

    has_diag = ("diag", "small") in sc
    a("| ratio | mailqueue |" + (" diagnostic |" if has_diag else ""))
    a("|---|---|" + ("---|" if has_diag else ""))
    for label, c1, c2 in ((f"{SCALE_SMALL:,} ÷ {SCALE_BIG:,} sent rows (rate)", "small", "big"),
                          (f"{SCALE_N:,} ÷ {N:,} queued rows (rate)", "small", "deep")):
        if ("mq", c2) in sc:
            a(f"| {label} | {scm('mq', c1) / scm('mq', c2):.2f}× |"
              + (f" {scm('diag', c1) / scm('diag', c2):.2f}× |" if has_diag else ""))
    a("")
    if plan:
        a(f"The claim query as `src/store.rs` writes it (`{plan.get('shape', plan['sql'])}`), planned by "
          f"SQLite {plan['sqlite']} (this script's Python; the daemon bundles its own SQLite) on the "
          f"{SCALE_SMALL:,}-row "
          f"file: " + "; ".join(f"`{p}`" for p in plan["plan"]) + ".")
        a("")

    # --- what it means -------------------------------------------------------------------------
    a("## Observations")
    a("")
    med = lambda key, pin, f="rate": median([r[f] for r in tp[key][pin]])  # noqa: E731
    mq_p, mq_u = med("mq_one", True), med("mq_one", False)
    src_p, src_u = med("source", True), med("source", False)
    cpu_p = med("mq_one", True, "cpu_us_per_mail")
    a(f"- **mailqueue vs one SMTP connection.** With {N:,} mails queued, mailqueue delivers "
      f"{fr(mq_p)} mails/s over one connection pinned ({fr(mq_u)} unpinned): "
      f"{mq_p / src_p * 100:.2f} % of smtp-source's {fr(src_p)} mails/s against the same sink "
      f"({mq_u / src_u * 100:.2f} % unpinned); {1e6 / mq_p:.0f} µs per mail, of which "
      f"{cpu_p:.0f} µs is the daemon's CPU (all threads, steady state). A new connection per mail "
      f"(connect, greeting, EHLO, QUIT each time) brings it to {fr(med('mq_new', True))} mails/s "
      f"pinned ({med('mq_new', True) / mq_p * 100:.0f} %), {fr(med('mq_new', False))} unpinned."
      + (f" With {SCALE_N:,} queued instead (section 5) it delivers {fr(scm('mq', 'small'))} mails/s "
         f"pinned, {scm('mq', 'small') / src_p * 100:.1f} % of smtp-source, "
         f"{scm('mq', 'small', 'cpu_us_per_mail'):.0f} µs CPU per mail." if ("mq", "small") in sc else ""))
    if tp.get("mq_b1", {}).get(True):
        b1_p, b1_u = med("mq_b1", True), med("mq_b1", False)
        a(f"- **Batched commits.** Unpaced, the daemon claims rows and commits `sent` outcomes in "
          f"batches (`[queue] commit_batch`, default 64; two WAL commits per batch instead of two per "
          f"mail). With `commit_batch = 1`, every outcome committed before the next mail as a paced "
          f"queue always does, it delivers {fr(b1_p)} mails/s pinned ({fr(b1_u)} unpinned), "
          f"{mq_p / b1_p:.1f}× less than batched. The price of batching: a crash (power loss, "
          f"SIGKILL) can leave up to `commit_batch` rows `sending` — mails sent but not yet "
          f"recorded, and rows claimed but not yet sent — which the next start settles in doubt and "
          f"sends once more with the same Message-ID: duplicates, never a loss "
          f"(tests/batching.rs; docs/reliability.md).")
    if tp.get("mq_np", {}).get(True):
        np_p, np_u = med("mq_np", True), med("mq_np", False)
        a(f"- **PIPELINING.** smtp-source cannot pipeline (smtp-source(1), BUGS: \"No SMTP command "
          f"pipelining support\"): it makes four round trips per mail (MAIL, RCPT, DATA, the message). "
          f"mailqueue pipelines when the server offers it, as smtp-sink does: MAIL, RCPT and DATA in "
          f"one write, then the message with its final dot in one write — two round trips. Like for "
          f"like, against the same sink with PIPELINING off (`smtp-sink -p`), it delivers "
          f"{fr(np_p)} mails/s pinned ({np_p / src_p * 100:.1f} % of smtp-source), {fr(np_u)} "
          f"unpinned ({np_u / src_u * 100:.1f} %). Postfix's own SMTP client pipelines too.")
    try:
        nodelay_in_src = "set_nodelay(true)" in open(os.path.join(ROOT, "src", "net.rs")).read()
    except OSError:
        nodelay_in_src = False
    stall = bool(st and st["separate_dots"] and st.get("dot_wait_ms") and st["dot_wait_ms"] > 30)
    if st:
        waits = f"{st['dot_wait_ms']:.1f} ms (median)" if st.get("dot_wait_ms") is not None else "–"
        a(f"- **The wait after the message** (`strace -f -e trace=sendto` on a {st['mails']}-mail "
          f"run, part of this run): the final `\\r\\n.\\r\\n` left in a `sendto()` of its own for "
          f"{st['separate_dots']} of {st['mails']} mails, right after the message "
          f"({st['body_send_bytes']} bytes); the next command followed {waits} later."
          + (" With Nagle's algorithm on (the daemon does not set `TCP_NODELAY`) the kernel holds "
             "such a small second segment until the first is acknowledged, and the server, which "
             "has nothing to answer before the final dot, delays its ACK (Linux: 40 ms at least): "
             "a mail waits for that when the daemon has little else to do (a short queue). "
             "Against a server that delays ACKs this bounds a short queue to about 20 mails/s "
             "and adds about 40 ms to each mail's latency (section 3); with a provider's "
             "`interval_ms` of seconds it does not limit the rate." if stall else
             " No Nagle/delayed-ACK stall shows in this build"
             + (" (`src/net.rs` sets `TCP_NODELAY` on the SMTP socket)." if nodelay_in_src else ".")))
    if tp["diag"][True]:
        dg_p, dg_u = med("diag", True), med("diag", False)
        txt = (f"- **With `TCP_NODELAY` forced** (diagnostic rows, `DIAG=1`: the unchanged binary with an "
               f"`LD_PRELOAD` shim, `benches/e2e/nodelay.c`, that sets `TCP_NODELAY` before "
               f"`connect()`): {fr(dg_p)} mails/s pinned, {fr(dg_u)} unpinned with {N:,} queued "
               f"({med('diag', True, 'cpu_us_per_mail'):.0f} µs CPU per mail)")
        if has_diag:
            txt += (f"; {fr(scm('diag', 'small'))} mails/s with {SCALE_N:,} queued "
                    f"({scm('diag', 'small', 'cpu_us_per_mail'):.0f} µs CPU per mail)")
        a(txt + ".")
    if ("mq", "deep") in sc:
        depth = scm("mq", "small") / scm("mq", "deep")
        a(f"- **Queue depth**: CPU per mail {scm('mq', 'small', 'cpu_us_per_mail'):.0f} µs with "
          f"{SCALE_N:,} queued vs {scm('mq', 'deep', 'cpu_us_per_mail'):.0f} µs with {N:,} queued "
          f"(mailqueue, pinned); "
          + (f"the rate is the same within {abs(depth - 1) * 100:.0f} % "
             if abs(depth - 1) <= 0.1 else
             f"the rate {'falls' if depth > 1 else 'rises'} {max(depth, 1 / depth):.1f}× ")
          + f"from {SCALE_N:,} to {N:,} queued ({fr(scm('mq', 'small'))} → {fr(scm('mq', 'deep'))} mails/s)"
          + (". The claim's plan above shows why: it finds the queued rows through the index on "
             "`status`, looks each one up in the table (the other conditions, `next_attempt_at`, "
             "`send_after`, are not in that index) and sorts them all (`USE TEMP B-TREE FOR ORDER "
             "BY`) to take the first — work that grows with the queue, for every mail"
             + ("; the partial index `mail_queue_waiting`, which is in the wanted order, is not used"
                if not any("mail_queue_waiting" in p for p in plan["plan"]) else "")
             + "." if plan and any("TEMP B-TREE" in p for p in plan["plan"]) else
             ". The claim's plan above walks the partial index `mail_queue_waiting` in the wanted "
             "order and stops at the first due row." if plan and any("mail_queue_waiting" in p for p in plan["plan"])
             else "."))
    small_ok = abs(sc_ratio - 1) <= 0.1 and (not has_diag or abs(scm("diag", "small") / scm("diag", "big") - 1) <= 0.25)
    def spread(case):
        rs = [r["rate"] for r in sc[("mq", case)]]
        return f"{fr(min(rs))}–{fr(max(rs))}"

    a(f"- **Table size**: {SCALE_SMALL:,} ÷ {SCALE_BIG:,} `sent` rows: rate ratio {sc_ratio:.2f}× "
      f"(rounds {spread('small')} vs {spread('big')} mails/s: runs of {SCALE_N:,} mails last "
      f"about {SCALE_N / scm('mq', 'small'):.1f} s, so the rate ratio is noisy), CPU per mail "
      f"{scm('mq', 'small', 'cpu_us_per_mail'):.0f} vs {scm('mq', 'big', 'cpu_us_per_mail'):.0f} µs "
      f"({scm('mq', 'big', 'cpu_us_per_mail') / scm('mq', 'small', 'cpu_us_per_mail'):.2f}×)"
      + (f"; diagnostic rate ratio {scm('diag', 'small') / scm('diag', 'big'):.2f}×" if has_diag else "")
      + ((" — no measurable cost: the claim walks the partial index `mail_queue_waiting`, which "
          "holds only queued rows, so `sent` rows stay out of its way."
          if plan and any("mail_queue_waiting" in p for p in plan["plan"]) else
          " — no measurable cost.") if small_ok else "."))
    a(f"- **Pinned vs unpinned.** smtp-source {fr(src_p)} vs {fr(src_u)} mails/s, mailqueue "
      f"{fr(mq_p)} vs {fr(mq_u)}"
      + (f", the diagnostic {fr(med('diag', True))} vs {fr(med('diag', False))}" if tp["diag"][True] else "")
      + (f", Postfix {fr(med('postfix', True))} vs {fr(med('postfix', False))}" if tp["postfix"][True] else "")
      + " (pinned vs unpinned). Compare figures within one CPU setting only.")
    if tp["postfix"][True]:
        pf_p = med("postfix", True)
        a(f"- **Postfix** drains {fr(pf_p)} mails/s pinned over one connection (its connection cache "
          f"hands the connection from one `smtp` process to the next, each delivering up to 100), "
          f"with per-mail queue-file work; mailqueue delivers {mq_p / pf_p:.1f}× that.")
    a("- **Where the CPU goes** while draining a backlog: [PROFILE.md](PROFILE.md), written by "
      "`bash benches/profile.sh` (`perf record` of the same one-connection run, grouped by kind of work).")
    a(f"- **Latency** ({lat['p50_ms']:.1f} ms p50, {lat['p99_ms']:.1f} ms p99): an idle daemon is "
      f"woken by the CRM's commit itself (inotify on the queue file's directory; `poll_interval` "
      f"is only the fallback stat() poll where inotify is unavailable); commit → MAIL FROM is "
      f"{lat['to_mail_from_p50_ms']:.1f} ms p50 (the wakeup, the due-row read under the write "
      f"lock, the claim, building the mail), MAIL FROM → accepted {lat['mail_from_to_accept_p50_ms']:.0f} ms p50 (the SMTP "
      f"transaction" + ("; most of it the wait for the delayed ACK above" if stall else "") + ").")
    a(f"- **Idle**: the daemon sleeps until a commit to the queue file (inotify) or the next due "
      f"time; with an empty queue it asks the database only every 30 s (`FULL_CHECK_EVERY` in "
      f"`src/scheduler.rs`). {idl['cpu_s']:.2f} s of CPU in {idl['secs']:.0f} s = "
      f"{idl['cpu_pct']:.3f} % of a core (utime + stime count in {idl['tick_s'] * 1000:.0f} ms "
      f"ticks, so 0.00 s means less than one tick).")
    a("- Raw figures of every run: `target/bench/e2e-results.json` (not committed).")
    a("")
    L.extend(runs_table(OUT, {
        "date": info["date"], "commit": info["commit"] + ("+" if info["dirty"] else ""),
        "mq": fr(t_mq) if t_mq else "?", "src": fr(t_src) if t_src else "?",
        "pf": fr(t_pf) if t_pf else "?",
        "of_src": f"{t_mq / t_src * 100:.1f} %" if t_mq and t_src else "?",
        "x_pf": f"{t_mq / t_pf:.2f}×" if t_mq and t_pf else "?",
        "lat": f"{lat['p50_ms']:.1f} ms", "idle": f"{idl['cpu_pct']:.3f} %", "table": f"{sc_ratio:.2f}×",
    }))
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        f.write("\n".join(L))
    log(f"wrote {OUT}")


KNOBS = ("N", "ROUNDS", "MQ_BUDGET_S", "PF_N", "PF_BUDGET_S", "DIAG", "DIAG_BUDGET_S", "PACE_N",
         "PACE_MS", "LAT_N", "IDLE_S", "SCALE_SMALL", "SCALE_BIG", "SCALE_N")


def save_results(info, tp, pf_info, pace, lat, idl, sc, sc_sizes, st, sc_cases, plan):
    """Every figure of the run, and all the page needs (RENDER_ONLY=1 re-writes it from here)."""
    os.makedirs(os.path.dirname(RESULTS_JSON), exist_ok=True)
    with open(RESULTS_JSON, "w") as f:
        json.dump({"knobs": {k: globals()[k] for k in KNOBS}, "info": info,
                   "throughput": {k: {("pinned" if p else "unpinned"): v for p, v in d.items()}
                                  for k, d in tp.items()},
                   "postfix": pf_info, "pacing": pace, "latency": lat, "idle": idl,
                   "scale": {f"{k}/{case}": v for (k, case), v in sc.items()},
                   "scale_cases": sc_cases, "scale_file_bytes": sc_sizes, "strace": st,
                   "claim_plan": plan}, f, indent=1)


def render_only():
    """RENDER_ONLY=1: write the page again from target/bench/e2e-results.json (no measuring)."""
    d = json.load(open(RESULTS_JSON))
    globals().update(d["knobs"])
    tp = {k: {p == "pinned": v for p, v in x.items()} for k, x in d["throughput"].items()}
    sc = {tuple(k.split("/", 1)): v for k, v in d["scale"].items()}
    sizes = {int(k): v for k, v in d["scale_file_bytes"].items()}
    write_page(d["info"], tp, d["postfix"], d["pacing"], d["latency"], d["idle"], sc, sizes,
               d["strace"], [tuple(c) for c in d["scale_cases"]], d["claim_plan"])


def main():
    if os.environ.get("RENDER_ONLY", "") not in ("", "0"):
        return render_only()
    for p, what in ((BIN, "cargo build --release --locked"), (VENV_PY, "scripts/test-setup.sh")):
        if not os.path.exists(p):
            sys.exit(f"{p} missing: run {what} (benches/e2e.sh does)")
    tmp = tempfile.mkdtemp(prefix="mq-e2e-")
    os.chmod(tmp, 0o755)
    log(f"temp dir {tmp}; N={N} ROUNDS={ROUNDS}")
    nodelay_so = None
    if DIAG and shutil.which("cc"):
        so = os.path.join(tmp, "nodelay.so")
        r = subprocess.run(["cc", "-shared", "-fPIC", "-O2", "-o", so,
                            os.path.join(ROOT, "benches", "e2e", "nodelay.c"), "-ldl"],
                           capture_output=True, text=True)
        nodelay_so = so if r.returncode == 0 else None
        if not nodelay_so:
            log(f"no TCP_NODELAY diagnostic: cc failed: {r.stderr.strip()}")
    t_begin = time.monotonic()
    sinks = {}
    try:
        sinks = {False: Sink(tmp, "unpinned", False), True: Sink(tmp, "pinned", True)}
        # The same sink without PIPELINING (`-p`): mailqueue then makes the four round trips per
        # mail smtp-source makes (smtp-source cannot pipeline), a like-for-like comparison.
        np_sinks = {False: Sink(tmp, "unpinned-nopipe", False, ["-p"]),
                    True: Sink(tmp, "pinned-nopipe", True, ["-p"])}
        tp, pf_info = throughput(tmp, sinks, nodelay_so, np_sinks)
        pace = pacing(tmp)
        lat = latency(tmp)
        idl = idle(tmp, sinks[False])
        sc, sc_sizes, sc_cases, plan = scale(tmp, sinks[True], nodelay_so)
        st = strace_probe(tmp, sinks[False])
        sync_crm, jmode = crm_synchronous(os.path.join(tmp, "idle.db"))
        if "BENCH_GIT_COMMIT" in os.environ:  # taken by benches/e2e.sh right after the build
            commit, dirty = os.environ["BENCH_GIT_COMMIT"], os.environ.get("BENCH_GIT_DIRTY", "").split()
        else:
            commit = sh("git", "rev-parse", "--short", "HEAD")
            dirty = [l[3:] for l in sh("git", "status", "--porcelain", "--", "src", "Cargo.toml",
                                       "Cargo.lock", "build.rs").splitlines()]
        built = datetime.datetime.fromtimestamp(os.path.getmtime(BIN), datetime.timezone.utc)
        info = {
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "commit": commit,
            "dirty": (" plus uncommitted changes to " + ", ".join(f"`{f}`" for f in dirty)
                      + " (built as they were)") if dirty else "",
            "built": built.strftime("%Y-%m-%d %H:%M:%S UTC"),
            "machine": machine(), "command": COMMAND,
            "sync_daemon": daemon_synchronous(), "sync_crm": sync_crm, "journal_mode": jmode,
            "postfix_version": pf_info.get("version") or sh(sbin("postconf"), "-d", "-h", "mail_version"),
            "duration_min": (time.monotonic() - t_begin) / 60,
        }
        save_results(info, tp, pf_info, pace, lat, idl, sc, sc_sizes, st, sc_cases, plan)
        write_page(info, tp, pf_info, pace, lat, idl, sc, sc_sizes, st, sc_cases, plan)
    finally:
        for pf in POSTFIXES:
            try:
                pf.stop()
            except Exception as e:  # noqa: BLE001
                log(f"postfix stop: {e}")
        for p in CHILDREN:
            if p.returncode is None and p.poll() is None:
                p.kill()
        if KEEP_TMP:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

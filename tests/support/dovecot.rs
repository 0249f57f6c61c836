//! A real, throwaway Dovecot POP3 server for tests: `dovecot -F -c FILE` with a config under a
//! temp dir in /tmp, POP3 (plaintext + STLS) and POP3S listeners on 127.0.0.1, passwd-file users
//! with `{PLAIN}` passwords (so APOP works), a certificate from a [`TestCa`], and its own log.
//!
//! ```ignore
//! if !dovecot::dovecot_available("my_test") { return; } // SKIPPED message, or panic under CI
//! let dc = Dovecot::start(&[("alice", "Open sesame 1")]);
//! // ... log in to 127.0.0.1:dc.pop3_port (or dc.pop3s_port with dc.ca_pem_path) ...
//! dc.wait_for_log(&["Login: user=<alice>"]);
//! assert_eq!(dc.logins("alice"), 1);
//! ```
//!
//! The listeners are bound to 127.0.0.1, and any 127.x.y.z source address can reach them (Linux
//! routes all of 127/8 over loopback): a client bound to 127.0.0.2 is logged as `rip=127.0.0.2`.
//! Such a client is not "secured" to Dovecot (that needs rip == lip), which matters not, since
//! `disable_plaintext_auth = no`.
//!
//! Log lines (Dovecot 2.3, `log_timestamp = "%Y-%m-%d %H:%M:%S.%{usecs} "`, local time):
//! ```text
//! 2026-12-03 18:17:49.141380 pop3-login: Info: Login: user=<alice>, method=PLAIN, rip=127.0.0.2, lip=127.0.0.1, mpid=10704, session=<A37pxr5hTa5/AAAC>
//! 2026-12-03 18:17:49.151685 pop3(alice)<10704><A37pxr5hTa5/AAAC>: Info: Disconnected: Logged out top=0/0, retr=0/0, del=0/0, size=0
//! ```
//! A login from rip == lip adds `, secured` before `session=`, one over TLS `, TLS`.
//!
//! Prerequisites: `scripts/dovecot-test.sh` (dovecot-core, dovecot-pop3d) and root: Dovecot's
//! master switches to the `dovecot`, `dovenull` and `nobody` users.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::{free_port, read_lossy, TestCa, POLL};

/// How long Dovecot may take to start, or to write an expected log line.
pub const DOVECOT_WAIT: Duration = Duration::from_secs(15);

/// The `log_timestamp` of the test config (strftime plus Dovecot's `%{usecs}`, zero-padded to
/// six digits). tests/servers/smtp_server.py's `--pop-log` parses it (also without the fraction).
pub const LOG_TIMESTAMP: &str = "%Y-%m-%d %H:%M:%S.%{usecs} ";

// ---------------------------------------------------------------------------------------------
// Finding Dovecot, or skipping
// ---------------------------------------------------------------------------------------------

/// The dovecot binary, looked up in PATH and the sbin directories a non-root PATH may lack.
pub fn dovecot_bin() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/usr/local/sbin".into(), "/sbin".into()])
        .map(|d| d.join("dovecot"))
        .find(|p| p.is_file())
}

/// Whether we run under CI (`CI` set, and not empty, "0" or "false"), where a missing server is
/// a failure, not a skip.
pub fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && v != "false")
}

/// Whether `test` can run: true if Dovecot is installed. If it is not, prints
/// `SKIPPED <test>: ...` and returns false — or panics when [`under_ci`].
///
/// `if !dovecot_available("name_of_the_test") { return; }`
pub fn dovecot_available(test: &str) -> bool {
    if dovecot_bin().is_some() {
        return true;
    }
    assert!(
        !under_ci(),
        "dovecot is not installed but CI is set: run scripts/dovecot-test.sh"
    );
    eprintln!(
        "SKIPPED {test}: dovecot is not installed (run scripts/dovecot-test.sh; \
         with CI set this fails instead)"
    );
    false
}

/// Whether this process runs as root (Dovecot's master needs it to switch users).
fn is_root() -> bool {
    fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find(|l| l.starts_with("Uid:"))
            .and_then(|l| l.split_whitespace().nth(2))
            == Some("0")
    })
}

/// Whether a POP3 server on 127.0.0.1:`port` sends its `+OK` greeting (then QUIT, so Dovecot
/// logs the probe as `Disconnected: Aborted login by logging out` without a user).
fn greets(port: u16) -> bool {
    let Ok(mut tcp) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = tcp.set_read_timeout(Some(Duration::from_secs(2)));
    let mut line = String::new();
    let ok = BufReader::new(&tcp).read_line(&mut line).is_ok() && line.starts_with("+OK");
    if ok {
        let _ = tcp.write_all(b"QUIT\r\n");
        let _ = BufReader::new(&tcp).read_line(&mut line);
    }
    ok
}

// ---------------------------------------------------------------------------------------------
// The server
// ---------------------------------------------------------------------------------------------

/// A running Dovecot with POP3 (plaintext, STLS offered) and POP3S listeners on 127.0.0.1.
/// Stopped (SIGTERM, SIGKILL after 10 s) and its directory removed on drop.
pub struct Dovecot {
    /// Port of the plaintext listener (STLS offered).
    pub pop3_port: u16,
    /// Port of the implicit-TLS listener.
    pub pop3s_port: u16,
    /// Dovecot's log (`log_path`): start-up, logins, logouts, errors. See the module docs.
    pub log_path: PathBuf,
    /// The test CA that signed the server certificate (for `localhost` and `127.0.0.1`): give
    /// it to the client as `ca_file`.
    pub ca_pem_path: PathBuf,
    /// The certificates (`ca.ca_pem_path` is [`Dovecot::ca_pem_path`]).
    pub ca: TestCa,
    /// The temp dir with the config, users file, mail and run dirs.
    pub dir: PathBuf,
    /// The master process (`dovecot -F`).
    child: Child,
    tmp: TempDir,
}

impl Dovecot {
    /// Starts a Dovecot knowing `users` (name, password) and waits until both listeners accept
    /// connections; retries with other ports if one was taken meanwhile. Panics if Dovecot is
    /// not installed (check [`dovecot_available`] first), without root, or if it does not start.
    pub fn start(users: &[(&str, &str)]) -> Dovecot {
        let bin = dovecot_bin().expect("dovecot is not installed: run scripts/dovecot-test.sh");
        assert!(
            is_root(),
            "these tests start Dovecot, whose master must run as root (it switches to the \
             dovecot, dovenull and nobody users)"
        );
        for (user, password) in users {
            let bad = |s: &str| s.is_empty() || s.contains([':', '\n', '\r']);
            assert!(
                !bad(user) && !password.contains(['\n', '\r']) && !password.is_empty(),
                "unusable Dovecot user {user:?} / password"
            );
        }
        let mut last = String::new();
        for _ in 0..3 {
            match Dovecot::try_start(&bin, users) {
                Ok(d) => return d,
                Err(why) => last = why,
            }
        }
        panic!("dovecot did not start: {last}");
    }

    fn try_start(bin: &std::path::Path, users: &[(&str, &str)]) -> Result<Dovecot, String> {
        // Under /tmp, not $TMPDIR: Dovecot's unix sockets live in base_dir and socket paths are
        // limited to 108 bytes.
        let tmp = tempfile::Builder::new()
            .prefix("mq-dovecot-")
            .tempdir_in("/tmp")
            .unwrap();
        let d = tmp.path().to_path_buf();
        // Dovecot's unprivileged processes (auth as `dovecot`, mail as `nobody`) must reach the
        // files in here; tempfile makes the dir 0700.
        fs::set_permissions(&d, fs::Permissions::from_mode(0o755)).unwrap();
        let mail = d.join("mail");
        fs::create_dir(&mail).unwrap();
        // The mail processes run as nobody and create each user's Maildir here. Without write
        // access PASS still answers "+OK Logged in." and the session then dies with
        // "-ERR [SYS/TEMP] Internal error occurred." (seen with 2.3.19).
        fs::set_permissions(&mail, fs::Permissions::from_mode(0o777)).unwrap();

        // The certificate and key are read by Dovecot's config process (root), so the CA's own
        // 0700 temp dir is fine.
        let ca = TestCa::new();
        // {PLAIN}: APOP needs the password itself, not a hash of it.
        let passwd: String = users
            .iter()
            .map(|(u, p)| format!("{u}:{{PLAIN}}{p}\n"))
            .collect();
        fs::write(d.join("users"), passwd).unwrap();

        let (pop3, pop3s) = (free_port(), free_port());
        let log_path = d.join("dovecot.log");
        let conf = d.join("dovecot.conf");
        let dd = d.display();
        let (cert, key) = (ca.cert_path.display(), ca.key_path.display());
        fs::write(
            &conf,
            format!(
                r#"# Throwaway config for mailqueue's tests (tests/support/dovecot.rs).
base_dir = {dd}/run
state_dir = {dd}/state
log_path = {dd}/dovecot.log
# Local time with microseconds; tests/servers/smtp_server.py --pop-log parses it.
log_timestamp = "{LOG_TIMESTAMP}"
protocols = pop3
# The listeners below bind 127.0.0.1; clients may connect from any 127.x address.
listen = 127.0.0.1
ssl = yes
ssl_cert = <{cert}
ssl_key = <{key}
# Loopback from 127.0.0.1 counts as secure for Dovecot anyway, but 127.0.0.2 -> 127.0.0.1 does
# not: plaintext logins are allowed from every source.
disable_plaintext_auth = no
auth_mechanisms = plain apop
# The users the Debian package creates; the master runs as root and switches to them.
default_internal_user = dovecot
default_login_user = dovenull
mail_location = maildir:{dd}/mail/%u
passdb {{
  driver = passwd-file
  args = {dd}/users
}}
userdb {{
  driver = static
  args = uid=nobody gid=nogroup home={dd}/mail/%u
}}
service pop3-login {{
  inet_listener pop3 {{
    address = 127.0.0.1
    port = {pop3}
  }}
  inet_listener pop3s {{
    address = 127.0.0.1
    port = {pop3s}
    ssl = yes
  }}
}}
"#
            ),
        )
        .unwrap();

        let stderr_path = d.join("stderr");
        let stderr = fs::File::create(&stderr_path).unwrap();
        let mut child = Command::new(bin)
            .arg("-F")
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(stderr.try_clone().unwrap())
            .stderr(stderr)
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", bin.display()))?;

        let deadline = Instant::now() + DOVECOT_WAIT;
        // Ready means the plaintext listener greets: pop3-login holds the greeting back until
        // the auth process is up (a Dovecot stopped before that takes seconds to shut down).
        // The POP3S listener belongs to the same login service: accepting is enough there.
        let ready = || greets(pop3) && TcpStream::connect(("127.0.0.1", pop3s)).is_ok();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return Err(format!(
                    "dovecot exited with {status}\n--- stderr ---\n{}\n--- log ---\n{}",
                    read_lossy(&stderr_path),
                    read_lossy(&log_path)
                ));
            }
            if ready() {
                break;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "dovecot not listening on {pop3}/{pop3s} after {DOVECOT_WAIT:?}\n--- log ---\n{}",
                    read_lossy(&log_path)
                ));
            }
            thread::sleep(POLL);
        }
        Ok(Dovecot {
            pop3_port: pop3,
            pop3s_port: pop3s,
            log_path,
            ca_pem_path: ca.ca_pem_path.clone(),
            ca,
            dir: d,
            child,
            tmp,
        })
    }

    /// The log so far (for assertion messages too).
    pub fn log(&self) -> String {
        read_lossy(&self.log_path)
    }

    /// The log's lines so far.
    pub fn log_lines(&self) -> Vec<String> {
        self.log().lines().map(str::to_owned).collect()
    }

    /// Waits (up to [`DOVECOT_WAIT`]) until the log has a line containing all of `parts`, and
    /// returns it; panics with the log otherwise. Dovecot writes a session's lines a little
    /// after the client got its reply: wait before counting.
    pub fn wait_for_log(&self, parts: &[&str]) -> String {
        let deadline = Instant::now() + DOVECOT_WAIT;
        loop {
            if let Some(l) = self
                .log_lines()
                .into_iter()
                .find(|l| parts.iter().all(|p| l.contains(p)))
            {
                return l;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {DOVECOT_WAIT:?} waiting for a Dovecot log line with {parts:?} \
                 in {}\n--- log ---\n{}",
                self.log_path.display(),
                self.log()
            );
            thread::sleep(POLL);
        }
    }

    /// Waits until the log has at least `n` lines containing all of `parts`; returns them all.
    pub fn wait_for_log_count(&self, n: usize, parts: &[&str]) -> Vec<String> {
        let deadline = Instant::now() + DOVECOT_WAIT;
        loop {
            let found: Vec<String> = self
                .log_lines()
                .into_iter()
                .filter(|l| parts.iter().all(|p| l.contains(p)))
                .collect();
            if found.len() >= n {
                return found;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {DOVECOT_WAIT:?} waiting for {n} Dovecot log lines with \
                 {parts:?} (have {})\n--- log ---\n{}",
                found.len(),
                self.log()
            );
            thread::sleep(POLL);
        }
    }

    /// The successful POP3 login lines of `user` so far (`pop3-login: Info: Login: user=<U>, ...`).
    pub fn login_lines(&self, user: &str) -> Vec<String> {
        let marker = format!("pop3-login: Info: Login: user=<{user}>,");
        self.log_lines()
            .into_iter()
            .filter(|l| l.contains(&marker))
            .collect()
    }

    /// Number of successful POP3 logins of `user` in the log so far.
    pub fn logins(&self, user: &str) -> usize {
        self.login_lines(user).len()
    }

    /// The `rip=` (client address as Dovecot saw it) of each successful login of `user`, in
    /// log order: `["127.0.0.1", "127.0.0.2"]`.
    pub fn login_rips(&self, user: &str) -> Vec<String> {
        self.login_lines(user)
            .iter()
            .filter_map(|l| {
                let rest = &l[l.find(", rip=")? + ", rip=".len()..];
                Some(rest.split(',').next()?.trim().to_owned())
            })
            .collect()
    }

    /// Sessions of `user` that logged in and ended with QUIT: the mail process's
    /// `pop3(U)<pid><session>: Info: Disconnected: Logged out ...` lines.
    pub fn clean_quits(&self, user: &str) -> usize {
        let who = format!("pop3({user})<");
        self.count_lines(&who, "Disconnected: Logged out")
    }

    /// Sessions of `user` whose login was refused and that then ended with QUIT: the login
    /// process's `Disconnected: Aborted login by logging out (auth failed, ...): user=<U>, ...`.
    pub fn refused_quits(&self, user: &str) -> usize {
        let who = format!("user=<{user}>");
        self.count_lines(&who, "Disconnected: Aborted login by logging out")
    }

    /// Sessions of `user` that ended by the client hanging up without QUIT (after a login, or
    /// after a refused one): `Disconnected: Connection closed`.
    pub fn hang_ups(&self, user: &str) -> usize {
        let (mail, login) = (format!("pop3({user})<"), format!("user=<{user}>"));
        self.log_lines()
            .iter()
            .filter(|l| {
                (l.contains(&mail) || l.contains(&login)) && l.contains("Connection closed")
            })
            .count()
    }

    fn count_lines(&self, who: &str, what: &str) -> usize {
        self.log_lines()
            .iter()
            .filter(|l| l.contains(who) && l.contains(what))
            .count()
    }

    /// Asserts from the log that `user` logged in exactly `logins` times and was refused exactly
    /// `refused` times, and that every one of those sessions ended with QUIT (none hung up), and
    /// that Dovecot logged no `Error:`/`Fatal:`. Waits first for the logout lines, which Dovecot
    /// writes after the client already has its reply.
    pub fn assert_every_session_quit(&self, user: &str, logins: usize, refused: usize) {
        let waited = Instant::now() + DOVECOT_WAIT;
        while Instant::now() < waited
            && (self.clean_quits(user) < logins || self.refused_quits(user) < refused)
        {
            thread::sleep(POLL);
        }
        let log = self.log();
        assert_eq!(self.logins(user), logins, "logins of {user}\n{log}");
        assert_eq!(self.clean_quits(user), logins, "QUITs after login\n{log}");
        assert_eq!(
            self.refused_quits(user),
            refused,
            "QUITs after refusal\n{log}"
        );
        assert_eq!(self.hang_ups(user), 0, "sessions without QUIT\n{log}");
        let errors: Vec<String> = self
            .log_lines()
            .into_iter()
            .filter(|l| l.contains(": Error: ") || l.contains(": Fatal: "))
            .collect();
        assert!(errors.is_empty(), "Dovecot logged errors: {errors:#?}");
    }
}

impl Drop for Dovecot {
    fn drop(&mut self) {
        // SIGTERM lets the master stop its children; SIGKILL only if it does not exit in time.
        // (Dovecot 2.3's master takes about 2-3 s to stop: it waits for its log process.)
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            thread::sleep(POLL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        eprintln!("dovecot in {} needed SIGKILL", self.tmp.path().display());
    }
}

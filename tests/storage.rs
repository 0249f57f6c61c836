//! Storage trouble (issue 5.6): a full disk makes the daemon back off with a clear log line, mark nothing sent that was not, and recover when the disk is fine again;
//! a CRM writing 50 rows a second while another connection holds a long read sees no
//! "database is locked", and neither does the daemon. Rows left `sending` by another process
//! that dies while the daemon runs (a killed `test-send`) are recovered by the daemon's
//! housekeeping, and rows of a live process are not.

mod support;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::*;

const LONG: Duration = Duration::from_secs(40);

// A read-only queue file is staged with file modes: the daemon runs as `nobody` (these tests run
// as root, and root ignores modes) in a directory it may write (its lock files live next to the
// queue), while the queue file is root's, 0644. SQLite then opens it read-only and every write
// fails with "attempt to write a readonly database". Remounting read-only is no way to stage
// it: the kernel refuses while the daemon holds the file open for writing. Nor can a file
// become read-only under a running daemon: modes are checked when a file is opened, and the
// daemon keeps its connection open, so a chmod or chown changes nothing until it opens the file
// again (which it does after storage trouble). `a_file_made_read_only_while_running_…` checks that.

/// A small tmpfs of our own (these tests run as root), unmounted on drop.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn new(size: &str) -> SmallDisk {
        let dir = tempfile::tempdir().unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(st.success(), "mount tmpfs (the storage tests need root)");
        SmallDisk { dir }
    }
    fn path(&self) -> &Path {
        self.dir.path()
    }
    /// Fills the disk with a file until a write fails; returns the file.
    fn fill(&self) -> PathBuf {
        let p = self.path().join("filler");
        let mut f = std::fs::File::create(&p).unwrap();
        let chunk = vec![0u8; 4096];
        while f.write_all(&chunk).is_ok() {}
        let _ = f.sync_all();
        p
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

fn setup(disk: &SmallDisk, port: u16) -> (PathBuf, PathBuf) {
    let db = disk.path().join("queue.db");
    // The config lives off the small disk, so only the queue suffers.
    let cfg_dir = tempfile::tempdir().unwrap().keep();
    let cfg = write_config(&cfg_dir, &base_config(&db, port));
    migrate(&cfg);
    (db, cfg)
}

fn wait_for_stderr(d: &Daemon, needle: &str) {
    wait_until(LONG, needle, || d.stderr().contains(needle).then_some(()));
}

#[test]
fn a_full_disk_backs_off_and_recovers_without_marking_anything_sent() {
    let disk = SmallDisk::new("3m");
    let sink = SmtpSink::start(NO_ARGS);
    let (db_path, cfg) = setup(&disk, sink.port);
    let db = Db::open(&db_path);
    let ids: Vec<i64> = (0..5)
        .map(|i| db.insert("a@example.com", &format!("m{i}"), "x"))
        .collect();
    let filler = disk.fill();
    let mut d = Daemon::spawn(&cfg, &["run"]);
    wait_for_stderr(&d, "database or disk is full");
    assert!(d.stderr().contains("trying again"), "{}", d.stderr());
    let sent: i64 = db.query_one("SELECT count(*) FROM mail_queue WHERE status = 'sent'");
    assert_eq!(
        sent as usize,
        sink.messages().len(),
        "no row marked sent that the server did not get"
    );
    std::fs::remove_file(filler).unwrap();
    for id in &ids {
        db.wait_for_status(*id, "sent", LONG);
    }
    assert_eq!(sink.wait_for_messages(5, LONG).len(), 5, "each mail once");
    assert!(d.terminate(LONG).success());
}

#[test]
fn a_busy_crm_and_a_long_reader_see_no_database_is_locked() {
    let sink = SmtpSink::start(NO_ARGS);
    let dir = tempfile::tempdir().unwrap();
    let db_path = dir.path().join("queue.db");
    let cfg = write_config(dir.path(), &base_config(&db_path, sink.port));
    migrate(&cfg);
    let mut d = Daemon::spawn(&cfg, &["run"]);
    // One connection holds a read transaction open for 4 s (a CRM report), another inserts
    // 50 rows a second for 4 s with the documented settings.
    let script = r#"
import sqlite3, sys, threading, time
path = sys.argv[1]
errors = []
def reader():
    c = sqlite3.connect(path, timeout=5.0, isolation_level=None)
    c.execute("BEGIN")
    c.execute("SELECT count(*) FROM mail_queue").fetchone()
    time.sleep(4)
    c.execute("COMMIT")
t = threading.Thread(target=reader); t.start()
w = sqlite3.connect(path, timeout=5.0, isolation_level=None)
start = time.time()
for i in range(200):
    try:
        w.execute("BEGIN IMMEDIATE")
        w.execute("INSERT INTO mail_queue (to_addrs, subject, body_text) VALUES ('crm@example.com', ?, 'x')", ("r%d" % i,))
        w.execute("COMMIT")
    except sqlite3.OperationalError as e:
        errors.append(str(e))
    time.sleep(max(0, start + (i + 1) / 50 - time.time()))
t.join()
print("errors", len(errors), errors[:3])
"#;
    let started = Instant::now();
    let out = Command::new(python())
        .arg("-c")
        .arg(script)
        .arg(&db_path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("errors 0"),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(started.elapsed() >= Duration::from_secs(4));
    let db = Db::open(&db_path);
    wait_until(LONG, "all 200 sent", || {
        (db.query_one::<i64>("SELECT count(*) FROM mail_queue WHERE status = 'sent'") == 200)
            .then_some(())
    });
    assert!(d.terminate(LONG).success());
    assert!(!d.stderr().contains("locked"), "{}", d.stderr());
}

// ---------------------------------------------------------------------------------------------
// Rows left `sending` by another process while the daemon runs
// ---------------------------------------------------------------------------------------------

/// A migrated queue whose daemon runs housekeeping every 100 ms and logs at debug level.
fn housekeeping_setup(dir: &Path, port: u16, on_doubt: &str) -> (PathBuf, PathBuf) {
    let db_path = dir.join("queue.db");
    let text = base_config(&db_path, port)
        .replace(
            "[queue]\n",
            &format!("[queue]\nhousekeeping_interval = \"100ms\"\non_doubt = \"{on_doubt}\"\n"),
        )
        .replace("level = \"info\"", "level = \"debug\"");
    let cfg = write_config(dir, &text);
    migrate(&cfg);
    (db_path, cfg)
}

/// The test mail's row (`test-send` inserts it already claimed, with `max_attempts` 1).
fn test_mail_id(db: &Db) -> Option<i64> {
    db.rows("SELECT id FROM mail_queue WHERE max_attempts = 1")
        .first()
        .and_then(|r| r["id"].as_i64())
}

/// The housekeeping rounds that found a row claimed by a live process.
fn rounds_with_a_live_claimer(d: &Daemon) -> usize {
    d.stderr()
        .lines()
        .filter(|l| {
            l.contains("Checked the rows other processes are sending") && l.contains("live=1")
        })
        .count()
}

/// `test-send` is aborted (failpoint `crash-after-reply`: after the server accepted the mail,
/// before the outcome is written) while the daemon runs. Its row used to stay `sending` until
/// the daemon restarted; now the daemon's housekeeping finds that the claimer's lock is free
/// and settles the row as start-up recovery does: the attempt `in_doubt`, the row queued again,
/// and the daemon sends it once more with the same Message-ID.
#[test]
fn a_row_left_sending_by_a_killed_test_send_is_recovered_while_the_daemon_runs() {
    let sink = SmtpSink::start(NO_ARGS);
    let dir = tempfile::tempdir().unwrap();
    let (db_path, cfg) = housekeeping_setup(dir.path(), sink.port, "resend");
    let db = Db::open(&db_path);
    let d = Daemon::spawn(&cfg, &["run"]);
    wait_for_stderr(&d, "Ready");

    let out = Command::new(mailqueue_bin())
        .arg("--config")
        .arg(&cfg)
        .args(["test-send", "--to", "admin@example.org"])
        .env("MAILQUEUE_FAILPOINT", "crash-after-reply")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("failpoint crash-after-reply"),
        "test-send should have been aborted at the failpoint: {}\n{stderr}",
        out.status
    );
    assert_eq!(
        sink.wait_for_messages(1, LONG).len(),
        1,
        "the server got it"
    );
    let id = test_mail_id(&db).expect("the test mail's row");
    let claimed_by: Option<String> = db
        .rows_with("SELECT claimed_by FROM mail_queue WHERE id = ?1", [id])[0]["claimed_by"]
        .as_str()
        .map(str::to_string);
    let claimed_by = claimed_by.expect("the claim names its process");

    // Await the daemon's housekeeping (every 100 ms), not a fixed time. With the default
    // `on_doubt = "resend"` the daemon then sends it once more, with the same Message-ID.
    let row = db.wait_for_status(id, "sent", LONG);
    let attempts = db.rows_with(
        "SELECT outcome, error_code, error_text FROM mail_attempt WHERE mail_id = ?1 ORDER BY id",
        [id],
    );
    assert_eq!(attempts.len(), 2, "{attempts:?}");
    assert_eq!(attempts[0]["outcome"], "in_doubt", "{attempts:?}");
    assert_eq!(attempts[0]["error_code"], "in_doubt", "{attempts:?}");
    assert!(
        attempts[0]["error_text"]
            .as_str()
            .unwrap()
            .contains("stopped during the delivery"),
        "{attempts:?}"
    );
    assert_eq!(attempts[1]["outcome"], "sent", "{attempts:?}");
    assert_ne!(
        row["claimed_by"].as_str(),
        Some(claimed_by.as_str()),
        "the daemon claimed it the second time: {row}"
    );
    let msgid = row["message_id"].as_str().unwrap().to_string();
    let copies = sink.wait_for_messages(2, LONG);
    assert_eq!(copies.len(), 2);
    for m in &copies {
        assert!(
            String::from_utf8_lossy(&m.message).contains(&msgid),
            "each copy carries {msgid}"
        );
    }
    assert!(
        d.stderr()
            .contains("Rows left 'sending' by a mailqueue process that has ended"),
        "{}",
        d.stderr()
    );
    // Its lock file is cleaned up with it.
    let lock = dir.path().join(format!("queue.db.owner-{claimed_by}.lock"));
    wait_until(LONG, "the ended process's lock file to go", || {
        (!lock.exists()).then_some(())
    });
}

/// A `test-send` stuck waiting for the server (smtp-sink delays its answer to DATA) is alive:
/// round after round, the daemon's housekeeping sees its row and leaves it `sending`, attempt
/// open. Once it is SIGKILLed, the same daemon recovers the row (held: `on_doubt = "hold"`),
/// so the rounds before really looked at it.
#[test]
fn a_row_claimed_by_a_live_process_is_left_alone() {
    let sink = SmtpSink::start(&["-w", "60"]);
    let dir = tempfile::tempdir().unwrap();
    let (db_path, cfg) = housekeeping_setup(dir.path(), sink.port, "hold");
    let db = Db::open(&db_path);
    let d = Daemon::spawn(&cfg, &["run"]);
    wait_for_stderr(&d, "Ready");

    let mut sender = Daemon::spawn(&cfg, &["test-send", "--to", "admin@example.org"]);
    let id = wait_until(LONG, "the test mail to be claimed", || {
        test_mail_id(&db).filter(|id| db.status(*id) == "sending")
    });
    let before = rounds_with_a_live_claimer(&d);
    wait_until(
        LONG,
        "three housekeeping rounds that saw the live claimer",
        || {
            assert_eq!(
                db.status(id),
                "sending",
                "a live process's row was touched:\n{}",
                d.stderr()
            );
            (rounds_with_a_live_claimer(&d) >= before + 3).then_some(())
        },
    );
    assert_eq!(db.status(id), "sending", "a live process's row was touched");
    let open: i64 = db.query_one(&format!(
        "SELECT count(*) FROM mail_attempt WHERE mail_id = {id} AND finished_at IS NULL"
    ));
    assert_eq!(open, 1, "its attempt is still open");
    assert!(
        sender.child.try_wait().unwrap().is_none(),
        "test-send is still waiting for the server: {}",
        sender.stdout()
    );

    sender.child.kill().unwrap(); // SIGKILL
    sender.child.wait().unwrap();
    let row = db.wait_for_status(id, "held", LONG);
    assert_eq!(row["error_code"], "in_doubt", "{row}");
    let attempts = db.rows_with("SELECT outcome FROM mail_attempt WHERE mail_id = ?1", [id]);
    assert_eq!(attempts.len(), 1, "{attempts:?}");
    assert_eq!(attempts[0]["outcome"], "in_doubt", "{attempts:?}");
}

// ---------------------------------------------------------------------------------------------
// A read-only queue file
// ---------------------------------------------------------------------------------------------

/// The unprivileged user the daemon runs as in these tests.
const NOBODY: u32 = 65534;

/// A queue in a directory `nobody` may write, the queue file itself root's and 0644, the
/// config readable by all.
fn read_only_setup(dir: &Path, port: u16) -> (PathBuf, PathBuf) {
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::chown(dir, Some(NOBODY), Some(NOBODY)).unwrap();
    let db = dir.join("queue.db");
    let cfg = write_config(dir, &base_config(&db, port));
    std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o644)).unwrap();
    migrate(&cfg);
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o644)).unwrap();
    (db, cfg)
}

/// `mailqueue run` as `nobody`, no supplementary groups (util-linux `setpriv` execs it, so the
/// pid is the daemon's).
fn run_as_nobody(cfg: &Path) -> Daemon {
    let mut cmd = Command::new("setpriv");
    cmd.arg(format!("--reuid={NOBODY}"))
        .arg(format!("--regid={NOBODY}"))
        .arg("--clear-groups")
        .arg(mailqueue_bin())
        .arg("--config")
        .arg(cfg)
        .arg("run")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null());
    Daemon::from_command(cmd)
}

/// Gives the queue file and its -wal/-shm to `owner`, as docs/operations.md's repair does.
fn chown_queue(db: &Path, owner: u32) {
    for suffix in ["", "-wal", "-shm"] {
        let p = PathBuf::from(format!("{}{suffix}", db.display()));
        if p.exists() {
            std::os::unix::fs::chown(&p, Some(owner), Some(owner)).unwrap();
        }
    }
}

/// The `retry_in_ms` of each "Cannot claim a row" line, in order.
fn claim_backoffs(d: &Daemon) -> Vec<u64> {
    d.stderr()
        .lines()
        .filter(|l| l.contains("Cannot claim a row from the queue database"))
        .map(|l| {
            let v = l.split("retry_in_ms=").nth(1).expect(l);
            v.trim().parse().expect(l)
        })
        .collect()
}

/// Asserts that nothing was delivered or claimed: every row `queued` with no attempt, nothing
/// at the sink.
fn assert_untouched(db: &Db, ids: &[i64], sink: &SmtpSink, d: &Daemon) {
    for id in ids {
        let row = db.row(*id);
        assert_eq!(row["status"], "queued", "{row}\n{}", d.stderr());
        assert_eq!(row["attempts"], 0, "{row}");
    }
    let attempts: i64 = db.query_one("SELECT count(*) FROM mail_attempt");
    assert_eq!(attempts, 0, "no attempt was recorded");
    assert_eq!(sink.messages().len(), 0, "nothing reached the server");
}

/// The queue file is read-only for the daemon from the start: it starts anyway, says at start
/// and at every back-off step (growing, not a flood) that the file is read-only and how to fix
/// it, claims and sends nothing; once the file is given to its user, the same process delivers
/// every row, each once.
#[test]
fn a_read_only_queue_file_backs_off_and_recovers_when_it_is_made_writable() {
    let sink = SmtpSink::start(NO_ARGS);
    let dir = tempfile::tempdir().unwrap();
    let (db_path, cfg) = read_only_setup(dir.path(), sink.port);
    let db = Db::open(&db_path);
    let ids: Vec<i64> = (0..3)
        .map(|i| db.insert("a@example.com", &format!("ro{i}"), "x"))
        .collect();
    let mut d = run_as_nobody(&cfg);
    wait_for_stderr(&d, "The queue file is read-only for this process");
    wait_until(LONG, "three back-off steps", || {
        (claim_backoffs(&d).len() >= 3).then_some(())
    });
    let log = d.stderr();
    let line = log
        .lines()
        .find(|l| l.contains("Cannot claim a row"))
        .unwrap();
    for needle in [
        "attempt to write a readonly database",
        &db_path.display().to_string(),
        "give the mailqueue user write access",
        "trying again",
    ] {
        assert!(line.contains(needle), "{needle:?} missing in: {line}");
    }
    let steps = claim_backoffs(&d);
    assert!(
        steps.windows(2).all(|w| w[1] > w[0]),
        "each step waits longer than the one before: {steps:?}"
    );
    assert_untouched(&db, &ids, &sink, &d);

    chown_queue(&db_path, NOBODY);
    for id in &ids {
        db.wait_for_status(*id, "sent", LONG);
    }
    assert_eq!(sink.wait_for_messages(3, LONG).len(), 3, "each mail once");
    assert!(
        d.child.try_wait().unwrap().is_none(),
        "the same daemon delivered them"
    );
    assert_eq!(d.stderr().matches("mailqueue started.").count(), 1);
    assert!(d.terminate(LONG).success(), "{}", d.stderr());
    assert_eq!(sink.messages().len(), 3, "each mail once");
}

/// What a chown while the daemon runs really does: nothing. Modes are checked when a file is
/// opened, and the daemon keeps its connection (and the -wal/-shm) open, so it keeps delivering
/// through it; only storage trouble makes it open the file again, and that case is the one
/// above. (Were it to reopen the file on every call, this mail would wait.)
#[test]
fn a_file_made_read_only_while_running_keeps_working_through_the_open_connection() {
    let sink = SmtpSink::start(NO_ARGS);
    let dir = tempfile::tempdir().unwrap();
    let (db_path, cfg) = read_only_setup(dir.path(), sink.port);
    chown_queue(&db_path, NOBODY);
    let db = Db::open(&db_path);
    let first = db.insert("a@example.com", "before", "x");
    let mut d = run_as_nobody(&cfg);
    db.wait_for_status(first, "sent", LONG);
    chown_queue(&db_path, 0);
    let second = db.insert("a@example.com", "after", "x");
    db.wait_for_status(second, "sent", LONG);
    assert_eq!(sink.wait_for_messages(2, LONG).len(), 2);
    assert!(!d.stderr().contains("readonly"), "{}", d.stderr());
    assert!(d.terminate(LONG).success(), "{}", d.stderr());
}

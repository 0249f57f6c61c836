//! Storage trouble (issue 5.6): a full disk makes the daemon back off with a clear log line, mark nothing sent that was not, and recover when the disk is fine again;
//! a CRM writing 50 rows a second while another connection holds a long read sees no
//! "database is locked", and neither does the daemon.

mod support;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use support::*;

const LONG: Duration = Duration::from_secs(40);

// A read-only file cannot be staged the same way: remounting read-only is refused while the
// daemon holds the file open for writing, and root ignores file modes. A write error of any
// kind takes the same path as a full disk (the claim or the outcome write fails and is retried).

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

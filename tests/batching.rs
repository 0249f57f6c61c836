//! Batched commits (`[queue] commit_batch`, issue 6): an unpaced backlog is drained with several
//! rows claimed and several `sent` outcomes committed per transaction, and the price is exactly
//! the documented crash window — a crash leaves at most `commit_batch` rows `sending`, settled in
//! doubt at the next start and resent with the same Message-ID (a duplicate, never a loss). With
//! a pace, or `commit_batch = 1`, a crash leaves only the mail in flight.
//!
//! The crash is `MAILQUEUE_FAILPOINT=crash-after-reply#N`: the process aborts right after the
//! server accepted the N-th mail, before anything more is written (like SIGKILL).

mod support;

use std::collections::HashMap;
use std::process::Command;

use support::*;

const ROWS: usize = 40;
const CRASH_AT: usize = 20;
const LONG: std::time::Duration = std::time::Duration::from_secs(30);

/// What a crash at the `CRASH_AT`-th accepted mail left, and what the restart made of it.
struct Crash {
    /// Rows left `sending` by the crash.
    left_sending: usize,
    /// Rows whose `sent` outcome was committed before the crash.
    recorded_sent: usize,
    /// Mails the server accepted twice (by Message-ID) once everything is sent.
    duplicates: usize,
}

fn crash_and_restart(queue_extra: &str, interval_ms: u64) -> Crash {
    let sink = SmtpSink::start(NO_ARGS);
    let dir = tempfile::tempdir().unwrap();
    let db_path = dir.path().join("queue.db");
    let text = base_config(&db_path, sink.port)
        .replace("[queue]\n", &format!("[queue]\n{queue_extra}\n"))
        .replace("interval_ms = 0", &format!("interval_ms = {interval_ms}"));
    let cfg = write_config(dir.path(), &text);
    migrate(&cfg);
    let db = Db::open(&db_path);
    for i in 0..ROWS {
        db.insert("to@example.org", &format!("mail {i}"), "body");
    }

    let out = Command::new(mailqueue_bin())
        .arg("--config")
        .arg(&cfg)
        .args(["run", "--once"])
        .env(
            "MAILQUEUE_FAILPOINT",
            format!("crash-after-reply#{CRASH_AT}"),
        )
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("failpoint crash-after-reply"),
        "run --once should have been aborted at the failpoint: {}\n{stderr}",
        out.status
    );
    assert_eq!(sink.wait_for_messages(CRASH_AT, LONG).len(), CRASH_AT);
    let count = |status: &str| -> usize {
        db.rows_with(
            "SELECT count(*) AS n FROM mail_queue WHERE status = ?1",
            [status],
        )[0]["n"]
            .as_u64()
            .unwrap() as usize
    };
    let (left_sending, recorded_sent) = (count("sending"), count("sent"));
    assert_eq!(
        left_sending + recorded_sent + count("queued"),
        ROWS,
        "every row is sending, sent or queued"
    );

    // The restart settles the rows left `sending` in doubt and resends them (same Message-ID).
    run_once(&cfg);
    assert_eq!(count("sent"), ROWS, "nothing is lost");
    let in_doubt = db.rows("SELECT DISTINCT mail_id FROM mail_attempt WHERE outcome = 'in_doubt'");
    assert_eq!(
        in_doubt.len(),
        left_sending,
        "each row left sending is in doubt once"
    );
    let received = sink.wait_for_messages(ROWS, LONG);
    let mut by_id: HashMap<String, usize> = HashMap::new();
    for m in &received {
        let id = mail_parser::MessageParser::default()
            .parse(&m.message)
            .and_then(|p| p.message_id().map(str::to_string))
            .expect("a Message-ID");
        *by_id.entry(id).or_default() += 1;
    }
    assert_eq!(by_id.len(), ROWS, "every row reached the server");
    let duplicates = by_id.values().filter(|&&n| n > 1).count();
    assert!(by_id.values().all(|&n| n <= 2), "{by_id:?}");
    // The mails sent but not recorded went out twice; the rest of the rows left sending had
    // been claimed ahead, never sent, and went out once.
    assert_eq!(duplicates, CRASH_AT - recorded_sent);
    assert_eq!(received.len(), ROWS + duplicates);
    Crash {
        left_sending,
        recorded_sent,
        duplicates,
    }
}

/// Unpaced with `commit_batch = 8`: the crash finds several sent outcomes not yet committed and
/// rows claimed ahead — more than the one mail in flight (batching is on), never more than 8.
#[test]
fn an_unpaced_drain_commits_in_batches_and_a_crash_leaves_at_most_one_batch_in_doubt() {
    let c = crash_and_restart("commit_batch = 8", 0);
    assert!(
        c.left_sending >= 2,
        "batched: more than the mail in flight was uncommitted ({} rows sending)",
        c.left_sending
    );
    assert!(
        c.left_sending <= 8,
        "at most commit_batch rows in doubt, found {}",
        c.left_sending
    );
    assert!(c.duplicates >= 1 && c.recorded_sent < CRASH_AT);
}

/// `commit_batch = 1`: every outcome is committed before the next mail; the crash leaves only
/// the mail in flight in doubt (one duplicate).
#[test]
fn commit_batch_1_commits_every_outcome_before_the_next_mail() {
    let c = crash_and_restart("commit_batch = 1", 0);
    assert_eq!(c.left_sending, 1, "only the mail in flight");
    assert_eq!(c.recorded_sent, CRASH_AT - 1);
    assert_eq!(c.duplicates, 1);
}

/// Paced (any `interval_ms` > 0), batching is off whatever `commit_batch` says: one row in
/// doubt at most, as before.
#[test]
fn a_paced_queue_commits_every_outcome_whatever_commit_batch_says() {
    let c = crash_and_restart("commit_batch = 8", 1);
    assert_eq!(c.left_sending, 1, "only the mail in flight");
    assert_eq!(c.duplicates, 1);
}

/// A reload that sets a pace mid-drain gives back the rows claimed ahead under the old settings:
/// from then on at most the one row claimed ahead for the next paced send stays `sending`.
#[test]
fn a_reload_that_sets_a_pace_gives_the_batch_back() {
    let sink = SmtpSink::start(NO_ARGS);
    let dir = tempfile::tempdir().unwrap();
    let db_path = dir.path().join("queue.db");
    let text =
        base_config(&db_path, sink.port).replace("[queue]\n", "[queue]\ncommit_batch = 64\n");
    let cfg = write_config(dir.path(), &text);
    migrate(&cfg);
    let db = Db::open(&db_path);
    for i in 0..3000 {
        db.insert("to@example.org", &format!("mail {i}"), "body");
    }
    let mut d = Daemon::spawn(&cfg, &["run"]);
    sink.wait_for_messages(200, LONG);
    write_config(
        dir.path(),
        &text.replace("interval_ms = 0", "interval_ms = 5000"),
    );
    d.signal("HUP");
    wait_until(LONG, "the reload", || {
        d.stderr().contains("Configuration reloaded.").then_some(())
    });
    // Without this the test could pass for a drain that finished before the signal.
    let queued: i64 = db.query_one("SELECT count(*) FROM mail_queue WHERE status = 'queued'");
    assert!(queued > 0, "the reload came mid-drain");
    let sending: i64 = db.query_one("SELECT count(*) FROM mail_queue WHERE status = 'sending'");
    assert!(
        sending <= 1,
        "{sending} rows still claimed after the pace was set"
    );
    d.terminate(LONG);
}

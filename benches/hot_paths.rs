//! Criterion benches for the per-mail hot paths: claim a row and record its outcome, build a
//! mail from a row, judge a report, and the pacer's overhead. `cargo bench --bench hot_paths`.

use std::time::{Duration, SystemTime};

use criterion::{criterion_group, criterion_main, Criterion};
use lettre::message::Mailbox;
use mailqueue::config::{RateConfig, SenderConfig};
use mailqueue::error::Reply;
use mailqueue::policy::{self, Fate, Outcome, Report};
use mailqueue::rate::Pacer;
use mailqueue::store::{Claim, NewMail, Record, Store};

fn sender() -> SenderConfig {
    SenderConfig {
        from: Mailbox::new(Some("CRM 通知".into()), "crm@example.com".parse().unwrap()),
        envelope_from: "crm@example.com".parse().unwrap(),
        local_hostname: "crm.example.com".into(),
    }
}

fn claim() -> Claim {
    Claim {
        id: 1,
        attempt_id: 1,
        message_id: "<0123456789abcdef@example.com>".into(),
        attempts: 1,
        max_attempts: None,
        to_addrs: "山田 太郎 <yamada@example.jp>, sato@example.com".into(),
        cc_addrs: String::new(),
        bcc_addrs: String::new(),
        reply_to: String::new(),
        subject: "活動報告: 株式会社サンプル訪問".into(),
        body_text: "本日の訪問結果を報告します。\n".repeat(30),
        body_html: None,
        created_at: "2026-12-03T00:00:00.000Z".into(),
        send_after: None,
        settled: vec![],
        while_paused: false,
        doubts_before: 0,
    }
}

fn compose(c: &mut Criterion) {
    let (cl, s) = (claim(), sender());
    c.bench_function("compose a 1 KiB mail from a row", |b| {
        b.iter(|| mailqueue::message::compose(&cl, &s, 1 << 20).unwrap())
    });
}

fn judge(c: &mut Criterion) {
    let report = Report {
        rcpts: vec![
            ("a@example.com".into(), Reply::new(250, "2.1.5 Ok")),
            (
                "b@example.com".into(),
                Reply::new(550, "5.1.1 User unknown"),
            ),
        ],
        end: Ok(Reply::new(250, "2.0.0 Ok: queued as 4Q1")),
        relay_gated: false,
    };
    c.bench_function("judge a two-recipient report", |b| {
        b.iter(|| policy::judge(&report))
    });
}

fn pacer(c: &mut Criterion) {
    let cfg = RateConfig {
        interval: Duration::ZERO,
        burst: 1,
        max_per_hour: None,
        max_per_day: None,
    };
    let mut p = Pacer::new(&cfg);
    c.bench_function("pacer try_acquire (unpaced)", |b| {
        b.iter(|| p.try_acquire(SystemTime::now()))
    });
    let cfg = RateConfig {
        interval: Duration::from_nanos(1),
        burst: 1,
        max_per_hour: Some(1_000_000),
        max_per_day: None,
    };
    let mut p = Pacer::new(&cfg);
    c.bench_function("pacer try_acquire (bucket + hourly window)", |b| {
        b.iter(|| p.try_acquire(SystemTime::now()))
    });
}

/// The outcome the daemon records for a mail the server accepted.
fn sent(cl: &Claim) -> Record {
    Record {
        id: cl.id,
        attempt_id: cl.attempt_id,
        outcome: Outcome::Sent,
        status: "sent",
        next_attempt_at: None,
        counts: true,
        error_code: None,
        error_text: None,
        smtp_reply: Some("250 2.0.0 Ok".into()),
        rcpts: vec![(
            "a@example.com".into(),
            "to",
            Fate::Accepted,
            "250 2.1.5 Ok".into(),
        )],
        pause: None,
        resume: true,
        started_at: None,
    }
}

fn claim_and_record(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("q.db")).unwrap();
    let later = || SystemTime::now() + Duration::from_secs(1);
    let mail = || NewMail {
        to: "a@example.com".into(),
        subject: "s".into(),
        ..Default::default()
    };
    // One mail at a time: what a paced queue (or `commit_batch = 1`) does.
    c.bench_function("enqueue + claim + record sent", |b| {
        b.iter(|| {
            rt.block_on(async {
                store.enqueue(mail()).await.unwrap();
                let cl = store
                    .claim(later(), "example.com".into())
                    .await
                    .unwrap()
                    .unwrap();
                store.record(sent(&cl)).await.unwrap();
            })
        })
    });
    // An unpaced drain's batch: 64 claimed in one transaction, 64 outcomes in one (the 64
    // enqueues are the CRM's, one transaction each, as before). Per mail: the time / 64.
    const BATCH: usize = 64;
    let mut g = c.benchmark_group("batch of 64");
    g.throughput(criterion::Throughput::Elements(BATCH as u64));
    g.bench_function("enqueue 64 + claim 64 + record 64 sent", |b| {
        b.iter(|| {
            rt.block_on(async {
                for _ in 0..BATCH {
                    store.enqueue(mail()).await.unwrap();
                }
                let claims = store
                    .claim_many(later(), "example.com".into(), BATCH)
                    .await
                    .unwrap();
                assert_eq!(claims.len(), BATCH);
                store
                    .record_many(claims.iter().map(sent).collect())
                    .await
                    .unwrap();
            })
        })
    });
    g.finish();
}

criterion_group!(benches, compose, judge, pacer, claim_and_record);
criterion_main!(benches);

//! The command line: `mailqueue [--config FILE] <command>`.
//!
//! Job: parse arguments (clap), find the config (`--config` > `$MAILQUEUE_CONFIG` >
//! /etc/mailqueue/mailqueue.toml), run the command, print its result, and map errors to exit
//! statuses (78 for configuration, 64 for usage, 1 otherwise).
//!
//! Not its job: any delivery or SQL logic; every command is a few calls into `store`,
//! `scheduler` and `deliver`.
//!
//! Invariants: stdout carries the command's result (so scripts can read it), stderr the logs;
//! no secret is printed (`check-config` masks them).

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use clap::{Args, Parser, Subcommand};

use crate::config::{self, Config};
use crate::deliver::{Deliverer, Step};
use crate::error::{Error, Lang};
use crate::scheduler::{self, Worker};
use crate::service;
use crate::signals::{self, Shutdown};
use crate::store::{self, DaemonLock, NewMail, RunLock, Store};
use crate::telemetry;

/// Delivers a CRM's queued mails through one SMTP account, paced to the provider's limit.
#[derive(Parser, Debug)]
#[command(name = "mailqueue", version, about)]
pub struct Cli {
    /// The config file.
    #[arg(long, global = true, env = "MAILQUEUE_CONFIG", default_value = config::DEFAULT_PATH)]
    pub config: PathBuf,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the daemon: deliver due mails at the configured pace until stopped.
    Run {
        /// Deliver what is due now, then exit (for cron and tests).
        #[arg(long)]
        once: bool,
        /// Skip the one-daemon-per-queue-file lock. Tests use it to prove the claim is safe
        /// without it; two daemons on one account would share its pace.
        #[arg(long, hide = true)]
        no_lock_dangerous: bool,
    },
    /// Create or upgrade the queue tables, then exit.
    Migrate,
    /// Validate the config and print the effective settings (secrets masked).
    CheckConfig {
        /// Also connect: TLS, SMTP login, then QUIT without sending.
        #[arg(long)]
        connect: bool,
    },
    /// Send a test mail now, through the same code as the daemon, and print each step.
    TestSend {
        /// The recipient (use an address on another domain than the sender).
        #[arg(long)]
        to: String,
        /// The subject.
        #[arg(long)]
        subject: Option<String>,
        /// The body.
        #[arg(long)]
        body: Option<String>,
    },
    /// Add a mail to the queue and print its id.
    Enqueue(EnqueueArgs),
    /// Show counts per status, the oldest waiting mail and whether the queue is paused.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List mails, newest first.
    List {
        /// Only mails with this status.
        #[arg(long)]
        status: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show one mail with its recipients and attempts.
    Show {
        /// The mail's id.
        id: i64,
    },
    /// Put a failed (or held, or cancelled) mail back in the queue, due now.
    Retry {
        /// The mail's id.
        #[arg(required_unless_present = "failed", conflicts_with = "failed")]
        id: Option<i64>,
        /// Every failed mail.
        #[arg(long)]
        failed: bool,
    },
    /// Cancel a waiting mail.
    Cancel {
        /// The mail's id.
        id: i64,
    },
    /// Lift an account pause now (after fixing its cause).
    Resume,
    /// Delete finished mails (sent, failed, cancelled) older than the given age.
    Purge {
        /// For example 30d.
        #[arg(long)]
        older_than: String,
    },
    /// Demo: enqueue a few sample mails and deliver them at the configured pace, then exit.
    Demo,
}

/// `mailqueue enqueue`.
#[derive(Args, Debug)]
pub struct EnqueueArgs {
    /// Recipients (an RFC 5322 list).
    #[arg(long)]
    to: String,
    /// Cc recipients.
    #[arg(long, default_value = "")]
    cc: String,
    /// Bcc recipients.
    #[arg(long, default_value = "")]
    bcc: String,
    /// The subject.
    #[arg(long)]
    subject: String,
    /// The text body.
    #[arg(
        long,
        conflicts_with = "body_file",
        required_unless_present = "body_file"
    )]
    body: Option<String>,
    /// Read the text body from a file.
    #[arg(long)]
    body_file: Option<PathBuf>,
    /// Read an HTML alternative from a file.
    #[arg(long)]
    html_file: Option<PathBuf>,
    /// Higher goes first.
    #[arg(long, default_value_t = 0)]
    priority: i64,
    /// Not before this time (e.g. 2026-12-24T09:00:00Z).
    #[arg(long)]
    send_after: Option<String>,
    /// Attach a file (repeatable); it is stored in the queue.
    #[arg(long)]
    attach: Vec<PathBuf>,
    /// An extra header line, e.g. "In-Reply-To: <id@example.com>" (repeatable).
    #[arg(long)]
    header: Vec<String>,
}

/// A MIME type from a file name's extension (the common ones; else application/octet-stream).
fn content_type_of(p: &Path) -> &'static str {
    match p
        .extension()
        .and_then(|e| e.to_str())
        .map(|e| e.to_ascii_lowercase())
        .as_deref()
    {
        Some("pdf") => "application/pdf",
        Some("txt") => "text/plain; charset=utf-8",
        Some("csv") => "text/csv; charset=utf-8",
        Some("html" | "htm") => "text/html; charset=utf-8",
        Some("png") => "image/png",
        Some("jpg" | "jpeg") => "image/jpeg",
        Some("gif") => "image/gif",
        Some("zip") => "application/zip",
        Some("xlsx") => "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
        Some("docx") => "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
        _ => "application/octet-stream",
    }
}

/// Parses the command line and runs it; returns the process exit status.
pub fn main() -> i32 {
    // A bug must still end in one line that says so, not a backtrace an admin cannot use.
    std::panic::set_hook(Box::new(|info| {
        eprintln!("mailqueue: internal error (please report it): {info}");
    }));
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            // --help and --version are not errors; everything else is a usage error (64).
            return if e.use_stderr() { 64 } else { 0 };
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mailqueue: cannot start the runtime: {e}");
            return 1;
        }
    };
    // On a worker, not on this thread: a task there is woken by the worker that runs the timers
    // and I/O, with no hand-over to this thread and back at every wakeup (an idle daemon wakes
    // ten times a second; each hand-over cost about 100 µs of CPU).
    let joined = rt.block_on(async { tokio::spawn(dispatch(cli)).await });
    let Ok(result) = joined else {
        // The panic hook has already said what happened.
        return 70;
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("mailqueue: {}", e.text(Lang::En));
            e.exit_code()
        }
    }
}

fn load(path: &Path) -> Result<Config, Error> {
    let cfg = config::load(path)?;
    telemetry::init(&cfg.log);
    Ok(cfg)
}

async fn open_store(path: &Path) -> Result<Store, Error> {
    let p = path.to_path_buf();
    tokio::task::spawn_blocking(move || Store::open(&p))
        .await
        .map_err(|e| Error::db(format!("open task failed: {e}")))?
}

async fn dispatch(cli: Cli) -> Result<i32, Error> {
    match cli.command {
        Command::CheckConfig { connect } => check_config(&cli.config, connect).await,
        Command::Run {
            once,
            no_lock_dangerous,
        } => run(&cli.config, once, no_lock_dangerous).await,
        Command::Demo => demo(&cli.config).await,
        Command::TestSend { to, subject, body } => test_send(&cli.config, to, subject, body).await,
        other => {
            // These never talk to a server: they work while the secret files are out of reach.
            let cfg = config::load_with(&cli.config, config::Secrets::Skip)?;
            telemetry::init(&cfg.log);
            let store = open_store(&cfg.queue.database).await?;
            admin(other, &cfg, &store).await
        }
    }
}

async fn check_config(path: &Path, connect: bool) -> Result<i32, Error> {
    let cfg = load(path)?;
    print!("{}", cfg.describe());
    if !cfg.sender.local_hostname.contains('.') {
        eprintln!(
            "warning: sender.local_hostname {:?} is not fully qualified; many servers refuse such an EHLO name",
            cfg.sender.local_hostname
        );
    }
    let mut deliverer = Deliverer::new(&cfg)?;
    println!("# config OK");
    if !connect {
        return Ok(0);
    }
    deliverer = deliverer.with_progress(print_step());
    Ok(match deliverer.probe().await {
        Ok(()) => 0,
        Err(_) => 1,
    })
}

fn print_step() -> Box<dyn Fn(&Step) + Send + Sync> {
    Box::new(|s: &Step| match &s.result {
        Ok(d) => println!("[ok] {}: {d}", s.what),
        Err(e) => println!("[failed] {}: {e}", s.what),
    })
}

async fn run(path: &Path, once: bool, no_lock: bool) -> Result<i32, Error> {
    let cfg = load(path)?;
    // Signals first: a stop that comes while the queue is opened (a long migration, say) is
    // then a clean stop before the first mail, not the default action's abrupt end.
    let (trigger, shutdown) = signals::shutdown_pair();
    let controls = signals::listen(trigger).map_err(|e| Error::Usage {
        detail: format!("cannot listen for signals: {e}"),
    })?;
    let store = open_store(&cfg.queue.database).await?;
    let daemon_lock = if no_lock {
        None
    } else {
        let db = cfg.queue.database.clone();
        Some(
            tokio::task::spawn_blocking(move || DaemonLock::acquire(&db))
                .await
                .map_err(|e| Error::db(format!("lock task failed: {e}")))??,
        )
    };
    let (lock, exclusive) = take_lock(&cfg.queue.database).await?;
    // A queue file this process may not write does not stop the daemon: under systemd an exit
    // would be restarted in a loop until the start limit gives up, while a daemon that waits
    // says why at every back-off step and goes on by itself once the admin fixes the file.
    if let Err(e) = store.check_writable().await {
        tracing::error!(error = %e.text(Lang::En),
            "The queue file is read-only for this process: nothing is claimed or sent until it is writable; mailqueue starts anyway and keeps trying.");
    }
    match recover(&store, &cfg, exclusive).await {
        Ok(()) => {}
        Err(e) if e.storage().is_some() => {
            tracing::error!(error = %e.text(Lang::En),
                "Cannot recover the rows a previous run left 'sending' yet; once the queue file is writable, housekeeping recovers those whose lock file is left, the others wait for the next start.");
        }
        Err(e) => return Err(e),
    }
    lock.downgrade()?;
    if let Some(addr) = cfg.metrics_listen {
        telemetry::init_metrics(addr).map_err(|e| Error::Config {
            problems: vec![format!("metrics.listen: {e}")],
        })?;
        if let Ok(Some(t)) = store.last_sent_at().await {
            telemetry::set_last_sent(t);
        }
        service::spawn_gauges(store.clone(), shutdown.clone());
    }
    let heartbeat = service::Heartbeat::new();
    heartbeat.promise(cfg.queue.poll_interval * 2 + std::time::Duration::from_secs(2));
    if !once {
        service::spawn_housekeeping(store.clone(), &cfg, shutdown.clone());
        service::spawn_watchdog(heartbeat.clone(), shutdown.clone());
    }
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        database = %cfg.queue.database.display(),
        server = %format!("{}:{}", cfg.smtp.host, cfg.smtp.port),
        interval_ms = cfg.rate.interval.as_millis() as u64,
        pop_before_smtp = cfg.pop.is_some(),
        once,
        "mailqueue started."
    );
    if let Some(to) = &cfg.redirect_all_to {
        tracing::warn!(redirect_all_to = %to,
            "STAGING MODE: every mail goes to {to} instead of its recipients (sender.redirect_all_to).");
    }
    service::notify_ready("delivering");
    tracing::info!("Ready: the queue is open and the configuration valid.");
    let opts = scheduler::RunOptions {
        once,
        controls: Some(controls),
        heartbeat,
    };
    let stats = scheduler::run(cfg, store, shutdown, opts).await?;
    service::notify_stopping();
    tracing::info!(
        attempts = stats.attempts,
        sent = stats.sent,
        failed = stats.failed,
        "mailqueue stopped."
    );
    drop(lock);
    drop(daemon_lock);
    Ok(0)
}

/// Takes the run lock off the runtime's threads (it may wait while another process recovers).
async fn take_lock(db: &Path) -> Result<(RunLock, bool), Error> {
    let db = db.to_path_buf();
    tokio::task::spawn_blocking(move || RunLock::acquire(&db))
        .await
        .map_err(|e| Error::db(format!("lock task failed: {e}")))?
}

async fn recover(store: &Store, cfg: &Config, exclusive: bool) -> Result<(), Error> {
    if exclusive {
        let (text, hold) = service::recovery_text(cfg, "mailqueue stopped during the delivery");
        let ids = store.recover_sending(text, hold).await?;
        if !ids.is_empty() {
            tracing::warn!(mail_ids = ?ids, "Rows left 'sending' by a previous run may have been delivered (in doubt): queued again, or held with on_doubt = \"hold\".");
        }
    } else {
        tracing::info!("Another mailqueue process is delivering from this queue; its rows in 'sending' are left to it.");
    }
    // Safe with or without the exclusive lock: only the rows of processes that have ended.
    // (With it, this only removes their lock files: their rows were recovered just above.)
    service::recover_orphans(store, cfg).await;
    Ok(())
}

async fn test_send(
    path: &Path,
    to: String,
    subject: Option<String>,
    body: Option<String>,
) -> Result<i32, Error> {
    let cfg = load(path)?;
    let lang = cfg.log.error_language;
    let store = open_store(&cfg.queue.database).await?;
    let (lock, _) = take_lock(&cfg.queue.database).await?;
    lock.downgrade()?;
    let deliverer = Deliverer::new(&cfg)?.with_progress(print_step());
    let mut worker = Worker::new(cfg, store.clone(), deliverer).await?;
    let first_wait = worker.first_wait();
    let mut never = Shutdown::never();
    if !first_wait.is_zero() {
        println!(
            "waiting {} ms for the pace (a mail was sent recently)",
            first_wait.as_millis()
        );
    }
    let (def_subject, def_body) = match lang {
        Lang::Ja => ("テストメール", "メール送信のテスト"),
        Lang::En => (
            "mailqueue test mail",
            "This is a test mail sent by mailqueue.",
        ),
    };
    let mail = NewMail {
        to,
        subject: subject.unwrap_or_else(|| def_subject.into()),
        body_text: body.unwrap_or_else(|| def_body.into()),
        max_attempts: Some(1),
        ..Default::default()
    };
    let claim = store
        .insert_claimed(mail, worker.msgid_domain().to_string())
        .await?;
    let fin = worker
        .attempt(claim, false, &mut never)
        .await
        .expect("a shutdown that never fires cannot interrupt the pace wait");
    worker.close().await;
    if fin.status == "sent" {
        if let Some(t) = &fin.text {
            println!("{t}");
        }
        println!(
            "{}",
            if lang == Lang::Ja {
                "メールを送信しました"
            } else {
                "Mail sent"
            }
        );
        Ok(0)
    } else {
        println!("{}", fin.text.unwrap_or_default());
        Ok(1)
    }
}

async fn admin(cmd: Command, cfg: &Config, store: &Store) -> Result<i32, Error> {
    let lang = cfg.log.error_language;
    match cmd {
        Command::Migrate => {
            println!(
                "queue tables are at schema version {} in {}",
                store::schema_version(),
                store.path().display()
            );
        }
        Command::Enqueue(a) => {
            let body_text = match (a.body, a.body_file) {
                (Some(b), _) => b,
                (None, Some(f)) => read_file(&f)?,
                (None, None) => unreachable!("clap requires one"),
            };
            let body_html = a.html_file.as_deref().map(read_file).transpose()?;
            let headers = if a.header.is_empty() {
                None
            } else {
                Some(a.header.join("\n"))
            };
            if let Some(h) = &headers {
                crate::message::extra_headers(h).map_err(|e| Error::Usage {
                    detail: e.text(Lang::En),
                })?;
            }
            let mut attachments = Vec::new();
            for f in &a.attach {
                let content = std::fs::read(f).map_err(|e| Error::Usage {
                    detail: format!("cannot read {}: {e}", f.display()),
                })?;
                let name = f
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "attachment".into());
                attachments.push((name, content_type_of(f).to_string(), content));
            }
            let send_after = match a.send_after {
                None => None,
                Some(s) => Some(store::ts(store::parse_ts(&s).ok_or_else(|| {
                    Error::Usage {
                        detail: format!(
                            "--send-after {s:?} is not a time like 2026-12-24T09:00:00Z"
                        ),
                    }
                })?)),
            };
            let id = store
                .enqueue(NewMail {
                    to: a.to,
                    cc: a.cc,
                    bcc: a.bcc,
                    subject: a.subject,
                    body_text,
                    body_html,
                    priority: a.priority,
                    send_after,
                    max_attempts: None,
                    headers,
                    attachments,
                })
                .await?;
            println!("{id}");
        }
        Command::Status { json } => {
            let s = store.summary().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s).unwrap_or_default());
            } else {
                for (st, n) in &s.counts {
                    println!("{st:<10} {n}");
                }
                println!(
                    "oldest waiting: {}",
                    s.oldest_waiting.as_deref().unwrap_or("-")
                );
                if s.state.paused {
                    println!(
                        "PAUSED since {} until {} ({}): {}",
                        s.state.paused_since.as_deref().unwrap_or("?"),
                        s.state.paused_until.as_deref().unwrap_or("?"),
                        s.state.error_code.as_deref().unwrap_or("?"),
                        s.state.error_text.as_deref().unwrap_or("")
                    );
                } else {
                    println!("not paused");
                }
            }
        }
        Command::List {
            status,
            limit,
            json,
        } => {
            if let Some(s) = &status {
                if !store::STATUSES.contains(&s.as_str()) {
                    return Err(Error::Usage {
                        detail: format!(
                            "--status {s:?} is not one of {}",
                            store::STATUSES.join(", ")
                        ),
                    });
                }
            }
            let rows = store.list(status, limit).await?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&rows).unwrap_or_default()
                );
            } else {
                println!(
                    "{:>6}  {:<9}  {:>3}  {:<24}  {:<30}  subject / last_error",
                    "id", "status", "try", "created_at", "to"
                );
                for r in rows {
                    let g = |k: &str| match r.get(k) {
                        Some(serde_json::Value::String(s)) => s.clone(),
                        Some(serde_json::Value::Null) | None => String::new(),
                        Some(v) => v.to_string(),
                    };
                    let tail = if g("last_error").is_empty() {
                        g("subject")
                    } else {
                        format!("{} / {}", g("subject"), g("last_error"))
                    };
                    println!(
                        "{:>6}  {:<9}  {:>3}  {:<24}  {:<30}  {}",
                        g("id"),
                        g("status"),
                        g("attempts"),
                        g("created_at"),
                        g("to_addrs"),
                        tail
                    );
                }
            }
        }
        Command::Show { id } => {
            println!(
                "{}",
                serde_json::to_string_pretty(&store.show(id).await?).unwrap_or_default()
            );
        }
        Command::Retry { id, .. } => {
            let n = store.retry(id).await?;
            println!("{n} mail(s) queued again");
        }
        Command::Cancel { id } => {
            store.cancel(id).await?;
            println!("mail {id} cancelled");
        }
        Command::Resume => {
            let was = store.resume().await?;
            println!(
                "{}",
                if was {
                    "queue resumed"
                } else {
                    "queue was not paused"
                }
            );
        }
        Command::Purge { older_than } => {
            let age = config::parse_duration(&older_than).map_err(|e| Error::Usage {
                detail: format!("--older-than: {e}"),
            })?;
            let cutoff = SystemTime::now()
                .checked_sub(age)
                .unwrap_or(SystemTime::UNIX_EPOCH);
            let n = store.purge(cutoff).await?;
            println!("{n} mail(s) purged");
        }
        Command::Run { .. }
        | Command::CheckConfig { .. }
        | Command::TestSend { .. }
        | Command::Demo => unreachable!(),
    }
    let _ = lang;
    Ok(0)
}

fn read_file(p: &Path) -> Result<String, Error> {
    std::fs::read_to_string(p).map_err(|e| Error::Usage {
        detail: format!("cannot read {}: {e}", p.display()),
    })
}

/// The demo: a local queue, the file transport, five sample mails at the configured pace.
async fn demo(path: &Path) -> Result<i32, Error> {
    let cfg = load(path)?;
    if let Some(dir) = cfg
        .queue
        .database
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
    {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::db(format!("cannot create {}: {e}", dir.display())))?;
    }
    let store = open_store(&cfg.queue.database).await?;
    let samples = [
        (
            "山田 太郎 <yamada@example.jp>",
            "活動報告: 株式会社サンプル訪問",
            "本日の訪問結果を報告します。\n次回は来週火曜日です。",
        ),
        (
            "sato@example.com",
            "Weekly activity report",
            "Three visits, two proposals sent.",
        ),
        (
            "suzuki@example.net, tanaka@example.org",
            "商談のお知らせ",
            "新しい商談が登録されました。",
        ),
        (
            "Jane Doe <jane@example.com>",
            "Reminder: follow-up call",
            "Call the customer back on Friday.",
        ),
        ("info@example.jp", "テストメール", "メール送信のテスト"),
    ];
    let mut ids = vec![];
    for (to, subject, body) in samples {
        ids.push(
            store
                .enqueue(NewMail {
                    to: to.into(),
                    subject: subject.into(),
                    body_text: body.into(),
                    ..Default::default()
                })
                .await?,
        );
    }
    println!(
        "Enqueued {} mails (ids {}..={}); delivering one every {} ms into {} ...",
        ids.len(),
        ids[0],
        ids[ids.len() - 1],
        cfg.rate.interval.as_millis(),
        cfg.smtp
            .dir
            .as_ref()
            .map(|d| d.display().to_string())
            .unwrap_or_else(|| format!("{}:{}", cfg.smtp.host, cfg.smtp.port))
    );
    let started = std::time::Instant::now();
    let stats = scheduler::run(
        cfg,
        store.clone(),
        Shutdown::never(),
        scheduler::RunOptions::once(),
    )
    .await?;
    let rows = store.list(None, ids.len()).await?;
    for r in rows.iter().rev() {
        println!(
            "  #{} {} at {}  to {}  \"{}\"",
            r["id"],
            r["status"].as_str().unwrap_or(""),
            r["sent_at"].as_str().unwrap_or("-"),
            r["to_addrs"].as_str().unwrap_or(""),
            r["subject"].as_str().unwrap_or("")
        );
    }
    println!(
        "Done: {} sent, {} failed in {:.1} s. See `mailqueue --config {} list`.",
        stats.sent,
        stats.failed,
        started.elapsed().as_secs_f64(),
        path.display()
    );
    Ok(if stats.failed == 0 { 0 } else { 1 })
}

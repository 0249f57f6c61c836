//! Logs and metrics: tracing-subscriber set up from `[log]`, Prometheus from `[metrics]`.
//!
//! Job: one subscriber writing to stderr, as text (no colours unless stderr is a terminal, so
//! journald gets clean lines) or as JSON for log shippers, filtered by `[log] level`.
//!
//! Metrics (`[metrics] listen`, off by default) are served by metrics-exporter-prometheus:
//! counters of attempts, sent and failed mails (by error code), and gauges of mails by status,
//! the pause and its reason, the age of the oldest waiting mail and the time since the last
//! successful send.
//!
//! Not its job: deciding what is logged; modules log sentences with key/value fields.
//!
//! Invariants: lettre's own protocol logging is never enabled (its `tracing` feature is off in
//! Cargo.toml, and the filter pins `lettre=warn` besides), because at debug level it would print
//! `AUTH PLAIN <base64>`; secrets are `config::Secret`, which never formats its value.

use std::io::IsTerminal;
use std::time::{SystemTime, UNIX_EPOCH};

use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// Changes the filter of the installed subscriber (SIGHUP applies `[log] level`).
type SetLevel = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// The installed subscriber's filter switch, once `init` ran.
static SET_LEVEL: std::sync::OnceLock<SetLevel> = std::sync::OnceLock::new();

fn filter(level: &str) -> EnvFilter {
    EnvFilter::builder()
        .parse(format!("{level},lettre=warn"))
        .unwrap_or_else(|_| EnvFilter::new("info,lettre=warn"))
}

/// Installs the global subscriber. Safe to call once per process; later calls are ignored.
pub fn init(cfg: &LogConfig) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;
    let (filter_layer, handle) = tracing_subscriber::reload::Layer::new(filter(&cfg.level));
    let stderr = match cfg.format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_writer(std::io::stderr)
            .with_filter(filter_layer)
            .boxed(),
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_ansi(std::io::stderr().is_terminal())
            .with_target(false)
            .with_writer(std::io::stderr)
            .with_filter(filter_layer)
            .boxed(),
    };
    let mut layers = vec![stderr];
    layers.extend(trace_copy());
    if tracing_subscriber::registry()
        .with(layers)
        .try_init()
        .is_ok()
    {
        let _ = SET_LEVEL.set(Box::new(move |l| {
            handle.reload(filter(l)).map_err(|e| e.to_string())
        }));
    }
}

/// Test builds only (`failpoints`): with `MAILQUEUE_TEST_TRACE_DIR` set, every process also
/// writes everything at trace level to `<dir>/<pid>.log`, whatever `[log] level` says, so the
/// whole integration suite can be scanned for secrets (scripts/secrets-scan.sh).
fn trace_copy(
) -> Option<Box<dyn tracing_subscriber::Layer<tracing_subscriber::Registry> + Send + Sync>> {
    #[cfg(feature = "failpoints")]
    {
        use tracing_subscriber::Layer;
        let dir = std::env::var_os("MAILQUEUE_TEST_TRACE_DIR")?;
        let path = std::path::Path::new(&dir).join(format!("{}.log", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .ok()?;
        Some(
            tracing_subscriber::fmt::layer()
                .with_ansi(false)
                .with_writer(std::sync::Mutex::new(file))
                .with_filter(EnvFilter::new("trace"))
                .boxed(),
        )
    }
    #[cfg(not(feature = "failpoints"))]
    None
}

/// Applies a new `[log] level` to the running subscriber (the format needs a restart).
pub fn set_level(level: &str) -> Result<(), String> {
    match SET_LEVEL.get() {
        Some(f) => f(level),
        None => Err("logging is not initialised".into()),
    }
}

/// A minimal subscriber for commands that run before the config is read.
pub fn init_default() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::new("warn"))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .try_init();
}

/// Unix seconds of the last successful send (0: none yet), for the gauge.
static LAST_SENT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Serves Prometheus metrics on `addr` (`GET /metrics`). Call inside the runtime.
pub fn init_metrics(addr: std::net::SocketAddr) -> Result<(), String> {
    let (recorder, exporter) = metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(addr)
        .build()
        .map_err(|e| format!("cannot serve metrics on {addr}: {e}"))?;
    metrics::set_global_recorder(recorder).map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        if let Err(e) = exporter.await {
            tracing::error!(error = ?e, "The metrics endpoint stopped.");
        }
    });
    metrics::describe_counter!("mailqueue_attempts_total", "Delivery attempts, by outcome.");
    metrics::describe_counter!("mailqueue_sent_total", "Mails that ended sent.");
    metrics::describe_counter!(
        "mailqueue_failed_total",
        "Mails that ended failed, by error code."
    );
    metrics::describe_gauge!("mailqueue_mails", "Mails in the queue table, by status.");
    metrics::describe_gauge!(
        "mailqueue_paused",
        "1 while the account is paused (label: why)."
    );
    metrics::describe_gauge!(
        "mailqueue_oldest_waiting_seconds",
        "Age of the oldest queued mail."
    );
    metrics::describe_gauge!(
        "mailqueue_seconds_since_last_sent",
        "Seconds since the last successful send."
    );
    tracing::info!(listen = %addr, "Serving metrics.");
    Ok(())
}

/// Counts one finished attempt (no-op without `[metrics]`).
pub fn record_attempt(outcome: &'static str, status: &'static str, error_code: Option<&str>) {
    metrics::counter!("mailqueue_attempts_total", "outcome" => outcome).increment(1);
    match status {
        "sent" => {
            metrics::counter!("mailqueue_sent_total").increment(1);
            set_last_sent(SystemTime::now());
        }
        "failed" => {
            let code = error_code.unwrap_or("unknown").to_string();
            metrics::counter!("mailqueue_failed_total", "error_code" => code).increment(1);
        }
        _ => {}
    }
}

/// Remembers when a mail was last sent (seeded from the database at start).
pub fn set_last_sent(t: SystemTime) {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    LAST_SENT.fetch_max(secs, std::sync::atomic::Ordering::Relaxed);
}

/// Sets the gauges that come from the database.
pub fn set_queue_gauges(s: &crate::store::Summary) {
    for (status, n) in &s.counts {
        metrics::gauge!("mailqueue_mails", "status" => status.clone()).set(*n as f64);
    }
    let why = s.state.error_code.clone().unwrap_or_default();
    metrics::gauge!("mailqueue_paused", "error_code" => why).set(if s.state.paused {
        1.0
    } else {
        0.0
    });
    let now = SystemTime::now();
    let oldest = s
        .oldest_waiting
        .as_deref()
        .and_then(crate::store::parse_ts)
        .and_then(|t| now.duration_since(t).ok())
        .map_or(0.0, |d| d.as_secs_f64());
    metrics::gauge!("mailqueue_oldest_waiting_seconds").set(oldest);
    let last = LAST_SENT.load(std::sync::atomic::Ordering::Relaxed);
    if last > 0 {
        let since = now
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
            .saturating_sub(last);
        metrics::gauge!("mailqueue_seconds_since_last_sent").set(since as f64);
    }
}

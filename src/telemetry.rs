//! Logging: tracing-subscriber set up from `[log]`.
//!
//! Job: one subscriber writing to stderr, as text (no colours unless stderr is a terminal, so
//! journald gets clean lines) or as JSON for log shippers, filtered by `[log] level`.
//!
//! Not its job: deciding what is logged; modules log sentences with key/value fields.
//!
//! Invariants: lettre's own protocol logging is never enabled (its `tracing` feature is off in
//! Cargo.toml, and the filter pins `lettre=warn` besides), because at debug level it would print
//! `AUTH PLAIN <base64>`; secrets are `config::Secret`, which never formats its value.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// Installs the global subscriber. Safe to call once per process; later calls are ignored.
pub fn init(cfg: &LogConfig) {
    let filter = EnvFilter::builder()
        .parse(format!("{},lettre=warn", cfg.level))
        .unwrap_or_else(|_| EnvFilter::new("info,lettre=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match cfg.format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .with_target(false)
            .try_init(),
    };
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

//! mailqueue: delivers a CRM's queued mails through one SMTP account, paced to the provider's
//! limit, and writes back for every mail whether it went out or why not.
//!
//! The roles, one module each (Postfix's split: pickup → queue manager → delivery agent):
//! - `config`: the TOML file, validated up front;
//! - `store`: the queue table and its companions in SQLite — the only SQL;
//! - `scheduler`: finds due rows, paces, claims, and hands them on — it only schedules;
//! - `message`: builds a mail from a row;
//! - `deliver`: the only SMTP;
//! - `oauth`: access tokens for XOAUTH2 from an OAuth2 refresh token (`[smtp.oauth2]`);
//! - `policy`: pure failure policy — what a reply means, back-off, pauses;
//! - `rate`: the token bucket and the rolling windows;
//! - `signals`: signals as one enum, and the shutdown flag;
//! - `service`: systemd notify and watchdog, housekeeping, metrics gauges;
//! - `telemetry`: logs and metrics;
//! - `watch`: notices commits to the queue file without a query, so an idle daemon stays idle;
//! - `error`: the one error type, with stable codes and texts in English and Japanese;
//! - `cli`: the command line.

pub mod cli;
pub mod config;
pub mod deliver;
pub mod error;
pub mod failpoint;
pub mod message;
pub mod net;
pub mod oauth;
pub mod policy;
pub mod pop3;
pub mod rate;
pub mod scheduler;
pub mod service;
pub mod signals;
pub mod store;
pub mod telemetry;
pub mod watch;

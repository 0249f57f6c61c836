//! Network plumbing shared by the SMTP and POP3 clients: the TCP connect (from a source
//! address, all resolved addresses tried, within one timeout) and the rustls client config.
//!
//! Job: the two things both protocols need identically, so each client keeps only its
//! protocol. Not its job: any protocol, retries or error policy (callers wrap the plain
//! `String` errors in their own types).
//!
//! Invariants: TLS uses rustls with the ring provider only; with a `ca_file` only its CAs are
//! trusted (a private relay), otherwise the webpki roots.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpSocket, TcpStream};

/// Why a connect failed: it timed out, or the OS said why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectError {
    /// Resolving and connecting took longer than the timeout.
    Timeout,
    /// The reason, with the address.
    Failed(String),
}

/// Resolves `host` and connects to the first address that answers (of the same family as
/// `source`, bound to it when given), all within `timeout`.
pub async fn connect(
    host: &str,
    port: u16,
    source: Option<IpAddr>,
    timeout: Duration,
) -> Result<TcpStream, ConnectError> {
    let attempt = async {
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
            .await
            .map_err(|e| format!("cannot resolve {host}: {e}"))?
            .filter(|a| source.is_none_or(|src| src.is_ipv4() == a.is_ipv4()))
            .collect();
        if addrs.is_empty() {
            return Err(match source {
                Some(src) => format!("{host} has no address of the same family as {src}"),
                None => format!("{host} has no address"),
            });
        }
        let mut last = String::new();
        for addr in addrs {
            let socket = if addr.is_ipv4() {
                TcpSocket::new_v4()
            } else {
                TcpSocket::new_v6()
            }
            .map_err(|e| e.to_string())?;
            if let Some(src) = source {
                socket
                    .bind(SocketAddr::new(src, 0))
                    .map_err(|e| format!("cannot bind source address {src}: {e}"))?;
            }
            match socket.connect(addr).await {
                // Commands are small writes answered at once: without NODELAY, Nagle's algorithm
                // and the peer's delayed ACK cost ~40 ms per command.
                Ok(tcp) => {
                    let _ = tcp.set_nodelay(true);
                    return Ok(tcp);
                }
                Err(e) => last = format!("{addr}: {e}"),
            }
        }
        Err(last)
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(r) => r.map_err(ConnectError::Failed),
        Err(_) => Err(ConnectError::Timeout),
    }
}

/// A rustls client config trusting the CAs in `ca_file`, or the webpki roots without one.
pub fn client_config(ca_file: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let pem = std::fs::read(path)
                .map_err(|e| format!("cannot read ca_file {}: {e}", path.display()))?;
            let mut n = 0;
            for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
                let cert =
                    cert.map_err(|e| format!("bad PEM in ca_file {}: {e}", path.display()))?;
                roots
                    .add(cert)
                    .map_err(|e| format!("bad CA in ca_file {}: {e}", path.display()))?;
                n += 1;
            }
            if n == 0 {
                return Err(format!("no certificates in ca_file {}", path.display()));
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

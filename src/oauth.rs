//! `[smtp.oauth2]`: the access token for AUTH XOAUTH2, got with the OAuth2 refresh-token grant
//! (RFC 6749 §6) from the provider's token endpoint, cached until shortly before it expires.
//!
//! What it does not do: the SMTP side (`deliver` sends the token and decides to ask for a fresh
//! one when the server refuses a cached one), and the one-time consent that yields the first
//! refresh token (docs/providers.md shows the admin how).
//!
//! Invariants:
//! - the client secret, the refresh token and the access tokens are [`Secret`]s: no log line or
//!   error text carries them (an error names the endpoint, the HTTP outcome and the provider's
//!   `error` code, never a response body that could hold a token);
//! - the refresh token is read from `refresh_token_file` at each refresh, so an admin can put a
//!   new one there without a restart; a rotated one the provider returns is written back by
//!   atomic replace (a temporary file in the same directory, same mode, fsync, rename, fsync of
//!   the directory) before the new access token is used, under an exclusive lock on
//!   `<refresh_token_file>.lock`, so two processes (the daemon and a `test-send`) never refresh
//!   with a token the other has just rotated away;
//! - one refresh at a time per process; callers wait for it and share its token.

use crate::config::{OAuth2Config, Secret};
use oauth2::basic::{BasicClient, BasicErrorResponseType};
use oauth2::{AuthType, ClientId, ClientSecret, RefreshToken, RequestTokenError, Scope, TokenUrl};
use oauth2::{EndpointNotSet, EndpointSet, TokenResponse};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long before its expiry a cached access token is no longer used: a tenth of its lifetime,
/// at most five minutes (Google and Microsoft issue tokens for an hour, so five minutes).
const MAX_MARGIN: Duration = Duration::from_secs(300);

/// The lifetime assumed when the endpoint does not say (`expires_in` is only RECOMMENDED).
const DEFAULT_LIFETIME: Duration = Duration::from_secs(300);

type Client =
    BasicClient<EndpointNotSet, EndpointNotSet, EndpointNotSet, EndpointNotSet, EndpointSet>;

/// Gets and caches access tokens for one account.
pub struct TokenSource {
    /// The settings, as validated by `config`.
    cfg: OAuth2Config,
    /// The oauth2 crate's client (client id and secret, token URL, secret in the request body).
    client: Client,
    /// HTTP with our rustls (ring) config, no redirects (the request carries the refresh token),
    /// no proxy from the environment, a timeout on the whole request.
    http: reqwest::Client,
    /// The current access token and when to stop using it; the lock also makes one refresh at
    /// a time.
    cache: tokio::sync::Mutex<Option<(Secret, Instant)>>,
}

/// An access token, and whether it came from the cache (a refused cached token is worth one
/// retry with a fresh one; a refused fresh one is not).
pub struct Token {
    /// The access token.
    pub secret: Secret,
    /// Whether it was cached rather than just issued.
    pub cached: bool,
}

/// Why no access token could be had. Its `Display` is the admin's detail: it never holds a
/// token or a response body.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TokenError {
    /// The endpoint refused the request with an OAuth2 error (`invalid_grant`: the refresh
    /// token expired or was revoked; `invalid_client`: wrong client id or secret).
    #[error("the token endpoint {url} refused the request: {code}{}", description.as_ref().map(|d| format!(" ({d})")).unwrap_or_default())]
    Refused {
        /// The token endpoint.
        url: String,
        /// The OAuth2 `error` code.
        code: String,
        /// The provider's `error_description`, if any.
        description: Option<String>,
    },
    /// The endpoint could not be reached, or the request did not finish in time.
    #[error("the token endpoint {url} could not be reached: {detail}")]
    Unreachable {
        /// The token endpoint.
        url: String,
        /// What went wrong (no secrets).
        detail: String,
    },
    /// The endpoint answered something that is not a token response.
    #[error("the token endpoint {url} gave an answer that is not a token: {detail}")]
    BadAnswer {
        /// The token endpoint.
        url: String,
        /// What was wrong with it (no body: it may hold a token).
        detail: String,
    },
    /// The refresh token file could not be read or locked.
    #[error("{0}")]
    File(String),
}

impl TokenSource {
    /// Builds the source; `timeout` bounds each token request, `ca_file` replaces the public
    /// roots (as for SMTP).
    pub fn new(
        cfg: &OAuth2Config,
        timeout: Duration,
        ca_file: Option<&Path>,
    ) -> Result<TokenSource, String> {
        let tls = crate::net::client_config(ca_file)?;
        let http = reqwest::Client::builder()
            .use_preconfigured_tls((*tls).clone())
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .timeout(timeout)
            .connect_timeout(timeout)
            .build()
            .map_err(|e| format!("cannot set up the HTTP client for smtp.oauth2: {e}"))?;
        let token_url = TokenUrl::new(cfg.token_url.clone())
            .map_err(|e| format!("smtp.oauth2.token_url: {e}"))?;
        let mut client = BasicClient::new(ClientId::new(cfg.client_id.clone()))
            .set_token_uri(token_url)
            // In the form body, as both Google's and Microsoft's documentation show it.
            .set_auth_type(AuthType::RequestBody);
        if let Some(s) = &cfg.client_secret {
            client = client.set_client_secret(ClientSecret::new(s.reveal().to_string()));
        }
        Ok(TokenSource {
            cfg: cfg.clone(),
            client,
            http,
            cache: tokio::sync::Mutex::new(None),
        })
    }

    /// The cached access token while it is good, else a fresh one.
    pub async fn token(&self) -> Result<Token, TokenError> {
        self.get(true).await
    }

    /// A fresh access token (after the server refused the cached one, which is forgotten even
    /// if no new one can be had).
    pub async fn fresh(&self) -> Result<Token, TokenError> {
        self.get(false).await
    }

    async fn get(&self, cached_ok: bool) -> Result<Token, TokenError> {
        let mut cache = self.cache.lock().await;
        match cache.as_ref() {
            Some((t, good_until)) if cached_ok && Instant::now() < *good_until => {
                return Ok(Token {
                    secret: t.clone(),
                    cached: true,
                })
            }
            _ => *cache = None,
        }
        let (t, good_until) = self.refresh_locked().await?;
        *cache = Some((t.clone(), good_until));
        Ok(Token {
            secret: t,
            cached: false,
        })
    }

    /// One refresh-token grant, under the file lock; writes a rotated refresh token back.
    async fn refresh_locked(&self) -> Result<(Secret, Instant), TokenError> {
        let path = self.cfg.refresh_token_file.clone();
        let (lock, refresh) = tokio::task::spawn_blocking(move || lock_and_read(&path))
            .await
            .map_err(|e| TokenError::File(format!("reading the refresh token failed: {e}")))??;
        let url = self.cfg.token_url.clone();
        let started = Instant::now();
        let result = self
            .client
            .exchange_refresh_token(&RefreshToken::new(refresh.reveal().to_string()))
            .add_scopes(self.cfg.scope.iter().map(|s| Scope::new(s.clone())))
            .request_async(&self.http)
            .await;
        let response = match result {
            Ok(r) => r,
            Err(e) => {
                let err = token_error(&url, e);
                tracing::warn!(token_url = %url, error = %err, "Could not get an OAuth2 access token.");
                return Err(err);
            }
        };
        let lifetime = response.expires_in().unwrap_or(DEFAULT_LIFETIME);
        let margin = (lifetime / 10).min(MAX_MARGIN);
        let good_until = started + lifetime.saturating_sub(margin);
        let rotated = response
            .refresh_token()
            .map(|r| r.secret().clone())
            .filter(|r| !r.is_empty() && r != refresh.reveal());
        if let Some(new) = rotated {
            let path = self.cfg.refresh_token_file.clone();
            let written = tokio::task::spawn_blocking(move || write_back(&path, &new))
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r);
            match written {
                Ok(()) => tracing::info!(
                    file = %self.cfg.refresh_token_file.display(),
                    "The provider rotated the OAuth2 refresh token; the new one was saved."
                ),
                // The new access token is good; the old refresh token may still work (Microsoft
                // keeps it valid), so the mail goes on, but the admin must know.
                Err(e) => tracing::error!(
                    file = %self.cfg.refresh_token_file.display(),
                    error = %e,
                    "The provider rotated the OAuth2 refresh token but the new one could not be saved; the next refresh uses the old one, which the provider may refuse. Make the file and its directory writable for the daemon."
                ),
            }
        }
        drop(lock);
        tracing::debug!(
            token_url = %url,
            expires_in_s = lifetime.as_secs(),
            "Got an OAuth2 access token."
        );
        Ok((
            Secret::new(response.access_token().secret().clone()),
            good_until,
        ))
    }
}

/// Turns the oauth2 crate's error into ours, keeping bodies (which may hold tokens) out.
fn token_error(
    url: &str,
    e: RequestTokenError<
        oauth2::HttpClientError<reqwest::Error>,
        oauth2::StandardErrorResponse<BasicErrorResponseType>,
    >,
) -> TokenError {
    let url = url.to_string();
    match e {
        RequestTokenError::ServerResponse(r) => TokenError::Refused {
            url,
            code: r.error().as_ref().to_string(),
            description: r
                .error_description()
                .map(|d| d.chars().filter(|c| !c.is_control()).take(300).collect()),
        },
        RequestTokenError::Request(e) => {
            // reqwest's chain repeats the URL at each level; its innermost error says what
            // happened ("Connection refused", "operation timed out", a certificate problem).
            let mut detail = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                detail = s.to_string();
                src = s.source();
            }
            TokenError::Unreachable { url, detail }
        }
        // The body is left out: a 200 answer that did not parse holds the access token.
        RequestTokenError::Parse(e, _) => TokenError::BadAnswer {
            url,
            detail: format!(
                "not the JSON of a token response or an OAuth2 error ({})",
                e.path()
            ),
        },
        RequestTokenError::Other(d) => TokenError::BadAnswer { url, detail: d },
    }
}

/// Takes the refresh lock (waiting for another process's refresh) and reads the refresh token.
fn lock_and_read(path: &Path) -> Result<(std::fs::File, Secret), TokenError> {
    let lock_path = PathBuf::from(format!("{}.lock", path.display()));
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| {
            TokenError::File(format!(
                "cannot open the lock file {}: {e} (the daemon must be able to write in the refresh token's directory)",
                lock_path.display()
            ))
        })?;
    lock.lock()
        .map_err(|e| TokenError::File(format!("cannot lock {}: {e}", lock_path.display())))?;
    let token = crate::config::read_secret_file(path)
        .map_err(|e| TokenError::File(format!("smtp.oauth2.refresh_token_file: {e}")))?;
    let token = token.trim().to_string();
    if token.is_empty() {
        return Err(TokenError::File(format!(
            "smtp.oauth2.refresh_token_file: {} is empty",
            path.display()
        )));
    }
    Ok((lock, Secret::new(token)))
}

/// Replaces the refresh token file atomically, keeping its mode and (where allowed) its owner.
fn write_back(path: &Path, token: &str) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
    let meta =
        std::fs::metadata(path).map_err(|e| format!("cannot stat {}: {e}", path.display()))?;
    let mode = meta.permissions().mode() & 0o777;
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            // Owner-only from the start; the original mode is set below.
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| format!("cannot create {}: {e}", tmp.display()))?;
        f.set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(|e| format!("cannot set the mode of {}: {e}", tmp.display()))?;
        // Only root may give a file away; as the owner already, this is a no-op.
        let _ = std::os::unix::fs::fchown(&f, Some(meta.uid()), Some(meta.gid()));
        f.write_all(format!("{token}\n").as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
        std::fs::rename(&tmp, path)
            .map_err(|e| format!("cannot replace {}: {e}", path.display()))?;
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn write_back_replaces_the_file_and_keeps_its_mode() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("refresh");
        std::fs::write(&f, "old\n").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o640)).unwrap();
        let before = std::fs::metadata(&f).unwrap();
        write_back(&f, "new-token").unwrap();
        assert_eq!(std::fs::read_to_string(&f).unwrap(), "new-token\n");
        let after = std::fs::metadata(&f).unwrap();
        assert_eq!(after.permissions().mode() & 0o777, 0o640);
        use std::os::unix::fs::MetadataExt;
        assert_ne!(
            before.ino(),
            after.ino(),
            "replaced, not rewritten in place"
        );
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(left.len(), 1, "no temporary file left behind");
    }

    #[test]
    fn a_failed_write_back_keeps_the_old_token() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("refresh");
        std::fs::write(&f, "old\n").unwrap();
        // Something in the way of the temporary file (even root cannot create over it).
        std::fs::create_dir(
            dir.path()
                .join(format!(".refresh.{}.tmp", std::process::id())),
        )
        .unwrap();
        let e = write_back(&f, "new").unwrap_err();
        assert!(e.contains("cannot create"), "{e}");
        assert_eq!(std::fs::read_to_string(&f).unwrap(), "old\n");
    }
}

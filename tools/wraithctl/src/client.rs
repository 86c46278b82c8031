//! The node's API as wraithctl reaches it: bearer token, JSON, and failures sorted into
//! what an operator can act on (node down, token wrong, state moved on, request refused).

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use ureq::unversioned::resolver::DefaultResolver;
use ureq::Agent;

use crate::unix::UnixConnector;

/// Largest response read (a 100,000-exit configuration is about 15 MB of JSON).
const RESPONSE_LIMIT: u64 = 512 << 20;

/// What kind of failure ended a command; each has its own exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The node refused the request (4xx/5xx other than the ones below) or answered
    /// something unexpected, or the input was unusable.
    Refused,
    /// No connection to the node.
    Unreachable,
    /// The token file could not be read, or the node refused the token or request (401/403).
    Auth,
    /// `If-Match` named a generation that is no longer current (412).
    Stale,
}

impl FailureKind {
    pub fn exit_code(self) -> i32 {
        match self {
            FailureKind::Refused => 1,
            FailureKind::Unreachable => 3,
            FailureKind::Auth => 4,
            FailureKind::Stale => 5,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Refused => "refused",
            FailureKind::Unreachable => "unreachable",
            FailureKind::Auth => "auth",
            FailureKind::Stale => "stale",
        }
    }
}

/// A failure with the HTTP status it came with, if any.
#[derive(Debug)]
pub struct Failure {
    pub kind: FailureKind,
    pub status: Option<u16>,
    pub message: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Failure {}

impl Failure {
    pub fn new(kind: FailureKind, message: impl Into<String>) -> Self {
        Failure {
            kind,
            status: None,
            message: message.into(),
        }
    }
}

/// Where the node's API is.
#[derive(Debug, Clone)]
pub enum Endpoint {
    /// `http://host:port`, without a trailing slash.
    Tcp(String),
    /// The node's `api_socket`.
    Unix(PathBuf),
}

impl Endpoint {
    /// Takes `--url` as given; a bare `host:port` means `http://host:port`. `https://` is
    /// for a node that serves its API over TLS (`[control] api_tls`).
    pub fn from_url(url: &str) -> Result<Endpoint, Failure> {
        let url = url.trim().trim_end_matches('/');
        let full = if url.contains("://") {
            url.to_owned()
        } else {
            format!("http://{url}")
        };
        match full.parse::<ureq::http::Uri>() {
            Ok(u) if matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some() => {
                Ok(Endpoint::Tcp(full))
            }
            _ => Err(Failure::new(
                FailureKind::Refused,
                format!("--url {url:?} is not an http://host:port or https://host:port address"),
            )),
        }
    }

    fn base(&self) -> &str {
        match self {
            Endpoint::Tcp(url) => url,
            // The connector ignores the host; an IP literal spares a name lookup.
            Endpoint::Unix(_) => "http://127.0.0.1",
        }
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Tcp(url) => f.write_str(url),
            Endpoint::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// A successful answer.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub etag: Option<String>,
    pub body: String,
}

impl Reply {
    pub fn json(&self) -> Result<Value, Failure> {
        serde_json::from_str(&self.body).map_err(|e| {
            Failure::new(
                FailureKind::Refused,
                format!(
                    "the node answered HTTP {} with a body that is not JSON ({e})",
                    self.status
                ),
            )
        })
    }
}

/// A connection to one node's API.
#[derive(Debug)]
pub struct Client {
    agent: Agent,
    endpoint: Endpoint,
    token: String,
    token_file: PathBuf,
}

impl Client {
    /// `ca_file`: the certificate (PEM) an `https://` node must present, or the CA that
    /// signed it; the node's own self-signed `api.crt` pins that very certificate.
    pub fn new(
        endpoint: Endpoint,
        token_file: &Path,
        timeout: Duration,
        ca_file: Option<&Path>,
    ) -> Result<Self, Failure> {
        let token = read_token(token_file)?;
        let mut tls = ureq::tls::TlsConfig::builder();
        if let Some(path) = ca_file {
            let refused = |why: String| {
                Failure::new(
                    FailureKind::Refused,
                    format!("--ca-file {}: {why}", path.display()),
                )
            };
            let pem = std::fs::read(path).map_err(|e| refused(e.to_string()))?;
            let cert = ureq::tls::Certificate::from_pem(&pem)
                .map_err(|e| refused(format!("no PEM certificate ({e})")))?;
            tls = tls.root_certs(ureq::tls::RootCerts::Specific(std::sync::Arc::new(vec![
                cert,
            ])));
        }
        let config = Agent::config_builder()
            .tls_config(tls.build())
            // 4xx/5xx carry the node's explanation: read them rather than fail early.
            .http_status_as_error(false)
            // The API is local: never send it (or its token) through a proxy.
            .proxy(None)
            .max_redirects(0)
            .max_redirects_will_error(false)
            .timeout_global(Some(timeout))
            .user_agent(concat!("wraithctl/", env!("CARGO_PKG_VERSION")))
            .build();
        let agent = match &endpoint {
            Endpoint::Tcp(_) => config.new_agent(),
            Endpoint::Unix(path) => Agent::with_parts(
                config,
                UnixConnector { path: path.clone() },
                DefaultResolver::default(),
            ),
        };
        Ok(Client {
            agent,
            endpoint,
            token,
            token_file: token_file.to_owned(),
        })
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    pub fn get(&self, path: &str) -> Result<Reply, Failure> {
        let url = self.url(path);
        let r = self
            .agent
            .get(&url)
            .header("Authorization", self.bearer())
            .call();
        self.finish(r)
    }

    pub fn delete(&self, path: &str) -> Result<Reply, Failure> {
        let url = self.url(path);
        let r = self
            .agent
            .delete(&url)
            .header("Authorization", self.bearer())
            .call();
        self.finish(r)
    }

    pub fn post_json(&self, path: &str, body: &Value) -> Result<Reply, Failure> {
        let url = self.url(path);
        let body = body.to_string();
        let r = self
            .agent
            .post(&url)
            .header("Authorization", self.bearer())
            .content_type("application/json")
            .send(body.as_bytes());
        self.finish(r)
    }

    /// `PATCH` with a JSON body.
    pub fn patch_json(&self, path: &str, body: &Value) -> Result<Reply, Failure> {
        let url = self.url(path);
        let body = body.to_string();
        let r = self
            .agent
            .patch(&url)
            .header("Authorization", self.bearer())
            .content_type("application/json")
            .send(body.as_bytes());
        self.finish(r)
    }

    /// `PUT` with `If-Match: "<generation>"`.
    pub fn put_json(&self, path: &str, body: &[u8], generation: u64) -> Result<Reply, Failure> {
        let url = self.url(path);
        let r = self
            .agent
            .put(&url)
            .header("Authorization", self.bearer())
            .header("If-Match", format!("\"{generation}\""))
            .content_type("application/json")
            .send(body);
        self.finish(r)
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.endpoint.base())
    }

    fn bearer(&self) -> String {
        format!("Bearer {}", self.token)
    }

    fn finish(
        &self,
        result: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<Reply, Failure> {
        let mut resp = result.map_err(|e| self.transport_failure(e))?;
        let status = resp.status().as_u16();
        let etag = resp
            .headers()
            .get("etag")
            .and_then(|v| v.to_str().ok())
            .map(|v| v.trim_matches('"').to_owned());
        let body = resp
            .body_mut()
            .with_config()
            .limit(RESPONSE_LIMIT)
            .read_to_string()
            .map_err(|e| self.transport_failure(e))?;
        if (200..300).contains(&status) {
            return Ok(Reply { status, etag, body });
        }
        Err(self.status_failure(status, &body))
    }

    fn status_failure(&self, status: u16, body: &str) -> Failure {
        let said = serde_json::from_str::<Value>(body)
            .ok()
            .and_then(|v| v.get("error").and_then(Value::as_str).map(str::to_owned))
            .unwrap_or_else(|| {
                let text = body.trim();
                if text.is_empty() {
                    "no explanation given".to_owned()
                } else {
                    text.chars().take(300).collect()
                }
            });
        let reason = ureq::http::StatusCode::from_u16(status)
            .ok()
            .and_then(|s| s.canonical_reason())
            .unwrap_or("");
        let (kind, message) = match status {
            401 => (
                FailureKind::Auth,
                format!(
                    "the node at {} refused the token in {}: {said} (HTTP 401) — is that the token file of this node? (--token-file or WRAITHCTL_TOKEN_FILE)",
                    self.endpoint,
                    self.token_file.display()
                ),
            ),
            403 => (
                FailureKind::Auth,
                format!("the node refused the request: {said} (HTTP 403 {reason})"),
            ),
            412 => (
                FailureKind::Stale,
                format!("{said} (HTTP 412 {reason})"),
            ),
            _ => (
                FailureKind::Refused,
                format!("the node refused: {said} (HTTP {status} {reason})"),
            ),
        };
        Failure {
            kind,
            status: Some(status),
            message,
        }
    }

    fn transport_failure(&self, e: ureq::Error) -> Failure {
        let hint = match &self.endpoint {
            Endpoint::Tcp(_) => "is wraithgate running? is --url right?".to_owned(),
            Endpoint::Unix(p) => format!(
                "is wraithgate running with [control] api_socket = {:?}? is --socket right?",
                p.display().to_string()
            ),
        };
        let (kind, what) = match &e {
            ureq::Error::Io(io) => match io.kind() {
                io::ErrorKind::ConnectionRefused => (FailureKind::Unreachable, "connection refused".to_owned()),
                io::ErrorKind::NotFound => (FailureKind::Unreachable, "no such socket".to_owned()),
                io::ErrorKind::PermissionDenied => (
                    FailureKind::Unreachable,
                    "permission denied (the socket is mode 0600: run as root or as the node's user)".to_owned(),
                ),
                io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionAborted
                | io::ErrorKind::BrokenPipe
                | io::ErrorKind::UnexpectedEof => (
                    FailureKind::Unreachable,
                    format!("the connection broke ({})", plain_io(io)),
                ),
                _ => (FailureKind::Unreachable, plain_io(io)),
            },
            ureq::Error::Timeout(t) => (FailureKind::Unreachable, format!("timed out ({t})")),
            ureq::Error::HostNotFound => (FailureKind::Unreachable, "host not found".to_owned()),
            ureq::Error::ConnectionFailed => (FailureKind::Unreachable, "connection failed".to_owned()),
            ureq::Error::BodyExceedsLimit(n) => (
                FailureKind::Refused,
                format!("the answer is larger than {n} bytes"),
            ),
            other => (FailureKind::Refused, other.to_string()),
        };
        let message = if kind == FailureKind::Unreachable {
            format!(
                "cannot reach the node at {}: {what} — {hint}",
                self.endpoint
            )
        } else {
            format!("talking to the node at {}: {what}", self.endpoint)
        };
        Failure::new(kind, message)
    }
}

/// An io error as a phrase: no "(os error N)", no capital.
fn plain_io(e: &io::Error) -> String {
    let s = e.to_string();
    let s = s.find(" (os error").map_or(s.as_str(), |i| &s[..i]);
    let mut chars = s.chars();
    chars.next().map_or(String::new(), |c| {
        c.to_lowercase().chain(chars).collect::<String>()
    })
}

/// Reads the bearer token, explaining what to do when that fails.
pub fn read_token(path: &Path) -> Result<String, Failure> {
    let shown = path.display();
    match std::fs::read_to_string(path) {
        Ok(t) if !t.trim().is_empty() => Ok(t.trim().to_owned()),
        Ok(_) => Err(Failure::new(
            FailureKind::Auth,
            format!("the token file {shown} is empty; the node writes it on its first start (remove it and restart the node to get a new one)"),
        )),
        Err(e) => {
            let hint = match e.kind() {
                io::ErrorKind::PermissionDenied => {
                    "it is readable by the node's user only (mode 0600): run wraithctl as root (sudo) or as that user".to_owned()
                }
                io::ErrorKind::NotFound => "the node creates <state_dir>/api.token on its first start; is wraithgate running with this state directory? point --token-file (or WRAITHCTL_TOKEN_FILE) at it".to_owned(),
                _ => "point --token-file (or WRAITHCTL_TOKEN_FILE) at the node's token file".to_owned(),
            };
            Err(Failure::new(
                FailureKind::Auth,
                format!("cannot read the API token file {shown}: {} — {hint}", plain_io(&e)),
            ))
        }
    }
}

//! The operator API: a thin axum sidecar on a thread and runtime of its own.
//!
//! `GET /healthz` is open; everything else needs `Authorization: Bearer <token>`, the token
//! read from a file the node creates (mode 0600) on first start. Requests carrying
//! `Origin` or `Referer` are refused, so a browser page cannot drive the API. Reads are
//! GET; changes are POST, PUT and DELETE, each validated, persisted, then published.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path as UrlPath, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use axum::{Json, Router};
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::json;
use wraithgate_relay::router::{SessionSlot, Traffic};
use wraithgate_relay::table::ExitSpec;
use wraithgate_relay::PublicKey;

use crate::config::ControlSection;
use crate::metrics;
use crate::node::{ChangeError, Control};
use crate::state::{DesiredState, IpNet, PeerSpec, PresharedKey};

/// Largest request body, but for `PUT /v1/config`.
const BODY_LIMIT: usize = 64 * 1024;
/// Largest `PUT /v1/config` body (a 100,000-exit table is about 15 MB of JSON).
const CONFIG_BODY_LIMIT: usize = 64 * 1024 * 1024;
/// How long a listing waits for each worker.
const WORKER_TIMEOUT: Duration = Duration::from_secs(1);

/// The running sidecar.
#[derive(Debug)]
pub struct Sidecar {
    thread: Option<std::thread::JoinHandle<()>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    pub local_addr: Option<SocketAddr>,
}

impl Sidecar {
    /// Stops serving and waits for the thread.
    pub fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[derive(Clone)]
struct App {
    control: Arc<Control>,
    token: Arc<str>,
}

/// Reads the API token, creating it (mode 0600, 32 random bytes, hex) if missing.
pub fn load_or_create_token(path: &Path) -> Result<String> {
    match std::fs::read_to_string(path) {
        Ok(t) if !t.trim().is_empty() => return Ok(t.trim().to_owned()),
        Ok(_) => anyhow::bail!(
            "token file {} is empty; remove it to get a new token",
            path.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading token file {}", path.display())),
    }
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let token: String = rand::random::<[u8; 32]>()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating token file {}", path.display()))?;
    f.write_all(token.as_bytes())?;
    f.sync_all()?;
    tracing::info!(path = %path.display(), "created a new API token");
    Ok(token)
}

/// Binds the API and serves it on its own thread.
pub fn start(control: Arc<Control>, cfg: &ControlSection, token_path: &Path) -> Result<Sidecar> {
    let token = load_or_create_token(token_path)?;
    let tcp = match cfg.api_listen {
        Some(addr) => {
            let l = std::net::TcpListener::bind(addr)
                .with_context(|| format!("binding the operator API on {addr}"))?;
            l.set_nonblocking(true)?;
            Some(l)
        }
        None => None,
    };
    let unix = match &cfg.api_socket {
        Some(path) => Some(bind_unix(path)?),
        None => None,
    };
    let local_addr = tcp.as_ref().and_then(|l| l.local_addr().ok());
    let dp = control.dp.clone();
    let app = router(App {
        control,
        token: token.into(),
    });
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("wg-sidecar".into())
        .spawn(move || {
            // Changes are validated and persisted on this thread and the writer it starts.
            let placement = dp.settle_control_thread();
            tracing::info!(%placement, "operator API and state writer threads");
            let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(error = %e, "operator API runtime failed; forwarding continues");
                    return;
                }
            };
            rt.block_on(serve(app, tcp, unix, stop_rx));
        })
        .context("starting the sidecar thread")?;
    tracing::info!(api = ?local_addr, token_file = %token_path.display(), "operator API listening");
    Ok(Sidecar {
        thread: Some(thread),
        stop: Some(stop_tx),
        local_addr,
    })
}

fn bind_unix(path: &Path) -> Result<std::os::unix::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt as _;
    let _ = std::fs::remove_file(path);
    let l = std::os::unix::net::UnixListener::bind(path)
        .with_context(|| format!("binding the operator API on {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    l.set_nonblocking(true)?;
    Ok(l)
}

async fn serve(
    app: Router,
    tcp: Option<std::net::TcpListener>,
    unix: Option<std::os::unix::net::UnixListener>,
    stop: tokio::sync::oneshot::Receiver<()>,
) {
    let (stop_all, _) = tokio::sync::broadcast::channel::<()>(1);
    let mut tasks = Vec::new();
    if let Some(l) = tcp {
        match tokio::net::TcpListener::from_std(l) {
            Ok(l) => {
                let mut rx = stop_all.subscribe();
                let app = app.clone();
                tasks.push(tokio::spawn(async move {
                    let r = axum::serve(l, app)
                        .with_graceful_shutdown(async move {
                            let _ = rx.recv().await;
                        })
                        .await;
                    if let Err(e) = r {
                        tracing::error!(error = %e, "operator API (tcp) stopped");
                    }
                }));
            }
            Err(e) => tracing::error!(error = %e, "operator API (tcp) not served"),
        }
    }
    if let Some(l) = unix {
        match tokio::net::UnixListener::from_std(l) {
            Ok(l) => {
                let mut rx = stop_all.subscribe();
                tasks.push(tokio::spawn(async move {
                    let r = axum::serve(l, app)
                        .with_graceful_shutdown(async move {
                            let _ = rx.recv().await;
                        })
                        .await;
                    if let Err(e) = r {
                        tracing::error!(error = %e, "operator API (unix) stopped");
                    }
                }));
            }
            Err(e) => tracing::error!(error = %e, "operator API (unix) not served"),
        }
    }
    let _ = stop.await;
    let _ = stop_all.send(());
    // Graceful shutdown waits for open connections; an idle keep-alive connection (a
    // metrics scraper) would hold it forever, and with it the node's stop. Give requests
    // in flight a moment, then cut the rest.
    let drain = async {
        for t in &mut tasks {
            let _ = t.await;
        }
    };
    if tokio::time::timeout(SHUTDOWN_GRACE, drain).await.is_err() {
        tracing::info!("operator API: closing connections still open");
        for t in &tasks {
            t.abort();
        }
    }
}

/// How long a stopping sidecar waits for open connections.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(500);

/// Every path the API serves with its methods: the router is built from this list (a
/// path missing here is not served) and the OpenAPI document is checked against it.
pub const ROUTES: &[(&str, &[&str])] = &[
    ("/healthz", &["GET"]),
    ("/metrics", &["GET"]),
    ("/v1/openapi.json", &["GET"]),
    ("/v1/node", &["GET"]),
    ("/v1/exits", &["GET", "POST"]),
    ("/v1/exits/{key}", &["DELETE"]),
    ("/v1/peers", &["GET", "POST"]),
    ("/v1/peers/{key}", &["DELETE"]),
    ("/v1/config", &["GET", "PUT"]),
    ("/v1/sessions", &["GET"]),
    ("/v1/sessions/{id}", &["DELETE"]),
];

/// The handlers of one of [`ROUTES`]' paths.
fn handlers(path: &str) -> axum::routing::MethodRouter<App> {
    match path {
        "/healthz" => get(healthz),
        "/metrics" => get(get_metrics),
        "/v1/openapi.json" => get(openapi),
        "/v1/node" => get(node_info),
        "/v1/exits" => get(list_exits).post(add_exit),
        "/v1/exits/{key}" => delete(remove_exit),
        "/v1/peers" => get(list_peers).post(add_peer),
        "/v1/peers/{key}" => delete(remove_peer),
        "/v1/config" => get(get_config)
            .put(put_config)
            .layer(DefaultBodyLimit::max(CONFIG_BODY_LIMIT)),
        "/v1/sessions" => get(list_sessions),
        "/v1/sessions/{id}" => delete(kill_session),
        // Serves no method: the API test that probes every route finds it.
        _ => axum::routing::MethodRouter::new(),
    }
}

/// The methods [`ROUTES`] serves on `path` (a concrete path: `{key}` matches any segment).
fn route_methods(path: &str) -> Option<&'static [&'static str]> {
    let segments: Vec<&str> = path.split('/').collect();
    ROUTES.iter().find_map(|(route, methods)| {
        let pattern: Vec<&str> = route.split('/').collect();
        let matches = pattern.len() == segments.len()
            && pattern
                .iter()
                .zip(&segments)
                .all(|(p, s)| p == s || (p.starts_with('{') && !s.is_empty()));
        matches.then_some(*methods)
    })
}

/// The largest body `path` takes.
fn body_limit(path: &str) -> usize {
    if path == "/v1/config" {
        CONFIG_BODY_LIMIT
    } else {
        BODY_LIMIT
    }
}

fn router(app: App) -> Router {
    ROUTES
        .iter()
        .fold(Router::new(), |r, (path, _)| r.route(path, handlers(path)))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(middleware::from_fn(json_rejections))
        .layer(middleware::from_fn_with_state(app.clone(), guard))
        .with_state(app)
}

/// Gives the refusals axum makes itself (wrong method, body too large, and any other
/// without a JSON body) the `{"error": ...}` shape of the API's own.
async fn json_rejections(req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let r = next.run(req).await;
    let status = r.status();
    let is_json = r
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return r;
    }
    let mut allow = r.headers().get(header::ALLOW).cloned();
    let message = match status {
        StatusCode::METHOD_NOT_ALLOWED => {
            let methods = route_methods(&path).map(|m| m.join(", "));
            if let Some(m) = methods
                .as_deref()
                .and_then(|m| HeaderValue::from_str(m).ok())
            {
                allow = Some(m);
            }
            format!(
                "{method} is not allowed on {path}; allowed: {}",
                methods.as_deref().unwrap_or("see /v1/openapi.json")
            )
        }
        StatusCode::PAYLOAD_TOO_LARGE => format!(
            "request body larger than {} bytes, the limit for {path}",
            body_limit(&path)
        ),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => {
            "unsupported content type: send application/json".to_owned()
        }
        _ => {
            let body = axum::body::to_bytes(r.into_body(), BODY_LIMIT)
                .await
                .unwrap_or_default();
            let text = String::from_utf8_lossy(&body).trim().to_owned();
            if text.is_empty() {
                status.canonical_reason().unwrap_or("error").to_owned()
            } else {
                text
            }
        }
    };
    let mut out = ApiError(status, message).into_response();
    if let Some(v) = allow {
        out.headers_mut().insert(header::ALLOW, v);
    }
    out
}

/// An error answer: a status and a message, as `{"error": "..."}`.
#[derive(Debug)]
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

impl From<ChangeError> for ApiError {
    fn from(e: ChangeError) -> Self {
        let status = match &e {
            ChangeError::Invalid(crate::state::StateError::Table(
                wraithgate_relay::table::TableError::DuplicateKey { .. }
                | wraithgate_relay::table::TableError::DuplicatePort { .. }
                | wraithgate_relay::table::TableError::DuplicateName { .. },
            ))
            | ChangeError::Invalid(crate::state::StateError::Table(
                wraithgate_relay::table::TableError::DuplicatePeer { .. }
                | wraithgate_relay::table::TableError::PeerIsExit { .. },
            ))
            | ChangeError::Conflict(_) => StatusCode::CONFLICT,
            ChangeError::Invalid(_) => StatusCode::BAD_REQUEST,
            ChangeError::NotFound(_) => StatusCode::NOT_FOUND,
            ChangeError::Stale { .. } => StatusCode::PRECONDITION_FAILED,
            ChangeError::Persist { .. } | ChangeError::NotDurable { .. } => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        ApiError(status, e.to_string())
    }
}

fn bad_request(msg: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, msg.into())
}

async fn guard(State(app): State<App>, req: Request, next: Next) -> Response {
    let h = req.headers();
    if h.contains_key(header::ORIGIN) || h.contains_key(header::REFERER) {
        return ApiError(
            StatusCode::FORBIDDEN,
            "requests carrying Origin or Referer are refused: the API is not for browsers".into(),
        )
        .into_response();
    }
    if req.uri().path() == "/healthz" {
        return next.run(req).await;
    }
    let presented = h
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match presented {
        Some(t) if constant_time_eq(t.trim().as_bytes(), app.token.as_bytes()) => {
            next.run(req).await
        }
        Some(_) => unauthorized("wrong token"),
        None => unauthorized(
            "missing Authorization: Bearer <token> (the token is in the node's token file)",
        ),
    }
}

fn unauthorized(msg: &str) -> Response {
    let mut r = ApiError(StatusCode::UNAUTHORIZED, msg.into()).into_response();
    r.headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    r
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, String> {
    serde_json::from_slice(body).map_err(|e| format!("invalid request body: {e}"))
}

/// The request bodies the API takes, parsed exactly as its handlers parse them.
///
/// Public so that the fuzz targets (crate `wraithgate-fuzzing`) run the handlers' own
/// code; nothing else should need it. An error is the message the API answers with, under
/// 400 Bad Request.
pub mod body {
    use wraithgate_relay::table::ExitSpec;

    use super::{parse_json, ConfigBody, ExitBody, WholeState};
    use crate::state::{DesiredState, PeerSpec};

    /// `POST /v1/exits`.
    pub fn exit(body: &[u8]) -> Result<ExitSpec, String> {
        let e: ExitBody = parse_json(body)?;
        Ok(ExitSpec {
            name: e.name,
            public_key: e.public_key,
            endpoint: e.endpoint,
            listen_port: e.listen_port,
        })
    }

    /// `POST /v1/peers`.
    pub fn peer(body: &[u8]) -> Result<PeerSpec, String> {
        parse_json(body)
    }

    /// `PUT /v1/config`: the new exits and peers. A peer that leaves `preshared_key` out
    /// keeps the one the node holds for its key, so it is resolved against the node's
    /// state ([`WholeState::resolve`]).
    pub fn whole_state(body: &[u8]) -> Result<WholeState, String> {
        let c: ConfigBody = parse_json(body)?;
        Ok(WholeState {
            exits: c.exits,
            peers: c.peers,
        })
    }

    /// `PUT /v1/config` sent to a node with no peers, as a state of generation 0 (the
    /// node assigns generations).
    pub fn config(body: &[u8]) -> Result<DesiredState, String> {
        Ok(whole_state(body)?.resolve(&DesiredState::default()))
    }
}

/// A whole state as `PUT /v1/config` takes it, before it meets the node's own.
///
/// `GET /v1/config` never shows preshared keys, so a state fetched, edited and put back
/// has none: a peer entry without `preshared_key` keeps the key stored for that peer, an
/// explicit `null` removes it, a key sets it.
#[derive(Debug)]
pub struct WholeState {
    exits: Vec<ExitSpec>,
    peers: Vec<PeerEntry>,
}

impl WholeState {
    /// The state this makes of `current`, as generation 0 (the node assigns generations).
    pub fn resolve(self, current: &DesiredState) -> DesiredState {
        let kept: std::collections::HashMap<PublicKey, &PresharedKey> = current
            .peers
            .iter()
            .filter_map(|p| p.preshared_key.as_ref().map(|k| (p.public_key, k)))
            .collect();
        let peers = self
            .peers
            .into_iter()
            .map(|p| PeerSpec {
                preshared_key: match p.preshared_key {
                    Some(given) => given,
                    None => kept.get(&p.public_key).map(|k| (*k).clone()),
                },
                public_key: p.public_key,
                name: p.name,
                allowed_ips: p.allowed_ips,
                allowed_exits: p.allowed_exits,
            })
            .collect();
        DesiredState {
            generation: 0,
            exits: self.exits,
            peers,
        }
    }
}

/// A peer in a whole state: [`PeerSpec`], but telling a left-out `preshared_key` (keep
/// the stored one) from `null` (remove it).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PeerEntry {
    public_key: PublicKey,
    #[serde(default)]
    name: String,
    allowed_ips: Vec<IpNet>,
    #[serde(default, deserialize_with = "present")]
    preshared_key: Option<Option<PresharedKey>>,
    #[serde(default)]
    allowed_exits: Vec<PublicKey>,
}

/// A field that is present, whatever its value (`null` included); absent is the default.
fn present<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(d).map(Some)
}

/// A key from a URL path: base64url (as in the API's paths) or standard base64.
fn key_from_path(s: &str) -> Result<PublicKey, ApiError> {
    use base64::engine::general_purpose::{STANDARD, URL_SAFE, URL_SAFE_NO_PAD};
    let bytes = URL_SAFE_NO_PAD
        .decode(s)
        .or_else(|_| URL_SAFE.decode(s))
        .or_else(|_| STANDARD.decode(s))
        .map_err(|_| bad_request(format!("{s:?} is not a base64url key")))?;
    let len = bytes.len();
    bytes
        .try_into()
        .map(PublicKey)
        .map_err(|_| bad_request(format!("a key is 32 bytes, {s:?} decodes to {len}")))
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn not_found() -> ApiError {
    ApiError(
        StatusCode::NOT_FOUND,
        "no such resource; see /v1/openapi.json".into(),
    )
}

async fn get_metrics(State(app): State<App>) -> Response {
    let body = metrics::render(&app.control);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

async fn node_info(State(app): State<App>) -> Json<serde_json::Value> {
    let c = &app.control;
    let reports = c.dp.reports();
    Json(json!({
        "public_key": c.node_public,
        "version": env!("CARGO_PKG_VERSION"),
        "backend": c.dp.backend(),
        "workers": c.dp.worker_count(),
        "listen": c.dp.local_addrs(),
        "generation": c.state().generation,
        "exits": c.dp.table().len(),
        "peers": c.dp.table().peer_count(),
        "sessions": reports.iter().map(|r| r.sessions).sum::<usize>(),
        "zhop_peers": reports.iter().map(|r| r.zhop.peers).sum::<u64>(),
        "uptime_secs": c.started.elapsed().as_secs(),
    }))
}

async fn openapi() -> Json<serde_json::Value> {
    Json(crate::openapi::document())
}

/// An exit as the API takes it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExitBody {
    public_key: PublicKey,
    endpoint: SocketAddr,
    name: String,
    #[serde(default)]
    listen_port: Option<u16>,
}

async fn list_exits(State(app): State<App>) -> Json<Vec<ExitSpec>> {
    Json(app.control.state().exits.clone())
}

async fn add_exit(
    State(app): State<App>,
    body: Bytes,
) -> Result<(StatusCode, Json<ExitSpec>), ApiError> {
    let spec = body::exit(&body).map_err(bad_request)?;
    let added = spec.clone();
    app.control.apply(move |s| {
        if s.exits.iter().any(|x| x.public_key == spec.public_key) {
            return Err(ChangeError::Conflict(format!(
                "exit {} already exists",
                spec.public_key
            )));
        }
        s.exits.push(spec);
        Ok(())
    })?;
    Ok((StatusCode::CREATED, Json(added)))
}

async fn remove_exit(
    State(app): State<App>,
    UrlPath(key): UrlPath<String>,
) -> Result<StatusCode, ApiError> {
    let key = key_from_path(&key)?;
    app.control.apply(|s| {
        let before = s.exits.len();
        s.exits.retain(|x| x.public_key != key);
        if s.exits.len() == before {
            return Err(ChangeError::NotFound(format!("no exit {key}")));
        }
        if let Some(p) = s.peers.iter().find(|p| p.allowed_exits.contains(&key)) {
            return Err(ChangeError::Conflict(format!(
                "peer {} may use exit {key}; remove it from the peer's allowed_exits first",
                p.public_key
            )));
        }
        Ok(())
    })?;
    Ok(StatusCode::NO_CONTENT)
}

async fn list_peers(State(app): State<App>) -> Json<Vec<PeerSpec>> {
    // Preshared keys are write-only.
    let mut peers = app.control.state().peers.clone();
    for p in &mut peers {
        p.preshared_key = None;
    }
    Json(peers)
}

async fn add_peer(
    State(app): State<App>,
    body: Bytes,
) -> Result<(StatusCode, Json<PeerSpec>), ApiError> {
    let p = body::peer(&body).map_err(bad_request)?;
    let mut shown = p.clone();
    shown.preshared_key = None;
    app.control.apply(move |s| {
        if s.peers.iter().any(|x| x.public_key == p.public_key) {
            return Err(ChangeError::Conflict(format!(
                "peer {} already exists",
                p.public_key
            )));
        }
        s.peers.push(p);
        Ok(())
    })?;
    Ok((StatusCode::CREATED, Json(shown)))
}

async fn remove_peer(
    State(app): State<App>,
    UrlPath(key): UrlPath<String>,
) -> Result<StatusCode, ApiError> {
    let key = key_from_path(&key)?;
    app.control.apply(|s| {
        let before = s.peers.len();
        s.peers.retain(|x| x.public_key != key);
        if s.peers.len() == before {
            return Err(ChangeError::NotFound(format!("no peer {key}")));
        }
        Ok(())
    })?;
    Ok(StatusCode::NO_CONTENT)
}

fn with_etag(state: &DesiredState) -> Response {
    let etag = format!("\"{}\"", state.generation);
    let mut shown = state.clone();
    for p in &mut shown.peers {
        p.preshared_key = None;
    }
    let mut r = Json(shown).into_response();
    if let Ok(v) = HeaderValue::from_str(&etag) {
        r.headers_mut().insert(header::ETAG, v);
    }
    r
}

async fn get_config(State(app): State<App>) -> Response {
    with_etag(&app.control.state())
}

/// The whole desired state as `PUT /v1/config` takes it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigBody {
    /// Ignored if present (the node assigns generations); `If-Match` carries the caller's.
    #[serde(default)]
    #[allow(dead_code)]
    generation: Option<u64>,
    #[serde(default)]
    exits: Vec<ExitSpec>,
    #[serde(default)]
    peers: Vec<PeerEntry>,
}

async fn put_config(
    State(app): State<App>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let Some(if_match) = headers.get(header::IF_MATCH) else {
        return Err(ApiError(
            StatusCode::PRECONDITION_REQUIRED,
            "PUT /v1/config needs If-Match: <generation> (from GET /v1/config)".into(),
        ));
    };
    let expected: u64 = if_match
        .to_str()
        .ok()
        .map(|s| s.trim().trim_matches('"'))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad_request("If-Match must be a generation number"))?;
    let new = body::whole_state(&body).map_err(bad_request)?;
    let applied = app
        .control
        .replace(expected, |current| new.resolve(current))?;
    // A summary, not the state echoed back: a whole table can be megabytes.
    let mut r = Json(json!({
        "generation": applied.generation,
        "exits": applied.exits.len(),
        "peers": applied.peers.len(),
    }))
    .into_response();
    if let Ok(v) = HeaderValue::from_str(&format!("\"{}\"", applied.generation)) {
        r.headers_mut().insert(header::ETAG, v);
    }
    Ok(r)
}

/// One session as the API lists it; never any payload.
#[derive(Debug, Serialize)]
struct SessionView {
    id: String,
    worker: usize,
    client: SocketAddr,
    exit: String,
    exit_key: PublicKey,
    exit_endpoint: SocketAddr,
    listen_port: u16,
    established: bool,
    verified: bool,
    to_exit: Traffic,
    to_client: Traffic,
    handshakes: u64,
    age_secs: f64,
    idle_secs: f64,
}

async fn list_sessions(State(app): State<App>) -> Json<Vec<SessionView>> {
    let table = app.control.dp.table();
    let list = app
        .control
        .dp
        .sessions(WORKER_TIMEOUT)
        .into_iter()
        .map(|(worker, s)| SessionView {
            id: format!("{worker}.{}.{}", s.slot.index, s.slot.generation),
            worker,
            client: s.client,
            exit: table
                .by_key(&s.exit_key)
                .and_then(|id| table.get(id))
                .map(|e| e.spec.name.clone())
                .unwrap_or_default(),
            exit_key: s.exit_key,
            exit_endpoint: s.exit_endpoint,
            listen_port: s.listen_port,
            established: s.established,
            verified: s.verified,
            to_exit: s.to_exit,
            to_client: s.to_client,
            handshakes: s.handshakes,
            age_secs: s.age.as_secs_f64(),
            idle_secs: s.idle.as_secs_f64(),
        })
        .collect();
    Json(list)
}

async fn kill_session(
    State(app): State<App>,
    UrlPath(id): UrlPath<String>,
) -> Result<StatusCode, ApiError> {
    let parts: Vec<&str> = id.split('.').collect();
    let parsed = match parts.as_slice() {
        [w, i, g] => match (w.parse::<usize>(), i.parse::<u32>(), g.parse::<u32>()) {
            (Ok(w), Ok(index), Ok(generation)) => Some((w, SessionSlot { index, generation })),
            _ => None,
        },
        _ => None,
    };
    let well_formed = parts.len() == 3
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    let Some((worker, slot)) = parsed else {
        // Digits out of range name no session that can exist.
        return Err(if well_formed {
            ApiError(StatusCode::NOT_FOUND, format!("no session {id}"))
        } else {
            bad_request(format!(
                "{id:?} is not a session id (worker.index.generation)"
            ))
        });
    };
    if app.control.dp.close_session(worker, slot, WORKER_TIMEOUT) {
        tracing::info!(session = %id, "session closed on request");
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError(StatusCode::NOT_FOUND, format!("no session {id}")))
    }
}

/// Where the token file is when the configuration does not say.
pub fn default_token_path(state_dir: &Path) -> PathBuf {
    state_dir.join("api.token")
}

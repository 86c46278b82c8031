//! One function per route and method; each parses with [`super::body`] and changes the
//! node through [`Control`](crate::change::Control).

use axum::body::Bytes;
use axum::extract::{Path as UrlPath, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use wraithgate_relay::router::{SessionSlot, Traffic};
use wraithgate_relay::table::ExitSpec;
use wraithgate_relay::{DropReason, ExitStats};

use super::body::{self, key_from_path, FastPathView, PeerView, SessionView};
use super::error::{bad_request, ApiError};
use super::{App, WORKER_TIMEOUT};
use crate::change::ChangeError;
use crate::metrics;
use crate::openapi::{
    ChangeRefusals, ChangeSchema, ErrorBody, FastPathNode, NodeView, ReadRefusals,
};
use crate::state::DesiredState;

/// Liveness: 200 while every worker keeps publishing; 503 naming the stalled ones (a
/// worker stuck for [`WORKER_STALL`](crate::change::WORKER_STALL)). A dead sidecar answers
/// nothing, which fails a probe too.
#[utoipa::path(get, path = "/healthz", security(()), summary = "Liveness: every data-plane worker keeps publishing",
    responses((status = 200, description = "Alive", body = String, content_type = "text/plain"),
        (status = 503, description = "A worker stalled (named)", body = String, content_type = "text/plain"),
        (status = 403, description = "Request carried Origin or Referer.", body = ErrorBody)))]
pub(super) async fn healthz(State(app): State<App>) -> Response {
    let h = app.control.health();
    if h.stalled.is_empty() {
        return "ok\n".into_response();
    }
    (
        StatusCode::SERVICE_UNAVAILABLE,
        format!(
            "stalled: worker {:?} published nothing for more than {} s\n",
            h.stalled,
            crate::change::WORKER_STALL.as_secs()
        ),
    )
        .into_response()
}

/// Readiness: 200 once every worker serves (has published) and none is stalled.
#[utoipa::path(get, path = "/readyz", security(()), summary = "Readiness: every data-plane worker serves",
    responses((status = 200, description = "Ready", body = String, content_type = "text/plain"),
        (status = 503, description = "Starting, or a worker stalled", body = String, content_type = "text/plain"),
        (status = 403, description = "Request carried Origin or Referer.", body = ErrorBody)))]
pub(super) async fn readyz(State(app): State<App>) -> Response {
    let h = app.control.health();
    if h.ready && h.stalled.is_empty() {
        return "ready\n".into_response();
    }
    let why = if h.stalled.is_empty() {
        "starting: not every worker serves yet\n".to_string()
    } else {
        format!("stalled: worker {:?}\n", h.stalled)
    };
    (StatusCode::SERVICE_UNAVAILABLE, why).into_response()
}

#[utoipa::path(get, path = "/metrics", summary = "Prometheus metrics",
    responses((status = 200, description = "Prometheus text format 0.0.4", body = String, content_type = "text/plain"), ReadRefusals))]
pub(super) async fn get_metrics(State(app): State<App>) -> Response {
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

#[utoipa::path(get, path = "/v1/node", summary = "The node: its public key (Z-HOP peers' outer peer), backend, workers, listen addresses, counts",
    responses((status = 200, description = "Node", body = NodeView), ReadRefusals))]
pub(super) async fn node_info(State(app): State<App>) -> Json<NodeView> {
    let c = &app.control;
    let reports = c.dp.reports();
    Json(NodeView {
        public_key: c.node_public,
        version: env!("CARGO_PKG_VERSION"),
        backend: c.dp.backend(),
        workers: c.dp.worker_count(),
        listen: c.dp.local_addrs().to_vec(),
        generation: c.state().generation,
        exits: c.dp.table().len(),
        peers: c.dp.table().peer_count(),
        sessions: reports.iter().map(|r| r.sessions).sum::<usize>(),
        zhop_peers: reports.iter().map(|r| r.zhop.peers).sum::<u64>(),
        fast_path: c.dp.fast_path_interfaces().map(|interfaces| FastPathNode {
            interfaces: interfaces.to_vec(),
            offloaded: reports
                .iter()
                .filter_map(|r| r.fast_path)
                .map(|f| f.offloaded)
                .sum(),
        }),
        fast_path_refused: c.dp.fast_path_refused().map(str::to_owned),
        uptime_secs: c.started.elapsed().as_secs(),
    })
}

#[utoipa::path(get, path = "/v1/stats", summary = "The node's counters since start, summed over its workers (what /metrics exports, as JSON), and per exit",
    responses((status = 200, description = "Counters", body = body::StatsView), ReadRefusals))]
pub(super) async fn get_stats(State(app): State<App>) -> Json<body::StatsView> {
    let c = &app.control;
    let reports = c.dp.reports();
    let table = c.dp.table();
    let mut router = wraithgate_relay::RouterStats::default();
    let mut zhop = body::ZhopStatsView {
        peers: 0,
        flows: 0,
        outer_handshakes: 0,
        to_exit: Traffic::default(),
        to_peer: Traffic::default(),
    };
    let (mut sessions, mut pending) = (0, 0);
    for r in &reports {
        router.merge(&r.router);
        sessions += r.sessions as u64;
        pending += r.pending as u64;
        zhop.peers += r.zhop.peers;
        zhop.flows += r.zhop.flows;
        zhop.outer_handshakes += r.zhop.outer_handshakes;
        zhop.to_exit.packets += r.zhop.inner_to_exit.packets;
        zhop.to_exit.bytes += r.zhop.inner_to_exit.bytes;
        zhop.to_peer.packets += r.zhop.exit_to_inner.packets;
        zhop.to_peer.bytes += r.zhop.exit_to_inner.bytes;
    }
    let sums = metrics::exit_totals(&table, &reports);
    let exits = table
        .iter()
        .map(|(id, exit)| {
            let e = &sums[id.0 as usize];
            body::ExitStatsView {
                name: exit.spec.name.clone(),
                public_key: exit.spec.public_key,
                sessions: e.sessions,
                sessions_opened: e.sessions_opened,
                to_exit: e.client_to_exit,
                to_client: e.exit_to_client,
                client_handshakes: e.client_handshakes,
                exit_handshakes: e.exit_handshakes,
                drops: ExitStats::REASONS
                    .iter()
                    .map(|r| (r.as_str(), e.dropped(*r)))
                    .collect(),
            }
        })
        .collect();
    Json(body::StatsView {
        sessions,
        sessions_pending: pending,
        sessions_opened: router.sessions_opened,
        to_exit: router.client_to_exit,
        to_client: router.exit_to_client,
        client_handshakes: router.client_handshakes,
        exit_handshakes: router.exit_handshakes,
        cookie_replies: router.cookie_replies,
        drops: DropReason::ALL
            .iter()
            .map(|r| (r.as_str(), router.dropped(*r)))
            .collect(),
        zhop,
        fast_path_to_exit: router.fast_client_to_exit,
        fast_path_to_client: router.fast_exit_to_client,
        exits,
    })
}

#[utoipa::path(get, path = "/v1/openapi.json", summary = "This document",
    responses((status = 200, description = "OpenAPI 3.1", body = Object), ReadRefusals))]
pub(super) async fn openapi() -> Json<serde_json::Value> {
    Json(crate::openapi::document())
}

#[utoipa::path(get, path = "/v1/exits", summary = "List exits",
    responses((status = 200, description = "Exits", body = Vec<body::ExitBody>), ReadRefusals))]
pub(super) async fn list_exits(State(app): State<App>) -> Json<Vec<ExitSpec>> {
    Json(app.control.state().exits.clone())
}

/// A request body parsed on the blocking pool, not on the sidecar's one runtime thread:
/// an endpoint written `host:port` is resolved while parsing, and getaddrinfo blocks (for
/// seconds when the resolver does not answer) while `/healthz` and every other call must
/// still be answered.
async fn parse_body<T: Send + 'static>(
    body: Bytes,
    parse: fn(&[u8]) -> Result<T, String>,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(move || parse(&body))
        .await
        .map_err(|e| {
            ApiError(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("reading the request body failed: {e}"),
            )
        })?
        .map_err(bad_request)
}

#[utoipa::path(post, path = "/v1/exits", summary = "Add an exit", request_body = body::ExitBody,
    responses((status = 201, description = "Added", body = body::ExitBody), ChangeRefusals))]
pub(super) async fn add_exit(
    State(app): State<App>,
    body: Bytes,
) -> Result<(StatusCode, Json<ExitSpec>), ApiError> {
    let spec = parse_body(body, body::exit).await?;
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

#[utoipa::path(delete, path = "/v1/exits/{key}", summary = "Remove an exit; its sessions end", params(("key" = String, Path, description = "The key in base64url (`-` for `+`, `_` for `/`, padding optional)", pattern = "^[A-Za-z0-9_-]{42}[AEIMQUYcgkosw048]=?$")),
    responses((status = 204, description = "Removed"), ChangeRefusals))]
pub(super) async fn remove_exit(
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

#[utoipa::path(patch, path = "/v1/exits/{key}", summary = "Change one exit: name, endpoint, listen_port (null unpins); a new endpoint ends the exit's sessions",
    params(("key" = String, Path, description = "The key in base64url (`-` for `+`, `_` for `/`, padding optional)", pattern = "^[A-Za-z0-9_-]{42}[AEIMQUYcgkosw048]=?$")), request_body = body::ExitPatch,
    responses((status = 200, description = "Changed (or already so: changed is false)", body = ChangeSchema), ChangeRefusals))]
pub(super) async fn patch_exit(
    State(app): State<App>,
    UrlPath(key): UrlPath<String>,
    body: Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    let key = key_from_path(&key)?;
    let patch = parse_body(body, body::exit_patch).await?;
    let applied = app.control.apply(|s| {
        let Some(e) = s.exits.iter_mut().find(|x| x.public_key == key) else {
            return Err(ChangeError::NotFound(format!("no exit {key}")));
        };
        if let Some(name) = patch.name {
            e.name = name;
        }
        if let Some(endpoint) = patch.endpoint {
            e.endpoint = endpoint;
        }
        if let Some(port) = patch.listen_port {
            e.listen_port = port;
        }
        Ok(())
    })?;
    let exit = applied.state.exits.iter().find(|x| x.public_key == key);
    Ok(Json(json!({
        "exit": exit,
        "generation": applied.state.generation,
        "changed": applied.changed(),
        "changes": applied.diff,
        "sessions_closed": applied.sessions_closed,
    })))
}

#[utoipa::path(get, path = "/v1/peers", summary = "List provisioned peers, with what their tunnels report (as `wg show`); preshared keys only as \"set\"",
    responses((status = 200, description = "Peers", body = Vec<body::PeerView>), ReadRefusals))]
pub(super) async fn list_peers(State(app): State<App>) -> Json<Vec<PeerView>> {
    // Preshared keys are write-only: shown as "set".
    let statuses = app.control.dp.peer_statuses(WORKER_TIMEOUT);
    let state = app.control.state();
    Json(
        state
            .peers
            .iter()
            .map(|p| PeerView::new(p, &statuses))
            .collect(),
    )
}

#[utoipa::path(post, path = "/v1/peers", summary = "Provision a peer", request_body = body::PeerEntry,
    responses((status = 201, description = "Added", body = body::PeerView), ChangeRefusals))]
pub(super) async fn add_peer(
    State(app): State<App>,
    body: Bytes,
) -> Result<(StatusCode, Json<PeerView>), ApiError> {
    let p = parse_body(body, body::peer).await?;
    let shown = PeerView::new(&p, &[]);
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

#[utoipa::path(delete, path = "/v1/peers/{key}", summary = "Remove a peer", params(("key" = String, Path, description = "The key in base64url (`-` for `+`, `_` for `/`, padding optional)", pattern = "^[A-Za-z0-9_-]{42}[AEIMQUYcgkosw048]=?$")),
    responses((status = 204, description = "Removed"), ChangeRefusals))]
pub(super) async fn remove_peer(
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

#[utoipa::path(get, path = "/v1/config", summary = "The whole desired state; ETag is its generation",
    responses((status = 200, description = "State", body = body::ConfigBody), ReadRefusals))]
pub(super) async fn get_config(State(app): State<App>) -> Response {
    with_etag(&app.control.state())
}

#[utoipa::path(put, path = "/v1/config", summary = "Replace the whole desired state atomically",
    description = "Peers that leave preshared_key out keep the one stored for their public key; an explicit null removes it.",
    request_body = body::ConfigBody,
    params(("If-Match" = String, Header, description = "The generation this change is based on", pattern = "^\"?[0-9]{1,19}\"?$"),
        ("dry_run" = Option<bool>, Query, description = "true: check the state and answer what would change, changing nothing")),
    responses((status = 200, description = "Applied (ETag is the generation, unchanged when the state was already so), or what a dry run would change", body = ChangeSchema), ChangeRefusals))]
pub(super) async fn put_config(
    State(app): State<App>,
    RawQuery(query): RawQuery,
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
    let new = parse_body(body, body::whole_state).await?;
    let dry_run = match query.as_deref() {
        None | Some("") => false,
        Some("dry_run=true" | "dry_run=1" | "dry_run") => true,
        Some(other) => {
            return Err(bad_request(format!(
                "unknown query {other:?}; PUT /v1/config takes only dry_run=true"
            )))
        }
    };
    if dry_run {
        let diff = app
            .control
            .preview(expected, |current| new.resolve(current))?;
        return Ok(Json(json!({
            "dry_run": true,
            "generation": expected,
            "changed": !diff.is_empty(),
            "changes": diff,
        }))
        .into_response());
    }
    let applied = app
        .control
        .replace(expected, |current| new.resolve(current))?;
    let state = &applied.state;
    // A summary, not the state echoed back: a whole table can be megabytes.
    let mut r = Json(json!({
        "generation": state.generation,
        "changed": applied.changed(),
        "changes": applied.diff,
        "sessions_closed": applied.sessions_closed,
        "exits": state.exits.len(),
        "peers": state.peers.len(),
    }))
    .into_response();
    if let Ok(v) = HeaderValue::from_str(&format!("\"{}\"", state.generation)) {
        r.headers_mut().insert(header::ETAG, v);
    }
    Ok(r)
}

#[utoipa::path(get, path = "/v1/sessions", summary = "Live sessions (no payload, ever)",
    params(("exit_port" = Option<u16>, Query, minimum = 1, maximum = 65535, description = "Only the session whose exit-facing port this is (the port an exit's abuse report names); live state only")),
    responses((status = 200, description = "Sessions", body = Vec<SessionView>),
        (status = 400, description = "Invalid query; nothing changed.", body = ErrorBody), ReadRefusals))]
pub(super) async fn list_sessions(
    State(app): State<App>,
    RawQuery(query): RawQuery,
) -> Result<Json<Vec<SessionView>>, ApiError> {
    let exit_port = body::sessions_query(query.as_deref()).map_err(bad_request)?;
    let table = app.control.dp.table();
    let now = std::time::SystemTime::now();
    let list = app
        .control
        .dp
        .sessions(WORKER_TIMEOUT)
        .into_iter()
        .filter(|(_, s)| exit_port.is_none() || s.exit_port == exit_port)
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
            fast_path: FastPathView {
                offloaded: s.offloaded,
                to_exit: s.fast_to_exit,
                to_client: s.fast_to_client,
            },
            handshakes: s.handshakes,
            age_secs: s.age.as_secs_f64(),
            idle_secs: s.idle.as_secs_f64(),
            latest_handshake: s.since_handshake.and_then(|d| {
                let at = now.checked_sub(d)?;
                Some(at.duration_since(std::time::UNIX_EPOCH).ok()?.as_secs())
            }),
            exit_port: s.exit_port,
        })
        .collect();
    Ok(Json(list))
}

#[utoipa::path(delete, path = "/v1/sessions/{id}", summary = "Close a session",
    params(("id" = String, Path, description = "worker.index.generation, as listed", pattern = "^[0-9]{1,9}\\.[0-9]{1,9}\\.[0-9]{1,9}$")),
    responses((status = 204, description = "Closed"), ChangeRefusals))]
pub(super) async fn kill_session(
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

//! The operator API: a thin axum sidecar on a thread and runtime of its own.
//!
//! `GET /healthz` and `GET /readyz` are open; everything else needs `Authorization: Bearer
//! <token>`, the token read from a file the node creates (mode 0600) on first start. A
//! second, read-only token (`metrics.token` beside it) opens `GET /metrics` and nothing
//! else, so a scraper never holds the token that changes the table. Requests carrying
//! `Origin` or `Referer` are refused, so a browser page cannot drive the API. Reads are
//! GET; changes are POST, PUT and DELETE, each validated, persisted, then published.
//!
//! - this module: the routes ([`ROUTES`]) and the router built from them;
//! - `server`: the sidecar thread, its listeners and its stop;
//! - `guard`: the token and the refusal of browser requests;
//! - `error`: the `{"error": ...}` answers, axum's own refusals included;
//! - [`body`]: what requests carry and answers hold, parsed as the handlers parse them;
//! - `handlers`: one function per route and method.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::middleware;
use axum::response::IntoResponse as _;
use axum::Router;
use utoipa::OpenApi as _;
use utoipa_axum::router::{OpenApiRouter, UtoipaMethodRouter};
use utoipa_axum::routes;

use crate::change::Control;

pub mod body;
mod error;
mod guard;
mod handlers;
mod server;
pub mod tls;

pub use body::WholeState;
pub use error::ApiError;
pub use guard::load_or_create_token;
pub use server::{start, Sidecar};

use error::{json_rejections, not_found};
use handlers::*;

/// Largest request body, but for `PUT /v1/config`.
const BODY_LIMIT: usize = 64 * 1024;
/// Largest `PUT /v1/config` body (a 100,000-exit table is about 15 MB of JSON).
const CONFIG_BODY_LIMIT: usize = 64 * 1024 * 1024;
/// How long a listing waits for each worker.
const WORKER_TIMEOUT: Duration = Duration::from_secs(1);

/// What every handler shares.
#[derive(Clone)]
struct App {
    control: Arc<Control>,
    token: Arc<str>,
    /// Opens `GET /metrics` only.
    metrics_token: Arc<str>,
    /// Notified to make the sidecar's thread itself panic: fault injection, see
    /// [`FAULT_ROUTES_ENV`].
    thread_fault: Arc<tokio::sync::Notify>,
}

/// Debug builds only: with this variable set to `1`, the API also serves
/// `POST /v1/_fault/handler-panic` (the handler panics) and `POST /v1/_fault/thread-panic`
/// (the sidecar's thread panics outside any handler), so the reliability tests can prove
/// what a panic costs. Release builds never serve them, whatever the environment says.
pub const FAULT_ROUTES_ENV: &str = "WRAITHGATE_FAULT_ROUTES";

fn fault_routes_enabled() -> bool {
    cfg!(debug_assertions) && std::env::var_os(FAULT_ROUTES_ENV).is_some_and(|v| v == "1")
}

/// Every path the API serves with its methods. The router and the OpenAPI document are
/// both built from the handlers (`api_routes`); the API test checks this list against
/// what is served and documented, and the error answers name a path's methods from it.
pub const ROUTES: &[(&str, &[&str])] = &[
    ("/healthz", &["GET"]),
    ("/readyz", &["GET"]),
    ("/metrics", &["GET"]),
    ("/v1/openapi.json", &["GET"]),
    ("/v1/node", &["GET"]),
    ("/v1/exits", &["GET", "POST"]),
    ("/v1/exits/{key}", &["PATCH", "DELETE"]),
    ("/v1/peers", &["GET", "POST"]),
    ("/v1/peers/{key}", &["DELETE"]),
    ("/v1/config", &["GET", "PUT"]),
    ("/v1/sessions", &["GET"]),
    ("/v1/sessions/{id}", &["DELETE"]),
    ("/v1/stats", &["GET"]),
];

/// Every route with its handlers and their OpenAPI description (`#[utoipa::path]` in
/// `handlers`), from which the router and the document are both made.
fn api_routes() -> OpenApiRouter<App> {
    let (schemas, paths, config) = routes!(get_config, put_config);
    let config: UtoipaMethodRouter<App> = (
        schemas,
        paths,
        config.layer(DefaultBodyLimit::max(CONFIG_BODY_LIMIT)),
    );
    OpenApiRouter::with_openapi(crate::openapi::ApiDoc::openapi())
        .routes(routes!(healthz))
        .routes(routes!(readyz))
        .routes(routes!(get_metrics))
        .routes(routes!(openapi))
        .routes(routes!(node_info))
        .routes(routes!(list_exits, add_exit))
        .routes(routes!(remove_exit, patch_exit))
        .routes(routes!(list_peers, add_peer))
        .routes(routes!(remove_peer))
        .routes(config)
        .routes(routes!(list_sessions))
        .routes(routes!(kill_session))
        .routes(routes!(get_stats))
}

/// The OpenAPI document of `api_routes`.
pub fn openapi_document() -> utoipa::openapi::OpenApi {
    api_routes().into_openapi()
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
    let (mut routes, _) = api_routes().split_for_parts();
    if fault_routes_enabled() {
        tracing::warn!(
            "{FAULT_ROUTES_ENV}=1: serving the fault-injection routes under /v1/_fault/"
        );
        routes = routes
            .route(
                "/v1/_fault/handler-panic",
                axum::routing::post(|| async {
                    if fault_routes_enabled() {
                        panic!("injected fault: an API handler panics");
                    }
                    axum::http::StatusCode::NOT_FOUND
                }),
            )
            .route(
                "/v1/_fault/thread-panic",
                axum::routing::post(
                    |axum::extract::State(app): axum::extract::State<App>| async move {
                        app.thread_fault.notify_one();
                        axum::http::StatusCode::ACCEPTED
                    },
                ),
            );
    }
    let control = app.control.clone();
    routes
        .fallback(not_found)
        // Innermost of the layers below: a panicking handler is answered like any other
        // failure (and the guard and the JSON shape still apply around it).
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(
            move |panic: Box<dyn std::any::Any + Send>| {
                control
                    .api_panics
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let what = panic_message(panic.as_ref());
                tracing::error!(panic = %what, "an operator API handler panicked; answered 500, the sidecar serves on");
                ApiError(
                    axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                    format!("internal error: the request's handler failed ({what}); see the node's log"),
                )
                .into_response()
            },
        ))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(middleware::from_fn(json_rejections))
        .layer(middleware::from_fn_with_state(app.clone(), guard::guard))
        .with_state(app)
}

/// What a panic said, if it said it in a string.
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

/// The scrapers' read-only token file: `metrics.token` beside the API token file.
pub fn metrics_token_path(token_path: &Path) -> PathBuf {
    token_path.with_file_name("metrics.token")
}

/// Where the token file is when the configuration does not say.
pub fn default_token_path(state_dir: &Path) -> PathBuf {
    state_dir.join("api.token")
}

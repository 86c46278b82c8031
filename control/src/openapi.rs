//! The OpenAPI 3.1 document served at `/v1/openapi.json`, derived (utoipa) from the
//! request and answer types in `api::body` and the `#[utoipa::path]` of each handler; the
//! router is built from the same handlers (utoipa-axum), so a route cannot be served
//! undocumented. What lives here: the document's frame ([`ApiDoc`]: title, the bearer
//! scheme), the shared refusals, and the schemas of types the API does not own (a key, a
//! traffic count) or answers it builds from several parts (a change, the node).

use std::borrow::Cow;

use serde::Serialize;
use utoipa::openapi::schema::{ObjectBuilder, Type};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{RefOr, Schema};
use utoipa::{Modify, OpenApi, PartialSchema, ToSchema};

/// A WireGuard key as `wg` prints it (standard base64 of 32 bytes).
pub const KEY_PATTERN: &str = "^[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=$";

/// The document's frame; the paths and most schemas come from the handlers.
#[derive(Debug, OpenApi)]
#[openapi(
    info(
        title = "WraithGate node API",
        description = "Operator API of a WraithGate relay node. Every route but /healthz and /readyz needs `Authorization: Bearer <token>` (the read-only metrics.token opens GET /metrics only); requests carrying Origin or Referer are refused."
    ),
    modifiers(&Bearer),
    security(("bearer" = [])),
    components(schemas(ErrorBody, Key, TrafficSchema))
)]
pub struct ApiDoc;

/// The document, as served.
pub fn document() -> serde_json::Value {
    serde_json::to_value(crate::api::openapi_document()).unwrap_or_default()
}

#[derive(Debug)]
struct Bearer;

impl Modify for Bearer {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// Every refusal's body.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Error)]
pub struct ErrorBody {
    pub error: String,
}

/// The schema of a WireGuard public key (the type is `wraithgate_relay::PublicKey`).
#[derive(Debug)]
pub struct Key;

impl PartialSchema for Key {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .pattern(Some(KEY_PATTERN))
            .description(Some(
                "WireGuard key, standard base64 (44 characters) as `wg` prints it",
            ))
            .into()
    }
}

impl ToSchema for Key {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("Key")
    }
}

/// The schema of `wraithgate_relay::router::Traffic`.
#[derive(Debug, ToSchema)]
#[schema(as = Traffic)]
#[allow(dead_code)]
pub struct TrafficSchema {
    packets: u64,
    bytes: u64,
}

/// What a change did (or, with dry_run, would do).
#[derive(Debug, ToSchema)]
#[schema(as = Change)]
#[allow(dead_code)]
pub struct ChangeSchema {
    generation: Option<u64>,
    /// False when the state asked for was the state in use (the generation is kept).
    changed: Option<bool>,
    dry_run: Option<bool>,
    changes: Option<ChangesSchema>,
    sessions_closed: Option<Vec<ClosedSessionsSchema>>,
    /// PATCH: the exit as it is now.
    #[schema(value_type = Option<Object>)]
    exit: Option<()>,
    /// PUT: how many exits and peers the state holds.
    exits: Option<u64>,
    peers: Option<u64>,
}

/// What a change adds, removes and changes, by name or key.
#[derive(Debug, ToSchema)]
#[schema(as = Changes)]
#[allow(dead_code)]
pub struct ChangesSchema {
    exits_added: Option<Vec<String>>,
    exits_removed: Option<Vec<String>>,
    exits_changed: Option<Vec<String>>,
    peers_added: Option<Vec<String>>,
    peers_removed: Option<Vec<String>>,
    peers_changed: Option<Vec<String>>,
}

/// The sessions a change closed, per exit.
#[derive(Debug, ToSchema)]
#[schema(as = ClosedSessions)]
#[allow(dead_code)]
pub struct ClosedSessionsSchema {
    exit: Option<String>,
    exit_key: Option<String>,
    sessions: Option<u64>,
}

/// `GET /v1/node`.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Node)]
pub struct NodeView {
    /// The node's own key: Z-HOP peers' outer peer.
    #[schema(value_type = Key)]
    pub public_key: wraithgate_relay::PublicKey,
    pub version: &'static str,
    pub backend: &'static str,
    pub workers: usize,
    #[schema(value_type = Vec<String>)]
    pub listen: Vec<std::net::SocketAddr>,
    pub generation: u64,
    pub exits: usize,
    pub peers: usize,
    pub sessions: usize,
    /// Provisioned peers with a live tunnel ending at the node: Z-HOP and Exit peers alike
    /// (one state machine terminates both).
    pub zhop_peers: u64,
    /// The kernel fast path, where it is attached.
    pub fast_path: Option<FastPathNode>,
    /// Why `fast_path = "auto"` forwards in userspace, when it could not attach.
    pub fast_path_refused: Option<String>,
    pub uptime_secs: u64,
}

/// The kernel fast path of a node ([`NodeView`]).
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct FastPathNode {
    /// The interfaces its program is attached to.
    pub interfaces: Vec<String>,
    /// Sessions it forwards now.
    pub offloaded: usize,
}

/// Refusals a reading route may answer.
#[derive(Debug, utoipa::IntoResponses)]
#[allow(dead_code)]
pub enum ReadRefusals {
    /// Missing or wrong bearer token.
    #[response(status = 401)]
    Unauthorized(ErrorBody),
    /// Request carried Origin or Referer.
    #[response(status = 403)]
    Forbidden(ErrorBody),
}

/// Refusals a change may answer (each route lists only the statuses it can give).
#[derive(Debug, utoipa::IntoResponses)]
#[allow(dead_code)]
pub enum ChangeRefusals {
    /// Invalid request (body, key or path); nothing changed.
    #[response(status = 400)]
    BadRequest(ErrorBody),
    /// Missing or wrong bearer token.
    #[response(status = 401)]
    Unauthorized(ErrorBody),
    /// Request carried Origin or Referer.
    #[response(status = 403)]
    Forbidden(ErrorBody),
    /// No such object.
    #[response(status = 404)]
    NotFound(ErrorBody),
    /// Conflicts with the current state (duplicate, still referenced, or a newly pinned
    /// listen_port the node cannot bind), or the state file had been replaced while the
    /// node ran (set aside, the running state written back: send the change again).
    #[response(status = 409)]
    Conflict(ErrorBody),
    /// If-Match names a generation that is no longer current.
    #[response(status = 412)]
    Stale(ErrorBody),
    /// Request body too large.
    #[response(status = 413)]
    TooLarge(ErrorBody),
    /// If-Match is required.
    #[response(status = 428)]
    IfMatchRequired(ErrorBody),
    /// The new state could not be persisted (nothing changed), or it was applied but its
    /// directory could not be synced (the message says which).
    #[response(status = 500)]
    NotPersisted(ErrorBody),
}

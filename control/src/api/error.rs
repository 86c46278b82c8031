//! Every refusal as `{"error": "..."}`, axum's own (405, 413, 415, ...) included.

use axum::extract::Request;
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::{body_limit, route_methods, BODY_LIMIT};
use crate::change::ChangeError;

/// An error answer: a status and a message, as `{"error": "..."}`.
#[derive(Debug)]
pub struct ApiError(pub(super) StatusCode, pub(super) String);

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

pub(super) fn bad_request(msg: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, msg.into())
}

/// Gives the refusals axum makes itself (wrong method, body too large, and any other
/// without a JSON body) the `{"error": ...}` shape of the API's own.
pub(super) async fn json_rejections(req: Request, next: Next) -> Response {
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

pub(super) async fn not_found() -> ApiError {
    ApiError(
        StatusCode::NOT_FOUND,
        "no such resource; see /v1/openapi.json".into(),
    )
}

//! Who may call the API: the bearer token (created 0600 on first start) on everything but
//! liveness, and no browser (`Origin` or `Referer` refused).

use std::path::Path;

use anyhow::{Context, Result};
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq as _;

use super::{ApiError, App};

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

pub(super) async fn guard(State(app): State<App>, req: Request, next: Next) -> Response {
    let h = req.headers();
    if h.contains_key(header::ORIGIN) || h.contains_key(header::REFERER) {
        return ApiError(
            StatusCode::FORBIDDEN,
            "requests carrying Origin or Referer are refused: the API is not for browsers".into(),
        )
        .into_response();
    }
    if matches!(req.uri().path(), "/healthz" | "/readyz") {
        return next.run(req).await;
    }
    let presented = h
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    // In time independent of where the first difference is (the length may show).
    let is = |t: &str, token: &str| bool::from(t.trim().as_bytes().ct_eq(token.as_bytes()));
    match presented {
        Some(t) if is(t, &app.token) => next.run(req).await,
        Some(t) if is(t, &app.metrics_token) => {
            if req.method() == axum::http::Method::GET && req.uri().path() == "/metrics" {
                next.run(req).await
            } else {
                ApiError(
                    StatusCode::FORBIDDEN,
                    "the metrics token reads GET /metrics only; use the API token".into(),
                )
                .into_response()
            }
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

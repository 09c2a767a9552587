//! The admin HTTP listener: `/metrics` (Prometheus), `/healthz`, `/readyz`, and the capture
//! inbox API (`/api/messages`) that lets a test suite in any language see what was "sent".

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use axum::Router;
use axum::extract::{ConnectInfo, Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::capture;
use crate::config::Provider;
use crate::state::Shared;

#[derive(Clone)]
struct AppState {
    shared: Arc<Shared>,
    metrics: metrics_exporter_prometheus::PrometheusHandle,
}

pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let state = AppState {
        shared,
        metrics: crate::metrics::handle(),
    };
    // Mail content is never served to the network unauthenticated; probes and scrapers keep
    // their open endpoints.
    let api = Router::new()
        .route("/api/messages", get(list).delete(delete_all))
        .route("/api/messages/{id}", get(one))
        .route("/api/messages/{id}/raw", get(raw))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), guard));
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .merge(api)
        .with_state(state);
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<std::net::SocketAddr>(),
    )
    .with_graceful_shutdown(async move { shutdown.cancelled().await })
    .await
}

/// With `[admin] token`: a matching `Authorization: Bearer` header (401 otherwise). Without
/// one: loopback clients only (403 otherwise).
async fn guard(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
    request: Request,
    next: Next,
) -> Response {
    let token = state.shared.current().config.admin_token.clone();
    match token {
        Some(token) => {
            let given = request
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .unwrap_or_default();
            if !crate::smtp::auth::constant_time_eq(given.as_bytes(), token.expose().as_bytes()) {
                return error(StatusCode::UNAUTHORIZED, "a valid admin token is required");
            }
        }
        None if !peer.ip().to_canonical().is_loopback() => {
            return error(
                StatusCode::FORBIDDEN,
                "captured mail is served to loopback clients only; set [admin] token to serve it to others",
            );
        }
        None => {}
    }
    next.run(request).await
}

async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}

/// Ready once the listeners are serving, and until a stop begins.
async fn readyz(State(state): State<AppState>) -> Response {
    if state.shared.is_ready() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n").into_response()
    }
}

/// Every folder the current config captures into.
fn capture_roots(shared: &Shared) -> Vec<PathBuf> {
    let state = shared.current();
    let config = &state.config;
    let mut roots: Vec<PathBuf> = config
        .projects
        .values()
        .filter_map(|p| p.capture_dir.clone())
        .collect();
    if let Some(Provider::Capture(dir)) = &config.server.provider {
        roots.push(dir.clone());
    }
    roots.sort();
    roots.dedup();
    roots
}

fn error(status: StatusCode, message: &str) -> Response {
    (status, Json(serde_json::json!({ "error": message }))).into_response()
}

/// `GET /api/messages?project=&to=&since=`: the captured envelopes, oldest first.
async fn list(
    State(state): State<AppState>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let since = match query.get("since") {
        None => None,
        Some(s) => match capture::sortable_time(s) {
            Some(t) => Some(t),
            None => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "since: use a UTC time such as 2026-11-24T23:18:58Z",
                );
            }
        },
    };
    let roots = capture_roots(&state.shared);
    let Ok(all) = tokio::task::spawn_blocking(move || capture::list(&roots)).await else {
        return error(StatusCode::INTERNAL_SERVER_ERROR, "listing failed");
    };
    let messages: Vec<serde_json::Value> = all
        .into_iter()
        .filter(|m| match query.get("project") {
            None => true,
            Some(p) if p == "_server" => m["project"].is_null(),
            Some(p) => m["project"].as_str() == Some(p.as_str()),
        })
        .filter(|m| match query.get("to") {
            None => true,
            Some(to) => m["recipients"].as_array().is_some_and(|r| {
                r.iter()
                    .any(|a| a.as_str().is_some_and(|a| a.eq_ignore_ascii_case(to)))
            }),
        })
        .filter(|m| match &since {
            None => true,
            Some(since) => m["received_at"]
                .as_str()
                .and_then(capture::sortable_time)
                .is_some_and(|t| t >= *since),
        })
        .collect();
    Json(serde_json::json!({ "messages": messages })).into_response()
}

/// `GET /api/messages/{id}`: the envelope plus the message's header fields.
async fn one(State(state): State<AppState>, Path(id): Path<String>) -> Response {
    let roots = capture_roots(&state.shared);
    let found = tokio::task::spawn_blocking(move || {
        let (eml, json) = capture::find(&roots, &id)?;
        let mut envelope: serde_json::Value =
            serde_json::from_slice(&std::fs::read(json).ok()?).ok()?;
        let message = std::fs::read(eml).ok()?;
        let headers: Vec<[String; 2]> = capture::headers(&message)
            .into_iter()
            .map(|(n, v)| [n, v])
            .collect();
        envelope["headers"] = serde_json::json!(headers);
        Some(envelope)
    })
    .await;
    match found {
        Ok(Some(envelope)) => Json(envelope).into_response(),
        _ => error(StatusCode::NOT_FOUND, "no such message"),
    }
}

/// `GET /api/messages/{id}/raw`: the message exactly as it would have gone upstream.
async fn raw(State(state): State<AppState>, Path(id): Path<String>) -> Response {
    let roots = capture_roots(&state.shared);
    let found = tokio::task::spawn_blocking(move || {
        let (eml, _) = capture::find(&roots, &id)?;
        std::fs::read(eml).ok()
    })
    .await;
    match found {
        Ok(Some(bytes)) => ([(header::CONTENT_TYPE, "message/rfc822")], bytes).into_response(),
        _ => error(StatusCode::NOT_FOUND, "no such message"),
    }
}

/// `DELETE /api/messages`: empties the capture folders.
async fn delete_all(State(state): State<AppState>) -> Response {
    let roots = capture_roots(&state.shared);
    match tokio::task::spawn_blocking(move || capture::delete_all(&roots)).await {
        Ok(n) => Json(serde_json::json!({ "deleted": n })).into_response(),
        Err(_) => error(StatusCode::INTERNAL_SERVER_ERROR, "delete failed"),
    }
}

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
    listing: Arc<capture::Listing>,
}

pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let state = AppState {
        shared,
        metrics: crate::metrics::handle(),
        listing: Arc::default(),
    };
    // Mail content is never served to the network unauthenticated; probes and scrapers keep
    // their open endpoints.
    let api = Router::new()
        .route("/api/messages", get(list).delete(delete_all))
        .route("/api/messages/{id}", get(one).delete(delete_one))
        .route("/api/messages/{id}/raw", get(raw))
        .route("/api/messages/{id}/attachments/{n}", get(attachment))
        .route("/api/activity", get(activity))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), guard));
    // The page holds no mail (it asks `/api` for it, with the token when one is set), but
    // without a token it is loopback-only like the rest.
    let page = Router::new()
        .route(
            "/",
            get(|| async { asset("text/html; charset=utf-8", PAGE) }),
        )
        .route(
            "/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", SCRIPT) }),
        )
        .route(
            "/app.css",
            get(|| async { asset("text/css; charset=utf-8", STYLE) }),
        )
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            page_guard,
        ));
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .merge(api)
        .merge(page)
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

/// Without `[admin] token`, the page answers loopback clients only; with one, anyone may load
/// it (it then asks for the token, and shows nothing without it).
async fn page_guard(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
    request: Request,
    next: Next,
) -> Response {
    let token = state.shared.current().config.admin_token.is_some();
    if !token && !peer.ip().to_canonical().is_loopback() {
        return error(
            StatusCode::FORBIDDEN,
            "the admin page is served to loopback clients only; set [admin] token to serve it to others",
        );
    }
    next.run(request).await
}

const PAGE: &str = include_str!("admin/index.html");
const SCRIPT: &str = include_str!("admin/app.js");
const STYLE: &str = include_str!("admin/app.css");

/// The page's policy: its own script and style only, nothing fetched from anywhere else.
/// Captured HTML is shown in a sandboxed iframe (no scripts, an opaque origin) that inherits
/// this policy, so it cannot load remote images or run code either.
const PAGE_CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; connect-src 'self'; frame-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_SECURITY_POLICY, PAGE_CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body,
    )
        .into_response()
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
    let listing = state.listing.clone();
    let Ok(all) = tokio::task::spawn_blocking(move || listing.list(&roots)).await else {
        return error(StatusCode::INTERNAL_SERVER_ERROR, "listing failed");
    };
    let messages: Vec<&serde_json::Value> = all
        .iter()
        .map(|m| m.as_ref())
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
        .filter(|m| match query.get("q").map(|q| q.to_lowercase()) {
            None => true,
            Some(q) => {
                let subject = m["subject"].as_str().unwrap_or_default().to_lowercase();
                let recipients = m["recipients"].to_string().to_lowercase();
                subject.contains(&q) || recipients.contains(&q)
            }
        })
        .collect();
    // `newest=N`: the newest N, newest first, with the total (for the inbox page).
    match query.get("newest").map(|n| n.parse::<usize>()) {
        None => Json(serde_json::json!({ "messages": messages })).into_response(),
        Some(Ok(n)) => {
            let total = messages.len();
            let newest: Vec<_> = messages.into_iter().rev().take(n).collect();
            Json(serde_json::json!({ "messages": newest, "total": total })).into_response()
        }
        Some(Err(_)) => error(StatusCode::BAD_REQUEST, "newest: a number of messages"),
    }
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
        if let (Some(e), serde_json::Value::Object(c)) =
            (envelope.as_object_mut(), capture::content(&message))
        {
            e.extend(c);
        }
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

/// `DELETE /api/messages/{id}`.
async fn delete_one(State(state): State<AppState>, Path(id): Path<String>) -> Response {
    let roots = capture_roots(&state.shared);
    match tokio::task::spawn_blocking(move || capture::delete(&roots, &id)).await {
        Ok(true) => Json(serde_json::json!({ "deleted": 1 })).into_response(),
        _ => error(StatusCode::NOT_FOUND, "no such message"),
    }
}

/// `GET /api/messages/{id}/attachments/{n}`: one attachment, as a download. Captured mail is
/// untrusted: it is never rendered in the admin origin.
async fn attachment(
    State(state): State<AppState>,
    Path((id, n)): Path<(String, usize)>,
) -> Response {
    let roots = capture_roots(&state.shared);
    let found = tokio::task::spawn_blocking(move || {
        let (eml, _) = capture::find(&roots, &id)?;
        capture::attachment(&std::fs::read(eml).ok()?, n)
    })
    .await;
    let Ok(Some((name, mime, bytes))) = found else {
        return error(StatusCode::NOT_FOUND, "no such attachment");
    };
    let safe: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._- ".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    (
        [
            (header::CONTENT_TYPE, mime),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{safe}\""),
            ),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff".to_owned()),
            (
                header::CONTENT_SECURITY_POLICY,
                "sandbox; default-src 'none'".to_owned(),
            ),
        ],
        bytes,
    )
        .into_response()
}

/// `GET /api/activity?project=&outcome=&after=`: the last outcomes, newest first.
async fn activity(
    State(state): State<AppState>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let after = match query.get("after").map(|a| a.parse::<u64>()) {
        None => 0,
        Some(Ok(a)) => a,
        Some(Err(_)) => return error(StatusCode::BAD_REQUEST, "after: a sequence number"),
    };
    let entries = state.shared.activity.newest(after, |e| {
        let project = match query.get("project").map(String::as_str) {
            None | Some("") => true,
            Some("_server") => e.project.is_none(),
            Some(p) => e.project.as_deref() == Some(p),
        };
        let outcome = match query.get("outcome").map(String::as_str) {
            None | Some("") => true,
            Some(o) => e.outcome == o,
        };
        project && outcome
    });
    Json(serde_json::json!({ "entries": entries })).into_response()
}

/// `DELETE /api/messages`: empties the capture folders.
async fn delete_all(State(state): State<AppState>) -> Response {
    let roots = capture_roots(&state.shared);
    match tokio::task::spawn_blocking(move || capture::delete_all(&roots)).await {
        Ok(n) => Json(serde_json::json!({ "deleted": n })).into_response(),
        Err(_) => error(StatusCode::INTERNAL_SERVER_ERROR, "delete failed"),
    }
}

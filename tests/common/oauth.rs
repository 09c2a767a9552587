//! An OAuth2 token endpoint for tests (RFC 6749): form-encoded POST with `client_id` and
//! `client_secret` in the body, the `client_credentials` and `refresh_token` grants, short
//! lifetimes, refresh-token rotation, revocation, and an outage on demand. The tokens it
//! issues are what the XOAUTH2 test upstream accepts.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::json;

/// Issued tokens and when each expires; shared with the upstream that checks them.
#[derive(Clone, Debug, Default)]
pub struct Issued(Arc<Mutex<HashMap<String, Instant>>>);

impl Issued {
    pub fn is_valid(&self, token: &str) -> bool {
        self.0
            .lock()
            .unwrap()
            .get(token)
            .is_some_and(|at| Instant::now() < *at)
    }

    /// Issues `token` by hand, valid for `lifetime` (for a token endpoint written elsewhere).
    pub fn issue(&self, token: &str, lifetime: Duration) {
        self.0
            .lock()
            .unwrap()
            .insert(token.to_owned(), Instant::now() + lifetime);
    }

    /// Every token issued so far stops working (revoked).
    pub fn revoke_all(&self) {
        self.0.lock().unwrap().clear();
    }
}

#[derive(Default)]
pub struct Inner {
    pub client_id: String,
    pub client_secret: String,
    /// Refresh tokens that work now; with `rotate`, each use replaces the one used.
    pub refresh_tokens: Vec<String>,
    pub rotate: bool,
    pub expires_in: u64,
    pub down: bool,
    pub requests: usize,
    /// The grant and scope of each request.
    pub grants: Vec<(String, Option<String>)>,
    next: u64,
}

#[derive(Clone)]
pub struct TokenEndpoint {
    pub addr: SocketAddr,
    pub issued: Issued,
    pub inner: Arc<Mutex<Inner>>,
}

impl TokenEndpoint {
    pub async fn start(client_id: &str, client_secret: &str) -> TokenEndpoint {
        let issued = Issued::default();
        let inner = Arc::new(Mutex::new(Inner {
            client_id: client_id.into(),
            client_secret: client_secret.into(),
            expires_in: 3600,
            ..Inner::default()
        }));
        let app = Router::new()
            .route("/token", post(token))
            .with_state((inner.clone(), issued.clone()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        TokenEndpoint {
            addr,
            issued,
            inner,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}/token", self.addr)
    }

    pub fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap()
    }

    pub fn requests(&self) -> usize {
        self.lock().requests
    }
}

fn form(body: &[u8]) -> HashMap<String, String> {
    let decode = |s: &str| {
        let s = s.replace('+', " ");
        let bytes = s.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b'%'
                && i + 2 < bytes.len()
                && let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16)
            {
                out.push(b);
                i += 3;
                continue;
            }
            out.push(bytes[i]);
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    };
    String::from_utf8_lossy(body)
        .split('&')
        .filter_map(|p| p.split_once('='))
        .map(|(k, v)| (decode(k), decode(v)))
        .collect()
}

fn error(status: StatusCode, code: &str) -> Response {
    (
        status,
        Json(json!({"error": code, "error_description": "AADSTS7000215: the details"})),
    )
        .into_response()
}

async fn token(
    State((inner, issued)): State<(Arc<Mutex<Inner>>, Issued)>,
    body: Bytes,
) -> Response {
    let f = form(&body);
    let mut m = inner.lock().unwrap();
    m.requests += 1;
    m.grants.push((
        f.get("grant_type").cloned().unwrap_or_default(),
        f.get("scope").cloned(),
    ));
    if m.down {
        return error(StatusCode::SERVICE_UNAVAILABLE, "temporarily_unavailable");
    }
    if f.get("client_id") != Some(&m.client_id) || f.get("client_secret") != Some(&m.client_secret)
    {
        return error(StatusCode::UNAUTHORIZED, "invalid_client");
    }
    let mut rotated = None;
    match f.get("grant_type").map(String::as_str) {
        Some("client_credentials") => {}
        Some("refresh_token") => {
            let Some(at) = f
                .get("refresh_token")
                .and_then(|r| m.refresh_tokens.iter().position(|t| t == r))
            else {
                return error(StatusCode::BAD_REQUEST, "invalid_grant");
            };
            if m.rotate {
                m.next += 1;
                let new = format!("refresh-{}", m.next);
                m.refresh_tokens[at] = new.clone();
                rotated = Some(new);
            }
        }
        _ => return error(StatusCode::BAD_REQUEST, "unsupported_grant_type"),
    }
    m.next += 1;
    let access = format!("access-{}", m.next);
    issued.0.lock().unwrap().insert(
        access.clone(),
        Instant::now() + Duration::from_secs(m.expires_in),
    );
    let mut answer = json!({
        "access_token": access,
        "token_type": "Bearer",
        "expires_in": m.expires_in,
    });
    if let Some(r) = rotated {
        answer["refresh_token"] = json!(r);
    }
    Json(answer).into_response()
}

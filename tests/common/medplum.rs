//! A Medplum test server: the parts of the Medplum API the relay uses, as documented, on a
//! loopback port. Client-credentials tokens (`client_secret_post` and `client_secret_basic`,
//! `expires_in`, the project reference), Project reads with `ETag`/`meta.versionId` and 304 on
//! `If-None-Match`, 401/403/404 as Medplum gives them, and on demand 500, 429 with
//! Retry-After, or silence. It records what it receives.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use serde_json::{Value, json};

#[derive(Clone)]
pub struct ClientApp {
    pub secret: String,
    /// The project whose admin this client is (a per-project client), or the super admin's
    /// own project (a fleet client).
    pub project: String,
    pub admin: bool,
    pub super_admin: bool,
}

#[derive(Default)]
pub struct Project {
    pub version: u64,
    pub secrets: Vec<Value>,
    pub settings: Vec<Value>,
}

/// What the server does instead of answering normally.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Fault {
    #[default]
    None,
    /// Project reads answer this status (500, 503...).
    Status(u16),
    /// Project reads answer 429 with `Retry-After: <secs>`.
    RateLimited(u64),
    /// Every request (token too) is held and never answered.
    Silent,
}

#[derive(Default)]
pub struct Inner {
    pub clients: HashMap<String, ClientApp>,
    pub projects: HashMap<String, Project>,
    /// Issued tokens: token -> client id.
    tokens: HashMap<String, String>,
    pub expires_in: u64,
    pub fault: Fault,
    pub token_requests: usize,
    /// Project reads by id (304s included).
    pub reads: HashMap<String, usize>,
    /// Every request line and header block seen, and every form body (to look for leaks).
    pub seen: Vec<String>,
    pub basic_auth_used: bool,
    next_token: u64,
}

#[derive(Clone)]
pub struct Medplum {
    pub addr: SocketAddr,
    pub inner: Arc<Mutex<Inner>>,
}

impl Medplum {
    pub async fn start() -> Medplum {
        let inner = Arc::new(Mutex::new(Inner {
            expires_in: 3600,
            ..Inner::default()
        }));
        let app = Router::new()
            .route("/oauth2/token", post(token))
            .route("/fhir/R4/Project/{id}", get(read_project))
            .with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        Medplum { addr, inner }
    }

    pub fn base_url(&self) -> String {
        format!("http://{}/", self.addr)
    }

    pub fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap()
    }

    /// A project with its admin client `client_id`/`secret`.
    pub fn add_project(&self, id: &str, client_id: &str, secret: &str, secrets: Vec<Value>) {
        let mut m = self.lock();
        m.projects.insert(
            id.into(),
            Project {
                version: 1,
                secrets,
                settings: Vec::new(),
            },
        );
        m.clients.insert(
            client_id.into(),
            ClientApp {
                secret: secret.into(),
                project: id.into(),
                admin: true,
                super_admin: false,
            },
        );
    }

    pub fn add_client(&self, client_id: &str, app: ClientApp) {
        self.lock().clients.insert(client_id.into(), app);
    }

    /// A Project Admin's edit: replaces the project's secrets (a new version).
    pub fn set_secrets(&self, id: &str, secrets: Vec<Value>) {
        let mut m = self.lock();
        let p = m.projects.get_mut(id).expect("project");
        p.secrets = secrets;
        p.version += 1;
    }

    pub fn set_settings(&self, id: &str, settings: Vec<Value>) {
        let mut m = self.lock();
        let p = m.projects.get_mut(id).expect("project");
        p.settings = settings;
        p.version += 1;
    }

    pub fn fault(&self, fault: Fault) {
        self.lock().fault = fault;
    }

    /// Every token issued so far stops working (as when it expires): the next read gets 401.
    pub fn expire_tokens(&self) {
        self.lock().tokens.clear();
    }

    pub fn token_requests(&self) -> usize {
        self.lock().token_requests
    }

    pub fn reads(&self, id: &str) -> usize {
        self.lock().reads.get(id).copied().unwrap_or(0)
    }
}

/// Secrets for a project relaying through `host:port` without TLS, as a Project Admin
/// writes them in Medplum.
pub fn smtp_secrets(port: u16, password: &str, approved: &str) -> Vec<Value> {
    vec![
        json!({"name": "smtpHost", "valueString": "127.0.0.1"}),
        json!({"name": "smtpPort", "valueInteger": port}),
        json!({"name": "smtpSecure", "valueBoolean": false}),
        json!({"name": "smtpUsername", "valueString": "u"}),
        json!({"name": "smtpPassword", "valueString": password}),
        json!({"name": "smtpFromAddress", "valueString": "Acme <noreply@acme.example>"}),
        json!({"name": "smtpApprovedSenders", "valueString": approved}),
        // A bot's secret: not the relay's business.
        json!({"name": "botApiKey", "valueString": "bot-secret-value"}),
    ]
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("zz");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn form(body: &[u8]) -> HashMap<String, String> {
    String::from_utf8_lossy(body)
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (percent_decode(k), percent_decode(v)))
        .collect()
}

fn oauth_error(code: &str) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(json!({"error": code, "error_description": "Invalid client"})),
    )
        .into_response()
}

async fn hold_if_silent(inner: &Mutex<Inner>) {
    if inner.lock().unwrap().fault == Fault::Silent {
        std::future::pending::<()>().await;
    }
}

async fn token(
    State(inner): State<Arc<Mutex<Inner>>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    {
        let mut m = inner.lock().unwrap();
        m.token_requests += 1;
        m.seen.push(format!(
            "POST /oauth2/token {headers:?} {}",
            String::from_utf8_lossy(&body)
        ));
    }
    hold_if_silent(&inner).await;
    let mut fields = form(&body);
    if fields.get("grant_type").map(String::as_str) != Some("client_credentials") {
        return oauth_error("invalid_request");
    }
    // client_secret_basic: the pair in an Authorization: Basic header instead.
    if let Some(basic) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        && let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(basic)
        && let Some((id, secret)) = String::from_utf8_lossy(&decoded).split_once(':')
    {
        fields.insert("client_id".into(), percent_decode(id));
        fields.insert("client_secret".into(), percent_decode(secret));
        inner.lock().unwrap().basic_auth_used = true;
    }
    let mut m = inner.lock().unwrap();
    let (Some(id), Some(secret)) = (fields.get("client_id"), fields.get("client_secret")) else {
        return oauth_error("invalid_request");
    };
    let Some(app) = m.clients.get(id).cloned() else {
        return oauth_error("invalid_client");
    };
    if &app.secret != secret {
        return oauth_error("invalid_client");
    }
    m.next_token += 1;
    let token = format!("tok-{}-{}", id, m.next_token);
    m.tokens.insert(token.clone(), id.clone());
    Json(json!({
        "access_token": token,
        "token_type": "Bearer",
        "expires_in": m.expires_in,
        "project": {"reference": format!("Project/{}", app.project)},
    }))
    .into_response()
}

async fn read_project(
    State(inner): State<Arc<Mutex<Inner>>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    {
        let mut m = inner.lock().unwrap();
        *m.reads.entry(id.clone()).or_insert(0) += 1;
        m.seen
            .push(format!("GET /fhir/R4/Project/{id} {headers:?}"));
    }
    hold_if_silent(&inner).await;
    let m = inner.lock().unwrap();
    match m.fault {
        Fault::Status(code) => {
            return StatusCode::from_u16(code).unwrap().into_response();
        }
        Fault::RateLimited(secs) => {
            return (
                StatusCode::TOO_MANY_REQUESTS,
                [(header::RETRY_AFTER, secs.to_string())],
            )
                .into_response();
        }
        _ => {}
    }
    let client = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .and_then(|t| m.tokens.get(t))
        .and_then(|c| m.clients.get(c));
    let Some(client) = client else {
        return StatusCode::UNAUTHORIZED.into_response();
    };
    let allowed = client.super_admin || (client.admin && client.project == id);
    let Some(project) = m.projects.get(&id) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    if !allowed {
        return StatusCode::FORBIDDEN.into_response();
    }
    let etag = format!("W/\"{}\"", project.version);
    if headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        == Some(etag.as_str())
    {
        return (StatusCode::NOT_MODIFIED, [(header::ETAG, etag)]).into_response();
    }
    let body = json!({
        "resourceType": "Project",
        "id": id,
        "name": "Test project",
        "meta": {"versionId": project.version.to_string()},
        "setting": project.settings,
        "secret": project.secrets,
    });
    (
        [
            (header::ETAG, etag),
            (header::CONTENT_TYPE, "application/fhir+json".to_owned()),
        ],
        body.to_string(),
    )
        .into_response()
}

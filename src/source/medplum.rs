//! Project secrets read live from Medplum (`Project.secret`): client-credentials tokens, the
//! Project read with revalidation, the cache that keeps the request budget, and the last good
//! secrets while Medplum cannot be read. The only module that speaks HTTP.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::Lookup;
use crate::config::{self, MedplumClient, Secret};
use crate::metrics;
use crate::project::{self, Entry, ProjectSecrets, ProjectSmtp};
use crate::smtp::Reply;
use crate::tls::{self, TlsError};

/// Project slots kept at most: the fleet credential looks up any id a client names.
const MAX_PROJECTS: usize = 10_000;
/// After a failed read, the next one waits at least this long (unless Medplum said longer).
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(1);
/// A 429's Retry-After is believed up to this long.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);
/// Largest Project resource read.
const MAX_BODY: usize = 4 << 20;

pub struct Medplum {
    settings: config::Medplum,
    http: reqwest::Client,
    tokens: Mutex<HashMap<String, Arc<TokenSlot>>>,
    /// By project id and the client (id and secret) it is read with: a client changed in
    /// `relay.toml` starts afresh instead of inheriting the old one's verdict.
    projects: Mutex<HashMap<(String, String, Secret), Arc<ProjectSlot>>>,
}

impl std::fmt::Debug for Medplum {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Medplum")
            .field("base_url", &self.settings.base_url)
            .finish_non_exhaustive()
    }
}

/// One client's token, fetched by one task at a time (the lock is held across the request).
#[derive(Default)]
struct TokenSlot(tokio::sync::Mutex<Option<Token>>);

struct Token {
    access: Secret,
    /// The client secret it was obtained with: a changed secret in `relay.toml` gets a new one.
    with: Secret,
    renew_at: Instant,
    /// `project.reference` of the token answer (`Project/<id>`).
    project: Option<String>,
}

/// One project's cache entry. `read` is held by the one task reading Medplum for it (single
/// flight); `state` is only ever held briefly.
#[derive(Default)]
struct ProjectSlot {
    read: tokio::sync::Mutex<()>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    verdict: Option<Verdict>,
    version: Option<String>,
    /// When the verdict was last confirmed by Medplum.
    checked: Option<Instant>,
    /// No read before this (after a failure, or a 429's Retry-After).
    retry_at: Option<Instant>,
    /// Reads are failing: logged once when it starts and once when it ends.
    failing: bool,
    last_used: Option<Instant>,
}

#[derive(Clone)]
enum Verdict {
    Found(project::Secrets),
    NotFound,
    /// Medplum will not let us read it: why, in words for the client and `check`.
    Denied(String),
}

/// Why a read did not give a verdict.
enum Failure {
    /// Not allowed: a verdict of its own, remembered like one.
    Denied(String),
    /// Medplum unreachable, slow, 5xx or 429: the last good secrets keep serving.
    Unavailable {
        why: String,
        retry_after: Option<Duration>,
    },
}

fn unavailable(why: impl Into<String>) -> Failure {
    Failure::Unavailable {
        why: why.into(),
        retry_after: None,
    }
}

/// A Medplum resource id (FHIR `id`): anything else cannot name a Project, and would not be
/// safe in a URL path.
fn is_resource_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

impl Medplum {
    pub fn new(settings: config::Medplum) -> Result<Medplum, TlsError> {
        let tls = tls::client_config(settings.ca_file.as_deref())?;
        let http = reqwest::Client::builder()
            .use_preconfigured_tls((*tls).clone())
            .timeout(settings.timeout)
            .connect_timeout(settings.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("project-relay/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| TlsError::File {
                path: "[medplum]".into(),
                reason: e.to_string(),
            })?;
        Ok(Medplum {
            settings,
            http,
            tokens: Mutex::default(),
            projects: Mutex::default(),
        })
    }

    pub fn settings(&self) -> &config::Medplum {
        &self.settings
    }

    /// The secrets of project `id`, read with `client` (`per_project`: the project's own
    /// client, whose token must name this project). Answers from the cache while it is
    /// younger than `refresh_secs`; otherwise one task reads Medplum and the others wait for
    /// its answer.
    pub async fn lookup(&self, id: &str, client: &MedplumClient, per_project: bool) -> Lookup {
        if !is_resource_id(id) {
            return Lookup::NotFound;
        }
        let slot = self.slot(id, client);
        if let Some(found) = self.fresh(&slot, id) {
            return found;
        }
        let _reading = slot.read.lock().await;
        if let Some(found) = self.fresh(&slot, id) {
            return found;
        }
        let now = Instant::now();
        let (version, wait) = {
            let state = slot.state.lock().unwrap_or_else(|e| e.into_inner());
            (
                state.version.clone(),
                state.retry_at.is_some_and(|at| at > now),
            )
        };
        if wait {
            return self.stale_or_unavailable(&slot, id);
        }
        let result = self.read(id, client, per_project, version.as_deref()).await;
        let mut state = slot.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        match result {
            Ok(Read::NotModified) => {
                metrics::medplum_read(id, "not_modified");
                state.checked = Some(now);
            }
            Ok(Read::Found { version, secrets }) => {
                metrics::medplum_read(id, "ok");
                let same = state.version.is_some() && state.version == version;
                if !same || !matches!(state.verdict, Some(Verdict::Found(_))) {
                    state.verdict = Some(Verdict::Found(Arc::new(*secrets)));
                }
                state.version = version;
                state.checked = Some(now);
            }
            Ok(Read::NotFound) => {
                metrics::medplum_read(id, "not_found");
                state.verdict = Some(Verdict::NotFound);
                state.version = None;
                state.checked = Some(now);
            }
            Err(Failure::Denied(why)) => {
                metrics::medplum_read(id, "denied");
                if !state.failing {
                    tracing::warn!(project = id, "Medplum secrets cannot be read: {why}");
                }
                state.failing = true;
                state.verdict = Some(Verdict::Denied(why));
                state.version = None;
                state.checked = Some(now);
                return self.answer(&state, id);
            }
            Err(Failure::Unavailable { why, retry_after }) => {
                metrics::medplum_read(id, "error");
                if !state.failing {
                    tracing::warn!(
                        project = id,
                        "Medplum secrets cannot be read: {why}; the last good secrets serve for up to {} s",
                        self.settings.max_stale.as_secs()
                    );
                }
                state.failing = true;
                state.retry_at =
                    Some(now + retry_after.unwrap_or_default().max(RETRY_AFTER_FAILURE));
                drop(state);
                return self.stale_or_unavailable(&slot, id);
            }
        }
        if std::mem::take(&mut state.failing) {
            tracing::info!(project = id, "Medplum secrets read again");
        }
        state.retry_at = None;
        self.answer(&state, id)
    }

    /// Whether `client` gets a token (for `check`).
    pub async fn check_client(&self, client: &MedplumClient) -> Result<(), String> {
        match self.token(client, false).await {
            Ok(_) => Ok(()),
            Err(Failure::Denied(why) | Failure::Unavailable { why, .. }) => Err(why),
        }
    }

    /// The upstreams of every project whose cached secrets are still served.
    pub fn targets(&self) -> Vec<project::SmtpTarget> {
        let map = self.projects.lock().unwrap_or_else(|e| e.into_inner());
        map.values()
            .filter_map(|slot| {
                let state = slot.state.lock().unwrap_or_else(|e| e.into_inner());
                let live = state
                    .checked
                    .is_some_and(|at| at.elapsed() < self.settings.max_stale);
                match &state.verdict {
                    Some(Verdict::Found(s)) if live => match &s.smtp {
                        ProjectSmtp::Active(r) => Some(r.target.clone()),
                        _ => None,
                    },
                    _ => None,
                }
            })
            .collect()
    }

    fn slot(&self, id: &str, client: &MedplumClient) -> Arc<ProjectSlot> {
        let mut map = self.projects.lock().unwrap_or_else(|e| e.into_inner());
        let key = (
            id.to_owned(),
            client.client_id.clone(),
            client.client_secret.clone(),
        );
        if !map.contains_key(&key) && map.len() >= MAX_PROJECTS {
            let horizon = self.settings.refresh.max(self.settings.max_stale);
            map.retain(|_, slot| {
                let state = slot.state.lock().unwrap_or_else(|e| e.into_inner());
                state.last_used.is_some_and(|at| at.elapsed() < horizon)
            });
            if map.len() >= MAX_PROJECTS {
                map.clear();
            }
        }
        map.entry(key).or_default().clone()
    }

    /// The cached answer, if Medplum confirmed it less than `refresh_secs` ago.
    fn fresh(&self, slot: &ProjectSlot, id: &str) -> Option<Lookup> {
        let mut state = slot.state.lock().unwrap_or_else(|e| e.into_inner());
        state.last_used = Some(Instant::now());
        let fresh = state
            .checked
            .is_some_and(|at| at.elapsed() < self.settings.refresh);
        fresh.then(|| self.answer(&state, id))
    }

    fn answer(&self, state: &State, id: &str) -> Lookup {
        match &state.verdict {
            Some(Verdict::Found(secrets)) => Lookup::Found(secrets.clone()),
            Some(Verdict::NotFound) => Lookup::NotFound,
            Some(Verdict::Denied(why)) => Lookup::Unreadable(Reply::project_unreadable(id, why)),
            None => Lookup::Unreadable(Reply::secrets_unavailable(id)),
        }
    }

    /// While Medplum cannot be read: the last good answer until `max_stale_secs` after it was
    /// last confirmed, then `451 4.4.3`.
    fn stale_or_unavailable(&self, slot: &ProjectSlot, id: &str) -> Lookup {
        let state = slot.state.lock().unwrap_or_else(|e| e.into_inner());
        let recent = state
            .checked
            .is_some_and(|at| at.elapsed() < self.settings.max_stale);
        match &state.verdict {
            Some(Verdict::Found(_) | Verdict::NotFound) if recent => {
                metrics::stale_secrets_served(id);
                self.answer(&state, id)
            }
            _ => Lookup::Unreadable(Reply::secrets_unavailable(id)),
        }
    }

    /// Reads Project `id`: with the cached token, renewed once on a 401.
    async fn read(
        &self,
        id: &str,
        client: &MedplumClient,
        per_project: bool,
        version: Option<&str>,
    ) -> Result<Read, Failure> {
        let mut renewed = false;
        loop {
            let (token, token_project) = self.token(client, renewed).await?;
            if per_project && token_project.as_deref() != Some(&format!("Project/{id}")) {
                return Err(Failure::Denied(format!(
                    "the Medplum client {} belongs to {}, not Project/{id}",
                    client.client_id,
                    token_project.as_deref().unwrap_or("no project")
                )));
            }
            let url = format!("{}fhir/R4/Project/{id}", self.settings.base_url);
            let mut request = self
                .http
                .get(&url)
                .bearer_auth(token.expose())
                .header("Accept", "application/fhir+json");
            if let Some(v) = version {
                request = request.header("If-None-Match", format!("W/\"{v}\""));
            }
            let response = request
                .send()
                .await
                .map_err(|e| unavailable(http_error("Medplum", &e)))?;
            let status = response.status().as_u16();
            match status {
                200 => {
                    let body = read_body(response).await?;
                    return parse_project(&body, id);
                }
                304 => return Ok(Read::NotModified),
                404 | 410 => return Ok(Read::NotFound),
                401 if !renewed => {
                    renewed = true;
                    continue;
                }
                401 => {
                    return Err(Failure::Denied(
                        "Medplum refused a fresh token for this project (401)".into(),
                    ));
                }
                403 => {
                    return Err(Failure::Denied(format!(
                        "the Medplum client {} may not read Project/{id} (403); it needs an admin ProjectMembership",
                        client.client_id
                    )));
                }
                429 => {
                    return Err(Failure::Unavailable {
                        why: "Medplum is rate limiting the relay (429)".into(),
                        retry_after: retry_after(&response),
                    });
                }
                _ => return Err(unavailable(format!("Medplum answered HTTP {status}"))),
            }
        }
    }

    /// The access token for `client`: the cached one until shortly before it expires, or a
    /// new one (`renew`: the cached one was refused).
    async fn token(
        &self,
        client: &MedplumClient,
        renew: bool,
    ) -> Result<(Secret, Option<String>), Failure> {
        let slot = {
            let mut map = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
            map.entry(client.client_id.clone()).or_default().clone()
        };
        let mut cached = slot.0.lock().await;
        if let Some(t) = cached.as_ref()
            && !renew
            && t.with == client.client_secret
            && Instant::now() < t.renew_at
        {
            return Ok((t.access.clone(), t.project.clone()));
        }
        let token = self.request_token(client).await;
        metrics::medplum_token(match &token {
            Ok(_) => "ok",
            Err(Failure::Denied(_)) => "denied",
            Err(Failure::Unavailable { .. }) => "error",
        });
        let token = token?;
        let answer = (token.access.clone(), token.project.clone());
        *cached = Some(token);
        Ok(answer)
    }

    async fn request_token(&self, client: &MedplumClient) -> Result<Token, Failure> {
        let form = [
            ("grant_type", "client_credentials"),
            ("client_id", client.client_id.as_str()),
            ("client_secret", client.client_secret.expose()),
        ];
        let response = self
            .http
            .post(&self.settings.token_url)
            .form(&form)
            .send()
            .await
            .map_err(|e| unavailable(http_error("the Medplum token endpoint", &e)))?;
        let status = response.status().as_u16();
        match status {
            200 => {}
            400 | 401 | 403 => {
                let body = read_body(response).await.unwrap_or_default();
                let error = serde_json::from_slice::<Value>(&body)
                    .ok()
                    .and_then(|v| v.get("error")?.as_str().map(short))
                    .unwrap_or_else(|| format!("HTTP {status}"));
                return Err(Failure::Denied(format!(
                    "Medplum refused the client credentials of {} ({error})",
                    client.client_id
                )));
            }
            429 => {
                return Err(Failure::Unavailable {
                    why: "the Medplum token endpoint is rate limiting the relay (429)".into(),
                    retry_after: retry_after(&response),
                });
            }
            _ => {
                return Err(unavailable(format!(
                    "the Medplum token endpoint answered HTTP {status}"
                )));
            }
        }
        let body = read_body(response).await?;
        let v: Value = serde_json::from_slice(&body)
            .map_err(|_| unavailable("the Medplum token answer is not JSON"))?;
        let access = v
            .get("access_token")
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| unavailable("the Medplum token answer has no access_token"))?;
        let expires_in = v
            .get("expires_in")
            .and_then(Value::as_u64)
            .ok_or_else(|| unavailable("the Medplum token answer has no expires_in"))?;
        let lifetime = Duration::from_secs(expires_in);
        // Renewed ahead of time, so a read never carries a token about to expire.
        let margin = (lifetime / 5).min(Duration::from_secs(60));
        Ok(Token {
            access: Secret::new(access),
            with: client.client_secret.clone(),
            renew_at: Instant::now() + lifetime - margin,
            project: v
                .pointer("/project/reference")
                .and_then(Value::as_str)
                .map(str::to_owned),
        })
    }
}

enum Read {
    NotModified,
    Found {
        version: Option<String>,
        secrets: Box<ProjectSecrets>,
    },
    NotFound,
}

async fn read_body(mut response: reqwest::Response) -> Result<Vec<u8>, Failure> {
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| unavailable(http_error("Medplum", &e)))?
    {
        if body.len() + chunk.len() > MAX_BODY {
            return Err(unavailable("the Medplum answer is too large"));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// A reqwest error in a few words. Its URL holds no secret, but its text is kept short.
fn http_error(what: &str, e: &reqwest::Error) -> String {
    if e.is_timeout() {
        format!("{what} did not answer in time")
    } else if e.is_connect() {
        format!("{what} cannot be reached")
    } else {
        format!("{what}: the exchange failed")
    }
}

fn short(s: &str) -> String {
    s.chars()
        .filter(|c| !c.is_control())
        .take(64)
        .collect::<String>()
}

fn retry_after(response: &reqwest::Response) -> Option<Duration> {
    let secs: u64 = response
        .headers()
        .get("retry-after")?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(Duration::from_secs(secs).min(MAX_RETRY_AFTER))
}

/// A Project resource's secrets, read as Medplum reads them: the first entry of a name wins,
/// the ports and `smtpMaxConnections` only from `valueInteger`, `smtpSecure` and
/// `smtpFallbackSecure` only from `valueBoolean`, the others only from `valueString`; `appName` from `Project.setting`.
fn parse_project(body: &[u8], id: &str) -> Result<Read, Failure> {
    let v: Value =
        serde_json::from_slice(body).map_err(|_| unavailable("the Medplum Project is not JSON"))?;
    if v.get("resourceType").and_then(Value::as_str) != Some("Project")
        || v.get("id").and_then(Value::as_str) != Some(id)
    {
        return Err(unavailable("Medplum answered with another resource"));
    }
    let version = v
        .pointer("/meta/versionId")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let empty = Vec::new();
    let list = |key: &str| v.get(key).and_then(Value::as_array).unwrap_or(&empty);
    let (secrets, settings) = (list("secret"), list("setting"));
    fn first<'v>(entries: &'v [Value], name: &str) -> Option<&'v Value> {
        entries
            .iter()
            .find(|e| e.get("name").and_then(Value::as_str) == Some(name))
    }
    let secrets = project::build(|name| {
        let (entry, field) = match name {
            "appName" => (first(settings, name)?, "valueString"),
            "smtpPort" | "smtpFallbackPort" | "smtpMaxConnections" => {
                (first(secrets, name)?, "valueInteger")
            }
            "smtpSecure" | "smtpFallbackSecure" => (first(secrets, name)?, "valueBoolean"),
            _ => (first(secrets, name)?, "valueString"),
        };
        Some(match entry.get(field) {
            Some(Value::String(s)) => Entry::Text(s),
            Some(Value::Bool(b)) => Entry::Boolean(*b),
            Some(n @ Value::Number(_)) => n.as_i64().map_or(Entry::Other, Entry::Integer),
            _ => Entry::Other,
        })
    });
    Ok(Read::Found {
        version,
        secrets: Box::new(secrets),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn project_secrets_are_read_as_medplum_reads_them() {
        let body = br#"{"resourceType":"Project","id":"p1","meta":{"versionId":"7"},
            "setting":[{"name":"appName","valueString":"Acme"}],
            "secret":[{"name":"smtpHost","valueString":"smtp.acme.example"},
                      {"name":"smtpHost","valueString":"second.example"},
                      {"name":"smtpPort","valueString":"587"},
                      {"name":"smtpUsername","valueString":"u"},
                      {"name":"smtpPassword","valueString":"p"},
                      {"name":"smtpFromAddress","valueString":"noreply@acme.example"},
                      {"name":"botSecret","valueString":"x"}]}"#;
        let Ok(Read::Found { version, secrets }) = parse_project(body, "p1") else {
            panic!("not read")
        };
        assert_eq!(version.as_deref(), Some("7"));
        assert_eq!(secrets.app_name.as_deref(), Some("Acme"));
        assert_eq!(secrets.smtp.bad_entries(), ["smtpPort"]);
        let fixed = String::from_utf8_lossy(body).replace(
            r#"{"name":"smtpPort","valueString":"587"}"#,
            r#"{"name":"smtpPort","valueInteger":587}"#,
        );
        let Ok(Read::Found { secrets, .. }) = parse_project(fixed.as_bytes(), "p1") else {
            panic!("not read")
        };
        let ProjectSmtp::Active(r) = &secrets.smtp else {
            panic!("not active")
        };
        assert_eq!(r.target.host, "smtp.acme.example");
        assert!(matches!(
            parse_project(fixed.as_bytes(), "other"),
            Err(Failure::Unavailable { .. })
        ));
    }

    #[test]
    fn only_resource_ids_are_looked_up() {
        assert!(is_resource_id("cabd683a-dc09-492f-a513-416c6f3c16bd"));
        for bad in ["", "a/b", "../x", "a b", "p?x=1", &"a".repeat(65)] {
            assert!(!is_resource_id(bad), "{bad}");
        }
    }
}

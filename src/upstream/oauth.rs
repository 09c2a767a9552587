//! OAuth2 access tokens for XOAUTH2 upstreams (Microsoft 365, Google): one cached token per
//! client, renewed in the background before it expires, fetched by one task at a time, and
//! replaced when an upstream refuses it. Used by the upstream module and nothing else.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use serde_json::Value;
use tokio::time::Instant;

use super::UpstreamError;
use crate::project::{OAuthClient, SecretKey};

/// Used when a token answer has no `expires_in` (it is only RECOMMENDED, RFC 6749 §5.1).
const DEFAULT_LIFETIME: Duration = Duration::from_secs(300);
/// Largest token answer read.
const MAX_BODY: usize = 64 * 1024;

pub struct Tokens {
    http: RwLock<reqwest::Client>,
    slots: Mutex<HashMap<OAuthClient, Arc<Slot>>>,
}

#[derive(Default)]
struct Slot {
    /// Held across a token request: one request at a time per client.
    token: tokio::sync::Mutex<Option<Token>>,
    /// A refresh token the endpoint rotated: it replaces the configured one, in memory.
    rotated: Mutex<Option<SecretKey>>,
    renewing: std::sync::atomic::AtomicBool,
}

#[derive(Clone)]
struct Token {
    access: SecretKey,
    /// From here on a new token is fetched in the background.
    renew_at: Instant,
    /// From here on this token is never sent.
    usable_until: Instant,
}

impl Tokens {
    pub fn new(tls: &rustls::ClientConfig, timeout: Duration) -> Tokens {
        Tokens {
            http: RwLock::new(http_client(tls, timeout)),
            slots: Mutex::default(),
        }
    }

    /// New TLS roots or timeout for token requests; cached tokens stay.
    pub fn configure(&self, tls: &rustls::ClientConfig, timeout: Duration) {
        *self.http.write().unwrap_or_else(|e| e.into_inner()) = http_client(tls, timeout);
    }

    /// A token for `client` that has not expired. `refused`: the upstream refused this one,
    /// so it is dropped and a new one fetched.
    pub async fn get(
        self: &Arc<Self>,
        client: &OAuthClient,
        refused: Option<&SecretKey>,
    ) -> Result<SecretKey, UpstreamError> {
        let slot = self.slot(client);
        let mut cached = slot.token.lock().await;
        let now = Instant::now();
        if let Some(t) = cached.as_ref()
            && now < t.usable_until
            && refused != Some(&t.access)
        {
            if now >= t.renew_at
                && !slot
                    .renewing
                    .swap(true, std::sync::atomic::Ordering::AcqRel)
            {
                // Renewed ahead of time, off the message's path.
                let (tokens, client, slot) = (self.clone(), client.clone(), slot.clone());
                tokio::spawn(async move {
                    let mut cached = slot.token.lock().await;
                    if cached
                        .as_ref()
                        .is_some_and(|t| Instant::now() >= t.renew_at)
                        && let Ok(t) = tokens.request(&client, &slot).await
                    {
                        *cached = Some(t);
                    }
                    slot.renewing
                        .store(false, std::sync::atomic::Ordering::Release);
                });
            }
            return Ok(t.access.clone());
        }
        let token = self.request(client, &slot).await?;
        if Instant::now() >= token.usable_until {
            return Err(UpstreamError::OAuth(format!(
                "token endpoint {}: the token it issued expires at once",
                host_of(&client.token_url)
            )));
        }
        let access = token.access.clone();
        *cached = Some(token);
        Ok(access)
    }

    fn slot(&self, client: &OAuthClient) -> Arc<Slot> {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots.entry(client.clone()).or_default().clone()
    }

    /// Forgets the clients no upstream target names any more.
    pub fn retain(&self, keep: &[&OAuthClient]) {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots.retain(|c, _| keep.contains(&c));
    }

    async fn request(&self, client: &OAuthClient, slot: &Slot) -> Result<Token, UpstreamError> {
        let host = host_of(&client.token_url);
        let refresh = slot
            .rotated
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .or_else(|| client.refresh_token.clone());
        let mut form: Vec<(&str, &str)> = vec![
            ("client_id", &client.client_id),
            ("client_secret", client.client_secret.expose()),
        ];
        match &refresh {
            Some(r) => {
                form.push(("grant_type", "refresh_token"));
                form.push(("refresh_token", r.expose()));
            }
            None => form.push(("grant_type", "client_credentials")),
        }
        if let Some(scope) = &client.scope {
            form.push(("scope", scope));
        }
        let http = self.http.read().unwrap_or_else(|e| e.into_inner()).clone();
        let fail = |why: String| UpstreamError::OAuth(format!("token endpoint {host}: {why}"));
        let started = Instant::now();
        let mut response = http
            .post(&client.token_url)
            .form(&form)
            .send()
            .await
            .map_err(|e| {
                fail(if e.is_timeout() {
                    "no answer in time".into()
                } else if e.is_connect() {
                    "cannot be reached".into()
                } else {
                    "the exchange failed".into()
                })
            })?;
        let status = response.status().as_u16();
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|_| fail("the answer broke off".into()))?
        {
            if body.len() + chunk.len() > MAX_BODY {
                return Err(fail("the answer is too large".into()));
            }
            body.extend_from_slice(&chunk);
        }
        let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        if status != 200 {
            // Only the standard error code: a description may quote what was sent.
            let code = v
                .get("error")
                .and_then(Value::as_str)
                .filter(|c| c.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'))
                .map_or_else(
                    || format!("HTTP {status}"),
                    |c| format!("{c} (HTTP {status})"),
                );
            crate::metrics::oauth_token(false);
            return Err(fail(code));
        }
        let access = v
            .get("access_token")
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| fail("no access_token in the answer".into()))?;
        let lifetime = v
            .get("expires_in")
            .and_then(|e| e.as_u64().or_else(|| e.as_str()?.parse().ok()))
            .map_or(DEFAULT_LIFETIME, Duration::from_secs);
        if let Some(rotated) = v.get("refresh_token").and_then(Value::as_str)
            && refresh.is_some()
        {
            *slot.rotated.lock().unwrap_or_else(|e| e.into_inner()) = Some(SecretKey::new(rotated));
        }
        crate::metrics::oauth_token(true);
        // Counted from when it was asked for: the endpoint's clock started before ours.
        Ok(Token {
            access: SecretKey::new(access),
            renew_at: started + lifetime - (lifetime / 4).min(Duration::from_secs(300)),
            usable_until: started + lifetime - (lifetime / 10).min(Duration::from_secs(30)),
        })
    }
}

fn http_client(tls: &rustls::ClientConfig, timeout: Duration) -> reqwest::Client {
    reqwest::Client::builder()
        .use_preconfigured_tls(tls.clone())
        .timeout(timeout)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap_or_default()
}

/// The host of a URL, for errors that must not quote the rest.
fn host_of(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    rest.split(['/', '?', '#']).next().unwrap_or_default()
}

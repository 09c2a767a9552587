//! `relay.toml`: the serde types, loading, and validation that reports every problem with its
//! key path. Project secrets are checked one by one, so a bad project is marked misconfigured
//! (its mail refused) instead of stopping the relay.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use toml::Value;

use crate::address::{self, ApprovedList, Mailbox};
use crate::project::{self, Entry, ProjectSecrets, Secrets};
pub use crate::project::{
    Auth, Credentials, Limits, OAuthClient, PasswordMethod, ProjectRelay, ProjectSmtp, RateLimit,
    SecretKey, SmtpTarget, TlsMode,
};
use crate::smtp::auth::Users;

/// A password or key: never printed by `Debug` or `Display`.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Through `Value`, so a type error cannot echo the value the way serde's messages do.
        match Value::deserialize(d)? {
            Value::String(s) => Ok(Secret(s)),
            _ => Err(serde::de::Error::custom("must be a string")),
        }
    }
}

/// `"a@x, b@y"` or `["a@x", "b@y"]`.
fn address_list(value: &Value) -> Option<ApprovedList> {
    project::approved_list(entry(value))
}

/// A TOML value as a spec secret entry, for the source-neutral rules in `project`.
fn entry(value: &Value) -> Entry<'_> {
    match value {
        Value::String(s) => Entry::Text(s),
        Value::Integer(n) => Entry::Integer(*n),
        Value::Boolean(b) => Entry::Boolean(*b),
        Value::Array(items) => items
            .iter()
            .map(Value::as_str)
            .collect::<Option<Vec<_>>>()
            .map_or(Entry::Other, Entry::Texts),
        _ => Entry::Other,
    }
}

// ----- the file as written -----

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    listener: RawListener,
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    upstream: RawUpstream,
    #[serde(default)]
    projects: BTreeMap<String, RawProject>,
    #[serde(default)]
    admin: RawAdmin,
    #[serde(default)]
    log: RawLog,
    medplum: Option<RawMedplum>,
}

/// `[medplum]`: the Medplum server that holds project secrets.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMedplum {
    base_url: String,
    token_url: Option<String>,
    ca_file: Option<PathBuf>,
    #[serde(default = "default_medplum_timeout_secs")]
    timeout_secs: u64,
    #[serde(default = "default_refresh_secs")]
    refresh_secs: u64,
    #[serde(default = "default_max_stale_secs")]
    max_stale_secs: u64,
    client_id: Option<String>,
    client_secret: Option<Secret>,
    #[serde(default, rename = "client_secret_file")]
    _client_secret_file: Option<serde::de::IgnoredAny>,
}

fn default_medplum_timeout_secs() -> u64 {
    10
}

fn default_refresh_secs() -> u64 {
    60
}

fn default_max_stale_secs() -> u64 {
    600
}

/// A Medplum URL: `https://`, or `http://` to this machine only (a local Medplum in
/// development and tests), so client secrets never cross a network in clear.
fn medplum_url(key: &str, url: &str, problems: &mut Vec<String>) -> String {
    let url = url.trim();
    if let Err(why) = project::check_secret_url(url) {
        problems.push(format!("{key}: {why}"));
    }
    url.to_owned()
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    listen: Option<String>,
    /// Bearer token for the page and `/api` (mail content); `token_file` as for passwords.
    token: Option<Secret>,
    #[serde(default, rename = "token_file")]
    _token_file: Option<serde::de::IgnoredAny>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLog {
    #[serde(default)]
    format: LogFormat,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// For people: one line per event.
    #[default]
    Text,
    /// For log shippers: one JSON object per line.
    Json,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListener {
    smtp: Option<String>,
    smtps: Option<String>,
    certificate: Option<PathBuf>,
    private_key: Option<PathBuf>,
    hostname: Option<String>,
    #[serde(default = "default_project_header")]
    project_header: String,
    #[serde(default = "default_max_message_size")]
    max_message_size: usize,
    #[serde(default = "default_max_recipients")]
    max_recipients: usize,
    #[serde(default = "default_max_connections")]
    max_connections: usize,
    #[serde(default = "default_idle_timeout")]
    idle_timeout_secs: u64,
    #[serde(default = "default_tls_handshake_timeout")]
    tls_handshake_timeout_secs: u64,
    #[serde(default)]
    allow: Vec<String>,
    #[serde(default)]
    require_auth: bool,
    #[serde(default)]
    allow_plaintext_auth: bool,
    #[serde(default = "default_max_connections_per_ip")]
    max_connections_per_ip: usize,
    #[serde(default = "default_data_timeout")]
    data_timeout_secs: u64,
    #[serde(default = "default_max_session")]
    max_session_secs: u64,
    #[serde(default = "default_shutdown_grace")]
    shutdown_grace_secs: u64,
    #[serde(default = "default_auth_failure_delay")]
    auth_failure_delay_ms: u64,
    #[serde(default)]
    proxy_protocol: bool,
    /// Peers whose PROXY headers are believed; default loopback only.
    proxy_protocol_from: Option<Vec<String>>,
    #[serde(default = "default_max_buffered_bytes")]
    max_buffered_bytes: usize,
}

impl Default for RawListener {
    fn default() -> Self {
        RawListener {
            smtp: Some("127.0.0.1:2525".into()),
            smtps: None,
            certificate: None,
            private_key: None,
            hostname: None,
            project_header: default_project_header(),
            max_message_size: default_max_message_size(),
            max_recipients: default_max_recipients(),
            max_connections: default_max_connections(),
            idle_timeout_secs: default_idle_timeout(),
            tls_handshake_timeout_secs: default_tls_handshake_timeout(),
            allow: Vec::new(),
            require_auth: false,
            allow_plaintext_auth: false,
            max_connections_per_ip: default_max_connections_per_ip(),
            data_timeout_secs: default_data_timeout(),
            max_session_secs: default_max_session(),
            shutdown_grace_secs: default_shutdown_grace(),
            auth_failure_delay_ms: default_auth_failure_delay(),
            proxy_protocol: false,
            proxy_protocol_from: None,
            max_buffered_bytes: default_max_buffered_bytes(),
        }
    }
}

fn default_project_header() -> String {
    "X-Project-Id".into()
}
fn default_max_message_size() -> usize {
    25 * 1024 * 1024
}
fn default_max_recipients() -> usize {
    100
}
fn default_max_connections() -> usize {
    1000
}
fn default_idle_timeout() -> u64 {
    300
}
fn default_tls_handshake_timeout() -> u64 {
    10
}
fn default_max_connections_per_ip() -> usize {
    20
}
fn default_data_timeout() -> u64 {
    180
}
fn default_max_session() -> u64 {
    1800
}
fn default_shutdown_grace() -> u64 {
    30
}
fn default_auth_failure_delay() -> u64 {
    1000
}
fn default_max_buffered_bytes() -> usize {
    512 * 1024 * 1024
}
fn default_pool_size() -> usize {
    100
}
fn default_true() -> bool {
    true
}
fn default_timeout_secs() -> u64 {
    30
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    #[serde(rename = "allowProjectSmtp", default = "default_true")]
    allow_project_smtp: bool,
    #[serde(rename = "supportEmail")]
    support_email: Option<String>,
    #[serde(rename = "approvedSenderEmails")]
    approved_sender_emails: Option<Value>,
    smtp: Option<RawServerSmtp>,
    smtp_fallback: Option<RawServerSmtp>,
    capture: Option<RawCapture>,
}

impl Default for RawServer {
    fn default() -> Self {
        RawServer {
            allow_project_smtp: true,
            support_email: None,
            approved_sender_emails: None,
            smtp: None,
            smtp_fallback: None,
            capture: None,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServerSmtp {
    host: String,
    port: u16,
    username: Option<String>,
    password: Option<Secret>,
    /// Read by `resolve_values` into `password`; here only so the key is known.
    #[serde(default, rename = "password_file")]
    _password_file: Option<serde::de::IgnoredAny>,
    secure: Option<bool>,
    auth_method: Option<String>,
    oauth_token_url: Option<String>,
    oauth_client_id: Option<String>,
    oauth_client_secret: Option<Secret>,
    #[serde(default, rename = "oauth_client_secret_file")]
    _oauth_client_secret_file: Option<serde::de::IgnoredAny>,
    oauth_scope: Option<String>,
    oauth_refresh_token: Option<Secret>,
    #[serde(default, rename = "oauth_refresh_token_file")]
    _oauth_refresh_token_file: Option<serde::de::IgnoredAny>,
    rate_limit: Option<String>,
    max_connections: Option<usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCapture {
    dir: PathBuf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    ca_file: Option<PathBuf>,
    #[serde(default = "default_timeout_secs")]
    timeout_secs: u64,
    #[serde(default = "default_pool_size")]
    pool_size: usize,
    /// The name in the relay's EHLO; default `[listener] hostname` when set, else this
    /// machine's host name.
    helo_name: Option<String>,
    #[serde(default = "default_max_connections_per_upstream")]
    max_connections_per_upstream: usize,
    #[serde(default = "default_limit_wait")]
    limit_wait_secs: u64,
    #[serde(default = "default_max_messages_per_connection")]
    max_messages_per_connection: u32,
    #[serde(default = "default_circuit_failures")]
    circuit_failures: u32,
    #[serde(default = "default_circuit_open_secs")]
    circuit_open_secs: u64,
}

fn default_circuit_failures() -> u32 {
    3
}
fn default_circuit_open_secs() -> u64 {
    30
}

/// Postfix's default `smtpd_client_connection_count_limit`.
fn default_max_connections_per_upstream() -> usize {
    50
}
fn default_limit_wait() -> u64 {
    10
}
/// OpenSMTPD's default `smtp limit max-mails`; Exim's `smtp_accept_max_per_connection` too.
fn default_max_messages_per_connection() -> u32 {
    100
}

impl Default for RawUpstream {
    fn default() -> Self {
        RawUpstream {
            ca_file: None,
            timeout_secs: default_timeout_secs(),
            pool_size: default_pool_size(),
            helo_name: None,
            circuit_failures: default_circuit_failures(),
            circuit_open_secs: default_circuit_open_secs(),
            max_connections_per_upstream: default_max_connections_per_upstream(),
            limit_wait_secs: default_limit_wait(),
            max_messages_per_connection: default_max_messages_per_connection(),
        }
    }
}

/// A project's secrets as written: every value kept untyped so that a wrong type marks the
/// project misconfigured instead of failing the whole file (and is never echoed).
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawProject {
    #[serde(rename = "smtpHost")]
    smtp_host: Option<Value>,
    #[serde(rename = "smtpPort")]
    smtp_port: Option<Value>,
    #[serde(rename = "smtpUsername")]
    smtp_username: Option<Value>,
    #[serde(rename = "smtpPassword")]
    smtp_password: Option<Value>,
    #[serde(rename = "smtpSecure")]
    smtp_secure: Option<Value>,
    #[serde(rename = "smtpFromAddress")]
    smtp_from_address: Option<Value>,
    #[serde(rename = "smtpApprovedSenders")]
    smtp_approved_senders: Option<Value>,
    #[serde(rename = "appName")]
    app_name: Option<Value>,
    #[serde(rename = "smtpAuthMethod")]
    smtp_auth_method: Option<Value>,
    #[serde(rename = "smtpOAuthTokenUrl")]
    smtp_oauth_token_url: Option<Value>,
    #[serde(rename = "smtpOAuthClientId")]
    smtp_oauth_client_id: Option<Value>,
    #[serde(rename = "smtpOAuthClientSecret")]
    smtp_oauth_client_secret: Option<Value>,
    #[serde(rename = "smtpOAuthScope")]
    smtp_oauth_scope: Option<Value>,
    #[serde(rename = "smtpOAuthRefreshToken")]
    smtp_oauth_refresh_token: Option<Value>,
    #[serde(rename = "smtpFallbackHost")]
    smtp_fallback_host: Option<Value>,
    #[serde(rename = "smtpFallbackPort")]
    smtp_fallback_port: Option<Value>,
    #[serde(rename = "smtpFallbackUsername")]
    smtp_fallback_username: Option<Value>,
    #[serde(rename = "smtpFallbackPassword")]
    smtp_fallback_password: Option<Value>,
    #[serde(rename = "smtpFallbackSecure")]
    smtp_fallback_secure: Option<Value>,
    #[serde(default, rename = "smtpFallbackPasswordFile")]
    _smtp_fallback_password_file: Option<serde::de::IgnoredAny>,
    #[serde(rename = "smtpRateLimit")]
    smtp_rate_limit: Option<Value>,
    #[serde(rename = "smtpMaxConnections")]
    smtp_max_connections: Option<Value>,
    #[serde(default, rename = "smtpOAuthClientSecretFile")]
    _smtp_oauth_client_secret_file: Option<serde::de::IgnoredAny>,
    #[serde(default, rename = "smtpOAuthRefreshTokenFile")]
    _smtp_oauth_refresh_token_file: Option<serde::de::IgnoredAny>,
    /// Listener AUTH for this project: a username, and one password or a list (rotation).
    #[serde(rename = "relayUsername")]
    relay_username: Option<String>,
    #[serde(rename = "relayPassword")]
    relay_password: Option<Value>,
    /// Capture this project's mail to this folder instead of sending it (staging).
    #[serde(rename = "captureDir")]
    capture_dir: Option<Value>,
    /// The project's own admin ClientApplication in Medplum: its secrets are read there.
    #[serde(rename = "medplumClientId")]
    medplum_client_id: Option<String>,
    #[serde(rename = "medplumClientSecret")]
    medplum_client_secret: Option<Secret>,
    #[serde(default, rename = "medplumClientSecretFile")]
    _medplum_client_secret_file: Option<serde::de::IgnoredAny>,
    // Read by `resolve_values` into the secret they name; here only so the keys are known.
    #[serde(default, rename = "smtpPasswordFile")]
    _smtp_password_file: Option<serde::de::IgnoredAny>,
    #[serde(default, rename = "relayPasswordFile")]
    _relay_password_file: Option<serde::de::IgnoredAny>,
}

// ----- the validated config -----

#[derive(Debug, Clone)]
pub struct Config {
    pub listener: Listener,
    /// The admin HTTP listener (`/metrics`, `/healthz`, `/readyz`, the capture inbox API).
    pub admin_listen: Option<String>,
    /// Required (as `Authorization: Bearer`) for `/api`; without it, `/api` answers loopback
    /// clients only.
    pub admin_token: Option<Secret>,
    pub log_format: LogFormat,
    /// Relay users for listener AUTH, from the projects' `relayUsername`/`relayPassword`.
    pub users: Arc<Users>,
    pub server: Server,
    pub upstream: Upstream,
    pub projects: BTreeMap<String, Project>,
    /// `[medplum]`, when project secrets are read there.
    pub medplum: Option<Medplum>,
}

#[derive(Debug, Clone)]
pub struct Listener {
    pub smtp: Option<String>,
    pub smtps: Option<String>,
    pub tls: Option<TlsFiles>,
    pub hostname: String,
    pub project_header: String,
    pub max_message_size: usize,
    pub max_recipients: usize,
    pub max_connections: usize,
    pub idle_timeout: Duration,
    pub tls_handshake_timeout: Duration,
    /// Peers besides loopback that may send without AUTH.
    pub allow: Vec<ipnet::IpNet>,
    pub require_auth: bool,
    pub allow_plaintext_auth: bool,
    pub max_connections_per_ip: usize,
    pub data_timeout: Duration,
    pub max_session: Duration,
    pub shutdown_grace: Duration,
    pub auth_failure_delay: Duration,
    /// Every connection starts with a PROXY protocol header (v1 or v2).
    pub proxy_protocol: bool,
    /// The load balancers: the only peers whose PROXY headers are believed.
    pub proxy_protocol_from: Vec<ipnet::IpNet>,
    /// Message bytes held in memory across all sessions at once.
    pub max_buffered_bytes: usize,
}

impl Listener {
    /// Loopback peers and those in `allow` may send without AUTH.
    pub fn is_trusted(&self, ip: std::net::IpAddr) -> bool {
        let ip = ip.to_canonical();
        ip.is_loopback() || self.is_allowed(ip)
    }

    /// Named in `allow` (the only trust an address from a PROXY header can have).
    pub fn is_allowed(&self, ip: std::net::IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.allow.iter().any(|net| net.contains(&ip))
    }

    /// A peer whose PROXY header is believed.
    pub fn may_send_proxy_header(&self, ip: std::net::IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.proxy_protocol_from.iter().any(|net| net.contains(&ip))
    }
}

#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub certificate: PathBuf,
    pub private_key: PathBuf,
}

#[derive(Debug, Clone)]
pub struct Server {
    pub allow_project_smtp: bool,
    pub support_email: Option<Mailbox>,
    pub approved_sender_emails: ApprovedList,
    pub provider: Option<Provider>,
    /// `[server.smtp_fallback]`: takes server mail the provider did not take.
    pub fallback: Option<SmtpTarget>,
    pub limits: Limits,
}

/// Where the server-wide mail goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Provider {
    Smtp(SmtpTarget),
    Capture(PathBuf),
}

#[derive(Debug, Clone)]
pub struct Upstream {
    pub ca_file: Option<PathBuf>,
    pub timeout: Duration,
    /// Idle connections kept per upstream when traffic drops (more are closed after 5 s idle).
    pub pool_size: usize,
    /// The name in the relay's EHLO to upstreams.
    pub helo_name: String,
    /// Connections open at once to one upstream with one identity.
    pub max_connections_per_upstream: usize,
    /// How long a message waits for an upstream connection (or, later, a rate limit).
    pub limit_wait: Duration,
    /// Messages one upstream connection carries before it is replaced (0: no limit).
    pub max_messages_per_connection: u32,
    /// Failures in a row after which a primary relay with a fallback is skipped...
    pub circuit_failures: u32,
    /// ... for this long; then one message tries it again.
    pub circuit_open: Duration,
}

/// A project the file names: where its secrets come from, and the relay-local settings.
#[derive(Debug, Clone)]
pub struct Project {
    pub source: Source,
    /// Capture this project's mail here instead of sending it.
    pub capture_dir: Option<PathBuf>,
}

impl Project {
    /// The secrets written in the project's table, if that is where they come from.
    pub fn file_secrets(&self) -> Option<&ProjectSecrets> {
        match &self.source {
            Source::File(s) => Some(s),
            Source::Medplum(_) => None,
        }
    }
}

/// Where a project's secrets come from: exactly one place.
#[derive(Debug, Clone)]
pub enum Source {
    /// The spec's secrets written in the project's table.
    File(Secrets),
    /// Read live from Medplum with this client (`None`: the fleet credential).
    Medplum(Option<MedplumClient>),
}

/// A Medplum ClientApplication's client-credentials pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MedplumClient {
    pub client_id: String,
    pub client_secret: Secret,
}

/// `[medplum]`: where project secrets are read live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Medplum {
    /// Ends with `/`.
    pub base_url: String,
    pub token_url: String,
    pub ca_file: Option<PathBuf>,
    pub timeout: Duration,
    pub refresh: Duration,
    pub max_stale: Duration,
    /// A super-admin client: any project id without a table is looked up with it.
    pub fleet: Option<MedplumClient>,
}

// ----- errors -----

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}", .0.join("\n"))]
    Invalid(Vec<String>),
}

impl Config {
    /// Reads and validates a config file; relative paths in it are taken from its folder.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Config::from_toml_str(&text, base).map_err(|e| match e {
            ConfigError::Invalid(problems) => ConfigError::Invalid(
                problems
                    .into_iter()
                    .map(|p| format!("{}: {p}", path.display()))
                    .collect(),
            ),
            other => other,
        })
    }

    /// Parses and validates TOML text; relative paths are resolved against `base`.
    pub fn from_toml_str(text: &str, base: &Path) -> Result<Config, ConfigError> {
        // First straight from the text, so unknown keys and wrong types are reported with
        // their line. Only the message and line, never the source snippet: it may hold a
        // secret.
        let line_error = |e: toml::de::Error| {
            let line = e
                .span()
                .map(|s| format!("line {}: ", text[..s.start].matches('\n').count() + 1))
                .unwrap_or_default();
            ConfigError::Invalid(vec![format!("{line}{}", e.message().trim())])
        };
        toml::from_str::<RawConfig>(text).map_err(line_error)?;
        // Then again with `${VAR}` values and `*File` secrets filled in.
        let mut table: toml::Table = toml::from_str(text).map_err(line_error)?;
        let mut problems = Vec::new();
        resolve_values(&mut table, "", base, &mut problems);
        if !problems.is_empty() {
            return Err(ConfigError::Invalid(problems));
        }
        let raw: RawConfig = Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| {
                ConfigError::Invalid(vec![e.message().trim().to_owned()])
            })?;
        let config = validate(raw, base, &mut problems);
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }
}

/// Secrets that may instead be read from a file named by `<key>File` (or `<key>_file`), as
/// container platforms mount them.
const FILE_SECRETS: &[(&str, &str)] = &[
    ("smtpPasswordFile", "smtpPassword"),
    ("relayPasswordFile", "relayPassword"),
    ("password_file", "password"),
    ("token_file", "token"),
    ("client_secret_file", "client_secret"),
    ("medplumClientSecretFile", "medplumClientSecret"),
    ("smtpOAuthClientSecretFile", "smtpOAuthClientSecret"),
    ("smtpFallbackPasswordFile", "smtpFallbackPassword"),
    ("smtpOAuthRefreshTokenFile", "smtpOAuthRefreshToken"),
    ("oauth_client_secret_file", "oauth_client_secret"),
    ("oauth_refresh_token_file", "oauth_refresh_token"),
];

/// Fills in `"${VAR}"` string values from the environment and `*File` secrets from their
/// files, naming the key of anything missing. Never echoes a value.
fn resolve_values(table: &mut toml::Table, path: &str, base: &Path, problems: &mut Vec<String>) {
    for (file_key, key) in FILE_SECRETS {
        let Some(file) = table.remove(*file_key) else {
            continue;
        };
        let at = format!("{path}{file_key}");
        if table.contains_key(*key) {
            problems.push(format!("{at}: set either {key} or {file_key}, not both"));
            continue;
        }
        let Value::String(file) = file else {
            problems.push(format!("{at}: must be a file path"));
            continue;
        };
        let file = expand_env(&file, &at, problems).unwrap_or(file);
        match std::fs::read_to_string(resolve(base, PathBuf::from(&file))) {
            Ok(secret) => {
                let secret = secret.strip_suffix('\n').unwrap_or(&secret);
                let secret = secret.strip_suffix('\r').unwrap_or(secret);
                table.insert((*key).to_owned(), Value::String(secret.to_owned()));
            }
            Err(e) => problems.push(format!("{at}: cannot read {file}: {e}")),
        }
    }
    for (key, value) in table.iter_mut() {
        resolve_value(value, &format!("{path}{key}"), base, problems);
    }
}

fn resolve_value(value: &mut Value, at: &str, base: &Path, problems: &mut Vec<String>) {
    match value {
        Value::String(s) => {
            if let Some(expanded) = expand_env(s, at, problems) {
                *s = expanded;
            }
        }
        Value::Table(t) => resolve_values(t, &format!("{at}."), base, problems),
        Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                resolve_value(item, &format!("{at}[{i}]"), base, problems);
            }
        }
        _ => {}
    }
}

/// `"${NAME}"` as the whole value: the variable's value. Anything else is left alone.
fn expand_env(s: &str, at: &str, problems: &mut Vec<String>) -> Option<String> {
    let name = s.strip_prefix("${")?.strip_suffix('}')?;
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return None;
    }
    match std::env::var(name) {
        Ok(v) => Some(v),
        Err(_) => {
            problems.push(format!("{at}: environment variable {name} is not set"));
            None
        }
    }
}

/// Addresses or CIDR blocks, each bad entry named under `key`.
fn networks(key: &str, list: &[String], problems: &mut Vec<String>) -> Vec<ipnet::IpNet> {
    list.iter()
        .filter_map(|a| {
            let parsed = a
                .parse::<ipnet::IpNet>()
                .or_else(|_| a.parse::<std::net::IpAddr>().map(ipnet::IpNet::from));
            if parsed.is_err() {
                problems.push(format!("{key}: {a:?} is not an address or CIDR block"));
            }
            parsed.ok()
        })
        .collect()
}

/// This machine's host name, for the EHLO to upstreams when no name is configured.
fn system_host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| address::is_helo_name(h))
        .unwrap_or_else(|| "localhost".into())
}

fn resolve(base: &Path, p: PathBuf) -> PathBuf {
    if p.is_absolute() { p } else { base.join(p) }
}

fn validate(raw: RawConfig, base: &Path, problems: &mut Vec<String>) -> Config {
    let mut l = raw.listener;
    if l.smtp.is_none() && l.smtps.is_none() {
        l.smtp = RawListener::default().smtp;
    }
    let tls = match (l.certificate, l.private_key) {
        (Some(c), Some(k)) => Some(TlsFiles {
            certificate: resolve(base, c),
            private_key: resolve(base, k),
        }),
        (None, None) => None,
        (Some(_), None) => {
            problems.push("listener.private_key: required with listener.certificate".into());
            None
        }
        (None, Some(_)) => {
            problems.push("listener.certificate: required with listener.private_key".into());
            None
        }
    };
    if l.max_buffered_bytes < l.max_message_size {
        problems
            .push("listener.max_buffered_bytes: must be at least listener.max_message_size".into());
    }
    if l.smtps.is_some() && tls.is_none() {
        problems.push("listener.smtps: needs listener.certificate and listener.private_key".into());
    }
    if let Some(h) = &l.hostname
        && (h.is_empty() || h.chars().any(|c| c.is_whitespace() || c.is_control()))
    {
        problems.push("listener.hostname: must be a host name without spaces".into());
    }
    let helo_name = match (&raw.upstream.helo_name, &l.hostname) {
        (Some(name), _) => {
            if !address::is_helo_name(name) {
                problems.push(
                    "upstream.helo_name: must be a domain name or an address literal such as [192.0.2.1]"
                        .into(),
                );
            }
            name.clone()
        }
        (None, Some(hostname)) => hostname.clone(),
        (None, None) => system_host_name(),
    };
    let header_ok = !l.project_header.is_empty()
        && l.project_header
            .bytes()
            .all(|b| (33..=126).contains(&b) && b != b':');
    if !header_ok {
        problems.push("listener.project_header: must be a header field name".into());
    }
    for (key, value) in [
        ("listener.max_message_size", l.max_message_size as u64),
        ("listener.max_recipients", l.max_recipients as u64),
        ("listener.max_connections", l.max_connections as u64),
        ("listener.idle_timeout_secs", l.idle_timeout_secs),
        (
            "listener.tls_handshake_timeout_secs",
            l.tls_handshake_timeout_secs,
        ),
        (
            "listener.max_connections_per_ip",
            l.max_connections_per_ip as u64,
        ),
        ("listener.data_timeout_secs", l.data_timeout_secs),
        ("listener.max_session_secs", l.max_session_secs),
        ("upstream.timeout_secs", raw.upstream.timeout_secs),
        (
            "upstream.max_connections_per_upstream",
            raw.upstream.max_connections_per_upstream as u64,
        ),
    ] {
        if value == 0 {
            problems.push(format!("{key}: must be greater than 0"));
        }
    }

    let s = raw.server;
    let support_email = s.support_email.as_deref().and_then(|v| {
        let mb = address::parse_one(v);
        if mb.is_none() {
            problems.push("server.supportEmail: must be one email address".into());
        }
        mb
    });
    let approved_sender_emails = match &s.approved_sender_emails {
        None => ApprovedList::default(),
        Some(v) => address_list(v).unwrap_or_else(|| {
            problems.push(
                "server.approvedSenderEmails: must be a comma-separated string or an array of strings"
                    .into(),
            );
            ApprovedList::default()
        }),
    };
    let server_target = |key: &str, smtp: &RawServerSmtp, problems: &mut Vec<String>| {
        if smtp.host.trim().is_empty() {
            problems.push(format!("{key}.host: must not be empty"));
        }
        if smtp.port == 0 {
            problems.push(format!("{key}.port: must be 1..65535"));
        }
        SmtpTarget {
            host: smtp.host.trim().to_owned(),
            port: smtp.port,
            tls: TlsMode::infer(smtp.secure, smtp.port),
            credentials: server_credentials(key, smtp, problems),
        }
    };
    let mut server_limits = Limits::default();
    let provider = match (&s.smtp, s.capture) {
        (Some(_), Some(_)) => {
            problems.push("server: set one of [server.smtp] and [server.capture], not both".into());
            None
        }
        (Some(smtp), None) => {
            server_limits.rate = smtp.rate_limit.as_deref().and_then(|r| {
                let rate = project::RateLimit::parse(r);
                if rate.is_none() {
                    problems.push(
                        "server.smtp.rate_limit: must be \"N/s\", \"N/min\" or \"N/h\"".into(),
                    );
                }
                rate
            });
            if smtp.max_connections == Some(0) {
                problems.push("server.smtp.max_connections: must be greater than 0".into());
            }
            server_limits.max_connections = smtp.max_connections;
            Some(Provider::Smtp(server_target("server.smtp", smtp, problems)))
        }
        (None, Some(c)) => Some(Provider::Capture(resolve(base, c.dir))),
        (None, None) => None,
    };
    let server_fallback = match (&s.smtp_fallback, &s.smtp) {
        (Some(f), Some(_)) => {
            if f.rate_limit.is_some() || f.max_connections.is_some() {
                problems.push(
                    "server.smtp_fallback: rate_limit and max_connections belong in [server.smtp]"
                        .into(),
                );
            }
            Some(server_target("server.smtp_fallback", f, problems))
        }
        (Some(_), None) => {
            problems.push("server.smtp_fallback: needs [server.smtp]".into());
            None
        }
        (None, _) => None,
    };

    let proxy_protocol_from = match &l.proxy_protocol_from {
        None => vec![
            "127.0.0.0/8".parse().expect("a CIDR block"),
            "::1/128".parse().expect("a CIDR block"),
        ],
        Some(list) => networks("listener.proxy_protocol_from", list, problems),
    };
    let allow = networks("listener.allow", &l.allow, problems);

    let medplum = raw.medplum.map(|m| {
        let base_url = medplum_url("medplum.base_url", &m.base_url, problems);
        let base_url = if base_url.ends_with('/') {
            base_url
        } else {
            format!("{base_url}/")
        };
        let token_url = match &m.token_url {
            Some(t) => medplum_url("medplum.token_url", t, problems),
            None => format!("{base_url}oauth2/token"),
        };
        for (key, value) in [
            ("medplum.timeout_secs", m.timeout_secs),
            ("medplum.refresh_secs", m.refresh_secs),
            ("medplum.max_stale_secs", m.max_stale_secs),
        ] {
            if value == 0 {
                problems.push(format!("{key}: must be at least 1"));
            }
        }
        let fleet = match (m.client_id, m.client_secret) {
            (Some(id), Some(secret)) if !id.trim().is_empty() && !secret.expose().is_empty() => {
                Some(MedplumClient {
                    client_id: id.trim().to_owned(),
                    client_secret: secret,
                })
            }
            (None, None) => None,
            (Some(_), None) => {
                problems.push("medplum.client_secret: required with medplum.client_id".into());
                None
            }
            (None, Some(_)) => {
                problems.push("medplum.client_id: required with medplum.client_secret".into());
                None
            }
            _ => {
                problems.push("medplum.client_id, medplum.client_secret: must not be empty".into());
                None
            }
        };
        Medplum {
            base_url,
            token_url,
            ca_file: m.ca_file.map(|p| resolve(base, p)),
            timeout: Duration::from_secs(m.timeout_secs),
            refresh: Duration::from_secs(m.refresh_secs),
            max_stale: Duration::from_secs(m.max_stale_secs),
            fleet,
        }
    });

    let mut users = Users::default();
    let mut projects = BTreeMap::new();
    for (name, mut p) in raw.projects {
        if name.trim().is_empty() || name.chars().any(|c| c.is_control()) {
            problems.push(format!("projects.{name:?}: invalid project name"));
        }
        let capture_dir = match p.capture_dir.take() {
            None => None,
            Some(Value::String(dir)) if !dir.is_empty() => Some(resolve(base, dir.into())),
            Some(_) => {
                problems.push(format!("projects.{name}.captureDir: must be a folder path"));
                None
            }
        };
        relay_user(
            &name,
            p.relay_username.take(),
            p.relay_password.take(),
            &mut users,
            problems,
        );
        let source = project_source(&name, p, medplum.as_ref(), problems);
        projects.insert(
            name,
            Project {
                source,
                capture_dir,
            },
        );
    }
    if l.require_auth && users.is_empty() {
        problems
            .push("listener.require_auth: no project has relayUsername and relayPassword".into());
    }

    if raw
        .admin
        .token
        .as_ref()
        .is_some_and(|t| t.expose().is_empty())
    {
        problems.push("admin.token: must not be empty".into());
    }
    if let Some(addr) = &raw.admin.listen
        && addr.trim().is_empty()
    {
        problems.push("admin.listen: must be an address such as 127.0.0.1:9090".into());
    }
    Config {
        admin_listen: raw.admin.listen,
        admin_token: raw.admin.token,
        log_format: raw.log.format,
        listener: Listener {
            smtp: l.smtp,
            smtps: l.smtps,
            tls,
            hostname: l.hostname.unwrap_or_else(|| "localhost".into()),
            project_header: l.project_header,
            max_message_size: l.max_message_size,
            max_recipients: l.max_recipients,
            max_connections: l.max_connections,
            idle_timeout: Duration::from_secs(l.idle_timeout_secs),
            tls_handshake_timeout: Duration::from_secs(l.tls_handshake_timeout_secs),
            allow,
            require_auth: l.require_auth,
            allow_plaintext_auth: l.allow_plaintext_auth,
            max_connections_per_ip: l.max_connections_per_ip,
            data_timeout: Duration::from_secs(l.data_timeout_secs),
            max_session: Duration::from_secs(l.max_session_secs),
            shutdown_grace: Duration::from_secs(l.shutdown_grace_secs),
            auth_failure_delay: Duration::from_millis(l.auth_failure_delay_ms),
            proxy_protocol: l.proxy_protocol,
            proxy_protocol_from,
            max_buffered_bytes: l.max_buffered_bytes,
        },
        users: Arc::new(users),
        server: Server {
            allow_project_smtp: s.allow_project_smtp,
            support_email,
            approved_sender_emails,
            provider,
            fallback: server_fallback,
            limits: server_limits,
        },
        upstream: Upstream {
            ca_file: raw.upstream.ca_file.map(|p| resolve(base, p)),
            timeout: Duration::from_secs(raw.upstream.timeout_secs),
            pool_size: raw.upstream.pool_size,
            helo_name,
            max_connections_per_upstream: raw.upstream.max_connections_per_upstream,
            limit_wait: Duration::from_secs(raw.upstream.limit_wait_secs),
            max_messages_per_connection: raw.upstream.max_messages_per_connection,
            circuit_failures: raw.upstream.circuit_failures.max(1),
            circuit_open: Duration::from_secs(raw.upstream.circuit_open_secs),
        },
        projects,
        medplum,
    }
}

/// `[server.smtp]` credentials: a username and password (PLAIN or LOGIN, or the one
/// `auth_method` names), or with `auth_method = "xoauth2"` an OAuth2 client.
fn server_credentials(
    key: &str,
    smtp: &RawServerSmtp,
    problems: &mut Vec<String>,
) -> Option<Credentials> {
    let method = match smtp
        .auth_method
        .as_deref()
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        None => None,
        Some("plain") => Some(PasswordMethod::Plain),
        Some("login") => Some(PasswordMethod::Login),
        Some("xoauth2") => {
            let mut need = |name: &str, v: Option<&str>| {
                let v = v.map(str::trim).filter(|v| !v.is_empty());
                if v.is_none() {
                    problems.push(format!(
                        "{key}.{name}: required with auth_method = \"xoauth2\""
                    ));
                }
                v.map(str::to_owned)
            };
            let user = need("username", smtp.username.as_deref());
            let token_url = need("oauth_token_url", smtp.oauth_token_url.as_deref());
            let client_id = need("oauth_client_id", smtp.oauth_client_id.as_deref());
            let secret = need(
                "oauth_client_secret",
                smtp.oauth_client_secret.as_ref().map(Secret::expose),
            );
            if let Some(url) = &token_url
                && let Err(why) = project::check_secret_url(url)
            {
                problems.push(format!("{key}.oauth_token_url: {why}"));
            }
            return Some(Credentials {
                user: user?,
                auth: Auth::XOAuth2(OAuthClient {
                    token_url: token_url?,
                    client_id: client_id?,
                    client_secret: SecretKey::new(secret?),
                    scope: smtp.oauth_scope.clone(),
                    refresh_token: smtp
                        .oauth_refresh_token
                        .as_ref()
                        .map(|t| SecretKey::new(t.expose())),
                }),
            });
        }
        Some(_) => {
            problems.push(format!(
                "{key}.auth_method: must be \"plain\", \"login\" or \"xoauth2\""
            ));
            None
        }
    };
    match (&smtp.username, &smtp.password) {
        (Some(u), Some(p)) => Some(Credentials {
            user: u.clone(),
            auth: Auth::Password {
                password: SecretKey::new(p.expose()),
                method,
            },
        }),
        (None, None) => None,
        (Some(_), None) => {
            problems.push(format!("{key}.password: required with {key}.username"));
            None
        }
        (None, Some(_)) => {
            problems.push(format!("{key}.username: required with {key}.password"));
            None
        }
    }
}

/// Listener credentials are the relay's own settings, not the spec's secrets: a problem there
/// is a load error, so a typo cannot quietly lock a project's senders out.
fn relay_user(
    project: &str,
    user: Option<String>,
    password: Option<Value>,
    users: &mut Users,
    problems: &mut Vec<String>,
) {
    let passwords = match &password {
        None => None,
        Some(Value::String(p)) => Some(vec![p.clone()]),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| v.as_str().map(str::to_owned))
            .collect::<Option<Vec<_>>>(),
        Some(_) => None,
    };
    let key = format!("projects.{project}");
    match (user, passwords) {
        (None, _) if password.is_none() => {}
        (Some(u), Some(p))
            if !u.trim().is_empty() && !p.is_empty() && p.iter().all(|p| !p.is_empty()) =>
        {
            if !users.insert(u.trim(), project, p) {
                problems.push(format!(
                    "{key}.relayUsername: {u:?} is already used by another project"
                ));
            }
        }
        (Some(_), None) if password.is_none() => {
            problems.push(format!("{key}.relayPassword: required with relayUsername"))
        }
        (None, _) => problems.push(format!("{key}.relayUsername: required with relayPassword")),
        _ => problems.push(format!(
            "{key}: relayUsername must be a non-empty string, relayPassword a non-empty string or array of strings"
        )),
    }
}

/// Where a project's secrets come from, and (for a file project) what they say. Giving one
/// project two sources is a load error: which one wins would be a guess.
fn project_source(
    name: &str,
    p: RawProject,
    medplum: Option<&Medplum>,
    problems: &mut Vec<String>,
) -> Source {
    let spec: Vec<(&'static str, &Value)> = [
        ("smtpHost", &p.smtp_host),
        ("smtpPort", &p.smtp_port),
        ("smtpUsername", &p.smtp_username),
        ("smtpPassword", &p.smtp_password),
        ("smtpSecure", &p.smtp_secure),
        ("smtpFromAddress", &p.smtp_from_address),
        ("smtpApprovedSenders", &p.smtp_approved_senders),
        ("appName", &p.app_name),
        ("smtpAuthMethod", &p.smtp_auth_method),
        ("smtpOAuthTokenUrl", &p.smtp_oauth_token_url),
        ("smtpOAuthClientId", &p.smtp_oauth_client_id),
        ("smtpOAuthClientSecret", &p.smtp_oauth_client_secret),
        ("smtpOAuthScope", &p.smtp_oauth_scope),
        ("smtpOAuthRefreshToken", &p.smtp_oauth_refresh_token),
        ("smtpFallbackHost", &p.smtp_fallback_host),
        ("smtpFallbackPort", &p.smtp_fallback_port),
        ("smtpFallbackUsername", &p.smtp_fallback_username),
        ("smtpFallbackPassword", &p.smtp_fallback_password),
        ("smtpFallbackSecure", &p.smtp_fallback_secure),
        ("smtpRateLimit", &p.smtp_rate_limit),
        ("smtpMaxConnections", &p.smtp_max_connections),
    ]
    .into_iter()
    .filter_map(|(key, v)| v.as_ref().map(|v| (key, v)))
    .collect();
    let key = format!("projects.{name}");
    match (p.medplum_client_id, p.medplum_client_secret) {
        (Some(_), _) if !spec.is_empty() => {
            problems.push(format!(
                "{key}: medplumClientId and {} are both set; a project's secrets come from relay.toml or from Medplum, not both",
                spec[0].0
            ));
            Source::Medplum(None)
        }
        (Some(_), _) if medplum.is_none() => {
            problems.push(format!(
                "{key}.medplumClientId: needs a [medplum] table with base_url"
            ));
            Source::Medplum(None)
        }
        (Some(id), Some(secret)) if !id.trim().is_empty() && !secret.expose().is_empty() => {
            Source::Medplum(Some(MedplumClient {
                client_id: id.trim().to_owned(),
                client_secret: secret,
            }))
        }
        (Some(id), Some(_)) if !id.trim().is_empty() => {
            problems.push(format!("{key}.medplumClientSecret: must not be empty"));
            Source::Medplum(None)
        }
        (Some(_), Some(_)) => {
            problems.push(format!("{key}.medplumClientId: must not be empty"));
            Source::Medplum(None)
        }
        (Some(_), None) => {
            problems.push(format!(
                "{key}.medplumClientSecret: required with medplumClientId (or medplumClientSecretFile)"
            ));
            Source::Medplum(None)
        }
        (None, Some(_)) => {
            problems.push(format!(
                "{key}.medplumClientId: required with medplumClientSecret"
            ));
            Source::Medplum(None)
        }
        (None, None) if spec.is_empty() && medplum.is_some_and(|m| m.fleet.is_some()) => {
            Source::Medplum(None)
        }
        (None, None) => Source::File(Arc::new(project::build(|name| {
            spec.iter().find(|(n, _)| *n == name).map(|(_, v)| entry(v))
        }))),
    }
}

impl Config {
    /// One line per file project for `check`: how its mail would travel, or what is wrong.
    /// Medplum projects are left out: their secrets are read, not written here.
    pub fn check_report(&self) -> Vec<(String, Result<String, String>)> {
        self.projects
            .iter()
            .filter_map(|(name, p)| match &p.source {
                Source::File(secrets) => Some((name.clone(), self.describe(secrets))),
                Source::Medplum(_) => None,
            })
            .collect()
    }

    /// `check`'s line for a project with these secrets under this config.
    pub fn describe(&self, secrets: &ProjectSecrets) -> Result<String, String> {
        if !self.server.allow_project_smtp {
            return Ok("server transport (allowProjectSmtp = false)".to_owned());
        }
        secrets.smtp.describe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml_str(text, Path::new("/etc/relay"))
    }

    fn problems(text: &str) -> String {
        parse(text).expect_err("should be invalid").to_string()
    }

    const FULL: &str = r#"
[listener]
smtp = "127.0.0.1:2525"
smtps = "127.0.0.1:2465"
certificate = "certs/localhost.crt"
private_key = "certs/localhost.key"
hostname = "relay.localhost"
project_header = "X-Project-Id"
max_message_size = 26214400

[server]
allowProjectSmtp = true
supportEmail = "Example <noreply@example.com>"
approvedSenderEmails = "alerts@example.com,billing@example.com"

[server.smtp]
host = "smtp.example.com"
port = 587
username = "u"
password = "p"
secure = false

[upstream]
ca_file = "certs/ca.crt"
timeout_secs = 30

[projects.acme]
smtpHost = "smtp.sendgrid.net"
smtpPort = 465
smtpUsername = "apikey"
smtpPassword = "secret"
smtpSecure = true
smtpFromAddress = "Acme <noreply@acme.example>"
smtpApprovedSenders = "alice@acme.example, bob@acme.example"
appName = "Acme Health"
"#;

    #[test]
    fn the_issue_example_loads() {
        let c = parse(FULL).unwrap();
        assert_eq!(c.listener.hostname, "relay.localhost");
        assert_eq!(c.listener.max_message_size, 26214400);
        assert_eq!(
            c.listener.tls.as_ref().unwrap().certificate,
            Path::new("/etc/relay/certs/localhost.crt")
        );
        assert_eq!(c.server.approved_sender_emails.len(), 2);
        assert_eq!(
            c.server.provider,
            Some(Provider::Smtp(SmtpTarget {
                host: "smtp.example.com".into(),
                port: 587,
                tls: TlsMode::StartTls,
                credentials: Some(Credentials::password("u", "p")),
            }))
        );
        let ProjectSmtp::Active(r) = &c.projects["acme"].file_secrets().unwrap().smtp else {
            panic!("acme should be active")
        };
        assert_eq!(r.target.tls, TlsMode::Implicit);
        assert_eq!(r.from.address, "noreply@acme.example");
        assert!(r.approved.contains("Bob@acme.example"));
        assert_eq!(
            c.projects["acme"]
                .file_secrets()
                .unwrap()
                .app_name
                .as_deref(),
            Some("Acme Health")
        );
    }

    #[test]
    fn defaults() {
        let c = parse("").unwrap();
        assert_eq!(c.listener.smtp.as_deref(), Some("127.0.0.1:2525"));
        assert_eq!(c.listener.project_header, "X-Project-Id");
        assert!(c.server.allow_project_smtp);
        assert!(c.server.provider.is_none());
        assert_eq!(c.upstream.timeout, Duration::from_secs(30));
    }

    #[test]
    fn unknown_keys_are_errors_with_their_line() {
        let text = "[projects.acme]\nsmtpHots = \"x\"\n";
        let msg = problems(text);
        assert!(msg.contains("line 2"), "{msg}");
        assert!(msg.contains("smtpHots"), "{msg}");
        assert!(problems("[listener]\nsmtpp = \"x\"\n").contains("smtpp"));
        assert!(problems("[server]\nallowProjectSMTP = false\n").contains("allowProjectSMTP"));
    }

    #[test]
    fn errors_never_echo_secrets() {
        let msg = problems("[projects.acme]\nsmtpPasword = \"hunter2-secret\"\n");
        assert!(
            msg.contains("smtpPasword") && !msg.contains("hunter2"),
            "{msg}"
        );
        let msg = problems("[server.smtp]\nhost = \"h\"\nport = 25\npassword = 987654321\n");
        assert!(
            msg.contains("must be a string") && !msg.contains("987654321"),
            "{msg}"
        );
        let msg = problems(
            "[server.smtp]\nhost = \"h\"\nport = 25\nusername = \"u\"\npassword = \"hunter2\"\nbogus = 1\n",
        );
        assert!(!msg.contains("hunter2"), "{msg}");
    }

    #[test]
    fn medplum_projects_and_their_load_errors() {
        let medplum = "[medplum]\nbase_url = \"https://api.medplum.com\"\n";
        let c = parse(&format!(
            "{medplum}[projects.p1]\nmedplumClientId = \"id\"\nmedplumClientSecret = \"s3cret-value\"\ncaptureDir = \"out\"\n"
        ))
        .unwrap();
        let m = c.medplum.as_ref().unwrap();
        assert_eq!(m.base_url, "https://api.medplum.com/");
        assert_eq!(m.token_url, "https://api.medplum.com/oauth2/token");
        assert_eq!(
            (
                m.refresh.as_secs(),
                m.max_stale.as_secs(),
                m.timeout.as_secs()
            ),
            (60, 600, 10)
        );
        assert!(
            matches!(&c.projects["p1"].source, Source::Medplum(Some(client)) if client.client_id == "id")
        );
        assert!(!format!("{c:?}").contains("s3cret-value"));
        // Without a fleet credential, a table with no spec secret is a file project.
        let c = parse(&format!("{medplum}[projects.p2]\ncaptureDir = \"out\"\n")).unwrap();
        assert!(matches!(c.projects["p2"].source, Source::File(_)));
        let fleet = "client_id = \"fleet\"\nclient_secret = \"f\"\n";
        let c = parse(&format!(
            "{medplum}{fleet}[projects.p2]\ncaptureDir = \"out\"\n"
        ))
        .unwrap();
        assert!(matches!(c.projects["p2"].source, Source::Medplum(None)));

        for (text, expect) in [
            (
                format!("{medplum}[projects.p]\nmedplumClientId = \"id\"\nmedplumClientSecret = \"s\"\nsmtpHost = \"h\"\n"),
                "projects.p: medplumClientId and smtpHost are both set",
            ),
            (
                "[projects.p]\nmedplumClientId = \"id\"\nmedplumClientSecret = \"s\"\n".into(),
                "projects.p.medplumClientId: needs a [medplum] table",
            ),
            (
                format!("{medplum}[projects.p]\nmedplumClientId = \"id\"\n"),
                "projects.p.medplumClientSecret: required with medplumClientId",
            ),
            (
                format!("{medplum}[projects.p]\nmedplumClientSecret = \"s\"\n"),
                "projects.p.medplumClientId: required with medplumClientSecret",
            ),
            (
                "[medplum]\nbase_url = \"http://medplum.internal/\"\n".into(),
                "medplum.base_url: must be https://",
            ),
            (
                "[medplum]\nbase_url = \"https://m.example/\"\ntoken_url = \"http://10.0.0.1/token\"\n".into(),
                "medplum.token_url: must be https://",
            ),
            (
                "[medplum]\nbase_url = \"https://m.example/\"\nrefresh_secs = 0\n".into(),
                "medplum.refresh_secs: must be at least 1",
            ),
            (
                "[medplum]\nbase_url = \"https://m.example/\"\nclient_id = \"x\"\n".into(),
                "medplum.client_secret: required with medplum.client_id",
            ),
            ("[medplum]\ntimeout_secs = 3\n".into(), "base_url"),
        ] {
            let msg = problems(&text);
            assert!(msg.contains(expect), "{text}: {msg}");
        }
        // A local Medplum in development and tests may be plain HTTP.
        for local in [
            "http://localhost:8103/",
            "http://127.0.0.1:9/",
            "http://[::1]:8103",
        ] {
            let c = parse(&format!("[medplum]\nbase_url = \"{local}\"\n")).unwrap();
            assert!(c.medplum.unwrap().base_url.ends_with('/'));
        }
        // The client secret may come from a file, as other secrets do.
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("acme_medplum"), "from-a-file\n").unwrap();
        let c = Config::from_toml_str(
            &format!("{medplum}[projects.p]\nmedplumClientId = \"id\"\nmedplumClientSecretFile = \"acme_medplum\"\n"),
            dir.path(),
        )
        .unwrap();
        let Source::Medplum(Some(client)) = &c.projects["p"].source else {
            panic!("not a Medplum project")
        };
        assert_eq!(client.client_secret.expose(), "from-a-file");
    }

    #[test]
    fn server_oauth_fallback_and_limits() {
        let c = parse(
            "[server.smtp]\nhost = \"smtp.office365.com\"\nport = 587\nusername = \"relay@contoso.example\"\nauth_method = \"xoauth2\"\noauth_token_url = \"https://login.microsoftonline.com/t/oauth2/v2.0/token\"\noauth_client_id = \"app\"\noauth_client_secret = \"s3cret-x\"\nrate_limit = \"30/min\"\nmax_connections = 3\n[server.smtp_fallback]\nhost = \"smtp.backup.example\"\nport = 465\nusername = \"b\"\npassword = \"bp\"\n",
        )
        .unwrap();
        let Some(Provider::Smtp(t)) = &c.server.provider else {
            panic!("no provider")
        };
        assert!(matches!(
            &t.credentials,
            Some(Credentials {
                auth: Auth::XOAuth2(_),
                ..
            })
        ));
        assert_eq!(c.server.limits.rate.unwrap().to_string(), "30/min");
        assert_eq!(c.server.limits.max_connections, Some(3));
        assert_eq!(c.server.fallback.as_ref().unwrap().tls, TlsMode::Implicit);
        assert!(!format!("{c:?}").contains("s3cret-x"));
        for (text, expect) in [
            (
                "[server.smtp]\nhost = \"h\"\nport = 587\nauth_method = \"xoauth2\"\n",
                "server.smtp.username: required with auth_method = \"xoauth2\"",
            ),
            (
                "[server.smtp]\nhost = \"h\"\nport = 587\nusername = \"u\"\nauth_method = \"xoauth2\"\noauth_token_url = \"http://idp.example/token\"\noauth_client_id = \"a\"\noauth_client_secret = \"s\"\n",
                "server.smtp.oauth_token_url: must be https://",
            ),
            (
                "[server.smtp]\nhost = \"h\"\nport = 587\nauth_method = \"ntlm\"\n",
                "server.smtp.auth_method: must be",
            ),
            (
                "[server.smtp]\nhost = \"h\"\nport = 587\nrate_limit = \"lots\"\n",
                "server.smtp.rate_limit: must be",
            ),
            (
                "[server.smtp_fallback]\nhost = \"h\"\nport = 587\n",
                "server.smtp_fallback: needs [server.smtp]",
            ),
        ] {
            let msg = problems(text);
            assert!(msg.contains(expect), "{text}: {msg}");
        }
    }

    #[test]
    fn oauth_and_fallback_secrets_may_come_from_files() {
        let dir = tempfile::tempdir().unwrap();
        for (name, value) in [
            ("client", "client-secret\n"),
            ("refresh", "refresh-token\n"),
            ("fb", "fb-pass\n"),
        ] {
            std::fs::write(dir.path().join(name), value).unwrap();
        }
        let c = Config::from_toml_str(
            "[projects.p]\nsmtpHost = \"smtp.office365.com\"\nsmtpPort = 587\nsmtpUsername = \"m@x.example\"\nsmtpAuthMethod = \"xoauth2\"\nsmtpOAuthTokenUrl = \"https://login.example/token\"\nsmtpOAuthClientId = \"app\"\nsmtpOAuthClientSecretFile = \"client\"\nsmtpOAuthRefreshTokenFile = \"refresh\"\nsmtpFromAddress = \"m@x.example\"\nsmtpFallbackHost = \"smtp.backup.example\"\nsmtpFallbackPort = 587\nsmtpFallbackUsername = \"b\"\nsmtpFallbackPasswordFile = \"fb\"\n",
            dir.path(),
        )
        .unwrap();
        let ProjectSmtp::Active(r) = &c.projects["p"].file_secrets().unwrap().smtp else {
            panic!("not active")
        };
        let Some(Credentials {
            auth: Auth::XOAuth2(client),
            ..
        }) = &r.target.credentials
        else {
            panic!("not xoauth2")
        };
        assert_eq!(client.client_secret.expose(), "client-secret");
        assert_eq!(
            client.refresh_token.as_ref().unwrap().expose(),
            "refresh-token"
        );
        assert_eq!(
            r.fallback.as_ref().unwrap().credentials,
            Some(Credentials::password("b", "fb-pass"))
        );
    }

    #[test]
    fn debug_output_hides_passwords() {
        let c = parse(FULL).unwrap();
        let dump = format!("{c:?}");
        assert!(!dump.contains("secret\""), "{dump}");
        assert!(!dump.contains("\"p\""), "{dump}");
        assert!(format!("{:?}", Secret::new("hunter2")) == "Secret(***)");
    }

    fn project(body: &str) -> ProjectSecrets {
        let c = parse(&format!("[projects.p]\n{body}")).unwrap();
        c.projects["p"].file_secrets().unwrap().clone()
    }

    const GOOD: &str = "smtpHost = \"h.example\"\nsmtpPort = 587\nsmtpUsername = \"u\"\nsmtpPassword = \"pw\"\nsmtpFromAddress = \"a@p.example\"\n";

    #[test]
    fn project_without_host_uses_server() {
        assert!(matches!(project("appName = \"X\"").smtp, ProjectSmtp::None));
    }

    #[test]
    fn project_secure_inferred_from_port() {
        let ProjectSmtp::Active(r) = project(GOOD).smtp else {
            panic!()
        };
        assert_eq!(r.target.tls, TlsMode::StartTls);
        let ProjectSmtp::Active(r) = project(&GOOD.replace("587", "465")).smtp else {
            panic!()
        };
        assert_eq!(r.target.tls, TlsMode::Implicit);
        let ProjectSmtp::Active(r) = project(&format!("{GOOD}smtpSecure = false")).smtp else {
            panic!()
        };
        assert_eq!(r.target.tls, TlsMode::StartTls);
    }

    #[test]
    fn each_bad_entry_is_named() {
        // (entry to drop from GOOD, line to add instead, entry expected to be named)
        let cases: &[(&str, &str, &str)] = &[
            ("smtpPort", "", "smtpPort"),
            ("smtpPort", "smtpPort = \"587\"", "smtpPort"),
            ("smtpPort", "smtpPort = 0", "smtpPort"),
            ("smtpPort", "smtpPort = 70000", "smtpPort"),
            ("smtpUsername", "", "smtpUsername"),
            ("smtpUsername", "smtpUsername = \"  \"", "smtpUsername"),
            ("smtpPassword", "", "smtpPassword"),
            ("smtpPassword", "smtpPassword = 5", "smtpPassword"),
            ("smtpFromAddress", "", "smtpFromAddress"),
            (
                "smtpFromAddress",
                "smtpFromAddress = \"nope\"",
                "smtpFromAddress",
            ),
            ("smtpHost", "smtpHost = \"\"", "smtpHost"),
            ("smtpHost", "smtpHost = 7", "smtpHost"),
        ];
        for (drop, add, name) in cases {
            let mut body: String = GOOD
                .lines()
                .filter(|l| !l.starts_with(&format!("{drop} ")))
                .map(|l| format!("{l}\n"))
                .collect();
            body.push_str(add);
            let p = project(&body);
            assert_eq!(p.smtp.bad_entries(), vec![name.to_string()], "{body}");
        }
        let p = project(&format!(
            "{GOOD}smtpSecure = \"yes\"\nsmtpApprovedSenders = 3\n"
        ));
        assert_eq!(p.smtp.bad_entries(), ["smtpSecure", "smtpApprovedSenders"]);
        let p = project("smtpHost = \"h\"\n");
        assert_eq!(
            p.smtp.bad_entries(),
            [
                "smtpUsername",
                "smtpPassword",
                "smtpPort",
                "smtpFromAddress"
            ]
        );
    }

    #[test]
    fn approved_list_may_be_an_array() {
        let ProjectSmtp::Active(r) = project(&format!(
            "{GOOD}smtpApprovedSenders = [\"x@p.example\", \" y@p.example \"]"
        ))
        .smtp
        else {
            panic!()
        };
        assert!(r.approved.contains("y@p.example"));
    }

    #[test]
    fn check_report_lines() {
        let c = parse(&format!(
            "{FULL}\n[projects.beta]\nappName = \"B\"\n[projects.broken]\nsmtpHost = \"x\"\nsmtpPassword = \"topsecret\"\n"
        ))
        .unwrap();
        let report = c.check_report();
        assert_eq!(
            report[0],
            (
                "acme".into(),
                Ok("ok: smtp via smtp.sendgrid.net:465 (tls)".into())
            )
        );
        assert_eq!(report[1], ("beta".into(), Ok("server transport".into())));
        let (_, Err(e)) = &report[2] else { panic!() };
        assert!(e.starts_with("error: smtpUsername missing"), "{e}");
        assert!(!e.contains("topsecret"));
    }

    #[test]
    fn relay_users_and_allow_list() {
        let c = parse(
            "[listener]\nallow = [\"10.0.0.0/8\", \"192.0.2.7\"]\n[projects.a]\nrelayUsername = \"app\"\nrelayPassword = [\"old\", \"new\"]\n[projects.b]\nrelayUsername = \"cron\"\nrelayPassword = \"pw\"\n",
        )
        .unwrap();
        assert_eq!(c.users.verify("app", b"new"), Some("a"));
        assert_eq!(c.users.verify("cron", b"pw"), Some("b"));
        let l = &c.listener;
        for (ip, trusted) in [
            ("127.0.0.1", true),
            ("::1", true),
            ("10.1.2.3", true),
            ("192.0.2.7", true),
            ("192.0.2.8", false),
            ("::ffff:10.0.0.1", true),
            ("::ffff:127.0.0.1", true),
            ("8.8.8.8", false),
        ] {
            assert_eq!(l.is_trusted(ip.parse().unwrap()), trusted, "{ip}");
        }
        let msg = problems(
            "[projects.a]\nrelayUsername = \"app\"\nrelayPassword = \"x\"\n[projects.b]\nrelayUsername = \"app\"\nrelayPassword = \"y\"\n",
        );
        assert!(msg.contains("already used"), "{msg}");
        let msg = problems("[projects.a]\nrelayPassword = \"secret-x\"\n");
        assert!(
            msg.contains("relayUsername") && !msg.contains("secret-x"),
            "{msg}"
        );
        let msg = problems("[projects.a]\nrelayUsername = \"u\"\nrelayPassword = 12345\n");
        assert!(
            msg.contains("relayPassword") && !msg.contains("12345"),
            "{msg}"
        );
        let msg = problems("[listener]\nmax_message_size = 1000\nmax_buffered_bytes = 999\n");
        assert!(msg.contains("listener.max_buffered_bytes"), "{msg}");
        let msg = problems("[listener]\nallow = [\"10.0.0.0/33\"]\nrequire_auth = true\n");
        assert!(
            msg.contains("listener.allow") && msg.contains("listener.require_auth"),
            "{msg}"
        );
    }

    #[test]
    fn environment_and_file_secrets() {
        let dir = std::env::temp_dir().join(format!("relay-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("pw"), "file-secret\r\n").unwrap();
        // SAFETY of the environment: this variable is used by this test only.
        unsafe { std::env::set_var("RELAY_CFG_TEST_USER", "env-user") };
        let text = "[server.smtp]\nhost = \"h\"\nport = 25\nusername = \"${RELAY_CFG_TEST_USER}\"\npassword_file = \"pw\"\n[projects.a]\nsmtpHost = \"h\"\nsmtpPort = 25\nsmtpUsername = \"${RELAY_CFG_TEST_USER}\"\nsmtpPasswordFile = \"pw\"\nsmtpFromAddress = \"a@a.example\"\nrelayUsername = \"r\"\nrelayPasswordFile = \"pw\"\n";
        let c = Config::from_toml_str(text, &dir).unwrap();
        let Some(Provider::Smtp(t)) = &c.server.provider else {
            panic!()
        };
        assert_eq!(
            t.credentials,
            Some(Credentials::password("env-user", "file-secret"))
        );
        let ProjectSmtp::Active(r) = &c.projects["a"].file_secrets().unwrap().smtp else {
            panic!()
        };
        assert_eq!(
            r.target.credentials,
            Some(Credentials::password("env-user", "file-secret"))
        );
        assert_eq!(c.users.verify("r", b"file-secret"), Some("a"));

        let bad = |t: &str| Config::from_toml_str(t, &dir).unwrap_err().to_string();
        let msg = bad("[projects.a]\nsmtpPassword = \"x\"\nsmtpPasswordFile = \"pw\"\n");
        assert!(
            msg.contains("projects.a.smtpPasswordFile: set either"),
            "{msg}"
        );
        let msg = bad("[projects.a]\nsmtpPasswordFile = \"nope\"\n");
        assert!(
            msg.contains("projects.a.smtpPasswordFile: cannot read nope"),
            "{msg}"
        );
        let msg = bad("[server]\nsupportEmail = \"${RELAY_CFG_TEST_MISSING}\"\n");
        assert!(
            msg.contains(
                "server.supportEmail: environment variable RELAY_CFG_TEST_MISSING is not set"
            ),
            "{msg}"
        );
        // Not the whole value: left as written.
        let c = Config::from_toml_str("[listener]\nhostname = \"x${HOME}\"\n", &dir).unwrap();
        assert_eq!(c.listener.hostname, "x${HOME}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn admin_log_and_capture_dir() {
        let c = parse("[admin]\nlisten = \"127.0.0.1:9090\"\n[log]\nformat = \"json\"\n[projects.s]\ncaptureDir = \"staging\"\n").unwrap();
        assert_eq!(c.admin_listen.as_deref(), Some("127.0.0.1:9090"));
        assert_eq!(c.log_format, LogFormat::Json);
        assert_eq!(
            c.projects["s"].capture_dir.as_deref(),
            Some(Path::new("/etc/relay/staging"))
        );
        assert!(problems("[log]\nformat = \"xml\"\n").contains("xml"));
        assert!(problems("[projects.s]\ncaptureDir = 5\n").contains("captureDir"));
        assert!(problems("[admin]\nport = 1\n").contains("port"));
    }

    #[test]
    fn app_name_with_control_characters_is_a_bad_entry() {
        let p = project(&format!("{GOOD}appName = \"Evil\\r\\nBcc: x@y\"\n"));
        assert_eq!(p.smtp.bad_entries(), ["appName"]);
    }

    #[test]
    fn structural_problems_are_all_reported() {
        let msg = problems(
            "[listener]\nsmtps = \"127.0.0.1:1\"\nhostname = \"a b\"\n[server]\nsupportEmail = \"x\"\n[server.smtp]\nhost = \"h\"\nport = 25\n[server.capture]\ndir = \"o\"\n",
        );
        for key in [
            "listener.smtps",
            "listener.hostname",
            "server.supportEmail",
            "server: set one",
        ] {
            assert!(msg.contains(key), "{key} missing from {msg}");
        }
    }
}

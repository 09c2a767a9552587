//! The spec's Project secrets turned into a project's SMTP settings, whatever holds them
//! (a `relay.toml` table or a Medplum `Project.secret` list): one function applies every rule
//! of `project-smtp.md`, with the same entry names in every error.

use std::fmt;
use std::sync::Arc;

use crate::address::{self, ApprovedList, Mailbox};

/// One secret as its source holds it. The type is part of the value: Medplum reads `smtpPort`
/// only from `valueInteger`, so a port written as text is invalid there as in TOML.
#[derive(Clone)]
pub enum Entry<'a> {
    Text(&'a str),
    Integer(i64),
    Boolean(bool),
    /// A TOML array of strings (an approved-sender list may be written as one).
    Texts(Vec<&'a str>),
    /// Any other type: a float, a table, a Medplum `valueDecimal`...
    Other,
}

/// What a project's secrets say about its mail.
#[derive(Debug, Clone)]
pub struct ProjectSecrets {
    pub app_name: Option<String>,
    pub smtp: ProjectSmtp,
}

/// Shared between a source's cache and the messages in flight that use it.
pub type Secrets = Arc<ProjectSecrets>;

#[derive(Debug, Clone)]
pub enum ProjectSmtp {
    /// No `smtpHost`: the project's mail uses the server provider.
    None,
    Active(Box<ProjectRelay>),
    /// `smtpHost` set but entries missing or invalid: `(entry, why)` for each.
    Misconfigured(Vec<(&'static str, String)>),
}

#[derive(Debug, Clone)]
pub struct ProjectRelay {
    pub target: SmtpTarget,
    pub from: Mailbox,
    pub approved: ApprovedList,
    /// Takes a message the primary did not take, when nothing of it can have been delivered.
    pub fallback: Option<SmtpTarget>,
    pub limits: Limits,
}

/// What a project (or the server provider) may ask of its upstreams.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Limits {
    pub rate: Option<RateLimit>,
    /// Connections open at once to the primary relay.
    pub max_connections: Option<usize>,
}

/// At most `count` messages in any interval of length `per` (a sliding window, as providers
/// count).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RateLimit {
    pub count: u32,
    pub per: std::time::Duration,
}

impl RateLimit {
    /// `"N/s"`, `"N/min"` or `"N/h"`, N at least 1.
    pub fn parse(text: &str) -> Option<RateLimit> {
        let (n, unit) = text.trim().split_once('/')?;
        let count: u32 = n.trim().parse().ok().filter(|n| *n >= 1)?;
        let secs = match unit.trim() {
            "s" => 1,
            "min" => 60,
            "h" => 3600,
            _ => return None,
        };
        Some(RateLimit {
            count,
            per: std::time::Duration::from_secs(secs),
        })
    }
}

impl fmt::Display for RateLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = match self.per.as_secs() {
            1 => "s",
            60 => "min",
            _ => "h",
        };
        write!(f, "{}/{unit}", self.count)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TlsMode {
    /// Implicit TLS from the first byte (`secure = true`, or port 465 when unset).
    Implicit,
    /// STARTTLS when the upstream offers it.
    StartTls,
}

impl TlsMode {
    pub fn infer(secure: Option<bool>, port: u16) -> TlsMode {
        if secure.unwrap_or(port == 465) {
            TlsMode::Implicit
        } else {
            TlsMode::StartTls
        }
    }
}

impl fmt::Display for TlsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TlsMode::Implicit => "tls",
            TlsMode::StartTls => "starttls",
        })
    }
}

/// One upstream SMTP relay and the credentials to use there. Pools are keyed by the whole
/// target: changed credentials never reuse a connection made with the old ones.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SmtpTarget {
    pub host: String,
    pub port: u16,
    pub tls: TlsMode,
    pub credentials: Option<Credentials>,
}

/// Who the relay is at an upstream.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Credentials {
    /// The SASL user: the login, or with XOAUTH2 the mailbox.
    pub user: String,
    pub auth: Auth,
}

impl Credentials {
    pub fn password(user: impl Into<String>, password: impl Into<String>) -> Credentials {
        Credentials {
            user: user.into(),
            auth: Auth::Password {
                password: SecretKey::new(password),
                method: None,
            },
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Auth {
    /// PLAIN or LOGIN; `None`: whichever the upstream offers.
    Password {
        password: SecretKey,
        method: Option<PasswordMethod>,
    },
    /// SASL XOAUTH2 with a bearer token from this OAuth2 client (Microsoft 365, Google).
    XOAuth2(OAuthClient),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PasswordMethod {
    Plain,
    Login,
}

/// An OAuth2 client whose tokens the relay presents with XOAUTH2. The token itself is never
/// part of a target: a connection authenticated with an older token stays usable.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct OAuthClient {
    pub token_url: String,
    pub client_id: String,
    pub client_secret: SecretKey,
    pub scope: Option<String>,
    /// Present: the `refresh_token` grant; absent: `client_credentials`.
    pub refresh_token: Option<SecretKey>,
}

/// `https://`, or `http://` to this machine only (tests, a local identity provider or
/// Medplum): secrets sent to it must not cross a network in clear.
pub fn check_secret_url(url: &str) -> Result<(), &'static str> {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host = if authority.starts_with('[') {
        authority
            .split(']')
            .next()
            .unwrap_or_default()
            .trim_start_matches('[')
    } else {
        authority.split(':').next().unwrap_or_default()
    };
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    match scheme.to_ascii_lowercase().as_str() {
        _ if host.is_empty() || authority.contains('@') || url.chars().any(char::is_whitespace) => {
            Err("must be a URL such as https://login.example.com/token")
        }
        "https" => Ok(()),
        "http" if loopback => Ok(()),
        "http" => Err(
            "must be https:// (http:// only to localhost): secrets must not cross a network in clear",
        ),
        _ => Err("must be a URL such as https://login.example.com/token"),
    }
}

impl fmt::Display for SmtpTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{} ({})", self.host, self.port, self.tls)
    }
}

/// A secret usable as part of a pool key: equal secrets share a pool, changed ones do not.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct SecretKey(String);

impl SecretKey {
    pub fn new(s: impl Into<String>) -> SecretKey {
        SecretKey(s.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl ProjectSmtp {
    /// The entry names for the client's 4.3.5 reply.
    pub fn bad_entries(&self) -> Vec<String> {
        match self {
            ProjectSmtp::Misconfigured(bad) => bad.iter().map(|(n, _)| (*n).to_owned()).collect(),
            _ => Vec::new(),
        }
    }

    /// `check`'s words for it: `ok: smtp via host:port (tls)`, `server transport`, or the
    /// bad entries with why.
    pub fn describe(&self) -> Result<String, String> {
        match self {
            ProjectSmtp::None => Ok("server transport".to_owned()),
            ProjectSmtp::Active(r) => Ok(format!(
                "ok: smtp via {}:{} ({})",
                r.target.host, r.target.port, r.target.tls
            )),
            ProjectSmtp::Misconfigured(bad) => Err(format!(
                "error: {}",
                bad.iter()
                    .map(|(n, why)| format!("{n} {why}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        }
    }
}

/// A port entry: an integer in 1..65535 (`valueInteger` in Medplum), required.
fn port(
    name: &'static str,
    entry: Option<Entry<'_>>,
    bad: &mut Vec<(&'static str, String)>,
) -> Option<u16> {
    match entry {
        Some(Entry::Integer(n)) if (1..=65535).contains(&n) => Some(n as u16),
        Some(_) => {
            bad.push((name, "must be an integer in 1..65535".into()));
            None
        }
        None => {
            bad.push((name, "missing".into()));
            None
        }
    }
}

/// A `secure` entry: `Some(None)` when absent (inferred from the port), `None` when invalid.
fn secure(
    name: &'static str,
    entry: Option<Entry<'_>>,
    bad: &mut Vec<(&'static str, String)>,
) -> Option<Option<bool>> {
    match entry {
        None => Some(None),
        Some(Entry::Boolean(b)) => Some(Some(b)),
        Some(_) => {
            bad.push((name, "must be true or false".into()));
            None
        }
    }
}

/// The fallback relay's entries: all or none.
fn fallback<'a>(
    secret: &impl Fn(&'static str) -> Option<Entry<'a>>,
    bad: &mut Vec<(&'static str, String)>,
) -> Option<SmtpTarget> {
    const NAMES: [&str; 5] = [
        "smtpFallbackHost",
        "smtpFallbackPort",
        "smtpFallbackUsername",
        "smtpFallbackPassword",
        "smtpFallbackSecure",
    ];
    if NAMES.iter().all(|n| secret(n).is_none()) {
        return None;
    }
    let mut text = |name: &'static str, trim: bool| match secret(name) {
        Some(Entry::Text(s)) if !s.trim().is_empty() => {
            Some(if trim { s.trim() } else { s }.to_owned())
        }
        Some(Entry::Text(_)) => {
            bad.push((name, "empty".into()));
            None
        }
        Some(_) => {
            bad.push((name, "must be a string".into()));
            None
        }
        None => {
            bad.push((name, "missing".into()));
            None
        }
    };
    let host = text("smtpFallbackHost", true);
    let user = text("smtpFallbackUsername", true);
    let password = text("smtpFallbackPassword", false);
    let port = port("smtpFallbackPort", secret("smtpFallbackPort"), bad);
    let secure = secure("smtpFallbackSecure", secret("smtpFallbackSecure"), bad);
    Some(SmtpTarget {
        host: host?,
        port: port?,
        tls: TlsMode::infer(secure?, port?),
        credentials: Some(Credentials::password(user?, password?)),
    })
}

fn limits<'a>(
    secret: &impl Fn(&'static str) -> Option<Entry<'a>>,
    bad: &mut Vec<(&'static str, String)>,
) -> Limits {
    let rate = match secret("smtpRateLimit") {
        None => None,
        Some(Entry::Text(t)) if RateLimit::parse(t).is_some() => RateLimit::parse(t),
        Some(_) => {
            bad.push((
                "smtpRateLimit",
                "must be \"N/s\", \"N/min\" or \"N/h\"".into(),
            ));
            None
        }
    };
    let max_connections = match secret("smtpMaxConnections") {
        None => None,
        Some(Entry::Integer(n)) if (1..=10_000).contains(&n) => Some(n as usize),
        Some(_) => {
            bad.push((
                "smtpMaxConnections",
                "must be an integer in 1..10000".into(),
            ));
            None
        }
    };
    Limits {
        rate,
        max_connections,
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Method {
    Plain,
    Login,
    XOAuth2,
}

/// `"a@x, b@y"` or `["a@x", "b@y"]`.
pub fn approved_list(entry: Entry<'_>) -> Option<ApprovedList> {
    match entry {
        Entry::Text(s) => Some(ApprovedList::from_entries([s])),
        Entry::Texts(items) => Some(ApprovedList::from_entries(items)),
        _ => None,
    }
}

/// The spec's rules for a project's secrets, with every bad entry named. `secret` gives the
/// value of a secret by its spec name, or `None` when the project does not have it.
pub fn build<'a>(secret: impl Fn(&'static str) -> Option<Entry<'a>>) -> ProjectSecrets {
    let mut bad: Vec<(&'static str, String)> = Vec::new();
    let app_name = match secret("appName") {
        Some(Entry::Text(s)) if !s.chars().any(char::is_control) => {
            Some(s.trim().to_owned()).filter(|s| !s.is_empty())
        }
        Some(_) => {
            bad.push((
                "appName",
                "must be a string without control characters".into(),
            ));
            None
        }
        None => None,
    };
    let Some(host) = secret("smtpHost") else {
        return ProjectSecrets {
            app_name,
            smtp: ProjectSmtp::None,
        };
    };

    let mut required_string = |name: &'static str, v: Option<Entry<'_>>| -> Option<String> {
        match v {
            None => {
                bad.push((name, "missing".into()));
                None
            }
            Some(Entry::Text(s)) if !s.trim().is_empty() => Some(s.trim().to_owned()),
            Some(Entry::Text(_)) => {
                bad.push((name, "empty".into()));
                None
            }
            Some(_) => {
                bad.push((name, "must be a string".into()));
                None
            }
        }
    };
    let host = required_string("smtpHost", Some(host));
    let username = required_string("smtpUsername", secret("smtpUsername"));
    let method = match secret("smtpAuthMethod") {
        None => Some(None),
        Some(Entry::Text(m)) => match m.trim().to_ascii_lowercase().as_str() {
            "plain" => Some(Some(Method::Plain)),
            "login" => Some(Some(Method::Login)),
            "xoauth2" => Some(Some(Method::XOAuth2)),
            _ => None,
        },
        Some(_) => None,
    };
    if method.is_none() {
        bad.push((
            "smtpAuthMethod",
            "must be \"plain\", \"login\" or \"xoauth2\"".into(),
        ));
    }
    let oauth = method == Some(Some(Method::XOAuth2));
    // The password is compared as written: leading spaces may be part of it.
    let mut secret_text = |name: &'static str, required: bool| match secret(name) {
        Some(Entry::Text(s)) if !s.is_empty() => Some(s.to_owned()),
        Some(Entry::Text(_)) => {
            bad.push((name, "empty".into()));
            None
        }
        Some(_) => {
            bad.push((name, "must be a string".into()));
            None
        }
        None if required => {
            bad.push((name, "missing".into()));
            None
        }
        None => None,
    };
    let password = secret_text("smtpPassword", !oauth);
    let oauth_client = if oauth {
        let token_url = secret_text("smtpOAuthTokenUrl", true);
        let client_id = secret_text("smtpOAuthClientId", true);
        let client_secret = secret_text("smtpOAuthClientSecret", true);
        let scope = secret_text("smtpOAuthScope", false);
        let refresh_token = secret_text("smtpOAuthRefreshToken", false);
        if let Some(url) = &token_url
            && let Err(why) = check_secret_url(url.trim())
        {
            bad.push(("smtpOAuthTokenUrl", why.into()));
        }
        match (token_url, client_id, client_secret) {
            (Some(token_url), Some(client_id), Some(client_secret)) => Some(OAuthClient {
                token_url: token_url.trim().to_owned(),
                client_id: client_id.trim().to_owned(),
                client_secret: SecretKey(client_secret),
                scope: scope.map(|s| s.trim().to_owned()),
                refresh_token: refresh_token.map(SecretKey),
            }),
            _ => None,
        }
    } else {
        None
    };
    let port = port("smtpPort", secret("smtpPort"), &mut bad);
    // An invalid smtpSecure is named; the target is then not built, so its value is moot.
    let secure = secure("smtpSecure", secret("smtpSecure"), &mut bad).flatten();
    let from = match secret("smtpFromAddress") {
        None => {
            bad.push(("smtpFromAddress", "missing".into()));
            None
        }
        Some(Entry::Text(s)) => {
            let mb = address::parse_one(s);
            if mb.is_none() {
                bad.push(("smtpFromAddress", "must be one email address".into()));
            }
            mb
        }
        Some(_) => {
            bad.push(("smtpFromAddress", "must be a string".into()));
            None
        }
    };
    let approved = match secret("smtpApprovedSenders") {
        None => Some(ApprovedList::default()),
        Some(v) => {
            let list = approved_list(v);
            if list.is_none() {
                bad.push((
                    "smtpApprovedSenders",
                    "must be a comma-separated string or an array of strings".into(),
                ));
            }
            list
        }
    };

    let fallback = fallback(&secret, &mut bad);
    let limits = limits(&secret, &mut bad);

    let auth = match (method.flatten(), password, oauth_client) {
        (Some(Method::XOAuth2), _, Some(client)) => Some(Auth::XOAuth2(client)),
        (Some(Method::Plain), Some(p), _) => Some(Auth::Password {
            password: SecretKey(p),
            method: Some(PasswordMethod::Plain),
        }),
        (Some(Method::Login), Some(p), _) => Some(Auth::Password {
            password: SecretKey(p),
            method: Some(PasswordMethod::Login),
        }),
        (None, Some(p), _) => Some(Auth::Password {
            password: SecretKey(p),
            method: None,
        }),
        _ => None,
    };
    let smtp = match (host, port, username, auth, from, approved) {
        (Some(host), Some(port), Some(user), Some(auth), Some(from), Some(approved))
            if bad.is_empty() =>
        {
            ProjectSmtp::Active(Box::new(ProjectRelay {
                target: SmtpTarget {
                    host,
                    port,
                    tls: TlsMode::infer(secure, port),
                    credentials: Some(Credentials { user, auth }),
                },
                from,
                approved,
                fallback,
                limits,
            }))
        }
        _ => ProjectSmtp::Misconfigured(bad),
    };
    ProjectSecrets { app_name, smtp }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build_from(entries: &[(&'static str, Entry<'static>)]) -> ProjectSecrets {
        build(|name| {
            entries
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, e)| e.clone())
        })
    }

    #[test]
    fn the_same_rules_whatever_the_source() {
        let good = [
            ("smtpHost", Entry::Text("smtp.acme.example")),
            ("smtpPort", Entry::Integer(587)),
            ("smtpUsername", Entry::Text("u")),
            ("smtpPassword", Entry::Text(" p")),
            (
                "smtpFromAddress",
                Entry::Text("Acme <noreply@acme.example>"),
            ),
            ("smtpApprovedSenders", Entry::Text("a@acme.example")),
        ];
        let ProjectSmtp::Active(r) = build_from(&good).smtp else {
            panic!("not active")
        };
        assert_eq!(r.target.tls, TlsMode::StartTls);
        let Some(Credentials {
            auth: Auth::Password { password, .. },
            ..
        }) = r.target.credentials
        else {
            panic!("no password")
        };
        assert_eq!(password.expose(), " p");
        let mut port_as_text = good.clone();
        port_as_text[1] = ("smtpPort", Entry::Text("587"));
        assert_eq!(build_from(&port_as_text).smtp.bad_entries(), ["smtpPort"]);
        let mut decimal = good.clone();
        decimal[1] = ("smtpPort", Entry::Other);
        assert_eq!(build_from(&decimal).smtp.bad_entries(), ["smtpPort"]);
        assert!(matches!(build_from(&good[1..]).smtp, ProjectSmtp::None));
        let bad = build_from(&[
            ("smtpHost", Entry::Integer(1)),
            ("smtpSecure", Entry::Text("true")),
        ]);
        assert_eq!(
            bad.smtp.bad_entries(),
            [
                "smtpHost",
                "smtpUsername",
                "smtpPassword",
                "smtpPort",
                "smtpSecure",
                "smtpFromAddress"
            ]
        );
        // Nothing said about a value ever repeats it.
        assert!(!format!("{:?}", build_from(&good)).contains(" p\""));
    }

    #[test]
    fn xoauth2_needs_its_client_and_no_password() {
        let base = [
            ("smtpHost", Entry::Text("smtp.office365.com")),
            ("smtpPort", Entry::Integer(587)),
            ("smtpUsername", Entry::Text("printer@contoso.example")),
            ("smtpFromAddress", Entry::Text("printer@contoso.example")),
            ("smtpAuthMethod", Entry::Text("xoauth2")),
        ];
        assert_eq!(
            build_from(&base).smtp.bad_entries(),
            [
                "smtpOAuthTokenUrl",
                "smtpOAuthClientId",
                "smtpOAuthClientSecret"
            ]
        );
        let mut full = base.to_vec();
        full.extend([
            (
                "smtpOAuthTokenUrl",
                Entry::Text("https://login.microsoftonline.com/t/oauth2/v2.0/token"),
            ),
            ("smtpOAuthClientId", Entry::Text("app")),
            ("smtpOAuthClientSecret", Entry::Text("s")),
        ]);
        let ProjectSmtp::Active(r) = build_from(&full).smtp else {
            panic!("not active")
        };
        assert!(matches!(
            r.target.credentials.unwrap().auth,
            Auth::XOAuth2(OAuthClient {
                refresh_token: None,
                ..
            })
        ));
        let mut clear = full.clone();
        clear[5] = (
            "smtpOAuthTokenUrl",
            Entry::Text("http://login.example/token"),
        );
        assert_eq!(build_from(&clear).smtp.bad_entries(), ["smtpOAuthTokenUrl"]);
        let mut unknown = full.clone();
        unknown[4] = ("smtpAuthMethod", Entry::Text("cram-md5"));
        assert_eq!(
            build_from(&unknown).smtp.bad_entries(),
            ["smtpAuthMethod", "smtpPassword"]
        );
    }

    #[test]
    fn fallback_is_all_or_none_and_limits_are_checked() {
        let base = [
            ("smtpHost", Entry::Text("smtp.acme.example")),
            ("smtpPort", Entry::Integer(587)),
            ("smtpUsername", Entry::Text("u")),
            ("smtpPassword", Entry::Text("p")),
            ("smtpFromAddress", Entry::Text("noreply@acme.example")),
        ];
        let with = |extra: &[(&'static str, Entry<'static>)]| {
            let mut all = base.to_vec();
            all.extend_from_slice(extra);
            build_from(&all)
        };
        let ProjectSmtp::Active(r) = with(&[
            ("smtpFallbackHost", Entry::Text("smtp.backup.example")),
            ("smtpFallbackPort", Entry::Integer(465)),
            ("smtpFallbackUsername", Entry::Text("b")),
            ("smtpFallbackPassword", Entry::Text("bp")),
            ("smtpRateLimit", Entry::Text("30/min")),
            ("smtpMaxConnections", Entry::Integer(3)),
        ])
        .smtp
        else {
            panic!("not active")
        };
        assert_eq!(r.fallback.as_ref().unwrap().tls, TlsMode::Implicit);
        assert_eq!(r.limits.rate.unwrap().to_string(), "30/min");
        assert_eq!(r.limits.max_connections, Some(3));
        assert_eq!(
            with(&[("smtpFallbackHost", Entry::Text("smtp.backup.example"))])
                .smtp
                .bad_entries(),
            [
                "smtpFallbackUsername",
                "smtpFallbackPassword",
                "smtpFallbackPort"
            ]
        );
        assert_eq!(
            with(&[("smtpFallbackPort", Entry::Text("465"))])
                .smtp
                .bad_entries(),
            [
                "smtpFallbackHost",
                "smtpFallbackUsername",
                "smtpFallbackPassword",
                "smtpFallbackPort"
            ]
        );
        for bad in ["6", "0/s", "6/day", "x/s", "-1/min"] {
            assert_eq!(
                with(&[("smtpRateLimit", Entry::Text(bad))])
                    .smtp
                    .bad_entries(),
                ["smtpRateLimit"],
                "{bad}"
            );
        }
        assert_eq!(
            with(&[("smtpMaxConnections", Entry::Text("2"))])
                .smtp
                .bad_entries(),
            ["smtpMaxConnections"]
        );
    }
}

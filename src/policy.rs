//! The Project SMTP rules as pure code: which project a message belongs to, which transport
//! carries it, which From it leaves with, and the header edits that follow. Header edits are
//! byte splices over the received message: every byte outside the edited fields is kept.

use crate::address::{self, ApprovedList, Mailbox};
use std::path::Path;

use crate::config::{Config, Provider, Source};
use crate::project::{ProjectRelay, ProjectSecrets, ProjectSmtp};
use crate::smtp::Reply;

/// Where a message goes.
#[derive(Debug, Clone, Copy)]
pub enum Transport<'c> {
    /// The project's own relay (`smtpHost`).
    Project {
        name: &'c str,
        relay: &'c ProjectRelay,
    },
    /// The server-wide provider.
    Server(&'c Provider),
}

/// What happened to the caller's From, in the words `send-test` and the logs use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FromDecision {
    /// An approved sender: the field went upstream as the caller wrote it.
    Kept,
    /// An approved sender without a display name: the project's appName was added as one.
    KeptNamed,
    /// Not an approved sender (or not exactly one mailbox): the default From replaced it.
    Replaced,
    /// The message had no From: the default From was added.
    Added,
}

impl FromDecision {
    pub fn describe(self) -> &'static str {
        match self {
            FromDecision::Kept => "kept: approved sender",
            FromDecision::KeptNamed => "kept: approved sender, appName added as its name",
            FromDecision::Replaced => "default From: the caller's From is not an approved sender",
            FromDecision::Added => "default From: the message had no From",
        }
    }
}

#[derive(Debug)]
pub struct Decision<'c> {
    /// The project the message named, when it names one we know.
    pub project: Option<&'c str>,
    pub transport: Transport<'c>,
    /// MAIL FROM upstream: the resolved From's bare address.
    pub envelope_from: String,
    /// The caller's From field value(s) as received, unfolded, for logs and capture.
    pub original_from: Option<String>,
    pub resolved_from: String,
    pub from_rewritten: bool,
    pub from_decision: FromDecision,
    /// The From decision in words: which list was consulted, and what replaced what.
    pub from_explained: String,
    /// The rewritten header fields. The message that goes upstream is `head` followed by the
    /// received bytes from `body_offset` on (the empty line and the body), which are never
    /// copied: a large message stays in memory once.
    pub head: Vec<u8>,
    pub body_offset: usize,
    /// The project's `captureDir`: write the message there instead of using `transport`.
    pub capture: Option<&'c std::path::Path>,
}

impl Decision<'_> {
    /// The outgoing message in two pieces, without copying the body.
    pub fn parts<'a>(&'a self, data: &'a [u8]) -> [&'a [u8]; 2] {
        [&self.head, &data[self.body_offset..]]
    }

    /// The outgoing message as one buffer (tests, small messages).
    pub fn assemble(&self, data: &[u8]) -> Vec<u8> {
        self.parts(data).concat()
    }
}

/// One header field: `start..end` covers the name through the CRLF of its last line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Field {
    start: usize,
    colon: usize,
    end: usize,
}

impl Field {
    fn name<'a>(&self, data: &'a [u8]) -> &'a [u8] {
        trim_wsp_end(&data[self.start..self.colon])
    }
    fn value<'a>(&self, data: &'a [u8]) -> &'a [u8] {
        &data[self.colon + 1..self.end]
    }
    fn is(&self, data: &[u8], name: &str) -> bool {
        self.name(data).eq_ignore_ascii_case(name.as_bytes())
    }
}

fn trim_wsp_end(b: &[u8]) -> &[u8] {
    let n = b
        .iter()
        .rposition(|c| *c != b' ' && *c != b'\t')
        .map_or(0, |i| i + 1);
    &b[..n]
}

/// Splits the header section (RFC 5322 §2.2) into fields; it ends at the first empty line or
/// at the end of the message. A line that is neither a field nor a continuation means we
/// cannot know what we would be editing, so the message is refused.
fn header_fields(data: &[u8]) -> Result<Vec<Field>, Reply> {
    let mut fields: Vec<Field> = Vec::new();
    let mut pos = 0;
    while pos < data.len() {
        let line_end = memchr::memchr(b'\n', &data[pos..]).map_or(data.len(), |i| pos + i + 1);
        let line = &data[pos..line_end];
        let content = line.strip_suffix(b"\n").unwrap_or(line);
        let content = content.strip_suffix(b"\r").unwrap_or(content);
        if content.is_empty() {
            break;
        }
        if content[0] == b' ' || content[0] == b'\t' {
            let last = fields.last_mut().ok_or(Reply::BAD_HEADER)?;
            last.end = line_end;
        } else {
            let colon = memchr::memchr(b':', content).ok_or(Reply::BAD_HEADER)?;
            let name = trim_wsp_end(&content[..colon]);
            if name.is_empty() || !name.iter().all(|b| (33..=126).contains(b)) {
                return Err(Reply::BAD_HEADER);
            }
            fields.push(Field {
                start: pos,
                colon: pos + colon,
                end: line_end,
            });
        }
        pos = line_end;
    }
    Ok(fields)
}

/// A header value with its folding removed and outer white space trimmed.
fn unfold(value: &[u8]) -> String {
    let s = String::from_utf8_lossy(value);
    s.replace("\r\n", "").replace('\n', "").trim().to_owned()
}

/// A message the rules refuse, with the project it named when that was known by then.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal<'c> {
    pub reply: Reply,
    pub project: Option<&'c str>,
}

impl From<Reply> for Refusal<'_> {
    fn from(reply: Reply) -> Self {
        Refusal {
            reply,
            project: None,
        }
    }
}

/// A message's header fields and the project it names (from its header or the client's
/// AUTH), before anything is known about that project.
#[derive(Debug)]
pub struct Identified {
    fields: Vec<Field>,
    pub project: Option<String>,
    /// The project header field as received (name and value, unfolded), if there was one.
    pub header: Option<String>,
}

/// The project a message belongs to, as its secrets' source described it.
#[derive(Debug, Clone, Copy)]
pub struct Project<'c> {
    pub name: &'c str,
    pub secrets: &'c ProjectSecrets,
    /// Capture this project's mail here instead of sending it.
    pub capture: Option<&'c Path>,
}

/// Applies the Project SMTP rules to one message whose project's secrets are in `config`
/// (`relay.toml`): [`identify`] and [`route`] in one step. A project whose secrets live
/// elsewhere takes the server provider here; the relay looks those up between the two steps.
pub fn decide<'c>(
    config: &'c Config,
    data: &[u8],
    auth_project: Option<&str>,
) -> Result<Decision<'c>, Refusal<'c>> {
    let id = identify(config, data, auth_project)?;
    let project = id.project.as_deref().and_then(|id| {
        let (name, p) = config.projects.get_key_value(id)?;
        match &p.source {
            Source::File(secrets) => Some(Project {
                name,
                secrets,
                capture: p.capture_dir.as_deref(),
            }),
            Source::Medplum(_) => None,
        }
    });
    route(config, &id, data, project)
}

/// Which project the message belongs to, from its header and the client's AUTH.
/// `auth_project` stands in for a missing project header, and no header may name another
/// project.
pub fn identify(
    config: &Config,
    data: &[u8],
    auth_project: Option<&str>,
) -> Result<Identified, Reply> {
    let fields = header_fields(data)?;
    let header = &config.listener.project_header;
    let project_fields: Vec<&Field> = fields.iter().filter(|f| f.is(data, header)).collect();
    if project_fields.len() > 1 {
        return Err(Reply::duplicate_project_header(header));
    }
    let project_id = match project_fields.first() {
        None => None,
        Some(f) => {
            let raw = f.value(data);
            if raw.contains(&0) {
                return Err(Reply::bad_project_header(header));
            }
            Some(unfold(raw)).filter(|v| !v.is_empty())
        }
    };
    let header_field = project_id.as_ref().map(|id| format!("{header}: {id}"));
    let project = match (auth_project, project_id) {
        (Some(auth), Some(id)) if auth != id => return Err(Reply::wrong_project(auth, header)),
        (Some(auth), _) => Some(auth.to_owned()),
        (None, id) => id,
    };
    Ok(Identified {
        fields,
        project,
        header: header_field,
    })
}

/// The transport, the From, and the header splices for a message of `project` (`None`: no
/// project we know, so the server provider).
pub fn route<'c>(
    config: &'c Config,
    id: &Identified,
    data: &[u8],
    project: Option<Project<'c>>,
) -> Result<Decision<'c>, Refusal<'c>> {
    splice(config, &id.fields, data, project).map_err(|reply| Refusal {
        reply,
        project: project.map(|p| p.name),
    })
}

fn splice<'c>(
    config: &'c Config,
    fields: &[Field],
    data: &[u8],
    project: Option<Project<'c>>,
) -> Result<Decision<'c>, Reply> {
    let header = &config.listener.project_header;
    // Which transport, and with it which default From and which approved list.
    let (transport, default_from, approved, app_name) = match project {
        Some(p) if config.server.allow_project_smtp => match &p.secrets.smtp {
            ProjectSmtp::Active(relay) => (
                Transport::Project {
                    name: p.name,
                    relay,
                },
                Some(&relay.from),
                &relay.approved,
                p.secrets.app_name.as_deref(),
            ),
            ProjectSmtp::Misconfigured(_) => {
                return Err(Reply::project_misconfigured(
                    p.name,
                    &p.secrets.smtp.bad_entries(),
                ));
            }
            ProjectSmtp::None => server_route(config)?,
        },
        _ => server_route(config)?,
    };

    let from_fields: Vec<&Field> = fields.iter().filter(|f| f.is(data, "From")).collect();
    let original_from = (!from_fields.is_empty()).then(|| {
        from_fields
            .iter()
            .map(|f| unfold(f.value(data)))
            .collect::<Vec<_>>()
            .join(", ")
    });
    // The caller's From, read strictly, when the message has exactly one; kept if approved.
    let (caller, unapproved) = match from_fields.as_slice() {
        [only] => match address::strict_mailbox(only.value(data)) {
            Some(mb) if is_approved(&mb.address, approved) => (Some(mb), None),
            Some(mb) => (None, Some(mb.address)),
            None => (None, None),
        },
        _ => (None, None),
    };
    let kept_verbatim = caller
        .as_ref()
        .is_some_and(|mb| mb.name.is_some() || app_name.is_none());
    let from_decision = match (&caller, from_fields.is_empty()) {
        (_, true) => FromDecision::Added,
        (Some(_), false) if kept_verbatim => FromDecision::Kept,
        (Some(_), false) => FromDecision::KeptNamed,
        (None, false) => FromDecision::Replaced,
    };
    let resolved = match caller {
        Some(mb) => mb,
        None => default_from.cloned().ok_or(Reply::NO_SERVER_SENDER)?,
    };
    let resolved = match (&resolved.name, app_name) {
        (None, Some(app)) => resolved.with_name(Some(app)),
        _ => resolved,
    };
    let envelope_from = resolved.address.clone();
    let resolved_from = resolved.render();
    let (list, default) = match transport {
        Transport::Project { name, .. } => {
            (format!("{name}'s smtpApprovedSenders"), "smtpFromAddress")
        }
        Transport::Server(_) => (
            "the server's approvedSenderEmails".to_owned(),
            "supportEmail",
        ),
    };
    let from_explained = match from_decision {
        FromDecision::Kept => format!("kept: {envelope_from} is in {list}"),
        FromDecision::KeptNamed => {
            format!("kept: {envelope_from} is in {list}; appName added as its name")
        }
        FromDecision::Added => format!("added: the message had no From, so {default}"),
        FromDecision::Replaced => match (unapproved, from_fields.len()) {
            (Some(address), _) => format!("{address} is not in {list}: replaced by {default}"),
            (None, 1) => format!(
                "the From is not one plain mailbox that every mail reader reads alike (RFC 5322): replaced by {default}"
            ),
            (None, several) => {
                format!("the message had {several} From fields: replaced by {default}")
            }
        },
    };

    // Splice: drop the project header, keep or replace the one From, normalise Sender.
    let header_end = fields.last().map_or(0, |f| f.end);
    let mut out = Vec::with_capacity(header_end + resolved_from.len() + 16);
    let mut copied = 0;
    if from_fields.is_empty() {
        push_field(&mut out, "From", &resolved_from);
    }
    let mut from_done = false;
    let mut sender_done = false;
    for f in fields {
        let replacement = if f.is(data, header) {
            Some(None)
        } else if f.is(data, "From") {
            let first = !std::mem::replace(&mut from_done, true);
            match (first, kept_verbatim) {
                (true, true) => None,
                (true, false) => Some(Some(("From", resolved_from.as_str()))),
                (false, _) => Some(None),
            }
        } else if f.is(data, "Sender") {
            let first = !std::mem::replace(&mut sender_done, true);
            Some(first.then_some(("Sender", envelope_from.as_str())))
        } else {
            None
        };
        if let Some(replacement) = replacement {
            out.extend_from_slice(&data[copied..f.start]);
            if let Some((name, value)) = replacement {
                push_field(&mut out, name, value);
            }
            copied = f.end;
        }
    }
    out.extend_from_slice(&data[copied..header_end]);

    Ok(Decision {
        project: project.map(|p| p.name),
        transport,
        envelope_from,
        original_from,
        resolved_from,
        from_rewritten: !kept_verbatim,
        from_decision,
        from_explained,
        head: out,
        body_offset: header_end,
        capture: project.and_then(|p| p.capture),
    })
}

type Route<'c> = (
    Transport<'c>,
    Option<&'c Mailbox>,
    &'c ApprovedList,
    Option<&'c str>,
);

fn server_route(config: &Config) -> Result<Route<'_>, Reply> {
    let provider = config
        .server
        .provider
        .as_ref()
        .ok_or(Reply::NO_SERVER_PROVIDER)?;
    Ok((
        Transport::Server(provider),
        config.server.support_email.as_ref(),
        &config.server.approved_sender_emails,
        None,
    ))
}

/// An address the caller's From may keep: one we would put in a header, and approved.
fn is_approved(address: &str, approved: &ApprovedList) -> bool {
    address::is_plausible_address(address) && approved.contains(address)
}

fn push_field(out: &mut Vec<u8>, name: &str, value: &str) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value.as_bytes());
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const CONFIG: &str = r#"
[server]
supportEmail = "Example <noreply@example.com>"
approvedSenderEmails = "alerts@example.com, billing@example.com"
[server.capture]
dir = "outbox"

[projects.acme]
smtpHost = "smtp.acme.example"
smtpPort = 465
smtpUsername = "apikey"
smtpPassword = "secret"
smtpFromAddress = "Acme <noreply@acme.example>"
smtpApprovedSenders = "alice@acme.example, bob@acme.example"

[projects.health]
smtpHost = "smtp.health.example"
smtpPort = 587
smtpUsername = "u"
smtpPassword = "p"
smtpFromAddress = "noreply@health.example"
smtpApprovedSenders = "carol@health.example"
appName = "Acme Health"

[projects.plain]
appName = "Plain"

[projects.broken]
smtpHost = "smtp.broken.example"
smtpPort = "587"
smtpUsername = "u"
"#;

    fn config(extra: &str) -> Config {
        Config::from_toml_str(&format!("{extra}\n{CONFIG}"), Path::new(".")).unwrap()
    }

    fn run(c: &Config, msg: &str) -> Result<(Decision<'static>, String), Reply> {
        // Leak: tests only, keeps the borrow simple.
        let c: &'static Config = Box::leak(Box::new(c.clone()));
        decide(c, msg.as_bytes(), None)
            .map_err(|r| r.reply)
            .map(|d| {
                let text = String::from_utf8(d.assemble(msg.as_bytes())).unwrap();
                (d, text)
            })
    }

    fn project_of<'a>(d: &Decision<'a>) -> Option<&'a str> {
        match d.transport {
            Transport::Project { name, .. } => Some(name),
            Transport::Server(_) => None,
        }
    }

    #[test]
    fn project_header_routes_to_project_relay() {
        let c = config("");
        let (d, out) = run(
            &c,
            "X-Project-Id: acme\r\nFrom: alice@acme.example\r\nSubject: s\r\n\r\nbody\r\n",
        )
        .unwrap();
        assert_eq!(project_of(&d), Some("acme"));
        assert_eq!(
            out,
            "From: alice@acme.example\r\nSubject: s\r\n\r\nbody\r\n"
        );
        assert_eq!(d.envelope_from, "alice@acme.example");
        assert!(!d.from_rewritten);
    }

    #[test]
    fn header_name_is_case_insensitive_and_value_trimmed() {
        let c = config("");
        let (d, out) = run(&c, "x-project-ID:   acme  \r\nSubject: s\r\n\r\nb\r\n").unwrap();
        assert_eq!(project_of(&d), Some("acme"));
        assert!(!out.to_ascii_lowercase().contains("x-project-id"));
        // Folded value.
        let (d, _) = run(&c, "X-Project-Id:\r\n acme\r\n\r\nb\r\n").unwrap();
        assert_eq!(project_of(&d), Some("acme"));
    }

    #[test]
    fn custom_project_header() {
        let c = config("[listener]\nproject_header = \"X-Tenant\"");
        let (d, out) = run(&c, "X-Tenant: acme\r\nX-Project-Id: other\r\n\r\nb\r\n").unwrap();
        assert_eq!(project_of(&d), Some("acme"));
        assert!(out.contains("X-Project-Id: other\r\n"));
    }

    #[test]
    fn two_project_headers_refused() {
        let c = config("");
        let r = run(&c, "X-Project-Id: acme\r\nX-PROJECT-ID: acme\r\n\r\nb\r\n").unwrap_err();
        assert_eq!((r.code, r.enhanced.as_deref()), (550, Some("5.7.1")));
    }

    #[test]
    fn server_routes() {
        let c = config("");
        for msg in [
            "Subject: no header\r\n\r\nb\r\n",
            "X-Project-Id: unknown\r\n\r\nb\r\n",
            "X-Project-Id: plain\r\n\r\nb\r\n",
            "X-Project-Id: \r\n\r\nb\r\n",
        ] {
            let (d, out) = run(&c, msg).unwrap();
            assert!(matches!(d.transport, Transport::Server(_)), "{msg}");
            assert_eq!(d.envelope_from, "noreply@example.com");
            assert!(
                out.starts_with("From: Example <noreply@example.com>\r\n"),
                "{out}"
            );
            assert!(!out.contains("X-Project-Id"));
        }
    }

    #[test]
    fn allow_project_smtp_false_sends_all_through_server() {
        let mut c = config("");
        c.server.allow_project_smtp = false;
        for id in ["acme", "broken"] {
            let (d, out) = run(
                &c,
                &format!("X-Project-Id: {id}\r\nFrom: alice@acme.example\r\n\r\nb\r\n"),
            )
            .unwrap();
            assert!(matches!(d.transport, Transport::Server(_)));
            // The project's approved list is not consulted on the server transport.
            assert_eq!(d.envelope_from, "noreply@example.com");
            assert!(out.starts_with("From: Example <noreply@example.com>\r\n"));
        }
    }

    #[test]
    fn misconfigured_project_refused_with_names() {
        let c = config("");
        let r = run(&c, "X-Project-Id: broken\r\n\r\nb\r\n").unwrap_err();
        assert_eq!((r.code, r.enhanced.as_deref()), (451, Some("4.3.5")));
        assert!(
            r.text
                .starts_with("Project SMTP configuration is incomplete or invalid")
        );
        for name in ["smtpPort", "smtpPassword", "smtpFromAddress"] {
            assert!(r.text.contains(name), "{}", r.text);
        }
        assert!(!r.text.contains("smtpUsername"));
    }

    #[test]
    fn unapproved_from_replaced_by_project_default() {
        let c = config("");
        let (d, out) = run(
            &c,
            "X-Project-Id: acme\r\nFrom: Mallory <mallory@acme.example>\r\n\r\nb\r\n",
        )
        .unwrap();
        assert_eq!(out, "From: Acme <noreply@acme.example>\r\n\r\nb\r\n");
        assert_eq!(d.envelope_from, "noreply@acme.example");
        assert!(d.from_rewritten);
        assert_eq!(
            d.original_from.as_deref(),
            Some("Mallory <mallory@acme.example>")
        );
    }

    #[test]
    fn approved_from_kept_with_display_name_and_case_insensitive() {
        let c = config("");
        let (d, out) = run(
            &c,
            "X-Project-Id: acme\r\nFrom: \"Bob B.\" <BOB@Acme.Example>\r\n\r\nb\r\n",
        )
        .unwrap();
        assert_eq!(out, "From: \"Bob B.\" <BOB@Acme.Example>\r\n\r\nb\r\n");
        assert_eq!(d.envelope_from, "BOB@Acme.Example");
    }

    #[test]
    fn server_list_never_used_for_project_and_vice_versa() {
        let c = config("");
        let (d, _) = run(
            &c,
            "X-Project-Id: acme\r\nFrom: alerts@example.com\r\n\r\nb\r\n",
        )
        .unwrap();
        assert_eq!(d.envelope_from, "noreply@acme.example");
        let (d, _) = run(&c, "From: alice@acme.example\r\n\r\nb\r\n").unwrap();
        assert_eq!(d.envelope_from, "noreply@example.com");
        let (d, out) = run(&c, "From: Alerts <alerts@example.com>\r\n\r\nb\r\n").unwrap();
        assert_eq!(d.envelope_from, "alerts@example.com");
        assert!(out.starts_with("From: Alerts <alerts@example.com>\r\n"));
    }

    #[test]
    fn multiple_addresses_or_fields_use_default_and_leave_one_from() {
        let c = config("");
        let (_, out) = run(
            &c,
            "X-Project-Id: acme\r\nFrom: alice@acme.example, bob@acme.example\r\n\r\nb\r\n",
        )
        .unwrap();
        assert_eq!(out, "From: Acme <noreply@acme.example>\r\n\r\nb\r\n");
        let (_, out) = run(
            &c,
            "X-Project-Id: acme\r\nFrom: alice@acme.example\r\nTo: x@y.example\r\nFrom: bob@acme.example\r\n\r\nb\r\n",
        )
        .unwrap();
        assert_eq!(
            out,
            "From: Acme <noreply@acme.example>\r\nTo: x@y.example\r\n\r\nb\r\n"
        );
        let (_, out) = run(
            &c,
            "X-Project-Id: acme\r\nFrom: team: alice@acme.example;\r\n\r\nb\r\n",
        )
        .unwrap();
        assert_eq!(out.matches("From:").count(), 1);
        assert!(out.starts_with("From: Acme <noreply@acme.example>"));
    }

    #[test]
    fn a_from_readers_can_read_differently_is_replaced() {
        let c = config("");
        for from in [
            "evil@evil.example <alice@acme.example>",
            "alice@acme.example, <>",
            "Alice <alice@acme.example",
            "<alice@acme.example> evil@evil.example",
            "(evil@evil.example) alice@acme.example",
        ] {
            let msg = format!("X-Project-Id: acme\r\nFrom: {from}\r\n\r\nb\r\n");
            let (d, out) = run(&c, &msg).unwrap();
            assert_eq!(d.from_decision, FromDecision::Replaced, "{from}");
            assert_eq!(
                out, "From: Acme <noreply@acme.example>\r\n\r\nb\r\n",
                "{from}"
            );
        }
    }

    #[test]
    fn missing_from_added() {
        let c = config("");
        let (d, out) = run(&c, "X-Project-Id: acme\r\nSubject: s\r\n\r\nb\r\n").unwrap();
        assert_eq!(
            out,
            "From: Acme <noreply@acme.example>\r\nSubject: s\r\n\r\nb\r\n"
        );
        assert!(d.from_rewritten);
        assert_eq!(d.original_from, None);
        // A message with no header section at all.
        let (_, out) = run(&c, "\r\nbody only\r\n").unwrap();
        assert_eq!(
            out,
            "From: Example <noreply@example.com>\r\n\r\nbody only\r\n"
        );
    }

    #[test]
    fn app_name_fills_a_bare_from() {
        let c = config("");
        let (_, out) = run(&c, "X-Project-Id: health\r\n\r\nb\r\n").unwrap();
        assert_eq!(
            out,
            "From: Acme Health <noreply@health.example>\r\n\r\nb\r\n"
        );
        let (d, out) = run(
            &c,
            "X-Project-Id: health\r\nFrom: carol@health.example\r\n\r\nb\r\n",
        )
        .unwrap();
        assert_eq!(out, "From: Acme Health <carol@health.example>\r\n\r\nb\r\n");
        assert!(d.from_rewritten);
        let (d, out) = run(
            &c,
            "X-Project-Id: health\r\nFrom: Carol <carol@health.example>\r\n\r\nb\r\n",
        )
        .unwrap();
        assert_eq!(out, "From: Carol <carol@health.example>\r\n\r\nb\r\n");
        assert!(!d.from_rewritten);
        // appName of a project without project SMTP does not apply on the server transport.
        let (_, out) = run(&c, "X-Project-Id: plain\r\n\r\nb\r\n").unwrap();
        assert!(out.starts_with("From: Example <noreply@example.com>"));
    }

    #[test]
    fn sender_replaced_never_added() {
        let c = config("");
        let (_, out) = run(
            &c,
            "X-Project-Id: acme\r\nSender: someone@else.example\r\nFrom: alice@acme.example\r\nSender: again@else.example\r\n\r\nb\r\n",
        )
        .unwrap();
        assert_eq!(
            out,
            "Sender: alice@acme.example\r\nFrom: alice@acme.example\r\n\r\nb\r\n"
        );
        let (_, out) = run(
            &c,
            "X-Project-Id: acme\r\nFrom: alice@acme.example\r\n\r\nb\r\n",
        )
        .unwrap();
        assert!(!out.contains("Sender"));
    }

    #[test]
    fn other_bytes_unchanged() {
        let c = config("");
        let msg = "Received: from a\r\n\tby b; folded\r\nX-Project-Id: acme\r\nSubject: =?UTF-8?Q?h=C3=A9?=\r\nFrom: Mallory\r\n <mallory@x.example>\r\nX-8bit: héllo\r\n\r\n.leading dot\r\nFrom: not a header\r\n\r\nX-Project-Id: acme\r\n";
        let (_, out) = run(&c, msg).unwrap();
        assert_eq!(
            out,
            "Received: from a\r\n\tby b; folded\r\nSubject: =?UTF-8?Q?h=C3=A9?=\r\nFrom: Acme <noreply@acme.example>\r\nX-8bit: héllo\r\n\r\n.leading dot\r\nFrom: not a header\r\n\r\nX-Project-Id: acme\r\n"
        );
    }

    #[test]
    fn no_server_provider_refused() {
        let mut c = config("");
        c.server.provider = None;
        let r = run(&c, "Subject: s\r\n\r\nb\r\n").unwrap_err();
        assert_eq!((r.code, r.enhanced.as_deref()), (451, Some("4.3.5")));
        // Project mail is unaffected.
        assert!(run(&c, "X-Project-Id: acme\r\n\r\nb\r\n").is_ok());
    }

    #[test]
    fn no_support_email_refused_unless_sender_approved() {
        let mut c = config("");
        c.server.support_email = None;
        assert_eq!(
            run(&c, "Subject: s\r\n\r\nb\r\n").unwrap_err(),
            Reply::NO_SERVER_SENDER
        );
        assert!(run(&c, "From: alerts@example.com\r\n\r\nb\r\n").is_ok());
    }

    #[test]
    fn malformed_header_section_refused() {
        let c = config("");
        for msg in [
            "not a header\r\n\r\nb\r\n",
            " continuation first\r\n\r\n",
            "Bad Name: x\r\n\r\n",
            ": x\r\n\r\n",
        ] {
            assert_eq!(run(&c, msg).unwrap_err(), Reply::BAD_HEADER, "{msg:?}");
        }
    }

    #[test]
    fn authenticated_project_binds_the_message() {
        let c: &'static Config = Box::leak(Box::new(config("")));
        let d = decide(c, b"Subject: s\r\n\r\nb\r\n", Some("acme")).unwrap();
        assert_eq!(project_of(&d), Some("acme"));
        let d = decide(c, b"X-Project-Id: acme\r\n\r\nb\r\n", Some("acme")).unwrap();
        assert_eq!(project_of(&d), Some("acme"));
        let r = decide(c, b"X-Project-Id: health\r\n\r\nb\r\n", Some("acme"))
            .unwrap_err()
            .reply;
        assert_eq!((r.code, r.enhanced.as_deref()), (550, Some("5.7.1")));
        // An authenticated project without project SMTP still uses the server transport.
        let d = decide(c, b"\r\nb\r\n", Some("plain")).unwrap();
        assert!(matches!(d.transport, Transport::Server(_)));
        assert_eq!(d.project, Some("plain"));
    }

    #[test]
    fn nul_in_project_header_refused() {
        let c = config("");
        let r = run(&c, "X-Project-Id: ac\0me\r\n\r\nb\r\n").unwrap_err();
        assert_eq!(r.code, 550);
    }
}

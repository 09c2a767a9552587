//! One message from the client to its transport: policy decision, upstream send or capture,
//! the client's reply, its metrics, and the one log event per message.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::activity::{Activity, Entry};
use crate::capture;
use crate::config::{Config, Provider, SmtpTarget};
use crate::metrics::{self, Outcome as Kind};
use crate::policy::{self, Transport};
use crate::smtp::{Reply, Transaction};
use crate::source::Sources;
use crate::tls::{self, TlsError};
use crate::upstream::{self, Upstreams};

#[derive(Debug)]
pub struct Relay {
    pub config: Arc<Config>,
    /// Shared with every other config generation: warm connections outlive a reload.
    pub upstreams: Arc<Upstreams>,
    /// Shared likewise: Medplum tokens and secrets outlive a reload.
    pub sources: Arc<Sources>,
    /// The last outcomes, for the admin page; outlives a reload too.
    pub activity: Arc<Activity>,
}

/// What happened to one message: for the client's reply, the log, the metrics, `send-test`.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub reply: Reply,
    pub project: Option<String>,
    /// How the message travelled (or would have): `smtp://host:port (tls)`, `capture`...
    pub transport: String,
    pub resolved_from: Option<String>,
    pub from_rewritten: bool,
    /// `None` when the message was refused before its From was looked at.
    pub from_decision: Option<policy::FromDecision>,
    pub took: Duration,
}

fn describe(target: &SmtpTarget, whose: &str) -> String {
    format!(
        "{whose} smtp://{}:{} ({})",
        target.host, target.port, target.tls
    )
}

impl Relay {
    /// A relay with upstream pools and secret sources of its own (`check`, `send-test`).
    pub fn new(config: Arc<Config>) -> Result<Relay, TlsError> {
        let upstreams = Arc::new(Upstreams::new(upstream_settings(&config)?));
        let sources = Arc::new(Sources::new(&config)?);
        Ok(Relay {
            config,
            upstreams,
            sources,
            activity: Arc::default(),
        })
    }

    /// A relay for `config` over pools and sources that outlive it.
    pub fn with_shared(
        config: Arc<Config>,
        upstreams: Arc<Upstreams>,
        sources: Arc<Sources>,
        activity: Arc<Activity>,
    ) -> Relay {
        Relay {
            config,
            upstreams,
            sources,
            activity,
        }
    }

    /// Relays one finished transaction: the client's reply is 250 only once the upstream (or
    /// the capture folder) has the message.
    pub async fn relay_with_outcome(&self, tx: Transaction) -> Outcome {
        let committed = std::sync::atomic::AtomicBool::new(false);
        self.relay_committed(tx, &committed).await
    }

    /// As `relay_with_outcome`; `committed` is set once the message passed its sender's
    /// limits and is on its way: until then, dropping this future abandons it with nothing
    /// sent (a client that left while it waited loses its place).
    pub async fn relay_committed(
        &self,
        mut tx: Transaction,
        committed: &std::sync::atomic::AtomicBool,
    ) -> Outcome {
        let started = Instant::now();
        let size = tx.data.len();
        let identified = policy::identify(&self.config, &tx.data, tx.auth_project.as_deref());
        // The project's settings, looked up between identify and the pure route; the
        // decision borrows them.
        let found = match &identified {
            Ok(id) => match id.project.as_deref() {
                Some(project) => self
                    .sources
                    .find(&self.config, project)
                    .await
                    .map(|found| (id, found))
                    .map_err(|reply| policy::Refusal {
                        reply,
                        project: Some(project),
                    }),
                None => Ok((id, None)),
            },
            Err(reply) => Err(policy::Refusal::from(reply.clone())),
        };
        let routed = match &found {
            Ok((id, found)) => {
                let project = found.as_ref().map(|f| policy::Project {
                    name: &f.name,
                    secrets: &f.secrets,
                    capture: f.capture,
                });
                policy::route(&self.config, id, &tx.data, project)
            }
            Err(refusal) => Err(refusal.clone()),
        };
        let mut decision = match routed {
            Ok(d) => d,
            Err(policy::Refusal { reply, project }) => {
                let kind = if reply.enhanced.as_deref() == Some("4.3.5") {
                    Kind::RefusedConfig
                } else {
                    Kind::Refused
                };
                metrics::message(project.unwrap_or("-"), kind, size);
                tracing::info!(
                    client = tx.client.map(tracing::field::display),
                    project = project.unwrap_or("-"),
                    mail_from = %tx.mail_from,
                    recipients = tx.recipients.len(),
                    size,
                    code = reply.code,
                    reply = %reply.text,
                    "message refused"
                );
                self.activity.record(Entry {
                    seq: 0,
                    time: String::new(),
                    project: project.map(str::to_owned),
                    transport: "none".into(),
                    upstream: None,
                    mail_from: tx.mail_from.clone(),
                    recipients: tx.recipients.len(),
                    size,
                    outcome: kind.as_str(),
                    code: reply.code,
                    reply: reply.to_string(),
                    ms: started.elapsed().as_millis() as u64,
                });
                return Outcome {
                    reply,
                    project: project.map(str::to_owned),
                    transport: "none".into(),
                    resolved_from: None,
                    from_rewritten: false,
                    from_decision: None,
                    took: started.elapsed(),
                };
            }
        };
        let project = decision.project.unwrap_or("-");
        let server = &self.config.server;
        let (transport, route) = match decision.transport {
            Transport::Project { relay, name } => (
                describe(&relay.target, "project"),
                Some(upstream::Route {
                    sender: name,
                    primary: &relay.target,
                    fallback: relay.fallback.as_ref(),
                    limits: relay.limits,
                }),
            ),
            Transport::Server(Provider::Smtp(target)) => (
                describe(target, "server"),
                Some(upstream::Route {
                    sender: "server",
                    primary: target,
                    fallback: server.fallback.as_ref(),
                    limits: server.limits,
                }),
            ),
            Transport::Server(Provider::Capture(_)) => ("capture".to_owned(), None),
        };
        let capture_root = match (decision.capture, decision.transport) {
            (Some(dir), _) => Some(dir),
            (None, Transport::Server(Provider::Capture(root))) => Some(root.as_path()),
            _ => None,
        };
        let mut transport = transport;
        let (reply, upstream_host) = match (capture_root, route) {
            (Some(root), _) => {
                let dir = capture::project_dir(root, decision.project);
                let envelope = capture::Envelope {
                    client_mail_from: tx.mail_from.clone(),
                    mail_from: decision.envelope_from.clone(),
                    recipients: tx.recipients.clone(),
                    project: decision.project.map(str::to_owned),
                    transport: transport.clone(),
                    original_from: decision.original_from.clone(),
                    resolved_from: decision.resolved_from.clone(),
                    from_rewritten: decision.from_rewritten,
                    from_decision: Some(decision.from_explained.clone()),
                    project_header: identified.as_ref().ok().and_then(|i| i.header.clone()),
                    subject: capture::subject(&decision.head),
                    ..capture::Envelope::default()
                };
                let head = std::mem::take(&mut decision.head);
                let data = std::mem::take(&mut tx.data);
                // From here the message is being written: it must not be abandoned.
                committed.store(true, std::sync::atomic::Ordering::Release);
                (
                    write_capture(dir, envelope, head, data, decision.body_offset).await,
                    None,
                )
            }
            (None, Some(route)) => {
                let sent = Instant::now();
                let delivery = self
                    .upstreams
                    .deliver(
                        &route,
                        &decision.envelope_from,
                        &tx.recipients,
                        &decision.parts(&tx.data),
                        committed,
                    )
                    .await;
                metrics::upstream_latency(&delivery.via.host, sent.elapsed());
                let reply = match &delivery.result {
                    Ok(accepted) => Reply::delivered(&accepted.text),
                    Err(e) => e.into_reply(delivery.via),
                };
                if delivery.fallback {
                    transport = describe(delivery.via, "fallback");
                }
                (reply, Some(delivery.via.host.as_str()))
            }
            (None, None) => unreachable!("a capture transport always has a folder"),
        };
        let kind = match reply.code {
            200..=399 => Kind::Delivered,
            400..=499 => Kind::Deferred,
            _ => Kind::Rejected,
        };
        metrics::message(project, kind, size);
        if decision.from_rewritten && kind == Kind::Delivered {
            metrics::from_rewritten(project);
        }
        let took = started.elapsed();
        tracing::info!(
            client = tx.client.map(tracing::field::display),
            project,
            transport = %transport,
            upstream = upstream_host.unwrap_or("-"),
            mail_from = %decision.envelope_from,
            recipients = tx.recipients.len(),
            size,
            from_rewritten = decision.from_rewritten,
            from = decision.from_decision.describe(),
            code = reply.code,
            reply = %reply.text,
            ms = took.as_millis() as u64,
            "message"
        );
        self.activity.record(Entry {
            seq: 0,
            time: String::new(),
            project: decision.project.map(str::to_owned),
            transport: transport.clone(),
            upstream: upstream_host.map(str::to_owned),
            mail_from: decision.envelope_from.clone(),
            recipients: tx.recipients.len(),
            size,
            outcome: kind.as_str(),
            code: reply.code,
            reply: reply.to_string(),
            ms: took.as_millis() as u64,
        });
        Outcome {
            reply,
            project: decision.project.map(str::to_owned),
            transport: if decision.capture.is_some() {
                format!("capture (instead of {transport})")
            } else {
                transport
            },
            resolved_from: Some(decision.resolved_from.clone()),
            from_rewritten: decision.from_rewritten,
            from_decision: Some(decision.from_decision),
            took,
        }
    }
}

impl Relay {
    /// `send-test`: a short message for `project` to `to`, through exactly the transport and
    /// From resolution its real mail gets.
    pub async fn send_test(&self, project: &str, to: &str, from: Option<&str>) -> Outcome {
        let hostname = &self.config.listener.hostname;
        let now = std::time::SystemTime::now();
        let id = now
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let mut message = format!("{}: {project}\r\n", self.config.listener.project_header);
        if let Some(from) = from {
            message.push_str(&format!("From: {from}\r\n"));
        }
        message.push_str(&format!(
            "To: <{to}>\r\nSubject: project-relay test message for {project}\r\nDate: {}\r\nMessage-ID: <send-test.{id}@{hostname}>\r\n\r\nThis is a test message sent by `project-relay send-test` to check the\r\nProject SMTP settings of project {project}.\r\n",
            capture::rfc5322_date(now)
        ));
        let tx = Transaction {
            mail_from: format!("send-test@{hostname}"),
            recipients: vec![to.to_owned()],
            data: message.into_bytes(),
            smtputf8: !to.is_ascii(),
            auth_project: None,
            client: None,
        };
        self.relay_with_outcome(tx).await
    }
}

/// How upstream connections are made under `config`.
pub fn upstream_settings(config: &Config) -> Result<upstream::Settings, TlsError> {
    let u = &config.upstream;
    Ok(upstream::Settings {
        tls: tls::client_config(u.ca_file.as_deref())?,
        ca_file: u.ca_file.clone(),
        timeout: u.timeout,
        helo_name: u.helo_name.clone(),
        pool_size: u.pool_size,
        max_connections: u.max_connections_per_upstream,
        limit_wait: u.limit_wait,
        max_messages: u.max_messages_per_connection,
        circuit_failures: u.circuit_failures,
        circuit_open: u.circuit_open,
    })
}

/// Every upstream target `config` sends through: their pools are kept across a reload.
pub fn upstream_targets(config: &Config) -> std::collections::HashSet<&SmtpTarget> {
    let server = match &config.server.provider {
        Some(Provider::Smtp(t)) => Some(t),
        _ => None,
    };
    let projects = config.projects.values().filter_map(|p| match &p.source {
        crate::config::Source::File(s) => match &s.smtp {
            crate::project::ProjectSmtp::Active(r) => Some(&r.target),
            _ => None,
        },
        crate::config::Source::Medplum(_) => None,
    });
    server.into_iter().chain(projects).collect()
}

/// The message moves to a blocking task for the file writes; it is not copied.
async fn write_capture(
    dir: std::path::PathBuf,
    envelope: capture::Envelope,
    head: Vec<u8>,
    data: Vec<u8>,
    body_offset: usize,
) -> Reply {
    let written = tokio::task::spawn_blocking(move || {
        capture::write(&dir, envelope, &[&head, &data[body_offset..]])
    })
    .await;
    match written {
        Ok(Ok(path)) => Reply::captured(&path.display().to_string()),
        Ok(Err(e)) => Reply::capture_failed(&e.to_string()),
        Err(e) => Reply::capture_failed(&e.to_string()),
    }
}

//! One message from the client to its transport: policy decision, upstream send or capture,
//! the client's reply, and the one log event per message.

use std::sync::Arc;
use std::time::Instant;

use crate::capture;
use crate::config::{Config, Provider};
use crate::policy::{self, Transport};
use crate::smtp::{Reply, Transaction};
use crate::tls::{self, TlsError};
use crate::upstream::Upstreams;

#[derive(Debug)]
pub struct Relay {
    pub config: Arc<Config>,
    pub upstreams: Upstreams,
}

impl Relay {
    pub fn new(config: Arc<Config>) -> Result<Relay, TlsError> {
        let ca = config.upstream.ca_file.as_deref();
        let client_tls = tls::client_config(ca)?;
        let ca_pem = ca.map(tls::read_ca_pem).transpose()?;
        let upstreams = Upstreams::new(
            client_tls,
            ca_pem,
            config.upstream.timeout,
            &config.listener.hostname,
            config.upstream.pool_size,
        );
        Ok(Relay { config, upstreams })
    }

    /// Relays one finished transaction and returns the client's reply: 250 only once the
    /// upstream (or the capture folder) has the message.
    pub async fn relay(&self, mut tx: Transaction) -> Reply {
        let started = Instant::now();
        let size = tx.data.len();
        let mut decision = match policy::decide(&self.config, &tx.data, tx.auth_project.as_deref())
        {
            Ok(d) => d,
            Err(reply) => {
                tracing::info!(
                    mail_from = %tx.mail_from,
                    recipients = tx.recipients.len(),
                    size,
                    code = reply.code,
                    reply = %reply.text,
                    "message refused"
                );
                return reply;
            }
        };
        let (transport, upstream) = match &decision.transport {
            Transport::Project { target, .. } => ("project smtp", Some(target.host.as_str())),
            Transport::Server(Provider::Smtp(target)) => {
                ("server smtp", Some(target.host.as_str()))
            }
            Transport::Server(Provider::Capture(_)) => ("capture", None),
        };
        let reply = match decision.transport {
            Transport::Project { target, .. } | Transport::Server(Provider::Smtp(target)) => self
                .upstreams
                .send(
                    target,
                    &decision.envelope_from,
                    &tx.recipients,
                    &decision.parts(&tx.data),
                )
                .await
                .map_or_else(|r| r, |accepted| Reply::delivered(&accepted.text)),
            Transport::Server(Provider::Capture(root)) => {
                let dir = capture::project_dir(root, decision.project);
                let envelope = capture::Envelope {
                    client_mail_from: tx.mail_from.clone(),
                    mail_from: decision.envelope_from.clone(),
                    recipients: tx.recipients.clone(),
                    project: decision.project.map(str::to_owned),
                    transport: "capture".to_owned(),
                    original_from: decision.original_from.clone(),
                    resolved_from: decision.resolved_from.clone(),
                    from_rewritten: decision.from_rewritten,
                    ..capture::Envelope::default()
                };
                // The message itself moves to the blocking task; it is not copied.
                let head = std::mem::take(&mut decision.head);
                let body_offset = decision.body_offset;
                let data = std::mem::take(&mut tx.data);
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
        };
        tracing::info!(
            project = decision.project.unwrap_or("-"),
            transport,
            upstream = upstream.unwrap_or("-"),
            mail_from = %decision.envelope_from,
            recipients = tx.recipients.len(),
            size,
            from_rewritten = decision.from_rewritten,
            code = reply.code,
            reply = %reply.text,
            ms = started.elapsed().as_millis() as u64,
            "message"
        );
        reply
    }
}

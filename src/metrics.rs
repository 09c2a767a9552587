//! The relay's metrics, by name and label, and the Prometheus recorder that renders them for
//! the admin listener's `/metrics`.

use std::sync::OnceLock;
use std::time::Duration;

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// How a message ended, as the `outcome` label says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Accepted by the upstream (or written by the capture).
    Delivered,
    /// A 4xx: the client should try again.
    Deferred,
    /// A 5xx from the upstream.
    Rejected,
    /// The project (or the server provider) is misconfigured: 451 4.3.5.
    RefusedConfig,
    /// Refused by the relay's own rules before any upstream: bad headers, wrong project...
    Refused,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Delivered => "delivered",
            Outcome::Deferred => "deferred",
            Outcome::Rejected => "rejected",
            Outcome::RefusedConfig => "refused-config",
            Outcome::Refused => "refused",
        }
    }
}

/// The process-wide recorder. Installed once; later calls share it (tests start many relays
/// in one process).
pub fn handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let buckets = [
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0,
            ];
            let builder = PrometheusBuilder::new()
                .set_buckets(&buckets)
                .expect("static buckets are valid");
            match builder.install_recorder() {
                Ok(handle) => handle,
                // Someone else installed a recorder: ours still renders, it just sees nothing.
                Err(_) => PrometheusBuilder::new().build_recorder().handle(),
            }
        })
        .clone()
}

pub fn message(project: &str, outcome: Outcome, bytes: usize) {
    let labels = [
        ("project", project.to_owned()),
        ("outcome", outcome.as_str().to_owned()),
    ];
    counter!("relay_messages_total", &labels).increment(1);
    if outcome == Outcome::Delivered {
        counter!("relay_bytes_relayed_total", "project" => project.to_owned())
            .increment(bytes as u64);
    }
}

pub fn from_rewritten(project: &str) {
    counter!("relay_from_rewrites_total", "project" => project.to_owned()).increment(1);
}

pub fn upstream_latency(upstream: &str, took: Duration) {
    histogram!("relay_upstream_send_seconds", "upstream" => upstream.to_owned())
        .record(took.as_secs_f64());
}

pub fn session_opened() {
    gauge!("relay_sessions_active").increment(1.0);
}

pub fn session_closed() {
    gauge!("relay_sessions_active").decrement(1.0);
}

pub fn tls_session(kind: &'static str) {
    counter!("relay_tls_sessions_total", "kind" => kind).increment(1);
}

pub fn upstream_connection_opened(upstream: &str) {
    gauge!("relay_upstream_connections_open", "upstream" => upstream.to_owned()).increment(1.0);
}

pub fn upstream_connection_closed(upstream: &str) {
    gauge!("relay_upstream_connections_open", "upstream" => upstream.to_owned()).decrement(1.0);
}

/// One read of a project's secrets from Medplum: `ok`, `not_modified`, `not_found`, `denied`
/// or `error`.
pub fn medplum_read(project: &str, result: &'static str) {
    counter!("relay_medplum_reads_total", "project" => project.to_owned(), "result" => result)
        .increment(1);
}

/// One token request to Medplum's token endpoint: `ok`, `denied` or `error`.
pub fn medplum_token(result: &'static str) {
    counter!("relay_medplum_token_requests_total", "result" => result).increment(1);
}

/// A message routed with the last good secrets while Medplum could not be read.
pub fn stale_secrets_served(project: &str) {
    counter!("relay_medplum_stale_served_total", "project" => project.to_owned()).increment(1);
}

/// One request to an OAuth2 token endpoint for XOAUTH2.
pub fn oauth_token(ok: bool) {
    counter!("relay_oauth_token_requests_total", "result" => if ok { "ok" } else { "error" })
        .increment(1);
}

/// A message held back by a sender's limit (`rate` or `connections`): `delayed`, or
/// `refused` once it waited `limit_wait_secs`.
pub fn limit(sender: &str, limit: &'static str, what: &'static str) {
    counter!("relay_limit_total", "sender" => sender.to_owned(), "limit" => limit, "result" => what)
        .increment(1);
}

/// A message the fallback relay took (or tried) because the primary did not.
pub fn failover(sender: &str) {
    counter!("relay_failovers_total", "sender" => sender.to_owned()).increment(1);
}

/// Whether the circuit of a primary relay is open (1) or closed (0), labelled `host:port` so
/// two relays on one host are told apart.
pub fn circuit(upstream: &crate::config::SmtpTarget, open: bool) {
    let label = format!("{}:{}", upstream.host, upstream.port);
    gauge!("relay_circuit_open", "upstream" => label).set(if open { 1.0 } else { 0.0 });
}

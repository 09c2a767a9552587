//! The one place that speaks SMTP to upstream relays (through lettre): a small pool of
//! connections per upstream, and the mapping from what happened there to the client's reply.
//!
//! lettre's own pool and `send` are not used: its pool has no read timeout on async
//! connections, a send cancelled by our deadline would return a connection stuck mid-DATA to
//! it, and its `send` closes the connection when a recipient is refused and needs the whole
//! message in one buffer (dot-stuffed into a second one). Here the transaction runs command by
//! command over lettre's connection: the message goes out in bounded chunks, a refused
//! transaction is reset and the connection kept, and a connection goes back to the pool only
//! after a clean exchange; anything else (I/O error, timeout) drops it.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use lettre::address::Address;
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{
    AsyncSmtpConnection, AsyncTokioStream, Certificate, TlsParameters,
};
use lettre::transport::smtp::commands::{Data, Mail, Rcpt, Rset};
use lettre::transport::smtp::extension::{ClientId, Extension, MailBodyParameter, MailParameter};
use lettre::transport::smtp::response::Response;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::config::{SmtpTarget, TlsMode};
use crate::smtp::Reply;

/// The message goes to lettre in pieces of this size, so its dot-stuffed copy stays small.
const CHUNK: usize = 32 * 1024;
/// An idle connection older than this is closed rather than reused; upstreams commonly
/// drop idle sessions after a minute or so.
const MAX_IDLE_AGE: Duration = Duration::from_secs(50);
/// How long a connection beyond `pool_size` may sit idle before it is closed.
const EXCESS_IDLE: Duration = Duration::from_secs(5);
/// On top of the command timeout, time allowed for the message bytes themselves
/// (a floor of 256 KiB/s), so a large message on a slow link is not cut off.
const BYTES_PER_SEC_FLOOR: u64 = 256 * 1024;

/// What the upstream said when it accepted a message (its text; the code was 2xx).
#[derive(Debug, Clone)]
pub struct Accepted {
    pub text: String,
}

pub struct Upstreams {
    pools: Mutex<HashMap<SmtpTarget, Arc<Pool>>>,
    tls: TlsConnector,
    ca_pem: Option<Vec<u8>>,
    timeout: Duration,
    hello: ClientId,
    /// Idle connections kept per upstream; more are closed once idle for `EXCESS_IDLE`.
    pool_size: usize,
}

impl fmt::Debug for Upstreams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Upstreams")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
struct Pool {
    idle: Mutex<Vec<(Conn, Instant)>>,
}

impl Upstreams {
    pub fn new(
        tls: Arc<rustls::ClientConfig>,
        ca_pem: Option<Vec<u8>>,
        timeout: Duration,
        hello_name: &str,
        pool_size: usize,
    ) -> Upstreams {
        Upstreams {
            pools: Mutex::new(HashMap::new()),
            tls: TlsConnector::from(tls),
            ca_pem,
            timeout,
            hello: ClientId::Domain(hello_name.to_owned()),
            pool_size,
        }
    }

    fn pool(&self, target: &SmtpTarget) -> Arc<Pool> {
        // Keyed by the whole target, credentials included: changed secrets get a new pool
        // and never reuse a connection authenticated with the old ones.
        let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        pools.entry(target.clone()).or_default().clone()
    }

    /// Number of idle pooled connections, all upstreams together.
    pub fn idle_connections(&self) -> usize {
        let pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        pools
            .values()
            .map(|p| p.idle.lock().unwrap_or_else(|e| e.into_inner()).len())
            .sum()
    }

    /// Sends one message, given as pieces that together are the unstuffed message with every
    /// line ending in CRLF.
    pub async fn send(
        &self,
        target: &SmtpTarget,
        from: &str,
        recipients: &[String],
        message: &[&[u8]],
    ) -> Result<Accepted, Reply> {
        let from = parse_address(from)?;
        let to = recipients
            .iter()
            .map(|r| parse_address(r))
            .collect::<Result<Vec<_>, _>>()?;
        let chunks = chunks(message);
        let size: usize = chunks.iter().map(|c| c.len()).sum();
        let pool = self.pool(target);
        let (mut conn, reused) = self.checkout(&pool, target).await?;
        let deadline = self.timeout + Duration::from_secs(size as u64 / BYTES_PER_SEC_FLOOR);
        let mut outcome =
            tokio::time::timeout(deadline, transact(&mut conn.inner, &from, &to, &chunks)).await;
        if reused && matches!(outcome, Ok(Err(Failure::Stale(_)))) {
            // The upstream closed this pooled connection while it was idle. Nothing of the
            // message was sent, so a fresh connection may take it.
            tracing::debug!(upstream = %target.host, "pooled connection was closed; reconnecting");
            conn = self.connect_within_timeout(target).await?;
            outcome =
                tokio::time::timeout(deadline, transact(&mut conn.inner, &from, &to, &chunks))
                    .await;
        }
        let (result, keep) = match outcome {
            Ok(Ok(response)) => (
                Ok(Accepted {
                    text: response.message().collect::<Vec<_>>().join(" "),
                }),
                true,
            ),
            Ok(Err(Failure::Refused(e, clean))) => (Err(classify(&e, target)), clean),
            Ok(Err(Failure::CannotCarry(why))) => (
                Err(Reply::upstream_cannot_carry(&format!(
                    "{}: {why}",
                    target.host
                ))),
                true,
            ),
            Ok(Err(Failure::Broken(e) | Failure::Stale(e))) => (Err(classify(&e, target)), false),
            Err(_) => (
                Err(Reply::upstream_timeout(&format!(
                    "{} did not answer within {}s",
                    target.host,
                    deadline.as_secs()
                ))),
                false,
            ),
        };
        if keep {
            let now = Instant::now();
            let mut idle = pool.idle.lock().unwrap_or_else(|e| e.into_inner());
            idle.push((conn, now));
            // Over `pool_size`, close the connections that have waited longest, once they
            // have waited a while. Closing at once would make every message open a new
            // connection whenever more sessions than `pool_size` are busy: a storm of
            // connects, and TIME_WAIT sockets that run the system out of ports.
            let mut excess = idle.len().saturating_sub(self.pool_size);
            idle.retain(|(_, since)| {
                let close = excess > 0 && now.duration_since(*since) > EXCESS_IDLE;
                excess -= usize::from(close);
                !close
            });
        }
        result
    }

    /// A pooled connection (`true`) or a new one. A pooled one is not probed with NOOP, which
    /// would cost a round trip per message: if the upstream closed it meanwhile, MAIL fails
    /// before anything is sent, and `send` retries on a new connection.
    async fn checkout(&self, pool: &Pool, target: &SmtpTarget) -> Result<(Conn, bool), Reply> {
        let candidate = {
            let mut idle = pool.idle.lock().unwrap_or_else(|e| e.into_inner());
            // The pool is a stack, so under steady load its oldest entries are never popped:
            // drop the ones too old to trust here (closing their sockets).
            idle.retain(|(_, since)| since.elapsed() <= MAX_IDLE_AGE);
            idle.pop()
        };
        match candidate {
            Some((conn, _)) => Ok((conn, true)),
            None => Ok((self.connect_within_timeout(target).await?, false)),
        }
    }

    async fn connect_within_timeout(&self, target: &SmtpTarget) -> Result<Conn, Reply> {
        match tokio::time::timeout(self.timeout, self.connect(target)).await {
            Ok(result) => result,
            Err(_) => Err(Reply::upstream_timeout(&format!(
                "connecting to {}:{} took over {}s",
                target.host,
                target.port,
                self.timeout.as_secs()
            ))),
        }
    }

    /// Connects, negotiates TLS and authenticates, then QUITs: no mail is sent. Says what
    /// was checked.
    pub async fn probe(&self, target: &SmtpTarget) -> Result<String, Reply> {
        let conn = self.connect_within_timeout(target).await?;
        let tls = if conn.inner.is_encrypted() {
            "TLS"
        } else {
            "no TLS (the upstream offered no STARTTLS)"
        };
        let auth = if target.credentials.is_some() {
            ", authenticated"
        } else {
            ""
        };
        let _ = tokio::time::timeout(self.timeout, conn.quit()).await;
        Ok(format!("connected, {tls}{auth}"))
    }

    /// TCP (with TCP_NODELAY), then implicit TLS or STARTTLS, EHLO and AUTH.
    pub async fn connect(&self, target: &SmtpTarget) -> Result<Conn, Reply> {
        let tcp = TcpStream::connect((target.host.as_str(), target.port))
            .await
            .map_err(|e| {
                Reply::upstream_unreachable(&format!("{}:{}: {e}", target.host, target.port))
            })?;
        // Without it, lettre's separate write of the final CRLF.CRLF waits behind Nagle and
        // the upstream's delayed ACK: tens of milliseconds per message.
        let _ = tcp.set_nodelay(true);
        let stream: Box<dyn AsyncTokioStream> = match target.tls {
            TlsMode::Implicit => {
                let name = rustls::pki_types::ServerName::try_from(target.host.clone())
                    .map_err(|e| Reply::upstream_tls(&format!("{}: {e}", target.host)))?;
                let tls = self
                    .tls
                    .connect(name, tcp)
                    .await
                    .map_err(|e| Reply::upstream_tls(&format!("{}: {e}", target.host)))?;
                Box::new(TlsStream(tls))
            }
            TlsMode::StartTls => Box::new(tcp),
        };
        let mut conn = AsyncSmtpConnection::connect_with_transport(stream, &self.hello)
            .await
            .map_err(|e| classify(&e, target))?;
        if target.tls == TlsMode::StartTls && conn.can_starttls() {
            let params = self.starttls_params(&target.host)?;
            conn.starttls(params, &self.hello)
                .await
                .map_err(|e| Reply::upstream_tls(&format!("{}: STARTTLS: {e}", target.host)))?;
        }
        if let Some((user, password)) = &target.credentials {
            if !may_send_credentials(&target.host, conn.is_encrypted()) {
                return Err(Reply::upstream_auth(&format!(
                    "{}: it offered no STARTTLS, and credentials are not sent in clear \
                     (use smtpSecure = true, or an upstream with STARTTLS)",
                    target.host
                )));
            }
            let creds = Credentials::new(user.clone(), password.expose().to_owned());
            conn.auth(&[Mechanism::Plain, Mechanism::Login], &creds)
                .await
                .map_err(|e| Reply::upstream_auth(&format!("{}: {}", target.host, describe(&e))))?;
        }
        Ok(Conn::new(conn, &target.host))
    }

    fn starttls_params(&self, host: &str) -> Result<TlsParameters, Reply> {
        let mut builder = TlsParameters::builder(host.to_owned());
        if let Some(pem) = &self.ca_pem {
            let cert = Certificate::from_pem(pem)
                .map_err(|e| Reply::upstream_tls(&format!("ca_file: {e}")))?;
            builder = builder.add_root_certificate(cert);
        }
        builder
            .build_rustls()
            .map_err(|e| Reply::upstream_tls(&format!("{host}: {e}")))
    }
}

/// PLAIN and LOGIN carry the password as it is: only over TLS, or to this machine (a local
/// sink or test server), as Postfix's `smtp_sasl_security_options = noplaintext` would.
fn may_send_credentials(host: &str, encrypted: bool) -> bool {
    encrypted
        || host.eq_ignore_ascii_case("localhost")
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn parse_address(a: &str) -> Result<Address, Reply> {
    a.parse::<Address>()
        .map_err(|e| Reply::bad_upstream_address(a, &e.to_string()))
}

/// The message in pieces of at most `CHUNK` bytes, without the CRLF of its last line: lettre
/// writes CRLF.CRLF itself, so leaving it would add an empty line.
fn chunks<'a>(message: &[&'a [u8]]) -> Vec<&'a [u8]> {
    let mut parts: Vec<&[u8]> = message.iter().copied().filter(|p| !p.is_empty()).collect();
    if let Some(last) = parts.last_mut() {
        *last = last.strip_suffix(b"\r\n").unwrap_or(last);
    }
    parts.iter().flat_map(|p| p.chunks(CHUNK)).collect()
}

fn ascii_address(a: &Address) -> bool {
    AsRef::<str>::as_ref(a).is_ascii()
}

enum Failure {
    /// The upstream answered with a refusal. `true` when the connection is clean again (the
    /// transaction ended or was reset) and may be reused.
    Refused(lettre::transport::smtp::Error, bool),
    /// The upstream lacks an extension this message needs; nothing was sent.
    CannotCarry(&'static str),
    /// I/O failed or the reply made no sense: the connection is done.
    Broken(lettre::transport::smtp::Error),
    /// MAIL could not even be sent, or was answered 421: the connection was already closed
    /// (or closing), and nothing of the message went out.
    Stale(lettre::transport::smtp::Error),
}

/// MAIL, RCPT..., DATA and the message. The MAIL parameters follow the message: SMTPUTF8 for
/// non-ASCII addresses (RFC 6531), BODY=8BITMIME for 8-bit content (RFC 6152).
async fn transact(
    conn: &mut AsyncSmtpConnection,
    from: &Address,
    to: &[Address],
    chunks: &[&[u8]],
) -> Result<Response, Failure> {
    let info = conn.server_info();
    let mut params = Vec::new();
    let non_ascii_address = !ascii_address(from) || to.iter().any(|t| !ascii_address(t));
    if non_ascii_address {
        if !info.supports_feature(Extension::SmtpUtfEight) {
            return Err(Failure::CannotCarry(
                "a non-ASCII address needs SMTPUTF8, which it does not offer",
            ));
        }
        params.push(MailParameter::SmtpUtfEight);
    }
    if !chunks.iter().all(|c| c.is_ascii()) {
        if !info.supports_feature(Extension::EightBitMime) {
            return Err(Failure::CannotCarry(
                "an 8-bit message needs 8BITMIME, which it does not offer",
            ));
        }
        params.push(MailParameter::Body(MailBodyParameter::EightBitMime));
    }
    let refused = |e: lettre::transport::smtp::Error| match e.status() {
        Some(_) => Ok(e),
        None => Err(Failure::Broken(e)),
    };
    // A refused MAIL leaves no transaction open.
    if let Err(e) = conn.command(Mail::new(Some(from.clone()), params)).await {
        let closing = e.status().is_none_or(|c| c.to_string() == "421");
        return Err(if closing {
            Failure::Stale(e)
        } else {
            Failure::Refused(e, true)
        });
    }
    for rcpt in to {
        // One refused recipient: the whole message waits (no half-delivered message).
        if let Err(e) = conn.command(Rcpt::new(rcpt.clone(), vec![])).await {
            let e = refused(e)?;
            let clean = conn.command(Rset).await.is_ok();
            return Err(Failure::Refused(e, clean));
        }
    }
    if let Err(e) = conn.command(Data).await {
        let e = refused(e)?;
        let clean = conn.command(Rset).await.is_ok();
        return Err(Failure::Refused(e, clean));
    }
    match conn.message_iter(chunks.iter()).await {
        Ok(response) => Ok(response),
        // After the end of data the transaction is over either way.
        Err(e) => Err(Failure::Refused(refused(e)?, true)),
    }
}

fn code_of(s: &str) -> u16 {
    s.parse().unwrap_or(0)
}

/// The upstream's own words, without lettre's "permanent error (550): " prefix.
fn describe(e: &lettre::transport::smtp::Error) -> String {
    match std::error::Error::source(e) {
        Some(src) => src.to_string(),
        None => e.to_string(),
    }
}

/// Turns a lettre error into the reply the client sees: the upstream's own 4xx/5xx where it
/// gave one, 451 4.4.x where it could not be reached or stalled.
fn classify(e: &lettre::transport::smtp::Error, target: &SmtpTarget) -> Reply {
    let host = &target.host;
    if let Some(code) = e.status() {
        let code = code_of(&code.to_string());
        return match code {
            // Authentication problems are ours (the relay's credentials), not the sender's.
            530 | 534 | 535 | 538 => Reply::upstream_auth(&format!("{host}: {}", describe(e))),
            _ => Reply::upstream_refused(code, &describe(e)),
        };
    }
    if e.is_timeout() {
        Reply::upstream_timeout(&format!("{host}: {}", describe(e)))
    } else if e.is_tls() {
        Reply::upstream_tls(&format!("{host}: {}", describe(e)))
    } else if e.is_client() {
        Reply::upstream_cannot_carry(&format!("{host}: {}", describe(e)))
    } else if e.is_response() {
        Reply::upstream_protocol(&format!("{host}: {}", describe(e)))
    } else {
        Reply::upstream_unreachable(&format!("{host}: {}", describe(e)))
    }
}

/// An open upstream connection, counted in the metrics while it lives.
pub struct Conn {
    inner: AsyncSmtpConnection,
    upstream: String,
}

impl Conn {
    fn new(inner: AsyncSmtpConnection, upstream: &str) -> Conn {
        crate::metrics::upstream_connection_opened(upstream);
        Conn {
            inner,
            upstream: upstream.to_owned(),
        }
    }

    /// Ends the session politely (for probes; pooled connections are simply dropped).
    pub async fn quit(mut self) {
        let _ = self.inner.quit().await;
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        crate::metrics::upstream_connection_closed(&self.upstream);
    }
}

/// lettre takes any stream that says who its peer is; this lets it run over our rustls
/// stream, set up from the same roots as everything else.
struct TlsStream(tokio_rustls::client::TlsStream<TcpStream>);

impl fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TlsStream")
    }
}

impl AsyncTokioStream for TlsStream {
    fn peer_addr(&self) -> io::Result<std::net::SocketAddr> {
        self.0.get_ref().0.peer_addr()
    }
}

impl AsyncRead for TlsStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_only_over_tls_or_to_this_machine() {
        assert!(may_send_credentials("smtp.example.com", true));
        assert!(!may_send_credentials("smtp.example.com", false));
        assert!(!may_send_credentials("10.0.0.5", false));
        assert!(may_send_credentials("127.0.0.1", false));
        assert!(may_send_credentials("::1", false));
        assert!(may_send_credentials("[::1]", false));
        assert!(may_send_credentials("LOCALHOST", false));
    }

    #[test]
    fn message_chunks_drop_only_the_final_crlf() {
        let head = b"From: a@b\r\n".as_slice();
        let body = b"\r\nhello\r\n".as_slice();
        assert_eq!(chunks(&[head, body]).concat(), b"From: a@b\r\n\r\nhello");
        assert_eq!(chunks(&[head, b""]).concat(), b"From: a@b");
        let big = vec![b'x'; CHUNK * 2 + 10];
        assert_eq!(
            chunks(&[&big]).iter().map(|c| c.len()).collect::<Vec<_>>(),
            [CHUNK, CHUNK, 10]
        );
    }
}

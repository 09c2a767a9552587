//! One client connection: reads with bounds and timeouts, feeds the session, writes its
//! replies, relays finished messages, and upgrades to TLS (STARTTLS or implicit).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::proxy;
use crate::smtp::session::Peer;
use crate::smtp::{Event, Reply, Session};
use crate::state::{Budget, Shared};

/// Room for reading commands; small, so thousands of idle sessions stay small.
const COMMAND_CHUNK: usize = 2 * 1024;
/// What an idle session reads into: one command line (at most 1000 octets, RFC 5321).
const IDLE_CHUNK: usize = 1024;
/// Room for reading message data, where large reads mean fewer system calls.
const DATA_CHUNK: usize = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("TLS handshake timed out")]
    HandshakeTimeout,
    #[error(transparent)]
    Proxy(#[from] proxy::ProxyError),
    #[error("no PROXY protocol header in time")]
    ProxyTimeout,
}

/// How long a load balancer has to send its PROXY header.
/// A v1 header is at most 107 bytes; a v2 header with the TLVs load balancers add fits too.
const PROXY_HEADER_MAX: usize = 4096;

enum Next<S> {
    Done,
    StartTls(S),
}

/// Limits that hold for one connection, read once at connect.
struct Limits {
    idle: Duration,
    data: Duration,
    handshake: Duration,
    ends: Instant,
    auth_failure_delay: Duration,
}

/// A connection that ended abnormally, and the client it served: behind a load balancer,
/// the address its PROXY header named.
#[derive(Debug)]
pub struct Ended {
    pub client: SocketAddr,
    pub error: ConnectionError,
}

/// Serves one accepted connection to the end. `Err` means it ended abnormally; the caller
/// logs it once.
pub async fn serve(
    tcp: TcpStream,
    tcp_peer: SocketAddr,
    implicit_tls: bool,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) -> Result<(), Ended> {
    let mut client = tcp_peer;
    let served = serve_client(tcp, tcp_peer, implicit_tls, shared, shutdown, &mut client).await;
    served.map_err(|error| Ended { client, error })
}

/// `serve`, saying in `named` which client the connection turns out to serve.
async fn serve_client(
    mut tcp: TcpStream,
    tcp_peer: SocketAddr,
    implicit_tls: bool,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    named: &mut SocketAddr,
) -> Result<(), ConnectionError> {
    // Linux passes the listener's TCP_NODELAY on to the accepted socket; elsewhere it is set
    // per connection.
    #[cfg(not(target_os = "linux"))]
    let _ = tcp.set_nodelay(true);
    let state = shared.current();
    let listener = &state.config.listener;
    let (client, peer) = if listener.proxy_protocol {
        // Only the load balancer's headers are believed: anyone else could name any address.
        if !listener.may_send_proxy_header(tcp_peer.ip()) {
            if shared.log_proxy_refusal(tcp_peer.ip().to_canonical()) {
                tracing::warn!(
                    peer = %tcp_peer,
                    "refused: PROXY header from a peer not in proxy_protocol_from (logged once a minute per address)"
                );
            }
            return Ok(());
        }
        match read_proxy_header(&mut tcp, listener.tls_handshake_timeout).await? {
            // A named address is trusted only through `allow`: a header that says 127.0.0.1
            // is not this machine, and gets no loopback trust.
            proxy::Header::Proxied(addr) => {
                let ip = addr.ip().to_canonical();
                tracing::Span::current().record("client", tracing::field::display(addr));
                *named = addr;
                let peer = Peer {
                    trusted: listener.is_allowed(ip),
                    loopback: false,
                };
                (addr, peer)
            }
            // UNKNOWN, v2 LOCAL, a non-TCP family: a client from outside the allow list
            // (it may still authenticate), never the proxy's own address.
            proxy::Header::Local => (
                tcp_peer,
                Peer {
                    trusted: false,
                    loopback: false,
                },
            ),
        }
    } else {
        let ip = tcp_peer.ip().to_canonical();
        let peer = Peer {
            trusted: listener.is_trusted(ip),
            loopback: ip.is_loopback(),
        };
        (tcp_peer, peer)
    };
    let peer_ip = client.ip().to_canonical();
    // Outside the allow list a client may connect only to authenticate.
    if !peer.trusted && state.config.users.is_empty() {
        tracing::info!(client = %client, "refused: not in the allow list");
        refuse(tcp, Reply::PEER_NOT_ALLOWED).await;
        return Ok(());
    }
    let Some(_slot) = shared.per_ip_slot(peer_ip, listener.max_connections_per_ip, peer.loopback)
    else {
        tracing::info!(client = %client, "refused: too many connections from this address");
        refuse(tcp, Reply::TOO_MANY_FROM_PEER).await;
        return Ok(());
    };
    let limits = Limits {
        idle: listener.idle_timeout,
        data: listener.data_timeout,
        handshake: listener.tls_handshake_timeout,
        ends: Instant::now() + listener.max_session,
        auth_failure_delay: listener.auth_failure_delay,
    };
    let mut session = Session::new(state.settings.clone(), implicit_tls, peer);
    let mut budget = Budget::new(&shared, listener.max_buffered_bytes);
    drop(state);
    let ctx = Ctx {
        shared: &shared,
        shutdown: &shutdown,
        limits: &limits,
        peer_ip,
        client,
    };
    // The TLS parts live on the heap: this future is what every session holds while idle,
    // and a plain session should not carry room for a TLS stream and its handshake.
    if implicit_tls {
        let tls = Box::pin(handshake(&shared, tcp, limits.handshake)).await?;
        crate::metrics::tls_session("implicit");
        Box::pin(ctx.drive(tls, &mut session, &mut budget, true)).await?;
        return Ok(());
    }
    if let Next::StartTls(tcp) = ctx.drive(tcp, &mut session, &mut budget, true).await? {
        let tls = Box::pin(handshake(&shared, tcp, limits.handshake)).await?;
        crate::metrics::tls_session("starttls");
        session.tls_started();
        Box::pin(ctx.drive(tls, &mut session, &mut budget, false)).await?;
    }
    Ok(())
}

/// Reads exactly the PROXY header, peeking so that no byte of what follows (SMTP or a TLS
/// handshake) is consumed.
async fn read_proxy_header(
    tcp: &mut TcpStream,
    limit: Duration,
) -> Result<proxy::Header, ConnectionError> {
    let read = async {
        // What is consumed is always header: bytes are taken off the socket only while the
        // header is incomplete (all of them belong to it) or exactly up to its end. Peeking
        // after consuming everything waits for new bytes, so a stalled peer costs no polling.
        let mut got: Vec<u8> = Vec::new();
        let mut peeked = vec![0u8; PROXY_HEADER_MAX];
        loop {
            let n = tcp.peek(&mut peeked).await?;
            if n == 0 {
                return Err(ConnectionError::Proxy(proxy::ProxyError::closed()));
            }
            let mut candidate = got.clone();
            candidate.extend_from_slice(&peeked[..n]);
            if let Some((header, len)) = proxy::parse(&candidate)? {
                let mut consumed = vec![0u8; len - got.len()];
                tcp.read_exact(&mut consumed).await?;
                return Ok(header);
            }
            if candidate.len() >= PROXY_HEADER_MAX {
                return Err(ConnectionError::Proxy(proxy::ProxyError::too_long()));
            }
            let mut consumed = vec![0u8; n];
            tcp.read_exact(&mut consumed).await?;
            got = candidate;
        }
    };
    match tokio::time::timeout(limit, read).await {
        Ok(result) => result,
        Err(_) => Err(ConnectionError::ProxyTimeout),
    }
}

async fn handshake(
    shared: &Shared,
    tcp: TcpStream,
    limit: Duration,
) -> Result<tokio_rustls::server::TlsStream<TcpStream>, ConnectionError> {
    let acceptor = shared
        .tls
        .clone()
        .expect("TLS is offered only with a certificate");
    match tokio::time::timeout(limit, acceptor.accept(tcp)).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(ConnectionError::HandshakeTimeout),
    }
}

struct Ctx<'a> {
    shared: &'a Arc<Shared>,
    shutdown: &'a CancellationToken,
    limits: &'a Limits,
    peer_ip: IpAddr,
    /// As the log names it: the PROXY header's address when there is one.
    client: SocketAddr,
}

impl Ctx<'_> {
    async fn drive<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        mut stream: S,
        session: &mut Session,
        budget: &mut Budget,
        greet: bool,
    ) -> Result<Next<S>, ConnectionError> {
        let mut out: Vec<u8> = Vec::with_capacity(512);
        let mut buf: Vec<u8> = Vec::new();
        if greet {
            session.greeting().write_to(&mut out);
        }
        loop {
            // Everything already buffered first: pipelined commands each get their reply.
            let mut start = 0;
            let mut early = Vec::new();
            loop {
                let (used, event) = session.feed(&buf[start..]);
                start += used;
                // Message bytes held in memory count against one budget for all sessions;
                // past it, this message is dropped and refused, the session goes on.
                if !budget.grow_to(session.buffered_data()) {
                    session.abandon_data(Reply::INSUFFICIENT_STORAGE);
                }
                if !session.in_data() && !matches!(event, Event::Relay(_)) {
                    budget.release_all();
                }
                match event {
                    Event::NeedMore => break,
                    Event::Reply(reply) => reply.write_to(&mut out),
                    Event::Close(reply) => {
                        reply.write_to(&mut out);
                        return close(stream, &out).await;
                    }
                    Event::StartTls(reply) => {
                        reply.write_to(&mut out);
                        stream.write_all(&out).await?;
                        stream.flush().await?;
                        // Whatever the client sent after STARTTLS, before the handshake, is
                        // dropped with `buf` (RFC 3207 §4.2).
                        return Ok(Next::StartTls(stream));
                    }
                    Event::AuthFailed { reply, close: last } => {
                        // Slow down guessing: the delay grows with this address's recent
                        // failures, across connections.
                        let failures = self.shared.auth_failed(self.peer_ip);
                        stream.write_all(&out).await?;
                        out.clear();
                        tokio::time::sleep(self.limits.auth_failure_delay * failures.min(8)).await;
                        tracing::info!(peer = %self.peer_ip, failures, "AUTH failed");
                        reply.write_to(&mut out);
                        if last {
                            Reply::TOO_MANY_AUTH_FAILURES.write_to(&mut out);
                            return close(stream, &out).await;
                        }
                    }
                    Event::Relay(mut tx) => {
                        tx.client = Some(self.client);
                        // The message is whole: while it is relayed, which is when every
                        // session in DATA holds its message at once, the read buffer keeps
                        // only what the client pipelined after it.
                        buf.drain(..start);
                        start = 0;
                        buf.shrink_to(0);
                        // Replies owed before the message go out first, so the client is not
                        // kept waiting on the upstream for them.
                        if !out.is_empty() {
                            stream.write_all(&out).await?;
                            out.clear();
                        }
                        // Each message takes the config current when it completes: a reload
                        // applies to the next message, never to one in flight.
                        let state = self.shared.current();
                        let committed = std::sync::atomic::AtomicBool::new(false);
                        // On the heap: the relay's state is large, and an idle session should
                        // not carry room for it.
                        let mut relay = Box::pin(state.relay.relay_committed(tx, &committed));
                        // While the message waits for its sender's limits, a client that
                        // leaves loses its place (nothing is sent). Bytes it pipelines
                        // meanwhile are kept for after the reply.
                        let mut gone = false;
                        let outcome = loop {
                            tokio::select! {
                                // The relay first: a message with no limit to wait for is
                                // committed in its first poll, before a closed socket is seen.
                                biased;
                                outcome = &mut relay => break Some(outcome),
                                read = stream.read_buf(&mut early), if !gone && early.len() < COMMAND_CHUNK => {
                                    if matches!(read, Ok(0) | Err(_)) {
                                        gone = true;
                                        if !committed.load(std::sync::atomic::Ordering::Acquire) {
                                            break None;
                                        }
                                    }
                                }
                            }
                        };
                        let Some(outcome) = outcome else {
                            tracing::info!(
                                client = %self.client,
                                "client left while its message waited for a sending limit; nothing was sent"
                            );
                            return Ok(Next::Done);
                        };
                        budget.release_all();
                        outcome.reply.write_to(&mut out);
                    }
                }
            }
            buf.drain(..start);
            let pipelined = !early.is_empty();
            buf.extend_from_slice(&early);
            if session.is_idle() {
                if self.shutdown.is_cancelled() {
                    Reply::SHUTTING_DOWN.write_to(&mut out);
                    return close(stream, &out).await;
                }
                if Instant::now() >= self.limits.ends {
                    Reply::SESSION_TIMEOUT.write_to(&mut out);
                    return close(stream, &out).await;
                }
            }
            if !out.is_empty() {
                stream.write_all(&out).await?;
                stream.flush().await?;
                out.clear();
            }
            if session.is_idle() && buf.capacity() > 2 * COMMAND_CHUNK {
                buf.shrink_to(COMMAND_CHUNK);
            }
            if pipelined {
                // Read while a message was relayed: feed it before waiting for more.
                continue;
            }
            // An idle session holds only room for a command line; message data reads in
            // larger chunks.
            buf.reserve(if session.in_data() {
                DATA_CHUNK
            } else if session.is_idle() {
                IDLE_CHUNK
            } else {
                COMMAND_CHUNK
            });
            let idle = session.is_idle();
            let wait = if session.in_data() {
                self.limits.data
            } else {
                self.limits.idle
            };
            let deadline = (Instant::now() + wait).min(self.limits.ends);
            let read = tokio::select! {
                read = tokio::time::timeout_at(deadline, stream.read_buf(&mut buf)) => read,
                // Only between transactions: one in progress is allowed to finish.
                _ = self.shutdown.cancelled(), if idle => {
                    Reply::SHUTTING_DOWN.write_to(&mut out);
                    return close(stream, &out).await;
                }
            };
            match read {
                Ok(Ok(0)) => return Ok(Next::Done),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(e.into()),
                Err(_) => {
                    let reply = if Instant::now() >= self.limits.ends {
                        Reply::SESSION_TIMEOUT
                    } else {
                        Reply::IDLE_TIMEOUT
                    };
                    reply.write_to(&mut out);
                    return close(stream, &out).await;
                }
            }
        }
    }
}

async fn close<S: AsyncWrite + Unpin>(
    mut stream: S,
    out: &[u8],
) -> Result<Next<S>, ConnectionError> {
    stream.write_all(out).await?;
    stream.flush().await?;
    let _ = stream.shutdown().await;
    Ok(Next::Done)
}

/// Says `reply` and closes: for a connection refused before its session starts.
pub async fn refuse(mut tcp: TcpStream, reply: Reply) {
    let _ = tcp.write_all(&reply.to_bytes()).await;
    let _ = tcp.shutdown().await;
}

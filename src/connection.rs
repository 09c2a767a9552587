//! One client connection: reads with bounds and timeouts, feeds the session, writes its
//! replies, relays finished messages, and upgrades to TLS (STARTTLS or implicit).

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::relay::Relay;
use crate::smtp::{Event, Reply, Session, Settings};

/// What every connection shares.
pub struct Shared {
    pub relay: Relay,
    pub settings: Settings,
    pub tls: Option<TlsAcceptor>,
    pub idle_timeout: Duration,
    pub tls_handshake_timeout: Duration,
}

/// Room kept free in the read buffer; the buffer is shrunk back to this between messages so
/// thousands of idle sessions stay small.
const READ_CHUNK: usize = 8 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("TLS handshake timed out")]
    HandshakeTimeout,
}

enum Next<S> {
    Done,
    StartTls(S),
}

/// Serves one accepted connection to the end. `Err` means it ended abnormally; the caller
/// logs it once.
pub async fn serve(
    tcp: TcpStream,
    implicit_tls: bool,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) -> Result<(), ConnectionError> {
    let _ = tcp.set_nodelay(true);
    if implicit_tls {
        let acceptor = shared.tls.clone().expect("smtps listener requires TLS");
        let tls = handshake(&acceptor, tcp, shared.tls_handshake_timeout).await?;
        let mut session = Session::new(shared.settings.clone(), true);
        drive(tls, &mut session, &shared, &shutdown, true).await?;
        return Ok(());
    }
    let mut session = Session::new(shared.settings.clone(), false);
    if let Next::StartTls(tcp) = drive(tcp, &mut session, &shared, &shutdown, true).await? {
        let acceptor = shared.tls.clone().expect("STARTTLS offered only with TLS");
        let tls = handshake(&acceptor, tcp, shared.tls_handshake_timeout).await?;
        session.tls_started();
        drive(tls, &mut session, &shared, &shutdown, false).await?;
    }
    Ok(())
}

async fn handshake(
    acceptor: &TlsAcceptor,
    tcp: TcpStream,
    limit: Duration,
) -> Result<tokio_rustls::server::TlsStream<TcpStream>, ConnectionError> {
    match tokio::time::timeout(limit, acceptor.accept(tcp)).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(ConnectionError::HandshakeTimeout),
    }
}

async fn drive<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    session: &mut Session,
    shared: &Shared,
    shutdown: &CancellationToken,
    greet: bool,
) -> Result<Next<S>, ConnectionError> {
    let mut out: Vec<u8> = Vec::with_capacity(512);
    let mut buf: Vec<u8> = Vec::with_capacity(READ_CHUNK);
    if greet {
        session.greeting().write_to(&mut out);
    }
    loop {
        // Everything already buffered first: pipelined commands each get their reply.
        let mut start = 0;
        loop {
            let (used, event) = session.feed(&buf[start..]);
            start += used;
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
                    // dropped with `buf` (RFC 3207 §4.2; CVE-2011-0411 style injection).
                    return Ok(Next::StartTls(stream));
                }
                Event::Relay(tx) => {
                    // Replies owed before the message (none with well-behaved pipelining)
                    // go out first, so the client is not kept waiting on the upstream.
                    if !out.is_empty() {
                        stream.write_all(&out).await?;
                        out.clear();
                    }
                    let reply = shared.relay.relay(tx).await;
                    reply.write_to(&mut out);
                }
            }
        }
        buf.drain(..start);
        if session.is_idle() && shutdown.is_cancelled() {
            Reply::SHUTTING_DOWN.write_to(&mut out);
            return close(stream, &out).await;
        }
        if !out.is_empty() {
            stream.write_all(&out).await?;
            stream.flush().await?;
            out.clear();
        }
        if session.is_idle() && buf.capacity() > 4 * READ_CHUNK {
            buf.shrink_to(READ_CHUNK);
        }
        buf.reserve(READ_CHUNK);
        let idle = session.is_idle();
        let read = tokio::select! {
            read = tokio::time::timeout(shared.idle_timeout, stream.read_buf(&mut buf)) => read,
            // Only between transactions: one in progress is allowed to finish.
            _ = shutdown.cancelled(), if idle => {
                Reply::SHUTTING_DOWN.write_to(&mut out);
                return close(stream, &out).await;
            }
        };
        match read {
            Ok(Ok(0)) => return Ok(Next::Done),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e.into()),
            Err(_) => {
                Reply::IDLE_TIMEOUT.write_to(&mut out);
                return close(stream, &out).await;
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

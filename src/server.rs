//! The accept loops: binding, the connection cap, one task per connection, and a graceful
//! stop (no new connections, idle sessions told 421, transactions in flight given a grace
//! period).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::config::Config;
use crate::connection::{self, Shared};
use crate::relay::Relay;
use crate::smtp::{Reply, Settings};
use crate::tls;

/// How long transactions in flight may run on after a stop is asked for.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// The bound sockets, so tests can bind port 0 and read back the address.
#[derive(Debug)]
pub struct Listeners {
    pub smtp: Option<TcpListener>,
    pub smtps: Option<TcpListener>,
}

impl Listeners {
    pub async fn bind(config: &Config) -> std::io::Result<Listeners> {
        let bind = |addr: Option<String>| async move {
            match addr {
                Some(a) => TcpListener::bind(a.as_str())
                    .await
                    .map(Some)
                    .map_err(|e| std::io::Error::new(e.kind(), format!("bind {a}: {e}"))),
                None => Ok(None),
            }
        };
        Ok(Listeners {
            smtp: bind(config.listener.smtp.clone()).await?,
            smtps: bind(config.listener.smtps.clone()).await?,
        })
    }

    pub fn smtp_addr(&self) -> Option<SocketAddr> {
        self.smtp.as_ref().and_then(|l| l.local_addr().ok())
    }

    pub fn smtps_addr(&self) -> Option<SocketAddr> {
        self.smtps.as_ref().and_then(|l| l.local_addr().ok())
    }
}

/// Runs the relay on already bound listeners until `shutdown` is cancelled.
pub async fn run(
    config: Arc<Config>,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let tls = match &config.listener.tls {
        Some(files) => Some(TlsAcceptor::from(tls::server_config(
            &files.certificate,
            &files.private_key,
        )?)),
        None => None,
    };
    let shared = Arc::new(Shared {
        relay: Relay::new(config.clone())?,
        settings: Settings {
            hostname: config.listener.hostname.clone(),
            max_message_size: config.listener.max_message_size,
            max_recipients: config.listener.max_recipients,
            starttls_available: tls.is_some(),
        },
        tls,
        idle_timeout: config.listener.idle_timeout,
        tls_handshake_timeout: config.listener.tls_handshake_timeout,
    });
    let slots = Arc::new(Semaphore::new(config.listener.max_connections));
    let tracker = TaskTracker::new();
    let mut loops = Vec::new();
    for (listener, implicit_tls, kind) in [
        (listeners.smtp, false, "smtp"),
        (listeners.smtps, true, "smtps"),
    ] {
        let Some(listener) = listener else { continue };
        let span = tracing::info_span!("listener", kind);
        let addr = listener.local_addr()?;
        span.in_scope(|| tracing::info!("listening on {addr}"));
        loops.push(tokio::spawn(
            accept_loop(
                listener,
                implicit_tls,
                shared.clone(),
                slots.clone(),
                tracker.clone(),
                shutdown.clone(),
            )
            .instrument(span),
        ));
    }
    shutdown.cancelled().await;
    for l in loops {
        let _ = l.await;
    }
    tracker.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("grace period over; closing {} sessions", tracker.len());
    }
    tracing::info!("stopped");
    Ok(())
}

async fn accept_loop(
    listener: TcpListener,
    implicit_tls: bool,
    shared: Arc<Shared>,
    slots: Arc<Semaphore>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.cancelled() => return,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracker.spawn(refuse(tcp));
            continue;
        };
        let shared = shared.clone();
        let shutdown = shutdown.clone();
        let span = tracing::info_span!("session", %peer);
        tracker.spawn(
            async move {
                tracing::debug!("connected");
                match connection::serve(tcp, implicit_tls, shared, shutdown).await {
                    Ok(()) => tracing::debug!("closed"),
                    Err(e) => tracing::info!("connection ended: {e}"),
                }
                drop(permit);
            }
            .instrument(span),
        );
    }
}

async fn refuse(mut tcp: TcpStream) {
    let reply = Reply::new(421, "4.7.0", "Too many connections, try again later");
    let _ = tcp.write_all(&reply.to_bytes()).await;
    let _ = tcp.shutdown().await;
}

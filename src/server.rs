//! The accept loops: binding, who may connect, the connection caps, one task per connection,
//! reloading the config, and a graceful stop (no new connections, idle sessions told 421,
//! transactions in flight given a grace period).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::config::Config;
use crate::connection;
use crate::smtp::Reply;
use crate::source::Sources;
use crate::state::{Shared, State};
use crate::tls;
use crate::upstream::Upstreams;

/// The bound sockets, so tests can bind port 0 and read back the address.
#[derive(Debug)]
pub struct Listeners {
    pub smtp: Option<TcpListener>,
    pub smtps: Option<TcpListener>,
    pub admin: Option<TcpListener>,
}

impl Listeners {
    pub async fn bind(config: &Config) -> std::io::Result<Listeners> {
        let bind = |addr: Option<String>| async move {
            match addr {
                Some(a) => listen(&a)
                    .await
                    .map(Some)
                    .map_err(|e| std::io::Error::new(e.kind(), format!("bind {a}: {e}"))),
                None => Ok(None),
            }
        };
        Ok(Listeners {
            smtp: bind(config.listener.smtp.clone()).await?,
            smtps: bind(config.listener.smtps.clone()).await?,
            admin: bind(config.admin_listen.clone()).await?,
        })
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|l| l.local_addr().ok())
    }

    pub fn smtp_addr(&self) -> Option<SocketAddr> {
        self.smtp.as_ref().and_then(|l| l.local_addr().ok())
    }

    pub fn smtps_addr(&self) -> Option<SocketAddr> {
        self.smtps.as_ref().and_then(|l| l.local_addr().ok())
    }
}

/// Connections the kernel may queue before we accept them. The usual 128 is too few for a
/// burst of clients: with SYN cookies on, a connection that finds the queue full is
/// completed on the client's side but never reaches us, and the client waits for a
/// greeting that never comes. The kernel caps this at `net.core.somaxconn`.
const LISTEN_BACKLOG: u32 = 4096;

async fn listen(addr: &str) -> std::io::Result<TcpListener> {
    let mut last = None;
    for addr in tokio::net::lookup_host(addr).await? {
        let socket = match addr {
            SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
            SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
        };
        socket.set_reuseaddr(true)?;
        // Replies are small and each one is awaited: Nagle would hold them back. Set here,
        // accepted connections inherit it on Linux, which spares a system call per session.
        socket.set_nodelay(true)?;
        match socket
            .bind(addr)
            .and_then(|()| socket.listen(LISTEN_BACKLOG))
        {
            Ok(listener) => return Ok(listener),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no address to listen on")))
}

/// A running relay's handle for reloads.
#[derive(Clone)]
pub struct Reloader(Arc<Shared>);

impl Reloader {
    /// Swaps in a new config for the next connections and messages. The listener addresses
    /// and TLS certificate stay as they were bound.
    pub fn reload(&self, config: Config) -> anyhow::Result<()> {
        let tls = self.0.tls.is_some();
        let settings = crate::relay::upstream_settings(&config)?;
        let config = Arc::new(config);
        self.0.sources.configure(&config)?;
        let state = State::new(
            config.clone(),
            tls,
            self.0.upstreams.clone(),
            self.0.sources.clone(),
            self.0.activity.clone(),
        );
        self.0.upstreams.configure(settings);
        // Pools of upstreams (or credentials) the new config no longer uses are closed.
        retain_used(&self.0.upstreams, &self.0.sources, &config);
        self.0.swap(state);
        Ok(())
    }
}

pub struct Server {
    shared: Arc<Shared>,
    listeners: Listeners,
}

impl Server {
    pub fn new(config: Arc<Config>, listeners: Listeners) -> anyhow::Result<Server> {
        let tls = match &config.listener.tls {
            Some(files) => Some(TlsAcceptor::from(tls::server_config(
                &files.certificate,
                &files.private_key,
            )?)),
            None => None,
        };
        let upstreams = Arc::new(Upstreams::new(crate::relay::upstream_settings(&config)?));
        let sources = Arc::new(Sources::new(&config)?);
        let activity = Arc::new(crate::activity::Activity::default());
        let state = State::new(
            config,
            tls.is_some(),
            upstreams.clone(),
            sources.clone(),
            activity.clone(),
        );
        Ok(Server {
            shared: Arc::new(Shared::new(state, upstreams, sources, activity, tls)),
            listeners,
        })
    }

    pub fn reloader(&self) -> Reloader {
        Reloader(self.shared.clone())
    }

    /// Serves until `shutdown` is cancelled, then drains.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let state = self.shared.current();
        let slots = Arc::new(Semaphore::new(state.config.listener.max_connections));
        let tracker = TaskTracker::new();
        let mut loops = Vec::new();
        for (listener, implicit_tls, kind) in [
            (self.listeners.smtp, false, "smtp"),
            (self.listeners.smtps, true, "smtps"),
        ] {
            let Some(listener) = listener else { continue };
            let span = tracing::info_span!("listener", kind);
            let addr = listener.local_addr()?;
            span.in_scope(|| tracing::info!("listening on {addr}"));
            let accept = Accept {
                listener,
                implicit_tls,
                shared: self.shared.clone(),
                slots: slots.clone(),
                tracker: tracker.clone(),
                shutdown: shutdown.clone(),
            };
            loops.push(tokio::spawn(accept.run().instrument(span)));
        }
        let admin = match self.listeners.admin {
            Some(listener) => {
                let addr = listener.local_addr()?;
                let span = tracing::info_span!("listener", kind = "admin");
                span.in_scope(|| tracing::info!("listening on {addr}"));
                let serve = crate::admin::serve(listener, self.shared.clone(), shutdown.clone());
                Some(tokio::spawn(serve.instrument(span)))
            }
            None => None,
        };
        drop(state);
        let reaper_stop = CancellationToken::new();
        let reaper = {
            let upstreams = self.shared.upstreams.clone();
            let stop = reaper_stop.clone();
            tokio::spawn(async move { upstreams.reap(stop).await })
        };
        // Secrets read from Medplum change without a reload: the pools of upstreams (or
        // credentials) no project uses any more are closed within seconds.
        let retirer = {
            let shared = self.shared.clone();
            let stop = reaper_stop.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(RETAIN_EVERY);
                loop {
                    tokio::select! {
                        _ = tick.tick() => {}
                        _ = stop.cancelled() => return,
                    }
                    let config = shared.current().config.clone();
                    if config.medplum.is_some() {
                        retain_used(&shared.upstreams, &shared.sources, &config);
                    }
                }
            })
        };
        self.shared.set_ready(true);
        shutdown.cancelled().await;
        self.shared.set_ready(false);
        for l in loops {
            let _ = l.await;
        }
        tracker.close();
        let grace = self.shared.current().config.listener.shutdown_grace;
        if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
            tracing::warn!("grace period over; closing {} sessions", tracker.len());
        }
        reaper_stop.cancel();
        let _ = reaper.await;
        let _ = retirer.await;
        // Sessions are over: end every upstream connection with QUIT.
        self.shared.upstreams.close_all().await;
        if let Some(admin) = admin {
            let _ = admin.await;
        }
        tracing::info!("stopped");
        Ok(())
    }
}

/// How often pools of upstreams that no project uses any more are looked for.
const RETAIN_EVERY: Duration = Duration::from_secs(2);

/// Closes the pools of upstreams that neither `config` nor a Medplum project uses now.
fn retain_used(upstreams: &Upstreams, sources: &Sources, config: &Config) {
    let live = sources.targets();
    let mut keep = crate::relay::upstream_targets(config);
    keep.extend(live.iter());
    upstreams.retain_targets(&keep);
}

/// Runs the relay on already bound listeners until `shutdown` is cancelled.
pub async fn run(
    config: Arc<Config>,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    Server::new(config, listeners)?.run(shutdown).await
}

struct Accept {
    listener: TcpListener,
    implicit_tls: bool,
    shared: Arc<Shared>,
    slots: Arc<Semaphore>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
}

impl Accept {
    async fn run(self) {
        loop {
            let accepted = tokio::select! {
                a = self.listener.accept() => a,
                _ = self.shutdown.cancelled() => return,
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
            let Ok(permit) = self.slots.clone().try_acquire_owned() else {
                self.tracker
                    .spawn(connection::refuse(tcp, Reply::TOO_MANY_CONNECTIONS));
                continue;
            };
            let shared = self.shared.clone();
            let shutdown = self.shutdown.clone();
            let implicit_tls = self.implicit_tls;
            // Debug level: a span at info would be entered on every poll of every session
            // (about 6% of the relay's CPU at 2 KB messages). The events that matter at info
            // name the client themselves.
            let span = tracing::debug_span!("session", %peer, client = tracing::field::Empty);
            self.tracker.spawn(
                async move {
                    tracing::debug!("connected");
                    crate::metrics::session_opened();
                    match connection::serve(tcp, peer, implicit_tls, shared, shutdown).await {
                        Ok(()) => tracing::debug!("closed"),
                        Err(connection::Ended { client, error }) => {
                            tracing::info!(%peer, %client, "connection ended: {error}")
                        }
                    }
                    crate::metrics::session_closed();
                    drop(permit);
                }
                .instrument(span),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    /// The driver no longer sets TCP_NODELAY on Linux: the listener must hand it down.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn accepted_connections_send_replies_without_delay() {
        let listener = super::listen("127.0.0.1:0").await.unwrap();
        let _client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (tcp, _) = listener.accept().await.unwrap();
        assert!(tcp.nodelay().unwrap());
    }
}

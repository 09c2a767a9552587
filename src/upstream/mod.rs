//! The one place that speaks SMTP to upstream relays: pooled sessions per upstream and
//! identity, the per-upstream connection cap, retiring sessions cleanly with QUIT, and the
//! typed outcome of a send, turned into the client's reply in one function.
//!
//! The wire dialogue is our own (`client`): it knows whether its stream is encrypted, reads
//! the upstream's SIZE limit, pipelines the envelope, and sends the message in bounded writes
//! without a dot-stuffed copy of it.

mod client;
mod limits;
mod oauth;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_rustls::TlsConnector;
use tokio_util::task::TaskTracker;

use crate::config::{Auth, PasswordMethod, SmtpTarget, TlsMode};
use crate::smtp::Reply;
use client::{Envelope, Mechanism, Progress, Session, Stream};

/// An idle connection older than this is closed rather than reused; upstreams commonly
/// drop idle sessions after a minute or so.
const MAX_IDLE_AGE: Duration = Duration::from_secs(50);
/// How long a connection beyond `pool_size` may sit idle before it is closed.
const EXCESS_IDLE: Duration = Duration::from_secs(5);
/// On top of the command timeout, time allowed for the message bytes themselves
/// (a floor of 256 KiB/s), so a large message on a slow link is not cut off.
const BYTES_PER_SEC_FLOOR: u64 = 256 * 1024;
/// QUIT and its reply: a courtesy, never worth holding a connection slot for long.
const QUIT_TIMEOUT: Duration = Duration::from_secs(2);
/// How often idle connections are checked for age.
const REAP_EVERY: Duration = Duration::from_secs(1);

/// Where in the dialogue something happened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stage {
    #[default]
    Connect,
    Greeting,
    Ehlo,
    StartTls,
    Auth,
    Mail,
    Rcpt,
    Data,
    /// The message and the reply to its final dot.
    EndOfData,
    Reset,
    Quit,
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Stage::Connect => "connect",
            Stage::Greeting => "the greeting",
            Stage::Ehlo => "EHLO",
            Stage::StartTls => "STARTTLS",
            Stage::Auth => "AUTH",
            Stage::Mail => "MAIL",
            Stage::Rcpt => "RCPT",
            Stage::Data => "DATA",
            Stage::EndOfData => "the end of data",
            Stage::Reset => "RSET",
            Stage::Quit => "QUIT",
        })
    }
}

/// Why an upstream did not take a message. Decisions (retry, pooling) are made on these
/// variants, never on reply text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamError {
    /// TCP connect failed.
    Unreachable(String),
    /// No answer in time. `after_data`: the final dot was sent, the message may be delivered.
    Timeout {
        stage: Stage,
        after_data: bool,
        detail: String,
    },
    /// The connection broke (EOF or I/O error) at `stage`.
    Lost {
        stage: Stage,
        detail: String,
    },
    Tls(String),
    /// The relay's credentials could not be used (refused, or not to be sent in clear).
    Auth(String),
    /// The upstream answered with a refusal.
    Refused {
        stage: Stage,
        code: u16,
        text: String,
    },
    /// The upstream lacks an extension this message needs; nothing was sent.
    CannotCarry(&'static str),
    /// Larger than the upstream's advertised SIZE; nothing was sent.
    TooLarge {
        size: u64,
        limit: u64,
    },
    /// The reply made no sense.
    Protocol(String),
    BadAddress {
        address: String,
        why: &'static str,
    },
    /// No OAuth2 token for XOAUTH2: the endpoint's host and the OAuth2 error code.
    OAuth(String),
    /// The sender's own limit held the message back for the whole wait; nothing was sent.
    Limited {
        sender: String,
        held: limits::Held,
    },
    /// Every allowed connection to the upstream stayed busy for the whole wait.
    Busy {
        limit: usize,
        waited: Duration,
    },
}

impl UpstreamError {
    /// The connection this came from may have been closed by the upstream while idle, or
    /// have reached the upstream's per-session message limit: nothing of the message was
    /// sent, so a new connection may take it.
    fn worth_a_new_connection(&self) -> bool {
        match self {
            UpstreamError::Lost { stage, .. } => *stage == Stage::Mail,
            UpstreamError::Refused { stage, code, .. } => {
                *stage == Stage::Mail && (400..500).contains(code)
            }
            _ => false,
        }
    }

    /// Nothing of the message can have been delivered, and the failure is the relay's (not a
    /// verdict on the message): a fallback relay may take it. Never a 5xx other than to
    /// AUTH, never after the final dot was sent without an answer.
    pub fn may_fail_over(&self) -> bool {
        match self {
            UpstreamError::Unreachable(_)
            | UpstreamError::Tls(_)
            | UpstreamError::Auth(_)
            | UpstreamError::OAuth(_)
            | UpstreamError::Busy { .. } => true,
            UpstreamError::Timeout { after_data, .. } => !after_data,
            UpstreamError::Lost { stage, .. } => *stage < Stage::EndOfData,
            UpstreamError::Refused { stage, code, .. } => {
                *stage == Stage::Auth || (400..500).contains(code)
            }
            _ => false,
        }
    }

    /// The client's reply: the upstream's own refusal where it gave one, 451 4.x.x where it
    /// could not be reached, stalled, or the relay's own setup is at fault.
    pub fn into_reply(&self, target: &SmtpTarget) -> Reply {
        let host = &target.host;
        match self {
            UpstreamError::Unreachable(why) => {
                Reply::upstream_unreachable(&format!("{host}:{}: {why}", target.port))
            }
            UpstreamError::Timeout {
                stage,
                after_data: true,
                detail,
            } => Reply::upstream_timeout(&format!(
                "{host}: no answer to {stage} {detail}; the message may have been delivered"
            )),
            UpstreamError::Timeout { stage, detail, .. } => {
                Reply::upstream_timeout(&format!("{host}: no answer to {stage} {detail}"))
            }
            UpstreamError::Lost { stage, detail } => {
                Reply::upstream_lost(&format!("{host}: connection lost at {stage}: {detail}"))
            }
            UpstreamError::Tls(why) => Reply::upstream_tls(why),
            UpstreamError::Auth(why) | UpstreamError::OAuth(why) => Reply::upstream_auth(why),
            UpstreamError::Refused {
                stage: Stage::Auth,
                code,
                text,
            } => Reply::upstream_auth(&format!("{host}: {code} {text}")),
            UpstreamError::Refused {
                stage: Stage::Greeting | Stage::Ehlo | Stage::Mail,
                code: code @ (530 | 534 | 535 | 538),
                text,
            } => Reply::upstream_auth(&format!("{host}: {code} {text}")),
            UpstreamError::Refused { code, text, .. } => Reply::upstream_refused(*code, text),
            UpstreamError::CannotCarry(why) => {
                Reply::upstream_cannot_carry(&format!("{host}: {why}"))
            }
            UpstreamError::TooLarge { size, limit } => {
                Reply::upstream_too_large(host, *size, *limit)
            }
            UpstreamError::Protocol(why) => Reply::upstream_protocol(&format!("{host}: {why}")),
            UpstreamError::BadAddress { address, why } => Reply::bad_upstream_address(address, why),
            UpstreamError::Limited { sender, held } => Reply::limit_reached(&match held {
                limits::Held::Rate(rate) => format!("{sender} may send {rate}"),
                limits::Held::Connections(n) => {
                    format!("{sender} may keep {n} connections to {host}, all busy")
                }
            }),
            UpstreamError::Busy { limit, waited } => Reply::upstream_busy(&format!(
                "all {limit} connections to {host} stayed busy for {}s",
                waited.as_secs()
            )),
        }
    }
}

/// Where one message may go: its sender's primary relay, a fallback, and the sender's limits
/// (counted under `sender`: a project's name, or the server provider).
#[derive(Debug, Clone, Copy)]
pub struct Route<'a> {
    pub sender: &'a str,
    pub primary: &'a SmtpTarget,
    pub fallback: Option<&'a SmtpTarget>,
    pub limits: crate::project::Limits,
}

/// How a message left: the outcome, and the relay that gave it.
#[derive(Debug)]
pub struct Delivery<'a> {
    pub result: Result<Accepted, UpstreamError>,
    pub via: &'a SmtpTarget,
    pub fallback: bool,
}

/// What the upstream said when it accepted a message (its text; the code was 250).
#[derive(Debug, Clone)]
pub struct Accepted {
    pub text: String,
}

/// The settings every upstream connection is made with; replaced whole on reload.
#[derive(Clone)]
pub struct Settings {
    pub tls: Arc<rustls::ClientConfig>,
    /// Where the extra roots in `tls` came from, to tell whether a reload changed them.
    pub ca_file: Option<std::path::PathBuf>,
    pub timeout: Duration,
    /// The name in our EHLO.
    pub helo_name: String,
    /// Idle connections kept per upstream; more are closed once idle for `EXCESS_IDLE`.
    pub pool_size: usize,
    /// Connections open at once to one upstream with one identity.
    pub max_connections: usize,
    /// How long a message waits for a free connection before it is deferred.
    pub limit_wait: Duration,
    /// Messages one connection carries before it is replaced (0: no limit).
    pub max_messages: u32,
    /// Failures in a row that open a primary's circuit (when it has a fallback), and for how
    /// long.
    pub circuit_failures: u32,
    pub circuit_open: Duration,
}

impl Settings {
    /// Whether connections made under `self` may serve under `other`.
    fn same_connections(&self, other: &Settings) -> bool {
        self.ca_file == other.ca_file
            && self.helo_name == other.helo_name
            && self.max_connections == other.max_connections
    }
}

impl fmt::Debug for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Settings")
            .field("timeout", &self.timeout)
            .field("helo_name", &self.helo_name)
            .field("pool_size", &self.pool_size)
            .field("max_connections", &self.max_connections)
            .finish_non_exhaustive()
    }
}

/// Every upstream's pool. Lives as long as the relay: a reload swaps the settings and keeps
/// the warm connections its new config can still use.
pub struct Upstreams {
    settings: RwLock<Arc<Settings>>,
    /// Per-sender limits and per-primary circuits.
    limits: limits::Table,
    /// XOAUTH2 tokens, by OAuth2 client; never part of a pool key.
    oauth: Arc<oauth::Tokens>,
    pools: Mutex<HashMap<SmtpTarget, Arc<Pool>>>,
    /// QUITs under way, so a stop can wait for them.
    closing: TaskTracker,
}

impl fmt::Debug for Upstreams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Upstreams")
            .field("settings", &self.settings())
            .finish_non_exhaustive()
    }
}

struct Pool {
    idle: Mutex<Vec<(Conn, Instant)>>,
    /// One permit per connection open (busy or idle) to this upstream with this identity.
    permits: Arc<Semaphore>,
    limit: usize,
    /// Told when a connection comes back, for messages waiting at the cap.
    returned: Notify,
    /// Set when the pool is dropped from the map: its connections are closed, not kept.
    retired: std::sync::atomic::AtomicBool,
}

impl Pool {
    fn new(limit: usize) -> Pool {
        Pool {
            idle: Mutex::new(Vec::new()),
            permits: Arc::new(Semaphore::new(limit)),
            limit,
            returned: Notify::new(),
            retired: false.into(),
        }
    }

    fn idle(&self) -> std::sync::MutexGuard<'_, Vec<(Conn, Instant)>> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn is_retired(&self) -> bool {
        self.retired.load(std::sync::atomic::Ordering::Acquire)
    }
}

/// An open upstream session, counted in the metrics and holding a connection slot.
struct Conn {
    session: Session,
    messages: u32,
    guard: Guard,
}

struct Guard {
    upstream: Arc<str>,
    /// `None` only while the slot is handed to a replacement connection.
    permit: Option<OwnedSemaphorePermit>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        crate::metrics::upstream_connection_closed(&self.upstream);
    }
}

impl Conn {
    /// QUIT (bounded), then close; the slot is free once this returns.
    async fn retire(self) {
        let Conn { session, guard, .. } = self;
        let _ = tokio::time::timeout(QUIT_TIMEOUT, session.quit()).await;
        drop(guard);
    }
}

impl Upstreams {
    pub fn new(settings: Settings) -> Upstreams {
        Upstreams {
            limits: limits::Table::default(),
            oauth: Arc::new(oauth::Tokens::new(&settings.tls, settings.timeout)),
            settings: RwLock::new(Arc::new(settings)),
            pools: Mutex::new(HashMap::new()),
            closing: TaskTracker::new(),
        }
    }

    fn settings(&self) -> Arc<Settings> {
        self.settings
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn pools(&self) -> std::sync::MutexGuard<'_, HashMap<SmtpTarget, Arc<Pool>>> {
        self.pools.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes new settings (a reload). Connections made with another TLS setup, EHLO name or
    /// connection cap are closed; otherwise every warm connection stays.
    pub fn configure(&self, settings: Settings) {
        self.oauth.configure(&settings.tls, settings.timeout);
        let old = std::mem::replace(
            &mut *self.settings.write().unwrap_or_else(|e| e.into_inner()),
            Arc::new(settings),
        );
        if !old.same_connections(&self.settings()) {
            self.retain_targets(&HashSet::new());
        }
    }

    /// Closes the pools of every upstream not in `keep` (after a reload: upstreams no project
    /// uses any more, and old credentials).
    pub fn retain_targets(&self, keep: &HashSet<&SmtpTarget>) {
        let gone: Vec<Arc<Pool>> = {
            let mut pools = self.pools();
            let gone = pools
                .iter()
                .filter(|(t, _)| !keep.contains(t))
                .map(|(t, _)| t.clone())
                .collect::<Vec<_>>();
            gone.iter().filter_map(|t| pools.remove(t)).collect()
        };
        for pool in gone {
            pool.retired
                .store(true, std::sync::atomic::Ordering::Release);
            let idle = std::mem::take(&mut *pool.idle());
            for (conn, _) in idle {
                self.closing.spawn(conn.retire());
            }
        }
        let clients: Vec<&crate::project::OAuthClient> = keep
            .iter()
            .filter_map(|t| match t.credentials.as_ref().map(|c| &c.auth) {
                Some(Auth::XOAuth2(client)) => Some(client),
                _ => None,
            })
            .collect();
        self.oauth.retain(&clients);
    }

    /// Number of idle pooled connections, all upstreams together.
    pub fn idle_connections(&self) -> usize {
        self.pools().values().map(|p| p.idle().len()).sum()
    }

    fn pool(&self, target: &SmtpTarget, settings: &Settings) -> Arc<Pool> {
        // Keyed by the whole target, credentials included: changed secrets get a new pool
        // and never reuse a connection authenticated with the old ones.
        self.pools()
            .entry(target.clone())
            .or_insert_with(|| Arc::new(Pool::new(settings.max_connections)))
            .clone()
    }

    /// Closes idle connections that are too old, or beyond `pool_size` and idle a while, and
    /// forgets pools with nothing open. Runs until `stop`.
    pub async fn reap(&self, stop: tokio_util::sync::CancellationToken) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(REAP_EVERY) => {}
                _ = stop.cancelled() => return,
            }
            let pool_size = self.settings().pool_size;
            let mut old = Vec::new();
            self.pools().retain(|_, pool| {
                let mut idle = pool.idle();
                prune(&mut idle, pool_size, &mut old);
                let open = pool.limit - pool.permits.available_permits();
                open > 0
            });
            for conn in old {
                self.closing.spawn(conn.retire());
            }
        }
    }

    /// At shutdown: QUIT every idle connection and wait (bounded) for all QUITs under way.
    pub async fn close_all(&self) {
        let pools: Vec<Arc<Pool>> = self.pools().drain().map(|(_, p)| p).collect();
        for pool in pools {
            pool.retired
                .store(true, std::sync::atomic::Ordering::Release);
            for (conn, _) in std::mem::take(&mut *pool.idle()) {
                self.closing.spawn(conn.retire());
            }
        }
        self.closing.close();
        let _ = tokio::time::timeout(QUIT_TIMEOUT * 2, self.closing.wait()).await;
        self.closing.reopen();
    }

    /// Sends one message along `route`: within the sender's limits (waiting up to
    /// `limit_wait`), to the primary unless its circuit is open, and to the fallback when the
    /// primary did not take it and nothing of it can have been delivered. `committed` is set
    /// once the limits let it through: from then on the message must not be abandoned.
    pub async fn deliver<'a>(
        &self,
        route: &Route<'a>,
        from: &str,
        recipients: &[String],
        message: &[&[u8]],
        committed: &std::sync::atomic::AtomicBool,
    ) -> Delivery<'a> {
        let settings = self.settings();
        let give_up = Instant::now() + settings.limit_wait;
        let held = |held| Delivery {
            result: Err(UpstreamError::Limited {
                sender: route.sender.to_owned(),
                held,
            }),
            via: route.primary,
            fallback: false,
        };
        if let Err(h) = self.limits.admit(route.sender, route.limits, give_up).await {
            return held(h);
        }
        let fallback = match route.fallback {
            Some(fb) if !self.limits.primary_allowed(route.primary) => {
                committed.store(true, std::sync::atomic::Ordering::Release);
                return Delivery {
                    result: self.send(fb, from, recipients, message).await,
                    via: fb,
                    fallback: true,
                };
            }
            other => other,
        };
        let permit = match self
            .limits
            .connection(route.sender, route.limits, give_up)
            .await
        {
            Ok(p) => p,
            Err(h) => return held(h),
        };
        committed.store(true, std::sync::atomic::Ordering::Release);
        let result = self.send(route.primary, from, recipients, message).await;
        drop(permit);
        let Some(fb) = fallback else {
            return Delivery {
                result,
                via: route.primary,
                fallback: false,
            };
        };
        let failed_over = result.as_ref().err().filter(|e| e.may_fail_over());
        self.limits.record(
            route.primary,
            failed_over.is_none(),
            settings.circuit_failures,
            settings.circuit_open,
        );
        match failed_over {
            Some(e) => {
                tracing::info!(
                    sender = route.sender,
                    upstream = %route.primary.host,
                    fallback = %fb.host,
                    "primary relay did not take the message ({}); trying the fallback",
                    e.into_reply(route.primary).text
                );
                crate::metrics::failover(route.sender);
                Delivery {
                    result: self.send(fb, from, recipients, message).await,
                    via: fb,
                    fallback: true,
                }
            }
            None => Delivery {
                result,
                via: route.primary,
                fallback: false,
            },
        }
    }

    /// Sends one message, given as pieces that together are the unstuffed message with every
    /// line ending in CRLF. `Ok` only once the upstream answered 250 to the final dot.
    pub async fn send(
        &self,
        target: &SmtpTarget,
        from: &str,
        recipients: &[String],
        message: &[&[u8]],
    ) -> Result<Accepted, UpstreamError> {
        check_address(from)?;
        for r in recipients {
            check_address(r)?;
        }
        let size = message.iter().map(|p| p.len() as u64).sum::<u64>();
        let env = Envelope {
            from,
            to: recipients,
            message,
            size,
        };
        let settings = self.settings();
        let pool = self.pool(target, &settings);
        let (mut conn, reused) = self.checkout(&pool, target, &settings).await?;
        let deadline = settings.timeout + Duration::from_secs(size / BYTES_PER_SEC_FLOOR);
        let mut result = attempt(&mut conn, &env, deadline).await;
        if reused
            && result
                .as_ref()
                .is_err_and(UpstreamError::worth_a_new_connection)
        {
            // Closed while idle, or at its per-session message limit: retire it and try once
            // more on a new connection, in the same slot.
            tracing::debug!(upstream = %target.host, "pooled connection refused MAIL; reconnecting");
            let Conn {
                session, mut guard, ..
            } = conn;
            let permit = guard
                .permit
                .take()
                .expect("an open connection holds its slot");
            let _ = tokio::time::timeout(QUIT_TIMEOUT, session.quit()).await;
            drop(guard);
            conn = self
                .connect_within_timeout(target, &settings, permit)
                .await?;
            result = attempt(&mut conn, &env, deadline).await;
        }
        let keep = match &result {
            Ok(_) => {
                conn.messages += 1;
                settings.max_messages == 0 || conn.messages < settings.max_messages
            }
            Err(
                UpstreamError::Refused { .. }
                | UpstreamError::CannotCarry(_)
                | UpstreamError::TooLarge { .. },
            ) => conn.session.reusable(),
            // Mid-dialogue failures leave the session in an unknown state: drop it.
            Err(_) => {
                drop(conn);
                return result;
            }
        };
        if keep {
            self.put_back(&pool, conn, &settings);
        } else if conn.session.closing {
            drop(conn);
        } else {
            // At the per-connection message limit (or not reusable): end it cleanly, off the
            // client's path.
            self.closing.spawn(conn.retire());
        }
        result
    }

    fn put_back(&self, pool: &Arc<Pool>, conn: Conn, settings: &Settings) {
        if pool.is_retired() {
            self.closing.spawn(conn.retire());
            return;
        }
        let mut old = Vec::new();
        {
            let mut idle = pool.idle();
            idle.push((conn, Instant::now()));
            prune(&mut idle, settings.pool_size, &mut old);
        }
        pool.returned.notify_one();
        for conn in old {
            self.closing.spawn(conn.retire());
        }
    }

    /// A pooled connection (`true`) or a new one, within the upstream's connection cap: at
    /// the cap, waits up to `limit_wait` for one to come back or close.
    async fn checkout(
        &self,
        pool: &Arc<Pool>,
        target: &SmtpTarget,
        settings: &Settings,
    ) -> Result<(Conn, bool), UpstreamError> {
        let started = Instant::now();
        let give_up = started + settings.limit_wait;
        loop {
            let returned = pool.returned.notified();
            tokio::pin!(returned);
            returned.as_mut().enable();
            let candidate = {
                let mut idle = pool.idle();
                // The pool is a stack, so under steady load its oldest entries are never
                // popped: drop the ones too old to trust here.
                let mut old = Vec::new();
                prune(&mut idle, usize::MAX, &mut old);
                let c = idle.pop();
                drop(idle);
                for conn in old {
                    self.closing.spawn(conn.retire());
                }
                c
            };
            // A pooled connection is not probed with NOOP, which would cost a round trip per
            // message: if the upstream closed it meanwhile, MAIL fails before anything is
            // sent, and `send` retries on a new connection.
            if let Some((conn, _)) = candidate {
                return Ok((conn, true));
            }
            if let Ok(permit) = pool.permits.clone().try_acquire_owned() {
                return Ok((
                    self.connect_within_timeout(target, settings, permit)
                        .await?,
                    false,
                ));
            }
            tokio::select! {
                permit = pool.permits.clone().acquire_owned() => {
                    let permit = permit.expect("the semaphore is never closed");
                    return Ok((self.connect_within_timeout(target, settings, permit).await?, false));
                }
                _ = &mut returned => continue,
                _ = tokio::time::sleep_until(give_up) => {
                    return Err(UpstreamError::Busy { limit: pool.limit, waited: started.elapsed() });
                }
            }
        }
    }

    async fn connect_within_timeout(
        &self,
        target: &SmtpTarget,
        settings: &Settings,
        permit: OwnedSemaphorePermit,
    ) -> Result<Conn, UpstreamError> {
        let session = connect_bounded(target, settings, &self.oauth).await?;
        crate::metrics::upstream_connection_opened(&target.host);
        Ok(Conn {
            session,
            messages: 0,
            guard: Guard {
                upstream: target.host.as_str().into(),
                permit: Some(permit),
            },
        })
    }

    /// Connects, negotiates TLS and authenticates, then QUITs: no mail is sent. Says what was
    /// checked.
    pub async fn probe(&self, target: &SmtpTarget) -> Result<String, UpstreamError> {
        let settings = self.settings();
        let session = connect_bounded(target, &settings, &self.oauth).await?;
        let tls = match (session.encrypted, target.tls) {
            (true, TlsMode::Implicit) => "TLS",
            (true, TlsMode::StartTls) => "TLS (STARTTLS)",
            (false, _) => "no TLS (the upstream offered no STARTTLS)",
        };
        let auth = if target.credentials.is_some() {
            ", authenticated"
        } else {
            ""
        };
        let size = match session.ext.size {
            Some(limit) => format!(", messages up to {limit} octets"),
            None => String::new(),
        };
        let _ = tokio::time::timeout(QUIT_TIMEOUT, session.quit()).await;
        Ok(format!(
            "connected as {}, {tls}{auth}{size}",
            settings.helo_name
        ))
    }
}

/// Moves connections aged past `MAX_IDLE_AGE`, or beyond `keep` and idle over `EXCESS_IDLE`,
/// from `idle` to `out` (to be retired). Closing the excess at once would make every message
/// open a new connection whenever more sessions than `pool_size` are busy: a storm of
/// connects, and TIME_WAIT sockets that run the system out of ports.
fn prune(idle: &mut Vec<(Conn, Instant)>, keep: usize, out: &mut Vec<Conn>) {
    let now = Instant::now();
    let mut excess = idle.len().saturating_sub(keep);
    let mut i = 0;
    while i < idle.len() {
        let waited = now.duration_since(idle[i].1);
        let close = waited > MAX_IDLE_AGE || (excess > 0 && waited > EXCESS_IDLE);
        if close {
            excess = excess.saturating_sub(1);
            out.push(idle.remove(i).0);
        } else {
            i += 1;
        }
    }
}

async fn attempt(
    conn: &mut Conn,
    env: &Envelope<'_>,
    deadline: Duration,
) -> Result<Accepted, UpstreamError> {
    if let Some(limit) = conn.session.ext.size
        && env.size > limit
    {
        return Err(UpstreamError::TooLarge {
            size: env.size,
            limit,
        });
    }
    let mut progress = Progress::default();
    match tokio::time::timeout(deadline, conn.session.transact(env, &mut progress)).await {
        Ok(Ok(reply)) => Ok(Accepted { text: reply.text() }),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(UpstreamError::Timeout {
            stage: progress.stage,
            after_data: progress.data_sent,
            detail: format!("within {}s", deadline.as_secs()),
        }),
    }
}

/// `connect` within the upstream timeout.
async fn connect_bounded(
    target: &SmtpTarget,
    settings: &Settings,
    oauth: &Arc<oauth::Tokens>,
) -> Result<Session, UpstreamError> {
    let connect = async {
        match connect(target, settings, oauth, None).await {
            // A refused token: drop it and try once more with a new one, on a new connection.
            Err(Refused::Token(token)) => connect(target, settings, oauth, Some(&token))
                .await
                .map_err(Refused::into_error),
            other => other.map_err(Refused::into_error),
        }
    };
    match tokio::time::timeout(settings.timeout, connect).await {
        Ok(result) => result,
        Err(_) => Err(UpstreamError::Timeout {
            stage: Stage::Connect,
            after_data: false,
            detail: format!(
                "(connecting to port {} took over {}s)",
                target.port,
                settings.timeout.as_secs()
            ),
        }),
    }
}

/// Why `connect` gave up: an error, or an XOAUTH2 token the upstream refused.
enum Refused {
    Error(UpstreamError),
    Token(crate::project::SecretKey),
}

impl Refused {
    fn into_error(self) -> UpstreamError {
        match self {
            Refused::Error(e) => e,
            Refused::Token(_) => {
                UpstreamError::Auth("the upstream refused a new OAuth2 token".into())
            }
        }
    }
}

impl From<UpstreamError> for Refused {
    fn from(e: UpstreamError) -> Self {
        Refused::Error(e)
    }
}

/// TCP (with TCP_NODELAY), implicit TLS or STARTTLS, EHLO, and AUTH. A session abandoned after
/// the greeting (credentials refused, or not to be sent in clear) is ended with QUIT.
/// `refused`: an XOAUTH2 token the upstream refused before, so a new one is used.
async fn connect(
    target: &SmtpTarget,
    settings: &Settings,
    oauth: &Arc<oauth::Tokens>,
    refused: Option<&crate::project::SecretKey>,
) -> Result<Session, Refused> {
    let tcp = TcpStream::connect((target.host.as_str(), target.port))
        .await
        .map_err(|e| UpstreamError::Unreachable(e.to_string()))?;
    // Small writes (a command, the final dot) must not wait behind Nagle and the upstream's
    // delayed ACK: tens of milliseconds per message.
    let _ = tcp.set_nodelay(true);
    let connector = TlsConnector::from(settings.tls.clone());
    let mut session = match target.tls {
        TlsMode::Implicit => {
            let stream = client::handshake(&connector, &target.host, tcp).await?;
            Session::open(stream, true, &settings.helo_name).await?
        }
        TlsMode::StartTls => {
            let session = Session::open(Stream::Plain(tcp), false, &settings.helo_name).await?;
            if session.ext.starttls {
                session
                    .starttls(&connector, &target.host, &settings.helo_name)
                    .await?
            } else {
                session
            }
        }
    };
    let Some(credentials) = &target.credentials else {
        return Ok(session);
    };
    // The decision rests on this session's own TLS state, which it negotiated itself.
    if !may_send_credentials(&target.host, session.encrypted) {
        let _ = tokio::time::timeout(QUIT_TIMEOUT, session.quit()).await;
        return Err(UpstreamError::Auth(format!(
            "{}: it offered no STARTTLS, and credentials are not sent in clear \
             (use smtpSecure = true, or an upstream with STARTTLS)",
            target.host
        ))
        .into());
    }
    let offers = |m: &str| session.ext.auth.iter().any(|a| a == m);
    let token = match &credentials.auth {
        Auth::XOAuth2(client) if offers("XOAUTH2") => Some(oauth.get(client, refused).await?),
        _ => None,
    };
    let mechanism = match (&credentials.auth, &token) {
        (Auth::XOAuth2(_), Some(token)) => Mechanism::XOAuth2(token.expose()),
        (
            Auth::Password {
                password,
                method: None | Some(PasswordMethod::Plain),
            },
            _,
        ) if offers("PLAIN") => Mechanism::Plain(password.expose()),
        (
            Auth::Password {
                password,
                method: None | Some(PasswordMethod::Login),
            },
            _,
        ) if offers("LOGIN") => Mechanism::Login(password.expose()),
        (auth, _) => {
            let wanted = match auth {
                Auth::XOAuth2(_) => "XOAUTH2",
                Auth::Password {
                    method: Some(PasswordMethod::Plain),
                    ..
                } => "PLAIN",
                Auth::Password {
                    method: Some(PasswordMethod::Login),
                    ..
                } => "LOGIN",
                Auth::Password { .. } => "PLAIN or LOGIN",
            };
            let _ = tokio::time::timeout(QUIT_TIMEOUT, session.quit()).await;
            return Err(UpstreamError::Auth(format!(
                "{}: it offers no AUTH {wanted}",
                target.host
            ))
            .into());
        }
    };
    match session.auth(mechanism, &credentials.user).await {
        Ok(()) => Ok(session),
        Err(e @ UpstreamError::Refused { .. }) => {
            let _ = tokio::time::timeout(QUIT_TIMEOUT, session.quit()).await;
            match token {
                // Refused with a cached token: the caller tries once more with a new one.
                Some(token) if refused.is_none() => {
                    tracing::debug!(upstream = %target.host, "XOAUTH2 token refused; getting a new one");
                    Err(Refused::Token(token))
                }
                _ => Err(e.into()),
            }
        }
        Err(e) => Err(e.into()),
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

/// The envelope went through the listener's parser; this only keeps anything that would
/// break the command line from reaching the upstream.
fn check_address(a: &str) -> Result<(), UpstreamError> {
    if a.bytes()
        .any(|b| b.is_ascii_control() || b == b' ' || b == b'<' || b == b'>')
    {
        return Err(UpstreamError::BadAddress {
            address: a.escape_debug().to_string(),
            why: "it contains a space, a control character or an angle bracket",
        });
    }
    Ok(())
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
    fn only_a_4xx_or_a_lost_connection_at_mail_is_retried() {
        let refused = |stage, code| UpstreamError::Refused {
            stage,
            code,
            text: String::new(),
        };
        assert!(refused(Stage::Mail, 452).worth_a_new_connection());
        assert!(refused(Stage::Mail, 421).worth_a_new_connection());
        assert!(!refused(Stage::Mail, 550).worth_a_new_connection());
        assert!(!refused(Stage::Rcpt, 451).worth_a_new_connection());
        assert!(!refused(Stage::EndOfData, 451).worth_a_new_connection());
        let lost = |stage| UpstreamError::Lost {
            stage,
            detail: String::new(),
        };
        assert!(lost(Stage::Mail).worth_a_new_connection());
        assert!(!lost(Stage::EndOfData).worth_a_new_connection());
    }

    #[test]
    fn an_upstream_421_is_a_451_to_the_client() {
        let target = SmtpTarget {
            host: "mx.example".into(),
            port: 25,
            tls: TlsMode::StartTls,
            credentials: None,
        };
        let reply = UpstreamError::Refused {
            stage: Stage::Mail,
            code: 421,
            text: "4.3.2 System not accepting network messages".into(),
        }
        .into_reply(&target);
        assert_eq!(reply.code, 451);
        assert_eq!(reply.enhanced.as_deref(), Some("4.3.2"));
        assert!(reply.text.contains("System not accepting"), "{reply:?}");
    }

    #[test]
    fn addresses_that_would_break_the_command_line_are_refused() {
        assert!(check_address("a@b.example").is_ok());
        assert!(check_address("").is_ok());
        assert!(check_address("a@b\r\nRCPT TO:<x@y>").is_err());
        assert!(check_address("a b@c").is_err());
        assert!(check_address("a>@c").is_err());
    }
}

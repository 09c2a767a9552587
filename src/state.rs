//! What lives across connections and reloads: the current config generation, the
//! per-address limit tables, the message memory budget, readiness, and the long-lived upstream
//! pools and secret sources. The server, the connections and the admin API all use it; it uses
//! none of them.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio_rustls::TlsAcceptor;

use crate::activity::Activity;
use crate::config::Config;
use crate::relay::Relay;
use crate::smtp::Settings;
use crate::source::Sources;
use crate::upstream::Upstreams;

/// Everything built from one config; replaced whole on reload.
pub struct State {
    pub config: Arc<Config>,
    pub relay: Relay,
    pub settings: Settings,
}

impl State {
    pub fn new(
        config: Arc<Config>,
        starttls_available: bool,
        upstreams: Arc<Upstreams>,
        sources: Arc<Sources>,
        activity: Arc<Activity>,
    ) -> State {
        let l = &config.listener;
        let settings = Settings {
            hostname: l.hostname.clone(),
            max_message_size: l.max_message_size,
            max_recipients: l.max_recipients,
            starttls_available,
            users: config.users.clone(),
            require_auth: l.require_auth,
            allow_plaintext_auth: l.allow_plaintext_auth,
        };
        State {
            relay: Relay::with_shared(config.clone(), upstreams, sources, activity),
            config,
            settings,
        }
    }
}

/// What every connection shares.
pub struct Shared {
    current: RwLock<Arc<State>>,
    /// Upstream pools: one set for the relay's whole life, across reloads.
    pub upstreams: Arc<Upstreams>,
    /// Secret sources (the Medplum cache): likewise.
    pub sources: Arc<Sources>,
    /// The last message outcomes, for the admin page: likewise.
    pub activity: Arc<Activity>,
    pub tls: Option<TlsAcceptor>,
    /// Failed AUTH attempts per address, with the time of the last one.
    auth_failures: Mutex<HashMap<IpAddr, (u32, Instant)>>,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    /// Listeners serving and no stop asked for: what `/readyz` reports.
    ready: AtomicBool,
    /// Message bytes held in memory by all sessions, against `max_buffered_bytes`.
    buffered: AtomicUsize,
    /// When each refused PROXY peer was last logged, so a flood logs once a minute.
    proxy_refusals: Mutex<HashMap<IpAddr, Instant>>,
}

/// Failures older than this are forgotten.
const AUTH_FAILURE_MEMORY: Duration = Duration::from_secs(600);
/// Addresses tracked at most; past it, the oldest entries are dropped.
const AUTH_FAILURE_TABLE: usize = 10_000;

impl Shared {
    pub fn new(
        state: State,
        upstreams: Arc<Upstreams>,
        sources: Arc<Sources>,
        activity: Arc<Activity>,
        tls: Option<TlsAcceptor>,
    ) -> Shared {
        Shared {
            current: RwLock::new(Arc::new(state)),
            upstreams,
            sources,
            activity,
            tls,
            auth_failures: Mutex::default(),
            per_ip: Mutex::default(),
            ready: AtomicBool::new(false),
            buffered: AtomicUsize::new(0),
            proxy_refusals: Mutex::default(),
        }
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    /// The next connections and messages use `state`; those in flight finish on theirs.
    pub fn swap(&self, state: State) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(state);
    }

    pub fn current(&self) -> Arc<State> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// A connection slot for `ip`, if it has fewer than `limit`. A real loopback peer
    /// (`unlimited`) is not limited: a local app or load generator may open many.
    pub fn per_ip_slot(
        self: &Arc<Self>,
        ip: IpAddr,
        limit: usize,
        unlimited: bool,
    ) -> Option<PerIpSlot> {
        let mut map = self.per_ip.lock().unwrap_or_else(|e| e.into_inner());
        let n = map.entry(ip).or_insert(0);
        if *n >= limit && !unlimited {
            return None;
        }
        *n += 1;
        Some(PerIpSlot {
            shared: self.clone(),
            ip,
        })
    }

    /// Takes `n` more bytes of the message memory budget, if there are that many left.
    fn reserve(&self, n: usize, limit: usize) -> bool {
        self.buffered
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                held.checked_add(n).filter(|total| *total <= limit)
            })
            .is_ok()
    }

    fn release(&self, n: usize) {
        self.buffered.fetch_sub(n, Ordering::AcqRel);
    }

    /// Whether a refused PROXY peer should be logged now: once per address per minute.
    pub fn log_proxy_refusal(&self, ip: IpAddr) -> bool {
        let mut table = self
            .proxy_refusals
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if table.len() >= AUTH_FAILURE_TABLE {
            table.retain(|_, at| now.duration_since(*at) < Duration::from_secs(60));
        }
        match table.get(&ip) {
            Some(at) if now.duration_since(*at) < Duration::from_secs(60) => false,
            _ => {
                table.insert(ip, now);
                true
            }
        }
    }

    /// Records a failed AUTH from `ip`; returns its recent failure count.
    pub fn auth_failed(&self, ip: IpAddr) -> u32 {
        let mut table = self.auth_failures.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if table.len() >= AUTH_FAILURE_TABLE {
            table.retain(|_, (_, at)| now.duration_since(*at) < AUTH_FAILURE_MEMORY);
            if table.len() >= AUTH_FAILURE_TABLE {
                table.clear();
            }
        }
        let entry = table.entry(ip).or_insert((0, now));
        if now.duration_since(entry.1) >= AUTH_FAILURE_MEMORY {
            entry.0 = 0;
        }
        entry.0 += 1;
        entry.1 = now;
        entry.0
    }
}

/// One session's share of the message memory budget; given back when dropped.
pub struct Budget {
    shared: Arc<Shared>,
    limit: usize,
    held: usize,
}

impl Budget {
    pub fn new(shared: &Arc<Shared>, limit: usize) -> Budget {
        Budget {
            shared: shared.clone(),
            limit,
            held: 0,
        }
    }

    /// Grows this session's share to `total` bytes; false if the budget cannot cover it.
    pub fn grow_to(&mut self, total: usize) -> bool {
        if total <= self.held {
            return true;
        }
        let more = total - self.held;
        if self.shared.reserve(more, self.limit) {
            self.held = total;
            true
        } else {
            false
        }
    }

    pub fn release_all(&mut self) {
        self.shared.release(std::mem::take(&mut self.held));
    }
}

impl Drop for Budget {
    fn drop(&mut self) {
        self.release_all();
    }
}

/// Holds one of an address's connection slots until dropped.
pub struct PerIpSlot {
    shared: Arc<Shared>,
    ip: IpAddr,
}

impl Drop for PerIpSlot {
    fn drop(&mut self) {
        let mut map = self.shared.per_ip.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

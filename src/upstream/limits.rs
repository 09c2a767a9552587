//! What a sender (a project, or the server provider) may ask of its upstreams: messages per
//! sliding window (`smtpRateLimit`), connections to its primary at once
//! (`smtpMaxConnections`), and the circuit that skips a failing primary with a fallback.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::project::{Limits, SmtpTarget};

/// One sender's limits and the state that enforces them.
struct Limiter {
    limits: Limits,
    /// When each of the last `count` messages was admitted.
    sent: Mutex<VecDeque<Instant>>,
    connections: Option<Arc<Semaphore>>,
}

/// Which limit held a message back past its wait.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Held {
    Rate(crate::project::RateLimit),
    Connections(usize),
}

#[derive(Default)]
pub struct Table {
    limiters: Mutex<HashMap<String, Arc<Limiter>>>,
    circuits: Mutex<HashMap<SmtpTarget, Circuit>>,
}

#[derive(Default)]
struct Circuit {
    failures: u32,
    open_until: Option<Instant>,
    /// The one message that tries an open circuit's primary again is under way.
    trial: bool,
}

impl Table {
    fn limiter(&self, key: &str, limits: Limits) -> Arc<Limiter> {
        let mut map = self.limiters.lock().unwrap_or_else(|e| e.into_inner());
        match map.get(key) {
            Some(l) if l.limits == limits => l.clone(),
            _ => {
                // New or changed limits start afresh.
                let l = Arc::new(Limiter {
                    limits,
                    sent: Mutex::default(),
                    connections: limits.max_connections.map(|n| Arc::new(Semaphore::new(n))),
                });
                map.insert(key.to_owned(), l.clone());
                l
            }
        }
    }

    /// Waits, until `give_up` at the latest, for the sender's rate limit to admit one more
    /// message, and counts it.
    pub async fn admit(&self, key: &str, limits: Limits, give_up: Instant) -> Result<(), Held> {
        let Some(rate) = limits.rate else {
            return Ok(());
        };
        let limiter = self.limiter(key, limits);
        let mut delayed = false;
        loop {
            let next = {
                let mut sent = limiter.sent.lock().unwrap_or_else(|e| e.into_inner());
                let now = Instant::now();
                while sent.front().is_some_and(|at| *at + rate.per <= now) {
                    sent.pop_front();
                }
                if sent.len() < rate.count as usize {
                    sent.push_back(now);
                    None
                } else {
                    sent.front().map(|at| *at + rate.per)
                }
            };
            match next {
                None => return Ok(()),
                Some(at) if at > give_up => {
                    crate::metrics::limit(key, "rate", "refused");
                    return Err(Held::Rate(rate));
                }
                Some(at) => {
                    if !std::mem::replace(&mut delayed, true) {
                        crate::metrics::limit(key, "rate", "delayed");
                    }
                    tokio::time::sleep_until(at).await;
                }
            }
        }
    }

    /// One of the sender's connections to its primary, waiting until `give_up` at the latest.
    pub async fn connection(
        &self,
        key: &str,
        limits: Limits,
        give_up: Instant,
    ) -> Result<Option<OwnedSemaphorePermit>, Held> {
        let Some(max) = limits.max_connections else {
            return Ok(None);
        };
        let semaphore = self
            .limiter(key, limits)
            .connections
            .clone()
            .expect("a limiter with max_connections has a semaphore");
        if let Ok(permit) = semaphore.clone().try_acquire_owned() {
            return Ok(Some(permit));
        }
        crate::metrics::limit(key, "connections", "delayed");
        match tokio::time::timeout_at(give_up, semaphore.acquire_owned()).await {
            Ok(permit) => Ok(Some(permit.expect("the semaphore is never closed"))),
            Err(_) => {
                crate::metrics::limit(key, "connections", "refused");
                Err(Held::Connections(max))
            }
        }
    }

    /// Whether a message may try `primary` now: no while its circuit is open, except one
    /// message once the open time is over.
    pub fn primary_allowed(&self, primary: &SmtpTarget) -> bool {
        let mut circuits = self.circuits.lock().unwrap_or_else(|e| e.into_inner());
        let Some(c) = circuits.get_mut(primary) else {
            return true;
        };
        match c.open_until {
            None => true,
            Some(until) if Instant::now() < until => false,
            Some(_) if c.trial => false,
            Some(_) => {
                c.trial = true;
                true
            }
        }
    }

    /// What the primary did with a message: a success closes its circuit; `failures` failures
    /// in a row open it for `open`.
    pub fn record(&self, primary: &SmtpTarget, ok: bool, failures: u32, open: Duration) {
        let mut circuits = self.circuits.lock().unwrap_or_else(|e| e.into_inner());
        if ok {
            if circuits
                .remove(primary)
                .is_some_and(|c| c.open_until.is_some())
            {
                tracing::info!(upstream = %primary.host, "circuit closed: the primary relay took a message");
                crate::metrics::circuit(primary, false);
            }
            return;
        }
        let c = circuits.entry(primary.clone()).or_default();
        c.failures += 1;
        c.trial = false;
        if c.failures >= failures {
            if c.open_until.is_none() {
                tracing::warn!(
                    upstream = %primary.host,
                    "circuit open: {} failures in a row; the fallback takes its mail for {}s",
                    c.failures,
                    open.as_secs()
                );
                crate::metrics::circuit(primary, true);
            }
            c.open_until = Some(Instant::now() + open);
        }
    }
}

//! Admission for what comes after a connection: per-client call rates (a JSON-RPC batch of N
//! counts N) and per-client caps on long-lived things (WebSockets).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::RateLimiter;

use super::{Limiter, PassedClock, SWEEP_EVERY, client_key, prefix_key, quota, release};
use crate::config::units;

/// A per-client rate of events that come in counts, such as JSON-RPC calls (a batch of N
/// counts N), on a clock passed in like [`Gate`](super::Gate)'s.
pub(crate) struct CallRate {
    rate: units::Rate,
    /// What one key is: [`client_key`] or [`prefix_key`].
    key: fn(IpAddr) -> IpAddr,
    clock: PassedClock,
    limiter: Limiter,
    decisions: AtomicU64,
}

impl std::fmt::Debug for CallRate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallRate")
            .field("rate", &self.rate)
            .finish_non_exhaustive()
    }
}

impl CallRate {
    /// A rate per client (IPv4 address or IPv6 /64).
    #[must_use]
    pub fn new(rate: units::Rate) -> Self {
        Self::keyed(rate, client_key)
    }

    /// A rate per network (IPv4 /24 or IPv6 /48, see [`prefix_key`]).
    #[must_use]
    pub(crate) fn per_prefix(rate: units::Rate) -> Self {
        Self::keyed(rate, prefix_key)
    }

    fn keyed(rate: units::Rate, key: fn(IpAddr) -> IpAddr) -> Self {
        let clock = PassedClock::default();
        Self {
            rate,
            key,
            limiter: RateLimiter::dashmap_with_clock(quota(rate), clock.clone()),
            clock,
            decisions: AtomicU64::new(0),
        }
    }

    /// The rate this limiter enforces.
    #[must_use]
    pub fn rate(&self) -> units::Rate {
        self.rate
    }

    /// Whether `ip` may make `n` more calls at `now`; when it may, they are counted. More
    /// than one interval's count at once is never allowed.
    pub fn allow(&self, now: Duration, ip: IpAddr, n: usize) -> bool {
        self.clock.advance_to(now);
        if self.decisions.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1 {
            self.limiter.retain_recent();
        }
        let Some(n) = u32::try_from(n).ok().and_then(std::num::NonZeroU32::new) else {
            return true;
        };
        matches!(self.limiter.check_key_n(&(self.key)(ip), n), Ok(Ok(())))
    }
}

/// A per-client cap on things held open (such as WebSockets), with places given back by
/// dropping the [`Held`] guard.
#[derive(Debug, Default)]
pub(crate) struct PerClientCap {
    pub(super) held: Mutex<HashMap<IpAddr, usize>>,
}

/// One place held under a [`PerClientCap`].
#[derive(Debug)]
pub(crate) struct Held {
    cap: Arc<PerClientCap>,
    key: IpAddr,
}

impl PerClientCap {
    /// Take a place for `ip` if it holds fewer than `max`.
    #[must_use]
    pub fn take(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<Held> {
        let key = client_key(ip);
        let mut held = self
            .held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = held.entry(key).or_insert(0);
        if *n >= max {
            if *n == 0 {
                held.remove(&key);
            }
            return None;
        }
        *n += 1;
        Some(Held {
            cap: self.clone(),
            key,
        })
    }

    /// Places held now, all clients together.
    #[must_use]
    pub fn total(&self) -> usize {
        self.held.lock().map_or(0, |h| h.values().sum())
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut held = self
            .cap
            .held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        release(&mut held, self.key);
    }
}

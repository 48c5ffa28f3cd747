//! The tunnel listeners' handshake gate: which handshake attempts (QUIC or TCP+TLS) the sentry
//! spends cryptography on, decided on the first packet (or the accepted TCP connection).
//!
//! A handshake in progress holds a place until it completes or times out, and a stranger can
//! start handshakes it never finishes. What keeps strangers from holding every place:
//!
//! - per client (IPv4 address or IPv6 /64): a cap on handshakes in progress and a rate;
//! - past [`HandshakeLimits::retry_above`] in progress, an unvalidated QUIC attempt gets a
//!   stateless retry first, so spoofed sources never hold a place;
//! - when every place is taken, a new attempt *evicts* one in progress rather than being
//!   dropped: the oldest of the client holding the most places. A flood from many addresses
//!   then churns through its own handshakes; an agent's handshake, one place of its own
//!   address and done within a few round trips, is evicted only after every flooding
//!   handshake started since is. A refused attempt (per-client cap, rate) evicts nothing.
//! - the addresses pinned agents authenticated from lately are *known*: when the places are
//!   all taken, a validated attempt from a known address takes one of
//!   [`HandshakeLimits::reserved`] places set aside for them, which strangers never use and
//!   never evict. A reconnecting agent so gets in at once whatever the flood.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::RateLimiter;
use governor::clock::Clock as _;
use tokio_util::sync::CancellationToken;

use super::{Limiter, PassedClock, SWEEP_EVERY, client_key, quota, release};
use crate::config::units;

/// How long an address an agent authenticated from stays known.
const KNOWN_FOR: Duration = Duration::from_secs(7 * 24 * 3600);
/// Known addresses kept at most (the oldest is forgotten past it).
const KNOWN_MAX: usize = 1024;

/// Limits on the tunnel listener, applied to each handshake attempt before any cryptography
/// is done for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandshakeLimits {
    /// Handshakes of strangers in progress at once; past it, a new attempt evicts one (see
    /// the module docs).
    pub max_in_flight: usize,
    /// Handshakes in progress from one client (IPv4 address or IPv6 /64). An attacker that
    /// starts handshakes and never finishes them holds places until the handshake timeout;
    /// this keeps one address from holding more than a few.
    pub max_in_flight_per_ip: usize,
    /// From this many handshakes in progress on, an attempt from an address not yet validated
    /// gets a stateless QUIC retry first: spoofed sources never get past it, so they cannot
    /// hold places, and the retry costs the sentry one packet and no state.
    pub retry_above: usize,
    /// Handshake attempts per client (IPv4 address or IPv6 /64), with a burst of one
    /// interval's count. Agents reconnect with backoff and stay far below it.
    pub rate_per_ip: units::Rate,
    /// Places for validated attempts from addresses pinned agents authenticated from, used
    /// once the strangers' places are all taken.
    pub reserved: usize,
}

/// Defaults of [`HandshakeLimits`] for QUIC.
pub const DEFAULT_HANDSHAKE_LIMITS: HandshakeLimits = HandshakeLimits {
    max_in_flight: 256,
    max_in_flight_per_ip: 8,
    retry_above: 16,
    rate_per_ip: units::Rate {
        count: std::num::NonZeroU32::new(10).expect("invariant: 10 is not zero"),
        per: Duration::from_secs(1),
    },
    reserved: 32,
};

/// What to do with one handshake attempt.
#[derive(Debug)]
pub enum Handshake {
    /// Go ahead; the permit holds a place until the handshake ends either way.
    Accept(HandshakePermit),
    /// Ask the peer to prove its address first (a QUIC retry).
    Retry,
    /// Drop the attempt without an answer.
    Ignore(HandshakeRefusal),
}

/// Why a handshake attempt was dropped (or one in progress given up).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeRefusal {
    /// Every place is taken, none can be evicted, and the address is not known.
    Busy,
    /// `max_in_flight_per_ip` handshakes from this client are in progress.
    PerIpBusy,
    /// The address exceeded `rate_per_ip`.
    Rate,
    /// A handshake in progress was given up for a newer attempt.
    Evicted,
}

impl HandshakeRefusal {
    /// Every reason, in a fixed order (for counters).
    pub const ALL: [Self; 4] = [Self::Busy, Self::PerIpBusy, Self::Rate, Self::Evicted];

    /// The reason's name in logs and metrics.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Busy => "busy",
            Self::PerIpBusy => "per_ip_busy",
            Self::Rate => "rate",
            Self::Evicted => "evicted",
        }
    }

    /// Position in [`Self::ALL`].
    #[must_use]
    pub const fn index(self) -> usize {
        self as usize
    }
}

/// The tunnel listener's handshake state.
pub struct HandshakeGate {
    limits: HandshakeLimits,
    state: Mutex<Flights>,
    /// Handshakes in progress, both kinds of place (for logs).
    in_flight: AtomicUsize,
    clock: PassedClock,
    limiter: Limiter,
    decisions: AtomicU64,
}

/// The handshakes in progress and the known addresses.
#[derive(Default)]
struct Flights {
    /// Places held per client, both kinds.
    per_client: HashMap<IpAddr, usize>,
    /// The strangers' handshakes, for eviction: id → (client, started).
    strangers: HashMap<u64, (IpAddr, Duration, CancellationToken)>,
    /// Reserved places taken.
    reserved: usize,
    next_id: u64,
    /// Client → when an agent last authenticated from it.
    known: HashMap<IpAddr, Duration>,
}

/// Which kind of place a permit holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    Stranger(u64),
    Reserved,
}

impl std::fmt::Debug for HandshakeGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HandshakeGate")
            .field("limits", &self.limits)
            .field("in_flight", &self.in_flight)
            .finish_non_exhaustive()
    }
}

impl HandshakeGate {
    #[must_use]
    pub fn new(limits: HandshakeLimits) -> Arc<Self> {
        let clock = PassedClock::default();
        Arc::new(Self {
            limiter: RateLimiter::dashmap_with_clock(quota(limits.rate_per_ip), clock.clone()),
            clock,
            limits,
            state: Mutex::default(),
            in_flight: AtomicUsize::new(0),
            decisions: AtomicU64::new(0),
        })
    }

    /// Decide on an attempt from `ip` at `now`; `validated`: the peer already proved its
    /// address (it echoed a retry token, or it is a TCP connection).
    pub(crate) fn decide(
        self: &Arc<Self>,
        now: Duration,
        ip: IpAddr,
        validated: bool,
    ) -> Handshake {
        let limits = &self.limits;
        if !validated && self.in_flight.load(Ordering::Relaxed) >= limits.retry_above {
            return Handshake::Retry;
        }
        self.clock.advance_to(now);
        if self.decisions.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1 {
            self.limiter.retain_recent();
        }
        let key = client_key(ip);
        let mut state = self.lock();
        if state.per_client.get(&key).copied().unwrap_or(0) >= limits.max_in_flight_per_ip {
            return Handshake::Ignore(HandshakeRefusal::PerIpBusy);
        }
        if self.limiter.check_key(&key).is_err() {
            return Handshake::Ignore(HandshakeRefusal::Rate);
        }
        let known = validated
            && state
                .known
                .get(&key)
                .is_some_and(|at| now.saturating_sub(*at) < KNOWN_FOR);
        let place = if state.strangers.len() < limits.max_in_flight {
            state.stranger(key, now)
        } else if known && state.reserved < limits.reserved {
            state.reserved += 1;
            Place::Reserved
        } else if state.evict() {
            state.stranger(key, now)
        } else {
            return Handshake::Ignore(HandshakeRefusal::Busy);
        };
        *state.per_client.entry(key).or_insert(0) += 1;
        let evicted = match place {
            Place::Stranger(id) => state.strangers[&id].2.clone(),
            Place::Reserved => CancellationToken::new(),
        };
        drop(state);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        Handshake::Accept(HandshakePermit {
            gate: self.clone(),
            key,
            place,
            evicted,
        })
    }

    /// Handshakes in progress.
    #[must_use]
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Flights> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Flights {
    fn stranger(&mut self, key: IpAddr, now: Duration) -> Place {
        let id = self.next_id;
        self.next_id += 1;
        self.strangers
            .insert(id, (key, now, CancellationToken::new()));
        Place::Stranger(id)
    }

    /// Evict the oldest handshake of the client holding the most strangers' places; whether
    /// one was. It leaves the table at once (its task ends it, which gives its place back).
    fn evict(&mut self) -> bool {
        let mut held: HashMap<IpAddr, usize> = HashMap::new();
        for (key, _, _) in self.strangers.values() {
            *held.entry(*key).or_default() += 1;
        }
        let victim = self
            .strangers
            .iter()
            .max_by_key(|&(&id, &(key, started, _))| (held[&key], std::cmp::Reverse((started, id))))
            .map(|(&id, _)| id);
        let Some(id) = victim else {
            return false;
        };
        if let Some((key, _, token)) = self.strangers.remove(&id) {
            token.cancel();
            // Its permit no longer counts against its client's cap either.
            release(&mut self.per_client, key);
        }
        true
    }
}

/// A place among the handshakes in progress; given back when dropped.
#[derive(Debug)]
pub struct HandshakePermit {
    gate: Arc<HandshakeGate>,
    key: IpAddr,
    place: Place,
    evicted: CancellationToken,
}

impl HandshakePermit {
    /// Resolves when the gate gave this handshake's place to a newer attempt: the handshake
    /// is to be abandoned at once.
    pub async fn evicted(&self) {
        self.evicted.cancelled().await;
    }

    /// The handshake authenticated a pinned agent: its address is known from now on (see
    /// the module docs). Gives the place back.
    pub fn authenticated(self) {
        let now = self.gate.clock.now();
        let mut state = self.gate.lock();
        if state.known.len() >= KNOWN_MAX && !state.known.contains_key(&self.key) {
            let oldest = state
                .known
                .iter()
                .min_by_key(|(_, at)| **at)
                .map(|(k, _)| *k);
            if let Some(oldest) = oldest {
                state.known.remove(&oldest);
            }
        }
        state.known.insert(self.key, now);
    }
}

impl Drop for HandshakePermit {
    fn drop(&mut self) {
        let mut state = self.gate.lock();
        match self.place {
            // An evicted one left the table (and its client's count) when it was evicted.
            Place::Stranger(id) => {
                if state.strangers.remove(&id).is_some() {
                    release(&mut state.per_client, self.key);
                }
            }
            Place::Reserved => {
                state.reserved -= 1;
                release(&mut state.per_client, self.key);
            }
        }
        drop(state);
        self.gate.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::units::parse_rate;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn limits() -> HandshakeLimits {
        HandshakeLimits {
            max_in_flight: 4,
            max_in_flight_per_ip: 2,
            retry_above: 2,
            rate_per_ip: parse_rate("3/s").unwrap(),
            reserved: 1,
        }
    }

    fn accept(h: Handshake) -> HandshakePermit {
        match h {
            Handshake::Accept(p) => p,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn caps_retries_and_rates_over_simulated_time() {
        let gate = HandshakeGate::new(limits());
        let t0 = Duration::from_secs(100);
        let a = ip("203.0.113.7");
        let b = ip("2001:db8:1:2::1");
        let b_same_64 = ip("2001:db8:1:2::ffff");
        // Permits count in flight; from 2 on, unvalidated attempts get a retry.
        let p1 = accept(gate.decide(t0, a, false));
        let p2 = accept(gate.decide(t0, b, false));
        assert_eq!(gate.in_flight(), 2);
        assert!(matches!(gate.decide(t0, a, false), Handshake::Retry));
        // Validated attempts pass, up to the per-client cap.
        let p3 = accept(gate.decide(t0, a, true));
        assert!(matches!(
            gate.decide(t0, a, true),
            Handshake::Ignore(HandshakeRefusal::PerIpBusy)
        ));
        let p4 = accept(gate.decide(t0, b_same_64, true));
        drop((p1, p2, p3, p4));
        assert_eq!(gate.in_flight(), 0);
        // a used 2 of its burst of 3: one more now, then it waits a third of a second.
        drop(accept(gate.decide(t0, a, false)));
        assert!(matches!(
            gate.decide(t0, a, false),
            Handshake::Ignore(HandshakeRefusal::Rate)
        ));
        // b's /64 used 2 as well; another address elsewhere is unaffected.
        drop(accept(gate.decide(t0, ip("198.51.100.1"), false)));
        drop(accept(gate.decide(
            t0 + Duration::from_millis(340),
            a,
            false,
        )));
        assert_eq!(
            gate.in_flight(),
            0,
            "dropped permits give their places back"
        );
    }

    #[test]
    fn a_full_gate_evicts_the_busiest_clients_oldest_handshake() {
        let gate = HandshakeGate::new(limits());
        let t = |ms| Duration::from_secs(100) + Duration::from_millis(ms);
        let flood = [ip("203.0.113.1"), ip("203.0.113.2")];
        // Four places: two flooding clients hold two each.
        let f: Vec<HandshakePermit> = (0..4)
            .map(|i| accept(gate.decide(t(i), flood[usize::try_from(i % 2).unwrap()], true)))
            .collect();
        // A newcomer evicts the oldest of a client holding two: the first one.
        let newcomer = accept(gate.decide(t(10), ip("198.51.100.9"), true));
        assert!(f[0].evicted.is_cancelled());
        assert!(f[1..].iter().all(|p| !p.evicted.is_cancelled()));
        // The evicted one's client may start another now (its count went down).
        let again = accept(gate.decide(t(11), flood[0], true));
        assert!(f[1].evicted.is_cancelled(), "client 2 held the most now");
        // flood[0] holds two places again: its oldest, f[2], goes; the newcomer (one place)
        // stays.
        let last = accept(gate.decide(t(12), ip("192.0.2.1"), true));
        assert!(f[2].evicted.is_cancelled());
        assert!(!newcomer.evicted.is_cancelled());
        drop((f, newcomer, again, last));
        assert_eq!(gate.in_flight(), 0);
        assert!(gate.lock().per_client.is_empty(), "every place given back");
    }

    #[test]
    fn a_known_address_gets_a_reserved_place_that_strangers_cannot_evict() {
        let gate = HandshakeGate::new(HandshakeLimits {
            max_in_flight_per_ip: 4,
            rate_per_ip: parse_rate("100/s").unwrap(),
            ..limits()
        });
        let t0 = Duration::from_secs(100);
        let agent = ip("198.51.100.20");
        accept(gate.decide(t0, agent, true)).authenticated();
        // A flood from one address takes every strangers' place...
        let flood: Vec<HandshakePermit> = (0..4)
            .map(|_| accept(gate.decide(t0, ip("203.0.113.1"), true)))
            .collect();
        // ...the agent's validated attempt takes the reserved one, an unvalidated one is
        // asked to prove its address first (spoofing a known address gets nothing).
        assert!(matches!(gate.decide(t0, agent, false), Handshake::Retry));
        let reserved = accept(gate.decide(t0, agent, true));
        assert_eq!(reserved.place, Place::Reserved);
        // More flooding evicts the flood's own handshakes, never the reserved one.
        let more = accept(gate.decide(t0, ip("203.0.113.2"), true));
        assert!(flood[0].evicted.is_cancelled());
        assert!(!reserved.evicted.is_cancelled());
        // With the reserved place taken, a second attempt of the agent's competes as a
        // stranger (and evicts the flood's oldest).
        let second = accept(gate.decide(t0, agent, true));
        assert!(matches!(second.place, Place::Stranger(_)));
        drop((flood, reserved, more, second));
        assert_eq!(gate.in_flight(), 0);
        assert_eq!(gate.lock().reserved, 0);
    }
}

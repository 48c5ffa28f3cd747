//! Admission control for public TCP routes: who may connect, how many at once, how often.
//!
//! [`check`] is the pure decision over the policy, the client and the current counts.
//! [`Gate`] holds a route's counts and its per-client rate limiter (governor, on a clock that
//! is passed in, so the whole decision is a function of its inputs and testable without
//! sleeping) and hands out [`Permit`]s that give their place back when dropped.
//!
//! A client is an IPv4 address or an IPv6 /64: a host on IPv6 usually owns a whole /64, and
//! counting its addresses one by one would let it multiply its share at will. IPv4-mapped IPv6
//! addresses (`::ffff:a.b.c.d`, what a dual-stack `[::]` listener reports) count as IPv4.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use governor::clock::Clock;
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};

use crate::config::{Limits, units};

mod calls;
mod egress;
mod handshake;
pub(crate) use calls::{CallRate, PerClientCap};
pub use egress::{
    EgressGate, EgressPermit, EgressRefusal, check_destination, special as special_range,
};
pub use handshake::{
    DEFAULT_HANDSHAKE_LIMITS, Handshake, HandshakeGate, HandshakeLimits, HandshakePermit,
    HandshakeRefusal,
};

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// The address matches a `deny` entry.
    Denied,
    /// The address matches no `allow` entry.
    NotAllowed,
    /// The route is at `max_connections`.
    RouteFull,
    /// The sentry is at its global `max_connections`.
    SentryFull,
    /// The client is at `max_connections_per_ip`.
    PerIpFull,
    /// The client exceeded `connect_rate_per_ip`.
    Rate,
}

impl Refusal {
    /// Every reason, in a fixed order (for counters).
    pub const ALL: [Self; 6] = [
        Self::Denied,
        Self::NotAllowed,
        Self::RouteFull,
        Self::SentryFull,
        Self::PerIpFull,
        Self::Rate,
    ];

    /// The reason's name in logs and metrics.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Denied => "denied",
            Self::NotAllowed => "not_allowed",
            Self::RouteFull => "route_full",
            Self::SentryFull => "sentry_full",
            Self::PerIpFull => "per_ip_full",
            Self::Rate => "rate",
        }
    }

    const fn index(self) -> usize {
        self as usize
    }
}

/// The unit limits are counted in: IPv4 address, or IPv6 /64 (mapped IPv4 as IPv4).
#[must_use]
pub fn client_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(Ipv6Addr::from(prefix))
        }
    }
}

/// The unit new UDP flows are rated in: an IPv4 /24 or an IPv6 /48 (mapped IPv4 as IPv4).
/// A spoofed source costs nothing to make up; a network's worth of them counts as one.
#[must_use]
pub(crate) fn prefix_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V4(v4) => IpAddr::V4((u32::from(v4) & 0xffff_ff00).into()),
        IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & !((1u128 << 80) - 1);
            IpAddr::V6(Ipv6Addr::from(prefix))
        }
    }
}

/// Open connections at the moment of a decision.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// On this route.
    pub route: usize,
    /// On all routes of the sentry.
    pub sentry: usize,
    /// On this route from this client.
    pub client: usize,
}

/// The decision without the rate: lists first (deny wins), then the caps.
///
/// # Errors
/// The reason the connection is refused.
pub fn check(
    limits: &Limits,
    sentry_max: usize,
    ip: IpAddr,
    counts: Counts,
) -> Result<(), Refusal> {
    if limits.deny.contains(ip) {
        return Err(Refusal::Denied);
    }
    if !limits.allow.contains(ip) {
        return Err(Refusal::NotAllowed);
    }
    if counts.sentry >= sentry_max {
        return Err(Refusal::SentryFull);
    }
    if counts.route >= limits.max_connections {
        return Err(Refusal::RouteFull);
    }
    if counts.client >= limits.max_connections_per_ip {
        return Err(Refusal::PerIpFull);
    }
    Ok(())
}

/// Open connections across every route of one sentry.
#[derive(Debug)]
pub struct SentryCount {
    active: AtomicUsize,
    max: AtomicUsize,
}

impl SentryCount {
    #[must_use]
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            active: AtomicUsize::new(0),
            max: AtomicUsize::new(max),
        })
    }

    /// The cap across routes; a reload changes it for later decisions only.
    #[must_use]
    pub fn max(&self) -> usize {
        self.max.load(Ordering::Relaxed)
    }

    /// Change the cap (on reload). Connections above a lowered cap are not cut; new ones wait
    /// until the count falls below it.
    pub(crate) fn set_max(&self, max: usize) {
        self.max.store(max, Ordering::Relaxed);
    }

    /// Open relayed connections now.
    #[must_use]
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }
}

/// governor's clock, set by the caller before each decision: time is an input.
#[derive(Debug, Clone, Default)]
struct PassedClock(Arc<AtomicU64>);

impl PassedClock {
    /// Set the time; monotonic even if callers race, so the limiter never sees it go back.
    fn advance_to(&self, now: Duration) {
        let nanos = u64::try_from(now.as_nanos()).unwrap_or(u64::MAX);
        self.0.fetch_max(nanos, Ordering::Relaxed);
    }
}

impl Clock for PassedClock {
    type Instant = Duration;

    fn now(&self) -> Duration {
        Duration::from_nanos(self.0.load(Ordering::Relaxed))
    }
}

type Limiter =
    RateLimiter<IpAddr, DefaultKeyedStateStore<IpAddr>, PassedClock, NoOpMiddleware<Duration>>;

/// How many decisions between sweeps of idle clients out of the rate limiter's table.
const SWEEP_EVERY: u64 = 4096;

/// One route's admission state.
pub struct Gate {
    /// Swapped whole on reload; each decision reads one consistent policy.
    limits: ArcSwap<Limits>,
    sentry: Arc<SentryCount>,
    open: Mutex<Open>,
    clock: PassedClock,
    /// Replaced when a reload changes the rate (its per-client history starts over then).
    limiter: ArcSwap<Limiter>,
    decisions: AtomicU64,
    admitted: AtomicU64,
    refused: [AtomicU64; Refusal::ALL.len()],
}

#[derive(Default)]
struct Open {
    route: usize,
    per_client: HashMap<IpAddr, usize>,
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gate")
            .field("limits", &*self.limits.load())
            .finish_non_exhaustive()
    }
}

impl Gate {
    #[must_use]
    pub fn new(limits: Limits, sentry: Arc<SentryCount>) -> Arc<Self> {
        let clock = PassedClock::default();
        Arc::new(Self {
            limiter: ArcSwap::from_pointee(RateLimiter::dashmap_with_clock(
                quota(limits.connect_rate_per_ip),
                clock.clone(),
            )),
            clock,
            limits: ArcSwap::from_pointee(limits),
            sentry,
            open: Mutex::new(Open::default()),
            decisions: AtomicU64::new(0),
            admitted: AtomicU64::new(0),
            refused: Default::default(),
        })
    }

    /// Apply a new policy (on reload) to later decisions. Open connections keep their
    /// permits and still count against the new caps; none is cut.
    pub(crate) fn set_limits(&self, limits: Limits) {
        if limits.connect_rate_per_ip != self.limits.load().connect_rate_per_ip {
            self.limiter.store(Arc::new(RateLimiter::dashmap_with_clock(
                quota(limits.connect_rate_per_ip),
                self.clock.clone(),
            )));
        }
        self.limits.store(Arc::new(limits));
    }

    /// Admit or refuse a connection from `ip` at `now` (time since any fixed start, the same
    /// for every call on this gate).
    ///
    /// # Errors
    /// Why the connection is refused; the refusal is counted.
    pub fn admit(self: &Arc<Self>, now: Duration, ip: IpAddr) -> Result<Permit, Refusal> {
        let result = self.decide(now, ip);
        match result {
            Ok(_) => self.admitted.fetch_add(1, Ordering::Relaxed),
            Err(reason) => self.refused[reason.index()].fetch_add(1, Ordering::Relaxed),
        };
        result
    }

    fn decide(self: &Arc<Self>, now: Duration, ip: IpAddr) -> Result<Permit, Refusal> {
        let key = client_key(ip);
        self.clock.advance_to(now);
        let limiter = self.limiter.load();
        if self.decisions.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1 {
            limiter.retain_recent();
        }
        let mut open = self
            .open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let counts = Counts {
            route: open.route,
            sentry: self.sentry.active(),
            client: open.per_client.get(&key).copied().unwrap_or(0),
        };
        check(&self.limits.load(), self.sentry.max(), ip, counts)?;
        limiter.check_key(&key).map_err(|_| Refusal::Rate)?;
        open.route += 1;
        *open.per_client.entry(key).or_insert(0) += 1;
        self.sentry.active.fetch_add(1, Ordering::Relaxed);
        Ok(Permit {
            gate: self.clone(),
            key,
        })
    }

    /// Open connections on this route.
    #[must_use]
    pub fn active(&self) -> usize {
        self.open.lock().map_or(0, |o| o.route)
    }

    /// Clients with open connections on this route (the per-client table's size).
    #[must_use]
    pub fn clients(&self) -> usize {
        self.open.lock().map_or(0, |o| o.per_client.len())
    }

    /// Connections admitted so far.
    #[must_use]
    pub fn admitted(&self) -> u64 {
        self.admitted.load(Ordering::Relaxed)
    }

    /// Connections refused so far for `reason`.
    #[must_use]
    pub fn refused(&self, reason: Refusal) -> u64 {
        self.refused[reason.index()].load(Ordering::Relaxed)
    }

    /// Count a refusal decided outside the gate (a UDP route's rate of new flows per network).
    pub(crate) fn count_refusal(&self, reason: Refusal) {
        self.refused[reason.index()].fetch_add(1, Ordering::Relaxed);
    }
}

/// A place on a route; given back when dropped (when the relayed connection ends).
#[derive(Debug)]
pub struct Permit {
    gate: Arc<Gate>,
    key: IpAddr,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut open = self
            .gate
            .open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        open.route = open.route.saturating_sub(1);
        release(&mut open.per_client, self.key);
        self.gate.sentry.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Give back one of `key`'s places; forget the client when it holds none (the table holds only
/// clients with something open, so it cannot grow with every address ever seen).
pub(super) fn release(per_client: &mut HashMap<IpAddr, usize>, key: IpAddr) {
    if let Some(n) = per_client.get_mut(&key) {
        *n -= 1;
        if *n == 0 {
            per_client.remove(&key);
        }
    }
}

pub(super) fn quota(rate: units::Rate) -> Quota {
    Quota::with_period(rate.per / rate.count.get())
        .unwrap_or_else(|| Quota::per_second(rate.count))
        .allow_burst(rate.count)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cidr::CidrSet;
    use crate::config::units::parse_rate;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn limits() -> Limits {
        Limits {
            max_connections: 4,
            max_connections_per_ip: 2,
            connect_rate_per_ip: parse_rate("5/s").unwrap(),
            ..Limits::default()
        }
    }

    #[test]
    fn lists_and_caps() {
        let mut l = limits();
        l.allow = CidrSet::new([
            "203.0.113.0/24".parse().unwrap(),
            "2001:db8::/32".parse().unwrap(),
        ]);
        l.deny = CidrSet::new([
            "203.0.113.66/32".parse().unwrap(),
            "2001:db8:bad::/48".parse().unwrap(),
        ]);
        let none = Counts::default();
        let cases = [
            ("203.0.113.7", none, Ok(())),
            ("203.0.113.66", none, Err(Refusal::Denied)),
            ("::ffff:203.0.113.66", none, Err(Refusal::Denied)),
            ("::ffff:203.0.113.7", none, Ok(())),
            ("198.51.100.1", none, Err(Refusal::NotAllowed)),
            ("2001:db8::1", none, Ok(())),
            ("2001:db8:bad::1", none, Err(Refusal::Denied)),
            ("2001:db9::1", none, Err(Refusal::NotAllowed)),
            (
                "203.0.113.7",
                Counts { route: 4, ..none },
                Err(Refusal::RouteFull),
            ),
            (
                "203.0.113.7",
                Counts { client: 2, ..none },
                Err(Refusal::PerIpFull),
            ),
            (
                "203.0.113.7",
                Counts {
                    client: 1,
                    route: 3,
                    sentry: 3,
                },
                Ok(()),
            ),
            (
                "203.0.113.7",
                Counts { sentry: 10, ..none },
                Err(Refusal::SentryFull),
            ),
            // Deny wins over every cap: a denied client learns nothing else.
            (
                "203.0.113.66",
                Counts {
                    route: 4,
                    client: 2,
                    sentry: 10,
                },
                Err(Refusal::Denied),
            ),
        ];
        for (addr, counts, want) in cases {
            assert_eq!(check(&l, 10, ip(addr), counts), want, "{addr} {counts:?}");
        }
    }

    #[test]
    fn ipv6_counts_per_64_and_mapped_ipv4_as_ipv4() {
        assert_eq!(client_key(ip("2001:db8:1:2:aaaa::1")), ip("2001:db8:1:2::"));
        assert_eq!(client_key(ip("2001:db8:1:2:ffff::9")), ip("2001:db8:1:2::"));
        assert_ne!(client_key(ip("2001:db8:1:3::1")), ip("2001:db8:1:2::"));
        assert_eq!(client_key(ip("::ffff:198.51.100.4")), ip("198.51.100.4"));
    }

    #[test]
    fn permits_count_and_release() {
        let sentry = SentryCount::new(3);
        let gate = Gate::new(limits(), sentry.clone());
        let t = Duration::ZERO;
        let a1 = gate.admit(t, ip("203.0.113.1")).unwrap();
        let a2 = gate.admit(t, ip("::ffff:203.0.113.1")).unwrap();
        assert_eq!(
            gate.admit(t, ip("203.0.113.1")).unwrap_err(),
            Refusal::PerIpFull
        );
        let b1 = gate.admit(t, ip("203.0.113.2")).unwrap();
        // Global cap of 3 reached, though the route allows 4.
        assert_eq!(
            gate.admit(t, ip("203.0.113.3")).unwrap_err(),
            Refusal::SentryFull
        );
        assert_eq!((gate.active(), sentry.active(), gate.clients()), (3, 3, 2));
        drop((a1, b1));
        assert_eq!((gate.active(), sentry.active(), gate.clients()), (1, 1, 1));
        drop(a2);
        assert_eq!((gate.active(), sentry.active(), gate.clients()), (0, 0, 0));
        assert_eq!(gate.refused(Refusal::PerIpFull), 1);
        assert_eq!(gate.refused(Refusal::SentryFull), 1);
    }

    #[test]
    fn rate_over_simulated_time() {
        let gate = Gate::new(
            Limits {
                max_connections_per_ip: 1000,
                max_connections: 1000,
                ..limits()
            },
            SentryCount::new(1000),
        );
        let a = ip("203.0.113.9");
        // A burst of 5 at once, then refused.
        let mut held = Vec::new();
        for _ in 0..5 {
            held.push(gate.admit(Duration::ZERO, a).unwrap());
        }
        assert_eq!(gate.admit(Duration::ZERO, a).unwrap_err(), Refusal::Rate);
        // Another client is unaffected.
        assert!(gate.admit(Duration::ZERO, ip("203.0.113.10")).is_ok());
        // One more every 200 ms; not before.
        assert_eq!(
            gate.admit(Duration::from_millis(150), a).unwrap_err(),
            Refusal::Rate
        );
        assert!(gate.admit(Duration::from_millis(200), a).is_ok());
        // Over 10 simulated seconds at 20 attempts/s, about 5/s get in.
        let mut admitted = 0;
        for step in 1..=200u64 {
            if gate
                .admit(Duration::from_millis(200 + step * 50), a)
                .is_ok()
            {
                admitted += 1;
            }
        }
        assert!(
            (49..=51).contains(&admitted),
            "{admitted} admitted in 10 s at 5/s"
        );
        // Changing the source port changes nothing: the key is the address.
        assert_eq!(gate.refused(Refusal::Rate) as usize, 2 + 200 - admitted);
    }

    proptest::proptest! {
        #[test]
        fn permits_always_return_to_zero(
            ops in proptest::collection::vec((0u8..6, proptest::bool::ANY), 1..300)
        ) {
            let sentry = SentryCount::new(50);
            let gate = Gate::new(Limits { max_connections: 20, max_connections_per_ip: 4,
                connect_rate_per_ip: parse_rate("1000000/s").unwrap(), ..Limits::default() },
                sentry.clone());
            let mut held = Vec::new();
            for (i, (client, release)) in ops.into_iter().enumerate() {
                if release && !held.is_empty() {
                    held.swap_remove(i % held.len());
                } else if let Ok(p) = gate.admit(Duration::from_micros(i as u64),
                        IpAddr::from([203, 0, 113, client])) {
                    held.push(p);
                }
                proptest::prop_assert!(gate.active() <= 20);
                proptest::prop_assert_eq!(gate.active(), held.len());
            }
            drop(held);
            proptest::prop_assert_eq!((gate.active(), gate.clients(), sentry.active()), (0, 0, 0));
        }
    }

    #[test]
    fn call_rate_counts_each_call_of_a_batch() {
        let rate = CallRate::new(parse_rate("10/s").unwrap());
        let (a, b) = (ip("203.0.113.7"), ip("203.0.113.8"));
        let t0 = Duration::from_secs(5);
        assert!(rate.allow(t0, a, 6));
        assert!(rate.allow(t0, a, 4));
        assert!(!rate.allow(t0, a, 1), "the burst of 10 is spent");
        assert!(rate.allow(t0, b, 10), "another client has its own budget");
        assert!(!rate.allow(t0, b, 1));
        assert!(
            !rate.allow(t0 + Duration::from_secs(9), a, 11),
            "more than a burst never passes"
        );
        assert!(
            rate.allow(t0 + Duration::from_millis(210), a, 2),
            "refills at 10/s"
        );
        assert!(rate.allow(t0, a, 0), "nothing to count is always allowed");
    }

    #[test]
    fn per_client_cap_gives_places_back() {
        let cap = Arc::new(PerClientCap::default());
        let a = ip("2001:db8::1");
        let same_64 = ip("2001:db8::2");
        let first = cap.take(a, 2).unwrap();
        let second = cap.take(same_64, 2).unwrap();
        assert!(cap.take(a, 2).is_none(), "a /64 counts as one client");
        assert!(cap.take(ip("203.0.113.1"), 2).is_some());
        drop(first);
        let third = cap.take(a, 2).unwrap();
        drop((second, third));
        assert_eq!(cap.total(), 0);
        assert!(
            cap.held.lock().unwrap().is_empty(),
            "idle clients are forgotten"
        );
    }
}

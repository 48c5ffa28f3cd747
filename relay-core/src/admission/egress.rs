//! Egress admission: whether the sentry dials a destination for an agent, and how many and
//! how fast. The sentry decides, never the agent alone: a compromised agent must not turn the
//! sentry into a scanner of its own network, of the cloud's metadata service or of itself.
//!
//! [`check_destination`] is the pure decision over the policy and one address. The ranges
//! [`special`] names are refused whatever `allow` says, unless `allow_private` lists them;
//! IPv4 inside IPv6 (mapped `::ffff:a.b.c.d`, NAT64 `64:ff9b::a.b.c.d`, 6to4
//! `2002:aabb:ccdd::`) is judged as the IPv4 address it reaches. [`EgressGate`] holds one
//! agent's open egress connections and its connection rate, on a clock passed in.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use governor::RateLimiter;
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};

use super::{PassedClock, quota};
use crate::config::{EgressPolicy, units};

/// Why an egress connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EgressRefusal {
    /// The agent has no `egress = true` here.
    AgentNotAllowed,
    /// The destination is in an always-refused range (loopback, private, ...) that
    /// `allow_private` does not list.
    PrivateRange,
    /// The destination is one of the sentry's own addresses.
    OwnAddress,
    /// The destination matches `deny`.
    Denied,
    /// The destination matches no `allow` entry.
    NotAllowed,
    /// The port is not in `ports`.
    Port,
    /// The agent holds `max_connections` egress connections already.
    MaxConnections,
    /// The agent exceeded `connect_rate`.
    Rate,
}

impl EgressRefusal {
    /// Every reason, in a fixed order (for counters).
    pub const ALL: [Self; 8] = [
        Self::AgentNotAllowed,
        Self::PrivateRange,
        Self::OwnAddress,
        Self::Denied,
        Self::NotAllowed,
        Self::Port,
        Self::MaxConnections,
        Self::Rate,
    ];

    /// The reason's name in logs and metrics.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::AgentNotAllowed => "agent_not_allowed",
            Self::PrivateRange => "private_range",
            Self::OwnAddress => "own_address",
            Self::Denied => "denied",
            Self::NotAllowed => "not_allowed",
            Self::Port => "port",
            Self::MaxConnections => "max_connections",
            Self::Rate => "rate",
        }
    }

    /// Its place in [`Self::ALL`].
    #[must_use]
    pub const fn index(self) -> usize {
        self as usize
    }

    /// A failure of the destination's address or port (another address of the same name may
    /// pass), rather than of the agent's allowance.
    #[must_use]
    pub const fn is_destination(self) -> bool {
        !matches!(
            self,
            Self::AgentNotAllowed | Self::MaxConnections | Self::Rate
        )
    }
}

/// The class of an address that is never dialed unless `allow_private` lists it, or `None`
/// for an ordinary public address.
#[must_use]
pub fn special(ip: IpAddr) -> Option<&'static str> {
    match ip.to_canonical() {
        IpAddr::V4(v4) => special_v4(v4),
        IpAddr::V6(v6) => special_v6(v6),
    }
}

fn special_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, c, _] = ip.octets();
    Some(match (a, b, c) {
        (0, _, _) => "unspecified",
        (127, _, _) => "loopback",
        (10, _, _) | (192, 168, _) => "private",
        (172, 16..=31, _) => "private",
        (100, 64..=127, _) => "cgnat",
        (169, 254, _) => "link-local",
        (224..=239, _, _) => "multicast",
        // 240.0.0.0/4, the limited broadcast address among them.
        (240..=255, _, _) => "reserved",
        // IETF protocol assignments (192.0.0.0/24).
        (192, 0, 0) => "reserved",
        _ => return None,
    })
}

fn special_v6(ip: Ipv6Addr) -> Option<&'static str> {
    let segments = ip.segments();
    let embedded = |hi: u16, lo: u16| {
        let [a, b] = hi.to_be_bytes();
        let [c, d] = lo.to_be_bytes();
        Ipv4Addr::new(a, b, c, d)
    };
    if ip.is_unspecified() {
        return Some("unspecified");
    }
    if ip.is_loopback() {
        return Some("loopback");
    }
    Some(match segments {
        // NAT64 (RFC 6052): the IPv4 address it reaches.
        [0x64, 0xff9b, 0, 0, 0, 0, hi, lo] => return special_v4(embedded(hi, lo)),
        // NAT64 for local use (RFC 8215).
        [0x64, 0xff9b, 1, ..] => "private",
        // 6to4: the IPv4 address of the relay it names.
        [0x2002, hi, lo, ..] => return special_v4(embedded(hi, lo)),
        // The rest of ::/8: IPv4-compatible (deprecated) and reserved.
        [s0, ..] if s0 < 0x0100 => "reserved",
        // Discard-only (RFC 6666).
        [0x0100, 0, 0, 0, ..] => "reserved",
        [s0, ..] if s0 & 0xfe00 == 0xfc00 => "private",
        [s0, ..] if s0 & 0xffc0 == 0xfe80 => "link-local",
        // Site-local (deprecated).
        [s0, ..] if s0 & 0xffc0 == 0xfec0 => "private",
        [s0, ..] if s0 & 0xff00 == 0xff00 => "multicast",
        _ => return None,
    })
}

/// Whether the sentry dials `ip:port` under `policy`; `own` tells the sentry's own addresses.
/// Deny wins over everything; `allow_private` lifts only the always-refused ranges and the
/// own-address rule, never `deny` or `allow`.
///
/// # Errors
/// Why the destination is refused.
pub fn check_destination(
    policy: &EgressPolicy,
    ip: IpAddr,
    port: u16,
    own: impl Fn(IpAddr) -> bool,
) -> Result<(), EgressRefusal> {
    let ip = ip.to_canonical();
    if policy.deny.contains(ip) {
        return Err(EgressRefusal::Denied);
    }
    if !policy.allow_private.contains(ip) {
        if special(ip).is_some() {
            return Err(EgressRefusal::PrivateRange);
        }
        if own(ip) {
            return Err(EgressRefusal::OwnAddress);
        }
    }
    if !policy.allow.contains(ip) {
        return Err(EgressRefusal::NotAllowed);
    }
    if !policy.ports.is_empty() && !policy.ports.iter().any(|r| r.contains(&port)) {
        return Err(EgressRefusal::Port);
    }
    Ok(())
}

type DirectLimiter = RateLimiter<NotKeyed, InMemoryState, PassedClock, NoOpMiddleware<Duration>>;

/// One agent's egress allowance: open connections under a cap, new ones under a rate.
pub struct EgressGate {
    clock: PassedClock,
    rate: ArcSwap<(units::Rate, DirectLimiter)>,
    max: AtomicUsize,
    active: Arc<AtomicUsize>,
    admitted: AtomicU64,
}

impl std::fmt::Debug for EgressGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EgressGate")
            .field("active", &self.active())
            .finish_non_exhaustive()
    }
}

/// One open egress connection's place under its agent's cap; given back when dropped.
#[derive(Debug)]
pub struct EgressPermit(Arc<AtomicUsize>);

impl Drop for EgressPermit {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl EgressGate {
    #[must_use]
    pub fn new(max: usize, rate: units::Rate) -> Self {
        let clock = PassedClock::default();
        let limiter = RateLimiter::direct_with_clock(quota(rate), clock.clone());
        Self {
            rate: ArcSwap::from_pointee((rate, limiter)),
            clock,
            max: AtomicUsize::new(max),
            active: Arc::default(),
            admitted: AtomicU64::new(0),
        }
    }

    /// Apply a reloaded policy to later decisions (open connections are not cut; a changed
    /// rate starts its history over).
    pub fn set_limits(&self, max: usize, rate: units::Rate) {
        self.max.store(max, Ordering::Relaxed);
        if self.rate.load().0 != rate {
            let limiter = RateLimiter::direct_with_clock(quota(rate), self.clock.clone());
            self.rate.store(Arc::new((rate, limiter)));
        }
    }

    /// A place for one more connection at `now` (time since any fixed start, the same for
    /// every call), if the agent is under its cap and its rate.
    ///
    /// # Errors
    /// [`EgressRefusal::MaxConnections`] or [`EgressRefusal::Rate`].
    pub fn admit(&self, now: Duration) -> Result<EgressPermit, EgressRefusal> {
        self.clock.advance_to(now);
        let max = self.max.load(Ordering::Relaxed);
        self.active
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .map_err(|_| EgressRefusal::MaxConnections)?;
        let permit = EgressPermit(self.active.clone());
        self.rate
            .load()
            .1
            .check()
            .map_err(|_| EgressRefusal::Rate)?;
        self.admitted.fetch_add(1, Ordering::Relaxed);
        Ok(permit)
    }

    /// Open egress connections now.
    #[must_use]
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// Connections admitted so far.
    #[must_use]
    pub fn admitted(&self) -> u64 {
        self.admitted.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cidr::{CidrSet, parse_cidr};
    use crate::config::units::parse_rate;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn set(list: &[&str]) -> CidrSet {
        CidrSet::new(list.iter().map(|c| parse_cidr(c).unwrap()))
    }

    fn nobody(_: IpAddr) -> bool {
        false
    }

    #[test]
    fn the_always_refused_ranges() {
        for (text, class) in [
            ("0.0.0.0", "unspecified"),
            ("0.1.2.3", "unspecified"),
            ("127.0.0.1", "loopback"),
            ("127.255.0.9", "loopback"),
            ("10.0.0.1", "private"),
            ("172.16.0.1", "private"),
            ("172.31.255.255", "private"),
            ("192.168.1.1", "private"),
            ("100.64.0.1", "cgnat"),
            ("100.127.255.254", "cgnat"),
            ("169.254.169.254", "link-local"),
            ("224.0.0.1", "multicast"),
            ("239.255.255.250", "multicast"),
            ("240.0.0.1", "reserved"),
            ("255.255.255.255", "reserved"),
            ("192.0.0.8", "reserved"),
            ("::", "unspecified"),
            ("::1", "loopback"),
            ("::ffff:10.1.2.3", "private"),
            ("::ffff:169.254.169.254", "link-local"),
            ("::10.1.2.3", "reserved"),
            ("64:ff9b::a9fe:a9fe", "link-local"),
            ("64:ff9b::7f00:1", "loopback"),
            ("64:ff9b:1::1", "private"),
            ("2002:c0a8:0101::1", "private"),
            ("2002:7f00:0001::", "loopback"),
            ("100::1", "reserved"),
            ("fc00::1", "private"),
            ("fd12:3456::1", "private"),
            ("fe80::1", "link-local"),
            ("febf::1", "link-local"),
            ("fec0::1", "private"),
            ("ff02::1", "multicast"),
        ] {
            assert_eq!(special(ip(text)), Some(class), "{text}");
        }
        for public in [
            "1.1.1.1",
            "8.8.8.8",
            "172.15.255.255",
            "172.32.0.0",
            "100.63.255.255",
            "100.128.0.0",
            "169.253.255.255",
            "192.0.1.1",
            "203.0.113.10",
            "223.255.255.255",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
            "2002:0808:0808::1",
            "2001:db8::1",
            "2606:4700::1111",
        ] {
            assert_eq!(special(ip(public)), None, "{public}");
        }
    }

    #[test]
    fn deny_wins_then_private_ranges_own_addresses_allow_and_ports() {
        let mut policy = EgressPolicy {
            deny: set(&["203.0.113.66/32"]),
            ports: vec![7100..=7100, 26656..=26660],
            ..EgressPolicy::default()
        };
        let own = |ip: IpAddr| ip == "203.0.113.1".parse::<IpAddr>().unwrap();
        let decide = |policy: &EgressPolicy, text: &str, port| {
            check_destination(policy, ip(text), port, own)
        };
        assert_eq!(decide(&policy, "203.0.113.10", 7100), Ok(()));
        assert_eq!(decide(&policy, "203.0.113.10", 26658), Ok(()));
        assert_eq!(
            decide(&policy, "203.0.113.10", 22),
            Err(EgressRefusal::Port)
        );
        assert_eq!(
            decide(&policy, "203.0.113.66", 7100),
            Err(EgressRefusal::Denied)
        );
        assert_eq!(
            decide(&policy, "203.0.113.1", 7100),
            Err(EgressRefusal::OwnAddress)
        );
        assert_eq!(
            decide(&policy, "::ffff:203.0.113.1", 7100),
            Err(EgressRefusal::OwnAddress)
        );
        assert_eq!(
            decide(&policy, "169.254.169.254", 7100),
            Err(EgressRefusal::PrivateRange)
        );
        assert_eq!(
            decide(&policy, "10.1.2.3", 7100),
            Err(EgressRefusal::PrivateRange)
        );
        // allow_private lifts the range rule (and the own-address rule) for what it lists...
        policy.allow_private = set(&["10.1.0.0/16", "203.0.113.1/32"]);
        assert_eq!(decide(&policy, "10.1.2.3", 7100), Ok(()));
        assert_eq!(decide(&policy, "203.0.113.1", 7100), Ok(()));
        assert_eq!(
            decide(&policy, "10.2.0.1", 7100),
            Err(EgressRefusal::PrivateRange)
        );
        // ...but never deny, allow or ports.
        policy.deny = set(&["10.1.2.0/24"]);
        assert_eq!(
            decide(&policy, "10.1.2.3", 7100),
            Err(EgressRefusal::Denied)
        );
        policy.allow = set(&["198.51.100.0/24"]);
        assert_eq!(
            decide(&policy, "10.1.3.3", 7100),
            Err(EgressRefusal::NotAllowed)
        );
        assert_eq!(
            decide(&policy, "203.0.113.10", 7100),
            Err(EgressRefusal::NotAllowed)
        );
        assert_eq!(
            decide(&policy, "10.1.3.3", 22),
            Err(EgressRefusal::NotAllowed)
        );
    }

    #[test]
    fn the_gate_caps_open_connections_and_the_rate() {
        let gate = EgressGate::new(2, parse_rate("3/s").unwrap());
        let t = |ms| Duration::from_millis(ms);
        let a = gate.admit(t(0)).unwrap();
        let b = gate.admit(t(0)).unwrap();
        assert_eq!(gate.admit(t(0)).unwrap_err(), EgressRefusal::MaxConnections);
        drop(a);
        // The third of the second's three.
        let c = gate.admit(t(0)).unwrap();
        drop((b, c));
        assert_eq!(gate.admit(t(1)).unwrap_err(), EgressRefusal::Rate);
        // A refusal by rate holds no place.
        assert_eq!(gate.active(), 0);
        assert!(gate.admit(t(400)).is_ok());
        gate.set_limits(1, parse_rate("100/s").unwrap());
        let held = gate.admit(t(500)).unwrap();
        assert_eq!(
            gate.admit(t(600)).unwrap_err(),
            EgressRefusal::MaxConnections
        );
        drop(held);
        assert_eq!(gate.admitted(), 5);
    }

    proptest::proptest! {
        /// An IPv4 address and its IPv4-mapped IPv6 form get the same verdict.
        #[test]
        fn mapped_addresses_are_judged_as_ipv4(bits: u32, port: u16) {
            let v4 = Ipv4Addr::from(bits);
            let policy = EgressPolicy::default();
            proptest::prop_assert_eq!(
                check_destination(&policy, IpAddr::V4(v4), port, nobody),
                check_destination(&policy, IpAddr::V6(v4.to_ipv6_mapped()), port, nobody)
            );
            proptest::prop_assert_eq!(special(IpAddr::V4(v4)), special(IpAddr::V6(v4.to_ipv6_mapped())));
        }
    }
}

//! The validated types of the hidden validator's keys: egress on both sides (`[egress]` and
//! `[[agent]] egress` on the sentry, `[[egress]]` on the agent) and how the agent addresses
//! its connections to a service (`[[service]] source`).

use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;
use std::time::Duration;

use super::units;
use crate::cidr::CidrSet;

/// How the agent's connection to a service is addressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// From a loopback address derived from the client's, stable per client (the default for
    /// an IPv4 loopback target): the node tells relayed peers apart.
    Mapped,
    /// From the agent's own address, as the kernel picks it (the default otherwise).
    Agent,
}

impl Source {
    /// The name used in configs and logs.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Mapped => "mapped",
            Self::Agent => "agent",
        }
    }
}

/// Where an egress connection goes: an address, or a host name the sentry resolves (a
/// SOCKS5 client's `socks5h`, a `forward` to a seed's name), so the validator's host needs
/// no DNS of its own.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Destination {
    Addr(SocketAddr),
    /// A host name (letters, digits, '-' and '.', at most [`MAX_HOST_NAME`] bytes) and port.
    Name(String, u16),
}

/// Longest host name a destination may carry (DNS's limit).
pub const MAX_HOST_NAME: usize = 253;

impl Destination {
    /// `HOST:PORT` or `IP:PORT` text; a name is checked with [`check_host_name`].
    ///
    /// # Errors
    /// What is wrong with the text.
    pub fn parse(text: &str) -> Result<Self, String> {
        if let Ok(addr) = text.parse::<SocketAddr>() {
            return Ok(Self::Addr(addr));
        }
        let (host, port) = text
            .rsplit_once(':')
            .ok_or_else(|| format!("{text:?} is not HOST:PORT"))?;
        let port: u16 = port
            .parse()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("{text:?} has no valid port"))?;
        check_host_name(host)?;
        Ok(Self::Name(host.to_ascii_lowercase(), port))
    }

    /// The destination port.
    #[must_use]
    pub fn port(&self) -> u16 {
        match self {
            Self::Addr(addr) => addr.port(),
            Self::Name(_, port) => *port,
        }
    }
}

impl std::fmt::Display for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Addr(addr) => write!(f, "{addr}"),
            Self::Name(name, port) => write!(f, "{name}:{port}"),
        }
    }
}

/// A DNS host name: labels of 1 to 63 letters, digits and '-' (not at either end), joined by
/// dots, at most [`MAX_HOST_NAME`] bytes. Nothing else may travel to the sentry as a name.
///
/// # Errors
/// What is wrong with the name.
pub fn check_host_name(name: &str) -> Result<(), String> {
    let label_ok = |label: &str| {
        (1..=63).contains(&label.len())
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-')
    };
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() || name.len() > MAX_HOST_NAME || !name.split('.').all(label_ok) {
        return Err(format!(
            "invalid host name {name:?}: letters, digits, '-' and '.' only, at most \
             {MAX_HOST_NAME} bytes"
        ));
    }
    Ok(())
}

/// The sentry's `[egress]` policy: what it dials for an agent allowed egress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressPolicy {
    /// Destinations dialed (default: every address; the always-refused ranges still apply).
    pub allow: CidrSet,
    /// Destinations refused; deny wins over allow.
    pub deny: CidrSet,
    /// Exceptions to the always-refused ranges (loopback, private, CGNAT, link-local,
    /// multicast, unspecified, reserved, the sentry's own addresses).
    pub allow_private: CidrSet,
    /// Destination ports allowed; empty: every port.
    pub ports: Vec<RangeInclusive<u16>>,
    /// Open egress connections per agent.
    pub max_connections: usize,
    /// New egress connections per agent.
    pub connect_rate: units::Rate,
    /// The address outgoing connections are bound to (`source`); `None`: the kernel picks
    /// (the address of the route to the destination, the public one on a typical VM).
    pub source: Option<IpAddr>,
    /// An egress connection silent both ways this long is closed.
    pub idle_timeout: Duration,
}

/// Default of `[egress] max_connections` (per agent).
pub(crate) const DEFAULT_EGRESS_MAX_CONNECTIONS: usize = 1024;
/// Default of `[egress] connect_rate` (per agent): a node dialing its peers and seeds opens
/// a few connections a second at most.
pub(crate) const DEFAULT_EGRESS_CONNECT_RATE: units::Rate = units::Rate {
    count: std::num::NonZeroU32::new(50).expect("invariant: 50 is not zero"),
    per: Duration::from_secs(1),
};

impl Default for EgressPolicy {
    fn default() -> Self {
        Self {
            allow: super::everyone(),
            deny: CidrSet::default(),
            allow_private: CidrSet::default(),
            ports: Vec::new(),
            max_connections: DEFAULT_EGRESS_MAX_CONNECTIONS,
            connect_rate: DEFAULT_EGRESS_CONNECT_RATE,
            source: None,
            idle_timeout: super::DEFAULT_IDLE_TIMEOUT,
        }
    }
}

/// How an agent's `[[egress]]` listener learns where a connection goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EgressMode {
    /// Connections the host's firewall redirected here: the destination from
    /// `SO_ORIGINAL_DST`.
    Transparent,
    /// RFC 1928 SOCKS5 CONNECT, no authentication.
    Socks5,
    /// Every connection to one fixed destination (`to`).
    Forward(Destination),
}

impl EgressMode {
    /// The name used in configs, logs and metrics.
    #[must_use]
    pub const fn as_str(&self) -> &'static str {
        match self {
            Self::Transparent => "transparent",
            Self::Socks5 => "socks5",
            Self::Forward(_) => "forward",
        }
    }
}

/// One `[[egress]]` listener of the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressListener {
    /// A loopback address: never reachable from another host.
    pub listen: SocketAddr,
    pub mode: EgressMode,
    /// Connections through this listener at once.
    pub max_connections: usize,
}

/// Default of `[[egress]] max_connections`.
pub(crate) const DEFAULT_EGRESS_LISTENER_MAX_CONNECTIONS: usize = 1024;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destinations_parse_addresses_and_names_and_refuse_the_rest() {
        assert_eq!(
            Destination::parse("203.0.113.9:26656"),
            Ok(Destination::Addr("203.0.113.9:26656".parse().unwrap()))
        );
        assert_eq!(
            Destination::parse("[2001:db8::1]:30303"),
            Ok(Destination::Addr("[2001:db8::1]:30303".parse().unwrap()))
        );
        assert_eq!(
            Destination::parse("Seed-1.Example.org:7100"),
            Ok(Destination::Name("seed-1.example.org".into(), 7100))
        );
        for bad in [
            "seed.example.org",
            "seed.example.org:0",
            "seed.example.org:99999",
            ":7100",
            "-seed.example.org:7100",
            "seed..example.org:7100",
            "seed_1.example.org:7100",
            "seed example.org:7100",
            "seed.example.org\n:7100",
        ] {
            assert!(Destination::parse(bad).is_err(), "{bad:?}");
        }
        let long = format!("{}.org:1", "a".repeat(250));
        assert!(Destination::parse(&long).is_err());
    }
}

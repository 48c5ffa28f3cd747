//! Human-written values in config files: durations (`30s`, `15m`, `1h30m`), names, addresses
//! and keys. Each has a `Deserialize` impl whose error says what was expected, so the config
//! loader reports it at the value's line and column under its key path.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};

use crate::keys::PublicKey;

/// Longest accepted name (routes, agents, services). Names travel in the relay header.
pub(crate) const MAX_NAME_LEN: usize = 64;

/// Parse a duration such as `500ms`, `30s`, `15m`, `2h`, `1d` or `1h30m`.
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    let expected = || {
        format!(
            "invalid duration {text:?}: expected a number and a unit (ms, s, m, h, d), \
             such as \"30s\", \"15m\" or \"1h30m\""
        )
    };
    let mut rest = text.trim();
    if rest.is_empty() {
        return Err(expected());
    }
    let mut total = Duration::ZERO;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(expected());
        }
        let number: u64 = rest[..digits].parse().map_err(|_| expected())?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = match &rest[..unit_len] {
            "ms" => Duration::from_millis(1),
            "s" => Duration::from_secs(1),
            "m" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            "d" => Duration::from_secs(86_400),
            _ => return Err(expected()),
        };
        rest = &rest[unit_len..];
        let part = u32::try_from(number)
            .ok()
            .and_then(|n| unit.checked_mul(n))
            .ok_or_else(|| format!("duration {text:?} is too large"))?;
        total = total
            .checked_add(part)
            .ok_or_else(|| format!("duration {text:?} is too large"))?;
    }
    Ok(total)
}

/// Check a route, agent or service name: 1 to 64 of `A-Z a-z 0-9 - _ .`.
pub(crate) fn check_name(text: &str) -> Result<(), String> {
    let ok = !text.is_empty()
        && text.len() <= MAX_NAME_LEN
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid name {text:?}: use 1 to {MAX_NAME_LEN} letters, digits, '-', '_' or '.'"
        ))
    }
}

macro_rules! string_value {
    ($(#[$doc:meta])* $name:ident($inner:ty), $expecting:literal, $parse:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq)]
        pub struct $name(pub $inner);

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                struct V;
                impl Visitor<'_> for V {
                    type Value = $name;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str($expecting)
                    }
                    fn visit_str<E: de::Error>(self, text: &str) -> Result<$name, E> {
                        let parse: fn(&str) -> Result<$inner, String> = $parse;
                        parse(text).map($name).map_err(E::custom)
                    }
                }
                deserializer.deserialize_str(V)
            }
        }
    };
}

string_value!(
    /// A duration written as text.
    HumanDuration(Duration),
    "a duration such as \"30s\" or \"15m\"",
    parse_duration
);

string_value!(
    /// A name that may travel in the relay header.
    Name(String),
    "a name (letters, digits, '-', '_', '.')",
    |text| check_name(text).map(|()| text.to_owned())
);

string_value!(
    /// An `IP:PORT` socket address.
    Addr(SocketAddr),
    "an address such as \"0.0.0.0:7100\" or \"[::]:7100\"",
    |text| {
        text.parse().map_err(|_| {
            format!(
                "invalid address {text:?}: expected IP:PORT such as \"0.0.0.0:7100\", \
                 \"127.0.0.1:9000\" or \"[::]:7100\""
            )
        })
    }
);

string_value!(
    /// A `HOST:PORT` the agent dials (a name is resolved at each connection attempt).
    HostPort(String),
    "HOST:PORT such as \"sentry-a.example.org:4433\"",
    |text| {
        let valid_port = text
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0));
        if valid_port {
            Ok(text.to_owned())
        } else {
            Err(format!(
                "invalid address {text:?}: expected HOST:PORT such as \
                 \"sentry-a.example.org:4433\" or \"203.0.113.1:4433\""
            ))
        }
    }
);

string_value!(
    /// A pinned public key.
    Key(PublicKey),
    "a public key (base64, as printed by `sentry keygen`)",
    |text| {
        PublicKey::from_base64(text).ok_or_else(|| {
            "invalid public key: expected the 44-character base64 line printed by \
             `sentry keygen` or `sentry pubkey`"
                .to_owned()
        })
    }
);

impl AsRef<str> for Name {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for HostPort {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        for (text, want) in [
            ("1MiB", 1 << 20),
            ("512KiB", 512 << 10),
            ("2GiB", 2 << 30),
            ("4096B", 4096),
            ("100", 100),
            ("0", 0),
        ] {
            assert_eq!(parse_size(text), Ok(want), "{text}");
        }
        for bad in [
            "",
            "MiB",
            "1MB",
            "1.5MiB",
            "-1",
            "1 TiB",
            "99999999999999999999GiB",
        ] {
            assert!(parse_size(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn durations() {
        let ok = [
            ("500ms", Duration::from_millis(500)),
            ("30s", Duration::from_secs(30)),
            ("15m", Duration::from_secs(900)),
            ("2h", Duration::from_secs(7200)),
            ("1d", Duration::from_secs(86_400)),
            ("1h30m", Duration::from_secs(5400)),
            ("0s", Duration::ZERO),
        ];
        for (text, want) in ok {
            assert_eq!(parse_duration(text), Ok(want), "{text}");
        }
        for bad in [
            "",
            "30",
            "s",
            "1.5s",
            "-1s",
            "30 s",
            "10y",
            "1m1",
            "99999999999999999999s",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn names() {
        for good in ["p2p", "validator-1", "rpc_v3", "a.b", &"x".repeat(64)] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        for bad in ["", "a b", "a/b", "é", &"x".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }
}

string_value!(
    /// A CIDR block, IPv4 or IPv6 (`203.0.113.0/24`, `2001:db8::/32`), as written (host bits
    /// and all: the config warns about them, see `Checker::cidrs`); a bare address is a single
    /// host.
    Cidr(ipnet::IpNet),
    "a CIDR such as \"203.0.113.0/24\" or \"2001:db8::/32\"",
    crate::cidr::parse_cidr_as_written
);

/// Events per interval, written `N/s` or `N/m`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub count: std::num::NonZeroU32,
    pub per: Duration,
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = if self.per == Duration::from_secs(60) {
            "m"
        } else {
            "s"
        };
        write!(f, "{}/{unit}", self.count)
    }
}

/// Parse `N/s` or `N/m` (also `N/sec`, `N/min`), N from 1 to 1 000 000.
pub fn parse_rate(text: &str) -> Result<Rate, String> {
    let bad = || {
        format!(
            "invalid rate {text:?}: expected a count per second or minute, such as \"20/s\" or \"600/m\""
        )
    };
    let (count, unit) = text.trim().split_once('/').ok_or_else(bad)?;
    let count: u32 = count.trim().parse().map_err(|_| bad())?;
    let per = match unit.trim() {
        "s" | "sec" => Duration::from_secs(1),
        "m" | "min" => Duration::from_secs(60),
        _ => return Err(bad()),
    };
    if count > 1_000_000 {
        return Err(format!(
            "invalid rate {text:?}: at most 1000000 per interval"
        ));
    }
    let count = std::num::NonZeroU32::new(count).ok_or_else(|| {
        format!("invalid rate {text:?}: a rate of 0 admits nothing; remove the key for the default")
    })?;
    Ok(Rate { count, per })
}

/// Parse a size in bytes: `1MiB`, `512KiB`, `1GiB`, `4096B` or a plain number of bytes.
/// Binary units only, so `1MiB` means what the operator of a node's config means by it.
pub(crate) fn parse_size(text: &str) -> Result<u64, String> {
    let bad = || {
        format!(
            "invalid size {text:?}: expected a number of bytes with a unit (B, KiB, MiB, GiB), \
             such as \"1MiB\" or \"512KiB\""
        )
    };
    let text = text.trim();
    let digits = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let number: u64 = text[..digits].parse().map_err(|_| bad())?;
    let unit: u64 = match text[digits..].trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        _ => return Err(bad()),
    };
    number
        .checked_mul(unit)
        .ok_or_else(|| format!("size {text:?} is too large"))
}

string_value!(
    /// A size written as text.
    HumanSize(u64),
    "a size such as \"1MiB\" or \"512KiB\"",
    parse_size
);

/// `wireguard_window`: `"auto"`, or a size.
pub(crate) fn parse_window(text: &str) -> Result<Window, String> {
    if text.trim() == "auto" {
        return Ok(Window::Auto);
    }
    let bytes = parse_size(text).map_err(|e| format!("{e}, or \"auto\""))?;
    Ok(Window::Fixed(usize::try_from(bytes).unwrap_or(usize::MAX)))
}

string_value!(
    /// A WireGuard stream window: sized for the round trip, or fixed.
    HumanWindow(Window),
    "\"auto\" or a size such as \"4MiB\"",
    parse_window
);

string_value!(
    /// A rate written as text.
    HumanRate(Rate),
    "a rate such as \"20/s\" or \"600/m\"",
    parse_rate
);

/// Smallest and largest window a peer may be given.
pub const MIN_WINDOW: usize = 64 * 1024;
pub const MAX_WINDOW: usize = 16 * 1024 * 1024;

/// How large a peer's streams' buffers are (`wireguard_window`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    /// Sized by the WireGuard transport for the peer's measured round trip, from 512 KiB to
    /// [`MAX_WINDOW`], within a budget per peer.
    Auto,
    /// This many bytes each way ([`MIN_WINDOW`] to [`MAX_WINDOW`]).
    Fixed(usize),
}

//! The PROXY protocol header the agent writes to a service before any payload, so a node that
//! asks for it (`proxy_protocol = "v1" | "v2"` on the route) sees the real client's address
//! instead of the agent's. Encoding is done by `ppp`; this module only decides what to say.

use std::net::{IpAddr, SocketAddr};

use ppp::v2::{Builder, Command, Protocol, Version};

pub use crate::config::ProxyVersion;

/// What a relayed connection's PROXY header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Proxy {
    pub version: ProxyVersion,
    /// The sentry's address the client connected to (the route's listener as seen by the
    /// client), the header's destination.
    pub destination: SocketAddr,
}

/// The bytes of a PROXY header from `source` (the real client) to `destination`.
///
/// IPv4-mapped IPv6 addresses (a dual-stack listener) are written as IPv4; when the two
/// addresses are still of different families, the IPv4 one is written IPv4-mapped, so the
/// header is always a complete TCP4 or TCP6 header and never `UNKNOWN`.
#[must_use]
pub fn encode(version: ProxyVersion, source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let (source, destination) = same_family(canonical(source), canonical(destination));
    match version {
        ProxyVersion::V1 => ppp::v1::Addresses::from((source, destination))
            .to_string()
            .into_bytes(),
        ProxyVersion::V2 => Builder::with_addresses(
            Version::Two | Command::Proxy,
            Protocol::Stream,
            (source, destination),
        )
        .build()
        .expect("invariant: an address block without TLVs is far below 64 KiB"),
    }
}

fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

fn same_family(a: SocketAddr, b: SocketAddr) -> (SocketAddr, SocketAddr) {
    let v6 = |addr: SocketAddr| match addr.ip() {
        IpAddr::V4(ip) => SocketAddr::new(IpAddr::V6(ip.to_ipv6_mapped()), addr.port()),
        IpAddr::V6(_) => addr,
    };
    if a.is_ipv4() == b.is_ipv4() {
        (a, b)
    } else {
        (v6(a), v6(b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn v1_text() {
        let bytes = encode(
            ProxyVersion::V1,
            addr("203.0.113.10:40000"),
            addr("203.0.113.1:7100"),
        );
        assert_eq!(bytes, b"PROXY TCP4 203.0.113.10 203.0.113.1 40000 7100\r\n");
        let bytes = encode(
            ProxyVersion::V1,
            addr("[2001:db8::10]:40000"),
            addr("[2001:db8::1]:7100"),
        );
        assert_eq!(bytes, b"PROXY TCP6 2001:db8::10 2001:db8::1 40000 7100\r\n");
    }

    #[test]
    fn v2_bytes() {
        let bytes = encode(
            ProxyVersion::V2,
            addr("203.0.113.10:40000"),
            addr("203.0.113.1:7100"),
        );
        let mut want = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
        want.extend_from_slice(&[0x21, 0x11, 0, 12]);
        want.extend_from_slice(&[203, 0, 113, 10, 203, 0, 113, 1, 0x9c, 0x40, 0x1b, 0xbc]);
        assert_eq!(bytes, want);
    }

    #[test]
    fn mapped_and_mixed_families() {
        // A dual-stack listener sees IPv4 clients as mapped addresses: written as TCP4.
        let bytes = encode(
            ProxyVersion::V1,
            addr("[::ffff:203.0.113.10]:40000"),
            addr("[::ffff:203.0.113.1]:7100"),
        );
        assert_eq!(bytes, b"PROXY TCP4 203.0.113.10 203.0.113.1 40000 7100\r\n");
        // Mixed families: both as IPv6, never UNKNOWN.
        let bytes = encode(
            ProxyVersion::V1,
            addr("[::ffff:203.0.113.10]:40000"),
            addr("[2001:db8::1]:7100"),
        );
        assert_eq!(
            bytes,
            b"PROXY TCP6 ::ffff:203.0.113.10 2001:db8::1 40000 7100\r\n"
        );
    }

    proptest! {
        /// Whatever the addresses, both versions parse back (by an independent parser path)
        /// to the same client address, and v1 stays within the spec's 107 bytes.
        #[test]
        fn parses_back(src in any::<SocketAddr>(), dst in any::<SocketAddr>()) {
            let want = canonical(src);
            let v1 = encode(ProxyVersion::V1, src, dst);
            prop_assert!(v1.len() <= 107);
            let text = std::str::from_utf8(&v1).unwrap();
            let parsed: ppp::v1::Addresses = text.parse().unwrap();
            let got = match parsed {
                ppp::v1::Addresses::Tcp4(a) => SocketAddr::new(a.source_address.into(), a.source_port),
                ppp::v1::Addresses::Tcp6(a) => SocketAddr::new(a.source_address.into(), a.source_port),
                ppp::v1::Addresses::Unknown => panic!("UNKNOWN written"),
            };
            prop_assert_eq!(canonical(got), want);

            let v2 = encode(ProxyVersion::V2, src, dst);
            let header = ppp::v2::Header::try_from(&v2[..]).unwrap();
            let got = match header.addresses {
                ppp::v2::Addresses::IPv4(a) => SocketAddr::new(a.source_address.into(), a.source_port),
                ppp::v2::Addresses::IPv6(a) => SocketAddr::new(a.source_address.into(), a.source_port),
                other => panic!("unexpected addresses {other:?}"),
            };
            prop_assert_eq!(canonical(got), want);
            prop_assert_eq!(header.len(), v2.len());
        }
    }
}

//! The relay header codec: pure, bounded, versioned.
//!
//! Wire form (all integers big-endian):
//!
//! ```text
//! version:u8 (=1)  body_len:u8  body[body_len]
//! body = flags:u8  route_len:u8 route  service_len:u8 service  client:addr
//!        [destination:addr]          (present when flags ask for a PROXY header)
//! addr = family:u8 (4|6)  ip[4|16]  port:u16
//! flags: bits 0-1 = PROXY header the agent writes to the service first
//!        (0 none, 1 v1, 2 v2); bit 2 = a UDP flow (no PROXY header), whose
//!        datagrams follow framed as `len:u16 payload[len]`; every other value is
//!        refused
//! ```
//!
//! The length prefix lets a reader take exactly one header off a stream without reading into
//! the payload, and bounds it: no header is longer than [`MAX_HEADER_LEN`]. Names are checked
//! with the same rule as config names, so a hostile sentry cannot smuggle odd bytes into the
//! agent's logs. Unknown versions and flags are refused, not guessed at.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tokio::io::{AsyncRead, AsyncReadExt};

use super::proxy::{Proxy, ProxyVersion};
use crate::config::units::check_name;

/// The header version this build writes and reads.
pub const VERSION: u8 = 1;
/// Upper bound of an encoded header (2 prefix bytes plus a body of at most 255).
pub const MAX_HEADER_LEN: usize = 2 + u8::MAX as usize;

/// What the sentry tells the agent about a relayed connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// The sentry route the client came in on (for the agent's logs).
    pub route: String,
    /// The agent service to connect to.
    pub service: String,
    /// The public client's address as the sentry saw it.
    pub client: SocketAddr,
    /// Whether the agent writes a PROXY header to the service before any payload.
    pub proxy: Option<Proxy>,
    /// A UDP flow to a `udp` service rather than a TCP connection (never with `proxy`).
    pub udp: bool,
}

/// Flag values of the PROXY version (bits 0-1).
const FLAG_PROXY_V1: u8 = 0x01;
const FLAG_PROXY_V2: u8 = 0x02;
const FLAG_UDP: u8 = 0x04;

/// The agent's one-byte answer to a header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    /// Connected to the service; payload follows.
    Ok = 0,
    /// The agent exports no service of that name.
    UnknownService = 1,
    /// The service refused the connection (nothing listening).
    ConnectRefused = 2,
    /// The service could not be reached in time, or another local error.
    ConnectFailed = 3,
    /// The header was malformed or of an unknown version.
    BadHeader = 4,
    /// The agent is shutting down and takes no new connections; try another upstream.
    ShuttingDown = 5,
    /// The service is at its `max_connections` (or the sentry at the agent's
    /// `max_streams_per_sentry`); try another upstream. The service itself is fine.
    Busy = 6,
}

/// Why a header could not be decoded or encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("unsupported relay header version {0}")]
    Version(u8),
    #[error("relay header truncated")]
    Truncated,
    #[error("relay header has {0} trailing bytes")]
    Trailing(usize),
    #[error("relay header has unknown flags {0:#04x}")]
    Flags(u8),
    #[error("relay header has an invalid name")]
    Name,
    #[error("relay header has unknown address family {0}")]
    Family(u8),
    #[error("relay header too long")]
    TooLong,
    #[error("reading the relay header: {0}")]
    Io(std::io::ErrorKind),
}

impl Header {
    /// The wire form. Fails only for names that config validation would have refused.
    pub fn encode(&self) -> Result<Vec<u8>, HeaderError> {
        let mut out = Vec::with_capacity(64);
        let flags = match (self.proxy.map(|p| p.version), self.udp) {
            (None, false) => 0,
            (None, true) => FLAG_UDP,
            (Some(ProxyVersion::V1), false) => FLAG_PROXY_V1,
            (Some(ProxyVersion::V2), false) => FLAG_PROXY_V2,
            (Some(_), true) => return Err(HeaderError::Flags(FLAG_UDP)),
        };
        out.extend_from_slice(&[VERSION, 0, flags]);
        for name in [&self.route, &self.service] {
            check_name(name).map_err(|_| HeaderError::Name)?;
            out.push(u8::try_from(name.len()).map_err(|_| HeaderError::Name)?);
            out.extend_from_slice(name.as_bytes());
        }
        put_addr(&mut out, self.client);
        if let Some(proxy) = self.proxy {
            put_addr(&mut out, proxy.destination);
        }
        out[1] = u8::try_from(out.len() - 2).map_err(|_| HeaderError::TooLong)?;
        Ok(out)
    }

    /// Decode one complete header; `bytes` must hold exactly one.
    pub fn decode(bytes: &[u8]) -> Result<Self, HeaderError> {
        let (&[version, len], body) = split(bytes, 2)? else {
            unreachable!("split returned 2 bytes")
        };
        if version != VERSION {
            return Err(HeaderError::Version(version));
        }
        match body.len().cmp(&usize::from(len)) {
            std::cmp::Ordering::Less => Err(HeaderError::Truncated),
            std::cmp::Ordering::Greater => {
                Err(HeaderError::Trailing(body.len() - usize::from(len)))
            }
            std::cmp::Ordering::Equal => Self::decode_body(body),
        }
    }

    fn decode_body(body: &[u8]) -> Result<Self, HeaderError> {
        let (&[flags], rest) = split(body, 1)? else {
            unreachable!()
        };
        let (version, udp) = match flags {
            0 => (None, false),
            FLAG_UDP => (None, true),
            FLAG_PROXY_V1 => (Some(ProxyVersion::V1), false),
            FLAG_PROXY_V2 => (Some(ProxyVersion::V2), false),
            other => return Err(HeaderError::Flags(other)),
        };
        let (route, rest) = name(rest)?;
        let (service, rest) = name(rest)?;
        let (client, mut rest) = addr(rest)?;
        let proxy = match version {
            None => None,
            Some(version) => {
                let (destination, after) = addr(rest)?;
                rest = after;
                Some(Proxy {
                    version,
                    destination,
                })
            }
        };
        if !rest.is_empty() {
            return Err(HeaderError::Trailing(rest.len()));
        }
        Ok(Self {
            route,
            service,
            client,
            proxy,
            udp,
        })
    }

    /// Read exactly one header from a stream (at most [`MAX_HEADER_LEN`] bytes).
    ///
    /// Not cancel-safe: a cancelled read leaves the stream mid-header.
    pub(crate) async fn read_from<R: AsyncRead + Unpin>(
        reader: &mut R,
    ) -> Result<Self, HeaderError> {
        let mut buf = [0u8; MAX_HEADER_LEN];
        let io = |e: std::io::Error| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => HeaderError::Truncated,
            kind => HeaderError::Io(kind),
        };
        reader.read_exact(&mut buf[..2]).await.map_err(io)?;
        if buf[0] != VERSION {
            return Err(HeaderError::Version(buf[0]));
        }
        let end = 2 + usize::from(buf[1]);
        reader.read_exact(&mut buf[2..end]).await.map_err(io)?;
        Self::decode(&buf[..end])
    }
}

impl Status {
    /// Every status, in byte order.
    pub const ALL: [Self; 7] = [
        Self::Ok,
        Self::UnknownService,
        Self::ConnectRefused,
        Self::ConnectFailed,
        Self::BadHeader,
        Self::ShuttingDown,
        Self::Busy,
    ];

    /// The status a byte stands for; `None` for bytes this version does not know.
    #[must_use]
    pub fn from_byte(byte: u8) -> Option<Self> {
        Some(match byte {
            0 => Self::Ok,
            1 => Self::UnknownService,
            2 => Self::ConnectRefused,
            3 => Self::ConnectFailed,
            4 => Self::BadHeader,
            5 => Self::ShuttingDown,
            6 => Self::Busy,
            _ => return None,
        })
    }

    /// The status's name in logs and metrics.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::UnknownService => "unknown_service",
            Self::ConnectRefused => "connect_refused",
            Self::ConnectFailed => "connect_failed",
            Self::BadHeader => "bad_header",
            Self::ShuttingDown => "shutting_down",
            Self::Busy => "busy",
        }
    }
}

fn split(bytes: &[u8], n: usize) -> Result<(&[u8], &[u8]), HeaderError> {
    if bytes.len() < n {
        Err(HeaderError::Truncated)
    } else {
        Ok(bytes.split_at(n))
    }
}

fn put_addr(out: &mut Vec<u8>, addr: SocketAddr) {
    match addr.ip() {
        IpAddr::V4(ip) => {
            out.push(4);
            out.extend_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            out.push(6);
            out.extend_from_slice(&ip.octets());
        }
    }
    out.extend_from_slice(&addr.port().to_be_bytes());
}

fn addr(bytes: &[u8]) -> Result<(SocketAddr, &[u8]), HeaderError> {
    let (&[family], rest) = split(bytes, 1)? else {
        unreachable!()
    };
    let (ip, rest) = match family {
        4 => {
            let (ip, rest) = split(rest, 4)?;
            let ip: [u8; 4] = ip.try_into().map_err(|_| HeaderError::Truncated)?;
            (IpAddr::V4(Ipv4Addr::from(ip)), rest)
        }
        6 => {
            let (ip, rest) = split(rest, 16)?;
            let ip: [u8; 16] = ip.try_into().map_err(|_| HeaderError::Truncated)?;
            (IpAddr::V6(Ipv6Addr::from(ip)), rest)
        }
        other => return Err(HeaderError::Family(other)),
    };
    let (&[hi, lo], rest) = split(rest, 2)? else {
        unreachable!()
    };
    Ok((SocketAddr::new(ip, u16::from_be_bytes([hi, lo])), rest))
}

fn name(bytes: &[u8]) -> Result<(String, &[u8]), HeaderError> {
    let (&[len], rest) = split(bytes, 1)? else {
        unreachable!()
    };
    let (raw, rest) = split(rest, usize::from(len))?;
    let text = std::str::from_utf8(raw).map_err(|_| HeaderError::Name)?;
    check_name(text).map_err(|_| HeaderError::Name)?;
    Ok((text.to_owned(), rest))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Header {
        Header {
            route: "p2p".into(),
            service: "validator-p2p".into(),
            client: "203.0.113.10:40000".parse().unwrap(),
            proxy: None,
            udp: false,
        }
    }

    #[test]
    fn carries_a_udp_flow_and_refuses_udp_with_proxy() {
        let h = Header {
            udp: true,
            ..sample()
        };
        let bytes = h.encode().unwrap();
        assert_eq!(bytes[2], 0x04);
        assert_eq!(Header::decode(&bytes).unwrap(), h);
        let mut both = bytes.clone();
        both[2] = 0x05;
        assert_eq!(Header::decode(&both), Err(HeaderError::Flags(0x05)));
        let proxied = Header {
            proxy: Some(Proxy {
                version: ProxyVersion::V2,
                destination: "203.0.113.1:7100".parse().unwrap(),
            }),
            ..h
        };
        assert!(proxied.encode().is_err());
    }

    #[test]
    fn carries_the_proxy_request() {
        for (version, flag) in [(ProxyVersion::V1, 1), (ProxyVersion::V2, 2)] {
            let mut h = sample();
            h.proxy = Some(Proxy {
                version,
                destination: "[2001:db8::1]:7100".parse().unwrap(),
            });
            let bytes = h.encode().unwrap();
            assert_eq!(bytes[2], flag);
            assert_eq!(&bytes[bytes.len() - 19..bytes.len() - 18], &[6]);
            assert_eq!(Header::decode(&bytes).unwrap(), h);
            // The flag without the destination is refused, not guessed at.
            let mut cut = bytes[..bytes.len() - 19].to_vec();
            cut[1] -= 19;
            assert_eq!(Header::decode(&cut), Err(HeaderError::Truncated));
        }
        let mut both = sample().encode().unwrap();
        both[2] = 3;
        assert_eq!(Header::decode(&both), Err(HeaderError::Flags(3)));
    }

    #[test]
    fn known_bytes() {
        let bytes = sample().encode().unwrap();
        let mut want = vec![1, 0, 0, 3, b'p', b'2', b'p', 13];
        want.extend_from_slice(b"validator-p2p");
        want.extend_from_slice(&[4, 203, 0, 113, 10, 0x9c, 0x40]);
        want[1] = u8::try_from(want.len() - 2).unwrap();
        assert_eq!(bytes, want);
        assert_eq!(Header::decode(&bytes).unwrap(), sample());
    }

    #[test]
    fn rejects_malformed() {
        let good = sample().encode().unwrap();
        let mut version = good.clone();
        version[0] = 2;
        assert_eq!(Header::decode(&version), Err(HeaderError::Version(2)));
        assert_eq!(
            Header::decode(&good[..good.len() - 1]),
            Err(HeaderError::Truncated)
        );
        let mut long = good.clone();
        long.push(0);
        assert_eq!(Header::decode(&long), Err(HeaderError::Trailing(1)));
        let mut flags = good.clone();
        flags[2] = 0x80;
        assert_eq!(Header::decode(&flags), Err(HeaderError::Flags(0x80)));
        let mut name = good.clone();
        name[4] = b'/';
        assert_eq!(Header::decode(&name), Err(HeaderError::Name));
        let mut family = good.clone();
        let at = good.len() - 7;
        family[at] = 5;
        assert_eq!(Header::decode(&family), Err(HeaderError::Family(5)));
        // A body length that claims more than the names and address use.
        let mut padded = good.clone();
        padded.push(0);
        padded[1] += 1;
        assert_eq!(Header::decode(&padded), Err(HeaderError::Trailing(1)));
        assert_eq!(Header::decode(&[]), Err(HeaderError::Truncated));
        assert_eq!(Header::decode(&[1]), Err(HeaderError::Truncated));
    }

    #[test]
    fn encode_refuses_bad_names() {
        let mut h = sample();
        h.service = "a b".into();
        assert_eq!(h.encode(), Err(HeaderError::Name));
    }

    #[tokio::test]
    async fn reads_exactly_one_header_from_a_stream() {
        let mut bytes = sample().encode().unwrap();
        bytes.extend_from_slice(b"payload");
        let mut reader = &bytes[..];
        assert_eq!(Header::read_from(&mut reader).await.unwrap(), sample());
        assert_eq!(reader, b"payload");
        let mut short = &bytes[..5];
        assert_eq!(
            Header::read_from(&mut short).await,
            Err(HeaderError::Truncated)
        );
    }

    #[test]
    fn status_bytes() {
        for s in Status::ALL {
            assert_eq!(Status::from_byte(s as u8), Some(s));
        }
        assert_eq!(Status::from_byte(7), None);
    }

    fn name_strategy() -> impl Strategy<Value = String> {
        "[A-Za-z0-9._-]{1,64}"
    }

    /// Addresses as the header carries them: no IPv6 scope or flow label.
    fn addr_strategy() -> impl Strategy<Value = SocketAddr> {
        (any::<IpAddr>(), any::<u16>()).prop_map(|(ip, port)| SocketAddr::new(ip, port))
    }

    proptest! {
        #[test]
        fn round_trip(route in name_strategy(), service in name_strategy(), client in addr_strategy(), proxy in proptest::option::of((any::<bool>(), addr_strategy())), udp in any::<bool>()) {
            let proxy = proxy.map(|(v1, destination)| Proxy {
                version: if v1 { ProxyVersion::V1 } else { ProxyVersion::V2 },
                destination,
            });
            let udp = udp && proxy.is_none();
            let h = Header { route, service, client, proxy, udp };
            let bytes = h.encode().unwrap();
            prop_assert!(bytes.len() <= MAX_HEADER_LEN);
            prop_assert_eq!(Header::decode(&bytes).unwrap(), h);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = Header::decode(&bytes);
        }
    }
}

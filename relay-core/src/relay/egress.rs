//! The egress request: what an agent asks of a sentry on a stream it opens, so that its
//! node's outbound connection leaves from the sentry. Pure, bounded, versioned, in the same
//! framing as the relay [`Header`](super::Header).
//!
//! Wire form (all integers big-endian):
//!
//! ```text
//! version:u8 (=1)  body_len:u8  body[body_len]
//! body = flags:u8 (= 0x08, egress)  destination
//! destination = 4 ip[4] port:u16 | 6 ip[16] port:u16 | 3 len:u8 name[len] port:u16
//! ```
//!
//! A name (family 3, as in SOCKS5) is a DNS host name the sentry resolves, so the validator's
//! host needs no DNS of its own; it is checked with
//! [`check_host_name`] both ways. The sentry answers with one
//! [`EgressStatus`] byte before any payload. Streams an agent opens carry egress requests
//! only: the sentry never reads a relay header from them.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tokio::io::{AsyncRead, AsyncReadExt};

use super::header::{HeaderError, MAX_HEADER_LEN, VERSION};
use crate::config::{Destination, check_host_name};

/// The flag byte of an egress request.
const FLAG_EGRESS: u8 = 0x08;
/// Address families of a destination.
const FAMILY_V4: u8 = 4;
const FAMILY_V6: u8 = 6;
const FAMILY_NAME: u8 = 3;

/// An agent's request for an outbound connection from the sentry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressRequest {
    pub destination: Destination,
}

/// The sentry's one-byte answer to an egress request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum EgressStatus {
    /// Connected to the destination; payload follows.
    Ok = 0,
    /// This agent may not use egress on this sentry (`egress = true` is not set).
    NotAllowed = 1,
    /// The sentry's `[egress]` policy refuses the destination (a private range, its own
    /// address, `deny`, `allow`, `ports`).
    Refused = 2,
    /// The agent is at its `max_connections` or `connect_rate` on this sentry.
    Busy = 3,
    /// The destination refused the connection (nothing listening).
    ConnectRefused = 4,
    /// The destination could not be reached in time, or its name did not resolve.
    ConnectFailed = 5,
    /// The request was malformed.
    BadRequest = 6,
    /// The sentry is shutting down; try another.
    ShuttingDown = 7,
}

impl EgressStatus {
    /// Every status, in byte order.
    pub const ALL: [Self; 8] = [
        Self::Ok,
        Self::NotAllowed,
        Self::Refused,
        Self::Busy,
        Self::ConnectRefused,
        Self::ConnectFailed,
        Self::BadRequest,
        Self::ShuttingDown,
    ];

    /// The status a byte stands for; `None` for bytes this version does not know.
    #[must_use]
    pub fn from_byte(byte: u8) -> Option<Self> {
        Self::ALL.get(usize::from(byte)).copied()
    }

    /// The status's name in logs and metrics.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::NotAllowed => "not_allowed",
            Self::Refused => "refused",
            Self::Busy => "busy",
            Self::ConnectRefused => "connect_refused",
            Self::ConnectFailed => "connect_failed",
            Self::BadRequest => "bad_request",
            Self::ShuttingDown => "shutting_down",
        }
    }

    /// Whether another sentry may answer differently: its own policy, its own load, or it is
    /// not shutting down. A destination that refused or could not be reached is not tried
    /// again through the next sentry (one dead peer must not cost a dial per sentry).
    #[must_use]
    pub const fn try_next(self) -> bool {
        matches!(
            self,
            Self::NotAllowed | Self::Refused | Self::Busy | Self::ShuttingDown
        )
    }
}

impl EgressRequest {
    /// The wire form.
    ///
    /// # Errors
    /// A host name that [`check_host_name`] refuses.
    pub fn encode(&self) -> Result<Vec<u8>, HeaderError> {
        let mut out = Vec::with_capacity(32);
        out.extend_from_slice(&[VERSION, 0, FLAG_EGRESS]);
        match &self.destination {
            Destination::Addr(addr) => {
                match addr.ip() {
                    IpAddr::V4(ip) => {
                        out.push(FAMILY_V4);
                        out.extend_from_slice(&ip.octets());
                    }
                    IpAddr::V6(ip) => {
                        out.push(FAMILY_V6);
                        out.extend_from_slice(&ip.octets());
                    }
                }
                out.extend_from_slice(&addr.port().to_be_bytes());
            }
            Destination::Name(name, port) => {
                check_host_name(name).map_err(|_| HeaderError::Name)?;
                out.push(FAMILY_NAME);
                out.push(u8::try_from(name.len()).map_err(|_| HeaderError::Name)?);
                out.extend_from_slice(name.as_bytes());
                out.extend_from_slice(&port.to_be_bytes());
            }
        }
        out[1] = u8::try_from(out.len() - 2).map_err(|_| HeaderError::TooLong)?;
        Ok(out)
    }

    /// Decode one complete request; `bytes` must hold exactly one.
    ///
    /// # Errors
    /// Why the bytes are not one valid request.
    pub fn decode(bytes: &[u8]) -> Result<Self, HeaderError> {
        let [version, len, body @ ..] = bytes else {
            return Err(HeaderError::Truncated);
        };
        if *version != VERSION {
            return Err(HeaderError::Version(*version));
        }
        match body.len().cmp(&usize::from(*len)) {
            std::cmp::Ordering::Less => return Err(HeaderError::Truncated),
            std::cmp::Ordering::Greater => {
                return Err(HeaderError::Trailing(body.len() - usize::from(*len)));
            }
            std::cmp::Ordering::Equal => {}
        }
        let [flags, family, rest @ ..] = body else {
            return Err(HeaderError::Truncated);
        };
        if *flags != FLAG_EGRESS {
            return Err(HeaderError::Flags(*flags));
        }
        let (destination, rest) = match *family {
            FAMILY_V4 => {
                let (ip, rest) = take::<4>(rest)?;
                let (port, rest) = take::<2>(rest)?;
                let addr = SocketAddr::new(Ipv4Addr::from(ip).into(), u16::from_be_bytes(port));
                (Destination::Addr(addr), rest)
            }
            FAMILY_V6 => {
                let (ip, rest) = take::<16>(rest)?;
                let (port, rest) = take::<2>(rest)?;
                let addr = SocketAddr::new(Ipv6Addr::from(ip).into(), u16::from_be_bytes(port));
                (Destination::Addr(addr), rest)
            }
            FAMILY_NAME => {
                let (&n, rest) = rest.split_first().ok_or(HeaderError::Truncated)?;
                let name = rest.get(..usize::from(n)).ok_or(HeaderError::Truncated)?;
                let (port, rest) = take::<2>(&rest[usize::from(n)..])?;
                let name = std::str::from_utf8(name).map_err(|_| HeaderError::Name)?;
                check_host_name(name).map_err(|_| HeaderError::Name)?;
                (
                    Destination::Name(name.to_owned(), u16::from_be_bytes(port)),
                    rest,
                )
            }
            other => return Err(HeaderError::Family(other)),
        };
        if !rest.is_empty() {
            return Err(HeaderError::Trailing(rest.len()));
        }
        Ok(Self { destination })
    }

    /// Read exactly one request from a stream (at most [`MAX_HEADER_LEN`] bytes).
    ///
    /// Not cancel-safe: a cancelled read leaves the stream mid-request.
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

fn take<const N: usize>(bytes: &[u8]) -> Result<([u8; N], &[u8]), HeaderError> {
    let head = bytes.get(..N).ok_or(HeaderError::Truncated)?;
    let head: [u8; N] = head.try_into().map_err(|_| HeaderError::Truncated)?;
    Ok((head, &bytes[N..]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn request(text: &str) -> EgressRequest {
        EgressRequest {
            destination: Destination::parse(text).unwrap(),
        }
    }

    #[test]
    fn round_trips_each_kind_of_destination() {
        for text in [
            "203.0.113.10:7100",
            "[2001:db8::7]:30303",
            "seed.example.org:26656",
        ] {
            let r = request(text);
            let bytes = r.encode().unwrap();
            assert_eq!(EgressRequest::decode(&bytes), Ok(r), "{text}");
        }
        let bytes = request("203.0.113.10:7100").encode().unwrap();
        assert_eq!(bytes, [1, 8, 8, 4, 203, 0, 113, 10, 0x1b, 0xbc]);
    }

    #[test]
    fn refuses_what_is_not_one_valid_request() {
        let good = request("seed.example.org:26656").encode().unwrap();
        assert_eq!(
            EgressRequest::decode(&good[..good.len() - 1]),
            Err(HeaderError::Truncated)
        );
        let mut longer = good.clone();
        longer.push(0);
        assert_eq!(
            EgressRequest::decode(&longer),
            Err(HeaderError::Trailing(1))
        );
        let mut flags = good.clone();
        flags[2] = 0;
        assert_eq!(EgressRequest::decode(&flags), Err(HeaderError::Flags(0)));
        let mut version = good.clone();
        version[0] = 2;
        assert_eq!(
            EgressRequest::decode(&version),
            Err(HeaderError::Version(2))
        );
        let mut family = good.clone();
        family[3] = 5;
        assert_eq!(EgressRequest::decode(&family), Err(HeaderError::Family(5)));
        // A name with a byte no host name has: refused, never passed to the resolver.
        let mut name = good;
        name[5] = b'/';
        assert_eq!(EgressRequest::decode(&name), Err(HeaderError::Name));
        let bad = EgressRequest {
            destination: Destination::Name("bad name".into(), 1),
        };
        assert_eq!(bad.encode(), Err(HeaderError::Name));
    }

    #[tokio::test]
    async fn reads_exactly_one_request_off_a_stream() {
        let mut bytes = request("203.0.113.10:7100").encode().unwrap();
        bytes.extend_from_slice(b"payload");
        let mut reader = &bytes[..];
        let r = EgressRequest::read_from(&mut reader).await.unwrap();
        assert_eq!(r, request("203.0.113.10:7100"));
        assert_eq!(reader, b"payload");
    }

    #[test]
    fn status_bytes_round_trip() {
        for status in EgressStatus::ALL {
            assert_eq!(EgressStatus::from_byte(status as u8), Some(status));
        }
        assert_eq!(EgressStatus::from_byte(8), None);
    }

    proptest! {
        #[test]
        fn decode_never_panics_and_what_decodes_encodes_the_same(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Ok(r) = EgressRequest::decode(&bytes) {
                prop_assert_eq!(r.encode().unwrap(), bytes);
            }
        }
    }
}

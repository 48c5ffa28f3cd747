//! SOCKS5 (RFC 1928), the part an agent's `mode = "socks5"` egress listener speaks: the
//! greeting with "no authentication", then one CONNECT request. Pure and bounded: the
//! parsers take the bytes read so far and say whether they hold a whole message, so the
//! caller reads at most [`MAX_GREETING`] plus [`MAX_REQUEST`] bytes from a client before it
//! knows where the client wants to go. BIND and UDP ASSOCIATE are answered "command not
//! supported", every authentication method but "none" with "no acceptable methods".

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::config::{Destination, check_host_name};

/// Longest greeting: version, method count, 255 methods.
pub const MAX_GREETING: usize = 2 + 255;
/// Longest request: version, command, reserved, a 255-byte name with its length, port.
pub const MAX_REQUEST: usize = 4 + 1 + 255 + 2;

const VERSION: u8 = 5;
const NO_AUTHENTICATION: u8 = 0x00;
const NO_ACCEPTABLE_METHODS: u8 = 0xff;
const CONNECT: u8 = 1;
const ATYP_V4: u8 = 1;
const ATYP_NAME: u8 = 3;
const ATYP_V6: u8 = 4;

/// A reply code (RFC 1928 section 6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Reply {
    Succeeded = 0,
    GeneralFailure = 1,
    NotAllowed = 2,
    NetworkUnreachable = 3,
    HostUnreachable = 4,
    ConnectionRefused = 5,
    CommandNotSupported = 7,
    AddressTypeNotSupported = 8,
}

/// Why a client's bytes are not a SOCKS5 exchange this listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Socks5Error {
    #[error("not SOCKS version 5 (version byte {0})")]
    Version(u8),
    #[error("the client offers no \"no authentication\" method")]
    NoAcceptableMethod,
    #[error("command {0} is not CONNECT")]
    Command(u8),
    #[error("address type {0} is unknown")]
    AddressType(u8),
    #[error("the host name is not a valid DNS name")]
    Name,
}

impl Socks5Error {
    /// What the client is answered before the connection is closed (`None`: the greeting
    /// failed before a request could be answered).
    #[must_use]
    pub fn reply(self) -> Option<Reply> {
        match self {
            Self::Version(_) | Self::NoAcceptableMethod => None,
            Self::Command(_) => Some(Reply::CommandNotSupported),
            Self::AddressType(_) => Some(Reply::AddressTypeNotSupported),
            Self::Name => Some(Reply::GeneralFailure),
        }
    }
}

/// The greeting: `Ok(Some(len))` once `buf` holds a whole one (of `len` bytes) that offers
/// "no authentication", `Ok(None)` while more bytes are needed.
///
/// # Errors
/// Another version, or no acceptable method (answer [`method_refused`], then close).
pub fn parse_greeting(buf: &[u8]) -> Result<Option<usize>, Socks5Error> {
    let Some(&version) = buf.first() else {
        return Ok(None);
    };
    if version != VERSION {
        return Err(Socks5Error::Version(version));
    }
    let Some(&count) = buf.get(1) else {
        return Ok(None);
    };
    let len = 2 + usize::from(count);
    let Some(methods) = buf.get(2..len) else {
        return Ok(None);
    };
    if methods.contains(&NO_AUTHENTICATION) {
        Ok(Some(len))
    } else {
        Err(Socks5Error::NoAcceptableMethod)
    }
}

/// The answer to an acceptable greeting: "no authentication".
#[must_use]
pub const fn method_chosen() -> [u8; 2] {
    [VERSION, NO_AUTHENTICATION]
}

/// The answer to a greeting without an acceptable method.
#[must_use]
pub const fn method_refused() -> [u8; 2] {
    [VERSION, NO_ACCEPTABLE_METHODS]
}

/// The CONNECT request: `Ok(Some((len, destination)))` once `buf` holds a whole one,
/// `Ok(None)` while more bytes are needed. A name that is an IP address in text is taken as
/// that address.
///
/// # Errors
/// Another version or command, an unknown address type, or a name that is not a DNS name.
pub fn parse_request(buf: &[u8]) -> Result<Option<(usize, Destination)>, Socks5Error> {
    let Some(&[version, command, _reserved, atyp]) = buf.first_chunk::<4>() else {
        return Ok(None);
    };
    if version != VERSION {
        return Err(Socks5Error::Version(version));
    }
    if command != CONNECT {
        return Err(Socks5Error::Command(command));
    }
    let rest = &buf[4..];
    let (address_len, ip) = match atyp {
        ATYP_V4 => (4, true),
        ATYP_V6 => (16, true),
        ATYP_NAME => match rest.first() {
            Some(&n) => (1 + usize::from(n), false),
            None => return Ok(None),
        },
        other => return Err(Socks5Error::AddressType(other)),
    };
    let len = 4 + address_len + 2;
    let Some(body) = buf.get(4..len) else {
        return Ok(None);
    };
    let (address, port) = body.split_at(address_len);
    let port = u16::from_be_bytes([port[0], port[1]]);
    let destination = if ip {
        let ip = match *address {
            [a, b, c, d] => IpAddr::V4(Ipv4Addr::new(a, b, c, d)),
            _ => {
                let octets: [u8; 16] = address.try_into().map_err(|_| Socks5Error::Name)?;
                IpAddr::V6(Ipv6Addr::from(octets))
            }
        };
        Destination::Addr(SocketAddr::new(ip, port))
    } else {
        let name = std::str::from_utf8(&address[1..]).map_err(|_| Socks5Error::Name)?;
        match name.parse::<IpAddr>() {
            Ok(ip) => Destination::Addr(SocketAddr::new(ip, port)),
            Err(_) => {
                check_host_name(name).map_err(|_| Socks5Error::Name)?;
                Destination::Name(name.to_ascii_lowercase(), port)
            }
        }
    };
    Ok(Some((len, destination)))
}

/// A reply: the code and the address the connection is bound to (for a CONNECT, what the
/// client may log; the agent gives its listener's own).
#[must_use]
pub fn reply(code: Reply, bound: SocketAddr) -> Vec<u8> {
    let mut out = vec![VERSION, code as u8, 0];
    match bound.ip() {
        IpAddr::V4(ip) => {
            out.push(ATYP_V4);
            out.extend_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            out.push(ATYP_V6);
            out.extend_from_slice(&ip.octets());
        }
    }
    out.extend_from_slice(&bound.port().to_be_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn greetings() {
        assert_eq!(parse_greeting(&[]), Ok(None));
        assert_eq!(parse_greeting(&[5]), Ok(None));
        assert_eq!(parse_greeting(&[5, 2, 2]), Ok(None));
        assert_eq!(parse_greeting(&[5, 2, 2, 0]), Ok(Some(4)));
        // Pipelined with the request: only the greeting's bytes are taken.
        assert_eq!(parse_greeting(&[5, 1, 0, 5, 1, 0]), Ok(Some(3)));
        assert_eq!(
            parse_greeting(&[5, 1, 2]),
            Err(Socks5Error::NoAcceptableMethod)
        );
        assert_eq!(
            parse_greeting(&[5, 0]),
            Err(Socks5Error::NoAcceptableMethod)
        );
        assert_eq!(parse_greeting(&[4, 1, 0]), Err(Socks5Error::Version(4)));
        assert_eq!(
            parse_greeting(b"GET / HTTP/1.1"),
            Err(Socks5Error::Version(b'G'))
        );
    }

    #[test]
    fn requests() {
        let v4 = [5, 1, 0, 1, 203, 0, 113, 10, 0x1b, 0xbc];
        for cut in 0..v4.len() {
            assert_eq!(parse_request(&v4[..cut]), Ok(None), "{cut}");
        }
        assert_eq!(
            parse_request(&v4),
            Ok(Some((10, Destination::parse("203.0.113.10:7100").unwrap())))
        );
        let mut name = vec![5, 1, 0, 3, 16];
        name.extend_from_slice(b"Seed.Example.org");
        name.extend_from_slice(&[0x68, 0x20]);
        assert_eq!(
            parse_request(&name),
            Ok(Some((
                name.len(),
                Destination::Name("seed.example.org".into(), 26656)
            )))
        );
        let mut literal = vec![5, 1, 0, 3, 8];
        literal.extend_from_slice(b"10.0.0.1");
        literal.extend_from_slice(&[0, 80]);
        assert_eq!(
            parse_request(&literal).unwrap().unwrap().1,
            Destination::Addr("10.0.0.1:80".parse().unwrap())
        );
        let mut v6 = vec![5, 1, 0, 4];
        v6.extend_from_slice(&"2001:db8::7".parse::<Ipv6Addr>().unwrap().octets());
        v6.extend_from_slice(&[0x76, 0x5f]);
        assert_eq!(
            parse_request(&v6).unwrap().unwrap().1,
            Destination::parse("[2001:db8::7]:30303").unwrap()
        );
        assert_eq!(parse_request(&[5, 2, 0, 1]), Err(Socks5Error::Command(2)));
        assert_eq!(parse_request(&[5, 3, 0, 1]), Err(Socks5Error::Command(3)));
        assert_eq!(
            parse_request(&[5, 1, 0, 9]),
            Err(Socks5Error::AddressType(9))
        );
        let mut bad = vec![5, 1, 0, 3, 4];
        bad.extend_from_slice(b"a/b.");
        bad.extend_from_slice(&[0, 80]);
        assert_eq!(parse_request(&bad), Err(Socks5Error::Name));
        assert_eq!(
            Socks5Error::Command(2).reply(),
            Some(Reply::CommandNotSupported)
        );
    }

    #[test]
    fn replies() {
        assert_eq!(
            reply(Reply::Succeeded, "127.0.0.1:7198".parse().unwrap()),
            [5, 0, 0, 1, 127, 0, 0, 1, 0x1c, 0x1e]
        );
        assert_eq!(
            reply(Reply::NotAllowed, "[::1]:1".parse().unwrap()).len(),
            4 + 16 + 2
        );
    }

    proptest! {
        /// Any bytes: no panic, never a length past what was given or past the bounds.
        #[test]
        fn never_panics_and_stays_in_bounds(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Ok(Some(len)) = parse_greeting(&bytes) {
                prop_assert!(len <= bytes.len() && len <= MAX_GREETING);
            }
            if let Ok(Some((len, _))) = parse_request(&bytes) {
                prop_assert!(len <= bytes.len() && len <= MAX_REQUEST);
            }
        }
    }
}

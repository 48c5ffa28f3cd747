//! Tunnel transports: QUIC, WireGuard and TCP+TLS.
//!
//! `pin` authenticates peers by pinned public keys inside rustls; `quic` builds tuned quinn
//! endpoints on top of it. `wireguard` speaks standard WireGuard with a userspace TCP/IP stack
//! inside the overlay. `tls` carries each relayed connection on a TCP+TLS connection of its
//! own, for networks that block UDP. [`TunnelStream`] is one relayed connection over any, so the relay
//! code above does not care which carried it.

pub mod budget;
pub(crate) mod dial;
pub(crate) mod egress;
pub(crate) mod listen;
pub mod pin;
pub mod quic;
mod stream;
pub mod tls;
mod tunnel;
pub mod wireguard;

pub use stream::{TunnelRead, TunnelStream, TunnelWrite};
pub use tunnel::STATUS_TIMEOUT;
pub(crate) use tunnel::{Close, OpenError, TlsSession, Tunnel};

//! Tunnel transports: QUIC and WireGuard.
//!
//! `pin` authenticates peers by pinned public keys inside rustls; `quic` builds tuned quinn
//! endpoints on top of it. `wireguard` speaks standard WireGuard with a userspace TCP/IP stack
//! inside the overlay. [`TunnelStream`] is one relayed connection over either, so the relay
//! code above does not care which carried it.

pub mod pin;
pub mod quic;
mod stream;
pub mod wireguard;

pub use stream::{TunnelRead, TunnelStream, TunnelWrite};

//! The relay protocol spoken inside each tunnel stream, and the byte pump.
//!
//! Every relayed connection is one bidirectional tunnel stream. The sentry writes a
//! [`Header`] first; the agent answers with one [`Status`] byte before any payload, so the
//! sentry can fail over or close the client at once when the validator is down. After `Ok`,
//! both sides [`pump()`] bytes until both directions have finished. A UDP flow carries
//! framed datagrams instead (see [`datagram`]).

pub mod datagram;
mod egress;
mod header;
mod proxy;
mod pump;
pub mod socks5;

pub use egress::{EgressRequest, EgressStatus};
pub use header::{Header, HeaderError, MAX_HEADER_LEN, Status, VERSION};
pub use proxy::{Proxy, ProxyVersion, encode as encode_proxy_header};
pub use pump::{ByteCounters, PumpEnd, PumpStats, pump};
pub(crate) use pump::{idle_watch, millis_since};

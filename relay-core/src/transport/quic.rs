//! QUIC endpoints for the tunnel: quinn with rustls and ring, pinned keys, tuned for relaying.
//!
//! Tuning (see `benches/README.md` for the measurements behind it):
//! - UDP socket buffers of [`SOCKET_BUFFER`]: the Linux default of 212 KiB drops packets at a
//!   few Gbit/s and caps throughput. The kernel caps the request at `net.core.rmem_max` /
//!   `wmem_max` for an unprivileged daemon; we log when it did.
//! - Flow-control windows sized for bandwidth × delay of a fast WAN path (1 Gbit/s × 100 ms
//!   is 12.5 MB) while the connection window bounds what one tunnel can buffer in all.
//! - Keep-alive every [`KEEP_ALIVE`], far inside the 30 s UDP timeout of common NATs, and an
//!   idle timeout of [`IDLE_TIMEOUT`] (three missed keep-alives) so a dead peer is noticed fast.
//! - The stateless-reset key is derived from the host key, so a restarted daemon can tell
//!   its peer at once that the old connection is gone, instead of leaving it to time out.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{
    ClientConfig, Connection, Endpoint, EndpointConfig, IdleTimeout, ServerConfig, TransportConfig,
    VarInt,
};
use quinn_proto::HashedConnectionIdGenerator;
use rustls::pki_types::CertificateDer;
use socket2::{Domain, Protocol, Socket, Type};

use super::pin::{self, ALPN};
use crate::keys::{PrivateKey, PublicKey};

/// Requested UDP socket send and receive buffer size.
pub const SOCKET_BUFFER: usize = 4 * 1024 * 1024;
/// How often an idle tunnel sends a keep-alive.
pub(crate) const KEEP_ALIVE: Duration = Duration::from_secs(5);
/// How long a silent tunnel lives.
pub(crate) const IDLE_TIMEOUT: Duration = Duration::from_secs(15);
/// Per-stream receive window.
pub(crate) const STREAM_WINDOW: u32 = 8 * 1024 * 1024;
/// Per-connection receive and send window.
pub(crate) const CONNECTION_WINDOW: u32 = 32 * 1024 * 1024;
/// Relayed connections one tunnel carries at once.
pub const MAX_STREAMS: u32 = 16 * 1024;
/// Egress streams an agent may open on one tunnel at once. The sentry's `[egress]` policy
/// decides per stream (and refuses every one of an agent without `egress = true`); this only
/// bounds what a tunnel can hold.
pub(crate) const EGRESS_STREAMS: u32 = 4096;

/// The knobs the tuning above sets, so a benchmark can measure each against quinn's defaults.
/// The daemons always use [`Tuning::default`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tuning {
    /// UDP socket buffer request; `None` leaves the kernel default.
    pub socket_buffer: Option<usize>,
    /// (stream, connection) flow-control windows; `None` leaves quinn's defaults.
    pub windows: Option<(u32, u32)>,
}

impl Default for Tuning {
    fn default() -> Self {
        Self {
            socket_buffer: Some(SOCKET_BUFFER),
            windows: Some((STREAM_WINDOW, CONNECTION_WINDOW)),
        }
    }
}

impl Tuning {
    /// No tuning at all: kernel socket buffers, quinn's default windows.
    #[must_use]
    pub const fn untuned() -> Self {
        Self {
            socket_buffer: None,
            windows: None,
        }
    }
}

/// Application close and reset codes on the tunnel.
pub mod code {
    use quinn::VarInt;
    /// The daemon is shutting down.
    pub(crate) const SHUTDOWN: VarInt = VarInt::from_u32(0);
    /// The same agent connected again; this older tunnel is retired.
    pub(crate) const REPLACED: VarInt = VarInt::from_u32(1);
    /// The agent did not answer a relay header in time.
    pub(crate) const UNRESPONSIVE: VarInt = VarInt::from_u32(2);
    /// A relayed connection failed on one side; the stream is reset.
    pub(crate) const RELAY_ERROR: VarInt = VarInt::from_u32(3);
    /// The stream's reader stopped reading and its credit was taken back (see
    /// [`crate::transport::budget`]).
    pub(crate) const STALLED: VarInt = VarInt::from_u32(4);
    /// A reload unpinned the agent's key.
    pub(crate) const REVOKED: VarInt = VarInt::from_u32(5);
}

/// Why an endpoint could not be made.
#[derive(Debug, thiserror::Error)]
pub enum QuicError {
    #[error("binding UDP {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Identity(#[from] pin::IdentityError),
    #[error("TLS setup: {0}")]
    Tls(String),
}

/// The transport parameters both sides use. `peer_streams` is how many bidirectional streams
/// the peer may open at once: the sentry opens relayed connections, the agent egress ones.
#[must_use]
pub(crate) fn transport_config(peer_streams: u32, tuning: &Tuning) -> TransportConfig {
    let mut t = TransportConfig::default();
    t.keep_alive_interval(Some(KEEP_ALIVE));
    t.max_idle_timeout(Some(
        IdleTimeout::try_from(IDLE_TIMEOUT).expect("invariant: 15 s fits a VarInt"),
    ));
    if let Some((stream, connection)) = tuning.windows {
        t.stream_receive_window(VarInt::from_u32(stream));
        t.receive_window(VarInt::from_u32(connection));
        t.send_window(u64::from(connection));
    }
    t.max_concurrent_bidi_streams(VarInt::from_u32(peer_streams));
    t.max_concurrent_uni_streams(VarInt::from_u32(0));
    t.datagram_receive_buffer_size(None);
    t
}

/// The sentry's endpoint: accepts agents whose keys are in `agents` (key → name).
pub fn server_endpoint(
    listen: SocketAddr,
    key: &PrivateKey,
    agents: HashMap<PublicKey, String>,
    tuning: &Tuning,
) -> Result<Endpoint, QuicError> {
    let server = server_config(key, agents, tuning)?;
    endpoint(listen, key, Some(server), tuning)
}

/// The sentry's handshake settings: its identity and the pinned agent keys (key → name). A
/// reload installs a new one with [`Endpoint::set_server_config`]; tunnels already up keep
/// running.
pub fn server_config(
    key: &PrivateKey,
    agents: HashMap<PublicKey, String>,
    tuning: &Tuning,
) -> Result<ServerConfig, QuicError> {
    let tls = pin::server_tls(key, agents, ALPN)?;
    let crypto = QuicServerConfig::try_from(tls).map_err(|e| QuicError::Tls(e.to_string()))?;
    let mut server = ServerConfig::with_crypto(Arc::new(crypto));
    // Agents open streams towards the sentry only for egress.
    server.transport_config(Arc::new(transport_config(EGRESS_STREAMS, tuning)));
    // Attempts waiting for the accept loop, and the packets buffered for them, are bounded
    // far below quinn's defaults (65 536 and 100 MiB): the accept loop decides on each at
    // once (see `admission::HandshakeGate`), so a deep queue would only hold a flood.
    server.max_incoming(1024);
    server.incoming_buffer_size_total(16 << 20);
    Ok(server)
}

/// An agent's endpoint on `bind` (an unspecified address of the sentry's family).
pub fn client_endpoint(
    bind: SocketAddr,
    key: &PrivateKey,
    tuning: &Tuning,
) -> Result<Endpoint, QuicError> {
    endpoint(bind, key, None, tuning)
}

/// The agent's connection settings towards a sentry whose key is `pin`.
pub fn client_config(
    key: &PrivateKey,
    pin: PublicKey,
    tuning: &Tuning,
) -> Result<ClientConfig, QuicError> {
    client_config_with_streams(key, pin, tuning, MAX_STREAMS)
}

/// [`client_config`], letting the sentry open at most `streams` streams at once.
pub(crate) fn client_config_with_streams(
    key: &PrivateKey,
    pin: PublicKey,
    tuning: &Tuning,
    streams: u32,
) -> Result<ClientConfig, QuicError> {
    let tls = pin::client_tls(key, pin, ALPN)?;
    let crypto = QuicClientConfig::try_from(tls).map_err(|e| QuicError::Tls(e.to_string()))?;
    let mut client = ClientConfig::new(Arc::new(crypto));
    client.transport_config(Arc::new(transport_config(streams, tuning)));
    Ok(client)
}

/// The pinned key the peer of an established connection authenticated with.
#[must_use]
pub fn peer_key(conn: &Connection) -> Option<PublicKey> {
    let identity = conn.peer_identity()?;
    let certs = identity.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    certs.first().and_then(pin::peer_key)
}

fn endpoint(
    addr: SocketAddr,
    key: &PrivateKey,
    server: Option<ServerConfig>,
    tuning: &Tuning,
) -> Result<Endpoint, QuicError> {
    let bind = |source| QuicError::Bind { addr, source };
    let socket = udp_socket(addr, tuning.socket_buffer).map_err(bind)?;
    let reset_key = ring::hmac::Key::new(
        ring::hmac::HMAC_SHA256,
        &key.derive("sentry quic stateless reset v1"),
    );
    let mut config = EndpointConfig::new(Arc::new(reset_key));
    // The connection-ID signing key, derived from the host key like the reset key. quinn
    // drops packets whose connection ID it cannot validate without answering; with a fresh
    // random key per start, a restarted daemon silently dropped its peer's packets and the
    // peer waited out its idle timeout. With a stable key it recognises the old IDs and sends
    // the stateless reset at once.
    let cid_seed = key.derive("sentry quic connection id v1");
    let cid_key = u64::from_le_bytes(cid_seed[..8].try_into().expect("invariant: 8 of 32 bytes"));
    config.cid_generator(move || Box::new(HashedConnectionIdGenerator::from_key(cid_key)));
    Endpoint::new(config, server, socket, Arc::new(quinn::TokioRuntime)).map_err(bind)
}

fn udp_socket(addr: SocketAddr, buffer: Option<usize>) -> std::io::Result<std::net::UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        // A `[::]` listener serves IPv4 too, as operators expect from a wildcard.
        let _ = socket.set_only_v6(false);
    }
    if let Some(wanted) = buffer {
        set_buffers(&socket, wanted);
    }
    socket.bind(&addr.into())?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// Ask for `wanted` bytes of send and receive buffer; warn (once per socket) when the kernel's
/// `net.core.rmem_max` / `wmem_max` granted less.
fn set_buffers(socket: &Socket, wanted: usize) {
    // Linux reports twice what it grants (bookkeeping overhead).
    let receive = socket
        .set_recv_buffer_size(wanted)
        .and_then(|()| socket.recv_buffer_size())
        .map_or(0, |b| b / 2);
    let send = socket
        .set_send_buffer_size(wanted)
        .and_then(|()| socket.send_buffer_size())
        .map_or(0, |b| b / 2);
    if receive < wanted || send < wanted {
        tracing::warn!(
            requested = wanted,
            receive,
            send,
            "UDP socket buffers smaller than requested; throughput may suffer: raise \
             net.core.rmem_max and net.core.wmem_max to at least {wanted}"
        );
    }
}

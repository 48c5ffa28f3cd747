//! The WireGuard transport: standard WireGuard on the wire (boringtun's `noise` module), a
//! userspace TCP/IP stack (smoltcp) inside the overlay, no TUN device and no privilege.
//!
//! One [`Device`] owns one UDP socket and serves many peers. Each [`Peer`] has its own noise
//! session (`Tunn`) and its own small IP stack whose only neighbour is that peer, so peers
//! never share a lock and a busy peer does not slow the others' stacks.
//!
//! Datagrams are routed to peers the way WireGuard does it: a handshake initiation by the
//! static key inside it (after its MAC is checked, and a cookie demanded under load), every
//! other message by the receiver index we handed out. A datagram that does not authenticate
//! gets no answer. A decrypted packet is accepted only with the peer's own overlay address as
//! its source (cryptokey routing).
//!
//! Work happens where the event is: the UDP reader decrypts and runs the stack for the peers a
//! batch touched; a stream's read or write runs the stack inline so data leaves at once; one
//! timer task per peer runs the noise timers and the stack's own deadlines (retransmits,
//! delayed ACKs), sleeping until the nearest one. Nothing polls on a fixed short period.
//!
//! UDP I/O is batched (quinn-udp): the datagrams one stack poll produces leave in one GSO
//! `sendmsg`, and the reader takes many per `recvmmsg`, with GRO where the kernel offers it.
//!
//! Memory is bounded: a peer's receive queue holds at most two batches of datagrams (the stack
//! runs when one batch is queued), each stream's buffers are fixed at its creation each way
//! ([`PeerSpec::window`]: a size, or sized for the peer's round trip by [`auto_window`] within
//! [`AUTO_BUDGET`] per peer; plus a stash of at most an eighth of the receive buffer taken out
//! of it, see [`stash_max`](window::stash_max) and [`PeerState::align_windows`]), and a peer
//! carries at most [`MAX_STREAMS`] streams.
//!
//! The parts: `device` (the UDP socket's read loop, routing datagrams to peers, timers),
//! `link` (a peer's smoltcp device over its noise session), `stack` (a peer's TCP/IP stack and
//! its sockets' life), `window` (buffer sizing and the advertised window's edge), `peer` (a
//! peer's public face) and `stream` (one overlay connection as `AsyncRead`/`AsyncWrite`).

mod device;
mod link;
mod peer;
mod stack;
mod stream;
#[cfg(test)]
mod tests;
mod window;

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::x25519::{PublicKey as WgPublic, StaticSecret};
use quinn::udp::{UdpSockRef, UdpSocketState};
use smoltcp::iface::{Interface, SocketHandle, SocketSet};
use smoltcp::socket::tcp;
use tokio::net::UdpSocket;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

pub use stream::OverlayStream;
pub use window::auto_window;

pub use crate::config::units::{MAX_WINDOW, MIN_WINDOW, Window};

use crate::clock;
use device::{bind_udp, limiter_loop, read_loop, timer_loop};
use link::Link;
#[cfg(test)]
use window::{stash_max, window_unit};

/// MTU of the overlay, as `wg-quick` sets it: 1420 leaves room for the WireGuard, UDP and
/// IPv6 headers inside a 1500-byte path.
pub const MTU: usize = 1420;
/// The TCP port, inside the overlay, on which an agent accepts relayed streams (each starts
/// with the relay header, as a QUIC stream does).
pub(crate) const RELAY_PORT: u16 = 51820;
/// Persistent keepalive an agent sends, well inside the 30 s UDP timeout of common NATs.
pub(crate) const AGENT_KEEPALIVE: u16 = 5;
/// An agent (or sentry, seen from an agent) silent this long is down.
pub(crate) const AGENT_LIVENESS: Duration = Duration::from_secs(15);
/// A plain WireGuard peer is reachable while its last packet is younger than this (its
/// session's lifetime: it may keep no keepalive of its own).
pub(crate) const PLAIN_LIVENESS: Duration = Duration::from_secs(180);
/// Each stream's receive and send buffer on a short round trip, and the least an automatic
/// window gives (see [`Window::Auto`]). The receive buffer is the TCP window, and a stream
/// carries at most one window per round trip: 512 KiB is 2 Gbit/s at 2 ms, 0.1 Gbit/s at
/// 40 ms.
pub(crate) const STREAM_BUFFER: usize = 512 * 1024;
/// The rate an automatic window is sized for: the round trip times this, in bytes per
/// second. One stream uses about four fifths of its window per round trip (measured across
/// the `wan` bench's 40 ms line: 4 MiB windows carried 0.66 Gbit/s of 0.84), so 200 MB/s
/// (1.6 Gbit/s) of window keeps a 1 Gbit/s link full.
const AUTO_RATE: u64 = 200_000_000;
/// Bytes of buffers, both ways, the streams of one peer may hold beyond [`STREAM_BUFFER`]
/// each through automatic windows. A new stream gets the largest window within it, at least
/// [`STREAM_BUFFER`]. Like QUIC's connection window, this bounds what many busy streams across
/// a long round trip can pin (smoltcp's buffers stay resident once touched).
const AUTO_BUDGET: usize = 256 * 1024 * 1024;
/// Streams one peer carries at once.
pub const MAX_STREAMS: usize = 4096;
/// Requested UDP socket buffers (as for QUIC).
pub const SOCKET_BUFFER: usize = 4 * 1024 * 1024;
/// Handshake messages per second before cookies are demanded (counted twice per message:
/// once by the device's check, once by the session's).
const HANDSHAKE_RATE: u64 = 200;
/// Datagrams read before the touched stacks run.
const BATCH: usize = 64;
/// How often the noise timers run (keepalives, rekeys, handshake retries).
const NOISE_TICK: Duration = Duration::from_millis(250);
/// How long a new stream waits, at most, for the round trip to its peer being measured (see
/// [`PeerState::measure_rtt`]): its window is sized from it.
const MEASURE_WAIT: Duration = Duration::from_secs(1);
/// How long the least round trip measured stays the one windows are sized from.
const RTT_FLOOR_AGE: Duration = Duration::from_secs(300);
/// How long a closed stream may linger (finishing its FIN exchange) before it is reset.
const LINGER: Duration = Duration::from_secs(30);
/// How often a stream holding unsent data, with nothing in flight, asks the peer for its
/// window (see [`PeerState::unstick`]).
const STALL_PROBE: Duration = Duration::from_secs(1);
/// The window unit of the default [`STREAM_BUFFER`].
#[cfg(test)]
const WINDOW_UNIT: usize = window_unit(STREAM_BUFFER);
/// Closed sockets a peer keeps for its next streams, at most. A new socket's two buffers
/// cost the allocator a megabyte of zeroing (or of fresh pages faulted in) per stream at the
/// default window, which was a third of the agent's CPU under connection churn; a spare socket
/// brings its buffers, already in memory. Worst case each spare holds both buffers resident,
/// so with larger windows fewer are kept (see [`SPARE_BUDGET`]).
const SPARE_SOCKETS: usize = 64;
/// Bytes of buffers the spare sockets of one peer may hold.
const SPARE_BUDGET: usize = 64 * 1024 * 1024;
/// Packets the stack takes in before its acknowledgments go out. A receiver acknowledges
/// every second full-sized segment (RFC 5681 section 4.2), and smoltcp's receiver does, but
/// only when its egress runs: run once per batch of up to [`BATCH`] datagrams (a GRO burst, a
/// router's queue), it sent one acknowledgment for the whole batch. smoltcp's congestion
/// control grows the window by one segment per acknowledgment in slow start, so it then grew
/// by one segment per batch, not per two segments: across a 40 ms round trip one stream with
/// 4 MiB windows reached 0.16 Gbit/s; acknowledging every two segments, 0.47. (Loopback bulk
/// throughput did not change measurably.) The acknowledgments of one poll still leave in one
/// GSO send.
const ACK_EVERY: usize = 2;
/// With many sockets (each pass of egress walks them all) the chunk grows, to at most this
/// many socket visits per packet taken in.
const SOCKETS_PER_PASS: usize = 32;
/// A stream with data to send whose peer sends nothing this long is reset (the peer is gone).
/// Idle streams have no timeout.
const STREAM_TIMEOUT: Duration = Duration::from_secs(60);
/// Streams accepted but not yet taken by the agent's relay loop.
const ACCEPT_QUEUE: usize = 1024;
/// Ephemeral ports for streams a sentry opens.
const EPHEMERAL: std::ops::RangeInclusive<u16> = 49152..=65535;
/// Size of a datagram buffer: the largest UDP payload (and the largest GRO aggregate).
const DATAGRAM: usize = 65536;
/// Receive buffers filled by one `recvmmsg`.
const RECV_SLOTS: usize = 8;
/// Datagrams in one GSO send, and their total size (one UDP payload's limit).
const MAX_SEGMENTS: usize = 64;
const MAX_GSO_BYTES: usize = 65000;

/// Why the device could not start.
#[derive(Debug, thiserror::Error)]
pub enum WgError {
    #[error("binding WireGuard UDP {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A peer as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PeerSpec {
    /// The agent, plain peer or sentry name (log lines and metrics).
    pub name: String,
    /// Its WireGuard (X25519) public key.
    pub public: [u8; 32],
    /// Its overlay address: the only source address accepted from it.
    pub address: Ipv4Addr,
    /// Where to send before it has sent anything (an agent's sentry); learned otherwise.
    pub endpoint: Option<SocketAddr>,
    /// Persistent keepalive in seconds (an agent behind NAT).
    pub keepalive: Option<u16>,
    /// How long after its last packet it still counts as up.
    pub liveness: Duration,
    /// Accept relayed streams from it on [`RELAY_PORT`] (an agent, from its sentry).
    pub accept: bool,
    /// Each stream's receive and send buffer: the most one stream carries per round trip.
    pub window: Window,
}

/// A peer went up or down (called outside any lock).
pub(crate) type PeerEvents = Arc<dyn Fn(&Arc<Peer>, bool) + Send + Sync>;

/// One UDP socket and the peers behind it.
#[derive(Clone)]
pub(crate) struct Device {
    inner: Arc<Inner>,
}

struct Inner {
    udp: Arc<UdpSocket>,
    /// Batched UDP I/O (GSO on send, GRO on receive where the kernel has them).
    udp_state: Arc<UdpSocketState>,
    secret: StaticSecret,
    public: WgPublic,
    limiter: Arc<RateLimiter>,
    local: Ipv4Addr,
    peers: ArcSwap<PeerTable>,
    next_index: AtomicU32,
    events: PeerEvents,
    epoch: Instant,
    stop: CancellationToken,
    /// Datagrams dropped unanswered: unknown key, bad MAC, unknown index, failed decryption.
    dropped: AtomicU64,
}

#[derive(Default)]
struct PeerTable {
    by_key: HashMap<[u8; 32], Arc<Peer>>,
    by_index: HashMap<u32, Arc<Peer>>,
    by_name: HashMap<String, Arc<Peer>>,
}

/// One WireGuard peer: its noise session and its side of the overlay.
pub struct Peer {
    spec: PeerSpec,
    index: u32,
    /// The device's own overlay address.
    local: Ipv4Addr,
    state: Mutex<PeerState>,
    /// Wakes the timer task when a deadline moved earlier.
    timer: Notify,
    /// Wakes streams waiting for the round trip (see [`PeerState::measure_rtt`]).
    measured: Notify,
    /// Streams the peer opened to us (when `spec.accept`).
    accepted: Mutex<Option<mpsc::Receiver<OverlayStream>>>,
    accept_tx: Option<mpsc::Sender<OverlayStream>>,
    epoch: Instant,
    stop: CancellationToken,
}

impl std::fmt::Debug for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peer")
            .field("name", &self.spec.name)
            .finish()
    }
}

struct PeerState {
    link: Link,
    iface: Interface,
    sockets: SocketSet<'static>,
    /// Streams dropped by their owner, finishing their close: (handle, reset after).
    orphans: Vec<(SocketHandle, Instant)>,
    /// Streams closed by their owner whose FIN waits until the peer acknowledged every byte
    /// before it (see [`PeerState::close`]).
    closing: Vec<SocketHandle>,
    /// Sockets listening on [`RELAY_PORT`] for the peer's next connections.
    listeners: Vec<SocketHandle>,
    /// Local ports of streams we opened, both ways.
    ports: HashMap<u16, SocketHandle>,
    port_of: HashMap<SocketHandle, u16>,
    /// Bytes taken out of a full receive buffer to reopen its window (see
    /// [`PeerState::unstick`]); the stream's reader gets them first.
    stash: HashMap<SocketHandle, Vec<u8>>,
    /// Closed sockets kept for the next streams, with their buffers (see [`SPARE_SOCKETS`]).
    spare: Vec<tcp::Socket<'static>>,
    /// How each new stream's buffers are sized.
    window: Window,
    /// Smoothed round trip from the setup of the streams this end opened (SYN to SYN-ACK).
    rtt: Option<Duration>,
    /// The least of those samples, and when it was taken: what windows are sized from (a
    /// sample taken under load counts the queues too). Replaced by the next sample once older
    /// than [`RTT_FLOOR_AGE`], so a path that got longer is learnt.
    rtt_floor: Option<(Duration, Instant)>,
    next_port: u16,
    streams: usize,
    last_rx: Option<Instant>,
    /// The last packet that showed a session both ends may send on (see `device::ingest`).
    last_confirmed: Option<Instant>,
    up: bool,
    /// When the timer task will next run.
    deadline: Instant,
    /// When this end started a handshake to measure the round trip (see
    /// [`PeerState::measure_rtt`]), until it is measured.
    measuring: Option<Instant>,
    /// Counters for metrics.
    handshakes: u64,
    /// A stream moved bytes or changed state since the stack last ran: the timer task runs it
    /// (see [`PeerState::defer_poll`]).
    pending: bool,
}

impl Device {
    /// Bind `listen` and start serving `peers` with overlay address `local`.
    pub async fn bind(
        listen: SocketAddr,
        secret: [u8; 32],
        local: Ipv4Addr,
        peers: &[PeerSpec],
        events: PeerEvents,
        stop: CancellationToken,
    ) -> Result<Self, WgError> {
        let udp = bind_udp(listen).map_err(|source| WgError::Bind {
            addr: listen,
            source,
        })?;
        let udp_state =
            UdpSocketState::new(UdpSockRef::from(&udp)).map_err(|source| WgError::Bind {
                addr: listen,
                source,
            })?;
        let secret = StaticSecret::from(secret);
        let public = WgPublic::from(&secret);
        let inner = Arc::new(Inner {
            udp: Arc::new(udp),
            udp_state: Arc::new(udp_state),
            limiter: Arc::new(RateLimiter::new(&public, HANDSHAKE_RATE)),
            secret,
            public,
            local,
            peers: ArcSwap::from_pointee(PeerTable::default()),
            next_index: AtomicU32::new(1),
            events,
            epoch: clock::now(),
            stop,
            dropped: AtomicU64::new(0),
        });
        let device = Self { inner };
        device.set_peers(peers);
        tokio::spawn(read_loop(device.inner.clone()));
        tokio::spawn(limiter_loop(device.inner.clone()));
        Ok(device)
    }

    /// The bound UDP address.
    #[must_use]
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.inner.udp.local_addr().ok()
    }

    #[cfg(test)]
    /// This device's WireGuard public key.
    #[must_use]
    pub fn public_key(&self) -> [u8; 32] {
        self.inner.public.to_bytes()
    }

    /// Replace the peer set. A peer whose key, address and role are unchanged keeps its
    /// session and streams; a removed peer gets no more packets.
    pub(crate) fn set_peers(&self, specs: &[PeerSpec]) {
        let inner = &self.inner;
        let old = inner.peers.load();
        let mut table = PeerTable::default();
        for spec in specs {
            let peer = match old.by_key.get(&spec.public) {
                Some(peer) if peer.spec == *spec => peer.clone(),
                _ => {
                    let index = inner.next_index.fetch_add(1, Ordering::Relaxed) & 0x00ff_ffff;
                    let peer = Peer::new(inner, spec.clone(), index);
                    tokio::spawn(timer_loop(inner.clone(), peer.clone()));
                    peer
                }
            };
            table.by_index.insert(peer.index, peer.clone());
            table.by_name.insert(spec.name.clone(), peer.clone());
            table.by_key.insert(spec.public, peer);
        }
        for (key, peer) in &old.by_key {
            if !table.by_key.contains_key(key) || !Arc::ptr_eq(peer, &table.by_key[key]) {
                peer.stop.cancel();
            }
        }
        inner.peers.store(Arc::new(table));
    }

    /// The peer named `name`.
    #[must_use]
    pub fn peer(&self, name: &str) -> Option<Arc<Peer>> {
        self.inner.peers.load().by_name.get(name).cloned()
    }

    /// Every peer, by name.
    #[must_use]
    pub fn peers(&self) -> Vec<Arc<Peer>> {
        let mut peers: Vec<_> = self.inner.peers.load().by_name.values().cloned().collect();
        peers.sort_by(|a, b| a.spec.name.cmp(&b.spec.name));
        peers
    }

    /// Datagrams dropped without an answer since start.
    #[must_use]
    pub fn dropped(&self) -> u64 {
        self.inner.dropped.load(Ordering::Relaxed)
    }
}

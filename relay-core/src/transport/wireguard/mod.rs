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
//! of it, see [`stash_max`] and [`PeerState::align_windows`]), and a peer carries at most
//! [`MAX_STREAMS`] streams.

mod stream;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, VecDeque};
use std::io::IoSliceMut;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519::{PublicKey as WgPublic, StaticSecret};
use quinn::udp::{RecvMeta, Transmit, UdpSockRef, UdpSocketState};
use smoltcp::iface::{Config as IfaceConfig, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, Checksum, ChecksumCapabilities, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::wire::{HardwareAddress, IpCidr};
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

pub use stream::OverlayStream;

pub use crate::config::units::{MAX_WINDOW, MIN_WINDOW, Window};

use crate::{clock, lock};

/// MTU of the overlay, as `wg-quick` sets it: 1420 leaves room for the WireGuard, UDP and
/// IPv6 headers inside a 1500-byte path.
pub const MTU: usize = 1420;
/// The TCP port, inside the overlay, on which an agent accepts relayed streams (each starts
/// with the relay header, as a QUIC stream does).
pub const RELAY_PORT: u16 = 51820;
/// Persistent keepalive an agent sends, well inside the 30 s UDP timeout of common NATs.
pub const AGENT_KEEPALIVE: u16 = 5;
/// An agent (or sentry, seen from an agent) silent this long is down.
pub const AGENT_LIVENESS: Duration = Duration::from_secs(15);
/// A plain WireGuard peer is reachable while its last packet is younger than this (its
/// session's lifetime: it may keep no keepalive of its own).
pub const PLAIN_LIVENESS: Duration = Duration::from_secs(180);
/// Each stream's receive and send buffer on a short round trip, and the least an automatic
/// window gives (see [`Window::Auto`]). The receive buffer is the TCP window, and a stream
/// carries at most one window per round trip: 512 KiB is 2 Gbit/s at 2 ms, 0.1 Gbit/s at
/// 40 ms.
pub const STREAM_BUFFER: usize = 512 * 1024;
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
/// One unit of the advertised receive window for a receive buffer of `buffer` bytes: 2 to
/// the power of the window scale smoltcp chooses for it (the fewest bits that bring it under
/// 64 KiB).
const fn window_unit(buffer: usize) -> usize {
    1 << (usize::BITS - buffer.leading_zeros()).saturating_sub(16)
}
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
/// Bytes a stream's stash takes in to keep its window edge in place (see
/// [`PeerState::align_windows`]), for a receive buffer of `buffer` bytes: a sixteenth of it,
/// at least 8 KiB. Aligning takes at most one window unit per segment that arrives while the
/// reader is away, so full-sized segments fill a buffer with at most `buffer / 1380 * unit`
/// stashed: within a sixteenth up to 2 MiB buffers (unit 64), and 8 KiB covers the default
/// 512 KiB with room to spare. Past it the window may shrink and [`PeerState::unstick`]'s
/// nudges, which may take the stash to twice this, reopen it.
const fn stash_max(buffer: usize) -> usize {
    let share = buffer / 16;
    if share > 8 * 1024 { share } else { 8 * 1024 }
}
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
pub struct PeerSpec {
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

/// The window for a new stream of a peer whose round trip is `rtt` (unknown: `None`), whose
/// live streams already hold `grown` bytes of buffers past [`STREAM_BUFFER`] each.
///
/// Past [`STREAM_BUFFER`], a whole number of MiB: a whole number of window units (see
/// [`window_unit`]), and spare sockets fit the next streams while the estimate moves within
/// a step.
#[must_use]
pub fn auto_window(rtt: Option<Duration>, grown: usize) -> usize {
    const STEP: usize = 1 << 20;
    let Some(rtt) = rtt else {
        return STREAM_BUFFER;
    };
    let wanted = u64::try_from(rtt.as_micros())
        .unwrap_or(u64::MAX)
        .saturating_mul(AUTO_RATE)
        / 1_000_000;
    let wanted = usize::try_from(wanted).unwrap_or(MAX_WINDOW);
    if wanted <= STREAM_BUFFER {
        return STREAM_BUFFER;
    }
    // Past the budget, the largest window that still fits it.
    let room = AUTO_BUDGET.saturating_sub(grown) / 2 + STREAM_BUFFER;
    wanted
        .min(MAX_WINDOW)
        .div_ceil(STEP)
        .saturating_mul(STEP)
        .min(room / STEP * STEP)
        .max(STREAM_BUFFER)
}

/// A peer went up or down (called outside any lock).
pub type PeerEvents = Arc<dyn Fn(&Arc<Peer>, bool) + Send + Sync>;

/// One UDP socket and the peers behind it.
#[derive(Clone)]
pub struct Device {
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
    up: bool,
    /// When the timer task will next run.
    deadline: Instant,
    /// When this end started a handshake to measure the round trip (see
    /// [`PeerState::measure_rtt`]), until it is measured.
    measuring: Option<Instant>,
    /// Counters for metrics.
    handshakes: u64,
}

/// The smoltcp device: decrypted packets in, packets out through the noise session.
struct Link {
    wire: Wire,
    rx: VecDeque<Vec<u8>>,
    rx_current: Vec<u8>,
    free: Vec<Vec<u8>>,
}

/// What sending needs, apart from the receive queue (so smoltcp can hold a receive and a
/// transmit token at once).
struct Wire {
    tunn: Tunn,
    udp: Arc<UdpSocket>,
    udp_state: Arc<UdpSocketState>,
    endpoint: Option<SocketAddr>,
    plain: Vec<u8>,
    sealed: Vec<u8>,
    /// Sealed datagrams waiting to leave in one send: equal sizes except the last (GSO).
    batch: Vec<u8>,
    batch_segment: usize,
    batch_count: usize,
    batch_to: Option<SocketAddr>,
    /// The last datagram was shorter than the segment size: nothing may follow it.
    batch_closed: bool,
    /// The socket's send buffer was full at the last flush: the batch is kept for a retry once
    /// the socket is writable, and the stack is given no transmit token meanwhile (so its
    /// segments wait in their sockets instead of being lost and retransmitted on a timer).
    stalled: bool,
    tx_dropped: u64,
    /// What the tests check of the segments sent (see [`tests::Edges`]).
    #[cfg(test)]
    edges: tests::Edges,
}

impl Wire {
    /// Encrypt one IP packet into the send batch for the peer's endpoint (dropped when none
    /// is known: TCP retransmits). The batch leaves at [`Wire::flush`], at the latest when the
    /// stack's poll ends.
    fn send_packet(&mut self, len: usize) {
        let sealed = match self.tunn.encapsulate(&self.plain[..len], &mut self.sealed) {
            TunnResult::WriteToNetwork(datagram) => datagram.len(),
            TunnResult::Err(e) => {
                debug!("encapsulate: {e:?}");
                return;
            }
            _ => return,
        };
        let Some(to) = self.endpoint else {
            self.tx_dropped += 1;
            return;
        };
        let max = self.udp_state.max_gso_segments().clamp(1, MAX_SEGMENTS);
        if self.batch_count > 0
            && (self.batch_to != Some(to)
                || self.batch_closed
                || sealed > self.batch_segment
                || self.batch_count >= max
                || self.batch.len() + sealed > MAX_GSO_BYTES)
        {
            self.flush();
            if self.stalled {
                // Only a reply the stack made while receiving gets here (it has no transmit
                // token while stalled); TCP sends it again.
                self.tx_dropped += 1;
                return;
            }
        }
        if self.batch_count == 0 {
            self.batch_segment = sealed;
            self.batch_to = Some(to);
        }
        self.batch.extend_from_slice(&self.sealed[..sealed]);
        self.batch_count += 1;
        self.batch_closed = sealed < self.batch_segment;
    }

    /// Send the batch: one `sendmsg` carrying every datagram (GSO), or one per datagram
    /// where the kernel has no GSO. A full socket buffer keeps the batch and marks the wire
    /// stalled (see [`Wire::stalled`]); any other failure drops it (TCP retransmits).
    fn flush(&mut self) {
        let Some(destination) = self.batch_to.filter(|_| self.batch_count > 0) else {
            return;
        };
        let transmit = Transmit {
            destination,
            ecn: None,
            contents: &self.batch,
            segment_size: (self.batch_count > 1).then_some(self.batch_segment),
            src_ip: None,
        };
        let (udp, state) = (&self.udp, &self.udp_state);
        let sent = udp.try_io(Interest::WRITABLE, || {
            state.send(UdpSockRef::from(&**udp), &transmit)
        });
        match sent {
            Ok(()) => self.stalled = false,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                self.stalled = true;
                return;
            }
            Err(_) => {
                self.stalled = false;
                self.tx_dropped += self.batch_count as u64;
            }
        }
        self.batch.clear();
        self.batch_count = 0;
        self.batch_closed = false;
    }
}

struct RxToken<'a>(&'a [u8]);
struct TxToken<'a>(&'a mut Wire);

impl phy::RxToken for RxToken<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(self.0)
    }
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let len = len.min(self.0.plain.len());
        let result = f(&mut self.0.plain[..len]);
        #[cfg(test)]
        self.0.edges.observe(&self.0.plain[..len]);
        self.0.send_packet(len);
        result
    }
}

impl phy::Device for Link {
    type RxToken<'a> = RxToken<'a>;
    type TxToken<'a> = TxToken<'a>;

    fn receive(
        &mut self,
        _: smoltcp::time::Instant,
    ) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        let next = self.rx.pop_front()?;
        let done = std::mem::replace(&mut self.rx_current, next);
        if done.capacity() > 0 && self.free.len() < BATCH {
            self.free.push(done);
        }
        Some((RxToken(&self.rx_current), TxToken(&mut self.wire)))
    }

    fn transmit(&mut self, _: smoltcp::time::Instant) -> Option<Self::TxToken<'_>> {
        (!self.wire.stalled).then_some(TxToken(&mut self.wire))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = MTU;
        // WireGuard authenticates every packet: received checksums cannot be wrong, so only
        // outgoing ones are computed (a kernel peer checks them).
        let mut checksum = ChecksumCapabilities::default();
        checksum.ipv4 = Checksum::Tx;
        checksum.tcp = Checksum::Tx;
        checksum.udp = Checksum::Tx;
        checksum.icmpv4 = Checksum::Tx;
        caps.checksum = checksum;
        caps
    }
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

    /// This device's WireGuard public key.
    #[must_use]
    pub fn public_key(&self) -> [u8; 32] {
        self.inner.public.to_bytes()
    }

    /// Replace the peer set. A peer whose key, address and role are unchanged keeps its
    /// session and streams; a removed peer gets no more packets.
    pub fn set_peers(&self, specs: &[PeerSpec]) {
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

impl Peer {
    fn new(inner: &Inner, spec: PeerSpec, index: u32) -> Arc<Self> {
        let tunn = Tunn::new(
            inner.secret.clone(),
            WgPublic::from(spec.public),
            None,
            spec.keepalive,
            index,
            Some(inner.limiter.clone()),
        );
        let mut link = Link {
            wire: Wire {
                tunn,
                udp: inner.udp.clone(),
                udp_state: inner.udp_state.clone(),
                endpoint: spec.endpoint,
                plain: vec![0; MTU],
                sealed: vec![0; MTU + 64],
                batch: Vec::with_capacity(MAX_GSO_BYTES),
                batch_segment: 0,
                batch_count: 0,
                batch_to: None,
                batch_closed: false,
                stalled: false,
                tx_dropped: 0,
                #[cfg(test)]
                edges: tests::Edges::default(),
            },
            rx: VecDeque::with_capacity(BATCH),
            rx_current: Vec::new(),
            free: Vec::new(),
        };
        let now = clock::now();
        let mut config = IfaceConfig::new(HardwareAddress::Ip);
        config.random_seed = rand::random();
        let mut iface = Interface::new(config, &mut link, stamp(inner.epoch, now));
        iface.update_ip_addrs(|addrs| {
            let _ = addrs.push(IpCidr::new(inner.local.into(), 32));
        });
        // The peer is the only neighbour: everything goes to it.
        let _ = iface.routes_mut().add_default_ipv4_route(spec.address);
        let (accept_tx, accepted) = if spec.accept {
            let (tx, rx) = mpsc::channel(ACCEPT_QUEUE);
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        let next_port = EPHEMERAL.start() + rand::random_range(0..1024);
        Arc::new(Self {
            index,
            local: inner.local,
            state: Mutex::new(PeerState {
                link,
                iface,
                sockets: SocketSet::new(Vec::new()),
                orphans: Vec::new(),
                closing: Vec::new(),
                listeners: Vec::new(),
                ports: HashMap::new(),
                port_of: HashMap::new(),
                stash: HashMap::new(),
                spare: Vec::new(),
                window: match spec.window {
                    Window::Fixed(bytes) => Window::Fixed(bytes.clamp(MIN_WINDOW, MAX_WINDOW)),
                    Window::Auto => Window::Auto,
                },
                rtt: None,
                rtt_floor: None,
                next_port,
                streams: 0,
                last_rx: None,
                up: false,
                deadline: now,
                handshakes: 0,
                measuring: None,
            }),
            timer: Notify::new(),
            measured: Notify::new(),
            accepted: Mutex::new(accepted),
            accept_tx,
            epoch: inner.epoch,
            stop: inner.stop.child_token(),
            spec,
        })
    }

    /// The configured name.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// Its overlay address.
    #[must_use]
    pub fn address(&self) -> Ipv4Addr {
        self.spec.address
    }

    /// How long after its last packet it still counts as up.
    #[must_use]
    pub fn liveness(&self) -> Duration {
        self.spec.liveness
    }

    /// Whether an authenticated packet arrived within the liveness window.
    #[must_use]
    pub fn is_up(&self) -> bool {
        lock(&self.state).up
    }

    /// Its current UDP endpoint, if known.
    #[must_use]
    pub fn endpoint(&self) -> Option<SocketAddr> {
        lock(&self.state).link.wire.endpoint
    }

    /// Time since the last completed handshake, and the smoothed round trip, if measured: from
    /// the streams this end opened (connection setup inside the overlay, microseconds), else
    /// from the noise handshakes (milliseconds, and only on the end that initiates them: a
    /// sentry answering its agents' handshakes learns none there, unless its windows are
    /// automatic: then it starts one when the peer comes up, see [`PeerState::measure_rtt`]).
    #[must_use]
    pub fn session(&self) -> (Option<Duration>, Option<Duration>) {
        let state = lock(&self.state);
        let (age, _, _, _, rtt) = state.link.wire.tunn.stats();
        let handshake_rtt = rtt.map(|ms| Duration::from_millis(u64::from(ms)));
        (age, state.rtt.or(handshake_rtt))
    }

    /// The buffers, each way, a stream opened to or by this peer now gets (`wireguard_window`:
    /// fixed, or sized for the round trip measured so far).
    #[must_use]
    pub fn stream_window(&self) -> usize {
        lock(&self.state).stream_window()
    }

    /// Relayed streams open now.
    #[must_use]
    pub fn streams(&self) -> usize {
        lock(&self.state).streams
    }

    /// The next stream the peer opened to us; `None` once the peer is removed. Only one
    /// caller may take streams (the first gets the queue).
    pub fn take_accepted(&self) -> Option<mpsc::Receiver<OverlayStream>> {
        lock(&self.accepted).take()
    }

    /// Open a TCP connection to `to` inside the overlay.
    pub async fn connect(self: &Arc<Self>, to: SocketAddrV4) -> std::io::Result<OverlayStream> {
        OverlayStream::connect(self.clone(), to).await
    }
}

impl PeerState {
    /// Run the stack: deliver queued packets, send what is due. Returns whether the timer
    /// must be woken (its deadline moved earlier).
    fn poll(&mut self, epoch: Instant, now: Instant) -> bool {
        let at = stamp(epoch, now);
        // `Interface::poll`, with the receive windows aligned between ingress and egress.
        self.iface.poll_maintenance(at);
        // Acknowledgments leave after every few segments taken in, not once per batch (see
        // [`ACK_EVERY`]); each pass walks every socket, so more sockets make longer chunks.
        let chunk = ACK_EVERY.max(self.sockets.iter().count() / SOCKETS_PER_PASS);
        loop {
            let mut taken = 0;
            while taken < chunk
                && self
                    .iface
                    .poll_ingress_single(at, &mut self.link, &mut self.sockets)
                    != smoltcp::iface::PollIngressSingleResult::None
            {
                taken += 1;
            }
            self.align_windows();
            self.close_drained();
            while self
                .iface
                .poll_egress(at, &mut self.link, &mut self.sockets)
                != smoltcp::iface::PollResult::None
            {}
            if taken < chunk {
                break;
            }
        }
        self.link.wire.flush();
        // Closed streams leave at once: every poll walks every socket, and a spare socket
        // saves the next stream its buffers.
        self.reap(now);
        match self.iface.poll_delay(at, &self.sockets) {
            Some(delay) => {
                let due = now + Duration::from(delay);
                if due < self.deadline {
                    self.deadline = due;
                    return true;
                }
                false
            }
            None => false,
        }
    }

    /// The round trip to the peer that windows are sized from: the least one measured by the
    /// streams this end opened lately, else the last noise handshake this end initiated
    /// (milliseconds, rounded down).
    fn link_rtt(&self) -> Option<Duration> {
        let (_, _, _, _, handshake) = self.link.wire.tunn.stats();
        self.rtt_floor
            .map(|(floor, _)| floor)
            .or_else(|| handshake.map(|ms| Duration::from_millis(u64::from(ms))))
    }

    /// Start one handshake of our own when the peer came up and this end knows no round trip
    /// to it: a sentry answers its agents' handshakes and learns none there, and its first
    /// stream would get the short round trip's window. The handshake's answer measures it
    /// (a new session; the peer keeps the old one's packets coming meanwhile).
    fn measure_rtt(&mut self) {
        if self.window != Window::Auto || self.link_rtt().is_some() {
            return;
        }
        let Some(endpoint) = self.link.wire.endpoint else {
            return;
        };
        let mut out = [0u8; 256];
        if let TunnResult::WriteToNetwork(datagram) = self
            .link
            .wire
            .tunn
            .format_handshake_initiation(&mut out, false)
            && self.link.wire.udp.try_send_to(datagram, endpoint).is_ok()
        {
            self.measuring = Some(clock::now());
        }
    }

    /// Whether a new stream should wait for the round trip: it is being measured, for less
    /// than [`MEASURE_WAIT`]. Clears the measurement once done; returns `None` then.
    fn awaiting_rtt(&mut self, now: Instant) -> Option<Instant> {
        let started = self.measuring?;
        if self.link_rtt().is_some() || now.duration_since(started) >= MEASURE_WAIT {
            self.measuring = None;
            return None;
        }
        Some(started + MEASURE_WAIT)
    }

    /// Each new stream's buffers, each way.
    fn stream_window(&self) -> usize {
        match self.window {
            Window::Fixed(bytes) => bytes,
            Window::Auto => {
                let grown = self
                    .sockets
                    .iter()
                    .map(|(_, socket)| {
                        let smoltcp::socket::Socket::Tcp(socket) = socket;
                        let both = socket.recv_capacity() + socket.send_capacity();
                        both.saturating_sub(2 * STREAM_BUFFER)
                    })
                    .sum();
                auto_window(self.link_rtt(), grown)
            }
        }
    }

    /// A socket for a new stream: a spare one of the right size when there is one (see
    /// [`SPARE_SOCKETS`]), else a new one with its buffers (and a spare of another size, if
    /// any, is let go: the window moved with the round trip).
    fn new_socket(&mut self) -> tcp::Socket<'static> {
        let window = self.stream_window();
        let fits = self.spare.iter().position(|s| s.recv_capacity() == window);
        let mut socket = match fits {
            Some(i) => self.spare.swap_remove(i),
            None => {
                self.spare.pop();
                tcp::Socket::new(
                    tcp::SocketBuffer::new(vec![0; window]),
                    tcp::SocketBuffer::new(vec![0; window]),
                )
            }
        };
        // `connect` and `listen` reset a socket's connection state, not these: set them all,
        // so a spare socket starts as a new one does (a fresh congestion controller too).
        socket.set_nagle_enabled(false);
        socket.set_congestion_control(tcp::CongestionControl::Cubic);
        // No timeout while idle: smoltcp's counts from the peer's last packet, which would
        // reset a quiet connection (a validator's P2P link may be silent for minutes). The
        // timer sets one while the stream has data to send (see `unstick`).
        socket.set_timeout(None);
        socket.set_keep_alive(None);
        socket
    }

    /// Ensure a listener waits for each connection request in the receive queue.
    fn listen_for_syns(&mut self, local: Ipv4Addr) {
        let syns = self
            .link
            .rx
            .iter()
            .filter(|p| is_syn_to(p, RELAY_PORT))
            .count();
        let idle = self
            .listeners
            .iter()
            .filter(|h| self.sockets.get::<tcp::Socket<'_>>(**h).state() == tcp::State::Listen)
            .count();
        for _ in idle..syns {
            if self.streams + self.listeners.len() >= MAX_STREAMS {
                break;
            }
            let mut socket = self.new_socket();
            if socket
                .listen((smoltcp::wire::IpAddress::Ipv4(local), RELAY_PORT))
                .is_ok()
            {
                self.listeners.push(self.sockets.add(socket));
            }
        }
    }

    /// Listeners that took a connection: handed to the accept queue.
    fn take_accepted(&mut self) -> Vec<SocketHandle> {
        let mut taken = Vec::new();
        let sockets = &self.sockets;
        self.listeners.retain(|h| {
            let state = sockets.get::<tcp::Socket<'_>>(*h).state();
            if state == tcp::State::Listen {
                true
            } else {
                taken.push(*h);
                false
            }
        });
        self.streams += taken.len();
        taken
    }

    /// Keep every receive window's right edge from moving left, before the stack sends its
    /// acknowledgments.
    ///
    /// smoltcp (0.14) advertises its free receive space rounded down to the window scale
    /// (`unit` bytes, see [`window_unit`]), and refuses any byte past the edge it last advertised. When a
    /// segment of a length that is not a whole number of units arrives, the rounding can move
    /// the edge up to one unit to the left of where it was. A sender that already sent up to the
    /// old edge then has its last bytes refused. In the middle of a transfer the segments after
    /// them draw duplicate acknowledgments and a fast retransmit; at the end of one (the last
    /// bytes, then the FIN) nothing follows, and the sender waits for its retransmission
    /// timeout, at least one second in smoltcp. Measured before this: one 16 MiB transfer in
    /// about fifteen stalled for 1 s (3 s when the retransmission was cut too).
    ///
    /// Taking the bytes that would be rounded off out of the buffer, into the stream's stash
    /// (its reader gets them first), leaves the free space a whole number of units, so the
    /// advertised edge is the buffer's true end and never moves left. The stash is bounded by
    /// [`stash_max`]; past it (a reader far behind) the rounding is left as it was, and
    /// [`PeerState::unstick`] reopens a window that shrank that way.
    fn align_windows(&mut self) {
        for (handle, socket) in self.sockets.iter_mut() {
            let smoltcp::socket::Socket::Tcp(socket) = socket;
            let unit = window_unit(socket.recv_capacity());
            let free = socket.recv_capacity() - socket.recv_queue();
            let short = (unit - free % unit) % unit;
            if short == 0 || socket.recv_queue() == 0 {
                continue;
            }
            let stash = self.stash.entry(handle).or_default();
            let at = stash.len();
            if at + short <= stash_max(socket.recv_capacity()) {
                stash.resize(at + short, 0);
                let taken = socket.recv_slice(&mut stash[at..]).unwrap_or(0);
                stash.truncate(at + taken);
            }
            if stash.is_empty() {
                self.stash.remove(&handle);
            }
        }
    }

    /// Work around two ways smoltcp (0.14) can stall a stream for good when both of its
    /// directions are full at once (an echo, or a request/response exchange larger than the
    /// buffers, whose application waits on one direction to drain the other).
    ///
    /// - Window scaling rounds the advertised window down, so a receiver can shrink its
    ///   window's right edge by up to one scale unit after the sender filled it. The sender's
    ///   last bytes are then refused, and while the receiver's window stays at zero it also
    ///   refuses every later segment of the sender (acknowledgments included, as their sequence
    ///   number is past its own), so it never learns that its own data was acknowledged. The
    ///   sender meanwhile probes with bytes past the refused ones and never rewinds. Taking
    ///   two window units of bytes out of a full receive buffer into the stream's stash reopens the
    ///   window past the sender's edge; the sender's next segment is accepted and both ends
    ///   resume. A nudge is taken into an empty stash (once until the reader reads), and,
    ///   up to twice [`stash_max`], whenever [`PeerState::align_windows`] has stopped at its
    ///   bound: the edge may have moved left since. (Taken only into an empty stash, as first
    ///   written, a stash filled by aligning left the stall for good: one run of
    ///   `an_echo_resumes_after_both_directions_fill_up` in about ten hung 60 s and was reset.
    ///   Without nudges the test stalls every time.)
    /// - A retransmission timeout while the peer's window is zero leaves the socket idle
    ///   without its zero-window probe, so a lost window update would never be recovered
    ///   (found reading smoltcp's code, not seen here). A stream with data to send keeps a
    ///   keep-alive, which draws the peer's acknowledgment with its current window.
    ///   Keep-alives go out only from an idle socket: nothing while data flows.
    ///
    /// The same test sets [`STREAM_TIMEOUT`] on streams with data to send only: smoltcp's
    /// timeout counts from the peer's last packet, so on a quiet stream it would reset a
    /// healthy connection.
    fn unstick(&mut self) {
        for (handle, socket) in self.sockets.iter_mut() {
            let smoltcp::socket::Socket::Tcp(socket) = socket;
            // Bytes moved out of a full receive buffer so its window reopens by two units.
            let nudge = 2 * window_unit(socket.recv_capacity());
            let busy = socket.send_queue() > 0;
            let probe = busy.then(|| STALL_PROBE.into());
            if socket.keep_alive() != probe {
                socket.set_keep_alive(probe);
            }
            let timeout = busy.then(|| STREAM_TIMEOUT.into());
            if socket.timeout() != timeout {
                socket.set_timeout(timeout);
            }
            let free = socket.recv_capacity() - socket.recv_queue();
            let stashed = self.stash.get(&handle).map_or(0, Vec::len);
            let bound = stash_max(socket.recv_capacity());
            // Nudged once per read, or while aligning is held back by its bound (the edge may
            // have moved left since), up to twice the bound.
            let aligning_stopped = stashed + window_unit(socket.recv_capacity()) > bound;
            if free < nudge / 2
                && socket.may_recv()
                && (stashed == 0 || aligning_stopped)
                && stashed + nudge <= 2 * bound
            {
                let stash = self.stash.entry(handle).or_default();
                stash.resize(stashed + nudge, 0);
                let taken = socket.recv_slice(&mut stash[stashed..]).unwrap_or(0);
                stash.truncate(stashed + taken);
                if stash.is_empty() {
                    self.stash.remove(&handle);
                }
            }
        }
    }

    /// Close a stream's sending side: its FIN follows the bytes queued before it.
    ///
    /// When the peer has already sent its own FIN (CLOSE-WAIT) and bytes are still queued, the
    /// FIN waits until the peer acknowledged them all. smoltcp (0.14) in LAST-ACK, the state
    /// `close` moves such a socket to, answers every acknowledgment that does not cover new
    /// bytes with a challenge ACK and takes nothing else from it, not even the window. So a
    /// stream whose peer's window was zero, or whose bytes were lost, never learns that the
    /// window reopened and never resends them: it probes the closed window until the linger
    /// deadline resets it, and the far end sees its bytes cut short. Measured before this: one
    /// `an_echo_resumes_after_both_directions_fill_up` in about six lost 1-2 MiB that way.
    /// In CLOSE-WAIT the same acknowledgments are taken as usual (window update, duplicate
    /// ACKs, fast retransmit).
    fn close(&mut self, handle: SocketHandle) {
        let socket = self.sockets.get_mut::<tcp::Socket<'_>>(handle);
        if socket.state() == tcp::State::CloseWait && socket.send_queue() > 0 {
            if !self.closing.contains(&handle) {
                self.closing.push(handle);
            }
        } else {
            socket.close();
        }
    }

    /// Send the FINs that [`PeerState::close`] held back, once their bytes are acknowledged.
    fn close_drained(&mut self) {
        let sockets = &mut self.sockets;
        self.closing.retain(|&handle| {
            let socket = sockets.get_mut::<tcp::Socket<'_>>(handle);
            if socket.state() != tcp::State::CloseWait {
                return false;
            }
            if socket.send_queue() > 0 {
                return true;
            }
            socket.close();
            false
        });
    }

    /// Remove orphans that finished closing; reset those that lingered too long (the reset
    /// goes out at the next poll, and the socket is removed on the next pass).
    fn reap(&mut self, now: Instant) {
        let mut i = 0;
        while i < self.orphans.len() {
            let (handle, until) = self.orphans[i];
            let socket = self.sockets.get_mut::<tcp::Socket<'_>>(handle);
            if matches!(socket.state(), tcp::State::Closed | tcp::State::TimeWait) {
                self.release(handle);
                self.orphans.swap_remove(i);
                continue;
            }
            if now >= until {
                socket.abort();
            }
            i += 1;
        }
    }

    /// One round trip measured by a stream's setup: folded into the smoothed value as TCP
    /// does (RFC 6298: 7/8 old, 1/8 new), and into the floor windows are sized from.
    fn observe_rtt(&mut self, sample: Duration, now: Instant) {
        self.rtt_floor = Some(match self.rtt_floor {
            Some((floor, at)) if floor <= sample && now.duration_since(at) < RTT_FLOOR_AGE => {
                (floor, at)
            }
            _ => (sample, now),
        });
        self.rtt = Some(match self.rtt {
            Some(smoothed) => (smoothed * 7 + sample) / 8,
            None => sample,
        });
    }

    /// Forget a stream's socket.
    fn release(&mut self, handle: SocketHandle) {
        let socket = self.sockets.remove(handle);
        let spare_bytes: usize = self
            .spare
            .iter()
            .map(|s| s.recv_capacity() + s.send_capacity())
            .sum();
        if self.spare.len() < SPARE_SOCKETS
            && let smoltcp::socket::Socket::Tcp(socket) = socket
            && !socket.is_open()
            && spare_bytes + socket.recv_capacity() + socket.send_capacity() <= SPARE_BUDGET
        {
            self.spare.push(socket);
        }
        self.stash.remove(&handle);
        self.closing.retain(|&h| h != handle);
        if let Some(port) = self.port_of.remove(&handle) {
            self.ports.remove(&port);
        }
        self.streams = self.streams.saturating_sub(1);
    }

    fn alloc_port(&mut self) -> Option<u16> {
        let span = u32::from(EPHEMERAL.end() - EPHEMERAL.start()) + 1;
        for _ in 0..span {
            let port = self.next_port;
            self.next_port = if port >= *EPHEMERAL.end() {
                *EPHEMERAL.start()
            } else {
                port + 1
            };
            if !self.ports.contains_key(&port) {
                return Some(port);
            }
        }
        None
    }
}

/// smoltcp's clock: microseconds since the device started.
fn stamp(epoch: Instant, now: Instant) -> smoltcp::time::Instant {
    let micros = now.saturating_duration_since(epoch).as_micros();
    smoltcp::time::Instant::from_micros(i64::try_from(micros).unwrap_or(i64::MAX))
}

/// A TCP SYN (without ACK) to `port` in an IPv4 packet.
fn is_syn_to(packet: &[u8], port: u16) -> bool {
    if packet.len() < 20 || packet[0] >> 4 != 4 || packet[9] != 6 {
        return false;
    }
    let ihl = usize::from(packet[0] & 0x0f) * 4;
    let Some(tcp) = packet.get(ihl..ihl + 14) else {
        return false;
    };
    let dst = u16::from_be_bytes([tcp[2], tcp[3]]);
    let flags = tcp[13];
    dst == port && flags & 0x02 != 0 && flags & 0x10 == 0
}

fn bind_udp(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        let _ = socket.set_only_v6(false);
    }
    let _ = socket.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = socket.set_send_buffer_size(SOCKET_BUFFER);
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    UdpSocket::from_std(socket.into())
}

/// Which peer a datagram is for, after the checks that cost no Diffie-Hellman (and, for a
/// handshake initiation, the one that does). `None`: drop it silently.
fn route(inner: &Inner, datagram: &[u8], src: SocketAddr, cookie: &mut [u8]) -> Option<Arc<Peer>> {
    let table = inner.peers.load();
    match Tunn::parse_incoming_packet(datagram).ok()? {
        Packet::HandshakeInit(init) => {
            match inner
                .limiter
                .verify_packet(Some(src.ip()), datagram, cookie)
            {
                Ok(_) => {}
                Err(TunnResult::WriteToNetwork(reply)) => {
                    // Under load: prove your address first (the MAC was valid).
                    let _ = inner.udp.try_send_to(reply, src);
                    return None;
                }
                Err(_) => return None,
            }
            let half = parse_handshake_anon(&inner.secret, &inner.public, &init).ok()?;
            table.by_key.get(&half.peer_static_public).cloned()
        }
        Packet::HandshakeResponse(p) => table.by_index.get(&(p.receiver_idx >> 8)).cloned(),
        Packet::PacketCookieReply(p) => table.by_index.get(&(p.receiver_idx >> 8)).cloned(),
        Packet::PacketData(p) => table.by_index.get(&(p.receiver_idx >> 8)).cloned(),
    }
}

/// Decrypt one datagram into the peer's receive queue. Returns whether it authenticated.
fn ingest(
    state: &mut PeerState,
    peer: &Peer,
    src: SocketAddr,
    datagram: &[u8],
    out: &mut [u8],
    now: Instant,
) -> bool {
    let link = &mut state.link;
    let wire = &mut link.wire;
    let authenticated = match wire.tunn.decapsulate(Some(src.ip()), datagram, out) {
        TunnResult::WriteToNetwork(reply) => {
            // A cookie reply (type 3) is sent before anything is authenticated.
            let cookie = reply.first() == Some(&3);
            let _ = wire.udp.try_send_to(reply, src);
            if !cookie {
                state.handshakes += 1;
                // Packets queued while the handshake ran.
                while let TunnResult::WriteToNetwork(queued) = wire.tunn.decapsulate(None, &[], out)
                {
                    let _ = wire.udp.try_send_to(queued, src);
                }
            }
            !cookie
        }
        TunnResult::WriteToTunnelV4(packet, source) => {
            if source == peer.spec.address && link.rx.len() < BATCH * 2 {
                let syn = peer.spec.accept && is_syn_to(packet, RELAY_PORT);
                let mut buf = link.free.pop().unwrap_or_default();
                buf.clear();
                buf.extend_from_slice(packet);
                link.rx.push_back(buf);
                if syn {
                    // A listener must wait before any poll sees the SYN (a stream's read or
                    // write may run the stack before this batch ends); without one the stack
                    // would answer with a reset.
                    state.listen_for_syns(peer.local);
                }
            }
            true
        }
        TunnResult::WriteToTunnelV6(..) | TunnResult::Done => true,
        TunnResult::Err(e) => {
            debug!(peer = %peer.spec.name, %src, "dropped a datagram: {e:?}");
            false
        }
    };
    if authenticated {
        let link = &mut state.link;
        if link.wire.endpoint != Some(src) {
            debug!(peer = %peer.spec.name, %src, "peer endpoint");
            link.wire.endpoint = Some(src);
        }
        state.last_rx = Some(now);
    }
    authenticated
}

/// After a batch: run the peer's stack, hand over accepted streams, report it up.
fn after_batch(inner: &Inner, peer: &Arc<Peer>, now: Instant) {
    let (wake, accepted, came_up) = {
        let mut state = lock(&peer.state);
        let wake = state.poll(peer.epoch, now);
        if state.measuring.is_some() && state.link_rtt().is_some() {
            state.measuring = None;
            peer.measured.notify_waiters();
        }
        let accepted = if peer.spec.accept {
            state.take_accepted()
        } else {
            Vec::new()
        };
        let came_up = !state.up
            && state
                .last_rx
                .is_some_and(|t| now.duration_since(t) < peer.spec.liveness);
        if came_up {
            state.up = true;
            state.measure_rtt();
        }
        (wake, accepted, came_up)
    };
    if wake {
        peer.timer.notify_one();
    }
    for handle in accepted {
        let stream = OverlayStream::accepted(peer.clone(), handle);
        let queued = peer
            .accept_tx
            .as_ref()
            .is_some_and(|tx| match tx.try_send(stream) {
                Ok(()) => true,
                Err(e) => {
                    // Nobody takes streams fast enough: refuse this one (dropping resets it).
                    drop(e);
                    false
                }
            });
        if !queued {
            debug!(peer = %peer.spec.name, "accept queue full; stream reset");
        }
    }
    if came_up {
        (inner.events)(peer, true);
    }
}

async fn read_loop(inner: Arc<Inner>) {
    let mut buffers = vec![0u8; RECV_SLOTS * DATAGRAM];
    let mut metas = [RecvMeta::default(); RECV_SLOTS];
    let mut out = vec![0u8; DATAGRAM];
    let mut cookie = [0u8; 64];
    let mut touched: Vec<Arc<Peer>> = Vec::new();
    loop {
        tokio::select! {
            () = inner.stop.cancelled() => return,
            ready = inner.udp.readable() => if let Err(e) = ready {
                warn!("WireGuard socket failed: {e}");
                return;
            },
        }
        let now = clock::now();
        // A bounded amount of work per wake-up, so one busy socket cannot starve the rest.
        for _ in 0..BATCH / RECV_SLOTS {
            let received = {
                let mut slices: Vec<IoSliceMut<'_>> =
                    buffers.chunks_mut(DATAGRAM).map(IoSliceMut::new).collect();
                inner.udp.try_io(Interest::READABLE, || {
                    inner
                        .udp_state
                        .recv(UdpSockRef::from(&*inner.udp), &mut slices, &mut metas)
                })
            };
            let count = match received {
                Ok(count) => count,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    debug!("WireGuard receive: {e}");
                    break;
                }
            };
            for (slot, meta) in metas.iter().take(count).enumerate() {
                let start = slot * DATAGRAM;
                let filled = &buffers[start..start + meta.len.min(DATAGRAM)];
                // A GRO aggregate carries datagrams of `stride` bytes (the last may be shorter).
                for data in filled.chunks(meta.stride.max(1)) {
                    let src = meta.addr;
                    let Some(peer) = route(&inner, data, src, &mut cookie) else {
                        inner.dropped.fetch_add(1, Ordering::Relaxed);
                        continue;
                    };
                    let queued = {
                        let mut state = lock(&peer.state);
                        if !ingest(&mut state, &peer, src, data, &mut out, now) {
                            inner.dropped.fetch_add(1, Ordering::Relaxed);
                        }
                        state.link.rx.len()
                    };
                    if queued >= BATCH {
                        // Run the stack before its queue overflows.
                        after_batch(&inner, &peer, now);
                    }
                    if !touched.iter().any(|p| Arc::ptr_eq(p, &peer)) {
                        touched.push(peer);
                    }
                }
            }
        }
        for peer in touched.drain(..) {
            after_batch(&inner, &peer, now);
        }
    }
}

async fn limiter_loop(inner: Arc<Inner>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            () = inner.stop.cancelled() => return,
            _ = tick.tick() => inner.limiter.reset_count(),
        }
    }
}

/// Noise timers and the stack's deadlines for one peer, until the peer is removed.
async fn timer_loop(inner: Arc<Inner>, peer: Arc<Peer>) {
    let mut next_noise = clock::now();
    let mut out = vec![0u8; MTU + 64];
    // A peer this device dials (an agent toward its sentry) starts the handshake at once;
    // boringtun's timers alone would wait for the first persistent keepalive (5 s). Sent with
    // an awaited send: a socket this fresh has no known readiness yet, and `try_send_to`
    // would drop the datagram.
    let first = {
        let mut state = lock(&peer.state);
        let wire = &mut state.link.wire;
        match (
            wire.endpoint,
            wire.tunn.format_handshake_initiation(&mut out, false),
        ) {
            (Some(endpoint), TunnResult::WriteToNetwork(datagram)) => {
                Some((endpoint, datagram.to_vec(), wire.udp.clone()))
            }
            _ => None,
        }
    };
    if let Some((endpoint, datagram, udp)) = first {
        let _ = udp.send_to(&datagram, endpoint).await;
    }
    loop {
        let now = clock::now();
        let (sleep, went_down, stalled) = {
            let mut state = lock(&peer.state);
            if now >= next_noise {
                next_noise = now + NOISE_TICK;
                let wire = &mut state.link.wire;
                match wire.tunn.update_timers(&mut out) {
                    TunnResult::WriteToNetwork(datagram) => {
                        if let Some(endpoint) = wire.endpoint {
                            let _ = wire.udp.try_send_to(datagram, endpoint);
                        }
                    }
                    TunnResult::Err(WireGuardError::ConnectionExpired) => {}
                    TunnResult::Err(e) => debug!(peer = %peer.spec.name, "noise timers: {e:?}"),
                    _ => {}
                }
                state.unstick();
            }
            if state.link.wire.stalled {
                state.link.wire.flush();
            }
            state.deadline = next_noise;
            state.poll(peer.epoch, now);
            let went_down = state.up
                && state
                    .last_rx
                    .is_none_or(|t| now.duration_since(t) >= peer.spec.liveness);
            if went_down {
                state.up = false;
            }
            (
                state.deadline.saturating_duration_since(now),
                went_down,
                state.link.wire.stalled,
            )
        };
        if went_down {
            (inner.events)(&peer, false);
        }
        // Stalled: the stack's deadline may be now (it has segments to send), so wait for the
        // socket instead of spinning; the noise timers run again once it is writable.
        tokio::select! {
            () = peer.stop.cancelled() => break,
            () = tokio::time::sleep(sleep), if !stalled => {}
            _ = inner.udp.writable(), if stalled => {}
            () = peer.timer.notified() => {}
        }
    }
    // Removed: reset what is open so owners see an error instead of a silent stream.
    let mut state = lock(&peer.state);
    let handles: Vec<_> = state.sockets.iter().map(|(h, _)| h).collect();
    for handle in handles {
        state.sockets.get_mut::<tcp::Socket<'_>>(handle).abort();
    }
    state.poll(peer.epoch, clock::now());
    drop(state);
    if lock(&peer.state).up {
        lock(&peer.state).up = false;
        (inner.events)(&peer, false);
    }
}

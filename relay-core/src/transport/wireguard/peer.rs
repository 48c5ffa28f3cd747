//! A peer's public face: its name, session, streams, and connecting in its overlay.

use std::collections::{HashMap, VecDeque};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use boringtun::noise::Tunn;
use boringtun::x25519::PublicKey as WgPublic;
use smoltcp::iface::{Config as IfaceConfig, Interface, SocketSet};
use smoltcp::wire::{HardwareAddress, IpCidr};
use tokio::sync::{Notify, mpsc};

use super::link::{Link, Wire};
use super::stack::stamp;
use super::{
    ACCEPT_QUEUE, BATCH, EPHEMERAL, Inner, MAX_GSO_BYTES, MAX_WINDOW, MIN_WINDOW, MTU,
    OverlayStream, Peer, PeerSpec, PeerState, Window,
};
use crate::{clock, lock};

impl Peer {
    pub(super) fn new(inner: &Inner, spec: PeerSpec, index: u32) -> Arc<Self> {
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
                edges: super::tests::Edges::default(),
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
                last_confirmed: None,
                up: false,
                deadline: now,
                handshakes: 0,
                pending: false,
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
    pub(crate) fn liveness(&self) -> Duration {
        self.spec.liveness
    }

    #[cfg(test)]
    /// Whether the peer is up: a session both ends may send on was confirmed (see
    /// `device::ingest`), and an authenticated packet arrived within the liveness window.
    #[must_use]
    pub(crate) fn is_up(&self) -> bool {
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
    pub(crate) fn stream_window(&self) -> usize {
        lock(&self.state).stream_window()
    }

    /// Relayed streams open now.
    #[must_use]
    pub fn streams(&self) -> usize {
        lock(&self.state).streams
    }

    /// The next stream the peer opened to us; `None` once the peer is removed. Only one
    /// caller may take streams (the first gets the queue).
    pub(crate) fn take_accepted(&self) -> Option<mpsc::Receiver<OverlayStream>> {
        lock(&self.accepted).take()
    }

    /// Open a TCP connection to `to` inside the overlay.
    pub async fn connect(self: &Arc<Self>, to: SocketAddrV4) -> std::io::Result<OverlayStream> {
        OverlayStream::connect(self.clone(), to).await
    }
}

//! The sentry's side of every transport: the QUIC endpoint, the WireGuard device and the
//! TCP+TLS listener, each behind its handshake gate; agents' tunnels coming up and going down
//! are told to the engine through [`TunnelSink`]. The engine binds, starts, re-pins (reload)
//! and shuts these down without knowing which transports there are.

use std::collections::HashMap;
use std::fmt::Display;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use quinn::Endpoint;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::budget::Ledger;
use super::pin::IdentityError;
use super::quic::{self, QuicError, Tuning, code};
use super::tls::{self, TlsIo};
use super::{TlsSession, Tunnel, TunnelStream, wireguard};
use crate::admission::{
    DEFAULT_HANDSHAKE_LIMITS, Handshake, HandshakeGate, HandshakePermit, HandshakeRefusal,
};
use crate::config::SentryConfig;
use crate::keys::{PrivateKey, PublicKey};
use crate::log_limit::LogLimit;
use crate::metrics::Families;
use crate::{clock, lock};

/// Longest an agent's tunnel handshake may take: QUIC's, or TLS's with its role byte.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

static HANDSHAKE_LOG: LogLimit = LogLimit::new(Duration::from_secs(10));
static HANDSHAKE_DROP_LOG: LogLimit = LogLimit::new(Duration::from_secs(10));
static ACCEPT_LOG: LogLimit = LogLimit::new(Duration::from_secs(10));

/// What the transports tell the engine, and ask of it.
pub(crate) trait TunnelSink: Send + Sync + 'static {
    /// The agent a pinned key belongs to now (`None`: unpinned since its handshake).
    fn name_of(&self, key: &PublicKey) -> Option<String>;
    /// `agent`'s `tunnel` is up (authenticated with `key`; `None` for a WireGuard peer).
    fn up(&self, agent: &str, tunnel: Tunnel, key: Option<PublicKey>, remote: &dyn Display);
    /// `agent`'s `tunnel` went down (`why`).
    fn down(&self, agent: &str, tunnel: &Tunnel, remote: &dyn Display, why: &dyn Display);
    /// `agent` opened a stream for egress (see [`super::egress`]); its request is not read
    /// yet. Called from the tunnel's own task: spawn, never wait.
    fn egress(self: Arc<Self>, agent: &str, stream: TunnelStream);
}

/// Why a transport could not listen, or could not take a new set of pinned keys.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error(transparent)]
    Quic(#[from] QuicError),
    #[error(transparent)]
    WireGuard(#[from] wireguard::WgError),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("tls_listen: cannot listen on {addr}: {source}")]
    TlsListen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// WireGuard peers going up (`true`) and down.
type PeerEvents = mpsc::UnboundedReceiver<(Arc<wireguard::Peer>, bool)>;

/// The sentry's tunnel listeners, and what they count.
pub(crate) struct Listeners {
    key: PrivateKey,
    /// The QUIC endpoint, when `quic_listen` is set.
    endpoint: Option<Endpoint>,
    quic_addr: Option<SocketAddr>,
    /// The WireGuard listener, when configured.
    wireguard: Option<wireguard::Device>,
    /// WireGuard peers going up and down (taken by [`Listeners::start`]).
    wg_events: Mutex<Option<PeerEvents>>,
    /// The TCP+TLS tunnel listener, when configured (taken by [`Listeners::start`]).
    tls_listener: Mutex<Option<TcpListener>>,
    tls_addr: Option<SocketAddr>,
    /// The TLS settings of `tls_listen`, swapped on reload with the pinned keys.
    tls_config: ArcSwap<rustls::ServerConfig>,
    /// Idle TLS data connections, per pinned key they authenticated with (a key unpinned by a
    /// reload takes its pool with it; a new key under the same name gets a pool of its own).
    tls_pools: Mutex<HashMap<PublicKey, Arc<tls::Pool>>>,
    /// The handshake gates of the QUIC and the TLS listener.
    quic_gate: Arc<HandshakeGate>,
    tls_gate: Arc<HandshakeGate>,
    handshake_refused: [AtomicU64; HandshakeRefusal::ALL.len()],
    handshake_failed: AtomicU64,
    tls_handshake_failed: AtomicU64,
    /// TLS tunnel handshakes completed: [full, resumed].
    tls_handshakes: [AtomicU64; 2],
    /// Tunnel streams shed because their client stopped reading (see [`super::budget`]).
    streams_shed: Arc<AtomicU64>,
    /// Cancelled when the sentry stops accepting (shutdown).
    accepting: CancellationToken,
    /// Stops the WireGuard device and the TLS control connections after the drain.
    stop: CancellationToken,
    epoch: Instant,
}

/// A started listener's tasks: the listeners and the engine's sink.
#[derive(Clone)]
struct Run {
    listeners: Arc<Listeners>,
    sink: Arc<dyn TunnelSink>,
}

impl std::ops::Deref for Run {
    type Target = Listeners;

    fn deref(&self) -> &Listeners {
        &self.listeners
    }
}

impl Listeners {
    /// Bind the QUIC endpoint, and the WireGuard device and the TLS listener when configured,
    /// pinning the agents' keys `names`. Nothing is accepted before [`Self::start`].
    pub(crate) async fn bind(
        config: &SentryConfig,
        key: &PrivateKey,
        names: &HashMap<PublicKey, String>,
        accepting: CancellationToken,
        epoch: Instant,
    ) -> Result<Self, ListenError> {
        let (endpoint, quic_addr) = match config.quic_listen {
            Some(listen) => {
                let endpoint =
                    quic::server_endpoint(listen, key, names.clone(), &Tuning::default())?;
                let bound = endpoint.local_addr().map_err(|source| QuicError::Bind {
                    addr: listen,
                    source,
                })?;
                (Some(endpoint), Some(bound))
            }
            None => (None, None),
        };
        let tls_config = tls::server_config(key, names.clone())?;
        let tls_listener = match config.tls_listen {
            Some(addr) => Some(
                crate::metrics::bind(addr)
                    .map_err(|source| ListenError::TlsListen { addr, source })?,
            ),
            None => None,
        };
        let stop = CancellationToken::new();
        let (events, wg_events) = mpsc::unbounded_channel();
        let wireguard = match config.wireguard {
            Some(wg) => {
                let on_event: wireguard::PeerEvents = Arc::new(move |peer, up| {
                    let _ = events.send((peer.clone(), up));
                });
                let device = wireguard::Device::bind(
                    wg.listen,
                    key.wireguard_secret(),
                    wg.address,
                    &wireguard_peers(config),
                    on_event,
                    stop.clone(),
                )
                .await?;
                Some(device)
            }
            None => None,
        };
        Ok(Self {
            key: key.clone(),
            endpoint,
            quic_addr,
            wireguard,
            wg_events: Mutex::new(Some(wg_events)),
            tls_addr: tls_listener.as_ref().and_then(|l| l.local_addr().ok()),
            tls_listener: Mutex::new(tls_listener),
            tls_config: ArcSwap::new(tls_config),
            tls_pools: Mutex::new(HashMap::new()),
            quic_gate: HandshakeGate::new(DEFAULT_HANDSHAKE_LIMITS),
            tls_gate: HandshakeGate::new(TLS_HANDSHAKE_LIMITS),
            handshake_refused: Default::default(),
            handshake_failed: AtomicU64::new(0),
            tls_handshake_failed: AtomicU64::new(0),
            tls_handshakes: Default::default(),
            streams_shed: Arc::default(),
            accepting,
            stop,
            epoch,
        })
    }

    /// Accept agents on every listener, telling `sink` of tunnels up and down.
    pub(crate) fn start(self: &Arc<Self>, sink: Arc<dyn TunnelSink>) {
        let run = Run {
            listeners: self.clone(),
            sink,
        };
        if let Some(endpoint) = self.endpoint.clone() {
            tokio::spawn(accept_agents(run.clone(), endpoint));
        }
        if let Some(device) = &self.wireguard
            && let Some(listen) = device.local_addr()
        {
            info!(%listen, "WireGuard listening");
        }
        if let Some(events) = lock(&self.wg_events).take() {
            tokio::spawn(wireguard_events(run.clone(), events));
        }
        if let Some(listener) = lock(&self.tls_listener).take() {
            if let Ok(listen) = listener.local_addr() {
                info!(%listen, "TLS tunnel listening");
            }
            tokio::spawn(accept_tls(run, listener));
        }
    }

    /// Pin a new set of agents (a reload): every transport admits exactly these keys from now
    /// on. Nothing changes if the new settings cannot be made.
    pub(crate) fn set_pins(
        &self,
        config: &SentryConfig,
        names: &HashMap<PublicKey, String>,
    ) -> Result<(), ListenError> {
        let server = quic::server_config(&self.key, names.clone(), &Tuning::default())?;
        let tls_server = tls::server_config(&self.key, names.clone())?;
        if let Some(endpoint) = &self.endpoint {
            endpoint.set_server_config(Some(server));
        }
        self.tls_config.store(tls_server);
        if let Some(device) = &self.wireguard {
            device.set_peers(&wireguard_peers(config));
        }
        Ok(())
    }

    /// The public key the listeners were bound with (a changed key needs a restart).
    pub(crate) fn public_key(&self) -> PublicKey {
        self.key.public_key()
    }

    /// A reload unpinned the key `tunnel` of `agent` authenticated with: it takes no new
    /// client already (it left the registry); its idle TLS data connections close now, and
    /// the tunnel itself once its relayed connections ended, within `drain`.
    pub(crate) fn retire(&self, agent: &str, tunnel: Tunnel, key: PublicKey, drain: Duration) {
        if let Some(pool) = lock(&self.tls_pools).remove(&key) {
            pool.clear();
        }
        warn!(%agent, transport = tunnel.transport(), "the reload unpinned this tunnel's key: it takes no new client, and closes once its relayed connections end (within drain_timeout, {drain:?})");
        tunnel.retire(drain);
    }

    /// Close every tunnel (after the engine's drain): WireGuard and TLS at once, QUIC with a
    /// close frame and up to a second for the agents to see it.
    pub(crate) async fn shutdown(&self) {
        self.stop.cancel();
        if let Some(endpoint) = &self.endpoint {
            endpoint.close(code::SHUTDOWN, b"sentry shutting down");
            let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
        }
    }

    /// The pool of idle TLS data connections authenticated with `key`.
    fn tls_pool(&self, key: PublicKey) -> Arc<tls::Pool> {
        lock(&self.tls_pools).entry(key).or_default().clone()
    }

    /// The bound QUIC address, when `quic_listen` is set.
    pub(crate) fn quic_addr(&self) -> Option<SocketAddr> {
        self.quic_addr
    }

    /// The bound TCP+TLS tunnel address, when `tls_listen` is set.
    pub(crate) fn tls_addr(&self) -> Option<SocketAddr> {
        self.tls_addr
    }

    /// The WireGuard device, when `wireguard_listen` is set.
    pub(crate) fn wireguard(&self) -> Option<&wireguard::Device> {
        self.wireguard.as_ref()
    }

    /// The handshake families of `/metrics`: drops by reason, in flight, failures, TLS
    /// resumptions, and streams shed.
    pub(crate) fn collect_handshakes(&self, out: &mut Families<'_>) -> std::fmt::Result {
        out.counters(
            "tunnel_handshakes_dropped",
            "Tunnel handshake attempts dropped unanswered by the handshake limits, by reason.",
            HandshakeRefusal::ALL.iter().map(|r| {
                (
                    [("reason", r.as_str())],
                    self.handshake_refused[r.index()].load(Ordering::Relaxed),
                )
            }),
        )?;
        out.gauges(
            "tunnel_handshakes_in_flight",
            "Tunnel handshakes in progress now, by listener (a flood of strangers shows here).",
            [
                ([("transport", "quic")], self.quic_gate.in_flight()),
                ([("transport", "tls")], self.tls_gate.in_flight()),
            ]
            .map(|(l, n)| (l, i64::try_from(n).unwrap_or(i64::MAX))),
        )?;
        out.counters(
            "tunnel_handshakes_failed",
            "Tunnel handshakes that failed or timed out (unknown keys among them).",
            [
                (
                    [("transport", "quic")],
                    self.handshake_failed.load(Ordering::Relaxed),
                ),
                (
                    [("transport", "tls")],
                    self.tls_handshake_failed.load(Ordering::Relaxed),
                ),
            ],
        )?;
        out.counters(
            "tunnel_tls_handshakes",
            "TLS tunnel handshakes completed (control and data connections), by kind: a resumed \
             one costs no certificate signature or verification.",
            [
                (
                    [("kind", "full")],
                    self.tls_handshakes[0].load(Ordering::Relaxed),
                ),
                (
                    [("kind", "resumed")],
                    self.tls_handshakes[1].load(Ordering::Relaxed),
                ),
            ],
        )?;
        out.counters(
            "tunnel_streams_shed",
            "Relayed connections closed because their client stopped reading while holding \
             tunnel flow-control credit: past the tunnel's budget of held streams (the client \
             address holding the most first), or for 60 s.",
            [(
                [("transport", "quic")],
                self.streams_shed.load(Ordering::Relaxed),
            )],
        )?;
        Ok(())
    }

    /// The WireGuard families of `/metrics`, when `wireguard_listen` is set.
    pub(crate) fn collect_wireguard(&self, out: &mut Families<'_>) -> std::fmt::Result {
        let Some(device) = &self.wireguard else {
            return Ok(());
        };
        out.counters(
            "wireguard_datagrams_dropped",
            "WireGuard datagrams dropped without an answer: unknown key, bad MAC, unknown \
             receiver index, failed decryption or replay.",
            [(
                [(
                    "listen",
                    device
                        .local_addr()
                        .map_or_else(String::new, |a| a.to_string()),
                )],
                device.dropped(),
            )],
        )?;
        out.gauges(
            "wireguard_stream_window_bytes",
            "Buffer each way, so the most in flight per round trip, that a new relayed \
             stream to this WireGuard peer gets now: wireguard_window, or with \"auto\" \
             sized for the round trip measured.",
            device.peers().iter().map(|peer| {
                (
                    [("agent", peer.name().to_owned())],
                    i64::try_from(peer.stream_window()).unwrap_or(i64::MAX),
                )
            }),
        )?;
        Ok(())
    }
}

async fn accept_agents(run: Run, endpoint: Endpoint) {
    let gate = run.quic_gate.clone();
    loop {
        let incoming = tokio::select! {
            () = run.accepting.cancelled() => return,
            incoming = endpoint.accept() => match incoming {
                Some(incoming) => incoming,
                None => return,
            },
        };
        let remote = incoming.remote_address();
        let validated = incoming.remote_address_validated();
        // Decided on the first packet, before any cryptography is spent on the attempt.
        match gate.decide(clock::now() - run.epoch, remote.ip(), validated) {
            Handshake::Accept(permit) => {
                tokio::spawn(tunnel(incoming, run.clone(), permit));
            }
            Handshake::Retry if incoming.may_retry() => {
                if let Err(e) = incoming.retry() {
                    e.into_incoming().ignore();
                }
            }
            Handshake::Retry => incoming.ignore(),
            Handshake::Ignore(reason) => {
                incoming.ignore();
                run.handshake_refused[reason.index()].fetch_add(1, Ordering::Relaxed);
                if let Some(suppressed) = HANDSHAKE_DROP_LOG.allow() {
                    warn!(%remote, transport = "quic", reason = reason.as_str(), in_flight = gate.in_flight(), suppressed, "dropped tunnel handshake attempts (a flood, or an agent reconnecting too fast)");
                }
            }
        }
    }
}

/// One agent tunnel, from handshake to close.
async fn tunnel(incoming: quinn::Incoming, run: Run, permit: HandshakePermit) {
    let remote = incoming.remote_address();
    let handshake = tokio::select! {
        handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, incoming) => handshake,
        () = permit.evicted() => {
            // Its place went to a newer attempt (every place was taken): dropping the attempt
            // ends it.
            run.handshake_refused[HandshakeRefusal::Evicted.index()].fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    let conn = match handshake {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => {
            run.handshake_failed.fetch_add(1, Ordering::Relaxed);
            if let Some(suppressed) = HANDSHAKE_LOG.allow() {
                warn!(%remote, transport = "quic", suppressed, "refused a tunnel handshake: {e} (is this agent's public key listed in [[agent]]?)");
            }
            return;
        }
        Err(_) => {
            run.handshake_failed.fetch_add(1, Ordering::Relaxed);
            debug!(%remote, "tunnel handshake timed out");
            return;
        }
    };
    let key = quic::peer_key(&conn);
    let Some(agent) = key.and_then(|k| run.sink.name_of(&k)) else {
        // The verifier admits only pinned keys; a reload may have unpinned this one between
        // its handshake and now.
        conn.close(code::SHUTDOWN, b"");
        return;
    };
    // A pinned agent: its address gets a reserved place in later handshakes.
    permit.authenticated();
    let ledger = Ledger::watch(&conn, run.streams_shed.clone());
    let tunnel = Tunnel::Quic(conn.clone(), ledger.clone());
    run.sink.up(&agent, tunnel.clone(), key, &remote);
    // Streams the agent opens are egress requests; the tunnel lives until the connection
    // closes.
    let reason = loop {
        match conn.accept_bi().await {
            Ok((send, recv)) => {
                let stream = TunnelStream::Quic(send, ledger.recv(recv, None));
                run.sink.clone().egress(&agent, stream);
            }
            Err(reason) => break reason,
        }
    };
    run.sink.down(&agent, &tunnel, &remote, &reason);
}

/// The WireGuard peers of a config: agents with an overlay address, and plain peers.
pub(crate) fn wireguard_peers(config: &SentryConfig) -> Vec<wireguard::PeerSpec> {
    let window = config
        .wireguard
        .map_or(crate::config::DEFAULT_WIREGUARD_WINDOW, |wg| wg.window);
    let agents = config.agents.iter().filter_map(|agent| {
        Some(wireguard::PeerSpec {
            name: agent.name.clone(),
            public: agent.public_key.wireguard()?,
            address: agent.wireguard_address?,
            endpoint: None,
            // Keepalives both ways: WireGuard answers none, and an agent that hears nothing
            // from its sentry for AGENT_LIVENESS counts the tunnel down (and rebuilds it)
            // however well its own packets arrive.
            keepalive: Some(wireguard::AGENT_KEEPALIVE),
            liveness: wireguard::AGENT_LIVENESS,
            // An agent's egress streams; the engine refuses them unless it has egress.
            accept: true,
            window,
        })
    });
    let plain = config
        .wireguard_peers
        .iter()
        .map(|peer| wireguard::PeerSpec {
            name: peer.name.clone(),
            public: peer.public_key,
            address: peer.address,
            endpoint: None,
            keepalive: None,
            liveness: wireguard::PLAIN_LIVENESS,
            accept: false,
            window,
        });
    agents.chain(plain).collect()
}

/// WireGuard peers going up and down, into the registry. The first time an agent's peer
/// comes up, the streams it opens (egress) start going to the engine.
async fn wireguard_events(run: Run, mut events: PeerEvents) {
    while let Some((peer, up)) = events.recv().await {
        let name = peer.name().to_owned();
        let tunnel = Tunnel::WireGuard(peer.clone());
        let remote = peer
            .endpoint()
            .map_or_else(|| "-".to_owned(), |e| e.to_string());
        if up {
            if let Some(mut accepted) = peer.take_accepted() {
                let sink = run.sink.clone();
                let agent = name.clone();
                // Ends when the peer is gone (removed by a reload): its queue closes.
                tokio::spawn(async move {
                    while let Some(stream) = accepted.recv().await {
                        sink.clone().egress(&agent, TunnelStream::Overlay(stream));
                    }
                });
            }
            run.sink.up(&name, tunnel, None, &remote);
        } else {
            let why = format!("no packet within {:?}", peer.liveness());
            run.sink.down(&name, &tunnel, &remote, &why);
        }
    }
}

/// Accept agents' TCP+TLS connections on `tls_listen`.
async fn accept_tls(run: Run, listener: TcpListener) {
    // Agents open a TLS connection per relayed connection, so the per-address rate is far
    // above QUIC's; every attempt has completed a TCP handshake (its address is real) and
    // the in-flight caps still bound what a flood can hold.
    let gate = run.tls_gate.clone();
    loop {
        let accepted = tokio::select! {
            biased;
            () = run.accepting.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let (tcp, remote) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                if let Some(suppressed) = ACCEPT_LOG.allow() {
                    warn!(transport = "tls", suppressed, "accept failed: {e}");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        match gate.decide(clock::now() - run.epoch, remote.ip(), true) {
            Handshake::Accept(permit) => {
                tokio::spawn(tls_connection(tcp, remote, run.clone(), permit));
            }
            Handshake::Retry => drop(tcp),
            Handshake::Ignore(reason) => {
                drop(tcp);
                run.handshake_refused[reason.index()].fetch_add(1, Ordering::Relaxed);
                if let Some(suppressed) = HANDSHAKE_DROP_LOG.allow() {
                    warn!(%remote, transport = "tls", reason = reason.as_str(), in_flight = gate.in_flight(), suppressed, "dropped tunnel handshake attempts (a flood, or an agent reconnecting too fast)");
                }
            }
        }
    }
}

/// Handshake limits of `tls_listen` (see [`accept_tls`]).
const TLS_HANDSHAKE_LIMITS: crate::admission::HandshakeLimits = crate::admission::HandshakeLimits {
    max_in_flight: 256,
    max_in_flight_per_ip: 64,
    retry_above: usize::MAX,
    rate_per_ip: crate::config::units::Rate {
        count: std::num::NonZeroU32::new(2000).expect("invariant: 2000 is not zero"),
        per: Duration::from_secs(1),
    },
    // An agent opens up to 16 data connections at once, and a few agents may reconnect
    // together.
    reserved: 64,
};

/// One TCP+TLS connection from an agent: handshake, role byte, then the control loop or the
/// pool.
async fn tls_connection(tcp: TcpStream, remote: SocketAddr, run: Run, permit: HandshakePermit) {
    tls::tune(&tcp);
    let acceptor = tokio_rustls::TlsAcceptor::from(run.tls_config.load_full());
    let handshake = async {
        let mut io = acceptor.accept(tcp).await?;
        let mut role = [0u8; 1];
        io.read_exact(&mut role).await?;
        Ok::<_, std::io::Error>((TlsIo::from(io), role[0]))
    };
    let handshake = tokio::select! {
        handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake) => handshake,
        () = permit.evicted() => {
            run.handshake_refused[HandshakeRefusal::Evicted.index()].fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    let (io, role) = match handshake {
        Ok(Ok(done)) => done,
        Ok(Err(e)) => {
            run.tls_handshake_failed.fetch_add(1, Ordering::Relaxed);
            if let Some(suppressed) = HANDSHAKE_LOG.allow() {
                warn!(%remote, transport = "tls", suppressed, "refused a tunnel handshake: {e} (is this agent's public key listed in [[agent]]?)");
            }
            return;
        }
        Err(_) => {
            run.tls_handshake_failed.fetch_add(1, Ordering::Relaxed);
            debug!(%remote, transport = "tls", "tunnel handshake timed out");
            return;
        }
    };
    run.tls_handshakes[usize::from(tls::resumed(&io))].fetch_add(1, Ordering::Relaxed);
    // Checked again after the handshake: a resumed session skips the verifier, and a reload
    // may have unpinned the key since.
    let Some(key) = tls::peer_key(&io) else {
        return;
    };
    let Some(agent) = run.sink.name_of(&key) else {
        return;
    };
    permit.authenticated();
    match tls::Role::from_byte(role) {
        Some(tls::Role::Data) => run.tls_pool(key).push(io),
        Some(tls::Role::Egress) => {
            let stream = TunnelStream::Tls(Box::new(tls::TlsRelay::new(io)));
            run.sink.clone().egress(&agent, stream);
        }
        Some(tls::Role::Control) => tls_control(io, agent, key, remote, &run).await,
        None => debug!(%remote, %agent, "unknown role byte on a TLS tunnel connection"),
    }
}

/// An agent's TLS control connection: the tunnel is up while it runs.
async fn tls_control(io: TlsIo, agent: String, key: PublicKey, remote: SocketAddr, run: &Run) {
    let (asks, asked) = mpsc::channel(64);
    let session = Arc::new(TlsSession {
        control: tls::Control::default(),
        pool: run.tls_pool(key),
        asks,
        close: CancellationToken::new(),
    });
    let tunnel = Tunnel::Tls(session.clone());
    run.sink.up(&agent, tunnel.clone(), Some(key), &remote);
    let reason = tokio::select! {
        why = tls::run_control(io, &session.control, asked, |_| {}, None) => why,
        () = session.close.cancelled() => "closed by the sentry".to_owned(),
        () = run.stop.cancelled() => "sentry shutting down".to_owned(),
    };
    run.sink.down(&agent, &tunnel, &remote, &reason);
}

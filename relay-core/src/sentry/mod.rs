//! The sentry engine: public TCP and UDP listeners relayed to connected agents over QUIC,
//! WireGuard or TCP+TLS (UDP routes in `udp.rs`, one flow per client address).
//!
//! [`Sentry::bind`] binds every socket first (so a port conflict fails start-up, not the
//! first client), then [`Sentry::run`] accepts agents and clients until shutdown.
//! [`SentryHandle::reload`] applies a new config to the running sentry.
//!
//! Invariants:
//! - The accept loops never wait on a handshake or a peer: each agent handshake and each
//!   relayed connection runs in its own task, handshakes under a timeout.
//! - The registry holds at most one tunnel per agent name; a reconnecting agent replaces its
//!   old tunnel (closed with `REPLACED`), so a restarted agent serves at once.
//! - Every accepted client passes admission control ([`crate::admission`]) before any tunnel
//!   work: a refused one is closed at once and counted; an admitted one holds a permit until
//!   its connection ends. The decision is synchronous and never waits.
//! - A client is relayed only after an agent answered `Ok` to its header; with no connected
//!   upstream, or every upstream refusing, the client is closed at once.
//! - A reload never cuts an established connection: routes are matched by their configured
//!   listen address (and, for port 0, their name); a kept route swaps its policy (admission limits, lists, upstreams) for
//!   later connections, a removed one closes its listener and leaves its connections to
//!   finish, an added one binds. Every new socket is bound before anything changes, so a
//!   reload that cannot bind changes nothing.

mod gateway;
mod health;
pub use health::HOLD_DOWN;
mod pool;
mod timer;
mod udp;
mod websocket;

use std::collections::HashMap;
use std::future::Future;
use std::net::{SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::{ArcSwap, ArcSwapOption};
use quinn::{Connection, Endpoint};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::admission::{
    DEFAULT_HANDSHAKE_LIMITS, Gate, Handshake, HandshakeGate, HandshakePermit, HandshakeRefusal,
    Permit, Refusal, SentryCount,
};
use crate::config::{Route, SentryConfig, TransportKind, Upstream};
use crate::keys::{PrivateKey, PublicKey};
use crate::log_limit::LogLimit;
use crate::metrics::{self, Families, Observe};
use crate::relay::{ByteCounters, Header, Proxy, PumpEnd, Status, encode_proxy_header, pump};
use crate::transport::budget::Ledger;
use crate::transport::pin::IdentityError;
use crate::transport::quic::{self, QuicError, Tuning, code};
use crate::transport::tls::{self, TlsIo, TlsRelay};
use crate::transport::{TunnelStream, wireguard};
use crate::{clock, lock};

/// Longest an agent's QUIC handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest the agent may take to answer a relay header. It is above the agent's own connect
/// timeout (3 s), so an agent that is alive always answers in time; one that does not is
/// treated as dead and its tunnel closed, so later clients fail over without waiting.
pub const STATUS_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest to wait for a free stream on a tunnel that carries its maximum.
const OPEN_TIMEOUT: Duration = Duration::from_secs(2);

static HANDSHAKE_LOG: LogLimit = LogLimit::new(Duration::from_secs(10));
static HANDSHAKE_DROP_LOG: LogLimit = LogLimit::new(Duration::from_secs(10));
static ACCEPT_LOG: LogLimit = LogLimit::new(Duration::from_secs(10));
static NO_UPSTREAM_LOG: LogLimit = LogLimit::new(Duration::from_secs(10));

/// Why the sentry could not start, or a reload could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
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
    #[error("route {route:?}: cannot listen on {addr}: {source}")]
    Listen {
        route: String,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("metrics_listen: cannot listen on {addr}: {source}")]
    Metrics {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// What a reload changed, for the log line.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReloadReport {
    /// Routes bound by this reload.
    pub added: Vec<String>,
    /// Routes whose listeners were closed (their open connections finish).
    pub removed: Vec<String>,
    /// Routes kept, with the new policy.
    pub kept: usize,
    /// Changes that only a restart applies (the running value stays).
    pub need_restart: Vec<&'static str>,
}

/// A bound sentry, ready to run.
pub struct Sentry {
    shared: Arc<Shared>,
    initial: Vec<(Arc<RouteSlot>, Listener)>,
    metrics: Option<TcpListener>,
    /// WireGuard peers going up and down.
    wg_events: mpsc::UnboundedReceiver<(Arc<wireguard::Peer>, bool)>,
    /// The TCP+TLS tunnel listener, when configured.
    tls_listener: Option<TcpListener>,
}

/// A cheap handle to observe and reload a running sentry.
#[derive(Clone)]
pub struct SentryHandle {
    shared: Arc<Shared>,
}

struct Shared {
    endpoint: Endpoint,
    /// The WireGuard listener, when configured.
    wireguard: Option<wireguard::Device>,
    /// Stops the WireGuard device after the drain (`stop` ends accepting before it).
    transport_stop: CancellationToken,
    quic_addr: SocketAddr,
    tls_addr: Option<SocketAddr>,
    /// The TLS settings of `tls_listen`, swapped on reload with the pinned keys.
    tls_config: ArcSwap<rustls::ServerConfig>,
    /// Idle TLS data connections, per pinned key they authenticated with (a key unpinned by a
    /// reload takes its pool with it; a new key under the same name gets a pool of its own).
    tls_pools: Mutex<HashMap<PublicKey, Arc<tls::Pool>>>,
    metrics_addr: Option<SocketAddr>,
    key: PrivateKey,
    /// The config in force (the last one applied).
    config: Mutex<SentryConfig>,
    tunnels: Registry,
    routes: Mutex<Vec<Arc<RouteSlot>>>,
    open: Arc<SentryCount>,
    handshake_refused: [AtomicU64; HandshakeRefusal::ALL.len()],
    /// The handshake gates of the QUIC and the TLS listener.
    quic_gate: Arc<HandshakeGate>,
    tls_gate: Arc<HandshakeGate>,
    handshake_failed: AtomicU64,
    tls_handshake_failed: AtomicU64,
    /// TLS tunnel handshakes completed: [full, resumed].
    tls_handshakes: [AtomicU64; 2],
    /// Tunnel streams shed because their client stopped reading (see
    /// [`crate::transport::budget`]).
    streams_shed: Arc<AtomicU64>,
    /// Upstreams held down after a refusal.
    health: health::Health,
    reloads: metrics::Reloads,
    stop: CancellationToken,
    relays: TaskTracker,
    epoch: Instant,
}

/// One public listener and what it counts.
struct RouteSlot {
    /// The listen address as configured (the key that matches routes across reloads).
    configured: SocketAddr,
    /// The bound address.
    local: SocketAddr,
    route: ArcSwap<Route>,
    gate: Arc<Gate>,
    bytes: ByteCounters,
    no_upstream: AtomicU64,
    /// UDP routes: datagrams dropped because their flow's queue was full.
    datagrams_dropped: AtomicU64,
    /// Cancelled when a reload removes the route (and at shutdown).
    stop: CancellationToken,
    /// `Some` while the route is `protocol = "jsonrpc"`.
    gateway: ArcSwapOption<gateway::Gateway>,
}

/// Connected agents by name.
struct Registry {
    /// Pinned key → agent name; swapped on reload.
    names: ArcSwap<HashMap<PublicKey, String>>,
    state: Mutex<Tunnels>,
    /// Bumped on every change, for waiters.
    changed: watch::Sender<u64>,
}

#[derive(Default)]
struct Tunnels {
    live: HashMap<String, Live>,
    /// Tunnels established per agent since start.
    connects: HashMap<String, u64>,
}

struct Live {
    tunnel: Tunnel,
    since: Instant,
    /// The pinned key the tunnel authenticated with (`None`: a WireGuard peer, whose device
    /// drops it when its key goes).
    key: Option<PublicKey>,
}

/// An agent's tunnel.
#[derive(Clone)]
enum Tunnel {
    /// A QUIC connection and the ledger of its streams' credit.
    Quic(Connection, Arc<Ledger>),
    WireGuard(Arc<wireguard::Peer>),
    Tls(Arc<TlsSession>),
}

/// An agent's TCP+TLS tunnel: its control connection and its pool of data connections.
struct TlsSession {
    control: tls::Control,
    pool: Arc<tls::Pool>,
    /// Counts for `WANT` frames to the agent.
    asks: mpsc::Sender<u32>,
    /// Ends the control connection (replaced, unresponsive, or shutdown).
    close: CancellationToken,
}

impl Tunnel {
    fn transport(&self) -> &'static str {
        match self {
            Self::Quic(..) => TransportKind::Quic.as_str(),
            Self::WireGuard(_) => TransportKind::WireGuard.as_str(),
            Self::Tls(_) => TransportKind::Tls.as_str(),
        }
    }

    fn rtt(&self) -> Duration {
        match self {
            Self::Quic(conn, _) => conn.rtt(),
            Self::WireGuard(peer) => peer.session().1.unwrap_or_default(),
            Self::Tls(session) => session.control.rtt(),
        }
    }

    fn same(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Quic(a, _), Self::Quic(b, _)) => a.stable_id() == b.stable_id(),
            (Self::WireGuard(a), Self::WireGuard(b)) => Arc::ptr_eq(a, b),
            (Self::Tls(a), Self::Tls(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }

    /// Close a tunnel the sentry gives up on (`code` tells a QUIC agent why). A WireGuard
    /// session has no close: the peer's liveness timeout ends it.
    fn close(&self, code: quinn::VarInt, why: &'static [u8]) {
        match self {
            Self::Quic(conn, _) => conn.close(code, why),
            Self::WireGuard(_) => {}
            Self::Tls(session) => session.close.cancel(),
        }
    }
}

enum OpenError {
    /// The agent answered, but not `Ok`.
    Refused(Option<Status>),
    /// The agent did not answer in time. `alive`: it sent packets meanwhile (its tunnel is
    /// busy, not dead).
    Unresponsive { alive: bool },
    /// The tunnel failed or had no free stream.
    Tunnel(String),
}

fn agent_names(config: &SentryConfig) -> HashMap<PublicKey, String> {
    config
        .agents
        .iter()
        .map(|a| (a.public_key, a.name.clone()))
        .collect()
}

/// A route's bound socket.
enum Listener {
    Tcp(TcpListener),
    Udp(tokio::net::UdpSocket),
}

fn bind_route(route: &Route) -> Result<(Listener, SocketAddr), StartError> {
    let listen_error = |source| StartError::Listen {
        route: route.name.clone(),
        addr: route.listen,
        source,
    };
    if route.udp {
        let socket = udp::bind(route.listen).map_err(listen_error)?;
        let local = socket.local_addr().map_err(listen_error)?;
        return Ok((Listener::Udp(socket), local));
    }
    let (listener, local) = bind_tcp(route.listen).map_err(listen_error)?;
    Ok((Listener::Tcp(listener), local))
}

/// Serve a bound route: accept TCP clients, or receive UDP datagrams.
fn spawn_route(slot: Arc<RouteSlot>, listener: Listener, shared: Arc<Shared>) {
    match listener {
        Listener::Tcp(listener) => {
            tokio::spawn(accept_clients(slot, listener, shared));
        }
        Listener::Udp(socket) => {
            tokio::spawn(udp::serve(slot, socket, shared));
        }
    }
}

fn bind_tcp(addr: SocketAddr) -> std::io::Result<(TcpListener, SocketAddr)> {
    let listener = metrics::bind(addr)?;
    let local = listener.local_addr()?;
    Ok((listener, local))
}

impl Sentry {
    /// Bind the QUIC endpoint, every route listener and the metrics listener.
    pub async fn bind(config: &SentryConfig, key: &PrivateKey) -> Result<Self, StartError> {
        let names = agent_names(config);
        let endpoint =
            quic::server_endpoint(config.quic_listen, key, names.clone(), &Tuning::default())?;
        let quic_addr = endpoint.local_addr().map_err(|source| QuicError::Bind {
            addr: config.quic_listen,
            source,
        })?;
        let tls_config = tls::server_config(key, names.clone())?;
        let tls_listener = match config.tls_listen {
            Some(addr) => {
                Some(metrics::bind(addr).map_err(|source| StartError::TlsListen { addr, source })?)
            }
            None => None,
        };
        let metrics = match config.metrics_listen {
            Some(addr) => {
                Some(metrics::bind(addr).map_err(|source| StartError::Metrics { addr, source })?)
            }
            None => None,
        };
        let stop = CancellationToken::new();
        let open = SentryCount::new(config.max_connections);
        let mut initial = Vec::new();
        for route in &config.routes {
            let (listener, local) = bind_route(route)?;
            let slot = RouteSlot::new(route, local, &open, &stop);
            initial.push((slot, listener));
        }
        let transport_stop = CancellationToken::new();
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
                    transport_stop.clone(),
                )
                .await?;
                Some(device)
            }
            None => None,
        };
        let shared = Arc::new(Shared {
            wireguard,
            transport_stop,
            endpoint,
            quic_addr,
            tls_addr: tls_listener.as_ref().and_then(|l| l.local_addr().ok()),
            tls_config: ArcSwap::new(tls_config),
            tls_pools: Mutex::new(HashMap::new()),
            metrics_addr: metrics.as_ref().and_then(|l| l.local_addr().ok()),
            key: key.clone(),
            config: Mutex::new(config.clone()),
            tunnels: Registry {
                names: ArcSwap::from_pointee(names),
                state: Mutex::new(Tunnels::default()),
                changed: watch::Sender::new(0),
            },
            routes: Mutex::new(initial.iter().map(|(slot, _)| slot.clone()).collect()),
            open,
            handshake_refused: Default::default(),
            quic_gate: HandshakeGate::new(DEFAULT_HANDSHAKE_LIMITS),
            tls_gate: HandshakeGate::new(TLS_HANDSHAKE_LIMITS),
            handshake_failed: AtomicU64::new(0),
            tls_handshake_failed: AtomicU64::new(0),
            tls_handshakes: Default::default(),
            streams_shed: Arc::default(),
            health: health::Health::default(),
            reloads: metrics::Reloads::default(),
            stop,
            relays: TaskTracker::new(),
            epoch: clock::now(),
        });
        Ok(Self {
            shared,
            initial,
            metrics,
            wg_events,
            tls_listener,
        })
    }

    /// A handle that outlives `run`'s borrow of the sentry.
    #[must_use]
    pub fn handle(&self) -> SentryHandle {
        SentryHandle {
            shared: self.shared.clone(),
        }
    }

    /// Serve until `shutdown` completes, then stop accepting, let relayed connections finish
    /// for up to the config's `drain_timeout` (the one in force then), and close every tunnel
    /// cleanly.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let shared = self.shared;
        tokio::spawn(accept_agents(shared.clone()));
        if let Some(device) = &shared.wireguard
            && let Some(listen) = device.local_addr()
        {
            info!(%listen, "WireGuard listening");
        }
        tokio::spawn(wireguard_events(shared.clone(), self.wg_events));
        if let Some(listener) = self.tls_listener {
            if let Ok(listen) = listener.local_addr() {
                info!(%listen, "TLS tunnel listening");
            }
            tokio::spawn(accept_tls(shared.clone(), listener));
        }
        if let Some(listener) = self.metrics {
            if let Ok(listen) = listener.local_addr() {
                info!(%listen, "metrics listening (GET /metrics, GET /healthz)");
            }
            let source: Arc<dyn Observe> = Arc::new(SentryHandle {
                shared: shared.clone(),
            });
            tokio::spawn(metrics::serve(listener, source, shared.stop.clone()));
        }
        for (slot, listener) in self.initial {
            info!(route = %slot.route.load().name, listen = %slot.local, "route listening");
            spawn_route(slot, listener, shared.clone());
        }
        shutdown.await;
        shared.stop.cancel();
        let drain = lock(&shared.config).drain_timeout;
        let relays = &shared.relays;
        relays.close();
        if !relays.is_empty() {
            info!(
                open = relays.len(),
                "shutting down: draining relayed connections for up to {drain:?}"
            );
        }
        if tokio::time::timeout(drain, relays.wait()).await.is_err() {
            warn!(
                open = relays.len(),
                "drain deadline reached; closing the rest"
            );
        }
        shared.transport_stop.cancel();
        shared
            .endpoint
            .close(code::SHUTDOWN, b"sentry shutting down");
        let _ = tokio::time::timeout(Duration::from_secs(1), shared.endpoint.wait_idle()).await;
        info!("sentry stopped");
    }
}

impl RouteSlot {
    /// Whether `route` (from a new config) is this listener: the same configured address, and
    /// for port 0 (any free port) also the same name.
    fn is(&self, route: &Route) -> bool {
        self.configured == route.listen
            && self.route.load().udp == route.udp
            && (route.listen.port() != 0 || self.route.load().name == route.name)
    }

    fn new(
        route: &Route,
        local: SocketAddr,
        open: &Arc<SentryCount>,
        stop: &CancellationToken,
    ) -> Arc<Self> {
        Arc::new(Self {
            configured: route.listen,
            local,
            route: ArcSwap::from_pointee(route.clone()),
            gate: Gate::new(route.limits.clone(), open.clone()),
            bytes: ByteCounters::default(),
            no_upstream: AtomicU64::new(0),
            datagrams_dropped: AtomicU64::new(0),
            stop: stop.child_token(),
            gateway: ArcSwapOption::new(route.jsonrpc.as_ref().map(gateway::Gateway::new)),
        })
    }

    /// Apply a reloaded config's version of this route to later connections.
    fn set_route(&self, route: &Route) {
        self.gate.set_limits(route.limits.clone());
        let old = self.route.swap(Arc::new(route.clone()));
        match (&route.jsonrpc, self.gateway.load_full()) {
            (Some(settings), Some(gateway)) => {
                gateway.update(settings, old.upstreams != route.upstreams);
            }
            (Some(settings), None) => self.gateway.store(Some(gateway::Gateway::new(settings))),
            (None, _) => self.gateway.store(None),
        }
    }
}

impl SentryHandle {
    /// The bound QUIC address (useful when configured with port 0).
    #[must_use]
    pub fn quic_addr(&self) -> SocketAddr {
        self.shared.quic_addr
    }

    /// The bound TCP+TLS tunnel address, when `tls_listen` is set.
    #[must_use]
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.shared.tls_addr
    }

    /// The bound WireGuard UDP address, when `wireguard_listen` is set.
    #[must_use]
    pub fn wireguard_addr(&self) -> Option<SocketAddr> {
        self.shared
            .wireguard
            .as_ref()
            .and_then(wireguard::Device::local_addr)
    }

    /// Time since the last completed WireGuard handshake with `peer` (an agent or a plain
    /// peer), if any.
    #[must_use]
    pub fn wireguard_handshake_age(&self, peer: &str) -> Option<Duration> {
        self.shared.wireguard.as_ref()?.peer(peer)?.session().0
    }

    /// WireGuard datagrams dropped without an answer (unknown key, bad MAC, failed
    /// decryption).
    #[must_use]
    pub fn wireguard_dropped(&self) -> u64 {
        self.shared
            .wireguard
            .as_ref()
            .map_or(0, wireguard::Device::dropped)
    }

    /// The bound metrics address, when `metrics_listen` is set.
    #[must_use]
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.shared.metrics_addr
    }

    fn slot(&self, name: &str) -> Option<Arc<RouteSlot>> {
        lock(&self.shared.routes)
            .iter()
            .find(|s| s.route.load().name == name)
            .cloned()
    }

    /// The bound address of a route.
    #[must_use]
    pub fn route_addr(&self, name: &str) -> Option<SocketAddr> {
        self.slot(name).map(|s| s.local)
    }

    /// The admission state of a route: open connections, refusals by reason.
    #[must_use]
    pub fn route_gate(&self, name: &str) -> Option<Arc<Gate>> {
        self.slot(name).map(|s| s.gate.clone())
    }

    /// Names of the agents with a live tunnel, sorted.
    #[must_use]
    pub fn connected(&self) -> Vec<String> {
        let mut names: Vec<String> = lock(&self.shared.tunnels.state)
            .live
            .keys()
            .cloned()
            .collect();
        names.sort();
        names
    }

    /// Wait until `agent`'s tunnel is up (`true`) or down (`false`).
    pub async fn wait_agent(&self, agent: &str, up: bool) {
        let registry = &self.shared.tunnels;
        let mut changes = registry.changed.subscribe();
        while lock(&registry.state).live.contains_key(agent) != up {
            if changes.changed().await.is_err() {
                return;
            }
        }
    }

    /// Apply `config` (already parsed and validated) to the running sentry. Bind first: if a
    /// new listener cannot be bound, nothing changes and the error says why.
    ///
    /// # Errors
    /// A new route's listen address cannot be bound, or the agents' keys cannot be installed.
    pub fn reload(
        &self,
        config: &SentryConfig,
        key: &PrivateKey,
    ) -> Result<ReloadReport, StartError> {
        let result = self.apply(config, key);
        self.shared.reloads.count(result.is_ok());
        result
    }

    /// Count a reload refused before it reached [`Self::reload`] (the new config did not
    /// parse or its key did not load), so `config_reloads_total{result="error"}` sees it.
    pub fn count_refused_reload(&self) {
        self.shared.reloads.count(false);
    }

    fn apply(&self, config: &SentryConfig, key: &PrivateKey) -> Result<ReloadReport, StartError> {
        let shared = &self.shared;
        let mut running = lock(&shared.config);
        let mut routes = lock(&shared.routes);
        let mut report = ReloadReport::default();
        // 1. Everything that can fail, before anything changes.
        let mut fresh = Vec::new();
        for route in &config.routes {
            if !routes.iter().any(|s| s.is(route)) {
                let (listener, local) = bind_route(route)?;
                fresh.push((route, listener, local));
            }
        }
        let names = agent_names(config);
        let server = quic::server_config(&shared.key, names.clone(), &Tuning::default())?;
        let tls_server = tls::server_config(&shared.key, names.clone())?;
        // 2. Apply.
        shared.endpoint.set_server_config(Some(server));
        shared.tls_config.store(tls_server);
        if let Some(device) = &shared.wireguard {
            device.set_peers(&wireguard_peers(config));
        }
        shared.tunnels.names.store(Arc::new(names.clone()));
        for (agent, tunnel, key) in shared.tunnels.revoke(&names) {
            shared.retire(&agent, tunnel, key, config.drain_timeout);
        }
        shared.open.set_max(config.max_connections);
        shared.health.retain(|upstream| {
            config
                .routes
                .iter()
                .flat_map(|r| &r.upstreams)
                .any(|u| health::key(u) == upstream)
        });
        let mut kept = Vec::new();
        for slot in routes.drain(..) {
            match config.routes.iter().find(|r| slot.is(r)) {
                Some(route) => {
                    slot.set_route(route);
                    report.kept += 1;
                    kept.push(slot);
                }
                None => {
                    let name = slot.route.load().name.clone();
                    info!(route = %name, listen = %slot.local, open = slot.gate.active(), "route removed: listener closed, open connections continue");
                    slot.stop.cancel();
                    report.removed.push(name);
                }
            }
        }
        for (route, listener, local) in fresh {
            let slot = RouteSlot::new(route, local, &shared.open, &shared.stop);
            info!(route = %route.name, listen = %local, "route listening");
            spawn_route(slot.clone(), listener, shared.clone());
            report.added.push(route.name.clone());
            kept.push(slot);
        }
        *routes = kept;
        if config.quic_listen != running.quic_listen {
            report.need_restart.push("sentry.quic_listen");
        }
        if config.wireguard != running.wireguard {
            report.need_restart.push("sentry.wireguard_listen");
        }
        if config.tls_listen != running.tls_listen {
            report.need_restart.push("sentry.tls_listen");
        }
        if config.metrics_listen != running.metrics_listen {
            report.need_restart.push("sentry.metrics_listen");
        }
        if key.public_key() != shared.key.public_key() {
            report.need_restart.push("sentry.private_key");
        }
        let mut applied = config.clone();
        applied.quic_listen = running.quic_listen;
        applied.metrics_listen = running.metrics_listen;
        applied.wireguard = running.wireguard;
        applied.tls_listen = running.tls_listen;
        *running = applied;
        Ok(report)
    }

    /// The running config's drain timeout.
    #[must_use]
    pub fn drain_timeout(&self) -> Duration {
        lock(&self.shared.config).drain_timeout
    }

    /// The `/metrics` text, as the metrics listener serves it.
    #[must_use]
    pub fn render_metrics(&self) -> String {
        metrics::render(Arc::new(self.clone()))
    }
}

impl Observe for SentryHandle {
    fn collect(&self, out: &mut Families<'_>) -> std::fmt::Result {
        let shared = &self.shared;
        let routes: Vec<(Arc<RouteSlot>, Arc<Route>)> = lock(&shared.routes)
            .iter()
            .map(|s| (s.clone(), s.route.load_full()))
            .collect();
        // One snapshot of the registry: live tunnels (name, RTT, age) and connects per agent.
        let (live, connects) = {
            let tunnels = lock(&shared.tunnels.state);
            let now = clock::now();
            let live: Vec<(String, &'static str, Duration, Duration)> = tunnels
                .live
                .iter()
                .map(|(name, l)| {
                    (
                        name.clone(),
                        l.tunnel.transport(),
                        l.tunnel.rtt(),
                        now.duration_since(l.since),
                    )
                })
                .collect();
            (live, tunnels.connects.clone())
        };
        // Every peer that may connect, with the transport it uses now (or may use).
        let mut agents: Vec<(String, &'static str)> = {
            let config = lock(&shared.config);
            config
                .agents
                .iter()
                .map(|a| {
                    let idle = if a.wireguard_address.is_some() {
                        TransportKind::WireGuard
                    } else {
                        TransportKind::Quic
                    };
                    (a.name.clone(), idle.as_str())
                })
                .chain(
                    config
                        .wireguard_peers
                        .iter()
                        .map(|p| (p.name.clone(), TransportKind::WireGuard.as_str())),
                )
                .collect()
        };
        for (name, transport) in &mut agents {
            if let Some((_, live_transport, _, _)) = live.iter().find(|(n, ..)| n == name) {
                *transport = live_transport;
            }
        }
        agents.sort();
        let route_label = |r: &Route| [("route", r.name.clone())];
        out.counters(
            "route_connections_accepted",
            "Client connections admitted on a route.",
            routes
                .iter()
                .map(|(s, r)| (route_label(r), s.gate.admitted())),
        )?;
        out.gauges(
            "route_connections_active",
            "Client connections open on a route now.",
            routes.iter().map(|(s, r)| {
                (
                    route_label(r),
                    i64::try_from(s.gate.active()).unwrap_or(i64::MAX),
                )
            }),
        )?;
        out.counters(
            "route_connections_refused",
            "Client connections closed at once, by reason: an admission refusal, or no_upstream \
             (no connected agent answered).",
            routes.iter().flat_map(|(s, r)| {
                Refusal::ALL
                    .iter()
                    .map(|reason| (reason.as_str(), s.gate.refused(*reason)))
                    .chain([("no_upstream", s.no_upstream.load(Ordering::Relaxed))])
                    .map(|(reason, n)| {
                        (
                            [("route", r.name.clone()), ("reason", reason.to_owned())],
                            n,
                        )
                    })
                    .collect::<Vec<_>>()
            }),
        )?;
        out.counters(
            "route_received_bytes",
            "Bytes received from clients and relayed towards the validator.",
            routes
                .iter()
                .map(|(s, r)| (route_label(r), s.bytes.up.load(Ordering::Relaxed))),
        )?;
        out.counters(
            "route_sent_bytes",
            "Bytes relayed from the validator and sent to clients.",
            routes
                .iter()
                .map(|(s, r)| (route_label(r), s.bytes.down.load(Ordering::Relaxed))),
        )?;
        out.counters(
            "route_datagrams_dropped",
            "UDP routes: client datagrams dropped because their flow's queue toward the agent \
             was full.",
            routes
                .iter()
                .filter(|(_, r)| r.udp)
                .map(|(s, r)| (route_label(r), s.datagrams_dropped.load(Ordering::Relaxed))),
        )?;
        out.gauges(
            "route_info",
            "A route's bound listen address (value 1).",
            routes.iter().map(|(s, r)| {
                (
                    [("route", r.name.clone()), ("listen", s.local.to_string())],
                    1_i64,
                )
            }),
        )?;
        out.gauges(
            "route_upstream_connected",
            "1 while the agent of this upstream has a live tunnel, else 0; upstreams in failover \
             order.",
            routes.iter().flat_map(|(_, r)| {
                r.upstreams
                    .iter()
                    .map(|u| {
                        (
                            [
                                ("route", r.name.clone()),
                                ("upstream", format!("{}/{}", u.agent, u.service)),
                            ],
                            i64::from(live.iter().any(|(a, ..)| *a == u.agent)),
                        )
                    })
                    .collect::<Vec<_>>()
            }),
        )?;
        let gateways: Vec<(String, Arc<gateway::Gateway>)> = routes
            .iter()
            .filter_map(|(s, r)| s.gateway.load_full().map(|g| (r.name.clone(), g)))
            .collect();
        out.counters(
            "jsonrpc_requests",
            "HTTP requests on JSON-RPC routes by outcome (a WebSocket upgrade is one request).",
            gateways.iter().flat_map(|(route, g)| {
                g.stats
                    .requests()
                    .map(|(outcome, n)| {
                        (
                            [
                                ("route", route.clone()),
                                ("outcome", outcome.as_str().to_owned()),
                            ],
                            n,
                        )
                    })
                    .collect::<Vec<_>>()
            }),
        )?;
        out.counters(
            "jsonrpc_calls",
            "JSON-RPC calls by method and outcome (forwarded, refused by the sentry, \
             rate_limited). Method labels are bounded: names past the first 64 count as \
             \"other\", and calls refused before their method is known as \"-\".",
            gateways.iter().flat_map(|(route, g)| {
                g.stats
                    .calls()
                    .into_iter()
                    .map(|(method, outcome, n)| {
                        (
                            [
                                ("route", route.clone()),
                                ("method", method),
                                ("outcome", outcome.to_owned()),
                            ],
                            n,
                        )
                    })
                    .collect::<Vec<_>>()
            }),
        )?;
        out.gauges(
            "jsonrpc_upstream_idle",
            "Idle upstream connections (relay streams with HTTP on them) pooled for a \
             JSON-RPC route.",
            gateways.iter().map(|(route, g)| {
                (
                    [("route", route.clone())],
                    i64::try_from(g.pool.len()).unwrap_or(i64::MAX),
                )
            }),
        )?;
        out.gauges(
            "jsonrpc_websockets_active",
            "WebSockets open on a JSON-RPC route now.",
            gateways.iter().map(|(route, g)| {
                (
                    [("route", route.clone())],
                    i64::try_from(g.websockets.total()).unwrap_or(i64::MAX),
                )
            }),
        )?;
        out.gauges(
            "connections_active",
            "Client connections open across all routes.",
            [(
                [("max", shared.open.max().to_string())],
                i64::try_from(shared.open.active()).unwrap_or(i64::MAX),
            )],
        )?;
        let agent_label = |a: &str, transport: &str| {
            [("agent", a.to_owned()), ("transport", transport.to_owned())]
        };
        out.gauges(
            "tunnel_up",
            "1 while the agent's (or plain WireGuard peer's) tunnel is established, else 0.",
            agents.iter().map(|(a, transport)| {
                (
                    agent_label(a, transport),
                    i64::from(live.iter().any(|(name, ..)| name == a)),
                )
            }),
        )?;
        out.gauges(
            "tunnel_rtt_seconds",
            "Smoothed round-trip time of the agent's tunnel (WireGuard: measured by its \
             handshakes).",
            live.iter()
                .map(|(a, transport, rtt, _)| (agent_label(a, transport), rtt.as_secs_f64())),
        )?;
        out.gauges(
            "tunnel_handshake_age_seconds",
            "Time since the agent's current tunnel was established.",
            live.iter()
                .map(|(a, transport, _, age)| (agent_label(a, transport), age.as_secs_f64())),
        )?;
        out.counters(
            "tunnel_reconnects",
            "Tunnels an agent established after its first one since start.",
            agents.iter().map(|(a, transport)| {
                (
                    agent_label(a, transport),
                    connects.get(a).copied().unwrap_or(0).saturating_sub(1),
                )
            }),
        )?;
        out.counters(
            "tunnel_handshakes_dropped",
            "Tunnel handshake attempts dropped unanswered by the handshake limits, by reason.",
            HandshakeRefusal::ALL.iter().map(|r| {
                (
                    [("reason", r.as_str())],
                    shared.handshake_refused[r.index()].load(Ordering::Relaxed),
                )
            }),
        )?;
        out.gauges(
            "tunnel_handshakes_in_flight",
            "Tunnel handshakes in progress now, by listener (a flood of strangers shows here).",
            [
                ([("transport", "quic")], shared.quic_gate.in_flight()),
                ([("transport", "tls")], shared.tls_gate.in_flight()),
            ]
            .map(|(l, n)| (l, i64::try_from(n).unwrap_or(i64::MAX))),
        )?;
        out.counters(
            "tunnel_handshakes_failed",
            "Tunnel handshakes that failed or timed out (unknown keys among them).",
            [
                (
                    [("transport", "quic")],
                    shared.handshake_failed.load(Ordering::Relaxed),
                ),
                (
                    [("transport", "tls")],
                    shared.tls_handshake_failed.load(Ordering::Relaxed),
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
                    shared.tls_handshakes[0].load(Ordering::Relaxed),
                ),
                (
                    [("kind", "resumed")],
                    shared.tls_handshakes[1].load(Ordering::Relaxed),
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
                shared.streams_shed.load(Ordering::Relaxed),
            )],
        )?;
        let upstreams = shared.health.snapshot(clock::now());
        out.counters(
            "upstream_hold_downs",
            "Times an upstream was held down after its agent answered that the service refused \
             (or a plain WireGuard peer did not accept); held upstreams are tried after the \
             others.",
            upstreams
                .iter()
                .map(|u| ([("upstream", u.upstream.clone())], u.hold_downs)),
        )?;
        out.gauges(
            "upstream_held_down",
            "1 while an upstream is held down after a refusal, 0 otherwise (listed once it was \
             ever held).",
            upstreams
                .iter()
                .map(|u| ([("upstream", u.upstream.clone())], i64::from(u.held))),
        )?;
        if let Some(device) = &shared.wireguard {
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
        }
        out.common(&shared.reloads, "sentry")
    }

    fn health(&self) -> Result<String, String> {
        let routes: Vec<Arc<Route>> = lock(&self.shared.routes)
            .iter()
            .map(|s| s.route.load_full())
            .collect();
        let tunnels = lock(&self.shared.tunnels.state);
        let down: Vec<String> = routes
            .iter()
            .filter(|r| {
                !r.upstreams
                    .iter()
                    .any(|u| tunnels.live.contains_key(&u.agent))
            })
            .map(|r| {
                let agents: Vec<&str> = r.upstreams.iter().map(|u| u.agent.as_str()).collect();
                format!(
                    "route {} has no connected upstream ({})",
                    r.name,
                    agents.join(", ")
                )
            })
            .collect();
        if down.is_empty() {
            Ok(format!(
                "{} route(s), each with a connected upstream; {} tunnel(s) up",
                routes.len(),
                tunnels.live.len()
            ))
        } else {
            Err(down.join("; "))
        }
    }
}

impl Registry {
    fn get(&self, agent: &str) -> Option<Tunnel> {
        lock(&self.state).live.get(agent).map(|l| l.tunnel.clone())
    }

    /// Register `tunnel` (authenticated with `key`) as `agent`'s; returns the one it replaced.
    fn insert(&self, agent: &str, tunnel: Tunnel, key: Option<PublicKey>) -> Option<Tunnel> {
        let old = {
            let mut state = lock(&self.state);
            *state.connects.entry(agent.to_owned()).or_insert(0) += 1;
            state.live.insert(
                agent.to_owned(),
                Live {
                    tunnel,
                    since: clock::now(),
                    key,
                },
            )
        };
        self.changed.send_modify(|n| *n += 1);
        old.map(|l| l.tunnel)
    }

    /// Take out every tunnel whose key is no longer pinned under its agent's name in `names`:
    /// no new client goes over them from now on. Returns them, with their agent's name.
    fn revoke(&self, names: &HashMap<PublicKey, String>) -> Vec<(String, Tunnel, PublicKey)> {
        let mut state = lock(&self.state);
        let gone: Vec<(String, PublicKey)> = state
            .live
            .iter()
            .filter_map(|(agent, live)| {
                let key = live.key?;
                (names.get(&key) != Some(agent)).then(|| (agent.clone(), key))
            })
            .collect();
        let revoked: Vec<(String, Tunnel, PublicKey)> = gone
            .into_iter()
            .filter_map(|(agent, key)| {
                let live = state.live.remove(&agent)?;
                Some((agent, live.tunnel, key))
            })
            .collect();
        drop(state);
        if !revoked.is_empty() {
            self.changed.send_modify(|n| *n += 1);
        }
        revoked
    }

    /// Remove `agent`'s tunnel if it is still `tunnel` (a newer one may have replaced it).
    fn remove(&self, agent: &str, tunnel: &Tunnel) {
        let mut state = lock(&self.state);
        if state.live.get(agent).is_some_and(|l| l.tunnel.same(tunnel)) {
            state.live.remove(agent);
            drop(state);
            self.changed.send_modify(|n| *n += 1);
        }
    }
}

async fn accept_agents(shared: Arc<Shared>) {
    let gate = shared.quic_gate.clone();
    let endpoint = shared.endpoint.clone();
    loop {
        let incoming = tokio::select! {
            () = shared.stop.cancelled() => return,
            incoming = endpoint.accept() => match incoming {
                Some(incoming) => incoming,
                None => return,
            },
        };
        let remote = incoming.remote_address();
        let validated = incoming.remote_address_validated();
        // Decided on the first packet, before any cryptography is spent on the attempt.
        match gate.decide(clock::now() - shared.epoch, remote.ip(), validated) {
            Handshake::Accept(permit) => {
                tokio::spawn(tunnel(incoming, shared.clone(), permit));
            }
            Handshake::Retry if incoming.may_retry() => {
                if let Err(e) = incoming.retry() {
                    e.into_incoming().ignore();
                }
            }
            Handshake::Retry => incoming.ignore(),
            Handshake::Ignore(reason) => {
                incoming.ignore();
                shared.handshake_refused[reason.index()].fetch_add(1, Ordering::Relaxed);
                if let Some(suppressed) = HANDSHAKE_DROP_LOG.allow() {
                    warn!(%remote, transport = "quic", reason = reason.as_str(), in_flight = gate.in_flight(), suppressed, "dropped tunnel handshake attempts (a flood, or an agent reconnecting too fast)");
                }
            }
        }
    }
}

/// One agent tunnel, from handshake to close.
async fn tunnel(incoming: quinn::Incoming, shared: Arc<Shared>, permit: HandshakePermit) {
    let remote = incoming.remote_address();
    let handshake = tokio::select! {
        handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, incoming) => handshake,
        () = permit.evicted() => {
            // Its place went to a newer attempt (every place was taken): dropping the attempt
            // ends it.
            shared.handshake_refused[HandshakeRefusal::Evicted.index()].fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    let conn = match handshake {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => {
            shared.handshake_failed.fetch_add(1, Ordering::Relaxed);
            if let Some(suppressed) = HANDSHAKE_LOG.allow() {
                warn!(%remote, transport = "quic", suppressed, "refused a tunnel handshake: {e} (is this agent's public key listed in [[agent]]?)");
            }
            return;
        }
        Err(_) => {
            shared.handshake_failed.fetch_add(1, Ordering::Relaxed);
            debug!(%remote, "tunnel handshake timed out");
            return;
        }
    };
    let registry = &shared.tunnels;
    let name = quic::peer_key(&conn).and_then(|k| registry.names.load().get(&k).cloned());
    let Some(agent) = name else {
        // The verifier admits only pinned keys; a reload may have unpinned this one between
        // its handshake and now.
        conn.close(code::SHUTDOWN, b"");
        return;
    };
    // A pinned agent: its address gets a reserved place in later handshakes.
    permit.authenticated();
    // Holds released before the tunnel is registered (a hold its first stream earns must
    // stay), and registered before it is logged: whoever reads "tunnel up" can use it.
    shared.health.release_agent(&agent);
    let tunnel = Tunnel::Quic(
        conn.clone(),
        Ledger::watch(&conn, shared.streams_shed.clone()),
    );
    if let Some(old) = registry.insert(&agent, tunnel.clone(), quic::peer_key(&conn)) {
        old.close(code::REPLACED, b"replaced by a newer tunnel");
    }
    info!(%agent, %remote, transport = "quic", "tunnel up");
    let reason = conn.closed().await;
    registry.remove(&agent, &tunnel);
    info!(%agent, %remote, transport = "quic", "tunnel down: {reason}");
}

async fn accept_clients(slot: Arc<RouteSlot>, listener: TcpListener, shared: Arc<Shared>) {
    let refusals_log = LogLimit::new(Duration::from_secs(10));
    loop {
        let accepted = tokio::select! {
            // Stopping wins over a waiting client: after shutdown nothing more is accepted.
            biased;
            () = slot.stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((tcp, peer)) => match slot.gate.admit(clock::now() - shared.epoch, peer.ip()) {
                Ok(permit) => {
                    watch_for_death(&tcp);
                    match slot.gateway.load_full() {
                        Some(gateway) => {
                            shared.relays.spawn(gateway::serve(
                                slot.clone(),
                                gateway,
                                shared.clone(),
                                tcp,
                                peer,
                                permit,
                            ));
                        }
                        None => {
                            let route = slot.route.load_full();
                            shared.relays.spawn(relay_client(
                                slot.clone(),
                                route,
                                tcp,
                                peer,
                                shared.clone(),
                                permit,
                            ));
                        }
                    }
                }
                Err(reason) => {
                    // Closed at once, before any tunnel work.
                    drop(tcp);
                    if let Some(suppressed) = refusals_log.allow() {
                        info!(
                            route = %slot.route.load().name,
                            client = %peer,
                            reason = reason.as_str(),
                            suppressed,
                            "connection refused by admission control"
                        );
                    }
                }
            },
            Err(e) => {
                // Typically EMFILE/ENFILE: back off briefly instead of spinning.
                if let Some(suppressed) = ACCEPT_LOG.allow() {
                    warn!(route = %slot.route.load().name, suppressed, "accept failed: {e}");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Keep-alive probes after [`KEEPALIVE_IDLE`] of silence, every [`KEEPALIVE_INTERVAL`], and
/// a user timeout: a client that vanished (its host gone, a NAT that dropped it) gives its
/// place back within a few minutes instead of holding it until `idle_timeout`, and one that
/// leaves sent data unacknowledged for [`USER_TIMEOUT`] is dropped by the kernel.
fn watch_for_death(tcp: &TcpStream) {
    let socket = socket2::SockRef::from(tcp);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_PROBES);
    let _ = socket.set_tcp_keepalive(&keepalive);
    let _ = socket.set_tcp_user_timeout(Some(USER_TIMEOUT));
}

/// Silence on a client connection before the first keep-alive probe.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
/// Between keep-alive probes.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(15);
/// Unanswered probes before the client is given up: dead within two minutes of silence.
const KEEPALIVE_PROBES: u32 = 4;
/// Longest sent data may stay unacknowledged.
const USER_TIMEOUT: Duration = Duration::from_secs(120);

/// Relay one public client through the first upstream that answers `Ok`.
async fn relay_client(
    slot: Arc<RouteSlot>,
    route: Arc<Route>,
    mut tcp: TcpStream,
    client: SocketAddr,
    shared: Arc<Shared>,
    // Held for the connection's life; gives its place back when dropped.
    _permit: Permit,
) {
    let _ = tcp.set_nodelay(true);
    let proxy = match (route.proxy_protocol, tcp.local_addr()) {
        (None, _) => None,
        (Some(version), Ok(destination)) => Some(Proxy {
            version,
            destination,
        }),
        (Some(_), Err(e)) => {
            debug!(route = %route.name, %client, "no local address for the PROXY header: {e}");
            return;
        }
    };
    if let Some((agent, mut stream)) = connect_upstream(&shared, &route, client, proxy).await {
        let shed = stream.shed_signal();
        let (mut client_read, mut client_write) = tcp.split();
        let (mut tunnel_read, mut tunnel_write) = stream.halves();
        let (end, stats) = pump(
            &mut client_read,
            &mut client_write,
            &mut tunnel_read,
            &mut tunnel_write,
            route.idle_timeout,
            &slot.bytes,
            shed.as_ref(),
        )
        .await;
        if !matches!(end, PumpEnd::Done) {
            stream.abort();
        }
        if matches!(end, PumpEnd::TunnelError(_) | PumpEnd::Shed) {
            // The client must not take a cut-off answer for a whole one: a reset, not a FIN.
            let _ = tcp.set_zero_linger();
        }
        debug!(route = %route.name, %client, %agent, up = stats.up, down = stats.down, ?end, "relayed connection closed");
        return;
    }
    slot.no_upstream.fetch_add(1, Ordering::Relaxed);
    if let Some(suppressed) = NO_UPSTREAM_LOG.allow() {
        info!(route = %route.name, %client, suppressed, "no upstream available; client closed");
    }
}

/// A relay stream for `client` through the first upstream of `route` that answers `Ok`: the
/// agent's name and the stream. `None` when no connected upstream does. Upstreams held down
/// after a refusal are tried last (see [`health`]).
async fn connect_upstream(
    shared: &Shared,
    route: &Route,
    client: SocketAddr,
    proxy: Option<Proxy>,
) -> Option<(String, TunnelStream)> {
    let registry = &shared.tunnels;
    let now = clock::now();
    let (ready, held): (Vec<_>, Vec<_>) = route
        .upstreams
        .iter()
        .partition(|u| !shared.health.held(&health::key(u), now));
    for upstream in ready.into_iter().chain(held) {
        let Some(tunnel) = registry.get(&upstream.agent) else {
            continue;
        };
        let refused = if let (Some(target), Tunnel::WireGuard(peer)) = (upstream.overlay, &tunnel) {
            // A plain WireGuard peer: connect inside the overlay; the sentry writes the PROXY
            // header itself, as an agent would.
            match plain_peer(peer, target, client, proxy).await {
                Ok(stream) => {
                    answered(shared, route, upstream);
                    return Some((upstream.agent.clone(), stream));
                }
                Err(e) => {
                    debug!(route = %route.name, %client, peer = %upstream.agent, %target, "plain WireGuard peer did not accept: {e}; trying the next");
                    format!("the peer did not accept: {e}")
                }
            }
        } else {
            let header = Header {
                route: route.name.clone(),
                service: upstream.service.clone(),
                client,
                proxy,
                udp: route.udp,
            };
            match open(&tunnel, &header).await {
                Ok(stream) => {
                    answered(shared, route, upstream);
                    return Some((upstream.agent.clone(), stream));
                }
                Err(OpenError::Refused(status)) => {
                    debug!(route = %route.name, %client, agent = %upstream.agent, ?status, "upstream refused; trying the next");
                    // A header the agent could not read, or a service at its cap: the next
                    // upstream, with no hold-down (the service itself is fine).
                    if matches!(status, Some(Status::BadHeader | Status::Busy)) {
                        continue;
                    }
                    format!(
                        "the agent answered {}",
                        status.map_or("an unknown status", Status::as_str)
                    )
                }
                Err(OpenError::Unresponsive { alive: true }) => {
                    // The agent answers at the transport level (the tunnel is busy, say its
                    // flow control is spent for a moment): this client tries the next
                    // upstream, and the tunnel and everything on it stay.
                    warn!(agent = %upstream.agent, transport = tunnel.transport(), "agent did not answer a relay header within {STATUS_TIMEOUT:?}, though its tunnel is alive: trying the next upstream");
                    continue;
                }
                Err(OpenError::Unresponsive { alive: false }) => {
                    warn!(agent = %upstream.agent, transport = tunnel.transport(), "agent did not answer a relay header within {STATUS_TIMEOUT:?}, nor anything else: closing its tunnel");
                    if !matches!(tunnel, Tunnel::WireGuard(_)) {
                        tunnel.close(code::UNRESPONSIVE, b"no answer to a relay header");
                        registry.remove(&upstream.agent, &tunnel);
                    }
                    continue;
                }
                Err(OpenError::Tunnel(e)) => {
                    debug!(agent = %upstream.agent, "opening a stream failed: {e}");
                    continue;
                }
            }
        };
        let key = health::key(upstream);
        if shared.health.hold(&key, clock::now()) {
            info!(route = %route.name, upstream = %key, reason = %refused, "upstream held down for {:?}: tried after the others", health::HOLD_DOWN);
        }
    }
    None
}

/// `upstream` took a stream: end its hold-down, if any.
fn answered(shared: &Shared, route: &Route, upstream: &Upstream) {
    let key = health::key(upstream);
    if shared.health.clear(&key, clock::now()) {
        info!(route = %route.name, upstream = %key, "upstream answered again: hold-down ended");
    }
}

/// A connection to a plain WireGuard peer's overlay address.
async fn plain_peer(
    peer: &Arc<wireguard::Peer>,
    target: SocketAddrV4,
    client: SocketAddr,
    proxy: Option<Proxy>,
) -> std::io::Result<TunnelStream> {
    let mut stream = tokio::time::timeout(OPEN_TIMEOUT, peer.connect(target))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    if let Some(proxy) = proxy {
        let bytes = encode_proxy_header(proxy.version, client, proxy.destination);
        stream.write_all(&bytes).await?;
    }
    Ok(TunnelStream::Overlay(stream))
}

/// Open a stream to an agent and wait for its status.
async fn open(tunnel: &Tunnel, header: &Header) -> Result<TunnelStream, OpenError> {
    let mut bytes = header
        .encode()
        .map_err(|e| OpenError::Tunnel(e.to_string()))?;
    let mut stream = match tunnel {
        Tunnel::Tls(session) => {
            let asks = session.asks.clone();
            // An empty pool asks the agent for one more; a full queue of asks is enough.
            let ask = move || {
                let _ = asks.try_send(1);
            };
            match session.pool.take(OPEN_TIMEOUT, ask).await {
                Some(io) => {
                    bytes.insert(0, tls::GO);
                    TunnelStream::Tls(Box::new(TlsRelay::new(io)))
                }
                None => {
                    return Err(OpenError::Tunnel(
                        "no data connection from the agent in time".into(),
                    ));
                }
            }
        }
        Tunnel::Quic(conn, ledger) => {
            match tokio::time::timeout(OPEN_TIMEOUT, conn.open_bi()).await {
                Ok(Ok((send, recv))) => {
                    TunnelStream::Quic(send, ledger.recv(recv, Some(header.client.ip())))
                }
                Ok(Err(e)) => return Err(OpenError::Tunnel(e.to_string())),
                Err(_) => return Err(OpenError::Tunnel("no free stream on the tunnel".into())),
            }
        }
        Tunnel::WireGuard(peer) => {
            let to = SocketAddrV4::new(peer.address(), wireguard::RELAY_PORT);
            match tokio::time::timeout(OPEN_TIMEOUT, peer.connect(to)).await {
                Ok(Ok(stream)) => TunnelStream::Overlay(stream),
                Ok(Err(e)) => return Err(OpenError::Tunnel(e.to_string())),
                Err(_) => {
                    return Err(OpenError::Tunnel(
                        "the agent did not accept a stream in the overlay".into(),
                    ));
                }
            }
        }
    };
    // Whether the agent sends anything (an acknowledgment of the header, at least) while its
    // answer is awaited: a QUIC tunnel that does is alive.
    let received = || match tunnel {
        Tunnel::Quic(conn, _) => conn.stats().udp_rx.datagrams,
        Tunnel::WireGuard(_) | Tunnel::Tls(_) => 0,
    };
    let received_before = received();
    let exchange = async {
        let sent = async {
            stream.write_all(&bytes).await?;
            stream.flush().await
        };
        sent.await.map_err(|e| OpenError::Tunnel(e.to_string()))?;
        let mut status = [0u8; 1];
        stream
            .read_exact(&mut status)
            .await
            .map_err(|e| OpenError::Tunnel(e.to_string()))?;
        Ok(Status::from_byte(status[0]))
    };
    match tokio::time::timeout(STATUS_TIMEOUT, exchange).await {
        Ok(Ok(Some(Status::Ok))) => Ok(stream),
        Ok(Ok(status)) => Err(OpenError::Refused(status)),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(OpenError::Unresponsive {
            alive: received() > received_before,
        }),
    }
}

/// The WireGuard peers of a config: agents with an overlay address, and plain peers.
fn wireguard_peers(config: &SentryConfig) -> Vec<wireguard::PeerSpec> {
    let window = config
        .wireguard
        .map_or(crate::config::DEFAULT_WIREGUARD_WINDOW, |wg| wg.window);
    let agents = config.agents.iter().filter_map(|agent| {
        Some(wireguard::PeerSpec {
            name: agent.name.clone(),
            public: agent.public_key.wireguard()?,
            address: agent.wireguard_address?,
            endpoint: None,
            keepalive: None,
            liveness: wireguard::AGENT_LIVENESS,
            accept: false,
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

/// WireGuard peers going up and down, into the registry.
async fn wireguard_events(
    shared: Arc<Shared>,
    mut events: mpsc::UnboundedReceiver<(Arc<wireguard::Peer>, bool)>,
) {
    while let Some((peer, up)) = events.recv().await {
        let name = peer.name().to_owned();
        let tunnel = Tunnel::WireGuard(peer.clone());
        let remote = peer
            .endpoint()
            .map_or_else(|| "-".to_owned(), |e| e.to_string());
        if up {
            shared.health.release_agent(&name);
            if let Some(old) = shared.tunnels.insert(&name, tunnel, None) {
                old.close(code::REPLACED, b"replaced by a newer tunnel");
            }
            info!(agent = %name, %remote, transport = "wireguard", "tunnel up");
        } else {
            info!(agent = %name, %remote, transport = "wireguard", "tunnel down: no packet within {:?}", peer.liveness());
            shared.tunnels.remove(&name, &tunnel);
        }
    }
}

/// Accept agents' TCP+TLS connections on `tls_listen`.
async fn accept_tls(shared: Arc<Shared>, listener: TcpListener) {
    // Agents open a TLS connection per relayed connection, so the per-address rate is far
    // above QUIC's; every attempt has completed a TCP handshake (its address is real) and
    // the in-flight caps still bound what a flood can hold.
    let gate = shared.tls_gate.clone();
    loop {
        let accepted = tokio::select! {
            biased;
            () = shared.stop.cancelled() => return,
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
        match gate.decide(clock::now() - shared.epoch, remote.ip(), true) {
            Handshake::Accept(permit) => {
                tokio::spawn(tls_connection(tcp, remote, shared.clone(), permit));
            }
            Handshake::Retry => drop(tcp),
            Handshake::Ignore(reason) => {
                drop(tcp);
                shared.handshake_refused[reason.index()].fetch_add(1, Ordering::Relaxed);
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
async fn tls_connection(
    tcp: TcpStream,
    remote: SocketAddr,
    shared: Arc<Shared>,
    permit: HandshakePermit,
) {
    tls::tune(&tcp);
    let acceptor = tokio_rustls::TlsAcceptor::from(shared.tls_config.load_full());
    let handshake = async {
        let mut io = acceptor.accept(tcp).await?;
        let mut role = [0u8; 1];
        io.read_exact(&mut role).await?;
        Ok::<_, std::io::Error>((TlsIo::from(io), role[0]))
    };
    let handshake = tokio::select! {
        handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake) => handshake,
        () = permit.evicted() => {
            shared.handshake_refused[HandshakeRefusal::Evicted.index()].fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    let (io, role) = match handshake {
        Ok(Ok(done)) => done,
        Ok(Err(e)) => {
            shared.tls_handshake_failed.fetch_add(1, Ordering::Relaxed);
            if let Some(suppressed) = HANDSHAKE_LOG.allow() {
                warn!(%remote, transport = "tls", suppressed, "refused a tunnel handshake: {e} (is this agent's public key listed in [[agent]]?)");
            }
            return;
        }
        Err(_) => {
            shared.tls_handshake_failed.fetch_add(1, Ordering::Relaxed);
            debug!(%remote, transport = "tls", "tunnel handshake timed out");
            return;
        }
    };
    shared.tls_handshakes[usize::from(tls::resumed(&io))].fetch_add(1, Ordering::Relaxed);
    // Checked again after the handshake: a resumed session skips the verifier, and a reload
    // may have unpinned the key since.
    let registry = &shared.tunnels;
    let Some(key) = tls::peer_key(&io) else {
        return;
    };
    let Some(agent) = registry.names.load().get(&key).cloned() else {
        return;
    };
    permit.authenticated();
    match tls::Role::from_byte(role) {
        Some(tls::Role::Data) => shared.tls_pool(key).push(io),
        Some(tls::Role::Control) => tls_control(io, agent, key, remote, &shared).await,
        None => debug!(%remote, %agent, "unknown role byte on a TLS tunnel connection"),
    }
}

/// An agent's TLS control connection: the tunnel is up while it runs.
async fn tls_control(
    io: TlsIo,
    agent: String,
    key: PublicKey,
    remote: SocketAddr,
    shared: &Shared,
) {
    let (asks, asked) = mpsc::channel(64);
    let session = Arc::new(TlsSession {
        control: tls::Control::default(),
        pool: shared.tls_pool(key),
        asks,
        close: CancellationToken::new(),
    });
    let tunnel = Tunnel::Tls(session.clone());
    let registry = &shared.tunnels;
    shared.health.release_agent(&agent);
    if let Some(old) = registry.insert(&agent, tunnel.clone(), Some(key)) {
        old.close(code::REPLACED, b"replaced by a newer tunnel");
    }
    info!(%agent, %remote, transport = "tls", "tunnel up");
    let reason = tokio::select! {
        why = tls::run_control(io, &session.control, asked, |_| {}, None) => why,
        () = session.close.cancelled() => "closed by the sentry".to_owned(),
        () = shared.transport_stop.cancelled() => "sentry shutting down".to_owned(),
    };
    registry.remove(&agent, &tunnel);
    info!(%agent, %remote, transport = "tls", "tunnel down: {reason}");
}

impl Shared {
    /// The pool of idle TLS data connections authenticated with `key`.
    fn tls_pool(&self, key: PublicKey) -> Arc<tls::Pool> {
        lock(&self.tls_pools).entry(key).or_default().clone()
    }

    /// A reload unpinned the key `tunnel` of `agent` authenticated with: it takes no new
    /// client already (it left the registry); its idle TLS data connections close now, and
    /// the tunnel itself once its relayed connections ended, within `drain`.
    fn retire(&self, agent: &str, tunnel: Tunnel, key: PublicKey, drain: Duration) {
        if let Some(pool) = lock(&self.tls_pools).remove(&key) {
            pool.clear();
        }
        warn!(%agent, transport = tunnel.transport(), "the reload unpinned this tunnel's key: it takes no new client, and closes once its relayed connections end (within drain_timeout, {drain:?})");
        match tunnel {
            Tunnel::Quic(conn, ledger) => {
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(drain, ledger.idle()).await;
                    conn.close(code::REVOKED, b"agent key unpinned");
                });
            }
            // Its data connections in use are TCP connections of their own; they end with
            // their relayed connections.
            Tunnel::Tls(_) | Tunnel::WireGuard(_) => tunnel.close(code::REVOKED, b""),
        }
    }
}

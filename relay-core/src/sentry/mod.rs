//! The sentry engine: public TCP and UDP listeners relayed to connected agents over QUIC,
//! WireGuard or TCP+TLS (UDP routes in `udp.rs`, one flow per client address).
//!
//! [`Sentry::bind`] binds every socket first (so a port conflict fails start-up, not the
//! first client), then [`Sentry::run`] accepts agents and clients until shutdown.
//! [`Reload::reload`](crate::reload::Reload::reload) on a [`SentryHandle`] applies a new config
//! to the running sentry.
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

mod egress;
mod gateway;
mod health;
pub use health::HOLD_DOWN;
mod observe;
mod registry;
mod reload;
mod tcp;
mod udp;
mod upstream;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::{ArcSwap, ArcSwapOption};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::admission::{Gate, SentryCount};
use crate::config::{Route, SentryConfig};
use crate::keys::{PrivateKey, PublicKey};
use crate::log_limit::LogLimit;
use crate::metrics::{self, Observe};
use crate::relay::ByteCounters;
use crate::transport::listen::{ListenError, Listeners};
use crate::{clock, lock};
use registry::Registry;
use tcp::accept_clients;

pub use crate::transport::STATUS_TIMEOUT;
pub use crate::transport::listen::HANDSHAKE_TIMEOUT;

static ACCEPT_LOG: LogLimit = LogLimit::new(Duration::from_secs(10));

/// Why the sentry could not start, or a reload could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A tunnel listener (QUIC, WireGuard, TLS) could not bind, or take the pinned keys.
    #[error(transparent)]
    Transport(#[from] ListenError),
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

/// A bound sentry, ready to run.
pub struct Sentry {
    shared: Arc<Shared>,
    initial: Vec<(Arc<RouteSlot>, Listener)>,
    metrics: Option<TcpListener>,
}

/// A cheap handle to observe and reload a running sentry.
#[derive(Clone)]
pub struct SentryHandle {
    shared: Arc<Shared>,
}

struct Shared {
    /// The tunnel listeners of every transport.
    listeners: Arc<Listeners>,
    metrics_addr: Option<SocketAddr>,
    /// The config in force (the last one applied).
    config: Mutex<SentryConfig>,
    tunnels: Registry,
    routes: Mutex<Vec<Arc<RouteSlot>>>,
    open: Arc<SentryCount>,
    /// Upstreams held down after a refusal.
    health: health::Health,
    /// Agents' outbound connections.
    egress: egress::Egress,
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
    /// tcp routes: from a client's admission to its upstream's `Ok`.
    setup: prometheus_client::metrics::histogram::Histogram,
    no_upstream: AtomicU64,
    /// UDP routes: datagrams dropped because their flow's queue was full.
    datagrams_dropped: AtomicU64,
    /// Cancelled when a reload removes the route (and at shutdown).
    stop: CancellationToken,
    /// `Some` while the route is `protocol = "jsonrpc"`.
    gateway: ArcSwapOption<gateway::Gateway>,
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
        let epoch = clock::now();
        let listeners = Listeners::bind(config, key, &names, stop.clone(), epoch).await?;
        let shared = Arc::new(Shared {
            listeners: Arc::new(listeners),
            metrics_addr: metrics.as_ref().and_then(|l| l.local_addr().ok()),
            config: Mutex::new(config.clone()),
            tunnels: Registry::new(names),
            routes: Mutex::new(initial.iter().map(|(slot, _)| slot.clone()).collect()),
            open,
            health: health::Health::default(),
            egress: egress::Egress::new(config),
            reloads: metrics::Reloads::default(),
            stop,
            relays: TaskTracker::new(),
            epoch,
        });
        Ok(Self {
            shared,
            initial,
            metrics,
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
        shared.listeners.start(shared.clone());
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
        shared.listeners.shutdown().await;
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
            setup: metrics::latency_histogram(),
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
    /// The bound QUIC address (useful when configured with port 0), when `quic_listen` is
    /// set.
    #[must_use]
    pub fn quic_addr(&self) -> Option<SocketAddr> {
        self.shared.listeners.quic_addr()
    }

    /// The bound TCP+TLS tunnel address, when `tls_listen` is set.
    #[must_use]
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.shared.listeners.tls_addr()
    }

    /// The bound WireGuard UDP address, when `wireguard_listen` is set.
    #[must_use]
    pub fn wireguard_addr(&self) -> Option<SocketAddr> {
        self.shared.listeners.wireguard()?.local_addr()
    }

    /// Time since the last completed WireGuard handshake with `peer` (an agent or a plain
    /// peer), if any.
    #[must_use]
    pub fn wireguard_handshake_age(&self, peer: &str) -> Option<Duration> {
        self.shared.listeners.wireguard()?.peer(peer)?.session().0
    }

    /// WireGuard datagrams dropped without an answer (unknown key, bad MAC, failed
    /// decryption).
    #[must_use]
    pub fn wireguard_dropped(&self) -> u64 {
        self.shared
            .listeners
            .wireguard()
            .map_or(0, |device| device.dropped())
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
        self.shared.tunnels.connected()
    }

    /// Wait until `agent`'s tunnel is up (`true`) or down (`false`).
    pub async fn wait_agent(&self, agent: &str, up: bool) {
        self.shared.tunnels.wait(agent, up).await;
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

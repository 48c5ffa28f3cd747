//! The agent engine: keeps a tunnel to every configured sentry and connects relayed streams
//! to the services it exports, and to nothing else.
//!
//! Invariants:
//! - The only addresses the agent ever connects to are its own `[[service]]` targets, looked
//!   up by the name in the relay header; an unknown name is answered `UnknownService`.
//! - Every relay header gets exactly one status byte before any payload.
//! - Each sentry has its own reconnect loop with capped, jittered backoff; one sentry failing
//!   does not touch the tunnels to the others. `[[sentry]]` entries with the same pinned key
//!   are one sentry over several transports: one tunnel, over the first entry that comes up.
//! - A UDP flow reaches only a `udp` service, a TCP connection only a `tcp` one.
//! - A reload ([`Reload::reload`](crate::reload::Reload::reload)) never cuts a relayed connection: the service table is
//!   swapped for later streams; a sentry added gets its tunnel; a sentry removed (or whose
//!   pinned key changed) stops taking new streams and keeps its tunnel until its open streams
//!   end.

mod egress;
mod observe;
mod peers;
pub use peers::mapped_source;
mod reload;
mod service;
mod tunnel;
pub use crate::transport::dial::{DialError, dial};

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::info;

use crate::config::{AgentConfig, SentryPeer, Source};
use crate::keys::PrivateKey;
use crate::lock;
use crate::log_limit::LogLimit;
use crate::metrics::{self, Observe};
use crate::relay::{ByteCounters, Status};
use crate::transport::dial::{Dialer, Live};
use crate::transport::quic::QuicError;
use tunnel::Tunnel;

/// Longest a connection attempt to a service may take before the agent answers
/// `ConnectFailed`. Kept below the sentry's status timeout.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Longest the sentry may take to send a complete header on a new stream.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// First reconnect delay and its cap.
const BACKOFF_BASE: Duration = Duration::from_millis(200);
const BACKOFF_CAP: Duration = Duration::from_secs(15);
/// A tunnel that lived this long was healthy: the next failure starts the backoff over.
const HEALTHY_AFTER: Duration = Duration::from_secs(10);
/// While a fallback transport carries the tunnel, how often the preferred (QUIC) one is tried.
const PREFER_RETRY: Duration = Duration::from_secs(30);
/// Idle timeout of relayed connections on the agent side. The sentry enforces the route's
/// idle timeout; this only reaps streams whose sentry vanished without a word.
const AGENT_IDLE_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// Every status an agent answers, in a fixed order (for counters).
const STATUSES: [Status; 7] = Status::ALL;
/// The `service` label of streams that named no exported service. Label values never come
/// from the wire, so a misbehaving sentry cannot grow the metrics.
const NO_SERVICE: &str = "-";

static REFUSED_LOG: LogLimit = LogLimit::new(Duration::from_secs(10));

/// Why the agent could not start, or a reload could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Quic(#[from] QuicError),
    #[error("metrics_listen: cannot listen on {addr}: {source}")]
    Metrics {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("egress listen: cannot listen on {addr}: {source}")]
    Egress {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// An agent ready to run.
pub struct Agent {
    shared: Arc<Shared>,
    spawn: mpsc::UnboundedReceiver<Tunnel>,
    metrics: Option<TcpListener>,
    /// The `[[egress]]` listeners, bound; they accept once `run` starts.
    egress: Vec<(Arc<egress::Slot>, TcpListener)>,
}

/// A cheap handle to observe and reload a running agent.
#[derive(Clone)]
pub struct AgentHandle {
    shared: Arc<Shared>,
}

struct Shared {
    key: PrivateKey,
    config: Mutex<AgentConfig>,
    services: ArcSwap<HashMap<String, ServiceSlot>>,
    /// Counters per service name ever exported, kept across reloads.
    service_stats: Mutex<HashMap<String, Arc<ServiceStats>>>,
    unknown: Arc<ServiceStats>,
    /// One entry per sentry: its transports in preference order.
    groups: Mutex<Vec<Arc<Group>>>,
    spawn: mpsc::UnboundedSender<Tunnel>,
    /// Tunnel streams shed because the service stopped reading them (see
    /// [`crate::transport::budget`]).
    streams_shed: Arc<AtomicU64>,
    reloads: metrics::Reloads,
    stop: CancellationToken,
    metrics_addr: Option<SocketAddr>,
    /// Recent clients of `source = "mapped"` services, by mapped address.
    peers: peers::Peers,
    /// The `[[egress]]` listeners in force.
    egress: Mutex<Vec<Arc<egress::Slot>>>,
    /// Counters per egress listen address ever bound, kept across reloads.
    egress_stats: Mutex<HashMap<SocketAddr, Arc<egress::ListenerStats>>>,
}

#[derive(Clone)]
struct ServiceSlot {
    target: SocketAddr,
    /// A `udp` service: reachable by UDP flows only.
    udp: bool,
    /// Relayed connections (UDP flows) to it at once, across sentries.
    max_connections: usize,
    /// How connections to it are addressed.
    source: Source,
    stats: Arc<ServiceStats>,
}

#[derive(Default)]
struct ServiceStats {
    bytes: ByteCounters,
    streams: [AtomicU64; STATUSES.len()],
    /// Relayed connections (UDP flows) to the service now (including one being connected).
    active: Arc<AtomicUsize>,
}

/// One sentry: the `[[sentry]]` entries that share its public key, in the order listed
/// (the preferred transport first, then the fallbacks).
struct Group {
    entries: Vec<Arc<TunnelState>>,
    /// Cancelled when a reload removes or changes this sentry (and at shutdown).
    retire: CancellationToken,
    /// Relayed connections of this sentry, both ways (egress ones hold a token), across
    /// reconnects (over TLS they outlive the control connection that was up when they
    /// began); the drain waits for them.
    relays: TaskTracker,
}

impl Group {
    fn peers(&self) -> Vec<SentryPeer> {
        self.entries.iter().map(|e| e.peer.clone()).collect()
    }
}

/// The `[[sentry]]` entries grouped by pinned key, in the order each key first appears.
fn group_peers(peers: &[SentryPeer]) -> Vec<Vec<SentryPeer>> {
    let mut groups: Vec<Vec<SentryPeer>> = Vec::new();
    for peer in peers {
        match groups
            .iter_mut()
            .find(|g| g[0].public_key == peer.public_key)
        {
            Some(group) => group.push(peer.clone()),
            None => groups.push(vec![peer.clone()]),
        }
    }
    groups
}

/// One `[[sentry]]` entry's tunnel, as metrics and health see it.
struct TunnelState {
    peer: SentryPeer,
    dialer: Dialer,
    live: Mutex<Option<(Live, Instant)>>,
    connects: AtomicU64,
}

fn status_index(status: Status) -> usize {
    STATUSES.iter().position(|s| *s == status).unwrap_or(0)
}

impl ServiceStats {
    fn count(&self, status: Status) {
        self.streams[status_index(status)].fetch_add(1, Ordering::Relaxed);
    }
}

impl Agent {
    /// Check the keys, bind the metrics listener; nothing is dialed until [`Agent::run`].
    ///
    /// # Errors
    /// The key cannot make a TLS identity, or the metrics address cannot be bound.
    pub fn new(config: &AgentConfig, key: &PrivateKey) -> Result<Self, AgentError> {
        let metrics = match config.metrics_listen {
            Some(addr) => {
                Some(metrics::bind(addr).map_err(|source| AgentError::Metrics { addr, source })?)
            }
            None => None,
        };
        let (spawn, spawned) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            key: key.clone(),
            config: Mutex::new(config.clone()),
            services: ArcSwap::from_pointee(HashMap::new()),
            service_stats: Mutex::new(HashMap::new()),
            unknown: Arc::default(),
            groups: Mutex::new(Vec::new()),
            spawn,
            streams_shed: Arc::default(),
            reloads: metrics::Reloads::default(),
            stop: CancellationToken::new(),
            metrics_addr: metrics.as_ref().and_then(|l| l.local_addr().ok()),
            peers: peers::Peers::default(),
            egress: Mutex::new(Vec::new()),
            egress_stats: Mutex::new(HashMap::new()),
        });
        let mut bound = Vec::new();
        for listener in &config.egress {
            let (socket, local) = egress::bind(listener).map_err(|source| AgentError::Egress {
                addr: listener.listen,
                source,
            })?;
            let stats = egress::stats_for(&shared.egress_stats, listener.listen);
            let slot = egress::Slot::new(listener, local, stats, &shared.stop);
            bound.push((slot, socket));
        }
        lock(&shared.egress).extend(bound.iter().map(|(slot, _)| slot.clone()));
        shared.set_services(config);
        for peers in group_peers(&config.sentries) {
            shared.add_group(&peers, config.max_streams_per_sentry)?;
        }
        Ok(Self {
            shared,
            spawn: spawned,
            metrics,
            egress: bound,
        })
    }

    /// A handle that outlives `run`.
    #[must_use]
    pub fn handle(&self) -> AgentHandle {
        AgentHandle {
            shared: self.shared.clone(),
        }
    }

    /// Run until `shutdown` completes; then refuse new relayed connections, let open ones
    /// finish for up to the config's `drain_timeout`, and close every tunnel cleanly.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) {
        let shared = self.shared;
        if let Some(listener) = self.metrics {
            if let Ok(listen) = listener.local_addr() {
                info!(%listen, "metrics listening (GET /metrics, GET /healthz)");
            }
            let source: Arc<dyn Observe> = Arc::new(AgentHandle {
                shared: shared.clone(),
            });
            tokio::spawn(metrics::serve(listener, source, shared.stop.clone()));
        }
        for (slot, listener) in self.egress {
            tokio::spawn(egress::accept(slot, listener, shared.clone()));
        }
        // A JoinSet, not a detached spawn: dropping `run` (an aborted task) takes the tunnels
        // down with it, as a killed process would.
        let mut tunnels = tokio::task::JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                Some(tunnel) = self.spawn.recv() => {
                    tunnels.spawn(tunnel.run());
                }
                Some(_) = tunnels.join_next(), if !tunnels.is_empty() => {}
            }
        }
        shared.stop.cancel();
        while tunnels.join_next().await.is_some() {}
        info!("agent stopped");
    }
}

/// Run an agent until `shutdown` completes (see [`Agent::run`]).
///
/// # Errors
/// The agent could not start (see [`Agent::new`]).
pub async fn run(
    config: &AgentConfig,
    key: &PrivateKey,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    Agent::new(config, key)?.run(shutdown).await;
    Ok(())
}

impl Shared {
    fn set_services(&self, config: &AgentConfig) {
        let mut stats = lock(&self.service_stats);
        let table = config
            .services
            .iter()
            .map(|s| {
                let stats = stats.entry(s.name.clone()).or_default().clone();
                (
                    s.name.clone(),
                    ServiceSlot {
                        target: s.target,
                        udp: s.udp,
                        max_connections: s.max_connections,
                        source: s.source,
                        stats,
                    },
                )
            })
            .collect();
        self.services.store(Arc::new(table));
    }

    /// Start dialing one sentry (its entries, over their transports), letting it hold at
    /// most `streams` streams at this agent.
    fn add_group(self: &Arc<Self>, peers: &[SentryPeer], streams: usize) -> Result<(), QuicError> {
        let mut entries = Vec::with_capacity(peers.len());
        for peer in peers {
            entries.push(Arc::new(TunnelState {
                peer: peer.clone(),
                dialer: Dialer::new(&self.key, peer, streams)?,
                live: Mutex::new(None),
                connects: AtomicU64::new(0),
            }));
        }
        let group = Arc::new(Group {
            entries,
            retire: self.stop.child_token(),
            relays: TaskTracker::new(),
        });
        lock(&self.groups).push(group.clone());
        // The receiver lives as long as `run`; after it, nothing is dialed any more.
        let _ = self.spawn.send(Tunnel::new(group, self.clone()));
        Ok(())
    }

    /// Every entry's state, in config order.
    fn entries(&self) -> Vec<Arc<TunnelState>> {
        lock(&self.groups)
            .iter()
            .flat_map(|g| g.entries.iter().cloned())
            .collect()
    }
}

impl AgentHandle {
    /// The bound metrics address, when `metrics_listen` is set.
    #[must_use]
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.shared.metrics_addr
    }

    /// The `/metrics` text, as the metrics listener serves it.
    #[must_use]
    pub fn render_metrics(&self) -> String {
        metrics::render(Arc::new(self.clone()))
    }

    /// The bound address of the egress listener configured at `listen` (useful with port 0).
    #[must_use]
    pub fn egress_addr(&self, listen: SocketAddr) -> Option<SocketAddr> {
        lock(&self.shared.egress)
            .iter()
            .find(|slot| slot.config.load().listen == listen)
            .map(|slot| slot.local)
    }
}

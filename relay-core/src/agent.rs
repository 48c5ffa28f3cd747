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
//! - A reload ([`AgentHandle::reload`]) never cuts a relayed connection: the service table is
//!   swapped for later streams; a sentry added gets its tunnel; a sentry removed (or whose
//!   pinned key changed) stops taking new streams and keeps its tunnel until its open streams
//!   end.

use std::collections::HashMap;
use std::future::Future;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use quinn::{ClientConfig, Connection, Endpoint};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::backoff::Backoff;
use crate::config::{AgentConfig, SentryPeer, TransportKind};
use crate::keys::PrivateKey;
use crate::log_limit::LogLimit;
use crate::metrics::{self, Families, Observe};
use crate::relay::datagram::{MAX_DATAGRAM, read_datagram, write_datagram};
use crate::relay::{
    ByteCounters, Header, PumpEnd, Status, encode_proxy_header, idle_watch, millis_since, pump,
};
use crate::transport::budget::Ledger;
use crate::transport::pin::SERVER_NAME;
use crate::transport::quic::{self, QuicError, Tuning, code};
use crate::transport::{TunnelStream, tls, wireguard};
use crate::{clock, lock};

/// Longest a connection attempt to a service may take before the agent answers
/// `ConnectFailed`. Kept below the sentry's status timeout.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Longest the sentry may take to send a complete header on a new stream.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest a tunnel handshake may take.
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);
/// First reconnect delay and its cap.
const BACKOFF_BASE: Duration = Duration::from_millis(200);
const BACKOFF_CAP: Duration = Duration::from_secs(15);
/// A tunnel that lived this long was healthy: the next failure starts the backoff over.
const HEALTHY_AFTER: Duration = Duration::from_secs(10);
/// How long the sentry may stay silent over WireGuard before the agent rebuilds the tunnel
/// with a fresh UDP socket (a fresh NAT mapping) and resolves the sentry's name again.
const WG_REBUILD_AFTER: Duration = Duration::from_secs(30);
/// While a fallback transport carries the tunnel, how often the preferred (QUIC) one is tried.
const PREFER_RETRY: Duration = Duration::from_secs(30);
/// Data connections a TLS tunnel opens at once.
const MAX_OPENING: usize = 16;
/// Pause after a TLS data connection that failed or was closed unused at once.
const DATA_RETRY_PAUSE: Duration = Duration::from_secs(1);
/// Idle timeout of relayed connections on the agent side. The sentry enforces the route's
/// idle timeout; this only reaps streams whose sentry vanished without a word.
const AGENT_IDLE_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// Every status an agent answers, in a fixed order (for counters).
const STATUSES: [Status; 7] = Status::ALL;
/// The `service` label of streams that named no exported service. Label values never come
/// from the wire, so a misbehaving sentry cannot grow the metrics.
const NO_SERVICE: &str = "-";

static REFUSED_LOG: LogLimit = LogLimit::new(Duration::from_secs(10));

/// Why one tunnel could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("resolving {0}: {1}")]
    Resolve(String, std::io::Error),
    #[error("{0} resolved to no address")]
    NoAddress(String),
    #[error(transparent)]
    Quic(#[from] QuicError),
    #[error("connecting: {0}")]
    Connect(#[from] quinn::ConnectError),
    #[error("handshake: {0}")]
    Handshake(#[from] quinn::ConnectionError),
    #[error("handshake timed out after {DIAL_TIMEOUT:?}")]
    Timeout,
}

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
}

/// What a reload changed, for the log line.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReloadReport {
    /// Sentries dialed from now on.
    pub added: Vec<String>,
    /// Sentries whose tunnels take no new streams and close once their streams end.
    pub removed: Vec<String>,
    /// Services exported now.
    pub services: usize,
    /// Changes that only a restart applies (the running value stays).
    pub need_restart: Vec<&'static str>,
}

/// An agent ready to run.
pub struct Agent {
    shared: Arc<Shared>,
    spawn: mpsc::UnboundedReceiver<Tunnel>,
    metrics: Option<TcpListener>,
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
}

#[derive(Clone)]
struct ServiceSlot {
    target: SocketAddr,
    /// A `udp` service: reachable by UDP flows only.
    udp: bool,
    /// Relayed connections (UDP flows) to it at once, across sentries.
    max_connections: usize,
    stats: Arc<ServiceStats>,
}

/// One of a bounded number of places (a service's connections, a sentry's streams); given
/// back when dropped.
struct Place(Arc<AtomicUsize>);

impl Place {
    /// A place of `count`'s, if fewer than `max` are taken.
    fn take(count: &Arc<AtomicUsize>, max: usize) -> Option<Self> {
        count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| Self(count.clone()))
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
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
    live: Mutex<Option<(LiveTunnel, Instant)>>,
    connects: AtomicU64,
}

/// What an entry needs to dial.
enum Dialer {
    Quic(ClientConfig),
    WireGuard,
    Tls(Arc<rustls::ClientConfig>),
}

impl Dialer {
    fn new(key: &PrivateKey, peer: &SentryPeer, streams: usize) -> Result<Self, QuicError> {
        Ok(match peer.transport {
            // The sentry may open no more streams than this agent lets one sentry hold.
            TransportKind::Quic => Self::Quic(quic::client_config_with_streams(
                key,
                peer.public_key,
                &Tuning::default(),
                u32::try_from(streams).unwrap_or(u32::MAX),
            )?),
            TransportKind::WireGuard => Self::WireGuard,
            TransportKind::Tls => Self::Tls(tls::client_config(key, peer.public_key)?),
        })
    }
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
        });
        shared.set_services(config);
        for peers in group_peers(&config.sentries) {
            shared.add_group(&peers, config.max_streams_per_sentry)?;
        }
        Ok(Self {
            shared,
            spawn: spawned,
            metrics,
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
        });
        lock(&self.groups).push(group.clone());
        // The receiver lives as long as `run`; after it, nothing is dialed any more.
        let _ = self.spawn.send(Tunnel {
            group,
            shared: self.clone(),
            relays: TaskTracker::new(),
            upgrade: Mutex::new(None),
            streams: Arc::default(),
        });
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

    /// Apply `config` (already parsed and validated) to the running agent.
    ///
    /// # Errors
    /// A new sentry's TLS settings cannot be made from the key.
    pub fn reload(
        &self,
        config: &AgentConfig,
        key: &PrivateKey,
    ) -> Result<ReloadReport, AgentError> {
        let result = self.apply(config, key);
        self.shared.reloads.count(result.is_ok());
        result
    }

    /// Count a reload refused before it reached [`Self::reload`] (the new config did not
    /// parse or its key did not load), so `config_reloads_total{result="error"}` sees it.
    pub fn count_refused_reload(&self) {
        self.shared.reloads.count(false);
    }

    fn apply(&self, config: &AgentConfig, key: &PrivateKey) -> Result<ReloadReport, AgentError> {
        let shared = &self.shared;
        let mut running = lock(&shared.config);
        let mut report = ReloadReport::default();
        // Client settings for new sentries first: the only step that can fail.
        for peer in &config.sentries {
            Dialer::new(&shared.key, peer, config.max_streams_per_sentry)?;
        }
        shared.set_services(config);
        report.services = config.services.len();
        // A sentry whose entries changed in any way (an added fallback, a new order) is
        // retired and started again as a new group.
        let wanted = group_peers(&config.sentries);
        let current: Vec<Arc<Group>> = lock(&shared.groups).clone();
        for group in &current {
            if !wanted.contains(&group.peers()) {
                for entry in &group.entries {
                    info!(sentry = %entry.peer.address, transport = entry.peer.transport.as_str(), "sentry removed or changed: its tunnel takes no new streams and closes once its open ones end");
                    report.removed.push(entry.peer.address.clone());
                }
                group.retire.cancel();
            }
        }
        lock(&shared.groups).retain(|g| wanted.contains(&g.peers()));
        for peers in &wanted {
            if !current.iter().any(|g| g.peers() == *peers) {
                shared.add_group(peers, config.max_streams_per_sentry)?;
                report.added.extend(peers.iter().map(|p| p.address.clone()));
            }
        }
        if config.metrics_listen != running.metrics_listen {
            report.need_restart.push("agent.metrics_listen");
        }
        if key.public_key() != shared.key.public_key() {
            report.need_restart.push("agent.private_key");
        }
        let mut applied = config.clone();
        applied.metrics_listen = running.metrics_listen;
        *running = applied;
        Ok(report)
    }

    /// The `/metrics` text, as the metrics listener serves it.
    #[must_use]
    pub fn render_metrics(&self) -> String {
        metrics::render(Arc::new(self.clone()))
    }
}

impl Observe for AgentHandle {
    fn collect(&self, out: &mut Families<'_>) -> std::fmt::Result {
        let shared = &self.shared;
        let tunnels: Vec<Arc<TunnelState>> = shared.entries();
        // (sentry, (rtt, age) while up, tunnels established, a WireGuard stream's window)
        type Row = (
            String,
            &'static str,
            Option<(Duration, Duration)>,
            u64,
            Option<usize>,
        );
        let live: Vec<Row> = tunnels
            .iter()
            .map(|t| {
                let live = lock(&t.live);
                let up = live
                    .as_ref()
                    .map(|(tunnel, since)| (tunnel.rtt(), clock::now().duration_since(*since)));
                let window = live.as_ref().and_then(|(tunnel, _)| tunnel.stream_window());
                (
                    t.peer.address.clone(),
                    t.peer.transport.as_str(),
                    up,
                    t.connects.load(Ordering::Relaxed),
                    window,
                )
            })
            .collect();
        let mut services: Vec<(String, Arc<ServiceStats>)> = lock(&shared.service_stats)
            .iter()
            .map(|(n, s)| (n.clone(), s.clone()))
            .collect();
        services.sort_by(|a, b| a.0.cmp(&b.0));
        services.push((NO_SERVICE.to_owned(), shared.unknown.clone()));
        let sentry_label =
            |a: &str, t: &str| [("sentry", a.to_owned()), ("transport", t.to_owned())];
        out.gauges(
            "agent_tunnel_up",
            "1 while the tunnel to this sentry is established, else 0.",
            live.iter()
                .map(|(a, t, up, _, _)| (sentry_label(a, t), i64::from(up.is_some()))),
        )?;
        out.gauges(
            "agent_tunnel_rtt_seconds",
            "Smoothed round-trip time of the tunnel to this sentry.",
            live.iter().filter_map(|(a, t, up, _, _)| {
                up.map(|(rtt, _)| (sentry_label(a, t), rtt.as_secs_f64()))
            }),
        )?;
        out.gauges(
            "agent_wireguard_stream_window_bytes",
            "Buffer each way, so the most in flight per round trip, that a new relayed stream \
             from this sentry gets now over WireGuard: wireguard_window, or with \"auto\" \
             sized for the round trip measured.",
            live.iter().filter_map(|(a, t, _, _, window)| {
                window.map(|w| (sentry_label(a, t), i64::try_from(w).unwrap_or(i64::MAX)))
            }),
        )?;
        out.gauges(
            "agent_tunnel_handshake_age_seconds",
            "Time since the current tunnel to this sentry was established.",
            live.iter().filter_map(|(a, t, up, _, _)| {
                up.map(|(_, age)| (sentry_label(a, t), age.as_secs_f64()))
            }),
        )?;
        out.counters(
            "agent_tunnel_streams_shed",
            "Relayed connections closed because their service stopped reading while holding \
             tunnel flow-control credit: past the tunnel's budget of held streams, or for 60 s.",
            [(
                [("transport", "quic")],
                shared.streams_shed.load(Ordering::Relaxed),
            )],
        )?;
        out.counters(
            "agent_tunnel_reconnects",
            "Tunnels established to this sentry after the first one since start.",
            live.iter()
                .map(|(a, t, _, n, _)| (sentry_label(a, t), n.saturating_sub(1))),
        )?;
        out.counters(
            "agent_streams",
            "Relayed streams answered, by service and status (ok, or why refused).",
            services.iter().flat_map(|(name, stats)| {
                STATUSES
                    .iter()
                    .enumerate()
                    .map(|(i, status)| {
                        (
                            [
                                ("service", name.clone()),
                                ("status", status.as_str().to_owned()),
                            ],
                            stats.streams[i].load(Ordering::Relaxed),
                        )
                    })
                    .collect::<Vec<_>>()
            }),
        )?;
        out.gauges(
            "agent_streams_active",
            "Relayed connections (and UDP flows) to a service now, ones being connected \
             included: at most the service's max_connections.",
            services.iter().map(|(name, s)| {
                (
                    [("service", name.clone())],
                    i64::try_from(s.active.load(Ordering::Relaxed)).unwrap_or(i64::MAX),
                )
            }),
        )?;
        out.counters(
            "agent_service_sent_bytes",
            "Bytes relayed from the sentry to the service.",
            services.iter().map(|(name, s)| {
                (
                    [("service", name.clone())],
                    s.bytes.down.load(Ordering::Relaxed),
                )
            }),
        )?;
        out.counters(
            "agent_service_received_bytes",
            "Bytes read from the service and relayed to the sentry.",
            services.iter().map(|(name, s)| {
                (
                    [("service", name.clone())],
                    s.bytes.up.load(Ordering::Relaxed),
                )
            }),
        )?;
        out.common(&shared.reloads, "agent")
    }

    fn health(&self) -> Result<String, String> {
        // A sentry is up when one of its transports is.
        let groups: Vec<Arc<Group>> = lock(&self.shared.groups).clone();
        let down: Vec<&str> = groups
            .iter()
            .filter(|g| g.entries.iter().all(|e| lock(&e.live).is_none()))
            .map(|g| g.entries[0].peer.address.as_str())
            .collect();
        if down.is_empty() {
            Ok(format!("{} tunnel(s) up", groups.len()))
        } else {
            Err(format!(
                "no tunnel to {} ({} of {} up)",
                down.join(", "),
                groups.len() - down.len(),
                groups.len()
            ))
        }
    }
}

/// The tunnel to a sentry while it is up.
enum LiveTunnel {
    Quic(Connection),
    WireGuard(Arc<wireguard::Peer>),
    Tls(Arc<tls::Control>),
}

impl LiveTunnel {
    fn rtt(&self) -> Duration {
        match self {
            Self::Quic(conn) => conn.rtt(),
            Self::WireGuard(peer) => peer.session().1.unwrap_or_default(),
            Self::Tls(control) => control.rtt(),
        }
    }

    fn stream_window(&self) -> Option<usize> {
        match self {
            Self::WireGuard(peer) => Some(peer.stream_window()),
            Self::Quic(_) | Self::Tls(_) => None,
        }
    }
}

/// How one try of one transport ended.
enum Attempt {
    /// The tunnel never came up; the next transport of the sentry is tried.
    Failed(String),
    /// It was up, then went down; the preferred transport is tried again.
    Ended(String),
    /// The sentry was removed from the config, or the agent stops.
    Retired,
    /// A fallback was up and the preferred transport answered again (see
    /// [`Tunnel::probe_preferred`]).
    Upgraded,
}

/// One sentry's tunnel and its reconnect loop, over its transports in preference order.
struct Tunnel {
    group: Arc<Group>,
    shared: Arc<Shared>,
    /// Relayed connections of this sentry, across reconnects (over TLS they outlive the
    /// control connection that was up when they began).
    relays: TaskTracker,
    /// A tunnel over the preferred transport, dialed while a fallback was up; the next QUIC
    /// attempt takes it instead of dialing.
    upgrade: Mutex<Option<(Endpoint, Connection)>>,
    /// Streams (and TLS data connections) this sentry holds open now, across transports and
    /// reconnects; at most `max_streams_per_sentry`.
    streams: Arc<AtomicUsize>,
}

impl Tunnel {
    async fn run(self) {
        let retire = &self.group.retire;
        let mut backoff = Backoff::new(BACKOFF_BASE, BACKOFF_CAP);
        while !retire.is_cancelled() {
            let started = clock::now();
            let mut was_up = false;
            for (i, entry) in self.group.entries.iter().enumerate() {
                let attempt = match &entry.dialer {
                    Dialer::Quic(client) => self.attempt_quic(entry, client).await,
                    Dialer::WireGuard => self.attempt_wireguard(entry).await,
                    Dialer::Tls(client) => self.attempt_tls(entry, client).await,
                };
                let sentry = &entry.peer.address;
                let transport = entry.peer.transport.as_str();
                match attempt {
                    Attempt::Retired => return,
                    Attempt::Ended(why) => {
                        warn!(%sentry, transport, "tunnel down: {why}");
                        was_up = true;
                        break;
                    }
                    Attempt::Upgraded => {
                        info!(%sentry, transport, "the sentry's preferred transport answers again: moving the tunnel to it");
                        was_up = true;
                        break;
                    }
                    Attempt::Failed(why) => {
                        warn!(%sentry, transport, "cannot reach sentry: {why}");
                        if let Some(next) = self.group.entries.get(i + 1) {
                            info!(sentry = %next.peer.address, transport = next.peer.transport.as_str(), "falling back to the sentry's next transport");
                        }
                    }
                }
            }
            let healthy_after = if self
                .group
                .entries
                .iter()
                .any(|e| e.peer.transport == TransportKind::WireGuard)
            {
                HEALTHY_AFTER + WG_REBUILD_AFTER
            } else {
                HEALTHY_AFTER
            };
            if was_up && clock::now().duration_since(started) >= healthy_after {
                backoff.reset();
            }
            if lock(&self.upgrade).is_some() {
                continue;
            }
            let delay = backoff.next_delay(rand::random::<f64>());
            debug!(sentry = %self.group.entries[0].peer.address, "reconnecting in {delay:?}");
            tokio::select! {
                () = retire.cancelled() => return,
                () = tokio::time::sleep(delay) => {}
            }
        }
    }

    fn up(entry: &TunnelState, live: LiveTunnel) {
        entry.connects.fetch_add(1, Ordering::Relaxed);
        *lock(&entry.live) = Some((live, clock::now()));
    }

    async fn attempt_quic(&self, entry: &TunnelState, client: &ClientConfig) -> Attempt {
        let retire = &self.group.retire;
        let sentry = &entry.peer.address;
        let upgrade = lock(&self.upgrade).take();
        let dialed = match upgrade {
            Some(dialed) => Ok(dialed),
            None => tokio::select! {
                () = retire.cancelled() => return Attempt::Retired,
                dialed = dial(&entry.peer, client, &self.shared.key) => dialed,
            },
        };
        let (endpoint, conn) = match dialed {
            Ok(dialed) => dialed,
            Err(e) => return Attempt::Failed(e.to_string()),
        };
        info!(%sentry, remote = %conn.remote_address(), transport = "quic", "tunnel up");
        Self::up(entry, LiveTunnel::Quic(conn.clone()));
        let reason = self.serve(&conn).await;
        *lock(&entry.live) = None;
        endpoint.close(code::SHUTDOWN, b"agent shutting down");
        if retire.is_cancelled() {
            let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
            return Attempt::Retired;
        }
        Attempt::Ended(reason.to_string())
    }

    /// Serve a stream the sentry opened, if the sentry holds fewer than
    /// `max_streams_per_sentry` here; else answer it `Busy` (a short task: the header, then
    /// the answer, within the header timeout).
    fn serve_stream(&self, stream: TunnelStream) {
        let max = lock(&self.shared.config).max_streams_per_sentry;
        let shared = self.shared.clone();
        match Place::take(&self.streams, max) {
            Some(place) => {
                self.relays.spawn(async move {
                    let _place = place;
                    relay_stream(stream, shared, Refuse::No).await;
                });
            }
            None => {
                tokio::spawn(relay_stream(stream, shared, Refuse::Busy));
            }
        }
    }

    /// Serve relayed streams until the tunnel closes (returns why) or the tunnel is retired
    /// (drains first: until its streams end, but at shutdown for at most `drain_timeout`).
    async fn serve(&self, conn: &Connection) -> quinn::ConnectionError {
        let ledger = Ledger::watch(conn, self.shared.streams_shed.clone());
        loop {
            let accepted = tokio::select! {
                () = self.group.retire.cancelled() => break,
                accepted = conn.accept_bi() => accepted,
            };
            match accepted {
                Ok((send, recv)) => {
                    self.serve_stream(TunnelStream::Quic(send, ledger.recv(recv, None)));
                }
                Err(reason) => return reason,
            }
        }
        let refuse_new = async {
            while let Ok((send, recv)) = conn.accept_bi().await {
                let stream = TunnelStream::Quic(send, ledger.recv(recv, None));
                tokio::spawn(relay_stream(
                    stream,
                    self.shared.clone(),
                    Refuse::ShuttingDown,
                ));
            }
        };
        self.drain(refuse_new).await;
        conn.close(code::SHUTDOWN, b"agent shutting down");
        quinn::ConnectionError::LocallyClosed
    }

    /// The WireGuard tunnel: a device with the sentry as its one peer, given up (to be
    /// rebuilt with a fresh socket, the address resolved again) when the sentry stays silent
    /// for [`WG_REBUILD_AFTER`].
    async fn attempt_wireguard(&self, entry: &TunnelState) -> Attempt {
        let peer = &entry.peer;
        let sentry = peer.address.clone();
        let (Some(overlay), Some(public)) = (peer.wireguard, peer.public_key.wireguard()) else {
            // The config parser refuses a WireGuard sentry without both.
            return Attempt::Failed("no WireGuard addresses or key for this sentry".to_owned());
        };
        let remote = match resolve(&sentry).await {
            Ok(remote) => remote,
            Err(e) => return Attempt::Failed(e.to_string()),
        };
        let (events_tx, mut events) = mpsc::unbounded_channel();
        let on_event: wireguard::PeerEvents = Arc::new(move |_, up| {
            let _ = events_tx.send(up);
        });
        let stop = CancellationToken::new();
        let spec = wireguard::PeerSpec {
            name: sentry.clone(),
            public,
            address: overlay.sentry_address,
            endpoint: Some(remote),
            keepalive: Some(wireguard::AGENT_KEEPALIVE),
            liveness: wireguard::AGENT_LIVENESS,
            accept: true,
            window: overlay.window,
        };
        let secret = self.shared.key.wireguard_secret();
        let device = match wireguard::Device::bind(
            unspecified(remote),
            secret,
            overlay.address,
            &[spec],
            on_event,
            stop.clone(),
        )
        .await
        {
            Ok(device) => device,
            Err(e) => return Attempt::Failed(format!("cannot open a UDP socket: {e}")),
        };
        let Some(to_sentry) = device.peer(&sentry) else {
            stop.cancel();
            return Attempt::Failed("the WireGuard device lost its peer".to_owned());
        };
        let Some(mut accepted) = to_sentry.take_accepted() else {
            stop.cancel();
            return Attempt::Failed("the WireGuard peer accepts no streams".to_owned());
        };
        debug!(%sentry, %remote, "WireGuard handshaking");
        let connects = entry.connects.load(Ordering::Relaxed);
        let reason = self
            .serve_wireguard(entry, &to_sentry, &mut accepted, &mut events)
            .await;
        *lock(&entry.live) = None;
        stop.cancel();
        if self.group.retire.is_cancelled() {
            Attempt::Retired
        } else if entry.connects.load(Ordering::Relaxed) == connects {
            Attempt::Failed(reason)
        } else {
            Attempt::Ended(reason)
        }
    }

    /// Serve streams the sentry opens in the overlay until it has been silent too long
    /// (returns why) or the tunnel is retired (drains first, as over QUIC).
    async fn serve_wireguard(
        &self,
        entry: &TunnelState,
        peer: &Arc<wireguard::Peer>,
        accepted: &mut mpsc::Receiver<wireguard::OverlayStream>,
        events: &mut mpsc::UnboundedReceiver<bool>,
    ) -> String {
        let sentry = &entry.peer.address;
        let mut silent_since = Some(clock::now());
        let mut check = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                () = self.group.retire.cancelled() => break,
                Some(stream) = accepted.recv() => self.serve_stream(TunnelStream::Overlay(stream)),
                Some(up) = events.recv() => {
                    if up {
                        info!(%sentry, remote = ?peer.endpoint(), transport = "wireguard", "tunnel up");
                        Self::up(entry, LiveTunnel::WireGuard(peer.clone()));
                        silent_since = None;
                    } else {
                        warn!(%sentry, transport = "wireguard", "no packet from the sentry within {:?}", wireguard::AGENT_LIVENESS);
                        *lock(&entry.live) = None;
                        silent_since = Some(clock::now());
                    }
                }
                _ = check.tick() => {
                    if silent_since.is_some_and(|t| clock::now().duration_since(t) >= WG_REBUILD_AFTER) {
                        return format!("no answer from the sentry for {WG_REBUILD_AFTER:?}");
                    }
                }
            }
        }
        let refuse_new = async {
            while let Some(stream) = accepted.recv().await {
                tokio::spawn(relay_stream(
                    TunnelStream::Overlay(stream),
                    self.shared.clone(),
                    Refuse::ShuttingDown,
                ));
            }
        };
        self.drain(refuse_new).await;
        "retired".to_owned()
    }

    /// The TCP+TLS tunnel: a control connection, and a pool of data connections the sentry
    /// takes one relayed connection each from (see [`tls`]).
    async fn attempt_tls(
        &self,
        entry: &TunnelState,
        client: &Arc<rustls::ClientConfig>,
    ) -> Attempt {
        let retire = &self.group.retire;
        let sentry = &entry.peer.address;
        let remote = match resolve(sentry).await {
            Ok(remote) => remote,
            Err(e) => return Attempt::Failed(e.to_string()),
        };
        let connect = tls::connect(remote, client.clone(), tls::Role::Control);
        let io = tokio::select! {
            () = retire.cancelled() => return Attempt::Retired,
            dialed = tokio::time::timeout(DIAL_TIMEOUT, connect) => match dialed {
                Ok(Ok(io)) => io,
                Ok(Err(e)) => return Attempt::Failed(format!("connecting: {e}")),
                Err(_) => return Attempt::Failed(format!("handshake timed out after {DIAL_TIMEOUT:?}")),
            },
        };
        let control = Arc::new(tls::Control::default());
        let pool = Arc::new(DataPool {
            remote,
            client: client.clone(),
            idle: AtomicUsize::new(0),
            opening: AtomicUsize::new(0),
            wanted: AtomicUsize::new(0),
            wake: Notify::new(),
            streams: self.streams.clone(),
            max_streams: lock(&self.shared.config).max_streams_per_sentry,
        });
        let (first_tx, first) = oneshot::channel();
        // The agent asks for nothing; the sender lives as long as the control loop.
        let (_asks, no_asks) = mpsc::channel(1);
        let on_want = |n| pool.want(n);
        let run = tls::run_control(io, &control, no_asks, on_want, Some(first_tx));
        tokio::pin!(run);
        // Up once the sentry's first frame arrives: it has accepted this agent's key.
        tokio::select! {
            () = retire.cancelled() => return Attempt::Retired,
            why = &mut run => return Attempt::Failed(format!("{why} (is this agent's key pinned in the sentry's [[agent]] list?)")),
            first = tokio::time::timeout(DIAL_TIMEOUT, first) => {
                if !matches!(first, Ok(Ok(()))) {
                    return Attempt::Failed("the sentry sent nothing after the handshake".to_owned());
                }
            }
        }
        info!(%sentry, %remote, transport = "tls", "tunnel up");
        Self::up(entry, LiveTunnel::Tls(control.clone()));
        let generation = retire.child_token();
        let ended = tokio::select! {
            why = &mut run => Attempt::Ended(why),
            () = retire.cancelled() => Attempt::Retired,
            () = self.keep_pool(&pool, &generation) => Attempt::Retired,
            () = self.probe_preferred(entry) => Attempt::Upgraded,
        };
        // Idle data connections close with the control connection; those carrying a relayed
        // connection finish on their own.
        generation.cancel();
        *lock(&entry.live) = None;
        if matches!(ended, Attempt::Retired) {
            self.drain(std::future::pending()).await;
        }
        ended
    }

    /// While `entry`, a fallback, is up: every [`PREFER_RETRY`], dial the sentry's first entry
    /// when it is QUIC; returns once that worked, the new tunnel left in `upgrade`. Never
    /// returns for the first entry itself, or when the first is not QUIC.
    async fn probe_preferred(&self, entry: &TunnelState) {
        let first = &self.group.entries[0];
        let Dialer::Quic(client) = &first.dialer else {
            return std::future::pending().await;
        };
        if std::ptr::eq(first.as_ref(), entry) {
            return std::future::pending().await;
        }
        loop {
            tokio::time::sleep(PREFER_RETRY).await;
            match dial(&first.peer, client, &self.shared.key).await {
                Ok(dialed) => {
                    *lock(&self.upgrade) = Some(dialed);
                    return;
                }
                Err(e) => {
                    debug!(sentry = %first.peer.address, "the preferred transport still does not answer: {e}");
                }
            }
        }
    }

    /// Keep [`tls::POOL_IDLE`] idle data connections open toward the sentry, plus what it asks
    /// for, until `generation` ends.
    async fn keep_pool(&self, pool: &Arc<DataPool>, generation: &CancellationToken) {
        loop {
            let wake = pool.wake.notified();
            tokio::pin!(wake);
            wake.as_mut().enable();
            while pool.short() {
                pool.opening.fetch_add(1, Ordering::Relaxed);
                self.relays.spawn(data_connection(
                    pool.clone(),
                    generation.clone(),
                    self.shared.clone(),
                ));
            }
            tokio::select! {
                () = wake => {}
                () = generation.cancelled() => return,
            }
        }
    }

    /// Retired: new streams are answered `ShuttingDown` by `refuse_new` (the sentry fails
    /// over) while the open ones finish; at shutdown for at most `drain_timeout`.
    async fn drain(&self, refuse_new: impl Future<Output = ()>) {
        let relays = &self.relays;
        relays.close();
        let deadline = async {
            self.shared.stop.cancelled().await;
            let drain = lock(&self.shared.config).drain_timeout;
            tokio::time::sleep(drain).await;
        };
        tokio::select! {
            () = refuse_new => {}
            () = relays.wait() => {}
            () = deadline => {}
        }
    }
}

/// The agent's side of a TLS tunnel's data connections.
struct DataPool {
    remote: SocketAddr,
    client: Arc<rustls::ClientConfig>,
    /// Connected and waiting for the sentry's [`tls::GO`].
    idle: AtomicUsize,
    /// Connecting.
    opening: AtomicUsize,
    /// Extra connections the sentry asked for, not yet opened.
    wanted: AtomicUsize,
    /// Wakes [`Tunnel::keep_pool`] when a count changed.
    wake: Notify,
    /// The sentry's streams in use at this agent (its data connections carrying a relayed
    /// connection), and how many it may hold with the idle and opening ones.
    streams: Arc<AtomicUsize>,
    max_streams: usize,
}

impl DataPool {
    fn want(&self, n: u32) {
        let n = usize::try_from(n).unwrap_or(usize::MAX);
        let _ = self
            .wanted
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |w| {
                Some(w.saturating_add(n).min(tls::MAX_POOLED))
            });
        self.wake.notify_one();
    }

    /// Whether another data connection should be opened now; takes one from `wanted`.
    fn short(&self) -> bool {
        let open = self.idle.load(Ordering::Relaxed) + self.opening.load(Ordering::Relaxed);
        if open >= tls::MAX_POOLED
            || self.opening.load(Ordering::Relaxed) >= MAX_OPENING
            || open + self.streams.load(Ordering::Relaxed) >= self.max_streams
        {
            return false;
        }
        if open < tls::POOL_IDLE {
            return true;
        }
        self.wanted
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |w| w.checked_sub(1))
            .is_ok()
    }

    fn changed(&self, count: &AtomicUsize) {
        count.fetch_sub(1, Ordering::Relaxed);
        self.wake.notify_one();
    }
}

/// One data connection: open it, wait in the sentry's pool for [`tls::GO`], relay one
/// connection. A connection that fails or is closed unused soon after opening costs a pause
/// before it counts as gone, so a sentry that refuses them is not dialed in a tight loop.
async fn data_connection(pool: Arc<DataPool>, generation: CancellationToken, shared: Arc<Shared>) {
    let connect = tls::connect(pool.remote, pool.client.clone(), tls::Role::Data);
    let connected = tokio::select! {
        () = generation.cancelled() => None,
        dialed = tokio::time::timeout(DIAL_TIMEOUT, connect) => dialed.ok().and_then(Result::ok),
    };
    let Some(mut io) = connected else {
        let _ = tokio::time::timeout(DATA_RETRY_PAUSE, generation.cancelled()).await;
        pool.changed(&pool.opening);
        return;
    };
    let since = clock::now();
    pool.idle.fetch_add(1, Ordering::Relaxed);
    pool.changed(&pool.opening);
    let mut go = [0u8; 1];
    let went = tokio::select! {
        () = generation.cancelled() => false,
        read = io.read_exact(&mut go) => read.is_ok() && go[0] == tls::GO,
    };
    if !went && clock::now().duration_since(since) < DATA_RETRY_PAUSE {
        let _ = tokio::time::timeout(DATA_RETRY_PAUSE, generation.cancelled()).await;
    }
    // Counted in use before it stops counting idle, so the pool never opens past the cap.
    let place = went.then(|| Place::take(&pool.streams, pool.max_streams));
    pool.changed(&pool.idle);
    if let Some(place) = place {
        let stream = TunnelStream::Tls(Box::new(tls::TlsRelay::new(io)));
        let refusal = if place.is_some() {
            Refuse::No
        } else {
            Refuse::Busy
        };
        relay_stream(stream, shared, refusal).await;
        drop(place);
    }
}

/// The unspecified address of `remote`'s family, to bind a socket toward it.
fn unspecified(remote: SocketAddr) -> SocketAddr {
    if remote.is_ipv4() {
        SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))
    } else {
        SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0))
    }
}

/// The first address `address` resolves to.
async fn resolve(address: &str) -> Result<SocketAddr, DialError> {
    tokio::net::lookup_host(address)
        .await
        .map_err(|e| DialError::Resolve(address.to_owned(), e))?
        .next()
        .ok_or_else(|| DialError::NoAddress(address.to_owned()))
}

/// Make one tunnel to `peer`: resolve its address, bind a fresh UDP socket, handshake.
///
/// The returned endpoint must be kept as long as the connection is used.
pub async fn dial(
    peer: &SentryPeer,
    client: &ClientConfig,
    key: &PrivateKey,
) -> Result<(Endpoint, Connection), DialError> {
    let address = &peer.address;
    let remote = tokio::net::lookup_host(address.as_str())
        .await
        .map_err(|e| DialError::Resolve(address.clone(), e))?
        .next()
        .ok_or_else(|| DialError::NoAddress(address.clone()))?;
    // A fresh socket per attempt: a new source port gets a fresh NAT mapping.
    let endpoint = quic::client_endpoint(unspecified(remote), key, &Tuning::default())?;
    let connecting = endpoint.connect_with(client.clone(), remote, SERVER_NAME)?;
    match tokio::time::timeout(DIAL_TIMEOUT, connecting).await {
        Ok(Ok(conn)) => Ok((endpoint, conn)),
        Ok(Err(e)) => Err(e.into()),
        Err(_) => Err(DialError::Timeout),
    }
}

/// Why the agent refuses a stream whatever its header says.
#[derive(Clone, Copy)]
enum Refuse {
    /// Serve it.
    No,
    /// The tunnel is retired: `ShuttingDown`.
    ShuttingDown,
    /// The sentry holds `max_streams_per_sentry` streams already: `Busy`.
    Busy,
}

/// Answer one relay header, then pump bytes between the stream and the service.
async fn relay_stream(mut stream: TunnelStream, shared: Arc<Shared>, refusal: Refuse) {
    let send = &mut stream;
    let unknown = &shared.unknown;
    let header = match tokio::time::timeout(HEADER_TIMEOUT, Header::read_from(send)).await {
        Ok(Ok(header)) => header,
        Ok(Err(e)) => {
            refuse(
                send,
                unknown,
                Status::BadHeader,
                format!("bad relay header: {e}"),
            )
            .await;
            return;
        }
        Err(_) => {
            send.abort();
            return;
        }
    };
    send.set_client(header.client.ip());
    let Some(ServiceSlot {
        target,
        udp,
        max_connections,
        stats,
    }) = shared.services.load().get(&header.service).cloned()
    else {
        let why = format!(
            "route {} asked for unknown service {:?}",
            header.route, header.service
        );
        refuse(send, unknown, Status::UnknownService, why).await;
        return;
    };
    if udp != header.udp {
        let kind = |udp| if udp { "udp" } else { "tcp" };
        let why = format!(
            "route {} asked for service {:?} over {}, but it is a {} service",
            header.route,
            header.service,
            kind(header.udp),
            kind(udp)
        );
        refuse(send, &stats, Status::UnknownService, why).await;
        return;
    }
    let refused = match refusal {
        Refuse::No => None,
        Refuse::ShuttingDown => Some((Status::ShuttingDown, "shutting down".to_owned())),
        Refuse::Busy => Some((
            Status::Busy,
            "this sentry holds max_streams_per_sentry streams already".to_owned(),
        )),
    };
    if let Some((status, why)) = refused {
        refuse(send, &stats, status, why).await;
        return;
    }
    // Counted from here, so connections being made count against the cap too.
    let Some(_active) = Place::take(&stats.active, max_connections) else {
        let why = format!(
            "service {} is at its max_connections ({max_connections})",
            header.service
        );
        refuse(send, &stats, Status::Busy, why).await;
        return;
    };
    if udp {
        relay_flow(stream, &header, target, &stats).await;
        return;
    }
    let mut tcp = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target)).await {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            refuse(
                send,
                &stats,
                Status::ConnectRefused,
                format!(
                    "service {} at {target} refused the connection",
                    header.service
                ),
            )
            .await;
            return;
        }
        Ok(Err(e)) => {
            refuse(
                send,
                &stats,
                Status::ConnectFailed,
                format!("service {} at {target}: {e}", header.service),
            )
            .await;
            return;
        }
        Err(_) => {
            refuse(
                send,
                &stats,
                Status::ConnectFailed,
                format!("service {} at {target}: connect timed out", header.service),
            )
            .await;
            return;
        }
    };
    let _ = tcp.set_nodelay(true);
    if let Some(proxy) = header.proxy {
        // Before any payload, and before the sentry is told Ok, so a service that closes on
        // the header counts as a failed connect rather than a relayed connection.
        let bytes = encode_proxy_header(proxy.version, header.client, proxy.destination);
        if let Err(e) = tcp.write_all(&bytes).await {
            refuse(
                send,
                &stats,
                Status::ConnectFailed,
                format!(
                    "service {} at {target}: writing the PROXY header: {e}",
                    header.service
                ),
            )
            .await;
            return;
        }
    }
    if send.write_all(&[Status::Ok as u8]).await.is_err() || send.flush().await.is_err() {
        return;
    }
    stats.count(Status::Ok);
    let shed = stream.shed_signal();
    let (mut tcp_read, mut tcp_write) = tcp.into_split();
    let (mut tunnel_read, mut tunnel_write) = stream.halves();
    let (end, moved) = pump(
        &mut tcp_read,
        &mut tcp_write,
        &mut tunnel_read,
        &mut tunnel_write,
        AGENT_IDLE_TIMEOUT,
        &stats.bytes,
        shed.as_ref(),
    )
    .await;
    if !matches!(end, PumpEnd::Done) {
        stream.abort();
    }
    if matches!(end, PumpEnd::TunnelError(_) | PumpEnd::Shed) {
        // The service must not take a cut-off stream for a whole one: a reset, not a FIN.
        let _ = tcp_read.as_ref().set_zero_linger();
    }
    debug!(route = %header.route, client = %header.client, service = %header.service, to_service = moved.down, from_service = moved.up, ?end, "relayed connection closed");
}

/// A UDP flow to a `udp` service: a socket of its own, connected to the service (so only the
/// service's replies are taken), framed datagrams both ways until the sentry ends the flow.
async fn relay_flow(
    mut stream: TunnelStream,
    header: &Header,
    target: SocketAddr,
    stats: &ServiceStats,
) {
    let connected = async {
        let socket = UdpSocket::bind(unspecified(target)).await?;
        socket.connect(target).await?;
        Ok::<_, std::io::Error>(socket)
    };
    let socket = match connected.await {
        Ok(socket) => socket,
        Err(e) => {
            let why = format!("service {} at {target}: {e}", header.service);
            refuse(&mut stream, stats, Status::ConnectFailed, why).await;
            return;
        }
    };
    if stream.write_all(&[Status::Ok as u8]).await.is_err() || stream.flush().await.is_err() {
        return;
    }
    stats.count(Status::Ok);
    let start = clock::now();
    let last = AtomicU64::new(0);
    let (mut read, mut write) = stream.halves();
    let to_service = async {
        while let Some(datagram) = read_datagram(&mut read).await? {
            // A send that fails loses one datagram, as UDP does.
            let _ = socket.send(&datagram).await;
            stats
                .bytes
                .down
                .fetch_add(datagram.len() as u64, Ordering::Relaxed);
            last.store(millis_since(start), Ordering::Relaxed);
        }
        Ok::<_, std::io::Error>(())
    };
    let from_service = async {
        loop {
            // Sized for any datagram only while one is read, so an idle flow holds no buffer.
            socket.readable().await?;
            let mut buf = Vec::with_capacity(MAX_DATAGRAM);
            match socket.try_recv_buf(&mut buf) {
                Ok(_) => {
                    write_datagram(&mut write, &buf).await?;
                    stats
                        .bytes
                        .up
                        .fetch_add(buf.len() as u64, Ordering::Relaxed);
                    last.store(millis_since(start), Ordering::Relaxed);
                }
                // Readiness can be spurious; and an ICMP "port unreachable" from a service not
                // listening yet surfaces here, once, without ending the flow.
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::ConnectionRefused
                    ) => {}
                Err(e) => return Err::<(), _>(e),
            }
        }
    };
    let end = tokio::select! {
        result = to_service => result.err(),
        result = from_service => result.err(),
        () = idle_watch(start, &last, AGENT_IDLE_TIMEOUT) => None,
    };
    match end {
        None => {
            let _ = tokio::time::timeout(Duration::from_secs(1), stream.shutdown()).await;
        }
        Some(e) => {
            debug!(route = %header.route, client = %header.client, service = %header.service, "UDP flow failed: {e}");
            stream.abort();
        }
    }
}

/// Answer a header with a refusal and end the stream.
async fn refuse(send: &mut TunnelStream, stats: &ServiceStats, status: Status, why: String) {
    stats.count(status);
    if let Some(suppressed) = REFUSED_LOG.allow() {
        warn!(?status, suppressed, "refused a relayed connection: {why}");
    }
    // A failure means the stream is already gone; there is no one left to tell.
    if send.write_all(&[status as u8]).await.is_ok() {
        let _ = send.shutdown().await;
    }
}

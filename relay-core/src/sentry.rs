//! The sentry engine: public TCP listeners relayed to connected agents over QUIC.
//!
//! [`Sentry::bind`] binds every socket first (so a port conflict fails start-up, not the
//! first client), then [`Sentry::run`] accepts agents and clients until shutdown.
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

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use quinn::{Connection, Endpoint, RecvStream, SendStream};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::admission::{
    DEFAULT_HANDSHAKE_LIMITS, Gate, Handshake, HandshakeGate, HandshakePermit, Permit, SentryCount,
};
use crate::clock;
use crate::config::{Route, SentryConfig};
use crate::keys::{PrivateKey, PublicKey};
use crate::log_limit::LogLimit;
use crate::relay::{Header, Proxy, PumpEnd, Status, pump};
use crate::transport::quic::{self, QuicError, Tuning, code};

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

/// Why the sentry could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Quic(#[from] QuicError),
    #[error("route {route:?}: cannot listen on {addr}: {source}")]
    Listen {
        route: String,
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A bound sentry, ready to run.
pub struct Sentry {
    endpoint: Endpoint,
    listeners: Vec<(Arc<Route>, Arc<Gate>, TcpListener)>,
    handle: SentryHandle,
}

/// A cheap handle to observe a running sentry.
#[derive(Clone)]
pub struct SentryHandle {
    registry: Arc<Registry>,
    quic_addr: SocketAddr,
    routes: Arc<Vec<(String, SocketAddr, Arc<Gate>)>>,
}

/// Connected agents by name.
struct Registry {
    names: HashMap<PublicKey, String>,
    tunnels: Mutex<HashMap<String, Connection>>,
    /// Bumped on every change, for waiters.
    changed: watch::Sender<u64>,
}

enum OpenError {
    /// The agent answered, but not `Ok`.
    Refused(Option<Status>),
    /// The agent did not answer in time.
    Unresponsive,
    /// The tunnel failed or had no free stream.
    Tunnel(String),
}

impl Sentry {
    /// Bind the QUIC endpoint and every route listener.
    pub async fn bind(config: &SentryConfig, key: &PrivateKey) -> Result<Self, StartError> {
        let names: HashMap<PublicKey, String> = config
            .agents
            .iter()
            .map(|a| (a.public_key, a.name.clone()))
            .collect();
        let endpoint =
            quic::server_endpoint(config.quic_listen, key, names.clone(), &Tuning::default())?;
        let quic_addr = endpoint.local_addr().map_err(|source| QuicError::Bind {
            addr: config.quic_listen,
            source,
        })?;
        let mut listeners = Vec::new();
        let mut routes = Vec::new();
        let open = SentryCount::new(config.max_connections);
        for route in &config.routes {
            let listen_error = |source| StartError::Listen {
                route: route.name.clone(),
                addr: route.listen,
                source,
            };
            let listener = TcpListener::bind(route.listen)
                .await
                .map_err(listen_error)?;
            let gate = Gate::new(route.limits.clone(), open.clone());
            routes.push((
                route.name.clone(),
                listener.local_addr().map_err(listen_error)?,
                gate.clone(),
            ));
            listeners.push((Arc::new(route.clone()), gate, listener));
        }
        let registry = Arc::new(Registry {
            names,
            tunnels: Mutex::new(HashMap::new()),
            changed: watch::Sender::new(0),
        });
        let handle = SentryHandle {
            registry,
            quic_addr,
            routes: Arc::new(routes),
        };
        Ok(Self {
            endpoint,
            listeners,
            handle,
        })
    }

    /// A handle that outlives `run`'s borrow of the sentry.
    #[must_use]
    pub fn handle(&self) -> SentryHandle {
        self.handle.clone()
    }

    /// Serve until `shutdown` completes, then stop accepting, let relayed connections finish
    /// for up to `drain`, and close every tunnel cleanly.
    pub async fn run(self, shutdown: impl Future<Output = ()>, drain: Duration) {
        let stop = CancellationToken::new();
        let relays = TaskTracker::new();
        let registry = self.handle.registry.clone();
        tokio::spawn(accept_agents(
            self.endpoint.clone(),
            registry.clone(),
            stop.clone(),
        ));
        for (route, gate, listener) in self.listeners {
            if let Ok(listen) = listener.local_addr() {
                info!(route = %route.name, %listen, "route listening");
            }
            tokio::spawn(accept_clients(
                route,
                gate,
                listener,
                registry.clone(),
                relays.clone(),
                stop.clone(),
            ));
        }
        shutdown.await;
        stop.cancel();
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
        self.endpoint.close(code::SHUTDOWN, b"sentry shutting down");
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
        info!("sentry stopped");
    }
}

impl SentryHandle {
    /// The bound QUIC address (useful when configured with port 0).
    #[must_use]
    pub fn quic_addr(&self) -> SocketAddr {
        self.quic_addr
    }

    /// The bound address of a route.
    #[must_use]
    pub fn route_addr(&self, name: &str) -> Option<SocketAddr> {
        self.routes
            .iter()
            .find(|(n, ..)| n == name)
            .map(|(_, a, _)| *a)
    }

    /// The admission state of a route: open connections, refusals by reason.
    #[must_use]
    pub fn route_gate(&self, name: &str) -> Option<Arc<Gate>> {
        self.routes
            .iter()
            .find(|(n, ..)| n == name)
            .map(|(.., g)| g.clone())
    }

    /// Names of the agents with a live tunnel, sorted.
    #[must_use]
    pub fn connected(&self) -> Vec<String> {
        let mut names: Vec<String> = self.registry.lock().keys().cloned().collect();
        names.sort();
        names
    }

    /// Wait until `agent`'s tunnel is up (`true`) or down (`false`).
    pub async fn wait_agent(&self, agent: &str, up: bool) {
        let mut changes = self.registry.changed.subscribe();
        while self.registry.lock().contains_key(agent) != up {
            if changes.changed().await.is_err() {
                return;
            }
        }
    }
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Connection>> {
        self.tunnels.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn get(&self, agent: &str) -> Option<Connection> {
        self.lock().get(agent).cloned()
    }

    fn insert(&self, agent: &str, conn: Connection) -> Option<Connection> {
        let old = self.lock().insert(agent.to_owned(), conn);
        self.changed.send_modify(|n| *n += 1);
        old
    }

    /// Remove `agent`'s tunnel if it is still `conn` (a newer one may have replaced it).
    fn remove(&self, agent: &str, conn: &Connection) {
        let mut tunnels = self.lock();
        if tunnels
            .get(agent)
            .is_some_and(|c| c.stable_id() == conn.stable_id())
        {
            tunnels.remove(agent);
            drop(tunnels);
            self.changed.send_modify(|n| *n += 1);
        }
    }
}

async fn accept_agents(endpoint: Endpoint, registry: Arc<Registry>, stop: CancellationToken) {
    let gate = HandshakeGate::new(DEFAULT_HANDSHAKE_LIMITS);
    let epoch = clock::now();
    loop {
        let incoming = tokio::select! {
            () = stop.cancelled() => return,
            incoming = endpoint.accept() => match incoming {
                Some(incoming) => incoming,
                None => return,
            },
        };
        let remote = incoming.remote_address();
        let validated = incoming.remote_address_validated();
        // Decided on the first packet, before any cryptography is spent on the attempt.
        match gate.decide(clock::now() - epoch, remote.ip(), validated) {
            Handshake::Accept(permit) => {
                tokio::spawn(tunnel(incoming, registry.clone(), permit));
            }
            Handshake::Retry if incoming.may_retry() => {
                if let Err(e) = incoming.retry() {
                    e.into_incoming().ignore();
                }
            }
            Handshake::Retry => incoming.ignore(),
            Handshake::Ignore(reason) => {
                incoming.ignore();
                if let Some(suppressed) = HANDSHAKE_DROP_LOG.allow() {
                    warn!(%remote, ?reason, in_flight = gate.in_flight(), suppressed, "dropped tunnel handshake attempts (a flood, or an agent reconnecting too fast)");
                }
            }
        }
    }
}

/// One agent tunnel, from handshake to close.
async fn tunnel(incoming: quinn::Incoming, registry: Arc<Registry>, permit: HandshakePermit) {
    let remote = incoming.remote_address();
    let conn = match tokio::time::timeout(HANDSHAKE_TIMEOUT, incoming).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => {
            if let Some(suppressed) = HANDSHAKE_LOG.allow() {
                warn!(%remote, suppressed, "refused a tunnel handshake: {e} (is this agent's public key listed in [[agent]]?)");
            }
            return;
        }
        Err(_) => {
            debug!(%remote, "tunnel handshake timed out");
            return;
        }
    };
    drop(permit);
    let Some(agent) = quic::peer_key(&conn).and_then(|k| registry.names.get(&k).cloned()) else {
        // The verifier admits only pinned keys, so this is unreachable in practice; refuse anyway.
        conn.close(code::SHUTDOWN, b"");
        return;
    };
    info!(%agent, %remote, "tunnel up");
    if let Some(old) = registry.insert(&agent, conn.clone()) {
        old.close(code::REPLACED, b"replaced by a newer tunnel");
    }
    let reason = conn.closed().await;
    registry.remove(&agent, &conn);
    info!(%agent, %remote, "tunnel down: {reason}");
}

async fn accept_clients(
    route: Arc<Route>,
    gate: Arc<Gate>,
    listener: TcpListener,
    registry: Arc<Registry>,
    relays: TaskTracker,
    stop: CancellationToken,
) {
    let epoch = clock::now();
    let refusals_log = LogLimit::new(Duration::from_secs(10));
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((tcp, peer)) => match gate.admit(clock::now() - epoch, peer.ip()) {
                Ok(permit) => {
                    relays.spawn(relay_client(
                        route.clone(),
                        tcp,
                        peer,
                        registry.clone(),
                        permit,
                    ));
                }
                Err(reason) => {
                    // Closed at once, before any tunnel work.
                    drop(tcp);
                    if let Some(suppressed) = refusals_log.allow() {
                        info!(
                            route = %route.name,
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
                    warn!(route = %route.name, suppressed, "accept failed: {e}");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Relay one public client through the first upstream that answers `Ok`.
async fn relay_client(
    route: Arc<Route>,
    mut tcp: TcpStream,
    client: SocketAddr,
    registry: Arc<Registry>,
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
    for upstream in &route.upstreams {
        let Some(conn) = registry.get(&upstream.agent) else {
            continue;
        };
        let header = Header {
            route: route.name.clone(),
            service: upstream.service.clone(),
            client,
            proxy,
        };
        match open(&conn, &header).await {
            Ok((mut send, mut recv)) => {
                let (mut client_read, mut client_write) = tcp.split();
                let (end, stats) = pump(
                    &mut client_read,
                    &mut client_write,
                    &mut recv,
                    &mut send,
                    route.idle_timeout,
                )
                .await;
                if !matches!(end, PumpEnd::Done) {
                    let _ = send.reset(code::RELAY_ERROR);
                    let _ = recv.stop(code::RELAY_ERROR);
                }
                debug!(route = %route.name, %client, agent = %upstream.agent, up = stats.up, down = stats.down, ?end, "relayed connection closed");
                return;
            }
            Err(OpenError::Refused(status)) => {
                debug!(route = %route.name, %client, agent = %upstream.agent, ?status, "upstream refused; trying the next");
            }
            Err(OpenError::Unresponsive) => {
                warn!(agent = %upstream.agent, "agent did not answer a relay header within {STATUS_TIMEOUT:?}; closing its tunnel");
                conn.close(code::UNRESPONSIVE, b"no answer to a relay header");
                registry.remove(&upstream.agent, &conn);
            }
            Err(OpenError::Tunnel(e)) => {
                debug!(agent = %upstream.agent, "opening a stream failed: {e}");
            }
        }
    }
    if let Some(suppressed) = NO_UPSTREAM_LOG.allow() {
        info!(route = %route.name, %client, suppressed, "no upstream available; client closed");
    }
}

/// Open a stream to an agent and wait for its status.
async fn open(conn: &Connection, header: &Header) -> Result<(SendStream, RecvStream), OpenError> {
    let bytes = header
        .encode()
        .map_err(|e| OpenError::Tunnel(e.to_string()))?;
    let (mut send, mut recv) = match tokio::time::timeout(OPEN_TIMEOUT, conn.open_bi()).await {
        Ok(Ok(pair)) => pair,
        Ok(Err(e)) => return Err(OpenError::Tunnel(e.to_string())),
        Err(_) => return Err(OpenError::Tunnel("no free stream on the tunnel".into())),
    };
    let exchange = async {
        send.write_all(&bytes)
            .await
            .map_err(|e| OpenError::Tunnel(e.to_string()))?;
        let mut status = [0u8; 1];
        recv.read_exact(&mut status)
            .await
            .map_err(|e| OpenError::Tunnel(e.to_string()))?;
        Ok(Status::from_byte(status[0]))
    };
    match tokio::time::timeout(STATUS_TIMEOUT, exchange).await {
        Ok(Ok(Some(Status::Ok))) => Ok((send, recv)),
        Ok(Ok(status)) => Err(OpenError::Refused(status)),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(OpenError::Unresponsive),
    }
}

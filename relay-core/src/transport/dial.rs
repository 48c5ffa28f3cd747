//! The agent's side of every transport: dialing a sentry, keeping the tunnel up while it
//! serves the streams the sentry opens, and closing it. The agent's engine drives one
//! [`Dialer::attempt`] after another (failover, backoff, return to the preferred transport)
//! through [`Host`], and holds no transport-specific code.

use std::future::Future;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use quinn::{ClientConfig, Connection, Endpoint};
use tokio::io::AsyncReadExt;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::budget::Ledger;
use super::pin::SERVER_NAME;
use super::quic::{self, QuicError, Tuning, code};
use super::{TunnelStream, tls, wireguard};
use crate::clock;
use crate::config::{SentryPeer, TransportKind};
use crate::keys::PrivateKey;

/// Longest a tunnel handshake may take.
pub(crate) const DIAL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the sentry may stay silent over WireGuard before the agent rebuilds the tunnel
/// with a fresh UDP socket (a fresh NAT mapping) and resolves the sentry's name again.
const WG_REBUILD_AFTER: Duration = Duration::from_secs(30);
/// Data connections a TLS tunnel opens at once.
const MAX_OPENING: usize = 16;
/// Pause after a TLS data connection that failed or was closed unused at once.
const DATA_RETRY_PAUSE: Duration = Duration::from_secs(1);

/// A boxed future, for the [`Host`] methods a transport awaits.
pub(crate) type BoxFuture<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

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

/// One of a bounded number of places (a service's connections, a sentry's streams); given
/// back when dropped.
pub(crate) struct Place(Arc<AtomicUsize>);

impl Place {
    /// A place of `count`'s, if fewer than `max` are taken.
    pub(crate) fn take(count: &Arc<AtomicUsize>, max: usize) -> Option<Self> {
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

/// What the agent's engine does for a transport's tunnel to one `[[sentry]]` entry.
pub(crate) trait Host: Send + Sync {
    /// The agent's key.
    fn key(&self) -> &PrivateKey;
    /// Cancelled when the sentry is removed from the config, or the agent stops.
    fn retired(&self) -> &CancellationToken;
    /// The tunnel is up (again).
    fn up(&self, live: Live);
    /// The tunnel is down.
    fn down(&self);
    /// A tunnel over this entry dialed ahead by [`Host::probe_preferred`], if any.
    fn take_upgrade(&self) -> Option<Preconnected>;
    /// Resolves once the sentry's preferred transport answers again while this entry, a
    /// fallback, is up (never, for the preferred entry itself).
    fn probe_preferred(&self) -> BoxFuture<'_>;
    /// Serve a stream the sentry opened (or answer it `Busy` past the sentry's cap).
    fn serve(&self, stream: TunnelStream);
    /// Answer a stream the sentry opened while draining: `ShuttingDown`.
    fn refuse(&self, stream: TunnelStream);
    /// What serves a TLS data connection's stream in the connection's own task, holding its
    /// place among the sentry's streams (`None`: past the cap, answered `Busy`).
    fn serve_placed(&self) -> ServePlaced;
    /// Run a task among the sentry's relayed connections (waited for by the drain).
    fn spawn_relay(&self, task: BoxFuture<'static>);
    /// The sentry's streams held at this agent now, and their cap.
    fn streams(&self) -> (Arc<AtomicUsize>, usize);
    /// Where QUIC streams shed for a stalled service are counted.
    fn streams_shed(&self) -> Arc<AtomicU64>;
    /// Retired: new streams are answered by `refuse_new` while the open ones finish.
    fn drain<'a>(&'a self, refuse_new: BoxFuture<'a>) -> BoxFuture<'a>;
}

/// What an entry needs to dial.
pub(crate) enum Dialer {
    Quic(ClientConfig),
    WireGuard,
    Tls(Arc<rustls::ClientConfig>),
}

/// The tunnel to a sentry while it is up.
#[derive(Clone)]
pub(crate) enum Live {
    /// The connection, and the ledger of its streams' credit.
    Quic(Connection, Arc<Ledger>),
    /// The device's one peer: the sentry.
    WireGuard(Arc<wireguard::Peer>),
    /// The control connection, and how to open another connection to the same sentry (an
    /// egress connection).
    Tls(Arc<tls::Control>, SocketAddr, Arc<rustls::ClientConfig>),
}

impl Live {
    pub(crate) fn rtt(&self) -> Duration {
        match self {
            Self::Quic(conn, _) => conn.rtt(),
            Self::WireGuard(peer) => peer.session().1.unwrap_or_default(),
            Self::Tls(control, ..) => control.rtt(),
        }
    }

    pub(crate) fn stream_window(&self) -> Option<usize> {
        match self {
            Self::WireGuard(peer) => Some(peer.stream_window()),
            Self::Quic(..) | Self::Tls(..) => None,
        }
    }
}

/// How one try of one transport ended.
pub(crate) enum Attempt {
    /// The tunnel never came up; the next transport of the sentry is tried.
    Failed(String),
    /// It was up, then went down; the preferred transport is tried again.
    Ended(String),
    /// The sentry was removed from the config, or the agent stops.
    Retired,
    /// A fallback was up and the preferred transport answered again (see
    /// [`Host::probe_preferred`]).
    Upgraded,
}

/// A QUIC tunnel dialed ahead, while a fallback carried the tunnel.
pub(crate) struct Preconnected(Endpoint, Connection);

impl Dialer {
    pub(crate) fn new(
        key: &PrivateKey,
        peer: &SentryPeer,
        streams: usize,
    ) -> Result<Self, QuicError> {
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

    /// One try of this entry's transport: dial, serve until the tunnel ends or is retired.
    pub(crate) async fn attempt(&self, peer: &SentryPeer, host: &dyn Host) -> Attempt {
        match self {
            Self::Quic(client) => attempt_quic(peer, client, host).await,
            Self::WireGuard => attempt_wireguard(peer, host).await,
            Self::Tls(client) => attempt_tls(peer, client, host).await,
        }
    }

    /// How long after its peer went silent this transport gives a tunnel up, beyond what
    /// the others take (WireGuard has no close: it waits out [`WG_REBUILD_AFTER`]).
    pub(crate) fn notices_death_after(&self) -> Duration {
        match self {
            Self::WireGuard => WG_REBUILD_AFTER,
            Self::Quic(_) | Self::Tls(_) => Duration::ZERO,
        }
    }

    /// Whether a tunnel over this transport can be dialed ahead while a fallback is up
    /// (QUIC: the endpoint and connection are handed over whole).
    pub(crate) fn dials_ahead(&self) -> bool {
        matches!(self, Self::Quic(_))
    }

    /// Dial a tunnel ahead; `None` for a transport that does not (see [`Self::dials_ahead`]).
    pub(crate) async fn dial_ahead(
        &self,
        peer: &SentryPeer,
        key: &PrivateKey,
    ) -> Option<Result<Preconnected, DialError>> {
        match self {
            Self::Quic(client) => Some(
                dial(peer, client, key)
                    .await
                    .map(|(endpoint, conn)| Preconnected(endpoint, conn)),
            ),
            Self::WireGuard | Self::Tls(_) => None,
        }
    }
}

async fn attempt_quic(peer: &SentryPeer, client: &ClientConfig, host: &dyn Host) -> Attempt {
    let retire = host.retired();
    let sentry = &peer.address;
    let dialed = match host.take_upgrade() {
        Some(Preconnected(endpoint, conn)) => Ok((endpoint, conn)),
        None => tokio::select! {
            () = retire.cancelled() => return Attempt::Retired,
            dialed = dial(peer, client, host.key()) => dialed,
        },
    };
    let (endpoint, conn) = match dialed {
        Ok(dialed) => dialed,
        Err(e) => return Attempt::Failed(e.to_string()),
    };
    info!(%sentry, remote = %conn.remote_address(), transport = "quic", "tunnel up");
    let ledger = Ledger::watch(&conn, host.streams_shed());
    host.up(Live::Quic(conn.clone(), ledger.clone()));
    let reason = serve_quic(&conn, &ledger, host).await;
    host.down();
    endpoint.close(code::SHUTDOWN, b"agent shutting down");
    if retire.is_cancelled() {
        let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
        return Attempt::Retired;
    }
    Attempt::Ended(reason.to_string())
}

/// Serve relayed streams until the tunnel closes (returns why) or the tunnel is retired
/// (drains first: until its streams end, but at shutdown for at most `drain_timeout`).
async fn serve_quic(
    conn: &Connection,
    ledger: &Arc<Ledger>,
    host: &dyn Host,
) -> quinn::ConnectionError {
    loop {
        let accepted = tokio::select! {
            () = host.retired().cancelled() => break,
            accepted = conn.accept_bi() => accepted,
        };
        match accepted {
            Ok((send, recv)) => host.serve(TunnelStream::Quic(send, ledger.recv(recv, None))),
            Err(reason) => return reason,
        }
    }
    let refuse_new = async {
        while let Ok((send, recv)) = conn.accept_bi().await {
            host.refuse(TunnelStream::Quic(send, ledger.recv(recv, None)));
        }
    };
    host.drain(Box::pin(refuse_new)).await;
    conn.close(code::SHUTDOWN, b"agent shutting down");
    quinn::ConnectionError::LocallyClosed
}

/// The WireGuard tunnel: a device with the sentry as its one peer, given up (to be rebuilt
/// with a fresh socket, the address resolved again) when the sentry stays silent for
/// [`WG_REBUILD_AFTER`].
async fn attempt_wireguard(peer: &SentryPeer, host: &dyn Host) -> Attempt {
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
    let secret = host.key().wireguard_secret();
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
    let (reason, was_up) =
        serve_wireguard(&sentry, &to_sentry, &mut accepted, &mut events, host).await;
    host.down();
    stop.cancel();
    if host.retired().is_cancelled() {
        Attempt::Retired
    } else if was_up {
        Attempt::Ended(reason)
    } else {
        Attempt::Failed(reason)
    }
}

/// Serve streams the sentry opens in the overlay until it has been silent too long
/// (returns why, and whether it was ever up) or the tunnel is retired (drains first, as over
/// QUIC).
async fn serve_wireguard(
    sentry: &str,
    peer: &Arc<wireguard::Peer>,
    accepted: &mut mpsc::Receiver<wireguard::OverlayStream>,
    events: &mut mpsc::UnboundedReceiver<bool>,
    host: &dyn Host,
) -> (String, bool) {
    let mut was_up = false;
    let mut silent_since = Some(clock::now());
    let mut check = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            () = host.retired().cancelled() => break,
            Some(stream) = accepted.recv() => host.serve(TunnelStream::Overlay(stream)),
            Some(up) = events.recv() => {
                if up {
                    info!(%sentry, remote = ?peer.endpoint(), transport = "wireguard", "tunnel up");
                    host.up(Live::WireGuard(peer.clone()));
                    was_up = true;
                    silent_since = None;
                } else {
                    warn!(%sentry, transport = "wireguard", "no packet from the sentry within {:?}", wireguard::AGENT_LIVENESS);
                    host.down();
                    silent_since = Some(clock::now());
                }
            }
            _ = check.tick() => {
                if silent_since.is_some_and(|t| clock::now().duration_since(t) >= WG_REBUILD_AFTER) {
                    return (format!("no answer from the sentry for {WG_REBUILD_AFTER:?}"), was_up);
                }
            }
        }
    }
    let refuse_new = async {
        while let Some(stream) = accepted.recv().await {
            host.refuse(TunnelStream::Overlay(stream));
        }
    };
    host.drain(Box::pin(refuse_new)).await;
    ("retired".to_owned(), was_up)
}

/// The TCP+TLS tunnel: a control connection, and a pool of data connections the sentry
/// takes one relayed connection each from (see [`tls`]).
async fn attempt_tls(
    peer: &SentryPeer,
    client: &Arc<rustls::ClientConfig>,
    host: &dyn Host,
) -> Attempt {
    let retire = host.retired();
    let sentry = &peer.address;
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
    let (streams, max_streams) = host.streams();
    let pool = Arc::new(DataPool {
        remote,
        client: client.clone(),
        idle: AtomicUsize::new(0),
        opening: AtomicUsize::new(0),
        wanted: AtomicUsize::new(0),
        wake: Notify::new(),
        streams,
        max_streams,
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
    host.up(Live::Tls(control.clone(), remote, client.clone()));
    let generation = retire.child_token();
    let ended = tokio::select! {
        why = &mut run => Attempt::Ended(why),
        () = retire.cancelled() => Attempt::Retired,
        () = keep_pool(&pool, &generation, host) => Attempt::Retired,
        () = host.probe_preferred() => Attempt::Upgraded,
    };
    // Idle data connections close with the control connection; those carrying a relayed
    // connection finish on their own.
    generation.cancel();
    host.down();
    if matches!(ended, Attempt::Retired) {
        host.drain(Box::pin(std::future::pending())).await;
    }
    ended
}

/// Keep [`tls::POOL_IDLE`] idle data connections open toward the sentry, plus what it asks
/// for, until `generation` ends.
async fn keep_pool(pool: &Arc<DataPool>, generation: &CancellationToken, host: &dyn Host) {
    loop {
        let wake = pool.wake.notified();
        tokio::pin!(wake);
        wake.as_mut().enable();
        while pool.short() {
            pool.opening.fetch_add(1, Ordering::Relaxed);
            host.spawn_relay(Box::pin(data_connection(
                pool.clone(),
                generation.clone(),
                host.serve_placed(),
            )));
        }
        tokio::select! {
            () = wake => {}
            () = generation.cancelled() => return,
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
    /// Wakes [`keep_pool`] when a count changed.
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

/// Serves a TLS data connection's stream (see [`Host::serve_placed`]) from a task that
/// outlives the borrow of the host.
pub(crate) type ServePlaced =
    Arc<dyn Fn(TunnelStream, Option<Place>) -> BoxFuture<'static> + Send + Sync>;

/// One data connection: open it, wait in the sentry's pool for [`tls::GO`], relay one
/// connection. A connection that fails or is closed unused soon after opening costs a pause
/// before it counts as gone, so a sentry that refuses them is not dialed in a tight loop.
async fn data_connection(pool: Arc<DataPool>, generation: CancellationToken, serve: ServePlaced) {
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
        serve(stream, place).await;
    }
}

/// The unspecified address of `remote`'s family, to bind a socket toward it.
pub(crate) fn unspecified(remote: SocketAddr) -> SocketAddr {
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

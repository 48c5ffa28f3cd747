//! The tunnel to one sentry: dialing over each transport, serving its streams, failing over
//! and reconnecting.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use quinn::{ClientConfig, Connection, Endpoint};
use tokio::io::AsyncReadExt;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use super::service::{Refuse, relay_stream};
use super::{
    BACKOFF_BASE, BACKOFF_CAP, DATA_RETRY_PAUSE, DIAL_TIMEOUT, DialError, Dialer, Group,
    HEALTHY_AFTER, MAX_OPENING, PREFER_RETRY, Place, Shared, TunnelState, WG_REBUILD_AFTER,
};
use crate::backoff::Backoff;
use crate::config::{SentryPeer, TransportKind};
use crate::keys::PrivateKey;
use crate::transport::budget::Ledger;
use crate::transport::pin::SERVER_NAME;
use crate::transport::quic::{self, Tuning, code};
use crate::transport::{TunnelStream, tls, wireguard};
use crate::{clock, lock};

/// The tunnel to a sentry while it is up.
pub(super) enum LiveTunnel {
    Quic(Connection),
    WireGuard(Arc<wireguard::Peer>),
    Tls(Arc<tls::Control>),
}

impl LiveTunnel {
    pub(super) fn rtt(&self) -> Duration {
        match self {
            Self::Quic(conn) => conn.rtt(),
            Self::WireGuard(peer) => peer.session().1.unwrap_or_default(),
            Self::Tls(control) => control.rtt(),
        }
    }

    pub(super) fn stream_window(&self) -> Option<usize> {
        match self {
            Self::WireGuard(peer) => Some(peer.stream_window()),
            Self::Quic(_) | Self::Tls(_) => None,
        }
    }
}

/// How one try of one transport ended.
pub(super) enum Attempt {
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
pub(super) struct Tunnel {
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
    /// The tunnel to the sentry of `group`, not yet dialed.
    pub(super) fn new(group: Arc<Group>, shared: Arc<Shared>) -> Self {
        Self {
            group,
            shared,
            relays: TaskTracker::new(),
            upgrade: Mutex::new(None),
            streams: Arc::default(),
        }
    }

    pub(super) async fn run(self) {
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

    pub(super) fn up(entry: &TunnelState, live: LiveTunnel) {
        entry.connects.fetch_add(1, Ordering::Relaxed);
        *lock(&entry.live) = Some((live, clock::now()));
    }

    pub(super) async fn attempt_quic(&self, entry: &TunnelState, client: &ClientConfig) -> Attempt {
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
    pub(super) fn serve_stream(&self, stream: TunnelStream) {
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
    pub(super) async fn serve(&self, conn: &Connection) -> quinn::ConnectionError {
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
    pub(super) async fn attempt_wireguard(&self, entry: &TunnelState) -> Attempt {
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
    pub(super) async fn serve_wireguard(
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
    pub(super) async fn attempt_tls(
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
    pub(super) async fn probe_preferred(&self, entry: &TunnelState) {
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
    pub(super) async fn keep_pool(&self, pool: &Arc<DataPool>, generation: &CancellationToken) {
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
    pub(super) async fn drain(&self, refuse_new: impl Future<Output = ()>) {
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
pub(super) struct DataPool {
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
    pub(super) fn want(&self, n: u32) {
        let n = usize::try_from(n).unwrap_or(usize::MAX);
        let _ = self
            .wanted
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |w| {
                Some(w.saturating_add(n).min(tls::MAX_POOLED))
            });
        self.wake.notify_one();
    }

    /// Whether another data connection should be opened now; takes one from `wanted`.
    pub(super) fn short(&self) -> bool {
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

    pub(super) fn changed(&self, count: &AtomicUsize) {
        count.fetch_sub(1, Ordering::Relaxed);
        self.wake.notify_one();
    }
}

/// One data connection: open it, wait in the sentry's pool for [`tls::GO`], relay one
/// connection. A connection that fails or is closed unused soon after opening costs a pause
/// before it counts as gone, so a sentry that refuses them is not dialed in a tight loop.
pub(super) async fn data_connection(
    pool: Arc<DataPool>,
    generation: CancellationToken,
    shared: Arc<Shared>,
) {
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
pub(super) fn unspecified(remote: SocketAddr) -> SocketAddr {
    if remote.is_ipv4() {
        SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))
    } else {
        SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0))
    }
}

/// The first address `address` resolves to.
pub(super) async fn resolve(address: &str) -> Result<SocketAddr, DialError> {
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

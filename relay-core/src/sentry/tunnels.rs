//! Agents' tunnels coming up and going down on each transport: QUIC accept, WireGuard peer
//! events, TLS accept and control.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::{ACCEPT_LOG, HANDSHAKE_TIMEOUT, Shared};
use crate::admission::{Handshake, HandshakePermit, HandshakeRefusal};
use crate::config::SentryConfig;
use crate::keys::PublicKey;
use crate::log_limit::LogLimit;
use crate::transport::budget::Ledger;
use crate::transport::quic::{self, code};
use crate::transport::tls::{self, TlsIo};
use crate::transport::{TlsSession, Tunnel, wireguard};
use crate::{clock, lock};

static HANDSHAKE_LOG: LogLimit = LogLimit::new(Duration::from_secs(10));
static HANDSHAKE_DROP_LOG: LogLimit = LogLimit::new(Duration::from_secs(10));

pub(super) async fn accept_agents(shared: Arc<Shared>) {
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
pub(super) async fn tunnel(
    incoming: quinn::Incoming,
    shared: Arc<Shared>,
    permit: HandshakePermit,
) {
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
    let key = quic::peer_key(&conn);
    let Some(agent) = key.and_then(|k| shared.tunnels.name_of(&k)) else {
        // The verifier admits only pinned keys; a reload may have unpinned this one between
        // its handshake and now.
        conn.close(code::SHUTDOWN, b"");
        return;
    };
    // A pinned agent: its address gets a reserved place in later handshakes.
    permit.authenticated();
    let tunnel = Tunnel::Quic(
        conn.clone(),
        Ledger::watch(&conn, shared.streams_shed.clone()),
    );
    shared.register(&agent, tunnel.clone(), key, &remote);
    let reason = conn.closed().await;
    shared.unregister(&agent, &tunnel, &remote, &reason);
}

/// The WireGuard peers of a config: agents with an overlay address, and plain peers.
pub(super) fn wireguard_peers(config: &SentryConfig) -> Vec<wireguard::PeerSpec> {
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
pub(super) async fn wireguard_events(
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
            shared.register(&name, tunnel, None, &remote);
        } else {
            let why = format!("no packet within {:?}", peer.liveness());
            shared.unregister(&name, &tunnel, &remote, &why);
        }
    }
}

/// Accept agents' TCP+TLS connections on `tls_listen`.
pub(super) async fn accept_tls(shared: Arc<Shared>, listener: TcpListener) {
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
pub(super) const TLS_HANDSHAKE_LIMITS: crate::admission::HandshakeLimits =
    crate::admission::HandshakeLimits {
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
pub(super) async fn tls_connection(
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
    let Some(key) = tls::peer_key(&io) else {
        return;
    };
    let Some(agent) = shared.tunnels.name_of(&key) else {
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
pub(super) async fn tls_control(
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
    shared.register(&agent, tunnel.clone(), Some(key), &remote);
    let reason = tokio::select! {
        why = tls::run_control(io, &session.control, asked, |_| {}, None) => why,
        () = session.close.cancelled() => "closed by the sentry".to_owned(),
        () = shared.transport_stop.cancelled() => "sentry shutting down".to_owned(),
    };
    shared.unregister(&agent, &tunnel, &remote, &reason);
}

impl Shared {
    /// The pool of idle TLS data connections authenticated with `key`.
    pub(super) fn tls_pool(&self, key: PublicKey) -> Arc<tls::Pool> {
        lock(&self.tls_pools).entry(key).or_default().clone()
    }

    /// A reload unpinned the key `tunnel` of `agent` authenticated with: it takes no new
    /// client already (it left the registry); its idle TLS data connections close now, and
    /// the tunnel itself once its relayed connections ended, within `drain`.
    pub(super) fn retire(&self, agent: &str, tunnel: Tunnel, key: PublicKey, drain: Duration) {
        if let Some(pool) = lock(&self.tls_pools).remove(&key) {
            pool.clear();
        }
        warn!(%agent, transport = tunnel.transport(), "the reload unpinned this tunnel's key: it takes no new client, and closes once its relayed connections end (within drain_timeout, {drain:?})");
        tunnel.retire(drain);
    }
}

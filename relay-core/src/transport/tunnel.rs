//! An agent's tunnel as the sentry's engine sees it, on any transport: what it is, its round
//! trip, closing it, and opening a relay stream over it (the header out, the agent's status
//! back). The engine holds no transport match; each transport's particulars are here.

use std::net::{SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

use quinn::Connection;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::budget::Ledger;
use super::quic::code;
use super::tls::{self, TlsRelay};
use super::{TunnelStream, wireguard};
use crate::config::TransportKind;
use crate::relay::{Header, Proxy, Status, encode_proxy_header};

/// Longest the agent may take to answer a relay header. It is above the agent's own connect
/// timeout (3 s), so an agent that is alive always answers in time; one that does not is
/// treated as dead and its tunnel closed, so later clients fail over without waiting.
pub const STATUS_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest to wait for a free stream on a tunnel that carries its maximum.
const OPEN_TIMEOUT: Duration = Duration::from_secs(2);

/// Why the sentry closes a tunnel (a QUIC agent is told with the matching code).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Close {
    /// A newer tunnel of the same agent took its place.
    Replaced,
    /// It answered neither a relay header nor anything else in time.
    Unresponsive,
    /// A reload unpinned its key.
    Revoked,
}

impl Close {
    fn code(self) -> (quinn::VarInt, &'static [u8]) {
        match self {
            Self::Replaced => (code::REPLACED, b"replaced by a newer tunnel"),
            Self::Unresponsive => (code::UNRESPONSIVE, b"no answer to a relay header"),
            Self::Revoked => (code::REVOKED, b"agent key unpinned"),
        }
    }
}

/// An agent's tunnel.
#[derive(Clone)]
pub(crate) enum Tunnel {
    /// A QUIC connection and the ledger of its streams' credit.
    Quic(Connection, Arc<Ledger>),
    WireGuard(Arc<wireguard::Peer>),
    Tls(Arc<TlsSession>),
}

/// An agent's TCP+TLS tunnel: its control connection and its pool of data connections.
pub(crate) struct TlsSession {
    pub(crate) control: tls::Control,
    pub(crate) pool: Arc<tls::Pool>,
    /// Counts for `WANT` frames to the agent.
    pub(crate) asks: mpsc::Sender<u32>,
    /// Ends the control connection (replaced, unresponsive, or shutdown).
    pub(crate) close: CancellationToken,
}

impl Tunnel {
    pub(crate) fn transport(&self) -> &'static str {
        match self {
            Self::Quic(..) => TransportKind::Quic.as_str(),
            Self::WireGuard(_) => TransportKind::WireGuard.as_str(),
            Self::Tls(_) => TransportKind::Tls.as_str(),
        }
    }

    pub(crate) fn rtt(&self) -> Duration {
        match self {
            Self::Quic(conn, _) => conn.rtt(),
            Self::WireGuard(peer) => peer.session().1.unwrap_or_default(),
            Self::Tls(session) => session.control.rtt(),
        }
    }

    /// Close a tunnel the sentry gives up on. Whether it closes: a WireGuard session has no
    /// close (the peer's liveness timeout ends it, and takes it out of the registry).
    pub(crate) fn close(&self, why: Close) -> bool {
        match self {
            Self::Quic(conn, _) => {
                let (code, reason) = why.code();
                conn.close(code, reason);
            }
            Self::WireGuard(_) => return false,
            Self::Tls(session) => session.close.cancel(),
        }
        true
    }

    /// Close a tunnel whose key a reload unpinned (it left the registry already). A QUIC
    /// tunnel closes once its streams ended, within `drain`; a TLS tunnel's data connections
    /// in use are TCP connections of their own, which end with their relayed connections, so
    /// its control connection closes now.
    pub(crate) fn retire(self, drain: Duration) {
        match self {
            Self::Quic(conn, ledger) => {
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(drain, ledger.idle()).await;
                    let (code, reason) = Close::Revoked.code();
                    conn.close(code, reason);
                });
            }
            Self::Tls(_) | Self::WireGuard(_) => {
                self.close(Close::Revoked);
            }
        }
    }

    /// A relay stream for `header` over this tunnel (see [`connect`]).
    pub(crate) async fn connect(
        &self,
        overlay: Option<SocketAddrV4>,
        header: &Header,
    ) -> Result<TunnelStream, OpenError> {
        connect(self, overlay, header).await
    }

    /// Whether `other` is this very tunnel (not merely one of the same agent).
    #[must_use]
    pub fn same(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Quic(a, _), Self::Quic(b, _)) => a.stable_id() == b.stable_id(),
            (Self::WireGuard(a), Self::WireGuard(b)) => Arc::ptr_eq(a, b),
            (Self::Tls(a), Self::Tls(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

pub(crate) enum OpenError {
    /// A plain WireGuard peer did not accept the connection in its overlay.
    NotAccepted(String),
    /// The agent answered, but not `Ok`.
    Refused(Option<Status>),
    /// The agent did not answer in time. `alive`: it sent packets meanwhile (its tunnel is
    /// busy, not dead).
    Unresponsive { alive: bool },
    /// The tunnel failed or had no free stream.
    Tunnel(String),
}

/// A relay stream for `header` over `tunnel`: to the agent, which answers the header with
/// its status, or, for an upstream at `overlay` in a plain WireGuard peer's overlay, straight
/// to that address (the sentry writes the PROXY header itself, as an agent would).
async fn connect(
    tunnel: &Tunnel,
    overlay: Option<SocketAddrV4>,
    header: &Header,
) -> Result<TunnelStream, OpenError> {
    match (overlay, tunnel) {
        (Some(target), Tunnel::WireGuard(peer)) => {
            plain_peer(peer, target, header.client, header.proxy)
                .await
                .map_err(|e| OpenError::NotAccepted(format!("{target}: {e}")))
        }
        _ => open(tunnel, header).await,
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

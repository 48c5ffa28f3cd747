//! Egress streams: relayed connections the other way round. The agent opens a stream on its
//! live tunnel (a QUIC stream, a TCP connection to the sentry's overlay address, a TLS
//! connection of role [`Role::Egress`](super::tls::Role::Egress)), writes an
//! [`EgressRequest`], and the sentry answers one [`EgressStatus`] byte before any payload.
//!
//! On the sentry the listeners hand each such stream to the engine
//! ([`TunnelSink::egress`](super::listen::TunnelSink::egress)), which alone decides whether
//! it dials anything.

use std::net::SocketAddrV4;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::dial::Live;
use super::{TunnelStream, tls, wireguard};
use crate::relay::{EgressRequest, EgressStatus};

/// Longest the sentry may take to resolve and dial an egress destination.
pub const EGRESS_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest the agent waits for the sentry's answer: the sentry's own resolve-and-dial
/// deadline, and a margin for the tunnel.
pub const EGRESS_STATUS_TIMEOUT: Duration = Duration::from_secs(15);
/// Longest opening the stream itself may take (a free QUIC stream, an overlay or TLS
/// connection).
const OPEN_TIMEOUT: Duration = Duration::from_secs(5);
/// A QUIC tunnel that has received nothing at all this long after the request was sent (not
/// even the acknowledgment of it) belongs to a sentry that is gone: the
/// next sentry is asked at once rather than after [`EGRESS_STATUS_TIMEOUT`]. Opening a QUIC
/// stream needs no packet from the peer, so without this a sentry killed a moment ago would
/// hold every new connection for the whole timeout until the tunnel's idle timeout ends it.
const SILENT_AFTER: Duration = Duration::from_secs(3);

/// Why an egress stream gave no connection.
#[derive(Debug)]
pub(crate) enum EgressOpenError {
    /// The sentry answered, but not `Ok` (`None`: a byte this version does not know).
    Refused(Option<EgressStatus>),
    /// The stream could not be opened, or failed before the answer.
    Tunnel(String),
    /// The sentry did not answer in time.
    Unresponsive,
}

impl EgressOpenError {
    /// Whether the next sentry may do better (see [`EgressStatus::try_next`]).
    pub(crate) fn try_next(&self) -> bool {
        match self {
            Self::Refused(Some(status)) => status.try_next(),
            Self::Refused(None) | Self::Tunnel(_) | Self::Unresponsive => true,
        }
    }
}

impl std::fmt::Display for EgressOpenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Refused(Some(status)) => write!(f, "the sentry answered {}", status.as_str()),
            Self::Refused(None) => f.write_str("the sentry answered an unknown status"),
            Self::Tunnel(why) => write!(f, "tunnel: {why}"),
            Self::Unresponsive => write!(
                f,
                "the sentry did not answer within {EGRESS_STATUS_TIMEOUT:?}"
            ),
        }
    }
}

impl Live {
    /// Open an egress stream for `request` over this tunnel and wait for the sentry's answer;
    /// the stream carries the connection once it is `Ok`.
    pub(crate) async fn open_egress(
        &self,
        request: &EgressRequest,
    ) -> Result<TunnelStream, EgressOpenError> {
        let bytes = request
            .encode()
            .map_err(|e| EgressOpenError::Tunnel(e.to_string()))?;
        let tunnel = |e: std::io::Error| EgressOpenError::Tunnel(e.to_string());
        let opened = async {
            Ok(match self {
                Self::Quic(conn, ledger) => {
                    let (send, recv) = conn
                        .open_bi()
                        .await
                        .map_err(|e| EgressOpenError::Tunnel(e.to_string()))?;
                    TunnelStream::Quic(send, ledger.recv(recv, None))
                }
                Self::WireGuard(peer) => {
                    let sentry = SocketAddrV4::new(peer.address(), wireguard::RELAY_PORT);
                    TunnelStream::Overlay(peer.connect(sentry).await.map_err(tunnel)?)
                }
                Self::Tls(_, remote, client) => {
                    let io = tls::connect(*remote, client.clone(), tls::Role::Egress)
                        .await
                        .map_err(tunnel)?;
                    TunnelStream::Tls(Box::new(tls::TlsRelay::new(io)))
                }
            })
        };
        let mut stream = tokio::time::timeout(OPEN_TIMEOUT, opened)
            .await
            .map_err(|_| EgressOpenError::Tunnel("no stream in time".to_owned()))??;
        let exchange = async {
            stream.write_all(&bytes).await.map_err(tunnel)?;
            stream.flush().await.map_err(tunnel)?;
            let mut status = [0u8; 1];
            stream.read_exact(&mut status).await.map_err(tunnel)?;
            Ok(EgressStatus::from_byte(status[0]))
        };
        let received = || match self {
            Self::Quic(conn, _) => Some(conn.stats().udp_rx.datagrams),
            Self::WireGuard(_) | Self::Tls(..) => None,
        };
        let before = received();
        // A live sentry acknowledges the request within a round trip.
        let silent = async {
            tokio::time::sleep(SILENT_AFTER).await;
            if before.is_none() || received() != before {
                std::future::pending::<()>().await;
            }
        };
        let answered = tokio::select! {
            answered = tokio::time::timeout(EGRESS_STATUS_TIMEOUT, exchange) => answered.ok(),
            () = silent => None,
        };
        match answered {
            Some(Ok(Some(EgressStatus::Ok))) => Ok(stream),
            Some(Ok(status)) => Err(EgressOpenError::Refused(status)),
            Some(Err(e)) => {
                stream.abort();
                Err(e)
            }
            None => {
                stream.abort();
                Err(EgressOpenError::Unresponsive)
            }
        }
    }
}

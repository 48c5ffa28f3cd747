//! The agent engine: keeps a tunnel to every configured sentry and connects relayed streams
//! to the services it exports, and to nothing else.
//!
//! Invariants:
//! - The only addresses the agent ever connects to are its own `[[service]]` targets, looked
//!   up by the name in the relay header; an unknown name is answered `UnknownService`.
//! - Every relay header gets exactly one status byte before any payload.
//! - Each sentry has its own reconnect loop with capped, jittered backoff; one sentry failing
//!   does not touch the tunnels to the others.

use std::collections::HashMap;
use std::future::Future;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use quinn::{ClientConfig, Connection, Endpoint, RecvStream, SendStream};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::backoff::Backoff;
use crate::clock;
use crate::config::{AgentConfig, SentryPeer};
use crate::keys::PrivateKey;
use crate::log_limit::LogLimit;
use crate::relay::{Header, PumpEnd, Status, encode_proxy_header, pump};
use crate::transport::pin::SERVER_NAME;
use crate::transport::quic::{self, QuicError, Tuning, code};

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
/// Idle timeout of relayed connections on the agent side. The sentry enforces the route's
/// idle timeout; this only reaps streams whose sentry vanished without a word.
const AGENT_IDLE_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

static REFUSED_LOG: LogLimit = LogLimit::new(Duration::from_secs(10));

/// The services this agent exports, by name.
type Services = Arc<HashMap<String, SocketAddr>>;

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

/// Run the agent until `shutdown` completes; then refuse new relayed connections, let open
/// ones finish for up to `drain`, and close every tunnel cleanly.
pub async fn run(
    config: &AgentConfig,
    key: &PrivateKey,
    shutdown: impl Future<Output = ()>,
    drain: Duration,
) -> Result<(), QuicError> {
    let services: Services = Arc::new(
        config
            .services
            .iter()
            .map(|s| (s.name.clone(), s.target))
            .collect(),
    );
    let stop = CancellationToken::new();
    // A JoinSet, not a detached spawn: dropping `run` (an aborted task) takes the tunnels down
    // with it, as a killed process would.
    let mut tunnels = tokio::task::JoinSet::new();
    for peer in &config.sentries {
        let client = quic::client_config(key, peer.public_key, &Tuning::default())?;
        let tunnel = Tunnel {
            peer: peer.clone(),
            client,
            key: key.clone(),
            services: services.clone(),
            stop: stop.clone(),
            drain,
        };
        tunnels.spawn(tunnel.run());
    }
    shutdown.await;
    stop.cancel();
    while tunnels.join_next().await.is_some() {}
    info!("agent stopped");
    Ok(())
}

/// One sentry's tunnel and its reconnect loop.
struct Tunnel {
    peer: SentryPeer,
    client: ClientConfig,
    key: PrivateKey,
    services: Services,
    stop: CancellationToken,
    drain: Duration,
}

impl Tunnel {
    async fn run(self) {
        let sentry = self.peer.address.clone();
        let mut backoff = Backoff::new(BACKOFF_BASE, BACKOFF_CAP);
        while !self.stop.is_cancelled() {
            let started = clock::now();
            let dialed = tokio::select! {
                () = self.stop.cancelled() => return,
                dialed = dial(&self.peer, &self.client, &self.key) => dialed,
            };
            match dialed {
                Ok((endpoint, conn)) => {
                    info!(%sentry, remote = %conn.remote_address(), "tunnel up");
                    let reason = self.serve(&conn).await;
                    endpoint.close(code::SHUTDOWN, b"agent shutting down");
                    if self.stop.is_cancelled() {
                        let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle())
                            .await;
                        return;
                    }
                    warn!(%sentry, "tunnel down: {reason}");
                    if clock::now().duration_since(started) >= HEALTHY_AFTER {
                        backoff.reset();
                    }
                }
                Err(e) => warn!(%sentry, "cannot reach sentry: {e}"),
            }
            let delay = backoff.next_delay(rand::random::<f64>());
            debug!(%sentry, "reconnecting in {delay:?}");
            tokio::select! {
                () = self.stop.cancelled() => return,
                () = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// Serve relayed streams until the tunnel closes (returns why) or the agent stops (drains
    /// first).
    async fn serve(&self, conn: &Connection) -> quinn::ConnectionError {
        let relays = TaskTracker::new();
        loop {
            let accepted = tokio::select! {
                () = self.stop.cancelled() => break,
                accepted = conn.accept_bi() => accepted,
            };
            match accepted {
                Ok((send, recv)) => {
                    relays.spawn(relay_stream(send, recv, self.services.clone(), false));
                }
                Err(reason) => return reason,
            }
        }
        // Shutting down: answer new streams `ShuttingDown` (the sentry fails over), let the
        // open ones finish.
        relays.close();
        let refuse_new = async {
            while let Ok((send, recv)) = conn.accept_bi().await {
                tokio::spawn(relay_stream(send, recv, self.services.clone(), true));
            }
        };
        tokio::select! {
            () = refuse_new => {}
            _ = tokio::time::timeout(self.drain, relays.wait()) => {}
        }
        conn.close(code::SHUTDOWN, b"agent shutting down");
        quinn::ConnectionError::LocallyClosed
    }
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
    let bind = if remote.is_ipv4() {
        SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))
    } else {
        SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0))
    };
    // A fresh socket per attempt: a new source port gets a fresh NAT mapping.
    let endpoint = quic::client_endpoint(bind, key, &Tuning::default())?;
    let connecting = endpoint.connect_with(client.clone(), remote, SERVER_NAME)?;
    match tokio::time::timeout(DIAL_TIMEOUT, connecting).await {
        Ok(Ok(conn)) => Ok((endpoint, conn)),
        Ok(Err(e)) => Err(e.into()),
        Err(_) => Err(DialError::Timeout),
    }
}

/// Answer one relay header, then pump bytes between the stream and the service.
async fn relay_stream(
    mut send: SendStream,
    mut recv: RecvStream,
    services: Services,
    shutting_down: bool,
) {
    let header = match tokio::time::timeout(HEADER_TIMEOUT, Header::read_from(&mut recv)).await {
        Ok(Ok(header)) => header,
        Ok(Err(e)) => {
            refuse(
                &mut send,
                Status::BadHeader,
                format!("bad relay header: {e}"),
            )
            .await;
            return;
        }
        Err(_) => {
            let _ = send.reset(code::RELAY_ERROR);
            return;
        }
    };
    if shutting_down {
        refuse(&mut send, Status::ShuttingDown, "shutting down".to_owned()).await;
        return;
    }
    let Some(&target) = services.get(&header.service) else {
        let why = format!(
            "route {} asked for unknown service {:?}",
            header.route, header.service
        );
        refuse(&mut send, Status::UnknownService, why).await;
        return;
    };
    let mut tcp = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target)).await {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            refuse(
                &mut send,
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
                &mut send,
                Status::ConnectFailed,
                format!("service {} at {target}: {e}", header.service),
            )
            .await;
            return;
        }
        Err(_) => {
            refuse(
                &mut send,
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
                &mut send,
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
    if send.write_all(&[Status::Ok as u8]).await.is_err() {
        return;
    }
    let (mut tcp_read, mut tcp_write) = tcp.into_split();
    let (end, stats) = pump(
        &mut tcp_read,
        &mut tcp_write,
        &mut recv,
        &mut send,
        AGENT_IDLE_TIMEOUT,
    )
    .await;
    if !matches!(end, PumpEnd::Done) {
        let _ = send.reset(code::RELAY_ERROR);
        let _ = recv.stop(code::RELAY_ERROR);
    }
    debug!(route = %header.route, client = %header.client, service = %header.service, to_service = stats.down, from_service = stats.up, ?end, "relayed connection closed");
}

/// Answer a header with a refusal and end the stream.
async fn refuse(send: &mut SendStream, status: Status, why: String) {
    if let Some(suppressed) = REFUSED_LOG.allow() {
        warn!(?status, suppressed, "refused a relayed connection: {why}");
    }
    // A failure means the stream is already gone; there is no one left to tell.
    if send.write_all(&[status as u8]).await.is_ok() {
        let _ = send.finish();
    }
}

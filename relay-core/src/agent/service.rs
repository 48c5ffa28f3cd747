//! The service side: a relay header checked against the exported services, and the
//! connection (or UDP flow) to the one it names.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tracing::{debug, warn};

use super::peers::mapped_source;
use super::{
    AGENT_IDLE_TIMEOUT, CONNECT_TIMEOUT, HEADER_TIMEOUT, REFUSED_LOG, ServiceSlot, ServiceStats,
    Shared,
};
use crate::config::Source;
use crate::relay::datagram::{MAX_DATAGRAM, read_datagram, write_datagram};
use crate::relay::{Header, Status, encode_proxy_header, idle_watch, millis_since};
use crate::transport::TunnelStream;
use crate::transport::dial::{Place, unspecified};
use crate::{clock, net};

/// Why the agent refuses a stream whatever its header says.
#[derive(Clone, Copy)]
pub(super) enum Refuse {
    /// Serve it.
    No,
    /// The tunnel is retired: `ShuttingDown`.
    ShuttingDown,
    /// The sentry holds `max_streams_per_sentry` streams already: `Busy`.
    Busy,
}

/// Answer one relay header, then pump bytes between the stream and the service.
pub(super) async fn relay_stream(mut stream: TunnelStream, shared: Arc<Shared>, refusal: Refuse) {
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
        source,
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
    // The node sees this client as itself: its own loopback address (see `peers`).
    let mapped = (source == Source::Mapped).then(|| mapped_source(header.client.ip()));
    let _seen = mapped.map(|m| shared.peers.open(m, header.client.ip(), &header.service));
    let from = mapped.map(IpAddr::V4);
    if udp {
        relay_flow(stream, &header, (from, target), &stats).await;
        return;
    }
    let mut tcp = match net::connect_from(from, target, CONNECT_TIMEOUT).await {
        Ok(tcp) => tcp,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
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
        Err(e) => {
            refuse(
                send,
                &stats,
                Status::ConnectFailed,
                format!("service {} at {target}: {e}", header.service),
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
    let (end, moved) = stream
        .relay_tcp(&mut tcp, AGENT_IDLE_TIMEOUT, &stats.bytes)
        .await;
    debug!(route = %header.route, client = %header.client, source = ?mapped, service = %header.service, to_service = moved.down, from_service = moved.up, ?end, "relayed connection closed");
}

/// A UDP flow to a `udp` service: a socket of its own, connected to the service (so only the
/// service's replies are taken), framed datagrams both ways until the sentry ends the flow.
pub(super) async fn relay_flow(
    mut stream: TunnelStream,
    header: &Header,
    (from, target): (Option<IpAddr>, SocketAddr),
    stats: &ServiceStats,
) {
    let connected = net::udp_from(from.unwrap_or(unspecified(target).ip()), target);
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
pub(super) async fn refuse(
    send: &mut TunnelStream,
    stats: &ServiceStats,
    status: Status,
    why: String,
) {
    stats.count(status);
    if let Some(suppressed) = REFUSED_LOG.allow() {
        warn!(?status, suppressed, "refused a relayed connection: {why}");
    }
    // A failure means the stream is already gone; there is no one left to tell.
    if send.write_all(&[status as u8]).await.is_ok() {
        let _ = send.shutdown().await;
    }
}

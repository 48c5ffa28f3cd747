//! TCP routes: accept, admit and relay public clients.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info, warn};

use super::upstream::connect_upstream;
use super::{ACCEPT_LOG, RouteSlot, Shared, gateway};
use crate::admission::Permit;
use crate::clock;
use crate::config::Route;
use crate::log_limit::LogLimit;
use crate::relay::Proxy;

pub(super) static NO_UPSTREAM_LOG: LogLimit = LogLimit::new(Duration::from_secs(10));

pub(super) async fn accept_clients(
    slot: Arc<RouteSlot>,
    listener: TcpListener,
    shared: Arc<Shared>,
) {
    let refusals_log = LogLimit::new(Duration::from_secs(10));
    loop {
        let accepted = tokio::select! {
            // Stopping wins over a waiting client: after shutdown nothing more is accepted.
            biased;
            () = slot.stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((tcp, peer)) => match slot.gate.admit(clock::now() - shared.epoch, peer.ip()) {
                Ok(permit) => {
                    watch_for_death(&tcp);
                    match slot.gateway.load_full() {
                        Some(gateway) => {
                            shared.relays.spawn(gateway::serve(
                                slot.clone(),
                                gateway,
                                shared.clone(),
                                tcp,
                                peer,
                                permit,
                            ));
                        }
                        None => {
                            let route = slot.route.load_full();
                            shared.relays.spawn(relay_client(
                                slot.clone(),
                                route,
                                tcp,
                                peer,
                                shared.clone(),
                                permit,
                            ));
                        }
                    }
                }
                Err(reason) => {
                    // Closed at once, before any tunnel work.
                    drop(tcp);
                    if let Some(suppressed) = refusals_log.allow() {
                        info!(
                            route = %slot.route.load().name,
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
                    warn!(route = %slot.route.load().name, suppressed, "accept failed: {e}");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Keep-alive probes after [`KEEPALIVE_IDLE`] of silence, every [`KEEPALIVE_INTERVAL`], and
/// a user timeout: a client that vanished (its host gone, a NAT that dropped it) gives its
/// place back within a few minutes instead of holding it until `idle_timeout`, and one that
/// leaves sent data unacknowledged for [`USER_TIMEOUT`] is dropped by the kernel.
pub(super) fn watch_for_death(tcp: &TcpStream) {
    let socket = socket2::SockRef::from(tcp);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_PROBES);
    let _ = socket.set_tcp_keepalive(&keepalive);
    let _ = socket.set_tcp_user_timeout(Some(USER_TIMEOUT));
}

/// Silence on a client connection before the first keep-alive probe.
pub(super) const KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
/// Between keep-alive probes.
pub(super) const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(15);
/// Unanswered probes before the client is given up: dead within two minutes of silence.
pub(super) const KEEPALIVE_PROBES: u32 = 4;
/// Longest sent data may stay unacknowledged.
pub(super) const USER_TIMEOUT: Duration = Duration::from_secs(120);

/// Relay one public client through the first upstream that answers `Ok`.
pub(super) async fn relay_client(
    slot: Arc<RouteSlot>,
    route: Arc<Route>,
    mut tcp: TcpStream,
    client: SocketAddr,
    shared: Arc<Shared>,
    // Held for the connection's life; gives its place back when dropped.
    _permit: Permit,
) {
    let admitted = clock::now();
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
    if let Some((agent, mut stream)) = connect_upstream(&shared, &route, client, proxy).await {
        slot.setup
            .observe(clock::now().duration_since(admitted).as_secs_f64());
        let (end, stats) = stream
            .relay_tcp(&mut tcp, route.idle_timeout, &slot.bytes)
            .await;
        debug!(route = %route.name, %client, %agent, up = stats.up, down = stats.down, ?end, "relayed connection closed");
        return;
    }
    slot.no_upstream.fetch_add(1, Ordering::Relaxed);
    if let Some(suppressed) = NO_UPSTREAM_LOG.allow() {
        info!(route = %route.name, %client, suppressed, "no upstream available; client closed");
    }
}

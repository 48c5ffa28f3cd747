//! The one place an upstream is chosen for a client.

use std::net::SocketAddr;

use tracing::{debug, info, warn};

use super::{STATUS_TIMEOUT, Shared, health};
use crate::clock;
use crate::config::{Route, Upstream};
use crate::relay::{Header, Proxy, Status};
use crate::transport::{Close, OpenError, TunnelStream};

/// A relay stream for `client` through the first upstream of `route` that answers `Ok`: the
/// agent's name and the stream. `None` when no connected upstream does. Upstreams held down
/// after a refusal are tried last (see [`health`]).
pub(super) async fn connect_upstream(
    shared: &Shared,
    route: &Route,
    client: SocketAddr,
    proxy: Option<Proxy>,
) -> Option<(String, TunnelStream)> {
    let registry = &shared.tunnels;
    let now = clock::now();
    let (ready, held): (Vec<_>, Vec<_>) = route
        .upstreams
        .iter()
        .partition(|u| !shared.health.held(&health::key(u), now));
    for upstream in ready.into_iter().chain(held) {
        let Some(tunnel) = registry.get(&upstream.agent) else {
            continue;
        };
        let header = Header {
            route: route.name.clone(),
            service: upstream.service.clone(),
            client,
            proxy,
            udp: route.udp,
        };
        let refused = match tunnel.connect(upstream.overlay, &header).await {
            Ok(stream) => {
                answered(shared, route, upstream);
                return Some((upstream.agent.clone(), stream));
            }
            Err(OpenError::NotAccepted(e)) => {
                debug!(route = %route.name, %client, peer = %upstream.agent, "plain WireGuard peer did not accept: {e}; trying the next");
                format!("the peer did not accept: {e}")
            }
            Err(OpenError::Refused(status)) => {
                debug!(route = %route.name, %client, agent = %upstream.agent, ?status, "upstream refused; trying the next");
                // A header the agent could not read, or a service at its cap: the next
                // upstream, with no hold-down (the service itself is fine).
                if matches!(status, Some(Status::BadHeader | Status::Busy)) {
                    continue;
                }
                format!(
                    "the agent answered {}",
                    status.map_or("an unknown status", Status::as_str)
                )
            }
            Err(OpenError::Unresponsive { alive: true }) => {
                // The agent answers at the transport level (the tunnel is busy, say its
                // flow control is spent for a moment): this client tries the next
                // upstream, and the tunnel and everything on it stay.
                warn!(agent = %upstream.agent, transport = tunnel.transport(), "agent did not answer a relay header within {STATUS_TIMEOUT:?}, though its tunnel is alive: trying the next upstream");
                continue;
            }
            Err(OpenError::Unresponsive { alive: false }) => {
                warn!(agent = %upstream.agent, transport = tunnel.transport(), "agent did not answer a relay header within {STATUS_TIMEOUT:?}, nor anything else: closing its tunnel");
                if tunnel.close(Close::Unresponsive) {
                    registry.remove(&upstream.agent, &tunnel);
                }
                continue;
            }
            Err(OpenError::Tunnel(e)) => {
                debug!(agent = %upstream.agent, "opening a stream failed: {e}");
                continue;
            }
        };
        let key = health::key(upstream);
        if shared.health.hold(&key, clock::now()) {
            info!(route = %route.name, upstream = %key, reason = %refused, "upstream held down for {:?}: tried after the others", health::HOLD_DOWN);
        }
    }
    None
}

/// `upstream` took a stream: end its hold-down, if any.
pub(super) fn answered(shared: &Shared, route: &Route, upstream: &Upstream) {
    let key = health::key(upstream);
    if shared.health.clear(&key, clock::now()) {
        info!(route = %route.name, upstream = %key, "upstream answered again: hold-down ended");
    }
}

//! The one place an upstream is chosen for a client.
//!
//! The choice is generic over the tunnel ([`Link`]), so its rules (failover order, hold-downs,
//! which answers move on without a hold, an unresponsive tunnel given up) are unit-tested
//! with a fake tunnel, without sockets.

use std::future::Future;
use std::net::{SocketAddr, SocketAddrV4};

use tracing::{debug, info, warn};

use super::health::Health;
use super::registry::{Entry, Registry};
use super::{STATUS_TIMEOUT, Shared, health};
use crate::clock;
use crate::config::{Route, Upstream};
use crate::relay::{Header, Proxy, Status};
use crate::transport::{Close, OpenError, Tunnel, TunnelStream};

/// What the upstream choice needs of a tunnel.
pub(super) trait Link: Entry + Send + Sync {
    type Stream;
    /// Its transport's name, for the log.
    fn transport(&self) -> &'static str;
    /// Close it; whether it closes (see [`Tunnel::close`]).
    fn close(&self, why: Close) -> bool;
    /// A relay stream for `header` (see [`Tunnel::connect`]).
    fn connect(
        &self,
        overlay: Option<SocketAddrV4>,
        header: &Header,
    ) -> impl Future<Output = Result<Self::Stream, OpenError>> + Send;
}

impl Link for Tunnel {
    type Stream = TunnelStream;

    fn transport(&self) -> &'static str {
        Tunnel::transport(self)
    }

    fn close(&self, why: Close) -> bool {
        Tunnel::close(self, why)
    }

    fn connect(
        &self,
        overlay: Option<SocketAddrV4>,
        header: &Header,
    ) -> impl Future<Output = Result<TunnelStream, OpenError>> + Send {
        Tunnel::connect(self, overlay, header)
    }
}

/// A relay stream for `client` through the first upstream of `route` that answers `Ok`: the
/// agent's name and the stream. `None` when no connected upstream does. Upstreams held down
/// after a refusal are tried last (see [`health`]).
pub(super) async fn connect_upstream(
    shared: &Shared,
    route: &Route,
    client: SocketAddr,
    proxy: Option<Proxy>,
) -> Option<(String, TunnelStream)> {
    choose(&shared.tunnels, &shared.health, route, client, proxy).await
}

/// [`connect_upstream`] over any [`Link`].
async fn choose<T: Link>(
    registry: &Registry<T>,
    health: &Health,
    route: &Route,
    client: SocketAddr,
    proxy: Option<Proxy>,
) -> Option<(String, T::Stream)> {
    let now = clock::now();
    let (ready, held): (Vec<_>, Vec<_>) = route
        .upstreams
        .iter()
        .partition(|u| !health.held(&health::key(u), now));
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
                answered(health, route, upstream);
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
        if health.hold(&key, clock::now()) {
            info!(route = %route.name, upstream = %key, reason = %refused, "upstream held down for {:?}: tried after the others", health::HOLD_DOWN);
        }
    }
    None
}

/// `upstream` took a stream: end its hold-down, if any.
fn answered(health: &Health, route: &Route, upstream: &Upstream) {
    let key = health::key(upstream);
    if health.clear(&key, clock::now()) {
        info!(route = %route.name, upstream = %key, "upstream answered again: hold-down ended");
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use super::*;
    use crate::config::Limits;
    use crate::lock;

    /// How a fake agent answers a relay header.
    #[derive(Clone, Copy)]
    enum Answer {
        Ok,
        Status(Status),
        Silent { alive: bool },
    }

    /// A tunnel without sockets: answers every header the same way, and records what it was
    /// asked (service names) and whether it was closed.
    #[derive(Clone)]
    struct Fake(Arc<FakeState>);

    struct FakeState {
        answer: Mutex<Answer>,
        asked: Mutex<Vec<String>>,
        closed: Mutex<Option<Close>>,
        /// A WireGuard session, which has no close.
        closes: bool,
    }

    impl Fake {
        fn new(answer: Answer) -> Self {
            Self::with_close(answer, true)
        }

        fn with_close(answer: Answer, closes: bool) -> Self {
            Self(Arc::new(FakeState {
                answer: Mutex::new(answer),
                asked: Mutex::new(Vec::new()),
                closed: Mutex::new(None),
                closes,
            }))
        }

        fn answer(&self, answer: Answer) {
            *lock(&self.0.answer) = answer;
        }

        fn asked(&self) -> Vec<String> {
            std::mem::take(&mut *lock(&self.0.asked))
        }
    }

    impl Entry for Fake {
        fn same(&self, other: &Self) -> bool {
            Arc::ptr_eq(&self.0, &other.0)
        }
    }

    impl Link for Fake {
        type Stream = String;

        fn transport(&self) -> &'static str {
            "fake"
        }

        fn close(&self, why: Close) -> bool {
            *lock(&self.0.closed) = Some(why);
            self.0.closes
        }

        async fn connect(
            &self,
            _overlay: Option<SocketAddrV4>,
            header: &Header,
        ) -> Result<String, OpenError> {
            lock(&self.0.asked).push(header.service.clone());
            match *lock(&self.0.answer) {
                Answer::Ok => Ok(header.service.clone()),
                Answer::Status(status) => Err(OpenError::Refused(Some(status))),
                Answer::Silent { alive } => Err(OpenError::Unresponsive { alive }),
            }
        }
    }

    fn route(upstreams: &[(&str, &str)]) -> Route {
        Route {
            name: "p2p".to_owned(),
            listen: "127.0.0.1:0".parse().unwrap(),
            upstreams: upstreams
                .iter()
                .map(|(agent, service)| Upstream {
                    agent: (*agent).to_owned(),
                    service: (*service).to_owned(),
                    overlay: None,
                })
                .collect(),
            idle_timeout: Duration::from_secs(60),
            proxy_protocol: None,
            limits: Limits::default(),
            jsonrpc: None,
            udp: false,
        }
    }

    fn client() -> SocketAddr {
        "203.0.113.7:40000".parse().unwrap()
    }

    async fn pick(registry: &Registry<Fake>, health: &Health, route: &Route) -> Option<String> {
        choose(registry, health, route, client(), None)
            .await
            .map(|(agent, stream)| format!("{agent}/{stream}"))
    }

    #[tokio::test]
    async fn a_refusing_upstream_fails_over_and_is_held_down_until_it_answers_again() {
        let registry = Registry::new(std::collections::HashMap::new());
        let health = Health::default();
        let first = Fake::new(Answer::Status(Status::ConnectFailed));
        let second = Fake::new(Answer::Ok);
        registry.insert("one", first.clone(), None);
        registry.insert("two", second.clone(), None);
        let route = route(&[("one", "node"), ("two", "node")]);

        assert_eq!(
            pick(&registry, &health, &route).await.as_deref(),
            Some("two/node")
        );
        assert_eq!(first.asked(), ["node"]);
        assert!(health.held("one/node", clock::now()));
        // Held: tried after the others, so the next client goes straight to the second.
        assert_eq!(
            pick(&registry, &health, &route).await.as_deref(),
            Some("two/node")
        );
        assert!(first.asked().is_empty(), "a held upstream was tried first");
        // Still tried when nothing before it answers; its first Ok ends the hold.
        second.answer(Answer::Status(Status::ConnectFailed));
        first.answer(Answer::Ok);
        assert_eq!(
            pick(&registry, &health, &route).await.as_deref(),
            Some("one/node")
        );
        assert!(!health.held("one/node", clock::now()));
        assert!(health.held("two/node", clock::now()));
    }

    #[tokio::test]
    async fn a_busy_agent_or_an_unread_header_moves_on_without_a_hold() {
        let registry = Registry::new(std::collections::HashMap::new());
        let health = Health::default();
        let busy = Fake::new(Answer::Status(Status::Busy));
        let confused = Fake::new(Answer::Status(Status::BadHeader));
        let good = Fake::new(Answer::Ok);
        registry.insert("busy", busy.clone(), None);
        registry.insert("confused", confused.clone(), None);
        registry.insert("good", good, None);
        let route = route(&[("busy", "rpc"), ("confused", "rpc"), ("good", "rpc")]);
        assert_eq!(
            pick(&registry, &health, &route).await.as_deref(),
            Some("good/rpc")
        );
        assert_eq!(busy.asked(), ["rpc"]);
        assert_eq!(confused.asked(), ["rpc"]);
        assert!(!health.held("busy/rpc", clock::now()));
        assert!(!health.held("confused/rpc", clock::now()));
    }

    #[tokio::test]
    async fn a_silent_tunnel_is_closed_and_forgotten_but_a_busy_one_stays() {
        let registry = Registry::new(std::collections::HashMap::new());
        let health = Health::default();
        let dead = Fake::new(Answer::Silent { alive: false });
        let busy = Fake::new(Answer::Silent { alive: true });
        let wireguard = Fake::with_close(Answer::Silent { alive: false }, false);
        registry.insert("dead", dead.clone(), None);
        registry.insert("busy", busy.clone(), None);
        registry.insert("wg", wireguard.clone(), None);
        let route = route(&[("dead", "p2p"), ("busy", "p2p"), ("wg", "p2p")]);
        assert_eq!(pick(&registry, &health, &route).await, None);
        assert_eq!(*lock(&dead.0.closed), Some(Close::Unresponsive));
        assert!(
            registry.get("dead").is_none(),
            "a closed tunnel stayed registered"
        );
        assert!(
            lock(&busy.0.closed).is_none(),
            "a tunnel that answers packets was closed"
        );
        assert!(registry.get("busy").is_some());
        // A WireGuard session has no close: its liveness timeout takes it out, not this.
        assert!(registry.get("wg").is_some());
        // No hold-downs for tunnels that did not answer: the service may be fine.
        for upstream in ["dead/p2p", "busy/p2p", "wg/p2p"] {
            assert!(!health.held(upstream, clock::now()), "{upstream} held");
        }
    }

    #[tokio::test]
    async fn no_connected_upstream_is_none() {
        let registry = Registry::<Fake>::new(std::collections::HashMap::new());
        let health = Health::default();
        assert_eq!(
            pick(&registry, &health, &route(&[("gone", "p2p")])).await,
            None
        );
    }
}

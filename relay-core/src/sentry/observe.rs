//! What the sentry shows: its `/metrics` families and its `/healthz` verdict.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::{RouteSlot, SentryHandle, gateway};
use crate::admission::Refusal;
use crate::config::{Route, TransportKind};
use crate::metrics::{Families, Observe};
use crate::{clock, lock};

impl Observe for SentryHandle {
    fn collect(&self, out: &mut Families<'_>) -> std::fmt::Result {
        let shared = &self.shared;
        let routes: Vec<(Arc<RouteSlot>, Arc<Route>)> = lock(&shared.routes)
            .iter()
            .map(|s| (s.clone(), s.route.load_full()))
            .collect();
        // One snapshot of the registry: live tunnels (name, RTT, age) and connects per agent.
        let (live, connects) = shared.tunnels.view(|tunnels| {
            let now = clock::now();
            let live: Vec<(String, &'static str, Duration, Duration)> = tunnels
                .live
                .iter()
                .map(|(name, l)| {
                    (
                        name.clone(),
                        l.tunnel.transport(),
                        l.tunnel.rtt(),
                        now.duration_since(l.since),
                    )
                })
                .collect();
            (live, tunnels.connects.clone())
        });
        // Every peer that may connect, with the transport it uses now (or may use).
        let mut agents: Vec<(String, &'static str)> = {
            let config = lock(&shared.config);
            config
                .agents
                .iter()
                .map(|a| {
                    let idle = if a.wireguard_address.is_some() {
                        TransportKind::WireGuard
                    } else {
                        TransportKind::Quic
                    };
                    (a.name.clone(), idle.as_str())
                })
                .chain(
                    config
                        .wireguard_peers
                        .iter()
                        .map(|p| (p.name.clone(), TransportKind::WireGuard.as_str())),
                )
                .collect()
        };
        for (name, transport) in &mut agents {
            if let Some((_, live_transport, _, _)) = live.iter().find(|(n, ..)| n == name) {
                *transport = live_transport;
            }
        }
        agents.sort();
        let route_label = |r: &Route| [("route", r.name.clone())];
        out.counters(
            "route_connections_accepted",
            "Client connections admitted on a route.",
            routes
                .iter()
                .map(|(s, r)| (route_label(r), s.gate.admitted())),
        )?;
        out.gauges(
            "route_connections_active",
            "Client connections open on a route now.",
            routes.iter().map(|(s, r)| {
                (
                    route_label(r),
                    i64::try_from(s.gate.active()).unwrap_or(i64::MAX),
                )
            }),
        )?;
        out.counters(
            "route_connections_refused",
            "Client connections closed at once, by reason: an admission refusal, or no_upstream \
             (no connected agent answered).",
            routes.iter().flat_map(|(s, r)| {
                Refusal::ALL
                    .iter()
                    .map(|reason| (reason.as_str(), s.gate.refused(*reason)))
                    .chain([("no_upstream", s.no_upstream.load(Ordering::Relaxed))])
                    .map(|(reason, n)| {
                        (
                            [("route", r.name.clone()), ("reason", reason.to_owned())],
                            n,
                        )
                    })
                    .collect::<Vec<_>>()
            }),
        )?;
        out.counters(
            "route_received_bytes",
            "Bytes received from clients and relayed towards the validator.",
            routes
                .iter()
                .map(|(s, r)| (route_label(r), s.bytes.up.load(Ordering::Relaxed))),
        )?;
        out.counters(
            "route_sent_bytes",
            "Bytes relayed from the validator and sent to clients.",
            routes
                .iter()
                .map(|(s, r)| (route_label(r), s.bytes.down.load(Ordering::Relaxed))),
        )?;
        out.counters(
            "route_datagrams_dropped",
            "UDP routes: client datagrams dropped because their flow's queue toward the agent \
             was full.",
            routes
                .iter()
                .filter(|(_, r)| r.udp)
                .map(|(s, r)| (route_label(r), s.datagrams_dropped.load(Ordering::Relaxed))),
        )?;
        out.gauges(
            "route_info",
            "A route's bound listen address (value 1).",
            routes.iter().map(|(s, r)| {
                (
                    [("route", r.name.clone()), ("listen", s.local.to_string())],
                    1_i64,
                )
            }),
        )?;
        out.gauges(
            "route_upstream_connected",
            "1 while the agent of this upstream has a live tunnel, else 0; upstreams in failover \
             order.",
            routes.iter().flat_map(|(_, r)| {
                r.upstreams
                    .iter()
                    .map(|u| {
                        (
                            [
                                ("route", r.name.clone()),
                                ("upstream", format!("{}/{}", u.agent, u.service)),
                            ],
                            i64::from(live.iter().any(|(a, ..)| *a == u.agent)),
                        )
                    })
                    .collect::<Vec<_>>()
            }),
        )?;
        out.histograms(
            "route_relay_setup_seconds",
            "tcp routes: time from a client's admission to its upstream's answer (the tunnel \
             stream opened, the agent connected to the service): what a client waits before \
             its first byte moves.",
            routes
                .iter()
                .filter(|(_, r)| r.jsonrpc.is_none() && !r.udp)
                .map(|(s, r)| (route_label(r), &s.setup)),
        )?;
        let gateways: Vec<(String, Arc<gateway::Gateway>)> = routes
            .iter()
            .filter_map(|(s, r)| s.gateway.load_full().map(|g| (r.name.clone(), g)))
            .collect();
        out.counters(
            "jsonrpc_requests",
            "HTTP requests on JSON-RPC routes by outcome (a WebSocket upgrade is one request).",
            gateways.iter().flat_map(|(route, g)| {
                g.stats
                    .requests()
                    .map(|(outcome, n)| {
                        (
                            [
                                ("route", route.clone()),
                                ("outcome", outcome.as_str().to_owned()),
                            ],
                            n,
                        )
                    })
                    .collect::<Vec<_>>()
            }),
        )?;
        out.counters(
            "jsonrpc_calls",
            "JSON-RPC calls by method and outcome (forwarded, refused by the sentry, \
             rate_limited). Method labels are bounded: names past the first 64 count as \
             \"other\", and calls refused before their method is known as \"-\".",
            gateways.iter().flat_map(|(route, g)| {
                g.stats
                    .calls()
                    .into_iter()
                    .map(|(method, outcome, n)| {
                        (
                            [
                                ("route", route.clone()),
                                ("method", method),
                                ("outcome", outcome.to_owned()),
                            ],
                            n,
                        )
                    })
                    .collect::<Vec<_>>()
            }),
        )?;
        out.gauges(
            "route_tls_not_after_seconds",
            "When the certificate of a route's [route.tls] expires (Unix time): alert well \
             before, and reload after renewing.",
            routes.iter().filter_map(|(_, r)| {
                let not_after = r.jsonrpc.as_ref()?.tls.as_ref()?.not_after?;
                Some((route_label(r), not_after))
            }),
        )?;
        out.histograms(
            "jsonrpc_answer_seconds",
            "JSON-RPC requests forwarded to the node: time from the request sent to the head of \
             the node's answer.",
            gateways
                .iter()
                .map(|(route, g)| ([("route", route.clone())], &g.stats.answer)),
        )?;
        out.gauges(
            "jsonrpc_upstream_idle",
            "Idle upstream connections (relay streams with HTTP on them) pooled for a \
             JSON-RPC route.",
            gateways.iter().map(|(route, g)| {
                (
                    [("route", route.clone())],
                    i64::try_from(g.pool.len()).unwrap_or(i64::MAX),
                )
            }),
        )?;
        out.gauges(
            "jsonrpc_websockets_active",
            "WebSockets open on a JSON-RPC route now.",
            gateways.iter().map(|(route, g)| {
                (
                    [("route", route.clone())],
                    i64::try_from(g.websockets.total()).unwrap_or(i64::MAX),
                )
            }),
        )?;
        out.gauges(
            "connections_active",
            "Client connections open across all routes.",
            [(
                [("max", shared.open.max().to_string())],
                i64::try_from(shared.open.active()).unwrap_or(i64::MAX),
            )],
        )?;
        let agent_label = |a: &str, transport: &str| {
            [("agent", a.to_owned()), ("transport", transport.to_owned())]
        };
        out.gauges(
            "tunnel_up",
            "1 while the agent's (or plain WireGuard peer's) tunnel is established, else 0.",
            agents.iter().map(|(a, transport)| {
                (
                    agent_label(a, transport),
                    i64::from(live.iter().any(|(name, ..)| name == a)),
                )
            }),
        )?;
        out.gauges(
            "tunnel_rtt_seconds",
            "Smoothed round-trip time of the agent's tunnel (WireGuard: measured by its \
             handshakes).",
            live.iter()
                .map(|(a, transport, rtt, _)| (agent_label(a, transport), rtt.as_secs_f64())),
        )?;
        out.gauges(
            "tunnel_handshake_age_seconds",
            "Time since the agent's current tunnel was established.",
            live.iter()
                .map(|(a, transport, _, age)| (agent_label(a, transport), age.as_secs_f64())),
        )?;
        out.counters(
            "tunnel_reconnects",
            "Tunnels an agent established after its first one since start.",
            agents.iter().map(|(a, transport)| {
                (
                    agent_label(a, transport),
                    connects.get(a).copied().unwrap_or(0).saturating_sub(1),
                )
            }),
        )?;
        shared.listeners.collect_handshakes(out)?;
        let upstreams = shared.health.snapshot(clock::now());
        out.counters(
            "upstream_hold_downs",
            "Times an upstream was held down after its agent answered that the service refused \
             (or a plain WireGuard peer did not accept); held upstreams are tried after the \
             others.",
            upstreams
                .iter()
                .map(|u| ([("upstream", u.upstream.clone())], u.hold_downs)),
        )?;
        out.gauges(
            "upstream_held_down",
            "1 while an upstream is held down after a refusal, 0 otherwise (listed once it was \
             ever held).",
            upstreams
                .iter()
                .map(|u| ([("upstream", u.upstream.clone())], i64::from(u.held))),
        )?;
        shared.listeners.collect_wireguard(out)?;
        shared.egress.collect(out)?;
        out.common(&shared.reloads, "sentry")
    }

    fn health(&self) -> Result<String, String> {
        let routes: Vec<Arc<Route>> = lock(&self.shared.routes)
            .iter()
            .map(|s| s.route.load_full())
            .collect();
        let (live, down) = self.shared.tunnels.view(|tunnels| {
            let down: Vec<String> = routes
                .iter()
                .filter(|r| {
                    !r.upstreams
                        .iter()
                        .any(|u| tunnels.live.contains_key(&u.agent))
                })
                .map(|r| {
                    let agents: Vec<&str> = r.upstreams.iter().map(|u| u.agent.as_str()).collect();
                    format!(
                        "route {} has no connected upstream ({})",
                        r.name,
                        agents.join(", ")
                    )
                })
                .collect();
            (tunnels.live.len(), down)
        });
        if down.is_empty() {
            Ok(format!(
                "{} route(s), each with a connected upstream; {live} tunnel(s) up",
                routes.len(),
            ))
        } else {
            Err(down.join("; "))
        }
    }
}

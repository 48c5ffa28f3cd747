//! What the agent shows: its `/metrics` families and its `/healthz` verdict.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::{AgentHandle, Group, NO_SERVICE, STATUSES, ServiceStats, TunnelState};
use crate::metrics::{Families, Observe};
use crate::{clock, lock};

impl Observe for AgentHandle {
    fn collect(&self, out: &mut Families<'_>) -> std::fmt::Result {
        let shared = &self.shared;
        let tunnels: Vec<Arc<TunnelState>> = shared.entries();
        // (sentry, (rtt, age) while up, tunnels established, a WireGuard stream's window)
        type Row = (
            String,
            &'static str,
            Option<(Duration, Duration)>,
            u64,
            Option<usize>,
        );
        let live: Vec<Row> = tunnels
            .iter()
            .map(|t| {
                let live = lock(&t.live);
                let up = live
                    .as_ref()
                    .map(|(tunnel, since)| (tunnel.rtt(), clock::now().duration_since(*since)));
                let window = live.as_ref().and_then(|(tunnel, _)| tunnel.stream_window());
                (
                    t.peer.address.clone(),
                    t.peer.transport.as_str(),
                    up,
                    t.connects.load(Ordering::Relaxed),
                    window,
                )
            })
            .collect();
        let mut services: Vec<(String, Arc<ServiceStats>)> = lock(&shared.service_stats)
            .iter()
            .map(|(n, s)| (n.clone(), s.clone()))
            .collect();
        services.sort_by(|a, b| a.0.cmp(&b.0));
        services.push((NO_SERVICE.to_owned(), shared.unknown.clone()));
        let sentry_label =
            |a: &str, t: &str| [("sentry", a.to_owned()), ("transport", t.to_owned())];
        out.gauges(
            "agent_tunnel_up",
            "1 while the tunnel to this sentry is established, else 0.",
            live.iter()
                .map(|(a, t, up, _, _)| (sentry_label(a, t), i64::from(up.is_some()))),
        )?;
        out.gauges(
            "agent_tunnel_rtt_seconds",
            "Smoothed round-trip time of the tunnel to this sentry.",
            live.iter().filter_map(|(a, t, up, _, _)| {
                up.map(|(rtt, _)| (sentry_label(a, t), rtt.as_secs_f64()))
            }),
        )?;
        out.gauges(
            "agent_wireguard_stream_window_bytes",
            "Buffer each way, so the most in flight per round trip, that a new relayed stream \
             from this sentry gets now over WireGuard: wireguard_window, or with \"auto\" \
             sized for the round trip measured.",
            live.iter().filter_map(|(a, t, _, _, window)| {
                window.map(|w| (sentry_label(a, t), i64::try_from(w).unwrap_or(i64::MAX)))
            }),
        )?;
        out.gauges(
            "agent_tunnel_handshake_age_seconds",
            "Time since the current tunnel to this sentry was established.",
            live.iter().filter_map(|(a, t, up, _, _)| {
                up.map(|(_, age)| (sentry_label(a, t), age.as_secs_f64()))
            }),
        )?;
        out.counters(
            "agent_tunnel_streams_shed",
            "Relayed connections closed because their service stopped reading while holding \
             tunnel flow-control credit: past the tunnel's budget of held streams, or for 60 s.",
            [(
                [("transport", "quic")],
                shared.streams_shed.load(Ordering::Relaxed),
            )],
        )?;
        out.counters(
            "agent_tunnel_reconnects",
            "Tunnels established to this sentry after the first one since start.",
            live.iter()
                .map(|(a, t, _, n, _)| (sentry_label(a, t), n.saturating_sub(1))),
        )?;
        out.counters(
            "agent_streams",
            "Relayed streams answered, by service and status (ok, or why refused).",
            services.iter().flat_map(|(name, stats)| {
                STATUSES
                    .iter()
                    .enumerate()
                    .map(|(i, status)| {
                        (
                            [
                                ("service", name.clone()),
                                ("status", status.as_str().to_owned()),
                            ],
                            stats.streams[i].load(Ordering::Relaxed),
                        )
                    })
                    .collect::<Vec<_>>()
            }),
        )?;
        out.gauges(
            "agent_streams_active",
            "Relayed connections (and UDP flows) to a service now, ones being connected \
             included: at most the service's max_connections.",
            services.iter().map(|(name, s)| {
                (
                    [("service", name.clone())],
                    i64::try_from(s.active.load(Ordering::Relaxed)).unwrap_or(i64::MAX),
                )
            }),
        )?;
        out.counters(
            "agent_service_sent_bytes",
            "Bytes relayed from the sentry to the service.",
            services.iter().map(|(name, s)| {
                (
                    [("service", name.clone())],
                    s.bytes.down.load(Ordering::Relaxed),
                )
            }),
        )?;
        out.counters(
            "agent_service_received_bytes",
            "Bytes read from the service and relayed to the sentry.",
            services.iter().map(|(name, s)| {
                (
                    [("service", name.clone())],
                    s.bytes.up.load(Ordering::Relaxed),
                )
            }),
        )?;
        super::egress::collect(&shared.egress_stats, out)?;
        out.common(&shared.reloads, "agent")
    }

    fn peers(&self) -> Option<String> {
        Some(self.shared.peers.render())
    }

    fn health(&self) -> Result<String, String> {
        // A sentry is up when one of its transports is.
        let groups: Vec<Arc<Group>> = lock(&self.shared.groups).clone();
        let down: Vec<&str> = groups
            .iter()
            .filter(|g| g.entries.iter().all(|e| lock(&e.live).is_none()))
            .map(|g| g.entries[0].peer.address.as_str())
            .collect();
        if down.is_empty() {
            Ok(format!("{} tunnel(s) up", groups.len()))
        } else {
            Err(format!(
                "no tunnel to {} ({} of {} up)",
                down.join(", "),
                groups.len() - down.len(),
                groups.len()
            ))
        }
    }
}

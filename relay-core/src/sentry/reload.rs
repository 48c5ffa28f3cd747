//! Reload: a new config applied to the running sentry, bind first.

use tracing::info;

use super::{RouteSlot, SentryHandle, StartError, agent_names, bind_route, health, spawn_route};
use crate::config::SentryConfig;
use crate::keys::PrivateKey;
use crate::lock;
use crate::metrics::Reloads;
use crate::reload::{Changes, Reload};

impl Reload for SentryHandle {
    type Config = SentryConfig;
    type Error = StartError;
    const KEPT: &'static str = "route(s) kept";

    fn reloads(&self) -> &Reloads {
        &self.shared.reloads
    }

    /// Apply `config` (already parsed and validated) to the running sentry. Bind first: if a
    /// new listener cannot be bound, nothing changes and the error says why.
    fn apply(&self, config: &SentryConfig, key: &PrivateKey) -> Result<Changes, StartError> {
        let shared = &self.shared;
        let mut running = lock(&shared.config);
        let mut routes = lock(&shared.routes);
        let mut report = Changes::default();
        // 1. Everything that can fail, before anything changes.
        let mut fresh = Vec::new();
        for route in &config.routes {
            if !routes.iter().any(|s| s.is(route)) {
                let (listener, local) = bind_route(route)?;
                fresh.push((route, listener, local));
            }
        }
        let names = agent_names(config);
        // The transports take the new pins first: this fails before anything changes, or
        // applies.
        shared.listeners.set_pins(config, &names)?;
        // 2. Apply.
        shared.tunnels.set_names(names.clone());
        for (agent, tunnel, key) in shared.tunnels.revoke(&names) {
            shared
                .listeners
                .retire(&agent, tunnel, key, config.drain_timeout);
        }
        shared.open.set_max(config.max_connections);
        shared.egress.set_config(config);
        shared.health.retain(|upstream| {
            config
                .routes
                .iter()
                .flat_map(|r| &r.upstreams)
                .any(|u| health::key(u) == upstream)
        });
        let mut kept = Vec::new();
        for slot in routes.drain(..) {
            match config.routes.iter().find(|r| slot.is(r)) {
                Some(route) => {
                    slot.set_route(route);
                    report.kept += 1;
                    kept.push(slot);
                }
                None => {
                    let name = slot.route.load().name.clone();
                    info!(route = %name, listen = %slot.local, open = slot.gate.active(), "route removed: listener closed, open connections continue");
                    slot.stop.cancel();
                    report.removed.push(name);
                }
            }
        }
        for (route, listener, local) in fresh {
            let slot = RouteSlot::new(route, local, &shared.open, &shared.stop);
            info!(route = %route.name, listen = %local, "route listening");
            spawn_route(slot.clone(), listener, shared.clone());
            report.added.push(route.name.clone());
            kept.push(slot);
        }
        *routes = kept;
        if config.quic_listen != running.quic_listen {
            report.need_restart.push("sentry.quic_listen");
        }
        if config.wireguard != running.wireguard {
            report.need_restart.push("sentry.wireguard_listen");
        }
        if config.tls_listen != running.tls_listen {
            report.need_restart.push("sentry.tls_listen");
        }
        if config.metrics_listen != running.metrics_listen {
            report.need_restart.push("sentry.metrics_listen");
        }
        if key.public_key() != shared.listeners.public_key() {
            report.need_restart.push("sentry.private_key");
        }
        let mut applied = config.clone();
        applied.quic_listen = running.quic_listen;
        applied.metrics_listen = running.metrics_listen;
        applied.wireguard = running.wireguard;
        applied.tls_listen = running.tls_listen;
        *running = applied;
        Ok(report)
    }
}

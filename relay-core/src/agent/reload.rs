//! Reload: a new config applied to the running agent.

use std::sync::Arc;

use tracing::info;

use super::{AgentError, AgentHandle, Group, egress, group_peers};
use crate::config::AgentConfig;
use crate::keys::PrivateKey;
use crate::lock;
use crate::metrics::Reloads;
use crate::reload::{Changes, Reload};
use crate::transport::dial::Dialer;

impl Reload for AgentHandle {
    type Config = AgentConfig;
    type Error = AgentError;
    const KEPT: &'static str = "service(s) exported";

    fn reloads(&self) -> &Reloads {
        &self.shared.reloads
    }

    /// Apply `config` (already parsed and validated) to the running agent: a new sentry's
    /// TLS settings are made before anything changes.
    fn apply(&self, config: &AgentConfig, key: &PrivateKey) -> Result<Changes, AgentError> {
        let shared = &self.shared;
        let mut running = lock(&shared.config);
        let mut report = Changes::default();
        // Client settings for new sentries, and new egress listeners bound, first: the only
        // steps that can fail.
        for peer in &config.sentries {
            Dialer::new(&shared.key, peer, config.max_streams_per_sentry)?;
        }
        let mut slots = lock(&shared.egress);
        let mut fresh = Vec::new();
        for listener in &config.egress {
            if !slots
                .iter()
                .any(|s| s.config.load().listen == listener.listen)
            {
                let (socket, local) =
                    egress::bind(listener).map_err(|source| AgentError::Egress {
                        addr: listener.listen,
                        source,
                    })?;
                fresh.push((listener, socket, local));
            }
        }
        slots.retain(|slot| {
            let listen = slot.config.load().listen;
            match config.egress.iter().find(|l| l.listen == listen) {
                Some(listener) => {
                    slot.config.store(Arc::new(listener.clone()));
                    true
                }
                None => {
                    info!(listen = %slot.local, "egress listener removed: closed, open connections continue");
                    slot.stop.cancel();
                    report.removed.push(format!("egress {}", slot.local));
                    false
                }
            }
        });
        for (listener, socket, local) in fresh {
            let stats = egress::stats_for(&shared.egress_stats, listener.listen);
            let slot = egress::Slot::new(listener, local, stats, &shared.stop);
            tokio::spawn(egress::accept(slot.clone(), socket, shared.clone()));
            report.added.push(format!("egress {local}"));
            slots.push(slot);
        }
        drop(slots);
        shared.set_services(config);
        report.kept = config.services.len();
        // A sentry whose entries changed in any way (an added fallback, a new order) is
        // retired and started again as a new group.
        let wanted = group_peers(&config.sentries);
        let current: Vec<Arc<Group>> = lock(&shared.groups).clone();
        for group in &current {
            if !wanted.contains(&group.peers()) {
                for entry in &group.entries {
                    info!(sentry = %entry.peer.address, transport = entry.peer.transport.as_str(), "sentry removed or changed: its tunnel takes no new streams and closes once its open ones end");
                    report.removed.push(entry.peer.address.clone());
                }
                group.retire.cancel();
            }
        }
        lock(&shared.groups).retain(|g| wanted.contains(&g.peers()));
        for peers in &wanted {
            if !current.iter().any(|g| g.peers() == *peers) {
                shared.add_group(peers, config.max_streams_per_sentry)?;
                report.added.extend(peers.iter().map(|p| p.address.clone()));
            }
        }
        if config.metrics_listen != running.metrics_listen {
            report.need_restart.push("agent.metrics_listen");
        }
        if key.public_key() != shared.key.public_key() {
            report.need_restart.push("agent.private_key");
        }
        let mut applied = config.clone();
        applied.metrics_listen = running.metrics_listen;
        *running = applied;
        Ok(report)
    }
}

//! Reload: a new config applied to the running agent.

use std::sync::Arc;

use tracing::info;

use super::{AgentError, AgentHandle, Group, group_peers};
use crate::config::AgentConfig;
use crate::keys::PrivateKey;
use crate::lock;
use crate::transport::dial::Dialer;

/// What a reload changed, for the log line.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReloadReport {
    /// Sentries dialed from now on.
    pub added: Vec<String>,
    /// Sentries whose tunnels take no new streams and close once their streams end.
    pub removed: Vec<String>,
    /// Services exported now.
    pub services: usize,
    /// Changes that only a restart applies (the running value stays).
    pub need_restart: Vec<&'static str>,
}

impl AgentHandle {
    /// Apply `config` (already parsed and validated) to the running agent.
    ///
    /// # Errors
    /// A new sentry's TLS settings cannot be made from the key.
    pub fn reload(
        &self,
        config: &AgentConfig,
        key: &PrivateKey,
    ) -> Result<ReloadReport, AgentError> {
        let result = self.apply(config, key);
        self.shared.reloads.count(result.is_ok());
        result
    }

    /// Count a reload refused before it reached [`Self::reload`] (the new config did not
    /// parse or its key did not load), so `config_reloads_total{result="error"}` sees it.
    pub fn count_refused_reload(&self) {
        self.shared.reloads.count(false);
    }

    fn apply(&self, config: &AgentConfig, key: &PrivateKey) -> Result<ReloadReport, AgentError> {
        let shared = &self.shared;
        let mut running = lock(&shared.config);
        let mut report = ReloadReport::default();
        // Client settings for new sentries first: the only step that can fail.
        for peer in &config.sentries {
            Dialer::new(&shared.key, peer, config.max_streams_per_sentry)?;
        }
        shared.set_services(config);
        report.services = config.services.len();
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

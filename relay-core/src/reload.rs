//! A config reload, the same shape for both engines: a new config (already parsed and
//! validated) applied to the running daemon, bind first, counted by result, and a report of
//! what changed for the log line.
//!
//! Each engine implements [`Reload::apply`] (its own steps: routes on the sentry, sentries and
//! services on the agent); counting, the refused-reload path and the summary line are here
//! once.

use crate::keys::PrivateKey;
use crate::metrics::Reloads;

/// What a reload changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Changes {
    /// Started by this reload: routes bound (sentry), sentries dialed or egress listeners
    /// bound (agent).
    pub added: Vec<String>,
    /// Stopped by it: routes whose listeners closed, sentries retired, egress listeners
    /// closed. Their open connections finish.
    pub removed: Vec<String>,
    /// In force with the new settings: routes kept (sentry), services exported (agent).
    pub kept: usize,
    /// Config keys whose change only a restart applies (the running value stays).
    pub need_restart: Vec<&'static str>,
}

impl Changes {
    /// The reload's log line, `kept` naming what [`Changes::kept`] counts.
    #[must_use]
    pub fn summary(&self, kept: &str) -> String {
        format!(
            "{} {kept}, added {:?}, removed {:?}",
            self.kept, self.added, self.removed
        )
    }
}

/// A running engine that takes a new config.
pub trait Reload {
    /// The engine's config.
    type Config;
    /// Why a config could not be applied (nothing changed then).
    type Error: std::fmt::Display;
    /// What [`Changes::kept`] counts, for the log line.
    const KEPT: &'static str;

    /// Apply `config` to the running engine, everything that can fail first: if it fails,
    /// nothing changed. Use [`Reload::reload`], which counts it.
    ///
    /// # Errors
    /// A new listener cannot be bound, or new key-dependent settings cannot be made.
    fn apply(&self, config: &Self::Config, key: &PrivateKey) -> Result<Changes, Self::Error>;

    /// Where the engine counts its reloads (`config_reloads_total`).
    fn reloads(&self) -> &Reloads;

    /// Apply `config`, counting the reload as applied or refused.
    ///
    /// # Errors
    /// As [`Reload::apply`]; the running config stays.
    fn reload(&self, config: &Self::Config, key: &PrivateKey) -> Result<Changes, Self::Error> {
        let result = self.apply(config, key);
        self.reloads().count(result.is_ok());
        result
    }

    /// Count a reload refused before it reached [`Reload::reload`] (the new config did not
    /// parse or its key did not load), so `config_reloads_total{result="error"}` sees it.
    fn count_refused_reload(&self) {
        self.reloads().count(false);
    }
}

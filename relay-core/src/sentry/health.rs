//! Upstream hold-down: an upstream whose agent answered that its service refused the
//! connection (or could not reach it, does not export it, is shutting down), or a plain
//! WireGuard peer that did not accept, is held down for [`HOLD_DOWN`]. While held it moves to
//! the end of every failover list, so clients stop paying a refused attempt each before
//! reaching a working upstream; it is still tried when nothing before it answered, so a
//! service that comes back is used again at once. The first answer `Ok` ends the hold.
//!
//! Keyed by the upstream's text (`agent/service`, or `peer/IP:PORT`): routes that share an
//! upstream share its state. A new tunnel from an agent ends the holds of its upstreams. Keys
//! come from the config only, and a reload drops those that left it, so the table is bounded
//! by the config.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::Upstream;
use crate::lock;

/// How long a refusing upstream is skipped.
pub const HOLD_DOWN: Duration = Duration::from_secs(5);

/// The hold-down state of every upstream that was ever refused.
#[derive(Debug, Default)]
pub(super) struct Health {
    entries: Mutex<HashMap<String, Entry>>,
}

#[derive(Debug, Default)]
struct Entry {
    /// Held until then (in the past once it expired).
    until: Option<Instant>,
    /// Hold-downs started since start.
    hold_downs: u64,
}

/// One upstream's state for metrics.
pub(super) struct UpstreamHealth {
    pub upstream: String,
    pub held: bool,
    pub hold_downs: u64,
}

/// The key of `upstream` in the table (also its metrics label).
pub(super) fn key(upstream: &Upstream) -> String {
    format!("{}/{}", upstream.agent, upstream.service)
}

impl Health {
    /// Whether `upstream` is held down at `now`.
    pub fn held(&self, upstream: &str, now: Instant) -> bool {
        lock(&self.entries)
            .get(upstream)
            .and_then(|e| e.until)
            .is_some_and(|until| now < until)
    }

    /// Hold `upstream` down from `now`; true when this starts a hold (it was not held), so
    /// the caller logs once per hold rather than once per client.
    pub fn hold(&self, upstream: &str, now: Instant) -> bool {
        let mut entries = lock(&self.entries);
        let entry = entries.entry(upstream.to_owned()).or_default();
        let started = entry.until.is_none_or(|until| now >= until);
        if started {
            entry.hold_downs += 1;
        }
        entry.until = Some(now + HOLD_DOWN);
        started
    }

    /// `upstream` answered: end its hold. True when it was held.
    pub fn clear(&self, upstream: &str, now: Instant) -> bool {
        let mut entries = lock(&self.entries);
        match entries.get_mut(upstream) {
            Some(entry) => {
                let was_held = entry.until.is_some_and(|until| now < until);
                entry.until = None;
                was_held
            }
            None => false,
        }
    }

    /// A new tunnel from `agent` (restarted, perhaps with its services fixed): end the holds
    /// of its upstreams, so they are tried in their place again at once.
    pub(crate) fn release_agent(&self, agent: &str) {
        for (key, entry) in lock(&self.entries).iter_mut() {
            if key.split_once('/').is_some_and(|(a, _)| a == agent) {
                entry.until = None;
            }
        }
    }

    /// Forget upstreams for which `keep` is false (after a reload).
    pub(crate) fn retain(&self, keep: impl Fn(&str) -> bool) {
        lock(&self.entries).retain(|k, _| keep(k));
    }

    /// Every upstream ever held, sorted by name.
    pub(crate) fn snapshot(&self, now: Instant) -> Vec<UpstreamHealth> {
        let mut all: Vec<UpstreamHealth> = lock(&self.entries)
            .iter()
            .map(|(k, e)| UpstreamHealth {
                upstream: k.clone(),
                held: e.until.is_some_and(|until| now < until),
                hold_downs: e.hold_downs,
            })
            .collect();
        all.sort_by(|a, b| a.upstream.cmp(&b.upstream));
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hold_lasts_its_time_and_counts_once() {
        let health = Health::default();
        let t0 = crate::clock::now();
        assert!(!health.held("a/svc", t0));
        assert!(health.hold("a/svc", t0), "the first refusal starts a hold");
        assert!(
            !health.hold("a/svc", t0 + Duration::from_secs(1)),
            "a refusal during the hold extends it"
        );
        assert!(health.held("a/svc", t0 + Duration::from_secs(5)));
        assert!(!health.held("a/svc", t0 + Duration::from_secs(6) + HOLD_DOWN));
        assert!(health.hold("a/svc", t0 + Duration::from_secs(7) + HOLD_DOWN));
        let snapshot = health.snapshot(t0 + Duration::from_secs(7) + HOLD_DOWN);
        assert_eq!(snapshot.len(), 1);
        assert_eq!(snapshot[0].hold_downs, 2);
        assert!(snapshot[0].held);
    }

    #[test]
    fn an_answer_ends_the_hold_and_a_reload_forgets() {
        let health = Health::default();
        let t0 = crate::clock::now();
        health.hold("a/svc", t0);
        health.hold("b/svc", t0);
        assert!(health.clear("a/svc", t0));
        assert!(!health.held("a/svc", t0));
        assert!(!health.clear("a/svc", t0), "already cleared");
        health.release_agent("b");
        assert!(
            !health.held("b/svc", t0),
            "a new tunnel from b ends its holds"
        );
        health.retain(|k| k != "b/svc");
        let names: Vec<_> = health
            .snapshot(t0)
            .into_iter()
            .map(|u| u.upstream)
            .collect();
        assert_eq!(names, ["a/svc"]);
    }
}

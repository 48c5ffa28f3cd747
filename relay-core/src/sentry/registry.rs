//! Connected agents by name: the one place a tunnel is registered, replaced, revoked and
//! removed.
//!
//! The registry holds at most one tunnel per agent name. It is generic over the tunnel so
//! that its rules (replacement, revocation, a late removal that must not take out a newer
//! tunnel) are unit-tested without sockets.

use std::collections::HashMap;
use std::fmt::Display;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use arc_swap::ArcSwap;
use tokio::sync::watch;
use tracing::info;

use super::Shared;
use crate::keys::PublicKey;
use crate::transport::listen::TunnelSink;
use crate::transport::{Close, Tunnel, TunnelStream};
use crate::{clock, lock};

/// What the registry needs of a tunnel.
pub(super) trait Entry: Clone {
    /// Whether `other` is this very tunnel (not merely one of the same agent).
    fn same(&self, other: &Self) -> bool;
}

/// Connected agents by name.
pub(super) struct Registry<T = Tunnel> {
    /// Pinned key → agent name; swapped on reload.
    names: ArcSwap<HashMap<PublicKey, String>>,
    state: Mutex<Tunnels<T>>,
    /// Bumped on every change, for waiters.
    changed: watch::Sender<u64>,
}

/// The registry's contents.
pub(super) struct Tunnels<T> {
    pub(super) live: HashMap<String, Live<T>>,
    /// Tunnels established per agent since start.
    pub(super) connects: HashMap<String, u64>,
}

/// A registered tunnel.
pub(super) struct Live<T> {
    pub(super) tunnel: T,
    pub(super) since: Instant,
    /// The pinned key the tunnel authenticated with (`None`: a WireGuard peer, whose device
    /// drops it when its key goes).
    key: Option<PublicKey>,
}

impl<T: Entry> Registry<T> {
    pub(super) fn new(names: HashMap<PublicKey, String>) -> Self {
        Self {
            names: ArcSwap::from_pointee(names),
            state: Mutex::new(Tunnels {
                live: HashMap::new(),
                connects: HashMap::new(),
            }),
            changed: watch::Sender::new(0),
        }
    }

    /// The agent a pinned key belongs to now.
    pub(super) fn name_of(&self, key: &PublicKey) -> Option<String> {
        self.names.load().get(key).cloned()
    }

    /// Pin a new set of keys (a reload). Tunnels of keys that left stay until [`Self::revoke`].
    pub(super) fn set_names(&self, names: HashMap<PublicKey, String>) {
        self.names.store(Arc::new(names));
    }

    pub(super) fn get(&self, agent: &str) -> Option<T> {
        lock(&self.state).live.get(agent).map(|l| l.tunnel.clone())
    }

    /// A look at the registry's contents (under its lock: keep `f` short).
    pub(super) fn view<R>(&self, f: impl FnOnce(&Tunnels<T>) -> R) -> R {
        f(&lock(&self.state))
    }

    /// Names of the agents with a live tunnel, sorted.
    pub(super) fn connected(&self) -> Vec<String> {
        let mut names: Vec<String> = lock(&self.state).live.keys().cloned().collect();
        names.sort();
        names
    }

    /// Wait until `agent`'s tunnel is up (`true`) or down (`false`).
    pub(super) async fn wait(&self, agent: &str, up: bool) {
        let mut changes = self.changed.subscribe();
        while lock(&self.state).live.contains_key(agent) != up {
            if changes.changed().await.is_err() {
                return;
            }
        }
    }

    /// Register `tunnel` (authenticated with `key`) as `agent`'s; returns the one it replaced.
    pub(super) fn insert(&self, agent: &str, tunnel: T, key: Option<PublicKey>) -> Option<T> {
        let old = {
            let mut state = lock(&self.state);
            *state.connects.entry(agent.to_owned()).or_insert(0) += 1;
            state.live.insert(
                agent.to_owned(),
                Live {
                    tunnel,
                    since: clock::now(),
                    key,
                },
            )
        };
        self.changed.send_modify(|n| *n += 1);
        old.map(|l| l.tunnel)
    }

    /// Take out every tunnel whose key is no longer pinned under its agent's name in `names`:
    /// no new client goes over them from now on. Returns them, with their agent's name.
    pub(super) fn revoke(&self, names: &HashMap<PublicKey, String>) -> Vec<(String, T, PublicKey)> {
        let mut state = lock(&self.state);
        let gone: Vec<(String, PublicKey)> = state
            .live
            .iter()
            .filter_map(|(agent, live)| {
                let key = live.key?;
                (names.get(&key) != Some(agent)).then(|| (agent.clone(), key))
            })
            .collect();
        let revoked: Vec<(String, T, PublicKey)> = gone
            .into_iter()
            .filter_map(|(agent, key)| {
                let live = state.live.remove(&agent)?;
                Some((agent, live.tunnel, key))
            })
            .collect();
        drop(state);
        if !revoked.is_empty() {
            self.changed.send_modify(|n| *n += 1);
        }
        revoked
    }

    /// Remove `agent`'s tunnel if it is still `tunnel` (a newer one may have replaced it).
    pub(super) fn remove(&self, agent: &str, tunnel: &T) {
        let mut state = lock(&self.state);
        if state.live.get(agent).is_some_and(|l| l.tunnel.same(tunnel)) {
            state.live.remove(agent);
            drop(state);
            self.changed.send_modify(|n| *n += 1);
        }
    }
}

impl Entry for Tunnel {
    fn same(&self, other: &Self) -> bool {
        Tunnel::same(self, other)
    }
}

impl TunnelSink for Shared {
    fn name_of(&self, key: &PublicKey) -> Option<String> {
        self.tunnels.name_of(key)
    }

    /// `agent`'s tunnel is up, on any transport: its upstreams' hold-downs end, it replaces
    /// (and closes) the agent's previous tunnel, and it is logged. Holds are released before
    /// the tunnel is registered (a hold its first stream earns must stay), and it is
    /// registered before it is logged: whoever reads "tunnel up" can use it.
    fn up(&self, agent: &str, tunnel: Tunnel, key: Option<PublicKey>, remote: &dyn Display) {
        self.health.release_agent(agent);
        let transport = tunnel.transport();
        if let Some(old) = self.tunnels.insert(agent, tunnel, key) {
            old.close(Close::Replaced);
        }
        info!(%agent, %remote, transport, "tunnel up");
    }

    /// `agent`'s `tunnel` went down (`why`): it leaves the registry unless a newer one
    /// replaced it already.
    fn down(&self, agent: &str, tunnel: &Tunnel, remote: &dyn Display, why: &dyn Display) {
        self.tunnels.remove(agent, tunnel);
        info!(%agent, %remote, transport = tunnel.transport(), "tunnel down: {why}");
    }

    /// An egress stream from `agent`: served among the relayed connections (the drain waits
    /// for it).
    fn egress(self: Arc<Self>, agent: &str, stream: TunnelStream) {
        let agent = agent.to_owned();
        self.relays
            .clone()
            .spawn(super::egress::serve(self, agent, stream));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::PrivateKey;

    /// A tunnel without sockets: an identity.
    #[derive(Clone)]
    struct Fake(Arc<()>);

    impl Fake {
        fn new() -> Self {
            Self(Arc::new(()))
        }
    }

    impl Entry for Fake {
        fn same(&self, other: &Self) -> bool {
            Arc::ptr_eq(&self.0, &other.0)
        }
    }

    fn key() -> PublicKey {
        PrivateKey::generate().expect("a key").public_key()
    }

    fn registry(pins: &[(PublicKey, &str)]) -> Registry<Fake> {
        Registry::new(pins.iter().map(|(k, n)| (*k, (*n).to_owned())).collect())
    }

    #[test]
    fn a_newer_tunnel_replaces_the_old_and_a_late_removal_of_the_old_keeps_it() {
        let k = key();
        let registry = registry(&[(k, "validator")]);
        let old = Fake::new();
        let new = Fake::new();
        assert!(registry.insert("validator", old.clone(), Some(k)).is_none());
        let replaced = registry.insert("validator", new.clone(), Some(k));
        assert!(replaced.is_some_and(|r| r.same(&old)));
        // The old tunnel's task ends later and removes "its" entry: the new one stays.
        registry.remove("validator", &old);
        assert!(registry.get("validator").is_some_and(|t| t.same(&new)));
        registry.remove("validator", &new);
        assert!(registry.get("validator").is_none());
        assert_eq!(registry.view(|t| t.connects["validator"]), 2);
    }

    #[test]
    fn revocation_takes_out_tunnels_whose_key_left_or_moved_to_another_name() {
        let (a, b, c) = (key(), key(), key());
        let registry = registry(&[(a, "one"), (b, "two"), (c, "three")]);
        registry.insert("one", Fake::new(), Some(a));
        registry.insert("two", Fake::new(), Some(b));
        registry.insert("three", Fake::new(), Some(c));
        // A plain WireGuard peer has no pinned key here: its device drops it.
        registry.insert("plain", Fake::new(), None);
        // `a` stays; `b` is unpinned; `c` now belongs to another name.
        let names: HashMap<PublicKey, String> =
            [(a, "one".to_owned()), (c, "four".to_owned())].into();
        registry.set_names(names.clone());
        let mut revoked: Vec<String> = registry
            .revoke(&names)
            .into_iter()
            .map(|(agent, _, _)| agent)
            .collect();
        revoked.sort();
        assert_eq!(revoked, ["three", "two"]);
        assert_eq!(registry.connected(), ["one", "plain"]);
        assert_eq!(registry.name_of(&c).as_deref(), Some("four"));
        assert!(registry.name_of(&b).is_none());
        // Nothing more to revoke the second time.
        assert!(registry.revoke(&names).is_empty());
    }

    #[tokio::test]
    async fn a_waiter_sees_the_tunnel_come_up_and_go_down() {
        let registry = Arc::new(registry(&[]));
        let tunnel = Fake::new();
        let waiter = {
            let registry = registry.clone();
            tokio::spawn(async move {
                registry.wait("validator", true).await;
                registry.wait("validator", false).await;
            })
        };
        tokio::task::yield_now().await;
        registry.insert("validator", tunnel.clone(), None);
        tokio::task::yield_now().await;
        registry.remove("validator", &tunnel);
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("the waiter saw both changes")
            .expect("the waiter did not panic");
    }
}

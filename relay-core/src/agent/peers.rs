//! Every relayed peer seen as itself: the loopback source address a client's connections to
//! a `source = "mapped"` service come from, and the table that turns an address the node
//! logged back into the real client (`GET /peers`, `sentry status --peers`).
//!
//! The mapping is a pure function of the client's address, stable across reconnects, agent
//! restarts and agents: an IPv4 client `a.b.c.d` connects from `127.b.c.d`, readable by eye
//! against the client (the first octet is lost: two clients that differ only there share an
//! address). The three addresses the host itself uses or that mean "everyone" (`127.0.0.0`,
//! `127.0.0.1`, `127.255.255.255`) have the top bit of their second octet flipped, so a peer
//! never looks like the agent's own `127.0.0.1` to the node. An IPv6 client is its /64, as the
//! sentry's admission counts it (a host usually owns a whole /64, and must not become 2^24
//! peers to the node by cycling through it): the /64 is hashed (SHA-256 of its 8 bytes) into
//! the same range, likewise avoiding those three.

use std::collections::{HashMap, VecDeque};
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Mutex;
use std::time::Instant;

use crate::{clock, lock};

/// Peers the table remembers; the least recently seen is forgotten past it.
pub(crate) const MAX_PEERS: usize = 4096;

/// The loopback address a client's connections come from.
#[must_use]
pub fn mapped_source(client: IpAddr) -> Ipv4Addr {
    let [b, c, d] = match client.to_canonical() {
        IpAddr::V4(v4) => {
            let [_, b, c, d] = v4.octets();
            [b, c, d]
        }
        IpAddr::V6(v6) => {
            let digest = ring::digest::digest(&ring::digest::SHA256, &v6.octets()[..8]);
            let h = digest.as_ref();
            [h[0], h[1], h[2]]
        }
    };
    let b = match [b, c, d] {
        [0, 0, 0] | [0, 0, 1] | [255, 255, 255] => b ^ 0x80,
        _ => b,
    };
    Ipv4Addr::new(127, b, c, d)
}

/// What the table knows of one mapped address.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Peer {
    client: IpAddr,
    service: String,
    /// Relayed connections (UDP flows) open now.
    open: usize,
    /// Since start.
    total: u64,
    last_seen: Instant,
    /// Bumped at every touch; tells a stale entry of `order` from the live one.
    touch: u64,
}

/// Recent peers by mapped address.
#[derive(Debug, Default)]
pub(crate) struct Peers {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    by_mapped: HashMap<Ipv4Addr, Peer>,
    /// Touches in order, oldest first (with stale ones, skipped when evicting).
    order: VecDeque<(Ipv4Addr, u64)>,
    touches: u64,
}

/// An open connection's place in the table; closing it (drop) counts it closed.
#[derive(Debug)]
pub(crate) struct Open<'a> {
    peers: &'a Peers,
    mapped: Ipv4Addr,
    client: IpAddr,
}

impl Peers {
    /// A connection from `client` to `service`, from `mapped`, opens now.
    pub(crate) fn open(&self, mapped: Ipv4Addr, client: IpAddr, service: &str) -> Open<'_> {
        let mut state = lock(&self.state);
        let state = &mut *state;
        state.touches += 1;
        let touch = state.touches;
        let now = clock::now();
        let peer = state.by_mapped.entry(mapped).or_insert_with(|| Peer {
            client,
            service: service.to_owned(),
            open: 0,
            total: 0,
            last_seen: now,
            touch,
        });
        if peer.client != client {
            // Another client with the same mapped address: the table shows the latest.
            peer.client = client;
            peer.open = 0;
        }
        if peer.service != service {
            service.clone_into(&mut peer.service);
        }
        peer.open += 1;
        peer.total += 1;
        peer.last_seen = now;
        peer.touch = touch;
        state.order.push_back((mapped, touch));
        state.evict();
        Open {
            peers: self,
            mapped,
            client,
        }
    }

    /// The table as text: a header line, then one line per peer, most recent first.
    pub(crate) fn render(&self) -> String {
        let now = clock::now();
        let mut rows: Vec<(Ipv4Addr, Peer)> = lock(&self.state)
            .by_mapped
            .iter()
            .map(|(m, p)| (*m, p.clone()))
            .collect();
        rows.sort_by(|a, b| b.1.last_seen.cmp(&a.1.last_seen).then(a.0.cmp(&b.0)));
        let mut out = String::from("# mapped client service open total last_seen_seconds_ago\n");
        for (mapped, peer) in rows {
            let ago = now.saturating_duration_since(peer.last_seen);
            let _ = writeln!(
                out,
                "{mapped} {} {} {} {} {}",
                peer.client,
                peer.service,
                peer.open,
                peer.total,
                ago.as_secs()
            );
        }
        out
    }

    #[cfg(test)]
    fn get(&self, mapped: Ipv4Addr) -> Option<Peer> {
        lock(&self.state).by_mapped.get(&mapped).cloned()
    }
}

impl State {
    /// Forget the least recently seen peers past [`MAX_PEERS`], and stale touches.
    fn evict(&mut self) {
        while self.by_mapped.len() > MAX_PEERS {
            let Some((mapped, touch)) = self.order.pop_front() else {
                break;
            };
            if self
                .by_mapped
                .get(&mapped)
                .is_some_and(|p| p.touch == touch)
            {
                self.by_mapped.remove(&mapped);
            }
        }
        // Stale touches of busy peers: compact when they outnumber the live ones.
        if self.order.len() > 4 * MAX_PEERS {
            let live = &self.by_mapped;
            self.order
                .retain(|(m, t)| live.get(m).is_some_and(|p| p.touch == *t));
        }
    }
}

impl Drop for Open<'_> {
    fn drop(&mut self) {
        let mut state = lock(&self.peers.state);
        if let Some(peer) = state.by_mapped.get_mut(&self.mapped)
            && peer.client == self.client
        {
            peer.open = peer.open.saturating_sub(1);
            peer.last_seen = clock::now();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn ipv4_clients_map_to_their_low_24_bits() {
        assert_eq!(
            mapped_source(ip("203.0.113.10")),
            Ipv4Addr::new(127, 0, 113, 10)
        );
        assert_eq!(
            mapped_source(ip("198.51.100.7")),
            Ipv4Addr::new(127, 51, 100, 7)
        );
        // The IPv4-mapped form of a dual-stack listener is the same client.
        assert_eq!(
            mapped_source(ip("::ffff:203.0.113.10")),
            Ipv4Addr::new(127, 0, 113, 10)
        );
        // Never the host's own 127.0.0.1, nor 127.0.0.0 or 127.255.255.255.
        assert_eq!(mapped_source(ip("10.0.0.1")), Ipv4Addr::new(127, 128, 0, 1));
        assert_eq!(mapped_source(ip("10.0.0.0")), Ipv4Addr::new(127, 128, 0, 0));
        assert_eq!(
            mapped_source(ip("10.255.255.255")),
            Ipv4Addr::new(127, 127, 255, 255)
        );
    }

    #[test]
    fn ipv6_clients_hash_into_the_range_stably() {
        let a = mapped_source(ip("2001:db8::1"));
        assert_eq!(a, mapped_source(ip("2001:db8::1")));
        // One /64 is one peer; another /64 another.
        assert_eq!(a, mapped_source(ip("2001:db8::ffff:2")));
        assert_ne!(a, mapped_source(ip("2001:db8:0:1::1")));
        assert_eq!(a.octets()[0], 127);
    }

    proptest! {
        #[test]
        fn every_client_maps_to_a_loopback_address_that_is_not_the_hosts(bits: u128, v4: bool) {
            let client = if v4 {
                IpAddr::V4(Ipv4Addr::from(bits as u32))
            } else {
                IpAddr::V6(std::net::Ipv6Addr::from(bits))
            };
            let mapped = mapped_source(client);
            prop_assert!(mapped.is_loopback());
            prop_assert!(![
                Ipv4Addr::new(127, 0, 0, 0),
                Ipv4Addr::new(127, 0, 0, 1),
                Ipv4Addr::new(127, 255, 255, 255)
            ]
            .contains(&mapped));
            prop_assert_eq!(mapped, mapped_source(client));
        }
    }

    #[test]
    fn the_table_counts_open_and_total_and_forgets_the_oldest() {
        let peers = Peers::default();
        let m = mapped_source(ip("203.0.113.10"));
        {
            let _a = peers.open(m, ip("203.0.113.10"), "p2p");
            let _b = peers.open(m, ip("203.0.113.10"), "p2p");
            let p = peers.get(m).unwrap();
            assert_eq!((p.open, p.total), (2, 2));
        }
        let p = peers.get(m).unwrap();
        assert_eq!((p.open, p.total), (0, 2));
        let text = peers.render();
        assert!(
            text.contains("127.0.113.10 203.0.113.10 p2p 0 2 "),
            "{text}"
        );
        // Past the cap the least recently seen goes; a busy one stays.
        for i in 0..MAX_PEERS as u32 {
            let client = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + 2 + i));
            let mapped = mapped_source(client);
            drop(peers.open(mapped, client, "p2p"));
            if i == 10 {
                drop(peers.open(m, ip("203.0.113.10"), "p2p"));
            }
        }
        assert!(peers.get(m).is_some());
        let first = mapped_source(IpAddr::V4(Ipv4Addr::from(0x0a00_0002)));
        assert!(peers.get(first).is_none());
        assert_eq!(lock(&peers.state).by_mapped.len(), MAX_PEERS);
    }
}

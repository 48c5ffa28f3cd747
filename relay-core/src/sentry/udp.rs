//! UDP routes (`protocol = "udp"`): each client address is a flow, relayed to an agent's `udp`
//! service over a tunnel stream of its own (see [`crate::relay::datagram`]).
//!
//! - A datagram from an address with no flow passes admission control like a TCP connection
//!   (allow/deny, `max_connections_per_ip` as flows per address, `connect_rate_per_ip` as new
//!   flows per second, the route's and the sentry's caps); a refused one is dropped unanswered.
//! - New flows are also rated per network ([`NEW_FLOWS_PER_PREFIX`] per IPv4 /24 or IPv6 /48):
//!   a source address costs a spoofer nothing, a network's worth of them counts as one.
//! - When the route's (or the sentry's) cap is reached, the quietest flow (the longest without
//!   a datagram either way) is evicted for the newcomer, rather than new peers refused while
//!   made-up sources hold every place.
//! - An admitted flow holds its permit until it ends: after `idle_timeout` with no datagram
//!   either way, when the tunnel stream fails, when it is evicted, when the route is removed,
//!   or at shutdown.
//! - Datagrams wait for the upstream in a short queue per flow, bounded in datagrams
//!   ([`FLOW_QUEUE`]) and in bytes, per flow ([`FLOW_QUEUE_BYTES`]) and per route
//!   ([`ROUTE_QUEUE_BYTES`]); past it they are dropped and counted, as a router drops: a slow
//!   tunnel never grows memory.
//! - Replies go back from the route's own socket to the flow's client address, and only there.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::AsyncWriteExt;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::tcp::NO_UPSTREAM_LOG;
use super::upstream::connect_upstream;
use super::{ACCEPT_LOG, RouteSlot, Shared};
use crate::admission::{CallRate, Permit, Refusal};
use crate::config::units::Rate;
use crate::log_limit::LogLimit;
use crate::relay::datagram::{MAX_DATAGRAM, read_datagram, write_datagram};
use crate::relay::{idle_watch, millis_since};
use crate::{clock, lock};

/// Datagrams a flow queues toward its agent (while the upstream connects, or while the tunnel
/// is slower than the client); more are dropped.
const FLOW_QUEUE: usize = 64;
/// Bytes a flow queues toward its agent, at most.
const FLOW_QUEUE_BYTES: usize = 256 * 1024;
/// Bytes all the flows of a route queue toward their agents, at most.
const ROUTE_QUEUE_BYTES: usize = 16 << 20;
/// New flows per IPv4 /24 (IPv6 /48) per second, with a burst of as many.
pub(crate) const NEW_FLOWS_PER_PREFIX: Rate = Rate {
    count: std::num::NonZeroU32::new(64).expect("invariant: 64 is not zero"),
    per: Duration::from_secs(1),
};
/// Receive buffer requested for a route's socket: bursts of discovery traffic from many
/// clients at once.
const SOCKET_BUFFER: usize = 1 << 20;

/// The live flows of one route, by client address.
type Flows = Arc<Mutex<HashMap<SocketAddr, Flow>>>;

struct Flow {
    id: u64,
    to_agent: mpsc::Sender<Bytes>,
    /// Bytes queued toward the agent.
    queued: Arc<AtomicUsize>,
    /// Milliseconds since the route began serving at the flow's last datagram either way.
    last: Arc<AtomicU64>,
    /// Cancelled when the flow is evicted.
    evicted: CancellationToken,
    /// The flow's place on the route; given back when the flow leaves the table.
    _permit: Permit,
}

impl Flow {
    /// Queue `datagram` toward the agent if the flow's and the route's byte budgets take it;
    /// whether they did.
    fn offer(&self, datagram: Bytes, route_queued: &AtomicUsize) -> bool {
        let len = datagram.len();
        if self.queued.load(Ordering::Relaxed) + len > FLOW_QUEUE_BYTES
            || route_queued.load(Ordering::Relaxed) + len > ROUTE_QUEUE_BYTES
        {
            return false;
        }
        if self.to_agent.try_send(datagram).is_err() {
            return false;
        }
        self.queued.fetch_add(len, Ordering::Relaxed);
        route_queued.fetch_add(len, Ordering::Relaxed);
        true
    }
}

/// The state one route's flows share.
struct Route {
    /// Its flows, by client address.
    flows: Flows,
    /// Bytes queued by all its flows.
    queued: Arc<AtomicUsize>,
    /// When it began serving: flows' `last` counts from here.
    epoch: Instant,
}

/// Bind a route's UDP socket (an IPv6 wildcard serves IPv4 too).
pub(super) fn bind(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        let _ = socket.set_only_v6(false);
    }
    let _ = socket.set_recv_buffer_size(SOCKET_BUFFER);
    socket.bind(&addr.into())?;
    socket.set_nonblocking(true)?;
    UdpSocket::from_std(socket.into())
}

/// Receive a route's datagrams until the route is removed or the sentry stops.
pub(super) async fn serve(slot: Arc<RouteSlot>, socket: UdpSocket, shared: Arc<Shared>) {
    let socket = Arc::new(socket);
    let route = Arc::new(Route {
        flows: Arc::default(),
        queued: Arc::default(),
        epoch: clock::now(),
    });
    let per_prefix = CallRate::per_prefix(NEW_FLOWS_PER_PREFIX);
    let refusals_log = LogLimit::new(Duration::from_secs(10));
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut next_id = 0u64;
    loop {
        let received = tokio::select! {
            biased;
            () = slot.stop.cancelled() => return,
            received = socket.recv_from(&mut buf) => received,
        };
        let (n, client) = match received {
            Ok(received) => received,
            Err(e) => {
                if let Some(suppressed) = ACCEPT_LOG.allow() {
                    warn!(route = %slot.route.load().name, suppressed, "receiving a datagram failed: {e}");
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let datagram = Bytes::copy_from_slice(&buf[..n]);
        {
            let flows = lock(&route.flows);
            if let Some(flow) = flows.get(&client) {
                if flow.offer(datagram, &route.queued) {
                    flow.last
                        .store(millis_since(route.epoch), Ordering::Relaxed);
                } else {
                    slot.datagrams_dropped.fetch_add(1, Ordering::Relaxed);
                }
                continue;
            }
        }
        let now = clock::now() - shared.epoch;
        if !per_prefix.allow(now, client.ip(), 1) {
            slot.gate.count_refusal(Refusal::Rate);
            continue;
        }
        let admitted = match slot.gate.admit(now, client.ip()) {
            Err(Refusal::RouteFull | Refusal::SentryFull) if route.evict_quietest() => {
                slot.gate.admit(now, client.ip())
            }
            other => other,
        };
        match admitted {
            Ok(permit) => {
                let (to_agent, queued) = mpsc::channel(FLOW_QUEUE);
                next_id += 1;
                let flow = Flow {
                    id: next_id,
                    to_agent,
                    queued: Arc::default(),
                    last: Arc::new(AtomicU64::new(millis_since(route.epoch))),
                    evicted: CancellationToken::new(),
                    _permit: permit,
                };
                let _ = flow.offer(datagram, &route.queued);
                let task = FlowTask {
                    slot: slot.clone(),
                    socket: socket.clone(),
                    route: route.clone(),
                    client,
                    id: next_id,
                    queued_bytes: flow.queued.clone(),
                    last: flow.last.clone(),
                    evicted: flow.evicted.clone(),
                };
                lock(&route.flows).insert(client, flow);
                shared.relays.spawn(task.run(queued, shared.clone()));
            }
            Err(reason) => {
                if let Some(suppressed) = refusals_log.allow() {
                    info!(
                        route = %slot.route.load().name,
                        %client,
                        reason = reason.as_str(),
                        suppressed,
                        "UDP flow refused by admission control"
                    );
                }
            }
        }
    }
}

impl Route {
    /// Evict the flow that has been quiet the longest (its place is given back at once);
    /// whether there was one.
    fn evict_quietest(&self) -> bool {
        let mut flows = lock(&self.flows);
        let quietest = flows
            .iter()
            .min_by_key(|(_, f)| f.last.load(Ordering::Relaxed))
            .map(|(client, _)| *client);
        let Some(flow) = quietest.and_then(|c| flows.remove(&c)) else {
            return false;
        };
        drop(flows);
        flow.evicted.cancel();
        debug!(client = ?quietest, "UDP flow evicted for a new one: the route is full");
        true
    }
}

/// One client's flow.
struct FlowTask {
    slot: Arc<RouteSlot>,
    socket: Arc<UdpSocket>,
    route: Arc<Route>,
    client: SocketAddr,
    id: u64,
    queued_bytes: Arc<AtomicUsize>,
    last: Arc<AtomicU64>,
    evicted: CancellationToken,
}

impl FlowTask {
    async fn run(self, mut queued: mpsc::Receiver<Bytes>, shared: Arc<Shared>) {
        let route = self.slot.route.load_full();
        let client = self.client;
        let Some((agent, mut stream)) = connect_upstream(&shared, &route, client, None).await
        else {
            self.slot.no_upstream.fetch_add(1, Ordering::Relaxed);
            if let Some(suppressed) = NO_UPSTREAM_LOG.allow() {
                info!(route = %route.name, %client, suppressed, "no upstream available; UDP flow dropped");
            }
            self.forget(&mut queued);
            return;
        };
        let (start, last) = (self.route.epoch, &*self.last);
        let bytes = &self.slot.bytes;
        let (mut read, mut write) = stream.halves();
        let up = async {
            while let Some(datagram) = queued.recv().await {
                self.dequeued(datagram.len());
                write_datagram(&mut write, &datagram).await?;
                bytes.up.fetch_add(datagram.len() as u64, Ordering::Relaxed);
                last.store(millis_since(start), Ordering::Relaxed);
            }
            Ok::<_, std::io::Error>(())
        };
        let down = async {
            while let Some(datagram) = read_datagram(&mut read).await? {
                // A send that fails (the client's address unreachable) loses one datagram,
                // as UDP does.
                let _ = self.socket.send_to(&datagram, client).await;
                bytes
                    .down
                    .fetch_add(datagram.len() as u64, Ordering::Relaxed);
                last.store(millis_since(start), Ordering::Relaxed);
            }
            Ok::<_, std::io::Error>(())
        };
        let end = tokio::select! {
            result = up => result.err().map(|e| e.to_string()),
            result = down => result.err().map(|e| e.to_string()),
            () = idle_watch(start, last, route.idle_timeout) => None,
            () = self.evicted.cancelled() => None,
            () = self.slot.stop.cancelled() => None,
            () = shared.stop.cancelled() => None,
        };
        // Forgotten first: a datagram from this client from now on starts a new flow.
        self.forget(&mut queued);
        match &end {
            None => {
                let _ = tokio::time::timeout(Duration::from_secs(1), stream.shutdown()).await;
            }
            Some(_) => stream.abort(),
        }
        debug!(route = %route.name, %client, %agent, error = ?end, "UDP flow ended");
    }

    /// A datagram of `len` bytes left the queue.
    fn dequeued(&self, len: usize) {
        self.queued_bytes.fetch_sub(len, Ordering::Relaxed);
        self.route.queued.fetch_sub(len, Ordering::Relaxed);
    }

    /// Remove this flow from the table, unless a newer one for the client replaced it (or it
    /// was evicted), and give back what its queue still held.
    fn forget(&self, queued: &mut mpsc::Receiver<Bytes>) {
        {
            let mut flows = lock(&self.route.flows);
            if flows.get(&self.client).is_some_and(|f| f.id == self.id) {
                flows.remove(&self.client);
            }
        }
        // No datagram is queued after this: the sender left the table with the flow.
        queued.close();
        while let Ok(datagram) = queued.try_recv() {
            self.dequeued(datagram.len());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admission::{Gate, SentryCount};
    use crate::config::Limits;

    fn flow(gate: &Arc<Gate>) -> (Flow, mpsc::Receiver<Bytes>) {
        let permit = gate
            .admit(Duration::ZERO, "203.0.113.1".parse().unwrap())
            .unwrap();
        let (to_agent, queued) = mpsc::channel(FLOW_QUEUE);
        let flow = Flow {
            id: 1,
            to_agent,
            queued: Arc::default(),
            last: Arc::default(),
            evicted: CancellationToken::new(),
            _permit: permit,
        };
        (flow, queued)
    }

    /// A flow queues at most its byte budget, and all the flows of a route at most the
    /// route's: large datagrams from many flows cannot make a slow tunnel hold more.
    #[test]
    fn queues_are_bounded_in_bytes_per_flow_and_per_route() {
        let gate = Gate::new(
            Limits {
                max_connections_per_ip: 1000,
                connect_rate_per_ip: crate::config::units::parse_rate("100000/s").unwrap(),
                ..Limits::default()
            },
            SentryCount::new(100_000),
        );
        let route = AtomicUsize::new(0);
        let big = Bytes::from(vec![0u8; 60_000]);
        let (one, _rx) = flow(&gate);
        let taken = (0..10).filter(|_| one.offer(big.clone(), &route)).count();
        assert_eq!(taken, FLOW_QUEUE_BYTES / 60_000, "a flow's byte budget");
        assert!(one.queued.load(Ordering::Relaxed) <= FLOW_QUEUE_BYTES);
        // Many flows: the route's budget holds.
        let mut held = Vec::new();
        for _ in 0..200 {
            let (f, rx) = flow(&gate);
            while f.offer(big.clone(), &route) {}
            held.push((f, rx));
        }
        assert!(route.load(Ordering::Relaxed) <= ROUTE_QUEUE_BYTES);
        assert!(route.load(Ordering::Relaxed) > ROUTE_QUEUE_BYTES - 60_000);
    }
}

//! UDP routes (`protocol = "udp"`): each client address is a flow, relayed to an agent's `udp`
//! service over a tunnel stream of its own (see [`crate::relay::datagram`]).
//!
//! - A datagram from an address with no flow passes admission control like a TCP connection
//!   (allow/deny, `max_connections_per_ip` as flows per address, `connect_rate_per_ip` as new
//!   flows per second, the route's and the sentry's caps); a refused one is dropped unanswered.
//! - An admitted flow holds its permit until it ends: after `idle_timeout` with no datagram
//!   either way, when the tunnel stream fails, when the route is removed, or at shutdown.
//! - Datagrams wait for the upstream in a short queue per flow; past it they are dropped and
//!   counted, as a router drops: a slow tunnel never grows memory.
//! - Replies go back from the route's own socket to the flow's client address, and only there.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::AsyncWriteExt;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::{ACCEPT_LOG, NO_UPSTREAM_LOG, RouteSlot, Shared, connect_upstream};
use crate::admission::Permit;
use crate::log_limit::LogLimit;
use crate::relay::datagram::{MAX_DATAGRAM, read_datagram, write_datagram};
use crate::relay::{idle_watch, millis_since};
use crate::{clock, lock};

/// Datagrams a flow queues toward its agent (while the upstream connects, or while the tunnel
/// is slower than the client); more are dropped.
const FLOW_QUEUE: usize = 64;
/// Receive buffer requested for a route's socket: bursts of discovery traffic from many
/// clients at once.
const SOCKET_BUFFER: usize = 1 << 20;

/// The live flows of one route, by client address.
type Flows = Arc<Mutex<HashMap<SocketAddr, Flow>>>;

struct Flow {
    id: u64,
    to_agent: mpsc::Sender<Bytes>,
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
    let flows: Flows = Arc::default();
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
        let known = lock(&flows).get(&client).map(|f| f.to_agent.clone());
        if let Some(to_agent) = known {
            if to_agent.try_send(datagram).is_err() {
                slot.datagrams_dropped.fetch_add(1, Ordering::Relaxed);
            }
            continue;
        }
        match slot.gate.admit(clock::now() - shared.epoch, client.ip()) {
            Ok(permit) => {
                let (to_agent, queued) = mpsc::channel(FLOW_QUEUE);
                let _ = to_agent.try_send(datagram);
                next_id += 1;
                lock(&flows).insert(
                    client,
                    Flow {
                        id: next_id,
                        to_agent,
                    },
                );
                let flow = FlowTask {
                    slot: slot.clone(),
                    socket: socket.clone(),
                    flows: flows.clone(),
                    client,
                    id: next_id,
                    _permit: permit,
                };
                shared.relays.spawn(flow.run(queued, shared.clone()));
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

/// One client's flow.
struct FlowTask {
    slot: Arc<RouteSlot>,
    socket: Arc<UdpSocket>,
    flows: Flows,
    client: SocketAddr,
    id: u64,
    // Held for the flow's life; gives its place back when dropped.
    _permit: Permit,
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
            self.forget();
            return;
        };
        let start = clock::now();
        let last = AtomicU64::new(0);
        let bytes = &self.slot.bytes;
        let (mut read, mut write) = stream.halves();
        let up = async {
            while let Some(datagram) = queued.recv().await {
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
            () = idle_watch(start, &last, route.idle_timeout) => None,
            () = self.slot.stop.cancelled() => None,
            () = shared.stop.cancelled() => None,
        };
        // Forgotten first: a datagram from this client from now on starts a new flow.
        self.forget();
        match &end {
            None => {
                let _ = tokio::time::timeout(Duration::from_secs(1), stream.shutdown()).await;
            }
            Some(_) => stream.abort(),
        }
        debug!(route = %route.name, %client, %agent, error = ?end, "UDP flow ended");
    }

    /// Remove this flow from the table, unless a newer one for the client replaced it.
    fn forget(&self) {
        let mut flows = lock(&self.flows);
        if flows.get(&self.client).is_some_and(|f| f.id == self.id) {
            flows.remove(&self.client);
        }
    }
}

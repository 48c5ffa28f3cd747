//! A UDP delay line: a link with a fixed one-way delay, in userspace, on loopback. The kernel
//! here has no `sch_netem`, and a tunnel's behaviour across a WAN (windows against
//! bandwidth × delay) cannot be seen without one.
//!
//! The agent dials the line's address instead of the sentry's; each datagram leaves the other
//! side `one_way` after it arrived, in order. Like a router, the line holds a bounded queue
//! ([`QUEUE`] datagrams each way) and drops what does not fit. Its clock is tokio's timer, so
//! datagrams leave in 1 ms batches: a link with up to 1 ms of jitter.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Datagrams queued each way at most: 16 384 × 1.4 KB is 22 MB, over 2 Gbit/s × 40 ms.
pub const QUEUE: usize = 16_384;
/// Socket buffers of the line's two sockets (the kernel's default drops bursts): 32 MiB,
/// more than [`QUEUE`] holds.
const SOCKET_BUFFER: usize = 32 << 20;

/// Start a delay line in front of `target` (a UDP listener on loopback); returns the address
/// to dial. It serves one peer: the source of the last datagram from the front.
///
/// # Panics
/// A loopback socket cannot be bound.
pub async fn delay_line(target: SocketAddr, one_way: Duration) -> SocketAddr {
    let front = Arc::new(socket("127.0.0.1:0".parse().expect("address")));
    let back = Arc::new(socket("127.0.0.1:0".parse().expect("address")));
    back.connect(target).await.expect("connect the delay line");
    let addr = front.local_addr().expect("address");
    let peer: Arc<Mutex<Option<SocketAddr>>> = Arc::default();
    let (up_tx, up_rx) = mpsc::channel(QUEUE);
    let (down_tx, down_rx) = mpsc::channel(QUEUE);
    // Front to back: the peer's datagrams to the target.
    let (from, learned) = (front.clone(), peer.clone());
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65_536];
        while let Ok((n, source)) = from.recv_from(&mut buf).await {
            *learned.lock().expect("peer") = Some(source);
            // Full: dropped, as a router's queue drops.
            let _ = up_tx.try_send((
                Instant::from_std(relay_core::clock::now()) + one_way,
                buf[..n].to_vec(),
            ));
        }
    });
    tokio::spawn(release(up_rx, back.clone(), None));
    // Back to front: the target's answers to the peer.
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65_536];
        while let Ok(n) = back.recv(&mut buf).await {
            let _ = down_tx.try_send((
                Instant::from_std(relay_core::clock::now()) + one_way,
                buf[..n].to_vec(),
            ));
        }
    });
    tokio::spawn(release(down_rx, front, Some(peer)));
    addr
}

/// Send each queued datagram once it is due: on the connected socket, or to the peer.
async fn release(
    mut queue: mpsc::Receiver<(Instant, Vec<u8>)>,
    out: Arc<UdpSocket>,
    peer: Option<Arc<Mutex<Option<SocketAddr>>>>,
) {
    while let Some((due, datagram)) = queue.recv().await {
        tokio::time::sleep_until(due).await;
        let sent = match &peer {
            None => out.send(&datagram).await,
            Some(peer) => {
                let to = *peer.lock().expect("peer");
                match to {
                    Some(to) => out.send_to(&datagram, to).await,
                    None => continue,
                }
            }
        };
        // A refused send (nobody listening yet) loses the datagram, as a link would.
        drop(sent);
    }
}

fn socket(bind: SocketAddr) -> UdpSocket {
    let socket = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )
    .expect("udp socket");
    // As root, past `net.core.rmem_max`: the line's queue is [`QUEUE`], and a burst must not
    // be dropped by its socket before it is queued (with 4 MiB it was, at 40 ms with
    // 16 MiB windows, and one stream in three collapsed to a fifth of its rate).
    if rustix::net::sockopt::set_socket_recv_buffer_size_force(&socket, SOCKET_BUFFER).is_err() {
        let _ = socket.set_recv_buffer_size(SOCKET_BUFFER);
    }
    if rustix::net::sockopt::set_socket_send_buffer_size_force(&socket, SOCKET_BUFFER).is_err() {
        let _ = socket.set_send_buffer_size(SOCKET_BUFFER);
    }
    socket.set_nonblocking(true).expect("nonblocking");
    socket.bind(&bind.into()).expect("bind the delay line");
    UdpSocket::from_std(socket.into()).expect("tokio socket")
}

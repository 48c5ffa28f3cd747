//! The device's tasks: the UDP socket read loop, routing each datagram to its peer, and the
//! timers.

use std::io::IoSliceMut;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::{Packet, Tunn, TunnResult};
use quinn::udp::{RecvMeta, UdpSockRef};
use smoltcp::socket::tcp;
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tracing::{debug, warn};

use super::stack::is_syn_to;
use super::{
    BATCH, DATAGRAM, Inner, MTU, NOISE_TICK, OverlayStream, Peer, PeerState, RECV_SLOTS,
    RELAY_PORT, SOCKET_BUFFER,
};
use crate::{clock, lock};

pub(super) fn bind_udp(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        let _ = socket.set_only_v6(false);
    }
    let _ = socket.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = socket.set_send_buffer_size(SOCKET_BUFFER);
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    UdpSocket::from_std(socket.into())
}

/// Which peer a datagram is for, after the checks that cost no Diffie-Hellman (and, for a
/// handshake initiation, the one that does). `None`: drop it silently.
pub(super) fn route(
    inner: &Inner,
    datagram: &[u8],
    src: SocketAddr,
    cookie: &mut [u8],
) -> Option<Arc<Peer>> {
    let table = inner.peers.load();
    match Tunn::parse_incoming_packet(datagram).ok()? {
        Packet::HandshakeInit(init) => {
            match inner
                .limiter
                .verify_packet(Some(src.ip()), datagram, cookie)
            {
                Ok(_) => {}
                Err(TunnResult::WriteToNetwork(reply)) => {
                    // Under load: prove your address first (the MAC was valid).
                    let _ = inner.udp.try_send_to(reply, src);
                    return None;
                }
                Err(_) => return None,
            }
            let half = parse_handshake_anon(&inner.secret, &inner.public, &init).ok()?;
            table.by_key.get(&half.peer_static_public).cloned()
        }
        Packet::HandshakeResponse(p) => table.by_index.get(&(p.receiver_idx >> 8)).cloned(),
        Packet::PacketCookieReply(p) => table.by_index.get(&(p.receiver_idx >> 8)).cloned(),
        Packet::PacketData(p) => table.by_index.get(&(p.receiver_idx >> 8)).cloned(),
    }
}

/// Decrypt one datagram into the peer's receive queue. Returns whether it authenticated.
pub(super) fn ingest(
    state: &mut PeerState,
    peer: &Peer,
    src: SocketAddr,
    datagram: &[u8],
    out: &mut [u8],
    now: Instant,
) -> bool {
    let link = &mut state.link;
    let wire = &mut link.wire;
    // Whether a session both ends may send on is established: the peer sent data (a
    // keepalive included), or answered our handshake initiation (we answer with a keepalive,
    // type 4). Answering the peer's initiation (with a response, type 2) is not enough: as
    // the responder we may not send until its first data arrives, and boringtun holds back
    // what we send meanwhile and starts a handshake of its own.
    let mut confirmed = false;
    let authenticated = match wire.tunn.decapsulate(Some(src.ip()), datagram, out) {
        TunnResult::WriteToNetwork(reply) => {
            confirmed = reply.first() == Some(&4);
            // A cookie reply (type 3) is sent before anything is authenticated.
            let cookie = reply.first() == Some(&3);
            let _ = wire.udp.try_send_to(reply, src);
            if !cookie {
                state.handshakes += 1;
                // Packets queued while the handshake ran.
                while let TunnResult::WriteToNetwork(queued) = wire.tunn.decapsulate(None, &[], out)
                {
                    let _ = wire.udp.try_send_to(queued, src);
                }
            }
            !cookie
        }
        TunnResult::WriteToTunnelV4(packet, source) => {
            confirmed = true;
            if source == peer.spec.address && link.rx.len() < BATCH * 2 {
                let syn = peer.spec.accept && is_syn_to(packet, RELAY_PORT);
                let mut buf = link.free.pop().unwrap_or_default();
                buf.clear();
                buf.extend_from_slice(packet);
                link.rx.push_back(buf);
                if syn {
                    // A listener must wait before any poll sees the SYN (a stream's read or
                    // write may run the stack before this batch ends); without one the stack
                    // would answer with a reset.
                    state.listen_for_syns(peer.local);
                }
            }
            true
        }
        TunnResult::WriteToTunnelV6(..) => {
            confirmed = true;
            true
        }
        TunnResult::Done => {
            // A keepalive (data, type 4), or a cookie reply.
            confirmed = datagram.first() == Some(&4);
            true
        }
        TunnResult::Err(e) => {
            debug!(peer = %peer.spec.name, %src, "dropped a datagram: {e:?}");
            false
        }
    };
    if authenticated {
        let link = &mut state.link;
        if link.wire.endpoint != Some(src) {
            debug!(peer = %peer.spec.name, %src, "peer endpoint");
            link.wire.endpoint = Some(src);
        }
        state.last_rx = Some(now);
        if confirmed {
            state.last_confirmed = Some(now);
        }
    }
    authenticated
}

/// After a batch: run the peer's stack, hand over accepted streams, report it up.
pub(super) fn after_batch(inner: &Inner, peer: &Arc<Peer>, now: Instant) {
    let (wake, accepted, came_up) = {
        let mut state = lock(&peer.state);
        let wake = state.poll(peer.epoch, now);
        if state.measuring.is_some() && state.link_rtt().is_some() {
            state.measuring = None;
            peer.measured.notify_waiters();
        }
        let accepted = if peer.spec.accept {
            state.take_accepted()
        } else {
            Vec::new()
        };
        // Up once a session is confirmed (see `ingest`), not when the peer's first handshake
        // initiation arrives: a stream opened then waited for the peer's next packet (a plain
        // peer's handshake retry: 5 s).
        let came_up = !state.up
            && state
                .last_confirmed
                .is_some_and(|t| now.duration_since(t) < peer.spec.liveness);
        if came_up {
            state.up = true;
            state.measure_rtt();
        }
        (wake, accepted, came_up)
    };
    if wake {
        peer.timer.notify_one();
    }
    for handle in accepted {
        let stream = OverlayStream::accepted(peer.clone(), handle);
        let queued = peer
            .accept_tx
            .as_ref()
            .is_some_and(|tx| match tx.try_send(stream) {
                Ok(()) => true,
                Err(e) => {
                    // Nobody takes streams fast enough: refuse this one (dropping resets it).
                    drop(e);
                    false
                }
            });
        if !queued {
            debug!(peer = %peer.spec.name, "accept queue full; stream reset");
        }
    }
    if came_up {
        (inner.events)(peer, true);
    }
}

pub(super) async fn read_loop(inner: Arc<Inner>) {
    let mut buffers = vec![0u8; RECV_SLOTS * DATAGRAM];
    let mut metas = [RecvMeta::default(); RECV_SLOTS];
    let mut out = vec![0u8; DATAGRAM];
    let mut cookie = [0u8; 64];
    let mut touched: Vec<Arc<Peer>> = Vec::new();
    loop {
        tokio::select! {
            () = inner.stop.cancelled() => return,
            ready = inner.udp.readable() => if let Err(e) = ready {
                warn!("WireGuard socket failed: {e}");
                return;
            },
        }
        let now = clock::now();
        // A bounded amount of work per wake-up, so one busy socket cannot starve the rest.
        for _ in 0..BATCH / RECV_SLOTS {
            let received = {
                let mut slices: Vec<IoSliceMut<'_>> =
                    buffers.chunks_mut(DATAGRAM).map(IoSliceMut::new).collect();
                inner.udp.try_io(Interest::READABLE, || {
                    inner
                        .udp_state
                        .recv(UdpSockRef::from(&*inner.udp), &mut slices, &mut metas)
                })
            };
            let count = match received {
                Ok(count) => count,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    debug!("WireGuard receive: {e}");
                    break;
                }
            };
            for (slot, meta) in metas.iter().take(count).enumerate() {
                let start = slot * DATAGRAM;
                let filled = &buffers[start..start + meta.len.min(DATAGRAM)];
                // A GRO aggregate carries datagrams of `stride` bytes (the last may be shorter).
                for data in filled.chunks(meta.stride.max(1)) {
                    let src = meta.addr;
                    let Some(peer) = route(&inner, data, src, &mut cookie) else {
                        inner.dropped.fetch_add(1, Ordering::Relaxed);
                        continue;
                    };
                    let queued = {
                        let mut state = lock(&peer.state);
                        if !ingest(&mut state, &peer, src, data, &mut out, now) {
                            inner.dropped.fetch_add(1, Ordering::Relaxed);
                        }
                        state.link.rx.len()
                    };
                    if queued >= BATCH {
                        // Run the stack before its queue overflows.
                        after_batch(&inner, &peer, now);
                    }
                    if !touched.iter().any(|p| Arc::ptr_eq(p, &peer)) {
                        touched.push(peer);
                    }
                }
            }
        }
        for peer in touched.drain(..) {
            after_batch(&inner, &peer, now);
        }
    }
}

pub(super) async fn limiter_loop(inner: Arc<Inner>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            () = inner.stop.cancelled() => return,
            _ = tick.tick() => inner.limiter.reset_count(),
        }
    }
}

/// Noise timers and the stack's deadlines for one peer, until the peer is removed.
pub(super) async fn timer_loop(inner: Arc<Inner>, peer: Arc<Peer>) {
    let mut next_noise = clock::now();
    let mut out = vec![0u8; MTU + 64];
    // A peer this device dials (an agent toward its sentry) starts the handshake at once;
    // boringtun's timers alone would wait for the first persistent keepalive (5 s). Sent with
    // an awaited send: a socket this fresh has no known readiness yet, and `try_send_to`
    // would drop the datagram.
    let first = {
        let mut state = lock(&peer.state);
        let wire = &mut state.link.wire;
        match (
            wire.endpoint,
            wire.tunn.format_handshake_initiation(&mut out, false),
        ) {
            (Some(endpoint), TunnResult::WriteToNetwork(datagram)) => {
                Some((endpoint, datagram.to_vec(), wire.udp.clone()))
            }
            _ => None,
        }
    };
    if let Some((endpoint, datagram, udp)) = first {
        let _ = udp.send_to(&datagram, endpoint).await;
    }
    loop {
        let now = clock::now();
        let (sleep, went_down, stalled) = {
            let mut state = lock(&peer.state);
            if now >= next_noise {
                next_noise = now + NOISE_TICK;
                let wire = &mut state.link.wire;
                match wire.tunn.update_timers(&mut out) {
                    TunnResult::WriteToNetwork(datagram) => {
                        if let Some(endpoint) = wire.endpoint {
                            let _ = wire.udp.try_send_to(datagram, endpoint);
                        }
                    }
                    TunnResult::Err(WireGuardError::ConnectionExpired) => {}
                    TunnResult::Err(e) => debug!(peer = %peer.spec.name, "noise timers: {e:?}"),
                    _ => {}
                }
                state.unstick();
            }
            if state.link.wire.stalled {
                state.link.wire.flush();
            }
            state.deadline = next_noise;
            state.poll(peer.epoch, now);
            let went_down = state.up
                && state
                    .last_rx
                    .is_none_or(|t| now.duration_since(t) >= peer.spec.liveness);
            if went_down {
                state.up = false;
            }
            (
                state.deadline.saturating_duration_since(now),
                went_down,
                state.link.wire.stalled,
            )
        };
        if went_down {
            (inner.events)(&peer, false);
        }
        // Stalled: the stack's deadline may be now (it has segments to send), so wait for the
        // socket instead of spinning; the noise timers run again once it is writable.
        tokio::select! {
            () = peer.stop.cancelled() => break,
            () = tokio::time::sleep(sleep), if !stalled => {}
            _ = inner.udp.writable(), if stalled => {}
            () = peer.timer.notified() => {
                // A stream asked for the stack (see `PeerState::defer_poll`): let the other
                // tasks ready now move their bytes first, then run it once for all of them.
                if lock(&peer.state).pending {
                    tokio::task::yield_now().await;
                }
            }
        }
    }
    // Removed: reset what is open so owners see an error instead of a silent stream.
    let mut state = lock(&peer.state);
    let handles: Vec<_> = state.sockets.iter().map(|(h, _)| h).collect();
    for handle in handles {
        state.sockets.get_mut::<tcp::Socket<'_>>(handle).abort();
    }
    state.poll(peer.epoch, clock::now());
    drop(state);
    if lock(&peer.state).up {
        lock(&peer.state).up = false;
        (inner.events)(&peer, false);
    }
}

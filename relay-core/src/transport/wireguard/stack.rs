//! A peer's TCP/IP stack: polling smoltcp, its sockets' life (listen, accept, close, reap)
//! and the round trip it measures.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use boringtun::noise::TunnResult;
use smoltcp::iface::SocketHandle;
use smoltcp::socket::tcp;

use super::{
    ACK_EVERY, EPHEMERAL, MAX_STREAMS, MEASURE_WAIT, PeerState, RELAY_PORT, RTT_FLOOR_AGE,
    SOCKETS_PER_PASS, SPARE_BUDGET, SPARE_SOCKETS, Window,
};
use crate::clock;

impl PeerState {
    /// Run the stack: deliver queued packets, send what is due. Returns whether the timer
    /// must be woken (its deadline moved earlier).
    pub(super) fn poll(&mut self, epoch: Instant, now: Instant) -> bool {
        self.pending = false;
        let at = stamp(epoch, now);
        // `Interface::poll`, with the receive windows aligned between ingress and egress.
        self.iface.poll_maintenance(at);
        // Acknowledgments leave after every few segments taken in, not once per batch (see
        // [`ACK_EVERY`]); each pass walks every socket, so more sockets make longer chunks.
        let chunk = ACK_EVERY.max(self.sockets.iter().count() / SOCKETS_PER_PASS);
        loop {
            let mut taken = 0;
            while taken < chunk
                && self
                    .iface
                    .poll_ingress_single(at, &mut self.link, &mut self.sockets)
                    != smoltcp::iface::PollIngressSingleResult::None
            {
                taken += 1;
            }
            self.align_windows();
            self.close_drained();
            while self
                .iface
                .poll_egress(at, &mut self.link, &mut self.sockets)
                != smoltcp::iface::PollResult::None
            {}
            if taken < chunk {
                break;
            }
        }
        self.link.wire.flush();
        // Closed streams leave at once: every poll walks every socket, and a spare socket
        // saves the next stream its buffers.
        self.reap(now);
        match self.iface.poll_delay(at, &self.sockets) {
            Some(delay) => {
                let due = now + Duration::from(delay);
                if due < self.deadline {
                    self.deadline = due;
                    return true;
                }
                false
            }
            None => false,
        }
    }

    /// The round trip to the peer that windows are sized from: the least one measured by the
    /// streams this end opened lately, else the last noise handshake this end initiated
    /// (milliseconds, rounded down).
    pub(super) fn link_rtt(&self) -> Option<Duration> {
        let (_, _, _, _, handshake) = self.link.wire.tunn.stats();
        self.rtt_floor
            .map(|(floor, _)| floor)
            .or_else(|| handshake.map(|ms| Duration::from_millis(u64::from(ms))))
    }

    /// A stream wrote, read, closed or opened: the stack must run, but not here. The peer's
    /// timer task runs it once the tasks ready now have had their turn, so what many streams
    /// did in one round of the scheduler leaves in one pass: their segments in one send (GSO),
    /// instead of one `sendmsg` and one walk over every socket per stream. Returns whether the
    /// timer task must be woken (it is not yet due to run the stack).
    pub(super) fn defer_poll(&mut self) -> bool {
        !std::mem::replace(&mut self.pending, true)
    }

    /// Start one handshake of our own when the peer came up and this end knows no round trip
    /// to it: a sentry answers its agents' handshakes and learns none there, and its first
    /// stream would get the short round trip's window. The handshake's answer measures it
    /// (a new session; the peer keeps the old one's packets coming meanwhile).
    pub(super) fn measure_rtt(&mut self) {
        if self.window != Window::Auto || self.link_rtt().is_some() {
            return;
        }
        let Some(endpoint) = self.link.wire.endpoint else {
            return;
        };
        let mut out = [0u8; 256];
        if let TunnResult::WriteToNetwork(datagram) = self
            .link
            .wire
            .tunn
            .format_handshake_initiation(&mut out, false)
            && self.link.wire.udp.try_send_to(datagram, endpoint).is_ok()
        {
            self.measuring = Some(clock::now());
        }
    }

    /// Whether a new stream should wait for the round trip: it is being measured, for less
    /// than [`MEASURE_WAIT`]. Clears the measurement once done; returns `None` then.
    pub(super) fn awaiting_rtt(&mut self, now: Instant) -> Option<Instant> {
        let started = self.measuring?;
        if self.link_rtt().is_some() || now.duration_since(started) >= MEASURE_WAIT {
            self.measuring = None;
            return None;
        }
        Some(started + MEASURE_WAIT)
    }

    /// A socket for a new stream: a spare one of the right size when there is one (see
    /// [`SPARE_SOCKETS`]), else a new one with its buffers (and a spare of another size, if
    /// any, is let go: the window moved with the round trip).
    pub(super) fn new_socket(&mut self) -> tcp::Socket<'static> {
        let window = self.stream_window();
        let fits = self.spare.iter().position(|s| s.recv_capacity() == window);
        let mut socket = match fits {
            Some(i) => self.spare.swap_remove(i),
            None => {
                self.spare.pop();
                tcp::Socket::new(
                    tcp::SocketBuffer::new(vec![0; window]),
                    tcp::SocketBuffer::new(vec![0; window]),
                )
            }
        };
        // `connect` and `listen` reset a socket's connection state, not these: set them all,
        // so a spare socket starts as a new one does (a fresh congestion controller too).
        socket.set_nagle_enabled(false);
        socket.set_congestion_control(tcp::CongestionControl::Cubic);
        // No timeout while idle: smoltcp's counts from the peer's last packet, which would
        // reset a quiet connection (a validator's P2P link may be silent for minutes). The
        // timer sets one while the stream has data to send (see `unstick`).
        socket.set_timeout(None);
        socket.set_keep_alive(None);
        socket
    }

    /// Ensure a listener waits for each connection request in the receive queue.
    pub(super) fn listen_for_syns(&mut self, local: Ipv4Addr) {
        let syns = self
            .link
            .rx
            .iter()
            .filter(|p| is_syn_to(p, RELAY_PORT))
            .count();
        let idle = self
            .listeners
            .iter()
            .filter(|h| self.sockets.get::<tcp::Socket<'_>>(**h).state() == tcp::State::Listen)
            .count();
        for _ in idle..syns {
            if self.streams + self.listeners.len() >= MAX_STREAMS {
                break;
            }
            let mut socket = self.new_socket();
            if socket
                .listen((smoltcp::wire::IpAddress::Ipv4(local), RELAY_PORT))
                .is_ok()
            {
                self.listeners.push(self.sockets.add(socket));
            }
        }
    }

    /// Listeners that took a connection: handed to the accept queue.
    pub(super) fn take_accepted(&mut self) -> Vec<SocketHandle> {
        let mut taken = Vec::new();
        let sockets = &self.sockets;
        self.listeners.retain(|h| {
            let state = sockets.get::<tcp::Socket<'_>>(*h).state();
            if state == tcp::State::Listen {
                true
            } else {
                taken.push(*h);
                false
            }
        });
        self.streams += taken.len();
        taken
    }

    /// Close a stream's sending side: its FIN follows the bytes queued before it.
    ///
    /// When the peer has already sent its own FIN (CLOSE-WAIT) and bytes are still queued, the
    /// FIN waits until the peer acknowledged them all. smoltcp (0.14) in LAST-ACK, the state
    /// `close` moves such a socket to, answers every acknowledgment that does not cover new
    /// bytes with a challenge ACK and takes nothing else from it, not even the window. So a
    /// stream whose peer's window was zero, or whose bytes were lost, never learns that the
    /// window reopened and never resends them: it probes the closed window until the linger
    /// deadline resets it, and the far end sees its bytes cut short. Measured before this: one
    /// `an_echo_resumes_after_both_directions_fill_up` in about six lost 1-2 MiB that way.
    /// In CLOSE-WAIT the same acknowledgments are taken as usual (window update, duplicate
    /// ACKs, fast retransmit).
    pub(super) fn close(&mut self, handle: SocketHandle) {
        let socket = self.sockets.get_mut::<tcp::Socket<'_>>(handle);
        if socket.state() == tcp::State::CloseWait && socket.send_queue() > 0 {
            if !self.closing.contains(&handle) {
                self.closing.push(handle);
            }
        } else {
            socket.close();
        }
    }

    /// Send the FINs that [`PeerState::close`] held back, once their bytes are acknowledged.
    pub(super) fn close_drained(&mut self) {
        let sockets = &mut self.sockets;
        self.closing.retain(|&handle| {
            let socket = sockets.get_mut::<tcp::Socket<'_>>(handle);
            if socket.state() != tcp::State::CloseWait {
                return false;
            }
            if socket.send_queue() > 0 {
                return true;
            }
            socket.close();
            false
        });
    }

    /// Remove orphans that finished closing; reset those that lingered too long (the reset
    /// goes out at the next poll, and the socket is removed on the next pass).
    pub(super) fn reap(&mut self, now: Instant) {
        let mut i = 0;
        while i < self.orphans.len() {
            let (handle, until) = self.orphans[i];
            let socket = self.sockets.get_mut::<tcp::Socket<'_>>(handle);
            if matches!(socket.state(), tcp::State::Closed | tcp::State::TimeWait) {
                self.release(handle);
                self.orphans.swap_remove(i);
                continue;
            }
            if now >= until {
                socket.abort();
            }
            i += 1;
        }
    }

    /// One round trip measured by a stream's setup: folded into the smoothed value as TCP
    /// does (RFC 6298: 7/8 old, 1/8 new), and into the floor windows are sized from.
    pub(super) fn observe_rtt(&mut self, sample: Duration, now: Instant) {
        self.rtt_floor = Some(match self.rtt_floor {
            Some((floor, at)) if floor <= sample && now.duration_since(at) < RTT_FLOOR_AGE => {
                (floor, at)
            }
            _ => (sample, now),
        });
        self.rtt = Some(match self.rtt {
            Some(smoothed) => (smoothed * 7 + sample) / 8,
            None => sample,
        });
    }

    /// Forget a stream's socket.
    pub(super) fn release(&mut self, handle: SocketHandle) {
        let socket = self.sockets.remove(handle);
        let spare_bytes: usize = self
            .spare
            .iter()
            .map(|s| s.recv_capacity() + s.send_capacity())
            .sum();
        if self.spare.len() < SPARE_SOCKETS
            && let smoltcp::socket::Socket::Tcp(socket) = socket
            && !socket.is_open()
            && spare_bytes + socket.recv_capacity() + socket.send_capacity() <= SPARE_BUDGET
        {
            self.spare.push(socket);
        }
        self.stash.remove(&handle);
        self.closing.retain(|&h| h != handle);
        if let Some(port) = self.port_of.remove(&handle) {
            self.ports.remove(&port);
        }
        self.streams = self.streams.saturating_sub(1);
    }

    pub(super) fn alloc_port(&mut self) -> Option<u16> {
        let span = u32::from(EPHEMERAL.end() - EPHEMERAL.start()) + 1;
        for _ in 0..span {
            let port = self.next_port;
            self.next_port = if port >= *EPHEMERAL.end() {
                *EPHEMERAL.start()
            } else {
                port + 1
            };
            // RELAY_PORT is inside the ephemeral range, and both ends may listen on it (the
            // sentry for egress): never a local port of a stream, so only new streams reach it.
            if port != RELAY_PORT && !self.ports.contains_key(&port) {
                return Some(port);
            }
        }
        None
    }
}

/// smoltcp's clock: microseconds since the device started.
pub(super) fn stamp(epoch: Instant, now: Instant) -> smoltcp::time::Instant {
    let micros = now.saturating_duration_since(epoch).as_micros();
    smoltcp::time::Instant::from_micros(i64::try_from(micros).unwrap_or(i64::MAX))
}

/// A TCP SYN (without ACK) to `port` in an IPv4 packet.
pub(super) fn is_syn_to(packet: &[u8], port: u16) -> bool {
    if packet.len() < 20 || packet[0] >> 4 != 4 || packet[9] != 6 {
        return false;
    }
    let ihl = usize::from(packet[0] & 0x0f) * 4;
    let Some(tcp) = packet.get(ihl..ihl + 14) else {
        return false;
    };
    let dst = u16::from_be_bytes([tcp[2], tcp[3]]);
    let flags = tcp[13];
    dst == port && flags & 0x02 != 0 && flags & 0x10 == 0
}

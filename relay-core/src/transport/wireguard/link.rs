//! The smoltcp device of a peer: decrypted packets in, packets out through its noise
//! session, batched for one send.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;

use boringtun::noise::{Tunn, TunnResult};
use quinn::udp::{Transmit, UdpSockRef, UdpSocketState};
use smoltcp::phy::{self, Checksum, ChecksumCapabilities, DeviceCapabilities, Medium};
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tracing::debug;

use super::{BATCH, MAX_GSO_BYTES, MAX_SEGMENTS, MTU};

/// The smoltcp device: decrypted packets in, packets out through the noise session.
pub(super) struct Link {
    pub(super) wire: Wire,
    pub(super) rx: VecDeque<Vec<u8>>,
    pub(super) rx_current: Vec<u8>,
    pub(super) free: Vec<Vec<u8>>,
}

/// What sending needs, apart from the receive queue (so smoltcp can hold a receive and a
/// transmit token at once).
pub(super) struct Wire {
    pub(super) tunn: Tunn,
    pub(super) udp: Arc<UdpSocket>,
    pub(super) udp_state: Arc<UdpSocketState>,
    pub(super) endpoint: Option<SocketAddr>,
    pub(super) plain: Vec<u8>,
    pub(super) sealed: Vec<u8>,
    /// Sealed datagrams waiting to leave in one send: equal sizes except the last (GSO).
    pub(super) batch: Vec<u8>,
    pub(super) batch_segment: usize,
    pub(super) batch_count: usize,
    pub(super) batch_to: Option<SocketAddr>,
    /// The last datagram was shorter than the segment size: nothing may follow it.
    pub(super) batch_closed: bool,
    /// The socket's send buffer was full at the last flush: the batch is kept for a retry once
    /// the socket is writable, and the stack is given no transmit token meanwhile (so its
    /// segments wait in their sockets instead of being lost and retransmitted on a timer).
    pub(super) stalled: bool,
    pub(super) tx_dropped: u64,
    /// What the tests check of the segments sent (see [`super::tests::Edges`]).
    #[cfg(test)]
    pub(super) edges: super::tests::Edges,
}

impl Wire {
    /// Encrypt one IP packet into the send batch for the peer's endpoint (dropped when none
    /// is known: TCP retransmits). The batch leaves at [`Wire::flush`], at the latest when the
    /// stack's poll ends.
    pub(super) fn send_packet(&mut self, len: usize) {
        let sealed = match self.tunn.encapsulate(&self.plain[..len], &mut self.sealed) {
            TunnResult::WriteToNetwork(datagram) => datagram.len(),
            TunnResult::Err(e) => {
                debug!("encapsulate: {e:?}");
                return;
            }
            _ => return,
        };
        let Some(to) = self.endpoint else {
            self.tx_dropped += 1;
            return;
        };
        let max = self.udp_state.max_gso_segments().clamp(1, MAX_SEGMENTS);
        if self.batch_count > 0
            && (self.batch_to != Some(to)
                || self.batch_closed
                || sealed > self.batch_segment
                || self.batch_count >= max
                || self.batch.len() + sealed > MAX_GSO_BYTES)
        {
            self.flush();
            if self.stalled {
                // Only a reply the stack made while receiving gets here (it has no transmit
                // token while stalled); TCP sends it again.
                self.tx_dropped += 1;
                return;
            }
        }
        if self.batch_count == 0 {
            self.batch_segment = sealed;
            self.batch_to = Some(to);
        }
        self.batch.extend_from_slice(&self.sealed[..sealed]);
        self.batch_count += 1;
        self.batch_closed = sealed < self.batch_segment;
    }

    /// Send the batch: one `sendmsg` carrying every datagram (GSO), or one per datagram
    /// where the kernel has no GSO. A full socket buffer keeps the batch and marks the wire
    /// stalled (see [`Wire::stalled`]); any other failure drops it (TCP retransmits).
    pub(super) fn flush(&mut self) {
        let Some(destination) = self.batch_to.filter(|_| self.batch_count > 0) else {
            return;
        };
        let transmit = Transmit {
            destination,
            ecn: None,
            contents: &self.batch,
            segment_size: (self.batch_count > 1).then_some(self.batch_segment),
            src_ip: None,
        };
        let (udp, state) = (&self.udp, &self.udp_state);
        let sent = udp.try_io(Interest::WRITABLE, || {
            state.send(UdpSockRef::from(&**udp), &transmit)
        });
        match sent {
            Ok(()) => self.stalled = false,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                self.stalled = true;
                return;
            }
            Err(_) => {
                self.stalled = false;
                self.tx_dropped += self.batch_count as u64;
            }
        }
        self.batch.clear();
        self.batch_count = 0;
        self.batch_closed = false;
    }
}

pub(super) struct RxToken<'a>(&'a [u8]);
pub(super) struct TxToken<'a>(&'a mut Wire);

impl phy::RxToken for RxToken<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(self.0)
    }
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let len = len.min(self.0.plain.len());
        let result = f(&mut self.0.plain[..len]);
        #[cfg(test)]
        self.0.edges.observe(&self.0.plain[..len]);
        self.0.send_packet(len);
        result
    }
}

impl phy::Device for Link {
    type RxToken<'a> = RxToken<'a>;
    type TxToken<'a> = TxToken<'a>;

    fn receive(
        &mut self,
        _: smoltcp::time::Instant,
    ) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        let next = self.rx.pop_front()?;
        let done = std::mem::replace(&mut self.rx_current, next);
        if done.capacity() > 0 && self.free.len() < BATCH {
            self.free.push(done);
        }
        Some((RxToken(&self.rx_current), TxToken(&mut self.wire)))
    }

    fn transmit(&mut self, _: smoltcp::time::Instant) -> Option<Self::TxToken<'_>> {
        (!self.wire.stalled).then_some(TxToken(&mut self.wire))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = MTU;
        // WireGuard authenticates every packet: received checksums cannot be wrong, so only
        // outgoing ones are computed (a kernel peer checks them).
        let mut checksum = ChecksumCapabilities::default();
        checksum.ipv4 = Checksum::Tx;
        checksum.tcp = Checksum::Tx;
        checksum.udp = Checksum::Tx;
        checksum.icmpv4 = Checksum::Tx;
        caps.checksum = checksum;
        caps
    }
}

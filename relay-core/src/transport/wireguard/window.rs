//! Window sizing: each stream's buffers for the peer's round trip, and keeping the window
//! that smoltcp advertises from moving left (its window scaling rounds the free space down).

use std::time::Duration;

use super::{
    AUTO_BUDGET, AUTO_RATE, MAX_WINDOW, PeerState, STALL_PROBE, STREAM_BUFFER, STREAM_TIMEOUT,
    Window,
};

/// One unit of the advertised receive window for a receive buffer of `buffer` bytes: 2 to
/// the power of the window scale smoltcp chooses for it (the fewest bits that bring it under
/// 64 KiB).
pub(super) const fn window_unit(buffer: usize) -> usize {
    1 << (usize::BITS - buffer.leading_zeros()).saturating_sub(16)
}

/// Bytes a stream's stash takes in to keep its window edge in place (see
/// [`PeerState::align_windows`]), for a receive buffer of `buffer` bytes: a sixteenth of it,
/// at least 8 KiB. Aligning takes at most one window unit per segment that arrives while the
/// reader is away, so full-sized segments fill a buffer with at most `buffer / 1380 * unit`
/// stashed: within a sixteenth up to 2 MiB buffers (unit 64), and 8 KiB covers the default
/// 512 KiB with room to spare. Past it the window may shrink and [`PeerState::unstick`]'s
/// nudges, which may take the stash to twice this, reopen it.
pub(super) const fn stash_max(buffer: usize) -> usize {
    let share = buffer / 16;
    if share > 8 * 1024 { share } else { 8 * 1024 }
}

/// The window for a new stream of a peer whose round trip is `rtt` (unknown: `None`), whose
/// live streams already hold `grown` bytes of buffers past [`STREAM_BUFFER`] each.
///
/// Past [`STREAM_BUFFER`], a whole number of MiB: a whole number of window units (see
/// [`window_unit`]), and spare sockets fit the next streams while the estimate moves within
/// a step.
#[must_use]
pub fn auto_window(rtt: Option<Duration>, grown: usize) -> usize {
    const STEP: usize = 1 << 20;
    let Some(rtt) = rtt else {
        return STREAM_BUFFER;
    };
    let wanted = u64::try_from(rtt.as_micros())
        .unwrap_or(u64::MAX)
        .saturating_mul(AUTO_RATE)
        / 1_000_000;
    let wanted = usize::try_from(wanted).unwrap_or(MAX_WINDOW);
    if wanted <= STREAM_BUFFER {
        return STREAM_BUFFER;
    }
    // Past the budget, the largest window that still fits it.
    let room = AUTO_BUDGET.saturating_sub(grown) / 2 + STREAM_BUFFER;
    wanted
        .min(MAX_WINDOW)
        .div_ceil(STEP)
        .saturating_mul(STEP)
        .min(room / STEP * STEP)
        .max(STREAM_BUFFER)
}

impl PeerState {
    /// Each new stream's buffers, each way.
    pub(super) fn stream_window(&self) -> usize {
        match self.window {
            Window::Fixed(bytes) => bytes,
            Window::Auto => {
                let grown = self
                    .sockets
                    .iter()
                    .map(|(_, socket)| {
                        let smoltcp::socket::Socket::Tcp(socket) = socket;
                        let both = socket.recv_capacity() + socket.send_capacity();
                        both.saturating_sub(2 * STREAM_BUFFER)
                    })
                    .sum();
                auto_window(self.link_rtt(), grown)
            }
        }
    }

    /// Keep every receive window's right edge from moving left, before the stack sends its
    /// acknowledgments.
    ///
    /// smoltcp (0.14) advertises its free receive space rounded down to the window scale
    /// (`unit` bytes, see [`window_unit`]), and refuses any byte past the edge it last advertised. When a
    /// segment of a length that is not a whole number of units arrives, the rounding can move
    /// the edge up to one unit to the left of where it was. A sender that already sent up to the
    /// old edge then has its last bytes refused. In the middle of a transfer the segments after
    /// them draw duplicate acknowledgments and a fast retransmit; at the end of one (the last
    /// bytes, then the FIN) nothing follows, and the sender waits for its retransmission
    /// timeout, at least one second in smoltcp. Measured before this: one 16 MiB transfer in
    /// about fifteen stalled for 1 s (3 s when the retransmission was cut too).
    ///
    /// Taking the bytes that would be rounded off out of the buffer, into the stream's stash
    /// (its reader gets them first), leaves the free space a whole number of units, so the
    /// advertised edge is the buffer's true end and never moves left. The stash is bounded by
    /// [`stash_max`]; past it (a reader far behind) the rounding is left as it was, and
    /// [`PeerState::unstick`] reopens a window that shrank that way.
    pub(super) fn align_windows(&mut self) {
        for (handle, socket) in self.sockets.iter_mut() {
            let smoltcp::socket::Socket::Tcp(socket) = socket;
            let unit = window_unit(socket.recv_capacity());
            let free = socket.recv_capacity() - socket.recv_queue();
            let short = (unit - free % unit) % unit;
            if short == 0 || socket.recv_queue() == 0 {
                continue;
            }
            let stash = self.stash.entry(handle).or_default();
            let at = stash.len();
            if at + short <= stash_max(socket.recv_capacity()) {
                stash.resize(at + short, 0);
                let taken = socket.recv_slice(&mut stash[at..]).unwrap_or(0);
                stash.truncate(at + taken);
            }
            if stash.is_empty() {
                self.stash.remove(&handle);
            }
        }
    }

    /// Work around two ways smoltcp (0.14) can stall a stream for good when both of its
    /// directions are full at once (an echo, or a request/response exchange larger than the
    /// buffers, whose application waits on one direction to drain the other).
    ///
    /// - Window scaling rounds the advertised window down, so a receiver can shrink its
    ///   window's right edge by up to one scale unit after the sender filled it. The sender's
    ///   last bytes are then refused, and while the receiver's window stays at zero it also
    ///   refuses every later segment of the sender (acknowledgments included, as their sequence
    ///   number is past its own), so it never learns that its own data was acknowledged. The
    ///   sender meanwhile probes with bytes past the refused ones and never rewinds. Taking
    ///   two window units of bytes out of a full receive buffer into the stream's stash reopens the
    ///   window past the sender's edge; the sender's next segment is accepted and both ends
    ///   resume. A nudge is taken into an empty stash (once until the reader reads), and,
    ///   up to twice [`stash_max`], whenever [`PeerState::align_windows`] has stopped at its
    ///   bound: the edge may have moved left since. (Taken only into an empty stash, as first
    ///   written, a stash filled by aligning left the stall for good: one run of
    ///   `an_echo_resumes_after_both_directions_fill_up` in about ten hung 60 s and was reset.
    ///   Without nudges the test stalls every time.)
    /// - A retransmission timeout while the peer's window is zero leaves the socket idle
    ///   without its zero-window probe, so a lost window update would never be recovered
    ///   (found reading smoltcp's code, not seen here). A stream with data to send keeps a
    ///   keep-alive, which draws the peer's acknowledgment with its current window.
    ///   Keep-alives go out only from an idle socket: nothing while data flows.
    ///
    /// The same test sets [`STREAM_TIMEOUT`] on streams with data to send only: smoltcp's
    /// timeout counts from the peer's last packet, so on a quiet stream it would reset a
    /// healthy connection.
    pub(super) fn unstick(&mut self) {
        for (handle, socket) in self.sockets.iter_mut() {
            let smoltcp::socket::Socket::Tcp(socket) = socket;
            // Bytes moved out of a full receive buffer so its window reopens by two units.
            let nudge = 2 * window_unit(socket.recv_capacity());
            let busy = socket.send_queue() > 0;
            let probe = busy.then(|| STALL_PROBE.into());
            if socket.keep_alive() != probe {
                socket.set_keep_alive(probe);
            }
            let timeout = busy.then(|| STREAM_TIMEOUT.into());
            if socket.timeout() != timeout {
                socket.set_timeout(timeout);
            }
            let free = socket.recv_capacity() - socket.recv_queue();
            let stashed = self.stash.get(&handle).map_or(0, Vec::len);
            let bound = stash_max(socket.recv_capacity());
            // Nudged once per read, or while aligning is held back by its bound (the edge may
            // have moved left since), up to twice the bound.
            let aligning_stopped = stashed + window_unit(socket.recv_capacity()) > bound;
            if free < nudge / 2
                && socket.may_recv()
                && (stashed == 0 || aligning_stopped)
                && stashed + nudge <= 2 * bound
            {
                let stash = self.stash.entry(handle).or_default();
                stash.resize(stashed + nudge, 0);
                let taken = socket.recv_slice(&mut stash[stashed..]).unwrap_or(0);
                stash.truncate(stashed + taken);
                if stash.is_empty() {
                    self.stash.remove(&handle);
                }
            }
        }
    }
}

//! A TCP connection inside the overlay, as tokio `AsyncRead` + `AsyncWrite`.
//!
//! The socket lives in its peer's stack; every operation locks the peer's state briefly, moves
//! bytes between the caller's buffer and the socket's fixed buffers, and asks the peer's timer
//! task to run the stack, which it does once the tasks ready now have had their turn: what
//! was written leaves then (and a reader's freed window is announced), together with what the
//! other streams wrote meanwhile (see `PeerState::defer_poll`). When a buffer is full or empty
//! the socket's own waker is registered and the stack wakes the task when that changes: no
//! polling.
//!
//! Both halves may be used at once through `&OverlayStream` (a relay pumps both directions
//! from one task). Dropping the stream closes it gracefully (FIN after the buffered data); the
//! peer's timer task removes it once the close completes, or resets it after a linger time.
//! [`OverlayStream::abort`] resets it at once.

use std::future::poll_fn;
use std::io;
use std::net::{SocketAddr, SocketAddrV4};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use smoltcp::iface::SocketHandle;
use smoltcp::socket::tcp::{self, RecvError};
use smoltcp::wire::IpAddress;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::{LINGER, MAX_STREAMS, Peer};
use crate::{clock, lock};

/// A relayed TCP connection inside the WireGuard overlay.
pub struct OverlayStream {
    peer: Arc<Peer>,
    handle: SocketHandle,
}

impl std::fmt::Debug for OverlayStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OverlayStream")
            .field("peer", &self.peer.name())
            .finish_non_exhaustive()
    }
}

impl OverlayStream {
    /// Open a connection to `to` through `peer` and wait until it is established (the caller
    /// bounds the wait).
    pub(super) async fn connect(peer: Arc<Peer>, to: SocketAddrV4) -> io::Result<Self> {
        // A window sized for the round trip needs it: wait while it is being measured.
        loop {
            let measured = peer.measured.notified();
            let Some(until) = lock(&peer.state).awaiting_rtt(clock::now()) else {
                break;
            };
            let _ = tokio::time::timeout_at(until.into(), measured).await;
        }
        let started = clock::now();
        let wake = {
            let mut guard = lock(&peer.state);
            let state = &mut *guard;
            if state.streams >= MAX_STREAMS {
                return Err(io::Error::other("too many streams open to this peer"));
            }
            let port = state
                .alloc_port()
                .ok_or_else(|| io::Error::other("no free local port in the overlay"))?;
            let mut socket = state.new_socket();
            socket
                .connect(
                    state.iface.context(),
                    (IpAddress::Ipv4(*to.ip()), to.port()),
                    port,
                )
                .map_err(|e| io::Error::other(format!("overlay connect: {e}")))?;
            let handle = state.sockets.add(socket);
            state.ports.insert(port, handle);
            state.port_of.insert(handle, port);
            state.streams += 1;
            let wake = state.defer_poll();
            (handle, wake)
        };
        let (handle, wake) = wake;
        if wake {
            peer.timer.notify_one();
        }
        let stream = Self { peer, handle };
        poll_fn(|cx| stream.poll_established(cx)).await?;
        // SYN out, SYN-ACK back: one round trip of the overlay.
        let now = clock::now();
        lock(&stream.peer.state).observe_rtt(now.duration_since(started), now);
        Ok(stream)
    }

    /// A connection the peer opened (its socket was a listener).
    pub(super) fn accepted(peer: Arc<Peer>, handle: SocketHandle) -> Self {
        Self { peer, handle }
    }

    /// The peer this stream goes through.
    #[must_use]
    pub fn peer(&self) -> &Arc<Peer> {
        &self.peer
    }

    /// The far end's overlay address and port.
    #[must_use]
    pub fn remote(&self) -> Option<SocketAddr> {
        let mut state = lock(&self.peer.state);
        let socket = state.sockets.get_mut::<tcp::Socket<'_>>(self.handle);
        socket.remote_endpoint().and_then(|e| match e.addr {
            IpAddress::Ipv4(ip) => Some(SocketAddr::from((ip, e.port))),
            #[allow(unreachable_patterns)]
            _ => None,
        })
    }

    /// Close the sending direction (FIN after what is buffered).
    pub fn close(&self) {
        self.with_socket(|socket| {
            socket.close();
            ((), true)
        });
    }

    /// Reset the connection now: the stack runs here, not later, so the reset leaves before
    /// the socket can be released (an aborted socket is closed at once, and dropping a closed
    /// stream forgets its socket).
    pub fn abort(&self) {
        let wake = {
            let mut guard = lock(&self.peer.state);
            let state = &mut *guard;
            state
                .sockets
                .get_mut::<tcp::Socket<'static>>(self.handle)
                .abort();
            state.poll(self.peer.epoch, clock::now())
        };
        if wake {
            self.peer.timer.notify_one();
        }
    }

    /// Run `f` on the socket; if `f` asks for the stack, have the timer task run it (see
    /// `PeerState::defer_poll`).
    fn with_socket<R>(&self, f: impl FnOnce(&mut tcp::Socket<'static>) -> (R, bool)) -> R {
        let (result, wake) = {
            let mut guard = lock(&self.peer.state);
            let state = &mut *guard;
            let (result, run) = f(state.sockets.get_mut::<tcp::Socket<'static>>(self.handle));
            let wake = run && state.defer_poll();
            (result, wake)
        };
        if wake {
            self.peer.timer.notify_one();
        }
        result
    }

    fn poll_established(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.with_socket(|socket| {
            let poll = match socket.state() {
                tcp::State::SynSent | tcp::State::SynReceived => {
                    socket.register_send_waker(cx.waker());
                    Poll::Pending
                }
                tcp::State::Closed | tcp::State::TimeWait | tcp::State::Listen => {
                    Poll::Ready(Err(io::ErrorKind::ConnectionRefused.into()))
                }
                _ => Poll::Ready(Ok(())),
            };
            (poll, false)
        })
    }

    fn poll_read_ref(&self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let (poll, wake) = {
            let mut guard = lock(&self.peer.state);
            let state = &mut *guard;
            // Bytes the stack took out of a full buffer come first (they are the oldest).
            if let Some(mut stashed) = state.stash.remove(&self.handle) {
                let n = stashed.len().min(buf.remaining());
                buf.put_slice(&stashed[..n]);
                if n < stashed.len() {
                    stashed.drain(..n);
                    state.stash.insert(self.handle, stashed);
                }
                return Poll::Ready(Ok(()));
            }
            let socket = state.sockets.get_mut::<tcp::Socket<'static>>(self.handle);
            let (poll, run) = Self::poll_read_socket(socket, cx, buf);
            (poll, run && state.defer_poll())
        };
        if wake {
            self.peer.timer.notify_one();
        }
        poll
    }

    fn poll_read_socket(
        socket: &mut tcp::Socket<'static>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> (Poll<io::Result<()>>, bool) {
        if socket.can_recv() {
            return match socket.recv_slice(buf.initialize_unfilled()) {
                Ok(n) => {
                    buf.advance(n);
                    // The window opened: let the stack announce it.
                    (Poll::Ready(Ok(())), true)
                }
                Err(e) => (Poll::Ready(Err(io::Error::other(e.to_string()))), false),
            };
        }
        let poll = match socket.recv_slice(&mut []) {
            Err(RecvError::Finished) => Poll::Ready(Ok(())),
            Err(RecvError::InvalidState) => match socket.state() {
                tcp::State::SynSent | tcp::State::SynReceived => {
                    socket.register_recv_waker(cx.waker());
                    Poll::Pending
                }
                _ => Poll::Ready(Err(io::ErrorKind::ConnectionReset.into())),
            },
            Ok(_) => {
                socket.register_recv_waker(cx.waker());
                Poll::Pending
            }
        };
        (poll, false)
    }

    fn poll_write_ref(&self, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        self.with_socket(|socket| {
            if socket.can_send() {
                return match socket.send_slice(data) {
                    Ok(n) => (Poll::Ready(Ok(n)), true),
                    Err(e) => (Poll::Ready(Err(io::Error::other(e.to_string()))), false),
                };
            }
            let poll = match socket.state() {
                tcp::State::SynSent | tcp::State::SynReceived => {
                    socket.register_send_waker(cx.waker());
                    Poll::Pending
                }
                _ if socket.may_send() => {
                    socket.register_send_waker(cx.waker());
                    Poll::Pending
                }
                tcp::State::Closed => Poll::Ready(Err(io::ErrorKind::ConnectionReset.into())),
                _ => Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
            };
            (poll, false)
        })
    }

    fn poll_shutdown_ref(&self) -> Poll<io::Result<()>> {
        let wake = {
            let mut guard = lock(&self.peer.state);
            let state = &mut *guard;
            state.close(self.handle);
            state.defer_poll()
        };
        if wake {
            self.peer.timer.notify_one();
        }
        Poll::Ready(Ok(()))
    }
}

impl Drop for OverlayStream {
    fn drop(&mut self) {
        let wake = {
            let mut guard = lock(&self.peer.state);
            let state = &mut *guard;
            let now = clock::now();
            let socket = state.sockets.get_mut::<tcp::Socket<'static>>(self.handle);
            if socket.state() == tcp::State::Closed {
                state.release(self.handle);
                false
            } else {
                state.close(self.handle);
                state.orphans.push((self.handle, now + LINGER));
                state.defer_poll()
            }
        };
        if wake {
            self.peer.timer.notify_one();
        }
    }
}

/// `AsyncRead` and `AsyncWrite` for an overlay stream, owned or shared: both directions work
/// through a shared reference (the socket lives in the peer's stack), so the pump may hold a
/// reader and a writer of one stream at once.
macro_rules! overlay_io {
    ($stream:ty) => {
        impl AsyncRead for $stream {
            fn poll_read(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &mut ReadBuf<'_>,
            ) -> Poll<io::Result<()>> {
                self.poll_read_ref(cx, buf)
            }
        }

        impl AsyncWrite for $stream {
            fn poll_write(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                data: &[u8],
            ) -> Poll<io::Result<usize>> {
                self.poll_write_ref(cx, data)
            }

            fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
                Poll::Ready(Ok(()))
            }

            fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
                self.poll_shutdown_ref()
            }
        }
    };
}

overlay_io!(OverlayStream);
overlay_io!(&OverlayStream);

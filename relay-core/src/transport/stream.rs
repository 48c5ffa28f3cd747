//! One relayed connection over any transport (QUIC, WireGuard, TCP+TLS).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use quinn::SendStream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::budget::QuicRecv;
use super::quic::code;
use super::tls::TlsRelay;
use super::wireguard::OverlayStream;
use crate::relay::{ByteCounters, PumpEnd, PumpStats, pump};

/// A relayed connection: a QUIC stream pair, a TCP connection inside the WireGuard overlay,
/// or a TCP+TLS connection of its own.
#[derive(Debug)]
pub enum TunnelStream {
    Quic(SendStream, QuicRecv),
    Overlay(OverlayStream),
    Tls(Box<TlsRelay>),
}

/// The receiving half of a [`TunnelStream`].
pub enum TunnelRead<'a> {
    Quic(&'a mut QuicRecv),
    Overlay(&'a OverlayStream),
    Tls(&'a mut tokio::io::ReadHalf<super::tls::TlsIo>),
}

/// The sending half of a [`TunnelStream`].
pub enum TunnelWrite<'a> {
    Quic(&'a mut SendStream),
    Overlay(&'a OverlayStream),
    Tls(&'a mut tokio::io::WriteHalf<super::tls::TlsIo>),
}

impl TunnelStream {
    /// Both halves, to pump each direction on its own.
    pub(crate) fn halves(&mut self) -> (TunnelRead<'_>, TunnelWrite<'_>) {
        match self {
            Self::Quic(send, recv) => (TunnelRead::Quic(recv), TunnelWrite::Quic(send)),
            Self::Overlay(stream) => (TunnelRead::Overlay(stream), TunnelWrite::Overlay(stream)),
            Self::Tls(relay) => {
                let TlsRelay { read, write } = &mut **relay;
                (TunnelRead::Tls(read), TunnelWrite::Tls(write))
            }
        }
    }

    /// The reader expects nothing for a while (a pooled connection waiting for its next
    /// request): a QUIC stream then holds no flow-control credit (see [`super::budget`]).
    pub(crate) fn park(&self) {
        if let Self::Quic(_, recv) = self {
            recv.park();
        }
    }

    /// The stream now carries the connection of the client at `client` (for fair shedding).
    pub(crate) fn set_client(&self, client: std::net::IpAddr) {
        if let Self::Quic(_, recv) = self {
            recv.set_client(client);
        }
    }

    /// A future that resolves when the tunnel sheds this stream because its reader stopped
    /// reading (QUIC only: the other transports have no shared credit to take back, and never
    /// resolve).
    pub(crate) fn shed_signal(&self) -> impl Future<Output = ()> + Send + 'static {
        let shed = match self {
            Self::Quic(_, recv) => Some(recv.shed()),
            Self::Overlay(_) | Self::Tls(_) => None,
        };
        async move {
            match shed {
                Some(shed) => shed.wait().await,
                None => std::future::pending().await,
            }
        }
    }

    /// Relay a TCP connection over this stream (see [`pump`]) until both directions finish,
    /// one fails, or nothing moved for `idle`. A pump that did not end cleanly aborts the
    /// stream (the far end sees a reset, not an end of stream); one cut by the tunnel (an
    /// error, or credit shed) resets the TCP connection too, so its peer never takes a
    /// cut-off stream for a whole one.
    pub async fn relay_tcp(
        &mut self,
        tcp: &mut TcpStream,
        idle: Duration,
        totals: &ByteCounters,
    ) -> (PumpEnd, PumpStats) {
        let shed = self.shed_signal();
        let (mut tcp_read, mut tcp_write) = tcp.split();
        let (mut tunnel_read, mut tunnel_write) = self.halves();
        let (end, stats) = pump(
            &mut tcp_read,
            &mut tcp_write,
            &mut tunnel_read,
            &mut tunnel_write,
            idle,
            totals,
            shed,
        )
        .await;
        if !matches!(end, PumpEnd::Done) {
            self.abort();
        }
        if matches!(end, PumpEnd::TunnelError(_) | PumpEnd::Shed) {
            let _ = tcp.set_zero_linger();
        }
        (end, stats)
    }

    /// End it as failed: the far end sees a reset, not a clean end of stream (dropping a
    /// QUIC send stream would finish it, telling the peer all is well). A TLS connection
    /// needs nothing here: dropped without `close_notify`, it is an error at the far end.
    pub fn abort(&mut self) {
        match self {
            Self::Quic(send, recv) => {
                let _ = send.reset(code::RELAY_ERROR);
                recv.stop(code::RELAY_ERROR);
            }
            Self::Overlay(stream) => stream.abort(),
            Self::Tls(_) => {}
        }
    }
}

impl AsyncRead for TunnelRead<'_> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            TunnelRead::Quic(recv) => Pin::new(&mut **recv).poll_read(cx, buf),
            TunnelRead::Overlay(stream) => Pin::new(stream).poll_read(cx, buf),
            TunnelRead::Tls(read) => Pin::new(&mut **read).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for TunnelWrite<'_> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            TunnelWrite::Quic(send) => Pin::new(&mut **send)
                .poll_write(cx, data)
                .map_err(io::Error::from),
            TunnelWrite::Overlay(stream) => Pin::new(stream).poll_write(cx, data),
            TunnelWrite::Tls(write) => Pin::new(&mut **write).poll_write(cx, data),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            TunnelWrite::Quic(send) => Pin::new(&mut **send).poll_flush(cx),
            TunnelWrite::Overlay(stream) => Pin::new(stream).poll_flush(cx),
            TunnelWrite::Tls(write) => Pin::new(&mut **write).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            TunnelWrite::Quic(send) => Pin::new(&mut **send).poll_shutdown(cx),
            TunnelWrite::Overlay(stream) => Pin::new(stream).poll_shutdown(cx),
            TunnelWrite::Tls(write) => Pin::new(&mut **write).poll_shutdown(cx),
        }
    }
}

// The whole stream reads and writes through its halves.
impl AsyncRead for TunnelStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let (mut read, _) = self.get_mut().halves();
        Pin::new(&mut read).poll_read(cx, buf)
    }
}

impl AsyncWrite for TunnelStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let (_, mut write) = self.get_mut().halves();
        Pin::new(&mut write).poll_write(cx, data)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let (_, mut write) = self.get_mut().halves();
        Pin::new(&mut write).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let (_, mut write) = self.get_mut().halves();
        Pin::new(&mut write).poll_shutdown(cx)
    }
}

//! A client connection that records its activity, for the idle check.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::sentry::RouteSlot;

/// Whether a client connection moves bytes: a counter bumped on every read and write (no
/// clock read per I/O); the idle check looks at it once per timeout.
#[derive(Clone, Default)]
pub(in crate::sentry) struct Activity {
    moved: Arc<AtomicU64>,
}

impl Activity {
    pub(in crate::sentry) fn new() -> Self {
        Self::default()
    }

    pub(in crate::sentry) fn touch(&self) {
        self.moved.fetch_add(1, Ordering::Relaxed);
    }

    /// Completes once no byte moved for a whole `timeout` (so after between one and two
    /// timeouts of silence).
    pub(in crate::sentry) async fn idle(&self, timeout: Duration) {
        loop {
            let before = self.moved.load(Ordering::Relaxed);
            tokio::time::sleep(timeout).await;
            if self.moved.load(Ordering::Relaxed) == before {
                return;
            }
        }
    }
}

/// The client socket, counting bytes into the route's totals and noting activity.
pub(in crate::sentry) struct Counted {
    pub(super) inner: TcpStream,
    pub(super) slot: Arc<RouteSlot>,
    pub(super) activity: Activity,
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.slot.bytes.up.fetch_add(n as u64, Ordering::Relaxed);
            self.activity.touch();
        }
        result
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = result {
            self.wrote(n);
        }
        result
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = result {
            self.wrote(n);
        }
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl Counted {
    pub(in crate::sentry) fn wrote(&self, n: usize) {
        if n > 0 {
            self.slot.bytes.down.fetch_add(n as u64, Ordering::Relaxed);
            self.activity.touch();
        }
    }
}

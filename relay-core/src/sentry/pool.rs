//! Upstream HTTP connections of a JSON-RPC route: HTTP/1.1 over relay streams, pooled.
//!
//! Each upstream connection is a relay stream to the route's first answering upstream with a
//! hyper HTTP/1.1 client on it. It is driven by the task of the client connection using it,
//! never by a task of its own: sending a request polls the connection until the response head
//! arrives, and the response body ([`Relayed`]) polls it while the client's task streams the
//! body out. So a request costs no extra task hand-off on the sentry, and an idle upstream
//! connection costs nothing but memory.
//!
//! - Once a response has been read to the end, its upstream connection goes back to the
//!   route's pool (at most [`POOL_MAX_IDLE`], for at most [`POOL_IDLE`]); every request takes
//!   one from there before it opens a stream, so clients that open a connection per request
//!   reuse streams too. A connection the node or the tunnel closed, or one whose response was
//!   not read to the end, is never reused.
//! - A request on a reused connection that the node closed meanwhile is sent again once on a
//!   fresh one (only when hyper hands the request back unsent).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use crate::transport::TunnelStream;
use bytes::Bytes;
use futures_util::FutureExt;
use http_body_util::Full;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::{RouteSlot, Shared, connect_upstream};
use crate::{clock, lock};

/// How long an idle pooled upstream connection is kept.
pub(super) const POOL_IDLE: Duration = Duration::from_secs(30);
/// Idle upstream connections kept per route.
pub(super) const POOL_MAX_IDLE: usize = 64;

type Conn = http1::Connection<TokioIo<TunnelIo>, Full<Bytes>>;

/// No connected upstream answered.
#[derive(Debug, thiserror::Error)]
#[error("no upstream available")]
pub(super) struct NoUpstream;

/// One HTTP/1.1 connection to the node over a relay stream.
pub(super) struct Upstream {
    sender: SendRequest<Full<Bytes>>,
    conn: Pin<Box<Conn>>,
    /// The connection future completed (closed or failed): never poll it again.
    done: bool,
    /// The route's upstream generation it was opened under (a reload that changes the
    /// upstreams starts a new one).
    generation: u64,
    idle_since: Instant,
    /// Opened for the request at hand (a failure cannot be a stale pooled connection).
    fresh: bool,
}

/// Why a request did not get a response head.
pub(super) enum SendError {
    /// The connection was closed before the request was written: it can be sent again.
    Unsent(Box<Request<Full<Bytes>>>, hyper::Error),
    Failed(String),
}

impl Upstream {
    /// Open a relay stream to the route's first answering upstream and start HTTP on it.
    pub(super) async fn open(
        shared: &Shared,
        slot: &RouteSlot,
        generation: u64,
    ) -> Result<Self, NoUpstream> {
        let (sender, conn) = handshake(shared, slot).await?;
        Ok(Self {
            sender,
            conn: Box::pin(conn),
            done: false,
            generation,
            idle_since: clock::now(),
            fresh: true,
        })
    }

    /// Start HTTP on a relay stream whose connection runs in its own task, for one request
    /// that may upgrade (a WebSocket): the caller gets the sender only.
    pub(super) async fn open_for_upgrade(
        shared: &Shared,
        slot: &RouteSlot,
    ) -> Result<SendRequest<Full<Bytes>>, NoUpstream> {
        let (sender, conn) = handshake(shared, slot).await?;
        tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
        });
        Ok(sender)
    }

    /// Let the connection process what it has, with `cx` woken on progress.
    fn drive(&mut self, cx: &mut Context<'_>) {
        if !self.done && self.conn.as_mut().poll(cx).is_ready() {
            self.done = true;
        }
    }

    /// Whether it can take a request now, after processing what it has pending (a close by
    /// the node shows here).
    fn usable(&mut self) -> bool {
        if !self.done && self.conn.as_mut().now_or_never().is_some() {
            self.done = true;
        }
        !self.done && !self.sender.is_closed() && self.sender.is_ready()
    }

    /// Send one request and drive the connection until the response head arrives.
    pub(super) async fn send(
        &mut self,
        request: Request<Full<Bytes>>,
    ) -> Result<Response<Incoming>, SendError> {
        let response = self.sender.try_send_request(request);
        let mut response = std::pin::pin!(response);
        let result = std::future::poll_fn(|cx| {
            if let Poll::Ready(result) = response.as_mut().poll(cx) {
                return Poll::Ready(result);
            }
            self.drive(cx);
            if self.done {
                // The dispatcher has answered the request by now, or never will.
                return match response.as_mut().poll(cx) {
                    Poll::Ready(result) => Poll::Ready(result),
                    Poll::Pending => Poll::Pending,
                };
            }
            Poll::Pending
        })
        .await;
        result.map_err(|mut e| match e.take_message() {
            Some(request) => SendError::Unsent(Box::new(request), e.into_error()),
            None => SendError::Failed(e.into_error().to_string()),
        })
    }

    pub(super) fn is_fresh(&self) -> bool {
        self.fresh
    }
}

/// A relay stream to the route's first answering upstream, with an HTTP/1.1 client on it.
async fn handshake(
    shared: &Shared,
    slot: &RouteSlot,
) -> Result<(SendRequest<Full<Bytes>>, Conn), NoUpstream> {
    let route = slot.route.load_full();
    // A pooled stream serves many clients: the header names the route's own address.
    let Some((_, stream)) = connect_upstream(shared, &route, slot.local, None).await else {
        slot.no_upstream.fetch_add(1, Ordering::Relaxed);
        return Err(NoUpstream);
    };
    http1::Builder::new()
        .handshake(TokioIo::new(TunnelIo(stream)))
        .await
        .map_err(|_| NoUpstream)
}

/// A route's idle upstream connections.
#[derive(Default)]
pub(super) struct Pool {
    idle: Mutex<Vec<Upstream>>,
    generation: AtomicU64,
}

impl Pool {
    pub(super) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }

    /// Forget every idle connection and refuse those in use when they come back (the
    /// upstreams changed).
    pub(super) fn reset(&self) {
        self.generation.fetch_add(1, Ordering::Relaxed);
        lock(&self.idle).clear();
    }

    /// An idle connection that is still usable, if any.
    pub(super) fn take(&self) -> Option<Upstream> {
        let now = clock::now();
        let generation = self.generation();
        let mut idle = lock(&self.idle);
        while let Some(mut upstream) = idle.pop() {
            let fresh_enough = now.duration_since(upstream.idle_since) < POOL_IDLE;
            if fresh_enough && upstream.generation == generation && upstream.usable() {
                upstream.fresh = false;
                return Some(upstream);
            }
        }
        None
    }

    /// Give back a connection; it is kept only if it can serve again.
    pub(super) fn put(&self, mut upstream: Upstream) {
        if upstream.generation != self.generation() || !upstream.usable() {
            return;
        }
        upstream.idle_since = clock::now();
        let mut idle = lock(&self.idle);
        // Oldest first out when full: they are the likeliest to have been closed by the node.
        if idle.len() >= POOL_MAX_IDLE {
            idle.remove(0);
        }
        idle.push(upstream);
    }

    /// Idle connections now.
    pub(super) fn len(&self) -> usize {
        lock(&self.idle).len()
    }
}

/// A node's response body, streamed to the client by the client connection's task, which
/// drives the upstream connection while it polls the body. Read to the end, the upstream
/// connection goes back to the pool at once (the next request, of this client or another,
/// takes it); dropped before, it is closed.
pub(super) struct Relayed {
    inner: Incoming,
    upstream: Option<Upstream>,
    home: Option<Arc<Pool>>,
}

impl Relayed {
    /// The body of a response whose connection `upstream` must be driven to read it.
    pub(super) fn driven(inner: Incoming, upstream: Upstream, pool: Arc<Pool>) -> Self {
        Self {
            inner,
            upstream: Some(upstream),
            home: Some(pool),
        }
    }

    /// The body of a response whose connection runs in its own task.
    pub(super) fn plain(inner: Incoming) -> Self {
        Self {
            inner,
            upstream: None,
            home: None,
        }
    }

    fn go_home(&mut self) {
        if let (Some(upstream), Some(pool)) = (self.upstream.take(), &self.home) {
            pool.put(upstream);
        }
    }
}

impl Body for Relayed {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        if let Some(upstream) = &mut this.upstream {
            upstream.drive(cx);
        }
        let frame = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(None) = frame {
            this.go_home();
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Relayed {
    fn drop(&mut self) {
        // An empty body may never be polled; it was still read to the end.
        if self.inner.is_end_stream() {
            self.go_home();
        }
    }
}

/// A relay stream as one byte stream, for hyper.
pub(super) struct TunnelIo(TunnelStream);

impl AsyncRead for TunnelIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for TunnelIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

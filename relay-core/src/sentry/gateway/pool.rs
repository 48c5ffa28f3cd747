//! Upstream HTTP connections of a JSON-RPC route: HTTP/1.1 over relay streams, pooled.
//!
//! An upstream connection is a relay stream to the route's first answering upstream. The
//! gateway writes each request on it as one buffer and parses the node's response head and
//! body framing itself ([`crate::http1`]), so a request is parsed once on the sentry (by the
//! client's hyper server), not twice. It is driven by the task of the client connection
//! using it, never by a task of its own, and an idle upstream connection costs nothing but
//! memory.
//!
//! - A response whose whole body is already read with its head (the usual JSON-RPC answer) is
//!   answered from memory and its connection goes back to the route's pool at once; a longer
//!   body is streamed to the client ([`Relayed`]) and its connection goes back once the body
//!   ended by its framing. The pool keeps at most [`POOL_MAX_IDLE`], for at most
//!   [`POOL_IDLE`]; every request takes one from there before it opens a stream, so clients
//!   that open a connection per request reuse streams too. A connection the node or the
//!   tunnel closed, one that said `Connection: close`, or one whose response was not read to
//!   the end, is never reused.
//! - A request on a reused connection that the node closed before answering any byte (it
//!   closed the idle connection as the request went out) is sent again once on a fresh one.
//! - WebSocket upgrades use hyper's client on a stream of their own
//!   ([`Upstream::open_for_upgrade`]).

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use crate::http1::{self, Chunked, Decoded, Framing, ResponseHead};
use crate::jsonrpc::BatchMerge;
use crate::transport::TunnelStream;
use bytes::{Bytes, BytesMut};
use http_body_util::Full;
use hyper::Method;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

use crate::sentry::upstream::connect_upstream;
use crate::sentry::{RouteSlot, Shared};
use crate::{clock, lock};

/// How long an idle pooled upstream connection is kept.
pub(in crate::sentry) const POOL_IDLE: Duration = Duration::from_secs(30);
/// Idle upstream connections kept per route.
pub(in crate::sentry) const POOL_MAX_IDLE: usize = 64;
/// Bytes asked of the tunnel stream per read.
const READ_SIZE: usize = 16 * 1024;

/// No connected upstream answered.
#[derive(Debug, thiserror::Error)]
#[error("no upstream available")]
pub(in crate::sentry) struct NoUpstream;

/// One HTTP/1.1 connection to the node over a relay stream.
pub(in crate::sentry) struct Upstream {
    io: TunnelStream,
    /// Bytes read from the node and not yet used.
    buf: BytesMut,
    /// The route's upstream generation it was opened under (a reload that changes the
    /// upstreams starts a new one).
    generation: u64,
    idle_since: Instant,
    /// Opened for the request at hand (a failure cannot be a stale pooled connection).
    fresh: bool,
}

/// Why a request did not get a response head.
pub(in crate::sentry) enum SendError {
    /// A pooled connection closed with no byte of an answer: the node closed it idle, and
    /// the request can be sent again on a fresh one.
    Stale(String),
    Failed(String),
}

/// A response head from the node and its body.
pub(in crate::sentry) struct Answer {
    pub(in crate::sentry) head: ResponseHead,
    pub(in crate::sentry) body: Relayed,
}

impl Upstream {
    /// Open a relay stream to the route's first answering upstream.
    pub(in crate::sentry) async fn open(
        shared: &Shared,
        slot: &RouteSlot,
        generation: u64,
    ) -> Result<Self, NoUpstream> {
        Ok(Self {
            io: stream(shared, slot).await?,
            buf: BytesMut::new(),
            generation,
            idle_since: clock::now(),
            fresh: true,
        })
    }

    /// Start HTTP on a relay stream whose connection runs in its own task, for one request
    /// that may upgrade (a WebSocket): the caller gets the sender only.
    pub(in crate::sentry) async fn open_for_upgrade(
        shared: &Shared,
        slot: &RouteSlot,
    ) -> Result<SendRequest<Full<Bytes>>, NoUpstream> {
        let io = stream(shared, slot).await?;
        let (sender, conn) = hyper::client::conn::http1::Builder::new()
            .handshake(TokioIo::new(TunnelIo(io)))
            .await
            .map_err(|_| NoUpstream)?;
        tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
        });
        Ok(sender)
    }

    /// Whether it can take a request now: the node has neither closed it nor sent anything
    /// unasked since its last response.
    fn usable(&mut self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut probe = [0u8; 1];
        let mut probe = ReadBuf::new(&mut probe);
        matches!(
            Pin::new(&mut self.io).poll_read(&mut cx, &mut probe),
            Poll::Pending
        )
    }

    /// Write one request (head and body in `request`) and read until the response head has
    /// arrived.
    async fn send(&mut self, request: &[u8], method: &Method) -> Result<ResponseHead, SendError> {
        let stale = |e: String| {
            if self.fresh {
                SendError::Failed(e)
            } else {
                SendError::Stale(e)
            }
        };
        if let Err(e) = self.io.write_all(request).await {
            return Err(stale(e.to_string()));
        }
        if let Err(e) = self.io.flush().await {
            return Err(stale(e.to_string()));
        }
        loop {
            match http1::parse_response(&self.buf, method) {
                Ok(Some((head, used))) => {
                    let _ = self.buf.split_to(used);
                    return Ok(head);
                }
                Ok(None) => {}
                Err(e) => return Err(SendError::Failed(e.to_string())),
            }
            let before = self.buf.len();
            match read_more(&mut self.io, &mut self.buf).await {
                Ok(0) if before == 0 && !self.fresh => {
                    return Err(SendError::Stale("closed before answering".into()));
                }
                Ok(0) => return Err(SendError::Failed("closed before a whole answer".into())),
                Ok(_) => {}
                Err(e) if before == 0 => return Err(stale(e.to_string())),
                Err(e) => return Err(SendError::Failed(e.to_string())),
            }
        }
    }

    /// Send one request and take its response: the body from memory when it is all here
    /// already (the connection then goes back to `pool` at once), else streamed.
    pub(in crate::sentry) async fn exchange(
        mut self,
        request: &[u8],
        method: &Method,
        pool: &Arc<Pool>,
    ) -> Result<Answer, (Self, SendError)> {
        let head = match self.send(request, method).await {
            Ok(head) => head,
            Err(e) => return Err((self, e)),
        };
        let state = match head.framing {
            Framing::Empty => State::Length(0),
            Framing::Length(n) => State::Length(n),
            Framing::Chunked => State::Chunked(Chunked::new()),
            Framing::UntilClose => State::UntilClose,
        };
        let mut body = NodeBody {
            inner: Inner::Node {
                upstream: Some(self),
                state,
                reusable: head.reusable,
                pool: pool.clone(),
            },
        };
        body.take_buffered();
        Ok(Answer {
            head,
            body: Relayed {
                node: body,
                merge: None,
            },
        })
    }

    /// The connection now carries a request of the client at `client` (the tunnel sheds
    /// fairly by client).
    pub(in crate::sentry) fn serve(&self, client: std::net::IpAddr) {
        self.io.set_client(client);
    }

    pub(in crate::sentry) fn is_fresh(&self) -> bool {
        self.fresh
    }
}

/// Read what the stream has (at most [`READ_SIZE`]) onto `buf`; 0 at its end.
async fn read_more(io: &mut TunnelStream, buf: &mut BytesMut) -> std::io::Result<usize> {
    std::future::poll_fn(|cx| poll_read_more(io, buf, cx)).await
}

fn poll_read_more(
    io: &mut TunnelStream,
    buf: &mut BytesMut,
    cx: &mut Context<'_>,
) -> Poll<std::io::Result<usize>> {
    buf.reserve(READ_SIZE);
    tokio_util::io::poll_read_buf(Pin::new(io), cx, buf)
}

/// A relay stream to the route's first answering upstream.
async fn stream(shared: &Shared, slot: &RouteSlot) -> Result<TunnelStream, NoUpstream> {
    let route = slot.route.load_full();
    // A pooled stream serves many clients: the header names the route's own address.
    let Some((_, stream)) = connect_upstream(shared, &route, slot.local, None).await else {
        slot.no_upstream.fetch_add(1, Ordering::Relaxed);
        return Err(NoUpstream);
    };
    Ok(stream)
}

/// A route's idle upstream connections.
#[derive(Default)]
pub(in crate::sentry) struct Pool {
    idle: Mutex<Vec<Upstream>>,
    generation: AtomicU64,
}

impl Pool {
    pub(in crate::sentry) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }

    /// Forget every idle connection and refuse those in use when they come back (the
    /// upstreams changed).
    pub(in crate::sentry) fn reset(&self) {
        self.generation.fetch_add(1, Ordering::Relaxed);
        lock(&self.idle).clear();
    }

    /// An idle connection that is still usable, if any: each is first checked for bytes the
    /// node sent since its last response (they would become this request's answer: another
    /// client's, or the node's stray bytes) and for a close (one that closes as the request
    /// goes out is caught by the retry of [`SendError::Stale`]).
    pub(in crate::sentry) fn take(&self) -> Option<Upstream> {
        let now = clock::now();
        let generation = self.generation();
        loop {
            let mut upstream = lock(&self.idle).pop()?;
            let idle = now.duration_since(upstream.idle_since);
            if idle < POOL_IDLE && upstream.generation == generation && upstream.usable() {
                upstream.fresh = false;
                return Some(upstream);
            }
        }
    }

    /// Give back a connection; it is kept only if it can serve again.
    pub(in crate::sentry) fn put(&self, mut upstream: Upstream) {
        // Its response just ended by its framing: whether the node closed it since is
        // checked when it is taken again.
        if upstream.generation != self.generation() || !upstream.buf.is_empty() {
            return;
        }
        upstream.idle_since = clock::now();
        // Waiting for its next request, it expects nothing: it holds no tunnel credit.
        upstream.io.park();
        let mut idle = lock(&self.idle);
        // Oldest first out when full: they are the likeliest to have been closed by the node.
        if idle.len() >= POOL_MAX_IDLE {
            idle.remove(0);
        }
        idle.push(upstream);
    }

    /// Idle connections now.
    pub(in crate::sentry) fn len(&self) -> usize {
        lock(&self.idle).len()
    }
}

/// A node's response body as the client gets it. Read to the end by its framing, its
/// upstream connection goes back to the pool at once (the next request, of this client or
/// another, takes it); dropped before, the connection is closed. When some calls of a batch
/// were answered by the sentry, they are merged into it as it streams ([`BatchMerge`]).
pub(in crate::sentry) struct Relayed {
    node: NodeBody,
    merge: Option<Box<BatchMerge>>,
}

/// The node's body itself.
struct NodeBody {
    inner: Inner,
}

enum Inner {
    /// Read from an upstream connection by the client connection's task.
    Node {
        /// `None` once the body ended (or failed).
        upstream: Option<Upstream>,
        state: State,
        reusable: bool,
        pool: Arc<Pool>,
    },
    /// Whole, from memory.
    Whole(Option<Bytes>),
    /// A response read by hyper's client (a refused WebSocket upgrade).
    Incoming(Incoming),
}

/// Where a node's body stands.
enum State {
    /// This many bytes left.
    Length(u64),
    Chunked(Chunked),
    /// Until the node closes.
    UntilClose,
}

impl Relayed {
    /// The body of a response read by hyper's client.
    pub(in crate::sentry) fn plain(inner: Incoming) -> Self {
        Self {
            node: NodeBody {
                inner: Inner::Incoming(inner),
            },
            merge: None,
        }
    }

    /// The same body with the sentry's `answered` calls merged into the node's batch
    /// response as it streams (see [`BatchMerge`]): no more of it is held than its end.
    pub(in crate::sentry) fn merged(self, answered: Vec<String>) -> Self {
        Self {
            merge: Some(Box::new(BatchMerge::new(answered))),
            ..self
        }
    }
}

impl Body for Relayed {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        let Some(merge) = this.merge.as_mut() else {
            return Pin::new(&mut this.node).poll_frame(cx);
        };
        loop {
            match Pin::new(&mut this.node).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(frame))) => {
                    // Node trailers are dropped when merging: the merged body is not the
                    // node's any more.
                    if let Ok(data) = frame.into_data() {
                        let out = merge.push(&data);
                        if !out.is_empty() {
                            return Poll::Ready(Some(Ok(Frame::data(Bytes::from(out)))));
                        }
                    }
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(None) => {
                    let tail = this.merge.take().map(|m| m.finish()).unwrap_or_default();
                    return Poll::Ready(
                        (!tail.is_empty()).then(|| Ok(Frame::data(Bytes::from(tail)))),
                    );
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.merge.is_none() && self.node.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        if self.merge.is_some() {
            SizeHint::default()
        } else {
            self.node.size_hint()
        }
    }
}

impl NodeBody {
    /// Take the whole body from what was read with the head, if it is all there: it is then
    /// answered from memory and the connection goes home now.
    fn take_buffered(&mut self) {
        let Inner::Node {
            upstream: Some(upstream),
            state,
            ..
        } = &mut self.inner
        else {
            return;
        };
        let whole = match state {
            State::Length(n) => {
                let n = usize::try_from(*n).unwrap_or(usize::MAX);
                if upstream.buf.len() < n {
                    return;
                }
                upstream.buf.split_to(n).freeze()
            }
            State::Chunked(_) => {
                // Only when the last chunk is here (trailers stream): decoded on a copy, so
                // nothing is taken unless all is.
                if !upstream.buf.ends_with(b"0\r\n\r\n") {
                    return;
                }
                let mut rest = upstream.buf.clone();
                let mut chunked = Chunked::new();
                let mut whole = BytesMut::new();
                loop {
                    match chunked.decode(&mut rest) {
                        Ok(Decoded::Data(data)) => whole.extend_from_slice(&data),
                        Ok(Decoded::Done) => break,
                        Ok(Decoded::More) | Err(_) => return,
                    }
                }
                upstream.buf = rest;
                whole.freeze()
            }
            State::UntilClose => return,
        };
        self.finish();
        self.inner = Inner::Whole(Some(whole));
    }

    /// The body ended by its framing: the connection goes home if it can serve again.
    fn finish(&mut self) {
        if let Inner::Node {
            upstream,
            reusable,
            pool,
            ..
        } = &mut self.inner
            && let Some(upstream) = upstream.take()
            && *reusable
        {
            pool.put(upstream);
        }
    }
}

/// A node body that broke off or broke its framing.
fn broken(what: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(format!("the node's response body: {what}"))
}

impl Body for NodeBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        let (upstream, state) = match &mut this.inner {
            Inner::Whole(data) => return Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            Inner::Incoming(inner) => {
                return Pin::new(inner).poll_frame(cx).map_err(Into::into);
            }
            Inner::Node { upstream: None, .. } => return Poll::Ready(None),
            Inner::Node {
                upstream: Some(upstream),
                state,
                ..
            } => (upstream, state),
        };
        loop {
            // What the buffer already holds first.
            let frame = match state {
                State::Length(0) => None,
                State::Length(left) if !upstream.buf.is_empty() => {
                    let take = usize::try_from(*left)
                        .unwrap_or(usize::MAX)
                        .min(upstream.buf.len());
                    *left -= take as u64;
                    Some(Some(upstream.buf.split_to(take).freeze()))
                }
                State::Chunked(chunked) => match chunked.decode(&mut upstream.buf) {
                    Ok(Decoded::Data(data)) => Some(Some(data)),
                    Ok(Decoded::Done) => None,
                    Ok(Decoded::More) => Some(None),
                    Err(e) => {
                        this.inner = Inner::Whole(None);
                        return Poll::Ready(Some(Err(broken(e).into())));
                    }
                },
                State::UntilClose if !upstream.buf.is_empty() => {
                    Some(Some(upstream.buf.split().freeze()))
                }
                State::Length(_) | State::UntilClose => Some(None),
            };
            match frame {
                // The end, by the framing.
                None => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Some(Some(data)) => {
                    if matches!(state, State::Length(0)) {
                        this.finish();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(None) => {}
            }
            // More from the node.
            match poll_read_more(&mut upstream.io, &mut upstream.buf, cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(0)) if matches!(state, State::UntilClose) => {
                    this.inner = Inner::Whole(None);
                    return Poll::Ready(None);
                }
                Poll::Ready(Ok(0)) => {
                    this.inner = Inner::Whole(None);
                    return Poll::Ready(Some(Err(broken("closed before its end").into())));
                }
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => {
                    this.inner = Inner::Whole(None);
                    return Poll::Ready(Some(Err(broken(e).into())));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Whole(data) => data.is_none(),
            Inner::Incoming(inner) => inner.is_end_stream(),
            Inner::Node { upstream: None, .. } => true,
            Inner::Node { state, .. } => matches!(state, State::Length(0)),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Whole(data) => SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64)),
            Inner::Incoming(inner) => inner.size_hint(),
            Inner::Node {
                upstream: Some(_),
                state: State::Length(n),
                ..
            } => SizeHint::with_exact(*n),
            Inner::Node { .. } => SizeHint::default(),
        }
    }
}

impl Drop for NodeBody {
    fn drop(&mut self) {
        // An empty body may never be polled; it was still read to the end.
        if self.is_end_stream() {
            self.finish();
        }
    }
}

/// A relay stream as one byte stream, for hyper.
pub(in crate::sentry) struct TunnelIo(TunnelStream);

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

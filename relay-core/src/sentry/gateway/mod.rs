//! The JSON-RPC gateway of a `protocol = "jsonrpc"` route: HTTP on the route's listener, every
//! request filtered ([`crate::jsonrpc`]) before anything reaches the node.
//!
//! - Each admitted client connection is served by hyper (HTTP/1.1, keep-alive), with a bounded
//!   head, a header timeout, a body timeout and the route's idle timeout.
//! - A request passes the path and method checks, then its body is read up to `max_body`
//!   (refused with 413 past it), checked, and counted against the client's call rate (a batch
//!   counts each call; 429 past it). Denied calls are answered by the sentry.
//! - What passes is sent to the first connected upstream over a tunnel stream taken from the
//!   route's pool ([`pool`]): no new stream per request while a pooled one is idle. The
//!   client's address goes in `X-Forwarded-For` or `Forwarded`; whatever the client wrote
//!   there is removed first.
//! - Per request, the connection's deadlines reuse its timer entries ([`timer`]), and
//!   the route's stop and the idle watch are awaited beside the connection, not polled with
//!   it.
//! - A WebSocket upgrade on an allowed path is relayed message by message ([`websocket`]).

mod headers;
mod io;
mod outcome;
mod pool;
mod timer;
mod websocket;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use futures_util::FutureExt;
use http_body_util::{BodyExt, Either, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::http::request::Parts;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tracing::{debug, info};

use super::{RouteSlot, Shared};
use crate::admission::{CallRate, PerClientCap, Permit};
use crate::clock;
use crate::config::{ForwardedHeader, JsonRpc};
use crate::http1 as wire;
use crate::jsonrpc::{Forwarded, Kind, Refusal, Verdict};
use crate::log_limit::LogLimit;
use headers::{address_fields, client_address, forwarded_field, upstream_headers, wants_websocket};
use io::{Activity, Counted};
use outcome::{CallOutcome, Outcome, Stats};
use pool::{Answer, NoUpstream, Pool, Relayed, SendError, Upstream};
use timer::ConnectionTimer;

/// Longest a client may take to send a request head.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request head (request line and headers).
const MAX_HEAD: usize = 64 * 1024;
/// Longest a client may take to send a request body.
const BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest the node may take to start answering a request.
pub(super) const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(120);
/// How long open requests get to finish when the connection is closed (idle, or shutdown).
const GRACE: Duration = Duration::from_secs(10);

static NO_UPSTREAM_LOG: LogLimit = LogLimit::new(Duration::from_secs(10));

/// What the gateway gives a response body: its own answers, or the node's streamed through.
pub(super) type Body = Either<Full<Bytes>, Relayed>;

/// One route's gateway state; kept across reloads that keep the route.
pub(super) struct Gateway {
    settings: ArcSwap<JsonRpc>,
    calls: ArcSwap<CallRate>,
    pub(super) websockets: Arc<PerClientCap>,
    /// Idle upstream connections; reset when a reload changes the upstreams (so a removed
    /// upstream is not used again).
    pub(super) pool: Arc<Pool>,
    pub(super) stats: Stats,
}

impl Gateway {
    pub(super) fn new(settings: &JsonRpc) -> Arc<Self> {
        Arc::new(Self {
            calls: ArcSwap::from_pointee(CallRate::new(settings.rate_per_ip)),
            settings: ArcSwap::from_pointee(settings.clone()),
            websockets: Arc::default(),
            pool: Arc::default(),
            stats: Stats::default(),
        })
    }

    /// Apply a reloaded route's settings to later requests.
    pub(super) fn update(&self, settings: &JsonRpc, upstreams_changed: bool) {
        if self.calls.load().rate() != settings.rate_per_ip {
            self.calls
                .store(Arc::new(CallRate::new(settings.rate_per_ip)));
        }
        self.settings.store(Arc::new(settings.clone()));
        if upstreams_changed {
            self.pool.reset();
        }
    }

    pub(super) fn settings(&self) -> Arc<JsonRpc> {
        self.settings.load_full()
    }
}

/// Why an exchange with the node failed.
enum Failure {
    NoUpstream,
    Node(String),
}

impl From<NoUpstream> for Failure {
    fn from(_: NoUpstream) -> Self {
        Self::NoUpstream
    }
}

/// What each request of one client connection needs.
pub(super) struct Ctx {
    pub(super) slot: Arc<RouteSlot>,
    pub(super) gateway: Arc<Gateway>,
    pub(super) shared: Arc<Shared>,
    pub(super) client: SocketAddr,
    /// Whether the client connection is HTTPS (for `X-Forwarded-Proto`).
    https: bool,
    /// The client address fields as the node gets them, written once per connection for the
    /// `forwarded` setting it started under (a reload that changes it is followed per request).
    address_fields: (ForwardedHeader, Vec<u8>),
    /// The connection's timer: hyper's header deadline and the node's answer deadline.
    timer: ConnectionTimer,
    /// The connection's admission permit. A WebSocket relayed from this connection holds the
    /// context, so the place stays taken for as long as the socket is open.
    _permit: Permit,
}

/// Serve one admitted client connection until it closes, idles out, or the route stops.
pub(super) async fn serve(
    slot: Arc<RouteSlot>,
    gateway: Arc<Gateway>,
    shared: Arc<Shared>,
    tcp: TcpStream,
    client: SocketAddr,
    permit: Permit,
) {
    let _ = tcp.set_nodelay(true);
    let idle_timeout = slot.route.load().idle_timeout;
    let stop = slot.stop.clone();
    let activity = Activity::new();
    let io = Counted {
        inner: tcp,
        slot: slot.clone(),
        activity: activity.clone(),
    };
    let settings = gateway.settings();
    let tls = settings.tls.clone();
    let https = tls.is_some();
    let address_fields = (
        settings.forwarded,
        address_fields(client, settings.forwarded, https),
    );
    let ctx = Arc::new(Ctx {
        slot,
        gateway,
        shared,
        client,
        https,
        address_fields,
        timer: ConnectionTimer::default(),
        _permit: permit,
    });
    match tls {
        None => run(io, ctx, activity, idle_timeout, stop).await,
        Some(tls) => {
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.server);
            let handshake = tokio::select! {
                () = stop.cancelled() => return,
                handshake = tokio::time::timeout(HEADER_TIMEOUT, acceptor.accept(io)) => handshake,
            };
            match handshake {
                Ok(Ok(stream)) => run(stream, ctx, activity, idle_timeout, stop).await,
                Ok(Err(e)) => {
                    ctx.gateway.stats.request(Outcome::TlsFailed);
                    debug!(%client, "TLS handshake failed: {e}");
                }
                Err(_) => {
                    ctx.gateway.stats.request(Outcome::TlsFailed);
                    debug!(%client, "TLS handshake timed out");
                }
            }
        }
    }
}

/// HTTP on an established (plain or TLS) client connection.
async fn run<I>(
    io: I,
    ctx: Arc<Ctx>,
    activity: Activity,
    idle_timeout: Duration,
    stop: tokio_util::sync::CancellationToken,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let client = ctx.client;
    let timer = ctx.timer.clone();
    let service = service_fn(move |request| {
        let ctx = ctx.clone();
        async move { Ok::<_, Infallible>(ctx.handle(request).await) }
    });
    let connection = http1::Builder::new()
        .timer(timer)
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(MAX_HEAD)
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    let mut connection = std::pin::pin!(connection);
    // The route's stop and the idle watch are awaited by a task of their own, which tells
    // this one through a oneshot: polled with the connection on every wake-up, they would
    // each cost a lock of the route-wide stop signal and a timer poll per request.
    let (close, mut closing) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let mut close = close;
        tokio::select! {
            () = close.closed() => return,
            () = stop.cancelled() => {}
            () = activity.idle(idle_timeout) => {}
        }
        let _ = close.send(());
    });
    tokio::select! {
        biased;
        result = connection.as_mut() => {
            if let Err(e) = result {
                debug!(%client, "client connection ended: {e}");
            }
            return;
        }
        _ = &mut closing => {}
    }
    connection.as_mut().graceful_shutdown();
    let _ = tokio::time::timeout(GRACE, connection).await;
}

impl Ctx {
    async fn handle(self: &Arc<Self>, request: Request<Incoming>) -> Response<Body> {
        let settings = self.gateway.settings();
        let policy = &settings.policy;
        let upgrade = wants_websocket(request.headers());
        let length = request
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let kind = match policy.check_request(
            request.method().as_str(),
            request.uri().path(),
            upgrade,
            length,
        ) {
            Ok(kind) => kind,
            Err(refusal) => return self.refuse(refusal),
        };
        match kind {
            Kind::WebSocket { calls } if settings.websocket => {
                Box::pin(websocket::upgrade(
                    self.clone(),
                    settings.clone(),
                    request,
                    calls,
                ))
                .await
            }
            Kind::WebSocket { .. } => self.refuse(Refusal::Forbidden),
            Kind::GetMethod(method) => {
                if !self.calls_allowed(1) {
                    return self.rate_limited(1);
                }
                self.gateway.stats.call(&method, CallOutcome::Forwarded);
                let (parts, _) = request.into_parts();
                self.forward(parts, Bytes::new(), &[], &settings).await
            }
            Kind::Post => {
                let (parts, body) = request.into_parts();
                let read = read_body(body, policy.max_body);
                let mut read = std::pin::pin!(read);
                // A small body is usually here with its head: no timer for it.
                let read = match read.as_mut().now_or_never() {
                    Some(read) => read,
                    None => {
                        let deadline = self.timer.reused_until(clock::now() + BODY_TIMEOUT);
                        tokio::select! {
                            biased;
                            read = read => read,
                            () = deadline => Err(BodyError::Late),
                        }
                    }
                };
                let bytes = match read {
                    Ok(bytes) => bytes,
                    Err(BodyError::TooLarge) => return self.refuse(Refusal::TooLarge),
                    Err(BodyError::Broken) => {
                        return self.answer_status(
                            Outcome::BadRequest,
                            StatusCode::BAD_REQUEST,
                            "bad request body\n",
                        );
                    }
                    Err(BodyError::Late) => {
                        return self.answer_status(
                            Outcome::BadRequest,
                            StatusCode::REQUEST_TIMEOUT,
                            "request body not received in time\n",
                        );
                    }
                };
                match policy.check_body(&bytes) {
                    Verdict::Answer { json, calls } => {
                        if !self.calls_allowed(calls) {
                            return self.rate_limited(calls);
                        }
                        self.gateway.stats.refused_calls(calls);
                        self.gateway.stats.request(Outcome::Answered);
                        json_response(json)
                    }
                    Verdict::Forward {
                        body,
                        answered,
                        calls,
                        methods,
                    } => {
                        if !self.calls_allowed(calls) {
                            return self.rate_limited(calls);
                        }
                        self.gateway.stats.forwarded(&methods, calls, None);
                        let body = match body {
                            Forwarded::Unchanged => bytes,
                            Forwarded::Rebuilt(text) => Bytes::from(text),
                        };
                        self.forward(parts, body, &answered, &settings).await
                    }
                }
            }
        }
    }

    /// Whether the client may make `calls` more calls now (they are counted if so).
    pub(super) fn calls_allowed(&self, calls: usize) -> bool {
        let now = clock::now() - self.shared.epoch;
        self.gateway
            .calls
            .load()
            .allow(now, self.client.ip(), calls)
    }

    fn rate_limited(&self, calls: usize) -> Response<Body> {
        self.gateway.stats.rate_limited_calls(calls);
        let mut response = self.answer_status(
            Outcome::RateLimited,
            StatusCode::TOO_MANY_REQUESTS,
            "too many calls from this address; slow down\n",
        );
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        response
    }

    pub(super) fn refuse(&self, refusal: Refusal) -> Response<Body> {
        match refusal {
            Refusal::Forbidden => self.answer_status(
                Outcome::Forbidden,
                StatusCode::FORBIDDEN,
                "forbidden: this path is not served here\n",
            ),
            Refusal::MethodNotAllowed => {
                let mut response = self.answer_status(
                    Outcome::MethodNotAllowed,
                    StatusCode::METHOD_NOT_ALLOWED,
                    "method not allowed: send JSON-RPC calls by POST\n",
                );
                response
                    .headers_mut()
                    .insert(header::ALLOW, HeaderValue::from_static("POST"));
                response
            }
            Refusal::TooLarge => self.answer_status(
                Outcome::TooLarge,
                StatusCode::PAYLOAD_TOO_LARGE,
                "request body too large\n",
            ),
        }
    }

    pub(super) fn answer_status(
        &self,
        outcome: Outcome,
        status: StatusCode,
        text: &'static str,
    ) -> Response<Body> {
        self.gateway.stats.request(outcome);
        let mut response =
            Response::new(Either::Left(Full::new(Bytes::from_static(text.as_bytes()))));
        *response.status_mut() = status;
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        response
    }

    /// The request to send to the node, for hyper's client (a WebSocket upgrade): the
    /// client's method, path and query, and headers without hop-by-hop and client-chosen
    /// forwarding headers, plus the client's address.
    pub(super) fn upstream_request(
        &self,
        parts: &Parts,
        body: Bytes,
        settings: &JsonRpc,
    ) -> Option<Request<Full<Bytes>>> {
        // Origin form, as HTTP/1.1 sends it to a server.
        let uri: Uri = parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .parse()
            .ok()?;
        let mut headers = upstream_headers(&parts.headers);
        if !body.is_empty() || parts.method == Method::POST {
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        }
        for (name, value) in client_address(self.client, settings.forwarded, self.https) {
            headers.insert(name, value);
        }
        let mut request = Request::new(Full::new(body));
        *request.method_mut() = parts.method.clone();
        *request.uri_mut() = uri;
        *request.headers_mut() = headers;
        Some(request)
    }

    /// The same request as bytes on the wire, head and body in one buffer, for the pooled
    /// upstream connections.
    fn upstream_bytes(&self, parts: &Parts, body: &[u8], settings: &JsonRpc) -> Vec<u8> {
        let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let mut out = Vec::with_capacity(256 + body.len());
        wire::request_line(&mut out, &parts.method, target);
        let named = wire::connection_tokens(&parts.headers);
        for (name, value) in &parts.headers {
            if forwarded_field(name, &named) {
                wire::header_field(&mut out, name, value);
            }
        }
        if !body.is_empty() || parts.method == Method::POST {
            wire::content_length(&mut out, body.len());
        }
        match &self.address_fields {
            (how, fields) if *how == settings.forwarded => out.extend_from_slice(fields),
            _ => out.extend(address_fields(self.client, settings.forwarded, self.https)),
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(body);
        out
    }

    /// An upstream connection: a pooled one, or a new one.
    async fn upstream(&self) -> Result<Upstream, NoUpstream> {
        if let Some(upstream) = self.gateway.pool.take() {
            return Ok(upstream);
        }
        Box::pin(Upstream::open(
            &self.shared,
            &self.slot,
            self.gateway.pool.generation(),
        ))
        .await
    }

    /// Send to the node over an upstream connection; the response body drives it.
    async fn send_upstream(
        &self,
        request: &[u8],
        method: &Method,
    ) -> Result<Answer, Response<Body>> {
        let pool = &self.gateway.pool;
        let exchange = async {
            let mut upstream = self.upstream().await?;
            loop {
                upstream.serve(self.client.ip());
                match upstream.exchange(request, method, pool).await {
                    Ok(answer) => return Ok(answer),
                    // A pooled connection the node closed meanwhile: once more on a new one.
                    Err((stale, SendError::Stale(e))) if !stale.is_fresh() => {
                        debug!(client = %self.client, "pooled upstream connection closed ({e}); opening another");
                        upstream =
                            Box::pin(Upstream::open(&self.shared, &self.slot, pool.generation()))
                                .await?;
                    }
                    Err((_, SendError::Stale(e) | SendError::Failed(e))) => {
                        return Err(Failure::Node(e));
                    }
                }
            }
        };
        let deadline = self.timer.reused_until(clock::now() + UPSTREAM_TIMEOUT);
        let outcome = tokio::select! {
            biased;
            outcome = exchange => Ok(outcome),
            () = deadline => Err(()),
        };
        match outcome {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(Failure::NoUpstream)) => Err(self.no_upstream()),
            Ok(Err(Failure::Node(e))) => {
                debug!(route = %self.slot.route.load().name, client = %self.client, "upstream request failed: {e}");
                Err(self.answer_status(
                    Outcome::UpstreamFailed,
                    StatusCode::BAD_GATEWAY,
                    "the node did not answer\n",
                ))
            }
            Err(_) => Err(self.answer_status(
                Outcome::UpstreamFailed,
                StatusCode::GATEWAY_TIMEOUT,
                "the node did not answer in time\n",
            )),
        }
    }

    pub(super) fn no_upstream(&self) -> Response<Body> {
        if let Some(suppressed) = NO_UPSTREAM_LOG.allow() {
            info!(route = %self.slot.route.load().name, client = %self.client, suppressed, "no upstream available; answered 503");
        }
        self.answer_status(
            Outcome::NoUpstream,
            StatusCode::SERVICE_UNAVAILABLE,
            "no upstream available; try again later\n",
        )
    }

    async fn forward(
        &self,
        parts: Parts,
        body: Bytes,
        answered: &[String],
        settings: &JsonRpc,
    ) -> Response<Body> {
        let request = self.upstream_bytes(&parts, &body, settings);
        let method = parts.method.clone();
        // The client's head and body are slices of hyper's read buffer. Let go of them before
        // waiting for the node, so hyper can reuse the buffer where it is when it reads the
        // connection meanwhile (to notice a client that leaves), not allocate another.
        drop((parts, body));
        let sent = clock::now();
        let Answer { head, body } = match self.send_upstream(&request, &method).await {
            Ok(answer) => answer,
            Err(answer) => return answer,
        };
        self.gateway
            .stats
            .answer
            .observe(clock::now().duration_since(sent).as_secs_f64());
        self.gateway.stats.request(Outcome::Forwarded);
        let mut response = Response::new(());
        *response.status_mut() = head.status;
        *response.headers_mut() = head.headers;
        let (mut head, ()) = response.into_parts();
        if answered.is_empty() {
            return Response::from_parts(head, Either::Right(body));
        }
        // Some calls of the batch were answered here: merged into the node's array as it
        // streams through (nothing of it is held but its closing bracket).
        head.headers.remove(header::CONTENT_LENGTH);
        Response::from_parts(head, Either::Right(body.merged(answered.to_vec())))
    }
}

/// Why a request body was not read.
enum BodyError {
    /// Over `max_body`.
    TooLarge,
    /// The client broke off or broke the framing.
    Broken,
    /// Not received within [`BODY_TIMEOUT`].
    Late,
}

/// Read a request body of at most `max` bytes. A body that arrives as one piece (a JSON-RPC
/// call, usually) is taken as it is, without a copy.
async fn read_body(mut body: Incoming, max: usize) -> Result<Bytes, BodyError> {
    let mut first: Option<Bytes> = None;
    let mut more = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame.map_err(|_| BodyError::Broken)?.into_data() else {
            continue; // trailers
        };
        let held = first.as_ref().map_or(0, Bytes::len) + more.len();
        if held + data.len() > max {
            return Err(BodyError::TooLarge);
        }
        match &first {
            None => first = Some(data),
            Some(_) => more.extend_from_slice(&data),
        }
    }
    Ok(match first {
        None => Bytes::new(),
        Some(first) if more.is_empty() => first,
        Some(first) => {
            let mut whole = bytes::BytesMut::with_capacity(first.len() + more.len());
            whole.extend_from_slice(&first);
            whole.extend_from_slice(&more);
            whole.freeze()
        }
    })
}

fn json_response(json: Option<String>) -> Response<Body> {
    let body = json.map(Bytes::from).unwrap_or_default();
    let mut response = Response::new(Either::Left(Full::new(body)));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

//! The JSON-RPC gateway of a `protocol = "jsonrpc"` route: HTTP on the route's listener, every
//! request filtered ([`crate::jsonrpc`]) before anything reaches the node.
//!
//! - Each admitted client connection is served by hyper (HTTP/1.1, keep-alive), with a bounded
//!   head, a header timeout, a body timeout and the route's idle timeout.
//! - A request passes the path and method checks, then its body is read up to `max_body`
//!   (refused with 413 past it), checked, and counted against the client's call rate (a batch
//!   counts each call; 429 past it). Denied calls are answered by the sentry.
//! - What passes is sent to the first connected upstream over a tunnel stream taken from the
//!   route's pool ([`super::pool`]): no new stream per request while a pooled one is idle. The
//!   client's address goes in `X-Forwarded-For` or `Forwarded`; whatever the client wrote
//!   there is removed first.
//! - Per request, the connection's deadlines reuse its timer entries ([`super::timer`]), and
//!   the route's stop and the idle watch are awaited beside the connection, not polled with
//!   it.
//! - A WebSocket upgrade on an allowed path is relayed message by message ([`super::websocket`]).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use futures_util::FutureExt;
use http_body_util::{BodyExt, Either, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::http::request::Parts;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tracing::{debug, info};

use super::pool::{Answer, NoUpstream, Pool, Relayed, SendError, Upstream};
use super::timer::ConnectionTimer;
use super::{RouteSlot, Shared};
use crate::admission::{CallRate, PerClientCap, Permit};
use crate::config::{ForwardedHeader, JsonRpc};
use crate::http1 as wire;
use crate::jsonrpc::{Forwarded, Kind, Refusal, Verdict};
use crate::log_limit::LogLimit;
use crate::{clock, lock};

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
/// Distinct method names used as metric labels per route; later names count as `other`.
const MAX_METHOD_LABELS: usize = 64;

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
                Box::pin(super::websocket::upgrade(
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
                        for method in &methods {
                            self.gateway.stats.call(method, CallOutcome::Forwarded);
                        }
                        self.gateway
                            .stats
                            .refused_calls(calls.saturating_sub(methods.len()));
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
        let Answer { head, body } = match self.send_upstream(&request, &method).await {
            Ok(answer) => answer,
            Err(answer) => return answer,
        };
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

/// Whether the request asks for a WebSocket upgrade.
pub(super) fn wants_websocket(headers: &HeaderMap) -> bool {
    let has_token = |name: HeaderName, token: &str| {
        headers.get_all(name).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    has_token(header::CONNECTION, "upgrade") && has_token(header::UPGRADE, "websocket")
}

/// Header fields some node, proxy or framework reads as the client's address (or the scheme
/// and host it used), besides every `X-Forwarded-*`: a client could forge any of them, so the
/// node gets none from the client, only the one the route configures (`forwarded`).
const CLIENT_ADDRESS: [&str; 16] = [
    "forwarded",
    "x-real-ip",
    "x-client-ip",
    "client-ip",
    "true-client-ip",
    "cf-connecting-ip",
    "fastly-client-ip",
    "x-cluster-client-ip",
    "x-original-forwarded-for",
    "x-originating-ip",
    "x-remote-ip",
    "x-remote-addr",
    "x-envoy-external-address",
    "x-proxyuser-ip",
    "x-appengine-user-ip",
    "x-azure-clientip",
];

/// Whether a client's header field reaches the node: not hop-by-hop (nor named by its
/// `Connection`), not `Upgrade`, `Expect` (the body is already read) or the length (set
/// again for the body sent), and no client address header (see [`CLIENT_ADDRESS`]).
fn forwarded_field(name: &HeaderName, named_by_connection: &[String]) -> bool {
    let name_str = name.as_str();
    !wire::dropped_request_field(name, named_by_connection)
        && !name_str.starts_with("x-forwarded-")
        && !CLIENT_ADDRESS.contains(&name_str)
}

/// The client's headers as the node gets them (see [`forwarded_field`]).
fn upstream_headers(from: &HeaderMap) -> HeaderMap {
    let named = wire::connection_tokens(from);
    let mut headers = HeaderMap::with_capacity(from.len() + 2);
    for (name, value) in from {
        if forwarded_field(name, &named) {
            headers.append(name.clone(), value.clone());
        }
    }
    headers
}

/// [`client_address`] as header lines on the wire.
fn address_fields(client: SocketAddr, how: ForwardedHeader, https: bool) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in client_address(client, how, https) {
        wire::header_field(&mut out, &name, &value);
    }
    out
}

/// Who the client is, in the configured header (and `X-Forwarded-Proto` with
/// `X-Forwarded-For`).
fn client_address(
    client: SocketAddr,
    how: ForwardedHeader,
    https: bool,
) -> impl Iterator<Item = (HeaderName, HeaderValue)> {
    let ip = client.ip().to_canonical();
    let proto = if https { "https" } else { "http" };
    let fields: [Option<(HeaderName, HeaderValue)>; 2] = match how {
        ForwardedHeader::XForwardedFor => [
            Some((
                HeaderName::from_static("x-forwarded-proto"),
                HeaderValue::from_static(proto),
            )),
            HeaderValue::from_str(&ip.to_string())
                .ok()
                .map(|v| (HeaderName::from_static("x-forwarded-for"), v)),
        ],
        ForwardedHeader::Forwarded => {
            let value = match ip {
                std::net::IpAddr::V4(v4) => format!("for={v4};proto={proto}"),
                std::net::IpAddr::V6(v6) => format!("for=\"[{v6}]\";proto={proto}"),
            };
            [
                HeaderValue::from_str(&value)
                    .ok()
                    .map(|v| (header::FORWARDED, v)),
                None,
            ]
        }
        ForwardedHeader::None => [None, None],
    };
    fields.into_iter().flatten()
}

/// How a request ended, for `sentry_jsonrpc_requests_total{outcome}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Outcome {
    /// Sent to the node (all or some of its calls).
    Forwarded,
    /// Answered by the sentry alone: every call denied or invalid, or malformed JSON.
    Answered,
    /// 403: path not served.
    Forbidden,
    /// 405.
    MethodNotAllowed,
    /// 413.
    TooLarge,
    /// 429: the client's call rate, or its WebSocket cap.
    RateLimited,
    /// 400 or 408: a body that broke off or came too slowly.
    BadRequest,
    /// 503: no connected upstream answered.
    NoUpstream,
    /// 502 or 504: the node failed or did not answer in time.
    UpstreamFailed,
    /// A WebSocket was upgraded and relayed.
    WebSocket,
    /// Not a request: a connection whose TLS handshake failed or timed out.
    TlsFailed,
}

impl Outcome {
    pub(super) const ALL: [Self; 11] = [
        Self::Forwarded,
        Self::Answered,
        Self::Forbidden,
        Self::MethodNotAllowed,
        Self::TooLarge,
        Self::RateLimited,
        Self::BadRequest,
        Self::NoUpstream,
        Self::UpstreamFailed,
        Self::WebSocket,
        Self::TlsFailed,
    ];

    pub(super) const fn as_str(self) -> &'static str {
        match self {
            Self::Forwarded => "forwarded",
            Self::Answered => "answered",
            Self::Forbidden => "forbidden",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::TooLarge => "too_large",
            Self::RateLimited => "rate_limited",
            Self::BadRequest => "bad_request",
            Self::NoUpstream => "no_upstream",
            Self::UpstreamFailed => "upstream_failed",
            Self::WebSocket => "websocket",
            Self::TlsFailed => "tls_handshake_failed",
        }
    }
}

/// What became of one JSON-RPC call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum CallOutcome {
    Forwarded,
    /// Answered by the sentry: a denied method, or an invalid call.
    Refused,
    /// Its request (or WebSocket message) was over the client's call rate.
    RateLimited,
}

impl CallOutcome {
    const ALL: [Self; 3] = [Self::Forwarded, Self::Refused, Self::RateLimited];

    pub(super) const fn as_str(self) -> &'static str {
        match self {
            Self::Forwarded => "forwarded",
            Self::Refused => "refused",
            Self::RateLimited => "rate_limited",
        }
    }
}

/// A route's JSON-RPC counters. Method labels are bounded: the first [`MAX_METHOD_LABELS`]
/// distinct names seen keep their own label, later ones count as `other`; calls whose method
/// is not known (refused, rate-limited) count as `-`.
#[derive(Default)]
pub(super) struct Stats {
    requests: [AtomicU64; Outcome::ALL.len()],
    calls: Mutex<Calls>,
}

#[derive(Default)]
struct Calls {
    /// Per method label: counts by [`CallOutcome`] (forwarded, refused, rate_limited).
    counts: std::collections::HashMap<String, [u64; 3]>,
}

impl Stats {
    pub(super) fn request(&self, outcome: Outcome) {
        self.requests[outcome as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn requests(&self) -> impl Iterator<Item = (Outcome, u64)> + '_ {
        Outcome::ALL
            .iter()
            .map(|o| (*o, self.requests[*o as usize].load(Ordering::Relaxed)))
    }

    pub(super) fn call(&self, method: &str, outcome: CallOutcome) {
        let mut calls = lock(&self.calls);
        // A method seen before (every call but the first few of each method) hashes once.
        if let Some(counts) = calls.counts.get_mut(method) {
            counts[outcome as usize] += 1;
            return;
        }
        // Named labels: at most MAX_METHOD_LABELS, plus "other" and "-".
        let reserved = ["other", "-"]
            .iter()
            .filter(|l| calls.counts.contains_key(**l))
            .count();
        let named = calls.counts.len() - reserved;
        let label = if named < MAX_METHOD_LABELS && label_safe(method) {
            calls.counts.insert(method.to_owned(), [0; 3]);
            method
        } else {
            "other"
        };
        bump(&mut calls, label, outcome, 1);
    }

    pub(super) fn refused_calls(&self, n: usize) {
        self.unnamed(n, CallOutcome::Refused);
    }

    pub(super) fn rate_limited_calls(&self, n: usize) {
        self.unnamed(n, CallOutcome::RateLimited);
    }

    fn unnamed(&self, n: usize, outcome: CallOutcome) {
        if n > 0 {
            let n = u64::try_from(n).unwrap_or(u64::MAX);
            bump(&mut lock(&self.calls), "-", outcome, n);
        }
    }

    /// (method label, outcome, count) of every non-zero count, sorted.
    pub(super) fn calls(&self) -> Vec<(String, &'static str, u64)> {
        let mut rows: Vec<_> = lock(&self.calls)
            .counts
            .iter()
            .flat_map(|(method, counts)| {
                CallOutcome::ALL
                    .iter()
                    .zip(counts)
                    .filter(|(_, n)| **n > 0)
                    .map(|(outcome, n)| (method.clone(), outcome.as_str(), *n))
                    .collect::<Vec<_>>()
            })
            .collect();
        rows.sort();
        rows
    }
}

fn bump(calls: &mut Calls, label: &str, outcome: CallOutcome, n: u64) {
    if let Some(counts) = calls.counts.get_mut(label) {
        counts[outcome as usize] += n;
    } else {
        let mut counts = [0; 3];
        counts[outcome as usize] = n;
        calls.counts.insert(label.to_owned(), counts);
    }
}

/// A method name is a label value only when it is short and plain.
fn label_safe(method: &str) -> bool {
    !method.is_empty()
        && method.len() <= 64
        && method
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-' | b':'))
}

/// Whether a client connection moves bytes: a counter bumped on every read and write (no
/// clock read per I/O); the idle check looks at it once per timeout.
#[derive(Clone, Default)]
struct Activity {
    moved: Arc<AtomicU64>,
}

impl Activity {
    fn new() -> Self {
        Self::default()
    }

    fn touch(&self) {
        self.moved.fetch_add(1, Ordering::Relaxed);
    }

    /// Completes once no byte moved for a whole `timeout` (so after between one and two
    /// timeouts of silence).
    async fn idle(&self, timeout: Duration) {
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
struct Counted {
    inner: TcpStream,
    slot: Arc<RouteSlot>,
    activity: Activity,
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
    fn wrote(&self, n: usize) {
        if n > 0 {
            self.slot.bytes.down.fetch_add(n as u64, Ordering::Relaxed);
            self.activity.touch();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    #[test]
    fn client_chosen_address_headers_never_reach_the_node() {
        let from = headers(&[
            ("host", "rpc.example"),
            ("content-type", "application/json"),
            ("x-forwarded-for", "10.0.0.1"),
            ("Forwarded", "for=10.0.0.1"),
            ("x-real-ip", "10.0.0.1"),
            ("X-Client-IP", "10.0.0.1"),
            ("True-Client-IP", "10.0.0.1"),
            ("CF-Connecting-IP", "10.0.0.1"),
            ("X-Forwarded-Port", "443"),
            ("X-Forwarded-Server", "evil"),
            ("x-cluster-client-ip", "10.0.0.1"),
            ("Fastly-Client-IP", "10.0.0.1"),
            ("X-Originating-IP", "10.0.0.1"),
            ("connection", "keep-alive, x-secret"),
            ("x-secret", "hop"),
            ("keep-alive", "timeout=5"),
            ("transfer-encoding", "chunked"),
            ("content-length", "99"),
            ("expect", "100-continue"),
        ]);
        let mut out = upstream_headers(&from);
        out.extend(client_address(
            "[::ffff:203.0.113.9]:4000".parse().unwrap(),
            ForwardedHeader::XForwardedFor,
            false,
        ));
        let names: Vec<&str> = out.keys().map(HeaderName::as_str).collect();
        assert_eq!(
            names,
            [
                "host",
                "content-type",
                "x-forwarded-proto",
                "x-forwarded-for"
            ]
        );
        assert_eq!(out["x-forwarded-for"], "203.0.113.9");

        let mut out = upstream_headers(&from);
        out.extend(client_address(
            "[2001:db8::7]:4000".parse().unwrap(),
            ForwardedHeader::Forwarded,
            true,
        ));
        assert_eq!(out["forwarded"], "for=\"[2001:db8::7]\";proto=https");
        assert!(!out.contains_key("x-forwarded-for"));

        let mut out = upstream_headers(&from);
        out.extend(client_address(
            "203.0.113.9:1".parse().unwrap(),
            ForwardedHeader::None,
            false,
        ));
        assert!(!out.contains_key("x-forwarded-for") && !out.contains_key("forwarded"));
    }

    #[test]
    fn websocket_upgrade_is_recognised_by_tokens() {
        assert!(wants_websocket(&headers(&[
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "WebSocket"),
        ])));
        assert!(!wants_websocket(&headers(&[("upgrade", "websocket")])));
        assert!(!wants_websocket(&headers(&[
            ("connection", "upgrade"),
            ("upgrade", "h2c"),
        ])));
    }

    #[test]
    fn method_labels_are_bounded() {
        let stats = Stats::default();
        for i in 0..(MAX_METHOD_LABELS + 10) {
            stats.call(&format!("eth_m{i}"), CallOutcome::Forwarded);
        }
        stats.call("eth_m0", CallOutcome::Forwarded);
        stats.call("bad label\n", CallOutcome::Forwarded);
        stats.refused_calls(3);
        let rows = stats.calls();
        assert_eq!(rows.len(), MAX_METHOD_LABELS + 2, "the names, other, and -");
        let count = |m: &str| rows.iter().find(|r| r.0 == m).map(|r| r.2);
        assert_eq!(count("eth_m0"), Some(2));
        assert_eq!(count("other"), Some(11));
        assert_eq!(count("-"), Some(3));
    }
}

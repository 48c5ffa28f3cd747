//! WebSockets on a JSON-RPC route: the upgrade is relayed to the node, then every message the
//! client sends is filtered like a `POST` body before it may reach the node.
//!
//! - The node must accept the upgrade first; only then does the client get its `101`. A node
//!   that refuses has its answer passed to the client.
//! - Client messages are capped at `max_body` (frame and message): a larger one closes the
//!   socket with 1009. Each text (or binary) message is a JSON-RPC request or batch: denied
//!   calls are answered on the socket by the sentry and never forwarded; calls count against
//!   the client's call rate, and a message over it is answered with a JSON-RPC error (-32005).
//!   On goloop's block and event sockets, whose messages are its own subscription requests
//!   rather than calls, each message must be bounded, well-formed JSON and counts as one call.
//! - Node messages go to the client as they come. Pings are answered on each side; control
//!   frames are not relayed. Compression is never negotiated (the extension header is not
//!   forwarded), so every message is seen as sent.
//! - Each direction is bounded: the sentry's own answers go through a small queue, and a side
//!   that does not read holds the other side back rather than growing memory.
//! - Time limits: a socket silent both ways for the route's `idle_timeout` is closed (1001),
//!   and so is one whose client takes nothing the sentry has for it for [`DRAIN_DEADLINE`]
//!   (or the `idle_timeout`, if shorter): a client that stops reading holds the node's socket
//!   and a tunnel stream only that long.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tracing::debug;

use super::outcome::Outcome;
use super::pool::{Relayed, Upstream};
use super::{Body, Ctx, UPSTREAM_TIMEOUT};
use crate::clock;
use crate::config::JsonRpc;
use crate::jsonrpc::filter::error as rpc_error;
use crate::jsonrpc::{Forwarded, Verdict};
use crate::relay::{idle_watch, millis_since};

/// JSON-RPC error code for a call over the client's rate (EIP-1474 "limit exceeded").
const LIMIT_EXCEEDED: i32 = -32005;
/// The sentry's own answers waiting to be written to the client.
const ANSWER_QUEUE: usize = 16;
/// How long a close handshake may take when the sentry ends a socket.
const CLOSE_GRACE: Duration = Duration::from_secs(2);
/// Longest a message for the client may wait for the client to take it.
const DRAIN_DEADLINE: Duration = Duration::from_secs(30);

/// Relay a WebSocket upgrade (already checked: allowed path, `websocket = true`).
pub(in crate::sentry) async fn upgrade(
    ctx: Arc<Ctx>,
    settings: Arc<JsonRpc>,
    mut request: Request<Incoming>,
    calls: bool,
) -> Response<Body> {
    let headers = request.headers();
    let version_ok = headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_some_and(|v| v == "13");
    let Some(key) = headers.get(header::SEC_WEBSOCKET_KEY).cloned() else {
        return ctx.answer_status(
            Outcome::BadRequest,
            StatusCode::BAD_REQUEST,
            "WebSocket upgrade without Sec-WebSocket-Key\n",
        );
    };
    if !version_ok {
        let mut response = ctx.answer_status(
            Outcome::BadRequest,
            StatusCode::UPGRADE_REQUIRED,
            "unsupported WebSocket version\n",
        );
        response.headers_mut().insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        return response;
    }
    let Some(held) = ctx
        .gateway
        .websockets
        .take(ctx.client.ip(), settings.max_websockets_per_ip)
    else {
        return ctx.answer_status(
            Outcome::RateLimited,
            StatusCode::TOO_MANY_REQUESTS,
            "too many WebSockets from this address\n",
        );
    };
    let client_upgrade = hyper::upgrade::on(&mut request);
    let (parts, _) = request.into_parts();
    let Some(mut upstream) = ctx.upstream_request(&parts, Bytes::new(), &settings) else {
        return ctx.refuse(crate::jsonrpc::Refusal::Forbidden);
    };
    let up_headers = upstream.headers_mut();
    up_headers.remove(header::SEC_WEBSOCKET_EXTENSIONS);
    up_headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    up_headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    // A WebSocket holds its stream for its whole life: a stream of its own, never pooled.
    let Ok(mut sender) = Upstream::open_for_upgrade(&ctx.shared, &ctx.slot).await else {
        return ctx.no_upstream();
    };
    let response = match tokio::time::timeout(UPSTREAM_TIMEOUT, sender.send_request(upstream)).await
    {
        Ok(Ok(response)) => response,
        Ok(Err(e)) => {
            debug!(client = %ctx.client, "WebSocket upgrade to the node failed: {e}");
            return ctx.answer_status(
                Outcome::UpstreamFailed,
                StatusCode::BAD_GATEWAY,
                "the node did not answer\n",
            );
        }
        Err(_) => {
            return ctx.answer_status(
                Outcome::UpstreamFailed,
                StatusCode::GATEWAY_TIMEOUT,
                "the node did not answer in time\n",
            );
        }
    };
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        // The node refused the upgrade: its answer is the client's.
        ctx.gateway.stats.request(Outcome::Forwarded);
        let (head, body) = response.into_parts();
        return Response::from_parts(head, Either::Right(Relayed::plain(body)));
    }
    let protocol = response
        .headers()
        .get(header::SEC_WEBSOCKET_PROTOCOL)
        .cloned();
    let node_upgrade = hyper::upgrade::on(response);
    ctx.gateway.stats.request(Outcome::WebSocket);
    let relay_ctx = ctx.clone();
    ctx.shared.relays.spawn(async move {
        let (client_io, node_io) = match tokio::join!(client_upgrade, node_upgrade) {
            (Ok(client), Ok(node)) => (client, node),
            (client, node) => {
                debug!(client = %relay_ctx.client, "WebSocket upgrade did not complete: client {:?}, node {:?}", client.err(), node.err());
                return;
            }
        };
        let limit = settings.policy.max_body;
        let client_config = WebSocketConfig::default()
            .max_message_size(Some(limit))
            .max_frame_size(Some(limit));
        let client = WebSocketStream::from_raw_socket(
            TokioIo::new(client_io),
            Role::Server,
            Some(client_config),
        )
        .await;
        let node =
            WebSocketStream::from_raw_socket(TokioIo::new(node_io), Role::Client, None).await;
        relay(&relay_ctx, &settings, calls, client, node).await;
        drop(held);
    });
    let mut answer = Response::new(Either::Left(Full::new(Bytes::new())));
    *answer.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let out = answer.headers_mut();
    out.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    out.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(accept) = HeaderValue::from_str(&derive_accept_key(key.as_bytes())) {
        out.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    if let Some(protocol) = protocol {
        out.insert(header::SEC_WEBSOCKET_PROTOCOL, protocol);
    }
    answer
}

/// What to do with one client message.
enum Step {
    /// Send this to the node (and these answers to the client).
    Forward(Message, Option<String>),
    /// Answer the client only.
    Answer(Option<String>),
}

/// Decide on one client data message.
fn filter(ctx: &Ctx, settings: &JsonRpc, calls: bool, data: &[u8], text: bool) -> Step {
    let verdict = if calls {
        settings.policy.check_body(data)
    } else {
        settings.policy.check_subscription(data)
    };
    let calls = match &verdict {
        Verdict::Answer { calls, .. } | Verdict::Forward { calls, .. } => *calls,
    };
    if !ctx.calls_allowed(calls) {
        ctx.gateway.stats.rate_limited_calls(calls);
        let message = "too many calls from this address; slow down";
        return Step::Answer(Some(rpc_error(None, LIMIT_EXCEEDED, message)));
    }
    match verdict {
        Verdict::Answer { json, calls } => {
            ctx.gateway.stats.refused_calls(calls);
            Step::Answer(json)
        }
        Verdict::Forward {
            body,
            answered,
            calls,
            methods,
        } => {
            // A message without a method: a subscription request of the node's own protocol.
            ctx.gateway
                .stats
                .forwarded(&methods, calls, Some("subscription"));
            let message = match (body, text) {
                (Forwarded::Unchanged, true) => {
                    Message::Text(String::from_utf8_lossy(data).into_owned().into())
                }
                (Forwarded::Unchanged, false) => Message::Binary(Bytes::copy_from_slice(data)),
                (Forwarded::Rebuilt(json), true) => Message::Text(json.into()),
                (Forwarded::Rebuilt(json), false) => Message::Binary(Bytes::from(json)),
            };
            // Inside a socket the node answers the forwarded part of a batch in its own
            // message; the sentry's answers to the rest go ahead of it as a batch of errors.
            let answers = (!answered.is_empty()).then(|| format!("[{}]", answered.join(",")));
            Step::Forward(message, answers)
        }
    }
}

async fn relay<C, N>(
    ctx: &Ctx,
    settings: &JsonRpc,
    calls: bool,
    client: WebSocketStream<C>,
    node: WebSocketStream<N>,
) where
    C: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    N: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (mut client_tx, mut client_rx) = client.split();
    let (mut node_tx, mut node_rx) = node.split();
    let (answers_tx, mut answers_rx) = mpsc::channel::<Message>(ANSWER_QUEUE);
    let stop = ctx.slot.stop.clone();
    let idle = ctx.slot.route.load().idle_timeout;
    let drain = idle.min(DRAIN_DEADLINE);
    // Milliseconds since `start` at the last frame either way (pings count: they are what a
    // quiet client sends to stay open).
    let start = clock::now();
    let last = std::sync::atomic::AtomicU64::new(0);
    let moved = || last.store(millis_since(start), std::sync::atomic::Ordering::Relaxed);

    // Client → node, filtered.
    let up = async {
        while let Some(message) = client_rx.next().await {
            moved();
            let message = match message {
                Ok(message) => message,
                Err(e) => {
                    debug!(client = %ctx.client, "WebSocket from the client ended: {e}");
                    let size = matches!(e, tokio_tungstenite::tungstenite::Error::Capacity(_));
                    return size.then_some(Close::TooLarge);
                }
            };
            let step = match &message {
                Message::Text(text) => filter(ctx, settings, calls, text.as_bytes(), true),
                Message::Binary(data) => filter(ctx, settings, calls, data, false),
                Message::Close(frame) => {
                    let _ = node_tx.send(Message::Close(frame.clone())).await;
                    return None;
                }
                // Answered by this side's protocol handler; not relayed.
                Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
            };
            let (forward, answer) = match step {
                Step::Forward(message, answer) => (Some(message), answer),
                Step::Answer(answer) => (None, answer),
            };
            if let Some(answer) = answer
                && answers_tx.send(Message::Text(answer.into())).await.is_err()
            {
                return None;
            }
            if let Some(message) = forward
                && node_tx.send(message).await.is_err()
            {
                return None;
            }
        }
        None
    };

    // Node → client, and the sentry's answers.
    let down = async {
        loop {
            let message = tokio::select! {
                message = node_rx.next() => match message {
                    Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {
                        moved();
                        continue;
                    }
                    Some(Ok(message)) => message,
                    Some(Err(e)) => {
                        debug!(client = %ctx.client, "WebSocket from the node ended: {e}");
                        return;
                    }
                    None => return,
                },
                Some(answer) = answers_rx.recv() => answer,
            };
            moved();
            let closing = matches!(message, Message::Close(_));
            match tokio::time::timeout(drain, client_tx.send(message)).await {
                Ok(Ok(())) if !closing => moved(),
                Ok(_) => return,
                Err(_) => {
                    debug!(client = %ctx.client, "WebSocket client took nothing for {drain:?}: closed");
                    return;
                }
            }
        }
    };

    let close = tokio::select! {
        code = up => code,
        () = down => None,
        () = idle_watch(start, &last, idle) => Some(Close::Idle),
        () = stop.cancelled() => Some(Close::Shutdown),
    };
    if let Some(close) = close {
        let (code, reason) = match close {
            Close::TooLarge => (CloseCode::Size, "message too large"),
            Close::Idle => (CloseCode::Away, "idle"),
            Close::Shutdown => (CloseCode::Away, "sentry shutting down"),
        };
        let frame = CloseFrame {
            code,
            reason: reason.into(),
        };
        // The node learns the socket is gone either way; the client is told why.
        let _ = tokio::time::timeout(CLOSE_GRACE, async {
            let _ = client_tx.send(Message::Close(Some(frame))).await;
            let _ = node_tx.send(Message::Close(None)).await;
        })
        .await;
    }
}

/// Why the sentry closes a socket.
enum Close {
    /// A client message over `max_body` (1009).
    TooLarge,
    /// Silent both ways for the route's `idle_timeout` (1001).
    Idle,
    /// The route was removed or the sentry stops (1001).
    Shutdown,
}

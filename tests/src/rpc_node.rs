//! A stand-in for a node's RPC port that records everything it receives: HTTP requests (method,
//! path, headers, body) and WebSocket messages, and answers like a JSON-RPC server.
//!
//! - `POST`: each call with an `id` gets `{"jsonrpc":"2.0","id":<id>,"result":"<method>"}`
//!   (a batch gets an array); a body that is not JSON gets a parse error. It trusts its input:
//!   test fixture only.
//! - `GET /<anything>`: `{"jsonrpc":"2.0","id":-1,"result":"<path>"}`.
//! - A WebSocket upgrade on any path: every text message is answered as a `POST` body would
//!   be, and a call of a method ending in `subscribe` is followed by one notification
//!   `{"jsonrpc":"2.0","method":"subscription","params":{"result":"tick"}}`. A message that is
//!   not a call (goloop's `{"height": ...}`) is answered with `{"code":0}` and a notification.
//!   A call of `flood` is followed by notifications of 1 KiB until the socket fails (at most
//!   256 MiB of them).
#![allow(clippy::unwrap_used)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;

/// One HTTP request as the node received it.
#[derive(Debug, Clone)]
pub struct Received {
    pub method: String,
    /// Path and query.
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Received {
    /// The value of header `name` (lowercase), if present once or more (the first).
    #[must_use]
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as text.
    #[must_use]
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// What the node has seen.
#[derive(Default)]
pub struct Log {
    pub requests: Mutex<Vec<Received>>,
    /// Text messages received on WebSockets.
    pub messages: Mutex<Vec<String>>,
    /// TCP connections accepted.
    pub connections: AtomicUsize,
}

impl Log {
    #[must_use]
    pub fn requests(&self) -> Vec<Received> {
        self.requests.lock().unwrap().clone()
    }

    #[must_use]
    pub fn messages(&self) -> Vec<String> {
        self.messages.lock().unwrap().clone()
    }

    #[must_use]
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }
}

/// Start the node on loopback: its address and its log.
pub async fn start() -> (SocketAddr, Arc<Log>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let log = Arc::new(Log::default());
    let accept_log = log.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            accept_log.connections.fetch_add(1, Ordering::Relaxed);
            let log = accept_log.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request| {
                    let log = log.clone();
                    async move { Ok::<_, Infallible>(answer(request, log).await) }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .with_upgrades()
                    .await;
            });
        }
    });
    (addr, log)
}

async fn answer(mut request: Request<Incoming>, log: Arc<Log>) -> Response<Full<Bytes>> {
    let upgrade = request
        .headers()
        .get("upgrade")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
    let key = request.headers().get("sec-websocket-key").cloned();
    let on_upgrade = hyper::upgrade::on(&mut request);
    let (parts, body) = request.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let path = parts
        .uri
        .path_and_query()
        .map_or("/".to_owned(), |p| p.as_str().to_owned());
    log.requests.lock().unwrap().push(Received {
        method: parts.method.to_string(),
        path: path.clone(),
        headers: parts
            .headers
            .iter()
            .map(|(n, v)| {
                (
                    n.to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body: body.to_vec(),
    });
    if let (true, Some(key)) = (upgrade, key) {
        tokio::spawn(async move {
            let Ok(io) = on_upgrade.await else { return };
            let ws = WebSocketStream::from_raw_socket(TokioIo::new(io), Role::Server, None).await;
            socket(ws, log).await;
        });
        return Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-accept", derive_accept_key(key.as_bytes()))
            .body(Full::default())
            .unwrap();
    }
    let json = if parts.method == hyper::Method::GET {
        format!(
            "{{\"jsonrpc\":\"2.0\",\"id\":-1,\"result\":{}}}",
            Value::from(path)
        )
    } else {
        reply(&body).unwrap_or_default()
    };
    Response::builder()
        .header("content-type", "application/json")
        .header("x-node", "stand-in")
        .body(Full::new(Bytes::from(json)))
        .unwrap()
}

/// The answer to a JSON-RPC body; `None` when nothing is answered (notifications only).
fn reply(body: &[u8]) -> Option<String> {
    let Ok(value) = serde_json::from_slice::<Value>(body) else {
        return Some(
            r#"{"jsonrpc":"2.0","id":null,"error":{"code":-32700,"message":"node: parse error"}}"#
                .to_owned(),
        );
    };
    let one = |call: &Value| -> Option<Value> {
        let id = call.get("id")?.clone();
        let method = call.get("method").cloned().unwrap_or(Value::Null);
        Some(serde_json::json!({"jsonrpc": "2.0", "id": id, "result": method}))
    };
    match value {
        Value::Array(calls) => {
            let answers: Vec<Value> = calls.iter().filter_map(one).collect();
            (!answers.is_empty()).then(|| Value::Array(answers).to_string())
        }
        call => one(&call).map(|v| v.to_string()),
    }
}

async fn socket<S>(mut ws: WebSocketStream<S>, log: Arc<Log>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    while let Some(Ok(message)) = ws.next().await {
        let text = match message {
            Message::Text(text) => text.as_str().to_owned(),
            Message::Close(_) => break,
            _ => continue,
        };
        log.messages.lock().unwrap().push(text.clone());
        let value: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        let is_call = value.get("method").is_some() || value.is_array();
        let answer = if is_call {
            reply(text.as_bytes())
        } else {
            Some(r#"{"code":0}"#.to_owned())
        };
        if let Some(answer) = answer
            && ws.send(Message::Text(answer.into())).await.is_err()
        {
            return;
        }
        if value.get("method").and_then(Value::as_str) == Some("flood") {
            let tick = format!(
                r#"{{"jsonrpc":"2.0","method":"subscription","params":{{"result":"{}"}}}}"#,
                "x".repeat(1024)
            );
            for _ in 0..256 * 1024 {
                if ws.send(Message::Text(tick.clone().into())).await.is_err() {
                    return;
                }
            }
            continue;
        }
        let subscribes = value
            .get("method")
            .and_then(Value::as_str)
            .is_some_and(|m| m.ends_with("subscribe"));
        if subscribes || !is_call {
            let tick = r#"{"jsonrpc":"2.0","method":"subscription","params":{"result":"tick"}}"#;
            if ws.send(Message::Text(tick.into())).await.is_err() {
                return;
            }
        }
    }
}

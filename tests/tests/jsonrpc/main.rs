//! JSON-RPC routes through a real sentry and agent in process, to a stand-in node that records
//! everything it receives: what is denied never arrives, what is allowed arrives unchanged.
#![allow(clippy::unwrap_used)]

mod filter;
mod framing;
mod https;
mod idle;
mod websocket;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::client::conn::http1::SendRequest;
use hyper::{HeaderMap, Request};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use std::convert::Infallible;
use tests::rpc_node::{self, Log};
use tests::*;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const LIMIT: Duration = Duration::from_secs(10);

struct Rpc {
    sentry: RunningSentry,
    _agent: RunningAgent,
    node: Arc<Log>,
}

/// Route "rpc" (`protocol = "jsonrpc"`, then `jsonrpc` as the lines of `[route.jsonrpc]`) to
/// a recording node behind agent "v1".
async fn rpc(jsonrpc: &str) -> Rpc {
    let (node_addr, node) = rpc_node::start().await;
    let (sentry, agent) = rpc_to(node_addr, jsonrpc).await;
    Rpc {
        sentry,
        _agent: agent,
        node,
    }
}

/// A sentry with route "rpc" to the node at `node_addr` behind agent "v1".
async fn rpc_to(node_addr: SocketAddr, jsonrpc: &str) -> (RunningSentry, RunningAgent) {
    rpc_route_to(node_addr, "", jsonrpc).await
}

/// [`rpc_to`], with more keys of the route itself (`route` as lines of `[[route]]`).
async fn rpc_route_to(
    node_addr: SocketAddr,
    route: &str,
    jsonrpc: &str,
) -> (RunningSentry, RunningAgent) {
    // Tests open many short connections; the connection rate is not what they test.
    let extra = format!(
        "protocol = \"jsonrpc\"\nconnect_rate_per_ip = \"1000/s\"\n{route}[route.jsonrpc]\n{jsonrpc}\n"
    );
    deployment_with("rpc", "rpc", ("rpc", node_addr), &extra).await
}

/// An HTTP/1.1 keep-alive client connection.
async fn connect(addr: SocketAddr) -> SendRequest<Full<Bytes>> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(connection);
    sender
}

struct Answer {
    status: u16,
    headers: HeaderMap,
    body: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {:?}", self.body))
    }
}

async fn send(
    sender: &mut SendRequest<Full<Bytes>>,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Answer {
    let mut request = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "rpc.example")
        .header("content-type", "application/json");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request
        .body(Full::new(Bytes::from(body.to_owned())))
        .unwrap();
    tokio::time::timeout(LIMIT, sender.ready())
        .await
        .unwrap()
        .unwrap();
    let response = tokio::time::timeout(LIMIT, sender.send_request(request))
        .await
        .unwrap()
        .unwrap();
    let (head, body) = response.into_parts();
    let body = tokio::time::timeout(LIMIT, body.collect())
        .await
        .unwrap()
        .unwrap()
        .to_bytes();
    Answer {
        status: head.status.as_u16(),
        headers: head.headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

async fn post(addr: SocketAddr, path: &str, body: &str) -> Answer {
    send(&mut connect(addr).await, "POST", path, &[], body).await
}

const CALL: &str = r#"{"jsonrpc":"2.0","id":7,"method":"icx_getLastBlock"}"#;

/// A receiver as a stream of body frames.
fn stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

async fn websocket(addr: SocketAddr, path: &str) -> tokio_tungstenite::WebSocketStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let request = format!("ws://{addr}{path}").into_client_request().unwrap();
    let (ws, response) = tokio::time::timeout(LIMIT, tokio_tungstenite::client_async(request, tcp))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(response.status(), 101);
    ws
}

async fn next_text<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>) -> Value
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    loop {
        let message = tokio::time::timeout(LIMIT, ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if let Message::Text(text) = message {
            return serde_json::from_str(text.as_str()).unwrap();
        }
    }
}

async fn write(tcp: &mut TcpStream, bytes: &[u8]) -> bool {
    use tokio::io::AsyncWriteExt;
    tcp.write_all(bytes).await.is_ok()
}

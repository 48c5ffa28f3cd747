//! JSON-RPC routes through a real sentry and agent in process, to a stand-in node that records
//! everything it receives: what is denied never arrives, what is allowed arrives unchanged.
#![allow(clippy::unwrap_used)]

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
    let (sentry_key, agent_key) = (key(), key());
    // Tests open many short connections; the connection rate is not what they test.
    let extra = format!(
        "protocol = \"jsonrpc\"\nconnect_rate_per_ip = \"1000/s\"\n{route}[route.jsonrpc]\n{jsonrpc}\n"
    );
    let config = sentry_config(&[("v1", &agent_key)], &[("rpc", &["v1/rpc"], &extra)]);
    let sentry = start_sentry(&config, &sentry_key).await;
    let agent = start_agent(
        agent_config(
            "v1",
            sentry.handle.quic_addr(),
            &sentry_key,
            &[("rpc", node_addr)],
        ),
        agent_key,
    );
    sentry.wait_agent("v1", true).await;
    (sentry, agent)
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn icon_denied_paths_never_reach_the_node() {
    let rpc = rpc("preset = \"icon\"").await;
    let addr = rpc.sentry.route("rpc");
    for path in [
        "/admin/chain",
        "/admin/system",
        "/api/v3d",
        "/api/v3d/icon_dex",
        "/api/rosetta/network/list",
        "/metrics",
        "/api/v3/../../admin/chain",
        "/api/v3/./x",
        "/api/v3//admin",
        "/api/v3/%2e%2e/admin",
        "/api/v3%2f..%2fadmin",
        "/api/v3.",
        "/API/v3",
        "/api/v3/icon_dex/extra/admin",
        "/",
    ] {
        let answer = post(addr, path, CALL).await;
        assert_eq!(answer.status, 403, "{path}: {}", answer.body);
    }
    // GET, PUT and friends on the API path: 405, and on any other path: 403.
    let mut sender = connect(addr).await;
    assert_eq!(
        send(&mut sender, "GET", "/api/v3", &[], "").await.status,
        405
    );
    assert_eq!(
        send(&mut sender, "GET", "/admin/chain", &[], "")
            .await
            .status,
        403
    );
    assert!(rpc.node.requests().is_empty(), "{:?}", rpc.node.requests());
    // The control: the same call on the API path arrives.
    assert_eq!(post(addr, "/api/v3", CALL).await.status, 200);
    assert_eq!(rpc.node.requests().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_calls_arrive_unchanged_with_the_real_client_address() {
    let rpc = rpc("preset = \"icon\"").await;
    let addr = rpc.sentry.route("rpc");
    let mut sender = connect(addr).await;
    let body = "{ \"jsonrpc\" : \"2.0\",\n \"method\":\"icx_getBalance\", \"id\": 42,\"params\":{\"address\":\"hx0000000000000000000000000000000000000000\"} }";
    let forged = [
        ("x-forwarded-for", "192.0.2.66"),
        ("forwarded", "for=192.0.2.66"),
        ("x-real-ip", "192.0.2.66"),
    ];
    let answer = send(&mut sender, "POST", "/api/v3/icon_dex?x=1", &forged, body).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.json()["id"], 42);
    assert_eq!(answer.json()["result"], "icx_getBalance");
    assert_eq!(answer.headers["x-node"], "stand-in", "node headers pass");
    // Keep-alive: a second request on the same client connection.
    let again = send(&mut sender, "POST", "/api/v3", &[], CALL).await;
    assert_eq!(again.json()["id"], 7);

    let seen = rpc.node.requests();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].method, "POST");
    assert_eq!(seen[0].path, "/api/v3/icon_dex?x=1");
    assert_eq!(seen[0].text(), body, "forwarded byte for byte");
    assert_eq!(seen[0].header("x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(seen[0].header("forwarded"), None);
    assert_eq!(seen[0].header("x-real-ip"), None);
    assert_eq!(seen[0].header("host"), Some("rpc.example"));
    assert_eq!(
        seen[0].header("content-length"),
        Some(body.len().to_string().as_str())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_methods_are_answered_by_the_sentry_and_batches_split() {
    let rpc = rpc("preset = \"ethereum\"\nforwarded = \"forwarded\"").await;
    let addr = rpc.sentry.route("rpc");
    let mut sender = connect(addr).await;
    // A single denied call: HTTP 200 with -32601, and nothing reaches the node.
    for method in [
        "admin_addPeer",
        "debug_traceTransaction",
        "personal_unlockAccount",
        "eth_sign",
        "engine_newPayloadV3",
        "txpool_content",
        "eth_sendTransaction",
    ] {
        let body =
            format!(r#"{{"jsonrpc":"2.0","id":"a-{method}","method":"{method}","params":[]}}"#);
        let answer = send(&mut sender, "POST", "/", &[], &body).await;
        assert_eq!(answer.status, 200);
        let json = answer.json();
        assert_eq!(json["id"], format!("a-{method}"));
        assert_eq!(json["error"]["code"], -32601, "{method}");
        assert!(
            json["error"]["message"]
                .as_str()
                .unwrap()
                .contains("not allowed")
        );
    }
    assert!(rpc.node.requests().is_empty());

    // A batch mixing allowed, denied and notification calls.
    let allowed_1 = r#"{"jsonrpc":"2.0","id":1,"method":"eth_blockNumber"}"#;
    let denied = r#"{"jsonrpc":"2.0","id":2,"method":"admin_peers"}"#;
    let allowed_3 =
        r#"{"jsonrpc":"2.0","id":3,"method":"eth_getBalance","params":["0x0","latest"]}"#;
    let denied_note = r#"{"jsonrpc":"2.0","method":"debug_setHead","params":["0x0"]}"#;
    let batch = format!("[{allowed_1},{denied},{allowed_3},{denied_note}]");
    let answer = send(&mut sender, "POST", "/", &[], &batch).await;
    assert_eq!(answer.status, 200);
    let entries = answer.json();
    let entries = entries.as_array().unwrap();
    assert_eq!(
        entries.len(),
        3,
        "ids 1, 2, 3; the notification gets nothing: {entries:?}"
    );
    let by_id = |id: i64| entries.iter().find(|e| e["id"] == id).unwrap().clone();
    assert_eq!(by_id(1)["result"], "eth_blockNumber");
    assert_eq!(by_id(2)["error"]["code"], -32601);
    assert_eq!(by_id(3)["result"], "eth_getBalance");
    let seen = rpc.node.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].text(),
        format!("[{allowed_1},{allowed_3}]"),
        "the allowed entries, byte for byte"
    );
    assert!(
        seen[0]
            .header("forwarded")
            .unwrap()
            .starts_with("for=127.0.0.1")
    );
    assert_eq!(seen[0].header("x-forwarded-for"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_oversized_and_overlong_requests_are_answered_at_the_sentry() {
    let rpc = rpc("preset = \"icon\"\nmax_body = \"1KiB\"\nmax_batch = 3").await;
    let addr = rpc.sentry.route("rpc");
    let mut sender = connect(addr).await;
    let code = |answer: &Answer| answer.json()["error"]["code"].as_i64();

    let answer = send(&mut sender, "POST", "/api/v3", &[], "{not json").await;
    assert_eq!((answer.status, code(&answer)), (200, Some(-32700)));
    let deep = format!("{}{}", "[".repeat(100), "]".repeat(100));
    let answer = send(&mut sender, "POST", "/api/v3", &[], &deep).await;
    assert_eq!(code(&answer), Some(-32700));
    let answer = send(
        &mut sender,
        "POST",
        "/api/v3",
        &[("content-type", "text/plain")],
        "<xml/>",
    )
    .await;
    assert_eq!(
        code(&answer),
        Some(-32700),
        "a non-JSON body under any content type"
    );
    let batch = format!("[{CALL},{CALL},{CALL},{CALL}]");
    let answer = send(&mut sender, "POST", "/api/v3", &[], &batch).await;
    assert_eq!(answer.status, 200);
    assert!(answer.body.contains("limit of 3"), "{}", answer.body);
    let big = format!(
        r#"{{"jsonrpc":"2.0","id":1,"method":"icx_call","params":"{}"}}"#,
        "x".repeat(2000)
    );
    let answer = send(&mut sender, "POST", "/api/v3", &[], &big).await;
    assert_eq!(answer.status, 413);
    // Over the limit without a declared length (chunked): still 413, never buffered past it.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(4);
    let request = Request::post("/api/v3")
        .header("host", "x")
        .body(StreamBody::new(stream_from(rx)))
        .unwrap();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut chunked, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(connection);
    let pending = tokio::spawn(async move {
        chunked
            .send_request(request)
            .await
            .map(|r| r.status().as_u16())
    });
    for _ in 0..3 {
        let _ = tx.send(Ok(Frame::data(Bytes::from(vec![b' '; 600])))).await;
    }
    drop(tx);
    let status = tokio::time::timeout(LIMIT, pending)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(status, 413);
    assert!(rpc.node.requests().is_empty(), "{:?}", rpc.node.requests());
}

/// A receiver as a stream of body frames.
fn stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_call_rate_counts_every_call_of_a_batch() {
    let rpc = rpc("preset = \"icon\"\nrate_per_ip = \"5/m\"").await;
    let addr = rpc.sentry.route("rpc");
    let mut sender = connect(addr).await;
    let batch = format!("[{CALL},{CALL},{CALL},{CALL}]");
    assert_eq!(
        send(&mut sender, "POST", "/api/v3", &[], &batch)
            .await
            .status,
        200
    );
    let answer = send(&mut sender, "POST", "/api/v3", &[], &batch).await;
    assert_eq!(answer.status, 429, "4 + 4 calls are over a burst of 5");
    assert_eq!(answer.headers["retry-after"], "1");
    // One more call still fits in the burst.
    assert_eq!(
        send(&mut sender, "POST", "/api/v3", &[], CALL).await.status,
        200
    );
    assert_eq!(
        send(&mut sender, "POST", "/api/v3", &[], CALL).await.status,
        429
    );
    assert_eq!(rpc.node.requests().len(), 2);
    let text = rpc.sentry.handle.render_metrics();
    let calls = |method: &str, outcome: &str| {
        metric(
            &text,
            "sentry_jsonrpc_calls_total",
            &[("route", "rpc"), ("method", method), ("outcome", outcome)],
        )
    };
    assert_eq!(calls("icx_getLastBlock", "forwarded"), Some(5.0));
    assert_eq!(calls("-", "rate_limited"), Some(5.0));
    let requests = |outcome: &str| {
        metric(
            &text,
            "sentry_jsonrpc_requests_total",
            &[("route", "rpc"), ("outcome", outcome)],
        )
    };
    assert_eq!(requests("forwarded"), Some(2.0));
    assert_eq!(requests("rate_limited"), Some(2.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_streams_are_pooled() {
    let rpc = rpc("preset = \"icon\"").await;
    let addr = rpc.sentry.route("rpc");
    // Forty requests, each on a new client connection, one after another: the sentry reuses
    // its pooled tunnel stream, so the node sees a single connection.
    for id in 0..40 {
        let body = format!(r#"{{"jsonrpc":"2.0","id":{id},"method":"icx_getLastBlock"}}"#);
        let answer = post(addr, "/api/v3", &body).await;
        assert_eq!(answer.json()["id"], id);
    }
    assert_eq!(rpc.node.requests().len(), 40);
    assert_eq!(
        rpc.node.connections(),
        1,
        "one pooled upstream stream served every request"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_connected_upstream_answers_503() {
    let agent_key = key();
    let extra = "protocol = \"jsonrpc\"\n[route.jsonrpc]\npreset = \"icon\"\n";
    let config = sentry_config(&[("v1", &agent_key)], &[("rpc", &["v1/rpc"], extra)]);
    let sentry = start_sentry(&config, &key()).await;
    let answer = post(sentry.route("rpc"), "/api/v3", CALL).await;
    assert_eq!(answer.status, 503, "{}", answer.body);
    // Refusals that need no upstream are still answered as such.
    assert_eq!(
        post(sentry.route("rpc"), "/admin/chain", CALL).await.status,
        403
    );
    let text = sentry.handle.render_metrics();
    assert_eq!(
        metric(
            &text,
            "sentry_jsonrpc_requests_total",
            &[("route", "rpc"), ("outcome", "no_upstream")]
        ),
        Some(1.0)
    );
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_subscriptions_work_and_denied_calls_inside_are_refused() {
    let rpc = rpc("preset = \"ethereum\"\nmax_websockets_per_ip = 2").await;
    let addr = rpc.sentry.route("rpc");
    let mut ws = websocket(addr, "/").await;
    let subscribe = r#"{"jsonrpc":"2.0","id":1,"method":"eth_subscribe","params":["newHeads"]}"#;
    ws.send(Message::Text(subscribe.into())).await.unwrap();
    assert_eq!(next_text(&mut ws).await["id"], 1);
    assert_eq!(
        next_text(&mut ws).await["params"]["result"],
        "tick",
        "the notification arrives"
    );

    let denied = r#"{"jsonrpc":"2.0","id":2,"method":"admin_nodeInfo"}"#;
    ws.send(Message::Text(denied.into())).await.unwrap();
    let answer = next_text(&mut ws).await;
    assert_eq!(
        (answer["id"].as_i64(), answer["error"]["code"].as_i64()),
        (Some(2), Some(-32601))
    );
    // A batch inside the socket: the denied entry is answered by the sentry, the rest relayed.
    let batch = r#"[{"jsonrpc":"2.0","id":3,"method":"debug_traceCall"},{"jsonrpc":"2.0","id":4,"method":"eth_chainId"}]"#;
    ws.send(Message::Text(batch.into())).await.unwrap();
    let first = next_text(&mut ws).await;
    let second = next_text(&mut ws).await;
    let all = format!("{first}{second}");
    assert!(all.contains(r#""id":3"#) && all.contains("-32601"), "{all}");
    assert!(
        all.contains(r#""id":4"#) && all.contains("eth_chainId"),
        "{all}"
    );
    ws.close(None).await.unwrap();

    let messages = rpc.node.messages();
    assert_eq!(
        messages,
        [
            subscribe.to_owned(),
            r#"[{"jsonrpc":"2.0","id":4,"method":"eth_chainId"}]"#.to_owned()
        ],
        "denied calls never reached the node"
    );

    // The per-client WebSocket cap: two open, the third refused with 429.
    let _a = websocket(addr, "/").await;
    let _b = websocket(addr, "/").await;
    let tcp = TcpStream::connect(addr).await.unwrap();
    let request = format!("ws://{addr}/").into_client_request().unwrap();
    let refused = tokio_tungstenite::client_async(request, tcp).await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 429)
        }
        other => panic!("expected 429, got {other:?}"),
    }
    let text = rpc.sentry.handle.render_metrics();
    assert_eq!(
        metric(
            &text,
            "sentry_jsonrpc_websockets_active",
            &[("route", "rpc")]
        ),
        Some(2.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn icon_block_sockets_relay_goloop_subscription_requests() {
    let rpc = rpc("preset = \"icon\"").await;
    let addr = rpc.sentry.route("rpc");
    let mut ws = websocket(addr, "/api/v3/icon_dex/block").await;
    let request = r#"{"height":"0x10"}"#;
    ws.send(Message::Text(request.into())).await.unwrap();
    assert_eq!(next_text(&mut ws).await["code"], 0);
    assert_eq!(next_text(&mut ws).await["params"]["result"], "tick");
    ws.send(Message::Text("{broken".into())).await.unwrap();
    assert_eq!(next_text(&mut ws).await["error"]["code"], -32700);
    assert_eq!(rpc.node.messages(), [request.to_owned()]);
    // The public API path takes no WebSocket on goloop; the upgrade is refused.
    let tcp = TcpStream::connect(addr).await.unwrap();
    let upgrade = format!("ws://{addr}/api/v3").into_client_request().unwrap();
    assert!(tokio_tungstenite::client_async(upgrade, tcp).await.is_err());
    let seen = rpc.node.requests();
    assert_eq!(seen.len(), 1, "only the allowed upgrade reached the node");
    assert_eq!(seen[0].path, "/api/v3/icon_dex/block");
    assert_eq!(seen[0].header("sec-websocket-extensions"), None);
}

/// A fresh self-signed certificate for `rpc.example`, written as PEM files in `dir`; its DER.
fn write_certificate(dir: &std::path::Path) -> Vec<u8> {
    let generated = rcgen::generate_simple_self_signed(vec!["rpc.example".to_owned()]).unwrap();
    std::fs::write(dir.join("rpc.crt"), generated.cert.pem()).unwrap();
    let key = dir.join("rpc.key");
    std::fs::write(&key, generated.signing_key.serialize_pem()).unwrap();
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    generated.cert.der().to_vec()
}

/// An HTTPS client connection trusting only `root`.
async fn connect_tls(addr: SocketAddr, root: &[u8]) -> std::io::Result<SendRequest<Full<Bytes>>> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from(root.to_vec()))
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from("rpc.example").unwrap();
    let tls = tokio::time::timeout(LIMIT, connector.connect(name, tcp))
        .await
        .unwrap()?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(std::io::Error::other)?;
    tokio::spawn(connection);
    Ok(sender)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_is_terminated_at_the_sentry_and_a_reload_rereads_the_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let first = write_certificate(dir.path());
    let (node_addr, node) = rpc_node::start().await;
    let (sentry_key, agent_key) = (key(), key());
    let extra = format!(
        "protocol = \"jsonrpc\"\n[route.jsonrpc]\npreset = \"icon\"\n[route.tls]\ncert = \"{0}/rpc.crt\"\nkey = \"{0}/rpc.key\"\n",
        dir.path().display()
    );
    let config = sentry_config(&[("v1", &agent_key)], &[("rpc", &["v1/rpc"], &extra)]);
    let sentry = start_sentry(&config, &sentry_key).await;
    let _agent = start_agent(
        agent_config(
            "v1",
            sentry.handle.quic_addr(),
            &sentry_key,
            &[("rpc", node_addr)],
        ),
        agent_key.clone(),
    );
    sentry.wait_agent("v1", true).await;
    let addr = sentry.route("rpc");

    let mut sender = connect_tls(addr, &first).await.unwrap();
    let answer = send(&mut sender, "POST", "/api/v3", &[], CALL).await;
    assert_eq!(answer.json()["id"], 7);
    assert_eq!(
        send(&mut sender, "POST", "/admin/chain", &[], CALL)
            .await
            .status,
        403
    );
    let seen = node.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].text(), CALL);
    assert_eq!(seen[0].header("x-forwarded-proto"), Some("https"));
    // Plain HTTP on the HTTPS port gets no HTTP answer, and nothing reaches the node.
    let plain = tokio::time::timeout(LIMIT, async {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(tcp))
                .await
                .unwrap();
        tokio::spawn(connection);
        let request = Request::post("/api/v3")
            .header("host", "x")
            .body(Full::new(Bytes::from(CALL)))
            .unwrap();
        sender.send_request(request).await
    })
    .await
    .unwrap();
    assert!(plain.is_err(), "{plain:?}");

    // A renewed certificate in the same files: a reload serves it to new connections, and
    // the connection opened before keeps working.
    let second = write_certificate(dir.path());
    let reloaded = sentry_config(&[("v1", &agent_key)], &[("rpc", &["v1/rpc"], &extra)]);
    let report = sentry.handle.reload(&reloaded, &sentry_key).unwrap();
    assert_eq!(report.kept, 1);
    assert!(
        connect_tls(addr, &first).await.is_err(),
        "the old certificate is gone"
    );
    let mut renewed = connect_tls(addr, &second).await.unwrap();
    assert_eq!(
        send(&mut renewed, "POST", "/api/v3", &[], CALL)
            .await
            .status,
        200
    );
    assert_eq!(
        send(&mut sender, "POST", "/api/v3", &[], CALL).await.status,
        200
    );
    assert_eq!(node.requests().len(), 3);
    let text = sentry.handle.render_metrics();
    assert_eq!(
        metric(
            &text,
            "sentry_jsonrpc_requests_total",
            &[("route", "rpc"), ("outcome", "tls_handshake_failed")]
        ),
        Some(2.0),
        "the plain HTTP attempt and the client trusting the old certificate"
    );
}

/// A node written by hand, byte for byte, to answer with every framing HTTP/1.1 allows (and
/// some it forbids): the JSON-RPC method of each request picks the answer. It counts the
/// connections it accepted.
async fn raw_node() -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    use tokio::io::AsyncReadExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut drop_next = false;
                loop {
                    // One request: its head, then Content-Length bytes of body.
                    let head_end = loop {
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                        let mut chunk = [0u8; 4096];
                        match tcp.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
                    let length: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .map_or(0, |v| v.trim().parse().unwrap());
                    while buf.len() < head_end + length {
                        let mut chunk = [0u8; 4096];
                        match tcp.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let body: Value = serde_json::from_slice(&buf[head_end..head_end + length])
                        .unwrap_or(Value::Null);
                    buf.drain(..head_end + length);
                    let method = if body.is_array() {
                        "batch".to_owned()
                    } else {
                        body["method"].as_str().unwrap_or("").to_owned()
                    };
                    if drop_next {
                        // Closed unanswered, as a node's keep-alive timeout closes a
                        // connection whose next request is already on its way.
                        return;
                    }
                    let json =
                        |result: &str| format!(r#"{{"jsonrpc":"2.0","id":1,"result":"{result}"}}"#);
                    let ok = |extra: &str, body: &str| {
                        format!(
                            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n{extra}\r\n{body}"
                        )
                    };
                    let sent = match method.as_str() {
                        "whole" => {
                            let body = json("whole");
                            let length = format!("Content-Length: {}\r\n", body.len());
                            write(&mut tcp, &ok(&length, &body).into_bytes()).await
                        }
                        "interim" => {
                            let body = json("interim");
                            let length = format!("Content-Length: {}\r\n", body.len());
                            let text =
                                format!("HTTP/1.1 100 Continue\r\n\r\n{}", ok(&length, &body));
                            write(&mut tcp, &text.into_bytes()).await
                        }
                        "chunked_whole" => {
                            let text = ok(
                                "Transfer-Encoding: chunked\r\n",
                                "5\r\n{\"jso\r\n2c\r\nnrpc\":\"2.0\",\"id\":1,\"result\":\"chunked_whole\"}\r\n0\r\n\r\n",
                            );
                            write(&mut tcp, &text.into_bytes()).await
                        }
                        "chunked_slow" => {
                            // In pieces, a trailer at the end: the gateway streams it.
                            let mut fine = write(
                                &mut tcp,
                                &ok("Transfer-Encoding: chunked\r\n", "").into_bytes(),
                            )
                            .await;
                            for piece in [
                                "c\r\n{\"jsonrp",
                                "c\":\"\r\n",
                                "24\r\n2.0\",\"id\":1,\"result\":\"chunked_slow\"}\r\n",
                                "0\r\nX-Trailer: t\r\n\r\n",
                            ] {
                                tokio::time::sleep(Duration::from_millis(20)).await;
                                fine = fine && write(&mut tcp, piece.as_bytes()).await;
                            }
                            fine
                        }
                        "big" => {
                            // 3 MiB in 64 KiB writes: longer than anything read with the head.
                            let body = big_body();
                            let mut fine = write(
                                &mut tcp,
                                &ok(&format!("Content-Length: {}\r\n", body.len()), "")
                                    .into_bytes(),
                            )
                            .await;
                            for piece in body.chunks(64 * 1024) {
                                fine = fine && write(&mut tcp, piece).await;
                            }
                            fine
                        }
                        "close" => {
                            let body = json("close");
                            let extra =
                                format!("Content-Length: {}\r\nConnection: close\r\n", body.len());
                            write(&mut tcp, &ok(&extra, &body).into_bytes()).await;
                            return;
                        }
                        "until_close" => {
                            write(&mut tcp, &ok("", &json("until_close")).into_bytes()).await;
                            return;
                        }
                        "stray" => {
                            // Answers, then writes a second, unasked answer on the idle
                            // connection (a buggy node): never anyone's response.
                            let body = json("stray");
                            let length = format!("Content-Length: {}\r\n", body.len());
                            let mut fine = write(&mut tcp, &ok(&length, &body).into_bytes()).await;
                            tokio::time::sleep(Duration::from_millis(30)).await;
                            let unasked = json("unasked");
                            let length = format!("Content-Length: {}\r\n", unasked.len());
                            fine =
                                fine && write(&mut tcp, &ok(&length, &unasked).into_bytes()).await;
                            fine
                        }
                        "batch" => {
                            // A batch: one answer per call with an id, the first one 80 MiB
                            // long, written as it goes, chunked.
                            let mut fine = write(
                                &mut tcp,
                                &ok("Transfer-Encoding: chunked\r\n", "").into_bytes(),
                            )
                            .await;
                            let ids: Vec<String> = body
                                .as_array()
                                .unwrap()
                                .iter()
                                .map(|c| c["id"].to_string())
                                .collect();
                            let chunk = |data: &[u8]| {
                                let mut out = format!("{:x}\r\n", data.len()).into_bytes();
                                out.extend_from_slice(data);
                                out.extend_from_slice(b"\r\n");
                                out
                            };
                            let head = format!(r#"[{{"jsonrpc":"2.0","id":{},"result":""#, ids[0]);
                            fine = fine && write(&mut tcp, &chunk(head.as_bytes())).await;
                            let block = vec![b'x'; 1 << 20];
                            for _ in 0..80 {
                                fine = fine && write(&mut tcp, &chunk(&block)).await;
                            }
                            let mut rest = String::from("\"}");
                            for id in &ids[1..] {
                                rest += &format!(r#",{{"jsonrpc":"2.0","id":{id},"result":"ok"}}"#);
                            }
                            rest += "]";
                            fine = fine && write(&mut tcp, &chunk(rest.as_bytes())).await;
                            fine && write(&mut tcp, b"0\r\n\r\n").await
                        }
                        "drop_next" => {
                            drop_next = true;
                            let body = json("drop_next");
                            let length = format!("Content-Length: {}\r\n", body.len());
                            write(&mut tcp, &ok(&length, &body).into_bytes()).await
                        }
                        "idle_close" => {
                            // Answers, then closes the idle connection as a node's keep-alive
                            // timeout does.
                            let body = json("idle_close");
                            let length = format!("Content-Length: {}\r\n", body.len());
                            write(&mut tcp, &ok(&length, &body).into_bytes()).await;
                            tokio::time::sleep(Duration::from_millis(200)).await;
                            return;
                        }
                        "smuggle" => {
                            let text = ok(
                                "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
                                "0\r\n\r\n",
                            );
                            write(&mut tcp, &text.into_bytes()).await;
                            return;
                        }
                        "truncated" => {
                            write(
                                &mut tcp,
                                &ok("Content-Length: 100\r\n", "{\"jsonrpc\"").into_bytes(),
                            )
                            .await;
                            return;
                        }
                        _ => return,
                    };
                    if !sent {
                        return;
                    }
                }
            });
        }
    });
    (addr, accepted)
}

fn big_body() -> Vec<u8> {
    (0..3 * 1024 * 1024u32)
        .map(|i| b'a' + (i % 26) as u8)
        .collect()
}

fn call(method: &str) -> String {
    format!(r#"{{"jsonrpc":"2.0","id":1,"method":"{method}"}}"#)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_response_framing_of_the_node_reaches_the_client_and_streams_are_reused_only_when_safe()
 {
    use std::sync::atomic::Ordering::SeqCst;
    let (node_addr, accepted) = raw_node().await;
    let (sentry, _agent) = rpc_to(
        node_addr,
        "preset = \"none\"\nallow_paths = [\"/\"]\nallow_methods = [\"*\"]\nmax_body = \"64KiB\"",
    )
    .await;
    let addr = sentry.route("rpc");
    let mut client = connect(addr).await;
    let result = |answer: &Answer| answer.json()["result"].as_str().unwrap().to_owned();

    // Framed by length, by chunks (whole or in pieces with a trailer), after a 100 Continue:
    // all on one pooled stream, on one client connection.
    for method in ["whole", "chunked_whole", "chunked_slow", "interim", "whole"] {
        let answer = send(&mut client, "POST", "/", &[], &call(method)).await;
        assert_eq!(answer.status, 200, "{method}: {}", answer.body);
        assert_eq!(result(&answer), method);
        assert!(
            answer.headers.get("transfer-encoding").is_none() || method == "chunked_slow",
            "{method}: a whole body is answered with its length"
        );
        assert!(answer.headers.get("x-trailer").is_none());
    }
    assert_eq!(
        accepted.load(SeqCst),
        1,
        "one upstream connection served them all"
    );

    // A body longer than what comes with the head streams through, byte for byte.
    let answer = send(&mut client, "POST", "/", &[], &call("big")).await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.body.as_bytes(), big_body().as_slice());
    let answer = send(&mut client, "POST", "/", &[], &call("whole")).await;
    assert_eq!(result(&answer), "whole");
    assert_eq!(
        accepted.load(SeqCst),
        1,
        "the stream went back after the long body"
    );

    // A node that closes: its answer still arrives, and the next request opens a new stream.
    for method in ["close", "until_close"] {
        let before = accepted.load(SeqCst);
        let answer = send(&mut client, "POST", "/", &[], &call(method)).await;
        assert_eq!(result(&answer), method);
        let answer = send(&mut client, "POST", "/", &[], &call("whole")).await;
        assert_eq!(result(&answer), "whole");
        assert_eq!(
            accepted.load(SeqCst),
            before + 1,
            "{method}: closed streams are not reused"
        );
    }

    // A node that closes an idle connection: the next request, sent on the pooled stream as
    // it closes, is sent again on a fresh one, and the client sees nothing of it.
    let answer = send(&mut client, "POST", "/", &[], &call("idle_close")).await;
    assert_eq!(result(&answer), "idle_close");
    tokio::time::sleep(Duration::from_millis(400)).await;
    let answer = send(&mut client, "POST", "/", &[], &call("whole")).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(result(&answer), "whole");
    let answer = send(&mut client, "POST", "/", &[], &call("drop_next")).await;
    assert_eq!(result(&answer), "drop_next");
    let before = accepted.load(SeqCst);
    let answer = send(&mut client, "POST", "/", &[], &call("whole")).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(result(&answer), "whole");
    assert_eq!(
        accepted.load(SeqCst),
        before + 1,
        "sent again on a fresh stream"
    );

    // A node that writes an unasked answer on an idle pooled stream: the next request, even
    // within moments and from another client, never gets it; that stream is not reused.
    let answer = send(&mut client, "POST", "/", &[], &call("stray")).await;
    assert_eq!(result(&answer), "stray");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let before = accepted.load(SeqCst);
    let mut another = connect(addr).await;
    let answer = send(&mut another, "POST", "/", &[], &call("whole")).await;
    assert_eq!(
        result(&answer),
        "whole",
        "a client got another's stray answer"
    );
    assert_eq!(
        accepted.load(SeqCst),
        before + 1,
        "the stream with stray bytes was dropped"
    );

    // Framing that could split responses, or a body cut short: 502 or a broken-off body for
    // that request only; the client connection and the route go on.
    let answer = send(&mut client, "POST", "/", &[], &call("smuggle")).await;
    assert_eq!(answer.status, 502, "{}", answer.body);
    let mut other = connect(addr).await;
    let truncated = Request::builder()
        .method("POST")
        .uri("/")
        .header("host", "rpc.example")
        .body(Full::new(Bytes::from(call("truncated"))))
        .unwrap();
    // hyper sends the head with the first body bytes: the client sees the failure at the
    // head or in the body, never a whole answer.
    if let Ok(response) = other.send_request(truncated).await {
        assert!(
            response.into_body().collect().await.is_err(),
            "a body cut short by the node is cut short for the client"
        );
    }
    let answer = send(&mut client, "POST", "/", &[], &call("whole")).await;
    assert_eq!(result(&answer), "whole");
    let text = sentry.handle.render_metrics();
    assert_eq!(
        metric(
            &text,
            "sentry_jsonrpc_requests_total",
            &[("route", "rpc"), ("outcome", "upstream_failed")]
        ),
        Some(1.0)
    );
}

async fn write(tcp: &mut TcpStream, bytes: &[u8]) -> bool {
    use tokio::io::AsyncWriteExt;
    tcp.write_all(bytes).await.is_ok()
}

/// The route's `idle_timeout` closes a silent client connection (the watch runs beside the
/// connection, not in it), and a connection that keeps asking stays open past it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_client_connection_is_closed_at_the_idle_timeout_and_a_busy_one_is_not() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (node_addr, _node) = rpc_node::start().await;
    let (sentry, _agent) =
        rpc_route_to(node_addr, "idle_timeout = \"1s\"\n", "preset = \"icon\"").await;
    let addr = sentry.handle.route_addr("rpc").unwrap();
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "POST /api/v3 HTTP/1.1\r\nhost: rpc\r\ncontent-type: application/json\r\n\
         content-length: {}\r\n\r\n{CALL}",
        CALL.len()
    );
    let mut answer = vec![0u8; 64 * 1024];
    // Busy for three idle timeouts: every request is answered on the same connection.
    let start = relay_core::clock::now();
    while start.elapsed() < Duration::from_secs(3) {
        tcp.write_all(request.as_bytes()).await.unwrap();
        let n = tokio::time::timeout(LIMIT, tcp.read(&mut answer))
            .await
            .unwrap()
            .unwrap();
        assert!(
            answer[..n].starts_with(b"HTTP/1.1 200"),
            "answered while busy"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Then silent: closed after one to two idle timeouts (hyper's 10 s head timeout is not
    // what closes it).
    let silent = relay_core::clock::now();
    let n = tokio::time::timeout(LIMIT, tcp.read(&mut answer))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0, "closed, with nothing sent");
    let waited = silent.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "closed after {waited:?}"
    );
}

/// A WebSocket is held to the route's `idle_timeout` like any connection: a silent one is
/// closed (1001), one that keeps talking stays open past it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_websocket_is_closed_at_the_idle_timeout_and_a_busy_one_is_not() {
    let (node_addr, _node) = rpc_node::start().await;
    let (sentry, _agent) = rpc_route_to(
        node_addr,
        "idle_timeout = \"1s\"\n",
        "preset = \"ethereum\"",
    )
    .await;
    let addr = sentry.handle.route_addr("rpc").unwrap();
    let mut ws = websocket(addr, "/").await;
    let call = r#"{"jsonrpc":"2.0","id":1,"method":"eth_chainId"}"#;
    let start = relay_core::clock::now();
    let mut silent = start;
    while start.elapsed() < Duration::from_secs(3) {
        tokio::time::sleep(Duration::from_millis(300)).await;
        ws.send(Message::Text(call.into())).await.unwrap();
        assert_eq!(next_text(&mut ws).await["id"], 1, "answered while busy");
        silent = relay_core::clock::now();
    }
    let closed = loop {
        match tokio::time::timeout(LIMIT, ws.next()).await.unwrap() {
            Some(Ok(Message::Close(frame))) => break frame,
            Some(Ok(_)) => {}
            other => panic!("expected a close frame, got {other:?}"),
        }
    };
    let waited = silent.elapsed();
    assert_eq!(closed.map(|f| u16::from(f.code)), Some(1001));
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "closed after {waited:?}"
    );
}

/// A WebSocket client that stops reading what the node sends is closed once it took nothing
/// for the drain deadline (here the route's 2 s `idle_timeout`, which is shorter), and its
/// place is given back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_client_that_stops_reading_is_closed() {
    let (node_addr, _node) = rpc_node::start().await;
    let (sentry, _agent) = rpc_route_to(
        node_addr,
        "idle_timeout = \"2s\"\n",
        "preset = \"none\"\nallow_paths = [\"/\"]\nallow_methods = [\"*\"]",
    )
    .await;
    let addr = sentry.handle.route_addr("rpc").unwrap();
    // The least receive buffer, as a client that means to hold the sentry up would use.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(1).unwrap();
    let tcp = socket.connect(addr).await.unwrap();
    let request = format!("ws://{addr}/").into_client_request().unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async(request, tcp).await.unwrap();
    let flood = r#"{"jsonrpc":"2.0","id":1,"method":"flood"}"#;
    ws.send(Message::Text(flood.into())).await.unwrap();
    let active = || {
        metric(
            &sentry.handle.render_metrics(),
            "sentry_jsonrpc_websockets_active",
            &[("route", "rpc")],
        )
    };
    assert_eq!(active(), Some(1.0));
    // Never read: the sentry gives up on it within a few seconds.
    let start = relay_core::clock::now();
    while active() != Some(0.0) {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "the socket is still open after {:?}",
            start.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        start.elapsed() >= Duration::from_millis(1500),
        "closed too soon: {:?}",
        start.elapsed()
    );
    drop(ws);
}

/// A batch with a denied call: the sentry's answer is merged into the node's answer as it
/// streams, however large (here 80 MiB, past what was once collected whole before merging).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_with_a_denied_call_streams_the_nodes_answer_through() {
    let (node_addr, _) = raw_node().await;
    let (sentry, _agent) = rpc_to(
        node_addr,
        "preset = \"none\"\nallow_paths = [\"/\"]\nallow_methods = [\"*\"]\ndeny_methods = [\"denied\"]",
    )
    .await;
    let addr = sentry.route("rpc");
    let mut client = connect(addr).await;
    let batch = r#"[{"jsonrpc":"2.0","id":1,"method":"big"},{"jsonrpc":"2.0","id":2,"method":"denied"},{"jsonrpc":"2.0","id":3,"method":"small"}]"#;
    let answer = send(&mut client, "POST", "/", &[], batch).await;
    assert_eq!(answer.status, 200);
    let value: Value = serde_json::from_str(&answer.body).unwrap();
    let entries = value.as_array().unwrap();
    let ids: Vec<i64> = entries.iter().map(|e| e["id"].as_i64().unwrap()).collect();
    assert_eq!(ids, [1, 3, 2], "the node's answers, then the sentry's");
    assert_eq!(entries[0]["result"].as_str().unwrap().len(), 80 << 20);
    assert_eq!(entries[2]["error"]["code"], -32601);
}

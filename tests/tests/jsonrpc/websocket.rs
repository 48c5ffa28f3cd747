//! WebSockets: subscriptions relayed, calls inside filtered, silent and non-reading sockets
//! closed.

use super::*;

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

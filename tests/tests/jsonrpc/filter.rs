//! Paths, methods, batches, malformed requests and call rates: what is denied never reaches
//! the node; pooled upstream streams; no upstream.

use super::*;

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

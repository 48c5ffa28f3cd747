//! Every response framing of a hand-written node reaches the client; streams are reused only
//! when that is safe; a batch with a denied call has the node's answer streamed through.

use super::*;

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

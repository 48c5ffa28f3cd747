//! The route's idle timeout on plain client connections.

use super::*;

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

//! Admission control in process: a real sentry and agent on loopback, clients from two
//! loopback addresses (127.0.0.1 and 127.0.0.2), limits set in the route's config.
#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use relay_core::admission::Refusal;
use tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

async fn deployment(extra: &str) -> (RunningSentry, RunningAgent) {
    deployment_to("svc", echo_service().await, extra).await
}

/// A connection to `to` from source address `from` (any port).
async fn connect_from(from: &str, to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket
        .bind(SocketAddr::new(from.parse::<IpAddr>().unwrap(), 0))
        .unwrap();
    socket.connect(to).await.unwrap()
}

/// Whether `tcp` echoes a message (it was admitted and relayed).
async fn echoes(tcp: &mut TcpStream) -> bool {
    if tcp.write_all(b"hi").await.is_err() {
        return false;
    }
    let mut buf = [0u8; 2];
    matches!(
        tokio::time::timeout(PATIENCE, tcp.read_exact(&mut buf)).await,
        Ok(Ok(_))
    ) && &buf == b"hi"
}

async fn wait_active(sentry: &RunningSentry, want: usize) {
    let gate = sentry.handle.route_gate("p2p").unwrap();
    let settled = tokio::time::timeout(PATIENCE, async {
        while gate.active() != want {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(
        settled.is_ok(),
        "open connections stayed at {} (want {want})",
        gate.active()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_ip_cap_refuses_the_excess_while_another_client_is_served() {
    let (sentry, _agent) =
        deployment("max_connections_per_ip = 4\nconnect_rate_per_ip = \"1000/s\"").await;
    let addr = sentry.route("p2p");
    let gate = sentry.handle.route_gate("p2p").unwrap();

    let mut held = Vec::new();
    for _ in 0..4 {
        let mut tcp = connect_from("127.0.0.1", addr).await;
        assert!(echoes(&mut tcp).await, "a connection within the cap failed");
        held.push(tcp);
    }
    for _ in 0..2 {
        let mut extra = connect_from("127.0.0.1", addr).await;
        assert!(
            !echoes(&mut extra).await,
            "a connection over the cap was relayed"
        );
    }
    assert_eq!(gate.refused(Refusal::PerIpFull), 2);
    // The second client is unaffected.
    let mut other = connect_from("127.0.0.2", addr).await;
    assert!(echoes(&mut other).await, "the second client was refused");
    assert_eq!(gate.active(), 5);

    // Places come back when connections end.
    drop(held);
    drop(other);
    wait_active(&sentry, 0).await;
    assert_eq!(gate.clients(), 0);
    let mut again = connect_from("127.0.0.1", addr).await;
    assert!(echoes(&mut again).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deny_wins_and_costs_no_tunnel_work() {
    let (sentry, _agent) = deployment("allow = [\"127.0.0.0/8\"]\ndeny = [\"127.0.0.2\"]").await;
    let addr = sentry.route("p2p");
    let gate = sentry.handle.route_gate("p2p").unwrap();
    let mut denied = connect_from("127.0.0.2", addr).await;
    assert!(!echoes(&mut denied).await, "a denied client was relayed");
    assert_eq!(gate.refused(Refusal::Denied), 1);
    let mut allowed = connect_from("127.0.0.1", addr).await;
    assert!(echoes(&mut allowed).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_rate_cannot_be_bypassed_by_changing_source_port() {
    // 5 per minute: a burst of 5, then the next place only after 12 s, far beyond this test.
    let (sentry, _agent) = deployment("connect_rate_per_ip = \"5/m\"").await;
    let addr = sentry.route("p2p");
    let gate = sentry.handle.route_gate("p2p").unwrap();
    for _ in 0..5 {
        // Each connection comes from a new source port.
        let mut tcp = connect_from("127.0.0.1", addr).await;
        assert!(
            echoes(&mut tcp).await,
            "a connection within the burst failed"
        );
    }
    for _ in 0..3 {
        let mut tcp = connect_from("127.0.0.1", addr).await;
        assert!(
            !echoes(&mut tcp).await,
            "a connection over the rate was relayed"
        );
    }
    assert_eq!(gate.refused(Refusal::Rate), 3);
    let mut other = connect_from("127.0.0.2", addr).await;
    assert!(
        echoes(&mut other).await,
        "another client paid for the first one's rate"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_connections_return_every_permit() {
    let (sentry, _agent) = deployment(
        "max_connections = 64\nmax_connections_per_ip = 64\nconnect_rate_per_ip = \"1000000/s\"",
    )
    .await;
    let addr = sentry.route("p2p");
    let gate = sentry.handle.route_gate("p2p").unwrap();
    let mut workers = Vec::new();
    for _ in 0..8 {
        workers.push(tokio::spawn(async move {
            for _ in 0..1250 {
                let mut tcp = TcpStream::connect(addr).await.unwrap();
                assert!(echoes(&mut tcp).await);
            }
        }));
    }
    for worker in workers {
        worker.await.unwrap();
    }
    wait_active(&sentry, 0).await;
    assert_eq!(gate.clients(), 0);
    for reason in Refusal::ALL {
        assert_eq!(gate.refused(reason), 0, "{}", reason.as_str());
    }
}

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

/// What a flood of handshakes from unknown keys got.
#[derive(Debug, Default)]
struct Flood {
    attempts: u64,
    /// Refused with an answer: the handshake failed on the unpinned key, or (TLS 1.3 lets a
    /// client finish first) the connection was closed right after it.
    refused: u64,
    /// No answer in time: dropped by the handshake gate.
    dropped: u64,
    /// The client finished its side of the handshake and heard nothing more for 2 s: the
    /// sentry dropped the attempt unanswered under load (TLS 1.3 lets a client finish first;
    /// whether a key got in is decided on the sentry, which the test checks there).
    unanswered: u64,
}

/// Handshakes with fresh unknown keys from `sources`, `per_source` concurrent loops each,
/// until `until` (bounded in count too).
async fn flood_handshakes(
    sentry: SocketAddr,
    sentry_key: &relay_core::keys::PrivateKey,
    sources: &[&str],
    per_source: usize,
    until: std::time::Instant,
) -> Flood {
    use relay_core::transport::quic::{self, Tuning};
    let mut loops = tokio::task::JoinSet::new();
    for source in sources {
        let key = key();
        let bind = SocketAddr::new(source.parse().unwrap(), 0);
        let endpoint = quic::client_endpoint(bind, &key, &Tuning::untuned()).unwrap();
        let client =
            quic::client_config(&key, sentry_key.public_key(), &Tuning::untuned()).unwrap();
        for _ in 0..per_source {
            let (endpoint, client) = (endpoint.clone(), client.clone());
            loops.spawn(async move {
                let mut flood = Flood::default();
                while relay_core::clock::now() < until && flood.attempts < 200 {
                    flood.attempts += 1;
                    let connecting = endpoint
                        .connect_with(
                            client.clone(),
                            sentry,
                            relay_core::transport::pin::SERVER_NAME,
                        )
                        .unwrap();
                    match tokio::time::timeout(Duration::from_secs(2), connecting).await {
                        Ok(Ok(conn)) => {
                            let closed =
                                tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
                            if closed.is_ok() {
                                flood.refused += 1;
                            } else {
                                flood.unanswered += 1;
                            }
                        }
                        Ok(Err(_)) => flood.refused += 1,
                        Err(_) => flood.dropped += 1,
                    }
                }
                flood
            });
        }
    }
    let mut total = Flood::default();
    while let Some(result) = loops.join_next().await {
        let f = result.unwrap();
        total.attempts += f.attempts;
        total.refused += f.refused;
        total.dropped += f.dropped;
        total.unanswered += f.unanswered;
    }
    total
}

/// `n` sequential echo round trips on new connections from 127.0.0.1; each must succeed.
async fn round_trips(route: SocketAddr, n: usize) -> Vec<Duration> {
    let mut took = Vec::with_capacity(n);
    for _ in 0..n {
        let start = relay_core::clock::now();
        let mut tcp = connect_from("127.0.0.1", route).await;
        assert!(echoes(&mut tcp).await, "an honest client's request failed");
        took.push(start.elapsed());
    }
    took.sort();
    took
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_flood_from_unknown_keys_does_not_starve_agents() {
    let (sentry_key, agent_key, late_key) = (key(), key(), key());
    let config = sentry_config(
        &[("v1", &agent_key), ("v2", &late_key)],
        &[(
            "p2p",
            &["v1/svc"],
            "connect_rate_per_ip = \"1000/s\"\nmax_connections_per_ip = 100",
        )],
    );
    let sentry = start_sentry(&config, &sentry_key).await;
    let quic_addr = sentry.handle.quic_addr().expect("quic_listen is set");
    let echo = echo_service().await;
    let _first = start_agent(
        agent_config("v1", quic_addr, &sentry_key, &[("svc", echo)]),
        agent_key,
    );
    sentry.wait_agent("v1", true).await;
    let route = sentry.route("p2p");
    let quiet = round_trips(route, 50).await;

    // Eight flooding addresses (not the agents' 127.0.0.1), 16 handshakes in flight each.
    let until = relay_core::clock::now() + Duration::from_secs(6);
    let sources = [
        "127.0.0.2",
        "127.0.0.3",
        "127.0.0.4",
        "127.0.0.5",
        "127.0.0.6",
        "127.0.0.7",
        "127.0.0.8",
        "127.0.0.9",
    ];
    let flood_key = sentry_key.clone();
    let flood =
        tokio::spawn(
            async move { flood_handshakes(quic_addr, &flood_key, &sources, 16, until).await },
        );
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Under the flood: the connected agent keeps serving, and a new agent gets in.
    let during = round_trips(route, 50).await;
    let _late = start_agent(
        agent_config("v2", quic_addr, &sentry_key, &[("svc", echo)]),
        late_key,
    );
    sentry.wait_agent("v2", true).await;
    let flood = flood.await.unwrap();
    sentry.wait_agent("v1", true).await;

    let median = |v: &[Duration]| v[v.len() / 2];
    eprintln!(
        "handshake flood: {flood:?}; honest request p50 {:?} max {:?} quiet, p50 {:?} max {:?} under the flood",
        median(&quiet),
        quiet[quiet.len() - 1],
        median(&during),
        during[during.len() - 1],
    );
    assert_eq!(
        sentry.handle.connected(),
        ["v1", "v2"],
        "an unknown key got a tunnel"
    );
    assert!(flood.attempts >= 128, "the flood did not run: {flood:?}");
    assert!(
        flood.dropped > 0,
        "nothing was dropped: the handshake gate never acted ({flood:?})"
    );
}

/// A public client's socket carries TCP keep-alive (and a user timeout), so one that vanished
/// gives its place back within minutes, not at the route's idle timeout. Seen from outside
/// with `ss` (iproute2), as an operator would look.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_client_sockets_are_watched_for_death() {
    if !tool_available("ss", &["-V"], "the keep-alive test") {
        return;
    }
    let (sentry, _agent) = deployment("").await;
    let route = sentry.route("p2p");
    let mut tcp = TcpStream::connect(route).await.unwrap();
    assert!(echoes(&mut tcp).await);
    let client = tcp.local_addr().unwrap();
    // The sentry's side of this connection: from the route's address to the client's.
    let out = std::process::Command::new("ss")
        .args(["-tnoiH", "state", "established"])
        .arg(format!(
            "( sport = :{} and dport = :{} )",
            route.port(),
            client.port()
        ))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    // (The user timeout is set beside it; this `ss` does not show it.)
    assert!(
        text.contains("timer:(keepalive"),
        "no keep-alive timer: {text}"
    );
}

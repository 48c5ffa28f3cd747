//! In-process tier for UDP routes: real UDP sockets on 127.0.0.1, a real sentry and agent,
//! each client address a flow relayed over the tunnel to a UDP echo service behind the agent.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use relay_core::config;
use relay_core::keys::PrivateKey;
use tests::*;
use tokio::net::UdpSocket;

/// A UDP echo on loopback: every datagram goes back to its sender.
async fn udp_echo() -> SocketAddr {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65_536];
        while let Ok((n, from)) = socket.recv_from(&mut buf).await {
            let _ = socket.send_to(&buf[..n], from).await;
        }
    });
    addr
}

/// Sentry with udp route "disc" (`extra` TOML lines) to "v1/disc", agent "v1" exporting `disc`
/// (udp) at `echo` and `p2p` (tcp) at the same address, over `transport`.
async fn deployment(
    transport: &str,
    extra: &str,
    echo: SocketAddr,
) -> (RunningSentry, RunningAgent, PrivateKey) {
    let (sentry_key, agent_key) = (key(), key());
    let text = format!(
        "[sentry]\nprivate_key = \"s.key\"\nquic_listen = \"127.0.0.1:0\"\n\
         tls_listen = \"127.0.0.1:0\"\nmetrics_listen = \"127.0.0.1:0\"\n\
         wireguard_listen = \"127.0.0.1:0\"\nwireguard_address = \"100.64.0.1\"\n\n\
         [[agent]]\nname = \"v1\"\npublic_key = \"{}\"\nwireguard_address = \"100.64.0.2\"\n\n\
         [[route]]\nname = \"disc\"\nlisten = \"127.0.0.1:0\"\nprotocol = \"udp\"\n\
         upstream = [\"v1/disc\"]\n{extra}\n\n\
         [[route]]\nname = \"wrong\"\nlisten = \"127.0.0.1:0\"\nprotocol = \"udp\"\n\
         upstream = [\"v1/p2p\"]\n",
        agent_key.public_key()
    );
    let config = config::parse_sentry(Path::new("udp-sentry.toml"), &text).unwrap();
    let sentry = start_sentry(&config, &sentry_key).await;
    let (address, overlay) = match transport {
        "tls" => (sentry.handle.tls_addr().unwrap(), ""),
        "wireguard" => (
            sentry.handle.wireguard_addr().unwrap(),
            "wireguard_address = \"100.64.0.2\"\nsentry_wireguard_address = \"100.64.0.1\"\n",
        ),
        _ => (sentry.handle.quic_addr().expect("quic_listen is set"), ""),
    };
    let text = format!(
        "[agent]\nname = \"v1\"\nprivate_key = \"a.key\"\n\n\
         [[sentry]]\naddress = \"{address}\"\npublic_key = \"{}\"\ntransport = \"{transport}\"\n{overlay}\n\
         [[service]]\nname = \"disc\"\ntarget = \"{echo}\"\nprotocol = \"udp\"\n\n\
         [[service]]\nname = \"p2p\"\ntarget = \"{echo}\"\n",
        sentry_key.public_key()
    );
    let agent_config = config::parse_agent(Path::new("udp-agent.toml"), &text).unwrap();
    let agent = start_agent(agent_config, agent_key.clone());
    sentry.wait_agent("v1", true).await;
    (sentry, agent, agent_key)
}

/// Send `datagram` from `socket` to `to` and wait for one reply (bounded).
async fn exchange(socket: &UdpSocket, to: SocketAddr, datagram: &[u8]) -> Option<Vec<u8>> {
    socket.send_to(datagram, to).await.unwrap();
    let mut buf = vec![0u8; 65_536];
    match tokio::time::timeout(Duration::from_secs(3), socket.recv_from(&mut buf)).await {
        Ok(Ok((n, from))) => {
            assert_eq!(from, to, "a reply from somewhere else than the route");
            Some(buf[..n].to_vec())
        }
        _ => None,
    }
}

/// Many clients at once, each with its own datagrams: every reply reaches the client that
/// sent the datagram, whole, and nothing of another's.
async fn replies_reach_the_right_clients(transport: &str) {
    let echo = udp_echo().await;
    let (sentry, _agent, _) = deployment(
        transport,
        "max_connections_per_ip = 100\nconnect_rate_per_ip = \"1000/s\"",
        echo,
    )
    .await;
    let route = sentry.route("disc");
    let mut clients = Vec::new();
    for c in 0..40u32 {
        clients.push(tokio::spawn(async move {
            let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            for seq in 0..10u32 {
                let datagram = format!("client {c} datagram {seq} ").repeat(1 + (c as usize % 5));
                // A lost datagram is UDP's right, on loopback rare; one retry allowed.
                let mut reply = exchange(&socket, route, datagram.as_bytes()).await;
                if reply.is_none() {
                    reply = exchange(&socket, route, datagram.as_bytes()).await;
                }
                assert_eq!(
                    reply.as_deref(),
                    Some(datagram.as_bytes()),
                    "client {c} datagram {seq}"
                );
            }
        }));
    }
    for client in clients {
        tokio::time::timeout(PATIENCE, client)
            .await
            .unwrap()
            .unwrap();
    }
    // A datagram near the largest UDP payload crosses whole.
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let big: Vec<u8> = (0..60_000u32).map(|i| (i % 251) as u8).collect();
    assert_eq!(exchange(&socket, route, &big).await, Some(big));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_replies_reach_the_right_clients_over_quic() {
    replies_reach_the_right_clients("quic").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_replies_reach_the_right_clients_over_tls() {
    replies_reach_the_right_clients("tls").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_replies_reach_the_right_clients_over_wireguard() {
    replies_reach_the_right_clients("wireguard").await;
}

/// Flows count against the per-address cap and expire after `idle_timeout`; a udp route never
/// reaches a tcp service.
/// A UDP flow reaches a loopback service from its client's own mapped address (the default
/// `source = "mapped"`), so a node's discovery table keeps two peers apart; with the agent's
/// own address they would both be 127.0.0.1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_flows_come_from_each_clients_mapped_address() {
    // Answers each datagram with the address it came from.
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let whoami = socket.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = [0u8; 1500];
        while let Ok((_, from)) = socket.recv_from(&mut buf).await {
            let _ = socket.send_to(from.ip().to_string().as_bytes(), from).await;
        }
    });
    let (sentry, _agent, _) = deployment("quic", "", whoami).await;
    let route = sentry.route("disc");
    let mut seen = Vec::new();
    for client in ["127.5.6.7", "127.8.9.10"] {
        let socket = UdpSocket::bind((client, 0)).await.unwrap();
        let reply = exchange(&socket, route, b"who am I").await.unwrap();
        let expected = relay_core::agent::mapped_source(client.parse().unwrap());
        assert_eq!(String::from_utf8(reply).unwrap(), expected.to_string());
        seen.push(expected);
    }
    assert_ne!(seen[0], seen[1]);
    assert!(!seen.contains(&std::net::Ipv4Addr::LOCALHOST));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flows_are_capped_expire_and_reach_only_udp_services() {
    let echo = udp_echo().await;
    let (sentry, _agent, _) = deployment(
        "quic",
        "max_connections_per_ip = 2\nconnect_rate_per_ip = \"1000/s\"\nidle_timeout = \"1s\"",
        echo,
    )
    .await;
    let route = sentry.route("disc");
    let sockets = Arc::new([
        UdpSocket::bind("127.0.0.1:0").await.unwrap(),
        UdpSocket::bind("127.0.0.1:0").await.unwrap(),
        UdpSocket::bind("127.0.0.1:0").await.unwrap(),
    ]);
    let active = || {
        let text = sentry.handle.render_metrics();
        metric(
            &text,
            "sentry_route_connections_active",
            &[("route", "disc")],
        )
    };
    assert_eq!(
        exchange(&sockets[0], route, b"a").await,
        Some(b"a".to_vec())
    );
    assert_eq!(
        exchange(&sockets[1], route, b"b").await,
        Some(b"b".to_vec())
    );
    assert_eq!(active(), Some(2.0));
    // Refused at once (the cap is full when it arrives); no answer within the wait.
    assert_eq!(
        exchange(&sockets[2], route, b"c").await,
        None,
        "a third flow from one address got through a cap of two"
    );
    // Quiet for over the idle timeout: both flows are forgotten, and the place is free.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(active(), Some(0.0));
    assert_eq!(
        exchange(&sockets[2], route, b"c").await,
        Some(b"c".to_vec())
    );

    // The route naming a tcp service: the agent refuses the flow, nothing is echoed.
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    assert_eq!(exchange(&socket, sentry.route("wrong"), b"x").await, None);
}

/// A full route makes room for a new peer by evicting its quietest flow, rather than
/// refusing newcomers while others (made-up sources, say) hold every place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_route_evicts_its_quietest_flow_for_a_new_peer() {
    let echo = udp_echo().await;
    let (sentry, _agent, _) = deployment(
        "quic",
        "max_connections = 4\nmax_connections_per_ip = 100\nconnect_rate_per_ip = \"1000/s\"",
        echo,
    )
    .await;
    let route = sentry.route("disc");
    let mut sockets = Vec::new();
    for _ in 0..5 {
        sockets.push(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    }
    for (i, socket) in sockets[..4].iter().enumerate() {
        let datagram = format!("first {i}");
        assert_eq!(
            exchange(socket, route, datagram.as_bytes()).await,
            Some(datagram.into_bytes())
        );
    }
    // Flow 1 goes quiet while the others talk.
    tokio::time::sleep(Duration::from_millis(50)).await;
    for i in [0, 2, 3] {
        assert!(exchange(&sockets[i], route, b"again").await.is_some());
    }
    let active = || {
        metric(
            &sentry.handle.render_metrics(),
            "sentry_route_connections_active",
            &[("route", "disc")],
        )
    };
    assert_eq!(active(), Some(4.0));
    // A new peer gets in: the quietest flow (1) made room.
    assert_eq!(
        exchange(&sockets[4], route, b"newcomer").await,
        Some(b"newcomer".to_vec()),
        "a new peer was refused by a full route"
    );
    // The evicted peer comes back as a new flow (and evicts the quietest in turn).
    assert_eq!(
        exchange(&sockets[1], route, b"back").await,
        Some(b"back".to_vec())
    );
    assert_eq!(active(), Some(4.0), "the cap still holds");
}

/// New flows are rated per network (64 per /24 per second): made-up sources from one network
/// cannot fill a route, while a peer of another network is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_flows_are_rated_per_network() {
    let echo = udp_echo().await;
    let (sentry, _agent, _) = deployment(
        "quic",
        "max_connections = 1000\nmax_connections_per_ip = 1000\nconnect_rate_per_ip = \"1000/s\"",
        echo,
    )
    .await;
    let route = sentry.route("disc");
    // 120 addresses of 127.0.0.0/24, one datagram each, at once.
    let mut sockets = Vec::new();
    for i in 0..120u8 {
        sockets.push(
            UdpSocket::bind((std::net::Ipv4Addr::new(127, 0, 0, 2 + i), 0))
                .await
                .unwrap(),
        );
    }
    for socket in &sockets {
        socket.send_to(b"hello", route).await.unwrap();
    }
    let mut answered = 0;
    for socket in &sockets {
        let mut buf = [0u8; 64];
        if tokio::time::timeout(Duration::from_millis(500), socket.recv_from(&mut buf))
            .await
            .is_ok()
        {
            answered += 1;
        }
    }
    assert!(
        (50..=90).contains(&answered),
        "{answered} of 120 new flows from one /24 were served"
    );
    let rated = metric(
        &sentry.handle.render_metrics(),
        "sentry_route_connections_refused_total",
        &[("route", "disc"), ("reason", "rate")],
    )
    .unwrap();
    assert!(rated >= 30.0, "{rated} refused for their network's rate");
    // Another network is not held to that one's budget.
    let other = UdpSocket::bind("127.0.1.5:0").await.unwrap();
    assert_eq!(
        exchange(&other, route, b"elsewhere").await,
        Some(b"elsewhere".to_vec())
    );
}

//! In-process tier: a real sentry and real agents on 127.0.0.1, relaying real TCP connections
//! through real QUIC tunnels.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use relay_core::config::{SentryPeer, TransportKind};
use relay_core::relay::{Header, Status};
use relay_core::transport::quic;
use tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const MIB: usize = 1024 * 1024;
const BULK: usize = 256 * MIB;

/// One sentry with route "p2p" → agent "v1" service "svc" at `target`, tunnel up.
async fn deployment(target: SocketAddr, extra: &str) -> (RunningSentry, RunningAgent) {
    deployment_to("svc", target, extra).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_upload_256_mib_hash_checked() {
    // The service hashes everything it receives and answers with the digest at end of stream.
    let sink = hash_sink().await;
    let (sentry, _agent) = deployment(sink, "").await;
    upload_hash_checked(sentry.route("p2p"), 7, BULK).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_download_256_mib_hash_checked() {
    let source = service(|mut tcp| async move {
        write_payload(&mut tcp, 11, BULK).await.unwrap();
        tcp.shutdown().await.unwrap();
    })
    .await;
    let (sentry, _agent) = deployment(source, "").await;
    let mut tcp = TcpStream::connect(sentry.route("p2p")).await.unwrap();
    let (len, digest) = tokio::time::timeout(Duration::from_secs(120), read_hash(&mut tcp))
        .await
        .unwrap()
        .unwrap();
    let mut expected = tokio::io::sink();
    let want = write_payload(&mut expected, 11, BULK).await.unwrap();
    assert_eq!(len, BULK);
    assert_eq!(digest, want, "the client received different bytes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_connections_keep_their_own_bytes() {
    // One client address opening 200 at once: above the per-client defaults on purpose.
    let (sentry, _agent) = deployment(
        echo_service().await,
        "max_connections_per_ip = 200\nconnect_rate_per_ip = \"200/s\"",
    )
    .await;
    concurrent_echoes(sentry.route("p2p"), 200).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_in_both_directions() {
    // Client half-closes first: the service sees EOF, and its answer still reaches the client.
    let counter = service(|mut tcp| async move {
        let mut all = Vec::new();
        tcp.read_to_end(&mut all).await.unwrap();
        tcp.write_all(format!("got {} bytes", all.len()).as_bytes())
            .await
            .unwrap();
        tcp.shutdown().await.unwrap();
    })
    .await;
    let (sentry, _agent) = deployment(counter, "").await;
    let mut tcp = TcpStream::connect(sentry.route("p2p")).await.unwrap();
    tcp.write_all(&[7u8; 5000]).await.unwrap();
    tcp.shutdown().await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(PATIENCE, tcp.read_to_string(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(answer, "got 5000 bytes");

    // Service half-closes first: the client sees EOF, and its later bytes still reach the service.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let greeter = service(move |mut tcp| {
        let tx = tx.clone();
        async move {
            tcp.write_all(b"hello").await.unwrap();
            tcp.shutdown().await.unwrap();
            let mut all = Vec::new();
            tcp.read_to_end(&mut all).await.unwrap();
            tx.send(all).unwrap();
        }
    })
    .await;
    let (sentry, _agent) = deployment(greeter, "").await;
    let mut tcp = TcpStream::connect(sentry.route("p2p")).await.unwrap();
    let mut hello = Vec::new();
    tokio::time::timeout(PATIENCE, tcp.read_to_end(&mut hello))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(hello, b"hello");
    tcp.write_all(b"after your EOF").await.unwrap();
    tcp.shutdown().await.unwrap();
    let got = tokio::time::timeout(PATIENCE, rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, b"after your EOF");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_after_the_route_idle_timeout() {
    let (sentry, _agent) = deployment(echo_service().await, "idle_timeout = \"1s\"").await;
    let mut tcp = TcpStream::connect(sentry.route("p2p")).await.unwrap();
    tcp.write_all(b"x").await.unwrap();
    let mut buf = [0u8; 1];
    tcp.read_exact(&mut buf).await.unwrap();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "an idle connection was not closed");
    assert!(rest.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unlisted_agent_key_is_refused_in_the_handshake() {
    let (sentry_key, listed, rogue) = (key(), key(), key());
    let config = sentry_config(&[("v1", &listed)], &[("p2p", &["v1/svc"], "")]);
    let sentry = start_sentry(&config, &sentry_key).await;
    let peer = SentryPeer {
        address: sentry
            .handle
            .quic_addr()
            .expect("quic_listen is set")
            .to_string(),
        public_key: sentry_key.public_key(),
        transport: TransportKind::Quic,
        wireguard: None,
    };
    let client = quic::client_config(&rogue, peer.public_key, &quic::Tuning::default()).unwrap();
    match relay_core::agent::dial(&peer, &client, &rogue).await {
        Err(e) => assert!(e.to_string().contains("handshake"), "{e}"),
        Ok((_endpoint, conn)) => {
            // TLS 1.3 lets the client finish before the server has checked its certificate;
            // the refusal then arrives as the connection's close.
            let closed = tokio::time::timeout(PATIENCE, conn.closed()).await.unwrap();
            assert!(closed.to_string().contains("certificate"), "{closed}");
        }
    }
    assert!(sentry.handle.connected().is_empty());
    // And the listed agent still gets in.
    let agent = start_agent(
        agent_config(
            "v1",
            sentry.handle.quic_addr().expect("quic_listen is set"),
            &sentry_key,
            &[("svc", echo_service().await)],
        ),
        listed,
    );
    sentry.wait_agent("v1", true).await;
    drop(agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentry_with_the_wrong_key_is_refused_by_the_agent() {
    let (sentry_key, impostor_pin, agent_key) = (key(), key(), key());
    let config = sentry_config(&[("v1", &agent_key)], &[("p2p", &["v1/svc"], "")]);
    let sentry = start_sentry(&config, &sentry_key).await;
    let peer = SentryPeer {
        address: sentry
            .handle
            .quic_addr()
            .expect("quic_listen is set")
            .to_string(),
        public_key: impostor_pin.public_key(),
        transport: TransportKind::Quic,
        wireguard: None,
    };
    let client =
        quic::client_config(&agent_key, peer.public_key, &quic::Tuning::default()).unwrap();
    let Err(err) = relay_core::agent::dial(&peer, &client, &agent_key).await else {
        panic!("the agent accepted an unpinned sentry");
    };
    assert!(err.to_string().contains("certificate"), "{err}");
    // The full agent with that pin never brings the tunnel up either.
    let agent = start_agent(
        agent_config(
            "v1",
            sentry.handle.quic_addr().expect("quic_listen is set"),
            &impostor_pin,
            &[("svc", echo_service().await)],
        ),
        agent_key,
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(sentry.handle.connected().is_empty());
    drop(agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_refuses_services_it_does_not_export() {
    // Protocol level: act as the sentry and ask the real agent for a service it lacks.
    let (sentry_key, agent_key) = (key(), key());
    let endpoint = quic::server_endpoint(
        "127.0.0.1:0".parse().unwrap(),
        &sentry_key,
        std::iter::once((agent_key.public_key(), "v1".to_owned())).collect(),
        &quic::Tuning::default(),
    )
    .unwrap();
    let quic_addr = endpoint.local_addr().unwrap();
    let _agent = start_agent(
        agent_config(
            "v1",
            quic_addr,
            &sentry_key,
            &[("svc", echo_service().await), ("down", closed_port().await)],
        ),
        agent_key,
    );
    let conn = tokio::time::timeout(PATIENCE, endpoint.accept().await.unwrap())
        .await
        .unwrap()
        .unwrap();
    for (service, want) in [
        ("nope", Status::UnknownService),
        ("down", Status::ConnectRefused),
        ("svc", Status::Ok),
    ] {
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        let header = Header {
            route: "p2p".into(),
            service: service.into(),
            client: "203.0.113.10:1234".parse().unwrap(),
            proxy: None,
            udp: false,
        };
        send.write_all(&header.encode().unwrap()).await.unwrap();
        let mut status = [0u8; 1];
        recv.read_exact(&mut status).await.unwrap();
        assert_eq!(
            Status::from_byte(status[0]),
            Some(want),
            "service {service}"
        );
    }
    // A malformed header gets BadHeader, not a connection anywhere.
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&[9, 3, 0, 0, 0]).await.unwrap();
    let mut status = [0u8; 1];
    recv.read_exact(&mut status).await.unwrap();
    assert_eq!(Status::from_byte(status[0]), Some(Status::BadHeader));

    // Client level: a route to an unexported service closes the client at once.
    let (sentry, _agent) = deployment_to("nope", echo_service().await, "").await;
    assert!(closed_without_data(sentry.route("p2p"), Duration::from_secs(3)).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_serves_again_without_restarting_the_sentry() {
    let (sentry_key, agent_key) = (key(), key());
    let echo = echo_service().await;
    let config = sentry_config(&[("v1", &agent_key)], &[("p2p", &["v1/svc"], "")]);
    let sentry = start_sentry(&config, &sentry_key).await;
    let agent_cfg = agent_config(
        "v1",
        sentry.handle.quic_addr().expect("quic_listen is set"),
        &sentry_key,
        &[("svc", echo)],
    );
    let agent = start_agent(agent_cfg.clone(), agent_key.clone());
    sentry.wait_agent("v1", true).await;
    assert_eq!(round_trip(sentry.route("p2p")).await, b"ping");

    drop(agent);
    sentry.wait_agent("v1", false).await;
    assert!(
        closed_without_data(sentry.route("p2p"), Duration::from_secs(3)).await,
        "a client hung while no agent was connected"
    );

    let _agent = start_agent(agent_cfg, agent_key);
    sentry.wait_agent("v1", true).await;
    assert_eq!(round_trip(sentry.route("p2p")).await, b"ping");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_follows_the_upstream_order() {
    let (sentry_key, key_a, key_b) = (key(), key(), key());
    let config = sentry_config(
        &[("a", &key_a), ("b", &key_b)],
        &[("p2p", &["a/svc", "b/svc"], "")],
    );
    let sentry = start_sentry(&config, &sentry_key).await;
    let quic_addr = sentry.handle.quic_addr().expect("quic_listen is set");
    let cfg_a = agent_config(
        "a",
        quic_addr,
        &sentry_key,
        &[("svc", tagged_echo_service("A").await)],
    );
    let agent_a = start_agent(cfg_a.clone(), key_a.clone());
    let _agent_b = start_agent(
        agent_config(
            "b",
            quic_addr,
            &sentry_key,
            &[("svc", tagged_echo_service("B").await)],
        ),
        key_b.clone(),
    );
    sentry.wait_agent("a", true).await;
    sentry.wait_agent("b", true).await;
    assert_eq!(tag_of(sentry.route("p2p")).await, "A");

    drop(agent_a);
    sentry.wait_agent("a", false).await;
    assert_eq!(
        tag_of(sentry.route("p2p")).await,
        "B",
        "did not fail over to the second upstream"
    );

    // A connected first agent whose service refuses also fails over.
    let refusing = agent_config("a", quic_addr, &sentry_key, &[("svc", closed_port().await)]);
    let agent_a = start_agent(refusing, key_a.clone());
    sentry.wait_agent("a", true).await;
    assert_eq!(tag_of(sentry.route("p2p")).await, "B");
    drop(agent_a);
    sentry.wait_agent("a", false).await;

    // And the first agent takes over again when it is back.
    let _agent_a = start_agent(cfg_a, key_a);
    sentry.wait_agent("a", true).await;
    assert_eq!(tag_of(sentry.route("p2p")).await, "A");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusing_upstream_is_held_down_and_tried_last() {
    let (sentry_key, key_a) = (key(), key());
    let config = sentry_config(&[("a", &key_a)], &[("p2p", &["a/down", "a/svc"], "")]);
    let sentry = start_sentry(&config, &sentry_key).await;
    let mut agent = agent_config(
        "a",
        sentry.handle.quic_addr().expect("quic_listen is set"),
        &sentry_key,
        &[
            ("down", closed_port().await),
            ("svc", tagged_echo_service("A").await),
        ],
    );
    let metrics = closed_port().await;
    agent.metrics_listen = Some(metrics);
    let _agent = start_agent(agent, key_a);
    sentry.wait_agent("a", true).await;
    // The agent's count of refusals by its "down" service: what the sentry attempted.
    let refusals = || async move {
        let (_, text) = tokio::task::spawn_blocking(move || http_get(metrics, "/metrics"))
            .await
            .unwrap();
        metric(
            &text,
            "sentry_agent_streams_total",
            &[("service", "down"), ("status", "connect_refused")],
        )
    };

    for _ in 0..5 {
        assert_eq!(tag_of(sentry.route("p2p")).await, "A");
    }
    assert_eq!(
        refusals().await,
        Some(1.0),
        "clients kept paying an attempt at the refusing upstream"
    );
    let text = sentry.handle.render_metrics();
    let labels = [("upstream", "a/down")];
    assert_eq!(
        metric(&text, "sentry_upstream_hold_downs_total", &labels),
        Some(1.0)
    );
    assert_eq!(
        metric(&text, "sentry_upstream_held_down", &labels),
        Some(1.0)
    );

    // Once the hold expires the upstream is tried first again (and refuses again).
    tokio::time::sleep(relay_core::sentry::HOLD_DOWN + Duration::from_millis(500)).await;
    assert_eq!(tag_of(sentry.route("p2p")).await, "A");
    assert_eq!(refusals().await, Some(2.0));
    let text = sentry.handle.render_metrics();
    assert_eq!(
        metric(&text, "sentry_upstream_hold_downs_total", &labels),
        Some(2.0)
    );
}

async fn round_trip(addr: SocketAddr) -> Vec<u8> {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"ping").await.unwrap();
    let mut buf = vec![0u8; 4];
    tokio::time::timeout(PATIENCE, tcp.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    buf
}

async fn tag_of(addr: SocketAddr) -> String {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let mut tag = [0u8; 1];
    tokio::time::timeout(PATIENCE, tcp.read_exact(&mut tag))
        .await
        .unwrap()
        .unwrap();
    String::from_utf8_lossy(&tag).into_owned()
}

/// What one sentry can make the agent hold is capped, whatever the sentry does: acting as a
/// (compromised) sentry at the protocol level, streams past a service's `max_connections`, or
/// past the agent's `max_streams_per_sentry`, are answered `Busy`, and each place comes back
/// when its connection ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentry_cannot_make_the_agent_exceed_its_caps() {
    let (sentry_key, agent_key) = (key(), key());
    let endpoint = quic::server_endpoint(
        "127.0.0.1:0".parse().unwrap(),
        &sentry_key,
        std::iter::once((agent_key.public_key(), "v1".to_owned())).collect(),
        &quic::Tuning::default(),
    )
    .unwrap();
    let quic_addr = endpoint.local_addr().unwrap();
    let (a, b) = (echo_service().await, echo_service().await);
    let text = format!(
        "[agent]\nname = \"v1\"\nprivate_key = \"agent.key\"\nmax_streams_per_sentry = 5\n\n\
         [[sentry]]\naddress = \"{quic_addr}\"\npublic_key = \"{}\"\n\n\
         [[service]]\nname = \"a\"\ntarget = \"{a}\"\nmax_connections = 3\n\n\
         [[service]]\nname = \"b\"\ntarget = \"{b}\"\n",
        sentry_key.public_key()
    );
    let config = relay_core::config::parse_agent(std::path::Path::new("a.toml"), &text).unwrap();
    let _agent = start_agent(config, agent_key);
    let conn = tokio::time::timeout(PATIENCE, endpoint.accept().await.unwrap())
        .await
        .unwrap()
        .unwrap();
    let open = |service: &'static str| {
        let conn = conn.clone();
        async move {
            let (mut send, mut recv) = conn.open_bi().await.unwrap();
            let header = Header {
                route: "p2p".into(),
                service: service.into(),
                client: "203.0.113.10:1234".parse().unwrap(),
                proxy: None,
                udp: false,
            };
            send.write_all(&header.encode().unwrap()).await.unwrap();
            let mut status = [0u8; 1];
            tokio::time::timeout(PATIENCE, recv.read_exact(&mut status))
                .await
                .unwrap()
                .unwrap();
            (Status::from_byte(status[0]), send, recv)
        }
    };
    // Service a takes three at once.
    let mut held = Vec::new();
    for _ in 0..3 {
        let (status, send, recv) = open("a").await;
        assert_eq!(status, Some(Status::Ok));
        held.push((send, recv));
    }
    assert_eq!(
        open("a").await.0,
        Some(Status::Busy),
        "past a's max_connections"
    );
    // The sentry may hold five streams: two more (to b), then QUIC lets it open no more (the
    // agent's transport parameters say so).
    for _ in 0..2 {
        let (status, send, recv) = open("b").await;
        assert_eq!(status, Some(Status::Ok));
        held.push((send, recv));
    }
    let sixth = tokio::time::timeout(Duration::from_secs(1), conn.open_bi()).await;
    assert!(
        sixth.is_err(),
        "a sixth stream opened past max_streams_per_sentry"
    );
    // One ends: its places come back.
    let (mut send, mut recv) = held.remove(0);
    send.finish().unwrap();
    let _ = tokio::time::timeout(PATIENCE, recv.read_to_end(1024)).await;
    drop((send, recv));
    let mut status = None;
    for _ in 0..50 {
        let (got, send, recv) = open("a").await;
        status = got;
        if got == Some(Status::Ok) {
            held.push((send, recv));
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(status, Some(Status::Ok), "a place did not come back");
}

/// An agent whose tunnel is alive (it acknowledges everything) but that answers no relay
/// header (a service stuck, or its flow control spent for a moment): the client waiting on
/// it is given up after the status timeout, and the tunnel, with whatever else it carries,
/// stays. Acting as that agent at the protocol level.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_is_alive_but_silent_keeps_its_tunnel() {
    let (sentry_key, agent_key) = (key(), key());
    let config = sentry_config(&[("v1", &agent_key)], &[("p2p", &["v1/svc"], "")]);
    let sentry = start_sentry(&config, &sentry_key).await;
    let peer = SentryPeer {
        address: sentry
            .handle
            .quic_addr()
            .expect("quic_listen is set")
            .to_string(),
        public_key: sentry_key.public_key(),
        transport: TransportKind::Quic,
        wireguard: None,
    };
    let client =
        quic::client_config(&agent_key, peer.public_key, &quic::Tuning::default()).unwrap();
    let (_endpoint, conn) = relay_core::agent::dial(&peer, &client, &agent_key)
        .await
        .unwrap();
    sentry.wait_agent("v1", true).await;
    // Streams are taken and read, never answered.
    let accepting = conn.clone();
    tokio::spawn(async move {
        while let Ok((send, mut recv)) = accepting.accept_bi().await {
            tokio::spawn(async move {
                let _keep = send;
                let mut buf = [0u8; 256];
                while let Ok(Some(_)) = recv.read(&mut buf).await {}
            });
        }
    });
    let mut tcp = TcpStream::connect(sentry.route("p2p")).await.unwrap();
    let _ = tcp.write_all(b"hello").await;
    let mut buf = [0u8; 8];
    let closed = tokio::time::timeout(PATIENCE, tcp.read(&mut buf)).await;
    assert!(
        matches!(closed, Ok(Ok(0) | Err(_))),
        "the client was not given up"
    );
    assert_eq!(
        sentry.handle.connected(),
        ["v1"],
        "the tunnel of a live agent was closed"
    );
    assert!(conn.close_reason().is_none(), "the tunnel was closed");
}

/// A service that resets its connection mid-answer: the client is reset too (it must not
/// take the part it got for the whole answer).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_reset_reaches_the_client_as_a_reset() {
    let (sentry, _agent) = deployment(resetting_service().await, "").await;
    a_cut_answer_reaches_the_client_as_a_reset(sentry.route("p2p")).await;
}

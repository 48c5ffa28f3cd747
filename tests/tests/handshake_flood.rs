//! Strangers who start tunnel handshakes and never finish them, from many loopback addresses
//! (127.0.0.2 and up), against a real sentry: a pinned agent still connects within 5 s, over
//! QUIC (handshakes that pass the address check and stall after the ClientHello) and over
//! TCP+TLS (connections that send nothing).
#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use relay_core::config;
use relay_core::keys::PrivateKey;
use relay_core::transport::pin::SERVER_NAME;
use relay_core::transport::quic::{self, Tuning};
use tests::*;
use tokio::net::{TcpSocket, UdpSocket};

/// What a pinned agent is promised under a flood.
const WITHIN: Duration = Duration::from_secs(5);
/// Flooding addresses: 127.0.0.2 to 127.0.0.41, 8 handshakes each (the per-address cap):
/// more than the 256 places the sentry has.
const SOURCES: u8 = 40;

fn source(i: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + i))
}

/// A UDP relay for the QUIC handshakes of one client endpoint, bound on `from`: each
/// connection's packets pass until the server first answers it with anything but a retry,
/// then nothing more of it. The server has the ClientHello (and the retry token) and waits for
/// the rest until it gives up. Connections are told apart by the client's source connection
/// ID (the destination ID of the server's answers).
async fn stalling_relay(server: SocketAddr, from: IpAddr, stop: Arc<AtomicBool>) -> SocketAddr {
    let front = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let back = UdpSocket::bind(SocketAddr::new(from, 0)).await.unwrap();
    back.connect(server).await.unwrap();
    let addr = front.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut a, mut b) = (vec![0u8; 65536], vec![0u8; 65536]);
        let mut client = None;
        let mut answered = std::collections::HashSet::<Vec<u8>>::new();
        let deadline = tokio::time::sleep(Duration::from_secs(60));
        tokio::pin!(deadline);
        while !stop.load(Ordering::Relaxed) {
            tokio::select! {
                () = &mut deadline => return,
                got = front.recv_from(&mut a) => {
                    let Ok((n, from)) = got else { return };
                    client = Some(from);
                    // Long-header packets only (the handshake's), of connections not answered.
                    let scid = long_header_ids(&a[..n]).map(|(_, scid)| scid);
                    if scid.is_some_and(|scid| !answered.contains(scid)) {
                        let _ = back.send(&a[..n]).await;
                    }
                }
                got = back.recv(&mut b) => {
                    let Ok(n) = got else { return };
                    // A retry is a long-header packet of type 3.
                    if let Some((dcid, _)) = long_header_ids(&b[..n])
                        && b[0] & 0xf0 != 0xf0
                    {
                        answered.insert(dcid.to_vec());
                    }
                    if let Some(client) = client {
                        let _ = front.send_to(&b[..n], client).await;
                    }
                }
            }
        }
    });
    addr
}

/// The destination and source connection IDs of a QUIC long-header packet.
fn long_header_ids(packet: &[u8]) -> Option<(&[u8], &[u8])> {
    if packet.first()? & 0x80 == 0 {
        return None;
    }
    let dlen = usize::from(*packet.get(5)?);
    let dcid = packet.get(6..6 + dlen)?;
    let slen = usize::from(*packet.get(6 + dlen)?);
    let scid = packet.get(7 + dlen..7 + dlen + slen)?;
    Some((dcid, scid))
}

/// Stalled QUIC handshakes from every source, 8 at a time each (the per-address cap), each
/// given up after 3 s and started again, until `stop`, on a runtime of their own (so they do
/// not slow the sentry's). Returns the attempts started.
fn flood_quic(
    server: SocketAddr,
    sentry_key: &PrivateKey,
    stop: &Arc<AtomicBool>,
) -> Arc<AtomicU64> {
    let started = Arc::new(AtomicU64::new(0));
    let pin = sentry_key.public_key();
    let (stop, counter) = (stop.clone(), started.clone());
    on_own_runtime(stop.clone(), async move {
        for i in 0..SOURCES {
            // An endpoint of its own per address (one endpoint for hundreds of handshakes
            // loses packets in its socket buffer).
            let stranger = key();
            let endpoint = quic::client_endpoint(
                "127.0.0.1:0".parse().unwrap(),
                &stranger,
                &Tuning::default(),
            )
            .unwrap();
            let client = quic::client_config(&stranger, pin, &Tuning::default()).unwrap();
            let relay = stalling_relay(server, source(i), stop.clone()).await;
            for _ in 0..8 {
                let (endpoint, client, stop, started) = (
                    endpoint.clone(),
                    client.clone(),
                    stop.clone(),
                    counter.clone(),
                );
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) && started.load(Ordering::Relaxed) < 20_000
                    {
                        started.fetch_add(1, Ordering::Relaxed);
                        let Ok(connecting) =
                            endpoint.connect_with(client.clone(), relay, SERVER_NAME)
                        else {
                            return;
                        };
                        // The sentry keeps its side until it gives the attempt up (evicted,
                        // or its 10 s timeout): the relay stops the client's packets.
                        let _ = tokio::time::timeout(Duration::from_secs(15), connecting).await;
                    }
                });
            }
        }
    });
    started
}

/// Run `start` (which spawns the flood's tasks) on a runtime of its own thread until `stop`,
/// so the flood does not slow the sentry's runtime in this process.
fn on_own_runtime(
    stop: Arc<AtomicBool>,
    start: impl std::future::Future<Output = ()> + Send + 'static,
) {
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            start.await;
            let deadline = relay_core::clock::now() + Duration::from_secs(60);
            while !stop.load(Ordering::Relaxed) && relay_core::clock::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
    });
}

/// TCP connections to the TLS listener that send nothing, from 4 sources, 64 each (the
/// per-address cap), each opened again when the sentry closes it, until `stop`.
fn flood_tls(server: SocketAddr, stop: &Arc<AtomicBool>) -> Arc<AtomicU64> {
    use tokio::io::AsyncReadExt;
    let started = Arc::new(AtomicU64::new(0));
    let (stop, counter) = (stop.clone(), started.clone());
    on_own_runtime(stop.clone(), async move {
        for i in 0..4 {
            for _ in 0..64 {
                let (stop, started) = (stop.clone(), counter.clone());
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) && started.load(Ordering::Relaxed) < 50_000
                    {
                        started.fetch_add(1, Ordering::Relaxed);
                        let socket = TcpSocket::new_v4().unwrap();
                        socket.bind(SocketAddr::new(source(i), 0)).unwrap();
                        let Ok(mut tcp) = socket.connect(server).await else {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        };
                        let mut buf = [0u8; 1];
                        let _ =
                            tokio::time::timeout(Duration::from_secs(20), tcp.read(&mut buf)).await;
                    }
                });
            }
        }
    });
    started
}

/// Wait (at most 30 s) until the flood holds every stranger's place of `transport`'s
/// listener (256).
async fn full(sentry: &RunningSentry, transport: &str) {
    let start = relay_core::clock::now();
    loop {
        let in_flight = metric(
            &sentry.handle.render_metrics(),
            "sentry_tunnel_handshakes_in_flight",
            &[("transport", transport)],
        )
        .unwrap_or(0.0);
        if in_flight >= 256.0 {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the flood holds only {in_flight} places: {}",
            sentry
                .handle
                .render_metrics()
                .lines()
                .filter(|l| l.contains("handshake"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn sentry_config(agents: &[(&str, &PrivateKey)], tls: bool) -> config::SentryConfig {
    let mut text =
        String::from("[sentry]\nprivate_key = \"sentry.key\"\nquic_listen = \"127.0.0.1:0\"\n");
    if tls {
        text += "tls_listen = \"127.0.0.1:0\"\n";
    }
    for (name, key) in agents {
        text += &format!(
            "\n[[agent]]\nname = \"{name}\"\npublic_key = \"{}\"\n",
            key.public_key()
        );
    }
    text += "\n[[route]]\nname = \"p2p\"\nlisten = \"127.0.0.1:0\"\nupstream = [\"v1/svc\"]\n";
    config::parse_sentry(Path::new("test-sentry.toml"), &text).unwrap()
}

fn agent_config(
    name: &str,
    sentry: SocketAddr,
    sentry_key: &PrivateKey,
    transport: &str,
    echo: SocketAddr,
) -> config::AgentConfig {
    let text = format!(
        "[agent]\nname = \"{name}\"\nprivate_key = \"agent.key\"\n\n\
         [[sentry]]\naddress = \"{sentry}\"\npublic_key = \"{}\"\ntransport = \"{transport}\"\n\n\
         [[service]]\nname = \"svc\"\ntarget = \"{echo}\"\n",
        sentry_key.public_key()
    );
    config::parse_agent(Path::new("test-agent.toml"), &text).unwrap()
}

/// Start agent `name` and wait for its tunnel; how long it took (panics past [`WITHIN`]).
async fn connects(
    sentry: &RunningSentry,
    agent: config::AgentConfig,
    key: PrivateKey,
    name: &str,
) -> (RunningAgent, Duration) {
    let start = relay_core::clock::now();
    let running = start_agent(agent, key);
    let up = tokio::time::timeout(WITHIN, sentry.handle.wait_agent(name, true)).await;
    let took = start.elapsed();
    assert!(
        up.is_ok(),
        "agent {name} did not connect within {WITHIN:?} under the flood"
    );
    (running, took)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_agents_connect_over_quic_while_strangers_stall_handshakes() {
    let (sentry_key, known_key, new_key) = (key(), key(), key());
    let sentry = start_sentry(
        &sentry_config(&[("v1", &known_key), ("v2", &new_key)], false),
        &sentry_key,
    )
    .await;
    let quic_addr = sentry.handle.quic_addr().expect("quic_listen is set");
    let echo = echo_service().await;
    // v1 connects before the flood: its address is known from then on.
    let v1 = start_agent(
        agent_config("v1", quic_addr, &sentry_key, "quic", echo),
        known_key.clone(),
    );
    sentry.wait_agent("v1", true).await;
    // Gone without a word (its tunnel stays registered until it times out, or is replaced).
    drop(v1);

    let stop = Arc::new(AtomicBool::new(false));
    let started = flood_quic(quic_addr, &sentry_key, &stop);
    full(&sentry, "quic").await;
    let dropped = |reason: &str| {
        metric(
            &sentry.handle.render_metrics(),
            "sentry_tunnel_handshakes_dropped_total",
            &[("reason", reason)],
        )
        .unwrap_or(0.0)
    };
    // A new agent, from an address the sentry has not seen an agent on (through a relay on
    // 127.0.0.200, which passes everything): it evicts a stalled handshake.
    let (_v2, new_took) = {
        let stop_relay = Arc::new(AtomicBool::new(false));
        let via = plain_relay(quic_addr, source(198), stop_relay).await;
        connects(
            &sentry,
            agent_config("v2", via, &sentry_key, "quic", echo),
            new_key,
            "v2",
        )
        .await
    };
    // The known agent comes back: a reserved place; its new tunnel replaces the old one.
    let reconnects = || {
        metric(
            &sentry.handle.render_metrics(),
            "sentry_tunnel_reconnects_total",
            &[("agent", "v1"), ("transport", "quic")],
        )
        .unwrap_or(0.0)
    };
    let start = relay_core::clock::now();
    let _v1 = start_agent(
        agent_config("v1", quic_addr, &sentry_key, "quic", echo),
        known_key,
    );
    while reconnects() < 1.0 {
        assert!(
            start.elapsed() < WITHIN,
            "agent v1 did not connect again within {WITHIN:?} under the flood"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let known_took = start.elapsed();
    let evicted = dropped("evicted");
    stop.store(true, Ordering::Relaxed);
    eprintln!(
        "dropped: busy {} per_ip_busy {} rate {}; failed {:?}",
        dropped("busy"),
        dropped("per_ip_busy"),
        dropped("rate"),
        metric(
            &sentry.handle.render_metrics(),
            "sentry_tunnel_handshakes_failed_total",
            &[("transport", "quic")]
        )
    );
    eprintln!(
        "QUIC handshake flood: {} stalled attempts started; a new agent connected in {new_took:?}, a known one in {known_took:?}; {evicted} evicted",
        started.load(Ordering::Relaxed)
    );
    assert!(evicted > 0.0, "the flood never filled the gate");
}

/// A UDP relay on `from` that passes everything both ways (a NAT of sorts), until `stop`.
async fn plain_relay(server: SocketAddr, from: IpAddr, stop: Arc<AtomicBool>) -> SocketAddr {
    let front = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let back = UdpSocket::bind(SocketAddr::new(from, 0)).await.unwrap();
    back.connect(server).await.unwrap();
    let addr = front.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut a, mut b) = ([0u8; 65536], [0u8; 65536]);
        let mut client = None;
        let deadline = tokio::time::sleep(Duration::from_secs(60));
        tokio::pin!(deadline);
        while !stop.load(Ordering::Relaxed) {
            tokio::select! {
                () = &mut deadline => return,
                got = front.recv_from(&mut a) => {
                    let Ok((n, from)) = got else { return };
                    client = Some(from);
                    let _ = back.send(&a[..n]).await;
                }
                got = back.recv(&mut b) => {
                    let Ok(n) = got else { return };
                    if let Some(client) = client {
                        let _ = front.send_to(&b[..n], client).await;
                    }
                }
            }
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_agent_connects_over_tls_while_strangers_hold_connections_open() {
    let (sentry_key, agent_key) = (key(), key());
    let sentry = start_sentry(&sentry_config(&[("v1", &agent_key)], true), &sentry_key).await;
    let tls_addr = sentry.handle.tls_addr().unwrap();
    let echo = echo_service().await;
    let stop = Arc::new(AtomicBool::new(false));
    let started = flood_tls(tls_addr, &stop);
    full(&sentry, "tls").await;
    let (_agent, took) = connects(
        &sentry,
        agent_config("v1", tls_addr, &sentry_key, "tls", echo),
        agent_key,
        "v1",
    )
    .await;
    // It serves: a relayed connection over its data connections.
    let route = sentry.route("p2p");
    let relayed = tokio::time::timeout(WITHIN, concurrent_echoes(route, 4)).await;
    let evicted = metric(
        &sentry.handle.render_metrics(),
        "sentry_tunnel_handshakes_dropped_total",
        &[("reason", "evicted")],
    )
    .unwrap_or(0.0);
    stop.store(true, Ordering::Relaxed);
    eprintln!(
        "TLS flood: {} silent connections opened; the agent connected in {took:?}; {evicted} evicted",
        started.load(Ordering::Relaxed)
    );
    assert!(
        relayed.is_ok(),
        "the agent connected but did not serve in time"
    );
    assert!(evicted > 0.0, "the flood never filled the gate");
}

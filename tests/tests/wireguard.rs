//! In-process tier for the WireGuard transport: a real sentry and a real agent on 127.0.0.1,
//! relaying real TCP connections through standard WireGuard (boringtun) with the userspace
//! TCP/IP stack inside the overlay.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey as WgPublic, StaticSecret};
use relay_core::config;
use relay_core::keys::PrivateKey;
use tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

const MIB: usize = 1024 * 1024;
/// Tests run unoptimized; the benchmark moves gigabytes.
const BULK: usize = 48 * MIB;

fn wg_sentry_config(agent_key: &PrivateKey, extra: &str) -> config::SentryConfig {
    let text = format!(
        "[sentry]\nprivate_key = \"sentry.key\"\nquic_listen = \"127.0.0.1:0\"\n\
         wireguard_listen = \"127.0.0.1:0\"\nwireguard_address = \"100.64.0.1\"\n\n\
         [[agent]]\nname = \"v1\"\npublic_key = \"{}\"\nwireguard_address = \"100.64.0.2\"\n\n\
         [[route]]\nname = \"p2p\"\nlisten = \"127.0.0.1:0\"\nupstream = [\"v1/svc\"]\n{extra}\n",
        agent_key.public_key()
    );
    config::parse_sentry(Path::new("test-sentry.toml"), &text).unwrap()
}

fn wg_agent_config(
    sentry: SocketAddr,
    sentry_key: &PrivateKey,
    target: SocketAddr,
) -> config::AgentConfig {
    let text = format!(
        "[agent]\nname = \"v1\"\nprivate_key = \"agent.key\"\n\n\
         [[sentry]]\naddress = \"{sentry}\"\npublic_key = \"{}\"\ntransport = \"wireguard\"\n\
         wireguard_address = \"100.64.0.2\"\nsentry_wireguard_address = \"100.64.0.1\"\n\n\
         [[service]]\nname = \"svc\"\ntarget = \"{target}\"\n",
        sentry_key.public_key()
    );
    config::parse_agent(Path::new("test-agent.toml"), &text).unwrap()
}

/// A sentry with route "p2p" to agent "v1" over WireGuard; returns once the tunnel is up.
async fn deployment(target: SocketAddr, extra: &str) -> (RunningSentry, RunningAgent, PrivateKey) {
    let (sentry_key, agent_key) = (key(), key());
    let sentry = start_sentry(&wg_sentry_config(&agent_key, extra), &sentry_key).await;
    let wg = sentry.handle.wireguard_addr().unwrap();
    let agent = start_agent(wg_agent_config(wg, &sentry_key, target), agent_key);
    sentry.wait_agent("v1", true).await;
    (sentry, agent, sentry_key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_upload_hash_checked_over_wireguard() {
    let sink = hash_sink().await;
    let (sentry, _agent, _) = deployment(sink, "").await;
    upload_hash_checked(sentry.route("p2p"), 7, BULK).await;
}

/// What window a new stream gets is a metric on each end: here fixed by `wireguard_window`
/// (with `"auto"` it follows the round trip, which loopback makes too small to read).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_end_reports_the_window_its_new_streams_get() {
    let (sentry_key, agent_key) = (key(), key());
    let mut sentry_config = wg_sentry_config(&agent_key, "");
    sentry_config.wireguard.as_mut().unwrap().window = config::Window::Fixed(2 * MIB);
    let sentry = start_sentry(&sentry_config, &sentry_key).await;
    let wg = sentry.handle.wireguard_addr().unwrap();
    let mut agent_config = wg_agent_config(wg, &sentry_key, echo_service().await);
    agent_config.sentries[0].wireguard.as_mut().unwrap().window = config::Window::Fixed(3 * MIB);
    let agent = relay_core::agent::Agent::new(&agent_config, &agent_key).unwrap();
    let agent_handle = agent.handle();
    let agent_task = tokio::spawn(agent.run(std::future::pending()));
    sentry.wait_agent("v1", true).await;
    let text = sentry.handle.render_metrics();
    assert_eq!(
        metric(
            &text,
            "sentry_wireguard_stream_window_bytes",
            &[("agent", "v1")]
        ),
        Some((2 * MIB) as f64),
        "{text}"
    );
    // The agent's side is up a moment after the sentry's.
    let mut window = None;
    for _ in 0..100 {
        let text = agent_handle.render_metrics();
        window = metric(
            &text,
            "sentry_agent_wireguard_stream_window_bytes",
            &[("sentry", &wg.to_string()), ("transport", "wireguard")],
        );
        if window.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        window,
        Some((3 * MIB) as f64),
        "{}",
        agent_handle.render_metrics()
    );
    agent_task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_download_hash_checked_over_wireguard() {
    let source = service(|mut tcp| async move {
        write_payload(&mut tcp, 11, BULK).await.unwrap();
        tcp.shutdown().await.unwrap();
    })
    .await;
    let (sentry, _agent, _) = deployment(source, "").await;
    let mut tcp = TcpStream::connect(sentry.route("p2p")).await.unwrap();
    let (len, digest) = tokio::time::timeout(Duration::from_secs(120), read_hash(&mut tcp))
        .await
        .unwrap()
        .unwrap();
    let want = write_payload(&mut tokio::io::sink(), 11, BULK)
        .await
        .unwrap();
    assert_eq!(len, BULK);
    assert_eq!(digest, want, "the client received different bytes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_connections_over_wireguard() {
    let (sentry, _agent, _) = deployment(
        echo_service().await,
        "max_connections_per_ip = 200\nconnect_rate_per_ip = \"200/s\"",
    )
    .await;
    concurrent_echoes(sentry.route("p2p"), 200).await;
}

/// An echo whose client stops reading now and then: every buffer on the path fills, both
/// directions of the overlay stream reach a zero window at once, and the stream must resume
/// each time. (smoltcp could strand such a stream for good: see `PeerState::unstick`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_echo_resumes_after_both_directions_fill_up() {
    const LEN: usize = 24 * MIB;
    const PAUSE_EVERY: usize = MIB / 2;
    /// Small kernel buffers at both ends, so the overlay's buffers are what fills.
    const KERNEL_BUFFER: usize = 32 * 1024;
    let small = |tcp: &TcpStream| {
        let socket = socket2::SockRef::from(tcp);
        socket.set_recv_buffer_size(KERNEL_BUFFER).unwrap();
        socket.set_send_buffer_size(KERNEL_BUFFER).unwrap();
    };
    let echo = service(move |mut tcp| async move {
        small(&tcp);
        let (mut r, mut w) = tcp.split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
        let _ = w.shutdown().await;
    })
    .await;
    let (sentry, _agent, _) = deployment(echo, "").await;
    let tcp = TcpStream::connect(sentry.route("p2p")).await.unwrap();
    small(&tcp);
    let (mut reader, mut writer) = tcp.into_split();
    let sender = tokio::spawn(async move {
        let digest = write_payload(&mut writer, 11, LEN).await.unwrap();
        writer.shutdown().await.unwrap();
        digest
    });
    let receive = async {
        let mut sha = ring::digest::Context::new(&ring::digest::SHA256);
        let mut buf = vec![0u8; 64 * 1024];
        let (mut total, mut next_pause) = (0, PAUSE_EVERY);
        loop {
            let n = reader.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            sha.update(&buf[..n]);
            total += n;
            if total >= next_pause {
                next_pause += PAUSE_EVERY;
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
        }
        (total, sha.finish().as_ref().to_vec())
    };
    let (total, echoed) = tokio::time::timeout(Duration::from_secs(120), receive)
        .await
        .expect("the echo stalled");
    assert_eq!(total, LEN, "the echo came back short");
    assert_eq!(echoed, sender.await.unwrap(), "the echo came back altered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_refuses_services_it_does_not_export_over_wireguard() {
    let (sentry_key, agent_key) = (key(), key());
    let config = wg_sentry_config(&agent_key, "");
    let sentry = start_sentry(&config, &sentry_key).await;
    let wg = sentry.handle.wireguard_addr().unwrap();
    // The agent exports "other", the route asks for "svc".
    let mut agent_config = wg_agent_config(wg, &sentry_key, echo_service().await);
    agent_config.services[0].name = "other".into();
    let _agent = start_agent(agent_config, agent_key);
    sentry.wait_agent("v1", true).await;
    assert!(closed_without_data(sentry.route("p2p"), PATIENCE).await);
}

/// A WireGuard handshake initiation from `secret` to the sentry's `public` key.
fn initiation(secret: [u8; 32], sentry_public: [u8; 32]) -> Vec<u8> {
    let mut tunn = Tunn::new(
        StaticSecret::from(secret),
        WgPublic::from(sentry_public),
        None,
        None,
        7,
        None,
    );
    let mut out = vec![0u8; 2048];
    match tunn.format_handshake_initiation(&mut out, false) {
        TunnResult::WriteToNetwork(packet) => packet.to_vec(),
        _ => panic!("boringtun made no initiation"),
    }
}

async fn answered(to: SocketAddr, datagram: &[u8]) -> bool {
    let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    udp.send_to(datagram, to).await.unwrap();
    let mut buf = [0u8; 2048];
    tokio::time::timeout(Duration::from_secs(2), udp.recv_from(&mut buf))
        .await
        .is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wireguard_port_answers_nothing_without_a_pinned_key() {
    let (sentry, _agent, sentry_key) = deployment(echo_service().await, "").await;
    let wg = sentry.handle.wireguard_addr().unwrap();
    let sentry_public = sentry_key.public_key().wireguard().unwrap();
    let before = sentry.handle.wireguard_dropped();
    // Garbage, a truncated message, and a well-formed initiation (valid MAC: the stranger
    // knows the sentry's public key) from a key nobody pinned: no answer to any.
    assert!(!answered(wg, b"hello, is anyone there?").await);
    assert!(!answered(wg, &[1, 0, 0, 0, 9, 9]).await);
    let stranger = key();
    assert!(!answered(wg, &initiation(stranger.wireguard_secret(), sentry_public)).await);
    assert!(
        sentry.handle.wireguard_dropped() >= before + 3,
        "the datagrams did not arrive"
    );
    let text = sentry.handle.render_metrics();
    let dropped = metric(
        &text,
        "sentry_wireguard_datagrams_dropped_total",
        &[("listen", &wg.to_string())],
    );
    assert!(dropped.is_some_and(|n| n >= 3.0), "{text}");
    // The same initiation from the pinned agent's key is answered: the silence above is the
    // key check, not a deaf socket.
    let agent_key = key();
    let other = start_sentry(&wg_sentry_config(&agent_key, ""), &sentry_key).await;
    let other_wg = other.handle.wireguard_addr().unwrap();
    assert!(
        answered(
            other_wg,
            &initiation(agent_key.wireguard_secret(), sentry_public)
        )
        .await
    );
}

/// boringtun starts a new handshake every 120 s while data flows (REKEY_AFTER_TIME); a
/// connection open across it keeps working, with no pause it would notice. Takes about 135 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_connection_survives_a_rekey() {
    let (sentry, _agent, _) = deployment(echo_service().await, "").await;
    let mut tcp = TcpStream::connect(sentry.route("p2p")).await.unwrap();
    // A second connection stays silent throughout (a quiet P2P link): it must outlive the
    // rekey and every stream timer.
    let mut quiet = TcpStream::connect(sentry.route("p2p")).await.unwrap();
    quiet.write_all(b"hello").await.unwrap();
    let mut hello = [0u8; 5];
    quiet.read_exact(&mut hello).await.unwrap();
    let started = relay_core::clock::now();
    let mut slowest = Duration::ZERO;
    let mut i = 0u32;
    while started.elapsed() < Duration::from_secs(135) {
        let message = format!("ping {i}");
        let sent = relay_core::clock::now();
        tcp.write_all(message.as_bytes()).await.unwrap();
        let mut back = vec![0u8; message.len()];
        tokio::time::timeout(PATIENCE, tcp.read_exact(&mut back))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(back, message.as_bytes());
        slowest = slowest.max(sent.elapsed());
        i += 1;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // The first handshake is over 135 s old now: a younger one is the rekey.
    let age = sentry.handle.wireguard_handshake_age("v1");
    assert!(
        age.is_some_and(|age| age < Duration::from_secs(60)),
        "no rekey within 135 s: the last handshake was {age:?} ago"
    );
    quiet.write_all(b"still here").await.unwrap();
    let mut back = [0u8; 10];
    tokio::time::timeout(PATIENCE, quiet.read_exact(&mut back))
        .await
        .unwrap()
        .expect("a connection quiet for 135 s was closed");
    assert_eq!(&back, b"still here");
    eprintln!("{i} echoes across a rekey; slowest {slowest:?}");
}

/// Under a handshake flood (more initiations a second than the limit) the sentry stops doing
/// Diffie-Hellman for strangers and answers a well-formed initiation only with a cookie reply
/// (WireGuard's DoS defence); the pinned agent keeps being served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_flood_gets_cookie_replies_and_the_agent_stays_served() {
    let (sentry, _agent, sentry_key) = deployment(echo_service().await, "").await;
    let wg = sentry.handle.wireguard_addr().unwrap();
    let sentry_public = sentry_key.public_key().wireguard().unwrap();
    let flood = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let stranger = initiation(key().wireguard_secret(), sentry_public);
    // Bounded: 2000 datagrams, well above the 200/s limit within a second.
    for _ in 0..2000 {
        flood.send_to(&stranger, wg).await.unwrap();
    }
    let (mut cookies, mut other) = (0, 0);
    let mut buf = [0u8; 2048];
    while let Ok(Ok((n, _))) =
        tokio::time::timeout(Duration::from_millis(500), flood.recv_from(&mut buf)).await
    {
        if n == 64 && buf[0] == 3 {
            cookies += 1;
        } else {
            other += 1;
        }
    }
    assert!(cookies > 0, "no cookie reply under a flood");
    assert_eq!(
        other, 0,
        "a stranger got something other than a cookie reply"
    );
    // The agent's tunnel and relayed connections are untouched.
    let mut tcp = TcpStream::connect(sentry.route("p2p")).await.unwrap();
    tcp.write_all(b"still here").await.unwrap();
    let mut back = [0u8; 10];
    tokio::time::timeout(PATIENCE, tcp.read_exact(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&back, b"still here");
    eprintln!("flood: {cookies} cookie replies");
}

/// An agent sends its first handshake initiation as soon as it starts, not at its first
/// persistent keepalive (5 s later): a tunnel, and every rebuild of it, is up at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_starts_its_handshake_at_once() {
    let sentry = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let (sentry_key, agent_key) = (key(), key());
    let config = wg_agent_config(
        sentry.local_addr().unwrap(),
        &sentry_key,
        closed_port().await,
    );
    let _agent = start_agent(config, agent_key);
    let mut buf = [0u8; 512];
    let (n, _) = tokio::time::timeout(Duration::from_secs(2), sentry.recv_from(&mut buf))
        .await
        .expect("no handshake initiation within 2 s (the first keepalive comes at 5 s)")
        .unwrap();
    // A WireGuard handshake initiation: message type 1, 148 bytes.
    assert_eq!((n, buf[0]), (148, 1));
}

/// A service that resets its connection mid-answer: the client is reset too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_reset_reaches_the_client_as_a_reset_over_wireguard() {
    let (sentry, _agent, _) = deployment(resetting_service().await, "").await;
    a_cut_answer_reaches_the_client_as_a_reset(sentry.route("p2p")).await;
}

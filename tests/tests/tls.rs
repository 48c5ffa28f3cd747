//! In-process tier for the TCP+TLS transport: a real sentry and a real agent on 127.0.0.1,
//! relaying real TCP connections, each over a TLS connection of its own.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use relay_core::config;
use relay_core::keys::PrivateKey;
use relay_core::transport::tls;
use tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const MIB: usize = 1024 * 1024;
const BULK: usize = 48 * MIB;

fn tls_sentry_config(agent_key: &PrivateKey) -> config::SentryConfig {
    let text = format!(
        "[sentry]\nprivate_key = \"sentry.key\"\nquic_listen = \"127.0.0.1:0\"\n\
         tls_listen = \"127.0.0.1:0\"\nmetrics_listen = \"127.0.0.1:0\"\n\n\
         [[agent]]\nname = \"v1\"\npublic_key = \"{}\"\n\n\
         [[route]]\nname = \"p2p\"\nlisten = \"127.0.0.1:0\"\nupstream = [\"v1/svc\"]\n\
         max_connections_per_ip = 1000\nconnect_rate_per_ip = \"10000/s\"\n",
        agent_key.public_key()
    );
    config::parse_sentry(Path::new("test-sentry.toml"), &text).unwrap()
}

/// An agent config whose `[[sentry]]` entries are `entries` (address, transport), in order.
fn tls_agent_config(
    entries: &[(SocketAddr, &str)],
    sentry_key: &PrivateKey,
    target: SocketAddr,
) -> config::AgentConfig {
    let mut text = String::from(
        "[agent]\nname = \"v1\"\nprivate_key = \"agent.key\"\nmetrics_listen = \"127.0.0.1:0\"\n",
    );
    for (address, transport) in entries {
        text += &format!(
            "\n[[sentry]]\naddress = \"{address}\"\npublic_key = \"{}\"\ntransport = \"{transport}\"\n",
            sentry_key.public_key()
        );
    }
    text += &format!("\n[[service]]\nname = \"svc\"\ntarget = \"{target}\"\n");
    config::parse_agent(Path::new("test-agent.toml"), &text).unwrap()
}

/// A sentry with route "p2p" to agent "v1" over TLS; returns once the tunnel is up.
async fn deployment(target: SocketAddr) -> (RunningSentry, RunningAgent) {
    let (sentry_key, agent_key) = (key(), key());
    let sentry = start_sentry(&tls_sentry_config(&agent_key), &sentry_key).await;
    let tls_addr = sentry.handle.tls_addr().unwrap();
    let agent = start_agent(
        tls_agent_config(&[(tls_addr, "tls")], &sentry_key, target),
        agent_key,
    );
    sentry.wait_agent("v1", true).await;
    (sentry, agent)
}

fn tunnel_transport(sentry: &RunningSentry) -> Option<f64> {
    let text = sentry.handle.render_metrics();
    metric(
        &text,
        "sentry_tunnel_up",
        &[("agent", "v1"), ("transport", "tls")],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_both_ways_hash_checked_over_tls() {
    let sink = hash_sink().await;
    let (sentry, _agent) = deployment(sink).await;
    assert_eq!(tunnel_transport(&sentry), Some(1.0));
    upload_hash_checked(sentry.route("p2p"), 7, BULK).await;

    // Download, on a second deployment whose service sends.
    let source = service(|mut tcp| async move {
        let digest = write_payload(&mut tcp, 9, BULK).await.unwrap();
        tcp.shutdown().await.unwrap();
        let _ = digest;
    })
    .await;
    let (sentry, _agent) = deployment(source).await;
    let mut tcp = TcpStream::connect(sentry.route("p2p")).await.unwrap();
    let (len, got) = tokio::time::timeout(Duration::from_secs(120), read_hash(&mut tcp))
        .await
        .unwrap()
        .unwrap();
    let mut expected = Vec::new();
    let want = write_payload(&mut expected, 9, BULK).await.unwrap();
    assert_eq!(
        (len, got),
        (BULK, want),
        "the client received different bytes"
    );
}

/// Far more connections at once than the pool holds: the sentry asks the agent for more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_connections_over_tls() {
    let echo = echo_service().await;
    let (sentry, _agent) = deployment(echo).await;
    concurrent_echoes(sentry.route("p2p"), 200).await;
    // The data connections opened for the burst resumed the TLS session.
    let text = sentry.handle.render_metrics();
    let kind =
        |k| metric(&text, "sentry_tunnel_tls_handshakes_total", &[("kind", k)]).unwrap_or(0.0);
    assert!(
        kind("resumed") > kind("full"),
        "resumed {} full {}",
        kind("resumed"),
        kind("full")
    );
    // And a slow one does not hold up another: one connection sits unread while another
    // completes a full echo.
    let mut stalled = TcpStream::connect(sentry.route("p2p")).await.unwrap();
    stalled.write_all(&vec![1u8; 4 * MIB]).await.unwrap();
    concurrent_echoes(sentry.route("p2p"), 1).await;
    drop(stalled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unpinned_agent_is_refused_and_nothing_is_relayed() {
    let echo = echo_service().await;
    let (sentry_key, pinned, stranger) = (key(), key(), key());
    let sentry = start_sentry(&tls_sentry_config(&pinned), &sentry_key).await;
    let tls_addr = sentry.handle.tls_addr().unwrap();
    let _agent = start_agent(
        tls_agent_config(&[(tls_addr, "tls")], &sentry_key, echo),
        stranger,
    );
    let mut failed = 0.0;
    for _ in 0..30 {
        let text = sentry.handle.render_metrics();
        failed = metric(
            &text,
            "sentry_tunnel_handshakes_failed_total",
            &[("transport", "tls")],
        )
        .unwrap_or(0.0);
        assert!(
            sentry.handle.connected().is_empty(),
            "a stranger got a tunnel"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(failed >= 1.0, "no refused handshake counted");
    assert!(closed_without_data(sentry.route("p2p"), PATIENCE).await);

    // And an agent pinning the wrong sentry key never sends the sentry anything after the
    // handshake fails on its side.
    let impostor = key();
    let sentry = start_sentry(&tls_sentry_config(&pinned), &sentry_key).await;
    let tls_addr = sentry.handle.tls_addr().unwrap();
    let _agent = start_agent(
        tls_agent_config(&[(tls_addr, "tls")], &impostor, echo),
        pinned,
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(sentry.handle.connected().is_empty());
}

/// QUIC first, TLS second: with nothing answering QUIC, the agent falls back to TLS and
/// serves; the sentry sees one tunnel, over TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_falls_back_to_tls_when_quic_gets_no_answer() {
    let echo = echo_service().await;
    let (sentry_key, agent_key) = (key(), key());
    let sentry = start_sentry(&tls_sentry_config(&agent_key), &sentry_key).await;
    // A UDP port that swallows everything: QUIC gets no answer at all, as when a firewall
    // drops UDP.
    let sink = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let quic = sink.local_addr().unwrap();
    let tls_addr = sentry.handle.tls_addr().unwrap();
    let config = tls_agent_config(&[(quic, "quic"), (tls_addr, "tls")], &sentry_key, echo);
    let _agent = start_agent(config, agent_key);
    sentry.wait_agent("v1", true).await;
    assert_eq!(tunnel_transport(&sentry), Some(1.0));
    concurrent_echoes(sentry.route("p2p"), 20).await;
}

/// Data connections after the first resume the TLS session: no certificate signature, and the
/// pinned identity is still known on both sides.
#[tokio::test]
async fn data_connections_resume_the_session_and_keep_the_identity() {
    let (sentry_key, agent_key) = (key(), key());
    let server = tls::server_config(
        &sentry_key,
        HashMap::from([(agent_key.public_key(), "v1".to_owned())]),
    )
    .unwrap();
    let client = tls::client_config(&agent_key, sentry_key.public_key()).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(server);
    let accepting = tokio::spawn(async move {
        let mut seen = Vec::new();
        for _ in 0..3 {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut io = acceptor.accept(tcp).await.unwrap();
            let mut role = [0u8; 1];
            io.read_exact(&mut role).await.unwrap();
            let io = tls::TlsIo::from(io);
            seen.push((tls::resumed(&io), tls::peer_key(&io)));
            // A byte back, so the client reads (and stores) the session ticket.
            let mut io = io;
            io.write_all(&[tls::GO]).await.unwrap();
            io.flush().await.unwrap();
        }
        seen
    });
    let mut client_seen = Vec::new();
    for _ in 0..3 {
        let mut io = tls::connect(addr, client.clone(), tls::Role::Data)
            .await
            .unwrap();
        let mut go = [0u8; 1];
        io.read_exact(&mut go).await.unwrap();
        client_seen.push((tls::resumed(&io), tls::peer_key(&io)));
    }
    let server_seen = accepting.await.unwrap();
    let agent = Some(agent_key.public_key());
    let sentry = Some(sentry_key.public_key());
    assert_eq!(
        server_seen,
        [(false, agent), (true, agent), (true, agent)],
        "sentry side"
    );
    assert_eq!(
        client_seen,
        [(false, sentry), (true, sentry), (true, sentry)],
        "agent side"
    );
}

/// A service that resets its connection mid-answer: the client is reset too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_reset_reaches_the_client_as_a_reset_over_tls() {
    let (sentry, _agent) = deployment(resetting_service().await).await;
    a_cut_answer_reaches_the_client_as_a_reset(sentry.route("p2p")).await;
}

/// A sentry with only a TLS tunnel listener (no `quic_listen`: a network that drops UDP) binds
/// no UDP socket and relays over TLS; a sentry with no tunnel listener at all is a config
/// error at its key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_only_sentry_needs_no_quic_listen() {
    let (sentry_key, agent_key) = (key(), key());
    let text = format!(
        "[sentry]\nprivate_key = \"s.key\"\ntls_listen = \"127.0.0.1:0\"\n\n\
         [[agent]]\nname = \"v1\"\npublic_key = \"{}\"\n\n\
         [[route]]\nname = \"p2p\"\nlisten = \"127.0.0.1:0\"\nupstream = [\"v1/svc\"]\n",
        agent_key.public_key()
    );
    let config = config::parse_sentry(Path::new("tls-only.toml"), &text).unwrap();
    assert_eq!(config.quic_listen, None);
    let sentry = start_sentry(&config, &sentry_key).await;
    assert_eq!(sentry.handle.quic_addr(), None);
    let tls_addr = sentry.handle.tls_addr().unwrap();
    let _agent = start_agent(
        tls_agent_config(&[(tls_addr, "tls")], &sentry_key, echo_service().await),
        agent_key,
    );
    sentry.wait_agent("v1", true).await;
    concurrent_echoes(sentry.route("p2p"), 4).await;

    let none = text.replace("tls_listen = \"127.0.0.1:0\"\n", "");
    let error = config::parse_sentry(Path::new("none.toml"), &none)
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("sentry.quic_listen: no tunnel listener"),
        "{error}"
    );
}

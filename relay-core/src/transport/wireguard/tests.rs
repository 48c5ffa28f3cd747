//! The overlay end to end on loopback: two devices, real UDP, real WireGuard.

#![allow(clippy::unwrap_used)]

use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use super::*;
use crate::keys::PrivateKey;

const SENTRY_IP: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 1);
const AGENT_IP: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 2);

struct Pair {
    sentry: Device,
    agent: Device,
    stop: CancellationToken,
}

fn quiet() -> PeerEvents {
    Arc::new(|_, _| {})
}

async fn pair() -> Pair {
    let stop = CancellationToken::new();
    let sentry_key = PrivateKey::generate().unwrap();
    let agent_key = PrivateKey::generate().unwrap();
    let sentry = Device::bind(
        "127.0.0.1:0".parse().unwrap(),
        sentry_key.wireguard_secret(),
        SENTRY_IP,
        &[PeerSpec {
            name: "agent".into(),
            public: agent_key.public_key().wireguard().unwrap(),
            address: AGENT_IP,
            endpoint: None,
            keepalive: None,
            liveness: AGENT_LIVENESS,
            accept: false,
        }],
        quiet(),
        stop.clone(),
    )
    .await
    .unwrap();
    let agent = Device::bind(
        "127.0.0.1:0".parse().unwrap(),
        agent_key.wireguard_secret(),
        AGENT_IP,
        &[PeerSpec {
            name: "sentry".into(),
            public: sentry_key.public_key().wireguard().unwrap(),
            address: SENTRY_IP,
            endpoint: sentry.local_addr(),
            keepalive: Some(AGENT_KEEPALIVE),
            liveness: AGENT_LIVENESS,
            accept: true,
        }],
        quiet(),
        stop.clone(),
    )
    .await
    .unwrap();
    Pair {
        sentry,
        agent,
        stop,
    }
}

async fn wait_up(peer: &Peer) {
    tokio::time::timeout(Duration::from_secs(10), async {
        while !peer.is_up() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn a_stream_crosses_the_overlay_both_ways() {
    let pair = pair().await;
    let to_sentry = pair.agent.peer("sentry").unwrap();
    let mut accepted = to_sentry.take_accepted().unwrap();
    // The agent's keepalive makes the handshake; the sentry learns its endpoint.
    let to_agent = pair.sentry.peer("agent").unwrap();
    wait_up(&to_agent).await;

    let server = tokio::spawn(async move {
        let mut stream = accepted.recv().await.unwrap();
        let mut data = Vec::new();
        stream.read_to_end(&mut data).await.unwrap();
        stream.write_all(&data).await.unwrap();
        stream.shutdown().await.unwrap();
        data.len()
    });
    let mut stream = to_agent
        .connect(SocketAddrV4::new(AGENT_IP, RELAY_PORT))
        .await
        .unwrap();
    let payload: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let (mut read, mut write) = tokio::io::split(&mut stream);
    let sent = payload.clone();
    let writer = async move {
        write.write_all(&sent).await.unwrap();
        write.shutdown().await.unwrap();
    };
    let reader = async move {
        let mut back = Vec::new();
        read.read_to_end(&mut back).await.unwrap();
        back
    };
    let ((), back) = tokio::join!(writer, reader);
    assert_eq!(server.await.unwrap(), payload.len());
    assert!(back == payload, "the echo differs");
    pair.stop.cancel();
}

#[tokio::test]
async fn a_wrong_key_gets_no_answer() {
    let pair = pair().await;
    let stranger_key = PrivateKey::generate().unwrap();
    let sentry_pub = {
        // The device's own key, as a stranger would know it.
        pair.sentry.public_key()
    };
    let stop = CancellationToken::new();
    let stranger = Device::bind(
        "127.0.0.1:0".parse().unwrap(),
        stranger_key.wireguard_secret(),
        AGENT_IP,
        &[PeerSpec {
            name: "sentry".into(),
            public: sentry_pub,
            address: SENTRY_IP,
            endpoint: pair.sentry.local_addr(),
            keepalive: Some(1),
            liveness: AGENT_LIVENESS,
            accept: true,
        }],
        quiet(),
        stop.clone(),
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let peer = stranger.peer("sentry").unwrap();
    assert!(!peer.is_up(), "a stranger got an answer");
    assert!(pair.sentry.dropped() > 0, "no handshake attempt arrived");
    stop.cancel();
    pair.stop.cancel();
}

//! The overlay end to end on loopback: two devices, real UDP, real WireGuard.

#![allow(clippy::unwrap_used)]

use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use super::*;
use crate::keys::PrivateKey;
use crate::lock;

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
    pair_with(Window::Fixed(STREAM_BUFFER)).await
}

/// Two devices whose peers size each stream's buffers by `window`.
async fn pair_with(window: Window) -> Pair {
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
            window,
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
            window,
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

/// The right edges of the receive windows a stack advertises, per connection: the
/// acknowledgment number plus the window, scaled by [`WINDOW_UNIT`] (both stacks here are
/// ours, with the same buffers, so both use that scale).
#[derive(Default)]
pub(super) struct Edges {
    last: HashMap<(u16, u16), u32>,
    /// Segments whose advertised edge lay left of the one before on the same connection.
    pub(super) regressions: u64,
}

impl Edges {
    pub(super) fn observe(&mut self, packet: &[u8]) {
        if packet.len() < 40 || packet[0] >> 4 != 4 || packet[9] != 6 {
            return;
        }
        let tcp = &packet[usize::from(packet[0] & 0x0f) * 4..];
        let flags = tcp[13];
        // ACK set, and neither SYN (its window is never scaled) nor RST.
        if flags & 0x10 == 0 || flags & 0x06 != 0 {
            return;
        }
        let ports = (
            u16::from_be_bytes([tcp[0], tcp[1]]),
            u16::from_be_bytes([tcp[2], tcp[3]]),
        );
        let ack = u32::from_be_bytes([tcp[8], tcp[9], tcp[10], tcp[11]]);
        let window = u32::from(u16::from_be_bytes([tcp[14], tcp[15]]));
        let edge = ack.wrapping_add(window * WINDOW_UNIT as u32);
        if let Some(last) = self.last.insert(ports, edge)
            && (edge.wrapping_sub(last) as i32) < 0
        {
            self.regressions += 1;
        }
    }
}

fn edge_regressions(device: &Device) -> u64 {
    device
        .peers()
        .iter()
        .map(|peer| lock(&peer.state).link.wire.edges.regressions)
        .sum()
}

#[test]
fn the_window_unit_is_the_scale_smoltcp_chooses() {
    // 512 KiB needs 20 bits; smoltcp shifts the window by the bits past 16.
    assert_eq!(STREAM_BUFFER, 1 << 19);
    assert_eq!(WINDOW_UNIT, 16);
}

/// What one stream holds in flight before its writer must wait, with a reader that reads
/// nothing: the receiver's window and the sender's buffer.
async fn held_before_backpressure(window: Window, rtt: Option<Duration>) -> usize {
    let pair = pair_with(window).await;
    let to_sentry = pair.agent.peer("sentry").unwrap();
    let mut accepted = to_sentry.take_accepted().unwrap();
    let to_agent = pair.sentry.peer("agent").unwrap();
    wait_up(&to_agent).await;
    // What the ends would have measured across a long path (loopback measures microseconds).
    if let Some(rtt) = rtt {
        lock(&to_agent.state).observe_rtt(rtt, clock::now());
        lock(&to_sentry.state).observe_rtt(rtt, clock::now());
    }
    let mut stream = to_agent
        .connect(SocketAddrV4::new(AGENT_IP, RELAY_PORT))
        .await
        .unwrap();
    let _idle_reader = accepted.recv().await.unwrap();
    let chunk = vec![7u8; 64 * 1024];
    let mut written = 0;
    // Bounded: at most 64 MiB, and over once a write waits 1.5 s (a loaded machine may
    // pause a flowing stream for less).
    while written < 64 << 20 {
        match tokio::time::timeout(Duration::from_millis(1500), stream.write(&chunk)).await {
            Ok(Ok(n)) => written += n,
            Ok(Err(e)) => panic!("write failed: {e}"),
            Err(_) => break,
        }
    }
    pair.stop.cancel();
    written
}

/// The window a peer is given (`wireguard_window`) is what one stream holds in flight: the
/// receiver's buffer and the sender's, each that size. The default holds 1 MiB; 4 MiB
/// windows hold four times as much (what a stream needs across a long round trip).
#[tokio::test]
async fn a_peers_window_sets_what_one_stream_holds_in_flight() {
    let default = held_before_backpressure(Window::Fixed(STREAM_BUFFER), None).await;
    let large = held_before_backpressure(Window::Fixed(4 << 20), None).await;
    let near = |held: usize, window: usize| {
        held >= 2 * window - 2 * stash_max(window)
            && held <= 2 * window + 2 * stash_max(window) + (64 << 10)
    };
    assert!(
        near(default, STREAM_BUFFER),
        "default window held {default}"
    );
    assert!(near(large, 4 << 20), "4 MiB window held {large}");
}

/// An automatic window is what the round trip needs for about 1 Gbit/s, within the peer's
/// budget: the default on loopback (and before anything is measured), 8 MiB across 40 ms.
#[test]
fn an_automatic_window_is_sized_for_the_round_trip_within_the_budget() {
    let ms = Duration::from_millis;
    assert_eq!(auto_window(None, 0), STREAM_BUFFER);
    assert_eq!(
        auto_window(Some(Duration::from_micros(80)), 0),
        STREAM_BUFFER
    );
    assert_eq!(auto_window(Some(ms(2)), 0), STREAM_BUFFER);
    assert_eq!(auto_window(Some(ms(5)), 0), 1 << 20);
    assert_eq!(auto_window(Some(ms(10)), 0), 2 << 20);
    assert_eq!(auto_window(Some(ms(40)), 0), 8 << 20);
    assert_eq!(auto_window(Some(ms(43)), 0), 9 << 20);
    assert_eq!(auto_window(Some(ms(300)), 0), MAX_WINDOW);
    assert_eq!(auto_window(Some(Duration::MAX), 0), MAX_WINDOW);
    // Streams already holding most of the budget: the largest window that still fits, and
    // never less than the default.
    let budget = AUTO_BUDGET;
    assert_eq!(auto_window(Some(ms(40)), budget - (8 << 20)), 4 << 20);
    assert_eq!(auto_window(Some(ms(40)), budget), STREAM_BUFFER);
    assert_eq!(auto_window(Some(ms(40)), usize::MAX / 2), STREAM_BUFFER);
}

/// Windows are sized from the least round trip measured lately, not from one that counted
/// the queues of a loaded moment; a floor older than five minutes gives way to the next sample.
#[tokio::test]
async fn windows_are_sized_from_the_least_recent_round_trip() {
    let pair = pair_with(Window::Auto).await;
    let peer = pair.sentry.peer("agent").unwrap();
    let mut state = lock(&peer.state);
    let ms = Duration::from_millis;
    let start = clock::now();
    state.observe_rtt(ms(40), start);
    state.observe_rtt(ms(30), start + ms(10));
    state.observe_rtt(ms(90), start + ms(20));
    assert_eq!(state.link_rtt(), Some(ms(30)));
    assert_eq!(state.stream_window(), 6 << 20);
    state.observe_rtt(ms(50), start + RTT_FLOOR_AGE + ms(11));
    assert_eq!(state.link_rtt(), Some(ms(50)));
    assert_eq!(state.stream_window(), 10 << 20);
    drop(state);
    pair.stop.cancel();
}

/// With automatic windows, what one stream holds in flight follows the round trip the ends
/// measured: the default's at 0.2 ms, eight times more at 20 ms (4 MiB each way).
#[tokio::test]
async fn an_automatic_window_follows_the_measured_round_trip() {
    let near = |held: usize, window: usize| {
        held >= 2 * window - 2 * stash_max(window)
            && held <= 2 * window + 2 * stash_max(window) + (64 << 10)
    };
    // (Set, not measured: a debug build's handshake takes milliseconds even on loopback.)
    let short = held_before_backpressure(Window::Auto, Some(Duration::from_micros(200))).await;
    assert!(near(short, STREAM_BUFFER), "0.2 ms held {short}");
    let long = held_before_backpressure(Window::Auto, Some(Duration::from_millis(20))).await;
    assert!(near(long, 4 << 20), "20 ms held {long}");
}

/// With automatic windows a sentry, which only answers its agent's handshakes, starts one of
/// its own when the agent comes up: it knows the round trip before its first stream needs a
/// window. With a fixed window it has no reason to.
#[tokio::test]
async fn a_responder_measures_the_round_trip_itself_when_windows_are_automatic() {
    for (window, measures) in [(Window::Auto, true), (Window::Fixed(STREAM_BUFFER), false)] {
        let pair = pair_with(window).await;
        let to_agent = pair.sentry.peer("agent").unwrap();
        wait_up(&to_agent).await;
        let mut measured = to_agent.session().1.is_some();
        for _ in 0..100 {
            if measured {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
            measured = to_agent.session().1.is_some();
        }
        assert_eq!(measured, measures, "{window:?}");
        pair.stop.cancel();
    }
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
    // The sentry answers the agent's handshakes, so noise gives it no round trip; the stream
    // it opened measured one.
    assert!(
        to_agent.session().1.is_some(),
        "the connecting end has no round trip"
    );
    pair.stop.cancel();
}

/// A receiver that lags (its window fills up, again and again) never moves the right edge of
/// its advertised window to the left. A sender that filled the window to an old edge would
/// have its last bytes refused, and at the end of a transfer only its retransmission timeout
/// (at least 1 s) sends them again (see `align_windows`).
#[tokio::test]
async fn a_lagging_receiver_never_moves_its_window_edge_left() {
    let pair = pair().await;
    let mut accepted = pair.agent.peer("sentry").unwrap().take_accepted().unwrap();
    let to_agent = pair.sentry.peer("agent").unwrap();
    wait_up(&to_agent).await;
    let payload: Vec<u8> = (0..4_000_000u32).map(|i| (i * 13 % 251) as u8).collect();
    let receiver = tokio::spawn(async move {
        let mut stream = accepted.recv().await.unwrap();
        let mut got = Vec::new();
        // Odd-sized reads with pauses: the window fills up and reopens many times.
        let mut chunk = vec![0u8; 1000];
        loop {
            let n = stream.read(&mut chunk).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&chunk[..n]);
            if got.len() % 100 < 10 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        got
    });
    let mut stream = to_agent
        .connect(SocketAddrV4::new(AGENT_IP, RELAY_PORT))
        .await
        .unwrap();
    stream.write_all(&payload).await.unwrap();
    stream.shutdown().await.unwrap();
    let got = receiver.await.unwrap();
    assert!(got == payload, "the stream's bytes differ");
    assert_eq!(
        edge_regressions(&pair.agent),
        0,
        "the receiver moved its window's right edge left"
    );
    pair.stop.cancel();
}

/// A stream whose peer closed first (CLOSE-WAIT) sends its FIN only once its bytes are
/// acknowledged: smoltcp in LAST-ACK takes no window update from an acknowledgment that
/// covers no new bytes, so a stream that closed while its peer's window was shut (or with
/// bytes to resend) waited for its linger deadline and was reset, cutting the far end's
/// stream short (see `PeerState::close`).
#[tokio::test]
async fn a_stream_whose_peer_closed_first_holds_its_fin_until_its_bytes_are_acknowledged() {
    const LEN: usize = 800 * 1024;
    let pair = pair().await;
    let to_sentry = pair.agent.peer("sentry").unwrap();
    let mut accepted = to_sentry.take_accepted().unwrap();
    let to_agent = pair.sentry.peer("agent").unwrap();
    wait_up(&to_agent).await;
    let mut stream = to_agent
        .connect(SocketAddrV4::new(AGENT_IP, RELAY_PORT))
        .await
        .unwrap();
    stream.shutdown().await.unwrap();
    let mut server = accepted.recv().await.unwrap();
    let mut nothing = Vec::new();
    server.read_to_end(&mut nothing).await.unwrap();
    let payload: Vec<u8> = (0..LEN).map(|i| (i * 31 % 251) as u8).collect();
    // More than the reader's window: the rest waits in the sender's buffer.
    server.write_all(&payload).await.unwrap();
    server.shutdown().await.unwrap();
    drop(server);
    {
        let state = lock(&to_sentry.state);
        let held: Vec<_> = state
            .sockets
            .iter()
            .filter_map(|(_, socket)| match socket {
                smoltcp::socket::Socket::Tcp(socket) if socket.send_queue() > 0 => {
                    Some(socket.state())
                }
                smoltcp::socket::Socket::Tcp(_) => None,
            })
            .collect();
        assert_eq!(
            held,
            [tcp::State::CloseWait],
            "the closed stream's FIN went ahead of its bytes"
        );
    }
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut got))
        .await
        .expect("the stream stalled")
        .unwrap();
    assert!(got == payload, "the stream's bytes differ");
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
            window: Window::Fixed(STREAM_BUFFER),
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

/// Closed streams' sockets are kept as spares and serve the next streams: each new stream on a
/// reused socket carries its own bytes only, from a clean start.
#[tokio::test]
async fn streams_on_reused_sockets_start_clean() {
    let pair = pair().await;
    let mut accepted = pair.agent.peer("sentry").unwrap().take_accepted().unwrap();
    let to_agent = pair.sentry.peer("agent").unwrap();
    wait_up(&to_agent).await;
    let server = tokio::spawn(async move {
        while let Some(mut stream) = accepted.recv().await {
            let mut data = Vec::new();
            stream.read_to_end(&mut data).await.unwrap();
            stream.write_all(&data).await.unwrap();
            stream.shutdown().await.unwrap();
        }
    });
    let spares = |peer: &Peer| lock(&peer.state).spare.len();
    let mut reused = 0;
    for round in 0..40u32 {
        let before = spares(&to_agent);
        let mut stream = to_agent
            .connect(SocketAddrV4::new(AGENT_IP, RELAY_PORT))
            .await
            .unwrap();
        if spares(&to_agent) < before {
            reused += 1;
        }
        // Sizes that leave the ring buffers at different offsets each round.
        let payload: Vec<u8> = (0..(round * 7919 % 200_000 + 1))
            .map(|i| (i ^ round) as u8)
            .collect();
        stream.write_all(&payload).await.unwrap();
        stream.shutdown().await.unwrap();
        let mut back = Vec::new();
        stream.read_to_end(&mut back).await.unwrap();
        assert!(back == payload, "round {round}: the echo differs");
        drop(stream);
        // The close completes (FIN both ways) before the next round.
        tokio::time::timeout(Duration::from_secs(5), async {
            while to_agent.streams() > 0 {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
        .await
        .unwrap();
    }
    assert!(reused >= 30, "only {reused} of 40 streams reused a socket");
    assert!(spares(&to_agent) <= SPARE_SOCKETS);
    pair.stop.cancel();
    server.abort();
}

/// A plain WireGuard peer (boringtun driven by hand here, as wireguard-go or the kernel would
/// be) initiates: the sentry's end answers, but counts the peer up only once the peer's first
/// data arrives (its keepalive confirming the session). Up on the initiation alone, the first
/// stream's SYN was held back by boringtun, which started a handshake of its own instead (seen
/// in CI: the first relayed connection to a wireguard-go peer went unanswered for 2 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_peer_is_up_once_its_session_is_confirmed_and_the_first_packet_is_data() {
    use boringtun::noise::{Tunn, TunnResult};
    let stop = CancellationToken::new();
    let sentry_key = PrivateKey::generate().unwrap();
    let plain_secret = StaticSecret::from(PrivateKey::generate().unwrap().wireguard_secret());
    let plain_public = WgPublic::from(&plain_secret);
    let sentry = Device::bind(
        "127.0.0.1:0".parse().unwrap(),
        sentry_key.wireguard_secret(),
        SENTRY_IP,
        &[PeerSpec {
            name: "plain".into(),
            public: plain_public.to_bytes(),
            address: AGENT_IP,
            endpoint: None,
            keepalive: None,
            liveness: PLAIN_LIVENESS,
            accept: false,
            window: Window::Fixed(STREAM_BUFFER),
        }],
        quiet(),
        stop.clone(),
    )
    .await
    .unwrap();
    let sentry_public = WgPublic::from(sentry.public_key());
    let mut tunn = Tunn::new(plain_secret, sentry_public, None, None, 7, None);
    let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let to = sentry.local_addr().unwrap();
    let mut out = vec![0u8; 2048];
    let mut buf = vec![0u8; 2048];
    let TunnResult::WriteToNetwork(init) = tunn.format_handshake_initiation(&mut out, false) else {
        panic!("no handshake initiation");
    };
    udp.send_to(init, to).await.unwrap();
    let wait = Duration::from_secs(5);
    let n = tokio::time::timeout(wait, udp.recv(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(buf[0], 2, "the sentry answers with a handshake response");
    let peer = sentry.peer("plain").unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !peer.is_up(),
        "up before the session is confirmed (only the initiation arrived)"
    );
    // The response completes our handshake; boringtun answers it with a keepalive.
    let TunnResult::WriteToNetwork(keepalive) = tunn.decapsulate(None, &buf[..n], &mut out) else {
        panic!("the response did not complete the handshake");
    };
    assert_eq!(keepalive[0], 4, "a keepalive (data) confirms the session");
    udp.send_to(keepalive, to).await.unwrap();
    wait_up(&peer).await;
    // The first stream's SYN leaves at once, as data in the confirmed session.
    let connecting = tokio::spawn({
        let peer = peer.clone();
        async move {
            let _ = tokio::time::timeout(
                Duration::from_secs(3),
                peer.connect(SocketAddrV4::new(AGENT_IP, 7100)),
            )
            .await;
        }
    });
    let n = tokio::time::timeout(wait, udp.recv(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        buf[0], 4,
        "the first packet after up is data, not a handshake of the sentry's own"
    );
    match tunn.decapsulate(None, &buf[..n], &mut out) {
        TunnResult::WriteToTunnelV4(packet, source) => {
            assert_eq!(source, SENTRY_IP);
            assert_eq!(packet[9], 6, "a TCP segment (the SYN)");
        }
        _ => panic!("the sentry's first data packet did not decrypt to its SYN"),
    }
    connecting.abort();
    stop.cancel();
}

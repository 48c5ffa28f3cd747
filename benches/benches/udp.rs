//! UDP echo round trips on loopback through a UDP route, in the same run: direct to the echo,
//! a plain userspace UDP relay (the baseline), and sentry + agent over QUIC, WireGuard and
//! TCP+TLS. Two figures per path: round trips on one established flow, and the first round
//! trip of a new client address (which opens a flow: admission, a tunnel stream, the agent's
//! socket). Blocks of each path are interleaved; medians and p99 are printed.
//!
//! Reproduce: `cargo bench -p benches --bench udp`
//! (`BENCH_ROUND_TRIPS` per path and repetition, default 2000; `BENCH_REPS`, default 5;
//! `BENCH_ONLY=WireGuard` keeps only the tunnel paths whose name contains it; new
//! flows per path and repetition: a tenth of the round trips).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use benches::{Export, deployment, read_env, runtime};
use tokio::net::UdpSocket;

const DATAGRAM: usize = 64;

fn main() {
    let round_trips = read_env("BENCH_ROUND_TRIPS", 2000);
    let reps = read_env("BENCH_REPS", 5);
    let new_flows = (round_trips / 10).max(1);
    runtime().block_on(async move {
        let echo = echo().await;
        let mut paths: Vec<(&str, SocketAddr)> = vec![
            ("direct", echo),
            ("plain UDP relay", plain_relay(echo).await),
        ];
        // `BENCH_ONLY=WireGuard` measures only the tunnel paths whose name contains it.
        let only = std::env::var("BENCH_ONLY").ok();
        for (name, transport) in [
            ("sentry+agent (QUIC)", "quic"),
            ("sentry+agent (WireGuard)", "wireguard"),
            ("sentry+agent (TLS)", "tls"),
        ] {
            if only.as_deref().is_some_and(|o| !name.contains(o)) {
                continue;
            }
            let handle = deployment(
                transport,
                &[Export {
                    name: "echo",
                    target: echo,
                    udp: true,
                    route_extra: "",
                }],
            )
            .await;
            paths.push((name, handle.route_addr("echo").expect("route")));
        }
        let mut steady = vec![Vec::new(); paths.len()];
        let mut first = vec![Vec::new(); paths.len()];
        let mut lost = vec![0usize; paths.len()];
        for rep in 0..reps {
            for (i, (name, addr)) in paths.iter().enumerate() {
                let socket = client().await;
                // The flow's first datagram is not part of the steady figure.
                let _ = round_trip(&socket, *addr).await;
                for _ in 0..round_trips {
                    match round_trip(&socket, *addr).await {
                        Some(t) => steady[i].push(t),
                        None => lost[i] += 1,
                    }
                }
                for _ in 0..new_flows {
                    match round_trip(&client().await, *addr).await {
                        Some(t) => first[i].push(t),
                        None => lost[i] += 1,
                    }
                }
                eprintln!("rep {}/{reps} {name}: done", rep + 1);
            }
        }
        println!(
            "\nUDP echo round trips ({DATAGRAM} B), loopback, {round_trips} on one flow and \
             {new_flows} new flows per path and rep, {reps} interleaved reps"
        );
        println!(
            "{:<26} {:>10} {:>10} {:>14} {:>16} {:>6}",
            "path", "p50 µs", "p99 µs", "p50 vs relay", "new flow p50 µs", "lost"
        );
        let relay_p50 = percentile(&mut steady[1], 0.5);
        for (i, (name, _)) in paths.iter().enumerate() {
            let p50 = percentile(&mut steady[i], 0.5);
            let p99 = percentile(&mut steady[i], 0.99);
            let new = percentile(&mut first[i], 0.5);
            println!(
                "{name:<26} {p50:>10.1} {p99:>10.1} {:>13.2}x {new:>16.1} {:>6}",
                p50 / relay_p50,
                lost[i]
            );
        }
    });
}

/// Microseconds of one 64-byte echo from `socket` through `to`; `None` when no answer came
/// within a second (a lost datagram).
async fn round_trip(socket: &UdpSocket, to: SocketAddr) -> Option<f64> {
    let payload = [7u8; DATAGRAM];
    let mut buf = [0u8; 2 * DATAGRAM];
    let start = relay_core::clock::now();
    socket.send_to(&payload, to).await.ok()?;
    match tokio::time::timeout(Duration::from_secs(1), socket.recv_from(&mut buf)).await {
        Ok(Ok((n, _))) if n == DATAGRAM => {
            Some(relay_core::clock::now().duration_since(start).as_secs_f64() * 1e6)
        }
        _ => None,
    }
}

async fn client() -> UdpSocket {
    UdpSocket::bind("127.0.0.1:0").await.expect("client socket")
}

fn percentile(samples: &mut [f64], q: f64) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    samples.sort_by(f64::total_cmp);
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let index = ((samples.len() - 1) as f64 * q).round() as usize;
    samples[index]
}

/// A UDP echo on loopback.
async fn echo() -> SocketAddr {
    let socket = UdpSocket::bind("127.0.0.1:0").await.expect("echo socket");
    let addr = socket.local_addr().expect("echo address");
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65_536];
        while let Ok((n, from)) = socket.recv_from(&mut buf).await {
            let _ = socket.send_to(&buf[..n], from).await;
        }
    });
    addr
}

/// The baseline: a userspace UDP relay that forwards each datagram to `target` from a socket
/// of its own and sends the replies back to the client that sent last (one client at a time,
/// as the benchmark uses it).
async fn plain_relay(target: SocketAddr) -> SocketAddr {
    let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("relay socket"));
    let back = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("relay socket"));
    back.connect(target).await.expect("relay connect");
    let addr = front.local_addr().expect("relay address");
    let client = Arc::new(Mutex::new(None::<SocketAddr>));
    let (f, b, c) = (front.clone(), back.clone(), client.clone());
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65_536];
        while let Ok((n, from)) = f.recv_from(&mut buf).await {
            *c.lock().expect("lock") = Some(from);
            let _ = b.send(&buf[..n]).await;
        }
    });
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65_536];
        while let Ok(n) = back.recv(&mut buf).await {
            let to = *client.lock().expect("lock");
            if let Some(to) = to {
                let _ = front.send_to(&buf[..n], to).await;
            }
        }
    });
    addr
}

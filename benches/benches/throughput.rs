//! Single-stream throughput on loopback, each way, through five paths in the same run:
//! direct (no relay), a plain userspace TCP relay (the baseline), and sentry + agent over the
//! QUIC, the WireGuard and the TCP+TLS tunnels. Repetitions are interleaved; medians with
//! min–max and ratios are printed.
//!
//! Reproduce: `cargo bench -p benches --bench throughput`
//! (`BENCH_BYTES` per transfer, default 1 GiB; `BENCH_REPS`, default 5).

use std::net::SocketAddr;

use benches::{
    Export, deployment, interleaved, plain_relay, runtime, settings, sink, source, summary,
};

fn main() {
    let (bytes, reps) = settings();
    runtime().block_on(async move {
        let (sink, source) = (sink().await, source(bytes).await);
        let tunnel_quic = tunnel(sink, source, "quic").await;
        let wireguard = tunnel(sink, source, "wireguard").await;
        let tls = tunnel(sink, source, "tls").await;
        let paths: [(&str, SocketAddr, SocketAddr); 5] = [
            ("direct", sink, source),
            (
                "plain TCP relay",
                plain_relay(sink).await,
                plain_relay(source).await,
            ),
            ("sentry+agent (QUIC)", tunnel_quic.0, tunnel_quic.1),
            ("sentry+agent (WireGuard)", wireguard.0, wireguard.1),
            ("sentry+agent (TLS)", tls.0, tls.1),
        ];
        let (up, down) = interleaved("", &paths, reps, bytes).await;
        println!(
            "\nsingle-stream throughput, loopback, {} MiB per transfer, {reps} interleaved reps",
            bytes >> 20
        );
        println!(
            "{:<26} {:>9} {:>15} {:>9} {:>15} {:>12}",
            "path", "up Gbit/s", "(min-max)", "down", "(min-max)", "vs relay"
        );
        let relay = (summary(&up[1]).0, summary(&down[1]).0);
        for (i, (name, ..)) in paths.iter().enumerate() {
            let (u, umin, umax) = summary(&up[i]);
            let (d, dmin, dmax) = summary(&down[i]);
            println!(
                "{name:<26} {u:>9.2} {:>15} {d:>9.2} {:>15} {:>5.2}x/{:.2}x",
                format!("({umin:.2}-{umax:.2})"),
                format!("({dmin:.2}-{dmax:.2})"),
                u / relay.0,
                d / relay.1
            );
        }
    });
}

/// The route addresses ("up", "down") of a deployment over `transport`.
async fn tunnel(sink: SocketAddr, source: SocketAddr, transport: &str) -> (SocketAddr, SocketAddr) {
    let handle = deployment(
        transport,
        &[
            Export {
                name: "up",
                target: sink,
                udp: false,
                route_extra: "",
            },
            Export {
                name: "down",
                target: source,
                udp: false,
                route_extra: "",
            },
        ],
    )
    .await;
    (
        handle.route_addr("up").expect("route"),
        handle.route_addr("down").expect("route"),
    )
}

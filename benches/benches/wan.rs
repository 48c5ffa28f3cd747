//! One bulk stream, up and down, through sentry + agent over QUIC and over WireGuard, with
//! the tunnel crossing a link of a given round trip: the userspace delay line of
//! `benches::delay` (this kernel has no netem). A WAN between a cloud sentry and a validator
//! is what this measures: a stream can carry at most one receive window per round trip.
//! TLS is left out: it runs on TCP, which the line does not carry.
//!
//! Reproduce: `cargo bench -p benches --bench wan`
//! (`BENCH_RTTS` in ms, default `0,10,40`; `BENCH_BYTES` per transfer, default 64 MiB;
//! `BENCH_REPS`, default 3, interleaved; `BENCH_WG_WINDOWS`, the larger `wireguard_window`s
//! measured beside the default (`auto`), default `512KiB`; `BENCH_ONLY` measures only the paths whose name
//! contains it).

use std::net::SocketAddr;
use std::time::Duration;

use benches::{Export, deployment_over, interleaved, read_env, runtime, sink, source, summary};

fn main() {
    let bytes = read_env("BENCH_BYTES", 64 << 20);
    let reps = read_env("BENCH_REPS", 3);
    let rtts: Vec<u64> = std::env::var("BENCH_RTTS")
        .unwrap_or_else(|_| "0,10,40".into())
        .split(',')
        .filter_map(|v| v.trim().parse().ok())
        .collect();
    let windows: Vec<String> = std::env::var("BENCH_WG_WINDOWS")
        .unwrap_or_else(|_| "512KiB".into())
        .split(',')
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
        .collect();
    let only = std::env::var("BENCH_ONLY").ok();
    runtime().block_on(async move {
        let (sink, source) = (sink().await, source(bytes).await);
        let mut rows = Vec::new();
        for &rtt in &rtts {
            let one_way = Duration::from_millis(rtt) / 2;
            let mut paths = Vec::new();
            let mut variants = vec![
                ("quic".to_owned(), "quic", None),
                ("wireguard".to_owned(), "wireguard", None),
            ];
            for window in &windows {
                variants.push((format!("wg {window}"), "wireguard", Some(window.as_str())));
            }
            for (name, transport, window) in variants {
                if only.as_deref().is_some_and(|o| !name.contains(o)) {
                    continue;
                }
                let (up, down) = tunnel(sink, source, transport, one_way, window).await;
                paths.push((name, up, down));
            }
            let (up, down) = interleaved(&format!("rtt {rtt} ms "), &paths, reps, bytes).await;
            for (i, (name, ..)) in paths.iter().enumerate() {
                rows.push((rtt, name.clone(), summary(&up[i]), summary(&down[i])));
            }
        }
        println!(
            "\nOne stream through a delay line of the given round trip, {} MiB per transfer, \
             {reps} interleaved reps, Gbit/s median (min-max)",
            bytes >> 20
        );
        println!(
            "{:>7} {:<10} {:>24} {:>24} {:>22}",
            "rtt ms", "transport", "up", "down", "512 KiB per rtt"
        );
        for (rtt, name, (u, umin, umax), (d, dmin, dmax)) in rows {
            let ceiling = if rtt == 0 {
                "-".to_owned()
            } else {
                format!("{:.3}", 512.0 * 1024.0 * 8.0 / (rtt as f64 / 1000.0) / 1e9)
            };
            println!(
                "{rtt:>7} {name:<10} {:>24} {:>24} {ceiling:>22}",
                format!("{u:.3} ({umin:.3}-{umax:.3})"),
                format!("{d:.3} ({dmin:.3}-{dmax:.3})"),
            );
        }
    });
}

/// The route addresses ("up", "down") of a deployment over `transport` whose tunnel crosses
/// a delay line of `one_way` each way.
async fn tunnel(
    sink: SocketAddr,
    source: SocketAddr,
    transport: &str,
    one_way: Duration,
    wireguard_window: Option<&str>,
) -> (SocketAddr, SocketAddr) {
    let export = |name, target| Export {
        name,
        target,
        udp: false,
        route_extra: "",
    };
    let handle = deployment_over(
        transport,
        &[export("up", sink), export("down", source)],
        Some(one_way),
        wireguard_window,
    )
    .await;
    (
        handle.route_addr("up").expect("route"),
        handle.route_addr("down").expect("route"),
    )
}

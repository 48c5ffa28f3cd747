//! Single-stream throughput on loopback, each way, through four paths in the same run:
//! direct (no relay), a plain userspace TCP relay (the baseline), and sentry + agent over the
//! QUIC tunnel and over the WireGuard tunnel. Repetitions are interleaved; medians with
//! min–max and ratios are printed.
//!
//! Reproduce: `cargo bench -p benches --bench throughput`
//! (`BENCH_BYTES` per transfer, default 1 GiB; `BENCH_REPS`, default 5).

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use benches::{download, gbits, plain_relay, runtime, settings, sink, source, summary, upload};
use relay_core::config;
use relay_core::keys::PrivateKey;
use relay_core::sentry::Sentry;

fn main() {
    let (bytes, reps) = settings();
    runtime().block_on(async move {
        let (sink, source) = (sink().await, source(bytes).await);
        let tunnel = tunnel(sink, source, false).await;
        let wireguard = tunnel_wg(sink, source).await;
        let paths: [(&str, SocketAddr, SocketAddr); 4] = [
            ("direct", sink, source),
            (
                "plain TCP relay",
                plain_relay(sink).await,
                plain_relay(source).await,
            ),
            ("sentry+agent (QUIC)", tunnel.0, tunnel.1),
            ("sentry+agent (WireGuard)", wireguard.0, wireguard.1),
        ];
        let mut up = vec![Vec::new(); paths.len()];
        let mut down = vec![Vec::new(); paths.len()];
        for rep in 0..reps {
            for (i, (name, up_addr, down_addr)) in paths.iter().enumerate() {
                let time = upload(*up_addr, bytes).await.expect("upload");
                up[i].push(gbits(bytes, time));
                let (time, got) = download(*down_addr).await.expect("download");
                assert_eq!(got, bytes, "{name}: short download");
                down[i].push(gbits(bytes, time));
                eprintln!(
                    "rep {}/{reps} {name}: up {:.2} down {:.2} Gbit/s",
                    rep + 1,
                    up[i][rep],
                    down[i][rep]
                );
            }
        }
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

async fn tunnel_wg(sink: SocketAddr, source: SocketAddr) -> (SocketAddr, SocketAddr) {
    tunnel(sink, source, true).await
}

/// A sentry with routes "up" and "down" to an agent exporting the sink and the source, over
/// QUIC or over WireGuard.
async fn tunnel(sink: SocketAddr, source: SocketAddr, wireguard: bool) -> (SocketAddr, SocketAddr) {
    let (sentry_key, agent_key) = (
        PrivateKey::generate().expect("key"),
        PrivateKey::generate().expect("key"),
    );
    let (wg_sentry, wg_agent) = if wireguard {
        (
            "wireguard_listen = \"127.0.0.1:0\"\nwireguard_address = \"100.64.0.1\"\n",
            "wireguard_address = \"100.64.0.2\"\n",
        )
    } else {
        ("", "")
    };
    let sentry_toml = format!(
        "[sentry]\nprivate_key = \"unused\"\nquic_listen = \"127.0.0.1:0\"\n{wg_sentry}\
         [[agent]]\nname = \"v\"\npublic_key = \"{}\"\n{wg_agent}\
         [[route]]\nname = \"up\"\nlisten = \"127.0.0.1:0\"\nupstream = [\"v/sink\"]\n\
         [[route]]\nname = \"down\"\nlisten = \"127.0.0.1:0\"\nupstream = [\"v/source\"]\n",
        agent_key.public_key()
    );
    let config =
        config::parse_sentry(Path::new("bench-sentry.toml"), &sentry_toml).expect("sentry config");
    let sentry = Sentry::bind(&config, &sentry_key).await.expect("sentry");
    let handle = sentry.handle();
    tokio::spawn(sentry.run(std::future::pending()));
    let (dial, transport) = match handle.wireguard_addr() {
        Some(wg) => (
            wg,
            "transport = \"wireguard\"\nwireguard_address = \"100.64.0.2\"\n\
             sentry_wireguard_address = \"100.64.0.1\"\n",
        ),
        None => (handle.quic_addr(), ""),
    };
    let agent_toml = format!(
        "[agent]\nname = \"v\"\nprivate_key = \"unused\"\n\
         [[sentry]]\naddress = \"{dial}\"\npublic_key = \"{}\"\n{transport}\
         [[service]]\nname = \"sink\"\ntarget = \"{sink}\"\n\
         [[service]]\nname = \"source\"\ntarget = \"{source}\"\n",
        sentry_key.public_key()
    );
    let agent =
        config::parse_agent(Path::new("bench-agent.toml"), &agent_toml).expect("agent config");
    tokio::spawn(async move {
        let _ = relay_core::agent::run(&agent, &agent_key, std::future::pending()).await;
    });
    tokio::time::timeout(Duration::from_secs(10), handle.wait_agent("v", true))
        .await
        .expect("tunnel up");
    (
        handle.route_addr("up").expect("route"),
        handle.route_addr("down").expect("route"),
    )
}

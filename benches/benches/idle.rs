//! Memory per relayed connection: `BENCH_IDLE` connections (default 8000) held open through a
//! route of the release `sentry` binary, sentry and agent as separate processes on loopback,
//! each connection relayed end to end to an echo service. Each daemon's resident memory
//! (`VmRSS`) is read before the connections open, once they are open and idle (one 64-byte
//! round trip each), and after each has echoed `BENCH_IDLE_TOUCH` bytes (default 64 KiB), so
//! that the buffers a connection used count too. Reported per connection, per end.
//!
//! Over WireGuard one peer holds at most `relay_core::transport::wireguard::MAX_STREAMS`
//! streams; the run there opens at most that many.
//!
//! Reproduce: `cargo build --release -p sentry && cargo bench -p benches --bench idle`
//! (needs about 2 × `BENCH_IDLE` + 100 open files in the benchmark process).
#![allow(clippy::disallowed_methods)] // plain deadlines here, outside the daemon

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use relay_core::keys::{PrivateKey, write_private_key};
use relay_core::transport::wireguard::MAX_STREAMS;
use tests::daemon::Daemon;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const PATIENCE: Duration = Duration::from_secs(30);

/// Resident memory of `pid` in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// An echo service: every connection gets back what it sends.
async fn echo() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = tcp.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// Sentry and agent daemons for `transport` relaying route "echo" to `target`; the route's
/// address.
fn deployment(
    dir: &Path,
    transport: &str,
    target: SocketAddr,
    n: usize,
) -> (Daemon, Daemon, SocketAddr) {
    let free = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
    };
    let (quic, route) = (free(), free());
    let wg = std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("a free port");
    let sentry_key = PrivateKey::generate().expect("key");
    let agent_key = PrivateKey::generate().expect("key");
    write_private_key(&dir.join("sentry.key"), &sentry_key).expect("key");
    write_private_key(&dir.join("agent.key"), &agent_key).expect("key");
    let wireguard = transport == "wireguard";
    let sentry = format!(
        "[sentry]\nprivate_key = \"sentry.key\"\nquic_listen = \"{quic}\"\nmax_connections = {cap}\n{}\n\
         [[agent]]\nname = \"v\"\npublic_key = \"{}\"\n{}\n\
         [[route]]\nname = \"echo\"\nlisten = \"{route}\"\nupstream = [\"v/echo\"]\n\
         max_connections = {cap}\nmax_connections_per_ip = {cap}\nconnect_rate_per_ip = \"100000/s\"\n",
        if wireguard {
            format!("wireguard_listen = \"{wg}\"\nwireguard_address = \"100.64.0.1\"\n")
        } else {
            String::new()
        },
        agent_key.public_key(),
        if wireguard {
            "wireguard_address = \"100.64.0.2\"\n"
        } else {
            ""
        },
        cap = n + 100,
    );
    let agent = format!(
        "[agent]\nname = \"v\"\nprivate_key = \"agent.key\"\nmax_streams_per_sentry = {cap}\n\n\
         [[sentry]]\naddress = \"{}\"\npublic_key = \"{}\"\n{}\n\
         [[service]]\nname = \"echo\"\ntarget = \"{target}\"\nmax_connections = {cap}\n",
        if wireguard { wg } else { quic },
        sentry_key.public_key(),
        if wireguard {
            "transport = \"wireguard\"\nwireguard_address = \"100.64.0.2\"\nsentry_wireguard_address = \"100.64.0.1\"\n"
        } else {
            ""
        },
        cap = n + 100,
    );
    std::fs::write(dir.join("sentry.toml"), sentry).expect("write");
    std::fs::write(dir.join("agent.toml"), agent).expect("write");
    let sentry = Daemon::start("serve", &dir.join("sentry.toml"));
    let agent = Daemon::start("agent", &dir.join("agent.toml"));
    sentry.wait_log("tunnel up", 1, PATIENCE);
    (sentry, agent, route)
}

async fn round_trip(tcp: &mut TcpStream, len: usize) -> std::io::Result<()> {
    let out = vec![0x5au8; len];
    let mut back = vec![0u8; len];
    let (mut r, mut w) = tcp.split();
    let (a, b) = tokio::join!(w.write_all(&out), r.read_exact(&mut back));
    a?;
    b?;
    Ok(())
}

/// Per-connection growth of each daemon's RSS, in KiB: (sentry, agent).
fn per_connection(before: (u64, u64), after: (u64, u64), n: usize) -> (f64, f64) {
    let n = n as f64;
    (
        after.0.saturating_sub(before.0) as f64 / n,
        after.1.saturating_sub(before.1) as f64 / n,
    )
}

fn main() {
    let requested = benches::read_env("BENCH_IDLE", 8000);
    let touch = benches::read_env("BENCH_IDLE_TOUCH", 64 * 1024);
    let runtime = benches::runtime();
    println!(
        "memory per relayed connection: {requested} connections (WireGuard: at most {MAX_STREAMS}), \
         then {touch} bytes echoed on each; resident memory growth per connection, KiB"
    );
    println!(
        "{:<12} {:>7} {:>16} {:>16} {:>16} {:>16}",
        "transport", "conns", "sentry idle", "agent idle", "sentry touched", "agent touched"
    );
    for transport in ["quic", "wireguard"] {
        let n = if transport == "wireguard" {
            requested.min(MAX_STREAMS - 96)
        } else {
            requested
        };
        let dir = std::env::temp_dir().join(format!(
            "sentry-idle-bench-{}-{transport}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        runtime.block_on(async {
            let target = echo().await;
            let (sentry, agent, route) = deployment(&dir, transport, target, n);
            let pids = (sentry.pid(), agent.pid());
            // One connection first: what the first relayed stream allocates is not per
            // connection.
            let mut warm = TcpStream::connect(route).await.expect("connect");
            round_trip(&mut warm, 64).await.expect("warm-up round trip");
            tokio::time::sleep(Duration::from_millis(500)).await;
            let before = (rss_kib(pids.0), rss_kib(pids.1));
            let started = Instant::now();
            let mut held = Vec::with_capacity(n);
            for _ in 0..n {
                let mut tcp = TcpStream::connect(route).await.expect("connect");
                round_trip(&mut tcp, 64).await.expect("round trip");
                held.push(tcp);
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
            let idle = (rss_kib(pids.0), rss_kib(pids.1));
            let opened = started.elapsed();
            for (i, tcp) in held.iter_mut().enumerate() {
                round_trip(tcp, touch)
                    .await
                    .unwrap_or_else(|e| panic!("{transport}: round trip on connection {i}: {e}"));
            }
            // Past the pump's 1 s shrink delay: what a connection keeps once quiet again.
            tokio::time::sleep(Duration::from_secs(2)).await;
            let touched = (rss_kib(pids.0), rss_kib(pids.1));
            let idle_per = per_connection(before, idle, n);
            let touched_per = per_connection(before, touched, n);
            println!(
                "{transport:<12} {n:>7} {:>16.1} {:>16.1} {:>16.1} {:>16.1}   (opened in {:.1} s; RSS before {} / {} KiB)",
                idle_per.0,
                idle_per.1,
                touched_per.0,
                touched_per.1,
                opened.as_secs_f64(),
                before.0,
                before.1
            );
            drop(held);
            drop(warm);
            drop((sentry, agent));
        });
        let _ = std::fs::remove_dir_all(&dir);
    }
}

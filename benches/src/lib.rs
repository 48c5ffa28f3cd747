//! Shared pieces of the benchmarks: loopback sink and source services, timing, statistics.
//!
//! Benchmarks measure and print; they never assert a timing. Every run measures the baseline
//! in the same process and interleaves repetitions, so machine noise hits all paths alike.
#![forbid(unsafe_code)]

pub mod delay;
pub mod load;
pub mod site;

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// One block of payload, reused: the benchmark measures the relay, not a generator.
pub const BLOCK: usize = 256 * 1024;

/// Bytes per transfer (`BENCH_BYTES`, default 1 GiB) and repetitions (`BENCH_REPS`, default 5).
#[must_use]
pub fn settings() -> (usize, usize) {
    (read_env("BENCH_BYTES", 1 << 30), read_env("BENCH_REPS", 5))
}

/// A count from environment variable `name`, or `default` when unset or not a number.
#[must_use]
pub fn read_env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Loopback, port chosen by the kernel: where the in-process services listen by default.
pub const LOOPBACK: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(
    std::net::Ipv4Addr::LOCALHOST,
    0,
));

/// A service that reads everything and answers one byte at end of stream.
pub async fn sink() -> SocketAddr {
    serve(LOOPBACK, sink_connection).await
}

/// A service that writes `bytes` and closes.
pub async fn source(bytes: usize) -> SocketAddr {
    serve(LOOPBACK, move |tcp| source_connection(tcp, bytes)).await
}

/// The sink's side of one connection: read everything, answer one byte at end of stream.
pub async fn sink_connection(mut tcp: TcpStream) {
    let mut buf = vec![0u8; BLOCK];
    while matches!(tcp.read(&mut buf).await, Ok(n) if n > 0) {}
    let _ = tcp.write_all(&[1]).await;
}

/// The source's side of one connection: write `bytes`, then close.
pub async fn source_connection(mut tcp: TcpStream, bytes: usize) {
    let block = vec![0x5au8; BLOCK];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(BLOCK);
        if tcp.write_all(&block[..n]).await.is_err() {
            return;
        }
        left -= n;
    }
    let _ = tcp.shutdown().await;
}

/// A plain userspace TCP relay (the baseline a tunnel is compared with): every accepted
/// connection is spliced to `target` with `tokio::io::copy_bidirectional`.
pub async fn plain_relay(target: SocketAddr) -> SocketAddr {
    plain_relay_on(LOOPBACK, target).await
}

/// [`plain_relay`], listening on `bind`.
pub async fn plain_relay_on(bind: SocketAddr, target: SocketAddr) -> SocketAddr {
    serve(bind, move |mut client| async move {
        let _ = client.set_nodelay(true);
        if let Ok(mut upstream) = TcpStream::connect(target).await {
            let _ = upstream.set_nodelay(true);
            let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
        }
    })
    .await
}

/// Accept on `bind` for the rest of the runtime, each connection in a task of its own running
/// `handle`; the bound address.
///
/// # Panics
/// `bind` cannot be bound.
pub async fn serve<F, Fut>(bind: SocketAddr, handle: F) -> SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind(bind)
        .await
        .unwrap_or_else(|e| panic!("bind {bind}: {e}"));
    let addr = listener.local_addr().expect("bound address");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(handle(tcp));
        }
    });
    addr
}

/// Longest one transfer may take: a stalled path fails the benchmark instead of hanging it.
pub const TRANSFER_LIMIT: Duration = Duration::from_secs(120);

fn limited<T>(
    result: Result<std::io::Result<T>, tokio::time::error::Elapsed>,
) -> std::io::Result<T> {
    result.unwrap_or_else(|_| {
        Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("transfer took over {TRANSFER_LIMIT:?}"),
        ))
    })
}

/// Upload `bytes` to a sink behind `addr`; the time until the sink acknowledged all of it.
pub async fn upload(addr: SocketAddr, bytes: usize) -> std::io::Result<Duration> {
    limited(tokio::time::timeout(TRANSFER_LIMIT, upload_inner(addr, bytes)).await)
}

async fn upload_inner(addr: SocketAddr, bytes: usize) -> std::io::Result<Duration> {
    let block = vec![0xa5u8; BLOCK];
    let started = relay_core::clock::now();
    let mut tcp = TcpStream::connect(addr).await?;
    let mut left = bytes;
    while left > 0 {
        let n = left.min(BLOCK);
        tcp.write_all(&block[..n]).await?;
        left -= n;
    }
    tcp.shutdown().await?;
    let mut ack = [0u8; 1];
    tcp.read_exact(&mut ack).await?;
    Ok(started.elapsed())
}

/// Download everything a source behind `addr` sends; the time and the byte count.
pub async fn download(addr: SocketAddr) -> std::io::Result<(Duration, usize)> {
    limited(tokio::time::timeout(TRANSFER_LIMIT, download_inner(addr)).await)
}

async fn download_inner(addr: SocketAddr) -> std::io::Result<(Duration, usize)> {
    let mut buf = vec![0u8; BLOCK];
    let started = relay_core::clock::now();
    let mut tcp = TcpStream::connect(addr).await?;
    let mut total = 0;
    loop {
        let n = tcp.read(&mut buf).await?;
        if n == 0 {
            return Ok((started.elapsed(), total));
        }
        total += n;
    }
}

/// One upload of `bytes` to `up` and one download from `down` (a [`source`] of `bytes`), in
/// Gbit/s each.
///
/// # Panics
/// A transfer fails or the download comes short.
pub async fn up_and_down(name: &str, up: SocketAddr, down: SocketAddr, bytes: usize) -> (f64, f64) {
    let time = upload(up, bytes).await.expect("upload");
    let up = gbits(bytes, time);
    let (time, got) = download(down).await.expect("download");
    assert_eq!(got, bytes, "{name}: short download");
    (up, gbits(bytes, time))
}

/// Every path's (name, up address, down address) up and down Gbit/s over `reps` repetitions,
/// interleaved (each path once, then again), each printed as it comes after `label`.
pub async fn interleaved<N: AsRef<str>>(
    label: &str,
    paths: &[(N, SocketAddr, SocketAddr)],
    reps: usize,
    bytes: usize,
) -> (Vec<Vec<f64>>, Vec<Vec<f64>>) {
    let mut up = vec![Vec::new(); paths.len()];
    let mut down = vec![Vec::new(); paths.len()];
    for rep in 1..=reps {
        for (i, (name, up_addr, down_addr)) in paths.iter().enumerate() {
            let name = name.as_ref();
            let (u, d) = up_and_down(name, *up_addr, *down_addr, bytes).await;
            eprintln!("{label}rep {rep}/{reps} {name}: up {u:.3} down {d:.3} Gbit/s");
            up[i].push(u);
            down[i].push(d);
        }
    }
    (up, down)
}

/// Gbit/s of `bytes` in `time`.
#[must_use]
pub fn gbits(bytes: usize, time: Duration) -> f64 {
    (bytes as f64 * 8.0) / time.as_secs_f64() / 1e9
}

/// (median, min, max) of samples.
#[must_use]
pub fn summary(samples: &[f64]) -> (f64, f64, f64) {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    let median = if n == 0 {
        0.0
    } else if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    };
    (
        median,
        sorted.first().copied().unwrap_or(0.0),
        sorted.last().copied().unwrap_or(0.0),
    )
}

/// One exported service of [`deployment`]: its name (also the route's), its address, and
/// whether it is UDP.
pub struct Export<'a> {
    pub name: &'a str,
    pub target: SocketAddr,
    pub udp: bool,
    /// More TOML lines for the route's table (a `[route.jsonrpc]` table may end them).
    pub route_extra: &'a str,
}

/// An in-process sentry and agent on loopback over `transport` (`quic`, `wireguard` or `tls`),
/// with one route per export, named after it, to the agent's service of that name (which
/// may share its target with another). Returns
/// once the tunnel is up; the route addresses come from [`relay_core::sentry::SentryHandle::route_addr`].
///
/// # Panics
/// The configs do not parse, a socket cannot be bound, or the tunnel is not up in 10 s.
pub async fn deployment(
    transport: &str,
    exports: &[Export<'_>],
) -> relay_core::sentry::SentryHandle {
    deployment_over(transport, exports, None, None).await
}

/// [`deployment`], with the agent's tunnel through a [`delay::delay_line`] of `one_way` each
/// way when one is given (QUIC and WireGuard: the line carries UDP), and WireGuard's
/// `wireguard_window` on both ends when one is given (such as `"4MiB"`).
///
/// # Panics
/// As [`deployment`]; or a delay asked of the TLS transport.
pub async fn deployment_over(
    transport: &str,
    exports: &[Export<'_>],
    one_way: Option<Duration>,
    wireguard_window: Option<&str>,
) -> relay_core::sentry::SentryHandle {
    use relay_core::config;
    let window =
        wireguard_window.map_or(String::new(), |w| format!("wireguard_window = \"{w}\"\n"));
    use relay_core::keys::PrivateKey;
    use std::path::Path;
    let (sentry_key, agent_key) = (
        PrivateKey::generate().expect("key"),
        PrivateKey::generate().expect("key"),
    );
    let wireguard = transport == "wireguard";
    let mut sentry_toml = format!(
        "[sentry]\nprivate_key = \"unused\"\nquic_listen = \"127.0.0.1:0\"\n\
         tls_listen = \"127.0.0.1:0\"\n{}\
         [[agent]]\nname = \"v\"\npublic_key = \"{}\"\n{}",
        if wireguard {
            format!(
                "wireguard_listen = \"127.0.0.1:0\"\nwireguard_address = \"100.64.0.1\"\n{window}"
            )
        } else {
            String::new()
        },
        agent_key.public_key(),
        if wireguard {
            "wireguard_address = \"100.64.0.2\"\n"
        } else {
            ""
        },
    );
    let mut services = String::new();
    for export in exports {
        let protocol = if export.udp { "udp" } else { "tcp" };
        let route_protocol = if export.udp {
            "protocol = \"udp\"\n"
        } else {
            ""
        };
        // Every connection comes from 127.0.0.1: the per-client limits are lifted.
        sentry_toml += &format!(
            "[[route]]\nname = \"{}\"\nlisten = \"127.0.0.1:0\"\n{route_protocol}\
             upstream = [\"v/{}\"]\nmax_connections_per_ip = 100000\n\
             connect_rate_per_ip = \"1000000/s\"\n{}",
            export.name, export.name, export.route_extra
        );
        services += &format!(
            "[[service]]\nname = \"{}\"\ntarget = \"{}\"\nprotocol = \"{protocol}\"\n",
            export.name, export.target
        );
    }
    let config =
        config::parse_sentry(Path::new("bench-sentry.toml"), &sentry_toml).expect("sentry config");
    let sentry = relay_core::sentry::Sentry::bind(&config, &sentry_key)
        .await
        .expect("sentry");
    let handle = sentry.handle();
    tokio::spawn(sentry.run(std::future::pending()));
    let (dial, extra) = match transport {
        "wireguard" => (
            handle.wireguard_addr().expect("wireguard listener"),
            format!(
                "wireguard_address = \"100.64.0.2\"\nsentry_wireguard_address = \"100.64.0.1\"\n{window}"
            ),
        ),
        "tls" => (handle.tls_addr().expect("tls listener"), String::new()),
        _ => (
            handle.quic_addr().expect("quic_listen is set"),
            String::new(),
        ),
    };
    let dial = match one_way {
        Some(one_way) => {
            assert_ne!(transport, "tls", "the delay line carries UDP");
            delay::delay_line(dial, one_way).await
        }
        None => dial,
    };
    let agent_toml = format!(
        "[agent]\nname = \"v\"\nprivate_key = \"unused\"\n\
         [[sentry]]\naddress = \"{dial}\"\npublic_key = \"{}\"\ntransport = \"{transport}\"\n{extra}\
         {services}",
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
    handle
}

/// The runtime every benchmark uses: as many workers as cores (two on the reference machine).
#[must_use]
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_of_samples() {
        assert_eq!(summary(&[3.0, 1.0, 2.0]), (2.0, 1.0, 3.0));
        assert_eq!(summary(&[4.0, 1.0, 2.0, 3.0]), (2.5, 1.0, 4.0));
        assert_eq!(summary(&[]), (0.0, 0.0, 0.0));
    }
}

//! Throughput and latency through the namespace topology of the real-network tier: a client on
//! the public segment, the sentry host, a NAT router (iptables MASQUERADE), the validator on
//! its LAN. Six paths in the same run, repetitions interleaved:
//!
//! - `direct`: kernel forwarding through a port forward (DNAT) on the router: no relay, no
//!   tunnel, and an open port on the validator (the reference point, not a deployment);
//! - `plain TCP relay`: a userspace relay on the sentry host to that port forward (the relay
//!   baseline);
//! - `sentry+agent (QUIC)`, `(WireGuard)` and `(TLS)`: the release `sentry` binary on both
//!   hosts, the agent dialing out through the NAT;
//! - `wireguard-go + relay`: the hand-built alternative: wireguard-go on a TUN device on both
//!   hosts (kernel TCP inside), and the same userspace relay on the sentry host to the
//!   validator's overlay address.
//!
//! Single-stream throughput each way (`BENCH_BYTES`, default 256 MiB) and request/response
//! round trips on one connection (64 bytes, `BENCH_ROUND_TRIPS`, default 2000; p50 and p99).
//!
//! Needs root (namespaces), `ip`, `iptables`, `conntrack`, the release binary and, for the last
//! path, `wireguard-go` and `wg`. Reproduce:
//! `cargo build --release -p sentry && cargo bench -p benches --bench netns`

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use benches::{gbits, summary};
use relay_core::keys::{PrivateKey, write_private_key};
use tests::daemon::Daemon;
use tests::netns::{Host, ROUTER_WAN, SENTRY, Topology, VALIDATOR};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const SINK: u16 = 7201;
const SOURCE: u16 = 7202;
const ECHO: u16 = 7203;
const PATIENCE: Duration = Duration::from_secs(30);

fn at(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(ip, port))
}

fn current_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// Run `serve` on its own thread inside `host`'s namespace for the rest of the process.
fn spawn_in<F, Fut>(t: &Topology, host: Host, serve: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    // A thread inherits the namespace of the thread that creates it.
    t.enter(host, move || {
        std::thread::spawn(move || current_thread().block_on(serve()));
    });
}

async fn accept_each<F, Fut>(listener: TcpListener, handle: F)
where
    F: Fn(TcpStream) -> Fut,
    Fut: std::future::Future<Output = ()> + 'static,
{
    while let Ok((tcp, _)) = listener.accept().await {
        let _ = tcp.set_nodelay(true);
        tokio::task::spawn_local(handle(tcp));
    }
}

/// The validator's sink, source and echo services on every address (LAN and overlay).
fn services(t: &Topology, bytes: usize) {
    spawn_in(t, Host::Validator, move || async move {
        let local = tokio::task::LocalSet::new();
        local
            .run_until(async move {
                let sink = TcpListener::bind(at(Ipv4Addr::UNSPECIFIED, SINK))
                    .await
                    .expect("sink");
                let source = TcpListener::bind(at(Ipv4Addr::UNSPECIFIED, SOURCE))
                    .await
                    .expect("source");
                let echo = TcpListener::bind(at(Ipv4Addr::UNSPECIFIED, ECHO))
                    .await
                    .expect("echo");
                tokio::task::spawn_local(accept_each(sink, benches::sink_connection));
                tokio::task::spawn_local(accept_each(source, move |tcp| {
                    benches::source_connection(tcp, bytes)
                }));
                accept_each(echo, |mut tcp| async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    while let Ok(n) = tcp.read(&mut buf).await {
                        if n == 0 || tcp.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                })
                .await;
            })
            .await;
    });
}

/// A plain userspace relay on the sentry host: `listen` port + i → `target` port + i for the
/// three services.
fn relay(t: &Topology, listen: u16, target: Ipv4Addr) {
    spawn_in(t, Host::Sentry, move || async move {
        let local = tokio::task::LocalSet::new();
        local
            .run_until(async move {
                for (from, to) in [(0, SINK), (1, SOURCE), (2, ECHO)] {
                    let listener = TcpListener::bind(at(SENTRY, listen + from))
                        .await
                        .expect("relay");
                    tokio::task::spawn_local(accept_each(listener, move |mut client| async move {
                        if let Ok(mut upstream) = TcpStream::connect(at(target, to)).await {
                            let _ = upstream.set_nodelay(true);
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                        }
                    }));
                }
                std::future::pending::<()>().await;
            })
            .await;
    });
}

/// Router: forward its public ports 7201–7203 to the validator (for `direct` and the relay).
fn port_forward(t: &Topology) {
    let ports = format!("{SINK}:{ECHO}");
    t.iptables(&[
        "-t",
        "nat",
        "-A",
        "PREROUTING",
        "-i",
        "pub",
        "-d",
        &ROUTER_WAN.to_string(),
        "-p",
        "tcp",
        "--dport",
        &ports,
        "-j",
        "DNAT",
        "--to-destination",
        &VALIDATOR.to_string(),
    ]);
    t.iptables(&[
        "-A",
        "FORWARD",
        "-i",
        "pub",
        "-o",
        "lan",
        "-d",
        &VALIDATOR.to_string(),
        "-p",
        "tcp",
        "--dport",
        &ports,
        "-j",
        "ACCEPT",
    ]);
}

/// One sentry (+ agent) deployment over `transport`; routes on `base` + 0..3.
fn deployment(t: &Topology, name: &str, base: u16, quic: u16, transport: &str) -> (Daemon, Daemon) {
    let wireguard = transport == "wireguard";
    let dir = t.dir();
    let sentry_key = PrivateKey::generate().expect("key");
    let agent_key = PrivateKey::generate().expect("key");
    write_private_key(&dir.join(format!("{name}-sentry.key")), &sentry_key).expect("key");
    write_private_key(&dir.join(format!("{name}-agent.key")), &agent_key).expect("key");
    let (wg_sentry, wg_agent, dial, transport) = if wireguard {
        (
            format!(
                "wireguard_listen = \"{}\"\nwireguard_address = \"100.64.0.1\"\n",
                at(SENTRY, 51820)
            ),
            "wireguard_address = \"100.64.0.2\"\n".to_owned(),
            at(SENTRY, 51820),
            "transport = \"wireguard\"\nwireguard_address = \"100.64.0.2\"\nsentry_wireguard_address = \"100.64.0.1\"\n",
        )
    } else if transport == "tls" {
        (
            format!("tls_listen = \"{}\"\n", at(SENTRY, quic + 1000)),
            String::new(),
            at(SENTRY, quic + 1000),
            "transport = \"tls\"\n",
        )
    } else {
        (String::new(), String::new(), at(SENTRY, quic), "")
    };
    let mut sentry = format!(
        "[sentry]\nprivate_key = \"{name}-sentry.key\"\nquic_listen = \"{}\"\n{wg_sentry}\n\
         [[agent]]\nname = \"v\"\npublic_key = \"{}\"\n{wg_agent}",
        at(SENTRY, quic),
        agent_key.public_key()
    );
    let mut agent = format!(
        "[agent]\nname = \"v\"\nprivate_key = \"{name}-agent.key\"\n\n\
         [[sentry]]\naddress = \"{dial}\"\npublic_key = \"{}\"\n{transport}",
        sentry_key.public_key()
    );
    for (i, (service, port)) in [("sink", SINK), ("source", SOURCE), ("echo", ECHO)]
        .iter()
        .enumerate()
    {
        sentry += &format!(
            "\n[[route]]\nname = \"{service}\"\nlisten = \"{}\"\nupstream = [\"v/{service}\"]\n",
            at(SENTRY, base + u16::try_from(i).expect("small"))
        );
        agent += &format!(
            "\n[[service]]\nname = \"{service}\"\ntarget = \"{}\"\n",
            at(VALIDATOR, *port)
        );
    }
    let sentry_path = dir.join(format!("{name}-sentry.toml"));
    let agent_path = dir.join(format!("{name}-agent.toml"));
    std::fs::write(&sentry_path, sentry).expect("write");
    std::fs::write(&agent_path, agent).expect("write");
    let sentry = t.daemon(Host::Sentry, "serve", &sentry_path);
    let agent = t.daemon(Host::Validator, "agent", &agent_path);
    sentry.wait_log("tunnel up", 1, PATIENCE);
    (sentry, agent)
}

/// wireguard-go on both hosts, stopped when dropped.
struct WireGuardGo(Vec<Child>);

impl Drop for WireGuardGo {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// wireguard-go on the sentry host (100.64.1.1, UDP 51821) and on the validator (100.64.1.2,
/// keepalive 5 s), each with kernel TCP on its TUN device. `None` when not installed.
fn wireguard_go(t: &Topology) -> Option<WireGuardGo> {
    let have = Command::new("wg")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
        && std::path::Path::new("/usr/bin/wireguard-go").exists();
    if !have {
        eprintln!("wireguard-go or wg not installed: that path is skipped");
        return None;
    }
    let id = std::process::id() % 10_000;
    let mut children = Vec::new();
    let mut keys = Vec::new();
    for (host, iface) in [
        (Host::Sentry, format!("wgbs{id}")),
        (Host::Validator, format!("wgbv{id}")),
    ] {
        let child = Command::new("ip")
            .args(["netns", "exec", &t.ns(host), "wireguard-go", "-f", &iface])
            .env("WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("wireguard-go");
        children.push(child);
        let started = relay_core::clock::now();
        while !t.try_sh(host, &["wg", "show", &iface]).status.success() {
            assert!(started.elapsed() < PATIENCE, "wireguard-go did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        let key: PathBuf = t.dir().join(format!("{iface}.key"));
        std::fs::write(&key, t.sh(host, &["wg", "genkey"])).expect("key");
        let public = t.sh(
            host,
            &["sh", "-c", &format!("wg pubkey < {}", key.display())],
        );
        keys.push((host, iface, key, public.trim().to_owned()));
    }
    let wg = WireGuardGo(children);
    let (sentry_pub, validator_pub) = (keys[0].3.clone(), keys[1].3.clone());
    for (host, iface, key, _) in &keys {
        let (own, peer, peer_pub) = if *host == Host::Sentry {
            ("100.64.1.1", "100.64.1.2", &validator_pub)
        } else {
            ("100.64.1.2", "100.64.1.1", &sentry_pub)
        };
        let mut set = vec![
            "wg",
            "set",
            iface,
            "private-key",
            key.to_str().expect("path"),
        ];
        let listen = "51821".to_owned();
        let endpoint = at(SENTRY, 51821).to_string();
        let allowed = format!("{peer}/32");
        if *host == Host::Sentry {
            set.extend([
                "listen-port",
                &listen,
                "peer",
                peer_pub,
                "allowed-ips",
                &allowed,
            ]);
        } else {
            set.extend([
                "peer",
                peer_pub,
                "endpoint",
                &endpoint,
                "allowed-ips",
                &allowed,
                "persistent-keepalive",
                "5",
            ]);
        }
        t.sh(*host, &set);
        t.sh(
            *host,
            &["ip", "addr", "add", &format!("{own}/32"), "dev", iface],
        );
        t.sh(*host, &["ip", "link", "set", iface, "mtu", "1420", "up"]);
        t.sh(*host, &["ip", "route", "add", &allowed, "dev", iface]);
    }
    // Wait for the handshake: the validator's keepalive makes it.
    let started = relay_core::clock::now();
    loop {
        let shown = t.sh(
            Host::Sentry,
            &["wg", "show", &keys[0].1, "latest-handshakes"],
        );
        if shown.split_whitespace().nth(1).is_some_and(|s| s != "0") {
            break;
        }
        assert!(
            started.elapsed() < PATIENCE,
            "wireguard-go peers did not handshake"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    Some(wg)
}

/// Upload `bytes` from the client to the sink behind `addr`: the time until acknowledged.
fn upload(t: &Topology, addr: SocketAddr, bytes: usize) -> Duration {
    t.enter(Host::Client, || {
        current_thread().block_on(async {
            tokio::time::timeout(Duration::from_secs(300), benches::upload(addr, bytes))
                .await
                .expect("upload stalled")
                .expect("upload")
        })
    })
}

/// Download from the source behind `addr`: the time and the byte count.
fn download(t: &Topology, addr: SocketAddr) -> (Duration, usize) {
    t.enter(Host::Client, || {
        current_thread().block_on(async {
            tokio::time::timeout(Duration::from_secs(300), benches::download(addr))
                .await
                .expect("download stalled")
                .expect("download")
        })
    })
}

/// `n` round trips of 64 bytes on one connection to the echo behind `addr`.
fn round_trips(t: &Topology, addr: SocketAddr, n: usize) -> Vec<Duration> {
    t.enter(Host::Client, || {
        current_thread().block_on(async {
            let mut tcp = TcpStream::connect(addr).await.expect("echo connect");
            tcp.set_nodelay(true).expect("nodelay");
            let message = [0x42u8; 64];
            let mut back = [0u8; 64];
            let mut took = Vec::with_capacity(n);
            for _ in 0..n {
                let started = relay_core::clock::now();
                tcp.write_all(&message).await.expect("echo write");
                tcp.read_exact(&mut back).await.expect("echo read");
                took.push(started.elapsed());
            }
            took
        })
    })
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i).copied().unwrap_or_default()
}

fn main() {
    let bytes = benches::read_env("BENCH_BYTES", 256 << 20);
    let reps = benches::read_env("BENCH_REPS", 3);
    let trips = benches::read_env("BENCH_ROUND_TRIPS", 2000);
    let Some(t) = Topology::new() else {
        eprintln!("netns benchmark skipped: the namespace topology cannot be built here");
        return;
    };
    services(&t, bytes);
    port_forward(&t);
    relay(&t, 8201, ROUTER_WAN);
    let _quic = deployment(&t, "quic", 9201, 7443, "quic");
    let _wireguard = deployment(&t, "wg", 10201, 7444, "wireguard");
    let _tls = deployment(&t, "tls", 12201, 7445, "tls");
    let wg_go = wireguard_go(&t);
    if wg_go.is_some() {
        relay(&t, 11201, Ipv4Addr::new(100, 64, 1, 2));
    }
    let mut paths: Vec<(&str, SocketAddr, u16)> = vec![
        ("direct (router port forward)", at(ROUTER_WAN, SINK), SINK),
        ("plain TCP relay", at(SENTRY, 8201), 8201),
        ("sentry+agent (QUIC)", at(SENTRY, 9201), 9201),
        ("sentry+agent (WireGuard)", at(SENTRY, 10201), 10201),
        ("sentry+agent (TLS)", at(SENTRY, 12201), 12201),
    ];
    if wg_go.is_some() {
        paths.push(("wireguard-go + relay", at(SENTRY, 11201), 11201));
    }
    // `BENCH_PATHS`: only the paths whose name contains one of these comma-separated words
    // (the plain relay always runs: the ratios are against it).
    if let Ok(only) = std::env::var("BENCH_PATHS") {
        let words: Vec<String> = only.split(',').map(str::to_lowercase).collect();
        paths.retain(|(name, ..)| {
            let name = name.to_lowercase();
            name.starts_with("plain") || words.iter().any(|w| name.contains(w.as_str()))
        });
    }
    let addr = |base: SocketAddr, offset: u16| SocketAddr::new(base.ip(), base.port() + offset);
    let mut up = vec![Vec::new(); paths.len()];
    let mut down = vec![Vec::new(); paths.len()];
    let mut rtt = vec![Vec::new(); paths.len()];
    for rep in 0..reps {
        for (i, (name, base, _)) in paths.iter().enumerate() {
            let took = upload(&t, *base, bytes);
            up[i].push(gbits(bytes, took));
            let (took, got) = download(&t, addr(*base, 1));
            assert_eq!(got, bytes, "{name}: short download");
            down[i].push(gbits(bytes, took));
            rtt[i].extend(round_trips(&t, addr(*base, 2), trips));
            eprintln!(
                "rep {}/{reps} {name}: up {:.2} down {:.2} Gbit/s",
                rep + 1,
                up[i][rep],
                down[i][rep]
            );
        }
    }
    println!(
        "\nnamespace topology (client -> sentry -> NAT router -> validator, veth MTU 1500), \
         {} MiB per transfer, {reps} interleaved reps, {trips} round trips of 64 B per rep",
        bytes >> 20
    );
    println!(
        "{:<30} {:>9} {:>15} {:>9} {:>15} {:>13} {:>9} {:>9}",
        "path", "up Gbit/s", "(min-max)", "down", "(min-max)", "vs relay", "p50 ms", "p99 ms"
    );
    let plain = paths
        .iter()
        .position(|(name, ..)| name.starts_with("plain"))
        .unwrap_or(0);
    let relay = (summary(&up[plain]).0, summary(&down[plain]).0);
    for (i, (name, ..)) in paths.iter().enumerate() {
        let (u, umin, umax) = summary(&up[i]);
        let (d, dmin, dmax) = summary(&down[i]);
        let mut sorted = rtt[i].clone();
        sorted.sort();
        println!(
            "{name:<30} {u:>9.2} {:>15} {d:>9.2} {:>15} {:>6.2}x/{:.2}x {:>9.3} {:>9.3}",
            format!("({umin:.2}-{umax:.2})"),
            format!("({dmin:.2}-{dmax:.2})"),
            u / relay.0,
            d / relay.1,
            percentile(&sorted, 0.5).as_secs_f64() * 1e3,
            percentile(&sorted, 0.99).as_secs_f64() * 1e3,
        );
    }
    drop(wg_go);
}

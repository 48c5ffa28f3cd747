//! In-process tier of the hidden validator: the node's outbound connections leaving from the
//! sentry (egress) over each transport, the sentry's refusals, and every relayed peer seen as
//! itself (mapped source addresses). A real sentry and a real agent on loopback; the
//! destinations are loopback services, which the sentry dials only because these configs list
//! 127.0.0.0/8 in `allow_private` (the real-network tier dials a public segment instead).
#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use relay_core::agent::{Agent, AgentHandle, mapped_source};
use relay_core::config;
use relay_core::keys::PrivateKey;
use tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

const MIB: usize = 1024 * 1024;

/// The sentry: agent "v1" over any transport (`egress`: its `egress` key), an `[egress]`
/// table of `policy` lines.
fn sentry_config(agent_key: &PrivateKey, egress: bool, policy: &str) -> config::SentryConfig {
    let text = format!(
        "[sentry]\nprivate_key = \"sentry.key\"\nquic_listen = \"127.0.0.1:0\"\n\
         tls_listen = \"127.0.0.1:0\"\nmetrics_listen = \"127.0.0.1:0\"\n\
         wireguard_listen = \"127.0.0.1:0\"\nwireguard_address = \"100.64.0.1\"\n\n\
         [[agent]]\nname = \"v1\"\npublic_key = \"{}\"\nwireguard_address = \"100.64.0.2\"\n\
         egress = {egress}\n\n\
         [[route]]\nname = \"p2p\"\nlisten = \"127.0.0.1:0\"\nupstream = [\"v1/p2p\"]\n\
         max_connections_per_ip = 100\nconnect_rate_per_ip = \"1000/s\"\n\n\
         [egress]\nallow_private = [\"127.0.0.0/8\"]\n{policy}\n",
        agent_key.public_key()
    );
    config::parse_sentry(Path::new("test-sentry.toml"), &text).unwrap()
}

/// The agent: one sentry over `transport`, service "p2p" at `p2p`, and `egress` listener
/// tables.
fn agent_config(
    sentry: &RunningSentry,
    sentry_key: &PrivateKey,
    transport: &str,
    p2p: SocketAddr,
    egress: &str,
) -> config::AgentConfig {
    let address = match transport {
        "quic" => sentry.handle.quic_addr().expect("quic_listen is set"),
        "tls" => sentry.handle.tls_addr().unwrap(),
        _ => sentry.handle.wireguard_addr().unwrap(),
    };
    let overlay = if transport == "wireguard" {
        "wireguard_address = \"100.64.0.2\"\nsentry_wireguard_address = \"100.64.0.1\"\n"
    } else {
        ""
    };
    let text = format!(
        "[agent]\nname = \"v1\"\nprivate_key = \"agent.key\"\nmetrics_listen = \"127.0.0.1:0\"\n\n\
         [[sentry]]\naddress = \"{address}\"\npublic_key = \"{}\"\ntransport = \"{transport}\"\n\
         {overlay}\n\
         [[service]]\nname = \"p2p\"\ntarget = \"{p2p}\"\n\n{egress}",
        sentry_key.public_key()
    );
    config::parse_agent(Path::new("test-agent.toml"), &text).unwrap()
}

struct Deployment {
    sentry: RunningSentry,
    agent: AgentHandle,
    _task: tokio::task::JoinHandle<()>,
}

impl Drop for Deployment {
    fn drop(&mut self) {
        self._task.abort();
    }
}

/// A sentry and an agent over `transport` with egress listeners `egress` (TOML); returns once
/// the tunnel is up.
async fn deploy(transport: &str, allowed: bool, policy: &str, egress: &str) -> Deployment {
    deploy_to(transport, allowed, policy, egress, echo_service().await).await
}

async fn deploy_to(
    transport: &str,
    allowed: bool,
    policy: &str,
    egress: &str,
    p2p: SocketAddr,
) -> Deployment {
    let (sentry_key, agent_key) = (key(), key());
    let sentry = start_sentry(&sentry_config(&agent_key, allowed, policy), &sentry_key).await;
    let config = agent_config(&sentry, &sentry_key, transport, p2p, egress);
    let agent = Agent::new(&config, &agent_key).unwrap();
    let handle = agent.handle();
    let task = tokio::spawn(agent.run(std::future::pending()));
    sentry.wait_agent("v1", true).await;
    agent_up(&handle).await;
    Deployment {
        sentry,
        agent: handle,
        _task: task,
    }
}

/// Wait (bounded) until the agent counts its tunnel up too: over WireGuard the sentry sees
/// the handshake before the agent sees the answer.
async fn agent_up(agent: &AgentHandle) {
    let up = async {
        while !agent
            .render_metrics()
            .lines()
            .any(|l| l.starts_with("sentry_agent_tunnel_up{") && l.ends_with(" 1"))
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(PATIENCE, up).await.unwrap();
}

/// A loopback address of its own for each egress listener of a test (port 0: the agent
/// binds any free port; [`Deployment::bound`] tells which).
fn free_port() -> SocketAddr {
    static NEXT: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(2);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    SocketAddr::from(([127, 0, 1, n], 0))
}

impl Deployment {
    /// The bound address of the egress listener configured at `listen`.
    fn bound(&self, listen: SocketAddr) -> SocketAddr {
        self.agent.egress_addr(listen).unwrap()
    }
}

fn forward(listen: SocketAddr, to: SocketAddr) -> String {
    format!("[[egress]]\nlisten = \"{listen}\"\nmode = \"forward\"\nto = \"{to}\"\n")
}

fn socks(listen: SocketAddr) -> String {
    format!("[[egress]]\nlisten = \"{listen}\"\nmode = \"socks5\"\n")
}

/// A SOCKS5 CONNECT (RFC 1928, no authentication) to `host:port` (an IP address is sent as
/// one, anything else as a name): the reply code, and the connection when it is 0.
async fn socks5(proxy: SocketAddr, host: &str, port: u16) -> (u8, TcpStream) {
    let mut tcp = TcpStream::connect(proxy).await.unwrap();
    tcp.write_all(&[5, 1, 0]).await.unwrap();
    let mut chosen = [0u8; 2];
    tcp.read_exact(&mut chosen).await.unwrap();
    assert_eq!(chosen, [5, 0]);
    let mut request = vec![5, 1, 0];
    match host.parse::<IpAddr>() {
        Ok(IpAddr::V4(ip)) => {
            request.push(1);
            request.extend_from_slice(&ip.octets());
        }
        Ok(IpAddr::V6(ip)) => {
            request.push(4);
            request.extend_from_slice(&ip.octets());
        }
        Err(_) => {
            request.push(3);
            request.push(u8::try_from(host.len()).unwrap());
            request.extend_from_slice(host.as_bytes());
        }
    }
    request.extend_from_slice(&port.to_be_bytes());
    tcp.write_all(&request).await.unwrap();
    let mut reply = [0u8; 10];
    tokio::time::timeout(PATIENCE, tcp.read_exact(&mut reply))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reply[0], 5);
    (reply[1], tcp)
}

/// Echo one message through `tcp`.
async fn echo_once(tcp: &mut TcpStream, message: &[u8]) {
    tcp.write_all(message).await.unwrap();
    let mut back = vec![0u8; message.len()];
    tokio::time::timeout(PATIENCE, tcp.read_exact(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(back, message);
}

fn sentry_metric(d: &Deployment, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric(&d.sentry.handle.render_metrics(), name, labels).unwrap_or(0.0)
}

/// Upload and download through a `forward` listener, hash-checked, over each transport; and
/// a SOCKS5 connection to an echo.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn egress_carries_bulk_both_ways_and_socks5_over_every_transport() {
    let sink = hash_sink().await;
    let echo = echo_service().await;
    let source = service(|mut tcp| async move {
        let _ = write_payload(&mut tcp, 99, 8 * MIB).await;
        let _ = tcp.shutdown().await;
    })
    .await;
    for transport in ["quic", "wireguard", "tls"] {
        let (up, down, proxy) = (free_port(), free_port(), free_port());
        let listeners = format!(
            "{}{}{}",
            forward(up, sink),
            forward(down, source),
            socks(proxy)
        );
        let d = deploy(transport, true, "", &listeners).await;
        let (up, down, proxy) = (d.bound(up), d.bound(down), d.bound(proxy));
        upload_hash_checked(up, 7, 8 * MIB).await;
        let mut tcp = TcpStream::connect(down).await.unwrap();
        let (len, digest) = read_hash(&mut tcp).await.unwrap();
        let expected = write_payload(&mut tokio::io::sink(), 99, 8 * MIB)
            .await
            .unwrap();
        assert_eq!((len, digest), (8 * MIB, expected), "{transport}: download");
        let (code, mut tcp) = socks5(proxy, "127.0.0.1", echo.port()).await;
        assert_eq!(code, 0, "{transport}: SOCKS5 CONNECT");
        echo_once(&mut tcp, b"through the sentry").await;
        drop(tcp);
        assert_eq!(
            sentry_metric(&d, "sentry_egress_connections_total", &[("agent", "v1")]),
            3.0,
            "{transport}"
        );
        let up_bytes = sentry_metric(
            &d,
            "sentry_egress_bytes_total",
            &[("agent", "v1"), ("direction", "up")],
        );
        assert!(up_bytes >= (8 * MIB) as f64, "{transport}: {up_bytes}");
    }
}

/// A name in a SOCKS5 request is resolved on the sentry, and what it resolves to is judged
/// like any address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_resolve_on_the_sentry_and_their_addresses_are_judged() {
    let echo = echo_service().await;
    let proxy = free_port();
    let d = deploy("quic", true, "", &socks(proxy)).await;
    let proxy = d.bound(proxy);
    let (code, mut tcp) = socks5(proxy, "localhost", echo.port()).await;
    assert_eq!(code, 0);
    echo_once(&mut tcp, b"by name").await;
    drop(tcp);
    // Without the exception, the same name is a loopback address: refused before any dial.
    let d2 = deploy_private_refused().await;
    let proxy2 = d2.1;
    let (code, _) = socks5(proxy2, "localhost", echo.port()).await;
    assert_eq!(code, 2, "not allowed by ruleset");
    assert_eq!(
        sentry_metric(
            &d2.0,
            "sentry_egress_refused_total",
            &[("agent", "v1"), ("reason", "private_range")]
        ),
        1.0
    );
    drop(d);
}

/// A deployment whose sentry has no `allow_private`: its SOCKS5 listener.
async fn deploy_private_refused() -> (Deployment, SocketAddr) {
    let (sentry_key, agent_key) = (key(), key());
    let mut config = sentry_config(&agent_key, true, "");
    config.egress.allow_private = relay_core::cidr::CidrSet::default();
    let sentry = start_sentry(&config, &sentry_key).await;
    let proxy = free_port();
    let agent_config = agent_config(
        &sentry,
        &sentry_key,
        "quic",
        echo_service().await,
        &socks(proxy),
    );
    let agent = Agent::new(&agent_config, &agent_key).unwrap();
    let handle = agent.handle();
    let task = tokio::spawn(agent.run(std::future::pending()));
    sentry.wait_agent("v1", true).await;
    agent_up(&handle).await;
    let proxy = handle.egress_addr(proxy).unwrap();
    (
        Deployment {
            sentry,
            agent: handle,
            _task: task,
        },
        proxy,
    )
}

/// Each refusal by reason: an agent without `egress = true`; the sentry's private ranges
/// and a port outside `ports` (decided before any packet leaves: the destinations here are
/// never dialed); the per-agent cap and rate. A refused connection is closed, counted, and
/// costs the agent's other connections nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_decided_before_dialing_and_counted_by_reason() {
    let echo = echo_service().await;
    // Not allowed egress at all.
    let proxy = free_port();
    let d = deploy("quic", false, "", &socks(proxy)).await;
    let proxy = d.bound(proxy);
    let (code, _) = socks5(proxy, "127.0.0.1", echo.port()).await;
    assert_eq!(code, 2);
    assert_eq!(
        sentry_metric(
            &d,
            "sentry_egress_refused_total",
            &[("agent", "v1"), ("reason", "agent_not_allowed")]
        ),
        1.0
    );
    drop(d);

    let proxy = free_port();
    let policy =
        "ports = [\"1-1023\", \"2000-65535\"]\nmax_connections = 2\nconnect_rate = \"5/m\"\n";
    let d = deploy("quic", true, policy, &socks(proxy)).await;
    let proxy = d.bound(proxy);
    let refused = |reason| {
        sentry_metric(
            &d,
            "sentry_egress_refused_total",
            &[("agent", "v1"), ("reason", reason)],
        )
    };
    // Cloud metadata, a private LAN, the sentry's own unspecified address: never dialed.
    for host in ["169.254.169.254", "10.1.2.3", "0.0.0.0", "::1"] {
        let (code, _) = socks5(proxy, host, 80).await;
        assert_eq!(code, 2, "{host}");
    }
    assert_eq!(refused("private_range"), 4.0);
    let (code, _) = socks5(proxy, "127.0.0.1", 1500).await;
    assert_eq!(code, 2);
    assert_eq!(refused("port"), 1.0);
    // Two open at once; the third is refused by the cap while they are open.
    let (a, mut first) = socks5(proxy, "127.0.0.1", echo.port()).await;
    let (b, mut second) = socks5(proxy, "127.0.0.1", echo.port()).await;
    assert_eq!((a, b), (0, 0));
    let (c, _) = socks5(proxy, "127.0.0.1", echo.port()).await;
    assert_eq!(c, 1, "general failure: busy");
    assert_eq!(refused("max_connections"), 1.0);
    echo_once(&mut first, b"still served").await;
    echo_once(&mut second, b"still served").await;
    drop((first, second));
    // The rate: 5 a minute, spent only by what passed the destination checks and the cap:
    // two of it are spent, three are left.
    let mut codes = Vec::new();
    for _ in 0..6 {
        // Each closes before the next, so the cap never refuses these.
        let idle = async {
            while sentry_metric(&d, "sentry_egress_active", &[("agent", "v1")]) > 0.0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::time::timeout(PATIENCE, idle).await.unwrap();
        let (code, tcp) = socks5(proxy, "127.0.0.1", echo.port()).await;
        drop(tcp);
        codes.push(code);
    }
    assert_eq!(codes, [0, 0, 0, 1, 1, 1]);
    assert_eq!(refused("rate"), 3.0);
    assert_eq!(refused("max_connections"), 1.0);
}

/// A relayed peer connects to a loopback service from its own stable mapped address, so a
/// node that allows one connection per address accepts two peers; the agent's `/peers` tells
/// the node's address back into the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_relayed_peer_comes_from_its_own_stable_loopback_address() {
    // A node that allows one connection per source address, and says whom it sees.
    let node = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = node.local_addr().unwrap();
    let open: std::sync::Arc<std::sync::Mutex<Vec<IpAddr>>> = std::sync::Arc::default();
    let seen = open.clone();
    tokio::spawn(async move {
        while let Ok((mut tcp, peer)) = node.accept().await {
            let open = seen.clone();
            tokio::spawn(async move {
                if open.lock().unwrap().contains(&peer.ip()) {
                    return; // a second connection from one address: refused (closed)
                }
                open.lock().unwrap().push(peer.ip());
                let _ = tcp.write_all(peer.ip().to_string().as_bytes()).await;
                let _ = tcp.write_all(b"\n").await;
                let mut buf = [0u8; 64];
                while matches!(tcp.read(&mut buf).await, Ok(n) if n > 0) {}
                open.lock().unwrap().retain(|ip| *ip != peer.ip());
            });
        }
    });
    let d = deploy_to("quic", true, "", "", target).await;
    let route = d.sentry.route("p2p");
    // Two clients from two loopback addresses (the sentry sees them as they are).
    let from = |ip: [u8; 4]| async move {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::from((ip, 0))).unwrap();
        let mut tcp = socket.connect(route).await.unwrap();
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while tokio::time::timeout(PATIENCE, tcp.read_exact(&mut byte))
            .await
            .is_ok_and(|r| r.is_ok())
            && byte[0] != b'\n'
        {
            line.push(byte[0]);
        }
        (String::from_utf8(line).unwrap(), tcp)
    };
    let (seen_a, a) = from([127, 9, 8, 7]).await;
    let (seen_b, b) = from([127, 6, 5, 4]).await;
    assert_eq!(
        seen_a,
        mapped_source("127.9.8.7".parse().unwrap()).to_string()
    );
    assert_eq!(
        seen_b,
        mapped_source("127.6.5.4".parse().unwrap()).to_string()
    );
    assert_ne!(seen_a, seen_b, "two peers, two addresses, both accepted");
    drop(a);
    // Stable across reconnects.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (again, _a2) = from([127, 9, 8, 7]).await;
    assert_eq!(again, seen_a);
    // The agent's table turns the node's address back into the client.
    let metrics = d.agent.metrics_addr().unwrap();
    let (status, table) = http_get(metrics, "/peers");
    assert_eq!(status, 200);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with(&format!("{seen_a} 127.9.8.7 p2p 1 2 "))),
        "{table}"
    );
    assert!(
        table
            .lines()
            .any(|l| l.starts_with(&format!("{seen_b} 127.6.5.4 p2p "))),
        "{table}"
    );
    drop(b);
}

/// An idle WireGuard tunnel stays up on the agent's side too. WireGuard answers no keepalive,
/// so before the sentry sent keepalives of its own, an agent that heard nothing for its
/// liveness (15 s) counted the tunnel down, failed its node's outbound connections, and
/// rebuilt the tunnel 30 s later, idle tunnel after idle tunnel (found by the egress bench).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_wireguard_tunnel_stays_up_for_the_agent_and_carries_egress() {
    let echo = echo_service().await;
    let proxy = free_port();
    let d = deploy("wireguard", true, "", &socks(proxy)).await;
    let proxy = d.bound(proxy);
    // Past the agent's liveness, with nothing relayed.
    tokio::time::sleep(Duration::from_secs(18)).await;
    let metrics = d.agent.render_metrics();
    let up = metric(
        &metrics,
        "sentry_agent_tunnel_up",
        &[
            (
                "sentry",
                &d.sentry.handle.wireguard_addr().unwrap().to_string(),
            ),
            ("transport", "wireguard"),
        ],
    );
    assert_eq!(up, Some(1.0), "{metrics}");
    let (code, mut tcp) = socks5(proxy, "127.0.0.1", echo.port()).await;
    assert_eq!(code, 0, "egress after an idle spell");
    echo_once(&mut tcp, b"still there").await;
}

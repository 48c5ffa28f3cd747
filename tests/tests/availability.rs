//! The real-network tier for availability: one agent behind the NAT keeps a tunnel to each of
//! three sentries (two over QUIC, one over WireGuard) and serves clients of all three; a
//! sentry that dies takes only its own clients with it, and serves again once it restarts.
//! A router that drops UDP sends the agent to its TLS fallback (and back to QUIC when UDP
//! returns); a UDP route carries datagrams through the NAT to the right clients.
//!
//! Needs root, `ip`, `iptables` and `conntrack` (see `tests/src/netns.rs`); skipped outside
//! CI without them.
#![allow(clippy::unwrap_used)]
// Plain threads and deadlines here, outside the daemon: the clock rule is for relay-core.
#![allow(clippy::disallowed_methods)]

use std::io::{Read, Write};
use std::net::{SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use relay_core::keys::{PrivateKey, write_private_key};
use rustix::process::Signal;
use tests::daemon::Daemon;
use tests::netns::{Host, SENTRY, Topology, VALIDATOR};
use tests::{http_get, metric, stand_in};

const PATIENCE: Duration = Duration::from_secs(30);
const P2P_PORT: u16 = 7100;
const METRICS_PORT: u16 = 9100;
/// Each client loop stops by itself after this long, whatever the test does.
const CLIENT_LIMIT: Duration = Duration::from_secs(120);

/// One of the three sentries: its ports and how the agent reaches it.
struct Spec {
    quic: u16,
    route: u16,
    /// `Some(udp port)` for the WireGuard one.
    wireguard: Option<u16>,
}

const SPECS: [Spec; 3] = [
    Spec {
        quic: 7443,
        route: 7101,
        wireguard: None,
    },
    Spec {
        quic: 7444,
        route: 7102,
        wireguard: None,
    },
    Spec {
        quic: 7445,
        route: 7103,
        wireguard: Some(51820),
    },
];

fn public(port: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(SENTRY, port))
}

/// Writes the three sentry configs and the agent's; their paths.
fn write_configs(t: &Topology) -> (Vec<PathBuf>, PathBuf) {
    let agent_key = PrivateKey::generate().unwrap();
    write_private_key(&t.dir().join("agent.key"), &agent_key).unwrap();
    let mut agent = format!(
        "[agent]\nname = \"validator-1\"\nprivate_key = \"agent.key\"\nmetrics_listen = \"{}\"\n",
        SocketAddrV4::new(VALIDATOR, METRICS_PORT)
    );
    let mut sentries = Vec::new();
    for (i, spec) in SPECS.iter().enumerate() {
        let key = PrivateKey::generate().unwrap();
        write_private_key(&t.dir().join(format!("sentry{i}.key")), &key).unwrap();
        let mut text = format!(
            "[sentry]\nprivate_key = \"sentry{i}.key\"\nquic_listen = \"{}\"\n",
            public(spec.quic)
        );
        if let Some(wg) = spec.wireguard {
            text += &format!(
                "wireguard_listen = \"{}\"\nwireguard_address = \"100.64.0.1\"\n",
                public(wg)
            );
        }
        text += &format!(
            "\n[[agent]]\nname = \"validator-1\"\npublic_key = \"{}\"\n",
            agent_key.public_key()
        );
        if spec.wireguard.is_some() {
            text += "wireguard_address = \"100.64.0.2\"\n";
        }
        text += &format!(
            "\n[[route]]\nname = \"p2p\"\nlisten = \"{}\"\nupstream = [\"validator-1/p2p\"]\n\
             max_connections_per_ip = 256\nconnect_rate_per_ip = \"1000/s\"\n",
            public(spec.route)
        );
        let path = t.dir().join(format!("sentry{i}.toml"));
        std::fs::write(&path, text).unwrap();
        sentries.push(path);
        agent += &match spec.wireguard {
            None => format!(
                "\n[[sentry]]\naddress = \"{}\"\npublic_key = \"{}\"\ntransport = \"quic\"\n",
                public(spec.quic),
                key.public_key()
            ),
            Some(wg) => format!(
                "\n[[sentry]]\naddress = \"{}\"\npublic_key = \"{}\"\ntransport = \"wireguard\"\n\
                 wireguard_address = \"100.64.0.2\"\nsentry_wireguard_address = \"100.64.0.1\"\n",
                public(wg),
                key.public_key()
            ),
        };
    }
    agent += &format!(
        "\n[[service]]\nname = \"p2p\"\ntarget = \"{}\"\n",
        SocketAddrV4::new(VALIDATOR, P2P_PORT)
    );
    let agent_path = t.dir().join("agent.toml");
    std::fs::write(&agent_path, agent).unwrap();
    (sentries, agent_path)
}

/// A client of one sentry: round trips on a held connection, and a new connection every tenth
/// one, until stopped (or [`CLIENT_LIMIT`]). Counts what worked and what failed.
struct Client {
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Client {
    fn start(t: &Topology, port: u16) -> Self {
        let (ok, failed, stop) = (
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicBool::new(false)),
        );
        let ns = t.ns(Host::Client);
        let (ok2, failed2, stop2) = (ok.clone(), failed.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            tests::netns::enter_ns(&ns);
            let started = Instant::now();
            let mut held: Option<TcpStream> = None;
            let mut n = 0u64;
            while !stop2.load(Ordering::Relaxed) && started.elapsed() < CLIENT_LIMIT {
                n += 1;
                if n.is_multiple_of(10) {
                    held = None;
                }
                let worked = round_trip(&mut held, public(port), n);
                if worked {
                    ok2.fetch_add(1, Ordering::Relaxed);
                } else {
                    failed2.fetch_add(1, Ordering::Relaxed);
                    held = None;
                    std::thread::sleep(Duration::from_millis(100));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        Self {
            ok,
            failed,
            stop,
            thread: Some(thread),
        }
    }

    fn counts(&self) -> (u64, u64) {
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// One echo round trip on `held` (connecting first when there is none).
fn round_trip(held: &mut Option<TcpStream>, to: SocketAddr, n: u64) -> bool {
    if held.is_none() {
        let Ok(tcp) = TcpStream::connect_timeout(&to, Duration::from_secs(2)) else {
            return false;
        };
        let _ = tcp.set_read_timeout(Some(Duration::from_secs(5)));
        let _ = tcp.set_write_timeout(Some(Duration::from_secs(5)));
        *held = Some(tcp);
    }
    let tcp = held.as_mut().unwrap();
    let message = format!("request {n}");
    if tcp.write_all(message.as_bytes()).is_err() {
        return false;
    }
    let mut buf = vec![0u8; message.len()];
    tcp.read_exact(&mut buf).is_ok() && buf == message.as_bytes()
}

/// Wait (bounded) until `client` counts `more` successes beyond what it had.
fn wait_progress(client: &Client, more: u64) -> bool {
    let from = client.counts().0;
    let deadline = Instant::now() + PATIENCE;
    while Instant::now() < deadline {
        if client.counts().0 >= from + more {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// The agent's `agent_tunnel_up` for each sentry, once all three are up or [`PATIENCE`]
/// passed (a sentry logs "tunnel up" a moment before the agent's side of WireGuard knows it).
fn tunnels_up(t: &Topology) -> Vec<Option<f64>> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let up = tunnels_up_now(t);
        if up == [Some(1.0); 3] || Instant::now() > deadline {
            return up;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The agent's `agent_tunnel_up` for each sentry now, by the address it dials.
fn tunnels_up_now(t: &Topology) -> Vec<Option<f64>> {
    let (_, text) = t.enter(Host::Validator, || {
        http_get(
            SocketAddr::V4(SocketAddrV4::new(VALIDATOR, METRICS_PORT)),
            "/metrics",
        )
    });
    SPECS
        .iter()
        .map(|spec| {
            let (addr, transport) = match spec.wireguard {
                None => (public(spec.quic), "quic"),
                Some(wg) => (public(wg), "wireguard"),
            };
            metric(
                &text,
                "sentry_agent_tunnel_up",
                &[("sentry", &addr.to_string()), ("transport", transport)],
            )
        })
        .collect()
}

#[test]
fn three_sentries_one_agent_and_one_sentry_dies() {
    let Some(t) = Topology::new() else { return };
    let service = stand_in::echo(t.enter(Host::Validator, || {
        TcpListener::bind(SocketAddrV4::new(VALIDATOR, P2P_PORT)).unwrap()
    }));
    let (sentry_paths, agent_path) = write_configs(&t);
    let mut sentries: Vec<Option<Daemon>> = sentry_paths
        .iter()
        .map(|p| Some(t.daemon(Host::Sentry, "serve", p)))
        .collect();
    let agent = t.daemon(Host::Validator, "agent", &agent_path);
    for sentry in sentries.iter().flatten() {
        sentry.wait_event("tunnel up", &[("agent", "validator-1")], 0, PATIENCE);
    }
    assert_eq!(
        tunnels_up(&t),
        [Some(1.0); 3],
        "the agent's metrics should show all three tunnels up"
    );

    let clients: Vec<Client> = SPECS.iter().map(|s| Client::start(&t, s.route)).collect();
    for (i, client) in clients.iter().enumerate() {
        assert!(
            wait_progress(client, 20),
            "sentry {i}'s clients are not served"
        );
    }

    // Sentry 1 dies without a word.
    let mut dead = sentries[1].take().unwrap();
    dead.signal(Signal::KILL);
    dead.wait_exit(Duration::from_secs(5));
    drop(dead);
    let before: Vec<(u64, u64)> = clients.iter().map(Client::counts).collect();
    // The others go on serving their clients meanwhile, without one failed request.
    for i in [0, 2] {
        assert!(
            wait_progress(&clients[i], 50),
            "sentry {i}'s clients stopped being served when sentry 1 died"
        );
    }
    let wait = Instant::now();
    while clients[1].counts().1 == before[1].1 && wait.elapsed() < PATIENCE {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        clients[1].counts().1 > before[1].1,
        "sentry 1's clients should fail while it is dead"
    );

    // Sentry 1 comes back (same key, same config): the agent reconnects by itself and its
    // clients are served again.
    let restarted = t.daemon(Host::Sentry, "serve", &sentry_paths[1]);
    restarted.wait_event(
        "tunnel up",
        &[("agent", "validator-1")],
        0,
        Duration::from_secs(60),
    );
    sentries[1] = Some(restarted);
    assert!(
        wait_progress(&clients[1], 20),
        "sentry 1's clients were not served again after it restarted"
    );
    assert_eq!(tunnels_up(&t), [Some(1.0); 3]);

    let counts: Vec<(u64, u64)> = clients.iter().map(Client::counts).collect();
    drop(clients);
    eprintln!("round trips (ok, failed) by sentry: {counts:?}");
    for i in [0, 2] {
        assert_eq!(
            counts[i].1,
            0,
            "sentry {i}'s clients saw failures though only sentry 1 died:\n{}",
            agent.log()
        );
    }
    drop((sentries, agent, service));
}

/// The router drops all UDP, as some networks do: an agent that lists a sentry over QUIC
/// first and over TCP+TLS second falls back to TLS and serves, hash-checked both ways.
#[test]
fn udp_blocked_at_the_router_falls_back_to_tls() {
    const QUIC: u16 = 7446;
    const TLS: u16 = 7447;
    const ROUTE: u16 = 7104;
    let Some(t) = Topology::new() else { return };
    t.iptables(&["-I", "FORWARD", "-p", "udp", "-j", "DROP"]);
    let service = stand_in::echo(t.enter(Host::Validator, || {
        TcpListener::bind(SocketAddrV4::new(VALIDATOR, P2P_PORT)).unwrap()
    }));
    let (sentry_path, agent_path) = write_pair(
        &t,
        |agent_key| {
            format!(
                "[sentry]\nprivate_key = \"sentry.key\"\nquic_listen = \"{}\"\ntls_listen = \"{}\"\n\n\
                 [[agent]]\nname = \"validator-1\"\npublic_key = \"{agent_key}\"\n\n\
                 [[route]]\nname = \"p2p\"\nlisten = \"{}\"\nupstream = [\"validator-1/p2p\"]\n",
                public(QUIC),
                public(TLS),
                public(ROUTE)
            )
        },
        |key| {
            format!(
                "[agent]\nname = \"validator-1\"\nprivate_key = \"agent.key\"\nmetrics_listen = \"{}\"\n\n\
                 [[sentry]]\naddress = \"{}\"\npublic_key = \"{key}\"\ntransport = \"quic\"\n\n\
                 [[sentry]]\naddress = \"{}\"\npublic_key = \"{key}\"\ntransport = \"tls\"\n\n\
                 [[service]]\nname = \"p2p\"\ntarget = \"{}\"\n",
                SocketAddrV4::new(VALIDATOR, METRICS_PORT),
                public(QUIC),
                public(TLS),
                SocketAddrV4::new(VALIDATOR, P2P_PORT),
            )
        },
    );
    let sentry = t.daemon(Host::Sentry, "serve", &sentry_path);
    let agent = t.daemon(Host::Validator, "agent", &agent_path);
    // QUIC gets no answer (its handshake times out), then TLS comes up.
    sentry.wait_event(
        "tunnel up",
        &[("agent", "validator-1"), ("transport", "tls")],
        0,
        Duration::from_secs(60),
    );
    assert!(
        agent.count_log("falling back to the sentry's next transport") >= 1,
        "{}",
        agent.log()
    );
    // The agent counts the tunnel up a moment after the sentry does (on the sentry's first
    // frame), so its metrics are read until they agree (bounded).
    let up = |address: SocketAddr, transport: &str| {
        let (_, text) = t.enter(Host::Validator, || {
            http_get(
                SocketAddr::V4(SocketAddrV4::new(VALIDATOR, METRICS_PORT)),
                "/metrics",
            )
        });
        metric(
            &text,
            "sentry_agent_tunnel_up",
            &[("sentry", &address.to_string()), ("transport", transport)],
        )
    };
    let deadline = Instant::now() + PATIENCE;
    while up(public(TLS), "tls") != Some(1.0) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(up(public(TLS), "tls"), Some(1.0));
    assert_eq!(up(public(QUIC), "quic"), Some(0.0));

    // Hash-checked transfers both ways at once, several connections side by side.
    let ns = t.ns(Host::Client);
    let transfers: Vec<_> = (0..4u64)
        .map(|i| {
            let ns = ns.clone();
            std::thread::spawn(move || {
                tests::netns::enter_ns(&ns);
                let tcp = TcpStream::connect_timeout(&public(ROUTE), PATIENCE).unwrap();
                tcp.set_read_timeout(Some(PATIENCE)).unwrap();
                let len = 8 * 1024 * 1024 + usize::try_from(i).unwrap() * 4099;
                stand_in::echo_roundtrip(tcp, 40 + i, len).unwrap()
            })
        })
        .collect();
    for (i, transfer) in transfers.into_iter().enumerate() {
        assert!(
            transfer.join().unwrap(),
            "transfer {i} came back corrupted or short"
        );
    }
    // And ordinary round trips keep working over the fallback.
    let client = Client::start(&t, ROUTE);
    assert!(wait_progress(&client, 30), "{}", agent.log());
    let (_, failed) = client.counts();
    drop(client);
    assert_eq!(failed, 0, "{}", agent.log());

    // UDP comes back: within a probe interval (30 s) the agent moves the tunnel to QUIC, and
    // a connection relayed over TLS before the move keeps working after it.
    let held = t.enter(Host::Client, || {
        TcpStream::connect_timeout(&public(ROUTE), PATIENCE).unwrap()
    });
    held.set_read_timeout(Some(PATIENCE)).unwrap();
    assert!(round_trip(
        &mut Some(held.try_clone().unwrap()),
        public(ROUTE),
        1
    ));
    t.iptables(&["-D", "FORWARD", "-p", "udp", "-j", "DROP"]);
    sentry.wait_event(
        "tunnel up",
        &[("agent", "validator-1"), ("transport", "quic")],
        0,
        Duration::from_secs(60),
    );
    assert!(
        round_trip(&mut Some(held), public(ROUTE), 2),
        "a connection relayed over TLS broke when the tunnel moved to QUIC:\n{}",
        agent.log()
    );
    let client = Client::start(&t, ROUTE);
    assert!(wait_progress(&client, 30), "{}", agent.log());
    drop(client);
    drop((sentry, agent, service));
}

/// A UDP route through the NAT: a datagram echo beside the validator answers clients through
/// the sentry, each reply to the client that sent the datagram, many clients at once; quiet
/// flows are forgotten.
#[test]
fn udp_datagrams_cross_the_nat_to_the_right_clients_and_flows_expire() {
    const QUIC: u16 = 7448;
    const DISCOVERY: u16 = 30303;
    const SENTRY_METRICS: u16 = 9101;
    let Some(t) = Topology::new() else { return };
    let echo = t.enter(Host::Validator, || {
        std::net::UdpSocket::bind(SocketAddrV4::new(VALIDATOR, DISCOVERY)).unwrap()
    });
    echo.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let echo_stop = Arc::new(AtomicBool::new(false));
    let echo_thread = {
        let stop = echo_stop.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 65_536];
            while !stop.load(Ordering::Relaxed) {
                if let Ok((n, from)) = echo.recv_from(&mut buf) {
                    let _ = echo.send_to(&buf[..n], from);
                }
            }
        })
    };
    let (sentry_path, agent_path) = write_pair(
        &t,
        |agent_key| {
            format!(
                "[sentry]\nprivate_key = \"sentry.key\"\nquic_listen = \"{}\"\nmetrics_listen = \"{}\"\n\n\
                 [[agent]]\nname = \"validator-1\"\npublic_key = \"{agent_key}\"\n\n\
                 [[route]]\nname = \"discovery\"\nlisten = \"{}\"\nprotocol = \"udp\"\n\
                 upstream = [\"validator-1/discovery\"]\nidle_timeout = \"2s\"\n\
                 max_connections_per_ip = 64\nconnect_rate_per_ip = \"1000/s\"\n",
                public(QUIC),
                public(SENTRY_METRICS),
                public(DISCOVERY)
            )
        },
        |key| {
            format!(
                "[agent]\nname = \"validator-1\"\nprivate_key = \"agent.key\"\n\n\
                 [[sentry]]\naddress = \"{}\"\npublic_key = \"{key}\"\n\n\
                 [[service]]\nname = \"discovery\"\ntarget = \"{}\"\nprotocol = \"udp\"\n",
                public(QUIC),
                SocketAddrV4::new(VALIDATOR, DISCOVERY),
            )
        },
    );
    let sentry = t.daemon(Host::Sentry, "serve", &sentry_path);
    let agent = t.daemon(Host::Validator, "agent", &agent_path);
    sentry.wait_event("tunnel up", &[("agent", "validator-1")], 0, PATIENCE);

    // 16 clients at once, 25 datagrams each, every one different; a reply must be the
    // datagram its client sent. One loss per client is allowed (UDP), not a wrong reply.
    let ns = t.ns(Host::Client);
    let clients: Vec<_> = (0..16u32)
        .map(|c| {
            let ns = ns.clone();
            std::thread::spawn(move || {
                tests::netns::enter_ns(&ns);
                let socket = std::net::UdpSocket::bind("203.0.113.10:0").unwrap();
                socket
                    .set_read_timeout(Some(Duration::from_secs(2)))
                    .unwrap();
                let mut lost = 0;
                let mut buf = vec![0u8; 65_536];
                for seq in 0..25u32 {
                    let datagram =
                        format!("client {c} datagram {seq} ").repeat(1 + (c as usize % 7));
                    socket
                        .send_to(datagram.as_bytes(), public(DISCOVERY))
                        .unwrap();
                    match socket.recv_from(&mut buf) {
                        Ok((n, from)) => {
                            assert_eq!(from, public(DISCOVERY));
                            assert_eq!(
                                &buf[..n],
                                datagram.as_bytes(),
                                "client {c} got another's reply"
                            );
                        }
                        Err(_) => lost += 1,
                    }
                }
                lost
            })
        })
        .collect();
    for (c, client) in clients.into_iter().enumerate() {
        let lost = client.join().unwrap();
        assert!(
            lost <= 1,
            "client {c} lost {lost} of 25 datagrams:\n{}",
            agent.log()
        );
    }
    let active = || {
        let (_, text) = t.enter(Host::Sentry, || {
            http_get(public(SENTRY_METRICS), "/metrics")
        });
        metric(
            &text,
            "sentry_route_connections_active",
            &[("route", "discovery")],
        )
    };
    assert_eq!(active(), Some(16.0), "one flow per client");
    // Quiet past idle_timeout (2 s): every flow is forgotten.
    let forgotten = Instant::now();
    while active() != Some(0.0) && forgotten.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(active(), Some(0.0), "flows outlived their idle timeout");
    echo_stop.store(true, Ordering::Relaxed);
    echo_thread.join().unwrap();
    drop((sentry, agent));
}

/// Keys for one sentry and one agent in the test's directory (`sentry.key`, `agent.key`) and
/// their configs: `sentry` is given the agent's public key, `agent` the sentry's. The paths
/// of `sentry.toml` and `agent.toml`.
fn write_pair(
    t: &Topology,
    sentry: impl FnOnce(&str) -> String,
    agent: impl FnOnce(&str) -> String,
) -> (PathBuf, PathBuf) {
    let (sentry_key, agent_key) = (
        PrivateKey::generate().unwrap(),
        PrivateKey::generate().unwrap(),
    );
    write_private_key(&t.dir().join("sentry.key"), &sentry_key).unwrap();
    write_private_key(&t.dir().join("agent.key"), &agent_key).unwrap();
    let paths = (t.dir().join("sentry.toml"), t.dir().join("agent.toml"));
    std::fs::write(&paths.0, sentry(&agent_key.public_key().to_string())).unwrap();
    std::fs::write(&paths.1, agent(&sentry_key.public_key().to_string())).unwrap();
    paths
}

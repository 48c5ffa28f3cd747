//! The hidden validator over the real network: a validator host that can reach nothing but
//! its sentry's tunnel port still dials public peers (through the sentry, by a transparent
//! redirect, SOCKS5 and a fixed forward), every peer sees only the sentry's address, egress
//! fails over to a second sentry, and the node tells its relayed peers apart.
//!
//! The firewall rules on the validator host are the ones `docs/hidden-validator.md` documents,
//! read from it, so the documented blocks are the tested ones.

use std::net::{IpAddr, Ipv4Addr};

use super::*;
use tests::stand_in::{http_teller, teller, told};

/// The public peer the node dials (on the client host), and its HTTP twin for curl.
const PEER_PORT: u16 = 8100;
const WEB_PORT: u16 = 8180;
/// The agent's egress listeners.
const TRANSPARENT: u16 = 7199;
const SOCKS: u16 = 7198;
const FORWARD: u16 = 7197;
/// The node's user on the validator host (nobody): the redirect rule matches it alone.
const NODE_UID: u32 = 65534;
/// A second public address of the sentry host (a second sentry), and of the client host.
const SENTRY_B: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 3);
const CLIENT_B: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 11);
/// The agent's metrics listener on the validator host.
const AGENT_METRICS: u16 = 9901;

fn peer() -> SocketAddr {
    SocketAddr::from((CLIENT, PEER_PORT))
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A fenced block of `docs/hidden-validator.md` between `<!-- {marker}-begin -->` and
/// `-end -->`, with each `define NAME = ...` line given the test's value.
fn documented_nft(marker: &str, values: &[(&str, String)]) -> String {
    let doc = std::fs::read_to_string(tests::repo_root().join("docs/hidden-validator.md")).unwrap();
    let begin = format!("<!-- {marker}-begin -->");
    let end = format!("<!-- {marker}-end -->");
    let block = &doc[doc.find(&begin).unwrap() + begin.len()..doc.find(&end).unwrap()];
    let body = block
        .trim()
        .strip_prefix("```nft")
        .and_then(|b| b.strip_suffix("```"))
        .expect("a fenced nft block");
    body.lines()
        .map(|line| {
            match values
                .iter()
                .find(|(name, _)| line.starts_with(&format!("define {name} =")))
            {
                Some((name, value)) => format!("define {name} = {value}"),
                None => line.to_owned(),
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Load an nft ruleset into `host`.
fn nft(t: &Topology, host: Host, rules: &str) {
    let path = t.dir().join(format!("{host:?}-{}.nft", rules.len()));
    std::fs::write(&path, rules).unwrap();
    t.sh(host, &["nft", "-f", path.to_str().unwrap()]);
}

/// The router lets nothing out of the LAN but UDP to the sentries' tunnel port.
fn lock_down_router(t: &Topology, sentries: &[Ipv4Addr]) {
    for (i, sentry) in sentries.iter().enumerate() {
        let rule = (i + 1).to_string();
        t.iptables(&[
            "-I",
            "FORWARD",
            &rule,
            "-i",
            "lan",
            "-o",
            "pub",
            "-p",
            "udp",
            "-d",
            &sentry.to_string(),
            "--dport",
            &QUIC_PORT.to_string(),
            "-j",
            "ACCEPT",
        ]);
    }
    let after = (sentries.len() + 1).to_string();
    t.iptables(&[
        "-I", "FORWARD", &after, "-i", "lan", "-o", "pub", "-j", "DROP",
    ]);
}

/// Sentry config text: agent `validator-1` (key `agent.key`) with egress, QUIC on `at`.
fn sentry_toml(t: &Topology, key: &str, at: Ipv4Addr, agent_pub: &str, egress: &str) -> PathBuf {
    let text = format!(
        "[sentry]\nprivate_key = \"{key}.key\"\nquic_listen = \"{at}:{QUIC_PORT}\"\n\
         metrics_listen = \"127.0.0.1:9900\"\n\n\
         [[agent]]\nname = \"validator-1\"\npublic_key = \"{agent_pub}\"\negress = true\n\n\
         [[route]]\nname = \"p2p\"\nlisten = \"{at}:{P2P_PORT}\"\nupstream = [\"validator-1/p2p\"]\n\
         max_connections_per_ip = 256\nconnect_rate_per_ip = \"1000/s\"\n\n[egress]\n{egress}\n"
    );
    let path = t.dir().join(format!("{key}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

/// Agent config text: its sentries (address, public key), the P2P service at `p2p`, and the
/// three egress listeners.
fn agent_toml(t: &Topology, sentries: &[(Ipv4Addr, String)], p2p: SocketAddr) -> PathBuf {
    let mut text = format!(
        "[agent]\nname = \"validator-1\"\nprivate_key = \"agent.key\"\n\
         metrics_listen = \"127.0.0.1:{AGENT_METRICS}\"\n"
    );
    for (address, key) in sentries {
        text +=
            &format!("\n[[sentry]]\naddress = \"{address}:{QUIC_PORT}\"\npublic_key = \"{key}\"\n");
    }
    text += &format!(
        "\n[[service]]\nname = \"p2p\"\ntarget = \"{p2p}\"\n\n\
         [[egress]]\nlisten = \"{}\"\nmode = \"transparent\"\n\n\
         [[egress]]\nlisten = \"{}\"\nmode = \"socks5\"\n\n\
         [[egress]]\nlisten = \"{}\"\nmode = \"forward\"\nto = \"{}\"\n",
        loopback(TRANSPARENT),
        loopback(SOCKS),
        loopback(FORWARD),
        peer()
    );
    let path = t.dir().join("agent.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// The sentry and the agent (the P2P service on the validator's loopback, the three egress
/// listeners), started; returns once both see the tunnel up.
fn one_sentry_and_agent(t: &Topology) -> (Daemon, Daemon) {
    let sentry_pub = key_file(t, "sentry.key");
    let agent_pub = key_file(t, "agent.key");
    let sentry_toml = sentry_toml(t, "sentry", SENTRY, &agent_pub, "");
    let agent_toml = agent_toml(t, &[(SENTRY, sentry_pub)], loopback(P2P_PORT));
    let sentry = t.daemon(Host::Sentry, "serve", &sentry_toml);
    sentry.wait_log("sentry ready", 1, PATIENCE);
    let agent = t.daemon(Host::Validator, "agent", &agent_toml);
    sentry.wait_log("tunnel up", 1, PATIENCE);
    agent.wait_log("tunnel up", 1, PATIENCE);
    (sentry, agent)
}

/// Connect to `to` from the validator host as the node's user, read whom the peer saw, and
/// send 8 MiB through its echo, hash-checked both ways.
fn as_node(t: &Topology, to: SocketAddr) -> (String, bool) {
    t.enter(Host::Validator, || {
        rustix::thread::set_thread_uid(rustix::process::Uid::from_raw(NODE_UID)).unwrap();
        let mut tcp = TcpStream::connect_timeout(&to, PATIENCE).unwrap();
        tcp.set_read_timeout(Some(PATIENCE)).unwrap();
        let seen = told(&mut tcp).unwrap();
        (seen, echo_roundtrip(tcp, 11, 8 << 20).unwrap())
    })
}

/// A SOCKS5 CONNECT from the validator host (no authentication): the reply code and, when
/// it is 0, the connection.
fn socks5(t: &Topology, to: SocketAddr) -> (u8, Option<TcpStream>) {
    t.enter(Host::Validator, || {
        let mut tcp = TcpStream::connect_timeout(&loopback(SOCKS), PATIENCE).unwrap();
        tcp.set_read_timeout(Some(PATIENCE)).unwrap();
        tcp.write_all(&[5, 1, 0]).unwrap();
        let mut chosen = [0u8; 2];
        tcp.read_exact(&mut chosen).unwrap();
        let SocketAddr::V4(to) = to else {
            panic!("IPv4 only")
        };
        let mut request = vec![5, 1, 0, 1];
        request.extend_from_slice(&to.ip().octets());
        request.extend_from_slice(&to.port().to_be_bytes());
        tcp.write_all(&request).unwrap();
        let mut reply = [0u8; 10];
        tcp.read_exact(&mut reply).unwrap();
        (reply[1], (reply[1] == 0).then_some(tcp))
    })
}

/// A counter of the sentry's `/metrics` (inside the sentry host).
fn sentry_counter(t: &Topology, name: &str, labels: &[(&str, &str)]) -> f64 {
    let (_, text) = t.enter(Host::Sentry, || tests::http_get(loopback(9900), "/metrics"));
    tests::metric(&text, name, labels).unwrap_or(0.0)
}

/// With the router and the validator host's own firewall letting nothing out but UDP to the
/// sentry, the node's connections still reach a public peer through a transparent redirect
/// (the documented nftables rule), SOCKS5 (curl, a name only the sentry resolves) and a fixed
/// forward, each arriving from the sentry's address, hash-checked both ways. Destinations the
/// policy refuses (the sentry's own address, a private range) are refused before any dial.
#[test]
fn a_locked_down_validator_dials_out_only_through_the_sentry() {
    let Some(t) = Topology::new() else { return };
    if !tests::tool_available("nft", &["--version"], "the egress test")
        || !tests::tool_available("curl", &["--version"], "the egress test")
    {
        return;
    }
    let _peer = teller(listen(&t, Host::Client, peer()));
    let _web = http_teller(listen(
        &t,
        Host::Client,
        SocketAddr::from((CLIENT, WEB_PORT)),
    ));
    let _p2p = stand_in::echo(listen(&t, Host::Validator, loopback(P2P_PORT)));
    lock_down_router(&t, &[SENTRY]);
    nft(
        &t,
        Host::Validator,
        &documented_nft(
            "nft-lockdown",
            &[
                ("sentries", format!("{{ {SENTRY} }}")),
                ("tunnel_ports", format!("{{ {QUIC_PORT} }}")),
            ],
        ),
    );
    nft(
        &t,
        Host::Validator,
        &documented_nft(
            "nft-redirect",
            &[
                ("node_user", NODE_UID.to_string()),
                ("egress_port", TRANSPARENT.to_string()),
            ],
        ),
    );
    // Nothing leaves the validator host but the tunnel: a direct dial goes nowhere (here the
    // agent is not running, so the redirect finds no listener either).
    let direct = t.enter(Host::Validator, || {
        TcpStream::connect_timeout(&peer(), Duration::from_secs(2))
    });
    assert!(
        direct.is_err(),
        "the validator dialed a public host directly"
    );
    let direct_root = t.enter(Host::Validator, || {
        TcpStream::connect_timeout(
            &SocketAddr::from((CLIENT, WEB_PORT)),
            Duration::from_secs(2),
        )
    });
    assert!(
        direct_root.is_err(),
        "the locked-down host reached the public segment"
    );

    // A name only the sentry host can resolve: the validator host has no DNS at all.
    let hosts_dir = PathBuf::from("/etc/netns").join(t.ns(Host::Sentry));
    std::fs::create_dir_all(&hosts_dir).unwrap();
    std::fs::write(
        hosts_dir.join("hosts"),
        format!("127.0.0.1 localhost\n{CLIENT} peer.example\n"),
    )
    .unwrap();
    struct Cleanup(PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _cleanup = Cleanup(hosts_dir);

    let (_sentry, _agent) = one_sentry_and_agent(&t);

    // Transparent: the node dials the peer's own address; the redirect brings it to the agent.
    let (seen, intact) = as_node(&t, peer());
    assert_eq!(seen, SENTRY.to_string(), "the peer saw the validator");
    assert!(
        intact,
        "8 MiB through the transparent egress came back altered"
    );
    // Forward: the one destination.
    let (seen, intact) = t.enter(Host::Validator, || {
        let mut tcp = TcpStream::connect_timeout(&loopback(FORWARD), PATIENCE).unwrap();
        tcp.set_read_timeout(Some(PATIENCE)).unwrap();
        let seen = told(&mut tcp).unwrap();
        (seen, echo_roundtrip(tcp, 12, 8 << 20).unwrap())
    });
    assert_eq!(seen, SENTRY.to_string());
    assert!(intact);
    // SOCKS5, our own client, hash-checked.
    let (code, tcp) = socks5(&t, peer());
    assert_eq!(code, 0);
    let mut tcp = tcp.unwrap();
    assert_eq!(told(&mut tcp).unwrap(), SENTRY.to_string());
    assert!(echo_roundtrip(tcp, 13, 8 << 20).unwrap());
    // SOCKS5, a real client (curl), by a name the sentry resolves.
    let out = t.try_sh(
        Host::Validator,
        &[
            "curl",
            "-sS",
            "--max-time",
            "20",
            "--socks5-hostname",
            &loopback(SOCKS).to_string(),
            &format!("http://peer.example:{WEB_PORT}/"),
        ],
    );
    assert!(
        out.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), SENTRY.to_string());
    assert_eq!(
        sentry_counter(
            &t,
            "sentry_egress_connections_total",
            &[("agent", "validator-1")]
        ),
        4.0
    );

    // Refused by the sentry's policy before any packet leaves it.
    let (code, _) = socks5(&t, SocketAddr::from((SENTRY, 9900)));
    assert_eq!(code, 2, "the sentry's own address");
    let (code, _) = socks5(&t, SocketAddr::from(([10, 9, 9, 9], 80)));
    assert_eq!(code, 2, "a private range");
    for (reason, n) in [("own_address", 1.0), ("private_range", 1.0)] {
        assert_eq!(
            sentry_counter(
                &t,
                "sentry_egress_refused_total",
                &[("agent", "validator-1"), ("reason", reason)]
            ),
            n,
            "{reason}"
        );
    }
    // A connection that was not redirected (the agent's own user is not the node's) reaches
    // the transparent listener only by dialing it: refused, not looped back.
    let not_redirected = t.enter(Host::Validator, || {
        // The agent may reset it before the connect call has returned: refused as well.
        let mut tcp = match TcpStream::connect_timeout(&loopback(TRANSPARENT), PATIENCE) {
            Ok(tcp) => tcp,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(e) => panic!("the transparent listener: {e}"),
        };
        tcp.set_read_timeout(Some(PATIENCE)).unwrap();
        let mut buf = [0u8; 1];
        matches!(tcp.read(&mut buf), Ok(0) | Err(_))
    });
    assert!(not_redirected);
}

/// With two sentries, egress goes through the first; when it is killed, new connections go
/// through the second (whose `[egress] source` is its own address), within a bound.
#[test]
fn egress_moves_to_the_second_sentry_when_the_first_dies() {
    let Some(t) = Topology::new() else { return };
    t.sh(
        Host::Sentry,
        &[
            "ip",
            "addr",
            "add",
            &format!("{SENTRY_B}/24"),
            "dev",
            "eth0",
        ],
    );
    let _peer = teller(listen(&t, Host::Client, peer()));
    let _p2p = stand_in::echo(listen(&t, Host::Validator, loopback(P2P_PORT)));
    lock_down_router(&t, &[SENTRY, SENTRY_B]);
    let a_pub = key_file(&t, "a.key");
    let b_pub = key_file(&t, "b.key");
    let agent_pub = key_file(&t, "agent.key");
    let a = sentry_toml(&t, "a", SENTRY, &agent_pub, "");
    let b_egress = format!("source = \"{SENTRY_B}\"\n");
    let b = sentry_toml(&t, "b", SENTRY_B, &agent_pub, &b_egress);
    // Two sentries on one host: the second's metrics elsewhere.
    let b_text = std::fs::read_to_string(&b)
        .unwrap()
        .replace("127.0.0.1:9900", "127.0.0.1:9902");
    std::fs::write(&b, b_text).unwrap();
    let mut sentry_a = t.daemon(Host::Sentry, "serve", &a);
    let sentry_b = t.daemon(Host::Sentry, "serve", &b);
    let agent_toml = agent_toml(
        &t,
        &[(SENTRY, a_pub), (SENTRY_B, b_pub)],
        loopback(P2P_PORT),
    );
    let agent = t.daemon(Host::Validator, "agent", &agent_toml);
    sentry_a.wait_log("tunnel up", 1, PATIENCE);
    sentry_b.wait_log("tunnel up", 1, PATIENCE);
    agent.wait_log("tunnel up", 2, PATIENCE);
    let through = || {
        t.enter(Host::Validator, || {
            let mut tcp = TcpStream::connect_timeout(&loopback(FORWARD), PATIENCE).ok()?;
            tcp.set_read_timeout(Some(PATIENCE)).ok()?;
            let seen = told(&mut tcp).ok()?;
            echo_once(&mut tcp, b"ping").ok()?.then_some(seen)
        })
    };
    assert_eq!(
        through(),
        Some(SENTRY.to_string()),
        "the first sentry first"
    );
    sentry_a.signal(Signal::KILL);
    sentry_a.wait_exit(PATIENCE);
    let moved = wait_until(Duration::from_secs(40), || {
        through() == Some(SENTRY_B.to_string())
    });
    let moved = moved.expect("egress did not move to the second sentry");
    println!("egress moved to the second sentry {moved:?} after the first was killed");
    // And stays there, connection after connection.
    for _ in 0..5 {
        assert_eq!(through(), Some(SENTRY_B.to_string()));
    }
}

/// A node that allows one connection per source address: two public clients from two
/// addresses are two peers to it, each with a stable address of its own, which `sentry status
/// --peers` turns back into the client. And one busy client cannot run its mapped address out
/// of ports: the agent binds no port before it connects.
#[test]
fn two_public_clients_are_two_peers_to_the_node() {
    let Some(t) = Topology::new() else { return };
    t.sh(
        Host::Client,
        &[
            "ip",
            "addr",
            "add",
            &format!("{CLIENT_B}/24"),
            "dev",
            "eth0",
        ],
    );
    let node = per_address_teller(listen(&t, Host::Validator, loopback(P2P_PORT)));
    let (_sentry, _agent) = one_sentry_and_agent(&t);

    let from = |ip: Ipv4Addr| {
        t.enter(Host::Client, || {
            let socket =
                socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            socket.bind(&SocketAddr::from((ip, 0)).into()).unwrap();
            socket
                .connect_timeout(&public(P2P_PORT).into(), PATIENCE)
                .unwrap();
            let mut tcp: TcpStream = socket.into();
            tcp.set_read_timeout(Some(PATIENCE)).unwrap();
            let seen = told(&mut tcp).unwrap();
            (seen, tcp)
        })
    };
    let (seen_a, a) = from(CLIENT);
    let (seen_b, b) = from(CLIENT_B);
    assert_eq!(seen_a, "127.0.113.10");
    assert_eq!(seen_b, "127.0.113.11");
    // Both are held open at once: the node accepted both.
    let mut a = a;
    let mut b = b;
    assert!(echo_once(&mut a, b"a").unwrap() && echo_once(&mut b, b"b").unwrap());
    drop(a);
    assert!(wait_until(PATIENCE, || node.open(&seen_a) == 0).is_some());
    let (again, _a2) = from(CLIENT);
    assert_eq!(again, seen_a, "a reconnecting client keeps its address");

    // The operator's lookup: the address the node logged, back to the client.
    let out = t.try_sh(
        Host::Validator,
        &[
            tests::sentry_bin().to_str().unwrap(),
            "status",
            "--metrics",
            &loopback(AGENT_METRICS).to_string(),
            "--peers",
            "--lookup",
            &seen_b,
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains(&format!("{seen_b}  {CLIENT_B}")), "{text}");
    assert!(!text.contains(&CLIENT.to_string()), "{text}");
    drop(_a2);

    // A hundred ports for the whole validator host, and three hundred connections from one
    // client at 25 a second, each closed by the agent first (its side keeps TIME_WAIT for
    // 60 s). A port bound before connecting is held by its TIME_WAIT: the hundredth would be
    // the last. Chosen at connect, a port in TIME_WAIT is reused for the same destination a
    // second later (loopback's tcp_tw_reuse), so one client never runs its address out.
    t.sh(
        Host::Validator,
        &["sysctl", "-qw", "net.ipv4.ip_local_port_range=40000 40099"],
    );
    let closed = |i: usize| {
        let deadline = Instant::now() + PATIENCE;
        while node.open(&seen_a) > 0 {
            assert!(Instant::now() < deadline, "connection {i} stayed open");
            std::thread::sleep(Duration::from_millis(2));
        }
    };
    closed(0);
    let started = Instant::now();
    for i in 0..300u32 {
        // Paced: the i-th connection no earlier than i × 40 ms.
        let due = started + Duration::from_millis(40) * i;
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
        let (seen, tcp) = from(CLIENT);
        assert_eq!(seen, seen_a, "connection {i}");
        drop(tcp);
        closed(i as usize);
    }
}

/// A node stand-in that allows one connection per source address (as CometBFT with
/// `allow_duplicate_ip = false`, monerod with one connection per IP): it tells the address it
/// saw, then echoes; a second connection from an address with one open is closed at once.
struct PerAddress {
    open: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<IpAddr, usize>>>,
    _stand_in: StandIn,
}

impl PerAddress {
    /// Connections open now from `ip`.
    fn open(&self, ip: &str) -> usize {
        let ip: IpAddr = ip.parse().unwrap();
        self.open.lock().unwrap().get(&ip).copied().unwrap_or(0)
    }
}

fn per_address_teller(listener: std::net::TcpListener) -> PerAddress {
    let open = std::sync::Arc::new(std::sync::Mutex::new(std::collections::HashMap::new()));
    let table = open.clone();
    let stand_in = stand_in::serve_each(listener, move |mut tcp: TcpStream| {
        let Ok(peer) = tcp.peer_addr() else { return };
        {
            let mut open = table.lock().unwrap();
            let n: &mut usize = open.entry(peer.ip()).or_default();
            if *n > 0 {
                return; // refused: this address has a connection already
            }
            *n += 1;
        }
        if writeln!(tcp, "{}", peer.ip()).is_ok() {
            stand_in::echo_to_end(tcp);
        }
        if let Some(n) = table.lock().unwrap().get_mut(&peer.ip()) {
            *n -= 1;
        }
    });
    PerAddress {
        open,
        _stand_in: stand_in,
    }
}

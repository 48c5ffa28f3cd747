//! Faults: NAT rebinding, killed processes, a slow lossy link, failover between agents.

use super::*;

/// Scenario 3: the router forgets the tunnel's mapping and maps the flow to a new public port
/// while connections are open and one is carrying traffic. Expected, and asserted: the agent's
/// next packet (data or a keep-alive, within 5 s) arrives from the new port, the sentry
/// validates the new path and migrates the QUIC connection (quinn allows migration on the
/// server side), so the tunnel is not re-established and every open relayed connection
/// survives, without operator action.
#[test]
fn nat_rebinding_keeps_the_tunnel_and_open_connections() {
    let Some(mut d) = deployment() else { return };
    d.start();
    let before = d.t.mapped_port(QUIC_PORT).expect("mapped");
    let mut idle: Vec<TcpStream> = (0..8).map(|_| d.connect(P2P_PORT).unwrap()).collect();
    for tcp in &mut idle {
        assert!(echo_once(tcp, b"before").unwrap());
    }
    // A connection trickling data through the rebinding: 1 KiB every 50 ms for about 8 s.
    let mut trickle = d.connect(P2P_PORT).unwrap();
    let (done, finished) = mpsc::channel();
    std::thread::spawn(move || {
        let block = [0x77u8; 1024];
        let result = (0..160).try_for_each(|_| {
            if echo_once(&mut trickle, &block)? {
                std::thread::sleep(Duration::from_millis(50));
                Ok(())
            } else {
                Err(std::io::Error::other("echo altered"))
            }
        });
        let _ = done.send(result);
    });
    std::thread::sleep(Duration::from_secs(1));

    // New mappings come from another port range; then every UDP mapping is dropped.
    d.t.iptables(&[
        "-t",
        "nat",
        "-R",
        "POSTROUTING",
        "1",
        "-s",
        "198.51.100.0/24",
        "-o",
        "pub",
        "-p",
        "udp",
        "-j",
        "MASQUERADE",
        "--to-ports",
        "40000-40999",
        "--random-fully",
    ]);
    d.t.flush_udp_mappings();
    let rebound = wait_until(PATIENCE, || {
        d.t.mapped_port(QUIC_PORT)
            .is_some_and(|p| (40000..=40999).contains(&p))
    });
    assert!(
        rebound.is_some(),
        "the agent's flow was not mapped again: {:?}",
        d.t.udp_mappings()
    );
    let after = d.t.mapped_port(QUIC_PORT).unwrap();
    assert_ne!(before, after);

    let trickled = finished
        .recv_timeout(PATIENCE)
        .expect("the trickling connection hung");
    assert!(
        trickled.is_ok(),
        "the connection carrying traffic broke: {trickled:?}"
    );
    for tcp in &mut idle {
        assert!(
            echo_once(tcp, b"after").unwrap(),
            "an idle connection did not survive"
        );
    }
    assert!(d.echoes(), "a new connection after rebinding failed");
    let log = d.sentry().log();
    assert_eq!(
        d.sentry().count_log("tunnel up"),
        1,
        "the tunnel was re-established instead of migrated:\n{log}"
    );
    eprintln!("NAT port {before} -> {after}; flow seen again after {rebound:?}");
}

/// Scenario 4: the agent is killed with SIGKILL mid-transfer, then restarted; then the sentry
/// is killed and restarted.
#[test]
fn killed_agent_and_killed_sentry_recover() {
    let Some(mut d) = deployment() else { return };
    d.start();

    // A long transfer is running when the agent dies without a word.
    let tcp = d.connect(P2P_PORT).unwrap();
    let (done, finished) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(echo_roundtrip(tcp, 7, 16 << 30));
    });
    std::thread::sleep(Duration::from_millis(700));
    assert!(
        finished.try_recv().is_err(),
        "the transfer ended before the kill"
    );
    let mut agent = d.agent.take().unwrap();
    agent.signal(Signal::KILL);
    agent.wait_exit(Duration::from_secs(5));
    let killed = Instant::now();

    // The client's connection ends (the sentry notices the dead tunnel by its idle timeout).
    let ended = finished
        .recv_timeout(Duration::from_secs(60))
        .expect("the client's connection hung after the agent died");
    assert!(
        !matches!(ended, Ok(true)),
        "a 16 GiB transfer cannot have completed"
    );
    eprintln!(
        "client connection ended {:?} after the kill",
        killed.elapsed()
    );
    d.sentry().wait_log("tunnel down", 1, PATIENCE);

    // While the agent is down, new connections are closed at once.
    for _ in 0..3 {
        assert!(
            d.closed_at_once(P2P_PORT, Duration::from_secs(2)),
            "a connection was not refused at once while no agent is connected"
        );
    }

    // The agent comes back: new connections work again, the sentry untouched.
    d.start_agent();
    let back = wait_until(PATIENCE, || d.echoes());
    assert!(back.is_some(), "no service after the agent restarted");
    eprintln!("served again {back:?} after the agent restarted");

    // The sentry is killed and restarted: the agent reconnects by itself.
    let mut sentry = d.sentry.take().unwrap();
    sentry.signal(Signal::KILL);
    sentry.wait_exit(Duration::from_secs(5));
    d.start_sentry();
    let back = wait_until(Duration::from_secs(45), || d.echoes());
    assert!(
        back.is_some(),
        "the agent did not reconnect to the restarted sentry:\n{}",
        d.agent.as_ref().unwrap().log()
    );
    eprintln!("served again {back:?} after the sentry restarted");
    // The restarted sentry recognised the old tunnel's packets and reset it (its connection-ID
    // and reset keys derive from its host key), so the agent did not wait out a timeout.
    let agent_log = d.agent.as_ref().unwrap().log();
    assert!(
        agent_log.contains("tunnel down: reset by peer"),
        "the agent was not told by a stateless reset:\n{agent_log}"
    );
}

/// Scenario 5: a slow, lossy link between the validator's LAN and the sentry: 100 ms added
/// each way, 1 % and then 5 % of the tunnel's packets dropped by the router in each
/// direction. Transfers complete intact and the tunnel stays up throughout.
#[test]
fn slow_lossy_link() {
    let Some(mut d) = deployment() else { return };
    let delay = Duration::from_millis(100);
    // The validator's flow to the sentry goes through the slow link inside the router.
    let link_port = 7444;
    let (lan, upstream) = d.t.enter(Host::Router, || {
        let lan =
            UdpSocket::bind(SocketAddr::V4(SocketAddrV4::new(ROUTER_LAN, link_port))).unwrap();
        let upstream = UdpSocket::bind(SocketAddr::V4(SocketAddrV4::new(ROUTER_WAN, 0))).unwrap();
        upstream.connect(public(QUIC_PORT)).unwrap();
        (lan, upstream)
    });
    let _link = SlowLink::start(lan, upstream, delay);
    let to = format!("{ROUTER_LAN}:{link_port}");
    d.t.iptables(&[
        "-t",
        "nat",
        "-A",
        "PREROUTING",
        "-i",
        "lan",
        "-p",
        "udp",
        "-d",
        &SENTRY.to_string(),
        "--dport",
        &QUIC_PORT.to_string(),
        "-j",
        "DNAT",
        "--to-destination",
        &to,
    ]);
    let loss = |p: &str| {
        vec![
            "INPUT",
            "-p",
            "udp",
            "-m",
            "statistic",
            "--mode",
            "random",
            "--probability",
            p,
            "-j",
            "DROP",
        ]
        .into_iter()
        .map(str::to_owned)
        .collect::<Vec<_>>()
    };
    let mut rule = vec!["-A".to_owned()];
    rule.extend(loss("0.01"));
    d.t.iptables(&rule.iter().map(String::as_str).collect::<Vec<_>>());
    d.start();

    // The link is in the path: a round trip cannot be faster than the delay added.
    let mut tcp = d.connect(P2P_PORT).unwrap();
    let started = Instant::now();
    assert!(echo_once(&mut tcp, b"rtt").unwrap());
    let rtt = started.elapsed();
    assert!(
        rtt >= delay * 2,
        "round trip {rtt:?}: the slow link is not in the path"
    );

    let started = Instant::now();
    assert!(
        echo_roundtrip(d.connect(P2P_PORT).unwrap(), 11, 4 << 20).unwrap(),
        "4 MiB at 1 % loss came back altered or short"
    );
    eprintln!(
        "4 MiB each way at 200 ms RTT, 1 % loss: {:?}",
        started.elapsed()
    );

    let mut rule = vec!["-R".to_owned()];
    rule.extend(loss("0.05"));
    rule.insert(2, "1".to_owned());
    d.t.iptables(&rule.iter().map(String::as_str).collect::<Vec<_>>());
    let started = Instant::now();
    assert!(
        echo_roundtrip(d.connect(P2P_PORT).unwrap(), 12, 1 << 20).unwrap(),
        "1 MiB at 5 % loss came back altered or short"
    );
    eprintln!(
        "1 MiB each way at 200 ms RTT, 5 % loss: {:?}",
        started.elapsed()
    );
    for id in 0..20u64 {
        let mut tcp = d.connect(RPC_PORT).unwrap();
        let body = jsonrpc_call(&mut tcp, id).unwrap();
        assert_eq!(stand_in::json_id(&body), Some(id.to_string()), "{body}");
    }
    assert!(
        echo_once(&mut tcp, b"still").unwrap(),
        "the first connection broke"
    );
    assert_eq!(
        d.sentry().count_log("tunnel up"),
        1,
        "the tunnel dropped on the lossy link:\n{}",
        d.sentry().log()
    );
}

/// Scenario 6: two agents in failover order; stopping the first moves new connections to the
/// second, and they return to the first when it is back.
#[test]
fn failover_to_the_second_agent_and_back() {
    let Some(t) = Topology::new() else { return };
    let _services = [
        stand_in::tagged_echo(listen(&t, Host::Validator, private(P2P_PORT)), b"one"),
        stand_in::tagged_echo(listen(&t, Host::Validator, private(P2P2_PORT)), b"two"),
    ];
    let (sentry_toml, agents) = write_configs(
        &t,
        &[
            AgentSpec {
                name: "validator-1",
                services: &[("p2p", P2P_PORT)],
            },
            AgentSpec {
                name: "validator-2",
                services: &[("p2p", P2P2_PORT)],
            },
        ],
        &[("p2p", P2P_PORT, &["validator-1/p2p", "validator-2/p2p"])],
    );
    let sentry = t.daemon(Host::Sentry, "serve", &sentry_toml);
    sentry.wait_log("sentry ready", 1, PATIENCE);
    let mut first = t.daemon(Host::Validator, "agent", &agents[0]);
    let _second = t.daemon(Host::Validator, "agent", &agents[1]);
    sentry.wait_log("tunnel up", 2, PATIENCE);

    let who = || -> Option<Vec<u8>> {
        let mut tcp = t
            .client_connect(public(P2P_PORT), Duration::from_secs(5))
            .ok()?;
        tcp.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        let mut tag = vec![0u8; 3];
        tcp.read_exact(&mut tag).ok()?;
        Some(tag)
    };
    for _ in 0..5 {
        assert_eq!(
            who().as_deref(),
            Some(&b"one"[..]),
            "the first upstream serves"
        );
    }

    first.signal(Signal::TERM);
    assert_eq!(first.wait_exit(PATIENCE), Some(0));
    for _ in 0..5 {
        assert_eq!(
            who().as_deref(),
            Some(&b"two"[..]),
            "with the first agent stopped, the second serves"
        );
    }

    let _first = t.daemon(Host::Validator, "agent", &agents[0]);
    sentry.wait_log("tunnel up", 3, PATIENCE);
    assert_eq!(
        who().as_deref(),
        Some(&b"one"[..]),
        "the first agent is preferred again once back"
    );
}

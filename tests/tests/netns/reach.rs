//! What reaches the validator and how: only through the sentry, idle connections across NAT
//! timeouts, and a deployment made by `sentry pair`.

use super::*;

/// Scenarios 1 and 2: the NAT is real, and through the sentry the client reaches both
/// services: a hash-checked bulk transfer each way, many short request/response
/// connections, and many calls on one keep-alive connection.
#[test]
fn the_validator_is_unreachable_except_through_the_sentry() {
    let Some(mut d) = deployment() else { return };

    // Without the tunnel: the client (which has a route to the LAN via the router) cannot
    // reach the validator's services, nor can the sentry host. The router forwards nothing in.
    for host in [Host::Client, Host::Sentry] {
        for port in [P2P_PORT, RPC_PORT] {
            let direct = d.t.enter(host, || {
                TcpStream::connect_timeout(&private(port), Duration::from_secs(2))
            });
            assert!(
                direct.is_err(),
                "{host:?} reached the validator's port {port} directly: the NAT is not real"
            );
        }
    }
    // The LAN side works: the validator reaches the public segment through the NAT.
    let probe = d.t.enter(Host::Sentry, || {
        TcpListener::bind(SocketAddr::V4(SocketAddrV4::new(SENTRY, 7999))).unwrap()
    });
    let outbound = d.t.enter(Host::Validator, || {
        TcpStream::connect_timeout(&public(7999), PATIENCE)
    });
    assert!(
        outbound.is_ok(),
        "validator cannot reach the public segment"
    );
    let (_, seen) = probe.accept().unwrap();
    assert_eq!(seen.ip(), ROUTER_WAN, "outbound traffic is not masqueraded");
    drop((probe, outbound));

    d.start();
    let up = d.sentry().wait_event("tunnel up", &[], 0, PATIENCE);
    let remote: SocketAddr = up["remote"].as_str().unwrap().parse().unwrap();
    assert_eq!(
        remote.ip(),
        ROUTER_WAN,
        "the sentry should see the agent at the router's public address: {up:?}"
    );

    // Bulk: 64 MiB up and echoed back down at once, SHA-256 checked.
    let tcp = d.connect(P2P_PORT).unwrap();
    assert!(
        echo_roundtrip(tcp, 1, 64 << 20).unwrap(),
        "64 MiB through the tunnel came back altered or short"
    );

    // 200 short connections, one JSON-RPC call each, from 4 threads; ids must match.
    let d = &d;
    std::thread::scope(|scope| {
        for worker in 0..4u64 {
            scope.spawn(move || {
                for i in 0..50u64 {
                    let id = worker * 1000 + i;
                    let mut tcp = d.connect(RPC_PORT).unwrap();
                    let body = jsonrpc_call(&mut tcp, id).unwrap();
                    assert_eq!(stand_in::json_id(&body), Some(id.to_string()), "{body}");
                }
            });
        }
    });
    // 500 calls on one keep-alive connection.
    let mut tcp = d.connect(RPC_PORT).unwrap();
    for id in 0..500u64 {
        let body = jsonrpc_call(&mut tcp, id).unwrap();
        assert_eq!(stand_in::json_id(&body), Some(id.to_string()), "{body}");
    }
    // The client's address reached the sentry unchanged (no NAT on the public side).
    assert_eq!(tcp.local_addr().unwrap().ip(), CLIENT);
}

/// Scenario 2, silence: relayed connections idle for more than two NAT UDP timeouts still
/// work, over the same tunnel and the same NAT mapping (the router picks a random port for a
/// new mapping, so an expired one would show as a changed port).
#[test]
fn idle_connections_outlive_two_nat_timeouts() {
    let Some(mut d) = deployment() else { return };
    d.start();
    let mut idle: Vec<TcpStream> = (0..16).map(|_| d.connect(P2P_PORT).unwrap()).collect();
    for (i, tcp) in idle.iter_mut().enumerate() {
        assert!(echo_once(tcp, format!("hello {i}").as_bytes()).unwrap());
    }
    let mapped =
        d.t.mapped_port(QUIC_PORT)
            .expect("the tunnel's flow is in the NAT table");

    std::thread::sleep(NAT_UDP_TIMEOUT * 2 + Duration::from_secs(3));

    assert_eq!(
        d.t.mapped_port(QUIC_PORT),
        Some(mapped),
        "the NAT mapping expired during the silence: keep-alives did not hold it.\n{:?}",
        d.t.udp_mappings()
    );
    for (i, tcp) in idle.iter_mut().enumerate() {
        assert!(
            echo_once(tcp, format!("again {i}").as_bytes()).unwrap(),
            "idle connection {i} lost after the silence"
        );
    }
    assert!(d.echoes(), "a new connection after the silence failed");
    assert_eq!(d.sentry().count_log("tunnel up"), 1, "{}", d.sentry().log());
}

/// `sentry pair` output, used as generated (keys in the test's dir via `--key-dir`): both
/// configs pass `sentry check`, the agent behind the NAT connects, a client reaches the
/// validator's P2P port through the sentry, and `sentry status` on each host shows it.
#[test]
fn a_generated_pair_relays_through_the_nat_and_status_shows_it() {
    let Some(t) = Topology::new() else { return };
    let dir = t.dir().join("pair");
    let run = |host: Option<Host>, args: &[&str]| {
        let mut command = match host {
            Some(h) => {
                let mut c = std::process::Command::new("ip");
                c.args(["netns", "exec", &t.ns(h)]).arg(tests::sentry_bin());
                c
            }
            None => std::process::Command::new(tests::sentry_bin()),
        };
        let out = command.args(args).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "sentry {args:?}: {text}");
        text
    };
    let sentry_addr = public(4433).to_string();
    let dir_arg = dir.to_str().unwrap();
    run(
        None,
        &[
            "pair",
            "--sentry",
            &sentry_addr,
            "--out-dir",
            dir_arg,
            "--key-dir",
            dir_arg,
            "--preset",
            "icon",
        ],
    );
    for config in ["sentry.toml", "agent.toml"] {
        run(
            None,
            &["check", "--config", dir.join(config).to_str().unwrap()],
        );
    }
    // goloop's P2P port on the validator host's loopback, as the generated agent.toml says.
    let _p2p = stand_in::echo(listen(
        &t,
        Host::Validator,
        "127.0.0.1:7100".parse().unwrap(),
    ));
    // And its JSON-RPC port (a stand-in answering every POST).
    let _rpc = stand_in::jsonrpc(listen(
        &t,
        Host::Validator,
        "127.0.0.1:9000".parse().unwrap(),
    ));
    let sentry = t.daemon(Host::Sentry, "serve", &dir.join("sentry.toml"));
    sentry.wait_log("sentry ready", 1, PATIENCE);
    let agent = t.daemon(Host::Validator, "agent", &dir.join("agent.toml"));
    sentry.wait_log("tunnel up", 1, PATIENCE);
    for _ in 0..3 {
        let mut tcp = t.client_connect(public(P2P_PORT), PATIENCE).unwrap();
        tcp.set_read_timeout(Some(PATIENCE)).unwrap();
        assert!(echo_once(&mut tcp, b"generated pair").unwrap());
    }
    // The generated rpc route filters with the icon preset: the public API is served through
    // the NAT, goloop's node administration is refused at the sentry.
    let mut tcp = t.client_connect(public(RPC_PORT), PATIENCE).unwrap();
    tcp.set_read_timeout(Some(PATIENCE)).unwrap();
    let body = jsonrpc_call(&mut tcp, 77).unwrap();
    assert!(body.contains("\"id\":77") && body.contains("0x1"), "{body}");
    let mut tcp = t.client_connect(public(RPC_PORT), PATIENCE).unwrap();
    tcp.set_read_timeout(Some(PATIENCE)).unwrap();
    tcp.write_all(b"POST /admin/chain HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}")
        .unwrap();
    let mut answer = String::new();
    let _ = tcp.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");

    let status = run(Some(Host::Sentry), &["status"]);
    eprintln!("{status}");
    assert!(status.starts_with("sentry "), "{status}");
    assert!(status.contains("ok: 2 route(s)"), "{status}");
    let tunnel = status.lines().find(|l| l.contains("validator ")).unwrap();
    assert!(tunnel.contains(" up "), "{status}");
    let route = status
        .lines()
        .find(|l| l.trim_start().starts_with("p2p "))
        .unwrap();
    let cells: Vec<&str> = route.split_whitespace().collect();
    // ROUTE LISTEN UPSTREAM-IN-USE ACTIVE ACCEPTED REFUSED ... (ACTIVE may still count a
    // connection the client has just closed.)
    assert_eq!(
        [&cells[..3], &cells[4..6]].concat(),
        ["p2p", "0.0.0.0:7100", "validator/p2p", "3", "0"],
        "{status}"
    );

    let status = run(
        Some(Host::Validator),
        &["status", "--metrics", "127.0.0.1:9901"],
    );
    eprintln!("{status}");
    assert!(status.starts_with("agent "), "{status}");
    let service = status
        .lines()
        .find(|l| l.trim_start().starts_with("p2p "))
        .unwrap();
    let cells: Vec<&str> = service.split_whitespace().collect();
    // SERVICE ACTIVE CONNECTED REFUSED ...
    assert_eq!(
        [cells[0], cells[2], cells[3]],
        ["p2p", "3", "0"],
        "{status}"
    );
    drop((agent, sentry));
}

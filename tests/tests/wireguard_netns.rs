//! The WireGuard transport on the real-network tier (see `tests/src/netns.rs`): the built
//! binary on the public segment, the validator behind a real NAT.
//!
//! - Interop: the validator runs wireguard-go (Debian's package, kernel TCP on a TUN device) as
//!   a plain WireGuard peer with a persistent keepalive, its service on its overlay address,
//!   beside our agent behind the same NAT; one sentry relays clients to both at once.
//! - Our agent behind the NAT over `transport = "wireguard"`, including a NAT rebinding under
//!   an open connection.
//!
//! Needs root, `ip`, `iptables`, `conntrack`, `wireguard-go` and `wg`; under `CI=true` their
//! absence fails the test.
#![allow(clippy::unwrap_used)]
#![allow(clippy::disallowed_methods)]

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use relay_core::keys::{PrivateKey, write_private_key};
use rustix::process::{Pid, Signal};
use tests::netns::{Host, ROUTER_WAN, SENTRY, Topology, VALIDATOR};
use tests::stand_in::{self, echo_roundtrip};
use tests::{sentry_bin, tool_available};

const P2P_PORT: u16 = 7100;
const WG_PORT: u16 = 51820;
const PATIENCE: Duration = Duration::from_secs(30);
const SENTRY_OVERLAY: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 1);
const AGENT_OVERLAY: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 2);
const PEER_OVERLAY: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 3);

/// The two tests take turns: each runs two unoptimized userspace stacks, and on two cores
/// side by side they starve each other into read timeouts that say nothing about the code.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn turn() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn public(port: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(SENTRY, port))
}

fn wireguard_tools() -> bool {
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    let have = tool_available("wg", &["--version"], "the WireGuard interop test")
        && Path::new("/usr/bin/wireguard-go").exists();
    assert!(have || !ci, "wireguard-go and wg must be installed in CI");
    if !have {
        eprintln!("WireGuard interop skipped: wireguard-go or wg missing");
    }
    have
}

/// wireguard-go on a TUN device inside the validator's namespace, stopped by its PID.
struct WireGuardGo {
    child: Child,
}

impl Drop for WireGuardGo {
    fn drop(&mut self) {
        // SIGTERM lets it remove its UAPI socket; then make sure.
        if let Some(pid) = Pid::from_raw(i32::try_from(self.child.id()).unwrap()) {
            let _ = rustix::process::kill_process(pid, Signal::TERM);
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Start wireguard-go as interface `iface` in the validator's namespace, keyed and peered
/// with the sentry at `sentry_pub`; returns it and its own public key.
fn start_wireguard_go(t: &Topology, iface: &str, sentry_pub: &str) -> (WireGuardGo, String) {
    let ns = t.ns(Host::Validator);
    let child = Command::new("ip")
        .args(["netns", "exec", &ns, "wireguard-go", "-f", iface])
        // Debian's wireguard-go refuses to start on a kernel with WireGuard unless told.
        .env("WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let wg = WireGuardGo { child };
    let started = Instant::now();
    while !t
        .try_sh(Host::Validator, &["wg", "show", iface])
        .status
        .success()
    {
        assert!(started.elapsed() < PATIENCE, "wireguard-go did not come up");
        std::thread::sleep(Duration::from_millis(50));
    }
    let key = t.dir().join("wg-peer.key");
    std::fs::write(&key, t.sh(Host::Validator, &["wg", "genkey"])).unwrap();
    let own_public = t
        .sh(
            Host::Validator,
            &["sh", "-c", &format!("wg pubkey < {}", key.display())],
        )
        .trim()
        .to_owned();
    let endpoint = public(WG_PORT).to_string();
    let allowed = format!("{SENTRY_OVERLAY}/32");
    t.sh(
        Host::Validator,
        &[
            "wg",
            "set",
            iface,
            "private-key",
            key.to_str().unwrap(),
            "peer",
            sentry_pub,
            "endpoint",
            &endpoint,
            "allowed-ips",
            &allowed,
            "persistent-keepalive",
            "5",
        ],
    );
    let own = format!("{PEER_OVERLAY}/32");
    t.sh(Host::Validator, &["ip", "addr", "add", &own, "dev", iface]);
    t.sh(
        Host::Validator,
        &["ip", "link", "set", iface, "mtu", "1420", "up"],
    );
    t.sh(
        Host::Validator,
        &["ip", "route", "add", &allowed, "dev", iface],
    );
    (wg, own_public)
}

/// The sentry's key file; its WireGuard public key as `sentry pubkey --wireguard` prints it.
fn sentry_key(t: &Topology) -> (PrivateKey, String) {
    let key = PrivateKey::generate().unwrap();
    let path = t.dir().join("sentry.key");
    write_private_key(&path, &key).unwrap();
    let out = Command::new(sentry_bin())
        .args(["pubkey", "--key", path.to_str().unwrap(), "--wireguard"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let printed = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert_eq!(printed, key.wireguard_public_base64());
    (key, printed)
}

fn sentry_head() -> String {
    format!(
        "[sentry]\nprivate_key = \"sentry.key\"\nquic_listen = \"{}\"\n\
         wireguard_listen = \"{}\"\nwireguard_address = \"{SENTRY_OVERLAY}\"\n",
        public(7443),
        public(WG_PORT)
    )
}

fn route(upstream: &str) -> String {
    format!(
        "\n[[route]]\nname = \"p2p\"\nlisten = \"{}\"\nupstream = [\"{upstream}\"]\n",
        public(P2P_PORT)
    )
}

fn connect(t: &Topology) -> TcpStream {
    connect_to(t, P2P_PORT)
}

fn connect_to(t: &Topology, port: u16) -> TcpStream {
    let tcp = t
        .client_connect(public(port), Duration::from_secs(5))
        .unwrap();
    tcp.set_read_timeout(Some(PATIENCE)).unwrap();
    tcp.set_write_timeout(Some(PATIENCE)).unwrap();
    tcp
}

fn echo_once(tcp: &mut TcpStream, message: &[u8]) -> bool {
    if tcp.write_all(message).is_err() {
        return false;
    }
    let mut buf = vec![0u8; message.len()];
    tcp.read_exact(&mut buf).is_ok() && buf == message
}

/// A plain wireguard-go peer and our agent behind the same NAT, served by one sentry at once.
#[test]
fn a_plain_wireguard_go_peer_and_our_agent_behind_one_sentry() {
    let _turn = turn();
    let Some(t) = Topology::new() else { return };
    if !wireguard_tools() {
        return;
    }
    let (sentry_key, sentry_pub) = sentry_key(&t);
    let agent_key = PrivateKey::generate().unwrap();
    write_private_key(&t.dir().join("agent.key"), &agent_key).unwrap();
    let iface = format!("wgs{}", std::process::id() % 100_000);
    let (_wg, peer_pub) = start_wireguard_go(&t, &iface, &sentry_pub);
    // The plain peer's service listens on its overlay address only; the agent's on the LAN.
    let service = stand_in::echo(t.enter(Host::Validator, || {
        TcpListener::bind(SocketAddrV4::new(PEER_OVERLAY, P2P_PORT)).unwrap()
    }));
    let agent_service = stand_in::echo(t.enter(Host::Validator, || {
        TcpListener::bind(SocketAddrV4::new(VALIDATOR, P2P_PORT + 1)).unwrap()
    }));
    let config = sentry_head()
        + &format!(
            "\n[[wireguard_peer]]\nname = \"legacy-node\"\npublic_key = \"{peer_pub}\"\n\
             address = \"{PEER_OVERLAY}\"\n\n\
             [[agent]]\nname = \"validator-1\"\npublic_key = \"{}\"\n\
             wireguard_address = \"{AGENT_OVERLAY}\"\n",
            agent_key.public_key()
        )
        + &route(&format!("legacy-node/{PEER_OVERLAY}:{P2P_PORT}"))
        + &format!(
            "\n[[route]]\nname = \"p2p-2\"\nlisten = \"{}\"\nupstream = [\"validator-1/p2p\"]\n",
            public(P2P_PORT + 1)
        );
    let path = t.dir().join("sentry.toml");
    std::fs::write(&path, config).unwrap();
    let agent_path = t.dir().join("agent.toml");
    std::fs::write(&agent_path, agent_config(&sentry_key, P2P_PORT + 1)).unwrap();
    let sentry = t.daemon(Host::Sentry, "serve", &path);
    let _agent = t.daemon(Host::Validator, "agent", &agent_path);
    let up = sentry.wait_event("tunnel up", &[("agent", "legacy-node")], 0, PATIENCE);
    assert!(
        up["remote"]
            .as_str()
            .unwrap()
            .contains(&ROUTER_WAN.to_string()),
        "the peer should come from the router's public address: {up:?}"
    );
    sentry.wait_event("tunnel up", &[("agent", "validator-1")], 0, PATIENCE);
    // The sentry counts a plain peer up on its first authenticated packet, the handshake
    // initiation. Once in CI (2026-12-07) the first relayed connection, 50 ms after a
    // handshake that had to be retried, went unanswered for the 2 s connect timeout (and the
    // upstream was held down for 5 s): probe until the plain peer carries a connection. The
    // transfers below then run both peers at once.
    let deadline = std::time::Instant::now() + PATIENCE;
    while !echo_once(&mut connect_to(&t, P2P_PORT), b"probe") {
        assert!(
            std::time::Instant::now() < deadline,
            "the plain wireguard-go peer never carried a connection"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    // Both at once, each hash-checked.
    let plain = connect_to(&t, P2P_PORT);
    let ours = connect_to(&t, P2P_PORT + 1);
    let to_agent = std::thread::spawn(move || echo_roundtrip(ours, 4, 16 << 20).unwrap());
    assert!(
        echo_roundtrip(plain, 3, 16 << 20).unwrap(),
        "16 MiB through wireguard-go came back altered or short"
    );
    assert!(
        to_agent.join().unwrap(),
        "16 MiB through our agent, beside the plain peer, came back altered or short"
    );
    drop((service, agent_service));
}

/// An agent config dialing the sentry's WireGuard port, exporting the echo at `port`.
fn agent_config(sentry_key: &PrivateKey, port: u16) -> String {
    format!(
        "[agent]\nname = \"validator-1\"\nprivate_key = \"agent.key\"\n\n\
         [[sentry]]\naddress = \"{}\"\npublic_key = \"{}\"\ntransport = \"wireguard\"\n\
         wireguard_address = \"{AGENT_OVERLAY}\"\nsentry_wireguard_address = \"{SENTRY_OVERLAY}\"\n\n\
         [[service]]\nname = \"p2p\"\ntarget = \"{}\"\n",
        public(WG_PORT),
        sentry_key.public_key(),
        SocketAddrV4::new(VALIDATOR, port)
    )
}

#[test]
fn our_agent_behind_the_nat_over_wireguard_survives_a_nat_rebinding() {
    let _turn = turn();
    let Some(t) = Topology::new() else { return };
    let (sentry_key, _) = sentry_key(&t);
    let agent_key = PrivateKey::generate().unwrap();
    write_private_key(&t.dir().join("agent.key"), &agent_key).unwrap();
    let service = stand_in::echo(t.enter(Host::Validator, || {
        TcpListener::bind(SocketAddrV4::new(VALIDATOR, P2P_PORT)).unwrap()
    }));
    let sentry_config = sentry_head()
        + &format!(
            "\n[[agent]]\nname = \"validator-1\"\npublic_key = \"{}\"\n\
             wireguard_address = \"{AGENT_OVERLAY}\"\n",
            agent_key.public_key()
        )
        + &route("validator-1/p2p");
    let agent_config = agent_config(&sentry_key, P2P_PORT);
    let (sentry_path, agent_path) = (t.dir().join("sentry.toml"), t.dir().join("agent.toml"));
    std::fs::write(&sentry_path, sentry_config).unwrap();
    std::fs::write(&agent_path, agent_config).unwrap();
    let sentry = t.daemon(Host::Sentry, "serve", &sentry_path);
    let _agent = t.daemon(Host::Validator, "agent", &agent_path);
    let up = sentry.wait_event("tunnel up", &[("agent", "validator-1")], 0, PATIENCE);
    assert!(
        up["remote"]
            .as_str()
            .unwrap()
            .contains(&ROUTER_WAN.to_string()),
        "{up:?}"
    );
    assert!(
        echo_roundtrip(connect(&t), 5, 32 << 20).unwrap(),
        "32 MiB through our WireGuard transport came back altered or short"
    );

    // A NAT rebinding under an open connection: the router forgets the flow, the agent's next
    // packet gets a new public port, the sentry follows it, the connection goes on.
    let mut held = connect(&t);
    assert!(echo_once(&mut held, b"before"));
    let before = t.mapped_port(WG_PORT);
    t.flush_udp_mappings();
    // Let the agent's keepalive make the new mapping before the next write.
    std::thread::sleep(Duration::from_secs(6));
    assert!(
        echo_once(&mut held, b"after the rebinding"),
        "the open connection died"
    );
    let after = t.mapped_port(WG_PORT);
    assert!(before.is_some() && after.is_some(), "no UDP mapping seen");
    // MASQUERADE may pick the same port again for a new flow; the flow is new either way.
    assert!(echo_once(&mut connect(&t), b"a new connection"));
    drop(service);
}

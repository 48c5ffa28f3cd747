//! The real-network tier: the built `sentry` binary, configured by files as an operator would,
//! serving a client on a public segment from a validator behind a real NAT router (iptables
//! MASQUERADE in a network namespace), with faults injected: NAT silence, NAT rebinding, killed
//! processes, slow and lossy links, failover. See `tests/src/netns.rs` for the topology.
//!
//! Needs root, `ip`, `iptables` and `conntrack`. Without them each test prints why it was
//! skipped and passes; under `CI=true` it fails instead.
#![allow(clippy::unwrap_used)]
// Plain threads and deadlines here, outside the daemon: the clock rule is for relay-core.
#![allow(clippy::disallowed_methods)]

mod flood;
mod hidden;
mod reach;
mod recovery;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use relay_core::keys::{PrivateKey, write_private_key};
use rustix::process::Signal;
use tests::daemon::Daemon;
use tests::netns::{
    CLIENT, Host, NAT_UDP_TIMEOUT, ROUTER_LAN, ROUTER_WAN, SENTRY, Topology, VALIDATOR,
};
use tests::stand_in::{self, SlowLink, StandIn, echo_roundtrip, jsonrpc_call};

const QUIC_PORT: u16 = 7443;
/// goloop's P2P and JSON-RPC ports, on the sentry and on the validator alike.
const P2P_PORT: u16 = 7100;
const RPC_PORT: u16 = 9000;
/// The validator's second echo service, for a second agent.
const P2P2_PORT: u16 = 7101;
/// Bound for anything that should take a moment; a hang fails the test instead.
const PATIENCE: Duration = Duration::from_secs(30);

fn public(port: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(SENTRY, port))
}

fn private(port: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(VALIDATOR, port))
}

fn listen(t: &Topology, host: Host, addr: SocketAddr) -> TcpListener {
    t.enter(host, || TcpListener::bind(addr).unwrap())
}

/// A key file in the test's dir; its public key.
fn key_file(t: &Topology, name: &str) -> String {
    let key = PrivateKey::generate().unwrap();
    write_private_key(&t.dir().join(name), &key).unwrap();
    key.public_key().to_string()
}

/// An agent: its name, key file, and services (name, port on the validator).
struct AgentSpec {
    name: &'static str,
    services: &'static [(&'static str, u16)],
}

/// Config files for a sentry with `routes` (name, public port, upstreams) and `agents`;
/// returns the sentry's config path and each agent's.
fn write_configs(
    t: &Topology,
    agents: &[AgentSpec],
    routes: &[(&str, u16, &[&str])],
) -> (PathBuf, Vec<PathBuf>) {
    let sentry_pub = key_file(t, "sentry.key");
    let mut sentry = format!(
        "[sentry]\nprivate_key = \"sentry.key\"\nquic_listen = \"{}\"\n",
        public(QUIC_PORT)
    );
    let mut agent_files = Vec::new();
    for agent in agents {
        let agent_pub = key_file(t, &format!("{}.key", agent.name));
        sentry += &format!(
            "\n[[agent]]\nname = \"{}\"\npublic_key = \"{agent_pub}\"\n",
            agent.name
        );
        let mut text = format!(
            "[agent]\nname = \"{name}\"\nprivate_key = \"{name}.key\"\n\n\
             [[sentry]]\naddress = \"{}\"\npublic_key = \"{sentry_pub}\"\ntransport = \"quic\"\n",
            public(QUIC_PORT),
            name = agent.name
        );
        for (service, port) in agent.services {
            text += &format!(
                "\n[[service]]\nname = \"{service}\"\ntarget = \"{}\"\n",
                private(*port)
            );
        }
        let path = t.dir().join(format!("{}.toml", agent.name));
        std::fs::write(&path, text).unwrap();
        agent_files.push(path);
    }
    for (name, port, upstreams) in routes {
        let list: Vec<String> = upstreams.iter().map(|u| format!("\"{u}\"")).collect();
        sentry += &format!(
            // The test client is one address driving hundreds of connections: above the
            // per-client defaults on purpose.
            "\n[[route]]\nname = \"{name}\"\nprotocol = \"tcp\"\nlisten = \"{}\"\nupstream = [{}]\n\
             max_connections_per_ip = 256\nconnect_rate_per_ip = \"1000/s\"\n",
            public(*port),
            list.join(", ")
        );
    }
    let path = t.dir().join("sentry.toml");
    std::fs::write(&path, sentry).unwrap();
    (path, agent_files)
}

/// The usual deployment: one agent "validator-1" exporting an echo P2P service and a
/// JSON-RPC stand-in, routed at the sentry's 7100 and 9000.
struct Deployment {
    // Fields drop in this order: daemons first, then services, then the namespaces.
    agent: Option<Daemon>,
    sentry: Option<Daemon>,
    _services: Vec<StandIn>,
    sentry_toml: PathBuf,
    agent_toml: PathBuf,
    t: Topology,
}

const VALIDATOR_1: AgentSpec = AgentSpec {
    name: "validator-1",
    services: &[("p2p", P2P_PORT), ("rpc", RPC_PORT)],
};

impl Deployment {
    /// Services up; configs written; nothing started.
    fn new(t: Topology) -> Self {
        let services = vec![
            stand_in::echo(listen(&t, Host::Validator, private(P2P_PORT))),
            stand_in::jsonrpc(listen(&t, Host::Validator, private(RPC_PORT))),
        ];
        let (sentry_toml, agents) = write_configs(
            &t,
            &[VALIDATOR_1],
            &[
                ("p2p", P2P_PORT, &["validator-1/p2p"]),
                ("rpc", RPC_PORT, &["validator-1/rpc"]),
            ],
        );
        Self {
            agent: None,
            sentry: None,
            _services: services,
            sentry_toml,
            agent_toml: agents[0].clone(),
            t,
        }
    }

    fn start_sentry(&mut self) {
        let sentry = self.t.daemon(Host::Sentry, "serve", &self.sentry_toml);
        sentry.wait_log("sentry ready", 1, PATIENCE);
        self.sentry = Some(sentry);
    }

    fn start_agent(&mut self) {
        self.agent = Some(self.t.daemon(Host::Validator, "agent", &self.agent_toml));
    }

    fn sentry(&self) -> &Daemon {
        self.sentry.as_ref().unwrap()
    }

    /// Start both and wait (bounded) until the sentry has the `n`th tunnel up.
    fn start(&mut self) {
        self.start_sentry();
        self.start_agent();
        self.sentry().wait_log("tunnel up", 1, PATIENCE);
    }

    fn connect(&self, port: u16) -> std::io::Result<TcpStream> {
        let tcp = self
            .t
            .client_connect(public(port), Duration::from_secs(5))?;
        tcp.set_read_timeout(Some(PATIENCE))?;
        tcp.set_write_timeout(Some(PATIENCE))?;
        Ok(tcp)
    }

    /// Whether a new connection through the P2P route echoes.
    fn echoes(&self) -> bool {
        self.connect(P2P_PORT)
            .and_then(|mut tcp| {
                tcp.set_read_timeout(Some(Duration::from_secs(5)))?;
                echo_once(&mut tcp, b"ping")
            })
            .unwrap_or(false)
    }

    /// Whether a new connection to `port` is closed by the sentry without a byte of data,
    /// within `within`.
    fn closed_at_once(&self, port: u16, within: Duration) -> bool {
        let Ok(mut tcp) = self.connect(port) else {
            return false;
        };
        tcp.set_read_timeout(Some(within)).unwrap();
        let _ = tcp.write_all(b"ping");
        let mut buf = [0u8; 16];
        match tcp.read(&mut buf) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => matches!(
                e.kind(),
                ErrorKind::ConnectionReset | ErrorKind::BrokenPipe | ErrorKind::ConnectionAborted
            ),
        }
    }
}

fn echo_once(tcp: &mut TcpStream, message: &[u8]) -> std::io::Result<bool> {
    tcp.write_all(message)?;
    let mut buf = vec![0u8; message.len()];
    tcp.read_exact(&mut buf)?;
    Ok(buf == message)
}

/// Poll `condition` every 100 ms until it holds or `within` passes; whether it held, and when.
fn wait_until(within: Duration, mut condition: impl FnMut() -> bool) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < within {
        if condition() {
            return Some(started.elapsed());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}

fn deployment() -> Option<Deployment> {
    Topology::new().map(Deployment::new)
}

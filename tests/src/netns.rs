//! The real-network topology: four network namespaces joined by veth links (MTU 1500), with a
//! NAT router between the public segment and the validator's LAN.
//!
//! ```text
//!  client 203.0.113.10 ─┐
//!                       ├─ bridge "pub" ── router 203.0.113.2 │ 198.51.100.1 ── validator 198.51.100.10
//!  sentry 203.0.113.1 ──┘    (in router)     MASQUERADE out, nothing forwarded in
//! ```
//!
//! Only documentation addresses are used, and traffic never leaves these namespaces. Names
//! carry this process's PID and a counter, so parallel tests and parallel runs cannot collide.
//! Dropping the topology deletes the namespaces (also when a test panics).
//!
//! Sockets are created inside a namespace by a short-lived thread that has entered it
//! ([`Topology::enter`]); a socket stays in the namespace it was created in, so the test can use
//! it from any thread afterwards.
#![allow(clippy::disallowed_methods)] // plain deadlines in test helpers; the clock rule is for relay-core

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::AsFd;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use rustix::thread::LinkNameSpaceType;

use crate::daemon::Daemon;

/// The public peers and RPC users.
pub const CLIENT: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
/// The sentry's public address.
pub const SENTRY: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
/// The router's public address: what the sentry sees as the agent's source.
pub const ROUTER_WAN: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 2);
/// The router's LAN address, the validator's gateway.
pub const ROUTER_LAN: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
/// The validator's private address.
pub const VALIDATOR: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
/// The router forgets a UDP mapping after this long without traffic. Shorter than the 30 s of
/// common NATs, to keep the tier fast; still longer than the tunnel's keep-alive interval.
pub const NAT_UDP_TIMEOUT: Duration = Duration::from_secs(12);

/// One of the four hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Host {
    Client,
    Sentry,
    Router,
    Validator,
}

impl Host {
    const ALL: [Self; 4] = [Self::Client, Self::Sentry, Self::Router, Self::Validator];

    /// The host's short name, as in its namespace's.
    #[must_use]
    pub fn short(self) -> &'static str {
        match self {
            Self::Client => "client",
            Self::Sentry => "sentry",
            Self::Router => "router",
            Self::Validator => "validator",
        }
    }
}

/// The four namespaces of one test, and a temp dir for its config and key files.
pub struct Topology {
    prefix: String,
    created: Vec<String>,
    dir: tempfile::TempDir,
}

impl Drop for Topology {
    fn drop(&mut self) {
        for ns in self.created.drain(..).rev() {
            let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        }
    }
}

fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
}

fn check(program: &str, args: &[&str]) -> String {
    let out = run(program, args);
    assert!(
        out.status.success(),
        "`{program} {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Why this tier cannot run here, if it cannot.
fn unavailable() -> Option<String> {
    if !rustix::process::geteuid().is_root() {
        return Some("not root: network namespaces need root".into());
    }
    for (program, arg) in [
        ("ip", "-V"),
        ("iptables", "--version"),
        ("conntrack", "--version"),
    ] {
        match Command::new(program).arg(arg).output() {
            Ok(out) if out.status.success() => {}
            _ => return Some(format!("`{program}` is not installed")),
        }
    }
    None
}

fn skip_or_fail(why: &str) {
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("the real-network tier cannot run in CI: {why}");
    }
    eprintln!("real-network tier skipped: {why}");
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// Move the calling thread into network namespace `ns` (a name from [`Topology::ns`]); the
/// sockets it creates from then on belong there. For a thread of its own: it never leaves.
pub fn enter_ns(ns: &str) {
    let path = format!("/run/netns/{ns}");
    let file = File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    rustix::thread::move_into_link_name_space(file.as_fd(), Some(LinkNameSpaceType::Network))
        .unwrap_or_else(|e| panic!("entering {path}: {e}"));
}

impl Topology {
    /// Build the topology; `None` (with the reason printed) where it cannot be built outside
    /// CI. Under `CI=true` it panics instead, so CI can never skip this tier silently.
    #[must_use]
    pub fn new() -> Option<Self> {
        if let Some(why) = unavailable() {
            skip_or_fail(&why);
            return None;
        }
        let prefix = format!(
            "sentry-t{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let mut topology = Self {
            prefix,
            created: Vec::new(),
            dir: tempfile::tempdir().unwrap(),
        };
        for host in Host::ALL {
            let ns = topology.ns(host);
            let out = run("ip", &["netns", "add", &ns]);
            if !out.status.success() {
                skip_or_fail(&format!(
                    "cannot create a network namespace: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
                return None;
            }
            topology.created.push(ns);
        }
        topology.wire();
        Some(topology)
    }

    fn wire(&self) {
        let [c, s, r, v] = Host::ALL.map(|h| self.ns(h));
        for ns in [&c, &s, &r, &v] {
            check("ip", &["-n", ns, "link", "set", "lo", "up"]);
        }
        // The public segment is a bridge inside the router's namespace.
        check("ip", &["-n", &r, "link", "add", "pub", "type", "bridge"]);
        check("ip", &["-n", &r, "link", "set", "pub", "up"]);
        for (ns, peer) in [(&c, "c"), (&s, "s"), (&v, "lan")] {
            check(
                "ip",
                &[
                    "link", "add", "name", "eth0", "netns", ns, "mtu", "1500", "type", "veth",
                    "peer", "name", peer, "netns", &r, "mtu", "1500",
                ],
            );
            check("ip", &["-n", ns, "link", "set", "eth0", "up"]);
            check("ip", &["-n", &r, "link", "set", peer, "up"]);
        }
        for peer in ["c", "s"] {
            check("ip", &["-n", &r, "link", "set", peer, "master", "pub"]);
        }
        let addr = |ns: &str, dev: &str, ip: Ipv4Addr, len: u8| {
            check(
                "ip",
                &["-n", ns, "addr", "add", &format!("{ip}/{len}"), "dev", dev],
            );
        };
        addr(&c, "eth0", CLIENT, 24);
        addr(&s, "eth0", SENTRY, 24);
        addr(&r, "pub", ROUTER_WAN, 24);
        addr(&r, "lan", ROUTER_LAN, 24);
        addr(&v, "eth0", VALIDATOR, 24);
        let gateway = ROUTER_LAN.to_string();
        check(
            "ip",
            &["-n", &v, "route", "add", "default", "via", &gateway],
        );
        // The public hosts know the way to the LAN, so the test that they cannot reach it
        // shows the router's policy, not a missing route.
        let wan = ROUTER_WAN.to_string();
        for ns in [&c, &s] {
            check(
                "ip",
                &["-n", ns, "route", "add", "198.51.100.0/24", "via", &wan],
            );
        }
        let timeout = NAT_UDP_TIMEOUT.as_secs().to_string();
        self.sh(Host::Router, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        self.sh(
            Host::Router,
            &[
                "sysctl",
                "-qw",
                &format!("net.netfilter.nf_conntrack_udp_timeout={timeout}"),
                &format!("net.netfilter.nf_conntrack_udp_timeout_stream={timeout}"),
            ],
        );
        self.iptables(&["-P", "FORWARD", "DROP"]);
        // Bridged traffic between public hosts also passes FORWARD (br_netfilter): allowed.
        self.iptables(&["-A", "FORWARD", "-i", "pub", "-o", "pub", "-j", "ACCEPT"]);
        self.iptables(&["-A", "FORWARD", "-i", "lan", "-o", "pub", "-j", "ACCEPT"]);
        self.iptables(&[
            "-A",
            "FORWARD",
            "-i",
            "pub",
            "-o",
            "lan",
            "-m",
            "conntrack",
            "--ctstate",
            "ESTABLISHED,RELATED",
            "-j",
            "ACCEPT",
        ]);
        // Random source ports for every new mapping, as carrier-grade NATs do: a mapping that
        // expired and was made again shows as a changed port.
        self.iptables(&[
            "-t",
            "nat",
            "-A",
            "POSTROUTING",
            "-s",
            "198.51.100.0/24",
            "-o",
            "pub",
            "-j",
            "MASQUERADE",
            "--random-fully",
        ]);
    }

    /// The namespace name of `host`.
    #[must_use]
    pub fn ns(&self, host: Host) -> String {
        format!("{}-{}", self.prefix, host.short())
    }

    /// The temp dir holding this test's files.
    #[must_use]
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Run a command inside `host`; panics on failure; its stdout.
    pub fn sh(&self, host: Host, args: &[&str]) -> String {
        let ns = self.ns(host);
        let mut full = vec!["netns", "exec", &ns];
        full.extend_from_slice(args);
        check("ip", &full)
    }

    /// Run a command inside `host`; its output, success or not.
    pub fn try_sh(&self, host: Host, args: &[&str]) -> Output {
        let ns = self.ns(host);
        let mut full = vec!["netns", "exec", &ns];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// `iptables` on the router.
    pub fn iptables(&self, args: &[&str]) {
        let mut full = vec!["iptables", "-w"];
        full.extend_from_slice(args);
        self.sh(Host::Router, &full);
    }

    /// The router's UDP conntrack entries from the validator, one per line.
    #[must_use]
    pub fn udp_mappings(&self) -> Vec<String> {
        let out = self.try_sh(
            Host::Router,
            &[
                "conntrack",
                "-L",
                "-p",
                "udp",
                "--orig-src",
                &VALIDATOR.to_string(),
            ],
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// The public source port the router gave the validator's UDP flow to `dport`, if mapped.
    #[must_use]
    pub fn mapped_port(&self, dport: u16) -> Option<u16> {
        self.udp_mappings().iter().find_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let ports: Vec<&str> = fields
                .iter()
                .filter_map(|f| f.strip_prefix("dport="))
                .collect();
            // Original direction first, reply direction second: the reply's dport is the
            // port the NAT chose.
            (ports.first() == Some(&dport.to_string().as_str()))
                .then(|| ports.get(1).and_then(|p| p.parse().ok()))
                .flatten()
        })
    }

    /// Drop every UDP mapping of the router (the NAT forgets the tunnel's flow).
    pub fn flush_udp_mappings(&self) {
        // Exits non-zero when there was nothing to delete; either way the table is empty.
        let _ = self.try_sh(Host::Router, &["conntrack", "-D", "-p", "udp"]);
    }

    /// Run `f` on a thread inside `host`'s namespace; sockets it creates belong there.
    pub fn enter<T: Send>(&self, host: Host, f: impl FnOnce() -> T + Send) -> T {
        let ns = self.ns(host);
        std::thread::scope(|scope| {
            let thread = scope.spawn(|| {
                enter_ns(&ns);
                f()
            });
            thread
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// A TCP connection from the client host, or the error (bounded by `within`).
    pub fn client_connect(&self, to: SocketAddr, within: Duration) -> std::io::Result<TcpStream> {
        self.enter(Host::Client, || TcpStream::connect_timeout(&to, within))
    }

    /// Start `sentry ROLE --config CONFIG` inside `host`.
    #[must_use]
    pub fn daemon(&self, host: Host, role: &str, config: &Path) -> Daemon {
        Daemon::start_in(Some(&self.ns(host)), role, config)
    }
}

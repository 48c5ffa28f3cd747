//! Where the suite runs: every process on loopback, or the namespace topology of the
//! real-network tier (a client on the public segment, the sentry host, a NAT router with
//! iptables MASQUERADE, the validator on its LAN; veth MTU 1500), with a tokio runtime per host
//! whose threads live in that host's namespace.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tests::daemon::Daemon;
use tests::netns::{Host, ROUTER_WAN, SENTRY, Topology, VALIDATOR, enter_ns};
use tokio::runtime::Runtime;

const PATIENCE: Duration = Duration::from_secs(30);

/// Loopback, or the namespace topology.
pub enum Site {
    Loopback,
    Netns(Topology),
}

impl Site {
    /// A short name for reports.
    #[must_use]
    pub fn name(&self) -> &'static str {
        match self {
            Self::Loopback => "loopback",
            Self::Netns(_) => "namespace topology",
        }
    }

    /// The namespace of `host` (none on loopback, where every host is this machine).
    #[must_use]
    pub fn ns(&self, host: Host) -> Option<String> {
        match self {
            Self::Loopback => None,
            Self::Netns(t) => Some(t.ns(host)),
        }
    }

    /// The address `host` listens on and is reached at.
    #[must_use]
    pub fn ip(&self, host: Host) -> IpAddr {
        match (self, host) {
            (Self::Loopback, _) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            (Self::Netns(_), Host::Sentry) => IpAddr::V4(SENTRY),
            (Self::Netns(_), Host::Validator) => IpAddr::V4(VALIDATOR),
            (Self::Netns(_), Host::Router) => IpAddr::V4(ROUTER_WAN),
            (Self::Netns(_), Host::Client) => IpAddr::V4(tests::netns::CLIENT),
        }
    }

    /// A multi-threaded runtime whose threads are all inside `host`'s namespace, so every
    /// socket its tasks open belongs there. Run work on it with [`run`].
    ///
    /// # Panics
    /// The runtime cannot be built.
    #[must_use]
    pub fn runtime(&self, host: Host) -> Runtime {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.enable_all();
        // Named per host, so the suite can read one host's threads (an in-process relay's
        // CPU) apart from the others'.
        builder.thread_name(format!("bench-{}", host.short()));
        if let Some(ns) = self.ns(host) {
            builder.on_thread_start(move || enter_ns(&ns));
        }
        builder.build().expect("tokio runtime")
    }

    /// `sentry ROLE --config CONFIG` inside `host`.
    #[must_use]
    pub fn daemon(&self, host: Host, role: &str, config: &Path) -> Daemon {
        Daemon::start_in(self.ns(host).as_deref(), role, config)
    }

    /// A command run inside `host` (`ip netns exec` execs it, so the child's PID is its own).
    #[must_use]
    pub fn command(&self, host: Host, program: &Path) -> Command {
        match self.ns(host) {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &ns]).arg(program);
                c
            }
            None => Command::new(program),
        }
    }

    /// A temp dir for this site's files.
    #[must_use]
    pub fn dir(&self) -> PathBuf {
        let dir = match self {
            Self::Loopback => {
                std::env::temp_dir().join(format!("sentry-suite-{}-loopback", std::process::id()))
            }
            Self::Netns(t) => t.dir().to_owned(),
        };
        std::fs::create_dir_all(&dir).expect("temp dir");
        dir
    }
}

/// Run `work` as a task of `runtime` (so inside its namespace) and wait for its result.
///
/// # Panics
/// The task panicked.
pub fn run<T: Send + 'static>(
    runtime: &Runtime,
    work: impl std::future::Future<Output = T> + Send + 'static,
) -> T {
    runtime
        .block_on(runtime.spawn(work))
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic.into_panic()))
}

/// The router forwards its public TCP ports `ports` (first:last) to the validator: the
/// `direct` path, kernel forwarding with no relay and no tunnel.
pub fn port_forward(t: &Topology, first: u16, last: u16) {
    let ports = format!("{first}:{last}");
    let validator = VALIDATOR.to_string();
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
        &validator,
    ]);
    t.iptables(&[
        "-A", "FORWARD", "-i", "pub", "-o", "lan", "-d", &validator, "-p", "tcp", "--dport",
        &ports, "-j", "ACCEPT",
    ]);
}

/// wireguard-go on the sentry host and on the validator, stopped when dropped.
pub struct WireGuardGo {
    /// (host, process) for the sentry end and the validator end.
    pub ends: Vec<(Host, Child)>,
}

impl Drop for WireGuardGo {
    fn drop(&mut self) {
        for (_, child) in &mut self.ends {
            // By PID, never by name.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The sentry host's and the validator's overlay addresses on the wireguard-go path.
pub const WG_GO_SENTRY: Ipv4Addr = Ipv4Addr::new(100, 64, 1, 1);
pub const WG_GO_VALIDATOR: Ipv4Addr = Ipv4Addr::new(100, 64, 1, 2);

/// The hand-built alternative to a sentry: wireguard-go on a TUN device on the sentry host
/// (100.64.1.1, UDP 51821) and on the validator (100.64.1.2, keepalive 5 s, dialing out through
/// the NAT), kernel TCP inside. `None` when wireguard-go or wg is not installed.
///
/// # Panics
/// A command fails, or the peers do not handshake within 30 s.
#[must_use]
pub fn wireguard_go(t: &Topology) -> Option<WireGuardGo> {
    let have = Command::new("wg")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
        && Path::new("/usr/bin/wireguard-go").exists();
    if !have {
        eprintln!("wireguard-go or wg not installed: that path is skipped");
        return None;
    }
    let id = std::process::id() % 10_000;
    let mut wg = WireGuardGo { ends: Vec::new() };
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
        wg.ends.push((host, child));
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
    let (sentry_pub, validator_pub) = (keys[0].3.clone(), keys[1].3.clone());
    let endpoint = SocketAddr::from((SENTRY, 51821)).to_string();
    for (host, iface, key, _) in &keys {
        let sentry_end = *host == Host::Sentry;
        let (own, peer, peer_pub) = if sentry_end {
            (WG_GO_SENTRY, WG_GO_VALIDATOR, &validator_pub)
        } else {
            (WG_GO_VALIDATOR, WG_GO_SENTRY, &sentry_pub)
        };
        let allowed = format!("{peer}/32");
        let mut set = vec![
            "wg",
            "set",
            iface,
            "private-key",
            key.to_str().expect("path"),
        ];
        if sentry_end {
            set.extend([
                "listen-port",
                "51821",
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
    // The validator's keepalive makes the handshake.
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

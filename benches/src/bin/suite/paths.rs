//! The paths under test: the sentry over each transport, rathole, and what they need
//! (identities, ports, a probe).

use std::path::PathBuf;

use super::*;

/// What a sentry and an agent over one transport need: their keys (and key files), the
/// sentry's tunnel listener lines, and the overlay line of its `[[agent]]` entry.
pub(super) struct Ends {
    pub(super) sentry_key: PrivateKey,
    pub(super) agent_key: PrivateKey,
    pub(super) sentry_file: PathBuf,
    pub(super) agent_file: PathBuf,
    pub(super) listener: String,
    pub(super) agent_overlay: &'static str,
}

impl Ends {
    pub(super) fn new(site: &Site, dir: &Path, transport: &str) -> Self {
        let sentry_key = PrivateKey::generate().expect("key");
        let agent_key = PrivateKey::generate().expect("key");
        let key_file = |name: &str, key: &PrivateKey| {
            let path = dir.join(format!("{transport}-{name}.key"));
            write_private_key(&path, key).expect("key file");
            path
        };
        let ip = site.ip(Host::Sentry);
        let (listener, agent_overlay) = match transport {
            "wireguard" => (
                format!("wireguard_listen = \"{ip}:0\"\nwireguard_address = \"100.64.0.1\"\n"),
                "wireguard_address = \"100.64.0.2\"\n",
            ),
            "tls" => (format!("tls_listen = \"{ip}:0\"\n"), ""),
            _ => (String::new(), ""),
        };
        Self {
            sentry_file: key_file("sentry", &sentry_key),
            agent_file: key_file("agent", &agent_key),
            sentry_key,
            agent_key,
            listener,
            agent_overlay,
        }
    }

    /// Where the agent dials the running `sentry` over `transport` (read from its log), and
    /// the overlay lines of the agent's `[[sentry]]` entry.
    pub(super) fn dial(sentry: &Daemon, transport: &str) -> (SocketAddr, &'static str) {
        match transport {
            "wireguard" => (
                sentry.logged_addr("WireGuard listening", &[], "listen"),
                "wireguard_address = \"100.64.0.2\"\nsentry_wireguard_address = \"100.64.0.1\"\n",
            ),
            "tls" => (
                sentry.logged_addr("TLS tunnel listening", &[], "listen"),
                "",
            ),
            _ => (sentry.logged_addr("sentry ready", &[], "quic"), ""),
        }
    }
}

/// The release `sentry serve` on the sentry host and `sentry agent` on the validator over
/// `transport`. Every port is chosen by the kernel (a fixed one may be held by an earlier
/// run's connections) and read back from the sentry's log.
pub(super) fn sentry_path(
    site: &Site,
    dir: &Path,
    transport: &str,
    to: &Routes,
    idle: usize,
) -> PathUnderTest {
    let ends = Ends::new(site, dir, transport);
    let (sk, ak, listener, sentry_agent_extra) = (
        &ends.sentry_file,
        &ends.agent_file,
        &ends.listener,
        ends.agent_overlay,
    );
    let (sentry_key, agent_key) = (&ends.sentry_key, &ends.agent_key);
    let ip = site.ip(Host::Sentry);
    // The idle run holds many connections from one address: every cap is lifted above it.
    let cap = 2 * idle + 1000;
    let mut sentry = format!(
        "[sentry]\nprivate_key = \"{}\"\nquic_listen = \"{ip}:0\"\nmax_connections = {cap}\n\
         {listener}\n[[agent]]\nname = \"bench\"\npublic_key = \"{}\"\n{sentry_agent_extra}",
        sk.display(),
        agent_key.public_key()
    );
    let services = [("echo", to.echo), ("sink", to.sink), ("source", to.source)];
    for (name, _) in services {
        sentry += &format!(
            "\n[[route]]\nname = \"{name}\"\nlisten = \"{ip}:0\"\nupstream = [\"bench/{name}\"]\n\
             max_connections = {cap}\nmax_connections_per_ip = {cap}\n\
             connect_rate_per_ip = \"1000000/s\"\n"
        );
    }
    let sentry_path = dir.join(format!("{transport}-sentry.toml"));
    std::fs::write(&sentry_path, sentry).expect("write");
    let sentry = site.daemon(Host::Sentry, "serve", &sentry_path);
    let (dial, agent_extra) = Ends::dial(&sentry, transport);
    let mut agent = format!(
        "[agent]\nname = \"bench\"\nprivate_key = \"{}\"\nmax_streams_per_sentry = {cap}\n\n\
         [[sentry]]\naddress = \"{dial}\"\npublic_key = \"{}\"\ntransport = \"{transport}\"\n{agent_extra}",
        ak.display(),
        sentry_key.public_key()
    );
    for (name, target) in services {
        agent += &format!(
            "\n[[service]]\nname = \"{name}\"\ntarget = \"{target}\"\nmax_connections = {cap}\n"
        );
    }
    let agent_path = dir.join(format!("{transport}-agent.toml"));
    std::fs::write(&agent_path, agent).expect("write");
    let agent = site.daemon(Host::Validator, "agent", &agent_path);
    sentry.wait_log("tunnel up", 1, Duration::from_secs(30));
    let route = |name: &str| sentry.logged_addr("route listening", &[("route", name)], "listen");
    let routes = Routes {
        echo: route("echo"),
        sink: route("sink"),
        source: route("source"),
    };
    let (name, transport) = match transport {
        "quic" => ("sentry (QUIC)", "quic"),
        "wireguard" => ("sentry (WireGuard)", "wireguard"),
        _ => ("sentry (TLS)", "tls"),
    };
    PathUnderTest {
        name: name.into(),
        routes,
        ends: vec![
            ("sentry", Process::Sentry(sentry)),
            ("agent", Process::Sentry(agent)),
        ],
        kind: Kind::Sentry(transport),
    }
}

/// A port for rathole's config (it needs fixed ones): chosen by the kernel on loopback, where
/// earlier runs may hold ports; from a fixed range in the topology's fresh namespace.
pub(super) fn rathole_port(site: &Site, index: u16, which: u16) -> u16 {
    match site {
        Site::Loopback => std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port"),
        Site::Netns(_) => 2333 + 10 * index + which,
    }
}

/// rathole server on the sentry host and client on the validator with `transport` (noise:
/// its default Noise_NK pattern; tls), the three services on their own ports.
pub(super) fn rathole_path(
    site: &Site,
    rt: &Runtimes,
    dir: &Path,
    bin: &Path,
    transport: &str,
    to: &Routes,
    index: u16,
) -> PathUnderTest {
    let keys = Command::new(bin)
        .arg("--genkey")
        .output()
        .expect("rathole --genkey");
    let text = String::from_utf8_lossy(&keys.stdout).into_owned();
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let after = |label: &str| {
        lines
            .iter()
            .position(|l| l.to_lowercase().starts_with(label))
            .and_then(|i| lines.get(i + 1))
            .map(|s| (*s).to_owned())
            .unwrap_or_else(|| panic!("rathole --genkey printed no {label}:\n{text}"))
    };
    let (private, public) = (after("private key"), after("public key"));
    let at = |port: u16| SocketAddr::new(site.ip(Host::Sentry), port);
    let control = at(rathole_port(site, index, 0));
    let ports = [1, 2, 3].map(|which| rathole_port(site, index, which));
    let (server_transport, client_transport) = if transport == "tls" {
        (
            format!(
                "[server.transport.tls]\npkcs12 = \"{}\"\npkcs12_password = \"bench\"\n",
                dir.join("rathole.pfx").display()
            ),
            format!(
                "[client.transport.tls]\ntrusted_root = \"{}\"\nhostname = \"localhost\"\n",
                dir.join("rathole.crt").display()
            ),
        )
    } else {
        (
            format!("[server.transport.noise]\nlocal_private_key = \"{private}\"\n"),
            format!("[client.transport.noise]\nremote_public_key = \"{public}\"\n"),
        )
    };
    let mut server = format!(
        "[server]\nbind_addr = \"{control}\"\ndefault_token = \"bench\"\n\n[server.transport]\n\
         type = \"{transport}\"\n{server_transport}"
    );
    let mut client = format!(
        "[client]\nremote_addr = \"{control}\"\ndefault_token = \"bench\"\n\n[client.transport]\n\
         type = \"{transport}\"\n{client_transport}"
    );
    for (j, (name, target)) in [("echo", to.echo), ("sink", to.sink), ("source", to.source)]
        .into_iter()
        .enumerate()
    {
        server += &format!(
            "\n[server.services.{name}]\nbind_addr = \"{}\"\n",
            at(ports[j])
        );
        client += &format!("\n[client.services.{name}]\nlocal_addr = \"{target}\"\n");
    }
    let server_path = dir.join(format!("rathole-{transport}-server.toml"));
    let client_path = dir.join(format!("rathole-{transport}-client.toml"));
    std::fs::write(&server_path, server).expect("write");
    std::fs::write(&client_path, client).expect("write");
    let spawn = |host: Host, flag: &str, path: &Path| {
        site.command(host, bin)
            .arg(flag)
            .arg(path)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("rathole")
    };
    let server = Process::Other(spawn(Host::Sentry, "--server", &server_path));
    let client = Process::Other(spawn(Host::Validator, "--client", &client_path));
    // Ready once a connection through it echoes.
    let echo = at(ports[0]);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !run(&rt.client, echo_once(echo)) {
        assert!(
            std::time::Instant::now() < deadline,
            "rathole did not come up in 30 s"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    PathUnderTest {
        name: format!("rathole ({transport})"),
        routes: Routes {
            echo,
            sink: at(ports[1]),
            source: at(ports[2]),
        },
        ends: vec![("server", server), ("client", client)],
        kind: Kind::Rathole(if transport == "tls" { "tls" } else { "noise" }, index),
    }
}

pub(super) async fn echo_once(addr: SocketAddr) -> bool {
    let once = async {
        let mut held = load::hold_idle(addr, 1).await?;
        drop(held.pop());
        Ok::<_, std::io::Error>(())
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(1), once).await,
        Ok(Ok(()))
    )
}

/// Whether this rathole build has its TLS transport (`--version` lists its cargo features).
pub(super) fn rathole_has_tls(bin: &Path) -> bool {
    Command::new(bin).arg("--version").output().is_ok_and(|o| {
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .any(|l| l.starts_with("cargo Features:") && l.contains("tls"))
    })
}

/// A self-signed identity for rathole's TLS transport (`rathole.crt`, and `rathole.pfx` with
/// password "bench"), made with the openssl tool; whether it worked.
pub(super) fn tls_identity(dir: &Path) -> bool {
    let (key, crt, pfx) = (
        dir.join("rathole.key"),
        dir.join("rathole.crt"),
        dir.join("rathole.pfx"),
    );
    let run = |args: &[&str]| {
        Command::new("openssl")
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let path = |p: &Path| p.display().to_string();
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=localhost",
        "-addext",
        "subjectAltName=DNS:localhost",
        "-keyout",
        &path(&key),
        "-out",
        &path(&crt),
    ]) && run(&[
        "pkcs12",
        "-export",
        "-out",
        &path(&pfx),
        "-inkey",
        &path(&key),
        "-in",
        &path(&crt),
        "-passout",
        "pass:bench",
    ])
}

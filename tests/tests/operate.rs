//! Operating the built binary on loopback: SIGHUP reload, SIGTERM drain, metrics and health,
//! and the systemd notify protocol.
//!
//! Every daemon listens on port 0 and the tests read the bound addresses from its JSON log,
//! so nothing races for a port.
#![allow(clippy::unwrap_used, clippy::disallowed_methods)]

use relay_core::reload::Reload;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use relay_core::keys::{self, PrivateKey};
use rustix::process::Signal;
use tests::daemon::Daemon;
use tests::{PATIENCE, http_get, metric, payload_blocks};

/// Keys and config files of one sentry and one agent in a temp dir.
struct Setup {
    dir: tempfile::TempDir,
    agent_pub: String,
    sentry_pub: String,
    echo: SocketAddr,
}

impl Setup {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut pubs = Vec::new();
        for name in ["sentry.key", "agent.key"] {
            let key = PrivateKey::generate().unwrap();
            keys::write_private_key(&dir.path().join(name), &key).unwrap();
            pubs.push(key.public_key().to_string());
        }
        let agent_pub = pubs.pop().unwrap();
        let sentry_pub = pubs.pop().unwrap();
        Self {
            dir,
            agent_pub,
            sentry_pub,
            echo: echo_server(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Write sentry.toml: `sentry_extra` lines in `[sentry]`, then one route per
    /// `(name, extra lines)`, each to the agent's echo service.
    fn write_sentry(&self, sentry_extra: &str, routes: &[(&str, &str)]) -> PathBuf {
        let mut text = format!(
            "[sentry]\nprivate_key = \"sentry.key\"\nquic_listen = \"127.0.0.1:0\"\n\
             metrics_listen = \"127.0.0.1:0\"\n{sentry_extra}\n\
             [[agent]]\nname = \"validator-1\"\npublic_key = \"{}\"\n",
            self.agent_pub
        );
        for (name, extra) in routes {
            text += &format!(
                "\n[[route]]\nname = \"{name}\"\nlisten = \"127.0.0.1:0\"\n\
                 upstream = [\"validator-1/echo\"]\n{extra}\n"
            );
        }
        let path = self.path("sentry.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    /// Write agent.toml: dial the sentry at `quic`, export the echo service as `service`.
    fn write_agent(&self, quic: SocketAddr, service: &str) -> PathBuf {
        let text = format!(
            "[agent]\nname = \"validator-1\"\nprivate_key = \"agent.key\"\n\
             metrics_listen = \"127.0.0.1:0\"\n\n\
             [[sentry]]\naddress = \"{quic}\"\npublic_key = \"{}\"\n\n\
             [[service]]\nname = \"{service}\"\ntarget = \"{}\"\n",
            self.sentry_pub, self.echo
        );
        let path = self.path("agent.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    /// Start the sentry with `routes`, then the agent; return once the tunnel is up.
    fn start(&self, sentry_extra: &str, routes: &[(&str, &str)]) -> (Daemon, Daemon) {
        let sentry = Daemon::start("serve", &self.write_sentry(sentry_extra, routes));
        let quic = sentry.logged_addr("sentry ready", &[], "quic");
        let agent = Daemon::start("agent", &self.write_agent(quic, "echo"));
        sentry.wait_log("tunnel up", 1, PATIENCE);
        (sentry, agent)
    }
}

fn route_addr(sentry: &Daemon, route: &str) -> SocketAddr {
    sentry.logged_addr("route listening", &[("route", route)], "listen")
}

fn metrics_addr(daemon: &Daemon) -> SocketAddr {
    daemon.logged_addr("metrics listening", &[], "listen")
}

fn echo_server() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut tcp in listener.incoming().map_while(Result::ok) {
            std::thread::spawn(move || {
                let mut buf = [0u8; 64 * 1024];
                while let Ok(n) = tcp.read(&mut buf) {
                    if n == 0 || tcp.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

/// One short echo exchange through `addr`.
fn echo_through(addr: SocketAddr) -> std::io::Result<Vec<u8>> {
    let mut tcp = TcpStream::connect(addr)?;
    tcp.set_read_timeout(Some(PATIENCE))?;
    tcp.write_all(b"through the tunnel")?;
    let mut buf = vec![0u8; 18];
    tcp.read_exact(&mut buf)?;
    Ok(buf)
}

/// Whether `addr` refuses new clients: the connect fails, or the connection is closed
/// without an answer.
fn refuses(addr: SocketAddr) -> bool {
    match TcpStream::connect(addr) {
        Err(_) => true,
        Ok(mut tcp) => {
            tcp.set_read_timeout(Some(PATIENCE)).unwrap();
            let _ = tcp.write_all(b"hello?");
            let mut buf = [0u8; 16];
            matches!(tcp.read(&mut buf), Ok(0) | Err(_))
        }
    }
}

/// A hash-checked echo transfer that holds its connection open until released: it writes the
/// first half of `len` bytes, waits on the returned sender, then writes the rest. Joins to
/// whether every byte came back intact.
fn held_transfer(addr: SocketAddr, len: usize) -> (mpsc::Sender<()>, JoinHandle<bool>) {
    let (release, released) = mpsc::channel::<()>();
    let mut tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut reader = tcp.try_clone().unwrap();
    let blocks: Vec<Vec<u8>> = payload_blocks(7, len).collect();
    let expected = {
        let mut sha = ring::digest::Context::new(&ring::digest::SHA256);
        blocks.iter().for_each(|b| sha.update(b));
        sha.finish().as_ref().to_vec()
    };
    // The first block goes through before this returns, so the connection is relayed end
    // to end (the agent has looked up its service) before the caller changes anything.
    tcp.write_all(&blocks[0]).unwrap();
    let mut first = vec![0u8; blocks[0].len()];
    reader.read_exact(&mut first).unwrap();
    let writer = std::thread::spawn(move || {
        let half = blocks.len() / 2;
        for (i, block) in blocks.iter().enumerate().skip(1) {
            if i == half {
                released.recv_timeout(Duration::from_secs(60)).unwrap();
            }
            tcp.write_all(block).unwrap();
        }
        tcp.shutdown(std::net::Shutdown::Write).unwrap();
    });
    let check = std::thread::spawn(move || {
        let mut sha = ring::digest::Context::new(&ring::digest::SHA256);
        sha.update(&first);
        let mut buf = vec![0u8; 64 * 1024];
        let mut total = first.len();
        loop {
            match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    sha.update(&buf[..n]);
                    total += n;
                }
                Err(_) => return false,
            }
        }
        writer.join().unwrap();
        total == len && sha.finish().as_ref() == expected.as_slice()
    });
    (release, check)
}

fn sighup_and_wait(daemon: &Daemon, message: &str, nth: usize) {
    daemon.signal(Signal::HUP);
    daemon.wait_event(message, &[], nth, PATIENCE);
}

#[test]
fn reload_adds_and_removes_routes_without_cutting_open_connections() {
    let setup = Setup::new();
    let (sentry, _agent) = setup.start("", &[("p2p", "")]);
    let p2p = route_addr(&sentry, "p2p");
    let metrics = metrics_addr(&sentry);
    let (release, transfer) = held_transfer(p2p, 4 << 20);

    // Add a route.
    setup.write_sentry("", &[("p2p", ""), ("extra", "")]);
    sighup_and_wait(&sentry, "config reloaded", 0);
    let extra = route_addr(&sentry, "extra");
    assert_eq!(echo_through(extra).unwrap(), b"through the tunnel");
    assert_eq!(echo_through(p2p).unwrap(), b"through the tunnel");

    // Remove the route the held transfer runs on: new clients are refused, the open one
    // finishes intact.
    setup.write_sentry("", &[("extra", "")]);
    sighup_and_wait(&sentry, "config reloaded", 1);
    assert!(refuses(p2p), "a removed route still accepts");
    release.send(()).unwrap();
    assert!(
        transfer.join().unwrap(),
        "the transfer across two reloads was damaged"
    );

    // An invalid config is refused with its location, and nothing changes.
    setup.write_sentry("", &[("extra", "max_connections = 0")]);
    sighup_and_wait(&sentry, "config reload refused", 0);
    assert!(
        sentry.log().contains("sentry.toml:"),
        "the refusal should name the file: {}",
        sentry.log()
    );
    assert!(sentry.log().contains("route[0].max_connections"));
    assert_eq!(echo_through(extra).unwrap(), b"through the tunnel");
    let (_, text) = http_get(metrics, "/metrics");
    assert_eq!(
        metric(&text, "sentry_config_reloads_total", &[("result", "ok")]),
        Some(2.0)
    );
    assert_eq!(
        metric(&text, "sentry_config_reloads_total", &[("result", "error")]),
        Some(1.0)
    );
}

#[test]
fn reload_rereads_a_deny_file_for_new_connections_only() {
    let setup = Setup::new();
    let deny = setup.path("deny.txt");
    std::fs::write(&deny, "# nobody denied yet\n").unwrap();
    let (sentry, _agent) = setup.start("", &[("p2p", "deny_file = \"deny.txt\"")]);
    let p2p = route_addr(&sentry, "p2p");
    let (release, transfer) = held_transfer(p2p, 1 << 20);
    // Only the list file changes; the config file is the same.
    std::fs::write(&deny, "# loopback, for the test\n127.0.0.0/8\n").unwrap();
    sighup_and_wait(&sentry, "config reloaded", 0);
    assert!(refuses(p2p), "the reloaded deny file is not applied");
    release.send(()).unwrap();
    assert!(
        transfer.join().unwrap(),
        "a connection admitted before the reload was cut"
    );
    let (_, text) = http_get(metrics_addr(&sentry), "/metrics");
    assert_eq!(
        metric(
            &text,
            "sentry_route_connections_refused_total",
            &[("route", "p2p"), ("reason", "denied")]
        ),
        Some(1.0)
    );
}

#[test]
fn agent_reload_changes_services_for_new_streams_only() {
    let setup = Setup::new();
    let (sentry, agent) = setup.start("", &[("p2p", "")]);
    let p2p = route_addr(&sentry, "p2p");
    let quic = sentry.logged_addr("sentry ready", &[], "quic");
    let (release, transfer) = held_transfer(p2p, 1 << 20);
    // The route asks for "echo"; the agent now exports the same target only as "other".
    setup.write_agent(quic, "other");
    sighup_and_wait(&agent, "config reloaded", 0);
    assert!(
        refuses(p2p),
        "a service no longer exported is still reachable"
    );
    release.send(()).unwrap();
    assert!(
        transfer.join().unwrap(),
        "an open stream was cut by the reload"
    );
    let (_, text) = http_get(metrics_addr(&agent), "/metrics");
    assert_eq!(
        metric(
            &text,
            "sentry_agent_streams_total",
            &[("service", "-"), ("status", "unknown_service")]
        ),
        Some(1.0),
        "{text}"
    );
}

#[test]
fn sigterm_lets_an_open_stream_finish_and_exits_zero() {
    let setup = Setup::new();
    let (mut sentry, agent) = setup.start("drain_timeout = \"30s\"", &[("p2p", "")]);
    let p2p = route_addr(&sentry, "p2p");
    let (release, transfer) = held_transfer(p2p, 2 << 20);
    // Wait until the transfer is admitted and relaying before stopping.
    let (_, text) = http_get(metrics_addr(&sentry), "/metrics");
    assert_eq!(
        metric(
            &text,
            "sentry_route_connections_active",
            &[("route", "p2p")]
        ),
        Some(1.0),
        "{text}"
    );
    sentry.signal(Signal::TERM);
    sentry.wait_log("shutting down", 1, PATIENCE);
    assert!(refuses(p2p), "a draining sentry still accepts");
    release.send(()).unwrap();
    assert!(
        transfer.join().unwrap(),
        "the draining transfer was damaged"
    );
    // Well before the 30 s deadline.
    assert_eq!(sentry.wait_exit(Duration::from_secs(20)), Some(0));
    // The agent was told, not left to time out.
    agent.wait_log("sentry shutting down", 1, PATIENCE);
}

#[test]
fn sigterm_with_a_stream_that_never_ends_exits_at_the_deadline() {
    let setup = Setup::new();
    let (mut sentry, _agent) = setup.start("drain_timeout = \"2s\"", &[("p2p", "")]);
    let p2p = route_addr(&sentry, "p2p");
    let mut idle = TcpStream::connect(p2p).unwrap();
    idle.set_read_timeout(Some(PATIENCE)).unwrap();
    idle.write_all(b"ping").unwrap();
    let mut buf = [0u8; 4];
    idle.read_exact(&mut buf).unwrap();
    let signalled = Instant::now();
    sentry.signal(Signal::TERM);
    assert_eq!(sentry.wait_exit(PATIENCE), Some(0));
    let took = signalled.elapsed();
    assert!(
        took >= Duration::from_secs(2),
        "exited after {took:?}, before the drain deadline"
    );
    assert!(sentry.log().contains("drain deadline reached"));
    // The relayed connection is closed once the process is gone.
    assert!(matches!(idle.read(&mut buf), Ok(0) | Err(_)));
}

#[test]
fn a_second_signal_exits_at_once() {
    let setup = Setup::new();
    let (mut sentry, _agent) = setup.start("drain_timeout = \"60s\"", &[("p2p", "")]);
    let p2p = route_addr(&sentry, "p2p");
    let _held = held_transfer(p2p, 1 << 20);
    sentry.signal(Signal::TERM);
    sentry.wait_log("shutting down", 1, PATIENCE);
    sentry.signal(Signal::INT);
    assert_eq!(sentry.wait_exit(PATIENCE), Some(1));
    assert!(sentry.log().contains("second signal"));
}

#[test]
fn metrics_and_health_follow_traffic_refusals_and_tunnel_state() {
    let setup = Setup::new();
    let (sentry, mut agent) = setup.start("", &[("p2p", "deny = [\"127.0.0.2/32\"]")]);
    let p2p = route_addr(&sentry, "p2p");
    let sentry_metrics = metrics_addr(&sentry);
    let agent_metrics = metrics_addr(&agent);
    for _ in 0..3 {
        assert_eq!(echo_through(p2p).unwrap(), b"through the tunnel");
    }
    for _ in 0..2 {
        let socket =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        socket
            .bind(&"127.0.0.2:0".parse::<SocketAddr>().unwrap().into())
            .unwrap();
        socket.connect(&p2p.into()).unwrap();
        let mut tcp: TcpStream = socket.into();
        tcp.set_read_timeout(Some(PATIENCE)).unwrap();
        let mut buf = [0u8; 4];
        assert!(matches!(tcp.read(&mut buf), Ok(0) | Err(_)));
    }
    // Byte totals are complete once the relayed connections have closed.
    let deadline = Instant::now() + PATIENCE;
    let text = loop {
        let (status, text) = http_get(sentry_metrics, "/metrics");
        assert_eq!(status, 200);
        if metric(
            &text,
            "sentry_route_connections_active",
            &[("route", "p2p")],
        ) == Some(0.0)
            && metric(&text, "sentry_route_sent_bytes_total", &[("route", "p2p")]) == Some(54.0)
        {
            break text;
        }
        assert!(Instant::now() < deadline, "metrics did not settle:\n{text}");
        std::thread::sleep(Duration::from_millis(20));
    };
    let route = [("route", "p2p")];
    assert_eq!(
        metric(&text, "sentry_route_connections_accepted_total", &route),
        Some(3.0)
    );
    assert_eq!(
        metric(&text, "sentry_route_received_bytes_total", &route),
        Some(54.0)
    );
    assert_eq!(
        metric(
            &text,
            "sentry_route_connections_refused_total",
            &[("route", "p2p"), ("reason", "denied")]
        ),
        Some(2.0)
    );
    let tunnel = [("agent", "validator-1"), ("transport", "quic")];
    assert_eq!(metric(&text, "sentry_tunnel_up", &tunnel), Some(1.0));
    assert!(metric(&text, "sentry_tunnel_rtt_seconds", &tunnel).unwrap() > 0.0);
    assert!(text.ends_with("# EOF\n"), "not OpenMetrics text: {text}");
    let (status, body) = http_get(sentry_metrics, "/healthz");
    assert_eq!((status, body.starts_with("ok")), (200, true), "{body}");

    let (status, text) = http_get(agent_metrics, "/metrics");
    assert_eq!(status, 200);
    assert_eq!(
        metric(
            &text,
            "sentry_agent_streams_total",
            &[("service", "echo"), ("status", "ok")]
        ),
        Some(3.0)
    );
    assert_eq!(
        metric(
            &text,
            "sentry_agent_service_sent_bytes_total",
            &[("service", "echo")]
        ),
        Some(54.0)
    );
    let (status, body) = http_get(agent_metrics, "/healthz");
    assert_eq!((status, body.starts_with("ok")), (200, true), "{body}");
    assert_eq!(http_get(agent_metrics, "/nothing").0, 404);

    // The agent goes away: health turns 503 and says why; a client is refused and counted.
    agent.signal(Signal::TERM);
    assert_eq!(agent.wait_exit(PATIENCE), Some(0));
    sentry.wait_log("tunnel down", 1, PATIENCE);
    let (status, body) = http_get(sentry_metrics, "/healthz");
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("route p2p has no connected upstream"),
        "{body}"
    );
    assert!(refuses(p2p));
    let (_, text) = http_get(sentry_metrics, "/metrics");
    assert_eq!(metric(&text, "sentry_tunnel_up", &tunnel), Some(0.0));
    assert_eq!(
        metric(
            &text,
            "sentry_route_connections_refused_total",
            &[("route", "p2p"), ("reason", "no_upstream")]
        ),
        Some(1.0)
    );
}

/// What systemd would receive on `NOTIFY_SOCKET`.
struct NotifySocket {
    socket: UnixDatagram,
    path: PathBuf,
}

impl NotifySocket {
    fn bind(dir: &Path) -> Self {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        socket.set_read_timeout(Some(PATIENCE)).unwrap();
        Self { socket, path }
    }

    /// The next message that contains `wanted`; earlier ones are returned too.
    fn until(&self, wanted: &str) -> Vec<String> {
        let mut seen = Vec::new();
        let mut buf = vec![0u8; 4096];
        loop {
            let n = self
                .socket
                .recv(&mut buf)
                .unwrap_or_else(|e| panic!("no {wanted:?} (saw {seen:?}): {e}"));
            let message = String::from_utf8_lossy(&buf[..n]).into_owned();
            let done = message.contains(wanted);
            seen.push(message);
            if done {
                return seen;
            }
        }
    }
}

#[test]
fn systemd_hears_ready_reloading_watchdog_and_stopping() {
    let setup = Setup::new();
    let notify = NotifySocket::bind(setup.dir.path());
    let config = setup.write_sentry("", &[("p2p", "")]);
    let mut sentry = Daemon::start_with(
        None,
        "serve",
        &config,
        &[
            ("NOTIFY_SOCKET", notify.path.to_str().unwrap()),
            ("WATCHDOG_USEC", "200000"),
        ],
    );
    let first = notify.until("READY=1");
    assert!(first.iter().all(|m| !m.contains("STOPPING")), "{first:?}");
    // Ready only once the listeners are bound: the route answers now.
    let p2p = route_addr(&sentry, "p2p");
    assert!(TcpStream::connect(p2p).is_ok());
    // The watchdog is fed (every 100 ms for a 200 ms WatchdogSec).
    for _ in 0..3 {
        notify.until("WATCHDOG=1");
    }
    sentry.signal(Signal::HUP);
    let reload = notify.until("RELOADING=1");
    assert!(
        reload.last().unwrap().contains("MONOTONIC_USEC="),
        "{reload:?}"
    );
    notify.until("READY=1");
    sentry.signal(Signal::TERM);
    notify.until("STOPPING=1");
    assert_eq!(sentry.wait_exit(PATIENCE), Some(0));
}

/// A reload pins a new agent key for new tunnels, and an unpinned key gets no new tunnel,
/// while the tunnel it already has keeps serving.
#[tokio::test]
async fn reload_pins_and_unpins_agent_keys_for_new_tunnels() {
    use tests::{agent_config, echo_service, key, sentry_config, start_agent, start_sentry};
    let (sentry_key, v1_key, v2_key) = (key(), key(), key());
    let echo = echo_service().await;
    let one = sentry_config(&[("v1", &v1_key)], &[("p2p", &["v1/svc"], "")]);
    let sentry = start_sentry(&one, &sentry_key).await;
    let quic = sentry.handle.quic_addr().expect("quic_listen is set");
    let _v1 = start_agent(
        agent_config("v1", quic, &sentry_key, &[("svc", echo)]),
        v1_key.clone(),
    );
    sentry.wait_agent("v1", true).await;

    // v2 is not pinned yet: its handshake is refused.
    let v2_config = agent_config("v2", quic, &sentry_key, &[("svc", echo)]);
    let peer = &v2_config.sentries[0];
    let client = relay_core::transport::quic::client_config(
        &v2_key,
        peer.public_key,
        &relay_core::transport::quic::Tuning::default(),
    )
    .unwrap();
    assert!(
        refused(peer, &client, &v2_key).await,
        "an unpinned key got a tunnel"
    );

    let two = sentry_config(
        &[("v1", &v1_key), ("v2", &v2_key)],
        &[("p2p", &["v1/svc", "v2/svc"], "")],
    );
    let report = sentry.handle.reload(&two, &sentry_key).unwrap();
    assert_eq!(
        (report.kept, report.need_restart.len()),
        (1, 0),
        "{report:?}"
    );
    let _v2 = start_agent(v2_config.clone(), v2_key.clone());
    sentry.wait_agent("v2", true).await;

    // Unpin v1: its tunnel takes no new client (it leaves the registry at once, and closes
    // once its relayed connections end), and a new handshake with its key is refused.
    let only_v2 = sentry_config(&[("v2", &v2_key)], &[("p2p", &["v2/svc"], "")]);
    sentry.handle.reload(&only_v2, &sentry_key).unwrap();
    assert_eq!(sentry.handle.connected(), ["v2"]);
    let v1_config = agent_config("v1", quic, &sentry_key, &[("svc", echo)]);
    let client = relay_core::transport::quic::client_config(
        &v1_key,
        v1_config.sentries[0].public_key,
        &relay_core::transport::quic::Tuning::default(),
    )
    .unwrap();
    assert!(
        refused(&v1_config.sentries[0], &client, &v1_key).await,
        "an unpinned key still gets a tunnel"
    );
}

/// A reload that unpins the key of a connected agent (here: pins another key under its name)
/// leaves nothing authenticated by the old key taking new clients, over QUIC and over TLS
/// (its tunnel, and its pooled TLS data connections); a relayed connection already open
/// finishes.
async fn an_unpinned_key_takes_no_new_clients(transport: &str) {
    let (sentry_key, old_key, new_key) = (tests::key(), tests::key(), tests::key());
    let config = |agent: &PrivateKey| {
        let text = format!(
            "[sentry]\nprivate_key = \"sentry.key\"\nquic_listen = \"127.0.0.1:0\"\n\
             tls_listen = \"127.0.0.1:0\"\n\n\
             [[agent]]\nname = \"v1\"\npublic_key = \"{}\"\n\n\
             [[route]]\nname = \"p2p\"\nlisten = \"127.0.0.1:0\"\nupstream = [\"v1/svc\"]\n",
            agent.public_key()
        );
        relay_core::config::parse_sentry(Path::new("test-sentry.toml"), &text).unwrap()
    };
    let sentry = tests::start_sentry(&config(&old_key), &sentry_key).await;
    let address = match transport {
        "tls" => sentry.handle.tls_addr().unwrap(),
        _ => sentry.handle.quic_addr().expect("quic_listen is set"),
    };
    let agent_config = |echo: SocketAddr| {
        let text = format!(
            "[agent]\nname = \"v1\"\nprivate_key = \"agent.key\"\n\n\
             [[sentry]]\naddress = \"{address}\"\npublic_key = \"{}\"\ntransport = \"{transport}\"\n\n\
             [[service]]\nname = \"svc\"\ntarget = \"{echo}\"\n",
            sentry_key.public_key()
        );
        relay_core::config::parse_agent(Path::new("a.toml"), &text).unwrap()
    };
    // The old key's agent answers "old" first, the new key's "new".
    let old_echo = tests::tagged_echo_service("old").await;
    let _old = tests::start_agent(agent_config(old_echo), old_key);
    sentry.wait_agent("v1", true).await;
    let route = sentry.route("p2p");
    let mut open = tokio::net::TcpStream::connect(route).await.unwrap();
    assert_eq!(tag(&mut open).await, "old");
    assert!(echoed(&mut open).await);
    // Pooled TLS data connections are waiting now, authenticated by the old key.
    sentry
        .handle
        .reload(&config(&new_key), &sentry_key)
        .unwrap();
    assert!(
        sentry.handle.connected().is_empty(),
        "the old key's tunnel is still listed"
    );
    for _ in 0..3 {
        assert!(
            tests::closed_without_data(route, Duration::from_secs(3)).await,
            "a new client was relayed over the unpinned key's tunnel ({transport})"
        );
    }
    // The connection open before the reload still flows.
    assert!(
        echoed(&mut open).await,
        "an open connection was cut by the reload"
    );
    // The new key's agent connects under the same name: every new client reaches it, none
    // the old key's agent (over TLS, none of the old key's pooled data connections).
    let new_echo = tests::tagged_echo_service("new").await;
    let _new = tests::start_agent(agent_config(new_echo), new_key);
    sentry.wait_agent("v1", true).await;
    for _ in 0..8 {
        let mut tcp = tokio::net::TcpStream::connect(route).await.unwrap();
        assert_eq!(
            tag(&mut tcp).await,
            "new",
            "a client reached the old key's agent"
        );
    }
}

/// The three-byte tag a tagged echo service writes first.
async fn tag(tcp: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 3];
    tokio::time::timeout(PATIENCE, tcp.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    String::from_utf8_lossy(&buf).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unpinned_key_takes_no_new_clients_over_quic() {
    an_unpinned_key_takes_no_new_clients("quic").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unpinned_key_takes_no_new_clients_over_tls() {
    an_unpinned_key_takes_no_new_clients("tls").await;
}

/// One echo exchange on `tcp`, bounded.
async fn echoed(tcp: &mut tokio::net::TcpStream) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tcp.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    tokio::time::timeout(PATIENCE, tcp.read_exact(&mut buf))
        .await
        .is_ok_and(|r| r.is_ok())
        && &buf == b"ping"
}

/// Whether the sentry refuses a tunnel handshake with `key`. TLS 1.3 lets the client finish
/// before the server has checked its certificate; the refusal may then arrive as the close.
async fn refused(
    peer: &relay_core::config::SentryPeer,
    client: &quinn::ClientConfig,
    key: &PrivateKey,
) -> bool {
    match relay_core::agent::dial(peer, client, key).await {
        Err(_) => true,
        Ok((_endpoint, conn)) => tokio::time::timeout(PATIENCE, conn.closed())
            .await
            .is_ok_and(|reason| reason.to_string().contains("certificate")),
    }
}

/// (soft, hard) open-file limits of `pid`.
fn open_file_limits(pid: u32) -> (u64, u64) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let fields: Vec<&str> = line.split_whitespace().collect();
    let value = |s: &str| s.parse().unwrap_or(u64::MAX);
    (value(fields[3]), value(fields[4]))
}

#[test]
fn a_low_soft_open_file_limit_is_raised_so_connections_are_not_refused() {
    let setup = Setup::new();
    let limits = "max_connections_per_ip = 1000\nconnect_rate_per_ip = \"10000/s\"";
    let sentry = Daemon::start_with_soft_open_files(
        "serve",
        &setup.write_sentry("", &[("p2p", limits)]),
        64,
    );
    let quic = sentry.logged_addr("sentry ready", &[], "quic");
    let agent = Daemon::start_with_soft_open_files("agent", &setup.write_agent(quic, "echo"), 64);
    sentry.wait_log("tunnel up", 1, PATIENCE);
    for pid in [sentry.pid(), agent.pid()] {
        let (soft, hard) = open_file_limits(pid);
        assert_eq!(
            soft, hard,
            "pid {pid}: the soft limit stayed below the hard one"
        );
    }
    // More connections held at once than the 64 files the daemons were started with: each
    // one relays.
    let p2p = route_addr(&sentry, "p2p");
    let mut held = Vec::new();
    for i in 0..150u8 {
        let mut tcp = TcpStream::connect(p2p).unwrap();
        tcp.set_read_timeout(Some(PATIENCE)).unwrap();
        tcp.write_all(&[i]).unwrap();
        let mut back = [0u8; 1];
        tcp.read_exact(&mut back)
            .unwrap_or_else(|e| panic!("connection {i}: {e}"));
        assert_eq!(back, [i]);
        held.push(tcp);
    }
}

//! Clients that stop reading, against the built binaries: a sentry and an agent on loopback
//! over one transport, with services that answer with far more than any buffer holds. Many
//! clients (from several source addresses in 127.0.0.0/8) ask for a large answer and never
//! read it, while one unrelated client keeps doing small round trips through the same tunnel.
//! What the unrelated client saw (each round trip's time), whether the tunnel stayed up, and
//! both daemons' memory are reported: the test asserts a generous bound, the `stall` bench
//! prints the figures.
#![allow(clippy::disallowed_methods)] // plain deadlines in a test harness

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use relay_core::keys::{self, PrivateKey};
use socket2::{Domain, Protocol, Socket, Type};

use crate::PATIENCE;
use crate::daemon::Daemon;

/// Largest answer a bulk service gives one client (it stops sooner when the client goes).
const BULK_BOUND: u64 = 1 << 30;
/// Longest a service keeps writing to one client.
const SERVICE_DEADLINE: Duration = Duration::from_secs(90);
/// The JSON-RPC answer a stalling client asks for.
const BIG_ANSWER: usize = 48 << 20;
/// Datagrams the UDP service sends back for one `big` datagram, and their size.
const UDP_BURST: usize = 4000;
const UDP_SIZE: usize = 1200;

/// The tunnel the two daemons use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Quic,
    WireGuard,
    Tls,
}

impl Transport {
    pub const ALL: [Self; 3] = [Self::Quic, Self::WireGuard, Self::Tls];

    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Quic => "quic",
            Self::WireGuard => "wireguard",
            Self::Tls => "tls",
        }
    }
}

/// What the stalling clients ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attack {
    /// A `tcp` route to a service that sends without end.
    Tcp,
    /// A `jsonrpc` route: a call answered with [`BIG_ANSWER`] bytes.
    JsonRpc,
    /// A `udp` route: one datagram answered with a burst of [`UDP_BURST`] datagrams.
    Udp,
}

impl Attack {
    pub const ALL: [Self; 3] = [Self::Tcp, Self::JsonRpc, Self::Udp];

    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::JsonRpc => "jsonrpc",
            Self::Udp => "udp",
        }
    }
}

/// What one run saw.
#[derive(Debug, Clone)]
pub struct Report {
    /// Round trips of the unrelated client before the attack.
    pub before: Vec<Duration>,
    /// Round trips while the clients stalled, on a connection opened before the attack.
    pub during: Vec<Duration>,
    /// Round trips while the clients stalled, each on a connection of its own opened then
    /// (its relay header must be answered too).
    pub fresh: Vec<Duration>,
    /// Round trips that failed (an error or no answer within [`PATIENCE`]).
    pub failed: usize,
    /// "tunnel up" lines the sentry logged (1: the tunnel was never torn down).
    pub tunnels_up: usize,
    /// Resident memory at the end of the attack, and the peak, in bytes: (sentry, agent).
    pub rss: (u64, u64),
    pub peak_rss: (u64, u64),
    /// Stalling clients the sentry accepted.
    pub stalled: usize,
    /// CPU time each daemon used per second of the probe under attack: (sentry, agent).
    pub cpu: (f64, f64),
}

impl Report {
    /// The longest round trip during the attack.
    #[must_use]
    pub fn worst(&self) -> Duration {
        self.during
            .iter()
            .chain(&self.fresh)
            .max()
            .copied()
            .unwrap_or_default()
    }
}

/// The services behind the agent, on loopback.
struct Services {
    bulk: SocketAddr,
    echo: SocketAddr,
    rpc: SocketAddr,
    udp: SocketAddr,
}

/// Start the daemons over `transport`, open `clients` stalling clients of `attack` spread over
/// `addresses` source addresses (127.0.0.2 and up), and probe for `probe` with an unrelated
/// client of the `echo` route.
#[must_use]
pub fn run(
    transport: Transport,
    attack: Attack,
    clients: usize,
    addresses: u8,
    probe: Duration,
) -> Report {
    let services = services();
    let dir = tempfile::tempdir().unwrap();
    let (sentry_key, agent_key) = (
        PrivateKey::generate().unwrap(),
        PrivateKey::generate().unwrap(),
    );
    keys::write_private_key(&dir.path().join("sentry.key"), &sentry_key).unwrap();
    keys::write_private_key(&dir.path().join("agent.key"), &agent_key).unwrap();
    let sentry = Daemon::start(
        "serve",
        &write_sentry(dir.path(), transport, &agent_key, clients),
    );
    let tunnel = match transport {
        Transport::Quic => sentry.logged_addr("sentry ready", &[], "quic"),
        Transport::WireGuard => sentry.logged_addr("WireGuard listening", &[], "listen"),
        Transport::Tls => sentry.logged_addr("TLS tunnel listening", &[], "listen"),
    };
    let agent = Daemon::start(
        "agent",
        &write_agent(dir.path(), transport, tunnel, &sentry_key, &services),
    );
    sentry.wait_log("tunnel up", 1, PATIENCE);
    let route = |name: &str| sentry.logged_addr("route listening", &[("route", name)], "listen");
    let echo = route("echo");

    // An unrelated client, connected before anything else happens.
    let mut kept = TcpStream::connect(echo).unwrap();
    kept.set_nodelay(true).unwrap();
    kept.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut failed = 0;
    let (before, _) = probe_for(&mut kept, echo, Duration::from_millis(500), &mut failed);

    let stalled = match attack {
        Attack::Tcp => stall_tcp(route("bulk"), clients, addresses, None),
        Attack::JsonRpc => stall_tcp(route("rpc"), clients, addresses, Some(&big_call())),
        Attack::Udp => stall_udp(route("udp"), clients, addresses),
    };
    // Until every stalled client's buffers and the tunnel's are full: the bytes the sentry
    // sends its clients, and those the agent takes from the service, stop growing.
    settle(
        sentry.logged_addr("metrics listening", &[], "listen"),
        agent.logged_addr("metrics listening", &[], "listen"),
        attack,
    );
    let cpu_before = (cpu_of(sentry.pid()), cpu_of(agent.pid()));
    let started = Instant::now();
    let (during, fresh) = probe_for(&mut kept, echo, probe, &mut failed);
    let wall = started.elapsed().as_secs_f64();
    let cpu = (
        (cpu_of(sentry.pid()) - cpu_before.0) / wall,
        (cpu_of(agent.pid()) - cpu_before.1) / wall,
    );
    let rss = (rss_of(sentry.pid(), "VmRSS"), rss_of(agent.pid(), "VmRSS"));
    let peak_rss = (rss_of(sentry.pid(), "VmHWM"), rss_of(agent.pid(), "VmHWM"));
    let report = Report {
        before,
        during,
        fresh,
        failed,
        tunnels_up: sentry.count_log("tunnel up"),
        rss,
        peak_rss,
        stalled: stalled.len(),
        cpu,
    };
    if failed > 0 {
        // What the daemons said, for a failure to be understood from CI's output alone.
        for (role, daemon) in [("sentry", &sentry), ("agent", &agent)] {
            let log = daemon.log();
            let lines: Vec<&str> = log.lines().collect();
            let from = lines.len().saturating_sub(40);
            eprintln!(
                "--- {role} log, last {} lines ---\n{}",
                lines.len() - from,
                lines[from..].join("\n")
            );
        }
    }
    if let Some(dir) = std::env::var_os("STALL_LOGS") {
        let dir = PathBuf::from(dir);
        std::fs::write(
            dir.join(format!("sentry-{}.log", attack.as_str())),
            sentry.log(),
        )
        .unwrap();
        std::fs::write(
            dir.join(format!("agent-{}.log", attack.as_str())),
            agent.log(),
        )
        .unwrap();
    }
    drop(stalled);
    drop((agent, sentry));
    report
}

/// Wait (at most 30 s) until the bytes the sentry sent its clients on the attacked route, and
/// the bytes the agent read from its service, grow by less than 256 KiB in 250 ms.
fn settle(sentry: SocketAddr, agent: SocketAddr, attack: Attack) {
    let route = match attack {
        Attack::Tcp => "bulk",
        Attack::JsonRpc => "rpc",
        Attack::Udp => "udp",
    };
    let read = |at: SocketAddr, name: &str, label: (&str, &str)| {
        let (_, text) = crate::http_get(at, "/metrics");
        crate::metric(&text, name, &[label]).unwrap_or(0.0)
    };
    let moved = || {
        read(sentry, "sentry_route_sent_bytes_total", ("route", route))
            + read(
                agent,
                "sentry_agent_service_received_bytes_total",
                ("service", route),
            )
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = moved();
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(250));
        let now = moved();
        if now - last < 256.0 * 1024.0 {
            return;
        }
        last = now;
    }
}

/// Round trips for `within`: one on `kept` every 20 ms, and every fifth on a new connection
/// (its relay header must get an answer from the agent too).
fn probe_for(
    kept: &mut TcpStream,
    echo: SocketAddr,
    within: Duration,
    failed: &mut usize,
) -> (Vec<Duration>, Vec<Duration>) {
    let (mut times, mut fresh_times) = (Vec::new(), Vec::new());
    let end = Instant::now() + within;
    let mut i = 0u32;
    while Instant::now() < end {
        let started = Instant::now();
        let fresh = i % 5 == 4;
        let ok = if fresh {
            TcpStream::connect(echo).and_then(|mut fresh| {
                fresh.set_nodelay(true)?;
                fresh.set_read_timeout(Some(PATIENCE))?;
                round_trip(&mut fresh, i)
            })
        } else {
            round_trip(kept, i)
        };
        match ok {
            Ok(()) if fresh => fresh_times.push(started.elapsed()),
            Ok(()) => times.push(started.elapsed()),
            Err(e) => {
                if *failed == 0 {
                    eprintln!("round trip {i} failed (fresh: {fresh}): {e}");
                }
                *failed += 1;
            }
        }
        i += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    (times, fresh_times)
}

fn round_trip(tcp: &mut TcpStream, i: u32) -> std::io::Result<()> {
    let message = format!("probe {i:08}\n");
    tcp.write_all(message.as_bytes())?;
    let mut back = vec![0u8; message.len()];
    tcp.read_exact(&mut back)?;
    if back == message.as_bytes() {
        Ok(())
    } else {
        Err(std::io::Error::other("the echo came back altered"))
    }
}

/// The source addresses of the stalling clients: 127.0.0.2, 127.0.0.3, ...
fn source(i: usize, addresses: u8) -> Ipv4Addr {
    let n = u8::try_from(i % usize::from(addresses.max(1))).unwrap();
    Ipv4Addr::new(127, 0, 0, 2 + n)
}

/// `clients` TCP connections to `route` that send `request` (if any) and never read.
fn stall_tcp(route: SocketAddr, clients: usize, addresses: u8, request: Option<&[u8]>) -> Stalled {
    let mut held = Vec::new();
    for i in 0..clients {
        let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap();
        socket
            .bind(&SocketAddr::from((source(i, addresses), 0)).into())
            .unwrap();
        // As an attacker would: the least receive buffer, so stalling costs it nothing and
        // whatever the sentry holds for it is the sentry's own.
        let _ = socket.set_recv_buffer_size(1);
        if socket.connect(&route.into()).is_err() {
            continue;
        }
        let mut tcp: TcpStream = socket.into();
        if let Some(request) = request {
            let _ = tcp.write_all(request);
        }
        held.push(tcp);
    }
    Stalled::Tcp(held)
}

/// `clients` UDP sockets that each ask the UDP service behind `route` for a burst once, and
/// never read.
fn stall_udp(route: SocketAddr, clients: usize, addresses: u8) -> Stalled {
    let mut sockets = Vec::new();
    for i in 0..clients {
        let socket = UdpSocket::bind(SocketAddrV4::new(source(i, addresses), 0)).unwrap();
        // The smallest buffer the kernel grants: the burst overflows it at once.
        let socket: Socket = socket.into();
        let _ = socket.set_recv_buffer_size(1);
        let socket: UdpSocket = socket.into();
        let _ = socket.send_to(b"big", route);
        sockets.push(socket);
    }
    Stalled::Udp(sockets)
}

/// The stalling clients, held open until dropped.
enum Stalled {
    Tcp(Vec<TcpStream>),
    Udp(Vec<UdpSocket>),
}

impl Stalled {
    fn len(&self) -> usize {
        match self {
            Self::Tcp(held) => held.len(),
            Self::Udp(held) => held.len(),
        }
    }
}

fn big_call() -> Vec<u8> {
    let body = r#"{"jsonrpc":"2.0","id":1,"method":"big"}"#;
    format!(
        "POST / HTTP/1.1\r\nHost: rpc\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// CPU seconds (user and system) process `pid` used so far.
fn cpu_of(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): utime and stime are the 12th
    // and 13th of them, in clock ticks (100 per second on Linux).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<u64> = rest
        .split_whitespace()
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    let ticks = fields.get(11).unwrap_or(&0) + fields.get(12).unwrap_or(&0);
    ticks as f64 / 100.0
}

/// A status field of `/proc/PID/status`, in bytes.
fn rss_of(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}

fn write_sentry(dir: &Path, transport: Transport, agent: &PrivateKey, clients: usize) -> PathBuf {
    let tunnel = match transport {
        Transport::Quic => String::new(),
        Transport::WireGuard => {
            "wireguard_listen = \"127.0.0.1:0\"\nwireguard_address = \"100.64.0.1\"\n".to_owned()
        }
        Transport::Tls => "tls_listen = \"127.0.0.1:0\"\n".to_owned(),
    };
    let overlay = if transport == Transport::WireGuard {
        "wireguard_address = \"100.64.0.2\"\n"
    } else {
        ""
    };
    // Room for every stalling client of up to 8 addresses, and their rate of arrival.
    let per_ip = clients.div_ceil(2).max(16);
    let limits = format!("max_connections_per_ip = {per_ip}\nconnect_rate_per_ip = \"1000/s\"\n");
    let mut text = format!(
        "[sentry]\nprivate_key = \"sentry.key\"\nquic_listen = \"127.0.0.1:0\"\n\
         metrics_listen = \"127.0.0.1:0\"\n{tunnel}\n\
         [[agent]]\nname = \"v1\"\npublic_key = \"{}\"\n{overlay}",
        agent.public_key()
    );
    for (name, service, extra) in [
        ("bulk", "bulk", ""),
        ("echo", "echo", ""),
        ("udp", "udp", "protocol = \"udp\"\n"),
        (
            "rpc",
            "rpc",
            "protocol = \"jsonrpc\"\n[route.jsonrpc]\npreset = \"none\"\nallow_paths = [\"/\"]\nallow_methods = [\"*\"]\n",
        ),
    ] {
        // The route's own keys come before its [route.jsonrpc] table.
        let (own, table) = extra
            .split_once('[')
            .map_or((extra, String::new()), |(a, b)| (a, format!("[{b}")));
        text += &format!(
            "\n[[route]]\nname = \"{name}\"\nlisten = \"127.0.0.1:0\"\nupstream = [\"v1/{service}\"]\n{limits}{own}{table}"
        );
    }
    let path = dir.join("sentry.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn write_agent(
    dir: &Path,
    transport: Transport,
    tunnel: SocketAddr,
    sentry: &PrivateKey,
    services: &Services,
) -> PathBuf {
    let wireguard = if transport == Transport::WireGuard {
        "wireguard_address = \"100.64.0.2\"\nsentry_wireguard_address = \"100.64.0.1\"\n"
    } else {
        ""
    };
    let mut text = format!(
        "[agent]\nname = \"v1\"\nprivate_key = \"agent.key\"\nmetrics_listen = \"127.0.0.1:0\"\n\n\
         [[sentry]]\naddress = \"{tunnel}\"\npublic_key = \"{}\"\ntransport = \"{}\"\n{wireguard}",
        sentry.public_key(),
        transport.as_str()
    );
    for (name, target, udp) in [
        ("bulk", services.bulk, false),
        ("echo", services.echo, false),
        ("rpc", services.rpc, false),
        ("udp", services.udp, true),
    ] {
        let protocol = if udp { "protocol = \"udp\"\n" } else { "" };
        text += &format!("\n[[service]]\nname = \"{name}\"\ntarget = \"{target}\"\n{protocol}");
    }
    let path = dir.join("agent.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn services() -> Services {
    Services {
        bulk: tcp_service(|mut tcp| {
            let block = vec![0x5au8; 64 * 1024];
            let deadline = Instant::now() + SERVICE_DEADLINE;
            let mut sent = 0u64;
            while sent < BULK_BOUND && Instant::now() < deadline {
                if tcp.write_all(&block).is_err() {
                    return;
                }
                sent += block.len() as u64;
            }
        }),
        echo: tcp_service(|mut tcp| {
            let _ = tcp.set_nodelay(true);
            let mut buf = [0u8; 16 * 1024];
            while let Ok(n) = tcp.read(&mut buf) {
                if n == 0 || tcp.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }),
        rpc: tcp_service(rpc_connection),
        udp: udp_service(),
    }
}

/// A TCP service on loopback: a thread per connection, each ending by itself.
fn tcp_service(serve: fn(TcpStream)) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for tcp in listener.incoming().map_while(Result::ok) {
            let _ = tcp.set_write_timeout(Some(SERVICE_DEADLINE));
            let _ = tcp.set_read_timeout(Some(SERVICE_DEADLINE));
            std::thread::spawn(move || serve(tcp));
        }
    });
    addr
}

/// HTTP/1.1 with keep-alive: a call of `big` gets a [`BIG_ANSWER`]-byte result, any other a
/// short one.
fn rpc_connection(mut tcp: TcpStream) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let Some(head_end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            match tcp.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        while buf.len() < head_end + 4 + length {
            match tcp.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let body = buf[head_end + 4..head_end + 4 + length].to_vec();
        buf.drain(..head_end + 4 + length);
        let big = String::from_utf8_lossy(&body).contains("\"big\"");
        // A result string of `size` bytes, written in blocks as it goes out.
        let size = if big { BIG_ANSWER } else { 2 };
        let (open, close) = (r#"{"jsonrpc":"2.0","id":1,"result":""#, r#""}"#);
        let head = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{open}",
            open.len() + size + close.len()
        );
        if tcp.write_all(head.as_bytes()).is_err() {
            return;
        }
        let block = [b'x'; 64 * 1024];
        let mut left = size;
        while left > 0 {
            let n = left.min(block.len());
            if tcp.write_all(&block[..n]).is_err() {
                return;
            }
            left -= n;
        }
        if tcp.write_all(close.as_bytes()).is_err() {
            return;
        }
    }
}

/// Answers `big` with [`UDP_BURST`] datagrams, anything else with itself.
fn udp_service() -> SocketAddr {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = socket.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        let datagram = [0x5au8; UDP_SIZE];
        let deadline = Instant::now() + SERVICE_DEADLINE * 2;
        socket.set_read_timeout(Some(SERVICE_DEADLINE)).unwrap();
        while Instant::now() < deadline {
            let Ok((n, from)) = socket.recv_from(&mut buf) else {
                return;
            };
            if &buf[..n] == b"big" {
                for _ in 0..UDP_BURST {
                    let _ = socket.send_to(&datagram, from);
                }
            } else {
                let _ = socket.send_to(&buf[..n], from);
            }
        }
    });
    addr
}

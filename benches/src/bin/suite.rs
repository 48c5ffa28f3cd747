//! The benchmark suite: every scenario against every path in one run, repetitions
//! interleaved, medians with min–max and ratios against the direct baseline, CPU time and
//! resident memory of each tunnel end, memory per idle relayed connection, and the goals of
//! the suite checked against rathole; written to `benches/RESULTS.md`.
//!
//! Run it through `benches/run.sh` (it builds the release binaries and finds rathole). It runs
//! on two sites, one after the other (`BENCH_SITES`: `loopback`, `netns` or both, the default;
//! the namespace topology needs root and is skipped, with the reason, without it):
//!
//! - loopback: every process on this machine's loopback;
//! - the namespace topology of the real-network tier: the load generator on the client host,
//!   the sentry (or rathole server, or relay) on the sentry host, the agent (or rathole
//!   client) and the services on the validator behind a NAT router, veth MTU 1500.
//!
//! Paths: `direct` (no relay: on loopback the service itself, in the topology the router's
//! port forward to the validator), `plain relay` (tokio `copy_bidirectional` on the sentry
//! host), the release `sentry` binary as sentry + agent over QUIC, WireGuard and TLS, rathole
//! with its noise transport (and TLS, when built with it) when `RATHOLE_BIN` names a rathole
//! binary, and in the topology wireguard-go on TUN devices with the same plain relay on the
//! sentry host (the hand-built alternative).
//!
//! Settings (environment): `BENCH_REPS` (3), `BENCH_BYTES` per bulk transfer (256 MiB),
//! `BENCH_SECONDS` per request/response and churn run (5), `BENCH_CONNS` keep-alive
//! connections (64), `BENCH_WORKERS` churn loops (16), `BENCH_IDLE` idle connections held
//! open per path (10000; 0 skips), `BENCH_SITES`, `BENCH_OUT` (benches/RESULTS.md),
//! `SENTRY_BIN` (the release binary).
#![allow(clippy::disallowed_methods)] // plain deadlines and process handling, outside the daemon

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use benches::site::{self, Site, run};
use benches::{gbits, load, read_env, summary};
use relay_core::keys::{PrivateKey, write_private_key};
use relay_core::transport::wireguard::MAX_STREAMS;
use tests::daemon::Daemon;
use tests::netns::{Host, ROUTER_WAN};
use tokio::runtime::Runtime;

/// What the suite was asked to do.
#[derive(Clone, Copy)]
struct Settings {
    reps: usize,
    bytes: usize,
    seconds: Duration,
    conns: usize,
    workers: usize,
    idle: usize,
}

/// The ports of one path: echo, sink, source.
#[derive(Clone, Copy)]
struct Routes {
    echo: SocketAddr,
    sink: SocketAddr,
    source: SocketAddr,
}

/// The validator's services listen on these ports in the topology (the router forwards them
/// for `direct`).
const SINK: u16 = 7201;
const SOURCE: u16 = 7202;
const ECHO: u16 = 7203;

/// A tunnel end this suite started, for CPU and memory figures.
enum Process {
    Sentry(Daemon),
    Other(Child),
}

impl Process {
    fn pid(&self) -> u32 {
        match self {
            Self::Sentry(d) => d.pid(),
            Self::Other(c) => c.id(),
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Self::Other(child) = self {
            // By PID, never by name.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

struct PathUnderTest {
    name: String,
    routes: Routes,
    /// (role, process): the two tunnel ends, none for direct and the in-process relay.
    ends: Vec<(&'static str, Process)>,
    kind: Kind,
}

/// What a path is, to start it again for the idle run.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Direct, or an in-process relay: no tunnel ends.
    Baseline,
    /// sentry + agent over this transport.
    Sentry(&'static str),
    /// rathole over this transport; the index of its port range.
    Rathole(&'static str, u16),
    /// wireguard-go and an in-process relay: kernel TCP carries its connections, so their
    /// memory is in no process, and the idle run skips it.
    WireGuardGo,
}

/// One path's samples.
#[derive(Default, Clone)]
struct Samples {
    up1: Vec<f64>,
    down1: Vec<f64>,
    up8: Vec<f64>,
    down8: Vec<f64>,
    rps: Vec<f64>,
    p50: Vec<f64>,
    p99: Vec<f64>,
    p999: Vec<f64>,
    cps: Vec<f64>,
    ttfb99: Vec<f64>,
    failed: u64,
    /// (role, CPU seconds, resident KiB right after request/response, peak KiB)
    ends: Vec<(&'static str, f64, u64, u64)>,
    /// Idle connections held, and each end's resident growth per connection in KiB; or why
    /// not measured.
    idle: Option<Result<(usize, Vec<f64>), String>>,
}

/// One site's results.
struct Section {
    site: &'static str,
    names: Vec<String>,
    samples: Vec<Samples>,
}

/// The runtimes of one site: the load generator's (client host), the services' (validator)
/// and the in-process relays' (sentry host). On loopback one runtime does all three, as one
/// process on one machine would.
struct Runtimes {
    client: Arc<Runtime>,
    services: Arc<Runtime>,
    relays: Arc<Runtime>,
}

impl Runtimes {
    fn new(site: &Site) -> Self {
        match site {
            Site::Loopback => {
                let one = Arc::new(site.runtime(Host::Client));
                Self {
                    client: one.clone(),
                    services: one.clone(),
                    relays: one,
                }
            }
            Site::Netns(_) => Self {
                client: Arc::new(site.runtime(Host::Client)),
                services: Arc::new(site.runtime(Host::Validator)),
                relays: Arc::new(site.runtime(Host::Sentry)),
            },
        }
    }
}

fn main() {
    let settings = Settings {
        reps: read_env("BENCH_REPS", 3),
        bytes: read_env("BENCH_BYTES", 256 << 20),
        seconds: Duration::from_secs(read_env("BENCH_SECONDS", 5) as u64),
        conns: read_env("BENCH_CONNS", 64),
        workers: read_env("BENCH_WORKERS", 16),
        idle: read_env("BENCH_IDLE", 10_000),
    };
    let out = std::env::var("BENCH_OUT").unwrap_or_else(|_| "benches/RESULTS.md".into());
    let wanted = std::env::var("BENCH_SITES").unwrap_or_else(|_| "loopback,netns".into());
    let settings = Settings {
        idle: open_files_for(settings.idle),
        ..settings
    };
    let mut sections = Vec::new();
    if wanted.contains("loopback") {
        sections.push(measure(&Site::Loopback, settings));
    }
    if wanted.contains("netns") {
        match tests::netns::Topology::new() {
            Some(t) => sections.push(measure(&Site::Netns(t), settings)),
            None => eprintln!("namespace topology: not measured (see above)"),
        }
    }
    let text = report(&sections, settings, &wanted);
    println!("{text}");
    std::fs::write(&out, &text).expect("write results");
    eprintln!("written to {out}");
}

/// Raise this process's open-file limit (its children inherit it) so that `idle`
/// connections fit: each is a client socket and a service socket here (the idle run measures
/// tunnel daemons only, never an in-process relay). Root may raise the hard limit; otherwise the
/// soft one goes up to the hard one, and fewer connections are held if that is not enough.
fn open_files_for(idle: usize) -> usize {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let want = (2 * idle + 1024) as u64;
    let now = getrlimit(Resource::Nofile);
    let hard = now.maximum.unwrap_or(u64::MAX);
    let raised = Rlimit {
        current: Some(want.max(now.current.unwrap_or(0))),
        maximum: Some(want.max(hard)),
    };
    if setrlimit(Resource::Nofile, raised).is_err() {
        let _ = setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(hard),
                maximum: Some(hard),
            },
        );
    }
    let have = getrlimit(Resource::Nofile).current.unwrap_or(1024);
    let fits = usize::try_from(have.saturating_sub(1024) / 2).unwrap_or(usize::MAX);
    if fits < idle {
        eprintln!("open files limited to {have}: {fits} idle connections per path, not {idle}");
    }
    idle.min(fits)
}

fn measure(site: &Site, s: Settings) -> Section {
    eprintln!("--- {} ---", site.name());
    let dir = site.dir();
    let rt = Runtimes::new(site);
    let bytes = s.bytes;
    // The services, and what the client dials to reach them directly.
    let (targets, direct) = match site {
        Site::Loopback => {
            let routes = run(&rt.services, async move {
                Routes {
                    echo: load::echo().await,
                    sink: benches::sink().await,
                    source: benches::source(bytes).await,
                }
            });
            (routes, routes)
        }
        Site::Netns(t) => {
            // Churn opens tens of thousands of connections to one address per run. Outside
            // loopback, Linux does not reuse a port in TIME-WAIT for a new outgoing connection
            // by default, so after about 28 000 the runs would measure port exhaustion, not
            // the paths: reuse them, from a wider range (clear of the fixed ports here).
            for host in [Host::Client, Host::Sentry, Host::Validator] {
                t.sh(
                    host,
                    &[
                        "sysctl",
                        "-qw",
                        "net.ipv4.tcp_tw_reuse=1",
                        "net.ipv4.ip_local_port_range=10000 65000",
                    ],
                );
            }
            // And the router's connection tracking (it sees the bridged public segment too)
            // forgets closed connections after 5 s instead of 120 s, so its table never fills.
            t.sh(
                Host::Router,
                &[
                    "sysctl",
                    "-qw",
                    "net.netfilter.nf_conntrack_tcp_timeout_time_wait=5",
                ],
            );
            let any = |port| SocketAddr::from(([0, 0, 0, 0], port));
            run(&rt.services, async move {
                load::echo_on(any(ECHO)).await;
                benches::serve(any(SINK), benches::sink_connection).await;
                benches::serve(any(SOURCE), move |tcp| {
                    benches::source_connection(tcp, bytes)
                })
                .await;
            });
            site::port_forward(t, SINK, ECHO);
            let at = |ip: IpAddr| Routes {
                echo: SocketAddr::new(ip, ECHO),
                sink: SocketAddr::new(ip, SINK),
                source: SocketAddr::new(ip, SOURCE),
            };
            (at(site.ip(Host::Validator)), at(IpAddr::V4(ROUTER_WAN)))
        }
    };
    let mut paths = vec![PathUnderTest {
        name: "direct".into(),
        routes: direct,
        ends: Vec::new(),
        kind: Kind::Baseline,
    }];
    paths.push(PathUnderTest {
        name: "plain relay".into(),
        routes: relays(site, &rt, direct),
        ends: Vec::new(),
        kind: Kind::Baseline,
    });
    for transport in ["quic", "wireguard", "tls"] {
        paths.push(sentry_path(site, &dir, transport, &targets, s.idle));
    }
    match std::env::var("RATHOLE_BIN") {
        Ok(bin) if !bin.is_empty() => {
            let bin = Path::new(&bin);
            paths.push(rathole_path(site, &rt, &dir, bin, "noise", &targets, 0));
            // The TLS transport needs a rathole built with `tls` (OpenSSL) and the openssl tool
            // for its PKCS#12 identity (benches/run.sh provides both where it can).
            if rathole_has_tls(bin) && tls_identity(&dir) {
                paths.push(rathole_path(site, &rt, &dir, bin, "tls", &targets, 1));
            } else {
                eprintln!("rathole (tls): not measured (no native-tls build or no openssl tool)");
            }
        }
        _ => eprintln!(
            "rathole: not measured (set RATHOLE_BIN, or run benches/run.sh with BENCH_RATHOLE=1)"
        ),
    }
    if let Site::Netns(t) = site
        && let Some(mut wg) = site::wireguard_go(t)
    {
        let overlay = IpAddr::V4(site::WG_GO_VALIDATOR);
        let routes = relays(
            site,
            &rt,
            Routes {
                echo: SocketAddr::new(overlay, ECHO),
                sink: SocketAddr::new(overlay, SINK),
                source: SocketAddr::new(overlay, SOURCE),
            },
        );
        let ends = std::mem::take(&mut wg.ends)
            .into_iter()
            .map(|(host, child)| {
                let role = if host == Host::Sentry {
                    "sentry host"
                } else {
                    "validator"
                };
                (role, Process::Other(child))
            })
            .collect();
        paths.push(PathUnderTest {
            name: "wireguard-go + relay".into(),
            routes,
            ends,
            kind: Kind::WireGuardGo,
        });
    }

    let mut samples = vec![Samples::default(); paths.len()];
    let mut rss_after_rr = vec![Vec::<u64>::new(); paths.len()];
    for rep in 0..s.reps {
        for (i, path) in paths.iter().enumerate() {
            let sample = &mut samples[i];
            let r = path.routes;
            // Request/response first, so the resident memory read after it (first
            // repetition) is what that load needs, before any bulk transfer grew the heap.
            let rr = run(
                &rt.client,
                load::request_response(r.echo, s.conns, 64, s.seconds),
            );
            sample.rps.push(rr.per_second);
            sample.p50.push(rr.p50_us as f64 / 1e3);
            sample.p99.push(rr.p99_us as f64 / 1e3);
            sample.p999.push(rr.p999_us as f64 / 1e3);
            sample.failed += rr.failed;
            if rep == 0 {
                rss_after_rr[i] = path
                    .ends
                    .iter()
                    .map(|(_, p)| status_kib(p.pid(), "VmRSS:"))
                    .collect();
            }
            let c = run(&rt.client, load::churn(r.echo, s.workers, 64, s.seconds));
            sample.cps.push(c.per_second);
            sample.ttfb99.push(c.ttfb_p99_us as f64 / 1e3);
            sample.failed += c.failed;
            let name = path.name.clone();
            let (up1, down1, up8, down8) = run(&rt.client, async move {
                let name = &name;
                let up = |streams| async move {
                    let took = load::upload(r.sink, bytes, streams).await;
                    gbits(
                        bytes,
                        took.unwrap_or_else(|e| panic!("{name}: upload: {e}")),
                    )
                };
                let down = |streams| async move {
                    let (took, got) = load::download(r.source, streams)
                        .await
                        .unwrap_or_else(|e| panic!("{name}: download: {e}"));
                    // Every stream gets a whole transfer from the source.
                    assert_eq!(got, bytes * streams, "{name}: short download");
                    gbits(got, took)
                };
                (up(1).await, down(1).await, up(8).await, down(8).await)
            });
            sample.up1.push(up1);
            sample.down1.push(down1);
            sample.up8.push(up8);
            sample.down8.push(down8);
            eprintln!(
                "rep {}/{} {}: up {up1:.2} down {down1:.2} Gbit/s, {:.0} req/s, {:.0} conn/s",
                rep + 1,
                s.reps,
                path.name,
                rr.per_second,
                c.per_second
            );
        }
    }
    for (i, path) in paths.iter().enumerate() {
        samples[i].ends = path
            .ends
            .iter()
            .enumerate()
            .map(|(j, (role, p))| {
                (
                    *role,
                    cpu_seconds(p.pid()),
                    rss_after_rr[i].get(j).copied().unwrap_or(0),
                    status_kib(p.pid(), "VmHWM:"),
                )
            })
            .collect();
    }
    // Memory per idle connection, one path at a time, after the timed runs, each on freshly
    // started tunnel ends (the timed runs' bulk transfers leave heaps grown and then freed,
    // which idle connections would reuse unseen).
    for (i, path) in paths.iter_mut().enumerate() {
        if s.idle == 0 {
            break;
        }
        let (fresh, n) = match path.kind {
            Kind::Sentry(transport) => {
                path.ends.clear();
                let n = if transport == "wireguard" {
                    // One WireGuard peer carries at most MAX_STREAMS streams.
                    s.idle.min(MAX_STREAMS - 96)
                } else {
                    s.idle
                };
                let fresh_dir = dir.join("idle");
                std::fs::create_dir_all(&fresh_dir).expect("temp dir");
                (
                    sentry_path(site, &fresh_dir, transport, &targets, s.idle),
                    n,
                )
            }
            Kind::Rathole(transport, index) => {
                path.ends.clear();
                let bin = std::env::var("RATHOLE_BIN").expect("rathole measured");
                let fresh = rathole_path(
                    site,
                    &rt,
                    &dir,
                    Path::new(&bin),
                    transport,
                    &targets,
                    index + 2,
                );
                (fresh, s.idle)
            }
            Kind::Baseline | Kind::WireGuardGo => continue,
        };
        samples[i].idle = Some(idle(&rt, &fresh, n));
    }
    if let Site::Loopback = site {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Section {
        site: site.name(),
        names: paths.iter().map(|p| p.name.clone()).collect(),
        samples,
    }
}

/// Hold `n` connections open through `path`, each proven with a one-byte echo; each end's
/// resident memory growth per connection (KiB), measured against one warm connection.
fn idle(rt: &Runtimes, path: &PathUnderTest, n: usize) -> Result<(usize, Vec<f64>), String> {
    let echo = path.routes.echo;
    let rss = || -> Vec<u64> {
        path.ends
            .iter()
            .map(|(_, p)| status_kib(p.pid(), "VmRSS:"))
            .collect()
    };
    // What the first connection allocates is not per connection.
    let warm = run(&rt.client, load::hold_idle(echo, 1)).map_err(|e| e.to_string())?;
    std::thread::sleep(Duration::from_millis(500));
    let before = rss();
    let held = run(&rt.client, load::hold_idle(echo, n));
    std::thread::sleep(Duration::from_secs(1));
    let after = rss();
    let held = match held {
        Ok(held) => held,
        Err(e) => {
            run(&rt.client, async move { drop(warm) });
            std::thread::sleep(Duration::from_secs(2));
            return Err(e.to_string());
        }
    };
    // Closed inside the runtime that registered them; then let both ends forget them.
    run(&rt.client, async move { drop((held, warm)) });
    std::thread::sleep(Duration::from_secs(2));
    let per = before
        .iter()
        .zip(&after)
        .map(|(b, a)| a.saturating_sub(*b) as f64 / n as f64)
        .collect();
    eprintln!("idle {}: {n} connections", path.name);
    Ok((n, per))
}

/// A plain relay on the sentry host to each of `to`'s services.
fn relays(site: &Site, rt: &Runtimes, to: Routes) -> Routes {
    let bind = SocketAddr::new(site.ip(Host::Sentry), 0);
    run(&rt.relays, async move {
        Routes {
            echo: benches::plain_relay_on(bind, to.echo).await,
            sink: benches::plain_relay_on(bind, to.sink).await,
            source: benches::plain_relay_on(bind, to.source).await,
        }
    })
}

/// The release `sentry serve` on the sentry host and `sentry agent` on the validator over
/// `transport`. Every port is chosen by the kernel (a fixed one may be held by an earlier
/// run's connections) and read back from the sentry's log.
fn sentry_path(
    site: &Site,
    dir: &Path,
    transport: &str,
    to: &Routes,
    idle: usize,
) -> PathUnderTest {
    let sentry_key = PrivateKey::generate().expect("key");
    let agent_key = PrivateKey::generate().expect("key");
    let key_file = |name: &str, key: &PrivateKey| {
        let path = dir.join(format!("{transport}-{name}.key"));
        write_private_key(&path, key).expect("key file");
        path
    };
    let (sk, ak) = (
        key_file("sentry", &sentry_key),
        key_file("agent", &agent_key),
    );
    let ip = site.ip(Host::Sentry);
    let (listener, sentry_agent_extra) = match transport {
        "wireguard" => (
            format!("wireguard_listen = \"{ip}:0\"\nwireguard_address = \"100.64.0.1\"\n"),
            "wireguard_address = \"100.64.0.2\"\n",
        ),
        "tls" => (format!("tls_listen = \"{ip}:0\"\n"), ""),
        _ => (String::new(), ""),
    };
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
    let (dial, agent_extra) = match transport {
        "wireguard" => (
            sentry.logged_addr("WireGuard listening", &[], "listen"),
            "wireguard_address = \"100.64.0.2\"\nsentry_wireguard_address = \"100.64.0.1\"\n",
        ),
        "tls" => (
            sentry.logged_addr("TLS tunnel listening", &[], "listen"),
            "",
        ),
        _ => (sentry.logged_addr("sentry ready", &[], "quic"), ""),
    };
    let mut agent = format!(
        "[agent]\nname = \"bench\"\nprivate_key = \"{}\"\n\n\
         [[sentry]]\naddress = \"{dial}\"\npublic_key = \"{}\"\ntransport = \"{transport}\"\n{agent_extra}",
        ak.display(),
        sentry_key.public_key()
    );
    for (name, target) in services {
        agent += &format!("\n[[service]]\nname = \"{name}\"\ntarget = \"{target}\"\n");
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
fn rathole_port(site: &Site, index: u16, which: u16) -> u16 {
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
fn rathole_path(
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

async fn echo_once(addr: SocketAddr) -> bool {
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
fn rathole_has_tls(bin: &Path) -> bool {
    Command::new(bin).arg("--version").output().is_ok_and(|o| {
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .any(|l| l.starts_with("cargo Features:") && l.contains("tls"))
    })
}

/// A self-signed identity for rathole's TLS transport (`rathole.crt`, and `rathole.pfx` with
/// password "bench"), made with the openssl tool; whether it worked.
fn tls_identity(dir: &Path) -> bool {
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

/// User plus system CPU seconds of `pid` so far.
fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i).and_then(|f| f.parse::<u64>().ok()))
        .sum();
    ticks as f64 / rustix::param::clock_ticks_per_second() as f64
}

/// A `/proc/PID/status` size line (`VmRSS:`, `VmHWM:`) in KiB.
fn status_kib(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn command_line(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

/// rathole's `Build Version` (its `--version` prints a block of build facts).
fn rathole_version() -> String {
    let text = command_line(
        &std::env::var("RATHOLE_BIN").unwrap_or_default(),
        &["--version"],
    );
    text.lines()
        .find_map(|l| l.strip_prefix("Build Version:"))
        .map_or(text.clone(), |v| v.trim().to_owned())
}

fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("unknown CPU", |(_, m)| m.trim())
        .to_owned();
    let cores = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map_or(0, |kib| kib >> 20);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{cores} cores ({model}), {memory} GiB, Linux {}",
        kernel.trim()
    )
}

fn cell(samples: &[f64], digits: usize) -> String {
    let (median, min, max) = summary(samples);
    format!("{median:.digits$} ({min:.digits$}–{max:.digits$})")
}

fn median(samples: &[f64]) -> f64 {
    summary(samples).0
}

fn report(sections: &[Section], s: Settings, sites: &str) -> String {
    let rathole = sections
        .iter()
        .any(|x| x.names.iter().any(|n| n.starts_with("rathole")));
    let mut t = String::new();
    let _ = writeln!(t, "# Benchmark results\n");
    let _ = writeln!(
        t,
        "Generated by `benches/run.sh` (the `suite` binary); do not edit by hand. Medians of \
         {} interleaved repetitions with min–max; ratios against `direct`.\n",
        s.reps
    );
    let _ = writeln!(
        t,
        "- Date: {}",
        command_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"])
    );
    let _ = writeln!(t, "- Machine: {}", machine());
    let _ = writeln!(
        t,
        "- Versions: sentry {} ({}), {}{}",
        env!("CARGO_PKG_VERSION"),
        command_line("git", &["rev-parse", "--short", "HEAD"]),
        command_line("rustc", &["-V"]),
        if rathole {
            format!(", rathole {}", rathole_version())
        } else {
            String::new()
        }
    );
    let _ = writeln!(
        t,
        "- Command: `{}BENCH_REPS={} BENCH_BYTES={} BENCH_SECONDS={} BENCH_CONNS={} \
         BENCH_WORKERS={} BENCH_IDLE={} BENCH_SITES={sites} benches/run.sh`",
        if rathole { "BENCH_RATHOLE=1 " } else { "" },
        s.reps,
        s.bytes,
        s.seconds.as_secs(),
        s.conns,
        s.workers,
        s.idle,
    );
    let _ = writeln!(
        t,
        "- Scenarios: bulk, {} MiB per transfer, split evenly over the streams. \
         Request/response: {} keep-alive connections, 64 B each way, {} s. Churn: {} loops, a \
         new connection per 64 B echo, {} s. Idle: {} connections held open per path (at most \
         {} over WireGuard, one peer's stream cap), each proven with a one-byte echo.",
        s.bytes >> 20,
        s.conns,
        s.seconds.as_secs(),
        s.workers,
        s.seconds.as_secs(),
        s.idle,
        MAX_STREAMS - 96,
    );
    let _ = writeln!(
        t,
        "- Sites: **loopback**, every process on one machine's loopback; the **namespace \
         topology** of the real-network tier, the load generator on a client host, the sentry \
         (rathole server, relays) on the sentry host, the agent (rathole client, wireguard-go \
         peer) and the services on a validator behind a NAT router (iptables MASQUERADE), veth \
         MTU 1500. `direct` there is the router's port forward to the validator (kernel \
         forwarding, no relay). Every process shares the same cores.\n"
    );
    for section in sections {
        goals(&mut t, section);
    }
    for section in sections {
        tables(&mut t, section);
    }
    t
}

/// The suite's goals (issue 8), sentry against rathole's noise transport in the same run.
fn goals(t: &mut String, x: &Section) {
    let find = |name: &str| x.names.iter().position(|n| n == name);
    let Some(rathole) = find("rathole (noise)") else {
        return;
    };
    let transports: Vec<(usize, &str)> = [
        ("sentry (QUIC)", "QUIC"),
        ("sentry (WireGuard)", "WireGuard"),
        ("sentry (TLS)", "TLS"),
    ]
    .into_iter()
    .filter_map(|(name, short)| find(name).map(|i| (i, short)))
    .collect();
    let _ = writeln!(t, "## Goals, {}\n", x.site);
    let _ = writeln!(
        t,
        "Each sentry transport against rathole (noise) in the same run; ✓ where the goal is \
         met.\n"
    );
    let mut head = String::from("| goal |");
    let mut rule = String::from("|---|");
    for (_, short) in &transports {
        let _ = write!(head, " {short} |");
        rule += "---|";
    }
    let _ = writeln!(t, "{head}\n{rule}");
    let r = &x.samples[rathole];
    let mark = |ok: bool| if ok { "✓" } else { "✗" };
    let ratio_row = |t: &mut String, label: &str, f: &dyn Fn(&Samples) -> f64, goal: f64| {
        let mut row = format!("| {label} |");
        for (i, _) in &transports {
            let ratio = f(&x.samples[*i]) / f(r);
            let _ = write!(row, " {ratio:.2}× {} |", mark(ratio >= goal));
        }
        let _ = writeln!(t, "{row}");
    };
    ratio_row(
        t,
        "bulk up, 1 stream: ≥ 1.5× rathole",
        &|s| median(&s.up1),
        1.5,
    );
    ratio_row(
        t,
        "bulk down, 1 stream: ≥ 1.5× rathole",
        &|s| median(&s.down1),
        1.5,
    );
    ratio_row(t, "requests/s: ≥ 1.5× rathole", &|s| median(&s.rps), 1.5);
    let direct_p99 = median(&x.samples[0].p99);
    let mut row = String::from("| request p99: ≤ 1.33× direct's |");
    for (i, _) in &transports {
        let ratio = median(&x.samples[*i].p99) / direct_p99;
        let _ = write!(row, " {ratio:.2}× {} |", mark(ratio <= 1.33));
    }
    let _ = writeln!(t, "{row}");
    ratio_row(
        t,
        "new connections/s: ≥ 3× rathole",
        &|s| median(&s.cps),
        3.0,
    );
    let mut row = String::from("| RSS after request/response: ≤ 16 MiB per daemon |");
    for (i, _) in &transports {
        let most = x.samples[*i].ends.iter().map(|e| e.2).max().unwrap_or(0) as f64 / 1024.0;
        let _ = write!(row, " {most:.1} MiB {} |", mark(most <= 16.0));
    }
    let _ = writeln!(t, "{row}");
    let mut row = String::from("| idle connection: ≤ 16 KiB per end |");
    for (i, _) in &transports {
        match &x.samples[*i].idle {
            Some(Ok((_, per))) => {
                let most = per.iter().copied().fold(0.0, f64::max);
                let _ = write!(row, " {most:.1} KiB {} |", mark(most <= 16.0));
            }
            _ => row += " – |",
        }
    }
    let _ = writeln!(t, "{row}\n");
}

fn tables(t: &mut String, x: &Section) {
    let (names, samples) = (&x.names, &x.samples);
    let _ = writeln!(t, "## Bulk throughput, {}, Gbit/s\n", x.site);
    let _ = writeln!(
        t,
        "| path | up, 1 stream | down, 1 stream | up, 8 streams | down, 8 streams |"
    );
    let _ = writeln!(t, "|---|---|---|---|---|");
    for (name, s) in names.iter().zip(samples) {
        let _ = writeln!(
            t,
            "| {name} | {} | {} | {} | {} |",
            cell(&s.up1, 2),
            cell(&s.down1, 2),
            cell(&s.up8, 2),
            cell(&s.down8, 2)
        );
    }
    let _ = writeln!(t, "\n## Request/response and churn, {}\n", x.site);
    let _ = writeln!(
        t,
        "| path | requests/s | vs direct | p50 ms | p99 ms | p99.9 ms | new connections/s | vs direct | TTFB p99 ms | failed |"
    );
    let _ = writeln!(t, "|---|---|---|---|---|---|---|---|---|---|");
    let base_rps = median(&samples[0].rps);
    let base_cps = median(&samples[0].cps);
    for (name, s) in names.iter().zip(samples) {
        let _ = writeln!(
            t,
            "| {name} | {} | {:.2}× | {} | {} | {} | {} | {:.2}× | {} | {} |",
            cell(&s.rps, 0),
            median(&s.rps) / base_rps,
            cell(&s.p50, 3),
            cell(&s.p99, 3),
            cell(&s.p999, 3),
            cell(&s.cps, 0),
            median(&s.cps) / base_cps,
            cell(&s.ttfb99, 3),
            s.failed
        );
    }
    let _ = writeln!(t, "\n## Tunnel ends, {}: CPU and memory\n", x.site);
    let _ = writeln!(
        t,
        "CPU: seconds of user + system time over the timed runs. RSS: resident memory right \
         after the first request/response run (before any bulk transfer), and the peak over the \
         timed runs (`VmHWM`, bulk transfers included). Idle: resident growth per idle \
         relayed connection on freshly started ends, against one warm connection.\n"
    );
    let _ = writeln!(
        t,
        "| path | end | CPU s | RSS after request/response, MiB | peak RSS, MiB | idle, KiB per connection |"
    );
    let _ = writeln!(t, "|---|---|---|---|---|---|");
    for (name, s) in names.iter().zip(samples) {
        for (j, (role, cpu, rss, peak)) in s.ends.iter().enumerate() {
            let idle = match &s.idle {
                Some(Ok((n, per))) => per
                    .get(j)
                    .map_or_else(|| "–".into(), |k| format!("{k:.1} ({n} conns)")),
                Some(Err(e)) => format!("failed: {e}"),
                None => "–".into(),
            };
            let _ = writeln!(
                t,
                "| {name} | {role} | {cpu:.1} | {:.1} | {:.1} | {idle} |",
                *rss as f64 / 1024.0,
                *peak as f64 / 1024.0
            );
        }
    }
    let _ = writeln!(t);
}

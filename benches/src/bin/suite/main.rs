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

mod cost;
mod egress;
mod paths;
mod results;
mod system;

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

use paths::{rathole_has_tls, rathole_path, sentry_path, tls_identity};
use results::report;
use system::{cpu_seconds, status_kib};

/// What the suite was asked to do.
#[derive(Clone, Copy)]
struct Settings {
    reps: usize,
    bytes: usize,
    seconds: Duration,
    conns: usize,
    workers: usize,
    idle: usize,
    /// `BENCH_ONLY=rr`: request/response alone (with its cost table), for quick A/B runs of a
    /// change; the other scenarios' columns are then empty. Never for RESULTS.md.
    all_scenarios: bool,
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
    /// What each request of each request/response run cost.
    cost: Vec<cost::Cost>,
    /// What each connection of each churn run cost.
    churn_cost: Vec<cost::Cost>,
}

/// One site's results.
struct Section {
    site: &'static str,
    names: Vec<String>,
    samples: Vec<Samples>,
    /// The node dialing out through the sentry against dialing directly.
    egress: Option<egress::EgressSection>,
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
        all_scenarios: std::env::var("BENCH_ONLY").map_or(true, |v| v != "rr"),
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

    let names: Vec<String> = paths.iter().map(|p| p.name.clone()).collect();
    let mut samples = vec![Samples::default(); paths.len()];
    let mut rss_after_rr = vec![Vec::<u64>::new(); paths.len()];
    for rep in 0..s.reps {
        for (i, path) in paths.iter().enumerate() {
            let sample = &mut samples[i];
            let r = path.routes;
            // Request/response first, so the resident memory read after it (first
            // repetition) is what that load needs, before any bulk transfer grew the heap.
            let probe = cost::Probe::start(site, cost_targets(site, path), &dir);
            let rr = run(
                &rt.client,
                load::request_response(r.echo, s.conns, 64, s.seconds),
            );
            sample.cost.push(probe.finish(site, rr.requests));
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
            if !s.all_scenarios {
                eprintln!(
                    "rep {}/{} {}: {:.0} req/s (request/response only)",
                    rep + 1,
                    s.reps,
                    path.name,
                    rr.per_second
                );
                continue;
            }
            let probe = cost::Probe::start(site, cost_targets(site, path), &dir);
            let c = run(&rt.client, load::churn(r.echo, s.workers, 64, s.seconds));
            sample.churn_cost.push(probe.finish(site, c.connections));
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
    drop(paths);
    let egress = s.all_scenarios.then(|| egress::measure_egress(site, s));
    if let Site::Loopback = site {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Section {
        site: site.name(),
        names,
        samples,
        egress,
    }
}

/// Whose CPU, switches and syscalls a request on `path` costs: its tunnel ends, and in the
/// namespace topology the in-process relay's threads on the sentry host (on loopback they share
/// one runtime with the load generator and cannot be told apart).
fn cost_targets(site: &Site, path: &PathUnderTest) -> cost::Targets {
    let relay = path.name == "plain relay" || path.kind == Kind::WireGuardGo;
    let tids = match site {
        Site::Netns(_) if relay => cost::own_threads(&format!("bench-{}", Host::Sentry.short())),
        _ => Vec::new(),
    };
    cost::Targets {
        pids: path.ends.iter().map(|(_, p)| p.pid()).collect(),
        tids,
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

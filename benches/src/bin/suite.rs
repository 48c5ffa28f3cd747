//! The benchmark suite: every scenario against every path in one run, repetitions
//! interleaved, medians with min–max and ratios against the direct baseline, CPU time and
//! resident memory of each tunnel end, written to `benches/RESULTS.md`.
//!
//! Run it through `benches/run.sh` (it builds the release binaries and finds rathole). Paths:
//! `direct` (no relay), `plain relay` (tokio `copy_bidirectional` in this process), the
//! release `sentry` binary as sentry + agent over QUIC, WireGuard and TLS, and rathole with
//! its noise transport (and TLS, when built with it) when `RATHOLE_BIN` names a rathole
//! binary. Everything runs on loopback
//! on this machine; the namespace topology is `cargo bench -p benches --bench netns`.
//!
//! Settings (environment): `BENCH_REPS` (3), `BENCH_BYTES` per bulk transfer (256 MiB),
//! `BENCH_SECONDS` per request/response and churn run (5), `BENCH_CONNS` keep-alive
//! connections (64), `BENCH_WORKERS` churn loops (16), `BENCH_OUT` (benches/RESULTS.md),
//! `SENTRY_BIN` (the release binary).
#![allow(clippy::disallowed_methods)] // plain deadlines and process handling, outside the daemon

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use benches::{gbits, load, plain_relay, read_env, summary};
use relay_core::keys::{PrivateKey, write_private_key};
use tests::daemon::Daemon;

/// The ports of one deployment's routes: echo, sink, source.
#[derive(Clone, Copy)]
struct Routes {
    echo: SocketAddr,
    sink: SocketAddr,
    source: SocketAddr,
}

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
}

fn main() {
    let reps = read_env("BENCH_REPS", 3);
    let bytes = read_env("BENCH_BYTES", 256 << 20);
    let seconds = Duration::from_secs(read_env("BENCH_SECONDS", 5) as u64);
    let conns = read_env("BENCH_CONNS", 64);
    let workers = read_env("BENCH_WORKERS", 16);
    let out = std::env::var("BENCH_OUT").unwrap_or_else(|_| "benches/RESULTS.md".into());
    let dir = tempdir();
    let runtime = benches::runtime();
    let (echo, sink, source) = runtime.block_on(async {
        (
            load::echo().await,
            benches::sink().await,
            benches::source(bytes).await,
        )
    });
    let direct = Routes { echo, sink, source };
    let mut paths = vec![PathUnderTest {
        name: "direct".into(),
        routes: direct,
        ends: Vec::new(),
    }];
    let relay = runtime.block_on(async {
        Routes {
            echo: plain_relay(echo).await,
            sink: plain_relay(sink).await,
            source: plain_relay(source).await,
        }
    });
    paths.push(PathUnderTest {
        name: "plain relay".into(),
        routes: relay,
        ends: Vec::new(),
    });
    for transport in ["quic", "wireguard", "tls"] {
        paths.push(sentry_path(&dir, transport, &direct));
    }
    match std::env::var("RATHOLE_BIN") {
        Ok(bin) if !bin.is_empty() => {
            paths.push(rathole_path(&dir, Path::new(&bin), "noise", &direct));
            // The TLS transport needs a rathole built with `tls` (OpenSSL) and the openssl tool
            // for its PKCS#12 identity (benches/run.sh provides both where it can).
            if rathole_has_tls(Path::new(&bin)) && tls_identity(&dir) {
                paths.push(rathole_path(&dir, Path::new(&bin), "tls", &direct));
            } else {
                eprintln!("rathole (tls): not measured (no native-tls build or no openssl tool)");
            }
        }
        _ => eprintln!(
            "rathole: not measured (set RATHOLE_BIN, or run benches/run.sh with BENCH_RATHOLE=1)"
        ),
    }

    let mut samples = vec![Samples::default(); paths.len()];
    let mut rss_after_rr = vec![Vec::<u64>::new(); paths.len()];
    for rep in 0..reps {
        for (i, path) in paths.iter().enumerate() {
            let s = &mut samples[i];
            // Request/response first, so the resident memory read after it (first
            // repetition) is what that load needs, before any bulk transfer grew the heap.
            runtime.block_on(async {
                let rr = load::request_response(path.routes.echo, conns, 64, seconds).await;
                s.rps.push(rr.per_second);
                s.p50.push(rr.p50_us as f64 / 1e3);
                s.p99.push(rr.p99_us as f64 / 1e3);
                s.p999.push(rr.p999_us as f64 / 1e3);
                s.failed += rr.failed;
            });
            if rep == 0 {
                rss_after_rr[i] = path
                    .ends
                    .iter()
                    .map(|(_, p)| status_kib(p.pid(), "VmRSS:"))
                    .collect();
            }
            runtime.block_on(async {
                let c = load::churn(path.routes.echo, workers, 64, seconds).await;
                s.cps.push(c.per_second);
                s.ttfb99.push(c.ttfb_p99_us as f64 / 1e3);
                s.failed += c.failed;
                let r = &path.routes;
                s.up1.push(gbits(
                    bytes,
                    load::upload(r.sink, bytes, 1).await.expect("upload"),
                ));
                let (t, n) = load::download(r.source, 1).await.expect("download");
                s.down1.push(gbits(n, t));
                s.up8.push(gbits(
                    bytes,
                    load::upload(r.sink, bytes, 8).await.expect("upload"),
                ));
                let (t, n) = load::download(r.source, 8).await.expect("download");
                s.down8.push(gbits(n, t));
            });
            eprintln!(
                "rep {}/{reps} {}: up {:.2} down {:.2} Gbit/s, {:.0} req/s, {:.0} conn/s",
                rep + 1,
                path.name,
                s.up1[rep],
                s.down1[rep],
                s.rps[rep],
                s.cps[rep]
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
    let text = report(&paths, &samples, reps, bytes, seconds, conns, workers);
    println!("{text}");
    std::fs::write(&out, &text).expect("write results");
    eprintln!("written to {out}");
    let _ = std::fs::remove_dir_all(&dir);
}

fn tempdir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sentry-suite-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// The release `sentry serve` and `sentry agent` over `transport`. Every port is chosen by
/// the kernel (a fixed one may be held by an earlier run's connections) and read back from
/// the sentry's log.
fn sentry_path(dir: &Path, transport: &str, to: &Routes) -> PathUnderTest {
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
    let (listener, sentry_agent_extra) = match transport {
        "wireguard" => (
            "wireguard_listen = \"127.0.0.1:0\"\nwireguard_address = \"100.64.0.1\"\n",
            "wireguard_address = \"100.64.0.2\"\n",
        ),
        "tls" => ("tls_listen = \"127.0.0.1:0\"\n", ""),
        _ => ("", ""),
    };
    let mut sentry = format!(
        "[sentry]\nprivate_key = \"{}\"\nquic_listen = \"127.0.0.1:0\"\n{listener}\n\
         [[agent]]\nname = \"bench\"\npublic_key = \"{}\"\n{sentry_agent_extra}",
        sk.display(),
        agent_key.public_key()
    );
    let services = [("echo", to.echo), ("sink", to.sink), ("source", to.source)];
    for (name, _) in services {
        sentry += &format!(
            "\n[[route]]\nname = \"{name}\"\nlisten = \"127.0.0.1:0\"\nupstream = [\"bench/{name}\"]\n\
             max_connections_per_ip = 100000\nconnect_rate_per_ip = \"1000000/s\"\n"
        );
    }
    let sentry_path = dir.join(format!("{transport}-sentry.toml"));
    std::fs::write(&sentry_path, sentry).expect("write");
    let sentry = Daemon::start("serve", &sentry_path);
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
    let agent = Daemon::start("agent", &agent_path);
    sentry.wait_log("tunnel up", 1, Duration::from_secs(30));
    let route = |name: &str| sentry.logged_addr("route listening", &[("route", name)], "listen");
    let routes = Routes {
        echo: route("echo"),
        sink: route("sink"),
        source: route("source"),
    };
    let name = match transport {
        "quic" => "sentry (QUIC)",
        "wireguard" => "sentry (WireGuard)",
        _ => "sentry (TLS)",
    };
    PathUnderTest {
        name: name.into(),
        routes,
        ends: vec![
            ("sentry", Process::Sentry(sentry)),
            ("agent", Process::Sentry(agent)),
        ],
    }
}

/// A loopback port free right now (rathole needs fixed ones in its config).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// rathole server and client with the noise transport (its default Noise_NK pattern), the
/// three services on free loopback ports.
fn rathole_path(dir: &Path, bin: &Path, transport: &str, to: &Routes) -> PathUnderTest {
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
    let at = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
    let control = at(free_port());
    let ports = [free_port(), free_port(), free_port()];
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
    let spawn = |flag: &str, path: &Path| {
        Command::new(bin)
            .arg(flag)
            .arg(path)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("rathole")
    };
    let server = Process::Other(spawn("--server", &server_path));
    let client = Process::Other(spawn("--client", &client_path));
    // Ready once a connection through it echoes.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        if echo_once(at(ports[0])) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "rathole did not come up in 30 s"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    PathUnderTest {
        name: format!("rathole ({transport})"),
        routes: Routes {
            echo: at(ports[0]),
            sink: at(ports[1]),
            source: at(ports[2]),
        },
        ends: vec![("server", server), ("client", client)],
    }
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

fn echo_once(addr: SocketAddr) -> bool {
    use std::io::{Read, Write};
    let Ok(mut tcp) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
        return false;
    };
    let _ = tcp.set_read_timeout(Some(Duration::from_secs(1)));
    let mut byte = [0u8; 1];
    tcp.write_all(b"x").is_ok() && tcp.read_exact(&mut byte).is_ok()
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

fn report(
    paths: &[PathUnderTest],
    samples: &[Samples],
    reps: usize,
    bytes: usize,
    seconds: Duration,
    conns: usize,
    workers: usize,
) -> String {
    let mut t = String::new();
    let _ = writeln!(t, "# Benchmark results\n");
    let _ = writeln!(
        t,
        "Generated by `benches/run.sh` (the `suite` binary); do not edit by hand. Medians of \
         {reps} interleaved repetitions with min–max; ratios against `direct`.\n"
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
        if paths.iter().any(|p| p.name.starts_with("rathole")) {
            format!(", rathole {}", rathole_version())
        } else {
            String::new()
        }
    );
    let _ = writeln!(
        t,
        "- Command: `{}BENCH_REPS={reps} BENCH_BYTES={bytes} BENCH_SECONDS={} BENCH_CONNS={conns} \
         BENCH_WORKERS={workers} benches/run.sh`",
        if paths.iter().any(|p| p.name.starts_with("rathole")) {
            "BENCH_RATHOLE=1 "
        } else {
            ""
        },
        seconds.as_secs()
    );
    let _ = writeln!(
        t,
        "- Topology: loopback; every process (load generator, services, both tunnel ends) shares \
         the same cores. Bulk: {} MiB per transfer, split evenly over the streams. \
         Request/response: {conns} keep-alive connections, 64 B each way, {} s. Churn: {workers} \
         loops, a new connection per 64 B echo, {} s.\n",
        bytes >> 20,
        seconds.as_secs(),
        seconds.as_secs()
    );
    let _ = writeln!(t, "## Bulk throughput, Gbit/s\n");
    let _ = writeln!(
        t,
        "| path | up, 1 stream | down, 1 stream | up, 8 streams | down, 8 streams |"
    );
    let _ = writeln!(t, "|---|---|---|---|---|");
    for (p, s) in paths.iter().zip(samples) {
        let _ = writeln!(
            t,
            "| {} | {} | {} | {} | {} |",
            p.name,
            cell(&s.up1, 2),
            cell(&s.down1, 2),
            cell(&s.up8, 2),
            cell(&s.down8, 2)
        );
    }
    let _ = writeln!(t, "\n## Request/response and churn\n");
    let _ = writeln!(
        t,
        "| path | requests/s | vs direct | p50 ms | p99 ms | p99.9 ms | new connections/s | vs direct | TTFB p99 ms | failed |"
    );
    let _ = writeln!(t, "|---|---|---|---|---|---|---|---|---|---|");
    let base_rps = summary(&samples[0].rps).0;
    let base_cps = summary(&samples[0].cps).0;
    for (p, s) in paths.iter().zip(samples) {
        let _ = writeln!(
            t,
            "| {} | {} | {:.2}× | {} | {} | {} | {} | {:.2}× | {} | {} |",
            p.name,
            cell(&s.rps, 0),
            summary(&s.rps).0 / base_rps,
            cell(&s.p50, 3),
            cell(&s.p99, 3),
            cell(&s.p999, 3),
            cell(&s.cps, 0),
            summary(&s.cps).0 / base_cps,
            cell(&s.ttfb99, 3),
            s.failed
        );
    }
    let _ = writeln!(t, "\n## Tunnel ends: CPU and memory\n");
    let _ = writeln!(
        t,
        "CPU: seconds of user + system time over the whole run. RSS: resident memory right after \
         the first request/response run (before any bulk transfer), and the peak over the run \
         (`VmHWM`, bulk transfers included).\n"
    );
    let _ = writeln!(
        t,
        "| path | end | CPU s | RSS after request/response, MiB | peak RSS, MiB |"
    );
    let _ = writeln!(t, "|---|---|---|---|---|");
    for (p, s) in paths.iter().zip(samples) {
        for (role, cpu, rss, peak) in &s.ends {
            let _ = writeln!(
                t,
                "| {} | {role} | {cpu:.1} | {:.1} | {:.1} |",
                p.name,
                *rss as f64 / 1024.0,
                *peak as f64 / 1024.0
            );
        }
    }
    t
}

//! Shared helpers of the integration tests: keys, configs written as TOML and parsed by the
//! real parser, in-process sentry and agent, sample services, payloads and hashes.
#![forbid(unsafe_code)]
#![allow(clippy::unwrap_used, clippy::missing_panics_doc)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use relay_core::config::{self, AgentConfig, SentryConfig};
use relay_core::keys::PrivateKey;
use relay_core::sentry::{Sentry, SentryHandle};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Generous bound for things that should take milliseconds; a hang fails instead of blocking CI.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// A fresh host key.
#[must_use]
pub fn key() -> PrivateKey {
    PrivateKey::generate().unwrap()
}

/// The repository root.
#[must_use]
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// A sentry config on loopback. `agents`: (name, key); `routes`: (name, upstreams, extra TOML
/// lines for the route table).
#[must_use]
pub fn sentry_config(
    agents: &[(&str, &PrivateKey)],
    routes: &[(&str, &[&str], &str)],
) -> SentryConfig {
    let mut text =
        String::from("[sentry]\nprivate_key = \"sentry.key\"\nquic_listen = \"127.0.0.1:0\"\n");
    for (name, key) in agents {
        text += &format!(
            "\n[[agent]]\nname = \"{name}\"\npublic_key = \"{}\"\n",
            key.public_key()
        );
    }
    for (name, upstreams, extra) in routes {
        let list: Vec<String> = upstreams.iter().map(|u| format!("\"{u}\"")).collect();
        text += &format!(
            "\n[[route]]\nname = \"{name}\"\nlisten = \"127.0.0.1:0\"\nupstream = [{}]\n{extra}\n",
            list.join(", ")
        );
    }
    config::parse_sentry(Path::new("test-sentry.toml"), &text).unwrap()
}

/// An agent config dialing `sentry` (pinning `sentry_key`) and exporting `services`.
#[must_use]
pub fn agent_config(
    name: &str,
    sentry: SocketAddr,
    sentry_key: &PrivateKey,
    services: &[(&str, SocketAddr)],
) -> AgentConfig {
    let mut text = format!(
        "[agent]\nname = \"{name}\"\nprivate_key = \"agent.key\"\n\n[[sentry]]\naddress = \"{sentry}\"\npublic_key = \"{}\"\n",
        sentry_key.public_key()
    );
    for (service, target) in services {
        text += &format!("\n[[service]]\nname = \"{service}\"\ntarget = \"{target}\"\n");
    }
    config::parse_agent(Path::new("test-agent.toml"), &text).unwrap()
}

/// A sentry running in this process; stops (with no drain) when dropped.
pub struct RunningSentry {
    pub handle: SentryHandle,
    _stop: oneshot::Sender<()>,
}

/// In-process daemons log to stderr (captured by the test harness, shown when a test fails)
/// at the level `SENTRY_TEST_LOG` names; nothing when it is unset.
fn init_log() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if let Ok(filter) = std::env::var("SENTRY_TEST_LOG") {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
                .with_test_writer()
                .try_init();
        }
    });
}

/// Bind and run a sentry.
pub async fn start_sentry(config: &SentryConfig, key: &PrivateKey) -> RunningSentry {
    init_log();
    let sentry = Sentry::bind(config, key).await.unwrap();
    let handle = sentry.handle();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(sentry.run(async move {
        let _ = stopped.await;
    }));
    RunningSentry {
        handle,
        _stop: stop,
    }
}

impl RunningSentry {
    /// The public address of a route.
    #[must_use]
    pub fn route(&self, name: &str) -> SocketAddr {
        self.handle.route_addr(name).unwrap()
    }

    /// Wait (bounded) until `agent`'s tunnel is `up` or down.
    pub async fn wait_agent(&self, agent: &str, up: bool) {
        tokio::time::timeout(PATIENCE, self.handle.wait_agent(agent, up))
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "agent {agent} not {} within {PATIENCE:?}",
                    if up { "up" } else { "down" }
                )
            });
    }
}

/// An agent running in this process; its task is aborted (the agent vanishes) when dropped.
pub struct RunningAgent {
    task: JoinHandle<()>,
}

impl Drop for RunningAgent {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Run an agent.
#[must_use]
pub fn start_agent(config: AgentConfig, key: PrivateKey) -> RunningAgent {
    init_log();
    let task = tokio::spawn(async move {
        relay_core::agent::run(&config, &key, std::future::pending())
            .await
            .unwrap();
    });
    RunningAgent { task }
}

/// A sentry with route "p2p" (`extra`: more TOML lines for it) to agent "v1"'s `service`;
/// the agent exports "svc" at `target`. Returns once the tunnel is up.
pub async fn deployment_to(
    service: &str,
    target: SocketAddr,
    extra: &str,
) -> (RunningSentry, RunningAgent) {
    deployment_with("p2p", service, ("svc", target), extra).await
}

/// A sentry with route `route` (`extra`: more TOML lines for it) to agent "v1"'s `service`;
/// the agent exports `exported` (a name and its target). Returns once the tunnel is up.
pub async fn deployment_with(
    route: &str,
    service: &str,
    exported: (&str, SocketAddr),
    extra: &str,
) -> (RunningSentry, RunningAgent) {
    let (sentry_key, agent_key) = (key(), key());
    let upstream = format!("v1/{service}");
    let config = sentry_config(&[("v1", &agent_key)], &[(route, &[&upstream], extra)]);
    let sentry = start_sentry(&config, &sentry_key).await;
    let agent = start_agent(
        agent_config(
            "v1",
            sentry.handle.quic_addr().expect("quic_listen is set"),
            &sentry_key,
            &[exported],
        ),
        agent_key,
    );
    sentry.wait_agent("v1", true).await;
    (sentry, agent)
}

/// A TCP service on loopback running `serve` for every connection.
pub async fn service<F, Fut>(serve: F) -> SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(serve(tcp));
        }
    });
    addr
}

/// Echoes every byte, then half-closes when the client does.
pub async fn echo_service() -> SocketAddr {
    service(|mut tcp| async move {
        let (mut r, mut w) = tcp.split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
        let _ = w.shutdown().await;
    })
    .await
}

/// Writes `tag` first, then echoes: tells which service answered.
pub async fn tagged_echo_service(tag: &'static str) -> SocketAddr {
    service(move |mut tcp| async move {
        let _ = tcp.write_all(tag.as_bytes()).await;
        let (mut r, mut w) = tcp.split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
        let _ = w.shutdown().await;
    })
    .await
}

/// Reads everything, then answers the SHA-256 of what it read and closes.
pub async fn hash_sink() -> SocketAddr {
    service(|mut tcp| async move {
        let (_, digest) = read_hash(&mut tcp).await.unwrap();
        tcp.write_all(&digest).await.unwrap();
        tcp.shutdown().await.unwrap();
    })
    .await
}

/// Upload `len` payload bytes from `seed` to a [`hash_sink`] behind `route` and check the
/// digest it answers (bounded by two minutes).
pub async fn upload_hash_checked(route: SocketAddr, seed: u64, len: usize) {
    let mut tcp = TcpStream::connect(route).await.unwrap();
    let sent = write_payload(&mut tcp, seed, len).await.unwrap();
    tcp.shutdown().await.unwrap();
    let mut digest = Vec::new();
    tokio::time::timeout(Duration::from_secs(120), tcp.read_to_end(&mut digest))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(digest, sent, "the validator received different bytes");
}

/// A free loopback port with nothing listening on it.
pub async fn closed_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

/// Deterministic payload: `len` bytes from `seed`, generated in 64 KiB blocks.
pub fn payload_blocks(seed: u64, len: usize) -> impl Iterator<Item = Vec<u8>> {
    const BLOCK: usize = 64 * 1024;
    let mut state = seed | 1;
    (0..len.div_ceil(BLOCK)).map(move |i| {
        let size = BLOCK.min(len - i * BLOCK);
        let mut block = Vec::with_capacity(size);
        while block.len() < size {
            // xorshift64*: cheap, deterministic, not for security.
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            let word = state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
            let take = (size - block.len()).min(8);
            block.extend_from_slice(&word[..take]);
        }
        block
    })
}

/// Write `len` payload bytes from `seed` and return their SHA-256.
pub async fn write_payload<W: AsyncWrite + Unpin>(
    w: &mut W,
    seed: u64,
    len: usize,
) -> std::io::Result<Vec<u8>> {
    let mut sha = ring::digest::Context::new(&ring::digest::SHA256);
    for block in payload_blocks(seed, len) {
        sha.update(&block);
        w.write_all(&block).await?;
    }
    Ok(sha.finish().as_ref().to_vec())
}

/// Read to end of stream; return (bytes, SHA-256).
pub async fn read_hash<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<(usize, Vec<u8>)> {
    let mut sha = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0;
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            return Ok((total, sha.finish().as_ref().to_vec()));
        }
        sha.update(&buf[..n]);
        total += n;
    }
}

/// Whether a fresh connection to `addr` is closed by the far side within `within`, without
/// receiving a byte.
pub async fn closed_without_data(addr: SocketAddr, within: Duration) -> bool {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let _ = tcp.write_all(b"ping").await;
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(within, tcp.read(&mut buf)).await,
        Ok(Ok(0) | Err(_))
    )
}

/// A service that sends part of an answer, then resets its connection (a node that crashed
/// mid-answer).
pub async fn resetting_service() -> SocketAddr {
    service(|mut tcp| async move {
        let _ = tcp.write_all(&[7u8; 64 * 1024]).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let _ = tcp.set_zero_linger();
    })
    .await
}

/// A client of `route` (relayed to [`resetting_service`]) must see the cut as a reset, never
/// as a clean end of stream it could take for the whole answer.
pub async fn a_cut_answer_reaches_the_client_as_a_reset(route: SocketAddr) {
    let mut tcp = TcpStream::connect(route).await.unwrap();
    let mut buf = vec![0u8; 16 * 1024];
    let mut got = 0;
    let end = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) => return Ok(()),
                Ok(n) => got += n,
                Err(e) => return Err(e),
            }
        }
    })
    .await
    .expect("the relayed connection stayed open after its service reset it");
    match end {
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
        Ok(()) => panic!("the client saw a clean end after {got} bytes of a cut answer"),
    }
}

/// The `sentry` binary built by cargo for this profile: `SENTRY_BIN` if set, else the one in
/// the target directory next to this test executable. Build it first with
/// `cargo build -p sentry` (the README's test command does).
#[must_use]
pub fn sentry_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("SENTRY_BIN") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/<test> -> target/<profile>/sentry
    let bin = exe.parent().unwrap().parent().unwrap().join("sentry");
    assert!(
        bin.exists(),
        "{} not found: build it first with `cargo build -p sentry`",
        bin.display()
    );
    bin
}

/// `n` connections to the echo behind `addr` at once, each with its own payload (a different
/// length and seed), each hash-checked: no connection may get another's bytes.
pub async fn concurrent_echoes(addr: SocketAddr, n: u64) {
    let mut tasks = Vec::new();
    for i in 0..n {
        tasks.push(tokio::spawn(async move {
            let tcp = TcpStream::connect(addr).await.unwrap();
            let (mut r, mut w) = tcp.into_split();
            let len = 16 * 1024 + usize::try_from(i).unwrap() * 97;
            let writer = tokio::spawn(async move {
                let digest = write_payload(&mut w, 1000 + i, len).await.unwrap();
                w.shutdown().await.unwrap();
                digest
            });
            let (got_len, got) = read_hash(&mut r).await.unwrap();
            assert_eq!(got_len, len, "connection {i}");
            assert_eq!(
                got,
                writer.await.unwrap(),
                "connection {i} got another's bytes"
            );
        }));
    }
    for task in tasks {
        tokio::time::timeout(PATIENCE * 3, task)
            .await
            .unwrap()
            .unwrap();
    }
}

pub mod daemon;
pub mod netns;
pub mod rpc_node;
pub mod stall;
pub mod stand_in;

/// `GET path` over HTTP/1.0 (blocking, bounded): the status code and the body.
#[must_use]
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut tcp = std::net::TcpStream::connect_timeout(&addr, PATIENCE).unwrap();
    tcp.set_read_timeout(Some(PATIENCE)).unwrap();
    write!(tcp, "GET {path} HTTP/1.0\r\nHost: test\r\n\r\n").unwrap();
    let mut response = String::new();
    tcp.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, body.to_owned())
}

/// One sample of a Prometheus text exposition, parsed by an independent parser
/// (prometheus-parse): the value of `name` with exactly these labels, if present.
#[must_use]
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let lines = text.lines().map(|l| Ok(l.to_owned()));
    let scrape = prometheus_parse::Scrape::parse(lines).unwrap();
    scrape
        .samples
        .iter()
        .find(|s| {
            s.metric == name
                && s.labels.len() == labels.len()
                && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v))
        })
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => f64::NAN,
        })
}

/// Whether `program --version`-style `args` runs: an external tool a test needs. Without it
/// the test is skipped (it prints why), except under `CI=true`, where CI must have installed
/// it (`.ci/run`) and the test fails instead.
#[must_use]
pub fn tool_available(program: &str, args: &[&str], needed_for: &str) -> bool {
    let found = std::process::Command::new(program)
        .args(args)
        .output()
        .is_ok_and(|out| out.status.success());
    if !found {
        assert!(
            !std::env::var("CI").is_ok_and(|v| v == "true"),
            "{program} is not installed; CI installs it (.ci/run)"
        );
        eprintln!("{needed_for} skipped: {program} is not installed");
    }
    found
}

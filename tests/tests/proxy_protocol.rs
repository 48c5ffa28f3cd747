//! PROXY protocol checked against a real consumer: haproxy (Debian's package) listens with
//! `accept-proxy` behind the agent and answers every request with the client address it
//! believes in, and logs it. Through the sentry, that address must be the real client's
//! (127.0.0.2 here, not the agent's 127.0.0.1), for v1 and v2. Where haproxy is not installed
//! the test is skipped and says so; under `CI=true` it fails instead.
#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// A haproxy in the foreground, killed (by its PID, through the child handle) when dropped.
struct Haproxy {
    child: Child,
    addr: SocketAddr,
    log: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

fn haproxy_available() -> bool {
    tests::tool_available("haproxy", &["-v"], "PROXY protocol interop test")
}

async fn free_port() -> u16 {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap().port()
}

impl Haproxy {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port().await));
        let log = dir.path().join("haproxy.log");
        let config = format!(
            "global
    log stdout format raw local0 info
defaults
    mode http
    log global
    timeout connect 5s
    timeout client 10s
    timeout server 10s
frontend pp
    bind {addr} accept-proxy
    log-format \"client=%ci:%cp frontend=%fi:%fp\"
    http-request return status 200 content-type text/plain lf-string \"%[src] %[src_port] %[dst] %[dst_port]\"
"
        );
        let path = dir.path().join("haproxy.cfg");
        std::fs::write(&path, config).unwrap();
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        let haproxy = Self {
            child,
            addr,
            log,
            _dir: dir,
        };
        // Killed by Drop if it never comes up.
        let ready = eventually(|| async { TcpStream::connect(addr).await.is_ok() }).await;
        assert!(
            ready,
            "haproxy did not listen on {addr}: {}",
            read(&haproxy.log)
        );
        haproxy
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether `condition` holds within [`PATIENCE`], checked every 20 ms.
async fn eventually<F, Fut>(mut condition: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    tokio::time::timeout(PATIENCE, async {
        while !condition().await {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .is_ok()
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// One HTTP request through the route from source address 127.0.0.2; returns the client's
/// own address and haproxy's response body.
async fn ask(route: SocketAddr) -> (SocketAddr, String) {
    let socket = TcpSocket::new_v4().unwrap();
    socket
        .bind(SocketAddr::new("127.0.0.2".parse::<IpAddr>().unwrap(), 0))
        .unwrap();
    let mut tcp = socket.connect(route).await.unwrap();
    let me = tcp.local_addr().unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: sentry-test\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    tokio::time::timeout(PATIENCE, tcp.read_to_string(&mut response))
        .await
        .expect("haproxy answered in time")
        .unwrap();
    assert!(
        response.starts_with("HTTP/1.1 200"),
        "haproxy did not accept the request: {response:?}"
    );
    let body = response.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    (me, body)
}

async fn check(version: &str) {
    if !haproxy_available() {
        return;
    }
    let haproxy = Haproxy::start().await;
    let (sentry, _agent) = deployment_to(
        "svc",
        haproxy.addr,
        &format!("proxy_protocol = \"{version}\""),
    )
    .await;
    let route = sentry.route("p2p");
    for _ in 0..3 {
        let (me, body) = ask(route).await;
        // What haproxy believes: the real client as source, the sentry's listener as
        // destination.
        assert_eq!(
            body,
            format!("{} {} {} {}", me.ip(), me.port(), route.ip(), route.port()),
            "PROXY {version}: haproxy saw the wrong addresses"
        );
        // And what it logs.
        let want = format!("client={me}");
        let logged = eventually(|| async { read(&haproxy.log).contains(&want) }).await;
        assert!(
            logged,
            "haproxy did not log {want:?}: {}",
            read(&haproxy.log)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_sees_the_real_client_over_v1() {
    check("v1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_sees_the_real_client_over_v2() {
    check("v2").await;
}

/// Off (the default) writes nothing: haproxy with `accept-proxy` refuses the bare request,
/// which shows the header above really came from us and is absent unless asked for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn off_writes_no_header() {
    if !haproxy_available() {
        return;
    }
    let haproxy = Haproxy::start().await;
    let (sentry, _agent) = deployment_to("svc", haproxy.addr, "").await;
    let mut tcp = TcpStream::connect(sentry.route("p2p")).await.unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: sentry-test\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, tcp.read_to_end(&mut response)).await;
    assert!(
        !response.starts_with(b"HTTP/1.1 200"),
        "haproxy accepted a connection without a PROXY header: {}",
        String::from_utf8_lossy(&response)
    );
}

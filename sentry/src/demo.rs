//! `sentry demo`: the whole picture on loopback, with throwaway keys.
//!
//! A sample validator (a P2P-like echo service and a JSON-RPC stand-in), an agent exporting
//! them, and a sentry with public routes, all in this process, configured through real config
//! files in a temporary directory and the same parser the daemons use. It then checks, as an
//! operator would, that traffic flows and that what must be refused is refused.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use relay_core::config::{self, SentryPeer, TransportKind};
use relay_core::keys::{self, PrivateKey};
use relay_core::sentry::{Sentry, SentryHandle};
use relay_core::transport::quic;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::Failure;

const BULK_BYTES: usize = 64 * 1024 * 1024;

/// One line of the self-check.
struct Check {
    name: &'static str,
    result: Result<String, String>,
}

pub async fn run(once: bool) -> Result<(), Failure> {
    let fail =
        |what: &str, e: &dyn std::fmt::Display| Failure::Runtime(format!("demo: {what}: {e}"));
    let dir = tempfile::Builder::new()
        .prefix("sentry-demo-")
        .tempdir()
        .map_err(|e| fail("temp dir", &e))?;
    let p2p = sample_echo()
        .await
        .map_err(|e| fail("sample P2P service", &e))?;
    let rpc = sample_rpc()
        .await
        .map_err(|e| fail("sample RPC service", &e))?;

    let sentry_key = new_key(&dir.path().join("sentry.key"))?;
    let agent_key = new_key(&dir.path().join("agent.key"))?;
    let sentry_toml = format!(
        r#"# Written by `sentry demo`.
[sentry]
private_key = "sentry.key"
quic_listen = "127.0.0.1:0"

[[agent]]
name = "validator-1"
public_key = "{agent}"

[[route]]
name = "p2p"
listen = "127.0.0.1:0"
upstream = ["validator-1/p2p"]

[[route]]
name = "rpc"
listen = "127.0.0.1:0"
upstream = ["validator-1/rpc"]

[[route]]
name = "admin"                       # the agent exports no "admin": always refused
listen = "127.0.0.1:0"
upstream = ["validator-1/admin"]
"#,
        agent = agent_key.public_key()
    );
    let sentry_path = dir.path().join("sentry.toml");
    std::fs::write(&sentry_path, sentry_toml).map_err(|e| fail("writing sentry.toml", &e))?;
    let sentry_config = config::load_sentry(&sentry_path).map_err(|e| fail("sentry.toml", &e))?;
    let sentry = Sentry::bind(&sentry_config, &sentry_key)
        .await
        .map_err(|e| fail("starting the sentry", &e))?;
    let handle = sentry.handle();
    tokio::spawn(sentry.run(std::future::pending()));

    let agent_toml = format!(
        r#"# Written by `sentry demo`.
[agent]
name = "validator-1"
private_key = "agent.key"

[[sentry]]
address = "{quic}"
public_key = "{sentry}"
transport = "quic"

[[service]]
name = "p2p"
target = "{p2p}"

[[service]]
name = "rpc"
target = "{rpc}"
"#,
        quic = handle.quic_addr().expect("quic_listen is set"),
        sentry = sentry_key.public_key(),
    );
    let agent_path = dir.path().join("agent.toml");
    std::fs::write(&agent_path, agent_toml).map_err(|e| fail("writing agent.toml", &e))?;
    let agent_config = config::load_agent(&agent_path).map_err(|e| fail("agent.toml", &e))?;
    tokio::spawn(async move {
        if let Err(e) =
            relay_core::agent::run(&agent_config, &agent_key, std::future::pending()).await
        {
            eprintln!("demo agent failed: {e}");
        }
    });

    println!("sentry demo: a sentry, an agent and a sample validator on loopback");
    println!("  configs and throwaway keys: {}", dir.path().display());
    println!(
        "  sample validator: P2P echo on {p2p}, JSON-RPC on {rpc} (reachable only through the tunnel in a real deployment)"
    );
    println!();
    let checks = self_check(&handle, &sentry_key).await;
    let mut passed = 0;
    for check in &checks {
        match &check.result {
            Ok(detail) => {
                passed += 1;
                println!("  ok    {}: {detail}", check.name);
            }
            Err(detail) => println!("  FAIL  {}: {detail}", check.name),
        }
    }
    println!("\n{passed} of {} checks passed.", checks.len());
    if once {
        return if passed == checks.len() {
            Ok(())
        } else {
            Err(Failure::Runtime(format!(
                "{} demo check(s) failed",
                checks.len() - passed
            )))
        };
    }
    let route = |name| {
        handle
            .route_addr(name)
            .map_or_else(String::new, |a| a.to_string())
    };
    let rpc_addr = route("rpc");
    println!(
        "\nWhat to try while this runs (Ctrl-C to stop):\n\
         \x20 curl -s http://{rpc_addr}/api/v3 -d '{{\"jsonrpc\":\"2.0\",\"method\":\"icx_getLastBlock\",\"id\":1}}'\n\
         \x20 nc {} {}      # type a line: the validator's P2P echo answers through the tunnel\n\
         \x20 nc {} {}      # the \"admin\" route: the agent exports no such service, so it closes at once\n\
         \x20 cat {}        # the configs the demo runs; `sentry check --config` validates them\n\
         Deploy for real: README.md, \"Deploying\".",
        handle
            .route_addr("p2p")
            .map_or_else(String::new, |a| a.ip().to_string()),
        handle.route_addr("p2p").map_or(0, |a| a.port()),
        handle
            .route_addr("admin")
            .map_or_else(String::new, |a| a.ip().to_string()),
        handle.route_addr("admin").map_or(0, |a| a.port()),
        sentry_path.display(),
    );
    let _ = tokio::signal::ctrl_c().await;
    Ok(())
}

fn new_key(path: &Path) -> Result<PrivateKey, Failure> {
    let key = PrivateKey::generate().map_err(|e| Failure::Runtime(e.to_string()))?;
    keys::write_private_key(path, &key).map_err(|e| Failure::Runtime(e.to_string()))?;
    Ok(key)
}

async fn self_check(handle: &SentryHandle, sentry_key: &PrivateKey) -> Vec<Check> {
    let route = |name: &str| {
        handle
            .route_addr(name)
            .ok_or_else(|| format!("no route {name}"))
    };
    let mut checks = Vec::new();
    let up = tokio::time::timeout(
        Duration::from_secs(10),
        handle.wait_agent("validator-1", true),
    )
    .await;
    checks.push(Check {
        name: "tunnel",
        result: up
            .map(|()| "agent validator-1 connected over QUIC, both keys pinned".into())
            .map_err(|_| "agent did not connect within 10 s".into()),
    });
    let p2p = match route("p2p") {
        Ok(addr) => echo_line(addr).await,
        Err(e) => Err(e),
    };
    checks.push(Check {
        name: "p2p relay",
        result: p2p,
    });
    let bulk = match route("p2p") {
        Ok(addr) => bulk_echo(addr).await,
        Err(e) => Err(e),
    };
    checks.push(Check {
        name: "bulk transfer",
        result: bulk,
    });
    let rpc = match route("rpc") {
        Ok(addr) => rpc_call(addr).await,
        Err(e) => Err(e),
    };
    checks.push(Check {
        name: "json-rpc relay",
        result: rpc,
    });
    let admin = match route("admin") {
        Ok(addr) => closed_at_once(addr).await,
        Err(e) => Err(e),
    };
    checks.push(Check {
        name: "unexported service",
        result: admin,
    });
    checks.push(Check {
        name: "unpinned agent",
        result: rogue_agent(handle.quic_addr().expect("quic_listen is set"), sentry_key).await,
    });
    checks
}

async fn echo_line(addr: SocketAddr) -> Result<String, String> {
    let io = |e: std::io::Error| e.to_string();
    let mut tcp = TcpStream::connect(addr).await.map_err(io)?;
    tcp.write_all(b"hello, validator\n").await.map_err(io)?;
    let mut buf = [0u8; 17];
    tokio::time::timeout(Duration::from_secs(5), tcp.read_exact(&mut buf))
        .await
        .map_err(|_| "no echo within 5 s".to_string())?
        .map_err(io)?;
    if &buf == b"hello, validator\n" {
        Ok(format!("{addr} -> tunnel -> validator P2P echo answered"))
    } else {
        Err(format!("echo answered {:?}", String::from_utf8_lossy(&buf)))
    }
}

async fn bulk_echo(addr: SocketAddr) -> Result<String, String> {
    let io = |e: std::io::Error| e.to_string();
    let tcp = TcpStream::connect(addr).await.map_err(io)?;
    let (mut read, mut write) = tcp.into_split();
    let started = relay_core::clock::now();
    let writer = tokio::spawn(async move {
        let mut sha = ring::digest::Context::new(&ring::digest::SHA256);
        let mut block = vec![0u8; 64 * 1024];
        for i in 0..BULK_BYTES / block.len() {
            block
                .iter_mut()
                .enumerate()
                .for_each(|(j, b)| *b = (i * 31 + j) as u8);
            sha.update(&block);
            write.write_all(&block).await?;
        }
        write.shutdown().await?;
        Ok::<_, std::io::Error>(sha.finish())
    });
    let mut sha = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0;
    loop {
        let n = tokio::time::timeout(Duration::from_secs(10), read.read(&mut buf))
            .await
            .map_err(|_| "stalled for 10 s".to_string())?
            .map_err(io)?;
        if n == 0 {
            break;
        }
        sha.update(&buf[..n]);
        total += n;
    }
    let sent = writer.await.map_err(|e| e.to_string())?.map_err(io)?;
    let secs = started.elapsed().as_secs_f64();
    if total == BULK_BYTES && sent.as_ref() == sha.finish().as_ref() {
        Ok(format!(
            "{} MiB each way, SHA-256 matches, {:.2} Gbit/s each way (debug builds are slower)",
            BULK_BYTES >> 20,
            (BULK_BYTES * 8) as f64 / secs / 1e9
        ))
    } else {
        Err(format!(
            "received {total} of {BULK_BYTES} bytes or the hash differs"
        ))
    }
}

async fn rpc_call(addr: SocketAddr) -> Result<String, String> {
    let io = |e: std::io::Error| e.to_string();
    let body = r#"{"jsonrpc":"2.0","method":"icx_getLastBlock","id":1}"#;
    let request = format!(
        "POST /api/v3 HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut tcp = TcpStream::connect(addr).await.map_err(io)?;
    tcp.write_all(request.as_bytes()).await.map_err(io)?;
    let mut response = String::new();
    tokio::time::timeout(Duration::from_secs(5), tcp.read_to_string(&mut response))
        .await
        .map_err(|_| "no answer within 5 s".to_string())?
        .map_err(io)?;
    if response.starts_with("HTTP/1.1 200") && response.contains("\"result\"") {
        Ok("POST /api/v3 icx_getLastBlock answered 200 by the validator's JSON-RPC".into())
    } else {
        Err(format!(
            "unexpected answer: {:?}",
            response.lines().next().unwrap_or("")
        ))
    }
}

async fn closed_at_once(addr: SocketAddr) -> Result<String, String> {
    let started = relay_core::clock::now();
    let mut tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let _ = tcp.write_all(b"anything").await;
    let mut buf = [0u8; 16];
    match tokio::time::timeout(Duration::from_secs(3), tcp.read(&mut buf)).await {
        Ok(Ok(0) | Err(_)) => Ok(format!(
            "route \"admin\" closed in {} ms: the agent alone decides what is reachable",
            started.elapsed().as_millis()
        )),
        Ok(Ok(n)) => Err(format!(
            "received {n} bytes from a service the agent does not export"
        )),
        Err(_) => Err("the connection hung instead of closing".into()),
    }
}

async fn rogue_agent(sentry: SocketAddr, sentry_key: &PrivateKey) -> Result<String, String> {
    let rogue = PrivateKey::generate().map_err(|e| e.to_string())?;
    let peer = SentryPeer {
        address: sentry.to_string(),
        public_key: sentry_key.public_key(),
        transport: TransportKind::Quic,
        wireguard: None,
    };
    let client = quic::client_config(&rogue, peer.public_key, &quic::Tuning::default())
        .map_err(|e| e.to_string())?;
    match relay_core::agent::dial(&peer, &client, &rogue).await {
        Err(e) => Ok(format!(
            "a key not listed in [[agent]] was refused during the handshake ({e})"
        )),
        Ok((_endpoint, conn)) => {
            // With TLS 1.3 the client may finish before the server rejects its certificate.
            match tokio::time::timeout(Duration::from_secs(5), conn.accept_bi()).await {
                Ok(Err(e)) => Ok(format!(
                    "a key not listed in [[agent]] was refused during the handshake ({e})"
                )),
                _ => Err("the sentry accepted an agent whose key is not listed".into()),
            }
        }
    }
}

/// The sample validator's P2P stand-in: echoes every byte back.
async fn sample_echo() -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut read, mut write) = tcp.split();
                let _ = tokio::io::copy(&mut read, &mut write).await;
                let _ = write.shutdown().await;
            });
        }
    });
    Ok(addr)
}

/// The sample validator's JSON-RPC stand-in: answers any POST with a fixed block.
async fn sample_rpc() -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buf = [0u8; 4096];
                // Read the head and the body it announces, up to 64 KiB.
                while request.len() < 64 * 1024 {
                    match tcp.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                    if request_complete(&request) {
                        break;
                    }
                }
                let body =
                    r#"{"jsonrpc":"2.0","id":1,"result":{"height":1000000,"block_hash":"0xdemo"}}"#;
                let response = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = tcp.write_all(response.as_bytes()).await;
                let _ = tcp.shutdown().await;
            });
        }
    });
    Ok(addr)
}

fn request_complete(request: &[u8]) -> bool {
    let text = String::from_utf8_lossy(request);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return false;
    };
    let length = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse::<usize>().unwrap_or(0))
        })
        .unwrap_or(0);
    body.len() >= length
}

//! JSON-RPC requests per second and latency over 64 keep-alive connections, in the same run,
//! through three paths: direct to the node, through a `protocol = "tcp"` route (bytes relayed
//! untouched through sentry + agent), and through a `protocol = "jsonrpc"` route with the
//! ICON preset (every request parsed and filtered, relayed over pooled tunnel streams).
//! Repetitions are interleaved; medians with min–max, ratios against the tcp route, and the
//! jsonrpc/tcp ratio within each rep (the two routes measured back to back).
//!
//! Reproduce: `cargo bench -p benches --bench jsonrpc`
//! (`BENCH_SECONDS` per measurement, default 5; `BENCH_REPS`, default 5; `BENCH_CONNECTIONS`,
//! default 64; `BENCH_ONLY=jsonrpc` runs only that path, for `perf record`).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use benches::{Export, runtime, summary};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use relay_core::clock;
use tokio::net::{TcpListener, TcpStream};

/// The call every request makes (ICON's most common read).
const CALL: &str = r#"{"jsonrpc":"2.0","id":1,"method":"icx_getLastBlock"}"#;
/// What the node answers: a small block-sized JSON result.
const RESULT: &str = r#"{"jsonrpc":"2.0","id":1,"result":{"height":"0x3b9aca00","hash":"0x6a9e2f8f3f2b7c1e0d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4","timestamp":"0x5f5e100"}}"#;

fn read(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let seconds = read("BENCH_SECONDS", 5);
    let reps = usize::try_from(read("BENCH_REPS", 5)).unwrap_or(5);
    let connections = usize::try_from(read("BENCH_CONNECTIONS", 64)).unwrap_or(64);
    let duration = Duration::from_secs(seconds.max(1));
    // `BENCH_ONLY=jsonrpc` measures only the paths whose name contains it (for profiling).
    let only = std::env::var("BENCH_ONLY").ok();
    runtime().block_on(async move {
        let node = node().await;
        let (tcp_route, jsonrpc_route) = deployment(node).await;
        let paths = [
            ("direct to the node", node),
            ("tcp route", tcp_route),
            ("jsonrpc route (icon)", jsonrpc_route),
        ];
        let mut rps = vec![Vec::new(); paths.len()];
        let mut p50 = vec![Vec::new(); paths.len()];
        let mut p99 = vec![Vec::new(); paths.len()];
        for rep in 0..reps {
            for (i, (name, addr)) in paths.iter().enumerate() {
                if only.as_deref().is_some_and(|o| !name.contains(o)) {
                    continue;
                }
                let run = load(*addr, connections, duration).await;
                eprintln!(
                    "rep {}/{reps} {name}: {:.0} req/s, p50 {:.3} ms, p99 {:.3} ms ({} errors)",
                    rep + 1,
                    run.rps,
                    run.p50_ms,
                    run.p99_ms,
                    run.errors
                );
                rps[i].push(run.rps);
                p50[i].push(run.p50_ms);
                p99[i].push(run.p99_ms);
            }
        }
        println!(
            "\nJSON-RPC over {connections} keep-alive connections, loopback, {seconds} s per \
             measurement, {reps} interleaved reps"
        );
        println!(
            "{:<22} {:>9} {:>17} {:>9} {:>9} {:>15}",
            "path", "req/s", "(min-max)", "p50 ms", "p99 ms", "req/s vs tcp"
        );
        let tcp = summary(&rps[1]).0;
        for (i, (name, _)) in paths.iter().enumerate() {
            if rps[i].is_empty() {
                continue;
            }
            let (r, rmin, rmax) = summary(&rps[i]);
            println!(
                "{name:<22} {r:>9.0} {:>17} {:>9.3} {:>9.3} {:>14.2}x",
                format!("({rmin:.0}-{rmax:.0})"),
                summary(&p50[i]).0,
                summary(&p99[i]).0,
                r / tcp
            );
        }
        // Each rep measures the routes back to back, so the ratio within a rep shares that
        // moment's machine: steadier than the ratio of two medians.
        if rps[1].len() == rps[2].len() && !rps[1].is_empty() {
            let paired: Vec<f64> = rps[2].iter().zip(&rps[1]).map(|(j, t)| j / t).collect();
            let (median, min, max) = summary(&paired);
            println!(
                "jsonrpc route / tcp route within each rep: median {median:.2}x ({min:.2}-{max:.2})"
            );
        }
    });
}

/// A stand-in node: answers every request with [`RESULT`], HTTP/1.1 keep-alive.
async fn node() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let _ = tcp.set_nodelay(true);
            tokio::spawn(async move {
                let service = service_fn(|request: Request<hyper::body::Incoming>| async move {
                    let _ = request.into_body().collect().await;
                    Ok::<_, Infallible>(
                        Response::builder()
                            .header("content-type", "application/json")
                            .body(Full::new(Bytes::from_static(RESULT.as_bytes())))
                            .expect("response"),
                    )
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    addr
}

/// A sentry with a tcp route and a jsonrpc route (icon preset) to one agent exporting the node.
async fn deployment(node: SocketAddr) -> (SocketAddr, SocketAddr) {
    let handle = benches::deployment(
        "quic",
        &[
            Export {
                name: "tcp",
                target: node,
                udp: false,
                route_extra: "",
            },
            Export {
                name: "jsonrpc",
                target: node,
                udp: false,
                route_extra: "protocol = \"jsonrpc\"\n\
                              [route.jsonrpc]\npreset = \"icon\"\nrate_per_ip = \"1000000/s\"\n",
            },
        ],
    )
    .await;
    (
        handle.route_addr("tcp").expect("route"),
        handle.route_addr("jsonrpc").expect("route"),
    )
}

struct Run {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: usize,
}

/// `connections` keep-alive clients, each sending one request at a time for `duration`.
async fn load(addr: SocketAddr, connections: usize, duration: Duration) -> Run {
    let start = clock::now();
    let deadline = start + duration;
    let mut tasks = Vec::with_capacity(connections);
    for _ in 0..connections {
        tasks.push(tokio::spawn(async move {
            let mut latencies: Vec<u32> = Vec::new();
            let mut errors = 0usize;
            let Ok(tcp) = TcpStream::connect(addr).await else {
                return (latencies, 1);
            };
            let _ = tcp.set_nodelay(true);
            let Ok((mut sender, connection)) =
                hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(tcp)).await
            else {
                return (latencies, 1);
            };
            tokio::spawn(connection);
            // Bounded by the deadline: the loop stops by itself.
            while clock::now() < deadline {
                let request = Request::post("/api/v3")
                    .header("host", "bench")
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from_static(CALL.as_bytes())))
                    .expect("request");
                let sent = clock::now();
                let ok = async {
                    sender.ready().await.ok()?;
                    let response = sender.send_request(request).await.ok()?;
                    let ok = response.status().is_success();
                    response.into_body().collect().await.ok()?;
                    Some(ok)
                }
                .await;
                if ok == Some(true) {
                    let micros = sent.elapsed().as_micros();
                    latencies.push(u32::try_from(micros).unwrap_or(u32::MAX));
                } else {
                    errors += 1;
                    if ok.is_none() {
                        break;
                    }
                }
            }
            (latencies, errors)
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    for task in tasks {
        if let Ok((latencies, e)) = task.await {
            all.extend(latencies);
            errors += e;
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    all.sort_unstable();
    let at = |q: f64| -> f64 {
        if all.is_empty() {
            return 0.0;
        }
        let index = ((all.len() as f64 - 1.0) * q).round() as usize;
        f64::from(all[index.min(all.len() - 1)]) / 1000.0
    };
    Run {
        rps: all.len() as f64 / elapsed,
        p50_ms: at(0.50),
        p99_ms: at(0.99),
        errors,
    }
}

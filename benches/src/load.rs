//! The load generator's scenarios, against any TCP address: bulk transfer over one or several
//! streams, request/response over keep-alive connections (HDR histogram of latencies),
//! connection churn (a new connection per request: connections per second and time to first
//! byte), and idle connections held open. Every loop is bounded by a count or a deadline and
//! stops by itself.
//!
//! The targets are the services of [`crate::sink`], [`crate::source`] and [`echo`], directly
//! or through a relay.

use std::net::SocketAddr;
use std::time::Duration;

use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Latencies are recorded in microseconds, up to a minute, to 3 significant digits.
fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds")
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

/// An echo service on loopback: every byte back, half-close passed on.
pub async fn echo() -> SocketAddr {
    echo_on(crate::LOOPBACK).await
}

/// [`echo`], listening on `bind`.
pub async fn echo_on(bind: SocketAddr) -> SocketAddr {
    crate::serve(bind, |mut tcp| async move {
        let _ = tcp.set_nodelay(true);
        let (mut r, mut w) = tcp.split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
        let _ = w.shutdown().await;
    })
    .await
}

/// Bulk upload of `bytes` split over `streams` connections to a sink; the time until every
/// sink confirmed the end.
///
/// # Errors
/// A connection failed.
pub async fn upload(addr: SocketAddr, bytes: usize, streams: usize) -> std::io::Result<Duration> {
    let started = relay_core::clock::now();
    let each = bytes / streams.max(1);
    let mut tasks = Vec::new();
    for _ in 0..streams.max(1) {
        tasks.push(tokio::spawn(crate::upload(addr, each)));
    }
    for task in tasks {
        task.await.map_err(std::io::Error::other)??;
    }
    Ok(relay_core::clock::now().duration_since(started))
}

/// Bulk download over `streams` connections to a source; the time and the bytes received.
///
/// # Errors
/// A connection failed.
pub async fn download(addr: SocketAddr, streams: usize) -> std::io::Result<(Duration, usize)> {
    let started = relay_core::clock::now();
    let mut tasks = Vec::new();
    for _ in 0..streams.max(1) {
        tasks.push(tokio::spawn(crate::download(addr)));
    }
    let mut total = 0;
    for task in tasks {
        total += task.await.map_err(std::io::Error::other)??.1;
    }
    Ok((relay_core::clock::now().duration_since(started), total))
}

/// What a request/response run measured.
#[derive(Debug, Clone)]
pub struct RequestResponse {
    pub requests: u64,
    pub per_second: f64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub failed: u64,
}

/// `conns` keep-alive connections to an echo, each sending `size` bytes and waiting for them
/// back, again and again, for `run`.
pub async fn request_response(
    addr: SocketAddr,
    conns: usize,
    size: usize,
    run: Duration,
) -> RequestResponse {
    let started = relay_core::clock::now();
    let deadline = tokio::time::Instant::from_std(started + run);
    let mut tasks = Vec::new();
    for _ in 0..conns {
        tasks.push(tokio::spawn(async move {
            let mut latencies = histogram();
            let mut failed = 0u64;
            let request = vec![0x5a_u8; size];
            let mut reply = vec![0u8; size];
            let Ok(mut tcp) = TcpStream::connect(addr).await else {
                return (latencies, 1);
            };
            let _ = tcp.set_nodelay(true);
            while tokio::time::Instant::from_std(relay_core::clock::now()) < deadline {
                let sent = relay_core::clock::now();
                let exchange = async {
                    tcp.write_all(&request).await?;
                    tcp.read_exact(&mut reply).await
                };
                match tokio::time::timeout_at(deadline + Duration::from_secs(5), exchange).await {
                    Ok(Ok(_)) => {
                        let _ =
                            latencies.record(micros(relay_core::clock::now().duration_since(sent)));
                    }
                    _ => {
                        failed += 1;
                        break;
                    }
                }
            }
            (latencies, failed)
        }));
    }
    let mut all = histogram();
    let mut failed = 0;
    for task in tasks {
        if let Ok((latencies, f)) = task.await {
            let _ = all.add(&latencies);
            failed += f;
        }
    }
    let took = relay_core::clock::now()
        .duration_since(started)
        .as_secs_f64();
    RequestResponse {
        requests: all.len(),
        per_second: all.len() as f64 / took,
        p50_us: all.value_at_quantile(0.5),
        p99_us: all.value_at_quantile(0.99),
        p999_us: all.value_at_quantile(0.999),
        failed,
    }
}

/// What a churn run measured.
#[derive(Debug, Clone)]
pub struct Churn {
    pub connections: u64,
    pub per_second: f64,
    pub ttfb_p50_us: u64,
    pub ttfb_p99_us: u64,
    pub failed: u64,
}

/// `workers` loops, each opening a new connection to an echo, sending `size` bytes, reading
/// them back and closing, for `run`. Time to first byte counts from the start of the connect.
pub async fn churn(addr: SocketAddr, workers: usize, size: usize, run: Duration) -> Churn {
    let started = relay_core::clock::now();
    let deadline = tokio::time::Instant::from_std(started + run);
    let mut tasks = Vec::new();
    for _ in 0..workers {
        tasks.push(tokio::spawn(async move {
            let mut ttfb = histogram();
            let mut failed = 0u64;
            let request = vec![0x5a_u8; size.max(1)];
            let mut reply = vec![0u8; size.max(1)];
            while tokio::time::Instant::from_std(relay_core::clock::now()) < deadline {
                let begun = relay_core::clock::now();
                let one = async {
                    let mut tcp = TcpStream::connect(addr).await?;
                    let _ = tcp.set_nodelay(true);
                    tcp.write_all(&request).await?;
                    tcp.read_exact(&mut reply[..1]).await?;
                    let first = relay_core::clock::now().duration_since(begun);
                    tcp.read_exact(&mut reply[1..]).await?;
                    Ok::<_, std::io::Error>(first)
                };
                match tokio::time::timeout(Duration::from_secs(5), one).await {
                    Ok(Ok(first)) => {
                        let _ = ttfb.record(micros(first));
                    }
                    _ => {
                        failed += 1;
                        // A refused or failed connection: pause, so a failing path does not spin.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
            (ttfb, failed)
        }));
    }
    let mut all = histogram();
    let mut failed = 0;
    for task in tasks {
        if let Ok((ttfb, f)) = task.await {
            let _ = all.add(&ttfb);
            failed += f;
        }
    }
    let took = relay_core::clock::now()
        .duration_since(started)
        .as_secs_f64();
    Churn {
        connections: all.len(),
        per_second: all.len() as f64 / took,
        ttfb_p50_us: all.value_at_quantile(0.5),
        ttfb_p99_us: all.value_at_quantile(0.99),
        failed,
    }
}

/// Open `conns` connections to an echo and prove each relays (one byte each way); they stay
/// open while the returned vector lives.
///
/// # Errors
/// A connection failed.
pub async fn hold_idle(addr: SocketAddr, conns: usize) -> std::io::Result<Vec<TcpStream>> {
    let mut held = Vec::with_capacity(conns);
    for _ in 0..conns {
        let mut tcp = TcpStream::connect(addr).await?;
        tcp.write_all(b"x").await?;
        let mut byte = [0u8; 1];
        tcp.read_exact(&mut byte).await?;
        held.push(tcp);
    }
    Ok(held)
}

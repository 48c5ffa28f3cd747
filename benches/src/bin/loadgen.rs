//! `loadgen`: drive one TCP address with one scenario and print the result as one JSON line.
//!
//! ```text
//! loadgen serve [--bytes N]                      echo, sink and source on loopback
//! loadgen rr    --target ADDR [--conns 64] [--size 64] [--seconds 10]
//! loadgen churn --target ADDR [--workers 16] [--size 64] [--seconds 10]
//! loadgen up    --target ADDR [--bytes N] [--streams 1]
//! loadgen down  --target ADDR [--streams 1]
//! loadgen idle  --target ADDR [--conns 10000] [--seconds 10]
//! ```
//!
//! `rr` and `churn` need an echo behind the target, `up` a sink, `down` a source (as `serve`
//! starts them). Every run is bounded by its count or its seconds.

use std::net::SocketAddr;
use std::time::Duration;

use benches::load;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Load generator of the sentry benchmark suite")]
struct Args {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// Serve an echo, a sink and a source (writing `bytes` per connection) on loopback until
    /// interrupted; prints their addresses.
    Serve {
        #[arg(long, default_value_t = 1 << 30)]
        bytes: usize,
    },
    /// Request/response over keep-alive connections to an echo.
    Rr {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long, default_value_t = 64)]
        conns: usize,
        #[arg(long, default_value_t = 64)]
        size: usize,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
    /// A new connection per request to an echo.
    Churn {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long, default_value_t = 16)]
        workers: usize,
        #[arg(long, default_value_t = 64)]
        size: usize,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
    /// Bulk upload to a sink.
    Up {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long, default_value_t = 1 << 30)]
        bytes: usize,
        #[arg(long, default_value_t = 1)]
        streams: usize,
    },
    /// Bulk download from a source.
    Down {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long, default_value_t = 1)]
        streams: usize,
    },
    /// Hold idle connections to an echo open.
    Idle {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long, default_value_t = 10_000)]
        conns: usize,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
}

fn main() {
    let args = Args::parse();
    benches::runtime().block_on(async move {
        match args.scenario {
            Scenario::Serve { bytes } => {
                let (echo, sink, source) =
                    (load::echo().await, benches::sink().await, benches::source(bytes).await);
                println!("{{\"echo\":\"{echo}\",\"sink\":\"{sink}\",\"source\":\"{source}\"}}");
                let _ = tokio::signal::ctrl_c().await;
            }
            Scenario::Rr {
                target,
                conns,
                size,
                seconds,
            } => {
                let r = load::request_response(target, conns, size, Duration::from_secs(seconds))
                    .await;
                println!(
                    "{{\"scenario\":\"rr\",\"conns\":{conns},\"requests\":{},\"per_second\":{:.0},\
                     \"p50_us\":{},\"p99_us\":{},\"p999_us\":{},\"failed\":{}}}",
                    r.requests, r.per_second, r.p50_us, r.p99_us, r.p999_us, r.failed
                );
            }
            Scenario::Churn {
                target,
                workers,
                size,
                seconds,
            } => {
                let c = load::churn(target, workers, size, Duration::from_secs(seconds)).await;
                println!(
                    "{{\"scenario\":\"churn\",\"workers\":{workers},\"connections\":{},\
                     \"per_second\":{:.0},\"ttfb_p50_us\":{},\"ttfb_p99_us\":{},\"failed\":{}}}",
                    c.connections, c.per_second, c.ttfb_p50_us, c.ttfb_p99_us, c.failed
                );
            }
            Scenario::Up {
                target,
                bytes,
                streams,
            } => {
                let took = load::upload(target, bytes, streams).await.expect("upload");
                println!(
                    "{{\"scenario\":\"up\",\"streams\":{streams},\"bytes\":{bytes},\"gbit_s\":{:.3}}}",
                    benches::gbits(bytes, took)
                );
            }
            Scenario::Down { target, streams } => {
                let (took, bytes) = load::download(target, streams).await.expect("download");
                println!(
                    "{{\"scenario\":\"down\",\"streams\":{streams},\"bytes\":{bytes},\"gbit_s\":{:.3}}}",
                    benches::gbits(bytes, took)
                );
            }
            Scenario::Idle {
                target,
                conns,
                seconds,
            } => {
                let held = load::hold_idle(target, conns).await.expect("idle connections");
                println!("{{\"scenario\":\"idle\",\"conns\":{}}}", held.len());
                tokio::time::sleep(Duration::from_secs(seconds)).await;
            }
        }
    });
}

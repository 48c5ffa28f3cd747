//! Clients that stop reading, and what they cost everyone else: the release binaries on
//! loopback over QUIC, WireGuard and TCP+TLS; 64 clients from 8 addresses (127.0.0.2-9) ask
//! for far more than any buffer holds (a tcp route to a service that never stops sending, a
//! JSON-RPC call with a 48 MiB answer, a UDP request answered with 4000 datagrams) and never
//! read them. One unrelated client does small echo round trips through the same
//! tunnel, on a connection opened before the attack and on new ones. Printed per transport
//! and attack: its round trips before and during the attack (median, p99, max), both
//! daemons' memory at the end and at their peak, and their CPU use during the attack.
//!
//! Reproduce: `cargo build --release -p sentry && cargo bench -p benches --bench stall`
//! (`BENCH_SECONDS` of probing under attack per run, default 5; `BENCH_ONLY=quic` keeps the
//! transports whose name contains it).

use std::time::Duration;

use benches::read_env;
use tests::stall::{self, Attack, Transport};

fn main() {
    let seconds = read_env("BENCH_SECONDS", 5);
    let only = std::env::var("BENCH_ONLY").ok();
    println!(
        "\nAn unrelated client's echo round trips while 64 clients from 8 addresses stall, \
         {seconds} s per run (ms: median / p99 / max)"
    );
    println!(
        "{:<10} {:<8} {:>22} {:>26} {:>26} {:>16} {:>16} {:>11}",
        "transport",
        "attack",
        "before",
        "during, kept connection",
        "during, new connections",
        "RSS MiB s / a",
        "peak MiB s / a",
        "CPU s / a"
    );
    for transport in Transport::ALL {
        if only
            .as_deref()
            .is_some_and(|o| !transport.as_str().contains(o))
        {
            continue;
        }
        for attack in Attack::ALL {
            let r = stall::run(
                transport,
                attack,
                64,
                8,
                Duration::from_secs(seconds as u64),
            );
            println!(
                "{:<10} {:<8} {:>22} {:>26} {:>26} {:>16} {:>16} {:>11}{}",
                transport.as_str(),
                attack.as_str(),
                spread(&r.before),
                spread(&r.during),
                spread(&r.fresh),
                format!("{} / {}", r.rss.0 >> 20, r.rss.1 >> 20),
                format!("{} / {}", r.peak_rss.0 >> 20, r.peak_rss.1 >> 20),
                format!("{:.2} / {:.2}", r.cpu.0, r.cpu.1),
                if r.failed > 0 || r.tunnels_up != 1 {
                    format!(
                        "  ({} round trips failed, tunnel up {} times)",
                        r.failed, r.tunnels_up
                    )
                } else {
                    String::new()
                }
            );
        }
    }
}

/// "median / p99 / max" in milliseconds, or "-" without samples.
fn spread(samples: &[Duration]) -> String {
    if samples.is_empty() {
        return "-".to_owned();
    }
    let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    ms.sort_by(f64::total_cmp);
    let at = |q: f64| ms[((ms.len() - 1) as f64 * q).round() as usize];
    format!("{:.1} / {:.1} / {:.1}", at(0.5), at(0.99), at(1.0))
}

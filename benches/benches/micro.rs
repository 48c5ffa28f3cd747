//! Micro-benchmarks of the pure core, per call: the admission decision a new client
//! connection costs, the relay header each relayed connection carries, the JSON-RPC filter on
//! typical and worst-case bodies, and the PROXY header.
//!
//! `cargo bench -p benches --bench micro` (criterion; `BENCH_SECONDS` sets each benchmark's
//! measurement time, default 3 s: CI runs it at 1 s as a smoke test and asserts nothing).

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use relay_core::admission::{self, Counts, Gate, SentryCount};
use relay_core::cidr::{CidrSet, parse_cidr};
use relay_core::config::{Limits, units::parse_rate};
use relay_core::jsonrpc::{Policy, preset};
use relay_core::relay::{Header, Proxy, ProxyVersion, encode_proxy_header};

fn config() -> Criterion {
    let seconds: f64 = std::env::var("BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    Criterion::default()
        .measurement_time(Duration::from_secs_f64(seconds))
        .warm_up_time(Duration::from_secs_f64(seconds / 3.0))
        .sample_size(50)
}

/// Limits with a deny list of `n` networks (an operator's block list), none matching the
/// benchmark's clients.
fn limits(n: usize) -> Limits {
    let deny = (0..n).map(|i| {
        let i = u32::try_from(i).expect("a small list");
        let net = Ipv4Addr::from(0x0a00_0000 + (i << 8));
        parse_cidr(&format!("{net}/24")).expect("a valid net")
    });
    Limits {
        deny: CidrSet::new(deny),
        connect_rate_per_ip: parse_rate("1000000/s").expect("a valid rate"),
        max_connections_per_ip: 1 << 20,
        max_connections: 1 << 20,
        ..Limits::default()
    }
}

fn admission(c: &mut Criterion) {
    let mut group = c.benchmark_group("admission");
    for deny in [0, 1000] {
        let limits = limits(deny);
        let counts = Counts {
            route: 10,
            sentry: 10,
            client: 1,
        };
        let ip = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 7));
        group.bench_with_input(BenchmarkId::new("check", deny), &limits, |b, l| {
            b.iter(|| admission::check(black_box(l), 4096, black_box(ip), counts));
        });
        // The full gate: lists, caps, the per-client rate (governor) and the permit's
        // bookkeeping, from 256 client addresses in turn.
        let gate = Gate::new(limits.clone(), SentryCount::new(1 << 20));
        let mut now = Duration::ZERO;
        let mut n = 0u32;
        group.bench_function(BenchmarkId::new("admit_and_release", deny), |b| {
            b.iter(|| {
                n = n.wrapping_add(1);
                now += Duration::from_micros(1);
                let ip = IpAddr::V4(Ipv4Addr::from(0xcb00_7100 | (n & 0xff)));
                let permit = gate.admit(now, ip);
                black_box(permit.is_ok())
            });
        });
    }
    group.finish();
}

fn relay_header(c: &mut Criterion) {
    let header = Header {
        route: "p2p".into(),
        service: "p2p".into(),
        client: SocketAddr::from(([203, 0, 113, 7], 51234)),
        proxy: Some(Proxy {
            version: ProxyVersion::V2,
            destination: SocketAddr::from(([203, 0, 113, 1], 7100)),
        }),
        udp: false,
    };
    let bytes = header.encode().expect("a valid header");
    let mut group = c.benchmark_group("relay_header");
    group.bench_function("encode", |b| b.iter(|| black_box(&header).encode()));
    group.bench_function("decode", |b| b.iter(|| Header::decode(black_box(&bytes))));
    group.finish();
}

fn proxy_header(c: &mut Criterion) {
    let source = SocketAddr::from(([203, 0, 113, 7], 51234));
    let destination = SocketAddr::from(([203, 0, 113, 1], 7100));
    let mut group = c.benchmark_group("proxy_header");
    for version in [ProxyVersion::V1, ProxyVersion::V2] {
        group.bench_function(format!("{version:?}"), |b| {
            b.iter(|| encode_proxy_header(version, black_box(source), black_box(destination)));
        });
    }
    group.finish();
}

fn jsonrpc_filter(c: &mut Criterion) {
    let max_body = 1 << 20;
    let icon = Policy::new(&preset::ICON, &[], &[], &[], max_body, None);
    let ethereum = Policy::new(&preset::ETHEREUM, &[], &[], &[], max_body, Some(100));

    let single = br#"{"jsonrpc":"2.0","method":"icx_getBalance","id":1,"params":{"address":"hx0000000000000000000000000000000000000000"}}"#.to_vec();
    let batch = {
        let calls: Vec<String> = (0..10)
            .map(|i| {
                let method = if i % 3 == 0 { "debug_traceTransaction" } else { "eth_call" };
                format!(
                    r#"{{"jsonrpc":"2.0","method":"{method}","id":{i},"params":[{{"to":"0x0000000000000000000000000000000000000000","data":"0x70a08231"}},"latest"]}}"#
                )
            })
            .collect();
        format!("[{}]", calls.join(",")).into_bytes()
    };
    // Worst cases within max_body: deep nesting (refused at the depth cap), one huge string
    // parameter, and a batch of 100 denied calls.
    let deep = {
        let depth = 100_000;
        let mut body = br#"{"jsonrpc":"2.0","method":"eth_call","id":1,"params":"#.to_vec();
        body.extend(std::iter::repeat_n(b'[', depth));
        body.extend(std::iter::repeat_n(b']', depth));
        body.push(b'}');
        body
    };
    let huge = {
        let mut body =
            br#"{"jsonrpc":"2.0","method":"eth_sendRawTransaction","id":1,"params":[""#.to_vec();
        body.extend(std::iter::repeat_n(b'a', max_body - 200));
        body.extend(br#""]}"#);
        body
    };
    let denied = {
        let calls: Vec<String> = (0..100)
            .map(|i| format!(r#"{{"jsonrpc":"2.0","method":"admin_addPeer","id":{i},"params":["enode://x"]}}"#))
            .collect();
        format!("[{}]", calls.join(",")).into_bytes()
    };

    let mut group = c.benchmark_group("jsonrpc_filter");
    group.bench_function("request_line", |b| {
        b.iter(|| icon.check_request("POST", black_box("/api/v3/icon_dex"), false, Some(120)));
    });
    group.bench_function("path_trick", |b| {
        b.iter(|| icon.check_request("POST", black_box("/api/v3/%2e%2e//admin/./x"), false, None));
    });
    for (name, policy, body) in [
        ("single_call", &icon, &single),
        ("batch_10_mixed", &ethereum, &batch),
        ("nested_100k", &ethereum, &deep),
        ("string_1mib", &ethereum, &huge),
        ("batch_100_denied", &ethereum, &denied),
    ] {
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_function(name, |b| b.iter(|| policy.check_body(black_box(body))));
    }
    group.finish();
}

criterion_group! {
    name = micro;
    config = config();
    targets = admission, relay_header, proxy_header, jsonrpc_filter
}
criterion_main!(micro);

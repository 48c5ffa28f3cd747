//! Why the QUIC transport is tuned as it is: one bulk stream over the real pinned-key QUIC
//! endpoints on loopback, with quinn's defaults, with only the socket buffers raised, with only
//! the windows raised, and with both (what the daemons use). Interleaved repetitions; medians
//! with min–max.
//!
//! Reproduce: `cargo bench -p benches --bench quic_tuning`
//! (`BENCH_BYTES` per transfer, default 1 GiB; `BENCH_REPS`, default 5).

use std::collections::HashMap;

use benches::{BLOCK, TRANSFER_LIMIT, gbits, runtime, settings, summary};
use relay_core::keys::PrivateKey;
use relay_core::transport::quic::{self, SOCKET_BUFFER, Tuning};

fn main() {
    let (bytes, reps) = settings();
    let variants = [
        ("quinn defaults", Tuning::untuned()),
        (
            "socket buffers only",
            Tuning {
                windows: None,
                ..Tuning::default()
            },
        ),
        (
            "windows only",
            Tuning {
                socket_buffer: None,
                ..Tuning::default()
            },
        ),
        ("tuned (the daemons)", Tuning::default()),
    ];
    println!("kernel buffer limits: {}", limits());
    runtime().block_on(async move {
        let mut samples = vec![Vec::new(); variants.len()];
        for rep in 0..reps {
            for (i, (name, tuning)) in variants.iter().enumerate() {
                let rate = transfer(bytes, tuning).await;
                samples[i].push(rate);
                eprintln!("rep {}/{reps} {name}: {rate:.2} Gbit/s", rep + 1);
            }
        }
        println!(
            "\nQUIC single stream, loopback, {} MiB per transfer, {reps} interleaved reps",
            bytes >> 20
        );
        println!("{:<22} {:>10} {:>15}", "variant", "Gbit/s", "(min-max)");
        for (i, (name, _)) in variants.iter().enumerate() {
            let (m, lo, hi) = summary(&samples[i]);
            println!("{name:<22} {m:>10.2} {:>15}", format!("({lo:.2}-{hi:.2})"));
        }
        println!("(socket buffer requested: {} KiB)", SOCKET_BUFFER >> 10);
    });
}

/// Send `bytes` over one stream from the server endpoint (the sentry, which opens every relayed
/// stream) to the client endpoint (the agent); Gbit/s until the client has read everything.
async fn transfer(bytes: usize, tuning: &Tuning) -> f64 {
    tokio::time::timeout(TRANSFER_LIMIT, transfer_inner(bytes, tuning))
        .await
        .unwrap_or_else(|_| panic!("transfer of {bytes} bytes took over {TRANSFER_LIMIT:?}"))
}

async fn transfer_inner(bytes: usize, tuning: &Tuning) -> f64 {
    let (server_key, client_key) = (
        PrivateKey::generate().expect("key"),
        PrivateKey::generate().expect("key"),
    );
    let pins = HashMap::from([(client_key.public_key(), "bench".to_owned())]);
    let server = quic::server_endpoint(
        "127.0.0.1:0".parse().expect("addr"),
        &server_key,
        pins,
        tuning,
    )
    .expect("server");
    let server_addr = server.local_addr().expect("addr");
    let client = quic::client_endpoint("127.0.0.1:0".parse().expect("addr"), &client_key, tuning)
        .expect("client");
    let config =
        quic::client_config(&client_key, server_key.public_key(), tuning).expect("client config");
    let reader = tokio::spawn(async move {
        let conn = client
            .connect_with(config, server_addr, "sentry")
            .expect("connect")
            .await
            .expect("handshake");
        let (mut send, mut recv) = conn.accept_bi().await.expect("stream");
        let mut total = 0usize;
        while let Some(chunk) = recv.read_chunk(usize::MAX, true).await.expect("read") {
            total += chunk.bytes.len();
        }
        send.write_all(&[1]).await.expect("ack");
        send.finish().expect("finish");
        let _ = send.stopped().await;
        conn.close(0u32.into(), b"done");
        client.wait_idle().await;
        total
    });
    let conn = server
        .accept()
        .await
        .expect("incoming")
        .await
        .expect("handshake");
    let block = vec![0x3cu8; BLOCK];
    let started = relay_core::clock::now();
    let (mut send, mut recv) = conn.open_bi().await.expect("stream");
    let mut left = bytes;
    while left > 0 {
        let n = left.min(BLOCK);
        send.write_all(&block[..n]).await.expect("write");
        left -= n;
    }
    send.finish().expect("finish");
    let mut ack = [0u8; 1];
    recv.read_exact(&mut ack).await.expect("ack");
    let elapsed = started.elapsed();
    assert_eq!(reader.await.expect("reader"), bytes);
    server.close(0u32.into(), b"done");
    gbits(bytes, elapsed)
}

fn limits() -> String {
    let read = |name: &str| {
        std::fs::read_to_string(format!("/proc/sys/net/core/{name}"))
            .map_or_else(|_| "?".into(), |v| v.trim().to_owned())
    };
    format!(
        "rmem_max={} wmem_max={}",
        read("rmem_max"),
        read("wmem_max")
    )
}

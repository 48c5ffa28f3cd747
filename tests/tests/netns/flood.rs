//! A connection flood from one address does not touch another client's round trips.

use super::*;

/// A second public client address, on the client host's interface beside [`CLIENT`].
const HONEST_CLIENT: std::net::Ipv4Addr = std::net::Ipv4Addr::new(203, 0, 113, 11);

/// `n` echo round trips, each on a new connection from `from` inside the client host, started
/// at most 14 a second (under the route's default 20/s per client, as an honest peer stays);
/// each must succeed. Their durations, sorted.
fn honest_round_trips(t: &Topology, from: std::net::Ipv4Addr, n: usize) -> Vec<Duration> {
    use socket2::{Domain, Socket, Type};
    t.enter(Host::Client, || {
        let mut took = Vec::with_capacity(n);
        let pace = Duration::from_millis(70);
        for i in 0..n {
            let started = Instant::now();
            let next = started + pace;
            let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
            socket.bind(&SocketAddr::from((from, 0)).into()).unwrap();
            socket
                .connect_timeout(&public(P2P_PORT).into(), Duration::from_secs(5))
                .unwrap_or_else(|e| panic!("honest connection {i}: {e}"));
            let mut tcp: TcpStream = socket.into();
            tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            assert!(
                echo_once(&mut tcp, b"ping").unwrap_or(false),
                "honest request {i} failed"
            );
            took.push(started.elapsed());
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
        }
        took.sort();
        took
    })
}

fn summary(took: &[Duration]) -> String {
    let at = |q: f64| {
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss
        )]
        let i = ((took.len() as f64 - 1.0) * q).round() as usize;
        took[i]
    };
    format!(
        "p50 {:.2?} p99 {:.2?} max {:.2?}",
        at(0.5),
        at(0.99),
        took[took.len() - 1]
    )
}

/// Issue 4's flood: thousands of connections from one client address, with the route's
/// default per-client limits, while a second address runs requests. Every one of the second
/// client's requests succeeds; its latency under the flood is printed beside its latency
/// without it (reported, never asserted).
#[test]
fn a_connection_flood_from_one_address_does_not_touch_another() {
    let Some(mut d) = deployment() else { return };
    // The route back to the defaults (16 open, 20/s per client) instead of the generous
    // limits the other scenarios need for their single client.
    let text = std::fs::read_to_string(&d.sentry_toml).unwrap();
    let text = text.replace(
        "max_connections_per_ip = 256\nconnect_rate_per_ip = \"1000/s\"\n",
        "",
    );
    assert!(!text.contains("max_connections_per_ip"));
    std::fs::write(&d.sentry_toml, text).unwrap();
    d.t.sh(
        Host::Client,
        &[
            "ip",
            "addr",
            "add",
            &format!("{HONEST_CLIENT}/24"),
            "dev",
            "eth0",
        ],
    );
    d.start();

    let quiet = honest_round_trips(&d.t, HONEST_CLIENT, 100);

    // The flood: 4 threads from CLIENT, each opening connections as fast as it can (each
    // holds up to 64 open), bounded by count and time.
    let stop_at = Instant::now() + Duration::from_secs(12);
    let ((opened, relayed), during) = std::thread::scope(|scope| {
        let flooders: Vec<_> = (0..4)
            .map(|_| {
                let t = &d.t;
                scope.spawn(move || {
                    t.enter(Host::Client, || {
                        let (mut opened, mut relayed) = (0u64, 0u64);
                        let mut held = std::collections::VecDeque::new();
                        while opened < 2000 && Instant::now() < stop_at {
                            let Ok(mut tcp) = TcpStream::connect_timeout(
                                &public(P2P_PORT),
                                Duration::from_secs(2),
                            ) else {
                                continue;
                            };
                            opened += 1;
                            tcp.set_read_timeout(Some(Duration::from_millis(200)))
                                .unwrap();
                            if echo_once(&mut tcp, b"x").unwrap_or(false) {
                                relayed += 1;
                            }
                            held.push_back(tcp);
                            if held.len() > 64 {
                                held.pop_front();
                            }
                        }
                        (opened, relayed)
                    })
                })
            })
            .collect();
        // Give the flood a moment to saturate the flooder's share first.
        std::thread::sleep(Duration::from_millis(500));
        let during = honest_round_trips(&d.t, HONEST_CLIENT, 100);
        let mut totals = (0u64, 0u64);
        for f in flooders {
            let (o, r) = f.join().unwrap();
            totals.0 += o;
            totals.1 += r;
        }
        (totals, during)
    });
    eprintln!(
        "connection flood from {CLIENT}: {opened} connections opened, {relayed} relayed \
         (the rest refused at the sentry by its per-client limits)"
    );
    eprintln!(
        "honest client {HONEST_CLIENT} without the flood: {}",
        summary(&quiet)
    );
    eprintln!(
        "honest client {HONEST_CLIENT} under the flood:   {}",
        summary(&during)
    );
    assert!(
        opened >= 1000,
        "the flood did not run: {opened} connections"
    );
    assert!(
        relayed < opened / 2,
        "the per-client limits did not act: {relayed} of {opened} relayed"
    );
    assert!(
        d.sentry()
            .count_log("connection refused by admission control")
            >= 1
    );
}

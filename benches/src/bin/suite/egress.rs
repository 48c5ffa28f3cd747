//! Egress: the node's outbound connections leaving from the sentry (the agent's `forward`
//! listeners, the sentry dialing the public host) against the node dialing the public host
//! directly, in the same run, repetitions interleaved.
//!
//! The dialer runs on the validator host and the services on the public (client) host; in the
//! topology, `direct` crosses the NAT router, and egress crosses the tunnel and leaves from
//! the sentry's address.

use super::*;
use crate::paths::Ends;
use crate::results::{cell, median};

/// One path's egress samples.
#[derive(Default, Clone)]
pub(super) struct EgressSamples {
    up1: Vec<f64>,
    down1: Vec<f64>,
    cps: Vec<f64>,
    ttfb99: Vec<f64>,
    failed: u64,
}

/// The egress measurements of one site.
pub(super) struct EgressSection {
    names: Vec<String>,
    samples: Vec<EgressSamples>,
}

/// Measure egress on `site`: direct, then the sentry over each transport.
pub(super) fn measure_egress(site: &Site, s: Settings) -> EgressSection {
    let dir = site.dir().join("egress");
    std::fs::create_dir_all(&dir).expect("temp dir");
    let dialer = site.runtime(Host::Validator);
    let public = site.runtime(Host::Client);
    let bytes = s.bytes;
    let ip = site.ip(Host::Client);
    let targets = run(&public, async move {
        let any = SocketAddr::new(ip, 0);
        Routes {
            echo: load::echo_on(any).await,
            sink: benches::serve(any, benches::sink_connection).await,
            source: benches::serve(any, move |tcp| benches::source_connection(tcp, bytes)).await,
        }
    });
    let mut names = vec!["direct".to_owned()];
    let mut routes = vec![targets];
    let mut daemons = Vec::new();
    for transport in ["quic", "wireguard", "tls"] {
        let (r, ends) = egress_path(site, &dir, transport, targets);
        names.push(format!("egress via sentry ({transport})"));
        routes.push(r);
        daemons.push(ends);
    }
    let mut samples = vec![EgressSamples::default(); names.len()];
    for rep in 0..s.reps {
        for (i, r) in routes.iter().enumerate() {
            let r = *r;
            let sample = &mut samples[i];
            let c = run(&dialer, load::churn(r.echo, s.workers, 64, s.seconds));
            sample.cps.push(c.per_second);
            sample.ttfb99.push(c.ttfb_p99_us as f64 / 1e3);
            sample.failed += c.failed;
            let name = names[i].clone();
            let (up1, down1) = run(&dialer, async move {
                let took = load::upload(r.sink, bytes, 1)
                    .await
                    .unwrap_or_else(|e| panic!("{name}: upload: {e}"));
                let (down, got) = load::download(r.source, 1)
                    .await
                    .unwrap_or_else(|e| panic!("{name}: download: {e}"));
                assert_eq!(got, bytes, "{name}: short download");
                (gbits(bytes, took), gbits(got, down))
            });
            sample.up1.push(up1);
            sample.down1.push(down1);
            eprintln!(
                "egress rep {}/{} {}: up {up1:.2} down {down1:.2} Gbit/s, {:.0} conn/s",
                rep + 1,
                s.reps,
                names[i],
                c.per_second
            );
        }
    }
    drop(daemons);
    EgressSection { names, samples }
}

/// The release sentry (egress allowed for its agent) and agent over `transport`, the agent
/// with a `forward` listener to each of `to`'s services. Returns the listeners.
fn egress_path(site: &Site, dir: &Path, transport: &str, to: Routes) -> (Routes, Vec<Daemon>) {
    let ends = Ends::new(site, dir, transport);
    let ip = site.ip(Host::Sentry);
    let (listener, agent_overlay) = (&ends.listener, ends.agent_overlay);
    // On loopback the public services are on 127.0.0.1, which only allow_private lets the
    // sentry dial; in the topology they are on the public segment.
    let private = match site {
        Site::Loopback => "allow_private = [\"127.0.0.0/8\"]\n",
        Site::Netns(_) => "",
    };
    let sentry = format!(
        "[sentry]\nprivate_key = \"{}\"\nquic_listen = \"{ip}:0\"\n{listener}\n\
         [[agent]]\nname = \"bench\"\npublic_key = \"{}\"\negress = true\n{agent_overlay}\n\
         [egress]\n{private}max_connections = 100000\nconnect_rate = \"1000000/s\"\n",
        ends.sentry_file.display(),
        ends.agent_key.public_key()
    );
    let sentry_path = dir.join(format!("{transport}-sentry.toml"));
    std::fs::write(&sentry_path, sentry).expect("write");
    let sentry = site.daemon(Host::Sentry, "serve", &sentry_path);
    let (dial, overlay) = Ends::dial(&sentry, transport);
    // One loopback address per listener, so the log tells them apart.
    let services = [
        ("127.0.0.1", to.echo),
        ("127.0.0.2", to.sink),
        ("127.0.0.3", to.source),
    ];
    let mut agent = format!(
        "[agent]\nname = \"bench\"\nprivate_key = \"{}\"\n\n\
         [[sentry]]\naddress = \"{dial}\"\npublic_key = \"{}\"\ntransport = \"{transport}\"\n{overlay}\n\
         [[service]]\nname = \"unused\"\ntarget = \"127.0.0.1:9\"\n",
        ends.agent_file.display(),
        ends.sentry_key.public_key()
    );
    for (listen, target) in services {
        agent += &format!(
            "\n[[egress]]\nlisten = \"{listen}:0\"\nmode = \"forward\"\nto = \"{target}\"\n\
             max_connections = 65536\n"
        );
    }
    let agent_path = dir.join(format!("{transport}-agent.toml"));
    std::fs::write(&agent_path, agent).expect("write");
    let agent = site.daemon(Host::Validator, "agent", &agent_path);
    agent.wait_log("tunnel up", 1, Duration::from_secs(30));
    sentry.wait_log("tunnel up", 1, Duration::from_secs(30));
    let bound: Vec<SocketAddr> = (0..3)
        .map(|n| agent.logged_addr_nth("egress listening", &[], "listen", n))
        .collect();
    let listener = |at: &str| {
        *bound
            .iter()
            .find(|a| a.ip().to_string() == at)
            .expect("an egress listener per service")
    };
    let routes = Routes {
        echo: listener("127.0.0.1"),
        sink: listener("127.0.0.2"),
        source: listener("127.0.0.3"),
    };
    (routes, vec![sentry, agent])
}

/// The egress table of one site.
pub(super) fn egress_table(t: &mut String, x: &EgressSection) {
    let _ = writeln!(
        t,
        "\n#### Egress: the node dialing out through the sentry, against dialing directly\n"
    );
    let _ = writeln!(
        t,
        "| path | up, 1 stream (Gbit/s) | down, 1 stream (Gbit/s) | new conns/s | TTFB p99 (ms) | failed |"
    );
    let _ = writeln!(t, "|---|---|---|---|---|---|");
    let base = &x.samples[0];
    for (name, s) in x.names.iter().zip(&x.samples) {
        let ratio = |v: &[f64], b: &[f64]| {
            if std::ptr::eq(s, base) {
                String::new()
            } else {
                format!(", {:.2}×", median(v) / median(b))
            }
        };
        let _ = writeln!(
            t,
            "| {name} | {}{} | {}{} | {}{} | {} | {} |",
            cell(&s.up1, 2),
            ratio(&s.up1, &base.up1),
            cell(&s.down1, 2),
            ratio(&s.down1, &base.down1),
            cell(&s.cps, 0),
            ratio(&s.cps, &base.cps),
            cell(&s.ttfb99, 2),
            s.failed
        );
    }
}

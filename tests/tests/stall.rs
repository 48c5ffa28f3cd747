//! Clients that stop reading never stall anyone else: over each transport, 64 clients from 8
//! addresses ask for far more than any buffer holds and never read it, on a tcp, a jsonrpc
//! and a udp route, while an unrelated client's round trips through the same tunnel keep
//! coming back and the tunnel stays up. (The `stall` bench measures the delay and memory.)
#![allow(clippy::unwrap_used)]

use std::sync::Mutex;
use std::time::Duration;

use tests::stall::{self, Attack, Transport};

/// One run at a time: the runs load both cores, and the bound is about others' delay.
static SERIAL: Mutex<()> = Mutex::new(());

/// Far above the ~100 ms a stalled tunnel may cost others (measured by the bench), far below
/// what a stalled tunnel does: no answer at all until the sentry gives the tunnel up after 5 s.
const GENEROUS: Duration = Duration::from_secs(1);

fn unaffected(transport: Transport) {
    let _one = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    for attack in Attack::ALL {
        let report = stall::run(transport, attack, 64, 8, Duration::from_secs(3));
        let what = format!("{} over {}", attack.as_str(), transport.as_str());
        eprintln!(
            "{what}: {} stalled, {} + {} round trips, worst {:?} / {:?} (kept / fresh), rss sentry {} MiB agent {} MiB, cpu {:.2} / {:.2}",
            report.stalled,
            report.during.len(),
            report.fresh.len(),
            report.during.iter().max(),
            report.fresh.iter().max(),
            report.rss.0 >> 20,
            report.rss.1 >> 20,
            report.cpu.0,
            report.cpu.1
        );
        assert!(
            report.stalled >= 60,
            "{what}: only {} clients stalled",
            report.stalled
        );
        assert_eq!(report.failed, 0, "{what}: round trips failed");
        assert!(
            report.during.len() >= 20,
            "{what}: too few round trips: {report:?}"
        );
        assert!(
            report.worst() < GENEROUS,
            "{what}: a round trip took {:?}",
            report.worst()
        );
        assert_eq!(report.tunnels_up, 1, "{what}: the tunnel was torn down");
    }
}

#[test]
fn stalled_clients_do_not_hold_up_others_over_quic() {
    unaffected(Transport::Quic);
}

#[test]
fn stalled_clients_do_not_hold_up_others_over_wireguard() {
    unaffected(Transport::WireGuard);
}

#[test]
fn stalled_clients_do_not_hold_up_others_over_tls() {
    unaffected(Transport::Tls);
}

//! Flow-control credit of a QUIC tunnel as a budget: what streams whose reader stopped
//! reading may hold, so that they never hold up the others.
//!
//! # The problem
//!
//! QUIC has two levels of receive credit. Each stream may have up to [`STREAM_WINDOW`] bytes
//! received and not yet read; all streams together up to the connection's window. A relay
//! reads a tunnel stream only as fast as the far side of its relayed connection takes the
//! bytes: a client that stops reading (or a node that stops reading an upload) stops its
//! stream being read, and the stream keeps a full stream window of credit. With a fixed
//! connection window `C`, `C / STREAM_WINDOW` such clients (4 with 32 MiB and 8 MiB) took all
//! of it: every other stream of the tunnel stopped, relay headers got no status, and the
//! sentry closed the tunnel as unresponsive. Lowering the stream window instead caps every
//! stream's throughput (one window per round trip), and quinn has no per-stream window.
//!
//! # The scheme
//!
//! The tunnel's connection window is `BASE_WINDOW` plus one stream window for each stream
//! that holds credit now, for at most [`MAX_HELD`] of them:
//!
//! - A stream *holds* credit while its reader is not waiting for it: the last read returned
//!   data and the reader has not come back for more since (it is writing that data to a
//!   client that does not take it). A reader waiting in `poll_read` holds nothing: the stream
//!   has nothing unread. The stream's [`Held`] mark records the ledger's tick at the read; a
//!   monitor task per tunnel ticks every [`TICK`] and counts the marks older than a tick.
//! - The window follows the count: raised at once (MAX_DATA goes out with the next packet),
//!   lowered after a second without need, so that readers that keep pausing briefly do not
//!   make it flap. `BASE_WINDOW` is the credit of the streams that flow; the held ones never
//!   take from it for longer than a tick or two, and in a tick a tunnel carries less than
//!   `BASE_WINDOW` at any rate it reaches.
//! - Past [`MAX_HELD`], the streams over the budget are shed: their receive side is stopped
//!   (the unread bytes are dropped and their credit returns to the connection at once; the
//!   peer's sender sees STOP_SENDING) and their owner is told, so the relayed connection
//!   closes. Who goes first: the client address holding the most streams, then the stream
//!   held longest; only streams held for at least [`SHED_AFTER`] are shed, so a stream that
//!   merely paused is not. A stream held for [`STALL_DEADLINE`] is shed whatever the count: its
//!   client took nothing in that long.
//!
//! So a tunnel's receive buffers never exceed `BASE_WINDOW + MAX_HELD × STREAM_WINDOW`
//! (96 MiB), the streams that flow always have `BASE_WINDOW` between them, and what a client
//! that stops reading costs anyone else is one stream window of memory for as long as it is
//! among the [`MAX_HELD`] held longest (or until [`STALL_DEADLINE`]). The same ledger runs on
//! both ends: the sentry's for what agents send (answers to clients), the agent's for what the
//! sentry sends (clients' uploads to a service that stops reading).

use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use quinn::{Connection, RecvStream, VarInt};
use tokio::io::{AsyncRead, ReadBuf};
use tokio::sync::Notify;

use super::quic::{CONNECTION_WINDOW, STREAM_WINDOW, code};
use crate::lock;
use crate::log_limit::LogLimit;

static SHED_LOG: LogLimit = LogLimit::new(Duration::from_secs(10));

/// The credit of the streams that flow (the connection window with no stream held).
pub(crate) const BASE_WINDOW: u32 = CONNECTION_WINDOW;
/// Streams that may hold a stream window each at once, per tunnel.
pub(crate) const MAX_HELD: usize = 8;
/// How often the monitor looks at the streams (while there are any).
pub(crate) const TICK: Duration = Duration::from_millis(25);
/// A stream held at least this long may be shed when the budget is over.
pub(crate) const SHED_AFTER: Duration = Duration::from_millis(100);
/// A stream held this long is shed even within the budget.
pub(crate) const STALL_DEADLINE: Duration = Duration::from_secs(60);
/// Ticks below the need before the window is lowered.
const LOWER_AFTER: u64 = 40;
/// `Held::since` of a reader that waits (or a stream that ended): holds nothing.
const WAITING: u64 = u64::MAX;

/// One tunnel's streams and the monitor's state.
///
/// The monitor runs only while the tunnel has streams, and holds the ledger only weakly
/// between ticks: a tunnel whose owner is gone (and whose streams are) is not kept alive by
/// its monitor.
#[derive(Debug)]
pub(crate) struct Ledger {
    conn: Connection,
    streams: Mutex<Slots>,
    /// Advanced by the monitor every [`TICK`]; marks record it.
    tick: AtomicU64,
    /// Streams shed: the owner's count, across its tunnels.
    shed: Arc<AtomicU64>,
    /// The monitor's own state, kept across its runs.
    window: Mutex<Window>,
}

#[derive(Debug, Default)]
struct Slots {
    entries: Vec<Option<Weak<Held>>>,
    free: Vec<usize>,
    live: usize,
    /// Whether a monitor task runs now.
    watched: bool,
}

/// The connection window the monitor set, and since which tick it would be lower.
#[derive(Debug)]
struct Window {
    now: u64,
    below_since: Option<u64>,
}

/// A stream's mark: whether its reader is waiting, and since when it is not.
#[derive(Debug)]
pub(crate) struct Held {
    recv: Mutex<RecvStream>,
    /// The ledger's tick at the read after which the reader did not come back; [`WAITING`].
    since: AtomicU64,
    /// Who the stream is for (a hash of the client's address), to shed fairly.
    client: AtomicU64,
    shed: AtomicBool,
    shed_notify: Notify,
    slot: usize,
}

/// The receiving half of a QUIC tunnel stream, accounted in its tunnel's [`Ledger`].
#[derive(Debug)]
pub struct QuicRecv {
    held: Arc<Held>,
    ledger: Arc<Ledger>,
}

/// Resolves once the stream was shed (see [`QuicRecv::shed`]).
#[derive(Debug, Clone)]
pub(crate) struct Shed(Arc<Held>);

impl Ledger {
    /// A ledger for `conn`; its monitor runs while the connection has streams, and each
    /// stream it sheds is counted in `shed`.
    #[must_use]
    pub fn watch(conn: &Connection, shed: Arc<AtomicU64>) -> Arc<Self> {
        Arc::new(Self {
            conn: conn.clone(),
            streams: Mutex::default(),
            tick: AtomicU64::new(0),
            shed,
            window: Mutex::new(Window {
                now: u64::from(BASE_WINDOW),
                below_since: None,
            }),
        })
    }

    /// Account a new stream's receiving half, for the client at `client`.
    #[must_use]
    pub fn recv(self: &Arc<Self>, recv: RecvStream, client: Option<IpAddr>) -> QuicRecv {
        let mut slots = lock(&self.streams);
        let slot = slots.free.pop().unwrap_or_else(|| {
            slots.entries.push(None);
            slots.entries.len() - 1
        });
        let held = Arc::new(Held {
            recv: Mutex::new(recv),
            since: AtomicU64::new(WAITING),
            client: AtomicU64::new(client.map_or(0, client_key)),
            shed: AtomicBool::new(false),
            shed_notify: Notify::new(),
            slot,
        });
        slots.entries[slot] = Some(Arc::downgrade(&held));
        slots.live += 1;
        if !slots.watched {
            slots.watched = true;
            tokio::spawn(monitor(Arc::downgrade(self)));
        }
        drop(slots);
        QuicRecv {
            held,
            ledger: self.clone(),
        }
    }

    /// Resolves once the tunnel has no stream left (checked every [`TICK`]).
    pub async fn idle(&self) {
        while lock(&self.streams).live > 0 {
            tokio::time::sleep(TICK).await;
        }
    }

    fn release(&self, slot: usize) {
        let mut slots = lock(&self.streams);
        if let Some(entry) = slots.entries.get_mut(slot) {
            *entry = None;
            slots.free.push(slot);
            slots.live -= 1;
        }
    }

    /// The held streams now: (since, client, mark).
    fn held(&self, tick: u64) -> Vec<(u64, u64, Arc<Held>)> {
        let slots = lock(&self.streams);
        slots
            .entries
            .iter()
            .flatten()
            .filter_map(Weak::upgrade)
            .filter_map(|h| {
                let since = h.since.load(Ordering::Relaxed);
                (since < tick && !h.shed.load(Ordering::Relaxed))
                    .then(|| (since, h.client.load(Ordering::Relaxed), h))
            })
            .collect()
    }
}

impl Held {
    /// Shed this stream if its reader is still away and it holds unread bytes now (or,
    /// with `anyway`, whatever it holds); whether it was shed. A reader that is only slow to
    /// be scheduled (a loaded machine) holds nothing unread and is left alone.
    fn take_back(&self, anyway: bool) -> bool {
        let mut recv = lock(&self.recv);
        if self.since.load(Ordering::Relaxed) == WAITING {
            return false;
        }
        if !anyway {
            // One byte read with a waker that wakes nobody: the reader is away (it registered
            // no waker of its own), and this stream is about to be stopped if a byte was
            // there, its unread bytes dropped with it.
            let mut cx = Context::from_waker(std::task::Waker::noop());
            let mut byte = [0u8; 1];
            let mut probe = ReadBuf::new(&mut byte);
            let unread = matches!(
                Pin::new(&mut *recv).poll_read(&mut cx, &mut probe),
                Poll::Ready(Ok(())) if !probe.filled().is_empty()
            );
            if !unread {
                return false;
            }
        }
        let _ = recv.stop(code::STALLED);
        self.since.store(WAITING, Ordering::Relaxed);
        drop(recv);
        self.shed.store(true, Ordering::Release);
        self.shed_notify.notify_waiters();
        true
    }
}

impl QuicRecv {
    /// The reader will not read for a while and expects nothing (a pooled connection): it
    /// holds no credit.
    pub(crate) fn park(&self) {
        self.held.since.store(WAITING, Ordering::Relaxed);
    }

    /// The stream now serves the client at `client` (a pooled connection changes hands).
    pub(crate) fn set_client(&self, client: IpAddr) {
        self.held
            .client
            .store(client_key(client), Ordering::Relaxed);
    }

    /// Stop receiving: unread bytes are dropped and the peer told to stop sending.
    pub fn stop(&self, code: VarInt) {
        let _ = lock(&self.held.recv).stop(code);
    }

    /// A handle that resolves once the ledger sheds this stream.
    #[must_use]
    pub(crate) fn shed(&self) -> Shed {
        Shed(self.held.clone())
    }
}

impl Shed {
    /// Wait until the stream is shed.
    pub async fn wait(&self) {
        loop {
            let notified = self.0.shed_notify.notified();
            if self.0.shed.load(Ordering::Acquire) {
                return;
            }
            notified.await;
        }
    }
}

impl AsyncRead for QuicRecv {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        // The mark changes under the stream's lock: the monitor looks at both under it.
        let mut recv = lock(&this.held.recv);
        let poll = Pin::new(&mut *recv).poll_read(cx, buf);
        let since = match &poll {
            Poll::Ready(Ok(())) if buf.filled().len() > before => {
                this.ledger.tick.load(Ordering::Relaxed)
            }
            _ => WAITING,
        };
        this.held.since.store(since, Ordering::Relaxed);
        drop(recv);
        poll
    }
}

impl Drop for QuicRecv {
    fn drop(&mut self) {
        self.ledger.release(self.held.slot);
    }
}

/// The fairness key of a client address.
fn client_key(ip: IpAddr) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    ip.to_canonical().hash(&mut hasher);
    hasher.finish() | 1
}

/// [`STALL_DEADLINE`] in ticks.
fn deadline_ticks() -> u64 {
    u64::try_from(STALL_DEADLINE.as_millis() / TICK.as_millis()).unwrap_or(u64::MAX)
}

/// What the monitor decides at one tick: the connection window it wants, and which of the
/// held streams (by index into `held`) to shed, in order (a stream found holding no unread
/// bytes is then left alone: see [`Held::take_back`]). Pure, for tests.
fn decide(tick: u64, held: &[(u64, u64)]) -> (u64, Vec<usize>) {
    let ticks = |d: Duration| u64::try_from(d.as_millis() / TICK.as_millis()).unwrap_or(u64::MAX);
    let age = |since: u64| tick.saturating_sub(since);
    let mut shed: Vec<usize> = (0..held.len())
        .filter(|&i| age(held[i].0) >= deadline_ticks())
        .collect();
    let kept = held.len() - shed.len();
    if kept > MAX_HELD {
        // The client with the most held streams first, then the stream held longest.
        let mut per_client = std::collections::HashMap::<u64, usize>::new();
        for (_, client) in held {
            *per_client.entry(*client).or_default() += 1;
        }
        let mut order: Vec<usize> = (0..held.len())
            .filter(|i| !shed.contains(i) && age(held[*i].0) >= ticks(SHED_AFTER))
            .collect();
        order.sort_by_key(|&i| (std::cmp::Reverse(per_client[&held[i].1]), held[i].0, i));
        shed.extend(order.into_iter().take(kept - MAX_HELD));
    }
    let counted = (held.len() - shed.len()).min(MAX_HELD) as u64;
    let window = u64::from(BASE_WINDOW) + counted * u64::from(STREAM_WINDOW);
    (window, shed)
}

/// The monitor of one tunnel: ticks while it has streams, sets the connection window and
/// sheds; ends when the tunnel has no stream left (the next stream starts another), when the
/// connection closed, or when the ledger is gone.
async fn monitor(ledger: Weak<Ledger>) {
    let mut interval = tokio::time::interval(TICK);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let Some(ledger) = ledger.upgrade() else {
            return;
        };
        {
            let mut slots = lock(&ledger.streams);
            if slots.live == 0 || ledger.conn.close_reason().is_some() {
                slots.watched = false;
                return;
            }
        }
        ledger.tick_once();
    }
}

impl Ledger {
    /// One tick of the monitor.
    fn tick_once(&self) {
        let tick = self.tick.fetch_add(1, Ordering::Relaxed) + 1;
        let held = self.held(tick);
        let marks: Vec<(u64, u64)> = held.iter().map(|(s, c, _)| (*s, *c)).collect();
        let (want, shed) = decide(tick, &marks);
        if !shed.is_empty()
            && let Some(suppressed) = SHED_LOG.allow()
        {
            tracing::info!(
                shed = shed.len(),
                held = held.len(),
                budget = MAX_HELD,
                suppressed,
                "closed relayed connections whose reader stopped reading: the tunnel's credit for \
                 held streams was spent (the client address holding the most goes first)"
            );
        }
        for i in shed {
            let mark = &held[i].2;
            if !mark.take_back(tick.saturating_sub(held[i].0) >= deadline_ticks()) {
                continue;
            }
            tracing::debug!(
                slot = mark.slot,
                held_ms =
                    u64::try_from(TICK.as_millis()).unwrap_or(0) * tick.saturating_sub(held[i].0),
                client = held[i].1,
                "stream shed"
            );
            self.shed.fetch_add(1, Ordering::Relaxed);
        }
        let mut window = lock(&self.window);
        let lower = want < window.now
            && window
                .below_since
                .is_some_and(|since| tick.saturating_sub(since) >= LOWER_AFTER);
        if want > window.now || lower {
            window.now = want;
            window.below_since = None;
            self.conn
                .set_receive_window(VarInt::from_u64(want).unwrap_or(VarInt::MAX));
        } else if want < window.now {
            window.below_since.get_or_insert(tick);
        } else {
            window.below_since = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn the_window_follows_the_held_streams_within_the_budget() {
        let base = u64::from(BASE_WINDOW);
        let stream = u64::from(STREAM_WINDOW);
        assert_eq!(decide(100, &[]), (base, vec![]));
        // Three held streams of three clients: three stream windows more, nobody shed.
        let held = [(99, 1), (50, 2), (10, 3)];
        assert_eq!(decide(100, &held), (base + 3 * stream, vec![]));
        // The budget's bound.
        assert_eq!(
            base + MAX_HELD as u64 * stream,
            96 * MIB,
            "documented as 96 MiB"
        );
    }

    #[test]
    fn over_the_budget_the_busiest_client_is_shed_first_then_the_oldest() {
        // One slow reader (client 1, held longest of all), and twenty streams of an attacker
        // (client 9), held for a shorter time.
        let mut held = vec![(10u64, 1u64)];
        held.extend((0..20).map(|i| (60 + i, 9)));
        let (window, shed) = decide(100, &held);
        assert_eq!(
            window,
            u64::from(BASE_WINDOW) + MAX_HELD as u64 * u64::from(STREAM_WINDOW)
        );
        assert_eq!(shed.len(), held.len() - MAX_HELD);
        assert!(!shed.contains(&0), "the lone slow reader stays");
        // Of the attacker's, the oldest go.
        let mut shed_since: Vec<u64> = shed.iter().map(|&i| held[i].0).collect();
        shed_since.sort_unstable();
        let over = u64::try_from(held.len() - MAX_HELD).unwrap();
        assert_eq!(shed_since, (60..60 + over).collect::<Vec<_>>());
    }

    #[test]
    fn streams_that_merely_paused_are_not_shed() {
        // Over the budget, but every stream held for less than SHED_AFTER: the window stays
        // at its bound and nobody is shed yet.
        let held: Vec<(u64, u64)> = (0..40).map(|i| (99, i)).collect();
        let (_, shed) = decide(100, &held);
        assert!(shed.is_empty());
    }

    #[test]
    fn a_stream_held_past_the_deadline_is_shed_within_the_budget() {
        let deadline = (STALL_DEADLINE.as_millis() / TICK.as_millis()) as u64;
        let held = [(0, 1), (deadline, 2)];
        let (window, shed) = decide(deadline, &held);
        assert_eq!(shed, vec![0]);
        assert_eq!(window, u64::from(BASE_WINDOW) + u64::from(STREAM_WINDOW));
    }

    /// A real QUIC connection on loopback: the "sentry" end opens streams and reads them
    /// through a ledger, the "agent" end sends on each as fast as it may. Twelve readers that
    /// never read (three times what the old fixed 32 MiB window held) and one that reads: the
    /// one gets everything, the ledger sheds the four held past its budget of eight, and a
    /// reader that is only away, with nothing unread, is not shed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn readers_that_stop_never_hold_up_the_one_that_reads() {
        use crate::keys::PrivateKey;
        use crate::transport::pin::SERVER_NAME;
        use crate::transport::quic::{self, Tuning};
        use tokio::io::AsyncReadExt;

        const STALLED: usize = 12;
        let (sentry_key, agent_key) = (
            PrivateKey::generate().unwrap(),
            PrivateKey::generate().unwrap(),
        );
        let server = quic::server_endpoint(
            "127.0.0.1:0".parse().unwrap(),
            &sentry_key,
            std::iter::once((agent_key.public_key(), "v1".to_owned())).collect(),
            &Tuning::default(),
        )
        .unwrap();
        let client = quic::client_endpoint(
            "127.0.0.1:0".parse().unwrap(),
            &agent_key,
            &Tuning::default(),
        )
        .unwrap();
        let config =
            quic::client_config(&agent_key, sentry_key.public_key(), &Tuning::default()).unwrap();
        let connecting = client
            .connect_with(config, server.local_addr().unwrap(), SERVER_NAME)
            .unwrap();
        let (agent, sentry) =
            tokio::join!(connecting, async { server.accept().await.unwrap().await });
        let (agent, sentry) = (agent.unwrap(), sentry.unwrap());
        // The agent's end: every stream it accepts gets 32 MiB, written as fast as allowed.
        tokio::spawn(async move {
            while let Ok((mut send, mut recv)) = agent.accept_bi().await {
                tokio::spawn(async move {
                    let mut first = [0u8; 1];
                    let _ = recv.read_exact(&mut first).await;
                    let block = vec![7u8; 64 * 1024];
                    for _ in 0..512 {
                        if send.write_all(&block).await.is_err() {
                            return;
                        }
                    }
                    let _ = send.finish();
                });
            }
        });
        let shed_count = Arc::new(AtomicU64::new(0));
        let ledger = Ledger::watch(&sentry, shed_count.clone());
        let open = || async {
            let (mut send, recv) = sentry.open_bi().await.unwrap();
            send.write_all(b"go").await.unwrap();
            (
                send,
                ledger.recv(recv, Some(IpAddr::from([203, 0, 113, 7]))),
            )
        };
        let mut stalled = Vec::new();
        for _ in 0..STALLED {
            let (send, mut recv) = open().await;
            // One read, then never again: held from here on. (With a fixed window, the fifth
            // would never get its first byte.)
            let mut byte = [0u8; 1];
            tokio::time::timeout(Duration::from_secs(10), recv.read_exact(&mut byte))
                .await
                .expect("a stream got no byte: the stalled ones hold all the credit")
                .unwrap();
            stalled.push((send, recv));
        }
        // A reader away with nothing unread (a stream the agent sends nothing on).
        let (_idle_send, mut idle) = {
            let (send, recv) = sentry.open_bi().await.unwrap();
            (
                send,
                ledger.recv(recv, Some(IpAddr::from([203, 0, 113, 8]))),
            )
        };
        let mut none = [0u8; 1];
        assert!(
            tokio::time::timeout(Duration::from_millis(50), idle.read(&mut none))
                .await
                .is_err()
        );
        idle.held.since.store(0, Ordering::Relaxed);
        // The one that reads gets its 32 MiB whole.
        let (_send, mut reader) = open().await;
        reader.set_client(IpAddr::from([203, 0, 113, 9]));
        let mut got = 0usize;
        let mut buf = vec![0u8; 256 * 1024];
        let whole = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                let n = reader.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                got += n;
            }
        })
        .await;
        assert!(
            whole.is_ok(),
            "the reading stream stalled after {got} bytes"
        );
        assert_eq!(got, 32 << 20);
        // The twelve and the idle one are held: five over the budget of eight. The stalled
        // client's streams were shed (its oldest first; each owner told), the idle one, with
        // nothing unread, was left alone.
        let over = (STALLED + 1 - MAX_HELD) as u64;
        let deadline = crate::clock::now() + Duration::from_secs(10);
        while shed_count.load(Ordering::Relaxed) < over && crate::clock::now() < deadline {
            tokio::time::sleep(TICK).await;
        }
        let told = stalled
            .iter()
            .filter(|(_, recv)| recv.held.shed.load(Ordering::Relaxed))
            .count() as u64;
        // (The reader, held for an instant at a tick, may have cost one more.)
        assert!(told == over || told == over + 1, "{told} shed");
        assert_eq!(shed_count.load(Ordering::Relaxed), told);
        assert!(!idle.held.shed.load(Ordering::Relaxed));
        assert!(!reader.held.shed.load(Ordering::Relaxed));
        for (_, recv) in stalled
            .iter()
            .filter(|(_, r)| r.held.shed.load(Ordering::Relaxed))
        {
            tokio::time::timeout(Duration::from_secs(1), recv.shed().wait())
                .await
                .unwrap();
        }
    }
}

//! The tunnel to one sentry: its `[[sentry]]` entries tried in preference order (each
//! transport's dialing and serving is in [`crate::transport::dial`]), reconnecting with
//! backoff, returning to the preferred transport, and the engine's side of each attempt:
//! the sentry's stream cap, serving and refusing streams, and the drain.

use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::service::{Refuse, relay_stream};
use super::{BACKOFF_BASE, BACKOFF_CAP, Group, HEALTHY_AFTER, PREFER_RETRY, Shared, TunnelState};
use crate::backoff::Backoff;
use crate::keys::PrivateKey;
use crate::transport::TunnelStream;
use crate::transport::dial::{Attempt, BoxFuture, Host, Live, Place, Preconnected, ServePlaced};
use crate::{clock, lock};

/// One sentry's tunnel and its reconnect loop, over its transports in preference order.
pub(super) struct Tunnel {
    group: Arc<Group>,
    shared: Arc<Shared>,
    /// A tunnel over the preferred transport, dialed while a fallback was up; the next
    /// attempt of the preferred entry takes it instead of dialing.
    upgrade: Mutex<Option<Preconnected>>,
    /// Streams (and TLS data connections) this sentry holds open now, across transports and
    /// reconnects; at most `max_streams_per_sentry`.
    streams: Arc<AtomicUsize>,
}

impl Tunnel {
    /// The tunnel to the sentry of `group`, not yet dialed.
    pub(super) fn new(group: Arc<Group>, shared: Arc<Shared>) -> Self {
        Self {
            group,
            shared,
            upgrade: Mutex::new(None),
            streams: Arc::default(),
        }
    }

    pub(super) async fn run(self) {
        let retire = &self.group.retire;
        let mut backoff = Backoff::new(BACKOFF_BASE, BACKOFF_CAP);
        while !retire.is_cancelled() {
            let started = clock::now();
            let mut was_up = false;
            for (i, entry) in self.group.entries.iter().enumerate() {
                let host = EntryHost {
                    tunnel: &self,
                    entry,
                    first: std::ptr::eq(entry.as_ref(), self.group.entries[0].as_ref()),
                };
                let attempt = entry.dialer.attempt(&entry.peer, &host).await;
                let sentry = &entry.peer.address;
                let transport = entry.peer.transport.as_str();
                match attempt {
                    Attempt::Retired => return,
                    Attempt::Ended(why) => {
                        warn!(%sentry, transport, "tunnel down: {why}");
                        was_up = true;
                        break;
                    }
                    Attempt::Upgraded => {
                        info!(%sentry, transport, "the sentry's preferred transport answers again: moving the tunnel to it");
                        was_up = true;
                        break;
                    }
                    Attempt::Failed(why) => {
                        warn!(%sentry, transport, "cannot reach sentry: {why}");
                        if let Some(next) = self.group.entries.get(i + 1) {
                            info!(sentry = %next.peer.address, transport = next.peer.transport.as_str(), "falling back to the sentry's next transport");
                        }
                    }
                }
            }
            // A transport that notices a dead tunnel late (WireGuard) lived that much less.
            let healthy_after = HEALTHY_AFTER
                + self
                    .group
                    .entries
                    .iter()
                    .map(|e| e.dialer.notices_death_after())
                    .max()
                    .unwrap_or_default();
            if was_up && clock::now().duration_since(started) >= healthy_after {
                backoff.reset();
            }
            if lock(&self.upgrade).is_some() {
                continue;
            }
            let delay = backoff.next_delay(rand::random::<f64>());
            debug!(sentry = %self.group.entries[0].peer.address, "reconnecting in {delay:?}");
            tokio::select! {
                () = retire.cancelled() => return,
                () = tokio::time::sleep(delay) => {}
            }
        }
    }

    pub(super) fn up(entry: &TunnelState, live: Live) {
        entry.connects.fetch_add(1, Ordering::Relaxed);
        *lock(&entry.live) = Some((live, clock::now()));
    }

    /// Serve a stream the sentry opened, if the sentry holds fewer than
    /// `max_streams_per_sentry` here; else answer it `Busy` (a short task: the header, then
    /// the answer, within the header timeout).
    pub(super) fn serve_stream(&self, stream: TunnelStream) {
        let max = lock(&self.shared.config).max_streams_per_sentry;
        let shared = self.shared.clone();
        match Place::take(&self.streams, max) {
            Some(place) => {
                self.group.relays.spawn(async move {
                    let _place = place;
                    relay_stream(stream, shared, Refuse::No).await;
                });
            }
            None => {
                tokio::spawn(relay_stream(stream, shared, Refuse::Busy));
            }
        }
    }

    /// While an entry other than the first is up: every [`PREFER_RETRY`], dial the sentry's
    /// first entry when its transport dials ahead (QUIC); returns once that worked, the new
    /// tunnel left in `upgrade`. Never returns for the first entry itself.
    async fn probe_preferred(&self, is_first: bool) {
        let first = &self.group.entries[0];
        if is_first || !first.dialer.dials_ahead() {
            return std::future::pending().await;
        }
        loop {
            tokio::time::sleep(PREFER_RETRY).await;
            match first.dialer.dial_ahead(&first.peer, &self.shared.key).await {
                Some(Ok(dialed)) => {
                    *lock(&self.upgrade) = Some(dialed);
                    return;
                }
                Some(Err(e)) => {
                    debug!(sentry = %first.peer.address, "the preferred transport still does not answer: {e}");
                }
                None => return std::future::pending().await,
            }
        }
    }

    /// Retired: new streams are answered `ShuttingDown` by `refuse_new` (the sentry fails
    /// over) while the open ones finish; at shutdown for at most `drain_timeout`.
    async fn drain(&self, refuse_new: impl Future<Output = ()>) {
        let relays = &self.group.relays;
        relays.close();
        let deadline = async {
            self.shared.stop.cancelled().await;
            let drain = lock(&self.shared.config).drain_timeout;
            tokio::time::sleep(drain).await;
        };
        tokio::select! {
            () = refuse_new => {}
            () = relays.wait() => {}
            () = deadline => {}
        }
    }
}

/// The engine's side of one entry's attempt (see [`Host`]).
struct EntryHost<'a> {
    tunnel: &'a Tunnel,
    entry: &'a TunnelState,
    /// Whether this is the sentry's first (preferred) entry.
    first: bool,
}

impl Host for EntryHost<'_> {
    fn key(&self) -> &PrivateKey {
        &self.tunnel.shared.key
    }

    fn retired(&self) -> &CancellationToken {
        &self.tunnel.group.retire
    }

    fn up(&self, live: Live) {
        Tunnel::up(self.entry, live);
    }

    fn down(&self) {
        *lock(&self.entry.live) = None;
    }

    fn take_upgrade(&self) -> Option<Preconnected> {
        if self.first {
            lock(&self.tunnel.upgrade).take()
        } else {
            None
        }
    }

    fn probe_preferred(&self) -> BoxFuture<'_> {
        Box::pin(self.tunnel.probe_preferred(self.first))
    }

    fn serve(&self, stream: TunnelStream) {
        self.tunnel.serve_stream(stream);
    }

    fn refuse(&self, stream: TunnelStream) {
        tokio::spawn(relay_stream(
            stream,
            self.tunnel.shared.clone(),
            Refuse::ShuttingDown,
        ));
    }

    fn serve_placed(&self) -> ServePlaced {
        let shared = self.tunnel.shared.clone();
        Arc::new(move |stream, place: Option<Place>| {
            let shared = shared.clone();
            Box::pin(async move {
                let refusal = if place.is_some() {
                    Refuse::No
                } else {
                    Refuse::Busy
                };
                relay_stream(stream, shared, refusal).await;
                drop(place);
            })
        })
    }

    fn spawn_relay(&self, task: BoxFuture<'static>) {
        self.tunnel.group.relays.spawn(task);
    }

    fn streams(&self) -> (Arc<AtomicUsize>, usize) {
        let max = lock(&self.tunnel.shared.config).max_streams_per_sentry;
        (self.tunnel.streams.clone(), max)
    }

    fn streams_shed(&self) -> Arc<AtomicU64> {
        self.tunnel.shared.streams_shed.clone()
    }

    fn drain<'a>(&'a self, refuse_new: BoxFuture<'a>) -> BoxFuture<'a> {
        Box::pin(self.tunnel.drain(refuse_new))
    }
}

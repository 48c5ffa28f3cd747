//! Egress on the agent: the node's outbound connections leave from the sentries.
//!
//! Each `[[egress]]` entry is a loopback listener. A connection learns where it goes from its
//! mode (the firewall's redirect, `SO_ORIGINAL_DST`; a SOCKS5 CONNECT; or the one `to` of a
//! `forward`), then the agent asks its sentries in `[[sentry]]` order, over whichever tunnel
//! of each is up, until one connects it (see [`crate::transport::egress`]). A sentry that
//! refuses by its own policy or load, or whose tunnel fails, passes it to the next; a
//! destination that refused or did not answer is not tried again through the others.
//!
//! Invariants: the listeners are loopback only (the config refuses anything else), each holds
//! at most its `max_connections`, and a connection the sentries do not take is closed with a
//! reset (a SOCKS5 client gets the reply code first), never left hanging.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::task_tracker::TaskTrackerToken;
use tracing::{debug, info, warn};

use super::{AGENT_IDLE_TIMEOUT, Shared};
use crate::config::{Destination, EgressListener, EgressMode};
use crate::log_limit::LogLimit;
use crate::metrics::Families;
use crate::relay::socks5::{self, Reply};
use crate::relay::{ByteCounters, EgressRequest, EgressStatus};
use crate::transport::TunnelStream;
use crate::transport::dial::Place;
use crate::transport::egress::EgressOpenError;
use crate::{lock, net};

/// Longest a SOCKS5 client may take to say where it goes.
const SOCKS5_TIMEOUT: Duration = Duration::from_secs(10);

static FAILED_LOG: LogLimit = LogLimit::new(Duration::from_secs(10));
static ACCEPT_LOG: LogLimit = LogLimit::new(Duration::from_secs(10));

/// How an egress connection ended before it was relayed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Failure {
    /// No sentry had a tunnel up, or every tunnel failed.
    NoSentry,
    /// The sentries refused it (egress not allowed, or the destination by policy).
    Refused,
    /// The sentries were at this agent's caps, or shutting down.
    Busy,
    /// The destination refused, did not answer, or its name did not resolve.
    Unreachable,
    /// Not a SOCKS5 CONNECT, or a transparent connection that was not redirected.
    BadRequest,
    /// The listener held its `max_connections`.
    Full,
}

impl Failure {
    /// Every failure, in a fixed order (for counters).
    pub(super) const ALL: [Self; 6] = [
        Self::NoSentry,
        Self::Refused,
        Self::Busy,
        Self::Unreachable,
        Self::BadRequest,
        Self::Full,
    ];

    pub(super) const fn as_str(self) -> &'static str {
        match self {
            Self::NoSentry => "no_sentry",
            Self::Refused => "refused",
            Self::Busy => "busy",
            Self::Unreachable => "unreachable",
            Self::BadRequest => "bad_request",
            Self::Full => "full",
        }
    }

    fn of(error: &EgressOpenError) -> Self {
        match error {
            EgressOpenError::Refused(Some(status)) => match status {
                EgressStatus::NotAllowed | EgressStatus::Refused => Self::Refused,
                EgressStatus::Busy | EgressStatus::ShuttingDown => Self::Busy,
                EgressStatus::ConnectRefused | EgressStatus::ConnectFailed => Self::Unreachable,
                EgressStatus::BadRequest | EgressStatus::Ok => Self::BadRequest,
            },
            EgressOpenError::Refused(None)
            | EgressOpenError::Tunnel(_)
            | EgressOpenError::Unresponsive => Self::NoSentry,
        }
    }

    /// The SOCKS5 reply a client gets.
    fn reply(self, error: Option<&EgressOpenError>) -> Reply {
        match (self, error) {
            (_, Some(EgressOpenError::Refused(Some(EgressStatus::ConnectRefused)))) => {
                Reply::ConnectionRefused
            }
            (Self::Unreachable, _) => Reply::HostUnreachable,
            (Self::Refused, _) => Reply::NotAllowed,
            (Self::NoSentry, _) => Reply::NetworkUnreachable,
            (Self::Busy | Self::BadRequest | Self::Full, _) => Reply::GeneralFailure,
        }
    }
}

/// What one listener did, kept across reloads by listen address.
#[derive(Debug, Default)]
pub(super) struct ListenerStats {
    /// Connections relayed through a sentry.
    pub(super) connected: AtomicU64,
    pub(super) failed: [AtomicU64; Failure::ALL.len()],
    /// `up`: from the node out; `down`: back to the node.
    pub(super) bytes: ByteCounters,
    /// Connections through the listener now.
    pub(super) active: Arc<AtomicUsize>,
}

impl ListenerStats {
    fn fail(&self, failure: Failure) {
        self.failed[failure as usize].fetch_add(1, Ordering::Relaxed);
    }
}

/// One bound `[[egress]]` listener.
pub(super) struct Slot {
    pub(super) config: ArcSwap<EgressListener>,
    /// The bound address.
    pub(super) local: SocketAddr,
    /// Cancelled when a reload removes the listener (and at shutdown).
    pub(super) stop: CancellationToken,
    pub(super) stats: Arc<ListenerStats>,
}

/// The egress families of `/metrics`, per listen address ever bound.
pub(super) fn collect(
    all: &std::sync::Mutex<HashMap<SocketAddr, Arc<ListenerStats>>>,
    out: &mut Families<'_>,
) -> std::fmt::Result {
    let mut listeners: Vec<(SocketAddr, Arc<ListenerStats>)> =
        lock(all).iter().map(|(l, s)| (*l, s.clone())).collect();
    listeners.sort_by_key(|(l, _)| *l);
    let label = |l: &SocketAddr| [("listen", l.to_string())];
    out.counters(
        "agent_egress_connections",
        "The node's outbound connections relayed through a sentry, by egress listener.",
        listeners
            .iter()
            .map(|(l, s)| (label(l), s.connected.load(Ordering::Relaxed))),
    )?;
    out.counters(
        "agent_egress_failed",
        "The node's outbound connections not relayed, by egress listener and why: no tunnel \
         up (no_sentry), refused by the sentries' policy, at their caps (busy), the \
         destination unreachable, not a SOCKS5 CONNECT or not redirected (bad_request), the \
         listener at its max_connections (full).",
        listeners.iter().flat_map(|(l, s)| {
            Failure::ALL
                .iter()
                .map(|f| {
                    (
                        [("listen", l.to_string()), ("reason", f.as_str().to_owned())],
                        s.failed[*f as usize].load(Ordering::Relaxed),
                    )
                })
                .collect::<Vec<_>>()
        }),
    )?;
    out.gauges(
        "agent_egress_active",
        "The node's outbound connections through an egress listener now.",
        listeners.iter().map(|(l, s)| {
            (
                label(l),
                i64::try_from(s.active.load(Ordering::Relaxed)).unwrap_or(i64::MAX),
            )
        }),
    )?;
    out.counters(
        "agent_egress_bytes",
        "Bytes of the node's outbound connections: up from the node, down back to it.",
        listeners.iter().flat_map(|(l, s)| {
            [
                (
                    [("listen", l.to_string()), ("direction", "up".to_owned())],
                    s.bytes.up.load(Ordering::Relaxed),
                ),
                (
                    [("listen", l.to_string()), ("direction", "down".to_owned())],
                    s.bytes.down.load(Ordering::Relaxed),
                ),
            ]
        }),
    )
}

/// Bind an egress listener (at start and on reload, before anything changes).
pub(super) fn bind(config: &EgressListener) -> std::io::Result<(TcpListener, SocketAddr)> {
    let listener = crate::metrics::bind(config.listen)?;
    let local = listener.local_addr()?;
    Ok((listener, local))
}

impl Slot {
    pub(super) fn new(
        config: &EgressListener,
        local: SocketAddr,
        stats: Arc<ListenerStats>,
        stop: &CancellationToken,
    ) -> Arc<Self> {
        Arc::new(Self {
            config: ArcSwap::from_pointee(config.clone()),
            local,
            stop: stop.child_token(),
            stats,
        })
    }
}

/// The counters of the listener at `listen` (made on first use).
pub(super) fn stats_for(
    all: &std::sync::Mutex<HashMap<SocketAddr, Arc<ListenerStats>>>,
    listen: SocketAddr,
) -> Arc<ListenerStats> {
    lock(all).entry(listen).or_default().clone()
}

/// Accept the node's connections until the listener is removed or the agent stops.
pub(super) async fn accept(slot: Arc<Slot>, listener: TcpListener, shared: Arc<Shared>) {
    let mode = slot.config.load().mode.as_str();
    info!(listen = %slot.local, mode, "egress listening");
    loop {
        let accepted = tokio::select! {
            biased;
            () = slot.stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let tcp = match accepted {
            Ok((tcp, _)) => tcp,
            Err(e) => {
                if let Some(suppressed) = ACCEPT_LOG.allow() {
                    warn!(listen = %slot.local, suppressed, "egress accept failed: {e}");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let max = slot.config.load().max_connections;
        let Some(place) = Place::take(&slot.stats.active, max) else {
            slot.stats.fail(Failure::Full);
            let _ = tcp.set_zero_linger();
            continue;
        };
        tokio::spawn(serve(shared.clone(), slot.clone(), tcp, place));
    }
}

/// One connection of the node: where it goes, a sentry that takes it, then the relay.
async fn serve(shared: Arc<Shared>, slot: Arc<Slot>, mut tcp: TcpStream, _place: Place) {
    let config = slot.config.load_full();
    let socks = matches!(config.mode, EgressMode::Socks5);
    let (destination, early) = match destination(&config.mode, &slot, &mut tcp).await {
        Ok(found) => found,
        Err(why) => {
            slot.stats.fail(Failure::BadRequest);
            if let Some(suppressed) = FAILED_LOG.allow() {
                warn!(listen = %slot.local, suppressed, "egress connection refused: {why}");
            }
            let _ = tcp.set_zero_linger();
            return;
        }
    };
    let request = EgressRequest {
        destination: destination.clone(),
    };
    let (mut stream, sentry, _relay) = match open(&shared, &request).await {
        Ok(opened) => opened,
        Err(error) => {
            let failure = error.as_ref().map_or(Failure::NoSentry, Failure::of);
            let reply = failure.reply(error.as_ref());
            slot.stats.fail(failure);
            if let Some(suppressed) = FAILED_LOG.allow() {
                let why = error.map_or_else(
                    || "no tunnel to a sentry is up".to_owned(),
                    |e| e.to_string(),
                );
                warn!(listen = %slot.local, %destination, failure = failure.as_str(), suppressed, "egress connection not relayed: {why}");
            }
            if socks {
                let _ = tcp.write_all(&socks5::reply(reply, slot.local)).await;
            }
            let _ = tcp.set_zero_linger();
            return;
        }
    };
    if socks
        && tcp
            .write_all(&socks5::reply(Reply::Succeeded, slot.local))
            .await
            .is_err()
    {
        stream.abort();
        return;
    }
    if !early.is_empty() && stream.write_all(&early).await.is_err() {
        stream.abort();
        return;
    }
    slot.stats.connected.fetch_add(1, Ordering::Relaxed);
    let (end, moved) = stream
        .relay_tcp(&mut tcp, AGENT_IDLE_TIMEOUT, &slot.stats.bytes)
        .await;
    debug!(listen = %slot.local, %destination, %sentry, up = moved.up, down = moved.down, ?end, "egress connection closed");
}

/// Where a connection goes, and any bytes a SOCKS5 client sent past its request.
async fn destination(
    mode: &EgressMode,
    slot: &Slot,
    tcp: &mut TcpStream,
) -> Result<(Destination, Vec<u8>), String> {
    match mode {
        EgressMode::Forward(to) => Ok((to.clone(), Vec::new())),
        EgressMode::Transparent => {
            let original = net::original_destination(tcp).map_err(|e| {
                format!("no original destination (is the redirect rule in place?): {e}")
            })?;
            let local = tcp.local_addr().map_err(|e| e.to_string())?;
            if original == local || original == slot.local {
                return Err(format!(
                    "a connection to {original} reached the transparent listener without being \
                     redirected: nothing to relay (check the firewall's redirect rule)"
                ));
            }
            Ok((Destination::Addr(original), Vec::new()))
        }
        EgressMode::Socks5 => tokio::time::timeout(SOCKS5_TIMEOUT, socks5_connect(tcp))
            .await
            .map_err(|_| format!("no SOCKS5 request within {SOCKS5_TIMEOUT:?}"))?,
    }
}

/// The SOCKS5 greeting and CONNECT request (RFC 1928), bounded; a refusal is answered
/// before the error returns.
async fn socks5_connect(tcp: &mut TcpStream) -> Result<(Destination, Vec<u8>), String> {
    let mut buf = Vec::with_capacity(64);
    let greeting = loop {
        match socks5::parse_greeting(&buf) {
            Ok(Some(len)) => break len,
            Ok(None) => read_more(tcp, &mut buf, socks5::MAX_GREETING).await?,
            Err(e) => {
                if e == socks5::Socks5Error::NoAcceptableMethod {
                    let _ = tcp.write_all(&socks5::method_refused()).await;
                }
                return Err(format!("SOCKS5: {e}"));
            }
        }
    };
    buf.drain(..greeting);
    tcp.write_all(&socks5::method_chosen())
        .await
        .map_err(|e| e.to_string())?;
    loop {
        match socks5::parse_request(&buf) {
            Ok(Some((len, destination))) => {
                buf.drain(..len);
                return Ok((destination, buf));
            }
            Ok(None) => read_more(tcp, &mut buf, socks5::MAX_REQUEST).await?,
            Err(e) => {
                if let Some(reply) = e.reply() {
                    let unspecified = SocketAddr::from(([0, 0, 0, 0], 0));
                    let _ = tcp.write_all(&socks5::reply(reply, unspecified)).await;
                }
                return Err(format!("SOCKS5: {e}"));
            }
        }
    }
}

/// Read more of a message that may be at most `max` bytes.
async fn read_more(tcp: &mut TcpStream, buf: &mut Vec<u8>, max: usize) -> Result<(), String> {
    if buf.len() >= max {
        return Err("SOCKS5 message too long".to_owned());
    }
    let mut chunk = [0u8; 512];
    let room = (max - buf.len()).min(chunk.len());
    match tcp.read(&mut chunk[..room]).await {
        Ok(0) => Err("the client closed before its SOCKS5 request".to_owned()),
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            Ok(())
        }
        Err(e) => Err(e.to_string()),
    }
}

/// The first sentry, in config order, that takes the request: its stream, its address, and a
/// place among its relayed connections (its drain waits for this one). `Err(None)`: no
/// tunnel was up.
async fn open(
    shared: &Shared,
    request: &EgressRequest,
) -> Result<(TunnelStream, String, TaskTrackerToken), Option<EgressOpenError>> {
    let groups = lock(&shared.groups).clone();
    let mut last = None;
    for group in groups {
        if group.retire.is_cancelled() {
            continue;
        }
        let live = group.entries.iter().find_map(|entry| {
            let live = lock(&entry.live);
            live.as_ref()
                .map(|(live, _)| (live.clone(), entry.peer.address.clone()))
        });
        let Some((live, sentry)) = live else {
            continue;
        };
        match live.open_egress(request).await {
            Ok(stream) => return Ok((stream, sentry, group.relays.token())),
            Err(e) => {
                debug!(%sentry, destination = %request.destination, "egress: {e}");
                let next = e.try_next();
                last = Some(e);
                if !next {
                    break;
                }
            }
        }
    }
    Err(last)
}

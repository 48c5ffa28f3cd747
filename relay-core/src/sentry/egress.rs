//! Egress on the sentry: an agent's node dials out, and the connection leaves from here.
//!
//! The agent asks (an [`EgressRequest`] on a stream it opened); the sentry decides, in this
//! order, before any packet leaves: the agent has `egress = true`; an address passes the
//! policy ([`check_destination`]: deny, the always-refused ranges and this host's own
//! addresses, allow, ports); the agent is under its `max_connections` and `connect_rate`; a
//! name resolves, and an address it resolves to passes the policy. Only then is it dialed (from `[egress] source` when set), and the agent
//! told [`EgressStatus::Ok`]. Every refusal is counted by reason and logged rate-limited; an
//! agent sees only the status, never why.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::io::AsyncWriteExt;
use tracing::{debug, info, warn};

use super::Shared;
use crate::admission::{EgressGate, EgressRefusal, check_destination};
use crate::config::{Destination, EgressPolicy, SentryConfig};
use crate::log_limit::LogLimit;
use crate::metrics::Families;
use crate::relay::{ByteCounters, EgressRequest, EgressStatus};
use crate::transport::TunnelStream;
use crate::transport::egress::EGRESS_CONNECT_TIMEOUT;
use crate::{clock, lock, net};

/// Longest an agent may take to send its whole request on a new egress stream.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Addresses of one name dialed, at most.
const MAX_CANDIDATES: usize = 8;
/// How long the list of this host's own addresses is reused: reading it is a netlink dump,
/// which cost a churn of egress connections a tenth of its rate when done for each.
const OWN_FOR: Duration = Duration::from_secs(1);

static REFUSED_LOG: LogLimit = LogLimit::new(Duration::from_secs(10));

/// Egress state: the policy in force, and each agent's allowance and counters.
pub(super) struct Egress {
    policy: ArcSwap<EgressPolicy>,
    /// This host's addresses, and when they were read (see [`OWN_FOR`]).
    own: Mutex<Option<(Instant, Arc<Vec<IpAddr>>)>>,
    /// Agents allowed egress now.
    allowed: ArcSwap<Vec<String>>,
    /// Per agent that ever asked (or is allowed), kept across reloads for its counters.
    agents: Mutex<HashMap<String, Arc<AgentEgress>>>,
}

/// One agent's egress allowance and what it did.
pub(super) struct AgentEgress {
    pub(super) gate: EgressGate,
    pub(super) refused: [AtomicU64; EgressRefusal::ALL.len()],
    /// Connections dialed and relayed.
    pub(super) connected: AtomicU64,
    /// Destinations that refused, did not answer in time, or whose name did not resolve.
    pub(super) failed: AtomicU64,
    /// Requests that were not a valid egress request.
    pub(super) bad: AtomicU64,
    /// `up`: from the agent out to the destination; `down`: back.
    pub(super) bytes: ByteCounters,
}

impl Egress {
    pub(super) fn new(config: &SentryConfig) -> Self {
        let egress = Self {
            policy: ArcSwap::from_pointee(config.egress.clone()),
            own: Mutex::new(None),
            allowed: ArcSwap::default(),
            agents: Mutex::new(HashMap::new()),
        };
        egress.set_config(config);
        egress
    }

    /// Apply a (reloaded) config to later connections; open ones keep going.
    pub(super) fn set_config(&self, config: &SentryConfig) {
        let policy = &config.egress;
        if let Some(source) = policy.source
            && net::own_addresses().is_ok_and(|own| !own.contains(&source))
        {
            warn!(%source, "egress.source is not an address of this host: every egress connection will fail until it is");
        }
        let allowed: Vec<String> = config
            .agents
            .iter()
            .filter(|a| a.egress)
            .map(|a| a.name.clone())
            .collect();
        for agent in lock(&self.agents).values() {
            agent
                .gate
                .set_limits(policy.max_connections, policy.connect_rate);
        }
        for name in &allowed {
            self.agent(name);
        }
        self.policy.store(Arc::new(policy.clone()));
        self.allowed.store(Arc::new(allowed));
    }

    /// `name`'s allowance and counters (made on first use).
    pub(super) fn agent(&self, name: &str) -> Arc<AgentEgress> {
        let policy = self.policy.load();
        lock(&self.agents)
            .entry(name.to_owned())
            .or_insert_with(|| {
                Arc::new(AgentEgress {
                    gate: EgressGate::new(policy.max_connections, policy.connect_rate),
                    refused: Default::default(),
                    connected: AtomicU64::new(0),
                    failed: AtomicU64::new(0),
                    bad: AtomicU64::new(0),
                    bytes: ByteCounters::default(),
                })
            })
            .clone()
    }

    /// Every agent's counters, by name.
    pub(super) fn agents(&self) -> Vec<(String, Arc<AgentEgress>)> {
        let mut agents: Vec<_> = lock(&self.agents)
            .iter()
            .map(|(n, a)| (n.clone(), a.clone()))
            .collect();
        agents.sort_by(|a, b| a.0.cmp(&b.0));
        agents
    }

    fn allows(&self, agent: &str) -> bool {
        self.allowed.load().iter().any(|a| a == agent)
    }

    /// This host's addresses, read at most every [`OWN_FOR`].
    fn own_addresses(&self) -> std::io::Result<Arc<Vec<IpAddr>>> {
        let now = clock::now();
        let mut own = lock(&self.own);
        if let Some((at, list)) = own.as_ref()
            && now.duration_since(*at) < OWN_FOR
        {
            return Ok(list.clone());
        }
        let list = Arc::new(net::own_addresses()?);
        *own = Some((now, list.clone()));
        Ok(list)
    }

    /// The egress families of `/metrics`, per agent allowed egress or that asked for it.
    pub(super) fn collect(&self, out: &mut Families<'_>) -> std::fmt::Result {
        let agents = self.agents();
        let label = |name: &str| [("agent", name.to_owned())];
        out.counters(
            "egress_connections",
            "Outbound connections an agent's node made through this sentry (dialed and \
             relayed).",
            agents
                .iter()
                .map(|(n, a)| (label(n), a.connected.load(Ordering::Relaxed))),
        )?;
        out.gauges(
            "egress_active",
            "Outbound connections of an agent open now: at most [egress] max_connections.",
            agents
                .iter()
                .map(|(n, a)| (label(n), i64::try_from(a.gate.active()).unwrap_or(i64::MAX))),
        )?;
        out.counters(
            "egress_refused",
            "Outbound connections refused before any packet left, by reason: the agent has no \
             egress = true, its cap or rate, or the destination by policy (a private range, \
             this host's own address, deny, allow, ports).",
            agents.iter().flat_map(|(n, a)| {
                EgressRefusal::ALL
                    .iter()
                    .map(|r| {
                        (
                            [("agent", n.clone()), ("reason", r.as_str().to_owned())],
                            a.refused[r.index()].load(Ordering::Relaxed),
                        )
                    })
                    .collect::<Vec<_>>()
            }),
        )?;
        out.counters(
            "egress_connect_failed",
            "Outbound connections allowed but not made: the destination refused or did not \
             answer, or its name did not resolve.",
            agents
                .iter()
                .map(|(n, a)| (label(n), a.failed.load(Ordering::Relaxed))),
        )?;
        out.counters(
            "egress_bad_requests",
            "Egress streams whose request could not be read (a misbehaving agent).",
            agents
                .iter()
                .map(|(n, a)| (label(n), a.bad.load(Ordering::Relaxed))),
        )?;
        out.counters(
            "egress_bytes",
            "Bytes of outbound connections: up from the agent to the destination, down back.",
            agents.iter().flat_map(|(n, a)| {
                [
                    (
                        [("agent", n.clone()), ("direction", "up".to_owned())],
                        a.bytes.up.load(Ordering::Relaxed),
                    ),
                    (
                        [("agent", n.clone()), ("direction", "down".to_owned())],
                        a.bytes.down.load(Ordering::Relaxed),
                    ),
                ]
            }),
        )
    }
}

/// Serve one egress stream `agent` opened: read its request, decide, dial, relay.
pub(super) async fn serve(shared: Arc<Shared>, agent: String, mut stream: TunnelStream) {
    let egress = &shared.egress;
    let stats = egress.agent(&agent);
    let request = tokio::time::timeout(REQUEST_TIMEOUT, EgressRequest::read_from(&mut stream));
    let destination = match request.await {
        Ok(Ok(request)) => request.destination,
        Ok(Err(e)) => {
            stats.bad.fetch_add(1, Ordering::Relaxed);
            debug!(%agent, "bad egress request: {e}");
            answer(&mut stream, EgressStatus::BadRequest).await;
            return;
        }
        Err(_) => {
            stream.abort();
            return;
        }
    };
    if shared.stop.is_cancelled() {
        answer(&mut stream, EgressStatus::ShuttingDown).await;
        return;
    }
    let refuse = |reason: EgressRefusal| {
        stats.refused[reason.index()].fetch_add(1, Ordering::Relaxed);
        if let Some(suppressed) = REFUSED_LOG.allow() {
            info!(%agent, %destination, reason = reason.as_str(), suppressed, "egress refused");
        }
        match reason {
            EgressRefusal::AgentNotAllowed => EgressStatus::NotAllowed,
            EgressRefusal::MaxConnections | EgressRefusal::Rate => EgressStatus::Busy,
            _ => EgressStatus::Refused,
        }
    };
    if !egress.allows(&agent) {
        answer(&mut stream, refuse(EgressRefusal::AgentNotAllowed)).await;
        return;
    }
    let policy = egress.policy.load_full();
    // An address is judged before it costs the agent any of its rate; a name only once
    // resolved, which the rate bounds.
    let checked = match &destination {
        Destination::Addr(addr) => match admitted(&policy, egress.own_addresses(), &[*addr]) {
            Ok(allowed) => Some(allowed),
            Err(reason) => {
                answer(&mut stream, refuse(reason)).await;
                return;
            }
        },
        Destination::Name(..) => None,
    };
    let _permit = match stats.gate.admit(clock::now() - shared.epoch) {
        Ok(permit) => permit,
        Err(reason) => {
            answer(&mut stream, refuse(reason)).await;
            return;
        }
    };
    let allowed = match checked {
        Some(allowed) => allowed,
        None => {
            let candidates = match resolve(&destination).await {
                Ok(candidates) => candidates,
                Err(why) => {
                    stats.failed.fetch_add(1, Ordering::Relaxed);
                    debug!(%agent, %destination, "egress: {why}");
                    answer(&mut stream, EgressStatus::ConnectFailed).await;
                    return;
                }
            };
            match admitted(&policy, egress.own_addresses(), &candidates) {
                Ok(allowed) => allowed,
                Err(reason) => {
                    answer(&mut stream, refuse(reason)).await;
                    return;
                }
            }
        }
    };
    let mut tcp = match dial(&allowed, policy.source).await {
        Ok(tcp) => tcp,
        Err(e) => {
            stats.failed.fetch_add(1, Ordering::Relaxed);
            debug!(%agent, %destination, "egress connect failed: {e}");
            let status = if e.kind() == std::io::ErrorKind::ConnectionRefused {
                EgressStatus::ConnectRefused
            } else {
                EgressStatus::ConnectFailed
            };
            answer(&mut stream, status).await;
            return;
        }
    };
    let _ = tcp.set_nodelay(true);
    // A destination that stops reading holds this stream's tunnel credit: it is shed as a
    // stalled client would be, the address holding the most first.
    if let Ok(peer) = tcp.peer_addr() {
        stream.set_client(peer.ip());
    }
    if stream.write_all(&[EgressStatus::Ok as u8]).await.is_err() || stream.flush().await.is_err() {
        return;
    }
    stats.connected.fetch_add(1, Ordering::Relaxed);
    let (end, moved) = stream
        .relay_tcp(&mut tcp, policy.idle_timeout, &stats.bytes)
        .await;
    debug!(%agent, %destination, up = moved.up, down = moved.down, ?end, "egress connection closed");
}

/// The addresses of a destination: itself, or what its name resolves to (at most
/// [`MAX_CANDIDATES`]).
async fn resolve(destination: &Destination) -> Result<Vec<SocketAddr>, String> {
    match destination {
        Destination::Addr(addr) => Ok(vec![*addr]),
        Destination::Name(name, port) => {
            let lookup = tokio::net::lookup_host((name.as_str(), *port));
            let addrs: Vec<SocketAddr> = tokio::time::timeout(EGRESS_CONNECT_TIMEOUT, lookup)
                .await
                .map_err(|_| format!("resolving {name} timed out"))?
                .map_err(|e| format!("resolving {name}: {e}"))?
                .take(MAX_CANDIDATES)
                .collect();
            if addrs.is_empty() {
                return Err(format!("{name} resolved to no address"));
            }
            Ok(addrs)
        }
    }
}

/// The candidates the policy allows, in order; if none, why the first was refused. Every
/// address dialed is checked here, after resolution: a name cannot smuggle a private
/// address past the policy.
fn admitted(
    policy: &EgressPolicy,
    own: std::io::Result<Arc<Vec<IpAddr>>>,
    candidates: &[SocketAddr],
) -> Result<Vec<SocketAddr>, EgressRefusal> {
    let own = match own {
        Ok(own) => own,
        Err(e) => {
            // Without the list, every address counts as our own: refuse rather than guess.
            warn!("cannot list this host's addresses, refusing egress: {e}");
            return Err(EgressRefusal::OwnAddress);
        }
    };
    let is_own = |ip: IpAddr| own.contains(&ip);
    let mut first_refusal = None;
    let allowed: Vec<SocketAddr> = candidates
        .iter()
        .filter(
            |addr| match check_destination(policy, addr.ip(), addr.port(), is_own) {
                Ok(()) => true,
                Err(reason) => {
                    first_refusal.get_or_insert(reason);
                    false
                }
            },
        )
        .copied()
        .collect();
    match (allowed.is_empty(), first_refusal) {
        (true, Some(reason)) => Err(reason),
        _ => Ok(allowed),
    }
}

/// Dial the allowed addresses in turn within [`EGRESS_CONNECT_TIMEOUT`] in all; the last
/// error if none answers.
async fn dial(
    allowed: &[SocketAddr],
    source: Option<IpAddr>,
) -> std::io::Result<tokio::net::TcpStream> {
    let deadline = clock::now() + EGRESS_CONNECT_TIMEOUT;
    let mut last = std::io::Error::from(std::io::ErrorKind::AddrNotAvailable);
    for addr in allowed {
        // A source of the other family than the destination cannot be used for it.
        let source = source.filter(|s| s.is_ipv4() == addr.is_ipv4());
        let left = deadline.saturating_duration_since(clock::now());
        if left.is_zero() {
            break;
        }
        match net::connect_from(source, *addr, left).await {
            Ok(tcp) => return Ok(tcp),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// Answer a request with a refusal and end the stream.
async fn answer(stream: &mut TunnelStream, status: EgressStatus) {
    if stream.write_all(&[status as u8]).await.is_ok() {
        let _ = stream.shutdown().await;
    }
}

//! The TCP+TLS transport, for networks that block or throttle UDP.
//!
//! Every relayed connection gets a TCP connection of its own, so a slow or lossy one never
//! holds up another (no head-of-line blocking between them), as with QUIC streams. The agent
//! dials all of them, so it still opens no port:
//!
//! - one **control** connection per tunnel. It is the tunnel (up while it is), carries
//!   keep-alives both ways (RTT, liveness), and lets the sentry ask for more data connections.
//! - a pool of **data** connections, pre-opened by the agent and held by the sentry until a
//!   client needs one. The sentry then sends [`GO`] and the relay header, and the agent
//!   answers the status byte as over QUIC. Each carries one relayed connection and closes
//!   with it (TLS `close_notify` is the half-close). The agent opens a replacement as soon as
//!   one is taken, and more when the sentry asks because a burst emptied its pool.
//!
//! Both kinds authenticate by pinned keys exactly as over QUIC ([`super::pin`]), TLS 1.3
//! only, under their own ALPN. Data connections resume the TLS session (one ticket per
//! connection), so a replacement costs no certificate signature. TCP keep-alive on every
//! connection keeps NAT mappings open and notices a dead peer while a connection sits in a
//! pool; a user timeout does the same while data is in flight.
//!
//! Wire form after the handshake: the agent sends one [`Role`] byte. On a control
//! connection, 5-byte [`Frame`]s follow both ways: `op:u8 value:u32` (big-endian). The sentry
//! sends the first frame (a ping) at once, so the agent knows its key was accepted (in TLS 1.3
//! the client finishes its handshake before the server has checked the client certificate).

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::client::Resumption;
use rustls::pki_types::ServerName;
use rustls::server::ServerSessionMemoryCache;
use socket2::{SockRef, TcpKeepalive};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{Notify, mpsc, oneshot};

use super::pin::{self, IdentityError, SERVER_NAME, TLS_ALPN};
use super::quic;
use crate::keys::{PrivateKey, PublicKey};
use crate::{clock, lock};

/// A TLS connection of the tunnel, from either side.
pub type TlsIo = tokio_rustls::TlsStream<TcpStream>;

/// Idle data connections the agent keeps open toward each sentry.
pub(crate) const POOL_IDLE: usize = 4;
/// Most idle data connections a sentry holds per agent (the oldest is closed past it), and
/// the most an agent keeps open per sentry however often it is asked.
pub(crate) const MAX_POOLED: usize = 256;
/// Most data connections one `WANT` frame asks for.
pub(crate) const MAX_WANT: u32 = 64;
/// Keep-alive and liveness of the control connection: as over QUIC.
pub(crate) const KEEP_ALIVE: Duration = quic::KEEP_ALIVE;
pub(crate) const IDLE_TIMEOUT: Duration = quic::IDLE_TIMEOUT;
/// TCP keep-alive: first probe after this much silence, then every [`TCP_KEEPALIVE_INTERVAL`],
/// given up after [`TCP_KEEPALIVE_RETRIES`] unanswered (a dead pooled connection is noticed
/// within 25 s; common NATs keep idle TCP mappings for minutes).
const TCP_KEEPALIVE_IDLE: Duration = Duration::from_secs(10);
const TCP_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
const TCP_KEEPALIVE_RETRIES: u32 = 3;
/// Sent data unacknowledged this long fails the connection (`TCP_USER_TIMEOUT`).
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(30);
/// TLS sessions the sentry remembers for resumption, across all agents.
const SERVER_SESSIONS: usize = 4096;
/// Resumption tickets an agent keeps per sentry: enough for a burst of data connections
/// opened at once ([`MAX_WANT`] and more) to all resume.
const CLIENT_TICKETS: usize = 256;
/// Tickets the sentry issues per connection: more than one is used, so the agent's supply
/// grows back after a burst.
const TICKETS_PER_CONNECTION: usize = 2;
/// The byte a sentry sends on a pooled data connection to put it to use; the relay header
/// follows.
pub const GO: u8 = b'G';

/// What a new connection is for; the agent's first byte after the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Role {
    Control = b'C',
    Data = b'D',
    /// An egress connection: the agent's egress request follows, then the sentry's answer.
    Egress = b'E',
}

impl Role {
    #[must_use]
    pub const fn from_byte(byte: u8) -> Option<Self> {
        match byte {
            b'C' => Some(Self::Control),
            b'D' => Some(Self::Data),
            b'E' => Some(Self::Egress),
            _ => None,
        }
    }
}

/// One message on a control connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame {
    /// Sentry to agent: open this many more data connections.
    Want(u32),
    /// Either way: answer with a `Pong` carrying the same token.
    Ping(u32),
    Pong(u32),
}

impl Frame {
    /// Every frame is this long.
    pub const LEN: usize = 5;

    #[must_use]
    pub fn encode(self) -> [u8; Self::LEN] {
        let (op, value) = match self {
            Self::Want(n) => (1, n),
            Self::Ping(t) => (2, t),
            Self::Pong(t) => (3, t),
        };
        let mut out = [op, 0, 0, 0, 0];
        out[1..].copy_from_slice(&value.to_be_bytes());
        out
    }

    /// `None` for an unknown op code.
    #[must_use]
    pub fn decode(bytes: [u8; Self::LEN]) -> Option<Self> {
        let value = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]);
        match bytes[0] {
            1 => Some(Self::Want(value)),
            2 => Some(Self::Ping(value)),
            3 => Some(Self::Pong(value)),
            _ => None,
        }
    }
}

/// The sentry's TLS settings for `tls_listen`: pinned agent keys (key → name), resumption.
pub fn server_config(
    key: &PrivateKey,
    agents: HashMap<PublicKey, String>,
) -> Result<Arc<rustls::ServerConfig>, IdentityError> {
    let mut tls = pin::server_tls(key, agents, TLS_ALPN)?;
    // A fresh cache per config: a reload that unpins a key also forgets its sessions.
    tls.session_storage = ServerSessionMemoryCache::new(SERVER_SESSIONS);
    tls.send_tls13_tickets = TICKETS_PER_CONNECTION;
    Ok(Arc::new(tls))
}

/// The agent's TLS settings toward a sentry pinned as `pin`.
pub fn client_config(
    key: &PrivateKey,
    pin: PublicKey,
) -> Result<Arc<rustls::ClientConfig>, IdentityError> {
    let mut tls = pin::client_tls(key, pin, TLS_ALPN)?;
    tls.resumption = Resumption::store(Arc::new(Tickets::default()));
    Ok(Arc::new(tls))
}

/// The agent's resumption tickets toward one sentry (a client config serves one sentry, and
/// every connection uses the same server name). rustls' own cache keeps 8 per server name, so
/// a burst of data connections opened at once did full handshakes past the eighth (a quarter
/// of them under connection churn, measured with `sentry_tunnel_tls_handshakes_total`).
#[derive(Debug, Default)]
struct Tickets {
    tls13: Mutex<VecDeque<rustls::client::Tls13ClientSessionValue>>,
    kx_hint: Mutex<Option<rustls::NamedGroup>>,
}

impl rustls::client::ClientSessionStore for Tickets {
    fn set_kx_hint(&self, _: ServerName<'static>, group: rustls::NamedGroup) {
        *lock(&self.kx_hint) = Some(group);
    }

    fn kx_hint(&self, _: &ServerName<'_>) -> Option<rustls::NamedGroup> {
        *lock(&self.kx_hint)
    }

    // TLS 1.2 is never negotiated (TLS 1.3 only).
    fn set_tls12_session(
        &self,
        _: ServerName<'static>,
        _: rustls::client::Tls12ClientSessionValue,
    ) {
    }

    fn tls12_session(&self, _: &ServerName<'_>) -> Option<rustls::client::Tls12ClientSessionValue> {
        None
    }

    fn remove_tls12_session(&self, _: &ServerName<'static>) {}

    fn insert_tls13_ticket(
        &self,
        _: ServerName<'static>,
        value: rustls::client::Tls13ClientSessionValue,
    ) {
        let mut tickets = lock(&self.tls13);
        if tickets.len() >= CLIENT_TICKETS {
            tickets.pop_front();
        }
        tickets.push_back(value);
    }

    fn take_tls13_ticket(
        &self,
        _: &ServerName<'static>,
    ) -> Option<rustls::client::Tls13ClientSessionValue> {
        // The newest first: the oldest are the likeliest to have left the sentry's cache.
        lock(&self.tls13).pop_back()
    }
}

/// No Nagle delay, TCP keep-alive and a user timeout on a tunnel connection. Failures leave
/// the kernel defaults, which work, only slower to notice a dead peer.
pub(crate) fn tune(tcp: &TcpStream) {
    let _ = tcp.set_nodelay(true);
    let socket = SockRef::from(tcp);
    let keepalive = TcpKeepalive::new()
        .with_time(TCP_KEEPALIVE_IDLE)
        .with_interval(TCP_KEEPALIVE_INTERVAL)
        .with_retries(TCP_KEEPALIVE_RETRIES);
    let _ = socket.set_tcp_keepalive(&keepalive);
    let _ = socket.set_tcp_user_timeout(Some(TCP_USER_TIMEOUT));
}

/// Connect to a sentry's `tls_listen` at `remote` and announce `role`.
///
/// # Errors
/// TCP or TLS failed. A sentry that refuses the agent's key is noticed only at the first
/// read (see the module documentation).
pub async fn connect(
    remote: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    role: Role,
) -> io::Result<TlsIo> {
    let tcp = TcpStream::connect(remote).await?;
    tune(&tcp);
    let name = ServerName::try_from(SERVER_NAME).map_err(io::Error::other)?;
    let mut tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await?;
    tls.write_all(&[role as u8]).await?;
    tls.flush().await?;
    Ok(tls.into())
}

/// The pinned key the peer of a TLS connection authenticated with.
#[must_use]
pub fn peer_key(io: &TlsIo) -> Option<PublicKey> {
    let (_, conn) = io.get_ref();
    conn.peer_certificates()?.first().and_then(pin::peer_key)
}

/// Whether the handshake of `io` resumed an earlier session.
#[must_use]
pub fn resumed(io: &TlsIo) -> bool {
    let (_, conn) = io.get_ref();
    conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed)
}

/// One relayed connection over TLS, split so each direction is pumped on its own.
pub struct TlsRelay {
    pub(super) read: ReadHalf<TlsIo>,
    pub(super) write: WriteHalf<TlsIo>,
}

impl TlsRelay {
    #[must_use]
    pub fn new(io: TlsIo) -> Self {
        let (read, write) = tokio::io::split(io);
        Self { read, write }
    }
}

impl std::fmt::Debug for TlsRelay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsRelay").finish_non_exhaustive()
    }
}

impl AsyncRead for TlsRelay {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().read).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsRelay {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().write).poll_write(cx, data)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().write).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().write).poll_shutdown(cx)
    }
}

/// The sentry's idle data connections from one agent.
///
/// Each connection sits in a task of its own that watches it: an end of stream, an error
/// (a TCP keep-alive that went unanswered) or any byte (the agent sends none while pooled)
/// ends the task and closes it, so the pool never hands out a connection known dead.
#[derive(Default)]
pub(crate) struct Pool {
    idle: Mutex<VecDeque<Pooled>>,
    pushed: Notify,
}

/// A handle on a pooled connection's task: send it a reply channel to get the connection.
struct Pooled(oneshot::Sender<oneshot::Sender<TlsIo>>);

impl Pool {
    /// Hold `io` until it is taken or dies; past [`MAX_POOLED`] the oldest is closed.
    pub fn push(&self, io: TlsIo) {
        let (tx, rx) = oneshot::channel();
        tokio::spawn(hold(io, rx));
        let mut idle = lock(&self.idle);
        idle.retain(|p| !p.0.is_closed());
        if idle.len() >= MAX_POOLED {
            idle.pop_front();
        }
        idle.push_back(Pooled(tx));
        drop(idle);
        self.pushed.notify_one();
    }

    /// Close every idle connection (the agent's tunnel went away or was replaced).
    pub fn clear(&self) {
        lock(&self.idle).clear();
    }

    /// A live idle connection, the most recently pooled first, if there is one.
    pub(crate) async fn take_now(&self) -> Option<TlsIo> {
        loop {
            let pooled = lock(&self.idle).pop_back()?;
            let (tx, rx) = oneshot::channel();
            if pooled.0.send(tx).is_ok()
                && let Ok(io) = rx.await
            {
                return Some(io);
            }
        }
    }

    /// A live idle connection within `wait`; when none is idle now, `ask` is called once (to
    /// ask the agent for more).
    pub async fn take(&self, wait: Duration, ask: impl FnOnce()) -> Option<TlsIo> {
        let mut ask = Some(ask);
        let wait_for_one = async {
            loop {
                let pushed = self.pushed.notified();
                tokio::pin!(pushed);
                pushed.as_mut().enable();
                if let Some(io) = self.take_now().await {
                    return io;
                }
                if let Some(ask) = ask.take() {
                    ask();
                }
                pushed.await;
            }
        };
        tokio::time::timeout(wait, wait_for_one).await.ok()
    }
}

async fn hold(mut io: TlsIo, mut take: oneshot::Receiver<oneshot::Sender<TlsIo>>) {
    let mut byte = [0u8; 1];
    let taken = tokio::select! {
        biased;
        reply = &mut take => reply.ok(),
        // An end, an error, or a byte the agent should not have sent: done either way.
        _ = io.read(&mut byte) => None,
    };
    if let Some(reply) = taken {
        let _ = reply.send(io);
    }
}

/// One side's view of a control connection while it runs.
#[derive(Debug, Default)]
pub(crate) struct Control {
    /// Last measured round-trip time, in microseconds.
    rtt_micros: AtomicU64,
    /// The token of the ping in flight and when it was sent (microseconds since start).
    ping_token: AtomicU32,
    ping_sent: AtomicU64,
}

impl Control {
    /// The last measured round-trip time (zero before the first pong).
    #[must_use]
    pub fn rtt(&self) -> Duration {
        Duration::from_micros(self.rtt_micros.load(Ordering::Relaxed))
    }
}

/// Run a control connection until it fails, goes silent for [`IDLE_TIMEOUT`], or the peer
/// breaks the protocol; returns why it ended. Pings every [`KEEP_ALIVE`] (the first at
/// once), answers the peer's pings, sends a `WANT` for each count from `asks`, and hands the
/// peer's `WANT`s to `on_want`. `first` fires when the first frame arrives.
pub(crate) async fn run_control(
    io: TlsIo,
    control: &Control,
    mut asks: mpsc::Receiver<u32>,
    on_want: impl Fn(u32),
    first: Option<oneshot::Sender<()>>,
) -> String {
    let start = clock::now();
    let micros =
        move || u64::try_from(clock::now().duration_since(start).as_micros()).unwrap_or(u64::MAX);
    let (mut read, mut write) = tokio::io::split(io);
    let (pongs, mut pongs_out) = mpsc::channel::<u32>(16);
    let reader = async {
        let mut first = first;
        loop {
            let mut bytes = [0u8; Frame::LEN];
            match tokio::time::timeout(IDLE_TIMEOUT, read.read_exact(&mut bytes)).await {
                Err(_) => return format!("no frame from the peer within {IDLE_TIMEOUT:?}"),
                Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    return "closed by the peer".to_owned();
                }
                Ok(Err(e)) => return format!("reading: {e}"),
                Ok(Ok(_)) => {}
            }
            if let Some(first) = first.take() {
                let _ = first.send(());
            }
            match Frame::decode(bytes) {
                // A full queue means the writer is stuck; the liveness timeout handles it.
                Some(Frame::Ping(token)) => {
                    let _ = pongs.try_send(token);
                }
                Some(Frame::Pong(token)) => {
                    if token == control.ping_token.load(Ordering::Relaxed) {
                        let sent = control.ping_sent.load(Ordering::Relaxed);
                        control
                            .rtt_micros
                            .store(micros().saturating_sub(sent), Ordering::Relaxed);
                    }
                }
                Some(Frame::Want(n)) => on_want(n.min(MAX_WANT)),
                None => return format!("unknown control frame {:#04x}", bytes[0]),
            }
        }
    };
    let writer = async {
        let mut tick = tokio::time::interval(KEEP_ALIVE);
        let mut token = 0u32;
        loop {
            let frame = tokio::select! {
                _ = tick.tick() => {
                    token = token.wrapping_add(1);
                    control.ping_token.store(token, Ordering::Relaxed);
                    control.ping_sent.store(micros(), Ordering::Relaxed);
                    Frame::Ping(token)
                }
                Some(token) = pongs_out.recv() => Frame::Pong(token),
                Some(n) = asks.recv() => Frame::Want(n.min(MAX_WANT)),
            };
            let sent = async {
                write.write_all(&frame.encode()).await?;
                write.flush().await
            };
            if let Err(e) = sent.await {
                return format!("writing: {e}");
            }
        }
    };
    tokio::select! {
        why = reader => why,
        why = writer => why,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_unknown_ops_are_refused() {
        for frame in [
            Frame::Want(3),
            Frame::Ping(0),
            Frame::Pong(u32::MAX),
            Frame::Want(1 << 20),
        ] {
            assert_eq!(Frame::decode(frame.encode()), Some(frame));
        }
        assert_eq!(Frame::decode([0, 0, 0, 0, 1]), None);
        assert_eq!(Frame::decode([4, 0, 0, 0, 1]), None);
        assert_eq!(Role::from_byte(b'C'), Some(Role::Control));
        assert_eq!(Role::from_byte(b'D'), Some(Role::Data));
        assert_eq!(Role::from_byte(b'E'), Some(Role::Egress));
        assert_eq!(Role::from_byte(GO), None);
    }
}

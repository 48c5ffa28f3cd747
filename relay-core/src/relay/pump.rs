//! Moves bytes both ways between a client socket and a tunnel stream.
//!
//! Each direction reads into its own buffer and writes what it read before reading again,
//! so memory per connection is bounded by the two buffers and a slow reader slows its writer
//! (backpressure) instead of growing a queue. A buffer starts small (an idle P2P link should
//! not cost 128 KiB), doubles up to [`MAX_BUF`] while reads keep filling it, and goes back to
//! the small size once its direction has been quiet for [`SHRINK_AFTER`], so a connection
//! that carried a burst and went quiet does not keep the burst's buffers.
//!
//! End of stream in one direction is passed on as a half-close (`shutdown` of the writer) and
//! the other direction keeps flowing. The pump ends when both directions have finished, when
//! either fails, when neither moved a byte for the idle timeout, or when the tunnel shed the
//! stream because this side stopped reading it (the QUIC transport's flow-control budget).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::clock;

/// First buffer size of each direction: what an idle connection holds per direction. Small
/// messages fit (a CometBFT frame is about 1 KiB; a larger one doubles it on the first read).
/// Was 4 KiB: an idle relayed connection then cost 6 KiB more per end (benches/README.md).
const MIN_BUF: usize = 1024;
/// Largest buffer of each direction; large enough that bulk transfers cost few syscalls.
const MAX_BUF: usize = 256 * 1024;
/// A direction quiet this long gives its grown buffer back.
const SHRINK_AFTER: Duration = Duration::from_secs(1);

/// Bytes moved by a pump.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PumpStats {
    /// Client to tunnel.
    pub up: u64,
    /// Tunnel to client.
    pub down: u64,
}

/// Totals that pumps add to as bytes move (per route or per service), so a scrape sees a
/// long-lived connection's traffic while it runs, not only when it closes.
#[derive(Debug, Default)]
pub struct ByteCounters {
    /// From the pump's client-side socket into the tunnel (as [`PumpStats::up`]): on the
    /// sentry, from the public client; on the agent, from the service.
    pub up: AtomicU64,
    /// From the tunnel out to the client-side socket.
    pub down: AtomicU64,
}

/// How a pump ended.
#[derive(Debug)]
pub enum PumpEnd {
    /// Both directions reached end of stream and were half-closed in turn.
    Done,
    /// Neither direction moved a byte for the idle timeout.
    Idle,
    /// The client side failed (read or write).
    ClientError(std::io::Error),
    /// The tunnel side failed (read or write, including a reset stream).
    TunnelError(std::io::Error),
    /// The tunnel took the stream's credit back: its reader (this pump, held up by a client
    /// or service that stopped reading) did not read it.
    Shed,
}

enum Side {
    Client,
    Tunnel,
}

/// Pump until both directions finish, one fails, `idle` passes without traffic, or `shed`
/// (the tunnel stream's signal that its credit was taken back; pending forever for a
/// stream that has none) resolves.
///
/// The streams are borrowed so that the caller can reset a tunnel stream after an error
/// (dropping a QUIC send stream would finish it cleanly, telling the peer all is well).
pub async fn pump<CR, CW, TR, TW>(
    client_read: &mut CR,
    client_write: &mut CW,
    tunnel_read: &mut TR,
    tunnel_write: &mut TW,
    idle: Duration,
    totals: &ByteCounters,
    shed: impl Future<Output = ()>,
) -> (PumpEnd, PumpStats)
where
    CR: AsyncRead + Unpin + ?Sized,
    CW: AsyncWrite + Unpin + ?Sized,
    TR: AsyncRead + Unpin + ?Sized,
    TW: AsyncWrite + Unpin + ?Sized,
{
    let start = clock::now();
    let last = AtomicU64::new(0);
    let up = AtomicU64::new(0);
    let down = AtomicU64::new(0);
    let directions = async {
        tokio::try_join!(
            one_way(
                client_read,
                tunnel_write,
                (Side::Client, Side::Tunnel),
                start,
                &last,
                (&up, &totals.up)
            ),
            one_way(
                tunnel_read,
                client_write,
                (Side::Tunnel, Side::Client),
                start,
                &last,
                (&down, &totals.down)
            ),
        )
    };
    let end = tokio::select! {
        result = directions => match result {
            Ok(_) => PumpEnd::Done,
            Err((Side::Client, e)) => PumpEnd::ClientError(e),
            Err((Side::Tunnel, e)) => PumpEnd::TunnelError(e),
        },
        () = idle_watch(start, &last, idle) => PumpEnd::Idle,
        () = shed => PumpEnd::Shed,
    };
    let stats = PumpStats {
        up: up.load(Ordering::Relaxed),
        down: down.load(Ordering::Relaxed),
    };
    (end, stats)
}

async fn one_way<R, W>(
    reader: &mut R,
    writer: &mut W,
    (read_side, write_side): (Side, Side),
    start: Instant,
    last: &AtomicU64,
    (moved, total): (&AtomicU64, &AtomicU64),
) -> Result<(), (Side, std::io::Error)>
where
    R: AsyncRead + Unpin + ?Sized,
    W: AsyncWrite + Unpin + ?Sized,
{
    let mut buf = vec![0u8; MIN_BUF];
    loop {
        let read = if buf.len() > MIN_BUF {
            // `read` is cancel-safe: nothing is consumed unless it completes.
            match tokio::time::timeout(SHRINK_AFTER, reader.read(&mut buf)).await {
                Ok(read) => read,
                Err(_) => {
                    buf = vec![0u8; MIN_BUF];
                    continue;
                }
            }
        } else {
            reader.read(&mut buf).await
        };
        let n = match read {
            Ok(n) => n,
            Err(e) => return Err((read_side, e)),
        };
        if n == 0 {
            return writer.shutdown().await.map_err(|e| (write_side, e));
        }
        // Flushed before the next read may wait: a TLS writer holds records back until then.
        let written = async {
            writer.write_all(&buf[..n]).await?;
            writer.flush().await
        };
        if let Err(e) = written.await {
            return Err((write_side, e));
        }
        moved.fetch_add(n as u64, Ordering::Relaxed);
        total.fetch_add(n as u64, Ordering::Relaxed);
        last.store(millis_since(start), Ordering::Relaxed);
        if n == buf.len() && buf.len() < MAX_BUF {
            buf.resize(buf.len() * 2, 0);
        }
    }
}

/// Returns once `last` (milliseconds since `start`, moved on by each transfer) stays unchanged
/// for `idle`.
pub(crate) async fn idle_watch(start: Instant, last: &AtomicU64, idle: Duration) {
    loop {
        let last_ms = last.load(Ordering::Relaxed);
        let deadline = start + Duration::from_millis(last_ms) + idle;
        tokio::time::sleep_until(deadline.into()).await;
        if last.load(Ordering::Relaxed) == last_ms {
            return;
        }
    }
}

/// Milliseconds from `start` to now, for [`idle_watch`]'s `last`.
pub(crate) fn millis_since(start: Instant) -> u64 {
    u64::try_from(clock::now().duration_since(start).as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::duplex;

    /// A burst grows a direction's buffer; the quiet period that follows shrinks it (the read
    /// it cancels must lose nothing); the next burst arrives whole and in order.
    #[tokio::test(start_paused = true)]
    async fn bursts_across_quiet_periods_arrive_whole() {
        let (mut client_app, client_end) = duplex(MAX_BUF);
        let (tunnel_end, mut agent_app) = duplex(MAX_BUF);
        let (mut cr, mut cw) = tokio::io::split(client_end);
        let (mut tr, mut tw) = tokio::io::split(tunnel_end);
        let pump = tokio::spawn(async move {
            let totals = ByteCounters::default();
            pump(
                &mut cr,
                &mut cw,
                &mut tr,
                &mut tw,
                Duration::from_secs(600),
                &totals,
                std::future::pending(),
            )
            .await
        });
        let mut expected = Vec::new();
        for burst in 0..3u32 {
            let payload: Vec<u8> = (0..200_000u32)
                .map(|i| (i.wrapping_mul(7).wrapping_add(burst) % 251) as u8)
                .collect();
            client_app.write_all(&payload).await.unwrap();
            let mut got = vec![0u8; payload.len()];
            agent_app.read_exact(&mut got).await.unwrap();
            assert!(got == payload, "burst {burst} came through altered");
            expected.extend(payload);
            tokio::time::sleep(SHRINK_AFTER * 3).await;
        }
        client_app.shutdown().await.unwrap();
        agent_app.shutdown().await.unwrap();
        let (end, stats) = pump.await.unwrap();
        assert!(matches!(end, PumpEnd::Done), "{end:?}");
        assert_eq!(stats.up, expected.len() as u64);
    }

    #[tokio::test]
    async fn moves_both_ways_and_half_closes() {
        let (mut client_app, client_end) = duplex(1024);
        let (tunnel_end, mut agent_app) = duplex(1024);
        let (mut cr, mut cw) = tokio::io::split(client_end);
        let (mut tr, mut tw) = tokio::io::split(tunnel_end);
        let pump = tokio::spawn(async move {
            let totals = ByteCounters::default();
            let result = pump(
                &mut cr,
                &mut cw,
                &mut tr,
                &mut tw,
                Duration::from_secs(60),
                &totals,
                std::future::pending(),
            )
            .await;
            assert_eq!(totals.up.load(Ordering::Relaxed), result.1.up);
            assert_eq!(totals.down.load(Ordering::Relaxed), result.1.down);
            result
        });
        let payload: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let send = payload.clone();
        let writer = tokio::spawn(async move {
            client_app.write_all(&send).await.unwrap();
            client_app.shutdown().await.unwrap();
            // The reverse direction still flows after our half-close.
            let mut back = Vec::new();
            client_app.read_to_end(&mut back).await.unwrap();
            back
        });
        let mut got = Vec::new();
        agent_app.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, payload);
        agent_app
            .write_all(b"reply after half-close")
            .await
            .unwrap();
        agent_app.shutdown().await.unwrap();
        assert_eq!(writer.await.unwrap(), b"reply after half-close");
        let (end, stats) = pump.await.unwrap();
        assert!(matches!(end, PumpEnd::Done), "{end:?}");
        assert_eq!(
            stats,
            PumpStats {
                up: 100_000,
                down: 22
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn idle_timeout_ends_a_silent_pump() {
        let (_client_app, client_end) = duplex(64);
        let (tunnel_end, _agent_app) = duplex(64);
        let (mut cr, mut cw) = tokio::io::split(client_end);
        let (mut tr, mut tw) = tokio::io::split(tunnel_end);
        let totals = ByteCounters::default();
        let (end, _) = pump(
            &mut cr,
            &mut cw,
            &mut tr,
            &mut tw,
            Duration::from_secs(5),
            &totals,
            std::future::pending(),
        )
        .await;
        assert!(matches!(end, PumpEnd::Idle), "{end:?}");
    }
}

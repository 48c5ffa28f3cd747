//! One client connection's timer: its sleeps reuse one tokio timer entry.
//!
//! A keep-alive connection arms two deadlines per request: hyper's for the next request
//! head, and the gateway's for the node's answer. A fresh `tokio::time::Sleep` each time
//! costs a registration and a removal in the runtime's timer wheel, under its lock. A sleep
//! taken from here is the connection's previous one with its deadline moved later, which is
//! one atomic operation while the old deadline has not passed; dropped, it goes back for the
//! next one.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::time::Sleep;

use crate::{clock, lock};

/// The reusable sleeps of one connection (two are in use at most: hyper's and the
/// gateway's), shared by its clones.
#[derive(Clone, Default)]
pub(in crate::sentry) struct ConnectionTimer {
    spare: Arc<Mutex<Vec<Pin<Box<Sleep>>>>>,
}

/// Sleeps kept for reuse per connection.
const SPARE: usize = 2;

impl ConnectionTimer {
    /// A sleep until `deadline`.
    pub(in crate::sentry) fn reused_until(&self, deadline: Instant) -> ReusedSleep {
        let deadline = tokio::time::Instant::from_std(deadline);
        // The spare whose deadline is latest but not after this one: moving it later is the
        // cheap case. Hyper's short deadline and the gateway's long one each find their own.
        // Moving one earlier would cost as much as a new one.
        let fitting = {
            let mut spare = lock(&self.spare);
            spare
                .iter()
                .enumerate()
                .filter(|(_, sleep)| sleep.deadline() <= deadline)
                .max_by_key(|(_, sleep)| sleep.deadline())
                .map(|(i, _)| i)
                .map(|i| spare.swap_remove(i))
        };
        let sleep = match fitting {
            Some(mut sleep) => {
                sleep.as_mut().reset(deadline);
                sleep
            }
            None => Box::pin(tokio::time::sleep_until(deadline)),
        };
        ReusedSleep {
            sleep: Some(sleep),
            home: self.spare.clone(),
        }
    }
}

/// A sleep from a [`ConnectionTimer`]; it goes back there when dropped.
pub(in crate::sentry) struct ReusedSleep {
    sleep: Option<Pin<Box<Sleep>>>,
    home: Arc<Mutex<Vec<Pin<Box<Sleep>>>>>,
}

impl ReusedSleep {
    fn reset(&mut self, deadline: Instant) {
        if let Some(sleep) = &mut self.sleep {
            sleep
                .as_mut()
                .reset(tokio::time::Instant::from_std(deadline));
        }
    }
}

impl Future for ReusedSleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        match &mut self.sleep {
            Some(sleep) => sleep.as_mut().poll(cx),
            None => Poll::Ready(()),
        }
    }
}

impl Drop for ReusedSleep {
    fn drop(&mut self) {
        if let Some(sleep) = self.sleep.take() {
            let mut spare = lock(&self.home);
            if spare.len() < SPARE {
                spare.push(sleep);
            }
        }
    }
}

impl hyper::rt::Sleep for ReusedSleep {}

impl hyper::rt::Timer for ConnectionTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(self.reused_until(clock::now() + duration))
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(self.reused_until(deadline))
    }

    fn now(&self) -> Instant {
        clock::now()
    }

    fn reset(&self, sleep: &mut Pin<Box<dyn hyper::rt::Sleep>>, new_deadline: Instant) {
        match sleep.as_mut().downcast_mut_pin::<ReusedSleep>() {
            // Not moved by the reset: the sleep stays where it is pinned.
            Some(reused) => reused.get_mut().reset(new_deadline),
            None => *sleep = hyper::rt::Timer::sleep_until(self, new_deadline),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::Full;
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn fired(sleep: &mut ReusedSleep) -> bool {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        Pin::new(sleep).poll(&mut cx).is_ready()
    }

    #[tokio::test(start_paused = true)]
    async fn a_reused_sleep_fires_at_its_new_deadline_and_not_at_the_old_one() {
        let timer = ConnectionTimer::default();
        let start = clock::now();
        let mut first = timer.reused_until(start + Duration::from_secs(10));
        assert!(!fired(&mut first), "registered, not due");
        drop(first);
        assert_eq!(lock(&timer.spare).len(), 1, "kept for the next one");

        // Moved later while registered: the old deadline passes quietly.
        let mut later = timer.reused_until(start + Duration::from_secs(20));
        assert_eq!(lock(&timer.spare).len(), 0, "taken, not created");
        tokio::time::sleep(Duration::from_secs(15)).await;
        assert!(!fired(&mut later), "the old deadline does not fire it");
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert!(fired(&mut later), "the new one does");
        drop(later);

        // After it fired, an earlier-than-ever deadline still holds.
        let mut again = timer.reused_until(clock::now() + Duration::from_secs(1));
        assert!(!fired(&mut again));
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert!(fired(&mut again));
    }

    #[tokio::test(start_paused = true)]
    async fn each_deadline_takes_the_spare_it_can_move_later() {
        let timer = ConnectionTimer::default();
        let start = clock::now();
        let short = timer.reused_until(start + Duration::from_secs(10));
        let long = timer.reused_until(start + Duration::from_secs(120));
        drop(short);
        drop(long);
        let deadlines = |timer: &ConnectionTimer| -> Vec<Duration> {
            let mut d: Vec<Duration> = lock(&timer.spare)
                .iter()
                .map(|s| s.deadline().into_std() - start)
                .collect();
            d.sort();
            d
        };
        assert_eq!(
            deadlines(&timer),
            [Duration::from_secs(10), Duration::from_secs(120)]
        );
        // A long deadline takes the long spare; the short one stays for the next short one.
        let next_long = timer.reused_until(start + Duration::from_secs(121));
        assert_eq!(deadlines(&timer), [Duration::from_secs(10)]);
        let next_short = timer.reused_until(start + Duration::from_secs(11));
        assert!(deadlines(&timer).is_empty());
        drop((next_long, next_short));
        assert_eq!(
            deadlines(&timer),
            [Duration::from_secs(11), Duration::from_secs(121)]
        );
        // Earlier than every spare: a new sleep, and the spares stay as they are.
        let early = timer.reused_until(start + Duration::from_secs(5));
        assert_eq!(deadlines(&timer).len(), 2);
        drop(early);
        assert_eq!(deadlines(&timer).len(), SPARE, "at most SPARE are kept");
    }

    #[tokio::test(start_paused = true)]
    async fn a_deadline_before_every_spare_fires_on_time() {
        let timer = ConnectionTimer::default();
        let start = clock::now();
        let mut long = timer.reused_until(start + Duration::from_secs(100));
        assert!(!fired(&mut long));
        drop(long);
        let mut short = timer.reused_until(start + Duration::from_secs(2));
        assert!(!fired(&mut short));
        tokio::time::sleep(Duration::from_millis(2100)).await;
        assert!(fired(&mut short));
    }

    /// hyper with this timer: a connection that keeps sending requests stays up for many
    /// header timeouts, and one that stops in the middle of a head is closed at the timeout.
    #[tokio::test(start_paused = true)]
    async fn hyper_header_timeouts_hold_with_reused_sleeps() {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let timer = ConnectionTimer::default();
        let served = tokio::spawn(
            hyper::server::conn::http1::Builder::new()
                .timer(timer.clone())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(
                    TokioIo::new(server),
                    service_fn(|_request| async {
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                            Bytes::from_static(b"ok"),
                        )))
                    }),
                ),
        );
        let mut client = client;
        let start = clock::now();
        let mut answer = vec![0u8; 1024];
        for _ in 0..8 {
            tokio::time::sleep(Duration::from_secs(4)).await;
            client
                .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
                .await
                .unwrap();
            let n = client.read(&mut answer).await.unwrap();
            assert!(answer[..n].starts_with(b"HTTP/1.1 200 OK"), "answered");
        }
        assert!(
            clock::now() - start >= Duration::from_secs(32),
            "up for 3 timeouts"
        );
        // Half a head, then nothing: closed once the timeout passes, not before.
        let stalled = clock::now();
        client.write_all(b"GET / HTTP/1.1\r\nho").await.unwrap();
        let n = client.read(&mut answer).await.unwrap_or(0);
        let waited = clock::now() - stalled;
        assert!(
            waited >= Duration::from_secs(10) && waited < Duration::from_secs(11),
            "closed after {waited:?} with {:?}",
            String::from_utf8_lossy(&answer[..n])
        );
        assert!(served.await.unwrap().is_err(), "the head timed out");
    }
}

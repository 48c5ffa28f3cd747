//! Capped, jittered exponential backoff for the agent's reconnect loop.
//!
//! Pure: the caller passes the jitter sample, so the schedule is testable without a clock or a
//! random source. "Equal jitter": each delay lies in `[d/2, d]` where `d` doubles from `base`
//! up to `cap`, so a fleet of agents that lost the same sentry does not reconnect in lockstep,
//! yet no agent waits less than half its step.

use std::time::Duration;

/// Reconnect schedule state.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    /// A schedule starting at `base` and never exceeding `cap`.
    #[must_use]
    pub fn new(base: Duration, cap: Duration) -> Self {
        Self {
            base,
            cap: cap.max(base),
            attempt: 0,
        }
    }

    /// The delay before the next attempt. `jitter` in `[0, 1]` (clamped) picks the point in
    /// `[d/2, d]`.
    pub(crate) fn next_delay(&mut self, jitter: f64) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(31)).unwrap_or(u32::MAX);
        let step = self.base.saturating_mul(factor).min(self.cap);
        self.attempt = self.attempt.saturating_add(1);
        let half = step / 2;
        half + half.mul_f64(jitter.clamp(0.0, 1.0))
    }

    /// Start again from `base`, after a connection that proved healthy.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_then_caps() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let full: Vec<_> = (0..7).map(|_| b.next_delay(1.0).as_millis()).collect();
        assert_eq!(full, [100, 200, 400, 800, 1000, 1000, 1000]);
    }

    #[test]
    fn jitter_stays_within_half_and_full() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        for attempt in 0..40 {
            let mut low = b.clone();
            let lo = low.next_delay(0.0);
            let hi = b.next_delay(1.0);
            assert!(
                lo * 2 >= hi - Duration::from_nanos(1),
                "attempt {attempt}: {lo:?} {hi:?}"
            );
            assert!(hi <= Duration::from_secs(10));
        }
    }

    #[test]
    fn reset_starts_over() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        for _ in 0..5 {
            b.next_delay(1.0);
        }
        b.reset();
        assert_eq!(b.next_delay(1.0), Duration::from_millis(100));
    }
}

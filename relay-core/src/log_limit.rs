//! Rate-limited logging for events a peer can trigger at will (refused handshakes, refused
//! connections): one line per interval with a count of what was left out, never a line per
//! packet. The decision is pure ([`LogLimit::check`] takes `now`); [`LogLimit::allow`] is the
//! shell that reads the clock.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::clock;

/// One line per `interval` for one class of event.
#[derive(Debug)]
pub(crate) struct LogLimit {
    interval: Duration,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    last: Option<Instant>,
    suppressed: u64,
}

impl LogLimit {
    #[must_use]
    pub const fn new(interval: Duration) -> Self {
        Self {
            interval,
            state: Mutex::new(State {
                last: None,
                suppressed: 0,
            }),
        }
    }

    /// Whether to log an event at `now`; `Some(n)` means log it and mention the `n` events
    /// left out since the last line.
    pub fn check(&self, now: Instant) -> Option<u64> {
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let due = state
            .last
            .is_none_or(|last| now.saturating_duration_since(last) >= self.interval);
        if due {
            state.last = Some(now);
            Some(std::mem::take(&mut state.suppressed))
        } else {
            state.suppressed += 1;
            None
        }
    }

    /// [`check`](Self::check) at the current time.
    pub fn allow(&self) -> Option<u64> {
        self.check(clock::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_with_the_count_left_out() {
        let limit = LogLimit::new(Duration::from_secs(10));
        let t0 = clock::now();
        assert_eq!(limit.check(t0), Some(0));
        for i in 1..=5 {
            assert_eq!(limit.check(t0 + Duration::from_secs(i)), None);
        }
        assert_eq!(limit.check(t0 + Duration::from_secs(10)), Some(5));
        assert_eq!(limit.check(t0 + Duration::from_secs(11)), None);
        assert_eq!(limit.check(t0 + Duration::from_secs(25)), Some(1));
    }
}

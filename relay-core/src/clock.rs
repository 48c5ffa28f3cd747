//! The one place that reads the clock.
//!
//! Pure code takes `now: Instant` as an argument; the async shell asks this module. Keeping
//! the reads here makes every decision testable with time passed in. The reading goes through
//! tokio's clock, so tests that pause time (`tokio::time::pause`) see the paused time here too.

use std::time::Instant;

/// The current monotonic time.
#[must_use]
#[allow(clippy::disallowed_methods)] // This is the one place.
pub fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

//! `relay-core`: everything the `sentry` binary does except the command line.
//!
//! The pure core (config parsing and validation, keys, the relay header, backoff) takes its
//! inputs as arguments and never reads the clock or the network. The shell (the QUIC,
//! WireGuard and TLS transports, the sentry and agent engines, the byte pump) moves bytes and
//! drives timers.
#![forbid(unsafe_code)]

pub mod admission;
pub mod agent;
pub(crate) mod backoff;
pub mod cidr;
pub mod clock;
pub mod config;
pub mod http1;
pub mod jsonrpc;
pub mod keys;
pub(crate) mod log_limit;
pub mod metrics;
pub(crate) mod net;
pub(crate) mod process;
pub mod relay;
pub mod reload;
pub mod sentry;
pub mod transport;
pub(crate) mod x509;

/// This build: the crate version, the git commit it was built from (`unknown` outside a
/// checkout) and the build date (UTC). `sentry --version` prints it; `sentry_build_info`
/// carries it.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// See [`VERSION`].
pub const COMMIT: &str = env!("SENTRY_COMMIT");
/// See [`VERSION`].
pub const BUILD_DATE: &str = env!("SENTRY_BUILD_DATE");
/// `sentry --version`: `0.1.0 (commit 0123456789ab, built 2026-12-07)`.
pub const VERSION_LINE: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("SENTRY_COMMIT"),
    ", built ",
    env!("SENTRY_BUILD_DATE"),
    ")"
);

/// Lock a mutex whose data stays consistent even if a holder panicked (every critical section
/// in this crate leaves it so): a panic elsewhere never wedges the daemon.
pub(crate) fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

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
pub mod relay;
pub mod reload;
pub mod sentry;
pub mod transport;

/// Lock a mutex whose data stays consistent even if a holder panicked (every critical section
/// in this crate leaves it so): a panic elsewhere never wedges the daemon.
pub(crate) fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

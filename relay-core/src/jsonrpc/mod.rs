//! Chain-aware JSON-RPC filtering for `protocol = "jsonrpc"` routes.
//!
//! [`filter`] is the pure, bounded decision on each request (path, HTTP method, body, batch,
//! every call's method); [`preset`] holds each chain's lists with the reason for every entry;
//! [`glob`] the two small pattern languages. The HTTP gateway that applies them on a route's
//! listener builds on these.

pub mod filter;
pub mod glob;
#[cfg(any(test, fuzzing))]
pub mod go_reader;
pub mod merge;
pub mod preset;

pub use filter::{Forwarded, Kind, Policy, Refusal, Verdict};
pub use merge::{BatchMerge, merge_batch};

#[cfg(test)]
mod tests;

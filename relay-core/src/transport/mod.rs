//! Tunnel transports. This version has one: QUIC.
//!
//! `pin` authenticates peers by pinned public keys inside rustls; `quic` builds tuned quinn
//! endpoints on top of it. The engines (`sentry`, `agent`) talk to quinn connections and
//! streams directly; when a second transport lands, the small trait of DESIGN.md (open a
//! relayed stream, accept one, name the peer) goes here and the engines move onto it.

pub mod pin;
pub mod quic;

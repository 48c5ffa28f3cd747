//! How requests and calls ended: the gateway's and the WebSocket's verdict accounting for
//! the metrics.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::lock;

/// Distinct method names used as metric labels per route; later names count as `other`.
pub(in crate::sentry) const MAX_METHOD_LABELS: usize = 64;

/// How a request ended, for `sentry_jsonrpc_requests_total{outcome}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(in crate::sentry) enum Outcome {
    /// Sent to the node (all or some of its calls).
    Forwarded,
    /// Answered by the sentry alone: every call denied or invalid, or malformed JSON.
    Answered,
    /// 403: path not served.
    Forbidden,
    /// 405.
    MethodNotAllowed,
    /// 413.
    TooLarge,
    /// 429: the client's call rate, or its WebSocket cap.
    RateLimited,
    /// 400 or 408: a body that broke off or came too slowly.
    BadRequest,
    /// 503: no connected upstream answered.
    NoUpstream,
    /// 502 or 504: the node failed or did not answer in time.
    UpstreamFailed,
    /// A WebSocket was upgraded and relayed.
    WebSocket,
    /// Not a request: a connection whose TLS handshake failed or timed out.
    TlsFailed,
}

impl Outcome {
    pub(in crate::sentry) const ALL: [Self; 11] = [
        Self::Forwarded,
        Self::Answered,
        Self::Forbidden,
        Self::MethodNotAllowed,
        Self::TooLarge,
        Self::RateLimited,
        Self::BadRequest,
        Self::NoUpstream,
        Self::UpstreamFailed,
        Self::WebSocket,
        Self::TlsFailed,
    ];

    pub(in crate::sentry) const fn as_str(self) -> &'static str {
        match self {
            Self::Forwarded => "forwarded",
            Self::Answered => "answered",
            Self::Forbidden => "forbidden",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::TooLarge => "too_large",
            Self::RateLimited => "rate_limited",
            Self::BadRequest => "bad_request",
            Self::NoUpstream => "no_upstream",
            Self::UpstreamFailed => "upstream_failed",
            Self::WebSocket => "websocket",
            Self::TlsFailed => "tls_handshake_failed",
        }
    }
}

/// What became of one JSON-RPC call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(in crate::sentry) enum CallOutcome {
    Forwarded,
    /// Answered by the sentry: a denied method, or an invalid call.
    Refused,
    /// Its request (or WebSocket message) was over the client's call rate.
    RateLimited,
}

impl CallOutcome {
    const ALL: [Self; 3] = [Self::Forwarded, Self::Refused, Self::RateLimited];

    pub(in crate::sentry) const fn as_str(self) -> &'static str {
        match self {
            Self::Forwarded => "forwarded",
            Self::Refused => "refused",
            Self::RateLimited => "rate_limited",
        }
    }
}

/// A route's JSON-RPC counters. Method labels are bounded: the first [`MAX_METHOD_LABELS`]
/// distinct names seen keep their own label, later ones count as `other`; calls whose method
/// is not known (refused, rate-limited) count as `-`.
pub(in crate::sentry) struct Stats {
    requests: [AtomicU64; Outcome::ALL.len()],
    calls: Mutex<Calls>,
    /// Forwarded requests: from the request sent to the node to its answer's head.
    pub(in crate::sentry) answer: prometheus_client::metrics::histogram::Histogram,
}

impl Default for Stats {
    fn default() -> Self {
        Self {
            requests: Default::default(),
            calls: Mutex::default(),
            answer: crate::metrics::latency_histogram(),
        }
    }
}

#[derive(Default)]
pub(in crate::sentry) struct Calls {
    /// Per method label: counts by [`CallOutcome`] (forwarded, refused, rate_limited).
    counts: std::collections::HashMap<String, [u64; 3]>,
}

impl Stats {
    pub(in crate::sentry) fn request(&self, outcome: Outcome) {
        self.requests[outcome as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub(in crate::sentry) fn requests(&self) -> impl Iterator<Item = (Outcome, u64)> + '_ {
        Outcome::ALL
            .iter()
            .map(|o| (*o, self.requests[*o as usize].load(Ordering::Relaxed)))
    }

    pub(in crate::sentry) fn call(&self, method: &str, outcome: CallOutcome) {
        let mut calls = lock(&self.calls);
        // A method seen before (every call but the first few of each method) hashes once.
        if let Some(counts) = calls.counts.get_mut(method) {
            counts[outcome as usize] += 1;
            return;
        }
        // Named labels: at most MAX_METHOD_LABELS, plus "other" and "-".
        let reserved = ["other", "-"]
            .iter()
            .filter(|l| calls.counts.contains_key(**l))
            .count();
        let named = calls.counts.len() - reserved;
        let label = if named < MAX_METHOD_LABELS && label_safe(method) {
            calls.counts.insert(method.to_owned(), [0; 3]);
            method
        } else {
            "other"
        };
        bump(&mut calls, label, outcome, 1);
    }

    /// A verdict that forwards `methods` out of `calls`: each forwarded call counted by its
    /// method, the rest (answered by the sentry) as refused. A message forwarded without a
    /// method (a WebSocket frame of the node's own subscription protocol) counts as one call
    /// named `unnamed`, when given.
    pub(in crate::sentry) fn forwarded(
        &self,
        methods: &[String],
        calls: usize,
        unnamed: Option<&str>,
    ) {
        let mut forwarded = methods.len();
        if let (true, Some(name)) = (methods.is_empty(), unnamed) {
            self.call(name, CallOutcome::Forwarded);
            forwarded = 1;
        }
        for method in methods {
            self.call(method, CallOutcome::Forwarded);
        }
        self.refused_calls(calls.saturating_sub(forwarded));
    }

    pub(in crate::sentry) fn refused_calls(&self, n: usize) {
        self.unnamed(n, CallOutcome::Refused);
    }

    pub(in crate::sentry) fn rate_limited_calls(&self, n: usize) {
        self.unnamed(n, CallOutcome::RateLimited);
    }

    pub(in crate::sentry) fn unnamed(&self, n: usize, outcome: CallOutcome) {
        if n > 0 {
            let n = u64::try_from(n).unwrap_or(u64::MAX);
            bump(&mut lock(&self.calls), "-", outcome, n);
        }
    }

    /// (method label, outcome, count) of every non-zero count, sorted.
    pub(in crate::sentry) fn calls(&self) -> Vec<(String, &'static str, u64)> {
        let mut rows: Vec<_> = lock(&self.calls)
            .counts
            .iter()
            .flat_map(|(method, counts)| {
                CallOutcome::ALL
                    .iter()
                    .zip(counts)
                    .filter(|(_, n)| **n > 0)
                    .map(|(outcome, n)| (method.clone(), outcome.as_str(), *n))
                    .collect::<Vec<_>>()
            })
            .collect();
        rows.sort();
        rows
    }
}

pub(in crate::sentry) fn bump(calls: &mut Calls, label: &str, outcome: CallOutcome, n: u64) {
    if let Some(counts) = calls.counts.get_mut(label) {
        counts[outcome as usize] += n;
    } else {
        let mut counts = [0; 3];
        counts[outcome as usize] = n;
        calls.counts.insert(label.to_owned(), counts);
    }
}

/// A method name is a label value only when it is short and plain.
pub(in crate::sentry) fn label_safe(method: &str) -> bool {
    !method.is_empty()
        && method.len() <= 64
        && method
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-' | b':'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    pub(in crate::sentry) fn method_labels_are_bounded() {
        let stats = Stats::default();
        for i in 0..(MAX_METHOD_LABELS + 10) {
            stats.call(&format!("eth_m{i}"), CallOutcome::Forwarded);
        }
        stats.call("eth_m0", CallOutcome::Forwarded);
        stats.call("bad label\n", CallOutcome::Forwarded);
        stats.refused_calls(3);
        let rows = stats.calls();
        assert_eq!(rows.len(), MAX_METHOD_LABELS + 2, "the names, other, and -");
        let count = |m: &str| rows.iter().find(|r| r.0 == m).map(|r| r.2);
        assert_eq!(count("eth_m0"), Some(2));
        assert_eq!(count("other"), Some(11));
        assert_eq!(count("-"), Some(3));
    }
}

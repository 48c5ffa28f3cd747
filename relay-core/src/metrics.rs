//! `GET /metrics` (Prometheus / OpenMetrics text) and `GET /healthz` for both daemons, on
//! their own listener (`metrics_listen`), never on a public route.
//!
//! The daemons keep their counters where the work happens (admission gates, route and
//! service byte totals, the tunnel registry) and implement [`Observe`]: each scrape reads
//! that live state, so nothing is counted twice and a reload never leaves a stale copy.
//!
//! The listener is bounded like a public one would be, although it is meant for loopback or
//! a private network: [`MAX_CONNECTIONS`] scrapers at once, headers within
//! [`HEADER_TIMEOUT`] and [`MAX_REQUEST_BUF`] bytes, each connection closed after
//! [`CONNECTION_LIFETIME`].

use std::convert::Infallible;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeGaugeValue, EncodeLabelSet, EncodeMetric,
};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::log_limit::LogLimit;

/// Scrapers served at once; more are closed at once.
pub(crate) const MAX_CONNECTIONS: usize = 32;
/// Longest a client may take to send its request headers.
pub(crate) const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest request head kept in memory.
pub(crate) const MAX_REQUEST_BUF: usize = 16 * 1024;
/// A scraper connection is closed after this long, keep-alive or not.
pub(crate) const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);
/// Every series name starts with this and an underscore.
pub(crate) const PREFIX: &str = "sentry";

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

static ACCEPT_LOG: LogLimit = LogLimit::new(Duration::from_secs(10));

/// What a daemon exposes.
pub trait Observe: Send + Sync + 'static {
    /// Write every metric family from the live state.
    ///
    /// # Errors
    /// Only when the encoder fails (it writes to a `String`, so never in practice).
    fn collect(&self, out: &mut Families<'_>) -> fmt::Result;

    /// `Ok(line)` when healthy, `Err(line)` saying what is wrong; one line each.
    ///
    /// # Errors
    /// Unhealthy, with the reason.
    fn health(&self) -> Result<String, String>;

    /// The `GET /peers` text, for a daemon that keeps such a table (the agent: which client
    /// each mapped source address stands for); `None` answers 404.
    fn peers(&self) -> Option<String> {
        None
    }
}

/// Config reloads of a daemon, by result.
#[derive(Debug, Default)]
pub struct Reloads {
    ok: AtomicU64,
    refused: AtomicU64,
}

impl Reloads {
    /// Count one reload: applied or refused.
    pub fn count(&self, applied: bool) {
        let counter = if applied { &self.ok } else { &self.refused };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Bind the metrics listener (synchronously, so start-up fails on a taken port).
///
/// # Errors
/// The address cannot be bound.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let std = std::net::TcpListener::bind(addr)?;
    std.set_nonblocking(true)?;
    TcpListener::from_std(std)
}

/// Buckets of the latency histograms (seconds): a relayed connection's setup, a JSON-RPC
/// answer. From a loopback round trip to the timeouts' order.
pub(crate) const LATENCY_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// A latency histogram with [`LATENCY_BUCKETS`].
#[must_use]
pub(crate) fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

/// Writes metric families; a thin layer over prometheus-client's descriptor encoder.
pub struct Families<'a>(DescriptorEncoder<'a>);

impl Families<'_> {
    /// A counter family: `name` gets `_total` appended in the output.
    ///
    /// # Errors
    /// When the encoder fails.
    pub fn counters<L: EncodeLabelSet>(
        &mut self,
        name: &str,
        help: &str,
        rows: impl IntoIterator<Item = (L, u64)>,
    ) -> fmt::Result {
        let mut family = self
            .0
            .encode_descriptor(name, help, None, MetricType::Counter)?;
        for (labels, value) in rows {
            ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }

    /// A gauge family.
    ///
    /// # Errors
    /// When the encoder fails.
    pub(crate) fn gauges<L: EncodeLabelSet, N: EncodeGaugeValue>(
        &mut self,
        name: &str,
        help: &str,
        rows: impl IntoIterator<Item = (L, N)>,
    ) -> fmt::Result {
        let mut family = self
            .0
            .encode_descriptor(name, help, None, MetricType::Gauge)?;
        for (labels, value) in rows {
            ConstGauge::new(value).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }

    /// A histogram family (`_bucket`, `_sum`, `_count` in the output).
    ///
    /// # Errors
    /// When the encoder fails.
    pub(crate) fn histograms<'h, L: EncodeLabelSet>(
        &mut self,
        name: &str,
        help: &str,
        rows: impl IntoIterator<Item = (L, &'h Histogram)>,
    ) -> fmt::Result {
        let mut family = self
            .0
            .encode_descriptor(name, help, None, MetricType::Histogram)?;
        for (labels, histogram) in rows {
            histogram.encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }

    /// The families every daemon writes last: its process (open files against the limit,
    /// resident memory, CPU time), its reloads by result, and its version and role.
    ///
    /// # Errors
    /// When the encoder fails.
    pub fn common(&mut self, reloads: &Reloads, role: &str) -> fmt::Result {
        let process = crate::process::Reading::now();
        self.gauges(
            "process_open_fds",
            "Open file descriptors (each relayed connection holds at least one).",
            process.open_fds.map(|n| ([("role", role)], n)),
        )?;
        self.gauges(
            "process_max_fds",
            "The open-file limit (LimitNOFILE): past it, new connections are refused.",
            process.max_fds.map(|n| ([("role", role)], n)),
        )?;
        self.gauges(
            "process_resident_memory_bytes",
            "Resident memory.",
            process.resident_bytes.map(|n| ([("role", role)], n)),
        )?;
        self.counters(
            "process_cpu_seconds",
            "CPU time, user and system, in whole seconds since start.",
            process.cpu_seconds.map(|n| ([("role", role)], n)),
        )?;
        self.counters(
            "config_reloads",
            "Config reloads by result.",
            [("ok", &reloads.ok), ("error", &reloads.refused)]
                .map(|(result, n)| ([("result", result)], n.load(Ordering::Relaxed))),
        )?;
        self.gauges(
            "build_info",
            "The running version: the release, the git commit and the build date.",
            [(
                [
                    ("version", crate::VERSION),
                    ("commit", crate::COMMIT),
                    ("built", crate::BUILD_DATE),
                    ("role", role),
                ],
                1_i64,
            )],
        )
    }
}

/// The whole exposition of `source`, as `GET /metrics` serves it.
#[must_use]
pub(crate) fn render(source: Arc<dyn Observe>) -> String {
    let mut registry = Registry::with_prefix(PREFIX);
    registry.register_collector(Box::new(Source(source)));
    let mut out = String::new();
    if prometheus_client::encoding::text::encode(&mut out, &registry).is_err() {
        out.clear();
    }
    out
}

struct Source(Arc<dyn Observe>);

impl fmt::Debug for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Source")
    }
}

impl Collector for Source {
    fn encode(&self, encoder: DescriptorEncoder<'_>) -> fmt::Result {
        self.0.collect(&mut Families(encoder))
    }
}

/// Serve `/metrics` and `/healthz` on `listener` until `stop`.
pub async fn serve(listener: TcpListener, source: Arc<dyn Observe>, stop: CancellationToken) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let accepted = tokio::select! {
            biased;
            () = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let tcp = match accepted {
            Ok((tcp, _)) => tcp,
            Err(e) => {
                if let Some(suppressed) = ACCEPT_LOG.allow() {
                    warn!(suppressed, "metrics listener: accept failed: {e}");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let source = source.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let service = service_fn(move |request: Request<Incoming>| {
                let response = answer(&source, request.method(), request.uri().path());
                async move { Ok::<_, Infallible>(response) }
            });
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(MAX_REQUEST_BUF)
                .serve_connection(TokioIo::new(tcp), service);
            tokio::select! {
                () = stop.cancelled() => {}
                _ = tokio::time::timeout(CONNECTION_LIFETIME, connection) => {}
            }
        });
    }
}

fn answer(source: &Arc<dyn Observe>, method: &Method, path: &str) -> Response<Full<Bytes>> {
    if method != Method::GET && method != Method::HEAD {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET /metrics, GET /healthz and GET /peers\n",
        );
    }
    match path {
        "/metrics" => {
            let mut response = Response::new(Full::new(Bytes::from(render(source.clone()))));
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static(OPENMETRICS));
            response
        }
        "/healthz" => match source.health() {
            Ok(line) => text(StatusCode::OK, &format!("ok: {line}\n")),
            Err(line) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("unhealthy: {line}\n"),
            ),
        },
        "/peers" => match source.peers() {
            Some(table) => text(StatusCode::OK, &table),
            None => text(
                StatusCode::NOT_FOUND,
                "no peer table here: GET /peers is the agent's (mapped source addresses)\n",
            ),
        },
        _ => text(
            StatusCode::NOT_FOUND,
            "only GET /metrics, GET /healthz and GET /peers\n",
        ),
    }
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_owned())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// One sample of a text exposition.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    /// The value of label `key`, if present.
    #[must_use]
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Largest exposition [`parse`] accepts.
pub const MAX_EXPOSITION: usize = 16 << 20;

/// Parse the samples of a Prometheus or OpenMetrics text exposition (comments, `# TYPE` and
/// `# EOF` are skipped; timestamps and exemplars are ignored). For `sentry status`, which
/// reads the daemons' own output; a line it cannot read is an error naming the line.
///
/// # Errors
/// The text is larger than [`MAX_EXPOSITION`] or a line is not `name{labels} value`.
pub fn parse(text: &str) -> Result<Vec<Sample>, String> {
    if text.len() > MAX_EXPOSITION {
        return Err(format!("exposition larger than {MAX_EXPOSITION} bytes"));
    }
    let mut samples = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let sample =
            parse_line(line).ok_or_else(|| format!("line {}: cannot read {line:?}", i + 1))?;
        samples.push(sample);
    }
    Ok(samples)
}

fn parse_line(line: &str) -> Option<Sample> {
    let name_end = line.find(|c: char| c == '{' || c.is_whitespace())?;
    let name = &line[..name_end];
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(inner) = rest.strip_prefix('{') {
        rest = inner;
        loop {
            rest = rest.trim_start_matches([',', ' ']);
            if let Some(after) = rest.strip_prefix('}') {
                rest = after;
                break;
            }
            let (key, after) = rest.split_once('=')?;
            let after = after.strip_prefix('"')?;
            let mut value = String::new();
            let mut chars = after.char_indices();
            let end = loop {
                match chars.next()? {
                    (j, '"') => break j,
                    (_, '\\') => match chars.next()?.1 {
                        'n' => value.push('\n'),
                        other => value.push(other),
                    },
                    (_, c) => value.push(c),
                }
            };
            labels.push((key.trim().to_owned(), value));
            rest = &after[end + 1..];
        }
    }
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_render_writes() {
        struct Fixed;
        impl Observe for Fixed {
            fn collect(&self, out: &mut Families<'_>) -> fmt::Result {
                out.counters(
                    "things",
                    "Things.",
                    [([("route", "a \"quoted\" \\ name")], 7_u64)],
                )?;
                out.gauges("level", "Level.", [([("x", "1"), ("y", "2")], 0.25_f64)])
            }
            fn health(&self) -> Result<String, String> {
                Ok(String::new())
            }
        }
        let text = render(Arc::new(Fixed));
        let samples = parse(&text).unwrap();
        assert_eq!(
            samples,
            [
                Sample {
                    name: "sentry_things_total".into(),
                    labels: vec![("route".into(), "a \"quoted\" \\ name".into())],
                    value: 7.0
                },
                Sample {
                    name: "sentry_level".into(),
                    labels: vec![("x".into(), "1".into()), ("y".into(), "2".into())],
                    value: 0.25
                },
            ],
            "{text}"
        );
    }

    #[test]
    fn refuses_garbage_by_line() {
        assert_eq!(
            parse("# HELP x\nx 1\nnot a sample\n").unwrap_err(),
            "line 3: cannot read \"not a sample\""
        );
        assert!(parse("x{a=\"unterminated} 1").is_err());
        assert_eq!(parse("").unwrap(), []);
    }

    proptest::proptest! {
        #[test]
        fn never_panics(text in ".{0,200}") {
            let _ = parse(&text);
        }
    }
}

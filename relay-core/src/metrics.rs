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
use std::sync::Arc;
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
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::log_limit::LogLimit;

/// Scrapers served at once; more are closed at once.
pub const MAX_CONNECTIONS: usize = 32;
/// Longest a client may take to send its request headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest request head kept in memory.
pub const MAX_REQUEST_BUF: usize = 16 * 1024;
/// A scraper connection is closed after this long, keep-alive or not.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);
/// Every series name starts with this and an underscore.
pub const PREFIX: &str = "sentry";

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
    pub fn gauges<L: EncodeLabelSet, N: EncodeGaugeValue>(
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
}

/// The whole exposition of `source`, as `GET /metrics` serves it.
#[must_use]
pub fn render(source: Arc<dyn Observe>) -> String {
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
            "only GET /metrics and GET /healthz\n",
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
        _ => text(
            StatusCode::NOT_FOUND,
            "only GET /metrics and GET /healthz\n",
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

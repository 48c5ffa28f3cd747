//! `sentry status`: a readable view of a running daemon, read from its metrics listener.
//!
//! Works for both roles: it reads `/metrics` and `/healthz` and prints what it finds (the
//! `role` label of `sentry_build_info` tells which).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::Request;
use hyper_util::rt::TokioIo;
use relay_core::metrics::{self, Sample};
use tokio::net::TcpStream;

/// Longest the whole status query may take.
const TIMEOUT: Duration = Duration::from_secs(5);

/// Fetch `path` from `addr`: the status code and the body.
async fn get(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    let fetch = async {
        let tcp = TcpStream::connect(addr).await.map_err(|e| {
            format!(
                "cannot connect to {addr}: {e} (is metrics_listen set, and is the daemon running?)"
            )
        })?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| format!("{addr}: {e}"))?;
        tokio::spawn(connection);
        let request = Request::get(path)
            .header(hyper::header::HOST, addr.to_string())
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("{addr}{path}: {e}"))?;
        let status = response.status().as_u16();
        let body = Limited::new(response.into_body(), metrics::MAX_EXPOSITION)
            .collect()
            .await
            .map_err(|e| format!("{addr}{path}: {e}"))?
            .to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    };
    tokio::time::timeout(TIMEOUT, fetch)
        .await
        .map_err(|_| format!("{addr}{path}: no answer within {TIMEOUT:?}"))?
}

/// The agent's table of relayed peers (`GET /peers`): every row, or with `lookup` only the
/// rows whose mapped or client address is that one.
pub async fn peers(addr: SocketAddr, lookup: Option<std::net::IpAddr>) -> Result<String, String> {
    let (code, text) = get(addr, "/peers").await?;
    if code != 200 {
        return Err(format!(
            "{addr}/peers answered HTTP {code}: {}",
            text.trim()
        ));
    }
    let mut lines = text.lines();
    let header = lines.next().unwrap_or_default();
    let mut rows = vec![[
        "MAPPED".to_owned(),
        "CLIENT".to_owned(),
        "SERVICE".to_owned(),
        "OPEN".to_owned(),
        "TOTAL".to_owned(),
        "LAST SEEN".to_owned(),
    ]];
    if !header.starts_with("# mapped client") {
        return Err(format!("{addr}/peers: not a peer table"));
    }
    for line in lines {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [mapped, client, service, open, total, ago] = fields[..] else {
            return Err(format!("{addr}/peers: cannot read {line:?}"));
        };
        if let Some(ip) = lookup {
            let ip = ip.to_string();
            if mapped != ip && client != ip {
                continue;
            }
        }
        rows.push([
            mapped.to_owned(),
            client.to_owned(),
            service.to_owned(),
            open.to_owned(),
            total.to_owned(),
            format!("{} ago", age(ago.parse::<f64>().ok())),
        ]);
    }
    let mut out = String::from(
        "Relayed peers of source = \"mapped\" services: the address the node sees, and the client it stands for\n",
    );
    table(&mut out, &rows);
    Ok(out)
}

/// The status report of the daemon whose metrics listener is `addr`.
pub async fn report(addr: SocketAddr) -> Result<String, String> {
    let (code, text) = get(addr, "/metrics").await?;
    if code != 200 {
        return Err(format!("{addr}/metrics answered HTTP {code}"));
    }
    let samples = metrics::parse(&text).map_err(|e| format!("{addr}/metrics: {e}"))?;
    let (_, health) = get(addr, "/healthz").await?;
    let view = View { samples: &samples };
    let build = |label: &str, or: &str| {
        view.find("sentry_build_info", &[])
            .and_then(|s| s.label(label))
            .unwrap_or(or)
            .to_owned()
    };
    let role = build("role", "unknown");
    let version = match build("commit", "") {
        commit if commit.is_empty() => build("version", "?"),
        commit => format!("{} (commit {commit})", build("version", "?")),
    };
    let mut out = format!("{role} {version} at {addr}: {}\n", health.trim());
    match role.as_str() {
        "sentry" => view.sentry(&mut out),
        "agent" => view.agent(&mut out),
        _ => return Err(format!("{addr}/metrics is not a sentry daemon's")),
    }
    Ok(out)
}

struct View<'a> {
    samples: &'a [Sample],
}

impl<'a> View<'a> {
    fn all(&self, name: &str) -> std::vec::IntoIter<&'a Sample> {
        let found: Vec<&'a Sample> = self.samples.iter().filter(|s| s.name == name).collect();
        found.into_iter()
    }

    fn find(&self, name: &str, labels: &[(&str, &str)]) -> Option<&'a Sample> {
        self.all(name)
            .find(|s| labels.iter().all(|(k, v)| s.label(k) == Some(*v)))
    }

    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.find(name, labels).map_or(0.0, |s| s.value)
    }

    fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.all(name)
            .filter(|s| labels.iter().all(|(k, v)| s.label(k) == Some(*v)))
            .map(|s| s.value)
            .sum()
    }

    fn sentry(&self, out: &mut String) {
        let tunnels = self.tunnels("sentry_tunnel", "agent");
        let mut routes = vec![[
            "ROUTE".to_owned(),
            "LISTEN".to_owned(),
            "UPSTREAM IN USE".to_owned(),
            "ACTIVE".to_owned(),
            "ACCEPTED".to_owned(),
            "REFUSED".to_owned(),
            "RECEIVED".to_owned(),
            "SENT".to_owned(),
        ]];
        for s in self.all("sentry_route_info") {
            let route = s.label("route").unwrap_or("?");
            let key = [("route", route)];
            let in_use = self
                .all("sentry_route_upstream_connected")
                .filter(|u| u.label("route") == Some(route))
                .find(|u| u.value > 0.0)
                .and_then(|u| u.label("upstream"))
                .unwrap_or("none connected");
            routes.push([
                route.to_owned(),
                s.label("listen").unwrap_or("?").to_owned(),
                in_use.to_owned(),
                count(self.value("sentry_route_connections_active", &key)),
                count(self.value("sentry_route_connections_accepted_total", &key)),
                self.refusals(route),
                bytes(self.value("sentry_route_received_bytes_total", &key)),
                bytes(self.value("sentry_route_sent_bytes_total", &key)),
            ]);
        }
        out.push_str("\nTunnels\n");
        table(out, &tunnels);
        out.push_str("\nRoutes\n");
        table(out, &routes);
        let egress = self.egress("sentry_egress", "agent", "refused_total");
        if egress.len() > 1 {
            out.push_str("\nEgress (agents' outbound connections)\n");
            table(out, &egress);
        }
        let dropped = self.sum("sentry_tunnel_handshakes_dropped_total", &[]);
        let failed = self.sum("sentry_tunnel_handshakes_failed_total", &[]);
        let _ = writeln!(
            out,
            "\nTunnel handshakes dropped by limits: {}, failed: {}. Config reloads: {} ok, {} refused.",
            count(dropped),
            count(failed),
            count(self.value("sentry_config_reloads_total", &[("result", "ok")])),
            count(self.value("sentry_config_reloads_total", &[("result", "error")])),
        );
    }

    /// The tunnel table from the `{prefix}_*` families, one row per `peer` label value.
    fn tunnels(&self, prefix: &str, peer: &str) -> Vec<[String; 6]> {
        let mut rows = vec![[
            peer.to_uppercase(),
            "TRANSPORT".to_owned(),
            "STATE".to_owned(),
            "RTT".to_owned(),
            "SINCE".to_owned(),
            "RECONNECTS".to_owned(),
        ]];
        for s in self.all(&format!("{prefix}_up")) {
            let name = s.label(peer).unwrap_or("?");
            let key = [(peer, name)];
            let up = s.value > 0.0;
            rows.push([
                name.to_owned(),
                s.label("transport").unwrap_or("?").to_owned(),
                if up { "up" } else { "down" }.to_owned(),
                rtt(up.then(|| self.value(&format!("{prefix}_rtt_seconds"), &key))),
                age(up.then(|| self.value(&format!("{prefix}_handshake_age_seconds"), &key))),
                count(self.value(&format!("{prefix}_reconnects_total"), &key)),
            ]);
        }
        rows
    }

    /// "12 (rate 10, no_upstream 2)": the total and each non-zero reason.
    fn refusals(&self, route: &str) -> String {
        let reasons: Vec<(String, f64)> = self
            .all("sentry_route_connections_refused_total")
            .filter(|s| s.label("route") == Some(route) && s.value > 0.0)
            .map(|s| (s.label("reason").unwrap_or("?").to_owned(), s.value))
            .collect();
        let total: f64 = reasons.iter().map(|(_, v)| v).sum();
        if reasons.is_empty() {
            return "0".to_owned();
        }
        let parts: Vec<String> = reasons
            .iter()
            .map(|(r, v)| format!("{r} {}", count(*v)))
            .collect();
        format!("{} ({})", count(total), parts.join(", "))
    }

    fn agent(&self, out: &mut String) {
        let tunnels = self.tunnels("sentry_agent_tunnel", "sentry");
        let mut services = vec![[
            "SERVICE".to_owned(),
            "ACTIVE".to_owned(),
            "CONNECTED".to_owned(),
            "REFUSED".to_owned(),
            "TO SERVICE".to_owned(),
            "FROM SERVICE".to_owned(),
        ]];
        for s in self.all("sentry_agent_streams_active") {
            let service = s.label("service").unwrap_or("?");
            let key = [("service", service)];
            let ok = self.value(
                "sentry_agent_streams_total",
                &[("service", service), ("status", "ok")],
            );
            let all = self.sum("sentry_agent_streams_total", &key);
            services.push([
                if service == "-" {
                    "(unknown name)".to_owned()
                } else {
                    service.to_owned()
                },
                count(s.value),
                count(ok),
                count(all - ok),
                bytes(self.value("sentry_agent_service_sent_bytes_total", &key)),
                bytes(self.value("sentry_agent_service_received_bytes_total", &key)),
            ]);
        }
        out.push_str("\nTunnels\n");
        table(out, &tunnels);
        out.push_str("\nServices\n");
        table(out, &services);
        let egress = self.egress("sentry_agent_egress", "listen", "failed_total");
        if egress.len() > 1 {
            out.push_str("\nEgress (the node's outbound connections)\n");
            table(out, &egress);
        }
    }

    /// The egress table of either role: one row per `key` label value of `{prefix}_active`,
    /// what was not relayed summed from `{prefix}_{not_relayed}` by reason (and, on the
    /// sentry, `{prefix}_connect_failed_total`).
    fn egress(&self, prefix: &str, key: &str, not_relayed: &str) -> Vec<[String; 6]> {
        let mut rows = vec![[
            key.to_uppercase(),
            "ACTIVE".to_owned(),
            "CONNECTED".to_owned(),
            "NOT RELAYED".to_owned(),
            "UP".to_owned(),
            "DOWN".to_owned(),
        ]];
        let metric = |suffix: &str| format!("{prefix}_{suffix}");
        for s in self.all(&metric("active")) {
            let name = s.label(key).unwrap_or("?");
            let labels = [(key, name)];
            let mut reasons: Vec<(String, f64)> = self
                .all(&metric(not_relayed))
                .filter(|r| r.label(key) == Some(name) && r.value > 0.0)
                .map(|r| (r.label("reason").unwrap_or("?").to_owned(), r.value))
                .collect();
            let failed = self.value(&metric("connect_failed_total"), &labels);
            if failed > 0.0 {
                reasons.push(("connect_failed".to_owned(), failed));
            }
            let total: f64 = reasons.iter().map(|(_, v)| v).sum();
            let parts: Vec<String> = reasons
                .iter()
                .map(|(r, v)| format!("{r} {}", count(*v)))
                .collect();
            let direction =
                |d| self.value(&metric("bytes_total"), &[(key, name), ("direction", d)]);
            rows.push([
                name.to_owned(),
                count(s.value),
                count(self.value(&metric("connections_total"), &labels)),
                if parts.is_empty() {
                    "0".to_owned()
                } else {
                    format!("{} ({})", count(total), parts.join(", "))
                },
                bytes(direction("up")),
                bytes(direction("down")),
            ]);
        }
        rows
    }
}

fn table<const N: usize>(out: &mut String, rows: &[[String; N]]) {
    let mut widths = [0usize; N];
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for row in rows {
        let mut line = String::from("  ");
        for (cell, w) in row.iter().zip(widths) {
            let _ = write!(line, "{cell:<w$}  ");
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    if rows.len() == 1 {
        out.push_str("  (none)\n");
    }
}

#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
fn count(v: f64) -> String {
    format!("{}", v.max(0.0).round() as u64)
}

fn rtt(seconds: Option<f64>) -> String {
    seconds.map_or_else(|| "-".to_owned(), |s| format!("{:.1} ms", s * 1000.0))
}

#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
fn age(seconds: Option<f64>) -> String {
    let Some(s) = seconds else {
        return "-".to_owned();
    };
    let s = s.max(0.0) as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m {}s", s / 60, s % 60),
        3600..86_400 => format!("{}h {}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d {}h", s / 86_400, s % 86_400 / 3600),
    }
}

fn bytes(v: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = v.max(0.0);
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{v:.0} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

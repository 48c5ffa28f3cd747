//! `sentry check --print`: the config as the daemon will run it, every default filled in,
//! written back as TOML (list files merged into their lists, host bits cleared). A JSON-RPC
//! route's lists are the preset's merged with the config's; they are shown as comments, since
//! writing them back as keys would add them to the preset's again.

use std::time::Duration;

use relay_core::cidr::CidrSet;
use relay_core::config::{
    AgentConfig, Destination, EgressMode, ForwardedHeader, ProxyVersion, SentryConfig, Window,
};
use relay_core::keys;
use toml::{Table, Value};

/// The effective config of either role, as TOML text.
pub fn sentry(c: &SentryConfig) -> String {
    let mut doc = Table::new();
    let mut s = Table::new();
    s.insert("private_key".into(), path(&c.private_key));
    if let Some(quic) = c.quic_listen {
        s.insert("quic_listen".into(), text(quic));
    }
    if let Some(wg) = c.wireguard {
        s.insert("wireguard_listen".into(), text(wg.listen));
        s.insert("wireguard_address".into(), text(wg.address));
        s.insert("wireguard_window".into(), window(wg.window));
    }
    if let Some(tls) = c.tls_listen {
        s.insert("tls_listen".into(), text(tls));
    }
    if let Some(metrics) = c.metrics_listen {
        s.insert("metrics_listen".into(), text(metrics));
    }
    s.insert("max_connections".into(), count(c.max_connections));
    s.insert("drain_timeout".into(), duration(c.drain_timeout));
    doc.insert("sentry".into(), Value::Table(s));
    let agents = c.agents.iter().map(|a| {
        let mut t = Table::new();
        t.insert("name".into(), text(&a.name));
        t.insert("public_key".into(), text(a.public_key));
        if let Some(address) = a.wireguard_address {
            t.insert("wireguard_address".into(), text(address));
        }
        t.insert("egress".into(), Value::Boolean(a.egress));
        t
    });
    doc.insert("agent".into(), tables(agents));
    if !c.wireguard_peers.is_empty() {
        let peers = c.wireguard_peers.iter().map(|p| {
            let mut t = Table::new();
            t.insert("name".into(), text(&p.name));
            t.insert(
                "public_key".into(),
                text(keys::wireguard_key_base64(&p.public_key)),
            );
            t.insert("address".into(), text(p.address));
            t
        });
        doc.insert("wireguard_peer".into(), tables(peers));
    }
    let routes = c.routes.iter().map(|r| {
        let mut t = Table::new();
        t.insert("name".into(), text(&r.name));
        t.insert("listen".into(), text(r.listen));
        let protocol = match (&r.jsonrpc, r.udp) {
            (Some(_), _) => "jsonrpc",
            (None, true) => "udp",
            (None, false) => "tcp",
        };
        t.insert("protocol".into(), text(protocol));
        let upstreams = r
            .upstreams
            .iter()
            .map(|u| format!("{}/{}", u.agent, u.service));
        t.insert("upstream".into(), strings(upstreams));
        let proxy = match r.proxy_protocol {
            None => "off",
            Some(ProxyVersion::V1) => "v1",
            Some(ProxyVersion::V2) => "v2",
        };
        t.insert("proxy_protocol".into(), text(proxy));
        t.insert("allow".into(), cidrs(&r.limits.allow));
        t.insert("deny".into(), cidrs(&r.limits.deny));
        t.insert("max_connections".into(), count(r.limits.max_connections));
        t.insert(
            "max_connections_per_ip".into(),
            count(r.limits.max_connections_per_ip),
        );
        t.insert(
            "connect_rate_per_ip".into(),
            text(r.limits.connect_rate_per_ip),
        );
        t.insert("idle_timeout".into(), duration(r.idle_timeout));
        if let Some(j) = &r.jsonrpc {
            let mut rpc = Table::new();
            rpc.insert("preset".into(), text(j.preset));
            rpc.insert("websocket".into(), Value::Boolean(j.websocket));
            rpc.insert("max_body".into(), size(j.policy.max_body));
            rpc.insert("max_batch".into(), count(j.policy.max_batch));
            rpc.insert("rate_per_ip".into(), text(j.rate_per_ip));
            rpc.insert(
                "max_websockets_per_ip".into(),
                count(j.max_websockets_per_ip),
            );
            let forwarded = match j.forwarded {
                ForwardedHeader::XForwardedFor => "x-forwarded-for",
                ForwardedHeader::Forwarded => "forwarded",
                ForwardedHeader::None => "none",
            };
            rpc.insert("forwarded".into(), text(forwarded));
            if let Some(tls) = &j.tls {
                let mut cert = Table::new();
                cert.insert("cert".into(), path(&tls.cert));
                cert.insert("key".into(), path(&tls.key));
                rpc.insert("tls".into(), Value::Table(cert));
            }
            t.insert("jsonrpc".into(), Value::Table(rpc));
        }
        t
    });
    doc.insert("route".into(), tables(routes));
    let e = &c.egress;
    let mut egress = Table::new();
    egress.insert("allow".into(), cidrs(&e.allow));
    egress.insert("deny".into(), cidrs(&e.deny));
    egress.insert("allow_private".into(), cidrs(&e.allow_private));
    let ports = e.ports.iter().map(|r| {
        if r.start() == r.end() {
            r.start().to_string()
        } else {
            format!("{}-{}", r.start(), r.end())
        }
    });
    egress.insert("ports".into(), strings(ports));
    egress.insert("max_connections".into(), count(e.max_connections));
    egress.insert("connect_rate".into(), text(e.connect_rate));
    if let Some(source) = e.source {
        egress.insert("source".into(), text(source));
    }
    egress.insert("idle_timeout".into(), duration(e.idle_timeout));
    doc.insert("egress".into(), Value::Table(egress));
    let mut out = first(&mut doc, "sentry");
    for r in &c.routes {
        if let Some(j) = &r.jsonrpc {
            out += &format!(
                "\n# route {:?}, preset {:?} merged with the config's lists:\n\
                 #   POST paths: {:?}\n#   URI-form (GET) paths: {:?}\n\
                 #   WebSocket paths: {:?}\n#   methods allowed: {:?}\n#   methods denied: {:?}\n",
                r.name,
                j.preset,
                j.policy.post_paths,
                j.policy.get_method_paths,
                j.policy.websocket_paths,
                j.policy.allow_methods,
                j.policy.deny_methods
            );
        }
    }
    out
}

/// The effective agent config, as TOML text.
pub fn agent(c: &AgentConfig) -> String {
    let mut doc = Table::new();
    let mut a = Table::new();
    a.insert("name".into(), text(&c.name));
    a.insert("private_key".into(), path(&c.private_key));
    if let Some(metrics) = c.metrics_listen {
        a.insert("metrics_listen".into(), text(metrics));
    }
    a.insert("drain_timeout".into(), duration(c.drain_timeout));
    a.insert(
        "max_streams_per_sentry".into(),
        count(c.max_streams_per_sentry),
    );
    doc.insert("agent".into(), Value::Table(a));
    let sentries = c.sentries.iter().map(|s| {
        let mut t = Table::new();
        t.insert("address".into(), text(&s.address));
        t.insert("public_key".into(), text(s.public_key));
        t.insert("transport".into(), text(s.transport.as_str()));
        if let Some(wg) = s.wireguard {
            t.insert("wireguard_address".into(), text(wg.address));
            t.insert("sentry_wireguard_address".into(), text(wg.sentry_address));
            t.insert("wireguard_window".into(), window(wg.window));
        }
        t
    });
    doc.insert("sentry".into(), tables(sentries));
    let services = c.services.iter().map(|s| {
        let mut t = Table::new();
        t.insert("name".into(), text(&s.name));
        t.insert("target".into(), text(s.target));
        t.insert("protocol".into(), text(if s.udp { "udp" } else { "tcp" }));
        t.insert("max_connections".into(), count(s.max_connections));
        t.insert("source".into(), text(s.source.as_str()));
        t
    });
    doc.insert("service".into(), tables(services));
    if !c.egress.is_empty() {
        let listeners = c.egress.iter().map(|e| {
            let mut t = Table::new();
            t.insert("listen".into(), text(e.listen));
            t.insert("mode".into(), text(e.mode.as_str()));
            if let EgressMode::Forward(to) = &e.mode {
                let to = match to {
                    Destination::Addr(addr) => addr.to_string(),
                    Destination::Name(name, port) => format!("{name}:{port}"),
                };
                t.insert("to".into(), text(to));
            }
            t.insert("max_connections".into(), count(e.max_connections));
            t
        });
        doc.insert("egress".into(), tables(listeners));
    }
    first(&mut doc, "agent")
}

/// The document as text, the role's own table (`[sentry]`, `[agent]`) first, as the examples
/// have it (a table's keys are otherwise in name order).
fn first(doc: &mut Table, role: &str) -> String {
    let mut own = Table::new();
    if let Some(table) = doc.remove(role) {
        own.insert(role.to_owned(), table);
    }
    format!("{own}\n{doc}")
}

fn text(value: impl ToString) -> Value {
    Value::String(value.to_string())
}

fn path(path: &std::path::Path) -> Value {
    text(path.display())
}

fn strings(items: impl Iterator<Item = String>) -> Value {
    Value::Array(items.map(Value::String).collect())
}

fn tables(items: impl Iterator<Item = Table>) -> Value {
    Value::Array(items.map(Value::Table).collect())
}

fn count(n: usize) -> Value {
    Value::Integer(i64::try_from(n).unwrap_or(i64::MAX))
}

fn cidrs(set: &CidrSet) -> Value {
    strings(set.blocks().map(|b| b.to_string()))
}

/// `30s`, `15m`, `2h`, `1d`, `500ms`: the largest unit that writes it whole.
fn duration(d: Duration) -> Value {
    let ms = d.as_millis();
    let written = [
        (86_400_000, "d"),
        (3_600_000, "h"),
        (60_000, "m"),
        (1000, "s"),
    ]
    .into_iter()
    .find(|(unit, _)| ms != 0 && ms.is_multiple_of(*unit))
    .map_or_else(
        || format!("{ms}ms"),
        |(unit, name)| format!("{}{name}", ms / unit),
    );
    Value::String(written)
}

/// `1MiB`, `512KiB`, `4096B`: the largest binary unit that writes it whole.
fn size(bytes: usize) -> Value {
    let written = [(1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")]
        .into_iter()
        .find(|(unit, _)| bytes != 0 && bytes.is_multiple_of(*unit))
        .map_or_else(
            || format!("{bytes}B"),
            |(unit, name)| format!("{}{name}", bytes / unit),
        );
    Value::String(written)
}

fn window(window: Window) -> Value {
    match window {
        Window::Auto => text("auto"),
        Window::Fixed(bytes) => size(bytes),
    }
}

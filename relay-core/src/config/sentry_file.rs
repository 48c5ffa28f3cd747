//! The schema of `sentry.toml` and its conversion into [`SentryConfig`].

use std::collections::HashSet;
use std::net::SocketAddr;

use serde::Deserialize;
use toml::Spanned;

use ipnet::IpNet;

use crate::cidr::{self, CidrSet};
use crate::relay::ProxyVersion;

use super::units::{Addr, Cidr, HumanDuration, HumanRate, Key, Name, check_name};
use super::{
    AgentPeer, Checker, ConfigError, ConfigErrors, DEFAULT_DRAIN_TIMEOUT, DEFAULT_IDLE_TIMEOUT,
    DEFAULT_SENTRY_MAX_CONNECTIONS, Limits, Locator, Reserved, Route, SentryConfig, Upstream,
    deserialize,
};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Doc {
    sentry: SentryTable,
    #[serde(default)]
    agent: Vec<AgentTable>,
    wireguard_peer: Reserved,
    #[serde(default)]
    route: Vec<RouteTable>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SentryTable {
    private_key: Spanned<String>,
    quic_listen: Spanned<Addr>,
    wireguard_listen: Reserved,
    wireguard_address: Reserved,
    tls_listen: Reserved,
    metrics_listen: Option<Spanned<Addr>>,
    max_connections: Option<Spanned<u64>>,
    drain_timeout: Option<HumanDuration>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AgentTable {
    name: Spanned<Name>,
    public_key: Spanned<Key>,
    wireguard_address: Reserved,
}

#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum Protocol {
    Tcp,
    Udp,
    Jsonrpc,
}

#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum ProxyProtocol {
    Off,
    V1,
    V2,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteTable {
    name: Spanned<Name>,
    listen: Spanned<Addr>,
    protocol: Option<Spanned<Protocol>>,
    upstream: Spanned<Vec<Spanned<String>>>,
    idle_timeout: Option<HumanDuration>,
    proxy_protocol: Option<Spanned<ProxyProtocol>>,
    allow: Option<Spanned<Vec<Spanned<Cidr>>>>,
    deny: Option<Vec<Spanned<Cidr>>>,
    allow_file: Option<Spanned<String>>,
    deny_file: Option<Spanned<String>>,
    max_connections: Option<Spanned<u64>>,
    max_connections_per_ip: Option<Spanned<u64>>,
    connect_rate_per_ip: Option<HumanRate>,
    jsonrpc: Reserved,
    tls: Reserved,
}

pub(super) fn parse(loc: &Locator<'_>) -> Result<SentryConfig, ConfigErrors> {
    let doc: Doc = deserialize(loc)?;
    let mut check = Checker::new(loc);
    let s = &doc.sentry;
    check.reserved(
        &s.wireguard_listen,
        "sentry.wireguard_listen",
        "the WireGuard transport",
    );
    check.reserved(
        &s.wireguard_address,
        "sentry.wireguard_address",
        "the WireGuard transport",
    );
    check.reserved(&s.tls_listen, "sentry.tls_listen", "the TLS transport");
    check.reserved(
        &doc.wireguard_peer,
        "wireguard_peer",
        "the WireGuard transport",
    );

    check.unique(doc.agent.iter().map(|a| &a.name), "agent name", |i| {
        format!("agent[{i}].name")
    });
    let mut keys = HashSet::new();
    for (i, agent) in doc.agent.iter().enumerate() {
        check.reserved(
            &agent.wireguard_address,
            format!("agent[{i}].wireguard_address"),
            "the WireGuard transport",
        );
        if !keys.insert(agent.public_key.get_ref().0) {
            check.fail(
                &agent.public_key,
                format!("agent[{i}].public_key"),
                "this key is already pinned for another agent; each agent needs its own key",
            );
        }
    }
    let agents: Vec<AgentPeer> = doc
        .agent
        .iter()
        .map(|a| AgentPeer {
            name: a.name.get_ref().0.clone(),
            public_key: a.public_key.get_ref().0,
        })
        .collect();

    check.unique(doc.route.iter().map(|r| &r.name), "route name", |i| {
        format!("route[{i}].name")
    });
    let mut routes = Vec::with_capacity(doc.route.len());
    let mut listens: Vec<SocketAddr> = Vec::new();
    for (i, table) in doc.route.iter().enumerate() {
        let listen = table.listen.get_ref().0;
        if let Some(other) = listens.iter().position(|l| overlaps(*l, listen)) {
            check.fail(
                &table.listen,
                format!("route[{i}].listen"),
                format!(
                    "{listen} overlaps the listen address of route[{other}] ({})",
                    listens[other]
                ),
            );
        }
        listens.push(listen);
        routes.push(route(&mut check, i, table, &agents));
    }
    let metrics_listen = s.metrics_listen.as_ref().map(|m| m.get_ref().0);
    if let (Some(spanned), Some(addr)) = (&s.metrics_listen, metrics_listen)
        && let Some(i) = listens.iter().position(|l| overlaps(*l, addr))
    {
        check.fail(
            spanned,
            "sentry.metrics_listen",
            format!(
                "{addr} overlaps the listen address of route[{i}] ({}); metrics must never be \
                 served on a public route",
                listens[i]
            ),
        );
    }

    let config = SentryConfig {
        private_key: check.key_path(s.private_key.get_ref()),
        quic_listen: s.quic_listen.get_ref().0,
        agents,
        routes,
        max_connections: count(
            &mut check,
            s.max_connections.as_ref(),
            "sentry.max_connections",
            DEFAULT_SENTRY_MAX_CONNECTIONS,
        ),
        metrics_listen,
        drain_timeout: s
            .drain_timeout
            .as_ref()
            .map_or(DEFAULT_DRAIN_TIMEOUT, |d| d.0),
    };
    check.finish(config)
}

fn route(check: &mut Checker<'_>, i: usize, table: &RouteTable, agents: &[AgentPeer]) -> Route {
    let key = |field: &str| format!("route[{i}].{field}");
    if let Some(protocol) = &table.protocol {
        match protocol.get_ref() {
            Protocol::Tcp => {}
            Protocol::Udp => check.fail(
                protocol,
                key("protocol"),
                "protocol \"udp\" is not supported by this version of sentry yet; use \"tcp\"",
            ),
            Protocol::Jsonrpc => check.fail(
                protocol,
                key("protocol"),
                "protocol \"jsonrpc\" is not supported by this version of sentry yet; use \"tcp\"",
            ),
        }
    }
    let proxy_protocol = match table.proxy_protocol.as_ref().map(Spanned::get_ref) {
        None | Some(ProxyProtocol::Off) => None,
        Some(ProxyProtocol::V1) => Some(ProxyVersion::V1),
        Some(ProxyProtocol::V2) => Some(ProxyVersion::V2),
    };
    let limits = limits(check, i, table);
    for (field, value, what) in [
        ("jsonrpc", &table.jsonrpc, "JSON-RPC routes"),
        ("tls", &table.tls, "JSON-RPC routes"),
    ] {
        check.reserved(value, key(field), what);
    }
    if table.upstream.get_ref().is_empty() {
        check.fail(
            &table.upstream,
            key("upstream"),
            "a route needs at least one upstream (\"agent/service\")",
        );
    }
    check.unique(table.upstream.get_ref().iter(), "upstream", |j| {
        format!("route[{i}].upstream[{j}]")
    });
    let mut upstreams = Vec::new();
    for (j, entry) in table.upstream.get_ref().iter().enumerate() {
        match upstream(entry.get_ref(), agents) {
            Ok(up) => upstreams.push(up),
            Err(message) => check.fail(entry, format!("route[{i}].upstream[{j}]"), message),
        }
    }
    Route {
        name: table.name.get_ref().0.clone(),
        listen: table.listen.get_ref().0,
        upstreams,
        idle_timeout: table
            .idle_timeout
            .as_ref()
            .map_or(DEFAULT_IDLE_TIMEOUT, |d| d.0),
        proxy_protocol,
        limits,
    }
}

fn limits(check: &mut Checker<'_>, i: usize, table: &RouteTable) -> Limits {
    let key = |field: &str| format!("route[{i}].{field}");
    let defaults = Limits::default();
    let mut allow: Vec<IpNet> = table
        .allow
        .as_ref()
        .map(|list| list.get_ref().iter().map(|c| c.get_ref().0).collect())
        .unwrap_or_default();
    let mut deny: Vec<IpNet> = table
        .deny
        .as_ref()
        .map(|list| list.iter().map(|c| c.get_ref().0).collect())
        .unwrap_or_default();
    let allow_file = list_file(check, table.allow_file.as_ref(), &key("allow_file"));
    let deny_file = list_file(check, table.deny_file.as_ref(), &key("deny_file"));
    deny.extend(deny_file.unwrap_or_default());
    let allow = match (&table.allow, allow_file) {
        (None, None) => defaults.allow,
        (Some(list), None) if list.get_ref().is_empty() => {
            check.fail(
                list,
                key("allow"),
                "an empty allow list admits nobody; remove the key to admit every address",
            );
            defaults.allow
        }
        (_, file) => {
            let from_file = file.as_ref().map_or(0, Vec::len);
            allow.extend(file.unwrap_or_default());
            if allow.is_empty()
                && let Some(path) = &table.allow_file
            {
                check.fail(
                    path,
                    key("allow_file"),
                    format!(
                        "{} lists no address ({from_file} entries) and there is no inline allow \
                         list: it would admit nobody",
                        path.get_ref()
                    ),
                );
            }
            CidrSet::new(allow)
        }
    };
    let deny = CidrSet::new(deny);
    Limits {
        allow,
        deny,
        max_connections: count(
            check,
            table.max_connections.as_ref(),
            &key("max_connections"),
            defaults.max_connections,
        ),
        max_connections_per_ip: count(
            check,
            table.max_connections_per_ip.as_ref(),
            &key("max_connections_per_ip"),
            defaults.max_connections_per_ip,
        ),
        connect_rate_per_ip: table
            .connect_rate_per_ip
            .as_ref()
            .map_or(defaults.connect_rate_per_ip, |r| r.0),
    }
}

/// The CIDRs of an allow or deny list file; errors name the list file, line and column.
/// `None` when the key is absent or the file is unusable (the error is recorded).
fn list_file(
    check: &mut Checker<'_>,
    path: Option<&Spanned<String>>,
    key: &str,
) -> Option<Vec<IpNet>> {
    let spanned = path?;
    let file = check.key_path(spanned.get_ref());
    let text = match read_list(&file) {
        Ok(text) => text,
        Err(why) => {
            check.fail(
                spanned,
                key,
                format!("cannot read {}: {why}", file.display()),
            );
            return None;
        }
    };
    match cidr::parse_list(&text) {
        Ok(nets) => Some(nets),
        Err(errors) => {
            for e in errors {
                check.errors.push(ConfigError {
                    file: file.clone(),
                    position: Some((e.line, e.column)),
                    key: key.to_owned(),
                    message: e.message,
                });
            }
            None
        }
    }
}

fn read_list(file: &std::path::Path) -> Result<String, String> {
    use std::io::Read;
    let mut text = String::new();
    let handle = std::fs::File::open(file).map_err(|e| e.to_string())?;
    // Bounded: one byte past the limit tells a too-large file from one exactly at it.
    let limit = u64::try_from(cidr::MAX_LIST_BYTES).unwrap_or(u64::MAX) + 1;
    handle
        .take(limit)
        .read_to_string(&mut text)
        .map_err(|e| e.to_string())?;
    if text.len() > cidr::MAX_LIST_BYTES {
        return Err(format!(
            "larger than {} MiB; merge its entries into wider blocks",
            cidr::MAX_LIST_BYTES >> 20
        ));
    }
    Ok(text)
}

/// A connection cap: 1 to 1 000 000, or `default` when absent.
fn count(
    check: &mut Checker<'_>,
    value: Option<&Spanned<u64>>,
    key: &str,
    default: usize,
) -> usize {
    const MAX: u64 = 1_000_000;
    match value {
        None => default,
        Some(v) if (1..=MAX).contains(v.get_ref()) => {
            usize::try_from(*v.get_ref()).unwrap_or(default)
        }
        Some(v) => {
            check.fail(
                v,
                key,
                format!("must be from 1 to {MAX} (a cap of 0 admits nobody)"),
            );
            default
        }
    }
}

fn upstream(text: &str, agents: &[AgentPeer]) -> Result<Upstream, String> {
    let Some((agent, service)) = text.split_once('/') else {
        return Err(format!(
            "invalid upstream {text:?}: expected \"agent/service\", such as \"validator-1/p2p\""
        ));
    };
    check_name(agent)
        .and_then(|()| check_name(service))
        .map_err(|e| format!("invalid upstream {text:?}: {e}"))?;
    if !agents.iter().any(|a| a.name == agent) {
        let known: Vec<&str> = agents.iter().map(|a| a.name.as_str()).collect();
        return Err(format!(
            "upstream {text:?} names agent {agent:?}, which no [[agent]] defines (known: {known:?})"
        ));
    }
    Ok(Upstream {
        agent: agent.to_owned(),
        service: service.to_owned(),
    })
}

/// Two TCP listen addresses conflict when their ports match and either their IPs match or one
/// is a wildcard (a `[::]` socket may also take IPv4, so wildcards conflict across families).
/// Port 0 (any free port, used by tests and the demo) never conflicts.
fn overlaps(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() != 0
        && a.port() == b.port()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

//! The schema of `agent.toml` and its conversion into [`AgentConfig`].

use std::net::IpAddr;

use serde::Deserialize;
use toml::Spanned;

use super::egress::DEFAULT_EGRESS_LISTENER_MAX_CONNECTIONS;
use super::sentry_file::wireguard_window;
use super::units::{Addr, HostPort, HumanDuration, HumanWindow, Key, Name};
use super::{
    AgentConfig, AgentWireGuard, Checker, ConfigErrors, DEFAULT_DRAIN_TIMEOUT,
    DEFAULT_MAX_STREAMS_PER_SENTRY, DEFAULT_SERVICE_MAX_CONNECTIONS, Destination, EgressListener,
    EgressMode, Locator, SentryPeer, Service, Source, TransportKind, deserialize, overlay_address,
};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Doc {
    agent: AgentTable,
    #[serde(default)]
    sentry: Vec<SentryTable>,
    #[serde(default)]
    service: Vec<ServiceTable>,
    #[serde(default)]
    egress: Vec<EgressTable>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AgentTable {
    name: Spanned<Name>,
    private_key: Spanned<String>,
    metrics_listen: Option<Spanned<Addr>>,
    drain_timeout: Option<HumanDuration>,
    max_streams_per_sentry: Option<Spanned<u64>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum Transport {
    Quic,
    Wireguard,
    Tls,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SentryTable {
    address: Spanned<HostPort>,
    public_key: Spanned<Key>,
    transport: Option<Spanned<Transport>>,
    wireguard_address: Option<Spanned<String>>,
    sentry_wireguard_address: Option<Spanned<String>>,
    wireguard_window: Option<Spanned<HumanWindow>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ServiceTable {
    name: Spanned<Name>,
    target: Spanned<Addr>,
    protocol: Option<ServiceProtocol>,
    max_connections: Option<Spanned<u64>>,
    source: Option<Spanned<SourceKey>>,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum SourceKey {
    Mapped,
    Agent,
    Client,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EgressTable {
    listen: Spanned<Addr>,
    mode: Spanned<ModeKey>,
    to: Option<Spanned<String>>,
    max_connections: Option<Spanned<u64>>,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum ModeKey {
    Transparent,
    Socks5,
    Forward,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum ServiceProtocol {
    Tcp,
    Udp,
}

/// The overlay addresses: both with `transport = "wireguard"`, neither otherwise.
fn wireguard(
    check: &mut Checker<'_>,
    i: usize,
    table: &SentryTable,
    transport: TransportKind,
) -> Option<AgentWireGuard> {
    let fields = [
        ("wireguard_address", &table.wireguard_address),
        ("sentry_wireguard_address", &table.sentry_wireguard_address),
    ];
    if transport != TransportKind::WireGuard {
        if let Some(window) = &table.wireguard_window {
            check.fail(
                window,
                format!("sentry[{i}].wireguard_window"),
                "applies only with transport = \"wireguard\"",
            );
        }
        for (field, value) in fields {
            if let Some(value) = value {
                check.fail(
                    value,
                    format!("sentry[{i}].{field}"),
                    "applies only with transport = \"wireguard\"",
                );
            }
        }
        return None;
    }
    let mut ips = Vec::new();
    for (field, value) in fields {
        let key = format!("sentry[{i}].{field}");
        match value {
            None => check.errors.push(check.loc.error(
                Some(table.address.span()),
                &key,
                format!(
                    "transport = \"wireguard\" needs {field} (the same overlay addresses as in the sentry's config)"
                ),
            )),
            Some(value) => match overlay_address(value.get_ref()) {
                Ok(ip) => ips.push(ip),
                Err(why) => check.fail(value, key, why),
            },
        }
    }
    if table.public_key.get_ref().0.wireguard().is_none() {
        check.fail(
            &table.public_key,
            format!("sentry[{i}].public_key"),
            "not an Ed25519 public key, so it has no WireGuard form",
        );
    }
    match ips[..] {
        [address, sentry_address] if address != sentry_address => Some(AgentWireGuard {
            address,
            sentry_address,
            window: wireguard_window(
                check,
                table.wireguard_window.as_ref(),
                &format!("sentry[{i}].wireguard_window"),
            ),
        }),
        [_, _] => {
            if let Some(value) = &table.wireguard_address {
                check.fail(
                    value,
                    format!("sentry[{i}].wireguard_address"),
                    "the agent and the sentry need different overlay addresses",
                );
            }
            None
        }
        _ => None,
    }
}

pub(super) fn parse(loc: &Locator<'_>) -> Result<AgentConfig, ConfigErrors> {
    let doc: Doc = deserialize(loc)?;
    let mut check = Checker::new(loc);
    if doc.sentry.is_empty() {
        check.errors.push(loc.error(
            None,
            "sentry",
            "no [[sentry]] entry: the agent needs at least one sentry to dial",
        ));
    }
    if doc.service.is_empty() {
        check.errors.push(loc.error(
            None,
            "service",
            "no [[service]] entry: nothing would be reachable through this agent",
        ));
    }
    let mut sentries = Vec::new();
    for (i, table) in doc.sentry.iter().enumerate() {
        let transport = match table.transport.as_ref().map(Spanned::get_ref) {
            None | Some(Transport::Quic) => TransportKind::Quic,
            Some(Transport::Wireguard) => TransportKind::WireGuard,
            Some(Transport::Tls) => TransportKind::Tls,
        };
        let wireguard = wireguard(&mut check, i, table, transport);
        sentries.push(SentryPeer {
            address: table.address.get_ref().0.clone(),
            public_key: table.public_key.get_ref().0,
            transport,
            wireguard,
        });
    }
    check.unique(
        doc.sentry.iter().map(|s| &s.address),
        "sentry address",
        |i| format!("sentry[{i}].address"),
    );
    check.unique(doc.service.iter().map(|s| &s.name), "service name", |i| {
        format!("service[{i}].name")
    });
    let services = doc
        .service
        .iter()
        .enumerate()
        .map(|(i, s)| Service {
            name: s.name.get_ref().0.clone(),
            target: s.target.get_ref().0,
            udp: matches!(s.protocol, Some(ServiceProtocol::Udp)),
            max_connections: cap(
                &mut check,
                s.max_connections.as_ref(),
                &format!("service[{i}].max_connections"),
                DEFAULT_SERVICE_MAX_CONNECTIONS,
            ),
            source: source(&mut check, i, s),
        })
        .collect();
    let egress = egress(&mut check, &doc.egress);
    let max_streams_per_sentry = cap(
        &mut check,
        doc.agent.max_streams_per_sentry.as_ref(),
        "agent.max_streams_per_sentry",
        DEFAULT_MAX_STREAMS_PER_SENTRY,
    );
    let config = AgentConfig {
        name: doc.agent.name.get_ref().0.clone(),
        private_key: check.key_path(doc.agent.private_key.get_ref()),
        sentries,
        services,
        metrics_listen: doc.agent.metrics_listen.as_ref().map(|m| m.get_ref().0),
        drain_timeout: doc
            .agent
            .drain_timeout
            .as_ref()
            .map_or(DEFAULT_DRAIN_TIMEOUT, |d| d.0),
        max_streams_per_sentry,
        egress,
        warnings: Vec::new(),
    };
    check.metrics_listen(doc.agent.metrics_listen.as_ref(), "agent.metrics_listen");
    let (mut config, warnings) = check.finish(config)?;
    config.warnings = warnings;
    Ok(config)
}

/// `[[service]] source`: `mapped` by default for an IPv4 loopback target (all of
/// 127.0.0.0/8 is local), `agent` otherwise; `mapped` needs an IPv4 loopback target.
fn source(check: &mut Checker<'_>, i: usize, table: &ServiceTable) -> Source {
    let target = table.target.get_ref().0;
    let mappable = matches!(target.ip(), IpAddr::V4(ip) if ip.is_loopback());
    let key = format!("service[{i}].source");
    match table.source.as_ref().map(|s| (s, *s.get_ref())) {
        None if mappable => Source::Mapped,
        None | Some((_, SourceKey::Agent)) => Source::Agent,
        Some((_, SourceKey::Mapped)) if mappable => Source::Mapped,
        Some((spanned, SourceKey::Mapped)) => {
            check.fail(
                spanned,
                key,
                format!(
                    "\"mapped\" needs an IPv4 loopback target (the node listening on                      127.0.0.1): each client gets a source address in 127.0.0.0/8, which is                      local only to this host; {target} is not one. Use \"agent\""
                ),
            );
            Source::Agent
        }
        Some((spanned, SourceKey::Client)) => {
            check.fail(
                spanned,
                key,
                "\"client\" (the real client address, IP_TRANSPARENT) is not built in this                  version; \"mapped\" gives each client its own stable loopback address",
            );
            Source::Agent
        }
    }
}

/// `[[egress]]` listeners: loopback only (anything else would make the agent an open proxy
/// for its network), listen addresses unique, `to` exactly with `mode = "forward"`.
fn egress(check: &mut Checker<'_>, tables: &[EgressTable]) -> Vec<EgressListener> {
    let mut listeners: Vec<EgressListener> = Vec::new();
    for (i, table) in tables.iter().enumerate() {
        let key = |field: &str| format!("egress[{i}].{field}");
        let listen = table.listen.get_ref().0;
        if !listen.ip().is_loopback() {
            check.fail(
                &table.listen,
                key("listen"),
                format!(
                    "{listen} is not a loopback address: an egress listener reachable from                      another host would let it send traffic out through your sentries; listen                      on 127.0.0.1"
                ),
            );
        }
        if listeners.iter().any(|l| l.listen == listen) {
            check.fail(
                &table.listen,
                key("listen"),
                format!("duplicate egress listen address {listen}"),
            );
        }
        let mode = match (*table.mode.get_ref(), &table.to) {
            (ModeKey::Forward, Some(to)) => match Destination::parse(to.get_ref()) {
                Ok(destination) => EgressMode::Forward(destination),
                Err(why) => {
                    check.fail(to, key("to"), why);
                    continue;
                }
            },
            (ModeKey::Forward, None) => {
                check.fail(
                    &table.mode,
                    key("to"),
                    "mode = \"forward\" needs to = \"HOST:PORT\", the one destination",
                );
                continue;
            }
            (_, Some(to)) => {
                check.fail(to, key("to"), "applies only with mode = \"forward\"");
                continue;
            }
            (ModeKey::Transparent, None) => EgressMode::Transparent,
            (ModeKey::Socks5, None) => EgressMode::Socks5,
        };
        listeners.push(EgressListener {
            listen,
            mode,
            max_connections: cap(
                check,
                table.max_connections.as_ref(),
                &key("max_connections"),
                DEFAULT_EGRESS_LISTENER_MAX_CONNECTIONS,
            ),
        });
    }
    listeners
}

/// A cap from 1 to 65 536 (`default` when absent).
fn cap(check: &mut Checker<'_>, value: Option<&Spanned<u64>>, key: &str, default: usize) -> usize {
    check.cap(
        value,
        key,
        default,
        (65_536, "a cap of 0 would take nothing"),
    )
}

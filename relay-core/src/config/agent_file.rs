//! The schema of `agent.toml` and its conversion into [`AgentConfig`].

use serde::Deserialize;
use toml::Spanned;

use super::sentry_file::wireguard_window;
use super::units::{Addr, HostPort, HumanDuration, HumanWindow, Key, Name};
use super::{
    AgentConfig, AgentWireGuard, Checker, ConfigErrors, DEFAULT_DRAIN_TIMEOUT,
    DEFAULT_MAX_STREAMS_PER_SENTRY, DEFAULT_SERVICE_MAX_CONNECTIONS, Locator, SentryPeer, Service,
    TransportKind, deserialize, overlay_address,
};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Doc {
    agent: AgentTable,
    #[serde(default)]
    sentry: Vec<SentryTable>,
    #[serde(default)]
    service: Vec<ServiceTable>,
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
        })
        .collect();
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
    };
    check.finish(config)
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

//! The schema of `agent.toml` and its conversion into [`AgentConfig`].

use serde::Deserialize;
use toml::Spanned;

use super::units::{Addr, HostPort, HumanDuration, Key, Name};
use super::{
    AgentConfig, Checker, ConfigErrors, DEFAULT_DRAIN_TIMEOUT, Locator, Reserved, SentryPeer,
    Service, TransportKind, deserialize,
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
    wireguard_address: Reserved,
    sentry_wireguard_address: Reserved,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ServiceTable {
    name: Spanned<Name>,
    target: Spanned<Addr>,
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
        check.reserved(
            &table.wireguard_address,
            format!("sentry[{i}].wireguard_address"),
            "the WireGuard transport",
        );
        check.reserved(
            &table.sentry_wireguard_address,
            format!("sentry[{i}].sentry_wireguard_address"),
            "the WireGuard transport",
        );
        let transport = match table.transport.as_ref().map(Spanned::get_ref) {
            None | Some(Transport::Quic) => TransportKind::Quic,
            Some(Transport::Wireguard | Transport::Tls) => {
                if let Some(t) = &table.transport {
                    check.fail(
                        t,
                        format!("sentry[{i}].transport"),
                        "only \"quic\" is supported by this version of sentry yet",
                    );
                }
                TransportKind::Quic
            }
        };
        sentries.push(SentryPeer {
            address: table.address.get_ref().0.clone(),
            public_key: table.public_key.get_ref().0,
            transport,
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
        .map(|s| Service {
            name: s.name.get_ref().0.clone(),
            target: s.target.get_ref().0,
        })
        .collect();
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
    };
    check.finish(config)
}

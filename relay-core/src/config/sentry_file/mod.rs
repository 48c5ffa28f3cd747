//! The schema of `sentry.toml` and its conversion into [`SentryConfig`].

mod egress;
mod route;

use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddr};

use serde::Deserialize;
use toml::Spanned;

use super::units::{Addr, Cidr, HumanDuration, HumanRate, HumanSize, HumanWindow, Key, Name};
use super::{
    AgentPeer, Checker, ConfigErrors, DEFAULT_DRAIN_TIMEOUT, DEFAULT_SENTRY_MAX_CONNECTIONS,
    DEFAULT_WIREGUARD_WINDOW, Locator, SentryConfig, WIREGUARD_WINDOW, Window, WireGuard,
    WireGuardPeer, deserialize, overlay_address,
};
use route::{count, is_udp, overlaps, route};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Doc {
    sentry: SentryTable,
    #[serde(default)]
    agent: Vec<AgentTable>,
    #[serde(default)]
    wireguard_peer: Vec<WireGuardPeerTable>,
    #[serde(default)]
    route: Vec<RouteTable>,
    egress: Option<egress::EgressTable>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WireGuardPeerTable {
    name: Spanned<Name>,
    public_key: Spanned<Key>,
    address: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SentryTable {
    private_key: Spanned<String>,
    quic_listen: Option<Spanned<Addr>>,
    wireguard_listen: Option<Spanned<Addr>>,
    wireguard_address: Option<Spanned<String>>,
    wireguard_window: Option<Spanned<HumanWindow>>,
    tls_listen: Option<Spanned<Addr>>,
    metrics_listen: Option<Spanned<Addr>>,
    max_connections: Option<Spanned<u64>>,
    drain_timeout: Option<HumanDuration>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AgentTable {
    name: Spanned<Name>,
    public_key: Spanned<Key>,
    wireguard_address: Option<Spanned<String>>,
    egress: Option<bool>,
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
    jsonrpc: Option<Spanned<JsonRpcTable>>,
    tls: Option<Spanned<TlsTable>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsTable {
    cert: Spanned<String>,
    key: Spanned<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct JsonRpcTable {
    preset: Option<Spanned<String>>,
    #[serde(default)]
    allow_paths: Vec<Spanned<String>>,
    #[serde(default)]
    allow_methods: Vec<Spanned<String>>,
    #[serde(default)]
    deny_methods: Vec<Spanned<String>>,
    websocket: Option<bool>,
    max_body: Option<Spanned<HumanSize>>,
    max_batch: Option<Spanned<u64>>,
    rate_per_ip: Option<HumanRate>,
    max_websockets_per_ip: Option<Spanned<u64>>,
    forwarded: Option<Spanned<ForwardedKey>>,
}

/// `forwarded = "x-forwarded-for" | "forwarded" | "none"`.
#[derive(Deserialize)]
enum ForwardedKey {
    #[serde(rename = "x-forwarded-for")]
    XForwardedFor,
    #[serde(rename = "forwarded")]
    Rfc7239,
    #[serde(rename = "none")]
    None,
}

pub(super) fn parse(loc: &Locator<'_>) -> Result<SentryConfig, ConfigErrors> {
    let doc: Doc = deserialize(loc)?;
    let mut check = Checker::new(loc);
    let s = &doc.sentry;
    let wireguard = wireguard(&mut check, &doc);

    check.unique(doc.agent.iter().map(|a| &a.name), "agent name", |i| {
        format!("agent[{i}].name")
    });
    let mut keys = HashSet::new();
    // Overlay addresses taken, and by whom.
    let mut overlay: Vec<(Ipv4Addr, String)> = wireguard
        .iter()
        .map(|w| (w.address, "sentry.wireguard_address".to_owned()))
        .collect();
    let mut wg_keys = HashSet::new();
    let mut agent_overlay = Vec::new();
    for (i, agent) in doc.agent.iter().enumerate() {
        let address = agent.wireguard_address.as_ref().and_then(|spanned| {
            let key = format!("agent[{i}].wireguard_address");
            if wireguard.is_none() {
                check.fail(
                    spanned,
                    &key,
                    "an agent's overlay address needs sentry.wireguard_listen and \
                     sentry.wireguard_address",
                );
                return None;
            }
            let ip = overlay_ip(&mut check, spanned, &key, &mut overlay)?;
            match agent.public_key.get_ref().0.wireguard() {
                Some(wg) => {
                    wg_keys.insert(wg);
                }
                None => check.fail(
                    &agent.public_key,
                    format!("agent[{i}].public_key"),
                    "not an Ed25519 public key, so it has no WireGuard form",
                ),
            }
            Some(ip)
        });
        agent_overlay.push(address);
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
        .zip(agent_overlay)
        .map(|(a, wireguard_address)| AgentPeer {
            name: a.name.get_ref().0.clone(),
            public_key: a.public_key.get_ref().0,
            wireguard_address,
            egress: a.egress.unwrap_or(false),
        })
        .collect();
    let wireguard_peers = wireguard_peers(
        &mut check,
        &doc,
        wireguard.is_some(),
        &mut overlay,
        &mut wg_keys,
    );
    check.unique(
        doc.agent
            .iter()
            .map(|a| &a.name)
            .chain(doc.wireguard_peer.iter().map(|p| &p.name)),
        "agent or wireguard_peer name",
        |i| {
            if i < doc.agent.len() {
                format!("agent[{i}].name")
            } else {
                format!("wireguard_peer[{}].name", i - doc.agent.len())
            }
        },
    );

    check.unique(doc.route.iter().map(|r| &r.name), "route name", |i| {
        format!("route[{i}].name")
    });
    let mut routes = Vec::with_capacity(doc.route.len());
    // TCP listeners (tcp and jsonrpc routes), by route index; UDP ones apart: a tcp and a
    // udp route may share a port, as Ethereum's 30303 does.
    let mut listens: Vec<SocketAddr> = Vec::new();
    let quic_listen = s.quic_listen.as_ref().map(|q| q.get_ref().0);
    let mut udp_listens: Vec<(SocketAddr, String)> = quic_listen
        .map(|q| (q, "sentry.quic_listen".to_owned()))
        .into_iter()
        .collect();
    if let Some(wg) = &wireguard {
        udp_listens.push((wg.listen, "sentry.wireguard_listen".to_owned()));
    }
    for (i, table) in doc.route.iter().enumerate() {
        let listen = table.listen.get_ref().0;
        if is_udp(table) {
            if let Some((other, whose)) = udp_listens.iter().find(|(l, _)| overlaps(*l, listen)) {
                check.fail(
                    &table.listen,
                    format!("route[{i}].listen"),
                    format!("{listen} overlaps the UDP listen address of {whose} ({other})"),
                );
            }
            udp_listens.push((listen, format!("route[{i}]")));
            // A placeholder keeps `listens` indexed by route; port 0 never overlaps.
            listens.push(SocketAddr::from(([0, 0, 0, 0], 0)));
        } else {
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
        }
        routes.push(route(&mut check, i, table, &agents, &wireguard_peers));
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

    let tls_listen = s.tls_listen.as_ref().map(|t| t.get_ref().0);
    if let (Some(spanned), Some(addr)) = (&s.tls_listen, tls_listen) {
        let taken = listens
            .iter()
            .enumerate()
            .map(|(i, l)| (*l, format!("route[{i}]")))
            .chain(metrics_listen.map(|m| (m, "sentry.metrics_listen".to_owned())));
        if let Some((other, whose)) = taken.into_iter().find(|(l, _)| overlaps(*l, addr)) {
            check.fail(
                spanned,
                "sentry.tls_listen",
                format!("{addr} overlaps the listen address of {whose} ({other})"),
            );
        }
    }

    let config = SentryConfig {
        private_key: check.key_path(s.private_key.get_ref()),
        quic_listen,
        tls_listen,
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
        wireguard,
        wireguard_peers,
        egress: egress::policy(&mut check, doc.egress.as_ref()),
        warnings: Vec::new(),
    };
    check.metrics_listen(s.metrics_listen.as_ref(), "sentry.metrics_listen");
    if config.quic_listen.is_none() && config.wireguard.is_none() && config.tls_listen.is_none() {
        // At the [sentry] table, where the key belongs.
        let table = loc.text.find("[sentry]").map(|at| at..at);
        check.errors.push(loc.error(
            table,
            "sentry.quic_listen",
            "no tunnel listener: set quic_listen (QUIC, the usual one), wireguard_listen or \
             tls_listen, or several; agents connect to it",
        ));
    }
    let (mut config, warnings) = check.finish(config)?;
    config.warnings = warnings;
    Ok(config)
}

/// `wireguard_listen` with `wireguard_address`: both or neither.
fn wireguard(check: &mut Checker<'_>, doc: &Doc) -> Option<WireGuard> {
    let s = &doc.sentry;
    match (&s.wireguard_listen, &s.wireguard_address) {
        (Some(listen), Some(address)) => {
            let listen_addr = listen.get_ref().0;
            if let Some(quic) = s.quic_listen.as_ref().map(|q| q.get_ref().0)
                && overlaps(listen_addr, quic)
            {
                check.fail(
                    listen,
                    "sentry.wireguard_listen",
                    format!("{listen_addr} is also quic_listen ({quic}); both are UDP, pick another port (51820 is WireGuard's usual one)"),
                );
            }
            let mut taken = Vec::new();
            let address = overlay_ip(check, address, "sentry.wireguard_address", &mut taken)?;
            let window = wireguard_window(
                check,
                s.wireguard_window.as_ref(),
                "sentry.wireguard_window",
            );
            Some(WireGuard {
                listen: listen_addr,
                address,
                window,
            })
        }
        (Some(listen), None) => {
            check.fail(
                listen,
                "sentry.wireguard_listen",
                "needs sentry.wireguard_address too: the sentry's own address inside the overlay, such as \"100.64.0.1\"",
            );
            None
        }
        (None, Some(address)) => {
            check.fail(
                address,
                "sentry.wireguard_address",
                "applies only with sentry.wireguard_listen",
            );
            None
        }
        (None, None) => {
            if let Some(window) = &s.wireguard_window {
                check.fail(
                    window,
                    "sentry.wireguard_window",
                    "applies only with sentry.wireguard_listen",
                );
            }
            None
        }
    }
}

/// `wireguard_window`, checked: `"auto"` or within [`WIREGUARD_WINDOW`], the default when
/// absent.
pub(super) fn wireguard_window(
    check: &mut Checker<'_>,
    value: Option<&Spanned<HumanWindow>>,
    key: &str,
) -> Window {
    let Some(value) = value else {
        return DEFAULT_WIREGUARD_WINDOW;
    };
    match value.get_ref().0 {
        Window::Auto => Window::Auto,
        Window::Fixed(n) if WIREGUARD_WINDOW.contains(&n) => Window::Fixed(n),
        Window::Fixed(_) => {
            check.fail(
                value,
                key,
                format!(
                    "must be \"auto\" or from {}KiB to {}MiB: each overlay stream holds this \
                     much each way (one window per round trip: 4MiB carries 0.8 Gbit/s at 40 ms)",
                    WIREGUARD_WINDOW.start() >> 10,
                    WIREGUARD_WINDOW.end() >> 20
                ),
            );
            DEFAULT_WIREGUARD_WINDOW
        }
    }
}

/// An overlay address that nobody else in this config has taken.
fn overlay_ip(
    check: &mut Checker<'_>,
    spanned: &Spanned<String>,
    key: &str,
    taken: &mut Vec<(Ipv4Addr, String)>,
) -> Option<Ipv4Addr> {
    match overlay_address(spanned.get_ref()) {
        Ok(ip) => {
            if let Some((_, owner)) = taken.iter().find(|(t, _)| *t == ip) {
                check.fail(
                    spanned,
                    key,
                    format!("{ip} is already {owner}; overlay addresses are unique"),
                );
            } else {
                taken.push((ip, key.to_owned()));
            }
            Some(ip)
        }
        Err(why) => {
            check.fail(spanned, key, why);
            None
        }
    }
}

/// `[[wireguard_peer]]` entries: only with a WireGuard listener; keys and addresses unique.
fn wireguard_peers(
    check: &mut Checker<'_>,
    doc: &Doc,
    enabled: bool,
    overlay: &mut Vec<(Ipv4Addr, String)>,
    wg_keys: &mut HashSet<[u8; 32]>,
) -> Vec<WireGuardPeer> {
    let mut peers = Vec::new();
    for (i, table) in doc.wireguard_peer.iter().enumerate() {
        if !enabled {
            check.fail(
                &table.name,
                format!("wireguard_peer[{i}]"),
                "a plain WireGuard peer needs sentry.wireguard_listen and sentry.wireguard_address",
            );
            continue;
        }
        let public_key = *table.public_key.get_ref().0.as_bytes();
        if !wg_keys.insert(public_key) {
            check.fail(
                &table.public_key,
                format!("wireguard_peer[{i}].public_key"),
                "this WireGuard key is already another peer's (or an agent's); each needs its own",
            );
        }
        let Some(address) = overlay_ip(
            check,
            &table.address,
            &format!("wireguard_peer[{i}].address"),
            overlay,
        ) else {
            continue;
        };
        peers.push(WireGuardPeer {
            name: table.name.get_ref().0.clone(),
            public_key,
            address,
        });
    }
    peers
}

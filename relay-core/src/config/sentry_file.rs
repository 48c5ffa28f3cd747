//! The schema of `sentry.toml` and its conversion into [`SentryConfig`].

use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

use serde::Deserialize;
use toml::Spanned;

use ipnet::IpNet;

use crate::cidr::{self, CidrSet};

use crate::jsonrpc::glob::{PathError, canonical_path};
use crate::jsonrpc::{Policy, preset};

use super::units::{
    Addr, Cidr, HumanDuration, HumanRate, HumanSize, HumanWindow, Key, Name, check_name,
};
use super::{
    AgentPeer, Checker, ConfigError, ConfigErrors, DEFAULT_CALL_RATE_PER_IP, DEFAULT_DRAIN_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_BODY, DEFAULT_MAX_WEBSOCKETS_PER_IP,
    DEFAULT_SENTRY_MAX_CONNECTIONS, DEFAULT_UDP_IDLE_TIMEOUT, DEFAULT_WIREGUARD_WINDOW,
    ForwardedHeader, JsonRpc, Limits, Locator, ProxyVersion, Route, RouteTls, SentryConfig,
    Upstream, WIREGUARD_WINDOW, Window, WireGuard, WireGuardPeer, deserialize, overlay_address,
};

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
    quic_listen: Spanned<Addr>,
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
    let mut udp_listens: Vec<(SocketAddr, String)> =
        vec![(s.quic_listen.get_ref().0, "sentry.quic_listen".to_owned())];
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
        quic_listen: s.quic_listen.get_ref().0,
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
    };
    check.finish(config)
}

/// `wireguard_listen` with `wireguard_address`: both or neither.
fn wireguard(check: &mut Checker<'_>, doc: &Doc) -> Option<WireGuard> {
    let s = &doc.sentry;
    match (&s.wireguard_listen, &s.wireguard_address) {
        (Some(listen), Some(address)) => {
            let listen_addr = listen.get_ref().0;
            let quic = s.quic_listen.get_ref().0;
            if overlaps(listen_addr, quic) {
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

fn is_udp(table: &RouteTable) -> bool {
    matches!(
        table.protocol.as_ref().map(Spanned::get_ref),
        Some(Protocol::Udp)
    )
}

fn route(
    check: &mut Checker<'_>,
    i: usize,
    table: &RouteTable,
    agents: &[AgentPeer],
    plain: &[WireGuardPeer],
) -> Route {
    let key = |field: &str| format!("route[{i}].{field}");
    let is_jsonrpc = matches!(
        table.protocol.as_ref().map(Spanned::get_ref),
        Some(Protocol::Jsonrpc)
    );
    let udp = is_udp(table);
    let proxy_protocol = match table.proxy_protocol.as_ref().map(Spanned::get_ref) {
        None | Some(ProxyProtocol::Off) => None,
        Some(ProxyProtocol::V1) => Some(ProxyVersion::V1),
        Some(ProxyProtocol::V2) => Some(ProxyVersion::V2),
    };
    if let (true, Some(spanned), Some(_)) = (udp, &table.proxy_protocol, proxy_protocol) {
        check.fail(
            spanned,
            key("proxy_protocol"),
            "a PROXY header starts a TCP stream; a udp route cannot send one",
        );
    }
    if let (true, Some(spanned), Some(_)) = (is_jsonrpc, &table.proxy_protocol, proxy_protocol) {
        check.fail(
            spanned,
            key("proxy_protocol"),
            "a jsonrpc route serves many clients over each upstream connection, so a PROXY \
             header cannot name the client; the client's address goes in a header instead \
             ([route.jsonrpc] forwarded)",
        );
    }
    let limits = limits(check, i, table);
    let mut jsonrpc = match (&table.jsonrpc, is_jsonrpc) {
        (Some(spanned), true) => Some(jsonrpc(check, i, spanned.get_ref())),
        (None, true) => Some(jsonrpc(check, i, &JsonRpcTable::default())),
        (Some(spanned), false) => {
            check.fail(
                spanned,
                key("jsonrpc"),
                "[route.jsonrpc] applies only to a route with protocol = \"jsonrpc\"",
            );
            None
        }
        (None, false) => None,
    };
    match (&table.tls, &mut jsonrpc) {
        (Some(spanned), Some(settings)) => settings.tls = tls(check, i, spanned.get_ref()),
        (Some(spanned), None) => check.fail(
            spanned,
            key("tls"),
            "[route.tls] applies only to a route with protocol = \"jsonrpc\" (a tcp route \
             relays TLS untouched to the node)",
        ),
        (None, _) => {}
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
        match upstream(entry.get_ref(), agents, plain) {
            Ok(up) if udp && up.overlay.is_some() => check.fail(
                entry,
                format!("route[{i}].upstream[{j}]"),
                "a udp route relays through an agent (\"agent/service\"); a plain WireGuard \
                 peer's address carries TCP only",
            ),
            Ok(up) => upstreams.push(up),
            Err(message) => check.fail(entry, format!("route[{i}].upstream[{j}]"), message),
        }
    }
    let default_idle = if udp {
        DEFAULT_UDP_IDLE_TIMEOUT
    } else {
        DEFAULT_IDLE_TIMEOUT
    };
    Route {
        name: table.name.get_ref().0.clone(),
        listen: table.listen.get_ref().0,
        upstreams,
        idle_timeout: table.idle_timeout.as_ref().map_or(default_idle, |d| d.0),
        proxy_protocol,
        limits,
        jsonrpc,
        udp,
    }
}

/// `[route.jsonrpc]`, with the defaults of an absent table.
fn jsonrpc(check: &mut Checker<'_>, i: usize, table: &JsonRpcTable) -> JsonRpc {
    let key = |field: &str| format!("route[{i}].jsonrpc.{field}");
    let preset = match &table.preset {
        None => preset::NONE,
        Some(name) => preset::by_name(name.get_ref()).unwrap_or_else(|| {
            let known: Vec<&str> = preset::ALL.iter().map(|p| p.name).collect();
            check.fail(
                name,
                key("preset"),
                format!("unknown preset {:?} (known: {known:?})", name.get_ref()),
            );
            preset::NONE
        }),
    };
    for (j, path) in table.allow_paths.iter().enumerate() {
        if let Err(why) = check_path_glob(path.get_ref()) {
            check.fail(path, format!("route[{i}].jsonrpc.allow_paths[{j}]"), why);
        }
    }
    for (field, list) in [
        ("allow_methods", &table.allow_methods),
        ("deny_methods", &table.deny_methods),
    ] {
        for (j, glob) in list.iter().enumerate() {
            if let Err(why) = check_method_glob(glob.get_ref()) {
                check.fail(glob, format!("route[{i}].jsonrpc.{field}[{j}]"), why);
            }
        }
    }
    let max_body = match &table.max_body {
        None => DEFAULT_MAX_BODY,
        Some(size) if (1024..=MAX_MAX_BODY).contains(&size.get_ref().0) => {
            usize::try_from(size.get_ref().0).unwrap_or(DEFAULT_MAX_BODY)
        }
        Some(size) => {
            check.fail(
                size,
                key("max_body"),
                format!("must be from 1KiB to {}MiB", MAX_MAX_BODY >> 20),
            );
            DEFAULT_MAX_BODY
        }
    };
    let max_batch = match &table.max_batch {
        None => None,
        Some(n) if (1..=1000).contains(n.get_ref()) => usize::try_from(*n.get_ref()).ok(),
        Some(n) => {
            check.fail(n, key("max_batch"), "must be from 1 to 1000");
            None
        }
    };
    let strings = |list: &[Spanned<String>]| -> Vec<String> {
        list.iter().map(|s| s.get_ref().clone()).collect()
    };
    let policy = Policy::new(
        &preset,
        &strings(&table.allow_paths),
        &strings(&table.allow_methods),
        &strings(&table.deny_methods),
        max_body,
        max_batch,
    );
    let max_websockets_per_ip = match &table.max_websockets_per_ip {
        None => DEFAULT_MAX_WEBSOCKETS_PER_IP,
        Some(n) if (1..=10_000).contains(n.get_ref()) => {
            usize::try_from(*n.get_ref()).unwrap_or(DEFAULT_MAX_WEBSOCKETS_PER_IP)
        }
        Some(n) => {
            check.fail(
                n,
                key("max_websockets_per_ip"),
                "must be from 1 to 10000 (websocket = false turns WebSockets off)",
            );
            DEFAULT_MAX_WEBSOCKETS_PER_IP
        }
    };
    JsonRpc {
        preset: preset.name,
        policy,
        websocket: table.websocket.unwrap_or(true),
        rate_per_ip: table
            .rate_per_ip
            .as_ref()
            .map_or(DEFAULT_CALL_RATE_PER_IP, |r| r.0),
        max_websockets_per_ip,
        tls: None,
        forwarded: match table.forwarded.as_ref().map(Spanned::get_ref) {
            None | Some(ForwardedKey::XForwardedFor) => ForwardedHeader::XForwardedFor,
            Some(ForwardedKey::Rfc7239) => ForwardedHeader::Forwarded,
            Some(ForwardedKey::None) => ForwardedHeader::None,
        },
    }
}

/// Largest certificate or key file read.
const MAX_PEM: u64 = 1 << 20;

/// A `[route.tls]` key file, at most [`MAX_PEM`] bytes: refused when anyone but its owner and
/// group may read it (checked on the opened file). Group-readable is allowed: Debian's
/// `ssl-cert` group is how daemons are given keys.
fn read_tls_key(path: &std::path::Path) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let file =
        std::fs::File::open(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let meta = file
        .metadata()
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if let Err(crate::keys::OwnerOrMode::Mode(mode)) =
        crate::keys::check_owner_and_mode(&meta, 0o007)
    {
        return Err(format!(
            "{} is readable by anyone (mode {mode:04o}); run `chmod o-rwx {}`",
            path.display(),
            path.display()
        ));
    }
    let mut bytes = Vec::new();
    (&file)
        .take(MAX_PEM + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if bytes.len() as u64 > MAX_PEM {
        return Err(format!("{} is larger than 1 MiB", path.display()));
    }
    Ok(bytes)
}

/// `[route.tls]`: both files read, parsed and checked to belong together.
fn tls(check: &mut Checker<'_>, i: usize, table: &TlsTable) -> Option<RouteTls> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};

    let cert_path = check.key_path(table.cert.get_ref());
    let key_path = check.key_path(table.key.get_ref());
    let read = |path: &std::path::Path| -> Result<Vec<u8>, String> {
        use std::io::Read;
        let mut bytes = Vec::new();
        std::fs::File::open(path)
            .and_then(|f| f.take(MAX_PEM + 1).read_to_end(&mut bytes))
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        if bytes.len() as u64 > MAX_PEM {
            return Err(format!("{} is larger than 1 MiB", path.display()));
        }
        Ok(bytes)
    };
    let cert_pem = match read(&cert_path) {
        Ok(bytes) => bytes,
        Err(why) => {
            check.fail(&table.cert, format!("route[{i}].tls.cert"), why);
            return None;
        }
    };
    let key_pem = match read_tls_key(&key_path) {
        Ok(bytes) => zeroize::Zeroizing::new(bytes),
        Err(why) => {
            check.fail(&table.key, format!("route[{i}].tls.key"), why);
            return None;
        }
    };
    let certs: Result<Vec<CertificateDer<'static>>, _> =
        CertificateDer::pem_slice_iter(&cert_pem).collect();
    let certs = match certs {
        Ok(certs) if !certs.is_empty() => certs,
        Ok(_) | Err(_) => {
            let why = format!(
                "{} holds no PEM certificate (\"-----BEGIN CERTIFICATE-----\")",
                cert_path.display()
            );
            check.fail(&table.cert, format!("route[{i}].tls.cert"), why);
            return None;
        }
    };
    let Ok(key) = PrivateKeyDer::from_pem_slice(&key_pem) else {
        let why = format!(
            "{} holds no PEM private key (PKCS#8, PKCS#1 or SEC1)",
            key_path.display()
        );
        check.fail(&table.key, format!("route[{i}].tls.key"), why);
        return None;
    };
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let built = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .and_then(|b| b.with_no_client_auth().with_single_cert(certs, key));
    let mut server = match built {
        Ok(server) => server,
        Err(e) => {
            let why = format!(
                "{} and {} do not make a usable certificate: {e}",
                cert_path.display(),
                key_path.display()
            );
            check.fail(&table.key, format!("route[{i}].tls.key"), why);
            return None;
        }
    };
    server.alpn_protocols = vec![b"http/1.1".to_vec()];
    let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
    digest.update(&cert_pem);
    digest.update(&key_pem);
    let mut bytes = [0u8; 32];
    bytes.copy_from_slice(digest.finish().as_ref());
    Some(RouteTls {
        cert: cert_path,
        key: key_path,
        server: std::sync::Arc::new(server),
        digest: bytes,
    })
}

/// Largest accepted `max_body`: a JSON-RPC request is buffered whole before it is checked.
const MAX_MAX_BODY: u64 = 64 << 20;

fn check_path_glob(glob: &str) -> Result<(), String> {
    let example = "such as \"/api/v3\" or \"/api/v3/*\"";
    if !glob.starts_with('/') {
        return Err(format!(
            "invalid path {glob:?}: a path starts with '/', {example}"
        ));
    }
    // A `*` segment stands for one segment; the rest must be a canonical path itself, or
    // no client request could ever match it.
    let literal: Vec<&str> = glob
        .split('/')
        .map(|segment| if segment == "*" { "x" } else { segment })
        .collect();
    canonical_path(&literal.join("/")).map_err(|e| {
        let why = match e {
            PathError::Shape => "too long",
            PathError::Character => {
                "a character that a canonical path does not contain ('*' stands alone as a segment)"
            }
            PathError::Segment => "an empty or dot segment, or one ending in a dot",
        };
        format!("invalid path {glob:?}: {why}; write it as a client's canonical path, {example}")
    })
}

fn check_method_glob(glob: &str) -> Result<(), String> {
    let ok = !glob.is_empty()
        && glob.len() <= 128
        && glob.bytes().all(|b| b.is_ascii_graphic() && b != b'"');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid method glob {glob:?}: 1 to 128 printable characters, '*' matching any run, \
             such as \"eth_*\" or \"icx_getBalance\""
        ))
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

fn upstream(text: &str, agents: &[AgentPeer], plain: &[WireGuardPeer]) -> Result<Upstream, String> {
    let Some((agent, service)) = text.split_once('/') else {
        return Err(format!(
            "invalid upstream {text:?}: expected \"agent/service\", such as \"validator-1/p2p\""
        ));
    };
    if let Some(peer) = plain.iter().find(|p| p.name == agent) {
        let target: SocketAddrV4 = service.parse().map_err(|_| {
            format!(
                "upstream {text:?} names the plain WireGuard peer {agent:?}: expected \"{agent}/IP:PORT\" inside the overlay, such as \"{agent}/{}:7100\"",
                peer.address
            )
        })?;
        if *target.ip() != peer.address {
            return Err(format!(
                "upstream {text:?}: {agent:?} has the overlay address {}; a route may reach only that address through it",
                peer.address
            ));
        }
        return Ok(Upstream {
            agent: agent.to_owned(),
            service: service.to_owned(),
            overlay: Some(target),
        });
    }
    check_name(agent)
        .and_then(|()| check_name(service))
        .map_err(|e| format!("invalid upstream {text:?}: {e}"))?;
    if !agents.iter().any(|a| a.name == agent) {
        let known: Vec<&str> = agents
            .iter()
            .map(|a| a.name.as_str())
            .chain(plain.iter().map(|p| p.name.as_str()))
            .collect();
        return Err(format!(
            "upstream {text:?} names agent {agent:?}, which no [[agent]] or [[wireguard_peer]] defines (known: {known:?})"
        ));
    }
    Ok(Upstream {
        agent: agent.to_owned(),
        service: service.to_owned(),
        overlay: None,
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

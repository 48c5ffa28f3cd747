//! Config files for both roles, parsed once into validated types.
//!
//! The schema structs (in `sentry_file` and `agent_file`) mirror the documented config keys
//! (the README and `configs/*.example.toml`) one by one with `deny_unknown_fields`; each is
//! converted once into the types below, which hold
//! `SocketAddr`, `Duration` and `PublicKey` values and never an `Option` that "must be set".
//! Every error names the file, the line and column, and the key path. Keys that the contract
//! defines but this version does not implement yet are refused by name rather than ignored:
//! silently ignoring, say, a `deny` list would be a security hole.

mod agent_file;
mod egress;
mod error;
mod sentry_file;
pub mod units;

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use toml::Spanned;

use error::Locator;
pub use error::{ConfigError, ConfigErrors};

use crate::cidr::CidrSet;
use crate::keys::PublicKey;
pub use egress::{
    Destination, EgressListener, EgressMode, EgressPolicy, MAX_HOST_NAME, Source, check_host_name,
};
pub use units::Window;

/// Default `idle_timeout` of a route: a relayed connection silent both ways this long is
/// closed. P2P links of most chains ping well within it.
pub(crate) const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(15 * 60);
/// A UDP flow (one client address on a udp route) with no datagram either way for this long
/// is forgotten; discovery protocols exchange a few datagrams and go quiet.
pub(crate) const DEFAULT_UDP_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Default `drain_timeout` of both roles: after SIGTERM/SIGINT, open relayed connections get
/// this long to finish before the rest are closed.
pub(crate) const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// A parsed config file of either role.
#[derive(Debug, Clone)]
pub enum Config {
    Sentry(Box<SentryConfig>),
    Agent(AgentConfig),
}

/// `sentry serve`'s config.
#[derive(Debug, Clone)]
pub struct SentryConfig {
    /// The private key file, resolved against the config file's directory.
    pub private_key: PathBuf,
    /// Where agents connect over QUIC (UDP), when set. At least one of `quic_listen`,
    /// `wireguard_listen` and `tls_listen` is.
    pub quic_listen: Option<SocketAddr>,
    /// Where agents connect over TCP+TLS, when set (networks that block UDP). Never a route's
    /// or the metrics address.
    pub tls_listen: Option<SocketAddr>,
    /// Agents allowed to connect, by pinned key. Names and keys are unique.
    pub agents: Vec<AgentPeer>,
    /// Public listeners. Names are unique, listen addresses do not overlap, and every
    /// upstream names a configured agent.
    pub routes: Vec<Route>,
    /// Open relayed connections across all routes.
    pub max_connections: usize,
    /// Where `GET /metrics` and `GET /healthz` are served; never a route's address.
    pub metrics_listen: Option<SocketAddr>,
    /// How long open relayed connections may take to finish after SIGTERM/SIGINT.
    pub drain_timeout: Duration,
    /// `wireguard_listen` and `wireguard_address`: the WireGuard transport, when set.
    pub wireguard: Option<WireGuard>,
    /// `[[wireguard_peer]]`: plain WireGuard peers (no agent software). Names are unique
    /// among agents and peers, keys and overlay addresses among everyone.
    pub wireguard_peers: Vec<WireGuardPeer>,
    /// `[egress]`: what the sentry dials for agents with `egress = true` (defaults when the
    /// table is absent).
    pub egress: EgressPolicy,
    /// What is valid but probably not meant (`sentry check` prints them, the daemon logs
    /// them at start), each with its file, line and column.
    pub warnings: Vec<ConfigError>,
}

/// The sentry's WireGuard listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WireGuard {
    /// The UDP address agents and plain peers send to.
    pub listen: SocketAddr,
    /// The sentry's own address inside the overlay.
    pub address: Ipv4Addr,
    /// `wireguard_window`: each overlay stream's receive and send buffer.
    pub window: Window,
}

/// Range of a fixed `wireguard_window`, and the default (sized for the round trip).
pub(crate) const WIREGUARD_WINDOW: std::ops::RangeInclusive<usize> =
    units::MIN_WINDOW..=units::MAX_WINDOW;
pub(crate) const DEFAULT_WIREGUARD_WINDOW: Window = Window::Auto;

/// Which PROXY protocol version a route asks the agent to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyVersion {
    /// Text: `PROXY TCP4 <src> <dst> <sport> <dport>\r\n`.
    V1,
    /// Binary, with the 12-byte signature.
    V2,
}

/// A plain WireGuard peer (kernel `wg`, wireguard-go): routes reach addresses inside it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireGuardPeer {
    pub name: String,
    /// Its WireGuard public key, as `wg pubkey` prints it.
    pub public_key: [u8; 32],
    /// Its overlay address: the only source address accepted from it, and the only one
    /// routes may name through it.
    pub address: Ipv4Addr,
}

/// An agent the sentry lets in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentPeer {
    pub name: String,
    pub public_key: PublicKey,
    /// Its overlay address, when it may connect over WireGuard.
    pub wireguard_address: Option<Ipv4Addr>,
    /// `egress = true`: its node's outbound connections may leave from this sentry (under
    /// [`SentryConfig::egress`]).
    pub egress: bool,
}

/// A public TCP listener relayed to agents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub name: String,
    pub listen: SocketAddr,
    /// Failover order: the first connected agent that answers ok serves (at least one).
    pub upstreams: Vec<Upstream>,
    /// A relayed connection silent in both directions this long is closed.
    pub idle_timeout: Duration,
    /// The PROXY header the agent writes to the service before any payload; `None` (the
    /// default, `"off"`) writes nothing, as goloop's P2P port requires.
    pub proxy_protocol: Option<ProxyVersion>,
    /// Who may connect and how much (admission control).
    pub limits: Limits,
    /// `Some` for a `protocol = "jsonrpc"` route: HTTP is served on the listener and every
    /// request filtered (see [`crate::jsonrpc`]); `None` relays TCP byte for byte.
    pub jsonrpc: Option<JsonRpc>,
    /// `protocol = "udp"`: `listen` is a UDP socket, each client address a flow relayed to
    /// a `udp` service; the limits count flows; `idle_timeout` expires them.
    pub udp: bool,
}

/// A JSON-RPC route's gateway: `[route.jsonrpc]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonRpc {
    /// The preset's name (`icon`, `ethereum`, `cosmos`, `none`).
    pub preset: &'static str,
    /// The preset and the config's lists, merged.
    pub policy: crate::jsonrpc::Policy,
    /// Whether WebSocket upgrades are relayed (on the policy's WebSocket paths only).
    pub websocket: bool,
    /// JSON-RPC calls per client (IPv4 address or IPv6 /64); a batch counts each call.
    pub rate_per_ip: units::Rate,
    /// Open WebSockets per client.
    pub max_websockets_per_ip: usize,
    /// How the client's address is told to the node.
    pub forwarded: ForwardedHeader,
    /// `[route.tls]`: HTTPS terminated on the sentry. `None`: plain HTTP.
    pub tls: Option<RouteTls>,
}

/// A JSON-RPC route's certificate and key, read and checked when the config is loaded (so a
/// reload re-reads them, and a bad file is a config error at its key).
#[derive(Clone)]
pub struct RouteTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// TLS 1.3, ALPN `http/1.1`, the certificate chain and key of the files.
    pub server: std::sync::Arc<rustls::ServerConfig>,
    /// SHA-256 over what was read: tells a changed file apart on reload.
    pub digest: [u8; 32],
    /// When the leaf certificate expires (seconds since 1970, UTC), if it could be read.
    pub not_after: Option<i64>,
}

impl PartialEq for RouteTls {
    fn eq(&self, other: &Self) -> bool {
        self.cert == other.cert && self.key == other.key && self.digest == other.digest
    }
}

impl Eq for RouteTls {}

impl std::fmt::Debug for RouteTls {
    // Never the key material.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouteTls")
            .field("cert", &self.cert)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

/// The header that carries the client's address to the node. Whatever a client sends in
/// `X-Forwarded-For`, `Forwarded` or `X-Real-IP` is always removed first: a client must never
/// choose the address the node sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForwardedHeader {
    /// `X-Forwarded-For: <client>` and `X-Forwarded-Proto` (the default; goloop, geth and
    /// CometBFT log it).
    XForwardedFor,
    /// RFC 7239 `Forwarded: for=<client>;proto=<http|https>`.
    Forwarded,
    /// No client address header.
    None,
}

/// Default of `[route.jsonrpc] max_body`.
pub(crate) const DEFAULT_MAX_BODY: usize = 1 << 20;
/// Default of `[route.jsonrpc] rate_per_ip`: 50 calls/s.
pub(crate) const DEFAULT_CALL_RATE_PER_IP: units::Rate = units::Rate {
    count: std::num::NonZeroU32::new(50).expect("invariant: 50 is not zero"),
    per: Duration::from_secs(1),
};
/// Default of `[route.jsonrpc] max_websockets_per_ip`.
pub(crate) const DEFAULT_MAX_WEBSOCKETS_PER_IP: usize = 4;

/// A route's admission policy. See [`crate::admission`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Client addresses admitted (non-empty): `allow` and `allow_file` together. Default:
    /// everyone.
    pub allow: CidrSet,
    /// Client addresses refused, `deny` and `deny_file` together; deny wins over allow.
    /// Default: none.
    pub deny: CidrSet,
    /// Open connections on this route.
    pub max_connections: usize,
    /// Open connections on this route from one client (IPv4 address or IPv6 /64).
    pub max_connections_per_ip: usize,
    /// New connections per client (IPv4 address or IPv6 /64); a burst of one interval's
    /// count is allowed.
    pub connect_rate_per_ip: units::Rate,
}

/// Default of `[[route]] max_connections`.
pub(crate) const DEFAULT_MAX_CONNECTIONS: usize = 4096;
/// Default of `[[route]] max_connections_per_ip`.
pub(crate) const DEFAULT_MAX_CONNECTIONS_PER_IP: usize = 16;
/// Default of `[[route]] connect_rate_per_ip`: 20/s.
pub(crate) const DEFAULT_CONNECT_RATE_PER_IP: units::Rate = units::Rate {
    count: std::num::NonZeroU32::new(20).expect("invariant: 20 is not zero"),
    per: Duration::from_secs(1),
};
/// Default of `[sentry] max_connections`: open relayed connections across all routes.
pub(crate) const DEFAULT_SENTRY_MAX_CONNECTIONS: usize = 16384;

/// Every address, IPv4 and IPv6: the default `allow` of routes and of `[egress]`.
pub(crate) fn everyone() -> CidrSet {
    CidrSet::new([
        "0.0.0.0/0".parse().expect("invariant: valid CIDR"),
        "::/0".parse().expect("invariant: valid CIDR"),
    ])
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            allow: everyone(),
            deny: CidrSet::default(),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_connections_per_ip: DEFAULT_MAX_CONNECTIONS_PER_IP,
            connect_rate_per_ip: DEFAULT_CONNECT_RATE_PER_IP,
        }
    }
}

/// `agent/service` in a route's upstream list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    /// An agent's name, or a plain WireGuard peer's.
    pub agent: String,
    /// The agent's service name; for a plain peer, the `IP:PORT` text.
    pub service: String,
    /// `Some` for a plain WireGuard peer: the address connected to inside the overlay (no
    /// relay header: the peer runs no agent).
    pub overlay: Option<SocketAddrV4>,
}

/// `sentry agent`'s config.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub name: String,
    /// The private key file, resolved against the config file's directory.
    pub private_key: PathBuf,
    /// Sentries to keep a tunnel to (at least one).
    pub sentries: Vec<SentryPeer>,
    /// The only targets a sentry can reach (at least one, names unique).
    pub services: Vec<Service>,
    /// Where `GET /metrics` and `GET /healthz` are served.
    pub metrics_listen: Option<SocketAddr>,
    /// How long open relayed connections may take to finish after SIGTERM/SIGINT.
    pub drain_timeout: Duration,
    /// Relayed streams (and TLS data connections) one sentry may hold open at this agent.
    pub max_streams_per_sentry: usize,
    /// `[[egress]]`: loopback listeners whose connections leave from the sentries (listen
    /// addresses unique).
    pub egress: Vec<EgressListener>,
    /// What is valid but probably not meant (see [`SentryConfig::warnings`]).
    pub warnings: Vec<ConfigError>,
}

/// Default of `[agent] max_streams_per_sentry`: what one sentry may make this agent hold at
/// once (a compromised sentry cannot hold more), far above a validator's peers and RPC load.
pub(crate) const DEFAULT_MAX_STREAMS_PER_SENTRY: usize = 2048;
/// Default of `[[service]] max_connections`: relayed connections (or UDP flows) to one service
/// at once, across all sentries.
pub(crate) const DEFAULT_SERVICE_MAX_CONNECTIONS: usize = 1024;

/// A sentry the agent dials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentryPeer {
    /// `HOST:PORT`, resolved at every connection attempt.
    pub address: String,
    pub public_key: PublicKey,
    pub transport: TransportKind,
    /// With `transport = "wireguard"`: the two overlay addresses.
    pub wireguard: Option<AgentWireGuard>,
}

/// An agent's overlay addresses toward one sentry (the same as in that sentry's config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AgentWireGuard {
    /// This agent's address inside the overlay.
    pub address: Ipv4Addr,
    /// The sentry's address inside the overlay.
    pub sentry_address: Ipv4Addr,
    /// `wireguard_window`: each overlay stream's receive and send buffer.
    pub window: Window,
}

/// How the agent reaches a sentry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportKind {
    Quic,
    WireGuard,
    Tls,
}

impl TransportKind {
    /// The name used in configs, logs and metrics.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Quic => "quic",
            Self::WireGuard => "wireguard",
            Self::Tls => "tls",
        }
    }
}

/// A service the agent exports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub name: String,
    pub target: SocketAddr,
    /// `protocol = "udp"`: reachable by udp routes only (TCP ones never reach it, nor UDP
    /// ones a TCP service).
    pub udp: bool,
    /// Relayed connections (UDP flows) to it at once; past it the agent answers `Busy`.
    pub max_connections: usize,
    /// How the agent's connections (UDP flows) to it are addressed.
    pub source: Source,
}

/// Read and validate a config file of either role; the role is told by its top table
/// (`[sentry]` or `[agent]`).
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    let text = read(path)?;
    let loc = Locator {
        file: path,
        text: &text,
    };
    let table: toml::Table = toml::from_str(&text).map_err(|e| toml_error(&loc, "", &e))?;
    let is_table = |key: &str| table.get(key).is_some_and(toml::Value::is_table);
    if is_table("sentry") && is_table("agent") {
        return Err(loc
            .error(
                None,
                "",
                "both a [sentry] and an [agent] table: an agent config lists its sentries as \
                 [[sentry]] (double brackets, one per sentry), a sentry config its agents as \
                 [[agent]]",
            )
            .into());
    }
    if is_table("sentry") {
        sentry_file::parse(&loc).map(|c| Config::Sentry(Box::new(c)))
    } else if is_table("agent") {
        agent_file::parse(&loc).map(Config::Agent)
    } else {
        Err(loc
            .error(
                None,
                "",
                "neither a sentry config (it has no [sentry] table) nor an agent config \
                 (it has no [agent] table)",
            )
            .into())
    }
}

/// Read and validate a `sentry serve` config.
pub fn load_sentry(path: &Path) -> Result<SentryConfig, ConfigErrors> {
    let text = read(path)?;
    sentry_file::parse(&Locator {
        file: path,
        text: &text,
    })
}

/// Read and validate a `sentry agent` config.
pub fn load_agent(path: &Path) -> Result<AgentConfig, ConfigErrors> {
    let text = read(path)?;
    agent_file::parse(&Locator {
        file: path,
        text: &text,
    })
}

/// Validate sentry config text; `path` names it in errors and anchors relative key paths.
pub fn parse_sentry(path: &Path, text: &str) -> Result<SentryConfig, ConfigErrors> {
    sentry_file::parse(&Locator { file: path, text })
}

/// Validate agent config text; `path` names it in errors and anchors relative key paths.
pub fn parse_agent(path: &Path, text: &str) -> Result<AgentConfig, ConfigErrors> {
    agent_file::parse(&Locator { file: path, text })
}

fn read(path: &Path) -> Result<String, ConfigErrors> {
    std::fs::read_to_string(path).map_err(|e| {
        ConfigError {
            file: path.to_owned(),
            position: None,
            key: String::new(),
            message: format!("cannot read the config file: {e}"),
        }
        .into()
    })
}

fn toml_error(loc: &Locator<'_>, key: &str, error: &toml::de::Error) -> ConfigError {
    let message = error.message().trim_end();
    let message = match brackets_hint(key, message) {
        Some(hint) => format!("{message} ({hint})"),
        None => message.to_owned(),
    };
    let message = message.as_str();
    let mut key = key.to_owned();
    if key.is_empty() && message.starts_with("duplicate key") {
        // The parser points at the repeated key but does not name it.
        let text = error
            .span()
            .and_then(|s| loc.text.get(s))
            .unwrap_or_default();
        if !text.is_empty() && text.len() <= 64 && !text.contains(['\n', '=']) {
            key = text.trim().to_owned();
        }
    }
    loc.error(error.span(), key, message)
}

/// A hint for a table written with the wrong brackets: `[route]` for `[[route]]` (a list of
/// tables), or `[[egress]]` in a sentry config for its one `[egress]`.
fn brackets_hint(key: &str, message: &str) -> Option<String> {
    let lists = [
        "sentry",
        "agent",
        "route",
        "service",
        "wireguard_peer",
        "egress",
    ];
    if lists.contains(&key) && message.contains("expected a sequence") {
        return Some(format!(
            "write [[{key}]], with double brackets: one such table per {key}"
        ));
    }
    if key.starts_with("egress[") && message.contains("expected a sequence") {
        return Some(
            "a sentry config has one [egress] table, with single brackets; [[egress]] \
             listeners belong in an agent config"
                .to_owned(),
        );
    }
    None
}

/// The key path of a serde error, without the private segments `toml::Spanned` adds.
fn key_path(path: &serde_path_to_error::Path) -> String {
    let text = path.to_string();
    let kept: Vec<&str> = text
        .split('.')
        .filter(|segment| !segment.starts_with("$__serde_spanned"))
        .collect();
    let joined = kept.join(".");
    if joined == "." || joined.is_empty() {
        String::new()
    } else {
        joined
    }
}

/// Deserialize the whole file into a schema struct, keeping the key path of the first error.
fn deserialize<T: DeserializeOwned>(loc: &Locator<'_>) -> Result<T, ConfigErrors> {
    let de = toml::Deserializer::parse(loc.text).map_err(|e| toml_error(loc, "", &e))?;
    serde_path_to_error::deserialize(de)
        .map_err(|e| toml_error(loc, &key_path(e.path()), e.inner()).into())
}

/// An overlay address: IPv4, unicast, not loopback (the overlay is its own network; the
/// CGNAT range 100.64.0.0/10 is the usual choice).
fn overlay_address(text: &str) -> Result<Ipv4Addr, String> {
    let ip: Ipv4Addr = text
        .parse()
        .map_err(|_| format!("{text:?} is not an IPv4 address (the overlay is IPv4)"))?;
    if ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast() || ip.is_loopback() {
        return Err(format!(
            "{ip} cannot be an overlay address (pick a unicast address such as 100.64.0.1)"
        ));
    }
    Ok(ip)
}

/// Collects validation errors so the operator sees all of them at once, and warnings about
/// what is valid but probably not meant.
struct Checker<'a> {
    loc: &'a Locator<'a>,
    errors: Vec<ConfigError>,
    warnings: Vec<ConfigError>,
}

impl<'a> Checker<'a> {
    fn new(loc: &'a Locator<'a>) -> Self {
        Self {
            loc,
            errors: Vec::new(),
            warnings: Vec::new(),
        }
    }

    /// Something valid, but probably not what was meant.
    fn warn<T>(
        &mut self,
        spanned: &Spanned<T>,
        key: impl Into<String>,
        message: impl Into<String>,
    ) {
        let warning = self.loc.error(Some(spanned.span()), key, message);
        self.warnings.push(warning);
    }

    /// A list of CIDRs as blocks: one written with host bits set means its block, and says so.
    fn cidrs(&mut self, list: &[Spanned<units::Cidr>], key: &str) -> Vec<ipnet::IpNet> {
        list.iter()
            .enumerate()
            .map(|(i, cidr)| {
                let written = cidr.get_ref().0;
                let block = written.trunc();
                if block != written {
                    self.warn(
                        cidr,
                        format!("{key}[{i}]"),
                        format!("{written} has host bits set: it means {block}"),
                    );
                }
                block
            })
            .collect()
    }

    /// A `metrics_listen` other hosts can reach: `/metrics` and `/peers` tell them the routes,
    /// agents and peers' addresses.
    fn metrics_listen(&mut self, value: Option<&Spanned<units::Addr>>, key: &str) {
        if let Some(spanned) = value
            && !spanned.get_ref().0.ip().is_loopback()
        {
            self.warn(
                spanned,
                key,
                format!(
                    "{} is reachable from other hosts: /metrics (and the agent's /peers) tell \
                     whoever connects your routes, tunnels and peers' addresses; listen on \
                     127.0.0.1, or keep it behind a firewall",
                    spanned.get_ref().0
                ),
            );
        }
    }

    fn fail<T>(
        &mut self,
        spanned: &Spanned<T>,
        key: impl Into<String>,
        message: impl Into<String>,
    ) {
        let error = self.loc.error(Some(spanned.span()), key, message);
        self.errors.push(error);
    }

    /// A cap from 1 to `max`, or `default` when absent; a value out of range is reported, `why`
    /// saying what a cap of 0 would do.
    fn cap(
        &mut self,
        value: Option<&Spanned<u64>>,
        key: &str,
        default: usize,
        (max, why): (u64, &str),
    ) -> usize {
        match value {
            None => default,
            Some(v) if (1..=max).contains(v.get_ref()) => {
                usize::try_from(*v.get_ref()).unwrap_or(default)
            }
            Some(v) => {
                self.fail(v, key, format!("must be from 1 to {max} ({why})"));
                default
            }
        }
    }

    /// Report names seen twice; `key` builds the key path of entry `i`.
    fn unique<'n>(
        &mut self,
        names: impl IntoIterator<Item = &'n Spanned<impl AsRef<str> + 'n>>,
        what: &str,
        key: impl Fn(usize) -> String,
    ) {
        let mut seen = std::collections::HashSet::new();
        for (i, name) in names.into_iter().enumerate() {
            if !seen.insert(name.get_ref().as_ref().to_owned()) {
                self.fail(
                    name,
                    key(i),
                    format!("duplicate {what} {:?}", name.get_ref().as_ref()),
                );
            }
        }
    }

    /// The value, with the warnings gathered; or every error.
    fn finish<T>(self, value: T) -> Result<(T, Vec<ConfigError>), ConfigErrors> {
        if self.errors.is_empty() {
            Ok((value, self.warnings))
        } else {
            Err(ConfigErrors(self.errors))
        }
    }

    /// A key file path, relative paths taken from the config file's directory.
    fn key_path(&self, path: &str) -> PathBuf {
        let base = self.loc.file.parent().unwrap_or_else(|| Path::new("."));
        base.join(path)
    }
}

//! A `[[route]]` table of `sentry.toml`: its listener, upstreams, admission limits, lists,
//! and for `protocol = "jsonrpc"` its gateway settings and TLS.

use std::net::{SocketAddr, SocketAddrV4};

use ipnet::IpNet;
use toml::Spanned;

use super::{ForwardedKey, JsonRpcTable, Protocol, ProxyProtocol, RouteTable, TlsTable};
use crate::cidr::{self, CidrSet};
use crate::config::units::check_name;
use crate::config::{
    AgentPeer, Checker, ConfigError, DEFAULT_CALL_RATE_PER_IP, DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_BODY, DEFAULT_MAX_WEBSOCKETS_PER_IP, DEFAULT_UDP_IDLE_TIMEOUT, ForwardedHeader,
    JsonRpc, Limits, ProxyVersion, Route, RouteTls, Upstream, WireGuardPeer,
};
use crate::jsonrpc::glob::{PathError, canonical_path};
use crate::jsonrpc::{Policy, preset};

pub(super) fn is_udp(table: &RouteTable) -> bool {
    matches!(
        table.protocol.as_ref().map(Spanned::get_ref),
        Some(Protocol::Udp)
    )
}

pub(super) fn route(
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
pub(super) fn jsonrpc(check: &mut Checker<'_>, i: usize, table: &JsonRpcTable) -> JsonRpc {
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
pub(super) const MAX_PEM: u64 = 1 << 20;

/// A `[route.tls]` key file, at most [`MAX_PEM`] bytes: refused when anyone but its owner and
/// group may read it (checked on the opened file). Group-readable is allowed: Debian's
/// `ssl-cert` group is how daemons are given keys.
/// Why a certificate or key file cannot be read, with the fix when it is permissions: under
/// systemd the sentry reads them through the `sentry-tls` group.
fn cannot_read(path: &std::path::Path, e: &std::io::Error) -> String {
    let mut why = format!("cannot read {}: {e}", path.display());
    if e.kind() == std::io::ErrorKind::PermissionDenied {
        why += &format!(
            " (the daemon runs as uid {}; sentry.service reads certificates through the \
             sentry-tls group: install them root's, group sentry-tls, mode 0640, in a directory \
             it can enter such as /etc/sentry/tls; certbot's deploy hook \
             /usr/share/sentry/certbot-deploy-hook does that)",
            rustix::process::geteuid().as_raw()
        );
    }
    why
}

pub(super) fn read_tls_key(path: &std::path::Path) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|e| cannot_read(path, &e))?;
    let meta = file.metadata().map_err(|e| cannot_read(path, &e))?;
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
pub(super) fn tls(check: &mut Checker<'_>, i: usize, table: &TlsTable) -> Option<RouteTls> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};

    let cert_path = check.key_path(table.cert.get_ref());
    let key_path = check.key_path(table.key.get_ref());
    let read = |path: &std::path::Path| -> Result<Vec<u8>, String> {
        use std::io::Read;
        let mut bytes = Vec::new();
        std::fs::File::open(path)
            .and_then(|f| f.take(MAX_PEM + 1).read_to_end(&mut bytes))
            .map_err(|e| cannot_read(path, &e))?;
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
    let not_after = crate::x509::not_after(&certs[0]);
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
        not_after,
    })
}

/// Largest accepted `max_body`: a JSON-RPC request is buffered whole before it is checked.
pub(super) const MAX_MAX_BODY: u64 = 64 << 20;

pub(super) fn check_path_glob(glob: &str) -> Result<(), String> {
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

pub(super) fn check_method_glob(glob: &str) -> Result<(), String> {
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

pub(super) fn limits(check: &mut Checker<'_>, i: usize, table: &RouteTable) -> Limits {
    let key = |field: &str| format!("route[{i}].{field}");
    let defaults = Limits::default();
    let mut allow: Vec<IpNet> = match &table.allow {
        Some(list) => check.cidrs(list.get_ref(), &key("allow")),
        None => Vec::new(),
    };
    let mut deny: Vec<IpNet> = check.cidrs(table.deny.as_deref().unwrap_or_default(), &key("deny"));
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
pub(super) fn list_file(
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

pub(super) fn read_list(file: &std::path::Path) -> Result<String, String> {
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
pub(super) fn count(
    check: &mut Checker<'_>,
    value: Option<&Spanned<u64>>,
    key: &str,
    default: usize,
) -> usize {
    check.cap(value, key, default, (1_000_000, "a cap of 0 admits nobody"))
}

pub(super) fn upstream(
    text: &str,
    agents: &[AgentPeer],
    plain: &[WireGuardPeer],
) -> Result<Upstream, String> {
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
pub(super) fn overlaps(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() != 0
        && a.port() == b.port()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

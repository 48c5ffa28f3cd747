//! `sentry check`: a config of either role validated as the daemon would load it, its key
//! read as the daemon would read it (unless `--no-key`), and its warnings: what is valid but
//! probably not meant.

use std::path::Path;

use relay_core::config::{self, Config, ConfigError};
use relay_core::keys::{KeySource, PrivateKey, PublicKey};

/// Check the config at `path` (and its key, when `with_key`); print what was found, and with
/// `print` the effective config.
///
/// # Errors
/// The config or its key is invalid, with every reason.
pub fn check(path: &Path, with_key: bool, print: bool) -> Result<(), String> {
    let config = config::load(path).map_err(|e| e.to_string())?;
    let (role, key_name, key_path, warnings) = match &config {
        Config::Sentry(c) => ("sentry", "sentry.private_key", &c.private_key, &c.warnings),
        Config::Agent(c) => ("agent", "agent.private_key", &c.private_key, &c.warnings),
    };
    let key = if with_key {
        let (key, source) = crate::key::load(key_name, key_path)?;
        if let KeySource::Credential { .. } = source {
            println!("{key_name}: read from the {source}");
        }
        Some(key)
    } else {
        None
    };
    let public = key.as_ref().map_or_else(
        || format!("key not read ({})", key_path.display()),
        |k| format!("public key {}", k.public_key()),
    );
    match &config {
        Config::Sentry(c) => {
            println!(
                "{}: ok: {role} config, {public}, {} agent(s), {} route(s)",
                path.display(),
                c.agents.len(),
                c.routes.len()
            );
            // What the public host's firewall must let in.
            let mut open: Vec<String> = c
                .routes
                .iter()
                .map(|r| {
                    let proto = if r.udp { "udp" } else { "tcp" };
                    format!("{proto} {} (route {})", r.listen, r.name)
                })
                .collect();
            if let Some(quic) = c.quic_listen {
                open.push(format!("udp {quic} (quic_listen)"));
            }
            if let Some(wg) = c.wireguard {
                open.push(format!("udp {} (wireguard_listen)", wg.listen));
            }
            if let Some(tls) = c.tls_listen {
                open.push(format!("tcp {tls} (tls_listen)"));
            }
            println!("listeners to open: {}", open.join(", "));
            if let Some(metrics) = c.metrics_listen {
                println!("metrics (keep private): tcp {metrics}");
            }
            if let (Some(key), Some(_)) = (&key, c.wireguard) {
                // What a plain peer's `wg` config needs as this sentry's key.
                println!(
                    "WireGuard: public key {}, {} plain peer(s)",
                    key.wireguard_public_base64(),
                    c.wireguard_peers.len()
                );
            }
        }
        Config::Agent(c) => {
            println!(
                "{}: ok: {role} config {:?}, {public}, {} sentry(ies), {} service(s), {} \
                 egress listener(s)",
                path.display(),
                c.name,
                c.sentries.len(),
                c.services.len(),
                c.egress.len()
            );
        }
    }
    for warning in warnings {
        println!("warning: {warning}");
    }
    if let Some(key) = &key
        && let Some(pinned) = own_key_pinned(&config, key)
    {
        println!("warning: {pinned}");
    }
    if print {
        let text = match &config {
            Config::Sentry(c) => crate::effective::sentry(c),
            Config::Agent(c) => crate::effective::agent(c),
        };
        println!("\n# The effective config: every default filled in.\n{text}");
    }
    Ok(())
}

/// A config that pins its own host's key as its peer's (the same key file copied to both
/// hosts, or the wrong public key pasted): the tunnel cannot be what was meant.
pub fn own_key_pinned(config: &Config, key: &PrivateKey) -> Option<String> {
    let own: PublicKey = key.public_key();
    match config {
        Config::Sentry(c) => c.agents.iter().find(|a| a.public_key == own).map(|a| {
            format!(
                "agent {:?} is pinned with this sentry's own public key: each host needs its \
                 own key (`sentry keygen` on the agent's host, its public key here)",
                a.name
            )
        }),
        Config::Agent(c) => c.sentries.iter().find(|s| s.public_key == own).map(|s| {
            format!(
                "sentry {} is pinned with this agent's own public key: pin the key `sentry \
                 pubkey` prints on the sentry's host",
                s.address
            )
        }),
    }
}

/// Log what a daemon's config (and key) warn about: at start and at each reload.
pub fn log_warnings(warnings: &[ConfigError], own_key: Option<String>) {
    for warning in warnings {
        tracing::warn!("config: {warning}");
    }
    if let Some(pinned) = own_key {
        tracing::warn!("config: {pinned}");
    }
}

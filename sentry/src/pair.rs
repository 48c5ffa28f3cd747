//! `sentry pair`: two fresh keys and a matched `sentry.toml` / `agent.toml`, ready to copy to
//! the public host and the validator host.
//!
//! Everything generated is parsed by the real config parser before anything is written, and
//! nothing that exists is overwritten.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use clap::ValueEnum;
use relay_core::config;
use relay_core::keys::{self, PrivateKey};

/// The chains `pair` knows the ports of.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Preset {
    /// ICON (goloop): P2P on 7100; JSON-RPC on 9000.
    Icon,
    /// Ethereum execution client: devp2p on 30303; JSON-RPC on 8545.
    Ethereum,
    /// Cosmos / CometBFT: P2P on 26656; RPC on 26657.
    Cosmos,
}

/// A relayed TCP port: the route and service name, the port on both hosts.
struct Port {
    name: &'static str,
    port: u16,
    note: &'static str,
}

struct Chain {
    /// Relayed from the start.
    routes: &'static [Port],
    /// Relayed through the JSON-RPC filter with the chain's preset, never as plain TCP
    /// (which would expose goloop's /admin, an Ethereum node's admin_ and debug_ namespaces,
    /// CometBFT's unsafe routes).
    rpc: Port,
}

const RPC_NOTE: &str = "filtered by the chain's preset";

impl Preset {
    fn name(self) -> &'static str {
        match self {
            Self::Icon => "icon",
            Self::Ethereum => "ethereum",
            Self::Cosmos => "cosmos",
        }
    }

    fn chain(self) -> Chain {
        match self {
            Self::Icon => Chain {
                routes: &[Port {
                    name: "p2p",
                    port: 7100,
                    note: "goloop P2P; no PROXY header (goloop does not read one)",
                }],
                rpc: Port {
                    name: "rpc",
                    port: 9000,
                    note: RPC_NOTE,
                },
            },
            Self::Ethereum => Chain {
                routes: &[Port {
                    name: "devp2p",
                    port: 30303,
                    note: "devp2p over TCP (discovery over UDP is not relayed by this version)",
                }],
                rpc: Port {
                    name: "rpc",
                    port: 8545,
                    note: RPC_NOTE,
                },
            },
            Self::Cosmos => Chain {
                routes: &[Port {
                    name: "p2p",
                    port: 26656,
                    note: "CometBFT P2P",
                }],
                rpc: Port {
                    name: "rpc",
                    port: 26657,
                    note: RPC_NOTE,
                },
            },
        }
    }
}

/// What `pair` needs.
pub struct Request<'a> {
    /// `HOST:PORT` the agent dials (the sentry's public name and QUIC port).
    pub sentry: &'a str,
    pub out_dir: &'a Path,
    /// Where the key files will live on the hosts (the configs name them there).
    pub key_dir: &'a Path,
    pub preset: Preset,
}

/// Where the sentry's metrics listener goes (loopback: never public).
const SENTRY_METRICS: &str = "127.0.0.1:9900";
/// The agent's, beside it on the validator host.
const AGENT_METRICS: &str = "127.0.0.1:9901";

/// Write the four files; the message to print.
pub fn pair(request: &Request<'_>) -> Result<String, String> {
    let (host, port) = split_host_port(request.sentry)?;
    // Written into the generated files: a host name, or an address, and nothing else.
    let address = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    if request
        .key_dir
        .to_string_lossy()
        .chars()
        .any(char::is_control)
    {
        return Err(format!(
            "--key-dir {:?}: a path with a control character cannot go into a config",
            request.key_dir.display()
        ));
    }
    let files = ["sentry.key", "agent.key", "sentry.toml", "agent.toml"]
        .map(|name| request.out_dir.join(name));
    if let Some(existing) = files.iter().find(|f| f.exists()) {
        return Err(format!(
            "{} exists; pair never overwrites keys or configs: choose another --out-dir",
            existing.display()
        ));
    }
    std::fs::create_dir_all(request.out_dir)
        .map_err(|e| format!("creating {}: {e}", request.out_dir.display()))?;
    let sentry_key = PrivateKey::generate().map_err(|e| e.to_string())?;
    let agent_key = PrivateKey::generate().map_err(|e| e.to_string())?;
    let chain = request.preset.chain();
    let wildcard = if host.contains(':') {
        "[::]"
    } else {
        "0.0.0.0"
    };
    // Quoted as TOML quotes strings: whatever the path holds, it stays one string.
    let key_path = |name: &str| toml_string(&request.key_dir.join(name).display().to_string());

    let mut sentry = format!(
        "# sentry.toml for the public host, written by `sentry pair --preset {preset}`.\n\
         # Install as /etc/sentry/sentry.toml, with sentry.key as {sentry_key_path} (mode 0600).\n\
         # Every key and its default: configs/sentry.example.toml.\n\n\
         [sentry]\n\
         private_key = {sentry_key_path}\n\
         quic_listen = \"{wildcard}:{port}\"   # UDP: open it in the firewall for the agent\n\
         metrics_listen = \"{SENTRY_METRICS}\"  # `sentry status` reads it; keep it private\n\n\
         [[agent]]\n\
         name = \"validator\"\n\
         public_key = \"{agent_pub}\"\n\
         egress = true                       # the node's outbound P2P leaves from here\n",
        preset = request.preset.name(),
        sentry_key_path = key_path("sentry.key"),
        agent_pub = agent_key.public_key(),
    );
    let mut agent = format!(
        "# agent.toml for the validator host, written by `sentry pair --preset {preset}`.\n\
         # Install as /etc/sentry/agent.toml, with agent.key as {agent_key_path} (mode 0600).\n\
         # The agent dials out only; the validator host opens no port.\n\n\
         [agent]\n\
         name = \"validator\"\n\
         private_key = {agent_key_path}\n\
         metrics_listen = \"{AGENT_METRICS}\"\n\n\
         [[sentry]]\n\
         address = {address}\n\
         public_key = \"{sentry_pub}\"\n",
        preset = request.preset.name(),
        agent_key_path = key_path("agent.key"),
        address = toml_string(&address),
        sentry_pub = sentry_key.public_key(),
    );
    for p in chain.routes {
        let _ = write!(
            sentry,
            "\n# {note}\n[[route]]\nname = \"{name}\"\nlisten = \"{wildcard}:{port}\"\n\
             upstream = [\"validator/{name}\"]\n",
            note = p.note,
            name = p.name,
            port = p.port,
        );
        let _ = write!(
            agent,
            "\n# Each peer reaches the node from its own 127.x.y.z (source = \"mapped\", the \
             default\n# for a loopback target): `sentry status --peers` tells them apart.\n\
             [[service]]\nname = \"{name}\"\ntarget = \"127.0.0.1:{port}\"\n",
            name = p.name,
            port = p.port,
        );
    }
    let rpc = &chain.rpc;
    let _ = write!(
        sentry,
        "\n# JSON-RPC on {port}, {note}:\n# only the public API reaches the node; refused \
         paths get 403, denied methods a JSON-RPC\n# error. [route.jsonrpc]'s keys: \
         configs/sentry.example.toml.\n[[route]]\n\
         name = \"{name}\"\nlisten = \"{wildcard}:{port}\"\nprotocol = \"jsonrpc\"\n\
         upstream = [\"validator/{name}\"]\n[route.jsonrpc]\npreset = \"{preset}\"\n",
        note = rpc.note,
        name = rpc.name,
        port = rpc.port,
        preset = request.preset.name(),
    );
    let _ = write!(
        agent,
        "\n# The node's JSON-RPC, reached only through the sentry's filtered rpc route.\n\
         [[service]]\nname = \"{name}\"\ntarget = \"127.0.0.1:{port}\"\n",
        name = rpc.name,
        port = rpc.port,
    );

    let _ = write!(
        sentry,
        "\n# What this sentry dials for the agent's node (egress = true above): the public\n\
         # internet; private ranges, cloud metadata and this host's own addresses never.\n\
         [egress]\n\
         # ports = [\"{port}\"]                  # only peers' P2P ports, if they all use it\n\
         max_connections = 1024\n\
         connect_rate = \"50/s\"\n",
        port = chain.routes[0].port,
    );
    let _ = write!(
        agent,
        "\n# The node's outbound connections leave from the sentry: load the nftables\n\
         # redirect of docs/hidden-validator.md for the node's user (or point software that\n\
         # takes a proxy at a socks5 listener).\n\
         [[egress]]\nlisten = \"127.0.0.1:7199\"\nmode = \"transparent\"\n",
    );

    // The real parser checks what we generated before anything is written.
    config::parse_sentry(&files[2], &sentry).map_err(|e| format!("generated sentry.toml: {e}"))?;
    config::parse_agent(&files[3], &agent).map_err(|e| format!("generated agent.toml: {e}"))?;
    keys::write_private_key(&files[0], &sentry_key).map_err(|e| e.to_string())?;
    keys::write_private_key(&files[1], &agent_key).map_err(|e| e.to_string())?;
    write_new(&files[2], &sentry)?;
    write_new(&files[3], &agent)?;

    let dir = request.out_dir.display();
    let key_dir = request.key_dir.display();
    Ok(format!(
        "wrote {dir}/sentry.key, sentry.toml (public host) and {dir}/agent.key, agent.toml \
         (validator host)\n\
         sentry public key: {sentry_pub}\nagent public key:  {agent_pub}\n\n\
         On the public host ({host}):\n  \
           install -D -m 0600 sentry.key {key_dir}/sentry.key\n  \
           install -D -m 0644 sentry.toml /etc/sentry/sentry.toml\n  \
           systemctl enable --now sentry\n\
         On the validator host:\n  \
           install -D -m 0600 agent.key {key_dir}/agent.key\n  \
           install -D -m 0644 agent.toml /etc/sentry/agent.toml\n  \
           systemctl enable --now sentry-agent\n\
         Then `sentry status` on either host. Open UDP {port} on the public host's firewall.",
        sentry_pub = sentry_key.public_key(),
        agent_pub = agent_key.public_key(),
    ))
}

/// `HOST:PORT` into a host that is a DNS name, an IPv4 address or a (bracketed) IPv6 address,
/// and a port: nothing else may reach the generated files.
fn split_host_port(text: &str) -> Result<(&str, u16), String> {
    let bad =
        || format!("--sentry {text:?}: expected HOST:PORT, such as sentry-a.example.org:4433");
    let (host, port) = text.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    if host.is_empty() || port == 0 {
        return Err(bad());
    }
    let host = match host.strip_prefix('[') {
        Some(bracketed) => {
            let inner = bracketed.strip_suffix(']').ok_or_else(bad)?;
            inner.parse::<std::net::Ipv6Addr>().map_err(|_| bad())?;
            inner
        }
        None if host.parse::<std::net::Ipv4Addr>().is_ok() => host,
        None => {
            let label_ok = |l: &str| {
                !l.is_empty()
                    && l.len() <= 63
                    && !l.starts_with('-')
                    && !l.ends_with('-')
                    && l.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            };
            if host.len() > 253 || !host.split('.').all(label_ok) {
                return Err(bad());
            }
            host
        }
    };
    Ok((host, port))
}

/// `text` as a TOML basic string, quotes and escapes included.
fn toml_string(text: &str) -> String {
    toml::Value::String(text.to_owned()).to_string()
}

fn write_new(path: &PathBuf, text: &str) -> Result<(), String> {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| format!("writing {}: {e}", path.display()))?;
    file.write_all(text.as_bytes())
        .map_err(|e| format!("writing {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `--sentry` reaches the generated agent.toml: only a host and a port get there. A
    /// string that would close the TOML string and add a service (exposing, say, SSH) is
    /// refused.
    #[test]
    fn only_a_host_and_a_port_are_taken_for_the_sentry() {
        for good in [
            "sentry-a.example.org:4433",
            "203.0.113.7:4433",
            "[2001:db8::1]:4433",
            "localhost:1",
        ] {
            assert!(split_host_port(good).is_ok(), "{good}");
        }
        for bad in [
            "evil.example:4433\"\n[[service]]\nname = \"ssh\"\ntarget = \"127.0.0.1:22",
            "a\"b.example:4433",
            "a b.example:4433",
            "a.example\n:4433",
            "[not-v6]:4433",
            "[2001:db8::1:4433",
            "-leading.example:4433",
            ":4433",
            "host:0",
            "host:99999",
        ] {
            assert!(split_host_port(bad).is_err(), "{bad:?}");
        }
    }

    /// A key directory with quotes and backslashes stays one TOML string (the path written is
    /// the path given); one with a newline, which would end a comment line, is refused.
    #[test]
    fn key_paths_are_quoted_as_toml_strings() {
        let out = tempfile::tempdir().unwrap();
        let key_dir = Path::new("/var/lib/we\"ird\\dir");
        let request = Request {
            sentry: "sentry.example.org:4433",
            out_dir: out.path(),
            key_dir,
            preset: Preset::Icon,
        };
        pair(&request).unwrap();
        let agent = relay_core::config::load(&out.path().join("agent.toml")).unwrap();
        let relay_core::config::Config::Agent(agent) = agent else {
            panic!("not an agent config");
        };
        assert_eq!(agent.private_key, key_dir.join("agent.key"));
        assert_eq!(agent.sentries[0].address, "sentry.example.org:4433");

        let other = tempfile::tempdir().unwrap();
        let request = Request {
            key_dir: Path::new("/var/lib/a\nb"),
            out_dir: other.path(),
            ..request
        };
        assert!(pair(&request).is_err());
    }
}

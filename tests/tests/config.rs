//! Config parsing against files: every example in `configs/` parses, and every invalid
//! fixture fails with the expected file, line, column, key and message.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::path::Path;

use relay_core::config::{self, Config};
use tests::repo_root;

fn toml_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    files
}

#[test]
fn every_example_config_parses() {
    let files = toml_files(&repo_root().join("configs"));
    assert!(
        files.len() >= 2,
        "configs/ holds {} example configs",
        files.len()
    );
    let (mut sentries, mut agents) = (0, 0);
    for file in &files {
        match config::load(file) {
            Ok(Config::Sentry(c)) => {
                assert!(!c.routes.is_empty(), "{}: no routes", file.display());
                sentries += 1;
            }
            Ok(Config::Agent(c)) => {
                assert!(!c.services.is_empty(), "{}: no services", file.display());
                agents += 1;
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert!(
        sentries > 0 && agents > 0,
        "{sentries} sentry and {agents} agent examples"
    );
}

/// (fixture, "line:column" or "" for file-level, key path, message fragment)
const INVALID: &[(&str, &str, &str, &str)] = &[
    (
        "agent-address-without-port",
        "6:11",
        "sentry[0].address",
        "expected HOST:PORT",
    ),
    (
        "agent-bad-service-name",
        "10:8",
        "service[0].name",
        "invalid name \"p2p svc\"",
    ),
    (
        "agent-duplicate-service",
        "14:8",
        "service[1].name",
        "duplicate service name \"p2p\"",
    ),
    (
        "agent-hostname-target",
        "11:10",
        "service[0].target",
        "expected IP:PORT",
    ),
    ("agent-no-service", "", "service", "no [[service]] entry"),
    (
        "agent-zero-service-cap",
        "12:19",
        "service[0].max_connections",
        "must be from 1 to 65536",
    ),
    (
        "agent-unknown-transport",
        "8:13",
        "sentry[0].transport",
        "unknown variant `carrier-pigeon`",
    ),
    (
        "agent-wireguard-without-addresses",
        "6:11",
        "sentry[0].wireguard_address",
        "transport = \"wireguard\" needs wireguard_address",
    ),
    (
        "wireguard-window-out-of-range",
        "6:20",
        "sentry.wireguard_window",
        "must be \"auto\" or from 64KiB to 16MiB",
    ),
    (
        "wireguard-window-neither-auto-nor-size",
        "6:20",
        "sentry.wireguard_window",
        "or \"auto\"",
    ),
    (
        "agent-wireguard-window-over-quic",
        "8:20",
        "sentry[0].wireguard_window",
        "applies only with transport = \"wireguard\"",
    ),
    (
        "wireguard-listen-without-address",
        "4:20",
        "sentry.wireguard_listen",
        "needs sentry.wireguard_address",
    ),
    (
        "wireguard-peer-wrong-address",
        "16:13",
        "route[0].upstream[0]",
        "may reach only that address",
    ),
    (
        "wireguard-duplicate-overlay-address",
        "10:21",
        "agent[0].wireguard_address",
        "is already sentry.wireguard_address",
    ),
    (
        "bad-duration",
        "13:16",
        "route[0].idle_timeout",
        "invalid duration \"15 minutes\"",
    ),
    (
        "bad-listen",
        "11:10",
        "route[0].listen",
        "invalid address \"0.0.0.0:71000\"",
    ),
    (
        "bad-public-key",
        "7:14",
        "agent[0].public_key",
        "invalid public key",
    ),
    (
        "dangling-upstream",
        "12:23",
        "route[0].upstream[1]",
        "names agent \"v9\", which no [[agent]] or [[wireguard_peer]] defines",
    ),
    (
        "duplicate-agent-key",
        "11:14",
        "agent[1].public_key",
        "already pinned for another agent",
    ),
    (
        "duplicate-route-name",
        "15:8",
        "route[1].name",
        "duplicate route name \"p2p\"",
    ),
    ("duplicate-toml-key", "4:1", "quic_listen", "duplicate key"),
    (
        "empty-upstream",
        "12:12",
        "route[0].upstream",
        "at least one upstream",
    ),
    (
        "missing-quic-listen",
        "1:1",
        "sentry.quic_listen",
        "no tunnel listener",
    ),
    ("no-role", "", "", "neither a sentry config"),
    (
        "overlapping-listen",
        "16:10",
        "route[1].listen",
        "overlaps the listen address of route[0]",
    ),
    ("syntax-error", "3:28", "", "invalid basic string"),
    (
        "unknown-protocol",
        "12:12",
        "route[0].protocol",
        "unknown variant `http`",
    ),
    (
        "unknown-route-key",
        "13:1",
        "route[0].idle_timout",
        "unknown field `idle_timout`",
    ),
    ("bad-cidr", "13:28", "route[0].deny[1]", "invalid CIDR"),
    (
        "bad-rate",
        "13:23",
        "route[0].connect_rate_per_ip",
        "invalid rate",
    ),
    (
        "zero-cap",
        "13:26",
        "route[0].max_connections_per_ip",
        "from 1 to",
    ),
    ("empty-allow", "13:9", "route[0].allow", "admits nobody"),
    (
        "bad-proxy-protocol",
        "13:18",
        "route[0].proxy_protocol",
        "expected one of `off`, `v1`, `v2`",
    ),
    (
        "metrics-on-route",
        "4:18",
        "sentry.metrics_listen",
        "must never be served on a public route",
    ),
    (
        "tls-listen-on-route",
        "4:14",
        "sentry.tls_listen",
        "overlaps the listen address of route[0]",
    ),
    (
        "udp-with-proxy-protocol",
        "14:18",
        "route[0].proxy_protocol",
        "a udp route cannot send one",
    ),
    (
        "udp-on-quic-port",
        "11:10",
        "route[0].listen",
        "overlaps the UDP listen address of sentry.quic_listen",
    ),
    (
        "jsonrpc-proxy-protocol",
        "15:18",
        "route[0].proxy_protocol",
        "a PROXY header cannot name the client",
    ),
    (
        "jsonrpc-unknown-preset",
        "16:10",
        "route[0].jsonrpc.preset",
        "unknown preset \"goloop\"",
    ),
    (
        "jsonrpc-on-tcp-route",
        "14:1",
        "route[0].jsonrpc",
        "applies only to a route with protocol = \"jsonrpc\"",
    ),
    (
        "jsonrpc-tls-missing-cert",
        "18:8",
        "route[0].tls.cert",
        "no-such-rpc.crt: No such file",
    ),
    (
        "jsonrpc-bad-path",
        "17:27",
        "route[0].jsonrpc.allow_paths[1]",
        "invalid path \"/api/../admin\"",
    ),
    (
        "upstream-without-service",
        "12:13",
        "route[0].upstream[0]",
        "expected \"agent/service\"",
    ),
];

#[test]
fn every_invalid_fixture_fails_where_expected() {
    let dir = repo_root().join("tests/fixtures/invalid");
    let files = toml_files(&dir);
    assert!(!files.is_empty(), "no fixtures found in {}", dir.display());
    let on_disk: BTreeSet<String> = files
        .iter()
        .map(|f| f.file_stem().unwrap().to_string_lossy().into_owned())
        .collect();
    let listed: BTreeSet<String> = INVALID
        .iter()
        .map(|(name, ..)| (*name).to_owned())
        .collect();
    assert_eq!(
        on_disk, listed,
        "every fixture needs an expectation, and every expectation a fixture"
    );

    for (name, position, key, fragment) in INVALID {
        let path = dir.join(format!("{name}.toml"));
        let errors = match config::load(&path) {
            Ok(_) => panic!("{name}: accepted"),
            Err(e) => e,
        };
        let first = &errors.0[0];
        assert_eq!(first.file, path, "{name}");
        let got_position = first
            .position
            .map_or(String::new(), |(l, c)| format!("{l}:{c}"));
        assert_eq!(&got_position, position, "{name}: {first}");
        assert_eq!(&first.key, key, "{name}: {first}");
        assert!(first.message.contains(fragment), "{name}: {first}");
        // The rendered line names the file, the position and the key, as operators read it.
        let shown = first.to_string();
        let prefix = if position.is_empty() {
            path.display().to_string()
        } else {
            format!("{}:{position}", path.display())
        };
        assert!(shown.starts_with(&prefix), "{shown}");
    }
}

#[test]
fn all_problems_are_reported_at_once() {
    let text = r#"
[sentry]
private_key = "k"
quic_listen = "0.0.0.0:4433"
tls_listen = "0.0.0.0:1"

[[route]]
name = "a"
listen = "0.0.0.0:1"
upstream = ["nobody/x"]

[[route]]
name = "a"
listen = "0.0.0.0:1"
upstream = ["nobody/y"]
"#;
    let errors = config::parse_sentry(Path::new("many.toml"), text).unwrap_err();
    let keys: Vec<&str> = errors.0.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "route[1].name",
            "route[0].upstream[0]",
            "route[1].listen",
            "route[1].upstream[0]",
            "sentry.tls_listen",
        ],
        "{errors}"
    );
}

#[test]
fn relative_key_paths_follow_the_config_file() {
    let text = "[sentry]\nprivate_key = \"keys/s.key\"\nquic_listen = \"0.0.0.0:4433\"\n";
    let config = config::parse_sentry(Path::new("/etc/sentry/sentry.toml"), text).unwrap();
    assert_eq!(config.private_key, Path::new("/etc/sentry/keys/s.key"));
    let text =
        "[sentry]\nprivate_key = \"/var/lib/sentry/s.key\"\nquic_listen = \"0.0.0.0:4433\"\n";
    let config = config::parse_sentry(Path::new("/etc/sentry/sentry.toml"), text).unwrap();
    assert_eq!(config.private_key, Path::new("/var/lib/sentry/s.key"));
}

const LIST_ROUTE: &str = r#"
[sentry]
private_key = "s.key"
quic_listen = "0.0.0.0:4433"

[[agent]]
name = "v1"
public_key = "oYNIXccxctOPVk3MUs7HyF+TXOmfTOLFhVFRkb9Uels="

[[route]]
name = "p2p"
listen = "0.0.0.0:7100"
upstream = ["v1/p2p"]
"#;

/// Write `sentry.toml` (the route plus `extra`) and the list files into a temp dir.
fn with_lists(extra: &str, files: &[(&str, &str)]) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    let path = dir.path().join("sentry.toml");
    std::fs::write(&path, format!("{LIST_ROUTE}{extra}\n")).unwrap();
    (dir, path)
}

#[test]
fn allow_and_deny_lists_load_from_files() {
    let (_dir, path) = with_lists(
        "allow = [\"192.0.2.0/24\"]\nallow_file = \"allow.list\"\ndeny_file = \"lists/deny.list\"",
        &[(
            "allow.list",
            "# peers we know\n203.0.113.0/24\n2001:db8::/32  # v6 office\n\n",
        )],
    );
    // The deny list sits in a subdirectory that does not exist yet: the error names it.
    let errors = config::load_sentry(&path).unwrap_err();
    assert_eq!(errors.0.len(), 1, "{errors}");
    assert_eq!(errors.0[0].key, "route[0].deny_file");
    assert_eq!(errors.0[0].file, path);
    assert!(errors.0[0].message.contains("cannot read"), "{errors}");
    assert!(errors.0[0].message.contains("deny.list"), "{errors}");

    std::fs::create_dir(path.parent().unwrap().join("lists")).unwrap();
    std::fs::write(
        path.parent().unwrap().join("lists/deny.list"),
        "203.0.113.66\n",
    )
    .unwrap();
    let sentry = config::load_sentry(&path).unwrap();
    let limits = &sentry.routes[0].limits;
    for (ip, allowed, denied) in [
        ("203.0.113.7", true, false),
        ("203.0.113.66", true, true),
        ("192.0.2.1", true, false), // inline entries are kept beside the file's
        ("2001:db8::1", true, false),
        ("198.51.100.1", false, false),
    ] {
        let ip = ip.parse().unwrap();
        assert_eq!(limits.allow.contains(ip), allowed, "{ip}");
        assert_eq!(limits.deny.contains(ip), denied, "{ip}");
    }
}

#[test]
fn list_file_errors_name_the_list_file_line_and_column() {
    let (dir, path) = with_lists(
        "deny_file = \"deny.list\"",
        &[(
            "deny.list",
            "203.0.113.0/24\n# fine\n   203.0.113.0/33\n198.51.100.1 198.51.100.2\n",
        )],
    );
    let errors = config::load_sentry(&path).unwrap_err();
    let list = dir.path().join("deny.list");
    let shown: Vec<String> = errors.0.iter().map(ToString::to_string).collect();
    assert_eq!(shown.len(), 2, "{shown:?}");
    assert!(
        shown[0].starts_with(&format!(
            "{}:3:4: route[0].deny_file: invalid CIDR",
            list.display()
        )),
        "{shown:?}"
    );
    assert!(
        shown[1].starts_with(&format!(
            "{}:4:1: route[0].deny_file: one CIDR per line",
            list.display()
        )),
        "{shown:?}"
    );
}

#[test]
fn an_allow_file_that_lists_nobody_is_refused() {
    let (_dir, path) = with_lists(
        "allow_file = \"allow.list\"",
        &[("allow.list", "# empty\n")],
    );
    let errors = config::load_sentry(&path).unwrap_err();
    assert_eq!(errors.0[0].key, "route[0].allow_file", "{errors}");
    assert_eq!(errors.0[0].position, Some((14, 14)), "{errors}");
    assert!(errors.0[0].message.contains("admit nobody"), "{errors}");
}

#[test]
fn the_wireguard_window_is_read_on_both_ends_and_sized_for_the_round_trip_by_default() {
    use relay_core::config::Window;
    let sentry = |extra: &str| {
        let text = format!(
            "[sentry]\nprivate_key = \"s.key\"\nquic_listen = \"127.0.0.1:4433\"\n\
             wireguard_listen = \"127.0.0.1:51820\"\nwireguard_address = \"100.64.0.1\"\n{extra}\
             [[agent]]\nname = \"v\"\npublic_key = \"oYNIXccxctOPVk3MUs7HyF+TXOmfTOLFhVFRkb9Uels=\"\n\
             wireguard_address = \"100.64.0.2\"\n"
        );
        config::parse_sentry(Path::new("sentry.toml"), &text)
            .unwrap()
            .wireguard
            .unwrap()
            .window
    };
    assert_eq!(sentry(""), Window::Auto);
    assert_eq!(sentry("wireguard_window = \"auto\"\n"), Window::Auto);
    assert_eq!(
        sentry("wireguard_window = \"4MiB\"\n"),
        Window::Fixed(4 << 20)
    );
    let agent = |extra: &str| {
        let text = format!(
            "[agent]\nname = \"v\"\nprivate_key = \"a.key\"\n[[sentry]]\n\
             address = \"sentry.example.org:51820\"\n\
             public_key = \"oYNIXccxctOPVk3MUs7HyF+TXOmfTOLFhVFRkb9Uels=\"\n\
             transport = \"wireguard\"\nwireguard_address = \"100.64.0.2\"\n\
             sentry_wireguard_address = \"100.64.0.1\"\n{extra}\
             [[service]]\nname = \"p2p\"\ntarget = \"127.0.0.1:7100\"\n"
        );
        config::parse_agent(Path::new("agent.toml"), &text)
            .unwrap()
            .sentries[0]
            .wireguard
            .unwrap()
            .window
    };
    assert_eq!(agent(""), Window::Auto);
    assert_eq!(
        agent("wireguard_window = \"2MiB\"\n"),
        Window::Fixed(2 << 20)
    );
}

/// A `[route.tls]` key anyone may read is refused, naming the key and the fix; one readable by
/// its owner and group (Debian's `ssl-cert` convention) is taken. The check is on the opened
/// file.
#[test]
fn a_world_readable_tls_key_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let generated = rcgen::generate_simple_self_signed(vec!["rpc.example".to_owned()]).unwrap();
    std::fs::write(dir.path().join("rpc.crt"), generated.cert.pem()).unwrap();
    let key = dir.path().join("rpc.key");
    std::fs::write(&key, generated.signing_key.serialize_pem()).unwrap();
    let text = "[sentry]\nprivate_key = \"s.key\"\nquic_listen = \"127.0.0.1:0\"\n\n\
        [[agent]]\nname = \"v1\"\npublic_key = \"oYNIXccxctOPVk3MUs7HyF+TXOmfTOLFhVFRkb9Uels=\"\n\n\
        [[route]]\nname = \"rpc\"\nlisten = \"127.0.0.1:0\"\nupstream = [\"v1/rpc\"]\n\
        protocol = \"jsonrpc\"\n[route.jsonrpc]\npreset = \"icon\"\n\
        [route.tls]\ncert = \"rpc.crt\"\nkey = \"rpc.key\"\n";
    let path = dir.path().join("sentry.toml");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let errors = config::parse_sentry(&path, text).unwrap_err();
    let first = &errors.0[0];
    assert_eq!(first.key, "route[0].tls.key", "{first}");
    assert!(first.message.contains("readable by anyone"), "{first}");
    assert!(first.message.contains("chmod o-rwx"), "{first}");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
    config::parse_sentry(&path, text).unwrap();
}

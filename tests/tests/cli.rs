//! The built `sentry` binary, driven as an operator would: keys, checks, exit statuses, and
//! the two daemons relaying a real connection on loopback.
#![allow(clippy::unwrap_used)]
// Plain threads and deadlines here, outside the daemon: the clock rule is for relay-core.
#![allow(clippy::disallowed_methods)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use rustix::process::Signal;
use tests::daemon::Daemon;
use tests::{repo_root, sentry_bin};

fn sentry(args: &[&str]) -> Output {
    Command::new(sentry_bin())
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn keygen(path: &Path) -> String {
    let out = sentry(&["keygen", "--out", path.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    text(&out.stdout).trim().to_owned()
}

#[test]
fn keygen_writes_a_0600_key_and_pubkey_prints_the_same_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("host.key");
    let public = keygen(&path);
    assert_eq!(public.len(), 44, "{public}");
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let out = sentry(&["pubkey", "--key", path.to_str().unwrap()]);
    assert!(out.status.success());
    assert_eq!(text(&out.stdout).trim(), public);
    // Never overwrites a key.
    let again = sentry(&["keygen", "--out", path.to_str().unwrap()]);
    assert_eq!(again.status.code(), Some(2));
    assert!(
        text(&again.stderr).contains("already exists"),
        "{}",
        text(&again.stderr)
    );
    assert_eq!(
        text(&sentry(&["pubkey", "--key", path.to_str().unwrap()]).stdout).trim(),
        public
    );
}

#[test]
fn a_key_readable_by_others_is_refused_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("sentry.key");
    keygen(&key);
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let config = dir.path().join("sentry.toml");
    std::fs::write(
        &config,
        "[sentry]\nprivate_key = \"sentry.key\"\nquic_listen = \"127.0.0.1:0\"\n",
    )
    .unwrap();
    for command in ["serve", "check"] {
        let out = sentry(&[command, "--config", config.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(2), "{command}");
        let stderr = text(&out.stderr);
        assert!(
            stderr.contains("readable by group or others") && stderr.contains("chmod 600"),
            "{command}: {stderr}"
        );
    }
}

#[test]
fn check_reports_file_line_column_and_key_and_exits_2() {
    let path = repo_root().join("tests/fixtures/invalid/bad-listen.toml");
    let out = sentry(&["check", "--config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "{}:11:10: route[0].listen: invalid address",
            path.display()
        )),
        "{stderr}"
    );
    // The daemons refuse the same way, before binding anything.
    let out = sentry(&["serve", "--config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    // Bad usage is status 2 too.
    assert_eq!(sentry(&["serve"]).status.code(), Some(2));
    assert_eq!(sentry(&["no-such-command"]).status.code(), Some(2));
}

/// Every example config passes `check` as shipped (its key lives on the host it is for:
/// `--no-key`), without a warning.
#[test]
fn every_example_config_passes_check_as_shipped() {
    let mut checked = 0;
    for entry in std::fs::read_dir(repo_root().join("configs")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "toml") {
            continue;
        }
        let out = sentry(&["check", "--no-key", "--config", path.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "{}: {}",
            path.display(),
            text(&out.stderr)
        );
        let stdout = text(&out.stdout);
        assert!(stdout.contains(": ok: "), "{stdout}");
        assert!(!stdout.contains("warning"), "{}: {stdout}", path.display());
        checked += 1;
    }
    assert!(checked >= 6, "{checked} example configs");
}

/// `check --print` writes the config as the daemon runs it, defaults filled in, as a config
/// that `check` takes again.
#[test]
fn check_print_writes_the_effective_config_back_as_a_config() {
    let dir = tempfile::tempdir().unwrap();
    for example in [
        "sentry.example.toml",
        "agent.example.toml",
        "cosmos.sentry.toml",
    ] {
        let path = repo_root().join("configs").join(example);
        let out = sentry(&[
            "check",
            "--no-key",
            "--print",
            "--config",
            path.to_str().unwrap(),
        ]);
        assert!(out.status.success(), "{example}: {}", text(&out.stderr));
        let stdout = text(&out.stdout);
        let (_, effective) = stdout
            .split_once("# The effective config: every default filled in.\n")
            .unwrap_or_else(|| panic!("{example}: no effective config in:\n{stdout}"));
        // Defaults the example leaves out are there.
        assert!(
            effective.contains("drain_timeout = \"30s\""),
            "{example}:\n{effective}"
        );
        let again = dir.path().join(example);
        std::fs::write(&again, effective).unwrap();
        let out = sentry(&["check", "--no-key", "--config", again.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "{example}: the printed config does not check: {}\n{effective}",
            text(&out.stderr)
        );
    }
}

/// What a newcomer gets wrong is named: a list table written with single brackets, and what
/// is valid but probably not meant (a CIDR with host bits, metrics on a public address, a
/// sentry pinning its own key) is warned about with file, line and column.
#[test]
fn check_hints_at_brackets_and_warns_about_what_is_probably_not_meant() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("s.key");
    let public = keygen(&key);
    let write = |name: &str, body: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, body).unwrap();
        path
    };
    let single = write(
        "single.toml",
        "[sentry]\nprivate_key = \"s.key\"\nquic_listen = \"127.0.0.1:1\"\n[route]\nname = \"p2p\"\n",
    );
    let out = sentry(&["check", "--config", single.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("write [[route]], with double brackets"),
        "{}",
        text(&out.stderr)
    );
    let both = write(
        "both.toml",
        "[agent]\nname = \"v\"\nprivate_key = \"a.key\"\n[sentry]\naddress = \"x:1\"\n",
    );
    let out = sentry(&["check", "--config", both.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("[[sentry]] (double brackets"),
        "{}",
        text(&out.stderr)
    );
    let doubtful = write(
        "doubtful.toml",
        &format!(
            "[sentry]\nprivate_key = \"s.key\"\nquic_listen = \"127.0.0.1:1\"\n\
             metrics_listen = \"0.0.0.0:9900\"\n\n[[agent]]\nname = \"v\"\npublic_key = \"{public}\"\n\n\
             [[route]]\nname = \"p2p\"\nlisten = \"127.0.0.1:7100\"\nupstream = [\"v/p2p\"]\n\
             deny = [\"203.0.113.7/24\"]\n"
        ),
    );
    let out = sentry(&["check", "--config", doubtful.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let file = doubtful.display();
    for expected in [
        format!(
            "warning: {file}:14:9: route[0].deny[0]: 203.0.113.7/24 has host bits set: it means 203.0.113.0/24"
        ),
        format!(
            "warning: {file}:4:18: sentry.metrics_listen: 0.0.0.0:9900 is reachable from other hosts"
        ),
        "warning: agent \"v\" is pinned with this sentry's own public key".to_owned(),
    ] {
        assert!(
            stdout.contains(&expected),
            "missing {expected:?} in:\n{stdout}"
        );
    }
}

#[test]
fn version_and_help() {
    let out = sentry(&["--version"]);
    assert!(out.status.success());
    let version = text(&out.stdout);
    // `sentry 0.1.0 (commit 0123456789ab, built 2026-12-07)`
    assert!(version.starts_with("sentry "), "{version}");
    assert!(
        version.contains("(commit ") && version.contains(", built 20"),
        "{version}"
    );
    let out = sentry(&["--help"]);
    assert!(out.status.success());
    let help = text(&out.stdout);
    for word in [
        "serve",
        "agent",
        "keygen",
        "pubkey",
        "check",
        "demo",
        "Getting started",
    ] {
        assert!(help.contains(word), "--help lacks {word}");
    }
}

#[test]
fn demo_once_passes_its_self_check() {
    let out = Command::new(sentry_bin())
        .args(["demo", "--once"])
        .output()
        .unwrap();
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    assert!(stdout.contains("6 of 6 checks passed"), "{stdout}");
}

/// A free port on loopback for `kind` ("tcp" or "udp"); the tiny race with other processes is
/// acceptable in tests.
fn free_port(udp: bool) -> u16 {
    if udp {
        UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    } else {
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }
}

fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut tcp in listener.incoming().map_while(Result::ok) {
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = tcp.read(&mut buf) {
                    if n == 0 || tcp.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

fn echo_through(addr: SocketAddr) -> Result<Vec<u8>, std::io::Error> {
    let mut tcp = TcpStream::connect(addr)?;
    tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
    tcp.write_all(b"through the tunnel")?;
    let mut buf = vec![0u8; 18];
    tcp.read_exact(&mut buf)?;
    Ok(buf)
}

#[test]
fn the_two_daemons_relay_survive_an_agent_sigkill_and_stop_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let sentry_pub = keygen(&dir.path().join("sentry.key"));
    let agent_pub = keygen(&dir.path().join("agent.key"));
    let (quic_port, p2p_port) = (free_port(true), free_port(false));
    let sentry_toml = dir.path().join("sentry.toml");
    std::fs::write(
        &sentry_toml,
        format!(
            "[sentry]\nprivate_key = \"sentry.key\"\nquic_listen = \"127.0.0.1:{quic_port}\"\n\n\
             [[agent]]\nname = \"validator-1\"\npublic_key = \"{agent_pub}\"\n\n\
             [[route]]\nname = \"p2p\"\nlisten = \"127.0.0.1:{p2p_port}\"\nupstream = [\"validator-1/p2p\"]\n"
        ),
    )
    .unwrap();
    let agent_toml = dir.path().join("agent.toml");
    std::fs::write(
        &agent_toml,
        format!(
            "[agent]\nname = \"validator-1\"\nprivate_key = \"agent.key\"\n\n\
             [[sentry]]\naddress = \"127.0.0.1:{quic_port}\"\npublic_key = \"{sentry_pub}\"\n\n\
             [[service]]\nname = \"p2p\"\ntarget = \"{}\"\n",
            echo_server()
        ),
    )
    .unwrap();
    let check = sentry(&["check", "--config", sentry_toml.to_str().unwrap()]);
    assert!(check.status.success(), "{}", text(&check.stderr));
    let check = sentry(&["check", "--config", agent_toml.to_str().unwrap()]);
    assert!(check.status.success(), "{}", text(&check.stderr));

    let mut serve = Daemon::start("serve", &sentry_toml);
    serve.wait_log("sentry ready", 1, Duration::from_secs(20));
    let mut agent = Daemon::start("agent", &agent_toml);
    serve.wait_log("tunnel up", 1, Duration::from_secs(20));
    let p2p: SocketAddr = format!("127.0.0.1:{p2p_port}").parse().unwrap();
    assert_eq!(echo_through(p2p).unwrap(), b"through the tunnel");

    // SIGKILL: no goodbye. The restarted agent's tunnel replaces the dead one at once.
    agent.signal(Signal::KILL);
    agent.wait_exit(Duration::from_secs(5));
    let mut agent = Daemon::start("agent", &agent_toml);
    serve.wait_log("tunnel up", 2, Duration::from_secs(20));
    assert_eq!(echo_through(p2p).unwrap(), b"through the tunnel");

    // SIGTERM: both exit 0, promptly (nothing is open to drain).
    agent.signal(Signal::TERM);
    assert_eq!(agent.wait_exit(Duration::from_secs(10)), Some(0));
    serve.signal(Signal::TERM);
    assert_eq!(serve.wait_exit(Duration::from_secs(10)), Some(0));
}

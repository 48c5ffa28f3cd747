//! The systemd units, checked by systemd's own tools: `systemd-analyze verify` (syntax,
//! directives, dependencies, executables) and `systemd-analyze security --offline` (the
//! sandbox score, which must be "OK" or better).
//!
//! `verify` insists that `ExecStart` names an existing executable; the units name the
//! installed path `/usr/local/bin/sentry`, so each is verified as a copy in which only that
//! path is replaced by the binary cargo built. Without systemd-analyze the tests are skipped
//! and say so; under `CI=true` they fail instead.
#![allow(clippy::unwrap_used)]

use std::process::Command;

use tests::{repo_root, sentry_bin};

const UNITS: [&str; 2] = ["sentry.service", "sentry-agent.service"];

fn analyze_available() -> bool {
    tests::tool_available("systemd-analyze", &["--version"], "systemd unit checks")
}

#[test]
fn the_units_pass_systemd_analyze_verify() {
    if !analyze_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let bin = sentry_bin();
    for unit in UNITS {
        let text = std::fs::read_to_string(repo_root().join("systemd").join(unit)).unwrap();
        assert!(text.contains("ExecStart=/usr/local/bin/sentry "), "{unit}");
        let copy = dir.path().join(unit);
        std::fs::write(
            &copy,
            text.replace("/usr/local/bin/sentry", bin.to_str().unwrap()),
        )
        .unwrap();
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .arg(&copy)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{unit}: {stderr}");
        assert!(stderr.trim().is_empty(), "{unit}: warnings: {stderr}");
    }
}

#[test]
fn the_units_score_ok_or_better_in_systemd_analyze_security() {
    if !analyze_available() {
        return;
    }
    for unit in UNITS {
        let path = repo_root().join("systemd").join(unit);
        let out = Command::new("systemd-analyze")
            .args(["security", "--offline=yes", "--no-pager"])
            .arg(&path)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let overall = stdout
            .lines()
            .find(|l| l.contains("Overall exposure level"))
            .unwrap_or_else(|| panic!("{unit}: no overall score in:\n{stdout}"));
        // "→ Overall exposure level for sentry.service: 1.5 OK 🙂"
        let verdict: Vec<&str> = overall
            .rsplit(':')
            .next()
            .unwrap()
            .split_whitespace()
            .collect();
        let score: f64 = verdict[0].parse().unwrap();
        eprintln!("{unit}: exposure {score} {}", verdict[1]);
        assert!(
            matches!(verdict[1], "OK" | "SAFE"),
            "{unit}: {overall}\n{stdout}"
        );
    }
}

/// What the units promise an operator, read from the units themselves: a reload checks the
/// new config before the daemon is told (so a bad one fails `systemctl reload`), a bad config
/// is not restarted in a loop, the key is passed as a credential, and each unit has a state
/// directory of its own.
#[test]
fn the_units_check_before_reloading_and_pass_the_key_as_a_credential() {
    let mut state = Vec::new();
    for (unit, config, key) in [
        ("sentry.service", "sentry.toml", "sentry.key"),
        ("sentry-agent.service", "agent.toml", "agent.key"),
    ] {
        let text = std::fs::read_to_string(repo_root().join("systemd").join(unit)).unwrap();
        let reloads: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("ExecReload="))
            .collect();
        assert_eq!(
            reloads,
            [
                format!(
                    "ExecReload=/usr/local/bin/sentry check --no-key --config /etc/sentry/{config}"
                )
                .as_str(),
                "ExecReload=/bin/kill -HUP $MAINPID"
            ],
            "{unit}"
        );
        assert!(text.contains("\nRestartPreventExitStatus=2\n"), "{unit}");
        for line in [
            format!("LoadCredential={key}:/etc/sentry/{key}"),
            format!("SetCredential={key}:unset"),
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{unit}: {line} (the key as a credential, with a placeholder while it is not \
                 installed)"
            );
        }
        // systemd's RestartPreventExitStatus= sees only the main process: a check in
        // ExecStartPre that exits 2 would be restarted in a loop.
        assert!(!text.contains("\nExecStartPre="), "{unit}");
        let dir = text
            .lines()
            .find_map(|l| l.strip_prefix("StateDirectory="))
            .unwrap();
        state.push(dir.to_owned());
    }
    assert_ne!(
        state[0], state[1],
        "both units would share one state directory"
    );
}

/// The daemon run as the unit runs it: an unprivileged user (nobody, as `DynamicUser=` picks
/// one), the key passed as a systemd credential. Before a key is installed (the credential is
/// the unit's `SetCredential=` placeholder), `sentry check` exits 2 naming the config key, the file, the user and the
/// fix; a key installed as root's mode-0600 file is still unreadable to that user, and says
/// so; once systemd has copied it into the credentials directory at the next start (owned
/// by the unit's user, or root's with an ACL whose mask shows a group bit), the daemon reads
/// it and starts.
#[test]
fn a_key_installed_after_the_first_start_is_read_as_a_credential() {
    if !can_run_as_another_user("the credential test") {
        return;
    }
    use std::os::unix::fs::{PermissionsExt, chown};
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let open = |path: &std::path::Path, mode: u32| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    open(root, 0o755);
    let etc = root.join("etc");
    std::fs::create_dir(&etc).unwrap();
    open(&etc, 0o755);
    let creds = root.join("credentials");
    std::fs::create_dir(&creds).unwrap();
    open(&creds, 0o500);
    chown(&creds, Some(NOBODY), Some(NOBODY)).unwrap();
    let key_path = etc.join("agent.key");
    let config = etc.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[agent]\nname = \"v1\"\nprivate_key = \"{}\"\n\n\
             [[sentry]]\naddress = \"127.0.0.1:9\"\npublic_key = \"{}\"\n\n\
             [[service]]\nname = \"p2p\"\ntarget = \"127.0.0.1:7100\"\n",
            key_path.display(),
            tests::key().public_key()
        ),
    )
    .unwrap();
    open(&config, 0o644);
    let check = || {
        let out = as_unit(&creds)
            .args(["check", "--config", config.to_str().unwrap()])
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };

    // The first start: no key anywhere, and systemd passes the unit's placeholder.
    let empty = creds.join("agent.key");
    std::fs::write(&empty, "unset").unwrap();
    open(&empty, 0o400);
    chown(&empty, Some(NOBODY), Some(NOBODY)).unwrap();
    let (code, _, err) = check();
    assert_eq!(code, Some(2), "{err}");
    for needed in [
        "agent.private_key",
        key_path.to_str().unwrap(),
        "sentry keygen --out",
        "LoadCredential=agent.key:",
    ] {
        assert!(err.contains(needed), "missing {needed:?} in: {err}");
    }
    // Installed as root's, 0600: the unit's user cannot read the file itself.
    let out = Command::new(sentry_bin())
        .args(["keygen", "--out", key_path.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success());
    let (code, _, err) = check();
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("uid 65534"), "{err}");
    assert!(err.contains("LoadCredential=agent.key:"), "{err}");
    // The next start: systemd copies it in, owned by the unit's user...
    let credential = creds.join("agent.key");
    std::fs::remove_file(&credential).unwrap();
    std::fs::copy(&key_path, &credential).unwrap();
    open(&credential, 0o400);
    chown(&credential, Some(NOBODY), Some(NOBODY)).unwrap();
    let (code, out, err) = check();
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("read from the systemd credential agent.key"),
        "{out}"
    );
    // ...or root's and readable by it through an ACL, whose mask shows as a group bit in
    // the mode (here through its group, which shows the same).
    chown(&credential, Some(0), Some(NOBODY)).unwrap();
    open(&credential, 0o440);
    open(&creds, 0o555);
    let (code, _, err) = check();
    assert_eq!(code, Some(0), "{err}");
    // And the daemon itself starts with it.
    let mut agent = as_unit(&creds);
    agent.args([
        "--log-format",
        "json",
        "agent",
        "--config",
        config.to_str().unwrap(),
    ]);
    let agent = tests::daemon::Daemon::from_command(agent);
    agent.wait_log(
        "private key read from the unit's credentials",
        1,
        tests::PATIENCE,
    );
    agent.wait_log("agent starting", 1, tests::PATIENCE);
}

/// Whether this test may run the daemon as another user (root, and `setpriv`); said when it is
/// skipped, and a failure under `CI=true`.
fn can_run_as_another_user(what: &str) -> bool {
    if !rustix::process::geteuid().is_root() {
        assert!(
            !std::env::var("CI").is_ok_and(|v| v == "true"),
            "running as another user needs root, which CI has"
        );
        eprintln!("{what} skipped: not root");
        return false;
    }
    tests::tool_available("setpriv", &["--version"], what)
}

/// nobody: the user a unit's `DynamicUser=` stands in for here.
const NOBODY: u32 = 65534;

/// `sentry` as a unit runs it: as nobody, with `$CREDENTIALS_DIRECTORY` at `creds`.
fn as_unit(creds: &std::path::Path) -> Command {
    let mut command = Command::new("setpriv");
    command
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(sentry_bin())
        .env("CREDENTIALS_DIRECTORY", creds)
        .env("USER", "nobody");
    command
}

/// A JSON-RPC route's certificate and key as the deploy hook leaves them (root's, the
/// group's, 0640, in a 0750 directory): the sentry's user reads them through its
/// supplementary group, and without the group `check` says what to do.
#[test]
fn route_certificates_are_read_through_the_units_group() {
    if !can_run_as_another_user("the certificate test") {
        return;
    }
    use std::os::unix::fs::{PermissionsExt, chown};
    let dir = tempfile::tempdir().unwrap();
    let mode = |path: &std::path::Path, mode: u32| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    mode(dir.path(), 0o755);
    let tls = dir.path().join("tls");
    std::fs::create_dir(&tls).unwrap();
    mode(&tls, 0o750);
    chown(&tls, Some(0), Some(NOBODY)).unwrap();
    let generated = rcgen::generate_simple_self_signed(vec!["rpc.example".to_owned()]).unwrap();
    for (name, body, bits) in [
        ("rpc.crt", generated.cert.pem(), 0o644),
        ("rpc.key", generated.signing_key.serialize_pem(), 0o640),
    ] {
        let path = tls.join(name);
        std::fs::write(&path, body).unwrap();
        mode(&path, bits);
        chown(&path, Some(0), Some(NOBODY)).unwrap();
    }
    let config = dir.path().join("sentry.toml");
    std::fs::write(
        &config,
        format!(
            "[sentry]\nprivate_key = \"sentry.key\"\nquic_listen = \"127.0.0.1:0\"\n\n\
             [[agent]]\nname = \"v1\"\npublic_key = \"{}\"\n\n\
             [[route]]\nname = \"rpc\"\nlisten = \"127.0.0.1:0\"\nprotocol = \"jsonrpc\"\n\
             upstream = [\"v1/rpc\"]\n[route.jsonrpc]\npreset = \"icon\"\n\
             [route.tls]\ncert = \"tls/rpc.crt\"\nkey = \"tls/rpc.key\"\n",
            tests::key().public_key()
        ),
    )
    .unwrap();
    mode(&config, 0o644);
    let check = |group: &str| {
        Command::new("setpriv")
            .args([
                "--reuid=65534",
                &format!("--regid={group}"),
                "--clear-groups",
                "--",
            ])
            .arg(sentry_bin())
            .args(["check", "--no-key", "--config", config.to_str().unwrap()])
            .output()
            .unwrap()
    };
    let with_group = check("65534");
    assert!(
        with_group.status.success(),
        "{}",
        String::from_utf8_lossy(&with_group.stderr)
    );
    let without = check("65533");
    assert_eq!(without.status.code(), Some(2));
    let err = String::from_utf8_lossy(&without.stderr);
    assert!(err.contains("route[0].tls"), "{err}");
    assert!(err.contains("Permission denied"), "{err}");
    assert!(err.contains("sentry-tls group"), "{err}");
}

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

//! What an operator imports: the alert rules (`monitoring/alerts.yml`, checked and unit-tested
//! by Prometheus's own `promtool`), the Grafana dashboard (`monitoring/dashboard.json`, every
//! series it queries served by a live sentry or agent), and a real Prometheus (Debian's)
//! scraping a live sentry and agent. Without `promtool`/`prometheus` each test says it was
//! skipped; under `CI=true` it fails instead.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use relay_core::agent::Agent;
use relay_core::config;
use tests::*;

fn monitoring() -> std::path::PathBuf {
    repo_root().join("monitoring")
}

#[test]
fn the_alert_rules_pass_promtool_and_their_own_tests() {
    if !tool_available("promtool", &["--version"], "the alert rule checks") {
        return;
    }
    for args in [
        &["check", "rules", "alerts.yml"][..],
        &["test", "rules", "alerts.test.yml"],
    ] {
        let out = Command::new("promtool")
            .args(args)
            .current_dir(monitoring())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "promtool {args:?}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// A sentry with a tcp route, an HTTPS JSON-RPC route and an agent allowed egress, and that
/// agent with a service and an egress listener: every kind of series the daemons serve.
struct Live {
    sentry: RunningSentry,
    agent: relay_core::agent::AgentHandle,
    task: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl Drop for Live {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn live() -> Live {
    let dir = tempfile::tempdir().unwrap();
    let generated = rcgen::generate_simple_self_signed(vec!["rpc.example".to_owned()]).unwrap();
    std::fs::write(dir.path().join("rpc.crt"), generated.cert.pem()).unwrap();
    let rpc_key = dir.path().join("rpc.key");
    std::fs::write(&rpc_key, generated.signing_key.serialize_pem()).unwrap();
    std::fs::set_permissions(
        &rpc_key,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let (sentry_key, agent_key) = (key(), key());
    let text = format!(
        "[sentry]\nprivate_key = \"s.key\"\nquic_listen = \"127.0.0.1:0\"\n\
         metrics_listen = \"127.0.0.1:0\"\n\n\
         [[agent]]\nname = \"v1\"\npublic_key = \"{}\"\negress = true\n\n\
         [[route]]\nname = \"p2p\"\nlisten = \"127.0.0.1:0\"\nupstream = [\"v1/p2p\"]\n\n\
         [[route]]\nname = \"rpc\"\nlisten = \"127.0.0.1:0\"\nprotocol = \"jsonrpc\"\n\
         upstream = [\"v1/p2p\"]\n[route.jsonrpc]\npreset = \"ethereum\"\n\
         [route.tls]\ncert = \"rpc.crt\"\nkey = \"rpc.key\"\n\n\
         [[route]]\nname = \"plain-rpc\"\nlisten = \"127.0.0.1:0\"\nprotocol = \"jsonrpc\"\n\
         upstream = [\"v1/p2p\"]\n[route.jsonrpc]\npreset = \"ethereum\"\n",
        agent_key.public_key()
    );
    let sentry_config = config::parse_sentry(&dir.path().join("sentry.toml"), &text).unwrap();
    let sentry = start_sentry(&sentry_config, &sentry_key).await;
    let text = format!(
        "[agent]\nname = \"v1\"\nprivate_key = \"a.key\"\nmetrics_listen = \"127.0.0.1:0\"\n\n\
         [[sentry]]\naddress = \"{}\"\npublic_key = \"{}\"\n\n\
         [[service]]\nname = \"p2p\"\ntarget = \"{}\"\n\n\
         [[egress]]\nlisten = \"127.0.0.1:0\"\nmode = \"socks5\"\n",
        sentry.handle.quic_addr().expect("quic_listen is set"),
        sentry_key.public_key(),
        echo_service().await
    );
    let agent_config = config::parse_agent(Path::new("agent.toml"), &text).unwrap();
    let agent = Agent::new(&agent_config, &agent_key).unwrap();
    let handle = agent.handle();
    let task = tokio::spawn(agent.run(std::future::pending()));
    sentry.wait_agent("v1", true).await;
    // One call the sentry answers itself (a denied method): the calls family has a row.
    let rpc = sentry.route("plain-rpc");
    tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let body = r#"{"jsonrpc":"2.0","id":1,"method":"admin_peers"}"#;
        let mut tcp = std::net::TcpStream::connect(rpc).unwrap();
        write!(
            tcp,
            "POST / HTTP/1.0\r\nHost: x\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut answer = String::new();
        tcp.read_to_string(&mut answer).unwrap();
        assert!(answer.contains("-32601"), "{answer}");
    })
    .await
    .unwrap();
    Live {
        sentry,
        agent: handle,
        task,
        _dir: dir,
    }
}

/// Every `sentry_*` series name a text holds, as written (`_total`, `_bucket` included).
fn series_in(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("sentry_") {
        let start = i + at;
        let preceded =
            start > 0 && (bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let end = text[start..]
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .map_or(text.len(), |n| start + n);
        if !preceded {
            names.insert(text[start..end].to_owned());
        }
        i = end;
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_series_the_dashboard_queries_is_served() {
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(monitoring().join("dashboard.json")).unwrap(),
    )
    .unwrap();
    let mut queried = BTreeSet::new();
    let mut panels = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            queried.extend(series_in(target["expr"].as_str().unwrap()));
            panels += 1;
        }
    }
    assert!(
        panels > 20 && queried.len() > 20,
        "{panels} queries, {queried:?}"
    );
    let live = live().await;
    let served: BTreeSet<String> = [
        live.sentry.handle.render_metrics(),
        live.agent.render_metrics(),
    ]
    .iter()
    .flat_map(|text| {
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split(['{', ' ']).next().map(str::to_owned))
            .collect::<Vec<_>>()
    })
    .collect();
    let missing: Vec<&String> = queried.difference(&served).collect();
    assert!(
        missing.is_empty(),
        "the dashboard queries series no daemon serves: {missing:?}"
    );
    // And the alert rules too.
    let rules = std::fs::read_to_string(monitoring().join("alerts.yml")).unwrap();
    let expressions: String = rules
        .lines()
        .filter(|l| {
            !l.trim_start().starts_with('#')
                && !l.contains("summary:")
                && !l.contains("description:")
        })
        .collect::<Vec<_>>()
        .join("\n");
    let missing: Vec<String> = series_in(&expressions)
        .into_iter()
        .filter(|s| !served.contains(s))
        .collect();
    assert!(
        missing.is_empty(),
        "the alert rules query series no daemon serves: {missing:?}"
    );
}

/// Debian's Prometheus scrapes a live sentry and agent; their series come back through its
/// HTTP API, labelled as the daemons wrote them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scrapes_the_sentry_and_the_agent() {
    if !tool_available("prometheus", &["--version"], "the Prometheus scrape test") {
        return;
    }
    let live = live().await;
    let sentry = live.sentry.handle.metrics_addr().unwrap();
    let agent = live.agent.metrics_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {}\n\
             scrape_configs:\n  - job_name: sentry\n    static_configs:\n      - targets: ['{sentry}', '{agent}']\n",
            monitoring().join("alerts.yml").display()
        ),
    )
    .unwrap();
    let web = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut prometheus = Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address={web}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    struct Stop<'a>(&'a mut std::process::Child);
    impl Drop for Stop<'_> {
        fn drop(&mut self) {
            // By its PID.
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _stop = Stop(&mut prometheus);
    let query = |q: &str| {
        let path = format!("/api/v1/query?query={}", q.replace(' ', "%20"));
        tokio::task::spawn_blocking(move || std::panic::catch_unwind(|| http_get(web, &path)).ok())
    };
    let mut roles = BTreeSet::new();
    for _ in 0..60 {
        if let Ok(Some((200, body))) = query("sentry_build_info").await {
            let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
            roles = answer["data"]["result"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|r| r["metric"]["role"].as_str().map(str::to_owned))
                .collect();
            if roles.len() == 2 {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(
        roles,
        BTreeSet::from(["agent".to_owned(), "sentry".to_owned()]),
        "Prometheus did not scrape both daemons"
    );
    // A labelled series of each, as the daemons wrote it.
    let (_, body) = query("sentry_tunnel_up").await.unwrap().unwrap();
    assert!(body.contains("\"agent\":\"v1\""), "{body}");
    let (_, body) = query("sentry_agent_tunnel_up").await.unwrap().unwrap();
    assert!(body.contains(&sentry_quic(&live)), "{body}");
}

fn sentry_quic(live: &Live) -> String {
    let addr: SocketAddr = live.sentry.handle.quic_addr().expect("quic_listen is set");
    format!("\"sentry\":\"{addr}\"")
}

//! The built `sentry` binary run as a daemon, optionally inside a network namespace, with its
//! log captured. Ended by PID (SIGKILL) when dropped.
#![allow(clippy::disallowed_methods)] // plain deadlines in test helpers; the clock rule is for relay-core

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal};

use crate::sentry_bin;

/// Log lines a daemon prints when the test that ran it fails.
const LOG_ON_FAILURE: usize = 200;

/// A running `sentry serve` or `sentry agent`.
pub struct Daemon {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // `Child::kill` signals this child's PID, never a name.
        let _ = self.child.kill();
        let _ = self.child.wait();
        // A failing test shows what the daemon said: CI keeps nothing else.
        if std::thread::panicking() {
            let lines = self.lines.lock().map(|l| l.clone()).unwrap_or_default();
            let from = lines.len().saturating_sub(LOG_ON_FAILURE);
            eprintln!(
                "--- daemon pid {}: last {} of {} log lines ---\n{}\n--- end of daemon log ---",
                self.child.id(),
                lines.len() - from,
                lines.len(),
                lines[from..].join("\n")
            );
        }
    }
}

impl Daemon {
    /// Start `sentry ROLE --config CONFIG` on this host.
    #[must_use]
    pub fn start(role: &str, config: &Path) -> Self {
        Self::start_in(None, role, config)
    }

    /// Start `sentry ROLE --config CONFIG`, inside network namespace `netns` if given.
    /// `ip netns exec` execs the binary, so the child's PID is the daemon's.
    #[must_use]
    pub fn start_in(netns: Option<&str>, role: &str, config: &Path) -> Self {
        Self::start_with(netns, role, config, &[])
    }

    /// As [`Daemon::start_in`], with extra environment variables.
    #[must_use]
    pub fn start_with(
        netns: Option<&str>,
        role: &str,
        config: &Path,
        env: &[(&str, &str)],
    ) -> Self {
        let command = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(sentry_bin());
                c
            }
            None => Command::new(sentry_bin()),
        };
        Self::spawn(command, role, config, env)
    }

    /// As [`Daemon::start`], with the soft open-file limit lowered to `soft` first, as a
    /// shell's `ulimit -Sn` leaves it (the shell execs the daemon: the PID is the daemon's).
    #[must_use]
    pub fn start_with_soft_open_files(role: &str, config: &Path, soft: u64) -> Self {
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(format!("ulimit -Sn {soft} && exec \"$@\""))
            .arg("sh")
            .arg(sentry_bin());
        Self::spawn(command, role, config, &[])
    }

    fn spawn(mut command: Command, role: &str, config: &Path, env: &[(&str, &str)]) -> Self {
        command
            .args([
                "--log-format",
                "json",
                role,
                "--config",
                config.to_str().unwrap(),
            ])
            .envs(env.iter().copied());
        Self::from_command(command)
    }

    /// Run a command made elsewhere (its arguments complete; it must exec the daemon, so its
    /// PID is the daemon's), with the log captured.
    #[must_use]
    pub fn from_command(mut command: Command) -> Self {
        let mut child = command
            // `SENTRY_TEST_LOG` sets the daemons' filter when debugging a test.
            .env(
                "RUST_LOG",
                std::env::var("SENTRY_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        Self { child, lines }
    }

    /// How many log lines so far contain `needle`.
    #[must_use]
    pub fn count_log(&self, needle: &str) -> usize {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// The whole log so far.
    #[must_use]
    pub fn log(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// Wait (bounded) until `count` log lines contain `needle`.
    pub fn wait_log(&self, needle: &str, count: usize, within: Duration) {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if self.count_log(needle) >= count {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!(
            "pid {}: fewer than {count} log lines with {needle:?} within {within:?}:\n{}",
            self.pid(),
            self.log()
        );
    }

    /// Wait (bounded) for the `nth` (from 0) log event whose message contains `message` and
    /// whose fields include every `(name, value)` of `having`; its fields.
    pub fn wait_event(
        &self,
        message: &str,
        having: &[(&str, &str)],
        nth: usize,
        within: Duration,
    ) -> serde_json::Map<String, serde_json::Value> {
        let deadline = Instant::now() + within;
        loop {
            let found = self
                .lines
                .lock()
                .unwrap()
                .iter()
                .filter_map(|line| {
                    let event: serde_json::Value = serde_json::from_str(line).ok()?;
                    let fields = event.get("fields")?.as_object()?.clone();
                    let text = fields.get("message")?.as_str()?;
                    let matches = text.contains(message)
                        && having.iter().all(|(k, v)| {
                            fields.get(*k).and_then(serde_json::Value::as_str) == Some(*v)
                        });
                    matches.then_some(fields)
                })
                .nth(nth);
            if let Some(fields) = found {
                return fields;
            }
            assert!(
                Instant::now() < deadline,
                "pid {}: no log event {message:?} with {having:?} (#{nth}) within {within:?}:\n{}",
                self.pid(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// A socket address logged as field `field` of the first event `message`.
    pub fn logged_addr(&self, message: &str, having: &[(&str, &str)], field: &str) -> SocketAddr {
        self.logged_addr_nth(message, having, field, 0)
    }

    /// A socket address logged as field `field` of the `nth` (from 0) event `message`.
    pub fn logged_addr_nth(
        &self,
        message: &str,
        having: &[(&str, &str)],
        field: &str,
        nth: usize,
    ) -> SocketAddr {
        let fields = self.wait_event(message, having, nth, Duration::from_secs(20));
        let value = fields
            .get(field)
            .and_then(serde_json::Value::as_str)
            .unwrap_or_else(|| panic!("event {message:?} has no field {field}: {fields:?}"));
        value
            .parse()
            .unwrap_or_else(|e| panic!("{field} = {value:?}: {e}"))
    }

    /// The daemon's PID.
    #[must_use]
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Send `signal` to the daemon's PID.
    pub fn signal(&self, signal: Signal) {
        let pid = Pid::from_raw(i32::try_from(self.pid()).unwrap()).unwrap();
        rustix::process::kill_process(pid, signal).unwrap();
    }

    /// Wait (bounded) for exit; the exit code (`None` when ended by a signal).
    pub fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("pid {} did not exit within {within:?}", self.pid());
    }
}

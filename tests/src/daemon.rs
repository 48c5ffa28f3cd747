//! The built `sentry` binary run as a daemon, optionally inside a network namespace, with its
//! log captured. Ended by PID (SIGKILL) when dropped.
#![allow(clippy::disallowed_methods)] // plain deadlines in test helpers; the clock rule is for relay-core

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal};

use crate::sentry_bin;

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
        let mut command = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(sentry_bin());
                c
            }
            None => Command::new(sentry_bin()),
        };
        let mut child = command
            .args([role, "--config", config.to_str().unwrap()])
            .env("RUST_LOG", "info")
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

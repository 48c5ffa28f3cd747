//! What the suite reads of processes and the machine: CPU time, memory, versions.

use super::*;

/// User plus system CPU seconds of `pid` so far.
pub(super) fn cpu_seconds(pid: u32) -> f64 {
    let (user, system) = stat_seconds(&format!("/proc/{pid}/stat"));
    user + system
}

/// (user, system) CPU seconds from a `stat` file (`/proc/PID/stat`: a process's threads
/// summed; `/proc/self/task/TID/stat`: one thread).
pub(super) fn stat_seconds(path: &str) -> (f64, f64) {
    let Ok(stat) = std::fs::read_to_string(path) else {
        return (0.0, 0.0);
    };
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let hz = rustix::param::clock_ticks_per_second() as f64;
    (field(11) as f64 / hz, field(12) as f64 / hz)
}

/// A `/proc/PID/status` size line (`VmRSS:`, `VmHWM:`) in KiB.
pub(super) fn status_kib(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

pub(super) fn command_line(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

/// rathole's `Build Version` (its `--version` prints a block of build facts).
pub(super) fn rathole_version() -> String {
    let text = command_line(
        &std::env::var("RATHOLE_BIN").unwrap_or_default(),
        &["--version"],
    );
    text.lines()
        .find_map(|l| l.strip_prefix("Build Version:"))
        .map_or(text.clone(), |v| v.trim().to_owned())
}

pub(super) fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("unknown CPU", |(_, m)| m.trim())
        .to_owned();
    let cores = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map_or(0, |kib| kib >> 20);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{cores} cores ({model}), {memory} GiB, Linux {}",
        kernel.trim()
    )
}

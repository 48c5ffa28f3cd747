//! What one relayed request costs, read around each request/response run: CPU time, context
//! switches and syscalls of both tunnel ends together (or of the in-process relay's threads),
//! and the packets the hosts' links carried. Divided by the requests the run completed, so a
//! change to the relay core shows its effect per message, whatever the throughput.
//!
//! CPU and context switches come from `/proc` (every thread of each end); syscalls from
//! `perf stat -e raw_syscalls:sys_enter` attached to the ends for the run, where `perf` is
//! installed and may trace (else "–"); packets from the hosts' `/proc/net/dev` (every
//! interface but loopback in the namespace topology; loopback's own on the loopback site,
//! where it carries every leg).

use super::*;
use crate::system::stat_seconds;

/// Whose costs a probe reads.
pub(super) struct Targets {
    /// The tunnel ends' processes.
    pub pids: Vec<u32>,
    /// Threads of this process (an in-process relay's runtime).
    pub tids: Vec<u32>,
}

/// One run's costs per request.
#[derive(Clone, Copy, Default)]
pub(super) struct Cost {
    /// CPU microseconds (user + system) of the ends, or `None` without ends.
    pub cpu_us: Option<f64>,
    /// Of which in the kernel (system time).
    pub system_us: Option<f64>,
    /// Context switches (voluntary and not) of the ends.
    pub switches: Option<f64>,
    /// Syscalls entered by the ends.
    pub syscalls: Option<f64>,
    /// Packets on the sentry host's links (loopback: on `lo`, every leg).
    pub packets_sentry: f64,
    /// Packets on the validator host's links (none on loopback).
    pub packets_validator: Option<f64>,
}

/// Counters read before a run; [`Probe::finish`] reads them again.
pub(super) struct Probe {
    targets: Targets,
    cpu: (f64, f64),
    switches: u64,
    packets: (u64, Option<u64>),
    perf: Option<(Child, std::path::PathBuf)>,
}

impl Probe {
    pub(super) fn start(site: &Site, targets: Targets, scratch: &Path) -> Self {
        let perf = perf_attach(&targets, scratch);
        Self {
            cpu: cpu(&targets),
            switches: switches(&targets),
            packets: packets(site),
            targets,
            perf,
        }
    }

    pub(super) fn finish(self, site: &Site, requests: u64) -> Cost {
        let n = requests.max(1) as f64;
        let measured = !(self.targets.pids.is_empty() && self.targets.tids.is_empty());
        let now = cpu(&self.targets);
        let user = (now.0 - self.cpu.0) * 1e6 / n;
        let system = (now.1 - self.cpu.1) * 1e6 / n;
        let switches = switches(&self.targets).saturating_sub(self.switches) as f64 / n;
        let syscalls = self
            .perf
            .and_then(|(child, out)| perf_count(child, &out))
            .map(|c| c as f64 / n);
        let (sentry, validator) = packets(site);
        Cost {
            cpu_us: measured.then_some(user + system),
            system_us: measured.then_some(system),
            switches: measured.then_some(switches),
            syscalls: if measured { syscalls } else { None },
            packets_sentry: sentry.saturating_sub(self.packets.0) as f64 / n,
            packets_validator: validator
                .zip(self.packets.1)
                .map(|(after, before)| after.saturating_sub(before) as f64 / n),
        }
    }
}

/// The threads of this process whose name starts with `prefix` (a runtime's workers).
pub(super) fn own_threads(prefix: &str) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    dir.filter_map(Result::ok)
        .filter_map(|e| {
            let tid: u32 = e.file_name().to_str()?.parse().ok()?;
            let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
            comm.starts_with(prefix).then_some(tid)
        })
        .collect()
}

/// (user, system) CPU seconds of the targets so far.
fn cpu(t: &Targets) -> (f64, f64) {
    t.pids
        .iter()
        .map(|&p| format!("/proc/{p}/stat"))
        .chain(
            t.tids
                .iter()
                .map(|&tid| format!("/proc/self/task/{tid}/stat")),
        )
        .map(|path| stat_seconds(&path))
        .fold((0.0, 0.0), |(u, s), (du, ds)| (u + du, s + ds))
}

fn switches(t: &Targets) -> u64 {
    let status = |path: std::path::PathBuf| -> u64 {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .filter(|l| {
                l.starts_with("voluntary_ctxt_switches:")
                    || l.starts_with("nonvoluntary_ctxt_switches:")
            })
            .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .sum()
    };
    let threads = |pid: u32| -> u64 {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .map(|dir| {
                dir.filter_map(Result::ok)
                    .map(|e| status(e.path().join("status")))
                    .sum()
            })
            .unwrap_or(0)
    };
    t.pids.iter().map(|&p| threads(p)).sum::<u64>()
        + t.tids
            .iter()
            .map(|&tid| status(format!("/proc/self/task/{tid}/status").into()))
            .sum::<u64>()
}

/// Packets through the sentry host's links and the validator host's (rx + tx, loopback
/// excluded); on the loopback site, `lo`'s received packets (each is sent once and received
/// once) and no validator figure.
fn packets(site: &Site) -> (u64, Option<u64>) {
    match site {
        Site::Loopback => {
            let text = std::fs::read_to_string("/proc/net/dev").unwrap_or_default();
            (interface_packets(&text, true), None)
        }
        Site::Netns(_) => {
            let read = |host| {
                let ns = site.ns(host).expect("a namespace");
                let out = Command::new("ip")
                    .args(["netns", "exec", &ns, "cat", "/proc/net/dev"])
                    .output()
                    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                    .unwrap_or_default();
                interface_packets(&out, false)
            };
            (read(Host::Sentry), Some(read(Host::Validator)))
        }
    }
}

/// From `/proc/net/dev`: `lo`'s received packets when `lo`, else every other interface's
/// received plus sent packets.
fn interface_packets(text: &str, lo: bool) -> u64 {
    text.lines()
        .filter_map(|l| l.split_once(':'))
        .filter(|(name, _)| (name.trim() == "lo") == lo)
        .map(|(_, fields)| {
            let f: Vec<u64> = fields
                .split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect();
            // rx: bytes packets errs drop fifo frame compressed multicast; tx: bytes packets ...
            let rx = f.get(1).copied().unwrap_or(0);
            let tx = f.get(9).copied().unwrap_or(0);
            if lo { rx } else { rx + tx }
        })
        .sum()
}

/// `perf stat` counting syscalls entered by the targets until it is interrupted; `None` where
/// perf is missing or may not trace.
fn perf_attach(t: &Targets, scratch: &Path) -> Option<(Child, std::path::PathBuf)> {
    // Every thread of the ends, and the in-process threads: perf takes one list of them.
    let mut ids: Vec<String> = t.tids.iter().map(u32::to_string).collect();
    for pid in &t.pids {
        if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) {
            ids.extend(dir.filter_map(|e| e.ok()?.file_name().into_string().ok()));
        }
    }
    if ids.is_empty() {
        return None;
    }
    let out = scratch.join(format!("perf-{}.csv", std::process::id()));
    let child = Command::new("perf")
        .args(["stat", "-x", ",", "-e", "raw_syscalls:sys_enter", "-o"])
        .arg(&out)
        .args(["-t", &ids.join(",")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    // perf attaches before it counts; give it that moment.
    std::thread::sleep(Duration::from_millis(200));
    Some((child, out))
}

fn perf_count(mut child: Child, out: &Path) -> Option<u64> {
    // SIGINT: perf prints its counts and exits. By PID, never by name.
    let pid = rustix::process::Pid::from_raw(i32::try_from(child.id()).ok()?)?;
    let _ = rustix::process::kill_process(pid, rustix::process::Signal::INT);
    let _ = child.wait();
    let text = std::fs::read_to_string(out).ok()?;
    let _ = std::fs::remove_file(out);
    text.lines()
        .find(|l| l.contains("raw_syscalls:sys_enter"))
        .and_then(|l| l.split(',').next()?.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_packets_reads_proc_net_dev() {
        let text = "Inter-|   Receive                                                |  Transmit\n \
             face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n    \
             lo: 1000 10 0 0 0 0 0 0 1000 10 0 0 0 0 0 0\n  \
             eth0: 5000 7 0 0 0 0 0 0 6000 8 0 0 0 0 0 0\n  \
             veth1: 5000 1 0 0 0 0 0 0 6000 2 0 0 0 0 0 0\n";
        assert_eq!(interface_packets(text, true), 10);
        assert_eq!(interface_packets(text, false), 7 + 8 + 1 + 2);
    }
}

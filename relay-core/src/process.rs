//! This process as the kernel counts it, for `/metrics`: open files and their limit, resident
//! memory, CPU time. Read from `/proc/self` at each scrape (the units' `ProcSubset=pid` keeps
//! it readable); a value that cannot be read is left out rather than reported as zero.

use rustix::process::{Resource, getrlimit};

/// One reading.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Reading {
    pub(crate) open_fds: Option<i64>,
    pub(crate) max_fds: Option<i64>,
    pub(crate) resident_bytes: Option<i64>,
    pub(crate) cpu_seconds: Option<u64>,
}

impl Reading {
    pub(crate) fn now() -> Self {
        let open_fds = std::fs::read_dir("/proc/self/fd")
            .ok()
            .map(|dir| i64::try_from(dir.count()).unwrap_or(i64::MAX));
        let max_fds = getrlimit(Resource::Nofile)
            .current
            .map(|n| i64::try_from(n).unwrap_or(i64::MAX));
        let page = rustix::param::page_size();
        let resident_bytes = std::fs::read_to_string("/proc/self/statm")
            .ok()
            .and_then(|text| text.split_whitespace().nth(1)?.parse::<i64>().ok())
            .map(|pages| pages.saturating_mul(i64::try_from(page).unwrap_or(4096)));
        let cpu_seconds = std::fs::read_to_string("/proc/self/stat")
            .ok()
            .and_then(|text| cpu_ticks(&text))
            .map(|ticks| ticks / rustix::param::clock_ticks_per_second().max(1));
        Self {
            open_fds,
            max_fds,
            resident_bytes,
            cpu_seconds,
        }
    }
}

/// utime + stime (fields 14 and 15) of a `/proc/PID/stat` line. The command name (field 2)
/// is in parentheses and may hold spaces: fields are counted after its closing one.
fn cpu_ticks(stat: &str) -> Option<u64> {
    let after = &stat[stat.rfind(')')? + 1..];
    let mut fields = after.split_whitespace().skip(11);
    let user: u64 = fields.next()?.parse().ok()?;
    let system: u64 = fields.next()?.parse().ok()?;
    Some(user + system)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_are_counted_after_the_command_name() {
        let line = "4242 (sentry (x) y) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 9";
        assert_eq!(cpu_ticks(line), Some(300));
        assert_eq!(cpu_ticks("garbage"), None);
    }

    #[test]
    fn this_process_reads() {
        let r = Reading::now();
        assert!(r.open_fds.is_some_and(|n| n >= 3), "{r:?}");
        assert!(r.resident_bytes.is_some_and(|n| n > 0), "{r:?}");
        assert!(r.cpu_seconds.is_some(), "{r:?}");
    }
}

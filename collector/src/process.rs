//! The agent's own process figures under the names every Prometheus client library gives
//! them (`process_cpu_seconds_total` and the rest, as the Go client's process collector
//! exports them), so that the dashboards and alerts kept for every exporter (CPU, memory,
//! file descriptors, restarts) see this one too: a privileged agent on every ingress host is
//! watched for what it costs. Read at each scrape, as the client libraries do.

use std::sync::{
    OnceLock,
    atomic::{AtomicBool, Ordering},
};

use procfs::process::{LimitValue, Process, Stat};

/// This process, from `/proc/self`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProcessStats {
    /// User and system CPU time.
    pub cpu_seconds: f64,
    pub resident_memory_bytes: u64,
    pub virtual_memory_bytes: u64,
    pub open_fds: u64,
    /// The soft limit on open files (`None`: unlimited).
    pub max_fds: Option<u64>,
    /// Since the Unix epoch.
    pub start_time_seconds: f64,
    pub threads: u64,
}

/// The start time, worked out once: it never changes, and the boot time it is counted from
/// moves with clock steps, which would make it look like a restart.
static START_TIME_SECONDS: OnceLock<f64> = OnceLock::new();

/// A failed read was logged (once: every scrape would fail alike).
static READ_FAILED: AtomicBool = AtomicBool::new(false);

impl ProcessStats {
    #[cfg(test)]
    pub const EXAMPLE: Self = Self {
        cpu_seconds: 1.5,
        resident_memory_bytes: 25_165_824,
        virtual_memory_bytes: 1_073_741_824,
        open_fds: 21,
        max_fds: Some(1_048_576),
        start_time_seconds: 1_796_000_000.0,
        threads: 4,
    };

    /// [`Self::read`] for a scrape: a failure leaves the figures out, with a warning the
    /// first time.
    pub fn read_or_log() -> Option<Self> {
        Self::read()
            .inspect_err(|err| {
                if !READ_FAILED.swap(true, Ordering::Relaxed) {
                    tracing::warn!("the process_* figures are left out: reading /proc/self: {err}");
                }
            })
            .ok()
    }

    /// This process's figures; an error if `/proc` cannot be read.
    pub fn read() -> procfs::ProcResult<Self> {
        let myself = Process::myself()?;
        let stat = myself.stat()?;
        let max_fds = match myself.limits()?.max_open_files.soft_limit {
            LimitValue::Unlimited => None,
            LimitValue::Value(limit) => Some(limit),
        };
        Ok(Self {
            cpu_seconds: ticks_to_seconds(stat.utime + stat.stime),
            resident_memory_bytes: stat.rss * procfs::page_size(),
            virtual_memory_bytes: stat.vsize,
            open_fds: myself.fd_count()? as u64,
            max_fds,
            start_time_seconds: start_time_seconds(&stat)?,
            threads: u64::try_from(stat.num_threads).unwrap_or(0),
        })
    }
}

fn ticks_to_seconds(ticks: u64) -> f64 {
    #[expect(clippy::cast_precision_loss, reason = "clock ticks, far below 2^52")]
    let seconds = ticks as f64 / procfs::ticks_per_second() as f64;
    seconds
}

fn start_time_seconds(stat: &Stat) -> procfs::ProcResult<f64> {
    if let Some(&start) = START_TIME_SECONDS.get() {
        return Ok(start);
    }
    #[expect(clippy::cast_precision_loss, reason = "seconds since the epoch")]
    let boot_time = procfs::boot_time_secs()? as f64;
    Ok(*START_TIME_SECONDS.get_or_init(|| boot_time + ticks_to_seconds(stat.starttime)))
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

    use super::*;

    #[test]
    fn reads_this_process() {
        let before = ProcessStats::read().unwrap();
        let files: Vec<_> = (0..256)
            .map(|_| std::fs::File::open("/proc/self/stat").unwrap())
            .collect();
        // Spin until this process has used 50 ms more CPU: wall time gives no such
        // guarantee on a loaded machine.
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut after = ProcessStats::read().unwrap();
        while after.cpu_seconds < before.cpu_seconds + 0.05 && Instant::now() < deadline {
            after = ProcessStats::read().unwrap();
        }
        drop(files);

        assert!(
            after.cpu_seconds >= before.cpu_seconds + 0.05,
            "{before:?} {after:?}"
        );
        // Other tests of this binary open and close files too, a few at a time.
        assert!(
            after.open_fds >= before.open_fds + 200,
            "{before:?} {after:?}"
        );
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: a valid rlimit to fill.
        assert_eq!(
            unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut limit) },
            0
        );
        assert_eq!(after.max_fds, Some(limit.rlim_cur));
        assert!(after.resident_memory_bytes > 1 << 20, "{after:?}");
        assert!(after.virtual_memory_bytes >= after.resident_memory_bytes);
        assert!(after.threads >= 1);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        // Started before this test, and not long before: the test binary just began.
        assert!(
            after.start_time_seconds <= now + 1.0 && after.start_time_seconds > now - 600.0,
            "{after:?} at {now}"
        );
        assert_eq!(
            after.start_time_seconds.to_bits(),
            before.start_time_seconds.to_bits()
        );
    }
}

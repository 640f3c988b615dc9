//! The kernel programs' clock (`bpf_ktime_get_ns`: `CLOCK_MONOTONIC`), read from here, and
//! the wall clock the outputs stamp with.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Sleeps until the next refresh is due, `interval` after the last was; one that is late
/// (a fetch or dump that took longer than the interval) starts at once, and the pace goes on
/// from it. A sleep after the work would stretch each period by the work's time.
pub fn sleep_until_due(due: &mut Instant, interval: Duration) {
    let now = Instant::now();
    *due = (*due + interval).max(now);
    std::thread::sleep(*due - now);
}

/// Milliseconds since the Unix epoch, now.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// `HH:MM:SS UTC` of a time in milliseconds since the Unix epoch: what a refreshing view
/// stamps each refresh with.
pub fn time_of_day_utc(unix_ms: u64) -> String {
    let seconds = unix_ms / 1000 % 86_400;
    format!(
        "{:02}:{:02}:{:02} UTC",
        seconds / 3600,
        seconds / 60 % 60,
        seconds % 60
    )
}

/// `CLOCK_MONOTONIC` now, in nanoseconds: the time base of every kernel stamp.
pub fn monotonic_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut now) };
    u64::try_from(now.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(now.tv_nsec).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_time_of_day_is_utcs() {
        // 2026-12-04 23:59:58.999 UTC.
        assert_eq!(super::time_of_day_utc(1_796_428_798_999), "23:59:58 UTC");
        assert_eq!(super::time_of_day_utc(0), "00:00:00 UTC");
    }
}

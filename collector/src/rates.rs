//! Rates of monotonic counters over sliding windows: instant (1 s), recent (10 s) and average
//! (60 s), as the proxy's own metrics report them, plus the per-poll history behind them.
//! Time is passed in, so the arithmetic is tested without clocks.

use std::{collections::VecDeque, time::Duration};

/// The last second.
pub const INSTANT: Duration = Duration::from_secs(1);
/// The last ten seconds.
pub const RECENT: Duration = Duration::from_secs(10);
/// The last minute.
pub const AVERAGE: Duration = Duration::from_mins(1);
/// How much less than a second apart two copies of counts may be: polls a second apart are
/// timed from when each began, and often come a millisecond early.
const COPY_JITTER: Duration = Duration::from_millis(50);

/// Per-second rates over the standard windows.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Rates {
    pub instant: f64,
    pub recent: f64,
    pub average: f64,
}

/// Samples of one monotonic counter, at most `max_age` of them (plus one older sample so that
/// a full window is always computable).
#[derive(Debug)]
pub struct CounterHistory {
    samples: VecDeque<(Duration, u64)>,
    max_age: Duration,
}

#[expect(clippy::cast_precision_loss, reason = "rates are reported as floats")]
fn per_second(from: (Duration, u64), to: (Duration, u64)) -> f64 {
    let elapsed = to.0.saturating_sub(from.0).as_secs_f64();
    if elapsed > 0.0 {
        to.1.saturating_sub(from.1) as f64 / elapsed
    } else {
        0.0
    }
}

impl CounterHistory {
    #[must_use]
    pub fn new(max_age: Duration) -> Self {
        Self {
            samples: VecDeque::new(),
            max_age,
        }
    }

    /// Records the counter's value at `at`. An older time than the newest sample is ignored;
    /// a lower value means the counter was reset (maps recreated): the history restarts.
    pub fn record(&mut self, at: Duration, value: u64) {
        if let Some(&(newest_at, newest)) = self.samples.back() {
            if at < newest_at {
                return;
            }
            if value < newest {
                self.samples.clear();
            }
        }
        self.samples.push_back((at, value));
        // Keep one sample at or before at - max_age, and nothing older.
        while self.samples.len() > 2
            && self
                .samples
                .get(1)
                .is_some_and(|&(second, _)| at.saturating_sub(second) >= self.max_age)
        {
            self.samples.pop_front();
        }
    }

    /// Per-second rate over about the last `window`: from the sample whose age is nearest
    /// `window` (the older one of two as near), or the oldest if none is that old; 0 with
    /// fewer than two samples. Polls are a poll interval apart measured from when each began,
    /// so the previous poll is often a millisecond under a second old: "at least `window`
    /// old" then took the one before it, and the 1 s rate covered two polls half the time
    /// (a rate that fell to zero showed as half the old one for a second more). After polls
    /// that stalled, the nearest sample can be older than `window`: the rate is then the
    /// stall's average, for one poll.
    #[must_use]
    pub fn rate(&self, window: Duration) -> f64 {
        let Some(&newest) = self.samples.back() else {
            return 0.0;
        };
        // The samples are in time order: the nearest is one of the two either side of
        // `window` ago (found by bisection: at 100 ms polls a minute is 600 samples, read for
        // three windows of every route each poll).
        let older = self.samples.len() - 1;
        let target = newest.0.saturating_sub(window);
        let split = self
            .samples
            .partition_point(|&(at, _)| at <= target)
            .min(older);
        let distance = |at: Duration| newest.0.saturating_sub(at).abs_diff(window);
        let base = match (split.checked_sub(1), (split < older).then_some(split)) {
            (Some(at_or_before), Some(after))
                if distance(self.samples[after].0) < distance(self.samples[at_or_before].0) =>
            {
                self.samples[after]
            }
            (Some(at_or_before), _) => self.samples[at_or_before],
            (None, Some(after)) => self.samples[after],
            (None, None) => newest,
        };
        per_second(base, newest)
    }

    /// Rates over the standard windows.
    #[must_use]
    pub fn rates(&self) -> Rates {
        Rates {
            instant: self.rate(INSTANT),
            recent: self.rate(RECENT),
            average: self.rate(AVERAGE),
        }
    }

    /// Rates between consecutive samples, oldest first, the last `n` of them.
    #[must_use]
    pub fn history(&self, n: usize) -> Vec<f64> {
        let rates: Vec<f64> = self
            .samples
            .iter()
            .zip(self.samples.iter().skip(1))
            .map(|(&from, &to)| per_second(from, to))
            .collect();
        rates[rates.len().saturating_sub(n)..].to_vec()
    }
}

/// How many windows [`CountsHistory::base`] reaches back over a gap with no copy since (and
/// half a window more, for polls that come late).
const GAP_SPANNED: u32 = 3;

/// Copies of some counters, one a second at most, kept a little over `max_age`: the base that
/// ratios and quantiles over a window are taken from (taken from the lifetime counters, they
/// would barely move during an incident).
#[derive(Debug)]
pub struct CountsHistory<T> {
    samples: VecDeque<(Duration, T)>,
    max_age: Duration,
    /// How often the agent polls: at polls a second apart a gap of minutes is a stall, at
    /// polls a minute apart one failed poll.
    poll_interval: Duration,
}

impl<T> CountsHistory<T> {
    #[must_use]
    pub fn new(max_age: Duration, poll_interval: Duration) -> Self {
        Self {
            samples: VecDeque::new(),
            max_age,
            poll_interval,
        }
    }

    /// Keeps `counts` as they stood at `at`, unless the newest copy is under a second old
    /// (less [`COPY_JITTER`]: polls a millisecond under a second apart kept every other copy).
    pub fn record(&mut self, at: Duration, counts: T) {
        if self
            .samples
            .back()
            .is_some_and(|(newest, _)| at + COPY_JITTER < *newest + INSTANT)
        {
            return;
        }
        self.samples.push_back((at, counts));
        // Keep one copy at or before at - max_age, and nothing older.
        while self.samples.len() > 2
            && self
                .samples
                .get(1)
                .is_some_and(|(second, _)| at.saturating_sub(*second) >= self.max_age)
        {
            self.samples.pop_front();
        }
    }

    /// The counts as they stood `window` before `now`: the copy whose age is nearest
    /// `window` (the older one of two as near), or the oldest there is. As in
    /// [`CounterHistory::rate`]: at `poll_interval_ms = 60000` a poll a millisecond early
    /// found the previous copy a millisecond under a minute old, and "the last minute" took
    /// the one before it, two minutes, half the time. After a stall of the polls (a throttled
    /// pod) the copy that old may be far older, and "the last minute" would take in the whole
    /// stall: past twice the window, the oldest copy since serves, as after a start. Unless
    /// that is the newest copy, which leaves nothing to count, and the one before is within
    /// [`GAP_SPANNED`] windows and the polls come slowly (half a window apart or more, a
    /// millisecond early too): at polls a minute apart, after one that failed, the next
    /// minute's figures span two minutes rather than none. At fast polls a gap that long is a
    /// stall too (a paused pod), whose first poll after would span it all, and the next one a
    /// second.
    #[must_use]
    pub fn base(&self, now: Duration, window: Duration) -> Option<&T> {
        let polled_slowly = self.poll_interval + COPY_JITTER >= window / 2;
        let mut younger: Option<(Duration, &T)> = None;
        for (newer_copies, (at, counts)) in self.samples.iter().rev().enumerate() {
            let age = now.saturating_sub(*at);
            if age >= window {
                return Some(match younger {
                    Some(_)
                        if newer_copies == 1
                            && age <= window * GAP_SPANNED + window / 2
                            && polled_slowly =>
                    {
                        counts
                    }
                    Some((_, since_stall)) if age > window * 2 => since_stall,
                    Some((younger_age, nearer))
                        if younger_age.abs_diff(window) < age.abs_diff(window) =>
                    {
                        nearer
                    }
                    _ => counts,
                });
            }
            younger = Some((age, counts));
        }
        younger.map(|(_, counts)| counts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_base_of_a_window_is_the_newest_copy_that_old_and_copies_are_a_second_apart() {
        let mut history = CountsHistory::new(secs(65.0), secs(0.1));
        assert_eq!(history.base(secs(0.0), AVERAGE), None);
        // Polls every 100 ms for two minutes, the count rising by one a poll.
        for poll in 0..=1200u32 {
            history.record(Duration::from_millis(u64::from(poll) * 100), poll);
        }
        // One copy a second, and no more than the window needs.
        assert!(history.samples.len() <= 67, "{}", history.samples.len());
        assert_eq!(history.base(secs(120.0), AVERAGE), Some(&600));
        assert_eq!(history.base(secs(120.0), RECENT), Some(&1100));
        // Younger than the window: the oldest copy kept.
        let mut young = CountsHistory::new(secs(65.0), secs(0.5));
        young.record(secs(0.0), 7);
        young.record(secs(0.5), 8);
        young.record(secs(1.0), 9);
        assert_eq!(young.base(secs(30.0), AVERAGE), Some(&7));
        assert_eq!(young.samples.len(), 2);
        // Polls a millisecond early each: every one is kept, so the minute's base is the
        // poll 60 back (59.94 s old at 0.999 × 120 s, where the one before is 60.94 s old).
        let mut early = CountsHistory::new(secs(65.0), secs(0.999));
        for poll in 0..=120u32 {
            early.record(Duration::from_millis(u64::from(poll) * 999), poll);
        }
        assert_eq!(
            early.base(Duration::from_millis(120 * 999), AVERAGE),
            Some(&60)
        );
    }

    /// Polls a minute apart, a millisecond early or late: the last minute is always the last
    /// poll's, never two.
    #[test]
    fn polls_a_window_apart_give_one_window_early_or_late() {
        for (gap_ms, label) in [(59_999, "early"), (60_001, "late")] {
            let mut history =
                CountsHistory::new(AVERAGE + secs(5.0), Duration::from_millis(gap_ms));
            for poll in 0..=3u64 {
                history.record(Duration::from_millis(poll * gap_ms), poll);
            }
            assert_eq!(
                history.base(Duration::from_millis(3 * gap_ms), AVERAGE),
                Some(&2),
                "{label}"
            );
        }
    }

    #[test]
    fn after_a_stall_the_window_starts_after_it() {
        let mut history = CountsHistory::new(secs(65.0), secs(1.0));
        // A count a second for two minutes, then five minutes without a poll.
        for second in 0..=120u32 {
            history.record(secs(f64::from(second)), second);
        }
        let resumed = 420.0;
        history.record(secs(resumed), 1_000);
        // The stall's counts are no part of the last minute: at first it is empty.
        assert_eq!(history.base(secs(resumed), AVERAGE), Some(&1_000));
        for second in 1..=30u32 {
            history.record(secs(resumed + f64::from(second)), 1_000 + second);
        }
        assert_eq!(history.base(secs(resumed + 30.0), AVERAGE), Some(&1_000));
        // A minute after, the window is a minute again.
        for second in 31..=70u32 {
            history.record(secs(resumed + f64::from(second)), 1_000 + second);
        }
        assert_eq!(history.base(secs(resumed + 70.0), AVERAGE), Some(&1_010));
        // A copy up to twice the window old still serves (slow polls).
        let mut slow = CountsHistory::new(secs(130.0), secs(110.0));
        slow.record(secs(0.0), 1);
        slow.record(secs(110.0), 2);
        assert_eq!(slow.base(secs(110.0), AVERAGE), Some(&1));
        // Polls a minute apart, one of them failed: the next minute's figures span two
        // minutes rather than none (until 2026-12-07, none), and after two failed, three,
        // early or late by milliseconds. After three failed, a stall: none, as above.
        let mut minutely = CountsHistory::new(secs(65.0), secs(60.0));
        minutely.record(secs(0.0), 1);
        minutely.record(secs(60.0), 2);
        minutely.record(secs(180.002), 4);
        assert_eq!(minutely.base(secs(180.002), AVERAGE), Some(&2));
        minutely.record(secs(360.0), 7);
        assert_eq!(minutely.base(secs(360.0), AVERAGE), Some(&4));
        minutely.record(secs(540.003), 10);
        assert_eq!(minutely.base(secs(540.003), AVERAGE), Some(&7));
        minutely.record(secs(780.0), 13);
        assert_eq!(minutely.base(secs(780.0), AVERAGE), Some(&13));
    }

    /// Polls a second apart that pause for more than twice the window: a stall, however
    /// short, and whatever pauses came before. Until 2026-12-07 a pause of up to three and a
    /// half minutes took the copy before it, so the first poll after spanned the pause (150 s
    /// after one of 150 s) and the next one a second.
    #[test]
    fn a_pause_of_fast_polls_past_twice_the_window_is_a_stall() {
        let polled_to_120 = || {
            let mut history = CountsHistory::new(secs(65.0), secs(1.0));
            for second in 0..=120u32 {
                history.record(secs(f64::from(second)), second);
            }
            history
        };
        for pause in [130.0, 150.0, 200.0, 210.0] {
            let mut history = polled_to_120();
            let resumed = 120.0 + pause;
            history.record(secs(resumed), 1_000);
            assert_eq!(
                history.base(secs(resumed), AVERAGE),
                Some(&1_000),
                "{pause}"
            );
            history.record(secs(resumed + 1.0), 1_001);
            assert_eq!(
                history.base(secs(resumed + 1.0), AVERAGE),
                Some(&1_000),
                "{pause}"
            );
        }
        // A pause of 40 s, then one of 150 s: the second is a stall all the same.
        let mut history = polled_to_120();
        history.record(secs(160.0), 500);
        history.record(secs(310.0), 1_000);
        assert_eq!(history.base(secs(310.0), AVERAGE), Some(&1_000));
        // A stall right after the first poll.
        let mut history = CountsHistory::new(secs(65.0), secs(1.0));
        history.record(secs(0.0), 1);
        history.record(secs(150.0), 1_000);
        assert_eq!(history.base(secs(150.0), AVERAGE), Some(&1_000));
        // Under twice the window: the copy nearest a minute old still serves.
        let mut history = polled_to_120();
        history.record(secs(200.0), 1_000);
        assert_eq!(history.base(secs(200.0), AVERAGE), Some(&120));
    }

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn windows_with_exact_timing() {
        let mut history = CounterHistory::new(secs(70.0));
        // 100 per second for a minute, then 400 in the last second.
        for second in 0..=60u64 {
            history.record(Duration::from_secs(second), second * 100);
        }
        history.record(Duration::from_secs(61), 6000 + 400);
        let rates = history.rates();
        assert!(close(rates.instant, 400.0), "{rates:?}");
        assert!(close(rates.recent, (900.0 + 400.0) / 10.0), "{rates:?}");
        assert!(close(rates.average, (5900.0 + 400.0) / 60.0), "{rates:?}");
    }

    #[test]
    fn jittered_polls_divide_by_real_elapsed_time() {
        let mut history = CounterHistory::new(secs(70.0));
        history.record(secs(0.0), 0);
        history.record(secs(1.02), 102);
        history.record(secs(2.01), 300);
        // Newest at 2.01: the sample nearest a second before is the one 0.99 s old.
        assert!(close(history.rate(INSTANT), 198.0 / 0.99));
        assert!(close(history.history(5)[1], 198.0 / 0.99));
        assert!(close(history.rate(RECENT), 300.0 / 2.01));
    }

    #[test]
    fn the_instant_rate_covers_one_poll_when_the_last_is_a_little_under_a_second_old() {
        let mut history = CounterHistory::new(secs(70.0));
        // A steady 2,000 a second, then nothing; each poll a millisecond short of a second
        // after the one before.
        let mut at = 0.0;
        for value in [0, 2000, 4000, 6000, 6000] {
            history.record(secs(at), value);
            at += 0.999;
        }
        assert!(
            close(history.rate(INSTANT), 0.0),
            "{}",
            history.rate(INSTANT)
        );
        // Polls 100 ms apart: the window is ten of them.
        let mut fast = CounterHistory::new(secs(70.0));
        for poll in 0..=20u64 {
            fast.record(Duration::from_millis(poll * 100), poll * 10);
        }
        assert!(close(fast.rate(INSTANT), 100.0));
    }

    #[test]
    fn short_histories_use_what_they_have() {
        let mut history = CounterHistory::new(secs(70.0));
        assert!(close(history.rate(INSTANT), 0.0));
        history.record(secs(0.0), 10);
        assert!(close(history.rate(INSTANT), 0.0));
        history.record(secs(0.5), 60);
        assert!(close(history.rate(RECENT), 100.0));
    }

    #[test]
    fn a_counter_reset_restarts_the_history() {
        let mut history = CounterHistory::new(secs(70.0));
        history.record(secs(0.0), 1000);
        history.record(secs(1.0), 2000);
        history.record(secs(2.0), 5);
        assert!(close(history.rate(INSTANT), 0.0));
        history.record(secs(3.0), 105);
        assert!(close(history.rate(INSTANT), 100.0));
        assert_eq!(history.history(10).len(), 1);
    }

    /// The bisection picks the sample a scan of all of them would: the one whose age is
    /// nearest the window, the older of two as near; over irregular polls, ties included.
    #[test]
    fn the_base_is_the_sample_a_full_scan_finds() {
        let mut history = CounterHistory::new(secs(65.0));
        let mut seed = 0x9e37_79b9_u64;
        let mut at_ms = 0u64;
        for value in 0..2_000u64 {
            seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            // 1 ms to 1.75 s between polls (never two at one instant), on whole 250 ms steps
            // now and then, so that ages tie.
            let gap = seed >> 33;
            at_ms += if gap.is_multiple_of(3) {
                (gap % 7 + 1) * 250
            } else {
                1 + gap % 1_500
            };
            history.record(Duration::from_millis(at_ms), value * 3);
            let newest = *history.samples.back().unwrap();
            for window_ms in [0, 250, 500, 1_000, 1_250, 10_000, 60_000, 90_000] {
                let window = Duration::from_millis(window_ms);
                let scanned = history
                    .samples
                    .iter()
                    .take(history.samples.len() - 1)
                    .min_by_key(|&&(at, _)| newest.0.saturating_sub(at).abs_diff(window))
                    .map_or(0.0, |&base| per_second(base, newest));
                assert!(
                    close(history.rate(window), scanned),
                    "{window_ms} ms at {at_ms} ms"
                );
            }
        }
    }

    #[test]
    fn memory_stays_bounded() {
        let mut history = CounterHistory::new(secs(65.0));
        for tick in 0..10_000u64 {
            history.record(Duration::from_millis(tick * 100), tick);
        }
        assert!(history.samples.len() <= 652, "{}", history.samples.len());
        assert!(close(history.rate(AVERAGE), 10.0));
        assert_eq!(history.history(60).len(), 60);
    }
}

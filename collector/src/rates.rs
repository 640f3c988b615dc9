// TEMPORARY STAND-IN until the helper's rates.rs lands.
use std::{collections::VecDeque, time::Duration};
pub const INSTANT: Duration = Duration::from_secs(1);
pub const RECENT: Duration = Duration::from_secs(10);
pub const AVERAGE: Duration = Duration::from_mins(1);
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Rates {
    pub instant: f64,
    pub recent: f64,
    pub average: f64,
}
pub struct CounterHistory {
    samples: VecDeque<(Duration, u64)>,
    max_age: Duration,
}
impl CounterHistory {
    pub fn new(max_age: Duration) -> Self {
        Self {
            samples: VecDeque::new(),
            max_age,
        }
    }
    pub fn record(&mut self, at: Duration, value: u64) {
        if self.samples.back().is_some_and(|&(_, v)| value < v) {
            self.samples.clear();
        }
        self.samples.push_back((at, value));
        while self.samples.len() > 2 && at.checked_sub(self.samples[1].0).unwrap() > self.max_age {
            self.samples.pop_front();
        }
    }
    pub fn rate(&self, window: Duration) -> f64 {
        let Some(&(t1, v1)) = self.samples.back() else {
            return 0.0;
        };
        let base = self
            .samples
            .iter()
            .rev()
            .find(|(t, _)| t1.saturating_sub(*t) >= window)
            .or(self.samples.front())
            .copied()
            .unwrap();
        let dt = t1.checked_sub(base.0).unwrap().as_secs_f64();
        if dt == 0.0 {
            0.0
        } else {
            (v1 - base.1) as f64 / dt
        }
    }
    pub fn rates(&self) -> Rates {
        Rates {
            instant: self.rate(INSTANT),
            recent: self.rate(RECENT),
            average: self.rate(AVERAGE),
        }
    }
    pub fn history(&self, n: usize) -> Vec<f64> {
        let v: Vec<f64> = self
            .samples
            .iter()
            .zip(self.samples.iter().skip(1))
            .map(|(a, b)| {
                (b.1 - a.1) as f64 / b.0.checked_sub(a.0).unwrap().as_secs_f64().max(1e-9)
            })
            .collect();
        v[v.len().saturating_sub(n)..].to_vec()
    }
}

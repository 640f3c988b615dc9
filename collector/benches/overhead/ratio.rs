//! What the pairs of one mode say about its with/without ratio: the median, a confidence
//! interval for it, and whether that settles a target. On this VM single pairs swing by 5 to
//! 15 %, so a median a point or two short of a target may be noise; the interval says when.

/// The interval's bounds are shown to four decimals (1/10,000ths).
const BOUND_SCALE: f64 = 10_000.0;

/// The median ratio of a mode's pairs, with the interval it lies in at 95 % confidence.
pub struct RatioSummary {
    median: f64,
    /// None with fewer than six pairs, too few for any interval at 95 %.
    interval: Option<(f64, f64)>,
}

impl RatioSummary {
    pub fn of(ratios: &[f64]) -> Self {
        let mut sorted = ratios.to_vec();
        sorted.sort_by(f64::total_cmp);
        Self {
            median: median(&mut sorted),
            // Widened to the digits shown, so that the verdict is the one the printed bounds
            // give: a bound of 0.97999 printed as 0.980 was "not settled" for a target of 0.98.
            interval: median_interval(&sorted).map(|(low, high)| {
                (
                    (low * BOUND_SCALE).floor() / BOUND_SCALE,
                    (high * BOUND_SCALE).ceil() / BOUND_SCALE,
                )
            }),
        }
    }

    /// "0.975 (95 % interval 0.951–1.001)", and with a target "…; target ≥ 0.98: met", or
    /// "missed", or "not settled by this run" when the interval spans it. With 21 pairs the
    /// interval runs from the 6th to the 16th ratio, which is also the middle half of them.
    pub fn describe(&self, target: Option<f64>) -> String {
        let interval = self.interval.map_or_else(
            || String::from("too few pairs for a 95 % interval"),
            |(low, high)| format!("95 % interval {low:.4}–{high:.4}"),
        );
        let verdict = target.map_or_else(String::new, |target| {
            format!("; target ≥ {target}: {}", self.settles(target))
        });
        format!("{:.3} ({interval}{verdict})", self.median)
    }

    /// Met when the interval lies at or above `target`, missed when it lies below.
    fn settles(&self, target: f64) -> &'static str {
        match self.interval {
            Some((low, _)) if low >= target => "met",
            Some((_, high)) if high < target => "missed",
            _ => "not settled by this run",
        }
    }
}

/// The median of `values` (sorted in place); the mean of the middle two for an even count.
pub fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len().is_multiple_of(2) {
        f64::midpoint(values[mid - 1], values[mid])
    } else {
        values[mid]
    }
}

/// The distribution-free 95 % confidence interval of the median of `sorted`: the median lies
/// between the l-th smallest and the l-th largest value unless fewer than l values fall on
/// one side of it, which for the largest l with P(Binomial(n, 1/2) < l) ≤ 2.5 % happens with
/// at most 5 % probability, whatever the pairs' distribution. (Beyond about a thousand pairs
/// 2^-n would underflow; the bench runs tens.)
fn median_interval(sorted: &[f64]) -> Option<(f64, f64)> {
    let n = sorted.len();
    let exponent = i32::try_from(n).ok()?;
    // P(X = k) and P(X < l) for X ~ Binomial(n, 1/2), k = l as l grows.
    let mut point = 0.5f64.powi(exponent);
    let mut below = 0.0;
    let mut l = 0;
    while l < n / 2 && below + point <= 0.025 {
        below += point;
        #[expect(clippy::cast_precision_loss, reason = "pair counts far below 2^52")]
        let next = point * (n - l) as f64 / (l + 1) as f64;
        point = next;
        l += 1;
    }
    (l > 0).then(|| (sorted[l - 1], sorted[n - l]))
}

//! The benchmark's statistics (`benches/overhead/ratio.rs`), tested with the suite: `cargo
//! test` builds no bench target, and a wrong interval would settle targets the pairs do not.

#[path = "../benches/overhead/ratio.rs"]
mod ratio;

use ratio::{RatioSummary, median};

/// 1.0, 2.0, ... n.0, out of order: the l-th smallest is l.
fn pairs(n: u32) -> Vec<f64> {
    let mut values: Vec<f64> = (1..=n).map(f64::from).collect();
    values.reverse();
    let mid = values.len() / 2;
    values.swap(0, mid);
    values
}

#[test]
fn the_interval_runs_between_the_order_statistics_of_95_percent() {
    let describe = |n| RatioSummary::of(&pairs(n)).describe(None);
    assert_eq!(describe(5), "3.000 (too few pairs for a 95 % interval)");
    // n = 6: P(X < 1) = 1/64 ≤ 2.5 %, P(X < 2) = 7/64 is not: the extremes.
    assert_eq!(describe(6), "3.500 (95 % interval 1.0000–6.0000)");
    // n = 9: P(X < 2) = 10/512 ≤ 2.5 %, P(X < 3) = 46/512 is not.
    assert_eq!(describe(9), "5.000 (95 % interval 2.0000–8.0000)");
    // n = 21: P(X < 6) = 1.3 %, P(X < 7) = 3.9 %: the 6th to the 16th.
    assert_eq!(describe(21), "11.000 (95 % interval 6.0000–16.0000)");
    assert_eq!(median(&mut pairs(6)).to_string(), "3.5");
}

#[test]
fn a_target_is_settled_only_by_the_whole_interval() {
    // Ratios whose interval (the 6th to the 16th of 21) is `low` to `high`.
    let verdict = |low: f64, high: f64| {
        let mut ratios = vec![f64::midpoint(low, high); 21];
        ratios[..6].fill(low);
        ratios[15..].fill(high);
        let text = RatioSummary::of(&ratios).describe(Some(0.98));
        text[text.rfind(": ").unwrap() + 2..text.len() - 1].to_owned()
    };
    assert_eq!(verdict(0.98, 1.01), "met");
    assert_eq!(verdict(0.95, 0.979), "missed");
    assert_eq!(verdict(0.97, 0.99), "not settled by this run");
    // Widened to the digits printed: 0.97999 is shown as 0.9799, below the target.
    assert_eq!(verdict(0.979_99, 1.0), "not settled by this run");
}

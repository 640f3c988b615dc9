//! Reading `cargo test`'s output as it is echoed: the totals, and each failing test's
//! output (its last lines, with the panic), said again at the end. A CI log is often read
//! from its end (the tail is all some CI pages keep), where the failures of a binary that
//! ran early are long gone.

use std::collections::VecDeque;

/// Lines kept of one failing test's captured output: its last ones, where the panic is.
const LINES_PER_FAILURE: usize = 40;

#[derive(Default)]
pub struct TestOutput {
    pub passed: u64,
    pub failed: u64,
    /// Where in the binary's closing sections the line is.
    section: Section,
    /// Each failing test: its name, its output's last lines and how many came before them.
    /// (cargo names the binaries on its standard error, which is not read here: its closing
    /// lines there name the failed ones.)
    failures: Vec<Failure>,
    /// The failure whose captured output the lines are, if any.
    current: Option<usize>,
    /// The running binary's first failure: its list of names names those from there on.
    binary_first: usize,
}

/// libtest closes a binary with failures with two sections headed "failures:": the failing
/// tests' captured output, then their names.
#[derive(Default, PartialEq)]
enum Section {
    #[default]
    Tests,
    FailureOutput,
    FailureNames,
}

struct Failure {
    test: String,
    lines: VecDeque<String>,
    elided: usize,
}

impl Failure {
    fn new(test: &str) -> Self {
        Self {
            test: test.to_owned(),
            lines: VecDeque::new(),
            elided: 0,
        }
    }
}

impl TestOutput {
    /// Takes in one line of the output.
    pub fn line(&mut self, line: &str) {
        if let Some(result) = line.strip_prefix("test result: ") {
            self.passed += count_before(result, " passed");
            self.failed += count_before(result, " failed");
            self.section = Section::Tests;
            self.current = None;
            self.binary_first = self.failures.len();
        } else if line == "failures:" {
            self.section = match self.section {
                Section::Tests => Section::FailureOutput,
                _ => Section::FailureNames,
            };
            self.current = None;
        } else if self.section == Section::FailureOutput {
            if let Some(test) = line
                .strip_prefix("---- ")
                .and_then(|rest| rest.strip_suffix(" stdout ----"))
            {
                self.failures.push(Failure::new(test));
                self.current = Some(self.failures.len() - 1);
            } else if let Some(failure) = self.current.map(|at| &mut self.failures[at]) {
                failure.lines.push_back(line.to_owned());
                if failure.lines.len() > LINES_PER_FAILURE {
                    failure.lines.pop_front();
                    failure.elided += 1;
                }
            }
        } else if self.section == Section::FailureNames
            && let Some(test) = line.strip_prefix("    ")
            // A test without captured output (`--nocapture`, or one that printed nothing
            // before it failed) is named only here.
            && !self.failures[self.binary_first..]
                .iter()
                .any(|failure| failure.test == test)
        {
            self.failures.push(Failure::new(test));
        }
    }
}

/// The failures again, with the totals: the closing lines of the run.
impl std::fmt::Display for TestOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for failure in &self.failures {
            writeln!(f, "---- failed: {} ----", failure.test)?;
            if failure.elided > 0 {
                writeln!(
                    f,
                    "({} earlier lines of its output above, in its binary's failures)",
                    failure.elided
                )?;
            }
            let shown = failure.lines.iter().rposition(|line| !line.is_empty());
            if shown.is_none() {
                writeln!(f, "(no output captured: any is above, where it ran)")?;
            }
            for line in failure.lines.iter().take(shown.map_or(0, |last| last + 1)) {
                writeln!(f, "{line}")?;
            }
        }
        write!(f, "{} passed, {} failed", self.passed, self.failed)
    }
}

/// The number just before `label` in a `test result:` line ("ok. 35 passed; 0 failed; ...").
fn count_before(result: &str, label: &str) -> u64 {
    result
        .split(';')
        .find_map(|part| {
            part.trim()
                .trim_start_matches("ok. ")
                .trim_start_matches("FAILED. ")
                .strip_suffix(label)?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// libtest's lines for three binaries: the first with a failure, the third with one
    /// whose output was not captured (`--nocapture`).
    #[test]
    fn a_failure_is_said_again_at_the_end_with_its_panic() {
        let mut output = TestOutput::default();
        let mut lines = vec![
            "test a ... ok",
            "test b ... FAILED",
            "",
            "failures:",
            "",
            "---- b stdout ----",
        ];
        let many: Vec<String> = (0..LINES_PER_FAILURE + 5)
            .map(|n| format!("log {n}"))
            .collect();
        lines.extend(many.iter().map(String::as_str));
        lines.extend([
            "thread 'b' panicked at tests/dns_parser.rs:9:5:",
            "assertion `left == right` failed",
            "",
            "",
            "failures:",
            "    b",
            "",
            "test result: FAILED. 1 passed; 1 failed; 0 ignored",
            "test c ... ok",
            "test result: ok. 2 passed; 0 failed; 0 ignored",
            "test d ... FAILED",
            "",
            "failures:",
            "",
            "failures:",
            "    d",
            "",
            "test result: FAILED. 0 passed; 1 failed; 0 ignored",
        ]);
        for line in lines {
            output.line(line);
        }
        let summary = output.to_string();
        assert!(
            summary.starts_with(
                "---- failed: b ----\n(9 earlier lines of its output above, in its binary's failures)\nlog 9\n"
            ),
            "{summary}"
        );
        assert!(
            summary.ends_with(
                "log 44\nthread 'b' panicked at tests/dns_parser.rs:9:5:\nassertion `left == right` failed\n---- failed: d ----\n(no output captured: any is above, where it ran)\n3 passed, 2 failed"
            ),
            "{summary}"
        );
    }

    #[test]
    fn without_failures_the_summary_is_the_totals() {
        let mut output = TestOutput::default();
        output.line("test result: ok. 35 passed; 0 failed; 2 ignored");
        assert_eq!(output.to_string(), "35 passed, 0 failed");
    }
}

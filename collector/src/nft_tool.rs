//! Runs the `nft` tool, which makes and removes our table, within a deadline
//! (`[nftables] nft_timeout_ms`, 10 s by default: applying our table takes milliseconds, a
//! few seconds where `nft` must first read a ruleset of hundreds of thousands of rules). A
//! stuck `nft` (waiting on the kernel's nftables lock, say) would otherwise hold the start, a
//! poll that makes the table again, or `cleanup`, for good. What `nft` writes to its
//! standard error goes into the error: the `nftables` crate's helper, which has no deadline
//! either, lets it through to the agent's own, apart from the failure it explains. The
//! crate's error type is kept.

use std::{
    ffi::OsString,
    io::{Read as _, Write as _},
    os::unix::process::{CommandExt as _, ExitStatusExt as _},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicUsize, Ordering},
    thread,
    time::{Duration, Instant},
};

use nftables::helper::NftablesError;

const PROGRAM: &str = "nft";

/// How often a running `nft` is looked at: it takes about 10 ms to apply our table.
const LOOK_EVERY: Duration = Duration::from_millis(2);

/// `nft` processes killed at their deadline that have not exited yet: stuck in the kernel,
/// where a kill takes effect only when they leave it. No other is started meanwhile, so that
/// tries do not pile up stuck processes (and their threads).
static STILL_EXITING: AtomicUsize = AtomicUsize::new(0);

/// Why `nft` did not apply a ruleset.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    /// It could not be run, or ran and failed.
    #[error("{}", failure(.0))]
    Run(#[from] NftablesError),
    /// It ran past its deadline and was killed.
    #[error(
        "nft did not finish within {0:?} and was killed (stuck on the kernel's nftables lock?); a table it was still making is removed at the next try or at the stop"
    )]
    TimedOut(Duration),
    /// Something else killed it (the OOM killer, a kill of every process of the agent's
    /// container or service) before it said whether it applied the ruleset: the kernel
    /// applies a batch whole before `nft` reads the answer, so it may have.
    #[error(
        "nft was killed by signal {0} before it said whether it applied its ruleset (it may have)"
    )]
    Killed(i32),
    /// One killed earlier is still in the kernel.
    #[error(
        "an nft killed at its deadline has not exited yet (stuck in the kernel): no other is started until it has"
    )]
    StillExiting,
}

/// What went wrong, in nft's own words where it ran and failed: a refused rule, a missing
/// kernel module or a missing permission is named there.
fn failure(err: &NftablesError) -> String {
    match err {
        NftablesError::NftFailed {
            program,
            hint,
            stderr,
            ..
        } if !stderr.trim().is_empty() => {
            format!(
                "{} failed while {hint}: {}",
                program.display(),
                stderr.trim()
            )
        }
        NftablesError::NftExecution { inner, .. }
            if inner.kind() == std::io::ErrorKind::NotFound =>
        {
            format!("{err}; is nft installed (apt install nftables)?")
        }
        _ => format!("the nft tool failed: {err}"),
    }
}

/// `nft -V`: its version (the first line) and whether it was built with JSON; `--version`
/// (no JSON line) from an `nft` without `-V`.
pub fn describe() -> (Option<String>, Option<bool>) {
    let run = |argument| {
        Command::new(PROGRAM)
            .arg(argument)
            .output()
            .ok()
            .filter(|out| out.status.success())
            .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let Some(long) = run("-V") else {
        return (run("--version").map(|out| out.trim().to_owned()), None);
    };
    let version = long.lines().next().map(|line| line.trim().to_owned());
    let json = long.lines().find_map(|line| {
        let value = line.trim().strip_prefix("json:")?.trim();
        Some(value == "yes")
    });
    (version, json)
}

/// Why an `nft` older than 1.0.6 cannot make our table, after its version, for `check`:
/// nft reads a counter's comment from JSON since 1.0.6 ("json: add stateful object comment
/// support"), and without it every read would find our table "made by an earlier build".
pub const TOO_OLD: &str = "is older than 1.0.6, the first whose JSON input keeps a counter's \
    comment, which tells the collector's table from an earlier build's (the agent removes a \
    table made without them and makes no other)";

/// Whether `version`, `nft -V`'s first line (`nftables v1.0.5 (Lester Gooch #5)`), is older
/// than 1.0.6 ([`TOO_OLD`]). One it cannot read is not taken for older.
pub fn older_than_comments(version: &str) -> bool {
    let Some(number) = version
        .split_whitespace()
        .find_map(|word| word.strip_prefix('v'))
    else {
        return false;
    };
    let mut parts = number.split('.').map(str::parse::<u32>);
    let (Some(Ok(major)), Some(Ok(minor))) = (parts.next(), parts.next()) else {
        return false;
    };
    let patch = parts.next().and_then(Result::ok).unwrap_or(0);
    (major, minor, patch) < (1, 0, 6)
}

/// Applies `ruleset` (nft's JSON) with `nft -j -f -`, killing `nft` if it takes longer than
/// `deadline`.
pub fn apply(ruleset: String, deadline: Duration) -> Result<(), ToolError> {
    if STILL_EXITING.load(Ordering::Relaxed) > 0 {
        return Err(ToolError::StillExiting);
    }
    let program = OsString::from(PROGRAM);
    let execution = |inner| NftablesError::NftExecution {
        program: program.clone(),
        inner,
    };
    let mut child = Command::new(&program)
        .args(["-j", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        // Its own process group: a Ctrl-C in the agent's terminal is the agent's to handle
        // (a clean stop), not a kill of the `nft` making or removing its table.
        .process_group(0)
        .spawn()
        .map_err(execution)?;
    let (Some(mut stdin), Some(mut stderr)) = (child.stdin.take(), child.stderr.take()) else {
        abandon(child);
        return Err(execution(std::io::Error::other("no pipes to nft")).into());
    };
    // Another thread feeds the ruleset and gathers what nft says, so that this one keeps the
    // deadline whatever nft does with its pipes.
    let io = thread::spawn(move || {
        let fed = stdin.write_all(ruleset.as_bytes());
        drop(stdin);
        let mut said = Vec::new();
        let _ = stderr.read_to_end(&mut said);
        (fed, said)
    });
    let began = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if began.elapsed() < deadline => thread::sleep(LOOK_EVERY),
            Ok(None) => {
                abandon(child);
                return Err(ToolError::TimedOut(deadline));
            }
            Err(err) => {
                abandon(child);
                return Err(execution(err).into());
            }
        }
    };
    let (fed, said) = io
        .join()
        .map_err(|_| execution(std::io::Error::other("feeding nft failed")))?;
    let said = String::from_utf8_lossy(&said).into_owned();
    if let Some(signal) = status.signal() {
        return Err(ToolError::Killed(signal));
    }
    if !status.success() {
        return Err(NftablesError::NftFailed {
            program,
            hint: "applying ruleset".to_owned(),
            stdout: String::new(),
            stderr: said,
        }
        .into());
    }
    if !said.trim().is_empty() {
        tracing::warn!("nft applied our ruleset and said: {}", said.trim());
    }
    fed.map_err(execution)?;
    Ok(())
}

/// Waits up to `limit` for the `nft` processes killed at their deadline to exit; false if
/// one has not. A stop waits so: a killed `nft` waiting on the kernel's lock may still commit
/// our table once it has it, and the stop must find that table to remove it.
pub fn wait_for_killed(limit: Duration) -> bool {
    let began = Instant::now();
    while STILL_EXITING.load(Ordering::Relaxed) > 0 {
        if began.elapsed() >= limit {
            return false;
        }
        thread::sleep(LOOK_EVERY);
    }
    true
}

/// Kills `nft` and reaps it on a thread of its own: a process stuck in the kernel dies only
/// when it leaves it, and must not hold the agent until then.
fn abandon(mut child: Child) {
    let _ = child.kill();
    STILL_EXITING.fetch_add(1, Ordering::Relaxed);
    thread::spawn(move || {
        let _ = child.wait();
        STILL_EXITING.fetch_sub(1, Ordering::Relaxed);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_of_nft_says_what_nft_said() {
        let failed = ToolError::from(NftablesError::NftFailed {
            program: "nft".into(),
            hint: "applying ruleset".into(),
            stdout: String::new(),
            stderr: "Error: Could not process rule: Operation not permitted\n".into(),
        });
        assert_eq!(
            failed.to_string(),
            "nft failed while applying ruleset: Error: Could not process rule: Operation not \
             permitted"
        );
        let missing = ToolError::from(NftablesError::NftExecution {
            program: "nft".into(),
            inner: std::io::Error::from(std::io::ErrorKind::NotFound),
        });
        assert!(
            missing
                .to_string()
                .ends_with("is nft installed (apt install nftables)?"),
            "{missing}"
        );
    }

    /// Ubuntu 22.04's nft (1.0.2) and RHEL 9.0's (1.0.4) drop a counter's comment from JSON.
    #[test]
    fn versions_before_1_0_6_are_too_old() {
        for (first_line, older) in [
            ("nftables v1.0.5 (Lester Gooch #5)", true),
            ("nftables v1.0.2 (Lester Gooch)", true),
            ("nftables v0.9.8 (E.D.S.)", true),
            ("nftables v1.0.6 (Lester Gooch #5)", false),
            ("nftables v1.0.9 (Old Doc Yak #3)", false),
            ("nftables v1.1.1 (Commodore Bullmoose #2)", false),
            ("nftables v2", false),
            ("nftables", false),
        ] {
            assert_eq!(older_than_comments(first_line), older, "{first_line}");
        }
    }
}

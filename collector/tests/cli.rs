//! The command line on its own, without an agent.

mod support;

use std::process::{Command, Output, Stdio};

use support::{COLLECTOR, ScratchDir};

/// `collector args` with standard output a pipe whose reader is gone, as under `| head` once
/// head has read its lines.
fn with_stdout_closed(args: &[&str]) -> Output {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    Command::new(COLLECTOR)
        .args(args)
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .unwrap()
}

#[test]
fn a_reader_gone_ends_a_command_quietly() {
    let absent = std::env::temp_dir().join(format!("collector-cli-{}", std::process::id()));
    let out = with_stdout_closed(&["cleanup", "--pin-dir", absent.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{}: {stderr}", out.status);
    assert!(stderr.is_empty(), "{stderr}");
}

/// `collector check` with `[nftables] enabled = ENABLED` on a host without the nft tool.
fn check_without_nft(enabled: &str) -> (bool, String) {
    support::require_root();
    let dir = ScratchDir::new("check");
    let config = dir.path("collector.toml");
    std::fs::write(&config, format!("[nftables]\nenabled = {enabled}\n")).unwrap();
    let out = Command::new(COLLECTOR)
        .args(["check", "--config", config.to_str().unwrap()])
        // An empty directory as the PATH: no nft to run.
        .env("PATH", &dir.0)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let nft_line = stdout
        .lines()
        .find(|line| line.split_whitespace().nth(1) == Some("nft"))
        .unwrap_or_else(|| panic!("no nft line in\n{stdout}"));
    (out.status.success(), nft_line.to_owned())
}

#[test]
fn check_needs_the_nft_tool_only_where_nftables_may_count() {
    let (passed, line) = check_without_nft("false");
    assert!(passed && line.starts_with("skip"), "{line}");
    let (passed, line) = check_without_nft("\"auto\"");
    assert!(passed && line.starts_with("warn"), "{line}");
    let (passed, line) = check_without_nft("true");
    assert!(!passed && line.starts_with("FAIL"), "{line}");
}

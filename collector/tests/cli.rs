//! The command line on its own, without an agent.

mod support;

use std::process::{Command, Output, Stdio};

use support::COLLECTOR;

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

//! The command line on its own, without an agent.

mod support;

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
};

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
    // cleanup asks nftables about the table, which takes CAP_NET_ADMIN.
    support::require_root();
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
fn check_warns_of_a_config_without_routes() {
    support::require_root();
    let dir = ScratchDir::new("check-routes");
    let config = dir.path("collector.toml");
    std::fs::write(&config, "[nftables]\nenabled = false\n").unwrap();
    let out = Command::new(COLLECTOR)
        .args(["check", "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find(|line| line.split_whitespace().nth(1) == Some("routes"))
        .unwrap_or_else(|| panic!("no routes line in\n{stdout}"));
    assert!(
        line.starts_with("warn") && line.contains("only DNS is counted"),
        "{line}"
    );
    // A warning, not a failure: the agent runs.
    assert!(out.status.success(), "{stdout}");
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

/// A pin directory of the test's own in bpffs, with the map directory and nothing pinned;
/// removed on drop.
struct PinDir(PathBuf);

impl PinDir {
    fn new() -> Self {
        support::require_root();
        let bpffs = Path::new("/sys/fs/bpf");
        let mode = fs::metadata(bpffs).unwrap().permissions().mode();
        assert_eq!(
            mode & 0o777,
            0o700,
            "bpffs at {} is mode {mode:o}: this test needs it 0700, as cargo xtask test and \
             systemd mount it",
            bpffs.display()
        );
        let dir = Self(bpffs.join(format!("collector-cli-{}", std::process::id())));
        fs::create_dir_all(dir.0.join("v1")).unwrap();
        dir
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// `collector args` as nobody; fails the test unless it is refused with the advice to run as
/// root.
fn assert_refused_without_root(args: &[&str]) {
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            COLLECTOR,
        ])
        .args(args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("permission denied: run as root"),
        "{args:?}: {}\nstdout: {}\nstderr: {stderr}",
        out.status,
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn without_root_the_pins_are_refused_not_reported_missing() {
    let dir = PinDir::new();
    let pin_dir = dir.0.to_str().unwrap();
    // bpffs hides its pins from anyone but root.
    assert_refused_without_root(&["cleanup", "--pin-dir", pin_dir]);
    assert_refused_without_root(&["maps", "list", "--pin-dir", pin_dir]);
    assert_refused_without_root(&["maps", "dump", "CONN_STATE", "--pin-dir", pin_dir]);
    // And nftables its tables: with no pin directory to look into, cleanup still cannot
    // tell that none of ours is left.
    let absent = std::env::temp_dir().join(format!("collector-cli-{}", std::process::id()));
    assert_refused_without_root(&["cleanup", "--pin-dir", absent.to_str().unwrap()]);
}

/// `collector events` through a proxy that ends the body with the connection (no chunked
/// coding), piped into a reader that takes one line and goes: status 0, nothing on stderr.
#[test]
fn an_unchunked_event_stream_ends_quietly_when_its_reader_goes() {
    use std::{
        io::{BufRead as _, BufReader, Read as _, Write as _},
        net::TcpListener,
    };
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut request = [0u8; 1024];
        let _ = stream.read(&mut request).unwrap();
        stream
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n\r\n")
            .unwrap();
        // Lines until the client has gone, as a live stream would send them.
        let line = b"{\"event\":\"query-received\"}\n";
        while stream.write_all(line).is_ok() {}
    });
    let mut child = Command::new(COLLECTOR)
        .args(["events", "--listen", &addr.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert_eq!(first, "{\"event\":\"query-received\"}\n");
    // The reader is gone (dropped with the BufReader): the next write finds the pipe closed.
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{}: {stderr}", out.status);
    assert!(stderr.is_empty(), "{stderr}");
    server.join().unwrap();
}

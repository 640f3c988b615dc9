//! The command line on its own, without an agent.

mod support;

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::Duration,
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

/// A failure with its standard error a pipe whose reader is gone too (`2>&1 | head`) exits 1,
/// its message lost: until 2026-12-05 the lost message panicked it into status 101.
#[test]
fn a_failure_with_its_reader_gone_still_exits_1() {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    // Nothing listens on port 1 of loopback: the command fails.
    let out = Command::new(COLLECTOR)
        .args(["stats", "dns", "--listen", "127.0.0.1:1"])
        .stdout(writer.try_clone().unwrap())
        .stderr(writer)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", out.status);
}

/// `collector check` with `[nftables] enabled = ENABLED` on a host without the nft tool.
fn check_without_nft(enabled: &str) -> (bool, String) {
    // An empty directory as the PATH: no nft to run.
    let empty = ScratchDir::new("check-path");
    let (passed, mut lines) = check_in(
        &format!("[nftables]\nenabled = {enabled}\n"),
        &[],
        |command| {
            command.env("PATH", &empty.0);
        },
    );
    (passed, lines.remove("nft").expect("an nft line"))
}

#[test]
fn check_warns_of_a_config_without_routes() {
    let (passed, lines) = check("[nftables]\nenabled = false\n", &[]);
    assert!(
        lines["routes"].starts_with("warn") && lines["routes"].contains("only DNS is counted"),
        "{lines:?}"
    );
    // A warning, not a failure: the agent runs.
    assert!(passed, "{lines:?}");
}

/// `collector check --config-only` on `config`, run as nobody: status, stdout and stderr.
fn check_config_as_nobody(config: &str) -> (bool, String, String) {
    check_config_as_nobody_with(config, &[])
}

/// As [`check_config_as_nobody`], with more arguments (`--listen ADDR`).
fn check_config_as_nobody_with(config: &str, more: &[&str]) -> (bool, String, String) {
    // Root is needed only to become nobody; the check itself must not need it.
    support::require_root();
    let dir = ScratchDir::new("check-config");
    fs::set_permissions(&dir.0, fs::Permissions::from_mode(0o755)).unwrap();
    let config_path = dir.path("collector.toml");
    fs::write(&config_path, config).unwrap();
    let mut args = vec![
        "check",
        "--config-only",
        "--config",
        config_path.to_str().unwrap(),
    ];
    args.extend_from_slice(more);
    let out = as_nobody(&args);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_config_only_judges_the_file_without_root() {
    let (passed, stdout, stderr) =
        check_config_as_nobody("[[routes]]\nname = \"web\"\nports = [8080]\n");
    assert!(passed, "{stdout}{stderr}");
    assert_eq!(stdout, "config valid\n");
    assert!(stderr.is_empty(), "{stderr}");
    // What a start would warn of is said, and the file still passes.
    let (passed, stdout, stderr) =
        check_config_as_nobody("[http]\nmax_connections_per_address = 8\n");
    assert!(passed, "{stdout}{stderr}");
    assert!(
        stderr.contains("warning: no [[routes]] configured"),
        "{stderr}"
    );
    assert!(
        stderr.contains("warning: [http] max_connections_per_address = 8"),
        "{stderr}"
    );
    // Served beyond loopback without credentials: warned of, as at start.
    let (passed, stdout, stderr) = check_config_as_nobody("listen = \"0.0.0.0:9464\"\n");
    assert!(passed, "{stdout}{stderr}");
    assert!(
        stderr.contains("warning: serving beyond loopback (0.0.0.0:9464) without credentials"),
        "{stderr}"
    );
    // What run refuses below the usual bpffs mount, whatever the host, is refused here.
    let (passed, stdout, stderr) = check_config_as_nobody("pin_dir = \"/sys/fs/bpf\"\n");
    assert!(!passed, "{stdout}{stderr}");
    assert!(stderr.contains("collector.toml:1:11: pin_dir"), "{stderr}");
    // The sidecar's arguments copied whole: `--pin-dir` is judged by its own rules.
    for (pin_dir, refusal) in [
        ("/sys/fs/bpf/collector-web", None),
        (
            "/sys/fs/bpf/../collector",
            Some("--pin-dir /sys/fs/bpf/../collector: has a `..`"),
        ),
        (
            "/sys/fs/bpf",
            Some("--pin-dir /sys/fs/bpf: is the bpffs mount itself"),
        ),
    ] {
        let (passed, stdout, stderr) = check_config_as_nobody_with(
            "[[routes]]\nname = \"web\"\nports = [8080]\n",
            &["--pin-dir", pin_dir],
        );
        match refusal {
            None => {
                assert!(passed, "{stdout}{stderr}");
                assert_eq!(stdout, "config valid\n");
            }
            Some(refusal) => {
                assert!(!passed, "{stdout}{stderr}");
                assert!(stderr.contains(refusal), "{stderr}");
            }
        }
    }
    // Without a file it would judge the embedded default: a pipeline that forgot the file
    // must not pass.
    let out = Command::new(COLLECTOR)
        .args(["check", "--config-only"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--config <CONFIG>"),
        "{out:?}"
    );
    // An invalid file fails with its line and reason.
    let (passed, stdout, stderr) =
        check_config_as_nobody("[[routes]]\nname = \"web\"\nports = [70000]\n");
    assert!(!passed, "{stdout}{stderr}");
    assert!(stdout.is_empty(), "{stdout}");
    assert!(
        stderr.contains("collector.toml:3:10: invalid value: integer `70000`, expected a port"),
        "{stderr}"
    );
    // A route on the default listen port, which `run` refuses, fails here too.
    let (passed, stdout, stderr) =
        check_config_as_nobody("[[routes]]\nname = \"metrics\"\nports = [9464]\n");
    assert!(!passed, "{stdout}{stderr}");
    assert!(
        stderr.contains(
            "the default listen address: 127.0.0.1:9464 has port 9464, a port of route \"metrics\""
        ) && stderr.contains("e.g. 9465"),
        "{stderr}"
    );
    // The address the pods are started with (`--listen`, as the DaemonSet passes its node's
    // address) is judged instead of the default: the same route refused there...
    let (passed, stdout, stderr) = check_config_as_nobody_with(
        "[[routes]]\nname = \"metrics\"\nports = [9100]\n",
        &["--listen", "192.0.2.7:9100"],
    );
    assert!(!passed, "{stdout}{stderr}");
    assert!(
        stderr.contains("--listen: 192.0.2.7:9100 has port 9100, a port of route \"metrics\""),
        "{stderr}"
    );
    // ...one on the default's port passes, and serving beyond loopback without
    // credentials is warned of, as the start would.
    let (passed, stdout, stderr) = check_config_as_nobody_with(
        "[[routes]]\nname = \"metrics\"\nports = [9464]\n",
        &["--listen", "192.0.2.7:9100"],
    );
    assert!(passed, "{stdout}{stderr}");
    assert!(
        stderr.contains("warning: serving beyond loopback (192.0.2.7:9100) without credentials"),
        "{stderr}"
    );
}

/// A route port in the namespace's ephemeral range can be an outgoing connection's source
/// port, whose traffic the classifiers would count as the route's: a warning with the fix,
/// which the fix clears.
#[test]
fn check_warns_of_route_ports_the_kernel_may_pick_as_source_ports() {
    support::require_root();
    let netns = support::Netns::new();
    let dir = ScratchDir::new("check-ephemeral");
    let config = dir.path("collector.toml");
    fs::write(
        &config,
        "[[routes]]\nname = \"grpc\"\nports = [50051, 8080]\n[nftables]\nenabled = false\n",
    )
    .unwrap();
    let routes_line = || {
        let out = netns
            .command(COLLECTOR)
            .args(["check", "--config", config.to_str().unwrap()])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find(|line| line.split_whitespace().nth(1) == Some("routes"))
            .expect("a routes line")
            .to_owned()
    };
    // Written from a thread in the namespace: /proc/sys/net is the writer's namespace's.
    let sysctl = |name: &'static str, value: &'static str| {
        netns.run(move || fs::write(format!("/proc/sys/net/ipv4/{name}"), value).unwrap());
    };
    sysctl("ip_local_port_range", "50000 50100");
    let line = routes_line();
    assert!(
        line.starts_with("warn")
            && line.contains("route port(s) 50051 lie in the ephemeral port range")
            && line.contains("(50000-50100)")
            && line.contains("ip_local_reserved_ports=50051"),
        "{line}"
    );
    sysctl("ip_local_reserved_ports", "50051");
    let line = routes_line();
    assert!(line.starts_with("pass"), "{line}");
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
        // One per test: tests run in parallel, and one's drop would remove another's.
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
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
        let call = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = Self(bpffs.join(format!("collector-cli-{}-{call}", std::process::id())));
        fs::create_dir_all(dir.0.join("v1")).unwrap();
        dir
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// `collector check` with `config` as the config file's text and `args`: whether it passed,
/// and its lines by name.
fn check(config: &str, args: &[&str]) -> (bool, std::collections::HashMap<String, String>) {
    check_in(config, args, |_| {})
}

/// [`check`], its command prepared by `prepare` (a PATH, limits).
fn check_in(
    config: &str,
    args: &[&str],
    prepare: impl FnOnce(&mut Command),
) -> (bool, std::collections::HashMap<String, String>) {
    support::require_root();
    let dir = ScratchDir::new("check");
    let config_path = dir.path("collector.toml");
    fs::write(&config_path, config).unwrap();
    let mut command = Command::new(COLLECTOR);
    command
        .args(["check", "--config", config_path.to_str().unwrap()])
        .args(args);
    prepare(&mut command);
    let out = command.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines = stdout
        .lines()
        .filter_map(|line| {
            let name = line.split_whitespace().nth(1)?;
            Some((name.to_owned(), line.to_owned()))
        })
        .collect();
    (out.status.success(), lines)
}

#[test]
fn check_tries_the_pin_directory_as_run_uses_it() {
    let dir = PinDir::new();
    let absent = dir.0.join("absent");
    let pin_dir = absent.to_str().unwrap();
    let (passed, lines) = check("[nftables]\nenabled = false\n", &["--pin-dir", pin_dir]);
    assert!(passed, "{lines:?}");
    assert!(lines["pin_dir"].starts_with("pass"), "{}", lines["pin_dir"]);
    // What it made to try, it removed; what was there, it left.
    assert!(!absent.exists());
    let (passed, _) = check(
        "[nftables]\nenabled = false\n",
        &["--pin-dir", dir.0.to_str().unwrap()],
    );
    assert!(passed);
    let left: Vec<_> = fs::read_dir(&dir.0)
        .unwrap()
        .map(|entry| entry.unwrap().file_name())
        .collect();
    assert_eq!(left, ["v1"]);

    // Not root, though with every capability it uses: bpffs (mode 0700) is root's alone, and
    // `run` would fail to make its pin directory.
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .args(["--inh-caps=+bpf,+perfmon,+net_admin,+sys_admin"])
        .args([
            "--ambient-caps=+bpf,+perfmon,+net_admin,+sys_admin",
            COLLECTOR,
        ])
        .args(["check", "--pin-dir", pin_dir])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{stdout}");
    let failed: Vec<&str> = stdout.lines().filter(|l| l.starts_with("FAIL")).collect();
    assert_eq!(failed.len(), 1, "{stdout}");
    assert!(
        failed[0].contains("pin_dir") && failed[0].contains("run as root"),
        "{stdout}"
    );
}

/// A pin directory a collector runs with is one `run` refuses: check warns of it, naming the
/// lock's holder, or, where /proc/locks does not show it (a PID namespace of its own, as a
/// container without the host's PIDs), saying it cannot see it.
#[test]
fn check_says_who_holds_the_pin_directory() {
    let dir = PinDir::new();
    let pin_dir = dir.0.to_str().unwrap();
    let config = "[nftables]\nenabled = false\n";
    let lock = fs::File::open(&dir.0).unwrap();
    // SAFETY: flock on a valid open fd, released when `lock` closes.
    let rc = unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) };
    assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
    let (passed, lines) = check(config, &["--pin-dir", pin_dir]);
    assert!(passed, "{lines:?}");
    assert!(
        lines["pin_dir"].starts_with("warn")
            && lines["pin_dir"].contains(&format!("is in use by process {}: ", std::process::id()))
            && lines["pin_dir"].contains("`run` refuses to start beside"),
        "{}",
        lines["pin_dir"]
    );
    let (_, lines) = check_in(config, &["--pin-dir", pin_dir], |command| {
        let program = command.get_program().to_owned();
        let args: Vec<_> = command.get_args().map(ToOwned::to_owned).collect();
        *command = Command::new("unshare");
        command
            .args(["--pid", "--fork", "--mount-proc"])
            .arg(program)
            .args(args);
    });
    assert!(
        lines["pin_dir"].starts_with("warn")
            && lines["pin_dir"].contains("is in use by a process this one cannot see"),
        "{}",
        lines["pin_dir"]
    );
    drop(lock);
    let (passed, lines) = check(config, &["--pin-dir", pin_dir]);
    assert!(passed && lines["pin_dir"].starts_with("pass"), "{lines:?}");
}

#[test]
fn checks_at_once_leave_nothing_of_their_probes() {
    // Several checks of one pin directory that is not there, as the parallel tests (or
    // initContainers on one node) run them: each makes it or finds it made by another.
    let dir = PinDir::new();
    let absent = dir.0.join("shared");
    let checks: Vec<_> = (0..32)
        .map(|_| {
            let absent = absent.clone();
            std::thread::spawn(move || {
                support::output_within(
                    Command::new(COLLECTOR).args(["check", "--pin-dir", absent.to_str().unwrap()]),
                    Duration::from_mins(1),
                )
            })
        })
        .collect();
    // Every check ended before any assertion, which would remove the directory under them.
    let outputs: Vec<_> = checks
        .into_iter()
        .map(std::thread::JoinHandle::join)
        .collect();
    for out in outputs {
        let out = out.unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout
                .lines()
                .any(|line| line.starts_with("pass") && line.contains("pin_dir")),
            "{stdout}"
        );
    }
    assert!(
        !absent.exists(),
        "{:?}",
        fs::read_dir(&absent).map(Iterator::count)
    );
}

/// A hard open-file limit too low for `max_connections` is warned of on the http line, as
/// `run` warns of it at start; the soft one is what `run` raises to it.
#[test]
fn check_warns_of_an_open_file_limit_too_low_for_the_connections() {
    let config = "[nftables]\nenabled = false\n[http]\nmax_connections = 5000\n";
    let limited =
        |hard: u64| move |command: &mut Command| support::limit_open_files(command, 256, hard);
    let (_, lines) = check_in(config, &[], limited(2048));
    assert!(
        lines["http"].starts_with("warn")
            && lines["http"]
                .contains("the open-file limit is 2048, fewer than [http] max_connections = 5000"),
        "{lines:?}"
    );
    let (_, lines) = check_in(config, &[], limited(8192));
    assert!(
        lines["http"].starts_with("skip") && !lines["http"].contains("open-file"),
        "{lines:?}"
    );
}

#[test]
fn check_loads_the_http_files_as_run_does() {
    let scratch = ScratchDir::new("check-http");
    let token = scratch.path("token");
    fs::write(&token, "secret\n").unwrap();
    let http = |lines: &str| format!("[nftables]\nenabled = false\n[http]\n{lines}");
    let (passed, lines) = check(
        &http(&format!("bearer_token_file = \"{}\"\n", token.display())),
        &[],
    );
    assert!(passed && lines["http"].starts_with("pass"), "{lines:?}");
    let (passed, lines) = check(&http("bearer_token_file = \"/nonexistent/token\"\n"), &[]);
    assert!(!passed, "{lines:?}");
    assert!(
        lines["http"].starts_with("FAIL")
            && lines["http"].contains("reading the bearer token file /nonexistent/token"),
        "{}",
        lines["http"]
    );
    let (passed, lines) = check(
        &http("tls_cert_file = \"/etc/hostname\"\ntls_key_file = \"/etc/hostname\"\n"),
        &[],
    );
    assert!(!passed, "{lines:?}");
    assert!(
        lines["http"].starts_with("FAIL") && lines["http"].contains("holds no certificate"),
        "{}",
        lines["http"]
    );
}

#[test]
fn check_tries_the_listen_address_and_fails_when_something_else_holds_it() {
    // Taken, by another process than a collector running with the pin directory (this
    // test): `run` would crash-loop, and the process is named. (Taken by that collector,
    // it is a warning: `tests/nftables.rs` checks beside a running one.)
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (passed, lines) = check("[nftables]\nenabled = false\n", &["--listen", &addr]);
    assert!(!passed, "{lines:?}");
    assert!(
        lines["listen"].starts_with("FAIL")
            && lines["listen"].contains(&format!("in use by process {}: ", std::process::id())),
        "{}",
        lines["listen"]
    );
    // The same port on another loopback address is free. (The port just taken is not tried
    // again once free: a test running meanwhile may get it.)
    let free = format!("127.0.0.2:{}", taken.local_addr().unwrap().port());
    let (passed, lines) = check("[nftables]\nenabled = false\n", &["--listen", &free]);
    assert!(passed && lines["listen"].starts_with("pass"), "{lines:?}");
    drop(taken);
    // Beyond loopback without credentials: a warning, as at start.
    let (passed, lines) = check(
        "listen = \"0.0.0.0:19464\"\n[nftables]\nenabled = false\n",
        &[],
    );
    assert!(passed, "{lines:?}");
    assert!(
        lines["listen"].starts_with("warn")
            && lines["listen"]
                .contains("serving beyond loopback (0.0.0.0:19464) without credentials"),
        "{}",
        lines["listen"]
    );
    // A route's port fails, as `run --listen` refuses it: the route would count the
    // collector's own scrapes.
    let (passed, lines) = check(
        "[[routes]]\nname = \"web\"\nports = [18080]\n[nftables]\nenabled = false\n",
        &["--listen", "127.0.0.1:18080"],
    );
    assert!(!passed, "{lines:?}");
    assert!(
        lines["listen"].starts_with("FAIL") && lines["listen"].contains("a port of route \"web\""),
        "{}",
        lines["listen"]
    );
    // TEST-NET-1: an address of no interface here.
    let (passed, lines) = check(
        "listen = \"192.0.2.1:9464\"\n[nftables]\nenabled = false\n",
        &[],
    );
    assert!(!passed, "{lines:?}");
    assert!(
        lines["listen"].starts_with("FAIL") && lines["listen"].contains("no interface"),
        "{}",
        lines["listen"]
    );
}

/// `collector args` run as nobody, without root's groups.
fn as_nobody(args: &[&str]) -> Output {
    Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            COLLECTOR,
        ])
        .args(args)
        .output()
        .unwrap()
}

/// `collector args` as nobody; fails the test unless it is refused with the advice to run as
/// root.
fn assert_refused_without_root(args: &[&str]) {
    let out = as_nobody(args);
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
    // Read through the links' programs: until 2026-12-03 said "no links pinned".
    assert_refused_without_root(&["maps", "dump", "SNI_ROUTES", "--pin-dir", pin_dir]);
    assert_refused_without_root(&["maps", "dump", "LOCAL_ADDRESSES", "--pin-dir", pin_dir]);
    // And nftables its tables: with no pin directory to look into, cleanup still cannot
    // tell that none of ours is left.
    let absent = std::env::temp_dir().join(format!("collector-cli-{}", std::process::id()));
    assert_refused_without_root(&["cleanup", "--pin-dir", absent.to_str().unwrap()]);
}

/// The CLI reads the agent's token file (root's, 0600) to send it: as another user it says
/// what to do, where it gave only "Permission denied".
#[test]
fn a_token_file_this_user_cannot_read_is_refused_with_what_to_do() {
    support::require_root();
    let dir = ScratchDir::new("cli-token");
    fs::set_permissions(&dir.0, fs::Permissions::from_mode(0o755)).unwrap();
    let token = dir.path("token");
    fs::write(&token, "secret\n").unwrap();
    fs::set_permissions(&token, fs::Permissions::from_mode(0o600)).unwrap();
    let config = dir.path("collector.toml");
    fs::write(
        &config,
        format!("[http]\nbearer_token_file = \"{}\"\n", token.display()),
    )
    .unwrap();
    let out = as_nobody(&["stats", "proxy", "--config", config.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && stderr.contains("this user cannot read the agent's bearer token file")
            && stderr.contains("run as root")
            && stderr.contains("Permission denied"),
        "{stderr}"
    );
}

/// A `v1` is a collector's layout only with `PIN_OWNER` in it, or with nothing but the names
/// a start pins under (one killed before it claimed the layout): another tool's `v1`, under
/// a pin directory given by mistake, is left whole and said so, where every pin in it was
/// removed (its links' programs detached with them).
#[test]
fn cleanup_leaves_a_v1_holding_pins_that_are_not_a_collectors() {
    let theirs = PinDir::new();
    let foreign = theirs.0.join("v1/their_counters");
    support::pin_plain_array(&foreign, 8, 4);
    support::pin_plain_array(&theirs.0.join("v1/CONN_COUNTERS"), 8, 4);
    fs::create_dir(theirs.0.join("v1/empty")).unwrap();
    let stdout = cleanup_applied(&theirs);
    assert!(
        foreign.exists()
            && theirs.0.join("v1/CONN_COUNTERS").exists()
            && theirs.0.join("v1/empty").is_dir(),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!(
            "{} (not a collector's pin layout: cleanup leaves it)",
            theirs.0.join("v1").display()
        )),
        "{stdout}"
    );
    // Our names alone, no owner yet (a start killed early, or a map an earlier build pinned
    // that no later one removes): removed.
    let ours = PinDir::new();
    support::pin_plain_array(&ours.0.join("v1/CONN_COUNTERS"), 8, 4);
    support::pin_plain_array(&ours.0.join("v1/CONN_CONNECT_FAILURES"), 8, 4);
    let stdout = cleanup_applied(&ours);
    assert!(!ours.0.exists(), "{stdout}");
}

/// `collector cleanup --apply --pin-dir DIR`, which must succeed: its standard output.
fn cleanup_applied(dir: &PinDir) -> String {
    let out = Command::new(COLLECTOR)
        .args(["cleanup", "--apply", "--pin-dir", dir.0.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A pin directory that does not exist is said to be absent, and the collectors' pin
/// directories on bpffs are named (a `DaemonSet`'s pins are under /sys/fs/bpf/collectors on
/// the node): until 2026-12-07 it read "nothing of ours", and an operator on the node
/// looking at the default path took a crashed pod's pins for cleaned up.
#[test]
fn cleanup_of_an_absent_pin_directory_names_the_collectors_pin_directories() {
    let other = PinDir::new();
    let absent = other.0.with_file_name(format!(
        "{}-absent",
        other.0.file_name().unwrap().to_str().unwrap()
    ));
    let out = Command::new(COLLECTOR)
        .args(["cleanup", "--pin-dir", absent.to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Named, unless ten others sort before it (left by killed runs).
    assert!(
        stdout.contains(&format!("no pin directory {}", absent.display()))
            && stdout.contains("pin directories of collectors on this bpffs")
            && (stdout.contains(other.0.to_str().unwrap()) || stdout.contains(" more\n")),
        "{stdout}"
    );
    assert!(!stdout.contains("nothing of ours under"), "{stdout}");
}

#[test]
fn cleanup_leaves_a_pin_directory_without_a_collectors_layout() {
    let dir = PinDir::new();
    fs::remove_dir(dir.0.join("v1")).unwrap();
    let stdout = cleanup_applied(&dir);
    // An empty directory of another tool's, given by mistake, is still there.
    assert!(dir.0.is_dir(), "{} removed", dir.0.display());
    // And --apply says it found nothing, rather than succeeding in silence.
    assert!(stdout.contains("nothing of ours under"), "{stdout}");
}

#[test]
fn cleanup_refuses_the_bpffs_mount_itself() {
    // Listing only: on a build without the refusal, --apply would remove every empty
    // directory of the host's bpffs.
    let out = Command::new(COLLECTOR)
        .args(["cleanup", "--pin-dir", "/sys/fs/bpf"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && stderr.contains("pin_dir /sys/fs/bpf is the bpffs mount itself")
            && stderr.contains("`rm -r /sys/fs/bpf/v1`"),
        "{}: {stderr}",
        out.status
    );
    assert!(
        out.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
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
    let mut child = support::Reaped::spawn(
        Command::new(COLLECTOR)
            .args(["events", "--listen", &addr.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    );
    // Read while it runs: a pipe left full would stop it.
    let mut stderr_pipe = child.stderr().unwrap();
    let stderr = std::thread::spawn(move || {
        let mut stderr = String::new();
        stderr_pipe.read_to_string(&mut stderr).unwrap();
        stderr
    });
    let mut first = String::new();
    BufReader::new(child.stdout().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert_eq!(first, "{\"event\":\"query-received\"}\n");
    // The reader is gone (dropped with the BufReader): the next write finds the pipe closed.
    let status = support::wait_for("the CLI to exit", Duration::from_secs(20), || {
        child.try_wait()
    });
    let stderr = stderr.join().unwrap();
    assert!(status.success(), "{status}: {stderr}");
    assert!(stderr.is_empty(), "{stderr}");
    server.join().unwrap();
}

/// A server on a port of its own that answers each of `answers` to one connection, then
/// closes it: a proxy between the CLI and the agent, as tests make it answer. Returns its
/// address and the thread, which ends after the last.
fn answering(answers: Vec<Vec<u8>>) -> (String, std::thread::JoinHandle<()>) {
    answering_on(std::net::TcpListener::bind("127.0.0.1:0").unwrap(), answers)
}

/// As [`answering`], on `listener`.
fn answering_on(
    listener: std::net::TcpListener,
    answers: Vec<Vec<u8>>,
) -> (String, std::thread::JoinHandle<()>) {
    use std::io::{Read as _, Write as _};
    let addr = listener.local_addr().unwrap().to_string();
    let server = std::thread::spawn(move || {
        for answer in answers {
            let (mut stream, _) = listener.accept().unwrap();
            let mut request = [0u8; 1024];
            let _ = stream.read(&mut request).unwrap();
            stream.write_all(&answer).unwrap();
        }
    });
    (addr, server)
}

/// `collector ARGS --listen addr` for each of `commands`: fails the test unless each exits 0
/// with nothing on stderr, having printed what it is paired with.
fn assert_prints(addr: &str, commands: &[(&[&str], &str)]) {
    assert_prints_from(|| Command::new(COLLECTOR), addr, commands);
}

/// As [`assert_prints`], each command made by `collector` (in a namespace, say).
fn assert_prints_from(collector: impl Fn() -> Command, addr: &str, commands: &[(&[&str], &str)]) {
    for (args, expected) in commands {
        let out = collector()
            .args(*args)
            .args(["--listen", addr])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && stderr.is_empty(),
            "{args:?}: {}: {stderr}",
            out.status
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout), *expected, "{args:?}");
    }
}

/// An agent listening on every address (`[::]`) is reached on 127.0.0.1 where loopback has
/// no IPv6 (a pod with `net.ipv6.conf.all.disable_ipv6 = 1`), so that `::1` cannot be
/// dialled: its dual-stack socket takes IPv4 too. The CLI failed there with "Cannot assign
/// requested address".
#[test]
fn an_agent_on_every_address_is_reached_where_loopback_has_no_ipv6() {
    let netns = support::Netns::new();
    // Written from a thread in the namespace: /proc/sys/net is the writer's namespace's.
    let listener = netns.run(|| {
        fs::write("/proc/sys/net/ipv6/conf/lo/disable_ipv6", "1").unwrap();
        let listener = std::net::TcpListener::bind("[::]:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        assert_eq!(
            std::net::TcpStream::connect(("::1", port))
                .unwrap_err()
                .kind(),
            std::io::ErrorKind::AddrNotAvailable
        );
        listener
    });
    let (addr, server) = answering_on(
        listener,
        vec![b"HTTP/1.1 200 OK\r\ncontent-length: 23\r\n\r\n{\"activeConnections\":3}".to_vec()],
    );
    assert_prints_from(
        || netns.command(COLLECTOR),
        &addr,
        &[(&["stats", "proxy", "--json"], "{\"activeConnections\":3}\n")],
    );
    server.join().unwrap();
}

/// A config file the agent would refuse at its next start (a bad edit of its `ConfigMap`,
/// while it goes on serving) still tells `stats` where the agent listens: the command
/// answers, and warns of the line a start refuses. `check` still refuses the file.
#[test]
fn stats_reads_the_address_of_a_config_a_start_would_refuse() {
    let (addr, server) = answering(vec![
        b"HTTP/1.1 200 OK\r\ncontent-length: 23\r\n\r\n{\"activeConnections\":3}".to_vec(),
    ]);
    let dir = ScratchDir::new("cli-refused-config");
    let config = dir.path("collector.toml");
    fs::write(&config, format!("listen = \"{addr}\"\n[dns]\ntop_k = 0\n")).unwrap();
    let config = config.to_str().unwrap();
    let out = Command::new(COLLECTOR)
        .args(["stats", "proxy", "--json", "--config", config])
        .env_remove("COLLECTOR_LISTEN")
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{}: {stderr}", out.status);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "{\"activeConnections\":3}\n"
    );
    assert!(
        stderr.contains(&format!("{config}:3:"))
            && stderr.contains(&format!(
                "a start would refuse this file; reading the agent at {addr} all the same, with \
                 the default [http] (not set in it)"
            )),
        "{stderr}"
    );
    server.join().unwrap();
    let check = Command::new(COLLECTOR)
        .args(["check", "--config-only", "--config", config])
        .output()
        .unwrap();
    assert!(!check.status.success());
    assert!(
        String::from_utf8_lossy(&check.stderr).contains(&format!("{config}:3:")),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
}

/// `collector stats --json` and `collector events` through a proxy that answers in HTTP/1.0
/// and ends each body with the connection: both print what it sent, status 0. There only
/// the agent's `end` line tells its stop from a stream cut off: without it, the stream's
/// lines are printed and the status is 1.
#[test]
fn an_http_1_0_answer_is_taken() {
    let events = "{\"event\":\"query-received\"}\n{\"event\":\"end\",\"timestamp\":1}\n";
    let (addr, server) = answering(
        [
            "{\"activeConnections\":3}",
            events,
            "{\"event\":\"query-received\"}\n",
        ]
        .map(|body| format!("HTTP/1.0 200 OK\r\n\r\n{body}").into_bytes())
        .into(),
    );
    assert_prints(
        &addr,
        &[
            (&["stats", "proxy", "--json"], "{\"activeConnections\":3}\n"),
            (&["events"], events),
        ],
    );
    let cut = Command::new(COLLECTOR)
        .args(["events", "--listen", &addr])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&cut.stderr);
    assert_eq!(cut.status.code(), Some(1), "{stderr}");
    assert_eq!(cut.stdout, b"{\"event\":\"query-received\"}\n");
    assert!(
        stderr.contains("was cut off") && stderr.contains("no end line"),
        "{stderr}"
    );
    server.join().unwrap();
}

/// `body` in the chunked transfer coding, cut at `cuts`, each chunk-size line with an
/// extension, and a trailer field after the last chunk: as an HTTP/1.1 proxy may re-chunk
/// what it passes on.
fn chunked(body: &str, cuts: &[usize]) -> String {
    use std::fmt::Write as _;
    let mut coded = String::new();
    let mut start = 0;
    for end in cuts.iter().copied().chain([body.len()]) {
        let chunk = &body[start..end];
        write!(coded, "{:X};proxy=1\r\n{chunk}\r\n", chunk.len()).unwrap();
        start = end;
    }
    coded + "0\r\nX-Proxy-Checksum: 0\r\n\r\n"
}

/// `collector stats --json` and `collector events` through an HTTP/1.1 proxy that chunks the
/// agent's answers anew, cutting inside a JSON key and inside an event's line, and writes
/// its header fields in its own way: both print the bodies decoded, status 0.
#[test]
fn a_chunked_answer_is_decoded() {
    let json = "{\"activeConnections\":3}";
    let events = "{\"event\":\"query-received\"}\n{\"event\":\"end\",\"timestamp\":1}\n";
    let (addr, server) = answering(vec![
        format!(
            "HTTP/1.1 200 OK\r\nCONTENT-TYPE: application/json\r\nTRANSFER-ENCODING:  Chunked\r\n\r\n{}",
            chunked(json, &[5, 9])
        )
        .into_bytes(),
        format!(
            "HTTP/1.1 200 OK\r\ntransfer-encoding:chunked\r\ncontent-type: application/x-ndjson\r\n\r\n{}",
            chunked(events, &[10, 30])
        )
        .into_bytes(),
    ]);
    assert_prints(
        &addr,
        &[
            (&["stats", "proxy", "--json"], &format!("{json}\n")),
            (&["events"], events),
        ],
    );
    server.join().unwrap();
}

/// A `ca.crt` beside the agent's certificate that the CLI's user cannot read is warned of,
/// naming it and why, and the command goes on without it (here to an agent that is not
/// running).
#[test]
fn an_unreadable_ca_beside_the_certificate_is_warned_of() {
    support::require_root();
    let dir = ScratchDir::new("ca-beside");
    fs::set_permissions(&dir.0, fs::Permissions::from_mode(0o755)).unwrap();
    let (cert, key, ca) = (dir.path("tls.crt"), dir.path("tls.key"), dir.path("ca.crt"));
    for (file, mode) in [(&cert, 0o644), (&key, 0o644), (&ca, 0o600)] {
        fs::write(file, "").unwrap();
        fs::set_permissions(file, fs::Permissions::from_mode(mode)).unwrap();
    }
    let (config, listen) = https_config_to_nowhere(&dir, &cert, &key);
    // As nobody: the config and the certificate are readable, ca.crt (root's, 0600) is not.
    let out = as_nobody(&["stats", "proxy", "--config", config.to_str().unwrap()]);
    assert_ca_left_out(&out, &ca, "it cannot be read (Permission denied", listen);
}

/// The command failed reaching `listen` after warning that it left `ca` out, and `why`.
fn assert_ca_left_out(
    out: &std::process::Output,
    ca: &Path,
    why: &str,
    listen: std::net::SocketAddr,
) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && stderr.contains(&format!(
                "not trusting {}, beside the config's tls_cert_file: {why}",
                ca.display()
            ))
            && stderr.contains(&format!("connecting to the collector at {listen}")),
        "{}: {stderr}",
        out.status
    );
}

/// A config in `dir` serving HTTPS with `cert` and `key` on a port nothing listens on: the
/// config's path and that address.
fn https_config_to_nowhere(
    dir: &ScratchDir,
    cert: &Path,
    key: &Path,
) -> (PathBuf, std::net::SocketAddr) {
    let listen = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let config = dir.path("collector.toml");
    fs::write(
        &config,
        format!(
            "listen = \"{listen}\"\n[http]\ntls_cert_file = \"{}\"\ntls_key_file = \"{}\"\n",
            cert.display(),
            key.display()
        ),
    )
    .unwrap();
    (config, listen)
}

/// A `ca.crt` beside the agent's certificate that is readable but holds no certificate that
/// parses is warned of as an unreadable one is, naming it and the parse error, and the
/// command goes on without it (here to an agent that is not running).
#[test]
fn a_ca_beside_the_certificate_that_does_not_parse_is_warned_of() {
    let dir = ScratchDir::new("ca-unparsed");
    let (cert, key, ca) = (dir.path("tls.crt"), dir.path("tls.key"), dir.path("ca.crt"));
    fs::write(&cert, "").unwrap();
    fs::write(&key, "").unwrap();
    let (config, listen) = https_config_to_nowhere(&dir, &cert, &key);
    for (text, why) in [
        (
            "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
            "it does not parse as PEM certificates (malformed PEM: base64 decode error",
        ),
        ("not a certificate\n", "it holds no PEM certificate"),
    ] {
        fs::write(&ca, text).unwrap();
        let out = Command::new(COLLECTOR)
            .args(["stats", "proxy", "--config", config.to_str().unwrap()])
            .output()
            .unwrap();
        assert_ca_left_out(&out, &ca, why, listen);
    }
}

/// In a user namespace of its own, as `unshare --map-root-user` and user-namespaced
/// containers make one, root has every capability, of that namespace only: bpf(2) refuses it,
/// and `check` says why instead of blaming a security module.
#[test]
fn in_a_user_namespace_the_refusal_says_so() {
    support::require_root();
    let pin_dir =
        Path::new("/sys/fs/bpf").join(format!("collector-cli-userns-{}", std::process::id()));
    let out = Command::new("unshare")
        .args(["--user", "--map-root-user", COLLECTOR, "check", "--pin-dir"])
        .arg(&pin_dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find(|line| line.split_whitespace().nth(1) == Some("pin_dir"))
        .unwrap_or_else(|| {
            panic!(
                "no pin_dir line in\n{stdout}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    assert!(
        !out.status.success()
            && line.starts_with("FAIL")
            && line.contains("permission denied: running in a user namespace (uid_map 0 0 1)")
            && !line.contains("security module"),
        "{line}"
    );
    // Its capabilities count only inside it: those bpf(2) asks for in the host's fail.
    for capability in ["CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN"] {
        let line = stdout
            .lines()
            .find(|line| line.split_whitespace().nth(1) == Some(capability))
            .unwrap();
        assert!(
            line.starts_with("FAIL") && line.contains("held only inside a user namespace"),
            "{line}"
        );
    }
    // What it made to try, it removed.
    assert!(!pin_dir.exists());
}

#[test]
fn the_log_format_is_taken_in_any_case_from_the_environment() {
    // Nothing listens on port 1 of loopback: the command fails, and says so as a JSON log line.
    let out = Command::new(COLLECTOR)
        .args(["stats", "dns", "--listen", "127.0.0.1:1"])
        .env("COLLECTOR_LOG_FORMAT", "JSON")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let line: serde_json::Value = serde_json::from_str(stderr.trim()).expect(&stderr);
    assert_eq!(line["level"], "ERROR", "{stderr}");
}

/// A failure is said even where `RUST_LOG` filters every log line out: as a JSON log line it
/// was filtered too, and the command exited 1 with nothing on stderr.
#[test]
fn a_failure_is_said_whatever_the_log_filter() {
    for format in ["text", "json"] {
        let out = Command::new(COLLECTOR)
            .args([
                "--log-format",
                format,
                "stats",
                "dns",
                "--listen",
                "127.0.0.1:1",
            ])
            .env("RUST_LOG", "off")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{format}: {stderr}");
        assert!(
            stderr.starts_with("collector: ") && stderr.contains("127.0.0.1:1"),
            "{format}: {stderr}"
        );
    }
}

/// `--version` names the commit built, as `collector_build_info` does: every build is 0.1.0,
/// so the commit is what says which upgrade notes apply (until 2026-12-07 it printed the
/// version alone).
#[test]
fn the_version_names_the_commit_built() {
    let out = Command::new(COLLECTOR).arg("--version").output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let revision = stdout
        .trim()
        .strip_prefix(concat!("collector ", env!("CARGO_PKG_VERSION"), " ("))
        .and_then(|rest| rest.strip_suffix(')'));
    assert!(revision.is_some_and(|r| !r.is_empty()), "{stdout}");
}

/// A map name `maps` does not know is a usage error (status 2) that lists the names, before
/// anything is read; the case does not matter. Until 2026-12-07 it failed with status 1,
/// as a failed read does.
#[test]
fn maps_take_a_known_name_in_any_case() {
    for command in ["dump", "watch"] {
        let out = Command::new(COLLECTOR)
            .args(["maps", command, "CONN_STATES"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{command}: {stderr}");
        assert!(
            stderr.contains("CONN_STATE") && stderr.contains("LOCAL_ADDRESSES"),
            "{command}: {stderr}"
        );
    }
    let pin_dir = "/sys/fs/bpf/collector-test-no-such-pins";
    let out = Command::new(COLLECTOR)
        .args(["maps", "dump", "conn_state", "--pin-dir", pin_dir])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(!stderr.contains("invalid value"), "{stderr}");
}

/// `--listen` says what to write, as the config's `listen` does: until 2026-12-03 clap said
/// only "invalid socket address syntax".
#[test]
fn every_listen_option_says_what_to_write() {
    for (listen, why) in [
        (
            "localhost:9464",
            "\"localhost:9464\" is not a socket address; write IP:PORT, e.g. \
             \"127.0.0.1:9464\" or \"[::1]:9464\" (host names are not resolved)",
        ),
        // Addresses no connection reaches: dialled by `stats`, `top` and `events`, they read
        // as an agent not running (until 2026-12-07).
        ("127.0.0.1:0", "\"127.0.0.1:0\" has port 0"),
        (
            "224.0.0.1:9464",
            "\"224.0.0.1:9464\" is a multicast address",
        ),
        (
            "[fe80::1]:9464",
            "\"[fe80::1]:9464\" is link-local without its interface",
        ),
    ] {
        for command in ["run", "check", "stats", "top", "events"] {
            let mut args = vec![command, "--listen", listen];
            if command == "stats" {
                args.push("proxy");
            }
            let out = Command::new(COLLECTOR).args(&args).output().unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
            assert!(stderr.contains(why), "{args:?}: {stderr}");
        }
    }
}

#[test]
fn run_says_what_to_do_when_the_listen_address_is_not_here() {
    let netns = support::Netns::new();
    let pins = ScratchDir::new("run-listen");
    // TEST-NET-1: an address of no interface here. The bind comes before anything is loaded.
    let out = support::output_within(
        netns
            .command(COLLECTOR)
            .args(["run", "--listen", "192.0.2.1:9464", "--pin-dir"])
            .arg(pins.path("pins")),
        Duration::from_secs(20),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("no interface of this network namespace has 192.0.2.1")
            && !stderr.contains("another collector"),
        "{stderr}"
    );
    assert!(!pins.path("pins").exists(), "{stderr}");
}

/// The default listen address is refused where a route has its port, unless `--listen`
/// gives another: the route would count the collector's own scrapes. Refused before anything
/// is loaded.
#[test]
fn run_refuses_to_serve_on_a_routes_port() {
    let netns = support::Netns::new();
    let dir = ScratchDir::new("run-route-port");
    let config = dir.path("collector.toml");
    fs::write(&config, "[[routes]]\nname = \"metrics\"\nports = [9464]\n").unwrap();
    let out = support::output_within(
        netns
            .command(COLLECTOR)
            .args(["run", "--config", config.to_str().unwrap(), "--pin-dir"])
            .arg(dir.path("pins")),
        Duration::from_secs(20),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("the default listen address")
            && stderr.contains("port 9464, a port of route \"metrics\""),
        "{stderr}"
    );
    assert!(!dir.path("pins").exists(), "{stderr}");
    // Another port given: the file is fine (the check passes that line).
    let (_, lines) = check(
        "[[routes]]\nname = \"metrics\"\nports = [9464]\n[nftables]\nenabled = false\n",
        &["--listen", "127.0.0.1:19465"],
    );
    assert!(!lines["listen"].starts_with("FAIL"), "{}", lines["listen"]);
}

/// A cgroup2 mount that shows a cgroup below the root (as a container's own cgroup namespace
/// does) is refused by `check` and by `run`: `sock_ops` there would count only that
/// cgroup's sockets, none of the proxy's.
#[test]
fn a_cgroup2_mount_below_the_root_is_refused() {
    /// The child cgroup and the mount of it, gone whatever happens to the test.
    struct ChildCgroup {
        cgroup: std::path::PathBuf,
        mount: std::path::PathBuf,
    }
    impl Drop for ChildCgroup {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.mount).status();
            let _ = fs::remove_dir(&self.mount);
            let _ = fs::remove_dir(&self.cgroup);
        }
    }
    support::require_root();
    let root = support::cgroup2_mount();
    let id = std::process::id();
    let child = ChildCgroup {
        cgroup: Path::new(&root).join(format!("collector-test-{id}")),
        mount: std::env::temp_dir().join(format!("collector-test-cgroup-{id}")),
    };
    fs::create_dir(&child.cgroup).unwrap();
    fs::create_dir(&child.mount).unwrap();
    support::run(
        "mount",
        &[
            "--bind",
            child.cgroup.to_str().unwrap(),
            child.mount.to_str().unwrap(),
        ],
    );
    let mount = child.mount.to_str().unwrap();
    let config = format!("cgroup2 = \"{mount}\"\n[nftables]\nenabled = false\n");
    let (passed, lines) = check(&config, &[]);
    assert!(!passed, "{lines:?}");
    assert!(
        lines["cgroup2"].starts_with("FAIL")
            && lines["cgroup2"].contains(mount)
            && lines["cgroup2"].contains("below the hierarchy's root"),
        "{lines:?}"
    );
    // The host's own mount passes.
    let (_, lines) = check(
        &format!("cgroup2 = \"{root}\"\n[nftables]\nenabled = false\n"),
        &[],
    );
    assert!(lines["cgroup2"].starts_with("pass"), "{lines:?}");
    let dir = ScratchDir::new("cgroup-below");
    let config_path = dir.path("collector.toml");
    fs::write(&config_path, &config).unwrap();
    // In a namespace of the test's own, stopped after a minute should it start after all.
    let netns = support::Netns::new();
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &netns.name,
            "timeout",
            "-s",
            "INT",
            "60",
            COLLECTOR,
        ])
        .args(["run", "--config", config_path.to_str().unwrap()])
        .arg("--pin-dir")
        .arg(dir.path("pins"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("below the hierarchy's root"), "{stderr}");
}

#[test]
fn check_judges_the_configured_interfaces_and_cgroup2_as_run_takes_them() {
    let (passed, lines) = check(
        "interfaces = [\"lo\", \"eth9\"]\ncgroup2 = \"/tmp\"\n[nftables]\nenabled = false\n",
        &[],
    );
    assert!(!passed, "{lines:?}");
    // Not here yet is a warning: `run` attaches it when it appears.
    assert!(
        lines["interfaces"].starts_with("warn")
            && lines["interfaces"].contains("eth9 not here (yet)"),
        "{lines:?}"
    );
    assert!(
        lines["cgroup2"].starts_with("FAIL") && lines["cgroup2"].contains("/tmp"),
        "{lines:?}"
    );
    let (passed, lines) = check("interfaces = [\"lo\"]\n[nftables]\nenabled = false\n", &[]);
    assert!(passed, "{lines:?}");
    assert!(
        lines["interfaces"].starts_with("pass") && lines["interfaces"].ends_with(" lo"),
        "{lines:?}"
    );
}

#[test]
fn an_agent_that_never_answers_is_an_error_not_a_hang() {
    // Accepted (the kernel's backlog does it) and never answered: a stopped agent.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap().to_string();
    let out = Command::new(COLLECTOR)
        .args(["stats", "dns", "--listen", &addr])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("did not answer within 10 s"), "{stderr}");
    drop(silent);
}

/// A refusal's body is the agent's reason: `collector events` at the agent's cap on streams
/// says which cap it met, as the agent words it, and the setting behind it.
#[test]
fn a_refusal_says_the_agents_reason() {
    let (addr, server) = answering(vec![
        b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\n\
          content-length: 31\r\n\r\ntoo many event streams at once\n"
            .to_vec(),
    ]);
    let out = Command::new(COLLECTOR)
        .args(["events", "--listen", &addr])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(
            "answered HTTP/1.1 503 Service Unavailable: too many event streams at once (the \
             agent's [http] max_event_streams; try again later)"
        ),
        "{stderr}"
    );
    server.join().unwrap();
}

/// `stats proxy ARGS --watch` against answers of 3 active connections, a failure, and 4: its
/// standard output up to the one with 4, and its standard error (killed then).
fn watch_through_a_failure(args: &[&str]) -> (String, String) {
    use std::{io::Read as _, sync::mpsc};
    let ok = |active: u32| {
        let body = format!("{{\"activeConnections\":{active},\"routes\":[]}}");
        format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    };
    let (addr, server) = answering(vec![ok(3), Vec::new(), ok(4)]);
    let mut watch = support::Reaped::spawn(
        Command::new(COLLECTOR)
            .args(["stats", "proxy", "--watch", "--listen", &addr])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    );
    let mut stdout = watch.stdout().unwrap();
    let (seen_tx, seen_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut seen = String::new();
        let mut buf = [0u8; 4096];
        while let Ok(read @ 1..) = stdout.read(&mut buf) {
            seen.push_str(&String::from_utf8_lossy(&buf[..read]));
            if seen_tx.send(seen.clone()).is_err() {
                return;
            }
        }
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut seen = String::new();
    while !seen.contains("total: 4 active") && !seen.contains("\"activeConnections\":4") {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        seen = seen_rx
            .recv_timeout(left)
            .unwrap_or_else(|err| panic!("no refresh with 4 ({err}):\n{seen}"));
    }
    watch.signal(libc::SIGKILL);
    let mut stderr = String::new();
    watch.stderr().unwrap().read_to_string(&mut stderr).unwrap();
    server.join().unwrap();

    // A first failure is an error, as without --watch.
    let out = Command::new(COLLECTOR)
        .args(["stats", "proxy", "--watch", "--listen", &addr])
        .args(args)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    (seen, stderr)
}

/// `stats --watch` goes on through a failed refresh (an agent restarting), which it reports
/// on standard error when its output is not a terminal: refreshes follow one another on
/// standard output, a blank line apart, with no text in between. Only a first failure ends
/// it.
#[test]
fn watching_goes_on_through_a_failed_refresh() {
    let (seen, stderr) = watch_through_a_failure(&[]);
    assert!(!seen.contains("did not answer"), "{seen}");
    let (first, rest) = seen.split_once("total: 3 active").unwrap();
    assert!(!first.contains("total:"), "{seen}");
    assert!(
        rest.contains("\n\n") && rest.contains("total: 4 active"),
        "{seen}"
    );
    // Not a terminal: no screen clearing.
    assert!(!seen.contains('\x1b'), "{seen:?}");
    assert!(
        stderr.contains("did not answer") && stderr.contains("trying again every second"),
        "{stderr}"
    );
}

/// `stats --json --watch` writes JSON lines only, so that `| jq` reads on through a failed
/// refresh; the failure goes to standard error.
#[test]
fn watching_json_keeps_failures_off_standard_output() {
    let (seen, stderr) = watch_through_a_failure(&["--json"]);
    let active: Vec<u64> = seen
        .lines()
        .map(|line| {
            let value: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|err| panic!("not JSON ({err}): {line:?}"));
            value["activeConnections"].as_u64().unwrap()
        })
        .collect();
    assert_eq!(active, [3, 4], "{seen}");
    assert!(stderr.contains("did not answer"), "{stderr}");
}

/// `collector events` ends with status 0 when the agent ends the stream with its `end` line
/// and last chunk, as a clean stop sends them; with status 1 and the reason when the stream
/// is cut off before its end (an agent killed or crashed), and when it ends without the
/// `end` line (an agent stopping on an error): a supervisor of the tail can tell them apart.
#[test]
fn an_event_stream_cut_off_is_an_error() {
    let line = "{\"event\":\"query-received\"}\n";
    let end = "{\"event\":\"end\",\"timestamp\":1}\n";
    let head = "HTTP/1.1 200 OK\r\ncontent-type: application/x-ndjson\r\ntransfer-encoding: chunked\r\n\r\n";
    let chunk = |line: &str| format!("{:X}\r\n{line}\r\n", line.len());
    let (addr, server) = answering(vec![
        format!("{head}{}{}0\r\n\r\n", chunk(line), chunk(end)).into_bytes(),
        format!("{head}{}", chunk(line)).into_bytes(),
        format!("{head}{}0\r\n\r\n", chunk(line)).into_bytes(),
    ]);
    let tail = || {
        Command::new(COLLECTOR)
            .args(["events", "--listen", &addr])
            .output()
            .unwrap()
    };
    let ended = tail();
    assert!(
        ended.status.success(),
        "{}",
        String::from_utf8_lossy(&ended.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&ended.stdout),
        format!("{line}{end}")
    );

    let cut = tail();
    let stderr = String::from_utf8_lossy(&cut.stderr);
    assert_eq!(cut.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("cut off before its end"), "{stderr}");
    // What came before the cut was passed on.
    assert_eq!(String::from_utf8_lossy(&cut.stdout), line);

    let failed = tail();
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert_eq!(failed.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("ended without its end line: the agent stopped on an error"),
        "{stderr}"
    );
    assert_eq!(String::from_utf8_lossy(&failed.stdout), line);
    server.join().unwrap();
}

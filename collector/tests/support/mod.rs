//! Shared by the privileged integration tests and the benchmark: a network namespace that
//! removes itself, the agent as a child process inside it, HTTP from inside the namespace,
//! and readers for `/metrics`.
#![allow(
    dead_code,
    reason = "each test binary uses a different part of this module"
)]

pub mod bpf_calls;
pub mod dns;
pub mod hello;

use std::{
    fs,
    io::{Read as _, Write as _},
    net::TcpStream,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicBool, AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

/// The collector binary under test.
pub const COLLECTOR: &str = env!("CARGO_BIN_EXE_collector");
/// Where the agent listens inside each test's namespace.
pub const LISTEN: &str = "127.0.0.1:9464";

/// Starts `command` with the open-file limits `soft` and `hard`, as systemd starts a unit
/// (1024 under 524288).
pub fn limit_open_files(command: &mut Command, soft: u64, hard: u64) {
    use std::os::unix::process::CommandExt as _;
    // SAFETY: setrlimit is async-signal-safe, and the child runs nothing else before exec.
    unsafe {
        command.pre_exec(move || {
            let limit = libc::rlimit {
                rlim_cur: soft,
                rlim_max: hard,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raw const limit) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
}

/// Sets the TCP socket option `option` of `socket` to `value` (`TCP_DEFER_ACCEPT`'s
/// seconds, `TCP_FASTOPEN`'s queue, `TCP_SYNCNT`'s retries).
pub fn set_tcp_option(socket: &impl std::os::fd::AsRawFd, option: libc::c_int, value: libc::c_int) {
    set_socket_option(socket, libc::IPPROTO_TCP, option, value);
}

/// Sets the socket option `option` of protocol `level` to `value`, or panics.
pub fn set_socket_option(
    socket: &impl std::os::fd::AsRawFd,
    level: libc::c_int,
    option: libc::c_int,
    value: libc::c_int,
) {
    // SAFETY: a socket option of the socket's open descriptor, from a local of its size.
    let set = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            option,
            (&raw const value).cast(),
            libc::socklen_t::try_from(size_of::<libc::c_int>()).unwrap(),
        )
    };
    assert_eq!(set, 0, "{}", std::io::Error::last_os_error());
}

/// `CLOCK_MONOTONIC` in nanoseconds, the clock of the kernel's `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a clock the kernel always has, written into a local.
    assert_eq!(
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut now) },
        0
    );
    u64::try_from(now.tv_sec).unwrap() * 1_000_000_000 + u64::try_from(now.tv_nsec).unwrap()
}

/// Where cgroup2 is mounted: found in /proc/mounts, since a hybrid layout puts it below
/// /sys/fs/cgroup (here /sys/fs/cgroup/unified).
pub fn cgroup2_mount() -> String {
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap();
    mounts
        .lines()
        .find_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            (fields.get(2) == Some(&"cgroup2")).then(|| fields[1].to_owned())
        })
        .expect("a cgroup2 mount in /proc/self/mounts")
}

/// Fails loudly without root: a privileged test that skips proves nothing.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test needs root (BPF, tc, network namespaces): run `cargo xtask test` in a root \
         shell (`sudo -i`)"
    );
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap();
    assert!(
        mounts
            .lines()
            .any(|l| l.split_whitespace().nth(2) == Some("bpf")),
        "bpffs is not mounted: `mount -t bpf bpf /sys/fs/bpf` (cargo xtask test does it)"
    );
}

/// `prefix`, this test process's id and a number of its own: a name no other test takes.
pub fn unique(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Runs `ip -batch` with `lines` in the namespace named `netns`: hundreds of links in one
/// process.
pub fn ip_batch(netns: &str, lines: &str) {
    let dir = ScratchDir::new("ip-batch");
    let file = dir.path("batch");
    fs::write(&file, lines).unwrap();
    run("ip", &["-n", netns, "-batch", file.to_str().unwrap()]);
}

pub fn run(program: &str, args: &[&str]) {
    let out = Command::new(program).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A directory of the test's own for files the agent reads (secrets, certificates),
/// removed on drop, even when the test fails.
pub struct ScratchDir(pub PathBuf);

impl ScratchDir {
    pub fn new(name: &str) -> Self {
        // The run's id first, after a prefix of its own, so that a sweep finds it.
        let dir = std::env::temp_dir().join(format!("{}-{name}", unique("collector-scratch")));
        fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A network namespace with loopback up, deleted on drop (even when the test fails).
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// Lets this namespace route between its interfaces (IPv4 forwarding on).
    pub fn forward(&self) {
        run(
            "ip",
            &[
                "netns",
                "exec",
                &self.name,
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
            ],
        );
    }

    pub fn new() -> Self {
        static SWEPT: std::sync::Once = std::sync::Once::new();
        halt_if_stopping();
        require_root();
        SWEPT.call_once(sweep_killed_runs);
        let name = unique(NETNS_PREFIX.trim_end_matches('-'));
        run("ip", &["netns", "add", &name]);
        // Made while a sweep began, which may have listed the namespaces before it.
        if stopping() {
            let _ = Command::new("ip").args(["netns", "del", &name]).status();
            halt_if_stopping();
        }
        let netns = Self { name };
        run("ip", &["-n", &netns.name, "link", "set", "lo", "up"]);
        netns
    }

    /// Runs `f` on a thread that has entered this namespace: sockets it opens live there.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        self.spawn(f).join().unwrap()
    }

    /// Spawns a thread inside this namespace and returns its handle.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> thread::JoinHandle<T> {
        let path = format!("/var/run/netns/{}", self.name);
        thread::spawn(move || {
            let file = fs::File::open(&path).unwrap();
            // SAFETY: setns on this thread only, with a valid namespace fd.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
            f()
        })
    }

    /// `program` in this network namespace only (`nsenter --net`): unlike `ip netns exec`,
    /// the host's /sys, and so its bpffs, stays visible.
    pub fn command(&self, program: &str) -> Command {
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--net=/var/run/netns/{}", self.name))
            .arg(program);
        command
    }

    /// `ip netns exec` into this namespace, as an operator would start a sidecar.
    pub fn ip_netns_exec(&self, program: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name, program]);
        command
    }
}

/// The prefix of every test namespace's name, followed by the test process's id.
const NETNS_PREFIX: &str = "colltest-";

/// Removes what test runs that were killed before their guards ran (a Ctrl-C, a CI
/// timeout, a SIGKILL) left: what is named after a process that is gone.
pub fn sweep_killed_runs() {
    sweep_runs(of_a_killed_run, "a test run that was killed");
}

/// Set once [`sweep_this_run`] began: this run makes nothing more.
static STOPPING: AtomicBool = AtomicBool::new(false);

/// Removes what this run made, for a run stopped by a signal, whose guards do not run.
/// From then on, a thread about to make a namespace or start an agent waits for the exit
/// instead ([`halt_if_stopping`]).
pub fn sweep_this_run() {
    STOPPING.store(true, Ordering::SeqCst);
    sweep_runs(of_this_run, "this run");
}

/// Whether [`sweep_this_run`] began.
pub fn stopping() -> bool {
    STOPPING.load(Ordering::SeqCst)
}

/// Parks the calling thread for good once [`sweep_this_run`] began, so that it makes
/// nothing the sweep has already passed by.
pub fn halt_if_stopping() {
    while stopping() {
        thread::park();
    }
}

/// Removes the namespaces, pin directories and temporary directories that `made` says a
/// run named. What still runs in a namespace gets SIGTERM first (an agent among them then
/// detaches what it attached: its `sock_ops` program sits on the host's cgroup root), and
/// SIGKILL after 10 s. Nothing here panics, and what it says goes to a stderr that may be
/// gone (a closed terminal's).
fn sweep_runs(made: fn(&str, &[&str]) -> bool, by: &str) {
    let listed = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .map(|out| out.stdout)
        .unwrap_or_default();
    for line in String::from_utf8_lossy(&listed).lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        if !made(name, &[NETNS_PREFIX]) {
            continue;
        }
        let pids = |name: &str| -> Vec<i32> {
            let out = Command::new("ip")
                .args(["netns", "pids", name])
                .output()
                .map(|out| out.stdout)
                .unwrap_or_default();
            String::from_utf8_lossy(&out)
                .split_whitespace()
                .filter_map(|pid| pid.parse().ok())
                .collect()
        };
        let signal_all = |signal: i32| {
            for pid in pids(name) {
                // SAFETY: kill has no memory preconditions.
                unsafe { libc::kill(pid, signal) };
            }
        };
        signal_all(libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !pids(name).is_empty() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(50));
        }
        signal_all(libc::SIGKILL);
        let _ = Command::new("ip").args(["netns", "del", name]).status();
        let _ = writeln!(std::io::stderr(), "removed {name}, left by {by}");
    }
    sweep_pins(made, by);
    for entry in fs::read_dir(std::env::temp_dir())
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = entry.file_name().to_string_lossy().into_owned();
        if made(&name, &TEMP_DIR_PREFIXES) && named_by_unique(&name, &TEMP_DIR_PREFIXES) {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

/// Whether `name` is one a test run made ([`unique`]: a prefix among `prefixes`, then the
/// test process's id) and that run is gone. A pid taken again by another process keeps what
/// it names: the safe side. (Test runs share the host's pid namespace.)
pub fn of_a_killed_run(name: &str, prefixes: &[&str]) -> bool {
    maker(name, prefixes).is_some_and(|pid| !Path::new("/proc").join(pid).exists())
}

fn of_this_run(name: &str, prefixes: &[&str]) -> bool {
    maker(name, prefixes) == Some(&std::process::id().to_string())
}

/// Whether `name` is as [`unique`] makes them after one of `prefixes`: the process's id, a
/// number, and perhaps more after a `-` ([`ScratchDir`]'s). Temporary directories are
/// swept only then, /tmp holding others' files too.
fn named_by_unique(name: &str, prefixes: &[&str]) -> bool {
    let digits = |part: &str| !part.is_empty() && part.bytes().all(|byte| byte.is_ascii_digit());
    prefixes
        .iter()
        .find_map(|prefix| name.strip_prefix(prefix))
        .is_some_and(|rest| {
            let mut parts = rest.splitn(3, '-');
            parts.next().is_some_and(digits) && parts.next().is_some_and(digits)
        })
}

/// The id of the process that made `name` ([`unique`]: a prefix among `prefixes`, then it).
fn maker<'a>(name: &'a str, prefixes: &[&str]) -> Option<&'a str> {
    prefixes
        .iter()
        .find_map(|prefix| name.strip_prefix(prefix))
        .and_then(|rest| rest.split('-').next())
        .filter(|pid| !pid.is_empty() && pid.bytes().all(|byte| byte.is_ascii_digit()))
}

/// Prefixes of the tests' pin directories under /sys/fs/bpf ([`unique`] names: the test
/// process's id follows), the longer first.
const PIN_DIR_PREFIXES: [&str; 3] = ["collector-test-kept-", "collector-test-", "orphans-test-"];

/// Those of [`PIN_DIR_PREFIXES`] that name a directory of pin directories, not one
/// (orphans.rs gives each of its agents one inside a directory of its own).
const PIN_PARENT_PREFIXES: [&str; 1] = ["orphans-test-"];

/// Prefixes of the tests' temporary directories ([`AgentConfig`]'s, [`ScratchDir`]'s,
/// unbound's), the test process's id after each.
const TEMP_DIR_PREFIXES: [&str; 3] = ["collector-test-", "collector-scratch-", "unbound-"];

/// Then the pin directories of those runs: an agent killed with its run (SIGKILL, the OOM
/// killer) leaves its pins, its pinned `sock_ops` link keeping the program on the host's
/// cgroup root. `collector cleanup` takes away what is a collector's; a directory an agent
/// still runs with is locked, and left.
fn sweep_pins(made: fn(&str, &[&str]) -> bool, by: &str) {
    let Ok(entries) = fs::read_dir("/sys/fs/bpf") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !made(&name, &PIN_DIR_PREFIXES) {
            continue;
        }
        // `cleanup` looks for a layout right inside the directory it is given: a parent's
        // pins one level down would be foreign to it, and kept.
        let parent = made(&name, &PIN_PARENT_PREFIXES);
        let pin_dirs: Vec<PathBuf> = if parent {
            fs::read_dir(entry.path())
                .into_iter()
                .flatten()
                .flatten()
                .map(|pin_dir| pin_dir.path())
                .collect()
        } else {
            vec![entry.path()]
        };
        let swept = pin_dirs.iter().all(|pin_dir| {
            Command::new(COLLECTOR)
                .args(["cleanup", "--apply", "--pin-dir"])
                .arg(pin_dir)
                .output()
                .is_ok_and(|out| out.status.success())
        });
        // What cleanup leaves in a parent (a pin directory a run killed before its start
        // laid pins out) goes with it: its run is gone.
        let swept = if parent {
            fs::remove_dir_all(entry.path()).is_ok()
        } else {
            swept
        };
        if swept {
            let _ = writeln!(
                std::io::stderr(),
                "removed /sys/fs/bpf/{name}, left by {by}"
            );
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// The kernel's `tcp_info` of `stream` (`TCP_INFO`).
pub fn tcp_info(stream: &TcpStream) -> libc::tcp_info {
    // SAFETY: a zeroed tcp_info is valid, and the kernel fills at most `len` bytes of it.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = libc::socklen_t::try_from(size_of::<libc::tcp_info>()).unwrap();
    // SAFETY: as above, on the stream's own descriptor.
    let got = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &raw mut len,
        )
    };
    assert_eq!(got, 0, "{}", std::io::Error::last_os_error());
    info
}

/// A counter of `netns` from one of its /proc/net tables (`snmp`, `netstat`): `group` names
/// a header line of names (`Tcp:`, `TcpExt:`), the next line of that group holds the values.
/// A namespace's counters start at zero when it is made.
pub fn proc_net_counter(netns: &Netns, table: &'static str, group: &str, field: &str) -> u64 {
    let text = netns.run(move || fs::read_to_string(format!("/proc/thread-self/net/{table}")));
    let text = text.unwrap();
    let prefix = format!("{group}:");
    let mut lines = text.lines().filter(|line| line.starts_with(&prefix));
    let (names, values) = (lines.next().unwrap(), lines.next().unwrap());
    let at = names
        .split_whitespace()
        .position(|name| name == field)
        .unwrap_or_else(|| panic!("no {group} {field} in /proc/net/{table}"));
    values.split_whitespace().nth(at).unwrap().parse().unwrap()
}

/// TCP segments sent again in these namespaces since they were made (`RetransSegs`): a tail
/// loss probe or a timeout on a loaded machine, even on loopback.
pub fn retransmitted_segments(namespaces: &[&Netns]) -> u64 {
    namespaces
        .iter()
        .map(|netns| proc_net_counter(netns, "snmp", "Tcp", "RetransSegs"))
        .sum()
}

/// Live payload bytes, counted on the wire where a segment sent again counts again, against
/// what `connections` sent, `each` bytes apiece: exact when no segment was sent again,
/// otherwise at most one segment more per retransmission, a segment holding at most 64 KiB
/// and one connection's bytes (none when nothing was sent: a segment sent again is counted
/// again only where it was counted once). Read `retransmitted` after `live`, so that it
/// covers every retransmission `live` may hold.
#[expect(clippy::cast_precision_loss, reason = "test counts far below 2^52")]
pub fn assert_live_bytes(
    live: Option<f64>,
    (connections, each): (usize, usize),
    retransmitted: u64,
    what: &str,
) {
    let sent = (connections * each) as f64;
    let segment = each.min(65_536) as f64;
    let most = sent + retransmitted as f64 * segment;
    assert!(
        live.is_some_and(|live| live >= sent && live <= most),
        "{what}: {live:?} live payload bytes for {sent} sent, {retransmitted} segments sent again"
    );
}

/// The JSON output of a `collector` command run with the agent's config (`maps dump ...`:
/// the pins, read without the agent's HTTP side).
pub fn collector_json(config: &AgentConfig, args: &[&str]) -> serde_json::Value {
    let out = stdout_of(
        Command::new(COLLECTOR)
            .args(args)
            .arg("--config")
            .arg(&config.path)
            .arg("--json"),
    );
    serde_json::from_str(&out).unwrap_or_else(|err| panic!("{args:?}: {err}: {out}"))
}

/// Runs `command`, asserts it succeeded (showing its stderr if not) and returns its stdout.
pub fn stdout_of(command: &mut Command) -> String {
    let out = command.output().unwrap();
    assert!(
        out.status.success(),
        "{command:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `collector check --config CONFIG ARGS` in `netns`: whether it passed, and its line for
/// `name` (the second word of a line).
pub fn check_line(netns: &Netns, config: &Path, args: &[&str], name: &str) -> (bool, String) {
    check_line_of(netns.command(COLLECTOR), config, args, name)
}

/// [`check_line`] with `collector` started by `launcher` (a `PATH` of the test's own, say).
pub fn check_line_of(
    mut launcher: Command,
    config: &Path,
    args: &[&str],
    name: &str,
) -> (bool, String) {
    let out = launcher
        .args(["check", "--config"])
        .arg(config)
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find(|line| line.split_whitespace().nth(1) == Some(name))
        .unwrap_or_else(|| panic!("no {name} line:\n{stdout}"))
        .to_owned();
    (out.status.success(), line)
}

/// A veth pair, both ends up: `ours` with `our_addr` (CIDR) in `netns`, `theirs` with
/// `their_addr` in `peer`.
pub fn veth(
    netns: &Netns,
    ours: &str,
    our_addr: &str,
    peer: &Netns,
    theirs: &str,
    their_addr: &str,
) {
    run(
        "ip",
        &[
            "-n",
            &netns.name,
            "link",
            "add",
            ours,
            "type",
            "veth",
            "peer",
            "name",
            theirs,
            "netns",
            &peer.name,
        ],
    );
    run(
        "ip",
        &["-n", &netns.name, "addr", "add", our_addr, "dev", ours],
    );
    run(
        "ip",
        &["-n", &peer.name, "addr", "add", their_addr, "dev", theirs],
    );
    run("ip", &["-n", &peer.name, "link", "set", theirs, "up"]);
    run("ip", &["-n", &netns.name, "link", "set", ours, "up"]);
}

/// A config file and pin directory of the test's own.
pub struct AgentConfig {
    pub dir: PathBuf,
    pub path: PathBuf,
    pub pin_dir: PathBuf,
    /// Our nftables table, named for this test: the cleanup on drop runs in the host's
    /// namespace and must never touch a real collector's table.
    pub nft_table: String,
}

impl AgentConfig {
    /// Writes a config with `routes` (TOML `[[routes]]` tables) and a 100 ms poll interval, so
    /// that tests see counts soon.
    /// nftables counting stays at its default, "auto": off in a test's bare namespace.
    pub fn new(routes: &str) -> Self {
        Self::write(routes, "", "poll_interval_ms = 100\n")
    }

    /// As [`Self::new`], with nftables counting on.
    pub fn with_nft(routes: &str) -> Self {
        Self::write(routes, "enabled = true\n", "poll_interval_ms = 100\n")
    }

    /// As [`Self::with_nft`], polling every `ms` milliseconds.
    pub fn with_nft_polling_every(routes: &str, ms: u64) -> Self {
        Self::write(
            routes,
            "enabled = true\n",
            &format!("poll_interval_ms = {ms}\n"),
        )
    }

    /// As [`Self::new`], polling at the embedded default's interval, as deployed: for the
    /// benchmark, which measures what the agent costs as shipped.
    pub fn shipped_poll(routes: &str) -> Self {
        Self::write(routes, "", "")
    }

    /// As [`Self::shipped_poll`], with nftables counting on or off (not "auto", which a
    /// firewall in the namespace would turn on): for the benchmark of what it costs.
    pub fn shipped_poll_nft(routes: &str, enabled: bool) -> Self {
        Self::write(routes, &format!("enabled = {enabled}\n"), "")
    }

    /// As [`Self::new`], polling every `ms` milliseconds.
    pub fn polling_every(routes: &str, ms: u64) -> Self {
        Self::write(routes, "", &format!("poll_interval_ms = {ms}\n"))
    }

    fn write(routes: &str, nft: &str, poll: &str) -> Self {
        let dir = std::env::temp_dir().join(unique("collector-test"));
        fs::create_dir_all(&dir).unwrap();
        let pin_dir = PathBuf::from("/sys/fs/bpf").join(unique("collector-test"));
        let path = dir.join("collector.toml");
        let nft_table = unique("collector_test").replace('-', "_");
        fs::write(
            &path,
            format!(
                "listen = \"{LISTEN}\"\npin_dir = \"{}\"\n{poll}\n{routes}\n[nftables]\n{nft}table = \"{nft_table}\"\n",
                pin_dir.display()
            ),
        )
        .unwrap();
        Self {
            dir,
            path,
            pin_dir,
            nft_table,
        }
    }
}

impl Drop for AgentConfig {
    fn drop(&mut self) {
        // Whatever happened to the agent, leave nothing in bpffs.
        let _ = Command::new(COLLECTOR)
            .args(["cleanup", "--apply", "--config"])
            .arg(&self.path)
            .output();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// The agent running inside a namespace; SIGTERM on drop.
pub struct Agent {
    child: Option<Child>,
    pub netns_name: String,
    /// Its pin directory: the config's, or `--pin-dir`'s.
    pin_dir: PathBuf,
}

impl Agent {
    /// Starts `collector run --config` inside `netns` and waits until it is ready.
    pub fn start(netns: &Netns, config: &AgentConfig) -> Self {
        Self::start_with(netns, config, &[])
    }

    pub fn start_with(netns: &Netns, config: &AgentConfig, extra: &[&str]) -> Self {
        Self::spawn(netns, netns.command(COLLECTOR), config, extra)
    }

    /// Starts the agent with `launcher` (e.g. [`Netns::ip_netns_exec`]) and waits until ready.
    pub fn spawn(netns: &Netns, launcher: Command, config: &AgentConfig, extra: &[&str]) -> Self {
        Self::spawn_until(netns, launcher, config, extra, || {
            matches!(
                netns.run(|| get("/readyz").map(|(status, _)| status)),
                Ok(200)
            )
        })
    }

    /// Starts the agent and waits until `ready` says so (e.g. over HTTPS).
    pub fn spawn_until(
        netns: &Netns,
        launcher: Command,
        config: &AgentConfig,
        extra: &[&str],
        ready: impl Fn() -> bool,
    ) -> Self {
        Self::spawn_logging_until(netns, launcher, config, extra, Stdio::inherit(), ready)
    }

    /// As [`Self::start_with`], its log (stderr) written to `log`, for tests that read it.
    pub fn start_logging(netns: &Netns, config: &AgentConfig, extra: &[&str], log: &Path) -> Self {
        Self::spawn_logging(netns, netns.command(COLLECTOR), config, extra, log)
    }

    /// As [`Self::start_logging`], started with `launcher` (e.g. one that sets limits).
    pub fn spawn_logging(
        netns: &Netns,
        launcher: Command,
        config: &AgentConfig,
        extra: &[&str],
        log: &Path,
    ) -> Self {
        let file = fs::File::create(log).unwrap();
        Self::spawn_logging_until(netns, launcher, config, extra, file.into(), || {
            matches!(
                netns.run(|| get("/readyz").map(|(status, _)| status)),
                Ok(200)
            )
        })
    }

    fn spawn_logging_until(
        netns: &Netns,
        mut launcher: Command,
        config: &AgentConfig,
        extra: &[&str],
        stderr: Stdio,
        ready: impl Fn() -> bool,
    ) -> Self {
        halt_if_stopping();
        let child = launcher
            .args(["run", "--config"])
            .arg(&config.path)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap();
        let pin_dir = extra
            .iter()
            .enumerate()
            .find_map(|(at, arg)| match arg.strip_prefix("--pin-dir") {
                Some("") => extra.get(at + 1).copied(),
                Some(value) => value.strip_prefix('='),
                None => None,
            })
            .map_or_else(|| config.pin_dir.clone(), PathBuf::from);
        let mut agent = Self {
            child: Some(child),
            netns_name: netns.name.clone(),
            pin_dir,
        };
        let deadline = Instant::now() + Duration::from_mins(1);
        loop {
            if let Some(status) = agent.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("the agent exited before it was ready: {status}");
            }
            if ready() {
                return agent;
            }
            assert!(
                Instant::now() < deadline,
                "the agent was not ready within a minute"
            );
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Sends `signal` to the agent.
    pub fn signal(&self, signal: libc::c_int) {
        if let Some(child) = &self.child {
            signal_child(child, signal);
        }
    }

    /// SIGTERM and wait: returns the exit status. Panics if the agent has not exited
    /// [`STOP_TIMEOUT`] later (it is killed then), so a stop that hangs fails its test
    /// instead of the whole run.
    ///
    /// A clean stop (status 0) must have removed its pins: every test that stops an agent
    /// checks that much.
    pub fn stop(self) -> std::process::ExitStatus {
        // This build's pin layout (`paths::PIN_LAYOUT_VERSION`); other layouts' directories,
        // which some tests leave there, are not the agent's to remove.
        let layout = self.pin_dir.join("v1");
        let status = self
            .stop_within(libc::SIGTERM, STOP_TIMEOUT)
            .unwrap_or_else(|| {
                panic!("the agent was still running {STOP_TIMEOUT:?} after SIGTERM (killed)")
            });
        if status.success() {
            assert!(
                !layout.exists(),
                "a clean stop left pins: {:?}",
                fs::read_dir(&layout).map(|d| d.flatten().map(|e| e.path()).collect::<Vec<_>>())
            );
        }
        status
    }

    /// `signal`, then waits up to `timeout` for the agent to exit: its exit status, or
    /// `None` if it was still running (then it is killed).
    pub fn stop_within(
        mut self,
        signal: libc::c_int,
        timeout: Duration,
    ) -> Option<std::process::ExitStatus> {
        end_child(&mut self.child.take().unwrap(), signal, timeout)
    }

    /// The agent's process id (`nsenter` and `ip netns exec` exec it).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// SIGSTOP or SIGCONT: a stalled agent (its readers stop, the kernel keeps counting).
    pub fn pause(&self, paused: bool) {
        self.signal(if paused { libc::SIGSTOP } else { libc::SIGCONT });
    }

    /// SIGKILL, as a crash would: nothing gets cleaned up.
    pub fn kill(mut self) {
        self.signal(libc::SIGKILL);
        self.child.take().unwrap().wait().unwrap();
    }
}

/// `nsenter` and `ip netns exec` exec the program, so the child's pid is the agent's.
fn signal_child(child: &Child, signal: libc::c_int) {
    let pid = libc::pid_t::try_from(child.id()).unwrap();
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(pid, signal) };
}

/// How long a stop may take before the agent is killed: its own stop waits at most 5 s for
/// HTTP requests, then detaches.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// Sends `signal` (after SIGCONT, so that a paused child takes it) and waits up to `timeout`
/// for the child to exit: its exit status, or `None` if it was still running (then it is
/// killed).
fn end_child(
    child: &mut Child,
    signal: libc::c_int,
    timeout: Duration,
) -> Option<std::process::ExitStatus> {
    signal_child(child, libc::SIGCONT);
    signal_child(child, signal);
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

impl Drop for Agent {
    fn drop(&mut self) {
        // A test that failed while the agent was paused must not hang the run on it.
        if let Some(mut child) = self.child.take() {
            end_child(&mut child, libc::SIGTERM, STOP_TIMEOUT);
        }
    }
}

/// A child process killed and reaped on drop, should a test fail while it runs.
pub struct Reaped(Child);

impl Reaped {
    pub fn spawn(command: &mut Command) -> Self {
        Self(command.spawn().unwrap())
    }

    pub fn signal(&self, signal: libc::c_int) {
        signal_child(&self.0, signal);
    }

    /// Its exit status, once it has exited.
    pub fn wait(&mut self) -> std::process::ExitStatus {
        self.0.wait().unwrap()
    }

    /// Its exit status, if it has exited.
    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.0.try_wait().unwrap()
    }

    /// Its standard input, if piped and not taken yet.
    pub fn stdin(&mut self) -> Option<std::process::ChildStdin> {
        self.0.stdin.take()
    }

    /// Its standard output, if piped and not taken yet.
    pub fn stdout(&mut self) -> Option<std::process::ChildStdout> {
        self.0.stdout.take()
    }

    /// Its standard error, if piped and not taken yet.
    pub fn stderr(&mut self) -> Option<std::process::ChildStderr> {
        self.0.stderr.take()
    }

    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `collector run --config config` in `netns`, expecting it to refuse: fails the test
/// if it exits successfully or is still running after 20 s (then it is killed, so that a
/// start that was wrongly let through cannot hang the test). Returns its stderr.
pub fn refused_start(netns: &Netns, config: &Path) -> String {
    refused_start_with(netns, config, &[])
}

/// [`refused_start`] with `args` after `run`.
pub fn refused_start_with(netns: &Netns, config: &Path, args: &[&str]) -> String {
    let out = output_within(
        netns
            .command(COLLECTOR)
            .arg("run")
            .args(args)
            .arg("--config")
            .arg(config),
        Duration::from_secs(20),
    );
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "the start was not refused: {stderr}");
    stderr
}

/// Runs `command` to its end, its output captured; fails the test, the process killed, if
/// it runs past `limit` (a start that stopped refusing would run on).
pub fn output_within(command: &mut Command, limit: Duration) -> std::process::Output {
    let mut child = Reaped::spawn(command.stdout(Stdio::piped()).stderr(Stdio::piped()));
    // Read while it runs: a pipe left full would stop it.
    let drain = |pipe: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut pipe) = pipe {
                pipe.read_to_end(&mut bytes).unwrap();
            }
            bytes
        })
    };
    let stdout = drain(child.stdout().map(|pipe| Box::new(pipe) as Box<_>));
    let stderr = drain(child.stderr().map(|pipe| Box::new(pipe) as Box<_>));
    let status = wait_for("the command to exit", limit, || child.try_wait());
    std::process::Output {
        status,
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    }
}

/// GET `path` from the agent (call from inside the namespace). Returns status and body.
pub fn get(path: &str) -> std::io::Result<(u16, String)> {
    get_from(LISTEN, path)
}

/// As [`get`], from an agent listening on `address`.
pub fn get_from(address: &str, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect(address)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: collector\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// `/metrics` of the agent in `netns`.
pub fn scrape(netns: &Netns) -> String {
    let (status, body) = netns.run(|| get("/metrics")).unwrap();
    assert_eq!(status, 200, "{body}");
    body
}

/// Waits until `n` more polls of the agent in `netns` have finished, and returns the scrape
/// after them: what a poll would count late is in it.
pub fn after_polls(netns: &Netns, n: u32) -> String {
    let polls = |metrics: &str| sample(metrics, "collector_polls_total", &[]).unwrap();
    let after = polls(&scrape(netns)) + f64::from(n);
    wait_for("more polls", Duration::from_secs(15), || {
        let metrics = scrape(netns);
        (polls(&metrics) >= after).then_some(metrics)
    })
}

/// `/api/v1/proxy` of the agent in `netns`.
pub fn proxy_json(netns: &Netns) -> serde_json::Value {
    let (status, body) = netns.run(|| get("/api/v1/proxy")).unwrap();
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// `/api/v1/proxy` from the first snapshot that counts `total` connections.
pub fn proxy_json_counting(netns: &Netns, total: usize) -> serde_json::Value {
    wait_for(
        &format!("a snapshot with {total} connections"),
        Duration::from_secs(10),
        || {
            let json = proxy_json(netns);
            (json["totalConnections"] == total).then_some(json)
        },
    )
}

/// `/api/v1/dns` of the agent in `netns`.
pub fn dns_json(netns: &Netns) -> serde_json::Value {
    let (status, body) = netns.run(|| get("/api/v1/dns")).unwrap();
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// The value of the sample `name{labels}` in `OpenMetrics` text, labels given as
/// `key="value"` pairs in the order the agent writes them.
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let label_text: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    let prefix = if labels.is_empty() {
        format!("{name} ")
    } else {
        format!("{name}{{{}}} ", label_text.join(","))
    };
    text.lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .and_then(|value| value.split_whitespace().next())
        .and_then(|value| value.parse().ok())
}

/// Polls `probe` until it returns `Some`, or panics with `what` after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = probe() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until `/metrics` shows `closed` closed connections on `route`, and shows them still
/// two polls later (a count that a later poll would raise, counted twice or carried over
/// from a crashed run, is not taken for the right one); returns that later scrape.
pub fn wait_for_closed(netns: &Netns, route: &str, closed: u32) -> String {
    let closed_in = |metrics: &str| {
        sample(
            metrics,
            "collector_proxy_connections_closed_total",
            &[("route", route)],
        )
    };
    wait_for(
        &format!("{closed} closed connections on {route}"),
        Duration::from_secs(10),
        || (closed_in(&scrape(netns)) == Some(f64::from(closed))).then_some(()),
    );
    let later = after_polls(netns, 2);
    assert_eq!(
        closed_in(&later),
        Some(f64::from(closed)),
        "closed connections on {route} two polls later"
    );
    later
}

/// A directory removed with everything in it when dropped: what a test made goes, even when
/// the test fails (pins removed detach their links).
pub struct RemovedOnDrop(pub PathBuf);

impl Drop for RemovedOnDrop {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// `ss`'s line for the agent's end of its connection from `client` (the agent listening on
/// [`LISTEN`]), in any state: `State Recv-Q Send-Q Local Peer`, then the process holding it
/// (`users:`) once the agent has accepted it and while it holds it; empty once it is gone.
pub fn agents_end(netns: &Netns, client: std::net::SocketAddr) -> String {
    let listen: std::net::SocketAddr = LISTEN.parse().unwrap();
    stdout_of(netns.command("ss").args([
        "-tanpH",
        &format!(
            "( sport = :{} and dport = :{} )",
            listen.port(),
            client.port()
        ),
    ]))
}

/// Milliseconds since the epoch, as the JSON's and the stream's `timestamp` count them.
pub fn wall_ms() -> u64 {
    let since_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    u64::try_from(since_epoch.as_millis()).unwrap()
}

/// Loads the classifiers `names` of the kernel object `ebpf` into the kernel, for
/// `BPF_PROG_TEST_RUN`, with random keys for the DNS name hash as the agent gives it (with
/// the table's zeros every name hashes alike).
pub fn load_classifiers(ebpf: &mut aya::Ebpf, names: &[&str]) {
    let mut random = [0u8; collector_common::DNS_NAME_KEY_BYTES];
    fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut random)
        .unwrap();
    set_dns_name_keys(ebpf, &random);
    for &name in names {
        let program: &mut aya::programs::SchedClassifier =
            ebpf.program_mut(name).unwrap().try_into().unwrap();
        program.load().unwrap();
    }
}

/// Sets the keys of the DNS name hash to those `bytes` make.
pub fn set_dns_name_keys(ebpf: &mut aya::Ebpf, bytes: &[u8; collector_common::DNS_NAME_KEY_BYTES]) {
    use collector_common::{DnsNameKeys, map_names};
    let mut keys: aya::maps::Array<_, DnsNameKeys> =
        aya::maps::Array::try_from(ebpf.map_mut(map_names::DNS_NAME_KEYS).unwrap()).unwrap();
    keys.set(0, DnsNameKeys::from_random(bytes), 0).unwrap();
}

/// Runs its function when dropped: tells a test's threads to stop, also when the test fails.
pub struct OnDrop<F: FnMut()>(pub F);

impl<F: FnMut()> Drop for OnDrop<F> {
    fn drop(&mut self) {
        (self.0)();
    }
}

/// The lines of the agent's `log` that hold `needle`, once there is one: lines logged after
/// the start go through the agent's log writer thread, which may write them after
/// `/readyz` answers.
pub fn logged_lines(log: &Path, needle: &str) -> Vec<String> {
    wait_for(
        &format!("{needle:?} in {}", log.display()),
        Duration::from_secs(10),
        || {
            let text = fs::read_to_string(log).unwrap_or_default();
            let lines: Vec<String> = text
                .lines()
                .filter(|line| line.contains(needle))
                .map(str::to_owned)
                .collect();
            (!lines.is_empty()).then_some(lines)
        },
    )
}

/// The one "collector running" line of an agent's log.
pub fn running_line(log: &Path) -> String {
    let lines = logged_lines(log, "collector running");
    assert_eq!(lines.len(), 1, "{lines:?}");
    lines[0].clone()
}

/// Nothing of ours is left in bpffs under `pin_dir`.
pub fn assert_no_pins(pin_dir: &Path) {
    assert!(
        !pin_dir.exists(),
        "pins left behind: {:?}",
        fs::read_dir(pin_dir).map(|d| d.flatten().map(|e| e.path()).collect::<Vec<_>>())
    );
}

/// Creates an array map of `entries` values of `value_size` bytes, without flags, and pins
/// it at `path`: what a build from before a map became memory-mappable left pinned.
pub fn pin_plain_array(path: &std::path::Path, value_size: u32, entries: u32) {
    pin_plain_array_holding(path, value_size, entries, &[]);
}

/// As [`pin_plain_array`], with `values` written at their indexes (each `value_size` bytes).
pub fn pin_plain_array_holding(
    path: &std::path::Path,
    value_size: u32,
    entries: u32,
    values: &[(u32, &[u8])],
) {
    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
    const BPF_OBJ_PIN: libc::c_long = 6;
    const BPF_MAP_TYPE_ARRAY: u32 = 2;
    // `union bpf_attr` for BPF_MAP_CREATE: type, key size, value size, entries, flags.
    let mut create = [BPF_MAP_TYPE_ARRAY, 4, value_size, entries, 0, 0, 0, 0];
    // SAFETY: a bpf_attr prefix of the size passed; the kernel zero-extends the rest.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_CREATE,
            create.as_mut_ptr(),
            size_of_val(&create),
        )
    };
    assert!(
        fd >= 0,
        "BPF_MAP_CREATE: {}",
        std::io::Error::last_os_error()
    );
    for (index, value) in values {
        assert_eq!(value.len(), value_size as usize);
        // `union bpf_attr` for BPF_MAP_UPDATE_ELEM: map fd (and padding), key and value
        // pointers, flags.
        let mut update = [
            u64::try_from(fd).unwrap(),
            std::ptr::from_ref(index) as u64,
            value.as_ptr() as u64,
            0,
        ];
        // SAFETY: a bpf_attr prefix of the size passed; key and value outlive the call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_UPDATE_ELEM,
                update.as_mut_ptr(),
                size_of_val(&update),
            )
        };
        assert_eq!(
            rc,
            0,
            "BPF_MAP_UPDATE_ELEM: {}",
            std::io::Error::last_os_error()
        );
    }
    let path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // `union bpf_attr` for BPF_OBJ_PIN: path pointer, fd, flags.
    let mut pin = [path.as_ptr() as u64, u64::try_from(fd).unwrap()];
    // SAFETY: as above; `path` outlives the call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_PIN, pin.as_mut_ptr(), 16) };
    assert_eq!(rc, 0, "BPF_OBJ_PIN: {}", std::io::Error::last_os_error());
    // SAFETY: our fd; the pin keeps the map.
    unsafe { libc::close(i32::try_from(fd).unwrap()) };
}

/// Who closes a test connection first: each order takes both sockets through other TCP
/// states, and the byte counts must be exact in both.
#[derive(Clone, Copy)]
pub enum Closer {
    Connecting,
    Accepting,
}

/// The accepting side, per connection: reads exactly `request` bytes, writes `response`
/// bytes, then closes, first or after the connecting side's FIN.
pub fn serve_exchanges(
    listener: &std::net::TcpListener,
    request: usize,
    response: usize,
    closer: Closer,
    connections: usize,
) {
    for _ in 0..connections {
        let (mut stream, _) = listener.accept().unwrap();
        let mut buf = vec![0; request];
        stream.read_exact(&mut buf).unwrap();
        stream.write_all(&vec![b'r'; response]).unwrap();
        if let Closer::Connecting = closer {
            let mut rest = Vec::new();
            stream.read_to_end(&mut rest).unwrap();
            assert!(rest.is_empty());
        }
    }
}

/// The connecting side of one exchange with `address`: sends `request` bytes, reads
/// `response` bytes, closes (after the accepting side's FIN if it closes first).
pub fn exchange(address: std::net::SocketAddr, request: usize, response: usize, closer: Closer) {
    let mut stream = TcpStream::connect(address).unwrap();
    stream.write_all(&vec![b'q'; request]).unwrap();
    read_response_and_close(stream, response, closer);
}

/// The end of a connecting side's exchange: reads `response` bytes, then closes (after the
/// accepting side's FIN, and nothing more, if that side closes first).
pub fn read_response_and_close(mut stream: TcpStream, response: usize, closer: Closer) {
    let mut buf = vec![0; response];
    stream.read_exact(&mut buf).unwrap();
    if let Closer::Accepting = closer {
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
    }
}

/// `count` exchanges with a server on `address`, both inside `netns`.
pub fn exchanges(
    netns: &Netns,
    address: std::net::SocketAddr,
    count: usize,
    request: usize,
    response: usize,
    closer: Closer,
) {
    let listener = netns.run(move || std::net::TcpListener::bind(address).unwrap());
    let server =
        thread::spawn(move || serve_exchanges(&listener, request, response, closer, count));
    netns.run(move || {
        for _ in 0..count {
            exchange(address, request, response, closer);
        }
    });
    server.join().unwrap();
}

/// `count` connections to port 18080 in `netns`, each sending 3 bytes and reading 5.
pub fn connections_3_in_5_out(netns: &Netns, count: usize) {
    let listener = netns.run(|| std::net::TcpListener::bind("127.0.0.1:18080").unwrap());
    let server = thread::spawn(move || {
        for _ in 0..count {
            let (mut stream, _) = listener.accept().unwrap();
            let mut buf = [0u8; 3];
            stream.read_exact(&mut buf).unwrap();
            stream.write_all(b"12345").unwrap();
        }
    });
    netns.run(move || {
        for _ in 0..count {
            let mut stream = TcpStream::connect("127.0.0.1:18080").unwrap();
            stream.write_all(b"abc").unwrap();
            let mut buf = Vec::new();
            stream.read_to_end(&mut buf).unwrap();
            assert_eq!(buf, b"12345");
        }
    });
    server.join().unwrap();
}

/// The agent's pinned connection table.
pub fn connection_table(
    config: &AgentConfig,
) -> aya::maps::Array<aya::maps::MapData, collector_common::ConnState> {
    let pin = config
        .pin_dir
        .join("v1")
        .join(collector_common::map_names::CONN_STATE);
    aya::maps::Array::try_from(aya::maps::Map::Array(
        aya::maps::MapData::from_pin(&pin).unwrap(),
    ))
    .unwrap()
}

/// Gives every slot of the agent's pinned connection table to a socket that does not exist
/// (`full`), in a slot of no route, or frees every slot again.
pub fn fill_connection_table(config: &AgentConfig, full: bool) {
    use collector_common::{ConnState, MAX_ROUTES};
    let mut table = connection_table(config);
    for slot in 0..table.len() {
        let entry = ConnState {
            // Far from any real cookie, which count up from 1.
            cookie: if full { (1 << 63) | u64::from(slot) } else { 0 },
            route: if full { MAX_ROUTES } else { 0 },
            ..ConnState::default()
        };
        table.set(slot, entry, 0).unwrap();
    }
}

/// `count` connections to `listener` from inside `netns`, held open: (the connecting ends,
/// the accepted ends, which time out reads after 10 s).
pub fn hold_open(
    netns: &Netns,
    listener: &std::net::TcpListener,
    count: usize,
) -> (Vec<TcpStream>, Vec<TcpStream>) {
    let address = listener.local_addr().unwrap();
    let connected = netns.run(move || {
        (0..count)
            .map(|_| TcpStream::connect(address).unwrap())
            .collect::<Vec<_>>()
    });
    let accepted = (0..count)
        .map(|_| {
            let stream = listener.accept().unwrap().0;
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            stream
        })
        .collect();
    (connected, accepted)
}

/// Keeps the calling thread on the CPU it runs on, so that the kernel handles its packets
/// there (on loopback a packet is received on its sender's CPU): one CPU's slots of the
/// kernel's per-CPU tables.
pub fn stay_on_this_cpu() {
    // SAFETY: sched_getcpu has no preconditions; a zeroed cpu_set_t is a valid empty set,
    // which sched_setaffinity only reads.
    unsafe {
        let cpu = usize::try_from(libc::sched_getcpu()).unwrap();
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &raw const set),
            0
        );
    }
}

/// A tun device named `name` in `netns` (no packet information before each packet: they
/// begin at the IP header), gone when the file is closed unless made persistent before.
pub fn open_tun(netns: &Netns, name: &'static str) -> fs::File {
    open_tun_with(netns, name, libc::IFF_TUN | libc::IFF_NO_PI)
}

/// A tun or tap device named `name` in `netns`, made with the `TUNSETIFF` `flags`.
pub fn open_tun_with(netns: &Netns, name: &'static str, flags: libc::c_int) -> fs::File {
    netns.run(move || {
        use std::os::fd::AsRawFd as _;
        let tun = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .unwrap();
        // `struct ifreq`: the name, then the flags.
        let mut request = [0u8; 40];
        request[..name.len()].copy_from_slice(name.as_bytes());
        let flags = i16::try_from(flags).unwrap();
        request[16..18].copy_from_slice(&flags.to_ne_bytes());
        // SAFETY: TUNSETIFF reads and writes a `struct ifreq`, which `request` is.
        let made = unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, request.as_mut_ptr()) };
        assert_eq!(made, 0, "{}", std::io::Error::last_os_error());
        tun
    })
}

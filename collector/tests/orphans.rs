//! Pins left by a collector whose network namespace is gone (a sidecar's pod deleted, or
//! its namespace made anew, while the collector was down): a start removes them, in its own
//! pin directory and beside it, and leaves those of a crashed collector whose namespace is
//! still there.
//!
//! A start looks at the pin directories beside its own (`collector`, `collector-*`). Each
//! test here puts its pin directories in a bpffs directory of its own, so that only its own
//! agents look at them: the other tests' agents start beside /sys/fs/bpf/collector-test-*,
//! and one of them could otherwise remove this test's pins while it waits for a namespace to
//! go, which is what the test is about.

mod support;

use std::{
    net::UdpSocket,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use support::{
    Agent, AgentConfig, COLLECTOR, Netns, ScratchDir, assert_no_pins, sample, scrape, wait_for,
    wait_for_closed,
};

const ROUTES: &str = "[[routes]]\nname = \"web\"\nports = [18080]\ntype = \"http\"\n";

/// A bpffs directory of the test's own for its pin directories; on drop, each one's pins
/// are removed with `collector cleanup --apply`, then the directory.
struct PinParent {
    dir: PathBuf,
    config: PathBuf,
}

impl PinParent {
    fn new(config: &AgentConfig) -> Self {
        let dir = PathBuf::from("/sys/fs/bpf").join(support::unique("orphans-test"));
        std::fs::create_dir(&dir).unwrap();
        Self {
            dir,
            config: config.path.clone(),
        }
    }

    fn pin_dir(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

impl Drop for PinParent {
    fn drop(&mut self) {
        for entry in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            let _ = Command::new(COLLECTOR)
                .args(["cleanup", "--apply", "--config"])
                .arg(&self.config)
                .arg("--pin-dir")
                .arg(entry.path())
                .output();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The cookie of `netns` (`SO_NETNS_COOKIE`), which the agent records in `PIN_OWNER`.
fn netns_cookie(netns: &Netns) -> u64 {
    netns.run(|| {
        let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
        let mut cookie = 0u64;
        let mut len = libc::socklen_t::try_from(size_of::<u64>()).unwrap();
        // SAFETY: a valid fd, and `cookie` and `len` writable for the size stated.
        let rc = unsafe {
            libc::getsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                71, // SO_NETNS_COOKIE
                (&raw mut cookie).cast(),
                &raw mut len,
            )
        };
        assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
        cookie
    })
}

/// `bpf(2)` with `attr` as its `union bpf_attr` prefix: the result, or the error.
fn bpf(command: libc::c_long, attr: &mut [u64]) -> std::io::Result<i64> {
    // SAFETY: `attr` is valid for the size passed; pointers in it outlive the call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, command, attr.as_mut_ptr(), size_of_val(attr)) };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Opens the BPF object pinned at `path` (`BPF_OBJ_GET`).
fn open_pinned(path: &Path) -> OwnedFd {
    let name = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    let fd = bpf(7, &mut [name.as_ptr() as u64, 0, 0])
        .unwrap_or_else(|err| panic!("opening {}: {err}", path.display()));
    // SAFETY: a new fd that nothing else owns.
    unsafe { OwnedFd::from_raw_fd(i32::try_from(fd).unwrap()) }
}

/// The u64 at index 0 of the array map pinned at `path` (`PIN_OWNER`).
fn pinned_u64(path: &Path) -> u64 {
    let map = open_pinned(path);
    let (key, mut value) = (0u32, 0u64);
    // BPF_MAP_LOOKUP_ELEM: map fd, key pointer, value pointer, flags.
    bpf(
        1,
        &mut [
            u64::try_from(map.as_raw_fd()).unwrap(),
            (&raw const key) as u64,
            (&raw mut value) as u64,
            0,
        ],
    )
    .unwrap();
    value
}

/// The link pinned at `path`: its type, id and, for a TCX link, interface index
/// (`BPF_OBJ_GET_INFO_BY_FD` into `struct bpf_link_info`).
fn link_info(path: &Path) -> (u32, u32, u32) {
    let link = open_pinned(path);
    let mut info = [0u32; 6];
    bpf(
        15,
        &mut [
            u64::try_from(link.as_raw_fd()).unwrap() | (24 << 32),
            info.as_mut_ptr() as u64,
        ],
    )
    .unwrap();
    (info[0], info[1], info[4])
}

/// Whether a link with this id still exists (`BPF_LINK_GET_FD_BY_ID`).
fn link_exists(id: u32) -> bool {
    match bpf(30, &mut [u64::from(id)]) {
        Ok(fd) => {
            // SAFETY: a new fd that nothing else owns.
            drop(unsafe { OwnedFd::from_raw_fd(i32::try_from(fd).unwrap()) });
            true
        }
        Err(err) if err.raw_os_error() == Some(libc::ENOENT) => false,
        Err(err) => panic!("BPF_LINK_GET_FD_BY_ID {id}: {err}"),
    }
}

/// The interface index each tc link pinned under `pin_dir` reads (0: its device is gone).
fn tc_link_ifindexes(pin_dir: &Path) -> Vec<u32> {
    let links = pin_dir.join("v1/links");
    let mut ifindexes = Vec::new();
    for entry in std::fs::read_dir(&links).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap();
        if name.starts_with("tc_") {
            let (link_type, _, ifindex) = link_info(&path);
            assert_eq!(link_type, 11, "{name} is not a TCX link");
            ifindexes.push(ifindex);
        }
    }
    ifindexes
}

/// Waits until every tc link under `pin_dir` reads interface index 0: the kernel tears a
/// deleted namespace down asynchronously, its devices with it.
fn wait_until_devices_gone(pin_dir: &Path) {
    wait_for(
        "the deleted namespace's devices to go",
        Duration::from_mins(1),
        || {
            let ifindexes = tc_link_ifindexes(pin_dir);
            (!ifindexes.is_empty() && ifindexes.iter().all(|&ifindex| ifindex == 0)).then_some(())
        },
    );
}

/// Starts a collector in `netns` with `pin_dir`, counts 3 connections and kills it (its
/// pins stay, its links counting on): the id of its `sock_ops` link (on the host's cgroup2
/// root) and its namespace's cookie.
fn crashed_collector(config: &AgentConfig, pin_dir: &Path, netns: &Netns) -> (u32, u64) {
    let agent = Agent::start_with(netns, config, &["--pin-dir", pin_dir.to_str().unwrap()]);
    support::connections_3_in_5_out(netns, 3);
    wait_for_closed(netns, "web", 3);
    let owner = pinned_u64(&pin_dir.join("v1/PIN_OWNER"));
    assert_eq!(owner, netns_cookie(netns));
    let ifindexes = tc_link_ifindexes(pin_dir);
    assert!(
        !ifindexes.is_empty() && ifindexes.iter().all(|&ifindex| ifindex != 0),
        "{ifindexes:?}"
    );
    let (_, sock_ops, _) = link_info(&pin_dir.join("v1/links/sock_ops"));
    // Loopback's link was made first (link ids rise): a start killed before it leaves no
    // `sock_ops` link without the link that tells whether its namespace is gone.
    let (_, loopback, _) = link_info(&pin_dir.join("v1/links/tc_loopback_1"));
    assert!(
        loopback < sock_ops,
        "loopback link {loopback}, sock_ops {sock_ops}"
    );
    agent.kill();
    (sock_ops, owner)
}

/// The lines of `log` with `needle`.
fn lines_with(log: &Path, needle: &str) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap()
        .lines()
        .filter(|line| line.contains(needle))
        .map(str::to_owned)
        .collect()
}

fn opened(netns: &Netns) -> Option<f64> {
    sample(
        &scrape(netns),
        "collector_proxy_connections_opened_total",
        &[("route", "web")],
    )
}

/// A collector with `pin_dir` killed in a namespace that is then deleted, once its links
/// read their devices gone: its `sock_ops` link id and its namespace's cookie.
fn crashed_in_a_namespace_gone(config: &AgentConfig, pin_dir: &Path) -> (u32, u64) {
    let gone = Netns::new();
    let crashed = crashed_collector(config, pin_dir, &gone);
    drop(gone);
    wait_until_devices_gone(pin_dir);
    crashed
}

/// A collector with `pin_dir` killed once its maps are pinned, before it attached anything
/// (its verifier time), in a namespace that is then deleted.
fn killed_while_loading_in_a_namespace_gone(config: &AgentConfig, pin_dir: &Path) {
    let owner = pin_dir.join("v1/PIN_OWNER");
    let gone = Netns::new();
    let mut killed = support::Reaped::spawn(
        gone.command(COLLECTOR)
            .args(["run", "--config"])
            .arg(&config.path)
            .arg("--pin-dir")
            .arg(pin_dir)
            .stderr(std::process::Stdio::null()),
    );
    wait_for("its maps to be pinned", Duration::from_secs(30), || {
        owner.exists().then_some(())
    });
    killed.signal(libc::SIGKILL);
    killed.wait();
    let linked = std::fs::read_dir(pin_dir.join("v1/links")).map_or(0, Iterator::count);
    assert_eq!(
        linked, 0,
        "killed after its first link: not the case tested"
    );
    assert_eq!(pinned_u64(&owner), 0, "claimed: not the case tested");
}

/// The one warning in `log` that the pins under `dir`, of the namespace `owner`, were
/// removed as orphaned.
fn warned_once_of(log: &Path, dir: &Path, owner: u64) -> String {
    let warned = lines_with(log, "whose network namespace is gone");
    assert!(
        warned.len() == 1
            && warned[0].contains(" WARN ")
            && warned[0].contains(dir.to_str().unwrap())
            && warned[0].contains(&format!("cookie {owner}")),
        "{warned:?}"
    );
    warned[0].clone()
}

/// A collector in `netns` with `pin_dir`, its log written to `log`.
fn start_with_pins(netns: &Netns, config: &AgentConfig, pin_dir: &Path, log: &Path) -> Agent {
    Agent::start_logging(
        netns,
        config,
        &["--pin-dir", pin_dir.to_str().unwrap()],
        log,
    )
}

/// Two connections in `netns` count exactly (from zero: nothing of the pins' past), then
/// `agent` stops cleanly and leaves nothing under `pin_dir`.
fn counts_two_exactly_then_stops(netns: &Netns, agent: Agent, pin_dir: &Path) {
    support::connections_3_in_5_out(netns, 2);
    let metrics = wait_for_closed(netns, "web", 2);
    assert_eq!(
        sample(
            &metrics,
            "collector_proxy_connections_opened_total",
            &[("route", "web")]
        ),
        Some(2.0)
    );
    assert!(agent.stop().success());
    assert_no_pins(pin_dir);
}

/// Waits until the gone namespace's `sock_ops` link (by id) is off the cgroup root.
fn wait_released(sock_ops: u32) {
    wait_for(
        "the gone namespace's sock_ops link to be released",
        Duration::from_secs(10),
        || (!link_exists(sock_ops)).then_some(()),
    );
}

#[test]
fn a_start_over_pins_whose_namespace_is_gone_removes_them_and_counts_from_zero() {
    // A sidecar crashed, and its pod's namespace was made anew: same pod UID, same pin
    // directory. Until now, refused at every start as another namespace's pins.
    let config = AgentConfig::new(ROUTES);
    let pins = PinParent::new(&config);
    let pin_dir = pins.pin_dir("collector-pod");
    let logs = ScratchDir::new("orphans-same");
    let (sock_ops, old_owner) = crashed_in_a_namespace_gone(&config, &pin_dir);

    let again = Netns::new();
    // `collector check` says what the start will do.
    let (passed, line) = support::check_line(
        &again,
        &config.path,
        &["--pin-dir", pin_dir.to_str().unwrap()],
        "pin_dir",
    );
    assert!(
        passed
            && line.starts_with("warn")
            && line.contains(&format!(
                "left by a collector whose network namespace is gone (cookie {old_owner})"
            )),
        "{line}"
    );
    let log = logs.path("again.log");
    let agent = start_with_pins(&again, &config, &pin_dir, &log);
    let warned = warned_once_of(&log, &pin_dir, old_owner);
    assert!(warned.contains("counters start from zero"), "{warned}");
    assert!(support::running_line(&log).contains("inherited=false"));
    // Fresh pins, this namespace's, and the gone one's sock_ops program off the cgroup root.
    assert_eq!(
        pinned_u64(&pin_dir.join("v1/PIN_OWNER")),
        netns_cookie(&again)
    );
    wait_released(sock_ops);
    assert_eq!(opened(&again), Some(0.0));
    counts_two_exactly_then_stops(&again, agent, &pin_dir);
}

/// A start killed while its programs load (seconds of verifier time: an OOM kill, a
/// SIGKILL at the end of a pod's grace period) has pinned its maps and no link yet. Those
/// pins are marked as no namespace's, so the pod's next namespace takes them over: marked as
/// the killed start's, they were judged by no reaper (it looks for a loopback link whose
/// device is gone) and refused every later start as another namespace's.
#[test]
fn a_start_killed_while_its_programs_load_leaves_pins_the_next_namespace_takes_over() {
    let config = AgentConfig::new(ROUTES);
    let pins = PinParent::new(&config);
    let pin_dir = pins.pin_dir("collector-pod");
    let owner = pin_dir.join("v1/PIN_OWNER");
    killed_while_loading_in_a_namespace_gone(&config, &pin_dir);

    let again = Netns::new();
    let logs = ScratchDir::new("orphans-killed-start");
    let agent = start_with_pins(&again, &config, &pin_dir, &logs.path("again.log"));
    assert_eq!(pinned_u64(&owner), netns_cookie(&again));
    counts_two_exactly_then_stops(&again, agent, &pin_dir);
}

#[test]
fn a_start_beside_pins_whose_namespace_is_gone_removes_them() {
    // A sidecar's pod deleted while its collector was down: another pod's collector on the
    // node starts.
    let config = AgentConfig::new(ROUTES);
    let pins = PinParent::new(&config);
    let (gone_pins, own_pins) = (
        pins.pin_dir("collector-gone"),
        pins.pin_dir("collector-own"),
    );
    let logs = ScratchDir::new("orphans-sibling");
    let (sock_ops, old_owner) = crashed_in_a_namespace_gone(&config, &gone_pins);

    let other = Netns::new();
    let log = logs.path("other.log");
    let agent = start_with_pins(&other, &config, &own_pins, &log);
    assert_no_pins(&gone_pins);
    warned_once_of(&log, &gone_pins, old_owner);
    wait_released(sock_ops);
    // The start itself is a fresh one, and counts.
    assert!(support::running_line(&log).contains("inherited=false"));
    support::connections_3_in_5_out(&other, 2);
    wait_for_closed(&other, "web", 2);
    assert!(agent.stop().success());
    assert_no_pins(&own_pins);
    assert_eq!(
        std::fs::read_dir(&pins.dir).unwrap().count(),
        0,
        "left in {}",
        pins.dir.display()
    );
}

#[test]
fn a_start_beside_pins_a_start_killed_while_loading_never_claimed_removes_them() {
    // A sidecar killed while its programs loaded, then its pod deleted: no start of its own
    // comes to take the pins over.
    let config = AgentConfig::new(ROUTES);
    let pins = PinParent::new(&config);
    let (killed_pins, own_pins) = (
        pins.pin_dir("collector-killed"),
        pins.pin_dir("collector-own"),
    );
    killed_while_loading_in_a_namespace_gone(&config, &killed_pins);

    let other = Netns::new();
    let logs = ScratchDir::new("orphans-unclaimed");
    let log = logs.path("other.log");
    let agent = start_with_pins(&other, &config, &own_pins, &log);
    assert_no_pins(&killed_pins);
    let warned = lines_with(&log, "killed before it claimed them");
    assert!(
        warned.len() == 1 && warned[0].contains(killed_pins.to_str().unwrap()),
        "{warned:?}"
    );
    assert!(support::running_line(&log).contains("inherited=false"));
    counts_two_exactly_then_stops(&other, agent, &own_pins);
    assert_eq!(
        std::fs::read_dir(&pins.dir).unwrap().count(),
        0,
        "left in {}",
        pins.dir.display()
    );
}

#[test]
fn a_start_beside_a_crashed_collector_whose_namespace_is_there_leaves_its_pins() {
    let config = AgentConfig::new(ROUTES);
    let pins = PinParent::new(&config);
    let (crashed_pins, own_pins) = (pins.pin_dir("collector-crashed"), pins.pin_dir("collector"));
    let logs = ScratchDir::new("orphans-alive");
    let alive = Netns::new();
    let (sock_ops, _) = crashed_collector(&config, &crashed_pins, &alive);

    let other = Netns::new();
    let log = logs.path("other.log");
    let agent = start_with_pins(&other, &config, &own_pins, &log);
    assert!(
        lines_with(&log, &crashed_pins.display().to_string()).is_empty(),
        "{}",
        std::fs::read_to_string(&log).unwrap()
    );
    assert!(crashed_pins.join("v1/CONN_COUNTERS").exists());
    assert!(link_exists(sock_ops));
    assert!(
        tc_link_ifindexes(&crashed_pins)
            .iter()
            .all(|&ifindex| ifindex != 0)
    );

    // The crashed collector's next start takes its pins over and counts on.
    let restarted_log = logs.path("restarted.log");
    let restarted = Agent::start_logging(
        &alive,
        &config,
        &["--pin-dir", crashed_pins.to_str().unwrap()],
        &restarted_log,
    );
    assert!(support::running_line(&restarted_log).contains("inherited=true"));
    support::connections_3_in_5_out(&alive, 2);
    wait_for_closed(&alive, "web", 5);
    assert_eq!(opened(&alive), Some(5.0));
    for agent in [agent, restarted] {
        assert!(agent.stop().success());
    }
    assert_no_pins(&crashed_pins);
    assert_no_pins(&own_pins);
}

//! Starting the agent: where and how operators start it, and the errors they get when
//! something is wrong. Each error names what is wrong and how to fix it.

mod support;

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    os::unix::fs::OpenOptionsExt as _,
    process::Command,
    thread,
    time::Duration,
};

use support::{
    Agent, AgentConfig, COLLECTOR, Netns, ScratchDir, sample, scrape, wait_for, wait_for_closed,
};

/// The one route most tests count on.
const WEB_ROUTE: &str = "[[routes]]\nname = \"web\"\nports = [18080]\ntype = \"http\"\n";

#[test]
fn runs_and_counts_under_ip_netns_exec() {
    let netns = Netns::new();
    let config = AgentConfig::new(WEB_ROUTE);
    // `ip netns exec` gives the agent a fresh /sys without the host's bpffs and cgroup2.
    let agent = Agent::spawn(&netns, netns.ip_netns_exec(COLLECTOR), &config, &[]);
    support::connections_3_in_5_out(&netns, 5);
    let metrics = wait_for_closed(&netns, "web", 5);
    let web = [("route", "web")];
    assert_eq!(
        sample(&metrics, "collector_proxy_connections_opened_total", &web),
        Some(5.0)
    );
    assert_eq!(
        sample(
            &metrics,
            "collector_proxy_connection_received_bytes_total",
            &web
        ),
        Some(15.0)
    );
    assert_eq!(
        sample(
            &metrics,
            "collector_proxy_connection_sent_bytes_total",
            &web
        ),
        Some(25.0)
    );
    assert!(agent.stop().success());
}

#[test]
fn two_collectors_given_their_own_pin_dirs_run_side_by_side_and_count_their_own_namespaces() {
    // Two sidecars on one node: one config for both, as from one ConfigMap, and a pin
    // directory each from the command line.
    let config = AgentConfig::new(WEB_ROUTE);
    let (first, second) = (Netns::new(), Netns::new());
    let pin_dirs = ["first", "second"].map(|which| {
        let mut name = config.pin_dir.clone().into_os_string();
        name.push(format!("-{which}"));
        std::path::PathBuf::from(name)
    });
    // Removed also when the test fails (an agent killed leaves its pins, and its link on the
    // host's cgroup root with them).
    let _removed = pin_dirs.clone().map(support::RemovedOnDrop);
    let agents = [(&first, &pin_dirs[0]), (&second, &pin_dirs[1])].map(|(netns, pin_dir)| {
        Agent::start_with(netns, &config, &["--pin-dir", pin_dir.to_str().unwrap()])
    });
    support::connections_3_in_5_out(&first, 3);
    support::connections_3_in_5_out(&second, 5);
    for (netns, count) in [(&first, 3), (&second, 5)] {
        let metrics = wait_for_closed(netns, "web", count);
        assert_eq!(
            sample(
                &metrics,
                "collector_proxy_connections_opened_total",
                &[("route", "web")]
            ),
            Some(f64::from(count))
        );
    }
    for pin_dir in &pin_dirs {
        assert!(
            pin_dir.join("v1/CONN_COUNTERS").exists(),
            "{}",
            pin_dir.display()
        );
    }
    assert!(!config.pin_dir.exists());
    for agent in agents {
        assert!(agent.stop().success());
    }
    for pin_dir in &pin_dirs {
        support::assert_no_pins(pin_dir);
    }
}

/// A pin directory given as a symbolic link (bpffs laid out by the operator): the agent pins
/// through it, and a clean stop removes the pins, leaves the link and its directory, and
/// exits 0 (rmdir on the link failed the stop, and left the nftables table behind); so does
/// one given with a trailing slash, and `cleanup --apply` after a run killed.
#[test]
fn a_pin_directory_given_through_a_symlink_is_emptied_by_a_clean_stop_and_a_cleanup() {
    let netns = Netns::new();
    let config = AgentConfig::new(WEB_ROUTE);
    let mut real = config.pin_dir.clone().into_os_string();
    real.push("-real");
    let real = std::path::PathBuf::from(real);
    let _removed = [real.clone(), config.pin_dir.clone()].map(support::RemovedOnDrop);
    std::fs::create_dir(&real).unwrap();
    std::os::unix::fs::symlink(&real, &config.pin_dir).unwrap();
    let agent = Agent::start(&netns, &config);
    support::connections_3_in_5_out(&netns, 3);
    wait_for_closed(&netns, "web", 3);
    assert!(real.join("v1/CONN_COUNTERS").exists());
    assert!(agent.stop().success());
    let emptied = || {
        let link = std::fs::symlink_metadata(&config.pin_dir).unwrap();
        assert!(link.file_type().is_symlink());
        let left: Vec<_> = std::fs::read_dir(&real).unwrap().flatten().collect();
        assert!(left.is_empty(), "{left:?}");
    };
    emptied();

    // Written with a trailing slash, the path names the directory, not the link.
    let mut slashed = config.pin_dir.clone().into_os_string();
    slashed.push("/");
    let agent = Agent::start_with(&netns, &config, &["--pin-dir", slashed.to_str().unwrap()]);
    assert!(real.join("v1/CONN_COUNTERS").exists());
    assert!(agent.stop().success());
    emptied();

    // A run killed leaves its pins, which `cleanup --apply` removes the same way.
    let agent = Agent::start(&netns, &config);
    agent.kill();
    assert!(real.join("v1/CONN_COUNTERS").exists());
    support::stdout_of(
        Command::new(COLLECTOR)
            .args(["cleanup", "--apply", "--config"])
            .arg(&config.path),
    );
    emptied();
}

#[test]
fn pins_a_collector_of_another_namespace_left_are_refused_untouched() {
    let config = AgentConfig::new(WEB_ROUTE);
    let (first, second) = (Netns::new(), Netns::new());
    Agent::start(&first, &config).kill();
    // A DNS table of another build's shape among them, which a start of the owner's would
    // replace.
    let inflight = config.pin_dir.join("v1/DNS_INFLIGHT");
    std::fs::remove_file(&inflight).unwrap();
    support::pin_plain_array(&inflight, 16, collector_common::DNS_INFLIGHT_SLOTS);
    let inode = |path: &std::path::Path| {
        std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(path).unwrap())
    };
    let before = inode(&inflight);
    // Its links are on the first namespace's interfaces: lo is index 1 in both.
    // A collector that took the pins over would run on: killed after 20 s.
    let stderr = support::refused_start(&second, &config.path);
    assert!(
        stderr.contains("belong to a collector of another network namespace"),
        "{stderr}"
    );
    assert_eq!(
        inode(&inflight),
        before,
        "the other namespace's start replaced a pin"
    );
    // `collector check` there fails on them as the start did; in the first namespace it
    // warns of the table a start replaces, and beside its running collector that `run`
    // would be refused.
    let pin_dir_line = |netns: &Netns| support::check_line(netns, &config.path, &[], "pin_dir");
    let (passed, line) = pin_dir_line(&second);
    assert!(
        !passed
            && line.starts_with("FAIL")
            && line.contains("belong to a collector of another network namespace"),
        "{line}"
    );
    let (passed, line) = pin_dir_line(&first);
    assert!(
        passed
            && line.starts_with("warn")
            && line.contains("it replaces these maps, which held only the last seconds' state (DNS answers to queries asked before the start count as unmatched; TLS hellos in the middle of being read, as missed): DNS_INFLIGHT of another build (flags 0x0, this build's 0x400)"),
        "{line}"
    );
    // Untouched: the first namespace's next collector takes them over and counts on.
    let agent = Agent::start(&first, &config);
    let (passed, line) = pin_dir_line(&first);
    assert!(
        passed
            && line.starts_with("warn")
            && line.contains(&format!("is in use by process {}: ", agent.pid())),
        "{line}"
    );
    support::connections_3_in_5_out(&first, 2);
    wait_for_closed(&first, "web", 2);
    assert!(agent.stop().success());
    support::assert_no_pins(&config.pin_dir);
}

/// Pins a crashed run of another build left are removed with their programs, and counting
/// starts from zero, as after a clean upgrade: maps shaped otherwise (a counter table of
/// another value size, a connection table without the mmap flag), or shaped alike and meaning other things (its connection table probed in
/// another order, say), which `PIN_OWNER`'s second word, the layout, tells. Refused, they
/// made a `DaemonSet` upgrade after a crash crash-loop on that node until someone ran
/// `cleanup` there; misread, a close looked for in the wrong slots would never be counted,
/// nor its slot freed.
#[test]
fn pins_a_crashed_run_of_another_build_left_are_replaced_and_counted_from_zero() {
    let config = AgentConfig::new(WEB_ROUTE);
    let netns = Netns::new();
    let logs = ScratchDir::new("other-build");
    let v1 = config.pin_dir.join("v1");
    let make_other_layout = || {
        let owner = v1.join("PIN_OWNER");
        let data = aya::maps::MapData::from_pin(&owner).unwrap();
        let mut words: aya::maps::Array<_, u64> =
            aya::maps::Array::try_from(aya::maps::Map::Array(data)).unwrap();
        let layout = words.get(&1, 0).unwrap();
        assert_eq!(layout, collector_common::PIN_LAYOUT);
        words.set(1, layout + 1, 0).unwrap();
    };
    // A map of another value size where the route counters were pinned.
    let make_other_value_size = || {
        std::fs::remove_file(v1.join("CONN_COUNTERS")).unwrap();
        std::fs::rename(v1.join("ERRORS"), v1.join("CONN_COUNTERS")).unwrap();
    };
    // The connection table, shaped alike but not memory-mappable, as a build from before
    // the agent read it that way pinned it.
    let make_other_flags = || {
        std::fs::remove_file(v1.join("CONN_STATE")).unwrap();
        support::pin_plain_array(&v1.join("CONN_STATE"), 48, 65536);
    };
    let cases: [(&str, &dyn Fn(), String); 3] = [
        (
            "layout",
            &make_other_layout,
            format!(
                "(layout {}, this build's {})",
                collector_common::PIN_LAYOUT + 1,
                collector_common::PIN_LAYOUT
            ),
        ),
        (
            "value size",
            &make_other_value_size,
            format!(
                "(CONN_COUNTERS has value size 8, this build's {})",
                size_of::<collector_common::ConnCounters>()
            ),
        ),
        (
            "flags",
            &make_other_flags,
            "(CONN_STATE has flags 0x0, this build's 0x400)".to_owned(),
        ),
    ];
    for (case, make_other_build, difference) in cases {
        let crashed = Agent::start(&netns, &config);
        support::connections_3_in_5_out(&netns, 3);
        wait_for_closed(&netns, "web", 3);
        crashed.kill();
        let old_links = link_ids(&v1.join("links"));
        assert!(!old_links.is_empty());
        make_other_build();
        // `collector check` says so before the start.
        let (passed, line) = support::check_line(&netns, &config.path, &[], "pin_dir");
        assert!(
            passed
                && line.starts_with("warn")
                && line.contains("were left by a crashed run of another build")
                && line.contains(&difference)
                && line.contains("its counters start from zero"),
            "{case}: {line}"
        );
        let log = logs.path(&format!("{case}.log"));
        let agent = Agent::start_logging(&netns, &config, &[], &log);
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(
            text.lines().any(|line| line.contains(" WARN ")
                && line.contains("were left by a crashed run of another build")
                && line.contains(&difference)),
            "{case}: {text}"
        );
        // The crashed run's programs are detached: its links are gone from the kernel.
        for id in &old_links {
            assert!(link_gone(*id), "{case}: link {id} is still there");
        }
        // From zero: the crashed run's 3 are not taken over.
        support::connections_3_in_5_out(&netns, 2);
        let metrics = wait_for_closed(&netns, "web", 2);
        assert_eq!(
            sample(
                &metrics,
                "collector_proxy_connections_opened_total",
                &[("route", "web")]
            ),
            Some(2.0),
            "{case}"
        );
        assert!(agent.stop().success());
        support::assert_no_pins(&config.pin_dir);
    }
}

/// A link pin holding a program of another type where this build pins its own (here the
/// crashed run's loopback classifier where its `sock_ops` link goes, as a build that
/// changed a program's type without a new `PIN_LAYOUT` would leave) is replaced, not
/// refused: the start detaches it, attaches its own and takes the rest over. Refused, a
/// `DaemonSet` pod crash-looped on that node until someone ran `cleanup`, which also
/// threw the counts away.
#[test]
fn a_pinned_link_of_another_program_type_is_replaced_and_the_counts_taken_over() {
    let netns = Netns::new();
    let config = AgentConfig::new(WEB_ROUTE);
    let logs = ScratchDir::new("other-type");
    let crashed = Agent::start(&netns, &config);
    support::connections_3_in_5_out(&netns, 3);
    wait_for_closed(&netns, "web", 3);
    crashed.kill();
    let links = config.pin_dir.join("v1/links");
    let (sock_ops, loopback) = (links.join("sock_ops"), links.join("tc_loopback_1"));
    let moved = link_id(&loopback);
    std::fs::remove_file(&sock_ops).unwrap();
    std::fs::rename(&loopback, &sock_ops).unwrap();

    let log = logs.path("agent.log");
    let agent = Agent::start_logging(&netns, &config, &[], &log);
    let replaced = support::logged_lines(&log, "held a program of another type");
    assert!(
        replaced.len() == 1
            && replaced[0].contains(" WARN ")
            && replaced[0].contains(sock_ops.to_str().unwrap()),
        "{replaced:?}"
    );
    assert!(link_gone(moved), "the moved link {moved} is still there");
    let mut pins: Vec<_> = std::fs::read_dir(&links)
        .unwrap()
        .map(|entry| entry.unwrap().file_name())
        .collect();
    pins.sort();
    assert_eq!(pins, ["sock_ops", "tc_loopback_1"]);
    support::connections_3_in_5_out(&netns, 2);
    let metrics = wait_for_closed(&netns, "web", 5);
    let web = [("route", "web")];
    for (name, total) in [
        ("collector_proxy_connections_opened_total", 5.0),
        ("collector_proxy_connection_received_bytes_total", 15.0),
        ("collector_proxy_connection_sent_bytes_total", 25.0),
    ] {
        assert_eq!(sample(&metrics, name, &web), Some(total), "{name}");
    }
    // One loopback classifier counts: the moved one, had it stayed, would count the two
    // new connections' bytes again.
    for (direction, each) in [("in", 3), ("out", 5)] {
        let live = sample(
            &metrics,
            "collector_proxy_traffic_payload_bytes_total",
            &[("route", "web"), ("direction", direction)],
        );
        let retransmitted = support::retransmitted_segments(&[&netns]);
        support::assert_live_bytes(live, (5, each), retransmitted, direction);
    }
    assert!(agent.stop().success());
    support::assert_no_pins(&config.pin_dir);
}

/// Whether the kernel no longer has the link `id` (bpftool failing for any other reason
/// fails the test).
fn link_gone(id: u64) -> bool {
    let shown = Command::new("bpftool")
        .args(["link", "show", "id", &id.to_string()])
        .output()
        .unwrap();
    if shown.status.success() {
        return false;
    }
    assert!(
        String::from_utf8_lossy(&shown.stderr).contains("No such file or directory"),
        "bpftool link show id {id}: {shown:?}"
    );
    true
}

/// The ids of the links pinned under `links_dir`, as bpftool reads them.
fn link_ids(links_dir: &std::path::Path) -> Vec<u64> {
    std::fs::read_dir(links_dir)
        .unwrap()
        .map(|entry| link_id(&entry.unwrap().path()))
        .collect()
}

/// The id of the link pinned at `pin`, as bpftool reads it.
fn link_id(pin: &std::path::Path) -> u64 {
    let out = support::stdout_of(
        Command::new("bpftool")
            .args(["-j", "link", "show", "pinned"])
            .arg(pin),
    );
    let link: serde_json::Value = serde_json::from_str(&out).unwrap();
    link["id"].as_u64().unwrap_or_else(|| panic!("{out}"))
}

/// A start while `collector cleanup` holds the pin directory (through its `nft`, here held
/// up as a firewall reload holds the ruleset; the directory stays while it holds another
/// layout's) waits for it, saying so, where it was refused after 2 s as if a collector ran
/// there. Held by anything else, the start is refused naming the process.
#[test]
fn a_start_waits_for_a_cleanup_holding_the_pin_directory_and_names_any_other_holder() {
    let netns = Netns::new();
    let config = AgentConfig::with_nft(WEB_ROUTE);
    // Another layout's directory is made below: gone with the rest, the test passed or not.
    let _removed = support::RemovedOnDrop(config.pin_dir.clone());
    nft_may_take(&config, Duration::from_mins(1));
    Agent::start(&netns, &config).kill();
    let other_layout = config.pin_dir.join("v2");
    std::fs::create_dir(&other_layout).unwrap();
    let stall = config.dir.join("stall");
    let bin = stalling_nft(&config.dir, &stall);
    std::fs::write(&stall, "").unwrap();
    let unstall = Unstall(stall);
    let mut cleanup = support::Reaped::spawn(
        netns
            .command(COLLECTOR)
            .args(["cleanup", "--apply", "--config"])
            .arg(&config.path)
            .env("PATH", path_with(&bin))
            .stdout(std::process::Stdio::null()),
    );
    let script = bin.join("nft").display().to_string();
    wait_for(
        "the cleanup to run the stuck nft",
        Duration::from_secs(20),
        || children_running(cleanup.pid(), &script).then_some(()),
    );
    let logs = ScratchDir::new("cleanup-wait");
    let waiting = format!(
        "waiting for process {}: {COLLECTOR} cleanup --apply --config",
        cleanup.pid()
    );
    let said_in = |log: &std::path::Path, text: &str| {
        std::fs::read_to_string(log)
            .unwrap_or_default()
            .contains(text)
    };
    // A stop asked for while the start waits ends it at once, with nothing attached.
    let stopped_log = logs.path("stopped.log");
    let mut stopped = support::Reaped::spawn(
        netns
            .command(COLLECTOR)
            .args(["run", "--config"])
            .arg(&config.path)
            .stderr(std::fs::File::create(&stopped_log).unwrap()),
    );
    wait_for("the first start to wait", Duration::from_mins(1), || {
        said_in(&stopped_log, &waiting).then_some(())
    });
    stopped.signal(libc::SIGTERM);
    let status = wait_for("the waiting start to stop", Duration::from_secs(5), || {
        stopped.try_wait()
    });
    assert!(
        status.success() && said_in(&stopped_log, "asked to stop while waiting"),
        "{status}: {}",
        std::fs::read_to_string(&stopped_log).unwrap()
    );
    // Let go once the next start says it waits for the cleanup: past the 2 s it waits for
    // another holder.
    let log = logs.path("agent.log");
    let letting_go = {
        let log = log.clone();
        thread::spawn(move || {
            wait_for("the start to wait", Duration::from_mins(1), || {
                std::fs::read_to_string(&log)
                    .unwrap_or_default()
                    .contains(&waiting)
                    .then_some(())
            });
            drop(unstall);
        })
    };
    let agent = Agent::start_logging(&netns, &config, &[], &log);
    letting_go.join().unwrap();
    let status = wait_for("the cleanup to end", Duration::from_secs(20), || {
        cleanup.try_wait()
    });
    assert!(status.success());
    std::fs::remove_dir(&other_layout).unwrap();
    support::connections_3_in_5_out(&netns, 2);
    wait_for_closed(&netns, "web", 2);
    assert!(agent.stop().success());

    // Any other holder is named: here this test's own process.
    std::fs::create_dir_all(&config.pin_dir).unwrap();
    let held = std::fs::File::open(&config.pin_dir).unwrap();
    // SAFETY: flock on a descriptor of ours.
    let locked = unsafe {
        libc::flock(
            std::os::fd::AsRawFd::as_raw_fd(&held),
            libc::LOCK_EX | libc::LOCK_NB,
        )
    };
    assert_eq!(locked, 0, "{}", std::io::Error::last_os_error());
    let stderr = support::refused_start(&netns, &config.path);
    assert!(
        stderr.contains(&format!(
            "another collector is running with the pin directory {} (process {}: ",
            config.pin_dir.display(),
            std::process::id()
        )),
        "{stderr}"
    );
    drop(held);
    std::fs::remove_dir(&config.pin_dir).unwrap();
}

/// The kernel finds a connection's slots by the table's size, so a start after a crash
/// with another `connection_table_slots` cannot read the crashed run's table on: it removes
/// its pins, says why, and counts from zero in a table of the new size.
#[test]
fn a_start_after_a_crash_with_another_connection_table_size_counts_from_zero() {
    let netns = Netns::new();
    let config = AgentConfig::new(WEB_ROUTE);
    let resized = AgentConfig::new(&format!("connection_table_slots = 1024\n{WEB_ROUTE}"));
    let logs = ScratchDir::new("resized");
    let (first, second) = (logs.path("first.log"), logs.path("second.log"));
    let crashing = Agent::start_logging(&netns, &config, &[], &first);
    support::connections_3_in_5_out(&netns, 2);
    wait_for_closed(&netns, "web", 2);
    crashing.kill();
    let pin_dir = config.pin_dir.to_str().unwrap();
    // `collector check` says which config resets the counters, before the start does.
    let pin_dir_line = |config: &AgentConfig| {
        support::check_line(&netns, &config.path, &["--pin-dir", pin_dir], "pin_dir")
    };
    let (passed, line) = pin_dir_line(&config);
    assert!(
        passed && line.starts_with("pass") && line.contains("whose counters `run` takes over"),
        "{line}"
    );
    let (passed, line) = pin_dir_line(&resized);
    assert!(
        passed
            && line.starts_with("warn")
            && line.contains("connection_table_slots = 65536, the config's 1024")
            && line.contains("its counters start from zero"),
        "{line}"
    );
    let agent = Agent::start_logging(&netns, &resized, &["--pin-dir", pin_dir], &second);
    assert!(support::running_line(&second).contains("inherited=false"));
    let removed = support::logged_lines(&second, "were left by a crashed run");
    assert!(
        removed.len() == 1
            && removed[0].contains("connection_table_slots = 65536, the config's 1024")
            && removed[0].contains("counters start from zero"),
        "{removed:?}"
    );
    support::connections_3_in_5_out(&netns, 1);
    let metrics = wait_for_closed(&netns, "web", 1);
    let web = [("route", "web")];
    assert_eq!(
        sample(&metrics, "collector_proxy_connections_opened_total", &web),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &metrics,
            "collector_bpf_map_entries_limit",
            &[("map", "CONN_STATE")]
        ),
        Some(1024.0)
    );
    // The same size after a crash is taken over: a connection held open across it is
    // found in its slot at its close.
    let listener = netns.run(|| TcpListener::bind("127.0.0.1:18080").unwrap());
    let held = support::hold_open(&netns, &listener, 1);
    wait_for("the held connection", Duration::from_secs(10), || {
        (sample(&scrape(&netns), "collector_proxy_connections_active", &web) == Some(1.0))
            .then_some(())
    });
    agent.kill();
    let third = logs.path("third.log");
    let agent = Agent::start_logging(&netns, &resized, &["--pin-dir", pin_dir], &third);
    assert!(support::running_line(&third).contains("inherited=true"));
    drop(held);
    let metrics = wait_for_closed(&netns, "web", 2);
    assert_eq!(
        sample(&metrics, "collector_proxy_connections_active", &web),
        Some(0.0)
    );
    assert!(agent.stop().success());
    support::assert_no_pins(&config.pin_dir);
}

/// Maps pinned without `PIN_OWNER` (a stop cut short after removing the links, then it, the
/// first map it removes) are no one's: a start removes them and counts from zero, and
/// `collector check` does not say it would take them over.
#[test]
fn pins_without_an_owner_are_removed_and_counted_from_zero() {
    let netns = Netns::new();
    let config = AgentConfig::new(WEB_ROUTE);
    let logs = ScratchDir::new("unowned");
    let crashing = Agent::start(&netns, &config);
    support::connections_3_in_5_out(&netns, 3);
    wait_for_closed(&netns, "web", 3);
    crashing.kill();
    for link in std::fs::read_dir(config.pin_dir.join("v1/links")).unwrap() {
        std::fs::remove_file(link.unwrap().path()).unwrap();
    }
    std::fs::remove_file(config.pin_dir.join("v1/PIN_OWNER")).unwrap();
    let (passed, line) = support::check_line(&netns, &config.path, &[], "pin_dir");
    assert!(
        passed && line.starts_with("pass") && !line.contains("takes over"),
        "{line}"
    );
    let log = logs.path("agent.log");
    let agent = Agent::start_logging(&netns, &config, &[], &log);
    assert!(
        support::running_line(&log).contains("inherited=false"),
        "{}",
        std::fs::read_to_string(&log).unwrap()
    );
    assert!(
        !support::logged_lines(&log, "which no collector owned").is_empty(),
        "{}",
        std::fs::read_to_string(&log).unwrap()
    );
    support::connections_3_in_5_out(&netns, 2);
    let metrics = wait_for_closed(&netns, "web", 2);
    let web = [("route", "web")];
    let opened = sample(&metrics, "collector_proxy_connections_opened_total", &web);
    assert_eq!(opened, Some(2.0), "the crashed run's 3 taken over");
    assert!(agent.stop().success());
    support::assert_no_pins(&config.pin_dir);
}

#[test]
fn a_start_after_a_crash_says_it_took_over_the_crashed_runs_programs_and_counters() {
    let netns = Netns::new();
    let config = AgentConfig::new(WEB_ROUTE);
    let logs = ScratchDir::new("takeover");
    let (first, second) = (logs.path("first.log"), logs.path("second.log"));
    let crashing = Agent::start_logging(&netns, &config, &[], &first);
    // Read before the kill, which loses what the log writer had yet to write.
    assert!(support::running_line(&first).contains("inherited=false"));
    crashing.kill();
    let agent = Agent::start_logging(&netns, &config, &[], &second);
    assert!(support::running_line(&second).contains("inherited=true"));
    let log = std::fs::read_to_string(&second).unwrap();
    let took_over = log
        .lines()
        .find(|line| line.contains("took over the pins a previous run left"))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(
        took_over.contains(" INFO ") && took_over.contains(config.pin_dir.to_str().unwrap()),
        "{took_over}"
    );
    assert!(agent.stop().success());
    support::assert_no_pins(&config.pin_dir);
}

#[test]
fn a_config_without_routes_is_warned_about_at_start() {
    let netns = Netns::new();
    // Only the test's own settings: no [[routes]], as in a file of one's own.
    let config = AgentConfig::new("");
    let logs = ScratchDir::new("no-routes");
    let log = logs.path("agent.log");
    let agent = Agent::start_logging(&netns, &config, &[], &log);
    assert!(agent.stop().success());
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.lines().any(|line| line.contains(" WARN ")
            && line.contains("no [[routes]] configured: only DNS is counted")),
        "{text}"
    );
}

/// Started as systemd starts a unit, with a soft open-file limit far under the hard one
/// (1024 under 524288 there; 512 under 2048 here), the agent raises the soft one to the hard
/// one, and warns when even that leaves too few descriptors beside `max_connections`.
#[test]
fn the_open_file_limit_is_raised_to_the_hard_one_and_a_short_one_warned_of() {
    let netns = Netns::new();
    let config = AgentConfig::new(&format!("{WEB_ROUTE}[http]\nmax_connections = 5000\n"));
    let logs = ScratchDir::new("open-files");
    let log = logs.path("agent.log");
    let mut launcher = netns.command(COLLECTOR);
    support::limit_open_files(&mut launcher, 512, 2048);
    let agent = Agent::spawn_logging(&netns, launcher, &config, &[], &log);
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", agent.pid())).unwrap();
    let open_files: Vec<&str> = limits
        .lines()
        .find_map(|line| line.strip_prefix("Max open files"))
        .unwrap_or_else(|| panic!("{limits}"))
        .split_whitespace()
        .collect();
    assert_eq!(open_files[..2], ["2048", "2048"], "{limits}");
    assert!(agent.stop().success());
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.lines().any(|line| line.contains(" WARN ")
            && line.contains(
                "the open-file limit is 2048, fewer than [http] max_connections = 5000 and 512"
            )),
        "{text}"
    );
    support::assert_no_pins(&config.pin_dir);
}

/// With `--log-format json` every line the agent writes is a JSON object with its level,
/// message and fields at the top level, the reason a start is refused included.
#[test]
fn json_logs_are_one_object_a_line_with_the_fields_at_the_top() {
    let netns = Netns::new();
    let config = AgentConfig::new("");
    let logs = ScratchDir::new("json-logs");
    let log = logs.path("agent.log");
    let agent = Agent::start_logging(&netns, &config, &["--log-format", "json"], &log);
    assert!(agent.stop().success());
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|err| panic!("{err}: {line}")))
        .collect();
    for line in &lines {
        assert!(
            line["level"].is_string() && line["message"].is_string() && line["target"].is_string(),
            "{line}"
        );
    }
    let running = lines
        .iter()
        .find(|line| line["message"] == "collector running")
        .unwrap_or_else(|| panic!("no start line in {text}"));
    assert_eq!(running["level"], "INFO");
    assert_eq!(running["routes"], 0);
    assert!(running["listen"].is_string(), "{running}");
    // The commit built, as `--version` says it.
    assert!(
        running["version"]
            .as_str()
            .is_some_and(|version| version.starts_with(concat!(env!("CARGO_PKG_VERSION"), " ("))),
        "{running}"
    );
    assert!(
        lines.iter().any(|line| line["level"] == "WARN"
            && line["message"]
                .as_str()
                .unwrap()
                .starts_with("no [[routes]] configured")),
        "{text}"
    );

    // A refused start: its reason, with the file and line, is a JSON line too.
    let dir = ScratchDir::new("json-logs-bad");
    let bad = dir.path("bad.toml");
    std::fs::write(
        &bad,
        "[[routes]]\nname = \"web\"\nports = [0]\ntype = \"http\"\n",
    )
    .unwrap();
    // In a namespace of its own, with a time limit: a start wrongly let through would
    // otherwise attach to the host and never end.
    let stderr = support::refused_start_with(&Netns::new(), &bad, &["--log-format", "json"]);
    let refusal: serde_json::Value =
        serde_json::from_str(stderr.trim()).unwrap_or_else(|err| panic!("{err}: {stderr}"));
    assert_eq!(refusal["level"], "ERROR");
    assert!(
        refusal["message"].as_str().unwrap().contains("bad.toml:3:"),
        "{refusal}"
    );
}

/// Starts the agent on `text` as bad.toml, in a namespace of its own with a time limit
/// (a start wrongly let through would otherwise attach to the host and never end),
/// expecting a refusal: its stderr.
fn refused_config(text: &str) -> String {
    let dir = ScratchDir::new("refused-config");
    let path = dir.path("bad.toml");
    std::fs::write(&path, text).unwrap();
    support::refused_start(&Netns::new(), &path)
}

#[test]
fn an_invalid_config_is_refused_with_file_line_and_reason() {
    let stderr = refused_config(
        "listen = \"127.0.0.1:9464\"\n\n[[routes]]\nname = \"web\"\nports = [0]\ntype = \"http\"\n",
    );
    assert!(stderr.contains("bad.toml:5:"), "{stderr}");
    assert!(stderr.to_lowercase().contains("port"), "{stderr}");

    let stderr = refused_config("[[routes]]\nname = \"web\"\nports = [80]\ntyp = \"http\"\n");
    assert!(stderr.contains("bad.toml:4:"), "{stderr}");
}

#[test]
fn a_pin_directory_off_bpffs_is_refused_with_the_fix() {
    let stderr = refused_config(
        "pin_dir = \"/tmp/not-bpffs\"\n[[routes]]\nname = \"web\"\nports = [18080]\ntype = \"http\"\n",
    );
    assert!(
        stderr.contains("/tmp/not-bpffs is not on a bpffs mount")
            && stderr.contains("mount -t bpf"),
        "{stderr}"
    );
    // bpffs refuses a dot in a name with EPERM, which must not read as missing privileges:
    // in the file, with its line; by --pin-dir, when the start looks at the mount.
    let routes = WEB_ROUTE;
    let stderr = refused_config(&format!(
        "pin_dir = \"/sys/fs/bpf/collector.prod\"\n{routes}"
    ));
    assert!(
        stderr.contains("bad.toml:1:") && stderr.contains("bpffs refuses names with a dot"),
        "{stderr}"
    );
    let dir = ScratchDir::new("dotted-pin-dir");
    let path = dir.path("collector.toml");
    std::fs::write(&path, routes).unwrap();
    let stderr = support::refused_start_with(
        &Netns::new(),
        &path,
        &["--pin-dir", "/sys/fs/bpf/collector.prod"],
    );
    assert!(
        stderr.contains("bpffs refuses names with a dot") && !stderr.contains("run as root"),
        "{stderr}"
    );
    // A `..` is refused as the file's is, for what it is, not as a name with a dot.
    let stderr = support::refused_start_with(
        &Netns::new(),
        &path,
        &["--pin-dir", "/sys/fs/bpf/collector/../x"],
    );
    assert!(
        stderr.contains("--pin-dir /sys/fs/bpf/collector/../x: has a `..`"),
        "{stderr}"
    );
}

/// `--pin-dir /sys/fs/bpf`, the bpffs mount itself, is refused by `run` and failed by
/// `check`, each naming a directory of its own to use: the pins would go among other
/// tools' (/sys/fs/bpf/v1) and the lock would hold the whole mount, and `cleanup` refuses it.
#[test]
fn the_bpffs_mount_itself_as_pin_directory_is_refused_by_run_and_check() {
    let refusal = "pin_dir /sys/fs/bpf is the bpffs mount itself";
    let fix = "such as /sys/fs/bpf/collector";
    let layout = std::path::Path::new("/sys/fs/bpf/v1");
    // Said, not passed over: a build that let the start through left its pins there, and
    // every later run of this test would then have checked nothing.
    assert!(
        !layout.exists(),
        "{} exists: left by a start this test should have seen refused? If no other tool \
         pins there, `collector cleanup --apply --pin-dir /sys/fs/bpf` removes it",
        layout.display()
    );
    // A start let through, killed after the wait below, leaves its pins (a `sock_ops` link
    // on the host's cgroup root among them): removed whatever fails.
    let _made = support::RemovedOnDrop(layout.to_path_buf());
    let netns = Netns::new();
    let config = AgentConfig::new(WEB_ROUTE);
    let log = config.dir.join("run.log");
    // In a namespace of its own: a build that let it through would count there, and is
    // killed after 20 s.
    let mut run = support::Reaped::spawn(
        netns
            .command(COLLECTOR)
            .args(["run", "--config"])
            .arg(&config.path)
            .args(["--pin-dir", "/sys/fs/bpf"])
            .stderr(std::fs::File::create(&log).unwrap()),
    );
    let status = wait_for("the refused start to exit", Duration::from_secs(20), || {
        run.try_wait()
    });
    let stderr = std::fs::read_to_string(&log).unwrap();
    assert!(
        !status.success() && stderr.contains(refusal) && stderr.contains(fix),
        "{status}: {stderr}"
    );
    assert!(
        !layout.exists(),
        "the refused start made {}",
        layout.display()
    );

    let out = Command::new(COLLECTOR)
        .args(["check", "--pin-dir", "/sys/fs/bpf"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let failed: Vec<&str> = stdout.lines().filter(|l| l.starts_with("FAIL")).collect();
    assert!(
        !out.status.success()
            && failed.len() == 1
            && failed[0].contains("pin_dir")
            && failed[0].contains(refusal)
            && failed[0].contains(fix),
        "{stdout}"
    );
}

#[test]
fn without_privileges_the_error_says_what_is_needed() {
    support::require_root();
    let config = AgentConfig::new(WEB_ROUTE);
    // Readable by the unprivileged user, as an operator's config would be.
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(COLLECTOR)
        .args(["run", "--config"])
        .arg(&config.path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("run as root, or with CAP_BPF"), "{stderr}");
}

/// Root with only the three capabilities the manifests grant: what needs `CAP_SYS_ADMIN` as
/// well says so, rather than blame a security module (until 2026-12-05 both starts below
/// read "a Linux security module refused it", and the first left empty directories in
/// bpffs).
#[test]
fn what_needs_cap_sys_admin_says_so() {
    support::require_root();
    let netns = Netns::new();
    let config = AgentConfig::new(WEB_ROUTE);
    let refused = |mut launcher: Command, args: &[&str]| {
        let out = support::output_within(
            launcher
                .args([
                    "--bounding-set=-all,+bpf,+perfmon,+net_admin",
                    "--inh-caps=-all",
                    COLLECTOR,
                    "run",
                    "--config",
                ])
                .arg(&config.path)
                .args(args),
            Duration::from_secs(20),
        );
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            !out.status.success() && !stderr.contains("security module"),
            "{stderr}"
        );
        assert!(!config.pin_dir.exists(), "{}", config.pin_dir.display());
        stderr
    };
    // With the host's mounts (nsenter keeps them).
    let stderr = refused(netns.command("setpriv"), &["--bpf-stats"]);
    assert!(
        stderr.contains(
            "--bpf-stats: the kernel switches its run-time statistics on only for CAP_SYS_ADMIN"
        ),
        "{stderr}"
    );
    // `ip netns exec` gives a fresh /sys without the cgroup2 mount.
    let stderr = refused(netns.ip_netns_exec("setpriv"), &[]);
    assert!(
        stderr.contains("no cgroup2 mount is visible here")
            && stderr.contains("needs CAP_SYS_ADMIN"),
        "{stderr}"
    );
}

#[test]
fn check_passes_on_this_host() {
    support::require_root();
    let out = Command::new(COLLECTOR).arg("check").output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for requirement in ["kernel", "btf", "cgroup2", "bpffs", "CAP_BPF", "nft"] {
        assert!(
            stdout
                .lines()
                .any(|line| line.starts_with("pass") && line.contains(requirement)),
            "{requirement}: {stdout}"
        );
    }
}

#[test]
fn check_names_a_missing_bpffs_and_the_fix() {
    support::require_root();
    // A private mount namespace of this command only, with every bpffs on /sys/fs/bpf
    // unmounted: the host's mounts are untouched.
    let check = |args: &str| {
        let out = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg(format!(
                "while umount -l /sys/fs/bpf 2>/dev/null; do :; done; exec {COLLECTOR} check {args}"
            ))
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        let line = stdout
            .lines()
            .find(|line| line.contains("bpffs"))
            .unwrap_or_else(|| panic!("no bpffs line: {stdout}"))
            .to_owned();
        (out.status.success(), line, stdout, stderr)
    };
    // Under /sys/fs/bpf, `run` mounts bpffs itself: said, not failed.
    let (passed, line, stdout, _) = check("");
    assert!(passed, "{stdout}");
    assert!(
        line.starts_with("warn") && line.contains("`run` mounts one there"),
        "{line}"
    );
    // Elsewhere `run` stops: failed, with the fix.
    let (passed, line, stdout, stderr) = check("--pin-dir /run/collector-check-test");
    assert!(!passed, "{stdout}");
    assert!(line.starts_with("FAIL"), "{line}");
    assert!(
        line.contains("mount -t bpf bpf /sys/fs/bpf") && line.contains("set `pin_dir`"),
        "{line}"
    );
    assert!(stderr.contains("requirement(s) not met"), "{stderr}");
    // The rest still passes: only what is missing fails.
    assert_eq!(
        stdout.lines().filter(|l| l.starts_with("FAIL")).count(),
        1,
        "{stdout}"
    );
}

#[test]
fn after_attaching_the_agent_keeps_only_cap_bpf_and_cap_net_admin_and_still_counts() {
    let netns = Netns::new();
    let config = AgentConfig::with_nft(WEB_ROUTE);
    let agent = Agent::start(&netns, &config);
    // Every thread of the agent: capabilities are per thread.
    let tasks = std::fs::read_dir(format!("/proc/{}/task", agent.pid())).unwrap();
    for task in tasks {
        let status = std::fs::read_to_string(task.unwrap().path().join("status")).unwrap();
        let effective = status
            .lines()
            .find_map(|line| line.strip_prefix("CapEff:"))
            .map(|hex| u64::from_str_radix(hex.trim(), 16).unwrap())
            .unwrap();
        assert_eq!(effective, (1 << 39) | (1 << 12), "CapEff {effective:#x}");
    }
    let listener = netns.run(|| TcpListener::bind("127.0.0.1:18080").unwrap());
    let server = thread::spawn(move || {
        for _ in 0..4 {
            let (mut stream, _) = listener.accept().unwrap();
            let mut buf = [0u8; 2];
            stream.read_exact(&mut buf).unwrap();
        }
    });
    netns.run(|| {
        for _ in 0..4 {
            TcpStream::connect("127.0.0.1:18080")
                .unwrap()
                .write_all(b"hi")
                .unwrap();
        }
    });
    server.join().unwrap();
    wait_for("4 closed connections", Duration::from_secs(10), || {
        let metrics = scrape(&netns);
        (sample(
            &metrics,
            "collector_proxy_connections_closed_total",
            &[("route", "web")],
        ) == Some(4.0)
            && sample(
                &metrics,
                "collector_proxy_connection_received_bytes_total",
                &[("route", "web")],
            ) == Some(8.0))
        .then_some(())
    });
    // And it still stops cleanly: pins removed by their owner, the nftables table by `nft`.
    assert!(agent.stop().success());
    support::assert_no_pins(&config.pin_dir);
}

/// GET `path` with optional `Authorization` from inside the namespace: (status, headers+body).
fn get_with(
    netns: &Netns,
    path: &'static str,
    authorization: Option<&'static str>,
) -> (u16, String) {
    netns.run(move || {
        let mut stream = TcpStream::connect(support::LISTEN).unwrap();
        let auth = authorization.map_or(String::new(), |a| format!("Authorization: {a}\r\n"));
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: c\r\n{auth}Connection: close\r\n\r\n"
        )
        .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        let status = response.split_whitespace().nth(1).unwrap().parse().unwrap();
        (status, response)
    })
}

/// A token file holding `first-token`, in a scratch directory of its own (held by the
/// caller: its drop removes it).
fn first_token_file(scratch: &str) -> (support::ScratchDir, std::path::PathBuf) {
    let secrets = support::ScratchDir::new(scratch);
    let token_file = secrets.path("token");
    std::fs::write(&token_file, "first-token\n").unwrap();
    (secrets, token_file)
}

/// `collector stats --watch` follows a rotated token: the agent takes the new one without a
/// restart, and so must a watch that outlives the rotation. Until 2026-12-02 it sent the
/// first token for as long as it ran, and was refused every second after a rotation.
#[test]
fn a_watching_cli_follows_a_rotated_token() {
    let netns = Netns::new();
    let (_secrets, token_file) = first_token_file("rotated-token");
    let config = AgentConfig::new(&format!(
        "[http]\nbearer_token_file = \"{}\"\n",
        token_file.display()
    ));
    let agent = Agent::start(&netns, &config);
    let mut watch = support::Reaped::spawn(
        netns
            .command(COLLECTOR)
            .args(["stats", "proxy", "--json", "--watch", "--config"])
            .arg(&config.path)
            .stdout(std::process::Stdio::piped()),
    );
    let (lines, read) = std::sync::mpsc::channel();
    let stdout = watch.stdout().unwrap();
    thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
            if lines.send(line.unwrap()).is_err() {
                return;
            }
        }
    });
    let next = || {
        read.recv_timeout(Duration::from_secs(10))
            .expect("a line from the watch")
    };
    assert!(next().starts_with('{'));

    // Longer than the first: the agent sees the change within the second.
    std::fs::write(&token_file, "the-second-token\n").unwrap();
    wait_for(
        "the agent to take the new token",
        Duration::from_secs(10),
        || (get_with(&netns, "/metrics", Some("Bearer first-token")).0 == 401).then_some(()),
    );
    // Lines written before the agent took it may be queued: three more after it.
    while read.try_recv().is_ok() {}
    for _ in 0..3 {
        assert!(next().starts_with('{'));
    }
    watch.signal(libc::SIGTERM);
    assert!(agent.stop().success());
}

/// An event stream lives only as long as its credentials admit it: a token rotated to
/// revoke a leak ends the streams opened with it (within seconds, at their next line, with
/// no `end` line: the agent did not stop), where they streamed on for as long as the agent
/// ran, holding their places. The new token opens a stream.
#[test]
fn an_event_stream_ends_once_its_token_is_rotated() {
    let netns = Netns::new();
    let (_secrets, token_file) = first_token_file("revoked-token");
    let config = AgentConfig::new(&format!(
        "{WEB_ROUTE}\n[http]\nbearer_token_file = \"{}\"\nmax_event_streams = 1\n",
        token_file.display()
    ));
    let agent = Agent::start(&netns, &config);
    let open_stream = |token: &str| {
        let token = token.to_owned();
        netns.run(move || {
            let mut stream = TcpStream::connect(support::LISTEN).unwrap();
            write!(
                stream,
                "GET /api/v1/events HTTP/1.1\r\nHost: c\r\nAuthorization: Bearer {token}\r\n\r\n"
            )
            .unwrap();
            stream
                .set_read_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            stream
        })
    };
    let mut stream = open_stream("first-token");
    // Admitted before the rotation.
    let mut body = Vec::new();
    wait_for("the stream's head", Duration::from_secs(10), || {
        let mut chunk = [0u8; 4096];
        if let Ok(read) = stream.read(&mut chunk) {
            body.extend_from_slice(&chunk[..read]);
        }
        body.windows(4).any(|end| end == b"\r\n\r\n").then_some(())
    });
    assert!(
        body.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&body)
    );
    // A line that comes before the rotation, whenever its credentials are judged again.
    support::connections_3_in_5_out(&netns, 1);
    wait_for("a connection's line", Duration::from_secs(10), || {
        let mut chunk = [0u8; 4096];
        if let Ok(read) = stream.read(&mut chunk) {
            body.extend_from_slice(&chunk[..read]);
        }
        String::from_utf8_lossy(&body)
            .contains("\"event\":\"connection-open\"")
            .then_some(())
    });
    std::fs::write(&token_file, "the-second-token\n").unwrap();
    wait_for(
        "the agent to take the new token",
        Duration::from_secs(10),
        || (get_with(&netns, "/metrics", Some("Bearer first-token")).0 == 401).then_some(()),
    );
    // Connections make lines, at which the stream's credentials are judged again.
    wait_for("the stream to end", Duration::from_secs(30), || {
        support::connections_3_in_5_out(&netns, 1);
        let mut chunk = [0u8; 4096];
        loop {
            match stream.read(&mut chunk) {
                Ok(0) => return Some(()),
                Ok(read) => body.extend_from_slice(&chunk[..read]),
                Err(_) => break,
            }
        }
        // Chunked: the last chunk ends the body on a connection kept open.
        body.ends_with(b"\r\n0\r\n\r\n").then_some(())
    });
    let body = String::from_utf8_lossy(&body);
    assert!(!body.contains("\"event\":\"end\""), "{body}");
    // Its place is free for the new token's stream.
    let mut renewed = open_stream("the-second-token");
    let mut head = [0u8; 12];
    renewed
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    renewed.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
    assert!(agent.stop().success());
}

/// A request head past 16 KiB is refused (431) before anything of it is checked: each
/// connection buffers that much at most, where hyper's default let unauthenticated clients
/// at the connection cap hold hundreds of megabytes. A normal request still answers.
#[test]
fn an_oversized_request_head_is_refused() {
    let netns = Netns::new();
    let config = AgentConfig::new(WEB_ROUTE);
    let agent = Agent::start(&netns, &config);
    let answer = netns.run(|| {
        let mut stream = std::net::TcpStream::connect(support::LISTEN).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let head = format!(
            "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Padding: {}\r\n\r\n",
            "a".repeat(20_000)
        );
        // The agent may close while the rest is still being written.
        let _ = stream.write_all(head.as_bytes());
        let mut answer = String::new();
        let _ = stream.read_to_string(&mut answer);
        answer
    });
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer:?}");
    assert_eq!(
        netns.run(|| support::get("/healthz").unwrap()),
        (200, "ok\n".to_owned())
    );
    assert!(agent.stop().success());
}

#[test]
fn with_a_bearer_token_only_the_probes_answer_without_it() {
    let netns = Netns::new();
    let secrets = support::ScratchDir::new("token");
    let token_file = secrets.path("token");
    std::fs::write(&token_file, "s3cret-token\n").unwrap();
    let config = AgentConfig::new(&format!(
        "[http]\nbearer_token_file = \"{}\"\nmax_concurrent_requests = 1\nmax_event_streams = 1\nrequest_timeout_ms = 2000\n",
        token_file.display()
    ));
    let agent = Agent::start(&netns, &config);
    for path in ["/metrics", "/api/v1/proxy", "/api/v1/dns"] {
        let (status, response) = get_with(&netns, path, None);
        assert_eq!(status, 401, "{path}: {response}");
        assert!(
            response
                .to_ascii_lowercase()
                .contains("www-authenticate: bearer"),
            "{response}"
        );
        assert_eq!(
            get_with(&netns, path, Some("Bearer wrong")).0,
            401,
            "{path}"
        );
        assert_eq!(
            get_with(&netns, path, Some("Bearer s3cret-token")).0,
            200,
            "{path}"
        );
    }
    for probe in ["/healthz", "/readyz"] {
        assert_eq!(get_with(&netns, probe, None).0, 200, "{probe}");
    }
    // One request and one event stream at a time: an open stream leaves the request permit
    // to scrapes, and a second stream waits for the first to go away.
    let open_stream = || {
        netns.run(|| {
            let mut stream = TcpStream::connect(support::LISTEN).unwrap();
            write!(
                stream,
                "GET /api/v1/events HTTP/1.1\r\nHost: c\r\nAuthorization: Bearer s3cret-token\r\n\r\n"
            )
            .unwrap();
            let mut head = [0u8; 12];
            stream.read_exact(&mut head).unwrap();
            (String::from_utf8_lossy(&head).into_owned(), stream)
        })
    };
    let (head, stream) = open_stream();
    assert_eq!(head, "HTTP/1.1 200");
    assert_eq!(
        get_with(&netns, "/metrics", Some("Bearer s3cret-token")).0,
        200
    );
    assert_eq!(open_stream().0, "HTTP/1.1 503");
    assert_eq!(get_with(&netns, "/readyz", None).0, 200);
    // The refusal and the open stream are in the metrics, for an alert to read.
    let (_, metrics) = get_with(&netns, "/metrics", Some("Bearer s3cret-token"));
    let refused = |limit| {
        support::sample(
            &metrics,
            "collector_http_refused_total",
            &[("limit", limit)],
        )
    };
    assert_eq!(refused("event_streams"), Some(1.0), "{metrics}");
    assert_eq!(refused("requests"), Some(0.0));
    assert_eq!(
        support::sample(&metrics, "collector_http_event_streams", &[]),
        Some(1.0)
    );
    drop(stream);
    // The agent notices the closed stream on its own, without an event to write.
    wait_for(
        "the closed stream's permit to come back",
        Duration::from_secs(10),
        || (open_stream().0 == "HTTP/1.1 200").then_some(()),
    );
    assert!(agent.stop().success());
}

#[test]
fn a_sighup_changes_nothing_and_the_agent_counts_on() {
    let netns = Netns::new();
    let config = AgentConfig::new(WEB_ROUTE);
    let agent = Agent::start(&netns, &config);
    support::connections_3_in_5_out(&netns, 2);
    wait_for_closed(&netns, "web", 2);
    agent.signal(libc::SIGHUP);
    support::connections_3_in_5_out(&netns, 3);
    wait_for_closed(&netns, "web", 5);
    assert!(agent.stop().success());
    support::assert_no_pins(&config.pin_dir);
}

#[test]
fn a_stop_asked_for_while_starting_detaches_what_the_start_attached() {
    let netns = Netns::new();
    let config = AgentConfig::new(WEB_ROUTE);
    let log_path = config.dir.join("agent.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut child = spawn_till_the_maps_are_pinned(&netns, &config, log.into());
    child.signal(libc::SIGTERM);
    let status = wait_for("the agent to exit", Duration::from_secs(20), || {
        child.try_wait()
    });
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(status.success(), "{status}: {log}");
    // Taken during the start (a start that had finished would make this an ordinary stop).
    assert!(log.contains("asked to stop while starting"), "{log}");
    support::assert_no_pins(&config.pin_dir);
}

/// A stop asked for again and again while the programs load (an operator's repeated Ctrl-C, a
/// supervisor sending SIGTERM anew) is one clean stop. Until 2026-12-03 a signal handled
/// during a load interrupted the verifier (EAGAIN), aya loaded the program again with a
/// verifier log, and the next signal interrupted that too: the start failed with "Resource
/// temporarily unavailable" after a page of verifier log (and a single signal made the start
/// take about 12 s of loads with logs instead of 2).
#[test]
fn stop_signals_while_the_programs_load_make_one_clean_stop() {
    let netns = Netns::new();
    let config = AgentConfig::new(WEB_ROUTE);
    let log_path = config.dir.join("agent.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut child = spawn_till_the_maps_are_pinned(&netns, &config, log.into());
    let status = wait_for("the agent to exit", Duration::from_secs(30), || {
        child.signal(libc::SIGTERM);
        child.try_wait()
    });
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(status.success(), "{status}: {log}");
    assert!(log.contains("asked to stop"), "{log}");
    support::assert_no_pins(&config.pin_dir);
}

/// Starts the agent in `netns` with `config` and its log to `stderr`, and waits till its
/// first map is pinned: the maps are made and pinned first, the programs loaded and
/// attached right after.
fn spawn_till_the_maps_are_pinned(
    netns: &Netns,
    config: &AgentConfig,
    stderr: std::process::Stdio,
) -> support::Reaped {
    let child = support::Reaped::spawn(
        netns
            .command(COLLECTOR)
            .args(["run", "--config"])
            .arg(&config.path)
            .stderr(stderr),
    );
    let first_map = config
        .pin_dir
        .join("v1")
        .join(collector_common::map_names::CONN_COUNTERS);
    wait_for("the first map pins", Duration::from_secs(20), || {
        first_map.exists().then_some(())
    });
    child
}

/// The agent's log (stderr) through a FIFO of the test's own, one page deep, read by a thread
/// that the test can stop: a log reader that stops reading (a stuck journald or container
/// log pipe) makes the agent's next log write block.
struct LogPipe {
    path: std::path::PathBuf,
    paused: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl LogPipe {
    /// Creates the FIFO at `path` and starts reading it (the agent opens it to write).
    fn open(path: std::path::PathBuf) -> Self {
        use std::os::{fd::AsRawFd as _, unix::ffi::OsStrExt as _};
        let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
        // SAFETY: a valid C string; mkfifo only creates the file.
        assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
        // Non-blocking: opening the read end does not wait for a writer.
        let fifo = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&path)
            .unwrap();
        // SAFETY: F_SETPIPE_SZ on a pipe we own; the kernel rounds up to a page at least.
        assert!(unsafe { libc::fcntl(fifo.as_raw_fd(), libc::F_SETPIPE_SZ, 4096) } > 0);
        let paused = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reading = std::sync::Arc::clone(&paused);
        thread::spawn(move || {
            let mut fifo = fifo;
            loop {
                if reading.load(std::sync::atomic::Ordering::Relaxed) {
                    thread::sleep(Duration::from_millis(10));
                    continue;
                }
                let mut poll = libc::pollfd {
                    fd: fifo.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one pollfd, ours.
                if unsafe { libc::poll(&raw mut poll, 1, 100) } <= 0 {
                    continue;
                }
                let mut buf = [0u8; 4096];
                match fifo.read(&mut buf) {
                    Ok(n) if n > 0 => {
                        let _ = std::io::stderr().write_all(&buf[..n]);
                    }
                    // Every writer gone (POLLHUP comes only once one has been): the agent
                    // exited.
                    Ok(_) if poll.revents & libc::POLLHUP != 0 => return,
                    _ => {}
                }
            }
        });
        Self { path, paused }
    }

    fn pause(&self, paused: bool) {
        self.paused
            .store(paused, std::sync::atomic::Ordering::Relaxed);
    }

    /// Reading on when dropped: a test that fails while the log is stopped must not leave an
    /// agent that cannot stop.
    fn resumed_on_drop(&self) -> impl Drop + use<> {
        struct Resume(std::sync::Arc<std::sync::atomic::AtomicBool>);
        impl Drop for Resume {
            fn drop(&mut self) {
                self.0.store(false, std::sync::atomic::Ordering::Relaxed);
            }
        }
        Resume(std::sync::Arc::clone(&self.paused))
    }
}

/// A log nobody reads costs log lines, counted, and nothing else: the agent goes on polling,
/// counting and answering. Until 2026-12-02 the first write to a full stderr blocked the
/// thread that made it, the poll loop's among them.
#[test]
fn a_log_nobody_reads_costs_counted_lines_and_stalls_nothing() {
    let netns = Netns::new();
    let config = AgentConfig::new(WEB_ROUTE);
    let log = LogPipe::open(config.dir.join("agent-log"));
    let agent = Agent::start_logging(&netns, &config, &[], &log.path);
    let _resume = log.resumed_on_drop();
    log.pause(true);
    // Each SIGHUP is a log line: more than the queue holds, with the pipe full.
    wait_for("log lines dropped", Duration::from_mins(2), || {
        for _ in 0..200 {
            agent.signal(libc::SIGHUP);
            thread::sleep(Duration::from_micros(200));
        }
        let dropped = support::sample(
            &support::scrape(&netns),
            "collector_log_lines_dropped_total",
            &[],
        )?;
        (dropped > 0.0).then_some(())
    });
    // With the log still unread: polls go on, and count.
    support::connections_3_in_5_out(&netns, 3);
    support::wait_for_closed(&netns, "web", 3);
    let probe = |path: &'static str| netns.run(move || support::get(path).unwrap());
    assert_eq!(probe("/healthz"), (200, "ok\n".to_owned()));
    log.pause(false);
    assert!(agent.stop().success());
    support::assert_no_pins(&config.pin_dir);
}

/// Removes the stall file when dropped: whatever happens, the tool stops waiting, so that
/// the agent can stop.
struct Unstall(std::path::PathBuf);

impl Drop for Unstall {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Gives the `nft` tool `timeout` before it is killed: here, longer than any stall the test
/// makes.
fn nft_may_take(config: &AgentConfig, timeout: Duration) {
    // `[nftables]` ends the file.
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(&config.path)
        .unwrap();
    writeln!(file, "nft_timeout_ms = {}", timeout.as_millis()).unwrap();
}

/// `PATH` with `bin` first.
fn path_with(bin: &std::path::Path) -> String {
    format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

/// Starts the agent with nft on and [`stalling_nft`] in front of the real `nft` (given all
/// the time it needs): the stall file's path and the tool's directory.
fn start_with_stalling_nft(
    netns: &Netns,
    config: &AgentConfig,
) -> (Agent, std::path::PathBuf, std::path::PathBuf) {
    nft_may_take(config, Duration::from_mins(1));
    let stall = config.dir.join("stall");
    let bin = stalling_nft(&config.dir, &stall);
    let mut launcher = netns.command(COLLECTOR);
    launcher.env("PATH", path_with(&bin));
    (Agent::spawn(netns, launcher, config, &[]), stall, bin)
}

/// `nft list tables` in `netns`.
fn nft_tables(netns: &Netns) -> String {
    support::stdout_of(std::process::Command::new("ip").args([
        "netns",
        "exec",
        &netns.name,
        "nft",
        "list",
        "tables",
    ]))
}

/// A stop removes the programs and pins before the nftables table: a hung `nft` (its lock
/// held by a firewall reload) then holds only the table, and the supervisor's kill that
/// follows leaves no program attached to the host.
#[test]
fn a_stop_detaches_the_programs_before_it_waits_on_nft() {
    let netns = Netns::new();
    let config = AgentConfig::with_nft(WEB_ROUTE);
    let (agent, stall, _) = start_with_stalling_nft(&netns, &config);
    let table = || nft_tables(&netns);
    assert!(table().contains(&config.nft_table), "{}", table());

    let layout = config.pin_dir.join("v1");
    let links = link_ids(&layout.join("links"));
    assert!(!links.is_empty());
    std::fs::write(&stall, "").unwrap();
    let unstall = Unstall(stall.clone());
    agent.signal(libc::SIGTERM);
    wait_for(
        "the pins to go while nft hangs",
        Duration::from_secs(20),
        || (!layout.exists()).then_some(()),
    );
    // The programs are detached, not only unpinned: the links are gone from the kernel
    // while the agent still waits on nft.
    for id in &links {
        wait_for(
            &format!("link {id} to be released while nft hangs"),
            Duration::from_secs(5),
            || link_gone(*id).then_some(()),
        );
    }
    let state = std::fs::read_to_string(format!("/proc/{}/stat", agent.pid())).unwrap();
    let state = state.rsplit(") ").next().unwrap().chars().next().unwrap();
    assert_ne!(state, 'Z', "the agent exited without waiting on nft");
    assert!(
        table().contains(&config.nft_table),
        "the table went before nft was let go"
    );

    drop(unstall);
    assert!(agent.stop().success());
    assert!(!table().contains(&config.nft_table), "{}", table());
    support::assert_no_pins(&config.pin_dir);
}

/// A table made again while the agent runs is made on a thread of its own: an `nft` that
/// hangs holds that thread, and the polls go on. Until 2026-12-03 it held the poll loop.
#[test]
fn a_stuck_nft_making_the_table_again_holds_up_no_poll() {
    let netns = Netns::new();
    let config = AgentConfig::with_nft(WEB_ROUTE);
    let (agent, stall, bin) = start_with_stalling_nft(&netns, &config);
    let tables = || nft_tables(&netns);
    assert!(tables().contains(&config.nft_table), "{}", tables());

    // Our table goes (a firewall reload); a poll makes it again with `nft`, which hangs.
    std::fs::write(&stall, "").unwrap();
    let unstall = Unstall(stall.clone());
    support::run(
        "ip",
        &["netns", "exec", &netns.name, "nft", "flush", "ruleset"],
    );
    let script = bin.join("nft").display().to_string();
    wait_for(
        "the agent to run the stuck nft",
        Duration::from_secs(20),
        || children_running(agent.pid(), &script).then_some(()),
    );
    // Polls go on meanwhile: these connections are counted only by a poll after them.
    support::connections_3_in_5_out(&netns, 2);
    wait_for_closed(&netns, "web", 2);
    assert!(
        children_running(agent.pid(), &script),
        "nft stopped hanging"
    );
    assert_eq!(
        netns.run(|| support::get("/healthz")).unwrap(),
        (200, "ok\n".to_owned())
    );

    drop(unstall);
    wait_for(
        "the table to be made again",
        Duration::from_secs(20),
        || {
            let metrics = scrape(&netns);
            (tables().contains(&config.nft_table)
                && sample(&metrics, "collector_source_up", &[("source", "nft")]) == Some(1.0))
            .then_some(())
        },
    );
    assert!(agent.stop().success());
    assert!(!tables().contains(&config.nft_table), "{}", tables());
    support::assert_no_pins(&config.pin_dir);
}

/// Some child of `pid` (of any of its threads) runs `program` (a script: its interpreter's
/// command line names it).
fn children_running(pid: u32, program: &str) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("children")).ok())
        .flat_map(|children| {
            children
                .split_whitespace()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .filter_map(|child| std::fs::read(format!("/proc/{child}/cmdline")).ok())
        .any(|cmdline| {
            cmdline
                .split(|&b| b == 0)
                .any(|arg| arg == program.as_bytes())
        })
}

/// Removes a directory in bpffs (the host's) whatever happens to the test.
struct RemoveAll(std::path::PathBuf);

impl Drop for RemoveAll {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Something not ours among the link pins (a directory someone made) is left alone: the
/// stop removes every pin of ours around it, and the next start runs. Until 2026-12-02 the
/// stop gave up at it with every map pinned, and every later start was refused.
#[test]
fn a_directory_among_the_link_pins_is_left_alone() {
    let netns = Netns::new();
    let config = AgentConfig::new(WEB_ROUTE);
    let _remove = RemoveAll(config.pin_dir.clone());
    let stray = config.pin_dir.join("v1").join("links").join("stray");
    let agent = Agent::start(&netns, &config);
    std::fs::create_dir(&stray).unwrap();

    let status = agent.stop_within(libc::SIGTERM, Duration::from_secs(30));
    assert_eq!(status.map(|status| status.success()), Some(true));
    assert_eq!(walk(&config.pin_dir), std::slice::from_ref(&stray));

    let agent = Agent::start(&netns, &config);
    support::connections_3_in_5_out(&netns, 2);
    wait_for_closed(&netns, "web", 2);
    assert!(
        agent
            .stop_within(libc::SIGTERM, Duration::from_secs(30))
            .is_some_and(|s| s.success())
    );
    assert_eq!(walk(&config.pin_dir), std::slice::from_ref(&stray));
}

/// A link pin the stop cannot remove (a mount over it: EBUSY) is named, the stop exits 1,
/// and what a crash leaves stays: `sock_ops` goes only after every other link, the
/// loopback links only after the other tc links, so here (the server name reader's link
/// stuck) `sock_ops` stays attached and keeps the connection table true, with the loopback
/// links, the owner and the maps; the next start takes the set over, the connections
/// closed meanwhile counted.
#[test]
fn a_stuck_reader_link_keeps_what_a_crash_keeps() {
    a_stuck_link_keeps_what_a_crash_keeps(
        |name| name == "cgroup_skb_server_names",
        &["cgroup_skb_server_names", "sock_ops", "tc_loopback_"],
    );
}

/// As above, the loopback link stuck: `sock_ops`, which goes after it, stays too.
#[test]
fn a_stuck_loopback_link_keeps_what_a_crash_keeps() {
    a_stuck_link_keeps_what_a_crash_keeps(
        |name| name.starts_with("tc_loopback_"),
        &["sock_ops", "tc_loopback_"],
    );
}

/// Mounts over the link pin `stuck` picks, stops the agent, and checks that the link pins
/// left are those `kept` names (sorted; a name ending in `_` stands for that prefix), the
/// maps with them, and that the next start counts the connections closed meanwhile.
fn a_stuck_link_keeps_what_a_crash_keeps(stuck: fn(&str) -> bool, kept: &[&str]) {
    /// Unmounts whatever happens to the test.
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let netns = Netns::new();
    // A port shared by name: the server name reader's link is pinned too. With the
    // nftables table, which stays with the pins.
    let config = AgentConfig::with_nft(&format!(
        "{WEB_ROUTE}\n[[routes]]\nname = \"named\"\nports = [18443]\ntype = \"https\"\n\
         sni = [\"a.test\"]\n\n[[routes]]\nname = \"rest\"\nports = [18443]\ntype = \"https\"\n"
    ));
    let logs = ScratchDir::new("stuck-link");
    let log = logs.path("agent.log");
    let agent = Agent::start_logging(&netns, &config, &[], &log);
    support::connections_3_in_5_out(&netns, 2);
    wait_for_closed(&netns, "web", 2);
    let layout = config.pin_dir.join("v1");
    let links_dir = layout.join("links");
    let link_names = || {
        let mut names: Vec<String> = std::fs::read_dir(&links_dir)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    let stuck = links_dir.join(
        link_names()
            .into_iter()
            .find(|name| stuck(name))
            .expect("the link to hold"),
    );
    let cover = logs.path("cover");
    std::fs::write(&cover, "").unwrap();
    support::run(
        "mount",
        &["--bind", cover.to_str().unwrap(), stuck.to_str().unwrap()],
    );
    let unmount = Unmount(stuck.clone());

    let status = agent.stop_within(libc::SIGTERM, Duration::from_secs(30));
    assert_eq!(status.map(|status| status.success()), Some(false));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains(&stuck.display().to_string()), "{text}");
    let left = link_names();
    let matches = |name: &String, kept: &&str| {
        if kept.ends_with('_') {
            name.starts_with(kept)
        } else {
            name == kept
        }
    };
    assert!(
        left.len() == kept.len()
            && left
                .iter()
                .zip(kept)
                .all(|(name, kept)| matches(name, kept)),
        "left {left:?}, expected {kept:?}"
    );
    let pins = walk(&config.pin_dir);
    for map in collector_common::PINNED_MAPS {
        assert!(pins.contains(&layout.join(map)), "{map} went: {pins:?}");
    }
    let tables = || support::stdout_of(netns.command("nft").args(["list", "tables"]));
    let ours = format!("table inet {}\n", config.nft_table);
    assert!(tables().contains(&ours), "the table went: {}", tables());

    // `sock_ops` still counts into the maps, and the next start takes them over.
    drop(unmount);
    support::connections_3_in_5_out(&netns, 3);
    let agent = Agent::start_logging(&netns, &config, &[], &logs.path("second.log"));
    wait_for_closed(&netns, "web", 5);
    assert_eq!(
        sample(
            &scrape(&netns),
            "collector_proxy_connections_active",
            &[("route", "web")]
        ),
        Some(0.0)
    );
    assert!(text_of(&logs.path("second.log")).contains("adopting the nftables table"));
    assert!(agent.stop().success());
    support::assert_no_pins(&config.pin_dir);
    assert!(!tables().contains(&ours), "{}", tables());
}

fn text_of(path: &std::path::Path) -> String {
    std::fs::read_to_string(path).unwrap()
}

/// Every file and directory with nothing in it under `dir`.
fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut leaves = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() && std::fs::read_dir(&path).unwrap().next().is_some() {
            leaves.extend(walk(&path));
        } else {
            leaves.push(path);
        }
    }
    leaves
}

/// An `nft` in front of the real one that waits while `stall` exists: a tool that hangs, as
/// one blocked on the nftables lock or a slow kernel would.
fn stalling_nft(dir: &std::path::Path, stall: &std::path::Path) -> std::path::PathBuf {
    let real = std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .map(|dir| std::path::Path::new(dir).join("nft"))
        .find(|path| path.exists())
        .expect("nft on PATH (cargo xtask prereqs installs it)");
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let script = bin.join("nft");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nwhile [ -e {} ]; do sleep 0.05; done\nexec {} \"$@\"\n",
            stall.display(),
            real.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    bin
}

/// Stops the agent's main thread, which runs the poll loop, and only it: ptrace stops the
/// one thread it is attached to, and the HTTP server and the watchdog's feeding run on the
/// async runtime's workers. Resumes it when dropped; the same thread must drop it.
struct Frozen(libc::pid_t);

impl Frozen {
    /// Stops the thread where it waits (for the next tick), not in the middle of a poll,
    /// where it may hold a lock that the HTTP server's tasks then wait on.
    fn main_thread(pid: u32) -> Self {
        let pid = libc::pid_t::try_from(pid).unwrap();
        let waiting = [libc::SYS_futex, libc::SYS_epoll_wait, libc::SYS_epoll_pwait];
        for _ in 0..1000 {
            // SAFETY: plain system calls on a child of ours; no memory is passed but the
            // status.
            unsafe {
                assert_eq!(
                    libc::ptrace(libc::PTRACE_SEIZE, pid, 0, 0),
                    0,
                    "{}",
                    std::io::Error::last_os_error()
                );
                assert_eq!(libc::ptrace(libc::PTRACE_INTERRUPT, pid, 0, 0), 0);
                let mut status = 0;
                assert_eq!(libc::waitpid(pid, &raw mut status, libc::__WALL), pid);
            }
            let frozen = Self(pid);
            // The first field: the system call it is in, or "running".
            let syscall = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/syscall"))
                .unwrap_or_default();
            let number = syscall
                .split_whitespace()
                .next()
                .and_then(|n| n.parse().ok());
            if number.is_some_and(|n: i64| waiting.contains(&n)) {
                return frozen;
            }
            drop(frozen);
            thread::sleep(Duration::from_millis(7));
        }
        panic!("the agent's main thread was never found waiting");
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        // SAFETY: as above.
        unsafe { libc::ptrace(libc::PTRACE_DETACH, self.0, 0, 0) };
    }
}

#[test]
fn health_fails_while_the_poll_loop_is_stuck_and_recovers_when_it_runs_again() {
    // `serve::stall_limit` at the tests' 100 ms poll interval.
    const STALL_LIMIT: Duration = Duration::from_mins(1);
    let netns = Netns::new();
    let config = AgentConfig::new(WEB_ROUTE);
    // systemd's watchdog, fed every 500 ms while the loop runs, by the same measure: the
    // feeds as they arrive, read all along as systemd reads them.
    let notify_path = config.dir.join("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    let fed_at = std::sync::Arc::new(std::sync::Mutex::new(Vec::<std::time::Instant>::new()));
    {
        let fed_at = std::sync::Arc::clone(&fed_at);
        thread::spawn(move || {
            let mut buf = [0u8; 64];
            while let Ok(len) = notify.recv(&mut buf) {
                if &buf[..len] == b"WATCHDOG=1\n" {
                    fed_at.lock().unwrap().push(std::time::Instant::now());
                }
            }
        });
    }
    let feeds_since = |since: std::time::Instant| {
        fed_at
            .lock()
            .unwrap()
            .iter()
            .filter(|&&at| at > since)
            .count()
    };
    let mut launcher = netns.command(COLLECTOR);
    launcher
        .env("NOTIFY_SOCKET", &notify_path)
        .env("WATCHDOG_USEC", "1000000");
    let agent = Agent::spawn(&netns, launcher, &config, &[]);
    let probe = |path: &'static str| netns.run(move || support::get(path).unwrap());
    assert_eq!(probe("/healthz"), (200, "ok\n".to_owned()));

    // The poll loop stops, as one stuck in a read that never returns would.
    let frozen = Frozen::main_thread(agent.pid());
    let (status, body) = wait_for(
        "/healthz to fail",
        STALL_LIMIT + Duration::from_secs(30),
        || {
            let answer = probe("/healthz");
            (answer.0 != 200).then_some(answer)
        },
    );
    assert_eq!(status, 503, "{body}");
    assert!(body.starts_with("no poll finished for "), "{body}");
    // Readiness is not liveness: a proxy pod's sidecar stays ready.
    assert_eq!(probe("/readyz").0, 200);
    // Nor is the watchdog fed any more (it was before): none in four periods of feeding,
    // after a margin of two for feeds already on their way when the stall was seen (sent
    // before, they are stamped when this process's reader gets a turn).
    assert!(!fed_at.lock().unwrap().is_empty(), "never fed");
    let stuck = std::time::Instant::now() + Duration::from_secs(1);
    thread::sleep(Duration::from_secs(3));
    assert_eq!(feeds_since(stuck), 0, "fed while stuck");

    drop(frozen);
    wait_for("/healthz to pass again", Duration::from_secs(10), || {
        (probe("/healthz").0 == 200).then_some(())
    });
    let running = std::time::Instant::now();
    wait_for(
        "the watchdog to be fed again",
        Duration::from_secs(5),
        || (feeds_since(running) > 0).then_some(()),
    );
    // A stop seconds after the stall is still taken for the probes' restart (the kubelet's
    // kill may come after the loop ran again): everything stays for the next start.
    let status = agent.stop();
    assert!(!status.success(), "{status:?}");
    assert!(config.pin_dir.join("v1").exists(), "the pins were removed");
    assert!(Agent::start(&netns, &config).stop().success());
    support::assert_no_pins(&config.pin_dir);
}

/// A stop asked while the poll loop stands still past `/healthz`'s limit is the kubelet's
/// restart after failed liveness probes, most likely: the agent leaves everything, as a
/// crash does, and the next start carries the counts on, also when the stall ends within
/// the kill's grace (a clean stop then reset them all).
#[test]
fn a_stop_asked_while_the_poll_loop_stood_still_keeps_the_counts_for_the_next_start() {
    // `serve::stall_limit` at the tests' 100 ms poll interval.
    const STALL_LIMIT: Duration = Duration::from_mins(1);
    let netns = Netns::new();
    let config = AgentConfig::new(WEB_ROUTE);
    let logs = ScratchDir::new("stalled-stop");
    let (first, second) = (logs.path("first.log"), logs.path("second.log"));
    let agent = Agent::start_logging(&netns, &config, &[], &first);
    support::connections_3_in_5_out(&netns, 2);
    wait_for_closed(&netns, "web", 2);
    let frozen = Frozen::main_thread(agent.pid());
    wait_for(
        "/healthz to fail",
        STALL_LIMIT + Duration::from_secs(30),
        || (netns.run(|| support::get("/healthz").unwrap()).0 == 503).then_some(()),
    );
    // The kubelet's SIGTERM, then the stall ends within its grace.
    agent.signal(libc::SIGTERM);
    thread::sleep(Duration::from_millis(500));
    drop(frozen);
    let status = agent.stop();
    assert!(!status.success(), "{status:?}");
    support::logged_lines(
        &first,
        "asked to stop during, or right after, a stall of the poll",
    );
    support::logged_lines(
        &first,
        "stopping on an error: programs, pins and the nftables table stay",
    );
    assert!(config.pin_dir.join("v1").exists(), "the pins were removed");

    let agent = Agent::start_logging(&netns, &config, &[], &second);
    assert!(support::running_line(&second).contains("inherited=true"));
    // The first run's 2, and 2 more.
    support::connections_3_in_5_out(&netns, 2);
    wait_for_closed(&netns, "web", 4);
    assert!(agent.stop().success());
    support::assert_no_pins(&config.pin_dir);
}

/// Under systemd (`Type=notify`, `WatchdogSec=`), the agent says it is ready once it serves
/// its first poll's figures, feeds the watchdog every half period while it polls, and says
/// when a clean stop begins.
#[test]
fn systemd_is_told_ready_fed_and_stopping() {
    use std::os::unix::net::UnixDatagram;
    let netns = Netns::new();
    let config = AgentConfig::new(WEB_ROUTE);
    let dir = ScratchDir::new("notify");
    let socket_path = dir.path("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let next = || {
        let mut buf = [0u8; 256];
        let len = socket.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..len]).into_owned()
    };
    let mut launcher = netns.command(COLLECTOR);
    // A 400 ms watchdog: fed every 200 ms.
    launcher
        .env("NOTIFY_SOCKET", &socket_path)
        .env("WATCHDOG_USEC", "400000");
    let agent = Agent::spawn_until(&netns, launcher, &config, &[], || true);

    assert_eq!(next(), "READY=1\n");
    // Ready means serving, a first poll done: figures, not the empty ones of a start.
    assert_eq!(
        netns.run(|| support::get("/readyz")).unwrap().0,
        200,
        "ready before the first poll"
    );
    for _ in 0..5 {
        assert_eq!(next(), "WATCHDOG=1\n");
    }

    // The datagrams wait in the socket: the stop first, then what it said.
    assert!(agent.stop().success());
    let mut after_feeds = next();
    while after_feeds == "WATCHDOG=1\n" {
        after_feeds = next();
    }
    assert_eq!(after_feeds, "STOPPING=1\n");
    // And nothing after it: the agent has exited, so anything left would be waiting.
    socket.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 256];
    let late = socket
        .recv(&mut buf)
        .map(|len| String::from_utf8_lossy(&buf[..len]).into_owned());
    assert!(late.is_err(), "{late:?} after STOPPING=1");
    support::assert_no_pins(&config.pin_dir);
}

/// The JSON says how often its figures are read and how old they are, by the agent's own
/// clock: a client tells figures the polls keep moving from figures left standing.
#[test]
fn the_json_figures_say_how_old_they_are() {
    let netns = Netns::new();
    let config = AgentConfig::new(WEB_ROUTE);
    let started = support::wall_ms();
    let agent = Agent::start(&netns, &config);
    let read_at = |json: fn(&Netns) -> serde_json::Value| {
        let before = support::wall_ms();
        let json = json(&netns);
        let after = support::wall_ms();
        // The tests' agents poll every 100 ms.
        assert_eq!(json["pollIntervalMs"], 100, "{json}");
        let age = json["ageMs"].as_u64().unwrap_or_else(|| panic!("{json}"));
        let timestamp = json["timestamp"]
            .as_u64()
            .unwrap_or_else(|| panic!("{json}"));
        // A poll's read of this run's, as old as it says at the answer (each figure whole
        // milliseconds, cut down).
        assert!(
            timestamp >= started,
            "{json} read before the start at {started}"
        );
        assert!(
            (before..=after + 1).contains(&(timestamp + age + 1)),
            "{json}: answered between {before} and {after}"
        );
        timestamp
    };
    for json in [support::proxy_json, support::dns_json] {
        let first = read_at(json);
        support::after_polls(&netns, 2);
        assert!(read_at(json) > first, "the figures were not read again");
    }
    assert!(agent.stop().success());
}

/// A test run killed before its guards ran (a Ctrl-C, a CI timeout) leaves its namespace,
/// and an agent there still counting, its `sock_ops` program on the host's cgroup root. The
/// next run's first namespace sweeps them: the agent gets SIGTERM and stops cleanly, the
/// namespace goes; a running test's namespace stays. An agent killed with its run leaves
/// its pins, which the sweep removes.
#[test]
fn a_killed_test_runs_namespace_and_agent_are_swept_by_the_next_run() {
    // The sweep at the first namespace of this process is over once this returns.
    let live = Netns::new();
    let mut exited = Command::new("true").spawn().unwrap();
    let gone = exited.id();
    exited.wait().unwrap();
    let stale = Netns {
        name: format!("colltest-{gone}-0"),
    };
    support::run("ip", &["netns", "add", &stale.name]);
    support::run("ip", &["-n", &stale.name, "link", "set", "lo", "up"]);
    let config = AgentConfig::new(WEB_ROUTE);
    let agent = Agent::start(&stale, &config);
    // Killed with its run: its pins stay, under a directory named after the run.
    let killed_pins = std::path::PathBuf::from(format!("/sys/fs/bpf/collector-test-{gone}-1"));
    // Where an assert fails before the sweep: its pins hold a `sock_ops` link on the host's
    // cgroup root.
    let _killed_pins = support::RemovedOnDrop(killed_pins.clone());
    let killed_config = AgentConfig::new(WEB_ROUTE);
    Agent::start_with(
        &live,
        &killed_config,
        &["--pin-dir", killed_pins.to_str().unwrap()],
    )
    .kill();
    assert!(killed_pins.join("v1").is_dir());
    // orphans.rs gives its agents pin directories inside one of its own: swept one level
    // down, with what cleanup leaves there (an empty one: a start killed before its pins).
    let killed_parent = std::path::PathBuf::from(format!("/sys/fs/bpf/orphans-test-{gone}-3"));
    let _killed_parent = support::RemovedOnDrop(killed_parent.clone());
    std::fs::create_dir_all(killed_parent.join("early")).unwrap();
    let pod_pins = killed_parent.join("pod");
    Agent::start_with(
        &live,
        &killed_config,
        &["--pin-dir", pod_pins.to_str().unwrap()],
    )
    .kill();
    assert!(pod_pins.join("v1").is_dir());
    // Its temporary directories stay too; this run's are left alone.
    let killed_temp = ["unbound", "collector-scratch", "collector-test"]
        .map(|prefix| std::env::temp_dir().join(format!("{prefix}-{gone}-2")));
    let _killed_temp = killed_temp.clone().map(support::RemovedOnDrop);
    for dir in &killed_temp {
        std::fs::create_dir(dir).unwrap();
    }
    let live_temp = support::ScratchDir::new("sweep");

    support::sweep_killed_runs();
    assert!(!killed_pins.exists(), "{} left", killed_pins.display());
    assert!(!killed_parent.exists(), "{} left", killed_parent.display());
    for dir in &killed_temp {
        assert!(!dir.exists(), "{} left", dir.display());
    }
    assert!(live_temp.0.is_dir());

    let listed = support::stdout_of(Command::new("ip").args(["netns", "list"]));
    let listed_names: Vec<&str> = listed
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .collect();
    assert!(!listed_names.contains(&stale.name.as_str()), "{listed}");
    assert!(listed_names.contains(&live.name.as_str()), "{listed}");
    // Gone: nothing left for its guard to remove.
    std::mem::forget(stale);
    // Already ended: no signal, no wait beyond a moment.
    let status = agent
        .stop_within(0, Duration::from_secs(1))
        .expect("the swept agent still ran");
    assert!(status.success(), "{status}");
    support::assert_no_pins(&config.pin_dir);
}

/// The config is read at the start only. An edit of the file shows in `/metrics` and the log
/// within a poll: one a start would accept as not applied, one a start would refuse with its
/// line, or for a token file it names that is not there; a comment alone, or the file back as
/// it was, reads as the running config.
#[test]
fn an_edited_config_file_is_reported_until_the_next_start() {
    let netns = Netns::new();
    let config = AgentConfig::new(WEB_ROUTE);
    let logs = ScratchDir::new("config-edit");
    let log = logs.path("agent.log");
    let agent = Agent::start_logging(&netns, &config, &[], &log);
    let original = std::fs::read_to_string(&config.path).unwrap();
    let state = config_file_state;
    assert_eq!(state(&scrape(&netns)), (Some(1.0), Some(1.0)));
    // A change is read a poll after the one that finds it, so three polls: the first may
    // have looked before it.
    let replace = |text: &str| replace_config(&config, text);
    replace(&format!("# the proxy's routes\n{original}"));
    assert_eq!(
        state(&support::after_polls(&netns, 3)),
        (Some(1.0), Some(1.0))
    );
    replace(&original.replace("18080", "18081"));
    assert_eq!(
        state(&support::after_polls(&netns, 3)),
        (Some(1.0), Some(0.0))
    );
    support::logged_lines(
        &log,
        "changed since the start: the change applies at the next start",
    );
    let refused = original.replace("type = \"http\"", "type = \"htp\"");
    let line = 1 + refused.lines().position(|l| l.contains("htp")).unwrap();
    replace(&refused);
    assert_eq!(
        state(&support::after_polls(&netns, 3)),
        (Some(0.0), Some(0.0))
    );
    let said = support::logged_lines(&log, "would be refused at the next start");
    let at = format!("{}:{line}:", config.path.display());
    assert!(said[0].contains(&at), "{at} not in {said:?}");
    // Said once, not at every poll.
    support::after_polls(&netns, 3);
    assert_eq!(
        support::logged_lines(&log, "would be refused at the next start").len(),
        1
    );
    // Its lines are fine, but a start would not find the token file it names.
    replace(&format!(
        "{original}[http]\nbearer_token_file = \"/nonexistent/token\"\n"
    ));
    assert_eq!(
        state(&support::after_polls(&netns, 3)),
        (Some(0.0), Some(0.0))
    );
    let said = support::logged_lines(&log, "would be refused at the next start");
    assert!(
        said.len() == 2 && said[1].contains("/nonexistent/token"),
        "{said:?}"
    );
    replace(&original);
    assert_eq!(
        state(&support::after_polls(&netns, 3)),
        (Some(1.0), Some(1.0))
    );
    support::logged_lines(&log, "reads as the running config again");
    // Nothing of it changed what runs: the route still counts on its port.
    support::connections_3_in_5_out(&netns, 2);
    wait_for_closed(&netns, "web", 2);
    assert!(agent.stop().success());
}

/// The agent's judgement of its config file: `collector_config_file_valid` and `_applied`.
fn config_file_state(metrics: &str) -> (Option<f64>, Option<f64>) {
    (
        sample(metrics, "collector_config_file_valid", &[]),
        sample(metrics, "collector_config_file_applied", &[]),
    )
}

/// Replaces `config`'s file as a `ConfigMap`'s is replaced: a new file renamed over it.
fn replace_config(config: &AgentConfig, text: &str) {
    let next = config.path.with_extension("next");
    std::fs::write(&next, text).unwrap();
    std::fs::rename(&next, &config.path).unwrap();
}

/// An edit whose lines are fine, but which a start on this host would refuse for what it
/// names there: a pin directory off bpffs, a listen address no interface here has (a file
/// shared by many hosts), a cgroup2 path that is no cgroup2 mount. A start checks both, and so does the watch: the file reads as not
/// valid, and the log says why.
#[test]
fn an_edited_config_file_a_start_here_would_refuse_is_reported() {
    let netns = Netns::new();
    let config = AgentConfig::new(WEB_ROUTE);
    let logs = ScratchDir::new("config-edit-host");
    let log = logs.path("agent.log");
    let agent = Agent::start_logging(&netns, &config, &[], &log);
    let original = std::fs::read_to_string(&config.path).unwrap();
    let edit = |key: &str, line: &str| {
        let old = original.lines().find(|old| old.starts_with(key)).unwrap();
        original.replace(old, line)
    };
    for (count, (edited, named)) in [
        (
            edit("pin_dir = ", "pin_dir = \"/run/collector-nowhere\""),
            "/run/collector-nowhere is not on a bpffs mount",
        ),
        (
            edit("listen = ", "listen = \"203.0.113.9:9464\""),
            "no interface of this network namespace has 203.0.113.9",
        ),
        (
            format!("cgroup2 = \"/tmp\"\n{original}"),
            "cgroup2 path /tmp is not a mounted cgroup2 filesystem",
        ),
    ]
    .into_iter()
    .enumerate()
    {
        replace_config(&config, &edited);
        assert_eq!(
            config_file_state(&support::after_polls(&netns, 3)),
            (Some(0.0), Some(0.0)),
            "{edited}"
        );
        let said = support::logged_lines(&log, "would be refused at the next start");
        assert!(
            said.len() == 1 + count && said[count].contains(named),
            "{said:?}"
        );
    }
    replace_config(&config, &original);
    assert_eq!(
        config_file_state(&support::after_polls(&netns, 3)),
        (Some(1.0), Some(1.0))
    );
    assert!(agent.stop().success());
}

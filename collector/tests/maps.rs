//! `collector maps` as a separate process against the pinned maps: while the agent runs, and
//! from the pins alone after it crashed.
#![expect(
    clippy::cast_precision_loss,
    reason = "OpenMetrics values are floats; the counts compared are small integers, exact in f64"
)]

mod support;

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    thread,
    time::Duration,
};

use collector_common::{MAX_ROUTES, PIN_LAYOUT, map_names};
use support::{Agent, AgentConfig, COLLECTOR, Netns, sample, scrape, wait_for};

const ROUTES: &str = "[[routes]]\nname = \"web\"\nports = [18080]\ntype = \"http\"\n";
const DONE: usize = 10;
const HELD: usize = 5;

/// `DONE` connections made and closed, `HELD` more left open: (client ends, server ends).
fn done_and_held(netns: &Netns) -> (Vec<TcpStream>, Vec<TcpStream>) {
    let listener = netns.run(|| TcpListener::bind("127.0.0.1:18080").unwrap());
    let server = thread::spawn(move || {
        let mut held = Vec::new();
        for n in 0..DONE + HELD {
            let (mut stream, _) = listener.accept().unwrap();
            let mut buf = [0u8; 4];
            stream.read_exact(&mut buf).unwrap();
            stream.write_all(b"pong!").unwrap();
            if n >= DONE {
                held.push(stream);
            }
        }
        held
    });
    let clients = netns.run(|| {
        let mut open = Vec::new();
        for n in 0..DONE + HELD {
            let mut stream = TcpStream::connect("127.0.0.1:18080").unwrap();
            stream.write_all(b"ping").unwrap();
            let mut buf = [0u8; 5];
            stream.read_exact(&mut buf).unwrap();
            if n >= DONE {
                open.push(stream);
            } else {
                drop(stream);
            }
        }
        open
    });
    let held = server.join().unwrap();
    (clients, held)
}

/// `maps watch` of the route counters: the value, then its change per second.
fn assert_watch_shows_opened(config: &AgentConfig, opened_count: usize) {
    // A refreshing view of the same map: its numbers, then their change per second.
    let watch = std::process::Command::new(COLLECTOR)
        .args([
            "maps",
            "watch",
            map_names::CONN_COUNTERS,
            "--count",
            "2",
            "--interval-ms",
            "200",
        ])
        .arg("--config")
        .arg(&config.path)
        .output()
        .unwrap();
    assert!(
        watch.status.success(),
        "{}",
        String::from_utf8_lossy(&watch.stderr)
    );
    let text = String::from_utf8_lossy(&watch.stdout);
    // Into a pipe, the views follow one another (no screen clearing), each under its
    // header.
    assert!(!text.contains('\x1b'), "{text:?}");
    // Each header says when its view was read (HH:MM:SS UTC).
    let headers: Vec<&str> = text
        .lines()
        .filter(|line| line.starts_with("CONN_COUNTERS every 0.2 s, "))
        .collect();
    assert_eq!(headers.len(), 2, "{text}");
    assert!(
        headers
            .iter()
            .all(|header| header.ends_with(" UTC") && header.len() == 39),
        "{headers:?}"
    );
    let last_view = text.rsplit("FIELD").next().unwrap();
    let opened = last_view
        .lines()
        .find(|line| line.starts_with("slot0.opened"))
        .unwrap_or_else(|| panic!("{text}"));
    // Value 15, and a rate (0.0: no new connections between the two refreshes).
    assert_eq!(
        opened.split_whitespace().collect::<Vec<_>>(),
        ["slot0.opened", &opened_count.to_string(), "0.0"]
    );
}

/// Lines of `reader` as they come, on a channel: a test follows a running command's output.
fn lines_of(reader: impl Read + Send + 'static) -> std::sync::mpsc::Receiver<String> {
    let (send, receive) = std::sync::mpsc::channel();
    thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(reader)) {
            let Ok(line) = line else { break };
            if send.send(line).is_err() {
                break;
            }
        }
    });
    receive
}

/// The next line from `lines` for which `wanted` says so, within 30 s; the lines passed
/// over are added to `seen`.
fn next_line(
    lines: &std::sync::mpsc::Receiver<String>,
    seen: &mut Vec<String>,
    wanted: impl Fn(&str) -> bool,
) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let line = lines
            .recv_timeout(left)
            .unwrap_or_else(|err| panic!("{err}; the lines so far:\n{}", seen.join("\n")));
        seen.push(line.clone());
        if wanted(&line) {
            return line;
        }
    }
}

/// `maps watch` goes on over a restart of the agent: a read while the pins are gone is
/// said on standard error and tried again, and a count the new run starts from zero gets no
/// rate, where it read as a large negative one.
#[test]
fn a_watch_goes_on_over_a_restart_and_gives_a_reset_count_no_rate() {
    let netns = Netns::new();
    let config = AgentConfig::new(ROUTES);
    let agent = Agent::start(&netns, &config);
    drop(done_and_held(&netns));
    support::wait_for_closed(&netns, "web", u32::try_from(DONE + HELD).unwrap());
    let mut watch = support::Reaped::spawn(
        std::process::Command::new(COLLECTOR)
            .args([
                "maps",
                "watch",
                map_names::CONN_COUNTERS,
                "--interval-ms",
                "200",
            ])
            .arg("--config")
            .arg(&config.path)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped()),
    );
    let (stdout, stderr) = (
        lines_of(watch.stdout().unwrap()),
        lines_of(watch.stderr().unwrap()),
    );
    let mut seen = Vec::new();
    let opened = |line: &str| -> Option<Vec<String>> {
        let fields: Vec<String> = line.split_whitespace().map(str::to_owned).collect();
        (fields.first().map(String::as_str) == Some("slot0.opened")).then_some(fields)
    };
    let before = (DONE + HELD).to_string();
    next_line(&stdout, &mut seen, |line| {
        opened(line).is_some_and(|fields| fields[1] == before)
    });
    // A clean stop removes the pins: the next reads fail, and the watch says so and goes on.
    assert!(agent.stop().success());
    let mut errors = Vec::new();
    next_line(&stderr, &mut errors, |line| {
        line.starts_with("reading CONN_COUNTERS failed")
    });
    assert_eq!(watch.try_wait(), None, "the watch ended: {errors:?}");
    let agent = Agent::start(&netns, &config);
    // The new run's count, from zero: below the last one read, so no rate.
    let after = next_line(&stdout, &mut seen, |line| {
        opened(line).is_some_and(|fields| fields[1] != before)
    });
    // Nothing opened since (the held connections are open from before, not opened).
    assert_eq!(opened(&after).unwrap()[1], "0", "{after}");
    assert_eq!(opened(&after).unwrap()[2], "-", "{after}");
    next_line(&stderr, &mut errors, |line| {
        line == "reading CONN_COUNTERS again"
    });
    // And the next refresh has one again.
    let next = next_line(&stdout, &mut seen, |line| opened(line).is_some());
    assert_eq!(opened(&next).unwrap()[2], "0.0", "{next}");
    assert!(
        !seen.iter().any(|line| line
            .split_whitespace()
            .nth(2)
            .is_some_and(|rate| rate.starts_with('-') && rate.len() > 1)),
        "a negative rate: {}",
        seen.join("\n")
    );
    drop(watch);
    assert!(agent.stop().success());
}

/// A directory moved aside (renamed) until dropped, when it goes back, the test passed or
/// not: the agent's stop removes its pins where they were.
struct MovedAway(std::path::PathBuf, std::ffi::OsString);

impl MovedAway {
    fn new(dir: &std::path::Path) -> Self {
        let mut aside = dir.as_os_str().to_owned();
        aside.push("-moved");
        std::fs::rename(dir, &aside).unwrap();
        Self(dir.to_owned(), aside)
    }
}

impl Drop for MovedAway {
    fn drop(&mut self) {
        let _ = std::fs::rename(&self.1, &self.0);
    }
}

/// A watch of `--count N` ends at its Nth refresh even when the reads fail, with status 1,
/// where it waited for an agent that was gone for good; the failure is said once, not at
/// every refresh.
#[test]
fn a_counted_watch_ends_on_its_last_refresh_failed_or_not() {
    let netns = Netns::new();
    let config = AgentConfig::new(ROUTES);
    let agent = Agent::start(&netns, &config);
    let mut watch = support::Reaped::spawn(
        std::process::Command::new(COLLECTOR)
            .args(["maps", "watch", map_names::CONN_COUNTERS])
            .args(["--interval-ms", "200", "--count", "12"])
            .arg("--config")
            .arg(&config.path)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped()),
    );
    let stdout = lines_of(watch.stdout().unwrap());
    let mut seen = Vec::new();
    next_line(&stdout, &mut seen, |line| line.starts_with("slot0.opened"));
    // The pins gone at once, not one by one as a stop removes them: each refresh fails the
    // same way.
    let moved = MovedAway::new(&config.pin_dir);
    let status = wait_for("the watch to end", Duration::from_secs(30), || {
        watch.try_wait()
    });
    drop(moved);
    assert!(agent.stop().success());
    let mut stderr = String::new();
    watch.stderr().unwrap().read_to_string(&mut stderr).unwrap();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("the last refresh of CONN_COUNTERS failed"),
        "{stderr}"
    );
    assert_eq!(
        stderr.matches("reading CONN_COUNTERS failed").count(),
        1,
        "{stderr}"
    );
}

/// `collector maps dump NAME` with the pin directory from the environment, as a sidecar's
/// `kubectl exec` gets it.
fn dumped_by_environment(name: &str, config: &AgentConfig) -> serde_json::Value {
    let out = support::stdout_of(
        std::process::Command::new(COLLECTOR)
            .args(["maps", "dump", name, "--json"])
            .env("COLLECTOR_PIN_DIR", &config.pin_dir),
    );
    serde_json::from_str(&out).unwrap()
}

const SECOND_NS: u64 = 1_000_000_000;

/// `CLOCK_MONOTONIC` now: the kernel programs' clock.
fn monotonic_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut now) };
    u64::try_from(now.tv_sec).unwrap() * SECOND_NS + u64::try_from(now.tv_nsec).unwrap()
}

/// The one value of a pinned one-entry `Array<u64>`.
fn pinned_u64(config: &AgentConfig, name: &str) -> u64 {
    let pin = config.pin_dir.join("v1").join(name);
    let data = aya::maps::MapData::from_pin(&pin).unwrap();
    let array: aya::maps::Array<_, u64> =
        aya::maps::Array::try_from(aya::maps::Map::Array(data)).unwrap();
    array.get(&0, 0).unwrap()
}

#[test]
fn maps_list_and_dump_read_the_live_maps_and_the_pins() {
    let netns = Netns::new();
    let config = AgentConfig::new(ROUTES);
    let before_start = monotonic_ns();
    let agent = Agent::start(&netns, &config);
    // The latest upstream time starts a second ahead of the kernel's clock at load, past any
    // stamp an earlier build left behind (loader.rs, `hold_off_upstream_shortcut`).
    let latest = pinned_u64(&config, map_names::DNS_UPSTREAM_LATEST);
    let after_read = monotonic_ns();
    assert!(
        (before_start + SECOND_NS..=after_read + SECOND_NS).contains(&latest),
        "latest upstream time {latest}, started between {before_start} and {after_read}"
    );
    let (clients, held) = done_and_held(&netns);
    // A poll after the last connection opened: the 10th close can come before the held
    // ones open, and a poll between would find fewer of them in the table.
    let metrics = wait_for(
        "10 closed connections, 15 opened",
        Duration::from_secs(10),
        || {
            let text = scrape(&netns);
            let web = [("route", "web")];
            (sample(&text, "collector_proxy_connections_closed_total", &web) == Some(DONE as f64)
                && sample(&text, "collector_proxy_connections_opened_total", &web)
                    == Some((DONE + HELD) as f64))
            .then_some(text)
        },
    );

    let list = support::collector_json(&config, &["maps", "list"]);
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|row| row["name"].as_str().unwrap())
        .collect();
    for name in collector_common::PINNED_MAPS {
        assert!(names.contains(&name), "{name} missing from {list}");
        // Every map the list shows has a decoder.
        support::collector_json(&config, &["maps", "dump", name]);
    }
    let latest_dumped =
        support::collector_json(&config, &["maps", "dump", map_names::DNS_UPSTREAM_LATEST]);
    assert_eq!(latest_dumped["latestUpstreamNs"], latest);
    let conn_state = list
        .as_array()
        .unwrap()
        .iter()
        .find(|row| row["name"] == map_names::CONN_STATE)
        .unwrap();
    assert_eq!(conn_state["inUse"], HELD, "{conn_state}");
    assert_eq!(conn_state["capacity"], 65536);
    // The fill the agent exports without walking the table equals the walk.
    let table = [("map", map_names::CONN_STATE)];
    assert_eq!(
        sample(&metrics, "collector_bpf_map_entries", &table),
        conn_state["inUse"].as_f64()
    );
    assert_eq!(
        sample(&metrics, "collector_bpf_map_entries_limit", &table),
        Some(65536.0)
    );

    // The route counters, as the CLI decodes them, equal /metrics.
    let dump = support::collector_json(&config, &["maps", "dump", map_names::CONN_COUNTERS]);
    assert_eq!(
        dumped_by_environment(map_names::CONN_COUNTERS, &config),
        dump
    );
    let web = &dump[0];
    assert_eq!(web["route"], "web");
    for (field, metric) in [
        ("opened", "collector_proxy_connections_opened_total"),
        ("closed", "collector_proxy_connections_closed_total"),
        ("bytesIn", "collector_proxy_connection_received_bytes_total"),
        ("bytesOut", "collector_proxy_connection_sent_bytes_total"),
    ] {
        assert_eq!(
            web[field].as_f64(),
            sample(&metrics, metric, &[("route", "web")]),
            "{field}"
        );
    }
    assert_eq!(web["opened"], DONE + HELD);
    assert_eq!(web["bytesIn"], DONE * 4);
    // Every closed connection is in exactly one duration bucket.
    let durations = support::collector_json(&config, &["maps", "dump", map_names::CONN_DURATIONS]);
    assert_eq!(durations[0]["route"], "web");
    let bucketed: u64 = durations[0]["buckets"]
        .as_object()
        .unwrap()
        .values()
        .map(|count| count.as_u64().unwrap())
        .sum();
    assert_eq!(bucketed, u64::try_from(DONE).unwrap(), "{durations}");

    assert_watch_shows_opened(&config, DONE + HELD);

    // From the pins alone: the agent crashed, the maps stay readable.
    agent.kill();
    let after_crash = support::collector_json(&config, &["maps", "dump", map_names::CONN_COUNTERS]);
    assert_eq!(after_crash[0]["opened"], DONE + HELD);
    let state = support::collector_json(&config, &["maps", "dump", map_names::CONN_STATE]);
    assert_eq!(state.as_array().unwrap().len(), HELD);
    assert!(
        state
            .as_array()
            .unwrap()
            .iter()
            .all(|entry| entry["client"].as_str().unwrap().starts_with("127.0.0.1:"))
    );
    drop((clients, held));
    // AgentConfig's drop runs `collector cleanup --apply` on the crashed agent's pins.
}

/// A pin directory of the test's own on bpffs, removed on drop.
fn scratch_pins() -> support::RemovedOnDrop {
    support::RemovedOnDrop(
        std::path::PathBuf::from("/sys/fs/bpf").join(support::unique("collector-test")),
    )
}

/// `collector maps ARGS` on `pin_dir`, expecting it to fail: its stderr.
fn maps_refused(pin_dir: &std::path::Path, args: &[&str]) -> String {
    let out = std::process::Command::new(COLLECTOR)
        .arg("maps")
        .args(args)
        .arg("--pin-dir")
        .arg(pin_dir)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The row of `name` in `maps list` on `pin_dir`, which shows another build's pins with what
/// differs, and counts nothing in them.
fn listed_row(pin_dir: &std::path::Path, name: &str) -> serde_json::Value {
    let out = std::process::Command::new(COLLECTOR)
        .args(["maps", "list", "--json", "--pin-dir"])
        .arg(pin_dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let row = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|row| row["name"] == name);
    row.unwrap_or_else(|| panic!("no {name} in {rows}")).clone()
}

/// Pins another build made: a map of another shape is named, with whose it is, and a pin
/// directory holding only another build's layout says so.
#[test]
fn pins_of_another_build_are_said_to_be_so() {
    let pins = scratch_pins();
    let pin_dir = &pins.0;
    let maps = |args: &[&str]| maps_refused(pin_dir, args);
    // Only another layout's directory.
    std::fs::create_dir_all(pin_dir.join("v2")).unwrap();
    let stderr = maps(&["list"]);
    assert!(
        stderr.contains("no pinned maps under") && stderr.contains("another build's layout (v2)"),
        "{stderr}"
    );
    let listed = |name: &str| listed_row(pin_dir, name);
    // A CONN_STATE of another value size in this build's layout.
    let v1 = pin_dir.join("v1");
    std::fs::create_dir_all(&v1).unwrap();
    support::pin_plain_array(&v1.join(map_names::CONN_STATE), 16, 16);
    let stderr = maps(&["dump", map_names::CONN_STATE]);
    assert!(
        stderr.contains(
            "the pinned map CONN_STATE has another shape than this build's: another build of \
             the collector pinned it"
        ),
        "{stderr}"
    );
    let row = listed(map_names::CONN_STATE);
    assert!(
        row["note"]
            .as_str()
            .is_some_and(|note| note.starts_with("another build's map: value size 16")),
        "{row}"
    );
    assert_eq!(row["inUse"], serde_json::Value::Null, "{row}");
    std::fs::remove_file(v1.join(map_names::CONN_STATE)).unwrap();
    // A route-name table of fewer slots: its size is this build's, and it read as one
    // until the slot past its end.
    support::pin_plain_array(&v1.join(map_names::ROUTE_NAMES), 64, 4);
    let stderr = maps(&["dump", map_names::ROUTE_NAMES]);
    assert!(
        stderr.contains("the pinned map ROUTE_NAMES has another shape than this build's")
            && stderr.contains(&format!("capacity 4, this build's {MAX_ROUTES}")),
        "{stderr}"
    );
    std::fs::remove_file(v1.join(map_names::ROUTE_NAMES)).unwrap();
}

/// Pins claimed by a build of another layout are listed, with the layout in `PIN_OWNER`'s
/// note and nothing counted in them, and refused where they would be decoded.
#[test]
fn pins_of_another_layout_are_listed_but_not_decoded() {
    let pins = scratch_pins();
    let pin_dir = &pins.0;
    let v1 = pin_dir.join("v1");
    std::fs::create_dir_all(&v1).unwrap();
    // Shaped alike, claimed by a build of another layout: its maps mean other things.
    support::pin_plain_array(&v1.join(map_names::ROUTE_NAMES), 64, MAX_ROUTES);
    let (owner_word, layout) = (7u64.to_ne_bytes(), (PIN_LAYOUT + 1).to_ne_bytes());
    support::pin_plain_array_holding(
        &v1.join(map_names::PIN_OWNER),
        8,
        2,
        &[(0, &owner_word), (1, &layout)],
    );
    let refusal = format!(
        "were made by a build whose maps mean other things, though shaped alike (layout {}; \
         this build's is {PIN_LAYOUT})",
        PIN_LAYOUT + 1
    );
    let stderr = maps_refused(pin_dir, &["dump", map_names::ROUTE_NAMES]);
    assert!(stderr.contains(&refusal), "{stderr}");
    let owner_row = listed_row(pin_dir, map_names::PIN_OWNER);
    assert!(
        owner_row["note"]
            .as_str()
            .is_some_and(|note| note.contains(&refusal)),
        "{owner_row}"
    );
    assert_eq!(
        listed_row(pin_dir, map_names::ROUTE_NAMES)["inUse"],
        serde_json::Value::Null
    );
    // Which layout made them is what `PIN_OWNER` is read for.
    let out = std::process::Command::new(COLLECTOR)
        .args(["maps", "dump", map_names::PIN_OWNER, "--pin-dir"])
        .arg(pin_dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let owner: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(owner["layout"], PIN_LAYOUT + 1, "{owner}");
    // An older build's `PIN_OWNER` has one word: no layout. Listed, not decoded.
    std::fs::remove_file(v1.join(map_names::PIN_OWNER)).unwrap();
    support::pin_plain_array_holding(&v1.join(map_names::PIN_OWNER), 8, 1, &[(0, &owner_word)]);
    let stderr = maps_refused(pin_dir, &["dump", map_names::ROUTE_NAMES]);
    assert!(stderr.contains("(layout none; this build's is"), "{stderr}");
    let owner_row = listed_row(pin_dir, map_names::PIN_OWNER);
    assert!(
        owner_row["note"]
            .as_str()
            .is_some_and(|note| note.contains("capacity 1, this build's 2")),
        "{owner_row}"
    );
}

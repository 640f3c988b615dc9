//! Interfaces come and go: one created after the agent started is attached within two
//! seconds and its traffic counted exactly; one that goes away is forgotten without errors.
//! Only the attached interfaces have series.
#![expect(
    clippy::cast_precision_loss,
    clippy::float_cmp,
    reason = "OpenMetrics values are floats; the counts compared are small integers, exact in f64"
)]

mod support;

use std::{
    collections::BTreeSet,
    fmt::Write as _,
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    thread,
    time::Duration,
};

use collector_common::map_names;
use support::{
    Agent, AgentConfig, Netns, ScratchDir, assert_no_pins, bpf_calls, run, sample, scrape,
    stdout_of, wait_for,
};

const ROUTES: &str = "[[routes]]\nname = \"web\"\nports = [18080]\ntype = \"http\"\n";
const CONNECTIONS: usize = 10;
const REQUEST: usize = 1000;
const RESPONSE: usize = 3000;

fn attached(metrics: &str, interface: &str) -> bool {
    sample(
        metrics,
        "collector_interface_info",
        &[("interface", interface)],
    ) == Some(1.0)
}

/// A veth pair: `vcoll0` (10.77.0.1) in `netns`, `vcoll1` (10.77.0.2) in `peer`.
fn add_veth(netns: &Netns, peer: &Netns) {
    support::veth(
        netns,
        "vcoll0",
        "10.77.0.1/24",
        peer,
        "vcoll1",
        "10.77.0.2/24",
    );
}

/// [`CONNECTIONS`] connections from `peer` to `address` in `netns`, each sending [`REQUEST`]
/// bytes and reading [`RESPONSE`]; returns the scrape that shows them all closed.
fn exchange(netns: &Netns, peer: &Netns, address: &'static str) -> String {
    connect_and_serve(netns, peer, address);
    wait_for("the connections to close", Duration::from_secs(10), || {
        let text = scrape(netns);
        (sample(
            &text,
            "collector_proxy_connections_closed_total",
            &[("route", "web")],
        ) == Some(CONNECTIONS as f64))
        .then_some(text)
    })
}

/// [`CONNECTIONS`] connections from `client` to `address` served in `server`.
fn connect_and_serve(server: &Netns, client: &Netns, address: &'static str) {
    serve_and_connect(server, address, client, address);
}

/// [`connect_and_serve`] with the server bound to `bind` and the client connecting to
/// `target` (an address translated to `bind` on the way).
fn serve_and_connect(server: &Netns, bind: &'static str, client: &Netns, address: &'static str) {
    let listener = server.run(move || TcpListener::bind(bind).unwrap());
    let server = thread::spawn(move || {
        for _ in 0..CONNECTIONS {
            let (mut stream, _) = listener.accept().unwrap();
            let mut request = vec![0u8; REQUEST];
            stream.read_exact(&mut request).unwrap();
            stream.write_all(&[b'r'; RESPONSE]).unwrap();
        }
    });
    client.run(move || {
        for _ in 0..CONNECTIONS {
            let mut stream = TcpStream::connect(address).unwrap();
            stream.write_all(&[b'q'; REQUEST]).unwrap();
            let mut response = vec![0u8; RESPONSE];
            stream.read_exact(&mut response).unwrap();
        }
    });
    server.join().unwrap();
}

/// [`exchange`], and the classifiers counted every payload byte of it, each way.
fn exchange_counted(netns: &Netns, peer: &Netns, address: &'static str) -> String {
    let metrics = exchange(netns, peer, address);
    assert_payload(&metrics, CONNECTIONS, &[netns, peer], address);
    metrics
}

/// The web route's live payload bytes in `metrics` are `connections` exchanges' worth each
/// way, as [`support::assert_live_bytes`] holds them (segments sent again in `namespaces`).
fn assert_payload(metrics: &str, connections: usize, namespaces: &[&Netns], what: &str) {
    let retransmitted = support::retransmitted_segments(namespaces);
    for (direction, bytes) in [("in", REQUEST), ("out", RESPONSE)] {
        let live = payload_bytes(metrics, direction);
        let what = format!("{what} {direction}");
        support::assert_live_bytes(live, (connections, bytes), retransmitted, &what);
    }
}

/// A tun device in each of two namespaces, `tcoll0` (10.77.0.1, `fd00:77::1`) in `netns`
/// and `tcoll1` (10.77.0.2, `fd00:77::2`) in `peer`, joined by a thread that copies each
/// one's packets to the other: a link whose packets have no link-layer header, as
/// WireGuard's have none. Stops when dropped.
struct TunPair {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    relay: Option<thread::JoinHandle<()>>,
}

impl TunPair {
    fn new(netns: &Netns, peer: &Netns) -> Self {
        use std::os::fd::AsRawFd as _;
        let ours = support::open_tun(netns, "tcoll0");
        let theirs = support::open_tun(peer, "tcoll1");
        for (ns, name, host) in [(netns, "tcoll0", 1), (peer, "tcoll1", 2)] {
            support::ip_batch(
                &ns.name,
                &format!(
                    "addr add 10.77.0.{host}/24 dev {name}\n\
                     addr add fd00:77::{host}/64 dev {name} nodad\n\
                     link set {name} up\n"
                ),
            );
        }
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = std::sync::Arc::clone(&stop);
        let relay = thread::spawn(move || {
            let mut ends = [ours, theirs];
            let mut packet = vec![0u8; 65536];
            while !stopped.load(std::sync::atomic::Ordering::Relaxed) {
                let mut ready = ends.each_ref().map(|end| libc::pollfd {
                    fd: end.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                });
                // SAFETY: two pollfds, as passed.
                unsafe { libc::poll(ready.as_mut_ptr(), 2, 100) };
                for (from, ready) in ready.iter().enumerate() {
                    if ready.revents & libc::POLLIN == 0 {
                        continue;
                    }
                    if let Ok(len) = ends[from].read(&mut packet) {
                        // A device not up yet refuses it, as a wire would lose it.
                        let _ = ends[1 - from].write(&packet[..len]);
                    }
                }
            }
        });
        Self {
            stop,
            relay: Some(relay),
        }
    }
}

impl Drop for TunPair {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(relay) = self.relay.take() {
            let _ = relay.join();
        }
    }
}

/// `queries` DNS queries from `client` in `peer` to a server on `server` in `netns`, one at a
/// time, each answered: NXDOMAIN for every third (AAAA for x.missing.example.), NOERROR for
/// the others (A for www.example.).
fn ask_and_answer(
    netns: &Netns,
    server: &'static str,
    peer: &Netns,
    client: &'static str,
    queries: usize,
) {
    use hickory_proto::{
        op::{Message, MessageType, OpCode, Query, ResponseCode},
        rr::{Name, RecordType},
    };
    let listening = netns.run(move || std::net::UdpSocket::bind(server).unwrap());
    let answering = thread::spawn(move || {
        let mut buf = [0u8; 512];
        for _ in 0..queries {
            let (len, client) = listening.recv_from(&mut buf).unwrap();
            let mut message = Message::from_vec(&buf[..len]).unwrap();
            let missing = message.queries()[0]
                .name()
                .to_ascii()
                .starts_with("x.missing");
            message
                .set_message_type(MessageType::Response)
                .set_response_code(if missing {
                    ResponseCode::NXDomain
                } else {
                    ResponseCode::NoError
                });
            listening
                .send_to(&message.to_vec().unwrap(), client)
                .unwrap();
        }
    });
    peer.run(move || {
        let socket = std::net::UdpSocket::bind(client).unwrap();
        socket.connect(server).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        for n in 0..queries {
            let (name, qtype) = if n % 3 == 0 {
                ("x.missing.example.", RecordType::AAAA)
            } else {
                ("www.example.", RecordType::A)
            };
            let mut query = Message::new();
            query
                .set_id(u16::try_from(n).unwrap())
                .set_message_type(MessageType::Query)
                .set_op_code(OpCode::Query)
                .add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
            socket.send(&query.to_vec().unwrap()).unwrap();
            let mut buf = [0u8; 512];
            socket.recv(&mut buf).unwrap();
        }
    });
    answering.join().unwrap();
}

/// WireGuard and tun devices carry packets that begin at the IP header: they are watched by
/// default, and their own classifiers count the proxy's traffic and DNS over them exactly.
/// Until 2026-12-03 such devices were not watched, and what crossed them not counted. Made
/// after the start, as `wg-quick up` on a running host makes one: attached by a poll, after
/// the capability drop.
#[test]
fn traffic_over_a_device_without_a_link_layer_header_is_counted_exactly() {
    const QUERIES: usize = 12;
    let netns = Netns::new();
    let peer = Netns::new();
    let config = AgentConfig::new(ROUTES);
    let agent = Agent::start(&netns, &config);
    let _tun = TunPair::new(&netns, &peer);
    wait_for("tcoll0 to be attached", Duration::from_secs(10), || {
        attached(&scrape(&netns), "tcoll0").then_some(())
    });
    assert_eq!(ip_programs_loaded(&scrape(&netns)), [true, true]);
    exchange_counted(&netns, &peer, "10.77.0.1:18080");

    // DNS over IPv4 and IPv6: a server that answers every query, NXDOMAIN for the names
    // under "missing.".
    for (server, client) in [
        ("10.77.0.1:53", "10.77.0.2:0"),
        ("[fd00:77::1]:53", "[fd00:77::2]:0"),
    ] {
        ask_and_answer(&netns, server, &peer, client, QUERIES);
    }
    let dns = |metrics: &str, name: &str, label: (&str, &str)| {
        sample(metrics, name, &[label]).unwrap_or(0.0)
    };
    let metrics = wait_for("the answers to be counted", Duration::from_secs(10), || {
        let metrics = scrape(&netns);
        (dns(
            &metrics,
            "collector_dns_responses_total",
            ("rcode", "NOERROR"),
        ) == 16.0)
            .then_some(metrics)
    });
    assert_eq!(
        dns(&metrics, "collector_dns_queries_total", ("qtype", "A")),
        16.0
    );
    assert_eq!(
        dns(&metrics, "collector_dns_queries_total", ("qtype", "AAAA")),
        8.0
    );
    assert_eq!(
        dns(
            &metrics,
            "collector_dns_responses_total",
            ("rcode", "NXDOMAIN")
        ),
        8.0
    );
    assert_eq!(
        sample(
            &metrics,
            "collector_dns_response_latency_seconds_count",
            &[]
        ),
        Some((2 * QUERIES) as f64)
    );
    assert!(agent.stop().success());
    assert_no_pins(&config.pin_dir);
}

/// The pid of the agent started with the config file `config`, once it runs.
fn agent_pid(config: &std::path::Path) -> Option<libc::pid_t> {
    let wanted = config.to_string_lossy();
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid = entry.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline);
            (cmdline.contains("run") && cmdline.contains(&*wanted)).then_some(pid)
        })
}

/// Pod veths come and go while a node boots or drains: interfaces deleted while the start
/// attaches them are left to the polls, not a reason to refuse the start. Once the first
/// veth is attached the agent is stopped (SIGSTOP) while they are all deleted, so the start
/// meets interfaces it listed that are gone whatever the machine's load.
#[test]
fn interfaces_deleted_while_the_start_attaches_them_do_not_fail_it() {
    const VETHS: usize = 300;
    let netns = Netns::new();
    let pods = Netns::new();
    let mut additions = String::new();
    let mut deletions = String::new();
    for i in 0..VETHS {
        writeln!(
            additions,
            "link add vd{i} type veth peer name vp{i} netns {}\nlink set vd{i} up",
            pods.name
        )
        .unwrap();
        // The last first: the start attaches in the listed order.
        deletions.insert_str(0, &format!("link del vd{i}\n"));
    }
    support::ip_batch(&netns.name, &additions);
    let config = AgentConfig::new(ROUTES);
    let links = config.pin_dir.join("v1/links");
    let name = netns.name.clone();
    let started = config.path.clone();
    let deleter = thread::spawn(move || {
        // Looked for often: the start attaches the 300 in well under a second. Loopback's
        // pin is `tc_ingress_1`; the veths have higher interface indexes.
        // The agent's pid first (it runs long before it attaches), then only the pins.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let pid = loop {
            if let Some(pid) = agent_pid(&started) {
                break pid;
            }
            assert!(std::time::Instant::now() < deadline, "no agent within 30 s");
            thread::sleep(Duration::from_millis(1));
        };
        let veth_attached = || {
            std::fs::read_dir(&links).ok()?.flatten().find_map(|entry| {
                let name = entry.file_name();
                let index = name.to_str()?.strip_prefix("tc_ingress_")?;
                (index != "1").then_some(())
            })
        };
        while veth_attached().is_none() {
            assert!(
                std::time::Instant::now() < deadline,
                "no veth attached within 30 s"
            );
            thread::sleep(Duration::from_millis(1));
        }
        // SAFETY: kill has no memory arguments.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
        support::ip_batch(&name, &deletions);
        // SAFETY: as above.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGCONT) }, 0);
    });
    let scratch = ScratchDir::new("vanishing");
    let log = scratch.path("agent.log");
    let agent = Agent::start_logging(&netns, &config, &[], &log);
    deleter.join().unwrap();
    // The start met interfaces it listed that were gone (else this tested nothing).
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.contains("went away or changed during the start"),
        "{logged}"
    );
    // The polls forget what went: loopback is all that is left.
    wait_for(
        "the polls to forget the veths",
        Duration::from_secs(10),
        || {
            let metrics = scrape(&netns);
            let interfaces = metrics
                .lines()
                .filter(|line| line.starts_with("collector_interface_info{"))
                .count();
            (interfaces == 1 && attached(&metrics, "lo")).then_some(())
        },
    );
    assert!(agent.stop().success());
    assert_no_pins(&config.pin_dir);
}

#[test]
fn an_interface_added_after_start_is_attached_counted_and_forgotten() {
    let netns = Netns::new();
    let peer = Netns::new();
    let config = AgentConfig::new(ROUTES);
    let agent = Agent::start(&netns, &config);
    assert!(!attached(&scrape(&netns), "vcoll0"));

    add_veth(&netns, &peer);
    wait_for("vcoll0 to be attached", Duration::from_secs(10), || {
        attached(&scrape(&netns), "vcoll0").then_some(())
    });

    // The tc classifiers on vcoll0 saw every payload byte, each way.
    let metrics = exchange_counted(&netns, &peer, "10.77.0.1:18080");
    // The interface's own counters (netlink) saw at least those bytes.
    let received = sample(
        &metrics,
        "collector_interface_receive_bytes_total",
        &[("interface", "vcoll0")],
    )
    .unwrap();
    assert!(received >= (CONNECTIONS * REQUEST) as f64, "{received}");

    // The veth goes away: forgotten, no error, still serving.
    run("ip", &["-n", &netns.name, "link", "del", "vcoll0"]);
    wait_for("vcoll0 to be forgotten", Duration::from_secs(10), || {
        let text = scrape(&netns);
        (!attached(&text, "vcoll0") && attached(&text, "lo")).then_some(())
    });
    let metrics = scrape(&netns);
    assert_eq!(
        sample(&metrics, "collector_source_up", &[("source", "netlink")]),
        Some(1.0)
    );
    // No series of it is left, counters and hooks alike.
    assert!(!metrics.contains("interface=\"vcoll0\""), "{metrics}");
    assert_eq!(
        sample(
            &metrics,
            "collector_source_errors_total",
            &[("source", "netlink")]
        ),
        Some(0.0)
    );
    assert!(agent.stop().success());
    assert_no_pins(&config.pin_dir);
}

#[test]
fn with_interfaces_configured_no_other_interface_is_exported() {
    let netns = Netns::new();
    let peer = Netns::new();
    // A pod's veth on a node that watches only its own interfaces.
    add_veth(&netns, &peer);
    let config = AgentConfig::new(&format!("interfaces = [\"lo\"]\n{ROUTES}"));
    let agent = Agent::start(&netns, &config);

    let metrics = scrape(&netns);
    assert!(attached(&metrics, "lo"));
    assert!(
        sample(
            &metrics,
            "collector_interface_receive_packets_total",
            &[("interface", "lo")]
        )
        .is_some()
    );
    let veth_series: Vec<_> = metrics
        .lines()
        .filter(|line| line.contains("vcoll0"))
        .collect();
    assert!(veth_series.is_empty(), "{veth_series:#?}");
    let interfaces = support::proxy_json(&netns)["interfaces"].clone();
    let names: Vec<_> = interfaces
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names, ["lo"]);
    // Every configured interface is here with Ethernet framing: the programs for those
    // without a link-layer header are not loaded (half a second each at the start).
    assert_eq!(ip_programs_loaded(&metrics), [false, false]);
    assert!(agent.stop().success());
    assert_no_pins(&config.pin_dir);
}

/// `collector_interface_missing` of `interface`.
fn missing(metrics: &str, interface: &str) -> Option<f64> {
    sample(
        metrics,
        "collector_interface_missing",
        &[("interface", interface)],
    )
}

/// An interface listed by an alternative name (`ip link` shows systemd's path-based name
/// as `altname enp0s5` beside `ens5`; up to 127 bytes) is that interface: missing until the
/// name is given, then attached, `check` passing it, and its traffic counted exactly. Until
/// 2026-12-07 only the device's own name was read, and it read missing for ever.
#[test]
fn an_interface_listed_by_an_alternative_name_is_attached_and_counted() {
    const ALTERNATIVE: &str = "uplink-of-rack-12-left";
    let netns = Netns::new();
    let peer = Netns::new();
    add_veth(&netns, &peer);
    let config = AgentConfig::new(&format!(
        "interfaces = [\"lo\", \"{ALTERNATIVE}\"]\n{ROUTES}"
    ));
    let agent = Agent::start(&netns, &config);
    let missing = |metrics: &str| missing(metrics, ALTERNATIVE);
    let metrics = scrape(&netns);
    assert!(!attached(&metrics, "vcoll0"));
    assert_eq!(missing(&metrics), Some(1.0));

    ip(
        &netns,
        &format!("link property add dev vcoll0 altname {ALTERNATIVE}"),
    );
    wait_for("vcoll0 to be attached", Duration::from_secs(10), || {
        let metrics = scrape(&netns);
        (attached(&metrics, "vcoll0") && missing(&metrics).is_none()).then_some(())
    });
    let (passed, line) = support::check_line(&netns, &config.path, &[], "interfaces");
    assert!(
        passed && line.starts_with("pass") && line.contains("lo, vcoll0"),
        "{line}"
    );
    exchange_counted(&netns, &peer, "10.77.0.1:18080");
    assert!(agent.stop().success());
    assert_no_pins(&config.pin_dir);
}

/// Interfaces whose names `exclude_interfaces` matches (as a node's pod veths would be) are
/// not attached, neither at the start nor when they appear later, and have no series: the
/// connections over them count (from the sockets), their live bytes do not. One that no
/// pattern matches, added after them, is attached as usual, and forgotten once renamed into
/// an excluded name.
#[test]
fn excluded_interfaces_are_left_out_at_the_start_and_when_they_appear() {
    let netns = Netns::new();
    let peer = Netns::new();
    add_veth(&netns, &peer);
    let config = AgentConfig::new(&format!(
        "exclude_interfaces = [\"vcoll*\", \"vexcl?\"]\n{ROUTES}"
    ));
    let agent = Agent::start(&netns, &config);
    support::veth(
        &netns,
        "vexcl1",
        "10.78.0.1/24",
        &peer,
        "pexcl1",
        "10.78.0.2/24",
    );
    support::veth(
        &netns,
        "vwatch0",
        "10.79.0.1/24",
        &peer,
        "pwatch0",
        "10.79.0.2/24",
    );
    // The sync that attaches vwatch0 lists vexcl1 too.
    wait_for("vwatch0 to be attached", Duration::from_secs(10), || {
        attached(&scrape(&netns), "vwatch0").then_some(())
    });

    let metrics = exchange(&netns, &peer, "10.77.0.1:18080");
    assert!(attached(&metrics, "lo"));
    let excluded_count = |metrics: &str| sample(metrics, "collector_interfaces_excluded", &[]);
    assert_eq!(excluded_count(&metrics), Some(2.0));
    let pins_of = |index: u32| -> Vec<String> {
        std::fs::read_dir(config.pin_dir.join("v1/links"))
            .unwrap()
            .map(|entry| entry.unwrap().file_name().into_string().unwrap())
            .filter(|name| name.ends_with(&format!("_{index}")))
            .collect()
    };
    for excluded in ["vcoll0", "vexcl1"] {
        let series: Vec<_> = metrics
            .lines()
            .filter(|line| line.contains(excluded))
            .collect();
        assert!(series.is_empty(), "{excluded}: {series:#?}");
        let pins = pins_of(netns.run(move || ifindex(excluded)));
        assert!(pins.is_empty(), "{excluded}: {pins:?}");
    }
    // Over vcoll0 alone: no classifier saw the payload.
    for direction in ["in", "out"] {
        assert_eq!(payload_bytes(&metrics, direction).unwrap_or(0.0), 0.0);
    }

    // A watched device renamed into an excluded name is forgotten, its hooks and series
    // with it, as one gone.
    let index = netns.run(|| ifindex("vwatch0"));
    assert!(!pins_of(index).is_empty());
    ip(&netns, "link set vwatch0 down");
    ip(&netns, "link set vwatch0 name vexcl2");
    ip(&netns, "link set vexcl2 up");
    // Counted once up again (down, the default selection would not take it either).
    let metrics = wait_for("vwatch0 to be forgotten", Duration::from_secs(10), || {
        let text = scrape(&netns);
        (!text.contains("vwatch0")
            && pins_of(index).is_empty()
            && excluded_count(&text) == Some(3.0))
        .then_some(text)
    });
    assert!(!metrics.contains("vexcl2"));
    assert!(agent.stop().success());
    assert_no_pins(&config.pin_dir);
}

/// An interface whose attach fails (here: a directory where its link's pin goes)
/// says so in a series an alert can read, and once in the log however many polls try again;
/// once the cause is gone, the next poll attaches it.
#[test]
fn an_interface_that_cannot_be_attached_is_exported_and_logged_once() {
    let netns = Netns::new();
    let config = AgentConfig::new(ROUTES);
    let logs = ScratchDir::new("attach-failed");
    let log = logs.path("agent.log");
    let agent = Agent::start_logging(&netns, &config, &[], &log);
    let failed = |metrics: &str| {
        sample(
            metrics,
            "collector_interface_attach_failed",
            &[("interface", "tcoll0")],
        )
    };
    // Down, it is not watched yet.
    ip(&netns, "link add tcoll0 type veth peer name tcoll1");
    let blocker = block_ingress_link(&netns, &config, "tcoll0");
    let _unpin = support::OnDrop(|| {
        let _ = std::fs::remove_dir(&blocker);
    });

    ip(&netns, "link set tcoll0 up");
    let metrics = wait_for("tcoll0's failed attach", Duration::from_secs(10), || {
        let text = scrape(&netns);
        failed(&text).is_some().then_some(text)
    });
    assert_eq!(failed(&metrics), Some(1.0));
    assert!(!attached(&metrics, "tcoll0"));
    // Its own counters go on: they do not depend on ours.
    assert!(own_counters_exported(&metrics, "tcoll0"), "{metrics}");
    let said = "attaching the classifiers failed";
    let lines = support::logged_lines(&log, said);
    assert!(lines[0].contains("tcoll0"), "{lines:?}");
    support::after_polls(&netns, 3);
    assert_eq!(support::logged_lines(&log, said).len(), 1);

    std::fs::remove_dir(&blocker).unwrap();
    wait_for("tcoll0 to be attached", Duration::from_secs(10), || {
        let text = scrape(&netns);
        (attached(&text, "tcoll0") && failed(&text).is_none()).then_some(())
    });
    assert!(agent.stop().success());
    assert_no_pins(&config.pin_dir);
}

/// Whether the interface's own kernel counters are exported.
fn own_counters_exported(metrics: &str, interface: &str) -> bool {
    sample(
        metrics,
        "collector_interface_receive_packets_total",
        &[("interface", interface)],
    )
    .is_some()
}

/// Makes a directory where the agent pins `interface`'s ingress link, so that attaching it
/// fails (something else there, which the start's sweep of stale link pins leaves): the
/// path, for the test to remove.
fn block_ingress_link(netns: &Netns, config: &AgentConfig, interface: &str) -> std::path::PathBuf {
    let listed = stdout_of(std::process::Command::new("ip").args([
        "-n",
        &netns.name,
        "-o",
        "link",
        "show",
        interface,
    ]));
    let index = listed.split(':').next().unwrap().trim().to_owned();
    let blocker = config.pin_dir.join(format!("v1/links/tc_ingress_{index}"));
    std::fs::create_dir_all(&blocker).unwrap();
    blocker
}

/// The same at the start: an interface there to count whose attach fails does not refuse
/// the start (a node's hundreds of pod veths, one refusing), the interfaces after it are
/// attached, and the polls attach it once the cause is gone.
#[test]
fn an_interface_that_cannot_be_attached_at_the_start_does_not_stop_it() {
    let netns = Netns::new();
    let config = AgentConfig::new(ROUTES);
    ip(&netns, "link add tcoll0 type veth peer name tcoll1");
    ip(&netns, "link set tcoll0 up");
    ip(&netns, "link set tcoll1 up");
    let blocker = block_ingress_link(&netns, &config, "tcoll0");
    let _unpin = support::OnDrop(|| {
        let _ = std::fs::remove_dir(&blocker);
    });
    let agent = Agent::start(&netns, &config);
    let metrics = scrape(&netns);
    let failed = |metrics: &str, interface| {
        sample(
            metrics,
            "collector_interface_attach_failed",
            &[("interface", interface)],
        )
    };
    assert_eq!(failed(&metrics, "tcoll0"), Some(1.0), "{metrics}");
    assert!(!attached(&metrics, "tcoll0"));
    assert!(own_counters_exported(&metrics, "tcoll0"), "{metrics}");
    for interface in ["lo", "tcoll1"] {
        assert!(attached(&metrics, interface), "{interface}: {metrics}");
        assert_eq!(failed(&metrics, interface), None);
    }
    std::fs::remove_dir(&blocker).unwrap();
    wait_for("tcoll0 to be attached", Duration::from_secs(10), || {
        let text = scrape(&netns);
        (attached(&text, "tcoll0") && failed(&text, "tcoll0").is_none()).then_some(())
    });
    assert!(agent.stop().success());
    assert_no_pins(&config.pin_dir);

    // Where it is the one interface there to count, the start would count nothing live:
    // refused, with the reason, and nothing left behind.
    let only = AgentConfig::new(&format!("interfaces = [\"tcoll0\"]\n{ROUTES}"));
    // `collector cleanup` leaves directories: the blocker's go with the test, whatever fails.
    let _gone = support::RemovedOnDrop(only.pin_dir.clone());
    let blocker = block_ingress_link(&netns, &only, "tcoll0");
    let said = support::refused_start(&netns, &only.path);
    assert!(
        said.contains("no interface could be attached; tcoll0:"),
        "{said}"
    );
    // What the failed start removed, all but the directories the blocker kept: empty.
    std::fs::remove_dir(&blocker).unwrap();
    for dir in ["v1/links", "v1", ""] {
        std::fs::remove_dir(only.pin_dir.join(dir)).unwrap();
    }
}

/// Whether `count_ingress_ip` and `count_egress_ip` are loaded (their run statistics
/// exported).
fn ip_programs_loaded(metrics: &str) -> [bool; 2] {
    ["count_ingress_ip", "count_egress_ip"].map(|program| {
        sample(
            metrics,
            "collector_bpf_program_runs_total",
            &[("program", program)],
        )
        .is_some()
    })
}

/// The kernel's own counters of `interface` in `netns` as `ip -s -s link` reads them (the
/// nine the agent exports), named as
/// the agent's metrics are.
fn kernel_counters(netns: &Netns, interface: &str) -> Vec<(String, f64)> {
    let json = stdout_of(std::process::Command::new("ip").args([
        "-n",
        &netns.name,
        "-s",
        "-s",
        "-j",
        "link",
        "show",
        interface,
    ]));
    let link: serde_json::Value = serde_json::from_str(&json).unwrap();
    let mut counters = Vec::new();
    for (direction, side) in [("receive", "rx"), ("transmit", "tx")] {
        for (metric, field) in [
            ("bytes", "bytes"),
            ("packets", "packets"),
            ("errors", "errors"),
            ("drops", "dropped"),
        ] {
            let value = link[0]["stats64"][side][field].as_f64().unwrap();
            counters.push((
                format!("collector_interface_{direction}_{metric}_total"),
                value,
            ));
        }
    }
    let missed = link[0]["stats64"]["rx"]["missed_errors"].as_f64().unwrap();
    counters.push((
        "collector_interface_receive_missed_total".to_owned(),
        missed,
    ));
    counters
}

/// The interface counters the agent exports are the kernel's, each in its place: once the
/// veth is idle (IPv6 off, so no neighbour discovery moves them), the nine series equal
/// what `ip -s link` reads, with different figures each way.
#[test]
fn interface_counters_are_the_kernels_exactly() {
    let netns = Netns::new();
    let peer = Netns::new();
    for ns in [&netns, &peer] {
        run(
            "ip",
            &[
                "netns",
                "exec",
                &ns.name,
                "sysctl",
                "-qw",
                "net.ipv6.conf.all.disable_ipv6=1",
                "net.ipv6.conf.default.disable_ipv6=1",
            ],
        );
    }
    add_veth(&netns, &peer);
    let config = AgentConfig::new(ROUTES);
    let agent = Agent::start(&netns, &config);
    // 25 datagrams one way, to a socket that answers none.
    let receiver = peer.run(|| std::net::UdpSocket::bind("10.77.0.2:18081").unwrap());
    netns.run(|| {
        let sender = std::net::UdpSocket::bind("10.77.0.1:0").unwrap();
        for _ in 0..25 {
            sender.send_to(&[b'u'; 300], "10.77.0.2:18081").unwrap();
        }
    });
    let mut buf = [0u8; 512];
    for _ in 0..25 {
        assert_eq!(receiver.recv(&mut buf).unwrap(), 300);
    }
    let expected = kernel_counters(&netns, "vcoll0");
    let sent = |counters: &[(String, f64)], name: &str| {
        counters
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| *v)
            .unwrap()
    };
    assert!(sent(&expected, "collector_interface_transmit_packets_total") >= 25.0);
    assert!(sent(&expected, "collector_interface_receive_packets_total") < 25.0);
    wait_for(
        "the agent's counters to be the kernel's",
        Duration::from_secs(15),
        || {
            let metrics = scrape(&netns);
            let exported: Vec<(String, f64)> = expected
                .iter()
                .map(|(name, _)| {
                    let value = sample(&metrics, name, &[("interface", "vcoll0")]).unwrap_or(-1.0);
                    (name.clone(), value)
                })
                .collect();
            (exported == expected && kernel_counters(&netns, "vcoll0") == expected).then_some(())
        },
    );
    assert!(agent.stop().success());
    assert_no_pins(&config.pin_dir);
}

/// `ip -n <netns> <args>`.
fn ip(netns: &Netns, args: &str) {
    let mut all = vec!["-n", netns.name.as_str()];
    all.extend(args.split_whitespace());
    run("ip", &all);
}

#[test]
fn traffic_through_a_bridge_is_counted_once() {
    let netns = Netns::new();
    let peer = Netns::new();
    // A bridge with a veth port: each packet for the bridge's address crosses the port's
    // hooks and the bridge's.
    ip(
        &netns,
        &format!("link add vbr0 type veth peer name vbr1 netns {}", peer.name),
    );
    ip(&netns, "link add brcoll type bridge");
    ip(&netns, "link set vbr0 master brcoll");
    ip(&netns, "addr add 10.78.5.1/24 dev brcoll");
    ip(&peer, "addr add 10.78.5.2/24 dev vbr1");
    ip(&netns, "link set vbr0 up");
    ip(&netns, "link set brcoll up");
    ip(&peer, "link set vbr1 up");

    let config = AgentConfig::new(ROUTES);
    let agent = Agent::start(&netns, &config);
    let metrics = scrape(&netns);
    assert!(attached(&metrics, "brcoll"));
    assert!(!attached(&metrics, "vbr0"));

    exchange_counted(&netns, &peer, "10.78.5.1:18080");
    assert!(agent.stop().success());
    assert_no_pins(&config.pin_dir);
}

/// Shaping through an ifb, as `tc` setups for egress and ingress rate limits do: every packet
/// leaving the veth is redirected to the ifb, whose egress hook sees it, and sent again
/// through the veth's egress, whose hook sees it a second time; every packet arriving is
/// redirected to the ifb's egress and handed back past the veth's ingress hook. The ifb is
/// not watched, and the veth's hooks count each packet once, TCP and DNS alike.
#[test]
fn traffic_shaped_through_an_ifb_is_counted_once() {
    const QUERIES: usize = 12;
    let netns = Netns::new();
    let peer = Netns::new();
    add_veth(&netns, &peer);
    ip(&netns, "link add ifbcoll type ifb");
    ip(&netns, "link set ifbcoll up");
    let tc = |args: &str| {
        let mut all = vec!["netns", "exec", netns.name.as_str(), "tc"];
        all.extend(args.split_whitespace());
        run("ip", &all);
    };
    tc("qdisc add dev vcoll0 clsact");
    for hook in ["egress", "ingress"] {
        tc(&format!(
            "filter add dev vcoll0 {hook} protocol all u32 match u32 0 0 \
             action mirred egress redirect dev ifbcoll"
        ));
    }

    let config = AgentConfig::new(ROUTES);
    let agent = Agent::start(&netns, &config);
    let metrics = scrape(&netns);
    assert!(attached(&metrics, "vcoll0"));
    assert!(!attached(&metrics, "ifbcoll"));

    exchange_counted(&netns, &peer, "10.77.0.1:18080");
    ask_and_answer(&netns, "10.77.0.1:53", &peer, "10.77.0.2:0", QUERIES);
    let metrics = support::after_polls(&netns, 2);
    // 8 answered NOERROR, 4 NXDOMAIN: each once, and each matched to its query.
    for (rcode, count) in [("NOERROR", 8.0), ("NXDOMAIN", 4.0)] {
        assert_eq!(
            sample(
                &metrics,
                "collector_dns_responses_total",
                &[("rcode", rcode)]
            ),
            Some(count),
            "{rcode}"
        );
    }
    assert_eq!(
        sample(
            &metrics,
            "collector_dns_response_latency_seconds_count",
            &[]
        ),
        Some(QUERIES as f64)
    );
    // Every packet went through the ifb: its own counters carry both ways' bytes.
    let through_ifb = kernel_counters(&netns, "ifbcoll")
        .into_iter()
        .find(|(name, _)| name == "collector_interface_transmit_bytes_total")
        .unwrap()
        .1;
    let payload = (CONNECTIONS * (REQUEST + RESPONSE)) as f64;
    assert!(through_ifb > payload, "{through_ifb} bytes through the ifb");
    assert!(agent.stop().success());
    assert_no_pins(&config.pin_dir);
}

/// An upper device of `kind` (with its mode) on a veth whose peer is in `peer`, holding
/// 10.78.7.1 as keepalived's VRRP macvlans hold a virtual address: every packet for it
/// crosses the veth's hooks and its own, so only the veth is watched, and counts it once.
fn traffic_through_an_upper_device_is_counted_once(kind: &str) {
    let netns = Netns::new();
    let peer = Netns::new();
    ip(
        &netns,
        &format!(
            "link add vlow0 type veth peer name vlow1 netns {}",
            peer.name
        ),
    );
    ip(
        &netns,
        &format!("link add vup0 link vlow0 address 02:00:00:00:78:07 type {kind}"),
    );
    ip(&netns, "addr add 10.78.7.1/24 dev vup0");
    ip(&peer, "addr add 10.78.7.2/24 dev vlow1");
    for (ns, device) in [(&netns, "vlow0"), (&netns, "vup0"), (&peer, "vlow1")] {
        ip(ns, &format!("link set {device} up"));
    }
    // The peer sends to the upper device's own MAC, not to whichever device answers ARP
    // first (the veth would too).
    ip(
        &peer,
        "neigh replace 10.78.7.1 lladdr 02:00:00:00:78:07 dev vlow1 nud permanent",
    );

    let config = AgentConfig::new(ROUTES);
    let agent = Agent::start(&netns, &config);
    let metrics = scrape(&netns);
    assert!(attached(&metrics, "vlow0"));
    assert!(!attached(&metrics, "vup0"));
    // The lower device down (`netplan apply`) stays watched, and so does not hand its
    // upper device's packets over to it (which it would count again once up).
    ip(&netns, "link set vlow0 down");
    let down = support::after_polls(&netns, 2);
    assert!(
        attached(&down, "vlow0") && !attached(&down, "vup0"),
        "{down}"
    );
    ip(&netns, "link set vlow0 up");

    exchange_counted(&netns, &peer, "10.78.7.1:18080");
    assert!(agent.stop().success());
    assert_no_pins(&config.pin_dir);
}

#[test]
fn traffic_through_a_macvlan_is_counted_once() {
    traffic_through_an_upper_device_is_counted_once("macvlan mode bridge");
}

#[test]
fn traffic_through_a_macvtap_is_counted_once() {
    traffic_through_an_upper_device_is_counted_once("macvtap mode bridge");
}

/// The agent's namespace routes between a "pod" and a "remote" namespace, as a Kubernetes
/// node routes its pods' traffic: connections from the pod to the remote's port 18080 (a
/// route port, with nothing of the host's listening on it) cross the agent's interfaces and
/// are not the proxy's; then the same from the pod to the agent's own address, which are.
#[test]
fn traffic_the_host_only_forwards_is_not_counted() {
    let netns = Netns::new();
    let pod = Netns::new();
    let remote = Netns::new();
    support::veth(&netns, "vfw0", "10.79.1.1/24", &pod, "vfw1", "10.79.1.2/24");
    support::veth(
        &netns,
        "vfw2",
        "10.79.2.1/24",
        &remote,
        "vfw3",
        "10.79.2.2/24",
    );
    ip(&pod, "route add default via 10.79.1.1");
    ip(&remote, "route add default via 10.79.2.1");
    netns.forward();
    let config = AgentConfig::new(ROUTES);
    let agent = Agent::start(&netns, &config);

    connect_and_serve(&remote, &pod, "10.79.2.2:18080");
    let metrics = support::after_polls(&netns, 2);
    for direction in ["in", "out"] {
        assert_eq!(payload_bytes(&metrics, direction), Some(0.0), "{direction}");
    }
    exchange_counted(&netns, &pod, "10.79.1.1:18080");
    assert!(agent.stop().success());
    assert_no_pins(&config.pin_dir);
}

/// Addresses that arrive after the start count: one added to an interface, and one the
/// host holds only as a route of its `local` table (how a cloud gives a host its load
/// balancer's address), which no address dump lists.
#[test]
fn traffic_to_addresses_given_after_the_start_is_counted() {
    let netns = Netns::new();
    let peer = Netns::new();
    add_veth(&netns, &peer);
    let config = AgentConfig::new(ROUTES);
    let agent = Agent::start(&netns, &config);
    ip(&netns, "addr add 10.77.0.9/24 dev vcoll0");
    ip(&netns, "route add local 10.201.0.1/32 dev lo table local");
    ip(&peer, "route add 10.201.0.1/32 via 10.77.0.1");
    support::after_polls(&netns, 2);

    exchange_counted(&netns, &peer, "10.77.0.9:18080");
    connect_and_serve(&netns, &peer, "10.201.0.1:18080");
    let metrics = support::after_polls(&netns, 2);
    assert_payload(
        &metrics,
        2 * CONNECTIONS,
        &[&netns, &peer],
        "both addresses",
    );
    assert_eq!(
        sample(&metrics, "collector_local_address_table_complete", &[]),
        Some(1.0)
    );
    // The table holds the namespace's addresses and the routed one, and nothing else: the
    // veth's link-local address once its duplicate detection is over (it comes in then).
    let table = wait_for(
        "the table to hold the namespace's addresses",
        Duration::from_secs(10),
        || {
            let (table, complete) = local_addresses(&config);
            assert!(complete);
            let mut expected = namespace_addresses(&netns);
            expected.insert("10.201.0.1".to_owned());
            (table.iter().cloned().collect::<BTreeSet<_>>() == expected).then_some(table)
        },
    );
    assert_eq!(
        sample(
            &support::after_polls(&netns, 1),
            "collector_bpf_map_entries",
            &[("map", "LOCAL_ADDRESSES")],
        ),
        Some(table.len() as f64)
    );
    assert!(agent.stop().success());
    assert_no_pins(&config.pin_dir);
}

/// The addresses of `netns`'s interfaces the kernel delivers to, as `ip addr` lists them:
/// none still in its duplicate detection (but optimistic ones) or failed in it.
fn namespace_addresses(netns: &Netns) -> BTreeSet<String> {
    let json = stdout_of(std::process::Command::new("ip").args(["-n", &netns.name, "-j", "addr"]));
    let links: serde_json::Value = serde_json::from_str(&json).unwrap();
    links
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|link| link["addr_info"].as_array().unwrap())
        .filter(|address| {
            let flag = |name: &str| address[name] == true;
            !flag("dadfailed") && (!flag("tentative") || flag("optimistic"))
        })
        .map(|address| address["local"].as_str().unwrap().to_owned())
        .collect()
}

/// The table of local addresses as `collector maps dump LOCAL_ADDRESSES` shows it: its
/// addresses, and whether they are all of the namespace's.
fn local_addresses(config: &AgentConfig) -> (Vec<String>, bool) {
    let table = support::collector_json(config, &["maps", "dump", map_names::LOCAL_ADDRESSES]);
    let addresses = table["addresses"]
        .as_array()
        .unwrap_or_else(|| panic!("{table}"))
        .iter()
        .map(|row| row["address"].as_str().unwrap().to_owned())
        .collect();
    (addresses, table["complete"] == true)
}

/// An address that appears while the agent runs counts from its first packets, not from
/// the next poll (a VIP taken over in a failover): the agent polls once a minute here, so
/// only a sync on the kernel's announcement puts the address in the table (read through
/// the CLI) before the traffic starts. The kernel's counters are read through the CLI too,
/// which needs no poll.
#[test]
fn a_new_address_counts_from_its_first_packets_not_from_the_next_poll() {
    let netns = Netns::new();
    let peer = Netns::new();
    add_veth(&netns, &peer);
    let config = AgentConfig::polling_every(ROUTES, 60_000);
    let agent = Agent::start(&netns, &config);
    let (before, complete) = local_addresses(&config);
    assert!(complete, "{before:?}");
    for address in ["127.0.0.1", "::1", "10.77.0.1"] {
        assert!(before.iter().any(|a| a == address), "{address}: {before:?}");
    }
    assert!(!before.iter().any(|a| a == "10.77.0.9"), "{before:?}");
    ip(&netns, "addr add 10.77.0.9/24 dev vcoll0");
    // Well within the minute to the next poll.
    wait_for("10.77.0.9 in the table", Duration::from_secs(15), || {
        let (addresses, complete) = local_addresses(&config);
        (complete && addresses.iter().any(|a| a == "10.77.0.9")).then_some(())
    });

    connect_and_serve(&netns, &peer, "10.77.0.9:18080");
    assert_kernel_payload(&config, &[&netns, &peer]);
    assert!(agent.stop().success());
    assert_no_pins(&config.pin_dir);
}

/// The web route's live payload bytes as the kernel holds them (read through the CLI, with
/// no poll): [`CONNECTIONS`] exchanges' worth each way.
fn assert_kernel_payload(config: &AgentConfig, namespaces: &[&Netns]) {
    let rows = support::collector_json(config, &["maps", "dump", map_names::ROUTE_TRAFFIC]);
    let retransmitted = support::retransmitted_segments(namespaces);
    for (direction, bytes) in [("in", REQUEST), ("out", RESPONSE)] {
        let row = rows
            .as_array()
            .unwrap()
            .iter()
            .find(|row| row["route"] == "web" && row["direction"] == direction)
            .unwrap();
        let what = format!("{direction}: {rows}");
        let live = row["payloadBytes"].as_f64();
        support::assert_live_bytes(live, (CONNECTIONS, bytes), retransmitted, &what);
    }
}

/// An interface that appears while the agent runs (a pod's veth) counts from its first
/// packets, not from the next poll: the agent polls once a minute here, so only a sync on
/// the kernel's announcement attaches it (its link pins show it) before the traffic starts.
/// The kernel's counters are read through the CLI, which needs no poll.
#[test]
fn a_new_interface_counts_from_its_first_packets_not_from_the_next_poll() {
    let netns = Netns::new();
    let peer = Netns::new();
    let config = AgentConfig::polling_every(ROUTES, 60_000);
    let agent = Agent::start(&netns, &config);
    add_veth(&netns, &peer);
    let index = netns.run(|| ifindex("vcoll0"));
    // Well within the minute to the next poll.
    wait_for(
        "vcoll0 attached, its address in the table",
        Duration::from_secs(15),
        || {
            let (addresses, complete) = local_addresses(&config);
            let attached = ["tc_ingress", "tc_egress"]
                .iter()
                .all(|prefix| link_pin(&config, prefix, index).exists());
            (attached && complete && addresses.iter().any(|a| a == "10.77.0.1")).then_some(())
        },
    );

    connect_and_serve(&netns, &peer, "10.77.0.1:18080");
    assert_kernel_payload(&config, &[&netns, &peer]);
    assert!(agent.stop().success());
    assert_no_pins(&config.pin_dir);
}

/// kube-proxy in IPVS mode adding thousands of service addresses while the agent starts (a
/// node booting): every address added interrupts a dump of the addresses under way, so
/// few reads finish. The start goes on with what the reads found, and the table holds every
/// address, complete, once the burst is over. The burst goes on until the agent is ready.
/// Until 2026-12-04 four interrupted reads in a row refused the start.
#[test]
fn a_start_during_a_burst_of_new_addresses_goes_on_and_the_table_catches_up() {
    use std::sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    };
    const BEFORE: usize = 4_000;
    const BATCH: usize = 1_000;
    /// Batches at most: 40,000 addresses, a quarter of a second or so each batch.
    const BATCHES: usize = 40;
    let netns = Netns::new();
    let peer = Netns::new();
    add_veth(&netns, &peer);
    let address = |i: usize| format!("10.96.{}.{}", i / 250, i % 250 + 1);
    let batch = move |from: usize, count: usize| -> String {
        (from..from + count).fold(String::new(), |mut lines, i| {
            let _ = writeln!(lines, "addr add {}/32 dev vcoll0", address(i));
            lines
        })
    };
    support::ip_batch(&netns.name, &batch(0, BEFORE));
    let ready = Arc::new(AtomicBool::new(false));
    let burst = {
        let (name, ready) = (netns.name.clone(), Arc::clone(&ready));
        thread::spawn(move || {
            let mut added = BEFORE;
            for _ in 0..BATCHES {
                support::ip_batch(&name, &batch(added, BATCH));
                added += BATCH;
                if ready.load(Ordering::Relaxed) {
                    break;
                }
            }
            added
        })
    };
    let config = AgentConfig::new(ROUTES);
    let agent = Agent::start(&netns, &config);
    ready.store(true, Ordering::Relaxed);
    let added = burst.join().unwrap();
    wait_for(
        "every address in the table",
        Duration::from_secs(30),
        || {
            let (listed, complete) = local_addresses(&config);
            let listed: std::collections::HashSet<String> = listed.into_iter().collect();
            (complete && (0..added).all(|i| listed.contains(&address(i)))).then_some(())
        },
    );
    assert!(agent.stop().success());
    assert_no_pins(&config.pin_dir);
}

/// A `local` route wider than one address (`AnyIP`: every address of a range is this
/// host's) cannot be listed address by address: live traffic counts by port alone then,
/// and the log says so once.
#[test]
fn traffic_to_a_local_range_is_counted_by_port_with_a_warning() {
    // In the `local` table (AnyIP), and in a table a policy rule reaches (as TPROXY's
    // `local 0.0.0.0/0 dev lo table 100`), which until 2026-12-04 was not looked at: the
    // table read complete, and the range's live traffic 0. (Traffic there needs a
    // transparent socket, as TPROXY's proxy has: the first case shows the counting.) The
    // other tables are read at the start and when a route of type `local` is announced in
    // one of them, not at every change of addresses: the last case adds it while the agent
    // runs.
    let tproxy = &[
        "route add local 10.202.0.0/24 dev lo table 100",
        "rule add to 10.202.0.0/24 lookup 100",
    ][..];
    for (setup, range, traffic, while_running) in [
        (
            &["route add local 10.202.0.0/24 dev lo table local"][..],
            "10.202.0.0/24 (table local)",
            true,
            false,
        ),
        (tproxy, "10.202.0.0/24 (table 100)", false, false),
        (tproxy, "10.202.0.0/24 (table 100)", false, true),
    ] {
        let netns = Netns::new();
        let peer = Netns::new();
        add_veth(&netns, &peer);
        let set_up = || {
            for line in setup {
                ip(&netns, line);
            }
        };
        if !while_running {
            set_up();
        }
        ip(&peer, "route add 10.202.0.0/24 via 10.77.0.1");
        let config = AgentConfig::new(ROUTES);
        let logs = ScratchDir::new("local-range");
        let log = logs.path("agent.log");
        let agent = Agent::start_logging(&netns, &config, &[], &log);
        if while_running {
            assert_eq!(
                sample(
                    &scrape(&netns),
                    "collector_local_address_table_complete",
                    &[]
                ),
                Some(1.0)
            );
            set_up();
        }

        if traffic {
            connect_and_serve(&netns, &peer, "10.202.0.7:18080");
        }
        let metrics = support::after_polls(&netns, 2);
        assert_eq!(
            sample(&metrics, "collector_local_address_table_complete", &[]),
            Some(0.0),
            "{range}"
        );
        if traffic {
            assert_payload(&metrics, CONNECTIONS, &[&netns, &peer], "by port alone");
        }
        assert!(agent.stop().success());
        let text = std::fs::read_to_string(&log).unwrap();
        let warnings: Vec<&str> = text
            .lines()
            .filter(|line| line.contains(" WARN ") && line.contains("by port alone"))
            .collect();
        assert!(
            warnings.len() == 1
                && warnings[0].contains(&format!("{range} covers more than one address")),
            "{text}"
        );
        assert_no_pins(&config.pin_dir);
    }
}

/// A VIP DNAT'd to this host (`MetalLB` or `externalIPs` with kube-proxy in iptables or
/// nftables mode) is not an address of it: its live traffic counts only when
/// `extra_local_addresses` names it.
#[test]
fn traffic_to_a_vip_dnatted_here_counts_when_named_local() {
    for (extra, counted) in [
        ("", 0),
        ("extra_local_addresses = [\"10.203.0.0/30\"]\n", CONNECTIONS),
    ] {
        let netns = Netns::new();
        let peer = Netns::new();
        add_veth(&netns, &peer);
        run(
            "ip",
            &[
                "netns",
                "exec",
                &netns.name,
                "nft",
                "add table ip vip; add chain ip vip pre { type nat hook prerouting priority -100; }; \
                 add rule ip vip pre ip daddr 10.203.0.1 tcp dport 18080 dnat to 10.77.0.1",
            ],
        );
        ip(&peer, "route add 10.203.0.0/30 via 10.77.0.1");
        let config = AgentConfig::new(&format!("{extra}{ROUTES}"));
        let agent = Agent::start(&netns, &config);

        serve_and_connect(&netns, "10.77.0.1:18080", &peer, "10.203.0.1:18080");
        let metrics = support::after_polls(&netns, 2);
        assert_payload(&metrics, counted, &[&netns, &peer], extra);
        assert!(agent.stop().success());
        assert_no_pins(&config.pin_dir);
    }
}

fn payload_bytes(metrics: &str, direction: &str) -> Option<f64> {
    sample(
        metrics,
        "collector_proxy_traffic_payload_bytes_total",
        &[("route", "web"), ("direction", direction)],
    )
}

/// An Ethernet frame carrying a TCP segment of `payload` bytes to port 18080, with an
/// 802.1Q tag for `vlan` if given. Checksums are left 0: the classifiers count before any
/// check, and the stack drops the frame afterwards.
fn tcp_frame(vlan: Option<u16>, payload: usize) -> Vec<u8> {
    let mut frame = vec![0xff; 6];
    frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 1]);
    if let Some(id) = vlan {
        frame.extend_from_slice(&[0x81, 0x00]);
        frame.extend_from_slice(&id.to_be_bytes());
    }
    frame.extend_from_slice(&[0x08, 0x00]);
    let total = u16::try_from(20 + 20 + payload).unwrap();
    frame.extend_from_slice(&[0x45, 0]);
    frame.extend_from_slice(&total.to_be_bytes());
    frame.extend_from_slice(&[0, 1, 0, 0, 64, 6, 0, 0, 10, 78, 6, 2, 10, 78, 6, 1]);
    frame.extend_from_slice(&40000u16.to_be_bytes());
    frame.extend_from_slice(&18080u16.to_be_bytes());
    frame.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x18, 0xff, 0xff, 0, 0, 0, 0]);
    frame.extend(std::iter::repeat_n(b'p', payload));
    frame
}

/// [`tcp_frame`] the other way: from the route's port on this namespace's address, out, as
/// the proxy's replies are.
fn reply_frame(vlan: Option<u16>, payload: usize) -> Vec<u8> {
    let mut frame = tcp_frame(vlan, payload);
    let ip = if vlan.is_some() { 18 } else { 14 };
    let (source, destination) = frame.split_at_mut(ip + 16);
    source[ip + 12..].swap_with_slice(&mut destination[..4]);
    let (source, destination) = frame.split_at_mut(ip + 22);
    source[ip + 20..].swap_with_slice(&mut destination[..2]);
    frame
}

/// Sends `frame` out of `interface` of the calling thread's namespace, as it is.
fn send_raw(interface: &str, frame: &[u8]) {
    send_raw_as(interface, frame, 0);
}

/// [`send_raw`], the skb's protocol `protocol` (`ETH_P_*`; 0 takes the frame's own).
fn send_raw_as(interface: &str, frame: &[u8], protocol: i32) {
    let name = std::ffi::CString::new(interface).unwrap();
    // SAFETY: plain system calls with valid arguments; the socket is closed before return.
    unsafe {
        let socket = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
        assert!(socket >= 0, "{}", std::io::Error::last_os_error());
        let mut address: libc::sockaddr_ll = std::mem::zeroed();
        address.sll_family = u16::try_from(libc::AF_PACKET).unwrap();
        address.sll_ifindex = i32::try_from(libc::if_nametoindex(name.as_ptr())).unwrap();
        address.sll_halen = 6;
        address.sll_protocol = u16::try_from(protocol).unwrap().to_be();
        let sent = libc::sendto(
            socket,
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&raw const address).cast(),
            u32::try_from(size_of::<libc::sockaddr_ll>()).unwrap(),
        );
        let error = std::io::Error::last_os_error();
        libc::close(socket);
        assert_eq!(usize::try_from(sent).ok(), Some(frame.len()), "{error}");
    }
}

/// A veth `vraw0` (10.78.6.1) in a new namespace, `vraw1` in a peer namespace, and an
/// agent watching the first, for frames sent raw: those for or from 10.78.6.1 are this
/// namespace's, as traffic counts only those.
fn raw_veth_watched() -> (Netns, Netns, AgentConfig, Agent) {
    let netns = Netns::new();
    let peer = Netns::new();
    ip(
        &netns,
        &format!(
            "link add vraw0 type veth peer name vraw1 netns {}",
            peer.name
        ),
    );
    ip(&netns, "addr add 10.78.6.1/24 dev vraw0");
    ip(&netns, "link set vraw0 up");
    ip(&peer, "link set vraw1 up");
    let config = AgentConfig::new(ROUTES);
    let agent = Agent::start(&netns, &config);
    assert!(attached(&scrape(&netns), "vraw0"));
    (netns, peer, config, agent)
}

#[test]
fn vlan_tagged_packets_are_left_to_the_vlan_device() {
    const FRAMES: usize = 5;
    const PAYLOAD: usize = 100;
    let (netns, peer, config, agent) = raw_veth_watched();

    // Tagged frames arrive with the tag taken into the packet's metadata: a VLAN device,
    // where there is one, sees them again untagged and counts them; vraw0 must not. The
    // untagged ones are vraw0's own, and so are the priority-tagged ones (VLAN 0), which
    // the stack delivers on vraw0 itself.
    peer.run(|| {
        for _ in 0..FRAMES {
            send_raw("vraw1", &tcp_frame(Some(7), PAYLOAD));
            send_raw("vraw1", &tcp_frame(None, PAYLOAD));
            send_raw("vraw1", &tcp_frame(Some(0), PAYLOAD));
        }
    });
    let counted = 2 * FRAMES;
    let metrics = wait_for("the untagged frames", Duration::from_secs(15), || {
        let text = scrape(&netns);
        (payload_bytes(&text, "in") == Some((counted * PAYLOAD) as f64)).then_some(text)
    });
    // Polls later, still only those.
    assert_eq!(
        payload_bytes(&support::after_polls(&netns, 3), "in"),
        Some((counted * PAYLOAD) as f64)
    );
    // IP bytes, headers included: 40 + 100 each.
    assert_eq!(
        sample(
            &metrics,
            "collector_proxy_traffic_bytes_total",
            &[("route", "web"), ("direction", "in")]
        ),
        Some((counted * (40 + PAYLOAD)) as f64)
    );
    assert!(agent.stop().success());
    assert_no_pins(&config.pin_dir);
}

/// A VLAN tag inside a frame whose skb says IP: what a VLAN device with `reorder_hdr off`
/// hands its own tc ingress (this kernel has no VLAN devices to show it with). Sent here
/// through a packet socket that names the protocol IP, out of the watched veth: the
/// parsers read the IP header at 14 bytes and took the tag for it (at best leaving the
/// frame silently). Now a TCP one counts as unparsed; the same frames untagged count as
/// traffic exactly.
#[test]
fn a_vlan_tag_inside_a_frame_the_skb_calls_ip_counts_as_unparsed() {
    const FRAMES: usize = 5;
    const PAYLOAD: usize = 100;
    let (netns, _peer, config, agent) = raw_veth_watched();
    netns.run(|| {
        for _ in 0..FRAMES {
            send_raw_as("vraw0", &reply_frame(Some(7), PAYLOAD), libc::ETH_P_IP);
            send_raw_as("vraw0", &reply_frame(None, PAYLOAD), libc::ETH_P_IP);
        }
    });
    let unparsed = |metrics: &str| {
        sample(
            metrics,
            "collector_bpf_errors_total",
            &[("kind", "packet_unparsed")],
        )
    };
    let metrics = wait_for("the frames", Duration::from_secs(15), || {
        let text = scrape(&netns);
        (payload_bytes(&text, "out") == Some((FRAMES * PAYLOAD) as f64)
            && unparsed(&text) == Some(FRAMES as f64))
        .then_some(text)
    });
    assert_eq!(
        sample(
            &metrics,
            "collector_proxy_traffic_bytes_total",
            &[("route", "web"), ("direction", "out")]
        ),
        Some((FRAMES * (40 + PAYLOAD)) as f64)
    );
    let later = support::after_polls(&netns, 3);
    assert_eq!(payload_bytes(&later, "out"), payload_bytes(&metrics, "out"));
    assert_eq!(unparsed(&later), Some(FRAMES as f64));
    assert!(agent.stop().success());
    assert_no_pins(&config.pin_dir);
}

#[test]
fn a_program_that_ends_the_chain_ahead_of_ours_hides_nothing() {
    let netns = Netns::new();
    let peer = Netns::new();
    add_veth(&netns, &peer);
    // Already there when the agent starts, as a CNI's programs are.
    let links = netns.run(|| bpf_calls::chain_ending_programs("vcoll0", false, 1));
    let config = AgentConfig::new(ROUTES);
    let agent = Agent::start(&netns, &config);
    wait_for("vcoll0 to be attached", Duration::from_secs(10), || {
        attached(&scrape(&netns), "vcoll0").then_some(())
    });
    exchange_counted(&netns, &peer, "10.77.0.1:18080");
    assert!(agent.stop().success());
    assert_no_pins(&config.pin_dir);
    drop(links);
}

/// `collector_tc_programs_ahead` of `interface` and `hook`.
fn programs_ahead(metrics: &str, interface: &str, hook: &str) -> Option<f64> {
    sample(
        metrics,
        "collector_tc_programs_ahead",
        &[("interface", interface), ("hook", hook)],
    )
}

#[test]
fn a_program_put_ahead_of_ours_later_is_reported() {
    let netns = Netns::new();
    let peer = Netns::new();
    add_veth(&netns, &peer);
    let config = AgentConfig::new(ROUTES);
    // With the statistics' empty programs too: they go behind ours.
    let agent = Agent::start_with(&netns, &config, &["--bpf-stats"]);
    let metrics = wait_for("vcoll0 to be attached", Duration::from_secs(10), || {
        let metrics = scrape(&netns);
        attached(&metrics, "vcoll0").then_some(metrics)
    });
    for hook in ["ingress", "egress"] {
        assert_eq!(
            programs_ahead(&metrics, "vcoll0", hook),
            Some(0.0),
            "{hook}"
        );
    }
    assert_eq!(programs_ahead(&metrics, "lo", "ingress"), Some(0.0));

    // A CNI agent that restarts and puts its programs at the head.
    let links = netns.run(|| bpf_calls::chain_ending_programs("vcoll0", true, 1));
    wait_for(
        "the programs ahead to be reported",
        Duration::from_secs(10),
        || {
            let metrics = scrape(&netns);
            ["ingress", "egress"]
                .iter()
                .all(|hook| programs_ahead(&metrics, "vcoll0", hook) == Some(1.0))
                .then_some(())
        },
    );
    drop(links);
    wait_for("ours to be first again", Duration::from_secs(10), || {
        let metrics = scrape(&netns);
        ["ingress", "egress"]
            .iter()
            .all(|hook| programs_ahead(&metrics, "vcoll0", hook) == Some(0.0))
            .then_some(())
    });
    assert!(agent.stop().success());
    assert_no_pins(&config.pin_dir);
}

/// The index of `interface` in the calling thread's namespace.
fn ifindex(interface: &str) -> u32 {
    let name = std::ffi::CString::new(interface).unwrap();
    // SAFETY: a NUL-terminated name.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    assert_ne!(index, 0, "no interface {interface}");
    index
}

/// Takes vcoll0 down, which stays attached, its counters exported and standing still (read
/// twice after the down, so that nothing that arrived before it moves them in between); the
/// scrape after the down.
fn take_vcoll0_down(netns: &Netns) -> String {
    let received = |metrics: &str| {
        sample(
            metrics,
            "collector_interface_receive_bytes_total",
            &[("interface", "vcoll0")],
        )
    };
    ip(netns, "link set vcoll0 down");
    let down = support::after_polls(netns, 2);
    assert!(attached(&down, "vcoll0"), "{down}");
    assert!(received(&down).is_some_and(|bytes| bytes > 0.0), "{down}");
    assert_eq!(received(&support::after_polls(netns, 2)), received(&down));
    down
}

/// The veth of [`add_veth`], and an agent logging to `log` once it is attached there: the
/// agent and vcoll0's index.
fn watching_a_veth(
    netns: &Netns,
    peer: &Netns,
    config: &AgentConfig,
    log: &std::path::Path,
) -> (Agent, u32) {
    add_veth(netns, peer);
    let agent = Agent::start_logging(netns, config, &[], log);
    wait_for("vcoll0 to be attached", Duration::from_secs(10), || {
        attached(&scrape(netns), "vcoll0").then_some(())
    });
    (agent, netns.run(|| ifindex("vcoll0")))
}

/// The pin of the agent's tc link `prefix` on interface `index`.
fn link_pin(config: &AgentConfig, prefix: &str, index: u32) -> std::path::PathBuf {
    config
        .pin_dir
        .join("v1/links")
        .join(format!("{prefix}_{index}"))
}

/// `collector_tc_reattached_total` of `interface` and `hook`.
fn reattached(metrics: &str, interface: &str, hook: &str) -> Option<f64> {
    sample(
        metrics,
        "collector_tc_reattached_total",
        &[("interface", interface), ("hook", hook)],
    )
}

/// Someone detaches our links (`bpftool link detach pinned ...`): the next poll attaches
/// ours again, in a fresh link pinned in place of the dead one, says so, and counting goes
/// on exactly.
#[test]
fn a_detached_link_is_attached_again_and_counts_exactly() {
    let netns = Netns::new();
    let peer = Netns::new();
    add_veth(&netns, &peer);
    let config = AgentConfig::new(ROUTES);
    let logs = ScratchDir::new("detached");
    let log = logs.path("agent.log");
    let agent = Agent::start_logging(&netns, &config, &[], &log);
    let metrics = wait_for("vcoll0 to be attached", Duration::from_secs(10), || {
        let metrics = scrape(&netns);
        attached(&metrics, "vcoll0").then_some(metrics)
    });
    for hook in ["ingress", "egress"] {
        assert_eq!(reattached(&metrics, "vcoll0", hook), Some(0.0), "{hook}");
    }

    let index = netns.run(|| ifindex("vcoll0"));
    for prefix in ["tc_ingress", "tc_egress"] {
        bpf_calls::detach_pinned_link(&link_pin(&config, prefix, index));
    }
    let metrics = wait_for(
        "the links to be attached again",
        Duration::from_secs(10),
        || {
            let metrics = scrape(&netns);
            ["ingress", "egress"]
                .iter()
                .all(|hook| reattached(&metrics, "vcoll0", hook) == Some(1.0))
                .then_some(metrics)
        },
    );
    assert!(attached(&metrics, "vcoll0"));
    for hook in ["ingress", "egress"] {
        assert_eq!(
            programs_ahead(&metrics, "vcoll0", hook),
            Some(0.0),
            "{hook}"
        );
    }

    exchange_counted(&netns, &peer, "10.77.0.1:18080");
    // Found once: the fresh links are ours, on the hooks.
    let metrics = support::after_polls(&netns, 2);
    for hook in ["ingress", "egress"] {
        assert_eq!(reattached(&metrics, "vcoll0", hook), Some(1.0), "{hook}");
    }
    assert!(agent.stop().success());
    let text = std::fs::read_to_string(&log).unwrap();
    let warnings = text
        .lines()
        .filter(|line| line.contains(" WARN ") && line.contains("detached from the hook"))
        .count();
    assert_eq!(warnings, 2, "{text}");
    assert_no_pins(&config.pin_dir);
}

/// A configured interface that does not exist yet (a VLAN device or a second NIC made
/// later, a NIC named otherwise on this node) does not stop the start: it is reported missing,
/// attached when it appears, and its traffic counted exactly.
#[test]
fn a_configured_interface_that_appears_later_is_attached_and_counted() {
    let netns = Netns::new();
    let peer = Netns::new();
    let config = AgentConfig::new(&format!("interfaces = [\"lo\", \"vcoll0\"]\n{ROUTES}"));
    let agent = Agent::start(&netns, &config);
    let metrics = scrape(&netns);
    assert!(attached(&metrics, "lo"));
    assert!(!attached(&metrics, "vcoll0"));
    assert_eq!(missing(&metrics, "vcoll0"), Some(1.0));
    assert_eq!(missing(&metrics, "lo"), None);

    add_veth(&netns, &peer);
    wait_for("vcoll0 to be attached", Duration::from_secs(10), || {
        let metrics = scrape(&netns);
        (attached(&metrics, "vcoll0") && missing(&metrics, "vcoll0").is_none()).then_some(())
    });
    exchange_counted(&netns, &peer, "10.77.0.1:18080");

    // Taken down, it stays, and is not missing.
    let down = take_vcoll0_down(&netns);
    assert_eq!(missing(&down, "vcoll0"), None);
    assert!(agent.stop().success());
    assert_no_pins(&config.pin_dir);
}

/// An interface renamed (same index, new name; one that is up too since Linux 6.2, commit
/// bd039b5ea2a9) keeps its links: the same pins, nothing attached anew (which met the old links
/// still on the hooks: "File exists"), and its traffic counted exactly under the new name.
#[test]
fn a_renamed_interface_keeps_its_links_and_counts_exactly() {
    use std::os::unix::fs::MetadataExt as _;
    let netns = Netns::new();
    let peer = Netns::new();
    let config = AgentConfig::new(ROUTES);
    let logs = ScratchDir::new("renamed");
    let log = logs.path("agent.log");
    let (agent, index) = watching_a_veth(&netns, &peer, &config, &log);
    let pins = || {
        ["tc_ingress", "tc_egress"].map(|prefix| {
            std::fs::metadata(link_pin(&config, prefix, index))
                .unwrap()
                .ino()
        })
    };
    let before = pins();

    for (from, to) in [("vcoll0", "vren0"), ("vren0", "vren1"), ("vren1", "vcoll0")] {
        ip(&netns, &format!("link set dev {from} name {to}"));
        wait_for(
            &format!("{to} to be attached"),
            Duration::from_secs(10),
            || {
                let metrics = scrape(&netns);
                (attached(&metrics, to) && !attached(&metrics, from)).then_some(())
            },
        );
        support::after_polls(&netns, 2);
        assert_eq!(pins(), before, "{from} -> {to}");
    }
    ip(&netns, "link set dev vcoll0 name vren2");
    wait_for("vren2 to be attached", Duration::from_secs(10), || {
        attached(&scrape(&netns), "vren2").then_some(())
    });
    let metrics = exchange_counted(&netns, &peer, "10.77.0.1:18080");
    for hook in ["ingress", "egress"] {
        assert_eq!(programs_ahead(&metrics, "vren2", hook), Some(0.0), "{hook}");
    }
    assert_eq!(pins(), before);
    assert!(agent.stop().success());
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains(" WARN "), "{text}");
    assert_no_pins(&config.pin_dir);
}

/// Under the default selection, an interface taken down stays attached with its series
/// (standing still), not detached, and counts on exactly when it is up again: forgotten, its
/// series vanished through the outage, and the attach at the up could meet the old links.
#[test]
fn a_watched_interface_taken_down_stays_attached_and_counts_on_when_up() {
    use std::os::unix::fs::MetadataExt as _;
    let netns = Netns::new();
    let peer = Netns::new();
    let config = AgentConfig::new(ROUTES);
    let logs = ScratchDir::new("down-up");
    let log = logs.path("agent.log");
    let (agent, index) = watching_a_veth(&netns, &peer, &config, &log);
    let pin = || {
        std::fs::metadata(link_pin(&config, "tc_ingress", index))
            .unwrap()
            .ino()
    };
    let before = pin();
    exchange_counted(&netns, &peer, "10.77.0.1:18080");

    take_vcoll0_down(&netns);

    ip(&netns, "link set vcoll0 up");
    connect_and_serve(&netns, &peer, "10.77.0.1:18080");
    let metrics = wait_for(
        "the second connections to close",
        Duration::from_secs(10),
        || {
            let text = scrape(&netns);
            (sample(
                &text,
                "collector_proxy_connections_closed_total",
                &[("route", "web")],
            ) == Some((2 * CONNECTIONS) as f64))
            .then_some(text)
        },
    );
    assert_payload(&metrics, 2 * CONNECTIONS, &[&netns, &peer], "after the up");
    assert_eq!(pin(), before);
    assert!(agent.stop().success());
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains("forgetting"), "{text}");
    assert!(!text.contains(" WARN "), "{text}");
    assert_no_pins(&config.pin_dir);
}

/// A tun device of `link_type` (`ARPHRD_*`, set with `TUNSETLINK` while it is down), up:
/// framed as an IP-in-IP tunnel's, a PPP link's or an InfiniBand port's are, which this
/// kernel cannot make.
fn tun_of_link_type(netns: &Netns, name: &'static str, link_type: u16) -> std::fs::File {
    let tun = support::open_tun_with(netns, name, libc::IFF_TUN | libc::IFF_NO_PI);
    set_link_type(&tun, link_type);
    support::ip_batch(&netns.name, &format!("link set {name} up\n"));
    tun
}

/// Sets the link type (`ARPHRD_*`) of the tun device open as `tun`, which must be down.
fn set_link_type(tun: &std::fs::File, link_type: u16) {
    use std::os::fd::AsRawFd as _;
    /// `_IOW('T', 205, int)`.
    const TUNSETLINK: libc::c_ulong = 0x4004_54cd;
    // SAFETY: TUNSETLINK takes its argument by value.
    let set = unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETLINK, libc::c_ulong::from(link_type)) };
    assert_eq!(set, 0, "{}", std::io::Error::last_os_error());
}

/// Asserts that `log` has one line with `text`, and that it names the IP-in-IP tun
/// `ipcoll0` with its link type.
fn said_once_of_the_tunnel(log: &std::path::Path, text: &str) {
    let lines = support::logged_lines(log, text);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains("ipcoll0 (link type 768)"), "{lines:?}");
}

/// Up interfaces of a framing the classifiers do not parse are left out of the default
/// selection, as before, and now said in the log, with their link type: at the start, and
/// when one appears later. Until 2026-12-04 nothing said that their live traffic went
/// uncounted.
#[test]
fn an_up_interface_of_a_framing_not_parsed_is_named_in_the_log() {
    const ARPHRD_TUNNEL: u16 = 768;
    const ARPHRD_PPP: u16 = 512;
    const NOT_PARSED: &str = "its framing is not one the classifiers parse";
    let netns = Netns::new();
    let _tunnel = tun_of_link_type(&netns, "ipcoll0", ARPHRD_TUNNEL);
    let config = AgentConfig::new(ROUTES);
    let scratch = ScratchDir::new("unparsed");
    let log = scratch.path("agent.log");
    let agent = Agent::start_logging(&netns, &config, &[], &log);
    said_once_of_the_tunnel(&log, NOT_PARSED);
    let metrics = scrape(&netns);
    assert!(attached(&metrics, "lo") && !attached(&metrics, "ipcoll0"));

    let _ppp = tun_of_link_type(&netns, "pppcoll0", ARPHRD_PPP);
    let lines = wait_for("the second one in the log", Duration::from_secs(10), || {
        let lines = support::logged_lines(&log, NOT_PARSED);
        (lines.len() >= 2).then_some(lines)
    });
    // Each once, however many polls saw them.
    support::after_polls(&netns, 3);
    let again = support::logged_lines(&log, NOT_PARSED);
    assert_eq!(again, lines);
    assert!(lines[1].contains("pppcoll0 (link type 512)"), "{lines:?}");
    assert!(!attached(&scrape(&netns), "pppcoll0"));
    assert!(agent.stop().success());
    assert_no_pins(&config.pin_dir);
}

/// A configured interface of a framing the classifiers do not parse is missing, whether it
/// came after the start or was there at it: the start goes on without it, says why, and
/// exports `collector_interface_missing` for it, as the running agent does for one that
/// appears. Until 2026-12-07 a start refused it, so a node that made it after a start (as
/// Calico makes `tunl0`) crash-looped the agent at its next restart.
#[test]
fn a_configured_interface_of_a_framing_not_parsed_is_missing_at_the_start_and_after() {
    const ARPHRD_TUNNEL: u16 = 768;
    const NOT_PARSED: &str = "link-layer framing the tc classifiers do not parse";
    let netns = Netns::new();
    let config = AgentConfig::new(&format!("interfaces = [\"lo\", \"ipcoll0\"]\n{ROUTES}"));
    let missing = |metrics: &str| missing(metrics, "ipcoll0");
    let agent = Agent::start(&netns, &config);
    assert_eq!(missing(&scrape(&netns)), Some(1.0));
    let _tunnel = tun_of_link_type(&netns, "ipcoll0", ARPHRD_TUNNEL);
    let metrics = support::after_polls(&netns, 2);
    assert_eq!(missing(&metrics), Some(1.0));
    assert!(attached(&metrics, "lo") && !attached(&metrics, "ipcoll0"));
    assert!(agent.stop().success());

    let scratch = ScratchDir::new("configured-unparsed");
    let log = scratch.path("agent.log");
    let agent = Agent::start_logging(&netns, &config, &[], &log);
    said_once_of_the_tunnel(&log, NOT_PARSED);
    let metrics = scrape(&netns);
    assert_eq!(missing(&metrics), Some(1.0));
    assert!(attached(&metrics, "lo") && !attached(&metrics, "ipcoll0"));
    assert!(agent.stop().success());
    assert_no_pins(&config.pin_dir);
    // `check` judges it as the start does: a warning, not a failure.
    let (passed, line) = support::check_line(&netns, &config.path, &[], "interfaces");
    assert!(
        passed
            && line.starts_with("warn")
            && line
                .contains("ipcoll0 (link type 768) of a framing the tc classifiers do not parse")
            && line.ends_with("attached now: lo"),
        "{line}"
    );
}

/// A veth `ours` with interface index `index` (10.77.0.1) in `netns`, its peer `vcoll1`
/// (10.77.0.2) in `peer`.
fn veth_with_index(netns: &Netns, ours: &str, index: u32, peer: &Netns) {
    support::ip_batch(
        &netns.name,
        &format!(
            "link add {ours} index {index} type veth peer name vcoll1 netns {}\n\
             addr add 10.77.0.1/24 dev {ours}\n\
             link set {ours} up\n",
            peer.name
        ),
    );
    support::ip_batch(
        &peer.name,
        "addr add 10.77.0.2/24 dev vcoll1\nlink set vcoll1 up\n",
    );
}

/// Runs `change` with the agent started with `config` stopped (SIGSTOP), so that its next
/// sync sees all of it at once, as two changes between syncs are seen.
fn while_stopped(config: &AgentConfig, change: impl FnOnce()) {
    let pid = agent_pid(&config.path).expect("the agent's pid");
    // SAFETY: kill has no memory arguments.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    let continued = support::OnDrop(move || {
        // SAFETY: as above.
        unsafe { libc::kill(pid, libc::SIGCONT) };
    });
    change();
    drop(continued);
}

/// An interface deleted and another made with its index between two syncs (an index given
/// at creation, a device moved in from another namespace with it, or a fresh namespace's
/// next index after the last one went) is attached anew. Until 2026-12-04 it was taken for
/// a rename: its dead links then counted as our programs detached from the hooks, and a
/// device of another framing got the old framing's programs back.
#[test]
fn a_device_that_takes_a_deleted_ones_index_is_attached_anew() {
    const INDEX: u32 = 2;
    const ETHERNET: [&str; 2] = ["tc_ingress", "tc_egress"];
    const IP: [&str; 2] = ["tc_ingress_ip", "tc_egress_ip"];
    let netns = Netns::new();
    let peer = Netns::new();
    veth_with_index(&netns, "vold0", INDEX, &peer);
    let config = AgentConfig::new(ROUTES);
    let logs = ScratchDir::new("index_reused");
    let log = logs.path("agent.log");
    let agent = Agent::start_logging(&netns, &config, &[], &log);
    wait_for("vold0 to be attached", Duration::from_secs(10), || {
        attached(&scrape(&netns), "vold0").then_some(())
    });
    let pins =
        |prefixes: [&str; 2]| prefixes.map(|prefix| link_pin(&config, prefix, INDEX).exists());
    // The old device had its programs detached by hand once, and counted it: the new one
    // starts from 0.
    for prefix in ETHERNET {
        bpf_calls::detach_pinned_link(&link_pin(&config, prefix, INDEX));
    }
    wait_for("vold0's reattaches", Duration::from_secs(10), || {
        let metrics = scrape(&netns);
        ["ingress", "egress"]
            .iter()
            .all(|hook| reattached(&metrics, "vold0", hook) == Some(1.0))
            .then_some(())
    });

    // Another veth, Ethernet framed as the first was.
    while_stopped(&config, || {
        ip(&netns, "link del vold0");
        veth_with_index(&netns, "vcoll0", INDEX, &peer);
    });
    wait_for("vcoll0 to be attached", Duration::from_secs(10), || {
        let metrics = scrape(&netns);
        (attached(&metrics, "vcoll0") && !attached(&metrics, "vold0")).then_some(())
    });
    exchange_counted(&netns, &peer, "10.77.0.1:18080");
    let metrics = support::after_polls(&netns, 2);
    for hook in ["ingress", "egress"] {
        assert_eq!(reattached(&metrics, "vcoll0", hook), Some(0.0), "{hook}");
    }
    assert_eq!(pins(ETHERNET), [true, true]);

    // A tun, without a link-layer header: the next index the namespace hands out is the
    // one freed (a fresh namespace's lo has 1, and indexes given do not move that count).
    let tun = std::cell::OnceCell::new();
    while_stopped(&config, || {
        ip(&netns, "link del vcoll0");
        let _ = tun.set(TunPair::new(&netns, &peer));
        assert_eq!(
            netns.run(|| ifindex("tcoll0")),
            INDEX,
            "the tun did not get the index freed"
        );
    });
    wait_for("tcoll0 to be attached", Duration::from_secs(10), || {
        let metrics = scrape(&netns);
        (attached(&metrics, "tcoll0") && !attached(&metrics, "vcoll0")).then_some(())
    });
    assert_eq!(pins(IP), [true, true]);
    assert_eq!(pins(ETHERNET), [false, false]);
    exchange_counted(&netns, &peer, "10.77.0.1:18080");
    let metrics = support::after_polls(&netns, 2);
    for hook in ["ingress", "egress"] {
        assert_eq!(reattached(&metrics, "tcoll0", hook), Some(0.0), "{hook}");
    }
    assert!(agent.stop().success());
    let replaced = support::logged_lines(&log, "another made with its index");
    assert_eq!(replaced.len(), 2, "{replaced:?}");
    let text = std::fs::read_to_string(&log).unwrap();
    let warnings: Vec<&str> = text
        .lines()
        .filter(|line| line.contains(" WARN "))
        .collect();
    assert_eq!(warnings.len(), 2, "{text}");
    assert!(
        warnings
            .iter()
            .all(|line| line.contains("vold0") && line.contains("detached from the hook")),
        "{text}"
    );
    assert!(!text.contains("renamed"), "{text}");
    drop(tun);
    assert_no_pins(&config.pin_dir);
}

/// A configured tun whose link type is changed while it is down (kept attached, as a
/// configured interface is) now has another framing: the old framing's programs leave its
/// hooks and the new one's are attached, at once.
#[test]
fn a_configured_interface_that_changes_its_framing_gets_that_framings_programs() {
    const ARPHRD_ETHER: u16 = 1;
    let netns = Netns::new();
    let tun = support::open_tun_with(&netns, "tcfg0", libc::IFF_TUN | libc::IFF_NO_PI);
    ip(&netns, "link set tcfg0 up");
    let index = netns.run(|| ifindex("tcfg0"));
    let config = AgentConfig::new(&format!("interfaces = [\"lo\", \"tcfg0\"]\n{ROUTES}"));
    let logs = ScratchDir::new("framing_changed");
    let log = logs.path("agent.log");
    let agent = Agent::start_logging(&netns, &config, &[], &log);
    let pins =
        |prefixes: [&str; 2]| prefixes.map(|prefix| link_pin(&config, prefix, index).exists());
    assert!(attached(&scrape(&netns), "tcfg0"));
    assert_eq!(pins(["tc_ingress_ip", "tc_egress_ip"]), [true, true]);
    assert_eq!(pins(["tc_ingress", "tc_egress"]), [false, false]);

    ip(&netns, "link set tcfg0 down");
    set_link_type(&tun, ARPHRD_ETHER);
    wait_for(
        "the Ethernet programs' pins",
        Duration::from_secs(10),
        || {
            (pins(["tc_ingress", "tc_egress"]) == [true, true]
                && pins(["tc_ingress_ip", "tc_egress_ip"]) == [false, false])
            .then_some(())
        },
    );
    let metrics = support::after_polls(&netns, 2);
    assert!(attached(&metrics, "tcfg0"));
    for hook in ["ingress", "egress"] {
        assert_eq!(reattached(&metrics, "tcfg0", hook), Some(0.0), "{hook}");
    }
    assert_eq!(support::logged_lines(&log, "changed its framing").len(), 1);
    assert!(agent.stop().success());
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains(" WARN "), "{text}");
    drop(tun);
    assert_no_pins(&config.pin_dir);
}

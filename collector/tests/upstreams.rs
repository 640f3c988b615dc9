//! Privileged integration tests of the upstream statistics: the connections the proxy opens
//! to its backends (`[[upstreams]]`, by remote port), counted by the real kernel programs in
//! a network namespace of each test's own, with a backend server in the test and exact counts.
#![expect(
    clippy::float_cmp,
    clippy::cast_precision_loss,
    reason = "OpenMetrics values are floats; the counts compared are small integers, exact in f64"
)]

mod support;

use std::{
    io::ErrorKind,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    thread,
    time::{Duration, Instant},
};

use support::{
    Agent, AgentConfig, Closer, Netns, assert_no_pins, exchanges, hold_open, proxy_json, sample,
    scrape, wait_for,
};

/// The backend's port, listened on.
const BACKEND_PORT: u16 = 19000;
/// The upstream's second port, where nothing listens: every connect to it is refused.
const REFUSING_PORT: u16 = 19001;
/// A port in no upstream.
const UNLISTED_PORT: u16 = 19002;
/// The route's port, where the test's clients connect to "the proxy".
const ROUTE_PORT: u16 = 18080;

const CONFIG: &str = r#"
[[routes]]
name = "web"
ports = [18080]
type = "tcp"

[[upstreams]]
name = "app"
ports = [19000, 19001]
"#;

/// `count` connects to `address` in `netns`, each refused.
fn refused(netns: &Netns, address: SocketAddr, count: usize) {
    netns.run(move || {
        for _ in 0..count {
            let err = TcpStream::connect(address).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{address}: {err}");
        }
    });
}

/// A listener on `port` of localhost in `netns`.
fn listen(netns: &Netns, port: u16) -> TcpListener {
    netns.run(move || TcpListener::bind((Ipv4Addr::LOCALHOST, port)).unwrap())
}

/// 192.0.2.0/24 (TEST-NET-1) on a veth from `netns` to a namespace of its own, where no
/// one has 192.0.2.2: a connect to it waits for an ARP answer that never comes.
fn unanswered_network(netns: &Netns) -> Netns {
    let silent = Netns::new();
    support::veth(netns, "up0", "192.0.2.1/24", &silent, "up1", "192.0.2.3/24");
    silent
}

fn at(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::from((ip.into(), port))
}

/// The sample `name{upstream="app"}`.
fn app_value(metrics: &str, name: &str) -> f64 {
    sample(metrics, name, &[("upstream", "app")])
        .unwrap_or_else(|| panic!("{name}{{upstream=\"app\"}} missing:\n{metrics}"))
}

/// The upstream "app" of `/api/v1/proxy`.
fn app_json(json: &serde_json::Value) -> serde_json::Value {
    let upstreams = json["upstreams"]
        .as_array()
        .unwrap_or_else(|| panic!("{json}"));
    upstreams
        .iter()
        .find(|u| u["name"] == "app")
        .unwrap_or_else(|| panic!("no upstream app: {json}"))
        .clone()
}

/// What the upstream "app" shows, the same in `/metrics` and `/api/v1/proxy`.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
struct Figures {
    opened: usize,
    closed: usize,
    active: usize,
    open_from_before_start: usize,
    connect_failures: usize,
    received_bytes: usize,
    sent_bytes: usize,
}

impl Figures {
    fn from_metrics(metrics: &str) -> Self {
        let value = |name: &str| {
            let value = app_value(metrics, &format!("collector_proxy_upstream_{name}"));
            assert!(value >= 0.0 && value.fract() == 0.0, "{name} = {value}");
            #[expect(
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss,
                reason = "checked whole and not negative"
            )]
            let value = value as usize;
            value
        };
        Self {
            opened: value("connections_opened_total"),
            closed: value("connections_closed_total"),
            active: value("connections_active"),
            open_from_before_start: value("connections_open_from_before_start"),
            connect_failures: value("connect_failures_total"),
            received_bytes: value("connection_received_bytes_total"),
            sent_bytes: value("connection_sent_bytes_total"),
        }
    }

    fn from_json(app: &serde_json::Value) -> Self {
        let value = |name: &str| {
            let value = app[name]
                .as_u64()
                .unwrap_or_else(|| panic!("{name} is no count: {app}"));
            usize::try_from(value).unwrap()
        };
        Self {
            opened: value("opened"),
            closed: value("closed"),
            active: value("active"),
            open_from_before_start: value("openFromBeforeStart"),
            connect_failures: value("connectFailures"),
            received_bytes: value("bytesIn"),
            sent_bytes: value("bytesOut"),
        }
    }
}

/// Waits until `/metrics` shows `expected` for "app", then checks that `/api/v1/proxy`
/// shows the same: returns that scrape and the upstream's JSON.
fn wait_for_figures(netns: &Netns, expected: Figures) -> (String, serde_json::Value) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let metrics = loop {
        let metrics = scrape(netns);
        let figures = Figures::from_metrics(&metrics);
        if figures == expected {
            break metrics;
        }
        assert!(
            Instant::now() < deadline,
            "upstream app: waited for {expected:?}, still {figures:?}"
        );
        thread::sleep(Duration::from_millis(50));
    };
    let app = app_json(&proxy_json(netns));
    assert_eq!(Figures::from_json(&app), expected, "{app}");
    // Two polls on, still the same: nothing counted late.
    let later = support::after_polls(netns, 2);
    assert_eq!(Figures::from_metrics(&later), expected, "{later}");
    (metrics, app)
}

#[test]
fn counts_connections_and_bytes_exactly_in_both_closing_orders() {
    // Per closing order and address family; requests and responses of different sizes.
    const V4: usize = 50;
    const V6: usize = 5;
    const REQUEST: usize = 1_234;
    const RESPONSE: usize = 56_789;
    const ALL: usize = 2 * (V4 + V6);

    let netns = Netns::new();
    let config = AgentConfig::new(CONFIG);
    let agent = Agent::start(&netns, &config);

    for closer in [Closer::Connecting, Closer::Accepting] {
        let v4 = at(Ipv4Addr::LOCALHOST, BACKEND_PORT);
        let v6 = at(Ipv6Addr::LOCALHOST, BACKEND_PORT);
        exchanges(&netns, v4, V4, REQUEST, RESPONSE, closer);
        exchanges(&netns, v6, V6, REQUEST, RESPONSE, closer);
    }

    let (metrics, app) = wait_for_figures(
        &netns,
        Figures {
            opened: ALL,
            closed: ALL,
            received_bytes: ALL * RESPONSE,
            sent_bytes: ALL * REQUEST,
            ..Figures::default()
        },
    );
    assert_eq!(
        sample(
            &metrics,
            "collector_proxy_upstream_info",
            &[("upstream", "app"), ("ports", "19000,19001")]
        ),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        app_value(
            &metrics,
            "collector_proxy_upstream_connection_duration_seconds_count"
        ),
        ALL as f64
    );
    assert_eq!(
        app["ports"],
        serde_json::json!([BACKEND_PORT, REFUSING_PORT])
    );
    assert_eq!(app["duration"]["count"], ALL);
    assert!(app["duration"]["p50"].as_f64().unwrap() > 0.0, "{app}");
    // The proxy's connections to its backends are no clients' connections.
    let json = proxy_json(&netns);
    assert_eq!(json["totalConnections"], 0, "{json}");
    assert_eq!(json["connectionsByRoute"]["web"], 0, "{json}");

    assert!(agent.stop().success());
    assert_no_pins(&config.pin_dir);
}

#[test]
fn counts_refused_and_abandoned_connects_as_failures_and_not_as_opened() {
    const V4: usize = 7;
    const V6: usize = 3;
    const ABANDONED: usize = 2;
    let netns = Netns::new();
    let config = AgentConfig::new(CONFIG);
    let agent = Agent::start(&netns, &config);

    refused(&netns, at(Ipv4Addr::LOCALHOST, REFUSING_PORT), V4);
    refused(&netns, at(Ipv6Addr::LOCALHOST, REFUSING_PORT), V6);
    // Backends behind an interface that answers nothing: the proxy gives up on each connect.
    let _silent = unanswered_network(&netns);
    netns.run(|| {
        for _ in 0..ABANDONED {
            let backend = at(Ipv4Addr::new(192, 0, 2, 2), BACKEND_PORT);
            let err = TcpStream::connect_timeout(&backend, Duration::from_millis(100)).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::TimedOut, "{err}");
        }
    });
    // And one that succeeds, on the upstream's other port.
    exchanges(
        &netns,
        at(Ipv4Addr::LOCALHOST, BACKEND_PORT),
        1,
        10,
        20,
        Closer::Connecting,
    );

    let (metrics, app) = wait_for_figures(
        &netns,
        Figures {
            opened: 1,
            closed: 1,
            connect_failures: V4 + V6 + ABANDONED,
            received_bytes: 20,
            sent_bytes: 10,
            ..Figures::default()
        },
    );
    // A failed connect has no lifetime.
    assert_eq!(
        app_value(
            &metrics,
            "collector_proxy_upstream_connection_duration_seconds_count"
        ),
        1.0
    );
    assert_eq!(app["duration"]["count"], 1);

    assert!(agent.stop().success());
    assert_no_pins(&config.pin_dir);
}

#[test]
fn held_connections_are_active_on_the_upstream_and_no_clients() {
    const HELD: usize = 20;
    const CLIENTS: usize = 3;
    let netns = Netns::new();
    let config = AgentConfig::new(CONFIG);
    let agent = Agent::start(&netns, &config);

    // Clients of the proxy on its route, and the proxy's connections to the backend, all
    // between 127.0.0.1 and 127.0.0.1: only the clients' count as clients.
    let (clients, accepted) = hold_open(&netns, &listen(&netns, ROUTE_PORT), CLIENTS);
    let (to_backend, at_backend) = hold_open(&netns, &listen(&netns, BACKEND_PORT), HELD);

    wait_for_figures(
        &netns,
        Figures {
            opened: HELD,
            active: HELD,
            ..Figures::default()
        },
    );
    let metrics = wait_for("the route's clients", Duration::from_secs(10), || {
        let metrics = scrape(&netns);
        let active = sample(
            &metrics,
            "collector_proxy_connections_active",
            &[("route", "web")],
        );
        (active == Some(CLIENTS as f64)).then_some(metrics)
    });
    for (name, value) in [
        ("collector_proxy_connections_opened_total", CLIENTS),
        ("collector_proxy_connections_closed_total", 0),
        ("collector_proxy_connections_active", CLIENTS),
    ] {
        assert_eq!(
            sample(&metrics, name, &[("route", "web")]),
            Some(value as f64),
            "{name}"
        );
    }
    let json = proxy_json(&netns);
    assert_eq!(json["activeConnections"], CLIENTS, "{json}");
    assert_eq!(json["totalConnections"], CLIENTS, "{json}");
    assert_eq!(
        json["connectionsByRoute"],
        serde_json::json!({"web": CLIENTS})
    );
    assert_eq!(
        json["connectionsByIP"],
        serde_json::json!({"127.0.0.1": CLIENTS})
    );
    assert_eq!(
        json["topIPs"],
        serde_json::json!([{"ip": "127.0.0.1", "connections": CLIENTS, "maxUndercount": 0}])
    );
    assert_eq!(app_json(&json)["active"], HELD);

    drop(to_backend);
    drop(at_backend);
    wait_for_figures(
        &netns,
        Figures {
            opened: HELD,
            closed: HELD,
            ..Figures::default()
        },
    );
    drop(clients);
    drop(accepted);

    assert!(agent.stop().success());
    assert_no_pins(&config.pin_dir);
}

#[test]
fn connections_to_unlisted_ports_and_from_other_namespaces_are_not_counted() {
    const UNLISTED: usize = 10;
    const ELSEWHERE: usize = 10;
    let netns = Netns::new();
    let other = Netns::new();
    let config = AgentConfig::new(CONFIG);
    let agent = Agent::start(&netns, &config);

    let v4 = |port| at(Ipv4Addr::LOCALHOST, port);
    exchanges(
        &netns,
        v4(UNLISTED_PORT),
        UNLISTED,
        10,
        20,
        Closer::Connecting,
    );
    refused(&netns, v4(UNLISTED_PORT + 1), UNLISTED);
    // Another namespace with a backend of its own on the upstream's port.
    exchanges(
        &other,
        v4(BACKEND_PORT),
        ELSEWHERE,
        10,
        20,
        Closer::Connecting,
    );
    refused(&other, v4(REFUSING_PORT), ELSEWHERE);
    let (held_elsewhere, accepted_elsewhere) =
        hold_open(&other, &listen(&other, BACKEND_PORT), ELSEWHERE);

    // One that counts, made after all of those: once it shows, they would have too.
    exchanges(&netns, v4(BACKEND_PORT), 1, 3, 4, Closer::Connecting);
    wait_for_figures(
        &netns,
        Figures {
            opened: 1,
            closed: 1,
            received_bytes: 4,
            sent_bytes: 3,
            ..Figures::default()
        },
    );
    drop(held_elsewhere);
    drop(accepted_elsewhere);

    assert!(agent.stop().success());
    assert_no_pins(&config.pin_dir);
}

#[test]
fn connections_open_from_before_the_start_are_active_until_they_close() {
    const BEFORE: usize = 4;
    const AFTER: usize = 2;
    let netns = Netns::new();
    let config = AgentConfig::new(CONFIG);
    let backend = listen(&netns, BACKEND_PORT);
    let (old, old_accepted) = hold_open(&netns, &backend, BEFORE);
    let agent = Agent::start(&netns, &config);
    let (new, new_accepted) = hold_open(&netns, &backend, AFTER);

    let (metrics, _) = wait_for_figures(
        &netns,
        Figures {
            opened: AFTER,
            active: BEFORE + AFTER,
            open_from_before_start: BEFORE,
            ..Figures::default()
        },
    );
    // They are the upstream's, not the route's.
    assert_eq!(
        sample(
            &metrics,
            "collector_proxy_connections_open_from_before_start",
            &[("route", "web")]
        ),
        Some(0.0)
    );
    assert_eq!(proxy_json(&netns)["activeConnections"], 0);

    // Their closes are seen by no kernel program: the agent finds them gone, and counts
    // them as no run's closes.
    drop(old);
    drop(old_accepted);
    wait_for_figures(
        &netns,
        Figures {
            opened: AFTER,
            active: AFTER,
            ..Figures::default()
        },
    );
    drop(new);
    drop(new_accepted);
    wait_for_figures(
        &netns,
        Figures {
            opened: AFTER,
            closed: AFTER,
            ..Figures::default()
        },
    );

    assert!(agent.stop().success());
    assert_no_pins(&config.pin_dir);
}

/// A backend namespace behind a veth, listening on `BACKEND_PORT` of 198.18.0.2 but
/// dropping every SYN to it until [`Firewalled::open`]: a connect waits in `SYN_SENT`,
/// retrying, for as long as the test holds it.
struct Firewalled {
    netns: Netns,
    _listener: TcpListener,
}

impl Firewalled {
    const ADDRESS: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);

    fn new(proxy: &Netns) -> Self {
        let netns = Netns::new();
        support::veth(
            proxy,
            "fw0",
            "198.18.0.1/24",
            &netns,
            "fw1",
            "198.18.0.2/24",
        );
        let listener = netns.run(|| TcpListener::bind((Self::ADDRESS, BACKEND_PORT)).unwrap());
        let nft = |command: &str| {
            support::run("ip", &["netns", "exec", &netns.name, "nft", command]);
        };
        nft("add table inet fw");
        nft("add chain inet fw input { type filter hook input priority 0; }");
        nft(&format!(
            "add rule inet fw input tcp dport {BACKEND_PORT} drop"
        ));
        Self {
            netns,
            _listener: listener,
        }
    }

    /// Lets the SYNs through: the next retransmission completes the handshake.
    fn open(&self) {
        support::run(
            "ip",
            &[
                "netns",
                "exec",
                &self.netns.name,
                "nft",
                "delete table inet fw",
            ],
        );
    }

    /// `count` nonblocking connects to the backend from `proxy`, left in their handshake.
    fn connects(proxy: &Netns, count: usize) -> Vec<socket2::Socket> {
        proxy.run(move || {
            (0..count)
                .map(|_| {
                    let socket =
                        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
                            .unwrap();
                    socket.set_nonblocking(true).unwrap();
                    let err = socket
                        .connect(&at(Self::ADDRESS, BACKEND_PORT).into())
                        .unwrap_err();
                    assert_eq!(err.raw_os_error(), Some(libc::EINPROGRESS), "{err}");
                    socket
                })
                .collect()
        })
    }
}

/// `field` of `upstream`'s slot in the pinned map `map`, from `collector maps dump` (which
/// reads the pins: also those of a retired upstream, which /metrics no longer shows).
fn slot_figure(config: &AgentConfig, map: &str, upstream: &str, field: &str) -> u64 {
    let out = std::process::Command::new(support::COLLECTOR)
        .args(["maps", "dump", "--config"])
        .arg(&config.path)
        .arg(map)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    rows.as_array()
        .into_iter()
        .flatten()
        .find(|row| row["upstream"] == upstream)
        .and_then(|row| row[field].as_u64())
        .unwrap_or_else(|| panic!("no {field} of {upstream} in {map}: {rows}"))
}

/// `name{upstream="app"}` and the connection table's fill, as one scrape shows them.
fn in_progress_and_table(netns: &Netns, upstream: &str) -> (f64, f64) {
    let metrics = scrape(netns);
    let in_progress = sample(
        &metrics,
        "collector_proxy_upstream_connects_in_progress",
        &[("upstream", upstream)],
    )
    .unwrap_or_else(|| panic!("no connects in progress of {upstream}:\n{metrics}"));
    let table = sample(
        &metrics,
        "collector_bpf_map_entries",
        &[("map", "CONN_STATE")],
    )
    .unwrap();
    (in_progress, table)
}

/// A connect the full table turns away is still counted opened when its handshake completes,
/// and untracked: never closed, never active.
#[test]
fn connections_the_full_table_turns_away_are_opened_and_untracked_never_active() {
    const CONNECTIONS: usize = 3;
    let netns = Netns::new();
    let config = AgentConfig::new(CONFIG);
    let agent = Agent::start(&netns, &config);
    support::fill_connection_table(&config, true);
    exchanges(
        &netns,
        at(Ipv4Addr::LOCALHOST, BACKEND_PORT),
        CONNECTIONS,
        10,
        20,
        Closer::Connecting,
    );
    let metrics = wait_for("3 connections turned away", Duration::from_secs(10), || {
        let metrics = scrape(&netns);
        (sample(
            &metrics,
            "collector_bpf_errors_total",
            &[("kind", "conn_table_full")],
        ) == Some(CONNECTIONS as f64))
        .then_some(metrics)
    });
    let counts = ["opened_total", "untracked_total", "closed_total", "active"].map(|name| {
        app_value(
            &metrics,
            &format!("collector_proxy_upstream_connections_{name}"),
        )
    });
    // Until 2026-12-05 they stayed active for good.
    assert_eq!(counts, [3.0, 3.0, 0.0, 0.0]);
    let app = app_json(&proxy_json(&netns));
    assert_eq!([&app["untracked"], &app["active"]], [CONNECTIONS, 0]);
    assert!(agent.stop().success());
    assert_no_pins(&config.pin_dir);
}

#[test]
fn connects_in_their_handshake_are_in_progress_and_hold_table_slots() {
    const WAITING: usize = 5;
    let netns = Netns::new();
    let config = AgentConfig::new(CONFIG);
    let agent = Agent::start(&netns, &config);
    let backend = Firewalled::new(&netns);

    let waiting = Firewalled::connects(&netns, WAITING);
    // Shown before any fails, in the upstream's gauge and in the table's fill (the alert on
    // a filling table sees them).
    wait_for("the connects in progress", Duration::from_secs(10), || {
        (in_progress_and_table(&netns, "app") == (5.0, 5.0)).then_some(())
    });
    assert_eq!(app_json(&proxy_json(&netns))["connectsInProgress"], WAITING);
    // Given up by the proxy: failures, and the slots are free again.
    drop(waiting);
    wait_for_figures(
        &netns,
        Figures {
            connect_failures: WAITING,
            ..Figures::default()
        },
    );
    assert_eq!(in_progress_and_table(&netns, "app"), (0.0, 0.0));

    drop(backend);
    assert!(agent.stop().success());
    assert_no_pins(&config.pin_dir);
}

/// One connect of "app" left in its handshake behind the firewall, the agent killed (a
/// crash), its config rewritten by `change`, the agent started again and the firewall
/// opened: the new agent, the backend and the connect, its handshake completed.
fn connect_across_a_crash(
    netns: &Netns,
    config: &AgentConfig,
    change: impl FnOnce(String) -> String,
) -> (Agent, Firewalled, socket2::Socket) {
    let agent = Agent::start(netns, config);
    let backend = Firewalled::new(netns);
    let socket = Firewalled::connects(netns, 1).remove(0);
    wait_for("the connect in progress", Duration::from_secs(10), || {
        (in_progress_and_table(netns, "app").0 == 1.0).then_some(())
    });
    agent.kill();
    let text = std::fs::read_to_string(&config.path).unwrap();
    std::fs::write(&config.path, change(text)).unwrap();
    let agent = Agent::start(netns, config);
    backend.open();
    // The SYN is sent again 1, 3, 7, 15 and 31 s after the connect: the next one through
    // completes the handshake.
    wait_for("the handshake", Duration::from_secs(40), || {
        socket.peer_addr().ok()
    });
    (agent, backend, socket)
}

#[test]
fn a_connect_across_a_crash_counts_where_it_will_close_when_the_port_changed_upstream() {
    let netns = Netns::new();
    let config = AgentConfig::new(CONFIG);
    // A restart whose config gave the port to another upstream.
    let (agent, backend, socket) = connect_across_a_crash(&netns, &config, |text| {
        text.replace("name = \"app\"", "name = \"other\"")
    });
    // Two polls after the handshake: it counted in the slot it will close in (the retired
    // "app"'s), not in the one the port names now.
    let metrics = support::after_polls(&netns, 2);
    let other = |name: &str| {
        sample(&metrics, name, &[("upstream", "other")])
            .unwrap_or_else(|| panic!("no {name} of other:\n{metrics}"))
    };
    assert_eq!(
        (
            other("collector_proxy_upstream_connections_opened_total"),
            other("collector_proxy_upstream_connections_active"),
            other("collector_proxy_upstream_connects_in_progress"),
        ),
        (0.0, 0.0, 0.0),
        "{metrics}"
    );
    // It counted in the retired "app"'s slot instead, its handshake over.
    assert_eq!(
        (
            slot_figure(&config, "CONN_COUNTERS", "app", "opened"),
            slot_figure(&config, "UPSTREAM_COUNTERS", "app", "connecting"),
        ),
        (1, 0)
    );
    // A connect made now is the new upstream's, and counts there.
    let fresh = netns.run(|| TcpStream::connect(at(Firewalled::ADDRESS, BACKEND_PORT)).unwrap());
    wait_for("the new connection", Duration::from_secs(10), || {
        let metrics = scrape(&netns);
        let opened = sample(
            &metrics,
            "collector_proxy_upstream_connections_opened_total",
            &[("upstream", "other")],
        )?;
        (opened == 1.0).then_some(())
    });
    drop(fresh);
    drop(socket);
    drop(backend);
    assert!(agent.stop().success());
    assert_no_pins(&config.pin_dir);
}

/// A second pin of a map, removed should the test fail before it is put back: a pin holds
/// its map, and bpffs outlives the test.
struct KeptPin(PathBuf);

impl Drop for KeptPin {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn a_count_an_older_builds_stop_left_pinned_is_not_adopted() {
    let netns = Netns::new();
    let config = AgentConfig::new(CONFIG);
    let agent = Agent::start(&netns, &config);
    refused(&netns, at(Ipv4Addr::LOCALHOST, REFUSING_PORT), 2);
    wait_for_figures(
        &netns,
        Figures {
            connect_failures: 2,
            ..Figures::default()
        },
    );
    // An older build knows every pin but this one: its clean stop leaves it behind. Kept
    // here by a second pin while this build's stop removes the rest, then put back.
    let pins = config.pin_dir.join("v1");
    let kept_pin =
        KeptPin(PathBuf::from("/sys/fs/bpf").join(support::unique("collector-test-kept")));
    let kept = &kept_pin.0;
    let counters = pins.join("UPSTREAM_COUNTERS");
    support::run(
        "bpftool",
        &[
            "map",
            "pin",
            "pinned",
            counters.to_str().unwrap(),
            kept.to_str().unwrap(),
        ],
    );
    assert!(agent.stop().success());
    std::fs::create_dir_all(&pins).unwrap();
    std::fs::rename(kept, &counters).unwrap();

    let agent = Agent::start(&netns, &config);
    refused(&netns, at(Ipv4Addr::LOCALHOST, REFUSING_PORT), 1);
    wait_for_figures(
        &netns,
        Figures {
            connect_failures: 1,
            ..Figures::default()
        },
    );
    assert!(agent.stop().success());
    assert_no_pins(&config.pin_dir);
}

#[test]
fn a_connect_across_a_crash_whose_port_left_the_upstream_is_opened_and_closed_not_failed() {
    let netns = Netns::new();
    let config = AgentConfig::new(CONFIG);
    // A restart whose config no longer has the backend's port: no callback of ours sees the
    // handshake complete.
    let (agent, backend, socket) = connect_across_a_crash(&netns, &config, |text| {
        text.replace("ports = [19000, 19001]", "ports = [19001]")
    });
    // Reset: it closes at once, from ESTABLISHED.
    socket.set_linger(Some(Duration::ZERO)).unwrap();
    drop(socket);
    // Counted opened at its close, then closed; no failure, nothing left in progress.
    wait_for_figures(
        &netns,
        Figures {
            opened: 1,
            closed: 1,
            ..Figures::default()
        },
    );
    assert_eq!(in_progress_and_table(&netns, "app"), (0.0, 0.0));

    drop(backend);
    assert!(agent.stop().success());
    assert_no_pins(&config.pin_dir);
}

/// A socket bound to 127.0.0.1:[`BACKEND_PORT`] in `netns`, connecting to itself without
/// waiting, its handshake held up by an output rule `held_by` (in a table `inet held`, which
/// goes with the namespace or [`release_handshakes`]); `syn_retries` sets `TCP_SYNCNT`.
fn held_self_connect(
    netns: &Netns,
    held_by: &str,
    syn_retries: Option<libc::c_int>,
) -> socket2::Socket {
    let nft = |command: &str| support::run("ip", &["netns", "exec", &netns.name, "nft", command]);
    nft("add table inet held");
    nft("add chain inet held output { type filter hook output priority 0; }");
    nft(&format!("add rule inet held output {held_by}"));
    netns.run(move || {
        let own = at(Ipv4Addr::LOCALHOST, BACKEND_PORT);
        let socket =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        if let Some(retries) = syn_retries {
            support::set_tcp_option(&socket, libc::TCP_SYNCNT, retries);
        }
        socket.set_nonblocking(true).unwrap();
        socket.bind(&own.into()).unwrap();
        let err = socket.connect(&own.into()).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EINPROGRESS), "{err}");
        socket
    })
}

/// Lets the handshakes [`held_self_connect`] held up go on.
fn release_handshakes(netns: &Netns) {
    support::run(
        "ip",
        &[
            "netns",
            "exec",
            &netns.name,
            "nft",
            "delete table inet held",
        ],
    );
}

/// A port that is a route's and an upstream's at once: one is local, the other remote.
const SHARED_ROUTE: &str = r#"
[[routes]]
name = "web"
ports = [19000]
type = "tcp"
"#;
const SHARED_UPSTREAM: &str = r#"
[[upstreams]]
name = "app"
ports = [19000]
"#;

#[test]
fn a_socket_connected_to_its_own_port_of_a_route_and_an_upstream_is_the_upstreams_alone() {
    let netns = Netns::new();
    let config = AgentConfig::new(&format!("{SHARED_ROUTE}{SHARED_UPSTREAM}"));
    let agent = Agent::start(&netns, &config);
    // A connect to its own address and port completes as a simultaneous open, through the
    // accepting side's callback.
    netns.run(|| {
        let own = at(Ipv4Addr::LOCALHOST, BACKEND_PORT);
        let socket =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        socket.bind(&own.into()).unwrap();
        socket.connect(&own.into()).unwrap();
    });
    let figures = |metrics: &str| {
        let value = |name: &str, labels: &[(&str, &str)]| sample(metrics, name, labels).unwrap();
        (
            value(
                "collector_proxy_upstream_connections_closed_total",
                &[("upstream", "app")],
            ),
            value(
                "collector_proxy_upstream_connections_opened_total",
                &[("upstream", "app")],
            ),
            value(
                "collector_proxy_connections_opened_total",
                &[("route", "web")],
            ),
            value("collector_proxy_connections_active", &[("route", "web")]),
            value("collector_bpf_map_entries", &[("map", "CONN_STATE")]),
        )
    };
    // Once its close is counted: the upstream's, once; no route connection, no slot left.
    let metrics = wait_for("the close", Duration::from_secs(10), || {
        let metrics = scrape(&netns);
        (figures(&metrics).0 == 1.0).then_some(metrics)
    });
    assert_eq!(figures(&metrics), (1.0, 1.0, 0.0, 0.0, 0.0), "{metrics}");

    assert!(agent.stop().success());
    assert_no_pins(&config.pin_dir);
}

/// The same socket, its handshake held up over a crash and a restart without upstreams: it
/// completes as the route's accept would, and the table already holds it as the crashed
/// run's connect. Until 2026-12-03 the accept looked for it only while upstreams were
/// watched, took a second slot, and the route's `active` stayed one too high for good.
#[test]
fn a_self_connect_held_over_a_crash_that_dropped_the_upstreams_takes_no_second_slot() {
    let netns = Netns::new();
    let config = AgentConfig::new(&format!("{SHARED_ROUTE}{SHARED_UPSTREAM}"));
    let agent = Agent::start(&netns, &config);
    // Its SYNs dropped on their way out: the connect waits in SYN_SENT, as the upstream's.
    let socket = held_self_connect(&netns, &format!("tcp dport {BACKEND_PORT} drop"), None);
    wait_for("the connect in progress", Duration::from_secs(10), || {
        (in_progress_and_table(&netns, "app") == (1.0, 1.0)).then_some(())
    });
    agent.kill();
    // The rest of the file (its pin directory) stays.
    let text = std::fs::read_to_string(&config.path).unwrap();
    assert!(text.contains(SHARED_UPSTREAM), "{text}");
    std::fs::write(&config.path, text.replace(SHARED_UPSTREAM, "")).unwrap();
    let agent = Agent::start(&netns, &config);
    release_handshakes(&netns);
    // The SYN is sent again with backoff, at most 32 s apart.
    wait_for("the handshake", Duration::from_secs(40), || {
        socket.peer_addr().ok()
    });
    socket.set_linger(Some(Duration::ZERO)).unwrap();
    drop(socket);
    // Its close frees its one slot; the route counted no connection.
    let entries = |metrics: &str| {
        sample(
            metrics,
            "collector_bpf_map_entries",
            &[("map", "CONN_STATE")],
        )
    };
    let metrics = wait_for("the table empty", Duration::from_secs(10), || {
        let metrics = scrape(&netns);
        (entries(&metrics) == Some(0.0)).then_some(metrics)
    });
    let route = |name: &str| sample(&metrics, name, &[("route", "web")]);
    assert_eq!(
        (
            route("collector_proxy_connections_opened_total"),
            route("collector_proxy_connections_active"),
        ),
        (Some(0.0), Some(0.0)),
        "{metrics}"
    );
    assert!(agent.stop().success());
    assert_no_pins(&config.pin_dir);
}

/// A simultaneous open that fails in `SYN_RECV` was never established: a connect failure, as
/// one refused in `SYN_SENT`. Until 2026-12-04 it was counted opened and closed.
#[test]
fn a_simultaneous_open_given_up_in_its_handshake_is_a_connect_failure() {
    let netns = Netns::new();
    let config = AgentConfig::new(CONFIG);
    let agent = Agent::start(&netns, &config);
    // Its SYN-ACKs dropped on their way out: having met its own SYN, the socket waits in
    // SYN_RECV for an answer that never comes. One retry: given up about 3 s after the
    // connect.
    let socket = held_self_connect(
        &netns,
        &format!("tcp sport {BACKEND_PORT} tcp flags & (syn | ack) == syn | ack drop"),
        Some(1),
    );
    let err = wait_for("the handshake given up", Duration::from_secs(30), || {
        socket.take_error().unwrap()
    });
    assert_eq!(err.raw_os_error(), Some(libc::ETIMEDOUT), "{err}");
    release_handshakes(&netns);
    wait_for_figures(
        &netns,
        Figures {
            connect_failures: 1,
            ..Figures::default()
        },
    );
    assert_eq!(in_progress_and_table(&netns, "app"), (0.0, 0.0));
    assert!(agent.stop().success());
    assert_no_pins(&config.pin_dir);
}

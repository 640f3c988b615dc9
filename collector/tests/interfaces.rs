//! Interfaces come and go: one created after the agent started is attached within two
//! seconds and its traffic counted exactly; one that goes away is forgotten without errors.
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

use support::{Agent, AgentConfig, Netns, assert_no_pins, run, sample, scrape, wait_for};

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

#[test]
fn an_interface_added_after_start_is_attached_counted_and_forgotten() {
    let netns = Netns::new();
    let peer = Netns::new();
    let config = AgentConfig::new(ROUTES);
    let agent = Agent::start(&netns, &config);
    assert!(!attached(&scrape(&netns), "vcoll0"));

    add_veth(&netns, &peer);
    wait_for("vcoll0 to be attached", Duration::from_secs(2), || {
        attached(&scrape(&netns), "vcoll0").then_some(())
    });

    let listener = netns.run(|| TcpListener::bind("10.77.0.1:18080").unwrap());
    let server = thread::spawn(move || {
        for _ in 0..CONNECTIONS {
            let (mut stream, _) = listener.accept().unwrap();
            let mut request = vec![0u8; REQUEST];
            stream.read_exact(&mut request).unwrap();
            stream.write_all(&[b'r'; RESPONSE]).unwrap();
        }
    });
    peer.run(|| {
        for _ in 0..CONNECTIONS {
            let mut stream = TcpStream::connect("10.77.0.1:18080").unwrap();
            stream.write_all(&[b'q'; REQUEST]).unwrap();
            let mut response = vec![0u8; RESPONSE];
            stream.read_exact(&mut response).unwrap();
        }
    });
    server.join().unwrap();

    let metrics = wait_for("the connections to close", Duration::from_secs(10), || {
        let text = scrape(&netns);
        (sample(
            &text,
            "collector_proxy_connections_closed_total",
            &[("route", "web")],
        ) == Some(CONNECTIONS as f64))
        .then_some(text)
    });
    // The tc classifiers on vcoll0 saw every payload byte, each way.
    for (direction, bytes) in [("in", REQUEST), ("out", RESPONSE)] {
        assert_eq!(
            sample(
                &metrics,
                "collector_proxy_traffic_payload_bytes_total",
                &[("route", "web"), ("direction", direction)]
            ),
            Some((CONNECTIONS * bytes) as f64),
            "{direction}"
        );
    }
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
    wait_for("vcoll0 to be forgotten", Duration::from_secs(2), || {
        let text = scrape(&netns);
        (!attached(&text, "vcoll0") && attached(&text, "lo")).then_some(())
    });
    let metrics = scrape(&netns);
    assert_eq!(
        sample(&metrics, "collector_source_up", &[("source", "netlink")]),
        Some(1.0)
    );
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

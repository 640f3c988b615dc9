//! Prometheus, for real: the shipped scrape config and alerting rules pass promtool, and a
//! Prometheus server (Debian's) scraping the agent answers queries with the test's traffic.

mod support;

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    path::Path,
    process::{Child, Command, Stdio},
    thread,
    time::Duration,
};

use support::{Agent, AgentConfig, LISTEN, Netns, assert_no_pins, wait_for};

const ROUTES: &str = "[[routes]]\nname = \"web\"\nports = [18080]\ntype = \"http\"\n";
const PROMETHEUS: &str = "127.0.0.1:9090";
const CONNECTIONS: usize = 7;

fn deploy(file: &str) -> String {
    format!("{}/../deploy/prometheus/{file}", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn the_shipped_scrape_config_and_rules_pass_promtool() {
    for args in [
        ["check", "config", &deploy("prometheus.yml")],
        ["check", "rules", &deploy("alerts.yml")],
    ] {
        let out = Command::new("promtool")
            .args(args)
            .output()
            .expect("promtool (Debian package prometheus; cargo xtask prereqs installs it)");
        assert!(
            out.status.success(),
            "promtool {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The Prometheus server, killed on drop.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// GET from the Prometheus server (call inside the namespace): the body.
fn query(expr: &str) -> std::io::Result<serde_json::Value> {
    let mut stream = TcpStream::connect(PROMETHEUS)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET /api/v1/query?query={expr} HTTP/1.1\r\nHost: prometheus\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    serde_json::from_str(body).map_err(std::io::Error::other)
}

fn start_prometheus(netns: &Netns, dir: &Path) -> Server {
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: collector\n    static_configs:\n      - targets: [\"{LISTEN}\"]\n"
        ),
    )
    .unwrap();
    let child = netns
        .command("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address={PROMETHEUS}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("prometheus (Debian package prometheus; cargo xtask prereqs installs it)");
    Server(child)
}

#[test]
fn a_real_prometheus_scrapes_the_agent_and_answers_with_the_traffic() {
    let netns = Netns::new();
    let config = AgentConfig::new(ROUTES);
    let agent = Agent::start(&netns, &config);
    let _prometheus = start_prometheus(&netns, &config.dir);

    let listener = netns.run(|| TcpListener::bind("127.0.0.1:18080").unwrap());
    let server = thread::spawn(move || {
        for _ in 0..CONNECTIONS {
            let (mut stream, _) = listener.accept().unwrap();
            let mut buf = [0u8; 3];
            stream.read_exact(&mut buf).unwrap();
            stream.write_all(b"hello").unwrap();
        }
    });
    netns.run(|| {
        for _ in 0..CONNECTIONS {
            let mut stream = TcpStream::connect("127.0.0.1:18080").unwrap();
            stream.write_all(b"abc").unwrap();
            let mut buf = [0u8; 5];
            stream.read_exact(&mut buf).unwrap();
        }
    });
    server.join().unwrap();

    // Through Prometheus' own query API: the closed connections and the bytes of the route.
    let value = |expr: &'static str| {
        netns.run(move || {
            let json = query(expr).ok()?;
            let result = json["data"]["result"].as_array()?;
            let sample = result.iter().find(|r| r["metric"]["route"] == "web")?;
            sample["value"][1].as_str()?.parse::<f64>().ok()
        })
    };
    wait_for(
        "Prometheus to have scraped all 7",
        Duration::from_secs(30),
        || (value("collector_proxy_connections_closed_total") == Some(7.0)).then_some(()),
    );
    assert_eq!(value("collector_proxy_connections_opened_total"), Some(7.0));
    assert_eq!(
        value("collector_proxy_connection_received_bytes_total"),
        Some(21.0)
    );
    assert_eq!(
        value("collector_proxy_connection_sent_bytes_total"),
        Some(35.0)
    );
    assert!(agent.stop().success());
    assert_no_pins(&config.pin_dir);
}

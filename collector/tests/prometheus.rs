//! Prometheus, for real: the shipped scrape config and alerting rules pass promtool, a
//! Prometheus server (Debian's) scraping the agent answers queries with the test's traffic,
//! and the agent exports its own process figures as every exporter does.

mod support;

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    path::Path,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use support::{Agent, AgentConfig, LISTEN, Netns, assert_no_pins, sample, scrape, wait_for};

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

fn epoch_seconds() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// What `/proc/PID/status` says of a process's memory (bytes) and threads.
struct ProcStatus {
    resident: f64,
    virtual_size: f64,
    threads: f64,
}

impl ProcStatus {
    fn of(proc_dir: &Path) -> Self {
        let status = std::fs::read_to_string(proc_dir.join("status")).unwrap();
        let field = |name: &str| -> f64 {
            status
                .lines()
                .find_map(|line| line.strip_prefix(name))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|value| value.parse().ok())
                .unwrap_or_else(|| panic!("no {name} in {status}"))
        };
        Self {
            resident: field("VmRSS:") * 1024.0,
            virtual_size: field("VmSize:") * 1024.0,
            threads: field("Threads:"),
        }
    }
}

/// The agent's `process_*` figures are its own, as `/proc` shows them to the test: started
/// while the test started it, its open-file limit, its file descriptors and CPU time.
#[test]
fn the_agent_exports_its_own_process_figures() {
    let netns = Netns::new();
    let config = AgentConfig::new(ROUTES);
    let before_start = epoch_seconds();
    let agent = Agent::start(&netns, &config);
    let ready = epoch_seconds();
    let proc_dir = Path::new("/proc").join(agent.pid().to_string());
    let status_before = ProcStatus::of(&proc_dir);
    let metrics = scrape(&netns);
    let status_after = ProcStatus::of(&proc_dir);
    let value = |name: &str| sample(&metrics, name, &[]).unwrap_or_else(|| panic!("no {name}"));

    // The commit built, which the version alone does not tell, or the one the build was
    // told (a build outside git is).
    let revision = std::env::var("COLLECTOR_REVISION").unwrap_or_else(|_| {
        support::stdout_of(Command::new("git").args([
            "-c",
            "safe.directory=*",
            "-C",
            env!("CARGO_MANIFEST_DIR"),
            "rev-parse",
            "--short=12",
            "HEAD",
        ]))
    });
    assert_eq!(env!("COLLECTOR_REVISION"), revision.trim());
    assert_eq!(
        sample(
            &metrics,
            "collector_build_info",
            &[
                ("version", env!("CARGO_PKG_VERSION")),
                ("revision", env!("COLLECTOR_REVISION"))
            ]
        ),
        Some(1.0)
    );
    // The boot time in /proc/stat is whole seconds.
    let started = value("process_start_time_seconds");
    assert!(
        started > before_start - 1.0 && started < ready + 1.0,
        "{started} not within {before_start}..{ready}"
    );
    let limits = std::fs::read_to_string(proc_dir.join("limits")).unwrap();
    let soft_limit: f64 = limits
        .lines()
        .find(|line| line.starts_with("Max open files"))
        .and_then(|line| line.split_whitespace().nth(3))
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(sample(&metrics, "process_max_fds", &[]), Some(soft_limit));
    // Counted during the scrape: its connection, and the sockets a poll (every 100 ms here)
    // opens for a moment, may have come or gone since.
    let fds =
        f64::from(u32::try_from(std::fs::read_dir(proc_dir.join("fd")).unwrap().count()).unwrap());
    let open_fds = value("process_open_fds");
    assert!(
        fds > 10.0 && (open_fds - fds).abs() <= 6.0,
        "{open_fds} against {fds}"
    );
    let stat = std::fs::read_to_string(proc_dir.join("stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    // utime and stime, fields 14 and 15 of stat(5), in ticks of 1/100 s on Linux.
    let cpu_now = (fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap()) / 100.0;
    let cpu = value("process_cpu_seconds_total");
    assert!(cpu > 0.0 && cpu <= cpu_now, "{cpu} against {cpu_now} now");
    // Read during the scrape, so between what /proc showed before and after it (memory give
    // or take a MiB the rendering may have taken and given back).
    let within = |name: &str, before: f64, after: f64, slack: f64| {
        let value = value(name);
        assert!(
            value >= before.min(after) - slack && value <= before.max(after) + slack,
            "{name} {value}: /proc read {before} before the scrape, {after} after"
        );
    };
    let mib = f64::from(1u32 << 20);
    within(
        "process_resident_memory_bytes",
        status_before.resident,
        status_after.resident,
        mib,
    );
    within(
        "process_virtual_memory_bytes",
        status_before.virtual_size,
        status_after.virtual_size,
        mib,
    );
    within(
        "process_threads",
        status_before.threads,
        status_after.threads,
        0.0,
    );
    assert!(agent.stop().success());
    assert_no_pins(&config.pin_dir);
}

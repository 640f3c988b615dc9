//! The nftables source: our table's counters agree with the eBPF counts for the same port and
//! direction, survive a crash without doubling, leave nothing behind at stop, and a missing
//! `nft` takes down only this source.
#![expect(
    clippy::float_cmp,
    reason = "OpenMetrics values are floats; the counts compared are small integers, exact in f64"
)]

mod support;

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use hickory_proto::{op::ResponseCode, rr::RecordType};
use support::{
    Agent, AgentConfig, COLLECTOR, Netns, assert_no_pins,
    dns::{Client, SERVER, Unbound},
    dns_json, get_from, proxy_json, run, sample, scrape, wait_for, wait_for_closed,
};

const ROUTES: &str = "[[routes]]\nname = \"web\"\nports = [18080]\ntype = \"http\"\n";

/// Connections the web route counted as opened.
fn web_opened(metrics: &str) -> Option<f64> {
    sample(
        metrics,
        "collector_proxy_connections_opened_total",
        &[("route", "web")],
    )
}

/// `count` connections to the web route, each sending 4 bytes and reading 5.
fn connections(netns: &Netns, count: usize) {
    let listener = netns.run(|| TcpListener::bind("127.0.0.1:18080").unwrap());
    let server = thread::spawn(move || {
        for _ in 0..count {
            let (mut stream, _) = listener.accept().unwrap();
            let mut buf = [0u8; 4];
            stream.read_exact(&mut buf).unwrap();
            stream.write_all(b"pong!").unwrap();
        }
    });
    netns.run(move || {
        for _ in 0..count {
            let mut stream = TcpStream::connect("127.0.0.1:18080").unwrap();
            stream.write_all(b"ping").unwrap();
            let mut buf = [0u8; 5];
            stream.read_exact(&mut buf).unwrap();
        }
    });
    server.join().unwrap();
}

/// The web route's packets in `direction`, as (the tc classifiers counted them, nftables
/// counted them).
fn route_packets(metrics: &str, direction: &str) -> (Option<f64>, Option<f64>) {
    let tc = sample(
        metrics,
        "collector_proxy_packets_total",
        &[("route", "web"), ("direction", direction)],
    );
    let nft = sample(
        metrics,
        "collector_nft_packets_total",
        &[
            ("route", "web"),
            ("protocol", "tcp"),
            ("port", "18080"),
            ("direction", direction),
        ],
    );
    (tc, nft)
}

/// What a reload of Debian's nftables.conf does first, in `netns`.
fn flush_ruleset(netns: &Netns) {
    run(
        "ip",
        &["netns", "exec", &netns.name, "nft", "flush", "ruleset"],
    );
}

fn tables(netns: &Netns) -> String {
    support::stdout_of(netns.command("nft").args(["list", "tables"]))
}

/// How many inet tables `netns` has named `name`: the whole name, not the start of another.
fn table_count(netns: &Netns, name: &str) -> usize {
    let line = format!("table inet {name}");
    tables(netns)
        .lines()
        .filter(|listed| *listed == line)
        .count()
}

fn has_table(netns: &Netns, name: &str) -> bool {
    table_count(netns, name) > 0
}

#[track_caller]
fn assert_has_table(netns: &Netns, name: &str) {
    assert!(has_table(netns, name), "no table {name}: {}", tables(netns));
}

#[track_caller]
fn assert_no_table(netns: &Netns, name: &str) {
    assert!(
        !has_table(netns, name),
        "table {name} is there: {}",
        tables(netns)
    );
}

/// `nft -f -` of `script` in `netns`.
fn nft_script(netns: &Netns, script: &str) {
    // Reaped: a failed write leaves no zombie behind.
    let mut nft = support::Reaped::spawn(
        netns
            .command("nft")
            .args(["-f", "-"])
            .stdin(std::process::Stdio::piped()),
    );
    nft.stdin().unwrap().write_all(script.as_bytes()).unwrap();
    assert!(nft.wait().success(), "{script}");
}

/// `nft list table inet NAME` in `netns`: the whole table, rules and all.
fn table(netns: &Netns, name: &str) -> String {
    support::stdout_of(netns.command("nft").args(["list", "table", "inet", name]))
}

/// The priority of the chain `chain` of our table, as `nft -j` lists it.
fn chain_priority(netns: &Netns, table: &str, chain: &str) -> serde_json::Value {
    let json: serde_json::Value = serde_json::from_str(&support::stdout_of(
        netns
            .command("nft")
            .args(["-j", "list", "chain", "inet", table, chain]),
    ))
    .unwrap();
    json["nftables"][1]["chain"]["prio"].clone()
}

/// Our table as the build before 2026-12-02 made it for [`ROUTES`] (and DNS on port 53):
/// both chains at priority -300, counters without a comment.
fn previous_builds_table(name: &str) -> String {
    let counters: String = ["tcp_18080_in", "tcp_18080_out", "udp_53_in", "udp_53_out"]
        .map(|counter| format!("  counter {counter} {{ }}\n"))
        .concat();
    let maps: String = ["in", "out"]
        .map(|way| {
            format!(
                "  map ports_{way} {{ type inet_proto . inet_service : counter; elements = {{ tcp . 18080 : \"tcp_18080_{way}\", udp . 53 : \"udp_53_{way}\" }} }}\n"
            )
        })
        .concat();
    let chains: String = [
        ("count_in", "prerouting", "dport", "ports_in"),
        ("count_out", "postrouting", "sport", "ports_out"),
    ]
    .map(|(chain, hook, field, map)| {
        format!(
            "  chain {chain} {{ type filter hook {hook} priority -300; policy accept; counter name meta l4proto . th {field} map @{map}; }}\n"
        )
    })
    .concat();
    format!("table inet {name} {{\n{counters}{maps}{chains}}}\n")
}

/// The scrape once the nft source has seen one error (the table found removed or changed)
/// and is up again (the table made anew).
fn mended(netns: &Netns, what: &str) -> String {
    wait_for(what, Duration::from_secs(10), || {
        let text = scrape(netns);
        (sample(&text, "collector_source_errors_total", &[("source", "nft")]) == Some(1.0)
            && sample(&text, "collector_source_up", &[("source", "nft")]) == Some(1.0))
        .then_some(text)
    })
}

/// A scrape taken once `counts` of it is `ready` and stands still over two more polls. A
/// connection's last packets can cross after its close is counted, and a poll reads nftables
/// a moment before the maps, so a scrape in between can catch one source ahead.
fn settled_scrape<T: PartialEq + Copy>(
    netns: &Netns,
    what: &str,
    counts: impl Fn(&str) -> T,
    ready: impl Fn(T) -> bool,
) -> String {
    wait_for(what, Duration::from_secs(20), || {
        let now = counts(&scrape(netns));
        if !ready(now) {
            return None;
        }
        let later = support::after_polls(netns, 2);
        (counts(&later) == now).then_some(later)
    })
}

/// Waits for `closed` closed connections, then checks nftables against eBPF, each way.
fn assert_nft_equals_ebpf(netns: &Netns, closed: usize) -> f64 {
    let metrics = settled_scrape(
        netns,
        "the closes, with both sources standing still",
        |text| {
            (
                sample(
                    text,
                    "collector_proxy_connections_closed_total",
                    &[("route", "web")],
                ),
                route_packets(text, "in"),
                route_packets(text, "out"),
            )
        },
        #[expect(clippy::cast_precision_loss, reason = "a small count")]
        |(closed_now, _, _)| closed_now == Some(closed as f64),
    );
    let mut packets_in = 0.0;
    for direction in ["in", "out"] {
        let (ebpf, nft) = route_packets(&metrics, direction);
        let (ebpf, nft) = (ebpf.unwrap(), nft.unwrap());
        assert_eq!(nft, ebpf, "{direction}: nftables {nft}, eBPF {ebpf}");
        assert!(nft > 0.0);
        if direction == "in" {
            packets_in = nft;
        }
    }
    packets_in
}

#[test]
fn nft_counts_equal_the_ebpf_counts_and_continue_after_a_crash() {
    let netns = Netns::new();
    let config = AgentConfig::with_nft(ROUTES);
    let agent = Agent::start(&netns, &config);
    let _server = Unbound::start(&netns, false);
    assert_eq!(table_count(&netns, &config.nft_table), 1);

    connections(&netns, 20);
    let before = assert_nft_equals_ebpf(&netns, 20);
    netns.run(|| {
        let mut client = Client::new(SERVER);
        for _ in 0..10 {
            assert_eq!(
                client.query("www.test.", RecordType::A),
                ResponseCode::NoError
            );
        }
    });
    // A poll reads nft before the maps: the last answer may be in the maps' read and not yet
    // in nft's, so the wait is for both.
    let dns = wait_for("10 answers", Duration::from_secs(10), || {
        let json = dns_json(&netns);
        (json["totalResponses"] == 10 && json["nftables"]["packetsOut"] == 10).then_some(json)
    });
    // One UDP packet per query and per response, on port 53 each way.
    assert_eq!(dns["nftables"]["packetsIn"], 10, "{dns}");
    assert_eq!(dns["nftables"]["packetsOut"], 10);
    assert_eq!(dns["sources"]["nft"]["up"], true);
    assert_eq!(
        proxy_json(&netns)["routes"][0]["nftables"]["packetsIn"],
        before
    );

    // A crash: the table stays, and so do the programs; traffic meanwhile counts on both.
    agent.kill();
    connections(&netns, 5);
    let agent = Agent::start(&netns, &config);
    assert_eq!(
        table_count(&netns, &config.nft_table),
        1,
        "one table after the restart"
    );
    connections(&netns, 5);
    let after = assert_nft_equals_ebpf(&netns, 30);
    assert!(
        after > before,
        "the nftables counts continued: {before} then {after}"
    );

    assert!(agent.stop().success());
    assert_no_table(&netns, &config.nft_table);
    assert_no_pins(&config.pin_dir);
}

/// A crash leaves the table; a start where counting is off (here `auto`, in a namespace where
/// nothing else hooks netfilter) removes it rather than leave every packet paying for its
/// chains. So does a stop cut short after its pins went and before its table did (an `nft`
/// stuck past the stop timeout, then SIGKILL): no pins, so not a crash to the next start,
/// which left the table hooked for good.
#[test]
fn a_start_with_counting_off_removes_the_table_an_earlier_run_left() {
    let netns = Netns::new();
    let config = AgentConfig::with_nft(ROUTES);
    let counting = std::fs::read_to_string(&config.path).unwrap();
    let auto = counting.replace("enabled = true\n", "");
    for pins_left in [true, false] {
        std::fs::write(&config.path, &counting).unwrap();
        Agent::start(&netns, &config).kill();
        assert_has_table(&netns, &config.nft_table);
        if !pins_left {
            // The stop's first part: its pins gone, links and all.
            std::fs::remove_dir_all(&config.pin_dir).unwrap();
        }
        std::fs::write(&config.path, &auto).unwrap();
        let agent = Agent::start(&netns, &config);
        assert_no_table(&netns, &config.nft_table);
        assert!(agent.stop().success());
        assert_no_pins(&config.pin_dir);
    }
}

/// A config with nothing for nftables to count (no route, DNS off) makes no table even with
/// `enabled = true`: its chains would hook every packet for no counter. A table a crashed run
/// left is removed, as with counting off, and `check` says why nft is not used.
#[test]
fn a_config_with_nothing_to_count_makes_no_table() {
    let netns = Netns::new();
    let config = AgentConfig::with_nft(ROUTES);
    let counting = std::fs::read_to_string(&config.path).unwrap();
    Agent::start(&netns, &config).kill();
    assert_has_table(&netns, &config.nft_table);
    let nothing = counting.replace(ROUTES, "[dns]\nenabled = false\n");
    assert!(nothing.contains("enabled = true\n") && !nothing.contains("[[routes]]"));
    std::fs::write(&config.path, &nothing).unwrap();
    let agent = Agent::start(&netns, &config);
    assert_no_table(&netns, &config.nft_table);
    assert_eq!(
        sample(&scrape(&netns), "collector_source_up", &[("source", "nft")]),
        None,
        "no nft source without a counter to read"
    );
    let (_, line) = nft_check(&netns, &config, &config.pin_dir);
    assert!(
        line.contains("skip") && line.contains("nothing to count"),
        "{line}"
    );
    assert!(agent.stop().success());
    assert_no_table(&netns, &config.nft_table);
    assert_no_pins(&config.pin_dir);
}

/// Three connections are counted exactly while the nft source is down and the eBPF one up;
/// the nft source's last error.
fn only_nft_down(netns: &Netns) -> String {
    connections(netns, 3);
    let metrics = wait_for_closed(netns, "web", 3);
    assert_eq!(
        sample(&metrics, "collector_source_up", &[("source", "nft")]),
        Some(0.0)
    );
    assert_eq!(
        sample(&metrics, "collector_source_up", &[("source", "ebpf")]),
        Some(1.0)
    );
    proxy_json(netns)["sources"]["nft"]["lastError"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[test]
fn without_nft_only_the_nft_source_is_down() {
    let netns = Netns::new();
    let config = AgentConfig::with_nft(ROUTES);
    // No `nft` on the agent's PATH (nsenter and the agent by absolute path).
    let mut launcher = Command::new("/usr/bin/nsenter");
    launcher
        .arg(format!("--net=/var/run/netns/{}", netns.name))
        .arg(COLLECTOR)
        .env("PATH", "/nonexistent");
    let agent = Agent::spawn(&netns, launcher, &config, &[]);
    let error = only_nft_down(&netns);
    assert!(error.contains("apt install nftables"), "{error}");
    assert!(agent.stop().success());
    assert_no_pins(&config.pin_dir);
}

/// An `nft` older than 1.0.6 (Ubuntu 22.04's 1.0.2, RHEL 9.0's 1.0.4) drops a counter's
/// comment from JSON, and every read found the table it made "made by an earlier build": the
/// table was made again at every other poll and no nft counter was ever exported. Now the
/// table made without them is removed and no other is made until a restart, the nft source
/// alone is down saying why, and `check` says so first (from `nft -V`). The test's `nft`
/// is the real one, less the comments it is given, and says 1.0.5 to `-V`.
#[test]
fn an_nft_that_drops_the_counters_comments_makes_one_table_and_only_the_nft_source_is_down() {
    let netns = Netns::new();
    let config = AgentConfig::with_nft(ROUTES);
    let tools = config.dir.join("old-tools");
    std::fs::create_dir_all(&tools).unwrap();
    let path_of = |tool: &str| {
        let out = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    };
    let applied = tools.join("applied");
    let script = tools.join("nft");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\n\
             [ \"$1\" = -V ] && {{ printf 'nftables v1.0.5 (Lester Gooch #5)\\n  json:\\t\\tyes\\n'; exit 0; }}\n\
             if [ \"$*\" = '-j -f -' ]; then\n\
             echo >> {applied}\n\
             {sed} -e 's/,\"comment\":\"[^\"]*\"//g' | {nft} \"$@\"\n\
             exit $?\n\
             fi\n\
             exec {nft} \"$@\"\n",
            applied = applied.display(),
            sed = path_of("sed"),
            nft = path_of("nft"),
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let launcher = || {
        let mut launcher = Command::new("/usr/bin/nsenter");
        launcher
            .arg(format!("--net=/var/run/netns/{}", netns.name))
            .arg(COLLECTOR)
            .env("PATH", &tools);
        launcher
    };
    let (passed, line) = support::check_line_of(launcher(), &config.path, &[], "nft");
    assert!(
        !passed
            && line.starts_with("FAIL")
            && line.contains("nftables v1.0.5 (Lester Gooch #5) is older than 1.0.6"),
        "{line}"
    );
    let agent = Agent::spawn(&netns, launcher(), &config, &[]);
    let error = only_nft_down(&netns);
    assert!(
        error.contains("made our table without its counters' comments")
            && error.contains("it was removed")
            && error.contains("install nftables 1.0.6"),
        "{error}"
    );
    assert_no_table(&netns, &config.nft_table);
    // Two retries' time later (every 30 polls of 100 ms): made once and removed once.
    thread::sleep(Duration::from_secs(7));
    let rulesets = std::fs::read_to_string(&applied).unwrap().lines().count();
    assert_eq!(rulesets, 2, "nft applied {rulesets} rulesets");
    assert_no_table(&netns, &config.nft_table);
    assert!(agent.stop().success());
    assert_no_pins(&config.pin_dir);
}

#[test]
fn a_stuck_nft_is_killed_at_its_deadline_and_only_the_nft_source_is_down() {
    let netns = Netns::new();
    // Polls a second apart: the next try at making the table comes 30 s later.
    let config = AgentConfig::with_nft_polling_every(ROUTES, 1000);
    // `[nftables]` ends the file.
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(&config.path)
        .unwrap();
    file.write_all(b"nft_timeout_ms = 2000\n").unwrap();
    // The first `nft` never finishes, as one waiting on the kernel's lock would not, and
    // what it was given is applied a second after it was killed, as such an `nft` may still
    // commit once it has the lock.
    let tools = config.dir.join("stuck-tools");
    let pid_file = tools.join("nft.pid");
    let ruleset = tools.join("ruleset.json");
    let launcher = with_first_nft(
        &netns,
        &tools,
        &format!(
            "/bin/cat > {ruleset}\necho $$ > {pid}\n\
             ( /bin/sleep 3; \"$REAL_NFT\" -j -f {ruleset} ) > /dev/null 2>&1 &\n\
             exec /bin/sleep 600\n",
            ruleset = ruleset.display(),
            pid = pid_file.display(),
        ),
    );
    // The stuck nft goes with the test, should the agent fail to kill it (the fault under
    // test): found by its pid and its command line, never another process given the pid.
    let _stuck_killed = support::OnDrop(|| {
        let Some(pid) = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|pid| pid.trim().parse::<i32>().ok())
        else {
            return;
        };
        if std::fs::read(format!("/proc/{pid}/cmdline"))
            .is_ok_and(|c| c == b"/bin/sleep\x00600\x00")
        {
            // SAFETY: a plain system call.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    });
    let began = Instant::now();
    // Within the time `Agent::spawn` gives a start, far below the 600 s of the stuck nft.
    let agent = Agent::spawn(&netns, launcher, &config, &[]);
    // The start waited for nft's deadline.
    assert!(
        began.elapsed() >= Duration::from_secs(2),
        "{:?}",
        began.elapsed()
    );
    let pid: u32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    wait_for(
        "the stuck nft to be killed and reaped",
        Duration::from_secs(15),
        || (!std::path::Path::new(&format!("/proc/{pid}")).exists()).then_some(()),
    );
    let error = only_nft_down(&netns);
    assert!(
        error.contains("nft did not finish within 2s and was killed"),
        "{error}"
    );
    // The killed nft's table appears after all; the stop removes it.
    wait_for("the late table", Duration::from_secs(10), || {
        has_table(&netns, &config.nft_table).then_some(())
    });
    // Within the time `Agent::stop` gives, far below the 600 s of the stuck nft.
    assert!(agent.stop().success());
    assert_no_table(&netns, &config.nft_table);
    assert_no_pins(&config.pin_dir);
}

/// An `nft` killed by a signal once the kernel has applied its batch (a Ctrl-C, the OOM
/// killer, a stop signal sent to every process of a service: the kernel applies a batch
/// before `nft` reads the answer) made a table the agent heard nothing of. Until 2026-12-03
/// that table stayed after the stop, hooked, with no collector to remove it.
#[test]
fn a_table_made_by_an_nft_killed_after_applying_it_is_removed_at_the_stop() {
    let netns = Netns::new();
    // Polls a second apart: the next try at making the table comes 30 s later.
    let config = AgentConfig::with_nft_polling_every(ROUTES, 1000);
    let launcher = with_first_nft(
        &netns,
        &config.dir.join("killed-tools"),
        "\"$REAL_NFT\" \"$@\"\nkill -KILL $$\n",
    );
    let agent = Agent::spawn(&netns, launcher, &config, &[]);
    let error = only_nft_down(&netns);
    assert!(error.contains("nft was killed by signal 9"), "{error}");
    assert_has_table(&netns, &config.nft_table);
    assert!(agent.stop().success());
    assert_no_table(&netns, &config.nft_table);
    assert_no_pins(&config.pin_dir);
}

/// A launcher of the agent in `netns` whose `nft` fails while `refuse` exists (and then
/// makes `tools/refused`), and is the real one otherwise.
fn with_nft_refusing_while(
    netns: &Netns,
    tools: &std::path::Path,
    refuse: &std::path::Path,
) -> Command {
    let launcher = with_first_nft(netns, tools, "exec \"$REAL_NFT\" \"$@\"\n");
    let script = tools.join("nft");
    let text = std::fs::read_to_string(&script).unwrap();
    // Before anything else, after the `#!` line.
    let check = format!(
        "\n[ -e {} ] && {{ : > {}; echo 'refused by the test' >&2; exit 1; }}\n",
        refuse.display(),
        tools.join("refused").display()
    );
    std::fs::write(&script, text.replacen('\n', &check, 1)).unwrap();
    launcher
}

/// A launcher of the agent in `netns` whose `PATH` is `tools`, where `nft` runs `first` (a
/// shell script, with the real `nft` in `$REAL_NFT`) the first time it is called and the
/// real `nft` after that.
fn with_first_nft(netns: &Netns, tools: &std::path::Path, first: &str) -> Command {
    let real = String::from_utf8(
        Command::new("sh")
            .args(["-c", "command -v nft"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    std::fs::create_dir_all(tools).unwrap();
    let script = tools.join("nft");
    let mark = tools.join("called");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nREAL_NFT={real}\n[ -e {mark} ] && exec \"$REAL_NFT\" \"$@\"\n: > {mark}\n\
             {first}",
            real = real.trim(),
            mark = mark.display(),
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let mut launcher = Command::new("/usr/bin/nsenter");
    launcher
        .arg(format!("--net=/var/run/netns/{}", netns.name))
        .arg(COLLECTOR)
        .env("PATH", tools);
    launcher
}

#[test]
fn cleanup_after_a_crash_leaves_nothing_of_ours() {
    let netns = Netns::new();
    let config = AgentConfig::with_nft(ROUTES);
    let agent = Agent::start(&netns, &config);
    connections(&netns, 2);
    agent.kill();
    assert_has_table(&netns, &config.nft_table);
    assert!(config.pin_dir.exists());

    // Listing changes nothing; --apply removes the pins (so the links) and the table.
    let list = netns
        .command(COLLECTOR)
        .args(["cleanup", "--config"])
        .arg(&config.path)
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&list.stdout);
    assert!(listed.contains("links/tc_loopback_1"), "{listed}");
    assert!(
        listed.contains(&format!("nftables table inet {}", config.nft_table)),
        "{listed}"
    );
    assert!(config.pin_dir.exists());
    let apply = netns
        .command(COLLECTOR)
        .args(["cleanup", "--apply", "--config"])
        .arg(&config.path)
        .output()
        .unwrap();
    assert!(
        apply.status.success(),
        "{}",
        String::from_utf8_lossy(&apply.stderr)
    );
    assert_no_table(&netns, &config.nft_table);
    assert_no_pins(&config.pin_dir);
}

/// `collector check` of `config` with `pin_dir` in `netns`: whether it passed, and its nft line.
fn nft_check(netns: &Netns, config: &AgentConfig, pin_dir: &std::path::Path) -> (bool, String) {
    support::check_line(
        netns,
        &config.path,
        &["--pin-dir", pin_dir.to_str().unwrap()],
        "nft",
    )
}

/// A second collector in the namespace, with a pin directory and listen address of its own
/// but the same config, table name included (one config map for two containers): its nftables
/// source says whose the table is and leaves it, and so does the cleanup after it crashes,
/// so the first one's counts stay exact.
#[test]
fn a_second_collector_with_the_same_table_leaves_the_first_ones_alone() {
    const SECOND: &str = "127.0.0.1:9465";
    let netns = Netns::new();
    let config = AgentConfig::with_nft(ROUTES);
    let first = Agent::start(&netns, &config);
    let mut name = config.pin_dir.clone().into_os_string();
    name.push("-second");
    let second_pins = support::RemovedOnDrop(name.into());
    let second_json = |path: &'static str| -> serde_json::Value {
        let (status, body) = netns.run(move || get_from(SECOND, path)).unwrap();
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    };
    let second = Agent::spawn_until(
        &netns,
        netns.command(COLLECTOR),
        &config,
        &[
            "--pin-dir",
            second_pins.0.to_str().unwrap(),
            "--listen",
            SECOND,
        ],
        || matches!(netns.run(|| get_from(SECOND, "/readyz")), Ok((200, _))),
    );
    let nft = wait_for("the second's nft source", Duration::from_secs(10), || {
        let nft = second_json("/api/v1/proxy")["sources"]["nft"].clone();
        nft.is_object().then_some(nft)
    });
    assert_eq!(nft["up"], false, "{nft}");
    let error = nft["lastError"].as_str().unwrap();
    assert!(
        error.contains(&format!(
            "the nftables table inet {} is another running collector's in this network namespace (process {}: {COLLECTOR} run --config",
            config.nft_table,
            first.pid()
        )),
        "{error}"
    );

    // `check` says so before such a start, and tells the first collector's own table from it.
    let (passed, line) = nft_check(&netns, &config, &second_pins.0);
    assert!(
        !passed
            && line.starts_with("FAIL")
            && line.contains(&format!(
                "a running collector here (process {}: {COLLECTOR} run --config {}) uses the table inet {}",
                first.pid(),
                config.path.display(),
                config.nft_table
            )),
        "{line}"
    );
    // Passed as a whole: its listen address, taken by that collector, is only a warning.
    let (passed, line) = nft_check(&netns, &config, &config.pin_dir);
    assert!(
        passed && line.starts_with("pass") && line.contains("is the running collector's"),
        "{line}"
    );

    connections(&netns, 3);
    assert_nft_equals_ebpf(&netns, 3);
    // The second crashes; the cleanup of its pins leaves the table, which is the first's.
    second.kill();
    let cleanup = netns
        .command(COLLECTOR)
        .args(["cleanup", "--apply", "--config"])
        .arg(&config.path)
        .args(["--pin-dir", second_pins.0.to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&cleanup.stdout);
    assert!(cleanup.status.success(), "{stdout}");
    assert!(
        stdout.contains(&format!(
            "nftables table inet {} in this network namespace: not touched, since a running collector here (process {}: {COLLECTOR} run --config",
            config.nft_table,
            first.pid()
        )),
        "{stdout}"
    );
    assert_eq!(
        table_count(&netns, &config.nft_table),
        1,
        "{}",
        tables(&netns)
    );
    connections(&netns, 2);
    assert_nft_equals_ebpf(&netns, 5);
    let first_nft = &proxy_json(&netns)["sources"]["nft"];
    assert_eq!(first_nft["errors"], 0, "{first_nft}");

    assert!(first.stop().success());
    assert_no_table(&netns, &config.nft_table);
    assert_no_pins(&config.pin_dir);
    assert_no_pins(&second_pins.0);
}

#[test]
fn cleanup_of_another_namespaces_pins_leaves_this_namespaces_table() {
    // A sidecar crashed in its pod's namespace; its pins are cleaned up on the node, where
    // the node's collector runs with the same table name (one ConfigMap for both).
    let config = AgentConfig::with_nft(ROUTES);
    let (node, pod) = (Netns::new(), Netns::new());
    let mut name = config.pin_dir.clone().into_os_string();
    name.push("-pod");
    let pod_pins = support::RemovedOnDrop(name.into());
    let pod_pin_dir = ["--pin-dir", pod_pins.0.to_str().unwrap()];
    Agent::start_with(&pod, &config, &pod_pin_dir).kill();
    let agent = Agent::start(&node, &config);
    assert_has_table(&node, &config.nft_table);

    let cleanup_pod_pins = || {
        node.command(COLLECTOR)
            .args(["cleanup", "--apply", "--config"])
            .arg(&config.path)
            .args(pod_pin_dir)
            .output()
            .unwrap()
    };
    let apply = cleanup_pod_pins();
    let stdout = String::from_utf8_lossy(&apply.stdout);
    assert!(
        apply.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&apply.stderr)
    );
    assert!(
        stdout.contains("a collector's of another network namespace")
            && !stdout.contains(&format!(
                "removing nftables table inet {}",
                config.nft_table
            )),
        "{stdout}"
    );
    assert_no_pins(&pod_pins.0);
    // The node collector's table is still there, and so is the pod's in its own namespace.
    assert_has_table(&node, &config.nft_table);
    assert_has_table(&pod, &config.nft_table);
    // Run again, with the pins gone, nothing says whose the node's table is: the running
    // node collector claims its name, so it is left.
    let again = cleanup_pod_pins();
    let stdout = String::from_utf8_lossy(&again.stdout);
    assert!(
        again.status.success()
            && stdout.contains(&format!(
                "not touched, since a running collector here (process {}: {COLLECTOR} run --config",
                agent.pid()
            )),
        "{stdout}"
    );
    assert_has_table(&node, &config.nft_table);
    // Still counting, and equal to eBPF once both stand still (a scrape right after the
    // closes may find one source a poll ahead).
    connections(&node, 2);
    assert_nft_equals_ebpf(&node, 2);
    // Crashed, the node collector claims it no more, and its restart would go on counting
    // in it: named and left, and the status says so (until 2026-12-05 it said success).
    agent.kill();
    let after_crash = cleanup_pod_pins();
    let stdout = String::from_utf8_lossy(&after_crash.stdout);
    assert!(
        !after_crash.status.success()
            && stdout.contains(&format!("nft delete table inet {}", config.nft_table)),
        "{stdout}"
    );
    assert_has_table(&node, &config.nft_table);
    // Its own pins say whose it is: its cleanup removes it.
    let node_pins = node
        .command(COLLECTOR)
        .args(["cleanup", "--apply", "--config"])
        .arg(&config.path)
        .output()
        .unwrap();
    assert!(node_pins.status.success());
    assert_no_table(&node, &config.nft_table);
    assert_no_pins(&config.pin_dir);
}

#[test]
fn cleanup_removes_its_whole_layout_and_fails_naming_what_it_leaves() {
    let netns = Netns::new();
    let config = AgentConfig::new(ROUTES);
    Agent::start(&netns, &config).kill();
    let pins = support::RemovedOnDrop(config.pin_dir.clone());
    let v1 = pins.0.join("v1");
    // A map this build does not pin, as another build leaves one.
    std::fs::rename(v1.join("DNS_UPSTREAM"), v1.join("OLD_BUILD_MAP")).unwrap();
    // Another layout version's directory, with a link pin: its program stays attached.
    let v2 = pins.0.join("v2");
    let other_link = v2.join("links/tc_loopback_1");
    std::fs::create_dir_all(other_link.parent().unwrap()).unwrap();
    std::fs::rename(v1.join("links/tc_loopback_1"), &other_link).unwrap();
    // What is not a collector's pin layout: a probe of `collector check` (a map pinned in
    // it, as a killed check leaves it) and another tool's empty directory.
    let probe = pins.0.join("check-probe-4242");
    std::fs::create_dir(&probe).unwrap();
    std::fs::rename(v1.join("ERRORS"), probe.join("map")).unwrap();
    let other_tool = pins.0.join("tc/globals");
    std::fs::create_dir_all(&other_tool).unwrap();
    // The other tool's directory is listed by its entry in the pin directory (`tc`), as not
    // a collector's, and nothing below it is looked into: the only line naming it.
    let tc = pins.0.join("tc");
    let lines_naming_tc = |stdout: &str| -> Vec<String> {
        stdout
            .lines()
            .filter(|line| line.contains(tc.to_str().unwrap()))
            .map(str::to_owned)
            .collect()
    };
    let tc_left = [format!(
        "{} (not a collector's pin layout: cleanup leaves it)",
        tc.display()
    )];
    let cleanup = |apply: &[&str]| {
        netns
            .command(COLLECTOR)
            .arg("cleanup")
            .args(apply)
            .arg("--config")
            .arg(&config.path)
            .output()
            .unwrap()
    };

    // Listing succeeds whatever it finds.
    let list = cleanup(&[]);
    let stdout = String::from_utf8_lossy(&list.stdout);
    assert!(list.status.success(), "{stdout}");
    assert!(
        stdout.contains(&format!(
            "{} (not this build's pin layout: --apply leaves it)",
            other_link.display()
        )) && stdout.contains(&format!("{} (a `collector check` probe", probe.display())),
        "{stdout}"
    );
    // The command that removes the other build's pins is named before --apply too.
    assert!(
        stdout.contains(&format!(
            "remove them with `rm -r {}` (--apply leaves them, and its status is then 1)",
            v2.display()
        )),
        "{stdout}"
    );
    assert_eq!(lines_naming_tc(&stdout), tc_left, "{stdout}");

    let apply = cleanup(&["--apply"]);
    let stdout = String::from_utf8_lossy(&apply.stdout);
    let stderr = String::from_utf8_lossy(&apply.stderr);
    assert!(!apply.status.success(), "{stdout}");
    assert!(
        stdout.contains(&format!(
            "{} (not this build's pin layout: left in place)",
            other_link.display()
        )) && !stdout.contains(&format!("removing {}", other_link.display())),
        "{stdout}"
    );
    // Neither the probe nor the other tool's directory is another build's pins, or removed.
    assert_eq!(lines_naming_tc(&stdout), tc_left, "{stdout}");
    assert!(
        !stdout.contains(&format!("removing {}", probe.display())),
        "{stdout}"
    );
    assert!(
        stderr.contains("1 pin(s)") && stderr.contains(&format!("rm -r {}`", v2.display())),
        "{stderr}"
    );
    // Its own layout went whole, the unknown map included; the rest is where it was.
    assert!(!v1.exists(), "{stdout}");
    assert!(other_link.exists() && probe.join("map").exists() && other_tool.is_dir());
    // The command it names removes the other build's pins; then nothing is left to fail.
    run("rm", &["-r", v2.to_str().unwrap()]);
    let again = cleanup(&["--apply"]);
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    assert!(probe.join("map").exists() && other_tool.is_dir());
    run("rm", &["-r", pins.0.to_str().unwrap()]);
    assert_no_pins(&pins.0);
}

#[test]
fn cleanup_leaves_a_running_collector_alone_and_it_keeps_counting() {
    let netns = Netns::new();
    let config = AgentConfig::with_nft(ROUTES);
    let agent = Agent::start(&netns, &config);
    connections(&netns, 2);
    // A listing says whose the pins are, and that nothing is left over: status 0.
    let listing = || {
        netns
            .command(COLLECTOR)
            .args(["cleanup", "--config"])
            .arg(&config.path)
            .output()
            .unwrap()
    };
    let list = listing();
    let stdout = String::from_utf8_lossy(&list.stdout);
    assert!(
        list.status.success()
            && stdout.contains("a collector is running with the pin directory")
            && stdout.contains("nothing is left over to clean"),
        "{stdout}{}",
        String::from_utf8_lossy(&list.stderr)
    );
    // Another build's crashed layout beside it is listed all the same, and not as nothing.
    let v2 = config.pin_dir.join("v2");
    std::fs::create_dir(&v2).unwrap();
    support::pin_plain_array(&v2.join("CONN_COUNTERS"), 8, 4);
    let list = listing();
    let stdout = String::from_utf8_lossy(&list.stdout);
    assert!(
        list.status.success()
            && stdout.contains(&format!(
                "{} (not this build's pin layout: --apply is refused while the collector runs)",
                v2.join("CONN_COUNTERS").display()
            ))
            && !stdout.contains("nothing is left over"),
        "{stdout}"
    );
    std::fs::remove_dir_all(&v2).unwrap();
    let apply = netns
        .command(COLLECTOR)
        .args(["cleanup", "--apply", "--config"])
        .arg(&config.path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&apply.stderr);
    assert!(
        !apply.status.success() && stderr.contains("a collector is running"),
        "{stderr}"
    );
    assert_has_table(&netns, &config.nft_table);

    // Its links are still pinned, so still attached: the next connections count.
    connections(&netns, 3);
    let metrics = wait_for_closed(&netns, "web", 5);
    assert_eq!(web_opened(&metrics), Some(5.0));
    assert!(agent.stop().success());
    assert_no_pins(&config.pin_dir);
}

/// [`routed_namespaces`], and port 18080 of the agent's translated (DNAT) to the backend's
/// 9000, as a proxy handing a route to the kernel would set it up.
fn forwarding_topology() -> [Netns; 3] {
    let namespaces = routed_namespaces();
    // The proxy hands port 18080 to the kernel: DNAT to the backend, forwarded.
    let nat = "table ip proxy_nat {\n  chain dnat_in {\n    type nat hook prerouting priority dstnat;\n    tcp dport 18080 dnat to 10.78.2.2:9000\n  }\n}\n";
    nft_script(&namespaces[0], nat);
    namespaces
}

/// The agent's namespace, a client's and a backend's, routed between ([`routed_between`]).
fn routed_namespaces() -> [Netns; 3] {
    let namespaces = [Netns::new(), Netns::new(), Netns::new()];
    routed_between(&namespaces[0], &namespaces[1], &namespaces[2]);
    namespaces
}

/// Veths from `netns` to `client` (10.78.1.0/24) and `backend` (10.78.2.0/24), forwarding on.
fn routed_between(netns: &Netns, client: &Netns, backend: &Netns) {
    for (peer, ours, theirs, net) in [
        (client, "vfwd0", "vfwd1", "1"),
        (backend, "vfwd2", "vfwd3", "2"),
    ] {
        support::veth(
            netns,
            ours,
            &format!("10.78.{net}.1/24"),
            peer,
            theirs,
            &format!("10.78.{net}.2/24"),
        );
        run(
            "ip",
            &[
                "-n",
                &peer.name,
                "route",
                "add",
                "default",
                "via",
                &format!("10.78.{net}.1"),
            ],
        );
    }
    netns.forward();
}

#[test]
fn nftables_sees_forwarded_traffic_that_no_local_socket_does() {
    // client (10.78.1.2) -> agent's namespace (10.78.1.1:18080, DNAT) -> backend (10.78.2.2:9000)
    let [netns, client, backend] = forwarding_topology();
    let config = AgentConfig::with_nft(ROUTES);
    let agent = Agent::start(&netns, &config);
    exchanges(&client, "10.78.1.1:18080", &backend, "10.78.2.2:9000");

    // The last packets cross after the client returns: compare once they have stopped.
    let metrics = settled_scrape(
        &netns,
        "the forwarded packets, standing still",
        |text| (route_packets(text, "in"), route_packets(text, "out")),
        // 5 connections: at least SYN, the request, an ACK or two and the FIN each way.
        |((_, nft_in), (tc_out, _))| {
            nft_in.is_some_and(|nft_in| nft_in >= 20.0)
                && tc_out.is_some_and(|tc_out| tc_out >= 20.0)
        },
    );
    // tc saw the same packets arrive (it runs before netfilter) and leave (after it): the
    // replies leave with port 18080 once source NAT has undone the DNAT, and `out` counts
    // after it (until 2026-12-02 it counted before, saw the backend's 9000 and read 0).
    let (tc_in, nft_in) = route_packets(&metrics, "in");
    assert_eq!(tc_in, nft_in);
    let (tc_out, nft_out) = route_packets(&metrics, "out");
    assert_eq!(tc_out, nft_out);
    // ... but no local socket accepted anything: the connection counters never moved.
    assert_eq!(web_opened(&metrics), Some(0.0));
    assert!(agent.stop().success());
    assert_no_pins(&config.pin_dir);
}

/// Traffic the namespace only forwards, on a route's port and to an address not its own (a
/// node's pods reaching out to port 443, or to the cluster's DNS), counts in neither source:
/// nftables checks the address is the namespace's, as the tc classifiers do. Up to 2ca4b1a
/// nftables counted it, so the gap between the two read the pods' traffic.
#[test]
fn nftables_leaves_out_what_the_host_only_forwards_as_the_classifiers_do() {
    // client (10.78.1.2) -> agent's namespace, forwarding -> backend (10.78.2.2:18080)
    let [netns, client, backend] = routed_namespaces();
    let config = AgentConfig::with_nft(ROUTES);
    let agent = Agent::start(&netns, &config);
    let rules = table(&netns, &config.nft_table);
    assert!(rules.contains("fib daddr type local"), "{rules}");
    exchanges(&client, "10.78.2.2:18080", &backend, "10.78.2.2:18080");
    // The namespace's own connections count alike in both, and nothing else does: 3
    // connections on loopback, each seen once by each source.
    connections(&netns, 3);
    assert_nft_equals_ebpf(&netns, 3);
    assert_eq!(web_opened(&scrape(&netns)), Some(3.0));
    assert!(agent.stop().success());
    assert_no_pins(&config.pin_dir);
}

/// IPv6 as IPv4 (`fib daddr type local` in, `fib saddr type local` out, of IPv6): the
/// namespace's own connections, to its address on a veth, count alike in both sources each
/// way, and what it only forwards to the backend on the route's port adds nothing to either,
/// but to an extra local address, which adds alike to both: an IPv6 one, and an IPv4-mapped
/// entry's, counted from the IPv4 set.
#[test]
fn over_ipv6_nftables_counts_the_hosts_packets_as_the_classifiers_do() {
    let [netns, client, backend] = routed_namespaces();
    ipv6_routed_between(&netns, &client, &backend);
    add_address(&backend, "vfwd3", "fd78:2::3/64");
    add_address(&backend, "vfwd3", "10.78.2.9/24");
    let config = AgentConfig::with_nft(&format!(
        "extra_local_addresses = [\"fd78:2::3\", \"::ffff:10.78.2.9\"]\n{ROUTES}"
    ));
    let agent = Agent::start(&netns, &config);
    let rules = table(&netns, &config.nft_table);
    assert!(rules.contains("ip6 daddr @extra_ipv6"), "{rules}");
    assert!(rules.contains("ip saddr @extra_ipv4"), "{rules}");
    exchanges(&client, "[fd78:1::1]:18080", &netns, "[fd78:1::1]:18080");
    let own = assert_nft_equals_ebpf(&netns, 5);
    let before = scrape(&netns);
    exchanges(&client, "[fd78:2::2]:18080", &backend, "[fd78:2::2]:18080");
    let after = support::after_polls(&netns, 3);
    for direction in ["in", "out"] {
        assert_eq!(
            route_packets(&after, direction),
            route_packets(&before, direction),
            "{direction}: (eBPF, nftables) after the forwarded exchanges, against before"
        );
    }
    exchanges(&client, "[fd78:2::3]:18080", &backend, "[fd78:2::3]:18080");
    let with_extra = assert_nft_equals_ebpf(&netns, 5);
    assert!(with_extra >= own + 20.0, "{own} then {with_extra}");
    // The IPv4-mapped entry counts IPv4 packets, in both sources.
    exchanges(&client, "10.78.2.9:18080", &backend, "10.78.2.9:18080");
    let with_mapped = assert_nft_equals_ebpf(&netns, 5);
    assert!(
        with_mapped >= with_extra + 20.0,
        "{with_extra} then {with_mapped}"
    );
    let text = scrape(&netns);
    assert_eq!(web_opened(&text), Some(5.0));
    assert_eq!(
        sample(&text, "collector_source_errors_total", &[("source", "nft")]),
        Some(0.0),
        "the table was judged as made at each read"
    );
    assert!(agent.stop().success());
    assert_no_pins(&config.pin_dir);
}

/// `address` (with its prefix) on `device` in `netns`; an IPv6 one without duplicate address
/// detection, which would hold it back for a second or two.
fn add_address(netns: &Netns, device: &str, address: &str) {
    let mut args = vec!["-n", &netns.name, "addr", "add", address, "dev", device];
    if address.contains(':') {
        args.push("nodad");
    }
    run("ip", &args);
}

/// IPv6 beside [`routed_between`]'s IPv4: `fd78:1::/64` to `client`, `fd78:2::/64` to
/// `backend`, forwarding on.
fn ipv6_routed_between(netns: &Netns, client: &Netns, backend: &Netns) {
    for (peer, ours, theirs, net) in [
        (client, "vfwd0", "vfwd1", "1"),
        (backend, "vfwd2", "vfwd3", "2"),
    ] {
        for (namespace, device, host) in [(netns, ours, "1"), (peer, theirs, "2")] {
            let address = format!("fd78:{net}::{host}/64");
            add_address(namespace, device, &address);
        }
        let gateway = format!("fd78:{net}::1");
        run(
            "ip",
            &[
                "-n", &peer.name, "-6", "route", "add", "default", "via", &gateway,
            ],
        );
    }
    run(
        "ip",
        &[
            "netns",
            "exec",
            &netns.name,
            "sysctl",
            "-qw",
            "net.ipv6.conf.all.forwarding=1",
        ],
    );
}

/// With `extra_local_addresses` the classifiers count packets to addresses `fib` does not
/// take for the host's (a VIP kube-proxy DNATs to a hostNetwork proxy): nftables counts
/// those beside the host's own, from a set of them. Traffic forwarded to the named address
/// counts alike in both, each way; traffic forwarded to another address on the route's port
/// (a pod's call out) in neither. Up to 9e21dbd nftables counted by port alone there,
/// that traffic too.
#[test]
fn with_extra_local_addresses_nftables_counts_them_and_still_not_what_is_forwarded() {
    let [netns, client, backend] = routed_namespaces();
    add_address(&backend, "vfwd3", "10.78.2.3/24");
    let config = AgentConfig::with_nft(&format!(
        "extra_local_addresses = [\"10.78.2.2\"]\n{ROUTES}"
    ));
    let agent = Agent::start(&netns, &config);
    let rules = table(&netns, &config.nft_table);
    assert!(
        rules.contains("jump checked_in")
            && rules.contains(
                "ip daddr @extra_ipv4 counter name meta l4proto . th dport map @ports_in"
            ),
        "{rules}"
    );
    exchanges(&client, "10.78.2.2:18080", &backend, "10.78.2.2:18080");
    let before = forwarded_alike(&netns, 20.0);
    let named = scrape(&netns);
    exchanges(&client, "10.78.2.3:18080", &backend, "10.78.2.3:18080");
    let later = support::after_polls(&netns, 3);
    for direction in ["in", "out"] {
        assert_eq!(
            route_packets(&later, direction),
            route_packets(&named, direction),
            "{direction}: (eBPF, nftables) after the exchanges with an address not named"
        );
    }
    // A crash: the next start adopts the table, and both count on from there.
    agent.kill();
    exchanges(&client, "10.78.2.2:18080", &backend, "10.78.2.2:18080");
    let agent = Agent::start(&netns, &config);
    assert_eq!(table_count(&netns, &config.nft_table), 1);
    // Counted on, not from zero: nftables' count equals eBPF's, which the pins carried.
    forwarded_alike(&netns, before + 20.0);
    let text = scrape(&netns);
    assert_eq!(
        sample(&text, "collector_source_errors_total", &[("source", "nft")]),
        Some(0.0),
        "the table was judged as made at each read"
    );
    assert!(agent.stop().success());
    assert_no_pins(&config.pin_dir);
}

/// Extra addresses of every shape the config takes (adjacent ranges, ranges that end at the
/// family's last address, both families) make a table that is judged as made at every read,
/// also after the ruleset's generation moves; one that is also the host's (127.0.0.1)
/// counts once, as the classifiers count it.
#[test]
fn extra_ranges_of_every_shape_are_judged_as_made_and_a_local_one_counts_once() {
    let netns = Netns::new();
    let config = AgentConfig::with_nft(&format!(
        "extra_local_addresses = [\"10.79.0.0/25\", \"10.79.0.128/25\", \
         \"255.255.255.0/24\", \"127.0.0.1\", \"2001:db8::/120\", \
         \"ffff:ffff:ffff:ffff:ffff:ffff:ffff:ff00/120\"]\n{ROUTES}"
    ));
    let agent = Agent::start(&netns, &config);
    connections(&netns, 3);
    assert_nft_equals_ebpf(&netns, 3);
    // Another table made: the generation moves, and ours is read whole and judged again.
    nft_script(&netns, "table inet unrelated {\n}\n");
    connections(&netns, 2);
    assert_nft_equals_ebpf(&netns, 5);
    let text = scrape(&netns);
    assert_eq!(
        sample(&text, "collector_source_errors_total", &[("source", "nft")]),
        Some(0.0),
        "the table was judged as made at each read"
    );
    assert_eq!(table_count(&netns, &config.nft_table), 1);
    assert!(agent.stop().success());
    assert_no_pins(&config.pin_dir);
}

/// Once the route's packets in number `at_least` and stand still: the same count from
/// nftables and eBPF each way, no connection opened here (forwarded), and the count in.
fn forwarded_alike(netns: &Netns, at_least: f64) -> f64 {
    let metrics = settled_scrape(
        netns,
        "the forwarded packets, standing still",
        |text| (route_packets(text, "in"), route_packets(text, "out")),
        // 5 connections: at least SYN, the request, an ACK or two and the FIN each way.
        |((tc_in, _), (tc_out, _))| {
            tc_in.is_some_and(|packets| packets >= at_least)
                && tc_out.is_some_and(|packets| packets >= at_least)
        },
    );
    for direction in ["in", "out"] {
        let (tc, nft) = route_packets(&metrics, direction);
        assert_eq!(tc, nft, "{direction}");
    }
    assert_eq!(web_opened(&metrics), Some(0.0));
    route_packets(&metrics, "in").0.unwrap()
}

/// 5 exchanges from `client` to `connect`, which `backend` serves at `listen`: each sends 4
/// bytes, reads the 5 of the reply and the server's close.
fn exchanges(client: &Netns, connect: &'static str, backend: &Netns, listen: &'static str) {
    let listener = backend.run(move || TcpListener::bind(listen).unwrap());
    let server = thread::spawn(move || {
        for _ in 0..5 {
            let (mut stream, _) = listener.accept().unwrap();
            let mut buf = [0u8; 4];
            stream.read_exact(&mut buf).unwrap();
            stream.write_all(b"pong!").unwrap();
        }
    });
    client.run(move || {
        for _ in 0..5 {
            let mut stream = TcpStream::connect(connect).unwrap();
            stream.write_all(b"ping").unwrap();
            let mut reply = Vec::new();
            // To the server's close: its FIN has crossed too.
            stream.read_to_end(&mut reply).unwrap();
            assert_eq!(reply, b"pong!");
        }
    });
    server.join().unwrap();
}

/// The default, `enabled = "auto"`: no table of ours in a namespace where nothing else hooks
/// netfilter (ours would be the first hook, which costs every packet), and counting as
/// usual once a host firewall with NAT hooks prerouting and postrouting.
#[test]
fn auto_counts_only_where_netfilter_already_hooks() {
    let netns = Netns::new();
    let config = AgentConfig::new(ROUTES);
    let agent = Agent::start(&netns, &config);
    connections(&netns, 3);
    wait_for_closed(&netns, "web", 3);
    let text = scrape(&netns);
    assert_eq!(
        sample(&text, "collector_source_up", &[("source", "nft")]),
        None,
        "no nft source in a bare namespace"
    );
    assert_no_table(&netns, &config.nft_table);

    // A host firewall as NAT sets one up: base chains at prerouting and postrouting. The
    // running agent sees it within 30 polls (3 s here) and makes its table.
    nft_script(&netns, HOST_NAT);
    wait_for("our table, made late", Duration::from_secs(10), || {
        has_table(&netns, &config.nft_table).then_some(())
    });
    assert!(agent.stop().success());
    assert_no_table(&netns, &config.nft_table);

    // Started with the firewall there: counted from the start.
    let agent = Agent::start(&netns, &config);
    assert_has_table(&netns, &config.nft_table);
    connections(&netns, 3);
    assert_nft_equals_ebpf(&netns, 3);
    assert!(agent.stop().success());
    let left = tables(&netns);
    assert!(
        !left.contains(&config.nft_table) && left.contains("hostnat"),
        "{left}"
    );
}

/// `auto` rides only on hooks some firewall pays for already. A collector's table, here one a
/// crashed run left under the name an earlier config gave it, is no firewall: counting stays
/// off. That table is left as it is (it may be another collector's of this namespace).
#[test]
fn auto_takes_no_collectors_table_for_a_firewall() {
    let netns = Netns::new();
    let config = AgentConfig::new(ROUTES);
    let earlier = format!("{}_earlier", config.nft_table);
    nft_script(&netns, &previous_builds_table(&earlier));
    let agent = Agent::start(&netns, &config);
    let text = scrape(&netns);
    assert_eq!(
        sample(&text, "collector_source_up", &[("source", "nft")]),
        None,
        "no nft source: {}",
        tables(&netns)
    );
    assert_no_table(&netns, &config.nft_table);
    assert!(agent.stop().success());
    assert_has_table(&netns, &earlier);
}

#[test]
fn a_table_someone_removed_is_made_again_and_counts_on() {
    let netns = Netns::new();
    let config = AgentConfig::with_nft(ROUTES);
    let agent = Agent::start(&netns, &config);
    connections(&netns, 3);
    let before = assert_nft_equals_ebpf(&netns, 3);

    flush_ruleset(&netns);
    let text = mended(&netns, "the removal to be noticed and mended");
    assert_has_table(&netns, &config.nft_table);
    // Made anew, its counts from zero, the series goes on from where it was: no drop that
    // a count climbing past it before the next scrape would hide from Prometheus.
    assert_eq!(route_packets(&text, "in").1, Some(before));

    // And counts on with eBPF, as if nothing happened.
    connections(&netns, 4);
    assert_nft_equals_ebpf(&netns, 7);

    // The table was made with the counts carried as its counters' start, so the table a
    // crash leaves holds them, and the next run goes on from them (until 2026-12-05 it read
    // only what this table counted, 4, a drop Prometheus took for a reset).
    agent.kill();
    let agent = Agent::start(&netns, &config);
    connections(&netns, 2);
    assert_nft_equals_ebpf(&netns, 9);
    assert!(agent.stop().success());
    assert_no_table(&netns, &config.nft_table);
    assert_no_pins(&config.pin_dir);
}

/// A firewall's raw prerouting chain (priority -300, as iptables' raw table) made after our
/// table drops DNS queries: `in` still counts each, as the classifiers do, since it runs at
/// -301, before every raw chain. At -300 the kernel ran the chain registered last first, and
/// the drops counted or not by which table was made last.
#[test]
fn packets_a_raw_chain_drops_count_in_whichever_table_came_first() {
    const QUERIES: u32 = 7;
    let netns = Netns::new();
    let config = AgentConfig::with_nft(ROUTES);
    let agent = Agent::start(&netns, &config);
    nft_script(
        &netns,
        "table inet colltest_raw {\n  chain pre { type filter hook prerouting priority raw; policy accept; udp dport 53 counter drop; }\n}\n",
    );
    netns.run(|| {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        for _ in 0..QUERIES {
            socket
                .send_to(b"not a query, dropped", "127.0.0.1:53")
                .unwrap();
        }
    });
    let dns_in = |metrics: &str| {
        sample(
            metrics,
            "collector_nft_packets_total",
            &[
                ("route", "dns"),
                ("protocol", "udp"),
                ("port", "53"),
                ("direction", "in"),
            ],
        )
    };
    let metrics = settled_scrape(&netns, "the DNS series", dns_in, |count| count.is_some());
    assert_eq!(dns_in(&metrics), Some(f64::from(QUERIES)), "{metrics}");
    // The firewall's own counter: it dropped them all, after ours counted them.
    assert!(
        table(&netns, "colltest_raw").contains(&format!("packets {QUERIES} ")),
        "{}",
        table(&netns, "colltest_raw")
    );
    assert!(agent.stop().success());
    assert_no_table(&netns, &config.nft_table);
    assert_no_pins(&config.pin_dir);
}

/// While the table is away and cannot be made again, its series stay at their last counts,
/// the source down, and the table made again goes on from them: until 2026-12-05 they
/// vanished meanwhile, and a series missing from a scrape ends in Prometheus.
#[test]
fn while_the_table_cannot_be_made_again_its_series_stay_at_their_last_counts() {
    let netns = Netns::new();
    let config = AgentConfig::with_nft(ROUTES);
    let refuse = config.dir.join("refuse");
    let launcher = with_nft_refusing_while(&netns, &config.dir.join("refusing-tools"), &refuse);
    let agent = Agent::spawn(&netns, launcher, &config, &[]);
    connections(&netns, 3);
    let before = assert_nft_equals_ebpf(&netns, 3);

    std::fs::write(&refuse, "").unwrap();
    flush_ruleset(&netns);
    let nft_up = |text: &str| sample(text, "collector_source_up", &[("source", "nft")]);
    wait_for("the nft source down", Duration::from_secs(10), || {
        (nft_up(&scrape(&netns)) == Some(0.0)).then_some(())
    });
    let text = support::after_polls(&netns, 3);
    assert_eq!(nft_up(&text), Some(0.0));
    assert_eq!(route_packets(&text, "in").1, Some(before), "{text}");

    std::fs::remove_file(&refuse).unwrap();
    wait_for("the table made again", Duration::from_secs(15), || {
        (nft_up(&scrape(&netns)) == Some(1.0)).then_some(())
    });
    connections(&netns, 2);
    assert_nft_equals_ebpf(&netns, 5);
    assert!(agent.stop().success());
    assert_no_table(&netns, &config.nft_table);
    assert_no_pins(&config.pin_dir);
}

/// Our counters zeroed under the running agent (`nft reset counters`, as a script that takes
/// deltas might run): the series go on from their last counts, and on counting exactly.
/// Until 2026-12-04 they fell to zero, a reset that a count climbing back past the old value
/// before the next scrape hid from Prometheus.
#[test]
fn counters_reset_under_the_agent_go_on_from_their_last_counts() {
    let netns = Netns::new();
    let config = AgentConfig::with_nft(ROUTES);
    let agent = Agent::start(&netns, &config);
    connections(&netns, 3);
    let before = assert_nft_equals_ebpf(&netns, 3);

    run(
        "ip",
        &[
            "netns",
            "exec",
            &netns.name,
            "nft",
            "reset",
            "counters",
            "table",
            "inet",
            &config.nft_table,
        ],
    );
    assert!(
        table(&netns, &config.nft_table).contains("packets 0 bytes 0"),
        "{}",
        table(&netns, &config.nft_table)
    );
    // Two polls on, the reset was read: as no drop.
    let metrics = support::after_polls(&netns, 2);
    assert_eq!(route_packets(&metrics, "in").1, Some(before));

    connections(&netns, 4);
    assert_nft_equals_ebpf(&netns, 7);
    assert!(agent.stop().success());
    assert_no_table(&netns, &config.nft_table);
    assert_no_pins(&config.pin_dir);
}

/// A saved ruleset restored (`nft list ruleset > /etc/nftables.conf` while the agent ran, then
/// a reload, or the boot that loads it) brings our table back with the counts it had when it
/// was saved. Adopted, it would show Prometheus a drop to an old count, which `increase()`
/// takes for a reset and counts again. A running agent replaces it, its series going on from
/// its own last counts; so does a start that does not continue a crashed run's counters,
/// which counts from zero.
#[test]
fn a_table_restored_from_a_saved_ruleset_is_replaced_and_its_counts_not_taken() {
    let netns = Netns::new();
    let config = AgentConfig::with_nft(ROUTES);
    let agent = Agent::start(&netns, &config);
    connections(&netns, 3);
    let saved_packets = assert_nft_equals_ebpf(&netns, 3);
    let saved = table(&netns, &config.nft_table);
    assert!(
        saved.contains(&format!("packets {saved_packets} ")),
        "the save holds the counts: {saved}"
    );
    connections(&netns, 2);
    let last_packets = assert_nft_equals_ebpf(&netns, 5);

    nft_script(&netns, &format!("flush ruleset\n{saved}"));
    let text = mended(&netns, "the restored table to be noticed and replaced");
    assert_eq!(
        route_packets(&text, "in").1,
        Some(last_packets),
        "{}",
        table(&netns, &config.nft_table)
    );
    assert!(agent.stop().success());
    assert_no_table(&netns, &config.nft_table);

    // The boot that loads the saved ruleset before the agent starts.
    nft_script(&netns, &saved);
    let agent = Agent::start(&netns, &config);
    assert_made_anew_then_stop(&netns, &config, agent, &scrape(&netns));
}

/// `auto` after a crash, with nothing else hooking netfilter at the restart: the start
/// removes the crashed run's table. A firewall loaded later from a ruleset saved while the
/// earlier run counted brings our table back with that run's old counts; the running agent,
/// counting again, replaces it rather than adopt it (only a start's first try may adopt).
/// Until 2026-12-05 it adopted it: a drop to old counts, which `increase()` counts again.
#[test]
fn auto_after_a_crash_replaces_a_table_restored_later_and_takes_not_its_counts() {
    let netns = Netns::new();
    nft_script(&netns, HOST_NAT);
    let config = AgentConfig::new(ROUTES);
    let agent = Agent::start(&netns, &config);
    assert_has_table(&netns, &config.nft_table);
    connections(&netns, 3);
    let saved_packets = assert_nft_equals_ebpf(&netns, 3);
    let saved = support::stdout_of(netns.command("nft").args(["list", "ruleset"]));
    assert!(
        saved.contains(&format!("packets {saved_packets} ")),
        "the save holds the counts: {saved}"
    );

    agent.kill();
    nft_script(&netns, "delete table ip hostnat\n");
    let agent = Agent::start(&netns, &config);
    assert_no_table(&netns, &config.nft_table);
    nft_script(&netns, &saved);
    // The running agent sees the firewall's hooks within 30 polls (3 s here).
    let text = wait_for("counting again", Duration::from_secs(10), || {
        let text = scrape(&netns);
        (sample(&text, "collector_source_up", &[("source", "nft")]) == Some(1.0)).then_some(text)
    });
    assert_made_anew_then_stop(&netns, &config, agent, &text);
}

/// Our table, one of it, counting from 0 in `text` (a saved one with old counts was not
/// taken); then a clean stop leaves neither it nor the pins.
fn assert_made_anew_then_stop(netns: &Netns, config: &AgentConfig, agent: Agent, text: &str) {
    assert_eq!(
        route_packets(text, "in").1,
        Some(0.0),
        "{}",
        table(netns, &config.nft_table)
    );
    assert_eq!(table_count(netns, &config.nft_table), 1);
    assert!(agent.stop().success());
    assert_no_table(netns, &config.nft_table);
    assert_no_pins(&config.pin_dir);
}

/// The table a host firewall has (Debian's /etc/nftables.conf, its forward policy drop),
/// named as the config names ours. It is never replaced or deleted: the nft source is down
/// naming it, a stop leaves it, a start after a crash with counting off leaves it, and so
/// does `cleanup`. Until 2026-12-02 the start deleted it and made ours in its place.
#[test]
fn a_table_that_is_not_the_collectors_is_left_as_it_is() {
    let netns = Netns::new();
    let config = AgentConfig::with_nft(ROUTES);
    let name = &config.nft_table;
    nft_script(
        &netns,
        &format!(
            "table inet {name} {{\n\
             chain input {{ type filter hook input priority filter; policy accept; }}\n\
             chain forward {{ type filter hook forward priority filter; policy drop; }}\n\
             chain output {{ type filter hook output priority filter; policy accept; }}\n}}\n"
        ),
    );
    let firewall = table(&netns, name);

    let agent = Agent::start(&netns, &config);
    let nft = wait_for("the nft source", Duration::from_secs(10), || {
        let nft = proxy_json(&netns)["sources"]["nft"].clone();
        nft.is_object().then_some(nft)
    });
    assert_eq!(nft["up"], false, "{nft}");
    let error = nft["lastError"].as_str().unwrap();
    assert!(
        error.contains(&format!(
            "the nftables table inet {name} is not the collector's: it holds the chain input"
        )) && error.contains("[nftables] table = "),
        "{error}"
    );
    assert_eq!(table(&netns, name), firewall);
    // The rest counts on.
    connections(&netns, 2);
    wait_for_closed(&netns, "web", 2);
    assert!(agent.stop().success());
    assert_eq!(table(&netns, name), firewall);

    // A crash, then a start with counting off ("auto", nothing else hooking prerouting).
    Agent::start(&netns, &config).kill();
    let text = std::fs::read_to_string(&config.path)
        .unwrap()
        .replace("enabled = true\n", "");
    std::fs::write(&config.path, text).unwrap();
    Agent::start(&netns, &config).kill();
    assert_eq!(table(&netns, name), firewall);

    // The cleanup after that crash removes the pins and names the table it leaves.
    let apply = netns
        .command(COLLECTOR)
        .args(["cleanup", "--apply", "--config"])
        .arg(&config.path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&apply.stdout);
    assert!(apply.status.success(), "{stdout}");
    assert!(
        stdout.contains(&format!(
            "nftables table inet {name} in this network namespace: not the collector's (it holds the chain input): cleanup leaves it"
        )) && !stdout.contains(&format!("removing nftables table inet {name}")),
        "{stdout}"
    );
    assert_eq!(table(&netns, name), firewall);
    assert_no_pins(&config.pin_dir);
}

/// The table the previous build left (its `out` chain before source NAT, no comments) is
/// recognised as ours, and replaced rather than adopted as it is.
#[test]
fn the_previous_builds_table_is_replaced_with_out_counted_after_source_nat() {
    let netns = Netns::new();
    let config = AgentConfig::with_nft(ROUTES);
    let name = &config.nft_table;
    nft_script(&netns, &previous_builds_table(name));
    assert_eq!(chain_priority(&netns, name, "count_out"), -300);

    let agent = Agent::start(&netns, &config);
    assert_eq!(chain_priority(&netns, name, "count_out"), 300);
    assert_eq!(chain_priority(&netns, name, "count_in"), -301);
    assert_eq!(table_count(&netns, &config.nft_table), 1);
    assert!(table(&netns, name).contains("comment \"made by collector"));
    connections(&netns, 3);
    assert_nft_equals_ebpf(&netns, 3);
    assert!(agent.stop().success());
    assert_no_table(&netns, &config.nft_table);
    assert_no_pins(&config.pin_dir);
}

/// `nft flush table` takes our rules and leaves the counters, which would then stand still:
/// a start after a crash does not adopt such a table, and a running agent notices it at the
/// next poll (the source down for it, with the reason) and makes the table again.
#[test]
fn a_table_whose_rules_were_flushed_is_made_again() {
    let netns = Netns::new();
    let config = AgentConfig::with_nft(ROUTES);
    let name = &config.nft_table;
    let rule = "counter name meta l4proto . th dport map @ports_in";
    let flush = || {
        run(
            "ip",
            &[
                "netns",
                "exec",
                &netns.name,
                "nft",
                "flush",
                "table",
                "inet",
                name,
            ],
        );
        assert!(!table(&netns, name).contains(rule));
    };
    // Both sources' `in` counts once the connections closed so far have stood still.
    let settled = |closed: f64| {
        let metrics = settled_scrape(
            &netns,
            "the closes, with both sources standing still",
            |text| {
                (
                    sample(
                        text,
                        "collector_proxy_connections_closed_total",
                        &[("route", "web")],
                    ),
                    route_packets(text, "in"),
                )
            },
            |(closed_now, _)| closed_now == Some(closed),
        );
        let (ebpf, nft) = route_packets(&metrics, "in");
        (ebpf.unwrap(), nft.unwrap())
    };

    let agent = Agent::start(&netns, &config);
    connections(&netns, 3);
    let before = assert_nft_equals_ebpf(&netns, 3);
    agent.kill();
    flush();
    let agent = Agent::start(&netns, &config);
    assert!(
        table(&netns, name).contains(rule),
        "{}",
        table(&netns, name)
    );
    // Made anew at the start (from zero), it counts the next connections exactly; eBPF
    // counted on through the crash.
    connections(&netns, 2);
    let (ebpf_5, nft_5) = settled(5.0);
    assert_eq!(nft_5, ebpf_5 - before);

    flush();
    let text = mended(&netns, "the flush to be noticed and mended");
    assert!(
        table(&netns, name).contains(rule),
        "{}",
        table(&netns, name)
    );
    // Made anew under the running agent: the series goes on from its last count.
    assert_eq!(route_packets(&text, "in").1, Some(nft_5));
    let error = proxy_json(&netns)["sources"]["nft"]["lastError"].clone();
    assert!(
        error
            .as_str()
            .unwrap()
            .contains("holds 0 rules in its chain count_in"),
        "{error}"
    );
    connections(&netns, 4);
    let (ebpf_9, nft_9) = settled(9.0);
    assert_eq!(nft_9 - nft_5, ebpf_9 - ebpf_5);
    assert!(agent.stop().success());
    assert_no_table(&netns, name);
    assert_no_pins(&config.pin_dir);
}

/// A stop between the poll that found our table's rules flushed and the poll that would make
/// it again removes what is left of it: its chains, still hooked, would otherwise charge
/// every packet of the namespace until a cleanup. Polls 5 s apart leave the stop in between.
#[test]
fn a_stop_right_after_a_flush_removes_what_is_left_of_the_table() {
    let netns = Netns::new();
    let config = AgentConfig::with_nft_polling_every(ROUTES, 5_000);
    let name = &config.nft_table;
    let agent = Agent::start(&netns, &config);
    nft_script(&netns, &format!("flush table inet {name}\n"));
    wait_for("the flush to be noticed", Duration::from_secs(15), || {
        let text = scrape(&netns);
        (sample(&text, "collector_source_up", &[("source", "nft")]) == Some(0.0)).then_some(())
    });
    // Still flushed, so that the stop below meets what the flush left (a poll that had
    // made the table again would leave this test nothing to show): the chains stand,
    // without their rule (`counter name ... map @ports_in`).
    let left = support::stdout_of(netns.command("nft").args(["list", "table", "inet", name]));
    assert!(
        left.contains("chain") && !left.contains("@ports_"),
        "{left}"
    );
    assert!(agent.stop().success());
    assert_no_table(&netns, name);
    assert_no_pins(&config.pin_dir);
}

/// A host firewall with netfilter hooks (NAT at prerouting and postrouting): `auto` counts
/// where it is.
const HOST_NAT: &str = "table ip hostnat {\n\
    chain pre { type nat hook prerouting priority dstnat; policy accept; }\n\
    chain post { type nat hook postrouting priority srcnat; policy accept; }\n}\n";

/// A firewall reload under `auto` (`systemctl reload nftables`: `flush ruleset` and the
/// firewall again, in one transaction) keeps counting wanted: every scrape has the series,
/// at their last counts, until the table is made again, and they go on from them. Until
/// 2026-12-05 `auto` stopped counting at the removal, before it looked at the hooks again,
/// and the series vanished for two polls or more.
#[test]
fn auto_keeps_the_series_through_a_firewall_reload() {
    let netns = Netns::new();
    let config = AgentConfig::new(ROUTES);
    nft_script(&netns, HOST_NAT);
    let agent = Agent::start(&netns, &config);
    assert_has_table(&netns, &config.nft_table);
    connections(&netns, 3);
    let before = assert_nft_equals_ebpf(&netns, 3);

    nft_script(&netns, &format!("flush ruleset\n{HOST_NAT}"));
    wait_for(
        "the reload to be noticed and mended",
        Duration::from_secs(10),
        || {
            let text = scrape(&netns);
            assert_eq!(
                route_packets(&text, "in").1,
                Some(before),
                "a scrape without the series' last count: {text}"
            );
            (sample(&text, "collector_source_errors_total", &[("source", "nft")]) == Some(1.0)
                && sample(&text, "collector_source_up", &[("source", "nft")]) == Some(1.0))
            .then_some(())
        },
    );
    assert_has_table(&netns, &config.nft_table);
    connections(&netns, 4);
    assert_nft_equals_ebpf(&netns, 7);
    assert!(agent.stop().success());
    assert_no_table(&netns, &config.nft_table);
    assert_no_pins(&config.pin_dir);
}

/// With `auto`, a table removed along with the firewall whose hooks it rode on (`nft flush
/// ruleset`) is not made again while nothing else hooks netfilter: the nft source goes as
/// at a start in a bare namespace, and comes back with the firewall.
#[test]
fn auto_makes_a_removed_table_again_only_where_netfilter_still_hooks() {
    let netns = Netns::new();
    let config = AgentConfig::new(ROUTES);
    let firewall = HOST_NAT;
    nft_script(&netns, firewall);
    let agent = Agent::start(&netns, &config);
    assert_has_table(&netns, &config.nft_table);
    let nft_up = || sample(&scrape(&netns), "collector_source_up", &[("source", "nft")]);
    assert_eq!(nft_up(), Some(1.0));

    flush_ruleset(&netns);
    wait_for("the nft source to go", Duration::from_secs(10), || {
        nft_up().is_none().then_some(())
    });
    assert_no_table(&netns, &config.nft_table);

    nft_script(&netns, firewall);
    wait_for("our table, made again", Duration::from_secs(10), || {
        (has_table(&netns, &config.nft_table) && nft_up() == Some(1.0)).then_some(())
    });

    // The firewall goes and our rules with it, our table staying (its chains still hooked):
    // with counting off it is removed, not left as the namespace's first hook.
    nft_script(
        &netns,
        &format!(
            "flush table inet {}\ndelete table ip hostnat\n",
            config.nft_table
        ),
    );
    wait_for(
        "the nft source to go again",
        Duration::from_secs(10),
        || nft_up().is_none().then_some(()),
    );
    wait_for(
        "what was left of our table to go",
        Duration::from_secs(10),
        || (!has_table(&netns, &config.nft_table)).then_some(()),
    );
    assert!(agent.stop().success());
    assert_no_table(&netns, &config.nft_table);
    assert_no_pins(&config.pin_dir);
}

/// With `auto`, our table's rules flushed and the firewall gone: the removal of what is left
/// of our table, which `nft` refuses while the returned file exists. Returns once it was.
fn a_refused_removal_of_what_is_left(
    netns: &Netns,
    config: &AgentConfig,
) -> (Agent, std::path::PathBuf) {
    nft_script(netns, HOST_NAT);
    let tools = config.dir.join("refusing-tools");
    let refuse = config.dir.join("refuse");
    let launcher = with_nft_refusing_while(netns, &tools, &refuse);
    let agent = Agent::spawn(netns, launcher, config, &[]);
    assert_has_table(netns, &config.nft_table);
    std::fs::write(&refuse, "").unwrap();
    nft_script(
        netns,
        &format!(
            "flush table inet {}\ndelete table ip hostnat\n",
            config.nft_table
        ),
    );
    wait_for("the removal refused", Duration::from_secs(15), || {
        tools.join("refused").exists().then_some(())
    });
    assert_has_table(netns, &config.nft_table);
    (agent, refuse)
}

/// With `auto`, a removal of what is left of our table that fails (here `nft` refuses it)
/// is tried again at the next look. Until 2026-12-05 the failure was forgotten: the table,
/// its chains still hooked, stayed, and outlived the stop.
#[test]
fn auto_tries_again_a_removal_of_what_is_left_that_failed() {
    let netns = Netns::new();
    let config = AgentConfig::new(ROUTES);
    let (agent, refuse) = a_refused_removal_of_what_is_left(&netns, &config);
    std::fs::remove_file(&refuse).unwrap();
    wait_for(
        "what was left of our table to go at the next look",
        Duration::from_secs(15),
        || (!has_table(&netns, &config.nft_table)).then_some(()),
    );
    assert!(agent.stop().success());
    assert_no_pins(&config.pin_dir);
}

/// As above, the removal refused at the stop too: the table stays, and the stop fails.
#[test]
fn a_removal_of_what_is_left_refused_at_the_stop_fails_it() {
    let netns = Netns::new();
    let config = AgentConfig::new(ROUTES);
    let (agent, _refuse) = a_refused_removal_of_what_is_left(&netns, &config);
    assert!(!agent.stop().success());
    assert_has_table(&netns, &config.nft_table);
    assert_no_pins(&config.pin_dir);
}

/// With `auto`, the firewall gone and our table changed by someone (its rules flushed, a
/// chain added): the removal of what is left leaves it, and so does the stop, which fails.
#[test]
fn auto_leaves_our_table_changed_by_someone_and_the_stop_fails() {
    let netns = Netns::new();
    let config = AgentConfig::new(ROUTES);
    nft_script(&netns, HOST_NAT);
    let log = config.dir.join("agent.log");
    let agent = Agent::start_logging(&netns, &config, &[], &log);
    assert_has_table(&netns, &config.nft_table);
    nft_script(
        &netns,
        &format!(
            "flush table inet {table}\nadd chain inet {table} extra\ndelete table ip hostnat\n",
            table = config.nft_table
        ),
    );
    support::logged_lines(&log, "left the nftables table");
    assert!(!agent.stop().success());
    assert_has_table(&netns, &config.nft_table);
    assert_no_pins(&config.pin_dir);
}

/// Our table changed by someone into one we do not recognise (a chain added) is left at the
/// stop, its chains still hooking every packet: the stop says so and fails, as `collector
/// cleanup --apply` does. Until 2026-12-05 it exited 0.
#[test]
fn a_stop_that_leaves_our_table_changed_by_someone_fails() {
    let netns = Netns::new();
    let config = AgentConfig::with_nft(ROUTES);
    let log = config.dir.join("agent.log");
    let agent = Agent::start_logging(&netns, &config, &[], &log);
    nft_script(
        &netns,
        &format!("add chain inet {} extra\n", config.nft_table),
    );
    assert!(!agent.stop().success());
    assert_has_table(&netns, &config.nft_table);
    let said = support::logged_lines(&log, "left the nftables table");
    let fix = format!("`nft delete table inet {}`", config.nft_table);
    assert!(said.iter().any(|line| line.contains(&fix)), "{said:?}");
    assert_no_pins(&config.pin_dir);
}

//! The agent's memory under names and clients it has never seen: every phase sends queries
//! for names new to it and connections from addresses new to it, and its resident size is
//! read after each. Its top-K lists, recent windows and client tables are bounded, so after
//! the first phases have filled them the size should stay where it is however many more
//! names and clients come: what a host under a random-subdomain flood, or a proxy with
//! millions of clients a day, needs of it.

use std::{
    fmt::Write as _,
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::Path,
    thread,
    time::Duration,
};

use crate::{
    cpu_seconds, run_dnsperf,
    support::{self, Agent, AgentConfig, Netns, dns::Unbound, dns_json, sample},
};

/// The route the phases' connections count in, on a port of its own (the other parts'
/// servers may still hold theirs).
const PORT: u16 = 18070;
/// How long a phase's client or server waits for the other before the bench fails, rather
/// than hang on a side that panicked.
const STALLED: Duration = Duration::from_secs(10);
/// Phases, each with names and client addresses none before it had.
const PHASES: u32 = 5;
/// Distinct query names a phase sends, each once.
const NAMES_PER_PHASE: u32 = 200_000;
/// Distinct client addresses a phase connects from, one connection each.
const CLIENTS_PER_PHASE: u32 = 20_000;

/// One phase's figures, read after its load and two polls.
struct Phase {
    names: u64,
    clients: u64,
    queries_counted: u64,
    connections_counted: u64,
    samples_dropped: u64,
    resident_kib: u64,
    peak_kib: u64,
    open_files: usize,
    cpu_seconds: f64,
}

/// The report section: one row per phase.
pub fn report(netns: &Netns) -> String {
    let server = Unbound::start(netns, false);
    let scratch = support::ScratchDir::new("memory");
    let config = AgentConfig::shipped_poll(&format!(
        "[[routes]]\nname = \"memory\"\nports = [{PORT}]\ntype = \"tcp\"\n"
    ));
    let agent = Agent::start(netns, &config);
    let listener = netns.run(|| TcpListener::bind(("127.0.0.1", PORT)).unwrap());
    let mut phases = Vec::new();
    let start = read_phase(netns, &agent, 0, 0);
    for phase in 0..PHASES {
        let queries = scratch.path(&format!("names-{phase}.txt"));
        write_names(&queries, phase);
        dnsperf_once(netns, &queries);
        connect_from_new_clients(netns, &listener, phase);
        support::after_polls(netns, 2);
        phases.push(read_phase(
            netns,
            &agent,
            u64::from((phase + 1) * NAMES_PER_PHASE),
            u64::from((phase + 1) * CLIENTS_PER_PHASE),
        ));
    }
    assert!(agent.stop().success());
    drop(server);
    render(&start, &phases)
}

/// `NAMES_PER_PHASE` A queries for names under the server's local zone (each answered
/// NXDOMAIN), none sent before.
fn write_names(path: &Path, phase: u32) {
    let mut text = String::with_capacity(NAMES_PER_PHASE as usize * 24);
    for i in 0..NAMES_PER_PHASE {
        let _ = writeln!(text, "p{phase}-n{i}.test A");
    }
    std::fs::write(path, text).unwrap();
}

/// dnsperf through `queries` once, at its maximum rate.
fn dnsperf_once(netns: &Netns, queries: &Path) {
    run_dnsperf(netns.command("dnsperf"), queries, &["-n", "1"]);
}

/// One connection from each of `CLIENTS_PER_PHASE` loopback addresses none before used
/// (127/8 is the host's own: any of its addresses can be bound), a byte each way.
fn connect_from_new_clients(netns: &Netns, listener: &TcpListener, phase: u32) {
    let listener = listener.try_clone().unwrap();
    let server = thread::spawn(move || {
        for _ in 0..CLIENTS_PER_PHASE {
            let (mut stream, _) = listener.accept().unwrap();
            stream.set_read_timeout(Some(STALLED)).unwrap();
            let mut byte = [0u8; 1];
            stream.read_exact(&mut byte).unwrap();
            stream.write_all(&byte).unwrap();
        }
    });
    netns.run(move || {
        let target = SocketAddr::from((Ipv4Addr::LOCALHOST, PORT));
        for i in 0..CLIENTS_PER_PHASE {
            // 127.1.0.0 on: clear of 127.0.0.1, the servers' own.
            let index = (phase * CLIENTS_PER_PHASE + i).to_be_bytes();
            let source =
                SocketAddr::from((Ipv4Addr::new(127, index[1] + 1, index[2], index[3]), 0));
            let socket =
                socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            socket.bind(&source.into()).unwrap();
            socket.connect(&target.into()).unwrap();
            let mut stream = TcpStream::from(socket);
            stream.set_read_timeout(Some(STALLED)).unwrap();
            stream.write_all(&[7]).unwrap();
            let mut byte = [0u8; 1];
            stream.read_exact(&mut byte).unwrap();
        }
    });
    server.join().unwrap();
}

fn read_phase(netns: &Netns, agent: &Agent, names: u64, clients: u64) -> Phase {
    let dns = dns_json(netns);
    let metrics = support::scrape(netns);
    let status = std::fs::read_to_string(format!("/proc/{}/status", agent.pid())).unwrap();
    let kib = |field: &str| -> u64 {
        status
            .lines()
            .find_map(|line| line.strip_prefix(field))
            .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("no {field} in the agent's status:\n{status}"))
    };
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "a count"
    )]
    let connections_counted = sample(
        &metrics,
        "collector_proxy_connections_closed_total",
        &[("route", "memory")],
    )
    .unwrap_or(0.0) as u64;
    Phase {
        names,
        clients,
        queries_counted: dns["totalQueries"].as_u64().unwrap(),
        connections_counted,
        samples_dropped: dns["eventsDropped"].as_u64().unwrap(),
        resident_kib: kib("VmRSS:"),
        peak_kib: kib("VmHWM:"),
        open_files: std::fs::read_dir(format!("/proc/{}/fd", agent.pid()))
            .unwrap()
            .count(),
        cpu_seconds: cpu_seconds(agent.pid()),
    }
}

fn render(start: &Phase, phases: &[Phase]) -> String {
    let mut report = String::new();
    let _ = writeln!(
        report,
        "## Memory under names and clients never seen before\n"
    );
    let _ = writeln!(
        report,
        "Command: `cargo xtask bench` (any arguments): one agent with the embedded default's \
         polling and a route, unbound answering from its local zone, then {PHASES} phases, each \
         sending dnsperf through {NAMES_PER_PHASE} query names none before it sent (each once, \
         answered NXDOMAIN) and one connection from each of {CLIENTS_PER_PHASE} loopback \
         addresses none before it used; after each phase and two polls, the agent's resident \
         size (`VmRSS`), its peak (`VmHWM`) and open files from /proc, and its CPU time since \
         its start. The resident size includes the kernel tables the agent maps to read them \
         (the connection table's 3 MiB at its default size among them). The top-K lists, their \
         recent windows and the client tables are bounded: past the first phases the size \
         should not grow with the names and clients seen.\n"
    );
    let _ = writeln!(
        report,
        "| after | names sent | clients connected | queries counted | connections counted | name samples dropped | resident MiB | peak MiB | open files | agent CPU s |"
    );
    let _ = writeln!(report, "|---|---|---|---|---|---|---|---|---|---|");
    let rows = std::iter::once(("start".to_owned(), start)).chain(
        (1..)
            .zip(phases)
            .map(|(n, phase)| (format!("phase {n}"), phase)),
    );
    for (label, phase) in rows {
        #[expect(clippy::cast_precision_loss, reason = "KiB far below 2^52")]
        let mib = |kib: u64| kib as f64 / 1024.0;
        let _ = writeln!(
            report,
            "| {label} | {} | {} | {} | {} | {} | {:.1} | {:.1} | {} | {:.2} |",
            phase.names,
            phase.clients,
            phase.queries_counted,
            phase.connections_counted,
            phase.samples_dropped,
            mib(phase.resident_kib),
            mib(phase.peak_kib),
            phase.open_files,
            phase.cpu_seconds,
        );
    }
    let differences: Vec<String> = (1..)
        .zip(phases)
        .filter(|(_, phase)| {
            phase.queries_counted != phase.names || phase.connections_counted != phase.clients
        })
        .map(|(n, _)| format!("phase {n}"))
        .collect();
    let _ = writeln!(
        report,
        "\n**Counted against sent (queries) and made (connections): {}.**\n",
        if differences.is_empty() {
            "equal after every phase".to_owned()
        } else {
            format!("different after {}", differences.join(", "))
        }
    );
    report
}

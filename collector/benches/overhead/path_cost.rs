//! What each classifier path costs in instructions alone: the kernel object loaded on its
//! own (no agent, no traffic) and run on crafted packets through `BPF_PROG_TEST_RUN`, one run
//! at a time, interleaved with the empty program measured the same way. Caches are hot and a
//! response runs on its query's CPU, so this is the floor of what a packet costs under load,
//! not the whole of it; but it hardly moves with the VM's drift, which swings the figures
//! under load by a third from one hour to the next, so it shows a change of a few
//! nanoseconds that those cannot.

use std::fmt::Write as _;

use aya::{
    Ebpf, EbpfLoader,
    maps::Array,
    programs::{SchedClassifier, TestRun, TestRunOptions},
};
use collector_common::{
    DnsPorts, GLOBAL_DNS_MATCH_BELOW, GLOBAL_DNS_MATCH_RESPONSES, GLOBAL_DNS_PORTS,
    GLOBAL_LOCAL_ONLY, LOCAL_ADDRESS_SLOTS, address_words, dns_match_below, dns_match_sample,
    local_address_set_bits, local_address_sets, map_names, port_bit, program_names,
    tally_table_len,
};

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/collector"));

/// Runs of each path. The query asks one name: it takes its slot of the name table once
/// and counts there after (the ring is not filled).
const ROUNDS: usize = 20_000;
const ROUTE_PORT: u16 = 18080;
const DNS_PORT: u16 = 53;
const CLIENT_PORT: u16 = 40000;
const QUERY_ID: u16 = 0x1234;
/// Runs of each path in one test run for the steady-state figures, and rounds of them.
const REPEAT: u32 = 100;
const STEADY_ROUNDS: usize = 2_000;
/// The sampled-matching mode measured: `[dns] match_every`.
const MATCH_EVERY: u32 = 16;
/// `TC_ACT_UNSPEC` as test runs return it.
const PASS: u32 = u32::MAX;

/// The paths measured, in the order of each round.
const PATHS: [&str; 4] = [
    "DNS query (first question walked, counted, sampled)",
    "DNS response to that query",
    "TCP segment to a route port (ingress, its address looked up)",
    "TCP segment to a route port that the host forwards (its address not found: not counted)",
];

/// The kernel object as the agent loads it for one DNS mode (matching off, or one query in
/// `match_every`), with one route port.
pub fn load(match_responses: bool, match_every: u32) -> Ebpf {
    let ports = DnsPorts {
        server: [DNS_PORT, 0, 0, 0, 0, 0, 0, 0],
        upstream: [DNS_PORT, 0, 0, 0, 0, 0, 0, 0],
    };
    let matching = u32::from(match_responses);
    let match_below = dns_match_below(match_every);
    let name_table_len = tally_table_len(aya::util::nr_cpus().unwrap()).unwrap();
    // As the agent loads it: live traffic only to and from the namespace's addresses.
    let local_only = 1u32;
    let mut ebpf = EbpfLoader::new()
        .override_global(GLOBAL_LOCAL_ONLY, &local_only, true)
        .override_global(GLOBAL_DNS_PORTS, &ports, true)
        .override_global(GLOBAL_DNS_MATCH_RESPONSES, &matching, true)
        .override_global(GLOBAL_DNS_MATCH_BELOW, &match_below, true)
        .map_max_entries(map_names::DNS_NAMES, name_table_len)
        .load(OBJECT)
        .expect("loading the kernel object");
    let mut route_by_port: Array<_, u32> =
        Array::try_from(ebpf.map_mut(map_names::ROUTE_BY_PORT).unwrap()).unwrap();
    route_by_port.set(u32::from(ROUTE_PORT), 1, 0).unwrap();
    let mut port_bits: Array<_, u64> =
        Array::try_from(ebpf.map_mut(map_names::ROUTE_PORT_BITS).unwrap()).unwrap();
    let (word, bit) = port_bit(ROUTE_PORT);
    port_bits.set(word, bit, 0).unwrap();
    let mut addresses: Array<_, [u64; 2]> =
        Array::try_from(ebpf.map_mut(map_names::LOCAL_ADDRESSES).unwrap()).unwrap();
    let localhost = address_words(&std::net::Ipv4Addr::LOCALHOST.to_ipv6_mapped().octets());
    let [first_set, _] = local_address_sets(localhost, local_address_set_bits(LOCAL_ADDRESS_SLOTS));
    addresses.set(first_set, localhost, 0).unwrap();
    let mut complete: Array<_, u32> =
        Array::try_from(ebpf.map_mut(map_names::LOCAL_ADDRESSES_COMPLETE).unwrap()).unwrap();
    complete.set(0, 1, 0).unwrap();
    crate::support::load_classifiers(
        &mut ebpf,
        &[
            program_names::COUNT_INGRESS,
            program_names::COUNT_EGRESS,
            program_names::STATS_FLOOR_TC,
        ],
    );
    ebpf
}

/// Nanoseconds per run of each path in [`PATHS`] (a [`trimmed_mean`]), minus the empty
/// program's, for each of `modes`. The modes take turns within each round, so drift favours
/// neither.
/// `repeat` runs each test run: 1, or [`REPEAT`] for the steady state.
fn measure(modes: &[Ebpf], rounds: usize, repeat: u32) -> Vec<[f64; PATHS.len()]> {
    let runs = [
        (program_names::COUNT_INGRESS, query()),
        (program_names::COUNT_EGRESS, response()),
        (program_names::COUNT_INGRESS, tcp_segment(LOCALHOST)),
        (program_names::COUNT_INGRESS, tcp_segment(ANOTHER_HOST)),
    ];
    let mut floors = vec![Vec::with_capacity(rounds); modes.len()];
    let mut samples: Vec<[Vec<f64>; PATHS.len()]> =
        modes.iter().map(|_| Default::default()).collect();
    for _ in 0..rounds {
        for ((ebpf, floor), paths) in modes.iter().zip(&mut floors).zip(&mut samples) {
            floor.push(run_ns(
                ebpf,
                program_names::STATS_FLOOR_TC,
                &runs[2].1,
                repeat,
            ));
            for ((program, frame), path) in runs.iter().zip(paths.iter_mut()) {
                path.push(run_ns(ebpf, program, frame, repeat));
            }
        }
    }
    floors
        .iter_mut()
        .zip(samples)
        .map(|(floor, paths)| {
            let floor = trimmed_mean(floor);
            paths.map(|mut path| trimmed_mean(&mut path) - floor)
        })
        .collect()
}

/// The mean of the middle 80 % of `values` (sorted in place): the test runs' clock ticks in
/// 10 ns on this VM, so any one run, and a median, reads a multiple of 10; the mean of many
/// resolves what lies between, and the trim keeps an interrupted run out.
fn trimmed_mean(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let trim = values.len() / 10;
    let middle = &values[trim..values.len() - trim];
    #[expect(clippy::cast_precision_loss, reason = "run counts far below 2^52")]
    let count = middle.len() as f64;
    middle.iter().sum::<f64>() / count
}

/// Nanoseconds per run of `program` on `frame`, run `repeat` times on the one packet (the
/// kernel's mean over them).
fn run_ns(ebpf: &Ebpf, program: &str, frame: &[u8], repeat: u32) -> f64 {
    let program: &SchedClassifier = ebpf.program(program).unwrap().try_into().unwrap();
    let mut options = TestRunOptions::new();
    options.data_in = Some(frame);
    options.repeat = repeat;
    let result = program.test_run(options).expect("BPF_PROG_TEST_RUN");
    assert_eq!(result.return_value, PASS, "a classifier changed a verdict");
    result.duration.as_secs_f64() * 1e9
}

const LOCALHOST: [u8; 4] = [127, 0, 0, 1];
/// An address not in the table: a packet the host only forwards.
const ANOTHER_HOST: [u8; 4] = [10, 9, 9, 9];

/// Ethernet and IPv4 headers for 127.0.0.1 → 127.0.0.1 (no checksums: tc does not check).
fn ipv4_frame(protocol: u8, l4: &[u8]) -> Vec<u8> {
    ipv4_frame_to(LOCALHOST, protocol, l4)
}

/// [`ipv4_frame`] to `destination`.
fn ipv4_frame_to(destination: [u8; 4], protocol: u8, l4: &[u8]) -> Vec<u8> {
    let mut frame = vec![0u8; 12];
    frame.extend_from_slice(&0x0800u16.to_be_bytes());
    let total = u16::try_from(20 + l4.len()).unwrap();
    frame.extend_from_slice(&[0x45, 0]);
    frame.extend_from_slice(&total.to_be_bytes());
    frame.extend_from_slice(&[0, 1, 0, 0, 64, protocol, 0, 0, 127, 0, 0, 1]);
    frame.extend_from_slice(&destination);
    frame.extend_from_slice(l4);
    frame
}

fn udp_frame(source: u16, destination: u16, dns: &[u8]) -> Vec<u8> {
    let mut udp = Vec::new();
    udp.extend_from_slice(&source.to_be_bytes());
    udp.extend_from_slice(&destination.to_be_bytes());
    udp.extend_from_slice(&u16::try_from(8 + dns.len()).unwrap().to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(dns);
    ipv4_frame(17, &udp)
}

/// Header (id 0x1234, `flags`, one question, `answers`) and the question `www.example.com A`.
fn dns_message(flags: u16, answers: u16) -> Vec<u8> {
    let mut message = Vec::new();
    for field in [QUERY_ID, flags, 1, answers, 0, 0] {
        message.extend_from_slice(&u16::to_be_bytes(field));
    }
    for label in ["www", "example", "com"] {
        message.push(u8::try_from(label.len()).unwrap());
        message.extend_from_slice(label.as_bytes());
    }
    message.extend_from_slice(&[0, 0, 1, 0, 1]);
    message
}

fn query() -> Vec<u8> {
    udp_frame(CLIENT_PORT, DNS_PORT, &dns_message(0x0100, 0))
}

fn response() -> Vec<u8> {
    let mut message = dns_message(0x8180, 1);
    // One A record, its name a pointer to the question's.
    message.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 1, 0x2c, 0, 4, 192, 0, 2, 1]);
    udp_frame(DNS_PORT, CLIENT_PORT, &message)
}

fn tcp_segment(destination: [u8; 4]) -> Vec<u8> {
    let mut tcp = Vec::new();
    tcp.extend_from_slice(&CLIENT_PORT.to_be_bytes());
    tcp.extend_from_slice(&ROUTE_PORT.to_be_bytes());
    // Sequence and acknowledgement numbers, data offset 5 words, ACK, window, checksum,
    // urgent pointer; then ten bytes of payload.
    tcp.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 1, 0x50, 0x10, 0xff, 0xff, 0, 0, 0, 0]);
    tcp.extend_from_slice(&[b'x'; 10]);
    ipv4_frame_to(destination, 6, &tcp)
}

/// The report section: the DNS modes side by side.
pub fn report() -> String {
    eprintln!("instruction cost per path ({ROUNDS} runs each, three DNS modes)");
    // The sampled mode shows the path of the queries it leaves out, as most are.
    assert!(
        u64::from(dns_match_sample(CLIENT_PORT, QUERY_ID)) >= dns_match_below(MATCH_EVERY),
        "the crafted query falls in the match sample"
    );
    let costs = measure(
        &[load(true, 1), load(false, 1), load(true, MATCH_EVERY)],
        ROUNDS,
        1,
    );
    let (matching, counting, sampled) = (costs[0], costs[1], costs[2]);
    let mut report = String::from("## Instruction cost per classifier path\n\n");
    let _ = writeln!(
        report,
        "Command: `cargo xtask bench` (any arguments): the kernel object loaded on its own \
         and run through `BPF_PROG_TEST_RUN` on crafted frames, {ROUNDS} runs of each path one \
         at a time, each round also running the empty program `stats_floor_tc`, taken off (the \
         test run's own timing); each figure is the mean of the middle 80 % of its runs, as the \
         test runs' clock ticks in 10 ns here. Caches are hot and a response runs on its \
         query's CPU: this is what the instructions cost, the floor of a packet's cost under \
         load (the tables above), not all of it. It moves by a few nanoseconds between runs \
         where those move by a third, so it compares builds better than they do (the steady state below, better still).\n"
    );
    let _ = writeln!(
        report,
        "| path | ns per run, with latency tracking (default) | counting only (`match_responses = false`) | one query in {MATCH_EVERY} tracked (`match_every = {MATCH_EVERY}`), this one not |\n|---|---|---|---|"
    );
    for (((path, with), without), outside) in PATHS.iter().zip(matching).zip(counting).zip(sampled)
    {
        let _ = writeln!(
            report,
            "| {path} | {with:.1} | {without:.1} | {outside:.1} |"
        );
    }
    report.push('\n');
    report.push_str(&steady_report());
    report
}

/// The steady state: each path run [`REPEAT`] times on one packet in each test run, counting
/// only (to latency tracking a query run again is a retransmission, another path).
fn steady_report() -> String {
    eprintln!("the steady state ({STEADY_ROUNDS} test runs of {REPEAT} runs each, counting only)");
    let [counting] = measure(&[load(false, 1)], STEADY_ROUNDS, REPEAT)[..] else {
        unreachable!("one mode measured")
    };
    let mut report = format!(
        "The same paths in the steady state, counting only: each test run runs its packet \
         {REPEAT} times and the kernel reports their mean, {STEADY_ROUNDS} test runs each, the \
         empty program's taken off as above. The test run's own setup and the first run's \
         cold lines are spread over the {REPEAT} runs, so this is what the instructions cost \
         with every line hot, the lowest figure a packet can cost. Within a run it resolves a \
         few tenths of a nanosecond, and it moves by one or two between runs where the table \
         above moves by several: a change to a path is best measured here, before and after \
         in one sitting.\n\n| path | ns per run, counting only, steady state |\n|---|---|\n"
    );
    for (path, ns) in PATHS.iter().zip(counting) {
        let _ = writeln!(report, "| {path} | {ns:.1} |");
    }
    report.push('\n');
    report
}

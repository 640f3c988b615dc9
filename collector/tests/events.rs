//! The event stream, read the way an operator would: `collector events` as a separate process
//! against a running agent, in a network namespace of the test's own.

mod support;

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    process::Stdio,
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use hickory_proto::{op::ResponseCode, rr::RecordType};
use support::{
    Agent, AgentConfig, COLLECTOR, LISTEN, Netns, Reaped,
    dns::{Client, SERVER, Unbound},
    sample, scrape, stdout_of, wait_for, wait_for_closed,
};

const CONFIG: &str = r#"
[[routes]]
name = "web"
ports = [18080]
type = "https"

[[routes]]
name = "probe"
ports = [18081]
type = "tcp"
"#;

const CONNECTIONS: usize = 20;
/// Connections made before the stream starts: their clients are counted in the kernel's
/// client table, not sent one by one.
const CONNECTIONS_UNSTREAMED: usize = 6;
const QUERIES: usize = 5;
/// Queries made before the stream starts: their names are counted in the kernel's name
/// table, as the streamed ones' are too, and not sent one by one.
const QUERIES_UNSTREAMED: usize = 7;

/// Connects to `port`, sends a byte, reads the answer and closes.
fn round_trip(port: u16) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.write_all(b"x").unwrap();
    let mut byte = [0u8; 1];
    stream.read_exact(&mut byte).unwrap();
}

/// A server answering a byte with a byte, `connections` times.
fn echo_once(listener: TcpListener, connections: usize) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        for _ in 0..connections {
            let (mut stream, _) = listener.accept().unwrap();
            let mut byte = [0u8; 1];
            stream.read_exact(&mut byte).unwrap();
            stream.write_all(&byte).unwrap();
        }
    })
}

/// The fields of each event the test caused.
fn assert_event_details(events: &[serde_json::Value]) {
    let opens: Vec<_> = events
        .iter()
        .filter(|e| e["event"] == "connection-open" && e["routeName"] == "web")
        .collect();
    assert!(
        opens
            .iter()
            .all(|e| e["type"] == "https" && e["clientIp"] == "127.0.0.1")
    );
    // Each close names an open by its connection id, with the open's type and client port
    // (for a reader that joined after the open), and carries the two bytes exchanged.
    for close in events
        .iter()
        .filter(|e| e["event"] == "connection-close" && e["routeName"] == "web")
    {
        assert!(
            opens
                .iter()
                .any(|open| open["connectionId"] == close["connectionId"]
                    && open["type"] == close["type"]
                    && open["clientPort"] == close["clientPort"]
                    && close["clientPort"].as_u64().is_some_and(|port| port > 0)),
            "{close}"
        );
        assert_eq!(close["bytesTransferred"], 2);
        assert!(close["duration"].as_f64().unwrap() > 0.0);
    }
    for query in events.iter().filter(|e| e["event"] == "query-received") {
        assert_eq!(query["domain"], "www.test");
        assert_eq!(query["type"], "A");
        assert_eq!(query["clientIp"], "127.0.0.1");
    }
    for answer in events.iter().filter(|e| e["event"] == "query-answered") {
        // Joined to its query by source (address and port) and id.
        assert!(
            events.iter().any(|query| query["event"] == "query-received"
                && query["source"] == answer["source"]
                && query["id"] == answer["id"]),
            "{answer}"
        );
        assert_eq!(answer["responseCode"], "NOERROR");
        assert_eq!(answer["cached"], true);
        assert!(answer["responseTime"].as_f64().unwrap() > 0.0);
    }
}

/// Wall milliseconds before and after the test's connections, and after its queries.
struct Phases {
    connections: u64,
    queries: u64,
    end: u64,
}

/// Every event of `kinds` lies in `from..to` (wall milliseconds), give or take `slack`: the
/// kernel stamped it when it happened.
fn assert_stamped_within(
    events: &[serde_json::Value],
    kinds: &[&str],
    (from, to): (u64, u64),
    slack: u64,
) {
    let chosen = events
        .iter()
        .filter(|e| e["routeName"] != "probe" && kinds.iter().any(|kind| e["event"] == *kind));
    for event in chosen {
        let stamp = event["timestamp"].as_u64().unwrap();
        assert!(
            stamp + slack >= from && stamp <= to + slack,
            "stamped {stamp}, outside {from}..{to}: {event}"
        );
    }
}

/// Asks `www.test` `times` times.
fn query_www(netns: &Netns, times: usize) {
    netns.run(move || {
        let mut client = Client::new(SERVER);
        for _ in 0..times {
            assert_eq!(
                client.query("www.test.", RecordType::A),
                ResponseCode::NoError
            );
        }
    });
}

/// The top domains count the queries nobody streamed (counted in the kernel's name table)
/// and the streamed ones alike: a snapshot's top domains cover every query its counters show.
fn assert_every_query_in_top_domains(netns: &Netns) {
    let all = QUERIES_UNSTREAMED + QUERIES;
    let json = support::wait_for(
        "a snapshot with every query",
        Duration::from_secs(15),
        || {
            let json = support::dns_json(netns);
            (json["totalQueries"] == all).then_some(json)
        },
    );
    assert_eq!(
        json["topDomains"],
        serde_json::json!([{"domain": "www.test", "count": all, "maxUndercount": 0}])
    );
}

/// The top clients count the connections nobody streamed (counted in the kernel's client
/// table) and the streamed ones alike: every connection the counters show, all of them from
/// 127.0.0.1.
fn assert_every_connection_in_top_ips(netns: &Netns, all: usize) {
    let json = support::proxy_json_counting(netns, all);
    assert_eq!(
        json["topIPs"],
        serde_json::json!([{"ip": "127.0.0.1", "connections": all, "maxUndercount": 0}])
    );
}

/// `collector events` reading the agent in `netns`, its lines parsed, once its stream is
/// subscribed.
struct Tail {
    child: Reaped,
    lines: mpsc::Receiver<serde_json::Value>,
    reader: thread::JoinHandle<()>,
    /// The stream's first line, `start`: what the stream is made of.
    start: serde_json::Value,
    /// What came before the subscription showed (the probes' own left out).
    events: Vec<serde_json::Value>,
    /// Connections made to the route "probe" until one showed.
    probes_made: usize,
}

/// Starts `collector events` against the agent in `netns` (its config has the route "probe"
/// on 18081) and probes that route until a probe shows in the stream.
fn tail_events(netns: &Netns) -> Tail {
    let mut child = Reaped::spawn(
        netns
            .command(COLLECTOR)
            .args(["events", "--listen", LISTEN])
            .stdout(Stdio::piped()),
    );
    let (lines_tx, lines) = mpsc::channel::<serde_json::Value>();
    let stdout = child.stdout().unwrap();
    let reader = thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let line = line.unwrap();
            let event = serde_json::from_str(&line)
                .unwrap_or_else(|err| panic!("not JSON: {line:?}: {err}"));
            if lines_tx.send(event).is_err() {
                break;
            }
        }
    });

    // Probe on a route of its own until the stream is subscribed; its events are left out.
    // The probing thread answers for as long as the test runs.
    let probe = netns.run(|| TcpListener::bind(("127.0.0.1", 18081)).unwrap());
    thread::spawn(move || {
        while let Ok((mut stream, _)) = probe.accept() {
            let mut byte = [0u8; 1];
            if stream.read_exact(&mut byte).is_ok() {
                let _ = stream.write_all(&byte);
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let start = lines
        .recv_timeout(Duration::from_secs(20))
        .expect("the stream's first line");
    assert_eq!(start["event"], "start", "{start}");
    let mut events = Vec::new();
    let mut probes_made = 0;
    'subscribed: loop {
        assert!(Instant::now() < deadline, "the event stream never started");
        netns.run(|| round_trip(18081));
        probes_made += 1;
        while let Ok(event) = lines.recv_timeout(Duration::from_millis(200)) {
            if event["routeName"] == "probe" {
                break 'subscribed;
            }
            events.push(event);
        }
    }
    Tail {
        child,
        lines,
        reader,
        start,
        events,
        probes_made,
    }
}

/// Reads `collector events` from an agent with `config` while the test makes 20 connections
/// and 5 queries (after 6 connections and 7 queries nobody streamed); checks the counts of
/// each kind (`answers`: the answer events expected) and their details, and the top clients
/// and domains, which count both kinds; returns the events with the wall-clock times of the
/// phases.
fn stream_events(config: &AgentConfig, answers: usize) -> (Vec<serde_json::Value>, Phases) {
    let netns = Netns::new();
    let agent = Agent::start(&netns, config);
    let _server = Unbound::start(&netns, false);
    query_www(&netns, QUERIES_UNSTREAMED);
    let web = netns.run(|| TcpListener::bind(("127.0.0.1", 18080)).unwrap());
    let server = echo_once(web, CONNECTIONS_UNSTREAMED + CONNECTIONS);
    for _ in 0..CONNECTIONS_UNSTREAMED {
        netns.run(|| round_trip(18080));
    }
    // Their closes counted before the stream begins: on a loaded machine the last one's may
    // come after the round trip returns.
    wait_for_closed(
        &netns,
        "web",
        u32::try_from(CONNECTIONS_UNSTREAMED).unwrap(),
    );

    let Tail {
        mut child,
        lines,
        reader,
        mut events,
        probes_made,
        ..
    } = tail_events(&netns);

    let connections = support::wall_ms();
    for _ in 0..CONNECTIONS {
        netns.run(|| round_trip(18080));
        thread::sleep(Duration::from_millis(20));
    }
    server.join().unwrap();
    // Every close stamped before the queries' phase begins: the kernel stamps a close before
    // it counts it, and the last one's may come after the round trip returns.
    wait_for_closed(
        &netns,
        "web",
        u32::try_from(CONNECTIONS_UNSTREAMED + CONNECTIONS).unwrap(),
    );
    let queries = support::wall_ms();
    query_www(&netns, QUERIES);
    let end = support::wall_ms();

    // Every web open and close, every query and answer; probes and nothing else beside.
    let count = |events: &[serde_json::Value], kind: &str| {
        events
            .iter()
            .filter(|e| e["event"] == kind && e["routeName"] != "probe")
            .count()
    };
    let expected = [
        ("connection-open", CONNECTIONS),
        ("connection-close", CONNECTIONS),
        ("query-received", QUERIES),
        ("query-answered", answers),
    ];
    let done =
        |events: &[serde_json::Value]| expected.iter().all(|(kind, n)| count(events, kind) >= *n);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done(&events) && Instant::now() < deadline {
        if let Ok(event) = lines.recv_timeout(Duration::from_millis(200)) {
            events.push(event);
        }
    }
    // Anything late would still arrive within a few drain intervals.
    while let Ok(event) = lines.recv_timeout(Duration::from_millis(300)) {
        events.push(event);
    }
    for (kind, n) in expected {
        assert_eq!(count(&events, kind), n, "{kind} events: {events:#?}");
    }
    assert_event_details(&events);
    assert_every_query_in_top_domains(&netns);
    assert_every_connection_in_top_ips(&netns, CONNECTIONS_UNSTREAMED + CONNECTIONS + probes_made);

    // Stopping the agent ends the stream, and `collector events` with it; the stream to its
    // end holds no event more than the 300 ms above saw.
    assert!(agent.stop().success());
    assert!(child.wait().success());
    reader.join().unwrap();
    events.extend(lines.try_iter());
    for (kind, n) in expected {
        assert_eq!(
            count(&events, kind),
            n,
            "{kind} events to the end: {events:#?}"
        );
    }
    let phases = Phases {
        connections,
        queries,
        end,
    };
    (events, phases)
}

/// While someone reads the stream, the top domains stay exact when the ring overflows: the
/// kernel counts every sampled name in its table, and a full ring loses stream lines only.
/// Until 2026-12-02 streamed names went to the ring instead of the table, and those a full
/// ring dropped were lost to the list for the rest of the run.
#[test]
fn top_domains_stay_exact_while_a_stream_overflows_the_ring() {
    /// More than the 2 MiB ring holds with every query's and answer's event (about 120
    /// bytes a query).
    const ASKED: usize = 24_000;
    let netns = Netns::new();
    let config = AgentConfig::new(CONFIG);
    let agent = Agent::start(&netns, &config);
    let _server = Unbound::start(&netns, false);
    let Tail {
        mut child,
        reader,
        lines,
        ..
    } = tail_events(&netns);
    // `www.test` takes a slot while the ring has room.
    netns.run(|| {
        support::stay_on_this_cpu();
        Client::new(SERVER).query("www.test.", RecordType::A)
    });

    // Nothing drains the ring while the agent is stopped; the kernel keeps streaming. From
    // one CPU: `www.test` holds its slot there, or takes it at the first query, while the
    // ring still has room (a name new to a CPU needs its name event through the ring, which
    // a full ring loses).
    agent.pause(true);
    netns.run(|| {
        support::stay_on_this_cpu();
        let mut client = Client::new(SERVER);
        for _ in 0..ASKED {
            assert_eq!(
                client.query("www.test.", RecordType::A),
                ResponseCode::NoError
            );
        }
    });
    agent.pause(false);
    let json = wait_for("every query counted", Duration::from_secs(30), || {
        let json = support::dns_json(&netns);
        (json["totalQueries"] == ASKED + 1).then_some(json)
    });
    let dropped = sample(&scrape(&netns), "collector_dns_events_dropped_total", &[]);
    assert!(
        dropped.is_some_and(|dropped| dropped > 0.0),
        "the ring never filled: {dropped:?}"
    );
    assert_eq!(json["topDomains"][0]["domain"], "www.test", "{json}");
    assert_eq!(json["topDomains"][0]["count"], ASKED + 1, "{json}");
    // Only stream lines were lost: the name's bound stays 0 (since 2026-12-05, when name
    // events lost are counted apart).
    assert_eq!(json["topDomains"][0]["maxUndercount"], 0, "{json}");
    assert_eq!(
        sample(
            &scrape(&netns),
            "collector_bpf_errors_total",
            &[("kind", "dns_name_dropped")]
        ),
        Some(0.0)
    );
    // The stream says where it lost what the full ring dropped: at most that many (the
    // count holds name samples too), and never silently.
    let lost = wait_for(
        "a lost line for the full ring",
        Duration::from_secs(20),
        || {
            lines.try_iter().find_map(|event| {
                (event["event"] == "lost" && event["cause"] == "kernel-ring-full").then(|| {
                    assert_eq!(event["stream"], "dns", "{event}");
                    event["count"].as_f64().unwrap()
                })
            })
        },
    );
    let dropped = dropped.unwrap();
    assert!(
        lost > 0.0 && lost <= dropped,
        "{lost} lost, {dropped} dropped"
    );

    assert!(agent.stop().success());
    let _ = child.wait();
    reader.join().unwrap();
}

/// The connection ring's counterpart: a stream that overflows it loses stream lines only,
/// the kernel counts those apart from the client records the top clients rely on, and the
/// stream says exactly how many it lost. Until 2026-12-05 one counter held both, so every
/// listed client's `maxUndercount` grew by every stream line the ring dropped.
#[test]
fn top_ips_stay_exact_while_a_stream_overflows_the_ring() {
    /// More than the 1 MiB ring holds with an open and a close event a connection (80
    /// bytes each with the record's header).
    const CONNECTED: usize = 10_000;
    let netns = Netns::new();
    let config = AgentConfig::new(CONFIG);
    let agent = Agent::start(&netns, &config);
    let listener = netns.run(|| TcpListener::bind(("127.0.0.1", 18080)).unwrap());
    let server = echo_once(listener, CONNECTED);
    let Tail {
        mut child,
        reader,
        lines,
        probes_made,
        ..
    } = tail_events(&netns);
    // Nothing drains the ring while the agent is stopped; the kernel keeps streaming. From
    // one CPU: 127.0.0.1 takes its client slot at the first connection, while the ring still
    // has room, and every later one counts in place. The server is done before the agent
    // goes on, so that every drop is read by one poll.
    agent.pause(true);
    netns.run(move || {
        support::stay_on_this_cpu();
        for _ in 0..CONNECTED {
            round_trip(18080);
        }
    });
    server.join().unwrap();
    agent.pause(false);
    assert_every_connection_in_top_ips(&netns, probes_made + CONNECTED);
    let dropped = |kind: &str| {
        sample(
            &scrape(&netns),
            "collector_bpf_errors_total",
            &[("kind", kind)],
        )
    };
    assert_eq!(dropped("conn_client_dropped"), Some(0.0));
    // The stream's kernel-ring-full lines add up to exactly what the ring dropped.
    let mut lost = 0.0;
    wait_for(
        "kernel-ring-full lines for every event the ring dropped",
        Duration::from_secs(20),
        || {
            for event in lines.try_iter() {
                if event["event"] == "lost" && event["cause"] == "kernel-ring-full" {
                    assert_eq!(event["stream"], "connections", "{event}");
                    lost += event["count"].as_f64().unwrap();
                }
            }
            (lost > 0.0 && dropped("conn_event_dropped") == Some(lost)).then_some(())
        },
    );

    assert!(agent.stop().success());
    let _ = child.wait();
    reader.join().unwrap();
}

/// Client records that a full ring drops are counted as such, not as stream lines: with
/// nobody streaming, a paused agent and more new clients than the 1 MiB ring holds records
/// of (48 bytes each with the record's header), `conn_client_dropped` counts the records
/// lost and `conn_event_dropped` nothing, and every listed client's bound covers them.
#[test]
fn client_records_a_full_ring_drops_are_counted_apart_from_stream_lines() {
    const CLIENTS: usize = 25_000;
    let netns = Netns::new();
    let config = AgentConfig::new(CONFIG);
    let agent = Agent::start(&netns, &config);
    let listener = netns.run(|| TcpListener::bind(("127.0.0.1", 18081)).unwrap());
    let server = echo_once(listener, CLIENTS);
    agent.pause(true);
    netns.run(|| {
        for i in 0..CLIENTS {
            let [_, high, low] = u32::try_from(i + 256).unwrap().to_be_bytes()[1..] else {
                unreachable!()
            };
            round_trip_from(Ipv4Addr::new(127, 0, high, low), 18081);
        }
    });
    agent.pause(false);
    server.join().unwrap();
    let json = support::proxy_json_counting(&netns, CLIENTS);
    let metrics = scrape(&netns);
    let dropped = |kind: &str| sample(&metrics, "collector_bpf_errors_total", &[("kind", kind)]);
    assert_eq!(
        dropped("conn_event_dropped"),
        Some(0.0),
        "no stream, no line lost"
    );
    let records = dropped("conn_client_dropped").unwrap();
    assert!(records > 0.0, "the ring never filled");
    assert_every_bound_covers(&json["topIPs"], records);
    assert!(agent.stop().success());
}

/// Every entry of a top list (`topIPs`, `topDomains`) may be short by the `dropped`
/// records: any could have been its.
fn assert_every_bound_covers(list: &serde_json::Value, dropped: f64) {
    let list = list.as_array().unwrap();
    assert!(!list.is_empty());
    for entry in list {
        assert!(
            entry["maxUndercount"].as_f64().unwrap() >= dropped,
            "{entry}: {dropped} dropped"
        );
    }
}

/// Name events that a full ring drops are counted as such: with nobody streaming, a paused
/// agent and more new names than the 2 MiB ring holds events of (48 bytes each here with
/// the record's header), `dns_name_dropped` counts them, `collector_dns_events_dropped_total`
/// holds them too, and every listed name's bound covers them.
#[test]
fn name_events_a_full_ring_drops_are_counted_apart_from_stream_lines() {
    const NAMES: usize = 50_000;
    let netns = Netns::new();
    let config = AgentConfig::new(CONFIG);
    let agent = Agent::start(&netns, &config);
    let _server = Unbound::start(&netns, false);
    agent.pause(true);
    netns.run(|| {
        let mut client = Client::new(SERVER);
        for i in 0..NAMES {
            client.query(&format!("n{i}.test."), RecordType::A);
        }
    });
    agent.pause(false);
    let json = wait_for("every query counted", Duration::from_secs(30), || {
        let json = support::dns_json(&netns);
        (json["totalQueries"] == NAMES).then_some(json)
    });
    let metrics = scrape(&netns);
    let names = sample(
        &metrics,
        "collector_bpf_errors_total",
        &[("kind", "dns_name_dropped")],
    )
    .unwrap();
    assert!(names > 0.0, "the ring never filled");
    let all = sample(&metrics, "collector_dns_events_dropped_total", &[]).unwrap();
    assert!(all >= names, "{all} events dropped, {names} of them names");
    assert_every_bound_covers(&json["topDomains"], names);
    assert!(agent.stop().success());
}

#[test]
fn events_prints_every_connection_and_query_at_a_low_rate() {
    let (events, at) = stream_events(&AgentConfig::new(CONFIG), QUERIES);
    let connection_events = ["connection-open", "connection-close"];
    assert_stamped_within(&events, &connection_events, (at.connections, at.queries), 5);
    let dns_events = ["query-received", "query-answered"];
    assert_stamped_within(&events, &dns_events, (at.queries, at.end), 5);
}

/// With `sample_every = 4` the stream holds the queries the kernel's hash of client port and
/// id picks, each with its answer, so that every streamed answer joins its query; and the
/// top domains count them four times.
#[test]
fn a_sampled_query_is_streamed_with_its_answer() {
    const EVERY: u32 = 4;
    const ASKED: u16 = 64;
    let netns = Netns::new();
    let config = AgentConfig::new(&format!("{CONFIG}\n[dns]\nsample_every = {EVERY}\n"));
    let started = support::wall_ms();
    let agent = Agent::start(&netns, &config);
    let ready = support::wall_ms();
    let _server = Unbound::start(&netns, false);
    let Tail {
        mut child,
        lines,
        reader,
        start,
        ..
    } = tail_events(&netns);
    // The first line says what the stream is made of: a reader scales by it.
    assert_eq!(start["sampleEvery"], EVERY, "{start}");
    assert_eq!(start["matchEvery"], 1, "{start}");
    assert_eq!(start["connectionEvents"], true, "{start}");
    assert_eq!(start["dnsEvents"], true, "{start}");
    let run_started = start["runStartedAt"].as_u64().unwrap();
    assert!((started..=ready).contains(&run_started), "{start}");

    let port = netns.run(|| {
        let mut client = Client::new(SERVER);
        for _ in 0..ASKED {
            assert_eq!(
                client.query("www.test.", RecordType::A),
                ResponseCode::NoError
            );
        }
        client.port()
    });
    let below = collector_common::dns_match_below(EVERY);
    let picked: Vec<u64> = (1..=ASKED)
        .filter(|&id| u64::from(collector_common::dns_name_sample(port, id)) < below)
        .map(u64::from)
        .collect();
    assert!(
        !picked.is_empty() && picked.len() < usize::from(ASKED),
        "a sample, not none or all: {picked:?}"
    );

    let ids_of = |events: &[serde_json::Value], kind: &str| -> Vec<u64> {
        events
            .iter()
            .filter(|e| e["event"] == kind)
            .map(|e| e["id"].as_u64().unwrap())
            .collect()
    };
    let mut events = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while ids_of(&events, "query-answered").len() < picked.len() && Instant::now() < deadline {
        if let Ok(event) = lines.recv_timeout(Duration::from_millis(200)) {
            events.push(event);
        }
    }
    // Anything late would still arrive within a few drain intervals.
    while let Ok(event) = lines.recv_timeout(Duration::from_millis(300)) {
        events.push(event);
    }
    assert_eq!(ids_of(&events, "query-received"), picked, "{events:#?}");
    assert_eq!(ids_of(&events, "query-answered"), picked, "{events:#?}");
    let source = format!("127.0.0.1:{port}");
    assert!(
        events
            .iter()
            .filter(|e| e["event"] == "query-received")
            .all(|e| e["source"] == source.as_str()),
        "{events:#?}"
    );
    let json = wait_for(
        "a snapshot with every query",
        Duration::from_secs(15),
        || {
            let json = support::dns_json(&netns);
            (json["totalQueries"] == ASKED).then_some(json)
        },
    );
    assert_eq!(json["topDomains"][0]["domain"], "www.test");
    assert_eq!(
        json["topDomains"][0]["count"],
        u64::from(EVERY) * u64::try_from(picked.len()).unwrap()
    );

    assert!(agent.stop().success());
    assert!(child.wait().success());
    reader.join().unwrap();
    // The stream to its end: no event more than the 300 ms above saw.
    events.extend(lines.try_iter());
    assert_eq!(ids_of(&events, "query-received"), picked, "{events:#?}");
    assert_eq!(ids_of(&events, "query-answered"), picked, "{events:#?}");
}

/// Without matching there are no answer events, and query events carry the time of the
/// kernel's last tick (4 ms at HZ=250; any kernel's tick is at most 10 ms).
#[test]
fn without_matching_queries_are_streamed_with_the_ticks_time() {
    let config = AgentConfig::new(&format!("{CONFIG}\n[dns]\nmatch_responses = false\n"));
    let (events, at) = stream_events(&config, 0);
    assert_stamped_within(&events, &["query-received"], (at.queries, at.end), 15);
}

#[test]
fn stats_prints_the_agents_figures_as_a_table_and_as_json() {
    let netns = Netns::new();
    let config = AgentConfig::new(CONFIG);
    let agent = Agent::start(&netns, &config);
    let web = netns.run(|| TcpListener::bind(("127.0.0.1", 18080)).unwrap());
    let server = echo_once(web, 3);
    for _ in 0..3 {
        netns.run(|| round_trip(18080));
    }
    server.join().unwrap();
    let stats = |args: &[&str]| {
        support::stdout_of(
            netns
                .command(COLLECTOR)
                .arg("stats")
                .args(args)
                .args(["--listen", LISTEN]),
        )
    };
    let json: serde_json::Value = support::wait_for("3 closes", Duration::from_secs(10), || {
        let json: serde_json::Value = serde_json::from_str(&stats(&["proxy", "--json"])).ok()?;
        (json["routes"][0]["closed"] == 3).then_some(json)
    });
    assert_eq!(json["totalConnections"], 3);
    let table = stats(&["proxy"]);
    let web_line = table
        .lines()
        .find(|line| line.starts_with("web "))
        .unwrap_or_else(|| panic!("{table}"));
    // ROUTE TYPE ACTIVE OPENED CLOSED ...
    assert_eq!(
        web_line.split_whitespace().take(5).collect::<Vec<_>>(),
        ["web", "https", "0", "3", "3"],
        "{table}"
    );
    assert!(stats(&["dns"]).starts_with("queries 0"));
    let top = netns
        .command(COLLECTOR)
        .args(["top", "--once", "--listen", LISTEN])
        .output()
        .unwrap();
    let top = String::from_utf8_lossy(&top.stdout);
    assert!(top.lines().any(|l| l.starts_with("web ")), "{top}");
    assert!(top.contains("queries 0"), "{top}");
    assert!(agent.stop().success());
}

#[test]
fn a_stop_detaches_even_while_a_stream_reader_has_stopped_reading() {
    const ROUND_TRIPS: usize = 20_000;
    let netns = Netns::new();
    let config = AgentConfig::new(CONFIG);
    let agent = Agent::start(&netns, &config);
    let stalled = stalled_reader(&netns);
    // Two events each, about 10 MB of lines: more than the buffers on the way hold.
    let listener = netns.run(|| TcpListener::bind("127.0.0.1:18081").unwrap());
    let server = echo_once(listener, ROUND_TRIPS);
    netns.run(|| (0..ROUND_TRIPS).for_each(|_| round_trip(18081)));
    server.join().unwrap();
    // The reader is behind: the agent's end holds lines it cannot send.
    let reader = stalled.local_addr().unwrap();
    wait_for(
        "lines waiting in the agent's end of the stalled reader's connection",
        Duration::from_secs(10),
        || {
            let end = support::agents_end(&netns, reader);
            // State Recv-Q Send-Q Local Peer [users]: Send-Q third
            let unsent: u64 = end.split_whitespace().nth(2)?.parse().ok()?;
            (unsent > 0).then_some(())
        },
    );

    let status = agent.stop_within(libc::SIGTERM, Duration::from_secs(15));
    assert!(
        status.is_some_and(|status| status.success()),
        "the agent did not stop within 15 s: {status:?}"
    );
    support::assert_no_pins(&config.pin_dir);
    drop(stalled);
}

/// The agent's own end of its connection from `client`, copied into this process
/// (`pidfd_getfd`, which root may use on any process): socket options set on the sockets the
/// agent accepts can be read only there.
fn agents_socket(netns: &Netns, agent: &Agent, client: SocketAddr) -> OwnedFd {
    let sockets = support::agents_end(netns, client);
    // users:(("collector",pid=1234,fd=12))
    let fd: i32 = sockets
        .split("fd=")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|fd| fd.parse().ok())
        .unwrap_or_else(|| panic!("no agent socket for {client} in {sockets:?}"));
    let pid = libc::pid_t::try_from(agent.pid()).unwrap();
    // SAFETY: pidfd_open has no memory arguments; the descriptor it returns is ours.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    assert!(
        pidfd >= 0,
        "pidfd_open: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: a descriptor just opened, owned by nothing else.
    let pidfd = unsafe { OwnedFd::from_raw_fd(i32::try_from(pidfd).unwrap()) };
    // SAFETY: as above; the copy is a new descriptor of this process.
    let copy = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
    assert!(
        copy >= 0,
        "pidfd_getfd: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: as above.
    unsafe { OwnedFd::from_raw_fd(i32::try_from(copy).unwrap()) }
}

#[test]
fn an_idle_stream_carries_heartbeats_and_the_agents_socket_times_out_unacknowledged_data() {
    // The agent's `event_stream::HEARTBEAT_INTERVAL` and `serve::UNACKNOWLEDGED_TIMEOUT`.
    const HEARTBEAT: Duration = Duration::from_secs(15);
    const UNACKNOWLEDGED: Duration = Duration::from_mins(1);
    let netns = Netns::new();
    let config = AgentConfig::new(CONFIG);
    let agent = Agent::start(&netns, &config);
    // No traffic on the routes and no DNS: nothing to stream but heartbeats.
    let stream = netns.run(|| {
        let mut stream = TcpStream::connect(LISTEN).unwrap();
        ask_for_events(&mut stream);
        stream
    });
    // A reader lost without a word leaves the heartbeat unacknowledged, and the kernel then
    // gives its connection up, the stream permit with it.
    let socket = agents_socket(&netns, &agent, stream.local_addr().unwrap());
    assert_eq!(
        socket2::SockRef::from(&socket).tcp_user_timeout().unwrap(),
        Some(UNACKNOWLEDGED)
    );

    let sent = support::wall_ms();
    let mut stream = stream;
    stream
        .set_read_timeout(Some(HEARTBEAT + Duration::from_secs(10)))
        .unwrap();
    let mut received = Vec::new();
    let line = loop {
        let text = String::from_utf8_lossy(&received);
        // A line of the chunked body: the chunk's size, then the line.
        if let Some(start) = text.find("{\"event\":\"heartbeat\"")
            && let Some(end) = text[start..].find('\n')
        {
            break text[start..start + end].to_owned();
        }
        let mut buf = [0u8; 512];
        match stream.read(&mut buf) {
            Ok(0) => panic!("the stream ended: {text:?}"),
            Ok(read) => received.extend_from_slice(&buf[..read]),
            Err(err) => panic!("no heartbeat within {HEARTBEAT:?} and some: {err}: {text:?}"),
        }
    };
    let heartbeat: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(heartbeat.as_object().unwrap().len(), 2, "{line}");
    let stamped = heartbeat["timestamp"].as_u64().unwrap();
    assert!((sent..=support::wall_ms()).contains(&stamped), "{line}");
    drop(stream);
    assert!(agent.stop().success());
}

/// Asks for the event stream on `stream`, and reads the answer's status: 200.
fn ask_for_events(stream: &mut TcpStream) {
    stream
        .write_all(b"GET /api/v1/events HTTP/1.1\r\nHost: c\r\n\r\n")
        .unwrap();
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
}

/// A reader that takes the answer's head and then nothing more, on a small receive buffer: a
/// tail piped into a pager, or suspended. Subscribed once this returns.
fn stalled_reader(netns: &Netns) -> TcpStream {
    netns.run(|| {
        let socket =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let address: std::net::SocketAddr = LISTEN.parse().unwrap();
        socket.connect(&address.into()).unwrap();
        let mut stream = TcpStream::from(socket);
        ask_for_events(&mut stream);
        stream
    })
}

/// Round trips on the `probe` route while a reader is behind: two events each, about 10 MB
/// of lines, far more than the buffers on the way and the agent's backlog of 16384
/// connection events hold.
const BEHIND_ROUND_TRIPS: usize = 20_000;
/// Round trips from client addresses of their own (127.0.0.2 on), midway, where the reader
/// is sure to lose events: each client taking a slot in the kernel's client table is a ring
/// record that is not a line, and must not count among what a reader lost.
const NEW_CLIENTS: usize = 200;

/// A round trip to `port` from `source`.
fn round_trip_from(source: Ipv4Addr, port: u16) {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.bind(&SocketAddr::from((source, 0)).into()).unwrap();
    socket
        .connect(&SocketAddr::from((Ipv4Addr::LOCALHOST, port)).into())
        .unwrap();
    let mut stream = TcpStream::from(socket);
    stream.write_all(b"x").unwrap();
    let mut byte = [0u8; 1];
    stream.read_exact(&mut byte).unwrap();
}

/// Round trips made before waiting for the agent to take their events: 4,000 records, a
/// fifth of what the kernel's 1 MiB ring holds, so that an agent kept off the CPU for a while
/// on a loaded machine makes the ring drop none.
const BEHIND_BATCH: usize = 2_000;

/// Makes [`BEHIND_ROUND_TRIPS`] round trips on `probe`, in batches, and after each waits
/// until a snapshot counts them all: the poll that counts them has sent their events to the
/// streams (it drains the ring after reading the counters, and the kernel submits an event
/// before it counts). Returns the events sent, checked against the kernel's count of events
/// its ring dropped.
fn round_trips_while_behind(netns: &Netns) -> u64 {
    let listener = netns.run(|| TcpListener::bind("127.0.0.1:18081").unwrap());
    let server = echo_once(listener, BEHIND_ROUND_TRIPS);
    let midway = BEHIND_ROUND_TRIPS / 2;
    let mut metrics = String::new();
    for batch in (0..BEHIND_ROUND_TRIPS).step_by(BEHIND_BATCH) {
        let end = (batch + BEHIND_BATCH).min(BEHIND_ROUND_TRIPS);
        netns.run(move || {
            for i in batch..end {
                match i.checked_sub(midway) {
                    Some(k) if k < NEW_CLIENTS => {
                        let last = u8::try_from(2 + k).unwrap();
                        round_trip_from(Ipv4Addr::new(127, 0, 0, last), 18081);
                    }
                    _ => round_trip(18081),
                }
            }
        });
        metrics = wait_for_closed(netns, "probe", u32::try_from(end).unwrap());
    }
    server.join().unwrap();
    assert_eq!(
        sample(
            &metrics,
            "collector_bpf_errors_total",
            &[("kind", "conn_event_dropped")]
        ),
        Some(0.0),
        "the kernel's ring dropped events: the count sent is not known"
    );
    2 * u64::try_from(BEHIND_ROUND_TRIPS).unwrap()
}

/// `collector_event_stream_lagged_total` of a scrape.
fn lagged_total(netns: &Netns) -> u64 {
    let value = sample(&scrape(netns), "collector_event_stream_lagged_total", &[]).unwrap();
    // Exact: counts well below 2^53.
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "a count"
    )]
    let count = value as u64;
    count
}

/// The lines of an event stream's chunked body read so far, and the rest of the last one.
#[derive(Default)]
struct Lines {
    pending: Vec<u8>,
    events: Vec<serde_json::Value>,
}

impl Lines {
    /// Takes what `read` gave: each chunk of the body is its size, a line, and CRLF.
    fn take(&mut self, read: &[u8]) {
        self.pending.extend_from_slice(read);
        while let Some(end) = self.pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.pending.drain(..=end).collect();
            if line.first() == Some(&b'{') {
                let event = serde_json::from_slice(&line).unwrap_or_else(|err| {
                    panic!("not JSON: {:?}: {err}", String::from_utf8_lossy(&line))
                });
                self.events.push(event);
            }
        }
    }
}

#[test]
fn a_reader_that_fell_behind_reads_how_many_events_it_lost_where_and_they_are_counted() {
    let netns = Netns::new();
    let config = AgentConfig::new(CONFIG);
    let agent = Agent::start(&netns, &config);
    let mut reader = stalled_reader(&netns);
    let sent = round_trips_while_behind(&netns);

    // Reading again, the reader gets every event the stream kept and a line for each gap.
    reader
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut lines = Lines::default();
    let (mut shown, mut lost) = (0, 0);
    // Heartbeats keep a stream that shows nothing more going: a deadline ends the wait.
    let deadline = Instant::now() + Duration::from_mins(1);
    while shown + lost < sent {
        assert!(
            Instant::now() < deadline,
            "{shown} shown and {lost} lost of {sent}"
        );
        let mut buf = vec![0u8; 65536];
        let read = reader
            .read(&mut buf)
            .unwrap_or_else(|err| panic!("{shown} shown and {lost} lost of {sent}: {err}"));
        assert_ne!(read, 0, "the stream ended");
        lines.take(&buf[..read]);
        for event in lines.events.drain(..) {
            match event["event"].as_str().unwrap() {
                "connection-open" | "connection-close" => {
                    assert_eq!(event["routeName"], "probe", "{event}");
                    shown += 1;
                }
                "lost" => {
                    assert_eq!(event["cause"], "reader-behind", "{event}");
                    assert_eq!(event["stream"], "connections", "{event}");
                    lost += event["count"].as_u64().unwrap();
                }
                "start" | "heartbeat" => {}
                other => panic!("unexpected {other}: {event}"),
            }
        }
    }
    // Client records taking table slots midway were lost too, and are not counted.
    assert_eq!(shown + lost, sent, "{shown} shown, {lost} lost");
    assert!(lost > 0, "the reader never fell behind");
    wait_for("the lost events counted", Duration::from_secs(10), || {
        (lagged_total(&netns) == lost).then_some(())
    });
    drop(reader);
    assert!(agent.stop().success());
}

#[test]
fn a_reader_gone_while_behind_still_counts_the_events_it_lost() {
    /// Lines the stream may have written before the reader went, which it counts as sent:
    /// the agent's send buffer (64 KiB at most here), the reader's receive buffer (8 KiB)
    /// and the HTTP server's queue (16 chunks) hold fewer than this many lines of over 100
    /// bytes.
    const IN_BUFFERS: u64 = 2_000;
    let netns = Netns::new();
    netns.run(|| std::fs::write("/proc/sys/net/ipv4/tcp_wmem", "4096 16384 65536").unwrap());
    let config = AgentConfig::new(CONFIG);
    let agent = Agent::start(&netns, &config);
    let reader = stalled_reader(&netns);
    let sent = round_trips_while_behind(&netns);

    // Killed without reading on: its stream never learns how far behind it fell (what it
    // learned while it still took lines is counted already), and ends.
    drop(reader);
    let lagged = wait_for("the lost events counted", Duration::from_secs(10), || {
        let lagged = lagged_total(&netns);
        (lagged >= sent - IN_BUFFERS).then_some(lagged)
    });
    assert!(lagged <= sent, "{lagged} counted lost of {sent}");
    assert!(agent.stop().success());
}

/// A clean stop ends a stream after every event the kernel queued before it: the agent
/// drains its rings once more, and each stream writes what it was sent before it ends.
#[test]
fn a_clean_stop_ends_the_stream_after_every_event_before_it() {
    const ROUND_TRIPS: usize = 300;
    let netns = Netns::new();
    let config = AgentConfig::new(CONFIG);
    let agent = Agent::start(&netns, &config);
    let tail = tail_events(&netns);
    let listener = netns.run(|| TcpListener::bind("127.0.0.1:18080").unwrap());
    let server = echo_once(listener, ROUND_TRIPS);
    netns.run(|| (0..ROUND_TRIPS).for_each(|_| round_trip(18080)));
    server.join().unwrap();
    // Every close counted in the kernel, read from the pins (which drains no ring): on a
    // loaded machine the last close may come after its round trip returns, and after the
    // stop's last drain.
    wait_for("every close in the kernel", Duration::from_secs(10), || {
        let rows = support::collector_json(
            &config,
            &["maps", "dump", collector_common::map_names::CONN_COUNTERS],
        );
        let web = rows.as_array()?.iter().find(|row| row["route"] == "web")?;
        (web["closed"].as_u64()? == ROUND_TRIPS as u64).then_some(())
    });
    // At once: the last connections' events are still in the kernel's ring.
    let status = agent.stop_within(libc::SIGTERM, Duration::from_secs(15));
    assert!(
        status.is_some_and(|status| status.success()),
        "the agent did not stop within 15 s: {status:?}"
    );
    let Tail {
        mut child,
        lines,
        reader,
        mut events,
        ..
    } = tail;
    // Until the CLI ends with the stream.
    while let Ok(event) = lines.recv_timeout(Duration::from_secs(20)) {
        events.push(event);
    }
    reader.join().unwrap();
    assert!(child.wait().success());
    // Its last line says the agent ended it.
    assert_eq!(
        events.last().map(|event| &event["event"]),
        Some(&"end".into())
    );
    let count = |kind: &str| {
        events
            .iter()
            .filter(|event| event["event"] == kind && event["routeName"] == "web")
            .count()
    };
    assert_eq!(
        (count("connection-open"), count("connection-close")),
        (ROUND_TRIPS, ROUND_TRIPS)
    );
    support::assert_no_pins(&config.pin_dir);
}

/// What the kernel's full ring dropped after the last poll is said at a clean stop, before the
/// stream's end: with a poll a minute, a stop used to end the stream with up to a minute of
/// drops unsaid, and `collector events` exited 0 on the gap. Every query asks a name new to
/// the agent, whose name event the full ring drops too: those are no lines, and until
/// 2026-12-05 they were said lost with them.
#[test]
fn a_clean_stop_says_what_the_full_ring_dropped_since_the_last_poll() {
    /// More than the 2 MiB ring holds with every query's and answer's event (about 120
    /// bytes a query).
    const ASKED: usize = 24_000;
    let netns = Netns::new();
    let config = AgentConfig::polling_every(CONFIG, 60_000);
    let agent = Agent::start(&netns, &config);
    let _server = Unbound::start(&netns, false);
    let Tail {
        mut child,
        reader,
        lines,
        mut events,
        ..
    } = tail_events(&netns);
    // Nothing drains the ring while the agent is stopped, and no poll reads the drops
    // before the stop: it comes at once, and the next poll is a minute away.
    agent.pause(true);
    netns.run(|| {
        let mut client = Client::new(SERVER);
        for n in 0..ASKED {
            assert_eq!(
                client.query(&format!("n{n}.test."), RecordType::A),
                ResponseCode::NXDomain
            );
        }
    });
    agent.pause(false);
    assert!(agent.stop().success());
    while let Ok(event) = lines.recv_timeout(Duration::from_secs(20)) {
        events.push(event);
    }
    reader.join().unwrap();
    assert!(child.wait().success());
    assert_eq!(
        events.last().map(|event| &event["event"]),
        Some(&"end".into())
    );
    let (mut shown, mut behind, mut dropped) = (0, 0, 0);
    for event in &events {
        match event["event"].as_str().unwrap() {
            "query-received" | "query-answered" => shown += 1,
            "lost" => {
                assert_eq!(event["stream"], "dns", "{event}");
                let count = event["count"].as_u64().unwrap();
                match event["cause"].as_str().unwrap() {
                    "reader-behind" => behind += count,
                    "kernel-ring-full" => dropped += count,
                    other => panic!("cause {other}: {event}"),
                }
            }
            _ => {}
        }
    }
    // Every query and answer is a line, or counted lost: by the reader's backlog, or by the
    // kernel.
    assert!(
        dropped > 0,
        "no kernel-ring-full line: {shown} shown, {behind} behind"
    );
    assert_eq!(
        shown + behind + dropped,
        2 * ASKED as u64,
        "{shown} shown, {behind} behind, {dropped} dropped"
    );
}

/// The kernel's switch for streamed events (one per kind), as the agent holds it: its maps
/// are found through its open descriptors (`map_id` in their fdinfo), by name (the kernel
/// keeps 15 characters).
fn stream_switches(agent: &Agent) -> (u8, u8) {
    let mut switches = (None, None);
    let fdinfo = format!("/proc/{}/fdinfo", agent.pid());
    for entry in std::fs::read_dir(&fdinfo).unwrap().flatten() {
        let Ok(info) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        let Some(id) = info
            .lines()
            .find_map(|line| line.strip_prefix("map_id:"))
            .map(str::trim)
        else {
            continue;
        };
        let shown: serde_json::Value = serde_json::from_str(&stdout_of(
            std::process::Command::new("bpftool").args(["-j", "map", "show", "id", id]),
        ))
        .unwrap();
        let slot = match shown["name"].as_str() {
            Some("DNS_STREAM_WANT") => &mut switches.0,
            Some("CONN_STREAM_WAN") => &mut switches.1,
            _ => continue,
        };
        let value: serde_json::Value = serde_json::from_str(&stdout_of(
            std::process::Command::new("bpftool")
                .args(["-j", "map", "lookup", "id", id, "key", "0", "0", "0", "0"]),
        ))
        .unwrap();
        let byte = value["value"][0].as_str().unwrap().trim_start_matches("0x");
        *slot = Some(u8::from_str_radix(byte, 16).unwrap());
    }
    (
        switches.0.expect("the agent holds no DNS stream switch"),
        switches
            .1
            .expect("the agent holds no connection stream switch"),
    )
}

/// The kernel sends streamed events only while someone reads them: switched on by the first
/// reader, and off as soon as the last one leaves, not at the next poll (a minute here).
#[test]
fn the_kernel_stops_sending_stream_events_when_the_last_reader_leaves() {
    let netns = Netns::new();
    let config = AgentConfig::polling_every(CONFIG, 60_000);
    let agent = Agent::start(&netns, &config);
    assert_eq!(stream_switches(&agent), (0, 0));
    let (first, second) = netns.run(|| {
        let mut first = TcpStream::connect(LISTEN).unwrap();
        ask_for_events(&mut first);
        let mut second = TcpStream::connect(LISTEN).unwrap();
        ask_for_events(&mut second);
        (first, second)
    });
    assert_eq!(stream_switches(&agent), (1, 1));
    // One reader left, and the agent has let its connection go: still on.
    let first_address = first.local_addr().unwrap();
    drop(first);
    wait_for(
        "the agent to let the first reader's connection go",
        Duration::from_secs(10),
        || (!support::agents_end(&netns, first_address).contains("users:")).then_some(()),
    );
    assert_eq!(stream_switches(&agent), (1, 1));
    drop(second);
    wait_for(
        "the stream switches to go off",
        Duration::from_secs(10),
        || (stream_switches(&agent) == (0, 0)).then_some(()),
    );
    assert!(agent.stop().success());
}

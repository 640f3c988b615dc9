//! Privileged integration tests of the DNS statistics: the real agent and kernel programs,
//! a real unbound in a network namespace of each test's own, and a known mix of queries
//! sent by the test, with exact counts.
#![expect(
    clippy::float_cmp,
    reason = "OpenMetrics values are floats; the counts compared are small integers, exact in f64"
)]

mod support;

use std::{
    io::{Read as _, Write as _},
    time::Duration,
};

use collector_common::{DnsNameKeys, dns_match_below, dns_match_sample, map_names};
use hickory_proto::{
    op::ResponseCode,
    rr::{DNSClass, RecordType},
};
use support::{
    Agent, AgentConfig, Netns, assert_no_pins,
    dns::{CLIENT_TIMEOUT, Client, SERVER, UPSTREAM_PORT, Unbound},
    dns_json, sample, scrape, wait_for,
};

/// The DNS section of the agent's config: the default server port 53, the test's upstream.
fn dns_config() -> String {
    format!("[dns]\nports = [53]\nupstream_ports = [{UPSTREAM_PORT}]\n")
}

/// `/api/v1/dns`'s top domains as (domain, count).
fn top_domains(json: &serde_json::Value) -> Vec<(String, u64)> {
    json["topDomains"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["domain"].as_str().unwrap().to_owned(),
                d["count"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// Waits until the agent has counted `responses` responses, and returns its JSON two polls
/// later (what a late count would change, checked unchanged but for its time).
fn dns_after(netns: &Netns, responses: u64) -> serde_json::Value {
    let counted = |json: &serde_json::Value| -> Option<()> {
        // Top domains come from events drained every 50 ms: wait for those too.
        let sampled: u64 = json["topDomains"]
            .as_array()?
            .iter()
            .filter_map(|d| d["count"].as_u64())
            .sum();
        (json["totalResponses"] == responses && sampled == json["totalQueries"].as_u64()?)
            .then_some(())
    };
    let first = wait_for(
        "the agent to count every response",
        Duration::from_secs(10),
        || {
            let json = dns_json(netns);
            counted(&json).map(|()| json)
        },
    );
    support::after_polls(netns, 2);
    let json = dns_json(netns);
    for key in [
        "totalQueries",
        "totalResponses",
        "queryTypeBreakdown",
        "responseCodes",
    ] {
        assert_eq!(
            json[key], first[key],
            "{key} changed after it was reached: {json}"
        );
    }
    json
}

#[test]
fn counts_a_known_query_mix_exactly() {
    let netns = Netns::new();
    let config = AgentConfig::new(&dns_config());
    let started = std::time::Instant::now();
    let agent = Agent::start(&netns, &config);
    let server = Unbound::start(&netns, false);

    netns.run(|| {
        let mut client = Client::new(SERVER);
        let mut ask = |name: &str, qtype: RecordType, times: usize, expect: ResponseCode| {
            for _ in 0..times {
                assert_eq!(client.query(name, qtype), expect, "{name} {qtype}");
            }
        };
        // 300 A: 170 + 100 answered, 20 NXDOMAIN (distinct names), 10 REFUSED.
        ask("www.test.", RecordType::A, 170, ResponseCode::NoError);
        ask("api.test.", RecordType::A, 100, ResponseCode::NoError);
        for i in 0..20 {
            ask(
                &format!("nx{i}.test."),
                RecordType::A,
                1,
                ResponseCode::NXDomain,
            );
        }
        ask("x.refused.test.", RecordType::A, 10, ResponseCode::Refused);
        // Names compare case-insensitively: these 50 count as www.test too.
        ask("www.test.", RecordType::AAAA, 150, ResponseCode::NoError);
        ask("WWW.Test.", RecordType::AAAA, 50, ResponseCode::NoError);
        ask("mail.test.", RecordType::MX, 50, ResponseCode::NoError);
        ask("txt.test.", RecordType::TXT, 25, ResponseCode::NoError);
    });

    let json = dns_after(&netns, 575);
    assert_eq!(json["totalQueries"], 575);
    assert_eq!(
        json["queryTypeBreakdown"],
        serde_json::json!({"A": 300, "AAAA": 200, "MX": 50, "TXT": 25})
    );
    assert_eq!(
        json["responseCodes"],
        serde_json::json!({"NOERROR": 545, "NXDOMAIN": 20, "REFUSED": 10})
    );
    // REFUSED is a server failure to the client; NXDOMAIN is an answer.
    assert_eq!(json["errorRate"], 10.0 / 575.0);
    let top = top_domains(&json);
    assert_eq!(
        top[..5],
        [
            ("www.test".to_owned(), 370),
            ("api.test".to_owned(), 100),
            ("mail.test".to_owned(), 50),
            ("txt.test".to_owned(), 25),
            ("x.refused.test".to_owned(), 10),
        ]
    );
    assert_eq!(top.len(), 25, "the 20 NXDOMAIN names once each: {top:?}");
    assert!(
        top[5..]
            .iter()
            .all(|(name, count)| name.starts_with("nx") && *count == 1)
    );
    // Everything came within the first recent window: the recent list is the same, and
    // reaches back no further than the agent's first poll.
    assert_eq!(json["topDomainsRecent"], json["topDomains"]);
    let recent_seconds = json["topDomainsRecentSeconds"].as_f64().unwrap();
    let running = started.elapsed().as_secs_f64();
    assert!(
        (0.0..running).contains(&recent_seconds),
        "{recent_seconds} s recent, {running} s since the start"
    );

    // Every response matched its query: latency for each, all positive and under the
    // client's timeout.
    assert_eq!(json["matchEvery"], 1);
    assert_eq!(json["latency"]["count"], 575);
    for quantile in ["p50", "p90", "p99"] {
        let seconds = json["latency"][quantile].as_f64().unwrap();
        assert!(
            seconds > 0.0 && seconds < CLIENT_TIMEOUT.as_secs_f64(),
            "{quantile} = {seconds}"
        );
    }
    assert_eq!(json["inFlight"], 0);
    assert_eq!(json["unmatchedResponses"], 0);
    assert_eq!(json["eventsDropped"], 0);
    assert!(
        json["malformed"]
            .as_object()
            .unwrap()
            .values()
            .all(|n| n == 0)
    );
    // No forwarding here: everything is answered locally, which unbound counts as cache hits.
    assert_eq!(json["cacheStats"]["hits"], 575);
    assert_eq!(json["cacheStats"]["misses"], 0);
    let stats = server.stats(&netns);
    assert_eq!(stats["total.num.queries"], 575.0);
    assert_eq!(stats["total.num.cachehits"], 575.0);

    let metrics = scrape(&netns);
    assert_mix_in_metrics(&metrics);
    assert_latency_dump_matches_the_histogram(&config, &metrics);

    assert!(agent.stop().success());
    assert_no_pins(&config.pin_dir);
}

/// An EDNS version the server does not speak gets BADVERS (RFC 6891): the RCODE's upper bits
/// ride in the answer's OPT record and its header reads NOERROR, so the response counts as
/// BADVERS, a failure, and not as NOERROR.
#[test]
fn an_edns_version_the_server_does_not_speak_counts_as_badvers() {
    let netns = Netns::new();
    let config = AgentConfig::new(&dns_config());
    let agent = Agent::start(&netns, &config);
    let _server = Unbound::start(&netns, false);

    netns.run(|| {
        let mut client = Client::new(SERVER);
        for (version, times, expect) in [(1, 7, 16), (0, 5, 0)] {
            for _ in 0..times {
                // 16 is BADVERS (hickory names it BADSIG, TSIG's name for the same code).
                assert_eq!(
                    u16::from(client.query_with_edns_version("www.test.", RecordType::A, version)),
                    expect,
                    "EDNS version {version}"
                );
            }
        }
    });

    let json = dns_after(&netns, 12);
    assert_eq!(
        json["responseCodes"],
        serde_json::json!({"NOERROR": 5, "BADVERS": 7})
    );
    assert_eq!(json["errorRate"], 7.0 / 12.0);
    let metrics = scrape(&netns);
    for (rcode, count) in [
        ("BADVERS", 7.0),
        ("NOERROR", 5.0),
        ("BADCOOKIE", 0.0),
        ("OTHER", 0.0),
    ] {
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
    assert!(agent.stop().success());
    assert_no_pins(&config.pin_dir);
}

/// Queries count by class too: `version.bind` probes in CH, which the server answers itself,
/// beside the IN queries of its zones.
#[test]
fn counts_queries_by_class() {
    let netns = Netns::new();
    let config = AgentConfig::new(&dns_config());
    let agent = Agent::start(&netns, &config);
    let _server = Unbound::start(&netns, false);
    netns.run(|| {
        let mut client = Client::new(SERVER);
        for _ in 0..7 {
            assert_eq!(
                client.query_in_class("version.bind.", RecordType::TXT, DNSClass::CH),
                ResponseCode::NoError
            );
        }
        for _ in 0..5 {
            assert_eq!(
                client.query("www.test.", RecordType::A),
                ResponseCode::NoError
            );
        }
    });

    let json = dns_after(&netns, 12);
    assert_eq!(
        json["queryClassBreakdown"],
        serde_json::json!({"IN": 5, "CH": 7})
    );
    assert_eq!(
        json["queryTypeBreakdown"],
        serde_json::json!({"A": 5, "TXT": 7})
    );
    let metrics = scrape(&netns);
    for (qclass, count) in [
        ("IN", 5.0),
        ("CH", 7.0),
        ("HS", 0.0),
        ("NONE", 0.0),
        ("ANY", 0.0),
        ("OTHER", 0.0),
    ] {
        assert_eq!(
            sample(
                &metrics,
                "collector_dns_query_classes_total",
                &[("qclass", qclass)]
            ),
            Some(count),
            "{qclass}"
        );
    }
    let counters = support::collector_json(&config, &["maps", "dump", map_names::DNS_COUNTERS]);
    assert_eq!(
        counters["queriesByQclass"],
        serde_json::json!({"IN": 5, "CH": 7}),
        "{counters}"
    );
    assert!(agent.stop().success());
    assert_no_pins(&config.pin_dir);
}

/// `maps dump DNS_COUNTERS` shows the latency histogram `/metrics` shows: its buckets named
/// by their upper bound (`lt_1024us`), the empty ones left out.
fn assert_latency_dump_matches_the_histogram(config: &AgentConfig, metrics: &str) {
    let counters = support::collector_json(config, &["maps", "dump", map_names::DNS_COUNTERS]);
    let mut dumped: Vec<(f64, f64)> = counters["latencyBuckets"]
        .as_object()
        .unwrap_or_else(|| panic!("latencyBuckets: {counters}"))
        .iter()
        .map(|(name, count)| {
            let bound = match name.as_str() {
                "longer" => f64::INFINITY,
                name => {
                    let micros = name.strip_prefix("lt_").and_then(|n| n.strip_suffix("us"));
                    micros.and_then(|n| n.parse::<f64>().ok()).unwrap() / 1e6
                }
            };
            (bound, count.as_f64().unwrap())
        })
        .collect();
    dumped.sort_by(|a, b| a.0.total_cmp(&b.0));
    assert_eq!(
        dumped.iter().map(|&(_, n)| n).sum::<f64>(),
        575.0,
        "{counters}"
    );
    // Each bucket dumped is the step of the cumulative histogram at its bound.
    let mut below = 0.0;
    for (bound, count) in dumped {
        below += count;
        let le = metrics
            .lines()
            .filter_map(|line| {
                let rest =
                    line.strip_prefix("collector_dns_response_latency_seconds_bucket{le=\"")?;
                let (le, value) = rest.split_once("\"} ")?;
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().ok()?
                };
                Some((le, value.parse::<f64>().ok()?))
            })
            .find(|&(le, _)| le == bound || ((le - bound) / bound).abs() < 1e-9);
        assert_eq!(le.map(|(_, v)| v), Some(below), "le {bound}: {metrics}");
    }
}

/// The same mix, as `/metrics` shows it.
fn assert_mix_in_metrics(metrics: &str) {
    for (qtype, count) in [
        ("A", 300.0),
        ("AAAA", 200.0),
        ("MX", 50.0),
        ("TXT", 25.0),
        ("NS", 0.0),
    ] {
        assert_eq!(
            sample(metrics, "collector_dns_queries_total", &[("qtype", qtype)]),
            Some(count),
            "{qtype}"
        );
    }
    for (rcode, count) in [
        ("NOERROR", 545.0),
        ("NXDOMAIN", 20.0),
        ("REFUSED", 10.0),
        ("SERVFAIL", 0.0),
    ] {
        assert_eq!(
            sample(
                metrics,
                "collector_dns_responses_total",
                &[("rcode", rcode)]
            ),
            Some(count),
            "{rcode}"
        );
    }
    assert_eq!(
        sample(metrics, "collector_dns_response_latency_seconds_count", &[]),
        Some(575.0)
    );
}

#[test]
fn cache_hits_and_misses_match_the_servers_own_statistics() {
    let netns = Netns::new();
    let config = AgentConfig::new(&dns_config());
    let agent = Agent::start(&netns, &config);
    let server = Unbound::start(&netns, true);
    forwarded_and_local_queries(&netns);

    let json = dns_after(&netns, 30);
    let stats = server.stats(&netns);
    assert_eq!(stats["total.num.queries"], 30.0);
    assert_eq!(
        (
            json["cacheStats"]["hits"].as_f64(),
            json["cacheStats"]["misses"].as_f64()
        ),
        (
            Some(stats["total.num.cachehits"]),
            Some(stats["total.num.cachemiss"])
        ),
        "inferred hits/misses against unbound's own: {stats:?}"
    );
    assert_eq!(json["cacheStats"]["misses"], 5);
    assert_eq!(json["cacheStats"]["hitRate"], 25.0 / 30.0);
    assert_eq!(json["upstreamQueries"], 5);

    assert!(agent.stop().success());
    assert_no_pins(&config.pin_dir);
}

/// 30 A queries to a server that forwards `fwd.example.`: 5 names asked 4 times each (the
/// first goes upstream, a miss; 2 names answer NOERROR, 3 NXDOMAIN), then 10 answered locally.
fn forwarded_and_local_queries(netns: &Netns) {
    netns.run(|| {
        let mut client = Client::new(SERVER);
        for name in ["a", "b", "c", "d", "e"] {
            let expect = if matches!(name, "a" | "b") {
                ResponseCode::NoError
            } else {
                ResponseCode::NXDomain
            };
            for _ in 0..4 {
                assert_eq!(
                    client.query(&format!("{name}.fwd.example."), RecordType::A),
                    expect
                );
            }
        }
        for _ in 0..10 {
            assert_eq!(
                client.query("www.test.", RecordType::A),
                ResponseCode::NoError
            );
        }
    });
}

/// A cached answer for one type of a name, given while an upstream query for another type of
/// that name is outstanding, is a hit; one for the same type is a miss: upstream queries are
/// told apart by name and type. See [`cached_answer_while_asked_upstream`] for how the
/// upstream query comes between the client's query and its answer.
#[test]
fn an_upstream_query_for_another_type_of_the_name_leaves_a_cached_answer_a_hit() {
    let netns = Netns::new();
    let config = AgentConfig::new(&dns_config());
    let agent = Agent::start(&netns, &config);
    let server = Unbound::start(&netns, true);
    // The A goes upstream once (a miss) and is cached.
    netns.run(|| {
        assert_eq!(
            Client::new(SERVER).query(CACHED, RecordType::A),
            ResponseCode::NoError
        );
    });
    dns_after(&netns, 1);

    cached_answer_while_asked_upstream(&netns, &server, RecordType::AAAA, 1);
    let json = dns_after(&netns, 2);
    assert_eq!(json["upstreamQueries"], 2);
    assert_eq!(
        (&json["cacheStats"]["hits"], &json["cacheStats"]["misses"]),
        (&serde_json::json!(1), &serde_json::json!(1)),
        "an upstream AAAA made the cached A's answer a miss: {}",
        json["cacheStats"]
    );
    // The server agrees.
    let stats = server.stats(&netns);
    assert_eq!(
        (stats["total.num.cachehits"], stats["total.num.cachemiss"]),
        (1.0, 1.0),
        "{stats:?}"
    );

    // The same with the A itself asked upstream meanwhile: a miss (the known misreading of
    // something else on the host asking upstream for a name a client waits for; unbound
    // counts a hit). It shows the upstream query did come between query and answer.
    cached_answer_while_asked_upstream(&netns, &server, RecordType::A, 2);
    let json = dns_after(&netns, 3);
    assert_eq!(json["upstreamQueries"], 3);
    assert_eq!(
        (&json["cacheStats"]["hits"], &json["cacheStats"]["misses"]),
        (&serde_json::json!(1), &serde_json::json!(2)),
        "{}",
        json["cacheStats"]
    );

    assert!(agent.stop().success());
    assert_no_pins(&config.pin_dir);
}

/// The name [`an_upstream_query_for_another_type_of_the_name_leaves_a_cached_answer_a_hit`]
/// asks for: it has an A and no AAAA at the upstream.
const CACHED: &str = "a.fwd.example.";

/// A client asks for [`CACHED`] A, which the server has cached, and is answered after
/// something else on the host asked the upstream for `upstream_type` of that name, a query
/// still outstanding when the answer leaves. unbound answers a cached name at once and sends
/// its own upstream queries from a timer after the batch of queries it read, so its own
/// cannot be made to come between the two; here the test asks the upstream itself, which the
/// classifier cannot tell from the server's asking. The server is stopped while the client's
/// query and the upstream query are counted (and the upstream too, so that its query is
/// outstanding), then continued. `before`: the queries, and the upstream queries, counted so
/// far.
fn cached_answer_while_asked_upstream(
    netns: &Netns,
    server: &Unbound,
    upstream_type: RecordType,
    before: u64,
) {
    server.pause_main(true);
    server.pause_upstream(true);
    let (mut client, id) = netns.run(|| {
        let mut client = Client::new(SERVER);
        let id = client.send(CACHED, RecordType::A);
        (client, id)
    });
    wait_for("the client's query", Duration::from_secs(10), || {
        (dns_json(netns)["totalQueries"] == before + 1).then_some(())
    });
    let upstream = format!("127.0.0.1:{UPSTREAM_PORT}");
    let (mut asker, upstream_id) = netns.run(move || {
        let mut asker = Client::new(&upstream);
        let id = asker.send(CACHED, upstream_type);
        (asker, id)
    });
    wait_for("the upstream query", Duration::from_secs(10), || {
        (dns_json(netns)["upstreamQueries"] == before + 1).then_some(())
    });
    server.pause_main(false);
    assert_eq!(client.receive(id), ResponseCode::NoError);
    server.pause_upstream(false);
    assert_eq!(asker.receive(upstream_id), ResponseCode::NoError);
}

#[test]
fn without_response_matching_counts_the_same_and_leaves_matched_figures_out() {
    let netns = Netns::new();
    let config = AgentConfig::new(&format!("{}match_responses = false\n", dns_config()));
    let agent = Agent::start(&netns, &config);
    let server = Unbound::start(&netns, true);
    forwarded_and_local_queries(&netns);

    let json = dns_after(&netns, 30);
    assert_eq!(server.stats(&netns)["total.num.queries"], 30.0);
    assert_eq!(json["matchResponses"], false);
    assert_eq!(json["totalQueries"], 30);
    assert_eq!(json["queryTypeBreakdown"], serde_json::json!({"A": 30}));
    assert_eq!(
        json["responseCodes"],
        serde_json::json!({"NOERROR": 18, "NXDOMAIN": 12})
    );
    assert_eq!(json["upstreamQueries"], 5);
    assert_eq!(json["topDomains"][0]["domain"], "www.test");
    assert_eq!(json["topDomains"][0]["count"], 10);
    // Absent, not zero: a zero hit rate or latency would read as a measurement.
    let reported: Vec<&str> = [
        "matchEvery",
        "cacheStats",
        "latency",
        "inFlight",
        "unansweredQueries",
        "unmatchedResponses",
    ]
    .into_iter()
    .filter(|key| !json[*key].is_null())
    .collect();
    assert!(
        reported.is_empty(),
        "reported without matching: {reported:?}"
    );

    let metrics = scrape(&netns);
    assert_eq!(
        sample(&metrics, "collector_dns_upstream_queries_total", &[]),
        Some(5.0)
    );
    for absent in [
        "collector_dns_match_sample_ratio",
        "collector_dns_response_latency_seconds_count",
        "collector_dns_cache_hits_total",
        "collector_dns_queries_in_flight",
        "collector_dns_queries_unanswered_total",
    ] {
        assert_eq!(sample(&metrics, absent, &[]), None, "{absent}");
    }
    assert_eq!(
        sample(
            &metrics,
            "collector_bpf_map_entries",
            &[("map", map_names::DNS_INFLIGHT)]
        ),
        None
    );

    // In the kernel: every query counted as unmatched, nothing matched, no upstream name
    // stamped (with matching on, the 5 forwarded names would be).
    let counters = support::collector_json(&config, &["maps", "dump", map_names::DNS_COUNTERS]);
    assert_eq!(counters["queriesUnmatched"], 30, "{counters}");
    assert_eq!(counters["answered"], 0);
    assert_eq!(counters["cacheHits"], 0);
    // Every stamp ever written (`maps list` counts only the last 10 s's).
    let upstream = support::collector_json(&config, &["maps", "dump", map_names::DNS_UPSTREAM]);
    assert_eq!(upstream, serde_json::json!([]), "{upstream}");

    assert!(agent.stop().success());
    assert_no_pins(&config.pin_dir);
}

#[test]
fn with_dns_off_the_shared_classifier_counts_tcp_and_no_dns() {
    const CONNECTIONS: u32 = 5;
    let netns = Netns::new();
    let config = AgentConfig::new(
        "[[routes]]\nname = \"web\"\nports = [18080]\ntype = \"http\"\n\n[dns]\nenabled = false\n",
    );
    let agent = Agent::start(&netns, &config);
    let server = Unbound::start(&netns, false);
    netns.run(|| {
        let mut client = Client::new(SERVER);
        for _ in 0..20 {
            assert_eq!(
                client.query("www.test.", RecordType::A),
                ResponseCode::NoError
            );
        }
        let listener = std::net::TcpListener::bind(("127.0.0.1", 18080)).unwrap();
        for _ in 0..CONNECTIONS {
            let mut stream = std::net::TcpStream::connect(("127.0.0.1", 18080)).unwrap();
            stream.write_all(b"x").unwrap();
            let (mut accepted, _) = listener.accept().unwrap();
            let mut byte = [0u8; 1];
            accepted.read_exact(&mut byte).unwrap();
        }
    });
    assert_eq!(server.stats(&netns)["total.num.queries"], 20.0);

    // The same classifier counted the TCP payload on the route, one byte a connection...
    let metrics = support::wait_for_closed(&netns, "web", CONNECTIONS);
    support::assert_live_bytes(
        sample(
            &metrics,
            "collector_proxy_traffic_payload_bytes_total",
            &[("route", "web"), ("direction", "in")],
        ),
        (CONNECTIONS as usize, 1),
        support::retransmitted_segments(&[&netns]),
        "web in",
    );
    // ...and left DNS out: nothing in the kernel's DNS counters, no DNS families served.
    let counters = support::collector_json(&config, &["maps", "dump", map_names::DNS_COUNTERS]);
    assert_eq!(
        counters["queriesByQtype"],
        serde_json::json!({}),
        "{counters}"
    );
    assert_eq!(
        counters["responsesByRcode"],
        serde_json::json!({}),
        "{counters}"
    );
    assert_eq!(counters["malformed"], serde_json::json!({}), "{counters}");
    assert_eq!(
        sample(&metrics, "collector_dns_queries_total", &[("qtype", "A")]),
        None
    );
    // The in-flight table's figures too: absent, not a measured 0.
    for family in [
        "collector_bpf_map_entries",
        "collector_bpf_map_entries_limit",
    ] {
        assert_eq!(
            sample(&metrics, family, &[("map", "DNS_INFLIGHT")]),
            None,
            "{family}"
        );
    }
    let json = dns_json(&netns);
    assert_eq!(json["enabled"], false);
    for field in ["inFlight", "unansweredQueries", "cacheStats", "latency"] {
        assert!(json[field].is_null(), "{field}: {json}");
    }

    assert!(agent.stop().success());
    assert_no_pins(&config.pin_dir);
}

#[test]
fn an_event_overload_drops_events_and_no_counts() {
    // More queries than the 2 MiB ring holds records for: a name event with these names
    // takes 48 to 56 bytes of ring, so about 40,000 fill it.
    const QUERIES: u64 = 50_000;
    const MORE: u64 = 10;
    let netns = Netns::new();
    let config = AgentConfig::new(&dns_config());
    let agent = Agent::start(&netns, &config);
    let _server = Unbound::start(&netns, false);
    // A stalled agent drains nothing. Names asked again and again are counted in the
    // kernel's name table, not sent per query: nothing is lost, and the top list is exact.
    // (These two names hash to different slots; names sharing a slot would take it from each
    // other at every query, each time with an event.)
    agent.pause(true);
    netns.run(|| {
        let mut client = Client::new(SERVER);
        for i in 0..QUERIES {
            let name = if i % 2 == 0 { "www.test." } else { "api.test." };
            assert_eq!(client.query(name, RecordType::A), ResponseCode::NoError);
        }
    });
    agent.pause(false);
    let json = wait_for("the agent to catch up", Duration::from_secs(10), || {
        let json = dns_json(&netns);
        (json["totalResponses"] == QUERIES).then_some(json)
    });
    assert_eq!(json["eventsDropped"], 0, "{json}");
    let half = QUERIES / 2;
    assert_eq!(
        top_domains(&json),
        [("api.test".to_owned(), half), ("www.test".to_owned(), half)]
    );

    // More of the two, counted in their slots with the agent stalled; then names never asked
    // twice each take a slot and go to the ring, which overflows. The two names' slots are
    // taken from them early on: their final counts travel in those events.
    agent.pause(true);
    netns.run(|| {
        let mut client = Client::new(SERVER);
        for name in ["www.test.", "api.test."] {
            for _ in 0..MORE {
                assert_eq!(client.query(name, RecordType::A), ResponseCode::NoError);
            }
        }
        for i in 0..QUERIES {
            let name = format!("u{i}.test.");
            assert_eq!(client.query(&name, RecordType::A), ResponseCode::NXDomain);
        }
    });
    agent.pause(false);
    let all = 2 * QUERIES + 2 * MORE;
    let json = wait_for("the agent to catch up", Duration::from_secs(10), || {
        let json = dns_json(&netns);
        (json["totalResponses"] == all).then_some(json)
    });
    let dropped = json["eventsDropped"].as_u64().unwrap();
    assert!(dropped > 0, "no events dropped: {json}");
    // Every counter is exact whatever the events did.
    assert_eq!(json["totalQueries"], all);
    assert_eq!(json["queryTypeBreakdown"]["A"], all);
    assert_eq!(json["responseCodes"]["NOERROR"], QUERIES + 2 * MORE);
    assert_eq!(json["responseCodes"]["NXDOMAIN"], QUERIES);
    assert_eq!(json["latency"]["count"], all);
    assert_eq!(json["cacheStats"]["hits"], all);
    // The two names' counts were handed over as new names took their slots (or stayed in
    // them when the ring had no room for the newcomer): still exact.
    // (The single names behind them outnumber the tracked set: their counts are estimates.)
    assert_eq!(
        top_domains(&json)[..2],
        [
            ("api.test".to_owned(), half + MORE),
            ("www.test".to_owned(), half + MORE)
        ]
    );
    let metrics = scrape(&netns);
    assert_eq!(
        sample(&metrics, "collector_dns_events_dropped_total", &[]),
        Some(f64::from(u32::try_from(dropped).unwrap()))
    );
    assert!(agent.stop().success());
    assert_no_pins(&config.pin_dir);
}

/// With `match_every = 4`, exactly the queries whose hash falls in the sample are matched
/// (the test computes which, from its own port and ids), every query and
/// response is still counted, and no response outside the sample counts as unmatched.
#[test]
fn matching_one_query_in_four_matches_exactly_the_sampled_flows() {
    const QUERIES: u16 = 400;
    let netns = Netns::new();
    let config = AgentConfig::new(&format!("{}match_every = 4\n", dns_config()));
    let agent = Agent::start(&netns, &config);
    let _server = Unbound::start(&netns, false);
    let port = ask(&netns, SERVER, QUERIES);
    let matched = (0..QUERIES)
        .filter(|&id| u64::from(dns_match_sample(port, id)) < dns_match_below(4))
        .count();
    let matched = u32::try_from(matched).unwrap();
    // About a quarter; neither none nor all, or the test could not tell.
    assert!(
        (60..140).contains(&matched),
        "{matched} of {QUERIES} in the sample"
    );

    let json = dns_after(&netns, u64::from(QUERIES));
    assert_eq!(json["totalQueries"], QUERIES);
    assert_eq!(json["matchEvery"], 4);
    assert_eq!(json["latency"]["count"], matched);
    assert_eq!(json["cacheStats"]["hits"], matched);
    assert_eq!(json["cacheStats"]["misses"], 0);
    assert_eq!(json["unmatchedResponses"], 0);
    assert_eq!(json["inFlight"], 0);
    let metrics = scrape(&netns);
    assert_eq!(
        sample(&metrics, "collector_dns_match_sample_ratio", &[]),
        Some(0.25)
    );
    assert_eq!(
        sample(
            &metrics,
            "collector_dns_response_latency_seconds_count",
            &[]
        ),
        Some(f64::from(matched))
    );

    assert!(agent.stop().success());
    assert_no_pins(&config.pin_dir);
}

/// Queries nobody answers read as unanswered at once (`unansweredRate`), and are in flight
/// until the answer timeout, then no more: the gauge and the table's fill come from the
/// in-flight table itself, where a given-up query stays until a query of its set comes
/// (minutes, at a few queries a second).
#[test]
fn queries_nobody_answers_read_unanswered_at_once_and_leave_the_in_flight_gauge() {
    const QUERIES: u16 = 12;
    let netns = Netns::new();
    let config = AgentConfig::new(&dns_config());
    let agent = Agent::start(&netns, &config);
    // No server on port 53: each query is counted, and nothing answers it.
    netns.run(|| {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        for id in 0..QUERIES {
            socket.send_to(&www_test_query(id), SERVER).unwrap();
        }
    });
    let in_flight = || dns_json(&netns)["inFlight"].as_u64();
    wait_for("the queries in flight", Duration::from_secs(15), || {
        (in_flight() == Some(u64::from(QUERIES))).then_some(())
    });
    // The timely figure says so at once; the count of queries given up waits for their slots.
    // (The poll reads the table after the counters: a snapshot may hold the queries there
    // only.)
    let json = wait_for("the queries counted", Duration::from_secs(15), || {
        let json = dns_json(&netns);
        (json["totalQueries"] == u64::from(QUERIES)).then_some(json)
    });
    assert_eq!(json["unansweredRate"], 1.0, "{json}");
    assert_eq!(json["unansweredQueries"], 0, "{json}");
    // The queries' arrival moved to now in the pinned table, so that a slow machine's waits
    // above leave the checks below within their 10 s; then moved back past them.
    move_arrivals(&config, &|_| support::monotonic_ns());
    // `collector maps` reads the pinned table the same way.
    let maps = |args: &[&str]| -> serde_json::Value {
        serde_json::from_str(&support::stdout_of(
            std::process::Command::new(support::COLLECTOR)
                .args(["maps"])
                .args(args)
                .arg("--config")
                .arg(&config.path)
                .arg("--json"),
        ))
        .unwrap()
    };
    let in_use = || {
        maps(&["list"])
            .as_array()
            .unwrap()
            .iter()
            .find(|row| row["name"] == map_names::DNS_INFLIGHT)
            .unwrap()["inUse"]
            .clone()
    };
    let given_up = || -> Vec<serde_json::Value> {
        maps(&["dump", map_names::DNS_INFLIGHT])
            .as_array()
            .unwrap()
            .iter()
            .map(|row| row["givenUp"].clone())
            .collect()
    };
    assert_eq!(in_use(), u64::from(QUERIES));
    assert_eq!(
        given_up(),
        vec![serde_json::Value::Bool(false); QUERIES.into()]
    );

    // Eleven seconds on: their arrival moved back past the 10 s timeout.
    move_arrivals(&config, &|start| start - 11_000_000_000);
    wait_for("no query in flight", Duration::from_secs(15), || {
        (in_flight() == Some(0)).then_some(())
    });
    // Until 2026-12-03 `maps list` counted these as in use till a query of their set came.
    assert_eq!(in_use(), 0);
    assert_eq!(
        given_up(),
        vec![serde_json::Value::Bool(true); QUERIES.into()]
    );
    assert_eq!(
        sample(
            &scrape(&netns),
            "collector_bpf_map_entries",
            &[("map", map_names::DNS_INFLIGHT)]
        ),
        Some(0.0)
    );
    // A server comes and answers four more: 12 of the minute's 16 queries are unanswered.
    // (After the checks above, which must come within the queries' 10 s.)
    let server = answer(&netns, SERVER, 4);
    ask(&netns, SERVER, 4);
    server.join().unwrap();
    let json = wait_for("the four answers", Duration::from_secs(15), || {
        let json = dns_json(&netns);
        (json["totalResponses"] == 4).then_some(json)
    });
    assert_eq!(json["totalQueries"], u64::from(QUERIES) + 4, "{json}");
    assert_eq!(json["unansweredRate"], 0.75, "{json}");
    assert!(agent.stop().success());
    assert_no_pins(&config.pin_dir);
}

/// Moves the arrival of every query waiting in `config`'s pinned in-flight table to `to` of
/// it, its question tag kept.
fn move_arrivals(config: &AgentConfig, to: &dyn Fn(u64) -> u64) {
    let pin = config.pin_dir.join("v1").join(map_names::DNS_INFLIGHT);
    let mut table: aya::maps::Array<_, collector_common::DnsInFlight> = aya::maps::Array::try_from(
        aya::maps::Map::Array(aya::maps::MapData::from_pin(&pin).unwrap()),
    )
    .unwrap();
    for slot in 0..table.len() {
        let mut entry = table.get(&slot, 0).unwrap();
        if entry.start_ns != 0 {
            let tag = entry.start_ns & collector_common::DNS_QUESTION_TAG_MASK;
            entry.start_ns = (to(entry.start_ns) & !collector_common::DNS_QUESTION_TAG_MASK) | tag;
            table.set(slot, entry, 0).unwrap();
        }
    }
}

/// Queries given up without an answer count in the JSON's latency quantiles, at the 10 s
/// they waited at the least, beside the answers (`givenUp`): four queries nobody answers,
/// given up when four answered queries of their set take their slots back. Until
/// 2026-12-07 the quantiles were of the answers alone, and a server answering a third of
/// its queries after 10 s showed only its fast answers there.
#[test]
fn queries_given_up_count_in_the_latency_quantiles_at_ten_seconds() {
    let netns = Netns::new();
    let config = AgentConfig::new(&dns_config());
    let agent = Agent::start(&netns, &config);
    let socket = netns.run(|| std::net::UdpSocket::bind("127.0.0.1:0").unwrap());
    socket.set_read_timeout(Some(CLIENT_TIMEOUT)).unwrap();
    let port = socket.local_addr().unwrap().port();
    // The client as the kernel maps it: 127.0.0.1 as ::ffff:127.0.0.1.
    let client = collector_common::client_fingerprint(&[
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 127, 0, 0, 1,
    ]);
    let bits = collector_common::dns_inflight_bits(collector_common::DNS_INFLIGHT_SLOTS);
    let set = |id| collector_common::dns_inflight_set(client, port, id, bits);
    let ways = collector_common::DNS_INFLIGHT_WAYS as usize;
    let ids: Vec<u16> = (1..=u16::MAX)
        .filter(|&id| set(id) == set(1))
        .take(2 * ways)
        .collect();
    // Nothing answers on port 53 yet: the first four wait in their set's four ways.
    for &id in &ids[..ways] {
        socket.send_to(&www_test_query(id), SERVER).unwrap();
    }
    wait_for("the queries in flight", Duration::from_secs(15), || {
        (dns_json(&netns)["inFlight"] == ways).then_some(())
    });
    move_arrivals(&config, &|start| start - 11_000_000_000);
    let server = answer(&netns, SERVER, ways);
    for &id in &ids[ways..] {
        socket.send_to(&www_test_query(id), SERVER).unwrap();
        let mut message = [0u8; 512];
        let (len, _) = socket.recv_from(&mut message).unwrap();
        assert!(
            len > 12 && message[..2] == id.to_be_bytes(),
            "answer to {id}"
        );
    }
    server.join().unwrap();
    let json = wait_for("the answers", Duration::from_secs(15), || {
        let json = dns_json(&netns);
        (json["totalResponses"] == ways).then_some(json)
    });
    let latency = &json["latency"];
    assert_eq!(json["unansweredQueries"], ways, "{json}");
    assert_eq!(latency["count"], ways, "{latency}");
    assert_eq!(latency["givenUp"], ways, "{latency}");
    // Half answered on loopback, half given up.
    let p50 = latency["p50"].as_f64().unwrap();
    assert!(p50 > 0.0 && p50 < CLIENT_TIMEOUT.as_secs_f64(), "{latency}");
    assert_eq!(latency["p90"], 10.0, "{latency}");
    assert_eq!(latency["p99"], 10.0, "{latency}");
    assert!(latency["mean"].as_f64().unwrap() < CLIENT_TIMEOUT.as_secs_f64());
    assert!(agent.stop().success());
    assert_no_pins(&config.pin_dir);
}

/// `[dns] in_flight_slots` sizes the kernel's in-flight table: five queries whose ids share a
/// set of a 256-slot table (and a set each of the default's) take its four ways, and the fifth
/// goes untracked, and `collector maps` reads them in that table. A start after a crash under
/// the default size replaces the table alone, saying why (as `collector check` said it would),
/// and counts on.
#[test]
fn the_in_flight_table_takes_its_configured_size_and_a_resize_replaces_it_alone() {
    const SMALL: u32 = 256;
    let netns = Netns::new();
    let small = AgentConfig::new(&format!("{}in_flight_slots = {SMALL}\n", dns_config()));
    let agent = Agent::start(&netns, &small);
    let socket = netns.run(|| std::net::UdpSocket::bind("127.0.0.1:0").unwrap());
    let port = socket.local_addr().unwrap().port();
    // The client as the kernel maps it: 127.0.0.1 as ::ffff:127.0.0.1.
    let client = collector_common::client_fingerprint(&[
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 127, 0, 0, 1,
    ]);
    let ways = collector_common::DNS_INFLIGHT_WAYS as usize;
    let (ids, first_slot) = ids_sharing_a_set(client, port, SMALL, ways + 1);
    // Nothing answers on port 53: the queries wait.
    for &id in &ids {
        socket.send_to(&www_test_query(id), SERVER).unwrap();
    }
    let json = wait_for("the queries counted", Duration::from_secs(15), || {
        let json = dns_json(&netns);
        (json["totalQueries"] == ids.len() && json["inFlight"] == ways).then_some(json)
    });
    let metrics = scrape(&netns);
    let value = |name, labels: &[(&str, &str)]| sample(&metrics, name, labels);
    assert_eq!(
        value("collector_dns_queries_untracked_total", &[]),
        Some(1.0),
        "{json}\n{metrics}"
    );
    assert_eq!(
        value(
            "collector_bpf_map_entries_limit",
            &[("map", map_names::DNS_INFLIGHT)]
        ),
        Some(f64::from(SMALL))
    );
    assert_eq!(
        value(
            "collector_bpf_map_entries",
            &[("map", map_names::DNS_INFLIGHT)]
        ),
        Some(f64::from(collector_common::DNS_INFLIGHT_WAYS))
    );
    agent.kill();

    // The first four took the set's ways; the fifth found none.
    assert_maps_read_the_crashed_table(&small, SMALL, &ids[..ways], first_slot);

    // `collector check` says what a start does with the table, before it does.
    let pin_dir_line = || support::check_line(&netns, &small.path, &[], "pin_dir");
    let (passed, line) = pin_dir_line();
    assert!(
        passed && line.starts_with("pass") && line.contains("whose counters `run` takes over"),
        "{line}"
    );
    // The default size after the crash: the table is replaced, the counters kept.
    let text = std::fs::read_to_string(&small.path).unwrap();
    let setting = format!("in_flight_slots = {SMALL}\n");
    assert!(text.contains(&setting), "{text}");
    std::fs::write(&small.path, text.replace(&setting, "")).unwrap();
    let reason = format!(
        "sized {SMALL} slots, where this start gives it {} ([dns] in_flight_slots)",
        collector_common::DNS_INFLIGHT_SLOTS
    );
    let replaced = format!("DNS_INFLIGHT {reason}");
    let (passed, line) = pin_dir_line();
    assert!(
        passed
            && line.starts_with("warn")
            && line.contains("whose counters `run` takes over; it replaces these maps")
            && line.contains(&format!(": {replaced}")),
        "{line}"
    );
    let logs = support::ScratchDir::new("in-flight-resized");
    let log = logs.path("agent.log");
    let agent = Agent::start_logging(&netns, &small, &[], &log);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.lines()
            .any(|line| line.contains(" WARN ") && line.contains(&replaced)),
        "{text}"
    );
    let metrics = scrape(&netns);
    assert_eq!(
        sample(&metrics, "collector_dns_queries_untracked_total", &[]),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        sample(
            &metrics,
            "collector_bpf_map_entries_limit",
            &[("map", map_names::DNS_INFLIGHT)]
        ),
        Some(f64::from(collector_common::DNS_INFLIGHT_SLOTS))
    );
    assert_eq!(dns_json(&netns)["totalQueries"], ids.len(), "kept");
    assert!(agent.stop().success());
    assert_no_pins(&small.pin_dir);
}

/// `count` query ids from the client's `port` that share one set of an in-flight table of
/// `slots` slots, each in a set of its own in the default's table (so that all would be
/// tracked there), and the first slot of their shared set.
fn ids_sharing_a_set(client: u32, port: u16, slots: u32, count: usize) -> (Vec<u16>, u64) {
    let set_of = |id, size| {
        collector_common::dns_inflight_set(
            client,
            port,
            id,
            collector_common::dns_inflight_bits(size),
        )
    };
    let default_set = |id| set_of(id, collector_common::DNS_INFLIGHT_SLOTS);
    let mut ids: Vec<u16> = Vec::new();
    for id in 1..=u16::MAX {
        if set_of(id, slots) == set_of(0, slots)
            && ids
                .iter()
                .all(|&other| default_set(other) != default_set(id))
        {
            ids.push(id);
        }
    }
    ids.truncate(count);
    assert_eq!(ids.len(), count);
    (ids, u64::from(set_of(0, slots)))
}

/// `collector maps` reads a crashed run's in-flight table of `slots` slots (a size it need
/// not know): `waiting` held the ways from `first_slot` on.
fn assert_maps_read_the_crashed_table(
    config: &AgentConfig,
    slots: u32,
    waiting: &[u16],
    first_slot: u64,
) {
    let list = support::collector_json(config, &["maps", "list"]);
    let row = list
        .as_array()
        .unwrap()
        .iter()
        .find(|row| row["name"] == map_names::DNS_INFLIGHT)
        .unwrap();
    assert_eq!(row["capacity"], slots, "{row}");
    assert_eq!(row["inUse"], waiting.len(), "{row}");
    assert_eq!(row.get("note"), None, "{row}");
    let dump = support::collector_json(config, &["maps", "dump", map_names::DNS_INFLIGHT]);
    let mut dumped: Vec<u64> = dump
        .as_array()
        .unwrap()
        .iter()
        .map(|row| {
            let slot = row["slot"].as_u64().unwrap();
            assert!(
                (first_slot..first_slot + waiting.len() as u64).contains(&slot),
                "{dump}"
            );
            row["id"].as_u64().unwrap()
        })
        .collect();
    dumped.sort_unstable();
    let mut expected: Vec<u64> = waiting.iter().map(|&id| u64::from(id)).collect();
    expected.sort_unstable();
    assert_eq!(dumped, expected, "{dump}");
}

/// Two names made to collide under the name hash before it was keyed (the first differs in
/// the top bit of its first eight bytes, which the multiply keeps there and the rotation
/// moves to bit 22, where the second difference takes it away): each is counted as itself.
/// Under the old hash, whichever took its slot first counted both.
#[test]
fn names_crafted_to_collide_are_counted_apart() {
    const NAMED: &[u8] = b"\x0aaaaaaaaaaa\x04test\x00";
    const CRAFTED: &[u8] = b"\x0aaaaaaa\xe1aa!\x04test\x00";
    let netns = Netns::new();
    let config = AgentConfig::new(&dns_config());
    let agent = Agent::start(&netns, &config);
    netns.run(|| {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        for (id, name) in (0u16..).zip([NAMED; 5].into_iter().chain([CRAFTED; 3])) {
            let mut query = id.to_be_bytes().to_vec();
            query.extend_from_slice(&[1, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
            query.extend_from_slice(name);
            query.extend_from_slice(&[0, 1, 0, 1]);
            socket.send_to(&query, SERVER).unwrap();
        }
    });
    let json = wait_for("the names counted", Duration::from_secs(15), || {
        let json = dns_json(&netns);
        let listed: u64 = top_domains(&json).iter().map(|(_, count)| count).sum();
        (json["totalQueries"] == 8 && listed == 8).then_some(json)
    });
    let mut domains = top_domains(&json);
    domains.sort_by_key(|(_, count)| std::cmp::Reverse(*count));
    assert_eq!(domains.len(), 2, "{json}");
    assert_eq!(domains[0], ("aaaaaaaaaa.test".to_owned(), 5), "{json}");
    assert_eq!(domains[1].1, 3, "{json}");
    assert!(domains[1].0.ends_with("aa!.test"), "{json}");
    assert!(agent.stop().success());
    assert_no_pins(&config.pin_dir);
}

/// The name hash's keys: random at a start from nothing, kept by a start after a crash (the
/// pinned upstream stamps sit where they put them, and the crashed run's programs hash with
/// them until replaced), new after a clean stop.
#[test]
fn the_name_hash_keys_are_kept_over_a_crash_and_new_after_a_clean_stop() {
    let netns = Netns::new();
    let config = AgentConfig::new(&dns_config());
    let keys = || -> DnsNameKeys {
        let pin = config.pin_dir.join("v1").join(map_names::DNS_NAME_KEYS);
        let map: aya::maps::Array<_, DnsNameKeys> = aya::maps::Array::try_from(
            aya::maps::Map::Array(aya::maps::MapData::from_pin(&pin).unwrap()),
        )
        .unwrap();
        map.get(&0, 0).unwrap()
    };
    Agent::start(&netns, &config).kill();
    let first = keys();
    assert!(first.is_set());
    let agent = Agent::start(&netns, &config);
    assert_eq!(keys(), first);
    assert!(agent.stop().success());
    assert_no_pins(&config.pin_dir);
    let agent = Agent::start(&netns, &config);
    let fresh = keys();
    assert!(fresh.is_set());
    assert_ne!(fresh, first);
    assert!(agent.stop().success());
    assert_no_pins(&config.pin_dir);
}

/// A response without a question (a FORMERR that echoes nothing) names nothing the server
/// could have asked upstream: neither a hit nor a miss, where it counted as a hit.
#[test]
fn answers_without_a_question_are_neither_hit_nor_miss() {
    const QUERIES: u16 = 3;
    let netns = Netns::new();
    let config = AgentConfig::new(&dns_config());
    let agent = Agent::start(&netns, &config);
    let socket = netns.run(|| std::net::UdpSocket::bind(SERVER).unwrap());
    let server = std::thread::spawn(move || {
        for _ in 0..QUERIES {
            let mut message = [0u8; 512];
            let (_, from) = socket.recv_from(&mut message).unwrap();
            // The id, QR and RD, RA and FORMERR; no section.
            let header = [message[0], message[1], 0x81, 0x81, 0, 0, 0, 0, 0, 0, 0, 0];
            socket.send_to(&header, from).unwrap();
        }
    });
    netns.run(|| {
        let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        client.set_read_timeout(Some(CLIENT_TIMEOUT)).unwrap();
        for id in 0..QUERIES {
            client.send_to(&www_test_query(id), SERVER).unwrap();
            let mut answer = [0u8; 512];
            let (len, _) = client.recv_from(&mut answer).unwrap();
            assert_eq!((len, &answer[..2]), (12, &id.to_be_bytes()[..]));
        }
    });
    server.join().unwrap();
    let json = wait_for("the answers counted", Duration::from_secs(15), || {
        let json = dns_json(&netns);
        (json["totalResponses"] == u64::from(QUERIES)).then_some(json)
    });
    assert_eq!(
        json["responseCodes"]["FORMERR"],
        u64::from(QUERIES),
        "{json}"
    );
    assert_eq!(
        json["cacheStats"],
        serde_json::json!({"hits": 0, "misses": 0, "undecided": QUERIES, "hitRate": null}),
        "{json}"
    );
    assert!(agent.stop().success());
    assert_no_pins(&config.pin_dir);
}

/// Queries a client sends merged into one packet (`UDP_SEGMENT`: UDP GSO; on loopback the
/// packet reaches the classifier whole, and the receiving socket splits it) count the first
/// and the others as `dns_merged_uncounted`, exactly; the server answers each, and each
/// answer counts.
#[test]
fn queries_merged_into_one_packet_count_the_first_and_the_others_apart() {
    /// `UDP_SEGMENT` of linux/udp.h (the libc crate has it for some targets only).
    const UDP_SEGMENT: libc::c_int = 103;
    const QUERIES: u16 = 4;
    let netns = Netns::new();
    let config = AgentConfig::new(&dns_config());
    let agent = Agent::start(&netns, &config);
    let server = answer(&netns, SERVER, usize::from(QUERIES));
    netns.run(|| {
        let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        client.set_read_timeout(Some(CLIENT_TIMEOUT)).unwrap();
        let size = www_test_query(0).len();
        support::set_socket_option(
            &client,
            libc::IPPROTO_UDP,
            UDP_SEGMENT,
            libc::c_int::try_from(size).unwrap(),
        );
        let merged: Vec<u8> = (0..QUERIES).flat_map(www_test_query).collect();
        assert_eq!(client.send_to(&merged, SERVER).unwrap(), merged.len());
        for _ in 0..QUERIES {
            let mut answer = [0u8; 512];
            assert_eq!(client.recv_from(&mut answer).unwrap().0, size);
        }
    });
    server.join().unwrap();
    wait_for("the answers counted", Duration::from_secs(15), || {
        (dns_json(&netns)["totalResponses"] == u64::from(QUERIES)).then_some(())
    });
    // Two polls on: nothing counted late.
    let metrics = support::after_polls(&netns, 2);
    assert_eq!(
        sample(
            &metrics,
            "collector_bpf_errors_total",
            &[("kind", "dns_merged_uncounted")]
        ),
        Some(f64::from(QUERIES - 1)),
        "{metrics}"
    );
    let json = dns_json(&netns);
    assert_eq!(
        (
            json["totalQueries"].as_u64(),
            json["totalResponses"].as_u64()
        ),
        (Some(1), Some(u64::from(QUERIES))),
        "{json}"
    );
    assert!(agent.stop().success());
    assert_no_pins(&config.pin_dir);
}

/// A DNS server stand-in in `netns` on `address`: answers `count` queries (the query back,
/// marked a response).
fn answer(netns: &Netns, address: &'static str, count: usize) -> std::thread::JoinHandle<()> {
    let socket = netns.run(move || std::net::UdpSocket::bind(address).unwrap());
    std::thread::spawn(move || {
        for _ in 0..count {
            let mut message = [0u8; 512];
            let (len, from) = socket.recv_from(&mut message).unwrap();
            message[2] |= 0x80;
            socket.send_to(&message[..len], from).unwrap();
        }
    })
}

/// A query for www.test A with transaction id `id`, recursion desired.
fn www_test_query(id: u16) -> Vec<u8> {
    let mut query = id.to_be_bytes().to_vec();
    query.extend_from_slice(&[1, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
    query.extend_from_slice(b"\x03www\x04test\x00\x00\x01\x00\x01");
    query
}

/// `count` queries for www.test A from `netns` to `server` (ids 0 to `count` - 1), each
/// answered; the client's port.
fn ask(netns: &Netns, server: &'static str, count: u16) -> u16 {
    netns.run(move || {
        let socket = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        socket.set_read_timeout(Some(CLIENT_TIMEOUT)).unwrap();
        for id in 0..count {
            socket.send_to(&www_test_query(id), server).unwrap();
            let mut answer = [0u8; 512];
            let (len, _) = socket.recv_from(&mut answer).unwrap();
            assert!(
                len > 12 && answer[..2] == id.to_be_bytes(),
                "answer to {id}"
            );
        }
        socket.local_addr().unwrap().port()
    })
}

/// `netns` between `client` and `server`, which it forwards for: a veth to each
/// (`{prefix}0`-`{prefix}1` on 10.79.`subnets[0]`.0/24, `{prefix}2`-`{prefix}3` on
/// 10.79.`subnets[1]`.0/24, `netns` at .1), and each peer's default route through it.
fn route_between(netns: &Netns, client: &Netns, server: &Netns, prefix: &str, subnets: [u8; 2]) {
    for (peer, net, first) in [(client, subnets[0], 0), (server, subnets[1], 2)] {
        support::veth(
            netns,
            &format!("{prefix}{first}"),
            &format!("10.79.{net}.1/24"),
            peer,
            &format!("{prefix}{}", first + 1),
            &format!("10.79.{net}.2/24"),
        );
        let gateway = format!("10.79.{net}.1");
        support::run(
            "ip",
            &["-n", &peer.name, "route", "add", "default", "via", &gateway],
        );
    }
    netns.forward();
}

/// The agent's namespace routes between a client's and a server's: the queries it only
/// forwards are no local server's, and not counted (nor as upstream queries); those to a
/// server of its own are, and so is an upstream query it sends itself.
#[test]
fn dns_the_host_only_forwards_is_not_counted() {
    dns_the_host_forwards(false);
}

/// As above with the forwarded queries masqueraded (a Docker or Kubernetes node, a NAT
/// gateway): they leave with the host's own address, and are still no upstream queries of
/// its server (which would make its answers for those names cache misses).
#[test]
fn dns_the_host_forwards_masqueraded_is_no_upstream_query() {
    dns_the_host_forwards(true);
}

fn dns_the_host_forwards(masquerade: bool) {
    let (netns, client, server) = (Netns::new(), Netns::new(), Netns::new());
    route_between(&netns, &client, &server, "vdn", [3, 4]);
    if masquerade {
        support::run(
            "ip",
            &[
                "netns",
                "exec",
                &netns.name,
                "nft",
                "add table ip nat; add chain ip nat out { type nat hook postrouting priority 100; }; \
                 add rule ip nat out oifname vdn2 masquerade",
            ],
        );
    }
    // The default ports: the forwarded queries go to an upstream port.
    let config = AgentConfig::new("[dns]\nports = [53]\nupstream_ports = [53]\n");
    let agent = Agent::start(&netns, &config);

    // 3 forwarded, and 1 the agent's namespace sends itself: its only upstream query.
    let remote = answer(&server, "10.79.4.2:53", 4);
    ask(&client, "10.79.4.2:53", 3);
    ask(&netns, "10.79.4.2:53", 1);
    remote.join().unwrap();
    let local = answer(&netns, "10.79.3.1:53", 2);
    ask(&client, "10.79.3.1:53", 2);
    local.join().unwrap();

    support::after_polls(&netns, 2);
    let json = dns_json(&netns);
    assert_eq!(
        (&json["totalQueries"], &json["totalResponses"]),
        (&serde_json::json!(2), &serde_json::json!(2)),
        "{json}"
    );
    let metrics = scrape(&netns);
    assert_eq!(
        sample(&metrics, "collector_dns_upstream_queries_total", &[]),
        Some(1.0),
        "{metrics}"
    );
    assert!(agent.stop().success());
    assert_no_pins(&config.pin_dir);
}

/// A DNS server in another namespace that the agent's namespace publishes on its own address
/// by DNAT (a container's published port, a pod's `hostPort: 53`): its clients' queries and
/// its answers are counted, but the server asks its upstreams from its own namespace, out of
/// sight here, so its answers are neither hits nor misses but `undecided`, left out of the
/// hit rate. Until 2026-12-03 each was a hit: a hit rate of 1 whatever that server's cache
/// did. The answers of the agent's namespace's own server are judged as before.
#[test]
fn answers_relayed_from_a_server_behind_a_dnat_are_neither_hit_nor_miss() {
    let (netns, client, server) = (Netns::new(), Netns::new(), Netns::new());
    route_between(&netns, &client, &server, "vdd", [5, 6]);
    support::run(
        "ip",
        &[
            "netns",
            "exec",
            &netns.name,
            "nft",
            "add table ip nat; add chain ip nat pre { type nat hook prerouting priority dstnat; }; \
             add rule ip nat pre ip daddr 10.79.5.1 udp dport 53 dnat to 10.79.6.2",
        ],
    );
    let config = AgentConfig::new("[dns]\nports = [53]\n");
    let agent = Agent::start(&netns, &config);

    let published = answer(&server, "10.79.6.2:53", 3);
    ask(&client, "10.79.5.1:53", 3);
    published.join().unwrap();
    let own = answer(&netns, "127.0.0.1:53", 2);
    ask(&netns, "127.0.0.1:53", 2);
    own.join().unwrap();

    let json = wait_for("the five answers", Duration::from_secs(15), || {
        let json = dns_json(&netns);
        (json["totalResponses"] == 5).then_some(json)
    });
    assert_eq!(json["totalQueries"], 5, "{json}");
    assert_eq!(
        json["cacheStats"],
        serde_json::json!({"hits": 2, "misses": 0, "undecided": 3, "hitRate": 1.0}),
        "{json}"
    );
    let metrics = scrape(&netns);
    assert_eq!(
        sample(&metrics, "collector_dns_cache_undecided_total", &[]),
        Some(3.0),
        "{metrics}"
    );
    assert!(agent.stop().success());
    assert_no_pins(&config.pin_dir);
}

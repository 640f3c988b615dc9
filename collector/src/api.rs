//! JSON shapes of the HTTP API, in the camelCase the proxy's own consumers expect. Pure:
//! built from a snapshot.

use std::{collections::BTreeMap, net::IpAddr};

use collector_common::{DNS_ANSWER_TIMEOUT_NS, sni_outcome};
use serde::Serialize;

use crate::{
    counters::{NameRole, ServerNameTotals},
    dns::{OPCODE_NAMES, QCLASS_NAMES, RCODE_NAMES, is_error_rcode, qtype_name},
    nft::Protocol,
    rates::Rates,
    snapshot::{
        DnsLastMinute, DnsSnapshot, RouteLastMinute, RouteSnapshot, Snapshot, UpstreamSnapshot,
        histogram_quantile,
    },
    topk::Listed,
};

/// A rate over the standard windows (1 s, 10 s, 60 s), per second.
#[derive(Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RateWindows {
    pub instant: f64,
    pub recent: f64,
    pub average: f64,
    /// Per-poll rates, oldest first (only on totals): of the last 60 polls, reaching one
    /// poll past the last 65 s (a minute at the default interval, 6 s at 100 ms, 7 rates
    /// over 70 s at 10 s).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub history: Option<Vec<f64>>,
}

impl RateWindows {
    fn new(rates: Rates, history: Option<&[f64]>) -> Self {
        Self {
            instant: rates.instant,
            recent: rates.recent,
            average: rates.average,
            history: history.map(<[f64]>::to_vec),
        }
    }
}

#[derive(Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Throughput {
    pub bytes_in: RateWindows,
    pub bytes_out: RateWindows,
}

#[derive(Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TopIp {
    pub ip: String,
    /// Opened since the client was tracked: never more than the true count.
    pub connections: u64,
    /// How many more it may have opened: the count of the client it took the place of, once
    /// more clients were seen than the list tracks, plus every client record the kernel's
    /// full ring dropped since the start (any could have been this client's).
    pub max_undercount: u64,
}

/// Live traffic of a route, counted per packet at the interfaces.
#[derive(Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Traffic {
    pub packets_in: u64,
    pub packets_out: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub payload_bytes_in: u64,
    pub payload_bytes_out: u64,
}

/// Durations in seconds of what ended over the last minute (connections closed, queries
/// answered): a live view, where `/metrics` has the lifetime histograms.
#[derive(Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Durations {
    /// How many ended over the last minute.
    pub count: u64,
    pub mean: Option<f64>,
    pub p50: Option<f64>,
    pub p90: Option<f64>,
    pub p99: Option<f64>,
}

impl Durations {
    /// The lifetimes of the connections closed over the last minute, a route's or an
    /// upstream's.
    fn of_closes(closes: &RouteLastMinute) -> Self {
        let count: u64 = closes.durations.iter().sum();
        #[expect(
            clippy::cast_precision_loss,
            reason = "microsecond sums as float seconds"
        )]
        let mean = (count > 0).then(|| closes.duration_us as f64 / 1e6 / count as f64);
        Self {
            count,
            mean,
            p50: histogram_quantile(&closes.durations, 0.5),
            p90: histogram_quantile(&closes.durations, 0.9),
            p99: histogram_quantile(&closes.durations, 0.99),
        }
    }
}

/// The matched queries' times from query to response over the last minute: those answered,
/// and those given up without an answer within [`DNS_ANSWER_TIMEOUT_NS`] (in no bucket of
/// `/metrics`' latency histogram), which the quantiles place at that age, the least they
/// took: a server answering its slowest after 10 s does not show only its fast answers.
#[derive(Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DnsLatency {
    /// Answers matched to their query.
    pub count: u64,
    /// Queries given up: counted when a later query takes their slot back or their late
    /// answer comes, so 10 s after they were sent at the soonest (later on a quiet server).
    pub given_up: u64,
    /// Of the answers only.
    pub mean: Option<f64>,
    pub p50: Option<f64>,
    pub p90: Option<f64>,
    pub p99: Option<f64>,
}

/// Seconds a matched query waits for its answer before it is given up.
#[expect(clippy::cast_precision_loss, reason = "10 s in nanoseconds is exact")]
const GIVEN_UP_SECONDS: f64 = DNS_ANSWER_TIMEOUT_NS as f64 / 1e9;

/// The `q` quantile of the minute's answers' latencies and its given-up queries, these at
/// [`GIVEN_UP_SECONDS`]; `None` without either.
#[expect(clippy::cast_precision_loss, reason = "counts far below 2^52")]
fn latency_quantile(minute: &DnsLastMinute, q: f64) -> Option<f64> {
    let answered: u64 = minute.latency.iter().sum();
    let total = answered + minute.unanswered_queries;
    if total == 0 {
        return None;
    }
    let rank = q.clamp(0.0, 1.0) * total as f64;
    if answered == 0 || rank > answered as f64 {
        return Some(GIVEN_UP_SECONDS);
    }
    // Every answer came within the give-up age, where the log2 bucket that holds it runs
    // on to 16.8 s: interpolated in it, a 9 s answer read above the queries given up.
    histogram_quantile(&minute.latency, rank / answered as f64).map(|s| s.min(GIVEN_UP_SECONDS))
}

#[derive(Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RouteStats {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub ports: Vec<u16>,
    pub opened: u64,
    pub closed: u64,
    /// Opened and turned away by the full connection table: never closed, out of `active`.
    pub untracked: u64,
    /// Opened minus closed and untracked, plus `open_from_before_start`.
    pub active: u64,
    /// Connections open since before the agent started and not closed yet: in no counter
    /// but `active`.
    pub open_from_before_start: u64,
    /// Payload bytes of closed connections, from the sockets' own counters.
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub connections_per_second: RateWindows,
    /// Live, from tc, as `traffic`; `null` on a route with server names, whose live bytes
    /// are not told apart (they count by port: all in the route without names of the ports
    /// it shares). Absent, not zero: a zero would read as an idle route.
    pub throughput: Option<Throughput>,
    pub traffic: Option<Traffic>,
    pub duration: Durations,
    /// Our nftables counters for the route's ports (also traffic no local socket sees);
    /// `null` while nftables counting is off, and on a route with server names (as
    /// `traffic`).
    pub nftables: Option<NftCounts>,
    /// The TLS server names that tell the route apart on ports it shares (empty for none).
    pub server_names: Vec<String>,
    /// On ports shared by server name only: the connections counted opened in the route, by
    /// how their route was decided (a route with names has `matched` alone).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_name_outcomes: Option<ServerNameOutcomes>,
    /// The route without names of ports shared by server name only: connections accepted
    /// there waiting for their ClientHello, counted opened in no route yet.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub awaiting_server_name: Option<u64>,
}

/// How the connections counted in a route on ports shared by server name were told apart
/// (see `collector_common::sni_outcome`).
#[derive(Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ServerNameOutcomes {
    /// The ClientHello named one of the route's names.
    pub matched: u64,
    /// A name no route of the port has.
    pub unknown_name: u64,
    /// A ClientHello without a name.
    pub no_name: u64,
    /// The first segment was no TLS ClientHello.
    pub not_tls: u64,
    /// The hello was cut where it cannot be read on, or a PROXY header was cut short.
    pub incomplete: u64,
    pub malformed: u64,
    /// Closed before the client sent anything (after a PROXY header, if one came).
    pub no_data: u64,
    /// The first segment, or the next one a hello went on in, was not seen; or the
    /// connection found no place to wait for its name (the connection table full).
    pub missed: u64,
}

impl ServerNameOutcomes {
    fn of(totals: &ServerNameTotals) -> Self {
        let count = |outcome: u32| totals.counters.outcomes[outcome as usize];
        Self {
            matched: count(sni_outcome::MATCHED),
            unknown_name: count(sni_outcome::UNKNOWN_NAME),
            no_name: count(sni_outcome::NO_NAME),
            not_tls: count(sni_outcome::NOT_TLS),
            incomplete: count(sni_outcome::INCOMPLETE),
            malformed: count(sni_outcome::MALFORMED),
            no_data: count(sni_outcome::NO_DATA),
            missed: count(sni_outcome::MISSED),
        }
    }
}

/// An upstream of the proxy: the connections this namespace opened to its ports.
#[derive(Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct UpstreamStats {
    pub name: String,
    /// The remote TCP ports of its backends.
    pub ports: Vec<u16>,
    /// Connects whose handshake completed.
    pub opened: u64,
    pub closed: u64,
    /// Opened and turned away by the full connection table: never closed, out of `active`.
    pub untracked: u64,
    /// Opened minus closed and untracked, plus `open_from_before_start`.
    pub active: u64,
    /// Connections open since before the agent started and not closed yet: in no counter
    /// but `active`.
    pub open_from_before_start: u64,
    /// Connects that closed before their handshake completed (refused, timed out,
    /// unreachable, or given up by the proxy).
    pub connect_failures: u64,
    /// Connects waiting for their handshake now.
    pub connects_in_progress: u64,
    /// Payload bytes of closed connections, received from the upstream.
    pub bytes_in: u64,
    /// Payload bytes of closed connections, sent to the upstream (and acknowledged).
    pub bytes_out: u64,
    /// New connections (handshake completed) per second.
    pub connections_per_second: RateWindows,
    pub duration: Durations,
}

fn upstream_stats(upstream: &UpstreamSnapshot) -> UpstreamStats {
    let conn = &upstream.totals.conn;
    UpstreamStats {
        name: upstream.upstream.name.clone(),
        ports: upstream.upstream.ports.clone(),
        opened: conn.opened,
        closed: conn.closed,
        untracked: conn.untracked,
        active: upstream.active(),
        open_from_before_start: upstream.open_from_before,
        connect_failures: upstream.totals.connects.connect_failures,
        connects_in_progress: upstream.totals.connects.connecting,
        bytes_in: conn.bytes_in,
        bytes_out: conn.bytes_out,
        connections_per_second: RateWindows::new(upstream.connection_rates, None),
        duration: Durations::of_closes(&upstream.last_minute),
    }
}

/// What our nftables table counted for a route's or the DNS server's ports.
#[derive(Debug, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct NftCounts {
    pub packets_in: u64,
    pub packets_out: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

/// The nftables counters of `route` (a route name over TCP, or `dns` over UDP), summed over
/// its ports; `None` when there are none (nftables off or unavailable). By protocol too: a
/// route may be named `dns` (DNS over TCP, say), and its counts are not the DNS server's.
fn nft_counts(snapshot: &Snapshot, route: &str, protocol: Protocol) -> Option<NftCounts> {
    let mut counts = NftCounts::default();
    let mut any = false;
    for value in snapshot
        .nft
        .iter()
        .filter(|v| v.counter.route == route && v.counter.protocol == protocol)
    {
        any = true;
        if value.counter.inbound {
            counts.packets_in += value.packets;
            counts.bytes_in += value.bytes;
        } else {
            counts.packets_out += value.packets;
            counts.bytes_out += value.bytes;
        }
    }
    any.then_some(counts)
}

/// One interface attached (or whose attach fails) with the kernel's own counters.
#[derive(Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct InterfaceStats {
    pub name: String,
    #[serde(flatten)]
    pub stats: crate::links::InterfaceStats,
}

/// Health of one source of figures.
#[derive(Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Source {
    pub up: bool,
    pub last_read_seconds: f64,
    pub errors: u64,
    /// The last failure, also after the source recovered, and when it was (milliseconds
    /// since the Unix epoch).
    pub last_error: Option<String>,
    pub last_error_at: Option<u64>,
}

fn sources(snapshot: &Snapshot) -> BTreeMap<String, Source> {
    snapshot
        .sources
        .iter()
        .map(|(name, h)| {
            (
                (*name).to_owned(),
                Source {
                    up: h.up,
                    last_read_seconds: h.last_duration_seconds,
                    errors: h.errors,
                    last_error: h.last_error.clone(),
                    last_error_at: h.last_error_at_ms,
                },
            )
        })
        .collect()
}

/// How old the figures are as served, by the agent's own monotonic clock (a client's clock
/// may differ, and a wall clock may step), and how often they are read: a client can tell
/// figures that polls keep moving from figures left standing (a poll that cannot read the
/// kernel keeps the last ones).
#[derive(Debug, Default, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Age {
    /// Milliseconds since the kernel maps were read; `null` before the first read.
    pub age_ms: Option<u64>,
    /// `poll_interval_ms` of the config.
    pub poll_interval_ms: u64,
}

impl Age {
    /// For figures read `age` ago (`None`: never).
    #[must_use]
    pub fn new(age: Option<std::time::Duration>, poll_interval: std::time::Duration) -> Self {
        let ms =
            |duration: std::time::Duration| u64::try_from(duration.as_millis()).unwrap_or(u64::MAX);
        Self {
            age_ms: age.map(ms),
            poll_interval_ms: ms(poll_interval),
        }
    }
}

/// `/api/v1/proxy`.
#[derive(Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ProxyStats {
    /// When the kernel maps were read, milliseconds since the Unix epoch; `null` before the
    /// first read (as `ageMs`), not 0, a time in 1970.
    pub timestamp: Option<u64>,
    /// Set where the figures are served (see [`Age`]).
    #[serde(flatten)]
    pub age: Age,
    pub active_connections: u64,
    /// Open connections per route.
    pub connections_by_route: BTreeMap<String, u64>,
    pub total_connections: u64,
    /// Connections waiting for their ClientHello on ports shared by server name, over every
    /// route: in none of the figures above yet.
    pub connections_awaiting_server_name: u64,
    /// New connections per second over about the last second: back to the poll nearest a
    /// second ago, one poll at intervals of a second or more, the whole stall after polls
    /// that stalled (until L7 requests are counted).
    pub requests_per_second: f64,
    pub connection_rates: RateWindows,
    /// Live payload bytes per second, towards (in) and from (out) the proxy.
    pub throughput: Throughput,
    /// Open connections per client address, of the 20 clients with the most (ties: the
    /// lowest addresses); `null` with `client_stats = false`.
    #[serde(rename = "connectionsByIP")]
    pub connections_by_ip: Option<BTreeMap<String, u64>>,
    /// Clients with the most connections opened since start; `null` with
    /// `client_stats = false`.
    #[serde(rename = "topIPs")]
    pub top_ips: Option<Vec<TopIp>>,
    /// As `topIPs`, over the last `topIPsRecentSeconds` only: the last one to two windows
    /// of 5 minutes (since the start, if that is less).
    #[serde(rename = "topIPsRecent")]
    pub top_ips_recent: Option<Vec<TopIp>>,
    #[serde(rename = "topIPsRecentSeconds")]
    pub top_ips_recent_seconds: Option<f64>,
    pub routes: Vec<RouteStats>,
    /// The upstreams (`[[upstreams]]`), in config order: the connections the proxy opens to
    /// its backends, apart from the clients' (none of the figures above count them).
    pub upstreams: Vec<UpstreamStats>,
    /// The interfaces the classifiers are attached to, with their own counters (netlink).
    pub interfaces: Vec<InterfaceStats>,
    pub sources: BTreeMap<String, Source>,
}

fn route_stats(snapshot: &Snapshot, route: &RouteSnapshot) -> RouteStats {
    let totals = &route.totals;
    let counted_by_port = route.route.sni.is_empty();
    RouteStats {
        name: route.route.name.clone(),
        kind: route.route.kind.as_str(),
        ports: route.route.ports.clone(),
        opened: totals.conn.opened,
        closed: totals.conn.closed,
        untracked: totals.conn.untracked,
        active: route.active(),
        open_from_before_start: route.open_from_before,
        bytes_in: totals.conn.bytes_in,
        bytes_out: totals.conn.bytes_out,
        connections_per_second: RateWindows::new(route.connection_rates, None),
        throughput: counted_by_port.then(|| Throughput {
            bytes_in: RateWindows::new(route.bytes_in_rates, None),
            bytes_out: RateWindows::new(route.bytes_out_rates, None),
        }),
        traffic: counted_by_port.then_some(Traffic {
            packets_in: totals.traffic_in.packets,
            packets_out: totals.traffic_out.packets,
            bytes_in: totals.traffic_in.bytes,
            bytes_out: totals.traffic_out.bytes,
            payload_bytes_in: totals.traffic_in.payload_bytes,
            payload_bytes_out: totals.traffic_out.payload_bytes,
        }),
        // Quantiles of the connections closed over the last minute.
        duration: Durations::of_closes(&route.last_minute),
        nftables: nft_counts(snapshot, &route.route.name, Protocol::Tcp),
        server_names: route.route.sni.clone(),
        server_name_outcomes: totals.server_names.as_ref().map(ServerNameOutcomes::of),
        awaiting_server_name: totals
            .server_names
            .as_ref()
            .filter(|by_name| by_name.role == NameRole::Fallback)
            .map(ServerNameTotals::awaiting),
    }
}

#[must_use]
pub fn proxy_stats(snapshot: &Snapshot) -> ProxyStats {
    ProxyStats {
        timestamp: snapshot.read_at.map(|_| snapshot.taken_at_ms),
        age: Age::default(),
        active_connections: snapshot.active_connections(),
        connections_by_route: snapshot
            .routes
            .iter()
            .map(|r| (r.route.name.clone(), r.active()))
            .collect(),
        total_connections: snapshot.total_connections(),
        connections_awaiting_server_name: snapshot.awaiting_server_name(),
        requests_per_second: snapshot.connection_rates.instant,
        connection_rates: RateWindows::new(
            snapshot.connection_rates,
            Some(&snapshot.connection_history),
        ),
        throughput: Throughput {
            bytes_in: RateWindows::new(snapshot.bytes_in_rates, Some(&snapshot.bytes_in_history)),
            bytes_out: RateWindows::new(
                snapshot.bytes_out_rates,
                Some(&snapshot.bytes_out_history),
            ),
        },
        connections_by_ip: snapshot.clients.enabled.then(|| {
            snapshot
                .clients
                .active
                .iter()
                .map(|(ip, n)| (ip.to_string(), *n))
                .collect()
        }),
        top_ips: snapshot
            .clients
            .enabled
            .then(|| top_ips(&snapshot.clients.top)),
        top_ips_recent: snapshot
            .clients
            .enabled
            .then(|| top_ips(&snapshot.clients.recent)),
        top_ips_recent_seconds: snapshot
            .clients
            .enabled
            .then_some(snapshot.clients.recent_seconds),
        routes: snapshot
            .routes
            .iter()
            .map(|route| route_stats(snapshot, route))
            .collect(),
        upstreams: snapshot.upstreams.iter().map(upstream_stats).collect(),
        interfaces: snapshot
            .interface_stats
            .iter()
            .map(|i| InterfaceStats {
                name: i.name.clone(),
                stats: i.stats,
            })
            .collect(),
        sources: sources(snapshot),
    }
}

#[derive(Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
    /// Answers relayed from a server in another network namespace (a DNAT to it), and
    /// answers without a question (some FORMERR ones): neither hit nor miss, and left out
    /// of the rate.
    pub undecided: u64,
    /// hits / (hits + misses) over the last minute (the counts are since the start); `null`
    /// without a hit or a miss then (answers that were all `undecided` included).
    pub hit_rate: Option<f64>,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct TopDomain {
    pub domain: String,
    /// Queries since the name was tracked: never more than the true count when every query
    /// is sampled (`sample_every = 1`), but for a 2^-32 chance that another name shares its
    /// keyed hash in the kernel's table; with one in N sampled, the sampled count times N,
    /// an estimate either way.
    pub count: u64,
    /// How many more it may have had: the count of the name it took the place of, once more
    /// names were seen than the list tracks, plus every name event the kernel's full ring
    /// dropped since the start (times `sample_every`; any could have been this name's).
    pub max_undercount: u64,
}

/// `/api/v1/dns`.
#[derive(Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DnsStats {
    /// When the kernel maps were read, milliseconds since the Unix epoch; `null` before the
    /// first read (as `ageMs`), not 0, a time in 1970.
    pub timestamp: Option<u64>,
    /// Set where the figures are served (see [`Age`]).
    #[serde(flatten)]
    pub age: Age,
    /// False when DNS counting is off in the config.
    pub enabled: bool,
    pub total_queries: u64,
    /// Client queries per second over about the last second, as `requestsPerSecond`.
    pub queries_per_second: f64,
    pub query_rates: RateWindows,
    /// False when `[dns] match_responses = false`: the figures that need a response matched
    /// to its query (cache, latency, in flight, unanswered, unmatched) are then `null`.
    pub match_responses: bool,
    /// One query in this many is matched (`[dns] match_every`): the matched figures count
    /// that sample. `null` while matching is off.
    pub match_every: Option<u32>,
    pub cache_stats: Option<CacheStats>,
    /// Since the agent started.
    pub top_domains: Vec<TopDomain>,
    /// As `topDomains`, over the last `topDomainsRecentSeconds` only: the last one to two
    /// windows of 5 minutes (since the start, if that is less).
    pub top_domains_recent: Vec<TopDomain>,
    pub top_domains_recent_seconds: f64,
    /// Queries by QTYPE (types seen only).
    pub query_type_breakdown: BTreeMap<String, u64>,
    /// Queries by QCLASS (classes seen only): IN, CH (`version.bind` probes), HS, NONE, ANY,
    /// OTHER.
    pub query_class_breakdown: BTreeMap<String, u64>,
    /// Responses by RCODE (codes seen only).
    pub response_codes: BTreeMap<String, u64>,
    /// Queries by OPCODE (codes seen only).
    pub opcodes: BTreeMap<String, u64>,
    pub total_responses: u64,
    /// Share of the last minute's responses with an RCODE other than NOERROR, NXDOMAIN and
    /// BADCOOKIE (server failures, and also refusals and format errors); `null` without a response
    /// then.
    pub error_rate: Option<f64>,
    /// Share of the last minute's client queries that no response of that minute stands
    /// for: 1 - responses / queries, 0 at the least; `null` without a query then. A server
    /// that stops answering moves it from the next poll on, and it reads 1 once a minute has
    /// passed without an answer; `unansweredQueries` counts a query only when a later one
    /// takes its slot back (10 s later, and minutes on a quiet server).
    /// It needs no matching, so a retransmission the server leaves unanswered counts too.
    pub unanswered_rate: Option<f64>,
    /// Query-to-response time in seconds over the last minute.
    pub latency: Option<DnsLatency>,
    pub truncated_responses: u64,
    /// Messages that could not be counted, by reason.
    pub malformed: BTreeMap<String, u64>,
    pub in_flight: Option<u64>,
    pub unanswered_queries: Option<u64>,
    pub unmatched_responses: Option<u64>,
    pub upstream_queries: u64,
    pub events_dropped: u64,
    /// Messages not counted because the kernel merged their datagrams into another's packet
    /// (UDP GSO, UDP GRO): that packet's first message is counted, these are the others.
    pub merged_uncounted: u64,
    /// Queries left out of `topDomains` because their name did not decode.
    pub undecodable_names: u64,
    /// Our nftables counters for the DNS ports.
    pub nftables: Option<NftCounts>,
    pub sources: BTreeMap<String, Source>,
}

fn top_ips(listed: &[Listed<IpAddr>]) -> Vec<TopIp> {
    listed
        .iter()
        .map(|listed| TopIp {
            ip: listed.key.to_string(),
            connections: listed.count,
            max_undercount: listed.error,
        })
        .collect()
}

fn top_domains(listed: &[Listed<String>]) -> Vec<TopDomain> {
    listed
        .iter()
        .map(|listed| TopDomain {
            domain: listed.key.clone(),
            count: listed.count,
            max_undercount: listed.error,
        })
        .collect()
}

#[must_use]
#[expect(clippy::cast_precision_loss, reason = "counts far below 2^52")]
pub fn dns_stats(snapshot: &Snapshot) -> DnsStats {
    let dns: &DnsSnapshot = &snapshot.dns;
    let c = &dns.counters;
    let seen = |names: &[&str], counts: &[u64]| -> BTreeMap<String, u64> {
        names
            .iter()
            .zip(counts)
            .filter(|&(_, &n)| n > 0)
            .map(|(name, &n)| ((*name).to_owned(), n))
            .collect()
    };
    let total_responses = dns.total_responses();
    // Ratios and quantiles over the last minute; counts since the start.
    let recent = &dns.last_minute;
    let recent_responses: u64 = recent.responses_by_rcode.iter().sum();
    let recent_errors: u64 = (0..recent.responses_by_rcode.len())
        .filter(|&rcode| is_error_rcode(rcode))
        .map(|rcode| recent.responses_by_rcode[rcode])
        .sum();
    let answered: u64 = recent.latency.iter().sum();
    let decided = recent.cache_hits + recent.cache_misses;
    DnsStats {
        timestamp: snapshot.read_at.map(|_| snapshot.taken_at_ms),
        age: Age::default(),
        enabled: dns.enabled,
        total_queries: dns.total_queries(),
        queries_per_second: dns.query_rates.instant,
        query_rates: RateWindows::new(dns.query_rates, Some(&dns.query_history)),
        match_responses: dns.match_responses,
        match_every: dns.match_responses.then_some(dns.match_every),
        cache_stats: dns.match_responses.then_some(CacheStats {
            hits: c.cache_hits,
            misses: c.cache_misses,
            undecided: c.cache_undecided,
            hit_rate: (decided > 0).then(|| recent.cache_hits as f64 / decided as f64),
        }),
        top_domains: top_domains(&dns.domains.top),
        top_domains_recent: top_domains(&dns.domains.recent),
        top_domains_recent_seconds: dns.domains.recent_seconds,
        query_type_breakdown: c
            .queries_by_qtype
            .iter()
            .zip(0u32..)
            .filter(|&(&n, _)| n > 0)
            .map(|(&n, slot)| (qtype_name(slot), n))
            .collect(),
        query_class_breakdown: seen(&QCLASS_NAMES, &c.queries_by_qclass),
        response_codes: seen(&RCODE_NAMES, &c.responses_by_rcode),
        opcodes: seen(&OPCODE_NAMES, &c.queries_by_opcode),
        total_responses,
        error_rate: (recent_responses > 0).then(|| recent_errors as f64 / recent_responses as f64),
        unanswered_rate: (recent.queries > 0).then(|| {
            recent.queries.saturating_sub(recent_responses) as f64 / recent.queries as f64
        }),
        latency: dns.match_responses.then(|| DnsLatency {
            count: answered,
            given_up: recent.unanswered_queries,
            mean: (answered > 0).then(|| recent.latency_ns as f64 / 1e9 / answered as f64),
            p50: latency_quantile(recent, 0.5),
            p90: latency_quantile(recent, 0.9),
            p99: latency_quantile(recent, 0.99),
        }),
        truncated_responses: c.responses_truncated,
        malformed: collector_common::DNS_MALFORMED_NAMES
            .iter()
            .zip(c.malformed)
            .map(|(name, n)| ((*name).to_owned(), n))
            .collect(),
        in_flight: dns.in_flight(),
        unanswered_queries: dns.match_responses.then_some(c.unanswered_queries),
        unmatched_responses: dns.match_responses.then_some(c.unmatched_responses),
        upstream_queries: c.upstream_queries,
        events_dropped: c.events_dropped,
        merged_uncounted: snapshot.errors
            [collector_common::error_kind::DNS_MERGED_UNCOUNTED as usize],
        undecodable_names: dns.domains.undecodable_names,
        nftables: nft_counts(snapshot, "dns", Protocol::Udp),
        sources: sources(snapshot),
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;

    #[test]
    fn before_the_first_read_the_time_of_the_read_is_null() {
        let starting = Snapshot::default();
        for json in [
            serde_json::to_value(proxy_stats(&starting)).unwrap(),
            serde_json::to_value(dns_stats(&starting)).unwrap(),
        ] {
            assert_eq!(
                json.get("timestamp"),
                Some(&serde_json::Value::Null),
                "{json}"
            );
        }
        let mut read = Snapshot::example();
        read.read_at = Some(std::time::Instant::now());
        read.taken_at_ms = 1_700_000_000_000;
        assert_eq!(
            serde_json::to_value(proxy_stats(&read)).unwrap()["timestamp"],
            1_700_000_000_000_u64
        );
    }

    #[test]
    fn proxy_json_has_the_shape_consumers_expect() {
        let mut snapshot = Snapshot::example();
        let client: IpAddr = "192.0.2.7".parse().unwrap();
        snapshot.clients.enabled = true;
        snapshot.clients.top = vec![Listed {
            key: client,
            count: 5,
            error: 0,
        }];
        snapshot.clients.recent = vec![Listed {
            key: client,
            count: 1,
            error: 0,
        }];
        snapshot.clients.recent_seconds = 330.0;
        snapshot.clients.active = vec![(client, 2)];
        snapshot.connection_rates.instant = 4.5;
        let json = serde_json::to_value(proxy_stats(&snapshot)).unwrap();
        assert_eq!(json["activeConnections"], 2);
        // web's 5, and the 4 and 3 of port 443's routes by server name.
        assert_eq!(json["totalConnections"], 12);
        assert_eq!(json["connectionsByRoute"]["web"], 2);
        assert_eq!(json["requestsPerSecond"], 4.5);
        assert_eq!(json["connectionsByIP"]["192.0.2.7"], 2);
        assert_eq!(json["topIPs"][0]["ip"], "192.0.2.7");
        assert_eq!(json["topIPs"][0]["connections"], 5);
        assert_eq!(
            json["topIPsRecent"],
            serde_json::json!([{"ip": "192.0.2.7", "connections": 1, "maxUndercount": 0}])
        );
        assert_eq!(json["topIPsRecentSeconds"], 330.0);
        assert!(json["throughput"]["bytesIn"]["history"].is_array());
        assert_eq!(json["interfaces"][0]["name"], "lo");
        assert_eq!(json["interfaces"][0]["rxBytes"], 1000);
        assert_eq!(json["sources"]["ebpf"]["up"], true);
        assert_eq!(json["sources"]["netlink"]["up"], false);
        assert_eq!(
            json["sources"]["netlink"]["lastError"],
            "Operation not permitted"
        );
        assert_eq!(
            json["sources"]["netlink"]["lastErrorAt"],
            1_700_000_000_000_u64
        );
        assert!(json["sources"]["ebpf"]["lastErrorAt"].is_null());
        let web = &json["routes"][0];
        assert_eq!(web["type"], "http");
        assert_eq!(web["ports"], serde_json::json!([80, 8080]));
        assert_eq!(
            (
                web["opened"].clone(),
                web["closed"].clone(),
                web["active"].clone()
            ),
            (5.into(), 3.into(), 2.into())
        );
        assert_eq!(
            (web["bytesIn"].clone(), web["bytesOut"].clone()),
            (300.into(), 4000.into())
        );
        assert_eq!(web["traffic"]["payloadBytesOut"], 4100);
        // Port 443's live bytes are all its route's without names; the named route's are
        // not told apart, so none are shown (not zeros).
        let [tls, api] = [&json["routes"][1], &json["routes"][2]];
        assert_eq!(tls["serverNames"], serde_json::json!([]));
        assert_eq!(tls["traffic"]["payloadBytesIn"], 4400);
        assert!(tls["throughput"]["bytesIn"]["instant"].is_number());
        assert_eq!(api["serverNames"][0], "api.example.com");
        for field in ["throughput", "traffic", "nftables"] {
            assert!(api[field].is_null(), "{field}: {api}");
        }
        assert_eq!(web["duration"]["count"], 3);
        assert_eq!(web["duration"]["mean"], 0.5);
        // Two of three closed within [8 µs, 16 µs): the median lies there.
        let p50 = web["duration"]["p50"].as_f64().unwrap();
        assert!((8e-6..16e-6).contains(&p50), "{p50}");
    }

    #[test]
    fn upstreams_have_their_own_figures_apart_from_the_clients() {
        let mut snapshot = Snapshot::example();
        snapshot.upstreams[0].connection_rates.instant = 0.5;
        let json = serde_json::to_value(proxy_stats(&snapshot)).unwrap();
        // 2,400 µs over three closes, all in bucket 9, [512 µs, 1024 µs).
        let within = |q: f64| 512e-6 + 512e-6 * q;
        let mut app = json["upstreams"][0].clone();
        for (key, expected) in [
            ("mean", 800e-6),
            ("p50", within(0.5)),
            ("p90", within(0.9)),
            ("p99", within(0.99)),
        ] {
            let value = app["duration"][key].take().as_f64().unwrap();
            assert!((value - expected).abs() < 1e-12, "{key}: {value}");
        }
        assert_eq!(
            app,
            serde_json::json!({
                "name": "app",
                "ports": [9000],
                "opened": 4,
                "closed": 3,
                "untracked": 0,
                "active": 2,
                "openFromBeforeStart": 1,
                "connectFailures": 2,
                "connectsInProgress": 1,
                "bytesIn": 7000,
                "bytesOut": 600,
                "connectionsPerSecond": {"instant": 0.5, "recent": 0.0, "average": 0.0},
                "duration": {"count": 3, "mean": null, "p50": null, "p90": null, "p99": null},
            })
        );
        assert_eq!(json["upstreams"].as_array().unwrap().len(), 1);
        // The clients' figures leave the upstream connections out.
        assert_eq!(json["activeConnections"], 2);
        assert_eq!(json["totalConnections"], 12);
        assert_eq!(
            json["connectionsByRoute"],
            serde_json::json!({"web": 2, "tls": 0, "api": 0}),
            "{json}"
        );

        snapshot.upstreams.clear();
        let json = serde_json::to_value(proxy_stats(&snapshot)).unwrap();
        assert_eq!(json["upstreams"], serde_json::json!([]));
    }

    /// Until the first poll, the per-client figures are empty where they are switched on:
    /// `null` said `client_stats = false` (until 2026-12-05, and through polls that failed
    /// from the start).
    #[test]
    fn before_the_first_read_the_client_figures_are_empty_not_null() {
        let starting = Snapshot::before_first_read(true, crate::snapshot::DnsSnapshot::default());
        let json = serde_json::to_value(proxy_stats(&starting)).unwrap();
        assert_eq!(json["connectionsByIP"], serde_json::json!({}), "{json}");
        assert_eq!(json["topIPs"], serde_json::json!([]), "{json}");
        let off = Snapshot::before_first_read(false, crate::snapshot::DnsSnapshot::default());
        assert!(serde_json::to_value(proxy_stats(&off)).unwrap()["topIPs"].is_null());
    }

    #[test]
    fn without_client_stats_the_client_figures_are_null_not_empty() {
        let mut snapshot = Snapshot::example();
        snapshot.clients.enabled = false;
        let json = serde_json::to_value(proxy_stats(&snapshot)).unwrap();
        assert!(json["connectionsByIP"].is_null(), "{json}");
        assert!(json["topIPs"].is_null(), "{json}");
        // Null, not absent.
        for key in ["topIPsRecent", "topIPsRecentSeconds"] {
            assert_eq!(
                json.get(key),
                Some(&serde_json::Value::Null),
                "{key}: {json}"
            );
        }
        assert_eq!(json["totalConnections"], 12);
    }

    #[test]
    fn routes_on_a_port_shared_by_server_name_say_how_their_connections_were_told_apart() {
        let snapshot = Snapshot::example();
        let json = serde_json::to_value(proxy_stats(&snapshot)).unwrap();
        let route = |name: &str| {
            json["routes"]
                .as_array()
                .unwrap()
                .iter()
                .find(|route| route["name"] == name)
                .unwrap_or_else(|| panic!("no route {name} in {json}"))
                .clone()
        };
        // The fallback: every outcome, zeros included, and its connections waiting.
        let tls = route("tls");
        assert_eq!(tls["serverNames"], serde_json::json!([]));
        assert_eq!(
            tls["serverNameOutcomes"],
            serde_json::json!({
                "matched": 0, "unknownName": 1, "noName": 1, "notTls": 0, "incomplete": 1,
                "malformed": 0, "noData": 1, "missed": 0,
            })
        );
        assert_eq!(tls["awaitingServerName"], 2);
        // A route with names: its names, its outcomes (matched alone), no wait of its own.
        let api = route("api");
        assert_eq!(
            api["serverNames"],
            serde_json::json!(["api.example.com", "*.api.example.com"])
        );
        assert_eq!(api["serverNameOutcomes"]["matched"], 3);
        assert_eq!(api["serverNameOutcomes"]["unknownName"], 0);
        assert!(api.get("awaitingServerName").is_none(), "{api}");
        // A route with its ports to itself has neither.
        let web = route("web");
        assert_eq!(web["serverNames"], serde_json::json!([]));
        for key in ["serverNameOutcomes", "awaitingServerName"] {
            assert!(web.get(key).is_none(), "{key}: {web}");
        }
        // Waiting in no route's figures yet: apart from the totals.
        assert_eq!(json["connectionsAwaitingServerName"], 2);
        assert_eq!(json["activeConnections"], 2);
        assert_eq!(json["connectionsByRoute"]["tls"], 0);

        let mut without = Snapshot::example();
        without.routes.truncate(1);
        let json = serde_json::to_value(proxy_stats(&without)).unwrap();
        assert_eq!(json["connectionsAwaitingServerName"], 0);
    }

    /// A week of good answers, then a minute of failures: the ratios and quantiles show the
    /// minute, the counts the week.
    #[test]
    fn ratios_and_quantiles_are_of_the_last_minute() {
        use crate::snapshot::{DnsLastMinute, RouteLastMinute};
        let mut snapshot = Snapshot::example();
        let dns = &mut snapshot.dns;
        dns.counters.responses_by_rcode[0] = 1_000_000;
        dns.counters.cache_hits = 1_000_000;
        dns.counters.latency[5] = 1_000_000;
        let mut minute = DnsLastMinute {
            queries: 80,
            ..DnsLastMinute::default()
        };
        minute.responses_by_rcode[0] = 5;
        minute.responses_by_rcode[2] = 15;
        minute.cache_hits = 1;
        minute.cache_misses = 3;
        minute.latency[19] = 4;
        dns.last_minute = minute;
        let route = &mut snapshot.routes[0];
        route.last_minute = RouteLastMinute::default();
        route.last_minute.durations[20] = 2;
        let json = serde_json::to_value(dns_stats(&snapshot)).unwrap();
        assert_eq!(json["errorRate"], 0.75);
        // 60 of the minute's 80 queries without a response in it.
        assert_eq!(json["unansweredRate"], 0.75);
        assert_eq!(json["cacheStats"]["hits"], 1_000_000);
        assert_eq!(json["cacheStats"]["hitRate"], 0.25);
        assert_eq!(json["latency"]["count"], 4);
        // Bucket 19 is 0.52 to 1.05 s.
        let p50 = json["latency"]["p50"].as_f64().unwrap();
        assert!(p50 > 0.5 && p50 < 1.1, "{p50}");
        let json = serde_json::to_value(proxy_stats(&snapshot)).unwrap();
        let duration = &json["routes"][0]["duration"];
        assert_eq!(duration["count"], 2, "{duration}");
        assert!(duration["p50"].as_f64().unwrap() > 1.0, "{duration}");
        // A quiet minute has no ratios, whatever the lifetime counts.
        snapshot.dns.last_minute = DnsLastMinute::default();
        let json = serde_json::to_value(dns_stats(&snapshot)).unwrap();
        assert!(json["errorRate"].is_null() && json["cacheStats"]["hitRate"].is_null());
        assert!(json["unansweredRate"].is_null());
        // Responses to the queries of the minute before outnumber this minute's queries.
        snapshot.dns.last_minute.queries = 3;
        snapshot.dns.last_minute.responses_by_rcode[0] = 5;
        let json = serde_json::to_value(dns_stats(&snapshot)).unwrap();
        assert_eq!(json["unansweredRate"], 0.0);
    }

    /// A minute in which a slow upstream's answers came after 10 s for some queries: those
    /// given up count in the quantiles at 10 s, not left out, where the answers alone read
    /// fast; the mean stays the answers'.
    #[test]
    fn queries_given_up_count_in_the_latency_quantiles_at_the_give_up_age() {
        use crate::snapshot::DnsLastMinute;
        let mut snapshot = Snapshot::example();
        let mut minute = DnsLastMinute {
            queries: 100,
            unanswered_queries: 30,
            latency_ns: 70 * 1_000_000,
            ..DnsLastMinute::default()
        };
        // 70 answers of 1 ms (bucket 9 is 512 to 1024 µs).
        minute.latency[9] = 70;
        snapshot.dns.last_minute = minute;
        let latency = |snapshot: &Snapshot| {
            serde_json::to_value(dns_stats(snapshot)).unwrap()["latency"].clone()
        };
        let json = latency(&snapshot);
        assert_eq!(json["count"], 70);
        assert_eq!(json["givenUp"], 30);
        assert!(json["p50"].as_f64().unwrap() < 0.0011, "{json}");
        assert_eq!(json["p90"], 10.0);
        assert_eq!(json["p99"], 10.0);
        assert!(
            (json["mean"].as_f64().unwrap() - 0.001).abs() < 1e-12,
            "{json}"
        );
        // One in a hundred given up: the p99 is still an answer's.
        snapshot.dns.last_minute.latency[9] = 99;
        snapshot.dns.last_minute.unanswered_queries = 1;
        assert!(latency(&snapshot)["p99"].as_f64().unwrap() < 0.0011);
        // None answered: every quantile is the give-up age, the mean absent.
        snapshot.dns.last_minute.latency[9] = 0;
        let json = latency(&snapshot);
        assert_eq!(
            (json["p50"].as_f64(), json["count"].as_u64()),
            (Some(10.0), Some(0))
        );
        assert!(json["mean"].is_null());
        // Answers in 8.4 to 10 s, whose bucket runs on to 16.8 s: never read above the
        // queries given up.
        snapshot.dns.last_minute.latency[23] = 9;
        let json = latency(&snapshot);
        for quantile in ["p50", "p90", "p99"] {
            assert!(json[quantile].as_f64().unwrap() <= 10.0, "{json}");
        }
        snapshot.dns.last_minute.latency[23] = 0;
        // Neither: no quantile.
        snapshot.dns.last_minute.unanswered_queries = 0;
        assert!(latency(&snapshot)["p50"].is_null());
    }

    #[test]
    fn dns_json_has_the_shape_consumers_expect() {
        let snapshot = Snapshot::example();
        let json = serde_json::to_value(dns_stats(&snapshot)).unwrap();
        assert_eq!(json["totalQueries"], 10);
        assert_eq!(json["queryTypeBreakdown"]["A"], 6);
        assert_eq!(json["queryTypeBreakdown"]["AAAA"], 3);
        assert_eq!(json["queryTypeBreakdown"]["OTHER"], 1);
        assert_eq!(json["responseCodes"]["NOERROR"], 6);
        assert_eq!(json["responseCodes"]["SERVFAIL"], 2);
        assert_eq!(json["responseCodes"]["NXDOMAIN"], 1);
        // Only SERVFAIL is a server failure: NXDOMAIN is an answer.
        assert!((json["errorRate"].as_f64().unwrap() - 2.0 / 9.0).abs() < 1e-12);
        // 10 queries, 9 responses.
        assert!((json["unansweredRate"].as_f64().unwrap() - 0.1).abs() < 1e-12);
        assert_eq!(json["cacheStats"]["hits"], 6);
        assert_eq!(json["cacheStats"]["misses"], 2);
        assert_eq!(json["cacheStats"]["hitRate"], 0.75);
        assert_eq!(json["topDomains"][0]["domain"], "example.com");
        assert_eq!(json["topDomains"][0]["count"], 7);
        assert_eq!(
            json["topDomainsRecent"],
            serde_json::json!([{"domain": "example.org", "count": 2, "maxUndercount": 0}])
        );
        assert_eq!(json["topDomainsRecentSeconds"], 420.0);
        assert_eq!(json["latency"]["count"], 8);
        assert_eq!(json["malformed"]["bad_name"], 1);
        assert_eq!(json["inFlight"], 2);
        assert!(json["queryRates"]["history"].is_array());
    }

    #[test]
    fn dns_json_without_matching_has_no_figures_that_need_it() {
        let mut snapshot = Snapshot::example();
        snapshot.dns.match_responses = false;
        let json = serde_json::to_value(dns_stats(&snapshot)).unwrap();
        assert_eq!(json["matchResponses"], false);
        // Absent, not zero: a zero hit rate or latency would read as a real measurement.
        for key in [
            "cacheStats",
            "latency",
            "inFlight",
            "unansweredQueries",
            "unmatchedResponses",
        ] {
            assert!(json[key].is_null(), "{key}: {}", json[key]);
        }
        assert_eq!(json["totalQueries"], 10);
        assert_eq!(json["responseCodes"]["NOERROR"], 6);
        assert_eq!(json["topDomains"][0]["count"], 7);
    }

    #[test]
    fn a_route_named_dns_keeps_its_nftables_counts_apart_from_the_dns_servers() {
        let mut snapshot = Snapshot::example();
        snapshot.routes[0].route.name = "dns".to_owned();
        let counter = |protocol: Protocol, port: u16, packets: u64| crate::nft::CounterValue {
            counter: crate::nft::PlannedCounter {
                name: format!("{}_{port}_in", protocol.as_str()),
                protocol,
                port,
                inbound: true,
                route: "dns".to_owned(),
            },
            packets,
            bytes: packets * 100,
        };
        snapshot.nft = vec![counter(Protocol::Tcp, 80, 3), counter(Protocol::Udp, 53, 7)];
        let proxy = serde_json::to_value(proxy_stats(&snapshot)).unwrap();
        assert_eq!(proxy["routes"][0]["nftables"]["packetsIn"], 3);
        let dns = serde_json::to_value(dns_stats(&snapshot)).unwrap();
        assert_eq!(dns["nftables"]["packetsIn"], 7);
    }
}

//! Prometheus exposition (`OpenMetrics` text) of a snapshot. Pure: renders whatever snapshot
//! it is given, so the output is tested on fixed snapshots without a kernel.
//!
//! Label cardinality is bounded by the config: `route` and `upstream` take the configured
//! route and upstream names (`server_name` a route's configured names, on its server name
//! info only),
//! `interface` the attached interfaces (the configured ones, or those watched by default,
//! which on a Kubernetes node with a routed CNI include each pod's veth: series that come
//! and go with the pods, as the README says),
//! `direction` is `in` or `out`, `kind`, `reason`, `rcode`, `opcode`, `qclass`, `outcome` and
//! `secret` fixed sets, `qtype` at most 259 values; client addresses, domains and the server names clients
//! send never become labels.

use std::{fmt, sync::Arc};

use collector_common::{
    CONN_DURATION_BUCKETS, ConnCounters, DNS_MALFORMED_NAMES, DNS_QTYPE_OTHER, ERROR_KIND_NAMES,
    SNI_OUTCOME_NAMES, map_names, sni_outcome,
};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::{Registry, Unit},
};

use crate::{
    counters::NameRole,
    dns::{COMMON_QTYPES, OPCODE_NAMES, QCLASS_NAMES, RCODE_NAMES, qtype_name},
    http_load::HttpLoad,
    process::ProcessStats,
    secret_reloads::SecretReloads,
    snapshot::{RouteSnapshot, Snapshot, UpstreamSnapshot, bucket_upper_seconds},
};

type Labels = Vec<(&'static str, String)>;

fn route_labels(route: &RouteSnapshot) -> Labels {
    vec![("route", route.route.name.clone())]
}

fn upstream_labels(upstream: &UpstreamSnapshot) -> Labels {
    vec![("upstream", upstream.upstream.name.clone())]
}

/// Longest `ports` label value written: Mimir and Cortex refuse values past 2 KiB by
/// default, and a scrape past Prometheus's `label_value_length_limit` fails whole.
const PORTS_LABEL_MAX: usize = 1024;

/// A route's or upstream's ports as one label value, ascending, runs of three or more as a
/// range: `80,443,8000-8099`. Past [`PORTS_LABEL_MAX`] bytes the ports left out are said as a
/// count, `...,10398,+301 more` (the config and `/api/v1/proxy` list them all).
fn port_list(ports: &[u16]) -> String {
    let mut sorted = ports.to_vec();
    sorted.sort_unstable();
    // Each item's text and how many ports it stands for.
    let mut items: Vec<(String, usize)> = Vec::new();
    for run in sorted.chunk_by(|a, b| b.checked_sub(*a) == Some(1)) {
        match run {
            [first, .., last] if run.len() >= 3 => {
                items.push((format!("{first}-{last}"), run.len()));
            }
            _ => items.extend(run.iter().map(|port| (port.to_string(), 1))),
        }
    }
    let whole: Vec<&str> = items.iter().map(|(text, _)| text.as_str()).collect();
    let whole = whole.join(",");
    if whole.len() <= PORTS_LABEL_MAX {
        return whole;
    }
    // Room for the longest count: ",+65535 more".
    let room = PORTS_LABEL_MAX - ",+65535 more".len();
    let mut written = String::new();
    let mut ports_written = 0;
    for (text, count) in &items {
        if written.len() + 1 + text.len() > room {
            break;
        }
        if !written.is_empty() {
            written.push(',');
        }
        written.push_str(text);
        ports_written += count;
    }
    format!("{written},+{} more", sorted.len() - ports_written)
}

/// An interface's label, escaped as the text formats say. Linux allows `"` and `\` in
/// interface names, and prometheus-client 0.23 writes label values as given: unescaped, one
/// such name would make the whole exposition unparseable.
fn interface_labels(name: &str) -> Labels {
    let mut escaped = String::with_capacity(name.len());
    for c in name.chars() {
        match c {
            '\\' => escaped.push_str("\\\\"),
            '"' => escaped.push_str("\\\""),
            '\n' => escaped.push_str("\\n"),
            c => escaped.push(c),
        }
    }
    vec![("interface", escaped)]
}

fn route_direction_labels(route: &RouteSnapshot, direction: &'static str) -> Labels {
    vec![
        ("route", route.route.name.clone()),
        ("direction", direction.to_owned()),
    ]
}

/// Writes one family of samples.
fn family<S, M>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    metric_type: MetricType,
    samples: impl IntoIterator<Item = (S, M)>,
) -> fmt::Result
where
    S: EncodeLabelSet,
    M: EncodeMetric,
{
    let mut metric = encoder.encode_descriptor(name, help, unit, metric_type)?;
    for (labels, value) in samples {
        value.encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}

fn counters<S: EncodeLabelSet>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    samples: impl IntoIterator<Item = (S, u64)>,
) -> fmt::Result {
    family(
        encoder,
        name,
        help,
        unit,
        MetricType::Counter,
        samples.into_iter().map(|(l, v)| (l, ConstCounter::new(v))),
    )
}

fn gauges<S: EncodeLabelSet, N>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    samples: impl IntoIterator<Item = (S, N)>,
) -> fmt::Result
where
    ConstGauge<N>: EncodeMetric,
{
    family(
        encoder,
        name,
        help,
        unit,
        MetricType::Gauge,
        samples.into_iter().map(|(l, v)| (l, ConstGauge::new(v))),
    )
}

/// Writes one sample without labels.
fn single<M: EncodeMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    metric_type: MetricType,
    value: &M,
) -> fmt::Result {
    value.encode(encoder.encode_descriptor(name, help, unit, metric_type)?)
}

/// The connection figures a route and an upstream both have, for [`connection_families`].
struct ConnectionFigures<'a> {
    labels: Labels,
    conn: &'a ConnCounters,
    durations: &'a [u64; CONN_DURATION_BUCKETS as usize],
    active: u64,
    open_from_before: u64,
}

impl<'a> ConnectionFigures<'a> {
    fn of_route(route: &'a RouteSnapshot) -> Self {
        Self {
            labels: route_labels(route),
            conn: &route.totals.conn,
            durations: &route.totals.durations,
            active: route.active(),
            open_from_before: route.open_from_before,
        }
    }

    fn of_upstream(upstream: &'a UpstreamSnapshot) -> Self {
        Self {
            labels: upstream_labels(upstream),
            conn: &upstream.totals.conn,
            durations: &upstream.totals.durations,
            active: upstream.active(),
            open_from_before: upstream.open_from_before,
        }
    }
}

/// The HELP texts of [`connection_families`]: whose connections they are.
struct ConnectionHelp {
    opened: &'static str,
    closed: &'static str,
    untracked: &'static str,
    active: &'static str,
    open_from_before: &'static str,
    received: &'static str,
    sent: &'static str,
    duration: &'static str,
}

const ROUTE_HELP: ConnectionHelp = ConnectionHelp {
    opened: "Connections accepted on the route's ports.",
    closed: "Accepted connections that have closed.",
    untracked: "Accepted connections the full connection table turned away (collector_bpf_errors_total, kind conn_table_full): counted opened, never closed (their close, duration and bytes are lost), and out of active.",
    active: "Connections open now: opened minus closed and untracked, plus those open since before the collector started.",
    open_from_before: "Connections open since before the collector started and not closed yet (listed over sock_diag); counted in active only.",
    received: "Payload bytes received from clients, counted when each connection closes.",
    sent: "Payload bytes sent to and acknowledged by clients, counted when each connection closes.",
    duration: "Lifetime of closed connections.",
};

const UPSTREAM_HELP: ConnectionHelp = ConnectionHelp {
    opened: "Connections to the upstream's ports that completed their handshake (connect failures not included).",
    closed: "Connections to the upstream's ports that completed their handshake and have closed.",
    untracked: "Connections to the upstream's ports the full connection table turned away (collector_bpf_errors_total, kind conn_table_full): counted opened, never closed (their close, duration and bytes are lost), and out of active.",
    active: "Connections to the upstream open now: opened minus closed and untracked, plus those open since before the collector started.",
    open_from_before: "Connections to the upstream's ports open since before the collector started and not closed yet (listed over sock_diag); counted in active only.",
    received: "Payload bytes received from the upstream, counted when each connection closes.",
    sent: "Payload bytes sent to and acknowledged by the upstream, counted when each connection closes.",
    duration: "Lifetime of closed connections to the upstream, from the completed handshake to the close.",
};

/// Writes the connection families of routes (`prefix` `collector_proxy`) or upstreams
/// (`collector_proxy_upstream`): opened, closed, untracked, active, open from before the start, bytes
/// and the duration histogram. Each family is written even with no samples.
fn connection_families(
    encoder: &mut DescriptorEncoder,
    prefix: &str,
    help: &ConnectionHelp,
    figures: &[ConnectionFigures<'_>],
) -> fmt::Result {
    let gauge = |value: u64| i64::try_from(value).unwrap_or(i64::MAX);
    counters(
        encoder,
        &format!("{prefix}_connections_opened"),
        help.opened,
        None,
        figures.iter().map(|f| (f.labels.clone(), f.conn.opened)),
    )?;
    counters(
        encoder,
        &format!("{prefix}_connections_closed"),
        help.closed,
        None,
        figures.iter().map(|f| (f.labels.clone(), f.conn.closed)),
    )?;
    counters(
        encoder,
        &format!("{prefix}_connections_untracked"),
        help.untracked,
        None,
        figures.iter().map(|f| (f.labels.clone(), f.conn.untracked)),
    )?;
    gauges(
        encoder,
        &format!("{prefix}_connections_active"),
        help.active,
        None,
        figures.iter().map(|f| (f.labels.clone(), gauge(f.active))),
    )?;
    gauges(
        encoder,
        &format!("{prefix}_connections_open_from_before_start"),
        help.open_from_before,
        None,
        figures
            .iter()
            .map(|f| (f.labels.clone(), gauge(f.open_from_before))),
    )?;
    counters(
        encoder,
        &format!("{prefix}_connection_received"),
        help.received,
        Some(&Unit::Bytes),
        figures.iter().map(|f| (f.labels.clone(), f.conn.bytes_in)),
    )?;
    counters(
        encoder,
        &format!("{prefix}_connection_sent"),
        help.sent,
        Some(&Unit::Bytes),
        figures.iter().map(|f| (f.labels.clone(), f.conn.bytes_out)),
    )?;
    let name = format!("{prefix}_connection_duration");
    let mut histogram = encoder.encode_descriptor(
        &name,
        help.duration,
        Some(&Unit::Seconds),
        MetricType::Histogram,
    )?;
    for figures in figures {
        let buckets = log2_buckets(figures.durations);
        #[expect(
            clippy::cast_precision_loss,
            reason = "microsecond sums as float seconds"
        )]
        let sum = figures.conn.duration_us as f64 / 1e6;
        histogram
            .encode_family(&figures.labels)?
            .encode_histogram::<Labels>(sum, figures.durations.iter().sum(), &buckets, None)?;
    }
    Ok(())
}

/// Renders the proxy's connection figures per route.
fn encode_connections(snapshot: &Snapshot, encoder: &mut DescriptorEncoder) -> fmt::Result {
    let routes = &snapshot.routes;
    // Info as a gauge of 1 named `_info`: the classic text parser (promtool) has no info type.
    gauges(
        encoder,
        "collector_proxy_route_info",
        "Configured routes: type and ports (ascending, runs of three or more as a range, 8000-8099; past 1 KiB the rest as a count, +N more), their TLS server names in collector_proxy_route_server_name_info.",
        None,
        routes.iter().map(|route| {
            let labels: Labels = vec![
                ("route", route.route.name.clone()),
                ("type", route.route.kind.as_str().to_owned()),
                ("ports", port_list(&route.route.ports)),
            ];
            (labels, 1i64)
        }),
    )?;
    // A series per name, not one label of them all: a route of a hundred names made a label
    // value past the 2 KiB that Mimir and Cortex refuse by default (and a scrape past
    // Prometheus's `label_value_length_limit` fails whole).
    gauges(
        encoder,
        "collector_proxy_route_server_name_info",
        "TLS server names (SNI) that tell a route apart on the ports it shares with others, one series each; none for a route without names.",
        None,
        routes.iter().flat_map(|route| {
            route.route.sni.iter().map(|name| {
                let labels: Labels = vec![
                    ("route", route.route.name.clone()),
                    ("server_name", name.clone()),
                ];
                (labels, 1i64)
            })
        }),
    )?;
    let figures: Vec<_> = routes.iter().map(ConnectionFigures::of_route).collect();
    connection_families(encoder, "collector_proxy", &ROUTE_HELP, &figures)?;
    single(
        encoder,
        "collector_proxy_connections_from_before_start_known",
        "1 while active connections hold every connection open since before the collector started (routes' and upstreams'); 0 from a start that could not list them (sock_diag failed: the log says why) until the next start, active reading low by them until they close; or while a later listing fails, active keeping the last count.",
        None,
        MetricType::Gauge,
        &ConstGauge::new(i64::from(snapshot.connections_from_before_known)),
    )
}

/// Renders how the connections on ports shared by TLS server name were told apart: every
/// outcome of a fallback route but `matched` (zeros included, so that `rate()` works from the
/// first scrape), `matched` alone of a route with names, nothing of the other routes; and the
/// fallbacks' connections waiting for their ClientHello. Both families are written even with
/// no samples.
fn encode_server_names(snapshot: &Snapshot, encoder: &mut DescriptorEncoder) -> fmt::Result {
    let by_name: Vec<_> = snapshot
        .routes
        .iter()
        .filter_map(|route| Some((route, route.totals.server_names?)))
        .collect();
    counters(
        encoder,
        "collector_proxy_sni_connections",
        "Connections counted opened in the route on a port shared by TLS server name (SNI), by how their route was decided: matched (the ClientHello named one of the route's names, the only outcome of a route with names); on the port's route without names, unknown_name (a name no route of the port has), no_name, not_tls, incomplete (the hello was cut where it cannot be read on: before its extensions, in an extension's header, or the body of its name's extension, over three segments, or over two TLS records; its name past 64 extensions in a segment; or a PROXY header was cut short), malformed, no_data (closed before the client sent anything after a PROXY header, if one came), missed (the first segment, or the next one a hello went on in, was not seen before later data or the close; or the connection found no place to wait for its name: the connection table full, or no socket storage).",
        None,
        by_name.iter().flat_map(|(route, totals)| {
            // `matched` on the routes with names, the rest on the route without: the others
            // are 0 by construction.
            let named = matches!(totals.role, NameRole::Named);
            let matched = sni_outcome::MATCHED as usize;
            let outcomes =
                (0..SNI_OUTCOME_NAMES.len()).filter(move |&outcome| (outcome == matched) == named);
            outcomes.map(move |outcome| {
                let mut labels = route_labels(route);
                labels.push(("outcome", SNI_OUTCOME_NAMES[outcome].to_owned()));
                (labels, totals.counters.outcomes[outcome])
            })
        }),
    )?;
    gauges(
        encoder,
        "collector_proxy_sni_awaiting_connections",
        "Connections accepted on the route's ports shared by TLS server name, waiting for their ClientHello: counted opened in no route yet (their hello, or their close, decides which); each holds a slot of the connection table.",
        None,
        by_name
            .iter()
            .filter(|(_, totals)| totals.role == NameRole::Fallback)
            .map(|(route, totals)| {
                (
                    route_labels(route),
                    i64::try_from(totals.awaiting()).unwrap_or(i64::MAX),
                )
            }),
    )
}

/// Renders the connections the proxy opens to its upstreams: a route's figures, and the
/// connects that failed.
fn encode_upstreams(snapshot: &Snapshot, encoder: &mut DescriptorEncoder) -> fmt::Result {
    let upstreams = &snapshot.upstreams;
    gauges(
        encoder,
        "collector_proxy_upstream_info",
        "Configured upstreams: the remote ports of their backends (written as a route's are).",
        None,
        upstreams.iter().map(|upstream| {
            let mut labels = upstream_labels(upstream);
            labels.push(("ports", port_list(&upstream.upstream.ports)));
            (labels, 1i64)
        }),
    )?;
    let figures: Vec<_> = upstreams
        .iter()
        .map(ConnectionFigures::of_upstream)
        .collect();
    connection_families(
        encoder,
        "collector_proxy_upstream",
        &UPSTREAM_HELP,
        &figures,
    )?;
    counters(
        encoder,
        "collector_proxy_upstream_connect_failures",
        "Connects to the upstream's ports that closed before their handshake completed: refused, timed out, unreachable, or given up by the proxy. Not counted in opened.",
        None,
        upstreams
            .iter()
            .map(|u| (upstream_labels(u), u.totals.connects.connect_failures)),
    )?;
    gauges(
        encoder,
        "collector_proxy_upstream_connects_in_progress",
        "Connects to the upstream's ports waiting for their handshake now (a backend that stopped answering SYNs shows here before the failures); each holds a slot of the connection table.",
        None,
        upstreams.iter().map(|u| {
            (
                upstream_labels(u),
                i64::try_from(u.totals.connects.connecting).unwrap_or(i64::MAX),
            )
        }),
    )
}

/// Renders the live traffic counted by tc: none for routes with server names, whose live
/// bytes count by port, in the route without names of the ports they share (a series of
/// zeros would read as an idle route).
fn encode_traffic(snapshot: &Snapshot, encoder: &mut DescriptorEncoder) -> fmt::Result {
    let per_direction = |pick: fn(&collector_common::TrafficCounters) -> u64| {
        let counted_by_port = snapshot.routes.iter().filter(|r| r.route.sni.is_empty());
        counted_by_port.flat_map(move |r| {
            [
                (route_direction_labels(r, "in"), pick(&r.totals.traffic_in)),
                (
                    route_direction_labels(r, "out"),
                    pick(&r.totals.traffic_out),
                ),
            ]
        })
    };
    counters(
        encoder,
        "collector_proxy_packets",
        "TCP packets on the route's ports seen at the interfaces (in: to the proxy, out: from it); a GSO or GRO batch counts as one. On ports shared by server name all of it counts in the route without names, and routes with names have no series (their bytes are counted at each close, in collector_proxy_connection_received_bytes_total and sent_bytes_total).",
        None,
        per_direction(|t| t.packets),
    )?;
    counters(
        encoder,
        "collector_proxy_traffic",
        "IP bytes (headers included, once per GSO or GRO batch) on the route's ports seen at the interfaces. On ports shared by server name all of it counts in the route without names, and routes with names have no series (their bytes are counted at each close, in collector_proxy_connection_received_bytes_total and sent_bytes_total).",
        Some(&Unit::Bytes),
        per_direction(|t| t.bytes),
    )?;
    counters(
        encoder,
        "collector_proxy_traffic_payload",
        "TCP payload bytes on the route's ports seen at the interfaces, live (before connections close). On ports shared by server name all of it counts in the route without names, and routes with names have no series (their bytes are counted at each close, in collector_proxy_connection_received_bytes_total and sent_bytes_total).",
        Some(&Unit::Bytes),
        per_direction(|t| t.payload_bytes),
    )
}

/// Log2 buckets as Prometheus histogram buckets (upper bounds in seconds, +Inf last).
fn log2_buckets<const N: usize>(counts: &[u64; N]) -> Vec<(f64, u64)> {
    log2_buckets_folded_from(counts, N - 1)
}

/// As [`log2_buckets`], with the buckets from `first_folded` on in +Inf: where nothing can
/// fill them, they would be series that always equal the count.
fn log2_buckets_folded_from(counts: &[u64], first_folded: usize) -> Vec<(f64, u64)> {
    let mut buckets: Vec<(f64, u64)> = (0u32..)
        .zip(&counts[..first_folded])
        .map(|(bucket, &count)| (bucket_upper_seconds(bucket), count))
        .collect();
    buckets.push((f64::MAX, counts[first_folded..].iter().sum()));
    buckets
}

/// The last DNS latency bucket an answer can fill: the one holding the 10 s after which a
/// query is given up (8.4 to 16.8 s); a later answer is unmatched, in no bucket.
const DNS_LATENCY_LAST_BUCKET: u32 = collector_common::duration_bucket::<
    { collector_common::DURATION_BUCKETS },
>(collector_common::DNS_ANSWER_TIMEOUT_NS);

/// Renders the DNS figures (nothing when DNS counting is off).
fn encode_dns(snapshot: &Snapshot, encoder: &mut DescriptorEncoder) -> fmt::Result {
    let dns = &snapshot.dns;
    if !dns.enabled {
        return Ok(());
    }
    let c = &dns.counters;
    counters(
        encoder,
        "collector_dns_queries",
        "Client queries over UDP to the DNS server, by QTYPE of the first question (the common types and OTHER always, others once seen).",
        None,
        c.queries_by_qtype
            .iter()
            .zip(0u32..)
            .filter(|&(&count, slot)| {
                // OTHER too: every type above 257 lands there, and a series that first
                // appears at 1 loses that count to rate() and increase().
                count > 0
                    || slot == DNS_QTYPE_OTHER
                    || COMMON_QTYPES.iter().any(|&t| u32::from(t) == slot)
            })
            .map(|(&count, slot)| (vec![("qtype", qtype_name(slot))], count)),
    )?;
    counters(
        encoder,
        "collector_dns_query_opcodes",
        "Client queries by OPCODE.",
        None,
        // All sixteen, from 0: a series that first appears at 1 loses that first count to
        // rate() and increase().
        OPCODE_NAMES
            .iter()
            .zip(c.queries_by_opcode)
            .map(|(name, count)| (vec![("opcode", (*name).to_owned())], count)),
    )?;
    counters(
        encoder,
        "collector_dns_query_classes",
        "Client queries by QCLASS of the first question: IN, CH (version.bind and id.server probes, which the server answers itself), HS, NONE, ANY, and OTHER for every other class.",
        None,
        QCLASS_NAMES
            .iter()
            .zip(c.queries_by_qclass)
            .map(|(name, count)| (vec![("qclass", (*name).to_owned())], count)),
    )?;
    counters(
        encoder,
        "collector_dns_responses",
        "Responses over UDP from the DNS server to clients, by RCODE: the header's four bits, with the upper eight of an EDNS OPT record where it is the response's one record after the question, as BADVERS and BADCOOKIE answers come (an OPT record behind answers is not read: its response counts under the header's bits). RCODEs from 31 on count as OTHER.",
        None,
        RCODE_NAMES
            .iter()
            .zip(c.responses_by_rcode)
            .map(|(name, count)| (vec![("rcode", (*name).to_owned())], count)),
    )?;
    single(
        encoder,
        "collector_dns_responses_truncated",
        "Responses with the TC bit set (the client retries over TCP).",
        None,
        MetricType::Counter,
        &ConstCounter::new(c.responses_truncated),
    )?;
    counters(
        encoder,
        "collector_dns_malformed",
        "DNS messages on the DNS ports that could not be counted as a query or response, by reason; they pass untouched.",
        None,
        DNS_MALFORMED_NAMES
            .iter()
            .zip(c.malformed)
            .map(|(reason, count)| (vec![("reason", (*reason).to_owned())], count)),
    )?;
    encode_dns_latency_and_health(snapshot, encoder)
}

/// Renders the DNS latency histogram, the inferred cache figures and the DNS self-metrics.
/// Without response matching, the figures that need it are left out rather than shown as 0.
fn encode_dns_latency_and_health(
    snapshot: &Snapshot,
    encoder: &mut DescriptorEncoder,
) -> fmt::Result {
    let dns = &snapshot.dns;
    let c = &dns.counters;
    if dns.match_responses {
        encode_dns_matching(snapshot, encoder)?;
    }
    unlabelled_counters(
        encoder,
        &[
            (
                "collector_dns_upstream_queries",
                "Queries the host sent to an upstream port.",
                c.upstream_queries,
            ),
            (
                "collector_dns_events_dropped",
                "Names, streamed queries and streamed answers the kernel could not hand to the agent: the ring buffer was full, or the query's CPU had no slot in the name table (counters are unaffected; the event stream misses them, and top domains the queries of a dropped name).",
                c.events_dropped,
            ),
            (
                "collector_dns_events_received",
                "DNS events read from the kernel ring buffer.",
                dns.domains.events_received,
            ),
            (
                "collector_dns_names_undecodable",
                "Sampled queries left out of the top domains because their name did not decode (scaled by sample_every; expected 0).",
                dns.domains.undecodable_names,
            ),
        ],
    )
}

/// Counters without labels: (name, help, value).
fn unlabelled_counters(
    encoder: &mut DescriptorEncoder,
    counters: &[(&str, &str, u64)],
) -> fmt::Result {
    for &(name, help, value) in counters {
        single(
            encoder,
            name,
            help,
            None,
            MetricType::Counter,
            &ConstCounter::new(value),
        )?;
    }
    Ok(())
}

/// The figures of responses matched to their queries: latency, cache, in flight.
fn encode_dns_matching(snapshot: &Snapshot, encoder: &mut DescriptorEncoder) -> fmt::Result {
    let dns = &snapshot.dns;
    let c = &dns.counters;
    #[expect(
        clippy::cast_precision_loss,
        reason = "nanosecond sums as float seconds"
    )]
    let latency_sum = c.latency_ns as f64 / 1e9;
    let mut histogram = encoder.encode_descriptor(
        "collector_dns_response_latency",
        "Time from a client's query to the server's response, at the interface, for the queries matched (match_every); an answer after 10 s is not here but in collector_dns_queries_unanswered_total.",
        Some(&Unit::Seconds),
        MetricType::Histogram,
    )?;
    histogram.encode_histogram::<Labels>(
        latency_sum,
        c.latency.iter().sum(),
        &log2_buckets_folded_from(&c.latency, DNS_LATENCY_LAST_BUCKET as usize + 1),
        None,
    )?;
    unlabelled_counters(
        encoder,
        &[
            (
                "collector_dns_cache_hits",
                "Answered queries whose name and type the server did not ask an upstream for (inferred). Of the matched sample (collector_dns_match_sample_ratio).",
                c.cache_hits,
            ),
            (
                "collector_dns_cache_misses",
                "Answered queries whose name and type the server asked an upstream for while the client waited (inferred). Of the matched sample (collector_dns_match_sample_ratio).",
                c.cache_misses,
            ),
            (
                "collector_dns_cache_undecided",
                "Answered queries neither hit nor miss: relayed from a server in another network namespace (a DNAT to it), whose upstream queries are not seen here, or answered without a question (some FORMERR answers). Of the matched sample (collector_dns_match_sample_ratio).",
                c.cache_undecided,
            ),
            (
                "collector_dns_responses_unmatched",
                "Responses with no query waiting in the in-flight table: it went untracked, came before the collector, was answered already (a second answer to a retransmission), or was given up after 10 s (a late answer). Of the matched sample (collector_dns_match_sample_ratio).",
                c.unmatched_responses,
            ),
            (
                "collector_dns_queries_duplicate",
                "Queries repeated with the same client address, port, id and question while waiting. Of the matched sample (collector_dns_match_sample_ratio).",
                c.duplicate_queries,
            ),
            (
                "collector_dns_queries_untracked",
                "Queries that found every in-flight slot of their set held by queries still waiting (latency lost). Of the matched sample (collector_dns_match_sample_ratio).",
                c.untracked_queries,
            ),
            (
                "collector_dns_queries_unanswered",
                "Queries given up unanswered after 10 s, counted when a query of their set or their flow comes, or when their answer comes late. Of the matched sample (collector_dns_match_sample_ratio).",
                c.unanswered_queries,
            ),
        ],
    )?;
    single(
        encoder,
        "collector_dns_queries_in_flight",
        "Queries waiting for their response now. Of the matched sample (collector_dns_match_sample_ratio).",
        None,
        MetricType::Gauge,
        &ConstGauge::new(i64::try_from(dns.in_flight().unwrap_or(0)).unwrap_or(i64::MAX)),
    )?;
    #[expect(clippy::cast_precision_loss, reason = "at most 2^32, exact in an f64")]
    let matched_share = collector_common::dns_match_below(dns.match_every) as f64 / 2f64.powi(32);
    single(
        encoder,
        "collector_dns_match_sample_ratio",
        "Share of client queries matched to their responses ([dns] match_every = N gives 1/N): the latency, cache (hits, misses, undecided), in-flight, unmatched, duplicate, untracked and unanswered figures count that sample.",
        None,
        MetricType::Gauge,
        &ConstGauge::new(matched_share),
    )
}

/// Renders the agent's own health: kernel-side errors, program costs, polling.
fn encode_self(snapshot: &Snapshot, encoder: &mut DescriptorEncoder) -> fmt::Result {
    counters(
        encoder,
        "collector_bpf_errors",
        "What the kernel programs could not count, by kind: conn_table_full (a connection found no slot: counted opened, its close, duration and bytes lost), conn_event_dropped (an event stream line lost to a full ring), conn_client_dropped (a client record lost to a full ring: topIPs maxUndercount grows by these), dns_name_dropped (a name sample lost to a full ring or name table: topDomains maxUndercount grows by these), dns_merged_uncounted (DNS messages after the first of a UDP GSO or GRO packet: in no DNS counter), packet_truncated (shorter than their headers say), packet_malformed (headers contradicting themselves, or an IP version other than the skb's), packet_unparsed (TCP packets whose ports cannot be read: later IPv4 fragments, IPv6 extension headers, an inner VLAN tag: in no route's live bytes; any IPv6 packet past 6 extension headers or 512 bytes). Packet kinds count TCP packets unless said, once per hook; the stack drops truncated and malformed ones. Packets always pass; ring kinds leave counters whole.",
        None,
        ERROR_KIND_NAMES
            .iter()
            .zip(snapshot.errors)
            .map(|(kind, count)| (vec![("kind", (*kind).to_owned())], count)),
    )?;
    family(
        encoder,
        "collector_bpf_program_run",
        "Time spent in each kernel program (kernel.bpf_stats_enabled or --bpf-stats; 0 otherwise).",
        Some(&Unit::Seconds),
        MetricType::Counter,
        snapshot.programs.iter().map(|p| {
            #[expect(clippy::cast_precision_loss, reason = "nanoseconds as float seconds")]
            let seconds = p.run_time_ns as f64 / 1e9;
            (
                vec![("program", p.name.clone())],
                ConstCounter::new(seconds),
            )
        }),
    )?;
    counters(
        encoder,
        "collector_bpf_program_runs",
        "Runs of each kernel program (kernel.bpf_stats_enabled or --bpf-stats; 0 otherwise).",
        None,
        snapshot
            .programs
            .iter()
            .map(|p| (vec![("program", p.name.clone())], p.run_count)),
    )?;
    encode_table_fill(snapshot, encoder)?;
    single(
        encoder,
        "collector_connection_events_received",
        "Records read from the kernel's connection ring: client records (per-client figures) always, open and close events only while someone reads /api/v1/events.",
        None,
        MetricType::Counter,
        &ConstCounter::new(snapshot.clients.events_received),
    )?;
    single(
        encoder,
        "collector_event_stream_lagged",
        "Events that /api/v1/events readers lost, summed over the readers (one event lost by two readers counts twice): by reading too slowly, or not yet taken when their stream ended.",
        None,
        MetricType::Counter,
        &ConstCounter::new(snapshot.stream_lagged),
    )?;
    single(
        encoder,
        "collector_polls",
        "Reads of the kernel maps that succeeded; failed reads count in collector_poll_failures_total.",
        None,
        MetricType::Counter,
        &ConstCounter::new(snapshot.poll.polls),
    )?;
    single(
        encoder,
        "collector_poll_failures",
        "Reads of the kernel maps that failed.",
        None,
        MetricType::Counter,
        &ConstCounter::new(snapshot.poll.failures),
    )?;
    single(
        encoder,
        "collector_poll_duration",
        "Duration of the last poll's read of the kernel: the counter maps, the event ring buffers, the per-client and per-domain tables and, now and then, the listing of connections open from before the start (sock_diag); the nftables and interface reads before it are not included.",
        Some(&Unit::Seconds),
        MetricType::Gauge,
        &ConstGauge::new(snapshot.poll.last_duration_seconds),
    )?;
    encode_attachment(snapshot, encoder)
}

/// Renders where the tc classifiers are attached: the interfaces, the configured ones
/// missing, and each hook's state.
fn encode_attachment(snapshot: &Snapshot, encoder: &mut DescriptorEncoder) -> fmt::Result {
    gauges(
        encoder,
        "collector_interface_info",
        "Interfaces the tc classifiers are attached to, as the last poll found them (a hook found without ours gets it again: collector_tc_reattached_total).",
        None,
        snapshot
            .interfaces
            .iter()
            .map(|name| (interface_labels(name), 1i64)),
    )?;
    gauges(
        encoder,
        "collector_interface_missing",
        "Configured interfaces that this network namespace does not have, or has with a framing the classifiers do not parse: not counted until they appear (then attached).",
        None,
        snapshot
            .missing_interfaces
            .iter()
            .map(|name| (interface_labels(name), 1i64)),
    )?;
    gauges(
        encoder,
        "collector_interface_attach_failed",
        "Interfaces there to count (configured, or up under the default selection) whose last attach of the classifiers failed, the log saying why: not counted, tried again at each poll.",
        None,
        snapshot
            .unattached_interfaces
            .iter()
            .map(|name| (interface_labels(name), 1i64)),
    )?;
    // A count, not a series each: what is excluded is a node's pod veths, by the hundred.
    single(
        encoder,
        "collector_interfaces_excluded",
        "Interfaces the default selection would watch that exclude_interfaces leaves out, as the last poll found them: not counted (collector check, and the log at the start, name them).",
        None,
        MetricType::Gauge,
        &ConstGauge::new(i64::try_from(snapshot.excluded_interfaces).unwrap_or(i64::MAX)),
    )?;
    let hook_labels = |hook: &crate::loader::TcHook| {
        let mut labels = interface_labels(&hook.interface);
        labels.push(("hook", hook.hook.to_owned()));
        labels
    };
    gauges(
        encoder,
        "collector_tc_programs_ahead",
        "TCX programs that run before ours on each attached hook (0 as attached); one that ends the chain, as most do, hides the hook's packets from us.",
        None,
        snapshot.tc_hooks.iter().map(|hook| {
            (
                hook_labels(hook),
                i64::try_from(hook.programs_ahead).unwrap_or(i64::MAX),
            )
        }),
    )?;
    counters(
        encoder,
        "collector_tc_reattached",
        "Times a poll found our program detached from the hook (bpftool link detach, or another tool) and attached it again; the hook's live traffic and DNS went uncounted in between.",
        None,
        snapshot
            .tc_hooks
            .iter()
            .map(|hook| (hook_labels(hook), hook.reattached)),
    )?;
    Ok(())
}

/// Fill of the fixed-size tables, as `node_exporter` reports conntrack: the connection
/// table's from the counters (every tracked connection holds one slot, those waiting for
/// their ClientHello and upstream connects in their handshake included), the in-flight
/// table's from the queries waiting in it (the poll counts them in its memory mapping), the
/// local address table's from the agent's copy, with whether it holds every address.
fn encode_table_fill(snapshot: &Snapshot, encoder: &mut DescriptorEncoder) -> fmt::Result {
    // The in-flight table is unused without response matching.
    let addresses = snapshot.address_table.as_ref();
    let tables: Vec<_> = [
        (
            map_names::CONN_STATE,
            Some(snapshot.tracked_connections()),
            // 0 before the first poll, which no scrape is served.
            (snapshot.connection_table_slots > 0)
                .then(|| u64::from(snapshot.connection_table_slots)),
        ),
        (
            map_names::DNS_INFLIGHT,
            snapshot.dns.in_flight(),
            snapshot.dns.in_flight_slots.map(u64::from),
        ),
        (
            map_names::LOCAL_ADDRESSES,
            addresses.map(|table| table.placed as u64),
            addresses.map(|table| table.slots as u64),
        ),
    ]
    .into_iter()
    .filter_map(|(map, used, limit)| Some((map, used?, limit?)))
    .collect();
    gauges(
        encoder,
        "collector_bpf_map_entries",
        "Slots in use in the kernel's fixed-size tables: CONN_STATE's from the counters (the connections tracked, those in their handshake included, and those a crashed run left under routes no longer configured), DNS_INFLIGHT's the queries awaiting an answer, LOCAL_ADDRESSES' the addresses placed.",
        None,
        tables.iter().map(|(map, used, _)| {
            (
                vec![("map", (*map).to_owned())],
                i64::try_from(*used).unwrap_or(i64::MAX),
            )
        }),
    )?;
    gauges(
        encoder,
        "collector_bpf_map_entries_limit",
        "Slots of the kernel's fixed-size tables.",
        None,
        tables.iter().map(|(map, _, limit)| {
            (
                vec![("map", (*map).to_owned())],
                i64::try_from(*limit).unwrap_or(i64::MAX),
            )
        }),
    )?;
    match addresses {
        Some(table) => single(
            encoder,
            "collector_local_address_table_complete",
            "1 while the table of this namespace's addresses holds them all; 0 while live traffic and DNS on the interfaces are counted by port alone, forwarded packets included (an address did not fit, an AnyIP local route covers a range, or reading the addresses or writing the table failed: see the log). Absent with all_namespaces.",
            None,
            MetricType::Gauge,
            &ConstGauge::new(i64::from(table.complete)),
        ),
        None => Ok(()),
    }
}

/// Renders our nftables table's counters.
fn encode_nft(snapshot: &Snapshot, encoder: &mut DescriptorEncoder) -> fmt::Result {
    let nft_labels = |c: &crate::nft::CounterValue| {
        vec![
            ("route", c.counter.route.clone()),
            ("protocol", c.counter.protocol.as_str().to_owned()),
            ("port", c.counter.port.to_string()),
            (
                "direction",
                if c.counter.inbound { "in" } else { "out" }.to_owned(),
            ),
        ]
    };
    counters(
        encoder,
        "collector_nft_packets",
        "Packets counted by our nftables table per route or DNS port and direction (in: prerouting, destination port; out: postrouting, source port), to (in, also where NAT then sends them on to another host) or from (out) an address of the namespace, or an extra_local_addresses entry, as the eBPF packet counters count; by port alone with all_namespaces, as the eBPF counters count there, or past 1,024 extra_local_addresses entries.",
        None,
        snapshot.nft.iter().map(|c| (nft_labels(c), c.packets)),
    )?;
    counters(
        encoder,
        "collector_nft",
        "Bytes (IP, headers included) counted by our nftables table per route or DNS port and direction.",
        Some(&Unit::Bytes),
        snapshot.nft.iter().map(|c| (nft_labels(c), c.bytes)),
    )
}

/// Which of an interface's counters a family exports.
type Pick = fn(&crate::links::InterfaceStats) -> u64;

/// The interface counter families: name, help, unit, and the counter each exports.
const INTERFACE_FAMILIES: [(&str, &str, Option<&Unit>, Pick); 9] = [
    (
        "collector_interface_receive",
        "Bytes received, the interface's own count.",
        Some(&Unit::Bytes),
        |s| s.rx_bytes,
    ),
    (
        "collector_interface_receive_packets",
        "Packets received, the interface's own count.",
        None,
        |s| s.rx_packets,
    ),
    (
        "collector_interface_receive_errors",
        "Receive errors, the interface's own count.",
        None,
        |s| s.rx_errors,
    ),
    (
        "collector_interface_receive_drops",
        "Received packets dropped, the interface's own count.",
        None,
        |s| s.rx_dropped,
    ),
    (
        "collector_interface_receive_missed",
        "Received packets the device dropped for lack of buffer space (rx_missed_errors: its receive ring full), which the receive drops leave out; the interface's own count.",
        None,
        |s| s.rx_missed,
    ),
    (
        "collector_interface_transmit",
        "Bytes sent, the interface's own count.",
        Some(&Unit::Bytes),
        |s| s.tx_bytes,
    ),
    (
        "collector_interface_transmit_packets",
        "Packets sent, the interface's own count.",
        None,
        |s| s.tx_packets,
    ),
    (
        "collector_interface_transmit_errors",
        "Transmit errors, the interface's own count.",
        None,
        |s| s.tx_errors,
    ),
    (
        "collector_interface_transmit_drops",
        "Packets dropped on transmit, the interface's own count.",
        None,
        |s| s.tx_dropped,
    ),
];

/// Renders the interfaces' own counters (netlink) and each source's health.
fn encode_interfaces_and_sources(
    snapshot: &Snapshot,
    encoder: &mut DescriptorEncoder,
) -> fmt::Result {
    for (name, help, unit, pick) in INTERFACE_FAMILIES {
        counters(
            encoder,
            name,
            help,
            unit,
            snapshot
                .interface_stats
                .iter()
                .map(|i| (interface_labels(&i.name), pick(&i.stats))),
        )?;
    }
    encode_nft(snapshot, encoder)?;
    let source_labels = |name: &str| vec![("source", name.to_owned())];
    gauges(
        encoder,
        "collector_source_up",
        "Whether the last read of each source succeeded (ebpf: the kernel maps; netlink: interfaces; nft: our nftables table's counters, where counted).",
        None,
        snapshot
            .sources
            .iter()
            .map(|(name, h)| (source_labels(name), i64::from(h.up))),
    )?;
    gauges(
        encoder,
        "collector_source_read_duration",
        "Duration of the last read of each source.",
        Some(&Unit::Seconds),
        snapshot
            .sources
            .iter()
            .map(|(name, h)| (source_labels(name), h.last_duration_seconds)),
    )?;
    counters(
        encoder,
        "collector_source_errors",
        "Failed reads of each source.",
        None,
        snapshot
            .sources
            .iter()
            .map(|(name, h)| (source_labels(name), h.errors)),
    )
}

/// Whether the config file (if one was given) would be accepted by a start, and whether it
/// still reads as the config running: the file is read only at the start.
fn encode_config_file(snapshot: &Snapshot, encoder: &mut DescriptorEncoder) -> fmt::Result {
    let Some(file) = snapshot.config_file else {
        return Ok(());
    };
    single(
        encoder,
        "collector_config_file_valid",
        "Whether the config file as it is now would be accepted by a start: its lines, and the credential and certificate files it names (0: the next start, a restart or a reboot, is refused; the log says why).",
        None,
        MetricType::Gauge,
        &ConstGauge::new(i64::from(file.valid)),
    )?;
    single(
        encoder,
        "collector_config_file_applied",
        "Whether the config file as it is now reads as the config running (0: it changed since the start, and the change applies at the next start).",
        None,
        MetricType::Gauge,
        &ConstGauge::new(i64::from(file.applied)),
    )
}

/// Renders the build and the agent's own process, under the names every client library
/// uses (`process_*` unprefixed, so that generic exporter dashboards find them).
fn encode_process(process: Option<&ProcessStats>, encoder: &mut DescriptorEncoder) -> fmt::Result {
    gauges(
        encoder,
        "collector_build_info",
        "The collector's version and the commit it was built from; always 1.",
        None,
        [(
            vec![
                ("version", env!("CARGO_PKG_VERSION").to_owned()),
                ("revision", env!("COLLECTOR_REVISION").to_owned()),
            ],
            1i64,
        )],
    )?;
    single(
        encoder,
        "collector_log_lines_dropped",
        "Log lines dropped because standard error was not read fast enough (the agent never waits for its log).",
        None,
        MetricType::Counter,
        &ConstCounter::new(crate::logging::dropped_lines()),
    )?;
    let Some(process) = process else {
        return Ok(());
    };
    single(
        encoder,
        "process_cpu",
        "Total user and system CPU time spent in seconds.",
        Some(&Unit::Seconds),
        MetricType::Counter,
        &ConstCounter::new(process.cpu_seconds),
    )?;
    for (name, help, unit, value) in [
        (
            "process_resident_memory",
            "Resident memory size in bytes.",
            Some(Unit::Bytes),
            Some(process.resident_memory_bytes),
        ),
        (
            "process_virtual_memory",
            "Virtual memory size in bytes.",
            Some(Unit::Bytes),
            Some(process.virtual_memory_bytes),
        ),
        (
            "process_open_fds",
            "Number of open file descriptors.",
            None,
            Some(process.open_fds),
        ),
        (
            "process_max_fds",
            "Maximum number of open file descriptors.",
            None,
            process.max_fds,
        ),
        (
            "process_threads",
            "Number of OS threads in the process.",
            None,
            Some(process.threads),
        ),
    ] {
        if let Some(value) = value {
            single(
                encoder,
                name,
                help,
                unit.as_ref(),
                MetricType::Gauge,
                &ConstGauge::new(value),
            )?;
        }
    }
    single(
        encoder,
        "process_start_time",
        "Start time of the process since unix epoch in seconds.",
        Some(&Unit::Seconds),
        MetricType::Gauge,
        &ConstGauge::new(process.start_time_seconds),
    )
}

/// The endpoint's secret files: how their last reload went, and when the certificate
/// served expires.
fn encode_secrets(reloads: &SecretReloads, encoder: &mut DescriptorEncoder) -> fmt::Result {
    // Also at each scrape: one kept alive makes no handshake.
    reloads.look_at_certificate();
    gauges(
        encoder,
        "collector_http_secret_last_reload_successful",
        "Whether the last read of each secret file the endpoint serves with succeeded (tls: the certificate and key as a pair; bearer_token; basic_auth_users). A file is read again when it changes, at the next request (tls: the next handshake or scrape); 0 keeps the previous secret in use.",
        None,
        reloads
            .last_reloads()
            .map(|(secret, ok)| (vec![("secret", secret.label().to_owned())], i64::from(ok))),
    )?;
    if let Some(not_after) = reloads.certificate_not_after() {
        single(
            encoder,
            "collector_http_tls_certificate_expiration_timestamp",
            "When the TLS certificate the endpoint serves expires (its notAfter), since the epoch.",
            Some(&Unit::Seconds),
            MetricType::Gauge,
            &ConstGauge::new(not_after),
        )?;
    }
    Ok(())
}

/// What the endpoint's limits turned away, its open event streams and the answers it holds
/// unsent.
fn encode_http_load(load: &HttpLoad, encoder: &mut DescriptorEncoder) -> fmt::Result {
    counters(
        encoder,
        "collector_http_refused",
        "Turned away at an [http] limit, by limit: requests (max_concurrent_requests), event_streams (max_event_streams), password_checks (passwords that got no turn for their bcrypt check within request_timeout_ms; two of an address's are in the queue at once, its others behind them) and request_timeout (request_timeout_ms) answered 503; connections (max_connections, max_connections_per_address, with none idle to close in their place) closed unanswered; unsent_bytes (max_unsent_bytes: the oldest answers not yet taken by their readers when newer ones needed the room) closed mid-answer. Idle connections closed to make room, and TLS handshakes past tls_handshake_timeout_ms, are not counted.",
        None,
        load.refusals()
            .map(|(limit, count)| (vec![("limit", limit.label().to_owned())], count)),
    )?;
    single(
        encoder,
        "collector_http_event_streams",
        "Open /api/v1/events streams (at most [http] max_event_streams).",
        None,
        MetricType::Gauge,
        &ConstGauge::new(load.open_streams()),
    )?;
    single(
        encoder,
        "collector_http_unsent",
        "Bytes of answers held for readers that have not taken them yet (at most [http] max_unsent_bytes, or one answer larger than it); the kernel holds about 16 KiB more a connection unsent (a segment more being built; over TLS, rustls up to 64 KiB).",
        Some(&Unit::Bytes),
        MetricType::Gauge,
        &ConstGauge::new(load.unsent_bytes()),
    )
}

/// Exposes the latest snapshot on every scrape, and the process as it is at the scrape:
/// its CPU and memory move on while the poll is stuck or failing, when they matter most.
/// The endpoint's own figures are read at the scrape too.
#[derive(Debug)]
pub struct SnapshotCollector {
    latest: Arc<crate::poller::SharedSnapshot>,
    secrets: Arc<SecretReloads>,
    http: Arc<HttpLoad>,
    process: fn() -> Option<ProcessStats>,
}

impl Collector for SnapshotCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let snapshot = self.latest.load();
        encode_connections(&snapshot, &mut encoder)?;
        encode_server_names(&snapshot, &mut encoder)?;
        encode_traffic(&snapshot, &mut encoder)?;
        encode_upstreams(&snapshot, &mut encoder)?;
        encode_dns(&snapshot, &mut encoder)?;
        encode_interfaces_and_sources(&snapshot, &mut encoder)?;
        encode_self(&snapshot, &mut encoder)?;
        encode_secrets(&self.secrets, &mut encoder)?;
        encode_http_load(&self.http, &mut encoder)?;
        encode_config_file(&snapshot, &mut encoder)?;
        encode_process((self.process)().as_ref(), &mut encoder)
    }
}

/// A registry exposing the shared snapshot, the endpoint's secret files and this process.
#[must_use]
pub fn registry(
    latest: Arc<crate::poller::SharedSnapshot>,
    secrets: Arc<SecretReloads>,
    http: Arc<HttpLoad>,
) -> Registry {
    registry_reading(latest, secrets, http, ProcessStats::read_or_log)
}

/// [`registry`], with the process figures from `process`.
fn registry_reading(
    latest: Arc<crate::poller::SharedSnapshot>,
    secrets: Arc<SecretReloads>,
    http: Arc<HttpLoad>,
    process: fn() -> Option<ProcessStats>,
) -> Registry {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(SnapshotCollector {
        latest,
        secrets,
        http,
        process,
    }));
    registry
}

/// Renders `registry` as `OpenMetrics` text.
pub fn render(registry: &Registry) -> Result<String, fmt::Error> {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, registry)?;
    Ok(out)
}

/// The classic Prometheus text format (0.0.4) of an OpenMetrics exposition, for scrapers that
/// do not ask for OpenMetrics (promtool among them): a counter's HELP and TYPE carry the
/// `_total` name of its samples, and there are no UNIT or EOF lines.
#[must_use]
pub fn to_classic_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        out.push_str(renamed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{poller::SharedSnapshot, secret_reloads::Secret};

    #[test]
    fn the_ports_label_writes_runs_as_ranges_and_stays_within_its_limit() {
        assert_eq!(port_list(&[8080, 80]), "80,8080");
        assert_eq!(port_list(&[80, 81, 443]), "80,81,443");
        let range: Vec<u16> = (8000..8100).chain([443, 80, 65535]).collect();
        assert_eq!(port_list(&range), "80,443,8000-8099,65535");
        // NodePorts, a whole range: one item.
        let node_ports: Vec<u16> = (30000..=32767).collect();
        assert_eq!(port_list(&node_ports), "30000-32767");
        // 400 ports none next to another: the label is cut, and says how many it leaves out.
        let scattered: Vec<u16> = (0..400).map(|i| 10000 + 2 * i).collect();
        let label = port_list(&scattered);
        assert!(label.len() <= PORTS_LABEL_MAX, "{}", label.len());
        let (written, rest) = label.rsplit_once(",+").unwrap();
        let written: Vec<u16> = written
            .split(',')
            .map(|port| port.parse().unwrap())
            .collect();
        assert_eq!(written, scattered[..written.len()]);
        assert_eq!(rest, format!("{} more", 400 - written.len()));
    }

    #[test]
    fn classic_text_names_counters_by_their_samples() {
        let open = "# HELP x_bytes Bytes.\n# TYPE x_bytes counter\n# UNIT x_bytes bytes\nx_bytes_total 3\n# HELP g A gauge.\n# TYPE g gauge\ng 1\n# EOF\n";
        assert_eq!(
            to_classic_text(open),
            "# HELP x_bytes_total Bytes.\n# TYPE x_bytes_total counter\nx_bytes_total 3\n# HELP g A gauge.\n# TYPE g gauge\ng 1\n"
        );
    }

    #[test]
    fn quotes_and_backslashes_in_an_interface_name_are_escaped() {
        // A valid Linux interface name: `ip link add 'a"b\c' type veth` makes one.
        let name = r#"a"b\c"#;
        let mut snapshot = Snapshot::example();
        snapshot.interfaces = vec![name.into()];
        snapshot.interface_stats[0].name = name.into();
        let latest = Arc::new(SharedSnapshot::default());
        latest.store(snapshot);
        let text = render(&registry(latest, Arc::default(), Arc::default())).unwrap();
        for line in [
            r#"collector_interface_info{interface="a\"b\\c"} 1"#,
            r#"collector_interface_receive_bytes_total{interface="a\"b\\c"} 1000"#,
        ] {
            assert!(text.lines().any(|l| l == line), "no {line} in\n{text}");
        }
    }

    /// As the routes' families with no routes: declared, with no samples, so a config without
    /// upstreams exports no `upstream` series at all.
    #[test]
    fn the_upstream_families_are_declared_without_samples_when_none_is_configured() {
        let mut snapshot = Snapshot::example();
        snapshot.upstreams.clear();
        let latest = Arc::new(SharedSnapshot::default());
        latest.store(snapshot);
        let text = render(&registry(latest, Arc::default(), Arc::default())).unwrap();
        let declared: Vec<&str> = text
            .lines()
            .filter_map(|line| line.strip_prefix("# TYPE collector_proxy_upstream_"))
            .collect();
        assert_eq!(
            declared,
            [
                "info gauge",
                "connections_opened counter",
                "connections_closed counter",
                "connections_untracked counter",
                "connections_active gauge",
                "connections_open_from_before_start gauge",
                "connection_received_bytes counter",
                "connection_sent_bytes counter",
                "connection_duration_seconds histogram",
                "connect_failures counter",
                "connects_in_progress gauge",
            ]
        );
        assert!(!text.contains("upstream="), "{text}");
    }

    /// OTHER is exported from 0, as the common types are; a rare type only once seen.
    #[test]
    fn the_other_qtype_is_exported_before_its_first_query() {
        let mut snapshot = Snapshot::example();
        let counters = &mut snapshot.dns.counters;
        counters.queries_by_qtype[collector_common::DNS_QTYPE_OTHER as usize] = 0;
        counters.queries_by_qtype[99] = 0;
        let latest = Arc::new(SharedSnapshot::default());
        latest.store(snapshot);
        let text = render(&registry(latest, Arc::default(), Arc::default())).unwrap();
        assert!(
            text.contains("collector_dns_queries_total{qtype=\"OTHER\"} 0\n"),
            "{text}"
        );
        assert!(!text.contains("qtype=\"SPF\""), "{text}");
    }

    /// The DNS latency histogram ends at the bucket holding the 10 s give-up (16.777216 s),
    /// then +Inf: the 7 buckets after it (to 2147 s) could never fill. The buckets' sum is
    /// the count whatever they hold.
    #[test]
    fn dns_latency_buckets_end_at_the_give_up() {
        assert_eq!(DNS_LATENCY_LAST_BUCKET, 23);
        let mut latency = [0; collector_common::DURATION_BUCKETS as usize];
        latency[23] = 2;
        latency[31] = 1;
        let buckets = log2_buckets_folded_from(&latency, DNS_LATENCY_LAST_BUCKET as usize + 1);
        assert_eq!(buckets.len(), 25);
        assert_eq!(buckets[23], (16.777_216, 2));
        assert_eq!(buckets[24], (f64::MAX, 1));
        let mut snapshot = Snapshot::example();
        snapshot.dns.counters.latency = latency;
        let latest = Arc::new(SharedSnapshot::default());
        latest.store(snapshot);
        let text = render(&registry(latest, Arc::default(), Arc::default())).unwrap();
        assert!(
            text.contains(
                "collector_dns_response_latency_seconds_bucket{le=\"16.777216\"} 2\n\
                 collector_dns_response_latency_seconds_bucket{le=\"+Inf\"} 3\n"
            ),
            "{text}"
        );
    }

    /// A route of many server names gets a series per name: in one label they made a value
    /// past the 2 KiB that Mimir and Cortex refuse (and a Prometheus with
    /// `label_value_length_limit` fails the whole scrape).
    #[test]
    fn many_server_names_make_many_series_and_no_long_label() {
        let mut snapshot = Snapshot::example();
        let names: Vec<String> = (0..200)
            .map(|n| format!("tenant-{n:03}.customers.example.com"))
            .collect();
        snapshot.routes[2].route.sni.clone_from(&names);
        let latest = Arc::new(SharedSnapshot::default());
        latest.store(snapshot);
        let text = render(&registry(latest, Arc::default(), Arc::default())).unwrap();
        for name in &names {
            let series = format!(
                "collector_proxy_route_server_name_info{{route=\"api\",server_name=\"{name}\"}} 1"
            );
            assert!(text.lines().any(|line| line == series), "{series}");
        }
        let longest = text
            .split('"')
            .skip(1)
            .step_by(2)
            .map(str::len)
            .max()
            .unwrap();
        assert!(longest < 256, "a label value of {longest} bytes");
    }

    /// Connections on a shared port waiting for their hello hold table slots in no route's
    /// counts: the table's fill counts them; without routes by name, the families have no
    /// samples and no server name series.
    #[test]
    fn connections_waiting_for_a_hello_fill_the_table_and_no_names_leave_no_outcomes() {
        let rendered = |snapshot: Snapshot| {
            let latest = Arc::new(SharedSnapshot::default());
            latest.store(snapshot);
            render(&registry(latest, Arc::default(), Arc::default())).unwrap()
        };
        let mut snapshot = Snapshot::example();
        let entries = |text: &str| {
            text.lines()
                .find_map(|line| {
                    line.strip_prefix("collector_bpf_map_entries{map=\"CONN_STATE\"} ")
                })
                .unwrap()
                .to_owned()
        };
        assert_eq!(entries(&rendered(snapshot.clone())), "6");
        let fallback = snapshot.routes[1].totals.server_names.as_mut().unwrap();
        fallback.counters.awaiting = 40;
        assert_eq!(entries(&rendered(snapshot.clone())), "44");

        snapshot.routes.truncate(1);
        let text = rendered(snapshot);
        for family in [
            "# TYPE collector_proxy_sni_connections counter",
            "# TYPE collector_proxy_sni_awaiting_connections gauge",
        ] {
            assert!(text.lines().any(|line| line == family), "{family}:\n{text}");
        }
        assert!(
            !text.contains("collector_proxy_sni_connections_total{"),
            "{text}"
        );
        assert!(
            !text.contains("collector_proxy_sni_awaiting_connections{"),
            "{text}"
        );
        assert!(
            text.contains(
                "collector_proxy_route_info{route=\"web\",type=\"http\",ports=\"80,8080\"} 1"
            ),
            "{text}"
        );
        assert_eq!(entries(&text), "4");
    }

    #[test]
    fn renders_the_golden_exposition() {
        let latest = Arc::new(SharedSnapshot::default());
        latest.store(Snapshot::example());
        // TLS and users in use, the users' last reload failed.
        let secrets = Arc::new(SecretReloads::default());
        secrets.read_at_start(Secret::Tls);
        secrets.read_at_start(Secret::BasicAuthUsers);
        secrets.reloaded(Secret::BasicAuthUsers, false);
        secrets.certificate_served(Some(1_800_000_000));
        let text = render(&registry_reading(latest, secrets, Arc::default(), || {
            Some(ProcessStats::EXAMPLE)
        }))
        .unwrap()
        // The golden file holds for every version.
        .replace(
            concat!("version=\"", env!("CARGO_PKG_VERSION"), "\""),
            "version=\"VERSION\"",
        )
        .replace(
            concat!("revision=\"", env!("COLLECTOR_REVISION"), "\""),
            "revision=\"REVISION\"",
        );
        let golden = include_str!("testdata/metrics.golden");
        assert_eq!(text, golden, "rendered:\n{text}");
    }

    /// OpenMetrics writes HELP as an escaped string: a double quote or a backslash only
    /// escaped. The library writes help texts as they are, so they must hold none bare.
    #[test]
    fn help_texts_are_openmetrics_escaped_strings() {
        for line in include_str!("testdata/metrics.golden").lines() {
            let Some(help) = line.strip_prefix("# HELP ") else {
                continue;
            };
            let mut chars = help.chars();
            while let Some(c) = chars.next() {
                let escaped = c == '\\' && matches!(chars.next(), Some('\\' | 'n' | '"'));
                assert!(c != '"' && (c != '\\' || escaped), "{line}");
            }
        }
    }

    /// Prometheus sends each family's HELP in remote write's metadata, and Mimir cuts it at
    /// 1,024 bytes (Cortex and older Mimir refuse the metadata).
    #[test]
    fn help_texts_fit_in_remote_write_metadata() {
        for line in include_str!("testdata/metrics.golden").lines() {
            let Some(help) = line.strip_prefix("# HELP ") else {
                continue;
            };
            let (_, text) = help.split_once(' ').unwrap();
            assert!(text.len() <= 1024, "{} bytes: {line}", text.len());
        }
    }
}

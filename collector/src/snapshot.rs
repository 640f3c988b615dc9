//! The one snapshot every output reads: kernel totals merged with rates, client statistics
//! and the agent's own health. Built by the poller; scrapes only clone an `Arc` of it.

use std::net::IpAddr;

#[cfg(test)]
use collector_common::{ConnCounters, TrafficCounters};
use collector_common::{DNS_RCODE_SLOTS, DnsCounters, ERROR_KINDS};

use crate::{
    counters::{RouteTotals, UpstreamTotals},
    dns::DomainSnapshot,
    loader::{WatchedRoute, WatchedUpstream},
    rates::Rates,
    topk::Listed,
};

/// One route's figures.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteSnapshot {
    pub route: WatchedRoute,
    pub totals: RouteTotals,
    /// New connections per second.
    pub connection_rates: Rates,
    /// Live payload bytes per second (tc), towards the proxy.
    pub bytes_in_rates: Rates,
    /// Live payload bytes per second (tc), from the proxy.
    pub bytes_out_rates: Rates,
    /// Connections open since before the agent started, not yet closed (see `preexisting`).
    pub open_from_before: u64,
    /// Closes over the last minute, for the duration quantiles.
    pub last_minute: RouteLastMinute,
}

/// One upstream's figures.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamSnapshot {
    pub upstream: WatchedUpstream,
    pub totals: UpstreamTotals,
    /// New connections (established) per second.
    pub connection_rates: Rates,
    /// Connections open since before the agent started, not yet closed.
    pub open_from_before: u64,
    /// Closes over the last minute, for the duration quantiles.
    pub last_minute: RouteLastMinute,
}

impl UpstreamSnapshot {
    /// Connections open now: established and not closed since the start, and those open
    /// since before it.
    #[must_use]
    pub fn active(&self) -> u64 {
        self.tracked() + self.open_from_before
    }

    /// Connections established and not closed since the start.
    #[must_use]
    pub fn tracked(&self) -> u64 {
        still_open(&self.totals.conn)
    }
}

/// A route's closes over the last minute ([`crate::rates::AVERAGE`]): the durations of the
/// connections that ended then, where the lifetime histogram would give those since the start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteLastMinute {
    pub duration_us: u64,
    pub durations: [u64; collector_common::CONN_DURATION_BUCKETS as usize],
}

// Arrays over 32 have no derived `Default`.
impl Default for RouteLastMinute {
    fn default() -> Self {
        Self::of(&RouteTotals::default())
    }
}

impl RouteLastMinute {
    /// The route's lifetime counts, the figures the last minute's are taken from.
    #[must_use]
    pub fn of(totals: &RouteTotals) -> Self {
        Self {
            duration_us: totals.conn.duration_us,
            durations: totals.durations,
        }
    }

    /// The same for an upstream.
    #[must_use]
    pub fn of_upstream(totals: &UpstreamTotals) -> Self {
        Self {
            duration_us: totals.conn.duration_us,
            durations: totals.durations,
        }
    }

    /// What was added since `base`.
    #[must_use]
    pub fn since(&self, base: &Self) -> Self {
        Self {
            // Sums wrap in the kernel and in the per-CPU sum; the difference is exact mod 2^64.
            duration_us: self.duration_us.wrapping_sub(base.duration_us),
            durations: std::array::from_fn(|i| self.durations[i].saturating_sub(base.durations[i])),
        }
    }
}

/// The DNS counts that ratios and quantiles come from, over the last minute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DnsLastMinute {
    /// Client queries, whatever their type.
    pub queries: u64,
    pub responses_by_rcode: [u64; DNS_RCODE_SLOTS as usize],
    pub latency: [u64; collector_common::DURATION_BUCKETS as usize],
    pub latency_ns: u64,
    pub cache_hits: u64,
    pub cache_misses: u64,
    /// Matched queries given up without an answer ([`collector_common::DNS_ANSWER_TIMEOUT_NS`]),
    /// in no latency bucket.
    pub unanswered_queries: u64,
}

impl DnsLastMinute {
    /// The lifetime counts, as a base.
    #[must_use]
    pub fn of(counters: &DnsCounters) -> Self {
        Self {
            queries: counters.queries_by_qtype.iter().sum(),
            responses_by_rcode: counters.responses_by_rcode,
            latency: counters.latency,
            latency_ns: counters.latency_ns,
            cache_hits: counters.cache_hits,
            cache_misses: counters.cache_misses,
            unanswered_queries: counters.unanswered_queries,
        }
    }

    /// What was added since `base`.
    #[must_use]
    pub fn since(&self, base: &Self) -> Self {
        let minus = |now: &[u64], then: &[u64], i: usize| now[i].saturating_sub(then[i]);
        Self {
            queries: self.queries.saturating_sub(base.queries),
            responses_by_rcode: std::array::from_fn(|i| {
                minus(&self.responses_by_rcode, &base.responses_by_rcode, i)
            }),
            latency: std::array::from_fn(|i| minus(&self.latency, &base.latency, i)),
            // A sum of nanoseconds, growing by the queries waiting on average: 100 (100,000
            // answers a second of 1 ms) wrap it in six years, 1,000 in seven months, and the
            // pins keep it over crashes. The difference is exact mod 2^64.
            latency_ns: self.latency_ns.wrapping_sub(base.latency_ns),
            cache_hits: self.cache_hits.saturating_sub(base.cache_hits),
            cache_misses: self.cache_misses.saturating_sub(base.cache_misses),
            unanswered_queries: self
                .unanswered_queries
                .saturating_sub(base.unanswered_queries),
        }
    }
}

impl RouteSnapshot {
    /// Connections open now: those opened and not closed since the start (both counters
    /// exact and monotonic), and those open since before it.
    #[must_use]
    pub fn active(&self) -> u64 {
        self.tracked() + self.open_from_before
    }

    /// Connections opened and not closed since the start.
    #[must_use]
    pub fn tracked(&self) -> u64 {
        still_open(&self.totals.conn)
    }

    /// Connections accepted on the route's ports shared by server name that wait for their
    /// ClientHello: counted opened in no route yet (the kernel counts them in routes without
    /// names; a crashed run's may wait in a route named since).
    #[must_use]
    pub fn awaiting_server_name(&self) -> u64 {
        self.totals
            .server_names
            .as_ref()
            .map_or(0, crate::counters::ServerNameTotals::awaiting)
    }
}

/// Opened and neither closed nor turned away by the full table (those of them still open
/// are left out until a start lists them, as the connections from before it): counters
/// exact and monotonic. The floor at 0 is for a close counted before its open (a route by
/// name decided on one CPU as it closes on another; see `counters::sum_conn`).
pub fn still_open(conn: &collector_common::ConnCounters) -> u64 {
    conn.opened
        .saturating_sub(conn.closed)
        .saturating_sub(conn.untracked)
}

/// Kernel run-time statistics of one program (zero unless BPF stats are enabled).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProgramStats {
    pub name: String,
    pub run_time_ns: u64,
    pub run_count: u64,
}

/// Client addresses seen in connection events.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClientSnapshot {
    /// False with `client_stats = false`: the kernel sends no connection events, and the
    /// figures below are not measured (reported as absent, not as no clients).
    pub enabled: bool,
    /// Heaviest clients by connections opened, highest first.
    pub top: Vec<Listed<IpAddr>>,
    /// As `top`, over the last `recent_seconds` only.
    pub recent: Vec<Listed<IpAddr>>,
    /// How far back `recent` reaches: from one to two [`crate::topk::RECENT_WINDOW`]s, less
    /// since the start, more after polls that stalled.
    pub recent_seconds: f64,
    /// Clients with the most open connections, highest first.
    pub active: Vec<(IpAddr, u64)>,
    /// Connection events read from the kernel.
    pub events_received: u64,
}

/// DNS figures: the kernel's counters, rates, and the top domains from sampled names.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DnsSnapshot {
    /// False when `[dns] enabled = false`: nothing is counted.
    pub enabled: bool,
    /// False when `[dns] match_responses = false`: no latency, cache or in-flight figures.
    pub match_responses: bool,
    /// One query in this many is matched (`[dns] match_every`); the matched figures count
    /// that sample.
    pub match_every: u32,
    pub counters: DnsCounters,
    /// Responses, latencies and cache decisions over the last minute, for the ratios and
    /// quantiles.
    pub last_minute: DnsLastMinute,
    /// Client queries per second.
    pub query_rates: Rates,
    /// Per-poll query rates, oldest first.
    pub query_history: Vec<f64>,
    pub domains: DomainSnapshot,
    /// Queries waiting for their answer, counted in the in-flight table at this poll.
    pub waiting: Option<u64>,
    /// Slots of the in-flight table (`[dns] in_flight_slots`), while responses are matched.
    pub in_flight_slots: Option<u32>,
}

impl DnsSnapshot {
    #[must_use]
    pub fn total_queries(&self) -> u64 {
        self.counters.queries_by_qtype.iter().sum()
    }

    #[must_use]
    pub fn total_responses(&self) -> u64 {
        self.counters.responses_by_rcode.iter().sum()
    }

    /// Queries waiting for their response: those the in-flight table holds, younger than the
    /// timeout. Without the table (a snapshot made up in a test), from the counters: a query
    /// counted while matching is on takes an in-flight slot, which it leaves answered or
    /// given up, unless it goes untracked or is a duplicate of one already there. `None`
    /// while matching is off.
    #[must_use]
    pub fn in_flight(&self) -> Option<u64> {
        let c = &self.counters;
        self.match_responses.then(|| {
            if let Some(waiting) = self.waiting {
                return waiting;
            }
            self.total_queries().saturating_sub(
                c.queries_unmatched
                    + c.answered
                    + c.untracked_queries
                    + c.unanswered_queries
                    + c.duplicate_queries,
            )
        })
    }
}

/// Health of one source of figures, like a good exporter reports it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SourceHealth {
    /// The last read succeeded.
    pub up: bool,
    pub last_duration_seconds: f64,
    /// Failed reads since start.
    pub errors: u64,
    /// The last failure, kept after the source recovers (a flapping source's cause), with
    /// when it was, so that an old one is not taken for the current state.
    pub last_error: Option<String>,
    /// Milliseconds since the Unix epoch.
    pub last_error_at_ms: Option<u64>,
}

impl SourceHealth {
    /// Records one read's outcome.
    pub fn record<T, E: std::fmt::Display>(
        &mut self,
        result: &Result<T, E>,
        took: std::time::Duration,
    ) {
        self.last_duration_seconds = took.as_secs_f64();
        match result {
            Ok(_) => self.up = true,
            Err(err) => {
                self.up = false;
                self.errors += 1;
                self.last_error = Some(err.to_string());
                self.last_error_at_ms = Some(crate::clock::unix_ms());
            }
        }
    }
}

/// One attached interface with the kernel's own counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfaceSnapshot {
    pub name: String,
    pub stats: crate::links::InterfaceStats,
}

/// The agent's own polling health.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PollStats {
    pub polls: u64,
    pub failures: u64,
    pub last_duration_seconds: f64,
}

/// Everything the outputs serve.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    /// Slots of the kernel's connection table (`connection_table_slots`).
    pub connection_table_slots: u32,
    /// Milliseconds since the Unix epoch when the kernel maps were read.
    pub taken_at_ms: u64,
    /// The same moment on the monotonic clock (the wall clock may step), for the figures'
    /// age; `None` before the first read. In the snapshot, so that a reader gets the age of
    /// the figures it has, not of a poll stored after it loaded them.
    pub read_at: Option<std::time::Instant>,
    pub routes: Vec<RouteSnapshot>,
    pub upstreams: Vec<UpstreamSnapshot>,
    /// Connections in the table under slots of routes no longer configured, left by a
    /// crashed run (counted in no route).
    pub retired_connections: u64,
    pub errors: [u64; ERROR_KINDS as usize],
    pub programs: Vec<ProgramStats>,
    pub connection_rates: Rates,
    pub bytes_in_rates: Rates,
    pub bytes_out_rates: Rates,
    /// Per-poll rates, oldest first: the short history behind the rate windows.
    pub connection_history: Vec<f64>,
    pub bytes_in_history: Vec<f64>,
    pub bytes_out_history: Vec<f64>,
    pub clients: ClientSnapshot,
    pub dns: DnsSnapshot,
    /// Events that `/api/v1/events` subscribers lost by falling behind.
    pub stream_lagged: u64,
    /// `active` holds every connection open from before the start (see `preexisting`).
    pub connections_from_before_known: bool,
    pub poll: PollStats,
    /// Interfaces the classifiers are attached to.
    pub interfaces: Vec<String>,
    /// The attached interfaces, and those whose attach fails, with their own counters
    /// (netlink).
    pub interface_stats: Vec<InterfaceSnapshot>,
    /// Each attached hook: the TCX programs that run before ours, and how often ours was
    /// found detached and attached again.
    pub tc_hooks: Vec<crate::loader::TcHook>,
    /// Configured interfaces not there to attach (absent, or with a framing not parsed).
    pub missing_interfaces: Vec<String>,
    /// Interfaces there to count whose last attach failed.
    pub unattached_interfaces: Vec<String>,
    /// Interfaces the default selection would take that `exclude_interfaces` leaves out.
    pub excluded_interfaces: usize,
    /// The local address table's use (`None` with `all_namespaces`).
    pub address_table: Option<crate::address_table::AddressTableUse>,
    /// Health of each source: `ebpf` (the kernel maps), `netlink` (interfaces), `nft`.
    pub sources: Vec<(&'static str, SourceHealth)>,
    /// Our nftables table's counters (empty when off or unavailable).
    pub nft: Vec<crate::nft::CounterValue>,
    /// What the config file says now (`None`: run with the embedded default).
    pub config_file: Option<crate::config_watch::ConfigFileState>,
}

/// An upstream with 4 connections established (1 of them open), 2 failed connects and one
/// open from before the start.
#[cfg(test)]
fn example_upstream() -> UpstreamSnapshot {
    let mut durations = [0; collector_common::CONN_DURATION_BUCKETS as usize];
    durations[9] = 3;
    let totals = UpstreamTotals {
        conn: ConnCounters {
            opened: 4,
            closed: 3,
            bytes_in: 7000,
            bytes_out: 600,
            duration_us: 2_400,
            untracked: 0,
        },
        durations,
        connects: collector_common::UpstreamCounters {
            connect_failures: 2,
            connecting: 1,
        },
    };
    UpstreamSnapshot {
        upstream: WatchedUpstream {
            name: "app".into(),
            ports: vec![9000],
            slot: 1,
        },
        totals,
        connection_rates: Rates::default(),
        open_from_before: 1,
        last_minute: RouteLastMinute::of_upstream(&totals),
    }
}

/// Route `web` (http, ports 80 and 8080): 5 connections, 2 of them open.
#[cfg(test)]
fn example_web_route() -> RouteSnapshot {
    let mut durations = [0u64; collector_common::CONN_DURATION_BUCKETS as usize];
    // Two closes of about 10 µs and one of about 1.5 s: 1.5 s in all.
    durations[3] = 2;
    durations[20] = 1;
    let totals = RouteTotals {
        conn: ConnCounters {
            opened: 5,
            closed: 3,
            bytes_in: 300,
            bytes_out: 4000,
            duration_us: 1_500_000,
            untracked: 0,
        },
        durations,
        traffic_in: TrafficCounters {
            packets: 11,
            bytes: 900,
            payload_bytes: 340,
        },
        traffic_out: TrafficCounters {
            packets: 9,
            bytes: 4600,
            payload_bytes: 4100,
        },
        server_names: None,
    };
    RouteSnapshot {
        route: WatchedRoute {
            name: "web".into(),
            kind: crate::config::RouteKind::Http,
            ports: vec![80, 8080],
            sni: Vec::new(),
            slot: 0,
        },
        totals,
        connection_rates: Rates::default(),
        bytes_in_rates: Rates::default(),
        bytes_out_rates: Rates::default(),
        open_from_before: 0,
        last_minute: RouteLastMinute::of(&totals),
    }
}

/// Port 443 shared by server name: `tls`, its fallback, counted 4 connections (all closed)
/// that named no route of it or whose hello went unread, and 2 wait for their hello there;
/// `api` matched 3 (all closed). The port's live traffic is the fallback's, counted per
/// packet by port.
#[cfg(test)]
fn example_server_name_routes() -> [RouteSnapshot; 2] {
    use collector_common::sni_outcome;

    use crate::counters::{NameRole, ServerNameTotals};
    let route = |name: &str, sni: &[&str], slot, totals: RouteTotals| RouteSnapshot {
        route: WatchedRoute {
            name: name.into(),
            kind: crate::config::RouteKind::Https,
            ports: vec![443],
            sni: sni.iter().map(|&name| name.to_owned()).collect(),
            slot,
        },
        totals,
        connection_rates: Rates::default(),
        bytes_in_rates: Rates::default(),
        bytes_out_rates: Rates::default(),
        open_from_before: 0,
        last_minute: RouteLastMinute::of(&totals),
    };
    let mut fallback = collector_common::SniCounters {
        awaiting: 2,
        ..collector_common::SniCounters::default()
    };
    for outcome in [
        sni_outcome::UNKNOWN_NAME,
        sni_outcome::NO_NAME,
        sni_outcome::INCOMPLETE,
        sni_outcome::NO_DATA,
    ] {
        fallback.outcomes[outcome as usize] = 1;
    }
    let mut durations = [0u64; collector_common::CONN_DURATION_BUCKETS as usize];
    durations[5] = 4;
    let tls = RouteTotals {
        conn: ConnCounters {
            opened: 4,
            closed: 4,
            bytes_in: 2000,
            bytes_out: 9000,
            duration_us: 200,
            untracked: 0,
        },
        durations,
        traffic_in: TrafficCounters {
            packets: 30,
            bytes: 6000,
            payload_bytes: 4400,
        },
        traffic_out: TrafficCounters {
            packets: 25,
            bytes: 12_000,
            payload_bytes: 10_500,
        },
        server_names: Some(ServerNameTotals {
            role: NameRole::Fallback,
            counters: fallback,
        }),
    };
    let mut matched = collector_common::SniCounters::default();
    matched.outcomes[sni_outcome::MATCHED as usize] = 3;
    let mut durations = [0u64; collector_common::CONN_DURATION_BUCKETS as usize];
    durations[10] = 3;
    let api = RouteTotals {
        conn: ConnCounters {
            opened: 3,
            closed: 3,
            bytes_in: 1500,
            bytes_out: 1200,
            duration_us: 4500,
            untracked: 0,
        },
        durations,
        server_names: Some(ServerNameTotals {
            role: NameRole::Named,
            counters: matched,
        }),
        ..RouteTotals::default()
    };
    [
        route("tls", &[], 2, tls),
        route("api", &["api.example.com", "*.api.example.com"], 3, api),
    ]
}

#[cfg(test)]
const EXAMPLE_ADDRESS_TABLE: crate::address_table::AddressTableUse =
    crate::address_table::AddressTableUse {
        placed: 3,
        slots: 65_536,
        complete: true,
    };

/// The example's loopback hook, found detached once.
#[cfg(test)]
fn example_tc_hook() -> crate::loader::TcHook {
    crate::loader::TcHook {
        interface: "lo".into(),
        hook: "ingress",
        programs_ahead: 0,
        reattached: 1,
    }
}

impl Snapshot {
    /// What is served until a poll succeeds: no figures, but what is switched on says so
    /// (`null` per-client figures would read as `client_stats = false`).
    #[must_use]
    pub fn before_first_read(client_stats: bool, dns: DnsSnapshot) -> Self {
        Self {
            clients: ClientSnapshot {
                enabled: client_stats,
                ..ClientSnapshot::default()
            },
            dns,
            ..Self::default()
        }
    }

    /// How long ago the kernel maps were read; `None` before the first read.
    #[must_use]
    pub fn age(&self) -> Option<std::time::Duration> {
        self.read_at.map(|read_at| read_at.elapsed())
    }

    #[must_use]
    pub fn active_connections(&self) -> u64 {
        self.routes.iter().map(RouteSnapshot::active).sum()
    }

    /// Connections holding a slot of the kernel's connection table.
    #[must_use]
    pub fn tracked_connections(&self) -> u64 {
        // Connects in their handshake hold slots too, and so do connections waiting for
        // their ClientHello, which no route counts opened yet.
        let upstreams = self
            .upstreams
            .iter()
            .map(|u| u.tracked() + u.totals.connects.connecting);
        self.routes
            .iter()
            .map(|r| r.tracked() + r.awaiting_server_name())
            .chain(upstreams)
            .sum::<u64>()
            + self.retired_connections
    }

    /// Connections waiting for their ClientHello on ports shared by server name, over every
    /// route: counted opened in none yet.
    #[must_use]
    pub fn awaiting_server_name(&self) -> u64 {
        self.routes
            .iter()
            .map(RouteSnapshot::awaiting_server_name)
            .sum()
    }

    #[must_use]
    pub fn total_connections(&self) -> u64 {
        self.routes.iter().map(|r| r.totals.conn.opened).sum()
    }
}

/// Upper bound of duration bucket `bucket`, in seconds (bucket `i` ends at 2^(i+1) µs).
#[must_use]
pub fn bucket_upper_seconds(bucket: u32) -> f64 {
    2f64.powi((bucket + 1).cast_signed()) / 1e6
}

fn bucket_lower_seconds(bucket: u32) -> f64 {
    if bucket == 0 {
        0.0
    } else {
        bucket_upper_seconds(bucket - 1)
    }
}

/// The `q` quantile of a log2 duration histogram of `N` buckets, interpolating linearly
/// inside the bucket (as Prometheus' `histogram_quantile` does). `None` with no
/// observations. The open-ended last bucket yields its lower bound.
#[must_use]
pub fn histogram_quantile<const N: usize>(buckets: &[u64; N], q: f64) -> Option<f64> {
    let last = u32::try_from(N).ok()?.checked_sub(1)?;
    let total: u64 = buckets.iter().sum();
    if total == 0 {
        return None;
    }
    #[expect(clippy::cast_precision_loss, reason = "counts far below 2^52")]
    let rank = q.clamp(0.0, 1.0) * total as f64;
    let mut cumulative = 0u64;
    for (bucket, &count) in (0..).zip(buckets) {
        #[expect(clippy::cast_precision_loss, reason = "counts far below 2^52")]
        let reached = (cumulative + count) as f64;
        if count > 0 && reached >= rank {
            let lower = bucket_lower_seconds(bucket);
            if bucket == last {
                return Some(lower);
            }
            let upper = bucket_upper_seconds(bucket);
            #[expect(clippy::cast_precision_loss, reason = "counts far below 2^52")]
            let fraction = (rank - cumulative as f64) / count as f64;
            return Some(lower + (upper - lower) * fraction);
        }
        cumulative += count;
    }
    Some(bucket_lower_seconds(last))
}

#[cfg(test)]
impl Snapshot {
    /// A snapshot with every kind of figure set to a distinct value, for output tests.
    pub fn example() -> Snapshot {
        let web = example_web_route();
        let [tls, api] = example_server_name_routes();
        Snapshot {
            connection_table_slots: collector_common::CONN_TABLE_SLOTS,
            routes: vec![web, tls, api],
            upstreams: vec![example_upstream()],
            errors: [1, 2, 0, 3, 4, 5, 6, 7],
            programs: vec![ProgramStats {
                name: "track_connections".into(),
                run_time_ns: 2_500_000_000,
                run_count: 7,
            }],
            poll: PollStats {
                polls: 4,
                failures: 0,
                last_duration_seconds: 0.25,
            },
            interfaces: vec!["lo".into()],
            interface_stats: vec![InterfaceSnapshot {
                name: "lo".into(),
                // Each count its own, so that one exported in another's place shows.
                stats: crate::links::InterfaceStats {
                    rx_bytes: 1000,
                    rx_packets: 10,
                    rx_errors: 1,
                    rx_dropped: 2,
                    rx_missed: 3,
                    tx_bytes: 2000,
                    tx_packets: 20,
                    tx_errors: 4,
                    tx_dropped: 5,
                },
            }],
            tc_hooks: vec![example_tc_hook()],
            missing_interfaces: vec!["eth1".into()],
            unattached_interfaces: vec!["wg0".into()],
            excluded_interfaces: 2,
            connections_from_before_known: true,
            address_table: Some(EXAMPLE_ADDRESS_TABLE),
            sources: vec![
                (
                    "ebpf",
                    SourceHealth {
                        up: true,
                        last_duration_seconds: 0.25,
                        errors: 0,
                        last_error: None,
                        last_error_at_ms: None,
                    },
                ),
                (
                    "netlink",
                    SourceHealth {
                        up: false,
                        last_duration_seconds: 0.5,
                        errors: 1,
                        last_error: Some("Operation not permitted".into()),
                        last_error_at_ms: Some(1_700_000_000_000),
                    },
                ),
                // With its counters below.
                (
                    "nft",
                    SourceHealth {
                        up: true,
                        last_duration_seconds: 0.125,
                        errors: 0,
                        last_error: None,
                        last_error_at_ms: None,
                    },
                ),
            ],
            dns: DnsSnapshot::example(),
            nft: vec![crate::nft::CounterValue {
                counter: crate::nft::PlannedCounter {
                    name: "tcp_80_in".into(),
                    protocol: crate::nft::Protocol::Tcp,
                    port: 80,
                    inbound: true,
                    route: "web".into(),
                },
                packets: 11,
                bytes: 900,
            }],
            // Edited since the start, into a config a start would accept.
            config_file: Some(crate::config_watch::ConfigFileState {
                valid: true,
                applied: false,
            }),
            ..Snapshot::default()
        }
    }
}

#[cfg(test)]
impl DnsSnapshot {
    /// DNS figures of a small, consistent mix: 10 queries, 9 responses, 8 matched.
    fn example() -> DnsSnapshot {
        let mut counters = DnsCounters::default();
        counters.queries_by_qtype[1] = 6;
        counters.queries_by_qtype[28] = 3;
        counters.queries_by_qtype[collector_common::DNS_QTYPE_OTHER as usize] = 1;
        counters.queries_by_opcode[0] = 10;
        // One of them a CH probe (`version.bind`).
        counters.queries_by_qclass[0] = 9;
        counters.queries_by_qclass[1] = 1;
        counters.responses_by_rcode[0] = 6;
        counters.responses_by_rcode[2] = 2;
        counters.responses_by_rcode[3] = 1;
        counters.malformed[collector_common::dns_malformed::BAD_NAME as usize] = 1;
        counters.latency[5] = 6;
        counters.latency[12] = 2;
        // Six answers under 64 µs and two under 8.192 ms.
        counters.latency_ns = 14_000_000;
        counters.answered = 8;
        counters.unmatched_responses = 1;
        counters.cache_hits = 6;
        counters.cache_misses = 2;
        counters.upstream_queries = 2;
        DnsSnapshot {
            enabled: true,
            match_responses: true,
            match_every: 4,
            in_flight_slots: Some(collector_common::DNS_INFLIGHT_SLOTS),
            last_minute: DnsLastMinute::of(&counters),
            counters,
            domains: DomainSnapshot {
                top: vec![
                    Listed {
                        key: "example.com".into(),
                        count: 7,
                        error: 0,
                    },
                    Listed {
                        key: "example.org".into(),
                        count: 3,
                        error: 0,
                    },
                ],
                recent: vec![Listed {
                    key: "example.org".into(),
                    count: 2,
                    error: 0,
                }],
                recent_seconds: 420.0,
                events_received: 18,
                undecodable_names: 0,
            },
            ..DnsSnapshot::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Connections the full table turned away count opened and never closed: out of
    /// `active` and of the table's fill from the start, where they once kept both high.
    #[test]
    fn connections_turned_away_by_the_full_table_are_neither_active_nor_in_it() {
        let mut route = example_web_route();
        route.totals.conn.opened += 4;
        route.totals.conn.untracked = 4;
        route.open_from_before = 1;
        let mut upstream = example_upstream();
        upstream.totals.conn.opened += 2;
        upstream.totals.conn.untracked = 2;
        assert_eq!((route.tracked(), route.active()), (2, 3));
        assert_eq!((upstream.tracked(), upstream.active()), (1, 2));
        let snapshot = Snapshot {
            routes: vec![route],
            upstreams: vec![upstream],
            ..Snapshot::default()
        };
        // The upstream's connect in its handshake holds a slot too.
        assert_eq!(snapshot.tracked_connections(), 2 + 1 + 1);
        assert_eq!(snapshot.active_connections(), 3);
    }

    #[test]
    fn a_minute_over_a_wrapped_sum_reads_what_was_added() {
        let before = DnsLastMinute {
            latency_ns: u64::MAX - 499,
            ..DnsLastMinute::default()
        };
        let after = DnsLastMinute {
            latency_ns: 1_500,
            ..before
        };
        assert_eq!(after.since(&before).latency_ns, 2_000);
        let route = RouteLastMinute {
            duration_us: 100,
            durations: [0; collector_common::CONN_DURATION_BUCKETS as usize],
        };
        let earlier = RouteLastMinute {
            duration_us: u64::MAX,
            ..route
        };
        assert_eq!(route.since(&earlier).duration_us, 101);
    }

    #[test]
    fn a_recovered_source_keeps_its_last_error_and_when_it_was() {
        let mut health = SourceHealth::default();
        let before = crate::clock::unix_ms();
        health.record(
            &Err::<(), _>("Operation not permitted"),
            std::time::Duration::ZERO,
        );
        let at = health.last_error_at_ms.expect("stamped");
        assert!(at >= before, "{at} {before}");
        health.record(&Ok::<(), &str>(()), std::time::Duration::ZERO);
        assert!(health.up);
        assert_eq!(health.errors, 1);
        assert_eq!(
            health.last_error.as_deref(),
            Some("Operation not permitted")
        );
        assert_eq!(health.last_error_at_ms, Some(at));
    }

    #[test]
    fn bucket_bounds_are_powers_of_two_microseconds() {
        assert!((bucket_upper_seconds(0) - 2e-6).abs() < 1e-15);
        assert!((bucket_upper_seconds(19) - 1.048_576).abs() < 1e-9);
        assert!((bucket_upper_seconds(31) - 4_294.967_296).abs() < 1e-6);
        assert!(bucket_lower_seconds(0).abs() < f64::EPSILON);
        assert!((bucket_lower_seconds(1) - 2e-6).abs() < 1e-15);
    }

    #[test]
    fn quantiles_interpolate_within_buckets() {
        let mut buckets = [0u64; collector_common::DURATION_BUCKETS as usize];
        assert_eq!(histogram_quantile(&buckets, 0.5), None);
        // 100 observations in [1.048576 s, 2.097152 s).
        buckets[20] = 100;
        let median = histogram_quantile(&buckets, 0.5).unwrap();
        assert!(
            (median - (1.048_576 + 1.048_576 * 0.5)).abs() < 1e-9,
            "{median}"
        );
        // 10 fast ones in bucket 0, [0, 2 µs): rank 5.5 of 110 lies 0.55 into it, rank 108.9
        // is 98.9 into bucket 20's 100.
        buckets[0] = 10;
        let close = |q: f64, expected: f64| {
            let got = histogram_quantile(&buckets, q).unwrap();
            assert!(
                (got - expected).abs() < 1e-12,
                "q {q}: {got}, not {expected}"
            );
        };
        close(0.05, 2e-6 * 0.55);
        close(0.99, 1.048_576 * (1.0 + 0.989));
        close(1.0, 2.097_152);
        close(0.0, 0.0);
        // A rank on a bucket's upper edge is that edge; the empty buckets between are passed.
        let mut edge = [0u64; collector_common::DURATION_BUCKETS as usize];
        edge[0] = 1;
        edge[5] = 1;
        let on_edge = histogram_quantile(&edge, 0.5).unwrap();
        assert!((on_edge - 2e-6).abs() < 1e-15, "{on_edge}");
        let above = histogram_quantile(&edge, 0.75).unwrap();
        assert!((above - (32e-6 + 32e-6 * 0.5)).abs() < 1e-15, "{above}");
    }

    #[test]
    fn the_open_ended_last_bucket_reads_as_its_lower_bound() {
        use collector_common::CONN_DURATION_BUCKETS;
        let mut buckets = [0u64; CONN_DURATION_BUCKETS as usize];
        let last = CONN_DURATION_BUCKETS - 1;
        buckets[3] = 2;
        buckets[last as usize] = 1;
        for q in [0.9, 0.99, 1.0] {
            assert_eq!(
                histogram_quantile(&buckets, q),
                Some(bucket_lower_seconds(last)),
                "{q}"
            );
        }
        assert!(histogram_quantile(&buckets, 0.5).unwrap() < 16e-6);
    }

    #[test]
    fn connection_lifetimes_of_hours_and_days_have_quantiles_of_their_own() {
        use collector_common::{CONN_DURATION_BUCKETS, duration_bucket};
        let mut buckets = [0u64; CONN_DURATION_BUCKETS as usize];
        let hour_ns = 3_600_000_000_000;
        buckets[duration_bucket::<CONN_DURATION_BUCKETS>(hour_ns) as usize] += 10;
        let median = histogram_quantile(&buckets, 0.5).unwrap();
        assert!((2_147.483_648..4_294.967_296).contains(&median), "{median}");
        buckets[duration_bucket::<CONN_DURATION_BUCKETS>(24 * hour_ns) as usize] += 90;
        let median = histogram_quantile(&buckets, 0.5).unwrap();
        assert!(
            (68_719.476_736..137_438.953_472).contains(&median),
            "{median}"
        );
    }
}

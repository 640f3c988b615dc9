//! The poller: reads the kernel maps at a fixed interval, computes rates over sliding
//! windows and publishes one snapshot that every output reads.

use std::{
    sync::{
        Arc, Mutex, PoisonError, RwLock,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use crate::{
    config_watch::ConfigWatch,
    counters::{self, UpstreamTotals},
    dns::DomainStats,
    event_stream::{EventHub, RingDrops},
    events::{ClientStats, SharedDrain},
    loader::{KernelMaps, WatchedRoute, WatchedUpstream},
    preexisting::Preexisting,
    rates::{AVERAGE, CounterHistory, CountsHistory},
    snapshot::{
        DnsLastMinute, DnsSnapshot, InterfaceSnapshot, PollStats, ProgramStats, RouteLastMinute,
        RouteSnapshot, Snapshot, SourceHealth, UpstreamSnapshot,
    },
};

/// Per-poll rates kept for the short history in the JSON API.
const HISTORY_SAMPLES: usize = 60;

/// The latest snapshot, swapped whole by the poller and cloned (as an `Arc`) by readers.
#[derive(Debug, Default)]
pub struct SharedSnapshot {
    latest: RwLock<Arc<Snapshot>>,
    ready: AtomicBool,
}

impl SharedSnapshot {
    /// Serves `before_first_read` (zeros, and what the config says) until the first poll
    /// stores its figures: the JSON endpoints answer from the bind on, and would otherwise
    /// say DNS counting is off.
    #[must_use]
    pub fn new(before_first_read: Snapshot) -> Self {
        Self {
            latest: RwLock::new(Arc::new(before_first_read)),
            ..Self::default()
        }
    }

    #[must_use]
    pub fn load(&self) -> Arc<Snapshot> {
        Arc::clone(&self.latest.read().unwrap_or_else(PoisonError::into_inner))
    }

    pub fn store(&self, snapshot: Snapshot) {
        *self.latest.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(snapshot);
        self.ready.store(true, Ordering::Release);
    }

    /// Publishes a poll that could not read the kernel maps: the counters last read stay,
    /// with the time they were read, and the sources and poll counts say what failed, so that
    /// `collector_source_up{source="ebpf"}` drops to 0 while it lasts; what the other sources
    /// read is published as a successful poll's is. Readiness stays as it is: in a sidecar,
    /// `/readyz` is the proxy pod's readiness, which a metrics fault must not take out of
    /// its Service.
    pub fn store_failed(&self, health: PollHealth) {
        let mut latest = self.latest.write().unwrap_or_else(PoisonError::into_inner);
        let mut snapshot = Snapshot::clone(&latest);
        snapshot.sources = health.sources;
        snapshot.poll = health.poll;
        health.beside.publish_in(&mut snapshot);
        *latest = Arc::new(snapshot);
    }

    /// True once a first poll succeeded.
    #[must_use]
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }
}

/// What one poll produced.
pub enum Polled {
    Fresh(Box<Snapshot>),
    /// The kernel maps could not be read.
    Failed(Box<PollHealth>),
}

/// Every source's health and the poll counts, as of a poll that could not read the kernel,
/// and what the other sources read.
pub struct PollHealth {
    pub sources: Vec<(&'static str, SourceHealth)>,
    pub poll: PollStats,
    pub beside: BesideTheMaps,
}

/// What a poll reads besides the kernel maps (netlink, nftables, the config file, the
/// programs' run statistics, the event streams' own losses): fresh whether or not the maps
/// could be read, where a failed map read froze the interface counters too while
/// `collector_source_up{source="netlink"}` read 1, and froze the streams' lost events while
/// readers went on losing them.
pub struct BesideTheMaps {
    programs: Vec<ProgramStats>,
    stream_lagged: u64,
    interface_stats: Vec<InterfaceSnapshot>,
    interfaces: Vec<String>,
    tc_hooks: Vec<crate::loader::TcHook>,
    missing_interfaces: Vec<String>,
    unattached_interfaces: Vec<String>,
    excluded_interfaces: usize,
    address_table: Option<crate::address_table::AddressTableUse>,
    nft: Vec<crate::nft::CounterValue>,
    config_file: Option<crate::config_watch::ConfigFileState>,
}

impl BesideTheMaps {
    fn publish_in(self, snapshot: &mut Snapshot) {
        snapshot.programs = self.programs;
        snapshot.stream_lagged = self.stream_lagged;
        snapshot.interface_stats = self.interface_stats;
        snapshot.interfaces = self.interfaces;
        snapshot.tc_hooks = self.tc_hooks;
        snapshot.missing_interfaces = self.missing_interfaces;
        snapshot.unattached_interfaces = self.unattached_interfaces;
        snapshot.excluded_interfaces = self.excluded_interfaces;
        snapshot.address_table = self.address_table;
        snapshot.nft = self.nft;
        snapshot.config_file = self.config_file;
    }
}

/// Histories of the counters that get rates, and of the closes that get quantiles.
struct RateHistories {
    opened: CounterHistory,
    bytes_in: CounterHistory,
    bytes_out: CounterHistory,
    closes: CountsHistory<RouteLastMinute>,
}

impl RateHistories {
    fn new(poll_interval: Duration) -> Self {
        // Keep a little more than the longest window so it is always computable.
        let keep = AVERAGE + Duration::from_secs(5);
        Self {
            opened: CounterHistory::new(keep),
            bytes_in: CounterHistory::new(keep),
            bytes_out: CounterHistory::new(keep),
            closes: CountsHistory::new(keep, poll_interval),
        }
    }

    fn record(&mut self, at: Duration, opened: u64, bytes_in: u64, bytes_out: u64) {
        self.opened.record(at, opened);
        self.bytes_in.record(at, bytes_in);
        self.bytes_out.record(at, bytes_out);
    }

    /// Records the lifetime counts `closes` at `at`: what they gained over the last minute
    /// (in the first minute, since the first poll: the oldest copy is then the base).
    fn last_minute(&mut self, at: Duration, closes: &RouteLastMinute) -> RouteLastMinute {
        let closes = *closes;
        self.closes.record(at, closes);
        self.closes
            .base(at, AVERAGE)
            // `base` has the copy just recorded at least; lifetime counts are never a minute's.
            .map_or_else(RouteLastMinute::default, |base| closes.since(base))
    }
}

/// The interfaces as read over netlink this poll.
#[derive(Debug, Default)]
pub struct InterfaceView {
    /// Interfaces the classifiers are attached to.
    pub attached: Vec<String>,
    /// Every interface, with its counters (as last read when this poll's read failed).
    pub links: Vec<crate::links::Link>,
    /// Each attached hook as the poll's check found it, and the configured interfaces missing.
    pub hooks: crate::loader::HookCheck,
    /// The local address table's use (`None` with `all_namespaces`).
    pub address_table: Option<crate::address_table::AddressTableUse>,
    pub health: SourceHealth,
}

impl InterfaceView {
    /// The counters of the interfaces there to count only: attached, or failing to be (their
    /// own counters do not depend on ours, and series gone while a re-attach fails would end
    /// in Prometheus). The rest of the namespace is not ours to export: on a node whose
    /// `interfaces` are configured, every pod veth would be a series of its own, coming and
    /// going with the pods.
    fn watched_stats(&self) -> Vec<InterfaceSnapshot> {
        // A set: on a node of a thousand pods both lists hold a thousand veths.
        let attached: std::collections::HashSet<&str> = self
            .attached
            .iter()
            .chain(&self.hooks.unattached_interfaces)
            .map(String::as_str)
            .collect();
        self.links
            .iter()
            .filter(|link| attached.contains(link.name.as_str()))
            .filter_map(|link| {
                Some(InterfaceSnapshot {
                    name: link.name.clone(),
                    stats: link.stats?,
                })
            })
            .collect()
    }
}

/// The nftables counters as read this poll.
#[derive(Debug, Default)]
pub struct NftView {
    pub counters: Vec<crate::nft::CounterValue>,
    /// `None` when nftables counting is off in the config.
    pub health: Option<SourceHealth>,
}

/// What the DNS part of a snapshot is made from besides the kernel counters.
pub struct DnsSources {
    pub enabled: bool,
    /// Responses are matched to queries (`[dns] match_responses`).
    pub match_responses: bool,
    /// One query in this many is matched (`[dns] match_every`).
    pub match_every: u32,
    pub domains: Arc<Mutex<DomainStats>>,
    /// Domains listed in the snapshot.
    pub listed: usize,
    /// The in-flight table, while responses are matched.
    pub in_flight: Option<crate::dns::InFlightTable>,
}

impl DnsSources {
    /// The DNS figures before the first read: none, with the settings they are counted by.
    #[must_use]
    pub fn before_first_read(&self) -> DnsSnapshot {
        DnsSnapshot {
            enabled: self.enabled,
            match_responses: self.match_responses,
            match_every: self.match_every,
            in_flight_slots: self.in_flight_slots(),
            ..DnsSnapshot::default()
        }
    }

    fn in_flight_slots(&self) -> Option<u32> {
        self.in_flight
            .as_ref()
            .map(crate::dns::InFlightTable::slots)
    }
}

/// What the poller reads the counters of: the routes and the upstreams, with their slots,
/// and the slots a crashed run left to routes no longer configured; the size of the
/// connection table they hold their connections in; and how often it reads them.
pub struct Watched {
    pub routes: Vec<WatchedRoute>,
    pub upstreams: Vec<WatchedUpstream>,
    pub retired_slots: Vec<u32>,
    pub connection_table_slots: u32,
    pub poll_interval: Duration,
}

pub struct Poller {
    maps: KernelMaps,
    routes: Vec<WatchedRoute>,
    upstreams: Vec<WatchedUpstream>,
    /// Retired slots whose connections may still be in the table (see [`Self::retired_open`]).
    retired_slots: Vec<u32>,
    connection_table_slots: u32,
    kernel: SourceHealth,
    clients: Arc<Mutex<ClientStats>>,
    /// Event rings drained after each counter read (see [`crate::events::RingDrain`]).
    rings: Vec<SharedDrain>,
    dns: DnsSources,
    hub: Arc<EventHub>,
    dns_queries: CounterHistory,
    dns_last_minute: CountsHistory<DnsLastMinute>,
    started: Instant,
    /// DNS samples and client events dropped (pinned counters) before this start's
    /// programs were attached, else at the first read.
    dropped_at_start: Option<RingDrops>,
    total: RateHistories,
    per_route: Vec<RateHistories>,
    per_upstream: Vec<RateHistories>,
    poll: PollStats,
    preexisting: Preexisting,
    /// The config file, looked at every poll (`None`: the embedded default).
    config_watch: Option<ConfigWatch>,
}

/// DNS samples, connection events, client records and name events the kernel dropped to a
/// full ring (pinned counters).
fn ring_dropped(totals: &counters::KernelTotals) -> RingDrops {
    use collector_common::error_kind::{CONN_CLIENT_DROPPED, CONN_EVENT_DROPPED, DNS_NAME_DROPPED};
    RingDrops {
        dns: totals.dns.events_dropped,
        connections: totals.errors[CONN_EVENT_DROPPED as usize],
        clients: totals.errors[CONN_CLIENT_DROPPED as usize],
        names: totals.errors[DNS_NAME_DROPPED as usize],
    }
}

/// The name events and the client records the kernel dropped (a full ring) since this
/// start's `at_start`, read from the pinned counters when called: after a tally table's read,
/// so that a record dropped between the maps' read and the table's, missing from the table's
/// counts, is in the bound too. `dropped` (as the maps' read found them) if they cannot be
/// read again.
fn lost_since(maps: &KernelMaps, at_start: RingDrops, dropped: RingDrops) -> RingDrops {
    let now = counters::read_ring_drops(maps).unwrap_or(dropped);
    RingDrops {
        dns: now.dns.saturating_sub(at_start.dns),
        connections: now.connections.saturating_sub(at_start.connections),
        clients: now.clients.saturating_sub(at_start.clients),
        names: now.names.saturating_sub(at_start.names),
    }
}

impl Poller {
    #[must_use]
    pub fn new(
        maps: KernelMaps,
        Watched {
            routes,
            upstreams,
            retired_slots,
            connection_table_slots,
            poll_interval,
        }: Watched,
        clients: Arc<Mutex<ClientStats>>,
        rings: Vec<SharedDrain>,
        dns: DnsSources,
        hub: Arc<EventHub>,
        preexisting: Preexisting,
    ) -> Self {
        let per_route = routes
            .iter()
            .map(|_| RateHistories::new(poll_interval))
            .collect();
        let per_upstream = upstreams
            .iter()
            .map(|_| RateHistories::new(poll_interval))
            .collect();
        Self {
            maps,
            routes,
            upstreams,
            retired_slots,
            connection_table_slots,
            kernel: SourceHealth::default(),
            clients,
            rings,
            dns,
            hub,
            dns_queries: CounterHistory::new(AVERAGE + Duration::from_secs(5)),
            dns_last_minute: CountsHistory::new(AVERAGE + Duration::from_secs(5), poll_interval),
            started: Instant::now(),
            dropped_at_start: None,
            total: RateHistories::new(poll_interval),
            per_route,
            per_upstream,
            poll: PollStats::default(),
            preexisting,
            config_watch: None,
        }
    }

    /// Each upstream's figures, its rate and last-minute histories recorded at `at`.
    fn upstream_snapshots(
        &mut self,
        at: Duration,
        totals: &[UpstreamTotals],
    ) -> Vec<UpstreamSnapshot> {
        let open_from_before = self.preexisting.per_upstream(self.upstreams.len());
        self.upstreams
            .iter()
            .zip(totals)
            .zip(&mut self.per_upstream)
            .zip(open_from_before)
            .map(|(((upstream, totals), history), open_from_before)| {
                history.opened.record(at, totals.conn.opened);
                let last_minute = history.last_minute(at, &RouteLastMinute::of_upstream(totals));
                UpstreamSnapshot {
                    upstream: upstream.clone(),
                    totals: *totals,
                    connection_rates: history.opened.rates(),
                    open_from_before,
                    last_minute,
                }
            })
            .collect()
    }

    /// Reads the kernel once and builds a snapshot, or says why it could not.
    pub fn poll(
        &mut self,
        programs: Vec<ProgramStats>,
        interfaces: InterfaceView,
        nft: NftView,
    ) -> Polled {
        let (began, began_ms) = (Instant::now(), crate::clock::unix_ms());
        let read = counters::read(&self.maps, &self.routes, &self.upstreams);
        self.kernel.record(&read, began.elapsed());
        let totals = match read {
            Ok(totals) => totals,
            Err(err) => {
                self.poll.failures += 1;
                self.poll.last_duration_seconds = began.elapsed().as_secs_f64();
                tracing::warn!("reading the kernel maps failed: {err}");
                return Polled::Failed(Box::new(PollHealth {
                    sources: sources(&self.kernel, interfaces.health.clone(), nft.health.clone()),
                    poll: self.poll,
                    beside: self.beside_the_maps(programs, interfaces, nft),
                }));
            }
        };
        self.drain_rings();
        let at = began.duration_since(self.started);
        self.preexisting.refresh_now_and_then();
        let open_from_before = self.preexisting.per_route(self.routes.len());
        let mut routes = Vec::with_capacity(self.routes.len());
        let (mut opened, mut bytes_in, mut bytes_out) = (0u64, 0u64, 0u64);
        for (((route, route_totals), history), &open_from_before) in self
            .routes
            .iter()
            .zip(&totals.routes)
            .zip(&mut self.per_route)
            .zip(&open_from_before)
        {
            history.record(
                at,
                route_totals.conn.opened,
                route_totals.traffic_in.payload_bytes,
                route_totals.traffic_out.payload_bytes,
            );
            let last_minute = history.last_minute(at, &RouteLastMinute::of(route_totals));
            opened += route_totals.conn.opened;
            bytes_in += route_totals.traffic_in.payload_bytes;
            bytes_out += route_totals.traffic_out.payload_bytes;
            routes.push(RouteSnapshot {
                route: route.clone(),
                totals: *route_totals,
                connection_rates: history.opened.rates(),
                bytes_in_rates: history.bytes_in.rates(),
                bytes_out_rates: history.bytes_out.rates(),
                open_from_before,
                last_minute,
            });
        }
        let upstreams = self.upstream_snapshots(at, &totals.upstreams);
        let retired_connections = self.retired_open();
        self.total.record(at, opened, bytes_in, bytes_out);
        self.poll.polls += 1;
        // Each event stream says what the kernel's full rings lost since it last did.
        let dropped = ring_dropped(&totals);
        self.hub.ring_dropped(dropped);
        let at_start = *self.dropped_at_start.get_or_insert(dropped);
        let maps = &self.maps;
        let clients = self
            .clients
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .snapshot(|| lost_since(maps, at_start, dropped).clients, at);
        let dns = self.dns_snapshot(at, &totals.dns, at_start, dropped);
        // After the clients' and the domains' tables too, which on a large host are most of it.
        self.poll.last_duration_seconds = began.elapsed().as_secs_f64();
        let sources = sources(&self.kernel, interfaces.health.clone(), nft.health.clone());
        let beside = self.beside_the_maps(programs, interfaces, nft);
        Polled::Fresh(Box::new(Snapshot {
            connection_table_slots: self.connection_table_slots,
            // When the maps were read, not when the lists built after them were done.
            taken_at_ms: began_ms,
            read_at: Some(began),
            routes,
            upstreams,
            retired_connections,
            errors: totals.errors,
            programs: beside.programs,
            connection_rates: self.total.opened.rates(),
            bytes_in_rates: self.total.bytes_in.rates(),
            bytes_out_rates: self.total.bytes_out.rates(),
            connection_history: self.total.opened.history(HISTORY_SAMPLES),
            bytes_in_history: self.total.bytes_in.history(HISTORY_SAMPLES),
            bytes_out_history: self.total.bytes_out.history(HISTORY_SAMPLES),
            clients,
            dns,
            stream_lagged: beside.stream_lagged,
            connections_from_before_known: self.preexisting.known(),
            poll: self.poll,
            sources,
            interface_stats: beside.interface_stats,
            interfaces: beside.interfaces,
            tc_hooks: beside.tc_hooks,
            missing_interfaces: beside.missing_interfaces,
            unattached_interfaces: beside.unattached_interfaces,
            excluded_interfaces: beside.excluded_interfaces,
            address_table: beside.address_table,
            nft: beside.nft,
            config_file: beside.config_file,
        }))
    }

    /// Connections a crashed run left in the table under the slots of routes or upstreams no
    /// longer configured: open by their slot's counters, an upstream's connects in their
    /// handshake, or a route's connections waiting for their hello, they hold places in the
    /// table until they close. A slot found empty is read
    /// no more, as nothing counts into it now.
    fn retired_open(&mut self) -> u64 {
        let maps = &self.maps;
        let mut tracked = 0;
        self.retired_slots.retain(|&slot| {
            match counters::held_in_slot(maps, slot) {
                Ok(held) => {
                    tracked += held;
                    held > 0
                }
                // Tried again at the next poll; the maps' read as a whole says what failed.
                Err(_) => true,
            }
        });
        tracked
    }

    fn beside_the_maps(
        &mut self,
        programs: Vec<ProgramStats>,
        interfaces: InterfaceView,
        nft: NftView,
    ) -> BesideTheMaps {
        BesideTheMaps {
            programs,
            stream_lagged: self.hub.lagged.load(std::sync::atomic::Ordering::Relaxed),
            interface_stats: interfaces.watched_stats(),
            interfaces: interfaces.attached,
            tc_hooks: interfaces.hooks.hooks,
            missing_interfaces: interfaces.hooks.missing_interfaces,
            unattached_interfaces: interfaces.hooks.unattached_interfaces,
            excluded_interfaces: interfaces.hooks.excluded_interfaces,
            address_table: interfaces.address_table,
            nft: nft.counters,
            config_file: self.config_watch.as_mut().map(ConfigWatch::look),
        }
    }

    /// Takes what the kernel queued in the event rings, for the figures and the streams.
    pub fn drain_rings(&self) {
        for ring in &self.rings {
            ring.lock().unwrap_or_else(PoisonError::into_inner).drain();
        }
    }

    /// At a clean stop: takes what the rings still hold, and reads what the kernel's full
    /// rings dropped since the last poll, so that the readers get both before their streams
    /// end (with a minute between polls, that could be a minute's worth of each).
    pub fn last_drain(&self) {
        self.drain_rings();
        match counters::read_ring_drops(&self.maps) {
            Ok(dropped) => self.hub.ring_dropped(dropped),
            Err(err) => tracing::warn!("reading the dropped-event counters at the stop: {err}"),
        }
    }

    /// Counts the samples the kernel drops from these totals on (read before this start's
    /// programs were attached) rather than from the first poll's: those dropped in between
    /// (the nftables setup, the listing of open connections) widen the lists' bounds too.
    #[must_use]
    pub fn counting_drops_from(mut self, dropped: Option<RingDrops>) -> Self {
        self.dropped_at_start = dropped;
        self
    }

    /// Says in each snapshot what the config file says now.
    #[must_use]
    pub fn watching_config(mut self, watch: Option<ConfigWatch>) -> Self {
        self.config_watch = watch;
        self
    }

    /// The DNS figures of a poll at `at`, with their rates; the samples the kernel dropped
    /// since the start (`at_start`; `dropped` as the maps' read found them) widen the top
    /// domains' bounds.
    fn dns_snapshot(
        &mut self,
        at: Duration,
        counters: &collector_common::DnsCounters,
        at_start: RingDrops,
        dropped: RingDrops,
    ) -> DnsSnapshot {
        let maps = &self.maps;
        let mut dns = DnsSnapshot {
            enabled: self.dns.enabled,
            match_responses: self.dns.match_responses,
            match_every: self.dns.match_every,
            counters: *counters,
            domains: self
                .dns
                .domains
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .snapshot(
                    self.dns.listed,
                    || lost_since(maps, at_start, dropped).names,
                    at,
                ),
            waiting: self
                .dns
                .in_flight
                .as_ref()
                .map(crate::dns::InFlightTable::waiting),
            in_flight_slots: self.dns.in_flight_slots(),
            ..DnsSnapshot::default()
        };
        self.dns_queries.record(at, dns.total_queries());
        let counts = DnsLastMinute::of(counters);
        self.dns_last_minute.record(at, counts);
        dns.last_minute = self
            .dns_last_minute
            .base(at, AVERAGE)
            .map_or_else(DnsLastMinute::default, |base| counts.since(base));
        dns.query_rates = self.dns_queries.rates();
        dns.query_history = self.dns_queries.history(HISTORY_SAMPLES);
        dns
    }
}

/// The health of each source, nftables only where it is read.
fn sources(
    kernel: &SourceHealth,
    netlink: SourceHealth,
    nft: Option<SourceHealth>,
) -> Vec<(&'static str, SourceHealth)> {
    [
        Some(("ebpf", kernel.clone())),
        Some(("netlink", netlink)),
        nft.map(|health| ("nft", health)),
    ]
    .into_iter()
    .flatten()
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics;

    #[test]
    fn before_the_first_read_the_dns_figures_say_how_they_will_be_counted() {
        let sources = DnsSources {
            enabled: true,
            match_responses: true,
            match_every: 4,
            domains: Arc::new(Mutex::new(crate::dns::DomainStats::new(
                10,
                1,
                crate::tally::TallyTable::unmapped(0),
            ))),
            listed: 10,
            in_flight: None,
        };
        let shared = SharedSnapshot::new(Snapshot {
            dns: sources.before_first_read(),
            ..Snapshot::default()
        });
        assert!(!shared.is_ready());
        assert_eq!(shared.load().read_at, None);
        let json = serde_json::to_value(crate::api::dns_stats(&shared.load())).unwrap();
        assert_eq!(json["enabled"], true, "{json}");
        assert_eq!(json["matchResponses"], true, "{json}");
        assert_eq!(json["matchEvery"], 4, "{json}");
        assert_eq!(json["totalQueries"], 0, "{json}");
        assert_eq!(json["cacheStats"]["hits"], 0, "{json}");
    }

    #[test]
    fn only_the_attached_interfaces_are_exported() {
        let link = |index, name: &str| crate::links::Link {
            index,
            name: name.into(),
            alt_names: Vec::new(),
            up: true,
            framing: crate::links::Framing::Ethernet,
            loopback: index == 1,
            controller: None,
            lower: None,
            kind: String::new(),
            stats: Some(crate::links::InterfaceStats {
                rx_bytes: 7,
                ..crate::links::InterfaceStats::default()
            }),
        };
        // `interfaces = ["lo"]` on a node with a pod's veth.
        let view = InterfaceView {
            attached: vec!["lo".into()],
            links: vec![link(1, "lo"), link(9, "veth3f2a")],
            hooks: crate::loader::HookCheck::default(),
            address_table: None,
            health: SourceHealth::default(),
        };
        let shared = Arc::new(SharedSnapshot::default());
        shared.store(Snapshot {
            interface_stats: view.watched_stats(),
            interfaces: view.attached,
            ..Snapshot::example()
        });

        let text = metrics::render(&metrics::registry(
            Arc::clone(&shared),
            Arc::default(),
            Arc::default(),
        ))
        .unwrap();
        assert!(
            text.contains("collector_interface_receive_bytes_total{interface=\"lo\"} 7"),
            "{text}"
        );
        assert!(!text.contains("veth3f2a"), "{text}");
        let json = serde_json::to_value(crate::api::proxy_stats(&shared.load())).unwrap();
        assert_eq!(
            json["interfaces"],
            serde_json::json!([{
                "name": "lo", "rxBytes": 7, "rxPackets": 0, "rxErrors": 0, "rxDropped": 0,
                "rxMissed": 0, "txBytes": 0, "txPackets": 0, "txErrors": 0, "txDropped": 0,
            }])
        );
    }

    #[test]
    fn a_failed_poll_keeps_the_counters_read_reports_the_kernel_source_down_and_the_rest_fresh() {
        let shared = Arc::new(SharedSnapshot::default());
        let good = Snapshot::example();
        shared.store(good.clone());
        let down = SourceHealth {
            up: false,
            last_duration_seconds: 0.001,
            errors: 1,
            last_error: Some("Operation not permitted".to_owned()),
            last_error_at_ms: Some(1_700_000_000_000),
        };
        let poll = PollStats {
            polls: good.poll.polls,
            failures: good.poll.failures + 1,
            last_duration_seconds: 0.001,
        };
        // The interfaces read over netlink in the same poll, which did not fail.
        let mut lo = good.interface_stats[0].clone();
        lo.stats.rx_bytes += 500;
        // The programs' statistics and the streams' losses, read beside the maps too.
        let mut stats = good.programs[0].clone();
        stats.run_count += 3;
        shared.store_failed(PollHealth {
            sources: sources(&down, SourceHealth::default(), None),
            poll,
            beside: BesideTheMaps {
                programs: vec![stats.clone()],
                stream_lagged: good.stream_lagged + 7,
                interface_stats: vec![lo.clone()],
                interfaces: vec!["lo".into()],
                tc_hooks: Vec::new(),
                missing_interfaces: Vec::new(),
                unattached_interfaces: vec!["wg1".into()],
                excluded_interfaces: 3,
                address_table: None,
                nft: Vec::new(),
                config_file: None,
            },
        });

        let after = shared.load();
        assert!(shared.is_ready());
        assert_eq!(after.taken_at_ms, good.taken_at_ms);
        assert_eq!(after.routes, good.routes);
        assert_eq!(after.dns, good.dns);
        assert_eq!(after.poll, poll);
        assert_eq!(after.interface_stats, [lo]);
        assert_eq!(after.unattached_interfaces, ["wg1"]);
        assert_eq!(after.excluded_interfaces, 3);
        assert_eq!(after.programs, [stats]);
        assert_eq!(after.stream_lagged, good.stream_lagged + 7);
        let text = metrics::render(&metrics::registry(
            Arc::clone(&shared),
            Arc::default(),
            Arc::default(),
        ))
        .unwrap();
        let line = |name: &str| {
            text.lines()
                .find(|line| line.starts_with(name))
                .unwrap_or_else(|| panic!("no {name} in\n{text}"))
                .to_owned()
        };
        assert_eq!(
            line("collector_source_up{source=\"ebpf\"}"),
            "collector_source_up{source=\"ebpf\"} 0"
        );
        assert_eq!(
            line("collector_poll_failures_total"),
            format!("collector_poll_failures_total {}", good.poll.failures + 1)
        );
    }
}

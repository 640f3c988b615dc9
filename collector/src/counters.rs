//! Reading the kernel's counters: per-CPU values summed for each watched route. Runs on the
//! poller only; scrapes never reach the kernel.

use std::{borrow::Borrow, collections::HashSet};

use aya::maps::{MapData, PerCpuArray};
use collector_common::{
    CONN_DURATION_BUCKETS, ConnCounters, ConnDurations, DIR_IN, DIR_OUT, DnsCounters, ERROR_KINDS,
    SniCounters, TrafficCounters, UpstreamCounters, traffic_index,
};

use crate::{
    event_stream::RingDrops,
    loader::{KernelMaps, WatchedRoute, WatchedUpstream},
};

/// Totals of one route, summed over CPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteTotals {
    pub conn: ConnCounters,
    /// Closed connections per duration bucket (see
    /// `collector_common::CONN_DURATION_BUCKETS`).
    pub durations: [u64; CONN_DURATION_BUCKETS as usize],
    pub traffic_in: TrafficCounters,
    pub traffic_out: TrafficCounters,
    /// On ports shared by TLS server name only: how its connections were told apart.
    pub server_names: Option<ServerNameTotals>,
}

// Arrays over 32 have no derived `Default`.
impl Default for RouteTotals {
    fn default() -> Self {
        Self {
            conn: ConnCounters::default(),
            durations: [0; CONN_DURATION_BUCKETS as usize],
            traffic_in: TrafficCounters::default(),
            traffic_out: TrafficCounters::default(),
            server_names: None,
        }
    }
}

/// A route's part where routes share ports by TLS server name (SNI).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameRole {
    /// It has server names (`sni`): it counts the connections whose ClientHello names one.
    Named,
    /// It has none, on a port routes with names share: it counts that port's other
    /// connections, which wait in it for their ClientHello.
    Fallback,
}

/// Each route's part in telling connections apart by server name, in the routes' order:
/// `None` for a route no route with names shares a port with. The config gives each shared
/// port exactly one route without names.
#[must_use]
pub fn name_roles(routes: &[WatchedRoute]) -> Vec<Option<NameRole>> {
    let shared: HashSet<u16> = routes
        .iter()
        .filter(|route| !route.sni.is_empty())
        .flat_map(|route| route.ports.iter().copied())
        .collect();
    routes
        .iter()
        .map(|route| {
            if !route.sni.is_empty() {
                Some(NameRole::Named)
            } else if route.ports.iter().any(|port| shared.contains(port)) {
                Some(NameRole::Fallback)
            } else {
                None
            }
        })
        .collect()
}

/// The server-name figures of a route on shared ports, summed over CPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerNameTotals {
    pub role: NameRole,
    /// `outcomes`: connections counted opened in the route by how their route was decided
    /// (`collector_common::sni_outcome`; a named route's are all matched). `awaiting`:
    /// connections accepted on its shared ports still waiting for their ClientHello,
    /// counted opened in no route yet but holding table slots (a fallback's, but for a
    /// crashed run's in a route named since).
    pub counters: SniCounters,
}

impl ServerNameTotals {
    /// Connections waiting for their ClientHello in this route. The kernel counts them in
    /// routes without names only, but a crashed run's may wait in a slot whose route has
    /// names since the restart: still waiting, still holding table slots.
    #[must_use]
    pub fn awaiting(&self) -> u64 {
        self.counters.awaiting
    }
}

/// Totals of one upstream, summed over CPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpstreamTotals {
    /// Connections established to the upstream's ports, and their close accounting.
    pub conn: ConnCounters,
    pub durations: [u64; CONN_DURATION_BUCKETS as usize],
    /// Connects that closed before their handshake completed, and those in their handshake.
    pub connects: UpstreamCounters,
}

impl Default for UpstreamTotals {
    fn default() -> Self {
        Self {
            conn: ConnCounters::default(),
            durations: [0; CONN_DURATION_BUCKETS as usize],
            connects: UpstreamCounters::default(),
        }
    }
}

/// Everything read from the kernel in one poll.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelTotals {
    /// In the order of the watched routes.
    pub routes: Vec<RouteTotals>,
    /// In the order of the watched upstreams.
    pub upstreams: Vec<UpstreamTotals>,
    pub errors: [u64; ERROR_KINDS as usize],
    pub dns: DnsCounters,
}

/// One entry of a per-CPU `u64` array, summed over CPUs.
pub fn sum_u64<T: Borrow<MapData>>(
    map: &PerCpuArray<T, u64>,
    index: u32,
) -> Result<u64, aya::maps::MapError> {
    Ok(map
        .get(&index, 0)?
        .iter()
        .copied()
        .fold(0, u64::wrapping_add))
}

/// One entry of a per-CPU traffic array, summed over CPUs.
pub fn sum_traffic(
    map: &PerCpuArray<MapData, TrafficCounters>,
    index: u32,
) -> Result<TrafficCounters, aya::maps::MapError> {
    Ok(map
        .get(&index, 0)?
        .iter()
        .fold(TrafficCounters::default(), |acc, v| TrafficCounters {
            packets: acc.packets.wrapping_add(v.packets),
            bytes: acc.bytes.wrapping_add(v.bytes),
            payload_bytes: acc.payload_bytes.wrapping_add(v.payload_bytes),
        }))
}

/// One route's duration histogram, summed over CPUs bucket by bucket.
pub fn sum_durations(
    map: &PerCpuArray<MapData, ConnDurations>,
    index: u32,
) -> Result<[u64; CONN_DURATION_BUCKETS as usize], aya::maps::MapError> {
    let mut totals = [0u64; CONN_DURATION_BUCKETS as usize];
    for per_cpu in map.get(&index, 0)?.iter() {
        for (total, count) in totals.iter_mut().zip(per_cpu.buckets) {
            *total = total.wrapping_add(count);
        }
    }
    Ok(totals)
}

/// One upstream's connects, summed over CPUs. `connecting` is raised on one CPU and lowered
/// on another (a wrapping add of `u64::MAX`), and the CPUs are read one after another: a
/// handshake that ends while they are read can be seen ending and not starting, a sum
/// below 0, which reads as 0.
pub fn sum_upstream(
    map: &PerCpuArray<MapData, UpstreamCounters>,
    index: u32,
) -> Result<UpstreamCounters, aya::maps::MapError> {
    let sum = map
        .get(&index, 0)?
        .iter()
        .fold(UpstreamCounters::default(), |acc, v| UpstreamCounters {
            connect_failures: acc.connect_failures.wrapping_add(v.connect_failures),
            connecting: acc.connecting.wrapping_add(v.connecting),
        });
    Ok(UpstreamCounters {
        connecting: floor_at_zero(sum.connecting),
        ..sum
    })
}

/// A wrapping sum of per-CPU increments and decrements, below 0 read as 0.
fn floor_at_zero(sum: u64) -> u64 {
    u64::try_from(sum.cast_signed()).unwrap_or(0)
}

/// The places slot `index` holds in the connection table: its connections still open, by
/// its counters, an upstream's connects in their handshake, and a route's connections
/// waiting for their ClientHello (counted opened nowhere yet).
pub fn held_in_slot(maps: &KernelMaps, index: u32) -> Result<u64, aya::maps::MapError> {
    Ok(places_held(
        &sum_conn(&maps.conn_counters, index)?,
        &sum_upstream(&maps.upstream_counters, index)?,
        &sum_server_names(&maps.sni_counters, index)?,
    ))
}

/// What [`held_in_slot`] adds up, from the slot's three sums.
fn places_held(conn: &ConnCounters, connects: &UpstreamCounters, names: &SniCounters) -> u64 {
    crate::snapshot::still_open(conn) + connects.connecting + names.awaiting
}

/// One route slot's server-name counters, summed over CPUs (see [`sum_sni_values`]).
pub fn sum_server_names(
    map: &PerCpuArray<MapData, SniCounters>,
    index: u32,
) -> Result<SniCounters, aya::maps::MapError> {
    Ok(sum_sni_values(map.get(&index, 0)?.iter()))
}

/// Per-CPU server-name counters summed. `awaiting` is raised on the CPU that accepts and
/// lowered (a wrapping add of `u64::MAX`) on the one that reads the hello, as upstream
/// `connecting` is: a read amid a decision can see it end and not start, a sum below 0,
/// which reads as 0.
fn sum_sni_values<'a>(values: impl IntoIterator<Item = &'a SniCounters>) -> SniCounters {
    let sum = values
        .into_iter()
        .fold(SniCounters::default(), |acc, v| SniCounters {
            outcomes: std::array::from_fn(|i| acc.outcomes[i].wrapping_add(v.outcomes[i])),
            awaiting: acc.awaiting.wrapping_add(v.awaiting),
        });
    SniCounters {
        awaiting: floor_at_zero(sum.awaiting),
        ..sum
    }
}

/// One entry of a per-CPU connection counter array, summed over CPUs: what the closes count
/// from one copy of the entry, `opened` from a second. A copy reads the CPUs one after
/// another, so in one copy a connection opened on a CPU read before its open and closed on
/// one read after its close counted closed and not opened, and `active` dipped by one for a
/// poll; every close in the first copy has its open in the second (but where a route by name
/// counts the open just after the decision, and a close on another CPU counted first).
/// `untracked` is read with the closes: the kernel counts it after `opened`.
pub fn sum_conn<T: Borrow<MapData>>(
    map: &PerCpuArray<T, ConnCounters>,
    index: u32,
) -> Result<ConnCounters, aya::maps::MapError> {
    let closes = map.get(&index, 0)?;
    let opens = map.get(&index, 0)?;
    Ok(closes_then_opens(closes.iter(), opens.iter()))
}

/// The sums of the close-side counters of `closes` and of `opened` of `opens`, a later copy.
fn closes_then_opens<'a>(
    closes: impl IntoIterator<Item = &'a ConnCounters>,
    opens: impl IntoIterator<Item = &'a ConnCounters>,
) -> ConnCounters {
    let mut sum = closes
        .into_iter()
        .fold(ConnCounters::default(), |acc, v| ConnCounters {
            opened: 0,
            closed: acc.closed.wrapping_add(v.closed),
            bytes_in: acc.bytes_in.wrapping_add(v.bytes_in),
            bytes_out: acc.bytes_out.wrapping_add(v.bytes_out),
            duration_us: acc.duration_us.wrapping_add(v.duration_us),
            untracked: acc.untracked.wrapping_add(v.untracked),
        });
    sum.opened = opens
        .into_iter()
        .fold(0u64, |acc, v| acc.wrapping_add(v.opened));
    sum
}

/// The counters of a `DnsCounters` as one slice of words.
fn dns_words(counters: &DnsCounters) -> &[u64] {
    // SAFETY: DnsCounters is #[repr(C)] and made of u64 fields and u64 arrays only (its size is
    // pinned in collector-common), so it is exactly size/8 initialised, aligned u64s.
    unsafe {
        std::slice::from_raw_parts(
            std::ptr::from_ref(counters).cast::<u64>(),
            size_of::<DnsCounters>() / 8,
        )
    }
}

fn dns_words_mut(counters: &mut DnsCounters) -> &mut [u64] {
    // SAFETY: as in `dns_words`, and the borrow is exclusive.
    unsafe {
        std::slice::from_raw_parts_mut(
            std::ptr::from_mut(counters).cast::<u64>(),
            size_of::<DnsCounters>() / 8,
        )
    }
}

/// Sums DNS counters field by field (per-CPU values into one).
#[must_use]
pub fn sum_dns<'a>(values: impl IntoIterator<Item = &'a DnsCounters>) -> DnsCounters {
    let mut total = DnsCounters::default();
    for value in values {
        for (acc, word) in dns_words_mut(&mut total).iter_mut().zip(dns_words(value)) {
            *acc = acc.wrapping_add(*word);
        }
    }
    total
}

/// Reads the counters of every watched route and upstream, the error counters and the DNS
/// counters; the server-name counters of the routes on ports shared by name.
pub fn read(
    maps: &KernelMaps,
    routes: &[WatchedRoute],
    upstreams: &[WatchedUpstream],
) -> Result<KernelTotals, aya::maps::MapError> {
    let mut totals = KernelTotals::default();
    for (route, role) in routes.iter().zip(name_roles(routes)) {
        let mut route_totals = RouteTotals {
            conn: sum_conn(&maps.conn_counters, route.slot)?,
            traffic_in: sum_traffic(&maps.route_traffic, traffic_index(route.slot, DIR_IN))?,
            traffic_out: sum_traffic(&maps.route_traffic, traffic_index(route.slot, DIR_OUT))?,
            ..RouteTotals::default()
        };
        route_totals.durations = sum_durations(&maps.conn_durations, route.slot)?;
        if let Some(role) = role {
            route_totals.server_names = Some(ServerNameTotals {
                role,
                counters: sum_server_names(&maps.sni_counters, route.slot)?,
            });
        }
        totals.routes.push(route_totals);
    }
    for upstream in upstreams {
        totals.upstreams.push(UpstreamTotals {
            conn: sum_conn(&maps.conn_counters, upstream.slot)?,
            durations: sum_durations(&maps.conn_durations, upstream.slot)?,
            connects: sum_upstream(&maps.upstream_counters, upstream.slot)?,
        });
    }
    // The DNS counters before the error counters, as in `ring_drops`: the kernel counts a
    // dropped name event the other way round, so one dropped between the reads is in neither
    // drop count or in the error counter's alone (`RingDrops::dns_lines`).
    totals.dns = sum_dns(maps.dns_counters.get(&0, 0)?.iter());
    for (kind, count) in (0..ERROR_KINDS).zip(totals.errors.iter_mut()) {
        *count = sum_u64(&maps.errors, kind)?;
    }
    Ok(totals)
}

/// What the kernel's full rings dropped (pinned counters): read at a clean stop without the
/// rest.
pub fn read_ring_drops(maps: &KernelMaps) -> Result<RingDrops, aya::maps::MapError> {
    ring_drops(&maps.dns_counters, &maps.errors)
}

/// What the kernel's full rings dropped, from its DNS counters and its error counters.
pub fn ring_drops<T: Borrow<MapData>>(
    dns_counters: &PerCpuArray<T, DnsCounters>,
    errors: &PerCpuArray<T, u64>,
) -> Result<RingDrops, aya::maps::MapError> {
    use collector_common::error_kind::{CONN_CLIENT_DROPPED, CONN_EVENT_DROPPED, DNS_NAME_DROPPED};
    Ok(RingDrops {
        dns: sum_dns(dns_counters.get(&0, 0)?.iter()).events_dropped,
        connections: sum_u64(errors, CONN_EVENT_DROPPED)?,
        clients: sum_u64(errors, CONN_CLIENT_DROPPED)?,
        names: sum_u64(errors, DNS_NAME_DROPPED)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_retired_slot_holds_its_open_connections_connects_and_those_awaiting_a_hello() {
        let conn = ConnCounters {
            opened: 10,
            closed: 6,
            untracked: 1,
            ..ConnCounters::default()
        };
        let connects = UpstreamCounters {
            connecting: 2,
            ..UpstreamCounters::default()
        };
        let names = SniCounters {
            awaiting: 3,
            ..SniCounters::default()
        };
        assert_eq!(places_held(&conn, &connects, &names), 3 + 2 + 3);
        // A port shared by name whose connections all wait for their hello: none opened.
        let waiting_only = places_held(
            &ConnCounters::default(),
            &UpstreamCounters::default(),
            &names,
        );
        assert_eq!(waiting_only, 3);
    }

    #[test]
    fn a_connection_opened_and_closed_on_two_cpus_amid_a_copy_never_dips_active() {
        let cpu = |opened, closed| ConnCounters {
            opened,
            closed,
            bytes_in: closed * 10,
            ..ConnCounters::default()
        };
        // The first copy read CPU 0 before the open there, CPU 1 after the close there; the
        // second copy reads both after.
        let first = [cpu(5, 0), cpu(0, 6)];
        let second = [cpu(6, 0), cpu(0, 6)];
        let sum = closes_then_opens(&first, &second);
        assert_eq!((sum.opened, sum.closed, sum.bytes_in), (6, 6, 60));
        // A close after the first copy and an open after that: counted open, not closed.
        let second = [cpu(7, 0), cpu(0, 7)];
        let sum = closes_then_opens(&first, &second);
        assert_eq!(sum.opened - sum.closed, 1);
    }

    #[test]
    fn connects_in_progress_read_amid_a_handshake_are_never_below_zero() {
        // One connect's 1 on CPU 0 not read yet, its end (u64::MAX) on CPU 1 read.
        assert_eq!(floor_at_zero(0u64.wrapping_add(u64::MAX)), 0);
        // Three started on one CPU, two ended on another.
        assert_eq!(
            floor_at_zero(3u64.wrapping_add(u64::MAX).wrapping_add(u64::MAX)),
            1
        );
        assert_eq!(floor_at_zero(0), 0);
    }

    #[test]
    fn server_name_counters_sum_per_cpu_with_the_wait_never_below_zero() {
        use collector_common::sni_outcome::{INCOMPLETE, MATCHED, MISSED};
        let cpu = |matched, missed, awaiting| {
            let mut counters = SniCounters {
                awaiting,
                ..SniCounters::default()
            };
            counters.outcomes[MATCHED as usize] = matched;
            counters.outcomes[MISSED as usize] = missed;
            counters
        };
        // Three accepted on CPU 0; two decided on CPU 1 (each a wrapping add of u64::MAX).
        let lowered = u64::MAX.wrapping_add(u64::MAX);
        let sum = sum_sni_values(&[cpu(4, 0, 3), cpu(1, 1, lowered)]);
        assert_eq!(sum.outcomes[MATCHED as usize], 5);
        assert_eq!(sum.outcomes[MISSED as usize], 1);
        assert_eq!(sum.outcomes[INCOMPLETE as usize], 0);
        assert_eq!(sum.awaiting, 1);
        // CPU 1's decision read, CPU 0's accept not yet: -1, read as 0.
        assert_eq!(
            sum_sni_values(&[cpu(0, 0, 0), cpu(1, 0, u64::MAX)]).awaiting,
            0
        );
        // Counts that wrapped on one CPU still sum as the kernel counted them.
        assert_eq!(
            sum_sni_values(&[cpu(u64::MAX, 0, 0), cpu(2, 0, 0)]).outcomes[MATCHED as usize],
            1
        );
        assert_eq!(sum_sni_values(&[]), SniCounters::default());
    }

    fn route(name: &str, ports: &[u16], sni: &[&str]) -> WatchedRoute {
        WatchedRoute {
            name: name.into(),
            kind: crate::config::RouteKind::Https,
            ports: ports.to_vec(),
            sni: sni.iter().map(|&s| s.to_owned()).collect(),
            slot: 0,
        }
    }

    #[test]
    fn a_route_without_names_that_shares_a_port_with_named_ones_is_their_fallback() {
        let routes = [
            route("web", &[80], &[]),
            route("tls", &[443, 8443], &[]),
            route("api", &[443], &["api.example.com"]),
            route("admin", &[443, 9443], &["*.admin.example.com"]),
            route("other", &[9443], &[]),
        ];
        assert_eq!(
            name_roles(&routes),
            [
                None,
                Some(NameRole::Fallback),
                Some(NameRole::Named),
                Some(NameRole::Named),
                Some(NameRole::Fallback),
            ]
        );
        // Without names anywhere, no route takes part.
        assert_eq!(name_roles(&routes[..2]), [None, None]);
        let waiting = |role| {
            ServerNameTotals {
                role,
                counters: SniCounters {
                    awaiting: 4,
                    ..SniCounters::default()
                },
            }
            .awaiting()
        };
        // A named route's: a crashed run's route without names, named since.
        assert_eq!(
            (waiting(NameRole::Fallback), waiting(NameRole::Named)),
            (4, 4)
        );
    }

    #[test]
    fn dns_counters_sum_every_field() {
        let mut one = DnsCounters::default();
        one.queries_by_qtype[1] = 3;
        one.latency[4] = 2;
        one.events_dropped = 1;
        let mut two = one;
        two.cache_misses = 5;
        two.queries_by_qtype[258] = 1;
        let total = sum_dns([&one, &two]);
        assert_eq!(total.queries_by_qtype[1], 6);
        assert_eq!(total.queries_by_qtype[258], 1);
        assert_eq!(total.latency[4], 4);
        assert_eq!(total.events_dropped, 2);
        assert_eq!(total.cache_misses, 5);
    }
}

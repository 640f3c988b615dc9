//! Reading the kernel's counters: per-CPU values summed for each watched route. Runs on the
//! poller only; scrapes never reach the kernel.

use aya::maps::{MapData, PerCpuArray};
use collector_common::{
    ConnCounters, DIR_IN, DIR_OUT, DURATION_BUCKETS, ERROR_KINDS, TrafficCounters, duration_index,
    traffic_index,
};

use crate::loader::{KernelMaps, WatchedRoute};

/// Totals of one route, summed over CPUs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RouteTotals {
    pub conn: ConnCounters,
    /// Closed connections per duration bucket (see `collector_common::DURATION_BUCKETS`).
    pub durations: [u64; DURATION_BUCKETS as usize],
    pub traffic_in: TrafficCounters,
    pub traffic_out: TrafficCounters,
}

/// Everything read from the kernel in one poll.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelTotals {
    /// In the order of the watched routes.
    pub routes: Vec<RouteTotals>,
    pub errors: [u64; ERROR_KINDS as usize],
}

fn sum_u64(map: &PerCpuArray<MapData, u64>, index: u32) -> Result<u64, aya::maps::MapError> {
    Ok(map
        .get(&index, 0)?
        .iter()
        .copied()
        .fold(0, u64::wrapping_add))
}

fn sum_traffic(
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

fn sum_conn(
    map: &PerCpuArray<MapData, ConnCounters>,
    index: u32,
) -> Result<ConnCounters, aya::maps::MapError> {
    Ok(map
        .get(&index, 0)?
        .iter()
        .fold(ConnCounters::default(), |acc, v| ConnCounters {
            opened: acc.opened.wrapping_add(v.opened),
            closed: acc.closed.wrapping_add(v.closed),
            bytes_in: acc.bytes_in.wrapping_add(v.bytes_in),
            bytes_out: acc.bytes_out.wrapping_add(v.bytes_out),
            duration_ns: acc.duration_ns.wrapping_add(v.duration_ns),
        }))
}

/// Reads the counters of every watched route and the error counters.
pub fn read(
    maps: &KernelMaps,
    routes: &[WatchedRoute],
) -> Result<KernelTotals, aya::maps::MapError> {
    let mut totals = KernelTotals::default();
    for route in routes {
        let mut route_totals = RouteTotals {
            conn: sum_conn(&maps.conn_counters, route.slot)?,
            traffic_in: sum_traffic(&maps.route_traffic, traffic_index(route.slot, DIR_IN))?,
            traffic_out: sum_traffic(&maps.route_traffic, traffic_index(route.slot, DIR_OUT))?,
            ..RouteTotals::default()
        };
        for (bucket, count) in (0..DURATION_BUCKETS).zip(route_totals.durations.iter_mut()) {
            *count = sum_u64(&maps.conn_durations, duration_index(route.slot, bucket))?;
        }
        totals.routes.push(route_totals);
    }
    for (kind, count) in (0..ERROR_KINDS).zip(totals.errors.iter_mut()) {
        *count = sum_u64(&maps.errors, kind)?;
    }
    Ok(totals)
}
